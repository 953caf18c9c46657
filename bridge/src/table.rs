//! What the bridge keeps of each call it runs ([`CallHandle`]: the commands it sends the
//! call's task, the state the task shows, the media input), and the commands a call's task is
//! told ([`CallCommand`]); and of each device's watch of a SIP buddy ([`WatchHandle`]). The
//! tasks themselves are `crate::call` and `crate::buddies`.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use thalamus_ingress::DeviceLink;
use thalamus_proto::media::StreamId;
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::CallState;
use thalamus_sip::dialog::DialogId;
use thalamus_sip::message::Request;
use thalamus_sip::ua::ServerTx;
use tokio::sync::mpsc;

/// A device's watch of a SIP buddy, as the bridge reaches its task (`crate::buddies`).
#[derive(Debug, Clone)]
pub struct WatchHandle {
    /// Tells this watch from a later one of the same device and buddy.
    pub id: u64,
    /// The NOTIFYs of the watch's dialog, for the task to answer.
    pub notifies: mpsc::Sender<(ServerTx, Box<Request>)>,
    /// Cancelled when the device unwatches or leaves (apart from the NOTIFYs: a flood of
    /// them cannot hold it back).
    pub unwatch: tokio_util::sync::CancellationToken,
}

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
    /// The caller never PRACKed the ringing (the INVITE was answered 504).
    PrackTimeout,
    /// The call placed for this call's transfer progressed (SIP status, reason).
    TransferProgress(u16, String),
    /// Another call of the device, answered now, replaces the call of this dialog (RFC 3891).
    Replaced(thalamus_sip::dialog::DialogId),
    /// Our 2xx was never acknowledged.
    AckTimeout,
    /// The device did not come back after losing its session.
    DeviceGone,
    /// The device's session came back on a new connection: media goes there now.
    DeviceLink(DeviceLink),
    /// Another node took the dialog over (a replication conflict): drop it without a BYE.
    OwnershipLost,
    /// Write the record again (the store answers again; or it lost our record and holds this
    /// version of it, still ours).
    Rereplicate(Option<u64>),
}

/// What the bridge can read of a call without asking its task.
#[derive(Debug)]
pub(crate) struct CallShared {
    pub(crate) dialog: Option<DialogId>,
    pub(crate) remote_uri: String,
    pub(crate) state: CallState,
    /// When the call's task started on this node.
    pub(crate) since: tokio::time::Instant,
    /// When it was first seen answered (on this node).
    pub(crate) answered: Option<tokio::time::Instant>,
    /// Probes of the call's media relays, by stream (empty while it has none).
    pub(crate) probes: Vec<(StreamId, thalamus_media::StatsProbe)>,
}

/// How one stream of a call fares on the SIP leg, as the operator console shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MediaQuality {
    /// The stream (audio, video, signal data).
    pub stream: StreamId,
    /// RTP packets received from the peer.
    pub packets_received: u64,
    /// Of the peer's packets, those missing by sequence number.
    pub packets_lost: u64,
    /// Interarrival jitter of the peer's media.
    pub jitter: std::time::Duration,
    /// Round trip to the peer from its RTCP, when known.
    pub round_trip: Option<std::time::Duration>,
}

/// The bridge's handle on a call task.
#[derive(Debug)]
pub struct CallHandle {
    /// Boxed commands: a queue allocates its slots in blocks up front, and a command carrying
    /// a SIP request is ~10 times the size of a pointer.
    commands: mpsc::Sender<Box<CallCommand>>,
    shared: Arc<Mutex<CallShared>>,
    media_input: SharedInput,
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

    /// How long the call has been on this node, and how long it has been answered.
    pub fn ages(&self) -> (std::time::Duration, Option<std::time::Duration>) {
        let now = tokio::time::Instant::now();
        self.shared
            .lock()
            .map_or((std::time::Duration::ZERO, None), |s| {
                (
                    now.saturating_duration_since(s.since),
                    s.answered.map(|at| now.saturating_duration_since(at)),
                )
            })
    }

    /// Probes of the call's media relays (none while it has no media).
    pub(crate) fn probes(&self) -> Vec<(StreamId, thalamus_media::StatsProbe)> {
        self.shared
            .lock()
            .map(|s| s.probes.clone())
            .unwrap_or_default()
    }

    /// The call's state as last reported.
    pub fn state(&self) -> CallState {
        self.shared
            .lock()
            .map(|s| s.state)
            .unwrap_or(CallState::Unspecified)
    }

    /// Whether the call is answered (on hold or resumed included): its dialog is confirmed.
    pub fn is_answered(&self) -> bool {
        matches!(
            self.state(),
            CallState::Answered | CallState::Held | CallState::Resumed
        )
    }

    /// Feeds a media datagram from the device to the call's relay.
    pub fn feed(&self, datagram: Bytes) {
        if let Ok(guard) = self.media_input.lock() {
            if let Some(input) = guard.as_ref() {
                input.feed(datagram);
            }
        }
    }
}

/// The media inputs a call's relays take device datagrams through, shared with its handle.
pub(crate) type SharedInput = Arc<Mutex<Option<crate::call::relays::StreamInputs>>>;

/// Builds a handle and the state it shares with the task.
pub(crate) fn handle(
    remote_uri: String,
    dialog: Option<DialogId>,
    state: CallState,
) -> (
    CallHandle,
    mpsc::Receiver<Box<CallCommand>>,
    Arc<Mutex<CallShared>>,
    SharedInput,
) {
    let (commands, rx) = mpsc::channel(64);
    let shared = Arc::new(Mutex::new(CallShared {
        dialog,
        remote_uri,
        state,
        since: tokio::time::Instant::now(),
        answered: None,
        probes: Vec::new(),
    }));
    let media_input = Arc::new(Mutex::new(None));
    (
        CallHandle {
            commands,
            shared: shared.clone(),
            media_input: media_input.clone(),
        },
        rx,
        shared,
        media_input,
    )
}
