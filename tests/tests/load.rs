#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Short load runs end to end: a real gateway, devices made by `thalamus-sim provision`, and
//! `thalamus-sim load` placing calls at the buddy (or answering calls from `sip-call`). The
//! report's counts are checked against what the other side saw.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use thalamus_tests::{bin, Gateway, Proc, Sim};

const T: Duration = Duration::from_secs(20);

fn provision(args: &[&str]) -> String {
    let out = Command::new(bin("thalamus-sim"))
        .arg("provision")
        .args(args)
        .env_remove("THALAMUS_SIM_SECRET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "provision failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn buddy() -> (Sim, String) {
    let mut sim = Sim::spawn(&["buddy", "--listen", "127.0.0.1:0"]).unwrap();
    let ev = sim.wait_event("listening", T).unwrap();
    let addr = ev["sip"].as_str().unwrap().to_string();
    (sim, addr)
}

/// Runs `thalamus-sim load <args> --json <file>` to its end (bounded) and returns the report
/// and the exit code.
fn load(gw: &Gateway, secret: &str, args: &[&str], json: &Path) -> (Value, Option<i32>) {
    let quic = gw.quic.to_string();
    let mut proc = Proc {
        child: Command::new(bin("thalamus-sim"))
            .arg("load")
            .args(["--gateway", &quic, "--fingerprint", &gw.fingerprint])
            .args(["--secret", secret, "--quiet", "--json"])
            .arg(json)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    };
    let code = proc.wait_exit(Duration::from_secs(90)).unwrap();
    let text = std::fs::read_to_string(json)
        .unwrap_or_else(|e| panic!("no report at {}: {e}\n{}", json.display(), gw.log()));
    (serde_json::from_str(&text).unwrap(), code)
}

/// Every event the simulator prints until it has been silent for `quiet`.
fn events_until_quiet(sim: &mut Sim, quiet: Duration) {
    while sim.wait_for(|_| true, quiet).is_ok() {}
}

#[test]
fn device_calls_at_a_rate_match_what_the_buddy_answered() {
    let gw = Gateway::start("").unwrap();
    let registry = gw.dir.path().join("data").join("devices.toml");
    let secret = provision(&["--devices", "5", "--registry", registry.to_str().unwrap()]);
    let (mut buddy, sip) = buddy();
    let json = gw.dir.path().join("load.json");
    let plot = gw.dir.path().join("load.svg");
    let target = format!("sip:echo@{sip}");
    let (report, code) = load(
        &gw,
        &secret,
        &[
            "--devices",
            "5",
            "--cps",
            "10",
            "--duration",
            "3",
            "--hold-ms",
            "300",
            "--target",
            &target,
            "--plot",
            plot.to_str().unwrap(),
        ],
        &json,
    );
    let count = |k: &str| {
        report[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {report}"))
    };
    assert_eq!(report["devices_connected"], 5, "{report}");
    assert_eq!(count("attempted"), 30, "{report}");
    assert_eq!(
        count("attempted"),
        count("answered") + count("failed"),
        "{report}"
    );
    assert_eq!(count("failed"), 0, "{report}");
    assert_eq!(code, Some(0));
    assert_eq!(
        report["setup_latency"]["count"].as_u64(),
        Some(count("answered"))
    );
    assert!(report["setup_latency"]["p99_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(report["answered_ended"]["local_hangup"].as_u64(), Some(30));
    let timeline_attempted: u64 = report["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["attempted"].as_u64().unwrap())
        .sum();
    assert_eq!(timeline_attempted, 30);

    events_until_quiet(&mut buddy, Duration::from_secs(1));
    let answered_by_buddy = buddy
        .seen
        .iter()
        .filter(|e| e["event"] == "answered")
        .count() as u64;
    let byes = buddy.seen.iter().filter(|e| e["event"] == "bye").count() as u64;
    assert_eq!(answered_by_buddy, count("answered"), "{:?}", buddy.seen);
    assert_eq!(byes, count("answered"));
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("<polyline") && svg.contains("calls per second"));
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
}

#[test]
fn failures_are_counted_by_reason() {
    let gw = Gateway::start("").unwrap();
    let registry = gw.dir.path().join("data").join("devices.toml");
    let secret = provision(&["--devices", "2", "--registry", registry.to_str().unwrap()]);
    let mut busy = Sim::spawn(&["buddy", "--listen", "127.0.0.1:0", "--reject", "486"]).unwrap();
    let sip = busy.wait_event("listening", T).unwrap()["sip"]
        .as_str()
        .unwrap()
        .to_string();
    let json = gw.dir.path().join("load.json");
    let target = format!("sip:busy@{sip}");
    let (report, code) = load(
        &gw,
        &secret,
        &[
            "--devices",
            "2",
            "--cps",
            "10",
            "--duration",
            "1",
            "--target",
            &target,
        ],
        &json,
    );
    assert_eq!(report["attempted"], 10, "{report}");
    assert_eq!(report["answered"], 0, "{report}");
    assert_eq!(report["failed"], 10, "{report}");
    assert_eq!(report["failures"]["busy 486"], 10, "{report}");
    assert_eq!(code, Some(1), "a run with failures exits non-zero");
}

#[test]
fn devices_answer_incoming_calls_provisioned_through_the_gateway_binary() {
    let gw = Gateway::start("").unwrap();
    let secret = provision(&[
        "--devices",
        "3",
        "--prefix",
        "in-",
        "--config",
        gw.config_path.to_str().unwrap(),
        "--thalamus",
        bin("thalamus").to_str().unwrap(),
    ]);
    let json = gw.dir.path().join("load.json");
    let quic = gw.quic.to_string();
    let status = gw.dir.path().join("status.json");
    let mut devices = Proc {
        child: Command::new(bin("thalamus-sim"))
            .arg("load")
            .args(["--gateway", &quic, "--fingerprint", &gw.fingerprint])
            .args([
                "--secret",
                &secret,
                "--quiet",
                "--incoming",
                "--prefix",
                "in-",
            ])
            .args(["--devices", "3", "--expect-calls", "6", "--duration", "60"])
            .arg("--json")
            .arg(&json)
            .arg("--status-file")
            .arg(&status)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    };
    // Wait until the devices are logged in.
    let deadline = std::time::Instant::now() + T;
    while !std::fs::read_to_string(&status).is_ok_and(|s| s.contains("\"calling\"")) {
        assert!(std::time::Instant::now() < deadline, "devices not up");
        std::thread::sleep(Duration::from_millis(50));
    }
    for n in 0..3 {
        let out = Command::new(bin("thalamus-sim"))
            .args(["sip-call", "--calls", "2", "--hold-ms", "100"])
            .arg("--target")
            .arg(format!("sip:in-{n}@{}", gw.sip))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["succeeded"], 2, "{r}");
    }
    assert_eq!(devices.wait_exit(T).unwrap(), Some(0));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["mode"], "incoming");
    assert_eq!(report["attempted"], 6, "{report}");
    assert_eq!(report["answered"], 6, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["answered_ended"]["remote_hangup"], 6, "{report}");
}
