//! The cluster layer of a running node: opens the configured dialog store, starts the
//! [`Replicator`] (unless replication is off), keeps this node's owner lease renewed, watches
//! whether the store answers (a probe every second: [`ClusterRuntime::store_up`], the
//! `store_up` gauge), and sends heartbeats to the SIP load balancers when configured. A node
//! starts while a Redis store is unreachable and serves unreplicated until it answers.
//!
//! The SIP side (the bridge) gets the store and the replicator from here; this module does not
//! decide when dialogs are written or taken over.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::config::ClusterConfig;
use crate::heartbeat::{HeartbeatSender, HeartbeatSenderConfig};
use thalamus_dialog_store::replicator::Replicator;
use thalamus_dialog_store::{open_dialog_store, DialogStore, StoreError, SystemClock};
use thalamus_ownership::{Fence, NodeId, SharedFence};

/// Why the cluster layer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterStartError {
    /// The store could not be opened.
    #[error("dialog store: {0}")]
    Store(#[from] StoreError),
    /// A setting is unusable.
    #[error("config key `{key}`: {message}")]
    Config {
        /// Key.
        key: &'static str,
        /// Message.
        message: String,
    },
    /// The heartbeat socket could not be bound.
    #[error("heartbeats: {0}")]
    Heartbeat(std::io::Error),
}

/// The cluster layer of one node.
#[derive(Debug)]
pub struct ClusterRuntime {
    node_id: String,
    config: ClusterConfig,
    store: Arc<dyn DialogStore>,
    replicator: Option<Arc<Replicator>>,
    heartbeats: Option<std::sync::Arc<HeartbeatSender>>,
    /// What the lease renewals and the balancers' reports say about this node's right to act
    /// on its dialogs without a confirmed write (`None` when replication is off).
    fence: Option<SharedFence>,
    lease_task: Option<JoinHandle<()>>,
    /// Whether the store answered its last probe (true until the first probe says otherwise).
    store_up: tokio::sync::watch::Receiver<bool>,
    store_up_gauge: prometheus_client::metrics::gauge::Gauge,
    /// How many times the store's instance changed while it answered (a failover or a restart
    /// the probe did not see as an outage); a change wakes receivers.
    store_changes: tokio::sync::watch::Receiver<u64>,
    store_changes_total: prometheus_client::metrics::counter::Counter,
    probe_task: Option<JoinHandle<()>>,
}

impl ClusterRuntime {
    /// Opens the store and starts the replicator and the lease renewal. Must run inside a tokio
    /// runtime.
    pub async fn start(
        config: &ClusterConfig,
        node_id: &str,
        data_dir: &Path,
    ) -> Result<Self, ClusterStartError> {
        config.validate().map_err(|e| ClusterStartError::Config {
            key: e.key,
            message: e.message,
        })?;
        let store = open_dialog_store(&config.store, data_dir, Arc::new(SystemClock)).await?;
        let replicator = config
            .replicator()
            .map(|c| Arc::new(Replicator::spawn(store.clone(), c)));
        let fence = match &replicator {
            Some(_) => {
                let id = NodeId::new(node_id).map_err(|e| ClusterStartError::Config {
                    key: "node.id",
                    message: format!("not usable as a dialog owner: {e}"),
                })?;
                let balancers = config
                    .heartbeat
                    .as_ref()
                    .map(|h| h.balancers.clone())
                    .unwrap_or_default();
                Some(SharedFence::new(Fence::new(
                    id,
                    config.lease_ttl(),
                    balancers,
                )))
            }
            None => None,
        };
        let lease_task = fence.clone().map(|fence| {
            tokio::spawn(renew_lease(
                store.clone(),
                node_id.to_string(),
                config.lease_ttl(),
                fence,
            ))
        });
        let (up_tx, store_up) = tokio::sync::watch::channel(true);
        let store_up_gauge = prometheus_client::metrics::gauge::Gauge::default();
        store_up_gauge.set(1);
        let (changes_tx, store_changes) = tokio::sync::watch::channel(0u64);
        let store_changes_total = prometheus_client::metrics::counter::Counter::default();
        let probe_task = Some(tokio::spawn(probe_store(
            store.clone(),
            StoreProbe {
                up: up_tx,
                gauge: store_up_gauge.clone(),
                changes: changes_tx,
                changes_total: store_changes_total.clone(),
            },
        )));
        Ok(Self {
            node_id: node_id.to_string(),
            config: config.clone(),
            store,
            replicator,
            heartbeats: None,
            fence,
            lease_task,
            store_up,
            store_up_gauge,
            store_changes,
            store_changes_total,
            probe_task,
        })
    }

