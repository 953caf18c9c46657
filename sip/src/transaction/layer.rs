//! [`TransactionLayer`]: every live client and server transaction of an endpoint, the indexes
//! that match messages to them, one timer queue, and the outgoing queues of transmissions and TU
//! events.
//!
//! The layer is driven like quinn-proto: the endpoint feeds it what happened (a request or
//! response received, a request or response from the TU, a transport error, the clock reaching
//! [`TransactionLayer::poll_timeout`]), always with the current time as `now`, then drains
//! [`TransactionLayer::poll_transmit`] and [`TransactionLayer::poll_event`]. It never reads a
//! clock, touches a socket or spawns anything. It does not validate messages (run
//! `validate_request` / `validate_response` first), stamp `received` (see
//! [`stamp_received`](super::stamp_received)), manage connections, or do what the TU does: answer
//! CANCELs, retransmit 2xx responses to INVITE, send the ACK of a 2xx.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::admission::{Admission, AdmissionStats, SourceLimiter, SourceLimits};
use super::client::{CancelState, ClientTransaction};
use super::config::TransactionConfig;
use super::ctx::{Ctx, Step, TxTimers};
use super::key::TransactionKey;
use super::matching::{request_id, request_id_with_via, ClientId, LegacyId, RequestId, ServerId};
use super::peer::{response_destination, Peer};
use super::server::{AckDisposition, LegacyTags, ServerTransaction};
use super::timer::{Timer, TimerQueue};
use super::types::{
    TransactionError, TransactionEvent, TransactionKind, TransactionState, Transmit,
};
use crate::message::{generate_tag, HeaderError, HeaderName, Message, Method, Request, Response};

/// What [`TransactionLayer::handle_request`] did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// A new server transaction; a [`TransactionEvent::Request`] or
    /// [`TransactionEvent::Cancel`] was queued.
    Created(TransactionKey),
    /// A retransmission, absorbed by its transaction (which re-sent its last response, if the
    /// state says so).
    Retransmission(TransactionKey),
    /// An ACK absorbed by its INVITE server transaction (ACK of a non-2xx, Completed ->
    /// Confirmed, or a retransmitted ACK).
    AckAbsorbed(TransactionKey),
    /// An ACK passed to the TU as [`TransactionEvent::Ack`].
    AckPassed(Option<TransactionKey>),
    /// Over [`TransactionConfig::max_transactions`] or a per-source limit
    /// ([`TransactionConfig::per_source`]): answered 503 statelessly, or not at all when the
    /// source keeps flooding; nothing created.
    Rejected,
}

/// Requests refused by the layer's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerAdmissionStats {
    /// Refused by the per-source limits (or dropped).
    pub sources: AdmissionStats,
    /// Refused (503) because the table was full.
    pub refused_table: u64,
}

/// What [`TransactionLayer::cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The CANCEL is (or already was) on its way in this client transaction.
    Sent(TransactionKey),
    /// No provisional response yet: the CANCEL will be sent when one arrives (RFC 3261 section
    /// 9.1), announced by [`TransactionEvent::CancelSent`]; nothing is sent if a final
    /// response or timer B comes first.
    Deferred,
}

#[derive(Debug)]
enum Tx {
    Client(ClientTransaction),
    Server(ServerTransaction),
}

impl Tx {
    fn timers(&self) -> &TxTimers {
        match self {
            Tx::Client(c) => &c.timers,
            Tx::Server(s) => &s.timers,
        }
    }

    fn timers_mut(&mut self) -> &mut TxTimers {
        match self {
            Tx::Client(c) => &mut c.timers,
            Tx::Server(s) => &mut s.timers,
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: Timer) -> Step {
        match self {
            Tx::Client(c) => c.on_timer(ctx, timer),
            Tx::Server(s) => s.on_timer(ctx, timer),
        }
    }
}

/// The identifier a transaction is indexed under.
#[derive(Debug)]
enum IndexId {
    Client(ClientId),
    Server(ServerId),
    Legacy(LegacyId),
}

#[derive(Debug)]
struct Entry {
    id: IndexId,
    tx: Tx,
    /// The source address a server transaction is counted against (per-source share).
    source: Option<std::net::IpAddr>,
}

#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    entry: Option<Entry>,
}

