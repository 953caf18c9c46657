//! thalamus-bridge: each device session mapped onto SIP, both ways. The only crate that knows
//! both MBFP and SIP.
//!
//! Device requests (`Dial`, `Answer`, `Reject`, `Hangup`, `Hold`, `Resume`, `Dtmf`,
//! `SendText`) become SIP transactions and dialogs on the node's [`UserAgent`]; SIP requests for
//! `sip:<device-id>@<domain>` become `IncomingCall` and `TextReceived`; responses and in-dialog
//! requests become `CallEvent`s.
//!
//! * [`call`]: one call. Its protocol logic is the sans-IO [`call::core::CallCore`] (events and
//!   `now` in, actions out); [`call::driver`] is the task that runs it with the user agent, the
//!   media relay and the replicator.
//! * This module ([`Bridge`]): the [`DeviceRequests`] the ingress hands device frames to, and
//!   the dispatch of the user agent's events (requests outside a dialog: INVITE, MESSAGE,
//!   OPTIONS, loop and hop checks, the wait for a device that is moving here; requests in a
//!   dialog routed to their call by dialog). `table` holds the handles of the calls, `shared`
//!   what every part works with.
//! * [`takeover`]: dialogs this node does not hold (a request for an unknown dialog, a device
//!   resuming here, the admin API); [`dialogs`]: calls as stored records and back.
//! * [`mapping`] (docs/protocol.md section 9), [`media_sdp`] (MBFP media <-> SDP),
//!   [`registrar`] (registration upstream), [`config`] ([`BridgeConfig`]), [`metrics`].
//!
//! What it does not do: SIP parsing, transactions and dialog state (`thalamus-sip`), RTP
//! (`thalamus-media`), QUIC and device sessions (`thalamus-ingress`), store writes and their
//! batching (`thalamus-dialog-store`), and deciding where devices belong (the node).
#![forbid(unsafe_code)]

pub(crate) mod buddies;
pub mod buddy_watch;
pub mod call;
pub mod config;
pub mod dialogs;
pub mod inbound;
pub mod limits;
pub mod mapping;
pub mod media_sdp;
pub mod metrics;
pub mod presence;
pub mod registrar;
mod shared;
pub mod table;
pub mod takeover;
pub(crate) mod watchers;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use rand::Rng;
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{Envelope, ErrorCode, TextReceived, TextStatus};
use thalamus_sip::message::{HeaderName, MediaType, Method, NameAddr, Request, Uri};
use thalamus_sip::peer::Peer;
use thalamus_sip::ua::{ClientEvent, ServerTx, UaEvent, UserAgent};
use tokio::sync::mpsc;
use tracing::{debug, info};

use thalamus_ingress::registry::DeviceRegistry;
use thalamus_ingress::{DeviceLink, DeviceRequests, Sessions};
use thalamus_telemetry::inc;

pub use config::BridgeConfig;
use thalamus_dialog_store::replicator::Replicator;
use thalamus_dialog_store::{DialogKey, DialogStore, StoredDialog};
use thalamus_media::MediaEngine;

use call::CallSetup;
use shared::{BridgeInner, InProgress};
use table::CallCommand;

pub use call::core::CallKey;
pub use metrics::BridgeMetrics;
pub use shared::MAX_ARRIVAL_WAITS;

pub use call::core::ALLOW;

/// What the bridge works with, besides its user agent.
#[derive(Debug)]
pub struct BridgeDeps {
    /// Effective configuration.
    pub config: BridgeConfig,
    /// Live device sessions (to send frames).
    pub sessions: Arc<Sessions>,
    /// Registered devices (404 versus 480).
    pub registry: Arc<DeviceRegistry>,
    /// Media relays, when the node relays media.
    pub media: Option<MediaEngine>,
    /// The address written into SDP when a relay has none of its own.
    pub media_address: IpAddr,
    /// Counters.
    pub metrics: BridgeMetrics,
    /// The dialog store, where dialogs this node does not hold are looked up (none: requests
    /// for unknown dialogs are answered 481).
    pub store: Option<Arc<dyn DialogStore>>,
    /// Where confirmed dialogs are written (none: replication is off).
    pub replicator: Option<Arc<Replicator>>,
    /// Whether this node may act on a dialog without a confirmed write, and whether another
    /// node may still be acting on one (none: the store's lease alone decides claims, and a
    /// request whose write failed is not sent).
    pub fence: Option<thalamus_ownership::SharedFence>,
    /// Who may reach a device (`[sip.inbound]`).
    pub inbound: inbound::InboundPolicy,
    /// Where finished calls' records go (none: no call records).
    pub records: Option<Arc<dyn thalamus_cdr::CallRecords>>,
}

/// The bridge (cheap to clone).
#[derive(Clone)]
pub struct Bridge {
    inner: Arc<BridgeInner>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("calls", &self.inner.calls.len())
            .finish_non_exhaustive()
    }
}

