//! The dialog store against a real Redis Cluster (3 masters, 3 replicas on loopback): the
//! conformance suite, the cluster key layout and its indexes kept outside the scripts (added
//! before, pruned by readers), a manual failover under writes, and a slot migration under
//! reads, writes and claims.
//!
//! Each test starts its own cluster and kills it at the end; without `redis-server` and
//! `redis-cli` installed the tests fail with a message saying so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod store_support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use store_support::{cli, RedisCluster};
use thalamus_dialog_store::conformance::{self, record, Harness};
use thalamus_dialog_store::redis::{RedisDialogStore, RedisStoreConfig};
use thalamus_dialog_store::{
    DialogState, DialogStore, ManualClock, StoreError, StoreSettings, StoredDialog, WriteOp,
};

async fn connect(config: &RedisStoreConfig) -> RedisDialogStore {
    RedisDialogStore::connect(
        config,
        StoreSettings::default(),
        Arc::new(ManualClock::new(conformance::START_MS)),
    )
    .await
    .unwrap()
}

async fn raw(cluster: &RedisCluster) -> redis::cluster_async::ClusterConnection {
    let seeds: Vec<String> = cluster
        .seeds()
        .iter()
        .map(|s| format!("redis://{s}"))
        .collect();
    redis::cluster::ClusterClient::new(seeds)
        .unwrap()
        .get_async_connection()
        .await
        .unwrap()
}

