//! Rendezvous (highest-random-weight) hashing of a routing key over a set of node ids.
//!
//! [`owner`] is a pure function: the same key and the same set of node ids give the same node in
//! every process, on every platform and in every version, so several balancers side by side and
//! the gateway nodes themselves make the same choice with no shared state. Its definition is
//! fixed (and written down in `docs/balancer.md`):
//!
//! * `key_hash(key) = SipHash-2-4(k0 = "thalamus", k1 = "rdv-key!", key bytes)`, the fixed keys
//!   being the 8 ASCII bytes read as little-endian `u64`s;
//! * `weight(node, kh) = SipHash-2-4(k0 = "thalamus", k1 = "rdv-node", kh as 8 little-endian
//!   bytes ++ node id bytes)`;
//! * the owner is the node with the highest weight; equal weights (practically never) go to the
//!   greater node id.
//!
//! Removing a node moves only the keys that node owned; adding one moves to it only the keys it
//! now wins. SipHash-2-4 is implemented here from its specification (Aumasson and Bernstein,
//! 2012) and checked against the paper's test vectors; it is used as a well-mixed hash, not as a
//! secret-keyed MAC. This module keeps no state and does no I/O.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest node id, in bytes.
pub const MAX_NODE_ID_LEN: usize = 64;

/// A node id: 1 to 64 of `A-Z a-z 0-9 . _ -`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(Arc<str>);

/// A node id that breaks the rules of [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node id must be 1 to {MAX_NODE_ID_LEN} of A-Z a-z 0-9 . _ -")]
pub struct InvalidNodeId;

impl NodeId {
    /// Checks and wraps a node id.
    pub fn new(id: &str) -> Result<Self, InvalidNodeId> {
        if id.is_empty()
            || id.len() > MAX_NODE_ID_LEN
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(InvalidNodeId);
        }
        Ok(Self(Arc::from(id)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = InvalidNodeId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        NodeId::new(&s)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> Self {
        id.0.to_string()
    }
}

impl std::str::FromStr for NodeId {
    type Err = InvalidNodeId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeId::new(s)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", &self.0)
    }
}

const K0: u64 = u64::from_le_bytes(*b"thalamus");
const K1_KEY: u64 = u64::from_le_bytes(*b"rdv-key!");
const K1_NODE: u64 = u64::from_le_bytes(*b"rdv-node");
const K1_MISC: u64 = u64::from_le_bytes(*b"lb-misc!");

/// The 64-bit hash of a routing key (the first half of [`owner`]).
pub fn key_hash(key: &str) -> u64 {
    siphash24(K0, K1_KEY, &[key.as_bytes()])
}

/// The rendezvous weight of `node` for the key whose hash is `key_hash`.
pub fn weight(node: &NodeId, key_hash: u64) -> u64 {
    siphash24(
        K0,
        K1_NODE,
        &[&key_hash.to_le_bytes(), node.as_str().as_bytes()],
    )
}

/// The node that owns `key` among `nodes`: the one with the highest [`weight`]; `None` when
/// `nodes` is empty. Order and duplicates in `nodes` do not matter.
pub fn owner<'a, I>(key: &str, nodes: I) -> Option<&'a NodeId>
where
    I: IntoIterator<Item = &'a NodeId>,
{
    owner_by_hash(key_hash(key), nodes)
}

/// [`owner`] for a key already hashed with [`key_hash`] (the balancer carries the hash in its
/// Record-Route so in-dialog requests need not find the key again).
pub fn owner_by_hash<'a, I>(key_hash: u64, nodes: I) -> Option<&'a NodeId>
where
    I: IntoIterator<Item = &'a NodeId>,
{
    let mut best: Option<(u64, &'a NodeId)> = None;
    for node in nodes {
        let w = weight(node, key_hash);
        best = match best {
            Some((bw, bn)) if bw > w || (bw == w && bn >= node) => Some((bw, bn)),
            _ => Some((w, node)),
        };
    }
    best.map(|(_, n)| n)
}

/// A stable 64-bit hash of several byte strings (each length-prefixed so that boundaries
/// matter), for identifiers the balancer derives statelessly (Via branches, To tags).
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h = StableHasher::new();
    for p in parts {
        h.part(p);
    }
    h.finish()
}

/// [`stable_hash`] built part by part, where a part may also be the text of a value written
/// straight into the hash ([`StableHasher::part_display`]) instead of into a string first.
#[derive(Debug, Clone)]
pub struct StableHasher(SipHasher24);

impl Default for StableHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl StableHasher {
    /// An empty hash: [`finish`](Self::finish) after the parts of `stable_hash(parts)` gives
    /// the same value.
    pub fn new() -> Self {
        Self(SipHasher24::new(K0, K1_MISC))
    }

