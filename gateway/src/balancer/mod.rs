//! The SIP load balancer: a stateless proxy that routes by rendezvous hash over live nodes.
//!
//! * [`hash`]: the ownership function [`hash::owner`] (rendezvous hashing, fixed SipHash keys),
//!   shared by the balancer and the gateway nodes.
//! * [`membership`]: the node table fed by heartbeats and a clock (miss count, hysteresis,
//!   restarts, draining). Sans-IO.
//! * [`router`]: the routing core ([`router::BalancerCore`]): a parsed SIP message in, one
//!   decision out. Sans-IO, no per-call state.
//! * [`heartbeat`]: the heartbeat datagram format, the live-set report a balancer answers
//!   each heartbeat with, and [`heartbeat::HeartbeatSender`], which a gateway node runs (it
//!   keeps the latest live set, so the node sends devices where the balancers send their SIP).
//! * [`config`], [`metrics`] and [`server`]: the `thalamus balancer` process (tokio shell around
//!   the core, SIP over UDP and TCP, heartbeat listener, admin HTTP with `/nodes` and
//!   `/metrics`).
//!
//! The balancer does not hold transactions or dialogs, does not resolve SRV/NAPTR, and does not
//! speak TLS; see `docs/balancer.md`.

pub mod config;
pub mod hash;
pub mod heartbeat;
pub mod membership;
pub mod metrics;
pub mod router;
pub mod server;

pub use hash::{owner, NodeId};
pub use heartbeat::{Heartbeat, HeartbeatSender, HeartbeatSenderConfig, LiveSet, Load};
pub use membership::{Membership, MembershipConfig, MembershipEvent};
pub use router::{BalancerCore, Decision, NextHop, Outgoing, RouterConfig};
