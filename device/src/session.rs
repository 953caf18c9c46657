//! The device's side of an MBFP session, sans-IO: fed what happens on the connection and the
//! time, it says what to send, where to connect, and what the application should hear.
//!
//! [`DeviceSession`] logs in (`Hello`, with the resume token of the last session when it has
//! one), follows `Redirect`s to the owner node, keeps the session alive (`Ping` every keepalive
//! interval, the connection given up when nothing arrived for the idle timeout), answers the
//! gateway's `Ping`, keeps the freshest resume token (`Welcome`, `ResumeToken`), reconnects after
//! a loss with exponential backoff (seeded jitter) across the entry points, reconnects at once
//! when a node says it drains, and stops for good when the credentials are refused or another
//! login replaced the session. It numbers requests, allocates call refs for `Dial`, and keeps
//! the device's calls and their states (from `IncomingCall`, `CallEvent` and a resumed
//! `Welcome`).
//!
//! It reads no clock and does no I/O: the caller passes `now` to every input and drives the
//! outputs ([`DeviceSession::poll_action`], [`DeviceSession::poll_transmit`],
//! [`DeviceSession::poll_event`], [`DeviceSession::poll_timeout`]), as
//! `quinn_proto::Connection` is driven. [`crate::client`] is such a driver on tokio and quinn.
//! It does not touch media (see [`crate::media`]).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{
    Answer, CallState, Capabilities, Dial, Dtmf, Envelope, ErrorCode, GoodbyeReason, Hangup, Hello,
    Hold, KeyframeRequest, MediaOffer, Ping, Pong, Reject, Resume, SendText, Welcome,
};

/// What a session needs to log in and to come back.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The device's id (`thalamus device add`).
    pub device_id: String,
    /// Its secret.
    pub credential: String,
    /// What it can do.
    pub capabilities: Capabilities,
    /// Free text for the gateway's logs.
    pub software_version: String,
    /// Where to connect (`host:port` of gateway nodes, or of anything that redirects to
    /// them), tried in turn after failures.
    pub entry_points: Vec<String>,
    /// First wait before reconnecting after a failure; doubles with each failure in a row.
    pub backoff_initial: Duration,
    /// Longest wait before reconnecting.
    pub backoff_max: Duration,
    /// Longest time from asking for a connection to the `Welcome`.
    pub login_timeout: Duration,
    /// Redirects followed in a row before counting a failure.
    pub max_redirects: u32,
    /// Longest time of the first login at the address of the node just lost, when there are
    /// several entry points: it may be dead, or only cut off from this device, and the
    /// survivors may still redirect there until they see it gone. It is tried after the other
    /// entry points; later logins there get `login_timeout`.
    pub suspect_timeout: Duration,
}

impl SessionConfig {
    /// A configuration with the defaults: 0.5 s first backoff up to 30 s, 10 s to log in (1 s
    /// at the node just lost), 3 redirects in a row, no capabilities beyond PCMU and PCMA.
    pub fn new(
        device_id: impl Into<String>,
        credential: impl Into<String>,
        entry_points: Vec<String>,
    ) -> Self {
        Self {
            device_id: device_id.into(),
            credential: credential.into(),
            capabilities: Capabilities {
                audio_codecs: vec![
                    thalamus_proto::v1::AudioCodec::Pcmu as i32,
                    thalamus_proto::v1::AudioCodec::Pcma as i32,
                ],
                ..Default::default()
            },
            software_version: concat!("thalamus-device/", env!("CARGO_PKG_VERSION")).into(),
            entry_points,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            login_timeout: Duration::from_secs(10),
            max_redirects: 3,
            suspect_timeout: Duration::from_secs(1),
        }
    }
}

/// What the driver must do on the network.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a QUIC connection to `address` (`host:port`) and its control stream, then call
    /// [`DeviceSession::connected`] (or [`DeviceSession::connection_lost`] when it fails).
    Connect {
        /// Where.
        address: String,
    },
    /// Close the current connection (after sending what [`DeviceSession::poll_transmit`]
    /// gave).
    Disconnect,
}

/// What the application hears.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A connection is being opened.
    Connecting {
        /// Where.
        address: String,
        /// Connections opened since the last session went live (1 for the first).
        attempt: u32,
    },
    /// The connection is open; the login goes.
    Connected {
        /// Where.
        address: String,
    },
    /// The session is live (a new one, or the previous one resumed: `welcome.resumed`, with
    /// the calls that survived in `welcome.live_calls`).
    Live(Box<Welcome>),
    /// A node sent the device to another (its owner).
    Redirected {
        /// Where to.
        address: String,
        /// That node's id.
        node_id: String,
    },
    /// The connection is gone; the session reconnects after `retry_in` (`None`: it stopped).
    Disconnected {
        /// Why.
        reason: String,
        /// The QUIC application close code the gateway closed the connection with
        /// (docs/protocol.md section 5), when it did.
        close_code: Option<u32>,
        /// Failed attempts in a row (1 after a live session was lost).
        attempt: u32,
        /// When it tries again.
        retry_in: Option<Duration>,
        /// Where it tries again.
        next: Option<String>,
    },
    /// The gateway refused the login (bad credentials, unknown device): the session stopped.
    Refused {
        /// The gateway's error code.
        code: i32,
        /// Its message.
        message: String,
    },
    /// A frame for the application: a call event, an incoming call, a text, an error answering
    /// one of its requests (or the login), a `Goodbye`, the `Pong` answering a keepalive, a
    /// presence update... (not `Ping`, `ResumeToken`, the login's `Welcome` or a `Redirect`,
    /// which the session handles).
    Frame(Box<Envelope>),
    /// The session is over, and why.
    Closed(ClosedBy),
}

/// Why a session is over.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    /// The application closed it.
    Application,
    /// The gateway refused the credentials.
    Unauthenticated,
    /// Another login of the same device replaced it.
    Replaced,
    /// There is nowhere to connect.
    NoEntryPoint,
}