    /// Adds one byte string, length-prefixed as [`stable_hash`] does.
    pub fn part(&mut self, bytes: &[u8]) {
        self.0.write(&(bytes.len() as u64).to_le_bytes());
        self.0.write(bytes);
    }

    /// Adds the text `value` displays, followed by a 0xFF byte (which no UTF-8 text holds, so
    /// the boundary still matters), with no string allocated for it.
    pub fn part_display(&mut self, value: &dyn fmt::Display) {
        use fmt::Write as _;
        // Writing into the hash cannot fail; a `Display` that fails leaves what it wrote.
        let _ = write!(TextSink(&mut self.0), "{value}");
        self.0.write(&[0xff]);
    }

    /// The hash of the parts added.
    pub fn finish(self) -> u64 {
        self.0.finish()
    }
}

/// Text written into a hash state.
struct TextSink<'a>(&'a mut SipHasher24);

impl fmt::Write for TextSink<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.write(s.as_bytes());
        Ok(())
    }
}

/// SipHash-2-4 of the concatenation of `parts`.
pub fn siphash24(k0: u64, k1: u64, parts: &[&[u8]]) -> u64 {
    let mut h = SipHasher24::new(k0, k1);
    for p in parts {
        h.write(p);
    }
    h.finish()
}

/// A streaming SipHash-2-4 state.
#[derive(Debug, Clone)]
struct SipHasher24 {
    v: [u64; 4],
    tail: u64,
    ntail: usize,
    length: usize,
}

