//! The device session on tokio and quinn: [`Client`] drives a [`DeviceSession`] in a task of
//! its own. It opens the connections the session asks for (resolving `host:port`), carries the
//! control stream's frames both ways and the media datagrams, feeds the session the time, and
//! hands the application the session's events and the datagrams received on channels.
//!
//! Commands ([`Client::dial`], [`Client::hangup`]...) go to the task and come back with their
//! request id, or why they were not sent. The task never waits on the application: events and
//! datagrams go through bounded channels. A datagram that finds its channel full is dropped and
//! counted, as a network would drop it; events that find theirs full wait in a backlog of the
//! task (at most [`MAX_EVENT_BACKLOG`], the oldest dropped and counted beyond), so an
//! application that reads its events late (or never, as a C program that only streams audio
//! may) neither stops its session nor loses a recent event. It decides nothing about the
//! session (the core does).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::MediaOffer;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::debug;

use crate::connection::DeviceConnection;
use crate::session::{Action, CommandError, DeviceSession, Event, SessionConfig};

/// Events the task holds beyond the channel when the application does not read them.
pub const MAX_EVENT_BACKLOG: usize = 4096;

/// How a client connects.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The session: identity, entry points, backoff.
    pub session: SessionConfig,
    /// QUIC and TLS (see [`crate::quic::client_config`]: a pinned certificate, or the WebPKI
    /// roots).
    pub quic: quinn::ClientConfig,
    /// The TLS server name the gateways' certificates carry.
    pub server_name: String,
    /// Seeds the reconnection jitter.
    pub seed: u64,
    /// Events held for the application at most (then the session waits for it).
    pub event_buffer: usize,
    /// Datagrams held for the application at most (more are dropped).
    pub datagram_buffer: usize,
    /// A QUIC endpoint shared with other clients, for gateways of its address family (its
    /// own default client configuration applies; `quic` serves the other family): many
    /// devices in one process over a few UDP sockets. The client never closes it.
    pub endpoint: Option<quinn::Endpoint>,
}

impl ClientConfig {
    /// A configuration with 256 events and 1,024 datagrams of buffer.
    pub fn new(session: SessionConfig, quic: quinn::ClientConfig, server_name: &str) -> Self {
        Self {
            session,
            quic,
            server_name: server_name.to_string(),
            seed: 0x5eed,
            event_buffer: 256,
            datagram_buffer: 1024,
            endpoint: None,
        }
    }
}

/// Why a client could not start or a command did not go.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The QUIC endpoint could not be made (or moved: [`Client::rebind`]).
    #[error("QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    /// The session refused the command.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The client's task has ended (closed, refused, or replaced).
    #[error("the client has stopped")]
    Stopped,
    /// No connection to send a datagram on, or quinn refused it (too large, datagrams off).
    #[error("datagram not sent: {0}")]
    Datagram(String),
}

/// What the application receives.
#[derive(Debug)]
pub struct ClientEvents {
    /// The session's events, in order.
    pub events: mpsc::Receiver<Event>,
    /// Media datagrams received (header and payload, as sent by the gateway).
    pub datagrams: mpsc::Receiver<Bytes>,
}

/// A command run on the session: its call ref (0 when none) and request id.
type SessionCommand =
    Box<dyn FnOnce(&mut DeviceSession) -> Result<(u32, u64), CommandError> + Send>;

enum Command {
    Session(
        SessionCommand,
        oneshot::Sender<Result<(u32, u64), CommandError>>,
    ),
    Close(oneshot::Sender<()>),
}

/// A running device (see the module notes).
#[derive(Debug)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    connection: Arc<std::sync::Mutex<Option<quinn::Connection>>>,
    endpoints: Arc<std::sync::Mutex<Endpoints>>,
    dropped: Arc<AtomicU64>,
    events_dropped: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Session(..) => f.write_str("Session"),
            Command::Close(_) => f.write_str("Close"),
        }
    }
}

