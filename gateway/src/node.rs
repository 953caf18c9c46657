//! One gateway node: wires the crates together. It binds device ingress (QUIC), starts the
//! SIP user agent, the media engine, the cluster layer (dialog store, replication, lease,
//! heartbeats) and the bridge, serves the admin endpoint, and starts the node's own duty (the
//! ownership sweep, `crate::sweep`). What its tasks share, and where devices belong, is in
//! [`crate::shared`].
//!
//! [`GatewayNode::start`] is what `thalamus run` calls; tests may call it in-process too. The
//! protocol rules are in the crates it wires; this module holds none of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use thalamus_bridge::{Bridge, BridgeDeps, BridgeMetrics};
use thalamus_ingress::{
    DeviceRegistry, DeviceRequests, Ingress, IngressDeps, IngressMetrics, ResumeTokens,
    RunningIngress, Sessions,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin;
use crate::config::{in_data_dir, Config};
use crate::metrics::Metrics;
use crate::shared::NodeShared;

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
    /// Whether the admin token was generated on this run (the banner prints it once).
    pub admin_token_generated: bool,
    /// Bound address of the device page (`[web] listen`), when it is served.
    pub web_addr: Option<SocketAddr>,
    ingress: RunningIngress,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    cluster: crate::cluster::runtime::ClusterRuntime,
    /// Call records (none when `cdr.enabled` is off).
    cdr: Option<thalamus_cdr::CdrWriter>,
    /// The configuration running now (the start's, with what reloads applied).
    running: std::sync::Mutex<Config>,
    /// The fingerprint of the certificate served to new connections now.
    current_fingerprint: std::sync::Mutex<String>,
}

/// What a reload did ([`GatewayNode::reload`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Changed keys applied now.
    pub applied: Vec<String>,
    /// Changed keys that need a restart (not applied).
    pub needs_restart: Vec<String>,
    /// Devices in the registry before and after it was read again.
    pub devices: (usize, usize),
    /// The certificate's fingerprint, when it changed.
    pub new_fingerprint: Option<String>,
}

