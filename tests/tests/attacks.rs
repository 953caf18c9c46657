//! Attacks on a live node while legitimate calls go on (docs/security.md). Each test runs the
//! attack against a real `thalamus run`, places real calls during it, and asserts that the
//! legitimate calls all succeed, that the attack is refused and counted, and that the node is
//! still alive. The node trusts only 127.0.0.2 (a legitimate carrier) unless a test says
//! otherwise; the attacker sends from 127.0.0.1, which the node then treats as any other
//! address on the Internet. Each test prints its figures (docs/security.md quotes them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use thalamus_tests::{bin, login_args, sim_as, Gateway, Sim};

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
    // A device that places 10 calls of its own while the flood runs.
    let (mut caller, _bob) = caller(&gw, 10, 300);
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
        final_statuses(&attacker, 600, Duration::from_secs(4))
    });
    let target = format!("sip:online@{}", gw.sip);
    let carrier = sip_calls("127.0.0.2:0", &target, 40, &[]);
    // A remote peer with the trunk's credentials, from its own address (untrusted).
    let remote = sip_calls(
        "127.0.0.3:0",
        &target,
        10,
        &["--user", "trunk", "--password", "s3cret-trunk"],
    );
    let flood_answers = flood.join().unwrap();
    assert_eq!(carrier["succeeded"], 40, "{carrier}");
    assert_eq!(remote["succeeded"], 10, "{remote}");
    assert_eq!(own_calls_answered(&mut caller, 10, T), 10);
    // Challenged while within its source's rate, then 503 with Retry-After, then silence.
    assert!(
        flood_answers.iter().all(|(s, _)| *s == 401 || *s == 503),
        "the flood got through: {:?}",
        flood_answers.iter().find(|(s, _)| *s != 401 && *s != 503)
    );
    assert!(flood_answers
        .iter()
        .filter(|(s, _)| *s == 503)
        .all(|(_, r)| r.contains("Retry-After:")));
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
    let limited = gw
        .metric("thalamus_sip_limit_refusals_total{reason=\"source_rate\"}")
        .unwrap();
    let dropped = gw
        .metric("thalamus_sip_limit_refusals_total{reason=\"flood_dropped\"}")
        .unwrap();
    assert!(limited > 0.0 && dropped > 0.0, "{limited} {dropped}");
    // Every attack request was counted once: challenged, refused for its rate, or dropped.
    assert!(
        challenged + limited + dropped >= 603.0,
        "{challenged} {limited} {dropped}"
    );
    println!(
        "unauthenticated INVITE/MESSAGE flood, 600 requests at ~500/s from one address: \
         {challenged} challenged (401), {limited} refused 503 for the source's rate, {dropped} \
         dropped; during it 40 trusted and 10 authenticated calls to the device and a device's \
         own 10 calls, all answered"
    );
    alive(&gw);
}

