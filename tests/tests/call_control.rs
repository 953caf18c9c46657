//! Call control SIP users expect, end to end against SIPp (software nobody here wrote): session
//! timers (RFC 4028) both ways, with 422 and a refresh, a session whose refresher falls silent
//! ended by the gateway, and 420 for a Require the gateway lacks. Real gateway and simulator
//! processes on loopback; each scenario checks the headers it receives and fails its call on a
//! mismatch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use thalamus_tests::{
    free_udp_port, login_args, scenario, sim_as, sipp, Gateway, Sim, SippProcess,
};

const T: Duration = Duration::from_secs(20);

/// How long a SIPp process may take to finish its one call.
const SIPP_WAIT: Duration = Duration::from_secs(60);

/// SIPp as a server on a port of its own, with `args`.
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

/// SIPp as a client running `scenario` once against the gateway, toward `device`, with
/// `extra` arguments (started, not waited for).
fn sipp_client(gw: &Gateway, scenario_file: &str, device: &str, extra: &[&str]) -> SippProcess {
    let mut command = sipp();
    command
        .args(["-sf", &scenario(scenario_file), "-s", device])
        .args(extra)
        .args(["-m", "1", "-i", "127.0.0.1", "-nostdin"])
        .args(["-timeout", "40s", "-timeout_error"])
        .args(["-p", &free_udp_port().unwrap().to_string()])
        .arg(gw.sip.to_string());
    SippProcess::spawn(command)
}

#[test]
fn sipp_calling_a_device_gets_420_then_422_then_a_session_it_refreshes() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("callee").unwrap();
    let mut listener = sim_as("listen", login_args(&gw, "callee", &secret), &[]);
    listener.wait_event("welcome", T).unwrap();
    let outcome = sipp_client(&gw, "uac_session_timer.xml", "callee", &[]).wait(SIPP_WAIT);
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
    // The device heard of the one call that was answered, not of the refused ones.
    let incoming = listener.wait_event("incoming_call", T).unwrap();
    assert!(incoming["from_uri"]
        .as_str()
        .unwrap()
        .starts_with("sip:sipp@"));
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
    assert_eq!(gw.metric("thalamus_sip_bad_extension_total").unwrap(), 1.0);
    assert_eq!(
        gw.metric("thalamus_calls_ended_total{reason=\"remote_hangup\"}")
            .unwrap(),
        1.0
    );
}

#[test]
fn a_device_call_answers_a_422_and_refreshes_the_session_it_was_granted() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("caller").unwrap();
    let (server, port) = sipp_server(&["-sf", &scenario("uas_session_timer.xml"), "-m", "1"]);
    let target = format!("sip:service@127.0.0.1:{port}");
    // Held 3 s: one refresh (at 2 s) before the device hangs up.
    let mut sim = sim_as(
        "call",
        login_args(&gw, "caller", &secret),
        &["--target", &target, "--hold-ms", "3000"],
    );
    let summary = sim.wait_event("summary", Duration::from_secs(40)).unwrap();
    assert_eq!(summary["succeeded"], 1, "{summary}");
    let outcome = server.wait(SIPP_WAIT);
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
}

#[test]
fn a_session_its_refresher_stops_refreshing_is_ended_by_the_gateway() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("caller").unwrap();
    let (server, port) = sipp_server(&["-sf", &scenario("uas_session_expiry.xml"), "-m", "1"]);
    let target = format!("sip:service@127.0.0.1:{port}");
    // The device would hold the call for 60 s; the session expires first.
    let mut sim = sim_as(
        "call",
        login_args(&gw, "caller", &secret),
        &["--target", &target, "--hold-ms", "60000"],
    );
    let ended = sim
        .wait_for(
            |v| v["event"] == "call_event" && v["state"] == "ended",
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(ended["end_reason"], "timeout", "{ended}");
    let outcome = server.wait(SIPP_WAIT);
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
    assert_eq!(
        gw.metric("thalamus_calls_ended_total{reason=\"timeout\"}")
            .unwrap(),
        1.0
    );
}

