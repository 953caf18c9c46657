//! thalamus-gateway: one Thalamus gateway node, wired from the crates that do the work.
//!
//! * [`config`]: the node's TOML configuration (every section, `THALAMUS_*` overrides, checks
//!   that name the key), and the narrow settings each component gets from it.
//! * [`node`]: starts a node (ingress, SIP user agent, media, cluster layer, bridge, admin);
//!   [`shared`]: what the node's tasks share and where devices belong; `sweep`: the ownership
//!   sweep and the load figures.
//! * [`cluster`]: the `[cluster]` section and what a node starts of it (dialog store,
//!   replicator, owner lease, heartbeats); [`heartbeat`]: the heartbeat sender.
//! * [`admin`] and [`metrics`]: the admin HTTP endpoint and the node's metrics registry;
//!   [`console`]: the operator console it serves, with [`cluster_table`]: the balancers' node
//!   table it shows.
//!
//! What it does not do: protocol rules. Device sessions are `thalamus-ingress`'s, calls
//! `thalamus-bridge`'s, media `thalamus-media`'s, the store `thalamus-dialog-store`'s, the SIP
//! stack `thalamus-sip`'s. It does not link the load balancer (the `thalamus` binary does).
#![forbid(unsafe_code)]

pub mod admin;
pub mod check;
pub mod cluster;
pub mod cluster_table;
pub mod config;
pub mod console;
pub mod heartbeat;
pub mod metrics;
pub mod node;
pub mod reload;
pub mod shared;
pub mod sip_metrics;
mod sweep;
pub mod web;
