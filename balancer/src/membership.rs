//! The membership table: which gateway nodes are alive, fed by their heartbeats and a clock.
//!
//! Rules (times come in as `now`; nothing here reads a clock):
//! * A node never seen before is up on its first heartbeat.
//! * An up node with no heartbeat for `(miss_count + 1/2) × interval` is taken out ([`tick`]).
//! * A node that was taken out comes back only after `rejoin_count` consecutive heartbeats
//!   (consecutive sequence numbers of one session), so one lost heartbeat cannot flap it.
//! * A heartbeat with a new session id is a restart: counted, its sequence restarts, and the
//!   dialogs stamped with the old session are no longer routed to it (see `router`). A late
//!   heartbeat of the session it replaced is ignored.
//! * A draining node stays alive (its dialogs still reach it) but is not eligible for new calls.
//! * Nodes out for longer than `forget_after` are forgotten; the table holds at most
//!   `max_nodes` nodes.
//!
//! This module decides liveness only; it does not route and does no I/O.
//!
//! [`tick`]: Membership::tick

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use thalamus_ownership::hash::{stable_hash, NodeId};
use thalamus_ownership::heartbeat::{Heartbeat, Load};

/// Liveness settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipConfig {
    /// Expected time between heartbeats of a node.
    pub interval: Duration,
    /// Heartbeats a node may miss before it is taken out.
    pub miss_count: u32,
    /// Consecutive heartbeats a taken-out node needs to come back.
    pub rejoin_count: u32,
    /// A node out for this long is forgotten.
    pub forget_after: Duration,
    /// Most nodes in the table.
    pub max_nodes: usize,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            miss_count: 3,
            rejoin_count: 2,
            forget_after: Duration::from_secs(3600),
            max_nodes: 256,
        }
    }
}

impl MembershipConfig {
    /// How long an up node may stay silent: `(miss_count + 1/2) × interval`.
    pub fn silence_limit(&self) -> Duration {
        self.interval
            .saturating_mul(self.miss_count)
            .saturating_add(self.interval / 2)
    }
}

/// Whether a node is in or out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Alive: gets its in-dialog traffic, and new calls unless draining.
    Up,
    /// Taken out (missed heartbeats); coming back needs consecutive heartbeats.
    Down,
}

/// What changed in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A node never seen (or forgotten) sent its first heartbeat and is up.
    Joined(NodeId),
    /// A taken-out node is back after enough consecutive heartbeats.
    Rejoined(NodeId),
    /// A node missed too many heartbeats and is out.
    TakenOut(NodeId),
    /// A node came with a new session id.
    Restarted(NodeId),
    /// Heartbeats were lost (a gap in sequence numbers): how many.
    Missed(NodeId, u64),
    /// A node started draining.
    DrainStarted(NodeId),
    /// A node stopped draining.
    DrainStopped(NodeId),
    /// A node out for `forget_after` was removed.
    Forgotten(NodeId),
}

/// Why a heartbeat changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatIgnored {
    /// The table is full of other nodes.
    #[error("membership table full")]
    TableFull,
    /// Same session and a sequence number not above the last one (duplicate or reordered).
    #[error("stale heartbeat")]
    Stale,
    /// A heartbeat of a session this node already replaced.
    #[error("heartbeat of a replaced session")]
    OldSession,
}

