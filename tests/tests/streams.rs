#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Every stream a device has, end to end. Brain to brain: two simulated earpieces call each
//! other through SIP and exchange their signal data (MBFP stream 2, carried on the SIP leg as
//! its own RTP stream, `m=application ... x-mbfp-signal/1000`) and VP8 video (stream 1,
//! `m=video`) beside their audio. Each side streams a synthetic 8-channel 250 Hz signal and
//! 15 fps video whose frames span one to six datagrams, and checks every sample and every frame
//! the other sends; each asks the other for a key frame once (MBFP `KeyframeRequest`, RTCP PLI
//! on the SIP leg) (`thalamus-sim call --signal --video`, `listen --signal --video`): through
//! one node calling its own SIP address, and through two nodes. A SIP peer that knows neither
//! stream gets audio only. Assertions are on counts, never on timing.

use std::time::Duration;

use serde_json::Value;
use thalamus_tests::capture::Capture;
use thalamus_tests::{login_args, sim_as as spawn, Gateway, Sim};

const T: Duration = Duration::from_secs(60);

/// A gateway relaying media with RTP ports `first..first + pairs * 2`.
fn gateway(first_port: u16, pairs: u16) -> Gateway {
    gateway_with(first_port, pairs, "")
}

/// The same with more `[media]` keys.
fn gateway_with(first_port: u16, pairs: u16, media: &str) -> Gateway {
    Gateway::start(&format!(
        "[media]\nrtp_port_min = {first_port}\nrtp_port_max = {}\n{media}",
        first_port + pairs * 2 - 1
    ))
    .unwrap()
}

/// The clear bytes of the samples of the first signal packet a device with seed `seed` sends
/// (5 samples of 8 channels, i16 big-endian, as they sit in its payload).
fn first_samples(report: &Value) -> Vec<u8> {
    let seed = u32::try_from(u(report, "seed")).unwrap();
    (0..thalamus_sim::signal::SAMPLES_PER_PACKET)
        .flat_map(|index| {
            (0..thalamus_sim::signal::CHANNELS).flat_map(move |channel| {
                thalamus_sim::signal::sample(seed, index, channel).to_be_bytes()
            })
        })
        .collect()
}

