//! The presence shell: SIP watchers of devices (SUBSCRIBE `Event: presence`, RFC 3856 and
//! RFC 6665) on top of [`crate::presence`]. It answers SUBSCRIBEs (after the same inbound
//! policy as calls and texts), sends the NOTIFYs with PIDF bodies (at once, on every change of
//! a device's presence, on refresh, and a last one when a subscription ends or expires), and
//! forgets subscriptions whose NOTIFY gets 481 or no answer.
//!
//! Subscriptions follow their device across the cluster (issue 18): each one with a store is
//! written to the dialog store (a subscription record, `crate::dialogs::SUBSCRIPTION_FORMAT`)
//! when it is accepted and refreshed, and before its NOTIFYs use up the local CSeqs written
//! ahead; its end tombstones it. When its node dies, the node the device resumes on, or the
//! one the watcher's next request reaches, takes it over (`crate::takeover`). A device that
//! leaves a live node of a cluster for longer than its grace period has its subscriptions
//! there ended with `terminated;reason=deactivated`, so its watchers subscribe again where the
//! device is (RFC 6665 4.2.2). A subscription that another node claimed is dropped here
//! without a NOTIFY.
//!
//! It does not decide what presence is or how long a subscription lasts ([`crate::presence`]
//! does), nor who owns a record (the takeover procedure claims, this module writes).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thalamus_sip::dialog::DialogId;
use thalamus_sip::message::{HeaderName, MediaType, Method, Request};
use thalamus_sip::peer::Peer;
use thalamus_sip::ua::{ClientEvent, ServerTx};
use tracing::debug;

use crate::dialogs::{key_of_dialog, subscription_record, StoredSubscription, NOTIFY_CSEQ_BLOCK};
use crate::presence::{Admit, DevicePresence, Replicated};
use crate::shared::BridgeInner;
use thalamus_dialog_store::StoreError;
use thalamus_telemetry::inc;

/// The event package served.
const PACKAGE: &str = "presence";
/// Its body type.
const PIDF: &str = "application/pidf+xml";

/// A device's presence now: what it set, whether it is online here, whether it has a call.
fn presence_of(inner: &BridgeInner, device: &str) -> DevicePresence {
    let mut p = inner
        .watchers
        .set_by_device
        .get(device)
        .map(|p| p.clone())
        .unwrap_or_default();
    p.online = inner.device_online(device);
    p.in_call = inner.busy_count(device) > 0;
    p
}

fn expires_of(request: &Request) -> Option<u32> {
    request.headers.expires().ok().flatten()
}

/// Whether the request is for the presence package (`Event: presence`, parameters ignored).
fn is_presence(request: &Request) -> bool {
    request
        .headers
        .text(&HeaderName::Event)
        .ok()
        .flatten()
        .and_then(|e| e.split(';').next())
        .is_some_and(|e| e.trim().eq_ignore_ascii_case(PACKAGE))
}

/// Whether the watcher takes PIDF (no Accept: it must, RFC 3856 section 6.6).
fn accepts_pidf(request: &Request) -> bool {
    let Ok(Some(accept)) = request.headers.text(&HeaderName::Accept) else {
        return true;
    };
    accept.split(',').any(|t| {
        let t = t.split(';').next().unwrap_or_default().trim();
        t.eq_ignore_ascii_case(PIDF) || t == "*/*" || t.eq_ignore_ascii_case("application/*")
    })
}