#[test]
fn sipp_requiring_100rel_gets_a_reliable_ringing_it_pracks() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("callee").unwrap();
    // The device rings 3 s: the 180 goes again before SIPp PRACKs it (after 1.2 s), and the
    // answer comes well after the PRACK's 200.
    let mut listener = sim_as(
        "listen",
        login_args(&gw, "callee", &secret),
        &["--answer-after-ms", "3000"],
    );
    listener.wait_event("welcome", T).unwrap();
    let outcome = sipp_client(&gw, "uac_prack.xml", "callee", &[]).wait(SIPP_WAIT);
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
    assert_eq!(
        gw.metric("thalamus_calls_ended_total{reason=\"remote_hangup\"}")
            .unwrap(),
        1.0
    );
}

#[test]
fn a_device_call_pracks_a_reliable_183_with_early_media() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("caller").unwrap();
    let (server, port) = sipp_server(&["-sf", &scenario("uas_prack.xml"), "-m", "1"]);
    let target = format!("sip:service@127.0.0.1:{port}");
    let mut sim = sim_as(
        "call",
        login_args(&gw, "caller", &secret),
        &["--target", &target, "--hold-ms", "500"],
    );
    let early = sim
        .wait_for(
            |v| v["event"] == "call_event" && v["state"] == "early_media",
            T,
        )
        .unwrap();
    assert_eq!(early["sip_status"], 183, "{early}");
    let summary = sim.wait_event("summary", Duration::from_secs(40));
    let outcome = server.wait(SIPP_WAIT);
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
    let summary = summary.unwrap();
    assert_eq!(summary["succeeded"], 1, "{summary}");
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
}

#[test]
fn a_device_transfers_its_call_and_hears_how_the_transfer_went() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("caller").unwrap();
    let (server, port) = sipp_server(&["-sf", &scenario("uas_refer.xml"), "-m", "1"]);
    let target = format!("sip:service@127.0.0.1:{port}");
    // Held for 30 s unless the transfer ends the call first.
    let mut sim = sim_as(
        "call",
        login_args(&gw, "caller", &secret),
        &[
            "--target",
            &target,
            "--transfer-to",
            "sip:carol@example.org",
            "--hold-ms",
            "30000",
        ],
    );
    let trying = sim
        .wait_for(|v| v["event"] == "transfer_status", T)
        .unwrap();
    assert_eq!(
        (trying["sip_status"].as_u64(), trying["done"].as_bool()),
        (Some(100), Some(false)),
        "{trying}"
    );
    let done = sim
        .wait_for(|v| v["event"] == "transfer_status", T)
        .unwrap();
    assert_eq!(
        (done["sip_status"].as_u64(), done["done"].as_bool()),
        (Some(200), Some(true)),
        "{done}"
    );
    let ended = sim
        .wait_for(|v| v["event"] == "call_event" && v["state"] == "ended", T)
        .unwrap();
    assert_eq!(ended["end_reason"], "normal", "{ended}");
    assert_eq!(ended["reason"], "transferred", "{ended}");
    let outcome = server.wait(SIPP_WAIT);
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
}

/// Waits for the end of the simulator's call `call_ref`; its event.
fn ended_call(sim: &mut Sim, call_ref: &serde_json::Value) -> serde_json::Value {
    sim.wait_for(
        |v| v["event"] == "call_event" && v["state"] == "ended" && v["call_ref"] == *call_ref,
        T,
    )
    .unwrap()
}

/// The value of the first header `name` (case-insensitive) in SIPp's message trace.
fn traced_header<'a>(messages: &'a str, name: &str, with: &str) -> Option<&'a str> {
    messages.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        (n.trim().eq_ignore_ascii_case(name) && v.contains(with)).then_some(v.trim())
    })
}

fn tag_of(value: &str) -> Option<&str> {
    value
        .split(';')
        .find_map(|p| p.trim().strip_prefix("tag="))
        .map(|t| t.trim_end_matches('>'))
}