#[test]
fn without_users_a_stranger_gets_403_for_every_device() {
    let gw = Gateway::start(
        "[sip.inbound]\ntrusted = [\"127.0.0.2/32\"]\n\n[session]\nmax_calls = 32\n",
    )
    .unwrap();
    let _online = listening_device(&gw, "online");
    let (mut caller, _bob) = caller(&gw, 5, 300);
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
    assert_eq!(own_calls_answered(&mut caller, 5, T), 5);
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

/// The node is still serving and nothing in it panicked.
fn alive(gw: &Gateway) {
    assert!(gw.admin_get("/health").unwrap().contains("ok"));
    let log = gw.log();
    assert!(!log.contains("panicked"), "the node panicked:\n{log}");
}

/// A device that listens with `extra` options (e.g. `--ignore`, `--dial`).
fn device_with(gw: &Gateway, id: &str, extra: &[&str]) -> Sim {
    let secret = gw.add_device(id).unwrap();
    let mut sim = sim_as("listen", login_args(gw, id, &secret), extra);
    sim.wait_event("welcome", T).unwrap();
    sim
}

/// A SIP buddy that answers calls, and a listening device `id` (with `extra` options) that
/// places `count` calls to it, one every `every_ms` from its login on (check them with
/// [`own_calls_answered`]). Returns the device and the buddy.
fn dialing_device(gw: &Gateway, id: &str, count: u32, every_ms: u32, extra: &[&str]) -> (Sim, Sim) {
    let (buddy, port) = Sim::buddy(&[], T).unwrap();
    let target = format!("sip:bob@127.0.0.1:{port}");
    let (count, every) = (count.to_string(), every_ms.to_string());
    let mut options = extra.to_vec();
    options.extend_from_slice(&[
        "--dial",
        &target,
        "--dial-count",
        &count,
        "--dial-every-ms",
        &every,
    ]);
    (device_with(gw, id, &options), buddy)
}

/// [`dialing_device`] as device `caller`, with no other option.
fn caller(gw: &Gateway, count: u32, every_ms: u32) -> (Sim, Sim) {
    dialing_device(gw, "caller", count, every_ms, &[])
}

/// Waits for the answers to a listening device's own `--dial` calls (call refs 1..=count);
/// returns how many were answered.
fn own_calls_answered(sim: &mut Sim, count: u64, timeout: Duration) -> u64 {
    let mut answered = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + timeout;
    while (answered.len() as u64) < count && std::time::Instant::now() < deadline {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(event) = sim.wait_for(
            |v| {
                v["event"] == "call_event"
                    && v["state"] == "answered"
                    && v["call_ref"]
                        .as_u64()
                        .is_some_and(|r| (1..=count).contains(&r))
            },
            left,
        ) else {
            break;
        };
        answered.insert(event["call_ref"].as_u64().unwrap_or(0));
    }
    answered.len() as u64
}

/// Sends `count` requests built by `make(n, from)` from a socket bound to `bind`, one every
/// `every`, while a second thread collects the final statuses (one per Call-ID); returns a
/// handle on (sent, statuses) 2 s after the last send.
fn udp_flood(
    bind: &str,
    to: SocketAddr,
    count: u32,
    every: Duration,
    make: impl Fn(u32, SocketAddr) -> String + Send + 'static,
) -> std::thread::JoinHandle<(u32, std::collections::BTreeMap<u16, u32>)> {
    let socket = UdpSocket::bind(bind).unwrap();
    let from = socket.local_addr().unwrap();
    let receiver = socket.try_clone().unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender_done = done.clone();
    let collector = std::thread::spawn(move || {
        receiver
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut statuses = std::collections::BTreeMap::new();
        // Final responses are retransmitted until ACKed (an attacker never ACKs): each call
        // counts once.
        let mut seen = std::collections::HashSet::new();
        let mut buf = vec![0u8; 65_535];
        let mut finished_at: Option<std::time::Instant> = None;
        loop {
            if done.load(std::sync::atomic::Ordering::Relaxed) {
                let at = *finished_at.get_or_insert_with(std::time::Instant::now);
                if at.elapsed() > Duration::from_secs(2) {
                    return statuses;
                }
            }
            match receiver.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let status: u16 = text
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    let call_id = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Call-ID:"))
                        .map(|v| v.trim().to_string());
                    if status >= 200 && seen.insert(call_id) {
                        *statuses.entry(status).or_insert(0) += 1;
                    }
                }
                Err(_) => continue,
            }
        }
    });
    std::thread::spawn(move || {
        let mut sent = 0;
        for n in 0..count {
            if socket.send_to(make(n, from).as_bytes(), to).is_ok() {
                sent += 1;
            }
            if !every.is_zero() {
                std::thread::sleep(every);
            }
        }
        sender_done.store(true, std::sync::atomic::Ordering::Relaxed);
        (sent, collector.join().unwrap())
    })
}