impl Client {
    /// Starts the device: its session connects at once. Must be called in a tokio runtime.
    pub fn start(config: ClientConfig) -> Result<(Client, ClientEvents), ClientError> {
        let (commands, rx) = mpsc::channel(64);
        let (events_tx, events) = mpsc::channel(config.event_buffer.max(1));
        let (datagrams_tx, datagrams) = mpsc::channel(config.datagram_buffer.max(1));
        let connection = Arc::new(std::sync::Mutex::new(None));
        let dropped = Arc::new(AtomicU64::new(0));
        let events_dropped = Arc::new(AtomicU64::new(0));
        let session = DeviceSession::new(config.session.clone(), config.seed);
        let endpoints = Arc::new(std::sync::Mutex::new(Endpoints {
            quic: config.quic.clone(),
            shared: config.endpoint.clone(),
            v4: None,
            v6: None,
        }));
        let driver = Driver {
            session,
            endpoints: endpoints.clone(),
            server_name: config.server_name.clone(),
            events: events_tx,
            datagrams: datagrams_tx,
            connection: connection.clone(),
            dropped: dropped.clone(),
            events_dropped: events_dropped.clone(),
            backlog: VecDeque::new(),
        };
        let task = tokio::spawn(driver.run(rx));
        Ok((
            Client {
                commands,
                connection,
                endpoints,
                dropped,
                events_dropped,
                task,
            },
            ClientEvents { events, datagrams },
        ))
    }

