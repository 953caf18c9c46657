//! One call, device side and SIP side, as one task.
//!
//! The task owns the call's SIP dialog and media relay and runs its life: for an outgoing call
//! the INVITE (with digest answers), provisional and final responses, ACK, CANCEL on an early
//! hangup; for an incoming call the `IncomingCall` offer, ringing, the device's `Answer` or
//! `Reject`, the no-answer timeout and the caller's CANCEL. Once answered it handles hold and
//! resume (re-INVITE with sendonly/sendrecv), DTMF both ways (RFC 4733 telephone-event in the
//! media when negotiated, else SIP INFO with application/dtmf-relay), in-dialog requests from
//! the peer, the
//! media timeout, and hangup from either side. Every change reaches the device as a
//! `CallEvent`; the final one carries the media statistics.
//!
//! Replication: once the dialog is confirmed (outgoing: the ACK sent; incoming: our 2xx
//! acknowledged) the task exports it from the user agent and hands the record to the
//! replicator (enqueue only); it writes it again after each target refresh, writes the next
//! local CSeq before every request it sends in the dialog (waiting a bounded time; a conflict
//! means another node owns the dialog, and the request is not sent), and tombstones it at the
//! end. A call started by a takeover ([`CallSetup::TakenOver`]) continues a stored dialog: it
//! restores the SDP session and the call's state from the record, starts a relay and, unless
//! the request that caused the takeover ends the dialog or carries an offer, re-INVITEs the
//! peer so media follows.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{CallEvent, CallState, EndReason, IncomingCall, MediaOffer, MediaStats};
use thalamus_sip::dialog::{DialogId, DialogRecord};
use thalamus_sip::message::{HeaderName, MediaType, Method, NameAddr, Request, Uri};
use thalamus_sip::sdp::{Direction, HoldMode, MediaKind, SdpSession, SessionDescription};
use thalamus_sip::ua::{ClientCall, ClientEvent, ServerTx};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, Instrument};

use crate::dialogs::{
    key_of_dialog, remote_uri_of, reserve_next_local_cseq, to_stored, CallAppData, CallFacts,
};
use crate::mapping::{call_event, ended_by, ended_by_status, reject_status, state_for_provisional};
use crate::media_sdp;
use crate::takeover::Trigger;
use crate::{BridgeInner, CallKey};
use thalamus_dialog_store::{NegotiatedMedia, StoreError, StoredDialog};
use thalamus_media::{MediaRelay, RelayEvent, RelaySpec};
use thalamus_telemetry::inc;

/// What a call task is told.
#[derive(Debug)]
pub enum CallCommand {
    /// A frame from the device (request id, body).
    Device(u64, Body),
    /// A request within the call's dialog.
    SipRequest(ServerTx, Request),
    /// The ACK of our 2xx.
    Ack,
    /// The caller cancelled (the INVITE was answered 487).
    Cancelled,
    /// Our 2xx was never acknowledged.
    AckTimeout,
    /// The device did not come back after losing its session.
    DeviceGone,
    /// The device's session came back on a new connection: media goes there now.
    DeviceLink(thalamus_ingress::DeviceLink),
    /// Another node took the dialog over (a replication conflict): drop it without a BYE.
    OwnershipLost,
}

/// How a call starts (built once per call, so the size difference of the variants is moot).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum CallSetup {
    /// The device dialled.
    Outgoing {
        /// Request-URI.
        target: Uri,
        /// The device's codecs.
        media: Option<MediaOffer>,
        /// Extra headers for the INVITE.
        headers: BTreeMap<String, String>,
    },
    /// A SIP INVITE for the device.
    Incoming {
        /// Its server transaction.
        tx: ServerTx,
        /// The INVITE.
        invite: Box<Request>,
        /// The device already has a call.
        call_waiting: bool,
        /// Held until the INVITE has its final response (loop detection).
        in_progress: Box<crate::InProgress>,
    },
    /// A stored dialog this node just claimed and imported.
    TakenOver(Box<TakeoverSetup>),
}

/// What a call continuing a stored dialog starts from.
#[derive(Debug)]
pub struct TakeoverSetup {
    /// The claimed record (owner: this node).
    pub record: StoredDialog,
    /// The SIP dialog as imported.
    pub sip: DialogRecord,
    /// The imported dialog's id.
    pub dialog: DialogId,
    /// What caused the takeover.
    pub trigger: Trigger,
}

/// The call's share of replication: where its writes continue from, and what it knows.
#[derive(Debug, Default)]
struct Replica {
    /// Ownership epoch this node holds the dialog at.
    epoch: u64,
    /// Store version writes continue from (0: create).
    base_version: u64,
    /// A record of the dialog was handed to the replicator (or came from the store).
    stored: bool,
    /// Another node owns the dialog now.
    lost: bool,
    /// The peer's last SDP.
    remote_sdp: Option<String>,
    /// The device placed the call.
    outgoing: bool,
    /// When the request that caused a takeover arrived (its answer is timed).
    takeover_arrived: Option<Instant>,
    /// Re-INVITE the peer once the request that caused the takeover is answered.
    reinvite_pending: bool,
    /// The last record export handed to its own task (so the call never waits on the user
    /// agent to replicate); each waits for the one before, so writes stay in order.
    pending: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug)]
struct CallShared {
    dialog: Option<DialogId>,
    remote_uri: String,
    state: CallState,
}

/// The bridge's handle on a call task.
#[derive(Debug)]
pub struct CallHandle {
    /// Boxed commands: a queue allocates its slots in blocks up front, and a command carrying
    /// a SIP request is ~10 times the size of a pointer.
    commands: mpsc::Sender<Box<CallCommand>>,
    shared: Arc<Mutex<CallShared>>,
    media_input: Arc<Mutex<Option<thalamus_media::DeviceInput>>>,
}

impl CallHandle {
    /// Queues a command; false when the call has ended or is not keeping up.
    pub fn send(&self, command: CallCommand) -> bool {
        self.commands.try_send(Box::new(command)).is_ok()
    }

