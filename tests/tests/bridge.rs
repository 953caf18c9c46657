//! End to end through the bridge: real gateway, real simulator processes (devices and the SIP
//! buddy) and SIPp, all on loopback. Devices call SIP peers, SIP peers call devices, texts go
//! both ways, and the SIP statuses reach the device as the protocol maps them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use thalamus_tests::{bin, free_udp_port, scenario, sipp, Gateway, Sim, SippProcess};

const T: Duration = Duration::from_secs(20);

/// How long a SIPp client may run: its own `-timeout` (60 s), then time to print its
/// statistics and exit; past it SIPp is killed.
const SIPP_WAIT: Duration = Duration::from_secs(90);

/// Runs SIPp as a client toward the gateway and returns (successful, failed).
fn sipp_client(gw: &Gateway, args: &[&str]) -> (u64, u64) {
    let mut command = sipp();
    command
        .args(args)
        .args([
            "-i",
            "127.0.0.1",
            "-nostdin",
            "-timeout",
            "60s",
            "-timeout_error",
        ])
        .args(["-p", &free_udp_port().unwrap().to_string()])
        .arg(gw.sip.to_string());
    SippProcess::spawn(command).wait(SIPP_WAIT).counts()
}

fn login_args<'a>(
    gw: &'a Gateway,
    quic: &'a str,
    device: &'a str,
    secret: &'a str,
) -> Vec<&'a str> {
    vec![
        "--gateway",
        quic,
        "--fingerprint",
        &gw.fingerprint,
        "--device",
        device,
        "--secret",
        secret,
    ]
}

fn device(gw: &Gateway, command: &str, device: &str, secret: &str, extra: &[&str]) -> Sim {
    let quic = gw.quic.to_string();
    let mut args = vec![command];
    args.extend(login_args(gw, &quic, device, secret));
    args.extend_from_slice(extra);
    let mut sim = Sim::spawn(&args).unwrap();
    sim.wait_event("welcome", T).unwrap();
    sim
}

fn buddy(extra: &[&str]) -> (Sim, u16) {
    Sim::buddy(extra, T).unwrap()
}

fn call_event(sim: &mut Sim, state: &str) -> Value {
    sim.wait_for(|v| v["event"] == "call_event" && v["state"] == state, T)
        .unwrap_or_else(|e| panic!("no call_event {state}: {e:#}"))
}

#[test]
fn device_calls_sipp_uas_200_times() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("caller").unwrap();
    let port = free_udp_port().unwrap();
    let mut command = sipp();
    command.args([
        "-sn",
        "uas",
        "-i",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-nostdin",
    ]);
    let mut uas = SippProcess::spawn(command);
    std::thread::sleep(Duration::from_millis(300));
    let target = format!("sip:service@127.0.0.1:{port}");
    let quic = gw.quic.to_string();
    let mut args = vec!["call"];
    args.extend(login_args(&gw, &quic, "caller", &secret));
    args.extend_from_slice(&["--target", &target, "--calls", "200", "--hold-ms", "10"]);
    let mut sim = Sim::spawn(&args).unwrap();
    let summary = sim.wait_event("summary", Duration::from_secs(120)).unwrap();
    assert_eq!(summary["succeeded"], 200, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(sim.proc.wait_exit(T).unwrap(), Some(0));
    uas.kill();
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
}

