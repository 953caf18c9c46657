//! The cluster's other processes for end-to-end tests: a real `redis-server` on a free port and
//! the `thalamus balancer`, plus a small HTTP client for the admin endpoints. Each is killed
//! when dropped. Gateway nodes themselves are [`Gateway`](crate::Gateway)s.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::{bin, http_get, Proc};

/// How long a process has to become ready, and the default wait of the helpers here.
const READY: Duration = Duration::from_secs(20);

/// An HTTP/1.1 request without a body, with the test gateways' admin token; returns (status,
/// body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http_request_with(
        addr,
        method,
        path,
        &format!("Authorization: Bearer {}\r\n", crate::ADMIN_TOKEN),
    )
}

/// An HTTP/1.1 request without a body and with `headers` (each line ending in CRLF); returns
/// (status, body).
pub fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    Ok((status, body.to_string()))
}

/// Percent-encodes one path segment (of an admin endpoint path).
pub fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A loopback port below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), free
/// for UDP and TCP when asked. A node restarted on its old port finds it free again: no
/// client socket (a simulator's, SIPp's) is ever given a port there, as it can be one in the
/// ephemeral range while the node is down.
pub fn free_port_below_ephemeral() -> anyhow::Result<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let floor = 10_000u16.min(low.saturating_sub(1_000));
    let span = u32::from(low - floor);
    // A start that differs between test processes and calls.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().rotate_left(16);
    let start = seed % span;
    for i in 0..span.min(2_000) {
        let port = floor + u16::try_from((start + i * 7_919) % span).unwrap_or(0);
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        let tcp = TcpListener::bind(("127.0.0.1", port));
        if udp.is_ok() && tcp.is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port below {low}")
}

