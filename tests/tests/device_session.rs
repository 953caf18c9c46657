//! End to end: a real gateway process, real simulator processes and raw QUIC clients on
//! loopback. Covers the device session acceptance points of the workspace issue.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use thalamus_proto::close_code;
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{ErrorCode, Hello, Ping, Welcome};
use thalamus_sim::device::{DeviceConnection, DeviceError};
use thalamus_tests::{Gateway, Sim};

const T: Duration = Duration::from_secs(15);

/// A raw MBFP client in the test process, for sending what the simulator never would.
async fn raw_connect(gw: &Gateway) -> (quinn::Endpoint, DeviceConnection) {
    let fp = thalamus_sim::quic::parse_fingerprint(&gw.fingerprint).unwrap();
    let config = thalamus_sim::quic::client_config(Some(fp)).unwrap();
    let endpoint = thalamus_sim::quic::client_endpoint(gw.quic, config).unwrap();
    let conn = DeviceConnection::connect(&endpoint, gw.quic, "localhost")
        .await
        .unwrap();
    (endpoint, conn)
}

async fn raw_login(
    gw: &Gateway,
    id: &str,
    secret: &str,
    token: Vec<u8>,
) -> (quinn::Endpoint, DeviceConnection, Welcome) {
    let (ep, mut conn) = raw_connect(gw).await;
    let welcome = conn
        .hello(Hello {
            device_id: id.into(),
            credential: secret.into(),
            resume_token: token,
            ..Default::default()
        })
        .await
        .unwrap();
    (ep, conn, welcome)
}

/// Reads frames until the connection closes; returns the `Error` codes seen and the close code.
async fn read_until_closed(conn: &mut DeviceConnection) -> (Vec<i32>, Option<u64>) {
    let mut errors = Vec::new();
    loop {
        match tokio::time::timeout(T, conn.reader.next()).await {
            Ok(Ok(env)) => {
                if let Some(Body::Error(e)) = env.body {
                    errors.push(e.code);
                }
            }
            Ok(Err(e)) => {
                // The stream may end just before the CONNECTION_CLOSE arrives: wait for it.
                let code = match e.close_code() {
                    Some(code) => Some(code),
                    None => tokio::time::timeout(T, conn.conn.closed())
                        .await
                        .ok()
                        .and_then(|r| DeviceError::from(r).close_code()),
                };
                return (errors, code);
            }
            Err(_) => panic!("connection not closed within {T:?}"),
        }
    }
}

async fn ping_pong(conn: &mut DeviceConnection, nonce: u64) {
    conn.writer.send(Body::Ping(Ping { nonce })).await.unwrap();
    loop {
        let env = tokio::time::timeout(T, conn.reader.next())
            .await
            .expect("pong in time")
            .expect("session alive");
        match env.body {
            Some(Body::Pong(p)) => {
                assert_eq!(p.nonce, nonce);
                return;
            }
            Some(Body::Ping(_)) => {}
            other => panic!("expected Pong, got {other:?}"),
        }
    }
}

#[test]
fn simulator_connects_and_gets_welcome() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("earpiece-1").unwrap();
    let mut sim = Sim::connect(&gw, "earpiece-1", &secret, &[]).unwrap();
    let welcome = sim.wait_event("welcome", T).unwrap();
    assert_eq!(
        welcome["address_of_record"],
        "sip:earpiece-1@thalamus.local"
    );
    assert_eq!(welcome["resumed"], false);
    assert_eq!(welcome["session_id"].as_str().unwrap().len(), 32);
    assert_eq!(
        gw.admin_get("/sessions").unwrap().trim(),
        "[\"earpiece-1\"]"
    );
    assert_eq!(gw.metric("thalamus_device_sessions_live").unwrap(), 1.0);
}

#[test]
fn wrong_secret_is_unauthenticated_and_closed() {
    let gw = Gateway::start("").unwrap();
    gw.add_device("earpiece-1").unwrap();
    let mut sim = Sim::connect(&gw, "earpiece-1", "not-the-secret", &[]).unwrap();
    let err = sim.wait_event("error", T).unwrap();
    assert_eq!(err["code"], "unauthenticated");
    assert_eq!(
        sim.proc.wait_exit(T).unwrap(),
        Some(3),
        "the simulator stops for good"
    );

    // A raw client sees the close code too, and an unknown device gets the same answer.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_ep, mut conn) = raw_connect(&gw).await;
        conn.writer
            .send(Body::Hello(Hello {
                device_id: "nobody".into(),
                credential: "x".into(),
                ..Default::default()
            }))
            .await
            .unwrap();
        let (errors, code) = read_until_closed(&mut conn).await;
        assert_eq!(errors, vec![ErrorCode::Unauthenticated as i32]);
        assert_eq!(code, Some(close_code::UNAUTHENTICATED.into()));
    });
    assert_eq!(
        gw.metric(
            "thalamus_device_auth_failures_total{reason=\"wrong_secret\",transport=\"quic\"}"
        )
        .unwrap(),
        1.0
    );
    assert_eq!(
        gw.metric(
            "thalamus_device_auth_failures_total{reason=\"unknown_device\",transport=\"quic\"}"
        )
        .unwrap(),
        1.0
    );
}

