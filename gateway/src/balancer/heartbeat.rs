//! Node heartbeats: the datagram format (sans-IO encode/decode) and [`HeartbeatSender`], the
//! tokio task a gateway node runs to announce itself to one or more balancers.
//!
//! A heartbeat is one UDP datagram holding a JSON object (format in `docs/balancer.md`):
//! node id, a session id that changes on every process start, a sequence number, the node's
//! SIP and device (QUIC) addresses, its load and whether it is draining. With a shared secret
//! the JSON is followed by a line `hmac-sha256=<hex>` computed over the JSON bytes, and a
//! balancer with a secret rejects datagrams without a valid one.
//!
//! A balancer answers each heartbeat it accepts with a [`LiveSetReport`]: the nodes eligible
//! for new work and their device addresses, authenticated the same way. [`HeartbeatSender`]
//! keeps the latest report ([`HeartbeatSender::live_set`]), which is how a node learns the live
//! set from the balancer and sends a device that is not its own to its owner. This module does
//! not decide liveness (see `membership`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
/// Largest live-set report datagram, in bytes (256 nodes with long ids fit).
pub const MAX_REPORT_BYTES: usize = 48 * 1024;
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
        seal(serde_json::to_vec(self).unwrap_or_default(), secret)
    }

    /// Parses and checks a datagram. With `secret`, a valid MAC is required; without, a MAC
    /// that is present is ignored.
    pub fn decode(datagram: &[u8], secret: Option<&[u8]>) -> Result<Self, HeartbeatError> {
        let json = open_sealed(datagram, secret, MAX_HEARTBEAT_BYTES)?;
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

/// Appends the MAC line to `json` when a secret is given.
fn seal(mut json: Vec<u8>, secret: Option<&[u8]>) -> Vec<u8> {
    if let Some(mac) = secret.and_then(|s| mac_of(s, &json)) {
        json.extend_from_slice(MAC_PREFIX.as_bytes());
        json.extend_from_slice(hex::encode(mac).as_bytes());
    }
    json
}

/// Checks the size and (with a secret) the MAC of a datagram and returns its JSON part.
fn open_sealed<'a>(
    datagram: &'a [u8],
    secret: Option<&[u8]>,
    max: usize,
) -> Result<&'a [u8], HeartbeatError> {
    if datagram.len() > max {
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
    Ok(json)
}

/// A node eligible for new work, as a [`LiveSetReport`] lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveNode {
    /// Node id.
    pub node: NodeId,
    /// Its device (QUIC) address, where a device it owns is sent.
    #[serde(default)]
    pub quic: Option<SocketAddr>,
}

/// A balancer's answer to a heartbeat it accepted: the nodes eligible for new work now (up
/// and not draining), so that the node computes [`owner`](super::hash::owner) over the same
/// set the balancer routes by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveSetReport {
    /// Format version ([`HEARTBEAT_VERSION`]).
    pub v: u32,
    /// The node answered.
    pub to: NodeId,
    /// The session of the heartbeat answered.
    pub session: String,
    /// The sequence number of the heartbeat answered. A node takes a report only for its own
    /// session and newer than the last one it took, so a replayed report changes nothing.
    pub ack: u64,
    /// The eligible nodes.
    pub eligible: Vec<LiveNode>,
}

impl LiveSetReport {
    /// The datagram for this report, authenticated when `secret` is given.
    pub fn encode(&self, secret: Option<&[u8]>) -> Vec<u8> {
        // Serializing plain data to a Vec cannot fail.
        seal(serde_json::to_vec(self).unwrap_or_default(), secret)
    }

    /// Parses and checks a datagram (a valid MAC is required with `secret`).
    pub fn decode(datagram: &[u8], secret: Option<&[u8]>) -> Result<Self, HeartbeatError> {
        let json = open_sealed(datagram, secret, MAX_REPORT_BYTES)?;
        let report: LiveSetReport =
            serde_json::from_slice(json).map_err(|e| HeartbeatError::Malformed(e.to_string()))?;
        if report.v != HEARTBEAT_VERSION {
            return Err(HeartbeatError::Version(report.v));
        }
        Ok(report)
    }
}