/// A call in progress, as the operator console shows it ([`Bridge::calls`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CallView {
    /// The device.
    pub device: String,
    /// The device's reference of the call.
    pub call_ref: u32,
    /// The remote party.
    pub remote_uri: String,
    /// Its state.
    pub state: thalamus_proto::v1::CallState,
    /// How long it has been on this node.
    pub age: std::time::Duration,
    /// How long it has been answered, when it is.
    pub answered_for: Option<std::time::Duration>,
    /// How each of its streams fares on the SIP leg (audio first), read when asked; empty
    /// while it has no media.
    pub media: Vec<table::MediaQuality>,
}

/// How long [`Bridge::calls`] waits for one relay's figures.
const PROBE_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

impl Bridge {
    /// A bridge on `ua`; SIP events from `events` are handled by a task started here.
    pub fn start(ua: UserAgent, events: mpsc::Receiver<UaEvent>, deps: BridgeDeps) -> Self {
        let BridgeDeps {
            config,
            sessions,
            registry,
            media,
            media_address,
            metrics,
            store,
            replicator,
            fence,
            inbound,
            records,
        } = deps;
        let conflicts = replicator.as_ref().and_then(|r| r.take_conflicts());
        let (config_texts_in, config_texts_out) = (config.texts_in, config.texts_out);
        let config_presence = config.presence;
        let devices = config.devices.clone();
        let registrar = config
            .registrar
            .clone()
            .map(|r| registrar::Registrar::new(ua.clone(), r, &config.sip_domain));
        let inner = Arc::new(BridgeInner {
            ua,
            config,
            sessions,
            registry,
            media,
            media_address,
            links: DashMap::new(),
            calls: DashMap::new(),
            calls_per_device: DashMap::new(),
            by_dialog: DashMap::new(),
            watchers: presence::Watchers::new(config_presence),
            buddy_watches: DashMap::new(),
            watch_dialogs: DashMap::new(),
            watch_ids: DashMap::new(),
            by_invite: DashMap::new(),
            in_progress: DashMap::new(),
            next_incoming_ref: AtomicU32::new(
                thalamus_sip::rng::with(|rng| rng.gen::<u32>()) & 0x3fff_ffff,
            ),
            metrics,
            registrar,
            store,
            replicator,
            fence,
            records,
            inbound: std::sync::RwLock::new(Arc::new(inbound)),
            devices: std::sync::RwLock::new(Arc::new(devices)),
            refuse_invites: std::sync::atomic::AtomicBool::new(false),
            refuse_dials: std::sync::atomic::AtomicBool::new(false),
            takeovers: DashMap::new(),
            cancel_lookups: Arc::new(tokio::sync::Semaphore::new(takeover::MAX_CANCEL_LOOKUPS)),
            watched: DashMap::new(),
            resumed_subscriptions: DashMap::new(),
            arrivals: tokio::sync::Notify::new(),
            arrival_waits: AtomicUsize::new(0),
            ringing_per_device: DashMap::new(),
            ringing_calls: dashmap::DashSet::new(),
            texts_in: limits::DeviceRates::new(config_texts_in, 65_536),
            texts_out: limits::DeviceRates::new(config_texts_out, 65_536),
        });
        tokio::spawn(dispatch(inner.clone(), events));
        tokio::spawn(watchers::expire(inner.clone()));
        if let Some(conflicts) = conflicts {
            tokio::spawn(takeover::drop_lost_dialogs(inner.clone(), conflicts));
        }
        Bridge { inner }
    }

    /// Calls in progress.
    pub fn active_calls(&self) -> usize {
        self.inner.calls.len()
    }

    /// Up to `limit` of the calls in progress on this node, as an operator sees them, by
    /// device and call, with their media figures read from the relays now (each relay
    /// answers from its own task; a relay that does not answer within 250 ms is left out).
    pub async fn calls(&self, limit: usize) -> Vec<CallView> {
        let mut calls: Vec<(CallView, Vec<_>)> = self
            .inner
            .calls
            .iter()
            .take(limit)
            .map(|c| {
                let (age, answered_for) = c.ages();
                let view = CallView {
                    device: c.key().0.clone(),
                    call_ref: c.key().1,
                    remote_uri: c.remote_uri(),
                    state: c.state(),
                    age,
                    answered_for,
                    media: Vec::new(),
                };
                (view, c.probes())
            })
            .collect();
        calls.sort_by(|(a, _), (b, _)| (&a.device, a.call_ref).cmp(&(&b.device, b.call_ref)));
        let reads = calls.iter().map(|(_, probes)| {
            futures::future::join_all(probes.iter().map(|(stream, probe)| async move {
                let stats = tokio::time::timeout(PROBE_WAIT, probe.read())
                    .await
                    .ok()?
                    .ok()?;
                Some(table::MediaQuality {
                    stream: *stream,
                    packets_received: stats.from_peer.flow.packets,
                    packets_lost: stats.from_peer.lost,
                    jitter: stats.from_peer.jitter,
                    round_trip: stats.peer_report.and_then(|r| r.round_trip),
                })
            }))
        });
        let media = futures::future::join_all(reads).await;
        calls
            .into_iter()
            .zip(media)
            .map(|((mut view, _), media)| {
                view.media = media.into_iter().flatten().collect();
                view
            })
            .collect()
    }

