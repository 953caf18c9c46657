//! Harness for end-to-end tests: starts real `thalamus` and `thalamus-sim` processes on
//! loopback with ports they pick, reads their output, and stops them when dropped.
//!
//! The binaries are the workspace's own build (`target/<profile>/thalamus`), found next to the
//! test executable; `scripts/test` builds them before running the tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod capture;
pub mod cluster;
pub mod fleet;
pub mod netns;
pub mod sipp;

pub use sipp::{scenario, sipp, SippFiles, SippOutcome, SippProcess};

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// The admin token every test gateway is configured with (`[admin] token`); the admin HTTP
/// helpers present it.
pub const ADMIN_TOKEN: &str = "thalamus-tests-admin-token";

/// Path of a workspace binary built in the same profile as the running test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --lib --bins --examples`, which scripts/test does)",
        path.display()
    );
    path
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct Proc {
    /// The child.
    pub child: Child,
}

/// Sends `signal` (`STOP`, `CONT`, ...) to process `pid` with kill(1). After `STOP` it waits
/// (up to 5 s) until every thread of the process is stopped: the signal only takes effect at
/// the threads' next return from the kernel, and a test that sends packets right after the
/// kill must know they arrive while the process is frozen.
pub fn signal_process(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{signal} {pid}");
    if signal != "STOP" {
        return;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat"))
                        .ok()
                        .and_then(|stat| {
                            stat.rsplit_once(')')
                                .and_then(|(_, rest)| rest.split_whitespace().next())
                                .map(|state| state == "T" || state == "t")
                        })
                        .unwrap_or(true)
                })
            })
            .unwrap_or(true);
        if stopped {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Proc {
    /// Sends SIGKILL and reaps.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the JSON file a `--ready-file` process writes once it listens
    /// and returns it. Fails with the process's log (`log`) if it exits first, or on timeout.
    pub fn wait_ready(
        &mut self,
        what: &str,
        ready: &Path,
        log: &Path,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = std::fs::read_to_string(ready)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
            {
                return Ok(v);
            }
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                bail!("{what} exited with {status} before it was ready:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("{what} not ready within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for exit up to `timeout`; returns the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!("process did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gateway process with its own data directory.
#[derive(Debug)]
pub struct Gateway {
    /// The process.
    pub proc: Proc,
    /// Temporary data directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// Config file path.
    pub config_path: PathBuf,
    /// Bound QUIC address.
    pub quic: SocketAddr,
    /// Bound admin address.
    pub admin: SocketAddr,
    /// Bound SIP address (UDP and TCP).
    pub sip: SocketAddr,
    /// Certificate fingerprint.
    pub fingerprint: String,
    /// Bound address of the device page (`[web] listen`), when served.
    pub web: Option<SocketAddr>,
    /// The SHA-256 (hex) of the certificate WebTransport sessions get, when they are taken.
    pub webtransport_hash: Option<String>,
}

impl Gateway {
    /// Starts a gateway with ephemeral ports and `extra` TOML appended to its config. `extra`
    /// may hold whole sections (`[session]\nmax_calls = 2`).
    pub fn start(extra: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        Self::start_in(dir, "127.0.0.1:0", extra)
    }

    /// Starts a gateway in an existing data directory (a restart) on a given QUIC address.
    pub fn start_in(dir: tempfile::TempDir, quic: &str, extra: &str) -> anyhow::Result<Self> {
        Self::start_in_with(dir, quic, extra, Some(ADMIN_TOKEN))
    }

    /// [`Gateway::start_in`] with the given `[admin] token`, or none (the node then makes its
    /// own in its data directory).
    pub fn start_in_with(
        dir: tempfile::TempDir,
        quic: &str,
        extra: &str,
        admin_token: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::start_in_namespace(dir, None, quic, extra, admin_token)
    }

    /// [`Gateway::start_in_with`] inside the network namespace `netns` (`ip netns exec`), when
    /// given ([`netns::Netns`]).
    pub fn start_in_namespace(
        dir: tempfile::TempDir,
        netns: Option<&str>,
        quic: &str,
        extra: &str,
        admin_token: Option<&str>,
    ) -> anyhow::Result<Self> {
        let config_path = dir.path().join("thalamus.toml");
        let data = dir.path().join("data");
        let token = admin_token
            .map(|t| format!("token = \"{t}\"\n"))
            .unwrap_or_default();
        let text = format!(
            "[node]\ndata_dir = {data:?}\n\n[quic]\nlisten = \"{quic}\"\nhello_timeout_ms = 2000\n\n[admin]\nlisten = \"127.0.0.1:0\"\n{token}\n[sip]\nlisten = \"127.0.0.1:0\"\n\n[media]\naddress = \"127.0.0.1\"\n\n[log]\nlevel = \"info,thalamus_gateway=debug,thalamus_bridge=debug,thalamus_ingress=debug\"\n\n{extra}\n"
        );
        let text = merge_toml(&text)?;
        std::fs::write(&config_path, text)?;
        let ready = dir.path().join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let stdout = std::fs::File::create(dir.path().join("gateway.out"))?;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("gateway.log"))?;
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("thalamus"));
                c
            }
            None => Command::new(bin("thalamus")),
        };
        let child = command
            .arg("--config")
            .arg(&config_path)
            .arg("run")
            .arg("--ready-file")
            .arg(&ready)
            .env_remove("THALAMUS_CONFIG")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .context("spawning thalamus")?;
        let mut proc = Proc { child };
        let info = proc.wait_ready(
            "gateway",
            &ready,
            &dir.path().join("gateway.log"),
            Duration::from_secs(20),
        )?;
        Ok(Self {
            proc,
            config_path,
            quic: info["quic"].as_str().context("quic")?.parse()?,
            admin: info["admin"].as_str().context("admin")?.parse()?,
            sip: info["sip"].as_str().context("sip")?.parse()?,
            fingerprint: info["fingerprint"]
                .as_str()
                .context("fingerprint")?
                .to_string(),
            web: info["web"].as_str().map(str::parse).transpose()?,
            webtransport_hash: info["webtransport_certificate_hash"]
                .as_str()
                .map(str::to_string),
            dir,
        })
    }

    /// Kills the process (SIGKILL) and returns the data directory for a restart.
    pub fn kill(mut self) -> tempfile::TempDir {
        self.proc.kill();
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }

    /// `thalamus device add <id>`; returns the printed secret.
    pub fn add_device(&self, id: &str) -> anyhow::Result<String> {
        let out = Command::new(bin("thalamus"))
            .arg("--config")
            .arg(&self.config_path)
            .args(["device", "add", id])
            .env_remove("THALAMUS_CONFIG")
            .output()?;
        if !out.status.success() {
            bail!(
                "device add failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// What the process printed on stdout (its banner).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.out")).unwrap_or_default()
    }

    /// The gateway's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// GET a path of the admin endpoint; returns the body.
    pub fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        http_get(self.admin, path)
    }

    /// The value of one metric sample (exact name with labels), or 0 when absent.
    pub fn metric(&self, sample: &str) -> anyhow::Result<f64> {
        Ok(metric_sample(&self.admin_get("/metrics")?, sample))
    }
}

