//! Devices over WebTransport (issue 20, its first part): the way a browser reaches the node.
//!
//! A WebTransport client (HTTP/3 over QUIC; `web-transport-quinn`'s, with the node's
//! WebTransport certificate pinned by its SHA-256 as a browser's `serverCertificateHashes`
//! would; the node's own certificate is refused, as it is not the one served) opens a
//! session at `https://<node>/mbfp` and speaks MBFP inside it as a QUIC device does: it logs in
//! with the same credentials, pings, calls the SIP buddy and gets its audio datagrams echoed
//! back through SIP and RTP. The node counts the session under `transport="webtransport"`. A
//! session asking for another path is refused (404) and counted; a node without
//! `[quic] webtransport` does not offer HTTP/3 at all.
//!
//! A real browser (headless Chromium) on the node's device page: tests/tests/browser.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use thalamus_proto::media::{MediaHeader, StreamId};
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{
    AudioCodec, CallState, Capabilities, Dial, Envelope, Hello, MediaOffer, Ping,
};
use thalamus_proto::{encode_frame, FrameDecoder};
use thalamus_tests::{runtime, Gateway, Sim};

const T: Duration = Duration::from_secs(20);

/// A client pinning the certificate the node serves WebTransport (its short-lived one; the
/// node's own certificate, `gw.fingerprint`, is for raw QUIC devices only).
fn client(gw: &Gateway) -> web_transport_quinn::Client {
    let hash = gw.webtransport_hash.as_ref().unwrap_or(&gw.fingerprint);
    web_transport_quinn::ClientBuilder::new()
        .with_server_certificate_hashes(vec![hex::decode(hash).unwrap()])
        .unwrap()
}

fn url(gw: &Gateway, path: &str) -> url::Url {
    url::Url::parse(&format!("https://127.0.0.1:{}{path}", gw.quic.port())).unwrap()
}

/// The MBFP control stream of a WebTransport session.
struct Control {
    send: web_transport_quinn::SendStream,
    recv: web_transport_quinn::RecvStream,
    buf: BytesMut,
    next_id: u64,
}

impl Control {
    async fn send(&mut self, body: Body) -> u64 {
        self.next_id += 1;
        let env = Envelope {
            request_id: self.next_id,
            body: Some(body),
        };
        let mut frame = BytesMut::new();
        encode_frame(&env, 64 * 1024, &mut frame).unwrap();
        self.send.write_all(&frame).await.unwrap();
        self.next_id
    }

