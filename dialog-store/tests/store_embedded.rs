//! The embedded (redb) and memory dialog stores through the public API: the conformance
//! suite, single-winner claims under concurrency, and a gateway restart (the embedded file
//! reopened through the configuration) that keeps confirmed dialogs, tombstones and indexes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use thalamus_dialog_store::conformance::{self, record, Harness};
use thalamus_dialog_store::embedded::EmbeddedDialogStore;
use thalamus_dialog_store::memory::MemoryDialogStore;
use thalamus_dialog_store::replicator::{Replicator, ReplicatorConfig};
use thalamus_dialog_store::{
    open_dialog_store, Clock, DialogState, DialogStore, DialogStoreConfig, ManualClock,
    StoreBackend, StoreSettings,
};

#[tokio::test]
async fn memory_passes_the_conformance_suite() {
    let clock = ManualClock::new(conformance::START_MS);
    let settings = StoreSettings::default();
    let store = MemoryDialogStore::new(settings, Arc::new(clock.clone()));
    let harness = Harness {
        clock: &clock,
        expiry_follows_clock: true,
        settings,
    };
    conformance::run_all(&store, harness).await.unwrap();
}

#[tokio::test]
async fn embedded_passes_the_conformance_suite_with_short_ttls() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(conformance::START_MS);
    let settings = StoreSettings {
        live_ttl: std::time::Duration::from_secs(90),
        tombstone_ttl: std::time::Duration::from_millis(1500),
    };
    let store = EmbeddedDialogStore::open(
        &dir.path().join("d.redb"),
        settings,
        Arc::new(clock.clone()),
    )
    .await
    .unwrap();
    let harness = Harness {
        clock: &clock,
        expiry_follows_clock: true,
        settings,
    };
    conformance::run_all(&store, harness).await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_claimers_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(conformance::START_MS));
    let embedded: Arc<dyn DialogStore> = Arc::new(
        EmbeddedDialogStore::open(
            &dir.path().join("d.redb"),
            StoreSettings::default(),
            clock.clone(),
        )
        .await
        .unwrap(),
    );
    conformance::concurrent_claims(embedded.clone(), 64)
        .await
        .unwrap();
    embedded.close().await.unwrap();
    let memory: Arc<dyn DialogStore> =
        Arc::new(MemoryDialogStore::new(StoreSettings::default(), clock));
    conformance::concurrent_claims(memory, 64).await.unwrap();
}

#[tokio::test]
async fn a_restarted_gateway_still_holds_its_dialogs() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(conformance::START_MS);
    let config = DialogStoreConfig {
        backend: StoreBackend::Embedded,
        ..DialogStoreConfig::default()
    };

    // First life: dialogs written through the replicator, one ended.
    let store = open_dialog_store(&config, dir.path(), Arc::new(clock.clone()))
        .await
        .unwrap();
    let replicator = Replicator::spawn(store.clone(), ReplicatorConfig::default());
    for i in 0..20 {
        replicator
            .replicate(record(&format!("life-{i}"), "dev-life", "node-a"))
            .unwrap();
    }
    replicator.flush().await.unwrap();
    replicator.remove(record("life-0", "d", "n").key).unwrap();
    replicator.shutdown().await;
    assert_eq!(replicator.stats().errors, 0);
    store.close().await.unwrap();
    drop(store);

    // Second life: same file, same answers.
    let store = open_dialog_store(&config, dir.path(), Arc::new(clock.clone()))
        .await
        .unwrap();
    let live = store.list_by_device("dev-life").await.unwrap();
    assert_eq!(live.len(), 19);
    let ended = store
        .get(&record("life-0", "d", "n").key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.state, DialogState::Tombstone);
    let owned = store.list_by_owner("node-a", 100).await.unwrap();
    assert_eq!(owned.len(), 19);
    let taken = store.claim(&live[0].key, "node-b", 0).await.unwrap();
    assert_eq!((taken.owner.as_str(), taken.epoch), ("node-b", 1));
    // The live TTL was persisted too: a day later (nothing refreshed) they are gone.
    clock.advance_ms(StoreSettings::default().live_ttl.as_millis() as u64 + 1);
    assert!(store.list_by_device("dev-life").await.unwrap().is_empty());
    let swept = store.sweep().await.unwrap();
    assert_eq!(swept.expired_live, 19);
    assert_eq!(swept.expired_tombstones, 1);
    store.close().await.unwrap();
}
