//! Network namespaces for the partition tests: a "world" namespace where the test itself and
//! most processes run, and a "node" namespace for the one node that gets cut off, joined to the
//! world by two veth links: link A carries SIP, heartbeats and the devices' QUIC
//! (10.99.1.1 in the world, 10.99.1.2 in the node), link B carries the dialog store's traffic
//! (10.99.2.1, 10.99.2.2). Taking link B down cuts the node off from the store and from nothing
//! else.
//!
//! Everything lives inside the two namespaces the test makes (their own loopbacks, the veth
//! ends created directly in them): nothing is added to the host's namespace. Dropping the value
//! deletes both namespaces, which removes the links. It does not run anything by itself:
//! [`Netns::enter_world`] moves the calling thread (and so every process and thread it starts
//! later) into the world; a process for the node namespace is started with `ip netns exec`.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip` (Debian package `iproute2`).

use std::process::Command;

use anyhow::{bail, Context};

/// The world's end of link A (the balancer listens here).
pub const WORLD_A: &str = "10.99.1.1";
/// The node's end of link A (its SIP, QUIC, admin and media addresses).
pub const NODE_A: &str = "10.99.1.2";
/// The world's end of link B (the dialog store listens here too).
pub const WORLD_B: &str = "10.99.2.1";

/// The two namespaces and their links; deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    /// The world namespace's name.
    pub world: String,
    /// The node namespace's name.
    pub node: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (Debian package iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    /// Makes both namespaces and both links (names from this process's id, so concurrent test
    /// binaries do not collide).
    pub fn create() -> anyhow::Result<Self> {
        let id = std::process::id() % 100_000;
        let ns = Self {
            world: format!("thw{id}"),
            node: format!("thn{id}"),
        };
        // Leftovers of an earlier run with the same id.
        let _ = ip(&["netns", "del", &ns.world]);
        let _ = ip(&["netns", "del", &ns.node]);
        ns.setup()?;
        Ok(ns)
    }

    fn setup(&self) -> anyhow::Result<()> {
        let (w, n) = (self.world.as_str(), self.node.as_str());
        ip(&["netns", "add", w])?;
        ip(&["netns", "add", n])?;
        for ns in [w, n] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        for (link, world_addr, node_addr) in [("a", WORLD_A, NODE_A), ("b", WORLD_B, "10.99.2.2")] {
            let (wl, nl) = (format!("v{link}w"), format!("v{link}n"));
            ip(&[
                "link", "add", &wl, "netns", w, "type", "veth", "peer", "name", &nl, "netns", n,
            ])?;
            ip(&[
                "-n",
                w,
                "addr",
                "add",
                &format!("{world_addr}/24"),
                "dev",
                &wl,
            ])?;
            ip(&[
                "-n",
                n,
                "addr",
                "add",
                &format!("{node_addr}/24"),
                "dev",
                &nl,
            ])?;
            ip(&["-n", w, "link", "set", &wl, "up"])?;
            ip(&["-n", n, "link", "set", &nl, "up"])?;
        }
        Ok(())
    }

    /// Moves the calling thread into the world namespace: the processes and threads it starts
    /// from now on run there.
    pub fn enter_world(&self) -> anyhow::Result<()> {
        let file = std::fs::File::open(format!("/run/netns/{}", self.world))
            .context("opening the world namespace")?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("setns into the world namespace")?;
        Ok(())
    }

    /// Takes link B (the node's way to the dialog store) down or up again, from the node's
    /// side.
    pub fn store_link(&self, up: bool) -> anyhow::Result<()> {
        ip(&[
            "-n",
            &self.node,
            "link",
            "set",
            "vbn",
            if up { "up" } else { "down" },
        ])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.node]);
        let _ = ip(&["netns", "del", &self.world]);
    }
}
