//! The Redis dialog store, the cluster backend: redis-rs on tokio through a reconnecting
//! [`ConnectionManager`], to one Redis master given by URL or found through Sentinel.
//!
//! Key layout (prefix configurable, default `thalamus:`):
//! - `<prefix>dlg:<storage key>`: a hash per dialog. Fields `v` (version), `s` (`L` live or
//!   `T` tombstone), `o` (owner node), `e` (epoch), `d` (device), `t` (updated-at ms), `b` (the
//!   record's schema-1 JSON as last put), `k` (token of the last write). `v`, `s`, `o`, `e` and
//!   `t` are authoritative; the JSON carries the rest. The key has a TTL: the live TTL, or the
//!   tombstone TTL after a delete.
//! - `<prefix>dev:<device>` and `<prefix>own:<node>`: sets of storage keys of live dialogs,
//!   with a TTL no shorter than their longest-lived member's.
//! - `<prefix>lease:<node>`: the node's owner lease, a string (the renewing node's clock, ms)
//!   whose TTL is the lease.
//!
//! Every conditional write is one Lua script run with EVALSHA ([`redis::Script`]), so the
//! compare-and-set, the record, its TTL and both indexes change together or not at all.
//! Index entries of records that expired are pruned by the list script when it meets them.
//! Each write carries a random token: when a connection drops after Redis applied a write but
//! before the answer arrived, the retry finds its own token and answers success instead of a
//! false conflict.
//!
//! Transient failures (connection lost, timeout, `LOADING`, `READONLY` after a failover) are
//! retried a bounded number of times; with Sentinel, each one also asks the sentinels for the
//! current master and follows it. Redis Cluster (sharded) is not supported: the scripts touch
//! several keys that would live in different slots.
//!
//! Durability is Redis's own: a write acknowledged here is in the master's memory; it survives
//! a Redis restart only as far as the deployment's RDB/AOF settings persist it, and a Sentinel
//! failover only if it reached the promoted replica (replication is asynchronous).

use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    ErrorKind, RedisConnectionInfo, RedisError, RedisResult, Script, ServerErrorKind, Value,
};
use serde::{Deserialize, Serialize};

use crate::{
    Clock, DialogKey, DialogState, DialogStore, StoreError, StoreFuture, StoreSettings,
    StoredDialog, SweepReport, WriteOp,
};

/// Configuration of the Redis backend (`[cluster.store.redis]`): either `url`, or
/// `sentinels` with `master_name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisStoreConfig {
    /// A plain Redis URL, e.g. `redis://127.0.0.1:6379/0` (credentials may be in the URL).
    pub url: Option<String>,
    /// Sentinel addresses, `host:port` or `redis://host:port`.
    pub sentinels: Vec<String>,
    /// The master name the sentinels monitor.
    pub master_name: Option<String>,
    /// Database number on the master found through Sentinel.
    pub db: i64,
    /// Username for the master found through Sentinel (ACL).
    pub username: Option<String>,
    /// Password for the master found through Sentinel.
    pub password: Option<String>,
    /// Prefix of every key (default `thalamus:`).
    pub key_prefix: String,
    /// Timeout of one connection attempt, ms (default 1000).
    pub connect_timeout_ms: u64,
    /// Timeout of one command, ms (default 1000).
    pub response_timeout_ms: u64,
    /// How many times the connection manager retries a reconnect before failing the
    /// commands waiting on it (default 4).
    pub reconnect_retries: usize,
    /// How many times one store operation is tried on transient failures (default 4).
    pub op_attempts: u32,
    /// Delay before the first retry of an operation, ms; doubles per retry up to 1 s
    /// (default 50).
    pub retry_delay_ms: u64,
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            sentinels: Vec::new(),
            master_name: None,
            db: 0,
            username: None,
            password: None,
            key_prefix: "thalamus:".into(),
            connect_timeout_ms: 1000,
            response_timeout_ms: 1000,
            reconnect_retries: 4,
            op_attempts: 4,
            retry_delay_ms: 50,
        }
    }
}

/// Where the Redis master is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisEndpoint {
    /// A fixed URL.
    Url(String),
    /// Through Sentinel.
    Sentinel {
        /// Sentinel URLs (`redis://host:port`).
        sentinels: Vec<String>,
        /// The monitored master's name.
        master_name: String,
    },
}

