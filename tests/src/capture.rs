//! Packet captures for the tests: `tcpdump` (Debian package `tcpdump`, installed by
//! `scripts/install-peers`) writing a pcap of the loopback traffic a filter selects, read back
//! as the UDP payloads it holds. Needs the rights to capture (root, or `CAP_NET_RAW`), as the
//! partition tests need theirs.
//!
//! What it does not do: no IPv6, no TCP reassembly, no other link types than the Ethernet-like
//! one Linux gives loopback.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};

/// A running capture on `lo`.
#[derive(Debug)]
pub struct Capture {
    child: Child,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    /// Starts `tcpdump -i lo` with the filter `filter` and waits until it listens.
    pub fn start(filter: &str) -> anyhow::Result<Capture> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("capture.pcap");
        let mut child = Command::new("tcpdump")
            .args(["-i", "lo", "-n", "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg(filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning tcpdump: run scripts/install-peers (Debian package tcpdump)")?;
        let stderr = child.stderr.take().context("tcpdump's stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut capture = Capture {
            child,
            file,
            _dir: dir,
        };
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.contains("listening on") => return Ok(capture),
                Ok(line) => seen.push(line),
                Err(_) => {
                    capture.kill();
                    bail!("tcpdump did not start: {seen:?}");
                }
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the capture (SIGINT: tcpdump writes out what it holds) and returns the UDP
    /// payloads it captured, in order.
    pub fn stop(mut self) -> anyhow::Result<Vec<Vec<u8>>> {
        crate::signal_process(self.child.id(), "INT");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.child.try_wait()?.is_none() {
            ensure!(std::time::Instant::now() < deadline, "tcpdump did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        udp_payloads(&std::fs::read(&self.file)?)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The UDP payloads of the IPv4 packets of a pcap file (either byte order, Ethernet link type).
pub fn udp_payloads(data: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let word = |at: usize, little: bool| -> anyhow::Result<u32> {
        let bytes: [u8; 4] = data
            .get(at..at + 4)
            .context("a truncated pcap")?
            .try_into()?;
        Ok(if little {
            u32::from_le_bytes(bytes)
        } else {
            u32::from_be_bytes(bytes)
        })
    };
    let little = match word(0, true)? {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        other => bail!("not a pcap file (magic {other:#x})"),
    };
    ensure!(word(20, little)? == 1, "an Ethernet capture expected");
    let mut payloads = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let len = word(at + 8, little)? as usize;
        let frame = data
            .get(at + 16..at + 16 + len)
            .context("a truncated packet")?;
        at += 16 + len;
        let Some(ip) = frame
            .get(14..)
            .filter(|_| frame.get(12..14) == Some(&[8, 0]))
        else {
            continue;
        };
        if ip.get(9) != Some(&17) {
            continue;
        }
        let header = usize::from(ip.first().map_or(0, |b| b & 0x0f)) * 4;
        if let Some(udp) = ip.get(header + 8..) {
            payloads.push(udp.to_vec());
        }
    }
    Ok(payloads)
}
