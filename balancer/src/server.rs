//! The `thalamus balancer` process: a thin tokio shell around [`BalancerCore`].
//!
//! It binds SIP on UDP and TCP ([`SipTransport`]), a UDP heartbeat listener and the admin HTTP
//! endpoint (`/health`, `/nodes` as JSON, `/metrics` in the Prometheus text format); it feeds
//! heartbeats and a clock tick to the membership table (answering each heartbeat with the live
//! set, so nodes route devices as the balancer routes SIP) and every SIP message to the router,
//! then sends what the router decided. UDP messages are first offered to the router's fast
//! paths (`BalancerCore::route_response_datagram`, `route_request_datagram`) as they came off
//! the socket; only those they do not take are parsed whole. All protocol decisions are in the
//! core; this module keeps no per-call state either.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use thalamus_sip::transport::{
    Delivery, Inbound, Peer, PeerTransport, SipTransport, TransportConfig, TransportError,
    TrySendError, WeakSipTransport,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::BalancerConfig;
use crate::membership::{Membership, MembershipEvent, NodeStatus};
use crate::metrics::{BalancerMetrics, NodeLabel, ReasonLabel, StatusLabel};
use crate::router::{dialog_key, BalancerCore, Decision, NextHop, Outgoing};
use crate::watch::{ActWatch, Actor, Seen};
use thalamus_ownership::hash::stable_hash;
use thalamus_ownership::heartbeat::{
    check_fresh, unix_ms, Heartbeat, LiveNode, LiveSetReport, MAX_HEARTBEAT_BYTES,
};