/// Why a command was not sent.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The session is not live (connecting, waiting to reconnect, or closed).
    #[error("the session is not live")]
    NotLive,
    /// No such call.
    #[error("no call {0}")]
    UnknownCall(u32),
    /// Every call ref is in use.
    #[error("no call ref left")]
    NoCallRef,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Not started.
    Idle,
    /// Waiting for the connection (and its control stream) to open.
    Connecting { deadline: Instant },
    /// `Hello` sent, waiting for its answer.
    LoggingIn { hello: u64, deadline: Instant },
    /// Logged in.
    Live {
        last_heard: Instant,
        next_ping: Instant,
    },
    /// Waiting to reconnect.
    Backoff { until: Instant },
    /// Over.
    Closed,
}

/// The device's MBFP session (see the module notes).
#[derive(Debug)]
pub struct DeviceSession {
    config: SessionConfig,
    state: State,
    /// The entry point the next connection goes to (an index, or a redirect's address).
    next_address: String,
    entry: usize,
    /// The address of the current (or last) connection.
    address: String,
    /// The address of the live connection last lost (several entry points only): passed over
    /// by the next attempt, and given `suspect_timeout` at the first login there.
    suspect: Option<String>,
    resume_token: Vec<u8>,
    keepalive: Duration,
    idle_timeout: Duration,
    failures: u32,
    redirects: u32,
    attempts: u32,
    next_request: u64,
    next_call_ref: u32,
    ping_nonce: u64,
    calls: BTreeMap<u32, CallState>,
    rng: u64,
    actions: VecDeque<Action>,
    transmits: VecDeque<Envelope>,
    events: VecDeque<Event>,
}

/// Calls a device holds at once that it tracks (more are refused by the gateway long before).
const MAX_TRACKED_CALLS: usize = 256;
/// Keepalive and idle timeout before the first `Welcome` says otherwise (docs/protocol.md).
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);
const DEFAULT_IDLE: Duration = Duration::from_secs(30);
/// Frames queued for sending at most; beyond, the oldest command frames are dropped (a driver
/// that does not drain its transmits has lost its connection anyway).
const MAX_QUEUED_FRAMES: usize = 1024;
/// Events queued for the application at most (the oldest dropped beyond).
const MAX_QUEUED_EVENTS: usize = 4096;

