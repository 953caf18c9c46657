//! thalamus-ownership: which node of a cluster owns a device, and how nodes and balancers tell
//! each other who is alive.
//!
//! * [`hash`]: node ids ([`NodeId`]) and the rendezvous function [`owner`], the one rule every
//!   balancer and every node applies to route SIP and to place devices.
//! * [`fence`]: whether a node may act on its dialogs without a confirmed write, and whether
//!   another node may still be acting on one (the owner lease and the balancers' live sets).
//! * [`heartbeat`]: the heartbeat datagram a node sends and the live-set report a balancer
//!   answers it with (sans-IO encode and decode, HMAC when a secret is shared), and the
//!   [`LiveSet`] a node keeps.
//!
//! It does not send or receive anything (the gateway's heartbeat sender and the balancer's
//! server do), keep time (callers pass timestamps) or decide liveness (the balancer's
//! membership does). It cannot name tokio: `scripts/test` checks that it does not depend on it.
#![forbid(unsafe_code)]

pub mod fence;
pub mod hash;
pub mod heartbeat;

pub use fence::{Fence, Fenced, SharedFence};
pub use hash::{owner, NodeId};
pub use heartbeat::{
    Heartbeat, HeartbeatError, LiveNode, LiveSet, LiveSetReport, Load, HEARTBEAT_VERSION,
};