#[test]
fn a_device_consults_then_transfers_its_call_in_place_of_the_consultation() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("caller").unwrap();
    // SIPp with `scenario` (its messages traced) on a port of its own.
    let traced = |scenario_args: &[&str]| {
        let port = free_udp_port().unwrap();
        let process = SippProcess::spawn_with(|files| {
            let mut command = sipp();
            command
                .args(scenario_args)
                .args(["-m", "1", "-trace_msg", "-message_file"])
                .arg(files.message_file())
                .args(["-i", "127.0.0.1", "-p", &port.to_string(), "-nostdin"]);
            command
        });
        (process, port)
    };
    let (transferee, port) = traced(&["-sf", &scenario("uas_refer_attended.xml")]);
    // The consultation: SIPp's own UAS (answers, waits for the BYE).
    let (consultant, consult_port) = traced(&["-sn", "uas"]);
    std::thread::sleep(Duration::from_millis(300));
    let mut sim = sim_as(
        "call",
        login_args(&gw, "caller", &secret),
        &[
            "--target",
            &format!("sip:service@127.0.0.1:{port}"),
            "--consult",
            &format!("sip:consult@127.0.0.1:{consult_port}"),
            "--hold-ms",
            "30000",
        ],
    );
    let consulted = sim
        .wait_for(
            |v| v["event"] == "call_event" && v["call_ref"] == 10_001 && v["state"] == "answered",
            T,
        )
        .unwrap();
    assert_eq!(consulted["call_ref"], 10_001, "{consulted}");
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let s = sim
            .wait_for(|v| v["event"] == "transfer_status", T)
            .unwrap();
        statuses.push((s["sip_status"].as_u64(), s["done"].as_bool()));
    }
    assert_eq!(
        statuses,
        vec![(Some(100), Some(false)), (Some(200), Some(true))]
    );
    let ended = sim
        .wait_for(
            |v| v["event"] == "call_event" && v["call_ref"] == 1 && v["state"] == "ended",
            T,
        )
        .unwrap();
    assert_eq!(ended["reason"], "transferred", "{ended}");
    // SIPp's UAS does not act on Replaces: the device hangs the consultation up after 3 s.
    sim.wait_for(
        |v| v["event"] == "call_event" && v["call_ref"] == 10_001 && v["state"] == "ended",
        T,
    )
    .unwrap();
    let transferee = transferee.wait(SIPP_WAIT);
    assert_eq!(transferee.counts(), (1, 0), "{}", transferee.report());
    let consultant = consultant.wait(SIPP_WAIT);
    assert_eq!(consultant.counts(), (1, 0), "{}", consultant.report());

    // The Refer-To named the consultation's dialog, with the tags as its remote party (the
    // consultant, which would receive the INVITE with Replaces) sees them: to-tag its own.
    let trace = &consultant.messages;
    let call_id = traced_header(trace, "Call-ID", "").expect("a Call-ID in the trace");
    let gateway_tag = traced_header(trace, "From", "tag=")
        .and_then(tag_of)
        .expect("the gateway's tag");
    let consultant_tag = traced_header(trace, "To", "tag=")
        .and_then(tag_of)
        .expect("the consultant's tag");
    let escape = |s: &str| s.replace('@', "%40");
    let expected = format!(
        "?Replaces={}%3Bto-tag%3D{}%3Bfrom-tag%3D{}>",
        escape(call_id),
        escape(consultant_tag),
        escape(gateway_tag)
    );
    assert!(
        transferee
            .messages
            .lines()
            .any(|l| l.starts_with("Refer-To:") && l.trim_end().ends_with(&expected)),
        "the REFER's Refer-To should end {expected:?}\n{}",
        transferee.report()
    );
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
}

#[test]
fn a_device_transfers_its_call_from_one_buddy_to_another() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("caller").unwrap();
    let (mut bob, bob_port) = Sim::buddy(&[], T).unwrap();
    let (mut carol, carol_port) = Sim::buddy(&[], T).unwrap();
    let target = format!("sip:bob@127.0.0.1:{bob_port}");
    let transfer_to = format!("sip:carol@127.0.0.1:{carol_port}");
    let mut sim = sim_as(
        "call",
        login_args(&gw, "caller", &secret),
        &[
            "--target",
            &target,
            "--transfer-to",
            &transfer_to,
            "--hold-ms",
            "30000",
        ],
    );
    // Bob, the transferee, is asked to call Carol, and does; the device hears it succeed.
    let refer = bob.wait_event("refer", T).unwrap();
    assert_eq!(refer["target"], transfer_to.as_str(), "{refer}");
    let invite = carol.wait_event("invite", T).unwrap();
    assert!(
        invite["from"].as_str().unwrap().starts_with("sip:buddy@"),
        "{invite}"
    );
    let done = sim
        .wait_for(|v| v["event"] == "transfer_status" && v["done"] == true, T)
        .unwrap();
    assert_eq!(done["sip_status"], 200, "{done}");
    let ended = sim
        .wait_for(|v| v["event"] == "call_event" && v["state"] == "ended", T)
        .unwrap();
    assert_eq!(ended["reason"], "transferred", "{ended}");
    assert_eq!(bob.wait_event("transfer_done", T).unwrap()["status"], 200);
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();

    // A transfer to someone busy fails: reported, and the device hangs up itself.
    let (_busy, busy_port) = Sim::buddy(&["--reject", "486"], T).unwrap();
    let busy = format!("sip:dave@127.0.0.1:{busy_port}");
    let mut sim = sim_as(
        "call",
        login_args(&gw, "caller", &secret),
        &[
            "--target",
            &target,
            "--transfer-to",
            &busy,
            "--hold-ms",
            "30000",
        ],
    );
    let done = sim
        .wait_for(|v| v["event"] == "transfer_status" && v["done"] == true, T)
        .unwrap();
    assert_eq!(done["sip_status"], 486, "{done}");
    let ended = sim
        .wait_for(|v| v["event"] == "call_event" && v["state"] == "ended", T)
        .unwrap();
    assert_eq!(ended["end_reason"], "local_hangup", "{ended}");
}

