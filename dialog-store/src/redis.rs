//! The Redis dialog store, the cluster backend: redis-rs on tokio, to one Redis master given by
//! URL or found through Sentinel (through a reconnecting [`ConnectionManager`]), or to a Redis
//! Cluster (through redis-rs's cluster connection, which follows `MOVED`/`ASK` and refreshes
//! its slot map by itself).
//!
//! Single-master layout (URL or Sentinel; prefix configurable, default `thalamus:`):
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
//!
//! Cluster layout (`cluster_nodes`). A Lua script may only touch keys of one slot, so every key
//! carries a hash tag that makes each *dialog operation* single-slot:
//! - `<prefix>dlg:{<h>}<storage key>`, `<h>` the 64-bit FNV-1a hash of the storage key in hex
//!   (never the raw Call-ID, which may hold `{` or `}` itself). The
//!   put, delete and claim scripts touch only this key, so every operation on one dialog is
//!   atomic wherever its slot lives and whichever master serves it.
//! - `<prefix>dev:{d:<hash of device>}<device>` and `<prefix>own:{o:<hash of node>}<node>`:
//!   the indexes, each in its own slot, kept *outside* the scripts as supersets that readers
//!   verify. They are sorted sets: member -> time of its last add (µs, Redis server clock).
//!   Before a put or a claim script runs, the writer adds the dialog to the device and owner
//!   index (script `INDEX_ADD`: ZADD, and the TTL raised to the live TTL plus the index grace,
//!   never lowered, set when the key has none) and waits for that; only then runs the script.
//!   Deletes and claims remove nothing from indexes. A list reads the index, then each
//!   member's record, returns the live ones whose `d`/`o` still names the device or node, and
//!   prunes the others (gone, ended, moved) whose add is older than the index grace and
//!   unchanged since it read it (script `INDEX_PRUNE`). So an index can over-list, never
//!   under-list: a crash between an index add and its script leaves a stale member, which a
//!   later list prunes; a member added by a writer that has not run its script yet is not
//!   pruned, because a writer sends its script within half the grace of its add (or fails
//!   the operation) and a reader prunes only what it read within half the grace.
//! - Leases are single keys, as above.
//!
//! Each write carries a random token: when a connection drops after Redis applied a write but
//! before the answer arrived, the retry finds its own token and answers success instead of a
//! false conflict. A write that failed as [`StoreError::Unavailable`] keeps its token for the
//! same write tried again later (same dialog, expected version and content), so that retry is
//! idempotent too.
//!
//! Transient failures (connection lost, timeout, `LOADING`, `READONLY` after a failover,
//! `CLUSTERDOWN`, `TRYAGAIN`, redirections that outlast the cluster client's own retries) are
//! retried a bounded number of times; with Sentinel, each one also asks the sentinels for the
//! current master and follows it.
//!
//! `wait_replicas` (optional) sends `WAIT <n> <timeout>` after each write, in the same
//! pipeline on the same connection (in cluster mode, to the master that took the write), and
//! fails the write as `Unavailable` when fewer replicas acknowledged it. WAIT holds that
//! multiplexed connection for everyone until it returns, so its timeout must stay small.
//!
//! Durability is Redis's own: a write acknowledged here is in the master's memory; it survives
//! a Redis restart only as far as the deployment's RDB/AOF settings persist it, and a failover
//! only if it reached the promoted replica (replication is asynchronous; `wait_replicas` makes
//! an acknowledged write one that reached that many replicas). This module does not start,
//! configure or resize Redis, and does not migrate data between the two layouts.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    ErrorKind, RedisConnectionInfo, RedisError, RedisResult, Script, ServerErrorKind, Value,
};
use serde::{Deserialize, Serialize};

use crate::{
    Clock, DialogKey, DialogState, DialogStore, StoreError, StoreFuture, StoreSettings,
    StoredDialog, SweepReport, WriteOp,
};

/// Configuration of the Redis backend (`[cluster.store.redis]`): exactly one of `url`,
/// `sentinels` with `master_name`, or `cluster_nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisStoreConfig {
    /// A plain Redis URL, e.g. `redis://127.0.0.1:6379/0` (credentials may be in the URL).
    pub url: Option<String>,
    /// Sentinel addresses, `host:port` or `redis://host:port`.
    pub sentinels: Vec<String>,
    /// The master name the sentinels monitor.
    pub master_name: Option<String>,
    /// Redis Cluster seed nodes, `host:port` or `redis://host:port` (any few of the cluster's
    /// nodes; the client learns the rest from them).
    pub cluster_nodes: Vec<String>,
    /// Database number on the master found through Sentinel (Redis Cluster has only 0).
    pub db: i64,
    /// Username for the master found through Sentinel, or for the cluster's nodes (ACL).
    pub username: Option<String>,
    /// Password for the master found through Sentinel, or for the cluster's nodes.
    pub password: Option<String>,
    /// Prefix of every key (default `thalamus:`). With `cluster_nodes` it must not contain
    /// `{` or `}` (the keys carry their own hash tags).
    pub key_prefix: String,
    /// Timeout of one connection attempt, ms (default 1000).
    pub connect_timeout_ms: u64,
    /// Timeout of one command, ms (default 1000).
    pub response_timeout_ms: u64,
    /// How many times the connection manager (or the cluster client) retries a reconnect or
    /// a redirected command before failing the commands waiting on it (default 4).
    pub reconnect_retries: usize,
    /// How many times one store operation is tried on transient failures (default 4).
    pub op_attempts: u32,
    /// Delay before the first retry of an operation, ms; doubles per retry up to 1 s
    /// (default 50).
    pub retry_delay_ms: u64,
    /// Replicas that must hold a write before it counts as acknowledged (Redis `WAIT`),
    /// default 0: off. When fewer acknowledge within `wait_timeout_ms`, the write fails as
    /// [`StoreError::Unavailable`] (it may still be on the master).
    pub wait_replicas: u32,
    /// How long `WAIT` waits for `wait_replicas`, ms (default 100). It blocks the shared
    /// connection to that master meanwhile, so keep it small.
    pub wait_timeout_ms: u64,
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            sentinels: Vec::new(),
            master_name: None,
            cluster_nodes: Vec::new(),
            db: 0,
            username: None,
            password: None,
            key_prefix: "thalamus:".into(),
            connect_timeout_ms: 1000,
            response_timeout_ms: 1000,
            reconnect_retries: 4,
            op_attempts: 4,
            retry_delay_ms: 50,
            wait_replicas: 0,
            wait_timeout_ms: 100,
        }
    }
}

