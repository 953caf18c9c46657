//! The tokio shell around [`RelayCore`]: one task per relayed stream, owning its RTP and RTCP
//! sockets.
//!
//! [`MediaEngine`] (one per node) holds the [`MediaConfig`] and the [`PortAllocator`].
//! [`MediaEngine::start`] allocates a port pair, binds both sockets and spawns the relay task,
//! returning a [`MediaRelay`] handle. The bridge then writes [`MediaRelay::local_rtp_addr`]
//! (with [`MediaRelay::sdp_address`]) into its SDP, gives the peer's SDP stream with
//! [`MediaRelay::set_remote_media`], watches [`MediaRelay::next_event`] for a media timeout,
//! and ends with [`MediaRelay::stop`]. The bridge feeds device datagrams through a
//! [`DeviceInput`] and gets datagrams for the device through a [`DatagramSink`] it implements
//! over the device's link.
//!
//! The core sits behind a mutex shared by the relay's task and its [`DeviceInput`]. A device
//! datagram is relayed on the task that received it (the device's session): the input locks
//! the core, hands it the datagram and sends the RTP it makes at once, without waking the
//! relay's task. The task wakes for the rest: packets from the peer, its sockets' readiness,
//! timers from [`RelayCore::poll_timeout`], control messages, and what a device datagram left
//! for it (a packet the socket had no room for, a deadline earlier than the one it sleeps to).
//! On stop (or when the handle is dropped) it sends an RTCP BYE, drops the sockets and releases
//! the port pair: the pair is owned by the task, so it is released even if the task is aborted
//! or panics, and an input that outlives the task is refused ([`FeedError::Closed`]).
//!
//! A relay reads its sockets with `recvmmsg`, two packets at a time: a read that returns fewer
//! than asked shows the socket empty, so no system call is spent learning that.
//!
//! What it does not do: no call control, no SDP, no QUIC connection handling, no batching of
//! sends (sendmmsg) or of several relays' sockets: each packet sent is one system call.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use thalamus_proto::media::StreamId;
use thalamus_sip::sdp::{Direction, RemoteMedia};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use crate::config::{MediaConfig, MediaConfigError};
use crate::ports::{PortAllocator, PortError, PortPair};
use crate::relay::{
    DeviceDatagram, RelayCore, RelayDirection, RelayEvent, RelaySettings, RelayStats, RemotePeer,
    SocketKind, Transmit,
};
use crate::totals::EngineTotals;

/// Receive buffer per socket; a datagram that fills it is treated as truncated and dropped.
pub const RECV_BUFFER_BYTES: usize = 4 * 1024;
/// Most packets read from one socket before the task looks at the others.
const BATCH: usize = 32;
/// How long to wait before offering datagrams again to a device link that reported
/// [`DatagramError::Blocked`].
pub const SINK_RETRY: Duration = Duration::from_millis(5);
/// Most bind attempts (on ports another process holds) per relay start.
const MAX_BIND_ATTEMPTS: usize = 16;
const CONTROL_QUEUE: usize = 16;
const EVENT_QUEUE: usize = 16;

/// Packets one receive call asks for. A relay gets 50 packets a second, as a rule one per
/// wake-up; a call that returns fewer than it asked for shows the socket empty, so the task
/// does not call again only to learn that (before, every packet cost a second `recvfrom` that
/// came back empty).
const RECV_BATCH: usize = 2;

thread_local! {
    /// The receive buffers of the relays running on this thread (see `RelayTask::read_packets`).
    static RECV: std::cell::RefCell<recv::Buffers> = std::cell::RefCell::new(recv::Buffers::new());
}

/// Why the device link did not take a datagram.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// The link's send buffer is full: try again shortly (the relay keeps the datagram).
    #[error("datagram send buffer full")]
    Blocked,
    /// Larger than the link can carry now (the datagram is dropped).
    #[error("datagram too large for the device link")]
    TooLarge,
    /// The peer does not accept datagrams (the datagram is dropped).
    #[error("datagrams not supported on the device link")]
    Unsupported,
    /// The connection is gone (the datagram is dropped).
    #[error("device connection closed")]
    Closed,
}

/// Where datagrams for the device go: implemented by the QUIC session.
pub trait DatagramSink: Send + Sync + 'static {
    /// Sends one datagram without waiting.
    fn send_datagram(&self, datagram: Bytes) -> Result<(), DatagramError>;

    /// The largest datagram the link accepts now, if it knows (header included).
    fn max_datagram_bytes(&self) -> Option<usize> {
        None
    }
}

