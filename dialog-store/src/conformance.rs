//! The conformance suite every [`DialogStore`] backend must pass, written once and run against
//! memory, embedded and Redis (by each backend's unit tests and by `tests/store_*.rs`).
//!
//! Each check returns `Err` with a description instead of panicking, so the suite lives in the
//! library (and is usable by integration tests) without `unwrap`. Checks use their own dialog
//! keys, so they can share one store. Checks that move time need a [`ManualClock`] that the
//! store reads; TTL checks also need the store to expire records by that clock, which Redis
//! does not (it expires keys by its own clock), so the harness says which applies. This module
//! does not start any server.

use std::sync::Arc;

use bytes::Bytes;

use crate::{
    Clock, DialogKey, DialogState, DialogStore, ManualClock, NegotiatedMedia, SipDialogPayload,
    StoreError, StoreSettings, StoredDialog, WriteOp,
};

/// The manual clock's starting time for the suite (2023-11-14, in Unix milliseconds).
pub const START_MS: u64 = 1_700_000_000_000;

/// A failed conformance check: which check, and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("conformance check `{check}` failed: {detail}")]
pub struct ConformanceFailure {
    /// The check's name.
    pub check: &'static str,
    /// What was expected and what happened.
    pub detail: String,
}

/// What the suite may assume about the store under test.
#[derive(Debug, Clone, Copy)]
pub struct Harness<'a> {
    /// The clock the store stamps `updated_at_ms` with.
    pub clock: &'a ManualClock,
    /// Whether the store also expires records by `clock` (memory, embedded: yes; Redis: no).
    pub expiry_follows_clock: bool,
    /// The store's TTL settings.
    pub settings: StoreSettings,
}

type CheckResult = Result<(), ConformanceFailure>;

macro_rules! ensure {
    ($check:expr, $cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(ConformanceFailure { check: $check, detail: format!($($fmt)+) });
        }
    };
}

macro_rules! ensure_eq {
    ($check:expr, $left:expr, $right:expr, $what:expr) => {{
        let left = $left;
        let right = $right;
        if left != right {
            return Err(ConformanceFailure {
                check: $check,
                detail: format!("{}: got {:?}, expected {:?}", $what, left, right),
            });
        }
    }};
}

/// Turns an unexpected store error into a failure of `check`.
fn ok<T>(
    check: &'static str,
    what: &str,
    r: Result<T, StoreError>,
) -> Result<T, ConformanceFailure> {
    r.map_err(|e| ConformanceFailure {
        check,
        detail: format!("{what}: unexpected error {e}"),
    })
}

/// A full record (every field set) for `call_id` on `device`, owned by `owner` at epoch 0.
pub fn record(call_id: &str, device: &str, owner: &str) -> StoredDialog {
    let mut r = StoredDialog::new(
        DialogKey::new(call_id, format!("lt-{call_id}"), format!("rt-{call_id}")),
        SipDialogPayload {
            format_version: 1,
            data: format!(
                r#"{{"call_id":"{call_id}","route_set":["<sip:lb.example;lr>"],"local_cseq":2,"role":"uac"}}"#
            ),
        },
        device,
        42,
        owner,
    );
    r.media = NegotiatedMedia {
        local_sdp: "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n".into(),
        remote_sdp: "v=0\r\no=- 7 7 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio 50000 RTP/AVP 0\r\n".into(),
    };
    r.app_data = Some(Bytes::from(format!("app:{call_id}").into_bytes()));
    r
}

fn keys_of(records: &[StoredDialog]) -> Vec<String> {
    let mut keys: Vec<String> = records.iter().map(|r| r.key.call_id.clone()).collect();
    keys.sort();
    keys
}