async fn keyslot(conn: &mut redis::cluster_async::ClusterConnection, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

/// The cluster slot of a key: CRC16 (XMODEM) of its hash tag (or of the whole key), mod 16384.
fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &bytes[open + 1..open + 1 + close])
        })
        .unwrap_or(bytes);
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// The Redis server clock in microseconds (as the index scores are).
async fn server_micros(conn: &mut redis::cluster_async::ClusterConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    secs * 1_000_000 + micros
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_passes_the_conformance_suite() {
    let cluster = RedisCluster::start();
    let clock = ManualClock::new(conformance::START_MS);
    let settings = StoreSettings::default();
    let store = RedisDialogStore::connect(
        &RedisStoreConfig::with_cluster_nodes(cluster.seeds()),
        settings,
        Arc::new(clock.clone()),
    )
    .await
    .unwrap();
    assert!(store.is_cluster());
    assert_eq!(store.backend_name(), "redis");
    let harness = Harness {
        clock: &clock,
        expiry_follows_clock: false,
        settings,
    };
    conformance::run_all(&store, harness).await.unwrap();
    let store: Arc<dyn DialogStore> = Arc::new(store);
    conformance::concurrent_claims(store.clone(), 48)
        .await
        .unwrap();
    store.close().await.unwrap();
    assert_eq!(
        store.get(&record("x", "d", "n").key).await,
        Err(StoreError::Closed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_layout_and_indexes_outside_the_scripts() {
    let cluster = RedisCluster::start();
    let store = connect(&RedisStoreConfig::with_cluster_nodes(cluster.seeds())).await;
    let mut conn = raw(&cluster).await;

    // A Call-ID with braces: the record's slot is its hash tag's, not the Call-ID's.
    let r = record("{brace}-call@host", "dev-layout", "node-layout");
    assert_eq!(store.put(&r, None).await, Ok(1));
    let key = store.record_key(&r.key);
    let storage = r.key.storage_key();
    assert!(key.starts_with("thalamus:dlg:{"), "{key}");
    assert!(key.ends_with(&storage), "{key}");
    let dev = store.index_key("dev", "dev-layout");
    let own = store.index_key("own", "node-layout");
    assert!(dev.starts_with("thalamus:dev:{d:"), "{dev}");
    assert!(own.starts_with("thalamus:own:{o:"), "{own}");
    let slots: HashSet<u16> = [
        keyslot(&mut conn, &key).await,
        keyslot(&mut conn, &dev).await,
        keyslot(&mut conn, &own).await,
    ]
    .into_iter()
    .collect();
    assert_eq!(slots.len(), 3, "record and indexes share a slot");
    let fields: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(fields["v"], "1");
    assert_eq!(fields["d"], "dev-layout");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let index_ttl: i64 = redis::cmd("PTTL")
        .arg(&dev)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        index_ttl > ttl,
        "index TTL {index_ttl} not above record TTL {ttl}"
    );
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(&own)
        .arg(&storage)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(score.is_some(), "not in the owner index");

    // The index add happens before the script: a put that loses its compare-and-set (the
    // script refuses it) still left its index entries.
    let absent = record("never-written", "dev-layout", "node-layout");
    assert_eq!(
        store.put(&absent, Some(5)).await,
        Err(StoreError::Conflict { current: None })
    );
    let ghost = absent.key.storage_key();
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(&dev)
        .arg(&ghost)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(score.is_some(), "the refused put left no index entry");
    // A reader does not list it, and does not prune it yet: a writer may still be between
    // its index add and its script.
    let listed = store.list_by_device("dev-layout").await.unwrap();
    assert_eq!(listed.len(), 1);
    let still: Option<f64> = redis::cmd("ZSCORE")
        .arg(&dev)
        .arg(&ghost)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(still.is_some(), "a fresh entry was pruned");

    // Entries older than the grace whose record is gone, ended or moved are pruned; the live
    // one stays.
    let moved = record("moves-device", "dev-layout", "node-layout");
    store.put(&moved, None).await.unwrap();
    let mut elsewhere = moved.clone();
    elsewhere.device_id = "dev-other".into();
    assert_eq!(store.put(&elsewhere, Some(1)).await, Ok(2));
    let ended = record("ends", "dev-layout", "node-layout");
    store.put(&ended, None).await.unwrap();
    store.delete(&ended.key, None).await.unwrap();
    let listed = store.list_by_device("dev-layout").await.unwrap();
    assert_eq!(
        listed.iter().map(|d| d.key.clone()).collect::<Vec<_>>(),
        vec![r.key.clone()]
    );
    let old = server_micros(&mut conn).await - 3_600_000_000;
    for member in [&ghost, &moved.key.storage_key(), &ended.key.storage_key()] {
        let _: i64 = redis::cmd("ZADD")
            .arg(&dev)
            .arg("XX")
            .arg(old)
            .arg(member)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: i64 = redis::cmd("ZADD")
        .arg(&dev)
        .arg("XX")
        .arg(old)
        .arg(&storage)
        .query_async(&mut conn)
        .await
        .unwrap();
    let listed = store.list_by_device("dev-layout").await.unwrap();
    assert_eq!(listed.len(), 1);
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(&dev)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members, vec![storage.clone()], "stale entries not pruned");
    assert_eq!(store.list_by_device("dev-other").await.unwrap().len(), 1);

    // A claim indexes the new owner first; the old owner's index over-lists until pruned.
    let claimed = store.claim(&r.key, "node-two", 0).await.unwrap();
    assert_eq!((claimed.owner.as_str(), claimed.epoch), ("node-two", 1));
    assert!(store
        .list_by_owner("node-layout", 100)
        .await
        .unwrap()
        .iter()
        .all(|d| d.key != r.key));
    assert_eq!(store.list_by_owner("node-two", 100).await.unwrap().len(), 1);

    // Leases are single keys.
    store
        .renew_lease("node-layout", Duration::from_secs(20))
        .await
        .unwrap();
    let left = store.lease_remaining("node-layout").await.unwrap().unwrap();
    assert!(left > Duration::from_secs(19), "{left:?}");
    assert_eq!(store.sweep().await.unwrap(), Default::default());
}

/// Writes every dialog's record again (bumping `call_ref`) until `stop`, retrying a write
/// that failed as unavailable with the very same record (which must then succeed, not
/// conflict), and creating new dialogs as it goes. Returns the versions acknowledged.
async fn keep_writing(
    store: Arc<RedisDialogStore>,
    mut acked: BTreeMap<String, u64>,
    stop: Arc<AtomicBool>,
) -> (BTreeMap<String, u64>, usize) {
    let mut transient = 0usize;
    let mut round = 0u32;
    let mut created = 0usize;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let keys: Vec<String> = acked.keys().cloned().collect();
        for call_id in keys.iter().take(60) {
            let mut r = record(call_id, &device_of(call_id), "node-a");
            r.call_ref = round;
            let expected = acked[call_id];
            let version = write_until_acked(&store, &r, Some(expected), &mut transient).await;
            assert_eq!(version, expected + 1);
            acked.insert(call_id.clone(), version);
        }
        let call_id = format!("during-{created}");
        created += 1;
        let r = record(&call_id, &device_of(&call_id), "node-a");
        let version = write_until_acked(&store, &r, None, &mut transient).await;
        acked.insert(call_id, version);
    }
    (acked, transient)
}

async fn write_until_acked(
    store: &RedisDialogStore,
    r: &StoredDialog,
    expected: Option<u64>,
    transient: &mut usize,
) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store.put(r, expected).await {
            Ok(v) => return v,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                *transient += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("write of {} at {expected:?}: {e}", r.key.call_id),
        }
    }
}

