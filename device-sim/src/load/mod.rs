//! `thalamus-sim load`: many simulated devices, each its own QUIC connection and credential
//! (`<prefix><n>`, one shared secret as `provision` creates them), placing calls at a fixed
//! rate spread over the devices, or (`incoming`) answering the calls a SIP load generator
//! sends them through the gateway. Measures set-up latency (Dial to the answered event),
//! counts outcomes by reason, optionally streams media and sends texts, and reports (see
//! [`report::LoadReport`]; `--json` writes it, `--plot` draws it).
//!
//! With `--status-file` the phases are written as they come: `connected` (all logins done),
//! `calling` (the first call is due; rewritten each second with the counts), `draining` (no
//! more calls to place), `drained` (every call finished or written off, connections still
//! up) and `done`.
//!
//! Every device is a client of the device SDK (`thalamus_device::Client`), many of them sharing
//! a few QUIC endpoints. Against a cluster: several entry points (device n logs in through
//! entry point n mod their number), redirects followed to the owner node, and a device that
//! loses its node logs in again elsewhere with its resume token (the SDK session does that,
//! trying the lost node last); the calls the new node lists go on. The report counts per node
//! and per reconnect.
//!
//! Layout: [`pacer`] (when starts are due), [`device_calls`] (one device's calls, sans-IO),
//! [`report`] (the tally), [`plot`] (SVG), [`cli`] (the command), and here the tasks that
//! connect the devices and drive them. Every load is bounded: a device count, a rate over a
//! duration, per-call timeouts and a drain deadline. It does not provision devices (see
//! `provision`) nor start the gateway or the SIP peer. Ctrl-C or SIGTERM ends a run early
//! and still reports (open calls count as `unfinished`).

pub mod cli;
pub mod device_calls;
pub mod pacer;
pub mod plot;
pub mod report;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thalamus_proto::media::{MediaDatagram, MediaHeader, StreamId};
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::Welcome;
use tokio::sync::{mpsc, watch, Semaphore};

use device_calls::{CallSettings, DeviceCalls, Outcome};
use pacer::Pacer;
use report::{LoadReport, Progress, RunFacts, Tally};
use thalamus_device::session::{Event, SessionConfig};
use thalamus_device::{Client, ClientConfig, ClientError, ClientEvents};

/// Commands queued to one device at most.
const DEVICE_QUEUE: usize = 64;

/// Events and media datagrams one device's SDK client holds for its task at most.
const DEVICE_EVENTS: usize = 64;
const DEVICE_DATAGRAMS: usize = 256;

/// Outcomes queued toward the tally at most (device tasks wait when it is full).
const OUTCOME_QUEUE: usize = 65_536;

/// Devices one run may simulate.
pub const MAX_DEVICES: u32 = 200_000;

/// Calls per device when the gateway's Welcome does not say.
const DEFAULT_MAX_CALLS: u32 = 4;

/// Extra time after the last planned hangup before open calls are written off.
const DRAIN_SLACK: Duration = Duration::from_secs(3);

/// Longest one login (QUIC handshake, Hello, Welcome) may take at one address.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest one login may take at the address of the node a device just lost.
const SUSPECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Most redirects followed in one login.
const MAX_REDIRECTS: u32 = 3;

/// First and longest pause between two rounds of reconnect attempts.
const RECONNECT_DELAY: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));

/// How the devices reach the gateway: its entry points, the TLS name to present, the devices'
/// secret and the QUIC client settings.
struct Connector {
    gateways: Vec<SocketAddr>,
    server_name: String,
    secret: String,
    quic: quinn::ClientConfig,
}

/// A device logged in: its SDK client, live.
struct Login {
    client: Client,
    events: ClientEvents,
    /// The node's id from the Welcome (its address when the Welcome names none).
    node: Arc<str>,
    /// The address it is connected to.
    address: String,
    max_calls: Option<u32>,
}

impl Connector {
    /// The session of `device_id`: the entry points from `first` on, the load's timeouts (the
    /// node just lost is tried last and briefly, see [`SUSPECT_TIMEOUT`]), redirects followed.
    fn session(&self, device_id: &str, first: usize) -> SessionConfig {
        let n = self.gateways.len().max(1);
        let entry_points = (0..n)
            .filter_map(|i| self.gateways.get((first + i) % n))
            .map(SocketAddr::to_string)
            .collect();
        let mut session = SessionConfig::new(device_id, self.secret.clone(), entry_points);
        session.login_timeout = LOGIN_TIMEOUT;
        session.suspect_timeout = SUSPECT_TIMEOUT;
        session.max_redirects = MAX_REDIRECTS;
        (session.backoff_initial, session.backoff_max) = RECONNECT_DELAY;
        session
    }