impl DeviceSession {
    /// A session with `config`; `seed` makes the backoff jitter repeatable. Nothing happens
    /// until [`DeviceSession::start`].
    pub fn new(config: SessionConfig, seed: u64) -> Self {
        let first = config.entry_points.first().cloned().unwrap_or_default();
        Self {
            config,
            state: State::Idle,
            next_address: first.clone(),
            entry: 0,
            address: first,
            suspect: None,
            resume_token: Vec::new(),
            keepalive: DEFAULT_KEEPALIVE,
            idle_timeout: DEFAULT_IDLE,
            failures: 0,
            redirects: 0,
            attempts: 0,
            next_request: 0,
            next_call_ref: 0,
            ping_nonce: 0,
            calls: BTreeMap::new(),
            // xorshift must not start at 0.
            rng: seed | 1,
            actions: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Starts the first connection.
    pub fn start(&mut self, now: Instant) {
        if self.state == State::Idle {
            if self.config.entry_points.is_empty() {
                self.stop("no entry point configured");
                return;
            }
            self.connect(now);
        }
    }

    /// Whether the session is logged in now.
    pub fn is_live(&self) -> bool {
        matches!(self.state, State::Live { .. })
    }

    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The resume token the next login presents (empty before the first `Welcome`).
    pub fn resume_token(&self) -> &[u8] {
        &self.resume_token
    }

    /// The device's calls and their last known states.
    pub fn calls(&self) -> &BTreeMap<u32, CallState> {
        &self.calls
    }

    /// The next thing to do on the network.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next frame to send on the control stream.
    pub fn poll_transmit(&mut self) -> Option<Envelope> {
        self.transmits.pop_front()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`DeviceSession::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Connecting { deadline } | State::LoggingIn { deadline, .. } => Some(*deadline),
            State::Live {
                last_heard,
                next_ping,
            } => Some((*next_ping).min(*last_heard + self.idle_timeout)),
            State::Backoff { until } => Some(*until),
            State::Idle | State::Closed => None,
        }
    }

    /// Time passed: a login that took too long fails, a silent connection is given up, a
    /// keepalive is due, a backoff is over.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state.clone() {
            State::Connecting { deadline } | State::LoggingIn { deadline, .. } => {
                if now >= deadline {
                    self.actions.push_back(Action::Disconnect);
                    self.lost(now, "login timed out".into());
                }
            }
            State::Live {
                last_heard,
                next_ping,
            } => {
                if now >= last_heard + self.idle_timeout {
                    self.actions.push_back(Action::Disconnect);
                    self.lost(now, "nothing heard from the gateway".into());
                } else if now >= next_ping {
                    self.ping_nonce = self.ping_nonce.wrapping_add(1);
                    let nonce = self.ping_nonce;
                    self.send_body(Body::Ping(Ping { nonce }));
                    self.state = State::Live {
                        last_heard,
                        next_ping: now + self.keepalive,
                    };
                }
            }
            State::Backoff { until } => {
                if now >= until {
                    self.connect(now);
                }
            }
            State::Idle | State::Closed => {}
        }
    }

    /// The connection asked for by [`Action::Connect`] is open with its control stream: the
    /// login goes.
    pub fn connected(&mut self, now: Instant) {
        let State::Connecting { deadline } = self.state else {
            return;
        };
        self.push_event(Event::Connected {
            address: self.address.clone(),
        });
        let hello = Hello {
            device_id: self.config.device_id.clone(),
            credential: self.config.credential.clone(),
            capabilities: Some(self.config.capabilities.clone()),
            software_version: self.config.software_version.clone(),
            resume_token: self.resume_token.clone(),
        };
        let id = self.send_body(Body::Hello(hello));
        self.state = State::LoggingIn {
            hello: id,
            deadline: deadline.max(now),
        };
    }

    /// The connection failed or closed (`reason` for the application).
    pub fn connection_lost(&mut self, now: Instant, reason: impl Into<String>) {
        if matches!(
            self.state,
            State::Closed | State::Idle | State::Backoff { .. }
        ) {
            return;
        }
        self.lost_with(now, reason.into(), None);
    }

    /// The gateway closed the connection with QUIC application close `code`: a session that
    /// was replaced, or whose credentials were refused, stops (even when the frame saying so
    /// did not arrive); any other close is a loss.
    pub fn connection_closed(&mut self, now: Instant, code: u32, reason: impl Into<String>) {
        if matches!(
            self.state,
            State::Closed | State::Idle | State::Backoff { .. }
        ) {
            return;
        }
        let reason = reason.into();
        match code {
            thalamus_proto::close_code::REPLACED => {
                self.finish(reason, Some(code), ClosedBy::Replaced);
            }
            thalamus_proto::close_code::UNAUTHENTICATED => {
                self.push_event(Event::Refused {
                    code: ErrorCode::Unauthenticated as i32,
                    message: reason.clone(),
                });
                self.finish(reason, Some(code), ClosedBy::Unauthenticated);
            }
            _ => self.lost_with(now, reason, Some(code)),
        }
    }

    /// A frame from the gateway.
    pub fn frame(&mut self, now: Instant, env: Envelope) {
        match self.state.clone() {
            State::LoggingIn { hello, .. } => self.login_answer(now, hello, env),
            State::Live { next_ping, .. } => {
                self.state = State::Live {
                    last_heard: now,
                    next_ping,
                };
                self.live_frame(now, env);
            }
            State::Idle | State::Connecting { .. } | State::Backoff { .. } | State::Closed => {}
        }
    }

    /// Closes the session for good: `Goodbye`, then the connection is closed.
    pub fn close(&mut self) {
        if self.state == State::Closed {
            return;
        }
        if self.is_live() {
            self.send_body(Body::Goodbye(thalamus_proto::v1::Goodbye {
                reason: GoodbyeReason::Unspecified as i32,
                message: "closed by the device".into(),
            }));
        }
        if !matches!(self.state, State::Idle | State::Backoff { .. }) {
            self.actions.push_back(Action::Disconnect);
        }
        self.state = State::Closed;
        self.push_event(Event::Closed(ClosedBy::Application));
    }

    /// Sends any request `body` in the live session; returns its request id.
    pub fn send(&mut self, body: Body) -> Result<u64, CommandError> {
        if !self.is_live() {
            return Err(CommandError::NotLive);
        }
        Ok(self.send_body(body))
    }

    /// Places a call to `target` (a SIP URI or an address book alias) offering `media`;
    /// returns the call's ref and the request id.
    pub fn dial(
        &mut self,
        target: impl Into<String>,
        media: MediaOffer,
    ) -> Result<(u32, u64), CommandError> {
        if !self.is_live() {
            return Err(CommandError::NotLive);
        }
        let call_ref = self.free_call_ref().ok_or(CommandError::NoCallRef)?;
        let id = self.send_body(Body::Dial(Dial {
            call_ref,
            target: target.into(),
            media: Some(media),
            headers: Default::default(),
        }));
        self.calls.insert(call_ref, CallState::Trying);
        Ok((call_ref, id))
    }

    /// Answers incoming call `call_ref` with `media`.
    pub fn answer(&mut self, call_ref: u32, media: MediaOffer) -> Result<u64, CommandError> {
        self.known_call(call_ref)?;
        self.send(Body::Answer(Answer {
            call_ref,
            media: Some(media),
        }))
    }

    /// Rejects incoming call `call_ref` (`sip_status` 0: 486).
    pub fn reject(&mut self, call_ref: u32, sip_status: u32) -> Result<u64, CommandError> {
        self.known_call(call_ref)?;
        self.send(Body::Reject(Reject {
            call_ref,
            sip_status,
            reason: String::new(),
        }))
    }

    /// Hangs call `call_ref` up.
    pub fn hangup(&mut self, call_ref: u32) -> Result<u64, CommandError> {
        self.known_call(call_ref)?;
        self.send(Body::Hangup(Hangup { call_ref }))
    }

    /// Holds call `call_ref` (`on`), or resumes it.
    pub fn hold(&mut self, call_ref: u32, on: bool) -> Result<u64, CommandError> {
        self.known_call(call_ref)?;
        if on {
            self.send(Body::Hold(Hold { call_ref }))
        } else {
            self.send(Body::Resume(Resume { call_ref }))
        }
    }

    /// Sends DTMF `digit` (`0`-`9`, `*`, `#`, `A`-`D`) in call `call_ref` for `duration_ms`
    /// (0: the gateway's default).
    pub fn dtmf(
        &mut self,
        call_ref: u32,
        digit: char,
        duration_ms: u32,
    ) -> Result<u64, CommandError> {
        self.known_call(call_ref)?;
        self.send(Body::Dtmf(Dtmf {
            call_ref,
            digit: digit.to_string(),
            duration_ms,
        }))
    }

    /// Asks the call's remote party for a video key frame (revision 4; the gateway sends it an
    /// RTCP PLI). No answer comes; the gateway passes at most one per 200 ms.
    pub fn request_keyframe(&mut self, call_ref: u32) -> Result<u64, CommandError> {
        self.known_call(call_ref)?;
        self.send(Body::KeyframeRequest(KeyframeRequest { call_ref }))
    }

    /// Sends a text to `to` (a SIP URI or an alias).
    pub fn send_text(
        &mut self,
        to: impl Into<String>,
        text: impl Into<String>,
    ) -> Result<u64, CommandError> {
        self.send(Body::SendText(SendText {
            to: to.into(),
            content_type: "text/plain".into(),
            body: text.into().into_bytes(),
        }))
    }

    fn known_call(&self, call_ref: u32) -> Result<(), CommandError> {
        if self.calls.contains_key(&call_ref) {
            Ok(())
        } else {
            Err(CommandError::UnknownCall(call_ref))
        }
    }

    /// The next call ref not in use (1 and up, wrapping; 0 is no call).
    fn free_call_ref(&mut self) -> Option<u32> {
        if self.calls.len() >= MAX_TRACKED_CALLS {
            return None;
        }
        for _ in 0..=MAX_TRACKED_CALLS {
            self.next_call_ref = self.next_call_ref.wrapping_add(1).max(1);
            if !self.calls.contains_key(&self.next_call_ref) {
                return Some(self.next_call_ref);
            }
        }
        None
    }

    fn send_body(&mut self, body: Body) -> u64 {
        self.next_request += 1;
        let id = self.next_request;
        if self.transmits.len() >= MAX_QUEUED_FRAMES {
            self.transmits.pop_front();
        }
        self.transmits.push_back(Envelope {
            request_id: id,
            body: Some(body),
        });
        id
    }

    fn push_event(&mut self, event: Event) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    fn connect(&mut self, now: Instant) {
        self.attempts += 1;
        self.address = self.next_address.clone();
        self.actions.push_back(Action::Connect {
            address: self.address.clone(),
        });
        self.push_event(Event::Connecting {
            address: self.address.clone(),
            attempt: self.attempts,
        });
        // One brief try at the node just lost (a redirect there included); after it, that
        // node gets the full timeout again: it may be alive behind a slow path.
        let timeout = if self.suspect.as_ref() == Some(&self.address) {
            self.suspect = None;
            self.config.suspect_timeout.min(self.config.login_timeout)
        } else {
            self.config.login_timeout
        };
        self.state = State::Connecting {
            deadline: now + timeout,
        };
    }

    fn login_answer(&mut self, now: Instant, hello: u64, env: Envelope) {
        match env.body {
            Some(Body::Welcome(welcome)) if env.request_id == hello => {
                self.resume_token = welcome.resume_token.clone();
                if welcome.keepalive_interval_ms > 0 {
                    self.keepalive = Duration::from_millis(welcome.keepalive_interval_ms.into());
                }
                if welcome.idle_timeout_ms > 0 {
                    self.idle_timeout = Duration::from_millis(welcome.idle_timeout_ms.into());
                }
                // The truth about the calls: those that survived, or none.
                self.calls.clear();
                for call in welcome.live_calls.iter().take(MAX_TRACKED_CALLS) {
                    let state = CallState::try_from(call.state).unwrap_or(CallState::Unspecified);
                    self.calls.insert(call.call_ref, state);
                }
                self.failures = 0;
                self.redirects = 0;
                self.attempts = 0;
                self.suspect = None;
                self.state = State::Live {
                    last_heard: now,
                    next_ping: now + self.keepalive,
                };
                self.push_event(Event::Live(Box::new(welcome)));
            }
            Some(Body::Redirect(r)) => {
                self.push_event(Event::Redirected {
                    address: r.address.clone(),
                    node_id: r.node_id,
                });
                self.actions.push_back(Action::Disconnect);
                self.redirects += 1;
                if self.redirects > self.config.max_redirects || r.address.is_empty() {
                    self.redirects = 0;
                    self.lost(now, "too many redirects".into());
                } else {
                    self.next_address = r.address;
                    self.connect(now);
                }
            }
            Some(Body::Error(e)) if e.code == ErrorCode::Unauthenticated as i32 => {
                self.push_event(Event::Frame(Box::new(Envelope {
                    request_id: env.request_id,
                    body: Some(Body::Error(e.clone())),
                })));
                self.actions.push_back(Action::Disconnect);
                self.push_event(Event::Refused {
                    code: e.code,
                    message: e.message.clone(),
                });
                self.finish(
                    format!("login refused: {}", e.message),
                    None,
                    ClosedBy::Unauthenticated,
                );
            }
            Some(Body::Error(e)) => {
                // Any other refusal of the login (rate limited, busy, a limit): try again later.
                self.push_event(Event::Frame(Box::new(Envelope {
                    request_id: env.request_id,
                    body: Some(Body::Error(e.clone())),
                })));
                self.actions.push_back(Action::Disconnect);
                self.lost(now, format!("login refused: {}", e.message));
            }
            Some(Body::Ping(p)) => {
                self.send_body(Body::Pong(Pong { nonce: p.nonce }));
            }
            Some(Body::Goodbye(g)) => {
                let message = g.message.clone();
                self.push_event(Event::Frame(Box::new(Envelope {
                    request_id: env.request_id,
                    body: Some(Body::Goodbye(g)),
                })));
                self.actions.push_back(Action::Disconnect);
                self.lost(now, format!("goodbye before welcome: {message}"));
            }
            // Anything else before the Welcome is not for this device yet.
            _ => {}
        }
    }

    fn live_frame(&mut self, now: Instant, env: Envelope) {
        match &env.body {
            Some(Body::Ping(p)) => {
                let nonce = p.nonce;
                self.send_body(Body::Pong(Pong { nonce }));
            }
            // The answer to a keepalive: the application may want to see it (a round trip).
            Some(Body::Pong(_)) => self.push_event(Event::Frame(Box::new(env))),
            Some(Body::ResumeToken(t)) => {
                if !t.token.is_empty() {
                    self.resume_token = t.token.clone();
                }
            }
            Some(Body::Goodbye(g)) => {
                let reason =
                    GoodbyeReason::try_from(g.reason).unwrap_or(GoodbyeReason::Unspecified);
                let message = format!("the node said goodbye: {}", g.message);
                self.push_event(Event::Frame(Box::new(env.clone())));
                self.actions.push_back(Action::Disconnect);
                match reason {
                    GoodbyeReason::Replaced => {
                        self.finish(message, None, ClosedBy::Replaced);
                    }
                    // The node drains or stops: log in again at once (its owner takes over,
                    // perhaps by a redirect), resuming the session.
                    GoodbyeReason::Draining | GoodbyeReason::Shutdown => {
                        self.push_event(Event::Disconnected {
                            reason: message,
                            close_code: None,
                            attempt: 0,
                            retry_in: Some(Duration::ZERO),
                            next: Some(self.address.clone()),
                        });
                        self.next_address = self.address.clone();
                        self.connect(now);
                    }
                    GoodbyeReason::Idle | GoodbyeReason::Unspecified => {
                        self.lost(now, message);
                    }
                }
            }
            Some(Body::Redirect(r)) => {
                let (address, node_id) = (r.address.clone(), r.node_id.clone());
                self.push_event(Event::Redirected {
                    address: address.clone(),
                    node_id,
                });
                self.actions.push_back(Action::Disconnect);
                self.next_address = address;
                self.connect(now);
            }
            Some(Body::IncomingCall(c)) => {
                if self.calls.len() < MAX_TRACKED_CALLS {
                    self.calls.insert(c.call_ref, CallState::Ringing);
                }
                self.push_event(Event::Frame(Box::new(env)));
            }
            Some(Body::CallEvent(c)) => {
                let state = CallState::try_from(c.state).unwrap_or(CallState::Unspecified);
                if state == CallState::Ended {
                    self.calls.remove(&c.call_ref);
                } else if let Some(s) = self.calls.get_mut(&c.call_ref) {
                    *s = state;
                }
                self.push_event(Event::Frame(Box::new(env)));
            }
            _ => self.push_event(Event::Frame(Box::new(env))),
        }
    }

    fn lost(&mut self, now: Instant, reason: String) {
        self.lost_with(now, reason, None);
    }

    /// The connection is gone: reconnect after the backoff, at the next entry point. With
    /// several entry points, the node of a live session just lost is suspect (see
    /// [`SessionConfig::suspect_timeout`]): the first attempt passes over entry points at its
    /// address, and any login there gets the short timeout until a session is live again.
    fn lost_with(&mut self, now: Instant, reason: String, close_code: Option<u32>) {
        let was_live = self.is_live();
        self.failures = self.failures.saturating_add(1);
        let wait = self.backoff();
        let count = self.config.entry_points.len().max(1);
        if was_live && count > 1 {
            self.suspect = Some(self.address.clone());
        }
        // Right after the loss the suspect's entry points are passed over; later rounds come
        // back to them (with the short timeout), so a node that only restarted is found again.
        for _ in 0..count {
            self.entry = (self.entry + 1) % count;
            let at = self.config.entry_points.get(self.entry);
            if !was_live || at.is_none() || at != self.suspect.as_ref() {
                break;
            }
        }
        self.next_address = self
            .config
            .entry_points
            .get(self.entry)
            .cloned()
            .unwrap_or_else(|| self.address.clone());
        self.push_event(Event::Disconnected {
            reason,
            close_code,
            attempt: self.failures,
            retry_in: Some(wait),
            next: Some(self.next_address.clone()),
        });
        self.state = State::Backoff { until: now + wait };
    }

    /// The session stops for good.
    fn finish(&mut self, reason: String, close_code: Option<u32>, by: ClosedBy) {
        self.push_event(Event::Disconnected {
            reason,
            close_code,
            attempt: self.failures,
            retry_in: None,
            next: None,
        });
        self.state = State::Closed;
        self.push_event(Event::Closed(by));
    }

    fn stop(&mut self, reason: &str) {
        self.finish(reason.into(), None, ClosedBy::NoEntryPoint);
    }

    /// The wait before the next attempt: `initial * 2^(failures-1)` up to the maximum, minus up
    /// to a fifth at random (so a fleet that lost its node does not come back in step).
    fn backoff(&mut self) -> Duration {
        let exp = self.failures.saturating_sub(1).min(20);
        let full = self
            .config
            .backoff_initial
            .saturating_mul(1u32 << exp)
            .min(self.config.backoff_max);
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let fifth = full / 5;
        let nanos = u64::try_from(fifth.as_nanos()).unwrap_or(u64::MAX);
        let jitter = if nanos == 0 { 0 } else { self.rng % nanos };
        full.saturating_sub(Duration::from_nanos(jitter))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use thalamus_proto::v1::{CallEvent, IncomingCall, LiveCall, Redirect, ResumeToken};

    fn config() -> SessionConfig {
        let mut c = SessionConfig::new("dev-1", "s3cret", vec!["a:1".into(), "b:1".into()]);
        c.backoff_initial = Duration::from_millis(100);
        c.backoff_max = Duration::from_secs(2);
        c
    }

    fn drain_actions(s: &mut DeviceSession) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn drain_tx(s: &mut DeviceSession) -> Vec<Envelope> {
        std::iter::from_fn(|| s.poll_transmit()).collect()
    }

    fn drain_events(s: &mut DeviceSession) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn welcome(request_id: u64, token: &[u8], resumed: bool, calls: Vec<LiveCall>) -> Envelope {
        Envelope {
            request_id,
            body: Some(Body::Welcome(Welcome {
                session_id: "0123".into(),
                resume_token: token.to_vec(),
                keepalive_interval_ms: 5_000,
                idle_timeout_ms: 15_000,
                resumed,
                live_calls: calls,
                ..Default::default()
            })),
        }
    }

    fn env(body: Body) -> Envelope {
        Envelope {
            request_id: 0,
            body: Some(body),
        }
    }

    /// Starts and logs in at `t0`; returns the session.
    fn live(t0: Instant) -> DeviceSession {
        let mut s = DeviceSession::new(config(), 7);
        s.start(t0);
        assert_eq!(
            drain_actions(&mut s),
            vec![Action::Connect {
                address: "a:1".into()
            }]
        );
        s.connected(t0);
        let hello = drain_tx(&mut s);
        let id = hello[0].request_id;
        s.frame(t0, welcome(id, b"tok-1", false, vec![]));
        assert!(s.is_live());
        drain_events(&mut s);
        s
    }

    #[test]
    fn login_sends_hello_and_goes_live_on_its_welcome() {
        let t0 = Instant::now();
        let mut s = DeviceSession::new(config(), 1);
        s.start(t0);
        assert!(matches!(
            drain_events(&mut s)[..],
            [Event::Connecting { attempt: 1, .. }]
        ));
        s.connected(t0);
        let tx = drain_tx(&mut s);
        let Some(Body::Hello(h)) = &tx[0].body else {
            panic!("{tx:?}")
        };
        assert_eq!(
            (h.device_id.as_str(), h.credential.as_str()),
            ("dev-1", "s3cret")
        );
        assert!(h.resume_token.is_empty());
        // A Welcome answering another request is not the login's.
        s.frame(t0, welcome(tx[0].request_id + 5, b"x", false, vec![]));
        assert!(!s.is_live());
        s.frame(t0, welcome(tx[0].request_id, b"tok-1", false, vec![]));
        assert!(s.is_live());
        assert!(matches!(
            &drain_events(&mut s)[..],
            [Event::Connected { .. }, Event::Live(w)] if !w.resumed
        ));
        assert_eq!(s.resume_token(), b"tok-1");
        // Keepalive from the Welcome: a Ping 5 s on, nothing sooner.
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        s.handle_timeout(t0 + Duration::from_secs(5));
        assert!(matches!(
            drain_tx(&mut s)[..],
            [Envelope {
                body: Some(Body::Ping(_)),
                ..
            }]
        ));
        // The gateway's Ping is answered with its nonce.
        s.frame(
            t0 + Duration::from_secs(6),
            env(Body::Ping(Ping { nonce: 42 })),
        );
        assert!(matches!(
            drain_tx(&mut s)[..],
            [Envelope {
                body: Some(Body::Pong(Pong { nonce: 42 })),
                ..
            }]
        ));
    }

    #[test]
    fn bad_credentials_stop_the_session_and_a_slow_login_is_retried() {
        let t0 = Instant::now();
        let mut s = DeviceSession::new(config(), 1);
        s.start(t0);
        drain_actions(&mut s);
        s.connected(t0);
        let id = drain_tx(&mut s)[0].request_id;
        s.frame(
            t0,
            Envelope {
                request_id: id,
                body: Some(Body::Error(thalamus_proto::v1::Error {
                    code: ErrorCode::Unauthenticated as i32,
                    message: "bad credential".into(),
                    request_id: id,
                })),
            },
        );
        assert!(s.is_closed());
        assert_eq!(drain_actions(&mut s), vec![Action::Disconnect]);
        let ev = drain_events(&mut s);
        assert!(matches!(ev[3], Event::Refused { .. }), "{ev:?}");
        assert!(
            matches!(&ev[2], Event::Frame(f) if matches!(f.body, Some(Body::Error(_)))),
            "{ev:?}"
        );
        assert_eq!(ev.last(), Some(&Event::Closed(ClosedBy::Unauthenticated)));
        assert_eq!(s.poll_timeout(), None);

        // A login that never gets its Welcome fails after the login timeout, and the next
        // attempt goes to the next entry point after the backoff.
        let mut s = DeviceSession::new(config(), 1);
        s.start(t0);
        drain_actions(&mut s);
        s.connected(t0);
        let deadline = t0 + Duration::from_secs(10);
        assert_eq!(s.poll_timeout(), Some(deadline));
        s.handle_timeout(deadline);
        assert_eq!(drain_actions(&mut s), vec![Action::Disconnect]);
        let retry = s.poll_timeout().unwrap();
        assert!(retry > deadline && retry <= deadline + Duration::from_millis(100));
        s.handle_timeout(retry);
        assert_eq!(
            drain_actions(&mut s),
            vec![Action::Connect {
                address: "b:1".into()
            }]
        );
    }

    #[test]
    fn a_lost_connection_is_retried_with_growing_backoff_and_the_session_resumed() {
        let t0 = Instant::now();
        let mut s = live(t0);
        s.connection_lost(t0, "reset");
        let mut waits = Vec::new();
        let mut now = t0;
        for _ in 0..6 {
            let ev = drain_events(&mut s);
            let Some(Event::Disconnected {
                retry_in: Some(wait),
                ..
            }) = ev.last().cloned()
            else {
                panic!("{ev:?}")
            };
            waits.push(wait);
            now += wait;
            s.handle_timeout(now);
            assert!(matches!(
                drain_actions(&mut s)[..],
                [Action::Connect { .. }]
            ));
            // The connection fails again.
            s.connection_lost(now, "refused");
        }
        // Doubling (less up to a fifth), capped at 2 s.
        for pair in waits.windows(2) {
            assert!(
                pair[1] >= pair[0] || pair[1] >= Duration::from_millis(1600),
                "{waits:?}"
            );
        }
        assert!(waits[0] <= Duration::from_millis(100) && waits[0] >= Duration::from_millis(80));
        assert!(
            waits.iter().all(|w| *w <= Duration::from_secs(2)),
            "{waits:?}"
        );
        assert!(waits[5] >= Duration::from_millis(1600), "{waits:?}");
        // Then it connects and presents the resume token; the Welcome lists a call that
        // survived, which the session now knows.
        let ev = drain_events(&mut s);
        let Some(Event::Disconnected {
            retry_in: Some(wait),
            ..
        }) = ev.last().cloned()
        else {
            panic!("{ev:?}")
        };
        now += wait;
        s.handle_timeout(now);
        drain_actions(&mut s);
        s.connected(now);
        let hello = drain_tx(&mut s);
        let Some(Body::Hello(h)) = &hello[0].body else {
            panic!()
        };
        assert_eq!(h.resume_token, b"tok-1");
        s.frame(
            now,
            welcome(
                hello[0].request_id,
                b"tok-2",
                true,
                vec![LiveCall {
                    call_ref: 9,
                    remote_uri: "sip:bob@example.org".into(),
                    state: CallState::Answered as i32,
                }],
            ),
        );
        assert_eq!(s.calls().get(&9), Some(&CallState::Answered));
        assert!(matches!(
            &drain_events(&mut s)[..],
            [Event::Connecting { .. }, Event::Connected { .. }, Event::Live(w)] if w.resumed
        ));
        // A fresh ResumeToken replaces the Welcome's.
        s.frame(
            now,
            env(Body::ResumeToken(ResumeToken {
                token: b"tok-3".to_vec(),
                valid_for_secs: 300,
            })),
        );
        assert_eq!(s.resume_token(), b"tok-3");
        // The next loss waits the first backoff again.
        s.connection_lost(now, "reset");
        let ev = drain_events(&mut s);
        assert!(matches!(
            ev.last(),
            Some(Event::Disconnected { retry_in: Some(w), .. }) if *w <= Duration::from_millis(100)
        ));
    }

    /// After a live session is lost, its node is suspect: the first attempt goes elsewhere,
    /// a redirect back to it gets the short timeout once, and a later round tries it again
    /// with the full one.
    #[test]
    fn the_node_just_lost_is_tried_last_and_briefly() {
        let t0 = Instant::now();
        let mut c = SessionConfig::new(
            "dev-1",
            "s3cret",
            vec!["a:1".into(), "b:1".into(), "c:1".into()],
        );
        c.backoff_initial = Duration::from_millis(100);
        let mut s = DeviceSession::new(c, 3);
        let login = |s: &mut DeviceSession, now: Instant| -> Option<Envelope> {
            s.connected(now);
            drain_tx(s).into_iter().next()
        };
        let connects = |s: &mut DeviceSession| -> Vec<String> {
            drain_actions(s)
                .into_iter()
                .filter_map(|a| match a {
                    Action::Connect { address } => Some(address),
                    Action::Disconnect => None,
                })
                .collect()
        };
        let redirect_to_c = |request_id| Envelope {
            request_id,
            body: Some(Body::Redirect(Redirect {
                address: "c:1".into(),
                node_id: "node-c".into(),
            })),
        };
        // Logged in through a:1, redirected to its owner c:1.
        s.start(t0);
        assert_eq!(connects(&mut s), vec!["a:1"]);
        let hello = login(&mut s, t0).unwrap();
        s.frame(t0, redirect_to_c(hello.request_id));
        assert_eq!(connects(&mut s), vec!["c:1"]);
        let hello = login(&mut s, t0).unwrap();
        s.frame(t0, welcome(hello.request_id, b"tok", false, vec![]));
        assert!(s.is_live());
        // c:1 dies. The next attempt goes to b:1 with the full login timeout...
        s.connection_lost(t0, "reset");
        let mut now = s.poll_timeout().unwrap();
        s.handle_timeout(now);
        assert_eq!(connects(&mut s), vec!["b:1"]);
        assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(10)));
        // ...which still redirects to c:1: that login may take 1 s only.
        let hello = login(&mut s, now).unwrap();
        s.frame(now, redirect_to_c(hello.request_id));
        assert_eq!(connects(&mut s), vec!["c:1"]);
        assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(1)));
        now += Duration::from_secs(1);
        s.handle_timeout(now);
        // Then on around the entry points: c:1 among them again, with the full timeout now
        // (it may be alive behind a slow path).
        let mut tried = Vec::new();
        for _ in 0..3 {
            now = s.poll_timeout().unwrap();
            s.handle_timeout(now);
            let to = connects(&mut s);
            let deadline = s.poll_timeout().unwrap();
            tried.push((to[0].clone(), deadline.saturating_duration_since(now)));
            s.connection_lost(now, "refused");
            drain_actions(&mut s);
        }
        assert_eq!(
            tried,
            vec![
                ("c:1".to_string(), Duration::from_secs(10)),
                ("a:1".to_string(), Duration::from_secs(10)),
                ("b:1".to_string(), Duration::from_secs(10)),
            ]
        );
        // Live again: nothing is suspect any more.
        now = s.poll_timeout().unwrap();
        s.handle_timeout(now);
        assert_eq!(connects(&mut s), vec!["c:1"]);
        let hello = login(&mut s, now).unwrap();
        s.frame(now, welcome(hello.request_id, b"tok-2", true, vec![]));
        assert!(s.is_live());
        assert_eq!(s.suspect, None);
    }

