//! Node heartbeats: the datagram format (sans-IO encode and decode) of a node's heartbeat and
//! of the live-set report a balancer answers it with.
//!
//! A heartbeat is one UDP datagram holding a JSON object (format in `docs/balancer.md`):
//! node id, a session id that changes on every process start, a sequence number, the node's
//! SIP and device (QUIC) addresses, its load and whether it is draining. With a shared secret
//! the JSON is followed by a line `hmac-sha256=<hex>` computed over the JSON bytes, and a
//! balancer with a secret rejects datagrams without a valid one.
//!
//! A balancer answers each heartbeat it accepts with a [`LiveSetReport`]: the nodes eligible
//! for new work and their device addresses, authenticated the same way. A node keeps the latest
//! report as its [`LiveSet`], which is how it learns the live set from the balancer and sends a
//! device that is not its own to its owner. This module neither sends nor receives (the
//! gateway's heartbeat sender and the balancer's server do) and does not decide liveness (the
//! balancer's membership does).

use std::net::SocketAddr;
use std::time::Instant;

use crate::hash::NodeId;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Version of the heartbeat format.
pub const HEARTBEAT_VERSION: u32 = 1;
/// Largest heartbeat datagram accepted, in bytes (room for [`MAX_PINS`] pins).
pub const MAX_HEARTBEAT_BYTES: usize = 16 * 1024;
/// Most device pins one heartbeat carries (see [`Heartbeat::pinned`]).
pub const MAX_PINS: usize = 640;
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
    /// When it was sent: Unix time in milliseconds (0 from a sender that does not say). With a
    /// secret, a balancer refuses one outside its clock window (see [`check_fresh`]), so a
    /// recorded heartbeat cannot be replayed later.
    #[serde(default)]
    pub ts_ms: u64,
    /// Devices whose session (and calls) this node keeps although another node owns them by
    /// the rendezvous hash, as [`key_hash`](crate::hash::key_hash)es of their ids: a device
    /// that moved here when its owner died and still has a call here when the owner is back.
    /// A balancer routes requests for these devices (new calls and in-dialog requests alike)
    /// here instead of to the owner. At most [`MAX_PINS`]; absent when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pinned: Vec<u64>,
    /// How long the node's dialog store has not answered, ms (0, and absent: it answers). A
    /// balancer lists the nodes that say so in its reports (`store_down`), so that a node cut off
    /// from the store alone can tell and step aside.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub store_down_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
    /// Sent too long ago (or too far ahead): a replay, or clocks too far apart.
    #[error("timestamp {skew_ms} ms away from this clock")]
    Clock {
        /// How far the timestamp is from the receiver's clock, milliseconds.
        skew_ms: u64,
    },
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
            HeartbeatError::Clock { .. } => "clock",
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
        if hb.pinned.len() > MAX_PINS {
            return Err(HeartbeatError::Malformed("too many pinned devices".into()));
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
/// and not draining), so that the node computes [`owner`](crate::hash::owner) over the same
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
    /// When it was sent: Unix time in milliseconds (0 from a balancer that does not say).
    #[serde(default)]
    pub ts_ms: u64,
    /// Every node the balancer holds up, draining ones included (the fence's live set).
    #[serde(default)]
    pub alive: Vec<NodeId>,
    /// The silence after which the balancer takes a node out, in ms (0: not said).
    #[serde(default)]
    pub silence_ms: u64,
    /// How long the balancer has been running, in ms (a balancer up for less than its silence
    /// window does not know all its members yet).
    #[serde(default)]
    pub up_ms: u64,
    /// The nodes in `alive` whose last heartbeat said their dialog store does not answer
    /// (absent when none: a node of an older release, which does not know the field, reads the
    /// reports as before while every store answers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub store_down: Vec<NodeId>,
}

/// Checks a timestamp (`ts_ms`, Unix milliseconds) against the receiver's clock (`now_ms`):
/// refused when more than `window_ms` away either way. A timestamp of 0 (a sender that does
/// not say) is refused too: a receiver with a secret calls this, and every sender of this
/// version stamps its datagrams.
pub fn check_fresh(ts_ms: u64, now_ms: u64, window_ms: u64) -> Result<(), HeartbeatError> {
    let skew_ms = ts_ms.abs_diff(now_ms);
    if ts_ms == 0 || skew_ms > window_ms {
        return Err(HeartbeatError::Clock { skew_ms });
    }
    Ok(())
}