/// Why a relay could not start or be reached.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Started outside a Tokio runtime.
    #[error("media relays need a Tokio runtime")]
    NoRuntime,
    /// No free port pair.
    #[error(transparent)]
    Ports(#[from] PortError),
    /// The sockets could not be bound.
    #[error("cannot bind media sockets on {address}: {source}")]
    Bind {
        /// The address tried last.
        address: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The relay task has ended.
    #[error("the media relay has stopped")]
    Stopped,
    /// The relay task panicked or was cancelled.
    #[error("the media relay task failed: {0}")]
    TaskFailed(String),
    /// The relay's control queue is full (a [`StatsProbe`] does not wait for room).
    #[error("the media relay is busy")]
    Busy,
}

/// Why a device datagram was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    /// The relay has stopped.
    #[error("media relay stopped")]
    Closed,
}

/// What identifies one relayed stream and its device link limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySpec {
    /// The call (`call_ref` of the media header).
    pub call_ref: u32,
    /// The stream of the call.
    pub stream_id: StreamId,
    /// Largest datagram toward the device, header included (`Welcome.limits`).
    pub max_datagram_bytes: usize,
    /// RTCP CNAME; default `thalamus-<call_ref>@<local RTP address>`.
    pub cname: Option<String>,
    /// RTCP on the RTP port (RFC 5761): the relay binds one socket, not two (for an offer
    /// with `a=rtcp-mux`, answered with it). Default: off.
    pub rtcp_mux: bool,
}

impl RelaySpec {
    /// The audio stream of `call_ref`, with the protocol's default 1200-byte datagrams.
    pub fn audio(call_ref: u32) -> Self {
        Self::stream(call_ref, StreamId::AUDIO)
    }

    /// Stream `stream_id` of `call_ref`, with the protocol's default 1200-byte datagrams.
    pub fn stream(call_ref: u32, stream_id: StreamId) -> Self {
        RelaySpec {
            call_ref,
            stream_id,
            max_datagram_bytes: 1_200,
            cname: None,
            rtcp_mux: false,
        }
    }

    /// The same with RTCP on the RTP port (see [`RelaySpec::rtcp_mux`]).
    pub fn with_rtcp_mux(mut self, rtcp_mux: bool) -> Self {
        self.rtcp_mux = rtcp_mux;
        self
    }
}

/// Device datagrams into one relay (cheap to clone). The QUIC session routes each received
/// datagram to the input of its call, and the datagram is relayed there and then.
#[derive(Clone)]
pub struct DeviceInput {
    shared: Arc<RelayShared>,
}

impl std::fmt::Debug for DeviceInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceInput")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl DeviceInput {
    /// Relays a datagram on the caller's task, stamped with its arrival time: the core takes
    /// it and the RTP it makes is sent at once, without waiting (a packet the socket has no
    /// room for is left to the relay's task). Refused once the relay has stopped.
    pub fn feed(&self, datagram: Bytes) -> Result<(), FeedError> {
        self.shared
            .with_core(|core, now| core.handle_device_datagram(datagram, now))
            .map_err(|_| FeedError::Closed)
    }

    /// Whether the relay has stopped.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().sockets.is_none()
    }
}

/// The sockets of one relay: RTP, and RTCP unless it is multiplexed on the RTP socket.
#[derive(Debug)]
struct Sockets {
    rtp: UdpSocket,
    rtcp: Option<UdpSocket>,
}

impl Sockets {
    /// The socket packets of `kind` leave from and arrive on.
    fn of(&self, kind: SocketKind) -> &UdpSocket {
        match (kind, &self.rtcp) {
            (SocketKind::Rtcp, Some(rtcp)) => rtcp,
            _ => &self.rtp,
        }
    }
}

/// What a relay's task and its [`DeviceInput`]s share.
struct RelayShared {
    state: Mutex<RelayState>,
    /// Wakes the task when a device datagram left it something to do.
    wake: Notify,
}

impl RelayShared {
    fn lock(&self) -> MutexGuard<'_, RelayState> {
        // A panic while the core was locked leaves a relay whose counters may be off by one
        // packet: keep relaying.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the core on the caller's task, sends the RTP it made without waiting, and
    /// wakes the relay's task if that left it something to do. Refused once the relay has
    /// stopped.
    fn with_core(&self, f: impl FnOnce(&mut RelayCore, Instant)) -> Result<(), RelayError> {
        let now = now();
        let wake = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let Some(sockets) = state.sockets.as_ref() else {
                return Err(RelayError::Stopped);
            };
            f(&mut state.core, now);
            send_ready(&mut state.core, &mut state.blocked, sockets);
            state.drain_events();
            state.needs_task()
        };
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }
}