/// Where the Redis master (or cluster) is found.
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
    /// A Redis Cluster.
    Cluster {
        /// Seed node URLs (`redis://host:port`).
        nodes: Vec<String>,
    },
}

fn with_scheme(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("redis://{addr}")
    }
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

    /// A configuration for a Redis Cluster given by seed nodes, other settings default.
    pub fn with_cluster_nodes(nodes: Vec<String>) -> Self {
        Self {
            cluster_nodes: nodes,
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
        if self.wait_replicas > 0 && self.wait_timeout_ms == 0 {
            return bad("wait_replicas > 0 needs wait_timeout_ms >= 1");
        }
        if self.wait_replicas > 0 && self.wait_timeout_ms >= self.response_timeout_ms {
            return bad(
                "wait_replicas > 0 needs wait_timeout_ms below response_timeout_ms \
                 (WAIT's answer would time out)",
            );
        }
        let sentinel = !self.sentinels.is_empty() || self.master_name.is_some();
        let cluster = !self.cluster_nodes.is_empty();
        let given = [self.url.is_some(), sentinel, cluster]
            .iter()
            .filter(|&&g| g)
            .count();
        if given > 1 {
            return bad(
                "give exactly one of url, sentinels with master_name, and cluster_nodes \
                 (several are given)",
            );
        }
        if cluster {
            if self.key_prefix.contains(['{', '}']) {
                return bad("key_prefix must not contain '{' or '}' with cluster_nodes");
            }
            if self.db != 0 {
                return bad("db must be 0 with cluster_nodes (Redis Cluster has one database)");
            }
            if self.cluster_nodes.iter().any(|n| n.trim().is_empty()) {
                return bad("cluster_nodes holds an empty address");
            }
            return Ok(RedisEndpoint::Cluster {
                nodes: self.cluster_nodes.iter().map(|n| with_scheme(n)).collect(),
            });
        }
        match (&self.url, self.sentinels.is_empty(), &self.master_name) {
            (Some(url), true, None) => Ok(RedisEndpoint::Url(url.clone())),
            (None, false, Some(name)) if !name.is_empty() => Ok(RedisEndpoint::Sentinel {
                sentinels: self.sentinels.iter().map(|s| with_scheme(s)).collect(),
                master_name: name.clone(),
            }),
            (Some(_), _, _) => bad("give either url or sentinels with master_name, not both"),
            (None, true, None) => bad("no url, no sentinels and no cluster_nodes given"),
            (None, true, Some(_)) => bad("master_name needs sentinels"),
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

/// Cluster PUT: the record key only (its slot is the dialog's own). Same KEYS and ARGV as
/// [`PUT`] (the last two are unused); the index entries were added before it ran.
const PUT_CLUSTER: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'v', 'k')
local v = tonumber(cur[1])
if v and cur[2] == ARGV[8] then return {1, v} end
if ARGV[1] == '' then
  if v then return {0, v} end
elseif not v then
  return {0, -1}
elseif v ~= tonumber(ARGV[1]) then
  return {0, v}
end
local nv = 1
if v then nv = v + 1 end
redis.call('HSET', KEYS[1], 'v', nv, 's', 'L', 'o', ARGV[3], 'e', ARGV[4], 'd', ARGV[5],
  't', ARGV[6], 'b', ARGV[2], 'k', ARGV[8])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return {1, nv}
";

/// Cluster DELETE: the record key only; same KEYS, ARGV and replies as [`DELETE`]. The index
/// entries stay until a list finds them stale.
const DELETE_CLUSTER: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'v', 's', 'k')
local v = tonumber(cur[1])
if not v then return {-1, 0} end
if cur[3] == ARGV[4] then return {1, v} end
if cur[2] ~= 'L' then
  if ARGV[1] == '' then return {1, v} end
  return {0, v}
end
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= v then return {0, v} end
redis.call('HSET', KEYS[1], 'v', v + 1, 's', 'T', 't', ARGV[3], 'k', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, v + 1}
";

/// Cluster CLAIM: the record key only. ARGV as [`CLAIM`] plus ARGV[8], the device the caller
/// indexed the dialog under before the script; replies as [`CLAIM`] plus {-3, 0} when the
/// record's device is another (the caller indexes again and retries).
const CLAIM_CLUSTER: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'v', 's', 'o', 'e', 'k', 'd')
local v = tonumber(cur[1])
if not v then return {-1, 0} end
if cur[5] ~= ARGV[5] then
  if cur[2] ~= 'L' then return {-2, v} end
  local e = tonumber(cur[4])
  if e ~= tonumber(ARGV[2]) then return {0, e} end
  if cur[6] ~= ARGV[8] then return {-3, 0} end
  redis.call('HSET', KEYS[1], 'v', v + 1, 'o', ARGV[1], 'e', e + 1, 't', ARGV[3], 'k', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
local r = redis.call('HMGET', KEYS[1], 'v', 's', 'o', 'e', 't', 'b')
return {1, r[1], r[2], r[3], r[4], r[5], r[6]}
";

/// Cluster index add. KEYS[1] an index (sorted set: member -> time of its last add, in
/// microseconds of the Redis server's clock). ARGV: the index TTL ms, then members. Raises the
/// TTL to at least ARGV[1] (sets it when the key has none), never lowers it. Returns the time.
const INDEX_ADD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now, ARGV[i])
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return now
";

