//! thalamus-dialog-store: the replicated dialog store. The [`DialogStore`] trait, its record
//! ([`StoredDialog`]), its errors, settings and configuration, three backends that pass one
//! conformance suite ([`conformance`]), and the [`replicator::Replicator`] that batches the
//! writes of a node.
//!
//! - [`memory::MemoryDialogStore`]: in-process maps (dashmap), for tests and single-process use.
//! - [`embedded::EmbeddedDialogStore`]: the single-node default, a redb file on local disk
//!   written by a dedicated writer thread; a restarted gateway still holds its dialogs.
//! - [`redis::RedisDialogStore`]: the cluster backend, Redis (plain URL or Sentinel) through a
//!   reconnecting connection manager, with Lua scripts for every conditional write.
//!
//! Semantics shared by all backends (written down once in [`rules`]): writes are
//! compare-and-set on the record version; delete leaves a tombstone for a short TTL; claim moves
//! ownership with exactly one winner; live records expire after a TTL unless rewritten; the
//! index by device and by owner lists live records only.
//!
//! This crate does not decide when to write (that is the bridge's job, through
//! [`replicator::Replicator`]), does not run takeover, and does not interpret the SIP dialog
//! payload: it cannot, as it does not depend on the SIP stack (`scripts/test` checks it).
#![forbid(unsafe_code)]

pub mod clock;
pub mod conformance;
pub mod embedded;
pub mod error;
pub mod memory;
pub mod open;
pub mod record;
pub mod redis;
pub mod replicator;
pub mod rules;
pub mod store;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::StoreError;
pub use open::{open_dialog_store, DialogStoreConfig, StoreBackend};
pub use record::{
    DialogKey, DialogState, NegotiatedMedia, SipDialogPayload, StoredDialog, SCHEMA_VERSION,
};
pub use store::{
    DialogStore, StoreFuture, StoreSettings, SweepReport, WriteOp, DEFAULT_LIVE_TTL,
    DEFAULT_TOMBSTONE_TTL,
};