/// The live set a node last learned from a balancer.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveSet {
    /// When the report arrived.
    pub received: Instant,
    /// The balancer that sent it.
    pub from: SocketAddr,
    /// The nodes eligible for new work.
    pub eligible: Vec<LiveNode>,
}

impl LiveSet {
    /// The owner of `key` (a device id) among the eligible nodes.
    pub fn owner(&self, key: &str) -> Option<&LiveNode> {
        let id = super::hash::owner(key, self.eligible.iter().map(|n| &n.node))?;
        self.eligible.iter().find(|n| &n.node == id)
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
    live: Mutex<Option<LiveSet>>,
    reports: AtomicU64,
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
            live: Mutex::new(None),
            reports: AtomicU64::new(0),
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

    /// The live set from the latest balancer report, if one arrived within `max_age`.
    pub fn live_set(&self, max_age: Duration) -> Option<LiveSet> {
        let live = self.shared.live.lock().ok()?;
        live.as_ref()
            .filter(|l| l.received.elapsed() <= max_age)
            .cloned()
    }

    /// Live-set reports taken so far.
    pub fn reports(&self) -> u64 {
        self.shared.reports.load(Ordering::Relaxed)
    }

    /// Whether the node announces draining.
    pub fn draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
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
    let mut last_ack: u64 = 0;
    let mut buf = vec![0u8; MAX_REPORT_BYTES + 1];
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shared.wake.notified() => {}
            r = socket.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    let datagram = buf.get(..n).unwrap_or_default();
                    take_report(&shared, &config, &session, seq, &mut last_ack, datagram, from);
                }
                continue;
            }
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

