//! The `[cluster]` configuration section: the dialog store, what is replicated, the owner
//! lease, takeover bounds and heartbeats to the SIP load balancers.
//!
//! This module only reads and checks settings; [`crate::cluster::runtime`] acts on them.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use thalamus_dialog_store::replicator::{ReplicationStrategy, ReplicatorConfig};
use thalamus_dialog_store::DialogStoreConfig;

/// What the node replicates (`cluster.replication`): the JAIN SIP HA strategies, or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicationMode {
    /// Confirmed dialogs with their application data (the call's state on this gateway).
    #[default]
    ConfirmedDialog,
    /// Confirmed dialogs without application data.
    ConfirmedDialogNoAppData,
    /// Confirmed dialogs with their application data, and the early dialogs of incoming calls
    /// (with their INVITE), so a call still ringing when its node dies completes on a survivor.
    EarlyAndConfirmed,
    /// Nothing is written: no store writes, no takeover of this node's dialogs. Requests for
    /// dialogs this node does not hold are still looked up in the store (a node may run with
    /// replication off and still take over dialogs written by others).
    Off,
}

impl ReplicationMode {
    /// The replicator strategy, `None` when replication is off.
    pub fn strategy(self) -> Option<ReplicationStrategy> {
        match self {
            Self::ConfirmedDialog => Some(ReplicationStrategy::ConfirmedDialog),
            Self::ConfirmedDialogNoAppData => Some(ReplicationStrategy::ConfirmedDialogNoAppData),
            Self::EarlyAndConfirmed => Some(ReplicationStrategy::EarlyAndConfirmed),
            Self::Off => None,
        }
    }
}

/// Heartbeats this node sends to the SIP load balancers (`[cluster.heartbeat]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// Heartbeat addresses of the balancers (their `heartbeat.listen`).
    pub balancers: Vec<SocketAddr>,
    /// Time between heartbeats, milliseconds (must match the balancers' `interval_ms`).
    pub interval_ms: u64,
    /// Shared secret authenticating heartbeats (the balancers' `heartbeat.secret`).
    pub secret: Option<String>,
    /// Send a device that logs in here to its owner node (MBFP `Redirect`) when the live set
    /// the balancers report names another owner (default true).
    pub redirect_devices: bool,
    /// Send unauthenticated heartbeats to balancers that are not on loopback (they must be
    /// configured `insecure` too): for closed lab networks only.
    pub insecure: bool,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            balancers: Vec::new(),
            interval_ms: 1000,
            secret: None,
            redirect_devices: true,
            insecure: false,
        }
    }
}

/// The `[cluster]` section.
///
/// Node identity and epochs: a node is `node.id`; a dialog record names its owner by that id and
/// carries an ownership epoch raised by every claim. A node that restarts holds none of its
/// dialogs in memory and takes its own records back through the same claim (compare-and-set on
/// the epoch) as any survivor would, so a restarted node and a survivor never both hold a
/// dialog, and a node that was declared dead finds, on its next write, that the record moved on
/// (the write conflicts and the node drops its copy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// What is replicated.
    pub replication: ReplicationMode,
    /// The dialog store (`[cluster.store]`, `[cluster.store.redis]`).
    pub store: DialogStoreConfig,
    /// This node's owner lease in the store, milliseconds; renewed every third of it. A
    /// reconnecting device's dialogs are claimed at once when their owner's lease lapsed, else
    /// when it lapses (or at the dialog's next request, whichever comes first).
    pub lease_ttl_ms: u64,
    /// Longest wait for the write of a local CSeq before the in-dialog request that uses it is
    /// sent (BYE, re-INVITE, INFO), milliseconds. The request goes anyway after it (counted).
    pub write_ahead_timeout_ms: u64,
    /// Longest wait for the store while taking a dialog over, milliseconds; past it the request
    /// is answered 481 (or 503 when the store is unavailable).
    pub takeover_timeout_ms: u64,
    /// Writes the replication queue holds before refusing new ones.
    pub queue_capacity: usize,
    /// Most writes in one store batch.
    pub max_batch: usize,
    /// After a takeover, re-INVITE the peer with this node's media address so media follows
    /// (not when the request that caused the takeover ends the dialog or carries an offer).
    pub reinvite_after_takeover: bool,
    /// Heartbeats to the SIP load balancers (none by default).
    pub heartbeat: Option<HeartbeatConfig>,
    /// When the dialog store has not answered this node for this long, milliseconds, while a
    /// balancer reports another live node that reaches it, this node steps aside: it drains
    /// (no new calls; its devices move to nodes that can replicate their calls) until the
    /// store answers again. 0: never (the node keeps serving unreplicated).
    pub step_aside_after_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            replication: ReplicationMode::default(),
            store: DialogStoreConfig::default(),
            lease_ttl_ms: 10_000,
            write_ahead_timeout_ms: 250,
            takeover_timeout_ms: 2_000,
            queue_capacity: 4096,
            max_batch: 256,
            reinvite_after_takeover: true,
            heartbeat: None,
            step_aside_after_ms: 10_000,
        }
    }
}

/// A `[cluster]` key with a bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct ClusterConfigError {
    /// Dotted key.
    pub key: &'static str,
    /// What is wrong.
    pub message: String,
}

