//! The device session state machine, sans-IO.
//!
//! Fed decoded frames (or frame errors), credential checks, the session table's answer and
//! timestamps; returns actions (send a frame, check a `Hello`'s credential, install the
//! session, forward a call/text request to the bridge, count, close the connection). It owns
//! the MBFP session rules: `Hello` first and within the hello timeout, one `Hello` only; the
//! login rules (a refused or uncheckable credential, a redirect to the owner node, a resume
//! token that is malformed, forged, expired or names a session since replaced, the `Welcome`
//! and the token it carries); `Ping`/`Pong`, keepalive pings, the idle timeout, `Error` frames
//! for bad input and the QUIC close code that goes with each. It does not touch sockets, the
//! device registry, the session table, randomness or the clock: the driver in
//! `session::driver` does, and passes in what they gave.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use thalamus_proto::close_code;
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{
    Envelope, Error as ErrorFrame, ErrorCode, Goodbye, GoodbyeReason, Hello, LiveCall, Ping, Pong,
    Redirect, ResumeToken, ServerLimits, Welcome,
};
use thalamus_proto::FrameError;

use crate::resume::{ResumeError, ResumeTokens, SessionId};

/// Timing parameters of a session.
#[derive(Debug, Clone, Copy)]
pub struct SessionTimers {
    /// Time allowed between connect and `Hello`.
    pub hello_timeout: Duration,
    /// Interval of gateway `Ping`s once live.
    pub keepalive_interval: Duration,
    /// Silence after which the session is closed.
    pub idle_timeout: Duration,
}

/// What a session announces and signs at login.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Its timers.
    pub timers: SessionTimers,
    /// Signs and checks resume tokens.
    pub tokens: ResumeTokens,
    /// This node's id (in `Welcome`).
    pub node_id: String,
    /// The SIP domain of addresses-of-record.
    pub sip_domain: String,
    /// The limits announced in `Welcome`.
    pub limits: ServerLimits,
}

/// What the driver found about a `Hello`'s credential.
#[derive(Debug, Clone, PartialEq)]
pub enum Credential {
    /// The credential is right; with `redirect`, the device belongs on another node.
    Valid {
        /// Where the device should log in instead.
        redirect: Option<Redirect>,
    },
    /// Unknown device (`unknown_device`) or wrong secret (`wrong_secret`).
    Refused(&'static str),
    /// The credential could not be checked now (the reason).
    Unavailable(String),
}

/// What the driver knows at login besides the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginContext {
    /// Wall-clock seconds (resume tokens carry their issue time).
    pub unix_now: u64,
    /// The session the device has now, if any (a token must name it to resume).
    pub current: Option<SessionId>,
    /// A fresh random session id, used unless the session resumes.
    pub fresh: SessionId,
}

