//! The `[cluster.store]` configuration ([`DialogStoreConfig`]: which backend, its TTLs and
//! settings) and [`open_dialog_store`], which opens the configured backend.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::embedded;
use crate::error::StoreError;
use crate::memory::MemoryDialogStore;
use crate::redis::{RedisDialogStore, RedisStoreConfig};
use crate::store::{DialogStore, StoreSettings, DEFAULT_LIVE_TTL, DEFAULT_TOMBSTONE_TTL};

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
    pub redis: RedisStoreConfig,
    /// The embedded store's group commit: at most one commit (one fsync) per this many
    /// milliseconds; writes queued meanwhile share it (default 20; 0 commits at once). A
    /// confirmed dialog waits at most this long longer before it is on disk.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// The same for a commit somebody waits on (the record written before an incoming call's
    /// 2xx, a CSeq written ahead of a request): at most one per this many milliseconds
    /// (default 5; 0 commits at once; `commit_interval_ms` when that is lower). Lower answers incoming
    /// calls sooner under load, at the cost of more fsyncs.
    #[serde(default = "default_waited_commit_interval_ms")]
    pub waited_commit_interval_ms: u64,
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

fn default_waited_commit_interval_ms() -> u64 {
    5
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
            redis: RedisStoreConfig::default(),
            commit_interval_ms: default_commit_interval_ms(),
            waited_commit_interval_ms: default_waited_commit_interval_ms(),
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
        StoreBackend::Memory => Arc::new(MemoryDialogStore::new(settings, clock)),
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
                        waited_commit_interval: Duration::from_millis(
                            config.waited_commit_interval_ms,
                        ),
                        cache_bytes: usize::try_from(config.cache_mib.saturating_mul(1 << 20))
                            .unwrap_or(usize::MAX),
                    },
                )
                .await?,
            )
        }
        StoreBackend::Redis => {
            Arc::new(RedisDialogStore::connect(&config.redis, settings, clock).await?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

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