    async fn command(
        &self,
        f: impl FnOnce(&mut DeviceSession) -> Result<(u32, u64), CommandError> + Send + 'static,
    ) -> Result<(u32, u64), ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Session(Box::new(f), reply))
            .await
            .map_err(|_| ClientError::Stopped)?;
        Ok(answer.await.map_err(|_| ClientError::Stopped)??)
    }

    /// Places a call; returns its call ref and request id.
    pub async fn dial(&self, target: &str, media: MediaOffer) -> Result<(u32, u64), ClientError> {
        let target = target.to_string();
        self.command(move |s| s.dial(target, media)).await
    }

    /// Answers incoming call `call_ref`.
    pub async fn answer(&self, call_ref: u32, media: MediaOffer) -> Result<u64, ClientError> {
        self.command(move |s| s.answer(call_ref, media).map(|id| (call_ref, id)))
            .await
            .map(|(_, id)| id)
    }

    /// Rejects incoming call `call_ref` (`sip_status` 0: 486).
    pub async fn reject(&self, call_ref: u32, sip_status: u32) -> Result<u64, ClientError> {
        self.command(move |s| s.reject(call_ref, sip_status).map(|id| (call_ref, id)))
            .await
            .map(|(_, id)| id)
    }

    /// Hangs call `call_ref` up.
    pub async fn hangup(&self, call_ref: u32) -> Result<u64, ClientError> {
        self.command(move |s| s.hangup(call_ref).map(|id| (call_ref, id)))
            .await
            .map(|(_, id)| id)
    }

    /// Holds (or resumes) call `call_ref`.
    pub async fn hold(&self, call_ref: u32, on: bool) -> Result<u64, ClientError> {
        self.command(move |s| s.hold(call_ref, on).map(|id| (call_ref, id)))
            .await
            .map(|(_, id)| id)
    }

    /// Sends DTMF `digit` in call `call_ref`.
    pub async fn dtmf(&self, call_ref: u32, digit: char) -> Result<u64, ClientError> {
        self.command(move |s| s.dtmf(call_ref, digit, 0).map(|id| (call_ref, id)))
            .await
            .map(|(_, id)| id)
    }

    /// Asks the call's remote party for a video key frame (see
    /// [`crate::session::DeviceSession::request_keyframe`]).
    pub async fn request_keyframe(&self, call_ref: u32) -> Result<u64, ClientError> {
        self.command(move |s| s.request_keyframe(call_ref).map(|id| (call_ref, id)))
            .await
            .map(|(_, id)| id)
    }

    /// Sends a text.
    pub async fn send_text(&self, to: &str, text: &str) -> Result<u64, ClientError> {
        let (to, text) = (to.to_string(), text.to_string());
        self.command(move |s| s.send_text(to, text).map(|id| (0, id)))
            .await
            .map(|(_, id)| id)
    }

    /// Sends any request frame; returns its request id.
    pub async fn send(&self, body: Body) -> Result<u64, ClientError> {
        self.command(move |s| s.send(body).map(|id| (0, id)))
            .await
            .map(|(_, id)| id)
    }

    /// Sends one media datagram (see [`crate::media::MediaSender`]) on the current connection.
    pub fn send_datagram(&self, datagram: Bytes) -> Result<(), ClientError> {
        let connection = self
            .connection
            .lock()
            .map_err(|_| ClientError::Stopped)?
            .clone();
        match connection {
            Some(c) => c
                .send_datagram(datagram)
                .map_err(|e| ClientError::Datagram(e.to_string())),
            None => Err(ClientError::Datagram("not connected".into())),
        }
    }

    /// Moves the QUIC endpoint of the current connection to `socket`, as when the device changes
    /// networks: its packets now come from the socket's address, QUIC validates the new path,
    /// and the connection goes on with its session, calls and media (connection migration,
    /// RFC 9000 section 9, which the gateway accepts). Later connections to addresses of the
    /// same family go through `socket` too. Returns the endpoint's previous local address. A
    /// client on a shared endpoint ([`ClientConfig::endpoint`]) cannot: it is not its own.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> Result<std::net::SocketAddr, ClientError> {
        let remote = self
            .connection
            .lock()
            .map_err(|_| ClientError::Stopped)?
            .as_ref()
            .map(quinn::Connection::remote_address)
            .ok_or_else(|| {
                ClientError::Endpoint(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "not connected",
                ))
            })?;
        let endpoint = {
            let endpoints = self.endpoints.lock().map_err(|_| ClientError::Stopped)?;
            if remote.is_ipv4() {
                endpoints.v4.clone()
            } else {
                endpoints.v6.clone()
            }
        }
        .ok_or_else(|| {
            ClientError::Endpoint(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "no endpoint of its own",
            ))
        })?;
        let previous = endpoint.local_addr().map_err(ClientError::Endpoint)?;
        endpoint.rebind(socket).map_err(ClientError::Endpoint)?;
        Ok(previous)
    }

    /// Datagrams received but dropped because the application did not take them in time.
    pub fn datagrams_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Events dropped because the application left more than [`MAX_EVENT_BACKLOG`] unread.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped.load(Ordering::Relaxed)
    }

    /// Closes the session (`Goodbye`) and waits for the task to end.
    pub async fn close(self) {
        let (done, finished) = oneshot::channel();
        if self.commands.send(Command::Close(done)).await.is_ok() {
            let _ = finished.await;
        }
        let _ = self.task.await;
    }
}

type Opening = Pin<Box<dyn Future<Output = Result<DeviceConnection, String>> + Send>>;

/// The client's QUIC endpoints, one per address family, made when first needed (or the
/// shared one, which is not the client's to close).
struct Endpoints {
    quic: quinn::ClientConfig,
    shared: Option<quinn::Endpoint>,
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints").finish_non_exhaustive()
    }
}

impl Endpoints {
    fn for_addr(&mut self, addr: std::net::SocketAddr) -> Result<quinn::Endpoint, String> {
        if let Some(shared) = &self.shared {
            if shared
                .local_addr()
                .is_ok_and(|local| local.is_ipv4() == addr.is_ipv4())
            {
                return Ok(shared.clone());
            }
        }
        let slot = if addr.is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        };
        if let Some(e) = slot {
            return Ok(e.clone());
        }
        let e = crate::quic::client_endpoint(addr, self.quic.clone()).map_err(|e| e.to_string())?;
        *slot = Some(e.clone());
        Ok(e)
    }

    /// The client's own endpoints (not the shared one).
    fn all(&self) -> Vec<quinn::Endpoint> {
        self.v4.iter().chain(self.v6.iter()).cloned().collect()
    }
}

