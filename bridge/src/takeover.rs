//! Takeover: continuing here a dialog that another node (or this node before a restart) wrote
//! to the dialog store.
//!
//! One procedure (`take_over`) serves every way in:
//! - **UAS mode** (`unknown_dialog`), as in JAIN SIP HA: a request arrives for a dialog the
//!   user agent does not hold. The record is read and, once its owner can no longer be acting
//!   on it (the record names this node, the owner's lease lapsed, or a balancer says the owner
//!   left the live set: the fencing rule of `thalamus_ownership::fence`; a takeover waits for
//!   that at most the takeover timeout), claimed (compare-and-set on the owner epoch: exactly
//!   one node wins), the SIP dialog is imported, a call is attached, and the
//!   request is delivered again, so the call answers it (BYE 200, re-INVITE answered with this
//!   node's media, INFO and MESSAGE 200). A request for an ended dialog (a tombstone) is
//!   answered as the dialog's end: BYE 200 (a late retransmission of the BYE that ended it),
//!   anything else 481. An unknown dialog is 481; a lost race, a live owner or an unreachable
//!   store is 503 with `Retry-After` (the peer tries again, and the owner answers).
//! - **UAC mode** ([`crate::Bridge::claim_dialog`],
//!   [`crate::Bridge::hangup_dialog`], the admin endpoint): this node fetches a dialog
//!   by id and sends its next request itself, with the CSeq and route set of the record.
//! - **Devices follow** (`resume_device`): a device resuming its session here has its stored
//!   dialogs listed; those whose owner's lease lapsed (or that name this node) are claimed at
//!   once, the others are watched (listed in the Welcome, claimed when the lease lapses or at
//!   the first request from either side).
//!
//! - **Ringing calls** (`early-and-confirmed`): a record whose payload is an INVITE (an early
//!   record, `crate::dialogs::early_invite_of`) is claimed like the others, but its INVITE is
//!   adopted as a server transaction of this node (`adopt_ringing_call`) and the call rings on
//!   at the device; the device (resume, or a command for the call), the API, or the caller's
//!   CANCEL reaching this node (`unknown_cancel`) continue it. A record that rang out, or that
//!   cannot be adopted, is ended instead.
//!
//! - **Presence subscriptions** (a SIP watcher's subscription to a device, a record of
//!   `crate::dialogs::SUBSCRIPTION_FORMAT`): claimed the same way (`adopt_subscription`) on the
//!   watcher's request, or when the device comes online here (`claim_subscriptions`), and
//!   continued by `crate::watchers`.
//!
//! After the takeover of an answered call the call re-INVITEs the peer with this node's media
//! address (see [`crate::call`]); an adopted ringing call answers with it. Conflict notices from the replicator (`drop_lost_dialogs`) tell a
//! node that another one took its dialog over; the call is dropped without a BYE.
//!
//! What it does not do: decide ownership of devices (the balancer's hash), write records (the
//! calls do, through the replicator), or run SIP timers of dialogs it does not hold.

use std::sync::Arc;
use std::time::{Duration, Instant};

use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{CallState, EndReason, Hangup, LiveCall};
use thalamus_sip::message::{HeaderName, Method, Request};
use thalamus_sip::ua::ServerTx;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::call::core::CallKey;
use crate::call::{self, CallSetup, TakeoverSetup};
use crate::dialogs::{
    dialog_of_key, early_invite_of, key_of_request, prepare_for_import, remote_uri_of,
    sip_record_of, subscription_of, CallAppData,
};
use crate::mapping::ended_by;
use crate::shared::BridgeInner;
use crate::table::CallCommand;
use thalamus_dialog_store::replicator::ConflictNotice;
use thalamus_dialog_store::{DialogKey, DialogStore, StoreError, StoredDialog};
use thalamus_telemetry::inc;

/// Most stored dialogs of one device looked at when it resumes.
pub const MAX_RESUME_DIALOGS: usize = 64;

/// Most store lookups in flight for CANCELs of INVITEs this node does not hold (each is a
/// listing of the device's records): a CANCEL beyond them is dropped unanswered (its sender
/// retransmits it).
pub const MAX_CANCEL_LOOKUPS: usize = 64;

/// How often a watched call checks its owner's lease again before giving up.
const MAX_LEASE_CHECKS: u32 = 64;
/// Longest sleep between those checks (a balancer may say the owner left before its lease
/// ends).
const LEASE_CHECK_EVERY: Duration = Duration::from_millis(500);

pub use crate::call::TakeoverTrigger as Trigger;

/// Why a dialog was not taken over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TakeoverError {
    /// No record: the dialog was never replicated, or expired.
    #[error("no such dialog in the store")]
    NotFound,
    /// The dialog ended (a tombstone).
    #[error("the dialog ended")]
    Ended,
    /// Another node claimed it first.
    #[error("another node took the dialog over (epoch {current:?})")]
    LostRace {
        /// The epoch the store holds.
        current: Option<u64>,
    },
    /// The store did not answer in time or is unreachable.
    #[error("dialog store unavailable: {0}")]
    Unavailable(String),
    /// The record cannot be continued here.
    #[error("the dialog cannot be continued here: {0}")]
    Invalid(String),
    /// This node has no dialog store.
    #[error("no dialog store on this node")]
    Disabled,
    /// The owner's lease still runs and no balancer says it left the live set: it may still be
    /// acting on the dialog, so it is not claimed from it.
    #[error("the owner {0} is alive and holds the dialog")]
    OwnerAlive(String),
}

