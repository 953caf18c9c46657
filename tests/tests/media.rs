#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Media end to end: real gateway, simulator devices, the simulator's SIP buddy and SIPp, all
//! on loopback. Device frames go through the gateway's relay to an echo and back and are
//! checked byte for byte (each probe frame names its call and number); SIPp plays a capture to
//! a listening device, whose bytes are compared with the capture's; two calls at once never
//! receive each other's media; a thousand calls leave no port pair, relay, call or socket
//! behind. Assertions are on counts and percentages, never on timing (the machine is shared).
//!
//! Each test gives its gateway its own RTP port range so tests running at once do not compete
//! for ports (the relay would retry, but a test should not depend on that).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use thalamus_tests::{
    free_udp_port, login_args, scenario, sim_as as spawn, sipp, Gateway, Sim, SippProcess,
};

const T: Duration = Duration::from_secs(30);
/// The capture SIPp plays (Debian package sip-tester): PCMA, 236 packets of 240 bytes.
const PCAP: &str = "/usr/share/sip-tester/g711a.pcap";

/// A gateway relaying media on loopback with RTP ports `first..first + pairs * 2`.
fn gateway(first_port: u16, pairs: u16) -> Gateway {
    Gateway::start(&format!(
        "[media]\nrtp_port_min = {first_port}\nrtp_port_max = {}",
        first_port + pairs * 2 - 1
    ))
    .unwrap()
}

/// `thalamus-sim buddy --echo`: (process, SIP port).
fn echo_buddy() -> (Sim, u16) {
    Sim::buddy(&["--echo"], T).unwrap()
}

/// A new device `device` on `gw` calling an echoing SIP buddy (`thalamus-sim call` with `args`
/// after the target); the buddy and the caller.
fn call_the_echo(gw: &Gateway, device: &str, args: &[&str]) -> (Sim, Sim) {
    let secret = gw.add_device(device).unwrap();
    let (buddy, port) = echo_buddy();
    let target = format!("sip:bob@127.0.0.1:{port}");
    let mut all = vec!["--target", target.as_str()];
    all.extend_from_slice(args);
    let sim = spawn("call", login_args(gw, device, &secret), &all);
    (buddy, sim)
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// At least `per_mille`/1000 of `total`.
fn at_least(part: u64, total: u64, per_mille: u64) -> bool {
    part * 1000 >= total * per_mille
}

/// Asserts that the gateway has released every port pair and relay and ended every call.
fn assert_media_released(gw: &Gateway) {
    gw.wait_metric("thalamus_media_ports_in_use", 0.0, T)
        .unwrap();
    gw.wait_metric("thalamus_media_relays_live", 0.0, T)
        .unwrap();
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
}

/// The RTP payloads of a capture (pcap, Ethernet, IPv4, UDP), in order.
fn pcap_rtp_payloads(path: &Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: install the Debian package sip-tester",
            path.display()
        )
    });
    assert_eq!(
        data[..4],
        0xa1b2_c3d4u32.to_le_bytes(),
        "little-endian pcap expected"
    );
    assert_eq!(
        u32::from_le_bytes(data[20..24].try_into().unwrap()),
        1,
        "Ethernet capture expected"
    );
    let mut payloads = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let len = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap()) as usize;
        let frame = &data[at + 16..at + 16 + len];
        at += 16 + len;
        assert_eq!(frame[12..14], [0x08, 0x00], "IPv4 expected");
        let ip = &frame[14..];
        assert_eq!(ip[9], 17, "UDP expected");
        let rtp = &ip[usize::from(ip[0] & 0x0f) * 4 + 8..];
        assert_eq!(rtp[0] >> 6, 2, "RTP version 2 expected");
        let mut start = 12 + usize::from(rtp[0] & 0x0f) * 4;
        if rtp[0] & 0x10 != 0 {
            let words = u16::from_be_bytes([rtp[start + 2], rtp[start + 3]]);
            start += 4 + usize::from(words) * 4;
        }
        let mut end = rtp.len();
        if rtp[0] & 0x20 != 0 {
            end -= usize::from(rtp[end - 1]);
        }
        payloads.push(rtp[start..end].to_vec());
    }
    payloads
}

