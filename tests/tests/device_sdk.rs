//! End to end, the device SDK (`thalamus-device`, issue 22) against a real gateway: a
//! `thalamus_device::Client` logs in with a pinned certificate, calls `thalamus-sim buddy
//! --echo`, streams 20 ms audio frames numbered by its `MediaSender`, puts what comes back in
//! order with its `JitterBuffer` and counts it, sends DTMF and a text, hangs up, and closes
//! the session with a `Goodbye`. A second client with a wrong secret is refused and stops.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use thalamus_device::media::{JitterBuffer, MediaSender};
use thalamus_device::session::{Event, SessionConfig};
use thalamus_device::{Client, ClientConfig, ClientEvents};
use thalamus_proto::media::{MediaDatagram, StreamId};
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{AudioCodec, CallState, MediaOffer};
use thalamus_tests::{Gateway, Sim};

const T: Duration = Duration::from_secs(15);

fn client(gw: &Gateway, device: &str, secret: &str) -> (Client, ClientEvents) {
    let fingerprint = thalamus_device::quic::parse_fingerprint(&gw.fingerprint).unwrap();
    let quic = thalamus_device::quic::client_config(Some(fingerprint)).unwrap();
    let session = SessionConfig::new(device, secret, vec![gw.quic.to_string()]);
    Client::start(ClientConfig::new(session, quic, "localhost")).unwrap()
}

/// The next event matching `pred`, within `T`.
async fn next_event(events: &mut ClientEvents, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match tokio::time::timeout_at(deadline, events.events.recv()).await {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the client stopped before {what}"),
            Err(_) => panic!("no {what} within {T:?}"),
        }
    }
}

fn call_state(e: &Event, call_ref: u32, state: CallState) -> bool {
    matches!(e, Event::Frame(env) if matches!(&env.body,
        Some(Body::CallEvent(c)) if c.call_ref == call_ref && c.state == state as i32))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_device_calls_an_echoing_buddy_and_gets_its_audio_back() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("earpiece").unwrap();
    let (_buddy, port) = Sim::buddy(&["--echo"], T).unwrap();
    let (device, mut events) = client(&gw, "earpiece", &secret);
    let live = next_event(&mut events, "Live", |e| matches!(e, Event::Live(_))).await;
    let Event::Live(welcome) = live else {
        unreachable!()
    };
    assert!(!welcome.resumed);
    assert_eq!(
        welcome.address_of_record, "sip:earpiece@thalamus.local",
        "{welcome:?}"
    );

    let media = MediaOffer {
        audio_codecs: vec![AudioCodec::Pcmu as i32],
        ..Default::default()
    };
    let (call_ref, _) = device
        .dial(&format!("sip:bob@127.0.0.1:{port}"), media)
        .await
        .unwrap();
    next_event(&mut events, "the answer", |e| {
        call_state(e, call_ref, CallState::Answered)
    })
    .await;

    // 50 frames of 20 ms PCMU; the buddy echoes them through the gateway.
    const FRAMES: u16 = 50;
    let mut sender = MediaSender::new(call_ref, StreamId::AUDIO, 0, 4_000, 160_000);
    let mut jitter = JitterBuffer::new(16, Duration::from_millis(60));
    let mut back = Vec::new();
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    for i in 0..FRAMES {
        ticker.tick().await;
        let payload = [(i % 251) as u8; 160];
        device
            .send_datagram(sender.next(&payload, 160, i == 0).unwrap())
            .unwrap();
        while let Ok(bytes) = events.datagrams.try_recv() {
            if let Ok(d) = MediaDatagram::decode(bytes) {
                if d.header.call_ref == call_ref && d.header.stream_id == StreamId::AUDIO {
                    jitter.push(Instant::now(), d);
                }
            }
            while let Some(d) = jitter.pop(Instant::now()) {
                back.push(d);
            }
        }
    }
    // What is still on its way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while back.len() < usize::from(FRAMES) - 2 {
        match tokio::time::timeout_at(deadline, events.datagrams.recv()).await {
            Ok(Some(bytes)) => {
                if let Ok(d) = MediaDatagram::decode(bytes) {
                    jitter.push(Instant::now(), d);
                }
                while let Some(d) = jitter.pop(Instant::now()) {
                    back.push(d);
                }
            }
            _ => break,
        }
    }
    while let Some(d) = jitter.pop(Instant::now() + Duration::from_secs(1)) {
        back.push(d);
    }
    assert!(
        back.len() >= usize::from(FRAMES) * 9 / 10,
        "{} of {FRAMES} frames came back in {:?} (jitter buffer: {:?})",
        back.len(),
        start.elapsed(),
        jitter.stats()
    );
    // In order, each with the payload it was sent with.
    for pair in back.windows(2) {
        assert!(
            pair[0]
                .header
                .sequence
                .wrapping_sub(pair[1].header.sequence)
                > 0x8000
        );
    }
    assert!(back
        .iter()
        .all(|d| d.payload.len() == 160 && d.payload.iter().all(|b| *b == d.payload[0])));

    device.dtmf(call_ref, '5').await.unwrap();
    device
        .send_text(&format!("sip:bob@127.0.0.1:{port}"), "hello from the SDK")
        .await
        .unwrap();
    next_event(
        &mut events,
        "the text's status",
        |e| matches!(e, Event::Frame(env) if matches!(&env.body, Some(Body::TextStatus(_)))),
    )
    .await;
    device.hangup(call_ref).await.unwrap();
    next_event(&mut events, "the end of the call", |e| {
        call_state(e, call_ref, CallState::Ended)
    })
    .await;
    // An unknown call is refused by the session itself.
    assert!(device.hangup(call_ref).await.is_err());
    device.close().await;
    gw.wait_metric("thalamus_device_sessions_live", 0.0, T)
        .unwrap();

    // A wrong secret: refused, and the client stops instead of retrying.
    let (_wrong, mut events) = client(&gw, "earpiece", "not-the-secret");
    next_event(&mut events, "Refused", |e| {
        matches!(e, Event::Refused { .. })
    })
    .await;
    next_event(&mut events, "Closed", |e| matches!(e, Event::Closed(_))).await;
}