/// One node as the table knows it.
#[derive(Debug, Clone)]
pub struct NodeEntry {
    /// Node id.
    pub id: NodeId,
    /// Current session id.
    pub session: String,
    /// Short hash of the session id (stamped in Record-Route as `ns`).
    pub session_tag: u32,
    previous_session: Option<String>,
    /// Latest heartbeat timestamp accepted from the node (Unix ms; 0: none said one).
    last_ts_ms: u64,
    /// Last sequence number seen.
    pub seq: u64,
    /// SIP address.
    pub sip: SocketAddr,
    /// Device (QUIC) address.
    pub quic: Option<SocketAddr>,
    /// Last reported load.
    pub load: Load,
    /// Draining flag.
    pub draining: bool,
    /// In or out.
    pub state: NodeState,
    /// When the last heartbeat arrived.
    pub last_heartbeat: Instant,
    /// When the state last changed.
    pub state_since: Instant,
    /// Consecutive heartbeats so far (counts toward `rejoin_count`).
    pub streak: u32,
    /// Restarts seen.
    pub restarts: u64,
    /// Heartbeats known lost.
    pub missed: u64,
    /// Heartbeats accepted.
    pub heartbeats: u64,
    counted_at_takeout: u64,
    /// Devices (key hashes) whose session the node keeps although another node owns them
    /// (from its latest heartbeat).
    pub pinned: Vec<u64>,
    /// How long the node's dialog store had not answered, per its latest heartbeat (0: it
    /// answers).
    pub store_down_ms: u64,
}

impl NodeEntry {
    /// Up and not draining: may get new calls.
    pub fn eligible(&self) -> bool {
        self.state == NodeState::Up && !self.draining
    }
}

/// A node's state as `/nodes` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStatus {
    /// Node id.
    pub id: String,
    /// `up` or `down`.
    pub state: NodeState,
    /// Draining flag.
    pub draining: bool,
    /// Up and not draining.
    pub eligible: bool,
    /// Session id.
    pub session: String,
    /// SIP address.
    pub sip: SocketAddr,
    /// Device (QUIC) address.
    pub quic: Option<SocketAddr>,
    /// Last reported load.
    pub load: Load,
    /// Milliseconds since the last heartbeat.
    pub last_heartbeat_ms: u64,
    /// Milliseconds in the current state.
    pub state_for_ms: u64,
    /// Restarts seen.
    pub restarts: u64,
    /// Heartbeats known lost.
    pub missed: u64,
    /// Heartbeats accepted.
    pub heartbeats: u64,
    /// Devices the node keeps although another node owns them (its latest heartbeat's pins).
    pub pinned: usize,
}

/// The session tag of a session id (8 hex digits in Record-Route).
pub fn session_tag(session: &str) -> u32 {
    (stable_hash(&[b"session", session.as_bytes()]) & 0xffff_ffff) as u32
}