fn device_of(call_id: &str) -> String {
    let n: usize = call_id.bytes().map(usize::from).sum();
    format!("dev-{}", n % 7)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_under_writes_loses_nothing_acknowledged() {
    failover_under_writes(0).await;
}

/// The same with `wait_replicas = 1`: writes to the promoted master wait for the demoted one
/// to resynchronise as its replica; those that time out are retried with the same record and
/// must then succeed, not conflict with themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_with_wait_replicas() {
    failover_under_writes(1).await;
}

async fn failover_under_writes(wait_replicas: u32) {
    let cluster = RedisCluster::start();
    let mut config = RedisStoreConfig::with_cluster_nodes(cluster.seeds());
    config.op_attempts = 6;
    config.wait_replicas = wait_replicas;
    config.wait_timeout_ms = 200;
    let store = Arc::new(connect(&config).await);

    let mut acked = BTreeMap::new();
    let mut transient = 0;
    for i in 0..300 {
        let call_id = format!("fo-{i}");
        let r = record(&call_id, &device_of(&call_id), "node-a");
        let v = write_until_acked(&store, &r, None, &mut transient).await;
        acked.insert(call_id, v);
    }
    // Spread over all three masters.
    let mut conn = raw(&cluster).await;
    let mut per_master: HashMap<u16, usize> = HashMap::new();
    for call_id in acked.keys() {
        let key = store.record_key(&record(call_id, "d", "n").key);
        let slot = keyslot(&mut conn, &key).await;
        *per_master
            .entry(cluster.master_of_slot(slot).port)
            .or_default() += 1;
    }
    assert_eq!(per_master.len(), 3, "not on all masters: {per_master:?}");
    assert!(per_master.values().all(|&n| n >= 50), "{per_master:?}");

    // Fail over the master holding the first dialog, by its replica, while writing.
    let first_key = store.record_key(&record("fo-0", "d", "n").key);
    let old_master = cluster.master_of_slot(keyslot(&mut conn, &first_key).await);
    let replica = cluster
        .topology()
        .into_iter()
        .find(|n| n.master_id.as_deref() == Some(old_master.id.as_str()))
        .expect("the master has no replica");
    let instance_before = store.instance().await.unwrap();
    assert!(instance_before.is_some());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(keep_writing(store.clone(), acked, stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let answer = cli(replica.port, &["cluster", "failover"]);
    assert!(answer.contains("OK"), "CLUSTER FAILOVER: {answer}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let role = cli(replica.port, &["role"]);
        if role.starts_with("master") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica was not promoted: {role}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted_after = started.elapsed();
    cluster.wait_healthy(Duration::from_secs(30));
    assert_eq!(
        cluster
            .master_of_slot(keyslot(&mut conn, &first_key).await)
            .port,
        replica.port,
        "the slot did not move to the promoted replica"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, during) = writer.await.unwrap();
    // The failover shows as a new instance (the cluster's epoch rose): nodes write their
    // records again.
    assert_ne!(store.instance().await.unwrap(), instance_before);
    eprintln!(
        "failover (wait_replicas {wait_replicas}): promoted after {promoted_after:?}; {} \
         dialogs acknowledged, {during} transient failures retried during it",
        acked.len()
    );
    assert!(acked.len() > 300, "no dialog created during the failover");

    // Every acknowledged write reads back at its acknowledged version.
    for (call_id, version) in &acked {
        let got = store
            .get(&record(call_id, "d", "n").key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{call_id} lost"));
        assert_eq!(got.version, *version, "{call_id}");
        assert_eq!(got.state, DialogState::Live);
    }
    let mut listed = HashSet::new();
    for d in 0..7 {
        for r in store.list_by_device(&format!("dev-{d}")).await.unwrap() {
            listed.insert(r.key.call_id);
        }
    }
    let all: HashSet<String> = acked.keys().cloned().collect();
    assert_eq!(listed, all, "list_by_device misses dialogs");
    let owned: HashSet<String> = store
        .list_by_owner("node-a", usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.key.call_id)
        .collect();
    assert_eq!(owned, all, "list_by_owner misses dialogs");
    let r = record("after-failover", "dev-0", "node-a");
    assert_eq!(store.put(&r, None).await, Ok(1));
    assert_eq!(store.claim(&r.key, "node-b", 0).await.unwrap().epoch, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_slot_migration_keeps_dialogs_working() {
    let cluster = RedisCluster::start();
    let mut config = RedisStoreConfig::with_cluster_nodes(cluster.seeds());
    // The WAIT path too: one pipeline (script, WAIT) per write, through ASK redirects.
    config.wait_replicas = 1;
    config.wait_timeout_ms = 500;
    let store = connect(&config).await;
    let mut conn = raw(&cluster).await;

    // Eight dialogs that share one slot (found by computing slots here, checked against
    // the server's CLUSTER KEYSLOT), among 392 others.
    let slot_of = |call_id: &str| key_slot(&store.record_key(&record(call_id, "d", "n").key));
    let slot = slot_of("mig-0");
    let mut calls = Vec::new();
    let mut others = Vec::new();
    for i in 0.. {
        let call_id = format!("mig-{i}");
        if slot_of(&call_id) == slot {
            calls.push(call_id);
            if calls.len() == 8 {
                break;
            }
        } else if others.len() < 392 {
            others.push(call_id);
        }
    }
    for call_id in calls.iter().chain(&others) {
        let r = record(call_id, "dev-mig", "node-a");
        assert_eq!(store.put(&r, None).await, Ok(1));
    }
    for call_id in &calls {
        let key = store.record_key(&record(call_id, "d", "n").key);
        assert_eq!(keyslot(&mut conn, &key).await, slot, "{call_id}");
    }
    let source = cluster.master_of_slot(slot);
    let target = cluster
        .topology()
        .into_iter()
        .find(|n| n.master && n.id != source.id)
        .unwrap();
    eprintln!(
        "moving slot {slot} ({} dialogs) from {} to {}",
        calls.len(),
        source.port,
        target.port
    );

    let s = slot.to_string();
    let ok = |out: String| assert!(out.contains("OK"), "{out}");
    ok(cli(
        target.port,
        &["cluster", "setslot", &s, "importing", &source.id],
    ));
    ok(cli(
        source.port,
        &["cluster", "setslot", &s, "migrating", &target.id],
    ));
    // Half-way: the first dialog's key moved (its commands get ASK), any others not yet.
    let first = record(&calls[0], "dev-mig", "node-a");
    let first_key = store.record_key(&first.key);
    ok(cli(
        source.port,
        &[
            "migrate",
            "127.0.0.1",
            &target.port.to_string(),
            "",
            "0",
            "5000",
            "keys",
            &first_key,
        ],
    ));
    for call_id in &calls {
        let mut r = record(call_id, "dev-mig", "node-a");
        r.call_ref = 2;
        assert_eq!(store.get(&r.key).await.unwrap().unwrap().version, 1);
        assert_eq!(
            store.put(&r, Some(1)).await,
            Ok(2),
            "{call_id} while migrating"
        );
    }
    // The rest of the slot's keys, then the slot itself.
    let keys = cli(source.port, &["cluster", "getkeysinslot", &s, "1000"]);
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    if !keys.is_empty() {
        let port = target.port.to_string();
        let mut args = vec!["migrate", "127.0.0.1", &port, "", "0", "5000", "keys"];
        args.extend(keys.iter().copied());
        ok(cli(source.port, &args));
    }
    for node in cluster.topology().into_iter().filter(|n| n.master) {
        ok(cli(
            node.port,
            &["cluster", "setslot", &s, "node", &target.id],
        ));
    }
    cluster.wait_healthy(Duration::from_secs(30));
    assert_eq!(cluster.master_of_slot(slot).port, target.port);

    for call_id in &calls {
        let mut r = record(call_id, "dev-mig", "node-a");
        let got = store.get(&r.key).await.unwrap().unwrap();
        assert_eq!(
            (got.version, got.call_ref),
            (2, 2),
            "{call_id} after the move"
        );
        r.call_ref = 3;
        assert_eq!(store.put(&r, Some(2)).await, Ok(3));
        let claimed = store.claim(&r.key, "node-b", 0).await.unwrap();
        assert_eq!((claimed.owner.as_str(), claimed.version), ("node-b", 4));
        let mut direct = redis::Client::open(format!("redis://127.0.0.1:{}/", target.port))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let exists: i64 = redis::cmd("EXISTS")
            .arg(store.record_key(&r.key))
            .query_async(&mut direct)
            .await
            .unwrap();
        assert_eq!(exists, 1, "{call_id} not on the target master");
    }
    let owned: HashSet<String> = store
        .list_by_owner("node-b", usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.key.call_id)
        .collect();
    assert_eq!(owned, calls.iter().cloned().collect::<HashSet<_>>());
    assert_eq!(store.list_by_device("dev-mig").await.unwrap().len(), 400);
    let batch = store
        .write_batch(
            calls
                .iter()
                .map(|c| WriteOp::Delete {
                    key: record(c, "d", "n").key,
                    expected_version: Some(4),
                })
                .collect(),
        )
        .await
        .unwrap();
    assert!(batch.iter().all(|r| *r == Ok(5)), "{batch:?}");
    assert_eq!(
        store.list_by_device("dev-mig").await.unwrap().len(),
        400 - calls.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_takes_the_replicators_batches() {
    use thalamus_dialog_store::replicator::{Replicator, ReplicatorConfig};
    let cluster = RedisCluster::start();
    let store: Arc<dyn DialogStore> =
        Arc::new(connect(&RedisStoreConfig::with_cluster_nodes(cluster.seeds())).await);
    let rep = Replicator::spawn(store.clone(), ReplicatorConfig::default());
    for i in 0..300 {
        rep.replicate(record(&format!("rep-{i}"), "dev-rep", "node-rep"))
            .unwrap();
    }
    for i in 0..300 {
        let mut r = record(&format!("rep-{i}"), "dev-rep", "node-rep");
        r.call_ref = 7;
        rep.replicate(r).unwrap();
    }
    rep.flush().await.unwrap();
    let stats = rep.stats();
    assert_eq!(stats.written + stats.coalesced, 600, "{stats:?}");
    assert_eq!((stats.conflicts, stats.errors), (0, 0), "{stats:?}");
    let listed = store.list_by_device("dev-rep").await.unwrap();
    assert_eq!(listed.len(), 300);
    assert!(listed.iter().all(|r| r.call_ref == 7));
    assert_eq!(store.list_by_owner("node-rep", 10).await.unwrap().len(), 10);
    for i in 0..300 {
        rep.remove(record(&format!("rep-{i}"), "d", "n").key)
            .unwrap();
    }
    rep.flush().await.unwrap();
    assert!(store.list_by_device("dev-rep").await.unwrap().is_empty());
    assert_eq!(rep.stats().errors, 0);
    rep.shutdown().await;
}
