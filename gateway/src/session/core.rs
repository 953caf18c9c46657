//! The device session state machine, sans-IO.
//!
//! Fed decoded frames (or frame errors), authentication outcomes and timestamps; returns
//! actions (send a frame, authenticate a `Hello`, forward a call/text request to the bridge,
//! close the connection). It owns the MBFP session rules: `Hello` first and within the hello
//! timeout, one `Hello` only, `Ping`/`Pong`, keepalive pings, the idle timeout, `Error` frames
//! for bad input and the QUIC close code that goes with each. It does not touch sockets, the
//! device registry or the clock: the driver in `session::driver` does.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use thalamus_proto::close_code;
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{
    Envelope, Error as ErrorFrame, ErrorCode, Goodbye, GoodbyeReason, Hello, Ping, Pong, Welcome,
};
use thalamus_proto::FrameError;

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

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Connected; waiting for `Hello`.
    AwaitingHello,
    /// `Hello` received; the credential is being checked.
    Authenticating,
    /// Authenticated; `Welcome` sent.
    Live,
    /// Closing or closed.
    Closed,
}

/// Result of checking a `Hello`.
#[derive(Debug, Clone)]
pub enum AuthOutcome {
    /// Accepted: send this `Welcome`.
    Accepted(Welcome),
    /// Rejected with this error code and message.
    Rejected(ErrorCode, String),
    /// Another node owns the device: redirect it there.
    Redirect(thalamus_proto::v1::Redirect),
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
    /// A call, text or presence request for the bridge, from a live session.
    Forward(Envelope),
    /// Flush queued frames, then close the connection with this QUIC application code.
    Close {
        /// QUIC application error code (see `thalamus_proto::close_code`).
        code: u32,
        /// Short reason, also used as the metrics label.
        reason: &'static str,
    },
    /// Count a bad frame (metrics label).
    CountError(&'static str),
}

/// The session state machine.
#[derive(Debug)]
pub struct SessionCore {
    state: SessionState,
    timers: SessionTimers,
    hello_deadline: Instant,
    last_rx: Instant,
    next_ping: Option<Instant>,
    ping_nonce: u64,
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
    pub fn new(now: Instant, timers: SessionTimers) -> Self {
        Self {
            state: SessionState::AwaitingHello,
            timers,
            hello_deadline: now + timers.hello_timeout,
            last_rx: now,
            next_ping: None,
            ping_nonce: 0,
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
                    .push_back(SessionAction::CountError("frame_too_large"));
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
                    .push_back(SessionAction::CountError("bad_frame"));
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
            (SessionState::AwaitingHello | SessionState::Authenticating, _) => {
                self.actions
                    .push_back(SessionAction::CountError("protocol_violation"));
                self.send(error_frame(
                    ErrorCode::ProtocolViolation,
                    "the first frame must be Hello, and nothing may follow it before Welcome",
                    request_id,
                ));
                self.close(close_code::PROTOCOL_ERROR, "protocol_violation");
            }
            (SessionState::Live, None) => {
                self.actions
                    .push_back(SessionAction::CountError("unsupported"));
                self.send(error_frame(
                    ErrorCode::Unsupported,
                    "unknown message kind",
                    request_id,
                ));
            }
            (SessionState::Live, Some(Body::Hello(_))) => {
                self.actions
                    .push_back(SessionAction::CountError("protocol_violation"));
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
                    | Body::SendText(_)
                    | Body::PresenceUpdate(_)),
                ),
            ) => {
                self.actions
                    .push_back(SessionAction::Forward(envelope(request_id, body)));
            }
            (SessionState::Live, Some(_)) => {
                // Gateway-to-device kinds (Welcome, CallEvent, ...) sent by a device.
                self.actions
                    .push_back(SessionAction::CountError("protocol_violation"));
                self.send(error_frame(
                    ErrorCode::ProtocolViolation,
                    "this message kind is sent by the gateway, not by devices",
                    request_id,
                ));
            }
            (SessionState::Closed, _) => {}
        }
    }

    /// Feeds the outcome of the `Authenticate` action.
    pub fn handle_auth(&mut self, now: Instant, request_id: u64, outcome: AuthOutcome) {
        if self.state != SessionState::Authenticating {
            return;
        }
        match outcome {
            AuthOutcome::Accepted(welcome) => {
                self.state = SessionState::Live;
                self.last_rx = now;
                self.next_ping = Some(now + self.timers.keepalive_interval);
                self.send(envelope(request_id, Body::Welcome(welcome)));
            }
            AuthOutcome::Rejected(code, message) => {
                self.send(error_frame(code, message, request_id));
                if code == ErrorCode::Unauthenticated {
                    self.close(close_code::UNAUTHENTICATED, "unauthenticated");
                } else {
                    self.close(close_code::LIMIT_EXCEEDED, "login_refused");
                }
            }
            AuthOutcome::Redirect(redirect) => {
                self.send(envelope(request_id, Body::Redirect(redirect)));
                self.close(close_code::REDIRECTED, "redirected");
            }
        }
    }

    /// Queues a frame the gateway originates (bridge events, answers) toward a live device.
    pub fn queue(&mut self, env: Envelope) {
        if self.state == SessionState::Live {
            self.send(env);
        }
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
            SessionState::Authenticating => None,
            SessionState::Live => {
                let idle = self.last_rx + self.timers.idle_timeout;
                Some(self.next_ping.map_or(idle, |p| p.min(idle)))
            }
            SessionState::Closed => None,
        }
    }

    /// Runs the timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            SessionState::AwaitingHello if now >= self.hello_deadline => {
                self.actions
                    .push_back(SessionAction::CountError("hello_timeout"));
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
                if let Some(at) = self.next_ping {
                    if now >= at {
                        self.ping_nonce = self.ping_nonce.wrapping_add(1);
                        let id = self.next_request_id();
                        let nonce = self.ping_nonce;
                        self.send(envelope(id, Body::Ping(Ping { nonce })));
                        self.next_ping = Some(now + self.timers.keepalive_interval);
                    }
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
        let mut core = SessionCore::new(now, timers());
        core.handle_frame(now, Ok(hello_env()));
        core.handle_auth(now, 1, AuthOutcome::Accepted(Welcome::default()));
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
    fn hello_then_welcome() {
        let t0 = Instant::now();
        let mut core = SessionCore::new(t0, timers());
        core.handle_frame(t0, Ok(hello_env()));
        let acts = drain(&mut core);
        assert!(matches!(
            acts[0],
            SessionAction::Authenticate { request_id: 1, .. }
        ));
        core.handle_auth(t0, 1, AuthOutcome::Accepted(Welcome::default()));
        let acts = drain(&mut core);
        assert!(matches!(
            &acts[0],
            SessionAction::Send(Envelope {
                request_id: 1,
                body: Some(Body::Welcome(_))
            })
        ));
        assert_eq!(core.state(), SessionState::Live);
    }

    #[test]
    fn rejected_credential_errors_and_closes() {
        let t0 = Instant::now();
        let mut core = SessionCore::new(t0, timers());
        core.handle_frame(t0, Ok(hello_env()));
        drain(&mut core);
        core.handle_auth(
            t0,
            1,
            AuthOutcome::Rejected(ErrorCode::Unauthenticated, "bad".into()),
        );
        let acts = drain(&mut core);
        assert_eq!(error_code(&acts[0]), Some(ErrorCode::Unauthenticated));
        assert_eq!(
            acts[1],
            SessionAction::Close {
                code: close_code::UNAUTHENTICATED,
                reason: "unauthenticated"
            }
        );
    }

    #[test]
    fn frame_before_hello_is_a_violation() {
        let t0 = Instant::now();
        let mut core = SessionCore::new(t0, timers());
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
        let mut core = SessionCore::new(t0, timers());
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
