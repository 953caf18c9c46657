//! The fence: whether this node may still act on a dialog it holds without first confirming
//! its ownership in the store, and whether another node may be acting on one.
//!
//! A node normally confirms ownership with every in-dialog request it sends: the write of the
//! request's CSeq is a compare-and-set on the record, and a node that lost the dialog loses
//! that write. When the write cannot be made (the store is slow or unreachable), the node may
//! send anyway only while no other node can have claimed the dialog, and a survivor claims a
//! dialog from a node only once that node cannot be sending any more. Both sides reason from
//! the same two facts, each with a safety margin against the other side's clock:
//!
//! * **The owner lease** in the store. The node's own view of it ends a tenth of the TTL
//!   before the TTL counted from when it *asked* for the renewal, so it ends before the store's
//!   (which counts from when the store applied it). A survivor claims once the store says the
//!   lease lapsed.
//! * **The balancers' live sets**, when heartbeats are configured. A balancer takes a node out
//!   after a silence of its `silence` window counted from the last heartbeat it received; the
//!   node counts the same window, less a tenth, from when it *sent* the last heartbeat each
//!   balancer acknowledged, so its view ends first. A node must be listed by every balancer it
//!   heartbeats. A survivor claims from a node missing from a balancer's alive set, provided
//!   that balancer has been up for a whole window (a balancer that just restarted does not yet
//!   know its members).
//!
//! So a node sends without a confirmed write only when [`Fence::may_act`] says so, and claims
//! from a live owner only when [`Fence::owner_gone`] (or the store's lease) says so. The rule
//! assumes clocks that run at about the same rate (not the same time of day), and a node that
//! checks the fence just before it sends; a pause between the check and the send is not
//! covered (the store's epoch still refuses that node's writes).
//!
//! Sans-IO: callers pass every timestamp; nothing here sleeps, sends or reads a clock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::hash::NodeId;

/// Why a node may not act on its dialogs without a confirmed write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Fenced {
    /// The owner lease was never confirmed, or its confirmed term ran out.
    #[error("the owner lease is not confirmed")]
    LeaseUnconfirmed,
    /// A balancer has not confirmed, recently enough, that it lists this node.
    #[error("balancer {0} has not confirmed this node recently")]
    NotListed(SocketAddr),
}

/// What one balancer last told this node.
#[derive(Debug, Clone)]
struct BalancerView {
    /// Until when this balancer cannot have taken this node out (None: it does not list us).
    listed_until: Option<Instant>,
    /// When the report arrived, and the nodes it lists as alive (draining ones included).
    received: Instant,
    alive: Vec<NodeId>,
    /// The balancer's silence window, and whether it had been up for one when it reported.
    silence: Duration,
    settled: bool,
}

/// The fence of one node (see the module notes).
#[derive(Debug, Clone)]
pub struct Fence {
    node: NodeId,
    lease_ttl: Duration,
    lease_until: Option<Instant>,
    /// The balancers this node heartbeats (empty: no live set, the lease alone decides).
    balancers: Vec<SocketAddr>,
    views: HashMap<SocketAddr, BalancerView>,
}

/// A tenth of `d`: the margin taken against the other side's clock and processing.
fn margin(d: Duration) -> Duration {
    d / 10
}

impl Fence {
    /// The fence of `node`, whose lease lasts `lease_ttl` and which heartbeats `balancers`.
    pub fn new(node: NodeId, lease_ttl: Duration, balancers: Vec<SocketAddr>) -> Self {
        Self {
            node,
            lease_ttl,
            lease_until: None,
            balancers,
            views: HashMap::new(),
        }
    }

    /// The store renewed the lease; the renewal was asked for at `asked_at`.
    pub fn lease_renewed(&mut self, asked_at: Instant) {
        let until = asked_at + self.lease_ttl.saturating_sub(margin(self.lease_ttl));
        self.lease_until = Some(self.lease_until.map_or(until, |u| u.max(until)));
    }

    /// A balancer answered the heartbeat sent at `heartbeat_sent_at`: it lists `alive` (every
    /// node it holds up, draining or not), takes a node out after `silence`, has been up for
    /// `balancer_up`, and the report arrived at `now`. A `silence` of zero is a balancer of an
    /// older release that says none of this: it lists nobody (so this node is fenced while it
    /// heartbeats one, and no owner counts as gone by its word).
    pub fn report(
        &mut self,
        balancer: SocketAddr,
        heartbeat_sent_at: Instant,
        alive: Vec<NodeId>,
        silence: Duration,
        balancer_up: Duration,
        now: Instant,
    ) {
        let says = !silence.is_zero();
        let listed = says && alive.contains(&self.node);
        let listed_until =
            listed.then(|| heartbeat_sent_at + silence.saturating_sub(margin(silence)));
        let listed_until = match self.views.get(&balancer) {
            Some(old) if listed => match (old.listed_until, listed_until) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
            _ => listed_until,
        };
        self.views.insert(
            balancer,
            BalancerView {
                listed_until,
                received: now,
                alive,
                silence,
                settled: says && balancer_up >= silence,
            },
        );
    }

    /// Whether this node may act on the dialogs it holds without a confirmed write at `now`.
    pub fn may_act(&self, now: Instant) -> Result<(), Fenced> {
        if self.lease_until.is_none_or(|until| now >= until) {
            return Err(Fenced::LeaseUnconfirmed);
        }
        for balancer in &self.balancers {
            let listed = self
                .views
                .get(balancer)
                .and_then(|v| v.listed_until)
                .is_some_and(|until| now < until);
            if !listed {
                return Err(Fenced::NotListed(*balancer));
            }
        }
        Ok(())
    }