/// Keeps a balancer's report when it answers this session's heartbeat and is not older than
/// the last one kept.
fn take_report(
    shared: &SenderShared,
    config: &HeartbeatSenderConfig,
    session: &str,
    seq: u64,
    last_ack: &mut u64,
    datagram: &[u8],
    from: SocketAddr,
) {
    // The report must name this node's current session (random, 128 bits) and, with a
    // secret, carry a valid MAC; its source address is not checked, as a balancer bound to a
    // wildcard may answer from another of its addresses.
    let report = match LiveSetReport::decode(datagram, config.secret.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%from, error = %e, "live-set report rejected");
            return;
        }
    };
    if report.to != config.node || report.session != session || report.ack > seq {
        return;
    }
    // Reports of one heartbeat from several balancers are all taken; older ones are not.
    if report.ack < *last_ack {
        return;
    }
    *last_ack = report.ack;
    if let Ok(mut live) = shared.live.lock() {
        *live = Some(LiveSet {
            received: Instant::now(),
            from,
            eligible: report.eligible,
        });
    }
    shared.reports.fetch_add(1, Ordering::Relaxed);
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

    fn report(session: &str, ack: u64, nodes: &[&str]) -> LiveSetReport {
        LiveSetReport {
            v: HEARTBEAT_VERSION,
            to: NodeId::new("n9").unwrap(),
            session: session.into(),
            ack,
            eligible: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| LiveNode {
                    node: NodeId::new(n).unwrap(),
                    quic: Some(SocketAddr::from(([127, 0, 0, 1], 4433 + i as u16))),
                })
                .collect(),
        }
    }

    #[test]
    fn live_set_reports_round_trip_and_name_the_same_owner() {
        let r = report("s1", 4, &["a", "b", "c"]);
        let datagram = r.encode(Some(b"k"));
        assert_eq!(LiveSetReport::decode(&datagram, Some(b"k")).unwrap(), r);
        assert_eq!(
            LiveSetReport::decode(&datagram, Some(b"other")),
            Err(HeartbeatError::BadMac)
        );
        assert_eq!(
            LiveSetReport::decode(&r.encode(None), Some(b"k")),
            Err(HeartbeatError::Unauthenticated)
        );
        assert_eq!(
            LiveSetReport::decode(&vec![b' '; MAX_REPORT_BYTES + 1], None),
            Err(HeartbeatError::TooLarge)
        );
        assert!(matches!(
            LiveSetReport::decode(
                br#"{"v":1,"to":"bad id!","session":"s","ack":1,"eligible":[]}"#,
                None
            ),
            Err(HeartbeatError::Malformed(_))
        ));
        let live = LiveSet {
            received: Instant::now(),
            from: "127.0.0.1:5070".parse().unwrap(),
            eligible: r.eligible.clone(),
        };
        let ids: Vec<NodeId> = r.eligible.iter().map(|n| n.node.clone()).collect();
        for i in 0..200 {
            let key = format!("dev-{i}");
            let got = live.owner(&key).unwrap();
            assert_eq!(Some(&got.node), super::super::hash::owner(&key, &ids));
            assert!(got.quic.is_some());
        }
        let empty = LiveSet {
            eligible: Vec::new(),
            ..live
        };
        assert!(empty.owner("dev-1").is_none());
    }

    #[tokio::test]
    async fn sender_keeps_only_reports_for_its_own_session() {
        let balancer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut config = HeartbeatSenderConfig::new(
            NodeId::new("n9").unwrap(),
            "127.0.0.1:5099".parse().unwrap(),
            vec![balancer.local_addr().unwrap()],
        );
        config.interval = Duration::from_secs(3600);
        config.secret = Some(b"k".to_vec());
        config.bind = "127.0.0.1:0".parse().unwrap();
        let sender = HeartbeatSender::start(config).await.unwrap();
        let mut buf = [0u8; 4096];
        let wait = Duration::from_secs(5);
        let (n, node_addr) = tokio::time::timeout(wait, balancer.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let hb = Heartbeat::decode(&buf[..n], Some(b"k")).unwrap();
        assert!(sender.live_set(Duration::from_secs(60)).is_none());
        let mine = hb.session.as_str();
        // Ignored: another session, a bad MAC, an ack of a heartbeat not sent yet, another node.
        let mut other_node = report(mine, 1, &["x"]);
        other_node.to = NodeId::new("n8").unwrap();
        for bad in [
            report("someone-else", 1, &["x"]).encode(Some(b"k")),
            report(mine, 1, &["x"]).encode(Some(b"wrong")),
            report(mine, 2, &["x"]).encode(Some(b"k")),
            other_node.encode(Some(b"k")),
            b"garbage".to_vec(),
        ] {
            balancer.send_to(&bad, node_addr).await.unwrap();
        }
        balancer
            .send_to(&report(mine, 1, &["a", "b"]).encode(Some(b"k")), node_addr)
            .await
            .unwrap();
        let start = Instant::now();
        while sender.reports() == 0 {
            assert!(start.elapsed() < wait, "no report taken");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(sender.reports(), 1);
        let live = sender.live_set(Duration::from_secs(60)).unwrap();
        let names: Vec<&str> = live.eligible.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(live.from, balancer.local_addr().unwrap());
        // Too old for a zero max age.
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(sender.live_set(Duration::ZERO).is_none());
        // An older ack is ignored; the same ack again (a second balancer) is taken.
        balancer
            .send_to(&report(mine, 0, &["stale"]).encode(Some(b"k")), node_addr)
            .await
            .unwrap();
        balancer
            .send_to(&report(mine, 1, &["b"]).encode(Some(b"k")), node_addr)
            .await
            .unwrap();
        while sender.reports() < 2 {
            assert!(start.elapsed() < wait, "second report not taken");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(sender.reports(), 2);
        let live = sender.live_set(Duration::from_secs(60)).unwrap();
        assert_eq!(live.eligible.len(), 1);
        assert_eq!(live.eligible[0].node.as_str(), "b");
        sender.stop();
    }
}
