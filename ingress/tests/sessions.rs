//! Ingress in-process, with fakes for what it hands devices to: a real QUIC endpoint on
//! loopback, the real session driver and core, a real device registry, and simulated devices
//! (the simulator's MBFP client) logging in. The fake `DeviceRequests` records what ingress
//! tells the bridge; the fake `DevicePlacement` decides redirects. Covers login (accepted,
//! refused), resume (with the calls the bridge lists), replacement of a session by a second
//! login (and the stale token of the replaced one), and redirect to the owner node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thalamus_ingress::{
    DeviceLink, DevicePlacement, DeviceRegistry, DeviceRequests, Ingress, IngressConfig,
    IngressDeps, IngressMetrics, ResumeTokens, RunningIngress, Sessions, ThrottleConfig,
};
use thalamus_proto::close_code;
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{
    Dial, Envelope, ErrorCode, GoodbyeReason, Hello, LiveCall, Redirect, TextStatus,
};
use thalamus_sim::device::{DeviceConnection, DeviceError};

const SECRET: &str = "correct horse battery staple";
const WAIT: Duration = Duration::from_secs(10);

/// Records what ingress tells the bridge.
#[derive(Default)]
struct FakeRequests {
    events: Mutex<Vec<String>>,
    /// What `live_calls` answers, by device.
    live: Mutex<HashMap<String, Vec<LiveCall>>>,
}

impl FakeRequests {
    fn log(&self, event: String) {
        self.events.lock().unwrap().push(event);
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }

    async fn wait_for(&self, event: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.events().iter().any(|e| e == event) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never saw {event:?}: {:?}",
                self.events()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl DeviceRequests for FakeRequests {
    fn handle(&self, device_id: &str, request: Envelope) -> Vec<Envelope> {
        self.log(format!(
            "handle {device_id} {}",
            thalamus_proto::body_kind(request.body.as_ref())
        ));
        // Answers every request at once, so the test sees the round trip.
        vec![Envelope {
            request_id: request.request_id,
            body: Some(Body::TextStatus(TextStatus {
                sip_status: 200,
                reason: "fake".into(),
                delivered: true,
            })),
        }]
    }

    fn online(&self, device_id: &str, _link: DeviceLink) {
        self.log(format!("online {device_id}"));
    }

    fn offline(&self, device_id: &str) {
        self.log(format!("offline {device_id}"));
    }

    fn live_calls(&self, device_id: &str) -> Vec<LiveCall> {
        self.live
            .lock()
            .unwrap()
            .get(device_id)
            .cloned()
            .unwrap_or_default()
    }

    fn resume<'a>(
        &'a self,
        device_id: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        self.log(format!("resume {device_id}"));
        Box::pin(std::future::ready(()))
    }
}

/// Redirects the devices it was told to.
#[derive(Default)]
struct FakePlacement {
    elsewhere: Mutex<HashMap<String, Redirect>>,
}

impl DevicePlacement for FakePlacement {
    fn redirect_for(&self, device_id: &str) -> Option<Redirect> {
        self.elsewhere.lock().unwrap().get(device_id).cloned()
    }
}

struct Harness {
    ingress: Option<RunningIngress>,
    registry: Arc<DeviceRegistry>,
    requests: Arc<FakeRequests>,
    placement: Arc<FakePlacement>,
    sessions: Arc<Sessions>,
    endpoint: quinn::Endpoint,
    fingerprint: String,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut IngressConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(DeviceRegistry::open(dir.path().join("devices.toml")));
        for device in ["dev-1", "dev-2"] {
            registry.add_with_secret(device, SECRET).unwrap();
        }
        let config = IngressConfig {
            node_id: "gw-test".into(),
            sip_domain: "example.org".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            socket_buffer_bytes: 0,
            cert: None,
            key: None,
            data_dir: dir.path().to_path_buf(),
            max_connections: 64,
            max_connections_per_ip: 64,
            hello_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_datagram_bytes: 1200,
            max_frame_bytes: 64 * 1024,
            send_queue_frames: 64,
            max_calls: 4,
            max_text_bytes: 1024,
            throttle: ThrottleConfig {
                free_failures: 100,
                window: Duration::from_secs(60),
                base_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(10),
                max_failures: 1_000,
                max_tracked: 1024,
            },
            device_throttle: ThrottleConfig {
                free_failures: 100,
                window: Duration::from_secs(60),
                base_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(10),
                max_failures: 1_000,
                max_tracked: 1024,
            },
            max_pending_logins_per_ip: 4,
            webtransport: false,
            webtransport_origins: Vec::new(),
        };
        let mut config = config;
        adjust(&mut config);
        let bound = Ingress::bind(config).unwrap();
        let fingerprint = bound.fingerprint.clone();
        let requests = Arc::new(FakeRequests::default());
        let placement = Arc::new(FakePlacement::default());
        let sessions = Arc::new(Sessions::default());
        let ingress = bound.serve(IngressDeps {
            registry: registry.clone(),
            tokens: ResumeTokens::new([3; 32], 300),
            sessions: sessions.clone(),
            requests: requests.clone(),
            placement: placement.clone(),
            metrics: IngressMetrics::default(),
        });
        let fp = thalamus_sim::quic::parse_fingerprint(&fingerprint).unwrap();
        let client = thalamus_sim::quic::client_config(Some(fp)).unwrap();
        let endpoint = thalamus_sim::quic::client_endpoint(ingress.local_addr, client).unwrap();
        Self {
            ingress: Some(ingress),
            registry,
            requests,
            placement,
            sessions,
            endpoint,
            fingerprint,
            _dir: dir,
        }
    }