/// Why the balancer could not start.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    /// The SIP transports could not bind.
    #[error("SIP transport: {0}")]
    Transport(#[from] TransportError),
    /// `[sip.tls]` cannot be used (a file missing or unreadable, say).
    #[error(transparent)]
    Tls(#[from] thalamus_sip::transport::tls::TlsSettingsError),
    /// A socket could not bind.
    #[error("cannot bind the {what} listener on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

struct Shared {
    core: Mutex<BalancerCore>,
    metrics: BalancerMetrics,
    secret: Option<Vec<u8>>,
    /// With a secret: how far a heartbeat's timestamp may be from this clock.
    max_skew_ms: u64,
    /// When the balancer started (the `up_ms` of its reports).
    started: std::time::Instant,
    /// The split-brain watch: which node process last acted in each dialog.
    watch: Mutex<ActWatch>,
    /// UDP sends waiting for room in the socket's buffer (at most [`MAX_BLOCKED_SENDS`]).
    blocked_sends: AtomicUsize,
}

/// Most UDP sends waiting for room in the socket's buffer at once.
const MAX_BLOCKED_SENDS: usize = 1024;

impl Shared {
    fn core(&self) -> MutexGuard<'_, BalancerCore> {
        // A panic while holding the lock cannot leave the table half-updated in a way that
        // matters more than stopping would: keep serving.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running balancer: its bound addresses, and a way to stop it.
pub struct RunningBalancer {
    /// SIP over UDP.
    pub sip_udp: SocketAddr,
    /// SIP over TCP.
    pub sip_tcp: SocketAddr,
    /// SIP over TLS, when `[sip.tls] listen` is set.
    pub sip_tls: Option<SocketAddr>,
    /// Heartbeat listener (UDP).
    pub heartbeat: SocketAddr,
    /// Admin HTTP.
    pub admin: SocketAddr,
    /// `host:port` written in our Via and Record-Route.
    pub advertised: String,
    shared: Arc<Shared>,
    transport: SipTransport,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for RunningBalancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningBalancer")
            .field("sip_udp", &self.sip_udp)
            .field("heartbeat", &self.heartbeat)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl RunningBalancer {
    /// Binds every listener and starts the tasks.
    pub async fn start(config: BalancerConfig) -> Result<Self, BalancerError> {
        // What receives SIP: a queue read by the router's task (`sip.queue` above 0), or the
        // router called on the receiving task itself (0, the default: no hand-off per
        // message). The inline handler gets the router once it exists, below.
        let router_slot: Arc<std::sync::OnceLock<(Arc<Shared>, WeakSipTransport)>> = Arc::default();
        let (delivery, rx) = if config.sip.queue == 0 {
            let slot = Arc::clone(&router_slot);
            let messages = move |inbound: Inbound| {
                if let Some((shared, transport)) = slot.get() {
                    if let Some(transport) = transport.upgrade() {
                        route_one(shared, &transport, inbound);
                    }
                }
            };
            let slot = Arc::clone(&router_slot);
            let datagrams = move |data: &[u8], peer: Peer| -> bool {
                slot.get().is_some_and(|(shared, transport)| {
                    transport
                        .upgrade()
                        .is_some_and(|transport| route_datagram(shared, &transport, data, peer))
                })
            };
            let delivery = Delivery::InlineDatagrams {
                datagrams: Arc::new(datagrams),
                messages: Arc::new(messages),
            };
            (delivery, None)
        } else {
            let (tx, rx) = mpsc::channel(config.sip.queue);
            (Delivery::Queue(tx), Some(rx))
        };
        let transport = SipTransport::bind(
            TransportConfig {
                udp: Some(config.sip.listen),
                tcp: Some(config.sip.listen),
                tls: config
                    .sip
                    .tls
                    .as_ref()
                    .map(|t| t.transport("sip.tls"))
                    .transpose()?,
                ..TransportConfig::default()
            },
            delivery,
            // A stateless proxy has no transactions to fail.
            mpsc::channel(1).0,
        )
        .await?;
        let sip_udp = transport
            .local_addr(PeerTransport::Udp)
            .unwrap_or(config.sip.listen);
        let sip_tcp = transport
            .local_addr(PeerTransport::Tcp)
            .unwrap_or(config.sip.listen);
        let sip_tls = transport.local_addr(PeerTransport::Tls);
        let heartbeat_socket =
            UdpSocket::bind(config.heartbeat.listen)
                .await
                .map_err(|source| BalancerError::Bind {
                    what: "heartbeat",
                    addr: config.heartbeat.listen,
                    source,
                })?;
        let heartbeat = heartbeat_socket
            .local_addr()
            .unwrap_or(config.heartbeat.listen);
        let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
            .await
            .map_err(|source| BalancerError::Bind {
                what: "admin",
                addr: config.admin.listen,
                source,
            })?;
        let admin = admin_listener.local_addr().unwrap_or(config.admin.listen);
        let mut router = config.router(sip_udp);
        router.tls_port = sip_tls.map(|a| a.port());
        let advertised = format!("{}:{}", router.advertised_host, router.advertised_port);
        let membership = Membership::new(config.membership());
        let mut core = BalancerCore::new(router, membership);
        core.set_starting(true);
        core.set_learning(true);
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            metrics: BalancerMetrics::new(),
            secret: config.heartbeat.secret.clone().map(String::into_bytes),
            max_skew_ms: config.heartbeat.max_skew_ms,
            started: now(),
            watch: Mutex::new(ActWatch::new(WATCH_CAPACITY, WATCH_IDLE)),
            blocked_sends: AtomicUsize::new(0),
        });
        // Cannot be set twice: the slot is this function's own.
        let _ = router_slot.set((Arc::clone(&shared), transport.downgrade()));
        let shutdown = CancellationToken::new();
        let tick = (Duration::from_millis(config.heartbeat.interval_ms) / 4)
            .clamp(Duration::from_millis(5), Duration::from_millis(250));
        let mut tasks = vec![
            tokio::spawn(heartbeat_loop(
                Arc::clone(&shared),
                heartbeat_socket,
                shutdown.clone(),
            )),
            tokio::spawn(tick_loop(Arc::clone(&shared), tick, shutdown.clone())),
            tokio::spawn(serve_admin(
                admin_listener,
                Arc::clone(&shared),
                shutdown.clone(),
            )),
        ];
        if let Some(rx) = rx {
            tasks.push(tokio::spawn(sip_loop(
                Arc::clone(&shared),
                transport.clone(),
                rx,
                shutdown.clone(),
            )));
        }
        Ok(Self {
            sip_udp,
            sip_tcp,
            sip_tls,
            heartbeat,
            admin,
            advertised,
            shared,
            transport,
            shutdown,
            tasks,
        })
    }

    /// The node table as `/nodes` shows it.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.shared.core().membership().snapshot(now())
    }

    /// The metrics text as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }

    /// Stops every task and closes the sockets.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.transport.shutdown();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }
}

/// Routes what the transport queued (`sip.queue` above 0), one message at a time.
async fn sip_loop(
    shared: Arc<Shared>,
    transport: SipTransport,
    mut rx: mpsc::Receiver<Inbound>,
    shutdown: CancellationToken,
) {
    loop {
        let inbound = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
        };
        route_one(&shared, &transport, inbound);
    }
}