impl GatewayNode {
    /// With WebTransport on: the SHA-256 (hex) of the certificate browsers are served now.
    pub fn webtransport_certificate_hash(&self) -> Option<String> {
        self.ingress.webtransport_certificate_hash()
    }

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
        // The device page is bound before ingress: its bound address is the origin its
        // WebTransport sessions come from.
        let web_listener = match config.web.listen {
            Some(listen) => {
                let bind = |source| StartError::Bind {
                    what: "device page HTTP",
                    addr: listen,
                    source,
                };
                let listener = tokio::net::TcpListener::bind(listen).await.map_err(bind)?;
                let addr = listener.local_addr().map_err(bind)?;
                Some((listener, addr))
            }
            None => None,
        };
        // Bound first: the heartbeats carry the QUIC address.
        let ingress =
            Ingress::bind(config.ingress_with_page(web_listener.as_ref().map(|(_, page)| *page)))?;
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
        let mut metrics_registry = metrics;
        let cdr = if config.cdr.enabled {
            let cdr_metrics = thalamus_cdr::CdrMetrics::default();
            cdr_metrics.register(metrics_registry.registry_mut());
            Some(
                thalamus_cdr::CdrWriter::start(&config.cdr, &data_dir, cdr_metrics)
                    .await
                    .map_err(|e| StartError::Config {
                        key: "cdr",
                        message: e.to_string(),
                    })?,
            )
        } else {
            None
        };
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
        crate::sip_metrics::SipCollector::register(
            ua.counters(),
            ua.transport().clone(),
            metrics_registry.registry_mut(),
        );
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
                fence: cluster.fence(),
                inbound: config
                    .inbound_policy()
                    .map_err(|e| StartError::Sip(e.to_string()))?,
                records: cdr
                    .clone()
                    .map(|w| Arc::new(w) as Arc<dyn thalamus_cdr::CallRecords>),
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
        let (admin_token, admin_token_generated) = match &config.admin.token {
            Some(token) => (token.clone(), false),
            None => {
                let path = in_data_dir(&data_dir, std::path::Path::new("admin.token"));
                load_or_create_token(&path)
                    .map_err(|source| StartError::DataDir { path, source })?
            }
        };
        let admin_refused = prometheus_client::metrics::family::Family::default();
        metrics_registry.registry_mut().register(
            "admin_refused",
            "Admin requests refused, by reason (no_token, bad_token, cross_site)",
            admin_refused.clone(),
        );
        let recoveries = prometheus_client::metrics::counter::Counter::default();
        metrics_registry.registry_mut().register(
            "live_set_recoveries",
            "Times this node found it had been out of the balancers' live set (frozen or cut off) and checked its device sessions and dialogs before taking calls again",
            recoveries.clone(),
        );
        let metrics = Arc::new(metrics_registry);
        let shared = Arc::new(NodeShared {
            node_id: config.node.id.clone(),
            metrics,
            registry: registry.clone(),
            sessions: sessions.clone(),
            bridge: bridge.clone(),
            heartbeats: cluster.heartbeats(),
            admin_token,
            admin_refused,
            redirect_max_age,
            draining: AtomicBool::new(false),
            stepped_aside: AtomicBool::new(false),
            store_up: cluster.store_up(),
            recoveries,
            balancer_table: crate::cluster_table::BalancerTable::new(
                config.admin.balancers.clone(),
            ),
        });
        let fingerprint = ingress.fingerprint.clone();
        let webtransport_certs = ingress.webtransport_certs.clone();
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
        let mut tasks = vec![
            tokio::spawn(rereplicate_when_the_store_is_back(
                cluster.store_up(),
                cluster.store_changes(),
                shared.bridge.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(admin::serve(
                admin_listener,
                shared.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(crate::sweep::ownership_sweep(
                shared.clone(),
                Duration::from_millis(200),
                shutdown.clone(),
            )),
        ];
        if let Some(hb) = shared.heartbeats.clone() {
            tasks.push(tokio::spawn(recover_when_out_of_the_live_set(
                hb.clone(),
                shared.clone(),
                shutdown.clone(),
            )));
            tasks.push(tokio::spawn(step_aside_when_cut_off_from_the_store(
                hb,
                shared.clone(),
                Duration::from_millis(config.cluster.step_aside_after_ms),
                shutdown.clone(),
            )));
        }
        let web_addr = match web_listener {
            Some((listener, addr)) => {
                let page = crate::web::WebPage {
                    quic_port: quic_addr.port(),
                    certificate_hash: Arc::new(move || {
                        webtransport_certs.as_ref().map(|c| c.hash())
                    }),
                };
                tasks.push(tokio::spawn(crate::web::serve(
                    listener,
                    page,
                    shutdown.clone(),
                )));
                Some(addr)
            }
            None => None,
        };
        info!(%quic_addr, %admin_addr, node = %shared.node_id, "gateway node started");
        let running = std::sync::Mutex::new(config);
        let fingerprint_now = fingerprint.clone();
        Ok(Self {
            shared,
            quic_addr,
            admin_addr,
            sip_addr,
            fingerprint,
            generated_cert,
            cert_path,
            admin_token_generated,
            web_addr,
            ingress,
            shutdown,
            tasks,
            cluster,
            cdr,
            running,
            current_fingerprint: std::sync::Mutex::new(fingerprint_now),
        })
    }

    /// Drains the node: new calls go elsewhere (the heartbeats say the node is draining, so
    /// the balancers route no new calls here and devices without a call move to their new
    /// owners; a device's `Dial` gets `Busy`; a node without balancers also answers new
    /// INVITEs 503 with Retry-After), and calls in progress go on. Resolves when no call is left, when
    /// `deadline` has passed, or when `stop` resolves (a second SIGTERM), whichever is first;
    /// returns the calls left.
    pub async fn drain(
        &self,
        deadline: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) -> usize {
        self.shared.set_draining(true);
        if self.shared.heartbeats.is_none() {
            self.shared.bridge.refuse_invites(true);
        }
        let calls = self.shared.bridge.active_calls();
        info!(
            calls,
            deadline_secs = deadline.as_secs(),
            "draining: waiting for calls to end"
        );
        let until = tokio::time::Instant::now() + deadline;
        let mut stop = std::pin::pin!(stop);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            let left = self.shared.bridge.active_calls();
            if left == 0 {
                info!("drained: no call left");
                self.wait_for_devices_to_move(until).await;
                return 0;
            }
            tokio::select! {
                _ = tick.tick() => {}
                () = tokio::time::sleep_until(until) => {
                    let left = self.shared.bridge.active_calls();
                    warn!(calls = left, "drain deadline reached with calls in progress");
                    return left;
                }
                () = &mut stop => {
                    let left = self.shared.bridge.active_calls();
                    warn!(calls = left, "stopping at once (second signal) with calls in progress");
                    return left;
                }
            }
        }
    }

    /// In a cluster (a live set fresh from the balancers), waits up to 5 s (and not past
    /// `until`) for the ownership sweep to have moved every device to its new node, so none
    /// learns of the node's exit by losing its connection.
    async fn wait_for_devices_to_move(&self, until: tokio::time::Instant) {
        if self.shared.fresh_live_set().is_none() {
            return;
        }
        let until = until.min(tokio::time::Instant::now() + Duration::from_secs(5));
        while !self.shared.sessions.is_empty() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        info!(
            devices_left = self.shared.sessions.len(),
            "devices moved to their new nodes"
        );
    }

    /// Applies a configuration read again (SIGHUP): reads the device registry again, and
    /// applies what [`crate::reload::plan`] says can change while running (the log level
    /// through `log`, who may reach devices and the per-source SIP limits, per-device
    /// settings, the certificate files for new connections). Calls in progress are untouched.
    /// Keys that need a restart are reported, not applied. A configuration that fails its
    /// checks changes nothing.
    pub async fn reload(
        &self,
        new: Config,
        log: Option<&thalamus_telemetry::LogReload>,
    ) -> Result<ReloadReport, crate::config::ConfigError> {
        new.check()?;
        let running = match self.running.lock() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let plan = crate::reload::plan(&running, &new);
        let mut applied = running.clone();
        let bad = |key: &str, message: String| crate::config::ConfigError::Key {
            key: key.into(),
            message,
        };
        let before = self.shared.registry.len();
        if let Err(e) = self.shared.registry.refresh() {
            warn!(error = %e, "device registry could not be read again; the devices known before stay");
        }
        let devices = (before, self.shared.registry.len());
        if plan.applies("log.level") {
            if let Some(log) = log {
                log.set_level(&new.log.level)
                    .map_err(|e| bad("log.level", e))?;
            }
            applied.log.level = new.log.level.clone();
        }
        if plan.applies("sip.inbound") {
            self.shared
                .bridge
                .reload_inbound(&new.sip.inbound, &new.sip.domain)
                .map_err(|e| bad("sip.inbound", e.to_string()))?;
            applied.sip.inbound = new.sip.inbound.clone();
        }
        if plan.applies("sip.inbound") || plan.applies("sip.limits") {
            applied.sip.limits.max_transactions = new.sip.limits.max_transactions;
            applied.sip.limits.source_rate = new.sip.limits.source_rate;
            applied.sip.limits.source_burst = new.sip.limits.source_burst;
            applied.sip.limits.source_max_live = new.sip.limits.source_max_live;
            applied.sip.limits.max_sources = new.sip.limits.max_sources;
            self.shared
                .bridge
                .user_agent()
                .set_limits(
                    applied.sip.limits.max_transactions,
                    applied.sip_source_limits(),
                    applied.sip.inbound.trusted.clone(),
                )
                .await
                .map_err(|e| bad("sip.limits", e.to_string()))?;
        }
        if plan.applies("devices") {
            self.shared.bridge.set_device_settings(new.devices.clone());
            applied.devices = new.devices.clone();
        }
        // The certificate files are read again at every reload (a renewed certificate keeps
        // its paths).
        let fingerprint = self
            .ingress
            .reload_certificate(new.quic.cert.as_deref(), new.quic.key.as_deref())
            .map_err(|e| bad("quic.cert", e.to_string()))?;
        applied.quic.cert = new.quic.cert.clone();
        applied.quic.key = new.quic.key.clone();
        let new_fingerprint = match self.current_fingerprint.lock() {
            Ok(mut current) if *current != fingerprint => {
                current.clone_from(&fingerprint);
                Some(fingerprint)
            }
            Ok(_) => None,
            Err(_) => Some(fingerprint),
        };
        match self.running.lock() {
            Ok(mut r) => *r = applied,
            Err(poisoned) => *poisoned.into_inner() = applied,
        }
        Ok(ReloadReport {
            applied: plan.apply,
            needs_restart: plan.restart,
            devices,
            new_fingerprint,
        })
    }

    /// The bearer token admin requests that change anything must present.
    pub fn admin_token(&self) -> &str {
        &self.shared.admin_token
    }

    /// Says goodbye to every session, then stops the listeners, writes out the replication
    /// queue and closes the dialog store.
    pub async fn shutdown(self) {
        let draining = self.shared.is_draining();
        self.shutdown_with(draining).await;
    }

    async fn shutdown_with(mut self, draining: bool) {
        self.ingress.shutdown_with(draining).await;
        self.shutdown.cancel();
        for task in std::mem::take(&mut self.tasks) {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        self.cluster.shutdown().await;
        if let Some(cdr) = &self.cdr {
            // Records of calls that ended are on disk before the process exits.
            let _ = tokio::time::timeout(Duration::from_secs(5), cdr.flush()).await;
        }
    }
}

/// Reads the admin token from `path`, creating a random one (32 bytes as hex, mode 0600) on
/// first use; says whether it was created now.
fn load_or_create_token(path: &std::path::Path) -> std::io::Result<(String, bool)> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let token = text.trim().to_string();
        if token.len() >= 16 {
            return Ok((token, false));
        }
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} holds no usable admin token", path.display()),
        ));
    }
    let token = hex::encode(thalamus_sip::rng::with(|rng| {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        bytes
    }));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::io::Write::write_all(&mut options.open(path)?, token.as_bytes())?;
    Ok((token, true))
}