impl ClusterConfig {
    /// Cross-key checks serde cannot express.
    pub fn validate(&self) -> Result<(), ClusterConfigError> {
        let bad = |key: &'static str, message: &str| {
            Err(ClusterConfigError {
                key,
                message: message.into(),
            })
        };
        if self.lease_ttl_ms < 30 {
            return bad("cluster.lease_ttl_ms", "must be at least 30");
        }
        if self.step_aside_after_ms != 0 && self.step_aside_after_ms < 100 {
            return bad(
                "cluster.step_aside_after_ms",
                "must be 0 (never) or at least 100",
            );
        }
        if self.takeover_timeout_ms == 0 {
            return bad("cluster.takeover_timeout_ms", "must be above 0");
        }
        if self.queue_capacity == 0 || self.max_batch == 0 {
            return bad(
                "cluster.queue_capacity",
                "queue_capacity and max_batch must be above 0",
            );
        }
        if self.store.settings().validate().is_err() {
            return bad("cluster.store", "TTLs must be at least 1 ms");
        }
        if self.store.commit_interval_ms > 1_000 {
            return bad("cluster.store.commit_interval_ms", "must be at most 1000");
        }
        if self.store.waited_commit_interval_ms > 1_000 {
            return bad(
                "cluster.store.waited_commit_interval_ms",
                "must be at most 1000",
            );
        }
        if !(1..=65_536).contains(&self.store.cache_mib) {
            return bad("cluster.store.cache_mib", "must be 1-65536");
        }
        if let Some(hb) = &self.heartbeat {
            if hb.interval_ms < 10 {
                return bad("cluster.heartbeat.interval_ms", "must be at least 10");
            }
            if hb.secret.as_ref().is_some_and(String::is_empty) {
                return bad("cluster.heartbeat.secret", "must not be empty when set");
            }
            if hb.secret.is_none()
                && !hb.insecure
                && hb.balancers.iter().any(|b| !b.ip().is_loopback())
            {
                return bad(
                    "cluster.heartbeat.secret",
                    "required when a balancer is not on loopback: the balancers refuse \
                     unauthenticated heartbeats (set cluster.heartbeat.insecure = true for a \
                     balancer that takes them on a closed network)",
                );
            }
        }
        Ok(())
    }

    /// The owner lease TTL.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    /// The write-ahead bound.
    pub fn write_ahead_timeout(&self) -> Duration {
        Duration::from_millis(self.write_ahead_timeout_ms)
    }

    /// The takeover bound.
    pub fn takeover_timeout(&self) -> Duration {
        Duration::from_millis(self.takeover_timeout_ms)
    }

    /// The replicator settings, `None` when replication is off.
    pub fn replicator(&self) -> Option<ReplicatorConfig> {
        let strategy = self.replication.strategy()?;
        Some(ReplicatorConfig {
            strategy,
            queue_capacity: self.queue_capacity,
            max_batch: self.max_batch,
            ..ReplicatorConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thalamus_dialog_store::StoreBackend;

    #[test]
    fn defaults_and_names() {
        let c: ClusterConfig = toml::from_str("").unwrap();
        assert_eq!(c, ClusterConfig::default());
        assert_eq!(c.store.backend, StoreBackend::Embedded);
        assert_eq!(
            c.replicator().unwrap().strategy,
            ReplicationStrategy::ConfirmedDialog
        );
        assert!(c.validate().is_ok());
        let c: ClusterConfig = toml::from_str(
            "replication = \"confirmed-dialog-no-app-data\"\nlease_ttl_ms = 900\n\
             [store]\nbackend = \"redis\"\n[store.redis]\nurl = \"redis://127.0.0.1:7000/\"\n\
             key_prefix = \"t:\"\n[heartbeat]\nbalancers = [\"127.0.0.1:5070\"]\ninterval_ms = 100\n",
        )
        .unwrap();
        assert_eq!(
            c.replication.strategy(),
            Some(ReplicationStrategy::ConfirmedDialogNoAppData)
        );
        assert_eq!(c.store.redis.key_prefix, "t:");
        assert_eq!(c.lease_ttl(), Duration::from_millis(900));
        assert_eq!(c.heartbeat.as_ref().unwrap().interval_ms, 100);
        let c: ClusterConfig = toml::from_str("replication = \"early-and-confirmed\"").unwrap();
        assert_eq!(
            c.replication.strategy(),
            Some(ReplicationStrategy::EarlyAndConfirmed)
        );
        let c: ClusterConfig = toml::from_str("replication = \"off\"").unwrap();
        assert!(c.replicator().is_none());
        assert!(toml::from_str::<ClusterConfig>("replication = \"early-dialog\"").is_err());
        assert!(toml::from_str::<ClusterConfig>("leases = 3").is_err());
    }

    #[test]
    fn bad_values_are_named() {
        let c = ClusterConfig {
            lease_ttl_ms: 5,
            ..ClusterConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "cluster.lease_ttl_ms");
        let c = ClusterConfig {
            heartbeat: Some(HeartbeatConfig {
                interval_ms: 1,
                ..HeartbeatConfig::default()
            }),
            ..ClusterConfig::default()
        };
        assert_eq!(
            c.validate().unwrap_err().key,
            "cluster.heartbeat.interval_ms"
        );
        let mut c = ClusterConfig::default();
        c.store.tombstone_ttl_ms = 0;
        assert_eq!(c.validate().unwrap_err().key, "cluster.store");
        let mut c = ClusterConfig::default();
        c.store.commit_interval_ms = 5_000;
        assert_eq!(
            c.validate().unwrap_err().key,
            "cluster.store.commit_interval_ms"
        );
        let mut c = ClusterConfig::default();
        c.store.waited_commit_interval_ms = 1_001;
        assert_eq!(
            c.validate().unwrap_err().key,
            "cluster.store.waited_commit_interval_ms"
        );
        for cache_mib in [0, 65_537] {
            let mut c = ClusterConfig::default();
            c.store.cache_mib = cache_mib;
            assert_eq!(c.validate().unwrap_err().key, "cluster.store.cache_mib");
        }
    }
}