#[test]
fn garbage_on_one_session_does_not_disturb_another() {
    let gw = Gateway::start("").unwrap();
    let s1 = gw.add_device("good").unwrap();
    let s2 = gw.add_device("bad").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_e1, mut good, _) = raw_login(&gw, "good", &s1, vec![]).await;
        let (_e2, mut bad, _) = raw_login(&gw, "bad", &s2, vec![]).await;
        // A length prefix of 5 followed by bytes that are not protobuf.
        bad.writer
            .send_raw(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        let (errors, code) = read_until_closed(&mut bad).await;
        assert_eq!(errors, vec![ErrorCode::BadFrame as i32]);
        assert_eq!(code, Some(close_code::PROTOCOL_ERROR.into()));
        // The other device is unaffected.
        ping_pong(&mut good, 77).await;
        gw.wait_metric("thalamus_device_sessions_live", 1.0, T)
            .unwrap();
    });
    assert_eq!(
        gw.metric("thalamus_mbfp_frame_errors_total{reason=\"bad_frame\",transport=\"quic\"}")
            .unwrap(),
        1.0
    );
}

#[test]
fn oversized_frame_gets_frame_too_large() {
    let gw = Gateway::start("[session]\nmax_frame_bytes = 4096").unwrap();
    let secret = gw.add_device("big").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_ep, mut conn, welcome) = raw_login(&gw, "big", &secret, vec![]).await;
        assert_eq!(welcome.limits.unwrap().max_frame_bytes, 4096);
        let mut frame = BytesMut::new();
        frame.put_u32(10_000);
        frame.put_slice(&[0u8; 64]);
        conn.writer.send_raw(&frame).await.unwrap();
        let (errors, code) = read_until_closed(&mut conn).await;
        assert_eq!(errors, vec![ErrorCode::FrameTooLarge as i32]);
        assert_eq!(code, Some(close_code::FRAME_TOO_LARGE.into()));
    });
}

#[test]
fn unknown_message_kind_is_unsupported_not_a_disconnect() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("future").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_ep, mut conn, _) = raw_login(&gw, "future", &secret, vec![]).await;
        // request_id = 9, then field 99 (a body kind from a later version), 1 byte long.
        let body = [0x08, 0x09, 0x9a, 0x06, 0x01, 0x00];
        let mut frame = BytesMut::new();
        frame.put_u32(body.len() as u32);
        frame.put_slice(&body);
        conn.writer.send_raw(&frame).await.unwrap();
        let env = tokio::time::timeout(T, conn.reader.next())
            .await
            .unwrap()
            .unwrap();
        match env.body {
            Some(Body::Error(e)) => {
                assert_eq!(e.code, ErrorCode::Unsupported as i32);
                assert_eq!(e.request_id, 9);
            }
            other => panic!("expected Error, got {other:?}"),
        }
        ping_pong(&mut conn, 5).await;
    });
}

#[test]
fn second_login_replaces_the_first() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("twin").unwrap();
    let mut first = Sim::connect(&gw, "twin", &secret, &[]).unwrap();
    first.wait_event("welcome", T).unwrap();
    let mut second = Sim::connect(&gw, "twin", &secret, &[]).unwrap();
    second.wait_event("welcome", T).unwrap();
    let bye = first.wait_event("goodbye", T).unwrap();
    assert_eq!(bye["reason"], "replaced");
    assert_eq!(first.proc.wait_exit(T).unwrap(), Some(4));
    assert_eq!(gw.admin_get("/sessions").unwrap().trim(), "[\"twin\"]");
    gw.wait_metric(
        "thalamus_device_sessions_ended_total{reason=\"replaced\",transport=\"quic\"}",
        1.0,
        T,
    )
    .unwrap();
}