/// An out-of-dialog SUBSCRIBE for `device` (the inbound policy already passed).
pub(crate) async fn subscribe(
    inner: Arc<BridgeInner>,
    tx: ServerTx,
    request: Request,
    source: Peer,
    device: String,
) {
    let ua = &inner.ua;
    if !is_presence(&request) {
        inc(&inner.metrics.sip_refused, "bad_event");
        let allow = vec![(HeaderName::AllowEvents, PACKAGE.to_string())];
        let _ = ua.respond_with_headers(tx, 489, None, None, allow).await;
        return;
    }
    if !accepts_pidf(&request) {
        inc(&inner.metrics.sip_refused, "not_acceptable");
        let accept = vec![(HeaderName::Accept, PIDF.to_string())];
        let _ = ua.respond_with_headers(tx, 406, None, None, accept).await;
        return;
    }
    let watcher: IpAddr = source.addr.ip();
    let asked = expires_of(&request);
    let admit = inner.watchers.with(|s| s.admit(&device, watcher, asked));
    let expires = match refused(&inner, tx, admit).await {
        Some(expires) => expires,
        None => return,
    };
    let headers = vec![(HeaderName::Expires, expires.to_string())];
    let dialog = match ua.respond_with_headers(tx, 200, None, None, headers).await {
        Ok(Some(dialog)) => dialog,
        _ => return,
    };
    let now = tokio::time::Instant::now().into_std();
    inner
        .watchers
        .with(|s| s.insert(dialog.clone(), &device, watcher, now, expires));
    inner.metrics.presence_subscriptions.set(gauge(&inner));
    if expires > 0 && persist(&inner, &dialog).await == Persisted::Lost {
        lost(&inner, &dialog).await;
        return;
    }
    let state = if expires == 0 {
        "terminated;reason=timeout".to_string()
    } else {
        format!("active;expires={expires}")
    };
    notify(inner.clone(), dialog, device, state).await;
}

/// Answers an [`Admit`] that refuses: `Some(expires)` when it accepts.
async fn refused(inner: &BridgeInner, tx: ServerTx, admit: Admit) -> Option<u32> {
    let ua = &inner.ua;
    match admit {
        Admit::Accept { expires } => Some(expires),
        Admit::TooBrief { min_expires } => {
            inc(&inner.metrics.sip_refused, "interval_too_brief");
            let h = vec![(HeaderName::MinExpires, min_expires.to_string())];
            let _ = ua.respond_with_headers(tx, 423, None, None, h).await;
            None
        }
        Admit::Limit(which) => {
            inc(
                &inner.metrics.sip_refused,
                match which {
                    "per_device" => "presence_per_device",
                    "per_watcher" => "presence_per_watcher",
                    _ => "presence_total",
                },
            );
            let h = vec![(HeaderName::RetryAfter, "60".to_string())];
            let _ = ua.respond_with_headers(tx, 503, None, None, h).await;
            None
        }
    }
}

/// A SUBSCRIBE in a subscription's dialog: a refresh, or with `Expires: 0` the end.
pub(crate) async fn resubscribe(
    inner: Arc<BridgeInner>,
    tx: ServerTx,
    dialog: DialogId,
    request: Request,
) {
    let now = tokio::time::Instant::now().into_std();
    let answer = inner
        .watchers
        .with(|s| s.refresh(&dialog, now, expires_of(&request)));
    let Some((admit, device)) = answer else {
        let _ = inner.ua.respond(tx, 481, None, None).await;
        return;
    };
    let Some(expires) = refused(&inner, tx, admit).await else {
        return;
    };
    let headers = vec![(HeaderName::Expires, expires.to_string())];
    let _ = inner
        .ua
        .respond_with_headers(tx, 200, None, None, headers)
        .await;
    inner.metrics.presence_subscriptions.set(gauge(&inner));
    if expires > 0 && persist(&inner, &dialog).await == Persisted::Lost {
        lost(&inner, &dialog).await;
        return;
    }
    let state = if expires == 0 {
        "terminated;reason=timeout".to_string()
    } else {
        format!("active;expires={expires}")
    };
    notify(inner, dialog, device, state).await;
}

fn gauge(inner: &BridgeInner) -> i64 {
    i64::try_from(inner.watchers.count()).unwrap_or(i64::MAX)
}

