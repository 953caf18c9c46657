//! Devices follow ownership across a cluster, with real processes: a `thalamus balancer`, two
//! gateway nodes (`thalamus run`, one certificate, one registry, one resume secret, heartbeats
//! to the balancer) and the simulator (`thalamus-sim connect`).
//!
//! - A device that logs in at the node that does not own it gets `Redirect` to its owner and
//!   the simulator follows it (the owner's `Welcome` names the owner).
//! - When its owner drains, the owner says `Goodbye{draining}`; the simulator goes back to its
//!   entry point, which now owns the device and takes it.
//! - When the owner stops draining, the entry point moves the device back (`Goodbye`, then a
//!   redirect again).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::Value;
use thalamus_ownership::{owner, NodeId};
use thalamus_tests::cluster::{http_request, Balancer};
use thalamus_tests::{Gateway, Sim};

const T: Duration = Duration::from_secs(20);
const HEARTBEAT_MS: u64 = 100;
const RESUME_SECRET: &str = "0badc0ffee0ddf00d5eed5a1ad5a1ad5c0c0a5ca1ab1e5eed0f0ddba11adc0de";

/// The nodes in `gw`'s live set (from its admin `/cluster`), sorted.
fn live_set(gw: &Gateway) -> Vec<String> {
    let body = gw.admin_get("/cluster").unwrap_or_default();
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let mut ids: Vec<String> = v["live_set"]["eligible"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn node_extra(
    id: &str,
    registry: &std::path::Path,
    lb: &Balancer,
    cert: Option<&Gateway>,
) -> String {
    let quic = cert
        .map(|a| {
            let data = a.dir.path().join("data");
            format!(
                "[quic]\ncert = {:?}\nkey = {:?}\nkeepalive_interval_ms = 1000\n\n",
                data.join("quic-cert.pem"),
                data.join("quic-key.pem")
            )
        })
        .unwrap_or_else(|| "[quic]\nkeepalive_interval_ms = 1000\n\n".to_string());
    format!(
        "[node]\nid = \"{id}\"\ndevice_registry = {registry:?}\n\n{quic}\
         [auth]\nresume_secret = \"{RESUME_SECRET}\"\n\n\
         [cluster.heartbeat]\nbalancers = [\"{}\"]\ninterval_ms = {HEARTBEAT_MS}\n",
        lb.heartbeat
    )
}

#[test]
fn devices_are_redirected_to_their_owner_and_follow_draining_and_its_end() {
    let lb = Balancer::start(HEARTBEAT_MS, 3, "info").unwrap();
    let registry_dir = tempfile::tempdir().unwrap();
    let registry = registry_dir.path().join("devices.toml");
    let a = Gateway::start(&node_extra("node-1", &registry, &lb, None)).unwrap();
    // One cluster, one certificate: the device pins it once.
    let b = Gateway::start(&node_extra("node-2", &registry, &lb, Some(&a))).unwrap();
    assert_eq!(a.fingerprint, b.fingerprint);
    let both = ["node-1".to_string(), "node-2".to_string()];
    wait_until("the balancer sees both nodes", || lb.eligible() == both);
    wait_until("both nodes learn the live set", || {
        live_set(&a) == both && live_set(&b) == both
    });

    // A device that node-2 owns while both are up.
    let ids = [
        NodeId::new("node-1").unwrap(),
        NodeId::new("node-2").unwrap(),
    ];
    let device = (0..)
        .map(|i| format!("wanderer-{i}"))
        .find(|d| owner(d, &ids).map(NodeId::as_str) == Some("node-2"))
        .unwrap();
    let secret = a.add_device(&device).unwrap();

    // Entry point node-1: redirected to node-2.
    let mut sim = Sim::connect(&a, &device, &secret, &[]).unwrap();
    let redirect = sim.wait_event("redirect", T).unwrap();
    assert_eq!(redirect["node_id"], "node-2");
    assert_eq!(redirect["address"], b.quic.to_string());
    let welcome = sim.wait_event("welcome", T).unwrap();
    assert_eq!(welcome["node_id"], "node-2", "{welcome}");
    let connected_to = sim
        .seen
        .iter()
        .filter(|e| e["event"] == "connected")
        .filter_map(|e| e["gateway"].as_str().map(str::to_string))
        .collect::<Vec<_>>();
    assert_eq!(connected_to, [a.quic.to_string(), b.quic.to_string()]);
    // node-2's heartbeats report its load: one device session.
    wait_until("node-2 reports its device", || {
        lb.node("node-2")["load"]["devices"] == 1 && lb.node("node-1")["load"]["devices"] == 0
    });
    assert_eq!(
        a.metric("thalamus_device_sessions_redirected_total")
            .unwrap(),
        1.0
    );
    assert_eq!(
        b.metric("thalamus_device_sessions_redirected_total")
            .unwrap(),
        0.0
    );

    // node-2 drains: the balancer takes it out of the live set, node-2 sends the device away
    // and node-1 (the entry point, now the owner) takes it.
    let (status, body) = http_request(b.admin, "POST", "/drain").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(b.metric("thalamus_node_draining").unwrap(), 1.0);
    wait_until("the balancer sees node-2 draining", || {
        lb.eligible() == ["node-1".to_string()]
    });
    let goodbye = sim.wait_event("goodbye", T).unwrap();
    assert_eq!(goodbye["reason"], "draining", "{goodbye}");
    let welcome = sim.wait_event("welcome", T).unwrap();
    assert_eq!(welcome["node_id"], "node-1", "{welcome}");
    assert_eq!(welcome["resumed"], true, "{welcome}");

    // node-2 is back: node-1 moves the device to its owner again.
    let (status, _) = http_request(b.admin, "DELETE", "/drain").unwrap();
    assert_eq!(status, 200);
    assert_eq!(b.metric("thalamus_node_draining").unwrap(), 0.0);
    let goodbye = sim
        .wait_event("goodbye", T)
        .unwrap_or_else(|e| panic!("{e}\nA:\n{}\nB:\n{}", a.log(), b.log()));
    assert_eq!(goodbye["reason"], "draining", "{goodbye}");
    let redirect = sim.wait_event("redirect", T).unwrap();
    assert_eq!(redirect["node_id"], "node-2");
    let welcome = sim.wait_event("welcome", T).unwrap();
    assert_eq!(welcome["node_id"], "node-2", "{welcome}");
    assert_eq!(
        a.metric("thalamus_device_sessions_redirected_total")
            .unwrap(),
        2.0
    );
    drop(sim);
}

#[test]
fn without_a_live_set_a_node_serves_every_device_itself() {
    // A node whose balancer never answers (nothing listens there) serves devices itself: no
    // redirect on a stale or missing live set.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let registry_dir = tempfile::tempdir().unwrap();
    let registry = registry_dir.path().join("devices.toml");
    let extra = format!(
        "[node]\nid = \"lonely\"\ndevice_registry = {registry:?}\n\n\
         [cluster.heartbeat]\nbalancers = [\"{}\"]\ninterval_ms = {HEARTBEAT_MS}\n",
        silent.local_addr().unwrap()
    );
    let gw = Gateway::start(&extra).unwrap();
    // Heartbeats do arrive at the silent "balancer".
    let mut buf = [0u8; 2048];
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = silent.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("\"node\":\"lonely\""));
    let secret = gw.add_device("homebody").unwrap();
    let mut sim = Sim::connect(&gw, "homebody", &secret, &[]).unwrap();
    let welcome = sim.wait_event("welcome", T).unwrap();
    assert_eq!(welcome["node_id"], "lonely");
    assert!(!sim.seen.iter().any(|e| e["event"] == "redirect"));
    let cluster: Value = serde_json::from_str(&gw.admin_get("/cluster").unwrap()).unwrap();
    assert_eq!(cluster["live_set"], Value::Null, "{cluster}");
}
