//! The embedded dialog store, the single-node default: a redb file on local disk, so a
//! restarted gateway still holds its confirmed dialogs.
//!
//! All writes go to one dedicated writer thread through a bounded queue, so the async
//! executor never blocks on disk. The writer drains whatever is queued and applies it in one
//! redb write transaction (group commit: one fsync for many writes), then answers each caller.
//! A write is durable once its caller has its answer (the commit uses redb's immediate
//! durability). With a commit interval (`[cluster.store] commit_interval_ms`), a commit that
//! would follow the previous one sooner waits for the rest of the interval and takes every
//! write queued by then: at a high write rate the fsyncs are capped at one per interval, and at
//! a low rate nothing waits. A group that holds a write somebody waits on (`write_batch_now`:
//! the record written before a 2xx leaves, a CSeq written ahead of a request; or one the
//! replicator queued behind the group, [`DialogStore::expedite`]) waits only the shorter
//! waited-on interval (`waited_commit_interval_ms`): the writer is woken to commit it. Reads run on tokio's blocking pool against redb's MVCC read transactions and
//! never wait for the writer. redb's page cache is bounded by [`EmbeddedOptions::cache_bytes`]
//! (`[cluster.store] cache_mib`; redb's own default would be 1 GiB).
//!
//! Tables: `dialogs_v1` (storage key → 8-byte big-endian expiry time, then the record's JSON),
//! `by_device_v1` and `by_owner_v1` (multimaps to storage keys, live records only), and
//! `expiry_v1` (expiry time → storage keys, so a sweep touches only what expired), and
//! `leases_v1` (node id → owner lease expiry time). The rules
//! are those of [`crate::rules`]; this module only stores them. It does not replicate
//! anything to other nodes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redb::{
    Database, MultimapTable, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable,
    ReadableTable, Table, TableDefinition, WriteTransaction,
};
use tokio::sync::{mpsc, oneshot};

use crate::rules::{self, DeleteOutcome, Slot};
use crate::{
    Clock, DialogKey, DialogState, DialogStore, StoreError, StoreFuture, StoreSettings,
    StoredDialog, SweepReport, WriteOp,
};

const DIALOGS: TableDefinition<&str, &[u8]> = TableDefinition::new("dialogs_v1");
const BY_DEVICE: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("by_device_v1");
const BY_OWNER: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("by_owner_v1");
const EXPIRY: MultimapTableDefinition<u64, &str> = MultimapTableDefinition::new("expiry_v1");
const LEASES: TableDefinition<&str, u64> = TableDefinition::new("leases_v1");

/// How many writes the writer queue holds before writers wait.
const WRITER_QUEUE: usize = 1024;
/// The most jobs the writer applies in one transaction.
const MAX_GROUP: usize = 256;

/// The embedded (redb) backend.
#[derive(Debug)]
pub struct EmbeddedDialogStore {
    path: PathBuf,
    /// The database for reads; `None` once closed.
    db: RwLock<Option<Arc<Database>>>,
    /// The writer's queue; `None` once closed.
    writer: RwLock<Option<mpsc::Sender<WriterCommand>>>,
    settings: StoreSettings,
    clock: Arc<dyn Clock>,
    commits: Arc<std::sync::atomic::AtomicU64>,
    /// The writer thread, woken when a job that must not wait out the commit interval (or a
    /// shutdown) is queued while it waits.
    writer_thread: std::thread::Thread,
    /// Set by [`DialogStore::expedite`]: the group held back commits at once.
    hurry: Arc<std::sync::atomic::AtomicBool>,
}

/// One write the writer applies.
#[derive(Debug)]
enum Op {
    Put {
        record: StoredDialog,
        expected_version: Option<u64>,
    },
    Delete {
        key: DialogKey,
        expected_version: Option<u64>,
    },
    Claim {
        key: DialogKey,
        node_id: String,
        expected_epoch: u64,
    },
    RenewLease {
        node_id: String,
        ttl_ms: u64,
    },
    Sweep,
}

/// What a successful op answers.
#[derive(Debug)]
enum Answer {
    Version(u64),
    Record(Box<StoredDialog>),
    Swept(SweepReport),
}

type JobReply = oneshot::Sender<Result<Vec<Result<Answer, StoreError>>, StoreError>>;

#[derive(Debug)]
enum WriterCommand {
    Job {
        ops: Vec<Op>,
        now_ms: u64,
        reply: JobReply,
        /// Commit without waiting for the commit interval.
        urgent: bool,
    },
    Shutdown(oneshot::Sender<()>),
}

fn storage_error(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Backend(format!("redb: {}", e.into()))
}