impl RedisStoreConfig {
    /// A configuration for one plain URL, other settings default.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: Some(url.into()),
            ..Self::default()
        }
    }

    /// A configuration for Sentinel, other settings default.
    pub fn with_sentinels(sentinels: Vec<String>, master_name: impl Into<String>) -> Self {
        Self {
            sentinels,
            master_name: Some(master_name.into()),
            ..Self::default()
        }
    }

    /// Checks the configuration and says where the master is.
    pub fn endpoint(&self) -> Result<RedisEndpoint, StoreError> {
        let bad = |m: &str| Err(StoreError::Backend(format!("redis store config: {m}")));
        if self.key_prefix.len() > 128 {
            return bad("key_prefix longer than 128 bytes");
        }
        if self.op_attempts == 0 {
            return bad("op_attempts must be at least 1");
        }
        match (&self.url, self.sentinels.is_empty(), &self.master_name) {
            (Some(url), true, None) => Ok(RedisEndpoint::Url(url.clone())),
            (None, false, Some(name)) if !name.is_empty() => Ok(RedisEndpoint::Sentinel {
                sentinels: self
                    .sentinels
                    .iter()
                    .map(|s| {
                        if s.contains("://") {
                            s.clone()
                        } else {
                            format!("redis://{s}")
                        }
                    })
                    .collect(),
                master_name: name.clone(),
            }),
            (Some(_), _, _) => bad("give either url or sentinels with master_name, not both"),
            (None, true, _) => bad("no url and no sentinels given"),
            (None, false, _) => bad("sentinels need a non-empty master_name"),
        }
    }
}

const LIB: &str = r"
local function index_add(set, member, ttl)
  redis.call('SADD', set, member)
  if redis.call('PTTL', set) < tonumber(ttl) then
    redis.call('PEXPIRE', set, ttl)
  end
end
";

/// PUT. KEYS[1] dialog. ARGV: expected version or '', body, owner, epoch, device, updated-at,
/// live TTL ms, token, prefix, member. Returns {1, new version} or {0, current or -1}.
const PUT: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'v', 's', 'o', 'd', 'k')
local v = tonumber(cur[1])
if v and cur[5] == ARGV[8] then return {1, v} end
if ARGV[1] == '' then
  if v then return {0, v} end
elseif not v then
  return {0, -1}
elseif v ~= tonumber(ARGV[1]) then
  return {0, v}
end
local nv = 1
if v then nv = v + 1 end
if cur[2] == 'L' then
  redis.call('SREM', ARGV[9] .. 'dev:' .. cur[4], ARGV[10])
  redis.call('SREM', ARGV[9] .. 'own:' .. cur[3], ARGV[10])
end
redis.call('HSET', KEYS[1], 'v', nv, 's', 'L', 'o', ARGV[3], 'e', ARGV[4], 'd', ARGV[5],
  't', ARGV[6], 'b', ARGV[2], 'k', ARGV[8])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
index_add(ARGV[9] .. 'dev:' .. ARGV[5], ARGV[10], ARGV[7])
index_add(ARGV[9] .. 'own:' .. ARGV[3], ARGV[10], ARGV[7])
return {1, nv}
";

/// DELETE. KEYS[1] dialog. ARGV: expected version or '', tombstone TTL ms, updated-at, token,
/// prefix, member. Returns {1, tombstone version}, {0, current} or {-1, 0} (absent).
const DELETE: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'v', 's', 'o', 'd', 'k')
local v = tonumber(cur[1])
if not v then return {-1, 0} end
if cur[5] == ARGV[4] then return {1, v} end
if cur[2] ~= 'L' then
  if ARGV[1] == '' then return {1, v} end
  return {0, v}
end
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= v then return {0, v} end
redis.call('SREM', ARGV[5] .. 'dev:' .. cur[4], ARGV[6])
redis.call('SREM', ARGV[5] .. 'own:' .. cur[3], ARGV[6])
redis.call('HSET', KEYS[1], 'v', v + 1, 's', 'T', 't', ARGV[3], 'k', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, v + 1}
";

