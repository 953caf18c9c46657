//! The in-memory dialog store: concurrent maps (dashmap) holding records and the indexes by
//! device and by owner, with the shared rules of [`crate::rules`] applied under each key's
//! entry lock.
//!
//! For tests and for a single process that does not need its dialogs after a restart. It does
//! not persist or replicate anything. Expiry is checked on every read against the injected
//! [`Clock`]; [`DialogStore::sweep`] reclaims expired entries.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::rules::{self, DeleteOutcome, Slot};
use crate::{
    Clock, DialogKey, DialogState, DialogStore, StoreError, StoreFuture, StoreSettings,
    StoredDialog, SweepReport,
};

/// The in-memory backend.
#[derive(Debug)]
pub struct MemoryDialogStore {
    records: DashMap<String, Slot>,
    by_device: DashMap<String, HashSet<String>>,
    by_owner: DashMap<String, HashSet<String>>,
    /// Owner leases: node id → expiry time (ms).
    leases: DashMap<String, u64>,
    settings: StoreSettings,
    clock: Arc<dyn Clock>,
    closed: AtomicBool,
}

impl MemoryDialogStore {
    /// An empty store with these TTLs, reading time from `clock`.
    pub fn new(settings: StoreSettings, clock: Arc<dyn Clock>) -> Self {
        Self {
            records: DashMap::new(),
            by_device: DashMap::new(),
            by_owner: DashMap::new(),
            leases: DashMap::new(),
            settings,
            clock,
            closed: AtomicBool::new(false),
        }
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// Moves `storage_key` in the indexes from the old slot's device/owner to the new one's.
    /// Called with the record's entry lock held (lock order: records, then indexes).
    fn reindex(&self, storage_key: &str, old: Option<&Slot>, new: Option<&Slot>) {
        if let Some(old) = old.filter(|s| s.record.is_live()) {
            remove_member(&self.by_device, &old.record.device_id, storage_key);
            remove_member(&self.by_owner, &old.record.owner, storage_key);
        }
        if let Some(new) = new.filter(|s| s.record.is_live()) {
            self.by_device
                .entry(new.record.device_id.clone())
                .or_default()
                .insert(storage_key.to_owned());
            self.by_owner
                .entry(new.record.owner.clone())
                .or_default()
                .insert(storage_key.to_owned());
        }
    }

    /// Applies `change` to the slot of `key` under its entry lock; `change` returns the new
    /// slot (stored, indexes updated) and the answer, or an error (nothing changes).
    fn update<T>(
        &self,
        key: &DialogKey,
        change: impl FnOnce(Option<&Slot>, u64) -> Result<(Option<Slot>, T), StoreError>,
    ) -> Result<T, StoreError> {
        self.check_open()?;
        key.validate()?;
        let now = self.clock.now_ms();
        let storage_key = key.storage_key();
        match self.records.entry(storage_key.clone()) {
            Entry::Occupied(mut occupied) => {
                let (new, answer) = change(rules::visible(Some(occupied.get()), now), now)?;
                if let Some(new) = new {
                    self.reindex(&storage_key, Some(occupied.get()), Some(&new));
                    occupied.insert(new);
                }
                Ok(answer)
            }
            Entry::Vacant(vacant) => {
                let (new, answer) = change(None, now)?;
                if let Some(new) = new {
                    self.reindex(&storage_key, None, Some(&new));
                    vacant.insert(new);
                }
                Ok(answer)
            }
        }
    }

    fn list_index(
        &self,
        index: &DashMap<String, HashSet<String>>,
        matches: impl Fn(&StoredDialog) -> bool,
        limit: usize,
        index_value: &str,
    ) -> Result<Vec<StoredDialog>, StoreError> {
        self.check_open()?;
        let now = self.clock.now_ms();
        let members: Vec<String> = index
            .get(index_value)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        let mut out = Vec::new();
        for member in members {
            if out.len() >= limit {
                break;
            }
            if let Some(slot) = self.records.get(&member) {
                if let Some(slot) = rules::visible(Some(&slot), now) {
                    if slot.record.is_live() && matches(&slot.record) {
                        out.push(slot.record.clone());
                    }
                }
            }
        }
        Ok(out)
    }
}

fn remove_member(index: &DashMap<String, HashSet<String>>, value: &str, storage_key: &str) {
    let now_empty = match index.get_mut(value) {
        Some(mut set) => {
            set.remove(storage_key);
            set.is_empty()
        }
        None => false,
    };
    if now_empty {
        index.remove_if(value, |_, set| set.is_empty());
    }
}

impl DialogStore for MemoryDialogStore {
    fn backend_name(&self) -> &'static str {
        "memory"
    }

    fn get<'a>(&'a self, key: &'a DialogKey) -> StoreFuture<'a, Option<StoredDialog>> {
        Box::pin(async move {
            self.check_open()?;
            key.validate()?;
            let now = self.clock.now_ms();
            Ok(self
                .records
                .get(&key.storage_key())
                .and_then(|slot| rules::visible(Some(&slot), now).map(|s| s.record.clone())))
        })
    }

