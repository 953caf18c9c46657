//! End to end: the real `thalamus balancer` process, two fake gateway nodes in this process
//! (SIP over UDP with `SipTransport`, heartbeats with `HeartbeatSender`) and SIPp placing calls
//! through the balancer. Checks the split by node against the ownership function, zero failed
//! calls, that ACK and BYE follow their INVITE, that once one node's heartbeats stop new calls
//! go to the survivor after the detection window, and that the node restarted (new session) is
//! seen as a restart and gets its devices back. A client over TLS calls a node through the
//! balancer's TLS listener, its dialog Record-Routed twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use thalamus_gateway::heartbeat::{HeartbeatSender, HeartbeatSenderConfig};
use thalamus_ownership::{owner, NodeId};
use thalamus_sip::message::{HeaderName, MediaType, Message, Method, Response};
use thalamus_sip::transport::{PeerTransport, SipTransport, TransportConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Heartbeat interval of the nodes and the balancer: a node is out after 3.5 of these.
const HEARTBEAT_MS: u64 = 200;

/// The balancer process, killed on drop.
struct Balancer {
    child: std::process::Child,
    sip: SocketAddr,
    heartbeat: SocketAddr,
    admin: SocketAddr,
    /// SIP over TLS, with a `[sip.tls]` section.
    sip_tls: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_balancer() -> Balancer {
    start_balancer_with("").await
}

/// A balancer with `extra` lines in its `[heartbeat]` section.
async fn start_balancer_with(extra: &str) -> Balancer {
    start_balancer_sections(extra, "").await
}

/// A balancer with `extra` lines in its `[heartbeat]` section and `sections` after the rest.
async fn start_balancer_sections(extra: &str, sections: &str) -> Balancer {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("balancer.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\nlisten = \"127.0.0.1:0\"\n\n[heartbeat]\nlisten = \"127.0.0.1:0\"\n\
             interval_ms = {HEARTBEAT_MS}\nmiss_count = 3\nrejoin_count = 2\n{extra}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n{sections}"
        ),
    )
    .unwrap();
    let ready = dir.path().join("ready.json");
    let child = std::process::Command::new(thalamus_tests::bin("thalamus"))
        .arg("balancer")
        .arg("--config")
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .env("THALAMUS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&ready) {
            if !t.is_empty() {
                break t;
            }
        }
        assert!(Instant::now() < deadline, "balancer did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let addr = |k: &str| v[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
    Balancer {
        child,
        sip: addr("sip_udp"),
        heartbeat: addr("heartbeat"),
        admin: addr("admin"),
        sip_tls: v["sip_tls"].as_str().map(|a| a.parse().unwrap()),
        _dir: dir,
    }
}

/// What one fake node saw.
#[derive(Debug, Default)]
struct Seen {
    invites: BTreeSet<String>,
    acks: BTreeSet<String>,
    byes: BTreeSet<String>,
    /// INVITEs whose top Record-Route did not name this node.
    bad_record_route: usize,
}

struct FakeNode {
    id: NodeId,
    sip: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    heartbeats: HeartbeatSender,
    _transport: SipTransport,
}

/// A gateway node stand-in: answers INVITE 200 (with Record-Route, Contact and SDP), absorbs
/// ACK, answers BYE and anything else 200, and records the Call-IDs it saw.
async fn start_node(name: &str, balancer: &Balancer) -> FakeNode {
    start_node_with(name, balancer, None).await
}

/// [`start_node`] whose heartbeats carry `secret`'s HMAC.
async fn start_node_with(name: &str, balancer: &Balancer, secret: Option<&[u8]>) -> FakeNode {
    let id = NodeId::new(name).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let transport = SipTransport::bind(
        TransportConfig {
            udp: Some("127.0.0.1:0".parse().unwrap()),
            tcp: None,
            ..TransportConfig::default()
        },
        tx,
        tokio::sync::mpsc::channel(1).0,
    )
    .await
    .unwrap();
    let sip = transport.local_addr(PeerTransport::Udp).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (t, s, node) = (transport.clone(), Arc::clone(&seen), id.clone());
    tokio::spawn(async move {
        let mut answered = 0u64;
        while let Some(inbound) = rx.recv().await {
            let Message::Request(req) = inbound.message else {
                continue;
            };
            let call_id = req.headers.call_id().unwrap().to_owned();
            let mut resp = Response::from_request(&req, 200, None);
            match req.method {
                Method::Ack => {
                    s.lock().unwrap().acks.insert(call_id);
                    continue;
                }
                Method::Invite => {
                    let rr: Vec<_> = req
                        .headers
                        .get_all(&HeaderName::RecordRoute)
                        .cloned()
                        .collect();
                    {
                        let mut seen = s.lock().unwrap();
                        let names_us = rr.first().is_some_and(|v| {
                            v.to_str()
                                .unwrap()
                                .contains(&format!(";node={};", node.as_str()))
                        });
                        if !names_us {
                            seen.bad_record_route += 1;
                        }
                        seen.invites.insert(call_id);
                    }
                    answered += 1;
                    resp.set_to_tag(&format!("{node}-{answered}"));
                    for v in rr {
                        resp.headers.push(HeaderName::RecordRoute, v);
                    }
                    let user = req.uri.user().unwrap_or("gw").to_owned();
                    resp.headers
                        .push(HeaderName::Contact, format!("<sip:{user}@{sip}>"));
                    resp.set_body(
                        Bytes::from_static(
                            b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n\
                              t=0 0\r\nm=audio 9 RTP/AVP 0\r\n",
                        ),
                        Some(&MediaType::sdp()),
                    );
                }
                Method::Bye => {
                    s.lock().unwrap().byes.insert(call_id);
                }
                _ => {}
            }
            let _ = t.send(inbound.peer, resp.to_bytes(), None).await;
        }
    });
    let mut config = HeartbeatSenderConfig::new(id.clone(), sip, vec![balancer.heartbeat]);
    config.interval = Duration::from_millis(HEARTBEAT_MS);
    config.bind = "127.0.0.1:0".parse().unwrap();
    config.secret = secret.map(<[u8]>::to_vec);
    let heartbeats = HeartbeatSender::start(config).await.unwrap();
    FakeNode {
        id,
        sip,
        seen,
        heartbeats,
        _transport: transport,
    }
}

/// `GET path` on the admin endpoint; the body.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        return out;
    }
    body.to_owned()
}

