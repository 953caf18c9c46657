//! The cluster layer of a node: the `[cluster]` settings ([`config`]) and what a running node
//! starts of it ([`runtime`]: dialog store, replicator, owner lease, heartbeats).
//!
//! Confirmed dialogs are written to a shared store so that a survivor can take over the
//! dialogs of a dead node (the JAIN SIP HA design; see `docs/clustering.md`). The takeover
//! itself (claiming a record, importing it into the user agent, attaching a call) is driven by
//! the bridge (`thalamus_bridge::takeover`), which owns the calls; the store and the replicator
//! are `thalamus-dialog-store`'s.

pub mod config;
pub mod runtime;