impl TakeoverError {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Ended => "ended",
            Self::LostRace { .. } => "lost_race",
            Self::Unavailable(_) => "unavailable",
            Self::Invalid(_) => "invalid",
            Self::Disabled => "disabled",
            Self::OwnerAlive(_) => "owner_alive",
        }
    }

    fn from_store(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::NotFound,
            StoreError::Tombstoned { .. } => Self::Ended,
            StoreError::Conflict { current } => Self::LostRace { current },
            e if e.is_transient() => Self::Unavailable(e.to_string()),
            StoreError::Closed => Self::Unavailable(e.to_string()),
            e => Self::Invalid(e.to_string()),
        }
    }
}

/// A dialog this node now holds.
#[derive(Debug)]
pub struct TakenOver {
    /// The call's `(device, call_ref)`.
    pub call: CallKey,
    /// The claimed record; `None` when the dialog was already held here.
    pub record: Option<StoredDialog>,
}

async fn bounded<T>(
    inner: &BridgeInner,
    what: &str,
    op: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, TakeoverError> {
    match tokio::time::timeout(inner.config.takeover_timeout, op).await {
        Ok(result) => result.map_err(TakeoverError::from_store),
        Err(_) => Err(TakeoverError::Unavailable(format!("{what} timed out"))),
    }
}

fn store_of(inner: &BridgeInner) -> Result<Arc<dyn DialogStore>, TakeoverError> {
    inner.store.clone().ok_or(TakeoverError::Disabled)
}

/// Takes `key` over for this node (see the module notes), once: concurrent attempts on the
/// same dialog wait for the first and then find it held.
pub(crate) async fn take_over(
    inner: &Arc<BridgeInner>,
    key: &DialogKey,
    trigger: Trigger,
) -> Result<TakenOver, TakeoverError> {
    key.validate()
        .map_err(|e| TakeoverError::Invalid(e.to_string()))?;
    let store = store_of(inner)?;
    let lock = inner.takeovers.entry(key.clone()).or_default().clone();
    let result = {
        let _guard = lock.lock().await;
        take_over_locked(inner, &store, key, trigger).await
    };
    inner
        .takeovers
        .remove_if(key, |_, l| Arc::strong_count(l) <= 2);
    drop(lock);
    match &result {
        Ok(TakenOver {
            record: Some(_), ..
        }) => inc(&inner.metrics.takeovers, "claimed"),
        Ok(_) => {}
        Err(e) => inc(&inner.metrics.takeovers, e.label()),
    }
    result
}

async fn take_over_locked(
    inner: &Arc<BridgeInner>,
    store: &Arc<dyn DialogStore>,
    key: &DialogKey,
    trigger: Trigger,
) -> Result<TakenOver, TakeoverError> {
    if let Some(call) = inner.by_dialog.get(&dialog_of_key(key)).map(|c| c.clone()) {
        if let Trigger::DeviceCommand { request_id, body } = trigger {
            if let Some(handle) = inner.calls.get(&call) {
                handle.send(CallCommand::Device(request_id, body));
            }
        } else if let Trigger::Hangup = trigger {
            if let Some(handle) = inner.calls.get(&call) {
                handle.send(CallCommand::Device(
                    0,
                    Body::Hangup(Hangup { call_ref: call.1 }),
                ));
            }
        }
        return Ok(TakenOver { call, record: None });
    }
    let dialog = dialog_of_key(key);
    if let Some((device, _, _)) = inner.watchers.with(|s| s.describe(&dialog)) {
        if trigger == Trigger::Hangup {
            crate::watchers::notify_taken_over(inner, dialog, true);
        }
        return Ok(TakenOver {
            call: (device, 0),
            record: None,
        });
    }
    let record = match bounded(inner, "reading the dialog", store.get(key)).await? {
        None => return Err(TakeoverError::NotFound),
        Some(r) if !r.is_live() => return Err(TakeoverError::Ended),
        Some(r) => r,
    };
    if let Some(sub) = subscription_of(&record) {
        let sub = sub.map_err(|e| TakeoverError::Invalid(e.to_string()))?;
        return adopt_subscription(inner, store, record, sub, trigger).await;
    }
    if let Some(early) = early_invite_of(&record) {
        let (invite, source) = early.map_err(|e| TakeoverError::Invalid(e.to_string()))?;
        return adopt_ringing_call(inner, store, record, invite, source, trigger).await;
    }
    if trigger == Trigger::Cancel {
        // The call was answered meanwhile: a CANCEL does not end an answered call.
        return Err(TakeoverError::Invalid("the call was answered".into()));
    }
    // Check what can be checked before claiming, so a record this node cannot continue stays
    // with its owner.
    sip_record_of(&record).map_err(|e| TakeoverError::Invalid(e.to_string()))?;
    let call = (record.device_id.clone(), record.call_ref);
    if inner.calls.contains_key(&call) {
        return Err(TakeoverError::Invalid(format!(
            "call_ref {} of device {} is in use on this node",
            call.1, call.0
        )));
    }
    // The record as it is once its owner can no longer be acting on it (its owner may have
    // released it meanwhile).
    let record = owner_released(inner, store, record).await?;
    let node_id = inner.config.node_id.clone();
    let claimed = bounded(
        inner,
        "claiming the dialog",
        store.claim(key, &node_id, record.epoch),
    )
    .await?;
    attach_claimed(inner, store, claimed, record.owner, trigger).await
}

/// Continues a confirmed dialog this node just claimed (`claimed`, the record as the claim
/// left it: its latest content): imports its SIP dialog and starts its call.
async fn attach_claimed(
    inner: &Arc<BridgeInner>,
    store: &Arc<dyn DialogStore>,
    claimed: StoredDialog,
    previous_owner: String,
    trigger: Trigger,
) -> Result<TakenOver, TakeoverError> {
    let key = &claimed.key;
    let call = (claimed.device_id.clone(), claimed.call_ref);
    let sip = match sip_record_of(&claimed) {
        Ok(sip) => sip,
        Err(e) => {
            // Claimed but unreadable (written by another build since the first read): ended
            // here rather than left live under this node.
            warn!(dialog = %key, error = %e, "claimed dialog cannot be continued here");
            end_claimed(inner, store, &claimed).await;
            return Err(TakeoverError::Invalid(e.to_string()));
        }
    };
    // A CANCEL that found the call ringing, now answered: continued like a resumed call.
    let trigger = match trigger {
        Trigger::Cancel => Trigger::Api,
        other => other,
    };
    let contact = crate::dialogs::import_contact(&sip, |transport| {
        inner.ua.contact(Some(&claimed.device_id), transport)
    });
    let prepared = prepare_for_import(sip, &contact);
    let dialog = match inner.ua.import(prepared.clone()).await {
        Ok(d) => d,
        Err(e) => {
            // Claimed but not importable: the record stays ours and expires with its TTL.
            warn!(dialog = %key, error = %e, "claimed dialog could not be imported");
            return Err(TakeoverError::Invalid(e.to_string()));
        }
    };
    inner.watched.remove(&call);
    info!(
        dialog = %key,
        device = %call.0,
        call_ref = call.1,
        epoch = claimed.epoch,
        previous_owner = %previous_owner,
        "dialog taken over"
    );
    call::driver::spawn(
        inner.clone(),
        call.clone(),
        CallSetup::TakenOver(Box::new(TakeoverSetup {
            record: claimed.clone(),
            sip: prepared,
            dialog,
            trigger,
            previous_owner,
        })),
    );
    Ok(TakenOver {
        call,
        record: Some(claimed),
    })
}

/// The early record of a call that was ringing on another node: claimed once its owner can no
/// longer be acting on it, its INVITE adopted (a server transaction here, answered with the
/// early dialog's To tag), and the call continued ringing at the device, which resumed here.
/// The device (its resume, or a command for the call), the API, or the caller's CANCEL
/// (`unknown_cancel`) continue a ringing call; a request from the peer within the early
/// dialog finds nothing to continue.
async fn adopt_ringing_call(
    inner: &Arc<BridgeInner>,
    store: &Arc<dyn DialogStore>,
    record: StoredDialog,
    invite: Request,
    source: thalamus_sip::peer::Peer,
    trigger: Trigger,
) -> Result<TakenOver, TakeoverError> {
    if matches!(trigger, Trigger::Request { .. } | Trigger::Hangup) {
        return Err(TakeoverError::Invalid(
            "a ringing call continues with its device".into(),
        ));
    }
    let call = (record.device_id.clone(), record.call_ref);
    if inner.calls.contains_key(&call) {
        return Err(TakeoverError::Invalid(format!(
            "call_ref {} of device {} is in use on this node",
            call.1, call.0
        )));
    }
    // The caller's INVITE may have reached this node as a new call already (a retransmission
    // after the death): that call goes on, this record is not needed.
    let merge = crate::inbound::merge_key(&invite);
    if merge
        .as_ref()
        .is_some_and(|k| inner.in_progress.contains_key(k))
    {
        return Err(TakeoverError::Invalid(
            "the INVITE is being answered here already".into(),
        ));
    }
    let key = record.key.clone();
    let record = if trigger == Trigger::Cancel {
        // A CANCEL does not wait for a live owner (it would hold a lookup slot for the
        // takeover timeout): its retransmission asks again (see `unknown_cancel`).
        match lease_left(inner, store, &record).await {
            None => record,
            Some(_) => return Err(TakeoverError::OwnerAlive(record.owner.clone())),
        }
    } else {
        owner_released(inner, store, record).await?
    };
    let node_id = inner.config.node_id.clone();
    let claimed = bounded(
        inner,
        "claiming the ringing call",
        store.claim(&key, &node_id, record.epoch),
    )
    .await?;
    if early_invite_of(&claimed).is_none() {
        // Answered by its owner between our first read and the claim: a confirmed dialog now.
        return attach_claimed(inner, store, claimed, record.owner, trigger).await;
    }
    // The no-answer time runs from the first ring (the first owner's clock: nodes' clocks are
    // kept close by NTP; a clock behind ours gives at most that much more ringing).
    let started_ms = claimed
        .app_data
        .as_deref()
        .and_then(CallAppData::decode)
        .and_then(|a| a.started_ms);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let rang_for = Duration::from_millis(started_ms.map_or(0, |s| now_ms.saturating_sub(s)));
    if rang_for >= inner.config.no_answer_timeout {
        // Rung out while nobody held it: the caller has given up or will get no answer; the
        // record ends here instead of ringing again.
        end_claimed(inner, store, &claimed).await;
        return Err(TakeoverError::Ended);
    }
    let tx = match inner
        .ua
        .adopt_invite(invite.clone(), source, key.local_tag.clone())
        .await
    {
        Ok(tx) => tx,
        Err(e) => {
            // Claimed but not adoptable (the INVITE is here already, or the transaction table
            // is full and the layer answered 503): the record ends rather than ring again.
            warn!(dialog = %key, error = %e, "claimed ringing call could not be adopted");
            end_claimed(inner, store, &claimed).await;
            return Err(TakeoverError::Invalid(e.to_string()));
        }
    };
    inner.watched.remove(&call);
    let mut in_progress = crate::shared::InProgress {
        inner: inner.clone(),
        key: None,
        ringing: None,
    };
    if let Some(k) = merge {
        let branch = invite.branch().unwrap_or_default().to_string();
        if let dashmap::mapref::entry::Entry::Vacant(v) = inner.in_progress.entry(k.clone()) {
            v.insert(branch);
            in_progress.key = Some(k);
        }
    }
    in_progress.ring(&call);
    inner.by_invite.insert(tx, call.clone());
    info!(
        dialog = %key,
        device = %call.0,
        call_ref = call.1,
        epoch = claimed.epoch,
        previous_owner = %record.owner,
        "ringing call taken over"
    );
    inc(&inner.metrics.takeovers, "claimed_early");
    call::driver::spawn(
        inner.clone(),
        call.clone(),
        CallSetup::Adopted(Box::new(call::AdoptSetup {
            tx,
            invite,
            record: claimed.clone(),
            trigger,
            previous_owner: record.owner.clone(),
            rang_for,
            in_progress,
        })),
    );
    Ok(TakenOver { call, record: None })
}

/// A SIP watcher's subscription to a device's presence, held by another node (that died):
/// claimed once its owner can no longer be acting on it, its dialog imported, and the
/// subscription continued here with the time it has left. The watcher's request that found it
/// is then delivered again (a refresh or an unsubscribe); otherwise (the device arrived here,
/// the API) the watcher gets a NOTIFY from this node, which points its next request here. One
/// that expired meanwhile, or that this node cannot take (a limit), ends.
async fn adopt_subscription(
    inner: &Arc<BridgeInner>,
    store: &Arc<dyn DialogStore>,
    record: StoredDialog,
    sub: crate::dialogs::StoredSubscription,
    trigger: Trigger,
) -> Result<TakenOver, TakeoverError> {
    if trigger == Trigger::Cancel {
        return Err(TakeoverError::Invalid(
            "a subscription has no INVITE".into(),
        ));
    }
    let key = record.key.clone();
    let record = owner_released(inner, store, record).await?;
    let node_id = inner.config.node_id.clone();
    let claimed = bounded(
        inner,
        "claiming the subscription",
        store.claim(&key, &node_id, record.epoch),
    )
    .await?;
    // The claimed content is the latest: read it again.
    let sub = match subscription_of(&claimed) {
        Some(Ok(latest)) => latest,
        _ => sub,
    };
    let device = claimed.device_id.clone();
    let dialog = match crate::watchers::attach(inner, &claimed, sub).await {
        Ok(dialog) => dialog,
        Err(why) => {
            debug!(dialog = %key, why, "claimed subscription not continued: ended");
            end_claimed(inner, store, &claimed).await;
            return Err(TakeoverError::Ended);
        }
    };
    info!(
        dialog = %key,
        device = %device,
        epoch = claimed.epoch,
        previous_owner = %record.owner,
        "subscription taken over"
    );
    inc(&inner.metrics.takeovers, "claimed_subscription");
    match trigger {
        Trigger::Request { .. } => {}
        Trigger::Hangup => crate::watchers::notify_taken_over(inner, dialog, true),
        _ => crate::watchers::notify_taken_over(inner, dialog, false),
    }
    Ok(TakenOver {
        call: (device, 0),
        record: None,
    })
}

/// Ends a record this node claimed but cannot continue (a tombstone, compare-and-set on the
/// claimed version), so it neither stays live under this node nor rings again.
async fn end_claimed(inner: &BridgeInner, store: &Arc<dyn DialogStore>, claimed: &StoredDialog) {
    if let Err(e) = bounded(
        inner,
        "ending the claimed record",
        store.delete(&claimed.key, Some(claimed.version)),
    )
    .await
    {
        debug!(dialog = %claimed.key, error = %e, "claimed record not ended");
    }
}

/// Waits, at most the takeover timeout, until the owner of `record` can no longer be acting on
/// it (the fencing rule of `thalamus_ownership::fence`): the record names this node, or no
/// node (its owner released it: see [`release_orphans`]), the owner's lease lapsed, or a
/// balancer says the owner left the live set. A live owner keeps its dialog: `OwnerAlive`.
/// The record is read again while waiting (its owner may release it, or another node claim
/// it); the one returned is the latest.
async fn owner_released(
    inner: &BridgeInner,
    store: &Arc<dyn DialogStore>,
    mut record: StoredDialog,
) -> Result<StoredDialog, TakeoverError> {
    let deadline = tokio::time::Instant::now() + inner.config.takeover_timeout;
    loop {
        if record.owner == inner.config.node_id
            || is_released(&record.owner)
            || owner_gone(inner, &record.owner)
        {
            return Ok(record);
        }
        let left = bounded(
            inner,
            "reading the lease",
            store.lease_remaining(&record.owner),
        )
        .await?;
        let Some(left) = left else {
            return Ok(record);
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(TakeoverError::OwnerAlive(record.owner.clone()));
        }
        // The next live-set report (a heartbeat interval) or the lease's end, whichever is
        // first, at most the time left.
        let wait = left
            .min(OWNER_POLL)
            .min(deadline.saturating_duration_since(now))
            .max(Duration::from_millis(1));
        tokio::time::sleep(wait).await;
        record = match bounded(inner, "reading the dialog", store.get(&record.key)).await? {
            None => return Err(TakeoverError::NotFound),
            Some(r) if !r.is_live() => return Err(TakeoverError::Ended),
            Some(r) => r,
        };
    }
}

/// The owner a node writes into a record it releases: not a node id (it holds `~`), so no
/// node's lease or live set keeps it, and any node claims it at once.
fn released_owner(node_id: &str) -> String {
    format!("{node_id}~released")
}

fn is_released(owner: &str) -> bool {
    owner.ends_with("~released")
}

/// The dialogs this node holds (those of devices connected here too, or not), with their calls.
fn held_dialogs(inner: &BridgeInner, with_device_here: bool) -> Vec<(DialogKey, CallKey)> {
    inner
        .by_dialog
        .iter()
        .filter(|e| with_device_here || !inner.device_online(&e.value().0))
        .map(|e| (crate::dialogs::key_of_dialog(e.key()), e.value().clone()))
        .collect()
}

/// Whether `record` is live and this node's.
fn owned_here(inner: &BridgeInner, record: &StoredDialog) -> bool {
    record.is_live() && record.owner == inner.config.node_id
}

/// Reads the stored record of every dialog this node holds and drops, without a BYE, the calls
/// whose dialog another node now owns or ended (see [`crate::Bridge::verify_ownership`]). A
/// record the store does not have, or cannot read in time, is kept. Returns (dialogs checked,
/// calls dropped).
pub(crate) async fn verify_ownership(inner: &Arc<BridgeInner>) -> (usize, usize) {
    let Some(store) = inner.store.clone() else {
        return (0, 0);
    };
    let held = held_dialogs(inner, true);
    let mut dropped = 0;
    // Subscriptions to devices' presence another node took meanwhile are dropped too (no
    // NOTIFY: their watchers hear from that node).
    let subs: Vec<thalamus_sip::dialog::DialogId> = inner
        .watchers
        .stored
        .iter()
        .map(|e| e.key().clone())
        .collect();
    for dialog in &subs {
        let key = crate::dialogs::key_of_dialog(dialog);
        let Ok(Some(record)) = bounded(inner, "reading the dialog", store.get(&key)).await else {
            continue;
        };
        if !owned_here(inner, &record) {
            info!(dialog = %key, owner = %record.owner, "a subscription this node held was taken over elsewhere while it was out: dropping it here");
            crate::watchers::lost(inner, dialog).await;
        }
    }
    for (key, call) in &held {
        let Ok(Some(record)) = bounded(inner, "reading the dialog", store.get(key)).await else {
            continue;
        };
        if owned_here(inner, &record) {
            continue;
        }
        if let Some(handle) = inner.calls.get(call) {
            info!(dialog = %key, owner = %record.owner, live = record.is_live(),
                "a dialog this node held was taken over (or ended) elsewhere while it was out: dropping it here");
            handle.send(CallCommand::OwnershipLost);
            dropped += 1;
        }
    }
    (held.len(), dropped)
}

/// Releases the dialogs this node holds for devices that are no longer connected here (they
/// moved to another node while this one was out of the live set, without resuming their
/// sessions): each record is claimed for no node (compare-and-set on its epoch), and the call
/// is dropped here without a BYE. The node the device (or the peer's next request) reaches
/// claims it at once. Returns how many were released.
pub(crate) async fn release_orphans(inner: &Arc<BridgeInner>) -> usize {
    let Some(store) = inner.store.clone() else {
        return 0;
    };
    let mut released = 0;
    for (key, call) in held_dialogs(inner, false) {
        let Ok(Some(record)) = bounded(inner, "reading the dialog", store.get(&key)).await else {
            continue;
        };
        // A ringing call stays: its device is not here, and its INVITE is answered here (603
        // once the device's grace period ends) rather than left to the caller's patience.
        if !owned_here(inner, &record) || early_invite_of(&record).is_some() {
            continue;
        }
        let owner = released_owner(&inner.config.node_id);
        if bounded(
            inner,
            "releasing the dialog",
            store.claim(&key, &owner, record.epoch),
        )
        .await
        .is_err()
        {
            continue;
        }
        if let Some(handle) = inner.calls.get(&call) {
            info!(dialog = %key, device = %call.0, "the device left while this node was out: dialog released for the node it reaches");
            handle.send(CallCommand::OwnershipLost);
            released += 1;
        }
    }
    released
}

/// How often a takeover waiting for a live owner looks at the live set and the lease again.
const OWNER_POLL: Duration = Duration::from_millis(100);

/// Whether a balancer says `owner` left the live set.
fn owner_gone(inner: &BridgeInner, owner: &str) -> bool {
    let (Some(fence), Ok(owner)) = (&inner.fence, thalamus_ownership::NodeId::new(owner)) else {
        return false;
    };
    fence.owner_gone(&owner, tokio::time::Instant::now().into_std())
}

/// UAS mode: a request for a dialog the user agent does not hold.
pub(crate) async fn unknown_dialog(
    inner: Arc<BridgeInner>,
    tx: ServerTx,
    request: Request,
    arrived: Instant,
) {
    let ua = &inner.ua;
    let Some(key) = key_of_request(&request) else {
        inc(&inner.metrics.sip_refused, "unknown_dialog");
        let _ = ua.reject_unknown(tx).await;
        return;
    };
    let method = request.method.clone();
    let trigger = Trigger::Request {
        method: method.clone(),
        arrived,
    };
    match take_over(&inner, &key, trigger).await {
        Ok(_) => {
            let _ = ua.redeliver(tx).await;
        }
        Err(TakeoverError::Ended) if method == Method::Bye => {
            // A late retransmission of the BYE that ended the dialog (or a BYE crossing ours):
            // the dialog is over, as the BYE asks.
            let _ = ua.respond(tx, 200, None, None).await;
        }
        // Another node holds the dialog, or won it just now (its device resumed there and
        // claimed it while this request waited for the dead owner to be declared gone). A
        // non-INVITE request over UDP is dropped unanswered: its retransmission (500 ms on, to
        // timer F) reaches the holder once the balancer has its next heartbeat (the device is
        // pinned there). A 503 would end a BYE for good: most peers do not send it again, and
        // the dialog would stay up on the holder until its timers end it. A re-INVITE is not
        // dropped: it had its 100 Trying by now and is not retransmitted after it.
        Err(e @ (TakeoverError::LostRace { .. } | TakeoverError::OwnerAlive(_)))
            if method != Method::Invite && !arrived_reliably(&request) =>
        {
            debug!(dialog = %key, error = %e, "request for a dialog held elsewhere: dropped, to be retransmitted");
            inc(&inner.metrics.sip_refused, "takeover_later");
            let _ = ua.abandon(tx).await;
        }
        Err(
            e @ (TakeoverError::LostRace { .. }
            | TakeoverError::Unavailable(_)
            | TakeoverError::OwnerAlive(_)),
        ) => {
            debug!(dialog = %key, error = %e, "takeover failed; 503");
            inc(&inner.metrics.sip_refused, "takeover_unavailable");
            let _ = ua
                .respond_with_headers(
                    tx,
                    503,
                    None,
                    None,
                    vec![(HeaderName::RetryAfter, "1".to_string())],
                )
                .await;
        }
        Err(e) => {
            debug!(dialog = %key, error = %e, "no dialog to take over; 481");
            inc(&inner.metrics.sip_refused, "unknown_dialog");
            let _ = ua.reject_unknown(tx).await;
        }
    }
}

/// Whether `request` came over a reliable transport (its top Via: TCP, TLS...), which does not
/// retransmit it.
fn arrived_reliably(request: &Request) -> bool {
    request
        .headers
        .top_via()
        .is_ok_and(|v| v.transport.is_reliable())
}

/// A CANCEL for an INVITE this node does not hold: the INVITE may have been ringing on a node
/// that died (its early record in the store) before its device resumed anywhere. From a source
/// the inbound policy lets through without credentials (a CANCEL cannot be challenged), for a
/// device of the fleet, the device's stored dialogs are read (bounded like every takeover, at
/// most [`MAX_CANCEL_LOOKUPS`] at once); the early record of this INVITE (Call-ID and From tag)
/// is claimed and the INVITE adopted; the CANCEL, delivered again, then cancels it as if it
/// had arrived here (200, 487), and the record ends. While the record's owner may still be
/// alive (or the store is slow, or the lookups are all busy) the CANCEL is dropped unanswered
/// for its retransmission to try again; without a record it is 481, as before.
pub(crate) async fn unknown_cancel(
    inner: Arc<BridgeInner>,
    tx: ServerTx,
    request: Request,
    source: thalamus_sip::peer::Peer,
) {
    let ua = &inner.ua;
    let found = match inner.cancel_lookups.clone().try_acquire_owned() {
        Ok(_slot) => match early_record_of_cancel(&inner, &request, source).await {
            Some(record) => take_over(&inner, &record.key, Trigger::Cancel).await,
            None => Err(TakeoverError::NotFound),
        },
        Err(_) => Err(TakeoverError::Unavailable("too many CANCEL lookups".into())),
    };
    match found {
        // The INVITE is adopted: the CANCEL, delivered again, cancels it (200, 487).
        Ok(_) => {
            let _ = ua.redeliver(tx).await;
        }
        // Not yet: the owner may be alive (a balancer has not said it left, its lease runs),
        // another node is claiming, the store is slow, or too many lookups run. A 481 would
        // end the caller's CANCEL for good; dropped unanswered, its retransmission (every
        // 500 ms, then 4 s, for 32 s) asks again.
        Err(
            e @ (TakeoverError::OwnerAlive(_)
            | TakeoverError::LostRace { .. }
            | TakeoverError::Unavailable(_)),
        ) => {
            debug!(error = %e, "CANCEL for an INVITE ringing elsewhere: dropped, to be retransmitted");
            inc(&inner.metrics.sip_refused, "cancel_later");
            let _ = ua.abandon(tx).await;
        }
        Err(e) => {
            debug!(error = %e, "CANCEL for an INVITE not held here; 481");
            inc(&inner.metrics.sip_refused, "unknown_dialog");
            let _ = ua.reject_unknown(tx).await;
        }
    }
}

/// The live early record of the INVITE `cancel` cancels, if the store has one.
async fn early_record_of_cancel(
    inner: &Arc<BridgeInner>,
    cancel: &Request,
    source: thalamus_sip::peer::Peer,
) -> Option<StoredDialog> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if inner.inbound_policy().check(source.addr.ip(), cancel, now)
        != crate::inbound::InboundVerdict::Allow
    {
        return None;
    }
    let device = crate::inbound::addressed_device(cancel)?;
    // A device this fleet does not have has no records: no store read for it.
    if inner.registry.refresh().is_ok() && !inner.registry.contains(&device) {
        return None;
    }
    let call_id = cancel.headers.call_id().ok()?;
    let from_tag = cancel.headers.from_tag().unwrap_or_default();
    let store = store_of(inner).ok()?;
    let records = bounded(
        inner,
        "listing the device's dialogs",
        store.list_by_device(&device),
    )
    .await
    .ok()?;
    records.into_iter().take(MAX_RESUME_DIALOGS).find(|r| {
        r.is_live()
            && r.key.call_id == call_id
            && r.key.remote_tag == from_tag
            && early_invite_of(r).is_some()
    })
}

