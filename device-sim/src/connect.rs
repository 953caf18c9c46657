//! `thalamus-sim connect`: one device that logs in, prints every event, keeps the session alive
//! with `Ping`, follows `Redirect`, and reconnects with exponential backoff (presenting its
//! resume token) when the connection drops. It stops for good when it is refused
//! (`unauthenticated`) or replaced by another login of the same device.
//!
//! Where it connects: to its entry points (the `--gateway` list) in turn, and wherever a
//! `Redirect` sends it. After a lost connection it goes back to the entry points (the node it
//! was redirected to may be the one that died), moving on to the next one after each failed
//! attempt. At most [`MAX_REDIRECTS_IN_A_ROW`] redirects are followed without a `Welcome`; more
//! count as a failed attempt (two nodes that disagree cannot bounce it forever).

use std::net::SocketAddr;
use std::time::Duration;

use rand::Rng;
use serde_json::json;
use thalamus_proto::close_code;
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{Capabilities, ErrorCode, GoodbyeReason, Hello, Ping, Pong};

use crate::device::{DeviceConnection, DeviceError};
use crate::events::EventPrinter;

/// Settings of one `connect` run.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Gateway QUIC address (the first entry point).
    pub gateway: SocketAddr,
    /// More entry points, tried in turn after `gateway` when a connection is lost or fails.
    pub fallbacks: Vec<SocketAddr>,
    /// TLS server name.
    pub server_name: String,
    /// Device id.
    pub device_id: String,
    /// Device secret.
    pub secret: String,
    /// Pinned certificate fingerprint.
    pub fingerprint: Option<[u8; 32]>,
    /// Stop after this many reconnect attempts in a row (None: forever).
    pub max_attempts: Option<u32>,
    /// The presence (and note) to set once live, again after every reconnect.
    pub presence: Option<(thalamus_proto::v1::PresenceState, String)>,
    /// Output format.
    pub printer: EventPrinter,
}

/// Why `connect` stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The gateway refused the credential.
    Unauthenticated,
    /// Another login of the same device took over.
    Replaced,
    /// Too many failed attempts in a row.
    GaveUp,
}

enum SessionEnd {
    Stop(StopReason),
    Lost(String),
    Redirect(SocketAddr),
}

/// Backoff before reconnect attempt `attempt` (1-based): 200 ms doubling to 10 s, +-20% jitter.
pub fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1u64 << attempt.saturating_sub(1).min(6));
    let capped = base.min(10_000);
    let jitter = rand::thread_rng().gen_range(0.8..1.2);
    Duration::from_millis((capped as f64 * jitter) as u64)
}

/// Redirects followed in a row without a `Welcome` before the attempt counts as failed.
pub const MAX_REDIRECTS_IN_A_ROW: u32 = 4;