    /// Replaces the inbound policy with the one `config` describes (a configuration reload),
    /// keeping the digest nonces handed out unless the realm or the nonce secret changed.
    /// Requests already admitted go on.
    pub fn reload_inbound(
        &self,
        config: &inbound::InboundConfig,
        default_realm: &str,
    ) -> Result<(), inbound::InboundError> {
        let policy = self
            .inner
            .inbound_policy()
            .reloaded(config, default_realm)?;
        self.set_inbound(policy);
        Ok(())
    }

    /// Replaces the inbound policy; requests already admitted go on.
    pub fn set_inbound(&self, policy: inbound::InboundPolicy) {
        let policy = Arc::new(policy);
        match self.inner.inbound.write() {
            Ok(mut p) => *p = policy,
            Err(poisoned) => *poisoned.into_inner() = policy,
        }
    }

    /// Replaces the per-device settings (address books, credentials) for what starts next;
    /// calls in progress keep what they resolved.
    pub fn set_device_settings(&self, devices: BTreeMap<String, config::DeviceSettings>) {
        let devices = Arc::new(devices);
        match self.inner.devices.write() {
            Ok(mut d) => *d = devices,
            Err(poisoned) => *poisoned.into_inner() = devices,
        }
    }

    /// While `refuse` is set, new incoming INVITEs get 503 with Retry-After; calls in progress
    /// go on.
    pub fn refuse_invites(&self, refuse: bool) {
        self.inner.refuse_invites.store(refuse, Ordering::Relaxed);
    }

    /// While `refuse` is set, a device's `Dial` gets an MBFP `Busy` error ("the node is
    /// draining"); calls in progress go on.
    pub fn refuse_dials(&self, refuse: bool) {
        self.inner.refuse_dials.store(refuse, Ordering::Relaxed);
    }

    /// Writes the record of every confirmed call this node holds again (the dialog store
    /// answers again after an outage, during which the writes failed). Returns how many calls
    /// were asked.
    pub fn replicate_all(&self) -> usize {
        let mut asked = 0;
        for call in self.inner.calls.iter() {
            call.send(table::CallCommand::Rereplicate(None));
            asked += 1;
        }
        asked
    }

    /// Reads the stored record of every dialog this node holds and drops, without a BYE, the
    /// calls whose dialog another node now owns or ended: what a node does when it learns it
    /// was out of the live set (frozen, or cut off), since survivors may have taken some of its
    /// dialogs over meanwhile. A record the store does not have, or cannot read in time, is
    /// kept. Returns (dialogs checked, calls dropped).
    pub async fn verify_ownership(&self) -> (usize, usize) {
        takeover::verify_ownership(&self.inner).await
    }

    /// Releases the dialogs of devices that are no longer connected here, so that the node
    /// they reach claims them at once (after this node was out of the live set: see
    /// `takeover::release_orphans`). Returns how many were released.
    pub async fn release_orphans(&self) -> usize {
        takeover::release_orphans(&self.inner).await
    }

    /// The user agent (to change its limits at a reload).
    pub fn user_agent(&self) -> &UserAgent {
        &self.inner.ua
    }

    /// The stored record of a dialog, from the dialog store (any node's).
    pub async fn stored_dialog(
        &self,
        key: &DialogKey,
    ) -> Result<Option<StoredDialog>, takeover::TakeoverError> {
        takeover::stored_dialog(&self.inner, key).await
    }

    /// The live stored dialogs of a device, from the dialog store.
    pub async fn stored_dialogs_of(
        &self,
        device: &str,
    ) -> Result<Vec<StoredDialog>, takeover::TakeoverError> {
        takeover::stored_dialogs_of(&self.inner, device).await
    }

    /// Up to `limit` live stored dialogs that `node` owns (in no particular order).
    pub async fn stored_dialogs_owned_by(
        &self,
        node: &str,
        limit: usize,
    ) -> Result<Vec<StoredDialog>, takeover::TakeoverError> {
        takeover::stored_dialogs_owned_by(&self.inner, node, limit).await
    }

    /// Whether this node holds the dialog (a call task runs it here, or it is a presence
    /// subscription of this node).
    pub fn holds(&self, key: &DialogKey) -> bool {
        let dialog = crate::dialogs::dialog_of_key(key);
        self.inner.by_dialog.contains_key(&dialog) || self.inner.watchers.holds(&dialog)
    }

    /// UAC-mode takeover: fetches the dialog from the store, claims it for this node, imports
    /// it and attaches a call for it (which re-INVITEs the peer so media follows, when
    /// configured). Returns the call's `(device, call_ref)`. A dialog already held here is
    /// returned as is.
    pub async fn claim_dialog(&self, key: &DialogKey) -> Result<CallKey, takeover::TakeoverError> {
        takeover::take_over(&self.inner, key, takeover::Trigger::Api)
            .await
            .map(|t| t.call)
    }

    /// Ends a dialog from this node: takes it over first when another node holds it, then sends
    /// BYE with the next CSeq over the dialog's route set (as a device hangup). Returns the
    /// call's `(device, call_ref)`; the BYE goes out asynchronously.
    pub async fn hangup_dialog(&self, key: &DialogKey) -> Result<CallKey, takeover::TakeoverError> {
        takeover::hangup(&self.inner, key).await
    }
}

