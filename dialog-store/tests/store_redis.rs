//! The dialog store against a real Redis: the conformance suite, real TTLs and the key
//! layout, the replicator's pipelined writes, a Redis restart survived by the connection
//! manager, and Sentinel (master discovery and a forced failover).
//!
//! Each test starts its own `redis-server` on a free loopback port and kills it at the end;
//! without `redis-server` installed the tests fail with a message saying so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod store_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use store_support::{raw_command, RedisProcess};
use thalamus_dialog_store::conformance::{self, record, Harness};
use thalamus_dialog_store::redis::{RedisDialogStore, RedisStoreConfig};
use thalamus_dialog_store::replicator::{Replicator, ReplicatorConfig};
use thalamus_dialog_store::{
    DialogState, DialogStore, ManualClock, StoreError, StoreSettings, WriteOp,
};

async fn connect(config: &RedisStoreConfig, settings: StoreSettings) -> RedisDialogStore {
    RedisDialogStore::connect(
        config,
        settings,
        Arc::new(ManualClock::new(conformance::START_MS)),
    )
    .await
    .unwrap()
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_passes_the_conformance_suite() {
    let server = RedisProcess::start();
    let clock = ManualClock::new(conformance::START_MS);
    let settings = StoreSettings::default();
    let store = RedisDialogStore::connect(
        &RedisStoreConfig::with_url(server.url()),
        settings,
        Arc::new(clock.clone()),
    )
    .await
    .unwrap();
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

#[tokio::test]
async fn key_layout_ttls_and_real_expiry() {
    let server = RedisProcess::start();
    let settings = StoreSettings {
        live_ttl: Duration::from_secs(60),
        tombstone_ttl: Duration::from_millis(300),
    };
    let mut config = RedisStoreConfig::with_url(server.url());
    config.key_prefix = "t1:".into();
    let store = connect(&config, settings).await;
    let r = record("layout-1", "dev-layout", "node-layout");
    store.put(&r, None).await.unwrap();

    let mut conn = raw(&server.url()).await;
    let key = format!("t1:dlg:{}", r.key.storage_key());
    let fields: std::collections::HashMap<String, Vec<u8>> = conn.hgetall(&key).await.unwrap();
    let text = |f: &str| String::from_utf8(fields[f].clone()).unwrap();
    assert_eq!(text("v"), "1");
    assert_eq!(text("s"), "L");
    assert_eq!(text("o"), "node-layout");
    assert_eq!(text("e"), "0");
    assert_eq!(text("d"), "dev-layout");
    assert!(text("b").contains("\"schema\":1"));
    let ttl: i64 = conn.pttl(&key).await.unwrap();
    assert!((59_000..=60_000).contains(&ttl), "live TTL {ttl}");
    let dev: Vec<String> = conn.smembers("t1:dev:dev-layout").await.unwrap();
    assert_eq!(dev, vec![r.key.storage_key()]);
    let own: Vec<String> = conn.smembers("t1:own:node-layout").await.unwrap();
    assert_eq!(own, vec![r.key.storage_key()]);
    let set_ttl: i64 = conn.pttl("t1:dev:dev-layout").await.unwrap();
    assert!((59_000..=60_000).contains(&set_ttl), "index TTL {set_ttl}");

    store
        .renew_lease("node-layout", Duration::from_secs(20))
        .await
        .unwrap();
    let lease_ttl: i64 = conn.pttl("t1:lease:node-layout").await.unwrap();
    assert!(
        (19_000..=20_000).contains(&lease_ttl),
        "lease TTL {lease_ttl}"
    );

    assert_eq!(store.delete(&r.key, None).await, Ok(2));
    let ttl: i64 = conn.pttl(&key).await.unwrap();
    assert!((0..=300).contains(&ttl), "tombstone TTL {ttl}");
    let dev: Vec<String> = conn.smembers("t1:dev:dev-layout").await.unwrap();
    assert!(dev.is_empty());
    assert_eq!(
        store.get(&r.key).await.unwrap().map(|g| g.state),
        Some(DialogState::Tombstone)
    );
    // The one real wait in the suite: Redis expires the tombstone by its own clock.
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.get(&r.key).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "tombstone never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.put(&r, None).await, Ok(1));

    // An index entry whose record vanished is pruned by the next list.
    let other = record("layout-2", "dev-layout", "node-layout");
    store.put(&other, None).await.unwrap();
    let _: () = conn
        .del(format!("t1:dlg:{}", other.key.storage_key()))
        .await
        .unwrap();
    let listed = store.list_by_device("dev-layout").await.unwrap();
    assert_eq!(listed.len(), 1);
    let dev: Vec<String> = conn.smembers("t1:dev:dev-layout").await.unwrap();
    assert_eq!(dev, vec![r.key.storage_key()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicator_pipelines_batches_to_redis() {
    let server = RedisProcess::start();
    let store: Arc<dyn DialogStore> = Arc::new(
        connect(
            &RedisStoreConfig::with_url(server.url()),
            StoreSettings::default(),
        )
        .await,
    );
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
    assert_eq!(stats.queued, 600);
    assert_eq!(stats.written + stats.coalesced, 600, "{stats:?}");
    assert_eq!((stats.conflicts, stats.errors), (0, 0), "{stats:?}");
    assert!(stats.batches < 600, "no batching: {stats:?}");
    let listed = store.list_by_device("dev-rep").await.unwrap();
    assert_eq!(listed.len(), 300);
    assert!(listed.iter().all(|r| r.call_ref == 7));
    for i in 0..300 {
        rep.remove(record(&format!("rep-{i}"), "d", "n").key)
            .unwrap();
    }
    rep.flush().await.unwrap();
    assert!(store.list_by_device("dev-rep").await.unwrap().is_empty());
    assert_eq!(rep.stats().errors, 0);
    rep.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_redis_restart() {
    let mut server = RedisProcess::start();
    let port = server.port;
    let mut config = RedisStoreConfig::with_url(server.url());
    config.op_attempts = 2;
    config.connect_timeout_ms = 200;
    config.response_timeout_ms = 500;
    config.reconnect_retries = 1;
    let store = connect(&config, StoreSettings::default()).await;
    let before = record("restart-before", "dev-restart", "node-a");
    store.put(&before, None).await.unwrap();

    server.kill();
    // While Redis is down an operation fails as transient, promptly.
    let started = Instant::now();
    let down = store.get(&before.key).await;
    assert!(
        matches!(down, Err(ref e) if e.is_transient()),
        "while down: {down:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let server = RedisProcess::start_on(port, &[]);
    // The data did not persist (--save ''), and the scripts are gone from the new server;
    // the next operations must succeed within a few tries.
    let after = record("restart-after", "dev-restart", "node-a");
    let mut tries = 0;
    let version = loop {
        tries += 1;
        match store.put(&after, None).await {
            Ok(v) => break v,
            Err(e) if e.is_transient() && tries < 3 => continue,
            Err(e) => panic!("put after restart failed on try {tries}: {e}"),
        }
    };
    assert_eq!(version, 1);
    assert_eq!(store.get(&before.key).await.unwrap(), None);
    let claimed = store.claim(&after.key, "node-b", 0).await.unwrap();
    assert_eq!(claimed.epoch, 1);
    let batch = store
        .write_batch(vec![WriteOp::Delete {
            key: after.key.clone(),
            expected_version: Some(2),
        }])
        .await
        .unwrap();
    assert_eq!(batch, vec![Ok(3)]);
    drop(server);
}

fn sentinel_master_port(sentinel: u16, name: &str) -> Option<u16> {
    let reply = raw_command(
        sentinel,
        &format!("SENTINEL GET-MASTER-ADDR-BY-NAME {name}"),
    )?;
    // *2 $9 127.0.0.1 $4 6379
    reply.lines().nth(4)?.trim().parse().ok()
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_finds_the_master_and_follows_a_failover() {
    let master = RedisProcess::start();
    let replica_port = store_support::free_port();
    let master_port = master.port.to_string();
    let replica = RedisProcess::start_on(replica_port, &["--replicaof", "127.0.0.1", &master_port]);
    wait_until(
        "the replica's link to the master",
        Duration::from_secs(15),
        || {
            raw_command(replica.port, "INFO replication")
                .is_some_and(|i| i.contains("master_link_status:up"))
        },
    );
    let sentinel = RedisProcess::start_sentinel("dialogs", master.port);
    assert_eq!(
        sentinel_master_port(sentinel.port, "dialogs"),
        Some(master.port)
    );

    let config =
        RedisStoreConfig::with_sentinels(vec![format!("127.0.0.1:{}", sentinel.port)], "dialogs");
    let store = connect(&config, StoreSettings::default()).await;
    assert!(store
        .master_address()
        .ends_with(&format!(":{}", master.port)));
    let r = record("sentinel-1", "dev-s", "node-a");
    assert_eq!(store.put(&r, None).await, Ok(1));
    let instance_before = store.instance().await.unwrap();
    assert!(instance_before.is_some());
    let mut conn = raw(&master.url()).await;
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(acked, 1, "the write did not reach the replica");

    // Promote the replica. Sentinel may need a moment to consider it a good candidate.
    wait_until(
        "sentinel to accept FAILOVER",
        Duration::from_secs(30),
        || {
            raw_command(sentinel.port, "SENTINEL FAILOVER dialogs")
                .is_some_and(|r| r.starts_with("+OK"))
        },
    );
    wait_until("the replica's promotion", Duration::from_secs(30), || {
        sentinel_master_port(sentinel.port, "dialogs") == Some(replica.port)
            && raw_command(replica.port, "ROLE").is_some_and(|r| r.contains("master"))
    });

    // The sentinel announces +switch-master; the store follows it without being asked.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !store
        .master_address()
        .ends_with(&format!(":{}", replica.port))
    {
        assert!(
            Instant::now() < deadline,
            "store still on {} after the failover",
            store.master_address()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.put(&r, Some(1)).await, Ok(2));
    let got = store.get(&r.key).await.unwrap().unwrap();
    assert_eq!(got.version, 2);
    let claimed = store.claim(&r.key, "node-b", 0).await.unwrap();
    assert_eq!(claimed.owner, "node-b");
    // Another master answers: a new instance (its run id).
    let after = store.instance().await.unwrap();
    assert!(after.is_some());
    assert_ne!(after, instance_before);
    drop((master, replica, sentinel));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_makes_writes_wait_for_a_replica() {
    let master = RedisProcess::start();
    let master_port = master.port.to_string();
    let replica = RedisProcess::start_on(
        store_support::free_port(),
        &["--replicaof", "127.0.0.1", &master_port],
    );
    let link_up = || {
        wait_until(
            "the replica's link to the master",
            Duration::from_secs(15),
            || {
                raw_command(replica.port, "INFO replication")
                    .is_some_and(|i| i.contains("master_link_status:up"))
            },
        )
    };
    link_up();
    let mut config = RedisStoreConfig::with_url(master.url());
    config.wait_replicas = 1;
    config.wait_timeout_ms = 200;
    let store = connect(&config, StoreSettings::default()).await;

    // With the replica up every write is acknowledged by it.
    let r = record("wait-1", "dev-wait", "node-a");
    assert_eq!(store.put(&r, None).await, Ok(1));
    assert_eq!(store.claim(&r.key, "node-b", 0).await.unwrap().epoch, 1);
    let other = record("wait-2", "dev-wait", "node-a");
    assert_eq!(
        store
            .write_batch(vec![WriteOp::Put {
                record: other.clone(),
                expected_version: None,
            }])
            .await
            .unwrap(),
        vec![Ok(1)]
    );
    assert_eq!(store.delete(&other.key, Some(1)).await, Ok(2));

    // Asking for two replicas of one: the write is applied on the master, but not
    // acknowledged; the error names the count.
    let mut two = config.clone();
    two.wait_replicas = 2;
    let store_two = connect(&two, StoreSettings::default()).await;
    let started = Instant::now();
    match store_two
        .put(&record("wait-3", "dev-wait", "node-a"), None)
        .await
    {
        Err(StoreError::Unavailable(m)) => {
            assert!(m.contains("1 of 2 replicas"), "{m}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));

    // The replica frozen: writes fail as unavailable, naming 0 of 1, and the same write tried
    // again (by the same store) does not conflict with its first, applied attempt.
    replica.signal("STOP");
    let frozen = record("wait-4", "dev-wait", "node-a");
    let mut updated = r.clone();
    updated.owner = "node-b".into();
    updated.epoch = 1;
    updated.call_ref = 9;
    let batch = vec![WriteOp::Put {
        record: record("wait-5", "dev-wait", "node-a"),
        expected_version: None,
    }];
    for attempt in 0..2 {
        match store.put(&frozen, None).await {
            Err(StoreError::Unavailable(m)) => assert!(m.contains("0 of 1 replicas"), "{m}"),
            other => panic!("attempt {attempt}: expected Unavailable, got {other:?}"),
        }
        assert!(
            matches!(
                store.put(&updated, Some(2)).await,
                Err(StoreError::Unavailable(_))
            ),
            "attempt {attempt}"
        );
        assert!(matches!(
            store.claim(&other.key, "node-c", 0).await,
            Err(StoreError::Tombstoned { .. })
        ));
        let results = store.write_batch(batch.clone()).await.unwrap();
        assert!(
            matches!(results.as_slice(), [Err(StoreError::Unavailable(m))] if m.contains("0 of 1")),
            "{results:?}"
        );
    }
    let on_master = store.get(&frozen.key).await.unwrap().unwrap();
    assert_eq!(
        on_master.version, 1,
        "the write is on the master all the same"
    );
    replica.signal("CONT");
    link_up();

    // The replica back: the same writes now succeed, at the versions of their first attempt.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match store.put(&frozen, None).await {
            Ok(v) => {
                assert_eq!(v, 1);
                break;
            }
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("after the replica came back: {other:?}"),
        }
    }
    assert_eq!(store.put(&updated, Some(2)).await, Ok(3));
    assert_eq!(store.write_batch(batch).await.unwrap(), vec![Ok(1)]);
    assert_eq!(store.put(&frozen, Some(1)).await, Ok(2));
    assert_eq!(store.get(&r.key).await.unwrap().unwrap().call_ref, 9);
    drop((master, replica));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_claims_retry_without_conflict() {
    let master = RedisProcess::start();
    let master_port = master.port.to_string();
    let replica = RedisProcess::start_on(
        store_support::free_port(),
        &["--replicaof", "127.0.0.1", &master_port],
    );
    let link_up = || {
        wait_until("the replica's link", Duration::from_secs(15), || {
            raw_command(replica.port, "INFO replication")
                .is_some_and(|i| i.contains("master_link_status:up"))
        })
    };
    link_up();
    let mut config = RedisStoreConfig::with_url(master.url());
    config.wait_replicas = 1;
    config.wait_timeout_ms = 150;
    let store = connect(&config, StoreSettings::default()).await;
    let r = record("wait-claim", "dev-wait", "node-a");
    assert_eq!(store.put(&r, None).await, Ok(1));
    replica.signal("STOP");
    assert!(matches!(
        store.claim(&r.key, "node-b", 0).await,
        Err(StoreError::Unavailable(m)) if m.contains("0 of 1")
    ));
    assert!(matches!(
        store.delete(&record("absent", "d", "n").key, None).await,
        Err(StoreError::NotFound)
    ));
    replica.signal("CONT");
    link_up();
    let claimed = store.claim(&r.key, "node-b", 0).await.unwrap();
    assert_eq!((claimed.owner.as_str(), claimed.epoch), ("node-b", 1));
    assert_eq!(store.delete(&r.key, Some(2)).await, Ok(3));
    drop((master, replica));
}