    /// Starts `device_id` as a device of the SDK through `endpoint` and waits for its session:
    /// each entry point is tried once (following redirects) before the login counts as failed.
    async fn log_in(
        &self,
        endpoint: &quinn::Endpoint,
        device_id: &str,
        first: usize,
        seed: u64,
    ) -> anyhow::Result<Login> {
        let mut config = ClientConfig::new(
            self.session(device_id, first),
            self.quic.clone(),
            &self.server_name,
        );
        config.endpoint = Some(endpoint.clone());
        // Each device its own backoff jitter: a node's devices do not come back in step.
        config.seed = seed;
        config.event_buffer = DEVICE_EVENTS;
        config.datagram_buffer = DEVICE_DATAGRAMS;
        let (client, mut events) = Client::start(config)?;
        let tries = u32::try_from(self.gateways.len().max(1)).unwrap_or(u32::MAX);
        let mut address = String::new();
        let limit = LOGIN_TIMEOUT * tries.saturating_add(1);
        let waited = tokio::time::timeout(limit, async {
            let mut last = String::from("no entry point answered");
            while let Some(event) = events.events.recv().await {
                match event {
                    Event::Connected { address: at } => address = at,
                    Event::Live(welcome) => return Ok(*welcome),
                    Event::Disconnected {
                        reason, attempt, ..
                    } => {
                        last = reason;
                        if attempt >= tries {
                            anyhow::bail!("{last}");
                        }
                    }
                    Event::Refused { message, .. } => last = message,
                    Event::Closed(by) => anyhow::bail!("login ended ({by:?}): {last}"),
                    _ => {}
                }
            }
            anyhow::bail!("the client stopped: {last}")
        })
        .await;
        let welcome = match waited {
            Ok(Ok(welcome)) => welcome,
            Ok(Err(e)) => {
                client.close().await;
                return Err(e);
            }
            Err(_) => {
                client.close().await;
                anyhow::bail!("no session within {limit:?}");
            }
        };
        Ok(Login {
            client,
            events,
            node: node_name(&welcome, &address),
            address,
            max_calls: welcome.limits.map(|l| l.max_calls).filter(|m| *m > 0),
        })
    }
}

/// A node's name in the report: its id from the Welcome, or the address logged in at.
fn node_name(welcome: &Welcome, address: &str) -> Arc<str> {
    if welcome.node_id.is_empty() {
        address.into()
    } else {
        welcome.node_id.as_str().into()
    }
}

/// Settings of a load run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Gateway QUIC addresses: one node, or a cluster's entry points.
    pub gateways: Vec<SocketAddr>,
    /// TLS server name.
    pub server_name: String,
    /// Pinned certificate fingerprints (any is accepted; none: the WebPKI roots).
    pub fingerprints: Vec<[u8; 32]>,
    /// How long a device that lost its node keeps trying to log in again (zero: it does
    /// not; its calls fail).
    pub reconnect: Duration,
    /// The devices' QUIC idle timeout (`None`: the gateway's).
    pub idle_timeout: Option<Duration>,
    /// Device id prefix.
    pub prefix: String,
    /// First device number.
    pub first: u32,
    /// Devices.
    pub devices: u32,
    /// Shared secret.
    pub secret: String,
    /// Logins in flight at once.
    pub login_concurrency: usize,
    /// UDP sockets (QUIC endpoints) to spread the connections over.
    pub endpoints: usize,
    /// Calls started per second (outgoing mode).
    pub cps: f64,
    /// Length of the calling window (incoming mode: the longest the run lasts).
    pub duration: Duration,
    /// Time answered before the device hangs up (zero: the other side does).
    pub hold: Duration,
    /// Whom outgoing calls and texts go to.
    pub target: String,
    /// Stream 20 ms audio frames on answered calls and count the echoes.
    pub media: bool,
    /// Texts per second over the calling window.
    pub texts_per_sec: f64,
    /// Devices answer calls instead of placing them.
    pub incoming: bool,
    /// Incoming mode: stop once this many calls have finished (0: run for `duration`).
    pub expect_calls: u64,
    /// Unanswered calls are given up after this long.
    pub call_timeout: Duration,
    /// Time between the last login and the first call (the devices sit idle).
    pub idle_before: Duration,
    /// Cap on calls per device below the gateway's limit.
    pub max_calls_per_device: Option<u32>,
    /// Rewritten every second with the phase and counts, for scripts.
    pub status_file: Option<PathBuf>,
    /// Draw the live progress line on the terminal.
    pub progress: bool,
}