/// Devices follow: `device` resumed its session here. Bounded by the takeover timeout per
/// store operation and by [`MAX_RESUME_DIALOGS`].
pub(crate) async fn resume_device(inner: Arc<BridgeInner>, device: &str) {
    let Ok(store) = store_of(&inner) else {
        return;
    };
    let records = match bounded(
        &inner,
        "listing the device's dialogs",
        store.list_by_device(device),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            warn!(device, error = %e, "device's stored dialogs not read");
            return;
        }
    };
    // Subscriptions to the device's presence are taken once it is online (its watchers then
    // hear it open): `online` claims those found here (`claim_subscriptions`).
    let (subscriptions, records): (Vec<StoredDialog>, Vec<StoredDialog>) = records
        .into_iter()
        .partition(|r| subscription_of(r).is_some());
    inner
        .resumed_subscriptions
        .insert(device.to_string(), subscriptions);
    for record in records.into_iter().take(MAX_RESUME_DIALOGS) {
        let call = (record.device_id.clone(), record.call_ref);
        if inner.by_dialog.contains_key(&dialog_of_key(&record.key))
            || inner.calls.contains_key(&call)
        {
            continue;
        }
        match lease_left(&inner, &store, &record).await {
            None => {
                if let Err(e) = take_over(&inner, &record.key, Trigger::DeviceResume).await {
                    debug!(dialog = %record.key, error = %e, "resumed device's dialog not taken over");
                }
            }
            Some(left) => {
                info!(
                    dialog = %record.key,
                    owner = %record.owner,
                    lease_left_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
                    "resumed device's call is held by a node whose lease runs: watching it"
                );
                let key = record.key.clone();
                inner.watched.insert(call.clone(), record);
                tokio::spawn(claim_when_lease_lapses(inner.clone(), key, call, left));
            }
        }
    }
}