/// The repository's root.
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs an example earpiece against a gateway and an echoing buddy: `command` gets the
/// gateway, fingerprint, device, secret and SIP target as its next arguments, then `last`.
/// Checks it exits 0 and returns how many frames came back (its `sent N frames, M came back`
/// line), with its output.
fn run_example(mut command: std::process::Command, device: &str, last: &[&str]) -> (u64, String) {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device(device).unwrap();
    let (_buddy, port) = Sim::buddy(&["--echo"], T).unwrap();
    let out = command
        .arg(gw.quic.to_string())
        .arg(&gw.fingerprint)
        .arg(device)
        .arg(&secret)
        .arg(format!("sip:echo@127.0.0.1:{port}"))
        .args(last)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = stdout
        .lines()
        .find_map(|l| l.split(" frames, ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no count in {stdout}"));
    (back, stdout)
}

/// 100 frames of 20 ms PCMU (a ramp) in `dir`; the file's path.
fn audio_file(dir: &std::path::Path) -> std::path::PathBuf {
    let audio = dir.join("audio.pcmu");
    let samples: Vec<u8> = (0..100 * 160).map(|i| (i % 256) as u8).collect();
    std::fs::write(&audio, samples).unwrap();
    audio
}

/// The SDK's example earpiece (`device/examples/earpiece.rs`, built by `cargo build
/// --examples`) logs in, calls the echoing buddy for 2 s and counts its audio coming back.
#[test]
fn the_example_earpiece_calls_an_echoing_buddy() {
    let example = std::process::Command::new(thalamus_tests::bin("examples/earpiece"));
    let (back, stdout) = run_example(example, "earpiece-1", &["2"]);
    assert!(back >= 90, "{stdout}");
}

