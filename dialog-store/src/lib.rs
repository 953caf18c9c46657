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

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod clock;
pub mod conformance;
pub mod embedded;
pub mod memory;
pub mod record;
pub mod redis;
pub mod replicator;
pub mod rules;

pub use clock::{Clock, ManualClock, SystemClock};
pub use record::{
    DialogKey, DialogState, NegotiatedMedia, SipDialogPayload, StoredDialog, SCHEMA_VERSION,
};

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

    /// Closes the store: pending writes finish, later calls fail with [`StoreError::Closed`],
    /// and files or connections are released.
    fn close(&self) -> StoreFuture<'_, ()>;
}

/// Which backend a gateway uses, and its settings (the `[cluster.store]` configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialogStoreConfig {
    /// The backend.
    #[serde(default)]
    pub backend: StoreBackend,
    /// Live-record TTL in seconds (default 86400: 24 h).
    #[serde(default = "default_live_ttl_secs")]
    pub live_ttl_secs: u64,
    /// Tombstone TTL in milliseconds (default 32000).
    #[serde(default = "default_tombstone_ttl_ms")]
    pub tombstone_ttl_ms: u64,
    /// The embedded store's file; relative paths are under the node's data directory
    /// (default `dialogs.redb`).
    #[serde(default = "default_embedded_path")]
    pub path: PathBuf,
    /// The Redis backend's settings (used when `backend = "redis"`).
    #[serde(default)]
    pub redis: redis::RedisStoreConfig,
    /// The embedded store's group commit: at most one commit (one fsync) per this many
    /// milliseconds; writes queued meanwhile share it (default 20; 0 commits at once). A
    /// confirmed dialog waits at most this long longer before it is on disk.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// The embedded store's page cache, in MiB (default 64; 1 to 65536). Reads of pages not in
    /// it go to the file (the OS page cache).
    #[serde(default = "default_cache_mib")]
    pub cache_mib: u64,
}

/// The store backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreBackend {
    /// In-process maps; nothing survives a restart.
    Memory,
    /// A redb file on local disk (single node).
    #[default]
    Embedded,
    /// Redis (cluster).
    Redis,
}

fn default_live_ttl_secs() -> u64 {
    DEFAULT_LIVE_TTL.as_secs()
}

fn default_tombstone_ttl_ms() -> u64 {
    u64::try_from(DEFAULT_TOMBSTONE_TTL.as_millis()).unwrap_or(32_000)
}

fn default_commit_interval_ms() -> u64 {
    20
}

fn default_cache_mib() -> u64 {
    (embedded::DEFAULT_CACHE_BYTES >> 20) as u64
}

fn default_embedded_path() -> PathBuf {
    PathBuf::from("dialogs.redb")
}

impl Default for DialogStoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::default(),
            live_ttl_secs: default_live_ttl_secs(),
            tombstone_ttl_ms: default_tombstone_ttl_ms(),
            path: default_embedded_path(),
            redis: redis::RedisStoreConfig::default(),
            commit_interval_ms: default_commit_interval_ms(),
            cache_mib: default_cache_mib(),
        }
    }
}

impl DialogStoreConfig {
    /// The TTL settings this configuration asks for.
    pub fn settings(&self) -> StoreSettings {
        StoreSettings {
            live_ttl: Duration::from_secs(self.live_ttl_secs),
            tombstone_ttl: Duration::from_millis(self.tombstone_ttl_ms),
        }
    }
}

/// Opens the configured backend. `data_dir` anchors a relative embedded path.
pub async fn open_dialog_store(
    config: &DialogStoreConfig,
    data_dir: &Path,
    clock: Arc<dyn Clock>,
) -> Result<Arc<dyn DialogStore>, StoreError> {
    let settings = config.settings();
    settings.validate()?;
    Ok(match config.backend {
        StoreBackend::Memory => Arc::new(memory::MemoryDialogStore::new(settings, clock)),
        StoreBackend::Embedded => {
            let path = if config.path.is_absolute() {
                config.path.clone()
            } else {
                data_dir.join(&config.path)
            };
            Arc::new(
                embedded::EmbeddedDialogStore::open_with(
                    &path,
                    settings,
                    clock,
                    embedded::EmbeddedOptions {
                        commit_interval: Duration::from_millis(config.commit_interval_ms),
                        cache_bytes: usize::try_from(config.cache_mib.saturating_mul(1 << 20))
                            .unwrap_or(usize::MAX),
                    },
                )
                .await?,
            )
        }
        StoreBackend::Redis => {
            Arc::new(redis::RedisDialogStore::connect(&config.redis, settings, clock).await?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_names() {
        let c: DialogStoreConfig = toml::from_str("").unwrap();
        assert_eq!(c, DialogStoreConfig::default());
        assert_eq!(c.backend, StoreBackend::Embedded);
        assert_eq!(c.settings(), StoreSettings::default());
        let c: DialogStoreConfig = toml::from_str(
            "backend = \"redis\"\ntombstone_ttl_ms = 5000\n[redis]\nurl = \"redis://127.0.0.1:7000/\"\n",
        )
        .unwrap();
        assert_eq!(c.backend, StoreBackend::Redis);
        assert_eq!(c.settings().tombstone_ttl, Duration::from_secs(5));
        assert_eq!(c.cache_mib, 64);
        let c: DialogStoreConfig = toml::from_str("cache_mib = 8").unwrap();
        assert_eq!(c.cache_mib, 8);
        assert!(toml::from_str::<DialogStoreConfig>("backend = \"etcd\"").is_err());
        assert!(toml::from_str::<DialogStoreConfig>("ttl = 3").is_err());
    }

    #[test]
    fn zero_ttl_is_refused() {
        let s = StoreSettings {
            live_ttl: Duration::ZERO,
            tombstone_ttl: Duration::from_secs(1),
        };
        assert!(s.validate().is_err());
        assert!(StoreSettings::default().validate().is_ok());
    }

    #[tokio::test]
    async fn open_memory_and_embedded_from_config() {
        let dir = tempfile::tempdir().unwrap();
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1_000));
        let c = DialogStoreConfig {
            backend: StoreBackend::Memory,
            ..DialogStoreConfig::default()
        };
        let s = open_dialog_store(&c, dir.path(), clock.clone())
            .await
            .unwrap();
        assert_eq!(s.backend_name(), "memory");
        let c = DialogStoreConfig::default();
        let s = open_dialog_store(&c, dir.path(), clock).await.unwrap();
        assert_eq!(s.backend_name(), "embedded");
        s.close().await.unwrap();
        assert!(dir.path().join("dialogs.redb").exists());
    }
}