/// A free TCP port on loopback (free when asked; the caller binds it soon after).
pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `redis-server` on a free loopback port, without persistence.
#[derive(Debug)]
pub struct Redis {
    _proc: Proc,
    /// Its port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// Starts it and waits for it to answer PING. Fails when the Debian package
    /// `redis-server` is not installed: the tests that use it need a real Redis.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_on(free_tcp_port()?)
    }

    /// [`Redis::start`] on `port` (a test that starts a node before its store picks the port).
    pub fn start_on(port: u16) -> anyhow::Result<Self> {
        Self::spawn(port, |_| Vec::new(), &[])
    }

    /// [`Redis::start`] listening on loopback and on `also` (an address of a test's network
    /// namespace).
    pub fn start_also_on(also: &str) -> anyhow::Result<Self> {
        // Protected mode would refuse the namespace's clients (no password: a test store).
        Self::spawn(
            free_tcp_port()?,
            |_| Vec::new(),
            &["--bind", "127.0.0.1", also, "--protected-mode", "no"],
        )
    }

    /// A replica of `master`, on a free port.
    pub fn start_replica_of(master: &Redis) -> anyhow::Result<Self> {
        let master_port = master.port.to_string();
        Self::spawn(
            free_tcp_port()?,
            |_| Vec::new(),
            &["--replicaof", "127.0.0.1", &master_port],
        )
    }

    /// A sentinel on a free port monitoring `master` under `name` with quorum 1, taking the
    /// master for down after 1 s without an answer.
    pub fn start_sentinel(name: &str, master: &Redis) -> anyhow::Result<Self> {
        let master_port = master.port;
        Self::spawn(
            free_tcp_port()?,
            |dir| {
                let conf = dir.join("sentinel.conf");
                vec![
                    conf.display().to_string(),
                    format!(
                        "sentinel monitor {name} 127.0.0.1 {master_port} 1\n\
                         sentinel down-after-milliseconds {name} 1000\n\
                         sentinel failover-timeout {name} 5000\n"
                    ),
                ]
            },
            &["--sentinel"],
        )
    }

    /// Starts `redis-server` on `port` in a new directory; `config` may return a config file
    /// path and its text (a sentinel needs a writable one), which go first; `args` follow.
    fn spawn(
        port: u16,
        config: impl FnOnce(&Path) -> Vec<String>,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let path = Path::new("/usr/bin/redis-server");
        if !path.exists() {
            bail!(
                "redis-server is missing at /usr/bin/redis-server (Debian package \
                 redis-server): these tests need a real Redis"
            );
        }
        let dir = tempfile::tempdir()?;
        let mut command = Command::new(path);
        if let [file, text] = config(dir.path()).as_slice() {
            std::fs::write(file, text)?;
            command.arg(file);
        }
        command.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
        if !args.contains(&"--sentinel") {
            command.args(["--save", "", "--appendonly", "no"]);
        }
        let child = command
            .arg("--dir")
            .arg(dir.path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning redis-server")?;
        let redis = Self {
            _proc: Proc { child },
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + READY;
        while !redis.ping() {
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(redis)
    }

    /// Sends one inline command and returns the first reply's text (up to 4 KiB), or `None`
    /// when it does not answer within a second.
    pub fn command(&self, command: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        s.write_all(format!("{command}\r\n").as_bytes()).ok()?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Asked of a sentinel: the port of the master it knows as `name`.
    pub fn sentinel_master_port(&self, name: &str) -> Option<u16> {
        let reply = self.command(&format!("SENTINEL get-master-addr-by-name {name}"))?;
        reply.lines().nth(4)?.trim().parse().ok()
    }

    /// Whether it answers PING.
    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    /// Its process id (to freeze it with SIGSTOP).
    pub fn pid(&self) -> u32 {
        self._proc.child.id()
    }

    /// Its URL for `[cluster.store.redis] url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

/// The heartbeat secret of a balancer listening outside loopback
/// ([`Balancer::start_on_host`]): its nodes' `[cluster.heartbeat] secret`.
pub const HEARTBEAT_SECRET: &str = "thalamus-tests-heartbeat-secret";

/// The `thalamus balancer` process, everything on loopback ports it picks.
#[derive(Debug)]
pub struct Balancer {
    _proc: Proc,
    /// SIP address (UDP).
    pub sip: SocketAddr,
    /// Heartbeat address (UDP): the nodes' `[cluster.heartbeat] balancers`.
    pub heartbeat: SocketAddr,
    /// Admin address (HTTP).
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Balancer {
    /// Starts a balancer expecting heartbeats every `interval_ms`, taking a node out after
    /// `miss_count` missed ones, logging at `log_level`.
    pub fn start(interval_ms: u64, miss_count: u32, log_level: &str) -> anyhow::Result<Self> {
        Self::start_on_host("127.0.0.1", interval_ms, miss_count, log_level)
    }

    /// [`Balancer::start`] with its SIP and heartbeat sockets on `host` (an address of a
    /// test's network namespace); its admin endpoint stays on loopback.
    pub fn start_on_host(
        host: &str,
        interval_ms: u64,
        miss_count: u32,
        log_level: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let on =
            |port: &str| -> anyhow::Result<SocketAddr> { Ok(format!("{host}:{port}").parse()?) };
        let ports = (host != "127.0.0.1")
            .then(|| -> anyhow::Result<_> { Ok((on("0")?, on("0")?, "127.0.0.1:0".parse()?)) })
            .transpose()?;
        let (proc, sip, heartbeat, admin) =
            Self::spawn(dir.path(), interval_ms, miss_count, log_level, ports)?;
        Ok(Self {
            _proc: proc,
            sip,
            heartbeat,
            admin,
            dir,
        })
    }

    /// Kills the balancer (SIGKILL) and starts it again on the same ports, with the same
    /// settings and an empty node table; returns how long the new one took to be ready.
    pub fn restart(
        &mut self,
        interval_ms: u64,
        miss_count: u32,
        log_level: &str,
    ) -> anyhow::Result<Duration> {
        let _ = self._proc.child.kill();
        let _ = self._proc.child.wait();
        let started = Instant::now();
        let ports = Some((self.sip, self.heartbeat, self.admin));
        let (proc, ..) = Self::spawn(self.dir.path(), interval_ms, miss_count, log_level, ports)?;
        self._proc = proc;
        Ok(started.elapsed())
    }

    fn spawn(
        dir: &Path,
        interval_ms: u64,
        miss_count: u32,
        log_level: &str,
        ports: Option<(SocketAddr, SocketAddr, SocketAddr)>,
    ) -> anyhow::Result<(Proc, SocketAddr, SocketAddr, SocketAddr)> {
        let config = dir.join("balancer.toml");
        // A balancer reachable from outside loopback authenticates heartbeats.
        let secret = ports
            .filter(|(s, ..)| !s.ip().is_loopback())
            .map(|_| format!("secret = \"{HEARTBEAT_SECRET}\"\n"))
            .unwrap_or_default();
        let any = "127.0.0.1:0".to_string();
        let (sip, hb, admin) = ports.map_or_else(
            || (any.clone(), any.clone(), any.clone()),
            |(s, h, a)| (s.to_string(), h.to_string(), a.to_string()),
        );
        std::fs::write(
            &config,
            format!(
                "[sip]\nlisten = \"{sip}\"\n\n[heartbeat]\nlisten = \"{hb}\"\n\
                 interval_ms = {interval_ms}\nmiss_count = {miss_count}\nrejoin_count = 2\n{secret}\n\
                 [admin]\nlisten = \"{admin}\"\n\n[log]\nlevel = \"{log_level}\"\n"
            ),
        )?;
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("balancer.log"))?;
        let child = Command::new(bin("thalamus"))
            .arg("balancer")
            .arg("--config")
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .env_remove("THALAMUS_CONFIG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning thalamus balancer")?;
        let mut proc = Proc { child };
        let v = proc.wait_ready("balancer", &ready, &dir.join("balancer.log"), READY)?;
        let addr = |k: &str| -> anyhow::Result<SocketAddr> {
            Ok(v[k].as_str().context(k.to_string())?.parse()?)
        };
        Ok((proc, addr("sip_udp")?, addr("heartbeat")?, addr("admin")?))
    }

    /// `/nodes` as JSON (`Null` when it cannot be read).
    pub fn nodes(&self) -> Value {
        http_get(self.admin, "/nodes")
            .ok()
            .and_then(|body| serde_json::from_str(&body).ok())
            .unwrap_or(Value::Null)
    }

    /// The entry for `node` in `/nodes` (`Null` when absent).
    pub fn node(&self, node: &str) -> Value {
        self.nodes()
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["id"] == node)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// The ids of the nodes eligible for new calls, sorted.
    pub fn eligible(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .nodes()
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["eligible"] == true)
            .filter_map(|n| n["id"].as_str().map(str::to_string))
            .collect();
        ids.sort();
        ids
    }

    /// Waits (up to 20 s, else panics with the node's entry) until `node`'s eligibility is
    /// `eligible`; returns how long that took.
    pub fn wait_eligible(&self, node: &str, eligible: bool) -> Duration {
        let started = Instant::now();
        while (self.node(node)["eligible"] == true) != eligible {
            assert!(
                started.elapsed() < READY,
                "balancer never saw {node} eligible={eligible}: {}",
                self.node(node)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        started.elapsed()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("balancer.log")).unwrap_or_default()
    }

    /// One sample of `/metrics` (`thalamus_balancer_...`, with its labels), 0 when absent.
    pub fn metric(&self, sample: &str) -> anyhow::Result<f64> {
        Ok(crate::metric_sample(
            &http_get(self.admin, "/metrics")?,
            sample,
        ))
    }
}
