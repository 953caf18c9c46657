//! Test support for the dialog store tests: a real `redis-server` (or sentinel) started on a
//! free loopback port, waited for with PING, and killed when dropped.
//!
//! When `redis-server` is not installed the tests fail with a message saying so; they never
//! skip.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `redis-server` binary, or a panic that says how to install it.
pub fn redis_server_binary() -> PathBuf {
    for candidate in ["/usr/bin/redis-server", "/usr/local/bin/redis-server"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("redis-server");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    panic!(
        "redis-server is not installed, and the Redis dialog store tests need a real one: \
         install the Debian package `redis-server` (scripts/install-peers does). \
         These tests fail rather than skip."
    );
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends one inline command and reads the first reply line (enough for PING and the
/// sentinel queries the tests make).
pub fn raw_command(port: u16, command: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A redis-server child process on loopback.
pub struct RedisProcess {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisProcess {
    /// A plain, non-persistent redis-server on a free port.
    pub fn start() -> Self {
        Self::start_on(free_port(), &[])
    }

    /// A plain, non-persistent redis-server on `port`, with extra arguments.
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(redis_server_binary());
        command
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(extra);
        Self::spawn(command, port, dir)
    }

    /// A sentinel on a free port monitoring `master_name` at 127.0.0.1:`master_port`
    /// with quorum 1.
    pub fn start_sentinel(master_name: &str, master_port: u16) -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {master_name} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {master_name} 1000\n\
                 sentinel failover-timeout {master_name} 5000\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let mut command = Command::new(redis_server_binary());
        command.arg(&conf).arg("--sentinel");
        Self::spawn(command, port, dir)
    }

    fn spawn(mut command: Command, port: u16, dir: tempfile::TempDir) -> Self {
        let log = std::fs::File::create(dir.path().join("redis.log")).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start redis-server: {e}"));
        let mut process = Self {
            child: Some(child),
            port,
            dir,
        };
        process.wait_ready();
        process
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if raw_command(self.port, "PING").is_some_and(|r| r.starts_with("+PONG")) {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "redis-server on port {} exited with {status}: {}",
                        self.port,
                        self.log()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} did not answer PING: {}",
            self.port,
            self.log()
        );
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl RedisProcess {
    /// The server's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the server with kill(1).
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the server is not running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid} failed");
    }
}

/// The `redis-cli` binary next to `redis-server`.
pub fn redis_cli_binary() -> PathBuf {
    let server = redis_server_binary();
    let cli = server.with_file_name("redis-cli");
    assert!(
        cli.exists(),
        "redis-cli is not installed next to {server:?}"
    );
    cli
}

/// Runs `redis-cli -p <port> <args>` and returns its standard output (the command must
/// answer: the server is running).
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(redis_cli_binary())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    /// The node id.
    pub id: String,
    /// Its port.
    pub port: u16,
    /// Whether it is a master.
    pub master: bool,
    /// A replica's master id.
    pub master_id: Option<String>,
    /// A master's slots (ranges, inclusive), migration entries left out.
    pub slots: Vec<(u16, u16)>,
}

/// A Redis Cluster of 3 masters and 3 replicas on loopback (each node in its own temporary
/// directory), killed when dropped.
pub struct RedisCluster {
    /// The six nodes.
    pub nodes: Vec<RedisProcess>,
    /// One cluster at a time in a test binary: six servers each are enough for two cores, and
    /// two clusters starting together could meet each other's nodes.
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// Held by the cluster that runs (see [`RedisCluster`]).
static ONE_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl RedisCluster {
    /// Starts six cluster-enabled servers, joins them with `redis-cli --cluster create
    /// --cluster-replicas 1`, and waits (at most 60 s) until every node reports
    /// `cluster_state:ok` with all slots served and every replica's link is up.
    pub fn start() -> Self {
        let serial = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = free_port();
            // The cluster bus on a free port of its own (by default it is port + 10000, which
            // may be taken, or past 65535).
            let bus = free_port().to_string();
            let conf = format!("nodes-{port}.conf");
            nodes.push(RedisProcess::start_on(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    &bus,
                ],
            ));
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new(redis_cli_binary())
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self {
            nodes,
            _serial: serial,
        };
        cluster.wait_healthy(Duration::from_secs(60));
        cluster
    }

    /// Seed addresses (`127.0.0.1:<port>`) of every node.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// Waits until every node says `cluster_state:ok`, all 16384 slots are served, every
    /// node knows 6 nodes, every replica's link to its master is up, and all nodes agree on
    /// who the masters are.
    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            let mut healthy = true;
            let mut views = Vec::new();
            for node in &self.nodes {
                let info = cli(node.port, &["cluster", "info"]);
                if !(info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
                    && info.contains("cluster_known_nodes:6"))
                {
                    healthy = false;
                    last = format!("{}: {info}", node.port);
                }
                let replication = cli(node.port, &["info", "replication"]);
                if replication.contains("role:slave")
                    && !replication.contains("master_link_status:up")
                {
                    healthy = false;
                    last = format!("{}: {replication}", node.port);
                }
                let mut masters: Vec<u16> = self
                    .topology_from(node.port)
                    .into_iter()
                    .filter(|n| n.master && !n.slots.is_empty())
                    .map(|n| n.port)
                    .collect();
                masters.sort_unstable();
                views.push(masters);
            }
            if views.windows(2).any(|w| w[0] != w[1]) || views.first().map(Vec::len) != Some(3) {
                healthy = false;
                last = format!("views of the masters differ: {views:?}");
            }
            if healthy {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not become healthy: {last}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The cluster as node `port` sees it.
    pub fn topology_from(&self, port: u16) -> Vec<ClusterNode> {
        cli(port, &["cluster", "nodes"])
            .lines()
            .filter_map(|line| {
                let parts: Vec<&str> = line.split_whitespace().collect();
                if parts.len() < 8 {
                    return None;
                }
                let port: u16 = parts[1]
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()?;
                let master = parts[2].contains("master");
                let master_id = (parts[3] != "-").then(|| parts[3].to_owned());
                let slots = parts[8..]
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => {
                            let a = s.parse().ok()?;
                            Some((a, a))
                        }
                    })
                    .collect();
                Some(ClusterNode {
                    id: parts[0].to_owned(),
                    port,
                    master,
                    master_id,
                    slots,
                })
            })
            .collect()
    }

    /// The cluster as the first node sees it.
    pub fn topology(&self) -> Vec<ClusterNode> {
        self.topology_from(self.nodes[0].port)
    }

    /// The master serving `slot`.
    pub fn master_of_slot(&self, slot: u16) -> ClusterNode {
        self.topology()
            .into_iter()
            .find(|n| n.master && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// The process listening on `port`.
    pub fn node(&self, port: u16) -> &RedisProcess {
        self.nodes.iter().find(|n| n.port == port).unwrap()
    }
}
