//! Devices watching SIP buddies' presence: the shell around [`crate::buddy_watch::WatchCore`].
//! A device's `Watch` starts one task per (device, buddy), within the limits per device and on
//! the node (`[sip.presence]` `watches_per_device`, `watches_total`); the task sends the core's
//! SUBSCRIBEs on the device's behalf (From its address of record, with its credentials), feeds
//! back their answers and the NOTIFYs of the subscription's dialog (which `dispatch` routes here
//! by dialog), and passes what the core says to the device (`PresenceUpdate`, `WatchStatus`).
//! `Unwatch`, or the device's session ending, unsubscribes.
//!
//! It does not decide anything about the subscription (the core does), nor serve SIP watchers
//! of devices (`crate::watchers`). Watches are state of the device's session, not replicated:
//! they live on the node the device is on, and a device whose session resumes on another node
//! (its node died) watches again there (docs/protocol.md, `Watch`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{PresenceUpdate, WatchStatus};
use thalamus_sip::dialog::DialogId;
use thalamus_sip::message::{HeaderName, Method, NameAddr, Request, Uri};
use thalamus_sip::ua::{ClientEvent, ServerTx};
use thalamus_telemetry::inc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, Instrument};

use crate::buddy_watch::{WatchAction, WatchCore};
use crate::shared::BridgeInner;
use crate::table::WatchHandle;

/// The outcome of one SUBSCRIBE: status, reason, the Expires granted, the dialog.
type Answer = (u16, String, Option<u32>, Option<DialogId>);

/// NOTIFYs queued for one watch's task at most; more are answered 500 with Retry-After.
const NOTIFY_QUEUE: usize = 16;

/// The ids of watches, so that a watch's end removes its own entry only (a device that
/// reconnects may watch the same buddy again while the old watch unsubscribes).
static NEXT_WATCH: AtomicU64 = AtomicU64::new(1);

/// A device's `Watch` of `target` (resolved): refused (the error to send the device) when the
/// device already watches it or a limit is reached; otherwise the watch's task is started. A
/// watch of the same buddy that is unsubscribing (unwatched, or its session ended) gives way.
pub(crate) fn start(
    inner: &Arc<BridgeInner>,
    device: &str,
    request_id: u64,
    target: Uri,
    expires_secs: u32,
) -> Result<(), (thalamus_proto::v1::ErrorCode, String)> {
    use thalamus_proto::v1::ErrorCode;
    let limits = inner.config.presence;
    let key = (device.to_string(), target.to_string());
    if inner
        .buddy_watches
        .get(&key)
        .is_some_and(|w| !w.unwatch.is_cancelled())
    {
        return Err((
            ErrorCode::InvalidArgument,
            format!("already watching {}", key.1),
        ));
    }
    let of_device = inner
        .buddy_watches
        .iter()
        .filter(|w| w.key().0 == device && w.key() != &key)
        .count();
    if of_device >= limits.watches_per_device {
        inc(&inner.metrics.sip_refused, "watches_per_device");
        return Err((
            ErrorCode::LimitExceeded,
            format!("at most {} watches per device", limits.watches_per_device),
        ));
    }
    if inner.buddy_watches.len() >= limits.watches_total {
        inc(&inner.metrics.sip_refused, "watches_total");
        return Err((
            ErrorCode::LimitExceeded,
            "too many watches on this node".to_string(),
        ));
    }
    let expires = if expires_secs == 0 {
        limits.watch_expires
    } else {
        expires_secs.clamp(limits.min_expires, limits.max_expires)
    };
    let (notifies, rx) = mpsc::channel(NOTIFY_QUEUE);
    let handle = WatchHandle {
        id: NEXT_WATCH.fetch_add(1, Ordering::Relaxed),
        notifies,
        unwatch: CancellationToken::new(),
    };
    inner.buddy_watches.insert(key.clone(), handle.clone());
    gauge(inner);
    let span = info_span!("watch", device, buddy = %key.1);
    tokio::spawn(
        run(
            inner.clone(),
            key,
            target,
            request_id,
            WatchCore::new(expires),
            handle,
            rx,
        )
        .instrument(span),
    );
    Ok(())
}

