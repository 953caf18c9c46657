//! Attacks on a live node while legitimate calls go on (docs/security.md). Each test runs the
//! attack against a real `thalamus run`, places real calls during it, and asserts that the
//! legitimate calls all succeed, that the attack is refused and counted, and that the node is
//! still alive. The node trusts only 127.0.0.2 (a legitimate carrier); the attacker sends from
//! 127.0.0.1, which the node then treats as any other address on the Internet.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use thalamus_tests::{bin, Gateway, Sim};

const T: Duration = Duration::from_secs(20);

/// Trusts one loopback address (the carrier) and one digest user for everybody else.
const POLICY: &str = "[session]\nmax_calls = 32\n\n[sip.inbound]\ntrusted = [\"127.0.0.2/32\"]\n\
                      users = [{ username = \"trunk\", password = \"s3cret-trunk\" }]\n";

fn listening_device(gw: &Gateway, id: &str) -> Sim {
    let secret = gw.add_device(id).unwrap();
    let quic = gw.quic.to_string();
    let mut sim = Sim::spawn(&[
        "listen",
        "--gateway",
        &quic,
        "--fingerprint",
        &gw.fingerprint,
        "--device",
        id,
        "--secret",
        &secret,
    ])
    .unwrap();
    sim.wait_event("welcome", T).unwrap();
    sim
}

/// `thalamus-sim sip-call` from `listen` to `target`; its JSON report.
fn sip_calls(listen: &str, target: &str, calls: u32, extra: &[&str]) -> Value {
    let calls = calls.to_string();
    let out = Command::new(bin("thalamus-sim"))
        .args([
            "sip-call", "--target", target, "--listen", listen, "--calls", &calls, "--rate", "20",
        ])
        .args(extra)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr)))
}

