//! End to end, the SIP load balancer in front of two real gateway nodes (issue 7's acceptance):
//! Redis (`redis-server`, started here on a free port) as the shared dialog store, the balancer
//! (`thalamus balancer`), two gateway nodes (`thalamus run`) sharing the store, the device
//! registry and the resume secret and sending heartbeats to the balancer, a fleet of 100
//! simulated devices (`thalamus_tests::fleet`, the simulator's device library), and SIPp
//! calling the devices through the balancer.
//!
//! - Split: every device logs in at node A first and the nodes redirect each to its owner
//!   (the rendezvous hash of its id over both nodes); 1,000 calls to the 100 devices split
//!   between the nodes exactly as `owner()` says, each node within 10 % of 500.
//! - Kill: a node is killed (SIGKILL) in the middle of a run; its devices reconnect to the
//!   survivor, the balancer takes the node out after the detection window and sends their calls
//!   to the survivor; the failed calls, all to the dead node's devices, stay within the call
//!   rate times the detection window plus a 500 ms margin for the devices' reconnect. The node
//!   then restarts with a new session id: the balancer counts the restart and routes to it
//!   again, and the devices move back.
//! - Drain: a node drains during a run of 3-second calls: the balancer sends it no new calls,
//!   its calls in progress complete, and its devices move to the other node (the new calls to
//!   its idle devices that arrive while they move are refused; they are counted and bounded).
//!
//! The figures are printed (run with `--nocapture`) and written down in docs/balancer.md,
//! "Failover figures (real nodes)". The tests here run one at a time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use thalamus_ownership::{owner, NodeId};
use thalamus_tests::cluster::{free_port_below_ephemeral, http_request, Balancer, Redis};
use thalamus_tests::fleet::{DialOutcome, DialPlan, Fleet, FleetConfig, FleetEventKind, FleetNode};
use thalamus_tests::netns::{self, Netns};
use thalamus_tests::{
    bin, call_records, free_udp_port, scenario, sipp, Gateway, Proc, Sim, SippProcess,
};

const T: Duration = Duration::from_secs(20);
/// Heartbeat interval of the nodes and the balancer.
const HEARTBEAT_MS: u64 = 200;
/// Heartbeats a node may miss before the balancer takes it out.
const MISS_COUNT: u32 = 3;
/// The detection window: a node is out `(miss_count + ½) × interval` after its last heartbeat.
const WINDOW_MS: u64 = (2 * MISS_COUNT as u64 + 1) * HEARTBEAT_MS / 2;
/// Devices in the fleet: `dev-0` .. `dev-99`.
const DEVICES: u32 = 100;