/// Most subscription records of one device looked at when it comes online.
pub const MAX_DEVICE_SUBSCRIPTIONS: usize = 64;

/// `device` came online here (a new session or a resumed one): the stored subscriptions to its
/// presence that no live node holds (their node died) are taken over, and their watchers hear
/// the device from this node. Those whose owner's lease still runs are claimed when it lapses,
/// while the device stays. `listed`: the device's records as its resume read them (a new
/// session's are read here). Bounded by the takeover timeout per store operation and by
/// [`MAX_DEVICE_SUBSCRIPTIONS`].
pub(crate) async fn claim_subscriptions(
    inner: Arc<BridgeInner>,
    device: String,
    listed: Option<Vec<StoredDialog>>,
) {
    let Ok(store) = store_of(&inner) else {
        return;
    };
    let records = match listed {
        Some(records) => records,
        None => match bounded(
            &inner,
            "listing the device's dialogs",
            store.list_by_device(&device),
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                debug!(device, error = %e, "device's stored subscriptions not read");
                return;
            }
        },
    };
    let subs = records
        .into_iter()
        .filter(|r| subscription_of(r).is_some() && r.owner != inner.config.node_id)
        .take(MAX_DEVICE_SUBSCRIPTIONS);
    for record in subs {
        if inner.watchers.holds(&dialog_of_key(&record.key)) {
            continue;
        }
        match lease_left(&inner, &store, &record).await {
            None => {
                if let Err(e) = take_over(&inner, &record.key, Trigger::DeviceResume).await {
                    debug!(dialog = %record.key, error = %e, "device's subscription not taken over");
                }
            }
            Some(left) => {
                tokio::spawn(claim_subscription_later(
                    inner.clone(),
                    record.key.clone(),
                    device.clone(),
                    left,
                ));
            }
        }
    }
}