    #[test]
    fn a_silent_gateway_is_given_up_after_the_idle_timeout() {
        let t0 = Instant::now();
        let mut s = live(t0);
        // Pings go every 5 s; nothing comes back for 15 s.
        let mut now = t0;
        while !matches!(s.state, State::Backoff { .. }) {
            now = s.poll_timeout().unwrap();
            s.handle_timeout(now);
            assert!(now <= t0 + Duration::from_secs(15));
        }
        assert_eq!(now, t0 + Duration::from_secs(15));
        assert!(drain_actions(&mut s).contains(&Action::Disconnect));
    }

    #[test]
    fn redirects_are_followed_a_bounded_number_of_times() {
        let t0 = Instant::now();
        let mut s = DeviceSession::new(config(), 1);
        s.start(t0);
        drain_actions(&mut s);
        for n in 0..4 {
            s.connected(t0);
            let id = drain_tx(&mut s)[0].request_id;
            s.frame(
                t0,
                Envelope {
                    request_id: id,
                    body: Some(Body::Redirect(Redirect {
                        address: format!("owner-{n}:1"),
                        node_id: format!("node-{n}"),
                    })),
                },
            );
            let actions = drain_actions(&mut s);
            if n < 3 {
                assert_eq!(
                    actions,
                    vec![
                        Action::Disconnect,
                        Action::Connect {
                            address: format!("owner-{n}:1")
                        }
                    ]
                );
            } else {
                // The fourth in a row counts as a failure: back off.
                assert_eq!(actions, vec![Action::Disconnect]);
                assert!(matches!(s.state, State::Backoff { .. }));
            }
        }
        // A draining node's goodbye: log in again at once, at the same address.
        let mut s = live(t0);
        s.frame(
            t0,
            env(Body::Goodbye(thalamus_proto::v1::Goodbye {
                reason: GoodbyeReason::Draining as i32,
                message: "draining".into(),
            })),
        );
        assert_eq!(
            drain_actions(&mut s),
            vec![
                Action::Disconnect,
                Action::Connect {
                    address: "a:1".into()
                }
            ]
        );
        // Replaced by another login: stop.
        let mut s = live(t0);
        s.frame(
            t0,
            env(Body::Goodbye(thalamus_proto::v1::Goodbye {
                reason: GoodbyeReason::Replaced as i32,
                message: String::new(),
            })),
        );
        assert!(s.is_closed());
    }

