//! The call task: a thin tokio driver around [`CallCore`], as `quinn::Connection` drives
//! `quinn_proto::Connection`.
//!
//! It turns what arrives (the bridge's [`CallCommand`]s, the events of the client
//! transactions the core started, relay events, the core's timer) into [`CallInput`]s, and
//! carries out the core's [`CallAction`]s with the user agent (requests, responses, ACK,
//! CANCEL), the media relay (start, remote media, direction, DTMF injection, stop and its
//! statistics) and the replicator (records written in order without waiting; the early record
//! built from the INVITE it was given; the local CSeq written ahead with a bounded wait; the
//! tombstone at the end). It holds one rule of its own, the fence's, as `write_ahead` does for
//! requests: the final answer to a ringing call whose early record is in the store goes out
//! only while this node may act (another node may have adopted the INVITE), and a call lost
//! to another node has its INVITE transaction abandoned. Every other decision is the core's.

use std::sync::{Arc, Mutex};
use std::task::Poll;

use bytes::Bytes;
use rand::Rng;
use thalamus_dialog_store::StoreError;
use thalamus_media::{RelayEvent, RelaySpec};
use thalamus_proto::media::StreamId;
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{CallEvent, CallState, KeyframeRequest, MediaStats};
use thalamus_sip::dialog::DialogId;
use thalamus_sip::message::{MediaType, Method, NameAddr};
use thalamus_sip::ua::{ClientCall, ClientEvent, ServerTx};
use thalamus_telemetry::inc;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, info_span, Instrument};

use super::core::CallKey;
use super::core::{
    CallAction, CallCore, CallCount, CallInput, CallSettings, ClaimedDialog, ClientOutcome,
    RelayAddr, RelayOp, RelayStreams, TxId, WriteAhead,
};
use super::relays::CallRelays;
use super::{AdoptSetup, CallSetup};
use crate::dialogs::{key_of_dialog, remote_uri_of, reserve_next_local_cseq, to_stored, CallFacts};
use crate::media_sdp::{RtcpMux, StreamKeys, StreamPorts};
use crate::shared::BridgeInner;
use crate::table::{self, CallCommand, CallShared};
use rand::RngCore;
use thalamus_sip::sdp::SrtpPolicy;
use thalamus_sip::session_timer::TimerHeaders;

/// Starts the task of call `key`.
pub(crate) fn spawn(inner: Arc<BridgeInner>, key: CallKey, setup: CallSetup) {
    let settings = CallSettings {
        node_id: inner.config.node_id.clone(),
        no_answer_timeout: inner.config.no_answer_timeout,
        replicate: inner.replicator.is_some(),
        replicate_early: inner
            .replicator
            .as_ref()
            .is_some_and(|r| r.strategy().includes_early_dialogs()),
        reinvite_after_takeover: inner.config.reinvite_after_takeover,
        media_address: inner.media_address,
        session_timer: inner.config.session_timer,
        reliable_provisionals: inner.config.reliable_provisionals,
        srtp: inner
            .media
            .as_ref()
            .map_or(SrtpPolicy::Off, |m| m.config().srtp.policy()),
    };
    let mut settings = settings;
    let sdp_session_id = thalamus_sip::rng::with(|rng| rng.gen_range(1..(1u64 << 62)));
    let now = Instant::now().into_std();
    let mut incoming = None;
    let mut early = None;
    let mut adopted = false;
    let mut transfer_of = None;
    let (direction, core) = match setup {
        CallSetup::Outgoing {
            target,
            media,
            headers,
            transfer_of: of,
        } => (
            {
                transfer_of = of;
                "outgoing"
            },
            CallCore::outgoing(
                key.clone(),
                settings,
                sdp_session_id,
                target,
                media,
                headers,
            ),
        ),
        CallSetup::Incoming {
            tx,
            invite,
            source,
            call_waiting,
            replaces,
            in_progress,
        } => {
            incoming = Some((tx, in_progress));
            if settings.replicate_early {
                early = crate::dialogs::early_payload(&invite, &source);
                // An INVITE over TCP, or too large to keep, has no early record.
                settings.replicate_early = early.is_some();
            }
            (
                "incoming",
                CallCore::incoming(
                    key.clone(),
                    settings,
                    sdp_session_id,
                    now,
                    tx,
                    &invite,
                    crate::call::core::OtherCalls {
                        call_waiting,
                        replaces,
                    },
                ),
            )
        }
        CallSetup::Adopted(a) => {
            let AdoptSetup {
                tx,
                invite,
                record,
                trigger,
                previous_owner,
                rang_for,
                in_progress,
            } = *a;
            incoming = Some((tx, Box::new(in_progress)));
            early = Some(record.sip_dialog.clone());
            adopted = true;
            (
                "adopted",
                CallCore::adopted(
                    key.clone(),
                    settings,
                    sdp_session_id,
                    now,
                    tx,
                    &invite,
                    &record,
                    previous_owner,
                    trigger,
                    rang_for,
                ),
            )
        }
        CallSetup::TakenOver(t) => {
            let remote_uri = remote_uri_of(&t.record, &t.sip);
            (
                "taken_over",
                CallCore::taken_over(
                    key.clone(),
                    settings,
                    sdp_session_id,
                    ClaimedDialog {
                        record: &t.record,
                        remote_uri,
                        uac: t.sip.role == "uac",
                        dialog: t.dialog,
                        trigger: t.trigger,
                        previous_owner: t.previous_owner,
                    },
                ),
            )
        }
    };
    let mut core = core;
    // The call record's clock: the system clock at this instant.
    core.set_wall_clock(now, wall_ms());
    core.set_takes_transfers(
        inner
            .links
            .get(&key.0)
            .is_some_and(|link| link.takes_transfers()),
    );
    let (handle, rx, shared, media_input) = table::handle(
        core.remote_uri().to_string(),
        core.dialog().cloned(),
        core.state(),
    );
    inner.add_call(key.clone(), handle);
    crate::watchers::changed(&inner, &key.0);
    if let Some(dialog) = core.dialog() {
        // Before the request that caused a takeover is delivered again.
        inner.by_dialog.insert(dialog.clone(), key.clone());
    }
    inner.metrics.calls_active.inc();
    inc(&inner.metrics.calls_started, direction);
    let span = info_span!("call", device = %key.0, call_ref = key.1, direction);
    let driver = Driver {
        inner,
        key,
        core,
        rx,
        rx_open: true,
        shared,
        media_input,
        relays: None,
        relay_events: None,
        video_events: None,
        calls: Vec::new(),
        pending_write: None,
        incoming,
        early_stored: Arc::new(std::sync::atomic::AtomicBool::new(
            early.is_some() && adopted,
        )),
        early,
        transfer_of,
    };
    tokio::spawn(Box::new(driver).run().instrument(span));
}