    /// Whether the dialog store answers (updated every second; a change wakes receivers).
    pub fn store_up(&self) -> tokio::sync::watch::Receiver<bool> {
        self.store_up.clone()
    }

    /// Counts the changes of the store's instance seen while it answered (a Redis failover to
    /// a replica, or a restart between two probes): the store may have lost writes this node
    /// made, so it writes its records again. A change wakes receivers.
    pub fn store_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.store_changes.clone()
    }

    /// Starts heartbeats to the configured balancers (nothing when none are configured).
    pub async fn start_heartbeats(
        &mut self,
        sip: SocketAddr,
        quic: SocketAddr,
    ) -> Result<(), ClusterStartError> {
        let Some(hb) = &self.config.heartbeat else {
            return Ok(());
        };
        if hb.balancers.is_empty() {
            return Ok(());
        }
        let node = NodeId::new(&self.node_id).map_err(|e| ClusterStartError::Config {
            key: "node.id",
            message: format!("not usable in heartbeats: {e}"),
        })?;
        let mut sender = HeartbeatSenderConfig::new(node, sip, hb.balancers.clone());
        sender.quic = Some(quic);
        sender.interval = std::time::Duration::from_millis(hb.interval_ms);
        sender.secret = hb.secret.as_ref().map(|s| s.as_bytes().to_vec());
        if sip.ip().is_loopback() {
            sender.bind = SocketAddr::from(([127, 0, 0, 1], 0));
        }
        self.heartbeats = Some(std::sync::Arc::new(
            HeartbeatSender::start_fenced(sender, self.fence.clone())
                .await
                .map_err(ClusterStartError::Heartbeat)?,
        ));
        Ok(())
    }

    /// This node's id (the owner name in records).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The settings.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The dialog store.
    pub fn store(&self) -> Arc<dyn DialogStore> {
        self.store.clone()
    }

    /// The replicator, `None` when replication is off.
    pub fn replicator(&self) -> Option<Arc<Replicator>> {
        self.replicator.clone()
    }

    /// The fence (see `thalamus_ownership::fence`), when replication is on.
    pub fn fence(&self) -> Option<SharedFence> {
        self.fence.clone()
    }

    /// The heartbeat sender, when heartbeats are configured.
    pub fn heartbeats(&self) -> Option<std::sync::Arc<HeartbeatSender>> {
        self.heartbeats.clone()
    }

    /// Registers the replication counters.
    pub fn register_metrics(&self, registry: &mut Registry) {
        if let Some(r) = &self.replicator {
            r.register_metrics(registry);
        }
        registry.register(
            "store_up",
            "1 while the dialog store answers (probed every second), 0 while it does not",
            self.store_up_gauge.clone(),
        );
        registry.register(
            "store_instance_changes",
            "Changes of the dialog store's instance (a failover or a restart) seen while it \
             answered; each makes the node write its records again",
            self.store_changes_total.clone(),
        );
    }

    /// Stops heartbeats and lease renewal, writes out the replication queue and closes the
    /// store.
    pub async fn shutdown(&mut self) {
        if let Some(hb) = self.heartbeats.take() {
            hb.stop();
        }
        if let Some(task) = self.lease_task.take() {
            task.abort();
        }
        if let Some(task) = self.probe_task.take() {
            task.abort();
        }
        if let Some(r) = &self.replicator {
            r.shutdown().await;
        }
        if let Err(e) = self.store.close().await {
            debug!(error = %e, "dialog store close");
        }
    }
}

impl Drop for ClusterRuntime {
    fn drop(&mut self) {
        if let Some(task) = self.lease_task.take() {
            task.abort();
        }
    }
}