#[test]
fn dropped_connection_resumes_with_the_token() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("roamer").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (ep, conn, first) = raw_login(&gw, "roamer", &secret, vec![]).await;
        // Drop the connection without a goodbye.
        conn.conn.close(0u32.into(), b"network went away");
        drop(conn);
        ep.wait_idle().await;
        let (_ep2, _conn2, again) =
            raw_login(&gw, "roamer", &secret, first.resume_token.clone()).await;
        assert!(again.resumed);
        assert_eq!(again.session_id, first.session_id);
        // A token is bound to its device.
        let other = gw.add_device("thief").unwrap();
        let (_ep3, _conn3, stolen) = raw_login(&gw, "thief", &other, first.resume_token).await;
        assert!(!stolen.resumed);
        assert_ne!(stolen.session_id, first.session_id);
    });
    assert_eq!(
        gw.metric("thalamus_resume_rejected_total{reason=\"bad_signature\",transport=\"quic\"}")
            .unwrap(),
        1.0
    );
}

#[test]
fn simulator_reconnects_and_resumes_after_the_gateway_restarts() {
    // Below the ephemeral range: no client socket takes the port while the node is down.
    let port = thalamus_tests::cluster::free_port_below_ephemeral().unwrap();
    let gw = Gateway::start_in(
        tempfile::tempdir().unwrap(),
        &format!("127.0.0.1:{port}"),
        "",
    )
    .unwrap();
    let secret = gw.add_device("survivor").unwrap();
    let quic = gw.quic.to_string();
    let mut sim = Sim::connect(&gw, "survivor", &secret, &[]).unwrap();
    let first = sim.wait_event("welcome", T).unwrap();
    // The node dies (SIGKILL) and comes back on the same address with the same data.
    let dir = gw.kill();
    sim.wait_event("disconnected", Duration::from_secs(60))
        .unwrap();
    sim.wait_event("reconnecting", T).unwrap();
    let gw = Gateway::start_in(dir, &quic, "").unwrap();
    let again = sim.wait_event("welcome", Duration::from_secs(60)).unwrap();
    assert_eq!(again["resumed"], true, "{again}");
    assert_eq!(again["session_id"], first["session_id"]);
    assert_eq!(gw.admin_get("/sessions").unwrap().trim(), "[\"survivor\"]");
}

#[test]
fn per_address_connection_limit_refuses_and_counts() {
    let gw = Gateway::start("[quic]\nmax_connections_per_ip = 2").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_e1, _c1) = raw_connect(&gw).await;
        let (_e2, _c2) = raw_connect(&gw).await;
        let fp = thalamus_sim::quic::parse_fingerprint(&gw.fingerprint).unwrap();
        let config = thalamus_sim::quic::client_config(Some(fp)).unwrap();
        let endpoint = thalamus_sim::quic::client_endpoint(gw.quic, config).unwrap();
        let third = DeviceConnection::connect(&endpoint, gw.quic, "localhost").await;
        assert!(
            third.is_err(),
            "the third connection from one address is refused"
        );
    });
    assert_eq!(
        gw.metric("thalamus_quic_connections_refused_total{reason=\"per_ip_limit\"}")
            .unwrap(),
        1.0
    );
}

#[test]
fn silent_connection_is_closed_after_the_hello_timeout() {
    let gw = Gateway::start("[quic]\nhello_timeout_ms = 300").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_ep, mut conn) = raw_connect(&gw).await;
        // Open the stream with a partial frame, then say nothing more.
        conn.writer.send_raw(&[0, 0]).await.unwrap();
        let (errors, code) = read_until_closed(&mut conn).await;
        assert_eq!(errors, vec![ErrorCode::ProtocolViolation as i32]);
        assert_eq!(code, Some(close_code::PROTOCOL_ERROR.into()));
    });
}

#[test]
fn repeated_failures_from_one_address_are_slowed_down() {
    let gw = Gateway::start("[auth]\nfree_failures = 1\nfailure_delay_ms = 50").unwrap();
    gw.add_device("target").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for _ in 0..3 {
            let (_ep, mut conn) = raw_connect(&gw).await;
            let r = conn
                .hello(Hello {
                    device_id: "target".into(),
                    credential: "guess".into(),
                    ..Default::default()
                })
                .await;
            assert!(matches!(r, Err(DeviceError::Refused(_))));
        }
    });
    assert!(gw.metric("thalamus_device_auth_throttled_total").unwrap() >= 1.0);
}

#[test]
fn bad_config_key_is_named_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[quic]\nlisten_port = 4433\n").unwrap();
    let out = std::process::Command::new(thalamus_tests::bin("thalamus"))
        .arg("--config")
        .arg(&path)
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen_port"), "{err}");
}