/// Runs every sequential check against `store`.
pub async fn run_all(store: &dyn DialogStore, harness: Harness<'_>) -> CheckResult {
    create_and_get(store, harness).await?;
    create_only_if_absent(store).await?;
    compare_and_set(store).await?;
    delete_leaves_tombstone(store).await?;
    claim_moves_ownership(store).await?;
    device_index(store).await?;
    owner_index(store).await?;
    write_batch(store).await?;
    invalid_input(store).await?;
    owner_lease(store, harness).await?;
    if harness.expiry_follows_clock {
        tombstone_expiry(store, harness).await?;
        live_expiry_and_refresh(store, harness).await?;
    }
    Ok(())
}

/// A created record reads back field for field, with version 1, `Live`, and the store's time.
pub async fn create_and_get(store: &dyn DialogStore, h: Harness<'_>) -> CheckResult {
    const C: &str = "create_and_get";
    let mut r = record("cg-1", "dev-cg", "node-a");
    r.version = 77; // ignored by put
    r.updated_at_ms = 5;
    let v = ok(C, "put", store.put(&r, None).await)?;
    ensure_eq!(C, v, 1, "version of a created record");
    let got = ok(C, "get", store.get(&r.key).await)?;
    let Some(got) = got else {
        return Err(ConformanceFailure {
            check: C,
            detail: "created record not found".into(),
        });
    };
    let mut want = r.clone();
    want.version = 1;
    want.updated_at_ms = h.clock.now_ms();
    ensure_eq!(C, got, want, "record read back");
    let none = ok(
        C,
        "get absent",
        store.get(&DialogKey::new("cg-absent", "a", "b")).await,
    )?;
    ensure!(C, none.is_none(), "absent key returned {none:?}");
    let mut bare = record("cg-2", "dev-cg", "node-a");
    bare.app_data = None;
    bare.media = NegotiatedMedia::default();
    ok(C, "put bare", store.put(&bare, None).await)?;
    let got = ok(C, "get bare", store.get(&bare.key).await)?;
    ensure_eq!(
        C,
        got.map(|g| (g.app_data, g.media)),
        Some((None, NegotiatedMedia::default())),
        "bare record"
    );
    Ok(())
}

/// `put(None)` over an existing record is a conflict reporting its version.
pub async fn create_only_if_absent(store: &dyn DialogStore) -> CheckResult {
    const C: &str = "create_only_if_absent";
    let r = record("coa-1", "dev-coa", "node-a");
    ok(C, "first put", store.put(&r, None).await)?;
    ensure_eq!(
        C,
        store.put(&r, None).await,
        Err(StoreError::Conflict { current: Some(1) }),
        "second create"
    );
    Ok(())
}

/// Versioned compare-and-set: the right version wins, a stale or absent one conflicts.
pub async fn compare_and_set(store: &dyn DialogStore) -> CheckResult {
    const C: &str = "compare_and_set";
    let mut r = record("cas-1", "dev-cas", "node-a");
    ok(C, "create", store.put(&r, None).await)?;
    r.media.remote_sdp = "v=0\r\n".into();
    ensure_eq!(
        C,
        store.put(&r, Some(1)).await,
        Ok(2),
        "update at version 1"
    );
    ensure_eq!(
        C,
        store.put(&r, Some(1)).await,
        Err(StoreError::Conflict { current: Some(2) }),
        "stale update"
    );
    ensure_eq!(
        C,
        store.put(&r, Some(3)).await,
        Err(StoreError::Conflict { current: Some(2) }),
        "future version"
    );
    let got = ok(C, "get", store.get(&r.key).await)?;
    ensure_eq!(
        C,
        got.map(|g| (g.version, g.media.remote_sdp)),
        Some((2, "v=0\r\n".to_owned())),
        "record after update"
    );
    let absent = record("cas-absent", "dev-cas", "node-a");
    ensure_eq!(
        C,
        store.put(&absent, Some(1)).await,
        Err(StoreError::Conflict { current: None }),
        "update of an absent record"
    );
    Ok(())
}

