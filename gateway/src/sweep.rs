//! The node's periodic duty: the ownership sweep (devices whose owner in the live set is
//! another node are told to move there) and the load figures the heartbeats carry.
//!
//! It decides nothing about ownership itself (the rendezvous function over the balancers' live
//! set does) and sends nothing but `Goodbye{draining}` to device sessions.

use std::sync::Arc;
use std::time::Duration;

use thalamus_ingress::SessionCommand;
use thalamus_ownership::heartbeat::LiveNode;
use thalamus_ownership::Load;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::shared::NodeShared;

/// The load figures a node's heartbeats carry: device sessions, calls in progress and the
/// process's CPU use (cores busy, from `/proc/self/stat`; 0 where that does not exist), sampled
/// at most once a second.
struct LoadReporter {
    last: Option<(Instant, u64)>,
}

impl LoadReporter {
    /// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
    const TICKS_PER_SEC: f64 = 100.0;

    fn new() -> Self {
        Self { last: None }
    }

    /// User + system CPU ticks of this process so far.
    fn cpu_ticks() -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')')?.1;
        let mut fields = rest.split_whitespace().skip(11);
        let utime: u64 = fields.next()?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        Some(utime + stime)
    }

    /// New figures when a second has passed since the last ones.
    fn sample(&mut self, node: &NodeShared) -> Option<Load> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|(at, _)| now.duration_since(at) < Duration::from_secs(1))
        {
            return None;
        }
        let ticks = Self::cpu_ticks().unwrap_or(0);
        let cpu = match self.last {
            Some((at, before)) => {
                let secs = now.duration_since(at).as_secs_f64();
                let used = ticks.saturating_sub(before) as f64 / Self::TICKS_PER_SEC;
                if secs > 0.0 {
                    (used / secs) as f32
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        self.last = Some((now, ticks));
        Some(Load {
            devices: node.sessions.len() as u64,
            calls: node.bridge.active_calls() as u64,
            cpu,
        })
    }
}

/// Most devices told to move per sweep (so a node that comes back does not get all its
/// devices in one burst).
const MOVES_PER_SWEEP: usize = 200;

/// A live set (eligible nodes, nodes up) and the connections opened by then.
type Settled = (Vec<LiveNode>, Option<Vec<thalamus_ownership::NodeId>>, u64);

/// Moves devices to their owner: every `every`, each device session whose owner in the live
/// set is another node (this node drains, or a node joined or came back) and that has no call
/// here gets `Goodbye{draining}` once; it reconnects and is redirected. Once a sweep leaves no
/// device to move, the sessions are not scanned again until the live set changes or a device
/// connects. Also samples the load figures for the heartbeats. Runs until `shutdown`.
pub(crate) async fn ownership_sweep(
    node: Arc<NodeShared>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Connections already told, so a device that lingers is not told again and again.
    let mut told: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut load = LoadReporter::new();
    // The live set (eligible and up) under which the last sweep left no device to move and
    // none to pin, and the connections opened by then: a device that connects later is looked
    // at even when the live set is the same again (it may have logged in here under another
    // live set, between two sweeps: a node that drained and came back within one interval).
    let mut settled_under: Option<Settled> = None;
    let me = thalamus_ownership::NodeId::new(&node.node_id).ok();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Some(hb) = &node.heartbeats {
            if let Some(figures) = load.sample(&node) {
                hb.set_load(figures);
            }
        }
        let Some(live) = node.fresh_live_set() else {
            // Logins meanwhile are served here without a redirect: look at all again later.
            settled_under = None;
            set_pins(&node, Vec::new());
            continue;
        };
        // A live set that says this node is down (it was frozen or cut off, and is not back
        // in yet), or one it is recovering under, moves nobody: the node checks its sessions
        // first (see `recover_when_out_of_the_live_set`).
        let recovering = node.heartbeats.as_ref().is_some_and(|hb| hb.recovering());
        // Nor does the word of a balancer that just (re)started: it may not know every node
        // yet (logins are still redirected by it; only the devices already here stay).
        if recovering || !live.settled || me.as_ref().is_some_and(|me| live.says_down(me)) {
            settled_under = None;
            continue;
        }
        // Nothing to do while the live set is the one every device was last found settled
        // under (a login meanwhile is redirected by `redirect_for`). Settled means no device
        // owned elsewhere is kept here, so nothing is pinned either.
        let opened = node.sessions.connections_opened();
        if settled_under
            .as_ref()
            .is_some_and(|(eligible, alive, seen)| {
                *eligible == live.eligible && *alive == live.alive && *seen == opened
            })
        {
            continue;
        }
        let mut moved = 0;
        let mut unsettled = false;
        // Devices owned elsewhere whose session stays here for now (a call in progress): the
        // balancers route their requests (new calls, in-dialog requests) here instead of to
        // the owner. A device told to move is not pinned: it logs in at its owner next. (The
        // heartbeat sender keeps the first `MAX_PINS`.)
        let mut pins = Vec::new();
        for device in node.sessions.device_ids() {
            let elsewhere = live
                .owner(&device)
                .is_some_and(|o| o.node.as_str() != node.node_id);
            if !elsewhere {
                // Owned here among the eligible nodes, but not among all the nodes up: a node
                // that is coming back (it drains while it checks itself) will own it. A device
                // with a call here is pinned already, so that its new calls keep coming here
                // from the moment that node takes calls again.
                let owner_up = live
                    .alive
                    .as_ref()
                    .and_then(|alive| thalamus_ownership::owner(&device, alive.iter()))
                    .is_some_and(|o| o.as_str() != node.node_id);
                if owner_up && thalamus_ingress::DeviceRequests::has_calls(&node.bridge, &device) {
                    pins.push(thalamus_ownership::hash::key_hash(&device));
                    unsettled = true;
                }
                continue;
            }
            let Some(handle) = node.sessions.get(&device) else {
                continue;
            };
            if told.contains(&handle.connection_id) {
                unsettled = true;
                continue;
            }
            // Owned elsewhere but kept here for now (a call in progress): look again later.
            let Some(to) = node.owner_elsewhere(&live, &device) else {
                pins.push(thalamus_ownership::hash::key_hash(&device));
                unsettled = true;
                continue;
            };
            if moved >= MOVES_PER_SWEEP {
                unsettled = true;
                continue;
            }
            if handle
                .commands
                .try_send(SessionCommand::Shutdown { draining: true })
                .is_ok()
            {
                info!(%device, owner = %to.node_id, "device moved to its owner node");
                told.insert(handle.connection_id);
                moved += 1;
            } else {
                unsettled = true;
            }
        }
        set_pins(&node, pins);
        settled_under = (!unsettled).then(|| (live.eligible.clone(), live.alive.clone(), opened));
        // Bounded: forget connections that are gone.
        if told.len() > node.sessions.len().saturating_mul(2).max(1024) {
            told.clear();
        }
    }
}

/// The devices the next heartbeats pin here.
fn set_pins(node: &NodeShared, pins: Vec<u64>) {
    if let Some(hb) = &node.heartbeats {
        hb.set_pinned(pins);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn cpu_time_is_read_from_proc() {
        // Burn a little CPU so the count cannot be zero.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        assert!(LoadReporter::cpu_ticks().is_some_and(|t| t > 0));
    }
}
