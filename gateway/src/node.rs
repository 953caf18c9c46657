//! One gateway node: wires the crates together. It binds device ingress (QUIC), starts the
//! SIP user agent, the media engine, the cluster layer (dialog store, replication, lease,
//! heartbeats) and the bridge, serves the admin endpoint, and runs the node's own two duties:
//! the ownership sweep (devices owned elsewhere are told to move) and the load figures the
//! heartbeats carry. It decides where devices belong ([`NodeShared::redirect_for`]) from the
//! live set the balancers report.
//!
//! [`GatewayNode::start`] is what `thalamus run` calls; tests may call it in-process too. The
//! protocol rules are in the crates it wires; this module holds none of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thalamus_bridge::{Bridge, BridgeDeps, BridgeMetrics};
use thalamus_ingress::{
    DevicePlacement, DeviceRegistry, DeviceRequests, Ingress, IngressDeps, IngressMetrics,
    ResumeTokens, RunningIngress, SessionCommand, Sessions,
};
use thalamus_ownership::heartbeat::{LiveNode, LiveSet};
use thalamus_ownership::Load;
use thalamus_proto::v1::Redirect;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin;
use crate::config::{in_data_dir, Config};
use crate::heartbeat::HeartbeatSender;
use crate::metrics::Metrics;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Device ingress (TLS material, the QUIC socket).
    #[error(transparent)]
    Ingress(#[from] thalamus_ingress::IngressError),
    /// The SIP user agent could not start.
    #[error("SIP: {0}")]
    Sip(String),
    /// A socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The data directory or a secret file.
    #[error("{path}: {source}")]
    DataDir {
        /// Path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The cluster layer (dialog store, heartbeats).
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::runtime::ClusterStartError),
    /// Invalid configuration value discovered at start.
    #[error("config key `{key}`: {message}")]
    Config {
        /// Key.
        key: &'static str,
        /// Message.
        message: String,
    },
}

/// What the node's own tasks (admin, ownership sweep, device placement) share.
pub struct NodeShared {
    /// This node's id.
    pub node_id: String,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Registered devices.
    pub registry: Arc<DeviceRegistry>,
    /// Live device sessions.
    pub sessions: Arc<Sessions>,
    /// The SIP bridge (calls, and the admin endpoint's dialog operations).
    pub bridge: Bridge,
    /// Heartbeats to the balancers, and the live set they answer with (when configured).
    pub heartbeats: Option<Arc<HeartbeatSender>>,
    /// How old a live set may be to redirect devices by it; `None`: redirects are off.
    redirect_max_age: Option<Duration>,
    /// Draining: no new devices or calls; devices leave as their calls end.
    draining: AtomicBool,
}

impl NodeShared {
    /// The live set the balancers last reported, when redirects are on and a report arrived
    /// within the balancers' miss window (a report answers every heartbeat; none for 3.5
    /// intervals means no balancer hears this node).
    fn fresh_live_set(&self) -> Option<LiveSet> {
        self.heartbeats.as_ref()?.live_set(self.redirect_max_age?)
    }

    /// `device_id`'s owner in `live` when that is another node with a device address and the
    /// device has no call here.
    fn owner_elsewhere(&self, live: &LiveSet, device_id: &str) -> Option<Redirect> {
        let owner = live.owner(device_id)?;
        if owner.node.as_str() == self.node_id {
            return None;
        }
        let address = owner.quic?;
        if self.bridge.has_calls(device_id) {
            return None;
        }
        Some(Redirect {
            address: address.to_string(),
            node_id: owner.node.as_str().to_string(),
        })
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts or stops draining. While draining, the heartbeats say so: the balancers send no
    /// new calls here and the live set they report leaves this node out, so logins are
    /// redirected to the devices' new owners and the ownership sweep moves the devices that
    /// have no call. Calls in progress go on to their end. Without balancers, draining
    /// changes nothing but the flag (there is nowhere to send devices).
    pub fn set_draining(&self, draining: bool) {
        if self.draining.swap(draining, Ordering::Relaxed) != draining {
            info!(draining, "node draining changed");
        }
        self.metrics.draining.set(i64::from(draining));
        if let Some(hb) = &self.heartbeats {
            hb.set_draining(draining);
        }
    }
}

impl DevicePlacement for NodeShared {
    /// Where `device_id` should log in instead of here: its owner in the live set the
    /// balancers last reported, when that is another node. `None` (serve here) when redirects
    /// are off, when no fresh report arrived, when no node is eligible, and when the device
    /// has calls on this node.
    fn redirect_for(&self, device_id: &str) -> Option<Redirect> {
        let live = self.fresh_live_set()?;
        self.owner_elsewhere(&live, device_id)
    }
}

/// The load figures a node's heartbeats carry: device sessions, calls in progress and the
/// process's CPU use (cores busy, from `/proc/self/stat`; 0 where that does not exist), sampled
/// at most once a second.
struct LoadReporter {
    last: Option<(Instant, u64)>,
}

impl LoadReporter {
    /// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
    const TICKS_PER_SEC: f64 = 100.0;