async fn node_states(balancer: &Balancer) -> BTreeMap<String, (String, bool)> {
    let body = http_get(balancer.admin, "/nodes").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_owned(),
                (
                    n["state"].as_str().unwrap().to_owned(),
                    n["eligible"].as_bool().unwrap(),
                ),
            )
        })
        .collect()
}

async fn wait_for<F>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: AsyncFnMut() -> bool,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// SIPp's `uac`, with the Request-URI user taken from the injection file (one device per
/// call) and the Record-Route honoured for ACK and BYE.
const SCENARIO: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="balancer uac">
  <send retrans="500">
    <![CDATA[

      INVITE sip:[field0]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[field0]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000

    ]]>
  </send>
  <recv response="100" optional="true"></recv>
  <recv response="180" optional="true"></recv>
  <recv response="200" rtd="true" rrs="true"></recv>
  <send>
    <![CDATA[

      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      [routes]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[field0]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <pause milliseconds="PAUSE_MS"/>
  <send retrans="500">
    <![CDATA[

      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      [routes]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[field0]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"></recv>
</scenario>
"#;

/// Runs SIPp for one call per device in `devices`; returns its exit code (0: every call
/// succeeded).
async fn sipp(dir: &Path, balancer: SocketAddr, devices: &[String]) -> i32 {
    sipp_over(dir, balancer, devices, "u1", 20).await
}

/// [`sipp`] over a SIPp transport (`u1`: UDP, `t1`: one TCP connection).
async fn sipp_over(
    dir: &Path,
    balancer: SocketAddr,
    devices: &[String],
    transport: &str,
    call_ms: u32,
) -> i32 {
    let scenario = dir.join("uac.xml");
    std::fs::write(
        &scenario,
        SCENARIO.replace("PAUSE_MS", &call_ms.to_string()),
    )
    .unwrap();
    let users = dir.join("devices.csv");
    let mut csv = String::from("SEQUENTIAL\n");
    for d in devices {
        csv.push_str(&format!("{d};\n"));
    }
    std::fs::write(&users, csv).unwrap();
    let sipp = PathBuf::from("/usr/bin/sipp");
    assert!(
        sipp.exists(),
        "SIPp is missing: scripts/install-peers installs it (Debian package sip-tester)"
    );
    let mut child = tokio::process::Command::new(sipp)
        .current_dir(dir)
        .args(["-sf", scenario.to_str().unwrap()])
        .args(["-inf", users.to_str().unwrap()])
        .args(["-m", &devices.len().to_string()])
        .args(["-r", "100", "-l", "50", "-t", transport])
        .args(["-i", "127.0.0.1"])
        .args(["-p", &free_udp_port().to_string()])
        .args(["-mp", &free_udp_port().to_string()])
        .args(["-timeout", "60s", "-timeout_error", "-nostdin"])
        .arg(balancer.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(90), child.wait())
        .await
        .expect("SIPp did not finish")
        .unwrap();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err).await;
        }
        eprintln!("SIPp stderr: {err}");
    }
    status.code().unwrap_or(-1)
}

fn counts(node: &FakeNode) -> (usize, usize, usize) {
    let s = node.seen.lock().unwrap();
    (s.invites.len(), s.acks.len(), s.byes.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_calls_split_by_owner_and_move_to_the_survivor() {
    let balancer = start_balancer().await;
    let a = start_node("gw-a", &balancer).await;
    let b = start_node("gw-b", &balancer).await;
    wait_for("both nodes up", Duration::from_secs(10), async || {
        let s = node_states(&balancer).await;
        s.get("gw-a").is_some_and(|x| x.0 == "up") && s.get("gw-b").is_some_and(|x| x.0 == "up")
    })
    .await;

    // Phase 1: 200 calls, one device each, through the balancer.
    let dir = tempfile::tempdir().unwrap();
    let devices: Vec<String> = (0..200).map(|i| format!("earpiece-{i}")).collect();
    assert_eq!(
        sipp(dir.path(), balancer.sip, &devices).await,
        0,
        "failed calls"
    );
    let live = [a.id.clone(), b.id.clone()];
    let expected_a = devices
        .iter()
        .filter(|d| owner(d, &live) == Some(&a.id))
        .count();
    let expected_b = devices.len() - expected_a;
    let (a_inv, a_ack, a_bye) = counts(&a);
    let (b_inv, b_ack, b_bye) = counts(&b);
    println!("split: gw-a {a_inv} calls, gw-b {b_inv} calls (expected {expected_a}/{expected_b})");
    assert_eq!((a_inv, b_inv), (expected_a, expected_b));
    assert!(a_inv > 50 && b_inv > 50, "uneven split {a_inv}/{b_inv}");
    assert_eq!((a_ack, a_bye), (a_inv, a_inv));
    assert_eq!((b_ack, b_bye), (b_inv, b_inv));
    for node in [&a, &b] {
        let s = node.seen.lock().unwrap();
        // ACK and BYE reached the node that had the INVITE.
        assert!(s.acks.is_subset(&s.invites) && s.byes.is_subset(&s.invites));
        assert_eq!(
            s.bad_record_route, 0,
            "{} got a foreign Record-Route",
            node.id
        );
    }

    // Phase 2: gw-b's heartbeats stop (its SIP side still answers, so only the balancer's
    // choice keeps calls away from it).
    b.heartbeats.stop();
    let stopped = Instant::now();
    wait_for("gw-b taken out", Duration::from_secs(10), async || {
        node_states(&balancer)
            .await
            .get("gw-b")
            .is_some_and(|x| x.0 == "down")
    })
    .await;
    let detection = stopped.elapsed();
    println!("gw-b taken out after {detection:?}");
    // 3 missed heartbeats (+ half an interval): never before 3 intervals.
    assert!(
        detection >= Duration::from_millis(3 * HEARTBEAT_MS - 50),
        "{detection:?}"
    );
    assert!(a.heartbeats.sent() > 0);

    let devices2: Vec<String> = (200..300).map(|i| format!("earpiece-{i}")).collect();
    let moved = devices2
        .iter()
        .filter(|d| owner(d, &live) == Some(&b.id))
        .count();
    assert!(
        moved > 10,
        "too few of the new devices belong to gw-b: {moved}"
    );
    assert_eq!(
        sipp(dir.path(), balancer.sip, &devices2).await,
        0,
        "failed calls"
    );
    let (a_inv2, _, a_bye2) = counts(&a);
    let (b_inv2, _, _) = counts(&b);
    assert_eq!(b_inv2, b_inv, "gw-b got calls after it was taken out");
    assert_eq!(a_inv2, a_inv + devices2.len());
    assert_eq!(a_bye2, a_inv2);

    let metrics = http_get(balancer.admin, "/metrics").await;
    let value = |name: &str| metric(&metrics, name);
    assert_eq!(value("thalamus_balancer_nodes_up"), 1.0);
    assert!(value("thalamus_balancer_nodes_taken_out_total") >= 1.0);
    assert!(value("thalamus_balancer_heartbeats_missed_total") >= 3.0);
    // INVITE, ACK and BYE of every call (retransmissions may add some).
    let to_b = value("thalamus_balancer_requests_forwarded_total{node=\"gw-b\"}");
    assert!(to_b >= (b_inv * 3) as f64, "{to_b}");
    let from_a = value("thalamus_balancer_responses_forwarded_total{node=\"gw-a\"}");
    assert!(from_a >= (2 * a_inv2) as f64, "{from_a}");

    // Phase 3: gw-b comes back as a new process (new session id): a restart, up again after
    // two consecutive heartbeats, and its devices come back to it.
    let mut config = HeartbeatSenderConfig::new(b.id.clone(), b.sip, vec![balancer.heartbeat]);
    config.interval = Duration::from_millis(HEARTBEAT_MS);
    let restarted = HeartbeatSender::start(config).await.unwrap();
    assert_ne!(restarted.session_id(), b.heartbeats.session_id());
    wait_for("gw-b back up", Duration::from_secs(10), async || {
        node_states(&balancer)
            .await
            .get("gw-b")
            .is_some_and(|x| x.0 == "up")
    })
    .await;
    let devices3: Vec<String> = (300..400).map(|i| format!("earpiece-{i}")).collect();
    let expected_b3 = devices3
        .iter()
        .filter(|d| owner(d, &live) == Some(&b.id))
        .count();
    assert_eq!(
        sipp(dir.path(), balancer.sip, &devices3).await,
        0,
        "failed calls"
    );
    let (a_inv3, _, _) = counts(&a);
    let (b_inv3, _, _) = counts(&b);
    assert_eq!(b_inv3 - b_inv, expected_b3);
    assert_eq!(a_inv3 - a_inv2, devices3.len() - expected_b3);
    let metrics = http_get(balancer.admin, "/metrics").await;
    assert_eq!(metric(&metrics, "thalamus_balancer_restarts_total"), 1.0);
    assert_eq!(metric(&metrics, "thalamus_balancer_nodes_up"), 2.0);
}

/// The value of one sample in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no `{name}` in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_over_tcp_reaches_udp_nodes_and_back() {
    let balancer = start_balancer().await;
    let a = start_node("gw-a", &balancer).await;
    let b = start_node("gw-b", &balancer).await;
    wait_for("both nodes up", Duration::from_secs(10), async || {
        node_states(&balancer)
            .await
            .values()
            .filter(|x| x.0 == "up")
            .count()
            == 2
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let devices: Vec<String> = (0..60).map(|i| format!("tcp-device-{i}")).collect();
    assert_eq!(
        sipp_over(dir.path(), balancer.sip, &devices, "t1", 20).await,
        0,
        "failed calls over TCP"
    );
    let live = [a.id.clone(), b.id.clone()];
    let expected_a = devices
        .iter()
        .filter(|d| owner(d, &live) == Some(&a.id))
        .count();
    assert_eq!(counts(&a), (expected_a, expected_a, expected_a));
    let expected_b = devices.len() - expected_a;
    assert_eq!(counts(&b), (expected_b, expected_b, expected_b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_node_keeps_its_calls_and_gets_no_new_ones() {
    let balancer = start_balancer().await;
    let a = start_node("gw-a", &balancer).await;
    let b = start_node("gw-b", &balancer).await;
    wait_for("both nodes up", Duration::from_secs(10), async || {
        node_states(&balancer)
            .await
            .values()
            .filter(|x| x.0 == "up")
            .count()
            == 2
    })
    .await;
    let live = [a.id.clone(), b.id.clone()];
    let devices: Vec<String> = (0..40).map(|i| format!("drain-device-{i}")).collect();
    let expected_b = devices
        .iter()
        .filter(|d| owner(d, &live) == Some(&b.id))
        .count();
    assert!(expected_b > 5);

    // Calls of 3 s: gw-b starts draining while its calls are up.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let sip = balancer.sip;
    let long_calls = {
        let devices = devices.clone();
        tokio::spawn(async move { sipp_over(&path, sip, &devices, "u1", 3000).await })
    };
    wait_for("every call answered", Duration::from_secs(60), async || {
        counts(&a).1 + counts(&b).1 == devices.len()
    })
    .await;
    assert_eq!(counts(&b).2, 0, "a BYE came before draining started");
    b.heartbeats.set_draining(true);
    wait_for("gw-b draining", Duration::from_secs(10), async || {
        node_states(&balancer)
            .await
            .get("gw-b")
            .is_some_and(|x| x.0 == "up" && !x.1)
    })
    .await;

    // New calls all go to gw-a while gw-b's calls are still up.
    let dir2 = tempfile::tempdir().unwrap();
    let new_devices: Vec<String> = (40..80).map(|i| format!("drain-device-{i}")).collect();
    assert_eq!(
        sipp(dir2.path(), balancer.sip, &new_devices).await,
        0,
        "failed new calls"
    );
    assert_eq!(
        counts(&b).0,
        expected_b,
        "gw-b got a new call while draining"
    );

    // gw-b's existing calls end on gw-b: their BYEs follow the Record-Route to it.
    assert_eq!(long_calls.await.unwrap(), 0, "failed long calls");
    assert_eq!(counts(&b), (expected_b, expected_b, expected_b));
    let metrics = http_get(balancer.admin, "/metrics").await;
    assert_eq!(metric(&metrics, "thalamus_balancer_nodes_draining"), 1.0);
}

/// The value of a labelled counter (0 when absent).
fn labelled(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}{{{label}}} ")))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Attack: forged and replayed heartbeats against a balancer with a secret, while SIPp calls
/// go through it to the real node. Forged ones (no MAC, a wrong secret), a recording of the
/// node's previous session (signed, 2 s old: inside the clock window) and a recording from a
/// minute ago (signed) are all refused and counted; none is answered (no amplification); the
/// real node stays the only one, never restarts, and every call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_heartbeats_change_nothing_while_calls_go_on() {
    use thalamus_ownership::heartbeat::{unix_ms, Heartbeat, Load, HEARTBEAT_VERSION};
    let secret = b"cluster-secret".as_slice();
    let balancer = start_balancer_with("secret = \"cluster-secret\"").await;
    let a = start_node_with("gw-a", &balancer, Some(secret)).await;
    wait_for("the node up", Duration::from_secs(10), async || {
        node_states(&balancer)
            .await
            .get("gw-a")
            .is_some_and(|x| x.0 == "up")
    })
    .await;
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let now = unix_ms(std::time::SystemTime::now());
    let heartbeat = |node: &str, session: &str, ts_ms: u64| Heartbeat {
        v: HEARTBEAT_VERSION,
        node: NodeId::new(node).unwrap(),
        session: session.into(),
        seq: 1,
        sip: attacker.local_addr().unwrap(),
        quic: None,
        draining: false,
        load: Load::default(),
        ts_ms,
        pinned: Vec::new(),
        store_down_ms: 0,
    };
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        (
            "no MAC: a stranger joins",
            heartbeat("evil", "e1", now).encode(None),
        ),
        (
            "wrong secret: a stranger takes gw-a's id",
            heartbeat("gw-a", "e2", now).encode(Some(b"guess")),
        ),
        (
            "gw-a's previous session, replayed 2 s later",
            heartbeat("gw-a", "old-session", now - 2_000).encode(Some(secret)),
        ),
        (
            "gw-a's heartbeat recorded a minute ago",
            heartbeat("gw-a", "older-session", now - 60_000).encode(Some(secret)),
        ),
    ];
    // The attack runs during the calls: 4 datagrams every 5 ms.
    let target = balancer.heartbeat;
    let flood = {
        let datagrams: Vec<Vec<u8>> = attacks.iter().map(|(_, d)| d.clone()).collect();
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        tokio::spawn(async move {
            let mut sent = 0u64;
            for _ in 0..600 {
                for d in &datagrams {
                    let _ = socket.send_to(d, target).await;
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sent
        })
    };
    for (_, d) in &attacks {
        attacker.send_to(d, target).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let devices: Vec<String> = (0..100).map(|i| format!("attacked-{i}")).collect();
    assert_eq!(
        sipp(dir.path(), balancer.sip, &devices).await,
        0,
        "calls failed during the attack"
    );
    let sent = flood.await.unwrap();
    assert_eq!(
        counts(&a).0,
        devices.len(),
        "every call reached the real node"
    );
    // Nothing answered the attacker.
    let mut buf = [0u8; 4096];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), attacker.recv_from(&mut buf))
            .await
            .is_err(),
        "the balancer answered a refused heartbeat"
    );
    let states = node_states(&balancer).await;
    assert_eq!(states.keys().collect::<Vec<_>>(), ["gw-a"], "{states:?}");
    assert_eq!(states["gw-a"], ("up".to_string(), true));
    let metrics = http_get(balancer.admin, "/metrics").await;
    assert_eq!(metric(&metrics, "thalamus_balancer_restarts_total"), 0.0);
    let refused = |reason: &str| {
        labelled(
            &metrics,
            "thalamus_balancer_heartbeats_rejected_total",
            &format!("reason=\"{reason}\""),
        )
    };
    println!(
        "control-plane attack: {sent} forged/replayed heartbeats during {} calls; refused: \
         unauthenticated {}, bad_mac {}, old_session {}, clock {}",
        devices.len(),
        refused("unauthenticated"),
        refused("bad_mac"),
        refused("old_session"),
        refused("clock")
    );
    for reason in ["unauthenticated", "bad_mac", "old_session", "clock"] {
        assert!(refused(reason) >= 100.0, "{reason}: {}", refused(reason));
    }
    assert!(
        a.heartbeats.reports() > 0,
        "the real node still gets its live set"
    );
}

/// A client over TLS calls through the balancer's TLS listener (`[sip.tls]`): the INVITE
/// reaches the node over UDP Record-Routed twice (the balancer's UDP address on top for the
/// node, its TLS address for the client), the 200 comes back on the client's connection, and
/// the client's ACK and BYE, routed by that route set, reach the node and the BYE's 200 comes
/// back too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_calls_a_node_through_the_balancer() {
    let certs = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (crt, key) = (certs.path().join("lb.crt"), certs.path().join("lb.key"));
    std::fs::write(&crt, cert.cert.pem()).unwrap();
    std::fs::write(&key, cert.key_pair.serialize_pem()).unwrap();
    let balancer = start_balancer_sections(
        "",
        &format!(
            "\n[sip.tls]\nlisten = \"127.0.0.1:0\"\ncertificate = {:?}\nprivate_key = {:?}\n\
             ca_certificates = {:?}\n",
            crt.display().to_string(),
            key.display().to_string(),
            crt.display().to_string()
        ),
    )
    .await;
    let lb_tls = balancer.sip_tls.expect("the balancer listens for TLS");
    let node = start_node("gw-a", &balancer).await;
    wait_for("the node up", Duration::from_secs(10), async || {
        node_states(&balancer)
            .await
            .get("gw-a")
            .is_some_and(|x| x.0 == "up")
    })
    .await;

    // The client: TLS toward the balancer, trusting its certificate.
    let (tx, mut inbound) = tokio::sync::mpsc::channel(16);
    let pem = std::fs::read(&crt).unwrap();
    let client = SipTransport::bind(
        TransportConfig {
            udp: None,
            tcp: None,
            tls: Some(thalamus_sip::transport::TlsTransportConfig {
                listen: None,
                server: None,
                client: thalamus_sip::transport::tls::client_config(&pem, true).unwrap(),
                handshake_timeout: Duration::from_secs(5),
            }),
            ..TransportConfig::default()
        },
        tx,
        tokio::sync::mpsc::channel(1).0,
    )
    .await
    .unwrap();
    let to_lb = thalamus_sip::transport::Peer::new(lb_tls, PeerTransport::Tls);
    let request = |method: &str, cseq: u32, route: &str, to_tag: &str| {
        format!(
            "{method} sip:earpiece-1@gw.example.net SIP/2.0\r\n\
             Via: SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bK-tls-{cseq};rport\r\n{route}\
             Max-Forwards: 70\r\nTo: <sip:earpiece-1@gw.example.net>{to_tag}\r\n\
             From: <sip:alice@example.com>;tag=a1\r\nCall-ID: tls-call-1@test\r\n\
             CSeq: {cseq} {method}\r\nContact: <sip:alice@127.0.0.1:5061;transport=tls>\r\n\
             Content-Length: 0\r\n\r\n"
        )
    };
    client
        .send(to_lb, Bytes::from(request("INVITE", 1, "", "")), None)
        .await
        .unwrap();
    let answer = loop {
        let got = tokio::time::timeout(Duration::from_secs(10), inbound.recv())
            .await
            .expect("an answer to the INVITE")
            .unwrap();
        assert_eq!(
            got.peer, to_lb,
            "the answer comes back on the TLS connection"
        );
        match got.message {
            Message::Response(r) if r.status == 200 => break r,
            _ => continue,
        }
    };
    let rr: Vec<String> = answer
        .headers
        .get_all(&HeaderName::RecordRoute)
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(rr.len(), 2, "{rr:?}");
    assert!(rr[1].contains(&format!(":{};", lb_tls.port())) && rr[1].contains("transport=tls"));
    assert!(!rr[0].contains("transport="), "{rr:?}");
    // The client's route set: the Record-Route reversed (its TLS entry first).
    let route = format!("Route: {}, {}\r\n", rr[1], rr[0]);
    let to_tag = format!(";tag={}", answer.headers.to_tag().unwrap());
    client
        .send(to_lb, Bytes::from(request("ACK", 1, &route, &to_tag)), None)
        .await
        .unwrap();
    client
        .send(to_lb, Bytes::from(request("BYE", 2, &route, &to_tag)), None)
        .await
        .unwrap();
    let bye_ok = loop {
        let got = tokio::time::timeout(Duration::from_secs(10), inbound.recv())
            .await
            .expect("an answer to the BYE")
            .unwrap();
        if let Message::Response(r) = got.message {
            if r.headers.cseq().is_ok_and(|c| c.method == Method::Bye) {
                break r;
            }
        }
    };
    assert_eq!(bye_ok.status, 200);
    wait_for(
        "the node saw the ACK and the BYE",
        Duration::from_secs(10),
        async || counts(&node) == (1, 1, 1),
    )
    .await;
    let seen = node.seen.lock().unwrap();
    assert_eq!(seen.bad_record_route, 0);
}
