//! SIPp's signalling load over TLS, both ways, against the gateway's TLS transport.
//!
//! Debian's SIPp (`sip-tester`) is built without TLS ("To use a TLS transport you must compile
//! SIPp with OpenSSL"), so here SIPp speaks TCP to stunnel (Debian's `stunnel4`, OpenSSL), and
//! stunnel carries it over TLS: as a TLS client in front of SIPp's calls to the gateway's
//! `[sip.tls]` listener (stunnel checks the gateway's certificate and its IP address), and as
//! a TLS server in front of SIPp's UAS for the gateway's calls (the gateway checks stunnel's
//! certificate). bench/sipp-tls.sh runs the same load with a SIPp built with TLS (`-t l1`).
//!
//! What it does not cover: SIPp's own TLS stack (see the benchmark), mutual TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thalamus_tests::cluster::free_tcp_port;
use thalamus_tests::{login_args, scenario, sim_as, sipp, Gateway, Proc, SippProcess};

const T: Duration = Duration::from_secs(20);
/// SIPp's own timeout (60 s), then time to print its statistics and exit.
const SIPP_WAIT: Duration = Duration::from_secs(90);
const CALLS: u32 = 300;

/// A self-signed certificate for 127.0.0.1: (certificate, key) files in `dir`.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let paths = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&paths.0, cert.cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.key_pair.serialize_pem()).unwrap();
    paths
}

/// stunnel in the foreground with `service` (one `[section]` of its configuration), logging to
/// `dir`/stunnel.log; waits until it accepts on `accept`.
fn stunnel(dir: &Path, service: &str, accept: u16) -> Proc {
    let conf = dir.join("stunnel.conf");
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\ndebug = 5\noutput = {}\n\n{service}",
            dir.join("stunnel.log").display()
        ),
    )
    .unwrap();
    let child = Command::new("stunnel4")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("stunnel4 (scripts/install-peers installs it)");
    let proc = Proc { child };
    // Not by connecting: a connection to the client front would open a TLS connection to the
    // gateway, and the test counts those.
    let deadline = Instant::now() + T;
    while !listening(accept) {
        assert!(
            Instant::now() < deadline,
            "stunnel does not listen: {}",
            log(dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proc
}

/// Whether some socket listens on TCP `port` of 127.0.0.1 (from /proc/net/tcp).
fn listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A")
    })
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("stunnel.log")).unwrap_or_default()
}

fn tls_gateway(crt: &Path, key: &Path, ca: &Path, tls_port: u16) -> Gateway {
    Gateway::start(&format!(
        "[sip.tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncertificate = {:?}\nprivate_key = {:?}\n\
         ca_certificates = {:?}\n\n[session]\nmax_calls = 64\n",
        crt.display().to_string(),
        key.display().to_string(),
        ca.display().to_string(),
    ))
    .unwrap()
}

fn metric(gw: &Gateway, event: &str) -> f64 {
    gw.metric(&format!(
        "thalamus_sip_tcp_events_total{{event=\"{event}\"}}"
    ))
    .unwrap()
}