/// Load run errors.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bad settings.
    #[error("{0}")]
    Settings(String),
    /// QUIC client set-up failed.
    #[error(transparent)]
    Client(#[from] crate::quic::ClientSetupError),
    /// The histogram could not be created.
    #[error("histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
}

/// What the scheduler knows of one device.
#[derive(Debug)]
struct DeviceSlot {
    commands: mpsc::Sender<Command>,
    calls: AtomicU32,
    max_calls: u32,
    alive: AtomicBool,
    /// The node it is logged in at.
    node: std::sync::Mutex<Arc<str>>,
    /// It lost its node and no node took it within the reconnect time.
    gave_up: AtomicBool,
    /// It is logging in again.
    reconnecting: AtomicBool,
}

#[derive(Debug)]
enum Command {
    Dial,
    Text,
}

fn status(path: &Option<PathBuf>, phase: &str, connected: u32, progress: &Progress) {
    let Some(path) = path else { return };
    let text = serde_json::json!({
        "phase": phase,
        "devices_connected": connected,
        "attempted": progress.attempted,
        "answered": progress.answered,
        "failed": progress.failed,
        "in_progress": progress.in_progress,
    })
    .to_string();
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

fn progress_bar(enabled: bool) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        None,
        indicatif::ProgressDrawTarget::stderr_with_hz(4),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {msg}") {
        bar.set_style(style);
    }
    bar
}

struct LoggedIn {
    slots: Vec<Arc<DeviceSlot>>,
    /// The device tasks (each closes its client when the run stops).
    tasks: Vec<tokio::task::JoinHandle<()>>,
    failures: u32,
    first_error: Option<String>,
}

