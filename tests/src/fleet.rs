//! A fleet of simulated devices for cluster tests: one tokio task per device, each with its own
//! MBFP connection (the simulator's device library), on a runtime of its own thread.
//!
//! Every device logs in at a node of a list (all at the first node to begin with), follows
//! `Redirect`, answers every incoming call at once (`Answer` with an audio offer), answers the
//! node's pings (QUIC keepalives keep the connection up), and hangs up nothing itself. When its
//! node says `Goodbye` it logs in again at once at the same node (a real device has one
//! configured address; the node redirects it). When the connection is lost it tries the next node of the
//! list after a short pause, and for a while does not follow redirects back to the node it lost
//! (the redirecting node may not have noticed the death yet). It logs in afresh each time (no
//! resume token), so a call in flight on a dead node is taken over by the far end's next
//! request, not by the device.
//!
//! The fleet records where each device is (`Welcome.node_id`), every call it answered and on
//! which node, and every login, loss, goodbye and redirect with its instant, for the test to
//! check. It decides nothing about the gateway and checks nothing itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{Answer, Envelope, Hello, Pong};
use thalamus_sim::device::{DeviceConnection, DeviceError};

/// A node the devices may connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetNode {
    /// Node id (as in `Welcome.node_id` and `Redirect.node_id`).
    pub id: String,
    /// The node's QUIC address.
    pub quic: SocketAddr,
    /// The node's certificate fingerprint (hex), pinned by the devices.
    pub fingerprint: String,
}

/// Timing of the devices' connections.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The devices' shared secret.
    pub secret: String,
    /// Pause before logging in again after a loss or a failed attempt.
    pub reconnect_pause: Duration,
    /// QUIC keepalive interval of the devices.
    pub keepalive: Duration,
    /// QUIC idle timeout of the devices: a dead node is noticed this long after its last packet
    /// (the effective timeout is the smaller of this and the node's).
    pub idle_timeout: Duration,
    /// Longest wait for a connection and its `Welcome`.
    pub login_timeout: Duration,
    /// Most redirects followed in a row before the device pauses and tries the next node.
    pub max_redirects_in_a_row: u32,
    /// For this long after losing its connection to a node, the device does not follow a
    /// redirect back to that node (the redirecting node has not noticed the death yet); it
    /// pauses and logs in again where it is.
    pub distrust_lost_node: Duration,
    /// Calls the first devices of the fleet place while logged in (none: they only answer).
    pub dial: Option<DialPlan>,
    /// How long an incoming call rings before the device answers it (zero: at once).
    pub answer_after: Duration,
    /// Log in again with the session's resume token after a loss (the calls listed in the
    /// `Welcome` go on: a ringing one is answered when its time comes). Without it every
    /// login is a new session.
    pub resume: bool,
}

/// Calls devices place: each dialing device calls `target`, hangs up `hold` after the answer,
/// and dials again `pause` after the call ended.
#[derive(Debug, Clone)]
pub struct DialPlan {
    /// How many devices dial (the first of the fleet's list).
    pub devices: usize,
    /// The SIP URI they call.
    pub target: String,
    /// How long a call is held after its answer.
    pub hold: Duration,
    /// Pause between the end of a call (or a refused dial) and the next dial.
    pub pause: Duration,
}

/// How one call a device placed went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialOutcome {
    /// Answered, held, hung up by the device, ended.
    Completed,
    /// Refused before a call existed (an MBFP `Error` answering the `Dial`, e.g. a draining
    /// node's `Busy`): the device dials again, from the node it moves to.
    Refused(String),
    /// The session ended before the node answered the `Dial` at all (no `CallEvent`, no
    /// `Error`): a node that says `Goodbye` before it read the `Dial` never saw it. The node's
    /// call records tell whether a call was made (the rolling-restart test checks them).
    Unanswered(String),
    /// The call existed and did not complete (ended otherwise, or the session ended under it).
    Failed(String),
}

/// One call a device placed.
#[derive(Debug, Clone)]
pub struct DialRecord {
    /// When the `Dial` left.
    pub at: Instant,
    /// The device.
    pub device: String,
    /// The node the device was logged in at.
    pub node: String,
    /// How it went.
    pub outcome: DialOutcome,
}