fn error_frame(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Envelope {
    Envelope {
        request_id,
        body: Some(Body::Error(thalamus_proto::v1::Error {
            code: code as i32,
            message: message.into(),
            request_id,
        })),
    }
}

impl DeviceRequests for Bridge {
    fn handle(&self, device_id: &str, request: Envelope) -> Vec<Envelope> {
        let inner = &self.inner;
        let request_id = request.request_id;
        let Some(body) = request.body else {
            return vec![];
        };
        match body {
            Body::Dial(dial) => {
                let key = (device_id.to_string(), dial.call_ref);
                if inner.calls.contains_key(&key) || inner.watched.contains_key(&key) {
                    return vec![error_frame(
                        request_id,
                        ErrorCode::InvalidArgument,
                        format!("call_ref {} is already in use", dial.call_ref),
                    )];
                }
                if inner.refuse_dials.load(Ordering::Relaxed) {
                    inc(&inner.metrics.sip_refused, "draining");
                    return vec![error_frame(
                        request_id,
                        ErrorCode::Busy,
                        "the node is draining: place the call again once moved to another node",
                    )];
                }
                // Incoming calls still ringing do not take the device's own slots.
                let live = inner.busy_count(device_id);
                if live >= inner.config.max_calls as usize {
                    inc(&inner.metrics.sip_refused, "max_calls");
                    return vec![error_frame(
                        request_id,
                        ErrorCode::LimitExceeded,
                        format!("at most {} calls per device", inner.config.max_calls),
                    )];
                }
                let target = match inner.target_uri(device_id, &dial.target) {
                    Ok(t) => t,
                    Err(e) => return vec![error_frame(request_id, ErrorCode::InvalidArgument, e)],
                };
                call::driver::spawn(
                    inner.clone(),
                    key,
                    CallSetup::Outgoing {
                        target,
                        media: dial.media,
                        headers: dial.headers,
                        transfer_of: None,
                    },
                );
                vec![]
            }
            Body::Answer(_)
            | Body::Reject(_)
            | Body::Hangup(_)
            | Body::Hold(_)
            | Body::Resume(_)
            | Body::Dtmf(_)
            | Body::KeyframeRequest(_)
            | Body::Transfer(_) => {
                let call_ref = match &body {
                    Body::Answer(a) => a.call_ref,
                    Body::Reject(r) => r.call_ref,
                    Body::Hangup(h) => h.call_ref,
                    Body::Hold(h) => h.call_ref,
                    Body::Resume(r) => r.call_ref,
                    Body::Dtmf(d) => d.call_ref,
                    Body::KeyframeRequest(k) => k.call_ref,
                    Body::Transfer(t) => t.call_ref,
                    _ => 0,
                };
                let key = (device_id.to_string(), call_ref);
                // A transfer's target is resolved here, as a Dial's is (address book aliases);
                // an attended transfer's from the call it replaces.
                let body = match body {
                    Body::Transfer(mut t) if t.replaces_call_ref != 0 => {
                        match inner.replacing_target(device_id, t.call_ref, t.replaces_call_ref) {
                            Ok(target) => {
                                t.target = target;
                                Body::Transfer(t)
                            }
                            Err(e) => {
                                return vec![error_frame(request_id, ErrorCode::InvalidArgument, e)]
                            }
                        }
                    }
                    Body::Transfer(mut t) => match inner.target_uri(device_id, &t.target) {
                        Ok(uri) => {
                            t.target = uri.to_string();
                            Body::Transfer(t)
                        }
                        Err(e) => {
                            return vec![error_frame(request_id, ErrorCode::InvalidArgument, e)]
                        }
                    },
                    other => other,
                };
                // Answering a ringing call makes it one of the device's calls: only within
                // `max_calls` (the device may reject it or end another call first).
                if matches!(body, Body::Answer(_))
                    && inner.ringing_calls.contains(&key)
                    && inner.busy_count(device_id) >= inner.config.max_calls as usize
                {
                    inc(&inner.metrics.sip_refused, "max_calls");
                    return vec![error_frame(
                        request_id,
                        ErrorCode::LimitExceeded,
                        format!("at most {} calls per device", inner.config.max_calls),
                    )];
                }
                let sent = inner
                    .calls
                    .get(&key)
                    .map(|c| c.send(CallCommand::Device(request_id, body.clone())));
                if sent.is_none() {
                    if let Some(record) = inner.watched.get(&key).map(|w| w.key.clone()) {
                        // A call of this device still held by another node: take it over here
                        // (UAC mode) and hand the command to it.
                        tokio::spawn(takeover::device_command(
                            inner.clone(),
                            record,
                            device_id.to_string(),
                            request_id,
                            body,
                        ));
                        return vec![];
                    }
                }
                match sent {
                    Some(true) => vec![],
                    _ => vec![error_frame(
                        request_id,
                        ErrorCode::UnknownCall,
                        format!("no call with call_ref {call_ref}"),
                    )],
                }
            }
            Body::SendText(text) => {
                if let Err(retry) = inner
                    .texts_out
                    .take(tokio::time::Instant::now().into_std(), device_id)
                {
                    inc(&inner.metrics.sip_refused, "texts_out_rate");
                    return vec![error_frame(
                        request_id,
                        ErrorCode::LimitExceeded,
                        format!("too many texts; try again in {retry} s"),
                    )];
                }
                if text.body.len() > inner.config.max_text_bytes as usize {
                    return vec![error_frame(
                        request_id,
                        ErrorCode::LimitExceeded,
                        format!("text over {} bytes", inner.config.max_text_bytes),
                    )];
                }
                let target = match inner.target_uri(device_id, &text.to) {
                    Ok(t) => t,
                    Err(e) => return vec![error_frame(request_id, ErrorCode::InvalidArgument, e)],
                };
                tokio::spawn(send_text(
                    inner.clone(),
                    device_id.to_string(),
                    request_id,
                    target,
                    text.content_type,
                    text.body,
                ));
                vec![]
            }
            Body::Watch(w) => match inner.target_uri(device_id, &w.target) {
                Ok(target) if target.as_sip().is_some() => {
                    match buddies::start(inner, device_id, request_id, target, w.expires_secs) {
                        Ok(()) => vec![],
                        Err((code, why)) => vec![error_frame(request_id, code, why)],
                    }
                }
                Ok(target) => vec![error_frame(
                    request_id,
                    ErrorCode::InvalidArgument,
                    format!("{target} is not a SIP URI"),
                )],
                Err(e) => vec![error_frame(request_id, ErrorCode::InvalidArgument, e)],
            },
            Body::Unwatch(w) => match inner.target_uri(device_id, &w.target) {
                Ok(target) if buddies::stop(inner, device_id, &target) => vec![],
                _ => vec![error_frame(
                    request_id,
                    ErrorCode::InvalidArgument,
                    format!("not watching {}", w.target),
                )],
            },
            Body::PresenceUpdate(p) => {
                let state = thalamus_proto::v1::PresenceState::try_from(p.state)
                    .unwrap_or(thalamus_proto::v1::PresenceState::Unspecified);
                inner.watchers.set_by_device(device_id, state, &p.note);
                watchers::changed(inner, device_id);
                vec![]
            }
            other => vec![error_frame(
                request_id,
                ErrorCode::Unsupported,
                format!("{} is not handled", thalamus_proto::body_kind(Some(&other))),
            )],
        }
    }

    fn online(&self, device_id: &str, link: DeviceLink) {
        let link_resumed = link.resumed();
        // Calls still up (a resumed session): their media goes to the new connection.
        if self.inner.device_call_count(device_id) > 0 {
            for call in self.inner.calls.iter().filter(|c| c.key().0 == device_id) {
                call.send(CallCommand::DeviceLink(link.clone()));
            }
        }
        self.inner.links.insert(device_id.to_string(), link);
        if let Some(r) = &self.inner.registrar {
            r.device_online(device_id, self.inner.credentials(device_id));
        }
        // Requests waiting for a device to arrive look again.
        self.inner.arrivals.notify_waiters();
        watchers::changed(&self.inner, device_id);
        // Its watchers follow it here from a node that died: a resumed session's records were
        // listed by `resume` already; a new session's are listed now.
        if self.inner.store.is_some() {
            let listed = self
                .inner
                .resumed_subscriptions
                .remove(device_id)
                .map(|(_, records)| records);
            let listed = if link_resumed { listed } else { None };
            tokio::spawn(takeover::claim_subscriptions(
                self.inner.clone(),
                device_id.to_string(),
                listed,
            ));
        }
    }

    fn offline(&self, device_id: &str) {
        self.inner.links.remove(device_id);
        buddies::device_left(&self.inner, device_id);
        watchers::changed(&self.inner, device_id);
        if let Some(r) = &self.inner.registrar {
            r.device_offline(device_id);
        }
        // Calls survive a short disconnection (the device may resume); after the grace period
        // without a session they are hung up.
        let inner = self.inner.clone();
        let device = device_id.to_string();
        let grace = inner.config.device_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if inner.device_online(&device) {
                return;
            }
            // Its watchers subscribe again where it is now.
            watchers::deactivate_departed(&inner, &device).await;
            let keys: Vec<CallKey> = inner
                .calls
                .iter()
                .filter(|c| c.key().0 == device)
                .map(|c| c.key().clone())
                .collect();
            for key in keys {
                if let Some(c) = inner.calls.get(&key) {
                    c.send(CallCommand::DeviceGone);
                }
            }
        });
    }

    fn datagram(&self, device_id: &str, datagram: Bytes) {
        let Ok(d) = thalamus_proto::media::MediaDatagram::decode(datagram.clone()) else {
            return;
        };
        if let Some(call) = self
            .inner
            .calls
            .get(&(device_id.to_string(), d.header.call_ref))
        {
            call.feed(datagram);
        }
    }

    fn has_calls(&self, device_id: &str) -> bool {
        self.inner.device_call_count(device_id) > 0
            || (!self.inner.watched.is_empty()
                && self.inner.watched.iter().any(|w| w.key().0 == device_id))
    }

    fn live_calls(&self, device_id: &str) -> Vec<thalamus_proto::v1::LiveCall> {
        let mut calls: Vec<thalamus_proto::v1::LiveCall> =
            if self.inner.device_call_count(device_id) == 0 {
                Vec::new()
            } else {
                self.inner
                    .calls
                    .iter()
                    .filter(|c| c.key().0 == device_id)
                    .map(|c| thalamus_proto::v1::LiveCall {
                        call_ref: c.key().1,
                        remote_uri: c.remote_uri().to_string(),
                        state: c.state() as i32,
                    })
                    .collect()
            };
        calls.extend(
            self.inner
                .watched
                .iter()
                .filter(|w| w.key().0 == device_id && !self.inner.calls.contains_key(w.key()))
                .map(|w| takeover::live_call_of(w.value())),
        );
        calls
    }

    fn resume<'a>(
        &'a self,
        device_id: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(takeover::resume_device(self.inner.clone(), device_id))
    }
}

