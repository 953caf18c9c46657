//! Keeps call records: [`CdrWriter`] takes them without waiting (a bounded queue) and one task
//! appends them to a JSON-lines file, rotated by size ([`rotate`]) and flushed whenever the
//! queue runs empty (once per burst, not per record), and adds them to a Redis stream when one
//! is configured. A record that finds the queue full is dropped and counted
//! (`cdr_dropped_total`), never waited for; a write that fails is logged and counted
//! (`cdr_errors_total{sink}`) and the next record tries again.
//!
//! It does not decide what goes in a record, and keeps nothing in memory beyond the queue.

use std::path::{Path, PathBuf};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::{CallRecord, CallRecords};

/// The `[cdr]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CdrConfig {
    /// Write call records at all.
    pub enabled: bool,
    /// The JSON-lines file (relative: inside the node's data directory).
    pub file: PathBuf,
    /// Rotate the file when it would grow past this many bytes.
    pub max_file_bytes: u64,
    /// Rotated files kept (`<file>.1` newest .. `<file>.<keep_files>` oldest).
    pub keep_files: u32,
    /// Records waiting to be written at most; more are dropped and counted.
    pub queue: usize,
    /// Redis URL of a stream to add records to (a cluster's billing reads one stream).
    pub redis_url: Option<String>,
    /// The stream's key.
    pub redis_stream: String,
    /// Entries the stream keeps, about (`XADD ... MAXLEN ~`).
    pub redis_max_len: u64,
}

impl Default for CdrConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            file: PathBuf::from("cdr/calls.jsonl"),
            max_file_bytes: 64 * 1024 * 1024,
            keep_files: 10,
            queue: 16_384,
            redis_url: None,
            redis_stream: "thalamus:cdr".into(),
            redis_max_len: 1_000_000,
        }
    }
}

/// Why the writer could not start.
#[derive(Debug, thiserror::Error)]
pub enum CdrError {
    /// The file or its directory.
    #[error("cdr.file {path}: {source}")]
    File {
        /// Path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The Redis URL does not parse.
    #[error("cdr.redis_url: {0}")]
    Redis(String),
    /// A setting out of range.
    #[error("cdr.{key}: {message}")]
    Config {
        /// Key.
        key: &'static str,
        /// Message.
        message: &'static str,
    },
}

/// A sink label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabel {
    sink: &'static str,
}

/// The writer's counters.
#[derive(Debug, Clone, Default)]
pub struct CdrMetrics {
    written: Family<SinkLabel, Counter>,
    errors: Family<SinkLabel, Counter>,
    dropped: Counter,
}

impl CdrMetrics {
    /// Registers `cdr_written_total{sink}`, `cdr_errors_total{sink}`, `cdr_dropped_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cdr_written",
            "Call records written, by sink (file, redis)",
            self.written.clone(),
        );
        registry.register(
            "cdr_errors",
            "Call records a sink failed to take (file, redis)",
            self.errors.clone(),
        );
        registry.register(
            "cdr_dropped",
            "Call records dropped because the writer's queue was full",
            self.dropped.clone(),
        );
    }

    /// Records written to `sink` so far.
    pub fn written(&self, sink: &'static str) -> u64 {
        self.written.get_or_create(&SinkLabel { sink }).get()
    }
}

enum Msg {
    Record(Box<CallRecord>),
    Flush(oneshot::Sender<()>),
}