/// A figure of a chaos test, from `THALAMUS_CHAOS_<name>` when set (bench/chaos.sh runs these
/// tests at full scale), else the short run's `default`.
fn chaos(name: &str, default: u32) -> u32 {
    std::env::var(format!("THALAMUS_CHAOS_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The fleet's size: [`DEVICES`], or `THALAMUS_CHAOS_DEVICES`.
fn devices_count() -> u32 {
    chaos("DEVICES", DEVICES)
}
/// Shared resume-token secret of the nodes.
const RESUME_SECRET: &str = "3f1c0d9e8b7a695847362514f3e2d1c0b9a8978675645342312f1e0d0c0b0a09";
/// Node ids: A is the node every device logs in at first (most tests run the first two).
const NODE_IDS: [&str; 3] = ["gw-1", "gw-2", "gw-3"];
/// A node's counter of calls from SIP to its devices.
const INCOMING: &str = "thalamus_calls_started_total{reason=\"incoming\"}";
/// A node's counter of devices it sent to another node.
const REDIRECTED: &str = "thalamus_device_sessions_redirected_total";
/// A node's calls in progress.
const ACTIVE: &str = "thalamus_calls_active";
/// `GoodbyeReason::Draining`.
const GOODBYE_DRAINING: i32 = thalamus_proto::v1::GoodbyeReason::Draining as i32;

/// One test at a time (they time node deaths against heartbeats, and share the CPU).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The device ids of the fleet.
fn device_ids() -> Vec<String> {
    (0..devices_count()).map(|n| format!("dev-{n}")).collect()
}

/// Each device's owner among `nodes` (the balancer's and the nodes' ownership function).
fn owners(devices: &[String], nodes: &[&str]) -> BTreeMap<String, String> {
    let ids: Vec<NodeId> = nodes.iter().map(|n| NodeId::new(n).unwrap()).collect();
    devices
        .iter()
        .map(|d| {
            let o = owner(d, ids.iter()).unwrap().as_str().to_string();
            (d.clone(), o)
        })
        .collect()
}

/// Gateway nodes (two, or [`NODE_IDS`]'s three), the balancer, Redis and the device fleet,
/// every device at its owner.
struct Cluster {
    /// The dialog store (with Sentinel: its first master).
    redis: Redis,
    /// With Sentinel: the replica and the sentinel.
    sentinel: Option<(Redis, Redis)>,
    /// The namespace of the second node, when it runs in one.
    partitioned: Option<String>,
    balancer: Balancer,
    registry_dir: tempfile::TempDir,
    nodes: Vec<Option<Gateway>>,
    /// The nodes' QUIC addresses (a restarted node gets its old one again).
    quic: Vec<SocketAddr>,
    devices: Vec<String>,
    /// Each device's owner while both nodes are eligible.
    owners: BTreeMap<String, String>,
    fleet: Fleet,
    /// Lines the nodes add to their `[cluster]` section.
    cluster_extra: &'static str,
    /// The SIPp injection file: the device ids in order.
    csv: PathBuf,
    _csv_dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        Self::start_with(2, FleetConfig::quick)
    }

    /// `n` nodes; the fleet's configuration from its secret.
    fn start_with(n: usize, fleet_config: impl FnOnce(&str) -> FleetConfig) -> Self {
        Self::start_with_store(n, fleet_config, false, None, "")
    }

    /// [`Cluster::start_with`]; with `sentinel`, the store is a Redis master, a replica and a
    /// sentinel watching them (master name [`SENTINEL_MASTER`]), and the nodes find the
    /// master through the sentinel. With `netns` (entered by the calling thread), the second
    /// node runs in its namespace and reaches the store over its own link.
    fn start_with_store(
        n: usize,
        fleet_config: impl FnOnce(&str) -> FleetConfig,
        sentinel: bool,
        netns: Option<&Netns>,
        cluster_extra: &'static str,
    ) -> Self {
        let redis = match netns {
            Some(_) => Redis::start_also_on(netns::WORLD_B).unwrap(),
            None => Redis::start().unwrap(),
        };
        let sentinel = sentinel.then(|| {
            let replica = Redis::start_replica_of(&redis).unwrap();
            let sentinel = Redis::start_sentinel(SENTINEL_MASTER, &redis).unwrap();
            (replica, sentinel)
        });
        let balancer = match netns {
            Some(_) => Balancer::start_on_host(netns::WORLD_A, HEARTBEAT_MS, MISS_COUNT, "warn"),
            None => Balancer::start(HEARTBEAT_MS, MISS_COUNT, "warn"),
        }
        .unwrap();
        let registry_dir = tempfile::tempdir().unwrap();
        let partitioned = netns.map(|ns| ns.node.clone());
        let extra = |i: usize| {
            let store = store_section(&redis, sentinel.as_ref(), i, partitioned.is_some());
            node_extra(
                NODE_IDS[i],
                &store,
                &balancer,
                registry_dir.path(),
                cluster_extra,
            )
        };
        let start = |i: usize| match (&partitioned, i) {
            (Some(ns), 1) => Gateway::start_in_namespace(
                tempfile::tempdir().unwrap(),
                Some(ns),
                &format!("{}:0", netns::NODE_A),
                &extra(i),
                Some(thalamus_tests::ADMIN_TOKEN),
            ),
            // Below the ephemeral range: a killed node restarts on the same port, which a
            // client socket could otherwise have taken meanwhile.
            _ => Gateway::start_in(
                tempfile::tempdir().unwrap(),
                &format!("127.0.0.1:{}", free_port_below_ephemeral().unwrap()),
                &extra(i),
            ),
        };
        let a = start(0).unwrap();
        // One secret for all the devices (one slow hash).
        let out = Command::new(bin("thalamus"))
            .arg("--config")
            .arg(&a.config_path)
            .args(["device", "add-bulk", "--prefix", "dev-", "--count"])
            .arg(devices_count().to_string())
            .env_remove("THALAMUS_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "device add-bulk: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let secret = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let mut nodes = vec![a];
        for i in 1..n {
            nodes.push(start(i).unwrap());
        }
        for id in &NODE_IDS[..n] {
            balancer.wait_eligible(id, true);
        }

        let devices = device_ids();
        let owners = owners(&devices, &NODE_IDS[..n]);
        let csv_dir = tempfile::tempdir().unwrap();
        let csv = csv_dir.path().join("devices.csv");
        let mut text = String::from("SEQUENTIAL\n");
        for d in &devices {
            text.push_str(&format!("{d};\n"));
        }
        std::fs::write(&csv, text).unwrap();

        let fleet_nodes = nodes
            .iter()
            .enumerate()
            .map(|(i, gw)| fleet_node(NODE_IDS[i], gw))
            .collect();
        let fleet = Fleet::start(&devices, fleet_nodes, fleet_config(&secret));
        let cluster = Self {
            partitioned,
            redis,
            sentinel,
            balancer,
            registry_dir,
            quic: nodes.iter().map(|gw| gw.quic).collect(),
            nodes: nodes.into_iter().map(Some).collect(),
            devices,
            owners,
            fleet,
            cluster_extra,
            csv,
            _csv_dir: csv_dir,
        };
        // Every device logged in at A; B's devices were redirected there.
        if let Err(e) = cluster
            .fleet
            .wait_on(&cluster.owners, Duration::from_secs(60))
        {
            panic!("{e:#}\n{}", cluster.logs());
        }
        cluster
    }

    fn node(&self, i: usize) -> &Gateway {
        self.nodes[i].as_ref().expect("the node is running")
    }

    fn extra(&self, i: usize) -> String {
        node_extra(
            NODE_IDS[i],
            &store_section(
                &self.redis,
                self.sentinel.as_ref(),
                i,
                self.partitioned.is_some(),
            ),
            &self.balancer,
            self.registry_dir.path(),
            self.cluster_extra,
        )
    }

    /// The devices `node` owns while both nodes are eligible.
    fn devices_of(&self, node: &str) -> Vec<String> {
        self.owners
            .iter()
            .filter(|(_, o)| o.as_str() == node)
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// The tails of the processes' logs, for a failed assertion.
    fn logs(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(n) = n {
                out.push_str(&format!("{}'s log:\n{}\n", NODE_IDS[i], tail(&n.log(), 30)));
            }
        }
        out.push_str(&format!(
            "balancer's log:\n{}\n",
            tail(&self.balancer.log(), 20)
        ));
        out
    }

    /// With `THALAMUS_TEST_DUMP=<dir>`, writes the logs of the nodes and the balancer there;
    /// returns the directory.
    fn dump(&self) -> Option<String> {
        let dir = std::env::var("THALAMUS_TEST_DUMP").ok()?;
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(n) = n {
                let _ = std::fs::write(format!("{dir}/{}.log", NODE_IDS[i]), n.log());
                let _ = std::fs::copy(&n.config_path, format!("{dir}/{}.toml", NODE_IDS[i]));
            }
        }
        let _ = std::fs::write(format!("{dir}/balancer.log"), self.balancer.log());
        Some(dir)
    }

    /// Waits (polling every 50 ms, at most [`T`]) until `done`; panics saying `what` did not
    /// happen, with the processes' logs.
    fn wait_until(&self, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + T;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what} within {T:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn incoming(&self, i: usize) -> u64 {
        self.node(i).metric(INCOMING).unwrap() as u64
    }
}

fn fleet_node(id: &str, gw: &Gateway) -> FleetNode {
    FleetNode {
        id: id.to_string(),
        quic: gw.quic,
        fingerprint: gw.fingerprint.clone(),
    }
}

/// The master name the sentinel of [`Cluster::start_with_store`] watches.
const SENTINEL_MASTER: &str = "thalamus";

/// What every node of a partition test adds: stepping aside 2 s after losing the store, the
/// balancer's heartbeat secret, and its address (outside loopback there) among the trusted SIP
/// sources.
const PARTITION_COMMON: &str = "[cluster]\nstep_aside_after_ms = 2000\n\n\
     [cluster.heartbeat]\nsecret = \"thalamus-tests-heartbeat-secret\"\n\n\
     [sip.inbound]\ntrusted = [\"127.0.0.0/8\", \"10.99.1.0/24\"]\n";

/// Node `i`'s `[cluster.store.redis]`: the master's URL, or the sentinel. With a partition,
/// the second node reaches the store over its own link, and its other sockets are on its
/// namespace's address.
fn store_section(
    redis: &Redis,
    sentinel: Option<&(Redis, Redis)>,
    i: usize,
    partitioned: bool,
) -> String {
    match sentinel {
        None if partitioned && i == 1 => format!(
            "url = \"redis://{}:{}/0\"\n\n[sip]\nlisten = \"{a}:0\"\n\n[admin]\nlisten = \"{a}:0\"\n\n\
             [media]\naddress = \"{a}\"\n\n{PARTITION_COMMON}",
            netns::WORLD_B,
            redis.port,
            a = netns::NODE_A
        ),
        None if partitioned => format!(
            "url = \"{}\"\n\n{PARTITION_COMMON}",
            redis.url()
        ),
        None => format!("url = \"{}\"\n", redis.url()),
        Some((_, sentinel)) => format!(
            "sentinels = [\"127.0.0.1:{}\"]\nmaster_name = \"{SENTINEL_MASTER}\"\n",
            sentinel.port
        ),
    }
}

fn node_extra(
    id: &str,
    store: &str,
    lb: &Balancer,
    registry_dir: &Path,
    cluster_extra: &str,
) -> String {
    let registry = registry_dir.join("devices.toml");
    format!(
        "[node]\nid = \"{id}\"\ndevice_registry = {registry:?}\n\n\
         [quic]\nidle_timeout_ms = 1500\nkeepalive_interval_ms = 300\n\n\
         [session]\nmax_calls = 16\n\n\
         [auth]\nresume_secret = \"{RESUME_SECRET}\"\n\n\
         [log]\nlevel = \"info\"\n\n\
         [cluster]\nlease_ttl_ms = 1500\n{cluster_extra}\n\
         [cluster.store]\nbackend = \"redis\"\n\n\
         [cluster.store.redis]\n{store}\n\
         [cluster.heartbeat]\nbalancers = [\"{}\"]\ninterval_ms = {HEARTBEAT_MS}\n",
        lb.heartbeat
    )
}

/// What SIPp reported.
struct SippResult {
    ok: u64,
    failed: u64,
    /// INVITE retransmissions (from SIPp's scenario screen).
    invite_retransmissions: u64,
    /// BYE retransmissions.
    bye_retransmissions: u64,
    /// The calls SIPp aborted, from its error log.
    aborted: Vec<AbortedCall>,
    report: String,
}

/// One call SIPp aborted.
#[derive(Debug)]
struct AbortedCall {
    /// When (seconds since the Unix epoch, as SIPp logs it).
    at_unix: f64,
    /// The unexpected response's status code, or `timeout`, or `other`.
    kind: String,
    /// The scenario step SIPp was at (1 to 4: waiting for the INVITE's answer; 8: for the
    /// BYE's).
    step: Option<u32>,
    /// The callee (the To user of the unexpected response), when SIPp logged one.
    device: Option<String>,
}

/// Seconds since the Unix epoch (SIPp's clock in its error log).
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The calls in SIPp's error log (`-trace_err`): one entry per "Aborting call" line, with the
/// To user of the message that follows it.
fn aborted_calls(errors: &str) -> Vec<AbortedCall> {
    let mut out: Vec<AbortedCall> = Vec::new();
    for line in errors.lines() {
        if let Some((head, rest)) = line.split_once(": Aborting call") {
            let at_unix = head
                .rsplit(|c: char| c.is_whitespace())
                .next()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0.0);
            let kind = if let Some(status) = rest.split("received 'SIP/2.0 ").nth(1) {
                status.chars().take(3).collect()
            } else if rest.contains("timeout") {
                "timeout".to_string()
            } else {
                "other".to_string()
            };
            let step = rest
                .split("(index ")
                .nth(1)
                .and_then(|r| r.split(')').next())
                .and_then(|n| n.parse().ok());
            out.push(AbortedCall {
                at_unix,
                kind,
                step,
                device: None,
            });
        } else if let Some(to) = line.strip_prefix("To: <sip:") {
            if let Some(last) = out.last_mut() {
                if last.device.is_none() {
                    last.device = to.split('@').next().map(str::to_string);
                }
            }
        }
    }
    out
}

/// Starts a SIPp client calling the devices of the injection file in order. Its
/// [`SippProcess::started`]: call `i` leaves no earlier than `i / rate` after it.
fn start_sipp(cluster: &Cluster, calls: u32, rate: u32, pause_ms: u32) -> SippProcess {
    start_sipp_with("lb_uac_calls.xml", cluster, calls, rate, pause_ms)
}

/// [`start_sipp`] with another scenario of the same shape (`-d` its pause).
fn start_sipp_with(
    name: &str,
    cluster: &Cluster,
    calls: u32,
    rate: u32,
    pause_ms: u32,
) -> SippProcess {
    SippProcess::spawn_with(|files| {
        let mut command = sipp();
        command
            .arg("-sf")
            .arg(scenario(name))
            .arg("-inf")
            .arg(&cluster.csv)
            .args(["-i", "127.0.0.1", "-nostdin"])
            .args(["-m", &calls.to_string(), "-r", &rate.to_string()])
            .args(["-l", &calls.to_string(), "-d", &pause_ms.to_string()])
            .args(["-timeout", "120s", "-timeout_error"])
            // Every wait for a message is bounded, the optional provisional ones too: a call
            // whose node died after its 180 (an early dialog not replicated) fails after 10 s
            // instead of holding SIPp until its global timeout.
            .args(["-recv_timeout", "10000"])
            .args(["-p", &free_udp_port().unwrap().to_string()])
            .args(["-trace_err", "-error_file"])
            .arg(files.error_file())
            .arg(cluster.balancer.sip.to_string());
        command
    })
}

/// Waits up to 150 s for the SIPp run to end; what it reported.
fn finish(run: SippProcess) -> SippResult {
    let outcome = run.wait(Duration::from_secs(150));
    let screen = last_scenario_screen(&outcome.output);
    SippResult {
        aborted: aborted_calls(&outcome.errors),
        ok: outcome.successful,
        failed: outcome.failed,
        invite_retransmissions: retransmissions(&screen, "INVITE ---"),
        bye_retransmissions: retransmissions(&screen, "BYE ---"),
        report: format!(
            "{}\nSIPp's scenario screen:\n{screen}\nSIPp's errors (tail):\n{}",
            outcome.ending(),
            tail(&outcome.errors, 40)
        ),
    }
}

/// The last scenario screen SIPp printed (the message table).
fn last_scenario_screen(output: &str) -> String {
    let lines: Vec<&str> = output.lines().collect();
    let Some(start) = lines
        .iter()
        .rposition(|l| l.contains("Messages") && l.contains("Retrans"))
    else {
        return output.to_string();
    };
    lines[start..]
        .iter()
        .take_while(|l| {
            !l.trim_start()
                .starts_with("------------------------------ Test Terminated")
        })
        .take(30)
        .copied()
        .collect::<Vec<_>>()
        .join("\n")
}

/// The Retrans column of the row whose message starts with `row` (e.g. `INVITE ---`).
fn retransmissions(screen: &str, row: &str) -> u64 {
    screen
        .lines()
        .find(|l| l.trim_start().starts_with(row))
        .and_then(|l| {
            let numbers: Vec<u64> = l
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            numbers.get(1).copied()
        })
        .unwrap_or(0)
}

/// The calls SIPp aborted, counted by status and the scenario step it answered (1 to 4: the
/// INVITE, 8: the BYE).
fn failure_kinds(result: &SippResult) -> BTreeMap<String, u64> {
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for c in &result.aborted {
        let step = c.step.map_or("?".to_string(), |s| s.to_string());
        *kinds
            .entry(format!("{} at step {step}", c.kind))
            .or_default() += 1;
    }
    kinds
}

/// The call records of the nodes, once every call SIPp completed has one (bounded wait): one
/// record per completed call across the nodes (the end record is written by the node that
/// owned the call at its end, exactly once, takeovers included), each ended by SIPp's BYE.
fn assert_one_record_per_call(cluster: &Cluster, result: &SippResult, figures: &str) {
    let deadline = Instant::now() + T;
    let records = loop {
        let records: Vec<Value> = cluster
            .nodes
            .iter()
            .flatten()
            .flat_map(|n| call_records(&n.data_dir()))
            .filter(|r| r["direction"] == "incoming" && r["answer"].is_string())
            .collect();
        if records.len() as u64 >= result.ok || Instant::now() > deadline {
            break records;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut per_call: BTreeMap<String, u32> = BTreeMap::new();
    for r in &records {
        *per_call
            .entry(r["call_id"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let twice: Vec<&String> = per_call
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(c, _)| c)
        .collect();
    assert!(
        twice.is_empty(),
        "calls with two end records: {twice:?}\n{figures}"
    );
    assert_eq!(
        records.len() as u64,
        result.ok,
        "one end record per completed call\n{figures}"
    );
    assert!(
        records.iter().all(|r| r["end_reason"] == "remote_hangup"),
        "{:?}",
        records.iter().find(|r| r["end_reason"] != "remote_hangup")
    );
}

/// The balancer's split-brain watch: (dialogs moved to another node, acts of a node in a
/// dialog another node had taken over since).
fn split_brain(cluster: &Cluster) -> (f64, f64) {
    let m = |name: &str| cluster.balancer.metric(name).unwrap_or(f64::NAN);
    (
        m("thalamus_balancer_dialogs_moved_total"),
        m("thalamus_balancer_dialogs_acted_on_by_two_nodes_total"),
    )
}

/// Every call of the run ended, no BYE of SIPp (step 8) failed (no confirmed dialog was lost),
/// and at most `max_failed` calls failed.
fn assert_run(cluster: &Cluster, result: &SippResult, calls: u32, max_failed: u64, figures: &str) {
    assert_eq!(
        result.ok + result.failed,
        u64::from(calls),
        "{}",
        result.report
    );
    assert!(
        !result.aborted.iter().any(|c| c.step == Some(8)),
        "a BYE failed: {figures}\n{}\n{}",
        result.report,
        cluster.logs()
    );
    assert!(
        result.failed <= max_failed,
        "{figures}\n{}\n{}",
        result.report,
        cluster.logs()
    );
}

/// The calls of the run that go to `node`'s devices, counting the injection file in order.
fn calls_to(cluster: &Cluster, calls: u32, node: &str) -> u64 {
    (0..calls as usize)
        .filter(|i| cluster.owners[&cluster.devices[i % cluster.devices.len()]] == node)
        .count() as u64
}

#[test]
fn the_fleet_splits_within_10_percent_of_even_between_the_two_nodes() {
    // The hash alone: the devices' owners among the two nodes (the end-to-end tests below
    // check that the calls follow it).
    let owners = owners(&device_ids(), &NODE_IDS[..2]);
    let on_a = owners
        .values()
        .filter(|o| o.as_str() == NODE_IDS[0])
        .count();
    let share = on_a as f64 / f64::from(devices_count());
    assert!(
        (share - 0.5).abs() <= 0.05,
        "{on_a} of {} devices on {}",
        devices_count(),
        NODE_IDS[0]
    );
}

/// Every one of `calls` SIPp calls succeeded (the report and the nodes' logs otherwise).
fn assert_every_call_succeeded(cluster: &Cluster, result: &SippResult, calls: u32) {
    assert_eq!(
        (result.ok, result.failed),
        (u64::from(calls), 0),
        "{}\n{}",
        result.report,
        cluster.logs()
    );
}

/// 1,000 calls to 100 devices through the balancer split between the nodes by the device-id
/// hash, within 10 % of even.
#[test]
fn a_thousand_calls_split_by_the_device_hash() {
    let _serial = serial();
    let cluster = Cluster::start();
    const CALLS: u32 = 1_000;
    let run = start_sipp(&cluster, CALLS, 100, 200);
    let result = finish(run);
    assert_every_call_succeeded(&cluster, &result, CALLS);
    let expected = [
        calls_to(&cluster, CALLS, NODE_IDS[0]),
        calls_to(&cluster, CALLS, NODE_IDS[1]),
    ];
    let got = [cluster.incoming(0), cluster.incoming(1)];
    println!(
        "split: {CALLS} calls, {} on {} and {} on {} (owner() says {} and {})",
        got[0], NODE_IDS[0], got[1], NODE_IDS[1], expected[0], expected[1]
    );
    assert_eq!(got, expected, "incoming calls per node against owner()");
    for n in got {
        assert!(
            n.abs_diff(u64::from(CALLS / 2)) <= u64::from(CALLS / 20),
            "a node took {n} of {CALLS} calls: not within 10 % of even"
        );
    }
    // The devices saw the same: each call on the node that owns the device.
    let calls = cluster.fleet.calls();
    assert_eq!(calls.len() as u64, u64::from(CALLS));
    assert!(calls.iter().all(|c| cluster.owners[&c.device] == c.node));
    // B's devices came to B by redirect from A (each device got at most the redirects A sent).
    let redirected = cluster.node(0).metric(REDIRECTED).unwrap() as usize;
    let seen = cluster
        .fleet
        .events()
        .iter()
        .filter(|e| {
            e.kind
                == FleetEventKind::Redirected {
                    from: NODE_IDS[0].to_string(),
                    to: NODE_IDS[1].to_string(),
                }
        })
        .count();
    assert!(
        seen > 0 && seen <= redirected,
        "the devices saw {seen} redirects from {}, which counted {redirected}",
        NODE_IDS[0]
    );
}

/// For each of `devices`, the time from `since` to its first login at `node` (ms), sorted;
/// every device must have one.
fn login_delays(
    events: &[thalamus_tests::fleet::FleetEvent],
    devices: &[String],
    since: Instant,
    node: &str,
) -> Vec<u128> {
    let mut delays: Vec<u128> = devices
        .iter()
        .filter_map(|d| {
            events
                .iter()
                .filter(|e| e.at > since && e.device == *d)
                .find(|e| matches!(&e.kind, FleetEventKind::Login { node: n } if n == node))
                .map(|e| (e.at - since).as_millis())
        })
        .collect();
    delays.sort_unstable();
    assert_eq!(
        delays.len(),
        devices.len(),
        "not every device logged in at {node}"
    );
    delays
}

/// A node killed mid-run: its devices' calls go to the survivor after the detection window;
/// the failed calls stay within the window times the call rate, and all are calls to the dead
/// node's devices. (An INVITE sent to the dead node is retransmitted by SIPp; once the
/// balancer took the node out the retransmission reaches the survivor, where it waits for its
/// device to log in, so in practice no call fails.) Then the node restarts (a new session
/// id): the balancer counts the restart and routes to it again, and its devices move back.
#[test]
fn a_killed_node_s_devices_go_to_the_survivor_and_a_restart_is_detected() {
    let _serial = serial();
    let mut cluster = Cluster::start();
    let calls_total = chaos("CALLS", 1_000);
    let rate = chaos("RATE", 50);
    let hold_ms = chaos("HOLD_MS", 200);
    let (a, b) = (NODE_IDS[0], NODE_IDS[1]);
    let b_devices = cluster.devices_of(b);
    let session_before = cluster.balancer.node(b)["session"].clone();
    assert!(session_before.is_string(), "{session_before}");

    let run = start_sipp(&cluster, calls_total, rate, hold_ms);
    let sipp_started = run.started();
    std::thread::sleep(Duration::from_secs(8));
    let b_incoming_before = cluster.incoming(1);
    let killed_unix = unix_now();
    let killed_at = Instant::now();
    let b_dir = cluster.nodes[1].take().unwrap().kill();
    let detection = cluster.balancer.wait_eligible(b, false);
    if let Err(e) =
        cluster
            .fleet
            .wait_placement(Duration::from_secs(15), "moved to the survivor", |p| {
                b_devices
                    .iter()
                    .all(|d| p.get(d).and_then(|n| n.as_deref()) == Some(a))
            })
    {
        panic!("{e:#}\n{}", cluster.logs());
    }
    // When each of B's devices logged in at A.
    let events = cluster.fleet.events();
    let move_ms = login_delays(&events, &b_devices, killed_at, a);
    let moved_all = Duration::from_millis(*move_ms.last().unwrap() as u64);
    let result = finish(run);

    // No call reached B after its death (the fleet's own check), and the calls to B's devices
    // placed after they all moved (with a second to spare) were all answered on A: call i
    // leaves no earlier than i / rate after SIPp started.
    let calls = cluster.fleet.calls();
    assert!(!calls.iter().any(|c| c.at > killed_at && c.node == b));
    let to_b_devices_on_a = calls
        .iter()
        .filter(|c| c.at > killed_at && c.node == a && b_devices.contains(&c.device))
        .count() as u64;
    let settled = killed_at + moved_all + Duration::from_secs(1) - sipp_started;
    let first_late = (settled.as_secs_f64() * f64::from(rate)).ceil() as usize;
    let late_to_b = (first_late..calls_total as usize)
        .filter(|i| b_devices.contains(&cluster.devices[i % cluster.devices.len()]))
        .count() as u64;
    assert!(late_to_b > 0, "the run ended before B's devices moved");

    let bound = WINDOW_MS * u64::from(rate) / 1000;
    // By status and the scenario step it answered (1 to 4: the INVITE, 8: the BYE).
    let kinds = failure_kinds(&result);
    let last_failure_ms = result
        .aborted
        .iter()
        .map(|c| ((c.at_unix - killed_unix) * 1000.0) as i64)
        .max()
        .unwrap_or(0);
    let figures = format!(
        "kill: {calls_total} calls at {rate}/s through the balancer; {b} (SIGKILL) after it took \
         {b_incoming_before} calls; the balancer took it out {} ms after the kill (window \
         {WINDOW_MS} ms); its {} devices logged in at {a} {}..{} ms after the kill (median {}); \
         failed calls {} of {calls_total} ({kinds:?}, the last {last_failure_ms} ms after the kill), \
         bound window x rate = {bound}; INVITE retransmissions \
         {}, BYE retransmissions {}; {to_b_devices_on_a} calls to {b}'s devices answered on {a}",
        detection.as_millis(),
        b_devices.len(),
        move_ms[0],
        moved_all.as_millis(),
        move_ms[move_ms.len() / 2],
        result.failed,
        result.invite_retransmissions,
        result.bye_retransmissions,
    );
    println!("{figures}");
    assert_run(&cluster, &result, calls_total, bound, &figures);
    // Only B's devices lost calls: each failure SIPp logged is a call to one of them.
    assert_eq!(
        result.aborted.len() as u64,
        result.failed,
        "{}",
        result.report
    );
    for c in &result.aborted {
        let device = c.device.as_deref().unwrap_or("?");
        assert!(
            b_devices.iter().any(|d| d == device),
            "a call to {device} ({}) failed: {figures}\n{device}'s events after the kill: \
             {:?}\n{}",
            c.kind,
            cluster
                .fleet
                .events()
                .iter()
                .filter(|e| e.device == device && e.at > killed_at)
                .map(|e| format!("+{} ms {:?}", (e.at - killed_at).as_millis(), e.kind))
                .collect::<Vec<_>>(),
            result.report
        );
    }
    assert!(
        to_b_devices_on_a >= late_to_b,
        "{figures}: only {to_b_devices_on_a} calls to B's devices on {a}, at least {late_to_b} \
         expected\n{}",
        result.report
    );

    // B restarts in its data directory (same certificate and QUIC port): a new session id.
    let quic = cluster.quic[1];
    let extra = cluster.extra(1);
    let restarted = Gateway::start_in(b_dir, &quic.to_string(), &extra).unwrap();
    cluster.fleet.set_node(fleet_node(b, &restarted));
    cluster.nodes[1] = Some(restarted);
    cluster.balancer.wait_eligible(b, true);
    let entry = cluster.balancer.node(b);
    assert!(entry["restarts"].as_u64().unwrap_or(0) >= 1, "{entry}");
    assert_ne!(entry["session"], session_before, "{entry}");
    assert_eq!(entry["state"], "up", "{entry}");
    // The survivor sees the restarted node too: it moves B's devices back to it.
    let back = cluster
        .fleet
        .wait_on(&cluster.owners, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
    println!(
        "restart: {b} back with session {} (was {session_before}), restarts {}; its devices \
         back on it {} ms after it was eligible again",
        entry["session"],
        entry["restarts"],
        back.as_millis()
    );
}

/// A draining node takes no new calls, its calls in progress complete, and its devices move to
/// the other node (the node says `Goodbye{draining}` to each once it has no call, and
/// redirects it when it logs in again).
#[test]
fn a_draining_node_takes_no_new_calls_and_its_calls_complete() {
    let _serial = serial();
    let cluster = Cluster::start();
    const CALLS: u32 = 200;
    const RATE: u32 = 20;
    let (a, b) = (NODE_IDS[0], NODE_IDS[1]);
    let b_devices = cluster.devices_of(b);
    let run = start_sipp(&cluster, CALLS, RATE, 3_000);
    std::thread::sleep(Duration::from_secs(4));

    let (status, body) = http_request(cluster.node(1).admin, "POST", "/drain").unwrap();
    assert_eq!(status, 200, "{body}");
    let drained_at = Instant::now();
    let state: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state["draining"], true, "{body}");
    let b_active_at_drain = cluster.node(1).metric(ACTIVE).unwrap();
    let taken_out = cluster.balancer.wait_eligible(b, false);
    let entry = cluster.balancer.node(b);
    assert_eq!(entry["state"], "up", "{entry}");
    assert_eq!(entry["draining"], true, "{entry}");
    // INVITEs the balancer forwarded before it saw the flag are on their way: let them land.
    std::thread::sleep(Duration::from_millis(300));
    let b_incoming_at_drain = cluster.incoming(1);
    let cutoff = Instant::now();

    let result = finish(run);
    // Nothing failed: the calls B had in progress completed there, and a new call to one of
    // B's idle devices while the device moves (the balancer sends it to A at once; the device
    // gets its goodbye at B's next ownership sweep, logs in at B again, is redirected and logs
    // in at A) waits at A for the device to arrive (`session.arrival_wait_ms`).
    assert_every_call_succeeded(&cluster, &result, CALLS);
    // B took no new call.
    assert!(b_active_at_drain >= 1.0, "B had no call in progress");
    assert_eq!(cluster.incoming(1), b_incoming_at_drain);
    cluster.node(1).wait_metric(ACTIVE, 0.0, T).unwrap();
    let calls = cluster.fleet.calls();
    let late: Vec<_> = calls.iter().filter(|c| c.at > cutoff).collect();
    assert!(
        late.iter().all(|c| c.node == a),
        "calls answered on {b} after the drain: {:?}",
        late.iter().filter(|c| c.node == b).collect::<Vec<_>>()
    );
    let late_to_b_devices = late
        .iter()
        .filter(|c| b_devices.contains(&c.device))
        .count();
    assert!(
        late_to_b_devices > 0,
        "no call to B's devices after the drain"
    );

    // Every device is on A; B told each of its devices goodbye (draining) and redirected it.
    let moved = cluster
        .fleet
        .wait_placement(T, "all moved to A", |p| {
            p.values().all(|n| n.as_deref() == Some(a))
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
    let events = cluster.fleet.events();
    for d in &b_devices {
        assert!(
            events.iter().any(|e| e.device == *d
                && e.at > drained_at
                && e.kind
                    == FleetEventKind::Goodbye {
                        node: b.to_string(),
                        reason: GOODBYE_DRAINING
                    }),
            "{d} got no Goodbye(draining) from {b}"
        );
    }
    let redirected_by_b = cluster.node(1).metric(REDIRECTED).unwrap() as usize;
    assert!(
        redirected_by_b >= b_devices.len(),
        "{b} redirected {redirected_by_b}"
    );
    cluster
        .node(1)
        .wait_metric("thalamus_device_sessions_live", 0.0, T)
        .unwrap();
    let move_ms = login_delays(&events, &b_devices, drained_at, a);
    println!(
        "drain: {CALLS} calls of 3 s at {RATE}/s; {b} drained with {b_active_at_drain} calls in \
         progress, all completed; the balancer saw it {} ms after POST /drain; {b} took no new \
         call; its {} devices logged in at {a} {}..{} ms after the drain (median {}; those with \
         a call after it ended), {} redirected by {b}; failed calls: {} of {CALLS}; calls that \
         waited at {a} for their device: {}; {late_to_b_devices} later calls to them answered on {a}; all \
         devices on {a} {} ms after the run",
        taken_out.as_millis(),
        b_devices.len(),
        move_ms[0],
        move_ms[move_ms.len() - 1],
        move_ms[move_ms.len() / 2],
        redirected_by_b,
        result.failed,
        cluster
            .node(0)
            .metric("thalamus_device_arrival_waits_total{reason=\"arrived\"}")
            .unwrap(),
        moved.as_millis()
    );

    // DELETE /drain: B takes calls again.
    let (status, body) = http_request(cluster.node(1).admin, "DELETE", "/drain").unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_request(cluster.node(1).admin, "GET", "/drain").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["draining"],
        false
    );
    cluster.balancer.wait_eligible(b, true);
}

/// SIGTERMs a node and waits (bounded) for it to drain and exit; its exit code, how long it
/// took, and its data directory for the restart.
fn stop_gracefully(gw: Gateway) -> (Option<i32>, Duration, tempfile::TempDir, String) {
    let mut gw = gw;
    let asked = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &gw.proc.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let code = gw.proc.wait_exit(Duration::from_secs(60)).unwrap();
    let took = asked.elapsed();
    let log = gw.log();
    let dir = std::mem::replace(&mut gw.dir, tempfile::tempdir().unwrap());
    (code, took, dir, log)
}

/// A rolling upgrade under load (issue 21): three nodes behind the balancer, SIPp calling the
/// devices through it (3-second calls at 20 per second), and ten devices placing calls of their
/// own (held 1 s) to a SIP buddy. Each node in turn gets SIGTERM: it drains (the balancer sends
/// it no new calls, devices' dials there are refused and placed again from the node they move
/// to, its calls in progress complete, its devices move), exits 0, starts again on its data
/// directory, and takes its devices back. No SIPp call and no device call fails.
#[test]
fn a_rolling_restart_under_load_fails_no_call() {
    let _serial = serial();
    let (_buddy, buddy_port) = Sim::buddy(&[], T).unwrap();
    let target = format!("sip:bob@127.0.0.1:{buddy_port}");
    const DIALERS: usize = 10;
    let mut cluster = Cluster::start_with(3, |secret| FleetConfig {
        dial: Some(DialPlan {
            devices: DIALERS,
            target,
            hold: Duration::from_secs(1),
            pause: Duration::from_millis(300),
        }),
        ..FleetConfig::quick(secret)
    });
    const CALLS: u32 = 800;
    const RATE: u32 = 20;
    let run = start_sipp(&cluster, CALLS, RATE, 3_000);
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    let mut figures = Vec::new();
    for (i, id) in NODE_IDS.iter().copied().enumerate() {
        let gw = cluster.nodes[i].take().unwrap();
        let active = gw.metric(ACTIVE).unwrap_or(0.0);
        let (code, drained_in, dir, log) = stop_gracefully(gw);
        assert_eq!(code, Some(0), "{id} did not exit 0:\n{}", tail(&log, 40));
        assert!(log.contains("drained: no call left"), "{}", tail(&log, 40));
        let restarted =
            Gateway::start_in(dir, &cluster.quic[i].to_string(), &cluster.extra(i)).unwrap();
        cluster.nodes[i] = Some(restarted);
        let back = cluster.balancer.wait_eligible(id, true);
        // Its devices come back before the next node goes.
        if let Err(e) = cluster
            .fleet
            .wait_on(&cluster.owners, Duration::from_secs(30))
        {
            panic!("{e:#}\n{}", cluster.logs());
        }
        figures.push(format!(
            "{id}: {active} calls in progress at SIGTERM, drained and exited 0 in {} ms, eligible again {} ms after its restart",
            drained_in.as_millis(),
            back.as_millis()
        ));
    }
    let rolled = started.elapsed();
    let result = finish(run);
    assert_every_call_succeeded(&cluster, &result, CALLS);
    // Let the dialers' last calls end, then look at every call they placed.
    cluster.fleet.stop_dialing();
    let deadline = Instant::now() + T;
    while cluster.fleet.dials_in_progress() > 0 {
        assert!(Instant::now() < deadline, "device calls never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    let dials = cluster.fleet.dials();
    let completed = dials
        .iter()
        .filter(|d| d.outcome == DialOutcome::Completed)
        .count();
    let refused = dials
        .iter()
        .filter(|d| matches!(d.outcome, DialOutcome::Refused(_)))
        .count();
    let unanswered = dials
        .iter()
        .filter(|d| matches!(d.outcome, DialOutcome::Unanswered(_)))
        .count();
    let failed: Vec<_> = dials
        .iter()
        .filter(|d| matches!(d.outcome, DialOutcome::Failed(_)))
        .collect();
    let failed_list: Vec<String> = failed
        .iter()
        .map(|d| {
            format!(
                "{} on {} at +{} ms: {:?}",
                d.device,
                d.node,
                d.at.saturating_duration_since(started).as_millis(),
                d.outcome
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} device calls failed: {failed_list:#?}\nnodes: {figures:?}\n{}",
        failed.len(),
        cluster.logs()
    );
    assert!(
        completed >= DIALERS * 5,
        "only {completed} device calls completed: {dials:#?}"
    );
    // The nodes' call records: one per call, SIPp's all hung up by SIPp, the devices' all hung
    // up by the device. A dial left unanswered when its node said goodbye made no call (it
    // would have a record ending otherwise).
    let deadline = Instant::now() + T;
    let (incoming, outgoing) = loop {
        let records: Vec<Value> = (0..3)
            .flat_map(|i| call_records(&cluster.node(i).data_dir()))
            .collect();
        let (incoming, outgoing): (Vec<Value>, Vec<Value>) = records
            .into_iter()
            .partition(|r| r["direction"] == "incoming");
        if (incoming.len() as u32 >= CALLS && outgoing.len() >= completed)
            || Instant::now() > deadline
        {
            break (incoming, outgoing);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(incoming.len() as u32, CALLS, "one record per SIPp call");
    assert!(
        incoming.iter().all(|r| r["end_reason"] == "remote_hangup"),
        "{:?}",
        incoming.iter().find(|r| r["end_reason"] != "remote_hangup")
    );
    assert_eq!(
        outgoing.len(),
        completed,
        "one record per device call, no other"
    );
    assert!(
        outgoing.iter().all(|r| r["end_reason"] == "local_hangup"),
        "{:?}",
        outgoing.iter().find(|r| r["end_reason"] != "local_hangup")
    );
    let on_every_node = NODE_IDS.iter().all(|n| {
        dials
            .iter()
            .any(|d| d.node == *n && d.outcome == DialOutcome::Completed)
    });
    assert!(on_every_node, "device calls did not run on every node");
    println!(
        "rolling restart of 3 nodes under load: SIPp {CALLS} calls of 3 s at {RATE}/s through \
         the balancer, {} ok, {} failed; {DIALERS} devices placed {} calls of 1 s, {completed} \
         completed, {} failed, {refused} dials refused by a draining node and {unanswered} left \
         unanswered by a node saying goodbye (no call made: the call records show none), each \
         placed again; one call record per call ({} incoming, {} outgoing); the three nodes \
         rolled in {:.1} s; {}",
        result.ok,
        result.failed,
        dials.len() - refused - unanswered,
        failed.len(),
        incoming.len(),
        outgoing.len(),
        rolled.as_secs_f64(),
        figures.join("; ")
    );
}

/// Sends `signal` (`STOP`, `CONT`) to a running node.
fn signal(gw: &Gateway, signal: &str) {
    thalamus_tests::signal_process(gw.proc.child.id(), signal);
}

/// A gray failure (issue 16): one of three nodes is frozen (SIGSTOP) for 4 s under load and
/// thawed (SIGCONT). The balancer takes it out, its devices move to the survivors, which take
/// their calls over once the frozen node left the live set; the thawed node finds it was out,
/// drains while it probes its sessions and drops the dialogs taken over elsewhere, and comes
/// back. No confirmed dialog is lost (no BYE of SIPp fails), every failed call is a call to a
/// device of the frozen node that was being set up around the freeze, and the thawed node
/// recovered.
#[test]
fn a_node_frozen_for_four_seconds_loses_no_confirmed_dialog() {
    let _serial = serial();
    let cluster = Cluster::start_with(3, FleetConfig::quick);
    let calls_total = chaos("CALLS", 1_200);
    let rate = chaos("RATE", 50);
    let hold_ms = chaos("HOLD_MS", 4_000);
    const FROZEN: Duration = Duration::from_secs(4);
    let frozen_id = NODE_IDS[1];
    let frozen_devices = cluster.devices_of(frozen_id);
    let run = start_sipp(&cluster, calls_total, rate, hold_ms);
    std::thread::sleep(Duration::from_secs(6));
    let frozen_unix = unix_now();
    signal(cluster.node(1), "STOP");
    std::thread::sleep(FROZEN);
    signal(cluster.node(1), "CONT");
    let thawed_at = Instant::now();
    // It checks its sessions and dialogs, then takes calls again.
    cluster.wait_until("the thawed node did not recover", || {
        cluster
            .node(1)
            .metric("thalamus_live_set_recoveries_total")
            .unwrap_or(0.0)
            >= 1.0
    });
    let recovered = thawed_at.elapsed();
    let back = cluster.balancer.wait_eligible(frozen_id, true);
    let result = finish(run);
    let kinds = failure_kinds(&result);
    let fenced = cluster
        .node(1)
        .metric("thalamus_write_ahead_total{reason=\"fenced\"}")
        .unwrap_or(0.0);
    let lost_here = cluster
        .node(1)
        .metric("thalamus_dialogs_lost_total")
        .unwrap_or(0.0);
    let (moved, twice) = split_brain(&cluster);
    let figures = format!(
        "freeze: {calls_total} calls of {} s at {rate}/s through the balancer to {} devices on 3 \
         nodes; {frozen_id} frozen (SIGSTOP) {} s into the run for {} s; it recovered {} ms \
         after the thaw and was eligible again {} ms after that; failed calls {} of {calls_total} \
         ({kinds:?}); the thawed node dropped {lost_here} dialogs taken over elsewhere and \
         held back {fenced} fenced requests; dialogs moved {moved}, acted on by two nodes \
         {twice}; INVITE retransmissions {}, BYE retransmissions {}",
        f64::from(hold_ms) / 1000.0,
        devices_count(),
        6,
        FROZEN.as_secs(),
        recovered.as_millis(),
        back.as_millis(),
        result.failed,
        result.invite_retransmissions,
        result.bye_retransmissions,
    );
    println!("{figures}");
    if let Some(dir) = cluster.dump() {
        let _ = std::fs::write(format!("{dir}/sipp.txt"), &result.report);
    }
    let failures: Vec<String> = result
        .aborted
        .iter()
        .map(|c| {
            format!(
                "{} {} at step {:?}, {:+.2} s after the freeze",
                c.device.as_deref().unwrap_or("?"),
                c.kind,
                c.step,
                c.at_unix - frozen_unix
            )
        })
        .collect();
    let figures = format!("{figures}\nfailures: {failures:#?}");
    // The issue's bound for a 4 s freeze is 30 of 6,000 calls at 200/s (0.5 %).
    assert_run(
        &cluster,
        &result,
        calls_total,
        u64::from(calls_total) / 200,
        &figures,
    );
    // Survivors took dialogs over, and the thawed node acted in none of them.
    assert!(moved > 0.0, "{figures}");
    assert_eq!(twice, 0.0, "{figures}");
    assert_one_record_per_call(&cluster, &result, &figures);
    // Every failure is a call to one of the frozen node's devices.
    for c in &result.aborted {
        let device = c.device.as_deref().unwrap_or("?");
        assert!(
            frozen_devices.iter().any(|d| d == device),
            "a call to {device} ({}) failed, {:.1} s after the freeze: {figures}\n{}",
            c.kind,
            c.at_unix - frozen_unix,
            result.report
        );
    }
}

/// A chaos scenario that touches no node: SIPp calls the fleet through the balancer while
/// `fault` runs 6 s into the run. No call may fail on its BYE (no confirmed dialog lost), at
/// most 0.5 % of the calls may fail at all, and the nodes stay eligible. Returns the figures.
fn survives_under_load(name: &str, fault: impl FnOnce(&mut Cluster) -> String) -> String {
    let mut cluster = Cluster::start_with(3, FleetConfig::quick);
    let calls_total = chaos("CALLS", 1_200);
    let rate = chaos("RATE", 50);
    let hold_ms = chaos("HOLD_MS", 3_000);
    let run = start_sipp(&cluster, calls_total, rate, hold_ms);
    std::thread::sleep(Duration::from_secs(6));
    let what = fault(&mut cluster);
    let result = finish(run);
    let kinds = failure_kinds(&result);
    let figures = format!(
        "{name}: {calls_total} calls of {} s at {rate}/s through the balancer to {} devices on 3 \
         nodes; {what}; failed calls {} of {calls_total} ({kinds:?}); INVITE retransmissions {}, \
         BYE retransmissions {}",
        f64::from(hold_ms) / 1000.0,
        devices_count(),
        result.failed,
        result.invite_retransmissions,
        result.bye_retransmissions,
    );
    println!("{figures}");
    assert_run(
        &cluster,
        &result,
        calls_total,
        u64::from(calls_total) / 200,
        &figures,
    );
    for id in NODE_IDS {
        cluster.balancer.wait_eligible(id, true);
    }
    figures
}

/// Chaos 3 (issue 16): the dialog store is frozen (SIGSTOP) for 3 s under load, then, later,
/// restarted empty (no persistence). Calls go on unreplicated while it is away; the nodes write
/// their records again when it is back; no call fails.
#[test]
fn the_store_frozen_then_restarted_empty_loses_no_call() {
    let _serial = serial();
    survives_under_load("store", |cluster| {
        let pid = cluster.redis.pid().to_string();
        let kill = |signal: &str| {
            assert!(Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success());
        };
        kill("-STOP");
        std::thread::sleep(Duration::from_secs(3));
        kill("-CONT");
        std::thread::sleep(Duration::from_secs(4));
        let port = cluster.redis.port;
        kill("-KILL");
        let restarted = Instant::now();
        let old = std::mem::replace(&mut cluster.redis, Redis::start_on(port).unwrap());
        drop(old);
        let up = restarted.elapsed();
        // The nodes write back the records of the calls they hold.
        cluster.wait_until("the store did not come back", || {
            cluster.node(0).metric("thalamus_store_up").unwrap_or(0.0) >= 1.0
        });
        format!(
            "Redis frozen (SIGSTOP) 6 s into the run for 3 s, then killed 4 s later and \
             restarted empty on its port ({} ms)",
            up.as_millis()
        )
    });
}

/// Chaos 4 (issue 16): the balancer is killed (SIGKILL) under load and started again on its
/// ports with an empty node table. It learns the nodes from their next heartbeats; until then
/// it drops what it cannot route (the senders retransmit) instead of answering 503.
#[test]
fn a_restarted_balancer_loses_no_call() {
    let _serial = serial();
    survives_under_load("balancer restart", |cluster| {
        let took = cluster
            .balancer
            .restart(HEARTBEAT_MS, MISS_COUNT, "warn")
            .unwrap();
        format!(
            "the balancer killed (SIGKILL) 6 s into the run and started again on its ports in {} \
             ms",
            took.as_millis()
        )
    });
}

/// Chaos 1, second half (issue 16): under one SIPp run, each of the three nodes is killed
/// (SIGKILL) in turn, restarted in its data directory and given its devices back before the
/// next one dies. Every node's death is a takeover of the calls it held, and every node takes
/// some over from the others; no confirmed dialog is lost (no BYE of SIPp fails) and the failed
/// calls stay within three detection windows times the call rate.
#[test]
fn each_node_killed_in_turn_loses_no_confirmed_dialog() {
    let _serial = serial();
    let mut cluster = Cluster::start_with(3, FleetConfig::quick);
    let calls_total = chaos("CALLS", 1_750);
    let rate = chaos("RATE", 50);
    // Half the 2 s between two calls to one device: a device that a survivor keeps for its
    // call goes back to its owner between two calls.
    let hold_ms = chaos("HOLD_MS", 1_000);
    let run = start_sipp(&cluster, calls_total, rate, hold_ms);
    let started = run.started();
    std::thread::sleep(Duration::from_secs(5));
    let mut kills = Vec::new();
    let mut last_kill = Duration::ZERO;
    for (i, id) in NODE_IDS.iter().enumerate() {
        let devices = cluster.devices_of(id);
        let killed_at = Instant::now();
        last_kill = killed_at - started;
        let dir = cluster.nodes[i].take().unwrap().kill();
        let detection = cluster.balancer.wait_eligible(id, false);
        let moved = cluster
            .fleet
            .wait_placement(Duration::from_secs(15), "left the dead node", |p| {
                devices.iter().all(|d| {
                    p.get(d)
                        .and_then(|n| n.as_deref())
                        .is_some_and(|n| n != *id)
                })
            })
            .unwrap_or_else(|e| panic!("{id}: {e:#}\n{}", cluster.logs()));
        let quic = cluster.quic[i];
        let extra = cluster.extra(i);
        let restarted = Gateway::start_in(dir, &quic.to_string(), &extra).unwrap();
        cluster.fleet.set_node(fleet_node(id, &restarted));
        cluster.nodes[i] = Some(restarted);
        cluster.balancer.wait_eligible(id, true);
        // Its devices come back as their calls end (a device with a call stays where it is):
        // most of them within seconds, under any load.
        let back = cluster
            .fleet
            .wait_placement(Duration::from_secs(30), "came back", |p| {
                let home = devices
                    .iter()
                    .filter(|d| p.get(*d).and_then(|n| n.as_deref()) == Some(*id))
                    .count();
                home * 5 >= devices.len() * 4
            })
            .unwrap_or_else(|e| panic!("{id} back: {e:#}\n{}", cluster.logs()));
        kills.push(format!(
            "{id} killed {:.1} s into the run: out after {} ms, its {} devices moved in {} ms, \
             restarted and 80 % of its devices back {} ms after it was eligible",
            last_kill.as_secs_f64(),
            detection.as_millis(),
            devices.len(),
            moved.as_millis(),
            back.as_millis()
        ));
        std::thread::sleep(Duration::from_secs(2));
    }
    // The last kill happened while SIPp was still placing calls.
    assert!(
        last_kill.as_secs_f64() < f64::from(calls_total) / f64::from(rate),
        "the run ended before the last kill ({kills:#?}): raise THALAMUS_CHAOS_CALLS"
    );
    let result = finish(run);
    let kinds = failure_kinds(&result);
    let taken_over: Vec<String> = NODE_IDS
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let n = cluster
                .node(i)
                .metric("thalamus_takeovers_total{reason=\"claimed\"}")
                .unwrap_or(0.0);
            format!("{id} {n}")
        })
        .collect();
    let bound = 3 * WINDOW_MS * u64::from(rate) / 1000;
    let (moved, twice) = split_brain(&cluster);
    let figures = format!(
        "kill in turn: {calls_total} calls of {} s at {rate}/s through the balancer to {} \
         devices on 3 nodes; {kills:#?}; failed calls {} of {calls_total} ({kinds:?}), bound \
         3 x window x rate = {bound}; takeovers since the last restart {taken_over:?}; the \
         balancer saw {moved} dialogs move, {twice} acted on by two nodes; INVITE \
         retransmissions {}, BYE retransmissions {}",
        f64::from(hold_ms) / 1000.0,
        devices_count(),
        result.failed,
        result.invite_retransmissions,
        result.bye_retransmissions,
    );
    println!("{figures}");
    if let Some(dir) = cluster.dump() {
        let _ = std::fs::write(format!("{dir}/sipp.txt"), &result.report);
    }
    assert_run(&cluster, &result, calls_total, bound, &figures);
    // Killed nodes act no more: every move is a takeover, none a second actor.
    assert!(moved > 0.0, "{figures}");
    assert_eq!(twice, 0.0, "{figures}");
}

/// Early-dialog failover (issue 16, `early-and-confirmed`): the devices let every call ring
/// for a while before they answer, and resume their sessions with their tokens when their node
/// dies. A node is killed while some 40 calls ring at its devices: each survivor that one of
/// those devices resumes on claims the call's early record, adopts the caller's INVITE
/// transaction (same To tag) and rings on; the device answers when its time comes and the
/// caller gets the 200 from the survivor. At least 95 % of the calls that were ringing on the
/// killed node complete (counting every failed call of the run against them), and no
/// confirmed dialog is lost.
#[test]
fn ringing_calls_of_a_killed_node_complete_on_the_survivors() {
    let _serial = serial();
    let ring_ms = chaos("RING_MS", 3_000);
    let mut cluster = Cluster::start_with_store(
        3,
        |secret| FleetConfig {
            answer_after: Duration::from_millis(u64::from(ring_ms)),
            resume: true,
            ..FleetConfig::quick(secret)
        },
        false,
        None,
        // SIPp's scenario takes no re-INVITE: a confirmed call that a resumed device brings
        // to a survivor keeps its media address there instead of moving it.
        "replication = \"early-and-confirmed\"\nreinvite_after_takeover = false\n",
    );
    let calls_total = chaos("CALLS", 800);
    let rate = chaos("RATE", 40);
    let hold_ms = chaos("HOLD_MS", 1_000);
    let run = start_sipp(&cluster, calls_total, rate, hold_ms);
    // Well into the run: every device has calls ringing now and then.
    std::thread::sleep(Duration::from_secs(8));
    let victim = 1;
    let id = NODE_IDS[victim];
    let devices = cluster.devices_of(id);
    let dead_dir = cluster.nodes[victim].take().unwrap().kill();
    let detection = cluster.balancer.wait_eligible(id, false);
    let moved = cluster
        .fleet
        .wait_placement(Duration::from_secs(15), "left the dead node", |p| {
            devices
                .iter()
                .all(|d| p.get(d).and_then(|n| n.as_deref()).is_some_and(|n| n != id))
        })
        .unwrap_or_else(|e| panic!("{id}: {e:#}\n{}", cluster.logs()));
    let result = finish(run);
    let kinds = failure_kinds(&result);
    let ringing = cluster.fleet.ringing_across_loss();
    // The end records: one per call, however many nodes it saw. The calls the survivors
    // continued name the dead node first; those adopted ringing were answered at least the
    // ring time after the start the dead node gave them.
    std::thread::sleep(Duration::from_secs(1));
    let records: Vec<Value> = cluster
        .nodes
        .iter()
        .flatten()
        .flat_map(|n| call_records(&n.data_dir()))
        .chain(call_records(&dead_dir.path().join("data")))
        .filter(|r| r["direction"] == "incoming")
        .collect();
    let mut per_call: BTreeMap<String, u32> = BTreeMap::new();
    for r in &records {
        *per_call
            .entry(r["call_id"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let two_records = per_call.values().filter(|n| **n > 1).count();
    let at_ms = |r: &Value, k: &str| {
        r[k].as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
    };
    let continued: Vec<&Value> = records
        .iter()
        .filter(|r| r["nodes"][0] == id && r["nodes"].as_array().is_some_and(|n| n.len() > 1))
        .collect();
    let rang_there = continued
        .iter()
        .filter(|r| {
            r["answer"].is_string()
                && r["end_reason"] == "remote_hangup"
                && at_ms(r, "answer") + 100 >= at_ms(r, "start") + u64::from(ring_ms)
        })
        .count() as u64;
    let adopted: f64 = [0, 2]
        .iter()
        .map(|&i| {
            cluster
                .node(i)
                .metric("thalamus_takeovers_total{reason=\"claimed_early\"}")
                .unwrap_or(0.0)
        })
        .sum();
    let (moved_dialogs, twice) = split_brain(&cluster);
    // The calls ringing at the dead node's devices when they lost it, and how many of them the
    // node reported answered afterwards (devices may lose a live node's session too: those
    // calls go on there). A call that failed before any 180 (step 2 or earlier: a new INVITE
    // that waited for a device still moving) never rang; every other failure is counted
    // against the ringing calls.
    let (rang_on_victim, answered_after) = ringing.by_node.get(id).copied().unwrap_or_default();
    let failed_ringing = result
        .aborted
        .iter()
        .filter(|c| c.step.is_none_or(|s| s > 2))
        .count() as u64;
    let completed = rang_on_victim.saturating_sub(failed_ringing);
    let figures = format!(
        "early-dialog failover: {calls_total} calls at {rate}/s ringing {} s then held {} s, {} \
         devices on 3 nodes; {id} killed: out after {} ms, its {} devices moved in {} ms; calls \
         ringing at its devices when they lost it {} ({} of them never heard of by the device), \
         listed as ringing on resume {}, answered there {}, answered on the survivor {}; ringing calls claimed by the survivors {adopted}; \
         failed calls of the run {} ({kinds:?}), {failed_ringing} of them after a 180; of the \
         {rang_on_victim} calls ringing on {id}, {answered_after} answered after its death and \
         at least {completed} completed ({} ringing across any loss); the balancer saw {moved_dialogs} dialogs move, {twice} acted on by two nodes",
        f64::from(ring_ms) / 1000.0,
        f64::from(hold_ms) / 1000.0,
        devices_count(),
        detection.as_millis(),
        devices.len(),
        moved.as_millis(),
        ringing.at_loss,
        ringing.unheard,
        ringing.listed_on_resume,
        ringing.answered,
        ringing.confirmed,
        result.failed,
        ringing.at_loss,
    );
    println!("{figures}");
    if let Some(dir) = cluster.dump() {
        let _ = std::fs::write(format!("{dir}/sipp.txt"), &result.report);
    }
    // The scenario did what it is for: calls were ringing on the node when it died.
    assert!(rang_on_victim >= 10, "{figures}\n{}", cluster.logs());
    // At least 95 % of them complete: answered on a survivor, and every failed call after a
    // 180 counted against them.
    assert!(
        answered_after * 100 >= rang_on_victim * 95,
        "{figures}\n{}\n{}",
        result.report,
        cluster.logs()
    );
    assert!(
        completed * 100 >= rang_on_victim * 95,
        "{figures}\n{}",
        result.report
    );
    // The survivors adopted them (a call answered by the dying node, its record written
    // before its 200, is taken over as answered instead).
    assert!(adopted * 100.0 >= (rang_on_victim * 90) as f64, "{figures}");
    assert_eq!(two_records, 0, "calls with two end records\n{figures}");
    assert!(
        rang_there * 100 >= answered_after * 90,
        "end records of the adopted calls: {rang_there} of {answered_after} ({continued:#?})\n{figures}"
    );
    // Besides, calls set up while the node's devices move may fail (as in the kill test: at
    // most three detection windows at the rate).
    let bound = rang_on_victim / 20 + 3 * WINDOW_MS * u64::from(rate) / 1000;
    assert_run(&cluster, &result, calls_total, bound, &figures);
    assert_eq!(twice, 0.0, "{figures}");
}

/// Early-dialog failover, the caller's side (issue 16): callers give up after their call rang
/// 3 s. A node is killed while calls ring at its devices, whose devices log in afresh
/// elsewhere (no resume: nobody continues those calls from the device's side). The callers'
/// CANCELs reach the survivors, which hold no INVITE for them: each finds the call's early
/// record, claims it, adopts the INVITE and cancels it (200 to the CANCEL, 487 to the
/// INVITE), as the node that died would have. Every call of the run completes as the
/// scenario expects.
#[test]
fn a_caller_s_cancel_ends_a_ringing_call_whose_node_died() {
    let _serial = serial();
    let mut cluster = Cluster::start_with_store(
        3,
        |secret| FleetConfig {
            answer_after: Duration::from_secs(3600),
            ..FleetConfig::quick(secret)
        },
        false,
        None,
        "replication = \"early-and-confirmed\"\n",
    );
    let calls_total = chaos("CALLS", 600);
    let rate = chaos("RATE", 40);
    let ring_ms = chaos("RING_MS", 3_000);
    let run = start_sipp_with("lb_uac_cancel.xml", &cluster, calls_total, rate, ring_ms);
    std::thread::sleep(Duration::from_secs(6));
    let victim = 1;
    let id = NODE_IDS[victim];
    let ringing_at_kill = cluster
        .node(victim)
        .metric("thalamus_calls_active")
        .unwrap_or(0.0);
    let _dir = cluster.nodes[victim].take().unwrap().kill();
    let detection = cluster.balancer.wait_eligible(id, false);
    let result = finish(run);
    let kinds = failure_kinds(&result);
    let adopted: f64 = [0, 2]
        .iter()
        .map(|&i| {
            cluster
                .node(i)
                .metric("thalamus_takeovers_total{reason=\"claimed_early\"}")
                .unwrap_or(0.0)
        })
        .sum();
    let figures = format!(
        "cancel after a node death: {calls_total} calls at {rate}/s cancelled after ringing {} \
         s, {} devices on 3 nodes; {id} killed with {ringing_at_kill} calls ringing: out after {} \
         ms; ringing calls the survivors adopted to cancel them {adopted}; failed calls {} \
         ({kinds:?})",
        f64::from(ring_ms) / 1000.0,
        devices_count(),
        detection.as_millis(),
        result.failed,
    );
    println!("{figures}");
    if let Some(dir) = cluster.dump() {
        let _ = std::fs::write(format!("{dir}/sipp.txt"), &result.report);
    }
    assert!(ringing_at_kill >= 10.0, "{figures}");
    // The survivors cancelled at least 95 % of the calls ringing on the dead node.
    assert!(
        adopted * 100.0 >= ringing_at_kill * 95.0,
        "{figures}\n{}",
        cluster.logs()
    );
    assert_eq!(
        result.ok + result.failed,
        u64::from(calls_total),
        "{}",
        result.report
    );
    assert!(
        result.failed * 20 <= ringing_at_kill as u64,
        "{figures}\n{}\n{}",
        result.report,
        cluster.logs()
    );
}

/// Chaos 3, the store's own failover (issue 16): the store is a Redis master with a replica
/// and a sentinel. Under load the master is killed (SIGKILL); the sentinel promotes the
/// replica and the nodes follow it, writing the records of their calls again (the promoted
/// replica may lack the last writes: replication is asynchronous). Then a node is killed: the
/// survivors take its calls over from the promoted replica's records. No confirmed dialog is
/// lost, and the failed calls stay within the node's detection window times the rate plus the
/// 0.5 % the other scenarios allow.
#[test]
fn a_store_failover_then_a_node_death_loses_no_confirmed_dialog() {
    let _serial = serial();
    let mut cluster = Cluster::start_with_store(3, FleetConfig::quick, true, None, "");
    let calls_total = chaos("CALLS", 1_250);
    let rate = chaos("RATE", 50);
    let hold_ms = chaos("HOLD_MS", 4_000);
    let (master_port, replica_port, sentinel_port) = {
        let (replica, sentinel) = cluster.sentinel.as_ref().unwrap();
        (cluster.redis.port, replica.port, sentinel.port)
    };
    let sentinel = |c: &Cluster| {
        c.sentinel
            .as_ref()
            .unwrap()
            .1
            .sentinel_master_port(SENTINEL_MASTER)
    };
    assert_eq!(sentinel(&cluster), Some(master_port));
    let run = start_sipp(&cluster, calls_total, rate, hold_ms);
    std::thread::sleep(Duration::from_secs(6));
    let killed_at = Instant::now();
    assert!(Command::new("kill")
        .args(["-KILL", &cluster.redis.pid().to_string()])
        .status()
        .unwrap()
        .success());
    cluster.wait_until(
        &format!("sentinel {sentinel_port} did not promote the replica"),
        || sentinel(&cluster) == Some(replica_port),
    );
    let promoted = killed_at.elapsed();
    // Every node writes its records to the new master (it noticed the outage, or the new
    // instance).
    for (i, id) in NODE_IDS.iter().enumerate() {
        let node = cluster.node(i);
        cluster.wait_until(
            &format!("{id} did not write its records to the new master"),
            || {
                node.metric("thalamus_store_up").unwrap_or(0.0) >= 1.0
                    && node
                        .log()
                        .contains("records of the calls held here written again")
            },
        );
    }
    let rewritten = killed_at.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let victim = NODE_IDS[1];
    let node_killed_at = Instant::now();
    let _dir = cluster.nodes[1].take().unwrap().kill();
    let detection = cluster.balancer.wait_eligible(victim, false);
    let result = finish(run);
    let kinds = failure_kinds(&result);
    let takeovers: f64 = [0, 2]
        .iter()
        .map(|&i| {
            cluster
                .node(i)
                .metric("thalamus_takeovers_total{reason=\"claimed\"}")
                .unwrap_or(0.0)
        })
        .sum();
    let bound = WINDOW_MS * u64::from(rate) / 1000 + u64::from(calls_total) / 200;
    let figures = format!(
        "store failover: {calls_total} calls of {} s at {rate}/s through the balancer to {} \
         devices on 3 nodes; the Redis master killed (SIGKILL) 6 s into the run, the sentinel \
         promoted the replica {} ms later, every node had written its records to it {} ms after \
         the kill; then {victim} killed {} ms after that, out after {} ms; the survivors took \
         {takeovers} dialogs over; failed calls {} of {calls_total} ({kinds:?}), bound {bound}; \
         INVITE retransmissions {}, BYE retransmissions {}",
        f64::from(hold_ms) / 1000.0,
        devices_count(),
        promoted.as_millis(),
        rewritten.as_millis(),
        (node_killed_at - killed_at - rewritten).as_millis(),
        detection.as_millis(),
        result.failed,
        result.invite_retransmissions,
        result.bye_retransmissions,
    );
    println!("{figures}");
    assert_run(&cluster, &result, calls_total, bound, &figures);
    assert!(
        takeovers >= 1.0,
        "no dialog of {victim} was taken over: {figures}"
    );
}

/// Chaos 5 (issue 16): a node cut off from the dialog store but not from SIP or its devices.
/// The second node runs in its own network namespace with two links to the world where
/// everything else runs (the test itself included); under load its link to Redis is taken
/// down for 8 s (longer than its owner lease) and brought up again. The node goes on with its
/// calls unreplicated while it cannot confirm its lease (fenced: it sends no request that needs
/// a write ahead); 2 s after it noticed (`step_aside_after_ms` in [`PARTITION_COMMON`]), since
/// the other nodes reach the store, it steps aside: it drains, its devices move to the others
/// and their calls are set up there, replicated. When the store answers again it writes its
/// records again and takes calls again. No confirmed dialog is lost, no dialog is acted on by
/// two nodes, and the failed calls stay within 0.5 %.
#[test]
fn a_node_cut_off_from_the_store_steps_aside_and_loses_no_confirmed_dialog() {
    let _serial = serial();
    let ns = Netns::create().unwrap_or_else(|e| {
        panic!("{e:#}: this test makes network namespaces (it needs root and iproute2)")
    });
    ns.enter_world().unwrap();
    let cluster =
        Cluster::start_with_store(3, FleetConfig::quick, false, Some(&ns), "confirmed-dialog");
    let calls_total = chaos("CALLS", 1_200);
    let rate = chaos("RATE", 50);
    let hold_ms = chaos("HOLD_MS", 1_000);
    const CUT: Duration = Duration::from_secs(8);
    let cut_id = NODE_IDS[1];
    let cut_devices = cluster.devices_of(cut_id);
    let run = start_sipp(&cluster, calls_total, rate, hold_ms);
    std::thread::sleep(Duration::from_secs(6));
    ns.store_link(false).unwrap();
    let cut_at = Instant::now();
    // The node notices (its probe of the store fails), then steps aside: the balancer sees it
    // draining, and its devices move to the other nodes.
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        cluster.wait_until(&format!("{cut_id} {what}"), done);
        cut_at.elapsed()
    };
    let noticed = wait("never noticed it lost the store", &|| {
        cluster.node(1).metric("thalamus_store_up").unwrap_or(1.0) == 0.0
    });
    let stepped = wait("never stepped aside", &|| {
        cluster.balancer.node(cut_id)["draining"] == true
    });
    let calls_at_step = cluster.incoming(1);
    let moved = wait("kept its devices", &|| {
        let placement = cluster.fleet.placement();
        cut_devices
            .iter()
            .all(|d| placement.get(d).and_then(|n| n.as_deref()) != Some(cut_id))
    });
    cluster.dump();
    assert!(
        moved < CUT,
        "{cut_id}'s devices took {moved:?} to move, longer than the cut"
    );
    std::thread::sleep(CUT.saturating_sub(cut_at.elapsed()));
    let calls_after_step = cluster.incoming(1) - calls_at_step;
    ns.store_link(true).unwrap();
    let healed_at = Instant::now();
    cluster.wait_until(&format!("{cut_id} did not reach the store again"), || {
        cluster.node(1).metric("thalamus_store_up").unwrap_or(0.0) >= 1.0
    });
    let back = healed_at.elapsed();
    let eligible = cluster.balancer.wait_eligible(cut_id, true);
    let result = finish(run);
    let kinds = failure_kinds(&result);
    let metric = |i: usize, name: &str| cluster.node(i).metric(name).unwrap_or(0.0);
    let fenced = metric(1, "thalamus_write_ahead_total{reason=\"fenced\"}");
    let lost_here = metric(1, "thalamus_dialogs_lost_total");
    let (moved_dialogs, twice) = split_brain(&cluster);
    let figures = format!(
        "partition: {calls_total} calls of {} s at {rate}/s through the balancer to {} devices \
         on 3 nodes; {cut_id}'s link to Redis down 6 s into the run for {} s: it noticed after \
         {} ms, stepped aside after {} ms, its {} devices were on the other nodes after {} ms; \
         it took {calls_after_step} calls after stepping aside; it reached the store again {} \
         ms after the link came back and was eligible again {} ms after that; {fenced} \
         requests held back by its fence; dialogs it lost {lost_here}; the balancer saw \
         {moved_dialogs} dialogs move and {twice} acted on by two nodes; failed calls {} of \
         {calls_total} ({kinds:?}); INVITE retransmissions {}, BYE retransmissions {}",
        f64::from(hold_ms) / 1000.0,
        devices_count(),
        CUT.as_secs(),
        noticed.as_millis(),
        stepped.as_millis(),
        cut_devices.len(),
        moved.as_millis(),
        back.as_millis(),
        eligible.as_millis(),
        result.failed,
        result.invite_retransmissions,
        result.bye_retransmissions,
    );
    println!("{figures}");
    assert_run(
        &cluster,
        &result,
        calls_total,
        u64::from(calls_total) / 200,
        &figures,
    );
    // It lost no dialog, and no dialog saw two nodes act.
    assert_eq!(lost_here, 0.0, "{figures}");
    assert_eq!(twice, 0.0, "{figures}");
    assert_one_record_per_call(&cluster, &result, &figures);
    for id in NODE_IDS {
        cluster.balancer.wait_eligible(id, true);
    }
}

/// `thalamus-sim load` drives a cluster (issue 16): its devices log in through the three
/// nodes' addresses as entry points (each node's certificate pinned), follow the redirects to
/// their owners, place calls at a SIP buddy, and when a node is killed its devices log in again
/// at the others with their resume tokens: their answered calls go on there (taken over) and
/// are hung up when their hold ends. The report gives the figures per node and of the
/// reconnects.
#[test]
fn the_simulator_s_load_drives_a_cluster_through_a_node_death() {
    let _serial = serial();
    let mut cluster = Cluster::start_with(3, FleetConfig::quick);
    const DEVICES: u32 = 60;
    let out = Command::new(bin("thalamus"))
        .arg("--config")
        .arg(&cluster.node(0).config_path)
        .args(["device", "add-bulk", "--prefix", "load-", "--count"])
        .arg(DEVICES.to_string())
        .env_remove("THALAMUS_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let (_buddy, buddy_port) = Sim::buddy(&[], T).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (json, status) = (dir.path().join("load.json"), dir.path().join("status.json"));
    let join = |f: &dyn Fn(&Gateway) -> String| {
        (0..3)
            .map(|i| f(cluster.node(i)))
            .collect::<Vec<_>>()
            .join(",")
    };
    let gateways = join(&|g| g.quic.to_string());
    let fingerprints = join(&|g| g.fingerprint.clone());
    let mut load = Proc {
        child: Command::new(bin("thalamus-sim"))
            .arg("load")
            .args(["--gateway", &gateways, "--fingerprint", &fingerprints])
            .args(["--secret", &secret, "--prefix", "load-", "--quiet"])
            .args([
                "--devices",
                &DEVICES.to_string(),
                "--cps",
                "20",
                "--duration",
                "16",
            ])
            .args(["--hold-ms", "4000", "--reconnect-secs", "20"])
            .args(["--idle-timeout-ms", "700"])
            .arg("--target")
            .arg(format!("sip:echo@127.0.0.1:{buddy_port}"))
            .arg("--json")
            .arg(&json)
            .arg("--status-file")
            .arg(&status)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    };
    let deadline = Instant::now() + T;
    while !std::fs::read_to_string(&status).is_ok_and(|s| s.contains("\"calling\"")) {
        assert!(Instant::now() < deadline, "the load never started calling");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(6));
    let victim = NODE_IDS[1];
    let _dir = cluster.nodes[1].take().unwrap().kill();
    let code = load.wait_exit(Duration::from_secs(90)).unwrap();
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(&json)
            .unwrap_or_else(|e| panic!("no report: {e}\n{}", cluster.logs())),
    )
    .unwrap();
    let figures = format!(
        "sim load on a cluster: nodes {}; reconnects {}; attempted {} answered {} failed {} \
         ({}); answered calls ended {}; exit code {code:?}; timeline {}",
        report["nodes"],
        report["reconnects"],
        report["attempted"],
        report["answered"],
        report["failed"],
        report["failures"],
        report["answered_ended"],
        report["timeline"]
    );
    println!("{figures}");
    cluster.dump();
    let nodes = report["nodes"].as_object().unwrap();
    // Every device logged in at its owner, through whichever entry point it used.
    for id in NODE_IDS {
        assert!(
            nodes[id]["devices_at_start"].as_u64().unwrap() > 0,
            "{figures}"
        );
    }
    // (A device may already be on its way to another node when the logins end.)
    let at_start: u64 = nodes
        .values()
        .map(|n| n["devices_at_start"].as_u64().unwrap())
        .sum();
    assert!(at_start >= u64::from(DEVICES) * 9 / 10, "{figures}");
    // The killed node's devices all came back elsewhere, resumed, with their calls.
    let victims = nodes[victim]["devices_at_start"].as_u64().unwrap();
    let rc = &report["reconnects"];
    assert!(rc["reconnects"].as_u64().unwrap() >= victims, "{figures}");
    assert_eq!(rc["resumed"], rc["reconnects"], "{figures}");
    assert_eq!(rc["gave_up"], 0, "{figures}");
    assert!(rc["calls_kept"].as_u64().unwrap() > 0, "{figures}");
    assert_eq!(nodes[victim]["devices_at_end"], 0, "{figures}");
    // Every device logged in somewhere at the end (or on its way: a node may send a device
    // elsewhere at any time, e.g. for an idle session under this machine's load).
    let at_end: u64 = nodes
        .values()
        .map(|n| n["devices_at_end"].as_u64().unwrap())
        .sum();
    assert_eq!(
        at_end + rc["reconnecting_at_end"].as_u64().unwrap(),
        u64::from(DEVICES),
        "{figures}"
    );
    // Only calls being set up on the killed node at its death may fail (20 calls/s, a third
    // of them there, set up in a few ms): a handful at most; every answered call ended by
    // the device's hangup, those taken over included.
    assert!(report["failed"].as_u64().unwrap() <= 5, "{figures}");
    let ended = report["answered_ended"].as_object().unwrap();
    assert_eq!(
        ended.keys().collect::<Vec<_>>(),
        vec!["local_hangup"],
        "{figures}\n{}",
        cluster.logs()
    );
}