#[test]
fn a_sip_watcher_hears_a_device_come_take_a_call_and_go_back_to_open() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("callee").unwrap();
    let mut listener = sim_as("listen", login_args(&gw, "callee", &secret), &[]);
    listener.wait_event("welcome", T).unwrap();
    let watcher = sipp_client(&gw, "uac_subscribe.xml", "callee", &[]);
    gw.wait_metric("thalamus_presence_subscriptions", 1.0, T)
        .unwrap();
    // A call to the device: answered, held 1.5 s, hung up by the caller.
    let out = std::process::Command::new(thalamus_tests::bin("thalamus-sim"))
        .args(["sip-call", "--target", &format!("sip:callee@{}", gw.sip)])
        .args(["--hold-ms", "1500"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(report["succeeded"], 1, "{report}");
    let outcome = watcher.wait(SIPP_WAIT);
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
    gw.wait_metric("thalamus_presence_subscriptions", 0.0, T)
        .unwrap();
    assert!(
        gw.metric("thalamus_presence_notifies_total{reason=\"sent\"}")
            .unwrap()
            >= 4.0
    );
}

#[test]
fn a_fetch_returns_the_presence_a_device_set_itself() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("earpiece").unwrap();
    let mut device = sim_as(
        "connect",
        login_args(&gw, "earpiece", &secret),
        &["--presence", "busy", "--note", "in a meeting"],
    );
    device.wait_event("welcome", T).unwrap();
    // The update follows the Welcome on the same stream: give it a moment to be read.
    std::thread::sleep(Duration::from_millis(1000));
    let outcome = sipp_client(&gw, "uac_presence_fetch.xml", "earpiece", &[]).wait(SIPP_WAIT);
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
    // Anything but presence: 489 with Allow-Events.
    let (ok, failed) = sipp_client(&gw, "uac_subscribe_bad_event.xml", "earpiece", &[])
        .wait(SIPP_WAIT)
        .counts();
    assert_eq!((ok, failed), (1, 0));
}

#[test]
fn a_device_watches_a_sip_buddy_and_hears_its_presence_change() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("watcher").unwrap();
    let (server, port) = sipp_server(&["-sf", &scenario("uas_presence_server.xml"), "-m", "1"]);
    let bob = format!("sip:bob@127.0.0.1:{port}");
    let mut sim = sim_as(
        "watch",
        login_args(&gw, "watcher", &secret),
        &["--target", &bob, "--for-ms", "3000"],
    );
    let active = sim.wait_event("watch_status", T).unwrap();
    assert_eq!(
        (active["active"].as_bool(), active["sip_status"].as_u64()),
        (Some(true), Some(200)),
        "{active}"
    );
    let open = sim.wait_event("presence_update", T).unwrap();
    assert_eq!(
        (
            open["uri"].as_str(),
            open["state"].as_str(),
            open["note"].as_str()
        ),
        (Some(bob.as_str()), Some("available"), Some("at my desk")),
        "{open}"
    );
    let busy = sim.wait_event("presence_update", T).unwrap();
    assert_eq!(busy["state"], "busy", "{busy}");
    gw.wait_metric("thalamus_buddy_watches", 1.0, T).unwrap();
    // After 3 s the simulator unwatches: SIPp gets the unsubscribe, its last NOTIFY gets 200.
    let ended = sim.wait_event("watch_status", T).unwrap();
    assert_eq!(
        (ended["active"].as_bool(), ended["reason"].as_str()),
        (Some(false), Some("unwatched")),
        "{ended}"
    );
    let summary = sim.wait_event("summary", T).unwrap();
    assert_eq!(summary["watched"], 1, "{summary}");
    let outcome = server.wait(SIPP_WAIT);
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
    gw.wait_metric("thalamus_buddy_watches", 0.0, T).unwrap();
    assert_eq!(
        gw.metric("thalamus_buddy_presence_total{reason=\"update\"}")
            .unwrap(),
        2.0
    );
}