    /// The call's dialog, once there is one.
    pub fn dialog(&self) -> Option<DialogId> {
        self.shared.lock().ok().and_then(|s| s.dialog.clone())
    }

    /// The remote party.
    pub fn remote_uri(&self) -> String {
        self.shared
            .lock()
            .map(|s| s.remote_uri.clone())
            .unwrap_or_default()
    }

    /// The call's state as last reported.
    pub fn state(&self) -> CallState {
        self.shared
            .lock()
            .map(|s| s.state)
            .unwrap_or(CallState::Unspecified)
    }

    /// Feeds a media datagram from the device to the call's relay.
    pub fn feed(&self, datagram: Bytes) {
        if let Ok(guard) = self.media_input.lock() {
            if let Some(input) = guard.as_ref() {
                let _ = input.feed(datagram);
            }
        }
    }
}

/// Starts the task of call `key`.
pub(crate) fn spawn(inner: Arc<BridgeInner>, key: CallKey, setup: CallSetup) {
    let (commands, rx) = mpsc::channel(64);
    let remote_uri = match &setup {
        CallSetup::Outgoing { target, .. } => target.to_string(),
        CallSetup::Incoming { invite, .. } => invite
            .headers
            .from()
            .map(|f| f.uri.to_string())
            .unwrap_or_default(),
        CallSetup::TakenOver(t) => remote_uri_of(&t.record, &t.sip),
    };
    let taken_over_dialog = match &setup {
        CallSetup::TakenOver(t) => Some(t.dialog.clone()),
        _ => None,
    };
    let shared = Arc::new(Mutex::new(CallShared {
        dialog: taken_over_dialog.clone(),
        remote_uri,
        state: if taken_over_dialog.is_some() {
            CallState::Answered
        } else {
            CallState::Trying
        },
    }));
    let media_input = Arc::new(Mutex::new(None));
    let direction = match &setup {
        CallSetup::Outgoing { .. } => "outgoing",
        CallSetup::Incoming { .. } => "incoming",
        CallSetup::TakenOver(_) => "taken_over",
    };
    inner.add_call(
        key.clone(),
        CallHandle {
            commands,
            shared: shared.clone(),
            media_input: media_input.clone(),
        },
    );
    if let Some(dialog) = &taken_over_dialog {
        // Before the request that caused the takeover is delivered again.
        inner.by_dialog.insert(dialog.clone(), key.clone());
    }
    inner.metrics.calls_active.inc();
    inc(&inner.metrics.calls_started, direction);
    let span = info_span!("call", device = %key.0, call_ref = key.1, direction);
    let call = Call {
        inner,
        key,
        rx,
        shared,
        media_input,
        dialog: None,
        relay: None,
        sdp: SdpSession::with_random_id(),
        device_media: None,
        telephone_event: false,
        dtmf_timestamp: 0x4000_0000,
        held: false,
        ended: false,
        replica: Replica {
            outgoing: direction == "outgoing",
            ..Replica::default()
        },
    };
    tokio::spawn(Box::new(call).run(setup).instrument(span));
}

struct Call {
    inner: Arc<BridgeInner>,
    key: CallKey,
    rx: mpsc::Receiver<Box<CallCommand>>,
    shared: Arc<Mutex<CallShared>>,
    media_input: Arc<Mutex<Option<thalamus_media::DeviceInput>>>,
    dialog: Option<DialogId>,
    relay: Option<MediaRelay>,
    sdp: SdpSession,
    device_media: Option<MediaOffer>,
    telephone_event: bool,
    /// Timestamp of the next synthesised telephone-event (device link clock, 8 kHz).
    dtmf_timestamp: u32,
    held: bool,
    ended: bool,
    replica: Replica,
}

/// How the set-up phase ended.
enum SetUp {
    Answered,
    Ended,
}

impl Call {
    // The future of a live call holds what it waits on inline, so the set-up phases and the
    // rarer in-call requests (hold, DTMF, re-INVITE, BYE) are boxed: their state exists only
    // while they run, and a call that is just up costs ~3 KiB instead of ~10 KiB.
    async fn run(mut self: Box<Self>, setup: CallSetup) {
        let outcome = match setup {
            CallSetup::Outgoing {
                target,
                media,
                headers,
            } => Box::pin(self.outgoing(target, media, headers)).await,
            CallSetup::Incoming {
                tx,
                invite,
                call_waiting,
                in_progress,
            } => {
                let outcome = Box::pin(self.incoming(tx, *invite, call_waiting)).await;
                drop(in_progress);
                outcome
            }
            CallSetup::TakenOver(setup) => Box::pin(self.taken_over(*setup)).await,
        };
        if let SetUp::Answered = outcome {
            self.answered().await;
        }
        self.finish().await;
    }

    fn event(&mut self, event: CallEvent) {
        if let Ok(mut s) = self.shared.lock() {
            s.state = CallState::try_from(event.state).unwrap_or(CallState::Unspecified);
        }
        if event.state == CallState::Ended as i32 {
            self.ended = true;
            let reason = EndReason::try_from(event.end_reason)
                .map(|r| r.as_str_name())
                .unwrap_or("END_REASON_UNSPECIFIED");
            inc(&self.inner.metrics.calls_ended, reason_label(reason));
        }
        self.inner.to_device(&self.key.0, 0, Body::CallEvent(event));
    }

    fn set_dialog(&mut self, dialog: DialogId) {
        self.inner
            .by_dialog
            .insert(dialog.clone(), self.key.clone());
        if let Ok(mut s) = self.shared.lock() {
            s.dialog = Some(dialog.clone());
        }
        self.dialog = Some(dialog);
    }