/// Unix time in milliseconds from a `SystemTime` (0 before 1970).
pub fn unix_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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
    /// Every node the balancer holds up, draining ones included (`None` from a balancer of an
    /// older release, which does not say).
    pub alive: Option<Vec<NodeId>>,
    /// The balancer had been up for its whole silence window when it reported, so it knows
    /// every node that heartbeats it (`true` from a balancer of an older release, which does
    /// not say). A report of a balancer that just (re)started may miss nodes.
    pub settled: bool,
    /// The alive nodes whose dialog store does not answer, as they said in their heartbeats.
    pub store_down: Vec<NodeId>,
}

impl LiveSet {
    /// Whether another node than `node`, alive for the balancer, reaches the dialog store (its
    /// heartbeat does not say otherwise): then `node` alone lost the store. `false` when the
    /// balancer does not say who is alive.
    pub fn store_reached_by_another(&self, node: &NodeId) -> bool {
        self.alive.as_ref().is_some_and(|alive| {
            alive
                .iter()
                .any(|n| n != node && !self.store_down.contains(n))
        })
    }

    /// Whether the balancer said `node` is not up (it took the node out). `false` when the
    /// balancer does not say.
    pub fn says_down(&self, node: &NodeId) -> bool {
        self.alive
            .as_ref()
            .is_some_and(|alive| !alive.contains(node))
    }

    /// The owner of `key` (a device id) among the eligible nodes.
    pub fn owner(&self, key: &str) -> Option<&LiveNode> {
        let id = crate::hash::owner(key, self.eligible.iter().map(|n| &n.node))?;
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
            ts_ms: 1_800_000_000_000,
            pinned: Vec::new(),
            store_down_ms: 0,
        }
    }

    #[test]
    fn timestamps_outside_the_window_are_refused() {
        let now = 1_800_000_000_000;
        assert_eq!(check_fresh(now - 5_000, now, 10_000), Ok(()));
        assert_eq!(check_fresh(now + 5_000, now, 10_000), Ok(()));
        assert_eq!(
            check_fresh(now - 10_001, now, 10_000),
            Err(HeartbeatError::Clock { skew_ms: 10_001 })
        );
        assert_eq!(
            check_fresh(now + 60_000, now, 10_000),
            Err(HeartbeatError::Clock { skew_ms: 60_000 })
        );
        assert!(check_fresh(0, now, 10_000).is_err());
        // The timestamp is under the MAC: changing it breaks the datagram.
        let h = hb();
        let signed = String::from_utf8(h.encode(Some(b"k"))).unwrap();
        let forged = signed.replace(&h.ts_ms.to_string(), &(h.ts_ms + 1).to_string());
        assert_eq!(
            Heartbeat::decode(forged.as_bytes(), Some(b"k")),
            Err(HeartbeatError::BadMac)
        );
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
            ts_ms: 0,
            alive: Vec::new(),
            silence_ms: 0,
            up_ms: 0,
            store_down: Vec::new(),
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
            alive: None,
            settled: true,
            store_down: Vec::new(),
        };
        let ids: Vec<NodeId> = r.eligible.iter().map(|n| n.node.clone()).collect();
        for i in 0..200 {
            let key = format!("dev-{i}");
            let got = live.owner(&key).unwrap();
            assert_eq!(Some(&got.node), crate::hash::owner(&key, &ids));
            assert!(got.quic.is_some());
        }
        let empty = LiveSet {
            eligible: Vec::new(),
            ..live
        };
        assert!(empty.owner("dev-1").is_none());
    }

    #[test]
    fn a_node_alone_without_the_store_knows_it_and_old_peers_see_no_new_field() {
        let id = |n: &str| NodeId::new(n).unwrap();
        let mut live = LiveSet {
            received: Instant::now(),
            from: "127.0.0.1:5070".parse().unwrap(),
            eligible: Vec::new(),
            alive: Some(vec![id("a"), id("b")]),
            settled: true,
            store_down: vec![id("a")],
        };
        assert!(live.store_reached_by_another(&id("a")));
        live.store_down.push(id("b"));
        assert!(
            !live.store_reached_by_another(&id("a")),
            "every node lost it"
        );
        live.store_down.clear();
        live.alive = Some(vec![id("a")]);
        assert!(!live.store_reached_by_another(&id("a")), "no other node");
        live.alive = None;
        assert!(
            !live.store_reached_by_another(&id("a")),
            "the balancer does not say"
        );
        // While the store answers, the heartbeat and the report carry nothing new.
        let h = hb();
        assert!(!String::from_utf8_lossy(&h.encode(None)).contains("store_down"));
        let mut down = hb();
        down.store_down_ms = 2500;
        let text = down.encode(None);
        assert!(String::from_utf8_lossy(&text).contains("\"store_down_ms\":2500"));
        assert_eq!(Heartbeat::decode(&text, None).unwrap().store_down_ms, 2500);
        let r = report("s", 1, &["a"]);
        assert!(!String::from_utf8_lossy(&r.encode(None)).contains("store_down"));
    }
}
