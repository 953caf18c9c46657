//! The tokio driver of one device session: moves bytes between the control stream (on QUIC or
//! WebTransport, `super::link`) and the sans-IO [`SessionCore`], checks credentials off the
//! executor, and carries out the core's actions. One task per connection, plus a writer task
//! that owns the send half of the control stream behind a bounded queue. This module holds no
//! protocol rules of its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use bytes::BytesMut;
use thalamus_proto::v1::{Envelope, Hello, ServerLimits};
use thalamus_proto::{body_kind, close_code, encode_frame, FrameDecoder};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, info_span, warn, Instrument};

use super::core::{
    Credential, LoginContext, SessionAction, SessionCore, SessionCount, SessionSettings,
    SessionState, SessionTimers,
};
use super::link::{ControlRecv, ControlSend, Transport};
use super::{DeviceLink, SessionCommand, SessionHandle};
use crate::metrics::{inc, inc_session, TransportLabel};
use crate::registry::{valid_device_id, Verdict};
use crate::resume::SessionId;
use crate::shared::Shared;

/// What the auth task found.
struct AuthResult {
    request_id: u64,
    hello: Hello,
    credential: Credential,
}

/// The identity of a session once installed.
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
pub(crate) async fn run_connection(node: Arc<Shared>, conn: Transport, remote: SocketAddr) {
    let span = info_span!(
        "device_session",
        remote = %remote,
        transport = conn.label(),
        device = tracing::field::Empty,
        session = tracing::field::Empty
    );
    drive(node, conn, remote).instrument(span).await;
}