    fn new() -> Self {
        Self { last: None }
    }

    /// User + system CPU ticks of this process so far.
    fn cpu_ticks() -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')')?.1;
        let mut fields = rest.split_whitespace().skip(11);
        let utime: u64 = fields.next()?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        Some(utime + stime)
    }

    /// New figures when a second has passed since the last ones.
    fn sample(&mut self, node: &NodeShared) -> Option<Load> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|(at, _)| now.duration_since(at) < Duration::from_secs(1))
        {
            return None;
        }
        let ticks = Self::cpu_ticks().unwrap_or(0);
        let cpu = match self.last {
            Some((at, before)) => {
                let secs = now.duration_since(at).as_secs_f64();
                let used = ticks.saturating_sub(before) as f64 / Self::TICKS_PER_SEC;
                if secs > 0.0 {
                    (used / secs) as f32
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        self.last = Some((now, ticks));
        Some(Load {
            devices: node.sessions.len() as u64,
            calls: node.bridge.active_calls() as u64,
            cpu,
        })
    }
}

/// Most devices told to move per sweep (so a node that comes back does not get all its
/// devices in one burst).
const MOVES_PER_SWEEP: usize = 200;

/// Moves devices to their owner: every `every`, each device session whose owner in the live
/// set is another node (this node drains, or a node joined or came back) and that has no call
/// here gets `Goodbye{draining}` once; it reconnects and is redirected. Once a sweep leaves no
/// device to move, the sessions are not scanned again until the live set changes. Also
/// samples the load figures for the heartbeats. Runs until `shutdown`.
async fn ownership_sweep(node: Arc<NodeShared>, every: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Connections already told, so a device that lingers is not told again and again.
    let mut told: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut load = LoadReporter::new();
    // The live set under which the last sweep left no device to move.
    let mut settled_under: Option<Vec<LiveNode>> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Some(hb) = &node.heartbeats {
            if let Some(figures) = load.sample(&node) {
                hb.set_load(figures);
            }
        }
        let Some(live) = node.fresh_live_set() else {
            // Logins meanwhile are served here without a redirect: look at all again later.
            settled_under = None;
            continue;
        };
        // Nothing to do while the live set is the one every device was last found settled
        // under (a login meanwhile is redirected by `redirect_for`).
        if settled_under.as_ref() == Some(&live.eligible) {
            continue;
        }
        let mut moved = 0;
        let mut unsettled = false;
        for device in node.sessions.device_ids() {
            if moved >= MOVES_PER_SWEEP {
                unsettled = true;
                break;
            }
            let Some(handle) = node.sessions.get(&device) else {
                continue;
            };
            if told.contains(&handle.connection_id) {
                continue;
            }
            let elsewhere = live
                .owner(&device)
                .is_some_and(|o| o.node.as_str() != node.node_id);
            if !elsewhere {
                continue;
            }
            // Owned elsewhere but kept here for now (a call in progress): look again later.
            let Some(to) = node.owner_elsewhere(&live, &device) else {
                unsettled = true;
                continue;
            };
            if handle
                .commands
                .try_send(SessionCommand::Shutdown { draining: true })
                .is_ok()
            {
                info!(%device, owner = %to.node_id, "device moved to its owner node");
                told.insert(handle.connection_id);
                moved += 1;
            } else {
                unsettled = true;
            }
        }
        settled_under = (!unsettled).then(|| live.eligible.clone());
        // Bounded: forget connections that are gone.
        if told.len() > node.sessions.len().saturating_mul(2).max(1024) {
            told.clear();
        }
    }
}

impl std::fmt::Debug for NodeShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeShared")
            .field("node", &self.node_id)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

/// A running node.
#[derive(Debug)]
pub struct GatewayNode {
    /// Shared state.
    pub shared: Arc<NodeShared>,
    /// Bound QUIC address.
    pub quic_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// Bound SIP address (UDP and TCP).
    pub sip_addr: SocketAddr,
    /// SHA-256 fingerprint of the QUIC certificate.
    pub fingerprint: String,
    /// Whether the certificate was generated on this run.
    pub generated_cert: bool,
    /// Path of the QUIC certificate.
    pub cert_path: PathBuf,
    ingress: RunningIngress,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    cluster: crate::cluster::runtime::ClusterRuntime,
}