/// Claims a subscription when its owner's lease lapses, while its device stays here.
async fn claim_subscription_later(
    inner: Arc<BridgeInner>,
    key: DialogKey,
    device: String,
    mut left: Duration,
) {
    let Ok(store) = store_of(&inner) else {
        return;
    };
    for _ in 0..MAX_LEASE_CHECKS {
        tokio::time::sleep(left.min(LEASE_CHECK_EVERY) + Duration::from_millis(20)).await;
        if !inner.device_online(&device) || inner.watchers.holds(&dialog_of_key(&key)) {
            return;
        }
        let record = match bounded(&inner, "reading the dialog", store.get(&key)).await {
            Ok(Some(r)) if r.is_live() => r,
            Ok(_) => return,
            Err(_) => continue,
        };
        match lease_left(&inner, &store, &record).await {
            None => {
                if let Err(e) = take_over(&inner, &key, Trigger::DeviceResume).await {
                    debug!(dialog = %key, error = %e, "device's subscription not taken over");
                }
                return;
            }
            Some(more) => left = more,
        }
    }
}

/// How long the owner's lease still runs; `None` when it lapsed, a balancer says the owner left
/// the live set, or the record names this node (which restarted). An unreadable lease counts
/// as running for the takeover timeout.
async fn lease_left(
    inner: &BridgeInner,
    store: &Arc<dyn DialogStore>,
    record: &StoredDialog,
) -> Option<Duration> {
    if record.owner == inner.config.node_id || owner_gone(inner, &record.owner) {
        return None;
    }
    match bounded(
        inner,
        "reading the lease",
        store.lease_remaining(&record.owner),
    )
    .await
    {
        Ok(left) => left,
        Err(_) => Some(inner.config.takeover_timeout),
    }
}

