//! Node heartbeats: the datagram format (sans-IO encode/decode) and [`HeartbeatSender`], the
//! tokio task a gateway node runs to announce itself to one or more balancers.
//!
//! A heartbeat is one UDP datagram holding a JSON object (format in `docs/balancer.md`):
//! node id, a session id that changes on every process start, a sequence number, the node's
//! SIP and device (QUIC) addresses, its load and whether it is draining. With a shared secret
//! the JSON is followed by a line `hmac-sha256=<hex>` computed over the JSON bytes, and a
//! balancer with a secret rejects datagrams without a valid one. This module does not decide
//! liveness (see `membership`) and sends nothing but heartbeats.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::hash::NodeId;

/// Version of the heartbeat format.
pub const HEARTBEAT_VERSION: u32 = 1;
/// Largest heartbeat datagram accepted, in bytes.
pub const MAX_HEARTBEAT_BYTES: usize = 2048;
/// Longest session id, in bytes.
pub const MAX_SESSION_ID_LEN: usize = 64;
const MAC_PREFIX: &str = "\nhmac-sha256=";

/// Load figures a node reports (informational: routing does not weigh them, so that the
/// ownership function stays the same everywhere).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Load {
    /// Device sessions on the node.
    pub devices: u64,
    /// Calls (SIP dialogs) on the node.
    pub calls: u64,
    /// CPU use, 0.0 to 1.0 per core summed (so up to the core count).
    pub cpu: f32,
}

/// One heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Format version ([`HEARTBEAT_VERSION`]).
    pub v: u32,
    /// Node id.
    pub node: NodeId,
    /// Session id: random per process start, so a restart is visible.
    pub session: String,
    /// Sequence number, +1 per heartbeat within a session (gaps are lost heartbeats).
    pub seq: u64,
    /// The node's SIP address (UDP and TCP). An unspecified IP (`0.0.0.0`) means "the address
    /// this heartbeat came from".
    pub sip: SocketAddr,
    /// The node's device (QUIC) address.
    #[serde(default)]
    pub quic: Option<SocketAddr>,
    /// The node takes no new calls but keeps its dialogs.
    #[serde(default)]
    pub draining: bool,
    /// Load figures.
    #[serde(default)]
    pub load: Load,
}

/// Why a heartbeat datagram was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    /// Larger than [`MAX_HEARTBEAT_BYTES`].
    #[error("heartbeat larger than {MAX_HEARTBEAT_BYTES} bytes")]
    TooLarge,
    /// Not the JSON this module writes.
    #[error("malformed heartbeat: {0}")]
    Malformed(String),
    /// A version this balancer does not speak.
    #[error("unsupported heartbeat version {0}")]
    Version(u32),
    /// The session id is empty, too long or not printable ASCII.
    #[error("session id must be 1 to {MAX_SESSION_ID_LEN} printable ASCII characters")]
    Session,
    /// A secret is configured and the MAC is missing.
    #[error("heartbeat is not authenticated")]
    Unauthenticated,
    /// The MAC does not match.
    #[error("heartbeat MAC does not match")]
    BadMac,
}

impl HeartbeatError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            HeartbeatError::TooLarge => "too_large",
            HeartbeatError::Malformed(_) => "malformed",
            HeartbeatError::Version(_) => "version",
            HeartbeatError::Session => "session",
            HeartbeatError::Unauthenticated => "unauthenticated",
            HeartbeatError::BadMac => "bad_mac",
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

fn mac_of(secret: &[u8], json: &[u8]) -> Option<Vec<u8>> {
    let mut mac = HmacSha256::new_from_slice(secret).ok()?;
    mac.update(json);
    Some(mac.finalize().into_bytes().to_vec())
}

impl Heartbeat {
    /// The datagram for this heartbeat, authenticated when `secret` is given.
    pub fn encode(&self, secret: Option<&[u8]>) -> Vec<u8> {
        // Serializing plain data to a Vec cannot fail.
        let mut out = serde_json::to_vec(self).unwrap_or_default();
        if let Some(mac) = secret.and_then(|s| mac_of(s, &out)) {
            out.extend_from_slice(MAC_PREFIX.as_bytes());
            out.extend_from_slice(hex::encode(mac).as_bytes());
        }
        out
    }