    #[test]
    fn a_close_code_decides_whether_to_come_back() {
        let t0 = Instant::now();
        // Replaced (close code 4) even without the Goodbye: stop.
        let mut s = live(t0);
        s.connection_closed(t0, thalamus_proto::close_code::REPLACED, "closed");
        assert!(s.is_closed());
        assert_eq!(
            drain_events(&mut s).last(),
            Some(&Event::Closed(ClosedBy::Replaced))
        );
        // Unauthenticated (3): refused, stop.
        let mut s = live(t0);
        s.connection_closed(t0, thalamus_proto::close_code::UNAUTHENTICATED, "closed");
        let ev = drain_events(&mut s);
        assert!(ev.iter().any(|e| matches!(e, Event::Refused { .. })));
        assert_eq!(ev.last(), Some(&Event::Closed(ClosedBy::Unauthenticated)));
        // Shutdown (7): a loss like any other, the close code said; the next attempt goes to
        // the other entry point (the node just lost is suspect).
        let mut s = live(t0);
        s.connection_closed(t0, thalamus_proto::close_code::SHUTDOWN, "closed");
        let ev = drain_events(&mut s);
        assert!(
            matches!(
                ev.last(),
                Some(Event::Disconnected { close_code: Some(7), attempt: 1, next: Some(n), .. }) if n == "b:1"
            ),
            "{ev:?}"
        );
        // Failed attempts go round the entry points.
        let mut tried = Vec::new();
        for _ in 0..3 {
            let now = s.poll_timeout().unwrap();
            s.handle_timeout(now);
            for a in drain_actions(&mut s) {
                if let Action::Connect { address } = a {
                    tried.push(address);
                }
            }
            s.connection_lost(now, "refused");
        }
        assert_eq!(tried, ["b:1", "a:1", "b:1"]);
    }