#[test]
fn device_calls_buddy_with_hold_resume_dtmf_and_hangs_up() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("alice").unwrap();
    let (mut buddy, port) = buddy(&["--echo"]);
    let target = format!("sip:bob@127.0.0.1:{port}");
    let quic = gw.quic.to_string();
    let mut args = vec!["call"];
    args.extend(login_args(&gw, &quic, "alice", &secret));
    args.extend_from_slice(&[
        "--target",
        &target,
        "--hold-ms",
        "1500",
        "--hold-resume",
        "--dtmf",
        "5#",
        "--media",
    ]);
    let mut sim = Sim::spawn(&args).unwrap();
    call_event(&mut sim, "ringing");
    let answered = call_event(&mut sim, "answered");
    assert_eq!(answered["sip_status"], 200);
    assert!(answered["media"]["audio_codecs"]
        .as_array()
        .unwrap()
        .contains(&Value::from("pcmu")));
    call_event(&mut sim, "held");
    call_event(&mut sim, "resumed");
    let ended = call_event(&mut sim, "ended");
    assert_eq!(ended["end_reason"], "local_hangup");
    let media = sim.wait_event("media_report", T).unwrap();
    assert!(media["frames_received"].as_u64().unwrap() > 0, "{media}");

    // The buddy negotiated telephone-event, so the digits went in the media (RFC 4733); its
    // echo sent them back, and the gateway reported them to the device as Dtmf frames.
    let echoed: Vec<String> = sim
        .seen
        .iter()
        .filter(|e| e["event"] == "dtmf")
        .map(|e| e["digit"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(echoed, ["5", "#"], "{:?}", sim.seen);
    // What the buddy saw: INVITE, ACK, two RFC 4733 events, hold (sendonly), resume, BYE.
    buddy.wait_event("answered", T).unwrap();
    let d1 = buddy.wait_event("dtmf", T).unwrap();
    assert_eq!(d1["digit"], "5");
    let d2 = buddy.wait_event("dtmf", T).unwrap();
    assert_eq!(d2["digit"], "#");
    let hold = buddy.wait_event("reinvite", T).unwrap();
    assert_eq!(hold["direction"], "sendonly");
    let resume = buddy.wait_event("reinvite", T).unwrap();
    assert_eq!(resume["direction"], "sendrecv");
    buddy.wait_event("bye", T).unwrap();
}

#[test]
fn dtmf_goes_as_sip_info_without_telephone_event() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("alice").unwrap();
    let (mut buddy, port) = buddy(&["--no-telephone-event"]);
    let target = format!("sip:bob@127.0.0.1:{port}");
    let quic = gw.quic.to_string();
    let mut args = vec!["call"];
    args.extend(login_args(&gw, &quic, "alice", &secret));
    args.extend_from_slice(&["--target", &target, "--hold-ms", "800", "--dtmf", "7*"]);
    let mut sim = Sim::spawn(&args).unwrap();
    let answered = call_event(&mut sim, "answered");
    assert!(!answered["media"]["audio_codecs"]
        .as_array()
        .unwrap()
        .contains(&Value::from("telephone_event")));
    let d1 = buddy.wait_event("info", T).unwrap();
    assert_eq!(d1["digit"], "7");
    let d2 = buddy.wait_event("info", T).unwrap();
    assert_eq!(d2["digit"], "*");
    call_event(&mut sim, "ended");
}

#[test]
fn buddy_hangs_up_and_device_sees_remote_hangup() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("alice").unwrap();
    let (mut buddy, port) = buddy(&["--hangup-after-ms", "300"]);
    let target = format!("sip:bob@127.0.0.1:{port}");
    let quic = gw.quic.to_string();
    let mut args = vec!["call"];
    args.extend(login_args(&gw, &quic, "alice", &secret));
    args.extend_from_slice(&["--target", &target, "--hold-ms", "0"]);
    let mut sim = Sim::spawn(&args).unwrap();
    call_event(&mut sim, "answered");
    let ended = call_event(&mut sim, "ended");
    assert_eq!(ended["end_reason"], "remote_hangup");
    let bye = buddy.wait_event("bye_answered", T).unwrap();
    assert_eq!(bye["status"], 200);
}

#[test]
fn sip_failures_reach_the_device_with_their_reason() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("alice").unwrap();
    for (status, reason) in [("486", "busy"), ("404", "not_found"), ("603", "rejected")] {
        let (_buddy, port) = buddy(&["--reject", status]);
        let target = format!("sip:bob@127.0.0.1:{port}");
        let quic = gw.quic.to_string();
        let mut args = vec!["call"];
        args.extend(login_args(&gw, &quic, "alice", &secret));
        args.extend_from_slice(&["--target", &target]);
        let mut sim = Sim::spawn(&args).unwrap();
        let ended = call_event(&mut sim, "ended");
        assert_eq!(ended["sip_status"].to_string(), status);
        assert_eq!(ended["end_reason"], reason);
    }
}

#[test]
fn sipp_calls_a_listening_device_200_times() {
    // SIPp keeps up to 20 calls open at once: allow the device that many (the default is 4).
    let gw = Gateway::start("[session]\nmax_calls = 32").unwrap();
    let secret = gw.add_device("callee").unwrap();
    let mut listener = device(&gw, "listen", "callee", &secret, &[]);
    let (ok, failed) = sipp_client(
        &gw,
        &[
            "-sn", "uac", "-s", "callee", "-m", "200", "-r", "50", "-l", "20",
        ],
    );
    assert_eq!((ok, failed), (200, 0));
    let first = listener.wait_event("incoming_call", T).unwrap();
    assert_eq!(
        first["to_uri"].as_str().unwrap().split('@').next(),
        Some("sip:callee")
    );
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
    gw.wait_metric(
        "thalamus_calls_ended_total{reason=\"remote_hangup\"}",
        200.0,
        T,
    )
    .unwrap();
}

#[test]
fn caller_cancel_reaches_the_device() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("callee").unwrap();
    let mut listener = device(&gw, "listen", "callee", &secret, &["--ignore"]);
    let (ok, failed) = sipp_client(
        &gw,
        &[
            "-sf",
            &scenario("uac_cancel.xml"),
            "-s",
            "callee",
            "-m",
            "3",
            "-r",
            "5",
        ],
    );
    assert_eq!((ok, failed), (3, 0));
    listener.wait_event("incoming_call", T).unwrap();
    let ended = call_event(&mut listener, "ended");
    assert_eq!(ended["end_reason"], "cancelled");
    assert_eq!(ended["sip_status"], 487);
}