struct Driver {
    session: DeviceSession,
    endpoints: Arc<std::sync::Mutex<Endpoints>>,
    server_name: String,
    events: mpsc::Sender<Event>,
    datagrams: mpsc::Sender<Bytes>,
    connection: Arc<std::sync::Mutex<Option<quinn::Connection>>>,
    dropped: Arc<AtomicU64>,
    events_dropped: Arc<AtomicU64>,
    /// Events the channel had no room for, oldest first.
    backlog: VecDeque<Event>,
}

/// What woke the driver.
enum Step {
    /// The events channel has room again.
    Room(Result<mpsc::OwnedPermit<Event>, mpsc::error::SendError<()>>),
    Opened(Result<DeviceConnection, String>),
    Frame(Result<thalamus_proto::v1::Envelope, crate::connection::DeviceError>),
    Datagram(Result<Bytes, String>),
    Command(Option<Command>),
    Timeout,
}

async fn open(
    endpoints: Arc<std::sync::Mutex<Endpoints>>,
    address: String,
    server_name: String,
) -> Result<DeviceConnection, String> {
    let addr = tokio::net::lookup_host(&address)
        .await
        .map_err(|e| format!("resolving {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("{address} resolves to nothing"))?;
    let endpoint = endpoints
        .lock()
        .map_err(|_| "endpoints poisoned".to_string())?
        .for_addr(addr)?;
    DeviceConnection::connect(&endpoint, addr, &server_name)
        .await
        .map_err(|e| e.to_string())
}

impl Driver {
    fn set_connection(&self, c: Option<quinn::Connection>) {
        if let Ok(mut slot) = self.connection.lock() {
            *slot = c;
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut conn: Option<DeviceConnection> = None;
        let mut opening: Option<Opening> = None;
        let mut closing: Option<oneshot::Sender<()>> = None;
        self.session.start(now());
        loop {
            while let Some(action) = self.session.poll_action() {
                match action {
                    Action::Connect { address } => {
                        if let Some(c) = conn.take() {
                            c.conn.close(0u32.into(), b"reconnecting");
                        }
                        self.set_connection(None);
                        opening = Some(Box::pin(open(
                            self.endpoints.clone(),
                            address,
                            self.server_name.clone(),
                        )));
                    }
                    Action::Disconnect => {
                        // What the session queued before it (a Goodbye) goes first.
                        if let Some(mut c) = conn.take() {
                            while let Some(env) = self.session.poll_transmit() {
                                let _ = c.writer.send_envelope(&env).await;
                            }
                            c.conn.close(0u32.into(), b"bye");
                        }
                        self.set_connection(None);
                        opening = None;
                    }
                }
            }
            while let Some(env) = self.session.poll_transmit() {
                let Some(c) = conn.as_mut() else {
                    continue; // not connected: a reconnection sends a new Hello
                };
                if let Err(e) = c.writer.send_envelope(&env).await {
                    conn = None;
                    self.set_connection(None);
                    self.session.connection_lost(now(), e.to_string());
                    break;
                }
            }
            while let Some(event) = self.session.poll_event() {
                self.backlog.push_back(event);
                if self.backlog.len() > MAX_EVENT_BACKLOG {
                    self.backlog.pop_front();
                    self.events_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            while let Some(event) = self.backlog.pop_front() {
                match self.events.try_send(event) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(event)) => {
                        self.backlog.push_front(event);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        // Nobody listens: the application is gone.
                        self.backlog.clear();
                        self.session.close();
                    }
                }
            }
            if self.session.is_closed() {
                // The last events (the session's end) go if there is room; nobody waits for
                // an application that stopped reading.
                while let Some(event) = self.backlog.pop_front() {
                    if self.events.try_send(event).is_err() {
                        break;
                    }
                }
                if let Some(c) = conn.take() {
                    c.conn.close(0u32.into(), b"closed");
                }
                self.set_connection(None);
                let endpoints = self.endpoints.lock().map(|e| e.all()).unwrap_or_default();
                for endpoint in endpoints {
                    // Whatever is still opening is abandoned; what closed gets its close out.
                    endpoint.close(0u32.into(), b"closed");
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(1),
                        endpoint.wait_idle(),
                    )
                    .await;
                }
                if let Some(done) = closing.take() {
                    let _ = done.send(());
                }
                return;
            }
            let deadline = self.session.poll_timeout();
            let step = {
                let opening_fut = async {
                    match opening.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                };
                let room_fut = async {
                    if self.backlog.is_empty() {
                        std::future::pending().await
                    } else {
                        self.events.clone().reserve_owned().await
                    }
                };
                let (frame_fut, datagram_fut) = match conn.as_mut() {
                    Some(c) => {
                        let quic = c.conn.clone();
                        (
                            futures_frame(Some(&mut c.reader)),
                            futures_datagram(Some(quic)),
                        )
                    }
                    None => (futures_frame(None), futures_datagram(None)),
                };
                tokio::select! {
                    r = room_fut => Step::Room(r),
                    r = opening_fut => Step::Opened(r),
                    f = frame_fut => Step::Frame(f),
                    d = datagram_fut => Step::Datagram(d),
                    c = commands.recv() => Step::Command(c),
                    () = sleep_until(deadline) => Step::Timeout,
                }
            };
            let now = now();
            match step {
                Step::Room(Ok(permit)) => {
                    if let Some(event) = self.backlog.pop_front() {
                        permit.send(event);
                    }
                }
                Step::Room(Err(_)) => {
                    self.backlog.clear();
                    self.session.close();
                }
                Step::Opened(Ok(c)) => {
                    opening = None;
                    self.set_connection(Some(c.conn.clone()));
                    conn = Some(c);
                    self.session.connected(now);
                }
                Step::Opened(Err(e)) => {
                    opening = None;
                    self.session.connection_lost(now, e);
                }
                Step::Frame(Ok(env)) => self.session.frame(now, env),
                Step::Frame(Err(e)) => {
                    // The gateway's close code says whether to stop (replaced, refused), even
                    // when the frame saying so did not arrive; it may follow the stream's end.
                    let code = match (e.close_code(), conn.as_ref()) {
                        (Some(code), _) => Some(code),
                        (None, Some(c)) => tokio::time::timeout(
                            std::time::Duration::from_millis(500),
                            c.conn.closed(),
                        )
                        .await
                        .ok()
                        .and_then(|reason| {
                            crate::connection::DeviceError::from(reason).close_code()
                        }),
                        (None, None) => None,
                    };
                    conn = None;
                    self.set_connection(None);
                    match code.and_then(|c| u32::try_from(c).ok()) {
                        Some(code) => self.session.connection_closed(
                            now,
                            code,
                            format!("{e} (close code {code})"),
                        ),
                        None => self.session.connection_lost(now, e.to_string()),
                    }
                }
                Step::Datagram(Ok(bytes)) => {
                    if self.datagrams.try_send(bytes).is_err() {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // The connection's end is seen by the frame reader too.
                Step::Datagram(Err(e)) => debug!(error = %e, "datagram read ended"),
                Step::Command(Some(Command::Session(f, reply))) => {
                    let _ = reply.send(f(&mut self.session));
                }
                Step::Command(Some(Command::Close(done))) => {
                    closing = Some(done);
                    self.session.close();
                }
                Step::Command(None) => self.session.close(),
                Step::Timeout => self.session.handle_timeout(now),
            }
        }
    }
}

async fn futures_frame(
    reader: Option<&mut crate::connection::FrameReader>,
) -> Result<thalamus_proto::v1::Envelope, crate::connection::DeviceError> {
    match reader {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

async fn futures_datagram(conn: Option<quinn::Connection>) -> Result<Bytes, String> {
    match conn {
        Some(c) => c.read_datagram().await.map_err(|e| e.to_string()),
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Now, from tokio's clock (paused in tests that pause it).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