    /// Starts the media relay for this call (when the node has media).
    fn start_relay(&mut self) -> Option<(std::net::IpAddr, u16)> {
        let engine = self.inner.media.as_ref()?;
        let link: Arc<dyn thalamus_media::DatagramSink> = match self.inner.links.get(&self.key.0) {
            Some(link) => Arc::new(LinkSink(link.clone())),
            None => Arc::new(NoLink),
        };
        let sink: Arc<dyn thalamus_media::DatagramSink> = Arc::new(DtmfTap {
            link,
            inner: self.inner.clone(),
            device: self.key.0.clone(),
            last_event: Mutex::new(None),
        });
        match engine.start(RelaySpec::audio(self.key.1), sink) {
            Ok(relay) => {
                let addr = relay.local_rtp_addr();
                let ip = relay.sdp_address().unwrap_or(self.inner.media_address);
                if let Ok(mut input) = self.media_input.lock() {
                    *input = Some(relay.device_input());
                }
                self.relay = Some(relay);
                Some((ip, addr.port()))
            }
            Err(e) => {
                debug!(error = %e, "no media relay for this call");
                None
            }
        }
    }

    async fn set_remote(&mut self, sdp: &SessionDescription) {
        self.replica.remote_sdp = Some(sdp.to_string());
        self.telephone_event = media_sdp::has_telephone_event(sdp);
        if let (Some(relay), Some(remote)) = (&self.relay, sdp.remote_media(&MediaKind::Audio)) {
            let _ = relay.set_remote_media(&remote).await;
        }
    }

    fn local_media(&self) -> thalamus_sip::sdp::LocalMedia {
        let (ip, port) = self
            .relay
            .as_ref()
            .map(|r| {
                (
                    r.sdp_address().unwrap_or(self.inner.media_address),
                    r.local_rtp_addr().port(),
                )
            })
            .unwrap_or((self.inner.media_address, 9));
        media_sdp::local_media(ip, port, self.device_media.as_ref())
    }

