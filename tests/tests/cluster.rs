//! End to end, the clustered stack with real processes on loopback: Redis (`redis-server`,
//! started here on a free port), the SIP load balancer (`thalamus balancer`), two gateway nodes
//! (`thalamus run`) sharing the Redis dialog store, the device registry and the resume secret,
//! SIPp placing calls through the balancer, and a simulated device (the simulator's device
//! library, driven from this file so it can present its resume token to another node).
//!
//! - The JAIN SIP HA failover test (Shootist, Balancer, Shootme, Shootme-recovery), 100 calls
//!   in a row, each with a node death: SIPp calls the device on node A through the balancer;
//!   after the ACK node A is killed with SIGKILL; SIPp's BYE reaches node B, which takes the
//!   dialog over from Redis (UAS mode) and answers 200; the device then resumes on node B, whose
//!   Welcome no longer lists the call. Node A is restarted for the next call.
//! - The same with the device hanging up on node B (UAC mode: node B sends the BYE, with the
//!   next CSeq over the route set, and SIPp accepts it).
//! - Media follows and a paused node gives way: node A is frozen (SIGSTOP), node B claims the
//!   dialog through the admin API and re-INVITEs SIPp with its own media address (CSeq
//!   continuing from the record); node A, thawed, finds on its next write that it lost the
//!   dialog and drops it without a BYE; node B ends the call.
//! - Devices follow: the device resumes on node B while node A's owner lease still runs (the
//!   call is listed and watched, then claimed when the lease lapses) or after it lapsed (claimed
//!   at once); node B re-INVITEs SIPp with its media and the device's hangup on B ends the call.
//! - Single node on the embedded store: the gateway is killed after the ACK and restarted, and
//!   the BYE gets 200.
//!
//! The cluster tests run one at a time (they time node deaths against heartbeats).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc as std_mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;
use thalamus_ownership::{owner, NodeId};
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{
    Answer, CallEvent, CallState, EndReason, Envelope, Hangup, Hello, Pong, Welcome,
};
use thalamus_sim::device::DeviceConnection;
use thalamus_tests::cluster::{http_request, segment, Balancer, Redis};
use thalamus_tests::{bin, call_records, free_udp_port, scenario, sipp, Gateway, SippProcess};

const T: Duration = Duration::from_secs(20);
/// Heartbeat interval of the nodes and the balancer: a node is out 350 ms after its death.
const HEARTBEAT_MS: u64 = 100;
/// Shared resume-token secret of the nodes.
const RESUME_SECRET: &str = "3f1c0d9e8b7a695847362514f3e2d1c0b9a8978675645342312f1e0d0c0b0a09";
const DEVICE: &str = "callee";

/// One cluster test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Two gateway nodes (A owns the device), the balancer and Redis.
struct Cluster {
    redis: Redis,
    balancer: Balancer,
    a: Option<Gateway>,
    b: Gateway,
    a_id: String,
    b_id: String,
    registry_dir: tempfile::TempDir,
    secret: String,
    lease_ms: u64,
    /// More configuration for both nodes.
    more: String,
}

impl Cluster {
    fn start(lease_ms: u64) -> Self {
        Self::start_with(lease_ms, "")
    }

    /// [`Cluster::start`] with `more` configuration (whole sections) for both nodes.
    fn start_with(lease_ms: u64, more: &str) -> Self {
        let redis = Redis::start().unwrap();
        let balancer = Balancer::start(HEARTBEAT_MS, 3, "warn").unwrap();
        let registry_dir = tempfile::tempdir().unwrap();
        // Node A is the one the balancer's hash gives the device to while both live.
        let (n1, n2) = (
            NodeId::new("node-1").unwrap(),
            NodeId::new("node-2").unwrap(),
        );
        let first = owner(DEVICE, [&n1, &n2]).unwrap().as_str().to_string();
        let (a_id, b_id) = if first == "node-1" {
            ("node-1".to_string(), "node-2".to_string())
        } else {
            ("node-2".to_string(), "node-1".to_string())
        };
        let extra_a = node_extra(&a_id, &redis, &balancer, registry_dir.path(), lease_ms) + more;
        let a = Gateway::start(&extra_a).unwrap();
        let secret = a.add_device(DEVICE).unwrap();
        let extra_b = node_extra(&b_id, &redis, &balancer, registry_dir.path(), lease_ms) + more;
        let b = Gateway::start(&extra_b).unwrap();
        balancer.wait_eligible(&a_id, true);
        balancer.wait_eligible(&b_id, true);
        Self {
            redis,
            balancer,
            a: Some(a),
            b,
            a_id,
            b_id,
            registry_dir,
            secret,
            lease_ms,
            more: more.to_string(),
        }
    }

    fn a(&self) -> &Gateway {
        self.a.as_ref().expect("node A is running")
    }

    fn extra_a(&self) -> String {
        node_extra(
            &self.a_id,
            &self.redis,
            &self.balancer,
            self.registry_dir.path(),
            self.lease_ms,
        ) + &self.more
    }