async fn send_text(
    inner: Arc<BridgeInner>,
    device: String,
    request_id: u64,
    target: Uri,
    content_type: String,
    body: Vec<u8>,
) {
    let ua = &inner.ua;
    let mut request = ua.new_request(
        Method::Message,
        target.clone(),
        inner.aor(&device),
        NameAddr::new(target),
    );
    let media_type = if content_type.is_empty() {
        MediaType::new("text", "plain")
    } else {
        content_type
            .parse::<MediaType>()
            .unwrap_or_else(|_| MediaType::new("text", "plain"))
    };
    request.set_body(Bytes::from(body), Some(&media_type));
    let (status, reason) = match ua
        .send_with_auth(request, None, inner.credentials(&device))
        .await
    {
        Err(e) => {
            debug!(error = %e, "MESSAGE not sent");
            (503, e.to_string())
        }
        Ok(mut call) => match call.final_response().await {
            ClientEvent::Response { response, .. } => (response.status, response.reason.clone()),
            ClientEvent::Timeout => (408, "Request Timeout".into()),
            ClientEvent::TransportError => (503, "Service Unavailable".into()),
        },
    };
    let delivered = (200..300).contains(&status);
    inc(
        &inner.metrics.texts,
        if delivered {
            "out_delivered"
        } else {
            "out_failed"
        },
    );
    inner.to_device(
        &device,
        request_id,
        Body::TextStatus(TextStatus {
            sip_status: u32::from(status),
            reason,
            delivered,
        }),
    );
}