/// Routes one SIP message and sends what the router decided, without waiting: on the task
/// that received it, or the queue's.
fn route_one(shared: &Arc<Shared>, transport: &SipTransport, inbound: Inbound) {
    let dialog = inbound
        .message
        .headers()
        .call_id()
        .ok()
        .map(|c| dialog_key(c.as_bytes()));
    let (decision, actor) = {
        let core = shared.core();
        let decision = core.route(inbound.message, inbound.peer);
        let actor = actor_of(&core, &decision);
        (decision, actor)
    };
    finish(shared, transport, decision, dialog, actor);
}

/// Routes a UDP message from its bytes when it can ([`BalancerCore::route_response_datagram`],
/// [`BalancerCore::route_request_datagram`]), on the receiving task; false leaves it to be
/// parsed and given to [`route_one`].
fn route_datagram(shared: &Arc<Shared>, transport: &SipTransport, data: &[u8], peer: Peer) -> bool {
    let (decision, dialog, actor) = {
        let core = shared.core();
        let (decision, dialog) = if data.starts_with(b"SIP/2.0 ") {
            match core.route_response_datagram(data, peer) {
                Some(fast) => (fast.decision, fast.dialog),
                None => return false,
            }
        } else {
            match core.route_request_datagram(data, peer) {
                Some(fast) => (fast.decision, fast.dialog),
                None => return false,
            }
        };
        let actor = actor_of(&core, &decision);
        (decision, dialog, actor)
    };
    finish(shared, transport, decision, dialog, actor);
    true
}

/// The node process that sent what `decision` forwards, for the split-brain watch.
fn actor_of(
    core: &BalancerCore,
    decision: &Decision,
) -> Option<(thalamus_ownership::hash::NodeId, Actor)> {
    acting_node(decision).and_then(|n| {
        core.membership().node(n).map(|e| {
            let actor = Actor {
                node: stable_hash(&[n.as_str().as_bytes()]),
                session: u64::from(e.session_tag),
            };
            (n.clone(), actor)
        })
    })
}

/// Feeds the watch with who acted in `dialog`, then sends.
fn finish(
    shared: &Arc<Shared>,
    transport: &SipTransport,
    decision: Decision,
    dialog: Option<u64>,
    actor: Option<(thalamus_ownership::hash::NodeId, Actor)>,
) {
    if let (Some(dialog), Some((node, actor))) = (dialog, actor) {
        watch_act(shared, dialog, &node, actor);
    }
    act(shared, transport, decision);
}

/// Dialogs the split-brain watch remembers at most (about 100 bytes each).
const WATCH_CAPACITY: usize = 200_000;
/// How long after its last act a dialog is remembered: longer than a transaction (64 T1) and
/// than any freeze the detection window would not already have ended.
const WATCH_IDLE: Duration = Duration::from_secs(64);

/// The node that sent what `decision` forwards: a request leaving the cluster, or a response.
fn acting_node(decision: &Decision) -> Option<&thalamus_ownership::hash::NodeId> {
    match decision {
        Decision::Outward {
            from_node: Some(n), ..
        }
        | Decision::Response {
            from_node: Some(n), ..
        } => Some(n),
        _ => None,
    }
}

/// Feeds the split-brain watch with a message `node` sent (`actor`: that node process, its id
/// and session tag): counts moves and acts in a dialog another node took over since.
fn watch_act(shared: &Shared, dialog: u64, node: &thalamus_ownership::hash::NodeId, actor: Actor) {
    let m = &shared.metrics;
    let mut watch = shared.watch.lock().unwrap_or_else(|e| e.into_inner());
    match watch.observe(now(), dialog, actor) {
        Seen::Moved => {
            m.dialogs_moved.inc();
        }
        Seen::Again => {
            m.dialogs_acted_on_by_two_nodes.inc();
            tracing::warn!(node = %node, "a node acted in a dialog another node had taken over (split brain)");
        }
        Seen::New | Seen::Same => {}
    };
    m.dialogs_watched
        .set(i64::try_from(watch.len()).unwrap_or(i64::MAX));
}

fn node_label(node: Option<&thalamus_ownership::hash::NodeId>) -> NodeLabel {
    NodeLabel {
        node: node.map_or_else(|| "external".to_owned(), |n| n.to_string()),
    }
}

