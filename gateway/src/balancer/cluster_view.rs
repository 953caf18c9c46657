//! The cluster as one gateway node sees it: a heartbeat listener feeding the same
//! [`Membership`] table the balancer keeps, so that a node computes device ownership with the
//! same live set and the same [`owner`] function as the balancers.
//!
//! A node runs a [`ClusterView`] on a UDP port of its own and lists that port (its own and its
//! peers') among its [`HeartbeatSender`](super::heartbeat::HeartbeatSender) targets, next to
//! the balancers. A node asks `owner(device)` when a device connects (and tells it where to go,
//! using `quic_addr`, when the owner is another node) and when it must decide whether to take a
//! dialog over. This module keeps the table current; it does not redirect devices or take
//! dialogs over itself.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use super::hash::{owner, NodeId};
use super::heartbeat::{Heartbeat, MAX_HEARTBEAT_BYTES};
use super::membership::{Membership, MembershipConfig, NodeStatus};

/// Settings of a [`ClusterView`].
#[derive(Debug, Clone)]
pub struct ClusterViewConfig {
    /// UDP address the node's peers send heartbeats to.
    pub listen: SocketAddr,
    /// Liveness settings (use the balancers' values).
    pub membership: MembershipConfig,
    /// Shared heartbeat secret.
    pub secret: Option<Vec<u8>>,
}

/// A live membership table fed by heartbeats, and its ownership answers.
pub struct ClusterView {
    table: Arc<Mutex<Membership>>,
    local_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterView")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

fn lock(table: &Mutex<Membership>) -> MutexGuard<'_, Membership> {
    table.lock().unwrap_or_else(|e| e.into_inner())
}

impl ClusterView {
    /// Binds the listener and starts receiving heartbeats and ticking.
    pub async fn start(config: ClusterViewConfig) -> std::io::Result<Self> {
        let socket = UdpSocket::bind(config.listen).await?;
        let local_addr = socket.local_addr()?;
        let tick = (config.membership.interval / 4)
            .clamp(Duration::from_millis(5), Duration::from_millis(250));
        let table = Arc::new(Mutex::new(Membership::new(config.membership)));
        let receive = {
            let table = Arc::clone(&table);
            let secret = config.secret;
            tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_HEARTBEAT_BYTES + 1];
                loop {
                    let Ok((n, source)) = socket.recv_from(&mut buf).await else {
                        continue;
                    };
                    let datagram = buf.get(..n).unwrap_or_default();
                    match Heartbeat::decode(datagram, secret.as_deref()) {
                        Ok(hb) => {
                            let _ = lock(&table).heartbeat(&hb, source, Instant::now());
                        }
                        Err(e) => tracing::debug!(%source, error = %e, "heartbeat rejected"),
                    }
                }
            })
        };
        let ticker = {
            let table = Arc::clone(&table);
            tokio::spawn(async move {
                let mut every = tokio::time::interval(tick);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    for event in lock(&table).tick(Instant::now()) {
                        tracing::info!(?event, "cluster membership");
                    }
                }
            })
        };
        Ok(Self {
            table,
            local_addr,
            tasks: vec![receive, ticker],
        })
    }

    /// The bound heartbeat address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The owner of `key` (a device id) among the nodes eligible for new work.
    pub fn owner(&self, key: &str) -> Option<NodeId> {
        owner(key, lock(&self.table).eligible()).cloned()
    }

    /// Nodes up and not draining.
    pub fn eligible(&self) -> Vec<NodeId> {
        lock(&self.table).eligible().to_vec()
    }

    /// True when `node` is up (draining or not).
    pub fn is_alive(&self, node: &NodeId) -> bool {
        lock(&self.table).is_alive(node)
    }

    /// The device (QUIC) address `node` announced: where to send a device it owns.
    pub fn quic_addr(&self, node: &NodeId) -> Option<SocketAddr> {
        lock(&self.table).node(node).and_then(|n| n.quic)
    }

    /// The table, as the balancer's `/nodes` shows it.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        lock(&self.table).snapshot(Instant::now())
    }

    /// Stops listening.
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for ClusterView {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::heartbeat::{HeartbeatSender, HeartbeatSenderConfig};

    async fn until(what: &str, mut check: impl FnMut() -> bool) {
        let start = Instant::now();
        while !check() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out: {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn view_follows_heartbeats_and_answers_ownership() {
        let interval = Duration::from_millis(100);
        let view = ClusterView::start(ClusterViewConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            membership: MembershipConfig {
                interval,
                ..MembershipConfig::default()
            },
            secret: Some(b"k".to_vec()),
        })
        .await
        .unwrap();
        let sender = |name: &str, port: u16| {
            let mut c = HeartbeatSenderConfig::new(
                NodeId::new(name).unwrap(),
                SocketAddr::from(([127, 0, 0, 1], port)),
                vec![view.local_addr()],
            );
            c.quic = Some(SocketAddr::from(([127, 0, 0, 1], port + 1)));
            c.interval = interval;
            c.secret = Some(b"k".to_vec());
            c.bind = "127.0.0.1:0".parse().unwrap();
            HeartbeatSender::start(c)
        };
        let a = sender("a", 5060).await.unwrap();
        let b = sender("b", 5062).await.unwrap();
        until("both up", || view.eligible().len() == 2).await;
        let both = [NodeId::new("a").unwrap(), NodeId::new("b").unwrap()];
        for i in 0..50 {
            let key = format!("dev-{i}");
            assert_eq!(view.owner(&key).as_ref(), owner(&key, &both));
        }
        assert_eq!(
            view.quic_addr(&both[1]),
            Some("127.0.0.1:5063".parse().unwrap())
        );
        b.set_draining(true);
        until("b draining", || view.eligible() == vec![both[0].clone()]).await;
        assert!(view.is_alive(&both[1]));
        assert_eq!(view.owner("anything"), Some(both[0].clone()));
        b.stop();
        until("b out", || !view.is_alive(&both[1])).await;
        a.stop();
        until("a out", || view.eligible().is_empty()).await;
        assert_eq!(view.owner("dev-1"), None);
        assert_eq!(view.nodes().len(), 2);
    }
}