/// Sends the NOTIFY of `dialog` with `device`'s presence and `state` (Subscription-State).
/// A NOTIFY that ends the subscription (`terminated`) also ends its dialog; one answered 481,
/// 408 or not at all ends the subscription.
async fn notify(inner: Arc<BridgeInner>, dialog: DialogId, device: String, state: String) {
    // One at a time per subscription: a NOTIFY asked for while one is out follows it (with
    // the latest state); several asked for meanwhile make one.
    match inner.watchers.in_flight.entry(dialog.clone()) {
        dashmap::mapref::entry::Entry::Occupied(mut e) => {
            let next = e.get_mut();
            // A terminating one is not replaced by a later "active".
            if !next.as_deref().is_some_and(|s| s.starts_with("terminated")) {
                *next = Some(state);
            }
            return;
        }
        dashmap::mapref::entry::Entry::Vacant(v) => {
            v.insert(None);
        }
    }
    let mut state = state;
    loop {
        let ended = notify_once(&inner, &dialog, &device, state).await;
        let next = if ended {
            None
        } else {
            inner
                .watchers
                .in_flight
                .get_mut(&dialog)
                .and_then(|mut n| n.take())
        };
        match next {
            Some(s) => state = s,
            None => {
                inner.watchers.in_flight.remove(&dialog);
                return;
            }
        }
    }
}

/// One NOTIFY; true when the subscription is over.
async fn notify_once(
    inner: &Arc<BridgeInner>,
    dialog: &DialogId,
    device: &str,
    state: String,
) -> bool {
    // The local CSeqs written ahead run out: written again (further ahead) first. And a node
    // whose fence is closed (it was frozen or cut off: another node may have taken the
    // subscription) sends only once a write proves the subscription is still its own.
    let stored = inner.watchers.stored.get(dialog).map(|r| *r);
    let fenced = stored.is_some()
        && inner
            .fence
            .as_ref()
            .is_some_and(|f| f.may_act(tokio::time::Instant::now().into_std()).is_err());
    if fenced || stored.is_some_and(|r| r.notifies_left == Some(0)) {
        match persist(inner, dialog).await {
            Persisted::Lost => {
                lost(inner, dialog).await;
                return true;
            }
            Persisted::Failed if fenced => {
                debug!("NOTIFY not sent: this node may not act on the subscription now");
                inc(&inner.metrics.presence_notifies, "fenced");
                return false;
            }
            _ => {}
        }
    }
    if let Some(mut r) = inner.watchers.stored.get_mut(dialog) {
        r.notifies_left = r.notifies_left.map(|n| n.saturating_sub(1));
    }
    let body = presence_of(inner, device).pidf(&inner.aor(device).uri.to_string());
    inner
        .watchers
        .last_sent
        .insert(device.to_string(), body.clone());
    let terminated = state.starts_with("terminated");
    let headers = vec![
        (HeaderName::Event, PACKAGE.to_string()),
        (HeaderName::SubscriptionState, state),
    ];
    let body = Some((Bytes::from(body), MediaType::new("application", "pidf+xml")));
    let outcome = match inner
        .ua
        .request_in_dialog(dialog, Method::Notify, body, headers)
        .await
    {
        Ok(mut call) => match call.final_response().await {
            ClientEvent::Response { response, .. } if response.is_success() => "sent",
            ClientEvent::Response { response, .. } if response.status == 481 => "gone",
            ClientEvent::Response { .. } => "refused",
            ClientEvent::Timeout | ClientEvent::TransportError => "gone",
        },
        Err(e) => {
            debug!(error = %e, "NOTIFY not sent");
            "gone"
        }
    };
    inc(&inner.metrics.presence_notifies, outcome);
    if terminated || outcome == "gone" {
        inner.watchers.with(|s| s.remove(dialog));
        if inner.watchers.stored.remove(dialog).is_some() {
            if let Some(replicator) = &inner.replicator {
                if let Err(e) = replicator.remove(key_of_dialog(dialog)) {
                    debug!(error = %e, "ended subscription's record not removed");
                }
            }
        }
        let _ = inner.ua.remove_dialog(dialog).await;
        inner.metrics.presence_subscriptions.set(gauge(inner));
        return true;
    }
    false
}

