//! UDP, TCP and TLS transports on tokio (RFC 3261 sections 18 and 26, RFC 3581).
//!
//! The thin I/O layer of the stack: it reads datagrams and TCP or TLS byte streams, frames and
//! parses them (the sans-IO parser does the work), stamps `received` and `rport` on the top Via
//! of requests (18.2.1, RFC 3581), answers unparsable-but-recognisable UDP requests with a
//! stateless 400, and hands every message to the caller through a bounded channel. Outbound,
//! it sends bytes to a peer over UDP or over a reused TCP or TLS connection (opening one when
//! none exists). It keeps no transaction or dialog state and makes no routing decisions.
//!
//! TLS (rustls through tokio-rustls) runs the TCP code over an encrypted stream: the same
//! limits (connections in all and per address, idle and message timeouts, buffered bytes), one
//! connection per peer reused both ways. The handshake runs on the connection's own task within
//! `handshake_timeout`. Outbound the server's certificate is checked against the configured
//! roots and the name the request was resolved from (see [`SipTransport::set_tls_name`]; the IP
//! address otherwise); a handshake that fails is counted and fails the transactions waiting.
//!
//! No peer can stall the caller: [`SipTransport::send`] never waits for a peer. A TCP
//! destination has its own bounded queue; a connection is opened by a task of its own while
//! messages wait in that queue, and when it cannot be opened the transactions whose messages
//! were waiting are reported on the failure channel. A black-holed destination delays only its
//! own messages. On receive, a TCP message must arrive whole within `message_timeout` of its
//! first byte, and the bytes buffered by all connections together are bounded
//! (`max_buffered_bytes`): a slow or stalled sender is closed and counted.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

pub mod tls;

use crate::message::{Message, ParseLimits, StreamError, StreamFramer, StreamItem};
pub use crate::peer::{Peer, PeerTransport};
use crate::transaction::TransactionKey;

/// A message received from the network.
#[derive(Debug)]
pub struct Inbound {
    /// The parsed message (requests already carry `received`/`rport`).
    pub message: Message,
    /// Who sent it.
    pub peer: Peer,
    /// When it was read.
    pub at: Instant,
}

/// Where a transport hands what it receives.
#[derive(Clone)]
pub enum Delivery {
    /// Into a bounded queue another task reads; when it is full the message is dropped and
    /// counted (`dropped_overload`).
    Queue(mpsc::Sender<Inbound>),
    /// To a handler called on the receiving task itself (a UDP socket's loop, a TCP or TLS
    /// connection's task): no hand-off between tasks. It must not block or wait on a peer.
    Inline(Arc<dyn Fn(Inbound) + Send + Sync>),
    /// As [`Delivery::Inline`], but every UDP datagram is first offered as it came, before it
    /// is copied or parsed, to `datagrams`: when that returns true it took care of it (a
    /// stateless proxy relaying it by editing its bytes, say) and the transport only counts
    /// it; otherwise it is parsed and given to `messages`. Neither may block or wait on a peer.
    InlineDatagrams {
        /// Offered each UDP datagram (not keep-alives, not stale requests) and its source.
        datagrams: DatagramHandler,
        /// Gets every message `datagrams` did not take, and everything from TCP and TLS.
        messages: Arc<dyn Fn(Inbound) + Send + Sync>,
    },
}

/// A handler offered raw UDP datagrams ([`Delivery::InlineDatagrams`]): true when it took one.
pub type DatagramHandler = Arc<dyn Fn(&[u8], Peer) -> bool + Send + Sync>;

impl From<mpsc::Sender<Inbound>> for Delivery {
    fn from(queue: mpsc::Sender<Inbound>) -> Self {
        Delivery::Queue(queue)
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Delivery::Queue(_) => "Queue",
            Delivery::Inline(_) => "Inline",
            Delivery::InlineDatagrams { .. } => "InlineDatagrams",
        })
    }
}

/// Why [`SipTransport::try_send`] did not send.
#[derive(Debug, thiserror::Error)]
pub enum TrySendError {
    /// The UDP socket's buffer is full now: the bytes, to send with [`SipTransport::send`].
    #[error("the UDP socket would block")]
    WouldBlock(Bytes),
    /// Sending failed.
    #[error(transparent)]
    Failed(#[from] TransportError),
}

/// SIP over TLS: where to listen, our certificate, and whom we trust.
#[derive(Debug, Clone)]
pub struct TlsTransportConfig {
    /// Address to listen on (None: outbound TLS only).
    pub listen: Option<SocketAddr>,
    /// Our certificate and key, for TLS connections we accept (needed to listen).
    pub server: Option<Arc<rustls::ServerConfig>>,
    /// The roots (and verification) for TLS connections we open.
    pub client: Arc<rustls::ClientConfig>,
    /// Longest a TLS handshake may take, either way.
    pub handshake_timeout: Duration,
}

/// Transport settings.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// UDP address to bind (None: no UDP).
    pub udp: Option<SocketAddr>,
    /// TCP address to listen on (None: no TCP listener; outbound TCP still works).
    pub tcp: Option<SocketAddr>,
    /// Parser bounds.
    pub limits: ParseLimits,
    /// Most TCP connections at once.
    pub max_connections: usize,
    /// Most TCP connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Close a TCP connection idle for this long.
    pub idle_timeout: Duration,
    /// Messages queued toward one TCP connection before sends fail.
    pub connection_queue: usize,
    /// Timeout for opening an outbound TCP connection.
    pub connect_timeout: Duration,
    /// A TCP message must be received whole within this time of its first byte.
    pub message_timeout: Duration,
    /// Most bytes buffered by all TCP connections together (partial messages); a connection
    /// that would go over is closed.
    pub max_buffered_bytes: usize,
    /// A request that waited longer than this in the UDP socket (by the kernel's receive time,
    /// on Linux) is dropped unanswered: the sender has retransmitted it by then, perhaps to
    /// another node (the node was frozen, or far behind). `Duration::ZERO`: never dropped.
    pub max_request_age: Duration,
    /// SIP over TLS (None: no TLS either way). TLS connections count in the TCP limits.
    pub tls: Option<TlsTransportConfig>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            udp: Some(SocketAddr::from(([0, 0, 0, 0], 5060))),
            tcp: Some(SocketAddr::from(([0, 0, 0, 0], 5060))),
            limits: ParseLimits::default(),
            max_connections: 10_000,
            max_connections_per_ip: 256,
            idle_timeout: Duration::from_secs(300),
            connection_queue: 1024,
            connect_timeout: Duration::from_secs(5),
            message_timeout: Duration::from_secs(10),
            max_buffered_bytes: 64 * 1024 * 1024,
            max_request_age: Duration::ZERO,
            tls: None,
        }
    }
}