/// The embedded store's own options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// Group commits: at most one commit per this long (see the module documentation); zero
    /// commits as soon as a write is queued.
    pub commit_interval: Duration,
    /// The same for a group that holds a write somebody waits on (`write_batch_now`, or
    /// [`DialogStore::expedite`]): it is committed at most this long after the previous
    /// commit (never later than `commit_interval` would). Zero: at once.
    pub waited_commit_interval: Duration,
    /// The most memory redb's page cache may hold.
    pub cache_bytes: usize,
}

/// Default page cache: 64 MiB, room for the pages of some 50,000 dialogs.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            commit_interval: Duration::ZERO,
            waited_commit_interval: Duration::ZERO,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

impl EmbeddedDialogStore {
    /// Opens (or creates) the store file at `path`, creating its folder and tables, and starts
    /// the writer thread.
    pub async fn open(
        path: &Path,
        settings: StoreSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        Self::open_with(path, settings, clock, EmbeddedOptions::default()).await
    }

    /// [`EmbeddedDialogStore::open`] with the embedded store's own options (group commits and
    /// the page cache).
    pub async fn open_with(
        path: &Path,
        settings: StoreSettings,
        clock: Arc<dyn Clock>,
        options: EmbeddedOptions,
    ) -> Result<Self, StoreError> {
        settings.validate()?;
        let EmbeddedOptions {
            commit_interval,
            waited_commit_interval,
            cache_bytes,
        } = options;
        let owned = path.to_path_buf();
        let db = tokio::task::spawn_blocking(move || -> Result<Database, StoreError> {
            if let Some(parent) = owned.parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        StoreError::Backend(format!("create {}: {e}", parent.display()))
                    })?;
                }
            }
            let db = Database::builder()
                .set_cache_size(cache_bytes)
                .create(&owned)
                .map_err(|e| {
                    StoreError::Backend(format!("open dialog store {}: {e}", owned.display()))
                })?;
            let txn = db.begin_write().map_err(storage_error)?;
            txn.open_table(DIALOGS).map_err(storage_error)?;
            txn.open_multimap_table(BY_DEVICE).map_err(storage_error)?;
            txn.open_multimap_table(BY_OWNER).map_err(storage_error)?;
            txn.open_multimap_table(EXPIRY).map_err(storage_error)?;
            txn.open_table(LEASES).map_err(storage_error)?;
            txn.commit().map_err(storage_error)?;
            Ok(db)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("open task failed: {e}")))??;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let writer_db = db.clone();
        let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let hurry = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = Writer {
            db: writer_db,
            settings,
            commit_interval,
            waited_commit_interval: waited_commit_interval.min(commit_interval),
            commits: commits.clone(),
            hurry: hurry.clone(),
        };
        let writer_thread = std::thread::Builder::new()
            .name("dialog-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Backend(format!("start writer thread: {e}")))?
            .thread()
            .clone();
        Ok(Self {
            path: path.to_path_buf(),
            db: RwLock::new(Some(db)),
            writer: RwLock::new(Some(tx)),
            settings,
            clock,
            commits,
            writer_thread,
            hurry,
        })
    }

    /// Write transactions committed so far (each one fsync).
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The TTL settings in force.
    pub fn settings(&self) -> StoreSettings {
        self.settings
    }

    fn database(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .read()
            .map_err(|_| StoreError::Backend("store lock poisoned".into()))?
            .clone()
            .ok_or(StoreError::Closed)
    }

    async fn submit(&self, ops: Vec<Op>) -> Result<Vec<Result<Answer, StoreError>>, StoreError> {
        self.submit_job(ops, false).await
    }

    async fn submit_job(
        &self,
        ops: Vec<Op>,
        urgent: bool,
    ) -> Result<Vec<Result<Answer, StoreError>>, StoreError> {
        let sender = self
            .writer
            .read()
            .map_err(|_| StoreError::Backend("store lock poisoned".into()))?
            .clone()
            .ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        let now_ms = self.clock.now_ms();
        sender
            .send(WriterCommand::Job {
                ops,
                now_ms,
                reply,
                urgent,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        if urgent {
            // The writer may be waiting out the commit interval for ordinary writes.
            self.writer_thread.unpark();
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// A batch of writes as one writer job; `urgent` skips the commit interval.
    async fn write_ops(
        &self,
        ops: Vec<WriteOp>,
        urgent: bool,
    ) -> Result<Vec<Result<u64, StoreError>>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let ops = ops
            .into_iter()
            .map(|op| match op {
                WriteOp::Put {
                    record,
                    expected_version,
                } => Op::Put {
                    record,
                    expected_version,
                },
                WriteOp::Delete {
                    key,
                    expected_version,
                } => Op::Delete {
                    key,
                    expected_version,
                },
            })
            .collect();
        Ok(self
            .submit_job(ops, urgent)
            .await?
            .into_iter()
            .map(version_of)
            .collect())
    }

    async fn submit_one(&self, op: Op) -> Result<Answer, StoreError> {
        self.submit(vec![op])
            .await?
            .pop()
            .unwrap_or(Err(StoreError::Backend("writer gave no answer".into())))
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database, u64) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.database()?;
        let now_ms = self.clock.now_ms();
        tokio::task::spawn_blocking(move || f(&db, now_ms))
            .await
            .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
    }

    async fn list_index(
        &self,
        index: MultimapTableDefinition<'static, &'static str, &'static str>,
        by_device: bool,
        value: &str,
        limit: usize,
    ) -> Result<Vec<StoredDialog>, StoreError> {
        let value = value.to_owned();
        self.read(move |db, now_ms| {
            let txn = db.begin_read().map_err(storage_error)?;
            let index = txn.open_multimap_table(index).map_err(storage_error)?;
            let dialogs = txn.open_table(DIALOGS).map_err(storage_error)?;
            let mut out = Vec::new();
            for member in index.get(value.as_str()).map_err(storage_error)? {
                if out.len() >= limit {
                    break;
                }
                let member = member.map_err(storage_error)?;
                let Some(bytes) = dialogs.get(member.value()).map_err(storage_error)? else {
                    continue;
                };
                let slot = decode_slot(bytes.value())?;
                let Some(slot) = rules::visible(Some(&slot), now_ms) else {
                    continue;
                };
                let indexed = if by_device {
                    &slot.record.device_id
                } else {
                    &slot.record.owner
                };
                if slot.record.is_live() && *indexed == value {
                    out.push(slot.record.clone());
                }
            }
            Ok(out)
        })
        .await
    }
}

fn encode_slot(slot: &Slot) -> Result<Vec<u8>, StoreError> {
    let json = slot.record.encode()?;
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&slot.expires_at_ms.to_be_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

fn decode_slot(bytes: &[u8]) -> Result<Slot, StoreError> {
    let (head, json) = bytes
        .split_first_chunk::<8>()
        .ok_or_else(|| StoreError::Corrupt("stored value shorter than its header".into()))?;
    Ok(Slot {
        record: StoredDialog::decode(json)?,
        expires_at_ms: u64::from_be_bytes(*head),
    })
}

/// The writer's open tables inside one write transaction.
struct Tables<'txn> {
    dialogs: Table<'txn, &'static str, &'static [u8]>,
    by_device: MultimapTable<'txn, &'static str, &'static str>,
    by_owner: MultimapTable<'txn, &'static str, &'static str>,
    expiry: MultimapTable<'txn, u64, &'static str>,
    leases: Table<'txn, &'static str, u64>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            dialogs: txn.open_table(DIALOGS).map_err(storage_error)?,
            by_device: txn.open_multimap_table(BY_DEVICE).map_err(storage_error)?,
            by_owner: txn.open_multimap_table(BY_OWNER).map_err(storage_error)?,
            expiry: txn.open_multimap_table(EXPIRY).map_err(storage_error)?,
            leases: txn.open_table(LEASES).map_err(storage_error)?,
        })
    }

    /// The stored slot: outer error = storage failure (aborts the group), inner = this op's
    /// record is corrupt.
    fn slot(&self, storage_key: &str) -> Result<Result<Option<Slot>, StoreError>, StoreError> {
        let Some(bytes) = self.dialogs.get(storage_key).map_err(storage_error)? else {
            return Ok(Ok(None));
        };
        Ok(decode_slot(bytes.value()).map(Some))
    }

    /// Removes the old slot's index and expiry entries.
    fn unindex(&mut self, storage_key: &str, old: &Slot) -> Result<(), StoreError> {
        if old.record.is_live() {
            self.by_device
                .remove(old.record.device_id.as_str(), storage_key)
                .map_err(storage_error)?;
            self.by_owner
                .remove(old.record.owner.as_str(), storage_key)
                .map_err(storage_error)?;
        }
        self.expiry
            .remove(old.expires_at_ms, storage_key)
            .map_err(storage_error)?;
        Ok(())
    }

    /// Replaces `old` by `new` under `storage_key`, moving index and expiry entries.
    fn store(
        &mut self,
        storage_key: &str,
        old: Option<&Slot>,
        new: &Slot,
    ) -> Result<(), StoreError> {
        if let Some(old) = old {
            self.unindex(storage_key, old)?;
        }
        let bytes = encode_slot(new)?;
        self.dialogs
            .insert(storage_key, bytes.as_slice())
            .map_err(storage_error)?;
        self.expiry
            .insert(new.expires_at_ms, storage_key)
            .map_err(storage_error)?;
        if new.record.is_live() {
            self.by_device
                .insert(new.record.device_id.as_str(), storage_key)
                .map_err(storage_error)?;
            self.by_owner
                .insert(new.record.owner.as_str(), storage_key)
                .map_err(storage_error)?;
        }
        Ok(())
    }

    /// Applies one op. Outer error: storage failure; inner: the op's own answer.
    fn apply(
        &mut self,
        op: &Op,
        now_ms: u64,
        settings: &StoreSettings,
    ) -> Result<Result<Answer, StoreError>, StoreError> {
        let key = match op {
            Op::Put { record, .. } => &record.key,
            Op::Delete { key, .. } | Op::Claim { key, .. } => key,
            Op::Sweep => return self.sweep(now_ms).map(|r| Ok(Answer::Swept(r))),
            Op::RenewLease { node_id, ttl_ms } => {
                let expires = now_ms.saturating_add(*ttl_ms);
                self.leases
                    .insert(node_id.as_str(), expires)
                    .map_err(storage_error)?;
                return Ok(Ok(Answer::Version(expires)));
            }
        };
        if let Err(e) = key.validate() {
            return Ok(Err(e));
        }
        let storage_key = key.storage_key();
        let current = match self.slot(&storage_key)? {
            Ok(current) => current,
            Err(e) => return Ok(Err(e)),
        };
        let visible = rules::visible(current.as_ref(), now_ms);
        let outcome = match op {
            Op::Put {
                record,
                expected_version,
            } => rules::put(visible, record, *expected_version, now_ms, settings)
                .map(|new| (Some(new), None)),
            Op::Delete {
                expected_version, ..
            } => rules::delete(visible, *expected_version, now_ms, settings).map(|o| match o {
                DeleteOutcome::Tombstoned(tomb) => (Some(*tomb), None),
                DeleteOutcome::AlreadyTombstone(v) => (None, Some(v)),
            }),
            Op::Claim {
                node_id,
                expected_epoch,
                ..
            } => rules::claim(visible, node_id, *expected_epoch, now_ms, settings)
                .map(|new| (Some(new), None)),
            Op::Sweep | Op::RenewLease { .. } => {
                return Ok(Err(StoreError::Backend("not a dialog write".into())))
            }
        };
        let (new, unchanged_version) = match outcome {
            Ok(o) => o,
            Err(e) => return Ok(Err(e)),
        };
        let Some(new) = new else {
            return Ok(Ok(Answer::Version(unchanged_version.unwrap_or(0))));
        };
        if let Err(e) = encode_slot(&new) {
            return Ok(Err(e));
        }
        self.store(&storage_key, current.as_ref(), &new)?;
        Ok(Ok(match op {
            Op::Claim { .. } => Answer::Record(Box::new(new.record)),
            _ => Answer::Version(new.record.version),
        }))
    }

    fn sweep(&mut self, now_ms: u64) -> Result<SweepReport, StoreError> {
        let mut due: Vec<(u64, String)> = Vec::new();
        for entry in self.expiry.range(..=now_ms).map_err(storage_error)? {
            let (at, members) = entry.map_err(storage_error)?;
            for member in members {
                let member = member.map_err(storage_error)?;
                due.push((at.value(), member.value().to_owned()));
            }
        }
        let mut report = SweepReport::default();
        let mut lapsed = Vec::new();
        for entry in self.leases.iter().map_err(storage_error)? {
            let (node, expires) = entry.map_err(storage_error)?;
            if expires.value() <= now_ms {
                lapsed.push(node.value().to_owned());
            }
        }
        for node in lapsed {
            self.leases.remove(node.as_str()).map_err(storage_error)?;
            report.expired_leases += 1;
        }
        for (at, storage_key) in due {
            self.expiry
                .remove(at, storage_key.as_str())
                .map_err(storage_error)?;
            let slot = match self.slot(&storage_key)? {
                Ok(Some(slot)) => slot,
                // Corrupt records are left for an operator; absent ones need nothing.
                Ok(None) | Err(_) => continue,
            };
            if slot.expires_at_ms != at || !slot.is_expired(now_ms) {
                continue;
            }
            self.unindex(&storage_key, &slot)?;
            self.dialogs
                .remove(storage_key.as_str())
                .map_err(storage_error)?;
            match slot.record.state {
                DialogState::Live => report.expired_live += 1,
                DialogState::Tombstone => report.expired_tombstones += 1,
            }
        }
        Ok(report)
    }
}