fn act(shared: &Arc<Shared>, transport: &SipTransport, decision: Decision) {
    let m = &shared.metrics;
    let out = match decision {
        Decision::ToNode { node, out } => {
            m.requests_forwarded
                .get_or_create(&node_label(Some(&node)))
                .inc();
            out
        }
        Decision::Outward { out, .. } => {
            m.requests_forwarded.get_or_create(&node_label(None)).inc();
            out
        }
        Decision::Response { from_node, out, .. } => {
            m.responses_forwarded
                .get_or_create(&node_label(from_node.as_ref()))
                .inc();
            out
        }
        Decision::Answer { status, out } => {
            m.answered.get_or_create(&StatusLabel { status }).inc();
            out
        }
        Decision::Drop(reason) => {
            m.dropped
                .get_or_create(&ReasonLabel {
                    reason: reason.label(),
                })
                .inc();
            tracing::debug!(reason = reason.label(), "SIP message dropped");
            return;
        }
    };
    send(shared, transport, out);
}

fn send(shared: &Arc<Shared>, transport: &SipTransport, out: Outgoing) {
    match out.to {
        NextHop::Addr(addr) if out.transport == PeerTransport::Udp => {
            let peer = Peer {
                addr,
                transport: out.transport,
            };
            match transport.try_send(peer, out.bytes) {
                Ok(()) => {}
                // The socket's buffer is full: wait for room on a task of its own, at most
                // MAX_BLOCKED_SENDS at once; past that the message is dropped and counted (a
                // UDP sender retransmits).
                Err(TrySendError::WouldBlock(bytes)) => {
                    let waiting = shared.blocked_sends.fetch_add(1, Ordering::AcqRel);
                    if waiting >= MAX_BLOCKED_SENDS {
                        shared.blocked_sends.fetch_sub(1, Ordering::AcqRel);
                        shared
                            .metrics
                            .dropped
                            .get_or_create(&ReasonLabel {
                                reason: "send_buffer_full",
                            })
                            .inc();
                        return;
                    }
                    let shared = Arc::clone(shared);
                    let transport = transport.clone();
                    tokio::spawn(async move {
                        if let Err(e) = transport.send(peer, bytes, None).await {
                            shared.metrics.send_errors.inc();
                            tracing::debug!(error = %e, "SIP send failed");
                        }
                        shared.blocked_sends.fetch_sub(1, Ordering::AcqRel);
                    });
                }
                Err(e) => {
                    shared.metrics.send_errors.inc();
                    tracing::debug!(error = %e, "SIP send failed");
                }
            }
        }
        to => {
            // TCP may connect and names need resolving: never hold up the message loop.
            let shared = Arc::clone(shared);
            let transport = transport.clone();
            tokio::spawn(async move {
                let addr = match to {
                    NextHop::Addr(a) => Some(a),
                    NextHop::Name { host, port } => {
                        let addr = tokio::net::lookup_host((host.as_str(), port))
                            .await
                            .ok()
                            .and_then(|mut it| it.next());
                        // Over TLS the server's certificate must name the host.
                        if let (Some(addr), PeerTransport::Tls) = (addr, out.transport) {
                            transport.set_tls_name(addr, &host);
                        }
                        addr
                    }
                };
                let Some(addr) = addr else {
                    shared.metrics.send_errors.inc();
                    return;
                };
                let peer = Peer {
                    addr,
                    transport: out.transport,
                };
                if let Err(e) = transport.send(peer, out.bytes, None).await {
                    shared.metrics.send_errors.inc();
                    tracing::debug!(error = %e, "SIP send failed");
                }
            });
        }
    }
}