/// How long a device has to answer the probe a node sends after it was out of the live set.
const RECOVERY_PROBE: Duration = Duration::from_secs(1);

/// When the node learns it was out of the balancers' live set (a report that does not list it,
/// or a heartbeat loop that woke up late: the process was frozen), survivors may have taken
/// some of its devices and dialogs meanwhile. The node announces draining (no new calls) and
/// waits until a balancer lists it again (at most [`RECOVERY_LISTED_WAIT`]): from then on no
/// survivor claims its dialogs. Then it probes every device session (a device that moved
/// elsewhere does not answer, and its session closes) and reads the record of every dialog it
/// holds (one another node took over or ended is dropped here without a BYE), and releases the
/// dialogs of the devices that are gone (the node they reached, or the peer's next request
/// reaches, claims them at once); then it takes calls again. The signs of the same absence that
/// arrive meanwhile are part of this recovery.
async fn recover_when_out_of_the_live_set(
    hb: Arc<crate::heartbeat::HeartbeatSender>,
    node: Arc<NodeShared>,
    shutdown: CancellationToken,
) {
    let mut outs = hb.out_of_live_set();
    let me = thalamus_ownership::NodeId::new(&node.node_id).ok();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = outs.changed() => if changed.is_err() { return; },
        }
        hb.set_recovering(true);
        let started = tokio::time::Instant::now();
        let listed_by = started + RECOVERY_LISTED_WAIT;
        loop {
            let listed = hb.live_set(RECOVERY_LISTED_WAIT).is_some_and(|l| {
                l.received > started.into_std() && me.as_ref().is_none_or(|me| !l.says_down(me))
            });
            if listed || tokio::time::Instant::now() >= listed_by {
                break;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        outs.borrow_and_update();
        let checking = tokio::time::Instant::now();
        let mut probed = 0usize;
        for device in node.sessions.device_ids() {
            if let Some(handle) = node.sessions.get(&device) {
                if handle
                    .commands
                    .try_send(thalamus_ingress::SessionCommand::Probe(RECOVERY_PROBE))
                    .is_ok()
                {
                    probed += 1;
                }
            }
        }
        let (checked, dropped) = node.bridge.verify_ownership().await;
        // The probes' answers (or their time running out) before new calls come.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(checking + RECOVERY_PROBE + Duration::from_millis(100)) => {}
        }
        // The devices that did not answer the probe moved elsewhere: their dialogs go with
        // them (claimed at once by the node they reached, or the peer's next request reaches).
        let released = node.bridge.release_orphans().await;
        node.count_recovery();
        hb.set_recovering(false);
        warn!(
            probed,
            checked,
            dropped,
            released,
            took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "this node was out of the live set: device sessions probed, dialogs taken over elsewhere dropped; taking calls again"
        );
    }
}