async fn claim_when_lease_lapses(
    inner: Arc<BridgeInner>,
    key: DialogKey,
    call: CallKey,
    mut left: Duration,
) {
    let Ok(store) = store_of(&inner) else {
        return;
    };
    for _ in 0..MAX_LEASE_CHECKS {
        tokio::time::sleep(left.min(LEASE_CHECK_EVERY) + Duration::from_millis(20)).await;
        let Some(record) = inner.watched.get(&call).map(|r| r.clone()) else {
            return; // taken over meanwhile, or ended
        };
        if !inner.device_online(&call.0) {
            break;
        }
        match lease_left(&inner, &store, &record).await {
            None => {
                if let Err(e) = take_over(&inner, &key, Trigger::DeviceResume).await {
                    debug!(dialog = %key, error = %e, "watched dialog not taken over");
                    tell_device_if_gone(&inner, &call, &e);
                }
                break;
            }
            Some(more) => left = more,
        }
    }
    inner.watched.remove(&call);
}

/// UAC mode from the device: a command for a call another node holds.
pub(crate) async fn device_command(
    inner: Arc<BridgeInner>,
    key: DialogKey,
    device: String,
    request_id: u64,
    body: Body,
) {
    let call_ref = key_call_ref(&inner, &key);
    if let Err(e) = take_over(&inner, &key, Trigger::DeviceCommand { request_id, body }).await {
        let call = (device.clone(), call_ref);
        inner.to_device(
            &device,
            request_id,
            Body::Error(thalamus_proto::v1::Error {
                code: thalamus_proto::v1::ErrorCode::UnknownCall as i32,
                message: format!("the call could not be taken over: {e}"),
                request_id,
            }),
        );
        tell_device_if_gone(&inner, &call, &e);
        if !matches!(e, TakeoverError::Unavailable(_)) {
            inner.watched.remove(&call);
        }
    }
}