    async fn outgoing(
        &mut self,
        target: Uri,
        media: Option<MediaOffer>,
        headers: BTreeMap<String, String>,
    ) -> SetUp {
        let call_ref = self.key.1;
        self.device_media = media;
        self.start_relay();
        let ua = self.inner.ua.clone();
        let mut invite = ua.new_request(
            Method::Invite,
            target.clone(),
            self.inner.aor(&self.key.0),
            NameAddr::new(target),
        );
        invite.headers.push_contact(&ua.contact(
            Some(&self.key.0),
            thalamus_sip::transport::PeerTransport::Udp,
        ));
        invite.headers.push(HeaderName::Allow, crate::ALLOW);
        for (name, value) in headers {
            if name.to_ascii_lowercase().starts_with("x-") {
                if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                    invite.headers.push(n, value);
                }
            }
        }
        let offer = match self.sdp.create_offer(&self.local_media()) {
            Ok(o) => o,
            Err(e) => {
                self.event(ended_by(
                    call_ref,
                    EndReason::IncompatibleMedia,
                    &e.to_string(),
                ));
                return SetUp::Ended;
            }
        };
        invite.set_body(Bytes::from(offer.to_string()), Some(&MediaType::sdp()));
        self.event(call_event(call_ref, CallState::Trying, 0, "dialling"));
        let mut call: ClientCall = match ua
            .send_with_auth(invite, None, self.inner.credentials(&self.key.0))
            .await
        {
            Ok(c) => c,
            Err(e) => {
                self.event(ended_by(call_ref, EndReason::Failed, &e.to_string()));
                return SetUp::Ended;
            }
        };
        let mut hangup_requested = false;
        loop {
            tokio::select! {
                event = call.events.recv() => match event {
                    Some(ClientEvent::Response { response, dialog }) => {
                        let status = response.status;
                        if status < 200 {
                            if status > 100 {
                                let state = state_for_provisional(status, !response.body.is_empty());
                                if state == CallState::EarlyMedia {
                                    if let Ok(sdp) = SessionDescription::from_bytes(&response.body) {
                                        self.set_remote(&sdp).await;
                                    }
                                }
                                self.event(call_event(call_ref, state, status, &response.reason));
                            }
                            continue;
                        }
                        if status >= 300 {
                            let ev = if hangup_requested && status == 487 {
                                ended_by(call_ref, EndReason::LocalHangup, "cancelled by the device")
                            } else {
                                ended_by_status(call_ref, status, &response.reason)
                            };
                            self.event(ev);
                            return SetUp::Ended;
                        }
                        // 2xx
                        let Some(dialog) = dialog else {
                            self.event(ended_by(call_ref, EndReason::Failed, "2xx without a dialog"));
                            return SetUp::Ended;
                        };
                        self.set_dialog(dialog.clone());
                        if let Err(e) = ua.ack(&dialog, None).await {
                            debug!(error = %e, "ACK not sent");
                        }
                        let answer = SessionDescription::from_bytes(&response.body).ok();
                        let mut ev = call_event(call_ref, CallState::Answered, status, &response.reason);
                        if let Some(answer) = &answer {
                            self.set_remote(answer).await;
                            ev.media = Some(media_sdp::media_offer(answer));
                        }
                        self.event(ev);
                        // Confirmed: the ACK is sent.
                        self.replicate();
                        if hangup_requested {
                            self.bye(EndReason::LocalHangup).await;
                            return SetUp::Ended;
                        }
                        return SetUp::Answered;
                    }
                    Some(ClientEvent::Timeout) => {
                        self.event(ended_by_status(call_ref, 408, "Request Timeout"));
                        return SetUp::Ended;
                    }
                    Some(ClientEvent::TransportError) | None => {
                        self.event(ended_by(call_ref, EndReason::Failed, "transport error"));
                        return SetUp::Ended;
                    }
                },
                command = self.rx.recv() => match command.map(|c| *c) {
                    Some(CallCommand::Device(_, Body::Hangup(_))) | Some(CallCommand::DeviceGone) | None => {
                        hangup_requested = true;
                        let _ = ua.cancel(call.key()).await;
                    }
                    Some(CallCommand::Device(id, _)) => {
                        self.reply_error(id, "the call is not answered yet");
                    }
                    Some(_) => {}
                },
            }
        }
    }

    fn reply_error(&self, request_id: u64, message: &str) {
        self.inner.to_device(
            &self.key.0,
            request_id,
            Body::Error(thalamus_proto::v1::Error {
                code: thalamus_proto::v1::ErrorCode::InvalidArgument as i32,
                message: message.into(),
                request_id,
            }),
        );
    }

    async fn incoming(&mut self, tx: ServerTx, invite: Request, call_waiting: bool) -> SetUp {
        let call_ref = self.key.1;
        let ua = self.inner.ua.clone();
        let offer = if invite.body.is_empty() {
            None
        } else {
            match SessionDescription::from_bytes(&invite.body) {
                Ok(sdp) => Some(sdp),
                Err(_) => {
                    let _ = ua.respond(tx, 400, Some("Bad SDP"), None).await;
                    self.inner.by_invite.remove(&tx);
                    self.ended = true;
                    return SetUp::Ended;
                }
            }
        };
        let from = invite.headers.from().ok();
        self.inner.to_device(
            &self.key.0,
            0,
            Body::IncomingCall(IncomingCall {
                call_ref,
                from_uri: from.as_ref().map(|f| f.uri.to_string()).unwrap_or_default(),
                display_name: from
                    .as_ref()
                    .and_then(|f| f.display_name.clone())
                    .unwrap_or_default(),
                to_uri: invite.uri.to_string(),
                media: offer.as_ref().map(media_sdp::media_offer),
                call_waiting,
            }),
        );
        if let Ok(Some(dialog)) = ua.respond(tx, 180, None, None).await {
            self.set_dialog(dialog);
        }
        if let Ok(mut s) = self.shared.lock() {
            s.state = CallState::Ringing;
        }
        let no_answer = tokio::time::sleep(self.inner.config.no_answer_timeout);
        tokio::pin!(no_answer);
        let outcome = loop {
            tokio::select! {
                _ = &mut no_answer => {
                    let _ = ua.respond(tx, 480, Some("No Answer"), None).await;
                    self.event(ended_by(call_ref, EndReason::NoAnswer, "no answer"));
                    break SetUp::Ended;
                }
                command = self.rx.recv() => match command.map(|c| *c) {
                    Some(CallCommand::Device(_, Body::Answer(answer))) => {
                        self.device_media = answer.media;
                        self.start_relay();
                        let body = match &offer {
                            Some(offer) => match self.sdp.create_answer(offer, &self.local_media()) {
                                Ok(a) => a,
                                Err(e) => {
                                    let _ = ua.respond(tx, 488, None, None).await;
                                    self.event(ended_by(call_ref, EndReason::IncompatibleMedia, &e.to_string()));
                                    break SetUp::Ended;
                                }
                            },
                            None => match self.sdp.create_offer(&self.local_media()) {
                                Ok(o) => o,
                                Err(e) => {
                                    let _ = ua.respond(tx, 500, None, None).await;
                                    self.event(ended_by(call_ref, EndReason::Failed, &e.to_string()));
                                    break SetUp::Ended;
                                }
                            },
                        };
                        if let Some(offer) = &offer {
                            self.set_remote(offer).await;
                        }
                        match ua
                            .respond(tx, 200, None, Some((Bytes::from(body.to_string()), MediaType::sdp())))
                            .await
                        {
                            Ok(Some(dialog)) => {
                                self.set_dialog(dialog);
                                let mut ev = call_event(call_ref, CallState::Answered, 200, "OK");
                                ev.media = Some(media_sdp::media_offer(&body));
                                self.event(ev);
                                break SetUp::Answered;
                            }
                            _ => {
                                // Cancelled just before the answer: the CANCEL event follows.
                                continue;
                            }
                        }
                    }
                    Some(CallCommand::Device(_, Body::Reject(reject))) => {
                        let status = reject_status(reject.sip_status);
                        let reason = (!reject.reason.is_empty()).then_some(reject.reason.as_str());
                        let _ = ua.respond(tx, status, reason, None).await;
                        self.event(ended_by_status(call_ref, status, reason.unwrap_or("rejected")));
                        break SetUp::Ended;
                    }
                    Some(CallCommand::Device(_, Body::Hangup(_))) | Some(CallCommand::DeviceGone) => {
                        let _ = ua.respond(tx, 603, None, None).await;
                        self.event(ended_by_status(call_ref, 603, "declined by the device"));
                        break SetUp::Ended;
                    }
                    Some(CallCommand::Cancelled) => {
                        let mut ev = ended_by(call_ref, EndReason::Cancelled, "cancelled by the caller");
                        ev.sip_status = 487;
                        self.event(ev);
                        break SetUp::Ended;
                    }
                    Some(CallCommand::Device(id, _)) => self.reply_error(id, "answer or reject the call first"),
                    Some(_) => {}
                    None => break SetUp::Ended,
                },
            }
        };
        self.inner.by_invite.remove(&tx);
        outcome
    }

    /// The answered phase: until either side hangs up.
    async fn answered(&mut self) {
        let mut relay_events = self.relay.as_mut().and_then(MediaRelay::take_events);
        loop {
            let relay_event = async {
                match relay_events.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = self.rx.recv() => {
                    let Some(command) = command.map(|c| *c) else {
                        Box::pin(self.bye(EndReason::LocalHangup)).await;
                        return;
                    };
                    match command {
                        CallCommand::Device(_, Body::Hangup(_)) | CallCommand::DeviceGone => {
                            Box::pin(self.bye(EndReason::LocalHangup)).await;
                            return;
                        }
                        CallCommand::Device(id, Body::Hold(_)) => Box::pin(self.hold(id, true)).await,
                        CallCommand::Device(id, Body::Resume(_)) => Box::pin(self.hold(id, false)).await,
                        CallCommand::Device(id, Body::Dtmf(d)) => Box::pin(self.dtmf(id, &d.digit, d.duration_ms)).await,
                        CallCommand::Device(id, _) => self.reply_error(id, "the call is already answered"),
                        CallCommand::SipRequest(tx, request) => {
                            let ended = Box::pin(self.peer_request(tx, request)).await;
                            if let Some(arrived) = self.replica.takeover_arrived.take() {
                                let latency = arrived.elapsed();
                                self.inner.metrics.takeover_latency.observe(latency.as_secs_f64());
                                info!(
                                    takeover_latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
                                    "takeover: the request that caused it is answered"
                                );
                            }
                            if ended {
                                return;
                            }
                            if std::mem::take(&mut self.replica.reinvite_pending)
                                && !Box::pin(self.reinvite_for_media()).await
                            {
                                return;
                            }
                        }
                        CallCommand::AckTimeout => {
                            Box::pin(self.bye(EndReason::Failed)).await;
                            return;
                        }
                        CallCommand::Ack => {
                            // Our 2xx is acknowledged: the dialog is confirmed.
                            if !self.replica.stored {
                                self.replicate();
                            }
                        }
                        CallCommand::DeviceLink(link) => {
                            if let Some(relay) = &self.relay {
                                let _ = relay.set_sink(Arc::new(LinkSink(link))).await;
                            }
                        }
                        CallCommand::OwnershipLost => self.replica.lost = true,
                        CallCommand::Cancelled => {}
                    }
                    if self.replica.lost {
                        self.inner.metrics.dialogs_lost.inc();
                        self.event(ended_by(
                            self.key.1,
                            EndReason::NodeFailover,
                            "the call moved to another node",
                        ));
                        return;
                    }
                }
                event = relay_event => {
                    if let Some(RelayEvent::MediaTimeout { .. }) = event {
                        Box::pin(self.bye(EndReason::MediaTimeout)).await;
                        return;
                    }
                    if event.is_none() {
                        relay_events = None;
                    }
                }
            }
        }
    }

    /// Handles a request from the peer within the dialog; true when it ended the call.
    async fn peer_request(&mut self, tx: ServerTx, request: Request) -> bool {
        let call_ref = self.key.1;
        let ua = self.inner.ua.clone();
        match request.method {
            Method::Bye => {
                let _ = ua.respond(tx, 200, None, None).await;
                self.event(ended_by(call_ref, EndReason::RemoteHangup, "BYE"));
                true
            }
            Method::Invite | Method::Update => {
                let Ok(offer) = SessionDescription::from_bytes(&request.body) else {
                    // An offerless re-INVITE: answer with our current description.
                    let current = self.sdp.last_local().cloned();
                    let body = current.map(|s| (Bytes::from(s.to_string()), MediaType::sdp()));
                    let _ = ua.respond(tx, 200, None, body).await;
                    return false;
                };
                match self.sdp.create_answer(&offer, &self.local_media()) {
                    Ok(answer) => {
                        self.set_remote(&offer).await;
                        let _ = ua
                            .respond(
                                tx,
                                200,
                                None,
                                Some((Bytes::from(answer.to_string()), MediaType::sdp())),
                            )
                            .await;
                        let remote_hold = offer.is_hold();
                        let state = if remote_hold {
                            CallState::Held
                        } else {
                            CallState::Resumed
                        };
                        let mut ev = call_event(
                            call_ref,
                            state,
                            0,
                            if remote_hold {
                                "held by the remote party"
                            } else {
                                "resumed by the remote party"
                            },
                        );
                        ev.media = Some(media_sdp::media_offer(&offer));
                        self.event(ev);
                        // A target refresh: the record follows it.
                        if self.replica.stored {
                            self.replicate();
                        }
                    }
                    Err(_) => {
                        let _ = ua.respond(tx, 488, None, None).await;
                    }
                }
                false
            }
            Method::Info => {
                let body = String::from_utf8_lossy(&request.body).to_string();
                let digit = body.lines().find_map(|l| {
                    l.trim()
                        .strip_prefix("Signal=")
                        .map(|d| d.trim().to_string())
                });
                let duration = body
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("Duration=")?.trim().parse().ok())
                    .unwrap_or(160);
                let _ = ua.respond(tx, 200, None, None).await;
                if let Some(digit) = digit {
                    self.inner.to_device(
                        &self.key.0,
                        0,
                        Body::Dtmf(thalamus_proto::v1::Dtmf {
                            call_ref,
                            digit,
                            duration_ms: duration,
                        }),
                    );
                }
                false
            }
            Method::Message => {
                let from = request.headers.from().ok();
                self.inner.to_device(
                    &self.key.0,
                    0,
                    Body::TextReceived(thalamus_proto::v1::TextReceived {
                        from_uri: from.map(|f| f.uri.to_string()).unwrap_or_default(),
                        display_name: String::new(),
                        content_type: request
                            .headers
                            .content_type()
                            .ok()
                            .flatten()
                            .map(|m| m.to_string())
                            .unwrap_or_default(),
                        body: request.body.to_vec(),
                    }),
                );
                let _ = ua.respond(tx, 200, None, None).await;
                false
            }
            Method::Options => {
                let _ = ua.respond(tx, 200, None, None).await;
                false
            }
            _ => {
                let _ = ua
                    .respond_with_headers(
                        tx,
                        405,
                        None,
                        None,
                        vec![(HeaderName::Allow, crate::ALLOW.to_string())],
                    )
                    .await;
                false
            }
        }
    }

    async fn hold(&mut self, request_id: u64, hold: bool) {
        let call_ref = self.key.1;
        if self.held == hold {
            self.reply_error(
                request_id,
                if hold {
                    "already on hold"
                } else {
                    "not on hold"
                },
            );
            return;
        }
        let offer = if hold {
            self.sdp.create_hold_offer(HoldMode::SendOnly)
        } else {
            self.sdp.create_resume_offer()
        };
        let Ok(offer) = offer else {
            self.reply_error(request_id, "cannot build the re-INVITE offer");
            return;
        };
        let Some(dialog) = self.dialog.clone() else {
            return;
        };
        if !self.write_ahead().await {
            self.reply_error(request_id, "the call moved to another node");
            return;
        }
        let result = self
            .inner
            .ua
            .request_in_dialog(
                &dialog,
                Method::Invite,
                Some((Bytes::from(offer.to_string()), MediaType::sdp())),
                vec![],
            )
            .await;
        let mut call = match result {
            Ok(c) => c,
            Err(e) => {
                self.reply_error(request_id, &format!("re-INVITE not sent: {e}"));
                return;
            }
        };
        match call.final_response().await {
            ClientEvent::Response { response, dialog } if response.is_success() => {
                if let Some(d) = dialog {
                    let _ = self.inner.ua.ack(&d, None).await;
                }
                self.held = hold;
                if let Some(relay) = &self.relay {
                    let _ = relay
                        .set_local_direction(if hold {
                            Direction::SendOnly
                        } else {
                            Direction::SendRecv
                        })
                        .await;
                }
                if let Ok(answer) = SessionDescription::from_bytes(&response.body) {
                    self.set_remote(&answer).await;
                }
                self.replicate();
                let state = if hold {
                    CallState::Held
                } else {
                    CallState::Resumed
                };
                self.event(call_event(
                    call_ref,
                    state,
                    response.status,
                    &response.reason,
                ));
            }
            ClientEvent::Response { response, .. } => {
                let mut ev = call_event(
                    call_ref,
                    if self.held {
                        CallState::Held
                    } else {
                        CallState::Answered
                    },
                    response.status,
                    &format!("re-INVITE refused: {}", response.reason),
                );
                ev.end_reason = EndReason::Unspecified as i32;
                self.event(ev);
            }
            _ => self.reply_error(request_id, "re-INVITE timed out"),
        }
    }

    async fn dtmf(&mut self, request_id: u64, digit: &str, duration_ms: u32) {
        if thalamus_media::dtmf::event_code(digit).is_none() {
            self.reply_error(request_id, "a DTMF digit is one of 0-9 * # A-D");
            return;
        }
        if self.telephone_event {
            if let Some(input) = self.media_input.lock().ok().and_then(|i| i.clone()) {
                // RFC 4733 in the media: the events enter the relay as if the device had sent
                // them on its link (payload type 101), so the relay's numbering and payload
                // type mapping apply to them like to any other packet.
                for datagram in thalamus_media::dtmf::datagrams(
                    self.key.1,
                    digit,
                    duration_ms,
                    &mut self.dtmf_timestamp,
                ) {
                    let _ = input.feed(datagram);
                }
                return;
            }
        }
        let Some(dialog) = self.dialog.clone() else {
            return;
        };
        // No telephone-event negotiated: SIP INFO with application/dtmf-relay.
        let body = format!(
            "Signal={digit}\r\nDuration={}\r\n",
            if duration_ms == 0 { 160 } else { duration_ms }
        );
        if !self.write_ahead().await {
            self.reply_error(request_id, "the call moved to another node");
            return;
        }
        let result = self
            .inner
            .ua
            .request_in_dialog(
                &dialog,
                Method::Info,
                Some((
                    Bytes::from(body),
                    MediaType::new("application", "dtmf-relay"),
                )),
                vec![],
            )
            .await;
        match result {
            Ok(mut call) => {
                if let ClientEvent::Response { response, .. } = call.final_response().await {
                    if !response.is_success() {
                        self.reply_error(request_id, &format!("INFO refused: {}", response.status));
                    }
                }
            }
            Err(e) => self.reply_error(request_id, &format!("INFO not sent: {e}")),
        }
    }

    async fn bye(&mut self, reason: EndReason) {
        let call_ref = self.key.1;
        if let Some(dialog) = self.dialog.clone() {
            if self.write_ahead().await {
                if let Ok(mut call) = self
                    .inner
                    .ua
                    .request_in_dialog(&dialog, Method::Bye, None, vec![])
                    .await
                {
                    let _ = call.final_response().await;
                }
            }
        }
        if self.replica.lost {
            // Another node owns the dialog (and runs its timers): no BYE from here.
            self.inner.metrics.dialogs_lost.inc();
            self.event(ended_by(
                call_ref,
                EndReason::NodeFailover,
                "the call moved to another node",
            ));
            return;
        }
        let text = match reason {
            EndReason::LocalHangup => "hung up by the device",
            EndReason::MediaTimeout => "no media from the remote party",
            _ => "ended by the gateway",
        };
        self.event(ended_by(call_ref, reason, text));
    }

    async fn finish(&mut self) {
        let stats = match self.relay.take() {
            Some(relay) => relay.stop().await.ok(),
            None => None,
        };
        if let Ok(mut input) = self.media_input.lock() {
            *input = None;
        }
        if !self.ended {
            self.event(ended_by(self.key.1, EndReason::Failed, "call ended"));
        }
        if let Some(stats) = stats {
            // The final statistics follow the end event (same call_ref, state ENDED).
            let ev = CallEvent {
                call_ref: self.key.1,
                state: CallState::Ended as i32,
                stats: Some(MediaStats {
                    packets_sent: stats.to_peer.packets,
                    packets_received: stats.from_peer.flow.packets,
                    bytes_sent: stats.to_peer.bytes,
                    bytes_received: stats.from_peer.flow.bytes,
                    packets_lost: stats.from_peer.lost,
                    jitter_us: u32::try_from(stats.from_peer.jitter.as_micros())
                        .unwrap_or(u32::MAX),
                    relay_latency_us: u32::try_from(stats.latency_to_peer.p50.as_micros())
                        .unwrap_or(u32::MAX),
                }),
                reason: "media statistics".into(),
                ..Default::default()
            };
            self.inner.to_device(&self.key.0, 0, Body::CallEvent(ev));
        }
        if let Some(dialog) = &self.dialog {
            let _ = self.inner.ua.remove_dialog(dialog).await;
        }
        self.inner.forget_call(&self.key);
        // The record ends after its last write (which finds no dialog to export if it had not
        // run yet, and then writes nothing).
        let pending = self.replica.pending.take();
        if let (Some(dialog), Some(replicator)) = (&self.dialog, &self.inner.replicator) {
            if self.replica.stored && !self.replica.lost {
                if let Some(pending) = pending {
                    let _ = pending.await;
                }
                if let Err(e) = replicator.remove(key_of_dialog(dialog)) {
                    debug!(error = %e, "dialog end not replicated");
                }
            }
        }
    }

    /// What the record says besides the SIP dialog.
    fn facts(&self) -> CallFacts {
        CallFacts {
            device_id: self.key.0.clone(),
            call_ref: self.key.1,
            owner: self.inner.config.node_id.clone(),
            epoch: self.replica.epoch,
            base_version: self.replica.base_version,
            media: NegotiatedMedia {
                local_sdp: self
                    .sdp
                    .last_local()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                remote_sdp: self.replica.remote_sdp.clone().unwrap_or_default(),
            },
            app_data: Some(CallAppData {
                v: 1,
                remote_uri: self
                    .shared
                    .lock()
                    .map(|s| s.remote_uri.clone())
                    .unwrap_or_default(),
                outgoing: self.replica.outgoing,
                held: self.held,
            }),
        }
    }

    /// Hands the dialog's record to the replicator, from a task of its own: the call waits
    /// neither on the user agent's export nor on the store. Only confirmed dialogs are written.
    fn replicate(&mut self) {
        if self.replica.lost {
            return;
        }
        let (Some(replicator), Some(dialog)) = (self.inner.replicator.clone(), self.dialog.clone())
        else {
            return;
        };
        let previous = self.replica.pending.take();
        let ua = self.inner.ua.clone();
        let facts = self.facts();
        self.replica.stored = true;
        self.replica.pending = Some(tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            let Ok(Some(export)) = ua.export(&dialog).await else {
                return;
            };
            if export.state != "confirmed" {
                return;
            }
            if let Err(e) = replicator.replicate(to_stored(&export, &facts)) {
                debug!(error = %e, "dialog not replicated");
            }
        }));
    }

    /// Writes the local CSeq the next in-dialog request will use before it is sent, waiting up
    /// to `cluster.write_ahead_timeout_ms`. False when another node owns the dialog: the
    /// request must not be sent (the call is dropped).
    async fn write_ahead(&mut self) -> bool {
        if self.replica.lost {
            return false;
        }
        if !self.replica.stored {
            return true;
        }
        let (Some(replicator), Some(dialog)) = (self.inner.replicator.clone(), self.dialog.clone())
        else {
            return true;
        };
        if let Some(pending) = self.replica.pending.take() {
            let _ = pending.await;
        }
        let Ok(Some(export)) = self.inner.ua.export(&dialog).await else {
            return true;
        };
        // The write is also the ownership check (a compare-and-set on this node's version).
        // With no CSeq used yet (the first number is random) it carries none: the importing
        // node's floor is above any first number.
        let record = match reserve_next_local_cseq(export.clone()) {
            Some((reserved, _)) => reserved,
            None => export,
        };
        let metrics = &self.inner.metrics.write_ahead;
        let ack = match replicator.replicate_acked(to_stored(&record, &self.facts())) {
            Ok(ack) => ack,
            Err(_) => {
                inc(metrics, "error");
                return true;
            }
        };
        match tokio::time::timeout(self.inner.config.write_ahead_timeout, ack).await {
            Ok(Ok(Ok(_))) => {
                inc(metrics, "written");
                true
            }
            Ok(Ok(Err(StoreError::Conflict { .. }))) => {
                inc(metrics, "lost");
                info!("another node owns the dialog: not sending");
                self.replica.lost = true;
                false
            }
            Ok(_) => {
                inc(metrics, "error");
                true
            }
            Err(_) => {
                inc(metrics, "timeout");
                true
            }
        }
    }

    /// Continues a stored dialog this node just claimed: SDP session, call state and media
    /// relay from the record, then what the trigger asks for.
    async fn taken_over(&mut self, setup: TakeoverSetup) -> SetUp {
        let TakeoverSetup {
            record,
            sip,
            dialog,
            trigger,
        } = setup;
        self.set_dialog(dialog);
        self.replica.epoch = record.epoch;
        self.replica.base_version = record.version;
        self.replica.stored = true;
        let app = record.app_data.as_deref().and_then(CallAppData::decode);
        self.replica.outgoing = app.as_ref().map_or(sip.role == "uac", |a| a.outgoing);
        self.held = app.as_ref().is_some_and(|a| a.held);
        if let Ok(local) = SessionDescription::parse(&record.media.local_sdp) {
            self.device_media = Some(media_sdp::media_offer(&local));
            self.sdp = SdpSession::from_previous(local);
        }
        self.start_relay();
        if let Ok(remote) = SessionDescription::parse(&record.media.remote_sdp) {
            self.set_remote(&remote).await;
        }
        if self.held {
            if let Some(relay) = &self.relay {
                let _ = relay.set_local_direction(Direction::SendOnly).await;
            }
        }
        if let Ok(mut s) = self.shared.lock() {
            s.state = if self.held {
                CallState::Held
            } else {
                CallState::Answered
            };
        }
        let reinvite = self.inner.config.reinvite_after_takeover;
        match trigger {
            Trigger::Request { method, arrived } => {
                self.replica.takeover_arrived = Some(arrived);
                self.replica.reinvite_pending = reinvite
                    && !matches!(
                        method,
                        Method::Bye | Method::Invite | Method::Update | Method::Ack
                    );
            }
            Trigger::DeviceResume | Trigger::Api => {
                if reinvite && !self.reinvite_for_media().await {
                    return SetUp::Ended;
                }
            }
            Trigger::DeviceCommand { request_id, body } => {
                if reinvite && !matches!(body, Body::Hangup(_)) && !self.reinvite_for_media().await
                {
                    return SetUp::Ended;
                }
                // Handled by the answered phase, as if it had just arrived.
                if let Some(handle) = self.inner.calls.get(&self.key) {
                    handle.send(CallCommand::Device(request_id, body));
                }
            }
            Trigger::Hangup => {
                self.bye(EndReason::LocalHangup).await;
                return SetUp::Ended;
            }
        }
        if self.replica.lost {
            self.inner.metrics.dialogs_lost.inc();
            self.event(ended_by(
                self.key.1,
                EndReason::NodeFailover,
                "the call moved to another node",
            ));
            return SetUp::Ended;
        }
        SetUp::Answered
    }

    /// Re-INVITEs the peer with this node's media address (after a takeover), CSeq following
    /// the record's; the record is written again with the new SDP. False when the call is over:
    /// the peer no longer knows the dialog (481, or no answer at all: a record whose end was
    /// never written), or another node owns it.
    async fn reinvite_for_media(&mut self) -> bool {
        let Some(dialog) = self.dialog.clone() else {
            return true;
        };
        let mut local = self.local_media();
        if self.held {
            local.direction = Direction::SendOnly;
        }
        let offer = match self.sdp.create_offer(&local) {
            Ok(o) => o,
            Err(e) => {
                debug!(error = %e, "no re-INVITE offer after the takeover");
                return true;
            }
        };
        if !self.write_ahead().await {
            self.inner.metrics.dialogs_lost.inc();
            self.event(ended_by(
                self.key.1,
                EndReason::NodeFailover,
                "the call moved to another node",
            ));
            return false;
        }
        let result = self
            .inner
            .ua
            .request_in_dialog(
                &dialog,
                Method::Invite,
                Some((Bytes::from(offer.to_string()), MediaType::sdp())),
                vec![],
            )
            .await;
        let mut call = match result {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "re-INVITE after the takeover not sent");
                return true;
            }
        };
        let gone = match call.final_response().await {
            ClientEvent::Response { response, dialog } if response.is_success() => {
                if let Some(d) = dialog {
                    let _ = self.inner.ua.ack(&d, None).await;
                }
                if let Ok(answer) = SessionDescription::from_bytes(&response.body) {
                    self.set_remote(&answer).await;
                }
                self.replicate();
                info!("media moved to this node (re-INVITE answered)");
                false
            }
            ClientEvent::Response { response, .. } => {
                debug!(
                    status = response.status,
                    "re-INVITE after the takeover refused"
                );
                matches!(response.status, 408 | 481)
            }
            ClientEvent::Timeout => true,
            ClientEvent::TransportError => false,
        };
        if gone {
            info!("the peer no longer knows the dialog: the call ends");
            self.event(ended_by(
                self.key.1,
                EndReason::Failed,
                "the remote party no longer knows the call",
            ));
        }
        !gone
    }
}