/// Logs every device in and starts its task.
async fn log_in(
    opts: &LoadOptions,
    quic: &quinn::ClientConfig,
    endpoints: &[quinn::Endpoint],
    outcomes: &mpsc::Sender<(Arc<str>, Outcome)>,
    stop: &watch::Receiver<bool>,
    bar: &indicatif::ProgressBar,
) -> LoggedIn {
    let gate = Arc::new(Semaphore::new(opts.login_concurrency.max(1)));
    let connector = Arc::new(Connector {
        gateways: opts.gateways.clone(),
        server_name: opts.server_name.clone(),
        secret: opts.secret.clone(),
        quic: quic.clone(),
    });
    let mut tasks = Vec::with_capacity(opts.devices as usize);
    for i in 0..opts.devices {
        let Some(endpoint) = endpoints.get(i as usize % endpoints.len().max(1)).cloned() else {
            break;
        };
        let gate = gate.clone();
        let connector = connector.clone();
        let device_id = format!("{}{}", opts.prefix, opts.first.saturating_add(i));
        let first = i as usize % opts.gateways.len().max(1);
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let login = connector
                .log_in(&endpoint, &device_id, first, u64::from(i))
                .await?;
            anyhow::Ok(login)
        }));
    }
    let settings = CallSettings {
        hold: opts.hold,
        call_timeout: opts.call_timeout,
        media: opts.media && !opts.incoming,
    };
    let mut out = LoggedIn {
        slots: Vec::with_capacity(tasks.len()),
        tasks: Vec::with_capacity(tasks.len()),
        failures: 0,
        first_error: None,
    };
    for (n, task) in tasks.into_iter().enumerate() {
        let result = match task.await {
            Ok(r) => r,
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(login) => {
                let gateway_max = login.max_calls.unwrap_or(DEFAULT_MAX_CALLS);
                let max_calls = opts
                    .max_calls_per_device
                    .map_or(gateway_max, |m| m.min(gateway_max));
                let (tx, rx) = mpsc::channel(DEVICE_QUEUE);
                let slot = Arc::new(DeviceSlot {
                    commands: tx,
                    calls: AtomicU32::new(0),
                    max_calls,
                    alive: AtomicBool::new(true),
                    node: std::sync::Mutex::new(login.node.clone()),
                    gave_up: AtomicBool::new(false),
                    reconnecting: AtomicBool::new(false),
                });
                out.tasks.push(tokio::spawn(device_task(DeviceTask {
                    client: login.client,
                    events: login.events,
                    node: login.node,
                    address: login.address,
                    reconnect: opts.reconnect,
                    core: DeviceCalls::new(settings.clone()),
                    commands: rx,
                    outcomes: outcomes.clone(),
                    slot: slot.clone(),
                    stop: stop.clone(),
                    target: opts.target.clone(),
                    outgoing: !opts.incoming,
                })));
                out.slots.push(slot);
            }
            Err(e) => {
                out.failures += 1;
                out.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        if n.is_multiple_of(64) {
            bar.set_message(format!(
                "logging in: {} of {} up, {} failed",
                out.slots.len(),
                opts.devices,
                out.failures
            ));
        }
    }
    out
}

/// Runs the load and returns its report.
pub async fn run(opts: LoadOptions) -> Result<LoadReport, LoadError> {
    if opts.devices == 0 || opts.devices > MAX_DEVICES {
        return Err(LoadError::Settings(format!(
            "--devices must be 1..={MAX_DEVICES}"
        )));
    }
    if !opts.cps.is_finite()
        || opts.cps < 0.0
        || !opts.texts_per_sec.is_finite()
        || opts.texts_per_sec < 0.0
    {
        return Err(LoadError::Settings(
            "rates must be zero or positive numbers".into(),
        ));
    }
    let Some(&first_gateway) = opts.gateways.first() else {
        return Err(LoadError::Settings("no gateway address".into()));
    };
    let config = crate::quic::client_config_with(opts.fingerprints.clone(), opts.idle_timeout)?;
    let endpoints: Vec<quinn::Endpoint> = (0..opts.endpoints.max(1))
        .map(|_| crate::quic::client_endpoint(first_gateway, config.clone()))
        .collect::<Result<_, _>>()?;
    let bar = progress_bar(opts.progress);
    let (outcome_tx, mut outcome_rx) = mpsc::channel(OUTCOME_QUEUE);
    let (stop_tx, stop_rx) = watch::channel(false);
    let login_start = Instant::now();
    let logged_in = log_in(&opts, &config, &endpoints, &outcome_tx, &stop_rx, &bar).await;
    drop(outcome_tx);
    let login_secs = login_start.elapsed().as_secs_f64();
    let connected = logged_in.slots.len() as u32;
    bar.println(format!(
        "{connected} of {} devices logged in in {login_secs:.1} s{}",
        opts.devices,
        logged_in
            .first_error
            .as_deref()
            .map(|e| format!(" (first failure: {e})"))
            .unwrap_or_default()
    ));
    status(
        &opts.status_file,
        "connected",
        connected,
        &Progress::default(),
    );
    if !opts.idle_before.is_zero() {
        bar.set_message(format!("{connected} devices idle"));
        tokio::time::sleep(opts.idle_before).await;
    }

    let start = Instant::now();
    let mut tally = Tally::new(start)?;
    tally.placement(&placement(&logged_in.slots), false);
    let call_rate = if opts.incoming { 0.0 } else { opts.cps };
    let mut call_pacer = Pacer::new(start, call_rate, opts.duration);
    let mut text_pacer = Pacer::new(start, opts.texts_per_sec, opts.duration);
    let calling_end = start + opts.duration;
    let mut drain_deadline: Option<Instant> = None;
    let (mut next_call_device, mut next_text_device) = (0usize, 0usize);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut ticks = 0u64;
    let slots = &logged_in.slots;
    status(
        &opts.status_file,
        "calling",
        connected,
        &tally.progress(start),
    );
    let mut outcome_stream_open = true;
    let mut interrupted = false;
    let interrupt = interrupt_signal();
    tokio::pin!(interrupt);

    loop {
        let now = Instant::now();
        // Phase: calling, then draining (outgoing), then done.
        let done = if opts.incoming {
            now >= calling_end
                || (opts.expect_calls > 0
                    && tally.all_finished()
                    && tally.progress(now).attempted >= opts.expect_calls)
        } else if now >= calling_end && call_pacer.finished() && text_pacer.finished() {
            let deadline = *drain_deadline.get_or_insert_with(|| {
                status(
                    &opts.status_file,
                    "draining",
                    connected,
                    &tally.progress(now),
                );
                now + opts.hold + opts.call_timeout + DRAIN_SLACK
            });
            (tally.all_finished() && tally.texts_pending() == 0) || now >= deadline
        } else {
            false
        };
        if done || interrupted || !outcome_stream_open {
            break;
        }
        let mut wake = now + Duration::from_millis(250);
        let deadlines = [
            call_pacer.next_at(),
            text_pacer.next_at(),
            (now < calling_end).then_some(calling_end),
            drain_deadline,
        ];
        for at in deadlines.into_iter().flatten() {
            wake = wake.min(at);
        }
        tokio::select! {
            outcome = outcome_rx.recv(), if outcome_stream_open => match outcome {
                Some((node, o)) => {
                    tally.add_on(&node, &o);
                    while let Ok((node, o)) = outcome_rx.try_recv() {
                        tally.add_on(&node, &o);
                    }
                }
                None => outcome_stream_open = false,
            },
            _ = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                for _ in 0..call_pacer.take_due(now) {
                    match dispatch(slots, &mut next_call_device, Command::Dial, true) {
                        true => tally.started(now),
                        false => tally.not_placed(),
                    }
                }
                for _ in 0..text_pacer.take_due(now) {
                    if dispatch(slots, &mut next_text_device, Command::Text, false) {
                        tally.text_sent();
                    }
                }
            }
            _ = &mut interrupt, if !interrupted => {
                // Ctrl-C or SIGTERM: stop now; calls still open are written off as unfinished.
                interrupted = true;
            }
            _ = tick.tick() => {
                ticks += 1;
                let progress = tally.progress(Instant::now());
                bar.set_message(progress.line());
                bar.tick();
                if ticks.is_multiple_of(4) {
                    let phase = if drain_deadline.is_some() { "draining" } else { "calling" };
                    status(&opts.status_file, phase, connected, &progress);
                }
            }
        }
    }
    let calling_window = if opts.incoming {
        Instant::now()
            .saturating_duration_since(start)
            .min(opts.duration)
    } else {
        opts.duration
    };
    tally.close();
    tally.placement(&placement(&logged_in.slots), true);
    for slot in &logged_in.slots {
        if slot.gave_up.load(Ordering::Relaxed) {
            tally.gave_up();
        }
        if slot.reconnecting.load(Ordering::Relaxed) {
            tally.reconnecting_at_end();
        }
    }
    status(
        &opts.status_file,
        "drained",
        connected,
        &tally.progress(Instant::now()),
    );
    let _ = stop_tx.send(true);
    // Each device closes its session (a Goodbye, then the connection).
    let closing = async {
        for task in logged_in.tasks {
            // A task's panic is its own: the run reports what it counted.
            let _ = task.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
    for e in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
    }
    let progress = tally.progress(Instant::now());
    status(&opts.status_file, "done", connected, &progress);
    bar.finish_and_clear();
    Ok(tally.report(
        RunFacts {
            mode: if opts.incoming {
                "incoming"
            } else {
                "outgoing"
            }
            .into(),
            devices: opts.devices,
            devices_connected: connected,
            login_failures: logged_in.failures,
            first_login_error: logged_in.first_error.clone(),
            login_secs,
            target_cps: call_rate,
            duration_secs: opts.duration.as_secs_f64(),
            hold_ms: u64::try_from(opts.hold.as_millis()).unwrap_or(u64::MAX),
        },
        calling_window,
        opts.media && !opts.incoming,
    ))
}

/// Where each device still logged in is.
fn placement(slots: &[Arc<DeviceSlot>]) -> Vec<String> {
    slots
        .iter()
        .filter(|s| s.alive.load(Ordering::Relaxed))
        .filter_map(|s| s.node.lock().ok().map(|n| n.to_string()))
        .collect()
}

/// Hands a command to the next device (round robin) that is alive and, for calls, below its
/// limit. Returns false when none took it.
fn dispatch(slots: &[Arc<DeviceSlot>], next: &mut usize, command: Command, call: bool) -> bool {
    let n = slots.len();
    let mut command = Some(command);
    for _ in 0..n {
        let i = *next % n;
        *next = (*next + 1) % n;
        let Some(slot) = slots.get(i) else { continue };
        if !slot.alive.load(Ordering::Relaxed) {
            continue;
        }
        if call {
            let taken = slot
                .calls
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                    (c < slot.max_calls).then_some(c + 1)
                })
                .is_ok();
            if !taken {
                continue;
            }
        }
        let Some(cmd) = command.take() else {
            return false;
        };
        match slot.commands.try_send(cmd) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Full(cmd) | mpsc::error::TrySendError::Closed(cmd)) => {
                if call {
                    slot.calls.fetch_sub(1, Ordering::AcqRel);
                }
                command = Some(cmd);
            }
        }
    }
    false
}