    /// Parses and checks a datagram. With `secret`, a valid MAC is required; without, a MAC
    /// that is present is ignored.
    pub fn decode(datagram: &[u8], secret: Option<&[u8]>) -> Result<Self, HeartbeatError> {
        if datagram.len() > MAX_HEARTBEAT_BYTES {
            return Err(HeartbeatError::TooLarge);
        }
        let split = find_last(datagram, MAC_PREFIX.as_bytes());
        let (json, mac_hex) = match split {
            Some(i) => (
                datagram.get(..i).unwrap_or_default(),
                datagram.get(i + MAC_PREFIX.len()..),
            ),
            None => (datagram, None),
        };
        if let Some(secret) = secret {
            let given = mac_hex
                .map(|h| hex::decode(h.trim_ascii()))
                .ok_or(HeartbeatError::Unauthenticated)?
                .map_err(|_| HeartbeatError::BadMac)?;
            let mut mac = HmacSha256::new_from_slice(secret).map_err(|_| HeartbeatError::BadMac)?;
            mac.update(json);
            mac.verify_slice(&given)
                .map_err(|_| HeartbeatError::BadMac)?;
        }
        let hb: Heartbeat =
            serde_json::from_slice(json).map_err(|e| HeartbeatError::Malformed(e.to_string()))?;
        if hb.v != HEARTBEAT_VERSION {
            return Err(HeartbeatError::Version(hb.v));
        }
        if hb.session.is_empty()
            || hb.session.len() > MAX_SESSION_ID_LEN
            || !hb.session.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(HeartbeatError::Session);
        }
        if !hb.load.cpu.is_finite() || hb.load.cpu < 0.0 {
            return Err(HeartbeatError::Malformed("load.cpu".into()));
        }
        Ok(hb)
    }
}

fn find_last(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() > hay.len() {
        return None;
    }
    (0..=hay.len() - needle.len())
        .rev()
        .find(|&i| hay.get(i..i + needle.len()) == Some(needle))
}

/// A fresh random session id (32 hex digits).
pub fn new_session_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Settings of a [`HeartbeatSender`].
#[derive(Debug, Clone)]
pub struct HeartbeatSenderConfig {
    /// This node's id.
    pub node: NodeId,
    /// This node's SIP address as the balancers should reach it.
    pub sip: SocketAddr,
    /// This node's device (QUIC) address.
    pub quic: Option<SocketAddr>,
    /// Heartbeat addresses of the balancers.
    pub balancers: Vec<SocketAddr>,
    /// Time between heartbeats (default 1 s).
    pub interval: Duration,
    /// Shared secret that authenticates heartbeats.
    pub secret: Option<Vec<u8>>,
    /// Local address to send from (default `0.0.0.0:0`).
    pub bind: SocketAddr,
}

impl HeartbeatSenderConfig {
    /// Defaults for a node: 1 s interval, no secret, ephemeral local port.
    pub fn new(node: NodeId, sip: SocketAddr, balancers: Vec<SocketAddr>) -> Self {
        Self {
            node,
            sip,
            quic: None,
            balancers,
            interval: Duration::from_secs(1),
            secret: None,
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }
}

struct SenderShared {
    draining: AtomicBool,
    load: Mutex<Load>,
    sent: AtomicU64,
    wake: Notify,
}

/// Sends this node's heartbeats to the balancers every interval, from its start until it is
/// stopped or dropped. A change of the draining flag is sent at once.
pub struct HeartbeatSender {
    session: String,
    shared: Arc<SenderShared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for HeartbeatSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatSender")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl HeartbeatSender {
    /// Binds the sending socket and starts the task, with a new random session id. The first
    /// heartbeat goes out at once.
    pub async fn start(config: HeartbeatSenderConfig) -> std::io::Result<Self> {
        let socket = UdpSocket::bind(config.bind).await?;
        let session = new_session_id();
        let shared = Arc::new(SenderShared {
            draining: AtomicBool::new(false),
            load: Mutex::new(Load::default()),
            sent: AtomicU64::new(0),
            wake: Notify::new(),
        });
        let task = tokio::spawn(send_loop(
            socket,
            config,
            session.clone(),
            Arc::clone(&shared),
        ));
        Ok(Self {
            session,
            shared,
            task: Mutex::new(Some(task)),
        })
    }

    /// This process's session id.
    pub fn session_id(&self) -> &str {
        &self.session
    }

    /// Announces (or withdraws) draining; sent at once.
    pub fn set_draining(&self, draining: bool) {
        if self.shared.draining.swap(draining, Ordering::Relaxed) != draining {
            self.shared.wake.notify_one();
        }
    }

    /// Updates the load figures carried by the next heartbeats.
    pub fn set_load(&self, load: Load) {
        if let Ok(mut l) = self.shared.load.lock() {
            *l = load;
        }
    }

