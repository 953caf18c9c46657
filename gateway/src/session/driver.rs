//! The tokio driver of one device session: moves bytes between a QUIC control stream and the
//! sans-IO [`SessionCore`], checks credentials off the executor, and carries out the core's
//! actions. One task per connection, plus a writer task that owns the send half of the control
//! stream behind a bounded queue. This module holds no protocol rules of its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use thalamus_proto::v1::{envelope::Body, Envelope, ErrorCode, Hello, ServerLimits, Welcome};
use thalamus_proto::{body_kind, close_code, encode_frame, FrameDecoder};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, info_span, warn, Instrument};

use super::core::{AuthOutcome, SessionAction, SessionCore, SessionState, SessionTimers};
use super::{SessionCommand, SessionHandle};
use crate::metrics::Metrics;
use crate::node::NodeShared;
use crate::registry::{valid_device_id, Verdict};
use crate::resume::SessionId;

/// What the auth task found.
struct AuthResult {
    request_id: u64,
    hello: Hello,
    verdict: Result<Verdict, String>,
    /// Set when the device belongs on another node.
    redirect: Option<thalamus_proto::v1::Redirect>,
}

/// The identity of a session once authenticated.
struct Identity {
    device_id: String,
    connection_id: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs one device connection to its end.
pub async fn run_connection(node: Arc<NodeShared>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let span = info_span!(
        "device_session",
        remote = %remote,
        device = tracing::field::Empty,
        session = tracing::field::Empty
    );
    drive(node, conn, remote).instrument(span).await;
}

async fn drive(node: Arc<NodeShared>, conn: quinn::Connection, remote: SocketAddr) {
    let cfg = &node.config;
    let metrics = &node.metrics;
    let timers = SessionTimers {
        hello_timeout: Duration::from_millis(cfg.quic.hello_timeout_ms.into()),
        keepalive_interval: Duration::from_millis(cfg.quic.keepalive_interval_ms.into()),
        idle_timeout: Duration::from_millis(cfg.quic.idle_timeout_ms.into()),
    };
    let max_frame = cfg.session.max_frame_bytes as usize;

    let stream = tokio::time::timeout(timers.hello_timeout, conn.accept_bi()).await;
    let (send, mut recv) = match stream {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            debug!(error = %e, "connection ended before the control stream opened");
            return;
        }
        Err(_) => {
            Metrics::inc(&metrics.limits_hit, "hello_timeout");
            conn.close(close_code::PROTOCOL_ERROR.into(), b"hello_timeout");
            return;
        }
    };

    let (out_tx, out_rx) = mpsc::channel::<Box<Envelope>>(cfg.session.send_queue_frames as usize);
    let writer = tokio::spawn(write_frames(send, out_rx, max_frame));
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<SessionCommand>(16);