/// The relay's state behind its mutex.
struct RelayState {
    core: RelayCore,
    /// The sockets; `None` once the task has ended (inputs are then refused, and the port
    /// pair, released by the task, is not held by a stale input).
    sockets: Option<Arc<Sockets>>,
    /// Where the core's events go; `None` once the task has ended.
    events_tx: Option<mpsc::Sender<RelayEvent>>,
    /// A packet the socket had no room for: sent first, by whoever sends next.
    blocked: Option<Transmit>,
    /// The deadline the task's timer is set to.
    timer_at: Option<Instant>,
    /// Largest datagram toward the device as set (the link may allow less).
    max_datagram_bytes: usize,
}

impl RelayState {
    fn drain_events(&mut self) {
        while let Some(event) = self.core.poll_event() {
            if let Some(tx) = &self.events_tx {
                let _ = tx.try_send(event);
            }
        }
    }

    /// Whether the task must wake: a packet waits for room in a socket, datagrams wait for the
    /// device (sent by the task, which retries a blocked link), or the core's next deadline
    /// is earlier than the one the task sleeps to.
    fn needs_task(&self) -> bool {
        let earlier = match (self.core.poll_timeout(), self.timer_at) {
            (Some(deadline), Some(armed)) => deadline < armed,
            (Some(_), None) => true,
            (None, _) => false,
        };
        self.blocked.is_some() || self.core.device_queue_len() > 0 || earlier
    }
}

