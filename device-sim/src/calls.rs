//! Device-side call commands of the simulator: `call` (dial, optionally stream media and check
//! the echo, hold and resume, send DTMF, transfer, hang up), `listen` (answer or reject incoming
//! calls), `text` (send one SIP MESSAGE through the gateway) and `watch` (watch SIP buddies'
//! presence). Each logs in as one device, prints every event (JSON lines with `--json`) and
//! ends with a `summary` event. Every device they run is a device of the device SDK
//! (`thalamus_device::Client`): the SDK logs in, keeps the session alive (answering the
//! gateway's `Ping`s), follows redirects, and reconnects (resuming the session) after a loss;
//! this module sends the commands, streams and counts the media, and prints what it hears.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use thalamus_device::session::{CommandError, Event};
use thalamus_device::{Client, ClientError, ClientEvents};
use thalamus_proto::media::MediaDatagram;
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{
    Answer, CallState, Dial, Dtmf, Envelope, Hangup, Hold, MediaStats, Reject, Resume, Transfer,
};
use tokio::sync::mpsc;

use crate::events::EventPrinter;
use crate::load::device_calls::device_media;
use crate::media::{
    probe_tag, EchoProbe, ProbeTotals, ReceivedMedia, FRAME_INTERVAL, MAX_TRACKED_CALLS,
};
use crate::streams::{call_of, CallStreams, StreamChoice};

/// How to reach the gateway as which device.
#[derive(Debug, Clone)]
pub struct Login {
    /// Gateway QUIC address.
    pub gateway: SocketAddr,
    /// TLS server name.
    pub server_name: String,
    /// Pinned fingerprint.
    pub fingerprint: Option<[u8; 32]>,
    /// Device id.
    pub device: String,
    /// Secret.
    pub secret: String,
    /// Declare `Capabilities.transfer` (MBFP revision 2).
    pub takes_transfers: bool,
}

/// A device of the SDK, logged in (its session may be coming back after a loss).
struct Device {
    client: Client,
    incoming: ClientEvents,
    /// The gateway it logged in to (its endpoint's address family).
    gateway: SocketAddr,
}

impl Device {
    /// Logs in; prints the `welcome`.
    async fn start(login: &Login, printer: EventPrinter) -> anyhow::Result<Self> {
        let (client, incoming) = sdk_device(login, printer).await?;
        Ok(Self {
            client,
            incoming,
            gateway: login.gateway,
        })
    }
}

/// The next frame the device's session hears. On the way, prints the session's own events as
/// the simulator always printed what they stand for: the `welcome` of a session that came
/// back, a `redirect`, and a lost connection (`disconnected`, then `reconnecting` when the SDK
/// waits before connecting again). The `Pong`s answering the SDK's keepalives are not printed
/// (these commands never sent a `Ping` of their own). Fails once the session is over.
/// Cancel-safe: whatever it took from the channel is printed before it waits again.
async fn next_frame(
    events: &mut mpsc::Receiver<Event>,
    printer: EventPrinter,
) -> anyhow::Result<Envelope> {
    loop {
        let Some(event) = events.recv().await else {
            anyhow::bail!("the device stopped");
        };
        match event {
            Event::Frame(env) if !matches!(env.body, Some(Body::Pong(_))) => return Ok(*env),
            Event::Live(welcome) => printer.welcome(*welcome),
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
                    printer.reconnecting(attempt, wait, next);
                }
            }
            Event::Closed(by) => anyhow::bail!("the session is over: {by:?}"),
            // Connecting, connected, refused (closed follows), and what a later SDK adds.
            _ => {}
        }
    }
}