/// Transport errors.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Binding a socket failed.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// No UDP socket is bound.
    #[error("no UDP socket")]
    NoUdp,
    /// Sending failed.
    #[error("send to {peer:?}: {source}")]
    Send {
        /// Destination.
        peer: Peer,
        /// Cause.
        source: std::io::Error,
    },
    /// The TCP connection's queue is full or it closed.
    #[error("TCP connection to {0} is congested or closed")]
    Congested(SocketAddr),
    /// A connection limit was hit.
    #[error("connection limit reached")]
    ConnectionLimit,
    /// A TLS destination, and no TLS configured.
    #[error("SIP over TLS is not configured")]
    NoTls,
}

/// Counters an operator graphs.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Messages received and parsed.
    pub received: AtomicU64,
    /// Messages sent.
    pub sent: AtomicU64,
    /// Messages that did not parse.
    pub parse_errors: AtomicU64,
    /// Stateless 400 answers sent for unparsable requests.
    pub bad_request_answers: AtomicU64,
    /// Messages dropped because the receiver queue was full.
    pub dropped_overload: AtomicU64,
    /// TCP connections refused by a limit.
    pub connections_refused: AtomicU64,
    /// TCP connections open now (and outbound ones being opened).
    pub connections_open: AtomicUsize,
    /// Outbound TCP connections that could not be opened (refused, timed out).
    pub connect_failures: AtomicU64,
    /// Sends refused because a destination's queue was full.
    pub queue_full: AtomicU64,
    /// TCP connections closed because a message did not arrive whole within `message_timeout`.
    pub closed_slow: AtomicU64,
    /// TCP connections closed because the total of buffered bytes was reached.
    pub closed_buffer_limit: AtomicU64,
    /// Bytes buffered now by all TCP connections (partial messages).
    pub buffered_bytes: AtomicUsize,
    /// UDP requests dropped because they waited in the socket longer than `max_request_age`.
    pub stale_requests: AtomicU64,
    /// TLS handshakes that failed or timed out, either way (a certificate that does not verify,
    /// a peer that is not TLS, a peer that does not trust ours).
    pub tls_handshake_failures: AtomicU64,
    /// TLS handshakes completed, either way (connections accepted or opened over TLS).
    pub tls_handshakes: AtomicU64,
}

/// Most TLS peer names remembered ([`SipTransport::set_tls_name`]).
pub const MAX_TLS_NAMES: usize = 4096;

/// A message waiting toward a TCP destination, and the transaction to fail if it is never
/// written.
struct Outgoing {
    bytes: Bytes,
    key: Option<TransactionKey>,
}

struct Connection {
    queue: mpsc::Sender<Outgoing>,
}