    /// The next frame that `pick` takes (others are skipped), within `T`.
    async fn wait<R>(&mut self, pick: impl Fn(&Envelope) -> Option<R>) -> R {
        let decoder = FrameDecoder::new(64 * 1024);
        let deadline = tokio::time::Instant::now() + T;
        loop {
            while let Some(env) = decoder.decode(&mut self.buf).unwrap() {
                if let Some(found) = pick(&env) {
                    return found;
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.recv.read_chunk(64 * 1024, true))
                .await
                .expect("no frame in time")
                .unwrap()
                .expect("the control stream ended");
            self.buf.extend_from_slice(&chunk.bytes);
        }
    }
}

#[test]
fn a_webtransport_device_logs_in_pings_and_calls_through_sip() {
    let gw = Gateway::start("[quic]\nwebtransport = true").unwrap();
    let secret = gw.add_device("browser").unwrap();
    let (_buddy, port) = Sim::buddy(&["--echo"], T).unwrap();
    runtime().block_on(async {
        let session = client(&gw).connect(url(&gw, "/mbfp")).await.unwrap();
        let (send, recv) = session.open_bi().await.unwrap();
        let mut control = Control {
            send,
            recv,
            buf: BytesMut::new(),
            next_id: 0,
        };
        control
            .send(Body::Hello(Hello {
                device_id: "browser".into(),
                credential: secret.clone(),
                capabilities: Some(Capabilities {
                    audio_codecs: vec![AudioCodec::Pcmu as i32],
                    ..Default::default()
                }),
                software_version: "webtransport-test".into(),
                resume_token: Vec::new(),
            }))
            .await;
        let welcome = control
            .wait(|env| match &env.body {
                Some(Body::Welcome(w)) => Some(w.clone()),
                _ => None,
            })
            .await;
        assert_eq!(welcome.node_id, "node-1", "{welcome:?}");
        // The datagram limit leaves room for WebTransport's session id (1,200 over QUIC).
        assert_eq!(
            welcome.limits.map(|l| l.max_datagram_bytes),
            Some(1_192),
            "{welcome:?}"
        );
        let ping = control.send(Body::Ping(Ping { nonce: 77 })).await;
        let pong = control
            .wait(|env| match &env.body {
                Some(Body::Pong(p)) if env.request_id == ping => Some(p.nonce),
                _ => None,
            })
            .await;
        assert_eq!(pong, 77);

        // A call to the SIP buddy, whose echo sends each RTP packet back.
        control
            .send(Body::Dial(Dial {
                call_ref: 1,
                target: format!("sip:echo@127.0.0.1:{port}"),
                media: Some(MediaOffer {
                    audio_codecs: vec![AudioCodec::Pcmu as i32],
                    ..Default::default()
                }),
                headers: Default::default(),
            }))
            .await;
        control
            .wait(|env| match &env.body {
                Some(Body::CallEvent(e)) if e.state == CallState::Answered as i32 => Some(()),
                _ => None,
            })
            .await;
        let frames = 50u16;
        let mut echoed = 0;
        for seq in 0..frames {
            let header = MediaHeader {
                marker: seq == 0,
                payload_type: 0,
                sequence: seq,
                timestamp: u32::from(seq) * 160,
                call_ref: 1,
                stream_id: StreamId::AUDIO,
            };
            let payload = [seq as u8; 160];
            session
                .send_datagram(header.to_bytes(&payload).unwrap())
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            while let Ok(Ok(datagram)) =
                tokio::time::timeout(Duration::from_millis(1), session.read_datagram()).await
            {
                echoed += usize::from(is_echo(&datagram));
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Ok(datagram)) =
            tokio::time::timeout_at(deadline, session.read_datagram()).await
        {
            echoed += usize::from(is_echo(&datagram));
            if echoed == usize::from(frames) {
                break;
            }
        }
        // Loopback: every frame came back through the gateway, the buddy's RTP and back.
        assert!(
            echoed * 100 >= usize::from(frames) * 98,
            "{echoed} of {frames}"
        );
        assert_eq!(
            gw.metric("thalamus_device_sessions_live_by_transport{transport=\"webtransport\"}")
                .unwrap(),
            1.0
        );
        // The browser closes its session: the node ends it at once (not at its idle timeout).
        session.close(0, b"done");
        let _ = tokio::time::timeout(T, session.closed()).await;
    });
    gw.wait_metric(
        "thalamus_device_connections_total{transport=\"webtransport\"}",
        1.0,
        T,
    )
    .unwrap();
    gw.wait_metric(
        "thalamus_device_sessions_live_by_transport{transport=\"webtransport\"}",
        0.0,
        T,
    )
    .unwrap();
    // The session metrics carry the transport: this session is counted under webtransport,
    // nothing under quic.
    for (sample, want) in [
        (
            "thalamus_device_sessions_started_total{reason=\"new\",transport=\"webtransport\"}",
            1.0,
        ),
        (
            "thalamus_device_sessions_started_total{reason=\"new\",transport=\"quic\"}",
            0.0,
        ),
        (
            "thalamus_device_sessions_ended_total{reason=\"connection_lost\",transport=\"webtransport\"}",
            1.0,
        ),
        (
            "thalamus_mbfp_frames_total{direction=\"in\",kind=\"hello\",transport=\"webtransport\"}",
            1.0,
        ),
        (
            "thalamus_mbfp_frames_total{direction=\"in\",kind=\"hello\",transport=\"quic\"}",
            0.0,
        ),
    ] {
        assert_eq!(gw.metric(sample).unwrap(), want, "{sample}");
    }
}

/// A datagram of call 1's audio with a 160-byte payload.
fn is_echo(datagram: &Bytes) -> bool {
    MediaHeader::decode(datagram).is_ok_and(|h| h.call_ref == 1 && h.stream_id == StreamId::AUDIO)
        && datagram.len() == thalamus_proto::media::HEADER_BYTES + 160
}

#[test]
fn another_path_is_refused_and_a_node_without_webtransport_offers_none() {
    let gw = Gateway::start("[quic]\nwebtransport = true").unwrap();
    runtime().block_on(async {
        let refused = client(&gw).connect(url(&gw, "/other")).await;
        assert!(refused.is_err(), "a session at /other was accepted");
    });
    gw.wait_metric(
        "thalamus_quic_connections_refused_total{reason=\"webtransport_path\"}",
        1.0,
        T,
    )
    .unwrap();
    assert_eq!(
        gw.metric("thalamus_device_connections_total{transport=\"webtransport\"}")
            .unwrap_or(0.0),
        0.0
    );

    // A session that ends its control stream without logging in is closed by the node (its
    // connection does not linger outside the connection limits).
    runtime().block_on(async {
        let session = client(&gw).connect(url(&gw, "/mbfp")).await.unwrap();
        let (mut send, _recv) = session.open_bi().await.unwrap();
        send.write_all(&[0]).await.unwrap();
        send.finish().unwrap();
        let closed = tokio::time::timeout(T, session.closed()).await;
        assert!(closed.is_ok(), "the node kept the session open");
    });
    gw.wait_metric("thalamus_quic_connections_open", 0.0, T)
        .unwrap();

    // Pinning the node's own certificate fails: WebTransport gets its short-lived one.
    runtime().block_on(async {
        let own = web_transport_quinn::ClientBuilder::new()
            .with_server_certificate_hashes(vec![hex::decode(&gw.fingerprint).unwrap()])
            .unwrap();
        assert!(own.connect(url(&gw, "/mbfp")).await.is_err());
    });
    assert_ne!(
        gw.webtransport_hash.as_deref(),
        Some(gw.fingerprint.as_str())
    );

    let plain = Gateway::start("").unwrap();
    assert_eq!(plain.webtransport_hash, None);
    runtime().block_on(async {
        let result = tokio::time::timeout(T, client(&plain).connect(url(&plain, "/mbfp"))).await;
        assert!(
            matches!(result, Ok(Err(_))),
            "a node without webtransport took an HTTP/3 session"
        );
    });
}

/// The load simulator runs WebTransport devices: ten log in, each calls the echo buddy (ten
/// calls a second) with audio, and the node counts them under `transport="webtransport"`.
#[test]
fn the_load_simulator_runs_webtransport_devices() {
    let gw = Gateway::start("[quic]\nwebtransport = true").unwrap();
    let registry = gw.data_dir().join("devices.toml");
    let provision = std::process::Command::new(thalamus_tests::bin("thalamus-sim"))
        .args([
            "provision",
            "--devices",
            "10",
            "--prefix",
            "wt-",
            "--registry",
        ])
        .arg(&registry)
        .output()
        .unwrap();
    assert!(provision.status.success(), "{provision:?}");
    let secret = String::from_utf8(provision.stdout)
        .unwrap()
        .trim()
        .to_string();
    let (_buddy, port) = Sim::buddy(&["--echo"], T).unwrap();
    let out = std::process::Command::new(thalamus_tests::bin("thalamus-sim"))
        .args(["wt-load", "--json", "--prefix", "wt-", "--devices", "10"])
        .args(["--gateway", &gw.quic.to_string()])
        .args([
            "--certificate-hash",
            gw.webtransport_hash.as_deref().unwrap(),
        ])
        .args(["--secret", &secret])
        .args(["--target", &format!("sip:echo@127.0.0.1:{port}")])
        .args(["--cps", "10", "--hold-ms", "1500", "--duration", "4"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        panic!(
            "no summary: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "{summary}");
    assert_eq!(summary["connected"], 10, "{summary}");
    assert_eq!(summary["calls_answered"], 10, "{summary}");
    let sent = summary["frames_sent"].as_u64().unwrap();
    let received = summary["frames_received"].as_u64().unwrap();
    assert!(sent >= 10 * 50, "{summary}");
    // 20 ms audio while each call is up (1.5 s): no burst of the ticks missed before it.
    assert!(sent <= 10 * 80, "{summary}");
    assert!(received * 100 >= sent * 95, "{summary}");
    assert_eq!(
        gw.metric("thalamus_device_connections_total{transport=\"webtransport\"}")
            .unwrap(),
        10.0
    );
}

#[test]
fn a_page_of_another_origin_is_refused() {
    let gw = Gateway::start(
        "[quic]\nwebtransport = true\nwebtransport_origins = [\"https://app.example\"]",
    )
    .unwrap();
    let connect_from = |origin: &str| {
        web_transport_quinn::proto::ConnectRequest::new(url(&gw, "/mbfp")).with_header(
            web_transport_quinn::http::header::ORIGIN,
            web_transport_quinn::http::HeaderValue::from_str(origin).unwrap(),
        )
    };
    runtime().block_on(async {
        // A browser page of another site: refused before any MBFP.
        let refused = client(&gw)
            .connect(connect_from("https://evil.example"))
            .await;
        assert!(refused.is_err(), "a page of another origin got a session");
        // The allowed page's origin, and a native client (no Origin), get theirs.
        let allowed = client(&gw)
            .connect(connect_from("https://app.example"))
            .await
            .unwrap();
        let native = client(&gw).connect(url(&gw, "/mbfp")).await.unwrap();
        allowed.close(0, b"done");
        native.close(0, b"done");
    });
    gw.wait_metric(
        "thalamus_quic_connections_refused_total{reason=\"webtransport_origin\"}",
        1.0,
        T,
    )
    .unwrap();
    assert_eq!(
        gw.metric("thalamus_quic_connections_refused_total{reason=\"webtransport_path\"}")
            .unwrap(),
        0.0
    );
}