/// Delete leaves a tombstone `get` reports; it leaves the indexes, refuses create and claim,
/// and repeats idempotently.
pub async fn delete_leaves_tombstone(store: &dyn DialogStore) -> CheckResult {
    const C: &str = "delete_leaves_tombstone";
    let r = record("del-1", "dev-del", "node-del");
    ok(C, "create", store.put(&r, None).await)?;
    ensure_eq!(
        C,
        store.delete(&r.key, Some(5)).await,
        Err(StoreError::Conflict { current: Some(1) }),
        "conditional delete at a wrong version"
    );
    ensure_eq!(
        C,
        store.delete(&r.key, Some(1)).await,
        Ok(2),
        "conditional delete"
    );
    let got = ok(C, "get tombstone", store.get(&r.key).await)?;
    ensure_eq!(
        C,
        got.as_ref()
            .map(|g| (g.state, g.version, g.device_id.as_str(), g.call_ref)),
        Some((DialogState::Tombstone, 2, "dev-del", 42)),
        "tombstone"
    );
    ensure_eq!(
        C,
        store.delete(&r.key, None).await,
        Ok(2),
        "repeated unconditional delete"
    );
    ensure_eq!(
        C,
        store.delete(&r.key, Some(2)).await,
        Err(StoreError::Conflict { current: Some(2) }),
        "conditional delete of a tombstone"
    );
    ensure_eq!(
        C,
        store.put(&r, None).await,
        Err(StoreError::Conflict { current: Some(2) }),
        "create over a tombstone"
    );
    ensure_eq!(
        C,
        store.claim(&r.key, "node-b", 0).await.map(|x| x.version),
        Err(StoreError::Tombstoned { version: 2 }),
        "claim of a tombstone"
    );
    let listed = ok(C, "list_by_device", store.list_by_device("dev-del").await)?;
    ensure!(
        C,
        listed.is_empty(),
        "tombstone still listed by device: {:?}",
        keys_of(&listed)
    );
    let listed = ok(
        C,
        "list_by_owner",
        store.list_by_owner("node-del", 100).await,
    )?;
    ensure!(
        C,
        listed.is_empty(),
        "tombstone still listed by owner: {:?}",
        keys_of(&listed)
    );
    ensure_eq!(
        C,
        store
            .delete(&DialogKey::new("del-absent", "a", "b"), None)
            .await,
        Err(StoreError::NotFound),
        "delete of an absent record"
    );
    let r2 = record("del-2", "dev-del", "node-del");
    ok(C, "create 2", store.put(&r2, None).await)?;
    ensure_eq!(
        C,
        store.delete(&r2.key, None).await,
        Ok(2),
        "unconditional delete"
    );
    Ok(())
}

/// Claim: epoch compare-and-set, owner index moves, the old owner's version is fenced off.
pub async fn claim_moves_ownership(store: &dyn DialogStore) -> CheckResult {
    const C: &str = "claim_moves_ownership";
    let r = record("claim-1", "dev-claim", "node-old");
    ok(C, "create", store.put(&r, None).await)?;
    let won = ok(C, "claim", store.claim(&r.key, "node-new", 0).await)?;
    ensure_eq!(
        C,
        (won.owner.as_str(), won.epoch, won.version, won.state),
        ("node-new", 1, 2, DialogState::Live),
        "claimed record"
    );
    ensure_eq!(
        C,
        (&won.sip_dialog, &won.media, &won.app_data, won.call_ref),
        (&r.sip_dialog, &r.media, &r.app_data, r.call_ref),
        "claim keeps the dialog"
    );
    let got = ok(C, "get", store.get(&r.key).await)?;
    ensure_eq!(C, got, Some(won.clone()), "claimed record read back");
    ensure_eq!(
        C,
        store.claim(&r.key, "node-other", 0).await.map(|x| x.epoch),
        Err(StoreError::Conflict { current: Some(1) }),
        "second claim at the old epoch"
    );
    ensure_eq!(
        C,
        store.put(&r, Some(1)).await,
        Err(StoreError::Conflict { current: Some(2) }),
        "old owner's write after the claim"
    );
    let new_owner = ok(
        C,
        "list new owner",
        store.list_by_owner("node-new", 100).await,
    )?;
    ensure_eq!(
        C,
        keys_of(&new_owner),
        vec!["claim-1".to_owned()],
        "new owner's dialogs"
    );
    let old_owner = ok(
        C,
        "list old owner",
        store.list_by_owner("node-old", 100).await,
    )?;
    ensure!(
        C,
        old_owner.is_empty(),
        "old owner still lists {:?}",
        keys_of(&old_owner)
    );
    ensure_eq!(
        C,
        store
            .claim(&DialogKey::new("claim-absent", "a", "b"), "node-new", 0)
            .await
            .map(|x| x.epoch),
        Err(StoreError::NotFound),
        "claim of an absent record"
    );
    let again = ok(C, "claim back", store.claim(&r.key, "node-old", 1).await)?;
    ensure_eq!(
        C,
        (again.owner.as_str(), again.epoch, again.version),
        ("node-old", 2, 3),
        "claim back"
    );
    Ok(())
}