struct Job {
    ops: Vec<Op>,
    now_ms: u64,
    reply: JobReply,
    urgent: bool,
}

/// Applies a group of jobs in one write transaction and commits it.
fn apply_group(
    db: &Database,
    jobs: &[Job],
    settings: &StoreSettings,
) -> Result<Vec<Vec<Result<Answer, StoreError>>>, StoreError> {
    let txn = db.begin_write().map_err(storage_error)?;
    let mut answers = Vec::with_capacity(jobs.len());
    {
        let mut tables = Tables::open(&txn)?;
        for job in jobs {
            let mut job_answers = Vec::with_capacity(job.ops.len());
            for op in &job.ops {
                job_answers.push(tables.apply(op, job.now_ms, settings)?);
            }
            answers.push(job_answers);
        }
    }
    txn.commit().map_err(storage_error)?;
    Ok(answers)
}

/// The writer thread's state.
struct Writer {
    db: Arc<Database>,
    settings: StoreSettings,
    commit_interval: Duration,
    waited_commit_interval: Duration,
    commits: Arc<std::sync::atomic::AtomicU64>,
    hurry: Arc<std::sync::atomic::AtomicBool>,
}

impl Writer {
    /// Takes queued commands into one group until the group is full, the queue is empty or a
    /// shutdown comes; returns whether a shutdown came.
    fn gather(
        rx: &mut mpsc::Receiver<WriterCommand>,
        mut next: Option<WriterCommand>,
        jobs: &mut Vec<Job>,
        shutdown: &mut Option<oneshot::Sender<()>>,
    ) {
        while let Some(command) = next.take() {
            match command {
                WriterCommand::Job {
                    ops,
                    now_ms,
                    reply,
                    urgent,
                } => jobs.push(Job {
                    ops,
                    now_ms,
                    reply,
                    urgent,
                }),
                WriterCommand::Shutdown(done) => {
                    *shutdown = Some(done);
                    return;
                }
            }
            if jobs.len() < MAX_GROUP {
                next = rx.try_recv().ok();
            }
        }
    }