/// Sends what the core queued for the peer without waiting, the blocked packet first. A
/// packet the socket has no room for is kept in `blocked`, and sending stops there (the rest
/// stays queued in the core, in order).
fn send_ready(core: &mut RelayCore, blocked: &mut Option<Transmit>, sockets: &Sockets) {
    loop {
        let Some(transmit) = blocked.take().or_else(|| core.poll_transmit()) else {
            return;
        };
        let socket = sockets.of(transmit.socket);
        match socket.try_send_to(&transmit.packet, transmit.destination) {
            Ok(_) => {
                if let Some(received_at) = transmit.received_at {
                    core.record_relay_latency(RelayDirection::ToPeer, received_at, now());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                *blocked = Some(transmit);
                return;
            }
            Err(_) => core.record_socket_send_failed(),
        }
    }
}

#[derive(Debug)]
struct EngineShared {
    config: MediaConfig,
    ports: PortAllocator,
    totals: Arc<EngineTotals>,
}

/// Starts media relays (one per node; cheap to clone).
#[derive(Debug, Clone)]
pub struct MediaEngine {
    shared: Arc<EngineShared>,
}

impl MediaEngine {
    /// An engine for `config` (validated here).
    pub fn new(config: MediaConfig) -> Result<Self, MediaConfigError> {
        config.validate()?;
        let ports = PortAllocator::new(config.address, config.rtp_port_min, config.rtp_port_max)
            .map_err(|e| MediaConfigError {
                key: "media.rtp_port_max",
                message: e.to_string(),
            })?;
        Ok(MediaEngine {
            shared: Arc::new(EngineShared {
                config,
                ports,
                totals: Arc::new(EngineTotals::default()),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MediaConfig {
        &self.shared.config
    }

    /// The port allocator.
    pub fn ports(&self) -> &PortAllocator {
        &self.shared.ports
    }

    /// Port pairs in use.
    pub fn ports_in_use(&self) -> usize {
        self.shared.ports.in_use()
    }

    /// Relay tasks alive (started and not yet finished).
    pub fn live_relays(&self) -> usize {
        self.shared.totals.live()
    }

    /// Node-wide figures: relays started and live, what finished relays relayed and how fast
    /// (rendered by [`MediaCollector`](super::metrics::MediaCollector)).
    pub fn totals(&self) -> &EngineTotals {
        &self.shared.totals
    }

    /// Allocates a port pair, binds its sockets and starts a relay for `spec` that sends to
    /// the device through `sink`. Must be called within a Tokio runtime. The relay drops device
    /// media until it is given a peer ([`MediaRelay::set_remote_media`]).
    pub fn start(
        &self,
        spec: RelaySpec,
        sink: Arc<dyn DatagramSink>,
    ) -> Result<MediaRelay, RelayError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| RelayError::NoRuntime)?;
        let _entered = runtime.enter();
        let (ports, rtp, rtcp) = self.bind_pair(spec.rtcp_mux)?;
        let local_rtp = ports.rtp_addr();
        let local_rtcp = if rtcp.is_some() {
            ports.rtcp_addr()
        } else {
            local_rtp
        };
        let config = &self.shared.config;
        let wallclock_at_start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let settings = RelaySettings {
            call_ref: spec.call_ref,
            stream_id: spec.stream_id,
            local_ssrc: rand::random(),
            initial_sequence: rand::random(),
            initial_timestamp: rand::random(),
            cname: spec
                .cname
                .unwrap_or_else(|| format!("thalamus-{}@{}", spec.call_ref, local_rtp)),
            latch: config.latch,
            media_timeout: config.media_timeout(),
            rtcp_interval: config.rtcp_interval(),
            send_buffer_frames: config.send_buffer_frames as usize,
            max_datagram_bytes: spec.max_datagram_bytes,
            wallclock_at_start,
            rtcp_mux: spec.rtcp_mux,
        };
        let core = RelayCore::new(settings, now());
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let sockets = Arc::new(Sockets { rtp, rtcp });
        let shared = Arc::new(RelayShared {
            state: Mutex::new(RelayState {
                core,
                sockets: Some(Arc::clone(&sockets)),
                events_tx: Some(events_tx),
                blocked: None,
                timer_at: None,
                max_datagram_bytes: spec.max_datagram_bytes,
            }),
            wake: Notify::new(),
        });
        let task = RelayTask {
            shared: Arc::clone(&shared),
            sockets,
            sink,
            control_rx,
            outbox: Vec::new(),
            sent: Vec::new(),
            sink_blocked_until: None,
            _ports: ports,
            live: LiveTask::new(Arc::clone(&self.shared.totals)),
        };
        // Boxed: the task's future then holds a pointer, not its own copy of the relay state
        // (an async fn keeps its argument and the moved-in local side by side).
        let handle = runtime.spawn(Box::new(task).run());
        Ok(MediaRelay {
            control: control_tx,
            input: DeviceInput { shared },
            events: Some(events_rx),
            local_rtp,
            local_rtcp,
            sdp_address: config.sdp_address(),
            task: Some(handle),
        })
    }

    /// A port pair and its sockets: RTP, and RTCP unless `rtcp_mux` (the odd port then stays
    /// reserved, unbound).
    fn bind_pair(
        &self,
        rtcp_mux: bool,
    ) -> Result<(PortPair, UdpSocket, Option<UdpSocket>), RelayError> {
        let attempts = self.shared.ports.capacity().min(MAX_BIND_ATTEMPTS);
        let mut last_error = None;
        for _ in 0..attempts {
            let pair = self.shared.ports.allocate()?;
            match bind_both(&pair, rtcp_mux) {
                Ok((rtp, rtcp)) => return Ok((pair, rtp, rtcp)),
                Err((address, source)) => {
                    let retry = matches!(
                        source.kind(),
                        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::PermissionDenied
                    );
                    last_error = Some(RelayError::Bind { address, source });
                    if !retry {
                        break;
                    }
                    // `pair` is dropped here and goes to the back of the free list.
                }
            }
        }
        Err(
            last_error.unwrap_or(RelayError::Ports(PortError::Exhausted {
                capacity: self.shared.ports.capacity(),
            })),
        )
    }
}

/// The RTCP socket's readiness; never ready for a relay without one.
async fn rtcp_readable(sockets: &Sockets) -> std::io::Result<()> {
    match &sockets.rtcp {
        Some(rtcp) => rtcp.readable().await,
        None => std::future::pending().await,
    }
}

fn bind_one(address: SocketAddr) -> Result<UdpSocket, (SocketAddr, std::io::Error)> {
    let socket = std::net::UdpSocket::bind(address).map_err(|e| (address, e))?;
    socket.set_nonblocking(true).map_err(|e| (address, e))?;
    UdpSocket::from_std(socket).map_err(|e| (address, e))
}

fn bind_both(
    pair: &PortPair,
    rtcp_mux: bool,
) -> Result<(UdpSocket, Option<UdpSocket>), (SocketAddr, std::io::Error)> {
    let rtp = bind_one(pair.rtp_addr())?;
    let rtcp = if rtcp_mux {
        None
    } else {
        Some(bind_one(pair.rtcp_addr())?)
    };
    Ok((rtp, rtcp))
}

/// Counts a relay task as alive for as long as it exists.
#[derive(Debug)]
struct LiveTask(Arc<EngineTotals>);

impl LiveTask {
    fn new(totals: Arc<EngineTotals>) -> Self {
        totals.task_started();
        LiveTask(totals)
    }
}

impl Drop for LiveTask {
    fn drop(&mut self) {
        self.0.task_ended();
    }
}

/// What the relay's task alone does: replace the device link, answer a statistics probe,
/// stop. The rest is done on the core directly ([`RelayShared::with_core`]).
enum Control {
    Sink(Arc<dyn DatagramSink>),
    Stats(oneshot::Sender<RelayStats>),
    Stop,
}

/// The handle of one running relay. Dropping it stops the relay (without waiting).
#[derive(Debug)]
pub struct MediaRelay {
    control: mpsc::Sender<Control>,
    input: DeviceInput,
    events: Option<mpsc::Receiver<RelayEvent>>,
    local_rtp: SocketAddr,
    local_rtcp: SocketAddr,
    sdp_address: Option<IpAddr>,
    task: Option<JoinHandle<RelayStats>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Control::Sink(_) => "Sink",
            Control::Stats(_) => "Stats",
            Control::Stop => "Stop",
        })
    }
}

/// Reads a relay's statistics on demand ([`MediaRelay::stats_probe`]). It never waits for
/// room in the relay's control queue (a busy relay answers [`RelayError::Busy`]), so a reader
/// cannot hold up the call; it does not keep the relay running.
#[derive(Debug, Clone)]
pub struct StatsProbe {
    control: mpsc::Sender<Control>,
}

impl StatsProbe {
    /// The relay's statistics now.
    pub async fn read(&self) -> Result<RelayStats, RelayError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .try_send(Control::Stats(tx))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => RelayError::Busy,
                mpsc::error::TrySendError::Closed(_) => RelayError::Stopped,
            })?;
        rx.await.map_err(|_| RelayError::Stopped)
    }
}