async fn heartbeat_loop(shared: Arc<Shared>, socket: UdpSocket, shutdown: CancellationToken) {
    let mut buf = vec![0u8; MAX_HEARTBEAT_BYTES + 1];
    loop {
        let (n, source) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "heartbeat receive error");
                    continue;
                }
            },
        };
        let datagram = buf.get(..n).unwrap_or_default();
        let decoded = Heartbeat::decode(datagram, shared.secret.as_deref()).and_then(|hb| {
            // Authenticated heartbeats are also dated: a recorded one replayed later is refused.
            if shared.secret.is_some() {
                check_fresh(hb.ts_ms, unix_ms(SystemTime::now()), shared.max_skew_ms)?;
            }
            Ok(hb)
        });
        // A refused datagram gets no answer (the balancer amplifies nothing for a stranger).
        let hb = match decoded {
            Ok(hb) => hb,
            Err(e) => {
                shared
                    .metrics
                    .heartbeats_rejected
                    .get_or_create(&ReasonLabel { reason: e.label() })
                    .inc();
                tracing::debug!(%source, error = %e, "heartbeat rejected");
                continue;
            }
        };
        let result = {
            let mut core = shared.core();
            let r = core.membership_mut().heartbeat(&hb, source, now());
            update_gauges(&shared.metrics, core.membership());
            let up = now().saturating_duration_since(shared.started);
            r.map(|events| (events, live_set_report(core.membership(), &hb, up)))
        };
        match result {
            Ok((events, report)) => {
                shared.metrics.heartbeats_received.inc();
                record_events(&shared.metrics, &events);
                // The answer tells the node the live set (docs/balancer.md, "The live set on
                // the nodes"); a lost answer is made good by the next one.
                let datagram = report.encode(shared.secret.as_deref());
                if let Err(e) = socket.send_to(&datagram, source).await {
                    tracing::debug!(%source, error = %e, "live-set report not sent");
                }
            }
            Err(e) => {
                let reason = match e {
                    crate::membership::HeartbeatIgnored::TableFull => "table_full",
                    crate::membership::HeartbeatIgnored::Stale => "stale",
                    crate::membership::HeartbeatIgnored::OldSession => "old_session",
                };
                shared
                    .metrics
                    .heartbeats_rejected
                    .get_or_create(&ReasonLabel { reason })
                    .inc();
            }
        }
    }
}

/// The answer to heartbeat `hb`: the nodes eligible for new work and their device addresses,
/// every node up (draining ones too), the silence after which a node is taken out, and how
/// long this balancer has been up (`up`): what a node's fence needs.
fn live_set_report(membership: &Membership, hb: &Heartbeat, up: Duration) -> LiveSetReport {
    LiveSetReport {
        v: thalamus_ownership::heartbeat::HEARTBEAT_VERSION,
        to: hb.node.clone(),
        session: hb.session.clone(),
        ack: hb.seq,
        eligible: membership
            .eligible()
            .iter()
            .map(|id| LiveNode {
                node: id.clone(),
                quic: membership.node(id).and_then(|n| n.quic),
            })
            .collect(),
        ts_ms: unix_ms(SystemTime::now()),
        alive: membership.alive().to_vec(),
        silence_ms: u64::try_from(membership.config().silence_limit().as_millis())
            .unwrap_or(u64::MAX),
        up_ms: u64::try_from(up.as_millis()).unwrap_or(u64::MAX),
        store_down: membership.store_down(),
    }
}

async fn tick_loop(shared: Arc<Shared>, every: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let events = {
            let mut core = shared.core();
            let config = core.membership().config();
            let (silence, interval) = (config.silence_limit(), config.interval);
            let up = now().saturating_duration_since(shared.started);
            core.set_starting(up < silence);
            core.set_learning(up < interval * 3 / 2);
            let events = core.membership_mut().tick(now());
            if !events.is_empty() {
                update_gauges(&shared.metrics, core.membership());
            }
            events
        };
        record_events(&shared.metrics, &events);
    }
}

fn update_gauges(m: &BalancerMetrics, membership: &Membership) {
    let alive = membership.alive().len();
    let eligible = membership.eligible().len();
    m.nodes_up.set(i64::try_from(alive).unwrap_or(i64::MAX));
    m.nodes_draining
        .set(i64::try_from(alive - eligible.min(alive)).unwrap_or(0));
    m.nodes_known
        .set(i64::try_from(membership.nodes().count()).unwrap_or(i64::MAX));
}

fn record_events(m: &BalancerMetrics, events: &[MembershipEvent]) {
    for e in events {
        match e {
            MembershipEvent::Joined(n) => tracing::info!(node = %n, "node joined"),
            MembershipEvent::Rejoined(n) => tracing::info!(node = %n, "node back up"),
            MembershipEvent::TakenOut(n) => {
                m.nodes_taken_out.inc();
                tracing::warn!(node = %n, "node taken out (missed heartbeats)");
            }
            MembershipEvent::Restarted(n) => {
                m.restarts.inc();
                tracing::warn!(node = %n, "node restarted (new session)");
            }
            MembershipEvent::Missed(n, count) => {
                m.heartbeats_missed.inc_by(*count);
                tracing::debug!(node = %n, count, "heartbeats missed");
            }
            MembershipEvent::DrainStarted(n) => tracing::info!(node = %n, "node draining"),
            MembershipEvent::DrainStopped(n) => {
                tracing::info!(node = %n, "node no longer draining")
            }
            MembershipEvent::Forgotten(n) => tracing::info!(node = %n, "node forgotten"),
        }
    }
}