struct DeviceTask {
    client: Client,
    events: ClientEvents,
    /// The node it is logged in at.
    node: Arc<str>,
    /// The address it is connected to (names the node when its Welcome does not).
    address: String,
    reconnect: Duration,
    core: DeviceCalls,
    commands: mpsc::Receiver<Command>,
    outcomes: mpsc::Sender<(Arc<str>, Outcome)>,
    slot: Arc<DeviceSlot>,
    stop: watch::Receiver<bool>,
    target: String,
    outgoing: bool,
}

fn media_frame(call_ref: u32, seq: u16) -> Option<bytes::Bytes> {
    // 20 ms of PCMU silence-like pattern: 160 bytes.
    const PAYLOAD: [u8; 160] = [0xff; 160];
    MediaHeader {
        marker: seq == 0,
        payload_type: 0,
        sequence: seq,
        timestamp: u32::from(seq).wrapping_mul(160),
        call_ref,
        stream_id: StreamId::AUDIO,
    }
    .to_bytes(&PAYLOAD)
    .ok()
}

/// How a command the SDK did not send is reported.
fn not_sent(e: &ClientError) -> String {
    match e {
        ClientError::Command(thalamus_device::session::CommandError::NotLive) => {
            "connection lost".into()
        }
        other => format!("not sent: {other}"),
    }
}

