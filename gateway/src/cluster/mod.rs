//! The cluster layer: the replicated dialog store ([`store`]: memory, embedded redb, Redis)
//! and the replication front the SIP layer writes through ([`replicator`]).
//!
//! Confirmed dialogs are written to a shared store so that a survivor can take over the
//! dialogs of a dead node (the JAIN SIP HA design; see `docs/clustering.md`). Membership,
//! heartbeats and the takeover procedure are not here yet.

pub mod replicator;
pub mod store;