async fn dispatch(inner: Arc<BridgeInner>, mut events: mpsc::Receiver<UaEvent>) {
    while let Some(event) = events.recv().await {
        let inner = inner.clone();
        match event {
            UaEvent::Request {
                tx,
                request,
                source,
            } => {
                tokio::spawn(async move { out_of_dialog(inner, tx, request, source).await });
            }
            UaEvent::DialogRequest {
                tx,
                dialog,
                request,
                source: _,
            } if request.method == Method::Subscribe && inner.watchers.holds(&dialog) => {
                tokio::spawn(watchers::resubscribe(inner, tx, dialog, request));
            }
            UaEvent::DialogRequest {
                tx,
                dialog,
                request,
                source: _,
            } if request.method == Method::Notify
                && buddies::notify(&inner, tx, &dialog, &request) => {}
            UaEvent::DialogRequest {
                tx,
                dialog,
                request,
                source: _,
            } => {
                let key = inner.by_dialog.get(&dialog).map(|k| k.clone());
                let delivered = key
                    .and_then(|k| {
                        inner
                            .calls
                            .get(&k)
                            .map(|c| c.send(CallCommand::SipRequest(tx, request.clone())))
                    })
                    .unwrap_or(false);
                if !delivered {
                    let status = if request.method == Method::Ack {
                        0
                    } else {
                        481
                    };
                    if status != 0 {
                        let _ = inner.ua.respond(tx, status, None, None).await;
                    }
                }
            }
            UaEvent::UnknownDialog {
                tx,
                request,
                source,
            } if request.method == Method::Cancel => {
                if inner.store.is_some() {
                    tokio::spawn(takeover::unknown_cancel(inner, tx, request, source));
                } else {
                    inc(&inner.metrics.sip_refused, "unknown_dialog");
                    let _ = inner.ua.reject_unknown(tx).await;
                }
            }
            UaEvent::UnknownDialog { tx, request, .. } => {
                if inner.store.is_some() && request.method != Method::Ack {
                    tokio::spawn(takeover::unknown_dialog(
                        inner,
                        tx,
                        request,
                        tokio::time::Instant::now().into_std(),
                    ));
                } else {
                    inc(&inner.metrics.sip_refused, "unknown_dialog");
                    let _ = inner.ua.reject_unknown(tx).await;
                }
            }
            UaEvent::Ack { dialog, .. } => {
                if let Some(k) = inner.by_dialog.get(&dialog).map(|k| k.clone()) {
                    if let Some(c) = inner.calls.get(&k) {
                        c.send(CallCommand::Ack);
                    }
                }
            }
            UaEvent::Cancelled { tx } => {
                if let Some((_, k)) = inner.by_invite.remove(&tx) {
                    if let Some(c) = inner.calls.get(&k) {
                        c.send(CallCommand::Cancelled);
                    }
                }
            }
            UaEvent::PrackTimeout { tx } => {
                if let Some((_, k)) = inner.by_invite.remove(&tx) {
                    if let Some(c) = inner.calls.get(&k) {
                        c.send(CallCommand::PrackTimeout);
                    }
                }
            }
            UaEvent::AckTimeout { dialog } => {
                if let Some(k) = inner.by_dialog.get(&dialog).map(|k| k.clone()) {
                    if let Some(c) = inner.calls.get(&k) {
                        c.send(CallCommand::AckTimeout);
                    }
                }
            }
        }
    }
}