#[test]
fn offline_device_gets_480_and_unknown_device_404() {
    let gw = Gateway::start("").unwrap();
    gw.add_device("sleeper").unwrap();
    let run = |target: String| {
        let out = Command::new(bin("thalamus-sim"))
            .args(["sip-call", "--target", &target])
            .output()
            .unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        report["first_failure"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(run(format!("sip:sleeper@{}", gw.sip)).contains("480"));
    assert!(run(format!("sip:nobody@{}", gw.sip)).contains("404"));
}

#[test]
fn texts_both_ways_with_real_statuses() {
    // A short idle timeout: the listening device is killed below and must be seen offline.
    let gw = Gateway::start("[quic]\nidle_timeout_ms = 2000\nkeepalive_interval_ms = 500").unwrap();
    let secret = gw.add_device("texter").unwrap();
    let quic = gw.quic.to_string();
    // Device -> SIP: the TextStatus carries the peer's real final status.
    for status in [200u64, 404, 480] {
        let status_text = status.to_string();
        let (mut buddy, port) = buddy(&["--message-status", &status_text]);
        let to = format!("sip:bob@127.0.0.1:{port}");
        let mut args = vec!["text"];
        args.extend(login_args(&gw, &quic, "texter", &secret));
        args.extend_from_slice(&["--to", &to, "--body", "hello buddy"]);
        let mut sim = Sim::spawn(&args).unwrap();
        let st = sim.wait_event("text_status", T).unwrap();
        assert_eq!(st["sip_status"], status, "{st}");
        assert_eq!(st["delivered"], status == 200);
        let msg = buddy.wait_event("message", T).unwrap();
        assert_eq!(msg["body"], "hello buddy");
    }
    // SIP -> device: TextReceived and 200; offline: 480.
    let mut listener = device(&gw, "listen", "texter", &secret, &[]);
    assert_eq!(
        sipp_client(
            &gw,
            &[
                "-sf",
                &scenario("uac_message_200.xml"),
                "-s",
                "texter",
                "-m",
                "2"
            ]
        ),
        (2, 0)
    );
    let got = listener.wait_event("text_received", T).unwrap();
    assert!(got["body"].as_str().unwrap().starts_with("hello from sipp"));
    assert!(got["from_uri"].as_str().unwrap().starts_with("sip:sipp@"));
    listener.proc.kill();
    gw.wait_metric("thalamus_device_sessions_live", 0.0, T)
        .unwrap();
    assert_eq!(
        sipp_client(
            &gw,
            &[
                "-sf",
                &scenario("uac_message_480.xml"),
                "-s",
                "texter",
                "-m",
                "1"
            ]
        ),
        (1, 0)
    );
    assert_eq!(
        sipp_client(
            &gw,
            &[
                "-sf",
                &scenario("uac_message_404.xml"),
                "-s",
                "stranger",
                "-m",
                "1"
            ]
        ),
        (1, 0)
    );
}

#[test]
fn options_is_answered_and_unknown_methods_get_405() {
    let gw = Gateway::start("").unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = sock.local_addr().unwrap();
    let request = |method: &str, n: u32| {
        format!(
            "{method} sip:{gw} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKopt{n}\r\nFrom: <sip:probe@{local}>;tag=p{n}\r\nTo: <sip:{gw}>\r\nCall-ID: probe-{n}\r\nCSeq: 1 {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
            gw = gw.sip
        )
    };
    let mut buf = [0u8; 4096];
    sock.send_to(request("OPTIONS", 1).as_bytes(), gw.sip)
        .unwrap();
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("SIP/2.0 200"), "{text}");
    assert!(text.contains("Allow: INVITE"), "{text}");
    sock.send_to(request("PUBLISH", 2).as_bytes(), gw.sip)
        .unwrap();
    let text = loop {
        let (n, _) = sock.recv_from(&mut buf).unwrap();
        let t = String::from_utf8_lossy(&buf[..n]).to_string();
        if !t.starts_with("SIP/2.0 100") {
            break t;
        }
    };
    assert!(text.starts_with("SIP/2.0 405"), "{text}");
    assert!(text.contains("Allow:"), "{text}");
}

#[test]
fn max_forwards_zero_gets_483_and_a_looped_invite_482() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("callee").unwrap();
    let _listener = device(&gw, "listen", "callee", &secret, &["--ignore"]);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = sock.local_addr().unwrap();
    let invite = |branch: &str, max_forwards: u32| {
        format!(
            "INVITE sip:callee@{gw} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={branch}\r\nFrom: <sip:loop@{local}>;tag=lt1\r\nTo: <sip:callee@{gw}>\r\nCall-ID: loop-1@test\r\nCSeq: 7 INVITE\r\nContact: <sip:loop@{local}>\r\nMax-Forwards: {max_forwards}\r\nContent-Length: 0\r\n\r\n",
            gw = gw.sip
        )
    };
    let final_status = |sock: &std::net::UdpSocket, branch: &str| -> String {
        let mut buf = [0u8; 4096];
        loop {
            let (n, _) = sock.recv_from(&mut buf).unwrap();
            let t = String::from_utf8_lossy(&buf[..n]).to_string();
            if t.contains(branch) && !t.starts_with("SIP/2.0 1") {
                return t;
            }
        }
    };
    sock.send_to(invite("z9hG4bKmf0", 0).as_bytes(), gw.sip)
        .unwrap();
    let t = final_status(&sock, "z9hG4bKmf0");
    assert!(t.starts_with("SIP/2.0 483"), "{t}");
    // The first copy rings on the device; a second copy by another path is a loop.
    sock.send_to(invite("z9hG4bKpath1", 70).as_bytes(), gw.sip)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    sock.send_to(invite("z9hG4bKpath2", 70).as_bytes(), gw.sip)
        .unwrap();
    let t = final_status(&sock, "z9hG4bKpath2");
    assert!(t.starts_with("SIP/2.0 482"), "{t}");
}

