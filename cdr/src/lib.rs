//! thalamus-cdr: call detail records.
//!
//! * [`CallRecord`]: the record of one call, schema 1 (docs/operations.md lists every field):
//!   one JSON object per call, written by the node that owned the call when it ended, so a
//!   call taken over after a node's death has one record, from the survivor, naming both
//!   nodes.
//! * [`CdrConfig`]: the `[cdr]` configuration section.
//! * [`CdrWriter`]: keeps records without ever making a call wait: a bounded queue to one task
//!   that appends them to a JSON-lines file rotated by size ([`rotate`]) and, when configured,
//!   adds them to a Redis stream (`XADD ... MAXLEN ~`) for a cluster's billing.
//! * [`CallRecords`]: what the bridge hands finished calls to.
//!
//! It does not decide what a call was (the bridge's call core does) and knows no SIP.
#![forbid(unsafe_code)]

mod record;
mod writer;

pub use record::{CallRecord, Direction, MediaSummary, SCHEMA_VERSION};
pub use writer::{rotate, CdrConfig, CdrError, CdrMetrics, CdrWriter};

/// Where finished calls go (the bridge calls it once per call, on the node that owns the call
/// when it ends). Never blocks.
pub trait CallRecords: Send + Sync + std::fmt::Debug {
    /// Keeps `record` (or counts it as dropped when the queue is full).
    fn record(&self, record: CallRecord);
}