/// The device stops watching `target` (a resolved URI); false when it did not watch it.
pub(crate) fn stop(inner: &BridgeInner, device: &str, target: &Uri) -> bool {
    let key = (device.to_string(), target.to_string());
    match inner.buddy_watches.get(&key) {
        Some(w) if !w.unwatch.is_cancelled() => {
            w.unwatch.cancel();
            true
        }
        _ => false,
    }
}

/// The device's session ended: every watch of it unsubscribes.
pub(crate) fn device_left(inner: &BridgeInner, device: &str) {
    if inner.buddy_watches.is_empty() {
        return;
    }
    for w in inner.buddy_watches.iter().filter(|w| w.key().0 == device) {
        w.unwatch.cancel();
    }
}

/// A NOTIFY in `dialog`: handed to its watch (true), or not a watch's (false). A watch is
/// found by its dialog, or by its SUBSCRIBE's Call-ID and From tag (our tag in `dialog`) while
/// the 2xx has not reached its task yet. A watch whose queue is full answers 500 with
/// Retry-After (the notifier sends it again) rather than 481 (which would end it).
pub(crate) fn notify(
    inner: &Arc<BridgeInner>,
    tx: ServerTx,
    dialog: &DialogId,
    request: &Request,
) -> bool {
    let handle = inner
        .watch_dialogs
        .get(dialog)
        .map(|h| h.clone())
        .or_else(|| {
            inner
                .watch_ids
                .get(&(dialog.call_id.clone(), dialog.local_tag.clone()))
                .map(|h| h.clone())
        });
    let Some(handle) = handle else {
        return false;
    };
    if handle
        .notifies
        .try_send((tx, Box::new(request.clone())))
        .is_err()
    {
        inc(&inner.metrics.sip_refused, "watch_busy");
        let inner = inner.clone();
        tokio::spawn(async move {
            let retry = vec![(HeaderName::RetryAfter, "1".to_string())];
            let _ = inner
                .ua
                .respond_with_headers(tx, 500, None, None, retry)
                .await;
        });
    }
    true
}

fn gauge(inner: &BridgeInner) {
    inner
        .metrics
        .buddy_watches
        .set(i64::try_from(inner.buddy_watches.len()).unwrap_or(i64::MAX));
}

