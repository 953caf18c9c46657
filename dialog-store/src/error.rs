//! What a store operation can fail with ([`StoreError`]).

/// What a store operation can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A compare-and-set lost: the store holds another value. `current` is the value the
    /// operation compared against: the record version for put and delete (`None` when there is
    /// no record), the ownership epoch for claim.
    #[error("compare-and-set conflict: the store holds {current:?}")]
    Conflict {
        /// The current version (put, delete) or epoch (claim); `None` when absent.
        current: Option<u64>,
    },
    /// No record (live or tombstone) under the key.
    #[error("no such dialog")]
    NotFound,
    /// The dialog ended: the key holds a tombstone at this version.
    #[error("the dialog ended (tombstone at version {version})")]
    Tombstoned {
        /// The tombstone's version.
        version: u64,
    },
    /// The record or an argument breaks a rule (empty id, over a size limit, ...).
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    /// Stored bytes could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The record was written by a schema this build does not read.
    #[error("unsupported record schema {found} (this build reads {supported})")]
    UnsupportedSchema {
        /// The schema found.
        found: u32,
        /// The schema this build reads and writes.
        supported: u32,
    },
    /// The store cannot be reached now (connection lost, failover in progress, timed out);
    /// the same operation may succeed later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store failed in a way a retry will not fix (disk error, bad configuration, script
    /// error).
    #[error("store failure: {0}")]
    Backend(String),
    /// The store was closed.
    #[error("store closed")]
    Closed,
}

impl StoreError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}
