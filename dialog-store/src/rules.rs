//! The store's semantics as pure functions: compare-and-set put, delete to tombstone, claim,
//! and TTL expiry, over the current slot of one key and the time `now`.
//!
//! The memory and embedded backends call these inside their per-key critical section, so both
//! answer exactly alike; the Redis backend implements the same rules in its Lua scripts (see
//! `redis.rs`), and the conformance suite checks all three against each other. Nothing here
//! stores anything or reads a clock.

use crate::{DialogState, StoreError, StoreSettings, StoredDialog};

/// A stored record with the time it expires (milliseconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The record.
    pub record: StoredDialog,
    /// When the record expires: `updated_at_ms` plus the live or tombstone TTL.
    pub expires_at_ms: u64,
}

impl Slot {
    /// Whether the slot has expired at `now_ms` (expiry is inclusive).
    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms
    }
}

/// The slot as readers see it at `now_ms`: an expired slot is absent.
pub fn visible(slot: Option<&Slot>, now_ms: u64) -> Option<&Slot> {
    slot.filter(|s| !s.is_expired(now_ms))
}

fn ttl_ms(settings: &StoreSettings, state: DialogState) -> u64 {
    let ttl = match state {
        DialogState::Live => settings.live_ttl,
        DialogState::Tombstone => settings.tombstone_ttl,
    };
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

fn stamp(mut record: StoredDialog, now_ms: u64, settings: &StoreSettings) -> Slot {
    record.updated_at_ms = now_ms;
    let expires_at_ms = now_ms.saturating_add(ttl_ms(settings, record.state));
    Slot {
        record,
        expires_at_ms,
    }
}

/// Compare-and-set put. `current` must already be filtered by [`visible`]. `expected = None`
/// creates only when absent (a tombstone counts as present); `Some(v)` writes only over
/// version `v` (live or tombstone). The result is the new live slot at version `v + 1` (or 1).
pub fn put(
    current: Option<&Slot>,
    record: &StoredDialog,
    expected_version: Option<u64>,
    now_ms: u64,
    settings: &StoreSettings,
) -> Result<Slot, StoreError> {
    record.validate()?;
    let current_version = current.map(|s| s.record.version);
    let new_version = match (expected_version, current_version) {
        (None, None) => 1,
        (Some(want), Some(have)) if want == have => have.saturating_add(1),
        (_, have) => return Err(StoreError::Conflict { current: have }),
    };
    let mut next = record.clone();
    next.version = new_version;
    next.state = DialogState::Live;
    Ok(stamp(next, now_ms, settings))
}

/// What a delete does to the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The live record becomes this tombstone.
    Tombstoned(Box<Slot>),
    /// The record was already a tombstone at this version (an unconditional delete repeated);
    /// nothing changes.
    AlreadyTombstone(u64),
}

/// Delete to tombstone. `current` must already be filtered by [`visible`]. `expected = None`
/// deletes whatever version is live; `Some(v)` only version `v`. Absent is
/// [`StoreError::NotFound`]; a tombstone answers its version to an unconditional delete and
/// [`StoreError::Conflict`] to a conditional one.
pub fn delete(
    current: Option<&Slot>,
    expected_version: Option<u64>,
    now_ms: u64,
    settings: &StoreSettings,
) -> Result<DeleteOutcome, StoreError> {
    let Some(slot) = current else {
        return Err(StoreError::NotFound);
    };
    let have = slot.record.version;
    if slot.record.state == DialogState::Tombstone {
        return match expected_version {
            None => Ok(DeleteOutcome::AlreadyTombstone(have)),
            Some(_) => Err(StoreError::Conflict {
                current: Some(have),
            }),
        };
    }
    if let Some(want) = expected_version {
        if want != have {
            return Err(StoreError::Conflict {
                current: Some(have),
            });
        }
    }
    let mut tomb = slot.record.clone();
    tomb.version = have.saturating_add(1);
    tomb.state = DialogState::Tombstone;
    Ok(DeleteOutcome::Tombstoned(Box::new(stamp(
        tomb, now_ms, settings,
    ))))
}

