//! Interop through a real registrar and proxy: Kamailio (Debian package `kamailio`, started with
//! the configuration kept in `tests/peers/kamailio/kamailio.cfg`: registrar, usrloc in memory,
//! digest authentication of the test users) and a real baresip user agent (Debian package
//! `baresip-core`, configuration templates in `tests/peers/baresip/`), each on its own loopback
//! ports picked by the test.
//!
//! The gateway registers a device upstream with digest credentials; baresip, registered to the
//! same Kamailio, calls the device's address-of-record through Kamailio, the device answers and
//! baresip hangs up; once the device has logged out its binding is removed (Kamailio then
//! answers 404); then the device calls the baresip user through Kamailio as its outbound proxy
//! (answering Kamailio's 407 with the device's credentials) and baresip answers by itself.
//! With a wrong device password Kamailio neither saves a binding nor relays the device's INVITE.
//!
//! Then baresip transfers its call with the device (its `transfer` command, a REFER) to its own
//! user: the gateway places the device's new call through Kamailio and reports it in NOTIFYs.
//!
//! Video both ways: baresip with its `vp8` and `fakevideo` modules calls the device, then the
//! device calls baresip; the device counts the whole VP8 frames it puts together (and sees a key
//! frame come after the key frame request it sends, an RTCP PLI on baresip's side), baresip's
//! `rtcpsummary` the video packets it received.
//!
//! Not covered here: audio content (baresip plays a sine and discards what it receives), TCP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::Value;
use thalamus_tests::{free_udp_port, Gateway, Proc, Sim};

/// The SIP domain Kamailio serves (an alias in kamailio.cfg).
const DOMAIN: &str = "kamailio.test";
/// The device, a test user of kamailio.cfg.
const DEVICE: &str = "dev1";
/// Its password in kamailio.cfg.
const DEVICE_PASSWORD: &str = "dev1-password";
/// The baresip user, a test user of kamailio.cfg (password in tests/peers/baresip/accounts).
const BARESIP_USER: &str = "baresipuser";
/// Upper bound of every wait; each wait returns as soon as its condition holds.
const T: Duration = Duration::from_secs(15);

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// The path of a peer program, from PATH or the usual Debian locations; a clear failure when it
/// is not installed.
fn peer_binary(name: &str, package: &str) -> PathBuf {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: run scripts/install-peers (Debian package {package})")
        })
}

/// Lines a child prints on stdout and stderr, collected by reader threads.
#[derive(Clone, Default)]
struct Output {
    lines: Arc<Mutex<Vec<String>>>,
}

impl Output {
    fn capture(child: &mut Child) -> Self {
        let out = Output::default();
        if let Some(stdout) = child.stdout.take() {
            out.follow(stdout);
        }
        if let Some(stderr) = child.stderr.take() {
            out.follow(stderr);
        }
        out
    }

