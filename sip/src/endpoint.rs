//! The sans-IO SIP endpoint: one user agent's transactions and dialogs behind one interface.
//!
//! Like quinn-proto's `Endpoint`, it is fed messages (`handle_message`), the transaction user's
//! decisions (`send_request`, `respond`, `send_ack`, `cancel`, dialog import/export) and
//! timestamps (`handle_timeout`), and it returns work through `poll_transmit`, `poll_event` and
//! `poll_timeout`. It validates requests (answering 400/505/... statelessly), runs the
//! transaction layer, keeps the dialog table in step with what is sent and received, answers
//! CANCEL (200, and 487 for the INVITE; a CANCEL for an INVITE not held here goes to the TU),
//! retransmits a UAS 2xx until its ACK (RFC 6026) and re-sends the ACK when a UAC sees a 2xx
//! again. For a cluster it adopts an INVITE another node was answering (`adopt_invite`: a
//! server transaction that keeps that node's To tag) and abandons one another node adopted
//! (`abandon`).
//!
//! It does not resolve names (the caller passes the destination [`Peer`]), own sockets, read a
//! clock, or decide how to answer a request: that is the transaction user (the gateway's
//! bridge, the simulator's buddy) through [`crate::ua`] or directly.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use crate::dialog::{
    Dialog, DialogId, DialogRecord, DialogState, Dialogs, DialogsConfig, DialogsError,
    RequestMatch, RequestRejection, TimerEvent,
};
use crate::message::{
    generate_branch, validate_request, validate_response, Host, Message, Method, NameAddr, Request,
    Response, SipUri, Transport, Uri, Via,
};
pub use crate::transaction::Peer;
use crate::transaction::{
    response_destination, RequestOutcome, TransactionConfig, TransactionError, TransactionEvent,
    TransactionKey, TransactionKind, TransactionLayer, Transmit,
};

/// Endpoint settings.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Transaction timers and limits.
    pub transactions: TransactionConfig,
    /// Dialog table limits and 2xx retransmission timers.
    pub dialogs: DialogsConfig,
    /// Value of the User-Agent / Server header, if any.
    pub user_agent: Option<String>,
    /// Source addresses exempt from the per-source transaction limits
    /// ([`TransactionConfig::per_source`]): trusted carriers, the balancer.
    pub exempt_sources: Vec<ipnet::IpNet>,
    /// The option tags (RFC 3261 section 19.2) the transaction user implements, such as
    /// `timer`: a request whose Require names any other is answered 420 (Bad Extension) with
    /// an Unsupported header listing them (section 8.2.2.3) and never reaches the TU.
    pub supported: Vec<String>,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            transactions: TransactionConfig::default(),
            dialogs: DialogsConfig::default(),
            user_agent: Some(concat!("thalamus/", env!("CARGO_PKG_VERSION")).to_string()),
            exempt_sources: Vec::new(),
            supported: Vec::new(),
        }
    }
}

/// What the transaction user must know or decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointEvent {
    /// A new request outside any dialog (INVITE, MESSAGE, OPTIONS, REGISTER...): answer it with
    /// [`Endpoint::respond`].
    Request {
        /// Its server transaction.
        key: TransactionKey,
        /// The request.
        request: Request,
        /// Where it came from.
        source: Peer,
    },
    /// A request within dialog `dialog` (BYE, re-INVITE, UPDATE, INFO, MESSAGE...): answer it
    /// with [`Endpoint::respond`] (BYE has already terminated the dialog).
    DialogRequest {
        /// Its server transaction.
        key: TransactionKey,
        /// The dialog.
        dialog: DialogId,
        /// The request.
        request: Request,
        /// Where it came from.
        source: Peer,
    },
    /// A request with a To tag for a dialog this endpoint does not hold, or a CANCEL for an
    /// INVITE it does not hold. A clustered TU loads the dialog's record from its store,
    /// [`Endpoint::import_dialog`]s it and calls [`Endpoint::redeliver`] (for a CANCEL: adopts
    /// the INVITE with [`Endpoint::adopt_invite`] and answers both); otherwise it answers 481
    /// with [`Endpoint::reject_unknown`].
    UnknownDialog {
        /// Its server transaction.
        key: TransactionKey,
        /// The request.
        request: Request,
        /// Where it came from.
        source: Peer,
    },
    /// The ACK of a 2xx arrived for `dialog`.
    Ack {
        /// The dialog.
        dialog: DialogId,
        /// The ACK (carries the answer when the offer was in the 2xx).
        request: Request,
    },
    /// The caller cancelled INVITE `invite`: the endpoint answered the CANCEL 200 and the INVITE
    /// 487 (unless the TU had already sent a final response).
    Cancelled {
        /// The INVITE server transaction.
        invite: TransactionKey,
    },
    /// A response to client transaction `key`. For an INVITE, `dialog` names the early or
    /// confirmed dialog it created or updated; after a 2xx the TU sends the ACK with
    /// [`Endpoint::send_ack`].
    Response {
        /// The client transaction.
        key: TransactionKey,
        /// The response.
        response: Response,
        /// The dialog it belongs to, if any.
        dialog: Option<DialogId>,
    },
    /// No final response to client transaction `key` (timer B or F): treat as 408.
    Timeout {
        /// The client transaction.
        key: TransactionKey,
    },
    /// Sending failed for transaction `key`.
    TransportError {
        /// The transaction.
        key: TransactionKey,
    },
    /// A 2xx we sent was never acknowledged (64*T1): the TU should send BYE.
    AckTimeout {
        /// The dialog.
        dialog: DialogId,
    },
    /// A reliable provisional response (RFC 3262) to INVITE `invite` was never PRACKed (64*T1):
    /// the endpoint answered the INVITE 504 (section 3: the UAS rejects it with a 5xx).
    PrackTimeout {
        /// The INVITE server transaction.
        invite: TransactionKey,
    },
    /// Transaction `key` ended (its key is dead).
    Terminated {
        /// The transaction.
        key: TransactionKey,
    },
}