/// A new device `device` on `gw` listening for one call (echoing its media), and SIPp calling
/// it once with `scenario_file` (running: SIPp's own timeout is 60 s, so wait up to 90 s for it
/// to print its statistics and exit).
fn sipp_calls_a_listener(gw: &Gateway, device: &str, scenario_file: &str) -> (Sim, SippProcess) {
    let secret = gw.add_device(device).unwrap();
    let mut listener = spawn(
        "listen",
        login_args(gw, device, &secret),
        &["--calls", "1", "--echo"],
    );
    listener.wait_event("welcome", T).unwrap();
    let mut command = sipp();
    command
        .args(["-sf", &scenario(scenario_file), "-s", device, "-m", "1"])
        .args(["-i", "127.0.0.1", "-mi", "127.0.0.1"])
        .args(["-p", &free_udp_port().unwrap().to_string()])
        .args(["-mp", &free_udp_port().unwrap().to_string()])
        .args(["-nostdin", "-timeout", "60s", "-timeout_error"])
        .arg(gw.sip.to_string());
    (listener, SippProcess::spawn(command))
}

/// Open file descriptors of a process (sockets included).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Waits (up to `T`) until a process holds at most `limit` descriptors; returns the count
/// seen last. Connections of the admin endpoint (the metric reads) close a little after the
/// response, so a count taken right after a read may include one.
fn fds_settle_to(pid: u32, limit: usize) -> usize {
    let deadline = std::time::Instant::now() + T;
    loop {
        let n = open_fds(pid);
        if n <= limit || std::time::Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ten_seconds_of_frames_come_back_through_the_buddy_echo() {
    let gw = gateway(36_400, 100);
    let secret = gw.add_device("alice").unwrap();
    let (_buddy, port) = echo_buddy();
    let target = format!("sip:bob@127.0.0.1:{port}");
    let mut sim = spawn(
        "call",
        login_args(&gw, "alice", &secret),
        &["--target", &target, "--hold-ms", "10000", "--media"],
    );
    let report = sim
        .wait_event("media_report", Duration::from_secs(60))
        .unwrap();
    let sent = u(&report, "frames_sent");
    // 10 s of 20 ms frames is 500 (the ticker catches up if the simulator is late).
    assert!(sent >= 490, "{report}");
    assert!(
        at_least(u(&report, "payload_matches"), sent, 999),
        "{report}"
    );
    assert!(
        at_least(u(&report, "frames_in_order"), sent, 999),
        "{report}"
    );
    assert_eq!(u(&report, "frames_foreign"), 0, "{report}");
    assert_eq!(u(&report, "duplicates"), 0, "{report}");
    // The gateway's own count of the call agrees: what it sent toward the buddy covers what
    // came back.
    let gateway_stats = &report["gateway"];
    assert!(
        u(gateway_stats, "packets_sent") >= u(&report, "payload_matches"),
        "{report}"
    );
    let summary = sim.wait_event("summary", T).unwrap();
    assert_eq!(
        (summary["succeeded"].as_u64(), summary["failed"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(sim.proc.wait_exit(T).unwrap(), Some(0));
    assert_media_released(&gw);
    assert!(
        gw.metric("thalamus_media_relayed_packets_total{direction=\"to_peer\"}")
            .unwrap()
            >= u(&report, "payload_matches") as f64
    );
}

/// SIPp plays the capture to a listening device (which echoes it back through the gateway).
#[test]
fn sipp_plays_a_capture_that_reaches_the_listening_device_intact() {
    let expected = pcap_rtp_payloads(Path::new(PCAP));
    assert_eq!(expected.len(), 236);
    let mut digest = Sha256::new();
    for payload in &expected {
        digest.update(payload);
    }
    let expected_digest = hex::encode(digest.finalize());
    let expected_bytes: usize = expected.iter().map(Vec::len).sum();

    let gw = gateway(36_600, 50);
    let (mut listener, sipp) = sipp_calls_a_listener(&gw, "callee", "media_uac_pcap.xml");
    let outcome = sipp.wait(Duration::from_secs(90));
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());

    let incoming = listener.wait_event("incoming_call", T).unwrap();
    assert_eq!(
        incoming["media"]["audio_codecs"],
        serde_json::json!(["pcma"])
    );
    let report = listener.wait_event("media_report", T).unwrap();
    assert_eq!(report["call_ref"], incoming["call_ref"], "{report}");
    assert_eq!(u(&report, "frames_received"), 236, "{report}");
    assert_eq!(u(&report, "frames_in_order"), 236, "{report}");
    assert_eq!(
        report["payload_types"],
        serde_json::json!({"8": 236}),
        "{report}"
    );
    assert_eq!(
        u(&report, "bytes_received"),
        expected_bytes as u64,
        "{report}"
    );
    assert_eq!(
        report["payload_sha256"],
        expected_digest.as_str(),
        "{report}"
    );
    // The gateway counted the same packets from the peer, and relayed the device's echo of
    // each back toward SIPp.
    assert_eq!(u(&report["gateway"], "packets_received"), 236, "{report}");
    assert_eq!(u(&report, "frames_echoed"), 236, "{report}");
    assert_eq!(u(&report["gateway"], "packets_sent"), 236, "{report}");
    listener.wait_event("summary", T).unwrap();
    assert_media_released(&gw);
}

/// RFC 5761: SIPp offers RTCP multiplexed on the RTP port. The gateway answers with
/// `a=rtcp-mux` (SIPp fails the call otherwise), binds no RTCP port for the call, and the
/// capture still reaches the device whole.
#[test]
fn an_offer_with_rtcp_mux_is_answered_on_one_port_and_its_media_flows() {
    // One port pair: the call's relay is on 37350, and 37351 is the RTCP port it leaves out.
    let gw = gateway(37_350, 1);
    let (mut listener, sipp) = sipp_calls_a_listener(&gw, "muxed", "media_uac_rtcp_mux.xml");
    // While the call's relay runs (the capture plays for about 7 s), its RTCP port is free.
    if let Err(e) = gw.wait_metric("thalamus_media_ports_in_use", 1.0, T) {
        let outcome = sipp.wait(Duration::from_secs(90));
        panic!("{e}: {}", outcome.report());
    }
    let rtcp_port = std::net::UdpSocket::bind("127.0.0.1:37351");
    assert!(
        rtcp_port.is_ok(),
        "the relay bound its RTCP port: {rtcp_port:?}"
    );
    drop(rtcp_port);
    let outcome = sipp.wait(Duration::from_secs(90));
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
    let report = listener.wait_event("media_report", T).unwrap();
    assert_eq!(u(&report, "frames_received"), 236, "{report}");
    assert_eq!(u(&report["gateway"], "packets_received"), 236, "{report}");
    listener.wait_event("summary", T).unwrap();
    assert_media_released(&gw);
}

#[test]
fn device_media_comes_back_from_sipp_rtp_echo() {
    let gw = gateway(36_700, 50);
    let secret = gw.add_device("alice").unwrap();
    let sip_port = free_udp_port().unwrap();
    let media_port = free_udp_port().unwrap();
    let mut command = sipp();
    command
        .args(["-sn", "uas", "-i", "127.0.0.1", "-p", &sip_port.to_string()])
        .args([
            "-mi",
            "127.0.0.1",
            "-mp",
            &media_port.to_string(),
            "-rtp_echo",
        ])
        .arg("-nostdin");
    let _uas = SippProcess::spawn(command);
    std::thread::sleep(Duration::from_millis(300));
    let target = format!("sip:service@127.0.0.1:{sip_port}");
    let mut sim = spawn(
        "call",
        login_args(&gw, "alice", &secret),
        &["--target", &target, "--hold-ms", "3000", "--media"],
    );
    let report = sim
        .wait_event("media_report", Duration::from_secs(60))
        .unwrap();
    let sent = u(&report, "frames_sent");
    assert!(sent >= 140, "{report}");
    assert!(
        at_least(u(&report, "payload_matches"), sent, 990),
        "{report}"
    );
    assert_eq!(u(&report, "frames_foreign"), 0, "{report}");
    let summary = sim.wait_event("summary", T).unwrap();
    assert_eq!(summary["succeeded"], 1, "{summary}");
    assert_media_released(&gw);
}

#[test]
fn two_calls_at_once_never_mix_media() {
    let gw = gateway(36_800, 50);
    let (_buddy, port) = echo_buddy();
    let target = format!("sip:bob@127.0.0.1:{port}");
    let mut sims = Vec::new();
    for device in ["alice", "carol"] {
        let secret = gw.add_device(device).unwrap();
        sims.push(spawn(
            "call",
            login_args(&gw, device, &secret),
            &["--target", &target, "--hold-ms", "5000", "--media"],
        ));
    }
    let answered: Vec<Value> = sims
        .iter_mut()
        .map(|s| {
            s.wait_for(
                |v| v["event"] == "call_event" && v["state"] == "answered",
                T,
            )
            .unwrap()
        })
        .collect();
    let ended: Vec<Value> = sims
        .iter_mut()
        .map(|s| {
            s.wait_for(|v| v["event"] == "call_event" && v["state"] == "ended", T)
                .unwrap()
        })
        .collect();
    // The calls overlapped: each was answered before the other ended (same clock).
    let ts = |v: &Value| v["ts"].as_str().unwrap().to_string();
    assert!(ts(&answered[0]) < ts(&ended[1]) && ts(&answered[1]) < ts(&ended[0]));
    for sim in &mut sims {
        let report = sim.wait_event("media_report", T).unwrap();
        let sent = u(&report, "frames_sent");
        assert!(sent >= 240, "{report}");
        // Media of the other call would carry the other call's tag.
        assert_eq!(u(&report, "frames_foreign"), 0, "{report}");
        assert!(
            at_least(u(&report, "payload_matches"), sent, 999),
            "{report}"
        );
        assert_eq!(
            u(&report, "frames_received"),
            u(&report, "payload_matches"),
            "{report}"
        );
    }
    assert_media_released(&gw);
}

#[test]
fn a_thousand_calls_leave_no_port_relay_or_socket_behind() {
    // 200 port pairs for 1,000 calls: every pair is used five times, so a leaked pair would
    // soon exhaust the range and fail calls.
    let gw = gateway(36_000, 200);
    let secret = gw.add_device("dialer").unwrap();
    let (_buddy, port) = echo_buddy();
    let target = format!("sip:bob@127.0.0.1:{port}");
    let run = |calls: &str| {
        let mut sim = spawn(
            "call",
            login_args(&gw, "dialer", &secret),
            &[
                "--target",
                &target,
                "--calls",
                calls,
                "--hold-ms",
                "1",
                "--media",
            ],
        );
        let media = sim
            .wait_event("media_summary", Duration::from_secs(600))
            .unwrap();
        let summary = sim.wait_event("summary", T).unwrap();
        // On failure, say why: the distinct failure events the simulator printed.
        let mut failures: Vec<String> = sim
            .seen
            .iter()
            .filter(|v| {
                v["end_reason"] == "failed"
                    || v["event"].as_str().is_some_and(|e| e.contains("fail"))
            })
            .map(|v| {
                let mut v = v.clone();
                if let Some(o) = v.as_object_mut() {
                    o.remove("ts");
                    o.remove("call");
                    o.remove("call_ref");
                }
                v.to_string()
            })
            .collect();
        failures.sort();
        failures.dedup();
        failures.truncate(5);
        assert_eq!(
            sim.proc.wait_exit(T).unwrap(),
            Some(0),
            "{summary} {failures:?}"
        );
        (media, summary)
    };
    // Warm-up: the first call creates what lives as long as the node (e.g. the device's
    // session state); count the gateway's descriptors after it.
    run("1");
    assert_media_released(&gw);
    let pid = gw.proc.child.id();
    let fds_before = open_fds(pid);

    let (media, summary) = run("1000");
    assert_eq!(summary["succeeded"], 1000, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_media_released(&gw);
    assert_eq!(
        gw.metric("thalamus_media_relays_started_total").unwrap(),
        1001.0
    );
    assert_eq!(
        gw.metric("thalamus_media_relays_finished_total").unwrap(),
        1001.0
    );
    // Every call carried media, none of it another call's (ports are reused).
    let sent = u(&media, "frames_sent");
    assert!(sent >= 1000, "{media}");
    assert_eq!(u(&media, "frames_foreign"), 0, "{media}");
    assert!(at_least(u(&media, "payload_matches"), sent, 990), "{media}");
    // No socket (or other descriptor) outlives its call.
    let fds_after = fds_settle_to(pid, fds_before);
    assert!(
        fds_after <= fds_before,
        "the gateway holds {fds_after} descriptors after 1,000 calls, {fds_before} before"
    );
}

/// The first frames of a call are not lost (issue 16): the device starts sending as soon as it
/// hears the answer, which can be before the relay has the callee's SDP; the relay holds those
/// datagrams until it does. Over 40 calls, none of the first three frames of any call is
/// missing from what came back through the buddy's echo.
#[test]
fn the_first_frames_of_every_call_come_back() {
    let gw = gateway(36_600, 50);
    let (_buddy, mut sim) = call_the_echo(
        &gw,
        "first",
        &["--calls", "40", "--hold-ms", "300", "--media"],
    );
    let mut reports = Vec::new();
    while reports.len() < 40 {
        let report = sim.wait_event("media_report", T).unwrap();
        reports.push(report);
    }
    let summary = sim.wait_event("summary", T).unwrap();
    assert_eq!(summary["succeeded"], 40, "{summary}");
    let lost_early: Vec<&Value> = reports
        .iter()
        .filter(|r| {
            r["missing_first"]
                .as_array()
                .is_some_and(|m| m.iter().any(|s| s.as_u64().is_some_and(|s| s < 3)))
        })
        .collect();
    assert!(
        lost_early.is_empty(),
        "{} of 40 calls lost one of their first frames: {lost_early:?}",
        lost_early.len()
    );
    assert_media_released(&gw);
}

/// A device that changes networks mid-call (its QUIC endpoint moves to a new local port, so
/// its packets come from a new address) keeps its session, its call and its media: QUIC
/// migrates the connection, and the echo never goes silent for more than 200 ms.
#[test]
fn a_device_that_changes_networks_keeps_its_call_and_media() {
    let gw = gateway(37_300, 20);
    let (_buddy, mut sim) = call_the_echo(
        &gw,
        "alice",
        &["--hold-ms", "4000", "--media", "--rebind-after-ms", "2000"],
    );
    let rebound = sim.wait_event("rebound", Duration::from_secs(30)).unwrap();
    assert_ne!(rebound["from"], rebound["to"], "{rebound}");
    let report = sim
        .wait_event("media_report", Duration::from_secs(30))
        .unwrap();
    let sent = u(&report, "frames_sent");
    assert!(sent >= 190, "{report}");
    // Frames around the move may be lost while QUIC validates the new path, but the call goes
    // on: nearly every frame comes back, and no silence is longer than 200 ms.
    assert!(
        at_least(u(&report, "payload_matches"), sent, 950),
        "{report}"
    );
    assert!(u(&report, "max_gap_ms") <= 200, "{report}");
    let summary = sim.wait_event("summary", T).unwrap();
    assert_eq!(
        (summary["succeeded"].as_u64(), summary["failed"].as_u64()),
        (Some(1), Some(0)),
        "the call ended cleanly on the device's new address"
    );
    assert_eq!(sim.proc.wait_exit(T).unwrap(), Some(0));
    assert_media_released(&gw);
}