/// The index by device follows creates, device changes, and deletes.
pub async fn device_index(store: &dyn DialogStore) -> CheckResult {
    const C: &str = "device_index";
    let a = record("dev-a", "dev-x", "node-a");
    let b = record("dev-b", "dev-x", "node-a");
    let c = record("dev-c", "dev-y", "node-a");
    for r in [&a, &b, &c] {
        ok(C, "create", store.put(r, None).await)?;
    }
    let x = ok(C, "list x", store.list_by_device("dev-x").await)?;
    ensure_eq!(
        C,
        keys_of(&x),
        vec!["dev-a".to_owned(), "dev-b".to_owned()],
        "dev-x"
    );
    ensure!(
        C,
        x.iter().all(|r| r.device_id == "dev-x" && r.is_live()),
        "wrong records listed: {x:?}"
    );
    let mut moved = b.clone();
    moved.device_id = "dev-y".into();
    ensure_eq!(C, store.put(&moved, Some(1)).await, Ok(2), "move to dev-y");
    let x = ok(C, "list x", store.list_by_device("dev-x").await)?;
    ensure_eq!(
        C,
        keys_of(&x),
        vec!["dev-a".to_owned()],
        "dev-x after the move"
    );
    let y = ok(C, "list y", store.list_by_device("dev-y").await)?;
    ensure_eq!(
        C,
        keys_of(&y),
        vec!["dev-b".to_owned(), "dev-c".to_owned()],
        "dev-y after the move"
    );
    ok(C, "delete", store.delete(&c.key, None).await)?;
    let y = ok(C, "list y", store.list_by_device("dev-y").await)?;
    ensure_eq!(
        C,
        keys_of(&y),
        vec!["dev-b".to_owned()],
        "dev-y after the delete"
    );
    let none = ok(C, "list unknown", store.list_by_device("dev-unknown").await)?;
    ensure!(
        C,
        none.is_empty(),
        "unknown device lists {:?}",
        keys_of(&none)
    );
    Ok(())
}

/// The index by owner honours its limit.
pub async fn owner_index(store: &dyn DialogStore) -> CheckResult {
    const C: &str = "owner_index";
    for i in 0..5 {
        let r = record(&format!("own-{i}"), "dev-own", "node-own");
        ok(C, "create", store.put(&r, None).await)?;
    }
    let all = ok(C, "list", store.list_by_owner("node-own", 100).await)?;
    ensure_eq!(C, all.len(), 5, "dialogs of node-own");
    ensure!(
        C,
        all.iter().all(|r| r.owner == "node-own"),
        "wrong owner listed"
    );
    let some = ok(C, "list limited", store.list_by_owner("node-own", 3).await)?;
    ensure_eq!(C, some.len(), 3, "dialogs of node-own with limit 3");
    let none = ok(C, "list limit 0", store.list_by_owner("node-own", 0).await)?;
    ensure_eq!(C, none.len(), 0, "limit 0");
    Ok(())
}