    fn put<'a>(
        &'a self,
        record: &'a StoredDialog,
        expected_version: Option<u64>,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            self.update(&record.key, |current, now| {
                let new = rules::put(current, record, expected_version, now, &self.settings)?;
                let version = new.record.version;
                Ok((Some(new), version))
            })
        })
    }

    fn delete<'a>(
        &'a self,
        key: &'a DialogKey,
        expected_version: Option<u64>,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            self.update(key, |current, now| {
                match rules::delete(current, expected_version, now, &self.settings)? {
                    DeleteOutcome::Tombstoned(tomb) => {
                        let version = tomb.record.version;
                        Ok((Some(*tomb), version))
                    }
                    DeleteOutcome::AlreadyTombstone(version) => Ok((None, version)),
                }
            })
        })
    }

    fn claim<'a>(
        &'a self,
        key: &'a DialogKey,
        node_id: &'a str,
        expected_epoch: u64,
    ) -> StoreFuture<'a, StoredDialog> {
        Box::pin(async move {
            self.update(key, |current, now| {
                let new = rules::claim(current, node_id, expected_epoch, now, &self.settings)?;
                let record = new.record.clone();
                Ok((Some(new), record))
            })
        })
    }

    fn list_by_device<'a>(&'a self, device_id: &'a str) -> StoreFuture<'a, Vec<StoredDialog>> {
        Box::pin(async move {
            self.list_index(
                &self.by_device,
                |r| r.device_id == device_id,
                usize::MAX,
                device_id,
            )
        })
    }

    fn list_by_owner<'a>(
        &'a self,
        node_id: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredDialog>> {
        Box::pin(
            async move { self.list_index(&self.by_owner, |r| r.owner == node_id, limit, node_id) },
        )
    }

    fn renew_lease<'a>(&'a self, node_id: &'a str, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.check_open()?;
            rules::validate_node_id(node_id)?;
            let ttl_ms = rules::lease_ttl_ms(ttl)?;
            let expires = self.clock.now_ms().saturating_add(ttl_ms);
            self.leases.insert(node_id.to_owned(), expires);
            Ok(())
        })
    }

    fn lease_remaining<'a>(&'a self, node_id: &'a str) -> StoreFuture<'a, Option<Duration>> {
        Box::pin(async move {
            self.check_open()?;
            rules::validate_node_id(node_id)?;
            let now = self.clock.now_ms();
            Ok(self
                .leases
                .get(node_id)
                .map(|e| *e)
                .filter(|&e| e > now)
                .map(|e| Duration::from_millis(e - now)))
        })
    }

    fn sweep(&self) -> StoreFuture<'_, SweepReport> {
        Box::pin(async move {
            self.check_open()?;
            let now = self.clock.now_ms();
            let mut report = SweepReport::default();
            self.leases.retain(|_, expires| {
                let keep = *expires > now;
                if !keep {
                    report.expired_leases += 1;
                }
                keep
            });
            self.records.retain(|storage_key, slot| {
                if !slot.is_expired(now) {
                    return true;
                }
                match slot.record.state {
                    DialogState::Live => report.expired_live += 1,
                    DialogState::Tombstone => report.expired_tombstones += 1,
                }
                self.reindex(storage_key, Some(slot), None);
                false
            });
            Ok(report)
        })
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.closed.store(true, Ordering::Release);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{conformance, ManualClock};

    fn store(clock: &ManualClock) -> MemoryDialogStore {
        MemoryDialogStore::new(StoreSettings::default(), Arc::new(clock.clone()))
    }

    #[tokio::test]
    async fn passes_the_conformance_suite() {
        let clock = ManualClock::new(conformance::START_MS);
        let s = store(&clock);
        let harness = conformance::Harness {
            clock: &clock,
            expiry_follows_clock: true,
            settings: StoreSettings::default(),
        };
        conformance::run_all(&s, harness).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn single_winner_under_concurrency() {
        let clock = ManualClock::new(conformance::START_MS);
        let s: Arc<dyn DialogStore> = Arc::new(store(&clock));
        conformance::concurrent_claims(s, 32).await.unwrap();
    }

    #[tokio::test]
    async fn sweep_empties_the_indexes() {
        let clock = ManualClock::new(conformance::START_MS);
        let s = store(&clock);
        let r = conformance::record("sweep-1", "dev-sweep", "node-a");
        s.put(&r, None).await.unwrap();
        clock.advance_ms(StoreSettings::default().live_ttl.as_millis() as u64);
        let report = s.sweep().await.unwrap();
        assert_eq!(report.expired_live, 1);
        assert!(s.records.is_empty());
        assert!(s.by_device.is_empty());
        assert!(s.by_owner.is_empty());
    }
}