impl MediaRelay {
    /// The bound RTP socket address (even port).
    pub fn local_rtp_addr(&self) -> SocketAddr {
        self.local_rtp
    }

    /// The bound RTCP socket address (RTP port + 1), or the RTP one when RTCP is multiplexed
    /// on it ([`RelaySpec::rtcp_mux`]).
    pub fn local_rtcp_addr(&self) -> SocketAddr {
        self.local_rtcp
    }

    /// Whether RTCP is multiplexed on the RTP socket (the relay has one socket).
    pub fn is_rtcp_muxed(&self) -> bool {
        self.local_rtcp == self.local_rtp
    }

    /// The address to write into SDP (`c=`) from the configuration; `None` when the media
    /// address is a wildcard and no advertised address is configured (use the SIP side's).
    /// The port for `m=` is [`MediaRelay::local_rtp_addr`]'s.
    pub fn sdp_address(&self) -> Option<IpAddr> {
        self.sdp_address
    }

    /// A handle for feeding device datagrams.
    pub fn device_input(&self) -> DeviceInput {
        self.input.clone()
    }

    /// A handle that reads the relay's statistics from another task (an operator's view),
    /// without going through the task that owns the relay.
    pub fn stats_probe(&self) -> StatsProbe {
        StatsProbe {
            control: self.control.clone(),
        }
    }

    async fn send(&self, control: Control) -> Result<(), RelayError> {
        self.control
            .send(control)
            .await
            .map_err(|_| RelayError::Stopped)
    }

    /// Gives the peer's SDP stream (answer, re-INVITE, hold/resume by the peer).
    pub async fn set_remote_media(&self, remote: &RemoteMedia) -> Result<(), RelayError> {
        self.set_peer(RemotePeer::from_remote_media(remote)).await
    }

    /// Gives the peer explicitly (custom payload mapping, e.g. the signal stream). It applies
    /// before this returns: a device datagram fed after it goes to this peer.
    pub async fn set_peer(&self, peer: RemotePeer) -> Result<(), RelayError> {
        self.input
            .shared
            .with_core(|core, now| core.set_peer(peer, now))
    }

    /// Sets our side's direction as written in our SDP (device hold: `sendonly`/`inactive`);
    /// it applies before this returns.
    pub async fn set_local_direction(&self, direction: Direction) -> Result<(), RelayError> {
        self.input
            .shared
            .with_core(|core, now| core.set_local_direction(direction, now))
    }

    /// Replaces the device link (the device resumed its session on a new connection).
    pub async fn set_sink(&self, sink: Arc<dyn DatagramSink>) -> Result<(), RelayError> {
        self.send(Control::Sink(sink)).await
    }

    /// Changes the largest datagram toward the device (header included).
    pub async fn set_max_datagram_bytes(&self, max: usize) -> Result<(), RelayError> {
        let shared = &self.input.shared;
        shared.with_core(|core, _| core.set_max_datagram_bytes(max))?;
        shared.lock().max_datagram_bytes = max;
        Ok(())
    }

    /// Asks the peer for a key frame (RTCP PLI; see [`RelayCore::request_keyframe`]) without
    /// waiting.
    pub fn request_keyframe(&self) -> Result<(), RelayError> {
        self.input
            .shared
            .with_core(|core, now| core.request_keyframe(now))
    }

    /// A snapshot of the statistics.
    pub async fn stats(&self) -> Result<RelayStats, RelayError> {
        let (tx, rx) = oneshot::channel();
        self.send(Control::Stats(tx)).await?;
        rx.await.map_err(|_| RelayError::Stopped)
    }