/// Heap entries above this many (beyond twice the armed timers) trigger a compaction.
const STALE_TIMER_SLACK: usize = 1024;

/// Every transaction of an endpoint: RFC 3261 section 17 (with RFC 6026) as a sans-IO state
/// machine collection. See the module documentation for how to drive it.
#[derive(Debug)]
pub struct TransactionLayer {
    config: TransactionConfig,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    clients: HashMap<ClientId, TransactionKey>,
    servers: HashMap<ServerId, TransactionKey>,
    legacy: HashMap<LegacyId, TransactionKey>,
    timers: TimerQueue,
    transmits: VecDeque<Transmit>,
    events: VecDeque<TransactionEvent>,
    sources: SourceLimiter,
    refused_table: u64,
}

impl Default for TransactionLayer {
    fn default() -> Self {
        Self::new(TransactionConfig::default())
    }
}

impl TransactionLayer {
    /// An empty layer.
    pub fn new(config: TransactionConfig) -> Self {
        Self {
            config,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            clients: HashMap::new(),
            servers: HashMap::new(),
            legacy: HashMap::new(),
            timers: TimerQueue::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            sources: SourceLimiter::new(config.per_source, Vec::new()),
            refused_table: 0,
        }
    }

    /// Addresses not subject to the per-source limits (trusted carriers, the balancer); they
    /// are still bound by [`TransactionConfig::max_transactions`].
    pub fn set_exempt_sources(&mut self, exempt: Vec<ipnet::IpNet>) {
        self.sources.reconfigure(self.config.per_source, exempt);
    }

    /// New table and per-source limits and exempt addresses (a configuration reload).
    /// Transactions in progress go on; the new limits apply to new ones.
    pub fn set_limits(
        &mut self,
        max_transactions: usize,
        per_source: SourceLimits,
        exempt: Vec<ipnet::IpNet>,
    ) {
        self.config.max_transactions = max_transactions;
        self.config.per_source = per_source;
        self.sources.reconfigure(per_source, exempt);
    }