impl SipHasher24 {
    fn new(k0: u64, k1: u64) -> Self {
        Self {
            v: [
                k0 ^ 0x736f_6d65_7073_6575,
                k1 ^ 0x646f_7261_6e64_6f6d,
                k0 ^ 0x6c79_6765_6e65_7261,
                k1 ^ 0x7465_6462_7974_6573,
            ],
            tail: 0,
            ntail: 0,
            length: 0,
        }
    }

    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13);
        v[1] ^= v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16);
        v[3] ^= v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21);
        v[3] ^= v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17);
        v[1] ^= v[2];
        v[2] = v[2].rotate_left(32);
    }

    fn compress(&mut self, m: u64) {
        self.v[3] ^= m;
        Self::round(&mut self.v);
        Self::round(&mut self.v);
        self.v[0] ^= m;
    }

    fn write(&mut self, bytes: &[u8]) {
        self.length = self.length.wrapping_add(bytes.len());
        let mut rest = bytes;
        // Fill the pending word first.
        while self.ntail != 0 {
            let Some((&b, r)) = rest.split_first() else {
                return;
            };
            self.tail |= u64::from(b) << (8 * self.ntail);
            self.ntail += 1;
            rest = r;
            if self.ntail == 8 {
                let m = self.tail;
                self.compress(m);
                self.tail = 0;
                self.ntail = 0;
            }
        }
        let mut chunks = rest.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.compress(u64::from_le_bytes(word));
        }
        for (i, &b) in chunks.remainder().iter().enumerate() {
            self.tail |= u64::from(b) << (8 * i);
        }
        self.ntail = chunks.remainder().len();
    }

    fn finish(mut self) -> u64 {
        let b = ((self.length as u64 & 0xff) << 56) | self.tail;
        self.compress(b);
        self.v[2] ^= 0xff;
        for _ in 0..4 {
            Self::round(&mut self.v);
        }
        self.v[0] ^ self.v[1] ^ self.v[2] ^ self.v[3]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paper_key() -> (u64, u64) {
        let key: Vec<u8> = (0u8..16).collect();
        let mut k0 = [0u8; 8];
        let mut k1 = [0u8; 8];
        k0.copy_from_slice(&key[..8]);
        k1.copy_from_slice(&key[8..]);
        (u64::from_le_bytes(k0), u64::from_le_bytes(k1))
    }

    #[test]
    fn siphash_matches_the_paper_vectors() {
        let (k0, k1) = paper_key();
        let msg: Vec<u8> = (0u8..15).collect();
        assert_eq!(siphash24(k0, k1, &[&msg]), 0xa129_ca61_49be_45e5);
        assert_eq!(siphash24(k0, k1, &[]), 0x726f_db47_dd0e_0e31);
    }

    #[test]
    fn streaming_equals_one_shot_at_every_split() {
        let (k0, k1) = paper_key();
        let msg: Vec<u8> = (0u8..40).map(|b| b.wrapping_mul(37)).collect();
        let whole = siphash24(k0, k1, &[&msg]);
        for i in 0..=msg.len() {
            for j in i..=msg.len() {
                assert_eq!(
                    siphash24(k0, k1, &[&msg[..i], &msg[i..j], &msg[j..]]),
                    whole,
                    "split {i} {j}"
                );
            }
        }
    }

    #[test]
    fn values_are_pinned_across_versions() {
        // Every balancer and node of a cluster must compute these same values, whatever their
        // version: a change here re-homes every device. Never update them casually.
        assert_eq!(key_hash("earpiece-1"), 0x95dd_4a98_4b8a_68d5);
        assert_eq!(key_hash(""), 0x3ffe_aa0b_1f86_efda);
        let n = NodeId::new("node-a").unwrap();
        assert_eq!(weight(&n, key_hash("earpiece-1")), 0x96e0_3ec7_3e88_e485);
        let nodes: Vec<NodeId> = ["gw-1", "gw-2", "gw-3", "gw-4"]
            .iter()
            .map(|s| NodeId::new(s).unwrap())
            .collect();
        let owners: Vec<&str> = (0..12)
            .map(|i| owner(&format!("earpiece-{i}"), &nodes).unwrap().as_str())
            .collect();
        assert_eq!(
            owners,
            [
                "gw-2", "gw-3", "gw-3", "gw-2", "gw-3", "gw-2", "gw-1", "gw-4", "gw-2", "gw-1",
                "gw-2", "gw-4"
            ]
        );
        assert_eq!(stable_hash(&[b"ab", b"c"]), 0x34a5_39da_c510_1050);
    }

    #[test]
    fn owner_ignores_order_and_handles_empty() {
        let nodes: Vec<NodeId> = ["a", "b", "c", "d"]
            .iter()
            .map(|s| NodeId::new(s).unwrap())
            .collect();
        let mut reversed = nodes.clone();
        reversed.reverse();
        for i in 0..500 {
            let key = format!("dev-{i}");
            assert_eq!(owner(&key, &nodes), owner(&key, &reversed));
        }
        assert_eq!(owner("x", &[] as &[NodeId]), None);
        assert_eq!(owner("x", &nodes[..1]), Some(&nodes[0]));
    }

    #[test]
    fn owner_is_the_highest_weight() {
        let nodes: Vec<NodeId> = (0..7)
            .map(|i| NodeId::new(&format!("n{i}")).unwrap())
            .collect();
        for i in 0..200 {
            let key = format!("k{i}");
            let kh = key_hash(&key);
            let best = nodes.iter().max_by_key(|n| weight(n, kh)).unwrap();
            assert_eq!(owner(&key, &nodes), Some(best));
        }
    }

    #[test]
    fn node_ids_are_checked() {
        assert!(NodeId::new("node-1.eu_west").is_ok());
        assert_eq!(NodeId::new(""), Err(InvalidNodeId));
        assert_eq!(NodeId::new("a b"), Err(InvalidNodeId));
        assert_eq!(NodeId::new(&"x".repeat(65)), Err(InvalidNodeId));
        assert!(NodeId::new(&"x".repeat(64)).is_ok());
        let id: NodeId = serde_json::from_str("\"n1\"").unwrap();
        assert_eq!(id.as_str(), "n1");
        assert!(serde_json::from_str::<NodeId>("\"n 1\"").is_err());
    }

    #[test]
    fn stable_hash_separates_parts() {
        assert_ne!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"a", b"bc"]));
        assert_eq!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"ab", b"c"]));
    }

    #[test]
    fn the_streaming_hasher_matches_stable_hash_and_separates_displayed_parts() {
        let mut h = StableHasher::new();
        h.part(b"ab");
        h.part(b"c");
        assert_eq!(h.finish(), stable_hash(&[b"ab", b"c"]));
        let displayed = |a: &str, b: &[u8]| {
            let mut h = StableHasher::new();
            h.part_display(&a);
            h.part(b);
            h.finish()
        };
        // The text is terminated, so where it ends matters.
        assert_ne!(displayed("ab", b"c"), displayed("a", b"bc"));
        assert_ne!(displayed("", b"x"), displayed("x", b""));
        assert_eq!(displayed("ab", b"c"), displayed("ab", b"c"));
        // Text streamed in pieces hashes as the same text written at once.
        struct Pieces;
        impl fmt::Display for Pieces {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("sip:")?;
                f.write_str("alice@")?;
                f.write_str("example.com:5060")
            }
        }
        let mut h = StableHasher::new();
        h.part_display(&Pieces);
        let mut g = StableHasher::new();
        g.part_display(&"sip:alice@example.com:5060");
        assert_eq!(h.finish(), g.finish());
    }
}