    /// The next event (media timeout, latch); `None` once the relay has stopped or the
    /// receiver was taken with [`MediaRelay::take_events`].
    pub async fn next_event(&mut self) -> Option<RelayEvent> {
        self.events.as_mut()?.recv().await
    }

    /// Takes the event receiver (to watch it from another task).
    pub fn take_events(&mut self) -> Option<mpsc::Receiver<RelayEvent>> {
        self.events.take()
    }

    /// Stops the relay: sends the final RTCP report and BYE, closes the sockets, releases the
    /// port pair, and returns the final statistics. The task has ended when this returns.
    pub async fn stop(mut self) -> Result<RelayStats, RelayError> {
        let Some(task) = self.task.take() else {
            return Err(RelayError::Stopped);
        };
        // If the task already ended the send fails; the join below still gives its result.
        let _ = self.control.send(Control::Stop).await;
        task.await
            .map_err(|e| RelayError::TaskFailed(e.to_string()))
    }
}

impl Drop for MediaRelay {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct RelayTask {
    shared: Arc<RelayShared>,
    sockets: Arc<Sockets>,
    sink: Arc<dyn DatagramSink>,
    control_rx: mpsc::Receiver<Control>,
    sink_blocked_until: Option<Instant>,
    /// Datagrams for the device between the core and the link (reused: empty between flushes).
    outbox: Vec<DeviceDatagram>,
    /// When each datagram the link took arrived, and when it left (reused likewise).
    sent: Vec<(Instant, Instant)>,
    _ports: PortPair,
    live: LiveTask,
}

impl Drop for RelayTask {
    /// However the task ends (stopped, aborted, panicked): inputs are refused from now on and
    /// the sockets close with the task.
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.sockets = None;
        state.events_tx = None;
        state.blocked = None;
    }
}

impl RelayTask {
    async fn run(mut self: Box<Self>) -> RelayStats {
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
        let timer = tokio::time::sleep_until(far);
        let retry = tokio::time::sleep_until(far);
        tokio::pin!(timer);
        tokio::pin!(retry);
        // The deadline the retry sleep is set to (re-arming a sleep costs a timer-wheel
        // update, so it is done only when the deadline changes or the sleep fired; the
        // timer's is kept in the shared state, where a device datagram compares with it).
        let mut retry_armed: Option<Instant> = None;
        let sockets = Arc::clone(&self.sockets);
        loop {
            self.flush().await;
            let deadline = {
                let mut state = self.shared.lock();
                let deadline = state.core.poll_timeout();
                if deadline != state.timer_at {
                    if let Some(deadline) = deadline {
                        timer.as_mut().reset(deadline.into());
                    }
                    state.timer_at = deadline;
                }
                deadline
            };
            let retry_at = self.sink_blocked_until;
            if retry_at != retry_armed {
                if let Some(at) = retry_at {
                    retry.as_mut().reset(at.into());
                }
                retry_armed = retry_at;
            }
            tokio::select! {
                biased;
                control = self.control_rx.recv() => match control {
                    None | Some(Control::Stop) => break,
                    Some(control) => self.apply(control),
                },
                ready = sockets.rtp.readable() => {
                    if ready.is_ok() {
                        // Drain what is waiting, handing each packet on before reading the
                        // next so the small buffer toward the device never overflows in a
                        // burst (a spurious wake-up reads nothing).
                        for read in 0..BATCH / RECV_BATCH {
                            if read > 0 {
                                self.flush().await;
                            }
                            if !self.read_packets(SocketKind::Rtp) {
                                break;
                            }
                        }
                    }
                }
                ready = rtcp_readable(&sockets), if sockets.rtcp.is_some() => {
                    if ready.is_ok() {
                        self.read_packets(SocketKind::Rtcp);
                    }
                }
                () = self.shared.wake.notified() => {}
                () = &mut timer, if deadline.is_some() => {
                    let mut state = self.shared.lock();
                    state.timer_at = None;
                    state.core.handle_timeout(now());
                }
                () = &mut retry, if retry_at.is_some() => {
                    retry_armed = None;
                    self.sink_blocked_until = None;
                }
            }
        }
        self.shared.lock().core.close(now());
        self.sink_blocked_until = None;
        self.flush().await;
        let state = self.shared.lock();
        self.live.0.add_finished(&state.core);
        state.core.stats()
    }