/// `device`'s presence may have changed (it came or went, a call started or ended, it set its
/// state): its watchers get a NOTIFY when the document differs from the last one sent.
pub(crate) fn changed(inner: &Arc<BridgeInner>, device: &str) {
    let now = tokio::time::Instant::now().into_std();
    let subs = inner.watchers.with(|s| {
        if s.watched(device) {
            s.of_device(device, now)
        } else {
            Vec::new()
        }
    });
    if subs.is_empty() {
        return;
    }
    let body = presence_of(inner, device).pidf(&inner.aor(device).uri.to_string());
    if inner
        .watchers
        .last_sent
        .get(device)
        .is_some_and(|last| *last == body)
    {
        return;
    }
    for (dialog, left) in subs {
        tokio::spawn(notify(
            inner.clone(),
            dialog,
            device.to_string(),
            format!("active;expires={left}"),
        ));
    }
}

/// Ends the subscriptions that expire, each with a last NOTIFY (`terminated;reason=timeout`),
/// once a second for the life of the bridge.
pub(crate) async fn expire(inner: Arc<BridgeInner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now: Instant = tokio::time::Instant::now().into_std();
        let expired = inner.watchers.with(|s| s.expire(now));
        for (dialog, device) in expired {
            tokio::spawn(notify(
                inner.clone(),
                dialog,
                device,
                "terminated;reason=timeout".to_string(),
            ));
        }
    }
}

/// How a subscription's record write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Persisted {
    /// The store has it.
    Written,
    /// Another node claimed the subscription: this node must stop acting on it.
    Lost,
    /// The store refused it or took too long to say (the next write tries again).
    Failed,
    /// Nothing written: no store, the subscription is gone, or the queue is full.
    Skipped,
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes `dialog`'s subscription record (its dialog, the device, the watcher, the expiry, and
/// the local CSeq written ahead by [`NOTIFY_CSEQ_BLOCK`]) and waits for the store, at most the
/// takeover timeout.
async fn persist(inner: &Arc<BridgeInner>, dialog: &DialogId) -> Persisted {
    let Some(replicator) = inner.replicator.clone() else {
        return Persisted::Skipped;
    };
    let Some((device, watcher, expires_at)) = inner.watchers.with(|s| s.describe(dialog)) else {
        return Persisted::Skipped;
    };
    let Ok(Some(mut export)) = inner.ua.export(dialog).await else {
        return Persisted::Skipped;
    };
    let now = tokio::time::Instant::now().into_std();
    let left_ms =
        u64::try_from(expires_at.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX);
    // No NOTIFY sent yet: nothing to write ahead (an import starts above every number the
    // stack could have picked).
    let reserved = export
        .local_cseq
        .and_then(|c| c.checked_add(NOTIFY_CSEQ_BLOCK));
    if reserved.is_some() {
        export.local_cseq = reserved;
    }
    let state = inner
        .watchers
        .stored
        .get(dialog)
        .map(|r| *r)
        .unwrap_or_default();
    let sub = StoredSubscription {
        v: 1,
        package: PACKAGE.to_string(),
        watcher,
        expires_ms: wall_ms().saturating_add(left_ms),
        dialog: export,
    };
    let record = subscription_record(
        &sub,
        &device,
        &inner.config.node_id,
        state.epoch,
        state.base_version,
    );
    inner.watchers.stored.insert(
        dialog.clone(),
        Replicated {
            // One less than the block: a NOTIFY may have taken a number while this was written.
            notifies_left: reserved.map(|_| NOTIFY_CSEQ_BLOCK - 1),
            ..state
        },
    );
    let Ok(ack) = replicator.replicate_acked(record) else {
        return Persisted::Skipped;
    };
    match tokio::time::timeout(inner.config.takeover_timeout, ack).await {
        Ok(Ok(Ok(_))) => Persisted::Written,
        Ok(Ok(Err(StoreError::Conflict { .. }))) => Persisted::Lost,
        Ok(Ok(Err(e))) => {
            debug!(error = %e, "subscription record not written");
            Persisted::Failed
        }
        _ => Persisted::Failed,
    }
}