/// Endpoint errors (the TU's mistakes or limits; never the network's).
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// From the transaction layer.
    #[error(transparent)]
    Transaction(#[from] TransactionError),
    /// From the dialog table.
    #[error(transparent)]
    Dialogs(#[from] DialogsError),
    /// From a dialog.
    #[error(transparent)]
    Dialog(#[from] crate::dialog::DialogError),
    /// No such dialog.
    #[error("no such dialog")]
    NoDialog,
    /// No such server transaction awaiting an answer.
    #[error("no such server transaction")]
    NoServerTransaction,
    /// A request that cannot be adopted (see [`Endpoint::adopt_invite`]).
    #[error("cannot adopt this request: {0}")]
    NotAdoptable(&'static str),
    /// A header could not be read.
    #[error(transparent)]
    Header(#[from] crate::message::HeaderError),
}

/// The option tag of reliable provisional responses (RFC 3262).
pub const RELIABLE_TAG: &str = "100rel";

/// The reliable provisional responses (RFC 3262) of one INVITE server transaction.
#[derive(Debug, Clone)]
struct Reliable {
    /// The RSeq of the latest one sent.
    last_rseq: u32,
    /// The one that waits for its PRACK, if any.
    waiting: Option<Unacked>,
}

/// A reliable provisional response waiting for its PRACK, retransmitted until then.
#[derive(Debug, Clone)]
struct Unacked {
    response: Response,
    dest: Peer,
    dialog: Option<DialogId>,
    rseq: u32,
    cseq: u32,
    interval: std::time::Duration,
    next_at: Instant,
    give_up_at: Instant,
}

/// A server transaction the TU has not answered with a final response yet.
#[derive(Debug, Clone)]
struct PendingServer {
    request: Request,
    source: Peer,
    dialog: Option<DialogId>,
    /// The To tag an adopted INVITE's responses carry (the one its first node gave it).
    to_tag: Option<String>,
}

/// Counters of what the endpoint refused.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EndpointStats {
    /// Requests answered statelessly because they failed validation.
    pub invalid_requests: u64,
    /// Responses dropped because they failed validation.
    pub invalid_responses: u64,
    /// Requests the transaction layer refused (malformed Via/CSeq, duplicates).
    pub refused_requests: u64,
    /// Requests for a dialog or an INVITE not held here answered 481 (`reject_unknown`).
    pub unknown_dialog: u64,
    /// Requests whose top Via carried `maddr` (ignored: responses go where the request came
    /// from, never to an address the sender names).
    pub via_maddr_ignored: u64,
    /// Early dialogs removed when the INVITE that created them ended without confirming them
    /// (a losing fork, a 1xx then a timeout or a transport error).
    pub early_dialogs_removed: u64,
    /// Requests answered 420 (Bad Extension): their Require named an option tag the TU does
    /// not implement.
    pub bad_extension: u64,
}

/// One user agent's transactions and dialogs.
#[derive(Debug)]
pub struct Endpoint {
    config: EndpointConfig,
    transactions: TransactionLayer,
    dialogs: Dialogs,
    servers: HashMap<TransactionKey, PendingServer>,
    /// Where the 2xx of a UAS dialog goes until its ACK arrives.
    pending_2xx_dest: HashMap<DialogId, Peer>,
    /// Where the ACK of a UAC dialog went (to re-send it on a retransmitted 2xx).
    ack_dest: HashMap<DialogId, Peer>,
    /// The INVITEs we sent outside a dialog, by client transaction: Call-ID and From tag, to
    /// remove the early dialogs they leave when the transaction ends.
    invites: HashMap<TransactionKey, (String, String)>,
    /// The SUBSCRIBEs we sent outside a dialog, by Call-ID and From tag, with their client
    /// transaction: a NOTIFY may create the subscription's dialog before the 2xx arrives (RFC
    /// 6665 section 4.1.2.4), and the 2xx creates it from the request (kept here: over a
    /// reliable transport the transaction is gone by the time its response is handled).
    subscribes: HashMap<(String, String), (TransactionKey, Request)>,
    /// The same, by client transaction (a response finds its SUBSCRIBE without a scan).
    subscribe_ids: HashMap<TransactionKey, (String, String)>,
    /// The INVITE being adopted and its To tag, while the layer's event for it is processed.
    adopting: Option<(TransactionKey, String)>,
    sent_by: HashMap<Transport, (Host, u16)>,
    /// Reliable provisional responses (RFC 3262), by INVITE server transaction.
    reliable: HashMap<TransactionKey, Reliable>,
    events: VecDeque<EndpointEvent>,
    stats: EndpointStats,
}

impl Endpoint {
    /// An endpoint with `config`.
    pub fn new(config: EndpointConfig) -> Self {
        let mut transactions = TransactionLayer::new(config.transactions);
        transactions.set_exempt_sources(config.exempt_sources.clone());
        Self {
            transactions,
            dialogs: Dialogs::new(config.dialogs),
            config,
            servers: HashMap::new(),
            pending_2xx_dest: HashMap::new(),
            ack_dest: HashMap::new(),
            invites: HashMap::new(),
            subscribes: HashMap::new(),
            subscribe_ids: HashMap::new(),
            adopting: None,
            sent_by: HashMap::new(),
            reliable: HashMap::new(),
            events: VecDeque::new(),
            stats: EndpointStats::default(),
        }
    }

    /// New transaction-table and per-source limits and exempt addresses (a configuration
    /// reload): transactions and dialogs in progress are untouched.
    pub fn set_limits(
        &mut self,
        max_transactions: usize,
        per_source: crate::transaction::SourceLimits,
        exempt: Vec<ipnet::IpNet>,
    ) {
        self.config.transactions.max_transactions = max_transactions;
        self.config.transactions.per_source = per_source;
        self.config.exempt_sources = exempt.clone();
        self.transactions
            .set_limits(max_transactions, per_source, exempt);
    }

    /// Sets the sent-by (Via host and port) this endpoint uses on `transport`.
    pub fn set_sent_by(&mut self, transport: Transport, host: Host, port: u16) {
        self.sent_by.insert(transport, (host, port));
    }

    /// A Contact for `user` on `transport`, from the sent-by of that transport.
    pub fn contact(&self, user: Option<&str>, transport: &Transport) -> NameAddr {
        let (host, port) = self
            .sent_by
            .get(transport)
            .or_else(|| self.sent_by.get(&Transport::Udp))
            .cloned()
            .unwrap_or((Host::Ipv4(std::net::Ipv4Addr::LOCALHOST), 5060));
        let mut uri = SipUri::new(host).with_port(port);
        if let Some(user) = user {
            uri = uri.with_user(user);
        }
        match transport {
            Transport::Tcp => uri = uri.with_param("transport", Some("tcp")),
            Transport::Tls => uri = uri.with_param("transport", Some("tls")),
            _ => {}
        }
        NameAddr::new(Uri::Sip(uri))
    }

    /// Counters.
    pub fn stats(&self) -> EndpointStats {
        self.stats
    }

    /// Requests the transaction layer refused for a limit (table full, per-source rate or
    /// share), or dropped.
    pub fn admission_stats(&self) -> crate::transaction::LayerAdmissionStats {
        self.transactions.admission_stats()
    }

    /// The dialog table (read-only).
    pub fn dialogs(&self) -> &Dialogs {
        &self.dialogs
    }

    /// A dialog.
    pub fn dialog(&self, id: &DialogId) -> Option<&Dialog> {
        self.dialogs.get(id)
    }

    /// Live transactions.
    pub fn transaction_count(&self) -> usize {
        self.transactions.len()
    }

    fn via_for(&self, transport: &Transport) -> Via {
        let (host, port) = self
            .sent_by
            .get(transport)
            .cloned()
            .unwrap_or((Host::Ipv4(std::net::Ipv4Addr::LOCALHOST), 5060));
        Via::new(transport.clone(), host, Some(port))
            .with_branch(&generate_branch())
            .with_rport()
    }

    // ----- input from the network -----

    /// Feeds one message received from `source`.
    pub fn handle_message(&mut self, now: Instant, message: Message, source: Peer) {
        match message {
            Message::Request(request) => self.handle_request(now, request, source),
            Message::Response(response) => {
                if validate_response(&response).is_err() {
                    self.stats.invalid_responses += 1;
                    return;
                }
                self.transactions.handle_response(now, response);
                self.process(now);
            }
        }
    }

    fn handle_request(&mut self, now: Instant, request: Request, source: Peer) {
        if request
            .headers
            .top_via()
            .is_ok_and(|via| via.maddr().is_some())
        {
            self.stats.via_maddr_ignored += 1;
        }
        // An INVITE must carry a Contact (RFC 3261 8.1.1.8): without one no dialog can be
        // built, so it is refused up front like any other malformed request.
        if request.method == Method::Invite
            && !request
                .headers
                .contains(&crate::message::HeaderName::Contact)
        {
            self.stats.invalid_requests += 1;
            if let Ok(via) = request.headers.top_via() {
                let mut response = Response::from_request(&request, 400, Some("Missing Contact"));
                self.decorate(&mut response);
                let dest = response_destination(&via, &source);
                self.transactions.send_stateless(dest, response);
            }
            return;
        }
        if let Err(invalid) = validate_request(&request) {
            self.stats.invalid_requests += 1;
            if request.method != Method::Ack {
                if let (Some(response), Ok(via)) =
                    (invalid.response(&request), request.headers.top_via())
                {
                    let dest = response_destination(&via, &source);
                    self.transactions.send_stateless(dest, response);
                }
            }
            return;
        }
        match self.transactions.handle_request(now, request, source) {
            Ok(RequestOutcome::Rejected) | Ok(_) => {}
            Err(_) => self.stats.refused_requests += 1,
        }
        self.process(now);
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.transactions.handle_timeout(now);
        for event in self.dialogs.handle_timeout(now) {
            match event {
                TimerEvent::Retransmit2xx { id, response } => {
                    if let Some(dest) = self.pending_2xx_dest.get(&id).cloned() {
                        self.transactions.send_stateless(dest, response);
                    }
                }
                TimerEvent::AckTimeout { id } => {
                    self.pending_2xx_dest.remove(&id);
                    self.events
                        .push_back(EndpointEvent::AckTimeout { dialog: id });
                }
            }
        }
        self.retransmit_reliable(now);
        self.process(now);
    }

    /// Retransmits the reliable provisional responses whose PRACK is late (T1, doubling each
    /// time, RFC 3262 section 3) and rejects with 504 the INVITEs whose PRACK never came.
    fn retransmit_reliable(&mut self, now: Instant) {
        let mut given_up = Vec::new();
        for (key, reliable) in &mut self.reliable {
            let Some(unacked) = &mut reliable.waiting else {
                continue;
            };
            if now >= unacked.give_up_at {
                given_up.push(*key);
                continue;
            }
            if now >= unacked.next_at {
                self.transactions
                    .send_stateless(unacked.dest, unacked.response.clone());
                unacked.interval = unacked.interval.saturating_mul(2);
                unacked.next_at = now + unacked.interval;
            }
        }
        for key in given_up {
            self.reliable.remove(&key);
            if self
                .respond(
                    now,
                    key,
                    504,
                    Some("Provisional Response Not Acknowledged"),
                    None,
                )
                .is_ok()
            {
                self.events
                    .push_back(EndpointEvent::PrackTimeout { invite: key });
            }
        }
    }

    /// A PRACK in the early dialog `dialog` (RFC 3262 section 3): 200 when its RAck names the
    /// reliable provisional response that waits (which stops its retransmissions), else 481.
    fn on_prack(
        &mut self,
        now: Instant,
        key: TransactionKey,
        request: &Request,
        dialog: &DialogId,
    ) {
        let rack = request
            .headers
            .text(&crate::message::HeaderName::RAck)
            .ok()
            .flatten()
            .and_then(parse_rack);
        let matched = rack.and_then(|(rseq, cseq, method)| {
            self.reliable.iter_mut().find_map(|(_, r)| {
                let u = r.waiting.as_ref()?;
                (u.dialog.as_ref() == Some(dialog)
                    && u.rseq == rseq
                    && u.cseq == cseq
                    && method.eq_ignore_ascii_case("INVITE"))
                .then(|| r.waiting.take())
            })
        });
        let status = if matched.is_some() { 200 } else { 481 };
        let mut response = Response::from_request(request, status, None);
        self.decorate(&mut response);
        let _ = self.transactions.respond(now, key, response);
    }

    /// The next instant [`Endpoint::handle_timeout`] must run.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let reliable = self
            .reliable
            .values()
            .filter_map(|r| r.waiting.as_ref())
            .map(|u| u.next_at.min(u.give_up_at))
            .min();
        [
            self.transactions.poll_timeout(),
            self.dialogs.poll_timeout(),
            reliable,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transactions.poll_transmit()
    }

    /// The next event for the TU.
    pub fn poll_event(&mut self) -> Option<EndpointEvent> {
        self.events.pop_front()
    }

    /// The transport failed to send `transmit`.
    pub fn handle_transport_error(&mut self, now: Instant, key: TransactionKey) {
        self.transactions.handle_transport_error(now, key);
        self.process(now);
    }

    /// Moves transaction events into dialog state and TU events.
    fn process(&mut self, now: Instant) {
        while let Some(event) = self.transactions.poll_event() {
            match event {
                TransactionEvent::Request {
                    key,
                    request,
                    source,
                } => self.on_request(now, key, request, source),
                TransactionEvent::Cancel {
                    key,
                    request,
                    source,
                    invite,
                } => self.on_cancel(now, key, &request, source, invite),
                TransactionEvent::Ack {
                    key: _,
                    request,
                    source: _,
                } => self.on_ack(request),
                TransactionEvent::Response { key, response } => self.on_response(key, response),
                TransactionEvent::StrayResponse { response } => {
                    // A 2xx retransmitted after the INVITE transaction ended: ACK it again.
                    if response.is_success() {
                        self.resend_ack(&response);
                    }
                }
                TransactionEvent::CancelSent { .. } => {}
                TransactionEvent::Timeout { key, timer: _ } => {
                    self.invite_ended(key);
                    self.reliable.remove(&key);
                    if self.servers.remove(&key).is_none() {
                        self.events.push_back(EndpointEvent::Timeout { key });
                    }
                }
                TransactionEvent::TransportError { key } => {
                    self.invite_ended(key);
                    self.events.push_back(EndpointEvent::TransportError { key });
                }
                TransactionEvent::Terminated { key } => {
                    self.invite_ended(key);
                    self.servers.remove(&key);
                    self.reliable.remove(&key);
                    self.events.push_back(EndpointEvent::Terminated { key });
                }
            }
        }
    }

    /// An INVITE client transaction ended (terminated after its final response, timed out, or
    /// failed to send): the early dialogs it created and no 2xx confirmed go (RFC 3261 section
    /// 13.2.2.4: once the INVITE transaction is over, a fork that answered only 1xx never will).
    fn invite_ended(&mut self, key: TransactionKey) {
        if let Some((call_id, from_tag)) = self.invites.remove(&key) {
            let removed = self.dialogs.terminate_early(&call_id, &from_tag);
            self.stats.early_dialogs_removed += removed.len() as u64;
        }
        if let Some(ids) = self.subscribe_ids.remove(&key) {
            // Unless a later transaction of the same SUBSCRIBE (a challenge answered) took it.
            if self.subscribes.get(&ids).is_some_and(|(k, _)| *k == key) {
                self.subscribes.remove(&ids);
            }
        }
    }

    /// The SUBSCRIBE we sent outside a dialog in client transaction `key`, with its Call-ID
    /// and From tag.
    fn subscribe_of(&self, key: TransactionKey) -> Option<(&(String, String), &Request)> {
        let ids = self.subscribe_ids.get(&key)?;
        let (k, request) = self.subscribes.get(ids)?;
        (*k == key).then_some((ids, request))
    }

    /// Our SUBSCRIBE outside a dialog (client transaction `key`) was refused: the dialog its
    /// early NOTIFY may have created goes (RFC 6665 section 4.1.2.4). True when `key` is such
    /// a SUBSCRIBE.
    fn refused_subscribe(&mut self, key: TransactionKey) -> bool {
        let Some((call_id, from_tag)) = self.subscribe_of(key).map(|(ids, _)| ids.clone()) else {
            return false;
        };
        let ids: Vec<DialogId> = self
            .dialogs
            .dialogs_of_call(&call_id)
            .filter(|d| d.id().local_tag == from_tag)
            .map(|d| d.id().clone())
            .collect();
        for id in ids {
            self.dialogs.remove(&id);
        }
        true
    }

    /// A NOTIFY with a To tag and no dialog: the first NOTIFY of a subscription whose 2xx has
    /// not arrived yet (it may take another path, or be lost) creates the dialog, as RFC 6665
    /// section 4.1.2.4 asks; true when it did.
    fn notify_creates_dialog(&mut self, request: &Request) -> bool {
        if request.method != Method::Notify || self.subscribes.is_empty() {
            return false;
        }
        let (Ok(call_id), Some(to_tag), Some(from_tag)) = (
            request.headers.call_id(),
            request.headers.to_tag(),
            request.headers.from_tag(),
        ) else {
            return false;
        };
        if self.dialogs.find(call_id, to_tag, from_tag).is_some() {
            return false;
        }
        let Some(dialog) = self
            .subscribes
            .get(&(call_id.to_string(), to_tag.to_string()))
            .and_then(|(_, subscribe)| Dialog::new_subscriber(subscribe, request).ok())
        else {
            return false;
        };
        self.dialogs.insert(dialog).is_ok()
    }

    fn on_request(&mut self, now: Instant, key: TransactionKey, request: Request, source: Peer) {
        if self.refuse_extensions(now, key, &request) {
            return;
        }
        let has_to_tag = request.headers.to_tag().is_some();
        if !has_to_tag {
            if let Some((adopted, to_tag)) = self.adopting.take() {
                if adopted == key {
                    // Adopted: the TU already knows it; no event.
                    self.servers.insert(
                        key,
                        PendingServer {
                            request,
                            source,
                            dialog: None,
                            to_tag: Some(to_tag),
                        },
                    );
                    return;
                }
                self.adopting = Some((adopted, to_tag));
            }
            self.servers.insert(
                key,
                PendingServer {
                    request: request.clone(),
                    source,
                    dialog: None,
                    to_tag: None,
                },
            );
            self.events.push_back(EndpointEvent::Request {
                key,
                request,
                source,
            });
            return;
        }
        self.notify_creates_dialog(&request);
        match self.dialogs.receive_request(&request) {
            RequestMatch::Accepted(dialog, _) => {
                let id = dialog.id().clone();
                if request.method == Method::Prack {
                    self.on_prack(now, key, &request, &id);
                    return;
                }
                self.servers.insert(
                    key,
                    PendingServer {
                        request: request.clone(),
                        source,
                        dialog: Some(id.clone()),
                        to_tag: None,
                    },
                );
                self.events.push_back(EndpointEvent::DialogRequest {
                    key,
                    dialog: id,
                    request,
                    source,
                });
            }
            RequestMatch::Rejected(RequestRejection::NoDialog) => {
                self.servers.insert(
                    key,
                    PendingServer {
                        request: request.clone(),
                        source,
                        dialog: None,
                        to_tag: None,
                    },
                );
                self.events.push_back(EndpointEvent::UnknownDialog {
                    key,
                    request,
                    source,
                });
            }
            RequestMatch::Rejected(rejection) => {
                let mut response = Response::from_request(&request, rejection.status(), None);
                self.decorate(&mut response);
                let _ = self.transactions.respond(now, key, response);
            }
            RequestMatch::OutOfDialog => {}
        }
    }

    /// RFC 3261 section 8.2.2.3: a request (not CANCEL, not ACK) whose Require names option
    /// tags the TU does not implement ([`EndpointConfig::supported`]) is answered 420 with an
    /// Unsupported header listing them; true when it was. A Require that is not a list of
    /// tokens gets 400.
    fn refuse_extensions(&mut self, now: Instant, key: TransactionKey, request: &Request) -> bool {
        if matches!(request.method, Method::Ack | Method::Cancel)
            || !request
                .headers
                .contains(&crate::message::HeaderName::Require)
        {
            return false;
        }
        let response = match request.headers.require() {
            Ok(tags) => {
                let unsupported: Vec<&str> = tags
                    .into_iter()
                    .filter(|t| {
                        !self
                            .config
                            .supported
                            .iter()
                            .any(|s| s.eq_ignore_ascii_case(t))
                    })
                    .collect();
                if unsupported.is_empty() {
                    return false;
                }
                let mut response = Response::from_request(request, 420, None);
                response
                    .headers
                    .set_list(crate::message::HeaderName::Unsupported, &unsupported);
                response
            }
            Err(_) => Response::from_request(request, 400, Some("Bad Require")),
        };
        self.stats.bad_extension += 1;
        let mut response = response;
        // RFC 3261 8.2.6.2: a final response outside a dialog carries a To tag.
        if request.headers.to_tag().is_none() {
            response.set_to_tag(&crate::message::generate_tag());
        }
        self.decorate(&mut response);
        let _ = self.transactions.respond(now, key, response);
        true
    }

    fn on_cancel(
        &mut self,
        now: Instant,
        key: TransactionKey,
        cancel: &Request,
        source: Peer,
        invite: Option<TransactionKey>,
    ) {
        let Some(invite) = invite else {
            // No INVITE here to cancel: the TU answers (481 by `reject_unknown`, or, in a
            // cluster, after adopting the INVITE another node was ringing).
            self.servers.insert(
                key,
                PendingServer {
                    request: cancel.clone(),
                    source,
                    dialog: None,
                    to_tag: None,
                },
            );
            self.events.push_back(EndpointEvent::UnknownDialog {
                key,
                request: cancel.clone(),
                source,
            });
            return;
        };
        let mut ok = Response::from_request(cancel, 200, None);
        self.decorate(&mut ok);
        let _ = self.transactions.respond(now, key, ok);
        // The TU forgets a server transaction when it sends its final response.
        if self.servers.contains_key(&invite) {
            let _ = self.respond(now, invite, 487, None, None);
            self.events.push_back(EndpointEvent::Cancelled { invite });
        }
    }

    fn on_ack(&mut self, request: Request) {
        if let RequestMatch::Accepted(dialog, _) = self.dialogs.receive_request(&request) {
            let id = dialog.id().clone();
            self.pending_2xx_dest.remove(&id);
            self.events.push_back(EndpointEvent::Ack {
                dialog: id,
                request,
            });
        }
    }

    fn on_response(&mut self, key: TransactionKey, response: Response) {
        let mut dialog = None;
        if self.transactions.kind(key) == Some(TransactionKind::InviteClient) {
            if let Some(invite) = self.transactions.client_request(key) {
                if let Ok((_, Some(d))) = self.dialogs.receive_invite_response(invite, &response) {
                    dialog = Some(d.id().clone());
                }
            }
            if response.is_success() && self.resend_ack(&response) {
                // A retransmitted 2xx we had already acknowledged: nothing new for the TU.
                return;
            }
        } else if response.status >= 300 && self.refused_subscribe(key) {
            // A refused SUBSCRIBE: the dialog an early NOTIFY made for it is gone.
        } else if let (_, Some(d)) = self.dialogs.receive_response(&response) {
            dialog = Some(d.id().clone());
        } else if response.is_success() {
            // A 2xx to a SUBSCRIBE we sent creates its dialog (RFC 6665 section 4.1.2.1).
            let created = self
                .subscribe_of(key)
                .and_then(|(_, r)| Dialog::new_uac(r, &response).ok());
            if let Some(d) = created {
                if let Ok(d) = self.dialogs.insert(d) {
                    dialog = Some(d.id().clone());
                }
            }
        }
        self.events.push_back(EndpointEvent::Response {
            key,
            response,
            dialog,
        });
    }

    /// Re-sends the remembered ACK of the dialog a retransmitted 2xx belongs to. Returns true
    /// when there was one.
    fn resend_ack(&mut self, response: &Response) -> bool {
        let Some(dialog) = self.dialogs.find_for_response(response) else {
            return false;
        };
        let id = dialog.id().clone();
        let Some(ack) = dialog.ack_to_resend().cloned() else {
            return false;
        };
        let Some(dest) = self.ack_dest.get(&id).cloned() else {
            return false;
        };
        self.transactions.send_stateless(dest, ack);
        true
    }

    fn decorate(&self, response: &mut Response) {
        if let Some(ua) = &self.config.user_agent {
            if !response
                .headers
                .contains(&crate::message::HeaderName::Server)
            {
                response
                    .headers
                    .push(crate::message::HeaderName::Server, ua.as_str());
            }
        }
    }

    // ----- the TU's side -----

    /// Sends `request` (not ACK) to `destination` in a new client transaction. The endpoint adds
    /// the top Via (sent-by of the destination's transport, a new branch, `rport`) and
    /// Max-Forwards 70 when absent.
    pub fn send_request(
        &mut self,
        now: Instant,
        mut request: Request,
        destination: Peer,
    ) -> Result<TransactionKey, EndpointError> {
        let via = self.via_for(&destination.transport.as_transport());
        request.headers.prepend_via(&via);
        if request.headers.max_forwards().ok().flatten().is_none() {
            request.headers.set_max_forwards(70);
        }
        if let Some(ua) = &self.config.user_agent {
            if !request
                .headers
                .contains(&crate::message::HeaderName::UserAgent)
            {
                request
                    .headers
                    .push(crate::message::HeaderName::UserAgent, ua.as_str());
            }
        }
        let invite = (request.method == Method::Invite && request.headers.to_tag().is_none())
            .then(|| {
                let call_id = request.headers.call_id().ok()?.to_string();
                let from_tag = request.headers.from_tag()?.to_string();
                Some((call_id, from_tag))
            })
            .flatten();
        let subscribe = (request.method == Method::Subscribe && request.headers.to_tag().is_none())
            .then(|| {
                let call_id = request.headers.call_id().ok()?.to_string();
                let from_tag = request.headers.from_tag()?.to_string();
                Some(((call_id, from_tag), request.clone()))
            })
            .flatten();
        let key = self.transactions.send_request(now, request, destination)?;
        if let Some(invite) = invite {
            self.invites.insert(key, invite);
        }
        if let Some((ids, request)) = subscribe {
            self.subscribe_ids.insert(key, ids.clone());
            self.subscribes.insert(ids, (key, request));
        }
        self.process(now);
        Ok(key)
    }

    /// Cancels INVITE client transaction `invite` (sent when a provisional response has come).
    pub fn cancel(&mut self, now: Instant, invite: TransactionKey) -> Result<(), EndpointError> {
        self.transactions.cancel(now, invite)?;
        self.process(now);
        Ok(())
    }

    /// Builds a request within dialog `dialog` (CSeq incremented, Route and Request-URI per the
    /// route set). Add a body if needed, then pass it to [`Endpoint::send_request`] toward the
    /// resolved [`Endpoint::next_hop`].
    pub fn dialog_request(
        &mut self,
        dialog: &DialogId,
        method: Method,
    ) -> Result<Request, EndpointError> {
        let d = self
            .dialogs
            .get_mut(dialog)
            .ok_or(EndpointError::NoDialog)?;
        Ok(d.create_request(method)?)
    }

    /// The URI to resolve for the next request in `dialog`.
    pub fn next_hop(&self, dialog: &DialogId) -> Result<Uri, EndpointError> {
        let d = self.dialogs.get(dialog).ok_or(EndpointError::NoDialog)?;
        Ok(d.next_hop()?)
    }

    /// Sends the ACK of the 2xx that confirmed UAC dialog `dialog` to `destination` (the
    /// resolved next hop), and remembers it for retransmitted 2xx.
    pub fn send_ack(
        &mut self,
        dialog: &DialogId,
        destination: Peer,
        body: Option<(bytes::Bytes, crate::message::MediaType)>,
    ) -> Result<(), EndpointError> {
        let via = self.via_for(&destination.transport.as_transport());
        let d = self
            .dialogs
            .get_mut(dialog)
            .ok_or(EndpointError::NoDialog)?;
        let mut ack = d.create_ack()?;
        ack.headers.prepend_via(&via);
        if let Some((body, media_type)) = body {
            ack.set_body(body, Some(&media_type));
        }
        d.remember_ack(ack.clone());
        self.ack_dest.insert(dialog.clone(), destination);
        self.transactions.send_stateless(destination, ack);
        Ok(())
    }

    /// Answers server transaction `key` with `status`. For an INVITE, a 101-299 response
    /// creates the UAS dialog (To tag and Contact added when missing) and a 2xx is retransmitted
    /// until its ACK. Returns the dialog the response belongs to.
    pub fn respond(
        &mut self,
        now: Instant,
        key: TransactionKey,
        status: u16,
        reason: Option<&str>,
        body: Option<(bytes::Bytes, crate::message::MediaType)>,
    ) -> Result<Option<DialogId>, EndpointError> {
        self.respond_extended(now, key, status, reason, body, Vec::new())
    }

    /// [`Endpoint::respond`] with extra header fields (Allow, Unsupported, Warning...).
    pub fn respond_extended(
        &mut self,
        now: Instant,
        key: TransactionKey,
        status: u16,
        reason: Option<&str>,
        body: Option<(bytes::Bytes, crate::message::MediaType)>,
        extra: Vec<(crate::message::HeaderName, String)>,
    ) -> Result<Option<DialogId>, EndpointError> {
        let pending = self
            .servers
            .get(&key)
            .cloned()
            .ok_or(EndpointError::NoServerTransaction)?;
        let request = &pending.request;
        let mut response = match &pending.dialog {
            Some(id) => {
                let d = self.dialogs.get(id).ok_or(EndpointError::NoDialog)?;
                d.create_response(request, status, reason)
            }
            None => {
                let mut r = Response::from_request(request, status, reason);
                if matches!(request.method, Method::Invite | Method::Subscribe) && status > 100 {
                    let tag = pending
                        .to_tag
                        .clone()
                        .unwrap_or_else(crate::message::generate_tag);
                    r.set_to_tag(&tag);
                    if (101..300).contains(&status) {
                        for rr in request.headers.record_route().unwrap_or_default() {
                            r.headers
                                .push(crate::message::HeaderName::RecordRoute, rr.to_string());
                        }
                    }
                }
                r
            }
        };
        for (name, value) in extra {
            response.headers.push(name, value);
        }
        self.respond_with(now, key, &mut response, body)
    }

    /// Answers server transaction `key` with a response the TU built (Via, From, To, Call-ID
    /// and CSeq copied from the request; see [`Response::from_request`]). Returns the dialog
    /// the response belongs to.
    pub fn respond_with(
        &mut self,
        now: Instant,
        key: TransactionKey,
        response: &mut Response,
        body: Option<(bytes::Bytes, crate::message::MediaType)>,
    ) -> Result<Option<DialogId>, EndpointError> {
        let pending = self
            .servers
            .get(&key)
            .cloned()
            .ok_or(EndpointError::NoServerTransaction)?;
        let request = &pending.request;
        if let Some((body, media_type)) = body {
            response.set_body(body, Some(&media_type));
        }
        let needs_contact = request.method == Method::Invite
            || request.method == Method::Update
            || request.method == Method::Subscribe;
        if needs_contact
            && (101..300).contains(&response.status)
            && !response
                .headers
                .contains(&crate::message::HeaderName::Contact)
        {
            let user = request.uri.user().map(str::to_string);
            let contact = self.contact(user.as_deref(), &pending.source.transport.as_transport());
            response.headers.push_contact(&contact);
        }
        self.decorate(response);
        let mut dialog = pending.dialog.clone();
        if matches!(request.method, Method::Invite | Method::Subscribe) || dialog.is_some() {
            if let Some(d) = self.dialogs.response_sent(request, response, now)? {
                dialog = Some(d.id().clone());
                if d.state() == DialogState::Terminated {
                    dialog = None;
                }
            }
        }
        if response.is_success() && request.method == Method::Invite {
            if let (Some(id), Ok(via)) = (&dialog, request.headers.top_via()) {
                self.pending_2xx_dest
                    .insert(id.clone(), response_destination(&via, &pending.source));
            }
        }
        let final_response = response.status >= 200;
        if request.method == Method::Invite
            && (101..200).contains(&response.status)
            && response
                .headers
                .require()
                .is_ok_and(|tags| tags.iter().any(|t| t.eq_ignore_ascii_case(RELIABLE_TAG)))
        {
            self.send_reliably(now, key, &pending, response, dialog.clone())?;
        }
        self.transactions.respond(now, key, response.clone())?;
        if final_response {
            // The transaction keeps what it needs; the TU is done with this request.
            self.servers.remove(&key);
            self.reliable.remove(&key);
        } else if let Some(s) = self.servers.get_mut(&key) {
            s.dialog.clone_from(&dialog);
        }
        self.process(now);
        Ok(dialog)
    }

    /// Makes `response` (a provisional response with `Require: 100rel`) reliable: the next
    /// RSeq (the first one random, RFC 3262 section 3), retransmitted until its PRACK. A
    /// second one while the first still waits replaces it (the TU sends one at a time).
    fn send_reliably(
        &mut self,
        now: Instant,
        key: TransactionKey,
        pending: &PendingServer,
        response: &mut Response,
        dialog: Option<DialogId>,
    ) -> Result<(), EndpointError> {
        let via = pending.request.headers.top_via()?;
        let cseq = pending.request.headers.cseq()?.seq;
        let reliable = self.reliable.entry(key).or_insert_with(|| Reliable {
            // Below 2^30: a call never runs out of numbers.
            last_rseq: crate::rng::with(|r| r.next_u32() % (1 << 30)),
            waiting: None,
        });
        reliable.last_rseq += 1;
        let rseq = reliable.last_rseq;
        response.headers.set(crate::message::HeaderName::RSeq, rseq);
        let t1 = self.config.transactions.timers.t1;
        reliable.waiting = Some(Unacked {
            response: response.clone(),
            dest: response_destination(&via, &pending.source),
            dialog,
            rseq,
            cseq,
            interval: t1,
            next_at: now + t1,
            give_up_at: now + t1 * 64,
        });
        Ok(())
    }

    /// Answers an [`EndpointEvent::UnknownDialog`] request 481 (the TU could not take the dialog
    /// over).
    pub fn reject_unknown(&mut self, now: Instant, key: TransactionKey) {
        self.stats.unknown_dialog += 1;
        let _ = self.respond(now, key, 481, None, None);
    }

    /// Delivers an [`EndpointEvent::UnknownDialog`] request again after the TU imported its
    /// dialog: it comes back as [`EndpointEvent::DialogRequest`] (or is rejected by the dialog,
    /// e.g. 500 for an old CSeq). A CANCEL, after the TU adopted its INVITE, cancels it (200,
    /// 487, [`EndpointEvent::Cancelled`]); with no INVITE to cancel it is answered 481.
    pub fn redeliver(&mut self, now: Instant, key: TransactionKey) {
        let Some(pending) = self.servers.remove(&key) else {
            return;
        };
        if pending.request.method == Method::Cancel {
            // A CANCEL whose INVITE the TU adopted: 200, and 487 to the INVITE.
            match self.transactions.cancel_target(&pending.request) {
                Some(invite) => {
                    self.on_cancel(now, key, &pending.request, pending.source, Some(invite));
                }
                None => {
                    self.servers.insert(key, pending);
                    self.reject_unknown(now, key);
                }
            }
            return;
        }
        self.on_request(now, key, pending.request, pending.source);
    }

    /// Adopts an INVITE that another node received and answered provisionally with To tag
    /// `to_tag` (its early dialog was replicated, and that node died): a server transaction is
    /// created for it as if it had just arrived from `source`, but no
    /// [`EndpointEvent::Request`] is raised (the TU adopting it knows it already). Its
    /// responses carry `to_tag`, so the caller sees one early dialog continue; its
    /// retransmissions and CANCEL now match here. Counts against the transaction limits like
    /// any request: refused by them, the layer answers the caller 503 (as for any request
    /// over its limits) and the adoption fails.
    pub fn adopt_invite(
        &mut self,
        now: Instant,
        request: Request,
        source: Peer,
        to_tag: String,
    ) -> Result<TransactionKey, EndpointError> {
        if request.method != Method::Invite {
            return Err(EndpointError::NotAdoptable("not an INVITE"));
        }
        if request.headers.to_tag().is_some() {
            return Err(EndpointError::NotAdoptable("an INVITE within a dialog"));
        }
        if to_tag.is_empty() {
            return Err(EndpointError::NotAdoptable("no To tag"));
        }
        validate_request(&request).map_err(|_| EndpointError::NotAdoptable("invalid request"))?;
        match self.transactions.handle_request(now, request, source)? {
            RequestOutcome::Created(key) => {
                self.adopting = Some((key, to_tag));
                self.process(now);
                self.adopting = None;
                if self.servers.contains_key(&key) {
                    Ok(key)
                } else {
                    Err(EndpointError::NoServerTransaction)
                }
            }
            RequestOutcome::Retransmission(_) => {
                Err(EndpointError::NotAdoptable("the INVITE is already here"))
            }
            _ => Err(EndpointError::NotAdoptable(
                "refused by the transaction limits",
            )),
        }
    }

    /// Abandons server transaction `key` without answering it: an INVITE another node adopted
    /// (this one was frozen, and the caller's transaction continues there; its early dialog
    /// goes too), or a request the TU drops for its sender to retransmit. Returns whether there
    /// was one.
    pub fn abandon(&mut self, now: Instant, key: TransactionKey) -> bool {
        let Some(pending) = self.servers.remove(&key) else {
            return false;
        };
        if let Some(id) = &pending.dialog {
            self.dialogs.remove(id);
        }
        self.transactions.abandon(key);
        self.process(now);
        true
    }

    /// Exports dialog `id` for replication.
    pub fn export_dialog(&self, id: &DialogId) -> Option<DialogRecord> {
        self.dialogs.get(id).map(Dialog::export)
    }

    /// Imports a dialog exported on another node (or before a restart).
    pub fn import_dialog(&mut self, record: &DialogRecord) -> Result<DialogId, EndpointError> {
        if let Some(existing) =
            self.dialogs
                .find(&record.call_id, &record.local_tag, &record.remote_tag)
        {
            return Ok(existing.id().clone());
        }
        Ok(self.dialogs.import(record)?.id().clone())
    }

    /// Forgets dialog `id` (after BYE, or when the TU ends it).
    pub fn remove_dialog(&mut self, id: &DialogId) -> Option<Dialog> {
        self.pending_2xx_dest.remove(id);
        self.ack_dest.remove(id);
        self.dialogs.remove(id)
    }
}

/// `RAck: <rseq> <cseq> <method>` (RFC 3262 section 7.2).
fn parse_rack(text: &str) -> Option<(u32, u32, &str)> {
    let mut parts = text.split_ascii_whitespace();
    let rseq = parts.next()?.parse().ok()?;
    let cseq = parts.next()?.parse().ok()?;
    let method = parts.next()?;
    parts.next().is_none().then_some((rseq, cseq, method))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::HeaderName;
    use bytes::Bytes;
    use std::net::SocketAddr;
    use std::time::Duration;

    fn peer(port: u16) -> Peer {
        Peer::udp(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn endpoint(port: u16) -> Endpoint {
        let mut e = Endpoint::new(EndpointConfig::default());
        e.set_sent_by(Transport::Udp, Host::Ipv4([127, 0, 0, 1].into()), port);
        e
    }

    fn invite(to: &str) -> Request {
        let mut r = Request::new(Method::Invite, Uri::parse(to).unwrap());
        let from: NameAddr = "<sip:alice@127.0.0.1:5061>;tag=a1".parse().unwrap();
        r.headers.set_from(&from);
        r.headers.set_to(&NameAddr::new(Uri::parse(to).unwrap()));
        r.headers.set_call_id("call-1@test");
        r.headers
            .set_cseq(&crate::message::CSeq::new(1, Method::Invite));
        r.headers
            .push_contact(&"<sip:alice@127.0.0.1:5061>".parse().unwrap());
        r
    }

    /// Moves every transmit of `from` into `to` as if the network delivered it.
    /// A SUBSCRIBE (Event: presence) from alice to `to`, outside a dialog.
    fn subscribe_request(to: &str) -> Request {
        let mut subscribe = invite(to);
        subscribe.method = Method::Subscribe;
        subscribe
            .headers
            .set_cseq(&crate::message::CSeq::new(1, Method::Subscribe));
        subscribe.headers.push(HeaderName::Event, "presence");
        subscribe
    }

    fn deliver(now: Instant, from: &mut Endpoint, from_peer: &Peer, to: &mut Endpoint) -> usize {
        let mut n = 0;
        while let Some(t) = from.poll_transmit() {
            let msg = Message::parse(t.payload.clone()).unwrap();
            to.handle_message(now, msg, *from_peer);
            n += 1;
        }
        n
    }

    fn events(e: &mut Endpoint) -> Vec<EndpointEvent> {
        std::iter::from_fn(|| e.poll_event()).collect()
    }

    #[test]
    fn whole_call_between_two_endpoints() {
        let t0 = Instant::now();
        let (pa, pb) = (peer(5061), peer(5062));
        let (mut a, mut b) = (endpoint(5061), endpoint(5062));
        let key = a
            .send_request(t0, invite("sip:bob@127.0.0.1:5062"), pb)
            .unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        let evs = events(&mut b);
        let EndpointEvent::Request { key: skey, .. } = &evs[0] else {
            panic!("{evs:?}")
        };
        let sdp = (
            Bytes::from_static(b"v=0\r\n"),
            crate::message::MediaType::sdp(),
        );
        let dialog_b = b.respond(t0, *skey, 200, None, Some(sdp)).unwrap().unwrap();
        deliver(t0, &mut b, &pb, &mut a);
        let evs = events(&mut a);
        let dialog_a = match &evs[..] {
            [EndpointEvent::Response {
                key: k,
                response,
                dialog: Some(d),
            }, ..] => {
                assert_eq!(*k, key);
                assert_eq!(response.status, 200);
                d.clone()
            }
            other => panic!("{other:?}"),
        };
        a.send_ack(&dialog_a, pb, None).unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        assert!(events(&mut b)
            .iter()
            .any(|e| matches!(e, EndpointEvent::Ack { dialog, .. } if *dialog == dialog_b)));
        // No 2xx retransmission after the ACK.
        b.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(deliver(t0, &mut b, &pb, &mut a), 0);

        // B hangs up.
        let bye = b.dialog_request(&dialog_b, Method::Bye).unwrap();
        b.send_request(t0, bye, pa).unwrap();
        deliver(t0, &mut b, &pb, &mut a);
        let evs = events(&mut a);
        let EndpointEvent::DialogRequest {
            key: bye_key,
            dialog,
            request,
            ..
        } = &evs[0]
        else {
            panic!("{evs:?}")
        };
        assert_eq!(*dialog, dialog_a);
        assert_eq!(request.method, Method::Bye);
        a.respond(t0, *bye_key, 200, None, None).unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        assert!(events(&mut b).iter().any(|e| matches!(
            e,
            EndpointEvent::Response { response, .. } if response.status == 200
        )));
    }

    /// A reliable 180 from B (UAS) to A (UAC): returns both endpoints, B's INVITE transaction,
    /// A's early dialog and the 180 as A received it.
    fn reliable_ringing(t0: Instant) -> (Endpoint, Endpoint, TransactionKey, DialogId, Response) {
        let pb = peer(5062);
        let pa = peer(5061);
        let mut a = endpoint(5061);
        let mut b = Endpoint::new(EndpointConfig {
            supported: vec![RELIABLE_TAG.into()],
            ..EndpointConfig::default()
        });
        b.set_sent_by(Transport::Udp, Host::Ipv4([127, 0, 0, 1].into()), 5062);
        let mut request = invite("sip:bob@127.0.0.1:5062");
        request.headers.push(HeaderName::Require, RELIABLE_TAG);
        a.send_request(t0, request, pb).unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        let evs = events(&mut b);
        let EndpointEvent::Request { key, .. } = &evs[0] else {
            panic!("{evs:?}")
        };
        let key = *key;
        b.respond_extended(
            t0,
            key,
            180,
            None,
            None,
            vec![(HeaderName::Require, RELIABLE_TAG.into())],
        )
        .unwrap();
        let t = b.poll_transmit().unwrap();
        let Ok(Message::Response(ringing)) = Message::parse(t.payload.clone()) else {
            panic!("not a response");
        };
        a.handle_message(t0, Message::Response(ringing.clone()), pb);
        let evs = events(&mut a);
        let Some(EndpointEvent::Response {
            dialog: Some(early),
            ..
        }) = evs.first()
        else {
            panic!("{evs:?}")
        };
        (a, b, key, early.clone(), ringing)
    }

    #[test]
    fn a_reliable_provisional_is_retransmitted_until_its_prack() {
        let t0 = Instant::now();
        let (pa, pb) = (peer(5061), peer(5062));
        let (mut a, mut b, _, early, ringing) = reliable_ringing(t0);
        let rseq: u32 = ringing
            .headers
            .text(&HeaderName::RSeq)
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..1 << 31).contains(&rseq));
        // Not acknowledged: again after T1 (500 ms), then 2*T1 later.
        let t1 = Duration::from_millis(500);
        assert_eq!(b.poll_timeout(), Some(t0 + t1));
        b.handle_timeout(t0 + t1);
        let again = b.poll_transmit().expect("a retransmission");
        assert!(String::from_utf8_lossy(&again.payload).contains(&format!("RSeq: {rseq}")));
        assert_eq!(b.poll_timeout(), Some(t0 + t1 + t1 * 2));
        // A PRACK naming another response: 481, and the retransmissions go on. (Both PRACKs
        // are built first: a 481 ends A's early dialog, RFC 3261 section 12.2.1.2.)
        let mut wrong = a.dialog_request(&early, Method::Prack).unwrap();
        wrong
            .headers
            .push(HeaderName::RAck, format!("{} 1 INVITE", rseq + 1));
        let mut prack = a.dialog_request(&early, Method::Prack).unwrap();
        prack
            .headers
            .push(HeaderName::RAck, format!("{rseq} 1 INVITE"));
        a.send_request(t0, wrong, pb).unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        assert!(events(&mut b).is_empty(), "the TU never sees a PRACK");
        deliver(t0, &mut b, &pb, &mut a);
        assert!(events(&mut a).iter().any(|e| matches!(
            e,
            EndpointEvent::Response { response, .. } if response.status == 481
        )));
        // The right one: 200, and no more retransmissions.
        a.send_request(t0, prack, pb).unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        deliver(t0, &mut b, &pb, &mut a);
        assert!(events(&mut a).iter().any(|e| matches!(
            e,
            EndpointEvent::Response { response, .. } if response.status == 200
        )));
        b.handle_timeout(t0 + t1 * 3);
        assert!(b.poll_transmit().is_none());
    }

    #[test]
    fn an_invite_whose_reliable_provisional_is_never_pracked_gets_504() {
        let t0 = Instant::now();
        let (_a, mut b, key, _, _) = reliable_ringing(t0);
        let mut sent = 0;
        // Bounded: 64*T1 is 32 s; the retransmissions double from 500 ms.
        for _ in 0..20 {
            let Some(now) = b.poll_timeout() else { break };
            b.handle_timeout(now);
            while let Some(t) = b.poll_transmit() {
                let Ok(Message::Response(r)) = Message::parse(t.payload.clone()) else {
                    continue;
                };
                if r.status == 504 {
                    assert!(now >= t0 + Duration::from_secs(32));
                    assert!(events(&mut b).iter().any(
                        |e| matches!(e, EndpointEvent::PrackTimeout { invite } if *invite == key)
                    ));
                    assert!(sent >= 5, "retransmitted {sent} times");
                    return;
                }
                sent += 1;
            }
        }
        panic!("no 504 after {sent} retransmissions");
    }

    #[test]
    fn uas_2xx_is_retransmitted_until_ack_then_ack_timeout() {
        let t0 = Instant::now();
        let (pa, pb) = (peer(5061), peer(5062));
        let (mut a, mut b) = (endpoint(5061), endpoint(5062));
        a.send_request(t0, invite("sip:bob@127.0.0.1:5062"), pb)
            .unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        let EndpointEvent::Request { key, .. } = events(&mut b).remove(0) else {
            panic!()
        };
        b.respond(t0, key, 200, None, None).unwrap();
        assert_eq!(b.poll_transmit().map(|t| t.destination), Some(pa));
        // T1 later the 2xx goes again, then 2T1 later...
        b.handle_timeout(t0 + Duration::from_millis(500));
        assert!(b.poll_transmit().is_some());
        b.handle_timeout(t0 + Duration::from_millis(1500));
        assert!(b.poll_transmit().is_some());
        b.handle_timeout(t0 + Duration::from_secs(40));
        assert!(events(&mut b)
            .iter()
            .any(|e| matches!(e, EndpointEvent::AckTimeout { .. })));
    }

    #[test]
    fn cancel_answers_200_and_487() {
        let t0 = Instant::now();
        let (pa, pb) = (peer(5061), peer(5062));
        let (mut a, mut b) = (endpoint(5061), endpoint(5062));
        let key = a
            .send_request(t0, invite("sip:bob@127.0.0.1:5062"), pb)
            .unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        let EndpointEvent::Request { key: skey, .. } = events(&mut b).remove(0) else {
            panic!()
        };
        b.respond(t0, skey, 180, None, None).unwrap();
        deliver(t0, &mut b, &pb, &mut a);
        events(&mut a);
        a.cancel(t0, key).unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        assert!(events(&mut b)
            .iter()
            .any(|e| matches!(e, EndpointEvent::Cancelled { invite } if *invite == skey)));
        deliver(t0, &mut b, &pb, &mut a);
        let evs = events(&mut a);
        assert!(evs.iter().any(|e| matches!(
            e,
            EndpointEvent::Response { key: k, response, .. } if *k == key && response.status == 487
        )));
    }

    #[test]
    fn an_adopted_invite_continues_the_early_dialog_with_its_to_tag() {
        let t0 = Instant::now();
        let (pa, pb, pc) = (peer(5061), peer(5062), peer(5063));
        let (mut a, mut b, mut c) = (endpoint(5061), endpoint(5062), endpoint(5063));
        let key = a
            .send_request(t0, invite("sip:bob@127.0.0.1:5062"), pb)
            .unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        let EndpointEvent::Request {
            key: skey,
            request: received,
            ..
        } = events(&mut b).remove(0)
        else {
            panic!()
        };
        b.respond(t0, skey, 180, None, None).unwrap();
        let mut ringing = None;
        while let Some(t) = b.poll_transmit() {
            if let Ok(Message::Response(r)) = Message::parse(t.payload.clone()) {
                ringing = Some(r.headers.to_tag().unwrap().to_string());
                a.handle_message(t0, Message::Response(r), pb);
            }
        }
        let tag = ringing.unwrap();
        events(&mut a);
        // b dies; c adopts the INVITE b received, with b's tag: no event for its TU.
        let adopted = c
            .adopt_invite(t0, received.clone(), pa, tag.clone())
            .unwrap();
        assert!(events(&mut c).is_empty());
        assert!(c
            .adopt_invite(t0, received.clone(), pa, tag.clone())
            .is_err());
        // The caller's retransmission is absorbed by the adopted transaction.
        c.handle_message(t0, Message::Request(received.clone()), pa);
        assert!(events(&mut c).is_empty());
        while c.poll_transmit().is_some() {}
        c.respond(t0, adopted, 180, None, None).unwrap();
        let dialog = c
            .respond(t0, adopted, 200, None, None)
            .unwrap()
            .expect("a dialog");
        assert_eq!(dialog.local_tag, tag);
        let mut statuses = Vec::new();
        while let Some(t) = c.poll_transmit() {
            let Ok(Message::Response(r)) = Message::parse(t.payload.clone()) else {
                panic!("a response")
            };
            assert_eq!(r.headers.to_tag(), Some(tag.as_str()));
            statuses.push(r.status);
            a.handle_message(t0, Message::Response(r), pc);
        }
        assert_eq!(statuses, vec![180, 200]);
        assert!(events(&mut a).iter().any(|e| matches!(
            e,
            EndpointEvent::Response { key: k, response, .. } if *k == key && response.status == 200
        )));
        // b wakes up: it drops its transaction unanswered, with its early dialog.
        let before = b.transaction_count();
        assert!(b.abandon(t0, skey));
        assert_eq!(b.transaction_count(), before - 1);
        assert!(b.dialogs().is_empty());
        assert!(b.poll_transmit().is_none());
        assert!(!b.abandon(t0, skey));
        // Only an INVITE outside a dialog, with a tag, can be adopted.
        let mut bye = received.clone();
        bye.method = Method::Bye;
        assert!(c.adopt_invite(t0, bye, pa, tag.clone()).is_err());
        assert!(c.adopt_invite(t0, received, pa, String::new()).is_err());
    }

    #[test]
    fn a_cancel_for_an_invite_held_elsewhere_goes_to_the_tu_which_may_adopt_it() {
        let t0 = Instant::now();
        let (pa, pb) = (peer(5061), peer(5062));
        let (mut a, mut b, mut c) = (endpoint(5061), endpoint(5062), endpoint(5063));
        let key = a
            .send_request(t0, invite("sip:bob@127.0.0.1:5062"), pb)
            .unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        let EndpointEvent::Request {
            key: skey,
            request: received,
            ..
        } = events(&mut b).remove(0)
        else {
            panic!()
        };
        b.respond(t0, skey, 180, None, None).unwrap();
        deliver(t0, &mut b, &pb, &mut a);
        events(&mut a);
        // b died: the caller's CANCEL reaches c, which holds no INVITE for it.
        a.cancel(t0, key).unwrap();
        let mut cancel = None;
        while let Some(t) = a.poll_transmit() {
            if let Ok(Message::Request(r)) = Message::parse(t.payload.clone()) {
                cancel = Some(r);
            }
        }
        let cancel = cancel.expect("a CANCEL");
        c.handle_message(t0, Message::Request(cancel.clone()), pa);
        let EndpointEvent::UnknownDialog {
            key: ckey, request, ..
        } = events(&mut c).remove(0)
        else {
            panic!("the TU decides")
        };
        assert_eq!(request.method, Method::Cancel);
        assert!(c.poll_transmit().is_none(), "nothing answered yet");
        // Without the INVITE's record: 481.
        c.reject_unknown(t0, ckey);
        let t = c.poll_transmit().expect("the answer");
        let Ok(Message::Response(r)) = Message::parse(t.payload.clone()) else {
            panic!()
        };
        assert_eq!(r.status, 481);
        // With it: the INVITE adopted, then the CANCEL delivered again: 200 to the CANCEL,
        // 487 to the INVITE.
        let (mut d, pd) = (endpoint(5064), peer(5064));
        d.handle_message(t0, Message::Request(cancel.clone()), pa);
        let EndpointEvent::UnknownDialog { key: dkey, .. } = events(&mut d).remove(0) else {
            panic!()
        };
        let tag = "t-b".to_string();
        let adopted = d.adopt_invite(t0, received, pa, tag.clone()).unwrap();
        d.redeliver(t0, dkey);
        assert!(events(&mut d)
            .iter()
            .any(|e| matches!(e, EndpointEvent::Cancelled { invite } if *invite == adopted)));
        let mut statuses = Vec::new();
        while let Some(t) = d.poll_transmit() {
            if let Ok(Message::Response(r)) = Message::parse(t.payload.clone()) {
                if r.status == 487 {
                    assert_eq!(r.headers.to_tag(), Some(tag.as_str()));
                }
                statuses.push(r.status);
                a.handle_message(t0, Message::Response(r), pd);
            }
        }
        assert_eq!(statuses, vec![200, 487]);
    }

    #[test]
    fn a_request_requiring_an_extension_we_lack_gets_420_with_unsupported() {
        let t0 = Instant::now();
        let mut b = Endpoint::new(EndpointConfig {
            supported: vec!["timer".into()],
            ..EndpointConfig::default()
        });
        b.set_sent_by(Transport::Udp, Host::Ipv4([127, 0, 0, 1].into()), 5062);
        let mut answer = |require: &str, branch: &str| {
            let mut r = invite("sip:bob@127.0.0.1:5062");
            r.headers.push(HeaderName::Require, require);
            r.headers.prepend_via(
                &format!("SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK{branch}")
                    .parse()
                    .unwrap(),
            );
            r.headers.set_max_forwards(70);
            b.handle_message(t0, Message::Request(r), peer(5061));
            let t = b.poll_transmit().expect("an answer");
            let Ok(Message::Response(r)) = Message::parse(t.payload.clone()) else {
                panic!("not a response");
            };
            let events: Vec<_> = std::iter::from_fn(|| b.poll_event()).collect();
            (r, events)
        };
        let (r, events) = answer("timer, 100rel, nothingSupportsThis", "r1");
        assert_eq!(r.status, 420);
        assert!(r.headers.to_tag().is_some());
        assert_eq!(
            r.headers.unsupported().unwrap(),
            vec!["100rel", "nothingSupportsThis"]
        );
        assert!(events.is_empty(), "the TU never sees it");
        assert_eq!(b.stats().bad_extension, 1);
        // Only what we implement: the request goes on to the TU (no answer yet).
        let mut r = invite("sip:bob@127.0.0.1:5062");
        r.headers.push(HeaderName::Require, "timer");
        r.headers.prepend_via(
            &"SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKr2"
                .parse()
                .unwrap(),
        );
        r.headers.set_max_forwards(70);
        r.headers.set_call_id("call-2@test");
        b.handle_message(t0, Message::Request(r), peer(5061));
        assert!(matches!(
            b.poll_event(),
            Some(EndpointEvent::Request { .. })
        ));
    }

    #[test]
    fn a_2xx_to_a_subscribe_creates_the_dialog_its_notifies_go_in() {
        let t0 = Instant::now();
        let (pa, pb) = (peer(5061), peer(5062));
        let (mut a, mut b) = (endpoint(5061), endpoint(5062));
        let subscribe = subscribe_request("sip:bob@127.0.0.1:5062");
        a.send_request(t0, subscribe, pb).unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        let evs = events(&mut b);
        let EndpointEvent::Request { key, .. } = &evs[0] else {
            panic!("{evs:?}")
        };
        let dialog = b
            .respond(t0, *key, 200, None, None)
            .unwrap()
            .expect("a dialog");
        let notify = b.dialog_request(&dialog, Method::Notify).unwrap();
        assert_eq!(notify.headers.to_tag(), Some("a1"));
        assert_eq!(notify.headers.from_tag(), Some(dialog.local_tag.as_str()));
        assert_eq!(notify.uri.to_string(), "sip:alice@127.0.0.1:5061");
        // Its 200 carried the same To tag.
        let t = b.poll_transmit().unwrap();
        let Ok(Message::Response(ok)) = Message::parse(t.payload.clone()) else {
            panic!("not a response");
        };
        assert_eq!(ok.headers.to_tag(), Some(dialog.local_tag.as_str()));
        // The subscriber's side: the 2xx makes the dialog there too, and the NOTIFY sent in
        // it reaches the subscriber as a request within that dialog.
        a.handle_message(t0, Message::Response(ok), pb);
        let subscriber_dialog = match events(&mut a).remove(0) {
            EndpointEvent::Response {
                dialog: Some(d), ..
            } => d,
            other => panic!("{other:?}"),
        };
        assert_eq!(subscriber_dialog.local_tag, "a1");
        assert_eq!(subscriber_dialog.remote_tag, dialog.local_tag);
        b.send_request(t0, notify, pa).unwrap();
        deliver(t0, &mut b, &pb, &mut a);
        match events(&mut a).remove(0) {
            EndpointEvent::DialogRequest { dialog: d, .. } => assert_eq!(d, subscriber_dialog),
            other => panic!("the NOTIFY in the dialog: {other:?}"),
        }
        // A refused SUBSCRIBE makes none.
        let mut again = invite("sip:bob@127.0.0.1:5062");
        again.method = Method::Subscribe;
        again.headers.set_call_id("call-2@test");
        again
            .headers
            .set_cseq(&crate::message::CSeq::new(1, Method::Subscribe));
        a.send_request(t0, again, pb).unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        let evs = events(&mut b);
        let EndpointEvent::Request { key, .. } = &evs[0] else {
            panic!("{evs:?}")
        };
        assert_eq!(b.respond(t0, *key, 489, None, None).unwrap(), None);
    }

    #[test]
    fn a_2xx_to_a_subscribe_over_tcp_creates_the_dialog_too() {
        // Over a reliable transport the client transaction is gone (timer K is 0) before its
        // response reaches the endpoint's handling: the SUBSCRIBE kept aside makes the dialog.
        let t0 = Instant::now();
        let tcp = |port: u16| Peer::tcp(SocketAddr::from(([127, 0, 0, 1], port)));
        let (pa, pb) = (tcp(5061), tcp(5062));
        let mut a = Endpoint::new(EndpointConfig::default());
        a.set_sent_by(Transport::Tcp, Host::Ipv4([127, 0, 0, 1].into()), 5061);
        let mut b = Endpoint::new(EndpointConfig::default());
        b.set_sent_by(Transport::Tcp, Host::Ipv4([127, 0, 0, 1].into()), 5062);
        let subscribe = subscribe_request("sip:bob@127.0.0.1:5062;transport=tcp");
        a.send_request(t0, subscribe, pb).unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        let EndpointEvent::Request { key, .. } = events(&mut b).remove(0) else {
            panic!("no SUBSCRIBE")
        };
        b.respond(t0, key, 200, None, None).unwrap().unwrap();
        deliver(t0, &mut b, &pb, &mut a);
        match events(&mut a).remove(0) {
            EndpointEvent::Response {
                dialog: Some(d), ..
            } => assert_eq!(d.local_tag, "a1"),
            other => panic!("no dialog for the 2xx over TCP: {other:?}"),
        }
    }

    #[test]
    fn a_notify_that_overtakes_the_2xx_creates_the_subscription_s_dialog() {
        let t0 = Instant::now();
        let (pa, pb) = (peer(5061), peer(5062));
        for status in [200u16, 404] {
            let (mut a, mut b) = (endpoint(5061), endpoint(5062));
            let subscribe = subscribe_request("sip:bob@127.0.0.1:5062");
            a.send_request(t0, subscribe, pb).unwrap();
            deliver(t0, &mut a, &pa, &mut b);
            let evs = events(&mut b);
            let EndpointEvent::Request { key, .. } = &evs[0] else {
                panic!("{evs:?}")
            };
            let key = *key;
            let dialog = b.respond(t0, key, 200, None, None).unwrap().unwrap();
            // The 2xx is held back (it took a longer path); the NOTIFY arrives first.
            let ok = b.poll_transmit().unwrap();
            let notify = b.dialog_request(&dialog, Method::Notify).unwrap();
            b.send_request(t0, notify, pa).unwrap();
            deliver(t0, &mut b, &pb, &mut a);
            let subscriber = match events(&mut a).remove(0) {
                EndpointEvent::DialogRequest { dialog: d, .. } => d,
                other => panic!("the early NOTIFY in a new dialog: {other:?}"),
            };
            assert_eq!(
                (subscriber.local_tag.as_str(), &subscriber.remote_tag),
                ("a1", &dialog.local_tag)
            );
            if status == 200 {
                // The 2xx then belongs to that dialog.
                a.handle_message(t0, Message::parse(ok.payload).unwrap(), pb);
                match events(&mut a).remove(0) {
                    EndpointEvent::Response {
                        dialog: Some(d), ..
                    } => assert_eq!(d, subscriber),
                    other => panic!("{other:?}"),
                }
                assert!(a.export_dialog(&subscriber).is_some());
            } else {
                // Refused after all: the dialog goes.
                let Ok(Message::Response(mut refused)) = Message::parse(ok.payload) else {
                    panic!("not a response")
                };
                refused.status = 404;
                a.handle_message(t0, Message::Response(refused), pb);
                events(&mut a);
                assert!(a.export_dialog(&subscriber).is_none());
            }
        }
    }

    #[test]
    fn invalid_request_is_answered_statelessly() {
        let t0 = Instant::now();
        let mut b = endpoint(5062);
        let text = "INVITE sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:bob@127.0.0.1>\r\nCall-ID: x\r\nCSeq: 1 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
        b.handle_message(t0, Message::parse(Bytes::from(text)).unwrap(), peer(5061));
        let t = b.poll_transmit().unwrap();
        assert!(t.payload.starts_with(b"SIP/2.0 400"));
        assert_eq!(b.stats().invalid_requests, 1);
        assert!(b.poll_event().is_none());
    }

    #[test]
    fn unknown_dialog_can_be_imported_and_redelivered() {
        let t0 = Instant::now();
        let (pa, pb) = (peer(5061), peer(5062));
        let (mut a, mut b) = (endpoint(5061), endpoint(5062));
        a.send_request(t0, invite("sip:bob@127.0.0.1:5062"), pb)
            .unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        let EndpointEvent::Request { key, .. } = events(&mut b).remove(0) else {
            panic!()
        };
        let dialog_b = b.respond(t0, key, 200, None, None).unwrap().unwrap();
        deliver(t0, &mut b, &pb, &mut a);
        let dialog_a = match events(&mut a).remove(0) {
            EndpointEvent::Response {
                dialog: Some(d), ..
            } => d,
            other => panic!("{other:?}"),
        };
        a.send_ack(&dialog_a, pb, None).unwrap();
        deliver(t0, &mut a, &pa, &mut b);
        let record = b.export_dialog(&dialog_b).unwrap();

        // B dies; C (a fresh endpoint on the same address) takes the BYE.
        let mut c = endpoint(5062);
        let bye = a.dialog_request(&dialog_a, Method::Bye).unwrap();
        a.send_request(t0, bye, pb).unwrap();
        deliver(t0, &mut a, &pa, &mut c);
        let EndpointEvent::UnknownDialog { key, .. } = events(&mut c).remove(0) else {
            panic!()
        };
        c.import_dialog(&record).unwrap();
        c.redeliver(t0, key);
        let EndpointEvent::DialogRequest { key, request, .. } = events(&mut c).remove(0) else {
            panic!()
        };
        assert_eq!(request.method, Method::Bye);
        c.respond(t0, key, 200, None, None).unwrap();
        let t = c.poll_transmit().unwrap();
        let Message::Response(ok) = Message::parse(t.payload).unwrap() else {
            panic!()
        };
        assert_eq!(ok.status, 200);
        assert_eq!(ok.headers.to_tag(), Some(dialog_b.local_tag.as_str()));
        assert_eq!(ok.headers.cseq().unwrap().method, Method::Bye);
    }
}