/// `goodbye <reason>` for a node's Goodbye.
fn goodbye_cause(reason: i32) -> String {
    format!(
        "goodbye {}",
        thalamus_proto::v1::GoodbyeReason::try_from(reason)
            .map_or("unknown", |r| r
                .as_str_name()
                .trim_start_matches("GOODBYE_REASON_"))
            .to_ascii_lowercase()
    )
}

/// The device lost its node and logs in again (the SDK session does it: the entry points in
/// turn, the lost node last, with its resume token).
struct Away {
    since: Instant,
    /// `connection lost`, or `goodbye <reason>` from its node.
    cause: String,
}

/// Frames held while the device is away (its answers and hangups), sent once it is back.
const MAX_DEFERRED: usize = 256;

/// What a device task knows of its session besides its calls.
#[derive(Default)]
struct Presence {
    /// Lost its node; the SDK logs it in again.
    away: Option<Away>,
    /// The node's Goodbye, until the disconnection it announces.
    goodbye: Option<String>,
    /// The task ends, and why its open calls fail.
    ended: Option<String>,
    /// Frames produced while away (an unanswered call given up: its Hangup), sent once back.
    deferred: Vec<Body>,
}

/// Drives one device (an SDK client) until its session ends or the run stops: hands it the
/// calls and texts the scheduler sends, answers and hangs up as [`DeviceCalls`] says, streams
/// media, and reports every outcome. A device that loses its node is not offered calls until
/// its session is live again (`reconnect` at most; zero: its calls fail at once).
async fn device_task(mut t: DeviceTask) {
    let mut out = Vec::new();
    let mut outcomes = Vec::new();
    let mut media_tick = tokio::time::interval(Duration::from_millis(20));
    media_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let media = t.outgoing && t.core.media_enabled();
    let mut p = Presence::default();
    loop {
        let deadline = t.core.next_deadline();
        let give_up = p.away.as_ref().map(|a| a.since + t.reconnect);
        let sending = media && p.away.is_none() && t.core.calls_in_progress() > 0;
        tokio::select! {
            // The session's events first: a command must not act on a session the task does
            // not know is gone, or back.
            biased;
            event = t.events.events.recv() => {
                if !on_event(&mut t, &mut p, event, &mut out, &mut outcomes).await {
                    t.client.close().await;
                    return;
                }
            }
            _ = t.stop.changed() => {
                t.client.close().await;
                return;
            }
            command = t.commands.recv() => {
                // Whatever the session said meanwhile is known before the command acts (a
                // Dial answered by a session resumed meanwhile must not be taken for a call
                // lost with the old one).
                while let Ok(event) = t.events.events.try_recv() {
                    if !on_event(&mut t, &mut p, Some(event), &mut out, &mut outcomes).await {
                        t.client.close().await;
                        return;
                    }
                }
                match command {
                    Some(Command::Dial) => match t.client.dial(&t.target, device_calls::device_media()).await {
                        Ok((call_ref, id)) => t.core.dialed(Instant::now(), call_ref, id),
                        Err(e) => outcomes.push(Outcome::Finished {
                            at: Instant::now(),
                            answered: false,
                            reason: not_sent(&e),
                            media_sent: 0,
                            media_received: 0,
                        }),
                    },
                    Some(Command::Text) => {
                        let sent = if t.core.may_text() {
                            t.client.send_text(&t.target, "load test").await.map_err(|e| not_sent(&e))
                        } else {
                            Err("too many texts pending".into())
                        };
                        match sent {
                            Ok(id) => t.core.texted(Instant::now(), id),
                            Err(reason) => outcomes.push(Outcome::Text {
                                at: Instant::now(),
                                latency: Duration::ZERO,
                                delivered: false,
                                reason,
                            }),
                        }
                    }
                    None => p.ended = Some("stopped".into()),
                }
            }
            _ = sleep_until(deadline) => t.core.poll(Instant::now(), &mut out, &mut outcomes),
            _ = sleep_until(give_up) => {
                // No node took the device within the reconnect time.
                t.slot.gave_up.store(true, Ordering::Relaxed);
                t.slot.reconnecting.store(false, Ordering::Relaxed);
                p.ended = Some(p.away.as_ref().map_or("connection lost".into(), |a| a.cause.clone()));
            }
            _ = media_tick.tick(), if sending => {
                for (call_ref, seq) in t.core.media_due(Instant::now()) {
                    if let Some(frame) = media_frame(call_ref, seq) {
                        let _ = t.client.send_datagram(frame);
                    }
                }
            }
            datagram = t.events.datagrams.recv(), if media => {
                if let Some(d) = datagram {
                    if let Ok(d) = MediaDatagram::decode(d) {
                        t.core.on_media(d.header.call_ref);
                    }
                }
            }
        }
        // Answers and hangups; while the device is away they wait for the resumed session.
        for env in out.drain(..) {
            if let Some(body) = env.body {
                if p.away.is_none() {
                    let _ = t.client.send(body).await;
                } else if p.deferred.len() < MAX_DEFERRED {
                    p.deferred.push(body);
                }
            }
        }
        if let Some(reason) = &p.ended {
            t.slot.alive.store(false, Ordering::Relaxed);
            let reason = reason.as_str();
            t.core.fail_all(Instant::now(), reason, &mut outcomes);
            // Commands already queued were counted as started: they fail too.
            t.commands.close();
            while let Ok(cmd) = t.commands.try_recv() {
                outcomes.push(match cmd {
                    Command::Dial => Outcome::Finished {
                        at: Instant::now(),
                        answered: false,
                        reason: reason.into(),
                        media_sent: 0,
                        media_received: 0,
                    },
                    Command::Text => Outcome::Text {
                        at: Instant::now(),
                        latency: Duration::ZERO,
                        delivered: false,
                        reason: reason.into(),
                    },
                });
            }
        }
        if !send_outcomes(&t, &mut outcomes).await || p.ended.is_some() {
            t.client.close().await;
            return;
        }
    }
}