/// An OPTIONS from `from` with its own branch and Call-ID.
fn options(n: u32, gw: SocketAddr, from: SocketAddr, via: &str) -> String {
    format!(
        "OPTIONS sip:{gw} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {via};branch=z9hG4bK-opt-{n}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:mallory@{from}>;tag=o{n}\r\n\
         To: <sip:{gw}>\r\n\
         Call-ID: options-{n}-{from}\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

#[test]
fn a_flood_that_passes_the_policy_rings_a_device_only_so_much_and_its_own_calls_go_through() {
    // The flood comes from a trusted address (a compromised or looping trunk): the per-device
    // limits are what stop it. The carrier calls another device meanwhile.
    let gw = Gateway::start(
        "[sip.inbound]\ntrusted = [\"127.0.0.2/32\", \"127.0.0.4/32\"]\n\n[session]\nmax_calls = 4\n",
    )
    .unwrap();
    // The victim never answers (every call it is offered keeps ringing) and places 10 calls of
    // its own during the flood.
    let (mut victim, _bob) = dialing_device(&gw, "victim", 10, 250, &["--ignore"]);
    let _other = listening_device(&gw, "other");
    let gw_sip = gw.sip;
    let invites = udp_flood(
        "127.0.0.4:0",
        gw_sip,
        600,
        Duration::from_millis(4),
        move |n, from| request("INVITE", "victim", gw_sip, from, n),
    );
    let messages = udp_flood(
        "127.0.0.4:0",
        gw_sip,
        600,
        Duration::from_millis(4),
        move |n, from| request("MESSAGE", "victim", gw_sip, from, n),
    );
    // (At most 2 at once: the other device has 4 slots too.)
    let carrier = sip_calls(
        "127.0.0.2:0",
        &format!("sip:other@{gw_sip}"),
        20,
        &["--max-concurrent", "2"],
    );
    // 4 calls ring at the victim all along: had they taken its slots (max_calls = 4), none of
    // its own calls could start.
    let own = own_calls_answered(&mut victim, 10, Duration::from_secs(30));
    let (invites_sent, invite_answers) = invites.join().unwrap();
    let (messages_sent, message_answers) = messages.join().unwrap();
    assert_eq!(carrier["succeeded"], 20, "{carrier}");
    assert_eq!(own, 10, "the victim's own calls");
    // At most max_calls (4, the default of max_ringing_calls) ring; every other INVITE was
    // answered 486.
    let busy = invite_answers.get(&486).copied().unwrap_or(0);
    assert!(busy + 4 >= invites_sent, "{invite_answers:?}");
    // Refused for the ringing limit, or (when the victim's own calls fill its slots at that
    // moment, which depends on timing) for the device's call limit: each one counted once.
    let max_ringing = gw
        .metric("thalamus_sip_refused_total{reason=\"max_ringing\"}")
        .unwrap();
    let max_calls = gw
        .metric("thalamus_sip_refused_total{reason=\"max_calls\"}")
        .unwrap();
    assert!(max_ringing > 0.0, "{invite_answers:?}");
    assert_eq!(max_ringing + max_calls, f64::from(busy));
    // Texts: the burst (20) and the rate (5/s) delivered, the rest 503 with Retry-After.
    let delivered = message_answers.get(&200).copied().unwrap_or(0);
    let refused = message_answers.get(&503).copied().unwrap_or(0);
    assert!((20..=40).contains(&delivered), "{message_answers:?}");
    assert_eq!(delivered + refused, messages_sent, "{message_answers:?}");
    assert_eq!(
        gw.metric("thalamus_sip_refused_total{reason=\"texts_in_rate\"}")
            .unwrap(),
        f64::from(refused)
    );
    // The victim's session survived the flood (its queue never overflowed).
    if let Ok(goodbye) = victim.wait_event("goodbye", Duration::from_millis(200)) {
        panic!("the victim's session ended: {goodbye}");
    }
    println!(
        "trusted-source flood at one device, {invites_sent} INVITEs and {messages_sent} \
         MESSAGEs at ~250/s each: {busy} INVITEs answered 486 (4 rang), {delivered} texts \
         delivered and {refused} answered 503; during it the device's own 10 calls and the \
         carrier's 20 calls to another device all answered"
    );
    alive(&gw);
}

#[test]
fn an_options_flood_sized_to_fill_the_transaction_table_does_not_fill_it() {
    // A table of 2,000 transactions; the flood opens 6,000 (each would live 32 s).
    let limits = "[sip.limits]\nmax_transactions = 2000\n";
    let gw = Gateway::start(&format!(
        "{limits}\n[sip.inbound]\ntrusted = [\"127.0.0.2/32\"]\n\n[session]\nmax_calls = 32\n"
    ))
    .unwrap();
    let (mut online, _bob) = dialing_device(&gw, "online", 10, 200, &[]);
    let gw_sip = gw.sip;
    let flood = udp_flood(
        "127.0.0.1:0",
        gw_sip,
        6_000,
        Duration::from_micros(400),
        move |n, from| options(n, gw_sip, from, &from.to_string()),
    );
    let carrier = sip_calls("127.0.0.2:0", &format!("sip:online@{gw_sip}"), 40, &[]);
    let own = own_calls_answered(&mut online, 10, Duration::from_secs(30));
    let (sent, answers) = flood.join().unwrap();
    assert_eq!(carrier["succeeded"], 40, "{carrier}");
    assert_eq!(own, 10);
    let table_full = gw
        .metric("thalamus_sip_limit_refusals_total{reason=\"table_full\"}")
        .unwrap();
    let limited = gw
        .metric("thalamus_sip_limit_refusals_total{reason=\"source_rate\"}")
        .unwrap();
    let dropped = gw
        .metric("thalamus_sip_limit_refusals_total{reason=\"flood_dropped\"}")
        .unwrap();
    let live = gw.metric("thalamus_sip_transactions").unwrap();
    assert_eq!(table_full, 0.0, "the table filled up");
    assert!(limited > 0.0 && dropped > 0.0, "{limited} {dropped}");
    assert!(live < 1_000.0, "{live} transactions live");
    println!(
        "OPTIONS flood of {sent} from one address at ~2,500/s against a 2,000-transaction \
         table: answers {answers:?}, {limited} refused 503 for the rate, {dropped} dropped, \
         table full 0 times ({live} live at the end); during it 40 carrier calls and the \
         device's 10 calls all answered"
    );
    alive(&gw);
    drop(gw);

    // The control: without the per-source limits the same flood fills the table.
    let gw = Gateway::start(&format!("{limits}source_rate = 0\nsource_max_live = 0\n")).unwrap();
    let gw_sip = gw.sip;
    let flood = udp_flood(
        "127.0.0.1:0",
        gw_sip,
        6_000,
        Duration::from_micros(400),
        move |n, from| options(n, gw_sip, from, &from.to_string()),
    );
    let _ = flood.join().unwrap();
    let table_full = gw
        .metric("thalamus_sip_limit_refusals_total{reason=\"table_full\"}")
        .unwrap();
    assert!(table_full > 0.0, "the control flood did not fill the table");
    println!("control without per-source limits: the table was full for {table_full} requests");
    alive(&gw);
}

/// A listener whose accept queue is full: the kernel drops every further SYN, so a connect to
/// it hangs (a black hole). Keep the returned values alive while it is needed.
fn black_hole() -> (
    SocketAddr,
    tokio::runtime::Runtime,
    tokio::net::TcpListener,
    Vec<std::net::TcpStream>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let listener = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        socket.listen(1).unwrap()
    });
    let addr = listener.local_addr().unwrap();
    let fillers = (0..2)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    (addr, runtime, listener, fillers)
}