fn reason_label(full: &str) -> &'static str {
    match full {
        "END_REASON_NORMAL" => "normal",
        "END_REASON_REMOTE_HANGUP" => "remote_hangup",
        "END_REASON_LOCAL_HANGUP" => "local_hangup",
        "END_REASON_BUSY" => "busy",
        "END_REASON_NO_ANSWER" => "no_answer",
        "END_REASON_REJECTED" => "rejected",
        "END_REASON_CANCELLED" => "cancelled",
        "END_REASON_NOT_FOUND" => "not_found",
        "END_REASON_UNAVAILABLE" => "unavailable",
        "END_REASON_TIMEOUT" => "timeout",
        "END_REASON_INCOMPATIBLE_MEDIA" => "incompatible_media",
        "END_REASON_MEDIA_TIMEOUT" => "media_timeout",
        "END_REASON_NODE_FAILOVER" => "node_failover",
        _ => "failed",
    }
}

/// Passes media datagrams to the device and reports each RFC 4733 event coming from the peer
/// as a `Dtmf` frame too (once per event, on its first end packet).
struct DtmfTap {
    link: Arc<dyn thalamus_media::DatagramSink>,
    inner: Arc<BridgeInner>,
    device: String,
    last_event: Mutex<Option<(u32, u32)>>,
}

