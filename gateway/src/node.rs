//! One gateway node: binds the QUIC listener and the admin endpoint, and runs the accept loop
//! that applies the connection limits before a session driver takes each connection.
//!
//! [`GatewayNode::start`] is what `thalamus run` calls; tests may call it in-process too.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use thalamus_proto::v1::Redirect;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin;
use crate::config::{in_data_dir, Config};
use crate::heartbeat::HeartbeatSender;
use crate::metrics::Metrics;
use crate::registry::{DeviceRegistry, VerifierPool};
use crate::resume::ResumeTokens;
use crate::session::driver::{run_connection, DeviceRequests};
use crate::session::throttle::{AuthThrottle, ThrottleConfig};
use crate::session::{SessionCommand, Sessions};
use crate::tls;
use thalamus_ownership::heartbeat::LiveSet;
use thalamus_ownership::Load;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
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

/// State shared by every task of the node.
pub struct NodeShared {
    /// Effective configuration.
    pub config: Config,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Device registry.
    pub registry: Arc<DeviceRegistry>,
    /// Resume token signer.
    pub tokens: ResumeTokens,
    /// Authentication throttle.
    pub throttle: AuthThrottle,
    /// Live sessions.
    pub sessions: Arc<Sessions>,
    /// Where device call/text requests go.
    pub bridge: Arc<dyn DeviceRequests>,
    /// Credential checks, off the executor.
    pub verifier: VerifierPool,
    /// The SIP bridge itself (the admin endpoint's dialog operations), when the node has one.
    pub sip_bridge: Option<crate::bridge::Bridge>,
    /// Heartbeats to the balancers, and the live set they answer with (when configured).
    pub heartbeats: Option<Arc<HeartbeatSender>>,
    /// Draining: no new devices or calls; devices leave as their calls end.
    pub draining: AtomicBool,
}

impl NodeShared {
    /// The live set the balancers last reported, when redirects are on and a report arrived
    /// within the balancers' miss window (a report answers every heartbeat; none for 3.5
    /// intervals means no balancer hears this node).
    fn fresh_live_set(&self) -> Option<LiveSet> {
        let hb_config = self.config.cluster.heartbeat.as_ref()?;
        if !hb_config.redirect_devices {
            return None;
        }
        let max_age = Duration::from_millis(hb_config.interval_ms.saturating_mul(7) / 2);
        self.heartbeats.as_ref()?.live_set(max_age)
    }