    /// Reads what is waiting on `socket`, up to [`RECV_BATCH`] packets, and handles it; true
    /// when the socket may hold more (it filled the batch), false when it was found empty.
    ///
    /// The packets are read into the thread's receive buffers and handled before this
    /// returns, so relays share buffers per runtime thread instead of holding them each.
    fn read_packets(&self, kind: SocketKind) -> bool {
        RECV.with_borrow_mut(|buffers| {
            let more = buffers.receive(self.sockets.of(kind));
            for (buf, len, source) in buffers.packets() {
                self.on_packet(kind, buf, len, source);
            }
            more
        })
    }

    fn on_packet(&self, socket: SocketKind, buf: &[u8], len: usize, source: SocketAddr) {
        let now = now();
        let mut state = self.shared.lock();
        let Some(packet) = buf.get(..len).filter(|_| len < buf.len()) else {
            // Filled the buffer: probably truncated.
            state.core.record_oversized_packet();
            return;
        };
        match socket {
            SocketKind::Rtp => state.core.handle_rtp(packet, source, now),
            SocketKind::Rtcp => state.core.handle_rtcp(packet, source, now),
        }
    }

    fn apply(&mut self, control: Control) {
        match control {
            Control::Sink(sink) => {
                self.sink = sink;
                self.sink_blocked_until = None;
            }
            Control::Stats(reply) => {
                let _ = reply.send(self.shared.lock().core.stats());
            }
            Control::Stop => {}
        }
    }

    /// Sends what the core queued: to the peer (waiting for room in a full socket, with the
    /// core unlocked), then to the device, then its events.
    async fn flush(&mut self) {
        loop {
            let waiting = {
                let mut guard = self.shared.lock();
                let state = &mut *guard;
                send_ready(&mut state.core, &mut state.blocked, &self.sockets);
                state.blocked.as_ref().map(|t| t.socket)
            };
            let Some(kind) = waiting else { break };
            if self.sockets.of(kind).writable().await.is_err() {
                let mut state = self.shared.lock();
                state.blocked = None;
                state.core.record_socket_send_failed();
            }
        }
        // Datagrams for the device are taken out under the lock and offered to the link
        // without it: the link is the session's code, which may take locks of its own (a
        // DTMF tap reaching the device's session), and a device datagram fed meanwhile must
        // not wait for it. (Asking the link its datagram size only reads the connection.)
        {
            let mut state = self.shared.lock();
            if self.sink_blocked_until.is_none() && state.core.device_queue_len() > 0 {
                let link_max = self.sink.max_datagram_bytes().unwrap_or(usize::MAX);
                let max = state.max_datagram_bytes.min(link_max);
                state.core.set_max_datagram_bytes(max);
                while let Some(datagram) = state.core.poll_device_datagram() {
                    self.outbox.push(datagram);
                }
            }
            state.drain_events();
        }
        if self.outbox.is_empty() {
            return;
        }
        self.sent.clear();
        let mut blocked_from = None;
        let mut failed = 0;
        for (i, datagram) in self.outbox.iter().enumerate() {
            match self.sink.send_datagram(datagram.datagram.clone()) {
                Ok(()) => self.sent.push((datagram.received_at, now())),
                Err(DatagramError::Blocked) => {
                    blocked_from = Some(i);
                    break;
                }
                Err(_) => failed += 1,
            }
        }
        let mut state = self.shared.lock();
        for (received_at, at) in self.sent.drain(..) {
            state
                .core
                .record_relay_latency(RelayDirection::ToDevice, received_at, at);
        }
        for _ in 0..failed {
            state.core.record_device_send_failed();
        }
        if let Some(from) = blocked_from {
            // Back to the front of the queue, in their order; retried after SINK_RETRY.
            for datagram in self.outbox.drain(from..).rev() {
                state.core.requeue_device_datagram(datagram);
            }
            self.sink_blocked_until = Some(now() + SINK_RETRY);
        }
        self.outbox.clear();
    }
}

/// The time: tokio's clock (paused in tests that pause it), as the cores take it.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Receiving several packets in one system call, and telling an empty socket without asking it
/// again.
mod recv {
    use std::io::{ErrorKind, IoSliceMut};
    use std::net::SocketAddr;

    use tokio::io::Interest;
    use tokio::net::UdpSocket;

    use super::{RECV_BATCH, RECV_BUFFER_BYTES};

    /// The receive buffers of one runtime thread, and what the last receive read into them.
    pub(super) struct Buffers {
        bufs: Vec<Vec<u8>>,
        #[cfg(target_os = "linux")]
        headers: nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>,
        /// Each packet's length and source (`None` when not an IP address), in buffer order.
        received: Vec<(usize, Option<SocketAddr>)>,
    }