    #[test]
    fn a_call_from_dial_to_hangup() {
        let t0 = Instant::now();
        let mut s = DeviceSession::new(config(), 1);
        assert_eq!(
            s.dial("sip:bob@example.org", MediaOffer::default()),
            Err(CommandError::NotLive)
        );
        let mut s = live(t0);
        let (call_ref, id) = s
            .dial("sip:bob@example.org", MediaOffer::default())
            .unwrap();
        let tx = drain_tx(&mut s);
        assert!(matches!(&tx[0].body, Some(Body::Dial(d)) if d.call_ref == call_ref));
        assert_eq!(tx[0].request_id, id);
        // A second call gets another ref.
        let (other, _) = s
            .dial("sip:carol@example.org", MediaOffer::default())
            .unwrap();
        assert_ne!(other, call_ref);
        drain_tx(&mut s);
        let event = |state: CallState| {
            env(Body::CallEvent(CallEvent {
                call_ref,
                state: state as i32,
                ..Default::default()
            }))
        };
        s.frame(t0, event(CallState::Ringing));
        s.frame(t0, event(CallState::Answered));
        assert_eq!(s.calls().get(&call_ref), Some(&CallState::Answered));
        assert_eq!(
            drain_events(&mut s)
                .iter()
                .filter(|e| matches!(e, Event::Frame(_)))
                .count(),
            2
        );
        s.dtmf(call_ref, '#', 0).unwrap();
        s.request_keyframe(call_ref).unwrap();
        s.hold(call_ref, true).unwrap();
        s.hangup(call_ref).unwrap();
        let sent: Vec<_> = drain_tx(&mut s)
            .into_iter()
            .filter_map(|e| e.body)
            .collect();
        assert!(matches!(
            &sent[..],
            [Body::Dtmf(_), Body::KeyframeRequest(k), Body::Hold(_), Body::Hangup(h)]
                if h.call_ref == call_ref && k.call_ref == call_ref
        ));
        s.frame(t0, event(CallState::Ended));
        assert!(!s.calls().contains_key(&call_ref));
        assert_eq!(s.hangup(call_ref), Err(CommandError::UnknownCall(call_ref)));
        assert_eq!(
            s.request_keyframe(call_ref),
            Err(CommandError::UnknownCall(call_ref))
        );
        // An incoming call is known and can be answered; request ids only grow.
        s.frame(
            t0,
            env(Body::IncomingCall(IncomingCall {
                call_ref: 0x8000_0001,
                from_uri: "sip:alice@example.org".into(),
                ..Default::default()
            })),
        );
        let a = s.answer(0x8000_0001, MediaOffer::default()).unwrap();
        let b = s.send_text("sip:alice@example.org", "hi").unwrap();
        assert!(b > a && a > id);
        // Closing says goodbye and closes.
        s.close();
        let sent = drain_tx(&mut s);
        assert!(matches!(
            sent.last().and_then(|e| e.body.as_ref()),
            Some(Body::Goodbye(_))
        ));
        assert_eq!(drain_actions(&mut s), vec![Action::Disconnect]);
        assert!(s.is_closed());
        assert_eq!(s.send_text("x", "y"), Err(CommandError::NotLive));
    }

