//! A browser as a device (issue 20), in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, installed by scripts/install-peers) driven over WebDriver (`fantoccini`).
//!
//! The node serves its device page (`[web] listen`); the page logs in over WebTransport (the
//! node's short-lived certificate pinned by its hash), calls `thalamus-sim buddy --echo`,
//! streams Chromium's fake microphone as G.711 for a few seconds and counts the frames that
//! come back; the buddy counts the packets it echoed. It sends DTMF (the buddy hears it) and a
//! text (the buddy receives it), hangs up, and the test saves a screenshot
//! (`target/screenshots/device-page.png`, shown in docs/console.md).
//!
//! A browser device and a native QUIC device (`thalamus-sim`) then call each other through the
//! node's SIP side, both ways, each counting the other's frames.
//!
//! The operator console (`/console` on the admin endpoint, with the admin token) shows the
//! node's devices online and a call while it lasts with each stream's figures (audio, video,
//! signal data), and a drain clicked in it reaches the node. In a two-node cluster on Redis it
//! shows both nodes with their load from the balancer's table; when one node freezes
//! (SIGSTOP) it shows it down, lists its dialogs from the store, and a claim clicked in it
//! moves the dialog to the node serving the console.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};
use serde_json::{json, Value};
use thalamus_tests::cluster::{free_tcp_port, segment, Balancer, Redis};
use thalamus_tests::{login_args, runtime, sim_as, Gateway, Proc, Sim, ADMIN_TOKEN};

const T: Duration = Duration::from_secs(20);

/// chromedriver on a free port, and a WebDriver session of a headless Chromium with a fake
/// microphone (its own profile directory, no background network).
struct Browser {
    _driver: Driver,
    _profile: tempfile::TempDir,
    client: Client,
}

/// chromedriver in a process group of its own, the whole group (Chromium included) killed
/// when dropped, even when a test fails before closing its session.
struct Driver(Proc);