    fn run(self, mut rx: mpsc::Receiver<WriterCommand>) {
        let mut shutdown = None;
        let mut last_commit: Option<std::time::Instant> = None;
        // The previous commit went early for a waited-on write the replicator had queued
        // behind it: that write's group commits at once (it does not wait a second interval).
        let mut owed = false;
        while shutdown.is_none() {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut jobs = Vec::new();
            Self::gather(&mut rx, Some(first), &mut jobs, &mut shutdown);
            // Group commit: a commit sooner than one interval after the previous one waits
            // for the rest of the interval and takes what was queued meanwhile. Once the group
            // holds a job somebody waits on, or somebody waits behind it (the replicator
            // wakes this thread), the shorter waited-on interval applies; a full group or a
            // shutdown ends the wait at once.
            let mut hurried = false;
            if let Some(at) = last_commit {
                loop {
                    let holds_waited = jobs.iter().any(|j| j.urgent);
                    hurried |= self.hurry.swap(false, std::sync::atomic::Ordering::AcqRel);
                    let deadline = if holds_waited && owed {
                        at
                    } else if holds_waited || hurried {
                        at + self.waited_commit_interval
                    } else {
                        at + self.commit_interval
                    };
                    let now = std::time::Instant::now();
                    if now >= deadline || shutdown.is_some() || jobs.len() >= MAX_GROUP {
                        break;
                    }
                    std::thread::park_timeout(deadline - now);
                    let next = rx.try_recv().ok();
                    Self::gather(&mut rx, next, &mut jobs, &mut shutdown);
                }
            }
            if jobs.is_empty() {
                continue;
            }
            owed = hurried && !jobs.iter().any(|j| j.urgent);
            // A hurry asked for before this commit is answered by it; one asked for while it
            // runs is for the group after it.
            self.hurry
                .store(false, std::sync::atomic::Ordering::Release);
            let result = apply_group(&self.db, &jobs, &self.settings);
            last_commit = Some(std::time::Instant::now());
            self.commits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match result {
                Ok(answers) => {
                    for (job, answer) in jobs.into_iter().zip(answers) {
                        let _ = job.reply.send(Ok(answer));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "dialog store write transaction failed");
                    for job in jobs {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                }
            }
        }
        rx.close();
        drop(self.db);
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }
}

fn version_of(answer: Result<Answer, StoreError>) -> Result<u64, StoreError> {
    match answer? {
        Answer::Version(v) => Ok(v),
        other => Err(StoreError::Backend(format!("writer answered {other:?}"))),
    }
}

impl DialogStore for EmbeddedDialogStore {
    fn backend_name(&self) -> &'static str {
        "embedded"
    }