/// Longest wait, in a recovery, for a balancer to list the node again.
const RECOVERY_LISTED_WAIT: Duration = Duration::from_secs(5);

/// How often the node looks at its store's health and the balancers' reports to decide
/// whether to step aside.
const STEP_ASIDE_CHECK: Duration = Duration::from_millis(250);

/// The oldest balancer report a node steps aside by when device redirects (which set the age
/// otherwise) are off.
const STEP_ASIDE_REPORT_AGE: Duration = Duration::from_secs(5);

/// Tells the balancers, in every heartbeat, how long the dialog store has not answered this
/// node; and steps the node aside (drains it: `NodeShared::set_stepped_aside`) once that lasts
/// `after` while a balancer's fresh report names another live node that reaches the store: this
/// node alone lost it, so the calls and devices it would take could not be replicated, and its
/// in-dialog requests are fenced. Steps back when the store answers. With `after` zero it only
/// reports. When every node lost the store, none steps aside: calls go on unreplicated.
async fn step_aside_when_cut_off_from_the_store(
    hb: Arc<crate::heartbeat::HeartbeatSender>,
    shared: Arc<NodeShared>,
    after: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(STEP_ASIDE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let me = thalamus_ownership::NodeId::new(&shared.node_id).ok();
    let mut down_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = tokio::time::Instant::now();
        let up = *shared.store_up.borrow();
        let down_for = if up {
            down_since = None;
            Duration::ZERO
        } else {
            now.saturating_duration_since(*down_since.get_or_insert(now))
        };
        hb.set_store_down(down_for);
        if up {
            shared.set_stepped_aside(false);
            continue;
        }
        if after.is_zero() || down_for < after || shared.is_stepped_aside() {
            continue;
        }
        // A report from within the balancers' miss window (redirects may be off).
        let max_age = shared.redirect_max_age.unwrap_or(STEP_ASIDE_REPORT_AGE);
        let others_reach_it = me.as_ref().is_some_and(|me| {
            hb.live_set(max_age)
                .is_some_and(|live| live.store_reached_by_another(me))
        });
        if others_reach_it {
            shared.set_stepped_aside(true);
        }
    }
}

/// When the dialog store answers again after an outage, every confirmed call this node holds
/// writes its record again (the writes of the outage failed); so it does when the store is a new
/// instance (a failover to a replica that may lack the last writes, or a restart).
async fn rereplicate_when_the_store_is_back(
    mut store_up: tokio::sync::watch::Receiver<bool>,
    mut store_changes: tokio::sync::watch::Receiver<u64>,
    bridge: thalamus_bridge::Bridge,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = store_up.changed() => {
                if changed.is_err() {
                    return;
                }
                if *store_up.borrow_and_update() {
                    let calls = bridge.replicate_all();
                    info!(calls, "dialog store back: records of the calls held here written again");
                }
            }
            changed = store_changes.changed() => {
                if changed.is_err() {
                    return;
                }
                store_changes.borrow_and_update();
                let calls = bridge.replicate_all();
                info!(calls, "dialog store is a new instance: records of the calls held here written again");
            }
        }
    }
}