/// What a call placed for a transfer tells the call transferred (its SIP status, reason, and
/// whether that is the last word) when the device hears `event`.
fn transfer_progress_of(event: &thalamus_proto::v1::CallEvent) -> Option<(u16, String, bool)> {
    let status = u16::try_from(event.sip_status).unwrap_or(0);
    match CallState::try_from(event.state).ok()? {
        CallState::Ringing | CallState::EarlyMedia => Some((
            if status > 100 { status } else { 180 },
            event.reason.clone(),
            false,
        )),
        CallState::Answered => Some((200, "OK".to_string(), true)),
        CallState::Ended => {
            let status = if status >= 300 { status } else { 503 };
            Some((status, event.reason.clone(), true))
        }
        _ => None,
    }
}

/// Whether the task goes on after an action.
enum Flow {
    Continue,
    Stop,
}

struct Driver {
    inner: Arc<BridgeInner>,
    key: CallKey,
    core: CallCore,
    rx: mpsc::Receiver<Box<CallCommand>>,
    rx_open: bool,
    shared: Arc<Mutex<CallShared>>,
    media_input: table::SharedInput,
    relays: Option<CallRelays>,
    relay_events: Option<mpsc::Receiver<RelayEvent>>,
    /// The video relay's events (key frame requests from the peer).
    video_events: Option<mpsc::Receiver<RelayEvent>>,
    /// The client transactions the core started and that have no final answer yet.
    calls: Vec<(TxId, ClientCall)>,
    /// The last record write handed to its own task (so the call never waits on the user
    /// agent or the store to replicate); each waits for the one before, so writes stay in
    /// order.
    pending_write: Option<tokio::task::JoinHandle<()>>,
    /// The incoming INVITE's transaction and its merge-key guard, until it is settled.
    incoming: Option<(ServerTx, Box<crate::shared::InProgress>)>,
    /// The early record's SIP payload (the INVITE), under `early-and-confirmed`.
    early: Option<thalamus_dialog_store::SipDialogPayload>,
    /// An early record of this call is in the store (its write acknowledged, or claimed):
    /// another node may adopt the INVITE, so its final answer goes out only while the fence
    /// allows. (A record the store never took cannot be adopted: no fence then.)
    early_stored: Arc<std::sync::atomic::AtomicBool>,
    /// This call was placed for another call's transfer (asked by its remote party): its
    /// progress goes there until it is answered or fails.
    transfer_of: Option<CallKey>,
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// The next event of any client transaction in flight (pending while there is none).
fn next_client_event(
    calls: &mut [(TxId, ClientCall)],
) -> impl std::future::Future<Output = (TxId, Option<ClientEvent>)> + '_ {
    std::future::poll_fn(move |cx| {
        for (tx, call) in calls.iter_mut() {
            if let Poll::Ready(event) = call.events.poll_recv(cx) {
                return Poll::Ready((*tx, event));
            }
        }
        Poll::Pending
    })
}