    /// Heartbeat datagrams sent so far (one per balancer per interval).
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// Stops sending (the balancers take the node out after their miss window).
    pub fn stop(&self) {
        if let Ok(mut task) = self.task.lock() {
            if let Some(t) = task.take() {
                t.abort();
            }
        }
    }
}

impl Drop for HeartbeatSender {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn send_loop(
    socket: UdpSocket,
    config: HeartbeatSenderConfig,
    session: String,
    shared: Arc<SenderShared>,
) {
    let mut ticker = tokio::time::interval(config.interval.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shared.wake.notified() => {}
        }
        seq += 1;
        let load = shared.load.lock().map(|l| *l).unwrap_or_default();
        let hb = Heartbeat {
            v: HEARTBEAT_VERSION,
            node: config.node.clone(),
            session: session.clone(),
            seq,
            sip: config.sip,
            quic: config.quic,
            draining: shared.draining.load(Ordering::Relaxed),
            load,
        };
        let datagram = hb.encode(config.secret.as_deref());
        for balancer in &config.balancers {
            match socket.send_to(&datagram, balancer).await {
                Ok(_) => {
                    shared.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(%balancer, error = %e, "heartbeat send failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb() -> Heartbeat {
        Heartbeat {
            v: 1,
            node: NodeId::new("n1").unwrap(),
            session: "abc123".into(),
            seq: 7,
            sip: "10.0.0.5:5060".parse().unwrap(),
            quic: Some("10.0.0.5:4433".parse().unwrap()),
            draining: true,
            load: Load {
                devices: 3,
                calls: 1,
                cpu: 0.5,
            },
        }
    }

    #[test]
    fn round_trip_without_and_with_secret() {
        let h = hb();
        assert_eq!(Heartbeat::decode(&h.encode(None), None).unwrap(), h);
        let signed = h.encode(Some(b"s3cret"));
        assert_eq!(Heartbeat::decode(&signed, Some(b"s3cret")).unwrap(), h);
        // A balancer without a secret ignores the MAC.
        assert_eq!(Heartbeat::decode(&signed, None).unwrap(), h);
    }

    #[test]
    fn secret_is_enforced() {
        let h = hb();
        assert_eq!(
            Heartbeat::decode(&h.encode(None), Some(b"k")),
            Err(HeartbeatError::Unauthenticated)
        );
        assert_eq!(
            Heartbeat::decode(&h.encode(Some(b"other")), Some(b"k")),
            Err(HeartbeatError::BadMac)
        );
        let mut tampered = h.encode(Some(b"k"));
        let pos = tampered.iter().position(|&b| b == b'7').unwrap();
        tampered[pos] = b'8';
        assert_eq!(
            Heartbeat::decode(&tampered, Some(b"k")),
            Err(HeartbeatError::BadMac)
        );
    }

    #[test]
    fn the_documented_format_parses() {
        let text = br#"{"v":1,"node":"gw-2","session":"5f0c","seq":1,"sip":"192.0.2.7:5060"}"#;
        let h = Heartbeat::decode(text, None).unwrap();
        assert_eq!(h.node.as_str(), "gw-2");
        assert!(!h.draining);
        assert_eq!(h.quic, None);
        assert_eq!(h.load, Load::default());
    }

    #[test]
    fn bad_datagrams_are_rejected() {
        assert_eq!(
            Heartbeat::decode(&vec![b' '; MAX_HEARTBEAT_BYTES + 1], None),
            Err(HeartbeatError::TooLarge)
        );
        assert!(matches!(
            Heartbeat::decode(b"not json", None),
            Err(HeartbeatError::Malformed(_))
        ));
        let mut h = hb();
        h.v = 2;
        assert_eq!(
            Heartbeat::decode(&h.encode(None), None),
            Err(HeartbeatError::Version(2))
        );
        let mut h = hb();
        h.session = "has space".into();
        assert_eq!(
            Heartbeat::decode(&h.encode(None), None),
            Err(HeartbeatError::Session)
        );
        let unknown = br#"{"v":1,"node":"n","session":"s","seq":1,"sip":"1.2.3.4:5","x":1}"#;
        assert!(Heartbeat::decode(unknown, None).is_err());
        let bad_node = br#"{"v":1,"node":"a b","session":"s","seq":1,"sip":"1.2.3.4:5"}"#;
        assert!(Heartbeat::decode(bad_node, None).is_err());
    }

    #[test]
    fn session_ids_differ() {
        assert_ne!(new_session_id(), new_session_id());
        assert_eq!(new_session_id().len(), 32);
    }

    #[tokio::test]
    async fn sender_sends_heartbeats_and_draining_at_once() {
        let receiver = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut config = HeartbeatSenderConfig::new(
            NodeId::new("n9").unwrap(),
            "127.0.0.1:5099".parse().unwrap(),
            vec![receiver.local_addr().unwrap()],
        );
        config.interval = Duration::from_secs(3600);
        config.secret = Some(b"k".to_vec());
        let sender = HeartbeatSender::start(config).await.unwrap();
        let mut buf = [0u8; 4096];
        let wait = Duration::from_secs(5);
        let (n, _) = tokio::time::timeout(wait, receiver.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let first = Heartbeat::decode(&buf[..n], Some(b"k")).unwrap();
        assert_eq!(first.seq, 1);
        assert_eq!(first.session, sender.session_id());
        assert!(!first.draining);
        sender.set_load(Load {
            devices: 2,
            calls: 0,
            cpu: 0.0,
        });
        sender.set_draining(true);
        let (n, _) = tokio::time::timeout(wait, receiver.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let second = Heartbeat::decode(&buf[..n], Some(b"k")).unwrap();
        assert_eq!(second.seq, 2);
        assert!(second.draining);
        assert_eq!(second.load.devices, 2);
        assert_eq!(sender.sent(), 2);
        sender.stop();
    }
}