    fn get<'a>(&'a self, key: &'a DialogKey) -> StoreFuture<'a, Option<StoredDialog>> {
        Box::pin(async move {
            key.validate()?;
            let storage_key = key.storage_key();
            self.read(move |db, now_ms| {
                let txn = db.begin_read().map_err(storage_error)?;
                let dialogs = txn.open_table(DIALOGS).map_err(storage_error)?;
                let Some(bytes) = dialogs.get(storage_key.as_str()).map_err(storage_error)? else {
                    return Ok(None);
                };
                let slot = decode_slot(bytes.value())?;
                Ok(rules::visible(Some(&slot), now_ms).map(|s| s.record.clone()))
            })
            .await
        })
    }

    fn put<'a>(
        &'a self,
        record: &'a StoredDialog,
        expected_version: Option<u64>,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            record.validate()?;
            version_of(
                self.submit_one(Op::Put {
                    record: record.clone(),
                    expected_version,
                })
                .await,
            )
        })
    }

    fn delete<'a>(
        &'a self,
        key: &'a DialogKey,
        expected_version: Option<u64>,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            key.validate()?;
            version_of(
                self.submit_one(Op::Delete {
                    key: key.clone(),
                    expected_version,
                })
                .await,
            )
        })
    }

    fn claim<'a>(
        &'a self,
        key: &'a DialogKey,
        node_id: &'a str,
        expected_epoch: u64,
    ) -> StoreFuture<'a, StoredDialog> {
        Box::pin(async move {
            key.validate()?;
            rules::validate_node_id(node_id)?;
            match self
                .submit_one(Op::Claim {
                    key: key.clone(),
                    node_id: node_id.to_owned(),
                    expected_epoch,
                })
                .await?
            {
                Answer::Record(record) => Ok(*record),
                other => Err(StoreError::Backend(format!("writer answered {other:?}"))),
            }
        })
    }

    fn list_by_device<'a>(&'a self, device_id: &'a str) -> StoreFuture<'a, Vec<StoredDialog>> {
        Box::pin(async move {
            self.list_index(BY_DEVICE, true, device_id, usize::MAX)
                .await
        })
    }

    fn list_by_owner<'a>(
        &'a self,
        node_id: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredDialog>> {
        Box::pin(async move { self.list_index(BY_OWNER, false, node_id, limit).await })
    }

    fn renew_lease<'a>(&'a self, node_id: &'a str, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            rules::validate_node_id(node_id)?;
            let ttl_ms = rules::lease_ttl_ms(ttl)?;
            version_of(
                self.submit_one(Op::RenewLease {
                    node_id: node_id.to_owned(),
                    ttl_ms,
                })
                .await,
            )
            .map(|_| ())
        })
    }

    fn lease_remaining<'a>(&'a self, node_id: &'a str) -> StoreFuture<'a, Option<Duration>> {
        Box::pin(async move {
            rules::validate_node_id(node_id)?;
            let node_id = node_id.to_owned();
            self.read(move |db, now_ms| {
                let txn = db.begin_read().map_err(storage_error)?;
                let leases = txn.open_table(LEASES).map_err(storage_error)?;
                Ok(leases
                    .get(node_id.as_str())
                    .map_err(storage_error)?
                    .map(|e| e.value())
                    .filter(|&e| e > now_ms)
                    .map(|e| Duration::from_millis(e - now_ms)))
            })
            .await
        })
    }

    fn sweep(&self) -> StoreFuture<'_, SweepReport> {
        Box::pin(async move {
            match self.submit_one(Op::Sweep).await? {
                Answer::Swept(report) => Ok(report),
                other => Err(StoreError::Backend(format!("writer answered {other:?}"))),
            }
        })
    }

    fn write_batch(&self, ops: Vec<WriteOp>) -> StoreFuture<'_, Vec<Result<u64, StoreError>>> {
        Box::pin(self.write_ops(ops, false))
    }

    fn write_batch_now(&self, ops: Vec<WriteOp>) -> StoreFuture<'_, Vec<Result<u64, StoreError>>> {
        Box::pin(self.write_ops(ops, true))
    }

    fn expedite(&self) {
        self.hurry.store(true, std::sync::atomic::Ordering::Release);
        self.writer_thread.unpark();
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let db = self
                .db
                .write()
                .map_err(|_| StoreError::Backend("store lock poisoned".into()))?
                .take();
            drop(db);
            let sender = self
                .writer
                .write()
                .map_err(|_| StoreError::Backend("store lock poisoned".into()))?
                .take();
            if let Some(sender) = sender {
                let (done, finished) = oneshot::channel();
                if sender.send(WriterCommand::Shutdown(done)).await.is_ok() {
                    self.writer_thread.unpark();
                    let _ = finished.await;
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{conformance, ManualClock};

    /// A store in `dir` that commits at most once per `interval`.
    async fn open_grouped(
        dir: &Path,
        clock: &ManualClock,
        interval: Duration,
    ) -> EmbeddedDialogStore {
        EmbeddedDialogStore::open_with(
            &dir.join("d.redb"),
            StoreSettings::default(),
            Arc::new(clock.clone()),
            EmbeddedOptions {
                commit_interval: interval,
                waited_commit_interval: Duration::ZERO,
                ..EmbeddedOptions::default()
            },
        )
        .await
        .unwrap()
    }

    async fn open(path: &Path, clock: &ManualClock) -> EmbeddedDialogStore {
        EmbeddedDialogStore::open(path, StoreSettings::default(), Arc::new(clock.clone()))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(conformance::START_MS);
        let s = open(&dir.path().join("d.redb"), &clock).await;
        let harness = conformance::Harness {
            clock: &clock,
            expiry_follows_clock: true,
            settings: StoreSettings::default(),
        };
        conformance::run_all(&s, harness).await.unwrap();
        s.close().await.unwrap();
    }

    #[tokio::test]
    async fn passes_the_conformance_suite_with_group_commits() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(conformance::START_MS);
        let s = open_grouped(dir.path(), &clock, Duration::from_millis(2)).await;
        let harness = conformance::Harness {
            clock: &clock,
            expiry_follows_clock: true,
            settings: StoreSettings::default(),
        };
        conformance::run_all(&s, harness).await.unwrap();
        s.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_larger_than_its_page_cache_reads_back_every_dialog() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(conformance::START_MS);
        let path = dir.path().join("d.redb");
        let small = EmbeddedOptions {
            cache_bytes: 256 << 10,
            ..EmbeddedOptions::default()
        };
        let open_small = || {
            EmbeddedDialogStore::open_with(
                &path,
                StoreSettings::default(),
                Arc::new(clock.clone()),
                small,
            )
        };
        let s = open_small().await.unwrap();
        let records: Vec<_> = (0..3_000)
            .map(|i| {
                conformance::record(&format!("cache-{i}"), &format!("dev-{}", i % 50), "node-a")
            })
            .collect();
        for chunk in records.chunks(500) {
            let ops = chunk
                .iter()
                .map(|record| WriteOp::Put {
                    record: record.clone(),
                    expected_version: None,
                })
                .collect();
            assert!(s
                .write_batch_now(ops)
                .await
                .unwrap()
                .iter()
                .all(Result::is_ok));
        }
        s.close().await.unwrap();
        // Far more than 256 KiB on disk; reopened with the same cache, everything reads back.
        assert!(std::fs::metadata(&path).unwrap().len() > 1 << 20);
        let s = open_small().await.unwrap();
        for record in records.iter().step_by(7) {
            let stored = s
                .get(&record.key)
                .await
                .unwrap()
                .expect("a dialog is missing");
            assert_eq!(stored.key, record.key);
        }
        assert_eq!(s.list_by_device("dev-7").await.unwrap().len(), 60);
        s.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_arriving_within_one_interval_share_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(conformance::START_MS);
        let s = Arc::new(open_grouped(dir.path(), &clock, Duration::from_millis(200)).await);
        let first = conformance::record("group-0", "dev-g", "node-a");
        s.put(&first, None).await.unwrap();
        let before = s.commits();
        // Twenty writes, each sent 2 ms after the previous one (none waits for another), all
        // within one interval of the first commit: they share one or two commits.
        let mut writes = Vec::new();
        for i in 1..=20 {
            let s = s.clone();
            let record = conformance::record(&format!("group-{i}"), "dev-g", "node-a");
            writes.push(tokio::spawn(async move { s.put(&record, None).await }));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for w in writes {
            w.await.unwrap().unwrap();
        }
        let commits = s.commits() - before;
        assert!(
            (1..=2).contains(&commits),
            "{commits} commits for 20 writes within one interval"
        );
        // Every write is there.
        assert_eq!(s.list_by_device("dev-g").await.unwrap().len(), 21);
        s.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_somebody_waits_on_does_not_wait_for_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(conformance::START_MS);
        let s = open_grouped(dir.path(), &clock, Duration::from_secs(30)).await;
        let record = |id: &str| conformance::record(id, "dev-u", "node-a");
        s.put(&record("urgent-0"), None).await.unwrap();
        // Right after a commit: an ordinary write would wait 30 s; this one is committed now.
        let now = vec![WriteOp::Put {
            record: record("urgent-1"),
            expected_version: None,
        }];
        let written = tokio::time::timeout(Duration::from_secs(10), s.write_batch_now(now))
            .await
            .expect("the urgent write waited for the commit interval")
            .unwrap();
        assert!(written[0].is_ok());
        // An ordinary one does wait.
        let later = vec![WriteOp::Put {
            record: record("urgent-2"),
            expected_version: None,
        }];
        assert!(
            tokio::time::timeout(Duration::from_millis(300), s.write_batch(later))
                .await
                .is_err(),
            "an ordinary write did not wait for the commit interval"
        );
    }

    /// The writer is waiting out the interval for an ordinary write when a write somebody
    /// waits on arrives: it is committed at once, and the ordinary one with it. (It used to
    /// wait for the rest of the interval: under load the gateway's 2xx waited 10 ms on average
    /// for the record written before it.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_somebody_waits_on_wakes_a_writer_waiting_out_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(conformance::START_MS);
        let s = Arc::new(open_grouped(dir.path(), &clock, Duration::from_secs(30)).await);
        let record = |id: &str| conformance::record(id, "dev-w", "node-a");
        s.put(&record("wake-0"), None).await.unwrap();
        // An ordinary write right after a commit: the writer waits out the 30 s interval.
        let ordinary = {
            let s = s.clone();
            let r = record("wake-1");
            tokio::spawn(async move { s.put(&r, None).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!ordinary.is_finished(), "the ordinary write did not wait");
        let now = vec![WriteOp::Put {
            record: record("wake-2"),
            expected_version: None,
        }];
        let written = tokio::time::timeout(Duration::from_secs(10), s.write_batch_now(now))
            .await
            .expect("the urgent write waited for the writer's interval")
            .unwrap();
        assert!(written[0].is_ok());
        let grouped = tokio::time::timeout(Duration::from_secs(10), ordinary)
            .await
            .expect("the ordinary write was not committed with it");
        assert!(grouped.unwrap().is_ok());
        s.close().await.unwrap();
    }

    /// Through the replicator: a batch of ordinary writes is held back by the interval when a
    /// write somebody waits on is queued behind it. The replicator tells the store to commit
    /// now, so the waited-on write lands without waiting out the interval (it used to: under
    /// load the gateway's 2xx waited 10 ms on average for the record written before it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waited_on_write_behind_a_held_back_batch_does_not_wait_the_interval() {
        use crate::replicator::{Replicator, ReplicatorConfig};
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(conformance::START_MS);
        let s = Arc::new(open_grouped(dir.path(), &clock, Duration::from_secs(30)).await);
        let record = |id: &str| conformance::record(id, "dev-r", "node-a");
        s.put(&record("held-0"), None).await.unwrap();
        let store: Arc<dyn DialogStore> = s.clone();
        let rep = Replicator::spawn(store, ReplicatorConfig::default());
        // An ordinary write right after a commit: its batch waits out the 30 s interval.
        rep.replicate(record("held-1")).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ack = rep.replicate_acked(record("held-2")).unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .expect("the waited-on write waited out the interval behind the held batch")
            .unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
        assert_eq!(s.list_by_device("dev-r").await.unwrap().len(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn single_winner_under_concurrency() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(conformance::START_MS);
        let s: Arc<dyn DialogStore> = Arc::new(open(&dir.path().join("d.redb"), &clock).await);
        conformance::concurrent_claims(s.clone(), 32).await.unwrap();
        s.close().await.unwrap();
    }

    #[tokio::test]
    async fn survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("d.redb");
        let clock = ManualClock::new(conformance::START_MS);
        let s = open(&path, &clock).await;
        let kept = conformance::record("restart-kept", "dev-r", "node-a");
        let ended = conformance::record("restart-ended", "dev-r", "node-a");
        s.put(&kept, None).await.unwrap();
        s.put(&ended, None).await.unwrap();
        let claimed = s.claim(&kept.key, "node-b", 0).await.unwrap();
        s.delete(&ended.key, None).await.unwrap();
        s.close().await.unwrap();
        assert_eq!(s.get(&kept.key).await, Err(StoreError::Closed));
        assert_eq!(s.put(&kept, None).await, Err(StoreError::Closed));

        let s = open(&path, &clock).await;
        assert_eq!(s.get(&kept.key).await.unwrap(), Some(claimed.clone()));
        assert_eq!(
            s.get(&ended.key).await.unwrap().map(|r| r.state),
            Some(DialogState::Tombstone)
        );
        assert_eq!(
            s.list_by_device("dev-r").await.unwrap(),
            vec![claimed.clone()]
        );
        assert_eq!(s.list_by_owner("node-b", 10).await.unwrap(), vec![claimed]);
        assert_eq!(s.put(&kept, Some(2)).await, Ok(3));
        // The expiry index survived too: the tombstone is swept once its TTL has passed.
        clock.advance_ms(StoreSettings::default().tombstone_ttl.as_millis() as u64);
        let report = s.sweep().await.unwrap();
        assert_eq!(report.expired_tombstones, 1);
        assert_eq!(report.expired_live, 0);
        s.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_file_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.redb");
        let clock = ManualClock::new(conformance::START_MS);
        let s = open(&path, &clock).await;
        let err = EmbeddedDialogStore::open(&path, StoreSettings::default(), Arc::new(clock))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Backend(ref m) if m.contains("d.redb")),
            "{err}"
        );
        s.close().await.unwrap();
    }

    #[tokio::test]
    async fn corrupt_values_are_errors_not_panics() {
        assert!(matches!(decode_slot(b"1234"), Err(StoreError::Corrupt(_))));
        assert!(matches!(
            decode_slot(b"12345678{not json"),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_grouped_and_all_answered() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(conformance::START_MS);
        let s = Arc::new(open(&dir.path().join("d.redb"), &clock).await);
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let r = conformance::record(&format!("group-{i}"), "dev-g", "node-g");
                s.put(&r, None).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(1));
        }
        assert_eq!(s.list_by_device("dev-g").await.unwrap().len(), 200);
        s.close().await.unwrap();
    }
}