/// The RTP packets of a capture with payload type 98 (the signal data stream on the SIP leg).
fn signal_rtp(packets: &[Vec<u8>]) -> Vec<&Vec<u8>> {
    packets
        .iter()
        .filter(|p| p.len() > 12 && p[0] >> 6 == 2 && p[1] & 0x7f == 98)
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// Every sample the report's device received arrived, in order, unaltered, from the first
/// one on; and at least `min_samples` of them.
fn assert_every_sample(report: &Value, min_samples: u64) {
    assert_eq!(report["first_sample"].as_u64(), Some(0), "{report}");
    for key in [
        "missing_samples",
        "reordered_packets",
        "bad_packets",
        "bad_samples",
    ] {
        assert_eq!(u(report, key), 0, "{key}: {report}");
    }
    assert!(u(report, "samples") >= min_samples, "{report}");
    assert_eq!(u(report, "send_failed"), 0, "{report}");
}

/// Every frame the report's device received came whole and unaltered, none was skipped, and
/// at least `min_frames` did (some of them in several packets).
fn assert_every_frame(report: &Value, min_frames: u64) {
    for key in [
        "broken_frames",
        "bad_frames",
        "skipped_frames",
        "send_failed",
    ] {
        assert_eq!(u(report, key), 0, "{key}: {report}");
    }
    assert_eq!(u(report, "checked_frames"), u(report, "frames"), "{report}");
    assert!(u(report, "frames") >= min_frames, "{report}");
    assert!(u(report, "key_frames") >= 1, "{report}");
    assert!(u(report, "fragmented_frames") >= 1, "{report}");
}

/// Earpiece `ear-b` listens on `gw_b`, earpiece `ear-a` on `gw_a` calls its SIP address
/// there, both with audio, the signal stream and video, for 3 s (ear-a streams its audio
/// probe, ear-b echoes it); returns both `signal_report`s (caller's first) after checking every
/// audio frame came back and every sample and frame arrived both ways.
fn brain_to_brain(gw_a: &Gateway, gw_b: &Gateway) -> (Value, Value) {
    let secret_b = gw_b.add_device("ear-b").unwrap();
    let secret_a = gw_a.add_device("ear-a").unwrap();
    let mut listener = spawn(
        "listen",
        login_args(gw_b, "ear-b", &secret_b),
        &["--signal", "--video", "--echo", "--calls", "1"],
    );
    listener.wait_event("welcome", T).unwrap();
    let target = format!("sip:ear-b@{}", gw_b.sip);
    let mut caller = spawn(
        "call",
        login_args(gw_a, "ear-a", &secret_a),
        &[
            "--target",
            &target,
            "--signal",
            "--video",
            "--media",
            "--hold-ms",
            "3000",
        ],
    );
    let audio = caller.wait_event("media_report", T).unwrap();
    let heard_by_a = caller.wait_event("signal_report", T).unwrap();
    let seen_by_a = caller.wait_event("video_report", T).unwrap();
    let heard_by_b = listener.wait_event("signal_report", T).unwrap();
    let seen_by_b = listener.wait_event("video_report", T).unwrap();
    // Audio: the probe frames came back through both gateways' audio relays, byte for byte.
    let frames = u(&audio, "frames_sent");
    assert!(frames >= 100, "{audio}");
    assert!(
        u(&audio, "payload_matches") * 1000 >= frames * 999,
        "{audio}"
    );
    assert_eq!(u(&audio, "frames_foreign"), 0, "{audio}");
    eprintln!("audio: {audio}");
    let summary = caller.wait_event("summary", T).unwrap();
    assert_eq!(
        (summary["succeeded"].as_u64(), summary["failed"].as_u64()),
        (Some(1), Some(0)),
        "{summary}"
    );
    // 3 s at 250 Hz is 750 samples per channel; well over half must have gone each way.
    assert_every_sample(&heard_by_a, 400);
    assert_every_sample(&heard_by_b, 400);
    // The caller stops its signal, waits for the last packets, then hangs up: the listener
    // got every sample the caller sent. (The listener streams until it hears the call ended,
    // so its last packets may cross the BYE.)
    assert_eq!(
        u(&heard_by_b, "samples"),
        u(&heard_by_a, "sent_samples"),
        "{heard_by_a} {heard_by_b}"
    );
    // 3 s at 15 fps is 45 frames: the same holds for video.
    assert_every_frame(&seen_by_a, 25);
    assert_every_frame(&seen_by_b, 25);
    assert_eq!(
        u(&seen_by_b, "frames"),
        u(&seen_by_a, "sent_frames"),
        "{seen_by_a} {seen_by_b}"
    );
    // Each asked once for a key frame 1 s in (MBFP KeyframeRequest -> RTCP PLI -> the other
    // gateway -> KeyframeRequest): each was asked once, and sent one more key frame than the
    // two its 3 s hold by the interval (frames 0 and 30).
    for (asker, asked) in [(&seen_by_a, &seen_by_b), (&seen_by_b, &seen_by_a)] {
        assert_eq!(u(asker, "keyframe_requests_sent"), 1, "{asker}");
        assert_eq!(u(asked, "keyframe_requests_received"), 1, "{asked}");
        assert!(u(asker, "key_frames") >= 3, "{asker}");
    }
    eprintln!("video: A saw {seen_by_a}; B saw {seen_by_b}");
    // Each device was told its gateway's figures of each stream's SIP leg (revision 5): what
    // its gateway sent toward the other covers what the other received, what it received
    // from the other covers what the device got, and nothing went missing.
    assert_eq!(audio["gateway"]["stream_id"].as_u64(), Some(0), "{audio}");
    for (report, other, stream) in [
        (&heard_by_a, &heard_by_b, 2),
        (&heard_by_b, &heard_by_a, 2),
        (&seen_by_a, &seen_by_b, 1),
        (&seen_by_b, &seen_by_a, 1),
    ] {
        let gateway = &report["gateway"];
        assert_eq!(gateway["stream_id"].as_u64(), Some(stream), "{report}");
        assert_eq!(u(gateway, "packets_lost"), 0, "{report}");
        assert!(
            u(gateway, "packets_sent") >= u(other, "packets"),
            "{report} {other}"
        );
        assert!(
            u(gateway, "packets_received") >= u(report, "packets"),
            "{report}"
        );
        assert!(u(report, "packets") > 0, "{report}");
    }
    assert_eq!(caller.proc.wait_exit(T).unwrap(), Some(0));
    assert_eq!(listener.proc.wait_exit(T).unwrap(), Some(0));
    (heard_by_a, heard_by_b)
}

/// Both earpieces on one node: the node calls its own SIP address, so each call crosses the
/// SIP leg (and two relays per stream) of the same process.
#[test]
fn two_earpieces_on_one_node_exchange_every_signal_sample_and_video_frame() {
    let gw = gateway(37_400, 50);
    let (a, b) = brain_to_brain(&gw, &gw);
    eprintln!("one node: A heard {a}; B heard {b}");
}

/// The earpieces on two nodes that know nothing of each other but SIP, with plain RTP between
/// them: a capture of the SIP leg shows each side's samples in clear (what the SRTP test below
/// must not find).
#[test]
fn two_earpieces_on_two_nodes_exchange_every_signal_sample_and_video_frame() {
    let gw_a = gateway(37_600, 50);
    let gw_b = gateway(37_800, 50);
    let capture = Capture::start("udp and portrange 37600-37799").unwrap();
    let (a, b) = brain_to_brain(&gw_a, &gw_b);
    let packets = capture.stop().unwrap();
    eprintln!("two nodes: A heard {a}; B heard {b}");
    assert!(!signal_rtp(&packets).is_empty());
    for report in [&a, &b] {
        assert!(
            packets.iter().any(|p| contains(p, &first_samples(report))),
            "plain RTP: the first samples are on the wire"
        );
    }
}

/// The same over SRTP (`[media] srtp = "require"` on both nodes: RTP/SAVP with SDES keys, so
/// a node that would not do SRTP could not take the call): every sample and frame arrives, and
/// a capture of the SIP leg holds the signal packets, each longer than its clear payload by an
/// authentication tag, and none of the samples in clear.
#[test]
fn two_nodes_carry_signal_and_video_over_srtp_and_the_wire_shows_none_in_clear() {
    let srtp = "srtp = \"require\"";
    let gw_a = gateway_with(38_200, 50, srtp);
    let gw_b = gateway_with(38_400, 50, srtp);
    let capture = Capture::start("udp and portrange 38200-38399").unwrap();
    let (a, b) = brain_to_brain(&gw_a, &gw_b);
    let packets = capture.stop().unwrap();
    eprintln!("two nodes over SRTP: A heard {a}; B heard {b}");
    let signal = signal_rtp(&packets);
    let sent = u(&a, "sent_packets") + u(&b, "sent_packets");
    assert!(
        signal.len() as u64 * 10 >= sent * 9,
        "{} signal packets captured of {sent} sent",
        signal.len()
    );
    eprintln!(
        "captured {} signal packets of {sent} sent, lengths {:?}",
        signal.len(),
        signal
            .iter()
            .map(|p| p.len())
            .collect::<std::collections::BTreeSet<_>>()
    );
    let clear_len = 12 + thalamus_sim::signal::PAYLOAD_BYTES;
    assert!(
        signal.iter().all(|p| p.len() >= clear_len + 10),
        "every signal packet carries an authentication tag"
    );
    for report in [&a, &b] {
        let samples = first_samples(report);
        assert!(
            !packets.iter().any(|p| contains(p, &samples)),
            "SRTP: no sample in clear on the wire"
        );
    }
}

/// A SIP peer that does not offer or take the signal stream or video (the simulator's echo
/// buddy): the call goes on with audio, whose frames come back, and nothing else arrives.
#[test]
fn a_peer_without_the_signal_stream_or_video_gets_audio_only() {
    let gw = gateway(38_000, 20);
    let secret = gw.add_device("ear-c").unwrap();
    let (_buddy, port) = Sim::buddy(&["--echo"], T).unwrap();
    let target = format!("sip:bob@127.0.0.1:{port}");
    let mut caller = spawn(
        "call",
        login_args(&gw, "ear-c", &secret),
        &[
            "--target",
            &target,
            "--signal",
            "--video",
            "--media",
            "--hold-ms",
            "2000",
        ],
    );
    // Once answered, the relays of the two streams the peer refused stop: one relay left.
    caller
        .wait_for(
            |v| v["event"] == "call_event" && v["state"] == "answered",
            T,
        )
        .unwrap();
    gw.wait_metric("thalamus_media_relays_live", 1.0, T)
        .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
    let media = caller.wait_event("media_report", T).unwrap();
    assert!(u(&media, "payload_matches") >= 50, "{media}");
    let signal = caller.wait_event("signal_report", T).unwrap();
    assert_eq!(u(&signal, "packets"), 0, "{signal}");
    assert!(u(&signal, "sent_packets") > 0, "{signal}");
    let video = caller.wait_event("video_report", T).unwrap();
    assert_eq!(u(&video, "packets"), 0, "{video}");
    assert!(u(&video, "sent_frames") > 0, "{video}");
    // The gateway's figures: audio both ways; the streams the peer refused carried nothing
    // on the SIP leg either way (the device's packets for them were dropped at the gateway),
    // and their relays' figures are still reported.
    assert_eq!(media["gateway"]["stream_id"].as_u64(), Some(0), "{media}");
    assert!(u(&media["gateway"], "packets_received") >= 50, "{media}");
    for (report, stream) in [(&signal, 2), (&video, 1)] {
        let gateway = &report["gateway"];
        assert_eq!(gateway["stream_id"].as_u64(), Some(stream), "{report}");
        assert_eq!(u(gateway, "packets_sent"), 0, "{report}");
        assert_eq!(u(gateway, "packets_received"), 0, "{report}");
    }
    assert_eq!(caller.proc.wait_exit(T).unwrap(), Some(0));
}