/// Takes call records and keeps them (cheap to clone).
#[derive(Debug, Clone)]
pub struct CdrWriter {
    tx: mpsc::Sender<Msg>,
    metrics: CdrMetrics,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl CdrWriter {
    /// Opens the file (`config.file`, inside `data_dir` when relative) and starts the task
    /// that writes to it. Must run inside a tokio runtime.
    pub async fn start(
        config: &CdrConfig,
        data_dir: &Path,
        metrics: CdrMetrics,
    ) -> Result<Self, CdrError> {
        if config.queue == 0 {
            return Err(CdrError::Config {
                key: "queue",
                message: "must be at least 1",
            });
        }
        if config.max_file_bytes < 4096 {
            return Err(CdrError::Config {
                key: "max_file_bytes",
                message: "must be at least 4096",
            });
        }
        let path = if config.file.is_absolute() {
            config.file.clone()
        } else {
            data_dir.join(&config.file)
        };
        let file = FileSink::open(path, config.max_file_bytes, config.keep_files).await?;
        let redis = match &config.redis_url {
            Some(url) => Some(RedisSink {
                client: redis::Client::open(url.as_str())
                    .map_err(|e| CdrError::Redis(e.to_string()))?,
                connection: None,
                stream: config.redis_stream.clone(),
                max_len: config.redis_max_len,
                skip_until: None,
            }),
            None => None,
        };
        let (tx, rx) = mpsc::channel(config.queue);
        tokio::spawn(run(rx, file, redis, metrics.clone()));
        Ok(Self { tx, metrics })
    }

    /// Resolves once every record handed over before the call is written (or failed).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// The writer's counters.
    pub fn metrics(&self) -> &CdrMetrics {
        &self.metrics
    }
}

impl CallRecords for CdrWriter {
    fn record(&self, record: CallRecord) {
        if self.tx.try_send(Msg::Record(Box::new(record))).is_err() {
            self.metrics.dropped.inc();
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<Msg>,
    mut file: FileSink,
    mut redis: Option<RedisSink>,
    metrics: CdrMetrics,
) {
    let file_label = SinkLabel { sink: "file" };
    let redis_label = SinkLabel { sink: "redis" };
    while let Some(msg) = rx.recv().await {
        let record = match msg {
            Msg::Record(r) => r,
            Msg::Flush(done) => {
                flush_file(&mut file, &metrics).await;
                let _ = done.send(());
                continue;
            }
        };
        let line = record.to_json();
        match file.append(&line).await {
            Ok(()) => {
                metrics.written.get_or_create(&file_label).inc();
            }
            Err(e) => {
                metrics.errors.get_or_create(&file_label).inc();
                warn!(error = %e, path = %file.path.display(), "call record not written to the file");
            }
        }
        if let Some(redis) = redis.as_mut() {
            match redis.add(&record, &line).await {
                Ok(()) => {
                    metrics.written.get_or_create(&redis_label).inc();
                }
                Err(e) => {
                    metrics.errors.get_or_create(&redis_label).inc();
                    warn!(error = %e, "call record not added to the Redis stream");
                }
            }
        }
        // One flush per burst of records, not per record: the file is flushed whenever the
        // queue runs empty.
        if rx.is_empty() {
            flush_file(&mut file, &metrics).await;
        }
    }
}

async fn flush_file(file: &mut FileSink, metrics: &CdrMetrics) {
    if let Err(e) = file.flush().await {
        metrics
            .errors
            .get_or_create(&SinkLabel { sink: "file" })
            .inc();
        warn!(error = %e, path = %file.path.display(), "call records not flushed to the file");
    }
}

struct FileSink {
    path: PathBuf,
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    size: u64,
    max_bytes: u64,
    keep: u32,
}

impl FileSink {
    async fn open(path: PathBuf, max_bytes: u64, keep: u32) -> Result<Self, CdrError> {
        let err = |source| CdrError::File {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(err)?;
        }
        let file = open_append(&path).await.map_err(err)?;
        let size = file.metadata().await.map_err(err)?.len();
        Ok(Self {
            path,
            file: Some(tokio::io::BufWriter::new(file)),
            size,
            max_bytes,
            keep,
        })
    }

    /// Appends `line` and a newline, rotating first when the file would pass its size.
    async fn append(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_bytes {
            if let Some(mut f) = self.file.take() {
                f.flush().await?;
            }
            rotate(&self.path, self.keep)?;
            self.size = 0;
        }
        if self.file.is_none() {
            self.file = Some(tokio::io::BufWriter::new(open_append(&self.path).await?));
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        if let Err(e) = file.write_all(&bytes).await {
            // Reopen at the next record.
            self.file = None;
            return Err(e);
        }
        self.size += len;
        Ok(())
    }

    /// Writes out what is buffered (the writer calls it when its queue runs empty).
    async fn flush(&mut self) -> std::io::Result<()> {
        match self.file.as_mut() {
            Some(file) => file.flush().await,
            None => Ok(()),
        }
    }
}

async fn open_append(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
}

/// Rotates `path`: `<path>.<keep-1>` becomes `<path>.<keep>` (the oldest is overwritten), ...,
/// `<path>` becomes `<path>.1`. With `keep` 0 the file is removed. Missing files are skipped.
pub fn rotate(path: &Path, keep: u32) -> std::io::Result<()> {
    let numbered = |n: u32| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    let ignore_missing = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    if keep == 0 {
        return ignore_missing(std::fs::remove_file(path));
    }
    for n in (1..keep).rev() {
        ignore_missing(std::fs::rename(numbered(n), numbered(n + 1)))?;
    }
    ignore_missing(std::fs::rename(path, numbered(1)))
}

struct RedisSink {
    client: redis::Client,
    connection: Option<redis::aio::MultiplexedConnection>,
    stream: String,
    max_len: u64,
    /// After a failure, records skip the stream (counted as errors) until then, so a Redis
    /// that does not answer never slows the file down.
    skip_until: Option<tokio::time::Instant>,
}

/// How long the stream is skipped after a failure.
const REDIS_BACKOFF: std::time::Duration = std::time::Duration::from_secs(5);

impl RedisSink {
    /// `XADD <stream> MAXLEN ~ <max_len> * device <device> record <json>`; connects (again)
    /// when there is no connection, waiting at most 2 s; after a failure the stream is skipped
    /// for [`REDIS_BACKOFF`] (those records are counted as errors; the file has them).
    async fn add(&mut self, record: &CallRecord, line: &str) -> Result<(), String> {
        if self
            .skip_until
            .is_some_and(|t| tokio::time::Instant::now() < t)
        {
            return Err("skipped: the stream failed less than 5 s ago".into());
        }
        let result = self.try_add(record, line).await;
        self.skip_until = result
            .is_err()
            .then(|| tokio::time::Instant::now() + REDIS_BACKOFF);
        result
    }

    async fn try_add(&mut self, record: &CallRecord, line: &str) -> Result<(), String> {
        let timeout = std::time::Duration::from_secs(2);
        if self.connection.is_none() {
            let connect = self.client.get_multiplexed_async_connection();
            let connection = tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            self.connection = Some(connection);
        }
        let Some(connection) = self.connection.as_mut() else {
            return Err("no connection".into());
        };
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.max_len)
            .arg("*")
            .arg("device")
            .arg(&record.device)
            .arg("record")
            .arg(line);
        let result: Result<String, String> =
            match tokio::time::timeout(timeout, cmd.query_async(connection)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("XADD timed out".into()),
            };
        if result.is_err() {
            self.connection = None;
        }
        result.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Direction, SCHEMA_VERSION};

    fn record(n: u32) -> CallRecord {
        CallRecord {
            v: SCHEMA_VERSION,
            call_id: Some(format!("call-{n}")),
            device: "dev".into(),
            call_ref: n,
            direction: Direction::Incoming,
            peer: "sip:alice@example.com".into(),
            start: CallRecord::time(0),
            answer: Some(CallRecord::time(1000)),
            end: CallRecord::time(3000),
            duration_ms: 2000,
            end_reason: "remote_hangup".into(),
            sip_status: None,
            reason: "BYE".into(),
            nodes: vec!["node-1".into()],
            taken_over: false,
            media: None,
        }
    }

    #[test]
    fn rotation_shifts_numbered_files_and_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calls.jsonl");
        for (i, content) in ["a", "b", "c", "d"].iter().enumerate() {
            std::fs::write(&path, content).unwrap();
            rotate(&path, 2).unwrap();
            assert!(!path.exists(), "round {i}");
        }
        let read = |n: u32| std::fs::read_to_string(dir.path().join(format!("calls.jsonl.{n}")));
        assert_eq!(read(1).unwrap(), "d");
        assert_eq!(read(2).unwrap(), "c");
        assert!(read(3).is_err());
    }

    #[tokio::test]
    async fn records_are_lines_and_the_file_rotates_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let config = CdrConfig {
            max_file_bytes: 4096,
            keep_files: 3,
            ..CdrConfig::default()
        };
        let metrics = CdrMetrics::default();
        let writer = CdrWriter::start(&config, dir.path(), metrics.clone())
            .await
            .unwrap();
        let line_len = record(100).to_json().len() as u64 + 1;
        // Enough lines for about two and a half files.
        let n = (4096 / line_len) * 5 / 2;
        for i in 0..n as u32 {
            writer.record(record(100 + i));
        }
        writer.flush().await;
        assert_eq!(metrics.written("file"), n);
        let path = dir.path().join("cdr/calls.jsonl");
        let mut all = Vec::new();
        for name in ["calls.jsonl.2", "calls.jsonl.1", "calls.jsonl"] {
            let text = std::fs::read_to_string(dir.path().join("cdr").join(name)).unwrap();
            assert!(text.len() as u64 <= 4096, "{name} is {} bytes", text.len());
            for line in text.lines() {
                all.push(serde_json::from_str::<CallRecord>(line).unwrap().call_ref);
            }
        }
        // Nothing lost or repeated across the rotations, in order.
        assert_eq!(all, (100..100 + n as u32).collect::<Vec<_>>());
        assert!(path.exists());
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let config = CdrConfig {
            queue: 1,
            ..CdrConfig::default()
        };
        let metrics = CdrMetrics::default();
        let writer = CdrWriter::start(&config, dir.path(), metrics.clone())
            .await
            .unwrap();
        // The writer task cannot run in between (current-thread runtime): the second and
        // later records find the queue full.
        for i in 0..5 {
            writer.record(record(i));
        }
        assert_eq!(metrics.dropped.get(), 4);
        writer.flush().await;
        assert_eq!(metrics.written("file"), 1);
    }

    #[tokio::test]
    async fn bad_settings_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let config = CdrConfig {
            queue: 0,
            ..CdrConfig::default()
        };
        let e = CdrWriter::start(&config, dir.path(), CdrMetrics::default())
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("cdr.queue"), "{e}");
    }
}
