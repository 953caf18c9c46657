//! The heartbeat sender a gateway node runs: one UDP socket and one task that sends this
//! node's heartbeat to every balancer each interval (and at once when draining changes), and
//! keeps the latest live-set report a balancer answered with ([`HeartbeatSender::live_set`]),
//! which is how the node learns where devices belong.
//!
//! The datagram formats are `thalamus_ownership::heartbeat`'s; this module only sends and
//! receives them. It does not decide liveness (the balancers do) or where a device goes (the
//! node's redirect rule does, from the live set kept here).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::time::SystemTime;

use thalamus_ownership::heartbeat::{
    check_fresh, new_session_id, unix_ms, Heartbeat, LiveSet, LiveSetReport, Load,
    HEARTBEAT_VERSION, MAX_REPORT_BYTES,
};
use thalamus_ownership::{NodeId, SharedFence};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

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
    /// Shared secret that authenticates heartbeats (and the balancers' reports, which are
    /// then also refused outside `max_skew` of this clock).
    pub secret: Option<Vec<u8>>,
    /// Largest difference between a report's timestamp and this clock (with a secret).
    pub max_skew: Duration,
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
            max_skew: Duration::from_secs(10),
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }
}

struct SenderShared {
    draining: AtomicBool,
    /// Draining while the node checks its dialogs after it was out of the live set.
    recovering: AtomicBool,
    /// Draining because the node stepped aside (it alone lost the dialog store).
    stepped_aside: AtomicBool,
    load: Mutex<Load>,
    pinned: Mutex<Vec<u64>>,
    /// How long the dialog store has not answered, ms (0: it answers).
    store_down_ms: std::sync::atomic::AtomicU64,
    /// Fed with what the balancers' reports say about this node.
    fence: Option<SharedFence>,
    /// Woken when the node learns it was out of the live set (or frozen): see
    /// [`HeartbeatSender::out_of_live_set`].
    outs: tokio::sync::watch::Sender<u64>,
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
        Self::start_fenced(config, None).await
    }

    /// As [`HeartbeatSender::start`], feeding `fence` with every report a balancer answers.
    pub async fn start_fenced(
        config: HeartbeatSenderConfig,
        fence: Option<SharedFence>,
    ) -> std::io::Result<Self> {
        let socket = UdpSocket::bind(config.bind).await?;
        let session = new_session_id();
        let shared = Arc::new(SenderShared {
            draining: AtomicBool::new(false),
            recovering: AtomicBool::new(false),
            stepped_aside: AtomicBool::new(false),
            load: Mutex::new(Load::default()),
            pinned: Mutex::new(Vec::new()),
            store_down_ms: std::sync::atomic::AtomicU64::new(0),
            fence,
            outs: tokio::sync::watch::Sender::new(0),
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

    /// Announces draining while the node checks its dialogs (on top of [`Self::set_draining`]):
    /// it takes no new calls until it knows which dialogs are still its own.
    pub fn set_recovering(&self, recovering: bool) {
        if self.shared.recovering.swap(recovering, Ordering::Relaxed) != recovering {
            self.shared.wake.notify_one();
        }
    }

    /// Announces draining while the node steps aside (on top of [`Self::set_draining`]).
    pub fn set_stepped_aside(&self, aside: bool) {
        if self.shared.stepped_aside.swap(aside, Ordering::Relaxed) != aside {
            self.shared.wake.notify_one();
        }
    }

    /// Counts the times the node learned that it was out of the balancers' live set: a report
    /// that does not list it, or a heartbeat loop that woke up much later than its interval (the
    /// process was frozen, or starved). Survivors may have taken some of its dialogs meanwhile.
    /// A receiver wakes at each change.
    pub fn out_of_live_set(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.outs.subscribe()
    }

    /// How long the dialog store has not answered (zero: it answers); the next heartbeats say
    /// so, and the balancers list this node in their reports' `store_down`.
    pub fn set_store_down(&self, down_for: Duration) {
        let ms = u64::try_from(down_for.as_millis()).unwrap_or(u64::MAX);
        self.shared.store_down_ms.store(ms, Ordering::Relaxed);
    }

    /// The devices the next heartbeats pin to this node (at most
    /// [`MAX_PINS`](thalamus_ownership::heartbeat::MAX_PINS); the rest are left out).
    pub fn set_pinned(&self, mut pinned: Vec<u64>) {
        pinned.truncate(thalamus_ownership::heartbeat::MAX_PINS);
        if let Ok(mut p) = self.shared.pinned.lock() {
            *p = pinned;
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
            .filter(|l| {
                tokio::time::Instant::now()
                    .into_std()
                    .saturating_duration_since(l.received)
                    <= max_age
            })
            .cloned()
    }

    /// Live-set reports taken so far.
    pub fn reports(&self) -> u64 {
        self.shared.reports.load(Ordering::Relaxed)
    }

    /// Whether the node announces draining (set by the operator).
    pub fn draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }

    /// Whether the node announces draining while it checks its dialogs.
    pub fn recovering(&self) -> bool {
        self.shared.recovering.load(Ordering::Relaxed)
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
    // When the recent heartbeats went out (by sequence number), for the fence; and when the
    // loop last sent one (a much later wake-up means the process was frozen).
    let mut sent_at: std::collections::VecDeque<(u64, std::time::Instant)> =
        std::collections::VecDeque::with_capacity(SENT_MEMORY);
    let mut last_send: Option<std::time::Instant> = None;
    let frozen_after = config.interval * 2 + Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shared.wake.notified() => {}
            r = socket.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    let datagram = buf.get(..n).unwrap_or_default();
                    let report = ReportContext { session: &session, seq, sent_at: &sent_at };
                    take_report(&shared, &config, &report, &mut last_ack, datagram, from);
                }
                continue;
            }
        }
        let now = tokio::time::Instant::now().into_std();
        let silent = last_send.map(|at| now.saturating_duration_since(at));
        if let Some(silent) = silent.filter(|s| *s > frozen_after) {
            tracing::warn!(
                silent_ms = u64::try_from(silent.as_millis()).unwrap_or(u64::MAX),
                "the heartbeat loop woke up late (the process was frozen or starved): checking this node's dialogs"
            );
            shared.outs.send_modify(|n| *n += 1);
        }
        last_send = Some(now);
        seq += 1;
        if sent_at.len() == SENT_MEMORY {
            sent_at.pop_front();
        }
        sent_at.push_back((seq, now));
        let load = shared.load.lock().map(|l| *l).unwrap_or_default();
        let pinned = shared.pinned.lock().map(|p| p.clone()).unwrap_or_default();
        let hb = Heartbeat {
            v: HEARTBEAT_VERSION,
            node: config.node.clone(),
            session: session.clone(),
            seq,
            sip: config.sip,
            quic: config.quic,
            draining: shared.draining.load(Ordering::Relaxed)
                || shared.recovering.load(Ordering::Relaxed)
                || shared.stepped_aside.load(Ordering::Relaxed),
            load,
            ts_ms: unix_ms(SystemTime::now()),
            pinned,
            store_down_ms: shared.store_down_ms.load(Ordering::Relaxed),
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

/// Heartbeats whose sending time is remembered (a report acknowledging an older one does not
/// feed the fence).
const SENT_MEMORY: usize = 16;

/// What a report is checked against: this session, the last sequence number sent, and when the
/// recent heartbeats went out.
struct ReportContext<'a> {
    session: &'a str,
    seq: u64,
    sent_at: &'a std::collections::VecDeque<(u64, std::time::Instant)>,
}

/// Keeps a balancer's report when it answers this session's heartbeat and is not older than
/// the last one kept, and feeds the fence with it.
fn take_report(
    shared: &SenderShared,
    config: &HeartbeatSenderConfig,
    context: &ReportContext<'_>,
    last_ack: &mut u64,
    datagram: &[u8],
    from: SocketAddr,
) {
    let (session, seq) = (context.session, context.seq);
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
    if config.secret.is_some() {
        let window = u64::try_from(config.max_skew.as_millis()).unwrap_or(u64::MAX);
        if let Err(e) = check_fresh(report.ts_ms, unix_ms(SystemTime::now()), window) {
            tracing::debug!(%from, error = %e, "live-set report refused");
            return;
        }
    }
    let now = tokio::time::Instant::now().into_std();
    if let Some(fence) = &shared.fence {
        if let Some(&(_, sent)) = context.sent_at.iter().find(|(s, _)| *s == report.ack) {
            fence.with(|f| {
                f.report(
                    from,
                    sent,
                    report.alive.clone(),
                    Duration::from_millis(report.silence_ms),
                    Duration::from_millis(report.up_ms),
                    now,
                )
            });
        }
    }
    // A balancer that answers without listing this node took it out (it was frozen, or cut
    // off): it is back in after a few heartbeats, but survivors may hold some of its dialogs.
    // (A balancer of an older release says nothing of who is alive: no silence window.)
    let says_alive = report.silence_ms > 0;
    if says_alive && !report.alive.contains(&config.node) {
        shared.outs.send_modify(|n| *n += 1);
    }
    // Reports of one heartbeat from several balancers are all taken; older ones are not.
    if report.ack < *last_ack {
        return;
    }
    *last_ack = report.ack;
    if let Ok(mut live) = shared.live.lock() {
        *live = Some(LiveSet {
            received: now,
            from,
            eligible: report.eligible,
            alive: says_alive.then_some(report.alive),
            settled: !says_alive || report.up_ms >= report.silence_ms,
            store_down: report.store_down,
        });
    }
    shared.reports.fetch_add(1, Ordering::Relaxed);
}
#[cfg(test)]
mod tests {
    use super::*;
    use thalamus_ownership::heartbeat::LiveNode;

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
            ts_ms: unix_ms(SystemTime::now()),
            alive: Vec::new(),
            silence_ms: 0,
            up_ms: 0,
            store_down: Vec::new(),
        }
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
        // A recorded report replayed a minute later.
        let mut stale = report(mine, 1, &["x"]);
        stale.ts_ms -= 60_000;
        for bad in [
            stale.encode(Some(b"k")),
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
        let start = tokio::time::Instant::now();
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
