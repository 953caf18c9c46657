//! The SIP stack against SIPp, the real program (Debian package `sip-tester`): a UAS built on
//! the stack (`thalamus-sim buddy`) answers SIPp's built-in `uac` scenario over UDP and TCP; a
//! UAC built on the stack (`thalamus-sim sip-call`) calls SIPp's built-in `uas`, and answers the
//! digest challenge of a SIPp scenario kept in this repository.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use thalamus_tests::{bin, free_udp_port, scenario, sipp, Sim, SippProcess};

const CALLS: u32 = 500;

fn sipp_uac_against_buddy(tcp: bool) {
    let (_buddy, port) = Sim::buddy(&[], Duration::from_secs(10)).unwrap();
    let mut cmd = sipp();
    cmd.args(["-sn", "uac", "-s", "bob", "-i", "127.0.0.1", "-nostdin"])
        .args(["-m", &CALLS.to_string(), "-r", "200", "-l", "100"])
        .args(["-p", &free_udp_port().unwrap().to_string()])
        .args(["-timeout", "60s", "-timeout_error"])
        .arg(format!("127.0.0.1:{port}"));
    if tcp {
        cmd.args(["-t", "t1"]);
    }
    // SIPp's own timeout (60 s), then time to print its statistics and exit.
    let outcome = SippProcess::spawn(cmd).wait(Duration::from_secs(90));
    let (ok, failed) = outcome.counts();
    assert_eq!((ok, failed), (u64::from(CALLS), 0), "{}", outcome.report());
    assert!(
        outcome.status.is_some_and(|s| s.success()),
        "SIPp exit status {:?}\n{}",
        outcome.status,
        outcome.report()
    );
}

#[test]
fn stack_uas_answers_sipp_uac_over_udp() {
    sipp_uac_against_buddy(false);
}

#[test]
fn stack_uas_answers_sipp_uac_over_tcp() {
    sipp_uac_against_buddy(true);
}

/// How long a SIPp server has to finish its calls once the stack's calls are done.
const SERVER_WAIT: Duration = Duration::from_secs(30);

fn sipp_server(args: &[&str]) -> (SippProcess, u16) {
    let port = free_udp_port().unwrap();
    let mut command = sipp();
    command
        .args(args)
        .args(["-i", "127.0.0.1", "-p", &port.to_string(), "-nostdin"]);
    let server = SippProcess::spawn(command);
    // SIPp binds at once; give it a moment.
    std::thread::sleep(Duration::from_millis(300));
    (server, port)
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

#[test]
fn stack_uac_calls_sipp_uas() {
    let (server, port) = sipp_server(&["-sn", "uas", "-m", &CALLS.to_string()]);
    let (ok, report) = sip_call(&format!("sip:service@127.0.0.1:{port}"), CALLS, &[]);
    assert!(ok, "{report}");
    assert_eq!(report["succeeded"], u64::from(CALLS), "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    let outcome = server.wait(SERVER_WAIT);
    assert_eq!(
        outcome.counts(),
        (u64::from(CALLS), 0),
        "{}",
        outcome.report()
    );
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
    let outcome = server.wait(SERVER_WAIT);
    assert_eq!(
        outcome.counts(),
        (u64::from(calls), 0),
        "{}",
        outcome.report()
    );

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
    let outcome = server.wait(SERVER_WAIT);
    assert_eq!(outcome.counts(), (0, 1), "{}", outcome.report());
}
