//! The SIP stack against SIPp, the real program (Debian package `sip-tester`): a UAS built on
//! the stack (`thalamus-sim buddy`) answers SIPp's built-in `uac` scenario over UDP and TCP; a
//! UAC built on the stack (`thalamus-sim sip-call`) calls SIPp's built-in `uas`, and answers the
//! digest challenge of a SIPp scenario kept in this repository.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use thalamus_tests::{bin, free_udp_port, scenario, sipp, sipp_counts, Proc, Sim};

const CALLS: u32 = 500;

/// Starts `thalamus-sim buddy` on a free port; returns it and its SIP port.
fn buddy(extra: &[&str]) -> (Sim, u16) {
    let mut args = vec!["buddy", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut sim = Sim::spawn(&args).unwrap();
    let listening = sim
        .wait_event("listening", Duration::from_secs(10))
        .unwrap();
    let port = listening["sip"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (sim, port)
}

fn sipp_uac_against_buddy(tcp: bool) {
    let (_buddy, port) = buddy(&[]);
    let mut cmd = sipp();
    cmd.args(["-sn", "uac", "-s", "bob", "-i", "127.0.0.1", "-nostdin"])
        .args(["-m", &CALLS.to_string(), "-r", "200", "-l", "100"])
        .args(["-p", &free_udp_port().unwrap().to_string()])
        .args(["-timeout", "60s", "-timeout_error"])
        .arg(format!("127.0.0.1:{port}"));
    if tcp {
        cmd.args(["-t", "t1"]);
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (ok, failed) = sipp_counts(&text);
    assert_eq!((ok, failed), (u64::from(CALLS), 0), "{text}");
    assert!(out.status.success(), "SIPp exit status {:?}", out.status);
}

#[test]
fn stack_uas_answers_sipp_uac_over_udp() {
    sipp_uac_against_buddy(false);
}

#[test]
fn stack_uas_answers_sipp_uac_over_tcp() {
    sipp_uac_against_buddy(true);
}

fn sipp_server(args: &[&str]) -> (Proc, u16) {
    let port = free_udp_port().unwrap();
    let child = sipp()
        .args(args)
        .args(["-i", "127.0.0.1", "-p", &port.to_string(), "-nostdin"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // SIPp binds at once; give it a moment.
    std::thread::sleep(Duration::from_millis(300));
    (Proc { child }, port)
}

fn sip_call(target: &str, calls: u32, extra: &[&str]) -> (bool, serde_json::Value) {
    let out = Command::new(bin("thalamus-sim"))
        .args([
            "sip-call",
            "--target",
            target,
            "--calls",
            &calls.to_string(),
        ])
        .args(["--rate", "200"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(text.trim())
        .unwrap_or_else(|_| panic!("sip-call printed no report: {text}"));
    (out.status.success(), report)
}

fn finish_sipp(mut server: Proc) -> String {
    use std::io::Read;
    let _ = server.wait_exit(Duration::from_secs(30));
    let mut text = String::new();
    if let Some(mut out) = server.child.stdout.take() {
        let _ = out.read_to_string(&mut text);
    }
    text
}

#[test]
fn stack_uac_calls_sipp_uas() {
    let (server, port) = sipp_server(&["-sn", "uas", "-m", &CALLS.to_string()]);
    let (ok, report) = sip_call(&format!("sip:service@127.0.0.1:{port}"), CALLS, &[]);
    assert!(ok, "{report}");
    assert_eq!(report["succeeded"], u64::from(CALLS), "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    let text = finish_sipp(server);
    assert_eq!(sipp_counts(&text), (u64::from(CALLS), 0), "{text}");
}

#[test]
fn stack_uac_answers_a_sipp_digest_challenge() {
    let calls = 50;
    let (server, port) =
        sipp_server(&["-sf", &scenario("uas_digest.xml"), "-m", &calls.to_string()]);
    let target = format!("sip:service@127.0.0.1:{port}");
    let (ok, report) = sip_call(
        &target,
        calls,
        &["--user", "alice", "--password", "wonderland"],
    );
    assert!(ok, "{report}");
    assert_eq!(report["succeeded"], u64::from(calls), "{report}");
    let text = finish_sipp(server);
    assert_eq!(sipp_counts(&text), (u64::from(calls), 0), "{text}");

    // The scenario really checks the credentials: a wrong password is refused (403).
    let (server, port) = sipp_server(&["-sf", &scenario("uas_digest.xml"), "-m", "1"]);
    let (ok, report) = sip_call(
        &format!("sip:service@127.0.0.1:{port}"),
        1,
        &["--user", "alice", "--password", "not-wonderland"],
    );
    assert!(!ok, "{report}");
    assert!(
        report["first_failure"].as_str().unwrap().contains("403"),
        "{report}"
    );
    let text = finish_sipp(server);
    assert_eq!(sipp_counts(&text), (0, 1), "{text}");
}
