//! `thalamus-sim connect`: one device that logs in, prints every event, keeps the session alive
//! with `Ping`, follows `Redirect`, and reconnects with exponential backoff (presenting its
//! resume token) when the connection drops. It stops for good when it is refused
//! (`unauthenticated`) or replaced by another login of the same device.
//!
//! It is a device of the device SDK: the session is `thalamus_device`'s (`DeviceSession`
//! driven by `Client`), and this module only prints its events (docs/simulator-json.md) and
//! sets the device's presence once live. Where it connects: to its entry points (the
//! `--gateway` list) in turn, and wherever a `Redirect` sends it; after a lost live session,
//! the first entry point again. At most [`MAX_REDIRECTS_IN_A_ROW`] redirects are followed
//! without a `Welcome`; more count as a failed attempt (two nodes that disagree cannot bounce it
//! forever). Backoff: 200 ms doubling to 10 s, less up to a fifth at random.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use thalamus_device::session::{ClosedBy, Event, SessionConfig};
use thalamus_device::{Client, ClientConfig};
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::Capabilities;

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

/// Redirects followed in a row without a `Welcome` before the attempt counts as failed.
pub const MAX_REDIRECTS_IN_A_ROW: u32 = 4;

/// The device's session settings for `opts`.
fn session_config(opts: &ConnectOptions) -> SessionConfig {
    let entry_points = std::iter::once(opts.gateway)
        .chain(opts.fallbacks.iter().copied())
        .map(|a| a.to_string())
        .collect();
    let mut session = SessionConfig::new(opts.device_id.clone(), opts.secret.clone(), entry_points);
    session.capabilities = Capabilities {
        audio_codecs: vec![1, 2, 4, 5],
        video_codecs: vec![],
        video: false,
        text: true,
        // Revision 2: follows a transfer the remote party asks for (TransferRequested).
        transfer: true,
    };
    session.software_version = format!("thalamus-sim/{}", env!("CARGO_PKG_VERSION"));
    session.backoff_initial = Duration::from_millis(200);
    session.backoff_max = Duration::from_secs(10);
    session.max_redirects = MAX_REDIRECTS_IN_A_ROW;
    session
}

/// Runs the device until it must stop.
pub async fn run(opts: ConnectOptions) -> anyhow::Result<StopReason> {
    let quic = crate::quic::client_config(opts.fingerprint)?;
    let mut config = ClientConfig::new(session_config(&opts), quic, &opts.server_name);
    config.seed = rand::random();
    let (client, mut incoming) = Client::start(config)?;
    let printer = &opts.printer;
    while let Some(event) = incoming.events.recv().await {
        match event {
            Event::Connecting { .. } | Event::Refused { .. } => {}
            Event::Connected { address } => printer.emit("connected", json!({"gateway": address})),
            Event::Live(welcome) => {
                printer.welcome(*welcome);
                if let Some((state, note)) = &opts.presence {
                    let update = Body::PresenceUpdate(thalamus_proto::v1::PresenceUpdate {
                        uri: String::new(),
                        state: *state as i32,
                        note: note.clone(),
                    });
                    // Not live any more: the next Welcome sets it again.
                    let _ = client.send(update).await;
                }
            }
            Event::Redirected { address, node_id } => printer.redirect(address, node_id),
            Event::Disconnected {
                reason,
                close_code,
                attempt,
                retry_in,
                next,
            } => {
                printer.disconnected(&reason, close_code);
                // A node's goodbye (it drains) is followed at once, not counted.
                if let (Some(wait), true) = (retry_in, attempt > 0) {
                    if opts.max_attempts.is_some_and(|max| attempt > max) {
                        client.close().await;
                        return Ok(StopReason::GaveUp);
                    }
                    printer.reconnecting(attempt, wait, next);
                }
            }
            Event::Frame(env) => printer.frame(&env),
            Event::Closed(by) => {
                return Ok(match by {
                    ClosedBy::Unauthenticated => StopReason::Unauthenticated,
                    ClosedBy::Replaced => StopReason::Replaced,
                    _ => StopReason::GaveUp,
                })
            }
            // Events a later SDK adds: nothing to print for them yet.
            _ => {}
        }
    }
    Ok(StopReason::GaveUp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_is_configured_as_the_simulator_always_was() {
        let opts = ConnectOptions {
            gateway: "127.0.0.1:4433".parse().unwrap_or_else(|_| unreachable!()),
            fallbacks: vec!["127.0.0.2:4433".parse().unwrap_or_else(|_| unreachable!())],
            server_name: "localhost".into(),
            device_id: "dev-1".into(),
            secret: "s".into(),
            fingerprint: None,
            max_attempts: None,
            presence: None,
            printer: EventPrinter { json: true },
        };
        let s = session_config(&opts);
        assert_eq!(s.entry_points, ["127.0.0.1:4433", "127.0.0.2:4433"]);
        assert!(s.capabilities.transfer && s.capabilities.text);
        assert_eq!(
            (s.backoff_initial, s.backoff_max, s.max_redirects),
            (Duration::from_millis(200), Duration::from_secs(10), 4)
        );
    }
}