    /// Requests refused or dropped by a limit, per limit.
    pub fn admission_stats(&self) -> LayerAdmissionStats {
        LayerAdmissionStats {
            sources: self.sources.stats(),
            refused_table: self.refused_table,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &TransactionConfig {
        &self.config
    }

    /// Number of live transactions.
    pub fn len(&self) -> usize {
        self.live
    }

    /// True when no transaction is live.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    fn entry(&self, key: TransactionKey) -> Option<&Entry> {
        self.slots
            .get(key.index as usize)
            .filter(|s| s.generation == key.generation)?
            .entry
            .as_ref()
    }

    /// The state of a live transaction; `None` once it terminated.
    pub fn state(&self, key: TransactionKey) -> Option<TransactionState> {
        Some(match &self.entry(key)?.tx {
            Tx::Client(c) => c.state,
            Tx::Server(s) => s.state,
        })
    }

    /// Which state machine a live transaction runs.
    pub fn kind(&self, key: TransactionKey) -> Option<TransactionKind> {
        Some(match &self.entry(key)?.tx {
            Tx::Client(c) if c.invite => TransactionKind::InviteClient,
            Tx::Client(_) => TransactionKind::NonInviteClient,
            Tx::Server(s) if s.invite => TransactionKind::InviteServer,
            Tx::Server(_) => TransactionKind::NonInviteServer,
        })
    }

    /// The request a live client transaction sent (what the TU gave
    /// [`TransactionLayer::send_request`]).
    pub fn client_request(&self, key: TransactionKey) -> Option<&Request> {
        match &self.entry(key)?.tx {
            Tx::Client(c) => Some(&c.request),
            Tx::Server(_) => None,
        }
    }

    /// How many bytes a live client transaction keeps for retransmitting its request (0 once
    /// no retransmission can follow).
    #[cfg(test)]
    pub(crate) fn retransmit_bytes(&self, key: TransactionKey) -> usize {
        match &self.entry(key).map(|e| &e.tx) {
            Some(Tx::Client(c)) => c.retransmit_bytes(),
            _ => 0,
        }
    }

    /// Where a live transaction sends: the request's destination (client) or the response
    /// destination of section 18.2.2 (server).
    pub fn destination(&self, key: TransactionKey) -> Option<&Peer> {
        Some(match &self.entry(key)?.tx {
            Tx::Client(c) => &c.destination,
            Tx::Server(s) => &s.destination,
        })
    }

    /// Runs `f` on a live transaction with a context for its outputs.
    fn with_tx<R>(
        &mut self,
        key: TransactionKey,
        now: Instant,
        f: impl FnOnce(&mut Tx, &mut Ctx<'_>) -> R,
    ) -> Option<R> {
        let Self {
            slots,
            timers,
            transmits,
            events,
            config,
            ..
        } = self;
        let entry = slots
            .get_mut(key.index as usize)
            .filter(|s| s.generation == key.generation)?
            .entry
            .as_mut()?;
        let mut ctx = Ctx {
            key,
            now,
            config: &config.timers,
            queue: timers,
            transmits,
            events,
        };
        Some(f(&mut entry.tx, &mut ctx))
    }

    /// Takes a free slot and creates a transaction in it with `build`.
    fn insert(
        &mut self,
        now: Instant,
        id: IndexId,
        source: Option<std::net::IpAddr>,
        build: impl FnOnce(&mut Ctx<'_>) -> Tx,
    ) -> TransactionKey {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::default());
                // The limit keeps the slot count far below u32::MAX.
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let generation = self.slots.get(index as usize).map_or(0, |s| s.generation);
        let key = TransactionKey { index, generation };
        let mut ctx = Ctx {
            key,
            now,
            config: &self.config.timers,
            queue: &mut self.timers,
            transmits: &mut self.transmits,
            events: &mut self.events,
        };
        let tx = build(&mut ctx);
        match &id {
            IndexId::Client(c) => self.clients.insert(c.clone(), key),
            IndexId::Server(s) => self.servers.insert(s.clone(), key),
            IndexId::Legacy(l) => self.legacy.insert(l.clone(), key),
        };
        if let Some(slot) = self.slots.get_mut(index as usize) {
            slot.entry = Some(Entry { id, tx, source });
        }
        self.live += 1;
        key
    }

    /// Destroys a transaction (it reached Terminated) and tells the TU.
    fn remove(&mut self, key: TransactionKey) {
        let Some(slot) = self
            .slots
            .get_mut(key.index as usize)
            .filter(|s| s.generation == key.generation)
        else {
            return;
        };
        let Some(entry) = slot.entry.take() else {
            return;
        };
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(key.index);
        self.live -= 1;
        if let Some(source) = entry.source {
            self.sources.release(source);
        }
        match entry.id {
            IndexId::Client(c) => self.clients.remove(&c),
            IndexId::Server(s) => self.servers.remove(&s),
            IndexId::Legacy(l) => self.legacy.remove(&l),
        };
        self.events.push_back(TransactionEvent::Terminated { key });
        self.compact_timers();
    }

    /// Destroys server transaction `key` without a response (its TU handed it to another
    /// node); a client transaction is left alone.
    pub fn abandon(&mut self, key: TransactionKey) {
        if matches!(self.entry(key).map(|e| &e.tx), Some(Tx::Server(_))) {
            self.remove(key);
        }
    }

    fn apply(&mut self, now: Instant, key: TransactionKey, step: Step) {
        match step {
            Step::Continue => {}
            Step::Terminate => self.remove(key),
            Step::SendCancel => {
                // A CANCEL that cannot be built (the INVITE lacks a header) is dropped; the
                // INVITE runs on and the TU may try again.
                let _ = self.start_cancel(now, key);
            }
        }
    }

    // ----- client side -----

    /// Sends `request` (not ACK) to `destination` in a new client transaction and returns its
    /// key. The request must be complete: a top Via with an RFC 3261 branch (the endpoint
    /// adds it, see [`generate_branch`](crate::message::generate_branch)), To, From, Call-ID
    /// and a CSeq whose method is the request's.
    pub fn send_request(
        &mut self,
        now: Instant,
        request: Request,
        destination: Peer,
    ) -> Result<TransactionKey, TransactionError> {
        if request.method == Method::Ack {
            return Err(TransactionError::AckNotAllowed);
        }
        check_request_headers(&request)?;
        let id = ClientId::of_request(&request).ok_or(TransactionError::MissingBranch)?;
        if self.clients.contains_key(&id) {
            return Err(TransactionError::Duplicate);
        }
        if self.over_limit(&request, false) {
            return Err(TransactionError::TooManyTransactions(
                self.config.max_transactions,
            ));
        }
        Ok(self.insert_client(now, id, request, destination))
    }

    /// Whether `request` is refused for want of room. A request inside a dialog (its To has a
    /// tag: a BYE, a re-INVITE, an in-dialog MESSAGE) or the CANCEL of a live INVITE
    /// (`cancels_live`) may use a reserve above [`TransactionConfig::max_transactions`] of an
    /// eighth of it: when the table fills with new work, the calls already up can still be
    /// changed and ended. Completed transactions stay in the table for 64 x T1 to absorb
    /// retransmissions, so at R calls per second about 64 x R entries are live; without the
    /// reserve a full table answered the BYEs of calls in progress 503 and left them up. The
    /// To header is read only past the limit.
    fn over_limit(&self, request: &Request, cancels_live: bool) -> bool {
        let max = self.config.max_transactions;
        if self.live < max {
            return false;
        }
        let in_dialog = cancels_live || request.headers.to_tag().is_some();
        !in_dialog || self.live >= max.saturating_add(max / 8)
    }

    fn insert_client(
        &mut self,
        now: Instant,
        id: ClientId,
        request: Request,
        destination: Peer,
    ) -> TransactionKey {
        self.insert(now, IndexId::Client(id), None, |ctx| {
            Tx::Client(ClientTransaction::start(ctx, request, destination))
        })
    }

    /// A response received from the network. Returns true when it matched a client transaction
    /// (which then passed it up as [`TransactionEvent::Response`] or absorbed it); otherwise it
    /// is queued as [`TransactionEvent::StrayResponse`]. A status outside 100..=699 is dropped
    /// (false, no event).
    pub fn handle_response(&mut self, now: Instant, response: Response) -> bool {
        if !(100..=699).contains(&response.status) {
            return false;
        }
        let key = ClientId::of_response(&response).and_then(|id| self.clients.get(&id).copied());
        let Some(key) = key else {
            self.events
                .push_back(TransactionEvent::StrayResponse { response });
            return false;
        };
        let step = self.with_tx(key, now, |tx, ctx| match tx {
            Tx::Client(c) => c.on_response(ctx, response),
            Tx::Server(_) => Step::Continue,
        });
        if let Some(step) = step {
            self.apply(now, key, step);
        }
        true
    }

    /// Cancels INVITE client transaction `invite` (RFC 3261 section 9.1): sends the CANCEL now
    /// in a new non-INVITE client transaction if a provisional response arrived, or defers it
    /// until one does. Either way [`TransactionEvent::CancelSent`] announces the CANCEL's key.
    /// Once the CANCEL is sent, the INVITE transaction gives up 64*T1 later if no final
    /// response arrives ([`Timer::CancelWait`]).
    pub fn cancel(
        &mut self,
        now: Instant,
        invite: TransactionKey,
    ) -> Result<CancelOutcome, TransactionError> {
        let (state, cancel) = match self.entry(invite).map(|e| &e.tx) {
            None => return Err(TransactionError::UnknownTransaction),
            Some(Tx::Client(c)) if c.invite => (c.state, c.cancel),
            Some(_) => return Err(TransactionError::NotInviteClient),
        };
        match (state, cancel) {
            (_, CancelState::Sent(k)) => Ok(CancelOutcome::Sent(k)),
            (TransactionState::Calling, _) => {
                if let Some(Entry {
                    tx: Tx::Client(c), ..
                }) = self.entry_mut(invite)
                {
                    c.cancel = CancelState::Deferred;
                }
                Ok(CancelOutcome::Deferred)
            }
            (TransactionState::Proceeding, _) => {
                self.start_cancel(now, invite).map(CancelOutcome::Sent)
            }
            _ => Err(TransactionError::CancelTooLate),
        }
    }

    fn entry_mut(&mut self, key: TransactionKey) -> Option<&mut Entry> {
        self.slots
            .get_mut(key.index as usize)
            .filter(|s| s.generation == key.generation)?
            .entry
            .as_mut()
    }

    fn start_cancel(
        &mut self,
        now: Instant,
        invite: TransactionKey,
    ) -> Result<TransactionKey, TransactionError> {
        let (request, destination) = match self.entry(invite).map(|e| &e.tx) {
            Some(Tx::Client(c)) => (c.request.cancel()?, c.destination),
            _ => return Err(TransactionError::UnknownTransaction),
        };
        let id = ClientId::of_request(&request).ok_or(TransactionError::MissingBranch)?;
        if self.clients.contains_key(&id) {
            return Err(TransactionError::Duplicate);
        }
        let cancel = self.insert_client(now, id, request, destination);
        self.with_tx(invite, now, |tx, ctx| {
            if let Tx::Client(c) = tx {
                c.cancel_sent(ctx, cancel);
            }
        });
        self.events
            .push_back(TransactionEvent::CancelSent { invite, cancel });
        Ok(cancel)
    }

    // ----- server side -----

    /// A request received from `source` (already validated, and stamped with
    /// [`stamp_received`](super::stamp_received)). Depending on what it is:
    /// * new request: a server transaction is created and [`TransactionEvent::Request`] (or
    ///   [`TransactionEvent::Cancel`]) queued; over the limit it is answered 503 statelessly;
    /// * retransmission: absorbed, the last response re-sent when the state says so;
    /// * ACK: absorbed by the INVITE server transaction of its non-2xx response, or passed to
    ///   the TU as [`TransactionEvent::Ack`].
    ///
    /// Requests whose top Via branch lacks the RFC 3261 cookie are matched by the RFC 2543 rules
    /// of section 17.2.3. Errors: no or malformed top Via, CSeq or (RFC 2543 requests) Call-ID;
    /// CSeq method not the request method; an RFC 2543 request clashing with a live one.
    pub fn handle_request(
        &mut self,
        now: Instant,
        request: Request,
        source: Peer,
    ) -> Result<RequestOutcome, TransactionError> {
        let cseq = request.headers.cseq()?;
        if cseq.method != request.method {
            return Err(TransactionError::CSeqMethodMismatch {
                method: request.method.clone(),
                cseq: cseq.method,
            });
        }
        if request.method == Method::Ack {
            return self.handle_ack(now, request, source);
        }
        let via = request.headers.top_via()?;
        let id = request_id_with_via(&request, &via, &request.method)?;
        if let Some(key) = self.find_server(&id, TagRule::Request) {
            self.with_tx(key, now, |tx, ctx| {
                if let Tx::Server(s) = tx {
                    s.on_retransmission(ctx);
                }
            });
            return Ok(RequestOutcome::Retransmission(key));
        }
        let destination = response_destination(&via, &source);
        let invite = if request.method == Method::Cancel {
            Some(
                request_id_with_via(&request, &via, &Method::Invite)
                    .ok()
                    .and_then(|id| self.find_server(&id, TagRule::Request)),
            )
        } else {
            None
        };
        if self.over_limit(&request, matches!(invite, Some(Some(_)))) {
            self.refused_table += 1;
            self.refuse(&request, destination, 5);
            return Ok(RequestOutcome::Rejected);
        }
        // A CANCEL of a live INVITE is part of a transaction already admitted.
        let counted_source = match invite {
            Some(Some(_)) => None,
            _ => match self.sources.admit(now, source.addr.ip()) {
                // An exempt source holds no share: nothing to release later (and a reload that
                // ends its exemption must not see releases it never counted).
                Admission::Admit if self.sources.is_exempt(source.addr.ip()) => None,
                Admission::Admit => Some(source.addr.ip()),
                Admission::Refuse { retry_after, .. } => {
                    self.refuse(&request, destination, retry_after);
                    return Ok(RequestOutcome::Rejected);
                }
                Admission::Drop => return Ok(RequestOutcome::Rejected),
            },
        };
        let (index_id, legacy) = match id {
            RequestId::Rfc3261(s) => (IndexId::Server(s), None),
            RequestId::Legacy { id, to_tag } => {
                if self.legacy.contains_key(&id) {
                    if let Some(ip) = counted_source {
                        self.sources.release(ip);
                    }
                    return Err(TransactionError::Duplicate);
                }
                let tags = LegacyTags {
                    request: to_tag,
                    response: None,
                };
                (IndexId::Legacy(id), Some(tags))
            }
        };
        let trying_delay = self.config.trying_delay;
        let key = self.insert(now, index_id, counted_source, |ctx| {
            Tx::Server(ServerTransaction::start(
                ctx,
                &request,
                destination,
                trying_delay,
                legacy,
            ))
        });
        self.events.push_back(match invite {
            Some(invite) => TransactionEvent::Cancel {
                key,
                request,
                source,
                invite,
            },
            None => TransactionEvent::Request {
                key,
                request,
                source,
            },
        });
        Ok(RequestOutcome::Created(key))
    }

    /// Answers `request` 503 with Retry-After statelessly (a limit refused it).
    fn refuse(&mut self, request: &Request, destination: Peer, retry_after: u32) {
        let mut busy = Response::from_request(request, 503, None);
        busy.set_to_tag(&generate_tag());
        busy.headers
            .push(HeaderName::RetryAfter, retry_after.to_string());
        self.send_stateless(destination, busy);
    }

    fn handle_ack(
        &mut self,
        now: Instant,
        request: Request,
        source: Peer,
    ) -> Result<RequestOutcome, TransactionError> {
        let id = request_id(&request, &Method::Ack)?;
        let matched = self.find_server(&id, TagRule::Ack);
        let disposition = matched.and_then(|key| {
            self.with_tx(key, now, |tx, ctx| match tx {
                Tx::Server(s) => s.on_ack(ctx),
                Tx::Client(_) => AckDisposition::PassUp,
            })
        });
        match (matched, disposition) {
            (Some(key), Some(AckDisposition::Absorbed(step))) => {
                self.apply(now, key, step);
                Ok(RequestOutcome::AckAbsorbed(key))
            }
            (key, _) => {
                self.events.push_back(TransactionEvent::Ack {
                    key,
                    request,
                    source,
                });
                Ok(RequestOutcome::AckPassed(key))
            }
        }
    }

    /// The live server transaction with `id`, comparing RFC 2543 To tags by `rule`.
    fn find_server(&self, id: &RequestId, rule: TagRule) -> Option<TransactionKey> {
        match id {
            RequestId::Rfc3261(s) => self.servers.get(s).copied(),
            RequestId::Legacy { id, to_tag } => {
                let key = *self.legacy.get(id)?;
                let Some(Entry {
                    tx: Tx::Server(s), ..
                }) = self.entry(key)
                else {
                    return None;
                };
                let tags = s.legacy.as_ref()?;
                let expected = match rule {
                    TagRule::Request => &tags.request,
                    TagRule::Ack => &tags.response,
                };
                (expected.as_deref() == to_tag.as_deref()).then_some(key)
            }
        }
    }

    /// The INVITE server transaction a CANCEL refers to (RFC 3261 sections 9.2 and 17.2.3):
    /// same branch and sent-by with method INVITE, or for RFC 2543 requests the same
    /// Request-URI, From tag, Call-ID, CSeq number, top Via and To tag.
    pub fn cancel_target(&self, cancel: &Request) -> Option<TransactionKey> {
        let id = request_id(cancel, &Method::Invite).ok()?;
        self.find_server(&id, TagRule::Request)
    }

    /// The TU's response in server transaction `key`. Provisional responses are sent as they
    /// come; a final response moves the machine on (a 2xx to INVITE to Accepted, where further
    /// 2xx are sent as the TU retransmits them). Errors: unknown or client transaction, status
    /// outside 100..=699, or a response the state does not take (a second final response).
    pub fn respond(
        &mut self,
        now: Instant,
        key: TransactionKey,
        response: Response,
    ) -> Result<(), TransactionError> {
        if !(100..=699).contains(&response.status) {
            return Err(TransactionError::InvalidStatus(response.status));
        }
        let result = self
            .with_tx(key, now, |tx, ctx| match tx {
                Tx::Server(s) => s.respond(ctx, response),
                Tx::Client(_) => Err(TransactionError::NotServer),
            })
            .ok_or(TransactionError::UnknownTransaction)?;
        let step = result?;
        self.apply(now, key, step);
        Ok(())
    }

    // ----- both sides -----

    /// The transport failed to send for transaction `key` (the [`Transmit::key`] of the failed
    /// send): the TU gets [`TransactionEvent::TransportError`] and the transaction ends (an
    /// INVITE server transaction in Accepted stays, RFC 6026). Returns false for a dead key.
    pub fn handle_transport_error(&mut self, now: Instant, key: TransactionKey) -> bool {
        let step = self.with_tx(key, now, |tx, ctx| match tx {
            Tx::Client(c) => c.on_transport_error(ctx),
            Tx::Server(s) => s.on_transport_error(ctx),
        });
        match step {
            Some(step) => {
                self.apply(now, key, step);
                true
            }
            None => false,
        }
    }

    /// Queues a message outside any transaction (the ACK of a 2xx, a 2xx retransmission by the
    /// UAS core after its transaction ended, a stateless answer).
    pub fn send_stateless(&mut self, destination: Peer, message: impl Into<Message>) {
        self.transmits.push_back(Transmit {
            key: None,
            destination,
            payload: message.into().to_bytes(),
            retransmission: false,
        });
    }

    /// When [`TransactionLayer::handle_timeout`] must next be called, if any timer is armed.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some((at, seq, key)) = self.timers.peek() {
            if self.timer_is_live(key, seq) {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    fn timer_is_live(&self, key: TransactionKey, seq: u64) -> bool {
        self.entry(key).is_some_and(|e| e.tx.timers().holds(seq))
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((at, seq, key)) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let step = self.with_tx(key, now, |tx, ctx| {
                let timer = tx.timers_mut().take(seq)?;
                Some(tx.on_timer(ctx, timer))
            });
            if let Some(Some(step)) = step {
                self.apply(now, key, step);
            }
        }
    }

    /// Drops stale heap entries once they clearly outnumber the armed timers.
    fn compact_timers(&mut self) {
        if self.timers.len() <= 2 * self.live + STALE_TIMER_SLACK {
            return;
        }
        let Self { slots, timers, .. } = self;
        timers.retain(|key, seq| {
            slots
                .get(key.index as usize)
                .filter(|s| s.generation == key.generation)
                .and_then(|s| s.entry.as_ref())
                .is_some_and(|e| e.tx.timers().holds(seq))
        });
    }

    /// Slots allocated (live or free), for tests.
    #[cfg(test)]
    pub(crate) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Timer heap entries, stale ones included, for tests.
    #[cfg(test)]
    pub(crate) fn timer_entries(&self) -> usize {
        self.timers.len()
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the TU.
    pub fn poll_event(&mut self) -> Option<TransactionEvent> {
        self.events.pop_front()
    }
}

/// Which To tag an RFC 2543 request is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagRule {
    /// The To tag of the request that created the transaction (retransmissions, CANCEL).
    Request,
    /// The To tag of the response the transaction sent (ACK).
    Ack,
}

/// Checks what a client transaction needs to build its ACK and CANCEL and to be matched.
fn check_request_headers(request: &Request) -> Result<(), TransactionError> {
    use crate::message::HeaderName;
    let cseq = request.headers.cseq()?;
    if cseq.method != request.method {
        return Err(TransactionError::CSeqMethodMismatch {
            method: request.method.clone(),
            cseq: cseq.method,
        });
    }
    request.headers.call_id()?;
    for name in [HeaderName::To, HeaderName::From] {
        if !request.headers.contains(&name) {
            return Err(HeaderError::Missing(name).into());
        }
    }
    Ok(())
}