    /// `device_id`'s owner in `live` when that is another node with a device address and the
    /// device has no call here.
    fn owner_elsewhere(&self, live: &LiveSet, device_id: &str) -> Option<Redirect> {
        let owner = live.owner(device_id)?;
        if owner.node.as_str() == self.config.node.id {
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

    /// Where `device_id` should log in instead of here: its owner in the live set the
    /// balancers last reported, when that is another node. `None` (serve here) when redirects
    /// are off, when no fresh report arrived, when no node is eligible, and when the device
    /// has calls on this node.
    pub fn redirect_for(&self, device_id: &str) -> Option<Redirect> {
        let live = self.fresh_live_set()?;
        self.owner_elsewhere(&live, device_id)
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
            calls: node.sip_bridge.as_ref().map_or(0, |b| b.active_calls()) as u64,
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
    let mut settled_under: Option<Vec<thalamus_ownership::heartbeat::LiveNode>> = None;
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
                .is_some_and(|o| o.node.as_str() != node.config.node.id);
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
            .field("node", &self.config.node.id)
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
    endpoint: quinn::Endpoint,
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
        let material = tls::load_or_generate(
            config.quic.cert.as_deref(),
            config.quic.key.as_deref(),
            &data_dir,
        )?;
        let crypto = tls::server_crypto(&material)?;

        let secret = match &config.auth.resume_secret {
            Some(hex_secret) => {
                let bytes = hex::decode(hex_secret).map_err(|e| StartError::Config {
                    key: "auth.resume_secret",
                    message: e.to_string(),
                })?;
                <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| StartError::Config {
                    key: "auth.resume_secret",
                    message: "must be 32 bytes".into(),
                })?
            }
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

        let mut transport = quinn::TransportConfig::default();
        let idle = Duration::from_millis(u64::from(config.quic.idle_timeout_ms) + 5_000);
        transport
            .max_idle_timeout(Some(idle.try_into().map_err(|_| StartError::Config {
                key: "quic.idle_timeout_ms",
                message: "too large".into(),
            })?))
            .keep_alive_interval(Some(Duration::from_millis(
                config.quic.keepalive_interval_ms.into(),
            )))
            .max_concurrent_bidi_streams(1u32.into())
            .max_concurrent_uni_streams(0u32.into())
            .datagram_receive_buffer_size(Some(64 * 1024))
            .datagram_send_buffer_size(64 * 1024)
            .stream_receive_window((config.session.max_frame_bytes * 2).into())
            .receive_window((config.session.max_frame_bytes * 4).into())
            .send_window(256 * 1024);
        let mut server_config = quinn::ServerConfig::with_crypto(crypto);
        server_config.transport_config(Arc::new(transport));
        let bind_error = |source| StartError::Bind {
            what: "QUIC",
            addr: config.quic.listen,
            source,
        };
        let socket =
            quic_socket(config.quic.listen, config.quic.socket_buffer_bytes).map_err(bind_error)?;
        let runtime = quinn::default_runtime().ok_or_else(|| {
            bind_error(std::io::Error::other(
                "no async runtime for the QUIC endpoint",
            ))
        })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            runtime,
        )
        .map_err(bind_error)?;
        let quic_addr = endpoint.local_addr().map_err(|source| StartError::Bind {
            what: "QUIC",
            addr: config.quic.listen,
            source,
        })?;

        let mut metrics = Metrics::new();
        let bridge_metrics = crate::bridge::BridgeMetrics::default();
        bridge_metrics.register(metrics.registry_mut());
        let media = match thalamus_media::MediaEngine::new(config.media.clone()) {
            Ok(engine) => Some(engine),
            Err(e) => {
                return Err(StartError::Config {
                    key: "media",
                    message: e.to_string(),
                })
            }
        };
        if let Some(engine) = &media {
            thalamus_media::MediaCollector::register(engine.clone(), metrics.registry_mut());
        }
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
        let (advertised_host, advertised_port) =
            match &config.sip.advertised {
                Some(text) => {
                    let (host, port) = thalamus_sip::message::Host::parse_with_port(text)
                        .ok_or_else(|| StartError::Config {
                            key: "sip.advertised",
                            message: format!("{text:?} is not host or host:port"),
                        })?;
                    (Some(host), port)
                }
                None => (None, None),
            };
        let timers = thalamus_sip::transaction::TimerConfig {
            t1: Duration::from_millis(config.sip.t1_ms.into()),
            t2: Duration::from_millis(config.sip.t2_ms.into()),
            t4: Duration::from_millis(config.sip.t4_ms.into()),
        };
        let mut endpoint_config = thalamus_sip::endpoint::EndpointConfig::default();
        endpoint_config.transactions.timers = timers;
        endpoint_config.dialogs.timers = thalamus_sip::dialog::RetransmitTimers {
            t1: timers.t1,
            t2: timers.t2,
        };
        let outbound_proxy = match &config.sip.outbound_proxy {
            Some(text) => Some(thalamus_sip::message::SipUri::parse(text).map_err(|e| {
                StartError::Config {
                    key: "sip.outbound_proxy",
                    message: e.to_string(),
                }
            })?),
            None => None,
        };
        let (ua, ua_events) = thalamus_sip::ua::UserAgent::start(thalamus_sip::ua::UaConfig {
            transport: thalamus_sip::transport::TransportConfig {
                udp: Some(config.sip.listen),
                tcp: Some(config.sip.listen),
                ..Default::default()
            },
            endpoint: endpoint_config,
            advertised_host,
            advertised_port,
            outbound_proxy,
            ..Default::default()
        })
        .await
        .map_err(|e| StartError::Sip(e.to_string()))?;
        let sip_addr = ua
            .local_addr(thalamus_sip::transport::PeerTransport::Udp)
            .unwrap_or(config.sip.listen);
        let media_address = config
            .media
            .sdp_address()
            .or_else(|| {
                config
                    .sip
                    .advertised
                    .as_deref()
                    .and_then(thalamus_sip::message::Host::parse_with_port)
                    .and_then(|(h, _)| h.ip())
            })
            .unwrap_or_else(|| {
                if sip_addr.ip().is_unspecified() {
                    std::net::IpAddr::from([127, 0, 0, 1])
                } else {
                    sip_addr.ip()
                }
            });
        let bridge = crate::bridge::Bridge::start(
            ua,
            ua_events,
            crate::bridge::BridgeDeps {
                config: config.clone(),
                sessions: sessions.clone(),
                registry: registry.clone(),
                media,
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

        let throttle = AuthThrottle::new(ThrottleConfig {
            free_failures: config.auth.free_failures,
            window: Duration::from_secs(config.auth.failure_window_secs.into()),
            base_delay: Duration::from_millis(config.auth.failure_delay_ms.into()),
            max_delay: Duration::from_millis(config.auth.max_failure_delay_ms.into()),
            max_tracked: 65_536,
        });
        let shared = Arc::new(NodeShared {
            config,
            metrics,
            registry,
            tokens,
            throttle,
            sessions,
            bridge: Arc::new(bridge.clone()),
            sip_bridge: Some(bridge),
            heartbeats: cluster.heartbeats(),
            draining: AtomicBool::new(false),
            verifier: VerifierPool::start(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
                4096,
            ),
        });
        let shutdown = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(accept_loop(
                shared.clone(),
                endpoint.clone(),
                shutdown.clone(),
            )),
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
        info!(%quic_addr, %admin_addr, node = %shared.config.node.id, "gateway node started");
        Ok(Self {
            shared,
            quic_addr,
            admin_addr,
            sip_addr,
            fingerprint: material.fingerprint(),
            generated_cert: material.generated,
            cert_path: material.cert_path,
            endpoint,
            shutdown,
            tasks,
            cluster,
        })
    }

    /// Says goodbye to every session, then stops the listeners, writes out the replication
    /// queue and closes the dialog store.
    pub async fn shutdown(mut self) {
        self.shared
            .sessions
            .broadcast(|| SessionCommand::Shutdown { draining: false });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.shared.sessions.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.shutdown.cancel();
        self.endpoint
            .close(thalamus_proto::close_code::SHUTDOWN.into(), b"shutdown");
        for task in std::mem::take(&mut self.tasks) {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        self.endpoint.wait_idle().await;
        self.cluster.shutdown().await;
    }
}

/// Binds the QUIC UDP socket with `buffer_bytes` of receive and send buffer (0: the system
/// default). The kernel may grant less (its `rmem_max`/`wmem_max`); the granted size is logged.
fn quic_socket(listen: SocketAddr, buffer_bytes: u32) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if listen.is_ipv6() {
        // Same as quinn's own bind: accept IPv4-mapped addresses too where allowed.
        let _ = socket.set_only_v6(false);
    }
    if buffer_bytes > 0 {
        let want = usize::try_from(buffer_bytes).unwrap_or(usize::MAX);
        if let Err(e) = socket.set_recv_buffer_size(want) {
            warn!(error = %e, "cannot set the QUIC socket's receive buffer");
        }
        if let Err(e) = socket.set_send_buffer_size(want) {
            warn!(error = %e, "cannot set the QUIC socket's send buffer");
        }
        let granted = socket.recv_buffer_size().unwrap_or(0);
        if granted < want {
            warn!(
                wanted = want,
                granted,
                "the QUIC socket's receive buffer is smaller than quic.socket_buffer_bytes \
                 (raise net.core.rmem_max)"
            );
        } else {
            info!(bytes = granted, "QUIC socket receive buffer");
        }
    }
    socket.bind(&listen.into())?;
    Ok(socket.into())
}

/// Counts connections in total and per source address; releases on drop.
struct ConnectionSlot {
    shared: Arc<ConnectionCounts>,
    ip: IpAddr,
}

#[derive(Default)]
struct ConnectionCounts {
    total: AtomicUsize,
    per_ip: DashMap<IpAddr, usize>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.shared.total.fetch_sub(1, Ordering::Relaxed);
        if let dashmap::mapref::entry::Entry::Occupied(mut e) = self.shared.per_ip.entry(self.ip) {
            *e.get_mut() = e.get().saturating_sub(1);
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

impl ConnectionCounts {
    fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: usize,
    ) -> Result<ConnectionSlot, &'static str> {
        if self.total.fetch_add(1, Ordering::Relaxed) >= max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err("total_limit");
        }
        let mut count = self.per_ip.entry(ip).or_insert(0);
        if *count >= max_per_ip {
            drop(count);
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err("per_ip_limit");
        }
        *count += 1;
        Ok(ConnectionSlot {
            shared: self.clone(),
            ip,
        })
    }
}

async fn accept_loop(
    shared: Arc<NodeShared>,
    endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
) {
    let counts = Arc::new(ConnectionCounts::default());
    let max_total = shared.config.quic.max_connections as usize;
    let max_per_ip = shared.config.quic.max_connections_per_ip as usize;
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let ip = incoming.remote_address().ip();
        let slot = match counts.try_acquire(ip, max_total, max_per_ip) {
            Ok(slot) => slot,
            Err(reason) => {
                Metrics::inc(&shared.metrics.connections_refused, reason);
                Metrics::inc(&shared.metrics.limits_hit, reason);
                incoming.refuse();
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!(error = %e, "QUIC handshake failed");
                    Metrics::inc(&shared.metrics.connections_refused, "handshake_failed");
                    return;
                }
            };
            shared.metrics.connections_accepted.inc();
            shared.metrics.connections_open.inc();
            run_connection(shared.clone(), conn).await;
            shared.metrics.connections_open.dec();
        });
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