#[test]
fn calls_per_device_are_limited_and_the_limit_frees_up_as_calls_end() {
    let gw = Gateway::start("[session]\nmax_calls = 2").unwrap();
    let secret = gw.add_device("busybody").unwrap();
    let _listener = device(&gw, "listen", "busybody", &secret, &[]);
    // Ten calls at once, each held 3 s: two fit, eight get 486.
    let (ok, failed) = sipp_client(
        &gw,
        &[
            "-sn", "uac", "-s", "busybody", "-m", "10", "-r", "100", "-l", "10", "-d", "3000",
        ],
    );
    assert_eq!((ok, failed), (2, 8));
    // Refused as too many calls, or as too many ringing while the first two still rang.
    let refused = |gw: &Gateway| {
        gw.metric("thalamus_sip_refused_total{reason=\"max_calls\"}")
            .unwrap()
            + gw.metric("thalamus_sip_refused_total{reason=\"max_ringing\"}")
                .unwrap()
    };
    assert_eq!(refused(&gw), 8.0);
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
    // The two ended: the device has room again (its count went back down).
    let (ok, failed) = sipp_client(
        &gw,
        &[
            "-sn", "uac", "-s", "busybody", "-m", "4", "-r", "10", "-l", "2",
        ],
    );
    assert_eq!((ok, failed), (4, 0));
    assert_eq!(refused(&gw), 8.0);
}

#[test]
fn a_call_waits_for_its_device_to_log_in_and_times_out_without_it() {
    let gw = Gateway::start("[session]\narrival_wait_ms = 3000").unwrap();
    let secret = gw.add_device("latecomer").unwrap();
    gw.add_device("absent").unwrap();
    // SIPp calls the device before it is connected; it logs in half a second later.
    let caller = {
        let sip = gw.sip;
        let port = free_udp_port().unwrap();
        std::thread::spawn(move || {
            let mut command = sipp();
            command
                .args([
                    "-sn",
                    "uac",
                    "-s",
                    "latecomer",
                    "-m",
                    "1",
                    "-i",
                    "127.0.0.1",
                ])
                .args(["-nostdin", "-timeout", "30s", "-timeout_error"])
                .args(["-p", &port.to_string()])
                .arg(sip.to_string());
            // SIPp's own timeout (30 s), then time to print its statistics and exit.
            SippProcess::spawn(command)
                .wait(Duration::from_secs(60))
                .counts()
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut listener = device(&gw, "listen", "latecomer", &secret, &[]);
    listener.wait_event("incoming_call", T).unwrap();
    assert_eq!(caller.join().unwrap(), (1, 0));
    assert_eq!(
        gw.metric("thalamus_device_arrival_waits_total{reason=\"arrived\"}")
            .unwrap(),
        1.0
    );
    // A device that never comes: 480 once the wait is over.
    let started = std::time::Instant::now();
    let (ok, failed) = sipp_client(&gw, &["-sn", "uac", "-s", "absent", "-m", "1"]);
    assert_eq!((ok, failed), (0, 1));
    assert!(started.elapsed() >= Duration::from_millis(3000));
    assert_eq!(
        gw.metric("thalamus_device_arrival_waits_total{reason=\"timeout\"}")
            .unwrap(),
        1.0
    );
    assert_eq!(
        gw.metric("thalamus_sip_refused_total{reason=\"offline\"}")
            .unwrap(),
        1.0
    );
}