/// CLAIM. KEYS[1] dialog. ARGV: node, expected epoch, updated-at, live TTL ms, token, prefix,
/// member. Returns {1, v, s, o, e, t, b}, {0, current epoch}, {-1, 0} (absent) or
/// {-2, version} (tombstone).
const CLAIM: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'v', 's', 'o', 'e', 'k', 'd')
local v = tonumber(cur[1])
if not v then return {-1, 0} end
if cur[5] ~= ARGV[5] then
  if cur[2] ~= 'L' then return {-2, v} end
  local e = tonumber(cur[4])
  if e ~= tonumber(ARGV[2]) then return {0, e} end
  if cur[3] ~= ARGV[1] then
    redis.call('SREM', ARGV[6] .. 'own:' .. cur[3], ARGV[7])
  end
  redis.call('HSET', KEYS[1], 'v', v + 1, 'o', ARGV[1], 'e', e + 1, 't', ARGV[3], 'k', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  index_add(ARGV[6] .. 'own:' .. ARGV[1], ARGV[7], ARGV[4])
  index_add(ARGV[6] .. 'dev:' .. cur[6], ARGV[7], ARGV[4])
end
local r = redis.call('HMGET', KEYS[1], 'v', 's', 'o', 'e', 't', 'b')
return {1, r[1], r[2], r[3], r[4], r[5], r[6]}
";

/// LIST. KEYS[1] index set. ARGV: field ('d' or 'o'), value, prefix, limit. Returns live
/// records as {v, s, o, e, t, b} tuples; prunes members whose record is gone, ended or moved.
const LIST: &str = r"
local members = redis.call('SMEMBERS', KEYS[1])
local out = {}
local limit = tonumber(ARGV[4])
for _, m in ipairs(members) do
  local r = redis.call('HMGET', ARGV[3] .. 'dlg:' .. m, 'v', 's', 'o', 'e', 't', 'b', ARGV[1])
  if (not r[1]) or r[2] ~= 'L' or r[7] ~= ARGV[2] then
    redis.call('SREM', KEYS[1], m)
  elseif #out < limit then
    out[#out + 1] = {r[1], r[2], r[3], r[4], r[5], r[6]}
  end
end
return out
";

/// The fields every record read returns, in this order.
const RECORD_FIELDS: [&str; 6] = ["v", "s", "o", "e", "t", "b"];

#[derive(Debug)]
struct Scripts {
    put: Script,
    delete: Script,
    claim: Script,
    list: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            put: Script::new(&format!("{LIB}{PUT}")),
            delete: Script::new(DELETE),
            claim: Script::new(&format!("{LIB}{CLAIM}")),
            list: Script::new(LIST),
        }
    }
}

/// The Redis backend.
pub struct RedisDialogStore {
    inner: Arc<RedisInner>,
    /// With Sentinel: the task that follows `+switch-master` announcements.
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for RedisDialogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Drop for RedisDialogStore {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.lock().ok().and_then(|mut w| w.take()) {
            watcher.abort();
        }
    }
}

/// The state shared by the store and its Sentinel watcher.
struct RedisInner {
    manager: RwLock<Option<ConnectionManager>>,
    sentinel: Option<tokio::sync::Mutex<SentinelClient>>,
    master_addr: Mutex<String>,
    manager_config: ConnectionManagerConfig,
    prefix: String,
    scripts: Scripts,
    config: RedisStoreConfig,
    settings: StoreSettings,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for RedisInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDialogStore")
            .field("master", &self.master_addr.lock().map(|a| a.clone()).ok())
            .field("sentinel", &self.sentinel.is_some())
            .field("prefix", &self.prefix)
            .field("settings", &self.settings)
            .finish()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whether a Redis error may go away by itself (a retry, or following a new master, may
/// succeed).
fn is_transient(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
            ) | ErrorKind::MasterNameNotFoundBySentinel
        )
}

fn random_token() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