/// Cluster index prune. KEYS[1] an index. ARGV: grace in microseconds, then pairs of member
/// and the add time the reader saw. Removes a member only when its add time is still the one
/// seen (no writer added it again since) and older than the grace (no writer can still be
/// between its index add and its script). Returns how many were removed.
const INDEX_PRUNE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local removed = 0
for i = 2, #ARGV, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) == tonumber(ARGV[i + 1])
      and tonumber(s) < now - tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    removed = removed + 1
  end
end
return removed
";

/// The fields every record read returns, in this order.
const RECORD_FIELDS: [&str; 6] = ["v", "s", "o", "e", "t", "b"];

/// The scripts of the layout in use: the single-master ones, or the cluster ones (the
/// cluster layout has no list script: lists read the index, then each record).
#[derive(Debug)]
struct Scripts {
    put: Script,
    delete: Script,
    claim: Script,
    list: Script,
    index_add: Script,
    index_prune: Script,
}

impl Scripts {
    fn new(cluster: bool) -> Self {
        if cluster {
            Self {
                put: Script::new(PUT_CLUSTER),
                delete: Script::new(DELETE_CLUSTER),
                claim: Script::new(CLAIM_CLUSTER),
                list: Script::new(LIST),
                index_add: Script::new(INDEX_ADD),
                index_prune: Script::new(INDEX_PRUNE),
            }
        } else {
            Self {
                put: Script::new(&format!("{LIB}{PUT}")),
                delete: Script::new(DELETE),
                claim: Script::new(&format!("{LIB}{CLAIM}")),
                list: Script::new(LIST),
                index_add: Script::new(INDEX_ADD),
                index_prune: Script::new(INDEX_PRUNE),
            }
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

/// The connection the store's commands go through: a connection manager to one master, or
/// redis-rs's cluster connection (which follows `MOVED`/`ASK` and refreshes the slot map).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Most write tokens remembered for retries of writes that failed as `Unavailable`.
const MAX_PENDING_TOKENS: usize = 4096;

/// The state shared by the store and its Sentinel watcher.
struct RedisInner {
    manager: RwLock<Option<Conn>>,
    /// Cluster layout (hash-tagged keys, indexes kept outside the scripts).
    cluster: bool,
    sentinel: Option<tokio::sync::Mutex<SentinelClient>>,
    master_addr: Mutex<String>,
    manager_config: ConnectionManagerConfig,
    prefix: String,
    scripts: Scripts,
    config: RedisStoreConfig,
    settings: StoreSettings,
    clock: Arc<dyn Clock>,
    /// Cluster mode: how long an index entry is safe from pruning after its add (a writer
    /// sends its script within half of it, a reader prunes only what it read within half).
    index_grace: Duration,
    /// Tokens of writes that failed as `Unavailable` after they may have been applied, by
    /// operation fingerprint: the same write tried again reuses its token, so it finds
    /// itself applied instead of conflicting with itself.
    pending_tokens: Mutex<HashMap<u64, String>>,
}

impl std::fmt::Debug for RedisInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDialogStore")
            .field("master", &self.master_addr.lock().map(|a| a.clone()).ok())
            .field("sentinel", &self.sentinel.is_some())
            .field("cluster", &self.cluster)
            .field("prefix", &self.prefix)
            .field("settings", &self.settings)
            .finish()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whether a Redis error may go away by itself (a retry, following a new master, or the
/// cluster settling after a failover or a slot move, may succeed).
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
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::Moved
                    | ServerErrorKind::Ask
            ) | ErrorKind::MasterNameNotFoundBySentinel
                | ErrorKind::ClusterConnectionNotFound
        )
}

/// The first transient server error among pipeline replies, as an error (so the whole
/// pipeline is tried again; its writes carry tokens, so a repeat is harmless).
fn transient_in(replies: &[Value]) -> RedisResult<()> {
    for reply in replies {
        if let Value::ServerError(_) = reply {
            if let Err(e) = reply.clone().extract_error() {
                if is_transient(&e) {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

fn is_noscript(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript))
}

fn random_token() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// The cluster hash tag of a string: its 64-bit FNV-1a hash in hex. Stable across builds
/// and platforms (it decides which slot a key lives in), and free of `{`/`}` whatever the
/// string holds.
fn tag(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A fingerprint of one write (what it is and what it writes), for [`RedisInner::token_for`].
fn op_id(parts: &[&[u8]]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for part in parts {
        part.hash(&mut h);
    }
    h.finish()
}

/// How long a cluster index entry is safe from pruning: twice the longest a writer's script
/// may follow its index add (every attempt of one operation at its connect, response and WAIT
/// timeouts plus the retry delay), at least 30 s.
fn index_grace(config: &RedisStoreConfig) -> Duration {
    let attempt = config
        .connect_timeout_ms
        .saturating_add(config.response_timeout_ms)
        .saturating_add(config.wait_timeout_ms)
        .saturating_add(1000);
    let budget = attempt
        .saturating_mul(u64::from(config.op_attempts))
        .saturating_mul(2);
    Duration::from_millis(budget.max(30_000))
}

impl RedisDialogStore {
    /// Connects to the master (through Sentinel when configured), or to the cluster. With a
    /// plain URL whose server does not answer, the store starts unconnected and connects at
    /// its first command (each operation meanwhile fails with [`StoreError::Unavailable`]);
    /// through Sentinel it fails with [`StoreError::Unavailable`] when no master can be found,
    /// and with a cluster when no seed node answers. [`StoreError::Backend`] on a bad
    /// configuration.
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
        let new_inner = |conn: Conn, sentinel, addr: String, cluster: bool| RedisInner {
            manager: RwLock::new(Some(conn)),
            cluster,
            sentinel,
            master_addr: Mutex::new(addr),
            manager_config: manager_config.clone(),
            prefix: config.key_prefix.clone(),
            scripts: Scripts::new(cluster),
            config: config.clone(),
            settings,
            clock: clock.clone(),
            index_grace: index_grace(config),
            pending_tokens: Mutex::new(HashMap::new()),
        };
        if let RedisEndpoint::Cluster { nodes } = &endpoint {
            let mut builder = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
                .response_timeout(Duration::from_millis(config.response_timeout_ms))
                .retries(u32::try_from(config.reconnect_retries).unwrap_or(u32::MAX))
                .min_retry_wait(config.retry_delay_ms.max(1))
                .max_retry_wait(1000);
            if let Some(user) = &config.username {
                builder = builder.username(user);
            }
            if let Some(password) = &config.password {
                builder = builder.password(password);
            }
            let client = builder
                .build()
                .map_err(|e| StoreError::Backend(format!("redis cluster config: {e}")))?;
            let conn = client
                .get_async_connection()
                .await
                .map_err(|e| StoreError::Unavailable(format!("redis cluster {nodes:?}: {e}")))?;
            let inner = new_inner(Conn::Cluster(conn), None, nodes.join(","), true);
            return Ok(Self {
                inner: Arc::new(inner),
                watcher: Mutex::new(None),
            });
        }
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
            RedisEndpoint::Cluster { .. } => {
                return Err(StoreError::Backend(
                    "redis store: a cluster endpoint on the single-master path".into(),
                ));
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
            RedisEndpoint::Url(_) | RedisEndpoint::Cluster { .. } => None,
        };
        let inner = Arc::new(new_inner(
            Conn::Single(manager),
            sentinel,
            master_addr,
            false,
        ));
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

    /// The address of the master in use (`host:port`); with a cluster, the seed nodes.
    pub fn master_address(&self) -> String {
        self.inner.master_address()
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Whether the store uses the cluster layout.
    pub fn is_cluster(&self) -> bool {
        self.inner.cluster
    }

    /// The Redis key of a dialog's record (in cluster mode, with its hash tag).
    pub fn record_key(&self, key: &DialogKey) -> String {
        self.inner.dialog_key(&key.storage_key())
    }

    /// The Redis key of a device's index (`dev`) or of a node's index (`own`; any other
    /// `index` is taken as `own`).
    pub fn index_key(&self, index: &str, value: &str) -> String {
        if index == "dev" {
            self.inner.index_key(Index::Device, value)
        } else {
            self.inner.index_key(Index::Owner, value)
        }
    }
}

/// Which index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Index {
    Device,
    Owner,
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
        if self.cluster {
            format!("{}dlg:{{{}}}{storage_key}", self.prefix, tag(storage_key))
        } else {
            format!("{}dlg:{storage_key}", self.prefix)
        }
    }

    fn index_key(&self, index: Index, value: &str) -> String {
        let (name, mark) = match index {
            Index::Device => ("dev", 'd'),
            Index::Owner => ("own", 'o'),
        };
        if self.cluster {
            format!("{}{name}:{{{mark}:{}}}{value}", self.prefix, tag(value))
        } else {
            format!("{}{name}:{value}", self.prefix)
        }
    }

    fn manager(&self) -> Result<Conn, StoreError> {
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
                        *slot = Some(Conn::Single(manager));
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
        F: FnMut(Conn) -> Fut,
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

    /// The token for a write: the one remembered for the same write after it failed as
    /// `Unavailable` (it may have been applied), else a new one.
    fn token_for(&self, op: u64) -> String {
        self.pending_tokens
            .lock()
            .ok()
            .and_then(|p| p.get(&op).cloned())
            .unwrap_or_else(random_token)
    }

    /// Remembers the token of a write that failed as `Unavailable`; forgets it otherwise.
    fn settle<T>(&self, op: u64, token: &str, result: &Result<T, StoreError>) {
        let Ok(mut pending) = self.pending_tokens.lock() else {
            return;
        };
        if matches!(result, Err(StoreError::Unavailable(_))) {
            if pending.len() >= MAX_PENDING_TOKENS {
                pending.clear();
            }
            pending.insert(op, token.to_owned());
        } else {
            pending.remove(&op);
        }
    }

    fn put_op_id(record: &StoredDialog, expected_version: Option<u64>) -> Result<u64, StoreError> {
        let mut normal = record.clone();
        normal.version = 0;
        normal.updated_at_ms = 0;
        normal.state = DialogState::Live;
        let body = normal.encode()?;
        let expected = expected_version.map(|v| v.to_string()).unwrap_or_default();
        Ok(op_id(&[
            b"put",
            record.key.storage_key().as_bytes(),
            expected.as_bytes(),
            &body,
        ]))
    }

    fn delete_op_id(key: &DialogKey, expected_version: Option<u64>) -> u64 {
        let expected = expected_version.map(|v| v.to_string()).unwrap_or_default();
        op_id(&[b"delete", key.storage_key().as_bytes(), expected.as_bytes()])
    }

    /// Cluster mode: adds `member` to the indexes (each in its own slot, concurrently), and
    /// returns when the first add was sent: the writer's script must follow within half the
    /// index grace of it.
    async fn index_add(&self, entries: &[(String, &str)]) -> Result<Instant, StoreError> {
        let started = Instant::now();
        let ttl = ms(self.settings.live_ttl.saturating_add(self.index_grace));
        let adds = entries.iter().map(|(set, member)| {
            let mut inv = self.scripts.index_add.prepare_invoke();
            inv.key(set).arg(ttl).arg(*member);
            async move {
                self.run("index add", |mut conn| {
                    let inv = &inv;
                    async move { inv.invoke_async::<i64>(&mut conn).await }
                })
                .await
            }
        });
        futures::future::try_join_all(adds).await?;
        Ok(started)
    }

    /// Runs one write script: alone (EVALSHA, loading the script on NOSCRIPT) when no WAIT is
    /// configured; otherwise in one pipeline with `WAIT` after it, on the connection to the
    /// node that takes the write. Returns the script's reply and, separately, whether WAIT
    /// was satisfied (a failed compare-and-set wrote nothing, so its WAIT does not matter).
    /// `index_added`: cluster mode, when the index entries were sent; once half the index
    /// grace has passed the script is not sent (`Unavailable`: the caller tries again,
    /// adding the entries again).
    async fn eval_write(
        &self,
        what: &'static str,
        script: &Script,
        inv: &redis::ScriptInvocation<'_>,
        index_added: Option<Instant>,
    ) -> Result<(Value, Result<(), StoreError>), StoreError> {
        let half_grace = self.index_grace / 2;
        let wait = self.config.wait_replicas;
        let mut pipe = redis::pipe();
        pipe.invoke_script(inv);
        if wait > 0 {
            pipe.cmd("WAIT").arg(wait).arg(self.config.wait_timeout_ms);
        }
        let count = if wait > 0 { 2 } else { 1 };
        let replies = self
            .run(what, |mut conn| {
                let pipe = &pipe;
                async move {
                    if index_added.is_some_and(|t| t.elapsed() > half_grace) {
                        return Ok(None);
                    }
                    if wait == 0 {
                        let reply: Value = inv.invoke_async(&mut conn).await?;
                        return Ok(Some(vec![reply]));
                    }
                    let mut replies = conn.req_packed_commands(pipe, 0, count).await?;
                    if replies.first().is_some_and(is_noscript) {
                        script.load_async(&mut conn).await?;
                        replies = conn.req_packed_commands(pipe, 0, count).await?;
                    }
                    transient_in(&replies)?;
                    Ok(Some(replies))
                }
            })
            .await?;
        let Some(replies) = replies else {
            return Err(StoreError::Unavailable(format!(
                "redis {what}: not sent within {} ms of its index entries",
                half_grace.as_millis()
            )));
        };
        let mut replies = replies.into_iter();
        let reply = replies
            .next()
            .ok_or_else(|| StoreError::Backend(format!("redis {what}: no reply")))?;
        if let Value::ServerError(e) = &reply {
            return Err(StoreError::Backend(format!("redis {what}: {e:?}")));
        }
        let waited = if wait > 0 {
            self.check_wait(what, replies.next().as_ref())
        } else {
            Ok(())
        };
        Ok((reply, waited))
    }

    /// Whether a WAIT reply counts `wait_replicas`.
    fn check_wait(&self, what: &str, reply: Option<&Value>) -> Result<(), StoreError> {
        let wanted = self.config.wait_replicas;
        match reply.and_then(int) {
            Some(n) if n >= i64::from(wanted) => Ok(()),
            Some(n) => Err(StoreError::Unavailable(format!(
                "redis {what}: {n} of {wanted} replicas acknowledged the write within {} ms \
                 (WAIT); it is on the master but a failover may lose it, and repeating the \
                 same write is safe",
                self.config.wait_timeout_ms
            ))),
            None => Err(StoreError::Unavailable(format!(
                "redis {what}: WAIT answered {reply:?}"
            ))),
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

    /// One put: in cluster mode the index entries first, then the script (and WAIT).
    async fn put_once(
        &self,
        record: &StoredDialog,
        expected_version: Option<u64>,
        token: &str,
    ) -> Result<u64, StoreError> {
        let inv = self.put_invocation(record, expected_version, token)?;
        let added = if self.cluster {
            let member = record.key.storage_key();
            Some(
                self.index_add(&[
                    (self.index_key(Index::Device, &record.device_id), &member),
                    (self.index_key(Index::Owner, &record.owner), &member),
                ])
                .await?,
            )
        } else {
            None
        };
        let (reply, waited) = self
            .eval_write("put", &self.scripts.put, &inv, added)
            .await?;
        let version = version_reply("put", &reply)?;
        waited?;
        Ok(version)
    }

    async fn put_tracked(
        &self,
        record: &StoredDialog,
        expected_version: Option<u64>,
    ) -> Result<u64, StoreError> {
        let op = Self::put_op_id(record, expected_version)?;
        let token = self.token_for(op);
        let result = self.put_once(record, expected_version, &token).await;
        self.settle(op, &token, &result);
        result
    }

    async fn delete_tracked(
        &self,
        key: &DialogKey,
        expected_version: Option<u64>,
    ) -> Result<u64, StoreError> {
        let op = Self::delete_op_id(key, expected_version);
        let token = self.token_for(op);
        let result = async {
            let inv = self.delete_invocation(key, expected_version, &token)?;
            let (reply, waited) = self
                .eval_write("delete", &self.scripts.delete, &inv, None)
                .await?;
            let version = version_reply("delete", &reply)?;
            waited?;
            Ok(version)
        }
        .await;
        self.settle(op, &token, &result);
        result
    }

    async fn claim_tracked(
        &self,
        key: &DialogKey,
        node_id: &str,
        expected_epoch: u64,
    ) -> Result<StoredDialog, StoreError> {
        key.validate()?;
        crate::rules::validate_node_id(node_id)?;
        let storage_key = key.storage_key();
        let epoch = expected_epoch.to_string();
        let op = op_id(&[
            b"claim",
            storage_key.as_bytes(),
            node_id.as_bytes(),
            epoch.as_bytes(),
        ]);
        let token = self.token_for(op);
        let result = self
            .claim_once(key, &storage_key, node_id, expected_epoch, &token)
            .await;
        self.settle(op, &token, &result);
        result
    }

    async fn claim_once(
        &self,
        key: &DialogKey,
        storage_key: &str,
        node_id: &str,
        expected_epoch: u64,
        token: &str,
    ) -> Result<StoredDialog, StoreError> {
        let dialog_key = self.dialog_key(storage_key);
        // Cluster mode: the record's device is read first, so the dialog is in both indexes
        // before the script moves it; the script refuses (-3) if the device changed since.
        let mut rounds = 0;
        loop {
            rounds += 1;
            let (device, added) = if self.cluster {
                let read: Value = self
                    .run("claim read", |mut conn| {
                        let mut cmd = redis::cmd("HMGET");
                        cmd.arg(&dialog_key).arg("d").arg("s");
                        async move { cmd.query_async(&mut conn).await }
                    })
                    .await?;
                let fields = array(&read).ok_or_else(|| unexpected("claim read", &read))?;
                let device = fields.first().and_then(text).map(str::to_owned);
                let live = fields.get(1).and_then(text) == Some("L");
                match device {
                    Some(device) if live => {
                        let added = self
                            .index_add(&[
                                (self.index_key(Index::Device, &device), storage_key),
                                (self.index_key(Index::Owner, node_id), storage_key),
                            ])
                            .await?;
                        (device, Some(added))
                    }
                    _ => (String::new(), None),
                }
            } else {
                (String::new(), None)
            };
            let mut inv = self.scripts.claim.prepare_invoke();
            inv.key(&dialog_key)
                .arg(node_id)
                .arg(expected_epoch)
                .arg(self.clock.now_ms())
                .arg(ms(self.settings.live_ttl))
                .arg(token)
                .arg(&self.prefix)
                .arg(storage_key)
                .arg(&device);
            let (reply, waited) = self
                .eval_write("claim", &self.scripts.claim, &inv, added)
                .await?;
            let items = array(&reply).ok_or_else(|| unexpected("claim", &reply))?;
            let status = items.first().and_then(int);
            let value = items
                .get(1)
                .and_then(int)
                .and_then(|v| u64::try_from(v).ok());
            return match (status, items.get(1..)) {
                (Some(1), Some(tuple)) => {
                    let record = decode_tuple(tuple)?.ok_or_else(|| unexpected("claim", &reply))?;
                    waited?;
                    Ok(record)
                }
                (Some(0), _) => Err(StoreError::Conflict { current: value }),
                (Some(-1), _) => Err(StoreError::NotFound),
                (Some(-2), _) => Err(StoreError::Tombstoned {
                    version: value.unwrap_or(0),
                }),
                (Some(-3), _) if rounds < 4 => continue,
                (Some(-3), _) => Err(StoreError::Unavailable(format!(
                    "redis claim of {key}: the record's device kept changing"
                ))),
                _ => Err(unexpected("claim", &reply)),
            };
        }
    }

    async fn list(
        &self,
        index: Index,
        value: &str,
        limit: usize,
    ) -> Result<Vec<StoredDialog>, StoreError> {
        if self.cluster {
            return self.list_cluster(index, value, limit).await;
        }
        let (name, field) = match index {
            Index::Device => ("dev", "d"),
            Index::Owner => ("own", "o"),
        };
        let set = format!("{}{name}:{value}", self.prefix);
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

    /// Cluster mode: reads the index, then each member's record (concurrently; each in its
    /// own slot), keeps the live ones that still name `value`, and prunes the others that no
    /// writer can still be about to write (see [`INDEX_PRUNE`]).
    async fn list_cluster(
        &self,
        index: Index,
        value: &str,
        limit: usize,
    ) -> Result<Vec<StoredDialog>, StoreError> {
        use futures::StreamExt;
        let set = self.index_key(index, value);
        let field = match index {
            Index::Device => "d",
            Index::Owner => "o",
        };
        let started = Instant::now();
        let reply: Value = self
            .run("list", |mut conn| {
                let mut cmd = redis::cmd("ZRANGE");
                cmd.arg(&set).arg(0).arg(-1).arg("WITHSCORES");
                async move { cmd.query_async(&mut conn).await }
            })
            .await?;
        let members = index_members(&reply).ok_or_else(|| unexpected("list", &reply))?;
        let keys: Vec<String> = members.iter().map(|(m, _)| self.dialog_key(m)).collect();
        let reads: Vec<Result<Value, StoreError>> =
            futures::stream::iter(keys.into_iter().map(|key| async move {
                self.run("list read", |mut conn| {
                    let mut cmd = redis::cmd("HMGET");
                    cmd.arg(&key).arg(&RECORD_FIELDS[..]).arg(field);
                    async move { cmd.query_async::<Value>(&mut conn).await }
                })
                .await
            }))
            .buffered(64)
            .collect()
            .await;
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for ((member, score), read) in members.iter().zip(reads) {
            let read = read?;
            let fields = array(&read).ok_or_else(|| unexpected("list read", &read))?;
            let (tuple, named) = match fields {
                [tuple @ .., named] if tuple.len() == RECORD_FIELDS.len() => (tuple, named),
                _ => return Err(unexpected("list read", &read)),
            };
            let record = decode_tuple(tuple)?;
            let matches = text(named) == Some(value);
            match record {
                Some(record) if matches && record.state == DialogState::Live => {
                    if out.len() < limit {
                        out.push(record);
                    }
                }
                _ => stale.push((member, score)),
            }
        }
        // Prune only what was read within half the grace (a writer's script follows its index
        // add within the other half); a failed prune is left to the next list.
        if !stale.is_empty() && started.elapsed() < self.index_grace / 2 {
            let grace_us = u64::try_from(self.index_grace.as_micros()).unwrap_or(u64::MAX);
            let mut inv = self.scripts.index_prune.prepare_invoke();
            inv.key(&set).arg(grace_us);
            for (member, score) in &stale {
                inv.arg(member.as_str()).arg(score.as_str());
            }
            let pruned = self
                .run("index prune", |mut conn| {
                    let inv = &inv;
                    async move { inv.invoke_async::<i64>(&mut conn).await }
                })
                .await;
            if let Err(e) = pruned {
                tracing::debug!(error = %e, index = %set, "index prune failed; the next list retries");
            }
        }
        Ok(out)
    }

    /// Cluster mode: a batch as concurrent writes, one task per dialog writing that dialog's
    /// ops in order; each write is a put or delete of its own (index adds, script, WAIT).
    async fn write_batch_cluster(&self, ops: &[WriteOp]) -> Vec<Result<u64, StoreError>> {
        use futures::StreamExt;
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut by_key: HashMap<&DialogKey, usize> = HashMap::new();
        for (i, op) in ops.iter().enumerate() {
            let group = *by_key.entry(op.key()).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            if let Some(g) = groups.get_mut(group) {
                g.push(i);
            }
        }
        let done: Vec<Vec<(usize, Result<u64, StoreError>)>> =
            futures::stream::iter(groups.into_iter().map(|group| async move {
                let mut out = Vec::with_capacity(group.len());
                for i in group {
                    let result = match ops.get(i) {
                        Some(WriteOp::Put {
                            record,
                            expected_version,
                        }) => self.put_tracked(record, *expected_version).await,
                        Some(WriteOp::Delete {
                            key,
                            expected_version,
                        }) => self.delete_tracked(key, *expected_version).await,
                        None => Err(StoreError::Backend("write batch index".into())),
                    };
                    out.push((i, result));
                }
                out
            }))
            .buffer_unordered(32)
            .collect()
            .await;
        let mut results: Vec<Result<u64, StoreError>> = (0..ops.len())
            .map(|_| {
                Err(StoreError::Backend(
                    "redis write batch: reply missing".into(),
                ))
            })
            .collect();
        for (i, result) in done.into_iter().flatten() {
            if let Some(slot) = results.get_mut(i) {
                *slot = result;
            }
        }
        results
    }
}

/// Reads a `ZRANGE ... WITHSCORES` reply (flat in RESP2, pairs in RESP3) as member and score
/// text.
fn index_members(v: &Value) -> Option<Vec<(String, String)>> {
    let items = array(v)?;
    let mut out = Vec::with_capacity(items.len() / 2);
    if items.iter().all(|i| array(i).is_some()) {
        for pair in items {
            let [m, s] = array(pair)? else {
                return None;
            };
            out.push((text(m)?.to_owned(), score_text(s)?));
        }
    } else {
        for pair in items.chunks(2) {
            let [m, s] = pair else {
                return None;
            };
            out.push((text(m)?.to_owned(), score_text(s)?));
        }
    }
    Some(out)
}

fn score_text(v: &Value) -> Option<String> {
    match v {
        Value::Double(d) => Some(format!("{d:.0}")),
        Value::Int(i) => Some(i.to_string()),
        other => text(other).map(str::to_owned),
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
        Box::pin(async move { self.put_tracked(record, expected_version).await })
    }

    fn delete<'a>(
        &'a self,
        key: &'a DialogKey,
        expected_version: Option<u64>,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move { self.delete_tracked(key, expected_version).await })
    }

    fn claim<'a>(
        &'a self,
        key: &'a DialogKey,
        node_id: &'a str,
        expected_epoch: u64,
    ) -> StoreFuture<'a, StoredDialog> {
        Box::pin(async move { self.claim_tracked(key, node_id, expected_epoch).await })
    }

    fn list_by_device<'a>(&'a self, device_id: &'a str) -> StoreFuture<'a, Vec<StoredDialog>> {
        Box::pin(async move { self.list(Index::Device, device_id, usize::MAX).await })
    }

    fn list_by_owner<'a>(
        &'a self,
        node_id: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredDialog>> {
        Box::pin(async move { self.list(Index::Owner, node_id, limit).await })
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
            self.manager()?;
            if self.cluster {
                return Ok(self.write_batch_cluster(&ops).await);
            }
            // Invalid ops get their error without being sent; the rest go in one pipeline,
            // after SCRIPT LOAD of both scripts (so a restarted Redis has them), and WAIT last
            // when configured.
            let mut results: Vec<Option<Result<u64, StoreError>>> = Vec::with_capacity(ops.len());
            let mut tokens: Vec<Option<(u64, String)>> = Vec::with_capacity(ops.len());
            let mut pipe = redis::pipe();
            pipe.load_script(&self.scripts.put)
                .load_script(&self.scripts.delete);
            let mut sent = 0usize;
            for op in &ops {
                let (op_id, inv) = match op {
                    WriteOp::Put {
                        record,
                        expected_version,
                    } => match Self::put_op_id(record, *expected_version) {
                        Ok(id) => {
                            let token = self.token_for(id);
                            let inv = self.put_invocation(record, *expected_version, &token);
                            (Some((id, token)), inv)
                        }
                        Err(e) => (None, Err(e)),
                    },
                    WriteOp::Delete {
                        key,
                        expected_version,
                    } => {
                        let id = Self::delete_op_id(key, *expected_version);
                        let token = self.token_for(id);
                        let inv = self.delete_invocation(key, *expected_version, &token);
                        (Some((id, token)), inv)
                    }
                };
                match inv {
                    Ok(inv) => {
                        pipe.invoke_script(&inv);
                        sent += 1;
                        results.push(None);
                        tokens.push(op_id);
                    }
                    Err(e) => {
                        results.push(Some(Err(e)));
                        tokens.push(None);
                    }
                }
            }
            if sent == 0 {
                return Ok(results.into_iter().flatten().collect());
            }
            let wait = self.config.wait_replicas;
            if wait > 0 {
                pipe.cmd("WAIT").arg(wait).arg(self.config.wait_timeout_ms);
            }
            let count = sent + 2 + usize::from(wait > 0);
            let replies: Result<Vec<Value>, StoreError> = self
                .run("write batch", |mut conn| {
                    let pipe = &pipe;
                    async move { conn.req_packed_commands(pipe, 0, count).await }
                })
                .await;
            let replies = match replies {
                Ok(replies) => replies,
                Err(e) => {
                    for (id, token) in tokens.iter().flatten() {
                        self.settle::<()>(*id, token, &Err(e.clone()));
                    }
                    return Err(e);
                }
            };
            let waited = if wait > 0 {
                self.check_wait("write batch", replies.get(sent + 2))
            } else {
                Ok(())
            };
            let mut replies = replies.into_iter().skip(2);
            let results: Vec<Result<u64, StoreError>> = results
                .into_iter()
                .map(|slot| match slot {
                    Some(done) => done,
                    None => match replies.next() {
                        Some(Value::ServerError(e)) => {
                            Err(StoreError::Backend(format!("redis write batch: {e:?}")))
                        }
                        Some(reply) => version_reply("write batch", &reply)
                            .and_then(|v| waited.clone().map(|()| v)),
                        None => Err(StoreError::Backend(
                            "redis write batch: reply missing".into(),
                        )),
                    },
                })
                .collect();
            for (result, token) in results.iter().zip(&tokens) {
                if let Some((id, token)) = token {
                    self.settle(*id, token, result);
                }
            }
            Ok(results)
        })
    }

    /// The master's `run_id` (`INFO server`): a restart or a failover changes it. In a
    /// cluster, the cluster's current epoch (`CLUSTER INFO`), which every failover raises (a
    /// slot migration may too: the node then writes its records again, which costs but
    /// loses nothing).
    fn instance(&self) -> StoreFuture<'_, Option<String>> {
        Box::pin(async move {
            if self.cluster {
                let info: String = self
                    .run("instance", |mut c| async move {
                        redis::cmd("CLUSTER").arg("INFO").query_async(&mut c).await
                    })
                    .await?;
                return Ok(info
                    .lines()
                    .find_map(|l| l.strip_prefix("cluster_current_epoch:"))
                    .map(|e| format!("epoch {}", e.trim())));
            }
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
        assert_eq!(
            RedisStoreConfig::with_cluster_nodes(vec![
                "10.0.0.1:7000".into(),
                "redis://10.0.0.2:7000".into()
            ])
            .endpoint(),
            Ok(RedisEndpoint::Cluster {
                nodes: vec![
                    "redis://10.0.0.1:7000".into(),
                    "redis://10.0.0.2:7000".into()
                ]
            })
        );
        let message = |c: &RedisStoreConfig| match c.endpoint() {
            Err(StoreError::Backend(m)) => m,
            other => panic!("{other:?}"),
        };
        let mut mixed = RedisStoreConfig::with_cluster_nodes(vec!["a:1".into()]);
        mixed.url = Some("redis://x/".into());
        assert!(message(&mixed).contains("cluster_nodes"));
        let mut mixed = RedisStoreConfig::with_cluster_nodes(vec!["a:1".into()]);
        mixed.sentinels = vec!["s:1".into()];
        mixed.master_name = Some("m".into());
        assert!(message(&mixed).contains("exactly one of"));
        let mut braces = RedisStoreConfig::with_cluster_nodes(vec!["a:1".into()]);
        braces.key_prefix = "t{1}:".into();
        assert!(message(&braces).contains("key_prefix"));
        let mut db = RedisStoreConfig::with_cluster_nodes(vec!["a:1".into()]);
        db.db = 2;
        assert!(message(&db).contains("db"));
        assert!(message(&RedisStoreConfig::default()).contains("cluster_nodes"));
        let mut wait = RedisStoreConfig::with_url("redis://x/");
        wait.wait_replicas = 1;
        assert_eq!(wait.endpoint(), Ok(RedisEndpoint::Url("redis://x/".into())));
        wait.wait_timeout_ms = 0;
        assert!(message(&wait).contains("wait_timeout_ms >= 1"));
        wait.wait_timeout_ms = 1000;
        assert!(message(&wait).contains("response_timeout_ms"));
        let c: RedisStoreConfig = toml::from_str(
            "cluster_nodes = [\"127.0.0.1:7000\"]\nwait_replicas = 1\nwait_timeout_ms = 50\n",
        )
        .unwrap();
        assert_eq!((c.wait_replicas, c.wait_timeout_ms), (1, 50));
        assert!(c.endpoint().is_ok());
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
    fn hash_tags_are_stable_and_brace_free() {
        // FNV-1a 64 test vectors: the slot of every stored dialog depends on them.
        assert_eq!(tag(""), "cbf29ce484222325");
        assert_eq!(tag("a"), "af63dc4c8601ec8c");
        assert!(!tag("{x}").contains(['{', '}']));
        let members = index_members(&Value::Array(vec![
            Value::BulkString(b"m1".to_vec()),
            Value::BulkString(b"1700000000000001".to_vec()),
            Value::BulkString(b"m2".to_vec()),
            Value::BulkString(b"5".to_vec()),
        ]))
        .unwrap();
        assert_eq!(
            members,
            vec![
                ("m1".to_owned(), "1700000000000001".to_owned()),
                ("m2".to_owned(), "5".to_owned())
            ]
        );
        assert_eq!(index_members(&Value::Array(vec![Value::Nil])), None);
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