#[test]
fn a_black_holed_tcp_destination_stalls_nothing_else() {
    let gw = Gateway::start(
        "[sip.limits]\ntcp_connect_timeout_ms = 8000\n\n[session]\nmax_calls = 32\n",
    )
    .unwrap();
    let (hole, _rt, _listener, _fillers) = black_hole();
    // A device dials the black hole over TCP (its INVITE waits on a connection that never
    // opens); another device places calls of its own and takes the carrier's.
    let secret = gw.add_device("dialer").unwrap();
    let quic = gw.quic.to_string();
    let hole_target = format!("sip:nobody@{hole};transport=tcp");
    let mut dialer = Sim::spawn(&[
        "call",
        "--gateway",
        &quic,
        "--fingerprint",
        &gw.fingerprint,
        "--device",
        "dialer",
        "--secret",
        &secret,
        "--target",
        &hole_target,
    ])
    .unwrap();
    dialer.wait_event("welcome", T).unwrap();
    let (mut busy, _bob) = dialing_device(&gw, "busy", 5, 300, &[]);
    // Wait for the connection attempt to be under way.
    let deadline = std::time::Instant::now() + T;
    while gw.metric("thalamus_sip_tcp_connections").unwrap() < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no TCP connection attempt"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // 60 OPTIONS, one every 50 ms, timed; and 20 carrier calls.
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let from = probe.local_addr().unwrap();
    let carrier = std::thread::spawn({
        let target = format!("sip:busy@{}", gw.sip);
        move || sip_calls("127.0.0.1:0", &target, 20, &[])
    });
    let mut rtts = Vec::new();
    let mut buf = [0u8; 4096];
    for n in 0..60 {
        let sent_at = std::time::Instant::now();
        probe
            .send_to(
                options(n, gw.sip, from, &from.to_string()).as_bytes(),
                gw.sip,
            )
            .unwrap();
        if let Ok(len) = probe.recv(&mut buf) {
            if buf[..len].starts_with(b"SIP/2.0 200") {
                rtts.push(sent_at.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // All answered while the black-holed connection was still being attempted.
    let still_connecting = gw.metric("thalamus_sip_tcp_connections").unwrap();
    let failed = gw
        .metric("thalamus_sip_tcp_events_total{event=\"connect_failed\"}")
        .unwrap();
    assert_eq!(rtts.len(), 60, "OPTIONS unanswered during the black hole");
    assert!(
        still_connecting >= 1.0 && failed == 0.0,
        "the probe outlasted the connection attempt ({still_connecting} open, {failed} failed)"
    );
    let carrier = carrier.join().unwrap();
    assert_eq!(carrier["succeeded"], 20, "{carrier}");
    assert_eq!(own_calls_answered(&mut busy, 5, Duration::from_secs(20)), 5);
    // The call to the black hole fails on its own, when its connection gives up.
    let ended = dialer
        .wait_for(
            |v| v["event"] == "call_event" && v["state"] == "ended",
            Duration::from_secs(40),
        )
        .unwrap();
    assert_ne!(ended["end_reason"], "normal", "{ended}");
    gw.wait_metric(
        "thalamus_sip_tcp_events_total{event=\"connect_failed\"}",
        1.0,
        T,
    )
    .unwrap();
    rtts.sort();
    println!(
        "TCP black hole as a Dial target (8 s connect timeout): 60 OPTIONS answered during \
         it, round trip median {:?}, max {:?}; 20 carrier calls and 5 device calls answered; \
         the black-holed call ended {}",
        rtts[rtts.len() / 2],
        rtts[rtts.len() - 1],
        ended["end_reason"]
    );
    alive(&gw);
}

#[test]
fn slow_tcp_clients_are_closed_and_counted_while_calls_go_on() {
    let gw = Gateway::start(
        "[sip.limits]\ntcp_message_timeout_ms = 1000\n\n[session]\nmax_calls = 32\n",
    )
    .unwrap();
    let _online = listening_device(&gw, "online");
    let (mut caller, _bob) = caller(&gw, 10, 300);
    // 200 connections that each send half a request and then a byte every 200 ms.
    let mut slow: Vec<Option<std::net::TcpStream>> = (0..200)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(gw.sip).unwrap();
            use std::io::Write;
            s.write_all(b"INVITE sip:online@thalamus SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKslow\r\n")
                .unwrap();
            s.set_nonblocking(true).unwrap();
            Some(s)
        })
        .collect();
    let carrier = std::thread::spawn({
        let target = format!("sip:online@{}", gw.sip);
        move || sip_calls("127.0.0.1:0", &target, 20, &["--tcp"])
    });
    let mut closed = 0;
    for _round in 0..40 {
        std::thread::sleep(Duration::from_millis(200));
        for slot in slow.iter_mut() {
            let Some(stream) = slot else { continue };
            use std::io::{Read, Write};
            let mut buf = [0u8; 64];
            let gone = match stream.read(&mut buf) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    stream.write_all(b"X").is_err()
                }
                Err(_) => true,
            };
            if gone {
                *slot = None;
                closed += 1;
            }
        }
        if closed == 200 {
            break;
        }
    }
    let carrier = carrier.join().unwrap();
    assert_eq!(closed, 200, "slow connections left open");
    assert_eq!(carrier["succeeded"], 20, "{carrier}");
    assert_eq!(own_calls_answered(&mut caller, 10, T), 10);
    let counted = gw
        .metric("thalamus_sip_tcp_events_total{event=\"closed_slow\"}")
        .unwrap();
    assert!(counted >= 200.0, "{counted}");
    gw.wait_metric("thalamus_sip_tcp_buffered_bytes", 0.0, T)
        .unwrap();
    println!(
        "slow TCP clients: 200 connections trickling a request 1 byte per 200 ms, all closed \
         (message deadline 1 s) and counted ({counted}); 20 TCP calls to a device and a device's \
         own 10 calls answered meanwhile"
    );
    alive(&gw);
}