/// Applies the inbound policy to a request that would reach a device; `false` when it was
/// answered (401 challenge or 403), before anything about the device was looked at.
pub(crate) async fn admitted(
    inner: &BridgeInner,
    tx: ServerTx,
    request: &Request,
    source: Peer,
) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let verdict = inner.inbound_policy().check(source.addr.ip(), request, now);
    match verdict {
        inbound::InboundVerdict::Allow => true,
        inbound::InboundVerdict::Challenge(values) => {
            inc(&inner.metrics.sip_refused, "challenged");
            let headers = values
                .into_iter()
                .map(|v| (HeaderName::WwwAuthenticate, v))
                .collect();
            let _ = inner
                .ua
                .respond_with_headers(tx, 401, None, None, headers)
                .await;
            false
        }
        inbound::InboundVerdict::Forbidden(reason) => {
            inc(&inner.metrics.sip_refused, reason);
            let _ = inner.ua.respond(tx, 403, None, None).await;
            false
        }
    }
}

/// The registered device `request` is addressed to; otherwise answered 404 (and counted).
async fn known_device(inner: &BridgeInner, tx: ServerTx, request: &Request) -> Option<String> {
    let device = inbound::addressed_device(request)
        .filter(|d| inner.registry.refresh().is_err() || inner.registry.contains(d));
    if device.is_none() {
        inc(&inner.metrics.sip_refused, "not_found");
        let _ = inner.ua.respond(tx, 404, None, None).await;
    }
    device
}

async fn out_of_dialog(inner: Arc<BridgeInner>, tx: ServerTx, request: Request, source: Peer) {
    let ua = &inner.ua;
    let allow = || vec![(HeaderName::Allow, ALLOW.to_string())];
    match request.method {
        Method::Options => {
            let _ = ua
                .respond_with_headers(
                    tx,
                    200,
                    None,
                    None,
                    vec![
                        (HeaderName::Allow, ALLOW.to_string()),
                        (
                            HeaderName::Accept,
                            "application/sdp, text/plain".to_string(),
                        ),
                    ],
                )
                .await;
        }
        Method::Subscribe => {
            // As for calls and texts: the policy first, then the device.
            if !admitted(&inner, tx, &request, source).await {
                return;
            }
            let Some(device) = known_device(&inner, tx, &request).await else {
                return;
            };
            watchers::subscribe(inner.clone(), tx, request, source, device).await;
        }
        Method::Invite | Method::Message => {
            // Who may reach a device is settled first: a stranger learns nothing of devices.
            if !admitted(&inner, tx, &request, source).await {
                return;
            }
            // The gateway hands these on to a device: a request that has used up its hops is
            // answered 483, as a proxy would (RFC 3261 16.3).
            if request.headers.max_forwards().ok().flatten() == Some(0) {
                inc(&inner.metrics.sip_refused, "too_many_hops");
                let _ = ua.respond(tx, 483, None, None).await;
                return;
            }
            // A copy of a request already being handled that arrived by another path (same
            // From tag, Call-ID and CSeq, different branch): a loop or a fork, 482 (8.2.2.2).
            let merge_key = inbound::merge_key(&request);
            if let Some(key) = &merge_key {
                let branch = request.branch().unwrap_or_default().to_string();
                match inner.in_progress.entry(key.clone()) {
                    dashmap::mapref::entry::Entry::Occupied(e) if *e.get() != branch => {
                        inc(&inner.metrics.sip_refused, "loop_detected");
                        let _ = ua.respond(tx, 482, None, None).await;
                        return;
                    }
                    dashmap::mapref::entry::Entry::Occupied(_) => {}
                    dashmap::mapref::entry::Entry::Vacant(v) => {
                        v.insert(branch);
                    }
                }
            }
            let mut in_progress = InProgress {
                inner: inner.clone(),
                key: merge_key,
                ringing: None,
            };
            // A draining node without balancers takes no new call: refused before the device is
            // looked up or waited for (texts are still delivered).
            if request.method == Method::Invite && inner.refuse_invites.load(Ordering::Relaxed) {
                inc(&inner.metrics.sip_refused, "draining");
                let retry_after = vec![(HeaderName::RetryAfter, "30".to_string())];
                let _ = ua
                    .respond_with_headers(tx, 503, None, None, retry_after)
                    .await;
                return;
            }
            let Some(device) = known_device(&inner, tx, &request).await else {
                return;
            };
            if !inner.wait_for_arrival(&device).await {
                inc(&inner.metrics.sip_refused, "offline");
                let _ = ua.respond(tx, 480, None, None).await;
                return;
            }
            if request.method == Method::Message {
                let now = tokio::time::Instant::now().into_std();
                if let Err(retry) = inner.texts_in.take(now, &device) {
                    inc(&inner.metrics.sip_refused, "texts_in_rate");
                    let retry_after = vec![(HeaderName::RetryAfter, retry.to_string())];
                    let _ = ua
                        .respond_with_headers(tx, 503, None, None, retry_after)
                        .await;
                    return;
                }
                incoming_text(&inner, tx, &device, &request).await;
                return;
            }
            // An INVITE with Replaces (RFC 3891) takes the place of the device's answered call
            // it names: that call must be here and confirmed (else 481; `early-only` 486).
            let replaces = match replaced_call(&inner, &device, &request) {
                Ok(r) => r,
                Err((status, why)) => {
                    inc(&inner.metrics.sip_refused, why);
                    let _ = ua.respond(tx, status, None, None).await;
                    return;
                }
            };
            // Calls ringing are limited apart from the device's own: a flood of INVITEs can
            // keep a device ringing, not take the slots its `Dial` uses (those count only calls
            // that are not ringing). Incoming calls stay within `max_calls` in all.
            if inner.ringing_count(&device) >= inner.config.max_ringing as usize {
                inc(&inner.metrics.sip_refused, "max_ringing");
                let _ = ua.respond(tx, 486, None, None).await;
                return;
            }
            let live = inner.device_call_count(&device);
            // A replacing call takes the place of one of the device's calls.
            if live >= inner.config.max_calls as usize + usize::from(replaces.is_some()) {
                inc(&inner.metrics.sip_refused, "max_calls");
                let _ = ua.respond(tx, 486, None, None).await;
                return;
            }
            // Incoming refs start at a random point on each node and skip refs in use (a call
            // taken over from another node keeps the ref that node gave it).
            let mut call_ref = 0;
            for _ in 0..16 {
                call_ref = 0x8000_0000 | inner.next_incoming_ref.fetch_add(1, Ordering::Relaxed);
                let candidate = (device.clone(), call_ref);
                if !inner.calls.contains_key(&candidate) && !inner.watched.contains_key(&candidate)
                {
                    break;
                }
            }
            let key = (device.clone(), call_ref);
            in_progress.ring(&key);
            inner.by_invite.insert(tx, key.clone());
            info!(device, call_ref, "incoming call");
            call::driver::spawn(
                inner.clone(),
                key,
                CallSetup::Incoming {
                    tx,
                    invite: Box::new(request),
                    source,
                    call_waiting: live > usize::from(replaces.is_some()),
                    replaces,
                    in_progress: Box::new(in_progress),
                },
            );
        }
        _ => {
            inc(&inner.metrics.sip_refused, "method_not_allowed");
            let _ = ua.respond_with_headers(tx, 405, None, None, allow()).await;
        }
    }
}

