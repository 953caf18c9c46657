//! thalamus-balancer: the SIP load balancer, a stateless proxy that routes by rendezvous hash
//! over the live gateway nodes.
//!
//! * [`membership`]: the node table fed by heartbeats and a clock (miss count, hysteresis,
//!   restarts, draining). Sans-IO.
//! * [`router`]: the routing core ([`router::BalancerCore`]): a parsed SIP message in, one
//!   decision out. Sans-IO, no per-call state.
//! * [`config`], [`metrics`] and [`server`]: the `thalamus balancer` process (tokio shell around
//!   the core, SIP over UDP and TCP, heartbeat listener, admin HTTP with `/nodes` and
//!   `/metrics`).
//!
//! The ownership function and the heartbeat format are `thalamus-ownership`'s, shared with the
//! gateway nodes. The balancer does not hold transactions or dialogs, does not resolve
//! SRV/NAPTR, and does not speak TLS; see `docs/balancer.md`. It depends on the SIP stack and
//! on the ownership rule only: `scripts/test` checks that it never links quinn, redb, Redis, the
//! device protocol or the media relay.
#![forbid(unsafe_code)]

pub mod config;
pub mod membership;
pub mod metrics;
pub mod router;
pub mod server;
pub mod watch;

pub use config::BalancerConfig;
pub use membership::{Membership, MembershipConfig, MembershipEvent};
pub use router::{BalancerCore, Decision, NextHop, Outgoing, RouterConfig};
pub use server::RunningBalancer;