/// Claim ownership. `current` must already be filtered by [`visible`]. Succeeds only on a live
/// record whose epoch is `expected_epoch`; the result has `owner = node_id`, epoch + 1,
/// version + 1, and a fresh live TTL. A different epoch is [`StoreError::Conflict`] carrying the
/// current epoch.
pub fn claim(
    current: Option<&Slot>,
    node_id: &str,
    expected_epoch: u64,
    now_ms: u64,
    settings: &StoreSettings,
) -> Result<Slot, StoreError> {
    validate_node_id(node_id)?;
    let Some(slot) = current else {
        return Err(StoreError::NotFound);
    };
    let record = &slot.record;
    if record.state == DialogState::Tombstone {
        return Err(StoreError::Tombstoned {
            version: record.version,
        });
    }
    if record.epoch != expected_epoch {
        return Err(StoreError::Conflict {
            current: Some(record.epoch),
        });
    }
    let mut next = record.clone();
    next.owner = node_id.to_owned();
    next.epoch = record.epoch.saturating_add(1);
    next.version = record.version.saturating_add(1);
    Ok(stamp(next, now_ms, settings))
}

/// Checks a lease TTL (at least 1 ms) and returns it in milliseconds.
pub fn lease_ttl_ms(ttl: std::time::Duration) -> Result<u64, StoreError> {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Err(StoreError::InvalidRecord(
            "lease TTL must be at least 1 ms".into(),
        ));
    }
    Ok(ms)
}

/// Checks a node id used by claim or list: non-empty and within the id limit.
pub fn validate_node_id(node_id: &str) -> Result<(), StoreError> {
    if node_id.is_empty() || node_id.len() > crate::record::MAX_ID_LEN {
        return Err(StoreError::InvalidRecord(format!(
            "node id must be 1..={} bytes",
            crate::record::MAX_ID_LEN
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DialogKey, SipDialogPayload};
    use std::time::Duration;

    fn settings() -> StoreSettings {
        StoreSettings {
            live_ttl: Duration::from_secs(100),
            tombstone_ttl: Duration::from_secs(10),
        }
    }

    fn rec() -> StoredDialog {
        StoredDialog::new(
            DialogKey::new("c", "l", "r"),
            SipDialogPayload::default(),
            "dev",
            1,
            "node-a",
        )
    }

    #[test]
    fn put_versions_and_expiry() {
        let s = settings();
        let a = put(None, &rec(), None, 1_000, &s).unwrap();
        assert_eq!(a.record.version, 1);
        assert_eq!(a.record.updated_at_ms, 1_000);
        assert_eq!(a.expires_at_ms, 101_000);
        assert_eq!(
            put(Some(&a), &rec(), None, 2_000, &s),
            Err(StoreError::Conflict { current: Some(1) })
        );
        assert_eq!(
            put(None, &rec(), Some(1), 2_000, &s),
            Err(StoreError::Conflict { current: None })
        );
        assert_eq!(
            put(Some(&a), &rec(), Some(5), 2_000, &s),
            Err(StoreError::Conflict { current: Some(1) })
        );
        let b = put(Some(&a), &rec(), Some(1), 2_000, &s).unwrap();
        assert_eq!(b.record.version, 2);
        assert!(visible(Some(&b), 101_999).is_some());
        assert!(visible(Some(&b), 102_000).is_none());
    }

    #[test]
    fn delete_and_claim_rules() {
        let s = settings();
        assert_eq!(delete(None, None, 0, &s), Err(StoreError::NotFound));
        let a = put(None, &rec(), None, 0, &s).unwrap();
        let DeleteOutcome::Tombstoned(t) = delete(Some(&a), Some(1), 500, &s).unwrap() else {
            panic!("expected a tombstone")
        };
        assert_eq!(t.record.version, 2);
        assert_eq!(t.record.state, DialogState::Tombstone);
        assert_eq!(t.expires_at_ms, 10_500);
        assert_eq!(
            delete(Some(&t), None, 600, &s),
            Ok(DeleteOutcome::AlreadyTombstone(2))
        );
        assert_eq!(
            delete(Some(&t), Some(2), 600, &s),
            Err(StoreError::Conflict { current: Some(2) })
        );
        assert_eq!(
            claim(Some(&t), "node-b", 0, 600, &s),
            Err(StoreError::Tombstoned { version: 2 })
        );
        let c = claim(Some(&a), "node-b", 0, 700, &s).unwrap();
        assert_eq!(
            (c.record.owner.as_str(), c.record.epoch, c.record.version),
            ("node-b", 1, 2)
        );
        assert_eq!(
            claim(Some(&c), "node-c", 0, 700, &s),
            Err(StoreError::Conflict { current: Some(1) })
        );
        assert!(matches!(
            claim(Some(&c), "", 1, 700, &s),
            Err(StoreError::InvalidRecord(_))
        ));
    }
}