/// A request as an attacker writes it, from `from` (its socket) to the node.
fn request(method: &str, user: &str, gw: SocketAddr, from: SocketAddr, n: u32) -> String {
    let body = if method == "MESSAGE" { "hello" } else { "" };
    format!(
        "{method} sip:{user}@{gw} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {from};branch=z9hG4bK-attack-{method}-{n}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:mallory@{from}>;tag=m{n}\r\n\
         To: <sip:{user}@{gw}>\r\n\
         Call-ID: attack-{method}-{user}-{n}\r\n\
         CSeq: 1 {method}\r\n\
         Contact: <sip:mallory@{from}>\r\n\
         Content-Type: text/plain\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The final status of each answer the socket gets within `wait` (provisional ones skipped).
fn final_statuses(socket: &UdpSocket, expected: usize, wait: Duration) -> Vec<(u16, String)> {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = std::time::Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < expected && std::time::Instant::now() < deadline {
        let Ok(n) = socket.recv(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if status >= 200 {
            out.push((status, text));
        }
    }
    out
}

/// The headers of a response that do not depend on the request (Via, From, To, Call-ID, CSeq
/// and the challenge's nonce do).
fn shape(response: &str) -> Vec<String> {
    response
        .lines()
        .filter(|l| {
            let name = l.split(':').next().unwrap_or_default().to_ascii_lowercase();
            !matches!(
                name.as_str(),
                "via" | "from" | "to" | "call-id" | "cseq" | "www-authenticate"
            )
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn an_unauthenticated_source_rings_nobody_and_learns_nothing_while_the_carrier_calls() {
    let gw = Gateway::start(POLICY).unwrap();
    let mut online = listening_device(&gw, "online");
    gw.add_device("sleeper").unwrap();
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let from = attacker.local_addr().unwrap();

    // Probes: an online device, an offline one and one that does not exist get the same answer.
    for (n, user) in ["online", "sleeper", "nobody"].into_iter().enumerate() {
        attacker
            .send_to(
                request("INVITE", user, gw.sip, from, n as u32).as_bytes(),
                gw.sip,
            )
            .unwrap();
    }
    let answers = final_statuses(&attacker, 3, T);
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(answers.iter().all(|(s, _)| *s == 401), "{answers:?}");
    assert!(answers
        .iter()
        .all(|(_, r)| r.contains("WWW-Authenticate: Digest realm=")));
    assert_eq!(shape(&answers[0].1), shape(&answers[1].1));
    assert_eq!(shape(&answers[1].1), shape(&answers[2].1));

    // The flood: 600 INVITEs and MESSAGEs at the online device, while the carrier (trusted)
    // places 40 calls to it and a remote peer with the trunk's credentials places 10.
    let gw_sip = gw.sip;
    let flood = std::thread::spawn(move || {
        for n in 0..300u32 {
            for method in ["INVITE", "MESSAGE"] {
                let _ = attacker.send_to(
                    request(method, "online", gw_sip, from, 100 + n).as_bytes(),
                    gw_sip,
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        final_statuses(&attacker, 600, Duration::from_secs(10))
    });
    let target = format!("sip:online@{}", gw.sip);
    let carrier = sip_calls("127.0.0.2:0", &target, 40, &[]);
    let remote = sip_calls(
        "127.0.0.1:0",
        &target,
        10,
        &["--user", "trunk", "--password", "s3cret-trunk"],
    );
    let flood_answers = flood.join().unwrap();
    assert_eq!(carrier["succeeded"], 40, "{carrier}");
    assert_eq!(remote["succeeded"], 10, "{remote}");
    assert!(
        flood_answers.iter().all(|(s, _)| *s == 401),
        "the flood got through: {:?}",
        flood_answers.iter().find(|(s, _)| *s != 401)
    );
    // The device saw the 50 legitimate calls and nothing of the attack.
    let mut incoming = 0;
    while let Ok(event) = online.wait_event("incoming_call", Duration::from_millis(500)) {
        assert!(!event.to_string().contains("mallory"), "{event}");
        incoming += 1;
    }
    assert_eq!(incoming, 50);
    assert!(online
        .wait_event("text_received", Duration::from_millis(200))
        .is_err());
    let challenged = gw
        .metric("thalamus_sip_refused_total{reason=\"challenged\"}")
        .unwrap();
    assert!(challenged >= 603.0, "{challenged}");
    println!(
        "unauthenticated INVITE/MESSAGE flood: {} requests answered 401 ({challenged} counted) \
         during 40 trusted and 10 authenticated calls, all answered",
        flood_answers.len()
    );
    // Alive and serving.
    assert!(gw.admin_get("/health").unwrap().contains("ok"));
}

#[test]
fn without_users_a_stranger_gets_403_for_every_device() {
    let gw = Gateway::start("[sip.inbound]\ntrusted = [\"127.0.0.2/32\"]\n").unwrap();
    let _online = listening_device(&gw, "online");
    gw.add_device("sleeper").unwrap();
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let from = attacker.local_addr().unwrap();
    for (n, user) in ["online", "sleeper", "nobody"].into_iter().enumerate() {
        attacker
            .send_to(
                request("MESSAGE", user, gw.sip, from, n as u32).as_bytes(),
                gw.sip,
            )
            .unwrap();
    }
    let answers = final_statuses(&attacker, 3, T);
    assert_eq!(
        answers.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [403, 403, 403]
    );
    assert_eq!(
        gw.metric("thalamus_sip_refused_total{reason=\"untrusted\"}")
            .unwrap(),
        3.0
    );
    // The trusted carrier still reaches the device.
    let report = sip_calls("127.0.0.2:0", &format!("sip:online@{}", gw.sip), 5, &[]);
    assert_eq!(report["succeeded"], 5, "{report}");
}

/// Runs SIPp's digest-checking UAS (`tests/scenarios/uas_digest.xml`, realm `thalamus.test`)
/// on a free port; returns it and the port.
fn challenger() -> (thalamus_tests::SippProcess, u16) {
    let port = thalamus_tests::free_udp_port().unwrap();
    let mut command = thalamus_tests::sipp();
    command.args([
        "-sf",
        &thalamus_tests::scenario("uas_digest.xml"),
        "-i",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-m",
        "1",
        "-nostdin",
    ]);
    let sipp = thalamus_tests::SippProcess::spawn(command);
    std::thread::sleep(Duration::from_millis(300));
    (sipp, port)
}

/// A device on a node whose trunk credentials are `auth` calls the challenger; the call's
/// final event, and SIPp (still running when the challenge went unanswered).
fn call_the_challenger(auth: &str) -> (Value, thalamus_tests::SippProcess) {
    let gw = Gateway::start(&format!(
        "[sip.auth]\nusername = \"alice\"\npassword = \"wonderland\"\n{auth}"
    ))
    .unwrap();
    let secret = gw.add_device("caller").unwrap();
    let (sipp, port) = challenger();
    let quic = gw.quic.to_string();
    let target = format!("sip:service@127.0.0.1:{port}");
    let mut sim = Sim::spawn(&[
        "call",
        "--gateway",
        &quic,
        "--fingerprint",
        &gw.fingerprint,
        "--device",
        "caller",
        "--secret",
        &secret,
        "--target",
        &target,
        "--hold-ms",
        "10",
    ])
    .unwrap();
    let ended = sim
        .wait_for(
            |v| v["event"] == "call_event" && v["state"] == "ended",
            Duration::from_secs(40),
        )
        .unwrap();
    (ended, sipp)
}

#[test]
fn trunk_credentials_are_not_given_to_a_challenger_they_are_not_for() {
    // The trunk's credentials are for 127.0.0.2 only: a challenge from 127.0.0.1 is not
    // answered; the device sees the 401.
    // (Had it been answered, SIPp would have checked the answer: 200 for the right one, 403
    // for a wrong one; the device sees the challenge's own 401 instead.)
    let (ended, _sipp) = call_the_challenger("hosts = [\"127.0.0.2\"]\n");
    assert_eq!(ended["sip_status"], 401, "{ended}");
    // Right host, foreign realm: not answered either.
    let (ended, _) =
        call_the_challenger("hosts = [\"127.0.0.1\"]\nrealms = [\"carrier.example\"]\n");
    assert_eq!(ended["sip_status"], 401, "{ended}");
    // The control: the host and realm they are for get the answer, and the call goes through
    // (so the refusals above are the scope's doing).
    let (ended, sipp) =
        call_the_challenger("hosts = [\"127.0.0.1\"]\nrealms = [\"thalamus.test\"]\n");
    assert_ne!(ended["sip_status"], 401, "{ended}");
    let outcome = sipp.wait(Duration::from_secs(40));
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
}
