//! The replication front: the SIP message path hands dialog records (confirmed dialogs, and
//! early ones under `early-and-confirmed`) to a [`Replicator`], which only enqueues; a
//! background task performs the store writes.
//!
//! The queue is bounded: when it is full the write is refused at once (counted as
//! `queue_full`) rather than slowing the message path. The task drains what is queued,
//! coalesces repeated writes of one dialog into the last one, and sends the rest as one
//! [`DialogStore::write_batch`] (a single transaction in the embedded store, a pipeline in
//! Redis). It keeps the version it last wrote for each dialog, so every write is a
//! compare-and-set on what this node wrote before; a conflict means another node took the
//! dialog over, and is reported as a [`ConflictNotice`]. Transient store failures are retried a
//! bounded number of times.
//!
//! [`ReplicationStrategy`] selects what is replicated, as in JAIN SIP HA: `confirmed-dialog`
//! (with application data), `confirmed-dialog-no-app-data`, or `early-and-confirmed` (early
//! dialogs of incoming calls as well). This module does not decide when a dialog is written
//! (the calls do: on the first 180 of an incoming call under `early-and-confirmed`, on 2xx, on
//! target refresh, before using a new local CSeq), does not read from the store, and does not
//! take dialogs over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::{DialogKey, DialogStore, StoreError, StoredDialog, WriteOp};

/// What is replicated (configuration names as in JAIN SIP HA, and `early-and-confirmed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicationStrategy {
    /// `confirmed-dialog`: the dialog and its application data.
    #[default]
    ConfirmedDialog,
    /// `confirmed-dialog-no-app-data`: the dialog without application data.
    ConfirmedDialogNoAppData,
    /// `early-and-confirmed`: as `confirmed-dialog`, and an incoming call's early dialog too
    /// (written as its first provisional response leaves, with the INVITE), so a survivor can
    /// continue a call that was still ringing when its node died.
    EarlyAndConfirmed,
}

impl ReplicationStrategy {
    /// Whether application data is replicated.
    pub fn includes_app_data(self) -> bool {
        self != Self::ConfirmedDialogNoAppData
    }

    /// Whether early dialogs of incoming calls are replicated.
    pub fn includes_early_dialogs(self) -> bool {
        self == Self::EarlyAndConfirmed
    }

    /// The record as this strategy replicates it (application data removed when the strategy
    /// does not carry it).
    pub fn prepare(self, mut record: StoredDialog) -> StoredDialog {
        if !self.includes_app_data() {
            record.app_data = None;
        }
        record
    }
}

/// Settings of a [`Replicator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicatorConfig {
    /// What is replicated.
    pub strategy: ReplicationStrategy,
    /// Writes the queue holds before new ones are refused.
    pub queue_capacity: usize,
    /// Most writes sent to the store in one batch.
    pub max_batch: usize,
    /// Attempts per write on transient store failures.
    pub max_attempts: u32,
    /// Delay before the first retry; grows linearly with the attempt.
    pub retry_delay: Duration,
    /// Most dialogs whose last written version is remembered (bounds memory when the SIP
    /// layer never deletes); past it, writes rely on the record's own version.
    pub max_tracked_dialogs: usize,
    /// Conflict notices buffered for [`Replicator::take_conflicts`]; more are dropped (and
    /// still counted).
    pub conflict_buffer: usize,
}

impl Default for ReplicatorConfig {
    fn default() -> Self {
        Self {
            strategy: ReplicationStrategy::default(),
            queue_capacity: 4096,
            max_batch: 256,
            max_attempts: 3,
            retry_delay: Duration::from_millis(100),
            max_tracked_dialogs: 1 << 20,
            conflict_buffer: 1024,
        }
    }
}

/// Why a write was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplicateError {
    /// The queue is full: the store is slower than the dialogs change.
    #[error("replication queue full")]
    QueueFull,
    /// The replicator has stopped.
    #[error("replicator stopped")]
    Stopped,
}