impl FleetConfig {
    /// Short timings for loopback tests, with the devices' shared secret.
    pub fn quick(secret: &str) -> Self {
        Self {
            secret: secret.to_string(),
            reconnect_pause: Duration::from_millis(100),
            keepalive: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(700),
            login_timeout: Duration::from_secs(10),
            max_redirects_in_a_row: 4,
            distrust_lost_node: Duration::from_secs(3),
            dial: None,
            answer_after: Duration::ZERO,
            resume: false,
        }
    }
}

/// What happened to one device, with its instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetEventKind {
    /// Logged in; `Welcome.node_id`.
    Login {
        /// The node that welcomed the device.
        node: String,
    },
    /// Redirected by `from` to `to` (`Redirect.node_id`).
    Redirected {
        /// The node that redirected (the node the device tried).
        from: String,
        /// The node named in the redirect.
        to: String,
    },
    /// The node said `Goodbye` with this reason (the MBFP enum value).
    Goodbye {
        /// The node.
        node: String,
        /// `GoodbyeReason` as an integer.
        reason: i32,
    },
    /// The connection to the node was lost (closed, timed out, reset).
    Lost {
        /// The node.
        node: String,
    },
    /// A login attempt failed (no connection, no answer, or refused with an error).
    LoginFailed {
        /// The node tried.
        node: String,
        /// What went wrong.
        error: String,
    },
}

/// One event of one device.
#[derive(Debug, Clone)]
pub struct FleetEvent {
    /// When it happened.
    pub at: Instant,
    /// The device.
    pub device: String,
    /// What happened.
    pub kind: FleetEventKind,
}

/// One call a device answered.
#[derive(Debug, Clone)]
pub struct CallRecord {
    /// When the `IncomingCall` arrived.
    pub at: Instant,
    /// The device.
    pub device: String,
    /// The node the device was logged in at when it answered.
    pub node: String,
    /// The call rang in an earlier session, lost with its node, and was answered in the
    /// resumed one.
    pub resumed: bool,
}

/// What became of the calls that were ringing when their device's session was lost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RingingAcrossLoss {
    /// Calls ringing (or answered, the node's `Answered` not heard yet) at a device when its
    /// session was lost, and calls the resumed session listed as ringing that the device never
    /// heard of (their offer was lost with the node, or they are new calls that waited for the
    /// device where it resumed).
    pub at_loss: u64,
    /// Of those, the ones the device never heard of.
    pub unheard: u64,
    /// Of those, listed as ringing in the resumed session's `Welcome`.
    pub listed_on_resume: u64,
    /// Of those, answered (again) in the resumed session.
    pub answered: u64,
    /// Of those, reported `Answered` by the node (or listed as answered on resume).
    pub confirmed: u64,
    /// By the node whose loss they rang across: (ringing at the loss, later confirmed).
    pub by_node: BTreeMap<String, (u64, u64)>,
}

#[derive(Debug, Default)]
struct Shared {
    nodes: Vec<FleetNode>,
    placement: BTreeMap<String, Option<String>>,
    events: Vec<FleetEvent>,
    calls: Vec<CallRecord>,
    dials: Vec<DialRecord>,
    /// Set by [`Fleet::stop_dialing`].
    no_more_dials: bool,
    /// Calls placed and not finished yet.
    dials_in_progress: usize,
    ringing: RingingAcrossLoss,
}

impl Shared {
    fn event(&mut self, device: &str, kind: FleetEventKind) {
        self.events.push(FleetEvent {
            at: Instant::now(),
            device: device.to_string(),
            kind,
        });
    }
}

/// The running fleet; stopped (every connection closed) when dropped.
pub struct Fleet {
    shared: Arc<Mutex<Shared>>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").finish_non_exhaustive()
    }
}