/// One sample of a Prometheus text exposition (exact name with labels), 0 when absent.
pub fn metric_sample(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

impl Gateway {
    /// Waits until a metric sample reaches `value` (metrics are updated as sessions finish
    /// closing, a little after the peer saw the close).
    pub fn wait_metric(&self, sample: &str, value: f64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.metric(sample)?;
            if (got - value).abs() < f64::EPSILON {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{sample} is {got}, expected {value}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until a metric sample is at least `value` (a counter the node bumps when it hears
    /// back from a peer, a little after the peer showed it got the message).
    pub fn wait_metric_at_least(
        &self,
        sample: &str,
        value: f64,
        timeout: Duration,
    ) -> anyhow::Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.metric(sample)?;
            if got >= value {
                return Ok(got);
            }
            if Instant::now() > deadline {
                bail!("{sample} is {got}, expected at least {value}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Later TOML sections with the same name as earlier ones are merged into them (so `extra` can
/// override keys of the base config).
fn merge_toml(text: &str) -> anyhow::Result<String> {
    let mut merged = toml_sections(text);
    let mut out = String::new();
    for (name, body) in merged.drain(..) {
        if !name.is_empty() {
            out.push_str(&format!("[{name}]\n"));
        }
        for (k, v) in body {
            out.push_str(&format!("{k} = {v}\n"));
        }
        out.push('\n');
    }
    Ok(out)
}

fn toml_sections(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut sections: Vec<(String, Vec<(String, String)>)> = vec![(String::new(), Vec::new())];
    let mut current = 0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = match sections.iter().position(|(n, _)| n == name) {
                Some(i) => i,
                None => {
                    sections.push((name.to_string(), Vec::new()));
                    sections.len() - 1
                }
            };
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let (k, v) = (k.trim().to_string(), v.trim().to_string());
            let body = &mut sections[current].1;
            match body.iter_mut().find(|(key, _)| *key == k) {
                Some(entry) => entry.1 = v,
                None => body.push((k, v)),
            }
        }
    }
    sections
}

/// A minimal HTTP/1.1 GET (the admin endpoint only).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    Ok(body.to_string())
}

/// A `thalamus-sim` process whose `--json` events are collected.
#[derive(Debug)]
pub struct Sim {
    /// The process.
    pub proc: Proc,
    events: mpsc::Receiver<Value>,
    /// Every event seen so far.
    pub seen: Vec<Value>,
}

impl Sim {
    /// Spawns `thalamus-sim <args> --json`.
    pub fn spawn(args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(bin("thalamus-sim"))
            .args(args)
            .arg("--json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning thalamus-sim")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("thalamus-sim printed a non-JSON line: {line}"),
                }
            }
        });
        Ok(Self {
            proc: Proc { child },
            events: rx,
            seen: Vec::new(),
        })
    }

    /// Spawns `thalamus-sim buddy --listen 127.0.0.1:0 <extra>` (the simulator's SIP peer) and
    /// waits up to `timeout` for it to listen; returns it and its SIP port.
    pub fn buddy(extra: &[&str], timeout: Duration) -> anyhow::Result<(Self, u16)> {
        let mut args = vec!["buddy", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut sim = Self::spawn(&args)?;
        let listening = sim.wait_event("listening", timeout)?;
        let port = listening["sip"]
            .as_str()
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|port| port.parse().ok())
            .with_context(|| format!("no SIP port in {listening}"))?;
        Ok((sim, port))
    }

    /// `thalamus-sim connect` for `device` against `gw`, plus `extra` args.
    pub fn connect(
        gw: &Gateway,
        device: &str,
        secret: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let quic = gw.quic.to_string();
        let mut args = vec![
            "connect",
            "--gateway",
            &quic,
            "--device",
            device,
            "--secret",
            secret,
            "--fingerprint",
            &gw.fingerprint,
        ];
        args.extend_from_slice(extra);
        Self::spawn(&args)
    }

    /// Waits for the next event named `event` (skipping others) within `timeout`.
    pub fn wait_event(&mut self, event: &str, timeout: Duration) -> anyhow::Result<Value> {
        self.wait_for(|v| v["event"] == event, timeout)
            .with_context(|| {
                format!(
                    "waiting for a {event:?} event; seen so far: {:?}",
                    self.seen
                )
            })
    }

    /// Waits for the next event matching `pred` within `timeout`.
    pub fn wait_for(
        &mut self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return Ok(v);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => bail!("timed out"),
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the simulator exited"),
            }
        }
    }
}