/// One event of the device's session; false when the tally is gone (the task stops).
async fn on_event(
    t: &mut DeviceTask,
    p: &mut Presence,
    event: Option<Event>,
    out: &mut Vec<thalamus_proto::v1::Envelope>,
    outcomes: &mut Vec<Outcome>,
) -> bool {
    match event {
        Some(Event::Frame(env)) => match &env.body {
            Some(Body::Goodbye(g)) => p.goodbye = Some(goodbye_cause(g.reason)),
            _ => t.core.on_frame(Instant::now(), &env, out, outcomes),
        },
        Some(Event::Connected { address }) => t.address = address,
        Some(Event::Disconnected {
            retry_in: Some(_), ..
        }) => {
            if p.away.is_none() {
                let cause = p.goodbye.take().unwrap_or_else(|| "connection lost".into());
                t.slot.alive.store(false, Ordering::Relaxed);
                if t.reconnect.is_zero() {
                    p.ended = Some(if cause.starts_with("goodbye") {
                        "goodbye".into()
                    } else {
                        cause.clone()
                    });
                } else {
                    t.slot.reconnecting.store(true, Ordering::Relaxed);
                }
                p.away = Some(Away {
                    since: Instant::now(),
                    cause,
                });
            }
        }
        Some(Event::Live(welcome)) => {
            if let Some(gone) = p.away.take() {
                let now = Instant::now();
                let live = if welcome.resumed {
                    welcome.live_calls.iter().map(|c| c.call_ref).collect()
                } else {
                    std::collections::HashSet::new()
                };
                let (calls_kept, calls_lost) =
                    t.core
                        .keep_only(now, &live, "lost with its node", out, outcomes);
                // What was lost counts against the node it was lost with.
                if !send_outcomes(t, outcomes).await {
                    return false;
                }
                outcomes.push(Outcome::Reconnected {
                    at: now,
                    cause: gone.cause,
                    resumed: welcome.resumed,
                    calls_kept,
                    calls_lost,
                    took: now.saturating_duration_since(gone.since),
                });
                t.node = node_name(&welcome, &t.address);
                if let Ok(mut node) = t.slot.node.lock() {
                    *node = t.node.clone();
                }
                // What waited for the session goes now (a call that no longer exists gets
                // an error the core ignores).
                for body in p.deferred.drain(..) {
                    let _ = t.client.send(body).await;
                }
                t.slot.reconnecting.store(false, Ordering::Relaxed);
                t.slot.alive.store(true, Ordering::Relaxed);
            }
        }
        Some(Event::Disconnected {
            retry_in: None,
            reason,
            ..
        }) => {
            p.ended = Some(format!("session ended: {reason}"));
        }
        Some(Event::Closed(_)) | None => {
            p.ended.get_or_insert_with(|| "connection lost".into());
        }
        Some(_) => {}
    }
    true
}