    /// SIGKILL node A; returns its data directory.
    fn kill_a(&mut self) -> tempfile::TempDir {
        self.a.take().expect("node A is running").kill()
    }

    /// Starts node A again in its data directory and waits until the balancer routes to it.
    fn restart_a(&mut self, dir: tempfile::TempDir) {
        let extra = self.extra_a();
        self.a = Some(Gateway::start_in(dir, "127.0.0.1:0", &extra).unwrap());
        self.balancer.wait_eligible(&self.a_id, true);
    }

    /// Waits (bounded) until node B has taken the call over and the peer answered its media
    /// re-INVITE.
    fn wait_media_moved_to_b(&self) {
        let deadline = Instant::now() + T;
        while !self.b.log().contains("media moved to this node") {
            assert!(
                Instant::now() < deadline,
                "B never moved the media (no takeover, or no re-INVITE answered); B's log:\n{}",
                tail(&self.b.log())
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the processes said, for a failed assertion.
    /// The device resumes its session on node B with `token`; B's Welcome lists `call_ref`.
    fn resume_on_b(&self, token: &[u8], call_ref: u32) -> DeviceAgent {
        let on_b = DeviceAgent::connect(&self.b, &self.secret, token).unwrap();
        assert!(
            on_b.welcome.resumed,
            "the session did not resume on B\nB's log:\n{}",
            tail(&self.b.log())
        );
        assert!(
            on_b.welcome
                .live_calls
                .iter()
                .any(|c| c.call_ref == call_ref),
            "B's Welcome does not list call {call_ref}: {:?}",
            on_b.welcome.live_calls
        );
        on_b
    }

    fn dump(&self, run: SippProcess) -> String {
        let (ok, failed, report, _) = finish(run);
        format!(
            "SIPp: {ok} ok, {failed} failed\n{report}\nA's log:\n{}\nB's log:\n{}",
            self.a.as_ref().map(|a| tail(&a.log())).unwrap_or_default(),
            tail(&self.b.log())
        )
    }

    /// The device's live stored dialogs, as node B reads them from Redis.
    fn stored_dialogs(&self) -> Vec<Value> {
        let body = self
            .b
            .admin_get(&format!("/devices/{DEVICE}/dialogs"))
            .unwrap();
        serde_json::from_str::<Value>(&body)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until the call is replicated with owner node A (so the ACK was processed).
    fn wait_replicated(&self, call_ref: u32) -> Value {
        let deadline = Instant::now() + T;
        loop {
            if let Some(d) = self
                .stored_dialogs()
                .into_iter()
                .find(|d| d["call_ref"] == call_ref && d["owner"] == self.a_id.as_str())
            {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "call {call_ref} never replicated; A's log:\n{}",
                tail(&self.a().log())
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A node's config. These tests place the device on a chosen node to exercise takeover, so
/// devices are not redirected to their owner (tests/tests/balancer_cluster.rs covers that).
fn node_extra(id: &str, redis: &Redis, lb: &Balancer, registry_dir: &Path, lease: u64) -> String {
    let registry = registry_dir.join("devices.toml");
    format!(
        "[node]\nid = \"{id}\"\ndevice_registry = {registry:?}\n\n\
         [auth]\nresume_secret = \"{RESUME_SECRET}\"\n\n\
         [log]\nlevel = \"info,thalamus_bridge=debug,thalamus_sip=debug\"\n\n\
         [cluster]\nlease_ttl_ms = {lease}\n\n\
         [cluster.store]\nbackend = \"redis\"\n\n\
         [cluster.store.redis]\nurl = \"{}\"\n\n\
         [cluster.heartbeat]\nbalancers = [\"{}\"]\ninterval_ms = {HEARTBEAT_MS}\n\
         redirect_devices = false\n",
        redis.url(),
        lb.heartbeat
    )
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Starts a SIPp client placing one call of `scenario_file` to the device through `target`,
/// with its error log and message trace.
fn start_sipp(scenario_file: &str, target: SocketAddr, extra: &[&str]) -> SippProcess {
    SippProcess::spawn_with(|files| {
        let mut command = sipp();
        command
            .arg("-sf")
            .arg(scenario(scenario_file))
            .args(["-s", DEVICE, "-m", "1", "-i", "127.0.0.1", "-nostdin"])
            .args(["-timeout", "30s", "-timeout_error"])
            .args(["-p", &free_udp_port().unwrap().to_string()])
            .args(["-trace_err", "-error_file"])
            .arg(files.error_file())
            .args(["-trace_msg", "-message_file"])
            .arg(files.message_file())
            .args(extra)
            .arg(target.to_string());
        command
    })
}

/// Waits up to 60 s for SIPp to exit; returns (successful, failed), a report for assertion
/// messages and SIPp's message trace.
fn finish(run: SippProcess) -> (u64, u64, String, String) {
    let outcome = run.wait(Duration::from_secs(60));
    let report = format!(
        "{}\nSIPp errors:\n{}\nSIPp messages:\n{}",
        outcome.ending(),
        outcome.errors,
        outcome.messages
    );
    (outcome.successful, outcome.failed, report, outcome.messages)
}

/// The CSeq numbers of the requests of `method` SIPp received, in order.
fn received_cseqs(messages: &str, method: &str) -> Vec<u32> {
    messages
        .split("-----------------------------------------------")
        .filter(|block| block.contains("message received"))
        .filter_map(|block| {
            let body = block.split_once("\n\n")?.1.trim_start();
            if !body.starts_with(&format!("{method} ")) {
                return None;
            }
            body.lines()
                .find_map(|l| l.strip_prefix("CSeq:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .collect()
}

enum DeviceCommand {
    Hangup(u32),
    Close,
}

/// A simulated device (the simulator's device library) on its own thread: logs in (with a
/// resume token when given), answers every incoming call, answers pings, hangs up on request,
/// and hands every other frame to the test.
struct DeviceAgent {
    commands: tokio::sync::mpsc::UnboundedSender<DeviceCommand>,
    frames: std_mpsc::Receiver<Envelope>,
    welcome: Welcome,
    /// The latest resume token: the Welcome's, then each `ResumeToken` the node sends.
    latest_token: std::sync::Arc<Mutex<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    seen: Vec<Envelope>,
}

impl DeviceAgent {
    fn connect(gw: &Gateway, secret: &str, token: &[u8]) -> anyhow::Result<Self> {
        let (welcome_tx, welcome_rx) = std_mpsc::channel::<Result<Welcome, String>>();
        let (frame_tx, frame_rx) = std_mpsc::channel();
        let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::unbounded_channel();
        let latest_token = std::sync::Arc::new(Mutex::new(Vec::new()));
        let thread_token = latest_token.clone();
        let addr = gw.quic;
        let fingerprint = thalamus_sim::quic::parse_fingerprint(&gw.fingerprint)?;
        let hello = Hello {
            device_id: DEVICE.into(),
            credential: secret.into(),
            resume_token: token.to_vec(),
            ..Default::default()
        };
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let setup = async {
                    let config = thalamus_sim::quic::client_config(Some(fingerprint))?;
                    let endpoint = thalamus_sim::quic::client_endpoint(addr, config)?;
                    let mut conn = DeviceConnection::connect(&endpoint, addr, "localhost").await?;
                    let welcome = conn.hello(hello).await?;
                    anyhow::Ok((endpoint, conn, welcome))
                };
                let (endpoint, mut conn, welcome) = match setup.await {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = welcome_tx.send(Err(format!("{e:#}")));
                        return;
                    }
                };
                *thread_token.lock().unwrap() = welcome.resume_token.clone();
                let _ = welcome_tx.send(Ok(welcome));
                loop {
                    tokio::select! {
                        frame = conn.reader.next() => {
                            let Ok(env) = frame else { break };
                            match &env.body {
                                Some(Body::Ping(p)) => {
                                    let pong = Envelope {
                                        request_id: env.request_id,
                                        body: Some(Body::Pong(Pong { nonce: p.nonce })),
                                    };
                                    let _ = conn.writer.send_envelope(&pong).await;
                                    continue;
                                }
                                Some(Body::ResumeToken(t)) => {
                                    *thread_token.lock().unwrap() = t.token.clone();
                                    continue;
                                }
                                Some(Body::IncomingCall(c)) => {
                                    let answer = Body::Answer(Answer {
                                        call_ref: c.call_ref,
                                        media: Some(thalamus_sim::load::device_calls::device_media()),
                                    });
                                    let _ = conn.writer.send(answer).await;
                                }
                                _ => {}
                            }
                            if frame_tx.send(env).is_err() {
                                break;
                            }
                        }
                        command = cmd_rx.recv() => match command {
                            Some(DeviceCommand::Hangup(call_ref)) => {
                                let _ = conn.writer.send(Body::Hangup(Hangup { call_ref })).await;
                            }
                            Some(DeviceCommand::Close) | None => {
                                conn.conn.close(0u32.into(), b"bye");
                                break;
                            }
                        }
                    }
                }
                endpoint.close(0u32.into(), b"bye");
                let _ =
                    tokio::time::timeout(Duration::from_millis(300), endpoint.wait_idle()).await;
            });
        });
        let welcome = match welcome_rx.recv_timeout(T) {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => bail!("device login failed: {e}"),
            Err(_) => bail!("device login timed out"),
        };
        Ok(Self {
            commands: cmd_tx,
            frames: frame_rx,
            welcome,
            latest_token,
            thread: Some(thread),
            seen: Vec::new(),
        })
    }

    /// The latest resume token the node gave.
    fn token(&self) -> Vec<u8> {
        self.latest_token.lock().unwrap().clone()
    }

    fn wait_for(&mut self, what: &str, pred: impl Fn(&Envelope) -> bool) -> Envelope {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.frames.recv_timeout(left) {
                Ok(env) => {
                    self.seen.push(env.clone());
                    if pred(&env) {
                        return env;
                    }
                }
                Err(_) => panic!("device: no {what}; frames seen: {:?}", self.seen),
            }
        }
    }

    /// The next incoming call's ref; `None` when none came in time.
    fn incoming_call(&mut self) -> Option<u32> {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let env = self.frames.recv_timeout(left).ok()?;
            self.seen.push(env.clone());
            if let Some(Body::IncomingCall(c)) = env.body {
                return Some(c.call_ref);
            }
        }
    }

    fn call_event(&mut self, call_ref: u32, state: CallState) -> CallEvent {
        let env = self.wait_for(&format!("CallEvent {state:?} for {call_ref}"), |e| {
            matches!(&e.body, Some(Body::CallEvent(c)) if c.call_ref == call_ref && c.state == state as i32)
        });
        match env.body {
            Some(Body::CallEvent(c)) => c,
            _ => unreachable!(),
        }
    }

    fn hangup(&self, call_ref: u32) {
        let _ = self.commands.send(DeviceCommand::Hangup(call_ref));
    }

    fn close(mut self) {
        let _ = self.commands.send(DeviceCommand::Close);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DeviceAgent {
    fn drop(&mut self) {
        let _ = self.commands.send(DeviceCommand::Close);
    }
}

/// Takeover latencies (request in to answer out, µs) a node logged.
fn takeover_latencies(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| {
            l.split("takeover_latency_us=")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Writes a figure line to `target/cluster-figures.txt` (read into docs by hand) and prints it.
fn record_figure(line: &str) {
    println!("{line}");
    let path = bin("thalamus")
        .parent()
        .map(|p| p.join("cluster-figures.txt"))
        .unwrap_or_else(|| PathBuf::from("cluster-figures.txt"));
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Which side ends each call after the takeover.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ending {
    /// SIPp's BYE reaches node B (UAS-mode takeover).
    PeerBye,
    /// The device hangs up on node B (UAC-mode takeover; node B sends the BYE).
    DeviceHangup,
}

/// Waits for SIPp's one call of failover loop call `i`; fails the test with B's log unless it
/// succeeded.
fn sipp_call_succeeded(run: SippProcess, i: u32, cluster: &Cluster) {
    let (ok, failed, report, _) = finish(run);
    assert_eq!(
        (ok, failed),
        (1, 0),
        "call {i}: SIPp {ok} ok, {failed} failed\n{report}\nB's log:\n{}",
        tail(&cluster.b.log())
    );
}

/// The failover loop: every call kills node A after the ACK and restarts it afterwards.
fn failover_calls(calls: u32, ending: Ending) {
    let _serial = serial();
    let mut cluster = Cluster::start(5_000);
    let mut device = DeviceAgent::connect(cluster.a(), &cluster.secret, &[]).unwrap();
    let started = Instant::now();
    for i in 0..calls {
        let run = match ending {
            // The BYE leaves 800 ms after the ACK: node A is dead and out of the balancer by then.
            Ending::PeerBye => {
                start_sipp("uac_failover_bye.xml", cluster.balancer.sip, &["-d", "800"])
            }
            Ending::DeviceHangup => start_sipp("uac_wait_bye.xml", cluster.balancer.sip, &[]),
        };
        let Some(call_ref) = device.incoming_call() else {
            panic!("call {i}: no incoming call\n{}", cluster.dump(run));
        };
        device.call_event(call_ref, CallState::Answered);
        let stored = cluster.wait_replicated(call_ref);
        assert_eq!(stored["state"], "live");

        // Node A dies (SIGKILL) right after the ACK.
        let dir = cluster.kill_a();
        let token = device.token();
        drop(device);
        let on_b = match ending {
            Ending::PeerBye => {
                // SIPp's BYE reaches node B, which takes the dialog over from the store (UAS
                // mode) and answers 200. The device comes back afterwards: a device resumed
                // at once would have B claim the call as soon as A leaves the live set and
                // re-INVITE SIPp for the media (devices follow, tested below), before the BYE.
                sipp_call_succeeded(run, i, &cluster);
                let on_b = DeviceAgent::connect(&cluster.b, &cluster.secret, &token).unwrap();
                assert!(
                    on_b.welcome.resumed,
                    "call {i}: the session did not resume on B"
                );
                // The call ended while the device was away: B's Welcome does not list it.
                assert!(
                    !on_b
                        .welcome
                        .live_calls
                        .iter()
                        .any(|c| c.call_ref == call_ref),
                    "call {i}: B's Welcome lists an ended call: {:?}",
                    on_b.welcome.live_calls
                );
                on_b
            }
            Ending::DeviceHangup => {
                // The device resumes on B and hangs up there once A is out of the live set.
                let mut on_b = cluster.resume_on_b(&token, call_ref);
                cluster.balancer.wait_eligible(&cluster.a_id, false);
                on_b.hangup(call_ref);
                sipp_call_succeeded(run, i, &cluster);
                let ended = on_b.call_event(call_ref, CallState::Ended);
                assert_eq!(
                    ended.end_reason,
                    EndReason::LocalHangup as i32,
                    "call {i}: {ended:?}"
                );
                on_b
            }
        };

        // Node A comes back; the device goes back to it for the next call.
        cluster.restart_a(dir);
        let token = on_b.token();
        on_b.close();
        device = DeviceAgent::connect(cluster.a(), &cluster.secret, &token).unwrap();
        assert!(device.welcome.live_calls.is_empty());
    }
    let elapsed = started.elapsed();
    // Every call ended; nothing is left live in the store.
    let deadline = Instant::now() + T;
    while !cluster.stored_dialogs().is_empty() {
        assert!(Instant::now() < deadline, "live dialogs left in the store");
        std::thread::sleep(Duration::from_millis(20));
    }
    let b_log = cluster.b.log();
    let claimed = b_log.matches("dialog taken over").count();
    assert_eq!(claimed as u32, calls, "B took over {claimed} dialogs");
    // Call records: exactly one per call, written by B (the owner when it ended), naming both
    // nodes and the takeover, with the answer time A saw; A, killed in every call, wrote none.
    let expected_reason = match ending {
        Ending::PeerBye => "remote_hangup",
        Ending::DeviceHangup => "local_hangup",
    };
    let deadline = Instant::now() + T;
    let records = loop {
        let records = call_records(&cluster.b.data_dir());
        if records.len() as u32 >= calls || Instant::now() > deadline {
            break records;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(records.len() as u32, calls, "B's call records: {records:?}");
    let ids: std::collections::BTreeSet<&str> = records
        .iter()
        .filter_map(|r| r["call_id"].as_str())
        .collect();
    assert_eq!(ids.len() as u32, calls, "one record per Call-ID");
    for r in &records {
        assert_eq!(r["taken_over"], true, "{r}");
        assert_eq!(
            r["nodes"],
            serde_json::json!([cluster.a_id, cluster.b_id]),
            "{r}"
        );
        assert_eq!(r["direction"], "incoming", "{r}");
        assert_eq!(r["end_reason"], expected_reason, "{r}");
        assert!(r["answer"].is_string(), "{r}");
        assert!(r["start"].as_str() <= r["answer"].as_str(), "{r}");
        assert!(r["answer"].as_str() <= r["end"].as_str(), "{r}");
    }
    assert!(call_records(&cluster.a().data_dir()).is_empty());
    let label = match ending {
        Ending::PeerBye => "UAS mode (peer BYE)",
        Ending::DeviceHangup => "UAC mode (device hangup)",
    };
    record_figure(&format!(
        "failover {label}: {calls} calls, 0 failures, {:.1} s ({:.2} s per call with a node death and restart)",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() / f64::from(calls)
    ));
    if ending == Ending::PeerBye {
        let mut lat = takeover_latencies(&b_log);
        assert_eq!(lat.len() as u32, calls, "one takeover latency per call");
        lat.sort_unstable();
        record_figure(&format!(
            "takeover latency (BYE in to 200 out on the new node, {} build, Redis store): p50 {} us, p99 {} us, max {} us over {} takeovers",
            if cfg!(debug_assertions) { "debug" } else { "release" },
            percentile(&lat, 50.0),
            percentile(&lat, 99.0),
            lat.last().copied().unwrap_or(0),
            lat.len()
        ));
    }
}

#[test]
fn jain_sip_ha_failover_100_calls_in_a_row() {
    failover_calls(100, Ending::PeerBye);
}

#[test]
fn device_hangup_after_takeover_100_calls_in_a_row() {
    failover_calls(100, Ending::DeviceHangup);
}

#[test]
fn media_follows_the_takeover_and_a_frozen_node_gives_way() {
    let _serial = serial();
    // A long lease: node B may claim only because it is asked to (admin API).
    let cluster = Cluster::start(30_000);
    let mut device = DeviceAgent::connect(cluster.a(), &cluster.secret, &[]).unwrap();
    let run = start_sipp("uac_media_follows.xml", cluster.balancer.sip, &[]);
    let Some(call_ref) = device.incoming_call() else {
        panic!("no incoming call\n{}", cluster.dump(run));
    };
    device.call_event(call_ref, CallState::Answered);
    let stored = cluster.wait_replicated(call_ref);
    let path = format!(
        "/dialogs/{}/{}/{}",
        segment(stored["call_id"].as_str().unwrap()),
        segment(stored["local_tag"].as_str().unwrap()),
        segment(stored["remote_tag"].as_str().unwrap())
    );
    assert_eq!(stored["epoch"], 0);
    assert_eq!(stored["held_here"], false);
    let a_pid = cluster.a().proc.child.id().to_string();

    // Node A freezes; the balancer takes it out; node B claims the dialog (UAC mode, admin).
    assert!(Command::new("kill")
        .args(["-STOP", &a_pid])
        .status()
        .unwrap()
        .success());
    cluster.balancer.wait_eligible(&cluster.a_id, false);
    let (status, body) = http_request(cluster.b.admin, "POST", &format!("{path}/claim")).unwrap();
    assert_eq!(status, 200, "{body}");
    let claimed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(claimed["call_ref"], call_ref);
    let on_b: Value = serde_json::from_str(&cluster.b.admin_get(&path).unwrap()).unwrap();
    assert_eq!(on_b["owner"], cluster.b_id.as_str());
    assert_eq!(on_b["epoch"], 1);
    assert_eq!(on_b["held_here"], true);

    // Media follows: B re-INVITEs SIPp with its own address; the record gets B's SDP.
    let deadline = Instant::now() + T;
    let before = stored["media"]["local_sdp"].as_str().unwrap().to_string();
    loop {
        let now: Value = serde_json::from_str(&cluster.b.admin_get(&path).unwrap()).unwrap();
        let sdp = now["media"]["local_sdp"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if sdp != before && !sdp.is_empty() {
            let port = |s: &str| {
                s.lines()
                    .find_map(|l| l.strip_prefix("m=audio "))
                    .and_then(|l| l.split_whitespace().next())
                    .map(str::to_string)
            };
            assert_ne!(port(&sdp), port(&before), "B's media port is A's");
            break;
        }
        assert!(Instant::now() < deadline, "the record never got B's SDP");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Node A thaws; the device (still connected to A) hangs up there: A's write of the next
    // CSeq conflicts, so A drops the call without a BYE and tells the device.
    assert!(Command::new("kill")
        .args(["-CONT", &a_pid])
        .status()
        .unwrap()
        .success());
    device.hangup(call_ref);
    let ended = device.call_event(call_ref, CallState::Ended);
    assert_eq!(
        ended.end_reason,
        EndReason::NodeFailover as i32,
        "{ended:?}\nA's metrics: {}\nA's log:\n{}",
        cluster
            .a()
            .admin_get("/metrics")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("write_ahead") || l.contains("replication"))
            .collect::<Vec<_>>()
            .join("\n"),
        tail(&cluster.a().log())
    );
    cluster
        .a()
        .wait_metric("thalamus_write_ahead_total{reason=\"lost\"}", 1.0, T)
        .unwrap();
    assert_eq!(
        cluster.a().metric("thalamus_dialogs_lost_total").unwrap(),
        1.0
    );

    // Node B ends the call (UAC mode, admin): SIPp gets B's BYE.
    let (status, body) = http_request(cluster.b.admin, "POST", &format!("{path}/bye")).unwrap();
    assert_eq!(status, 202, "{body}");
    let (ok, failed, report, messages) = finish(run);
    assert_eq!(
        (ok, failed),
        (1, 0),
        "{report}\nB's log:\n{}",
        tail(&cluster.b.log())
    );
    // CSeq continues from the record: the re-INVITE is the first request of the gateway's
    // side (above the import floor) and the BYE follows it by one.
    let invites = received_cseqs(&messages, "INVITE");
    let byes = received_cseqs(&messages, "BYE");
    let (Some(&reinvite), Some(&bye)) = (invites.last(), byes.last()) else {
        panic!("no re-INVITE or BYE received by SIPp:\n{report}");
    };
    assert!(reinvite > (1 << 30), "re-INVITE CSeq {reinvite}");
    assert_eq!(bye, reinvite + 1, "BYE CSeq");
    // The record is a tombstone now.
    let deadline = Instant::now() + T;
    loop {
        let now: Value = serde_json::from_str(&cluster.b.admin_get(&path).unwrap()).unwrap();
        if now["state"] == "tombstone" {
            break;
        }
        assert!(Instant::now() < deadline, "record never tombstoned: {now}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn single_node_on_the_embedded_store_answers_the_bye_after_a_restart() {
    let _serial = serial();
    let sip_port = free_udp_port().unwrap();
    let extra = format!("[sip]\nlisten = \"127.0.0.1:{sip_port}\"\n");
    let gw = Gateway::start(&extra).unwrap();
    let secret = gw.add_device(DEVICE).unwrap();
    let mut device = DeviceAgent::connect(&gw, &secret, &[]).unwrap();
    let run = start_sipp("uac_failover_bye.xml", gw.sip, &["-d", "3000"]);
    let call_ref = device.incoming_call().expect("an incoming call");
    device.call_event(call_ref, CallState::Answered);
    // The record is in the embedded store once the ACK is processed.
    let deadline = Instant::now() + T;
    loop {
        let body = gw.admin_get(&format!("/devices/{DEVICE}/dialogs")).unwrap();
        if body.contains(&format!("\"call_ref\":{call_ref}")) {
            break;
        }
        assert!(Instant::now() < deadline, "never stored: {body}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let dir = gw.kill();
    drop(device);
    let gw = Gateway::start_in(dir, "127.0.0.1:0", &extra).unwrap();
    let (ok, failed, report, _) = finish(run);
    assert_eq!(
        (ok, failed),
        (1, 0),
        "{report}\ngateway log:\n{}",
        tail(&gw.log())
    );
    assert!(
        gw.log().contains("dialog taken over"),
        "{}",
        tail(&gw.log())
    );
    gw.wait_metric("thalamus_takeovers_total{reason=\"claimed\"}", 1.0, T)
        .unwrap();
}

/// Devices follow: the device resumes on node B while node A's lease still runs (the call is
/// listed, watched), or after it lapsed (claimed at once); either way node B takes the call and
/// re-INVITEs SIPp with its own media, and the device's hangup on B ends it.
fn device_resumes_and_media_follows(wait_for_the_lease: bool) {
    let _serial = serial();
    let mut cluster = Cluster::start(1_500);
    let mut device = DeviceAgent::connect(cluster.a(), &cluster.secret, &[]).unwrap();
    let run = start_sipp("uac_media_follows.xml", cluster.balancer.sip, &[]);
    let Some(call_ref) = device.incoming_call() else {
        panic!("no incoming call\n{}", cluster.dump(run));
    };
    device.call_event(call_ref, CallState::Answered);
    cluster.wait_replicated(call_ref);
    let _dir = cluster.kill_a();
    let token = device.token();
    drop(device);
    if wait_for_the_lease {
        std::thread::sleep(Duration::from_millis(1_700));
    }
    let mut on_b = cluster.resume_on_b(&token, call_ref);
    // Node B owns the call now (at once, or when A's lease lapses) and moved the media.
    let deadline = Instant::now() + T;
    loop {
        let stored = cluster
            .stored_dialogs()
            .into_iter()
            .find(|d| d["call_ref"] == call_ref);
        if let Some(d) = stored {
            if d["owner"] == cluster.b_id.as_str() && d["held_here"] == true {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "B never took the call; B's log:\n{}",
            tail(&cluster.b.log())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.wait_media_moved_to_b();
    // Watched first only while the lease ran.
    assert_eq!(
        cluster.b.log().contains("watching it"),
        !wait_for_the_lease,
        "{}",
        tail(&cluster.b.log())
    );
    on_b.hangup(call_ref);
    let ended = on_b.call_event(call_ref, CallState::Ended);
    assert_eq!(ended.end_reason, EndReason::LocalHangup as i32, "{ended:?}");
    let (ok, failed, report, _) = finish(run);
    assert_eq!((ok, failed), (1, 0), "{report}");
}

#[test]
fn a_device_resuming_while_the_lease_runs_gets_its_call_when_it_lapses() {
    device_resumes_and_media_follows(false);
}

#[test]
fn a_device_resuming_after_the_lease_lapsed_gets_its_call_at_once() {
    device_resumes_and_media_follows(true);
}

/// A device connected for longer than the resume window (3 s here) resumes its call after its
/// node is killed (issue 16): the node sends a fresh resume token every third of the window
/// while the session lives, so the latest one is always good. With only the `Welcome`'s token
/// (issued 6 s before the node died) the session would come back new, without its call. Node
/// B then takes the call over, moves its media, and the device hangs up there.
#[test]
fn a_device_connected_longer_than_the_resume_window_resumes_its_call() {
    let _serial = serial();
    let mut cluster = Cluster::start_with(1_500, "\n[session]\nresume_window_secs = 3\n");
    let mut device = DeviceAgent::connect(cluster.a(), &cluster.secret, &[]).unwrap();
    let welcome_token = device.token();
    let run = start_sipp("uac_media_follows.xml", cluster.balancer.sip, &[]);
    let Some(call_ref) = device.incoming_call() else {
        panic!("no incoming call\n{}", cluster.dump(run));
    };
    device.call_event(call_ref, CallState::Answered);
    cluster.wait_replicated(call_ref);
    // Twice the window goes by with the session up.
    std::thread::sleep(Duration::from_secs(6));
    let token = device.token();
    assert_ne!(token, welcome_token, "no fresh resume token in 6 s");
    let _dir = cluster.kill_a();
    drop(device);
    let mut on_b = cluster.resume_on_b(&token, call_ref);
    // B takes the call (when A's lease lapses), moves the media, and the device's hangup on B
    // ends it with SIPp.
    cluster.wait_media_moved_to_b();
    on_b.hangup(call_ref);
    let ended = on_b.call_event(call_ref, CallState::Ended);
    assert_eq!(ended.end_reason, EndReason::LocalHangup as i32, "{ended:?}");
    let (ok, failed, report, _) = finish(run);
    assert_eq!(
        (ok, failed),
        (1, 0),
        "{report}\nB's log:\n{}",
        tail(&cluster.b.log())
    );
}

/// Waits until the device's subscription record is in the store, owned by a node for which
/// `owner` holds, and returns it.
fn wait_subscription(cluster: &Cluster, what: &str, owner: impl Fn(&str) -> bool) -> Value {
    let deadline = Instant::now() + T;
    loop {
        if let Some(d) = cluster
            .stored_dialogs()
            .into_iter()
            .find(|d| d["subscription"] == true && owner(d["owner"].as_str().unwrap_or("")))
        {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "the subscription never was {what}: {:?}\nB's log:\n{}",
            cluster.stored_dialogs(),
            tail(&cluster.b.log())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until node A sent the watcher its first NOTIFY and the subscription's record is in
/// the store under A.
fn wait_subscribed_on_a(cluster: &Cluster) {
    let deadline = Instant::now() + T;
    while cluster
        .a()
        .metric("thalamus_presence_notifies_total{reason=\"sent\"}")
        .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "A sent no NOTIFY; A's log:\n{}",
            tail(&cluster.a().log())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let a_id = cluster.a_id.clone();
    wait_subscription(cluster, "written by A", |o| o == a_id);
}

/// After the scenario: the subscription ended everywhere (no live record is left), B took it
/// over, and the NOTIFYs SIPp received were numbered upwards across the two nodes.
fn assert_subscription_followed(cluster: &Cluster, run: SippProcess) {
    let (ok, failed, report, messages) = finish(run);
    assert_eq!(
        (ok, failed),
        (1, 0),
        "{report}\nA's log:\n{}\nB's log:\n{}",
        cluster
            .a
            .as_ref()
            .map(|a| tail(&a.log()))
            .unwrap_or_default(),
        tail(&cluster.b.log())
    );
    assert!(
        cluster.b.log().contains("subscription taken over"),
        "{}",
        tail(&cluster.b.log())
    );
    let cseqs = received_cseqs(&messages, "NOTIFY");
    assert!(
        cseqs.len() >= 3 && cseqs.windows(2).all(|w| w[0] < w[1]),
        "NOTIFY CSeqs not rising across the nodes: {cseqs:?}"
    );
    let deadline = Instant::now() + T;
    while cluster
        .stored_dialogs()
        .iter()
        .any(|d| d["subscription"] == true)
    {
        assert!(
            Instant::now() < deadline,
            "the ended subscription's record is still live"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 18, subscriptions across failover: SIPp watches the device's presence through the
/// balancer; the device's node (A) is killed; the device resumes on node B, which takes the
/// subscription over from the store and sends SIPp a NOTIFY (open) unasked, numbered above
/// A's; SIPp's refresh and unsubscribe, along the route set, are answered by B. Without the
/// replication the NOTIFY never comes and the refresh gets 481.
#[test]
fn a_watcher_s_subscription_follows_the_device_when_its_node_dies() {
    let _serial = serial();
    let mut cluster = Cluster::start(1_500);
    let device = DeviceAgent::connect(cluster.a(), &cluster.secret, &[]).unwrap();
    let run = start_sipp("uac_subscribe_follows.xml", cluster.balancer.sip, &[]);
    wait_subscribed_on_a(&cluster);
    let _dir = cluster.kill_a();
    let token = device.token();
    drop(device);
    let on_b = DeviceAgent::connect(&cluster.b, &cluster.secret, &token).unwrap();
    assert!(on_b.welcome.resumed);
    assert_subscription_followed(&cluster, run);
}

/// The watcher's refresh reaches the survivor first: SIPp's subscription was accepted by A,
/// A is killed and the device goes away; SIPp's refresh (after a 4 s pause) is routed by the
/// balancer to B, which takes the subscription over (UAS mode), answers it, and tells SIPp the
/// device is closed; SIPp's unsubscribe ends it.
#[test]
fn a_watcher_s_refresh_after_its_node_died_is_answered_by_the_survivor() {
    let _serial = serial();
    let mut cluster = Cluster::start(1_500);
    let device = DeviceAgent::connect(cluster.a(), &cluster.secret, &[]).unwrap();
    let run = start_sipp(
        "uac_subscribe_refresh_survivor.xml",
        cluster.balancer.sip,
        &["-d", "4000"],
    );
    wait_subscribed_on_a(&cluster);
    let _dir = cluster.kill_a();
    drop(device);
    assert_subscription_followed(&cluster, run);
}

/// A device leaves its node for longer than its grace period (3 s here): SIPp hears it close,
/// then `terminated;reason=deactivated` (RFC 6665 4.2.2), subscribes again through the
/// balancer (a new dialog, at the device's owner), hears it closed, and open when the device
/// comes back; its unsubscribe ends the new subscription.
#[test]
fn a_device_that_leaves_its_node_has_its_watchers_subscribe_again() {
    let _serial = serial();
    let cluster = Cluster::start_with(1_500, "\n[session]\nresume_window_secs = 3\n");
    let device = DeviceAgent::connect(cluster.a(), &cluster.secret, &[]).unwrap();
    let run = start_sipp("uac_subscribe_deactivated.xml", cluster.balancer.sip, &[]);
    wait_subscribed_on_a(&cluster);
    device.close();
    // Open, closed, deactivated, and the new subscription's first NOTIFY.
    let deadline = Instant::now() + T;
    while cluster
        .a()
        .metric("thalamus_presence_notifies_total{reason=\"sent\"}")
        .unwrap_or(0.0)
        < 4.0
    {
        assert!(
            Instant::now() < deadline,
            "no new subscription; A's log:\n{}",
            tail(&cluster.a().log())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let back = DeviceAgent::connect(cluster.a(), &cluster.secret, &[]).unwrap();
    let (ok, failed, report, _) = finish(run);
    assert_eq!(
        (ok, failed),
        (1, 0),
        "{report}\nA's log:\n{}",
        tail(&cluster.a().log())
    );
    assert!(cluster.a().log().contains("subscription deactivated"));
    drop(back);
}