async fn next_relay_event(events: &mut Option<mpsc::Receiver<RelayEvent>>) -> Option<RelayEvent> {
    match events.as_mut() {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Driver {
    async fn run(mut self: Box<Self>) {
        loop {
            while let Some(action) = self.core.poll_action() {
                // Most actions are carried out at once; those that wait on the user agent, the
                // relay or the store run boxed, so their futures exist only while they run and
                // an idle call stays small.
                let Some(action) = self.execute_now(action) else {
                    continue;
                };
                if let Flow::Stop = Box::pin(self.execute(action)).await {
                    return;
                }
            }
            self.publish();
            let deadline = self.core.poll_timeout();
            tokio::select! {
                command = self.rx.recv(), if self.rx_open => {
                    let input = match command.map(|c| *c) {
                        None => {
                            // The bridge forgot the call: nobody will send it anything again.
                            self.rx_open = false;
                            CallInput::DeviceGone
                        }
                        Some(CallCommand::DeviceGone) => CallInput::DeviceGone,
                        Some(CallCommand::Device(id, body)) => CallInput::Device(id, body),
                        Some(CallCommand::SipRequest(tx, request)) => {
                            CallInput::PeerRequest(tx, Box::new(request))
                        }
                        Some(CallCommand::Ack) => CallInput::Ack,
                        Some(CallCommand::Cancelled) => CallInput::Cancelled,
                        Some(CallCommand::PrackTimeout) => CallInput::PrackTimeout,
                        Some(CallCommand::AckTimeout) => CallInput::AckTimeout,
                        Some(CallCommand::OwnershipLost) => CallInput::OwnershipLost,
                        Some(CallCommand::Rereplicate(v)) => CallInput::Rereplicate(v),
                        Some(CallCommand::TransferProgress(status, reason)) => {
                            CallInput::TransferProgress(status, reason)
                        }
                        Some(CallCommand::Replaced(dialog)) => CallInput::Replaced(dialog),
                        Some(CallCommand::DeviceLink(link)) => {
                            self.core.set_takes_transfers(link.takes_transfers());
                            if let Some(relays) = &self.relays {
                                let link: Arc<dyn thalamus_media::DatagramSink> =
                                    Arc::new(LinkSink(link));
                                for (stream, relay) in relays.iter() {
                                    let _ = relay.set_sink(self.device_sink(*stream, link.clone())).await;
                                }
                            }
                            continue;
                        }
                    };
                    self.core.handle(now(), input);
                }
                (tx, event) = next_client_event(&mut self.calls) => {
                    let outcome = match event {
                        Some(ClientEvent::Response { response, dialog }) => ClientOutcome::Response {
                            status: response.status,
                            reason: response.reason.clone(),
                            body: response.body.clone(),
                            dialog,
                            session_expires: response.headers.session_expires().ok().flatten(),
                            allows_update: response
                                .headers
                                .allow()
                                .is_ok_and(|m| m.contains(&Method::Update)),
                        },
                        Some(ClientEvent::Timeout) => ClientOutcome::Timeout,
                        Some(ClientEvent::TransportError) | None => {
                            ClientOutcome::Failed("transport error".into())
                        }
                    };
                    let last = !matches!(&outcome, ClientOutcome::Response { status, .. } if *status < 200);
                    if last {
                        self.calls.retain(|(t, _)| *t != tx);
                    }
                    self.core.handle(now(), CallInput::Client(tx, outcome));
                }
                event = next_relay_event(&mut self.relay_events) => match event {
                    Some(RelayEvent::MediaTimeout { .. }) => {
                        self.core.handle(now(), CallInput::MediaTimeout);
                    }
                    Some(_) => {}
                    None => self.relay_events = None,
                },
                event = next_relay_event(&mut self.video_events) => match event {
                    Some(RelayEvent::KeyframeRequested) => {
                        let body = Body::KeyframeRequest(KeyframeRequest { call_ref: self.key.1 });
                        self.inner.to_device(&self.key.0, 0, body);
                    }
                    // The audio relay's timeout ends the call; the video's does not.
                    Some(_) => {}
                    None => self.video_events = None,
                },
                _ = sleep_until(deadline) => self.core.handle_timeout(now()),
            }
        }
    }

    /// Shows the bridge how to read the relays' figures (the operator console reads them
    /// when it asks; the call's task is not involved).
    fn publish_probes(&self) {
        let probes = self
            .relays
            .as_ref()
            .map(CallRelays::probes)
            .unwrap_or_default();
        if let Ok(mut s) = self.shared.lock() {
            s.probes = probes;
        }
    }

    /// Shows the bridge the call's state and dialog.
    fn publish(&self) {
        if let Ok(mut s) = self.shared.lock() {
            s.state = self.core.state();
            let up = matches!(
                s.state,
                CallState::Answered | CallState::Held | CallState::Resumed
            );
            if up && s.answered.is_none() {
                s.answered = Some(Instant::now());
            }
            if s.dialog.is_none() {
                s.dialog = self.core.dialog().cloned();
            }
        }
    }

    /// Carries out an action that waits on nothing; gives back the ones that do.
    fn execute_now(&mut self, action: CallAction) -> Option<CallAction> {
        let inner = &self.inner;
        match action {
            CallAction::ToDevice { request_id, body } => {
                if let (Some(of), Body::CallEvent(event)) = (&self.transfer_of, &body) {
                    if let Some((status, reason, last)) = transfer_progress_of(event) {
                        if let Some(call) = inner.calls.get(of) {
                            call.send(CallCommand::TransferProgress(status, reason));
                        }
                        if last {
                            self.transfer_of = None;
                        }
                    }
                }
                inner.to_device(&self.key.0, request_id, body);
            }
            CallAction::PlaceTransfer {
                target,
                referred_by,
            } => self.place_transfer(target, referred_by),
            CallAction::EndReplaced(old, dialog) => {
                if let Some(call) = inner.calls.get(&(self.key.0.clone(), old)) {
                    call.send(CallCommand::Replaced(dialog));
                }
            }
            CallAction::StartRelay(streams) => {
                let addr = self.start_relay(streams);
                self.core.relay_started(now(), addr);
            }
            CallAction::Relay(RelayOp::RequestKeyframe) => {
                if let Some(video) = self.relays.as_ref().and_then(|r| r.get(StreamId::VIDEO)) {
                    let _ = video.request_keyframe();
                }
            }
            CallAction::Relay(RelayOp::Inject(datagrams)) => {
                if let Some(input) = self.media_input.lock().ok().and_then(|i| i.clone()) {
                    for datagram in datagrams {
                        input.feed(datagram);
                    }
                }
            }
            CallAction::SetDialog(dialog) => {
                inner.by_dialog.insert(dialog.clone(), self.key.clone());
                if let Ok(mut s) = self.shared.lock() {
                    s.dialog = Some(dialog);
                }
            }
            CallAction::InviteSettled => {
                if let Some((tx, in_progress)) = self.incoming.take() {
                    inner.by_invite.remove(&tx);
                    drop(in_progress);
                }
                // Answered (the device is on the phone now) or refused.
                crate::watchers::changed(inner, &self.key.0);
            }
            CallAction::Replicate(facts) => self.replicate(*facts),
            CallAction::ReplicateEarly(facts) => self.replicate_early(&facts),
            CallAction::Count(CallCount::Ended(label)) => inc(&inner.metrics.calls_ended, label),
            CallAction::Count(CallCount::SetUp(direction, took)) => {
                inner
                    .metrics
                    .call_setup
                    .get_or_create(&thalamus_telemetry::ReasonLabel { reason: direction })
                    .observe(took.as_secs_f64());
            }
            CallAction::Count(CallCount::DialogLost) => {
                inner.metrics.dialogs_lost.inc();
            }
            CallAction::TakeoverAnswered(latency) => {
                inner
                    .metrics
                    .takeover_latency
                    .observe(latency.as_secs_f64());
                info!(
                    takeover_latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
                    "takeover: the request that caused it is answered"
                );
            }
            CallAction::Note(text) => info!("{text}"),
            other => return Some(other),
        }
        None
    }

    /// Carries out an action that waits on the user agent, the relay or the store.
    async fn execute(&mut self, action: CallAction) -> Flow {
        let inner = self.inner.clone();
        let ua = &inner.ua;
        match action {
            CallAction::Relay(op) => match op {
                RelayOp::SetRemote(stream, remote, keys) => {
                    if let Some(relay) = self.relays.as_ref().and_then(|r| r.get(stream)) {
                        let peer = thalamus_media::RemotePeer::from_remote_media(&remote);
                        let _ = relay.set_peer(peer.with_srtp(keys)).await;
                    }
                }
                RelayOp::Direction(direction) => {
                    for (_, relay) in self.relays.iter().flat_map(CallRelays::iter) {
                        let _ = relay.set_local_direction(direction).await;
                    }
                }
                RelayOp::Stop(stream) => {
                    if let Some(relays) = self.relays.as_mut() {
                        // The device's datagrams of the stream go to the audio relay (dropped
                        // and counted there) before this one stops.
                        let relay = relays.take_stream(stream);
                        if let Ok(mut input) = self.media_input.lock() {
                            *input = Some(relays.inputs());
                        }
                        if let Ok(mut s) = self.shared.lock() {
                            s.probes = relays.probes();
                        }
                        if let Some(relay) = relay {
                            relays.stopped(stream, relay.stop().await.ok());
                        }
                    }
                }
                // Carried out by `execute_now`.
                RelayOp::Inject(_) | RelayOp::RequestKeyframe => {}
            },
            CallAction::SendInvite {
                tx,
                target,
                headers,
                sdp,
            } => {
                let mut invite = ua.new_request(
                    Method::Invite,
                    target.clone(),
                    inner.aor(&self.key.0),
                    NameAddr::new(target),
                );
                let (contact, destination) = ua.contact_for(Some(&self.key.0), &invite).await;
                invite.headers.push_contact(&contact);
                for (name, value) in headers {
                    invite.headers.push(name, value);
                }
                invite.set_body(Bytes::from(sdp), Some(&MediaType::sdp()));
                match ua
                    .send_with_auth(invite, destination, inner.credentials(&self.key.0))
                    .await
                {
                    Ok(call) => self.calls.push((tx, call)),
                    Err(e) => self.core.handle(
                        now(),
                        CallInput::Client(tx, ClientOutcome::Failed(e.to_string())),
                    ),
                }
            }
            CallAction::Cancel { tx } => {
                if let Some((_, call)) = self.calls.iter().find(|(t, _)| *t == tx) {
                    let _ = ua.cancel(call.key()).await;
                }
            }
            CallAction::Ack { dialog } => {
                if let Err(e) = ua.ack(&dialog, None).await {
                    debug!(error = %e, "ACK not sent");
                }
            }
            CallAction::SendInDialog {
                tx,
                dialog,
                method,
                body,
                headers,
            } => match ua.request_in_dialog(&dialog, method, body, headers).await {
                Ok(call) => self.calls.push((tx, call)),
                Err(e) => self.core.handle(
                    now(),
                    CallInput::Client(tx, ClientOutcome::Failed(e.to_string())),
                ),
            },
            CallAction::Respond {
                tx,
                status,
                reason,
                body,
                headers,
                report,
            } => {
                if (200..300).contains(&status)
                    && self.incoming.as_ref().is_some_and(|(t, _)| *t == tx)
                    && self.write_before_answer().await == WriteAhead::Lost
                {
                    info!("another node owns the ringing call: the 200 is not sent, the call is dropped here");
                    self.core.mark_lost();
                    self.core.handle(now(), CallInput::OwnershipLost);
                    return Flow::Continue;
                }
                if status >= 200 && self.final_answer_fenced(tx) {
                    info!(
                        status,
                        "final answer to a ringing call another node may have adopted: not sent, \
                         the call is dropped here"
                    );
                    self.core.mark_lost();
                    self.core.handle(now(), CallInput::OwnershipLost);
                    return Flow::Continue;
                }
                let result = ua
                    .respond_with_headers(tx, status, reason.as_deref(), body, headers)
                    .await;
                if report {
                    let dialog = result.ok().flatten();
                    self.core
                        .handle(now(), CallInput::Responded(tx, status, dialog));
                }
            }
            CallAction::WriteAhead(facts) => {
                let result = self.write_ahead(&facts).await;
                self.core.handle(now(), CallInput::WriteAheadDone(result));
            }
            CallAction::Close { tombstone } => {
                self.finish(tombstone).await;
                return Flow::Stop;
            }
            // Carried out by `execute_now`.
            CallAction::ToDevice { .. }
            | CallAction::PlaceTransfer { .. }
            | CallAction::EndReplaced(..)
            | CallAction::StartRelay(_)
            | CallAction::SetDialog(_)
            | CallAction::InviteSettled
            | CallAction::Replicate(_)
            | CallAction::ReplicateEarly(_)
            | CallAction::Count(_)
            | CallAction::TakeoverAnswered(_)
            | CallAction::Note(_) => {}
        }
        Flow::Continue
    }

    /// What a stream's relay sends device datagrams to: the device's link; for audio with the
    /// tap that reports the peer's RFC 4733 events as `Dtmf` frames.
    fn device_sink(
        &self,
        stream: StreamId,
        link: Arc<dyn thalamus_media::DatagramSink>,
    ) -> Arc<dyn thalamus_media::DatagramSink> {
        if stream != StreamId::AUDIO {
            return link;
        }
        Arc::new(DtmfTap {
            link,
            inner: self.inner.clone(),
            device: self.key.0.clone(),
            last_event: Mutex::new(None),
        })
    }

    /// Starts the media relays of this call (when the node has media): audio, then the other
    /// `streams` asked for. Without an audio relay the call has none; a stream whose relay
    /// does not start is left out of the SDP (the call goes on without it).
    fn start_relay(&mut self, streams: RelayStreams) -> Option<RelayAddr> {
        let engine = self.inner.media.clone()?;
        let link: Arc<dyn thalamus_media::DatagramSink> = match self.inner.links.get(&self.key.0) {
            Some(link) => Arc::new(LinkSink(link.clone())),
            None => Arc::new(NoLink),
        };
        let start = |stream: StreamId| {
            engine
                .start(
                    RelaySpec::stream(self.key.1, stream)
                        .with_rtcp_mux(streams.rtcp_mux.of(stream)),
                    self.device_sink(stream, link.clone()),
                )
                .inspect_err(|e| debug!(error = %e, ?stream, "no media relay for this stream"))
                .ok()
        };
        let mut audio = start(StreamId::AUDIO)?;
        let others: Vec<_> = [
            (streams.video, StreamId::VIDEO),
            (streams.signal, StreamId::SIGNAL),
        ]
        .into_iter()
        .filter_map(|(wanted, stream)| Some((stream, wanted.then(|| start(stream))??)))
        .collect();
        let ip = audio.sdp_address().unwrap_or(self.inner.media_address);
        self.relay_events = audio.take_events();
        let mut relays = CallRelays::new(audio);
        for (stream, mut relay) in others {
            if stream == StreamId::VIDEO {
                self.video_events = relay.take_events();
            }
            relays.add(stream, relay);
        }
        let muxed = |stream: StreamId| relays.get(stream).is_some_and(|r| r.is_rtcp_muxed());
        let ports = StreamPorts {
            audio: relays.port(StreamId::AUDIO).unwrap_or(9),
            video: relays.port(StreamId::VIDEO),
            signal: relays.port(StreamId::SIGNAL),
            rtcp_mux: RtcpMux {
                audio: muxed(StreamId::AUDIO),
                video: muxed(StreamId::VIDEO),
                signal: muxed(StreamId::SIGNAL),
            },
        };
        if let Ok(mut input) = self.media_input.lock() {
            *input = Some(relays.inputs());
        }
        self.relays = Some(relays);
        self.publish_probes();
        // Fresh keys for these relays: a takeover's re-INVITE re-keys.
        let keys = if self.core.srtp_policy() == SrtpPolicy::Off {
            StreamKeys::NONE
        } else {
            StreamKeys::generate(|bytes| rand::thread_rng().fill_bytes(bytes))
        };
        Some(RelayAddr { ip, ports, keys })
    }

    /// Hands the dialog's record to the replicator from a task of its own: the call waits
    /// neither on the user agent's export nor on the store. Only confirmed dialogs are written.
    fn replicate(&mut self, facts: CallFacts) {
        let (Some(replicator), Some(dialog)) =
            (self.inner.replicator.clone(), self.core.dialog().cloned())
        else {
            return;
        };
        let previous = self.pending_write.take();
        let ua = self.inner.ua.clone();
        self.pending_write = Some(tokio::spawn(async move {
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

    /// Writes the record of the dialog our 2xx is about to confirm (the early dialog's export,
    /// as confirmed) and waits for the store, at most the write-ahead timeout: a node that dies
    /// right after its 2xx leaves has left the record behind (without this, the record was
    /// written as the 2xx left, and a death in the millisecond before the store had it lost a
    /// confirmed dialog). `Lost` when another node owns the record (it adopted the ringing
    /// call); a failed or slow write lets the 2xx go (the write after it retries).
    async fn write_before_answer(&mut self) -> WriteAhead {
        let (Some(replicator), Some(dialog)) =
            (self.inner.replicator.clone(), self.core.dialog().cloned())
        else {
            return WriteAhead::Failed;
        };
        if let Some(pending) = self.pending_write.take() {
            let _ = pending.await;
        }
        let Ok(Some(mut export)) = self.inner.ua.export(&dialog).await else {
            return WriteAhead::Failed;
        };
        export.state = "confirmed".into();
        let mut facts = self.core.record_facts();
        if let Some(app) = facts.app_data.as_mut() {
            app.answered_ms = Some(wall_ms());
        }
        self.write_acked(&replicator, to_stored(&export, &facts))
            .await
    }

    /// Hands `record` to the replicator and waits for the store to take it, at most the
    /// write-ahead timeout (counted in `write_ahead`): written, lost to another node's
    /// claim, or failed (refused, a store error, too slow).
    async fn write_acked(
        &self,
        replicator: &thalamus_dialog_store::replicator::Replicator,
        record: thalamus_dialog_store::StoredDialog,
    ) -> WriteAhead {
        let metrics = &self.inner.metrics.write_ahead;
        let Ok(ack) = replicator.replicate_acked(record) else {
            inc(metrics, "error");
            return WriteAhead::Failed;
        };
        match tokio::time::timeout(self.inner.config.write_ahead_timeout, ack).await {
            Ok(Ok(Ok(_))) => {
                inc(metrics, "written");
                WriteAhead::Written
            }
            Ok(Ok(Err(StoreError::Conflict { .. }))) => {
                inc(metrics, "lost");
                WriteAhead::Lost
            }
            Ok(_) => {
                inc(metrics, "error");
                WriteAhead::Failed
            }
            Err(_) => {
                inc(metrics, "timeout");
                WriteAhead::Failed
            }
        }
    }

    /// Whether a final answer to INVITE `tx` must not go out: the call's early record is in the
    /// store (another node may have adopted the INVITE: a survivor claims it once this node's
    /// lease lapsed or a balancer took it out) and this node's fence does not confirm it may
    /// still act (a node frozen or cut off, waking up). As for in-dialog requests (see
    /// `write_ahead`), the answer is then held: fail closed.
    fn final_answer_fenced(&self, tx: ServerTx) -> bool {
        if !self.early_stored.load(std::sync::atomic::Ordering::Relaxed)
            || self.incoming.as_ref().is_none_or(|(t, _)| *t != tx)
        {
            return false;
        }
        match &self.inner.fence {
            Some(fence) => fence
                .may_act(tokio::time::Instant::now().into_std())
                .is_err(),
            None => false,
        }
    }

    /// Hands the incoming call's early record (its INVITE under the early dialog's key) to the
    /// replicator: at once, as nothing was written for the call before it.
    fn replicate_early(&mut self, facts: &CallFacts) {
        let (Some(replicator), Some(dialog), Some(payload)) = (
            self.inner.replicator.clone(),
            self.core.dialog(),
            self.early.clone(),
        ) else {
            return;
        };
        let record = crate::dialogs::stored_with(key_of_dialog(dialog), payload, facts);
        match replicator.replicate_acked(record) {
            Ok(ack) => {
                let stored = self.early_stored.clone();
                tokio::spawn(async move {
                    if matches!(ack.await, Ok(Ok(_))) {
                        stored.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
            Err(e) => debug!(error = %e, "early dialog not replicated"),
        }
    }

    /// Writes the local CSeq the next in-dialog request will use, waiting up to the write-ahead
    /// timeout.
    async fn write_ahead(&mut self, facts: &CallFacts) -> WriteAhead {
        let result = self.write_ahead_once(facts).await;
        if result != WriteAhead::Failed {
            return result;
        }
        // Not confirmed: sent anyway only while no other node can have claimed the dialog.
        let metrics = &self.inner.metrics.write_ahead;
        match &self.inner.fence {
            Some(fence) => match fence.may_act(tokio::time::Instant::now().into_std()) {
                Ok(()) => WriteAhead::Failed,
                Err(why) => {
                    inc(metrics, "fenced");
                    info!(why = %why, "the write ahead failed and this node is fenced: not sending");
                    WriteAhead::Fenced
                }
            },
            None => {
                inc(metrics, "fenced");
                WriteAhead::Fenced
            }
        }
    }

    /// One try of the write ahead: written, lost, or failed (timeout, store error).
    async fn write_ahead_once(&mut self, facts: &CallFacts) -> WriteAhead {
        let (Some(replicator), Some(dialog)) =
            (self.inner.replicator.clone(), self.core.dialog().cloned())
        else {
            return WriteAhead::Failed;
        };
        if let Some(pending) = self.pending_write.take() {
            let _ = pending.await;
        }
        let Ok(Some(export)) = self.inner.ua.export(&dialog).await else {
            return WriteAhead::Failed;
        };
        // The write is also the ownership check (a compare-and-set on this node's version).
        // With no CSeq used yet (the first number is random) it carries none: the importing
        // node's floor is above any first number.
        let record = match reserve_next_local_cseq(export.clone()) {
            Some((reserved, _)) => reserved,
            None => export,
        };
        let written = self
            .write_acked(&replicator, to_stored(&record, facts))
            .await;
        if written == WriteAhead::Lost {
            info!("another node owns the dialog: not sending");
        }
        written
    }

    /// The end: the relay's statistics to the device, the dialog forgotten, and the record
    /// ended after its last write.
    /// The remote party transfers the device (the core accepted its REFER): a new call ref,
    /// `TransferRequested` to the device, and a new outgoing call from the device to `target`
    /// with this call's media, whose progress comes back here. Refs are taken as incoming
    /// calls' are (high bit set), so they never clash with refs the device chooses.
    fn place_transfer(&mut self, target: thalamus_sip::message::Uri, referred_by: String) {
        let inner = self.inner.clone();
        let device = self.key.0.clone();
        let mut new_ref = 0;
        for _ in 0..16 {
            new_ref = 0x8000_0000
                | inner
                    .next_incoming_ref
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let candidate = (device.clone(), new_ref);
            if !inner.calls.contains_key(&candidate) && !inner.watched.contains_key(&candidate) {
                break;
            }
        }
        inner.to_device(
            &device,
            0,
            Body::TransferRequested(thalamus_proto::v1::TransferRequested {
                call_ref: self.key.1,
                new_call_ref: new_ref,
                target: target.to_string(),
                referred_by,
            }),
        );
        spawn(
            inner,
            (device, new_ref),
            CallSetup::Outgoing {
                target,
                media: self.core.device_media(),
                headers: std::collections::BTreeMap::new(),
                transfer_of: Some(self.key.clone()),
            },
        );
    }

    async fn finish(&mut self, tombstone: bool) {
        self.publish();
        if let Some((tx, in_progress)) = self.incoming.take() {
            self.inner.by_invite.remove(&tx);
            drop(in_progress);
            // A ringing call another node took over: its INVITE is that node's to answer.
            if !self.core.summary().owned_at_end {
                let _ = self.inner.ua.abandon(tx).await;
            }
        }
        // Nothing reaches the call from now on; what already did is answered (a BYE that
        // crossed ours 200, anything else 481), not left to time out.
        self.inner.forget_call(&self.key);
        crate::watchers::changed(&self.inner, &self.key.0);
        self.rx.close();
        while let Ok(command) = self.rx.try_recv() {
            if let CallCommand::SipRequest(tx, request) = *command {
                let status = if request.method == Method::Bye {
                    200
                } else {
                    481
                };
                if request.method != Method::Ack {
                    let _ = self.inner.ua.respond(tx, status, None, None).await;
                }
            }
        }
        let streams = match self.relays.take() {
            Some(relays) => relays.stop().await,
            None => Vec::new(),
        };
        if let Ok(mut input) = self.media_input.lock() {
            *input = None;
        }
        let stats = streams
            .iter()
            .find(|(stream, _)| *stream == StreamId::AUDIO)
            .map(|(_, stats)| stats);
        if let Some(audio) = stats {
            // The final statistics follow the end event (same call_ref, state ENDED): the
            // audio stream's in `stats`, every stream's in `streams` (docs/protocol.md).
            let ev = CallEvent {
                call_ref: self.key.1,
                state: CallState::Ended as i32,
                stats: Some(MediaStats::from(audio)),
                streams: streams
                    .iter()
                    .map(|(stream, stats)| MediaStats {
                        stream_id: u32::from(stream.0),
                        ..MediaStats::from(stats)
                    })
                    .collect(),
                reason: "media statistics".into(),
                ..Default::default()
            };
            self.inner.to_device(&self.key.0, 0, Body::CallEvent(ev));
        }
        let dialog = self.core.dialog().cloned();
        self.write_call_record(dialog.as_ref(), stats);
        if let Some(dialog) = &dialog {
            let _ = self.inner.ua.remove_dialog(dialog).await;
        }
        // The record ends after its last write (which finds no dialog to export if it had not
        // run yet, and then writes nothing); a node that lost the call leaves it to the owner.
        let tombstone = tombstone && self.core.summary().owned_at_end;
        let pending = self.pending_write.take();
        if let (true, Some(dialog), Some(replicator)) = (tombstone, &dialog, &self.inner.replicator)
        {
            if let Some(pending) = pending {
                let _ = pending.await;
            }
            if let Err(e) = replicator.remove(key_of_dialog(dialog)) {
                debug!(error = %e, "dialog end not replicated");
            }
        }
    }
}

impl Driver {
    /// Hands the call's record (CDR) to the writer, when this node still owns the call (a
    /// node that lost it to another leaves the record to that node).
    fn write_call_record(
        &self,
        dialog: Option<&DialogId>,
        stats: Option<&thalamus_media::RelayStats>,
    ) {
        let Some(records) = &self.inner.records else {
            return;
        };
        let s = self.core.summary();
        if !s.owned_at_end {
            return;
        }
        let now = wall_ms();
        let ended = s.ended_ms.unwrap_or(now);
        let started = s.started_ms.unwrap_or(ended);
        records.record(thalamus_cdr::CallRecord {
            v: thalamus_cdr::SCHEMA_VERSION,
            call_id: dialog.map(|d| d.call_id.clone()),
            device: self.key.0.clone(),
            call_ref: self.key.1,
            direction: if s.outgoing {
                thalamus_cdr::Direction::Outgoing
            } else {
                thalamus_cdr::Direction::Incoming
            },
            peer: s.remote_uri,
            start: thalamus_cdr::CallRecord::time(started),
            answer: s.answered_ms.map(thalamus_cdr::CallRecord::time),
            end: thalamus_cdr::CallRecord::time(ended),
            duration_ms: s.answered_ms.map_or(0, |a| ended.saturating_sub(a)),
            end_reason: s
                .end_reason
                .as_str_name()
                .trim_start_matches("END_REASON_")
                .to_ascii_lowercase(),
            sip_status: u16::try_from(s.sip_status).ok().filter(|&st| st != 0),
            reason: s.reason,
            nodes: s.owners,
            taken_over: s.taken_over,
            media: stats.map(|st| thalamus_cdr::MediaSummary {
                packets_sent: st.to_peer.packets,
                packets_received: st.from_peer.flow.packets,
                packets_lost: st.from_peer.lost,
                jitter_us: u64::try_from(st.from_peer.jitter.as_micros()).unwrap_or(u64::MAX),
            }),
        });
    }
}

/// Milliseconds since the Unix epoch by the system clock (the call record's times).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