struct Inner {
    config: TransportConfig,
    udp: Option<Arc<UdpSocket>>,
    udp_addr: Option<SocketAddr>,
    tcp_addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    /// The names TLS peers' certificates are checked against, by address.
    tls_names: dashmap::DashMap<SocketAddr, rustls::pki_types::ServerName<'static>>,
    connections: dashmap::DashMap<Peer, Connection>,
    per_ip: Mutex<std::collections::HashMap<IpAddr, usize>>,
    inbound: Delivery,
    failures: mpsc::Sender<TransactionKey>,
    stats: TransportStats,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The running transports. Cheap to clone.
#[derive(Clone)]
pub struct SipTransport {
    inner: Arc<Inner>,
}

/// A [`SipTransport`] that does not keep it alive (for a handler the transport itself holds).
#[derive(Clone, Debug)]
pub struct WeakSipTransport(std::sync::Weak<Inner>);

impl WeakSipTransport {
    /// The transport, while it exists.
    pub fn upgrade(&self) -> Option<SipTransport> {
        self.0.upgrade().map(|inner| SipTransport { inner })
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("udp", &self.udp_addr)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SipTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SipTransport")
            .field("udp", &self.inner.udp_addr)
            .field("tcp", &self.inner.tcp_addr)
            .finish_non_exhaustive()
    }
}

impl SipTransport {
    /// Binds the configured sockets and starts the receive tasks; inbound messages go to
    /// `inbound` (a queue, or a handler called inline: [`Delivery`]), and the transactions
    /// whose messages could not be sent after [`SipTransport::send`] returned (a TCP connection
    /// that never opened) go to `failures`.
    pub async fn bind(
        config: TransportConfig,
        inbound: impl Into<Delivery>,
        failures: mpsc::Sender<TransactionKey>,
    ) -> Result<Self, TransportError> {
        let inbound = inbound.into();
        let (udp, udp_addr, listener, tcp_addr) = bind_sockets(&config).await?;
        let tls_listener = match config.tls.as_ref().and_then(|t| t.listen) {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| TransportError::Bind { addr, source })?,
            ),
            None => None,
        };
        let tls_addr = match &tls_listener {
            Some(l) => Some(l.local_addr().map_err(|source| TransportError::Bind {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })?),
            None => None,
        };
        let inner = Arc::new(Inner {
            config,
            udp: udp.clone(),
            udp_addr,
            tcp_addr,
            tls_addr,
            tls_names: dashmap::DashMap::new(),
            connections: dashmap::DashMap::new(),
            per_ip: Mutex::new(Default::default()),
            inbound,
            failures,
            stats: TransportStats::default(),
            tasks: Mutex::new(Vec::new()),
        });
        let transport = SipTransport { inner };
        let mut tasks = Vec::new();
        if let Some(udp) = udp {
            tasks.push(tokio::spawn(udp_loop(transport.clone(), udp)));
        }
        if let Some(listener) = listener {
            tasks.push(tokio::spawn(accept_loop(
                transport.clone(),
                listener,
                PeerTransport::Tcp,
            )));
        }
        if let Some(listener) = tls_listener {
            tasks.push(tokio::spawn(accept_loop(
                transport.clone(),
                listener,
                PeerTransport::Tls,
            )));
        }
        if let Ok(mut t) = transport.inner.tasks.lock() {
            t.extend(tasks);
        }
        Ok(transport)
    }

    /// The bound address of a transport.
    pub fn local_addr(&self, transport: PeerTransport) -> Option<SocketAddr> {
        match transport {
            PeerTransport::Udp => self.inner.udp_addr,
            PeerTransport::Tcp => self.inner.tcp_addr,
            PeerTransport::Tls => self.inner.tls_addr,
        }
    }

    /// The name the certificate of the TLS peer at `addr` must carry (the host a request to it
    /// was resolved from). Without one the certificate must name the IP address. At most
    /// [`MAX_TLS_NAMES`] are kept (the oldest are forgotten past that).
    pub fn set_tls_name(&self, addr: SocketAddr, name: &str) {
        let Ok(name) = rustls::pki_types::ServerName::try_from(name.to_string()) else {
            return;
        };
        if self.inner.tls_names.len() >= MAX_TLS_NAMES {
            self.inner.tls_names.clear();
        }
        self.inner.tls_names.insert(addr, name);
    }

    fn tls_name(&self, addr: SocketAddr) -> rustls::pki_types::ServerName<'static> {
        self.inner
            .tls_names
            .get(&addr)
            .map(|n| n.clone())
            .unwrap_or(rustls::pki_types::ServerName::IpAddress(addr.ip().into()))
    }

    /// Counters.
    pub fn stats(&self) -> &TransportStats {
        &self.inner.stats
    }

    /// Sends `bytes` to `peer` for transaction `key` (if any). UDP goes out at once (waiting
    /// only for room in the local socket buffer). TCP is queued on the destination's
    /// connection; when there is none, one is opened by a task of its own and the message waits
    /// in its queue, so this never waits for a peer. Errors are immediate (no UDP socket, the
    /// destination's queue full, a connection limit); a connection that cannot be opened later
    /// reports `key` on the failure channel.
    pub async fn send(
        &self,
        peer: Peer,
        bytes: Bytes,
        key: Option<TransactionKey>,
    ) -> Result<(), TransportError> {
        if peer.transport != PeerTransport::Udp {
            self.queue_stream(peer, Outgoing { bytes, key })?;
            self.inner.stats.sent.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        match self.try_send(peer, bytes) {
            Ok(()) => Ok(()),
            Err(TrySendError::Failed(e)) => Err(e),
            // The socket's buffer is full: wait for room.
            Err(TrySendError::WouldBlock(bytes)) => {
                let udp = self.inner.udp.as_ref().ok_or(TransportError::NoUdp)?;
                udp.send_to(&bytes, peer.addr)
                    .await
                    .map_err(|source| TransportError::Send { peer, source })?;
                self.inner.stats.sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// A handle that does not keep the transport alive.
    pub fn downgrade(&self) -> WeakSipTransport {
        WeakSipTransport(Arc::downgrade(&self.inner))
    }

    /// Sends `bytes` to `peer` without waiting: over UDP when the socket takes it now, over
    /// TCP or TLS queued on the connection (started when there is none). A UDP socket that
    /// would block gives the bytes back ([`TrySendError::WouldBlock`]) for [`SipTransport::send`].
    pub fn try_send(&self, peer: Peer, bytes: Bytes) -> Result<(), TrySendError> {
        match peer.transport {
            PeerTransport::Udp => {
                let udp = self.inner.udp.as_ref().ok_or(TransportError::NoUdp)?;
                match udp.try_send_to(&bytes, peer.addr) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        return Err(TrySendError::WouldBlock(bytes));
                    }
                    Err(source) => return Err(TransportError::Send { peer, source }.into()),
                }
            }
            PeerTransport::Tcp | PeerTransport::Tls => {
                self.queue_stream(peer, Outgoing { bytes, key: None })?
            }
        }
        self.inner.stats.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Queues `message` toward `peer` (TCP or TLS), starting a connection when there is none.
    fn queue_stream(&self, peer: Peer, message: Outgoing) -> Result<(), TransportError> {
        let queue = match self.inner.connections.get(&peer) {
            Some(c) => c.queue.clone(),
            None => self.connect(peer)?,
        };
        queue.try_send(message).map_err(|_| {
            self.inner.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            TransportError::Congested(peer.addr)
        })
    }

    /// Stops every task and closes every connection.
    pub fn shutdown(&self) {
        if let Ok(mut tasks) = self.inner.tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
        self.inner.connections.clear();
    }

    /// Registers a connection to `peer` being opened, and starts the task that opens it (and
    /// for TLS runs the handshake); the returned queue takes messages at once.
    fn connect(&self, peer: Peer) -> Result<mpsc::Sender<Outgoing>, TransportError> {
        let addr = peer.addr;
        let tls = match peer.transport {
            PeerTransport::Tls => {
                let config = self
                    .inner
                    .config
                    .tls
                    .as_ref()
                    .ok_or(TransportError::NoTls)?;
                Some((
                    tokio_rustls::TlsConnector::from(config.client.clone()),
                    config.handshake_timeout,
                ))
            }
            _ => None,
        };
        let slot = self
            .acquire_slot(addr.ip())
            .ok_or(TransportError::ConnectionLimit)?;
        let (tx, rx) = mpsc::channel(self.inner.config.connection_queue);
        self.inner
            .connections
            .insert(peer, Connection { queue: tx.clone() });
        let transport = self.clone();
        tokio::spawn(async move {
            let timeout = transport.inner.config.connect_timeout;
            let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return transport.connect_failed(peer, rx, &e.to_string()),
                Err(_) => return transport.connect_failed(peer, rx, "timed out"),
            };
            let _ = stream.set_nodelay(true);
            let Some((connector, handshake_timeout)) = tls else {
                return transport.run_connection(stream, peer, slot, rx).await;
            };
            let name = transport.tls_name(addr);
            match tokio::time::timeout(handshake_timeout, connector.connect(name, stream)).await {
                Ok(Ok(stream)) => {
                    transport.tls_done();
                    transport.run_connection(stream, peer, slot, rx).await;
                }
                Ok(Err(e)) => {
                    transport.tls_failed();
                    transport.connect_failed(peer, rx, &e.to_string());
                }
                Err(_) => {
                    transport.tls_failed();
                    transport.connect_failed(peer, rx, "TLS handshake timed out");
                }
            }
        });
        Ok(tx)
    }

    fn tls_done(&self) {
        self.inner
            .stats
            .tls_handshakes
            .fetch_add(1, Ordering::Relaxed);
    }

    fn tls_failed(&self) {
        self.inner
            .stats
            .tls_handshake_failures
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A connection could not be opened: forget it and fail the transactions that waited.
    fn connect_failed(&self, peer: Peer, mut waiting: mpsc::Receiver<Outgoing>, why: &str) {
        debug!(addr = %peer.addr, transport = ?peer.transport, why, "connect failed");
        self.inner
            .stats
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
        self.inner.connections.remove(&peer);
        waiting.close();
        while let Ok(message) = waiting.try_recv() {
            if let Some(key) = message.key {
                // Full only if the caller is gone or far behind; its timers end the transaction.
                let _ = self.inner.failures.try_send(key);
            }
        }
    }

    fn acquire_slot(&self, ip: IpAddr) -> Option<ConnectionSlot> {
        let stats = &self.inner.stats;
        if stats.connections_open.load(Ordering::Relaxed) >= self.inner.config.max_connections {
            stats.connections_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut per_ip = self.inner.per_ip.lock().ok()?;
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.inner.config.max_connections_per_ip {
            stats.connections_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        stats.connections_open.fetch_add(1, Ordering::Relaxed);
        Some(ConnectionSlot {
            transport: self.clone(),
            ip,
        })
    }

    /// Runs an open connection (TCP, or TLS once its handshake is done): its writer drains
    /// `queue`, its reader delivers messages, until either side ends.
    async fn run_connection<S>(
        &self,
        stream: S,
        peer: Peer,
        slot: ConnectionSlot,
        queue: mpsc::Receiver<Outgoing>,
    ) where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let _slot = slot;
        let (read, write) = tokio::io::split(stream);
        let writer = tokio::spawn(write_loop(write, queue));
        stream_read_loop(self, read, peer).await;
        writer.abort();
        self.inner.connections.remove(&peer);
        debug!(addr = %peer.addr, transport = ?peer.transport, "connection closed");
    }

    /// Registers an accepted connection and runs it on a task of its own; a TLS connection
    /// first completes its handshake there (within `handshake_timeout`; a failure is counted
    /// and the connection dropped).
    fn accepted(&self, stream: TcpStream, peer: Peer, slot: ConnectionSlot) {
        let _ = stream.set_nodelay(true);
        let transport = self.clone();
        let tls = match peer.transport {
            PeerTransport::Tls => self
                .inner
                .config
                .tls
                .as_ref()
                .and_then(|t| Some((t.server.clone()?, t.handshake_timeout))),
            _ => None,
        };
        tokio::spawn(async move {
            let (tx, rx) = mpsc::channel(transport.inner.config.connection_queue);
            let Some((server, handshake_timeout)) = tls else {
                transport
                    .inner
                    .connections
                    .insert(peer, Connection { queue: tx });
                return transport.run_connection(stream, peer, slot, rx).await;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(server);
            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    transport.tls_done();
                    transport
                        .inner
                        .connections
                        .insert(peer, Connection { queue: tx });
                    transport.run_connection(stream, peer, slot, rx).await;
                }
                Ok(Err(e)) => {
                    transport.tls_failed();
                    debug!(addr = %peer.addr, error = %e, "TLS handshake refused");
                }
                Err(_) => {
                    transport.tls_failed();
                    debug!(addr = %peer.addr, "TLS handshake timed out");
                }
            }
        });
    }

    /// Queues bytes that belong to no transaction (keep-alive answers, stateless 400s) on the
    /// connection from `peer`, if it still has room.
    fn reply_on(&self, peer: Peer, bytes: Bytes) {
        if let Some(c) = self.inner.connections.get(&peer) {
            let _ = c.queue.try_send(Outgoing { bytes, key: None });
        }
    }

    fn deliver(&self, mut message: Message, peer: Peer) {
        if let Message::Request(req) = &mut message {
            // A request without a usable Via is left as it is; the layer above rejects it.
            let _ = crate::transaction::stamp_received(req, peer.addr);
        }
        self.inner.stats.received.fetch_add(1, Ordering::Relaxed);
        let inbound = Inbound {
            message,
            peer,
            at: Instant::now(),
        };
        match &self.inner.inbound {
            Delivery::Queue(queue) => {
                if queue.try_send(inbound).is_err() {
                    self.inner
                        .stats
                        .dropped_overload
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Delivery::Inline(handler)
            | Delivery::InlineDatagrams {
                messages: handler, ..
            } => handler(inbound),
        }
    }
}

struct ConnectionSlot {
    transport: SipTransport,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let inner = &self.transport.inner;
        inner.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut per_ip) = inner.per_ip.lock() {
            if let Some(n) = per_ip.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
    }
}

type BoundSockets = (
    Option<Arc<UdpSocket>>,
    Option<SocketAddr>,
    Option<TcpListener>,
    Option<SocketAddr>,
);

/// Binds the configured UDP socket and TCP listener. With port 0 for both on one address, TCP
/// takes the port the system gave UDP (one SIP port for both); when that port is already a TCP
/// port (any connection's local end may hold it), both are bound again on a new port.
async fn bind_sockets(config: &TransportConfig) -> Result<BoundSockets, TransportError> {
    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut attempts = 0;
    loop {
        attempts += 1;
        let udp = match config.udp {
            Some(addr) => Some(Arc::new(
                UdpSocket::bind(addr)
                    .await
                    .map_err(|source| TransportError::Bind { addr, source })?,
            )),
            None => None,
        };
        let udp_addr = match &udp {
            Some(s) => Some(s.local_addr().map_err(|source| TransportError::Bind {
                addr: config.udp.unwrap_or(unspecified),
                source,
            })?),
            None => None,
        };
        let shared_port = matches!(
            (config.tcp, udp_addr),
            (Some(t), Some(u)) if t.port() == 0 && t.ip() == u.ip()
        );
        let tcp_bind = match (config.tcp, udp_addr) {
            (Some(_), Some(u)) if shared_port => Some(u),
            (tcp, _) => tcp,
        };
        let listener = match tcp_bind {
            Some(addr) => match TcpListener::bind(addr).await {
                Ok(listener) => Some(listener),
                Err(e)
                    if shared_port
                        && attempts < 16
                        && e.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    continue;
                }
                Err(source) => return Err(TransportError::Bind { addr, source }),
            },
            None => None,
        };
        let tcp_addr = match &listener {
            Some(l) => Some(l.local_addr().map_err(|source| TransportError::Bind {
                addr: tcp_bind.unwrap_or(unspecified),
                source,
            })?),
            None => None,
        };
        return Ok((udp, udp_addr, listener, tcp_addr));
    }
}

/// Receives one datagram, with the time the kernel received it where the socket says
/// (`SO_TIMESTAMPNS`, Linux).
#[cfg(target_os = "linux")]
async fn recv_stamped(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, Option<std::time::SystemTime>)> {
    use std::os::fd::AsRawFd;
    loop {
        socket.readable().await?;
        match socket.try_io(tokio::io::Interest::READABLE, || {
            stamped::recv(socket.as_raw_fd(), buf)
        }) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

#[cfg(not(target_os = "linux"))]
async fn recv_stamped(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, Option<std::time::SystemTime>)> {
    let (len, src) = socket.recv_from(buf).await?;
    Ok((len, src, None))
}

/// Receive timestamps through `recvmsg` (Linux).
#[cfg(target_os = "linux")]
mod stamped {
    use std::net::SocketAddr;
    use std::os::fd::RawFd;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use nix::sys::socket::{
        recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage,
    };

    /// Asks the kernel to stamp every datagram of `socket` with its receive time.
    pub(super) fn enable(socket: &tokio::net::UdpSocket) -> std::io::Result<()> {
        setsockopt(socket, sockopt::ReceiveTimestampns, &true).map_err(std::io::Error::from)
    }

    /// One `recvmsg`: length, source, and the kernel's receive time when it gave one.
    pub(super) fn recv(
        fd: RawFd,
        buf: &mut [u8],
    ) -> std::io::Result<(usize, SocketAddr, Option<SystemTime>)> {
        let mut iov = [std::io::IoSliceMut::new(buf)];
        let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
        let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
            .map_err(std::io::Error::from)?;
        let mut at = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmTimestampns(ts) = c {
                    let (secs, nanos) = (u64::try_from(ts.tv_sec()), u32::try_from(ts.tv_nsec()));
                    if let (Ok(secs), Ok(nanos)) = (secs, nanos) {
                        at = Some(UNIX_EPOCH + Duration::new(secs, nanos));
                    }
                }
            }
        }
        let addr = msg
            .address
            .and_then(|a| match a.family() {
                Some(nix::sys::socket::AddressFamily::Inet) => {
                    a.as_sockaddr_in().map(|v4| SocketAddr::V4((*v4).into()))
                }
                Some(nix::sys::socket::AddressFamily::Inet6) => {
                    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
                }
                _ => None,
            })
            .ok_or_else(|| std::io::Error::other("datagram without an IP source address"))?;
        Ok((msg.bytes, addr, at))
    }
}

async fn udp_loop(transport: SipTransport, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65_535];
    let max_age = transport.inner.config.max_request_age;
    #[cfg(target_os = "linux")]
    if !max_age.is_zero() {
        if let Err(e) = stamped::enable(&socket) {
            warn!(error = %e, "SIP UDP receive timestamps unavailable: stale requests are not dropped");
        }
    }
    loop {
        let received = if max_age.is_zero() {
            socket
                .recv_from(&mut buf)
                .await
                .map(|(len, src)| (len, src, None))
        } else {
            recv_stamped(&socket, &mut buf).await
        };
        let (len, src, received_at) = match received {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors surface here on some systems; keep reading.
                debug!(error = %e, "UDP receive error");
                continue;
            }
        };
        let Some(data) = buf.get(..len) else { continue };
        if data.iter().all(|b| matches!(b, b'\r' | b'\n' | b' ' | 0)) {
            continue; // keep-alive
        }
        // A request that waited too long is dropped before it costs a copy or a parse (a
        // response, which starts with the SIP version, is always taken: it ends one of our
        // transactions).
        let stale = received_at.is_some_and(|at| {
            std::time::SystemTime::now()
                .duration_since(at)
                .is_ok_and(|age| age > max_age)
        });
        if stale && !data.starts_with(b"SIP/") {
            transport
                .inner
                .stats
                .stale_requests
                .fetch_add(1, Ordering::Relaxed);
            debug!(%src, "request older than max_request_age: dropped");
            continue;
        }
        let peer = Peer {
            addr: src,
            transport: PeerTransport::Udp,
        };
        if let Delivery::InlineDatagrams { datagrams, .. } = &transport.inner.inbound {
            if datagrams(data, peer) {
                transport
                    .inner
                    .stats
                    .received
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        let datagram = Bytes::copy_from_slice(data);
        match Message::parse_with_limits(datagram, &transport.inner.config.limits) {
            Ok(message) => transport.deliver(message, peer),
            Err(err) => {
                transport
                    .inner
                    .stats
                    .parse_errors
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%src, error = %err, "unparsable UDP message");
                if let Some(response) = err.response() {
                    transport
                        .inner
                        .stats
                        .bad_request_answers
                        .fetch_add(1, Ordering::Relaxed);
                    let _ = socket.send_to(&response.to_bytes(), src).await;
                }
            }
        }
    }
}

async fn accept_loop(transport: SipTransport, listener: TcpListener, kind: PeerTransport) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, transport = ?kind, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = transport.acquire_slot(addr.ip()) else {
            continue; // dropped: refused
        };
        transport.accepted(stream, Peer::new(addr, kind), slot);
    }
}

