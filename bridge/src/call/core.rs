//! The call, sans-IO: one bridged call's protocol logic as a state machine.
//!
//! [`CallCore`] is fed [`CallInput`]s (device frames, SIP responses to the transactions it
//! started, requests in its dialog, ACK, CANCEL, write-ahead results, the media timeout) and
//! timestamps, and returns [`CallAction`]s (frames for the device, SIP requests and responses
//! to send, relay changes, store writes, counters, the end). It owns the call's rules: set-up
//! both ways, answer, reject, CANCEL crossing 200, hold and resume, DTMF in the media or by
//! INFO, re-INVITEs from the peer (491 while our own is pending), BYE from either side (BYE
//! crossing BYE), the no-answer and ACK timeouts, replication (the early record at the first
//! 180 under `early-and-confirmed`, the record when confirmed, after target refreshes, and the
//! local CSeq written ahead of every request), ownership lost to another node, the
//! continuation of a dialog taken over from another node (its media re-INVITE), and of a
//! ringing call whose INVITE this node adopted ([`CallCore::adopted`]).
//!
//! Like `quinn_proto::Connection`, it does no I/O and reads no clock: the driver in
//! [`super::driver`] carries out the actions with the user agent, the relay and the
//! replicator, feeds back what happened, and calls [`CallCore::handle_timeout`] at
//! [`CallCore::poll_timeout`]. Three actions want an answer before the core goes on:
//! [`CallAction::StartRelay`] ([`CallCore::relay_started`]), [`CallAction::WriteAhead`]
//! ([`CallInput::WriteAheadDone`]) and a [`CallAction::Respond`] with `report`
//! ([`CallInput::Responded`]). Everything is deterministic: the SDP session id is given, and
//! the same inputs give the same actions.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thalamus_dialog_store::{NegotiatedMedia, StoredDialog};
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{
    CallEvent, CallState, EndReason, ErrorCode, IncomingCall, MediaOffer, TextReceived,
    TransferStatus,
};
use thalamus_sip::dialog::DialogId;
use thalamus_sip::endpoint::RELIABLE_TAG;
use thalamus_sip::message::{HeaderName, MediaType, Method, Request, Uri};
use thalamus_sip::sdp::{
    Direction, HoldMode, LocalMedia, MediaKind, RemoteMedia, SdpSession, SessionDescription,
    SrtpPolicy,
};
use thalamus_sip::session_timer::{
    Negotiated, Refresher, SessionExpires, SessionTimer, TimerConfig, TimerDue, UasTimer,
    OPTION_TAG,
};
use thalamus_sip::ua::ServerTx;

use crate::dialogs::{CallAppData, CallFacts, StoredTimer};
use crate::mapping::{call_event, ended_by, ended_by_status, reject_status, state_for_provisional};
use crate::media_sdp::{self, RtcpMux, StreamKeys, StreamPorts};
use thalamus_proto::media::StreamId;

/// Methods the gateway answers (Allow header).
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, MESSAGE, UPDATE, PRACK, NOTIFY";

/// A call's address: the device and its call reference.
pub type CallKey = (String, u32);

/// A client transaction the core started, by the number it gave it.
pub type TxId = u32;

/// What a call is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSettings {
    /// This node's id (the owner in records).
    pub node_id: String,
    /// How long an incoming call rings before it is answered 480.
    pub no_answer_timeout: Duration,
    /// Whether confirmed dialogs are replicated (a replicator runs).
    pub replicate: bool,
    /// Whether an incoming call's early dialog is replicated too (`early-and-confirmed`).
    pub replicate_early: bool,
    /// After a takeover, re-INVITE the peer so media follows.
    pub reinvite_after_takeover: bool,
    /// The address written into SDP when the relay has none of its own (or there is no relay).
    pub media_address: IpAddr,
    /// Session timers (RFC 4028) on the SIP leg; `None`: none are asked for or granted.
    pub session_timer: Option<TimerConfig>,
    /// Reliable provisional responses (RFC 3262): offered on calls devices place
    /// (`Supported: 100rel`) and used on calls they take when the caller supports them.
    pub reliable_provisionals: bool,
    /// SRTP toward the peer (SDES): never, when offered, or always.
    pub srtp: SrtpPolicy,
}

/// The relays' local media address, as the driver reports it after [`CallAction::StartRelay`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAddr {
    /// Address for SDP.
    pub ip: IpAddr,
    /// The RTP port of each stream's relay.
    pub ports: StreamPorts,
    /// This side's SRTP keys for the streams, fresh for these relays (the driver draws them;
    /// the core stays deterministic).
    pub keys: StreamKeys,
}

/// The streams besides audio that get a relay of their own ([`CallAction::StartRelay`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayStreams {
    /// A video relay: the device has video codecs (and the peer's offer, if any, has video).
    pub video: bool,
    /// A signal data relay: the device has the stream (and the peer's offer, if any, has it).
    pub signal: bool,
    /// The relays to start with RTCP on their RTP port (one socket, RFC 5761): those whose
    /// stream the peer's offer, when answering one, multiplexes (`a=rtcp-mux`). Our own
    /// offers do not ask for it, so their relays have both ports.
    pub rtcp_mux: RtcpMux,
}

/// What caused a takeover (and so what the call does first once its relay runs).
#[derive(Debug, Clone, PartialEq)]
pub enum TakeoverTrigger {
    /// A request for the dialog arrived (UAS mode); the driver delivers it again as a
    /// [`CallInput::PeerRequest`]. Its answer is timed from `arrived`.
    Request {
        /// Its method.
        method: Method,
        /// When it arrived.
        arrived: Instant,
    },
    /// The device resumed its session here.
    DeviceResume,
    /// The API or admin endpoint asked.
    Api,
    /// A device command for a call held elsewhere (UAC mode), carried out once the call runs.
    DeviceCommand {
        /// The device's request id.
        request_id: u64,
        /// The command.
        body: Body,
    },
    /// End the dialog from here (UAC mode): BYE.
    Hangup,
    /// The caller cancelled a ringing call whose node died (its CANCEL reached this node
    /// before the device did): the call is adopted as for a resume, and the CANCEL, delivered
    /// again, ends it (200, 487).
    Cancel,
}

/// A stored dialog this node claimed and imported, as [`CallCore::taken_over`] continues it.
#[derive(Debug, Clone)]
pub struct ClaimedDialog<'a> {
    /// The claimed record (owner: this node).
    pub record: &'a StoredDialog,
    /// The remote party to show the device.
    pub remote_uri: String,
    /// Whether the gateway was the dialog's UAC (the fallback for who placed the call).
    pub uac: bool,
    /// The imported dialog.
    pub dialog: DialogId,
    /// What caused the takeover.
    pub trigger: TakeoverTrigger,
    /// The node that owned the dialog before the claim (for the call record).
    pub previous_owner: String,
}

/// What a write of the local CSeq ahead of a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAhead {
    /// Written: send the request.
    Written,
    /// Another node owns the dialog: do not send it.
    Lost,
    /// Not written in time, or the store failed, while this node's fence says no other node
    /// can have claimed the dialog: send it anyway.
    Failed,
    /// Not written, and this node cannot be sure no other node claimed the dialog (its lease
    /// or its place in the live set is unconfirmed): do not send it. Hold and DTMF are refused
    /// (the device may try again); a BYE is tried again every second, and the call is given up
    /// here without one after [`MAX_FENCED_TRIES`].
    Fenced,
}

/// A refresh refused 491 (glare) is tried again this much later (RFC 3261 section 14.1: 2.1 to
/// 4 s for the owner of the Call-ID; fixed, so the core stays deterministic).
pub const REFRESH_GLARE_RETRY: Duration = Duration::from_secs(3);

/// Write-aheads of a BYE tried while fenced before the call is given up here (its record stays
/// for whichever node holds the dialog).
pub const MAX_FENCED_TRIES: u32 = 30;
/// Time between those tries.
pub const FENCED_RETRY: Duration = Duration::from_secs(1);

/// What happened to a request the core sent.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientOutcome {
    /// A response (provisional or final).
    Response {
        /// Status.
        status: u16,
        /// Reason phrase.
        reason: String,
        /// Body (SDP, for INVITE).
        body: Bytes,
        /// The dialog it created or belongs to.
        dialog: Option<DialogId>,
        /// Its Session-Expires (RFC 4028), if any.
        session_expires: Option<SessionExpires>,
        /// Whether its Allow names UPDATE.
        allows_update: bool,
    },
    /// No final response (timer B/F): as 408.
    Timeout,
    /// The transport failed, or the request could not be sent (with why).
    Failed(String),
}

/// What the driver feeds the core.
#[derive(Debug, Clone, PartialEq)]
pub enum CallInput {
    /// A frame from the device for this call (request id, body).
    Device(u64, Body),
    /// The device did not come back after losing its session.
    DeviceGone,
    /// A request from the peer within the dialog.
    PeerRequest(ServerTx, Box<Request>),
    /// What became of a request the core sent.
    Client(TxId, ClientOutcome),
    /// The answer to a [`CallAction::Respond`] with `report`: the dialog the response created
    /// or confirmed (none when the transaction was gone, e.g. cancelled just before).
    Responded(ServerTx, u16, Option<DialogId>),
    /// The ACK of our 2xx.
    Ack,
    /// The caller cancelled (the user agent answered the INVITE 487).
    Cancelled,
    /// The caller never PRACKed the reliable 180 (the user agent answered the INVITE 504).
    PrackTimeout,
    /// Our 2xx was never acknowledged.
    AckTimeout,
    /// The result of a [`CallAction::WriteAhead`].
    WriteAheadDone(WriteAhead),
    /// No media from the peer within the media timeout.
    MediaTimeout,
    /// Another node took the dialog over (a replication conflict): drop it without a BYE.
    OwnershipLost,
    /// How the call placed for the peer's transfer goes: its SIP status (1xx, 2xx, or the
    /// final error) and reason.
    TransferProgress(u16, String),
    /// Another call of the device, answered now, replaces the call of this dialog (RFC 3891):
    /// BYE, when it is still this call's dialog.
    Replaced(DialogId),
    /// Write the confirmed dialog's record again: the store answers again after an outage
    /// (writes during it failed), or it lost our record (a Redis restart without persistence, an
    /// older snapshot) and holds this version of it, still ours (`Some`: write over it), or
    /// none (`None`: as before).
    Rereplicate(Option<u64>),
}

/// How an incoming call stands to the device's other calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtherCalls {
    /// The device already has a call (call waiting).
    pub call_waiting: bool,
    /// The device's answered call this one replaces (its INVITE's Replaces, RFC 3891), with
    /// its dialog: ended once this one is answered.
    pub replaces: Option<(u32, DialogId)>,
}

/// A change to the call's media relay.
#[derive(Debug, Clone, PartialEq)]
pub enum RelayOp {
    /// The relay of this stream sends to this remote media (from the peer's SDP), with these
    /// SRTP keys (`None`: plain RTP).
    SetRemote(StreamId, Box<RemoteMedia>, Option<thalamus_media::SrtpKeys>),
    /// Our side's direction (sendonly while the device holds the call).
    Direction(Direction),
    /// Feed these datagrams in as if the device had sent them (RFC 4733 DTMF).
    Inject(Vec<Bytes>),
    /// Ask the peer for a key frame of the call's video (RTCP PLI from the video relay).
    RequestKeyframe,
    /// Stop the relay of this stream (never audio): the negotiation refused the stream, so
    /// its ports go back to the pool. Later offers keep its m-line at port 0.
    Stop(StreamId),
}