impl GatewayNode {
    /// Binds every listener and starts serving.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let data_dir = config.node.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|source| StartError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        let secret = match &config.auth.resume_secret {
            Some(hex_secret) => hex::decode(hex_secret)
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes.as_slice()).ok())
                .ok_or(StartError::Config {
                    key: "auth.resume_secret",
                    message: "must be 64 hex digits (32 bytes)".into(),
                })?,
            None => {
                let path = in_data_dir(&data_dir, std::path::Path::new("resume.key"));
                ResumeTokens::load_or_create_secret(&path)
                    .map_err(|source| StartError::DataDir { path, source })?
            }
        };
        let tokens = ResumeTokens::new(secret, config.session.resume_window_secs.into());
        let registry = Arc::new(DeviceRegistry::open(config.node.device_registry_path()));
        if let Err(e) = registry.refresh() {
            warn!(error = %e, "device registry could not be read; devices cannot log in until it is fixed");
        }
        // Bound first: the heartbeats carry the QUIC address.
        let ingress = Ingress::bind(config.ingress())?;
        let quic_addr = ingress.local_addr;

        let mut metrics = Metrics::new();
        let ingress_metrics = IngressMetrics::default();
        ingress_metrics.register(metrics.registry_mut());
        let bridge_metrics = BridgeMetrics::default();
        bridge_metrics.register(metrics.registry_mut());
        let media = thalamus_media::MediaEngine::new(config.media.clone()).map_err(|e| {
            StartError::Config {
                key: "media",
                message: e.to_string(),
            }
        })?;
        thalamus_media::MediaCollector::register(media.clone(), metrics.registry_mut());
        // The cluster layer: dialog store, replicator, owner lease.
        let mut cluster = crate::cluster::runtime::ClusterRuntime::start(
            &config.cluster,
            &config.node.id,
            &data_dir,
        )
        .await?;
        cluster.register_metrics(metrics.registry_mut());
        let metrics = Arc::new(metrics);
        let sessions = Arc::new(Sessions::default());

        // The SIP side: user agent, media engine, bridge.
        let ua_config = config
            .user_agent()
            .map_err(|e| StartError::Sip(e.to_string()))?;
        let (ua, ua_events) = thalamus_sip::ua::UserAgent::start(ua_config)
            .await
            .map_err(|e| StartError::Sip(e.to_string()))?;
        let sip_addr = ua
            .local_addr(thalamus_sip::transport::PeerTransport::Udp)
            .unwrap_or(config.sip.listen);
        let media_address = config.media_address(sip_addr);
        let bridge = Bridge::start(
            ua,
            ua_events,
            BridgeDeps {
                config: config.bridge(),
                sessions: sessions.clone(),
                registry: registry.clone(),
                media: Some(media),
                media_address,
                metrics: bridge_metrics,
                store: Some(cluster.store()),
                replicator: cluster.replicator(),
            },
        );
        cluster.start_heartbeats(sip_addr, quic_addr).await?;
        let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
            .await
            .map_err(|source| StartError::Bind {
                what: "admin HTTP",
                addr: config.admin.listen,
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                what: "admin HTTP",
                addr: config.admin.listen,
                source,
            })?;
        let redirect_max_age = config
            .cluster
            .heartbeat
            .as_ref()
            .filter(|hb| hb.redirect_devices)
            .map(|hb| Duration::from_millis(hb.interval_ms.saturating_mul(7) / 2));
        let shared = Arc::new(NodeShared {
            node_id: config.node.id.clone(),
            metrics,
            registry: registry.clone(),
            sessions: sessions.clone(),
            bridge: bridge.clone(),
            heartbeats: cluster.heartbeats(),
            redirect_max_age,
            draining: AtomicBool::new(false),
        });
        let fingerprint = ingress.fingerprint.clone();
        let generated_cert = ingress.generated_cert;
        let cert_path = ingress.cert_path.clone();
        let ingress = ingress.serve(IngressDeps {
            registry,
            tokens,
            sessions,
            requests: Arc::new(bridge) as Arc<dyn DeviceRequests>,
            placement: shared.clone(),
            metrics: ingress_metrics,
        });
        let shutdown = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(admin::serve(
                admin_listener,
                shared.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(ownership_sweep(
                shared.clone(),
                Duration::from_millis(200),
                shutdown.clone(),
            )),
        ];
        info!(%quic_addr, %admin_addr, node = %shared.node_id, "gateway node started");
        Ok(Self {
            shared,
            quic_addr,
            admin_addr,
            sip_addr,
            fingerprint,
            generated_cert,
            cert_path,
            ingress,
            shutdown,
            tasks,
            cluster,
        })
    }

    /// Says goodbye to every session, then stops the listeners, writes out the replication
    /// queue and closes the dialog store.
    pub async fn shutdown(mut self) {
        self.ingress.shutdown().await;
        self.shutdown.cancel();
        for task in std::mem::take(&mut self.tasks) {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        self.cluster.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn cpu_time_is_read_from_proc() {
        // Burn a little CPU so the count cannot be zero.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        assert!(LoadReporter::cpu_ticks().is_some_and(|t| t > 0));
    }
}