/// The device's call an INVITE's Replaces names (RFC 3891 section 3), with its dialog: `None`
/// without the header; the refusal (status, metric label) when it is malformed (400), names no call of
/// `device` here, or one not answered (481), or an answered one with `early-only` (486).
fn replaced_call(
    inner: &BridgeInner,
    device: &str,
    request: &thalamus_sip::message::Request,
) -> Result<Option<(u32, thalamus_sip::dialog::DialogId)>, (u16, &'static str)> {
    let value = match request.headers.text(&HeaderName::Replaces) {
        Ok(Some(v)) => v,
        Ok(None) => return Ok(None),
        Err(_) => return Err((400, "bad_replaces")),
    };
    let replaces = thalamus_sip::dialog::Replaces::parse(value).ok_or((400, "bad_replaces"))?;
    let key = inner
        .by_dialog
        .get(&replaces.dialog)
        .map(|k| k.clone())
        .filter(|k| k.0 == device)
        .ok_or((481, "replaces_no_dialog"))?;
    let confirmed = inner.calls.get(&key).is_some_and(|c| c.is_answered());
    if !confirmed {
        return Err((481, "replaces_no_dialog"));
    }
    if replaces.early_only {
        return Err((486, "replaces_early_only"));
    }
    Ok(Some((key.1, replaces.dialog)))
}

async fn incoming_text(inner: &Arc<BridgeInner>, tx: ServerTx, device: &str, request: &Request) {
    if request.body.len() > inner.config.max_text_bytes as usize {
        let _ = inner.ua.respond(tx, 413, None, None).await;
        return;
    }
    let from = request.headers.from().ok();
    let delivered = inner.to_device(
        device,
        0,
        Body::TextReceived(TextReceived {
            from_uri: from.as_ref().map(|f| f.uri.to_string()).unwrap_or_default(),
            display_name: from
                .as_ref()
                .and_then(|f| f.display_name.clone())
                .unwrap_or_default(),
            content_type: request
                .headers
                .content_type()
                .ok()
                .flatten()
                .map(|m| m.to_string())
                .unwrap_or_else(|| "text/plain".into()),
            body: request.body.to_vec(),
        }),
    );
    inc(
        &inner.metrics.texts,
        if delivered {
            "in_delivered"
        } else {
            "in_offline"
        },
    );
    let status = if delivered { 200 } else { 480 };
    let _ = inner.ua.respond(tx, status, None, None).await;
}