/// The buddy's presence server challenges the watch's refresh and its unsubscribe (401): the
/// gateway answers each with the device's credentials (SIPp verifies them), as the dialog's
/// next request, and the watch goes on until the device unwatches (12 s after the simulator
/// starts: the refresh, 3 s after the first NOTIFY, must come well before, even on a loaded
/// machine where the login is slow).
#[test]
fn a_watch_answers_a_challenge_to_its_refresh_and_unsubscribe() {
    let gw = Gateway::start(
        "[sip.auth]\nusername = \"alice\"\npassword = \"wonderland\"\nhosts = [\"127.0.0.1\"]\n",
    )
    .unwrap();
    let secret = gw.add_device("watcher").unwrap();
    let (server, port) = sipp_server(&[
        "-sf",
        &scenario("uas_presence_server_digest.xml"),
        "-m",
        "1",
    ]);
    let bob = format!("sip:bob@127.0.0.1:{port}");
    let mut sim = sim_as(
        "watch",
        login_args(&gw, "watcher", &secret),
        &["--target", &bob, "--for-ms", "12000"],
    );
    let active = sim.wait_event("watch_status", T).unwrap();
    assert_eq!(active["active"], true, "{active}");
    let first = sim.wait_event("presence_update", T).unwrap();
    assert_eq!(first["note"], "refresh soon", "{first}");
    // The refresh, challenged and answered, brings the next NOTIFY.
    let refreshed = sim.wait_event("presence_update", T).unwrap();
    assert_eq!(refreshed["note"], "refreshed", "{refreshed}");
    let ended = sim.wait_event("watch_status", T).unwrap();
    assert_eq!(
        (ended["active"].as_bool(), ended["reason"].as_str()),
        (Some(false), Some("unwatched")),
        "{ended}"
    );
    let outcome = server.wait(SIPP_WAIT);
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
}

/// SIPp (`scenario`) calls the device and transfers it to a buddy that hangs up after a
/// second: the device is told, the new call reaches the buddy from the device's address, the
/// old call ends as transferred and the new one when the buddy hangs up.
fn a_sip_peer_transfers_the_device_with(scenario: &str) {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("callee").unwrap();
    let (mut carol, carol_port) = Sim::buddy(&["--hangup-after-ms", "1000"], T).unwrap();
    let mut listener = sim_as("listen", login_args(&gw, "callee", &secret), &[]);
    listener.wait_event("welcome", T).unwrap();
    let carol_uri = format!("sip:carol@127.0.0.1:{carol_port}");
    let outcome =
        sipp_client(&gw, scenario, "callee", &["-key", "carol", &carol_uri]).wait(SIPP_WAIT);
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
    // The device was told, and the new call reached Carol from the device's address.
    let told = listener.wait_event("transfer_requested", T).unwrap();
    assert_eq!(told["target"], carol_uri.as_str(), "{told}");
    assert!(
        told["referred_by"].as_str().unwrap().contains("sip:sipp@"),
        "{told}"
    );
    let invite = carol.wait_event("invite", T).unwrap();
    assert!(
        invite["from"].as_str().unwrap().starts_with("sip:callee@"),
        "{invite}"
    );
    let old = ended_call(&mut listener, &told["call_ref"]);
    assert_eq!(old["reason"], "transferred", "{old}");
    // Carol hangs up after a second: the new call ends too.
    ended_call(&mut listener, &told["new_call_ref"]);
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
}

#[test]
fn a_sip_peer_transfers_the_device_to_a_buddy() {
    a_sip_peer_transfers_the_device_with("uac_refer_device.xml");
}