    async fn hello(
        &self,
        device: &str,
        secret: &str,
        token: Vec<u8>,
    ) -> (
        DeviceConnection,
        Result<thalamus_proto::v1::Welcome, DeviceError>,
    ) {
        self.hello_from(&self.endpoint, device, secret, token).await
    }

    /// A client endpoint bound to `ip` (another source address on loopback).
    fn endpoint_on(&self, ip: &str) -> quinn::Endpoint {
        let fp = thalamus_sim::quic::parse_fingerprint(&self.fingerprint).unwrap();
        let mut endpoint = quinn::Endpoint::client(format!("{ip}:0").parse().unwrap()).unwrap();
        endpoint.set_default_client_config(thalamus_sim::quic::client_config(Some(fp)).unwrap());
        endpoint
    }

    async fn hello_from(
        &self,
        endpoint: &quinn::Endpoint,
        device: &str,
        secret: &str,
        token: Vec<u8>,
    ) -> (
        DeviceConnection,
        Result<thalamus_proto::v1::Welcome, DeviceError>,
    ) {
        let addr = self.ingress.as_ref().unwrap().local_addr;
        let mut conn = DeviceConnection::connect(endpoint, addr, "thalamus")
            .await
            .unwrap();
        let answer = tokio::time::timeout(
            WAIT,
            conn.hello(Hello {
                device_id: device.into(),
                credential: secret.into(),
                resume_token: token,
                ..Default::default()
            }),
        )
        .await
        .expect("an answer to Hello");
        (conn, answer)
    }

    async fn stop(mut self) {
        if let Some(ingress) = self.ingress.take() {
            ingress.shutdown().await;
        }
    }
}