fn key_call_ref(inner: &BridgeInner, key: &DialogKey) -> u32 {
    inner
        .watched
        .iter()
        .find(|w| &w.value().key == key)
        .map(|w| w.key().1)
        .unwrap_or_default()
}

/// A watched call that turned out to have ended: the device learns it.
fn tell_device_if_gone(inner: &BridgeInner, call: &CallKey, e: &TakeoverError) {
    if matches!(e, TakeoverError::Ended | TakeoverError::NotFound) {
        inner.watched.remove(call);
        let ev = ended_by(call.1, EndReason::Normal, "the call ended while away");
        inner.to_device(&call.0, 0, Body::CallEvent(ev));
    }
}

/// UAC mode from the API: end a dialog from here.
pub(crate) async fn hangup(
    inner: &Arc<BridgeInner>,
    key: &DialogKey,
) -> Result<CallKey, TakeoverError> {
    take_over(inner, key, Trigger::Hangup).await.map(|t| t.call)
}

/// The record of a dialog, from the store.
pub(crate) async fn stored_dialog(
    inner: &BridgeInner,
    key: &DialogKey,
) -> Result<Option<StoredDialog>, TakeoverError> {
    key.validate()
        .map_err(|e| TakeoverError::Invalid(e.to_string()))?;
    let store = store_of(inner)?;
    bounded(inner, "reading the dialog", store.get(key)).await
}