    let mut core = SessionCore::new(Instant::now(), timers);
    let decoder = FrameDecoder::new(max_frame);
    let mut buf = BytesMut::new();
    let mut auth_rx: Option<oneshot::Receiver<AuthResult>> = None;
    let mut identity: Option<Identity> = None;
    let end_reason: &'static str;
    let mut close: Option<(u32, &'static str)> = None;

    'session: loop {
        // Carry out everything the core asked for.
        while let Some(action) = core.poll_action() {
            match action {
                SessionAction::Send(env) => {
                    metrics.frame("out", body_kind(env.body.as_ref()));
                    if out_tx.try_send(Box::new(env)).is_err() {
                        Metrics::inc(&metrics.limits_hit, "send_queue");
                        warn!("send queue full: closing the session");
                        close = Some((close_code::LIMIT_EXCEEDED, "send_queue_full"));
                        end_reason = "send_queue_full";
                        break 'session;
                    }
                }
                SessionAction::Authenticate { hello, request_id } => {
                    let (tx, rx) = oneshot::channel();
                    auth_rx = Some(rx);
                    tokio::spawn(authenticate(node.clone(), remote, hello, request_id, tx));
                }
                SessionAction::Forward(env) => {
                    if let Some(id) = &identity {
                        for reply in node.bridge.handle(&id.device_id, env) {
                            core.queue(reply);
                        }
                    }
                }
                SessionAction::Close { code, reason } => {
                    close = Some((code, reason));
                    end_reason = reason;
                    break 'session;
                }
                SessionAction::CountError(label) => Metrics::inc(&metrics.frame_errors, label),
            }
        }

        let deadline = core.poll_timeout();
        tokio::select! {
            read = read_some(&mut recv, &mut buf) => {
                match read {
                    Ok(0) | Err(_) => {
                        end_reason = "connection_lost";
                        break 'session;
                    }
                    Ok(_) => {
                        let now = Instant::now();
                        loop {
                            match decoder.decode(&mut buf) {
                                Ok(Some(env)) => {
                                    metrics.frame("in", body_kind(env.body.as_ref()));
                                    core.handle_frame(now, Ok(env));
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    core.handle_frame(now, Err(e));
                                    break;
                                }
                            }
                            if core.state() == SessionState::Closed {
                                break;
                            }
                        }
                        if buf.is_empty() {
                            buf = BytesMut::new();
                        }
                    }
                }
            }
            Some(result) = async { match auth_rx.as_mut() { Some(rx) => rx.await.ok(), None => None } } => {
                auth_rx = None;
                let outcome = finish_auth(&node, &mut identity, result, &cmd_tx, &conn);
                core.handle_auth(Instant::now(), outcome.0, outcome.1);
            }
            Some(cmd) = cmd_rx.recv() => match cmd {
                SessionCommand::Replaced => core.replaced(),
                SessionCommand::Shutdown { draining } => core.shutdown(draining),
                SessionCommand::Send(env) => core.queue(*env),
            },
            _ = sleep_until(deadline) => {
                core.handle_timeout(Instant::now());
            }
            datagram = conn.read_datagram(), if identity.is_some() => match datagram {
                Ok(datagram) => {
                    if let Some(id) = &identity {
                        node.bridge.datagram(&id.device_id, datagram);
                    }
                }
                Err(_) => {
                    end_reason = "connection_lost";
                    break 'session;
                }
            },
            _ = conn.closed() => {
                end_reason = "connection_lost";
                break 'session;
            }
        }
    }

    // Flush what is queued (Error, Goodbye), then close with the code the core chose.
    drop(out_tx);
    if let Some((code, reason)) = close {
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        conn.close(code.into(), reason.as_bytes());
    } else {
        writer.abort();
    }
    if let Some(id) = identity {
        if node
            .sessions
            .remove_if_current(&id.device_id, id.connection_id)
        {
            node.bridge.offline(&id.device_id);
        }
        metrics.sessions_live.dec();
        Metrics::inc(&metrics.sessions_ended, end_reason);
        info!(reason = end_reason, "device session ended");
    }
}