    /// Whether a balancer says, from a report of at most one silence window ago, that `owner`
    /// is no longer alive: `owner` then cannot be acting without a confirmed write, and its
    /// dialogs may be claimed. `false` when no balancer can say so (none configured, no fresh
    /// report, or a balancer not up for a whole window yet).
    pub fn owner_gone(&self, owner: &NodeId, now: Instant) -> bool {
        self.views.values().any(|v| {
            v.settled
                && now.saturating_duration_since(v.received) <= v.silence
                && !v.alive.contains(owner)
        })
    }
}

/// A [`Fence`] shared between the tasks that feed it and those that ask it.
#[derive(Debug, Clone)]
pub struct SharedFence(std::sync::Arc<std::sync::Mutex<Fence>>);

impl SharedFence {
    /// Shares `fence`.
    pub fn new(fence: Fence) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(fence)))
    }

    /// Runs `f` on the fence (a poisoned lock is taken over: the fence holds plain data).
    pub fn with<T>(&self, f: impl FnOnce(&mut Fence) -> T) -> T {
        let mut guard = match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// [`Fence::may_act`].
    pub fn may_act(&self, now: Instant) -> Result<(), Fenced> {
        self.with(|f| f.may_act(now))
    }

    /// [`Fence::owner_gone`].
    pub fn owner_gone(&self, owner: &NodeId, now: Instant) -> bool {
        self.with(|f| f.owner_gone(owner, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }
    const B1: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);
    const B2: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 2);
    const S: Duration = Duration::from_millis(3500);

    #[test]
    fn the_lease_alone_decides_without_balancers_and_ends_a_tenth_early() {
        let t0 = Instant::now();
        let mut f = Fence::new(id("a"), Duration::from_secs(10), vec![]);
        assert_eq!(f.may_act(t0), Err(Fenced::LeaseUnconfirmed));
        f.lease_renewed(t0);
        assert_eq!(f.may_act(t0 + Duration::from_millis(8_999)), Ok(()));
        assert_eq!(
            f.may_act(t0 + Duration::from_secs(9)),
            Err(Fenced::LeaseUnconfirmed)
        );
        // A late answer to an older renewal does not shorten a newer one.
        f.lease_renewed(t0 + Duration::from_secs(5));
        f.lease_renewed(t0);
        assert_eq!(f.may_act(t0 + Duration::from_secs(13)), Ok(()));
        assert!(
            !f.owner_gone(&id("b"), t0),
            "no balancer: only the lease says"
        );
    }

    #[test]
    fn every_balancer_must_list_the_node_within_its_window_from_the_heartbeat_sent() {
        let t0 = Instant::now();
        let mut f = Fence::new(id("a"), Duration::from_secs(60), vec![B1, B2]);
        f.lease_renewed(t0);
        f.report(B1, t0, vec![id("a"), id("b")], S, S, t0);
        assert_eq!(f.may_act(t0), Err(Fenced::NotListed(B2)));
        f.report(B2, t0, vec![id("a")], S, S, t0);
        assert_eq!(f.may_act(t0), Ok(()));
        // 3.5 s window less a tenth, from the heartbeat's sending.
        assert_eq!(f.may_act(t0 + Duration::from_millis(3_149)), Ok(()));
        assert!(f.may_act(t0 + Duration::from_millis(3_150)).is_err());
        // A report that does not list the node fences it at once.
        let t1 = t0 + Duration::from_secs(1);
        f.report(B1, t1, vec![id("a")], S, S, t1);
        f.report(B2, t1, vec![id("b")], S, S, t1);
        assert_eq!(f.may_act(t1), Err(Fenced::NotListed(B2)));
    }

    #[test]
    fn a_frozen_node_wakes_up_fenced() {
        let t0 = Instant::now();
        let mut f = Fence::new(id("a"), Duration::from_secs(10), vec![B1]);
        f.lease_renewed(t0);
        f.report(B1, t0, vec![id("a")], S, S, t0);
        // Frozen 4 s: the lease still runs, but the balancer may have taken it out.
        let woke = t0 + Duration::from_secs(4);
        assert_eq!(f.may_act(woke), Err(Fenced::NotListed(B1)));
        // Listed again by the next report, from the heartbeat sent after the wake-up.
        f.report(B1, woke, vec![id("a")], S, S, woke);
        assert_eq!(f.may_act(woke), Ok(()));
        // A balancer of an older release says nothing: not listed, and nobody is gone.
        f.report(B1, woke, vec![], Duration::ZERO, S, woke);
        assert_eq!(f.may_act(woke), Err(Fenced::NotListed(B1)));
        assert!(!f.owner_gone(&id("b"), woke));
    }

    #[test]
    fn an_owner_is_gone_only_by_a_fresh_report_of_a_settled_balancer() {
        let t0 = Instant::now();
        let mut f = Fence::new(id("a"), Duration::from_secs(10), vec![B1]);
        // A balancer that just restarted lists nobody yet: that says nothing.
        f.report(B1, t0, vec![id("a")], S, Duration::from_secs(1), t0);
        assert!(!f.owner_gone(&id("b"), t0));
        f.report(B1, t0, vec![id("a")], S, S, t0);
        assert!(f.owner_gone(&id("b"), t0));
        assert!(!f.owner_gone(&id("a"), t0));
        // A report older than the window says nothing any more.
        assert!(!f.owner_gone(&id("b"), t0 + S + Duration::from_millis(1)));
    }
}