    impl Buffers {
        pub(super) fn new() -> Self {
            Buffers {
                bufs: (0..RECV_BATCH)
                    .map(|_| vec![0u8; RECV_BUFFER_BYTES])
                    .collect(),
                #[cfg(target_os = "linux")]
                headers: nix::sys::socket::MultiHeaders::preallocate(RECV_BATCH, None),
                received: Vec::with_capacity(RECV_BATCH),
            }
        }

        /// The packets the last [`Buffers::receive`] read, with an IP source: each one's
        /// buffer, length (the buffer's whole length when it was probably truncated) and
        /// source.
        pub(super) fn packets(&self) -> impl Iterator<Item = (&[u8], usize, SocketAddr)> {
            self.bufs
                .iter()
                .zip(&self.received)
                .filter_map(|(buf, (len, source))| Some((buf.as_slice(), *len, (*source)?)))
        }

        /// Reads up to [`RECV_BATCH`] waiting packets from `socket` without waiting (see
        /// [`Buffers::packets`]); whether the socket may hold more. A call that read fewer than
        /// it asked for found the socket empty: tokio is told (its readiness cleared) as after
        /// a read that would block, so the task waits for the next packet instead of asking
        /// again. A packet arriving meanwhile is not missed: tokio clears the readiness only if
        /// no event came since it handed it out, and an event still in the kernel's queue sets
        /// it again.
        pub(super) fn receive(&mut self, socket: &UdpSocket) -> bool {
            self.received.clear();
            socket
                .try_io(Interest::READABLE, || {
                    self.read(socket)?;
                    if self.received.len() < RECV_BATCH {
                        Err(ErrorKind::WouldBlock.into())
                    } else {
                        Ok(())
                    }
                })
                .is_ok()
        }

        #[cfg(target_os = "linux")]
        fn read(&mut self, socket: &UdpSocket) -> std::io::Result<()> {
            use nix::sys::socket::{recvmmsg, AddressFamily, MsgFlags, SockaddrLike};
            use std::os::fd::AsRawFd;
            let mut slices: [[IoSliceMut<'_>; 1]; RECV_BATCH] = {
                let [a, b] = &mut self.bufs[..] else {
                    return Err(ErrorKind::InvalidInput.into());
                };
                [[IoSliceMut::new(a)], [IoSliceMut::new(b)]]
            };
            let results = recvmmsg(
                socket.as_raw_fd(),
                &mut self.headers,
                slices.iter_mut(),
                MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map_err(std::io::Error::from)?;
            for message in results {
                let source = message.address.and_then(|a| match a.family() {
                    Some(AddressFamily::Inet) => {
                        a.as_sockaddr_in().map(|v4| SocketAddr::V4((*v4).into()))
                    }
                    Some(AddressFamily::Inet6) => {
                        a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
                    }
                    _ => None,
                });
                self.received.push((message.bytes, source));
            }
            Ok(())
        }

        #[cfg(not(target_os = "linux"))]
        fn read(&mut self, socket: &UdpSocket) -> std::io::Result<()> {
            for buf in &mut self.bufs {
                match socket.try_recv_from(buf) {
                    Ok((len, source)) => self.received.push((len, Some(source))),
                    Err(e) if e.kind() == ErrorKind::WouldBlock && !self.received.is_empty() => {
                        break
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
    }

    #[cfg(test)]
    mod tests {
        use std::time::Duration;

        use super::*;

        #[tokio::test]
        async fn a_burst_is_read_two_at_a_time_and_the_last_read_tells_the_socket_is_empty() {
            let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let to = rx.local_addr().unwrap();
            for i in 0..5u8 {
                tx.send_to(&[i; 10], to).unwrap();
            }
            rx.readable().await.unwrap();
            let mut buffers = Buffers::new();
            let mut seen = Vec::new();
            let mut calls = Vec::new();
            loop {
                let more = buffers.receive(&rx);
                calls.push((buffers.packets().count(), more));
                for (buf, len, source) in buffers.packets() {
                    assert_eq!(len, 10);
                    assert_eq!(source, tx.local_addr().unwrap());
                    seen.push(buf[0]);
                }
                if !more {
                    break;
                }
            }
            // Two, two, then one and "empty": no call that reads nothing.
            assert_eq!(calls, [(2, true), (2, true), (1, false)]);
            assert_eq!(seen, [0, 1, 2, 3, 4]);
            // The readiness was cleared, and a packet sent now wakes the socket again.
            tx.send_to(&[9; 10], to).unwrap();
            tokio::time::timeout(Duration::from_secs(5), rx.readable())
                .await
                .unwrap()
                .unwrap();
            let more = buffers.receive(&rx);
            assert_eq!((buffers.packets().count(), more), (1, false));
            assert_eq!(buffers.packets().next().map(|(buf, _, _)| buf[0]), Some(9));
        }
    }
}