/// Counters the core asks the driver to bump (the metric and its label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionCount {
    /// A bad frame (`frame_errors`).
    FrameError(&'static str),
    /// A refused login (`auth_failures`).
    AuthFailure(&'static str),
    /// A resume token not honoured (`resume_rejected`).
    ResumeRejected(&'static str),
    /// A login sent to the owner node (`sessions_redirected`).
    Redirected,
}

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Connected; waiting for `Hello`.
    AwaitingHello,
    /// `Hello` received; the credential is being checked.
    Authenticating,
    /// Accepted; waiting for the driver to install the session.
    Installing,
    /// Authenticated; `Welcome` sent.
    Live,
    /// Closing or closed.
    Closed,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionAction {
    /// Queue this frame toward the device.
    Send(Envelope),
    /// Check this `Hello` (answer with [`SessionCore::handle_auth`]).
    Authenticate {
        /// The hello.
        hello: Hello,
        /// Its request id.
        request_id: u64,
    },
    /// Make this the device's session (replacing any other), tell the bridge the device is
    /// online, then answer with [`SessionCore::installed`].
    Install {
        /// The device.
        device_id: String,
        /// The session (the old one when resumed).
        session_id: SessionId,
        /// Whether the session resumed.
        resumed: bool,
        /// The device follows transfers its remote party asks for (`Capabilities.transfer`).
        takes_transfers: bool,
    },
    /// A call, text or presence request for the bridge, from a live session.
    Forward(Envelope),
    /// Flush queued frames, then close the connection with this QUIC application code.
    Close {
        /// QUIC application error code (see `thalamus_proto::close_code`).
        code: u32,
        /// Short reason, also used as the metrics label.
        reason: &'static str,
    },
    /// Bump a counter.
    Count(SessionCount),
}

/// The session state machine.
#[derive(Debug)]
pub struct SessionCore {
    state: SessionState,
    timers: SessionTimers,
    settings: SessionSettings,
    /// The device, its session and the request id of its `Hello`, once accepted.
    login: Option<(String, SessionId, bool, u64)>,
    hello_deadline: Instant,
    last_rx: Instant,
    next_ping: Option<Instant>,
    ping_nonce: u64,
    /// A probe in progress: when it was sent, and when the session closes if nothing came
    /// back since.
    probe: Option<(Instant, Instant)>,
    /// When the next `ResumeToken` goes out (every third of the resume window while live).
    next_token: Option<Instant>,
    /// The wall clock at install: this instant was this many seconds since the Unix epoch
    /// (tokens carry their issue time; the core reads no clock).
    wall: Option<(Instant, u64)>,
    next_request_id: u64,
    actions: VecDeque<SessionAction>,
}

fn envelope(request_id: u64, body: Body) -> Envelope {
    Envelope {
        request_id,
        body: Some(body),
    }
}

fn error_frame(code: ErrorCode, message: impl Into<String>, request_id: u64) -> Envelope {
    envelope(
        request_id,
        Body::Error(ErrorFrame {
            code: code as i32,
            message: message.into(),
            request_id,
        }),
    )
}

impl SessionCore {
    /// A session whose connection was accepted at `now`.
    pub fn new(now: Instant, settings: SessionSettings) -> Self {
        let timers = settings.timers;
        Self {
            state: SessionState::AwaitingHello,
            timers,
            settings,
            login: None,
            hello_deadline: now + timers.hello_timeout,
            last_rx: now,
            next_ping: None,
            probe: None,
            ping_nonce: 0,
            next_token: None,
            wall: None,
            next_request_id: 1u64 << 63,
            actions: VecDeque::new(),
        }
    }

    /// Current state.
    pub fn state(&self) -> SessionState {
        self.state
    }

    /// A request id for a frame the gateway originates (high bit set, so it never collides
    /// with the device's ids in logs).
    pub fn next_request_id(&mut self) -> u64 {
        self.next_request_id = self.next_request_id.wrapping_add(1) | (1u64 << 63);
        self.next_request_id
    }

    fn close(&mut self, code: u32, reason: &'static str) {
        if self.state != SessionState::Closed {
            self.state = SessionState::Closed;
            self.actions
                .push_back(SessionAction::Close { code, reason });
        }
    }

    fn send(&mut self, env: Envelope) {
        self.actions.push_back(SessionAction::Send(env));
    }

    /// Feeds one decoded frame, or the error the decoder returned.
    pub fn handle_frame(&mut self, now: Instant, frame: Result<Envelope, FrameError>) {
        if self.state == SessionState::Closed {
            return;
        }
        self.last_rx = now;
        let env = match frame {
            Ok(env) => env,
            Err(FrameError::TooLarge { len, max }) => {
                self.actions
                    .push_back(SessionAction::Count(SessionCount::FrameError(
                        "frame_too_large",
                    )));
                self.send(error_frame(
                    ErrorCode::FrameTooLarge,
                    format!("frame of {len} bytes exceeds the maximum of {max}"),
                    0,
                ));
                self.close(close_code::FRAME_TOO_LARGE, "frame_too_large");
                return;
            }
            Err(FrameError::Decode(e)) => {
                self.actions
                    .push_back(SessionAction::Count(SessionCount::FrameError("bad_frame")));
                self.send(error_frame(
                    ErrorCode::BadFrame,
                    format!("undecodable frame: {e}"),
                    0,
                ));
                self.close(close_code::PROTOCOL_ERROR, "bad_frame");
                return;
            }
        };
        let request_id = env.request_id;
        match (self.state, env.body) {
            (SessionState::AwaitingHello, Some(Body::Hello(hello))) => {
                self.state = SessionState::Authenticating;
                self.actions
                    .push_back(SessionAction::Authenticate { hello, request_id });
            }
            (
                SessionState::AwaitingHello
                | SessionState::Authenticating
                | SessionState::Installing,
                _,
            ) => {
                self.actions
                    .push_back(SessionAction::Count(SessionCount::FrameError(
                        "protocol_violation",
                    )));
                self.send(error_frame(
                    ErrorCode::ProtocolViolation,
                    "the first frame must be Hello, and nothing may follow it before Welcome",
                    request_id,
                ));
                self.close(close_code::PROTOCOL_ERROR, "protocol_violation");
            }
            (SessionState::Live, None) => {
                self.actions
                    .push_back(SessionAction::Count(SessionCount::FrameError(
                        "unsupported",
                    )));
                self.send(error_frame(
                    ErrorCode::Unsupported,
                    "unknown message kind",
                    request_id,
                ));
            }
            (SessionState::Live, Some(Body::Hello(_))) => {
                self.actions
                    .push_back(SessionAction::Count(SessionCount::FrameError(
                        "protocol_violation",
                    )));
                self.send(error_frame(
                    ErrorCode::ProtocolViolation,
                    "already authenticated",
                    request_id,
                ));
            }
            (SessionState::Live, Some(Body::Ping(Ping { nonce }))) => {
                self.send(envelope(request_id, Body::Pong(Pong { nonce })));
            }
            (SessionState::Live, Some(Body::Pong(_))) => {}
            (SessionState::Live, Some(Body::Goodbye(_))) => {
                self.close(close_code::NORMAL, "device_goodbye");
            }
            (
                SessionState::Live,
                Some(
                    body @ (Body::Dial(_)
                    | Body::Answer(_)
                    | Body::Reject(_)
                    | Body::Hangup(_)
                    | Body::Hold(_)
                    | Body::Resume(_)
                    | Body::Dtmf(_)
                    | Body::KeyframeRequest(_)
                    | Body::Transfer(_)
                    | Body::SendText(_)
                    | Body::PresenceUpdate(_)
                    | Body::Watch(_)
                    | Body::Unwatch(_)),
                ),
            ) => {
                self.actions
                    .push_back(SessionAction::Forward(envelope(request_id, body)));
            }
            (SessionState::Live, Some(_)) => {
                // Gateway-to-device kinds (Welcome, CallEvent, ...) sent by a device.
                self.actions
                    .push_back(SessionAction::Count(SessionCount::FrameError(
                        "protocol_violation",
                    )));
                self.send(error_frame(
                    ErrorCode::ProtocolViolation,
                    "this message kind is sent by the gateway, not by devices",
                    request_id,
                ));
            }
            (SessionState::Closed, _) => {}
        }
    }

    /// Feeds the outcome of the `Authenticate` action: the `Hello` it was for, what the
    /// credential check found, and what the session table and the clock say.
    pub fn handle_auth(
        &mut self,
        now: Instant,
        request_id: u64,
        hello: &Hello,
        credential: Credential,
        ctx: LoginContext,
    ) {
        if self.state != SessionState::Authenticating {
            return;
        }
        match credential {
            Credential::Refused(label) => {
                self.count(SessionCount::AuthFailure(label));
                self.send(error_frame(
                    ErrorCode::Unauthenticated,
                    "unknown device or wrong credential",
                    request_id,
                ));
                self.close(close_code::UNAUTHENTICATED, "unauthenticated");
            }
            Credential::Unavailable(why) => {
                self.count(SessionCount::AuthFailure("unavailable"));
                self.send(error_frame(
                    ErrorCode::Busy,
                    format!("cannot check credentials now: {why}"),
                    request_id,
                ));
                self.close(close_code::LIMIT_EXCEEDED, "login_refused");
            }
            Credential::Valid {
                redirect: Some(redirect),
            } => {
                self.count(SessionCount::Redirected);
                self.send(envelope(request_id, Body::Redirect(redirect)));
                self.close(close_code::REDIRECTED, "redirected");
            }
            Credential::Valid { redirect: None } => {
                let (session_id, resumed) = self.resumed_session(hello, ctx);
                self.state = SessionState::Installing;
                self.last_rx = now;
                self.login = Some((hello.device_id.clone(), session_id, resumed, request_id));
                self.actions.push_back(SessionAction::Install {
                    device_id: hello.device_id.clone(),
                    session_id,
                    resumed,
                    takes_transfers: hello.capabilities.as_ref().is_some_and(|c| c.transfer),
                });
            }
        }
    }

    /// The session a valid login gets: the one its resume token names when the token checks
    /// out and names the device's current session (or the device has none), else a new one.
    fn resumed_session(&mut self, hello: &Hello, ctx: LoginContext) -> (SessionId, bool) {
        if hello.resume_token.is_empty() {
            return (ctx.fresh, false);
        }
        match self
            .settings
            .tokens
            .check(&hello.device_id, &hello.resume_token, ctx.unix_now)
        {
            // A token for a session that was since replaced by another login is stale.
            Ok(sid) if ctx.current.is_none_or(|c| c == sid) => (sid, true),
            Ok(_) => {
                self.count(SessionCount::ResumeRejected("superseded"));
                (ctx.fresh, false)
            }
            Err(e) => {
                self.count(SessionCount::ResumeRejected(match e {
                    ResumeError::Malformed => "malformed",
                    ResumeError::BadSignature => "bad_signature",
                    ResumeError::Expired => "expired",
                }));
                (ctx.fresh, false)
            }
        }
    }

    /// The driver installed the session (after an `Install`): the `Welcome` goes out, with a
    /// fresh resume token and, for a resumed session, the calls still up.
    pub fn installed(&mut self, now: Instant, unix_now: u64, live_calls: Vec<LiveCall>) {
        if self.state != SessionState::Installing {
            return;
        }
        let Some((device_id, session_id, resumed, request_id)) = self.login.clone() else {
            return;
        };
        let s = &self.settings;
        let welcome = Welcome {
            session_id: session_id.to_string(),
            resume_token: s.tokens.issue(&device_id, &session_id, unix_now),
            address_of_record: format!("sip:{}@{}", device_id, s.sip_domain),
            limits: Some(s.limits),
            keepalive_interval_ms: u32::try_from(s.timers.keepalive_interval.as_millis())
                .unwrap_or(u32::MAX),
            idle_timeout_ms: u32::try_from(s.timers.idle_timeout.as_millis()).unwrap_or(u32::MAX),
            resumed,
            live_calls: if resumed { live_calls } else { Vec::new() },
            node_id: s.node_id.clone(),
        };
        self.state = SessionState::Live;
        self.last_rx = now;
        self.next_ping = Some(now + self.timers.keepalive_interval);
        self.wall = Some((now, unix_now));
        self.next_token = Some(now + self.token_refresh());
        self.send(envelope(request_id, Body::Welcome(welcome)));
    }

    /// How often a live session gets a fresh resume token: a third of the window (at least a
    /// second), so the latest one is always valid however long the session lives.
    fn token_refresh(&self) -> Duration {
        Duration::from_secs((self.settings.tokens.window_secs() / 3).max(1))
    }

    /// Sends a fresh resume token (issued at `now` by the wall clock given at install).
    fn refresh_token(&mut self, now: Instant) {
        let (Some((origin, origin_unix)), Some((device_id, session_id, _, _))) =
            (self.wall, self.login.as_ref())
        else {
            return;
        };
        let unix_now = origin_unix + now.saturating_duration_since(origin).as_secs();
        let token = self.settings.tokens.issue(device_id, session_id, unix_now);
        let valid_for_secs = u32::try_from(self.settings.tokens.window_secs()).unwrap_or(u32::MAX);
        let id = self.next_request_id();
        self.send(envelope(
            id,
            Body::ResumeToken(ResumeToken {
                token,
                valid_for_secs,
            }),
        ));
        self.next_token = Some(now + self.token_refresh());
    }

    /// The device and session once installed.
    pub fn identity(&self) -> Option<(&str, SessionId)> {
        self.login.as_ref().map(|(d, s, _, _)| (d.as_str(), *s))
    }

    fn count(&mut self, what: SessionCount) {
        self.actions.push_back(SessionAction::Count(what));
    }

    /// Queues a frame the gateway originates (bridge events, answers) toward a live device.
    pub fn queue(&mut self, env: Envelope) {
        if self.state == SessionState::Live {
            self.send(env);
        }
    }

    /// Pings the device at `now`; the session closes (as idle) if no frame arrives within
    /// `within`. Only a live session is probed.
    pub fn probe(&mut self, now: Instant, within: Duration) {
        if self.state != SessionState::Live {
            return;
        }
        self.send_ping();
        self.probe = Some((now, now + within));
    }

    /// Sends a `Ping` with the next nonce.
    fn send_ping(&mut self) {
        self.ping_nonce = self.ping_nonce.wrapping_add(1);
        let id = self.next_request_id();
        let nonce = self.ping_nonce;
        self.send(envelope(id, Body::Ping(Ping { nonce })));
    }

    /// Another login of the same device took over: say goodbye and close.
    pub fn replaced(&mut self) {
        self.goodbye(
            GoodbyeReason::Replaced,
            "the device logged in again elsewhere",
        );
        self.close(close_code::REPLACED, "replaced");
    }

    /// The gateway is shutting down (or draining, with `draining`).
    pub fn shutdown(&mut self, draining: bool) {
        if draining {
            self.goodbye(GoodbyeReason::Draining, "the node is draining; reconnect");
        } else {
            self.goodbye(GoodbyeReason::Shutdown, "the gateway is shutting down");
        }
        self.close(close_code::SHUTDOWN, "shutdown");
    }

    fn goodbye(&mut self, reason: GoodbyeReason, message: &str) {
        if self.state == SessionState::Closed {
            return;
        }
        let id = self.next_request_id();
        self.send(envelope(
            id,
            Body::Goodbye(Goodbye {
                reason: reason as i32,
                message: message.into(),
            }),
        ));
    }

    /// The earliest instant at which [`SessionCore::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            SessionState::AwaitingHello => Some(self.hello_deadline),
            SessionState::Authenticating | SessionState::Installing => None,
            SessionState::Live => {
                let idle = self.last_rx + self.timers.idle_timeout;
                let idle = self.probe.map_or(idle, |(_, until)| until.min(idle));
                let next = self.next_ping.map_or(idle, |p| p.min(idle));
                Some(self.next_token.map_or(next, |t| t.min(next)))
            }
            SessionState::Closed => None,
        }
    }

    /// Runs the timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            SessionState::AwaitingHello if now >= self.hello_deadline => {
                self.actions
                    .push_back(SessionAction::Count(SessionCount::FrameError(
                        "hello_timeout",
                    )));
                self.send(error_frame(
                    ErrorCode::ProtocolViolation,
                    "no Hello within the hello timeout",
                    0,
                ));
                self.close(close_code::PROTOCOL_ERROR, "hello_timeout");
            }
            SessionState::Live => {
                if now >= self.last_rx + self.timers.idle_timeout {
                    self.goodbye(GoodbyeReason::Idle, "no frames within the idle timeout");
                    self.close(close_code::IDLE, "idle");
                    return;
                }
                if let Some((sent, until)) = self.probe {
                    if self.last_rx > sent {
                        self.probe = None;
                    } else if now >= until {
                        self.goodbye(GoodbyeReason::Idle, "no answer to a probe");
                        self.close(close_code::IDLE, "probe");
                        return;
                    }
                }
                if let Some(at) = self.next_ping {
                    if now >= at {
                        self.send_ping();
                        self.next_ping = Some(now + self.timers.keepalive_interval);
                    }
                }
                if self.next_token.is_some_and(|at| now >= at) {
                    self.refresh_token(now);
                }
            }
            _ => {}
        }
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<SessionAction> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
// `Instant::now()` in tests only gives the virtual clock its origin.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn timers() -> SessionTimers {
        SessionTimers {
            hello_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
        }
    }

    fn tokens() -> ResumeTokens {
        ResumeTokens::new([7; 32], 300)
    }

    fn settings() -> SessionSettings {
        SessionSettings {
            timers: timers(),
            tokens: tokens(),
            node_id: "gw-1".into(),
            sip_domain: "example.org".into(),
            limits: ServerLimits {
                max_frame_bytes: 65536,
                max_calls: 4,
                max_datagram_bytes: 1200,
                max_text_bytes: 1024,
            },
        }
    }

    const UNIX: u64 = 1_800_000_000;

    fn ctx(current: Option<SessionId>) -> LoginContext {
        LoginContext {
            unix_now: UNIX,
            current,
            fresh: SessionId([1; 16]),
        }
    }

    fn valid() -> Credential {
        Credential::Valid { redirect: None }
    }

    /// A core that got `hello` and the auth answer; returns its actions.
    fn login(
        t0: Instant,
        hello: Hello,
        credential: Credential,
        ctx: LoginContext,
    ) -> (SessionCore, Vec<SessionAction>) {
        let mut core = SessionCore::new(t0, settings());
        core.handle_frame(t0, Ok(envelope(1, Body::Hello(hello.clone()))));
        drain(&mut core);
        core.handle_auth(t0, 1, &hello, credential, ctx);
        let acts = drain(&mut core);
        (core, acts)
    }

    fn welcome_of(acts: &[SessionAction]) -> Option<&Welcome> {
        acts.iter().find_map(|a| match a {
            SessionAction::Send(Envelope {
                body: Some(Body::Welcome(w)),
                ..
            }) => Some(w),
            _ => None,
        })
    }

    fn drain(core: &mut SessionCore) -> Vec<SessionAction> {
        std::iter::from_fn(|| core.poll_action()).collect()
    }

    fn hello_env() -> Envelope {
        envelope(
            1,
            Body::Hello(Hello {
                device_id: "d".into(),
                credential: "s".into(),
                ..Default::default()
            }),
        )
    }

    fn live(now: Instant) -> SessionCore {
        let hello = Hello {
            device_id: "d".into(),
            credential: "s".into(),
            ..Default::default()
        };
        let (mut core, _) = login(now, hello, valid(), ctx(None));
        core.installed(now, UNIX, Vec::new());
        drain(&mut core);
        core
    }

    fn error_code(a: &SessionAction) -> Option<ErrorCode> {
        match a {
            SessionAction::Send(Envelope {
                body: Some(Body::Error(e)),
                ..
            }) => ErrorCode::try_from(e.code).ok(),
            _ => None,
        }
    }

    #[test]
    fn a_device_that_takes_transfers_says_so_in_its_hello() {
        let t0 = Instant::now();
        let hello = Hello {
            device_id: "d".into(),
            credential: "s".into(),
            capabilities: Some(thalamus_proto::v1::Capabilities {
                transfer: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let (_, acts) = login(t0, hello, valid(), ctx(None));
        assert!(acts.iter().any(|a| matches!(
            a,
            SessionAction::Install {
                takes_transfers: true,
                ..
            }
        )));
    }

    /// A session of any age can be resumed: a fresh token every third of the window.
    #[test]
    fn a_live_session_gets_a_fresh_resume_token_every_third_of_the_window() {
        let t0 = Instant::now();
        let hello = Hello {
            device_id: "d".into(),
            credential: "s".into(),
            ..Default::default()
        };
        let (mut core, _) = login(t0, hello, valid(), ctx(None));
        core.installed(t0, UNIX, Vec::new());
        let first = welcome_of(&drain(&mut core)).unwrap().resume_token.clone();
        let mut now = t0;
        let mut tokens_seen = Vec::new();
        // 1,000 s of a device that pings every 4 s, on a virtual clock.
        while now < t0 + Duration::from_secs(1_000) {
            now += Duration::from_secs(4);
            while let Some(at) = core.poll_timeout().filter(|at| *at <= now) {
                core.handle_timeout(at);
            }
            core.handle_frame(now, Ok(envelope(9, Body::Ping(Ping { nonce: 1 }))));
            for a in drain(&mut core) {
                assert!(!matches!(a, SessionAction::Close { .. }), "{a:?}");
                if let SessionAction::Send(Envelope {
                    body: Some(Body::ResumeToken(t)),
                    ..
                }) = a
                {
                    assert_eq!(t.valid_for_secs, 300);
                    tokens_seen.push((now, t.token));
                }
            }
        }
        // One every 100 s.
        assert_eq!(tokens_seen.len(), 10, "{:?}", tokens_seen.len());
        let unix_end = UNIX + 1_000;
        assert_eq!(
            tokens().check("d", &first, unix_end),
            Err(ResumeError::Expired)
        );
        let (_, latest) = tokens_seen.last().unwrap();
        assert_eq!(
            tokens().check("d", latest, unix_end),
            Ok(SessionId([1; 16]))
        );
        // Each token is for this device only.
        assert!(tokens().check("other", latest, unix_end).is_err());
    }

    #[test]
    fn hello_then_install_then_welcome() {
        let t0 = Instant::now();
        let mut core = SessionCore::new(t0, settings());
        core.handle_frame(t0, Ok(hello_env()));
        let acts = drain(&mut core);
        assert!(matches!(
            acts[0],
            SessionAction::Authenticate { request_id: 1, .. }
        ));
        let hello = match &acts[0] {
            SessionAction::Authenticate { hello, .. } => hello.clone(),
            _ => unreachable!(),
        };
        core.handle_auth(t0, 1, &hello, valid(), ctx(None));
        assert_eq!(
            drain(&mut core),
            vec![SessionAction::Install {
                device_id: "d".into(),
                session_id: SessionId([1; 16]),
                resumed: false,
                takes_transfers: false,
            }]
        );
        assert_eq!(core.state(), SessionState::Installing);
        // Nothing from the device is taken before the Welcome.
        core.handle_frame(t0, Ok(envelope(2, Body::Ping(Ping { nonce: 1 }))));
        assert_eq!(core.state(), SessionState::Closed);

        let mut core = SessionCore::new(t0, settings());
        core.handle_frame(t0, Ok(hello_env()));
        drain(&mut core);
        core.handle_auth(t0, 1, &hello, valid(), ctx(None));
        drain(&mut core);
        core.installed(t0, UNIX, Vec::new());
        let acts = drain(&mut core);
        let welcome = welcome_of(&acts).expect("a Welcome");
        assert!(matches!(
            acts[0],
            SessionAction::Send(Envelope { request_id: 1, .. })
        ));
        assert_eq!(welcome.session_id, SessionId([1; 16]).to_string());
        assert_eq!(welcome.address_of_record, "sip:d@example.org");
        assert_eq!(welcome.node_id, "gw-1");
        assert_eq!(welcome.keepalive_interval_ms, 5_000);
        assert_eq!(welcome.idle_timeout_ms, 20_000);
        assert_eq!(welcome.limits.as_ref().map(|l| l.max_calls), Some(4));
        assert!(!welcome.resumed);
        assert_eq!(
            tokens().check("d", &welcome.resume_token, UNIX),
            Ok(SessionId([1; 16])),
            "the Welcome carries a token for its own session"
        );
        assert_eq!(core.state(), SessionState::Live);
        assert_eq!(core.identity(), Some(("d", SessionId([1; 16]))));
    }

    #[test]
    fn refused_and_uncheckable_credentials_error_count_and_close() {
        let t0 = Instant::now();
        for (credential, code, close, label) in [
            (
                Credential::Refused("wrong_secret"),
                ErrorCode::Unauthenticated,
                (close_code::UNAUTHENTICATED, "unauthenticated"),
                "wrong_secret",
            ),
            (
                Credential::Refused("unknown_device"),
                ErrorCode::Unauthenticated,
                (close_code::UNAUTHENTICATED, "unauthenticated"),
                "unknown_device",
            ),
            (
                Credential::Unavailable("busy".into()),
                ErrorCode::Busy,
                (close_code::LIMIT_EXCEEDED, "login_refused"),
                "unavailable",
            ),
        ] {
            let (core, acts) = login(t0, Hello::default(), credential, ctx(None));
            assert_eq!(
                acts[0],
                SessionAction::Count(SessionCount::AuthFailure(label))
            );
            assert_eq!(error_code(&acts[1]), Some(code));
            assert_eq!(
                acts[2],
                SessionAction::Close {
                    code: close.0,
                    reason: close.1
                }
            );
            assert_eq!(core.state(), SessionState::Closed);
        }
    }

    #[test]
    fn a_device_owned_elsewhere_is_redirected_and_closed() {
        let redirect = Redirect {
            address: "10.0.0.2:4433".into(),
            node_id: "gw-2".into(),
        };
        let (core, acts) = login(
            Instant::now(),
            Hello::default(),
            Credential::Valid {
                redirect: Some(redirect.clone()),
            },
            ctx(None),
        );
        assert_eq!(acts[0], SessionAction::Count(SessionCount::Redirected));
        assert_eq!(
            acts[1],
            SessionAction::Send(envelope(1, Body::Redirect(redirect)))
        );
        assert_eq!(
            acts[2],
            SessionAction::Close {
                code: close_code::REDIRECTED,
                reason: "redirected"
            }
        );
        assert_eq!(core.state(), SessionState::Closed);
    }

    fn resuming(token: Vec<u8>) -> Hello {
        Hello {
            device_id: "d".into(),
            credential: "s".into(),
            resume_token: token,
            ..Default::default()
        }
    }

    #[test]
    fn a_valid_token_resumes_its_session_and_lists_the_live_calls() {
        let t0 = Instant::now();
        let old = SessionId([9; 16]);
        let token = tokens().issue("d", &old, UNIX - 10);
        // The device has no session now (its node died), or still has that very one.
        for current in [None, Some(old)] {
            let (mut core, acts) = login(t0, resuming(token.clone()), valid(), ctx(current));
            assert_eq!(
                acts,
                vec![SessionAction::Install {
                    device_id: "d".into(),
                    session_id: old,
                    resumed: true,
                    takes_transfers: false,
                }]
            );
            let call = LiveCall {
                call_ref: 3,
                ..Default::default()
            };
            core.installed(t0, UNIX, vec![call.clone()]);
            let acts = drain(&mut core);
            let welcome = welcome_of(&acts).unwrap();
            assert!(welcome.resumed);
            assert_eq!(welcome.session_id, old.to_string());
            assert_eq!(welcome.live_calls, vec![call]);
        }
    }

    #[test]
    fn a_token_of_a_replaced_session_or_a_bad_token_starts_a_new_session() {
        let t0 = Instant::now();
        let old = SessionId([9; 16]);
        let newer = SessionId([8; 16]);
        let cases = [
            (tokens().issue("d", &old, UNIX), Some(newer), "superseded"),
            (tokens().issue("d", &old, UNIX - 301), None, "expired"),
            (tokens().issue("other", &old, UNIX), None, "bad_signature"),
            (
                ResumeTokens::new([6; 32], 300).issue("d", &old, UNIX),
                None,
                "bad_signature",
            ),
            (b"not a token".to_vec(), None, "malformed"),
        ];
        for (token, current, label) in cases {
            let (mut core, acts) = login(t0, resuming(token), valid(), ctx(current));
            assert_eq!(
                acts,
                vec![
                    SessionAction::Count(SessionCount::ResumeRejected(label)),
                    SessionAction::Install {
                        device_id: "d".into(),
                        session_id: SessionId([1; 16]),
                        resumed: false,
                        takes_transfers: false,
                    }
                ],
                "{label}"
            );
            // A new session lists no calls, whatever the driver found.
            core.installed(t0, UNIX, vec![LiveCall::default()]);
            let acts = drain(&mut core);
            let welcome = welcome_of(&acts).unwrap();
            assert!(!welcome.resumed && welcome.live_calls.is_empty(), "{label}");
        }
    }

    #[test]
    fn frame_before_hello_is_a_violation() {
        let t0 = Instant::now();
        let mut core = SessionCore::new(t0, settings());
        core.handle_frame(t0, Ok(envelope(4, Body::Ping(Ping { nonce: 1 }))));
        let acts = drain(&mut core);
        assert_eq!(error_code(&acts[1]), Some(ErrorCode::ProtocolViolation));
        assert!(matches!(
            acts[2],
            SessionAction::Close {
                code: close_code::PROTOCOL_ERROR,
                ..
            }
        ));
    }

    #[test]
    fn hello_timeout_on_fake_clock() {
        let t0 = Instant::now();
        let mut core = SessionCore::new(t0, settings());
        assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        core.handle_timeout(t0 + Duration::from_secs(9));
        assert!(drain(&mut core).is_empty());
        core.handle_timeout(t0 + Duration::from_secs(10));
        let acts = drain(&mut core);
        assert!(acts.iter().any(|a| matches!(
            a,
            SessionAction::Close {
                reason: "hello_timeout",
                ..
            }
        )));
    }

    #[test]
    fn ping_is_answered_with_same_nonce_and_id() {
        let t0 = Instant::now();
        let mut core = live(t0);
        core.handle_frame(t0, Ok(envelope(9, Body::Ping(Ping { nonce: 42 }))));
        assert_eq!(
            drain(&mut core),
            vec![SessionAction::Send(envelope(
                9,
                Body::Pong(Pong { nonce: 42 })
            ))]
        );
    }

    #[test]
    fn a_probe_closes_a_silent_session_and_spares_one_that_answers() {
        let t0 = Instant::now();
        let within = Duration::from_secs(1);
        // Answered: the session lives on.
        let mut core = live(t0);
        core.probe(t0, within);
        let acts = drain(&mut core);
        assert!(matches!(
            &acts[..],
            [SessionAction::Send(Envelope {
                body: Some(Body::Ping(_)),
                ..
            })]
        ));
        assert_eq!(core.poll_timeout(), Some(t0 + within));
        let t1 = t0 + Duration::from_millis(300);
        core.handle_frame(t1, Ok(envelope(0, Body::Pong(Pong { nonce: 1 }))));
        core.handle_timeout(t0 + within);
        assert!(!drain(&mut core)
            .iter()
            .any(|a| matches!(a, SessionAction::Close { .. })));
        // Silent: closed when the probe's time is up, not before.
        let mut core = live(t0);
        core.probe(t0, within);
        drain(&mut core);
        core.handle_timeout(t0 + within - Duration::from_millis(1));
        assert!(!drain(&mut core)
            .iter()
            .any(|a| matches!(a, SessionAction::Close { .. })));
        core.handle_timeout(t0 + within);
        assert!(drain(&mut core).iter().any(|a| matches!(
            a,
            SessionAction::Close {
                reason: "probe",
                ..
            }
        )));
    }

    #[test]
    fn keepalive_pings_then_idle_close() {
        let t0 = Instant::now();
        let mut core = live(t0);
        assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        core.handle_timeout(t0 + Duration::from_secs(5));
        let acts = drain(&mut core);
        assert!(matches!(
            &acts[0],
            SessionAction::Send(Envelope {
                body: Some(Body::Ping(_)),
                ..
            })
        ));
        // Traffic keeps it alive.
        core.handle_frame(
            t0 + Duration::from_secs(15),
            Ok(envelope(0, Body::Pong(Pong { nonce: 1 }))),
        );
        core.handle_timeout(t0 + Duration::from_secs(21));
        assert!(!drain(&mut core)
            .iter()
            .any(|a| matches!(a, SessionAction::Close { .. })));
        core.handle_timeout(t0 + Duration::from_secs(35));
        let acts = drain(&mut core);
        assert!(acts.iter().any(|a| matches!(
            a,
            SessionAction::Send(Envelope { body: Some(Body::Goodbye(Goodbye { reason, .. })), .. })
                if *reason == GoodbyeReason::Idle as i32
        )));
        assert!(acts.iter().any(|a| matches!(
            a,
            SessionAction::Close {
                code: close_code::IDLE,
                ..
            }
        )));
    }

    #[test]
    fn unknown_kind_is_unsupported_and_session_stays() {
        let t0 = Instant::now();
        let mut core = live(t0);
        core.handle_frame(
            t0,
            Ok(Envelope {
                request_id: 3,
                body: None,
            }),
        );
        let acts = drain(&mut core);
        assert_eq!(error_code(&acts[1]), Some(ErrorCode::Unsupported));
        assert_eq!(core.state(), SessionState::Live);
    }

    #[test]
    fn oversized_and_garbage_frames_close() {
        let t0 = Instant::now();
        let mut core = live(t0);
        core.handle_frame(
            t0,
            Err(FrameError::TooLarge {
                len: 70_000,
                max: 65_536,
            }),
        );
        let acts = drain(&mut core);
        assert_eq!(error_code(&acts[1]), Some(ErrorCode::FrameTooLarge));
        assert!(matches!(
            acts[2],
            SessionAction::Close {
                code: close_code::FRAME_TOO_LARGE,
                ..
            }
        ));

        let mut core = live(t0);
        let mut garbage = BytesMut::from(&[0, 0, 0, 2, 0xff, 0xff][..]);
        let err = thalamus_proto::FrameDecoder::default()
            .decode(&mut garbage)
            .unwrap_err();
        core.handle_frame(t0, Err(err));
        let acts = drain(&mut core);
        assert_eq!(error_code(&acts[1]), Some(ErrorCode::BadFrame));
        assert!(matches!(
            acts[2],
            SessionAction::Close {
                code: close_code::PROTOCOL_ERROR,
                ..
            }
        ));
    }

    #[test]
    fn replaced_says_goodbye_once() {
        let t0 = Instant::now();
        let mut core = live(t0);
        core.replaced();
        core.replaced();
        let acts = drain(&mut core);
        assert_eq!(acts.len(), 2);
        assert!(matches!(
            &acts[0],
            SessionAction::Send(Envelope { body: Some(Body::Goodbye(g)), .. })
                if g.reason == GoodbyeReason::Replaced as i32
        ));
    }

    #[test]
    fn call_requests_are_forwarded() {
        let t0 = Instant::now();
        let mut core = live(t0);
        let dial = envelope(
            5,
            Body::Dial(thalamus_proto::v1::Dial {
                call_ref: 1,
                target: "sip:bob@example.com".into(),
                ..Default::default()
            }),
        );
        core.handle_frame(t0, Ok(dial.clone()));
        assert_eq!(drain(&mut core), vec![SessionAction::Forward(dial)]);
    }
}