/// The C example (`examples/c/earpiece.c`), built here with the system C compiler against the
/// C ABI's static library and cbindgen header, logs in, calls the echoing buddy, sends 2 s of
/// PCMU read from a file, counts the frames coming back, and hangs up.
#[test]
fn the_c_example_earpiece_calls_an_echoing_buddy() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("earpiece");
    let built = std::process::Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root().join("device-ffi/include"))
        .arg(root().join("examples/c/earpiece.c"))
        .arg(thalamus_tests::bin("libthalamus_device_ffi.a"))
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let audio = audio_file(dir.path());
    let (back, stdout) = run_example(
        std::process::Command::new(&exe),
        "earpiece-c",
        &[audio.to_str().unwrap()],
    );
    assert!(stdout.contains("sent 100 frames"), "{stdout}");
    assert!(back >= 90, "{stdout}");
}

/// The Python example (`examples/python/earpiece.py`) on the Python bindings (`device-py`,
/// loaded as the module `thalamus_device` from the library cargo built) logs in, calls the
/// echoing buddy, sends 2 s of PCMU read from a file, counts the frames coming back, and hangs
/// up.
#[test]
fn the_python_example_earpiece_calls_an_echoing_buddy() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        thalamus_tests::bin("libthalamus_device_py.so"),
        dir.path().join("thalamus_device.so"),
    )
    .unwrap();
    let audio = audio_file(dir.path());
    let mut python = std::process::Command::new("python3");
    python
        .arg(root().join("examples/python/earpiece.py"))
        .env("PYTHONPATH", dir.path());
    let (back, stdout) = run_example(python, "earpiece-py", &[audio.to_str().unwrap()]);
    assert!(stdout.contains("sent 100 frames"), "{stdout}");
    assert!(back >= 90, "{stdout}");
}

/// An application that does not read its events does not stall its session: with room for one
/// event in the channel, the client still logs in, places a call and gets it answered while
/// nothing is read; the events then come in order, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_reading_events_late_does_not_stall_its_session() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("slow-reader").unwrap();
    let (_buddy, port) = Sim::buddy(&["--echo"], T).unwrap();
    let fingerprint = thalamus_device::quic::parse_fingerprint(&gw.fingerprint).unwrap();
    let quic = thalamus_device::quic::client_config(Some(fingerprint)).unwrap();
    let session = SessionConfig::new("slow-reader", &secret, vec![gw.quic.to_string()]);
    let mut config = ClientConfig::new(session, quic, "localhost");
    config.event_buffer = 1;
    let (device, mut events) = Client::start(config).unwrap();
    // Nothing is read while the session comes up and the call is placed and answered.
    let deadline = Instant::now() + T;
    let call_ref = loop {
        match tokio::time::timeout(
            Duration::from_secs(1),
            device.dial(&format!("sip:bob@127.0.0.1:{port}"), MediaOffer::default()),
        )
        .await
        {
            Ok(Ok((call_ref, _))) => break call_ref,
            Ok(Err(_)) | Err(_) => {
                assert!(Instant::now() < deadline, "the session never went live");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    gw.wait_metric("thalamus_calls_active", 1.0, T).unwrap();
    // Now read: everything came, in order.
    let mut kinds = Vec::new();
    loop {
        let e = next_event(&mut events, "the answer", |_| true).await;
        let answered = call_state(&e, call_ref, CallState::Answered);
        kinds.push(match e {
            Event::Connecting { .. } => "connecting",
            Event::Connected { .. } => "connected",
            Event::Live(_) => "live",
            Event::Frame(_) => "frame",
            _ => "other",
        });
        if answered {
            break;
        }
    }
    assert_eq!(
        &kinds[..3],
        ["connecting", "connected", "live"],
        "{kinds:?}"
    );
    assert_eq!(device.events_dropped(), 0);
    device.hangup(call_ref).await.unwrap();
    device.close().await;
}
