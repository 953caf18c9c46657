//! The presence shell: SIP watchers of devices (SUBSCRIBE `Event: presence`, RFC 3856 and
//! RFC 6665) on top of [`crate::presence`]. It answers SUBSCRIBEs (after the same inbound
//! policy as calls and texts), sends the NOTIFYs with PIDF bodies (at once, on every change of
//! a device's presence, on refresh, and a last one when a subscription ends or expires), and
//! forgets subscriptions whose NOTIFY gets 481 or no answer.
//!
//! It does not decide what presence is or how long a subscription lasts ([`crate::presence`]
//! does), and it keeps nothing in the dialog store: subscriptions belong to the node that
//! accepted them (a watcher whose node died gets 481 to its refresh and subscribes again).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thalamus_sip::dialog::DialogId;
use thalamus_sip::message::{HeaderName, MediaType, Method, Request};
use thalamus_sip::peer::Peer;
use thalamus_sip::ua::{ClientEvent, ServerTx};
use tracing::debug;

use crate::presence::{Admit, DevicePresence};
use crate::shared::BridgeInner;
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