/// A call command of the SDK, `sent` being what its method answered. When the SDK does not
/// know the call (it ended meanwhile, or it is a consultation call this module numbered
/// itself), `frame` goes as is and the gateway says what it makes of it, as it always did.
async fn call_command(
    client: &Client,
    sent: Result<u64, ClientError>,
    frame: impl FnOnce() -> Body,
) -> anyhow::Result<()> {
    match sent {
        Ok(_) => Ok(()),
        Err(ClientError::Command(CommandError::UnknownCall(_))) => {
            client.send(frame()).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Hangs call `call_ref` up.
async fn hangup(client: &Client, call_ref: u32) -> anyhow::Result<()> {
    call_command(client, client.hangup(call_ref).await, || {
        Body::Hangup(Hangup { call_ref })
    })
    .await
}

/// Holds (`on`) or resumes call `call_ref`.
async fn hold(client: &Client, call_ref: u32, on: bool) -> anyhow::Result<()> {
    call_command(client, client.hold(call_ref, on).await, || {
        if on {
            Body::Hold(Hold { call_ref })
        } else {
            Body::Resume(Resume { call_ref })
        }
    })
    .await
}

fn state_of(env: &Envelope) -> Option<(u32, CallState)> {
    match &env.body {
        Some(Body::CallEvent(e)) => Some((e.call_ref, CallState::try_from(e.state).ok()?)),
        _ => None,
    }
}

/// Settings of `call`.
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// Target URI or alias.
    pub target: String,
    /// Calls to place one after the other.
    pub calls: u32,
    /// Time answered before hanging up (0: wait for the other side to hang up).
    pub hold: Duration,
    /// Put the call on hold and resume it once while answered.
    pub hold_resume: bool,
    /// DTMF digits to send once answered.
    pub dtmf: String,
    /// Transfer the call here once answered (blind transfer); hang up if the transfer fails.
    pub transfer_to: Option<String>,
    /// Once answered, call here too and transfer the call to it in its place (attended
    /// transfer); the consultation is hung up if still up 3 s after the call ended.
    pub consult: Option<String>,
    /// Stream 20 ms frames while answered and count what comes back.
    pub media: bool,
    /// Offer the signal data stream and VP8 video; stream the synthetic signal and video
    /// while answered and check what comes in ([`crate::streams`]).
    pub streams: StreamChoice,
    /// Give up on one call after this long.
    pub call_timeout: Duration,
    /// Devices calling at once, each its own connection (1: the login's device; more:
    /// `<device>0` .. `<device>N-1`, e.g. from `thalamus device add-bulk --prefix <device>`).
    pub parallel: u32,
    /// Written (with the word "answered") once every device's first call is answered.
    pub ready_file: Option<PathBuf>,
    /// This long after each answer, move the device's QUIC endpoint to a new local UDP socket
    /// (a device changing networks: QUIC connection migration).
    pub rebind_after: Option<Duration>,
}

/// Longest wait, after the hold time, for the echoes of frames already sent (the device
/// stops streaming first, then hangs up, so the last frames are not cut off by the BYE).
const ECHO_DRAIN: Duration = Duration::from_secs(1);
/// Longest wait, after the call ended, for the gateway's media statistics.
const STATS_WAIT: Duration = Duration::from_secs(2);
/// How long a DTMF digit the device sends lasts.
const DTMF_MS: u32 = 100;

/// What the devices of one run share: media totals and the count of answered devices.
#[derive(Debug, Default)]
struct RunShared {
    totals: Mutex<ProbeTotals>,
    answered_devices: AtomicU32,
}

/// Places the calls (on `parallel` devices at once); returns (answered and ended cleanly,
/// failed) over all devices. With media, ends with a `media_summary` event over every call.
pub async fn call(
    login_opts: &Login,
    opts: &CallOptions,
    printer: EventPrinter,
) -> anyhow::Result<(u32, u32)> {
    let shared = Arc::new(RunShared::default());
    let (ok, failed) = if opts.parallel <= 1 {
        device_calls(login_opts, opts, printer, &shared).await?
    } else {
        let mut tasks = Vec::new();
        for n in 0..opts.parallel {
            let login = Login {
                device: format!("{}{n}", login_opts.device),
                ..login_opts.clone()
            };
            let (opts, shared) = (opts.clone(), Arc::clone(&shared));
            tasks.push(tokio::spawn(async move {
                match device_calls(&login, &opts, printer, &shared).await {
                    Ok(counts) => counts,
                    Err(e) => {
                        printer.emit(
                            "error",
                            json!({"message": format!("{e:#}"), "device": login.device}),
                        );
                        (0, opts.calls)
                    }
                }
            }));
        }
        let (mut ok, mut failed) = (0u32, 0u32);
        for task in tasks {
            let (o, f) = task.await.unwrap_or((0, opts.calls));
            ok += o;
            failed += f;
        }
        (ok, failed)
    };
    if opts.media {
        if let Ok(totals) = shared.totals.lock() {
            printer.emit("media_summary", totals.summary());
        }
    }
    printer.emit(
        "summary",
        json!({"calls": opts.calls.saturating_mul(opts.parallel.max(1)), "succeeded": ok, "failed": failed}),
    );
    Ok((ok, failed))
}

/// One device's calls, one after the other.
async fn device_calls(
    login_opts: &Login,
    opts: &CallOptions,
    printer: EventPrinter,
    shared: &RunShared,
) -> anyhow::Result<(u32, u32)> {
    let mut dev = Device::start(login_opts, printer).await?;
    let (mut ok, mut failed) = (0u32, 0u32);
    for n in 0..opts.calls {
        let call_ref = match dev
            .client
            .dial(&opts.target, opts.streams.media_offer())
            .await
        {
            Ok((call_ref, _)) => call_ref,
            Err(e) => {
                printer.emit(
                    "error",
                    json!({"message": e.to_string(), "call_ref": n + 1, "device": login_opts.device}),
                );
                failed += 1;
                break;
            }
        };
        let call = one_call(
            &mut dev,
            &login_opts.device,
            call_ref,
            n == 0,
            opts,
            printer,
            shared,
        );
        match tokio::time::timeout(opts.call_timeout, call).await {
            Ok(Ok(true)) => ok += 1,
            Ok(Ok(false)) => failed += 1,
            Ok(Err(e)) => {
                printer.emit(
                    "error",
                    json!({"message": e.to_string(), "call_ref": call_ref, "device": login_opts.device}),
                );
                failed += 1;
                break;
            }
            Err(_) => {
                printer.emit(
                    "error",
                    json!({"message": "call timed out", "call_ref": call_ref, "device": login_opts.device}),
                );
                failed += 1;
            }
        }
    }
    dev.client.close().await;
    Ok((ok, failed))
}

/// The gateway's media statistics event of `call_ref`, if `env` is it: the audio stream's
/// figures and every stream's.
fn is_media_statistics(
    env: &Envelope,
    call_ref: u32,
) -> Option<(Option<MediaStats>, Vec<MediaStats>)> {
    match &env.body {
        Some(Body::CallEvent(e)) if e.call_ref == call_ref && e.reason == "media statistics" => {
            Some((e.stats, e.streams.clone()))
        }
        _ => None,
    }
}

/// Call `call_ref`, dialled already, from its first event to its end (and its media report).
/// `first`: the device's first call (its answer counts for the ready file).
async fn one_call(
    dev: &mut Device,
    device: &str,
    call_ref: u32,
    first: bool,
    opts: &CallOptions,
    printer: EventPrinter,
    shared: &RunShared,
) -> anyhow::Result<bool> {
    let mut answered_at: Option<Instant> = None;
    let mut probe = EchoProbe::new(probe_tag(device, call_ref));
    let mut extra = CallStreams::new(opts.streams, call_ref);
    let streams = opts.media || opts.streams.any();
    let mut media_tick = tokio::time::interval(FRAME_INTERVAL);
    let mut did_hold = false;
    let mut did_transfer = false;
    // The consultation call of an attended transfer, and whether it is still up.
    let consult_ref = call_ref.wrapping_add(CONSULT_REF_OFFSET);
    let mut consulting = false;
    let mut rebound = false;
    let mut hung_up = false;
    // With media, streaming stops when the hold time is over and the hangup follows once the
    // echoes are in (or after ECHO_DRAIN).
    let mut streaming_stopped: Option<Instant> = None;
    loop {
        let hold_over =
            answered_at.is_some_and(|at| !opts.hold.is_zero() && at.elapsed() >= opts.hold);
        if hold_over && streams && streaming_stopped.is_none() {
            streaming_stopped = Some(Instant::now());
        }
        // The other streams' last packets get the whole drain time to arrive.
        let hangup_due = hold_over
            && ((!opts.media || probe.outstanding() == 0) && !opts.streams.any()
                || streaming_stopped.is_some_and(|at| at.elapsed() >= ECHO_DRAIN));
        if hangup_due && !hung_up {
            hung_up = true;
            hangup(&dev.client, call_ref).await?;
        }
        let rebind_at = match (opts.rebind_after, answered_at) {
            (Some(after), Some(at)) if !rebound && !hung_up => Some(at + after),
            _ => None,
        };
        if rebind_at.is_some_and(|at| Instant::now() >= at) {
            rebound = true;
            rebind(dev, call_ref, printer)?;
            continue;
        }
        let wake_at = match (answered_at, streaming_stopped) {
            (_, Some(stopped)) => Some(stopped + ECHO_DRAIN),
            (Some(at), None) => Some(at + opts.hold),
            (None, None) => None,
        };
        let wake_at = match (wake_at, rebind_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            frame = next_frame(&mut dev.incoming.events, printer) => {
                let env = frame?;
                match &env.body {
                    Some(Body::CallEvent(e)) if e.call_ref == call_ref && e.stats.is_some() && e.reason == "media statistics" => {
                        printer.frame(&env);
                        continue;
                    }
                    Some(Body::KeyframeRequest(k)) if k.call_ref == call_ref => {
                        printer.frame(&env);
                        extra.key_frame_asked();
                        continue;
                    }
                    Some(Body::TransferStatus(t)) if t.call_ref == call_ref => {
                        printer.frame(&env);
                        if t.done && !(200..300).contains(&t.sip_status) && !hung_up {
                            // The transfer failed: the call is ours to end.
                            hung_up = true;
                            hangup(&dev.client, call_ref).await?;
                        }
                        continue;
                    }
                    Some(Body::CallEvent(e)) if consulting && e.call_ref == consult_ref => {
                        printer.frame(&env);
                        match CallState::try_from(e.state) {
                            Ok(CallState::Answered) if !did_transfer => {
                                did_transfer = true;
                                // The SDK has no transfer command: the frame as is.
                                dev.client.send(Body::Transfer(Transfer {
                                    call_ref,
                                    target: String::new(),
                                    replaces_call_ref: consult_ref,
                                })).await?;
                            }
                            Ok(CallState::Ended) => {
                                consulting = false;
                                if !did_transfer && !hung_up {
                                    // The consultation failed: nothing to transfer to.
                                    hung_up = true;
                                    hangup(&dev.client, call_ref).await?;
                                }
                            }
                            _ => {}
                        }
                        continue;
                    }
                    _ => {}
                }
                printer.frame(&env);
                match state_of(&env) {
                    Some((r, CallState::Answered)) if r == call_ref => {
                        if answered_at.is_none() && first {
                            device_answered(opts, shared);
                        }
                        answered_at = Some(Instant::now());
                        extra.start(probe_tag(device, call_ref), Instant::now());
                        for digit in opts.dtmf.chars() {
                            // As a frame: the SDK's `dtmf` leaves the length to the gateway,
                            // and the simulator's digits have always lasted DTMF_MS.
                            dev.client.send(Body::Dtmf(Dtmf {
                                call_ref,
                                digit: digit.to_string(),
                                duration_ms: DTMF_MS,
                            })).await?;
                        }
                        if opts.hold_resume && !did_hold {
                            did_hold = true;
                            hold(&dev.client, call_ref, true).await?;
                        }
                        if let Some(target) = opts.transfer_to.as_ref().filter(|_| !did_transfer) {
                            did_transfer = true;
                            dev.client.send(Body::Transfer(Transfer {
                                call_ref,
                                target: target.clone(),
                                replaces_call_ref: 0,
                            })).await?;
                        }
                        if let Some(target) = opts.consult.as_ref().filter(|_| !did_transfer && !consulting) {
                            consulting = true;
                            // Its ref is the call's plus CONSULT_REF_OFFSET (the SDK's `dial`
                            // would pick the next free one): the frame as is.
                            dev.client.send(Body::Dial(Dial {
                                call_ref: consult_ref,
                                target: target.clone(),
                                media: Some(opts.streams.media_offer()),
                                headers: Default::default(),
                            })).await?;
                        }
                    }
                    Some((r, CallState::Held)) if r == call_ref && opts.hold_resume => {
                        hold(&dev.client, call_ref, false).await?;
                    }
                    Some((r, CallState::Ended)) if r == call_ref => {
                        if consulting {
                            end_consultation(dev, consult_ref, printer).await?;
                        }
                        let gateway = if opts.media || opts.streams.any() {
                            finish_probe(dev, call_ref, &mut probe, &mut extra, printer).await
                        } else {
                            Vec::new()
                        };
                        if opts.media {
                            let mut report = probe.report();
                            report["call_ref"] = json!(call_ref);
                            report["device"] = json!(device);
                            printer.emit("media_report", report);
                            if let Ok(mut totals) = shared.totals.lock() {
                                totals.add(&probe);
                            }
                        }
                        extra.report(printer, device, &gateway);
                        return Ok(answered_at.is_some());
                    }
                    _ => {}
                }
            }
            _ = media_tick.tick(), if streams && answered_at.is_some() && streaming_stopped.is_none() && !hung_up => {
                if opts.media {
                    if let Err(e) = dev.client.send_datagram(probe.next_datagram(call_ref, Instant::now())) {
                        probe.send_failed += 1;
                        tracing::debug!(error = %e, call_ref, "media frame not sent");
                    }
                }
                extra.send_due(&dev.client, Instant::now());
                if extra.keyframe_request_due(Instant::now()) {
                    dev.client.request_keyframe(call_ref).await?;
                }
            }
            _ = sleep_until(wake_at), if (!opts.hold.is_zero() || rebind_at.is_some()) && !hung_up => {}
            Some(datagram) = dev.incoming.datagrams.recv(), if streams => {
                if let Some(datagram) = extra.take(datagram) {
                    probe.on_datagram(datagram, Instant::now());
                }
            }
        }
    }
}

/// Added to a call's ref for the ref of its consultation call (attended transfer).
const CONSULT_REF_OFFSET: u32 = 10_000;
/// How long the remote party of a consultation has to end it (it was replaced) once the
/// transferred call ended, before the device hangs it up.
const CONSULT_GRACE: Duration = Duration::from_secs(3);

/// After an attended transfer: waits (bounded) for the consultation call to end, as its
/// remote party ends it once the transferee's INVITE with Replaces took its place; hangs it
/// up when that does not come.
async fn end_consultation(
    dev: &mut Device,
    consult_ref: u32,
    printer: EventPrinter,
) -> anyhow::Result<()> {
    let mut hung_up = false;
    let mut until = tokio::time::Instant::now() + CONSULT_GRACE;
    loop {
        tokio::select! {
            frame = next_frame(&mut dev.incoming.events, printer) => {
                let env = frame?;
                printer.frame(&env);
                if matches!(state_of(&env), Some((r, CallState::Ended)) if r == consult_ref) {
                    return Ok(());
                }
            }
            () = tokio::time::sleep_until(until) => {
                if hung_up {
                    return Ok(());
                }
                hung_up = true;
                hangup(&dev.client, consult_ref).await?;
                until = tokio::time::Instant::now() + CONSULT_GRACE;
            }
        }
    }
}

/// Moves the device's endpoint to a new UDP socket on the same local address (the
/// unspecified address of the gateway's family, as the SDK binds it) and a new port: to the
/// gateway the device's packets now come from another address, as when a device changes
/// networks. QUIC validates the new path and the connection (and its call) continues.
fn rebind(dev: &Device, call_ref: u32, printer: EventPrinter) -> anyhow::Result<()> {
    let any = if dev.gateway.is_ipv6() {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    };
    let socket = std::net::UdpSocket::bind(any)?;
    let new = socket.local_addr()?;
    let old = dev.client.rebind(socket)?;
    printer.emit(
        "rebound",
        json!({"call_ref": call_ref, "from": old.to_string(), "to": new.to_string()}),
    );
    Ok(())
}

/// After the end of a call: reads late echoes (the probe's) and the other streams' late
/// packets (their counters'), and waits (bounded) for the gateway's media statistics, which follow the end event once the relays have stopped. Gives back every
/// stream's statistics (none when they did not come).
async fn finish_probe(
    dev: &mut Device,
    call_ref: u32,
    probe: &mut EchoProbe,
    extra: &mut CallStreams,
    printer: EventPrinter,
) -> Vec<MediaStats> {
    let until = tokio::time::Instant::now() + STATS_WAIT;
    loop {
        tokio::select! {
            frame = next_frame(&mut dev.incoming.events, printer) => {
                let Ok(env) = frame else { return Vec::new() };
                printer.frame(&env);
                if let Some((audio, streams)) = is_media_statistics(&env, call_ref) {
                    probe.gateway = audio;
                    return streams;
                }
            }
            datagram = dev.incoming.datagrams.recv() => {
                let Some(d) = datagram else { return Vec::new() };
                // The other streams' last packets (the far device streams until it hears the
                // end) go to their counters, as during the call; late echoes to the probe. A
                // stream this call does not count is nobody's.
                let Some(d) = extra.take(d) else { continue };
                let audio = thalamus_proto::media::MediaHeader::decode(&d)
                    .is_ok_and(|h| h.stream_id == thalamus_proto::media::StreamId::AUDIO);
                if audio {
                    probe.on_datagram(d, Instant::now());
                }
            }
            () = tokio::time::sleep_until(until) => return Vec::new(),
        }
    }
}

/// Counts a device whose first call was answered; writes the ready file when all are.
fn device_answered(opts: &CallOptions, shared: &RunShared) {
    let answered = shared.answered_devices.fetch_add(1, Ordering::AcqRel) + 1;
    if answered == opts.parallel.max(1) {
        if let Some(path) = &opts.ready_file {
            let _ = std::fs::write(path, "answered\n");
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Settings of `listen`.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// Reject with this status instead of answering.
    pub reject: Option<u32>,
    /// Ring this long before answering.
    pub answer_after: Duration,
    /// Hang up this long after answering (0: wait for the caller).
    pub hangup_after: Duration,
    /// Stop after this many calls ended (0: run until stopped).
    pub calls: u32,
    /// Do not answer at all (the gateway's no-answer timeout applies).
    pub ignore: bool,
    /// Send every media datagram of an answered call back to the gateway.
    pub echo: bool,
    /// Answer with the signal data stream and VP8 video; stream the synthetic signal and
    /// video once a call is answered and check what comes in ([`crate::streams`]).
    pub streams: StreamChoice,
    /// While listening, place calls to this target (call refs 1, 2, ...), one every
    /// `dial_every`, `dial_count` in all; each is hung up once answered.
    pub dial: Option<String>,
    /// Calls to place to `dial`.
    pub dial_count: u32,
    /// Time between those calls (the first goes after one interval).
    pub dial_every: Duration,
}

/// How long after a call's end its `media_report` waits for the gateway's statistics.
const LISTEN_REPORT_WAIT: Duration = Duration::from_secs(1);

/// What `listen` does with an incoming call once its ring time is over.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Answer(u32),
    Reject(u32, u32),
}

/// Answers incoming calls until `calls` have ended. Counts the media datagrams of each call
/// (echoing them with `echo`) and prints a `media_report` per answered call once it ended.
pub async fn listen(
    login_opts: &Login,
    opts: &ListenOptions,
    printer: EventPrinter,
) -> anyhow::Result<(u32, u32)> {
    let mut dev = Device::start(login_opts, printer).await?;
    let (mut answered, mut ended) = (0u32, 0u32);
    let mut pending: Vec<(Instant, Reply)> = Vec::new();
    let mut hangups: Vec<(Instant, u32)> = Vec::new();
    let mut media: HashMap<u32, ReceivedMedia> = HashMap::new();
    let mut streams: HashMap<u32, CallStreams> = HashMap::new();
    // Ended calls whose stream reports wait for the gateway's statistics, since when.
    let mut ended_streams: HashMap<u32, (Instant, CallStreams)> = HashMap::new();
    let mut finishing_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    // Outgoing calls placed while listening: (calls placed so far, when the next goes), and
    // the refs the SDK gave them.
    let mut next_dial = opts
        .dial
        .as_ref()
        .filter(|_| opts.dial_count > 0)
        .map(|_| (0u32, Instant::now() + opts.dial_every));
    let mut own_calls: HashSet<u32> = HashSet::new();
    loop {
        tokio::select! {
            frame = next_frame(&mut dev.incoming.events, printer) => {
                let env = frame?;
                printer.frame(&env);
                match &env.body {
                    Some(Body::IncomingCall(c)) => {
                        let call_ref = c.call_ref;
                        if opts.ignore {
                            continue;
                        }
                        let reply = match opts.reject {
                            Some(code) => Reply::Reject(call_ref, code),
                            None => Reply::Answer(call_ref),
                        };
                        pending.push((Instant::now() + opts.answer_after, reply));
                    }
                    Some(Body::KeyframeRequest(k)) => {
                        if let Some(call) = streams.get_mut(&k.call_ref) {
                            call.key_frame_asked();
                        }
                    }
                    Some(Body::CallEvent(e)) if e.state == CallState::Answered as i32 && own_calls.contains(&e.call_ref) => {
                        // One of our own calls: hang it up at once.
                        hangup(&dev.client, e.call_ref).await?;
                    }
                    Some(Body::CallEvent(e)) if e.state == CallState::Answered as i32 => {
                        answered += 1;
                        // The caller's gateway has the answer once the call is confirmed: the
                        // streams start then, so their first packets are not sent before the far
                        // relay knows where from.
                        if opts.streams.any() && (streams.len() < MAX_TRACKED_CALLS || streams.contains_key(&e.call_ref)) {
                            let seed = probe_tag(&login_opts.device, e.call_ref);
                            streams
                                .entry(e.call_ref)
                                .or_insert_with(|| CallStreams::new(opts.streams, e.call_ref))
                                .start(seed, Instant::now());
                        }
                        if media.len() < MAX_TRACKED_CALLS || media.contains_key(&e.call_ref) {
                            media.entry(e.call_ref).or_default().answered = true;
                        }
                        if !opts.hangup_after.is_zero() {
                            hangups.push((Instant::now() + opts.hangup_after, e.call_ref));
                        }
                    }
                    Some(Body::CallEvent(e)) if e.state == CallState::Ended as i32 && e.reason == "media statistics" => {
                        if let Some(m) = media.remove(&e.call_ref) {
                            printer.emit("media_report", m.report(e.call_ref, e.stats.as_ref()));
                        }
                        if let Some((_, call)) = ended_streams.remove(&e.call_ref) {
                            call.report(printer, &login_opts.device, &e.streams);
                        }
                    }
                    Some(Body::CallEvent(e)) if e.state == CallState::Ended as i32 => {
                        ended += 1;
                        // Its reports wait (bounded) for the gateway's statistics of each stream.
                        if let Some(call) = streams.remove(&e.call_ref) {
                            ended_streams.insert(e.call_ref, (Instant::now(), call));
                        }
                        if let Some(m) = media.get_mut(&e.call_ref) {
                            m.ended_at = Some(Instant::now());
                        }
                        if opts.calls > 0 && ended >= opts.calls {
                            finishing_since = Some(Instant::now());
                        }
                    }
                    _ => {}
                }
            }
            Some(datagram) = dev.incoming.datagrams.recv() => {
                let datagram = match call_of(&datagram) {
                    // Streams may flow before the device heard its call confirmed.
                    Some(call_ref) if opts.streams.any() && (streams.len() < MAX_TRACKED_CALLS || streams.contains_key(&call_ref)) => {
                        let call = streams
                            .entry(call_ref)
                            .or_insert_with(|| CallStreams::new(opts.streams, call_ref));
                        match call.take(datagram) {
                            Some(audio) => audio,
                            None => continue,
                        }
                    }
                    _ => datagram,
                };
                let Ok(d) = MediaDatagram::decode(datagram) else { continue };
                let call_ref = d.header.call_ref;
                if !media.contains_key(&call_ref) && media.len() >= MAX_TRACKED_CALLS {
                    continue;
                }
                let m = media.entry(call_ref).or_default();
                m.on_datagram(&d);
                if opts.echo && m.answered && m.ended_at.is_none() {
                    if let Some(echo) = m.echo(&d) {
                        let _ = dev.client.send_datagram(echo);
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let mut asking = Vec::new();
                for call in streams.values_mut() {
                    call.send_due(&dev.client, now);
                    if call.keyframe_request_due(now) {
                        asking.push(call.call_ref());
                    }
                }
                for call_ref in asking {
                    dev.client.request_keyframe(call_ref).await?;
                }
                if let (Some((placed, at)), Some(target)) = (next_dial, opts.dial.as_ref()) {
                    if at <= now {
                        let (call_ref, _) = dev.client.dial(target, device_media()).await?;
                        own_calls.insert(call_ref);
                        let placed = placed + 1;
                        next_dial = (placed < opts.dial_count).then(|| (placed, now + opts.dial_every));
                    }
                }
                let due: Vec<Reply> = pending.iter().filter(|(at, _)| *at <= now).map(|(_, r)| *r).collect();
                pending.retain(|(at, _)| *at > now);
                for reply in due {
                    match reply {
                        Reply::Answer(call_ref) => {
                            let sent = dev.client.answer(call_ref, opts.streams.media_offer()).await;
                            call_command(&dev.client, sent, || Body::Answer(Answer {
                                call_ref,
                                media: Some(opts.streams.media_offer()),
                            })).await?;
                            // Media may arrive before the gateway confirms the answer: echo it
                            // already.
                            if media.len() < MAX_TRACKED_CALLS || media.contains_key(&call_ref) {
                                media.entry(call_ref).or_default().answered = true;
                            }
                        }
                        Reply::Reject(call_ref, sip_status) => {
                            let sent = dev.client.reject(call_ref, sip_status).await;
                            call_command(&dev.client, sent, || Body::Reject(Reject {
                                call_ref,
                                sip_status,
                                reason: String::new(),
                            })).await?;
                        }
                    }
                }
                let due: Vec<u32> = hangups.iter().filter(|(at, _)| *at <= now).map(|(_, r)| *r).collect();
                hangups.retain(|(at, _)| *at > now);
                for call_ref in due {
                    hangup(&dev.client, call_ref).await?;
                }
                // Calls whose statistics never came (no relay): report what was counted.
                let late: Vec<u32> = media
                    .iter()
                    .filter(|(_, m)| m.ended_at.is_some_and(|at| now.saturating_duration_since(at) >= LISTEN_REPORT_WAIT))
                    .map(|(r, _)| *r)
                    .collect();
                for call_ref in late {
                    if let Some(m) = media.remove(&call_ref) {
                        printer.emit("media_report", m.report(call_ref, None));
                    }
                }
                let late: Vec<u32> = ended_streams
                    .iter()
                    .filter(|(_, (at, _))| now.saturating_duration_since(*at) >= LISTEN_REPORT_WAIT)
                    .map(|(r, _)| *r)
                    .collect();
                for call_ref in late {
                    if let Some((_, call)) = ended_streams.remove(&call_ref) {
                        call.report(printer, &login_opts.device, &[]);
                    }
                }
                let all_reported = !media.values().any(|m| m.ended_at.is_some()) && ended_streams.is_empty();
                if finishing_since.is_some_and(|at| all_reported || now.saturating_duration_since(at) >= LISTEN_REPORT_WAIT) {
                    // Stream reports still waiting for the gateway's figures go out without.
                    for (_, (_, call)) in ended_streams.drain() {
                        call.report(printer, &login_opts.device, &[]);
                    }
                    printer.emit("summary", json!({"answered": answered, "ended": ended}));
                    dev.client.close().await;
                    return Ok((answered, ended));
                }
            }
        }
    }
}

/// Starts `login`'s device as a device of the SDK (`thalamus_device::Client`) and waits for its
/// session: prints the `welcome` (and before it any `redirect` followed and any frame heard,
/// such as the `error` refusing the login); fails when the login is refused or does not go
/// live within the SDK's login timeout.
async fn sdk_device(
    login: &Login,
    printer: EventPrinter,
) -> anyhow::Result<(Client, ClientEvents)> {
    use thalamus_device::session::SessionConfig;
    let quic = crate::quic::client_config(login.fingerprint)?;
    let mut session = SessionConfig::new(
        login.device.clone(),
        login.secret.clone(),
        vec![login.gateway.to_string()],
    );
    session.capabilities.transfer = login.takes_transfers;
    let login_timeout = session.login_timeout;
    let config = thalamus_device::ClientConfig::new(session, quic, &login.server_name);
    let (client, mut incoming) = Client::start(config)?;
    let live = tokio::time::timeout(login_timeout, async {
        while let Some(event) = incoming.events.recv().await {
            match event {
                Event::Live(welcome) => {
                    printer.welcome(*welcome);
                    return Ok(());
                }
                Event::Frame(env) => printer.frame(&env),
                Event::Redirected { address, node_id } => printer.redirect(address, node_id),
                Event::Closed(by) => anyhow::bail!("the login failed: {by:?}"),
                _ => {}
            }
        }
        anyhow::bail!("the device stopped")
    })
    .await;
    match live {
        Ok(Ok(())) => Ok((client, incoming)),
        Ok(Err(e)) => {
            client.close().await;
            Err(e)
        }
        Err(_) => {
            client.close().await;
            anyhow::bail!("no session within {login_timeout:?}")
        }
    }
}

/// `watch`: logs in, watches each of `targets` (MBFP `Watch`: the gateway subscribes to their
/// presence), prints every `presence_update` and `watch_status`, and after `duration`
/// unwatches them all and waits (at most 5 s) for each watch's last `watch_status`. Returns
/// (watches that became active, watches refused or ended early). A device of the SDK.
pub async fn watch(
    login_opts: &Login,
    targets: &[String],
    expires_secs: u32,
    duration: Duration,
    printer: EventPrinter,
) -> anyhow::Result<(u32, u32)> {
    let (client, mut incoming) = sdk_device(login_opts, printer).await?;
    let mut pending: HashMap<u64, String> = HashMap::new();
    for target in targets {
        let id = client
            .send(Body::Watch(thalamus_proto::v1::Watch {
                target: target.clone(),
                expires_secs,
            }))
            .await?;
        pending.insert(id, target.clone());
    }
    let (mut active, mut failed) = (0u32, 0u32);
    let mut unwatching = false;
    let until = tokio::time::Instant::now() + duration;
    let mut deadline = until;
    while !pending.is_empty() {
        tokio::select! {
            event = incoming.events.recv() => {
                let Some(event) = event else {
                    anyhow::bail!("the device stopped");
                };
                let Event::Frame(env) = event else {
                    continue;
                };
                match &env.body {
                    Some(Body::WatchStatus(w)) if pending.contains_key(&env.request_id) => {
                        if w.active {
                            active += 1;
                        } else {
                            if !unwatching {
                                failed += 1;
                            }
                            pending.remove(&env.request_id);
                        }
                    }
                    Some(Body::Error(_)) if pending.contains_key(&env.request_id) => {
                        failed += 1;
                        pending.remove(&env.request_id);
                    }
                    _ => {}
                }
                printer.frame(&env);
            }
            () = tokio::time::sleep_until(deadline) => {
                if unwatching {
                    break;
                }
                unwatching = true;
                for target in pending.values() {
                    client
                        .send(Body::Unwatch(thalamus_proto::v1::Unwatch {
                            target: target.clone(),
                        }))
                        .await?;
                }
                deadline = tokio::time::Instant::now() + UNWATCH_WAIT;
            }
        }
    }
    printer.emit("summary", json!({"watched": active, "failed": failed}));
    client.close().await;
    Ok((active, failed))
}

/// How long `watch` waits for the last `watch_status` of its watches after unwatching them.
const UNWATCH_WAIT: Duration = Duration::from_secs(5);

/// Sends one text; returns the final SIP status. A device of the SDK.
pub async fn text(
    login_opts: &Login,
    to: &str,
    body: &str,
    printer: EventPrinter,
) -> anyhow::Result<u32> {
    let (client, mut incoming) = sdk_device(login_opts, printer).await?;
    let id = client.send_text(to, body).await?;
    let outcome = loop {
        let Some(event) = incoming.events.recv().await else {
            break Err(anyhow::anyhow!("the device stopped"));
        };
        let Event::Frame(env) = event else {
            continue;
        };
        printer.frame(&env);
        match &env.body {
            Some(Body::TextStatus(t)) if env.request_id == id => break Ok(t.sip_status),
            Some(Body::Error(_)) if env.request_id == id => {
                break Err(anyhow::anyhow!("the gateway refused the text"))
            }
            _ => {}
        }
    };
    client.close().await;
    outcome
}
