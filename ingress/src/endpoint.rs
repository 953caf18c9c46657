//! The QUIC endpoint: TLS material and the transport settings ([`Ingress::bind`]), the
//! accept loop with the connection limits in total and per source address, the transport of
//! each connection by its ALPN (MBFP on QUIC, or a WebTransport session at `/mbfp` set up
//! within the hello timeout), and a session driver per connection ([`BoundIngress::serve`]);
//! [`RunningIngress::shutdown`] says goodbye to every session and closes the endpoint.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::IngressConfig;
use crate::metrics::{self, IngressMetrics};
use crate::registry::{DeviceRegistry, VerifierPool};
use crate::requests::{DevicePlacement, DeviceRequests};
use crate::resume::ResumeTokens;
use crate::session::driver::run_connection;
use crate::session::link::Transport;
use crate::session::throttle::AuthThrottle;
use crate::session::{SessionCommand, Sessions};
use crate::shared::Shared;
use crate::tls;

/// Why ingress could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The QUIC socket could not be bound.
    #[error("cannot bind QUIC on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A value that cannot be used.
    #[error("config key `{key}`: {message}")]
    Config {
        /// Key.
        key: &'static str,
        /// Message.
        message: String,
    },
}

/// What a served ingress works with besides its configuration.
pub struct IngressDeps {
    /// Registered devices.
    pub registry: Arc<DeviceRegistry>,
    /// Resume token signer (the secret shared by the cluster).
    pub tokens: ResumeTokens,
    /// Live sessions by device (shared with whoever sends frames to devices).
    pub sessions: Arc<Sessions>,
    /// Where device requests go.
    pub requests: Arc<dyn DeviceRequests>,
    /// Where devices belong.
    pub placement: Arc<dyn DevicePlacement>,
    /// Counters (registered by the caller).
    pub metrics: IngressMetrics,
}

impl std::fmt::Debug for IngressDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressDeps").finish_non_exhaustive()
    }
}

/// The QUIC endpoint, bound but not yet accepting.
pub struct BoundIngress {
    config: IngressConfig,
    endpoint: quinn::Endpoint,
    /// The bound QUIC address.
    pub local_addr: SocketAddr,
    /// SHA-256 fingerprint of the certificate devices pin.
    pub fingerprint: String,
    /// Whether the certificate was generated on this run.
    pub generated_cert: bool,
    /// Path of the certificate.
    pub cert_path: PathBuf,
    /// The short-lived certificate of WebTransport connections (with `webtransport` on).
    pub webtransport_certs: Option<Arc<tls::WebTransportCerts>>,
}

impl std::fmt::Debug for BoundIngress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundIngress")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

/// Entry point.
#[derive(Debug)]
pub struct Ingress;

impl Ingress {
    /// Loads (or generates) the TLS material and binds the QUIC endpoint. Must run inside a
    /// tokio runtime.
    pub fn bind(config: IngressConfig) -> Result<BoundIngress, IngressError> {
        let material = tls::load_or_generate(
            config.cert.as_deref(),
            config.key.as_deref(),
            &config.data_dir,
        )?;
        let webtransport_certs = if config.webtransport {
            Some(tls::WebTransportCerts::new()?)
        } else {
            None
        };
        let server_config = server_config(&config, &material, webtransport_certs.as_ref())?;
        let bind_error = |source| IngressError::Bind {
            addr: config.listen,
            source,
        };
        let socket = quic_socket(config.listen, config.socket_buffer_bytes).map_err(bind_error)?;
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
        let local_addr = endpoint.local_addr().map_err(bind_error)?;
        Ok(BoundIngress {
            config,
            endpoint,
            local_addr,
            fingerprint: material.fingerprint(),
            generated_cert: material.generated,
            cert_path: material.cert_path,
            webtransport_certs,
        })
    }
}