/// Forgets `dialog` here without a NOTIFY or a store write: another node holds it now.
pub(crate) async fn lost(inner: &Arc<BridgeInner>, dialog: &DialogId) {
    inner.watchers.with(|s| s.remove(dialog));
    inner.watchers.stored.remove(dialog);
    inner.watchers.in_flight.remove(dialog);
    let _ = inner.ua.remove_dialog(dialog).await;
    inner.metrics.presence_subscriptions.set(gauge(inner));
}

/// Continues here a subscription this node just claimed (`claimed`, its record; `sub`, what it
/// holds): imports its dialog with this node's Contact and takes it into the table, with the
/// time it has left. `Err` when it cannot be continued (expired, over a limit, not importable).
pub(crate) async fn attach(
    inner: &Arc<BridgeInner>,
    claimed: &thalamus_dialog_store::StoredDialog,
    sub: StoredSubscription,
) -> Result<DialogId, String> {
    let left_secs = sub.expires_ms.saturating_sub(wall_ms()) / 1000;
    let left = u32::try_from(left_secs).unwrap_or(u32::MAX);
    if left == 0 {
        return Err("the subscription expired".into());
    }
    let device = claimed.device_id.clone();
    // The limits count it here like a new one (the interval is what it has left).
    match inner
        .watchers
        .with(|s| s.admit(&device, sub.watcher, Some(left)))
    {
        Admit::Limit(which) => return Err(format!("limit {which}")),
        Admit::Accept { .. } | Admit::TooBrief { .. } => {}
    }
    let contact = crate::dialogs::import_contact(&sub.dialog, |transport| {
        inner.ua.contact(Some(&device), transport)
    });
    let prepared = crate::dialogs::prepare_for_import(sub.dialog, &contact);
    let dialog = inner.ua.import(prepared).await.map_err(|e| e.to_string())?;
    let now = tokio::time::Instant::now().into_std();
    inner
        .watchers
        .with(|s| s.insert(dialog.clone(), &device, sub.watcher, now, left));
    inner.watchers.stored.insert(
        dialog.clone(),
        Replicated {
            epoch: claimed.epoch,
            base_version: claimed.version,
            notifies_left: None,
        },
    );
    inner.metrics.presence_subscriptions.set(gauge(inner));
    Ok(dialog)
}

/// After a takeover that did not come from the watcher's request: the watcher hears the
/// device's presence from this node (a NOTIFY is a target refresh: its next SUBSCRIBE comes
/// here), or, with `end`, that the subscription ended.
pub(crate) fn notify_taken_over(inner: &Arc<BridgeInner>, dialog: DialogId, end: bool) {
    let now = tokio::time::Instant::now().into_std();
    let Some((device, _, _)) = inner.watchers.with(|s| s.describe(&dialog)) else {
        return;
    };
    let state = if end {
        "terminated;reason=deactivated".to_string()
    } else {
        let left = inner
            .watchers
            .with(|s| s.expires_in(&dialog, now))
            .unwrap_or(0);
        format!("active;expires={left}")
    };
    tokio::spawn(notify(inner.clone(), dialog, device, state));
}

/// `device` left and did not come back within the grace period. In a cluster
/// (`deactivate_departed`) its watchers' subscriptions here end with
/// `terminated;reason=deactivated`: RFC 6665 section 4.2.2's way of moving a subscription
/// between nodes. The watcher subscribes again at once, and the balancer routes the new
/// SUBSCRIBE to the device's owner, the node the device reaches (a refresh of the old dialog
/// would follow its route set back here while this node lives). The watchers heard the device
/// go (`changed`) already.
pub(crate) async fn deactivate_departed(inner: &Arc<BridgeInner>, device: &str) {
    if !inner.config.presence.deactivate_departed || inner.device_online(device) {
        return;
    }
    let now = tokio::time::Instant::now().into_std();
    let subs = inner.watchers.with(|s| s.of_device(device, now));
    for (dialog, _) in subs {
        debug!(
            device,
            "subscription deactivated: the device left this node"
        );
        tokio::spawn(notify(
            inner.clone(),
            dialog,
            device.to_string(),
            "terminated;reason=deactivated".to_string(),
        ));
    }
}