#[test]
fn a_via_maddr_pointing_elsewhere_reflects_nothing() {
    let gw = Gateway::start("[session]\nmax_calls = 32\n").unwrap();
    let _online = listening_device(&gw, "online");
    let (mut caller, _bob) = caller(&gw, 5, 300);
    // The victim the attacker names in maddr (and sent-by).
    let victim = UdpSocket::bind("127.0.0.3:0").unwrap();
    let victim_addr = victim.local_addr().unwrap();
    let gw_sip = gw.sip;
    let flood = udp_flood(
        "127.0.0.1:0",
        gw_sip,
        100,
        Duration::from_millis(5),
        move |n, from| {
            options(
                n,
                gw_sip,
                from,
                &format!("{victim_addr};rport;maddr={}", victim_addr.ip()),
            )
        },
    );
    let carrier = sip_calls("127.0.0.1:0", &format!("sip:online@{gw_sip}"), 10, &[]);
    let (sent, answers) = flood.join().unwrap();
    assert_eq!(carrier["succeeded"], 10, "{carrier}");
    assert_eq!(own_calls_answered(&mut caller, 5, T), 5);
    // Every answer went back to the sender; none to the address it named.
    assert_eq!(answers.get(&200).copied().unwrap_or(0), sent, "{answers:?}");
    victim
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 2048];
    assert!(
        victim.recv(&mut buf).is_err(),
        "a response reached the maddr victim"
    );
    assert_eq!(
        gw.metric("thalamus_sip_via_maddr_ignored_total").unwrap(),
        f64::from(sent)
    );
    println!(
        "Via maddr: {sent} OPTIONS naming another address answered to their sender only, \
         0 bytes to the named address, {sent} counted; 10 calls to a device and a device's own 5 \
         answered meanwhile"
    );
    alive(&gw);
}

