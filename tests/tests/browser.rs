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
//! What it does not cover yet: the operator console.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};
use serde_json::{json, Value};
use thalamus_tests::cluster::free_tcp_port;
use thalamus_tests::{login_args, sim_as, Gateway, Proc, Sim};

const T: Duration = Duration::from_secs(20);

/// chromedriver on a free port, and a WebDriver session of a headless Chromium with a fake
/// microphone (its own profile directory, no background network).
struct Browser {
    _driver: Proc,
    _profile: tempfile::TempDir,
    client: Client,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_tcp_port().unwrap();
        let driver = Proc {
            child: Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver (scripts/install-peers installs chromium-driver)"),
        };
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

    /// The page's `window.thalamus` (its state and counters).
    async fn page_state(&self) -> Value {
        self.client
            .execute("return window.thalamus;", Vec::new())
            .await
            .unwrap()
    }

    /// Waits until `pred` holds of the page's state.
    async fn wait(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + T;
        loop {
            let state = self.page_state().await;
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A node taking WebTransport with its device page, and the page's port.
fn node_with_page() -> (Gateway, u16) {
    let web = free_tcp_port().unwrap();
    let gw = Gateway::start(&format!(
        "[quic]\nwebtransport = true\n\n[web]\nlisten = \"127.0.0.1:{web}\""
    ))
    .unwrap();
    assert_eq!(gw.web.map(|a| a.port()), Some(web));
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
        assert!(received * 100 >= sent * 95, "{ended}");
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
                "3000",
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
