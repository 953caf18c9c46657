//! The [`DialogStore`] trait every backend implements, and what its operations take and
//! return: [`StoreSettings`] (TTLs), [`WriteOp`] (a write of a batch), [`SweepReport`].

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::error::StoreError;
use crate::record::{DialogKey, StoredDialog};

/// Time-to-live settings shared by every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSettings {
    /// How long a live record lives after its last write (put or claim).
    pub live_ttl: Duration,
    /// How long a tombstone stays after the delete.
    pub tombstone_ttl: Duration,
}

/// Default live-record TTL: 24 hours.
pub const DEFAULT_LIVE_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Default tombstone TTL: 32 seconds (64 × T1, the time a server transaction absorbs
/// retransmissions).
pub const DEFAULT_TOMBSTONE_TTL: Duration = Duration::from_secs(32);

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            live_ttl: DEFAULT_LIVE_TTL,
            tombstone_ttl: DEFAULT_TOMBSTONE_TTL,
        }
    }
}

impl StoreSettings {
    /// Checks that both TTLs are at least one millisecond.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.live_ttl < Duration::from_millis(1) || self.tombstone_ttl < Duration::from_millis(1)
        {
            return Err(StoreError::Backend(
                "store TTLs must be at least 1 ms".into(),
            ));
        }
        Ok(())
    }
}

/// One write in a batch ([`DialogStore::write_batch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// [`DialogStore::put`].
    Put {
        /// The record to write.
        record: StoredDialog,
        /// The version it must replace (`None`: create only if absent).
        expected_version: Option<u64>,
    },
    /// [`DialogStore::delete`].
    Delete {
        /// The dialog to delete.
        key: DialogKey,
        /// The version it must replace (`None`: whatever is live).
        expected_version: Option<u64>,
    },
}

impl WriteOp {
    /// The dialog the write touches.
    pub fn key(&self) -> &DialogKey {
        match self {
            Self::Put { record, .. } => &record.key,
            Self::Delete { key, .. } => key,
        }
    }
}

/// What a sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Expired live records removed.
    pub expired_live: u64,
    /// Expired tombstones removed.
    pub expired_tombstones: u64,
    /// Lapsed owner leases removed.
    pub expired_leases: u64,
}

/// The future every store operation returns (boxed so the trait works as `dyn DialogStore`).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The replicated dialog store. Every method is one atomic operation on the backend.
pub trait DialogStore: Send + Sync + std::fmt::Debug {
    /// A short name of the backend (`memory`, `embedded`, `redis`).
    fn backend_name(&self) -> &'static str;

    /// The record under `key`, live or tombstone; `None` when absent or expired.
    fn get<'a>(&'a self, key: &'a DialogKey) -> StoreFuture<'a, Option<StoredDialog>>;