/// A two-thread tokio runtime for a test's async part (WebTransport and WebDriver clients).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Picks a free UDP port on loopback (bound then released).
pub fn free_udp_port() -> anyhow::Result<u16> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(sock.local_addr()?.port())
}

/// The simulator's login flags for `device` on `gw`: `--gateway`, `--fingerprint`,
/// `--device`, and `--secret=<secret>` as one argument (a secret may begin with '-').
pub fn login_args(gw: &Gateway, device: &str, secret: &str) -> Vec<String> {
    vec![
        "--gateway".into(),
        gw.quic.to_string(),
        "--fingerprint".into(),
        gw.fingerprint.clone(),
        "--device".into(),
        device.into(),
        format!("--secret={secret}"),
    ]
}

/// `thalamus-sim <command> <login> <extra>` (panics when it cannot be spawned).
pub fn sim_as(command: &str, login: Vec<String>, extra: &[&str]) -> Sim {
    let mut args: Vec<&str> = vec![command];
    args.extend(login.iter().map(String::as_str));
    args.extend_from_slice(extra);
    Sim::spawn(&args).expect("spawning thalamus-sim")
}

/// The call records (CDR) a node wrote in `data_dir` (`cdr/calls.jsonl`), in order; none when
/// the file does not exist yet.
pub fn call_records(data_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(data_dir.join("cdr/calls.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a call record is one JSON object per line"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_sections_override_base_keys() {
        let merged =
            merge_toml("[quic]\nlisten = \"a\"\nx = 1\n[log]\nlevel = \"info\"\n[quic]\nx = 2\n")
                .unwrap();
        assert_eq!(
            merged.trim(),
            "[quic]\nlisten = \"a\"\nx = 2\n\n[log]\nlevel = \"info\""
        );
    }
}
