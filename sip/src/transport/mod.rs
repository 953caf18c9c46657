//! UDP and TCP transports on tokio (RFC 3261 section 18, RFC 3581).
//!
//! The thin I/O layer of the stack: it reads datagrams and TCP byte streams, frames and parses
//! them (the sans-IO parser does the work), stamps `received` and `rport` on the top Via of
//! requests (18.2.1, RFC 3581), answers unparsable-but-recognisable UDP requests with a
//! stateless 400, and hands every message to the caller through a bounded channel. Outbound,
//! it sends bytes to a peer over UDP or over a reused TCP connection (opening one when none
//! exists). It keeps no transaction or dialog state and makes no routing decisions. TLS would
//! be a third listener of the same shape as TCP.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::message::{Message, ParseLimits, StreamError, StreamFramer, StreamItem};
pub use crate::peer::{Peer, PeerTransport};

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
    /// TCP connections open now.
    pub connections_open: AtomicUsize,
}

struct Connection {
    queue: mpsc::Sender<Bytes>,
}

struct Inner {
    config: TransportConfig,
    udp: Option<Arc<UdpSocket>>,
    udp_addr: Option<SocketAddr>,
    tcp_addr: Option<SocketAddr>,
    connections: dashmap::DashMap<SocketAddr, Connection>,
    per_ip: Mutex<std::collections::HashMap<IpAddr, usize>>,
    inbound: mpsc::Sender<Inbound>,
    stats: TransportStats,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The running transports. Cheap to clone.
#[derive(Clone)]
pub struct SipTransport {
    inner: Arc<Inner>,
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
    /// `inbound`.
    pub async fn bind(
        config: TransportConfig,
        inbound: mpsc::Sender<Inbound>,
    ) -> Result<Self, TransportError> {
        let (udp, udp_addr, listener, tcp_addr) = bind_sockets(&config).await?;
        let inner = Arc::new(Inner {
            config,
            udp: udp.clone(),
            udp_addr,
            tcp_addr,
            connections: dashmap::DashMap::new(),
            per_ip: Mutex::new(Default::default()),
            inbound,
            stats: TransportStats::default(),
            tasks: Mutex::new(Vec::new()),
        });
        let transport = SipTransport { inner };
        let mut tasks = Vec::new();
        if let Some(udp) = udp {
            tasks.push(tokio::spawn(udp_loop(transport.clone(), udp)));
        }
        if let Some(listener) = listener {
            tasks.push(tokio::spawn(accept_loop(transport.clone(), listener)));
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
        }
    }

    /// Counters.
    pub fn stats(&self) -> &TransportStats {
        &self.inner.stats
    }