/// A batch applies in order with one result per write.
pub async fn write_batch(store: &dyn DialogStore) -> CheckResult {
    const C: &str = "write_batch";
    let a = record("batch-a", "dev-batch", "node-a");
    let b = record("batch-b", "dev-batch", "node-a");
    let results = ok(
        C,
        "batch",
        store
            .write_batch(vec![
                WriteOp::Put {
                    record: a.clone(),
                    expected_version: None,
                },
                WriteOp::Put {
                    record: b.clone(),
                    expected_version: None,
                },
                WriteOp::Put {
                    record: a.clone(),
                    expected_version: None,
                },
                WriteOp::Put {
                    record: a.clone(),
                    expected_version: Some(1),
                },
                WriteOp::Delete {
                    key: b.key.clone(),
                    expected_version: Some(1),
                },
                WriteOp::Delete {
                    key: DialogKey::new("batch-absent", "x", "y"),
                    expected_version: None,
                },
            ])
            .await,
    )?;
    ensure_eq!(
        C,
        results,
        vec![
            Ok(1),
            Ok(1),
            Err(StoreError::Conflict { current: Some(1) }),
            Ok(2),
            Ok(2),
            Err(StoreError::NotFound)
        ],
        "batch results"
    );
    let got = ok(C, "get b", store.get(&b.key).await)?;
    ensure_eq!(
        C,
        got.map(|g| g.state),
        Some(DialogState::Tombstone),
        "b after the batch"
    );
    let empty = ok(C, "empty batch", store.write_batch(Vec::new()).await)?;
    ensure!(C, empty.is_empty(), "empty batch answered {empty:?}");
    Ok(())
}

/// Bad records and arguments are refused with a clear error.
pub async fn invalid_input(store: &dyn DialogStore) -> CheckResult {
    const C: &str = "invalid_input";
    let mut r = record("inv-1", "", "node-a");
    ensure!(
        C,
        matches!(store.put(&r, None).await, Err(StoreError::InvalidRecord(_))),
        "empty device id accepted"
    );
    r.device_id = "dev-inv".into();
    r.owner.clear();
    ensure!(
        C,
        matches!(store.put(&r, None).await, Err(StoreError::InvalidRecord(_))),
        "empty owner accepted"
    );
    let empty = DialogKey::new("", "a", "b");
    ensure!(
        C,
        matches!(store.get(&empty).await, Err(StoreError::InvalidRecord(_))),
        "empty Call-ID accepted by get"
    );
    let r = record("inv-2", "dev-inv", "node-a");
    ok(C, "create", store.put(&r, None).await)?;
    ensure!(
        C,
        matches!(
            store.claim(&r.key, "", 0).await,
            Err(StoreError::InvalidRecord(_))
        ),
        "empty node id accepted by claim"
    );
    Ok(())
}