impl thalamus_media::DatagramSink for DtmfTap {
    fn send_datagram(&self, datagram: Bytes) -> Result<(), thalamus_media::DatagramError> {
        if let Ok(d) = thalamus_proto::media::MediaDatagram::decode(datagram.clone()) {
            if d.header.payload_type == 101 {
                if let Ok(event) = thalamus_media::rtp::TelephoneEvent::parse(&d.payload) {
                    let key = (d.header.call_ref, d.header.timestamp);
                    let first_end = event.end
                        && self
                            .last_event
                            .lock()
                            .map(|mut last| last.replace(key) != Some(key))
                            .unwrap_or(false);
                    if let (true, Some(digit)) =
                        (first_end, thalamus_media::dtmf::digit(event.event))
                    {
                        self.inner.to_device(
                            &self.device,
                            0,
                            Body::Dtmf(thalamus_proto::v1::Dtmf {
                                call_ref: d.header.call_ref,
                                digit: digit.to_string(),
                                duration_ms: u32::from(event.duration) / 8,
                            }),
                        );
                    }
                }
            }
        }
        self.link.send_datagram(datagram)
    }

    fn max_datagram_bytes(&self) -> Option<usize> {
        self.link.max_datagram_bytes()
    }
}

/// The device's link as the relay's datagram sink.
struct LinkSink(thalamus_ingress::DeviceLink);

impl thalamus_media::DatagramSink for LinkSink {
    fn send_datagram(&self, datagram: Bytes) -> Result<(), thalamus_media::DatagramError> {
        use thalamus_ingress::LinkError;
        use thalamus_media::DatagramError;
        self.0.send_datagram(datagram).map_err(|e| match e {
            LinkError::Blocked => DatagramError::Blocked,
            LinkError::TooLarge => DatagramError::TooLarge,
            LinkError::Unsupported => DatagramError::Unsupported,
            LinkError::Closed => DatagramError::Closed,
        })
    }

    fn max_datagram_bytes(&self) -> Option<usize> {
        self.0.max_datagram_bytes()
    }
}

/// A datagram sink for a device with no live connection (media is dropped).
struct NoLink;

impl thalamus_media::DatagramSink for NoLink {
    fn send_datagram(&self, _datagram: Bytes) -> Result<(), thalamus_media::DatagramError> {
        Err(thalamus_media::DatagramError::Closed)
    }
}