/// A counter the core asks the driver to bump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallCount {
    /// A call ended, with its reason label (`calls_ended`).
    Ended(&'static str),
    /// The dialog was dropped because another node owns it (`dialogs_lost`).
    DialogLost,
    /// The call was answered this long after it started (`call_setup_seconds`), with its
    /// direction label.
    SetUp(&'static str, Duration),
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum CallAction {
    /// Send a frame to the device (request id 0 for events the gateway originates).
    ToDevice {
        /// Request id.
        request_id: u64,
        /// The frame.
        body: Body,
    },
    /// Start the call's media relays (audio, and these), then call
    /// [`CallCore::relay_started`].
    StartRelay(RelayStreams),
    /// Change the relay.
    Relay(RelayOp),
    /// The call's dialog is this one now (route its requests here).
    SetDialog(DialogId),
    /// Send the call's INVITE (with digest answers), from the device's address-of-record.
    SendInvite {
        /// The transaction's number.
        tx: TxId,
        /// Request-URI and To.
        target: Uri,
        /// Extra headers (Allow, the device's X- headers).
        headers: Vec<(HeaderName, String)>,
        /// The SDP offer.
        sdp: String,
    },
    /// CANCEL this INVITE.
    Cancel {
        /// The INVITE's transaction.
        tx: TxId,
    },
    /// ACK a 2xx in this dialog.
    Ack {
        /// The dialog.
        dialog: DialogId,
    },
    /// Send a request in the dialog.
    SendInDialog {
        /// The transaction's number.
        tx: TxId,
        /// The dialog.
        dialog: DialogId,
        /// The method.
        method: Method,
        /// Its body.
        body: Option<(Bytes, MediaType)>,
        /// Extra headers (the session timer's).
        headers: Vec<(HeaderName, String)>,
    },
    /// Answer a request.
    Respond {
        /// Its transaction.
        tx: ServerTx,
        /// Status.
        status: u16,
        /// Reason phrase (the default for the status when none).
        reason: Option<String>,
        /// Body.
        body: Option<(Bytes, MediaType)>,
        /// Extra headers.
        headers: Vec<(HeaderName, String)>,
        /// Feed back [`CallInput::Responded`] with the dialog.
        report: bool,
    },
    /// This call, answered, replaces the device's call with this ref and dialog (RFC 3891):
    /// end it ([`CallInput::Replaced`]).
    EndReplaced(u32, DialogId),
    /// The peer transfers the device (its REFER was accepted): tell the device
    /// (`TransferRequested`) and place a new call from it to `target` with this call's media;
    /// its progress comes back as [`CallInput::TransferProgress`].
    PlaceTransfer {
        /// Where to.
        target: Uri,
        /// Who asked.
        referred_by: String,
    },
    /// The incoming INVITE has its final response (forget its transaction and merge key).
    InviteSettled,
    /// Write the next local CSeq ahead of a request, then feed [`CallInput::WriteAheadDone`].
    WriteAhead(Box<CallFacts>),
    /// Write the confirmed dialog's record (after what was written before), without waiting.
    Replicate(Box<CallFacts>),
    /// Write the incoming call's early record (its INVITE, with the To tag of the early dialog
    /// just created), without waiting.
    ReplicateEarly(Box<CallFacts>),
    /// Bump a counter.
    Count(CallCount),
    /// The request that caused a takeover is answered, this long after it arrived.
    TakeoverAnswered(Duration),
    /// Something an operator wants in the log (a fixed sentence).
    Note(&'static str),
    /// The call is over: stop the relay (its statistics go to the device), forget the dialog,
    /// and with `tombstone` end the stored record.
    Close {
        /// End the stored record (this node wrote it and still owns it).
        tombstone: bool,
    },
}

/// An in-dialog operation the core started.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    /// Hold (true) or resume (false), by re-INVITE.
    Hold { request_id: u64, hold: bool },
    /// DTMF by INFO.
    Info { request_id: u64 },
    /// The re-INVITE after a takeover, so media follows.
    MediaReinvite,
    /// BYE.
    Bye { reason: EndReason },
    /// A session refresh (RFC 4028): UPDATE, or a re-INVITE with the SDP unchanged.
    Refresh { update: bool },
    /// A blind transfer the device asked for (RFC 3515): REFER to `target`.
    Refer { request_id: u64, target: String },
    /// A NOTIFY of the transfer the peer asked for: its sipfrag, and whether it is the last.
    Notify { sipfrag: String, last: bool },
}

#[derive(Debug, Clone, PartialEq)]
enum Stage {
    /// Waiting for the write ahead; then send this.
    WriteAhead {
        method: Method,
        body: Option<(Bytes, MediaType)>,
    },
    /// Sent as this transaction.
    InFlight(TxId),
    /// The write ahead was fenced: try it again at `retry_at` (the `tries`th try so far).
    Fenced {
        method: Method,
        body: Option<(Bytes, MediaType)>,
        retry_at: Instant,
        tries: u32,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct Pending {
    op: Op,
    stage: Stage,
}

/// What waits for the relay to start.
#[derive(Debug, Clone, PartialEq)]
enum AfterRelay {
    Dial {
        target: Uri,
        headers: BTreeMap<String, String>,
    },
    Answer,
    Takeover {
        remote_sdp: String,
        trigger: TakeoverTrigger,
    },
}

/// Where the call is.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Outgoing: the INVITE is out (or about to be); waiting for its final response.
    Dialling {
        tx: Option<TxId>,
        hangup_requested: bool,
    },
    /// Incoming: offered to the device.
    Ringing {
        tx: ServerTx,
        offer: Option<Box<SessionDescription>>,
        deadline: Instant,
        /// The 200 went out; waiting to hear whether it made the dialog.
        answering: Option<Box<SessionDescription>>,
    },
    /// Answered: until either side hangs up.
    Up,
    /// Over.
    Ended,
}

/// The replication facts of the call.
#[derive(Debug, Default, Clone, PartialEq)]
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
    /// When the request that caused a takeover arrived (its answer is timed).
    takeover_arrived: Option<Instant>,
    /// Re-INVITE the peer once the request that caused the takeover is answered.
    reinvite_pending: bool,
}

/// One call's protocol logic. See the module notes.
#[derive(Debug)]
pub struct CallCore {
    key: CallKey,
    settings: CallSettings,
    phase: Phase,
    /// The state last reported to the device (what `live_calls` lists).
    state: CallState,
    remote_uri: String,
    outgoing: bool,
    dialog: Option<DialogId>,
    sdp: SdpSession,
    device_media: Option<MediaOffer>,
    relay: Option<RelayAddr>,
    after_relay: Option<AfterRelay>,
    telephone_event: bool,
    /// Timestamp of the next synthesised telephone-event (device link clock, 8 kHz).
    dtmf_timestamp: u32,
    held: bool,
    /// The end event went to the device.
    ended: bool,
    replica: Replica,
    pending: Option<Pending>,
    /// Fenced tries of the write ahead in progress.
    fenced_tries: u32,
    /// Device commands that arrived while an operation was pending, in order.
    deferred: VecDeque<(u64, Body)>,
    /// A BYE the gateway decided on (a timeout) while another request was pending: sent when
    /// that one is done.
    bye_after: Option<EndReason>,
    next_tx: TxId,
    actions: VecDeque<CallAction>,
    /// What the call's record (CDR) needs.
    record: RecordFacts,
    /// The session timer (RFC 4028) of the answered call.
    timer: Option<SessionTimer>,
    /// The session timer an incoming INVITE negotiated, running once its 2xx confirms the call.
    timer_offer: Option<Negotiated>,
    /// A session timer read from a record taken over, running once the relay does.
    timer_restored: Option<StoredTimer>,
    /// A refresh is due and waits for the request in flight.
    refresh_due: bool,
    /// A refresh refused 491 is tried again then.
    refresh_retry: Option<Instant>,
    /// The peer's Allow names UPDATE (refreshes use it, without a body).
    peer_allows_update: bool,
    /// The device's transfer whose REFER was accepted: the request id its NOTIFYs report to.
    transfer: Option<u64>,
    /// A transfer whose last NOTIFY came before the 2xx to its REFER (RFC 3515 allows the
    /// NOTIFY first): that 2xx then starts nothing.
    transfer_over_early: Option<u64>,
    /// The call ends because its transfer succeeded.
    transferred: bool,
    /// The device's call this incoming call replaces (RFC 3891), and its dialog; ended once
    /// this one is answered.
    replaces: Option<(u32, DialogId)>,
    /// This call was replaced by another (its end says so).
    replaced: bool,
    /// The device follows transfers its remote party asks for (MBFP revision 2).
    takes_transfers: bool,
    /// The transfer the peer asked for: the NOTIFYs still to send (sipfrag, last), and
    /// whether it succeeded.
    referral: Option<Referral>,
}

/// A transfer the peer asked for (its REFER accepted).
#[derive(Debug, Default)]
struct Referral {
    /// The REFER kept its implicit subscription: progress is reported in NOTIFYs. False for
    /// `Refer-Sub: false` (RFC 4488): nothing is reported, and a success ends this call.
    subscribed: bool,
    notifies: VecDeque<(String, bool)>,
    succeeded: bool,
    /// The last NOTIFY went (or is queued): later progress is not reported.
    finished: bool,
}

/// What the call record needs that the call's rules do not: wall-clock times, the nodes that
/// owned the call, how it ended.
#[derive(Debug, Clone, Default, PartialEq)]
struct RecordFacts {
    /// The driver's wall clock: this instant was this many ms since the Unix epoch.
    wall: Option<(Instant, u64)>,
    /// The latest `now` the core was given.
    now: Option<Instant>,
    started_ms: Option<u64>,
    answered_ms: Option<u64>,
    ended_ms: Option<u64>,
    /// The nodes that owned the call before this one (from the record after a takeover).
    owners_before: Vec<String>,
    taken_over: bool,
    /// The end event: reason, SIP status, reason text.
    end: Option<(EndReason, u32, String)>,
    /// The last error status (>= 300) the core answered a request with.
    last_error_sent: Option<u16>,
}

/// Most owners a record carries: the first and the latest ones (a call taken over again and
/// again, by rolling restarts say, must not outgrow the record's application data).
const MAX_OWNERS_KEPT: usize = 16;

/// The header fields of a 2xx that grants session timer `n`: Session-Expires (and Require:
/// timer when the peer refreshes), and Supported: timer.
fn timer_answer_headers(n: Negotiated) -> Vec<(HeaderName, String)> {
    let mut headers = n.answer_headers();
    headers.push((HeaderName::Supported, OPTION_TAG.to_string()));
    headers
}

/// The status code and reason phrase of a message/sipfrag body's status line
/// (`SIP/2.0 200 OK`), RFC 3420.
fn sipfrag_status(body: &[u8]) -> Option<(u16, String)> {
    let text = std::str::from_utf8(body).ok()?;
    let line = text.lines().next()?.trim();
    let rest = line.strip_prefix("SIP/2.0 ")?;
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    let code: u16 = code.parse().ok()?;
    (100..700)
        .contains(&code)
        .then(|| (code, reason.trim().to_string()))
}

/// Whether `request`'s Allow names UPDATE.
fn allows_update(request: &Request) -> bool {
    request
        .headers
        .allow()
        .is_ok_and(|methods| methods.contains(&Method::Update))
}

/// `owners`, at most [`MAX_OWNERS_KEPT`]: the first, then the latest.
pub(crate) fn capped_owners(owners: &[String]) -> Vec<String> {
    if owners.len() <= MAX_OWNERS_KEPT {
        return owners.to_vec();
    }
    let mut kept = vec![owners[0].clone()];
    kept.extend_from_slice(&owners[owners.len() - (MAX_OWNERS_KEPT - 1)..]);
    kept
}

/// A finished call as its record (CDR) tells it ([`CallCore::summary`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CallSummary {
    /// The device placed the call (false: it came from SIP).
    pub outgoing: bool,
    /// The remote party.
    pub remote_uri: String,
    /// When the call started (ms since the Unix epoch; the first owner's clock after a
    /// takeover). `None` without a wall clock ([`CallCore::set_wall_clock`]).
    pub started_ms: Option<u64>,
    /// When it was answered, if it was.
    pub answered_ms: Option<u64>,
    /// When it ended here.
    pub ended_ms: Option<u64>,
    /// How it ended.
    pub end_reason: EndReason,
    /// The SIP status that ended it (a final error answer of the set-up), 0 when none.
    pub sip_status: u32,
    /// The reason text the device was given.
    pub reason: String,
    /// Every node that owned the call, in order, this one last.
    pub owners: Vec<String>,
    /// Whether this node took the call over from another.
    pub taken_over: bool,
    /// Whether this node still owned the dialog at the end (false: another node took it
    /// over, and that node writes the record).
    pub owned_at_end: bool,
}

impl CallCore {
    fn new(
        key: CallKey,
        settings: CallSettings,
        sdp_session_id: u64,
        phase: Phase,
        remote_uri: String,
        outgoing: bool,
    ) -> Self {
        Self {
            key,
            settings,
            phase,
            state: CallState::Trying,
            remote_uri,
            outgoing,
            dialog: None,
            sdp: SdpSession::new(sdp_session_id),
            device_media: None,
            relay: None,
            after_relay: None,
            telephone_event: false,
            dtmf_timestamp: 0x4000_0000,
            held: false,
            ended: false,
            replica: Replica::default(),
            pending: None,
            fenced_tries: 0,
            deferred: VecDeque::new(),
            bye_after: None,
            next_tx: 1,
            actions: VecDeque::new(),
            record: RecordFacts::default(),
            timer: None,
            timer_offer: None,
            timer_restored: None,
            refresh_due: false,
            refresh_retry: None,
            peer_allows_update: false,
            transfer: None,
            transfer_over_early: None,
            transferred: false,
            replaces: None,
            replaced: false,
            takes_transfers: false,
            referral: None,
        }
    }

    /// Whether the device follows transfers its remote party asks for (set from its session,
    /// again when it reconnects).
    pub fn set_takes_transfers(&mut self, takes: bool) {
        self.takes_transfers = takes;
    }

    /// The media the device offered or accepted (what a call placed for a transfer offers).
    pub fn device_media(&self) -> Option<MediaOffer> {
        self.device_media.clone()
    }

    /// Gives the core the driver's wall clock: `now` is `unix_ms` ms since the Unix epoch.
    /// Call it once, before the first input; the record's times are read from it (without it
    /// they are `None`). A fresh call starts now; a call taken over keeps its first start.
    pub fn set_wall_clock(&mut self, now: Instant, unix_ms: u64) {
        self.record.wall = Some((now, unix_ms));
        self.record.now = Some(now);
        if self.record.started_ms.is_none() {
            self.record.started_ms = Some(unix_ms);
        }
    }

    /// The wall-clock time of `at`, in ms since the Unix epoch.
    fn wall_ms_at(&self, at: Instant) -> Option<u64> {
        let (origin, origin_ms) = self.record.wall?;
        let ms = |d: Duration| u64::try_from(d.as_millis()).ok();
        if at >= origin {
            Some(origin_ms.saturating_add(ms(at - origin)?))
        } else {
            Some(origin_ms.saturating_sub(ms(origin - at)?))
        }
    }

    /// The wall-clock time of the latest `now`, in ms since the Unix epoch.
    fn wall_ms(&self) -> Option<u64> {
        let (origin, origin_ms) = self.record.wall?;
        let now = self.record.now.unwrap_or(origin);
        let since = u64::try_from(now.saturating_duration_since(origin).as_millis()).ok()?;
        Some(origin_ms.saturating_add(since))
    }

    fn tick(&mut self, now: Instant) {
        if self.record.now.is_none_or(|t| now > t) {
            self.record.now = Some(now);
        }
    }

    /// The call as its record tells it: meaningful once [`CallCore::is_closed`].
    pub fn summary(&self) -> CallSummary {
        let (end_reason, status, reason) =
            self.record
                .end
                .clone()
                .unwrap_or((EndReason::Unspecified, 0, String::new()));
        // A set-up that failed on our own answer (a rejected or unanswered incoming call)
        // has the status we sent.
        let sip_status = if status == 0 && self.record.answered_ms.is_none() {
            self.record.last_error_sent.map_or(0, u32::from)
        } else {
            status
        };
        let mut owners = self.record.owners_before.clone();
        if owners.last() != Some(&self.settings.node_id) {
            owners.push(self.settings.node_id.clone());
        }
        CallSummary {
            outgoing: self.outgoing,
            remote_uri: self.remote_uri.clone(),
            started_ms: self.record.started_ms,
            answered_ms: self.record.answered_ms,
            ended_ms: self.record.ended_ms,
            end_reason,
            sip_status,
            reason,
            owners,
            taken_over: self.record.taken_over,
            owned_at_end: !self.replica.lost,
        }
    }

    /// A call the device places to `target` with its codecs and extra headers: starts the
    /// relay, then sends the INVITE.
    pub fn outgoing(
        key: CallKey,
        settings: CallSettings,
        sdp_session_id: u64,
        target: Uri,
        media: Option<MediaOffer>,
        headers: BTreeMap<String, String>,
    ) -> Self {
        let remote_uri = target.to_string();
        let mut core = Self::new(
            key,
            settings,
            sdp_session_id,
            Phase::Dialling {
                tx: None,
                hangup_requested: false,
            },
            remote_uri,
            true,
        );
        core.device_media = media;
        core.after_relay = Some(AfterRelay::Dial { target, headers });
        core.start_relay();
        core
    }

    /// A SIP INVITE for the device, on server transaction `tx`, at `now`: offered to the
    /// device, ringing (180) until it answers, rejects, the caller cancels or the no-answer
    /// time runs out. A body that is not SDP is answered 400.
    pub fn incoming(
        key: CallKey,
        settings: CallSettings,
        sdp_session_id: u64,
        now: Instant,
        tx: ServerTx,
        invite: &Request,
        others: OtherCalls,
    ) -> Self {
        let OtherCalls {
            call_waiting,
            replaces,
        } = others;
        let from = invite.headers.from().ok();
        let remote_uri = from.as_ref().map(|f| f.uri.to_string()).unwrap_or_default();
        let deadline = now + settings.no_answer_timeout;
        let mut core = Self::new(
            key,
            settings,
            sdp_session_id,
            Phase::Ended,
            remote_uri,
            false,
        );
        let offer = if invite.body.is_empty() {
            None
        } else {
            match SessionDescription::from_bytes(&invite.body) {
                Ok(sdp) => Some(sdp),
                Err(_) => {
                    core.refuse_setup(tx, 400, Some("Bad SDP"), Vec::new());
                    return core;
                }
            }
        };
        core.peer_allows_update = allows_update(invite);
        if let Some(config) = core.settings.session_timer {
            match config.negotiate_uas(&invite.headers) {
                Ok(UasTimer::Use(n)) => core.timer_offer = Some(n),
                Ok(UasTimer::TooBrief { min_se }) => {
                    // RFC 4028 section 9: the caller asks again with our minimum.
                    let headers = vec![(HeaderName::MinSe, min_se.to_string())];
                    core.refuse_setup(tx, 422, None, headers);
                    return core;
                }
                Err(_) => {
                    core.refuse_setup(tx, 400, Some("Bad Session-Expires"), Vec::new());
                    return core;
                }
            }
        }
        core.send_device(
            0,
            Body::IncomingCall(IncomingCall {
                call_ref: core.key.1,
                from_uri: core.remote_uri.clone(),
                display_name: from
                    .as_ref()
                    .and_then(|f| f.display_name.clone())
                    .unwrap_or_default(),
                to_uri: invite.uri.to_string(),
                media: offer.as_ref().map(media_sdp::media_offer),
                call_waiting,
                replaces_call_ref: replaces.as_ref().map_or(0, |r| r.0),
            }),
        );
        core.replaces = replaces;
        core.ring(tx, invite);
        core.state = CallState::Ringing;
        core.phase = Phase::Ringing {
            tx,
            offer: offer.map(Box::new),
            deadline,
            answering: None,
        };
        core
    }

    /// The 180 for INVITE `tx`: reliable (RFC 3262: `Require: 100rel`, the user agent adds
    /// RSeq and retransmits it until its PRACK) when the caller requires it, or supports it
    /// and the gateway is configured to use it.
    fn ring(&mut self, tx: ServerTx, invite: &Request) {
        let wants = |tags: Result<Vec<&str>, _>| {
            tags.is_ok_and(|t: Vec<&str>| t.iter().any(|t| t.eq_ignore_ascii_case(RELIABLE_TAG)))
        };
        let reliable = self.settings.reliable_provisionals
            && (wants(invite.headers.require()) || wants(invite.headers.supported()));
        let headers = if reliable {
            vec![(HeaderName::Require, RELIABLE_TAG.to_string())]
        } else {
            Vec::new()
        };
        self.push(CallAction::Respond {
            tx,
            status: 180,
            reason: None,
            body: None,
            headers,
            report: true,
        });
    }

    /// An incoming call that was ringing on another node, whose early record this node just
    /// claimed (`record`, owner: this node) and whose INVITE it adopted as server transaction
    /// `tx`: rings on (180 again, with the early dialog's To tag) until the device answers,
    /// rejects, the caller cancels or what is left of the no-answer time runs out (the call
    /// has rung `rang_for` already). The device is not offered the call again: its resumed
    /// session lists it as ringing. A device command that caused the takeover is carried out
    /// at once.
    #[allow(clippy::too_many_arguments)]
    pub fn adopted(
        key: CallKey,
        settings: CallSettings,
        sdp_session_id: u64,
        now: Instant,
        tx: ServerTx,
        invite: &Request,
        record: &StoredDialog,
        previous_owner: String,
        trigger: TakeoverTrigger,
        rang_for: Duration,
    ) -> Self {
        let from = invite.headers.from().ok();
        let app = record.app_data.as_deref().and_then(CallAppData::decode);
        let remote_uri = app
            .as_ref()
            .map(|a| a.remote_uri.clone())
            .filter(|u| !u.is_empty())
            .or_else(|| from.as_ref().map(|f| f.uri.to_string()))
            .unwrap_or_default();
        let deadline = now + settings.no_answer_timeout.saturating_sub(rang_for);
        let mut core = Self::new(
            key,
            settings,
            sdp_session_id,
            Phase::Ended,
            remote_uri,
            false,
        );
        core.continue_record(record, app.as_ref(), previous_owner);
        // The early dialog's id is the record's key (the 180 below recreates it here): known
        // now, so the record ends with the call however it ends.
        core.set_dialog(DialogId::new(
            record.key.call_id.clone(),
            record.key.local_tag.clone(),
            record.key.remote_tag.clone(),
        ));
        let offer = if invite.body.is_empty() {
            None
        } else {
            SessionDescription::from_bytes(&invite.body).ok()
        };
        core.peer_allows_update = allows_update(invite);
        // The INVITE was accepted already: its timer is negotiated as its first node did.
        if let Some(config) = core.settings.session_timer {
            if let Ok(UasTimer::Use(n)) = config.negotiate_uas(&invite.headers) {
                core.timer_offer = Some(n);
            }
        }
        // Not reliable, even when the caller asked for 100rel: its RSeq would not follow the
        // first node's, and the caller has PRACKed (or will get) that node's 180 already.
        core.respond(tx, 180, None, None, true);
        core.state = CallState::Ringing;
        core.phase = Phase::Ringing {
            tx,
            offer: offer.map(Box::new),
            deadline,
            answering: None,
        };
        if let TakeoverTrigger::DeviceCommand { request_id, body } = trigger {
            core.device(request_id, body);
        }
        core
    }

    /// A stored dialog this node just claimed and imported (`claimed`): restores the SDP
    /// session and the call's state from the record, starts the relay, then does what the
    /// trigger asks. `sdp_session_id` is used only when the record has no local SDP.
    pub fn taken_over(
        key: CallKey,
        settings: CallSettings,
        sdp_session_id: u64,
        claimed: ClaimedDialog<'_>,
    ) -> Self {
        let ClaimedDialog {
            record,
            remote_uri,
            uac,
            dialog,
            trigger,
            previous_owner,
        } = claimed;
        let app = record.app_data.as_deref().and_then(CallAppData::decode);
        let outgoing = app.as_ref().map_or(uac, |a| a.outgoing);
        // The session id is the record's (below); `sdp_session_id` only when it has none.
        let mut core = Self::new(
            key,
            settings,
            sdp_session_id,
            Phase::Up,
            remote_uri,
            outgoing,
        );
        core.dialog = Some(dialog);
        core.continue_record(record, app.as_ref(), previous_owner);
        core.held = app.as_ref().is_some_and(|a| a.held);
        core.timer_restored = app.as_ref().and_then(|a| a.session_timer);
        // The device's transfer in progress: the transferee's NOTIFYs reach this node now.
        core.transfer = app.as_ref().and_then(|a| a.transfer);
        if let Ok(local) = SessionDescription::parse(&record.media.local_sdp) {
            core.device_media = Some(media_sdp::media_offer(&local));
            core.sdp = SdpSession::from_previous(local);
        }
        core.state = if core.held {
            CallState::Held
        } else {
            CallState::Answered
        };
        core.after_relay = Some(AfterRelay::Takeover {
            remote_sdp: record.media.remote_sdp.clone(),
            trigger,
        });
        core.start_relay();
        core
    }

    /// Continues the claimed `record` (with its application data `app`) that `previous_owner`
    /// held: the call record's start, answer and owners, and the epoch and version the next
    /// writes continue from.
    fn continue_record(
        &mut self,
        record: &StoredDialog,
        app: Option<&CallAppData>,
        previous_owner: String,
    ) {
        self.record.taken_over = true;
        if let Some(app) = app {
            self.record.started_ms = app.started_ms;
            self.record.answered_ms = app.answered_ms;
            self.record.owners_before = app.owners.clone();
        }
        if self.record.owners_before.last() != Some(&previous_owner) {
            self.record.owners_before.push(previous_owner);
        }
        self.replica.epoch = record.epoch;
        self.replica.base_version = record.version;
        self.replica.stored = true;
    }

    /// What the call's record holds now (the driver writes it ahead of the 2xx to an INVITE).
    pub fn record_facts(&self) -> CallFacts {
        self.facts()
    }

    /// Another node owns the call now, even if it is over here already (its final answer was
    /// held by the driver's fence): no record is written or ended here.
    pub fn mark_lost(&mut self) {
        self.replica.lost = true;
    }

    /// The call's device and call reference.
    pub fn key(&self) -> &CallKey {
        &self.key
    }

    /// The state last reported to the device.
    pub fn state(&self) -> CallState {
        self.state
    }

    /// The remote party.
    pub fn remote_uri(&self) -> &str {
        &self.remote_uri
    }

    /// The call's dialog, once there is one.
    pub fn dialog(&self) -> Option<&DialogId> {
        self.dialog.as_ref()
    }

    /// Whether the call is over (its last action was [`CallAction::Close`]).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<CallAction> {
        self.actions.pop_front()
    }

    /// The earliest instant at which [`CallCore::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ringing = match &self.phase {
            Phase::Ringing {
                deadline,
                answering: None,
                ..
            } if self.after_relay.is_none() => Some(*deadline),
            _ => None,
        };
        let fenced = match &self.pending {
            Some(Pending {
                stage: Stage::Fenced { retry_at, .. },
                ..
            }) => Some(*retry_at),
            _ => None,
        };
        [ringing, fenced, self.timer_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// When the session timer wants something (a refresh, a retried refresh, the end of a
    /// session nobody refreshed): only while the call is up, nothing of it pending.
    fn timer_deadline(&self) -> Option<Instant> {
        if self.phase != Phase::Up
            || self.refresh_due
            || self.is_ending()
            || matches!(
                self.pending,
                Some(Pending {
                    op: Op::Refresh { .. },
                    ..
                })
            )
        {
            return None;
        }
        self.refresh_retry
            .or_else(|| self.timer.as_ref().map(SessionTimer::deadline))
    }

    /// Runs the timers due at `now` (the no-answer time of a ringing call, the next try of a
    /// fenced write ahead).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.tick(now);
        if let Some(Pending {
            op,
            stage:
                Stage::Fenced {
                    method,
                    body,
                    retry_at,
                    tries,
                },
        }) = self.pending.clone()
        {
            if now >= retry_at {
                self.fenced_tries = tries;
                self.pending = Some(Pending {
                    op,
                    stage: Stage::WriteAhead { method, body },
                });
                self.push(CallAction::WriteAhead(Box::new(self.facts())));
            }
        }
        if let Phase::Ringing {
            tx,
            deadline,
            answering: None,
            ..
        } = &self.phase
        {
            if now >= *deadline && self.after_relay.is_none() {
                let tx = *tx;
                self.respond(tx, 480, Some("No Answer"), None, false);
                self.event(ended_by(self.key.1, EndReason::NoAnswer, "no answer"));
                self.close();
            }
        }
        if self.timer_deadline().is_some_and(|at| now >= at) {
            if self.refresh_retry.take().is_some() {
                self.refresh_due = true;
            } else if let Some(due) = self.timer.as_ref().and_then(|t| t.due(now)) {
                match due {
                    TimerDue::Refresh => self.refresh_due = true,
                    TimerDue::Expired => {
                        // RFC 4028 section 10: the refresher did not refresh; the session ends.
                        self.timer = None;
                        self.push(CallAction::Note(
                            "session timer expired: no refresh from the remote party",
                        ));
                        self.start_bye(EndReason::Timeout);
                    }
                }
            }
            self.run_deferred();
        }
    }

    /// The relay started (with its address), or could not (`None`: the call goes on without
    /// media, its SDP naming port 9).
    pub fn relay_started(&mut self, now: Instant, addr: Option<RelayAddr>) {
        self.tick(now);
        self.relay = addr;
        if let Some(stored) = self.timer_restored.take() {
            // A taken-over call keeps its timer. The peer, if it refreshes, gets a whole
            // interval from now. If we refresh, the next refresh is due half an interval after
            // the last one the record tells of (at once if that is past); a record that does not
            // tell gets one an eighth of an interval from now, before any peer can have given
            // the session up (it waits at least a sixth of one past the refresh that was due);
            // the re-INVITE that moves the media, when there is one, is that refresh.
            let refresher = if stored.gateway_refreshes {
                Refresher::Uac
            } else {
                Refresher::Uas
            };
            self.timer = Some(SessionTimer::new(
                Negotiated {
                    interval: stored.interval,
                    refresher,
                    we_refresh: stored.gateway_refreshes,
                },
                now,
            ));
            if stored.gateway_refreshes {
                let half = Duration::from_secs(u64::from(stored.interval)) / 2;
                let since = match (stored.refreshed_ms, self.wall_ms()) {
                    (Some(then), Some(wall_now)) => {
                        Some(Duration::from_millis(wall_now.saturating_sub(then)))
                    }
                    _ => None,
                };
                let due_in = since.map_or(half / 4, |s| half.saturating_sub(s));
                if due_in.is_zero() {
                    self.refresh_due = true;
                } else {
                    self.refresh_retry = Some(now + due_in);
                }
            }
        }
        match self.after_relay.take() {
            Some(AfterRelay::Dial { target, headers }) => self.dial(target, headers),
            Some(AfterRelay::Answer) => self.answer(),
            Some(AfterRelay::Takeover {
                remote_sdp,
                trigger,
            }) => self.continue_takeover(&remote_sdp, trigger),
            None => {}
        }
        self.run_deferred();
    }

    /// Feeds one input at `now`.
    pub fn handle(&mut self, now: Instant, input: CallInput) {
        self.tick(now);
        if self.phase == Phase::Ended {
            // Requests for a call that is over are still answered.
            if let CallInput::PeerRequest(tx, _) = input {
                self.respond(tx, 481, None, None, false);
            }
            return;
        }
        match input {
            CallInput::Device(request_id, body) => self.device(request_id, body),
            CallInput::DeviceGone => self.device_gone(),
            CallInput::PeerRequest(tx, request) => self.peer_request(now, tx, *request),
            CallInput::Client(tx, outcome) => self.client(tx, outcome),
            CallInput::Responded(tx, status, dialog) => self.responded(tx, status, dialog),
            CallInput::Ack => {
                // Our 2xx is acknowledged (its record was written as it left; this catches a
                // call whose write was skipped then).
                if self.phase == Phase::Up && !self.replica.stored && !self.is_ending() {
                    self.replicate();
                }
            }
            CallInput::Cancelled => {
                if let Phase::Ringing { .. } = self.phase {
                    let mut ev =
                        ended_by(self.key.1, EndReason::Cancelled, "cancelled by the caller");
                    ev.sip_status = 487;
                    self.event(ev);
                    self.push(CallAction::InviteSettled);
                    self.close();
                }
            }
            CallInput::PrackTimeout => {
                if let Phase::Ringing { .. } = self.phase {
                    let mut ev = ended_by(
                        self.key.1,
                        EndReason::Failed,
                        "the caller never acknowledged the ringing (PRACK)",
                    );
                    ev.sip_status = 504;
                    self.record.last_error_sent = Some(504);
                    self.event(ev);
                    self.push(CallAction::InviteSettled);
                    self.close();
                }
            }
            CallInput::AckTimeout => {
                if self.phase == Phase::Up && !self.is_ending() {
                    self.start_bye(EndReason::Failed);
                }
            }
            CallInput::WriteAheadDone(result) => self.write_ahead_done(Some(now), result),
            CallInput::MediaTimeout => {
                if self.phase == Phase::Up {
                    self.start_bye(EndReason::MediaTimeout);
                }
            }
            CallInput::OwnershipLost => {
                self.replica.lost = true;
                self.lost();
            }
            CallInput::TransferProgress(status, reason) => self.transfer_progress(status, &reason),
            CallInput::Replaced(dialog) => {
                if self.phase == Phase::Up
                    && !self.is_ending()
                    && self.dialog.as_ref() == Some(&dialog)
                {
                    self.push(CallAction::Note("replaced by another call: the call ends"));
                    self.replaced = true;
                    self.start_bye(EndReason::Normal);
                }
            }
            CallInput::Rereplicate(store_version) => {
                // Only a confirmed dialog that was (meant to be) written, and that is not ending.
                if self.replica.stored && self.phase == Phase::Up && !self.is_ending() {
                    if let Some(v) = store_version {
                        self.replica.base_version = v;
                    }
                    self.replicate();
                }
            }
        }
    }

    // ---- helpers ----

    fn push(&mut self, action: CallAction) {
        self.actions.push_back(action);
    }

    fn send_device(&mut self, request_id: u64, body: Body) {
        self.push(CallAction::ToDevice { request_id, body });
    }

    fn reply_error(&mut self, request_id: u64, message: &str) {
        self.send_device(
            request_id,
            Body::Error(thalamus_proto::v1::Error {
                code: ErrorCode::InvalidArgument as i32,
                message: message.into(),
                request_id,
            }),
        );
    }

    fn respond(
        &mut self,
        tx: ServerTx,
        status: u16,
        reason: Option<&str>,
        body: Option<(Bytes, MediaType)>,
        report: bool,
    ) {
        if status >= 300 {
            self.record.last_error_sent = Some(status);
        }
        self.push(CallAction::Respond {
            tx,
            status,
            reason: reason.map(str::to_string),
            body,
            headers: Vec::new(),
            report,
        });
    }

    /// Refuses an incoming INVITE before the device heard of it: the call ends without an
    /// event.
    fn refuse_setup(
        &mut self,
        tx: ServerTx,
        status: u16,
        reason: Option<&str>,
        headers: Vec<(HeaderName, String)>,
    ) {
        self.record.last_error_sent = Some(status);
        self.push(CallAction::Respond {
            tx,
            status,
            reason: reason.map(str::to_string),
            body: None,
            headers,
            report: false,
        });
        self.push(CallAction::InviteSettled);
        self.ended = true;
        self.push(CallAction::Close { tombstone: false });
    }

    /// The session timer's header fields for a request we send in the dialog (INVITE or
    /// UPDATE): the running interval, the refresher named as the request's (`uac`: us).
    fn timer_request_headers(&self, method: &Method) -> Vec<(HeaderName, String)> {
        let (Some(config), Some(timer)) = (self.settings.session_timer, self.timer) else {
            return Vec::new();
        };
        if !matches!(method, Method::Invite | Method::Update) {
            return Vec::new();
        }
        let n = timer.negotiated();
        let refresher = if n.we_refresh {
            Refresher::Uac
        } else {
            Refresher::Uas
        };
        config.request_headers(Some((n.interval, refresher)))
    }

    /// A 2xx to our re-INVITE or UPDATE refreshed the session, stating `answer` (its
    /// Session-Expires) or nothing (the timer goes on as it was: a peer that knows nothing of
    /// timers still answered, which is what a refresh checks).
    fn session_refreshed(&mut self, answer: Option<SessionExpires>) {
        let (Some(config), Some(now)) = (self.settings.session_timer, self.record.now) else {
            return;
        };
        let Some(running) = self.timer else {
            return;
        };
        let n = config
            .negotiate_uac(answer)
            .unwrap_or_else(|| running.negotiated());
        self.restart_timer(n, now);
    }

    /// The timer runs anew from `now` with `n`; the record follows (a node that takes the
    /// call over refreshes on time: one write per refresh, every half interval at most as often
    /// as `min_se_secs` allows).
    fn restart_timer(&mut self, n: Negotiated, now: Instant) {
        self.timer = Some(SessionTimer::new(n, now));
        self.refresh_due = false;
        self.refresh_retry = None;
        if self.replica.stored && self.phase == Phase::Up && !self.is_ending() {
            self.replicate();
        }
    }

    /// Starts a session refresh: UPDATE without a body when the peer allows it, else a
    /// re-INVITE offering the SDP unchanged (RFC 4028 section 10).
    fn start_refresh(&mut self) {
        if self.timer.is_none() || self.dialog.is_none() {
            return;
        }
        if self.peer_allows_update {
            self.start_request(Op::Refresh { update: true }, Method::Update, None);
        } else {
            let body = self.sdp.last_local().and_then(Self::sdp_body);
            self.start_request(Op::Refresh { update: false }, Method::Invite, body);
        }
    }

    fn refresh_done(&mut self, method_invite: bool, outcome: ClientOutcome) {
        match outcome {
            ClientOutcome::Response {
                status,
                body,
                dialog,
                session_expires,
                ..
            } if (200..300).contains(&status) => {
                if method_invite {
                    if let Some(d) = dialog.or_else(|| self.dialog.clone()) {
                        self.push(CallAction::Ack { dialog: d });
                    }
                    if let Ok(answer) = SessionDescription::from_bytes(&body) {
                        self.set_remote(&answer);
                    }
                }
                self.session_refreshed(session_expires);
            }
            ClientOutcome::Response { status: 481, .. } => {
                self.push(CallAction::Note(
                    "session refresh answered 481: the remote party no longer knows the call",
                ));
                self.event(ended_by(
                    self.key.1,
                    EndReason::Timeout,
                    "the session refresh failed",
                ));
                self.close();
            }
            ClientOutcome::Response { status: 408, .. } | ClientOutcome::Timeout => {
                self.push(CallAction::Note(
                    "session refresh not answered: the call ends",
                ));
                self.start_bye(EndReason::Timeout);
            }
            ClientOutcome::Response { status: 491, .. } => {
                // Our refresh crossed the peer's re-INVITE: again a little later (RFC 3261
                // 14.1), unless the peer's own refreshes the session meanwhile.
                if let Some(now) = self.record.now {
                    self.refresh_retry = Some(now + REFRESH_GLARE_RETRY);
                }
            }
            ClientOutcome::Response { .. } | ClientOutcome::Failed(_) => {
                // Refused otherwise: no more refreshes from us; the session ends at its expiry
                // unless the peer refreshes it.
                if let Some(timer) = &mut self.timer {
                    timer.refresh_failed();
                }
            }
        }
    }

    /// A blind transfer (RFC 3515): REFER with the target (resolved by the bridge already).
    fn start_transfer(&mut self, request_id: u64, target: String) {
        if Uri::parse(&target).is_err() {
            self.reply_error(request_id, "the transfer target is not a URI");
            return;
        }
        if self.transfer.is_some() {
            self.reply_error(request_id, "a transfer of this call is in progress");
            return;
        }
        if self.dialog.is_none() {
            return;
        }
        self.start_request(Op::Refer { request_id, target }, Method::Refer, None);
    }

    fn transfer_status(&mut self, request_id: u64, sip_status: u32, reason: &str, done: bool) {
        self.send_device(
            request_id,
            Body::TransferStatus(TransferStatus {
                call_ref: self.key.1,
                sip_status,
                reason: reason.to_string(),
                done,
            }),
        );
    }

    fn refer_done(&mut self, request_id: u64, outcome: ClientOutcome) {
        match outcome {
            ClientOutcome::Response { status, .. } if (200..300).contains(&status) => {
                // Accepted (202): the NOTIFYs tell how it goes (unless they all came first).
                if self.transfer_over_early.take() != Some(request_id) {
                    self.transfer = Some(request_id);
                }
            }
            ClientOutcome::Response { status, reason, .. } => {
                self.transfer_status(request_id, u32::from(status), &reason, true);
                self.replicate();
            }
            ClientOutcome::Timeout => {
                self.transfer_status(request_id, 408, "the REFER was not answered", true);
                self.replicate();
            }
            ClientOutcome::Failed(why) => {
                self.transfer_status(request_id, 0, &format!("REFER not sent: {why}"), true);
                self.replicate();
            }
        }
    }

    /// A NOTIFY of the transfer's implicit subscription (RFC 3515 section 2.4.4): its
    /// message/sipfrag status line goes to the device; a 2xx completes the transfer and ends
    /// the call (BYE); a final failure leaves the call as it was. A NOTIFY without a transfer
    /// in progress gets 481.
    fn transfer_notify(&mut self, tx: ServerTx, request: &Request) {
        let event = request
            .headers
            .text(&HeaderName::Event)
            .ok()
            .flatten()
            .unwrap_or_default();
        let is_refer = event
            .split(';')
            .next()
            .is_some_and(|e| e.trim().eq_ignore_ascii_case("refer"));
        // The REFER still waiting for its answer: a NOTIFY may come first (RFC 3515 2.4.4).
        let refer_in_flight = match &self.pending {
            Some(Pending {
                op: Op::Refer { request_id, .. },
                stage: Stage::InFlight(_),
            }) => Some(*request_id),
            _ => None,
        };
        let Some(request_id) = self.transfer.or(refer_in_flight).filter(|_| is_refer) else {
            self.respond(tx, 481, None, None, false);
            return;
        };
        let Some((status, reason)) = sipfrag_status(&request.body) else {
            self.respond(tx, 400, Some("Bad sipfrag"), None, false);
            return;
        };
        self.respond(tx, 200, None, None, false);
        let terminated = request
            .headers
            .text(&HeaderName::SubscriptionState)
            .ok()
            .flatten()
            .is_some_and(|s| {
                s.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("terminated")
            });
        let done = status >= 200 || terminated;
        self.transfer_status(request_id, u32::from(status), &reason, done);
        if self.transfer.is_none() {
            // Before the REFER's 2xx: the subscription runs from now.
            self.transfer = Some(request_id);
        }
        if done {
            self.transfer = None;
            if refer_in_flight == Some(request_id) {
                self.transfer_over_early = Some(request_id);
            }
        }
        if (200..300).contains(&status) {
            self.push(CallAction::Note("transfer completed: the call ends"));
            self.transferred = true;
            self.start_bye(EndReason::Normal);
        } else if done && self.transfer.is_none() {
            // The transfer failed and the call goes on: its record no longer says a transfer
            // is in progress.
            self.replicate();
        }
    }

    /// A REFER from the peer (RFC 3515): the peer transfers the device. Accepted (202) when
    /// the call is answered, the device follows transfers, none is in progress and the target
    /// is a SIP URI without embedded headers (an attended transfer's Replaces is not taken);
    /// then the NOTIFYs report the new call's progress, and once it is answered this call ends.
    /// With `Refer-Sub: false` (RFC 4488) the 202 says so and no NOTIFY is sent.
    fn peer_refer(&mut self, tx: ServerTx, request: &Request) {
        if self.phase != Phase::Up || self.is_ending() {
            self.respond(tx, 481, None, None, false);
            return;
        }
        if !self.takes_transfers {
            self.respond(tx, 603, Some("Transfers Not Taken"), None, false);
            return;
        }
        if self.referral.is_some() {
            self.respond(tx, 491, None, None, false);
            return;
        }
        let target = request
            .headers
            .text(&HeaderName::ReferTo)
            .ok()
            .flatten()
            .and_then(|t| t.parse::<thalamus_sip::message::NameAddr>().ok())
            .map(|n| n.uri);
        let Some(target) = target else {
            self.respond(tx, 400, Some("Bad Refer-To"), None, false);
            return;
        };
        // A SIP URI; its only embedded header may be the Replaces of an attended transfer
        // (RFC 3891), which the new INVITE carries.
        let plain = target.as_sip().is_some_and(|sip| {
            sip.headers.len() <= 1
                && sip.headers.iter().all(|h| {
                    h.name.eq_ignore_ascii_case("replaces")
                        && h.unescaped()
                            .is_some_and(|v| thalamus_sip::dialog::Replaces::parse(&v).is_some())
                })
        });
        if !plain {
            self.respond(
                tx,
                501,
                Some("Only Transfers to SIP URIs, Replaces the Only Header"),
                None,
                false,
            );
            return;
        }
        let referred_by = request
            .headers
            .text(&HeaderName::ReferredBy)
            .ok()
            .flatten()
            .map(str::to_string)
            .or_else(|| request.headers.from().ok().map(|f| f.uri.to_string()))
            .unwrap_or_default();
        // The REFER-Issuer may ask for no implicit subscription (RFC 4488 section 4); the
        // 2xx then says it was granted, and no NOTIFY is sent.
        let subscribed = !request
            .headers
            .text(&HeaderName::ReferSub)
            .ok()
            .flatten()
            .is_some_and(|v| {
                // refer-sub-value *(SEMI exten): the value is what comes before parameters.
                let value = v.split(';').next().unwrap_or_default();
                value.trim().eq_ignore_ascii_case("false")
            });
        let headers = if subscribed {
            Vec::new()
        } else {
            vec![(HeaderName::ReferSub, "false".to_string())]
        };
        self.push(CallAction::Respond {
            tx,
            status: 202,
            reason: None,
            body: None,
            headers,
            report: false,
        });
        self.referral = Some(Referral {
            subscribed,
            notifies: if subscribed {
                VecDeque::from([("SIP/2.0 100 Trying".to_string(), false)])
            } else {
                VecDeque::new()
            },
            ..Referral::default()
        });
        self.push(CallAction::PlaceTransfer {
            target,
            referred_by,
        });
    }

    /// The new call of the peer's transfer progressed: reported in a NOTIFY; a final status
    /// is the last one (a 2xx ends this call once it is sent).
    fn transfer_progress(&mut self, status: u16, reason: &str) {
        let Some(referral) = self.referral.as_mut() else {
            return;
        };
        if referral.finished || status < 101 {
            return;
        }
        let last = status >= 200;
        if last {
            referral.finished = true;
            referral.succeeded = (200..300).contains(&status);
        }
        if !referral.subscribed {
            // No subscription to report to (RFC 4488): the outcome alone matters.
            // A success ends this call now (after the request in flight, if any).
            if last && !self.is_ending() {
                self.end_referral();
            }
            return;
        }
        let reason = if reason.is_empty() {
            "Progress"
        } else {
            reason
        };
        referral
            .notifies
            .push_back((format!("SIP/2.0 {status} {reason}"), last));
        self.run_deferred();
    }

    /// The peer's transfer is over and its last NOTIFY answered (or none was due): a
    /// success ends this call with BYE (true; after the request in flight, if any); a failure
    /// leaves it up.
    fn end_referral(&mut self) -> bool {
        let succeeded = self.referral.take().is_some_and(|r| r.succeeded);
        if succeeded {
            self.push(CallAction::Note(
                "transferred by the remote party: the call ends",
            ));
            self.transferred = true;
            self.start_bye(EndReason::Normal);
        }
        succeeded
    }

    fn sdp_body(sdp: &SessionDescription) -> Option<(Bytes, MediaType)> {
        Some((Bytes::from(sdp.to_string()), MediaType::sdp()))
    }

    /// Reports a call event to the device (and the state it puts the call in).
    fn event(&mut self, event: CallEvent) {
        self.state = CallState::try_from(event.state).unwrap_or(CallState::Unspecified);
        if self.state == CallState::Answered {
            if let Some((old, dialog)) = self.replaces.take() {
                self.push(CallAction::EndReplaced(old, dialog));
            }
        }
        if self.state == CallState::Answered && self.record.answered_ms.is_none() {
            self.record.answered_ms = self.wall_ms();
            if let (Some((origin, _)), Some(now)) = (self.record.wall, self.record.now) {
                let direction = if self.outgoing {
                    "outgoing"
                } else {
                    "incoming"
                };
                let took = now.saturating_duration_since(origin);
                self.push(CallAction::Count(CallCount::SetUp(direction, took)));
            }
        }
        if event.state == CallState::Ended as i32 && self.record.end.is_none() {
            self.record.end = Some((
                EndReason::try_from(event.end_reason).unwrap_or(EndReason::Unspecified),
                event.sip_status,
                event.reason.clone(),
            ));
        }
        if event.state == CallState::Ended as i32 {
            self.ended = true;
            let reason = EndReason::try_from(event.end_reason)
                .map(|r| r.as_str_name())
                .unwrap_or("END_REASON_UNSPECIFIED");
            self.push(CallAction::Count(CallCount::Ended(reason_label(reason))));
        }
        self.send_device(0, Body::CallEvent(event));
    }

    fn set_dialog(&mut self, dialog: DialogId) {
        self.push(CallAction::SetDialog(dialog.clone()));
        self.dialog = Some(dialog);
    }

    fn next_tx(&mut self) -> TxId {
        let tx = self.next_tx;
        self.next_tx = self.next_tx.wrapping_add(1).max(1);
        tx
    }

    /// The SRTP policy the call negotiates with.
    pub fn srtp_policy(&self) -> SrtpPolicy {
        self.settings.srtp
    }

    fn local_media(&self) -> LocalMedia {
        let none = StreamKeys::NONE;
        let (ip, ports, keys) = self
            .relay
            .as_ref()
            .map(|r| (r.ip, r.ports, &r.keys))
            .unwrap_or((
                self.settings.media_address,
                StreamPorts {
                    audio: 9,
                    ..StreamPorts::default()
                },
                &none,
            ));
        media_sdp::local_media(
            ip,
            ports,
            self.device_media.as_ref(),
            self.settings.srtp,
            keys,
        )
    }

    /// Asks for the relays: audio, and video and the signal data stream when the device has
    /// them and the peer's offer (when answering one) has them too.
    fn start_relay(&mut self) {
        let device = self.device_media.as_ref();
        let offered = match &self.phase {
            Phase::Ringing {
                offer: Some(offer), ..
            } => Some(media_sdp::streams(offer)),
            _ => None,
        };
        let peer_has = |stream: StreamId| {
            offered
                .as_ref()
                .is_none_or(|streams| streams.iter().any(|(s, _)| *s == stream))
        };
        let streams = RelayStreams {
            video: device.is_some_and(|m| !m.video_codecs.is_empty()) && peer_has(StreamId::VIDEO),
            signal: device.is_some_and(|m| m.signal) && peer_has(StreamId::SIGNAL),
            rtcp_mux: offered.as_deref().map(RtcpMux::offered).unwrap_or_default(),
        };
        self.push(CallAction::StartRelay(streams));
    }

    fn set_remote(&mut self, sdp: &SessionDescription) {
        self.set_remote_releasing(sdp, false);
    }

    /// [`CallCore::set_remote`] for the offer/answer that sets the call up (the 200 to our
    /// INVITE, or the offer we answered): a stream with a relay that it leaves out releases its
    /// relay. Provisional answers (another fork may answer) and later re-negotiations (a
    /// stream switched off may come back) keep them.
    fn set_remote_final(&mut self, sdp: &SessionDescription) {
        self.set_remote_releasing(sdp, true);
    }

    fn set_remote_releasing(&mut self, sdp: &SessionDescription, release: bool) {
        self.replica.remote_sdp = Some(sdp.to_string());
        self.telephone_event = media_sdp::has_telephone_event(sdp);
        if self.relay.is_some() {
            let local = self.sdp.last_local();
            // A stream our description refused (port 0) gets no media at all.
            let taken = |index: usize| {
                !local
                    .and_then(|l| l.media.get(index))
                    .is_some_and(|m| m.is_rejected())
            };
            let accepted = media_sdp::streams_where(sdp, taken);
            let has = |stream: StreamId| accepted.iter().any(|(s, _)| *s == stream);
            let left_out = [StreamId::VIDEO, StreamId::SIGNAL].map(|s| !has(s));
            let set_remote: Vec<RelayOp> = accepted
                .into_iter()
                .map(|(stream, remote)| {
                    let keys = media_sdp::srtp_keys(&remote, local);
                    RelayOp::SetRemote(stream, Box::new(remote), keys)
                })
                .collect();
            // A stream with a relay that the negotiation left out (the peer refused it, or we
            // did): its relay stops, its ports are released, and later offers give it port 0.
            let mut ops: Vec<RelayOp> = Vec::with_capacity(set_remote.len() + 2);
            if let Some(relay) = self.relay.as_mut().filter(|_| release) {
                for ((stream, port, kind), out) in [
                    (StreamId::VIDEO, &mut relay.ports.video, MediaKind::Video),
                    (
                        StreamId::SIGNAL,
                        &mut relay.ports.signal,
                        MediaKind::Application,
                    ),
                ]
                .into_iter()
                .zip(left_out)
                {
                    if port.is_some() && out {
                        *port = None;
                        self.sdp.retire(&kind);
                        ops.push(RelayOp::Stop(stream));
                    }
                }
            }
            ops.extend(set_remote);
            for op in ops {
                self.push(CallAction::Relay(op));
            }
        }
    }

    fn set_direction(&mut self, direction: Direction) {
        if self.relay.is_some() {
            self.push(CallAction::Relay(RelayOp::Direction(direction)));
        }
    }

    /// Ends the call: the end event (when none went out), then `Close`.
    fn close(&mut self) {
        if self.phase == Phase::Ended {
            return;
        }
        if !self.ended {
            self.event(ended_by(self.key.1, EndReason::Failed, "call ended"));
        }
        self.phase = Phase::Ended;
        self.record.ended_ms = self.wall_ms();
        self.pending = None;
        self.deferred.clear();
        let tombstone = self.dialog.is_some()
            && self.replica.stored
            && !self.replica.lost
            && self.settings.replicate;
        self.push(CallAction::Close { tombstone });
    }

    /// Another node owns the dialog: the call ends here without a BYE.
    fn lost(&mut self) {
        if self.phase == Phase::Ended {
            return;
        }
        self.push(CallAction::Count(CallCount::DialogLost));
        self.event(ended_by(
            self.key.1,
            EndReason::NodeFailover,
            "the call moved to another node",
        ));
        self.close();
    }

    /// What the record says besides the SIP dialog.
    fn facts(&self) -> CallFacts {
        CallFacts {
            device_id: self.key.0.clone(),
            call_ref: self.key.1,
            owner: self.settings.node_id.clone(),
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
                remote_uri: self.remote_uri.clone(),
                outgoing: self.outgoing,
                held: self.held,
                started_ms: self.record.started_ms,
                answered_ms: self.record.answered_ms,
                owners: capped_owners(&self.record.owners_before),
                session_timer: self.timer.map(|t| StoredTimer {
                    interval: t.negotiated().interval,
                    gateway_refreshes: t.negotiated().we_refresh,
                    refreshed_ms: self.wall_ms_at(t.refreshed_at()),
                }),
                transfer: self.transfer_in_progress(),
            }),
        }
    }

    /// The device's transfer in progress: accepted, or its REFER on the way (written ahead of
    /// it).
    fn transfer_in_progress(&self) -> Option<u64> {
        self.transfer.or(match &self.pending {
            Some(Pending {
                op: Op::Refer { request_id, .. },
                ..
            }) => Some(*request_id),
            _ => None,
        })
    }

    /// Hands the confirmed dialog's record to the replicator.
    fn replicate(&mut self) {
        if self.replica.lost || !self.settings.replicate || self.dialog.is_none() {
            return;
        }
        self.replica.stored = true;
        self.push(CallAction::Replicate(Box::new(self.facts())));
    }

    fn is_ending(&self) -> bool {
        matches!(
            self.pending,
            Some(Pending {
                op: Op::Bye { .. },
                ..
            })
        )
    }

    // ---- set-up ----

    fn dial(&mut self, mut target: Uri, extra: BTreeMap<String, String>) {
        let call_ref = self.key.1;
        // Headers embedded in the target (a transfer's Replaces) become the INVITE's own
        // (RFC 3261 section 19.1.5); the Request-URI goes without them.
        let embedded = target
            .as_sip_mut()
            .map(|sip| std::mem::take(&mut sip.headers))
            .unwrap_or_default();
        let offer = match self.sdp.create_offer(&self.local_media()) {
            Ok(o) => o,
            Err(e) => {
                self.event(ended_by(
                    call_ref,
                    EndReason::IncompatibleMedia,
                    &e.to_string(),
                ));
                self.close();
                return;
            }
        };
        let mut headers = vec![(HeaderName::Allow, ALLOW.to_string())];
        // One Supported header naming every extension offered.
        let mut supported = Vec::new();
        if let Some(config) = self.settings.session_timer {
            supported.push(OPTION_TAG);
            headers.extend(
                config
                    .request_headers(None)
                    .into_iter()
                    .filter(|(name, _)| *name != HeaderName::Supported),
            );
        }
        if self.settings.reliable_provisionals {
            supported.push(RELIABLE_TAG);
        }
        if !supported.is_empty() {
            headers.push((HeaderName::Supported, supported.join(", ")));
        }
        headers.extend(
            embedded
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("replaces"))
                .filter_map(|h| Some((HeaderName::Replaces, h.unescaped()?))),
        );
        for (name, value) in extra {
            if name.to_ascii_lowercase().starts_with("x-") {
                if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                    headers.push((n, value));
                }
            }
        }
        self.event(call_event(call_ref, CallState::Trying, 0, "dialling"));
        let tx = self.next_tx();
        self.phase = Phase::Dialling {
            tx: Some(tx),
            hangup_requested: false,
        };
        self.push(CallAction::SendInvite {
            tx,
            target,
            headers,
            sdp: offer.to_string(),
        });
    }

    /// A response (or the end) of the call's INVITE.
    fn invite_outcome(&mut self, hangup_requested: bool, outcome: ClientOutcome) {
        let call_ref = self.key.1;
        match outcome {
            ClientOutcome::Response {
                status,
                reason,
                body,
                dialog,
                session_expires,
                allows_update,
            } => {
                if status < 200 {
                    if status > 100 {
                        let state = state_for_provisional(status, !body.is_empty());
                        if state == CallState::EarlyMedia {
                            if let Ok(sdp) = SessionDescription::from_bytes(&body) {
                                self.set_remote(&sdp);
                            }
                        }
                        self.event(call_event(call_ref, state, status, &reason));
                    }
                    return;
                }
                if status >= 300 {
                    let ev = if hangup_requested && status == 487 {
                        ended_by(call_ref, EndReason::LocalHangup, "cancelled by the device")
                    } else {
                        ended_by_status(call_ref, status, &reason)
                    };
                    self.event(ev);
                    self.close();
                    return;
                }
                let Some(dialog) = dialog else {
                    self.event(ended_by(
                        call_ref,
                        EndReason::Failed,
                        "2xx without a dialog",
                    ));
                    self.close();
                    return;
                };
                self.set_dialog(dialog.clone());
                self.push(CallAction::Ack { dialog });
                let answer = SessionDescription::from_bytes(&body).ok();
                let mut ev = call_event(call_ref, CallState::Answered, status, &reason);
                if let Some(answer) = &answer {
                    self.set_remote_final(answer);
                    ev.media = Some(media_sdp::media_offer(answer));
                }
                self.event(ev);
                self.phase = Phase::Up;
                self.peer_allows_update = allows_update;
                if let (Some(config), Some(now)) = (self.settings.session_timer, self.record.now) {
                    if let Some(n) = config.negotiate_uac(session_expires) {
                        self.timer = Some(SessionTimer::new(n, now));
                    }
                }
                // Confirmed: the ACK is sent.
                self.replicate();
                if hangup_requested {
                    // The device hung up while the 200 crossed our CANCEL.
                    self.start_bye(EndReason::LocalHangup);
                }
            }
            ClientOutcome::Timeout => {
                self.event(ended_by_status(call_ref, 408, "Request Timeout"));
                self.close();
            }
            ClientOutcome::Failed(why) => {
                self.event(ended_by(call_ref, EndReason::Failed, &why));
                self.close();
            }
        }
    }

    fn answer(&mut self) {
        let call_ref = self.key.1;
        let Phase::Ringing { tx, ref offer, .. } = self.phase else {
            return;
        };
        let offer = offer.clone();
        let local = self.local_media();
        let body = match &offer {
            Some(offer) => match self.sdp.create_answer(offer, &local) {
                Ok(a) => a,
                Err(e) => {
                    self.respond(tx, 488, None, None, false);
                    self.event(ended_by(
                        call_ref,
                        EndReason::IncompatibleMedia,
                        &e.to_string(),
                    ));
                    self.push(CallAction::InviteSettled);
                    self.close();
                    return;
                }
            },
            None => match self.sdp.create_offer(&local) {
                Ok(o) => o,
                Err(e) => {
                    self.respond(tx, 500, None, None, false);
                    self.event(ended_by(call_ref, EndReason::Failed, &e.to_string()));
                    self.push(CallAction::InviteSettled);
                    self.close();
                    return;
                }
            },
        };
        if let Some(offer) = &offer {
            self.set_remote_final(offer);
        }
        let headers = self
            .timer_offer
            .map(timer_answer_headers)
            .unwrap_or_default();
        self.push(CallAction::Respond {
            tx,
            status: 200,
            reason: None,
            body: Self::sdp_body(&body),
            headers,
            report: true,
        });
        if let Phase::Ringing { answering, .. } = &mut self.phase {
            *answering = Some(Box::new(body));
        }
    }

    fn responded(&mut self, tx: ServerTx, status: u16, dialog: Option<DialogId>) {
        let Phase::Ringing {
            tx: invite,
            answering,
            ..
        } = &mut self.phase
        else {
            return;
        };
        if *invite != tx {
            return;
        }
        match status {
            180 => {
                if let Some(d) = dialog {
                    self.set_dialog(d);
                    // The early dialog exists now, with its To tag: its record lets a
                    // survivor continue the call if this node dies while it rings.
                    if self.settings.replicate_early && !self.replica.stored && !self.replica.lost {
                        self.replica.stored = true;
                        self.push(CallAction::ReplicateEarly(Box::new(self.facts())));
                    }
                }
            }
            200 => {
                let body = answering.take();
                // No dialog: cancelled just before the answer (the CANCEL event follows).
                if let (Some(d), Some(body)) = (dialog, body) {
                    self.set_dialog(d);
                    if let (Some(n), Some(now)) = (self.timer_offer.take(), self.record.now) {
                        self.timer = Some(SessionTimer::new(n, now));
                    }
                    let mut ev = call_event(self.key.1, CallState::Answered, 200, "OK");
                    ev.media = Some(media_sdp::media_offer(&body));
                    self.event(ev);
                    self.push(CallAction::InviteSettled);
                    self.phase = Phase::Up;
                    self.run_deferred();
                    // The dialog is confirmed as our 2xx leaves (RFC 3261 12.1.1): write its
                    // record now rather than at the ACK, a round trip later, so that a node
                    // that dies right after answering leaves the record behind (unless a
                    // hangup that waited for the 2xx is ending the call already).
                    if self.phase == Phase::Up && !self.is_ending() {
                        self.replicate();
                    }
                }
            }
            _ => {}
        }
    }

    fn continue_takeover(&mut self, remote_sdp: &str, trigger: TakeoverTrigger) {
        if let Ok(remote) = SessionDescription::parse(remote_sdp) {
            self.set_remote(&remote);
        }
        if self.held {
            self.set_direction(Direction::SendOnly);
        }
        let reinvite = self.settings.reinvite_after_takeover;
        match trigger {
            TakeoverTrigger::Request { method, arrived } => {
                self.replica.takeover_arrived = Some(arrived);
                self.replica.reinvite_pending = reinvite
                    && !matches!(
                        method,
                        Method::Bye | Method::Invite | Method::Update | Method::Ack
                    );
            }
            TakeoverTrigger::DeviceResume | TakeoverTrigger::Api => {
                if reinvite {
                    self.start_op(Op::MediaReinvite);
                }
            }
            TakeoverTrigger::DeviceCommand { request_id, body } => {
                if reinvite && !matches!(body, Body::Hangup(_)) {
                    self.start_op(Op::MediaReinvite);
                }
                // Carried out as if it had just arrived (after the re-INVITE).
                self.deferred.push_back((request_id, body));
            }
            TakeoverTrigger::Hangup => self.start_bye(EndReason::LocalHangup),
            // Only a ringing call is cancelled (see `adopted`).
            TakeoverTrigger::Cancel => {}
        }
    }

    // ---- device commands ----

    /// Whether a device command must wait: the relay is starting, an in-dialog request is
    /// pending, or the answer to the INVITE is on its way.
    fn busy(&self) -> bool {
        self.after_relay.is_some()
            || self.pending.is_some()
            || matches!(
                self.phase,
                Phase::Ringing {
                    answering: Some(_),
                    ..
                }
            )
    }

    fn device(&mut self, request_id: u64, body: Body) {
        if let Body::KeyframeRequest(_) = body {
            // Media, not signalling: it never waits, and without video it means nothing.
            if self.relay.as_ref().is_some_and(|r| r.ports.video.is_some()) {
                self.push(CallAction::Relay(RelayOp::RequestKeyframe));
            }
            return;
        }
        if self.busy() {
            if matches!(body, Body::Hangup(_)) && matches!(self.phase, Phase::Dialling { .. }) {
                // A hangup while dialling cannot wait: it CANCELs.
                self.hangup_while_dialling();
                return;
            }
            // One thing at a time: carried out when what runs now is done.
            self.deferred.push_back((request_id, body));
            return;
        }
        match self.phase.clone() {
            Phase::Dialling { .. } => match body {
                Body::Hangup(_) => self.hangup_while_dialling(),
                Body::Transfer(_) => {
                    self.reply_error(request_id, "only an answered call is transferred")
                }
                _ => self.reply_error(request_id, "the call is not answered yet"),
            },
            Phase::Ringing { tx, .. } => match body {
                Body::Answer(answer) => {
                    self.device_media = answer.media;
                    self.after_relay = Some(AfterRelay::Answer);
                    self.start_relay();
                }
                Body::Reject(reject) => {
                    let status = reject_status(reject.sip_status);
                    let reason = (!reject.reason.is_empty()).then_some(reject.reason.clone());
                    self.respond(tx, status, reason.as_deref(), None, false);
                    self.event(ended_by_status(
                        self.key.1,
                        status,
                        reason.as_deref().unwrap_or("rejected"),
                    ));
                    self.push(CallAction::InviteSettled);
                    self.close();
                }
                Body::Hangup(_) => self.decline(tx),
                Body::Transfer(_) => {
                    self.reply_error(request_id, "only an answered call is transferred")
                }
                _ => self.reply_error(request_id, "answer or reject the call first"),
            },
            Phase::Up => match body {
                Body::Hangup(_) => self.start_bye(EndReason::LocalHangup),
                Body::Hold(_) => self.hold(request_id, true),
                Body::Resume(_) => self.hold(request_id, false),
                Body::Dtmf(d) => self.dtmf(request_id, &d.digit, d.duration_ms),
                Body::Transfer(t) => self.start_transfer(request_id, t.target),
                _ => self.reply_error(request_id, "the call is already answered"),
            },
            Phase::Ended => {}
        }
    }

    /// Carries out the device commands that waited, until one has to wait again.
    fn run_deferred(&mut self) {
        while !self.busy() && self.phase != Phase::Ended {
            if let Some(reason) = self.bye_after.take() {
                self.start_bye(reason);
                continue;
            }
            // The media re-INVITE after a takeover: once the request that caused it is
            // answered (UAS mode) and nothing else is in flight.
            if self.phase == Phase::Up
                && self.replica.takeover_arrived.is_none()
                && std::mem::take(&mut self.replica.reinvite_pending)
            {
                self.start_op(Op::MediaReinvite);
                continue;
            }
            // The device's commands first: a hangup makes a refresh moot, and a hold re-INVITE
            // is one.
            if let Some((request_id, body)) = self.deferred.pop_front() {
                self.device(request_id, body);
                continue;
            }
            // A session refresh that came due (not before the request that caused a takeover
            // is answered: it may be the peer's own refresh).
            if self.phase == Phase::Up
                && self.replica.takeover_arrived.is_none()
                && !self.is_ending()
                && std::mem::take(&mut self.refresh_due)
            {
                self.start_refresh();
                continue;
            }
            if let Some((sipfrag, last)) =
                self.referral.as_mut().and_then(|r| r.notifies.pop_front())
            {
                self.start_request(
                    Op::Notify {
                        sipfrag: sipfrag.clone(),
                        last,
                    },
                    Method::Notify,
                    Some((
                        Bytes::from(format!("{sipfrag}\r\n")),
                        MediaType::new("message", "sipfrag"),
                    )),
                );
                continue;
            }
            return;
        }
    }

    fn device_gone(&mut self) {
        if self.is_ending() {
            return;
        }
        if self.busy() && self.phase == Phase::Up {
            // Nothing the device asked for matters any more: hang up after what runs now.
            self.deferred.clear();
        }
        self.device(0, Body::Hangup(thalamus_proto::v1::Hangup::default()));
    }

    fn hangup_while_dialling(&mut self) {
        if let Phase::Dialling {
            tx,
            hangup_requested,
        } = &mut self.phase
        {
            if *hangup_requested {
                return;
            }
            *hangup_requested = true;
            match *tx {
                Some(tx) => self.push(CallAction::Cancel { tx }),
                None => {
                    // The INVITE never went out (the relay was starting).
                    self.after_relay = None;
                    self.event(ended_by(
                        self.key.1,
                        EndReason::LocalHangup,
                        "cancelled by the device",
                    ));
                    self.close();
                }
            }
        }
    }

    fn decline(&mut self, tx: ServerTx) {
        self.respond(tx, 603, None, None, false);
        self.event(ended_by_status(self.key.1, 603, "declined by the device"));
        self.push(CallAction::InviteSettled);
        self.close();
    }

    fn hold(&mut self, request_id: u64, hold: bool) {
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
        if self.dialog.is_none() {
            return;
        }
        self.start_request(
            Op::Hold { request_id, hold },
            Method::Invite,
            Self::sdp_body(&offer),
        );
    }

    fn dtmf(&mut self, request_id: u64, digit: &str, duration_ms: u32) {
        if thalamus_media::dtmf::event_code(digit).is_none() {
            self.reply_error(request_id, "a DTMF digit is one of 0-9 * # A-D");
            return;
        }
        if self.telephone_event && self.relay.is_some() {
            // RFC 4733 in the media: the events enter the relay as if the device had sent them
            // on its link (payload type 101), so the relay's numbering and payload type
            // mapping apply to them like to any other packet.
            let datagrams = thalamus_media::dtmf::datagrams(
                self.key.1,
                digit,
                duration_ms,
                &mut self.dtmf_timestamp,
            );
            self.push(CallAction::Relay(RelayOp::Inject(datagrams)));
            return;
        }
        if self.dialog.is_none() {
            return;
        }
        // No telephone-event negotiated: SIP INFO with application/dtmf-relay.
        let body = format!(
            "Signal={digit}\r\nDuration={}\r\n",
            if duration_ms == 0 { 160 } else { duration_ms }
        );
        self.start_request(
            Op::Info { request_id },
            Method::Info,
            Some((
                Bytes::from(body),
                MediaType::new("application", "dtmf-relay"),
            )),
        );
    }

    // ---- in-dialog operations ----

    fn start_bye(&mut self, reason: EndReason) {
        if self.is_ending() {
            return;
        }
        if self.pending.is_some() {
            // After the request in flight (its answer is still acted on: a 2xx ACKed, the
            // device answered).
            self.bye_after.get_or_insert(reason);
            return;
        }
        if self.dialog.is_none() {
            self.end_with(reason);
            return;
        }
        self.start_request(Op::Bye { reason }, Method::Bye, None);
    }

    fn start_op(&mut self, op: Op) {
        match op {
            Op::MediaReinvite => {
                if self.dialog.is_none() {
                    return;
                }
                let mut local = self.local_media();
                if self.held {
                    local.direction = Direction::SendOnly;
                }
                match self.sdp.create_offer(&local) {
                    Ok(offer) => {
                        self.start_request(op, Method::Invite, Self::sdp_body(&offer));
                    }
                    Err(_) => {
                        // No offer to make: the call goes on with the media it had.
                    }
                }
            }
            Op::Bye { reason } => self.start_bye(reason),
            Op::Refresh { .. } => self.start_refresh(),
            Op::Hold { .. } | Op::Info { .. } | Op::Refer { .. } | Op::Notify { .. } => {}
        }
    }

    /// Starts an in-dialog request: the local CSeq is written ahead first when the record is
    /// stored, so a node that takes the dialog over never reuses it.
    fn start_request(&mut self, op: Op, method: Method, body: Option<(Bytes, MediaType)>) {
        if self.pending.is_some() {
            // One request at a time: callers wait (`busy`, `bye_after`, `reinvite_pending`).
            debug_assert!(false, "a request started while another is pending");
            return;
        }
        if self.replica.stored && self.settings.replicate && !self.replica.lost {
            self.pending = Some(Pending {
                op,
                stage: Stage::WriteAhead { method, body },
            });
            self.push(CallAction::WriteAhead(Box::new(self.facts())));
            return;
        }
        if self.replica.lost {
            self.pending = Some(Pending {
                op,
                stage: Stage::WriteAhead { method, body },
            });
            self.write_ahead_done(self.record.now, WriteAhead::Lost);
            return;
        }
        self.send_request(op, method, body);
    }

    fn send_request(&mut self, op: Op, method: Method, body: Option<(Bytes, MediaType)>) {
        let Some(dialog) = self.dialog.clone() else {
            return;
        };
        let tx = self.next_tx();
        let mut headers = self.timer_request_headers(&method);
        match &op {
            Op::Refer { target, .. } => {
                headers.push((HeaderName::ReferTo, format!("<{target}>")));
            }
            Op::Notify { last, .. } => {
                headers.push((HeaderName::Event, "refer".to_string()));
                headers.push((
                    HeaderName::SubscriptionState,
                    if *last {
                        "terminated;reason=noresource".to_string()
                    } else {
                        "active;expires=60".to_string()
                    },
                ));
            }
            _ => {}
        }
        self.pending = Some(Pending {
            op,
            stage: Stage::InFlight(tx),
        });
        self.push(CallAction::SendInDialog {
            tx,
            dialog,
            method,
            body,
            headers,
        });
    }

    fn write_ahead_done(&mut self, now: Option<Instant>, result: WriteAhead) {
        let Some(Pending {
            op,
            stage: Stage::WriteAhead { method, body },
        }) = self.pending.take()
        else {
            return;
        };
        let tries = std::mem::take(&mut self.fenced_tries);
        if result == WriteAhead::Fenced {
            match op {
                Op::Hold { request_id, .. }
                | Op::Info { request_id }
                | Op::Refer { request_id, .. } => {
                    self.reply_error(
                        request_id,
                        "this node cannot confirm that it still holds the call: try again",
                    );
                    self.run_deferred();
                }
                Op::MediaReinvite | Op::Notify { .. } => self.run_deferred(),
                Op::Refresh { .. } => {
                    // Not sent: tried again a little later (the session outlives a short doubt).
                    if let Some(now) = now.or(self.record.now) {
                        self.refresh_retry = Some(now + FENCED_RETRY);
                    }
                    self.run_deferred();
                }
                Op::Bye { .. } => match now {
                    Some(now) if tries + 1 < MAX_FENCED_TRIES => {
                        self.pending = Some(Pending {
                            op,
                            stage: Stage::Fenced {
                                method,
                                body,
                                retry_at: now + FENCED_RETRY,
                                tries: tries + 1,
                            },
                        });
                    }
                    _ => {
                        // Given up here without a BYE: the record stays for the node that
                        // holds the dialog now (or takes it over), which ends it.
                        self.push(CallAction::Note(
                            "fenced too long: the call is given up here without a BYE",
                        ));
                        self.replica.lost = true;
                        self.event(ended_by(
                            self.key.1,
                            EndReason::NodeFailover,
                            "this node could not confirm that it still holds the call",
                        ));
                        self.close();
                    }
                },
            }
            return;
        }
        if result != WriteAhead::Lost {
            self.send_request(op, method, body);
            return;
        }
        // Another node owns the dialog: the request is not sent.
        self.replica.lost = true;
        match op {
            Op::Hold { request_id, .. }
            | Op::Info { request_id }
            | Op::Refer { request_id, .. } => {
                self.reply_error(request_id, "the call moved to another node");
            }
            Op::MediaReinvite | Op::Bye { .. } | Op::Refresh { .. } | Op::Notify { .. } => {}
        }
        self.lost();
    }

    fn client(&mut self, tx: TxId, outcome: ClientOutcome) {
        if let Phase::Dialling {
            tx: Some(invite),
            hangup_requested,
        } = self.phase
        {
            if invite == tx {
                self.invite_outcome(hangup_requested, outcome);
                return;
            }
        }
        let Some(Pending {
            op,
            stage: Stage::InFlight(current),
        }) = self.pending.clone()
        else {
            return;
        };
        if current != tx {
            return;
        }
        if let ClientOutcome::Response { status, .. } = &outcome {
            if *status < 200 {
                return;
            }
        }
        self.pending = None;
        match op {
            Op::Hold { request_id, hold } => self.hold_done(request_id, hold, outcome),
            Op::Info { request_id } => match outcome {
                ClientOutcome::Response { status, .. } if !(200..300).contains(&status) => {
                    self.reply_error(request_id, &format!("INFO refused: {status}"));
                }
                ClientOutcome::Failed(why) => {
                    self.reply_error(request_id, &format!("INFO not sent: {why}"));
                }
                _ => {}
            },
            Op::MediaReinvite => self.media_reinvite_done(outcome),
            Op::Refresh { update } => self.refresh_done(!update, outcome),
            Op::Refer { request_id, .. } => self.refer_done(request_id, outcome),
            Op::Notify { last, .. } => {
                // Whatever its answer: the transfer's outcome does not change with it.
                if last && self.end_referral() {
                    return;
                }
            }
            Op::Bye { reason } => {
                // Whatever the answer (200, 481, none): the call is over.
                self.end_with(reason);
                return;
            }
        }
        self.run_deferred();
    }

    fn hold_done(&mut self, request_id: u64, hold: bool, outcome: ClientOutcome) {
        let call_ref = self.key.1;
        match outcome {
            ClientOutcome::Response {
                status,
                reason,
                body,
                dialog,
                session_expires,
                ..
            } if (200..300).contains(&status) => {
                if let Some(d) = dialog.or_else(|| self.dialog.clone()) {
                    self.push(CallAction::Ack { dialog: d });
                }
                self.session_refreshed(session_expires);
                self.held = hold;
                self.set_direction(if hold {
                    Direction::SendOnly
                } else {
                    Direction::SendRecv
                });
                if let Ok(answer) = SessionDescription::from_bytes(&body) {
                    self.set_remote(&answer);
                }
                self.replicate();
                let state = if hold {
                    CallState::Held
                } else {
                    CallState::Resumed
                };
                self.event(call_event(call_ref, state, status, &reason));
            }
            ClientOutcome::Response { status, reason, .. } => {
                let mut ev = call_event(
                    call_ref,
                    if self.held {
                        CallState::Held
                    } else {
                        CallState::Answered
                    },
                    status,
                    &format!("re-INVITE refused: {reason}"),
                );
                ev.end_reason = EndReason::Unspecified as i32;
                self.event(ev);
            }
            ClientOutcome::Failed(why) => {
                self.reply_error(request_id, &format!("re-INVITE not sent: {why}"));
            }
            ClientOutcome::Timeout => self.reply_error(request_id, "re-INVITE timed out"),
        }
    }

    fn media_reinvite_done(&mut self, outcome: ClientOutcome) {
        let gone = match outcome {
            ClientOutcome::Response {
                status,
                body,
                dialog,
                session_expires,
                ..
            } if (200..300).contains(&status) => {
                if let Some(d) = dialog.or_else(|| self.dialog.clone()) {
                    self.push(CallAction::Ack { dialog: d });
                }
                if let Ok(answer) = SessionDescription::from_bytes(&body) {
                    self.set_remote(&answer);
                }
                self.session_refreshed(session_expires);
                self.replicate();
                self.push(CallAction::Note(
                    "media moved to this node (re-INVITE answered)",
                ));
                false
            }
            ClientOutcome::Response { status, .. } => matches!(status, 408 | 481),
            ClientOutcome::Timeout => true,
            ClientOutcome::Failed(_) => false,
        };
        if gone {
            // The peer no longer knows the dialog (a record whose end was never written).
            self.push(CallAction::Note(
                "the peer no longer knows the dialog: the call ends",
            ));
            self.event(ended_by(
                self.key.1,
                EndReason::Failed,
                "the remote party no longer knows the call",
            ));
            self.close();
        }
    }

    fn end_with(&mut self, reason: EndReason) {
        let text = match reason {
            _ if self.transferred => "transferred",
            _ if self.replaced => "replaced",
            EndReason::LocalHangup => "hung up by the device",
            EndReason::MediaTimeout => "no media from the remote party",
            _ => "ended by the gateway",
        };
        self.event(ended_by(self.key.1, reason, text));
        self.close();
    }

    // ---- the peer's requests ----

    fn peer_request(&mut self, now: Instant, tx: ServerTx, request: Request) {
        let call_ref = self.key.1;
        match (&self.phase, &request.method) {
            (Phase::Ringing { tx: invite, .. }, Method::Bye) => {
                // The caller ends the early dialog: 200 to the BYE, 487 to the INVITE.
                let invite = *invite;
                self.respond(tx, 200, None, None, false);
                self.respond(invite, 487, None, None, false);
                self.event(ended_by(call_ref, EndReason::RemoteHangup, "BYE"));
                self.push(CallAction::InviteSettled);
                self.close();
                return;
            }
            (Phase::Up, _) => {}
            (_, Method::Invite | Method::Update) => {
                // No offer/answer before the call is answered.
                self.respond(tx, 491, None, None, false);
                return;
            }
            _ => {}
        }
        if let Some(arrived) = self.replica.takeover_arrived.take() {
            // Answered now, by what follows (before a BYE's answer closes the call).
            self.push(CallAction::TakeoverAnswered(
                now.saturating_duration_since(arrived),
            ));
        }
        let ended = self.answer_peer(tx, request);
        if ended {
            return;
        }
        // The media re-INVITE after a takeover, once nothing else is in flight.
        self.run_deferred();
    }

    /// Answers a request of the peer within the dialog; true when it ended the call.
    fn answer_peer(&mut self, tx: ServerTx, request: Request) -> bool {
        let call_ref = self.key.1;
        match request.method {
            Method::Bye => {
                self.respond(tx, 200, None, None, false);
                if self.is_ending() {
                    // BYE crossing ours: answered; the call ends when ours is.
                    return false;
                }
                self.event(ended_by(call_ref, EndReason::RemoteHangup, "BYE"));
                self.close();
                true
            }
            Method::Invite | Method::Update => {
                if matches!(
                    self.pending,
                    Some(Pending {
                        op: Op::Hold { .. } | Op::MediaReinvite | Op::Refresh { .. },
                        ..
                    })
                ) {
                    // Our own offer is pending (RFC 3261 14.2; RFC 3311 5.2).
                    self.push(CallAction::Respond {
                        tx,
                        status: 491,
                        reason: None,
                        body: None,
                        headers: vec![(HeaderName::RetryAfter, "1".into())],
                        report: false,
                    });
                    return false;
                }
                // The session timer: every re-INVITE or UPDATE of the peer is a refresh (RFC 4028
                // section 9), its interval checked against our minimum.
                let mut timer = None;
                if let Some(config) = self.settings.session_timer {
                    match config.negotiate_uas(&request.headers) {
                        Ok(UasTimer::Use(n)) => timer = Some(n),
                        Ok(UasTimer::TooBrief { min_se }) => {
                            self.push(CallAction::Respond {
                                tx,
                                status: 422,
                                reason: None,
                                body: None,
                                headers: vec![(HeaderName::MinSe, min_se.to_string())],
                                report: false,
                            });
                            return false;
                        }
                        Err(_) => {
                            self.respond(tx, 400, Some("Bad Session-Expires"), None, false);
                            return false;
                        }
                    }
                }
                let headers = timer.map(timer_answer_headers).unwrap_or_default();
                let refreshed = |core: &mut Self| {
                    if let (Some(n), Some(now)) = (timer, core.record.now) {
                        core.restart_timer(n, now);
                    }
                };
                let Ok(offer) = SessionDescription::from_bytes(&request.body) else {
                    // No offer: an UPDATE (a refresh) is answered without a body; an offerless
                    // re-INVITE with our current description as the offer.
                    let body = if request.method == Method::Invite {
                        self.sdp.last_local().and_then(Self::sdp_body)
                    } else {
                        None
                    };
                    self.push(CallAction::Respond {
                        tx,
                        status: 200,
                        reason: None,
                        body,
                        headers,
                        report: false,
                    });
                    refreshed(self);
                    return false;
                };
                let local = self.local_media();
                match self.sdp.create_answer(&offer, &local) {
                    Ok(answer) => {
                        self.set_remote(&offer);
                        self.push(CallAction::Respond {
                            tx,
                            status: 200,
                            reason: None,
                            body: Self::sdp_body(&answer),
                            headers,
                            report: false,
                        });
                        refreshed(self);
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
                    Err(_) => self.respond(tx, 488, None, None, false),
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
                self.respond(tx, 200, None, None, false);
                if let Some(digit) = digit {
                    self.send_device(
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
                self.send_device(
                    0,
                    Body::TextReceived(TextReceived {
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
                self.respond(tx, 200, None, None, false);
                false
            }
            Method::Options => {
                self.respond(tx, 200, None, None, false);
                false
            }
            Method::Notify => {
                self.transfer_notify(tx, &request);
                false
            }
            Method::Refer => {
                self.peer_refer(tx, &request);
                false
            }
            _ => {
                self.push(CallAction::Respond {
                    tx,
                    status: 405,
                    reason: None,
                    body: None,
                    headers: vec![(HeaderName::Allow, ALLOW.to_string())],
                    report: false,
                });
                false
            }
        }
    }
}

/// The metric label of an MBFP end reason.
pub fn reason_label(full: &str) -> &'static str {
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