/// A write that lost its compare-and-set: another node wrote or claimed the dialog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictNotice {
    /// The dialog.
    pub key: DialogKey,
    /// The version the store holds (`None`: absent).
    pub current: Option<u64>,
    /// Whether the lost write was a delete.
    pub was_delete: bool,
}

/// A snapshot of the replicator's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicatorStats {
    /// Writes accepted into the queue.
    pub queued: u64,
    /// Writes replaced by a later write of the same dialog before reaching the store.
    pub coalesced: u64,
    /// Writes the store applied.
    pub written: u64,
    /// Writes that lost their compare-and-set.
    pub conflicts: u64,
    /// Writes that failed for another reason (after retries).
    pub errors: u64,
    /// Writes refused because the queue was full.
    pub queue_full: u64,
    /// Batches sent to the store.
    pub batches: u64,
}

/// The counters, as Prometheus counters (cheap to clone, shared with the task).
#[derive(Debug, Clone, Default)]
struct Counters {
    queued: Counter,
    coalesced: Counter,
    written: Counter,
    conflicts: Counter,
    errors: Counter,
    queue_full: Counter,
    batches: Counter,
}

#[derive(Debug)]
enum Write {
    Put(Box<StoredDialog>),
    Delete(DialogKey),
}

impl Write {
    fn key(&self) -> &DialogKey {
        match self {
            Self::Put(r) => &r.key,
            Self::Delete(k) => k,
        }
    }
}

/// What one write came to, as told to whoever waits on it
/// ([`Replicator::replicate_acked`]): the version the store now holds, or why it failed.
pub type WriteOutcome = Result<u64, StoreError>;

/// Waits for the outcome of one write queued with [`Replicator::replicate_acked`].
pub type WriteAck = oneshot::Receiver<WriteOutcome>;

type AckSender = oneshot::Sender<WriteOutcome>;