/// RFC 4488: a REFER that requires `norefersub` and asks for no subscription is accepted with
/// `Refer-Sub: false`; no NOTIFY follows (the scenario fails on one), and the call still ends
/// once the transfer succeeds.
#[test]
fn a_sip_peer_transfers_the_device_without_the_refer_subscription() {
    a_sip_peer_transfers_the_device_with("uac_refer_norefersub.xml");
}

#[test]
fn a_sip_peer_s_attended_transfer_reaches_its_target_with_the_replaces() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("callee").unwrap();
    let (target, target_port) = sipp_server(&["-sf", &scenario("uas_replaces.xml"), "-m", "1"]);
    let mut listener = sim_as("listen", login_args(&gw, "callee", &secret), &[]);
    listener.wait_event("welcome", T).unwrap();
    let refer_to =
        format!("sip:carol@127.0.0.1:{target_port}?Replaces=abc%40x%3Bto-tag%3D1%3Bfrom-tag%3D2");
    let transferor = sipp_client(
        &gw,
        "uac_refer_device.xml",
        "callee",
        &["-key", "carol", &refer_to],
    )
    .wait(SIPP_WAIT);
    assert_eq!(transferor.counts(), (1, 0), "{}", transferor.report());
    let told = listener.wait_event("transfer_requested", T).unwrap();
    assert_eq!(told["target"], refer_to.as_str(), "{told}");
    let old = ended_call(&mut listener, &told["call_ref"]);
    assert_eq!(old["reason"], "transferred", "{old}");
    // The target checked the INVITE's Replaces and Request-URI, answered, and hung up.
    let target = target.wait(SIPP_WAIT);
    assert_eq!(target.counts(), (1, 0), "{}", target.report());
    ended_call(&mut listener, &told["new_call_ref"]);
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
}

#[test]
fn an_invite_with_replaces_takes_the_place_of_the_device_s_call() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("callee").unwrap();
    let mut listener = sim_as("listen", login_args(&gw, "callee", &secret), &[]);
    listener.wait_event("welcome", T).unwrap();
    let peer = sipp_client(&gw, "uac_replaces.xml", "callee", &[]);
    let first = listener
        .wait_for(|v| v["event"] == "incoming_call", T)
        .unwrap();
    let second = listener
        .wait_for(|v| v["event"] == "incoming_call", T)
        .unwrap();
    assert_eq!(
        second["replaces_call_ref"], first["call_ref"],
        "the device is told which call the new one replaces: {second}"
    );
    let replaced = ended_call(&mut listener, &first["call_ref"]);
    assert_eq!(replaced["reason"], "replaced", "{replaced}");
    // SIPp checked the BYE was the first dialog's, then hung up the second.
    let outcome = peer.wait(SIPP_WAIT);
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
    ended_call(&mut listener, &second["call_ref"]);
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
    // A Replaces naming no call of the device: 481, counted; the device hears nothing.
    let stray = sipp_client(&gw, "uac_replaces_unknown.xml", "callee", &[]).wait(SIPP_WAIT);
    assert_eq!(stray.counts(), (1, 0), "{}", stray.report());
    assert_eq!(
        gw.metric("thalamus_sip_refused_total{reason=\"replaces_no_dialog\"}")
            .unwrap(),
        1.0
    );
}

#[test]
fn a_device_of_revision_1_keeps_its_call_when_asked_to_transfer() {
    let gw = Gateway::start("").unwrap();
    let secret = gw.add_device("callee").unwrap();
    let mut login = login_args(&gw, "callee", &secret);
    login.extend(["--revision".to_string(), "1".to_string()]);
    let mut listener = sim_as("listen", login, &[]);
    listener.wait_event("welcome", T).unwrap();
    let outcome = sipp_client(
        &gw,
        "uac_refer_declined.xml",
        "callee",
        &["-key", "carol", "sip:carol@example.org"],
    )
    .wait(SIPP_WAIT);
    assert_eq!(outcome.counts(), (1, 0), "{}", outcome.report());
    let ended = listener
        .wait_for(
            |v| {
                v["event"] == "call_event"
                    && v["state"] == "ended"
                    && v["reason"] != "media statistics"
            },
            T,
        )
        .unwrap();
    assert_eq!(ended["end_reason"], "remote_hangup", "{ended}");
    assert!(
        !listener
            .seen
            .iter()
            .any(|v| v["event"] == "transfer_requested"),
        "{:?}",
        listener.seen
    );
}