/// Renews the owner lease every third of its TTL, for as long as the node runs, and tells the
/// fence when each renewal was asked for once the store confirms it.
async fn renew_lease(
    store: Arc<dyn DialogStore>,
    node_id: String,
    ttl: std::time::Duration,
    fence: SharedFence,
) {
    let period = (ttl / 3).max(std::time::Duration::from_millis(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let asked_at = tokio::time::Instant::now().into_std();
        match tokio::time::timeout(ttl, store.renew_lease(&node_id, ttl)).await {
            Ok(Ok(())) => fence.with(|f| f.lease_renewed(asked_at)),
            Ok(Err(e)) => warn!(error = %e, "owner lease not renewed"),
            Err(_) => warn!("owner lease not renewed: the store did not answer"),
        }
    }
}

/// Where the store probe publishes what it finds.
struct StoreProbe {
    up: tokio::sync::watch::Sender<bool>,
    gauge: prometheus_client::metrics::gauge::Gauge,
    changes: tokio::sync::watch::Sender<u64>,
    changes_total: prometheus_client::metrics::counter::Counter,
}

/// Reads a probe key every second (each read bounded to 1 s) and publishes whether the store
/// answered: on the watch channel (receivers wake on a change) and the gauge. While it answers,
/// it also reads the store's instance ([`DialogStore::instance`]); a new instance that the
/// probe did not see as an outage (a failover to a replica, or a restart between two probes)
/// is published on `changes`. (After an outage the store coming back already makes the node
/// write its records again.)
async fn probe_store(store: Arc<dyn DialogStore>, probe: StoreProbe) {
    let key = thalamus_dialog_store::DialogKey::new("thalamus-probe", "probe", "probe");
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known: Option<String> = None;
    loop {
        tick.tick().await;
        let answered = matches!(
            tokio::time::timeout(std::time::Duration::from_secs(1), store.get(&key)).await,
            Ok(Ok(_))
        );
        let mut changed = false;
        if answered {
            if let Ok(Ok(Some(id))) =
                tokio::time::timeout(std::time::Duration::from_secs(1), store.instance()).await
            {
                changed = known.as_ref().is_some_and(|k| *k != id);
                known = Some(id);
            }
        }
        probe.gauge.set(i64::from(answered));
        if *probe.up.borrow() != answered {
            if answered {
                tracing::info!("the dialog store answers again");
            } else {
                warn!("the dialog store does not answer: calls go on unreplicated");
            }
            let _ = probe.up.send(answered);
        } else if changed {
            warn!(
                instance = known.as_deref().unwrap_or(""),
                "the dialog store is a new instance (a failover or a restart): it may lack \
                 writes of this node"
            );
            probe.changes_total.inc();
            probe.changes.send_modify(|n| *n += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::config::ReplicationMode;
    use thalamus_dialog_store::StoreBackend;

    #[tokio::test]
    async fn starts_on_memory_and_keeps_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ClusterConfig {
            lease_ttl_ms: 300,
            ..ClusterConfig::default()
        };
        config.store.backend = StoreBackend::Memory;
        let mut cluster = ClusterRuntime::start(&config, "node-a", dir.path())
            .await
            .unwrap();
        assert!(cluster.replicator().is_some());
        let store = cluster.store();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while store.lease_remaining("node-a").await.unwrap().is_none() {
            assert!(tokio::time::Instant::now() < deadline, "lease never taken");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        cluster.shutdown().await;
    }

    #[tokio::test]
    async fn replication_off_takes_no_lease_and_embedded_is_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let config = ClusterConfig {
            replication: ReplicationMode::Off,
            ..ClusterConfig::default()
        };
        let mut cluster = ClusterRuntime::start(&config, "node-a", dir.path())
            .await
            .unwrap();
        assert!(cluster.replicator().is_none());
        assert_eq!(cluster.store().backend_name(), "embedded");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            cluster.store().lease_remaining("node-a").await.unwrap(),
            None
        );
        cluster.shutdown().await;
        assert!(dir.path().join("dialogs.redb").exists());
    }

    #[tokio::test]
    async fn heartbeats_need_a_balancer_node_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ClusterConfig {
            replication: ReplicationMode::Off,
            heartbeat: Some(crate::cluster::config::HeartbeatConfig {
                balancers: vec!["127.0.0.1:9".parse().unwrap()],
                ..Default::default()
            }),
            ..ClusterConfig::default()
        };
        config.store.backend = StoreBackend::Memory;
        let mut cluster = ClusterRuntime::start(&config, "bad id!", dir.path())
            .await
            .unwrap();
        let addr: SocketAddr = "127.0.0.1:5060".parse().unwrap();
        assert!(matches!(
            cluster.start_heartbeats(addr, addr).await,
            Err(ClusterStartError::Config { key: "node.id", .. })
        ));
        let mut cluster = ClusterRuntime::start(&config, "node-a", dir.path())
            .await
            .unwrap();
        cluster.start_heartbeats(addr, addr).await.unwrap();
        assert!(cluster.heartbeats().is_some());
        cluster.shutdown().await;
    }
}