/// The QUIC server configuration: TLS from `material`, transport limits from `config`.
fn server_config(
    config: &IngressConfig,
    material: &tls::TlsMaterial,
    webtransport: Option<&Arc<tls::WebTransportCerts>>,
) -> Result<quinn::ServerConfig, IngressError> {
    {
        let crypto = tls::server_crypto(material, webtransport)?;
        let mut transport = quinn::TransportConfig::default();
        let idle = config.idle_timeout + Duration::from_secs(5);
        transport
            .max_idle_timeout(Some(idle.try_into().map_err(|_| IngressError::Config {
                key: "quic.idle_timeout_ms",
                message: "too large".into(),
            })?))
            .keep_alive_interval(Some(config.keepalive_interval))
            // One control stream; WebTransport adds its CONNECT stream and HTTP/3's three
            // unidirectional ones (control, QPACK encoder and decoder). A raw QUIC device gets
            // the tighter limits back once its ALPN is known.
            .max_concurrent_bidi_streams(if config.webtransport { 2u32 } else { 1 }.into())
            .max_concurrent_uni_streams(if config.webtransport { 3u32 } else { 0 }.into())
            .datagram_receive_buffer_size(Some(64 * 1024))
            .datagram_send_buffer_size(64 * 1024)
            .stream_receive_window((config.max_frame_bytes * 2).into())
            .receive_window((config.max_frame_bytes * 4).into())
            .send_window(256 * 1024);
        let mut server_config = quinn::ServerConfig::with_crypto(crypto);
        server_config.transport_config(Arc::new(transport));
        // A device that changes networks keeps its session: QUIC validates the new path and
        // the connection moves (tests/media.rs, a_device_that_changes_networks...).
        server_config.migration(true);
        Ok(server_config)
    }
}

impl BoundIngress {
    /// Starts accepting connections.
    pub fn serve(self, deps: IngressDeps) -> RunningIngress {
        let IngressDeps {
            registry,
            tokens,
            sessions,
            requests,
            placement,
            metrics,
        } = deps;
        let shared = Arc::new(Shared {
            throttle: AuthThrottle::new(self.config.throttle),
            device_throttle: AuthThrottle::new(self.config.device_throttle),
            pending_logins: DashMap::new(),
            verifier: VerifierPool::start(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
                4096,
            ),
            config: self.config,
            webtransport_certs: self.webtransport_certs,
            metrics,
            registry,
            tokens,
            sessions,
            requests,
            placement,
        });
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            shared.clone(),
            self.endpoint.clone(),
            shutdown.clone(),
        ));
        RunningIngress {
            shared,
            endpoint: self.endpoint,
            local_addr: self.local_addr,
            shutdown,
            task: Some(task),
        }
    }
}

/// Ingress accepting devices.
pub struct RunningIngress {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    /// The bound QUIC address.
    pub local_addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RunningIngress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningIngress")
            .field("local_addr", &self.local_addr)
            .field("sessions", &self.shared.sessions.len())
            .finish_non_exhaustive()
    }
}