impl Fleet {
    /// Starts one task per device id; each logs in at `nodes[0]` first.
    pub fn start(devices: &[String], nodes: Vec<FleetNode>, config: FleetConfig) -> Self {
        assert!(!nodes.is_empty(), "a fleet needs at least one node");
        let shared = Arc::new(Mutex::new(Shared {
            nodes,
            placement: devices.iter().map(|d| (d.clone(), None)).collect(),
            ..Default::default()
        }));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let devices = devices.to_vec();
        let task_shared = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("fleet runtime");
            rt.block_on(async move {
                let mut tasks = Vec::new();
                let dialers = config.dial.as_ref().map_or(0, |d| d.devices);
                for (i, id) in devices.into_iter().enumerate() {
                    let mut config = config.clone();
                    if i >= dialers {
                        config.dial = None;
                    }
                    tasks.push(tokio::spawn(run_device(
                        id,
                        config,
                        task_shared.clone(),
                        stop_rx.clone(),
                    )));
                }
                for task in tasks {
                    let _ = task.await;
                }
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        Self {
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a node or replaces the one with the same id (a restarted node's new address).
    pub fn set_node(&self, node: FleetNode) {
        let mut shared = self.lock();
        match shared.nodes.iter_mut().find(|n| n.id == node.id) {
            Some(n) => *n = node,
            None => shared.nodes.push(node),
        }
    }

    /// Where each device is logged in now (`None`: not logged in).
    pub fn placement(&self) -> BTreeMap<String, Option<String>> {
        self.lock().placement.clone()
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<FleetEvent> {
        self.lock().events.clone()
    }

    /// Every call answered so far.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.lock().calls.clone()
    }

    /// The calls that were ringing when their device's session was lost, and what became of
    /// them (with [`FleetConfig::resume`]).
    pub fn ringing_across_loss(&self) -> RingingAcrossLoss {
        self.lock().ringing.clone()
    }

    /// Devices place no new call from now on (calls in progress go on to their end).
    pub fn stop_dialing(&self) {
        self.lock().no_more_dials = true;
    }

    /// Calls placed that have not finished yet.
    pub fn dials_in_progress(&self) -> usize {
        self.lock().dials_in_progress
    }

    /// Every call placed so far (with [`FleetConfig::dial`]).
    pub fn dials(&self) -> Vec<DialRecord> {
        self.lock().dials.clone()
    }

    /// Waits until `pred` holds for the placement; fails with the last placement after
    /// `timeout`.
    pub fn wait_placement(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&BTreeMap<String, Option<String>>) -> bool,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let placement = self.placement();
            if pred(&placement) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                let wrong: Vec<String> = placement
                    .iter()
                    .map(|(d, n)| format!("{d}@{}", n.as_deref().unwrap_or("-")))
                    .collect();
                bail!("devices never {what} within {timeout:?}; now: {wrong:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every device is logged in at the node `expected` gives it.
    pub fn wait_on(
        &self,
        expected: &BTreeMap<String, String>,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        self.wait_placement(timeout, "reached their expected nodes", |p| {
            expected
                .iter()
                .all(|(d, n)| p.get(d).and_then(|x| x.as_deref()) == Some(n.as_str()))
        })
    }

    /// Stops every device and waits for the fleet's thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where the device goes next.
enum Target {
    /// The node at this index of the list (modulo its length).
    Index(usize),
    /// The address a redirect named.
    Redirect(SocketAddr),
}

/// How a session ended.
enum SessionEnd {
    Goodbye,
    Lost,
    Stopped,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

async fn run_device(
    id: String,
    config: FleetConfig,
    shared: Arc<Mutex<Shared>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut target = Target::Index(0);
    let mut redirects_in_a_row = 0u32;
    let mut dialer = config.dial.clone().map(Dialer::new);
    let mut ringer = Ringer::default();
    // The node whose connection this device lost last, and when.
    let mut lost: Option<(String, Instant)> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let (node, index) = {
            let s = lock(&shared);
            match target {
                Target::Index(i) => {
                    let i = i % s.nodes.len();
                    (Some(s.nodes[i].clone()), i)
                }
                Target::Redirect(addr) => {
                    let i = s.nodes.iter().position(|n| n.quic == addr);
                    (i.map(|i| s.nodes[i].clone()), i.unwrap_or(0))
                }
            }
        };
        let Some(node) = node else {
            // A redirect to an address the fleet does not know: try the list again.
            target = Target::Index(index + 1);
            pause(&config, &mut stop).await;
            continue;
        };
        let token = if config.resume {
            ringer.token.clone()
        } else {
            Vec::new()
        };
        let login = tokio::time::timeout(config.login_timeout, login(&id, &node, &config, token));
        let outcome = tokio::select! {
            outcome = login => outcome,
            _ = stop.changed() => return,
        };
        match outcome {
            Ok(Ok(LoginOutcome::Welcome(conn, endpoint, welcome))) => {
                redirects_in_a_row = 0;
                let at = if welcome.node_id.is_empty() {
                    node.id.clone()
                } else {
                    welcome.node_id.clone()
                };
                {
                    let mut s = lock(&shared);
                    s.placement.insert(id.clone(), Some(at.clone()));
                    s.event(&id, FleetEventKind::Login { node: at.clone() });
                }
                ringer.welcome(&welcome, &shared, config.answer_after);
                let end = session(
                    &id,
                    &at,
                    conn,
                    &shared,
                    &mut stop,
                    dialer.as_mut(),
                    &mut ringer,
                    &config,
                )
                .await;
                endpoint.close(0u32.into(), b"bye");
                lock(&shared).placement.insert(id.clone(), None);
                match end {
                    SessionEnd::Stopped => return,
                    // At once, at the same node: it redirects us when we belong elsewhere now.
                    SessionEnd::Goodbye => target = Target::Index(index),
                    SessionEnd::Lost => {
                        ringer.lost(&shared, &at);
                        lock(&shared).event(&id, FleetEventKind::Lost { node: at.clone() });
                        lost = Some((at, Instant::now()));
                        target = Target::Index(index + 1);
                        pause(&config, &mut stop).await;
                    }
                }
            }
            Ok(Ok(LoginOutcome::Redirect { address, node_id })) => {
                let suspect = lost.as_ref().is_some_and(|(n, at)| {
                    *n == node_id && at.elapsed() < config.distrust_lost_node
                });
                lock(&shared).event(
                    &id,
                    FleetEventKind::Redirected {
                        from: node.id.clone(),
                        to: node_id,
                    },
                );
                if suspect {
                    // Sent back to the node that just died under us: ask here again shortly.
                    target = Target::Index(index);
                    pause(&config, &mut stop).await;
                    continue;
                }
                redirects_in_a_row += 1;
                match address.parse::<SocketAddr>() {
                    Ok(addr) if redirects_in_a_row <= config.max_redirects_in_a_row => {
                        target = Target::Redirect(addr);
                    }
                    _ => {
                        redirects_in_a_row = 0;
                        target = Target::Index(index + 1);
                        pause(&config, &mut stop).await;
                    }
                }
            }
            Ok(Err(e)) => {
                lock(&shared).event(
                    &id,
                    FleetEventKind::LoginFailed {
                        node: node.id.clone(),
                        error: format!("{e:#}"),
                    },
                );
                redirects_in_a_row = 0;
                target = Target::Index(index + 1);
                pause(&config, &mut stop).await;
            }
            Err(_) => {
                lock(&shared).event(
                    &id,
                    FleetEventKind::LoginFailed {
                        node: node.id.clone(),
                        error: "login timed out".into(),
                    },
                );
                redirects_in_a_row = 0;
                target = Target::Index(index + 1);
                pause(&config, &mut stop).await;
            }
        }
    }
}

async fn pause(config: &FleetConfig, stop: &mut tokio::sync::watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(config.reconnect_pause) => {}
        _ = stop.changed() => {}
    }
}

enum LoginOutcome {
    Welcome(
        Box<DeviceConnection>,
        quinn::Endpoint,
        thalamus_proto::v1::Welcome,
    ),
    Redirect {
        address: String,
        node_id: String,
    },
}

async fn login(
    id: &str,
    node: &FleetNode,
    config: &FleetConfig,
    resume_token: Vec<u8>,
) -> anyhow::Result<LoginOutcome> {
    let fingerprint = thalamus_sim::quic::parse_fingerprint(&node.fingerprint)?;
    let mut client = thalamus_sim::quic::client_config(Some(fingerprint))?;
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(config.keepalive));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(config.idle_timeout).context("idle timeout")?,
    ));
    client.transport_config(Arc::new(transport));
    let endpoint = thalamus_sim::quic::client_endpoint(node.quic, client)?;
    let mut conn = DeviceConnection::connect(&endpoint, node.quic, "localhost").await?;
    let hello = Hello {
        device_id: id.to_string(),
        credential: config.secret.clone(),
        resume_token,
        ..Default::default()
    };
    match conn.hello(hello).await {
        Ok(welcome) => Ok(LoginOutcome::Welcome(Box::new(conn), endpoint, welcome)),
        Err(DeviceError::Refused(env)) => {
            conn.conn.close(0u32.into(), b"redirected");
            endpoint.close(0u32.into(), b"bye");
            match env.body {
                Some(Body::Redirect(r)) => Ok(LoginOutcome::Redirect {
                    address: r.address,
                    node_id: r.node_id,
                }),
                other => bail!("login refused: {other:?}"),
            }
        }
        Err(e) => {
            endpoint.close(0u32.into(), b"bye");
            Err(e.into())
        }
    }
}

/// A device's ringing calls (answered after [`FleetConfig::answer_after`]) and its resume
/// token, kept across sessions. A resumed session's `Welcome` is the truth about the calls:
/// one listed as ringing is answered (again, if the answer was lost with the node; at once
/// after the ring time if the device never heard of it), one not listed is forgotten.
#[derive(Debug, Default)]
struct Ringer {
    token: Vec<u8>,
    /// Ringing calls: when each is answered, and whether it rang in a lost session.
    ringing: BTreeMap<u32, (tokio::time::Instant, bool)>,
    /// Answered, waiting for the node's `Answered`; whether it rang in a lost session.
    answering: BTreeMap<u32, bool>,
    /// Whether the last session was lost (a loss, not a goodbye).
    after_loss: bool,
    /// The node each call rang at when its session was lost.
    lost_on: BTreeMap<u32, String>,
}

impl Ringer {
    fn welcome(
        &mut self,
        welcome: &thalamus_proto::v1::Welcome,
        shared: &Mutex<Shared>,
        answer_after: Duration,
    ) {
        use thalamus_proto::v1::CallState;
        self.token.clone_from(&welcome.resume_token);
        let after_loss = std::mem::take(&mut self.after_loss);
        if !welcome.resumed {
            self.ringing.clear();
            self.answering.clear();
            return;
        }
        let listed = |r: u32| {
            welcome
                .live_calls
                .iter()
                .find(|c| c.call_ref == r)
                .and_then(|c| CallState::try_from(c.state).ok())
        };
        let now = tokio::time::Instant::now();
        let mut s = lock(shared);
        // Answers lost with the node: answered again at once; answers that went through.
        for (r, lost) in std::mem::take(&mut self.answering) {
            match listed(r) {
                Some(CallState::Ringing) => {
                    self.ringing.insert(r, (now, lost));
                }
                Some(CallState::Answered | CallState::Held) if lost => {
                    s.ringing.confirmed += 1;
                    if let Some(node) = self.lost_on.remove(&r) {
                        s.ringing.by_node.entry(node).or_default().1 += 1;
                    }
                }
                _ => {}
            }
        }
        self.ringing
            .retain(|r, _| listed(*r) == Some(CallState::Ringing));
        if after_loss {
            s.ringing.listed_on_resume +=
                self.ringing.values().filter(|(_, lost)| *lost).count() as u64;
            // Offered calls the device never heard of (the offer was lost with the node).
            for c in &welcome.live_calls {
                if c.state == CallState::Ringing as i32 && !self.ringing.contains_key(&c.call_ref) {
                    self.ringing.insert(c.call_ref, (now + answer_after, true));
                    s.ringing.at_loss += 1;
                    s.ringing.listed_on_resume += 1;
                    s.ringing.unheard += 1;
                }
            }
        }
    }

    fn lost(&mut self, shared: &Mutex<Shared>, node: &str) {
        self.after_loss = true;
        let mut s = lock(shared);
        for (r, lost) in self
            .ringing
            .iter_mut()
            .map(|(r, (_, lost))| (r, lost))
            .chain(self.answering.iter_mut())
        {
            if !*lost {
                *lost = true;
                s.ringing.at_loss += 1;
                s.ringing.by_node.entry(node.to_string()).or_default().0 += 1;
                self.lost_on.insert(*r, node.to_string());
            }
        }
    }

    /// The node reported `state` for the call.
    fn event(
        &mut self,
        call_ref: u32,
        state: thalamus_proto::v1::CallState,
        shared: &Mutex<Shared>,
    ) {
        use thalamus_proto::v1::CallState;
        match state {
            CallState::Answered if self.answering.remove(&call_ref) == Some(true) => {
                let mut s = lock(shared);
                s.ringing.confirmed += 1;
                if let Some(node) = self.lost_on.remove(&call_ref) {
                    s.ringing.by_node.entry(node).or_default().1 += 1;
                }
            }
            CallState::Ended => {
                self.ringing.remove(&call_ref);
                self.answering.remove(&call_ref);
                self.lost_on.remove(&call_ref);
            }
            _ => {}
        }
    }

    async fn due(&self) {
        match self.ringing.values().map(|(at, _)| *at).min() {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

/// A dialing device's calls: one at a time.
struct Dialer {
    plan: DialPlan,
    next_ref: u32,
    /// The call in progress: its ref, when it was dialed, and what it waits for.
    call: Option<(u32, Instant, DialStage)>,
    /// Whether the node said anything about the call in progress.
    heard: bool,
    next_dial: tokio::time::Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DialStage {
    /// Dialed: waiting for the answer.
    Answer,
    /// Answered: hang up at this instant.
    Hold(tokio::time::Instant),
    /// Hung up: waiting for the end.
    End,
}

impl Dialer {
    fn new(plan: DialPlan) -> Self {
        Self {
            next_ref: 1,
            call: None,
            heard: false,
            next_dial: tokio::time::Instant::now() + plan.pause,
            plan,
        }
    }

    /// When the dialer next has something to do.
    fn deadline(&self) -> tokio::time::Instant {
        match self.call {
            None => self.next_dial,
            Some((_, _, DialStage::Hold(at))) => at,
            // Waiting for the gateway: no timer of ours.
            Some(_) => tokio::time::Instant::now() + Duration::from_secs(3600),
        }
    }

    fn finish(&mut self, shared: &Mutex<Shared>, id: &str, node: &str, outcome: DialOutcome) {
        if let Some((_, at, _)) = self.call.take() {
            let mut s = lock(shared);
            s.dials_in_progress = s.dials_in_progress.saturating_sub(1);
            s.dials.push(DialRecord {
                at,
                device: id.to_string(),
                node: node.to_string(),
                outcome,
            });
        }
        self.next_dial = tokio::time::Instant::now() + self.plan.pause;
    }
}

async fn dialer_deadline(dialer: &Option<&mut Dialer>) {
    match dialer {
        Some(d) => tokio::time::sleep_until(d.deadline()).await,
        None => std::future::pending().await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    id: &str,
    node: &str,
    mut conn: Box<DeviceConnection>,
    shared: &Mutex<Shared>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    mut dialer: Option<&mut Dialer>,
    ringer: &mut Ringer,
    config: &FleetConfig,
) -> SessionEnd {
    let end = session_loop(
        id,
        node,
        &mut conn,
        shared,
        stop,
        &mut dialer,
        ringer,
        config,
    )
    .await;
    if let Some(d) = dialer {
        // A call the session ended under did not complete.
        let outcome = match d.call {
            Some((_, _, DialStage::Answer)) if !d.heard => {
                DialOutcome::Unanswered("the session ended before the Dial was answered".into())
            }
            Some((_, _, stage)) => {
                DialOutcome::Failed(format!("the session ended during the call ({stage:?})"))
            }
            None => DialOutcome::Completed,
        };
        if d.call.is_some() {
            d.finish(shared, id, node, outcome);
        }
    }
    end
}

#[allow(clippy::too_many_arguments)]
async fn session_loop(
    id: &str,
    node: &str,
    conn: &mut DeviceConnection,
    shared: &Mutex<Shared>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    dialer: &mut Option<&mut Dialer>,
    ringer: &mut Ringer,
    config: &FleetConfig,
) -> SessionEnd {
    loop {
        tokio::select! {
            _ = stop.changed() => {
                conn.conn.close(0u32.into(), b"bye");
                return SessionEnd::Stopped;
            }
            () = ringer.due() => {
                let now = tokio::time::Instant::now();
                let due: Vec<(u32, bool)> = ringer
                    .ringing
                    .iter()
                    .filter(|(_, (at, _))| *at <= now)
                    .map(|(r, (_, lost))| (*r, *lost))
                    .collect();
                for (call_ref, lost) in due {
                    ringer.ringing.remove(&call_ref);
                    {
                        let mut s = lock(shared);
                        s.calls.push(CallRecord {
                            at: Instant::now(),
                            device: id.to_string(),
                            node: node.to_string(),
                            resumed: lost,
                        });
                        if lost {
                            s.ringing.answered += 1;
                        }
                    }
                    ringer.answering.insert(call_ref, lost);
                    let answer = Body::Answer(Answer {
                        call_ref,
                        media: Some(thalamus_sim::load::device_calls::device_media()),
                    });
                    if conn.writer.send(answer).await.is_err() {
                        return SessionEnd::Lost;
                    }
                }
            }
            () = dialer_deadline(dialer) => {
                let Some(d) = dialer.as_mut() else { continue };
                match d.call {
                    None if lock(shared).no_more_dials => {
                        d.next_dial = tokio::time::Instant::now() + Duration::from_secs(3600);
                    }
                    None => {
                        let call_ref = d.next_ref;
                        d.next_ref += 1;
                        d.call = Some((call_ref, Instant::now(), DialStage::Answer));
                        d.heard = false;
                        lock(shared).dials_in_progress += 1;
                        let dial = Body::Dial(thalamus_proto::v1::Dial {
                            call_ref,
                            target: d.plan.target.clone(),
                            media: Some(thalamus_sim::load::device_calls::device_media()),
                            headers: Default::default(),
                        });
                        if conn.writer.send(dial).await.is_err() {
                            return SessionEnd::Lost;
                        }
                    }
                    Some((call_ref, at, DialStage::Hold(_))) => {
                        d.call = Some((call_ref, at, DialStage::End));
                        let hangup = Body::Hangup(thalamus_proto::v1::Hangup { call_ref });
                        if conn.writer.send(hangup).await.is_err() {
                            return SessionEnd::Lost;
                        }
                    }
                    Some(_) => {}
                }
            }
            frame = conn.reader.next() => {
                let Ok(env) = frame else { return SessionEnd::Lost };
                match env.body {
                    Some(Body::CallEvent(ev)) => {
                        let state = thalamus_proto::v1::CallState::try_from(ev.state)
                            .unwrap_or(thalamus_proto::v1::CallState::Unspecified);
                        ringer.event(ev.call_ref, state, shared);
                        let Some(d) = dialer.as_mut() else { continue };
                        let Some((call_ref, at, stage)) = d.call else { continue };
                        if ev.call_ref != call_ref {
                            continue;
                        }
                        d.heard = true;
                        let state = thalamus_proto::v1::CallState::try_from(ev.state)
                            .unwrap_or(thalamus_proto::v1::CallState::Unspecified);
                        match (state, stage) {
                            (thalamus_proto::v1::CallState::Answered, DialStage::Answer) => {
                                let until = tokio::time::Instant::now() + d.plan.hold;
                                d.call = Some((call_ref, at, DialStage::Hold(until)));
                            }
                            (thalamus_proto::v1::CallState::Ended, DialStage::End)
                                if ev.end_reason
                                    == thalamus_proto::v1::EndReason::LocalHangup as i32 =>
                            {
                                d.finish(shared, id, node, DialOutcome::Completed);
                            }
                            (thalamus_proto::v1::CallState::Ended, _) if ev.stats.is_none() => {
                                let why = format!("ended: {} ({})", ev.reason, ev.sip_status);
                                d.finish(shared, id, node, DialOutcome::Failed(why));
                            }
                            _ => {}
                        }
                    }
                    Some(Body::Error(e)) => {
                        let Some(d) = dialer.as_mut() else { continue };
                        if matches!(d.call, Some((_, _, DialStage::Answer))) {
                            d.finish(shared, id, node, DialOutcome::Refused(e.message));
                        }
                    }
                    Some(Body::Ping(p)) => {
                        let pong = Envelope {
                            request_id: env.request_id,
                            body: Some(Body::Pong(Pong { nonce: p.nonce })),
                        };
                        if conn.writer.send_envelope(&pong).await.is_err() {
                            return SessionEnd::Lost;
                        }
                    }
                    Some(Body::ResumeToken(t)) => ringer.token.clone_from(&t.token),
                    Some(Body::IncomingCall(c)) if !config.answer_after.is_zero() => {
                        let at = tokio::time::Instant::now() + config.answer_after;
                        ringer.ringing.entry(c.call_ref).or_insert((at, false));
                    }
                    Some(Body::IncomingCall(c)) => {
                        lock(shared).calls.push(CallRecord {
                            at: Instant::now(),
                            device: id.to_string(),
                            node: node.to_string(),
                            resumed: false,
                        });
                        let answer = Body::Answer(Answer {
                            call_ref: c.call_ref,
                            media: Some(thalamus_sim::load::device_calls::device_media()),
                        });
                        if conn.writer.send(answer).await.is_err() {
                            return SessionEnd::Lost;
                        }
                    }
                    Some(Body::Goodbye(g)) => {
                        lock(shared).event(
                            id,
                            FleetEventKind::Goodbye { node: node.to_string(), reason: g.reason },
                        );
                        conn.conn.close(0u32.into(), b"goodbye");
                        return SessionEnd::Goodbye;
                    }
                    _ => {}
                }
            }
        }
    }
}