    /// Compare-and-set write of a live record. `expected_version = None` creates only when no
    /// record (live or tombstone) exists; `Some(v)` replaces only version `v`. The store sets
    /// `version` (to `v + 1`, or 1 on create), `updated_at_ms` and `state = Live`, refreshes the
    /// live TTL, keeps the device and owner indexes in step, and returns the new version. A lost
    /// race is [`StoreError::Conflict`] with the current version.
    fn put<'a>(
        &'a self,
        record: &'a StoredDialog,
        expected_version: Option<u64>,
    ) -> StoreFuture<'a, u64>;

    /// Ends the dialog: the live record becomes a tombstone (version + 1) that lives for the
    /// tombstone TTL and leaves both indexes. `expected_version = None` deletes whatever is
    /// live; `Some(v)` only version `v`. Returns the tombstone's version. Absent is
    /// [`StoreError::NotFound`]; repeating an unconditional delete on the tombstone returns its
    /// version again.
    fn delete<'a>(
        &'a self,
        key: &'a DialogKey,
        expected_version: Option<u64>,
    ) -> StoreFuture<'a, u64>;

    /// Takes ownership: succeeds only when the live record's epoch is `expected_epoch`, and
    /// returns the record with `owner = node_id`, `epoch + 1`, `version + 1` and a fresh live
    /// TTL. Among concurrent claimers with the same expected epoch exactly one wins; the others
    /// get [`StoreError::Conflict`] with the current epoch. A tombstone is
    /// [`StoreError::Tombstoned`], no record [`StoreError::NotFound`].
    fn claim<'a>(
        &'a self,
        key: &'a DialogKey,
        node_id: &'a str,
        expected_epoch: u64,
    ) -> StoreFuture<'a, StoredDialog>;

    /// The live records of one device (the index by device), in no particular order.
    fn list_by_device<'a>(&'a self, device_id: &'a str) -> StoreFuture<'a, Vec<StoredDialog>>;

    /// Up to `limit` live records owned by `node_id` (a survivor uses it to find a dead node's
    /// dialogs), in no particular order.
    fn list_by_owner<'a>(
        &'a self,
        node_id: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredDialog>>;

    /// Renews the owner lease of `node_id` for `ttl` from now (creating it if absent). A node
    /// renews its lease while it lives; a survivor that finds the lease lapsed knows the owner
    /// stopped renewing and may claim its dialogs. `ttl` must be at least 1 ms.
    fn renew_lease<'a>(&'a self, node_id: &'a str, ttl: Duration) -> StoreFuture<'a, ()>;

    /// The time left on `node_id`'s owner lease; `None` when it lapsed or never existed.
    fn lease_remaining<'a>(&'a self, node_id: &'a str) -> StoreFuture<'a, Option<Duration>>;

    /// Removes expired records and their index entries. Reads already hide expired records;
    /// the sweep reclaims their space. Backends that expire keys themselves (Redis) report
    /// nothing.
    fn sweep(&self) -> StoreFuture<'_, SweepReport>;

    /// Applies several writes, in order, as efficiently as the backend allows (one transaction
    /// in the embedded store, one pipeline in Redis); each write keeps its own
    /// compare-and-set and gets its own result. The outer error means the batch as a whole
    /// could not be attempted.
    fn write_batch(&self, ops: Vec<WriteOp>) -> StoreFuture<'_, Vec<Result<u64, StoreError>>> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(ops.len());
            for op in &ops {
                results.push(match op {
                    WriteOp::Put {
                        record,
                        expected_version,
                    } => self.put(record, *expected_version).await,
                    WriteOp::Delete {
                        key,
                        expected_version,
                    } => self.delete(key, *expected_version).await,
                });
            }
            Ok(results)
        })
    }

    /// [`DialogStore::write_batch`] for writes somebody waits on (the CSeq write ahead of a
    /// request): a backend that delays commits to group them (the embedded store's
    /// `commit_interval_ms`) commits this batch without delay. The others just write it.
    fn write_batch_now(&self, ops: Vec<WriteOp>) -> StoreFuture<'_, Vec<Result<u64, StoreError>>> {
        self.write_batch(ops)
    }

    /// Somebody now waits behind the writes in flight: a backend that holds a commit back to
    /// group it (the embedded store's `commit_interval_ms`) commits what it holds at once.
    /// The others have nothing to do.
    fn expedite(&self) {}

    /// Which instance of the backend answers: a value that changes when the data behind the
    /// store may have changed without this node's writes (a Redis restart, or a failover to a
    /// replica that may lack the last writes). A node that sees it change writes the records of
    /// its calls again. `None` for backends without such a notion (the embedded and memory
    /// stores live in the node itself).
    fn instance(&self) -> StoreFuture<'_, Option<String>> {
        Box::pin(async { Ok(None) })
    }

    /// Closes the store: pending writes finish, later calls fail with [`StoreError::Closed`],
    /// and files or connections are released.
    fn close(&self) -> StoreFuture<'_, ()>;
}