    /// Sends `bytes` to `peer`: UDP directly, TCP over the existing connection to that address
    /// (opening one if there is none).
    pub async fn send(&self, peer: Peer, bytes: Bytes) -> Result<(), TransportError> {
        match peer.transport {
            PeerTransport::Udp => {
                let udp = self.inner.udp.as_ref().ok_or(TransportError::NoUdp)?;
                udp.send_to(&bytes, peer.addr)
                    .await
                    .map_err(|source| TransportError::Send { peer, source })?;
            }
            PeerTransport::Tcp => {
                let queue = match self.inner.connections.get(&peer.addr) {
                    Some(c) => c.queue.clone(),
                    None => self.connect(peer.addr).await?,
                };
                queue
                    .try_send(bytes)
                    .map_err(|_| TransportError::Congested(peer.addr))?;
            }
        }
        self.inner.stats.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
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

    async fn connect(&self, addr: SocketAddr) -> Result<mpsc::Sender<Bytes>, TransportError> {
        let stream =
            tokio::time::timeout(self.inner.config.connect_timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| TransportError::Send {
                    peer: Peer {
                        addr,
                        transport: PeerTransport::Tcp,
                    },
                    source: std::io::ErrorKind::TimedOut.into(),
                })?
                .map_err(|source| TransportError::Send {
                    peer: Peer {
                        addr,
                        transport: PeerTransport::Tcp,
                    },
                    source,
                })?;
        let slot = self
            .acquire_slot(addr.ip())
            .ok_or(TransportError::ConnectionLimit)?;
        Ok(self.run_connection(stream, addr, slot))
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

    /// Registers a connection and starts its reader and writer; returns its send queue.
    fn run_connection(
        &self,
        stream: TcpStream,
        addr: SocketAddr,
        slot: ConnectionSlot,
    ) -> mpsc::Sender<Bytes> {
        let _ = stream.set_nodelay(true);
        let (tx, rx) = mpsc::channel(self.inner.config.connection_queue);
        self.inner
            .connections
            .insert(addr, Connection { queue: tx.clone() });
        let transport = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let (read, write) = stream.into_split();
            let writer = tokio::spawn(write_loop(write, rx));
            tcp_read_loop(&transport, read, addr).await;
            writer.abort();
            transport.inner.connections.remove(&addr);
            debug!(%addr, "TCP connection closed");
        });
        tx
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
        if self.inner.inbound.try_send(inbound).is_err() {
            self.inner
                .stats
                .dropped_overload
                .fetch_add(1, Ordering::Relaxed);
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

async fn udp_loop(transport: SipTransport, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (len, src) = match socket.recv_from(&mut buf).await {
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
        let datagram = Bytes::copy_from_slice(data);
        let peer = Peer {
            addr: src,
            transport: PeerTransport::Udp,
        };
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

async fn accept_loop(transport: SipTransport, listener: TcpListener) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = transport.acquire_slot(addr.ip()) else {
            continue; // dropped: refused
        };
        transport.run_connection(stream, addr, slot);
    }
}

async fn write_loop(mut write: tokio::net::tcp::OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>) {
    while let Some(bytes) = rx.recv().await {
        if write.write_all(&bytes).await.is_err() {
            return;
        }
    }
}

async fn tcp_read_loop(
    transport: &SipTransport,
    mut read: tokio::net::tcp::OwnedReadHalf,
    addr: SocketAddr,
) {
    let mut framer = StreamFramer::new(transport.inner.config.limits);
    let peer = Peer {
        addr,
        transport: PeerTransport::Tcp,
    };
    let idle = transport.inner.config.idle_timeout;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match tokio::time::timeout(idle, read.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => n,
        };
        let Some(data) = chunk.get(..n) else { return };
        framer.push(data);
        loop {
            match framer.next_item() {
                Ok(Some(StreamItem::Message(message))) => transport.deliver(message, peer),
                Ok(Some(StreamItem::KeepAlivePing)) => {
                    // RFC 5626 section 4.4.1: answer a double CRLF with a single CRLF.
                    if let Some(c) = transport.inner.connections.get(&addr) {
                        let _ = c.queue.try_send(Bytes::from_static(b"\r\n"));
                    }
                }
                Ok(Some(StreamItem::KeepAlivePong)) => {}
                Ok(None) => break,
                Err(StreamError::Message(err)) => {
                    // Framed correctly but unparsable: answer 400 if we can, keep the connection.
                    transport
                        .inner
                        .stats
                        .parse_errors
                        .fetch_add(1, Ordering::Relaxed);
                    if let (Some(response), Some(c)) =
                        (err.response(), transport.inner.connections.get(&addr))
                    {
                        let _ = c.queue.try_send(response.to_bytes());
                    }
                }
                Err(StreamError::Framing(err)) => {
                    // The stream cannot be re-synchronised (RFC 4475 3.1.2.3, 3.3.9): close it.
                    transport
                        .inner
                        .stats
                        .parse_errors
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(%addr, error = %err, "TCP framing error; closing");
                    return;
                }
            }
        }
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
        t.send(peer, msg.clone()).await.unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        t.send(peer, msg.clone()).await.unwrap();
        let mut total = 0;
        while total < 2 * msg.len() {
            total += accepted.read(&mut buf).await.unwrap();
        }
        assert_eq!(t.stats().connections_open.load(Ordering::Relaxed), 2);
        t.shutdown();
    }
}