/// Runs the device until it must stop.
pub async fn run(opts: ConnectOptions) -> anyhow::Result<StopReason> {
    let config = crate::quic::client_config(opts.fingerprint)?;
    let entry_points: Vec<SocketAddr> = std::iter::once(opts.gateway)
        .chain(opts.fallbacks.iter().copied())
        .collect();
    // The first entry point is tried first; the next one after a failure.
    let mut next_entry = 1usize;
    let mut gateway = opts.gateway;
    let mut endpoint = crate::quic::client_endpoint(gateway, config.clone())?;
    let mut resume_token: Vec<u8> = Vec::new();
    let mut attempt = 0u32;
    let mut redirects = 0u32;
    loop {
        let mut went_live = false;
        let end = session(
            &opts,
            &endpoint,
            gateway,
            &mut resume_token,
            &mut attempt,
            &mut went_live,
        )
        .await;
        let reason = match end {
            SessionEnd::Stop(reason) => {
                endpoint.close(0u32.into(), b"bye");
                return Ok(reason);
            }
            SessionEnd::Redirect(addr) if redirects < MAX_REDIRECTS_IN_A_ROW => {
                redirects += 1;
                if addr.is_ipv4() != gateway.is_ipv4() {
                    endpoint = crate::quic::client_endpoint(addr, config.clone())?;
                }
                gateway = addr;
                continue;
            }
            SessionEnd::Redirect(addr) => format!("too many redirects in a row (last to {addr})"),
            SessionEnd::Lost(reason) => reason,
        };
        if went_live {
            // A session was live: start again from the first entry point.
            next_entry = 0;
        }
        redirects = 0;
        opts.printer
            .emit("disconnected", json!({ "reason": reason }));
        attempt += 1;
        if opts.max_attempts.is_some_and(|max| attempt > max) {
            return Ok(StopReason::GaveUp);
        }
        let next = entry_points
            .get(next_entry % entry_points.len().max(1))
            .copied()
            .unwrap_or(opts.gateway);
        next_entry = next_entry.wrapping_add(1);
        if next.is_ipv4() != gateway.is_ipv4() {
            endpoint = crate::quic::client_endpoint(next, config.clone())?;
        }
        gateway = next;
        let delay = backoff(attempt);
        opts.printer.emit(
            "reconnecting",
            json!({"attempt": attempt, "delay_ms": delay.as_millis() as u64, "gateway": gateway.to_string()}),
        );
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    opts: &ConnectOptions,
    endpoint: &quinn::Endpoint,
    gateway: SocketAddr,
    resume_token: &mut Vec<u8>,
    attempt: &mut u32,
    went_live: &mut bool,
) -> SessionEnd {
    let mut conn = match DeviceConnection::connect(endpoint, gateway, &opts.server_name).await {
        Ok(c) => c,
        Err(e) => return SessionEnd::Lost(e.to_string()),
    };
    opts.printer
        .emit("connected", json!({"gateway": gateway.to_string()}));
    let hello = Hello {
        device_id: opts.device_id.clone(),
        credential: opts.secret.clone(),
        capabilities: Some(Capabilities {
            audio_codecs: vec![1, 2, 4, 5],
            video_codecs: vec![],
            video: false,
            text: true,
            // Revision 2: follows a transfer the remote party asks for (TransferRequested).
            transfer: true,
        }),
        software_version: format!("thalamus-sim/{}", env!("CARGO_PKG_VERSION")),
        resume_token: resume_token.clone(),
    };
    let welcome = match conn.hello(hello).await {
        Ok(w) => w,
        Err(DeviceError::Refused(env)) => {
            opts.printer.frame(&env);
            return match env.body {
                Some(Body::Error(e)) if e.code == ErrorCode::Unauthenticated as i32 => {
                    SessionEnd::Stop(StopReason::Unauthenticated)
                }
                Some(Body::Redirect(r)) => match r.address.parse() {
                    Ok(addr) => SessionEnd::Redirect(addr),
                    Err(_) => SessionEnd::Lost(format!("bad redirect address {}", r.address)),
                },
                _ => SessionEnd::Lost("hello refused".into()),
            };
        }
        Err(e) => return lost(&conn, e).await,
    };
    *attempt = 0;
    *went_live = true;
    resume_token.clone_from(&welcome.resume_token);
    let keepalive = Duration::from_millis(u64::from(welcome.keepalive_interval_ms.max(1000)));
    opts.printer.frame(&thalamus_proto::v1::Envelope {
        request_id: 0,
        body: Some(Body::Welcome(welcome)),
    });
    if let Some((state, note)) = &opts.presence {
        let update = Body::PresenceUpdate(thalamus_proto::v1::PresenceUpdate {
            uri: String::new(),
            state: *state as i32,
            note: note.clone(),
        });
        if let Err(e) = conn.writer.send(update).await {
            return SessionEnd::Lost(e.to_string());
        }
    }
    let mut ping = tokio::time::interval(keepalive);
    ping.tick().await;
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            frame = conn.reader.next() => match frame {
                Ok(env) => {
                    match &env.body {
                        Some(Body::Ping(p)) => {
                            let pong = thalamus_proto::v1::Envelope { request_id: env.request_id, body: Some(Body::Pong(Pong { nonce: p.nonce })) };
                            if let Err(e) = conn.writer.send_envelope(&pong).await {
                                return SessionEnd::Lost(e.to_string());
                            }
                            continue;
                        }
                        // The latest token resumes the session however old it is.
                        // (Not printed: a token is a secret.)
                        Some(Body::ResumeToken(t)) => {
                            resume_token.clone_from(&t.token);
                            continue;
                        }
                        Some(Body::Goodbye(g)) if g.reason == GoodbyeReason::Replaced as i32 => {
                            opts.printer.frame(&env);
                            return SessionEnd::Stop(StopReason::Replaced);
                        }
                        _ => {}
                    }
                    opts.printer.frame(&env);
                }
                Err(e) => return lost(&conn, e).await,
            },
            _ = ping.tick() => {
                nonce += 1;
                if let Err(e) = conn.writer.send(Body::Ping(Ping { nonce })).await {
                    return SessionEnd::Lost(e.to_string());
                }
            }
        }
    }
}

/// Classifies a lost connection: the gateway's close code may say the device must stop
/// (replaced, unauthenticated) even when the frame saying so did not arrive.
async fn lost(conn: &DeviceConnection, error: DeviceError) -> SessionEnd {
    let code = match error.close_code() {
        Some(code) => Some(code),
        None => tokio::time::timeout(Duration::from_millis(500), conn.conn.closed())
            .await
            .ok()
            .and_then(|reason| DeviceError::from(reason).close_code()),
    };
    match code.and_then(|c| u32::try_from(c).ok()) {
        Some(close_code::REPLACED) => SessionEnd::Stop(StopReason::Replaced),
        Some(close_code::UNAUTHENTICATED) => SessionEnd::Stop(StopReason::Unauthenticated),
        Some(code) => SessionEnd::Lost(format!("{error} (close code {code})")),
        None => SessionEnd::Lost(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let first = backoff(1);
        assert!(first >= Duration::from_millis(160) && first <= Duration::from_millis(240));
        let later = backoff(30);
        assert!(later >= Duration::from_millis(8_000) && later <= Duration::from_millis(12_000));
        assert!(backoff(3) > backoff(1));
    }
}