async fn serve_admin(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/nodes", get(nodes))
        .with_state(shared);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "balancer admin endpoint stopped");
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
}

async fn nodes(State(shared): State<Arc<Shared>>) -> Json<Vec<NodeStatus>> {
    Json(shared.core().membership().snapshot(now()))
}

/// The time: tokio's clock (paused in tests that pause it), as the cores take it.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
// `Instant::now()` in tests only gives the virtual clock its origin.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::membership::MembershipConfig;
    use std::time::Instant;
    use thalamus_ownership::heartbeat::{Load, HEARTBEAT_VERSION};
    use thalamus_ownership::NodeId;

    fn hb(node: &str, draining: bool) -> Heartbeat {
        Heartbeat {
            v: HEARTBEAT_VERSION,
            node: NodeId::new(node).unwrap(),
            session: format!("s-{node}"),
            seq: 1,
            sip: "0.0.0.0:5060".parse().unwrap(),
            quic: Some("0.0.0.0:4433".parse().unwrap()),
            draining,
            load: Load::default(),
            ts_ms: 0,
            pinned: Vec::new(),
            store_down_ms: 0,
        }
    }

    /// A request the balancer cannot route (no node is up) is answered, with the router
    /// inline on the receiving task and behind a queue alike; the answer comes from the
    /// balancer's SIP address.
    #[tokio::test]
    async fn a_request_is_routed_inline_or_queued() {
        for queue in [0, 16] {
            let mut config = BalancerConfig::default();
            config.sip.listen = "127.0.0.1:0".parse().unwrap();
            config.sip.queue = queue;
            config.heartbeat.listen = "127.0.0.1:0".parse().unwrap();
            // Starting, a balancer drops what it cannot route for one silence window (its
            // nodes may not have spoken yet): a short one, and the request retransmitted.
            config.heartbeat.interval_ms = 10;
            config.heartbeat.miss_count = 1;
            config.admin.listen = "127.0.0.1:0".parse().unwrap();
            let lb = RunningBalancer::start(config).await.unwrap();
            let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let me = client.local_addr().unwrap();
            let invite = format!(
                "INVITE sip:dev@thalamus.local SIP/2.0\r\n\
                 Via: SIP/2.0/UDP {me};branch=z9hG4bK-q{queue}\r\n\
                 Max-Forwards: 70\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:dev@thalamus.local>\r\n\
                 Call-ID: q{queue}@x\r\nCSeq: 1 INVITE\r\nContact: <sip:a@{me}>\r\n\
                 Content-Length: 0\r\n\r\n"
            );
            let mut buf = vec![0u8; 4096];
            let mut answer = None;
            for _ in 0..50 {
                client.send_to(invite.as_bytes(), lb.sip_udp).await.unwrap();
                let wait = Duration::from_millis(100);
                if let Ok(got) = tokio::time::timeout(wait, client.recv_from(&mut buf)).await {
                    answer = Some(got.unwrap());
                    break;
                }
            }
            let (n, from) = answer.expect("no answer in 5 s");
            let answer = String::from_utf8_lossy(&buf[..n]).to_string();
            assert!(answer.starts_with("SIP/2.0 5"), "queue {queue}: {answer}");
            assert!(answer.contains(&format!("Call-ID: q{queue}@x")), "{answer}");
            assert_eq!(from, lb.sip_udp);
            lb.shutdown().await;
        }
    }

    #[test]
    fn the_answer_lists_eligible_nodes_with_reachable_device_addresses() {
        let mut m = Membership::new(MembershipConfig::default());
        let now = Instant::now();
        let a_src: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let b_src: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        m.heartbeat(&hb("a", false), a_src, now).unwrap();
        m.heartbeat(&hb("b", true), b_src, now).unwrap();
        let report = live_set_report(&m, &hb("b", true), Duration::from_secs(7));
        assert_eq!(report.to.as_str(), "b");
        // The fence's facts: both nodes are up (b drains), a node goes after 3.5 s of silence.
        assert_eq!(report.alive.len(), 2);
        assert_eq!((report.silence_ms, report.up_ms), (3_500, 7_000));
        assert_eq!(report.session, "s-b");
        assert_eq!(report.ack, 1);
        assert_eq!(
            report.eligible,
            vec![LiveNode {
                node: NodeId::new("a").unwrap(),
                quic: Some("10.0.0.1:4433".parse().unwrap()),
            }]
        );
    }
}
