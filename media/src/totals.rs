//! Node-wide media counts shared by a [`crate::MediaEngine`] and its relay tasks: a task
//! counts itself live while it exists and, when it ends normally, folds its packet counts and
//! latency histograms into the totals (one lock per relay end, nothing per packet).
//!
//! It only counts; [`crate::metrics`] renders the totals for Prometheus.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::relay::RelayCore;
use crate::stats::LatencyHistogram;

/// What finished relays add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinishedRelays {
    /// Relays that ended normally (stopped or their handle dropped; not aborted ones).
    pub relays: u64,
    /// RTP packets sent to peers.
    pub packets_to_peer: u64,
    /// Datagrams handed to device links.
    pub packets_to_device: u64,
    /// Relay latency device -> peer, every packet of every finished relay.
    pub latency_to_peer: LatencyHistogram,
    /// Relay latency peer -> device.
    pub latency_to_device: LatencyHistogram,
    /// SRTP packets from peers refused: failed authentication (a wrong key, a forged or damaged
    /// packet).
    pub srtp_auth_failed: u64,
    /// SRTP packets from peers refused as replays.
    pub srtp_replayed: u64,
    /// SRTP packets from peers refused for an SSRC past the per-stream limit.
    pub srtp_too_many_ssrcs: u64,
}

/// Counters shared by an engine and its relay tasks.
#[derive(Debug, Default)]
pub struct EngineTotals {
    live: AtomicUsize,
    started: AtomicU64,
    finished: Mutex<FinishedRelays>,
}

impl EngineTotals {
    /// Relay tasks alive now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Relay tasks started since the engine was created.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    /// A copy of what finished relays add up to.
    pub fn finished(&self) -> FinishedRelays {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, FinishedRelays> {
        // Every update is a handful of additions; a poisoned lock holds consistent-enough sums.
        self.finished
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a relay task as started and alive (until [`EngineTotals::task_ended`]).
    pub(crate) fn task_started(&self) {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.live.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts a relay task as no longer alive.
    pub(crate) fn task_ended(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }

    /// Adds the figures of a relay that ended normally.
    pub(crate) fn add_finished(&self, core: &RelayCore) {
        let stats = core.stats();
        let (to_peer, to_device) = core.latency_histograms();
        let mut finished = self.lock();
        finished.relays += 1;
        finished.packets_to_peer += stats.to_peer.packets;
        finished.packets_to_device += stats.to_device.packets;
        finished.latency_to_peer.merge(to_peer);
        finished.latency_to_device.merge(to_device);
        finished.srtp_auth_failed += stats.drops.srtp_auth_failed;
        finished.srtp_replayed += stats.drops.srtp_replayed;
        finished.srtp_too_many_ssrcs += stats.drops.srtp_too_many_ssrcs;
    }
}