impl RedisDialogStore {
    /// Connects to the master (through Sentinel when configured). With a plain URL whose server
    /// does not answer, the store starts unconnected and connects at its first command (each
    /// operation meanwhile fails with [`StoreError::Unavailable`]); through Sentinel it fails
    /// with [`StoreError::Unavailable`] when no master can be found. [`StoreError::Backend`] on a
    /// bad configuration.
    pub async fn connect(
        config: &RedisStoreConfig,
        settings: StoreSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        settings.validate()?;
        let endpoint = config.endpoint()?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
            .set_response_timeout(Some(Duration::from_millis(config.response_timeout_ms)))
            .set_number_of_retries(config.reconnect_retries)
            .set_min_delay(Duration::from_millis(config.retry_delay_ms.max(1)))
            .set_max_delay(Duration::from_secs(1));
        let (client, sentinel) = match &endpoint {
            RedisEndpoint::Url(url) => (
                redis::Client::open(url.as_str())
                    .map_err(|e| StoreError::Backend(format!("redis url {url:?}: {e}")))?,
                None,
            ),
            RedisEndpoint::Sentinel {
                sentinels,
                master_name,
            } => {
                let mut info = RedisConnectionInfo::default().set_db(config.db);
                if let Some(user) = &config.username {
                    info = info.set_username(user);
                }
                if let Some(password) = &config.password {
                    info = info.set_password(password);
                }
                let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
                let mut sentinel = SentinelClient::build(
                    sentinels.clone(),
                    master_name.clone(),
                    Some(node),
                    SentinelServerType::Master,
                )
                .map_err(|e| StoreError::Backend(format!("sentinel config: {e}")))?;
                let client = sentinel.async_get_client().await.map_err(|e| {
                    StoreError::Unavailable(format!(
                        "no master {master_name:?} from sentinels {sentinels:?}: {e}"
                    ))
                })?;
                (client, Some(tokio::sync::Mutex::new(sentinel)))
            }
        };
        let master_addr = client.get_connection_info().addr().to_string();
        let manager = match ConnectionManager::new_with_config(
            client.clone(),
            manager_config.clone(),
        )
        .await
        {
            Ok(manager) => manager,
            // A plain URL whose server does not answer now: start anyway, connecting at the
            // first command (and again after each failure), so a node can start and serve
            // during a Redis outage; operations fail as `Unavailable` until it answers.
            Err(e) if sentinel.is_none() => {
                tracing::warn!(redis = %master_addr, error = %e, "the dialog store does not answer: starting without it, connecting when it does");
                ConnectionManager::new_lazy_with_config(client, manager_config.clone())
                    .map_err(|e| StoreError::Unavailable(format!("redis {master_addr}: {e}")))?
            }
            Err(e) => return Err(StoreError::Unavailable(format!("redis {master_addr}: {e}"))),
        };
        let watch = match &endpoint {
            RedisEndpoint::Sentinel {
                sentinels,
                master_name,
            } => Some((sentinels.clone(), master_name.clone())),
            RedisEndpoint::Url(_) => None,
        };
        let inner = Arc::new(RedisInner {
            manager: RwLock::new(Some(manager)),
            sentinel,
            master_addr: Mutex::new(master_addr),
            manager_config,
            prefix: config.key_prefix.clone(),
            scripts: Scripts::new(),
            config: config.clone(),
            settings,
            clock,
        });
        let watcher = watch.map(|(sentinels, master_name)| {
            tokio::spawn(watch_switch_master(
                Arc::downgrade(&inner),
                sentinels,
                master_name,
            ))
        });
        Ok(Self {
            inner,
            watcher: Mutex::new(watcher),
        })
    }

    /// The address of the master in use (`host:port`).
    pub fn master_address(&self) -> String {
        self.inner.master_address()
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.inner.prefix
    }
}