#[test]
fn parallel_wrong_secret_logins_from_one_address_do_not_keep_a_real_device_out() {
    let gw = Gateway::start("[session]\nmax_calls = 32\n").unwrap();
    let secret = gw.add_device("real").unwrap();
    let (_bob, bob_port) = Sim::buddy(&[], T).unwrap();
    let bob = format!("sip:bob@127.0.0.1:{bob_port}");
    let quic = gw.quic.to_string();
    // One login of the real device: it sends a text and exits 0 once it was delivered.
    let login = |n: u32| {
        Command::new(bin("thalamus-sim"))
            .args([
                "text",
                "--gateway",
                &quic,
                "--fingerprint",
                &gw.fingerprint,
                "--device",
                "real",
                "--secret",
                &secret,
                "--to",
                &bob,
                "--body",
                &format!("hello {n}"),
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    // The real device has logged in before (its secret is known).
    assert!(login(0));
    // Calls both ways during the attack: a device places 10, the carrier places 10 to another.
    let _callee = listening_device(&gw, "callee");
    let (mut caller, _bob2) = caller(&gw, 10, 500);
    let carrier = std::thread::spawn({
        let target = format!("sip:callee@{}", gw.sip);
        move || sip_calls("127.0.0.1:0", &target, 10, &[])
    });
    // The attack: 240 logins with wrong secrets, 64 at a time per swarm, from the same
    // address, while the real device logs in 10 times.
    let attack = |prefix: &str| {
        Command::new(bin("thalamus-sim"))
            .args([
                "swarm",
                "--gateway",
                &quic,
                "--fingerprint",
                &gw.fingerprint,
                "--prefix",
                prefix,
                "--devices",
                "120",
                "--secret",
                "not-the-secret",
                "--concurrency",
                "64",
                "--hold-secs",
                "0",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = attack("ghost-a");
    let mut second = attack("ghost-b");
    let mut real_logins = 0;
    for n in 1..=10 {
        if login(n) {
            real_logins += 1;
        }
    }
    let _ = first.wait();
    let _ = second.wait();
    assert_eq!(real_logins, 10, "the real device was kept out");
    let carrier = carrier.join().unwrap();
    assert_eq!(carrier["succeeded"], 10, "{carrier}");
    assert_eq!(own_calls_answered(&mut caller, 10, T), 10);
    let metrics = gw.admin_get("/metrics").unwrap();
    let sum = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let failures = sum("thalamus_device_auth_failures_total");
    let locked = sum("thalamus_limits_hit_total{reason=\"login_");
    assert!(failures + locked >= 100.0, "{failures} {locked}");
    println!(
        "parallel wrong-secret logins: 240 attempts (two swarms of 120, 64 at a time each) \
         from one address: {failures} failed the secret check, {locked} refused by the \
         per-address limit; the real device logged in 10 times of 10, a device placed 10 calls and \
         the carrier 10, all answered"
    );
    alive(&gw);
}

/// Requests that waited in the socket while the node was frozen (SIGSTOP) and are older than
/// `sip.limits.max_request_age_ms` when it wakes are dropped unanswered and counted (their
/// senders have retransmitted them, perhaps to another node: issue 16); a fresh request is
/// answered as usual.
#[test]
fn requests_that_waited_out_a_freeze_are_dropped_unanswered() {
    let gw = Gateway::start("[sip.limits]\nmax_request_age_ms = 500\n").unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let me = socket.local_addr().unwrap();
    // Answered while the node runs.
    socket
        .send_to(options(1, gw.sip, me, &me.to_string()).as_bytes(), gw.sip)
        .unwrap();
    assert_eq!(
        final_statuses(&socket, 1, T).len(),
        1,
        "no answer to OPTIONS"
    );
    let pid = gw.proc.child.id();
    let kill = |signal: &str| thalamus_tests::signal_process(pid, signal);
    kill("STOP");
    for n in 2..5 {
        socket
            .send_to(options(n, gw.sip, me, &me.to_string()).as_bytes(), gw.sip)
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(1_200));
    kill("CONT");
    // The three queued requests are 1.2 s old: none is answered.
    let late = final_statuses(&socket, 1, Duration::from_millis(1_500));
    assert!(
        late.is_empty(),
        "a request older than its age limit was answered: {late:?}"
    );
    gw.wait_metric("thalamus_sip_stale_requests_total", 3.0, T)
        .unwrap();
    // A fresh one is.
    socket
        .send_to(options(9, gw.sip, me, &me.to_string()).as_bytes(), gw.sip)
        .unwrap();
    assert_eq!(
        final_statuses(&socket, 1, T).len(),
        1,
        "no answer after the thaw"
    );
    assert_eq!(gw.metric("thalamus_sip_stale_requests_total").unwrap(), 3.0);
}