async fn drive(node: Arc<Shared>, conn: Transport, remote: SocketAddr) {
    let cfg = &node.config;
    let metrics = &node.metrics;
    let transport = conn.label();
    let timers = SessionTimers {
        hello_timeout: cfg.hello_timeout,
        keepalive_interval: cfg.keepalive_interval,
        idle_timeout: cfg.idle_timeout,
    };
    let max_frame = cfg.max_frame_bytes as usize;

    let stream = tokio::time::timeout(timers.hello_timeout, conn.accept_bi()).await;
    let (send, mut recv) = match stream {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            debug!(error = %e, "connection ended before the control stream opened");
            return;
        }
        Err(_) => {
            inc(&metrics.limits_hit, "hello_timeout");
            conn.close(close_code::PROTOCOL_ERROR, b"hello_timeout");
            return;
        }
    };

    let (out_tx, out_rx) = mpsc::channel::<Box<Envelope>>(cfg.send_queue_frames as usize);
    let writer = tokio::spawn(write_frames(send, out_rx, max_frame));
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<SessionCommand>(16);

    let settings = SessionSettings {
        timers,
        tokens: node.tokens.clone(),
        node_id: cfg.node_id.clone(),
        sip_domain: cfg.sip_domain.clone(),
        limits: ServerLimits {
            max_frame_bytes: cfg.max_frame_bytes,
            max_calls: cfg.max_calls,
            // A WebTransport datagram carries the session's id in front of ours.
            max_datagram_bytes: cfg
                .max_datagram_bytes
                .saturating_sub(conn.datagram_overhead()),
            max_text_bytes: cfg.max_text_bytes,
        },
    };
    let mut core = SessionCore::new(Instant::now().into_std(), settings);
    let decoder = FrameDecoder::new(max_frame);
    let mut buf = BytesMut::new();
    let mut auth_rx: Option<oneshot::Receiver<AuthResult>> = None;
    let mut identity: Option<Identity> = None;
    let end_reason: &'static str;
    let mut close: Option<(u32, &'static str)> = None;
    // One sleep and one wait for the connection's end for the whole session, not one per
    // turn of the loop: a turn per media datagram would otherwise register and drop a timer
    // and a wake-up each time. The sleep is re-armed only when the core's deadline moves.
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
    let timer = tokio::time::sleep_until(far);
    tokio::pin!(timer);
    let mut timer_at: Option<std::time::Instant> = None;
    let closed = conn.closed();
    tokio::pin!(closed);

    'session: loop {
        // Carry out everything the core asked for.
        while let Some(action) = core.poll_action() {
            match action {
                SessionAction::Send(env) => {
                    metrics.frame("out", body_kind(env.body.as_ref()), transport);
                    if out_tx.try_send(Box::new(env)).is_err() {
                        inc(&metrics.limits_hit, "send_queue");
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
                SessionAction::Install {
                    device_id,
                    session_id,
                    resumed,
                    takes_transfers,
                } => {
                    let live_calls = install(
                        &node,
                        &device_id,
                        session_id,
                        resumed,
                        takes_transfers,
                        &cmd_tx,
                        &conn,
                    );
                    let connection_id = live_calls.0;
                    identity = Some(Identity {
                        device_id,
                        connection_id,
                    });
                    core.installed(Instant::now().into_std(), unix_now(), live_calls.1);
                }
                SessionAction::Forward(env) => {
                    if let Some(id) = &identity {
                        for reply in node.requests.handle(&id.device_id, env) {
                            core.queue(reply);
                        }
                    }
                }
                SessionAction::Close { code, reason } => {
                    close = Some((code, reason));
                    end_reason = reason;
                    break 'session;
                }
                SessionAction::Count(what) => match what {
                    SessionCount::FrameError(label) => {
                        inc_session(&metrics.frame_errors, label, transport);
                    }
                    SessionCount::AuthFailure(label) => {
                        inc_session(&metrics.auth_failures, label, transport);
                        info!(reason = label, "authentication failed");
                    }
                    SessionCount::ResumeRejected(label) => {
                        inc_session(&metrics.resume_rejected, label, transport);
                    }
                    SessionCount::Redirected => {
                        metrics.sessions_redirected.inc();
                        info!("device redirected to its owner node");
                    }
                },
            }
        }

        let deadline = core.poll_timeout();
        if deadline != timer_at {
            if let Some(at) = deadline {
                timer.as_mut().reset(at.into());
            }
            timer_at = deadline;
        }
        tokio::select! {
            read = read_some(&mut recv, &mut buf) => {
                match read {
                    Ok(0) | Err(_) => {
                        end_reason = "connection_lost";
                        break 'session;
                    }
                    Ok(_) => {
                        let now = Instant::now().into_std();
                        loop {
                            match decoder.decode(&mut buf) {
                                Ok(Some(env)) => {
                                    metrics.frame("in", body_kind(env.body.as_ref()), transport);
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
                let ctx = LoginContext {
                    unix_now: unix_now(),
                    current: node.sessions.get(&result.hello.device_id).map(|h| h.session_id),
                    fresh: SessionId::random(),
                };
                core.handle_auth(Instant::now().into_std(), result.request_id, &result.hello, result.credential, ctx);
            }
            Some(cmd) = cmd_rx.recv() => match cmd {
                SessionCommand::Replaced => core.replaced(),
                SessionCommand::Shutdown { draining } => core.shutdown(draining),
                SessionCommand::Send(env) => core.queue(*env),
                SessionCommand::Probe(within) => core.probe(Instant::now().into_std(), within),
            },
            () = &mut timer, if deadline.is_some() => {
                timer_at = None;
                core.handle_timeout(Instant::now().into_std());
            }
            datagram = conn.read_datagram(), if identity.is_some() => match datagram {
                Ok(datagram) => {
                    if let Some(id) = &identity {
                        node.requests.datagram(&id.device_id, datagram);
                    }
                }
                Err(_) => {
                    end_reason = "connection_lost";
                    break 'session;
                }
            },
            () = &mut closed => {
                end_reason = "connection_lost";
                break 'session;
            }
        }
    }

    // Flush what is queued (Error, Goodbye), then close with the code the core chose.
    drop(out_tx);
    if let Some((code, reason)) = close {
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        conn.close(code, reason.as_bytes());
    } else {
        writer.abort();
        // Closed on every way out: a WebTransport session's own task would otherwise keep its
        // connection up (and no longer counted against the limits) after the session ended.
        conn.close(close_code::NORMAL, b"session ended");
    }
    if let Some(id) = identity {
        if node
            .sessions
            .remove_if_current(&id.device_id, id.connection_id)
        {
            node.requests.offline(&id.device_id);
        }
        metrics.sessions_live.dec();
        metrics
            .sessions_live_by_transport
            .get_or_create(&TransportLabel {
                transport: conn.label(),
            })
            .dec();
        inc_session(&metrics.sessions_ended, end_reason, conn.label());
        info!(reason = end_reason, "device session ended");
    }
}

/// Appends the next chunk of the control stream to `buf`. Chunks come from quinn's own
/// buffers, so a session waiting for its next frame holds no read buffer of its own.
async fn read_some(recv: &mut ControlRecv, buf: &mut BytesMut) -> std::io::Result<usize> {
    match recv.read_chunk(64 * 1024).await? {
        Some(chunk) => {
            buf.extend_from_slice(&chunk);
            Ok(chunk.len())
        }
        None => Ok(0),
    }
}

async fn write_frames(
    mut send: ControlSend,
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
        if !send.write_all(&buf).await {
            return;
        }
    }
    // Finish the stream and give the device time to acknowledge it, so a frame queued just
    // before a close (Error, Goodbye) arrives before the CONNECTION_CLOSE that follows.
    send.finish_and_wait(Duration::from_secs(1)).await;
}

async fn authenticate(
    node: Arc<Shared>,
    remote: SocketAddr,
    hello: Hello,
    request_id: u64,
    reply: oneshot::Sender<AuthResult>,
) {
    let ip = remote.ip();
    let device = hello.device_id.clone();
    let now = Instant::now().into_std();
    let verdict: Result<Verdict, String> =
        if !valid_device_id(&device) || hello.credential.len() > 1024 {
            Ok(Verdict::UnknownDevice)
        } else if let Some(v) = node.registry.check_cached(&device, &hello.credential) {
            // The secret this device logged in with before: no limit applies, nothing queues.
            Ok(v)
        } else if node.throttle.locked(&ip, now) {
            inc(&node.metrics.limits_hit, "login_ip_locked");
            Err("too many failed logins from this address: try later".into())
        } else if node.device_throttle.locked(&device, now) {
            inc(&node.metrics.limits_hit, "login_device_locked");
            Err("too many failed logins for this device: try later".into())
        } else {
            slow_check(&node, ip, &device, &hello.credential).await
        };
    match verdict {
        Ok(Verdict::Valid) => {
            node.throttle.record_success(&ip);
            node.device_throttle.record_success(&device);
        }
        Ok(Verdict::WrongSecret) => {
            node.throttle.record_failure(ip, now);
            node.device_throttle.record_failure(device, now);
        }
        Ok(Verdict::UnknownDevice) => node.throttle.record_failure(ip, now),
        Err(_) => {}
    }
    let credential = match verdict {
        // A device that another node owns is sent there (after its credential checked out,
        // so the answer reveals nothing to a stranger), unless it has calls here.
        Ok(Verdict::Valid) => Credential::Valid {
            redirect: node.placement.redirect_for(&hello.device_id),
        },
        Ok(Verdict::UnknownDevice) => Credential::Refused("unknown_device"),
        Ok(Verdict::WrongSecret) => Credential::Refused("wrong_secret"),
        Err(e) => {
            warn!(error = %e, "credential check failed");
            Credential::Unavailable(e)
        }
    };
    // A device resuming (possibly here after its node died): let the bridge find its calls
    // before the Welcome lists them.
    if credential == (Credential::Valid { redirect: None })
        && !hello.resume_token.is_empty()
        && node
            .tokens
            .check(&hello.device_id, &hello.resume_token, unix_now())
            .is_ok()
    {
        node.requests.resume(&hello.device_id).await;
    }
    let _ = reply.send(AuthResult {
        request_id,
        hello,
        credential,
    });
}

/// The argon2 check of a credential, off the executor: after the address's throttle delay,
/// and with at most `max_pending_logins_per_ip` checks in flight per address (parallel
/// attempts from one address wait their turn behind each other and cannot fill the verifier
/// pool; devices behind one NAT get in one after another). A check that cannot start within
/// the hello timeout is turned away.
async fn slow_check(
    node: &Shared,
    ip: std::net::IpAddr,
    device: &str,
    secret: &str,
) -> Result<Verdict, String> {
    let delay = node.throttle.delay_for(&ip, Instant::now().into_std());
    if !delay.is_zero() {
        node.metrics.auth_throttled.inc();
        tokio::time::sleep(delay).await;
    }
    let Some(_slot) = PendingLogin::acquire(node, ip).await else {
        inc(&node.metrics.limits_hit, "login_per_ip");
        return Err("too many logins in progress from this address".into());
    };
    match node.verifier.submit(
        node.registry.clone(),
        device.to_string(),
        secret.to_string(),
    ) {
        Err(busy) => {
            inc(&node.metrics.limits_hit, "login_queue");
            Err(busy.to_string())
        }
        Ok(rx) => match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        },
    }
}

/// One credential check in flight for an address; released on drop.
struct PendingLogin<'a> {
    node: &'a Shared,
    ip: std::net::IpAddr,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl<'a> PendingLogin<'a> {
    /// Waits (up to the hello timeout) for one of the address's check slots.
    async fn acquire(node: &'a Shared, ip: std::net::IpAddr) -> Option<Self> {
        let slots = node
            .pending_logins
            .entry(ip)
            .or_insert_with(|| {
                std::sync::Arc::new(tokio::sync::Semaphore::new(
                    node.config.max_pending_logins_per_ip,
                ))
            })
            .clone();
        let permit = tokio::time::timeout(node.config.hello_timeout, slots.acquire_owned()).await;
        let slot = Self {
            node,
            ip,
            permit: permit.ok().and_then(Result::ok),
        };
        // Without a slot, dropping `slot` forgets the address if nobody else uses it.
        if slot.permit.is_some() {
            Some(slot)
        } else {
            None
        }
    }
}

impl Drop for PendingLogin<'_> {
    fn drop(&mut self) {
        self.permit = None;
        // Forget the address once nobody holds or waits for its slots.
        let max = self.node.config.max_pending_logins_per_ip;
        self.node.pending_logins.remove_if(&self.ip, |_, slots| {
            std::sync::Arc::strong_count(slots) == 1 && slots.available_permits() == max
        });
    }
}

/// Carries out an `Install`: makes this connection `device_id`'s session (the session it
/// replaces is told so), tells the bridge the device is online on this link, and returns the
/// connection id with the calls still up for a resumed session.
fn install(
    node: &Shared,
    device_id: &str,
    session_id: SessionId,
    resumed: bool,
    takes_transfers: bool,
    cmd_tx: &mpsc::Sender<SessionCommand>,
    conn: &Transport,
) -> (u64, Vec<thalamus_proto::v1::LiveCall>) {
    let metrics = &node.metrics;
    let connection_id = node.sessions.next_connection_id();
    let handle = SessionHandle {
        session_id,
        connection_id,
        commands: cmd_tx.clone(),
    };
    if let Some(old) = node.sessions.install(device_id, handle) {
        inc(&metrics.limits_hit, "replaced_session");
        let _ = old.commands.try_send(SessionCommand::Replaced);
    }
    metrics.sessions_live.inc();
    metrics
        .sessions_live_by_transport
        .get_or_create(&TransportLabel {
            transport: conn.label(),
        })
        .inc();
    inc_session(
        &metrics.sessions_started,
        if resumed { "resumed" } else { "new" },
        conn.label(),
    );
    let span = tracing::Span::current();
    span.record("device", device_id);
    span.record("session", session_id.to_string().as_str());
    info!(resumed, "device session live");
    node.requests.online(
        device_id,
        DeviceLink::new(conn.clone(), takes_transfers, resumed),
    );
    let live_calls = if resumed {
        node.requests.live_calls(device_id)
    } else {
        Vec::new()
    };
    (connection_id, live_calls)
}