/// Hands the device's outcomes to the tally, each counted at the node the device is logged in
/// at, freeing a call place for each finished call; false when the tally is gone.
async fn send_outcomes(t: &DeviceTask, outcomes: &mut Vec<Outcome>) -> bool {
    for o in outcomes.drain(..) {
        if t.outgoing && matches!(o, Outcome::Finished { .. }) {
            let _ = t
                .slot
                .calls
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(1));
        }
        if t.outcomes.send((t.node.clone(), o)).await.is_err() {
            return false;
        }
    }
    true
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn interrupt_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: usize, max_calls: u32) -> (Vec<Arc<DeviceSlot>>, Vec<mpsc::Receiver<Command>>) {
        (0..n)
            .map(|_| {
                let (tx, rx) = mpsc::channel(2);
                (
                    Arc::new(DeviceSlot {
                        commands: tx,
                        calls: AtomicU32::new(0),
                        max_calls,
                        alive: AtomicBool::new(true),
                        node: std::sync::Mutex::new("n".into()),
                        gave_up: AtomicBool::new(false),
                        reconnecting: AtomicBool::new(false),
                    }),
                    rx,
                )
            })
            .unzip()
    }

    #[test]
    fn calls_go_round_robin_up_to_each_devices_limit() {
        let (slots, mut rxs) = slots(3, 1);
        let mut next = 0;
        for _ in 0..3 {
            assert!(dispatch(&slots, &mut next, Command::Dial, true));
        }
        // Every device is at its limit of one call.
        assert!(!dispatch(&slots, &mut next, Command::Dial, true));
        for (slot, rx) in slots.iter().zip(&mut rxs) {
            assert_eq!(slot.calls.load(Ordering::Relaxed), 1);
            assert!(matches!(rx.try_recv(), Ok(Command::Dial)));
        }
        // A call ends on device 1: the next call goes there.
        slots[1].calls.store(0, Ordering::Relaxed);
        assert!(dispatch(&slots, &mut next, Command::Dial, true));
        assert!(matches!(rxs[1].try_recv(), Ok(Command::Dial)));
        // Texts ignore the call limit.
        assert!(dispatch(&slots, &mut next, Command::Text, false));
    }

    #[test]
    fn dead_devices_and_full_queues_are_skipped_and_undone() {
        let (slots, mut rxs) = slots(2, 4);
        slots[0].alive.store(false, Ordering::Relaxed);
        let mut next = 0;
        // Device 1's queue holds two commands; the third start finds no device.
        assert!(dispatch(&slots, &mut next, Command::Dial, true));
        assert!(dispatch(&slots, &mut next, Command::Dial, true));
        assert!(!dispatch(&slots, &mut next, Command::Dial, true));
        assert_eq!(
            slots[1].calls.load(Ordering::Relaxed),
            2,
            "the refused start was undone"
        );
        assert_eq!(slots[0].calls.load(Ordering::Relaxed), 0);
        assert!(rxs[0].try_recv().is_err());
        drop(rxs.remove(1));
        assert!(!dispatch(&slots, &mut next, Command::Text, false));
    }

    #[test]
    fn bad_settings_are_refused_before_connecting() {
        let base = LoadOptions {
            gateways: vec!["127.0.0.1:9".parse().unwrap()],
            server_name: "localhost".into(),
            fingerprints: Vec::new(),
            reconnect: Duration::ZERO,
            idle_timeout: None,
            prefix: "load-".into(),
            first: 0,
            devices: 0,
            secret: "s".into(),
            login_concurrency: 1,
            endpoints: 1,
            cps: 1.0,
            duration: Duration::ZERO,
            hold: Duration::ZERO,
            target: String::new(),
            media: false,
            texts_per_sec: 0.0,
            incoming: false,
            expect_calls: 0,
            call_timeout: Duration::from_secs(1),
            idle_before: Duration::ZERO,
            max_calls_per_device: None,
            status_file: None,
            progress: false,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(matches!(
            rt.block_on(run(base.clone())),
            Err(LoadError::Settings(_))
        ));
        let nan = LoadOptions {
            devices: 1,
            cps: f64::NAN,
            ..base
        };
        assert!(matches!(rt.block_on(run(nan)), Err(LoadError::Settings(_))));
    }
}