/// The membership table.
#[derive(Debug, Clone)]
pub struct Membership {
    config: MembershipConfig,
    nodes: BTreeMap<NodeId, NodeEntry>,
    by_addr: HashMap<SocketAddr, NodeId>,
    alive: Vec<NodeId>,
    eligible: Vec<NodeId>,
    /// Pinned key hashes of up nodes, and the node that keeps each.
    pins: HashMap<u64, NodeId>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Membership {
    /// An empty table.
    pub fn new(config: MembershipConfig) -> Self {
        Self {
            config,
            nodes: BTreeMap::new(),
            by_addr: HashMap::new(),
            alive: Vec::new(),
            eligible: Vec::new(),
            pins: HashMap::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// Applies a heartbeat received from `source` at `now`.
    pub fn heartbeat(
        &mut self,
        hb: &Heartbeat,
        source: SocketAddr,
        now: Instant,
    ) -> Result<Vec<MembershipEvent>, HeartbeatIgnored> {
        let sip = if hb.sip.ip().is_unspecified() {
            SocketAddr::new(source.ip(), hb.sip.port())
        } else {
            hb.sip
        };
        // The device address follows the same rule, so a redirect names a reachable address.
        let quic = hb.quic.map(|q| {
            if q.ip().is_unspecified() {
                SocketAddr::new(source.ip(), q.port())
            } else {
                q
            }
        });
        let mut events = Vec::new();
        match self.nodes.get_mut(&hb.node) {
            None => {
                if self.nodes.len() >= self.config.max_nodes {
                    return Err(HeartbeatIgnored::TableFull);
                }
                self.nodes.insert(
                    hb.node.clone(),
                    NodeEntry {
                        id: hb.node.clone(),
                        session: hb.session.clone(),
                        session_tag: session_tag(&hb.session),
                        previous_session: None,
                        last_ts_ms: hb.ts_ms,
                        seq: hb.seq,
                        sip,
                        quic,
                        load: hb.load,
                        draining: hb.draining,
                        state: NodeState::Up,
                        last_heartbeat: now,
                        state_since: now,
                        streak: 1,
                        restarts: 0,
                        missed: 0,
                        heartbeats: 1,
                        counted_at_takeout: 0,
                        pinned: hb.pinned.clone(),
                        store_down_ms: hb.store_down_ms,
                    },
                );
                events.push(MembershipEvent::Joined(hb.node.clone()));
                if hb.draining {
                    events.push(MembershipEvent::DrainStarted(hb.node.clone()));
                }
            }
            Some(node) => {
                if node.session != hb.session {
                    if node.previous_session.as_deref() == Some(hb.session.as_str()) {
                        return Err(HeartbeatIgnored::OldSession);
                    }
                    // A new session must be newer than everything the node said before: a
                    // heartbeat of any earlier session, replayed, cannot take the node's id
                    // (and so lock the real node out). Dated heartbeats only; with a secret
                    // every heartbeat is dated.
                    if hb.ts_ms != 0 && hb.ts_ms <= node.last_ts_ms {
                        return Err(HeartbeatIgnored::OldSession);
                    }
                    let old = std::mem::replace(&mut node.session, hb.session.clone());
                    node.previous_session = Some(old);
                    node.session_tag = session_tag(&hb.session);
                    node.restarts += 1;
                    node.streak = 1;
                    node.counted_at_takeout = 0;
                    events.push(MembershipEvent::Restarted(hb.node.clone()));
                } else {
                    if hb.seq <= node.seq {
                        return Err(HeartbeatIgnored::Stale);
                    }
                    let gap = hb.seq - node.seq - 1;
                    if gap == 0 {
                        node.streak = node.streak.saturating_add(1);
                    } else {
                        node.streak = 1;
                        // Heartbeats already counted when the node was taken out are not
                        // counted twice.
                        let new = gap.saturating_sub(node.counted_at_takeout);
                        node.counted_at_takeout = 0;
                        if new > 0 {
                            node.missed += new;
                            events.push(MembershipEvent::Missed(hb.node.clone(), new));
                        }
                    }
                }
                node.seq = hb.seq;
                node.last_ts_ms = node.last_ts_ms.max(hb.ts_ms);
                node.sip = sip;
                node.quic = quic;
                node.load = hb.load;
                node.pinned.clone_from(&hb.pinned);
                node.store_down_ms = hb.store_down_ms;
                node.last_heartbeat = now;
                node.heartbeats += 1;
                if node.draining != hb.draining {
                    node.draining = hb.draining;
                    events.push(if hb.draining {
                        MembershipEvent::DrainStarted(hb.node.clone())
                    } else {
                        MembershipEvent::DrainStopped(hb.node.clone())
                    });
                }
                if node.state == NodeState::Down && node.streak >= self.config.rejoin_count {
                    node.state = NodeState::Up;
                    node.state_since = now;
                    events.push(MembershipEvent::Rejoined(hb.node.clone()));
                }
            }
        }
        self.rebuild();
        Ok(events)
    }

    /// Takes out silent nodes and forgets long-gone ones. Call it often (a few times per
    /// interval).
    pub fn tick(&mut self, now: Instant) -> Vec<MembershipEvent> {
        let limit = self.config.silence_limit();
        let mut events = Vec::new();
        let mut forget = Vec::new();
        for node in self.nodes.values_mut() {
            let silent = now.saturating_duration_since(node.last_heartbeat);
            match node.state {
                NodeState::Up if silent >= limit => {
                    node.state = NodeState::Down;
                    node.state_since = now;
                    node.streak = 0;
                    let counted = u64::from(self.config.miss_count);
                    node.missed += counted;
                    node.counted_at_takeout = counted;
                    events.push(MembershipEvent::Missed(node.id.clone(), counted));
                    events.push(MembershipEvent::TakenOut(node.id.clone()));
                }
                NodeState::Down if silent >= self.config.forget_after => {
                    forget.push(node.id.clone());
                }
                _ => {}
            }
        }
        for id in forget {
            self.nodes.remove(&id);
            events.push(MembershipEvent::Forgotten(id));
        }
        if !events.is_empty() {
            self.rebuild();
        }
        events
    }

    fn rebuild(&mut self) {
        self.alive.clear();
        self.eligible.clear();
        self.by_addr.clear();
        self.pins.clear();
        for node in self.nodes.values() {
            if node.state == NodeState::Up {
                for pin in &node.pinned {
                    // Two nodes pinning one device (its session just moved): the first by id.
                    self.pins.entry(*pin).or_insert_with(|| node.id.clone());
                }
                self.alive.push(node.id.clone());
                if !node.draining {
                    self.eligible.push(node.id.clone());
                }
            }
            self.by_addr.insert(node.sip, node.id.clone());
        }
    }

    /// Up nodes, sorted by id.
    pub fn alive(&self) -> &[NodeId] {
        &self.alive
    }

    /// The alive nodes whose latest heartbeat said their dialog store does not answer.
    pub fn store_down(&self) -> Vec<NodeId> {
        self.alive
            .iter()
            .filter(|id| self.nodes.get(*id).is_some_and(|n| n.store_down_ms > 0))
            .cloned()
            .collect()
    }

    /// Up and not draining nodes, sorted by id: the set new calls are hashed over.
    pub fn eligible(&self) -> &[NodeId] {
        &self.eligible
    }

    /// The up node that keeps the device whose key hash is `key_hash` although another node
    /// owns it (see [`Heartbeat::pinned`]), if any.
    pub fn pinned(&self, key_hash: u64) -> Option<&NodeEntry> {
        self.pins.get(&key_hash).and_then(|id| self.nodes.get(id))
    }

    /// A node by id.
    pub fn node(&self, id: &NodeId) -> Option<&NodeEntry> {
        self.nodes.get(id)
    }

    /// Every node, by id.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeEntry> {
        self.nodes.values()
    }

    /// True when `id` is up.
    pub fn is_alive(&self, id: &NodeId) -> bool {
        self.nodes.get(id).is_some_and(|n| n.state == NodeState::Up)
    }

    /// The node whose SIP address is `addr` (any state).
    pub fn node_at(&self, addr: SocketAddr) -> Option<&NodeEntry> {
        self.by_addr.get(&addr).and_then(|id| self.nodes.get(id))
    }

    /// The table as `/nodes` shows it.
    pub fn snapshot(&self, now: Instant) -> Vec<NodeStatus> {
        self.nodes
            .values()
            .map(|n| NodeStatus {
                id: n.id.to_string(),
                state: n.state,
                draining: n.draining,
                eligible: n.eligible(),
                session: n.session.clone(),
                sip: n.sip,
                quic: n.quic,
                load: n.load,
                last_heartbeat_ms: ms(now.saturating_duration_since(n.last_heartbeat)),
                state_for_ms: ms(now.saturating_duration_since(n.state_since)),
                restarts: n.restarts,
                missed: n.missed,
                heartbeats: n.heartbeats,
                pinned: n.pinned.len(),
            })
            .collect()
    }
}

#[cfg(test)]
// `Instant::now()` in tests only gives the virtual clock its origin.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use thalamus_ownership::heartbeat::HEARTBEAT_VERSION;

    const SEC: Duration = Duration::from_secs(1);

    fn hb(node: &str, session: &str, seq: u64) -> Heartbeat {
        Heartbeat {
            v: HEARTBEAT_VERSION,
            node: NodeId::new(node).unwrap(),
            session: session.into(),
            seq,
            sip: format!("10.0.0.{}:5060", node.len()).parse().unwrap(),
            quic: None,
            draining: false,
            load: Load::default(),
            ts_ms: 0,
            pinned: Vec::new(),
            store_down_ms: 0,
        }
    }

    fn src() -> SocketAddr {
        "10.9.9.9:4000".parse().unwrap()
    }

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[test]
    fn the_nodes_that_lost_their_store_are_listed_until_they_reach_it_again() {
        let mut m = Membership::new(MembershipConfig::default());
        let t0 = Instant::now();
        m.heartbeat(&hb("a", "s", 1), src(), t0).unwrap();
        m.heartbeat(&hb("b", "s", 1), src(), t0).unwrap();
        assert!(m.store_down().is_empty());
        let down = Heartbeat {
            store_down_ms: 1500,
            ..hb("b", "s", 2)
        };
        m.heartbeat(&down, src(), t0).unwrap();
        assert_eq!(m.store_down(), vec![id("b")]);
        m.heartbeat(&hb("b", "s", 3), src(), t0).unwrap();
        assert!(m.store_down().is_empty());
    }

    #[test]
    fn a_replayed_heartbeat_of_an_older_session_cannot_take_the_node() {
        // Heartbeat `seq` of a session, sent at time `seq` (sequence numbers restart with a
        // session, time does not).
        fn dated(node: &str, session: &str, t: u64) -> Heartbeat {
            Heartbeat {
                seq: t,
                ts_ms: t,
                ..hb(node, session, t)
            }
        }
        let mut m = Membership::new(MembershipConfig::default());
        let t0 = Instant::now();
        let src: SocketAddr = "10.0.0.1:5060".parse().unwrap();
        // Session s1 (ts 1, 2), then the node restarts as s2 (ts 3, 4), then as s3 (ts 5).
        m.heartbeat(&dated("a", "s1", 1), src, t0).unwrap();
        m.heartbeat(&dated("a", "s1", 2), src, t0).unwrap();
        m.heartbeat(&dated("a", "s2", 3), src, t0).unwrap();
        m.heartbeat(&dated("a", "s2", 4), src, t0).unwrap();
        m.heartbeat(&dated("a", "s3", 5), src, t0).unwrap();
        // A recording of s1 (older than the previous session) is refused, and the real
        // node's next heartbeat is still taken.
        assert_eq!(
            m.heartbeat(&dated("a", "s1", 2), src, t0),
            Err(HeartbeatIgnored::OldSession)
        );
        assert!(m.heartbeat(&dated("a", "s3", 6), src, t0).is_ok());
        assert_eq!(m.node(&NodeId::new("a").unwrap()).unwrap().session, "s3");
        // A genuine restart (a newer session, newer time) is taken.
        assert!(m.heartbeat(&dated("a", "s4", 7), src, t0).is_ok());
        assert_eq!(m.node(&NodeId::new("a").unwrap()).unwrap().restarts, 3);
    }

    #[test]
    fn join_then_miss_three_then_out() {
        let t0 = Instant::now();
        let mut m = Membership::new(MembershipConfig::default());
        let ev = m.heartbeat(&hb("a", "s1", 1), src(), t0).unwrap();
        assert_eq!(ev, vec![MembershipEvent::Joined(id("a"))]);
        assert_eq!(m.alive(), &[id("a")]);
        assert_eq!(m.eligible(), &[id("a")]);
        // Still up at 3 s of silence: the limit is 3.5 intervals.
        assert!(m.tick(t0 + 3 * SEC).is_empty());
        assert!(m.is_alive(&id("a")));
        let ev = m.tick(t0 + 3 * SEC + SEC / 2);
        assert_eq!(
            ev,
            vec![
                MembershipEvent::Missed(id("a"), 3),
                MembershipEvent::TakenOut(id("a"))
            ]
        );
        assert!(m.alive().is_empty() && m.eligible().is_empty());
        assert_eq!(m.node(&id("a")).unwrap().state, NodeState::Down);
    }

    #[test]
    fn heartbeats_keep_a_node_up() {
        let t0 = Instant::now();
        let mut m = Membership::new(MembershipConfig::default());
        for i in 0..10u32 {
            m.heartbeat(&hb("a", "s1", u64::from(i) + 1), src(), t0 + SEC * i)
                .unwrap();
            assert!(m.tick(t0 + SEC * i + SEC * 3).is_empty());
        }
        assert!(m.is_alive(&id("a")));
    }

    #[test]
    fn hysteresis_needs_consecutive_heartbeats() {
        let t0 = Instant::now();
        let mut m = Membership::new(MembershipConfig::default());
        m.heartbeat(&hb("a", "s1", 1), src(), t0).unwrap();
        m.tick(t0 + 4 * SEC);
        assert!(!m.is_alive(&id("a")));
        // One heartbeat after the gap is not enough.
        let ev = m.heartbeat(&hb("a", "s1", 6), src(), t0 + 5 * SEC).unwrap();
        // 4 lost (2..=5), 3 already counted at take-out.
        assert_eq!(ev, vec![MembershipEvent::Missed(id("a"), 1)]);
        assert!(!m.is_alive(&id("a")));
        // A second one not consecutive (7 lost) restarts the count.
        m.heartbeat(&hb("a", "s1", 8), src(), t0 + 7 * SEC).unwrap();
        assert!(!m.is_alive(&id("a")));
        let ev = m.heartbeat(&hb("a", "s1", 9), src(), t0 + 8 * SEC).unwrap();
        assert_eq!(ev, vec![MembershipEvent::Rejoined(id("a"))]);
        assert!(m.is_alive(&id("a")));
        assert_eq!(m.node(&id("a")).unwrap().missed, 5);
    }

    #[test]
    fn one_lost_heartbeat_does_not_flap() {
        let t0 = Instant::now();
        let mut m = Membership::new(MembershipConfig::default());
        m.heartbeat(&hb("a", "s1", 1), src(), t0).unwrap();
        // seq 2 lost.
        let ev = m.heartbeat(&hb("a", "s1", 3), src(), t0 + 2 * SEC).unwrap();
        assert_eq!(ev, vec![MembershipEvent::Missed(id("a"), 1)]);
        assert!(m.tick(t0 + 2 * SEC + SEC / 2).is_empty());
        assert!(m.is_alive(&id("a")));
    }

    #[test]
    fn duplicates_and_reordering_are_stale() {
        let t0 = Instant::now();
        let mut m = Membership::new(MembershipConfig::default());
        m.heartbeat(&hb("a", "s1", 5), src(), t0).unwrap();
        assert_eq!(
            m.heartbeat(&hb("a", "s1", 5), src(), t0),
            Err(HeartbeatIgnored::Stale)
        );
        assert_eq!(
            m.heartbeat(&hb("a", "s1", 4), src(), t0),
            Err(HeartbeatIgnored::Stale)
        );
    }

    #[test]
    fn restart_is_detected_and_counted() {
        let t0 = Instant::now();
        let mut m = Membership::new(MembershipConfig::default());
        m.heartbeat(&hb("a", "s1", 40), src(), t0).unwrap();
        let tag1 = m.node(&id("a")).unwrap().session_tag;
        let ev = m.heartbeat(&hb("a", "s2", 1), src(), t0 + SEC).unwrap();
        assert_eq!(ev, vec![MembershipEvent::Restarted(id("a"))]);
        let node = m.node(&id("a")).unwrap();
        assert_eq!(node.restarts, 1);
        assert_eq!(node.session, "s2");
        assert_ne!(node.session_tag, tag1);
        assert_eq!(node.missed, 0);
        assert!(m.is_alive(&id("a")));
        // A late heartbeat of the old session does not flip it back.
        assert_eq!(
            m.heartbeat(&hb("a", "s1", 41), src(), t0 + SEC),
            Err(HeartbeatIgnored::OldSession)
        );
        assert_eq!(m.node(&id("a")).unwrap().restarts, 1);
    }

    #[test]
    fn restart_while_out_still_needs_hysteresis() {
        let t0 = Instant::now();
        let mut m = Membership::new(MembershipConfig::default());
        m.heartbeat(&hb("a", "s1", 1), src(), t0).unwrap();
        m.tick(t0 + 10 * SEC);
        let ev = m
            .heartbeat(&hb("a", "s2", 1), src(), t0 + 11 * SEC)
            .unwrap();
        assert_eq!(ev, vec![MembershipEvent::Restarted(id("a"))]);
        assert!(!m.is_alive(&id("a")));
        let ev = m
            .heartbeat(&hb("a", "s2", 2), src(), t0 + 12 * SEC)
            .unwrap();
        assert_eq!(ev, vec![MembershipEvent::Rejoined(id("a"))]);
    }

    #[test]
    fn draining_keeps_alive_but_not_eligible() {
        let t0 = Instant::now();
        let mut m = Membership::new(MembershipConfig::default());
        m.heartbeat(&hb("a", "s", 1), src(), t0).unwrap();
        m.heartbeat(&hb("bb", "s", 1), src(), t0).unwrap();
        let mut h = hb("a", "s", 2);
        h.draining = true;
        let ev = m.heartbeat(&h, src(), t0 + SEC).unwrap();
        assert_eq!(ev, vec![MembershipEvent::DrainStarted(id("a"))]);
        assert_eq!(m.alive(), &[id("a"), id("bb")]);
        assert_eq!(m.eligible(), &[id("bb")]);
        let ev = m.heartbeat(&hb("a", "s", 3), src(), t0 + 2 * SEC).unwrap();
        assert_eq!(ev, vec![MembershipEvent::DrainStopped(id("a"))]);
        assert_eq!(m.eligible(), &[id("a"), id("bb")]);
    }

    #[test]
    fn unspecified_sip_address_takes_the_source_ip() {
        let t0 = Instant::now();
        let mut m = Membership::new(MembershipConfig::default());
        let mut h = hb("a", "s", 1);
        h.sip = "0.0.0.0:5070".parse().unwrap();
        m.heartbeat(&h, src(), t0).unwrap();
        let addr: SocketAddr = "10.9.9.9:5070".parse().unwrap();
        assert_eq!(m.node_at(addr).unwrap().id, id("a"));
    }

    #[test]
    fn table_is_bounded_and_forgets() {
        let t0 = Instant::now();
        let config = MembershipConfig {
            max_nodes: 2,
            forget_after: 60 * SEC,
            ..Default::default()
        };
        let mut m = Membership::new(config);
        m.heartbeat(&hb("a", "s", 1), src(), t0).unwrap();
        m.heartbeat(&hb("b", "s", 1), src(), t0).unwrap();
        assert_eq!(
            m.heartbeat(&hb("c", "s", 1), src(), t0),
            Err(HeartbeatIgnored::TableFull)
        );
        m.tick(t0 + 5 * SEC);
        let ev = m.tick(t0 + 61 * SEC);
        assert!(ev.contains(&MembershipEvent::Forgotten(id("a"))));
        assert!(m.heartbeat(&hb("c", "s", 1), src(), t0 + 62 * SEC).is_ok());
    }

    #[test]
    fn snapshot_reports_state() {
        let t0 = Instant::now();
        let mut m = Membership::new(MembershipConfig::default());
        m.heartbeat(&hb("a", "s", 1), src(), t0).unwrap();
        let snap = m.snapshot(t0 + SEC);
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].id, "a");
        assert_eq!(snap[0].state, NodeState::Up);
        assert_eq!(snap[0].last_heartbeat_ms, 1000);
        let json = serde_json::to_value(&snap).unwrap();
        assert_eq!(json[0]["state"], "up");
    }
}