async fn write_loop(mut write: impl AsyncWrite + Unpin, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(message) = rx.recv().await {
        // Flushed each time: TLS holds written bytes until then.
        if write.write_all(&message.bytes).await.is_err() || write.flush().await.is_err() {
            return;
        }
    }
}

/// This connection's share of [`TransportStats::buffered_bytes`], given back when it closes.
struct BufferedShare<'a> {
    stats: &'a TransportStats,
    bytes: usize,
}

impl BufferedShare<'_> {
    /// Sets this connection's share to `now`; false when the total would go over `limit`.
    fn set(&mut self, now: usize, limit: usize) -> bool {
        if now > self.bytes {
            let grow = now - self.bytes;
            let before = self.stats.buffered_bytes.fetch_add(grow, Ordering::Relaxed);
            self.bytes = now;
            before + grow <= limit
        } else {
            self.stats
                .buffered_bytes
                .fetch_sub(self.bytes - now, Ordering::Relaxed);
            self.bytes = now;
            true
        }
    }
}

impl Drop for BufferedShare<'_> {
    fn drop(&mut self) {
        self.stats
            .buffered_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

async fn stream_read_loop(transport: &SipTransport, mut read: impl AsyncRead + Unpin, peer: Peer) {
    let addr = peer.addr;
    let config = &transport.inner.config;
    let stats = &transport.inner.stats;
    let mut framer = StreamFramer::new(config.limits);
    let mut share = BufferedShare { stats, bytes: 0 };
    // When the first byte of the message being received arrived (None: between messages).
    let mut partial_since: Option<tokio::time::Instant> = None;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let wait = match partial_since {
            Some(since) => (since + config.message_timeout)
                .saturating_duration_since(tokio::time::Instant::now())
                .min(config.idle_timeout),
            None => config.idle_timeout,
        };
        let n = match tokio::time::timeout(wait, read.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Err(_) => {
                if partial_since.is_some() {
                    stats.closed_slow.fetch_add(1, Ordering::Relaxed);
                    debug!(%addr, "TCP message not received in time; closing");
                }
                return;
            }
            Ok(Ok(n)) => n,
        };
        let Some(data) = chunk.get(..n) else { return };
        framer.push(data);
        let mut completed = false;
        loop {
            match framer.next_item() {
                Ok(Some(StreamItem::Message(message))) => {
                    completed = true;
                    transport.deliver(message, peer);
                }
                Ok(Some(StreamItem::KeepAlivePing)) => {
                    // RFC 5626 section 4.4.1: answer a double CRLF with a single CRLF.
                    completed = true;
                    transport.reply_on(peer, Bytes::from_static(b"\r\n"));
                }
                Ok(Some(StreamItem::KeepAlivePong)) => completed = true,
                Ok(None) => break,
                Err(StreamError::Message(err)) => {
                    // Framed correctly but unparsable: answer 400 if we can, keep the connection.
                    completed = true;
                    stats.parse_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(response) = err.response() {
                        transport.reply_on(peer, response.to_bytes());
                    }
                }
                Err(StreamError::Framing(err)) => {
                    // The stream cannot be re-synchronised (RFC 4475 3.1.2.3, 3.3.9): close it.
                    stats.parse_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(%addr, error = %err, "TCP framing error; closing");
                    return;
                }
            }
        }
        let buffered = framer.buffered();
        if !share.set(buffered, config.max_buffered_bytes) {
            stats.closed_buffer_limit.fetch_add(1, Ordering::Relaxed);
            warn!(%addr, buffered, "TCP receive buffers are full; closing the connection");
            return;
        }
        partial_since = match (buffered, partial_since) {
            (0, _) => None,
            (_, Some(since)) if !completed => Some(since),
            _ => Some(tokio::time::Instant::now()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Request;

    fn request(via: &str) -> Request {
        let text = format!(
            "OPTIONS sip:a@b SIP/2.0\r\nVia: {via}\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        );
        match Message::parse(Bytes::from(text)).unwrap() {
            Message::Request(r) => r,
            Message::Response(_) => unreachable!(),
        }
    }

    /// A self-signed certificate for 127.0.0.1 and `localhost`: (chain PEM, key PEM).
    fn certificate() -> (String, String) {
        let cert = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .unwrap();
        (cert.cert.pem(), cert.key_pair.serialize_pem())
    }

    /// A transport listening for TLS (and UDP) with `chain`/`key`, trusting `roots` as a
    /// client (or nothing: verification off).
    async fn tls_transport(
        chain: &str,
        key: &str,
        roots: Option<&str>,
    ) -> (
        SipTransport,
        mpsc::Receiver<Inbound>,
        mpsc::Receiver<TransactionKey>,
    ) {
        let (tx, rx) = mpsc::channel(16);
        let (failures_tx, failures) = mpsc::channel(16);
        let t = SipTransport::bind(
            TransportConfig {
                udp: Some("127.0.0.1:0".parse().unwrap()),
                tcp: None,
                tls: Some(TlsTransportConfig {
                    listen: Some("127.0.0.1:0".parse().unwrap()),
                    server: Some(tls::server_config(chain.as_bytes(), key.as_bytes()).unwrap()),
                    client: tls::client_config(roots.unwrap_or(chain).as_bytes(), roots.is_some())
                        .unwrap(),
                    handshake_timeout: Duration::from_secs(5),
                }),
                ..Default::default()
            },
            tx,
            failures_tx,
        )
        .await
        .unwrap();
        (t, rx, failures)
    }

    #[tokio::test]
    async fn tls_round_trip_verifies_the_server_and_counts_refusals() {
        let (chain, pem_key) = certificate();
        let (server, mut inbound, _) = tls_transport(&chain, &pem_key, Some(&chain)).await;
        let addr = server.local_addr(PeerTransport::Tls).unwrap();
        // A client that trusts the server's certificate: a request over TLS and its answer
        // back on the same connection.
        let (client, mut client_inbound, _) = tls_transport(&chain, &pem_key, Some(&chain)).await;
        let msg = request("SIP/2.0/TLS 127.0.0.1:1;rport;branch=z9hG4bKtls").to_bytes();
        client
            .send(Peer::new(addr, PeerTransport::Tls), msg.clone(), None)
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), inbound.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.peer.transport, PeerTransport::Tls);
        server
            .send(
                got.peer,
                Bytes::from_static(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
                None,
            )
            .await
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), client_inbound.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer.peer, Peer::new(addr, PeerTransport::Tls));
        assert_eq!(
            client
                .stats()
                .tls_handshake_failures
                .load(Ordering::Relaxed),
            0
        );
        // One handshake each side, counted.
        assert_eq!(client.stats().tls_handshakes.load(Ordering::Relaxed), 1);
        assert_eq!(server.stats().tls_handshakes.load(Ordering::Relaxed), 1);

        // A client trusting another certificate refuses the server: the transaction waiting
        // is failed, the refusal counted on both sides.
        let (other_chain, other_key) = certificate();
        let (stranger, _, mut failures) =
            tls_transport(&other_chain, &other_key, Some(&other_chain)).await;
        let key = TransactionKey::from_parts(1, 1);
        stranger
            .send(Peer::new(addr, PeerTransport::Tls), msg.clone(), Some(key))
            .await
            .unwrap();
        let failed = tokio::time::timeout(Duration::from_secs(10), failures.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(failed, key);
        assert_eq!(
            stranger
                .stats()
                .tls_handshake_failures
                .load(Ordering::Relaxed),
            1
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while server
            .stats()
            .tls_handshake_failures
            .load(Ordering::Relaxed)
            == 0
        {
            assert!(
                Instant::now() < deadline,
                "the server did not count the refusal"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A name the certificate does not carry is refused too, by a client that trusts it.
        let (named, _, mut named_failures) = tls_transport(&chain, &pem_key, Some(&chain)).await;
        named.set_tls_name(addr, "sip.example.org");
        named
            .send(
                Peer::new(addr, PeerTransport::Tls),
                msg.clone(),
                Some(TransactionKey::from_parts(2, 1)),
            )
            .await
            .unwrap();
        let failed = tokio::time::timeout(Duration::from_secs(10), named_failures.recv())
            .await
            .unwrap();
        assert_eq!(failed, Some(TransactionKey::from_parts(2, 1)));
        // With verification off, any certificate is taken.
        let (lax, _, _) = tls_transport(&other_chain, &other_key, None).await;
        lax.send(Peer::new(addr, PeerTransport::Tls), msg, None)
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), inbound.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.peer.transport, PeerTransport::Tls);
    }

    #[tokio::test]
    async fn datagrams_the_handler_takes_are_neither_parsed_nor_delivered() {
        let (taken_tx, mut taken_rx) = mpsc::unbounded_channel::<(Vec<u8>, Peer)>();
        let (msg_tx, mut msg_rx) = mpsc::unbounded_channel::<Inbound>();
        let delivery = Delivery::InlineDatagrams {
            datagrams: Arc::new(move |data: &[u8], peer: Peer| {
                let take = data.starts_with(b"SIP/2.0 ");
                if take {
                    let _ = taken_tx.send((data.to_vec(), peer));
                }
                take
            }),
            messages: Arc::new(move |inbound: Inbound| {
                let _ = msg_tx.send(inbound);
            }),
        };
        let t = SipTransport::bind(
            TransportConfig {
                udp: Some("127.0.0.1:0".parse().unwrap()),
                ..Default::default()
            },
            delivery,
            mpsc::channel(16).0,
        )
        .await
        .unwrap();
        let udp_addr = t.local_addr(PeerTransport::Udp).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let wait = Duration::from_secs(5);

        // Taken as it came, even a response the parser would refuse (no header at all).
        client
            .send_to(b"SIP/2.0 200 OK\r\nbroken", udp_addr)
            .await
            .unwrap();
        let (data, peer) = tokio::time::timeout(wait, taken_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(data, b"SIP/2.0 200 OK\r\nbroken");
        assert_eq!(peer.addr, client.local_addr().unwrap());
        assert_eq!(peer.transport, PeerTransport::Udp);

        // Not taken: parsed, stamped and delivered as with `Inline`.
        let msg = request("SIP/2.0/UDP 127.0.0.1:1;rport;branch=z9hG4bKabc").to_bytes();
        client.send_to(&msg, udp_addr).await.unwrap();
        let got = tokio::time::timeout(wait, msg_rx.recv())
            .await
            .unwrap()
            .unwrap();
        let Message::Request(req) = &got.message else {
            panic!("not a request")
        };
        assert_eq!(req.headers.top_via().unwrap().received(), Some("127.0.0.1"));
        assert!(taken_rx.try_recv().is_err());
        assert_eq!(t.stats().received.load(Ordering::Relaxed), 2);
        assert_eq!(t.stats().parse_errors.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn udp_and_tcp_round_trip_and_stateless_400() {
        let (tx, mut rx) = mpsc::channel(16);
        let t = SipTransport::bind(
            TransportConfig {
                udp: Some("127.0.0.1:0".parse().unwrap()),
                tcp: Some("127.0.0.1:0".parse().unwrap()),
                ..Default::default()
            },
            tx,
            mpsc::channel(16).0,
        )
        .await
        .unwrap();
        let udp_addr = t.local_addr(PeerTransport::Udp).unwrap();
        let tcp_addr = t.local_addr(PeerTransport::Tcp).unwrap();
        assert_eq!(udp_addr.port(), tcp_addr.port());
        let msg = request("SIP/2.0/UDP 127.0.0.1:1;rport;branch=z9hG4bKabc").to_bytes();

        // UDP in, the top Via stamped with where it came from (RFC 3581).
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(&msg, udp_addr).await.unwrap();
        let got = rx.recv().await.unwrap();
        assert_eq!(got.peer.transport, PeerTransport::Udp);
        assert_eq!(got.peer.addr, client.local_addr().unwrap());
        let Message::Request(req) = &got.message else {
            panic!("not a request")
        };
        let via = req.headers.top_via().unwrap();
        assert_eq!(via.received(), Some("127.0.0.1"));
        assert_eq!(
            via.rport(),
            Some(crate::message::Rport::Port(
                client.local_addr().unwrap().port()
            ))
        );

        // A datagram shorter than its Content-Length (RFC 4475 clerr): stateless 400.
        let bad = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:1;branch=z9hG4bKx\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 500\r\n\r\nshort";
        client.send_to(bad, udp_addr).await.unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            buf[..n].starts_with(b"SIP/2.0 400"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );

        // TCP in, response out over the same connection.
        let mut stream = TcpStream::connect(tcp_addr).await.unwrap();
        stream.write_all(&msg).await.unwrap();
        let got = rx.recv().await.unwrap();
        assert_eq!(got.peer.transport, PeerTransport::Tcp);
        t.send(
            got.peer,
            Bytes::from_static(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
            None,
        )
        .await
        .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(buf[..n].starts_with(b"SIP/2.0 200"));
        assert_eq!(t.stats().connections_open.load(Ordering::Relaxed), 1);

        // Outbound TCP opens a connection, later sends reuse it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dest = listener.local_addr().unwrap();
        let peer = Peer {
            addr: dest,
            transport: PeerTransport::Tcp,
        };
        t.send(peer, msg.clone(), None).await.unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        t.send(peer, msg.clone(), None).await.unwrap();
        let mut total = 0;
        while total < 2 * msg.len() {
            total += accepted.read(&mut buf).await.unwrap();
        }
        assert_eq!(t.stats().connections_open.load(Ordering::Relaxed), 2);
        t.shutdown();
    }

    /// A listener whose accept queue is full: the kernel drops further SYNs (a black hole).
    async fn black_hole() -> (
        SocketAddr,
        tokio::net::TcpListener,
        Vec<std::net::TcpStream>,
    ) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        // Fill the queue (backlog + 1 on Linux); nothing is ever accepted.
        let mut fillers = Vec::new();
        for _ in 0..2 {
            fillers.push(std::net::TcpStream::connect(addr).unwrap());
        }
        (addr, listener, fillers)
    }

    #[tokio::test]
    async fn a_black_holed_destination_delays_only_its_own_messages() {
        let (tx, _rx) = mpsc::channel(16);
        let (failures_tx, mut failures) = mpsc::channel(16);
        let t = SipTransport::bind(
            TransportConfig {
                udp: Some("127.0.0.1:0".parse().unwrap()),
                tcp: None,
                connect_timeout: Duration::from_secs(1),
                ..Default::default()
            },
            tx,
            failures_tx,
        )
        .await
        .unwrap();
        let (hole, _listener, _fillers) = black_hole().await;
        let key = TransactionKey::from_parts(7, 1);
        let tcp_peer = Peer {
            addr: hole,
            transport: PeerTransport::Tcp,
        };
        // Queued at once, twice (the second waits in the same destination queue).
        t.send(tcp_peer, Bytes::from_static(b"OPTIONS"), Some(key))
            .await
            .unwrap();
        t.send(tcp_peer, Bytes::from_static(b"OPTIONS"), None)
            .await
            .unwrap();
        // A UDP message sent after them arrives before the connection attempt gives up.
        let receiver = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let udp_peer = Peer {
            addr: receiver.local_addr().unwrap(),
            transport: PeerTransport::Udp,
        };
        t.send(udp_peer, Bytes::from_static(b"hello"), None)
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        tokio::select! {
            r = receiver.recv_from(&mut buf) => assert_eq!(&buf[..r.unwrap().0], b"hello"),
            k = failures.recv() => panic!("the black hole failed first: {k:?}"),
        }
        // Then the connection gives up and the waiting transaction is reported.
        let failed = tokio::time::timeout(Duration::from_secs(10), failures.recv())
            .await
            .unwrap();
        assert_eq!(failed, Some(key));
        assert_eq!(t.stats().connect_failures.load(Ordering::Relaxed), 1);
        assert_eq!(t.stats().connections_open.load(Ordering::Relaxed), 0);
        t.shutdown();
    }

    async fn bound(config: TransportConfig) -> (SipTransport, SocketAddr) {
        let (tx, rx) = mpsc::channel(16);
        // Keep the receiver alive for the test's length.
        std::mem::forget(rx);
        let t = SipTransport::bind(config, tx, mpsc::channel(16).0)
            .await
            .unwrap();
        let addr = t.local_addr(PeerTransport::Tcp).unwrap();
        (t, addr)
    }

    /// Waits for the server to close `stream` (read returns 0 or an error), at most 10 s.
    async fn closed_by_server(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    #[tokio::test]
    async fn a_slow_sender_is_closed_and_a_whole_message_is_not() {
        let (t, addr) = bound(TransportConfig {
            udp: None,
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            message_timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .await;
        // Half a message, then nothing: closed when the message's time is up.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(
            b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bKs\r\n",
        )
        .await
        .unwrap();
        assert!(closed_by_server(&mut slow).await);
        assert_eq!(t.stats().closed_slow.load(Ordering::Relaxed), 1);
        assert_eq!(t.stats().buffered_bytes.load(Ordering::Relaxed), 0);
        // An idle connection between messages is not a slow message: still open after the
        // same wait (the server answers a keep-alive ping on it).
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut other = TcpStream::connect(addr).await.unwrap();
        other
            .write_all(b"OPTIONS sip:a@b SIP/2.0\r\n")
            .await
            .unwrap();
        assert!(closed_by_server(&mut other).await);
        idle.write_all(b"\r\n\r\n").await.unwrap();
        let mut pong = [0u8; 2];
        idle.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"\r\n");
        assert_eq!(t.stats().closed_slow.load(Ordering::Relaxed), 2);
        t.shutdown();
    }

    #[tokio::test]
    async fn the_bytes_all_connections_buffer_are_bounded() {
        let (t, addr) = bound(TransportConfig {
            udp: None,
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            max_buffered_bytes: 100_000,
            ..Default::default()
        })
        .await;
        // Two partial messages of 60 kB each: the second goes over the total and is closed.
        let head = b"MESSAGE sip:a@b SIP/2.0\r\nContent-Length: 64000\r\n";
        let mut filler = head.to_vec();
        let pad = format!("X-Pad: {}\r\n", "0".repeat(1_200));
        while filler.len() < 60_000 {
            filler.extend_from_slice(pad.as_bytes());
        }
        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(&filler).await.unwrap();
        // Wait until the first one's bytes are counted.
        for _ in 0..200 {
            if t.stats().buffered_bytes.load(Ordering::Relaxed) >= 60_000 {
                break;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(&filler).await.unwrap();
        assert!(closed_by_server(&mut second).await);
        assert_eq!(t.stats().closed_buffer_limit.load(Ordering::Relaxed), 1);
        // The first is still counted (and open); closing it gives its share back.
        assert!(t.stats().buffered_bytes.load(Ordering::Relaxed) >= 60_000);
        drop(first);
        for _ in 0..200 {
            if t.stats().buffered_bytes.load(Ordering::Relaxed) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(t.stats().buffered_bytes.load(Ordering::Relaxed), 0);
        t.shutdown();
    }
}