/// Follows the sentinels' `+switch-master` announcements so a failover is noticed at once,
/// not only when the old master refuses a write. Ends when the store is dropped.
async fn watch_switch_master(
    inner: std::sync::Weak<RedisInner>,
    sentinels: Vec<String>,
    master_name: String,
) {
    use futures::StreamExt;
    let mut next = 0usize;
    loop {
        if inner.strong_count() == 0 {
            return;
        }
        let url = sentinels
            .get(next % sentinels.len().max(1))
            .cloned()
            .unwrap_or_default();
        next = next.wrapping_add(1);
        let subscribed = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            Ok::<_, RedisError>(pubsub)
        }
        .await;
        match subscribed {
            Ok(pubsub) => {
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let payload: String = message.get_payload().unwrap_or_default();
                    // "<name> <old-ip> <old-port> <new-ip> <new-port>"
                    if payload.split(' ').next() != Some(master_name.as_str()) {
                        continue;
                    }
                    let Some(inner) = inner.upgrade() else {
                        return;
                    };
                    tracing::info!(announcement = %payload, "sentinel switched the master");
                    inner.follow_master().await;
                }
                tracing::warn!(sentinel = %url, "sentinel subscription ended; resubscribing");
            }
            Err(e) => {
                tracing::warn!(sentinel = %url, error = %e, "cannot subscribe to sentinel");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl RedisInner {
    fn master_address(&self) -> String {
        self.master_addr
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    fn dialog_key(&self, storage_key: &str) -> String {
        format!("{}dlg:{storage_key}", self.prefix)
    }

    fn manager(&self) -> Result<ConnectionManager, StoreError> {
        self.manager
            .read()
            .map_err(|_| StoreError::Backend("store lock poisoned".into()))?
            .clone()
            .ok_or(StoreError::Closed)
    }

    /// Asks the sentinels for the master; if it moved, switches to a new connection manager.
    async fn follow_master(&self) {
        let Some(sentinel) = &self.sentinel else {
            return;
        };
        let mut sentinel = sentinel.lock().await;
        let client = match sentinel.async_get_client().await {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(error = %e, "sentinel did not name a master");
                return;
            }
        };
        let addr = client.get_connection_info().addr().to_string();
        if self.master_address() == addr {
            return;
        }
        match ConnectionManager::new_lazy_with_config(client, self.manager_config.clone()) {
            Ok(manager) => {
                if let Ok(mut slot) = self.manager.write() {
                    if slot.is_some() {
                        *slot = Some(manager);
                    }
                }
                if let Ok(mut current) = self.master_addr.lock() {
                    tracing::info!(from = %current, to = %addr, "dialog store follows the new Redis master");
                    *current = addr;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not set up a connection to the new master"),
        }
    }

    /// Runs `attempt` with retries on transient errors.
    async fn run<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, StoreError>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let mut delay = Duration::from_millis(self.config.retry_delay_ms.max(1));
        let mut tries = 0;
        loop {
            tries += 1;
            let manager = self.manager()?;
            match attempt(manager).await {
                Ok(v) => return Ok(v),
                Err(e) if !is_transient(&e) => {
                    return Err(StoreError::Backend(format!("redis {what}: {e}")));
                }
                Err(e) => {
                    if tries >= self.config.op_attempts {
                        return Err(StoreError::Unavailable(format!(
                            "redis {what} after {tries} attempts: {e}"
                        )));
                    }
                    tracing::debug!(error = %e, what, tries, "transient redis error; retrying");
                    self.follow_master().await;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn put_invocation<'s>(
        &'s self,
        record: &StoredDialog,
        expected_version: Option<u64>,
        token: &str,
    ) -> Result<redis::ScriptInvocation<'s>, StoreError> {
        record.validate()?;
        let now = self.clock.now_ms();
        let mut stored = record.clone();
        stored.version = expected_version.map_or(1, |v| v.saturating_add(1));
        stored.updated_at_ms = now;
        stored.state = DialogState::Live;
        let body = stored.encode()?;
        let storage_key = record.key.storage_key();
        let mut inv = self.scripts.put.prepare_invoke();
        inv.key(self.dialog_key(&storage_key))
            .arg(expected_version.map(|v| v.to_string()).unwrap_or_default())
            .arg(body)
            .arg(&record.owner)
            .arg(record.epoch)
            .arg(&record.device_id)
            .arg(now)
            .arg(ms(self.settings.live_ttl))
            .arg(token)
            .arg(&self.prefix)
            .arg(storage_key);
        Ok(inv)
    }

    fn delete_invocation<'s>(
        &'s self,
        key: &DialogKey,
        expected_version: Option<u64>,
        token: &str,
    ) -> Result<redis::ScriptInvocation<'s>, StoreError> {
        key.validate()?;
        let storage_key = key.storage_key();
        let mut inv = self.scripts.delete.prepare_invoke();
        inv.key(self.dialog_key(&storage_key))
            .arg(expected_version.map(|v| v.to_string()).unwrap_or_default())
            .arg(ms(self.settings.tombstone_ttl))
            .arg(self.clock.now_ms())
            .arg(token)
            .arg(&self.prefix)
            .arg(storage_key);
        Ok(inv)
    }

    async fn list(
        &self,
        index: &str,
        field: &str,
        value: &str,
        limit: usize,
    ) -> Result<Vec<StoredDialog>, StoreError> {
        let set = format!("{}{index}:{value}", self.prefix);
        let limit = limit.min(1 << 30);
        let reply: Value = self
            .run("list", |mut conn| {
                let mut inv = self.scripts.list.prepare_invoke();
                inv.key(&set)
                    .arg(field)
                    .arg(value)
                    .arg(&self.prefix)
                    .arg(limit);
                async move { inv.invoke_async(&mut conn).await }
            })
            .await?;
        let items = array(&reply).ok_or_else(|| unexpected("list", &reply))?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let tuple = array(item).ok_or_else(|| unexpected("list item", item))?;
            if let Some(record) = decode_tuple(tuple)? {
                out.push(record);
            }
        }
        Ok(out)
    }
}

fn array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn unexpected(what: &str, v: &Value) -> StoreError {
    StoreError::Backend(format!("redis {what}: unexpected reply {v:?}"))
}

/// Decodes a `{v, s, o, e, t, b}` tuple; `None` when the record is absent (all nil).
fn decode_tuple(items: &[Value]) -> Result<Option<StoredDialog>, StoreError> {
    let [v, s, o, e, t, b] = items else {
        return Err(StoreError::Corrupt(format!(
            "record tuple has {} fields",
            items.len()
        )));
    };
    if matches!(v, Value::Nil) {
        return Ok(None);
    }
    let number = |x: &Value, name: &str| -> Result<u64, StoreError> {
        int(x)
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(|| StoreError::Corrupt(format!("field {name}: {x:?}")))
    };
    let body = match b {
        Value::BulkString(bytes) => bytes.as_slice(),
        other => return Err(StoreError::Corrupt(format!("field b: {other:?}"))),
    };
    let mut record = StoredDialog::decode(body)?;
    record.version = number(v, "v")?;
    record.epoch = number(e, "e")?;
    record.updated_at_ms = number(t, "t")?;
    record.owner = text(o)
        .ok_or_else(|| StoreError::Corrupt(format!("field o: {o:?}")))?
        .to_owned();
    record.state = match text(s) {
        Some("L") => DialogState::Live,
        Some("T") => DialogState::Tombstone,
        _ => return Err(StoreError::Corrupt(format!("field s: {s:?}"))),
    };
    Ok(Some(record))
}

/// Reads a `{status, value}` reply of the put and delete scripts.
fn version_reply(what: &str, reply: &Value) -> Result<u64, StoreError> {
    let items = array(reply).ok_or_else(|| unexpected(what, reply))?;
    let (Some(status), Some(value)) = (items.first().and_then(int), items.get(1).and_then(int))
    else {
        return Err(unexpected(what, reply));
    };
    let value_u64 = u64::try_from(value).ok();
    match status {
        1 => value_u64.ok_or_else(|| unexpected(what, reply)),
        0 => Err(StoreError::Conflict { current: value_u64 }),
        -1 => Err(StoreError::NotFound),
        _ => Err(unexpected(what, reply)),
    }
}

impl DialogStore for RedisDialogStore {
    fn backend_name(&self) -> &'static str {
        "redis"
    }

    fn get<'a>(&'a self, key: &'a DialogKey) -> StoreFuture<'a, Option<StoredDialog>> {
        self.inner.get(key)
    }

    fn put<'a>(
        &'a self,
        record: &'a StoredDialog,
        expected_version: Option<u64>,
    ) -> StoreFuture<'a, u64> {
        self.inner.put(record, expected_version)
    }

    fn delete<'a>(
        &'a self,
        key: &'a DialogKey,
        expected_version: Option<u64>,
    ) -> StoreFuture<'a, u64> {
        self.inner.delete(key, expected_version)
    }

    fn claim<'a>(
        &'a self,
        key: &'a DialogKey,
        node_id: &'a str,
        expected_epoch: u64,
    ) -> StoreFuture<'a, StoredDialog> {
        self.inner.claim(key, node_id, expected_epoch)
    }

    fn list_by_device<'a>(&'a self, device_id: &'a str) -> StoreFuture<'a, Vec<StoredDialog>> {
        self.inner.list_by_device(device_id)
    }

    fn list_by_owner<'a>(
        &'a self,
        node_id: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredDialog>> {
        self.inner.list_by_owner(node_id, limit)
    }

    fn renew_lease<'a>(&'a self, node_id: &'a str, ttl: Duration) -> StoreFuture<'a, ()> {
        self.inner.renew_lease(node_id, ttl)
    }

    fn lease_remaining<'a>(&'a self, node_id: &'a str) -> StoreFuture<'a, Option<Duration>> {
        self.inner.lease_remaining(node_id)
    }

    fn sweep(&self) -> StoreFuture<'_, SweepReport> {
        self.inner.sweep()
    }

    fn write_batch(&self, ops: Vec<WriteOp>) -> StoreFuture<'_, Vec<Result<u64, StoreError>>> {
        self.inner.write_batch(ops)
    }

    fn instance(&self) -> StoreFuture<'_, Option<String>> {
        self.inner.instance()
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        if let Some(watcher) = self.watcher.lock().ok().and_then(|mut w| w.take()) {
            watcher.abort();
        }
        self.inner.close()
    }
}