impl RunningIngress {
    /// The live sessions.
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.shared.sessions
    }

    /// With WebTransport on: the SHA-256 (hex) of the certificate browsers are served now,
    /// for a page's `serverCertificateHashes`.
    pub fn webtransport_certificate_hash(&self) -> Option<String> {
        self.shared.webtransport_certs.as_ref().map(|c| c.hash())
    }

    /// Reads the certificate and key files again (`quic.cert`, `quic.key`, as configured at
    /// start or given here) and uses them for connections accepted from now on; connections
    /// up already keep theirs. Returns the new certificate's SHA-256 fingerprint. A node that
    /// generated its certificate reads the generated files again (an unchanged fingerprint).
    pub fn reload_certificate(
        &self,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<String, IngressError> {
        let config = &self.shared.config;
        let material = tls::load_or_generate(
            cert.or(config.cert.as_deref()),
            key.or(config.key.as_deref()),
            &config.data_dir,
        )?;
        let server_config =
            server_config(config, &material, self.shared.webtransport_certs.as_ref())?;
        self.endpoint.set_server_config(Some(server_config));
        Ok(material.fingerprint())
    }

    /// Says goodbye to every session (waiting up to 2 s for them to end), then closes the
    /// endpoint and waits for its connections to finish closing.
    pub async fn shutdown(self) {
        self.shutdown_with(false).await;
    }

    /// [`RunningIngress::shutdown`], telling devices whether the node is draining (they
    /// reconnect at once, to another node) or just stopping.
    pub async fn shutdown_with(mut self, draining: bool) {
        self.shared
            .sessions
            .broadcast(|| SessionCommand::Shutdown { draining });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.shared.sessions.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.shutdown.cancel();
        self.endpoint
            .close(thalamus_proto::close_code::SHUTDOWN.into(), b"shutdown");
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        self.endpoint.wait_idle().await;
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

async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
    let counts = Arc::new(ConnectionCounts::default());
    let max_total = shared.config.max_connections;
    let max_per_ip = shared.config.max_connections_per_ip;
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
                metrics::inc(&shared.metrics.connections_refused, reason);
                metrics::inc(&shared.metrics.limits_hit, reason);
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
                    metrics::inc(&shared.metrics.connections_refused, "handshake_failed");
                    return;
                }
            };
            shared.metrics.connections_accepted.inc();
            shared.metrics.connections_open.inc();
            let remote = conn.remote_address();
            if let Some(transport) = transport_of(&shared, conn).await {
                metrics::inc_transport(&shared.metrics.connections_by_transport, transport.label());
                run_connection(shared.clone(), transport, remote).await;
            }
            shared.metrics.connections_open.dec();
        });
    }
}

/// What a connection carries, by its ALPN: MBFP on QUIC, or (`h3`) a WebTransport session,
/// accepted when its CONNECT names [`crate::config::WEBTRANSPORT_PATH`] from an allowed page
/// origin ([`crate::config::origin_allowed`]) within the hello timeout. `None` (counted) when
/// a WebTransport set-up fails, asks for another path or comes from another origin.
async fn transport_of(shared: &Shared, conn: quinn::Connection) -> Option<Transport> {
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() != Some(web_transport_quinn::ALPN.as_bytes()) {
        if shared.config.webtransport {
            // The limits WebTransport needed are not a raw device's to use.
            conn.set_max_concurrent_bi_streams(1u32.into());
            conn.set_max_concurrent_uni_streams(0u32.into());
        }
        return Some(Transport::Quic(conn));
    }
    let refused = |reason: &'static str| {
        metrics::inc(&shared.metrics.connections_refused, reason);
        None
    };
    // The whole set-up (HTTP/3 settings, the CONNECT, our answer) within one hello timeout.
    let handle = conn.clone();
    let setup = async {
        let request = match web_transport_quinn::Request::accept(conn).await {
            Ok(request) => request,
            Err(e) => {
                tracing::debug!(error = %e, "WebTransport set-up failed");
                return Err("webtransport_setup");
            }
        };
        if request.url.path() != crate::config::WEBTRANSPORT_PATH {
            let _ = request
                .reject(web_transport_quinn::http::StatusCode::NOT_FOUND)
                .await;
            return Err("webtransport_path");
        }
        let origin = request
            .headers
            .get("origin")
            .map(|o| o.to_str().unwrap_or("?"));
        if !crate::config::origin_allowed(&shared.config.webtransport_origins, origin) {
            tracing::debug!(
                ?origin,
                "WebTransport session from a page of another origin"
            );
            let _ = request
                .reject(web_transport_quinn::http::StatusCode::FORBIDDEN)
                .await;
            return Err("webtransport_origin");
        }
        request.ok().await.map_err(|e| {
            tracing::debug!(error = %e, "WebTransport set-up failed");
            "webtransport_setup"
        })
    };
    let reason = match tokio::time::timeout(shared.config.hello_timeout, setup).await {
        Ok(Ok(session)) => return Some(Transport::WebTransport(Box::new(session))),
        Ok(Err(reason)) => reason,
        Err(_) => "webtransport_timeout",
    };
    handle.close(
        thalamus_proto::close_code::PROTOCOL_ERROR.into(),
        reason.as_bytes(),
    );
    refused(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

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