    #[test]
    fn the_same_inputs_give_the_same_outputs() {
        let run = || {
            let t0 = Instant::now();
            let mut s = DeviceSession::new(config(), 99);
            s.start(t0);
            let mut out = Vec::new();
            let mut now = t0;
            for _ in 0..5 {
                s.connection_lost(now, "x");
                while let Some(e) = s.poll_event() {
                    if let Event::Disconnected {
                        retry_in: Some(w), ..
                    } = e
                    {
                        out.push(w);
                        now += w;
                    }
                }
                s.handle_timeout(now);
                drain_actions(&mut s);
            }
            out
        };
        assert_eq!(run(), run());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use prost::Message as _;

        proptest! {
            /// Arbitrary bytes decoded as frames (whatever decodes), in any state, never panic
            /// and never leave the session without a way forward.
            #[test]
            fn arbitrary_frames_never_panic(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..40), lose_at in 0usize..40) {
                let t0 = Instant::now();
                let mut s = DeviceSession::new(config(), 3);
                s.start(t0);
                s.connected(t0);
                let mut now = t0;
                for (i, bytes) in frames.iter().enumerate() {
                    now += Duration::from_millis(10);
                    if let Ok(env) = Envelope::decode(bytes.as_slice()) {
                        s.frame(now, env);
                    }
                    if i == lose_at {
                        s.connection_lost(now, "cut");
                    }
                    if let Some(t) = s.poll_timeout() {
                        if t <= now { s.handle_timeout(now); }
                    }
                    while s.poll_transmit().is_some() {}
                    while s.poll_event().is_some() {}
                    while let Some(a) = s.poll_action() {
                        if matches!(a, Action::Connect { .. }) { s.connected(now); }
                    }
                }
                prop_assert!(s.is_closed() || s.poll_timeout().is_some());
            }
        }
    }
}
