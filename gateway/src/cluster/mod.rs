//! The cluster layer of a node: the `[cluster]` settings ([`config`]), the conversions between live calls and stored records with the rules
//! of a takeover ([`dialogs`]), and what a running node starts ([`runtime`]: store, replicator,
//! owner lease, heartbeats).
//!
//! Confirmed dialogs are written to a shared store so that a survivor can take over the
//! dialogs of a dead node (the JAIN SIP HA design; see `docs/clustering.md`). The takeover
//! itself (claiming a record, importing it into the user agent, attaching a call) is driven by
//! the bridge (`crate::bridge::takeover`), which owns the calls.

pub mod config;
pub mod dialogs;
pub mod runtime;