    fn follow(&self, pipe: impl Read + Send + 'static) {
        let lines = self.lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn contains(&self, pred: &impl Fn(&str) -> bool) -> Option<String> {
        self.lines.lock().unwrap().iter().find(|l| pred(l)).cloned()
    }

    /// Waits until a line matches `pred`; `what` names it in the error.
    fn wait_line(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.contains(&pred) {
                return Ok(line);
            }
            if Instant::now() > deadline {
                bail!("no line {what} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits until `pred` holds on the text `read` returns.
fn wait_text(
    what: &str,
    timeout: Duration,
    read: impl Fn() -> String,
    pred: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if pred(&read()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not seen within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the gateway logs that it registered the device upstream.
fn wait_registered_upstream(gateway: &Gateway) -> anyhow::Result<()> {
    wait_text(
        "\"registered upstream\" in the gateway's log",
        T,
        || gateway.log(),
        |log| log.contains("registered upstream"),
    )
}

/// A port free for both UDP and TCP on loopback (baresip listens on both).
fn free_udp_tcp_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let port = free_udp_port()?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for UDP and TCP")
}

/// Kamailio in the foreground, in its own process group (it forks worker processes), stopped
/// with its whole group on drop.
struct Kamailio {
    child: Child,
    port: u16,
    output: Output,
    _dir: tempfile::TempDir,
}

impl Kamailio {
    fn start() -> anyhow::Result<Self> {
        Self::start_with(None)
    }

    /// [`Kamailio::start`], with a TLS socket on `tls.0` whose settings are the tls.cfg at
    /// `tls.1` (the tls module: Debian package kamailio-tls-modules).
    fn start_with(tls: Option<(u16, &Path)>) -> anyhow::Result<Self> {
        let bin = peer_binary("kamailio", "kamailio");
        let cfg = peers_dir().join("kamailio/kamailio.cfg");
        let mut last_error = None;
        // A port picked free may be taken again before Kamailio binds it: try a few.
        for _ in 0..3 {
            let dir = tempfile::tempdir()?;
            let port = free_udp_port()?;
            let mut command = Command::new(&bin);
            if let Some((tls_port, tls_cfg)) = tls {
                command
                    .args(["-A", "WITH_TLS", "-l", &format!("tls:127.0.0.1:{tls_port}")])
                    .env("THALAMUS_KAMAILIO_TLS_CONFIG", tls_cfg);
            }
            let mut child = command
                .arg("-DD")
                .arg("-E")
                .arg("-f")
                .arg(&cfg)
                .args(["-l", &format!("udp:127.0.0.1:{port}")])
                .arg("-P")
                .arg(dir.path().join("kamailio.pid"))
                .arg("-w")
                .arg(dir.path())
                .arg("-Y")
                .arg(dir.path())
                .args(["-m", "32", "-M", "4"])
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("spawning {}", bin.display()))?;
            let output = Output::capture(&mut child);
            let mut kamailio = Kamailio {
                child,
                port,
                output,
                _dir: dir,
            };
            match kamailio.wait_ready() {
                Ok(()) => return Ok(kamailio),
                Err(e) => last_error = Some(e.context(kamailio.output.text())),
            }
        }
        Err(last_error.unwrap())
    }

    /// Polls with OPTIONS until Kamailio answers 200.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let local = sock.local_addr()?;
        let deadline = Instant::now() + T;
        let mut n = 0;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("kamailio exited with {status} before it answered OPTIONS");
            }
            if Instant::now() > deadline {
                bail!("kamailio did not answer OPTIONS within {T:?}");
            }
            n += 1;
            let probe = format!(
                "OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n\
                 Via: SIP/2.0/UDP {local};branch=z9hG4bKprobe{n};rport\r\n\
                 Max-Forwards: 70\r\n\
                 From: <sip:probe@127.0.0.1>;tag=probe{n}\r\n\
                 To: <sip:127.0.0.1:{port}>\r\n\
                 Call-ID: probe-{n}@127.0.0.1\r\n\
                 CSeq: {n} OPTIONS\r\n\
                 Content-Length: 0\r\n\r\n",
                port = self.port
            );
            sock.send_to(probe.as_bytes(), ("127.0.0.1", self.port))?;
            let mut buf = [0u8; 2048];
            if let Ok(len) = sock.recv(&mut buf) {
                if buf[..len].starts_with(b"SIP/2.0 200") {
                    return Ok(());
                }
            }
        }
    }

    fn signal_group(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg("--")
            .arg(format!("-{}", self.child.id()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        // SIGTERM lets the main process stop its workers; SIGKILL the group if it lingers.
        self.signal_group("TERM");
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal_group("KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// baresip with a configuration folder of its own, driven through ctrl_tcp (netstring JSON
/// commands; the same socket carries its events).
struct Baresip {
    _proc: Proc,
    output: Output,
    ctrl: TcpStream,
    events: mpsc::Receiver<Value>,
    pending: VecDeque<Value>,
    /// Every event and response taken by `wait_event` so far.
    seen: Vec<Value>,
    next_token: u32,
    /// Its SIP port (UDP and TCP; TLS, when it has a certificate, on the next one).
    sip_port: u16,
    _dir: tempfile::TempDir,
}

fn render(template: &str, vars: &[(&str, u16)]) -> anyhow::Result<String> {
    let mut text = std::fs::read_to_string(peers_dir().join(template))
        .with_context(|| format!("reading tests/peers/{template}"))?;
    for (name, value) in vars {
        text = text.replace(&format!("@{name}@"), &value.to_string());
    }
    // A placeholder is an upper-case word between two '@'.
    let parts: Vec<&str> = text.split('@').collect();
    let left = parts
        .get(1..parts.len().saturating_sub(1))
        .and_then(|inner| {
            inner
                .iter()
                .find(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        });
    ensure!(
        left.is_none(),
        "tests/peers/{template}: placeholder @{}@ is not filled in",
        left.unwrap_or(&"")
    );
    Ok(text)
}

/// Reads netstrings (`<len>:<json>,`) from baresip's control socket.
fn read_netstrings(mut stream: TcpStream, tx: mpsc::Sender<Value>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(colon) = buf.iter().position(|b| *b == b':') {
            let Some(len) = std::str::from_utf8(&buf[..colon])
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
            else {
                eprintln!("baresip ctrl_tcp: bad netstring header: {buf:?}");
                return;
            };
            if buf.len() < colon + 1 + len + 1 {
                break;
            }
            let payload = buf[colon + 1..colon + 1 + len].to_vec();
            buf.drain(..colon + 1 + len + 1);
            match serde_json::from_slice::<Value>(&payload) {
                Ok(v) => {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                Err(e) => eprintln!(
                    "baresip ctrl_tcp: not JSON ({e}): {}",
                    String::from_utf8_lossy(&payload)
                ),
            }
        }
    }
}

impl Baresip {
    /// Starts baresip registered through Kamailio, with `contacts` as its address book (one
    /// contact per line; `;presence=p2p` makes baresip watch it).
    fn start(kamailio_port: u16, contacts: &str) -> anyhow::Result<Self> {
        Self::start_with(kamailio_port, contacts, &Extras::default())
    }

    /// [`Baresip::start`] with `extras`' lines added to its configuration and parameters to
    /// its account.
    fn start_with(kamailio_port: u16, contacts: &str, extras: &Extras) -> anyhow::Result<Self> {
        let bin = peer_binary("baresip", "baresip-core");
        ensure!(
            Path::new("/usr/lib/baresip/modules/ctrl_tcp.so").is_file(),
            "baresip's modules are missing: run scripts/install-peers (Debian package baresip-core)"
        );
        let mut last_error = None;
        for _ in 0..3 {
            match Self::try_start(&bin, kamailio_port, contacts, extras) {
                Ok(b) => return Ok(b),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap())
    }

    fn try_start(
        bin: &Path,
        kamailio_port: u16,
        contacts: &str,
        extras: &Extras,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let sip_port = free_udp_tcp_port()?;
        let ctrl_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        std::fs::write(
            dir.path().join("config"),
            render(
                "baresip/config",
                &[("SIP_PORT", sip_port), ("CTRL_PORT", ctrl_port)],
            )? + &extras.baresip_config,
        )?;
        let account = match &extras.baresip_account_line {
            Some(line) => line.clone(),
            None => render("baresip/accounts", &[("KAMAILIO_PORT", kamailio_port)])?,
        };
        std::fs::write(
            dir.path().join("accounts"),
            format!("{}{}\n", account.trim_end(), extras.baresip_account),
        )?;
        // Always written: without it baresip's contact module writes an example address book.
        std::fs::write(dir.path().join("contacts"), contacts)?;
        let mut child = Command::new(bin)
            .arg("-f")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let output = Output::capture(&mut child);
        let mut proc = Proc { child };
        let started = output.wait_line("\"baresip is ready.\"", T, |l| {
            l.contains("baresip is ready.") || l.contains("init failed")
        });
        let failed =
            |what: &str| anyhow::anyhow!("baresip did not start ({what}):\n{}", output.text());
        match started {
            Ok(line) if line.contains("baresip is ready.") => {}
            _ => return Err(failed("not ready")),
        }
        if output
            .contains(&|l: &str| l.contains("Address already in use"))
            .is_some()
        {
            proc.kill();
            return Err(failed("a port was taken"));
        }
        let ctrl = TcpStream::connect(("127.0.0.1", ctrl_port)).context("baresip ctrl_tcp")?;
        let (tx, events) = mpsc::channel();
        let reader = ctrl.try_clone()?;
        std::thread::spawn(move || read_netstrings(reader, tx));
        if extras.baresip_account_line.is_none() {
            let aor = format!("{BARESIP_USER}@{DOMAIN}");
            output
                .wait_line("of a successful registration", T, |l| {
                    l.contains(&aor) && l.contains("200 OK")
                })
                .map_err(|e| failed(&e.to_string()))?;
        }
        Ok(Baresip {
            _proc: proc,
            output,
            ctrl,
            events,
            pending: VecDeque::new(),
            seen: Vec::new(),
            next_token: 1,
            sip_port,
            _dir: dir,
        })
    }

    fn next_message(&mut self, deadline: Instant) -> anyhow::Result<Value> {
        if let Some(v) = self.pending.pop_front() {
            return Ok(v);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.events.recv_timeout(left) {
            Ok(v) => Ok(v),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("timed out"),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("baresip's control socket closed"),
        }
    }

    /// Runs a command (e.g. `dial`, `hangup`); returns its response.
    fn command(&mut self, command: &str, params: &str) -> anyhow::Result<Value> {
        let token = format!("t{}", self.next_token);
        self.next_token += 1;
        let body =
            serde_json::json!({"command": command, "params": params, "token": token}).to_string();
        self.ctrl
            .write_all(format!("{}:{body},", body.len()).as_bytes())?;
        let deadline = Instant::now() + T;
        let mut held = Vec::new();
        let result = loop {
            match self.next_message(deadline) {
                Ok(v) if v["response"] == true && v["token"] == token.as_str() => break Ok(v),
                Ok(v) => held.push(v),
                Err(e) => break Err(e.context(format!("no response to {command} {params}"))),
            }
        };
        for v in held.into_iter().rev() {
            self.pending.push_front(v);
        }
        let response = result?;
        ensure!(
            response["ok"] == true,
            "baresip refused {command} {params}: {response}"
        );
        Ok(response)
    }

    /// Waits for the next event of `kind` (e.g. `CALL_ESTABLISHED`), skipping others.
    fn wait_event(&mut self, kind: &str) -> anyhow::Result<Value> {
        let deadline = Instant::now() + T;
        loop {
            match self.next_message(deadline) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if v["event"] == true && v["type"] == kind {
                        return Ok(v);
                    }
                }
                Err(e) => {
                    return Err(e.context(format!(
                        "waiting for baresip's {kind} event; seen so far: {:?}",
                        self.seen
                    )))
                }
            }
        }
    }
}

/// Everything the scenario runs, so a failure can show every log.
struct Peers {
    kamailio: Kamailio,
    baresip: Baresip,
    gateway: Gateway,
    secret: String,
}

/// What a scenario adds to the peers' configurations.
#[derive(Debug, Default)]
struct Extras {
    /// Lines added to baresip's configuration.
    baresip_config: String,
    /// Parameters added to baresip's account (`;name=value`).
    baresip_account: String,
    /// An account of baresip's own instead of the Kamailio user's (then it registers nowhere).
    baresip_account_line: Option<String>,
    /// Lines added to the gateway's configuration.
    gateway: String,
}

/// A gateway of the domain behind Kamailio (on `kport`): Kamailio is its outbound proxy and
/// its registrar, and the device registers there with `device_password`; `extra` is added to
/// its configuration.
fn start_gateway(kport: u16, device_password: &str, extra: &str) -> anyhow::Result<Gateway> {
    Gateway::start(&format!(
        "[sip]\n\
         domain = \"{DOMAIN}\"\n\
         outbound_proxy = \"sip:127.0.0.1:{kport};lr\"\n\
         registrar = {{ uri = \"sip:127.0.0.1:{kport}\", domain = \"{DOMAIN}\", expires_secs = 300 }}\n\
         \n\
         [devices.{DEVICE}.auth]\n\
         username = \"{DEVICE}\"\n\
         password = \"{device_password}\"\n\
         {extra}"
    ))
    .context("starting the gateway")
}

/// What baresip's configuration gains for video: VP8, the fakevideo module as camera and
/// screen (a synthetic picture, nothing shown), and a summary of each stream's RTP counts when
/// a call closes.
const BARESIP_VIDEO: &str = "\nmodule\t\t\tvp8.so\nmodule\t\t\tfakevideo.so\n\
     module_app\t\trtcpsummary.so\nvideo_source\t\tfakevideo,nil\n\
     video_display\t\tfakevideo,nil\nvideo_size\t\t320x240\nvideo_fps\t\t15\n";

impl Peers {
    /// Starts Kamailio, baresip and a gateway whose device has `device_password`.
    fn start(device_password: &str) -> anyhow::Result<Self> {
        Self::start_with(device_password, &Extras::default())
    }

    /// [`Peers::start`] with `extras` added to the configurations.
    fn start_with(device_password: &str, extras: &Extras) -> anyhow::Result<Self> {
        let kamailio = Kamailio::start().context("starting Kamailio")?;
        let baresip = Baresip::start_with(kamailio.port, "", extras).context("starting baresip")?;
        let kport = kamailio.port;
        let gateway = start_gateway(kport, device_password, &extras.gateway)?;
        let secret = gateway.add_device(DEVICE)?;
        Ok(Peers {
            kamailio,
            baresip,
            gateway,
            secret,
        })
    }

    fn device(&self, command: &str, extra: &[&str]) -> anyhow::Result<Sim> {
        let quic = self.gateway.quic.to_string();
        let mut args = vec![
            command,
            "--gateway",
            &quic,
            "--fingerprint",
            &self.gateway.fingerprint,
            "--device",
            DEVICE,
            "--secret",
            &self.secret,
        ];
        args.extend_from_slice(extra);
        Sim::spawn(&args)
    }

    fn logs(&self) -> String {
        format!(
            "--- Kamailio:\n{}\n--- baresip:\n{}\n--- gateway:\n{}",
            self.kamailio.output.text(),
            self.baresip.output.text(),
            self.gateway.log()
        )
    }

    /// Waits for a Kamailio log line holding every one of `parts`.
    fn kamailio_line(&self, parts: &[&str]) -> anyhow::Result<String> {
        self.kamailio
            .output
            .wait_line(&format!("with {parts:?} in Kamailio's log"), T, |l| {
                parts.iter().all(|p| l.contains(p))
            })
    }

    /// Baresip calls the device through Kamailio; the device answers; baresip hangs up.
    fn baresip_calls_the_device(&mut self) -> anyhow::Result<()> {
        let mut device = self.device("listen", &["--calls", "1"])?;
        let welcome = device.wait_event("welcome", T)?;
        ensure!(
            welcome["address_of_record"] == format!("sip:{DEVICE}@{DOMAIN}").as_str(),
            "{welcome}"
        );
        // The gateway registers the device upstream, answering Kamailio's digest challenge.
        let aor = format!("sip:{DEVICE}@{DOMAIN}");
        let gw_contact = format!("@127.0.0.1:{}", self.gateway.sip.port());
        self.kamailio_line(&[&format!("REGISTER for {aor}: challenge")])?;
        self.kamailio_line(&[&format!("REGISTER for {aor} saved"), &gw_contact])?;
        wait_registered_upstream(&self.gateway)?;

        self.baresip
            .command("dial", &format!("sip:{DEVICE}@{DOMAIN}"))?;
        let incoming = device.wait_event("incoming_call", T)?;
        ensure!(
            incoming["from_uri"]
                .as_str()
                .is_some_and(|f| f.contains(&format!("{BARESIP_USER}@{DOMAIN}"))),
            "{incoming}"
        );
        device.wait_for(
            |v| v["event"] == "call_event" && v["state"] == "answered",
            T,
        )?;
        let established = self.baresip.wait_event("CALL_ESTABLISHED")?;
        ensure!(
            established["direction"] == "outgoing"
                && established["peeruri"] == format!("sip:{DEVICE}@{DOMAIN}").as_str(),
            "{established}"
        );
        // Kamailio found the device's binding: the INVITE went to the gateway's Contact.
        self.kamailio_line(&["relaying INVITE to sip:dev1", &gw_contact])?;

        self.baresip.command("hangup", "")?;
        let ended = device.wait_for(
            |v| {
                v["event"] == "call_event"
                    && v["state"] == "ended"
                    && v["reason"] != "media statistics"
            },
            T,
        )?;
        ensure!(ended["end_reason"] == "remote_hangup", "{ended}");
        self.baresip.wait_event("CALL_CLOSED")?;
        // The BYE followed the recorded route through Kamailio.
        self.kamailio_line(&["request BYE sip:dev1", &gw_contact])?;

        let summary = device.wait_event("summary", T)?;
        ensure!(
            summary["answered"] == 1 && summary["ended"] == 1,
            "{summary}"
        );
        ensure!(
            device.proc.wait_exit(T)? == Some(0),
            "thalamus-sim listen failed: {:?}",
            device.seen
        );

        // The device logged out: the gateway removed its binding (Expires: 0, challenge
        // answered), so Kamailio no longer finds it.
        self.kamailio_line(&[&format!("REGISTER for {aor} saved"), "Expires 0"])?;
        self.baresip
            .command("dial", &format!("sip:{DEVICE}@{DOMAIN}"))?;
        let closed = self.baresip.wait_event("CALL_CLOSED")?;
        ensure!(
            closed["param"]
                .as_str()
                .is_some_and(|p| p.starts_with("404")),
            "a call to the logged-out device: {closed}"
        );
        Ok(())
    }

    /// The device calls the baresip user through Kamailio; baresip answers; the device hangs up.
    fn device_calls_baresip(&mut self) -> anyhow::Result<()> {
        let target = format!("sip:{BARESIP_USER}@{DOMAIN}");
        let mut device = self.device("call", &["--target", &target, "--hold-ms", "500"])?;
        device.wait_event("welcome", T)?;
        let answered = device.wait_for(
            |v| v["event"] == "call_event" && v["state"] == "answered",
            T,
        )?;
        ensure!(answered["sip_status"] == 200, "{answered}");
        // Auto-answered: baresip reports the incoming call as established at once.
        let established = self.baresip.wait_event("CALL_ESTABLISHED")?;
        ensure!(
            established["direction"] == "incoming"
                && established["peeruri"] == format!("sip:{DEVICE}@{DOMAIN}").as_str(),
            "{established}"
        );
        // Kamailio challenged the INVITE and the gateway answered with the device's credentials.
        self.kamailio_line(&[&format!("INVITE from sip:{DEVICE}@{DOMAIN}: challenge")])?;
        self.kamailio_line(&[&format!(
            "INVITE from sip:{DEVICE}@{DOMAIN}: authenticated as {DEVICE}"
        )])?;

        let ended = device.wait_for(
            |v| {
                v["event"] == "call_event"
                    && v["state"] == "ended"
                    && v["reason"] != "media statistics"
            },
            T,
        )?;
        ensure!(ended["end_reason"] == "local_hangup", "{ended}");
        let closed = self.baresip.wait_event("CALL_CLOSED")?;
        ensure!(
            closed["peeruri"] == format!("sip:{DEVICE}@{DOMAIN}").as_str(),
            "{closed}"
        );
        // The gateway's BYE followed the recorded route through Kamailio.
        self.kamailio_line(&[
            "request BYE sip:baresipuser",
            &format!("From sip:{DEVICE}@"),
        ])?;
        let summary = device.wait_event("summary", T)?;
        ensure!(
            summary["succeeded"] == 1 && summary["failed"] == 0,
            "{summary}"
        );
        ensure!(
            device.proc.wait_exit(T)? == Some(0),
            "thalamus-sim call failed: {:?}",
            device.seen
        );
        Ok(())
    }
}

#[test]
fn calls_both_ways_through_kamailio_with_baresip() {
    let mut peers = Peers::start(DEVICE_PASSWORD).unwrap_or_else(|e| panic!("{e:#}"));
    let result = peers
        .baresip_calls_the_device()
        .context("baresip -> Kamailio -> device")
        .and_then(|()| {
            peers
                .device_calls_baresip()
                .context("device -> Kamailio -> baresip")
        });
    if let Err(e) = result {
        panic!("{e:#}\n{}", peers.logs());
    }
}

impl Peers {
    /// With a wrong password the device is neither registered nor allowed to call.
    fn wrong_password_is_refused(&mut self) -> anyhow::Result<()> {
        let target = format!("sip:{BARESIP_USER}@{DOMAIN}");
        let mut device = self.device("call", &["--target", &target, "--hold-ms", "500"])?;
        device.wait_event("welcome", T)?;
        // Kamailio challenges the INVITE again after the wrong answer; the gateway gives up.
        let ended = device.wait_for(|v| v["event"] == "call_event" && v["state"] == "ended", T)?;
        ensure!(ended["sip_status"] == 407, "{ended}");
        wait_text(
            "\"REGISTER refused\" with status 401 in the gateway's log",
            T,
            || self.gateway.log(),
            |log| {
                log.lines()
                    .any(|l| l.contains("REGISTER refused") && l.contains("status=401"))
            },
        )?;
        let aor = format!("sip:{DEVICE}@{DOMAIN}");
        ensure!(
            self.kamailio
                .output
                .contains(&|l: &str| l.contains(&format!("REGISTER for {aor} saved")))
                .is_none(),
            "Kamailio saved a binding for a wrong password"
        );
        ensure!(
            self.kamailio
                .output
                .contains(&|l: &str| l.contains("authenticated as dev1"))
                .is_none(),
            "Kamailio let an INVITE with a wrong password through"
        );
        let summary = device.wait_event("summary", T)?;
        ensure!(
            summary["succeeded"] == 0 && summary["failed"] == 1,
            "{summary}"
        );
        // Nothing is registered for the device: Kamailio answers 404.
        self.baresip.command("dial", &aor)?;
        let closed = self.baresip.wait_event("CALL_CLOSED")?;
        ensure!(
            closed["param"]
                .as_str()
                .is_some_and(|p| p.starts_with("404")),
            "a call to the unregistered device: {closed}"
        );
        Ok(())
    }
}

#[test]
fn kamailio_refuses_a_device_with_a_wrong_password() {
    let mut peers = Peers::start("not-the-password").unwrap_or_else(|e| panic!("{e:#}"));
    if let Err(e) = peers.wrong_password_is_refused() {
        panic!("{e:#}\n{}", peers.logs());
    }
}

impl Peers {
    /// Baresip calls the device through Kamailio, then transfers it (its `transfer` command:
    /// a REFER) to the baresip user itself: the gateway places the device's new call through
    /// Kamailio, baresip answers it, the NOTIFYs reach baresip and the first call ends.
    fn baresip_transfers_the_device(&mut self) -> anyhow::Result<()> {
        let mut device = self.device("listen", &[])?;
        device.wait_event("welcome", T)?;
        wait_registered_upstream(&self.gateway)?;
        self.baresip
            .command("dial", &format!("sip:{DEVICE}@{DOMAIN}"))?;
        let first = device.wait_for(
            |v| v["event"] == "call_event" && v["state"] == "answered",
            T,
        )?;
        self.baresip.wait_event("CALL_ESTABLISHED")?;
        let target = format!("sip:{BARESIP_USER}@{DOMAIN}");
        self.baresip.command("transfer", &target)?;
        let told = device.wait_event("transfer_requested", T)?;
        ensure!(
            told["call_ref"] == first["call_ref"] && told["target"] == target.as_str(),
            "{told}"
        );
        let new_ref = told["new_call_ref"].clone();
        // The new call, placed for the device through Kamailio, is answered by baresip.
        let answered = device.wait_for(
            |v| v["event"] == "call_event" && v["state"] == "answered" && v["call_ref"] == new_ref,
            T,
        )?;
        ensure!(answered["sip_status"] == 200, "{answered}");
        let old = device.wait_for(
            |v| {
                v["event"] == "call_event"
                    && v["state"] == "ended"
                    && v["call_ref"] == first["call_ref"]
                    && v["reason"] != "media statistics"
            },
            T,
        )?;
        ensure!(
            old["reason"] == "transferred" || old["end_reason"] == "remote_hangup",
            "{old}"
        );
        // The transfer's NOTIFYs went to baresip along the recorded route.
        self.kamailio_line(&["request NOTIFY sip:baresipuser"])?;
        self.baresip.command("hangup", "")?;
        device.wait_for(
            |v| {
                v["event"] == "call_event"
                    && v["state"] == "ended"
                    && v["call_ref"] == new_ref
                    && v["reason"] != "media statistics"
            },
            T,
        )?;
        Ok(())
    }
}

impl Peers {
    /// The device watches baresip's presence through the gateway (SUBSCRIBE through Kamailio,
    /// challenged and answered with the device's credentials; baresip's presence module as the
    /// notifier): open once baresip says it is online, then closed once it says it is offline.
    fn the_device_watches_baresip(&mut self) -> anyhow::Result<()> {
        let target = format!("sip:{BARESIP_USER}@{DOMAIN}");
        let mut device = self.device("watch", &["--target", &target, "--for-ms", "8000"])?;
        let active = device.wait_event("watch_status", T)?;
        ensure!(active["active"] == true, "{active}");
        // baresip's status is unknown until it is set ("?" in its PIDF: no update).
        self.baresip.command("presence_online", "")?;
        let open = device.wait_event("presence_update", T)?;
        ensure!(
            open["uri"] == target.as_str() && open["state"] == "available",
            "{open}"
        );
        self.baresip.command("presence_offline", "")?;
        let closed = device.wait_event("presence_update", T)?;
        ensure!(closed["state"] == "offline", "{closed}");
        // The SUBSCRIBE went through Kamailio, which challenged it.
        self.kamailio_line(&["SUBSCRIBE from sip:dev1@", "authenticated as dev1"])?;
        let ended = device.wait_event("watch_status", T)?;
        ensure!(
            ended["active"] == false && ended["reason"] == "unwatched",
            "{ended}"
        );
        Ok(())
    }
}

/// baresip watches the device's presence (its presence module subscribes to an address book
/// entry marked `;presence=p2p`): the SUBSCRIBE goes through Kamailio (challenged, answered
/// with baresip's credentials) to the gateway that registered the device there; the gateway's
/// NOTIFY says open (baresip's address book shows the device online), and once the device
/// says it is busy, busy (baresip logs the change).
#[test]
fn baresip_watches_the_device_s_presence() {
    let run = || -> anyhow::Result<()> {
        let kamailio = Kamailio::start().context("starting Kamailio")?;
        let kport = kamailio.port;
        let gateway = start_gateway(kport, DEVICE_PASSWORD, "")?;
        let secret = gateway.add_device(DEVICE)?;
        let mut device = Sim::connect(&gateway, DEVICE, &secret, &[])?;
        device.wait_event("welcome", T)?;
        // Online and registered at Kamailio before baresip subscribes (it retries a failed
        // subscription only after 30 s).
        wait_registered_upstream(&gateway)?;
        let aor = format!("sip:{DEVICE}@{DOMAIN}");
        let mut baresip = Baresip::start(kport, &format!("\"Device\" <{aor}>;presence=p2p\n"))
            .context("starting baresip")?;
        let logs = |b: &Baresip| {
            format!(
                "--- Kamailio:\n{}\n--- baresip:\n{}\n--- gateway:\n{}",
                kamailio.output.text(),
                b.output.text(),
                gateway.log()
            )
        };
        // The gateway's NOTIFY says open: baresip's address book shows the device online.
        let deadline = Instant::now() + T;
        loop {
            let listed = baresip.command("contacts", "")?;
            let text = listed["data"].as_str().unwrap_or_default().to_string();
            if text.contains(DEVICE) && text.contains("Online") {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "baresip never saw the device online: {text}\n{}",
                logs(&baresip)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        ensure!(
            kamailio
                .output
                .contains(&|l: &str| l.contains("relaying SUBSCRIBE to sip:dev1@"))
                .is_some(),
            "the SUBSCRIBE did not go through Kamailio\n{}",
            logs(&baresip)
        );
        // The device says it is busy: the next NOTIFY says so (an RPID activity).
        let mut busy = Sim::connect(&gateway, DEVICE, &secret, &["--presence", "busy"])?;
        busy.wait_event("welcome", T)?;
        baresip
            .output
            .wait_line("baresip logging the device busy", T, |l| {
                l.contains(&aor) && l.contains("changed status") && l.contains("Busy")
            })
            .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&baresip)))?;
        device.proc.kill();
        // Counted once baresip's 200 OK is in, which can come after it logged the status.
        gateway
            .wait_metric_at_least("thalamus_presence_notifies_total{reason=\"sent\"}", 2.0, T)
            .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&baresip)))?;
        Ok(())
    };
    if let Err(e) = run() {
        panic!("{e:#}");
    }
}

#[test]
fn a_device_watches_baresip_s_presence() {
    let mut peers = Peers::start(DEVICE_PASSWORD).unwrap_or_else(|e| panic!("{e:#}"));
    if let Err(e) = peers.the_device_watches_baresip() {
        panic!("{e:#}\n{}", peers.logs());
    }
}

#[test]
fn baresip_transfers_its_call_with_the_device() {
    let mut peers = Peers::start(DEVICE_PASSWORD).unwrap_or_else(|e| panic!("{e:#}"));
    if let Err(e) = peers.baresip_transfers_the_device() {
        panic!("{e:#}\n{}", peers.logs());
    }
}

/// The RTP packets baresip received on its video stream, from the `rtcpsummary` lines it
/// printed when its last call closed (one per stream, audio first: `EX=BareSip;...;PR=<n>;`).
fn baresip_video_packets_received(output: &str) -> Option<u64> {
    let lines: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("EX=BareSip;"))
        .collect();
    let video = lines.get(lines.len().checked_sub(1)?)?;
    video
        .split(';')
        .find_map(|field| field.strip_prefix("PR="))
        .and_then(|n| n.parse().ok())
}

impl Peers {
    /// The device listens (`thalamus-sim listen` with `listen_args`) and registers upstream;
    /// baresip calls it through Kamailio, the device answers, and baresip hangs up 3 s later
    /// (its call closed when this returns). The listening device, for its reports.
    fn baresip_calls_the_device_for_3_s(&mut self, listen_args: &[&str]) -> anyhow::Result<Sim> {
        let mut device = self.device("listen", listen_args)?;
        device.wait_event("welcome", T)?;
        wait_registered_upstream(&self.gateway)?;
        self.baresip
            .command("dial", &format!("sip:{DEVICE}@{DOMAIN}"))?;
        device.wait_for(
            |v| v["event"] == "call_event" && v["state"] == "answered",
            T,
        )?;
        self.baresip.wait_event("CALL_ESTABLISHED")?;
        std::thread::sleep(Duration::from_secs(3));
        self.baresip.command("hangup", "")?;
        self.baresip.wait_event("CALL_CLOSED")?;
        Ok(device)
    }

    /// Checks one video call's counts: the device put baresip's VP8 frames together whole
    /// (counted, not checked: real VP8) and baresip's summary reports the device's video.
    fn check_video_counts(&self, report: &Value, summaries_before: usize) -> anyhow::Result<()> {
        let u = |key: &str| report[key].as_u64().unwrap_or(0);
        ensure!(u("frames") >= 15 && u("broken_frames") == 0, "{report}");
        // The first key frame, and the one the device asked for 1 s in (its KeyframeRequest,
        // an RTCP PLI to baresip, whose encoder answers with a key frame).
        ensure!(u("key_frames") >= 2 && u("sent_frames") >= 15, "{report}");
        ensure!(u("send_failed") == 0, "{report}");
        let text = self.baresip.output.text();
        wait_text(
            "baresip's RTCP summary of the call",
            T,
            || self.baresip.output.text(),
            |text| text.matches("EX=BareSip;").count() >= summaries_before + 2,
        )?;
        let received = baresip_video_packets_received(&self.baresip.output.text());
        ensure!(
            received.is_some_and(|n| n >= 10),
            "baresip received {received:?} video packets\n{text}"
        );
        eprintln!("device: {report}; baresip received {received:?} video packets");
        Ok(())
    }

    /// Video both ways with baresip (its VP8 and fakevideo modules): baresip calls the device,
    /// then the device calls baresip; each time both send video for 3 s and each side counts
    /// what it got: the device the whole VP8 frames it put together, baresip the video RTP
    /// packets its summary reports when the call closes.
    fn video_both_ways(&mut self) -> anyhow::Result<()> {
        let mut device = self.baresip_calls_the_device_for_3_s(&["--video", "--calls", "1"])?;
        let report = device.wait_event("video_report", T)?;
        self.check_video_counts(&report, 0)
            .context("baresip -> device")?;
        ensure!(device.proc.wait_exit(T)? == Some(0), "{:?}", device.seen);

        // The other way: the device calls, baresip answers by itself.
        let summaries = self.baresip.output.text().matches("EX=BareSip;").count();
        let target = format!("sip:{BARESIP_USER}@{DOMAIN}");
        let mut device = self.device(
            "call",
            &["--target", &target, "--video", "--hold-ms", "3000"],
        )?;
        self.baresip.wait_event("CALL_ESTABLISHED")?;
        let report = device.wait_event("video_report", T)?;
        self.baresip.wait_event("CALL_CLOSED")?;
        self.check_video_counts(&report, summaries)
            .context("device -> baresip")?;
        let summary = device.wait_event("summary", T)?;
        ensure!(summary["succeeded"] == 1, "{summary}");
        Ok(())
    }
}

#[test]
fn video_both_ways_with_baresip() {
    let mut peers = Peers::start_with(
        DEVICE_PASSWORD,
        &Extras {
            baresip_config: BARESIP_VIDEO.to_string(),
            ..Extras::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    if let Err(e) = peers.video_both_ways() {
        panic!("{e:#}\n{}", peers.logs());
    }
}

/// SRTP with SDES keys both ways: baresip's `srtp` module with `mediaenc=srtp-mand` (it offers
/// and takes only `RTP/SAVP`) and its `sndfile` module writing the audio it decodes into WAV
/// files in `dumps`; the gateway with `srtp = "require"`.
fn srtp_extras(dumps: &Path) -> Extras {
    Extras {
        baresip_config: format!(
            "\nmodule\t\t\tsrtp.so\nmodule\t\t\tsndfile.so\nsnd_path\t\t{}\n",
            dumps.display()
        ),
        baresip_account: ";mediaenc=srtp-mand".into(),
        baresip_account_line: None,
        gateway: "[media]\nrtp_port_min = 39100\nrtp_port_max = 39199\nsrtp = \"require\"\n".into(),
    }
}

/// Samples of the audio baresip decoded, from the `*-dec.wav` files its `sndfile` module wrote
/// in `dumps` (16-bit mono: the data after the 44-byte header, two bytes a sample).
fn baresip_decoded_samples(dumps: &Path) -> anyhow::Result<u64> {
    let mut samples = 0;
    for entry in std::fs::read_dir(dumps)? {
        let path = entry?.path();
        if path.to_string_lossy().ends_with("-dec.wav") {
            samples += std::fs::metadata(&path)?.len().saturating_sub(44) / 2;
        }
    }
    Ok(samples)
}

impl Peers {
    /// Audio over SRTP both ways with baresip, on a captured wire: baresip calls the device
    /// (which echoes what it hears), then the device calls baresip (streaming its probe
    /// frames). Each side counts the audio it got; the capture of the gateway's media ports
    /// holds SRTP and none of the device's probe frames in clear.
    fn srtp_both_ways(&mut self, dumps: &Path) -> anyhow::Result<()> {
        let capture = thalamus_tests::capture::Capture::start("udp and portrange 39100-39199")?;
        let mut device = self.baresip_calls_the_device_for_3_s(&["--echo", "--calls", "1"])?;
        let heard = device.wait_event("media_report", T)?;
        eprintln!("device heard over SRTP: {heard}");
        ensure!(
            heard["frames_received"].as_u64().unwrap_or(0) >= 50,
            "{heard}"
        );
        ensure!(
            heard["frames_echoed"].as_u64().unwrap_or(0) >= 50,
            "{heard}"
        );
        // baresip decoded the echo: 3 s of it at 8 kHz is 24,000 samples.
        let decoded = baresip_decoded_samples(dumps)?;
        eprintln!("baresip decoded {decoded} samples of the device's echo");
        ensure!(decoded >= 8_000, "baresip decoded {decoded} samples");

        let target = format!("sip:{BARESIP_USER}@{DOMAIN}");
        let mut device = self.device(
            "call",
            &["--target", &target, "--media", "--hold-ms", "3000"],
        )?;
        self.baresip.wait_event("CALL_ESTABLISHED")?;
        let report = device.wait_event("media_report", T)?;
        self.baresip.wait_event("CALL_CLOSED")?;
        eprintln!("device's call over SRTP: {report}");
        ensure!(
            report["frames_sent"].as_u64().unwrap_or(0) >= 100,
            "{report}"
        );
        ensure!(
            report["frames_received"].as_u64().unwrap_or(0) >= 50,
            "{report}"
        );
        // baresip decoded the device's frames too.
        let more = baresip_decoded_samples(dumps)?.saturating_sub(decoded);
        eprintln!("baresip decoded {more} samples of the device's call");
        ensure!(
            more >= 8_000,
            "baresip decoded {more} samples of the device's call"
        );

        let packets = capture.stop()?;
        let rtp = packets
            .iter()
            .filter(|p| p.len() > 12 && p[0] >> 6 == 2)
            .count();
        ensure!(rtp >= 300, "{rtp} RTP packets captured");
        let call_ref = u32::try_from(report["call_ref"].as_u64().unwrap_or(0))?;
        let tag = thalamus_sim::media::probe_tag(DEVICE, call_ref);
        for seq in 0..20u16 {
            let clear = thalamus_sim::media::probe_payload(tag, seq);
            ensure!(
                !packets
                    .iter()
                    .any(|p| p.windows(clear.len()).any(|w| w == clear)),
                "probe frame {seq} is on the wire in clear"
            );
        }
        Ok(())
    }
}

#[test]
fn srtp_both_ways_with_baresip() {
    let dumps = tempfile::tempdir().unwrap();
    let mut peers = Peers::start_with(DEVICE_PASSWORD, &srtp_extras(dumps.path()))
        .unwrap_or_else(|e| panic!("{e:#}"));
    if let Err(e) = peers.srtp_both_ways(dumps.path()) {
        panic!("{e:#}\n{}", peers.logs());
    }
}

/// A self-signed certificate for 127.0.0.1 written to `dir`: (chain PEM path, key PEM path,
/// both in one PEM path as baresip takes them).
fn certificate(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])?;
    let (chain, key) = (cert.cert.pem(), cert.key_pair.serialize_pem());
    let paths = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pem")),
    );
    std::fs::write(&paths.0, &chain)?;
    std::fs::write(&paths.1, &key)?;
    std::fs::write(&paths.2, format!("{chain}{key}"))?;
    Ok(paths)
}

/// A free TCP port on loopback.
fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// SIP over TLS both ways with baresip, no proxy between: the gateway listens for TLS with its
/// certificate and trusts baresip's; baresip (its own certificate, the gateway's as its CA)
/// calls the device at the gateway's TLS port, then the device calls baresip at its TLS port.
/// The media is SRTP too (its keys travel inside TLS now). Each side counts the audio it got.
/// Then a gateway that trusts another certificate cannot reach baresip: the handshake is
/// refused, counted, and the device's call fails.
#[test]
fn tls_and_srtp_calls_both_ways_with_baresip() {
    let run = || -> anyhow::Result<()> {
        let certs = tempfile::tempdir()?;
        let (gw_crt, gw_key, _) = certificate(certs.path(), "gateway")?;
        let (bs_crt, _, bs_pem) = certificate(certs.path(), "baresip")?;
        let tls_port = free_tcp_port()?;
        let dumps = tempfile::tempdir()?;
        let baresip_extras = Extras {
            baresip_config: format!(
                "\nsip_certificate\t\t{}\nsip_cafile\t\t{}\nmodule\t\t\tsrtp.so\n\
                 module\t\t\tsndfile.so\nsnd_path\t\t{}\n",
                bs_pem.display(),
                gw_crt.display(),
                dumps.path().display()
            ),
            baresip_account: ";mediaenc=srtp-mand".into(),
            baresip_account_line: Some(
                "<sip:bob@127.0.0.1;transport=tls>;regint=0;answermode=auto".into(),
            ),
            gateway: String::new(),
        };
        let mut baresip = Baresip::start_with(0, "", &baresip_extras)?;
        let gateway_with = |ca: &Path| {
            Gateway::start(&format!(
                "[sip.tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncertificate = {:?}\n\
                 private_key = {:?}\nca_certificates = {:?}\n\n[media]\nsrtp = \"require\"\n",
                gw_crt.display().to_string(),
                gw_key.display().to_string(),
                ca.display().to_string()
            ))
        };
        let gateway = gateway_with(&bs_crt)?;
        let secret = gateway.add_device(DEVICE)?;
        let device = |command: &str, extra: &[&str]| {
            let mut args = vec![command];
            let login = thalamus_tests::login_args(&gateway, DEVICE, &secret);
            args.extend(login.iter().map(String::as_str));
            args.extend_from_slice(extra);
            Sim::spawn(&args)
        };
        let logs = |b: &Baresip, g: &Gateway| {
            format!(
                "--- baresip:\n{}\n--- gateway:\n{}",
                b.output.text(),
                g.log()
            )
        };

        // baresip -> gateway over TLS -> device.
        let mut listener = device("listen", &["--echo", "--calls", "1"])?;
        listener.wait_event("welcome", T)?;
        baresip.command(
            "dial",
            &format!("sip:{DEVICE}@127.0.0.1:{tls_port};transport=tls"),
        )?;
        listener
            .wait_for(
                |v| v["event"] == "call_event" && v["state"] == "answered",
                T,
            )
            .with_context(|| logs(&baresip, &gateway))?;
        baresip.wait_event("CALL_ESTABLISHED")?;
        std::thread::sleep(Duration::from_secs(2));
        baresip.command("hangup", "")?;
        baresip.wait_event("CALL_CLOSED")?;
        let heard = listener.wait_event("media_report", T)?;
        ensure!(
            heard["frames_received"].as_u64().unwrap_or(0) >= 50,
            "{heard}"
        );
        let decoded = baresip_decoded_samples(dumps.path())?;
        ensure!(decoded >= 8_000, "baresip decoded {decoded} samples");

        // device -> gateway over TLS -> baresip.
        let target = format!("sip:bob@127.0.0.1:{};transport=tls", baresip.sip_port + 1);
        let mut caller = device(
            "call",
            &["--target", &target, "--media", "--hold-ms", "2000"],
        )?;
        baresip
            .wait_event("CALL_ESTABLISHED")
            .with_context(|| logs(&baresip, &gateway))?;
        let report = caller.wait_event("media_report", T)?;
        baresip.wait_event("CALL_CLOSED")?;
        ensure!(
            report["frames_received"].as_u64().unwrap_or(0) >= 50,
            "{report}"
        );
        let more = baresip_decoded_samples(dumps.path())?.saturating_sub(decoded);
        ensure!(
            more >= 8_000,
            "baresip decoded {more} samples of the device's call"
        );
        ensure!(
            gateway.metric("thalamus_sip_tcp_events_total{event=\"tls_handshake_failed\"}")? == 0.0
        );
        drop(gateway);

        // A gateway that trusts another certificate: baresip's is refused.
        let (other, _, _) = certificate(certs.path(), "other")?;
        let gateway = gateway_with(&other)?;
        let secret = gateway.add_device(DEVICE)?;
        let login = thalamus_tests::login_args(&gateway, DEVICE, &secret);
        let mut args = vec!["call"];
        args.extend(login.iter().map(String::as_str));
        args.extend_from_slice(&["--target", &target, "--hold-ms", "500"]);
        let mut refused = Sim::spawn(&args)?;
        let ended = refused.wait_for(|v| v["event"] == "call_event" && v["state"] == "ended", T)?;
        ensure!(
            ended["end_reason"] == "failed" && ended["reason"] == "transport error",
            "{ended}"
        );
        ensure!(
            gateway.metric("thalamus_sip_tcp_events_total{event=\"tls_handshake_failed\"}")? >= 1.0,
            "{}",
            gateway.log()
        );
        Ok(())
    };
    if let Err(e) = run() {
        panic!("{e:#}");
    }
}

/// Kamailio's `tls` module as a TLS proxy in front of the gateway: the gateway registers the
/// device at Kamailio and sends its calls there over TLS (outbound proxy and registrar
/// `;transport=tls`, Kamailio's certificate checked against the roots configured), and
/// Kamailio reaches the device's binding, the gateway's TLS Contact, over TLS. baresip (UDP to
/// Kamailio) calls the device, and the device calls baresip; Kamailio's log shows each of the
/// gateway's requests arriving over TLS.
#[test]
fn kamailio_proxies_over_tls_in_front_of_the_gateway() {
    let run = || -> anyhow::Result<()> {
        let certs = tempfile::tempdir()?;
        let (k_crt, k_key, _) = certificate(certs.path(), "kamailio")?;
        let (g_crt, g_key, _) = certificate(certs.path(), "gateway")?;
        let tls_cfg = certs.path().join("tls.cfg");
        std::fs::write(
            &tls_cfg,
            format!(
                "[server:default]\nmethod = TLSv1.2+\ncertificate = {}\nprivate_key = {}\n\
                 verify_certificate = no\nrequire_certificate = no\n\n\
                 [client:default]\nmethod = TLSv1.2+\nverify_certificate = no\n\
                 require_certificate = no\n",
                k_crt.display(),
                k_key.display()
            ),
        )?;
        let ktls = free_tcp_port()?;
        let kamailio = Kamailio::start_with(Some((ktls, &tls_cfg))).context("Kamailio")?;
        let gtls = free_tcp_port()?;
        let gateway = Gateway::start(&format!(
            "[sip]\n\
             domain = \"{DOMAIN}\"\n\
             outbound_proxy = \"sip:127.0.0.1:{ktls};transport=tls;lr\"\n\
             registrar = {{ uri = \"sip:127.0.0.1:{ktls};transport=tls\", domain = \"{DOMAIN}\", expires_secs = 300 }}\n\
             \n\
             [sip.tls]\n\
             listen = \"127.0.0.1:{gtls}\"\n\
             certificate = {:?}\n\
             private_key = {:?}\n\
             ca_certificates = {:?}\n\
             \n\
             [devices.{DEVICE}.auth]\n\
             username = \"{DEVICE}\"\n\
             password = \"{DEVICE_PASSWORD}\"\n",
            g_crt.display().to_string(),
            g_key.display().to_string(),
            k_crt.display().to_string(),
        ))?;
        let secret = gateway.add_device(DEVICE)?;
        let mut baresip = Baresip::start(kamailio.port, "").context("baresip")?;
        let logs = |b: &Baresip| {
            format!(
                "--- Kamailio:\n{}\n--- baresip:\n{}\n--- gateway:\n{}",
                kamailio.output.text(),
                b.output.text(),
                gateway.log()
            )
        };
        let device = |command: &str, extra: &[&str]| {
            let mut args = vec![command];
            let login = thalamus_tests::login_args(&gateway, DEVICE, &secret);
            args.extend(login.iter().map(String::as_str));
            args.extend_from_slice(extra);
            Sim::spawn(&args)
        };
        let kamailio_line = |parts: &[&str]| {
            kamailio
                .output
                .wait_line(&format!("with {parts:?} in Kamailio's log"), T, |l| {
                    parts.iter().all(|p| l.contains(p))
                })
        };

        // The device registers at Kamailio over TLS; its binding is the gateway's TLS Contact.
        let mut listener = device("listen", &["--calls", "1"])?;
        listener.wait_event("welcome", T)?;
        kamailio_line(&["request REGISTER", "over tls"]).with_context(|| logs(&baresip))?;
        kamailio_line(&[
            "REGISTER for sip:dev1@kamailio.test saved",
            &format!(":{gtls};transport=tls"),
        ])
        .with_context(|| logs(&baresip))?;
        wait_registered_upstream(&gateway)?;
        // baresip -> Kamailio -> (TLS) gateway -> device.
        baresip.command("dial", &format!("sip:{DEVICE}@{DOMAIN}"))?;
        listener
            .wait_for(
                |v| v["event"] == "call_event" && v["state"] == "answered",
                T,
            )
            .with_context(|| logs(&baresip))?;
        baresip.wait_event("CALL_ESTABLISHED")?;
        baresip.command("hangup", "")?;
        let ended = listener.wait_for(
            |v| {
                v["event"] == "call_event"
                    && v["state"] == "ended"
                    && v["reason"] != "media statistics"
            },
            T,
        )?;
        ensure!(ended["end_reason"] == "remote_hangup", "{ended}");
        baresip.wait_event("CALL_CLOSED")?;

        // device -> (TLS) Kamailio -> baresip.
        let target = format!("sip:{BARESIP_USER}@{DOMAIN}");
        let mut caller = device("call", &["--target", &target, "--hold-ms", "500"])?;
        let answered = caller
            .wait_for(
                |v| v["event"] == "call_event" && v["state"] == "answered",
                T,
            )
            .with_context(|| logs(&baresip))?;
        ensure!(answered["sip_status"] == 200, "{answered}");
        baresip.wait_event("CALL_CLOSED")?;
        kamailio_line(&["request INVITE sip:baresipuser", "over tls"])
            .with_context(|| logs(&baresip))?;
        let summary = caller.wait_event("summary", T)?;
        ensure!(summary["succeeded"] == 1, "{summary}");
        ensure!(
            gateway.metric("thalamus_sip_tcp_events_total{event=\"tls_handshake_failed\"}")? == 0.0
        );
        Ok(())
    };
    if let Err(e) = run() {
        panic!("{e:#}");
    }
}