#[derive(Debug)]
enum Command {
    Write(Write, Option<AckSender>),
    Flush(oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
}

/// The asynchronous replication front. Cheap calls from the message path; one background
/// task per replicator.
#[derive(Debug)]
pub struct Replicator {
    tx: mpsc::Sender<Command>,
    strategy: ReplicationStrategy,
    counters: Counters,
    conflicts: Mutex<Option<mpsc::Receiver<ConflictNotice>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Replicator {
    /// Starts the background task writing to `store`. Must be called inside a tokio runtime.
    pub fn spawn(store: Arc<dyn DialogStore>, config: ReplicatorConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let (notice_tx, notice_rx) = mpsc::channel(config.conflict_buffer.max(1));
        let counters = Counters::default();
        let worker = Worker {
            store,
            config,
            counters: counters.clone(),
            versions: HashMap::new(),
            notices: notice_tx,
        };
        let task = tokio::spawn(worker.run(rx));
        Self {
            tx,
            strategy: config.strategy,
            counters,
            conflicts: Mutex::new(Some(notice_rx)),
            task: Mutex::new(Some(task)),
        }
    }

    fn enqueue(&self, write: Write, ack: Option<AckSender>) -> Result<(), ReplicateError> {
        match self.tx.try_send(Command::Write(write, ack)) {
            Ok(()) => {
                self.counters.queued.inc();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters.queue_full.inc();
                Err(ReplicateError::QueueFull)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ReplicateError::Stopped),
        }
    }

    /// Queues a write of `record` (never waits). The write is a compare-and-set on the
    /// version this replicator last wrote for the dialog, or on `record.version` when that is
    /// higher (after a claim, pass the claimed record); version 0 with nothing written before
    /// means create.
    pub fn replicate(&self, record: StoredDialog) -> Result<(), ReplicateError> {
        self.enqueue(Write::Put(Box::new(self.strategy.prepare(record))), None)
    }

    /// [`Replicator::replicate`], with a receiver that tells when the write reached the store
    /// and how it went (the new version, or the error: a [`StoreError::Conflict`] means another
    /// node owns the dialog now). For writes that must land before the caller acts, such as a
    /// local CSeq written before it is used; the caller bounds its wait. When a later write of
    /// the same dialog replaces this one in the queue, the receiver gets the later write's
    /// outcome.
    pub fn replicate_acked(&self, record: StoredDialog) -> Result<WriteAck, ReplicateError> {
        let (ack, outcome) = oneshot::channel();
        self.enqueue(
            Write::Put(Box::new(self.strategy.prepare(record))),
            Some(ack),
        )?;
        Ok(outcome)
    }

    /// Queues the end of a dialog: its record becomes a tombstone (never waits).
    pub fn remove(&self, key: DialogKey) -> Result<(), ReplicateError> {
        self.enqueue(Write::Delete(key), None)
    }

    /// Waits until every write queued before this call has reached the store (or failed).
    pub async fn flush(&self) -> Result<(), ReplicateError> {
        let (done, finished) = oneshot::channel();
        self.tx
            .send(Command::Flush(done))
            .await
            .map_err(|_| ReplicateError::Stopped)?;
        finished.await.map_err(|_| ReplicateError::Stopped)
    }

    /// Writes out everything queued, then stops the task; later writes get
    /// [`ReplicateError::Stopped`].
    pub async fn shutdown(&self) {
        let (done, finished) = oneshot::channel();
        if self.tx.send(Command::Stop(done)).await.is_ok() {
            let _ = finished.await;
        }
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// The conflict notices (once; later calls get `None`).
    pub fn take_conflicts(&self) -> Option<mpsc::Receiver<ConflictNotice>> {
        self.conflicts.lock().ok().and_then(|mut c| c.take())
    }

    /// The strategy in force.
    pub fn strategy(&self) -> ReplicationStrategy {
        self.strategy
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ReplicatorStats {
        let c = &self.counters;
        ReplicatorStats {
            queued: c.queued.get(),
            coalesced: c.coalesced.get(),
            written: c.written.get(),
            conflicts: c.conflicts.get(),
            errors: c.errors.get(),
            queue_full: c.queue_full.get(),
            batches: c.batches.get(),
        }
    }

    /// Registers the counters as `replication_*_total` in `registry` (the node's registry,
    /// prefixed `thalamus`, so `thalamus_replication_*_total`).
    pub fn register_metrics(&self, registry: &mut Registry) {
        let c = &self.counters;
        let sub = registry.sub_registry_with_prefix("replication");
        sub.register(
            "queued",
            "Dialog writes accepted into the replication queue",
            c.queued.clone(),
        );
        sub.register(
            "coalesced",
            "Dialog writes replaced by a later write of the same dialog",
            c.coalesced.clone(),
        );
        sub.register(
            "written",
            "Dialog writes applied by the store",
            c.written.clone(),
        );
        sub.register(
            "conflicts",
            "Dialog writes that lost their compare-and-set",
            c.conflicts.clone(),
        );
        sub.register(
            "errors",
            "Dialog writes that failed after retries",
            c.errors.clone(),
        );
        sub.register(
            "queue_full",
            "Dialog writes refused because the queue was full",
            c.queue_full.clone(),
        );
        sub.register(
            "batches",
            "Batches sent to the dialog store",
            c.batches.clone(),
        );
    }
}

struct Worker {
    store: Arc<dyn DialogStore>,
    config: ReplicatorConfig,
    counters: Counters,
    /// The version this replicator last wrote, per dialog.
    versions: HashMap<DialogKey, u64>,
    notices: mpsc::Sender<ConflictNotice>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let max_batch = self.config.max_batch.max(1);
        let mut stopped = Vec::new();
        // Commands received while a batch was being written, in order: the next batch's.
        let mut held: std::collections::VecDeque<Command> = std::collections::VecDeque::new();
        let mut open = true;
        loop {
            let first = match held.pop_front() {
                Some(command) => command,
                None if open => match rx.recv().await {
                    Some(command) => command,
                    None => break,
                },
                None => break,
            };
            let mut batch: Vec<(Write, Vec<AckSender>)> = Vec::new();
            let mut positions: HashMap<DialogKey, usize> = HashMap::new();
            let mut flushes = Vec::new();
            let mut next = Some(first);
            while let Some(command) = next.take() {
                match command {
                    Command::Write(write, ack) => {
                        if let Some(&at) = positions.get(write.key()) {
                            self.counters.coalesced.inc();
                            if let Some(slot) = batch.get_mut(at) {
                                slot.0 = write;
                                slot.1.extend(ack);
                            }
                        } else {
                            positions.insert(write.key().clone(), batch.len());
                            batch.push((write, ack.into_iter().collect()));
                        }
                    }
                    Command::Flush(done) => {
                        flushes.push(done);
                        break;
                    }
                    Command::Stop(done) => {
                        // Refuse new writes; the ones already queued are still written.
                        rx.close();
                        stopped.push(done);
                    }
                }
                if batch.len() < max_batch {
                    next = held.pop_front().or_else(|| rx.try_recv().ok());
                }
            }
            if !batch.is_empty() {
                // While the batch is written (the store may hold it back to group commits),
                // the queue is still read: a write somebody waits on (the record before a
                // 2xx, a CSeq written ahead) must not wait out the batch's commit interval
                // behind it, so the store is told to commit now. What is read waits for the
                // next batch, at most one batch's worth (then the queue pushes back).
                let store = self.store.clone();
                let write = self.write(batch);
                tokio::pin!(write);
                loop {
                    tokio::select! {
                        biased;
                        () = &mut write => break,
                        command = rx.recv(), if open && held.len() < max_batch => match command {
                            Some(command) => {
                                if matches!(&command, Command::Write(_, Some(_))) {
                                    store.expedite();
                                }
                                held.push_back(command);
                            }
                            None => open = false,
                        },
                    }
                }
            }
            for done in flushes {
                let _ = done.send(());
            }
        }
        for done in stopped {
            let _ = done.send(());
        }
    }

    fn expected_version(&self, write: &Write) -> Option<u64> {
        let known = self.versions.get(write.key()).copied();
        match write {
            Write::Put(record) => {
                let own = (record.version > 0).then_some(record.version);
                known.max(own)
            }
            Write::Delete(_) => known,
        }
    }

    async fn write(&mut self, batch: Vec<(Write, Vec<AckSender>)>) {
        let mut pending: Vec<(WriteOp, bool, Vec<AckSender>)> = batch
            .into_iter()
            .map(|(w, acks)| {
                let expected_version = self.expected_version(&w);
                match w {
                    Write::Put(record) => (
                        WriteOp::Put {
                            record: *record,
                            expected_version,
                        },
                        false,
                        acks,
                    ),
                    Write::Delete(key) => (
                        WriteOp::Delete {
                            key,
                            expected_version,
                        },
                        true,
                        acks,
                    ),
                }
            })
            .collect();
        let tell = |acks: Vec<AckSender>, outcome: WriteOutcome| {
            for ack in acks {
                let _ = ack.send(outcome.clone());
            }
        };
        let mut attempt = 0;
        while !pending.is_empty() {
            attempt += 1;
            let last_attempt = attempt >= self.config.max_attempts.max(1);
            self.counters.batches.inc();
            let ops: Vec<WriteOp> = pending.iter().map(|(op, _, _)| op.clone()).collect();
            // Somebody waits on an acked write: the store must not hold the batch back.
            let waited_on = pending.iter().any(|(_, _, acks)| !acks.is_empty());
            let written = if waited_on {
                self.store.write_batch_now(ops).await
            } else {
                self.store.write_batch(ops).await
            };
            let results = match written {
                Ok(results) if results.len() == pending.len() => results,
                Ok(results) => {
                    tracing::error!(
                        sent = pending.len(),
                        answered = results.len(),
                        "dialog store answered a batch short"
                    );
                    self.counters.errors.inc_by(pending.len() as u64);
                    for (_, _, acks) in pending {
                        tell(acks, Err(StoreError::Backend("short batch answer".into())));
                    }
                    return;
                }
                Err(e) if e.is_transient() && !last_attempt => {
                    tracing::warn!(error = %e, attempt, "dialog store unavailable; retrying the batch");
                    tokio::time::sleep(self.config.retry_delay * attempt).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, writes = pending.len(), "dialog store batch failed");
                    self.counters.errors.inc_by(pending.len() as u64);
                    for (_, _, acks) in pending {
                        tell(acks, Err(e.clone()));
                    }
                    return;
                }
            };
            let mut retry = Vec::new();
            for ((op, is_delete, acks), result) in pending.into_iter().zip(results) {
                let key = op.key().clone();
                match result {
                    Ok(version) => {
                        tell(acks, Ok(version));
                        self.counters.written.inc();
                        if is_delete {
                            self.versions.remove(&key);
                        } else if self.versions.len() < self.config.max_tracked_dialogs
                            || self.versions.contains_key(&key)
                        {
                            self.versions.insert(key, version);
                        }
                    }
                    Err(StoreError::NotFound) if is_delete => {
                        // Already gone (expired or never written): nothing to end.
                        tell(acks, Ok(0));
                        self.counters.written.inc();
                        self.versions.remove(&key);
                    }
                    Err(StoreError::Conflict { current }) => {
                        self.counters.conflicts.inc();
                        self.versions.remove(&key);
                        tracing::info!(dialog = %key, ?current, "dialog write lost its compare-and-set");
                        tell(acks, Err(StoreError::Conflict { current }));
                        let _ = self.notices.try_send(ConflictNotice {
                            key,
                            current,
                            was_delete: is_delete,
                        });
                    }
                    Err(e) if e.is_transient() && !last_attempt => {
                        retry.push((op, is_delete, acks))
                    }
                    Err(e) => {
                        tell(acks, Err(e.clone()));
                        self.counters.errors.inc();
                        tracing::error!(dialog = %key, error = %e, "dialog write failed");
                    }
                }
            }
            if !retry.is_empty() {
                tokio::time::sleep(self.config.retry_delay * attempt).await;
            }
            pending = retry;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::record;
    use crate::memory::MemoryDialogStore;
    use crate::{DialogState, ManualClock, StoreFuture, StoreSettings, SweepReport};
    use std::sync::atomic::{AtomicU32, Ordering};

    fn memory() -> Arc<MemoryDialogStore> {
        Arc::new(MemoryDialogStore::new(
            StoreSettings::default(),
            Arc::new(ManualClock::new(1_000)),
        ))
    }

    #[tokio::test]
    async fn coalesces_repeated_writes_and_flushes() {
        let store = memory();
        let rep = Replicator::spawn(store.clone(), ReplicatorConfig::default());
        let mut r = record("coal-1", "dev", "node-a");
        for i in 0..10 {
            r.call_ref = i;
            rep.replicate(r.clone()).unwrap();
        }
        rep.replicate(record("coal-2", "dev", "node-a")).unwrap();
        rep.flush().await.unwrap();
        let got = store.get(&r.key).await.unwrap().unwrap();
        assert_eq!((got.version, got.call_ref), (1, 9));
        let stats = rep.stats();
        assert_eq!(stats.queued, 11);
        assert_eq!(stats.coalesced, 9);
        assert_eq!(stats.written, 2);
        assert_eq!(stats.batches, 1);
        assert_eq!((stats.conflicts, stats.errors, stats.queue_full), (0, 0, 0));
    }

    #[tokio::test]
    async fn tracks_versions_across_writes_and_removes() {
        let store = memory();
        let rep = Replicator::spawn(store.clone(), ReplicatorConfig::default());
        let mut r = record("track-1", "dev", "node-a");
        rep.replicate(r.clone()).unwrap();
        rep.flush().await.unwrap();
        r.media.remote_sdp = "v=0\r\n".into();
        rep.replicate(r.clone()).unwrap();
        rep.flush().await.unwrap();
        assert_eq!(store.get(&r.key).await.unwrap().unwrap().version, 2);
        rep.remove(r.key.clone()).unwrap();
        rep.flush().await.unwrap();
        let got = store.get(&r.key).await.unwrap().unwrap();
        assert_eq!((got.version, got.state), (3, DialogState::Tombstone));
        // Removing a dialog that was never stored is not an error.
        rep.remove(DialogKey::new("never", "a", "b")).unwrap();
        rep.flush().await.unwrap();
        assert_eq!(rep.stats().written, 4);
        assert_eq!(rep.stats().errors, 0);
    }

    #[tokio::test]
    async fn a_dialog_created_and_ended_in_one_batch_writes_nothing() {
        let store = memory();
        let rep = Replicator::spawn(store.clone(), ReplicatorConfig::default());
        let r = record("short-1", "dev", "node-a");
        rep.replicate(r.clone()).unwrap();
        rep.remove(r.key.clone()).unwrap();
        rep.flush().await.unwrap();
        assert_eq!(store.get(&r.key).await.unwrap(), None);
        let stats = rep.stats();
        assert_eq!((stats.coalesced, stats.errors, stats.conflicts), (1, 0, 0));
    }

    #[tokio::test]
    async fn a_claimed_record_continues_from_its_version() {
        let store = memory();
        let r = record("claimed-1", "dev", "node-a");
        store.put(&r, None).await.unwrap();
        let claimed = store.claim(&r.key, "node-b", 0).await.unwrap();
        let rep = Replicator::spawn(store.clone(), ReplicatorConfig::default());
        rep.replicate(claimed).unwrap();
        rep.flush().await.unwrap();
        let got = store.get(&r.key).await.unwrap().unwrap();
        assert_eq!((got.version, got.owner.as_str()), (3, "node-b"));
    }

    #[tokio::test]
    async fn no_app_data_strategy_strips_it() {
        let store = memory();
        let config = ReplicatorConfig {
            strategy: ReplicationStrategy::ConfirmedDialogNoAppData,
            ..ReplicatorConfig::default()
        };
        let rep = Replicator::spawn(store.clone(), config);
        let r = record("strip-1", "dev", "node-a");
        assert!(r.app_data.is_some());
        rep.replicate(r.clone()).unwrap();
        rep.flush().await.unwrap();
        assert_eq!(store.get(&r.key).await.unwrap().unwrap().app_data, None);

        let store = memory();
        let rep = Replicator::spawn(store.clone(), ReplicatorConfig::default());
        rep.replicate(r.clone()).unwrap();
        rep.flush().await.unwrap();
        assert_eq!(
            store.get(&r.key).await.unwrap().unwrap().app_data,
            r.app_data
        );
    }

    #[test]
    fn strategy_names() {
        #[derive(Deserialize)]
        struct C {
            s: ReplicationStrategy,
        }
        let c: C = toml::from_str("s = \"confirmed-dialog\"").unwrap();
        assert_eq!(c.s, ReplicationStrategy::ConfirmedDialog);
        let c: C = toml::from_str("s = \"confirmed-dialog-no-app-data\"").unwrap();
        assert_eq!(c.s, ReplicationStrategy::ConfirmedDialogNoAppData);
        assert!(toml::from_str::<C>("s = \"early-dialog\"").is_err());
        assert_eq!(
            serde_json::to_string(&ReplicationStrategy::ConfirmedDialogNoAppData).unwrap(),
            "\"confirmed-dialog-no-app-data\""
        );
        assert!(ReplicationStrategy::ConfirmedDialog.includes_app_data());
        assert!(!ReplicationStrategy::ConfirmedDialogNoAppData.includes_app_data());
        assert!(ReplicationStrategy::EarlyAndConfirmed.includes_app_data());
        assert!(ReplicationStrategy::EarlyAndConfirmed.includes_early_dialogs());
        assert!(!ReplicationStrategy::ConfirmedDialog.includes_early_dialogs());
        let c: C = toml::from_str("s = \"early-and-confirmed\"").unwrap();
        assert_eq!(c.s, ReplicationStrategy::EarlyAndConfirmed);
    }

    #[tokio::test]
    async fn conflicts_are_counted_and_reported() {
        let store = memory();
        let r = record("conflict-1", "dev", "node-other");
        store.put(&r, None).await.unwrap();
        let rep = Replicator::spawn(store.clone(), ReplicatorConfig::default());
        let mut notices = rep.take_conflicts().unwrap();
        assert!(rep.take_conflicts().is_none());
        rep.replicate(record("conflict-1", "dev", "node-a"))
            .unwrap();
        rep.flush().await.unwrap();
        assert_eq!(rep.stats().conflicts, 1);
        assert_eq!(
            notices.try_recv().unwrap(),
            ConflictNotice {
                key: r.key.clone(),
                current: Some(1),
                was_delete: false
            }
        );
        assert_eq!(
            store.get(&r.key).await.unwrap().unwrap().owner,
            "node-other"
        );
    }

    #[tokio::test]
    async fn acked_writes_tell_their_outcome() {
        let store = memory();
        let rep = Replicator::spawn(store.clone(), ReplicatorConfig::default());
        let r = record("ack-1", "dev", "node-a");
        let first = rep.replicate_acked(r.clone()).unwrap();
        // Replaced in the queue by a later write of the same dialog: both learn its outcome.
        let mut later = r.clone();
        later.call_ref = 7;
        let second = rep.replicate_acked(later).unwrap();
        assert_eq!(first.await.unwrap(), Ok(1));
        assert_eq!(second.await.unwrap(), Ok(1));
        assert_eq!(store.get(&r.key).await.unwrap().unwrap().call_ref, 7);
        let next = rep.replicate_acked(r.clone()).unwrap();
        assert_eq!(next.await.unwrap(), Ok(2));

        // Another node claimed the dialog: the waiter learns of the conflict.
        store.claim(&r.key, "node-b", 0).await.unwrap();
        let lost = rep.replicate_acked(r.clone()).unwrap();
        assert_eq!(
            lost.await.unwrap(),
            Err(StoreError::Conflict { current: Some(3) })
        );
        assert_eq!(store.get(&r.key).await.unwrap().unwrap().owner, "node-b");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_without_waiting() {
        let store = memory();
        let config = ReplicatorConfig {
            queue_capacity: 2,
            ..ReplicatorConfig::default()
        };
        let rep = Replicator::spawn(store.clone(), config);
        // The current-thread runtime does not run the task until this test awaits.
        rep.replicate(record("full-1", "dev", "n")).unwrap();
        rep.replicate(record("full-2", "dev", "n")).unwrap();
        assert_eq!(
            rep.replicate(record("full-3", "dev", "n")),
            Err(ReplicateError::QueueFull)
        );
        assert_eq!(rep.stats().queue_full, 1);
        rep.flush().await.unwrap();
        assert_eq!(rep.stats().written, 2);
        rep.replicate(record("full-3", "dev", "n")).unwrap();
        rep.flush().await.unwrap();
        assert_eq!(rep.stats().written, 3);
    }

    /// A store whose batches fail with `Unavailable` a given number of times.
    #[derive(Debug)]
    struct Flaky {
        inner: Arc<MemoryDialogStore>,
        failures_left: AtomicU32,
    }

    impl DialogStore for Flaky {
        fn backend_name(&self) -> &'static str {
            "flaky"
        }
        fn get<'a>(&'a self, key: &'a DialogKey) -> StoreFuture<'a, Option<StoredDialog>> {
            self.inner.get(key)
        }
        fn put<'a>(&'a self, r: &'a StoredDialog, e: Option<u64>) -> StoreFuture<'a, u64> {
            self.inner.put(r, e)
        }
        fn delete<'a>(&'a self, k: &'a DialogKey, e: Option<u64>) -> StoreFuture<'a, u64> {
            self.inner.delete(k, e)
        }
        fn claim<'a>(
            &'a self,
            k: &'a DialogKey,
            n: &'a str,
            e: u64,
        ) -> StoreFuture<'a, StoredDialog> {
            self.inner.claim(k, n, e)
        }
        fn list_by_device<'a>(&'a self, d: &'a str) -> StoreFuture<'a, Vec<StoredDialog>> {
            self.inner.list_by_device(d)
        }
        fn list_by_owner<'a>(&'a self, n: &'a str, l: usize) -> StoreFuture<'a, Vec<StoredDialog>> {
            self.inner.list_by_owner(n, l)
        }
        fn renew_lease<'a>(&'a self, n: &'a str, ttl: Duration) -> StoreFuture<'a, ()> {
            self.inner.renew_lease(n, ttl)
        }
        fn lease_remaining<'a>(&'a self, n: &'a str) -> StoreFuture<'a, Option<Duration>> {
            self.inner.lease_remaining(n)
        }
        fn sweep(&self) -> StoreFuture<'_, SweepReport> {
            self.inner.sweep()
        }
        fn write_batch(&self, ops: Vec<WriteOp>) -> StoreFuture<'_, Vec<Result<u64, StoreError>>> {
            let fail = self
                .failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if fail {
                return Box::pin(async { Err(StoreError::Unavailable("flaky".into())) });
            }
            self.inner.write_batch(ops)
        }
        fn close(&self) -> StoreFuture<'_, ()> {
            self.inner.close()
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_then_counted() {
        let inner = memory();
        let flaky = Arc::new(Flaky {
            inner: inner.clone(),
            failures_left: AtomicU32::new(2),
        });
        let config = ReplicatorConfig {
            retry_delay: Duration::from_millis(1),
            max_attempts: 3,
            ..ReplicatorConfig::default()
        };
        let rep = Replicator::spawn(flaky.clone(), config);
        let r = record("flaky-1", "dev", "n");
        rep.replicate(r.clone()).unwrap();
        rep.flush().await.unwrap();
        assert_eq!(inner.get(&r.key).await.unwrap().unwrap().version, 1);
        assert_eq!(
            (rep.stats().written, rep.stats().errors, rep.stats().batches),
            (1, 0, 3)
        );

        flaky.failures_left.store(5, Ordering::SeqCst);
        rep.replicate(record("flaky-2", "dev", "n")).unwrap();
        rep.flush().await.unwrap();
        assert_eq!(rep.stats().errors, 1);
        assert!(inner
            .get(&DialogKey::new("flaky-2", "lt-flaky-2", "rt-flaky-2"))
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn shutdown_writes_what_was_queued_then_refuses() {
        let store = memory();
        let rep = Replicator::spawn(store.clone(), ReplicatorConfig::default());
        let r = record("stop-1", "dev", "n");
        rep.replicate(r.clone()).unwrap();
        rep.shutdown().await;
        assert!(store.get(&r.key).await.unwrap().is_some());
        assert_eq!(
            rep.replicate(record("stop-2", "dev", "n")),
            Err(ReplicateError::Stopped)
        );
        assert_eq!(rep.flush().await, Err(ReplicateError::Stopped));
    }

    #[tokio::test]
    async fn counters_are_exported() {
        let rep = Replicator::spawn(memory(), ReplicatorConfig::default());
        rep.replicate(record("metric-1", "dev", "n")).unwrap();
        rep.flush().await.unwrap();
        let mut registry = Registry::with_prefix("thalamus");
        rep.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("thalamus_replication_written_total 1"),
            "{text}"
        );
        assert!(
            text.contains("thalamus_replication_queue_full_total 0"),
            "{text}"
        );
    }
}