/// Appends the next chunk of the control stream to `buf`. Chunks come from quinn's own
/// buffers, so a session waiting for its next frame holds no read buffer of its own.
async fn read_some(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    match recv.read_chunk(64 * 1024, true).await {
        Ok(Some(chunk)) => {
            buf.extend_from_slice(&chunk.bytes);
            Ok(chunk.bytes.len())
        }
        Ok(None) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn write_frames(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Box<Envelope>>,
    max_frame: usize,
) {
    let mut buf = BytesMut::new();
    while let Some(env) = rx.recv().await {
        buf.clear();
        if encode_frame(&env, max_frame, &mut buf).is_err() {
            warn!(
                kind = body_kind(env.body.as_ref()),
                "outgoing frame too large; dropped"
            );
            continue;
        }
        // Batch whatever else is already queued.
        while let Ok(more) = rx.try_recv() {
            if encode_frame(&more, max_frame, &mut buf).is_err() {
                warn!("outgoing frame too large; dropped");
            }
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
    // Finish the stream and give the device time to acknowledge it, so a frame queued just
    // before a close (Error, Goodbye) arrives before the CONNECTION_CLOSE that follows.
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    }
}

async fn authenticate(
    node: Arc<NodeShared>,
    remote: SocketAddr,
    hello: Hello,
    request_id: u64,
    reply: oneshot::Sender<AuthResult>,
) {
    let delay = node.throttle.delay_for(remote.ip(), Instant::now());
    if !delay.is_zero() {
        node.metrics.auth_throttled.inc();
        tokio::time::sleep(delay).await;
    }
    let verdict = if !valid_device_id(&hello.device_id) || hello.credential.len() > 1024 {
        Ok(Verdict::UnknownDevice)
    } else {
        match node.verifier.submit(
            node.registry.clone(),
            hello.device_id.clone(),
            hello.credential.clone(),
        ) {
            Err(busy) => {
                Metrics::inc(&node.metrics.limits_hit, "login_queue");
                Err(busy.to_string())
            }
            Ok(rx) => match rx.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            },
        }
    };
    match verdict {
        Ok(Verdict::Valid) => node.throttle.record_success(remote.ip()),
        Ok(_) => node.throttle.record_failure(remote.ip(), Instant::now()),
        Err(_) => {}
    }
    // A device that another node owns is sent there (after its credential checked out, so
    // the answer reveals nothing to a stranger), unless it has calls here.
    let redirect = if matches!(verdict, Ok(Verdict::Valid)) {
        node.redirect_for(&hello.device_id)
    } else {
        None
    };
    // A device resuming (possibly here after its node died): let the bridge find its calls
    // before the Welcome lists them.
    if matches!(verdict, Ok(Verdict::Valid))
        && redirect.is_none()
        && !hello.resume_token.is_empty()
        && node
            .tokens
            .check(&hello.device_id, &hello.resume_token, unix_now())
            .is_ok()
    {
        node.bridge.resume(&hello.device_id).await;
    }
    let _ = reply.send(AuthResult {
        request_id,
        hello,
        verdict,
        redirect,
    });
}

/// Turns an auth result into the core's outcome; on success installs the session.
fn finish_auth(
    node: &Arc<NodeShared>,
    identity: &mut Option<Identity>,
    result: AuthResult,
    cmd_tx: &mpsc::Sender<SessionCommand>,
    conn: &quinn::Connection,
) -> (u64, AuthOutcome) {
    let metrics = &node.metrics;
    let AuthResult {
        request_id,
        hello,
        verdict,
        redirect,
    } = result;
    match verdict {
        Ok(Verdict::Valid) => {
            if let Some(redirect) = redirect {
                metrics.sessions_redirected.inc();
                info!(
                    device = %hello.device_id,
                    owner = %redirect.node_id,
                    address = %redirect.address,
                    "device redirected to its owner node"
                );
                return (request_id, AuthOutcome::Redirect(redirect));
            }
        }
        Ok(other) => {
            let label = if other == Verdict::UnknownDevice {
                "unknown_device"
            } else {
                "wrong_secret"
            };
            Metrics::inc(&metrics.auth_failures, label);
            info!(device = %hello.device_id, reason = label, "authentication failed");
            return (
                request_id,
                AuthOutcome::Rejected(
                    ErrorCode::Unauthenticated,
                    "unknown device or wrong credential".into(),
                ),
            );
        }
        Err(e) => {
            warn!(error = %e, "credential check failed");
            Metrics::inc(&metrics.auth_failures, "unavailable");
            return (
                request_id,
                AuthOutcome::Rejected(
                    ErrorCode::Busy,
                    format!("cannot check credentials now: {e}"),
                ),
            );
        }
    }
    let device_id = hello.device_id;
    let now_unix = unix_now();
    let current = node.sessions.get(&device_id);
    let mut resumed = false;
    let mut session_id = SessionId::random();
    if !hello.resume_token.is_empty() {
        match node.tokens.check(&device_id, &hello.resume_token, now_unix) {
            Ok(sid) => {
                // A token for a session that was since replaced by another login is stale.
                if current.as_ref().is_none_or(|c| c.session_id == sid) {
                    session_id = sid;
                    resumed = true;
                } else {
                    Metrics::inc(&metrics.resume_rejected, "superseded");
                }
            }
            Err(e) => {
                let label = match e {
                    crate::resume::ResumeError::Malformed => "malformed",
                    crate::resume::ResumeError::BadSignature => "bad_signature",
                    crate::resume::ResumeError::Expired => "expired",
                };
                Metrics::inc(&metrics.resume_rejected, label);
            }
        }
    }
    let connection_id = node.sessions.next_connection_id();
    let handle = SessionHandle {
        session_id,
        connection_id,
        commands: cmd_tx.clone(),
    };
    if let Some(old) = node.sessions.install(&device_id, handle) {
        Metrics::inc(&metrics.limits_hit, "replaced_session");
        let _ = old.commands.try_send(SessionCommand::Replaced);
    }
    metrics.sessions_live.inc();
    Metrics::inc(
        &metrics.sessions_started,
        if resumed { "resumed" } else { "new" },
    );
    let span = tracing::Span::current();
    span.record("device", device_id.as_str());
    span.record("session", session_id.to_string().as_str());
    info!(resumed, "device session live");
    node.bridge
        .online(&device_id, super::DeviceLink::new(conn.clone()));
    let live_calls = if resumed {
        node.bridge.live_calls(&device_id)
    } else {
        Vec::new()
    };
    let cfg = &node.config;
    let welcome = Welcome {
        session_id: session_id.to_string(),
        resume_token: node.tokens.issue(&device_id, &session_id, now_unix),
        address_of_record: format!("sip:{}@{}", device_id, cfg.sip.domain),
        limits: Some(ServerLimits {
            max_frame_bytes: cfg.session.max_frame_bytes,
            max_calls: cfg.session.max_calls,
            max_datagram_bytes: cfg.quic.max_datagram_bytes,
            max_text_bytes: cfg.session.max_text_bytes,
        }),
        keepalive_interval_ms: cfg.quic.keepalive_interval_ms,
        idle_timeout_ms: cfg.quic.idle_timeout_ms,
        resumed,
        live_calls,
        node_id: cfg.node.id.clone(),
    };
    *identity = Some(Identity {
        device_id,
        connection_id,
    });
    (request_id, AuthOutcome::Accepted(welcome))
}

/// Answers device requests (calls, texts, presence) and follows device sessions. The SIP
/// bridge implements it.
pub trait DeviceRequests: Send + Sync {
    /// Handles one request from `device_id`; returns frames to send back at once.
    fn handle(&self, device_id: &str, request: Envelope) -> Vec<Envelope>;
    /// A session of `device_id` went live on `link` (before its Welcome is sent).
    fn online(&self, _device_id: &str, _link: super::DeviceLink) {}
    /// The session of `device_id` ended (not when it was replaced by a newer one).
    fn offline(&self, _device_id: &str) {}
    /// A media datagram from `device_id`.
    fn datagram(&self, _device_id: &str, _datagram: bytes::Bytes) {}
    /// The calls of `device_id` still up (listed in the Welcome of a resumed session).
    fn live_calls(&self, _device_id: &str) -> Vec<thalamus_proto::v1::LiveCall> {
        Vec::new()
    }
    /// Whether `device_id` has any call here (cheaper than [`Self::live_calls`]).
    fn has_calls(&self, device_id: &str) -> bool {
        !self.live_calls(device_id).is_empty()
    }
    /// `device_id` presented a valid resume token; runs before its Welcome is built, so the
    /// calls it finds (held by a node that died, say) are in `live_calls`. The implementation
    /// bounds its own time.
    fn resume<'a>(
        &'a self,
        _device_id: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(std::future::ready(()))
    }
}

/// The answer when no bridge is attached: every request is unsupported.
#[derive(Debug, Default)]
pub struct NoBridge;

impl DeviceRequests for NoBridge {
    fn handle(&self, _device_id: &str, request: Envelope) -> Vec<Envelope> {
        let kind = body_kind(request.body.as_ref());
        vec![Envelope {
            request_id: request.request_id,
            body: Some(Body::Error(thalamus_proto::v1::Error {
                code: ErrorCode::Unsupported as i32,
                message: format!("{kind} is not available: no SIP bridge on this node"),
                request_id: request.request_id,
            })),
        }]
    }
}