/// An owner lease lives for its TTL after each renewal, then lapses.
pub async fn owner_lease(store: &dyn DialogStore, h: Harness<'_>) -> CheckResult {
    const C: &str = "owner_lease";
    let ttl = std::time::Duration::from_secs(10);
    ensure_eq!(
        C,
        store.lease_remaining("node-lease").await,
        Ok(None),
        "lease never renewed"
    );
    ok(C, "renew", store.renew_lease("node-lease", ttl).await)?;
    let left = ok(C, "remaining", store.lease_remaining("node-lease").await)?;
    ensure!(
        C,
        left.is_some_and(|d| d <= ttl && d > ttl / 2),
        "lease remaining after renewal: {left:?}"
    );
    ensure!(
        C,
        matches!(
            store
                .renew_lease("node-lease", std::time::Duration::ZERO)
                .await,
            Err(StoreError::InvalidRecord(_))
        ),
        "zero lease TTL accepted"
    );
    ensure!(
        C,
        matches!(
            store.renew_lease("", ttl).await,
            Err(StoreError::InvalidRecord(_))
        ),
        "empty node id accepted"
    );
    if h.expiry_follows_clock {
        h.clock.advance_ms(millis(ttl) - 1);
        ensure_eq!(
            C,
            store.lease_remaining("node-lease").await,
            Ok(Some(std::time::Duration::from_millis(1))),
            "lease 1 ms before it lapses"
        );
        h.clock.advance_ms(1);
        ensure_eq!(
            C,
            store.lease_remaining("node-lease").await,
            Ok(None),
            "lapsed lease"
        );
        let report = ok(C, "sweep", store.sweep().await)?;
        ensure!(
            C,
            report.expired_leases >= 1,
            "sweep removed no lease: {report:?}"
        );
        ok(C, "renew again", store.renew_lease("node-lease", ttl).await)?;
        ensure_eq!(
            C,
            store.lease_remaining("node-lease").await,
            Ok(Some(ttl)),
            "renewed lease"
        );
    }
    Ok(())
}

/// A tombstone answers until its TTL runs out, then the key is free again.
pub async fn tombstone_expiry(store: &dyn DialogStore, h: Harness<'_>) -> CheckResult {
    const C: &str = "tombstone_expiry";
    let r = record("tomb-ttl", "dev-tomb", "node-a");
    ok(C, "create", store.put(&r, None).await)?;
    ok(C, "delete", store.delete(&r.key, None).await)?;
    let ttl = millis(h.settings.tombstone_ttl);
    h.clock.advance_ms(ttl - 1);
    let got = ok(C, "get before expiry", store.get(&r.key).await)?;
    ensure_eq!(
        C,
        got.map(|g| g.state),
        Some(DialogState::Tombstone),
        "tombstone 1 ms before expiry"
    );
    h.clock.advance_ms(1);
    let got = ok(C, "get after expiry", store.get(&r.key).await)?;
    ensure!(C, got.is_none(), "tombstone visible after its TTL: {got:?}");
    ensure_eq!(
        C,
        store.put(&r, None).await,
        Ok(1),
        "create after the tombstone expired"
    );
    ok(C, "delete again", store.delete(&r.key, None).await)?;
    h.clock.advance_ms(ttl);
    let report = ok(C, "sweep", store.sweep().await)?;
    ensure!(
        C,
        report.expired_tombstones >= 1,
        "sweep removed no tombstone: {report:?}"
    );
    Ok(())
}

/// A live record expires after the live TTL unless rewritten; expired records leave the
/// indexes and the sweep reclaims them.
pub async fn live_expiry_and_refresh(store: &dyn DialogStore, h: Harness<'_>) -> CheckResult {
    const C: &str = "live_expiry_and_refresh";
    let ttl = millis(h.settings.live_ttl);
    let stays = record("live-stays", "dev-live", "node-live");
    let goes = record("live-goes", "dev-live", "node-live");
    ok(C, "create stays", store.put(&stays, None).await)?;
    ok(C, "create goes", store.put(&goes, None).await)?;
    h.clock.advance_ms(ttl / 2);
    ensure_eq!(C, store.put(&stays, Some(1)).await, Ok(2), "refresh");
    h.clock.advance_ms(ttl - ttl / 2);
    let got = ok(C, "get expired", store.get(&goes.key).await)?;
    ensure!(C, got.is_none(), "record visible after its TTL: {got:?}");
    let got = ok(C, "get refreshed", store.get(&stays.key).await)?;
    ensure_eq!(C, got.map(|g| g.version), Some(2), "refreshed record");
    let listed = ok(C, "list_by_device", store.list_by_device("dev-live").await)?;
    ensure_eq!(
        C,
        keys_of(&listed),
        vec!["live-stays".to_owned()],
        "device index after expiry"
    );
    let listed = ok(
        C,
        "list_by_owner",
        store.list_by_owner("node-live", 100).await,
    )?;
    ensure_eq!(
        C,
        keys_of(&listed),
        vec!["live-stays".to_owned()],
        "owner index after expiry"
    );
    ensure_eq!(
        C,
        store.claim(&goes.key, "node-b", 0).await.map(|x| x.epoch),
        Err(StoreError::NotFound),
        "claim of an expired record"
    );
    let report = ok(C, "sweep", store.sweep().await)?;
    ensure!(
        C,
        report.expired_live >= 1,
        "sweep removed no live record: {report:?}"
    );
    h.clock.advance_ms(ttl);
    let got = ok(C, "get after second TTL", store.get(&stays.key).await)?;
    ensure!(
        C,
        got.is_none(),
        "refreshed record outlived its TTL: {got:?}"
    );
    Ok(())
}