    #[test]
    fn the_quic_socket_gets_the_configured_buffer_as_far_as_the_kernel_allows() {
        let want = 1024 * 1024;
        let socket = quic_socket("127.0.0.1:0".parse().unwrap(), want as u32).unwrap();
        let granted = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|t| t.trim().parse::<usize>().ok())
            .unwrap_or(want);
        assert!(
            granted >= want.min(cap),
            "granted {granted}, wanted {want}, kernel cap {cap}"
        );
        assert!(socket.local_addr().unwrap().port() != 0);
        // 0 keeps the system default and still binds.
        quic_socket("127.0.0.1:0".parse().unwrap(), 0).unwrap();
    }

    #[test]
    fn connection_limits_total_and_per_ip() {
        let counts = Arc::new(ConnectionCounts::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = counts.try_acquire(a, 3, 2).unwrap();
        let _s2 = counts.try_acquire(a, 3, 2).unwrap();
        assert_eq!(counts.try_acquire(a, 3, 2).err(), Some("per_ip_limit"));
        let _s3 = counts.try_acquire(b, 3, 2).unwrap();
        assert_eq!(counts.try_acquire(b, 3, 2).err(), Some("total_limit"));
        drop(s1);
        assert!(counts.try_acquire(a, 3, 2).is_ok());
    }
}
