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