/// The frame a refused `Hello` got, and the close code that followed.
async fn refusal(
    conn: &mut DeviceConnection,
    answer: Result<thalamus_proto::v1::Welcome, DeviceError>,
) -> (Envelope, u64) {
    let env = match answer {
        Err(DeviceError::Refused(env)) => *env,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let closed = tokio::time::timeout(WAIT, conn.conn.closed())
        .await
        .unwrap();
    let code = match closed {
        quinn::ConnectionError::ApplicationClosed(c) => c.error_code.into_inner(),
        other => panic!("closed without an application code: {other:?}"),
    };
    (env, code)
}

#[tokio::test]
async fn login_is_welcomed_and_requests_reach_the_bridge() {
    let h = Harness::start().await;
    assert_eq!(h.fingerprint.len(), 64);
    let (mut conn, answer) = h.hello("dev-1", SECRET, Vec::new()).await;
    let welcome = answer.unwrap();
    assert!(!welcome.resumed);
    assert_eq!(welcome.address_of_record, "sip:dev-1@example.org");
    assert_eq!(welcome.node_id, "gw-test");
    assert!(!welcome.resume_token.is_empty());
    h.requests.wait_for("online dev-1").await;
    assert!(h.sessions.get("dev-1").is_some());

    // A request goes to the bridge; what it answers comes back on the same request id.
    let id = conn
        .writer
        .send(Body::Dial(Dial {
            call_ref: 1,
            target: "sip:bob@example.org".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let reply = tokio::time::timeout(WAIT, conn.reader.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.request_id, id);
    assert!(matches!(reply.body, Some(Body::TextStatus(_))));
    assert!(h
        .requests
        .events()
        .contains(&"handle dev-1 dial".to_string()));

    // A wrong secret: Error(Unauthenticated), then the close code that says so.
    let (mut bad, answer) = h.hello("dev-2", "wrong", Vec::new()).await;
    let (env, code) = refusal(&mut bad, answer).await;
    match env.body {
        Some(Body::Error(e)) => assert_eq!(e.code, ErrorCode::Unauthenticated as i32),
        other => panic!("expected Error, got {other:?}"),
    }
    assert_eq!(code, u64::from(close_code::UNAUTHENTICATED));
    assert!(!h.requests.events().contains(&"online dev-2".to_string()));

    // The device goes away: the bridge hears it once the session ends.
    conn.conn.close(0u32.into(), b"bye");
    h.requests.wait_for("offline dev-1").await;
    h.stop().await;
}

#[tokio::test]
async fn a_resumed_session_keeps_its_id_and_lists_the_bridges_calls() {
    let h = Harness::start().await;
    let (conn, answer) = h.hello("dev-1", SECRET, Vec::new()).await;
    let first = answer.unwrap();
    conn.conn.close(0u32.into(), b"lost");
    h.requests.wait_for("offline dev-1").await;

    let call = LiveCall {
        call_ref: 7,
        remote_uri: "sip:bob@example.org".into(),
        state: 3,
    };
    h.requests
        .live
        .lock()
        .unwrap()
        .insert("dev-1".into(), vec![call.clone()]);
    let (_conn, answer) = h.hello("dev-1", SECRET, first.resume_token.clone()).await;
    let second = answer.unwrap();
    assert!(second.resumed);
    assert_eq!(second.session_id, first.session_id);
    assert_eq!(second.live_calls, vec![call]);
    // The bridge was asked to find the device's calls before the Welcome.
    let events = h.requests.events();
    let resume = events.iter().position(|e| e == "resume dev-1").unwrap();
    let online = events.iter().rposition(|e| e == "online dev-1").unwrap();
    assert!(resume < online, "{events:?}");
    h.stop().await;
}

#[tokio::test]
async fn a_second_login_replaces_the_first_and_the_old_token_is_stale() {
    let h = Harness::start().await;
    let (mut first_conn, answer) = h.hello("dev-1", SECRET, Vec::new()).await;
    let first = answer.unwrap();
    let (_second_conn, answer) = h.hello("dev-1", SECRET, Vec::new()).await;
    let second = answer.unwrap();
    assert_ne!(second.session_id, first.session_id);

    // The first session is told, then closed with REPLACED.
    let goodbye = loop {
        let env = tokio::time::timeout(WAIT, first_conn.reader.next())
            .await
            .unwrap()
            .unwrap();
        if let Some(Body::Goodbye(g)) = env.body {
            break g;
        }
    };
    assert_eq!(goodbye.reason, GoodbyeReason::Replaced as i32);
    match tokio::time::timeout(WAIT, first_conn.conn.closed())
        .await
        .unwrap()
    {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code.into_inner(), u64::from(close_code::REPLACED));
        }
        other => panic!("{other:?}"),
    }
    // The replaced session's end does not take the device offline.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!h.requests.events().contains(&"offline dev-1".to_string()));
    assert_eq!(
        h.sessions.get("dev-1").map(|s| s.session_id.to_string()),
        Some(second.session_id.clone())
    );

    // The first session's token names a session since replaced: a new session, not a resume.
    let (_third_conn, answer) = h.hello("dev-1", SECRET, first.resume_token.clone()).await;
    let third = answer.unwrap();
    assert!(!third.resumed);
    assert_ne!(third.session_id, first.session_id);
    assert_ne!(third.session_id, second.session_id);
    h.stop().await;
}

#[tokio::test]
async fn a_device_owned_elsewhere_is_redirected_after_its_credential_checks_out() {
    let h = Harness::start().await;
    let redirect = Redirect {
        address: "10.1.2.3:4433".into(),
        node_id: "gw-other".into(),
    };
    h.placement
        .elsewhere
        .lock()
        .unwrap()
        .insert("dev-2".into(), redirect.clone());

    let (mut conn, answer) = h.hello("dev-2", SECRET, Vec::new()).await;
    let (env, code) = refusal(&mut conn, answer).await;
    assert_eq!(env.body, Some(Body::Redirect(redirect)));
    assert_eq!(code, u64::from(close_code::REDIRECTED));
    assert!(h.sessions.get("dev-2").is_none());
    assert!(!h.requests.events().contains(&"online dev-2".to_string()));

    // A stranger learns nothing: a wrong secret is refused, not redirected.
    let (mut conn, answer) = h.hello("dev-2", "wrong", Vec::new()).await;
    let (env, code) = refusal(&mut conn, answer).await;
    assert!(matches!(env.body, Some(Body::Error(_))));
    assert_eq!(code, u64::from(close_code::UNAUTHENTICATED));

    // Devices placed here are served.
    let (_conn, answer) = h.hello("dev-1", SECRET, Vec::new()).await;
    assert!(answer.is_ok());
    h.stop().await;
}

/// Attack: parallel wrong-secret logins from one address, while a real device reconnects from
/// another. The attacker's checks run at most `max_pending_logins_per_ip` at a time (the rest
/// wait their turn, so the verifier pool keeps room for everybody else), the attacked device id
/// locks after its allowance of wrong secrets, unknown ids cost an argon2 check like known
/// ones, and the real device (its secret verified once) gets in every time without queueing
/// behind the attack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_wrong_secrets_from_one_address_do_not_keep_real_devices_out() {
    let h = Arc::new(
        Harness::start_with(|c| {
            c.max_connections = 1_000;
            c.max_connections_per_ip = 1_000;
            c.max_pending_logins_per_ip = 2;
            c.device_throttle.max_failures = 10;
        })
        .await,
    );
    let real = h.endpoint_on("127.0.0.2");
    // The real device logs in once (its secret is verified and remembered).
    let (first, answer) = h.hello_from(&real, "dev-1", SECRET, Vec::new()).await;
    answer.unwrap();
    first.conn.close(0u32.into(), b"bye");
    let before = h.registry.slow_checks();

    // 120 wrong-secret logins at once from 127.0.0.1: for dev-2 and for ids that do not exist.
    let attack: Vec<_> = (0..120)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move {
                let device = if i % 2 == 0 {
                    "dev-2".to_string()
                } else {
                    format!("ghost-{i}")
                };
                let (_conn, answer) = h.hello(&device, "wrong", Vec::new()).await;
                match answer {
                    Err(DeviceError::Refused(env)) => match env.body {
                        Some(Body::Error(e)) => e.code,
                        other => panic!("{other:?}"),
                    },
                    other => panic!("a wrong secret got in: {other:?}"),
                }
            })
        })
        .collect();
    // Meanwhile the real device reconnects ten times.
    for _ in 0..10 {
        let (conn, answer) = h.hello_from(&real, "dev-1", SECRET, Vec::new()).await;
        assert!(answer.is_ok(), "{answer:?}");
        conn.conn.close(0u32.into(), b"bye");
    }
    let mut busy = 0;
    let mut refused = 0;
    for task in attack {
        match task.await.unwrap() {
            c if c == ErrorCode::Busy as i32 => busy += 1,
            c if c == ErrorCode::Unauthenticated as i32 => refused += 1,
            other => panic!("unexpected error code {other}"),
        }
    }
    let checks = h.registry.slow_checks() - before;
    println!(
        "login attack: 120 parallel wrong secrets from one address: {refused} checked and \
         refused, {busy} turned away unchecked (per-address cap or device lock), {checks} \
         argon2 checks; the real device reconnected 10 of 10 times"
    );
    assert_eq!(busy + refused, 120);
    assert!(busy > 0, "the per-address cap turned nobody away");
    assert_eq!(
        checks, refused,
        "only the checked attempts ran argon2 (no check for the real device)"
    );
    // Wrong secrets for dev-2 lock it after its allowance (10 per window, some already spent
    // by the attack): then even its right secret waits out the window. (A device whose secret
    // was never verified on this node can be locked by a stranger for one window; dev-1, whose
    // secret was, cannot.)
    let mut locked_after = None;
    for attempt in 1..=12 {
        let (_conn, answer) = h.hello("dev-2", "wrong", Vec::new()).await;
        if let Err(DeviceError::Refused(env)) = answer {
            if matches!(env.body, Some(Body::Error(ref e)) if e.code == ErrorCode::Busy as i32) {
                locked_after = Some(attempt);
                break;
            }
        }
    }
    assert!(locked_after.is_some(), "dev-2 never locked");
    let (_conn, answer) = h.hello("dev-2", SECRET, Vec::new()).await;
    assert!(matches!(answer, Err(DeviceError::Refused(_))), "{answer:?}");
    for _ in 0..12 {
        let (_conn, answer) = h.hello("dev-1", "wrong", Vec::new()).await;
        assert!(answer.is_err());
    }
    let (_conn, answer) = h.hello_from(&real, "dev-1", SECRET, Vec::new()).await;
    assert!(answer.is_ok());
}