/// `tasks` concurrent claimers (each its own node id) race for one dialog at the same epoch:
/// exactly one wins, and the store shows the winner. Then `tasks` concurrent writers race one
/// compare-and-set put: exactly one wins.
pub async fn concurrent_claims(store: Arc<dyn DialogStore>, tasks: usize) -> CheckResult {
    const C: &str = "concurrent_claims";
    for round in 0..2u64 {
        let r = record(&format!("race-{round}"), "dev-race", "node-start");
        ok(C, "create", store.put(&r, None).await)?;
        let mut handles = Vec::with_capacity(tasks);
        for i in 0..tasks {
            let store = store.clone();
            let key = r.key.clone();
            handles.push(tokio::spawn(async move {
                let node = format!("node-{i}");
                let result = store.claim(&key, &node, 0).await;
                (node, result)
            }));
        }
        let mut winners = Vec::new();
        for handle in handles {
            let (node, result) = handle.await.map_err(|e| ConformanceFailure {
                check: C,
                detail: format!("task failed: {e}"),
            })?;
            match result {
                Ok(rec) => winners.push((node, rec)),
                Err(StoreError::Conflict { current: Some(1) }) => {}
                Err(other) => {
                    return Err(ConformanceFailure {
                        check: C,
                        detail: format!("claimer {node}: unexpected {other:?}"),
                    });
                }
            }
        }
        ensure_eq!(C, winners.len(), 1, "number of winning claims");
        let Some((node, won)) = winners.pop() else {
            return Err(ConformanceFailure {
                check: C,
                detail: "no winner".into(),
            });
        };
        ensure_eq!(
            C,
            (won.owner.as_str(), won.epoch),
            (node.as_str(), 1),
            "winner's record"
        );
        let stored = ok(C, "get", store.get(&r.key).await)?;
        ensure_eq!(
            C,
            stored.map(|s| (s.owner, s.epoch, s.version)),
            Some((node, 1, 2)),
            "stored owner"
        );
    }
    let r = record("race-put", "dev-race", "node-start");
    ok(C, "create", store.put(&r, None).await)?;
    let mut handles = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let store = store.clone();
        let mut mine = r.clone();
        mine.call_ref = u32::try_from(i).unwrap_or(u32::MAX);
        handles.push(tokio::spawn(async move { store.put(&mine, Some(1)).await }));
    }
    let mut won = 0;
    for handle in handles {
        match handle.await.map_err(|e| ConformanceFailure {
            check: C,
            detail: format!("task failed: {e}"),
        })? {
            Ok(2) => won += 1,
            Err(StoreError::Conflict { current: Some(2) }) => {}
            other => {
                return Err(ConformanceFailure {
                    check: C,
                    detail: format!("racing put: unexpected {other:?}"),
                })
            }
        }
    }
    ensure_eq!(C, won, 1, "number of winning puts");
    Ok(())
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