/// The live records of a device, from the store.
pub(crate) async fn stored_dialogs_of(
    inner: &BridgeInner,
    device: &str,
) -> Result<Vec<StoredDialog>, TakeoverError> {
    let store = store_of(inner)?;
    bounded(
        inner,
        "listing the device's dialogs",
        store.list_by_device(device),
    )
    .await
}

/// Up to `limit` live stored dialogs `node` owns.
pub(crate) async fn stored_dialogs_owned_by(
    inner: &BridgeInner,
    node: &str,
    limit: usize,
) -> Result<Vec<StoredDialog>, TakeoverError> {
    thalamus_ownership::NodeId::new(node)
        .map_err(|_| TakeoverError::Invalid(format!("not a node id: {node:?}")))?;
    let store = store_of(inner)?;
    bounded(
        inner,
        "listing the node's dialogs",
        store.list_by_owner(node, limit),
    )
    .await
}

/// A watched call as the Welcome lists it.
pub(crate) fn live_call_of(record: &StoredDialog) -> LiveCall {
    let app = record.app_data.as_deref().and_then(CallAppData::decode);
    if early_invite_of(record).is_some() {
        return LiveCall {
            call_ref: record.call_ref,
            remote_uri: app.map(|a| a.remote_uri).unwrap_or_default(),
            state: CallState::Ringing as i32,
        };
    }
    let held = app.is_some_and(|a| a.held);
    LiveCall {
        call_ref: record.call_ref,
        remote_uri: sip_record_of(record)
            .map(|sip| remote_uri_of(record, &sip))
            .unwrap_or_default(),
        state: if held {
            CallState::Held as i32
        } else {
            CallState::Answered as i32
        },
    }
}

/// Drops the calls whose dialogs another node took over (conflict notices of the replicator):
/// no BYE, no tombstone; the owner continues the dialog. A conflict is not always another
/// owner: the store may have lost our record (a Redis restart without persistence, an older
/// snapshot) or kept a write whose answer timed out. So the record is read first: absent, or
/// still ours, and the call writes it again (over the version found) instead of being dropped;
/// only a record another node owns (or a store that cannot say) drops the call.
pub(crate) async fn drop_lost_dialogs(
    inner: Arc<BridgeInner>,
    mut notices: mpsc::Receiver<ConflictNotice>,
) {
    while let Some(notice) = notices.recv().await {
        let dialog = dialog_of_key(&notice.key);
        if inner.watchers.holds(&dialog) {
            // A subscription's writes wait for their outcome and act on a conflict themselves;
            // a conflict on its end (the record another node claimed) needs nothing.
            continue;
        }
        let Some(call) = inner.by_dialog.get(&dialog).map(|c| c.clone()) else {
            continue;
        };
        let stored = match &inner.store {
            Some(store) => {
                tokio::time::timeout(inner.config.takeover_timeout, store.get(&notice.key))
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            None => None,
        };
        // The version to write over: 0 (create) when the store lost the record, the one it
        // holds when that is still ours; `None` when another node owns it or the store cannot
        // say.
        let ours = match &stored {
            Some(None) => Some(0),
            Some(Some(r)) if owned_here(&inner, r) => Some(r.version),
            _ => None,
        };
        let Some(handle) = inner.calls.get(&call) else {
            continue;
        };
        match ours {
            Some(version) if !notice.was_delete => {
                info!(dialog = %notice.key, version, "the store lost this node's record: writing it again");
                handle.send(CallCommand::Rereplicate(Some(version)));
            }
            _ => {
                info!(dialog = %notice.key, current = ?notice.current, "another node owns the dialog: dropping it here");
                handle.send(CallCommand::OwnershipLost);
            }
        }
    }
}