/// SIPp calls a listening device CALLS times at 100 calls/s, 50 at once, every request and
/// response over one TLS connection into the gateway (stunnel as SIPp's TLS client).
#[test]
fn sipp_load_reaches_a_device_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (gw_crt, gw_key) = certificate(dir.path(), "gateway");
    let tls_port = free_tcp_port().unwrap();
    let gw = tls_gateway(&gw_crt, &gw_key, &gw_crt, tls_port);
    let secret = gw.add_device("callee").unwrap();
    let mut listener = sim_as("listen", login_args(&gw, "callee", &secret), &[]);
    listener.wait_event("welcome", T).unwrap();
    let front = free_tcp_port().unwrap();
    let _stunnel = stunnel(
        dir.path(),
        &format!(
            "[sipp-to-gateway]\nclient = yes\naccept = 127.0.0.1:{front}\n\
             connect = 127.0.0.1:{tls_port}\nCAfile = {}\nverifyChain = yes\ncheckIP = 127.0.0.1\n",
            gw_crt.display()
        ),
        front,
    );
    let mut command = sipp();
    command
        .args(["-sn", "uac", "-s", "callee", "-t", "t1"])
        .args(["-m", &CALLS.to_string(), "-r", "100", "-l", "50"])
        .args([
            "-i",
            "127.0.0.1",
            "-nostdin",
            "-timeout",
            "60s",
            "-timeout_error",
        ])
        .args(["-p", &free_tcp_port().unwrap().to_string()])
        .arg(format!("127.0.0.1:{front}"));
    let outcome = SippProcess::spawn(command).wait(SIPP_WAIT);
    assert_eq!(
        outcome.counts(),
        (u64::from(CALLS), 0),
        "{}\n{}",
        outcome.report(),
        log(dir.path())
    );
    gw.wait_metric(
        "thalamus_calls_ended_total{reason=\"remote_hangup\"}",
        f64::from(CALLS),
        T,
    )
    .unwrap();
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
    // Every call went over the one TLS connection stunnel opened (OpenSSL verified the
    // gateway's certificate and address to open it), none in clear.
    assert_eq!(metric(&gw, "tls_established"), 1.0);
    assert_eq!(metric(&gw, "tls_handshake_failed"), 0.0);
    assert!(
        log(dir.path()).contains("Certificate accepted"),
        "{}",
        log(dir.path())
    );
}

/// The device calls SIPp's UAS CALLS times over TLS: the gateway opens one TLS connection to
/// stunnel (checking its certificate), and SIPp's Contact names that TLS front, so the ACKs
/// and BYEs go over it too.
#[test]
fn a_device_loads_sipp_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (gw_crt, gw_key) = certificate(dir.path(), "gateway");
    let (front_crt, front_key) = certificate(dir.path(), "front");
    let tls_port = free_tcp_port().unwrap();
    let gw = tls_gateway(&gw_crt, &gw_key, &front_crt, tls_port);
    let secret = gw.add_device("caller").unwrap();
    let sipp_port = free_tcp_port().unwrap();
    let front = free_tcp_port().unwrap();
    let mut command = sipp();
    command
        .args(["-sf", &scenario("uas_behind_tls.xml"), "-t", "t1"])
        .args(["-key", "tls_port", &front.to_string()])
        .args(["-m", &CALLS.to_string(), "-i", "127.0.0.1", "-nostdin"])
        .args(["-p", &sipp_port.to_string()]);
    let uas = SippProcess::spawn(command);
    let deadline = Instant::now() + T;
    while !listening(sipp_port) {
        assert!(Instant::now() < deadline, "SIPp does not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _stunnel = stunnel(
        dir.path(),
        &format!(
            "[gateway-to-sipp]\naccept = 127.0.0.1:{front}\nconnect = 127.0.0.1:{sipp_port}\n\
             cert = {}\nkey = {}\n",
            front_crt.display(),
            front_key.display()
        ),
        front,
    );
    let target = format!("sip:service@127.0.0.1:{front};transport=tls");
    let mut caller = sim_as(
        "call",
        login_args(&gw, "caller", &secret),
        &[
            "--target",
            &target,
            "--calls",
            &CALLS.to_string(),
            "--hold-ms",
            "10",
        ],
    );
    let summary = caller
        .wait_event("summary", Duration::from_secs(120))
        .unwrap();
    assert_eq!(
        summary["succeeded"],
        CALLS,
        "{summary}\n{}",
        log(dir.path())
    );
    assert_eq!(summary["failed"], 0, "{summary}");
    let outcome = uas.wait(SIPP_WAIT);
    assert_eq!(
        outcome.counts(),
        (u64::from(CALLS), 0),
        "{}",
        outcome.report()
    );
    gw.wait_metric("thalamus_calls_active", 0.0, T).unwrap();
    // One TLS connection (the gateway checked stunnel's certificate to open it) carried every
    // INVITE, ACK and BYE.
    assert_eq!(metric(&gw, "tls_established"), 1.0);
    assert_eq!(metric(&gw, "tls_handshake_failed"), 0.0);
}