impl DialogStore for RedisInner {
    fn backend_name(&self) -> &'static str {
        "redis"
    }

    fn get<'a>(&'a self, key: &'a DialogKey) -> StoreFuture<'a, Option<StoredDialog>> {
        Box::pin(async move {
            key.validate()?;
            let dialog_key = self.dialog_key(&key.storage_key());
            let reply: Value = self
                .run("get", |mut conn| {
                    let mut cmd = redis::cmd("HMGET");
                    cmd.arg(&dialog_key).arg(&RECORD_FIELDS[..]);
                    async move { cmd.query_async(&mut conn).await }
                })
                .await?;
            decode_tuple(array(&reply).ok_or_else(|| unexpected("get", &reply))?)
        })
    }

    fn put<'a>(
        &'a self,
        record: &'a StoredDialog,
        expected_version: Option<u64>,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let token = random_token();
            let inv = self.put_invocation(record, expected_version, &token)?;
            let reply: Value = self
                .run("put", |mut conn| {
                    let inv = &inv;
                    async move { inv.invoke_async(&mut conn).await }
                })
                .await?;
            version_reply("put", &reply)
        })
    }

    fn delete<'a>(
        &'a self,
        key: &'a DialogKey,
        expected_version: Option<u64>,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let token = random_token();
            let inv = self.delete_invocation(key, expected_version, &token)?;
            let reply: Value = self
                .run("delete", |mut conn| {
                    let inv = &inv;
                    async move { inv.invoke_async(&mut conn).await }
                })
                .await?;
            version_reply("delete", &reply)
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
            crate::rules::validate_node_id(node_id)?;
            let token = random_token();
            let storage_key = key.storage_key();
            let mut inv = self.scripts.claim.prepare_invoke();
            inv.key(self.dialog_key(&storage_key))
                .arg(node_id)
                .arg(expected_epoch)
                .arg(self.clock.now_ms())
                .arg(ms(self.settings.live_ttl))
                .arg(&token)
                .arg(&self.prefix)
                .arg(&storage_key);
            let reply: Value = self
                .run("claim", |mut conn| {
                    let inv = &inv;
                    async move { inv.invoke_async(&mut conn).await }
                })
                .await?;
            let items = array(&reply).ok_or_else(|| unexpected("claim", &reply))?;
            let status = items.first().and_then(int);
            let value = items
                .get(1)
                .and_then(int)
                .and_then(|v| u64::try_from(v).ok());
            match (status, items.get(1..)) {
                (Some(1), Some(tuple)) => {
                    decode_tuple(tuple)?.ok_or_else(|| unexpected("claim", &reply))
                }
                (Some(0), _) => Err(StoreError::Conflict { current: value }),
                (Some(-1), _) => Err(StoreError::NotFound),
                (Some(-2), _) => Err(StoreError::Tombstoned {
                    version: value.unwrap_or(0),
                }),
                _ => Err(unexpected("claim", &reply)),
            }
        })
    }

    fn list_by_device<'a>(&'a self, device_id: &'a str) -> StoreFuture<'a, Vec<StoredDialog>> {
        Box::pin(async move { self.list("dev", "d", device_id, usize::MAX).await })
    }

    fn list_by_owner<'a>(
        &'a self,
        node_id: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredDialog>> {
        Box::pin(async move { self.list("own", "o", node_id, limit).await })
    }

    fn renew_lease<'a>(&'a self, node_id: &'a str, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            crate::rules::validate_node_id(node_id)?;
            let ttl_ms = crate::rules::lease_ttl_ms(ttl)?;
            let key = format!("{}lease:{node_id}", self.prefix);
            let now = self.clock.now_ms();
            self.run("renew lease", |mut conn| {
                let mut cmd = redis::cmd("SET");
                cmd.arg(&key).arg(now).arg("PX").arg(ttl_ms);
                async move { cmd.query_async::<()>(&mut conn).await }
            })
            .await
        })
    }

    fn lease_remaining<'a>(&'a self, node_id: &'a str) -> StoreFuture<'a, Option<Duration>> {
        Box::pin(async move {
            crate::rules::validate_node_id(node_id)?;
            let key = format!("{}lease:{node_id}", self.prefix);
            let pttl: i64 = self
                .run("lease", |mut conn| {
                    let mut cmd = redis::cmd("PTTL");
                    cmd.arg(&key);
                    async move { cmd.query_async(&mut conn).await }
                })
                .await?;
            // -2: no key; -1: no TTL (never written by this store); 0: about to lapse.
            Ok(u64::try_from(pttl)
                .ok()
                .filter(|&ms| ms > 0)
                .map(Duration::from_millis))
        })
    }

    fn sweep(&self) -> StoreFuture<'_, SweepReport> {
        Box::pin(async move {
            self.manager()?;
            Ok(SweepReport::default())
        })
    }

    fn write_batch(&self, ops: Vec<WriteOp>) -> StoreFuture<'_, Vec<Result<u64, StoreError>>> {
        Box::pin(async move {
            // Invalid ops get their error without being sent; the rest go in one pipeline,
            // after SCRIPT LOAD of both scripts (so a restarted Redis has them).
            let mut results: Vec<Option<Result<u64, StoreError>>> = Vec::with_capacity(ops.len());
            let mut pipe = redis::pipe();
            pipe.load_script(&self.scripts.put)
                .load_script(&self.scripts.delete);
            let mut sent = 0usize;
            for op in &ops {
                let token = random_token();
                let inv = match op {
                    WriteOp::Put {
                        record,
                        expected_version,
                    } => self.put_invocation(record, *expected_version, &token),
                    WriteOp::Delete {
                        key,
                        expected_version,
                    } => self.delete_invocation(key, *expected_version, &token),
                };
                match inv {
                    Ok(inv) => {
                        pipe.invoke_script(&inv);
                        sent += 1;
                        results.push(None);
                    }
                    Err(e) => results.push(Some(Err(e))),
                }
            }
            if sent == 0 {
                return Ok(results.into_iter().flatten().collect());
            }
            let count = sent + 2;
            let replies: Vec<Value> = self
                .run("write batch", |mut conn| {
                    let pipe = &pipe;
                    async move { conn.send_packed_commands(pipe, 0, count).await }
                })
                .await?;
            let mut replies = replies.into_iter().skip(2);
            Ok(results
                .into_iter()
                .map(|slot| match slot {
                    Some(done) => done,
                    None => match replies.next() {
                        Some(Value::ServerError(e)) => {
                            Err(StoreError::Backend(format!("redis write batch: {e:?}")))
                        }
                        Some(reply) => version_reply("write batch", &reply),
                        None => Err(StoreError::Backend(
                            "redis write batch: reply missing".into(),
                        )),
                    },
                })
                .collect())
        })
    }

    /// The master's `run_id` (`INFO server`): a restart or a failover changes it.
    fn instance(&self) -> StoreFuture<'_, Option<String>> {
        Box::pin(async move {
            let info: String = self
                .run("instance", |mut c| async move {
                    redis::cmd("INFO").arg("server").query_async(&mut c).await
                })
                .await?;
            Ok(info
                .lines()
                .find_map(|l| l.strip_prefix("run_id:"))
                .map(|id| id.trim().to_string()))
        })
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            if let Ok(mut slot) = self.manager.write() {
                slot.take();
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_from_config() {
        assert_eq!(
            RedisStoreConfig::with_url("redis://127.0.0.1:7000/").endpoint(),
            Ok(RedisEndpoint::Url("redis://127.0.0.1:7000/".into()))
        );
        assert_eq!(
            RedisStoreConfig::with_sentinels(
                vec!["10.0.0.1:26379".into(), "redis://10.0.0.2:26379".into()],
                "dialogs"
            )
            .endpoint(),
            Ok(RedisEndpoint::Sentinel {
                sentinels: vec![
                    "redis://10.0.0.1:26379".into(),
                    "redis://10.0.0.2:26379".into()
                ],
                master_name: "dialogs".into()
            })
        );
        assert!(RedisStoreConfig::default().endpoint().is_err());
        let mut both = RedisStoreConfig::with_url("redis://x/");
        both.sentinels = vec!["y:1".into()];
        both.master_name = Some("m".into());
        assert!(both.endpoint().is_err());
        assert!(RedisStoreConfig::with_sentinels(vec!["y:1".into()], "")
            .endpoint()
            .is_err());
        let mut zero = RedisStoreConfig::with_url("redis://x/");
        zero.op_attempts = 0;
        assert!(zero.endpoint().is_err());
    }

    #[test]
    fn config_parses_from_toml() {
        let c: RedisStoreConfig = toml::from_str(
            "sentinels = [\"127.0.0.1:26379\"]\nmaster_name = \"m\"\nkey_prefix = \"t1:\"\n",
        )
        .unwrap();
        assert_eq!(c.key_prefix, "t1:");
        assert_eq!(c.op_attempts, 4);
        assert!(toml::from_str::<RedisStoreConfig>("urll = \"x\"").is_err());
    }

    #[test]
    fn replies_are_checked_not_trusted() {
        let v = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(decode_tuple(&vec![Value::Nil; 6]), Ok(None));
        assert!(matches!(
            decode_tuple(&vec![Value::Nil; 5]),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            decode_tuple(&[v("x"), v("L"), v("n"), v("1"), v("1"), v("{}")]),
            Err(StoreError::Corrupt(_))
        ));
        let mut r = crate::conformance::record("t", "d", "n");
        r.version = 1;
        let body = String::from_utf8(r.encode().unwrap()).unwrap();
        let got = decode_tuple(&[v("9"), v("T"), v("n2"), v("3"), v("77"), v(&body)])
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                got.version,
                got.state,
                got.owner.as_str(),
                got.epoch,
                got.updated_at_ms
            ),
            (9, DialogState::Tombstone, "n2", 3, 77)
        );
        assert!(matches!(
            decode_tuple(&[v("9"), v("X"), v("n2"), v("3"), v("77"), v(&body)]),
            Err(StoreError::Corrupt(_))
        ));
        let reply = |a: i64, b: i64| Value::Array(vec![Value::Int(a), Value::Int(b)]);
        assert_eq!(version_reply("t", &reply(1, 4)), Ok(4));
        assert_eq!(
            version_reply("t", &reply(0, 4)),
            Err(StoreError::Conflict { current: Some(4) })
        );
        assert_eq!(
            version_reply("t", &reply(0, -1)),
            Err(StoreError::Conflict { current: None })
        );
        assert_eq!(version_reply("t", &reply(-1, 0)), Err(StoreError::NotFound));
        assert!(version_reply("t", &Value::Okay).is_err());
        assert!(version_reply("t", &reply(7, 0)).is_err());
    }
}
