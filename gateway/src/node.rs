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
        let mut metrics_registry = metrics;
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
                inbound: config
                    .inbound_policy()
                    .map_err(|e| StartError::Sip(e.to_string()))?,
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
            tokio::spawn(crate::sweep::ownership_sweep(
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
            admin_token_generated,
            ingress,
            shutdown,
            tasks,
            cluster,
        })
    }

    /// The bearer token admin requests that change anything must present.
    pub fn admin_token(&self) -> &str {
        &self.shared.admin_token
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