async fn run(
    inner: Arc<BridgeInner>,
    key: (String, String),
    target: Uri,
    request_id: u64,
    mut core: WatchCore,
    handle: WatchHandle,
    mut notifies: mpsc::Receiver<(ServerTx, Box<Request>)>,
) {
    let (device, buddy) = (key.0.clone(), key.1.clone());
    // The first SUBSCRIBE's Call-ID and From tag, known to `notify` before it is sent.
    let ids = (
        thalamus_sip::message::generate_call_id(None),
        thalamus_sip::message::generate_tag(),
    );
    inner.watch_ids.insert(ids.clone(), handle.clone());
    let mut outstanding: Option<Pin<Box<dyn Future<Output = Answer> + Send>>> = None;
    let mut registered: Option<DialogId> = None;
    let mut unwatched = false;
    loop {
        while let Some(action) = core.poll_action() {
            match action {
                WatchAction::Subscribe { expires } => {
                    outstanding = Some(Box::pin(subscribe(
                        inner.clone(),
                        device.clone(),
                        target.clone(),
                        core.dialog().cloned(),
                        expires,
                        ids.clone(),
                    )));
                }
                WatchAction::Presence { state, note } => {
                    inc(&inner.metrics.buddy_presence, "update");
                    inner.to_device(
                        &device,
                        0,
                        Body::PresenceUpdate(PresenceUpdate {
                            uri: buddy.clone(),
                            state: state as i32,
                            note,
                        }),
                    );
                }
                WatchAction::Status {
                    active,
                    sip_status,
                    reason,
                } => {
                    inc(
                        &inner.metrics.buddy_presence,
                        if active { "subscribed" } else { "ended" },
                    );
                    inner.to_device(
                        &device,
                        request_id,
                        Body::WatchStatus(WatchStatus {
                            target: buddy.clone(),
                            active,
                            sip_status: u32::from(sip_status),
                            reason,
                        }),
                    );
                }
                WatchAction::Done => {
                    // Its own entry only: the device may be watching the buddy anew.
                    inner
                        .buddy_watches
                        .remove_if(&key, |_, w| w.id == handle.id);
                    inner.watch_ids.remove(&ids);
                    gauge(&inner);
                    if let Some(d) = registered.take() {
                        inner.watch_dialogs.remove(&d);
                        let _ = inner.ua.remove_dialog(&d).await;
                    }
                    return;
                }
            }
        }
        if registered.is_none() {
            if let Some(d) = core.dialog() {
                inner.watch_dialogs.insert(d.clone(), handle.clone());
                registered = Some(d.clone());
            }
        }
        let deadline = core.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            answer = async {
                match outstanding.as_mut() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            }, if outstanding.is_some() => {
                outstanding = None;
                let (status, reason, granted, dialog) = answer;
                core.answered(now(), status, &reason, granted, dialog);
            }
            () = handle.unwatch.cancelled(), if !unwatched => {
                unwatched = true;
                core.unwatch();
            }
            notify = notifies.recv() => {
                // The task holds a sender itself: the channel never closes while it runs.
                if let Some((tx, request)) = notify {
                    let state = request
                        .headers
                        .text(&HeaderName::SubscriptionState)
                        .ok()
                        .flatten()
                        .unwrap_or_default()
                        .to_string();
                    let event = request
                        .headers
                        .text(&HeaderName::Event)
                        .ok()
                        .flatten()
                        .unwrap_or_default()
                        .to_string();
                    let status = core.notify(now(), &event, &state, &request.body);
                    let _ = inner.ua.respond(tx, status, None, None).await;
                }
            }
            () = sleep_until(deadline), if deadline.is_some() => core.handle_timeout(now()),
        }
    }
}

/// Sends one SUBSCRIBE of the watch: out of dialog from the device's address of record, with
/// the Call-ID and From tag `ids`, while there is no dialog; in the dialog afterwards. Either
/// way with the device's credentials, a digest challenge answered.
async fn subscribe(
    inner: Arc<BridgeInner>,
    device: String,
    target: Uri,
    dialog: Option<DialogId>,
    expires: u32,
    ids: (String, String),
) -> Answer {
    let headers = vec![
        (HeaderName::Event, "presence".to_string()),
        (HeaderName::Accept, "application/pidf+xml".to_string()),
        (HeaderName::Expires, expires.to_string()),
    ];
    let sent = match &dialog {
        Some(d) => {
            // A refresh or the unsubscribe: a challenge is answered here too.
            inner
                .ua
                .request_in_dialog_with_auth(
                    d,
                    Method::Subscribe,
                    None,
                    headers,
                    inner.credentials(&device),
                )
                .await
        }
        None => {
            let mut from = inner.aor(&device);
            from.set_tag(&ids.1);
            let mut request = inner.ua.new_request(
                Method::Subscribe,
                target.clone(),
                from,
                NameAddr::new(target),
            );
            request.headers.set_call_id(&ids.0);
            let (contact, destination) = inner.ua.contact_for(Some(&device), &request).await;
            request.headers.push_contact(&contact);
            for (name, value) in headers {
                request.headers.push(name, value);
            }
            inner
                .ua
                .send_with_auth(request, destination, inner.credentials(&device))
                .await
        }
    };
    match sent {
        Err(e) => {
            debug!(error = %e, "SUBSCRIBE not sent");
            (503, e.to_string(), None, None)
        }
        Ok(mut call) => match call.final_response().await {
            ClientEvent::Response { response, dialog } => {
                let granted = response
                    .headers
                    .text(&HeaderName::Expires)
                    .ok()
                    .flatten()
                    .and_then(|v| v.trim().parse().ok());
                (response.status, response.reason.clone(), granted, dialog)
            }
            ClientEvent::Timeout => (408, "Request Timeout".into(), None, None),
            ClientEvent::TransportError => (503, "Service Unavailable".into(), None, None),
        },
    }
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