impl Drop for Driver {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Browser {
    async fn start() -> Browser {
        let port = free_tcp_port().unwrap();
        let driver = Driver(Proc {
            child: Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .process_group(0)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver (scripts/install-peers installs chromium-driver)"),
        });
        let profile = tempfile::tempdir().unwrap();
        let capabilities: serde_json::Map<String, Value> = serde_json::from_value(json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--use-fake-device-for-media-stream",
                    "--use-fake-ui-for-media-stream", "--autoplay-policy=no-user-gesture-required",
                    "--window-size=1200,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }))
        .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + T;
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match Client::with_capabilities_and_connector(&url, &capabilities, connector).await {
                Ok(client) => break client,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no WebDriver session: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        Browser {
            _driver: driver,
            _profile: profile,
            client,
        }
    }

    async fn fill(&self, id: &str, text: &str) {
        let input = self.client.find(Locator::Id(id)).await.unwrap();
        input.clear().await.unwrap();
        input.send_keys(text).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// The text of the element `css` finds.
    async fn text(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The page's `window.thalamus` (its state and counters).
    async fn page_state(&self) -> Value {
        self.js_value("window.thalamus").await
    }

    async fn js_value(&self, expression: &str) -> Value {
        self.client
            .execute(&format!("return {expression};"), Vec::new())
            .await
            .unwrap()
    }

    /// Waits until `pred` holds of the page's state.
    async fn wait(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for("window.thalamus", what, pred).await
    }

    /// Waits until `pred` holds of the page's `expression`.
    async fn wait_for(&self, expression: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + T;
        loop {
            let state = self.js_value(expression).await;
            if pred(&state) {
                return state;
            }
            assert!(Instant::now() < deadline, "{what}: {state}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), png).unwrap();
    }
}

/// A node taking WebTransport with its device page, and the page's port.
fn node_with_page() -> (Gateway, u16) {
    let gw =
        Gateway::start("[quic]\nwebtransport = true\n\n[web]\nlisten = \"127.0.0.1:0\"").unwrap();
    let web = gw.web.expect("the node serves its device page").port();
    (gw, web)
}

/// Opens the page and logs in as `device`.
async fn log_in(browser: &Browser, web: u16, device: &str, secret: &str) {
    browser
        .client
        .goto(&format!("http://127.0.0.1:{web}/"))
        .await
        .unwrap();
    browser.fill("device", device).await;
    browser.fill("secret", secret).await;
    browser.click("#login").await;
    browser.wait("logged in", |s| s["session"] == "live").await;
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn the_device_page_calls_the_echo_buddy_over_webtransport() {
    let (gw, web) = node_with_page();
    let secret = gw.add_device("browser-1").unwrap();
    let (mut buddy, port) = Sim::buddy(&["--echo"], T).unwrap();
    runtime().block_on(async {
        let browser = Browser::start().await;
        browser
            .client
            .goto(&format!("http://127.0.0.1:{web}/"))
            .await
            .unwrap();
        browser.fill("device", "browser-1").await;
        browser.fill("secret", &secret).await;
        browser.click("#login").await;
        let live = browser.wait("logged in", |s| s["session"] == "live").await;
        assert_eq!(live["aor"], "sip:browser-1@thalamus.local", "{live}");
        assert_eq!(
            gw.metric("thalamus_device_sessions_live_by_transport{transport=\"webtransport\"}")
                .unwrap(),
            1.0
        );

        let target = format!("sip:echo@127.0.0.1:{port}");
        browser.fill("target", &target).await;
        browser.click("#dial").await;
        browser
            .wait("answered", |s| s["call"]["state"] == "answered")
            .await;
        // A few seconds of microphone (Chromium's fake one) at 50 frames a second, echoed.
        let streamed = browser
            .wait("3 s of audio echoed", |s| {
                s["framesSent"].as_u64() >= Some(150) && s["framesReceived"].as_u64() >= Some(140)
            })
            .await;
        assert!(
            u(&streamed, "framesReceived") <= u(&streamed, "framesSent"),
            "{streamed}"
        );
        browser.click(".dtmf[data-digit=\"7\"]").await;
        browser.fill("text-to", &target).await;
        browser.fill("text-body", "hello from the browser").await;
        browser.click("#send-text").await;
        browser
            .wait("text delivered", |s| {
                s["events"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|e| e.as_str() == Some("text delivered (200)")))
            })
            .await;
        browser.screenshot("device-page.png").await;
        browser.click("#hangup").await;
        let ended = browser
            .wait("hung up", |s| {
                s["call"].is_null() && !s["lastCall"].is_null()
            })
            .await;
        let sent = u(&ended, "framesSent");
        let received = u(&ended, "framesReceived");
        eprintln!("browser sent {sent} frames, got {received} back");
        browser.client.close().await.unwrap();

        // The buddy heard the digit, got the text, and counts what it echoed: every frame the
        // browser counted back came through it.
        let bye = buddy.wait_event("bye", T).unwrap();
        let seen = |event: &str| -> Vec<Value> {
            buddy
                .seen
                .iter()
                .filter(|v| v["event"] == event)
                .cloned()
                .collect()
        };
        let digits: Vec<Value> = seen("dtmf").iter().map(|d| d["digit"].clone()).collect();
        assert_eq!(digits, [json!("7")], "{:?}", buddy.seen);
        let texts = seen("message");
        assert_eq!(texts.len(), 1, "{:?}", buddy.seen);
        assert_eq!(texts[0]["body"], "hello from the browser", "{texts:?}");
        let echoed = u(&bye, "rtp_echoed");
        // The echo also returned the digit's telephone-event packets (not counted as frames).
        assert!(echoed >= received, "{bye} {ended}");
        assert!(echoed <= sent + 20, "{bye} {ended}");
    });
    gw.wait_metric(
        "thalamus_calls_ended_total{reason=\"local_hangup\"}",
        1.0,
        T,
    )
    .unwrap();
}

#[test]
fn a_browser_and_a_native_device_call_each_other() {
    let (gw, web) = node_with_page();
    let secret = gw.add_device("browser-2").unwrap();
    let ear_secret = gw.add_device("ear").unwrap();
    runtime().block_on(async {
        let browser = Browser::start().await;
        log_in(&browser, web, "browser-2", &secret).await;

        // The browser calls the native device (which echoes) at the node's own SIP address.
        let mut ear = sim_as(
            "listen",
            login_args(&gw, "ear", &ear_secret),
            &["--echo", "--calls", "1"],
        );
        ear.wait_event("welcome", T).unwrap();
        browser.fill("target", &format!("sip:ear@{}", gw.sip)).await;
        browser.click("#dial").await;
        browser
            .wait("the native device answered", |s| {
                s["call"]["state"] == "answered"
            })
            .await;
        let echoed = browser
            .wait("the native device echoed 100 frames", |s| {
                s["framesReceived"].as_u64() >= Some(100)
            })
            .await;
        browser.click("#hangup").await;
        let report = ear.wait_event("media_report", T).unwrap();
        assert!(u(&report, "frames_received") >= 100, "{report}");
        assert!(
            u(&report, "frames_echoed") >= u(&echoed, "framesReceived"),
            "{report} {echoed}"
        );
        browser.wait("hung up", |s| s["call"].is_null()).await;

        // The native device calls the browser, which answers; each gets the other's frames.
        let before = u(&browser.page_state().await, "framesReceived");
        let mut caller = sim_as(
            "call",
            login_args(&gw, "ear", &ear_secret),
            &[
                "--target",
                &format!("sip:browser-2@{}", gw.sip),
                "--media",
                "--hold-ms",
                "5000",
            ],
        );
        browser
            .wait("ringing", |s| {
                s["call"]["incoming"] == true && s["call"]["state"] == "ringing"
            })
            .await;
        browser.screenshot("device-page-incoming.png").await;
        browser.click("#answer").await;
        let got = browser
            .wait("the native device's frames", |s| {
                s["framesReceived"].as_u64() >= Some(before + 100)
            })
            .await;
        let report = caller.wait_event("media_report", T).unwrap();
        // The browser does not echo: what the caller got are the browser's own frames.
        assert!(u(&report, "frames_foreign") >= 100, "{report} {got}");
        assert_eq!(u(&report, "payload_matches"), 0, "{report}");
        browser
            .wait("the caller hung up", |s| s["call"].is_null())
            .await;
        browser.client.close().await.unwrap();
    });
}

#[test]
fn the_console_shows_the_call_and_a_drain_reaches_the_node() {
    let gw = Gateway::start("").unwrap();
    let listener_secret = gw.add_device("ear").unwrap();
    let caller_secret = gw.add_device("caller").unwrap();
    // The caller calls the earpiece through the node's SIP side with audio, video and the
    // signal stream; the earpiece echoes its audio.
    let mut listener = sim_as(
        "listen",
        login_args(&gw, "ear", &listener_secret),
        &["--signal", "--video", "--echo", "--calls", "1"],
    );
    listener.wait_event("welcome", T).unwrap();
    let target = format!("sip:ear@{}", gw.sip);
    let mut caller = runtime().block_on(async {
        let browser = Browser::start().await;
        browser
            .client
            .goto(&format!("http://{}/console", gw.admin))
            .await
            .unwrap();
        // Without the token the console gets nothing.
        browser.fill("token", "not-the-token").await;
        browser.click("#connect").await;
        browser
            .wait_for(
                "document.getElementById('link').textContent",
                "refused",
                |v| v == "wrong token",
            )
            .await;
        browser.fill("token", ADMIN_TOKEN).await;
        browser.click("#connect").await;
        // The call starts once the console is open, so that its charts see it.
        let caller = sim_as(
            "call",
            login_args(&gw, "caller", &caller_secret),
            &[
                "--target",
                &target,
                "--signal",
                "--video",
                "--media",
                "--hold-ms",
                "8000",
            ],
        );
        let state = browser
            .wait_for("window.console_state", "the call and both devices", |s| {
                s["devices_online"] == 2
                    && s["calls"].as_array().is_some_and(|calls| {
                        calls
                            .iter()
                            .any(|c| c["device"] == "caller" && c["state"] == "answered")
                    })
            })
            .await;
        assert_eq!(state["node"], "node-1", "{state}");
        assert_eq!(state["draining"], false, "{state}");
        // The table shows it too.
        let row = browser.text("#calls tr[data-device=\"caller\"]").await;
        assert!(row.contains("answered"), "{row}");
        // Each stream's figures, read from the call's relays when the console asks: the
        // echoed audio, the earpiece's video and signal data, none lost on loopback.
        let stream_of = |c: &Value, name: &str| -> Option<Value> {
            c["media"]
                .as_array()?
                .iter()
                .find(|m| m["stream"] == name)
                .cloned()
        };
        let with_media = browser
            .wait_for("window.console_state", "media figures", |s| {
                s["calls"].as_array().is_some_and(|calls| {
                    calls.iter().any(|c| {
                        c["device"] == "caller"
                            && ["audio", "video", "signal"].iter().all(|name| {
                                stream_of(c, name).is_some_and(|m| {
                                    m["packets_received"].as_u64() > Some(20)
                                })
                            })
                    })
                })
            })
            .await;
        let call = with_media["calls"]
            .as_array()
            .and_then(|calls| calls.iter().find(|c| c["device"] == "caller"))
            .cloned()
            .unwrap();
        for name in ["audio", "video", "signal"] {
            let m = stream_of(&call, name).unwrap();
            assert_eq!(m["packets_lost"], 0, "{name}: {call}");
        }
        let row = browser.text("#calls tr[data-device=\"caller\"]").await;
        for name in ["audio: 0.0% lost", "video: 0.0% lost", "signal: 0.0% lost"] {
            assert!(row.contains(name), "{name}: {row}");
        }
        assert!(row.contains(&target), "{row}");
        browser.screenshot("console.png").await;

        browser.click("#drain").await;
        browser
            .wait_for("window.console_state", "draining", |s| {
                s["draining"] == true
            })
            .await;
        let drain: Value = serde_json::from_str(&gw.admin_get("/drain").unwrap()).unwrap();
        assert_eq!(drain["draining"], true, "{drain}");

        // The charts, from /metrics sampled every 2 s: the calls started (two legs of the
        // one call) show as a rate, and the set-up time's p50 and p99 over 10 s come from
        // the histogram; both are drawn.
        let charts = browser
            .wait_for("window.console_charts", "the call in the charts", |c| {
                let positive = |key: &str| {
                    c[key]
                        .as_array()
                        .is_some_and(|v| v.iter().any(|x| x.as_f64() > Some(0.0)))
                };
                positive("started") && positive("p50") && positive("p99")
            })
            .await;
        let p50 = charts["p50"].as_array().unwrap();
        let setup_ms = p50.iter().filter_map(Value::as_f64).fold(0.0, f64::max);
        assert!(setup_ms <= 10_000.0, "{charts}");
        for chart in ["chart-calls", "chart-setup"] {
            let drawn = browser
                .js_value(&format!(
                    "(() => {{ const c = document.getElementById('{chart}'); \
                     const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
                     let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }})()"
                ))
                .await;
            assert!(drawn.as_u64() > Some(0), "{chart} is blank");
        }
        browser.screenshot("console-charts.png").await;
        browser.client.close().await.unwrap();
        caller
    });
    // The call already up goes on to its end.
    let summary = caller.wait_event("summary", T).unwrap();
    assert_eq!(summary["succeeded"], 1, "{summary}");
    assert_eq!(
        gw.metric("thalamus_admin_refused_total{reason=\"console_token\"}")
            .unwrap(),
        1.0
    );
}

/// A node's configuration in a two-node cluster on Redis behind `lb`, whose node table the
/// console reads (`[admin] balancers`). Devices stay where they log in.
fn cluster_node(id: &str, redis: &Redis, lb: &Balancer, registry: &std::path::Path) -> String {
    format!(
        "[node]\nid = \"{id}\"\ndevice_registry = {:?}\n\n\
         [cluster]\nlease_ttl_ms = 30000\n\n\
         [cluster.store]\nbackend = \"redis\"\n\n\
         [cluster.store.redis]\nurl = \"{}\"\n\n\
         [cluster.heartbeat]\nbalancers = [\"{}\"]\ninterval_ms = 100\nredirect_devices = false\n\n\
         [admin]\nbalancers = [\"{}\"]\n",
        registry.join("devices.toml"),
        redis.url(),
        lb.heartbeat,
        lb.admin
    )
}

#[test]
fn the_console_shows_the_cluster_and_claims_a_stopped_nodes_dialog() {
    let redis = Redis::start().unwrap();
    let lb = Balancer::start(100, 3, "warn").unwrap();
    let registry = tempfile::tempdir().unwrap();
    let a = Gateway::start(&cluster_node("node-a", &redis, &lb, registry.path())).unwrap();
    let b = Gateway::start(&cluster_node("node-b", &redis, &lb, registry.path())).unwrap();
    lb.wait_eligible("node-a", true);
    lb.wait_eligible("node-b", true);
    // A device on node A calls the echo buddy; the confirmed dialog is in the store, A's.
    let secret = a.add_device("caller").unwrap();
    let (_buddy, port) = Sim::buddy(&["--echo"], T).unwrap();
    let mut caller = sim_as(
        "call",
        login_args(&a, "caller", &secret),
        &[
            "--target",
            &format!("sip:echo@127.0.0.1:{port}"),
            "--media",
            "--hold-ms",
            "60000",
        ],
    );
    caller.wait_event("welcome", T).unwrap();
    let deadline = Instant::now() + T;
    let stored = loop {
        let (status, body) =
            thalamus_tests::cluster::http_request(b.admin, "GET", "/nodes/node-a/dialogs").unwrap();
        assert_eq!(status, 200, "{body}");
        let records: Value = serde_json::from_str(&body).unwrap();
        if let Some(record) = records.as_array().and_then(|r| r.first()).cloned() {
            break record;
        }
        assert!(Instant::now() < deadline, "the call was never replicated");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(stored["owner"], "node-a", "{stored}");
    assert_eq!(stored["held_here"], false, "{stored}");
    // The listing carries the dialogs' SDP (their keys): not without the token.
    let (status, _) =
        thalamus_tests::cluster::http_request_with(b.admin, "GET", "/nodes/node-a/dialogs", "")
            .unwrap();
    assert_eq!(status, 401);
    assert_eq!(
        b.metric("thalamus_admin_refused_total{reason=\"dialogs_token\"}")
            .unwrap(),
        1.0
    );
    let a_pid = nix::unistd::Pid::from_raw(i32::try_from(a.proc.child.id()).unwrap());

    runtime().block_on(async {
        let browser = Browser::start().await;
        browser
            .client
            .goto(&format!("http://{}/console", b.admin))
            .await
            .unwrap();
        browser.fill("token", ADMIN_TOKEN).await;
        browser.click("#connect").await;
        // Node B's console shows both nodes with the load their heartbeats report: node A
        // has the device and its call.
        let node_of = |s: &Value, id: &str| -> Option<Value> {
            s["nodes"]["nodes"]
                .as_array()?
                .iter()
                .find(|n| n["id"] == id)
                .cloned()
        };
        let state = browser
            .wait_for("window.console_state", "both nodes with A's load", |s| {
                node_of(s, "node-a").is_some_and(|n| {
                    n["state"] == "up" && n["load"]["devices"] == 1 && n["load"]["calls"] == 1
                }) && node_of(s, "node-b").is_some_and(|n| n["state"] == "up")
            })
            .await;
        assert_eq!(state["node"], "node-b", "{state}");
        assert_eq!(state["nodes"]["from"], lb.admin.to_string(), "{state}");
        let row = browser.text("#cluster tr[data-node=\"node-a\"]").await;
        assert!(row.contains("up"), "{row}");
        browser.screenshot("console-cluster.png").await;

        // Node A freezes: the balancer takes it out, and the console shows it down.
        nix::sys::signal::kill(a_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        lb.wait_eligible("node-a", false);
        browser
            .wait_for("window.console_state", "node A down", |s| {
                node_of(s, "node-a").is_some_and(|n| n["state"] == "down")
            })
            .await;
        // Its dialogs, read from the store, each with a claim action; claimed here.
        browser
            .click("#cluster tr[data-node=\"node-a\"] button")
            .await;
        let listed = browser
            .wait_for("window.console_dialogs", "node A's dialog", |d| {
                d.as_array().is_some_and(|d| d.len() == 1)
            })
            .await;
        assert_eq!(listed[0]["call_id"], stored["call_id"], "{listed}");
        browser.click("#dialogs tr button").await;
        browser
            .wait_for(
                "document.getElementById('dialogs-note').textContent",
                "the claim",
                |v| v.as_str().is_some_and(|t| t.starts_with("claimed")),
            )
            .await;
        browser.screenshot("console-claim.png").await;
        browser.client.close().await.unwrap();
    });
    let path = format!(
        "/dialogs/{}/{}/{}",
        segment(stored["call_id"].as_str().unwrap()),
        segment(stored["local_tag"].as_str().unwrap()),
        segment(stored["remote_tag"].as_str().unwrap())
    );
    let now: Value = serde_json::from_str(&b.admin_get(&path).unwrap()).unwrap();
    assert_eq!(now["owner"], "node-b", "{now}");
    assert_eq!(now["held_here"], true, "{now}");
    assert_eq!(now["epoch"], 1, "{now}");
    nix::sys::signal::kill(a_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
}
