//! The tokio user agent: the API transaction users build on (the gateway's bridge, the
//! simulator's SIP buddy). A thin driver: one task owns the sans-IO [`Endpoint`] and the
//! [`SipTransport`], feeds it messages, commands and timer ticks, and sends what it returns.
//!
//! * Send a request and get its responses: [`UserAgent::send`] returns a [`ClientCall`] whose
//!   channel yields every response (and the timeout) of that transaction;
//!   [`UserAgent::send_with_auth`] answers 401/407 digest challenges and 422 (RFC 4028) on the
//!   way.
//! * Receive requests and answer them: [`UaEvent`]s arrive on the channel returned by
//!   [`UserAgent::start`]; answer with [`UserAgent::respond`].
//! * Use dialogs: ACK a 2xx ([`UserAgent::ack`]), send in-dialog requests
//!   ([`UserAgent::request_in_dialog`]), export and import them for replication.
//!
//! Names are resolved here (RFC 3263, [`Resolver`]); the endpoint never waits on DNS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::dialog::{DialogId, DialogRecord};
use crate::endpoint::{Endpoint, EndpointConfig, EndpointError, EndpointEvent, EndpointStats};
use crate::message::{
    CSeq, HeaderName, Host, MediaType, Method, NameAddr, Request, Response, SipUri, Transport, Uri,
};
use crate::resolve::{ResolveError, Resolver};
use crate::transaction::{Peer, TransactionKey};
use crate::transport::{Inbound, PeerTransport, SipTransport, TransportConfig, TransportError};

/// A body and its type.
pub type Body = Option<(Bytes, MediaType)>;

/// Digest credentials and where they may be sent (see [`UserAgent::send_with_auth`]).
#[derive(Clone, PartialEq, Eq)]
pub struct DigestAuth {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// Realms whose challenges they answer; empty: any realm.
    pub realms: Vec<String>,
    /// Hosts they may be sent to: the request's next hop (its IP address, or a name it was
    /// resolved from) or the Request-URI's host must be one of them; empty: any host.
    pub hosts: Vec<String>,
    /// Answer an MD5 challenge that offers no qop (RFC 2069: no client nonce, so a recorded
    /// answer can be replayed); refused unless set.
    pub allow_md5_without_qop: bool,
}

impl DigestAuth {
    /// Credentials for any realm and any host (a test tool's; a gateway scopes its own).
    pub fn anywhere(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
            realms: Vec::new(),
            hosts: Vec::new(),
            allow_md5_without_qop: false,
        }
    }

    /// Why these credentials must not answer `challenge` for a request to `uri` going to
    /// `next_hop`; `None` when they may.
    pub fn refuses(
        &self,
        challenge: &crate::digest::Challenge,
        uri: &Uri,
        next_hop: SocketAddr,
    ) -> Option<&'static str> {
        if !self.realms.is_empty() && !self.realms.contains(&challenge.realm) {
            return Some("realm not configured for these credentials");
        }
        if !self.hosts.is_empty() {
            let hop = next_hop.ip().to_string();
            let uri_host = uri.host().map(|h| h.to_string()).unwrap_or_default();
            let known = |h: &String| {
                let h = h.trim_start_matches('[').trim_end_matches(']');
                h.eq_ignore_ascii_case(&hop)
                    || h.eq_ignore_ascii_case(
                        uri_host.trim_start_matches('[').trim_end_matches(']'),
                    )
            };
            if !self.hosts.iter().any(known) {
                return Some("host not configured for these credentials");
            }
        }
        if challenge.effective_algorithm() == crate::digest::Algorithm::Md5
            && challenge.qop.is_none()
            && !self.allow_md5_without_qop
        {
            return Some("MD5 without qop");
        }
        None
    }
}

impl std::fmt::Debug for DigestAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestAuth")
            .field("username", &self.username)
            .field("realms", &self.realms)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

/// User agent settings.
#[derive(Debug, Clone)]
pub struct UaConfig {
    /// Sockets.
    pub transport: TransportConfig,
    /// Transactions, dialogs, User-Agent header.
    pub endpoint: EndpointConfig,
    /// Host put in Via and Contact; defaults to the bound address (127.0.0.1 for a wildcard).
    pub advertised_host: Option<Host>,
    /// Port put in Via and Contact; defaults to the bound port.
    pub advertised_port: Option<u16>,
    /// Port put in Via and Contact for TLS; defaults to the bound TLS port (else 5061).
    pub advertised_tls_port: Option<u16>,
    /// Where out-of-dialog requests go when set (instead of resolving the Request-URI).
    pub outbound_proxy: Option<SipUri>,
    /// Name resolution.
    pub resolver: Resolver,
    /// Inbound messages queued between the sockets and the endpoint task.
    pub inbound_queue: usize,
    /// Events queued toward the TU.
    pub event_queue: usize,
}

impl Default for UaConfig {
    fn default() -> Self {
        Self {
            transport: TransportConfig::default(),
            endpoint: EndpointConfig::default(),
            advertised_host: None,
            advertised_port: None,
            advertised_tls_port: None,
            outbound_proxy: None,
            resolver: Resolver::system(),
            inbound_queue: 8192,
            event_queue: 8192,
        }
    }
}

/// User agent errors.
#[derive(Debug, thiserror::Error)]
pub enum UaError {
    /// Binding sockets.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The endpoint refused.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// No destination.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// The Request-URI is not a SIP URI and there is no outbound proxy.
    #[error("cannot route to {0}")]
    Unroutable(String),
    /// The user agent stopped.
    #[error("the user agent is stopped")]
    Stopped,
    /// Digest authentication failed.
    #[error("authentication: {0}")]
    Auth(String),
}

/// A server transaction handle.
pub type ServerTx = TransactionKey;

/// What arrives for the TU.
#[derive(Debug, Clone)]
pub enum UaEvent {
    /// A request outside any dialog.
    Request {
        /// Its transaction.
        tx: ServerTx,
        /// The request.
        request: Request,
        /// Where it came from.
        source: Peer,
    },
    /// A request within a dialog.
    DialogRequest {
        /// Its transaction.
        tx: ServerTx,
        /// The dialog.
        dialog: DialogId,
        /// The request.
        request: Request,
        /// Where it came from.
        source: Peer,
    },
    /// A request for a dialog not held here, or a CANCEL for an INVITE not held here (import
    /// and redeliver, adopt, or reject).
    UnknownDialog {
        /// Its transaction.
        tx: ServerTx,
        /// The request.
        request: Request,
        /// Where it came from.
        source: Peer,
    },
    /// The ACK of our 2xx.
    Ack {
        /// The dialog.
        dialog: DialogId,
        /// The ACK.
        request: Request,
    },
    /// The caller cancelled this INVITE (already answered 487).
    Cancelled {
        /// The INVITE's transaction.
        tx: ServerTx,
    },
    /// Our 2xx was never acknowledged: send BYE.
    AckTimeout {
        /// The dialog.
        dialog: DialogId,
    },
    /// The caller never PRACKed our reliable provisional response: the INVITE was answered
    /// 504 (RFC 3262 section 3).
    PrackTimeout {
        /// The INVITE's transaction.
        tx: ServerTx,
    },
}

/// What happens to a request we sent.
#[derive(Debug, Clone)]
pub enum ClientEvent {
    /// A response (provisional or final; for INVITE, also later 2xx from forks).
    Response {
        /// The response (boxed: an event queue allocates its slots up front, and a response
        /// is far larger than the other variants).
        response: Box<Response>,
        /// The dialog it created or belongs to.
        dialog: Option<DialogId>,
    },
    /// No final response (timer B/F): act as on 408.
    Timeout,
    /// The transport failed.
    TransportError,
}

/// A request in flight.
#[derive(Debug)]
pub struct ClientCall {
    /// Its first client transaction.
    pub key: TransactionKey,
    /// The latest transaction (after an answered challenge the request goes again).
    current: Arc<std::sync::Mutex<TransactionKey>>,
    /// The request as sent (without Via).
    pub request: Request,
    /// Where it went.
    pub destination: Peer,
    /// Its responses.
    pub events: mpsc::Receiver<ClientEvent>,
}

impl ClientCall {
    /// A call for the application that stands for this one and the requests that follow it
    /// (a challenge answered, a 422 retried): its responses are what the returned sender
    /// passes on; its `current` follows the latest transaction.
    fn relayed(&self) -> (ClientCall, mpsc::Sender<ClientEvent>) {
        let (tx, rx) = mpsc::channel(32);
        let call = ClientCall {
            key: self.key,
            current: self.current.clone(),
            request: self.request.clone(),
            destination: self.destination,
            events: rx,
        };
        (call, tx)
    }

    /// The transaction to CANCEL: the latest one sent for this request.
    pub fn key(&self) -> TransactionKey {
        self.current.lock().map(|k| *k).unwrap_or(self.key)
    }

    /// Waits for the final response (or the timeout), skipping provisional ones.
    pub async fn final_response(&mut self) -> ClientEvent {
        loop {
            match self.events.recv().await {
                Some(ClientEvent::Response { response, dialog }) if response.status < 200 => {
                    let _ = dialog;
                }
                Some(event) => return event,
                None => return ClientEvent::TransportError,
            }
        }
    }
}

enum Command {
    Send {
        request: Request,
        destination: Peer,
        reply: oneshot::Sender<Result<ClientCall, UaError>>,
    },
    Cancel(TransactionKey),
    Respond {
        tx: ServerTx,
        status: u16,
        reason: Option<String>,
        body: Body,
        extra: Vec<(HeaderName, String)>,
        reply: oneshot::Sender<Result<Option<DialogId>, UaError>>,
    },
    DialogRequest {
        dialog: DialogId,
        method: Method,
        reply: oneshot::Sender<Result<(Request, Uri), UaError>>,
    },
    NextHop {
        dialog: DialogId,
        reply: oneshot::Sender<Result<Uri, UaError>>,
    },
    Ack {
        dialog: DialogId,
        destination: Peer,
        body: Body,
        reply: oneshot::Sender<Result<(), UaError>>,
    },
    Export {
        dialog: DialogId,
        reply: oneshot::Sender<Option<DialogRecord>>,
    },
    Import {
        record: Box<DialogRecord>,
        reply: oneshot::Sender<Result<DialogId, UaError>>,
    },
    Redeliver(ServerTx),
    Adopt {
        request: Box<Request>,
        source: Peer,
        to_tag: String,
        reply: oneshot::Sender<Result<ServerTx, UaError>>,
    },
    Abandon(ServerTx),
    RejectUnknown(ServerTx),
    RemoveDialog(DialogId),
    Stats(oneshot::Sender<(EndpointStats, usize, usize)>),
    SetLimits {
        max_transactions: usize,
        per_source: crate::transaction::SourceLimits,
        exempt: Vec<ipnet::IpNet>,
        reply: oneshot::Sender<()>,
    },
}

/// The endpoint's counters, published by its task after each batch of work (for metrics: read
/// them at any time without a round trip to the task).
#[derive(Debug, Default)]
pub struct SipCounters {
    /// Live transactions.
    pub transactions: AtomicU64,
    /// Dialogs in the table.
    pub dialogs: AtomicU64,
    /// Requests answered statelessly because they failed validation.
    pub invalid_requests: AtomicU64,
    /// Responses dropped because they failed validation.
    pub invalid_responses: AtomicU64,
    /// Requests the transaction layer refused (malformed Via/CSeq, duplicates).
    pub refused_requests: AtomicU64,
    /// In-dialog requests answered 481.
    pub unknown_dialog: AtomicU64,
    /// New requests answered 503 because the transaction table was full.
    pub refused_table: AtomicU64,
    /// New requests answered 503 for their source's rate.
    pub refused_source_rate: AtomicU64,
    /// New requests answered 503 for their source's share of live transactions.
    pub refused_source_share: AtomicU64,
    /// New requests answered 503 because too many sources were tracked.
    pub refused_sources: AtomicU64,
    /// New requests dropped unanswered (a source flooding while refused).
    pub dropped_flood: AtomicU64,
    /// Requests whose Via `maddr` was ignored.
    pub via_maddr_ignored: AtomicU64,
    /// Early dialogs removed when their INVITE ended without confirming them.
    pub early_dialogs_removed: AtomicU64,
    /// Requests answered 420: they required an extension the TU lacks.
    pub bad_extension: AtomicU64,
}

impl SipCounters {
    fn publish(&self, endpoint: &Endpoint) {
        let set = |c: &AtomicU64, v: u64| c.store(v, Ordering::Relaxed);
        let stats = endpoint.stats();
        let admission = endpoint.admission_stats();
        set(&self.transactions, endpoint.transaction_count() as u64);
        set(&self.dialogs, endpoint.dialogs().len() as u64);
        set(&self.invalid_requests, stats.invalid_requests);
        set(&self.invalid_responses, stats.invalid_responses);
        set(&self.refused_requests, stats.refused_requests);
        set(&self.unknown_dialog, stats.unknown_dialog);
        set(&self.refused_table, admission.refused_table);
        set(&self.refused_source_rate, admission.sources.refused_rate);
        set(&self.refused_source_share, admission.sources.refused_share);
        set(&self.refused_sources, admission.sources.refused_sources);
        set(&self.dropped_flood, admission.sources.dropped);
        set(&self.via_maddr_ignored, stats.via_maddr_ignored);
        set(&self.early_dialogs_removed, stats.early_dialogs_removed);
        set(&self.bad_extension, stats.bad_extension);
    }
}

struct Shared {
    commands: mpsc::Sender<Command>,
    transport: SipTransport,
    counters: Arc<SipCounters>,
    resolver: Resolver,
    outbound_proxy: Option<SipUri>,
    contact_host: Host,
    contact_port: u16,
    tcp_port: u16,
    tls_port: u16,
}

/// The running user agent. Cheap to clone.
#[derive(Clone)]
pub struct UserAgent {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for UserAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserAgent")
            .field("transport", &self.shared.transport)
            .finish_non_exhaustive()
    }
}

fn host_of(addr: SocketAddr) -> Host {
    match addr.ip() {
        ip if ip.is_unspecified() => Host::Ipv4(std::net::Ipv4Addr::LOCALHOST),
        std::net::IpAddr::V4(v4) => Host::Ipv4(v4),
        std::net::IpAddr::V6(v6) => Host::Ipv6(v6),
    }
}

impl UserAgent {
    /// Binds the sockets and starts the endpoint task. Requests and dialog events arrive on the
    /// returned channel.
    pub async fn start(config: UaConfig) -> Result<(UserAgent, mpsc::Receiver<UaEvent>), UaError> {
        let (inbound_tx, inbound_rx) = mpsc::channel(config.inbound_queue);
        let (failures_tx, failures_rx) = mpsc::channel(4096);
        let transport =
            SipTransport::bind(config.transport.clone(), inbound_tx, failures_tx).await?;
        let udp = transport.local_addr(PeerTransport::Udp);
        let tcp = transport.local_addr(PeerTransport::Tcp);
        let bound = udp
            .or(tcp)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5060)));
        let host = config
            .advertised_host
            .clone()
            .unwrap_or_else(|| host_of(bound));
        let port = config.advertised_port.unwrap_or(bound.port());
        let tcp_port = config
            .advertised_port
            .or(tcp.map(|a| a.port()))
            .unwrap_or(port);
        let tls_port = config
            .advertised_tls_port
            .or(transport.local_addr(PeerTransport::Tls).map(|a| a.port()))
            .unwrap_or(5061);
        let mut endpoint = Endpoint::new(config.endpoint.clone());
        endpoint.set_sent_by(Transport::Udp, host.clone(), port);
        endpoint.set_sent_by(Transport::Tcp, host.clone(), tcp_port);
        endpoint.set_sent_by(Transport::Tls, host.clone(), tls_port);
        let (commands, command_rx) = mpsc::channel(4096);
        let (events_tx, events_rx) = mpsc::channel(config.event_queue);
        let counters = Arc::new(SipCounters::default());
        let shared = Arc::new(Shared {
            commands,
            transport: transport.clone(),
            counters: counters.clone(),
            resolver: config.resolver.clone(),
            outbound_proxy: config.outbound_proxy.clone(),
            contact_host: host,
            contact_port: port,
            tcp_port,
            tls_port,
        });
        tokio::spawn(drive(
            endpoint,
            transport,
            inbound_rx,
            failures_rx,
            command_rx,
            events_tx,
            counters,
        ));
        Ok((UserAgent { shared }, events_rx))
    }

    /// The bound address of a transport.
    pub fn local_addr(&self, transport: PeerTransport) -> Option<SocketAddr> {
        self.shared.transport.local_addr(transport)
    }

    /// Transport counters.
    pub fn transport(&self) -> &SipTransport {
        &self.shared.transport
    }

    /// The endpoint's counters (transactions, dialogs, refusals by limit).
    pub fn counters(&self) -> Arc<SipCounters> {
        self.shared.counters.clone()
    }

    /// Our Contact for `user` on `transport`.
    pub fn contact(&self, user: Option<&str>, transport: PeerTransport) -> NameAddr {
        let port = match transport {
            PeerTransport::Udp => self.shared.contact_port,
            PeerTransport::Tcp => self.shared.tcp_port,
            PeerTransport::Tls => self.shared.tls_port,
        };
        let mut uri = SipUri::new(self.shared.contact_host.clone()).with_port(port);
        if let Some(user) = user {
            uri = uri.with_user(user);
        }
        match transport {
            PeerTransport::Udp => {}
            PeerTransport::Tcp => uri = uri.with_param("transport", Some("tcp")),
            PeerTransport::Tls => uri = uri.with_param("transport", Some("tls")),
        }
        NameAddr::new(Uri::Sip(uri))
    }

    /// Our Contact for `user` on the transport `request` will go over (UDP when it cannot be
    /// resolved now): a request sent over TLS names our TLS address, as RFC 3261 section 26.2
    /// asks, so the peer's requests in the dialog come back over TLS. A request to a `sips:`
    /// URI gets a `sips:` Contact (section 8.1.1.8). Also returns where the request goes, to
    /// be given to [`UserAgent::send_with_auth`] so it is not resolved twice.
    pub async fn contact_for(
        &self,
        user: Option<&str>,
        request: &Request,
    ) -> (NameAddr, Option<Peer>) {
        let destination = self.destination_for(request).await.ok();
        let transport = destination.map_or(PeerTransport::Udp, |peer| peer.transport);
        // By the URI, not the first hop: through a proxy reached over UDP a sips URI still
        // wants our TLS address, as a sips: URI.
        let sips = request.uri.as_sip().is_some_and(|u| u.secure);
        let transport = if sips { PeerTransport::Tls } else { transport };
        let mut contact = self.contact(user, transport);
        if let (true, Uri::Sip(uri)) = (sips, &mut contact.uri) {
            uri.secure = true;
            uri.params.remove("transport");
        }
        (contact, destination)
    }

    /// A fresh out-of-dialog request: Request-URI, From (with a new tag), To, Call-ID, CSeq 1,
    /// Max-Forwards; add Contact and body as needed.
    pub fn new_request(&self, method: Method, uri: Uri, from: NameAddr, to: NameAddr) -> Request {
        let mut request = Request::new(method.clone(), uri);
        let mut from = from;
        if from.tag().is_none() {
            from.set_tag(&crate::message::generate_tag());
        }
        request.headers.set_from(&from);
        request.headers.set_to(&to);
        request
            .headers
            .set_call_id(&crate::message::generate_call_id(None));
        request.headers.set_cseq(&CSeq::new(1, method));
        request.headers.set_max_forwards(70);
        request
    }

    async fn command<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, UaError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .commands
            .send(make(tx))
            .await
            .map_err(|_| UaError::Stopped)?;
        rx.await.map_err(|_| UaError::Stopped)
    }

    /// Where an out-of-dialog request goes: `destination`, else the outbound proxy, else the
    /// first Route, else the Request-URI (resolved per RFC 3263).
    pub async fn destination_for(&self, request: &Request) -> Result<Peer, UaError> {
        let uri = match (&self.shared.outbound_proxy, request.headers.route().ok()) {
            (Some(proxy), _) => proxy.clone(),
            (None, Some(routes)) if !routes.is_empty() => match routes[0].uri.as_sip() {
                Some(sip) => sip.clone(),
                None => return Err(UaError::Unroutable(routes[0].uri.to_string())),
            },
            _ => match request.uri.as_sip() {
                Some(sip) => sip.clone(),
                None => return Err(UaError::Unroutable(request.uri.to_string())),
            },
        };
        self.resolve(&uri).await
    }

    /// Resolves `uri` to the first place to try.
    pub async fn resolve(&self, uri: &SipUri) -> Result<Peer, UaError> {
        let peers = self.shared.resolver.resolve(uri).await?;
        let first = peers
            .into_iter()
            .next()
            .ok_or_else(|| UaError::Unroutable(uri.to_string()))?;
        if first.transport == PeerTransport::Tls {
            // The server's certificate must name the host the URI names (RFC 5922), unless
            // that is an IP address, which the transport checks by default.
            if let Host::Domain(name) = &uri.host {
                self.shared
                    .transport
                    .set_tls_name(first.addr, name.trim_end_matches('.'));
            }
        }
        Ok(Peer::new(first.addr, first.transport))
    }

    /// Sends `request` in a new client transaction to `destination` (resolved from the request
    /// when `None`).
    pub async fn send(
        &self,
        request: Request,
        destination: Option<Peer>,
    ) -> Result<ClientCall, UaError> {
        let destination = match destination {
            Some(d) => d,
            None => self.destination_for(&request).await?,
        };
        self.command(|reply| Command::Send {
            request,
            destination,
            reply,
        })
        .await?
    }

    /// Sends `request` and answers up to two 401/407 digest challenges with `credentials`, and
    /// for an INVITE with Session-Expires up to two 422 (Session Interval Too Small) by asking
    /// again for the 422's Min-SE (RFC 4028 section 7.4):
    /// the request goes again with CSeq + 1 and an Authorization (or Proxy-Authorization)
    /// header. A challenge the credentials are not for (another realm or host, or MD5 without
    /// qop unless allowed: [`DigestAuth::refuses`]) is not answered but passed up as the final
    /// response. The returned call yields every response except the answered challenges;
    /// [`ClientCall::key`] follows the latest transaction (for CANCEL).
    pub async fn send_with_auth(
        &self,
        request: Request,
        destination: Option<Peer>,
        credentials: Option<DigestAuth>,
    ) -> Result<ClientCall, UaError> {
        let session_timer = request.method == Method::Invite
            && request.headers.contains(&HeaderName::SessionExpires);
        let reliable = request.method == Method::Invite
            && request.headers.supported().is_ok_and(|tags| {
                tags.iter()
                    .any(|t| t.eq_ignore_ascii_case(crate::endpoint::RELIABLE_TAG))
            });
        let first = self.send(request, destination).await?;
        if credentials.is_none() && !session_timer && !reliable {
            return Ok(first);
        }
        let (call, tx) = first.relayed();
        let current = call.current.clone();
        let ua = self.clone();
        tokio::spawn(async move {
            let mut digest = credentials.as_ref().map(|auth| {
                crate::digest::DigestClient::new(auth.username.clone(), auth.password.clone())
            });
            let mut inner = first;
            let mut rounds = 0;
            let mut too_brief_rounds = 0;
            // The RSeq of the last reliable provisional response PRACKed, per early dialog.
            let mut pracked: HashMap<DialogId, u32> = HashMap::new();
            while let Some(event) = inner.events.recv().await {
                if let ClientEvent::Response {
                    response,
                    dialog: Some(dialog),
                } = &event
                {
                    match prack_for(response, dialog, &mut pracked) {
                        Prack::Send(rack) => {
                            let ua = ua.clone();
                            let dialog = dialog.clone();
                            tokio::spawn(async move {
                                let extra = vec![(HeaderName::RAck, rack)];
                                match ua
                                    .request_in_dialog(&dialog, Method::Prack, None, extra)
                                    .await
                                {
                                    // Its answer matters to nobody: drained until it ends.
                                    Ok(mut call) => while call.events.recv().await.is_some() {},
                                    Err(e) => debug!(error = %e, "PRACK not sent"),
                                }
                            });
                        }
                        Prack::Repeat => continue,
                        Prack::None => {}
                    }
                }
                if let ClientEvent::Response { response, .. } = &event {
                    if response.status == 422 && session_timer && too_brief_rounds < 2 {
                        if let Some(next) = longer_session(&inner.request, response) {
                            too_brief_rounds += 1;
                            match resend(&ua, next, &inner, &current, &tx).await {
                                Some(again) => inner = again,
                                None => return,
                            }
                            continue;
                        }
                    }
                }
                let (challenge, auth, digest) = match (&event, &credentials, &mut digest) {
                    (ClientEvent::Response { response, .. }, Some(auth), Some(digest))
                        if matches!(response.status, 401 | 407) && rounds < 2 =>
                    {
                        (response.clone(), auth, digest)
                    }
                    (ClientEvent::Response { response, .. }, _, _) if response.status < 200 => {
                        if tx.send(event).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    _ => {
                        let _ = tx.send(event).await;
                        return;
                    }
                };
                rounds += 1;
                let next = match authorize(
                    digest,
                    auth,
                    &inner.request,
                    inner.destination.addr,
                    &challenge,
                ) {
                    Ok(next) => next,
                    Err(e) => {
                        debug!(error = %e, "cannot answer the challenge");
                        let _ = tx
                            .send(ClientEvent::Response {
                                response: challenge,
                                dialog: None,
                            })
                            .await;
                        return;
                    }
                };
                match resend(&ua, next, &inner, &current, &tx).await {
                    Some(again) => inner = again,
                    None => return,
                }
            }
        });
        Ok(call)
    }

    /// Cancels an INVITE we sent.
    pub async fn cancel(&self, key: TransactionKey) -> Result<(), UaError> {
        self.shared
            .commands
            .send(Command::Cancel(key))
            .await
            .map_err(|_| UaError::Stopped)
    }

    /// Answers server transaction `tx`. For an INVITE, 101-299 creates the dialog (returned).
    pub async fn respond(
        &self,
        tx: ServerTx,
        status: u16,
        reason: Option<&str>,
        body: Body,
    ) -> Result<Option<DialogId>, UaError> {
        self.respond_with_headers(tx, status, reason, body, Vec::new())
            .await
    }

    /// [`UserAgent::respond`] with extra header fields (Allow, Unsupported, Warning...).
    pub async fn respond_with_headers(
        &self,
        tx: ServerTx,
        status: u16,
        reason: Option<&str>,
        body: Body,
        extra: Vec<(HeaderName, String)>,
    ) -> Result<Option<DialogId>, UaError> {
        self.command(|reply| Command::Respond {
            tx,
            status,
            reason: reason.map(str::to_string),
            body,
            extra,
            reply,
        })
        .await?
    }

    /// ACKs the 2xx that confirmed UAC dialog `dialog` (with the answer when the 2xx carried
    /// the offer).
    pub async fn ack(&self, dialog: &DialogId, body: Body) -> Result<(), UaError> {
        let next_hop = self
            .command(|reply| Command::NextHop {
                dialog: dialog.clone(),
                reply,
            })
            .await??;
        let destination = self.resolve_uri(&next_hop).await?;
        self.command(|reply| Command::Ack {
            dialog: dialog.clone(),
            destination,
            body,
            reply,
        })
        .await?
    }

    async fn resolve_uri(&self, uri: &Uri) -> Result<Peer, UaError> {
        match uri.as_sip() {
            Some(sip) => self.resolve(sip).await,
            None => Err(UaError::Unroutable(uri.to_string())),
        }
    }

    /// Sends `method` within `dialog` (BYE, re-INVITE, UPDATE, INFO, MESSAGE...), with a body
    /// and extra header fields.
    pub async fn request_in_dialog(
        &self,
        dialog: &DialogId,
        method: Method,
        body: Body,
        extra: Vec<(HeaderName, String)>,
    ) -> Result<ClientCall, UaError> {
        let (request, destination) = self.dialog_request(dialog, method, body, extra).await?;
        self.send(request, Some(destination)).await
    }

    /// The next request of `method` in `dialog` (the dialog's next CSeq), with a body and extra
    /// header fields, and where it goes.
    async fn dialog_request(
        &self,
        dialog: &DialogId,
        method: Method,
        body: Body,
        extra: Vec<(HeaderName, String)>,
    ) -> Result<(Request, Peer), UaError> {
        let (mut request, next_hop) = self
            .command(|reply| Command::DialogRequest {
                dialog: dialog.clone(),
                method,
                reply,
            })
            .await??;
        if let Some((body, media_type)) = body {
            request.set_body(body, Some(&media_type));
        }
        for (name, value) in extra {
            request.headers.push(name, value);
        }
        let destination = self.resolve_uri(&next_hop).await?;
        Ok((request, destination))
    }

    /// [`UserAgent::request_in_dialog`], answering a digest challenge (401 or 407, at most two
    /// rounds) with `credentials`, as [`UserAgent::send_with_auth`] does outside a dialog: the
    /// request goes again as the dialog's next request (a new CSeq from the dialog, so later
    /// requests keep counting up) with the answer. A challenge the credentials are not for is
    /// passed up as the final response. Without credentials it is `request_in_dialog`.
    pub async fn request_in_dialog_with_auth(
        &self,
        dialog: &DialogId,
        method: Method,
        body: Body,
        extra: Vec<(HeaderName, String)>,
        credentials: Option<DigestAuth>,
    ) -> Result<ClientCall, UaError> {
        let first = self
            .request_in_dialog(dialog, method.clone(), body.clone(), extra.clone())
            .await?;
        let Some(auth) = credentials else {
            return Ok(first);
        };
        let (call, tx) = first.relayed();
        let current = call.current.clone();
        let ua = self.clone();
        let dialog = dialog.clone();
        tokio::spawn(async move {
            let mut digest =
                crate::digest::DigestClient::new(auth.username.clone(), auth.password.clone());
            let mut inner = first;
            let mut rounds = 0;
            while let Some(event) = inner.events.recv().await {
                let challenge = match &event {
                    ClientEvent::Response { response, .. }
                        if matches!(response.status, 401 | 407) && rounds < 2 =>
                    {
                        response.clone()
                    }
                    ClientEvent::Response { response, .. } if response.status < 200 => {
                        if tx.send(event).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    _ => {
                        let _ = tx.send(event).await;
                        return;
                    }
                };
                rounds += 1;
                let next = match ua
                    .dialog_request(&dialog, method.clone(), body.clone(), extra.clone())
                    .await
                {
                    Ok((mut request, destination)) => {
                        match answer_challenge(
                            &mut digest,
                            &auth,
                            &request,
                            destination.addr,
                            &challenge,
                        ) {
                            Ok((name, value)) => {
                                request.headers.push(name, value);
                                Some((request, destination))
                            }
                            Err(e) => {
                                debug!(error = %e, "cannot answer the challenge");
                                None
                            }
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "the dialog's next request not built");
                        None
                    }
                };
                let Some((request, destination)) = next else {
                    let _ = tx
                        .send(ClientEvent::Response {
                            response: challenge,
                            dialog: None,
                        })
                        .await;
                    return;
                };
                match ua.send(request, Some(destination)).await {
                    Ok(again) => {
                        if let Ok(mut k) = current.lock() {
                            *k = again.key;
                        }
                        inner = again;
                    }
                    Err(_) => {
                        let _ = tx.send(ClientEvent::TransportError).await;
                        return;
                    }
                }
            }
        });
        Ok(call)
    }

    /// Exports `dialog` for replication.
    pub async fn export(&self, dialog: &DialogId) -> Result<Option<DialogRecord>, UaError> {
        self.command(|reply| Command::Export {
            dialog: dialog.clone(),
            reply,
        })
        .await
    }

    /// New transaction-table and per-source limits and the addresses exempt from the latter
    /// (a configuration reload); what is in progress is untouched.
    pub async fn set_limits(
        &self,
        max_transactions: usize,
        per_source: crate::transaction::SourceLimits,
        exempt: Vec<ipnet::IpNet>,
    ) -> Result<(), UaError> {
        self.command(|reply| Command::SetLimits {
            max_transactions,
            per_source,
            exempt,
            reply,
        })
        .await
    }

    /// Imports a dialog from its record.
    pub async fn import(&self, record: DialogRecord) -> Result<DialogId, UaError> {
        self.command(|reply| Command::Import {
            record: Box::new(record),
            reply,
        })
        .await?
    }

    /// Delivers an [`UaEvent::UnknownDialog`] request again after an import.
    pub async fn redeliver(&self, tx: ServerTx) -> Result<(), UaError> {
        self.shared
            .commands
            .send(Command::Redeliver(tx))
            .await
            .map_err(|_| UaError::Stopped)
    }

    /// Adopts an INVITE another node received and answered provisionally with To tag
    /// `to_tag` (see [`Endpoint::adopt_invite`]): its server transaction, here, without a
    /// [`UaEvent::Request`]. Answer it with [`UserAgent::respond`].
    pub async fn adopt_invite(
        &self,
        request: Request,
        source: Peer,
        to_tag: String,
    ) -> Result<ServerTx, UaError> {
        self.command(|reply| Command::Adopt {
            request: Box::new(request),
            source,
            to_tag,
            reply,
        })
        .await?
    }

    /// Drops server transaction `tx` without answering it (an INVITE another node adopted, or a
    /// request left for its sender to retransmit).
    pub async fn abandon(&self, tx: ServerTx) -> Result<(), UaError> {
        self.shared
            .commands
            .send(Command::Abandon(tx))
            .await
            .map_err(|_| UaError::Stopped)
    }

    /// Answers an [`UaEvent::UnknownDialog`] request 481.
    pub async fn reject_unknown(&self, tx: ServerTx) -> Result<(), UaError> {
        self.shared
            .commands
            .send(Command::RejectUnknown(tx))
            .await
            .map_err(|_| UaError::Stopped)
    }

    /// Forgets a dialog.
    pub async fn remove_dialog(&self, dialog: &DialogId) -> Result<(), UaError> {
        self.shared
            .commands
            .send(Command::RemoveDialog(dialog.clone()))
            .await
            .map_err(|_| UaError::Stopped)
    }

    /// Endpoint counters, live transactions and dialogs.
    pub async fn stats(&self) -> Result<(EndpointStats, usize, usize), UaError> {
        self.command(Command::Stats).await
    }

    /// Stops the sockets (the endpoint task ends when every handle is dropped).
    pub fn shutdown(&self) {
        self.shared.transport.shutdown();
    }
}

/// Sends `next` (a request again, after a challenge or a 422) where `previous` went, and makes
/// it the transaction a CANCEL names; `None` (the caller's call told of a transport error)
/// when it cannot be sent.
async fn resend(
    ua: &UserAgent,
    next: Request,
    previous: &ClientCall,
    current: &Arc<std::sync::Mutex<TransactionKey>>,
    events: &mpsc::Sender<ClientEvent>,
) -> Option<ClientCall> {
    match ua.send(next, Some(previous.destination)).await {
        Ok(call) => {
            if let Ok(mut k) = current.lock() {
                *k = call.key;
            }
            Some(call)
        }
        Err(_) => {
            let _ = events.send(ClientEvent::TransportError).await;
            None
        }
    }
}

/// What a UAC does with a provisional response as to RFC 3262.
enum Prack {
    /// Not reliable: nothing.
    None,
    /// A reliable provisional response in order: PRACK it with this RAck, and pass it on.
    Send(String),
    /// A retransmission (or out of order): already PRACKed, not passed on again.
    Repeat,
}

/// RFC 3262 section 4: a provisional response with `Require: 100rel` and an `RSeq` is PRACKed
/// once, in order per early dialog; the first one sets where the numbers start.
fn prack_for(
    response: &Response,
    dialog: &DialogId,
    pracked: &mut HashMap<DialogId, u32>,
) -> Prack {
    if !(101..200).contains(&response.status)
        || !response.headers.require().is_ok_and(|tags| {
            tags.iter()
                .any(|t| t.eq_ignore_ascii_case(crate::endpoint::RELIABLE_TAG))
        })
    {
        return Prack::None;
    }
    let Some(rseq) = response
        .headers
        .text(&HeaderName::RSeq)
        .ok()
        .flatten()
        .and_then(|t| t.trim().parse::<u32>().ok())
    else {
        return Prack::None;
    };
    let Ok(cseq) = response.headers.cseq() else {
        return Prack::None;
    };
    if pracked
        .get(dialog)
        .is_some_and(|last| rseq != last.wrapping_add(1))
    {
        return Prack::Repeat;
    }
    pracked.insert(dialog.clone(), rseq);
    Prack::Send(format!("{rseq} {} {}", cseq.seq, cseq.method))
}

/// RFC 4028 section 7.4: a copy of INVITE `request` asking for the session interval a 422
/// `response` names as its Min-SE (CSeq + 1, same Call-ID and tags), or `None` when the 422
/// names none or nothing longer than what was asked.
fn longer_session(request: &Request, response: &Response) -> Option<Request> {
    use crate::session_timer::{SessionExpires, TimerHeaders};
    let min_se = response.headers.min_se().ok()??;
    let asked = request.headers.session_expires().ok()??;
    if min_se <= asked.delta {
        return None;
    }
    let mut next = sent_again(request).ok()?;
    next.headers.set(
        HeaderName::SessionExpires,
        SessionExpires {
            delta: min_se,
            refresher: asked.refresher,
        }
        .to_string(),
    );
    next.headers.set(HeaderName::MinSe, min_se);
    Some(next)
}

/// `request` to send again in the same transaction's place: without its Via (the new
/// transaction adds its own), CSeq + 1, the same Call-ID and tags.
fn sent_again(request: &Request) -> Result<Request, UaError> {
    let mut next = request.clone();
    next.headers.remove(&HeaderName::Via);
    let cseq = request.headers.cseq()?;
    next.headers
        .set_cseq(&CSeq::new(cseq.seq.saturating_add(1), cseq.method));
    Ok(next)
}

/// A copy of `request` carrying credentials for `challenge` (CSeq + 1, same Call-ID and tags).
fn authorize(
    digest: &mut crate::digest::DigestClient,
    auth: &DigestAuth,
    request: &Request,
    next_hop: SocketAddr,
    challenge: &Response,
) -> Result<Request, UaError> {
    let (answer_header, credentials) =
        answer_challenge(digest, auth, request, next_hop, challenge)?;
    let mut next = sent_again(request)?;
    next.headers.remove(&answer_header);
    next.headers.push(answer_header, credentials);
    Ok(next)
}

/// The header field answering `challenge` (a 401 or 407) for `request`, going to `next_hop`:
/// `Authorization` or `Proxy-Authorization`, and its value. An error when the credentials may
/// not answer it (another realm or host: [`DigestAuth::refuses`]) or it cannot be read.
fn answer_challenge(
    digest: &mut crate::digest::DigestClient,
    auth: &DigestAuth,
    request: &Request,
    next_hop: SocketAddr,
    challenge: &Response,
) -> Result<(HeaderName, String), UaError> {
    let (challenge_header, answer_header) = if challenge.status == 407 {
        (
            HeaderName::ProxyAuthenticate,
            HeaderName::ProxyAuthorization,
        )
    } else {
        (HeaderName::WwwAuthenticate, HeaderName::Authorization)
    };
    let values: Vec<String> = challenge
        .headers
        .get_all(&challenge_header)
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    // The challenge the client would answer, checked against where the credentials may go;
    // only it is passed on, so the answer is to the challenge that was checked.
    let chosen = crate::digest::select_challenge(values.iter().map(String::as_str))
        .map_err(|e| UaError::Auth(e.to_string()))?;
    if let Some(why) = auth.refuses(&chosen, &request.uri, next_hop) {
        return Err(UaError::Auth(format!(
            "challenge from realm {:?} not answered: {why}",
            chosen.realm
        )));
    }
    let values = [chosen.to_string()];
    let uri = request.uri.to_string();
    let digest_request = crate::digest::DigestRequest {
        method: request.method.as_str(),
        uri: &uri,
        body: &request.body,
    };
    let credentials = digest
        .respond_to_headers(values.iter().map(String::as_str), &digest_request)
        .map_err(|e| UaError::Auth(e.to_string()))?;
    Ok((answer_header, credentials.to_string()))
}

impl From<crate::message::HeaderError> for UaError {
    fn from(e: crate::message::HeaderError) -> Self {
        UaError::Endpoint(EndpointError::Header(e))
    }
}

async fn drive(
    mut endpoint: Endpoint,
    transport: SipTransport,
    mut inbound: mpsc::Receiver<Inbound>,
    mut failures: mpsc::Receiver<TransactionKey>,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<UaEvent>,
    counters: Arc<SipCounters>,
) {
    let mut calls: HashMap<TransactionKey, mpsc::Sender<ClientEvent>> = HashMap::new();
    loop {
        let deadline = endpoint.poll_timeout();
        tokio::select! {
            biased;
            message = inbound.recv() => {
                let Some(message) = message else { break };
                let now = Instant::now();
                let peer = message.peer;
                endpoint.handle_message(now, message.message, peer);
                // Take what else is queued without going back to the scheduler.
                for _ in 0..64 {
                    match inbound.try_recv() {
                        Ok(m) => {
                            let peer = m.peer;
                            endpoint.handle_message(now, m.message, peer);
                        }
                        Err(_) => break,
                    }
                }
            }
            Some(key) = failures.recv() => {
                // A TCP connection that never opened: its waiting messages were not sent.
                endpoint.handle_transport_error(Instant::now(), key);
            }
            command = commands.recv() => {
                let Some(command) = command else { break };
                run_command(&mut endpoint, &mut calls, command);
            }
            _ = sleep_until(deadline) => {
                endpoint.handle_timeout(Instant::now());
            }
        }
        flush(&mut endpoint, &transport).await;
        while let Some(event) = endpoint.poll_event() {
            dispatch(&mut calls, &events, event).await;
        }
        counters.publish(&endpoint);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn flush(endpoint: &mut Endpoint, transport: &SipTransport) {
    while let Some(transmit) = endpoint.poll_transmit() {
        if let Err(e) = transport
            .send(transmit.destination, transmit.payload, transmit.key)
            .await
        {
            debug!(error = %e, "send failed");
            if let Some(key) = transmit.key {
                endpoint.handle_transport_error(Instant::now(), key);
            }
        }
    }
}

fn run_command(
    endpoint: &mut Endpoint,
    calls: &mut HashMap<TransactionKey, mpsc::Sender<ClientEvent>>,
    command: Command,
) {
    let now = Instant::now();
    match command {
        Command::Send {
            request,
            destination,
            reply,
        } => {
            let result = endpoint
                .send_request(now, request.clone(), destination)
                .map(|key| {
                    let (tx, rx) = mpsc::channel(16);
                    calls.insert(key, tx);
                    ClientCall {
                        key,
                        current: Arc::new(std::sync::Mutex::new(key)),
                        request,
                        destination,
                        events: rx,
                    }
                })
                .map_err(UaError::from);
            let _ = reply.send(result);
        }
        Command::Cancel(key) => {
            if let Err(e) = endpoint.cancel(now, key) {
                debug!(error = %e, "cancel refused");
            }
        }
        Command::Respond {
            tx,
            status,
            reason,
            body,
            extra,
            reply,
        } => {
            let result = if extra.is_empty() {
                endpoint.respond(now, tx, status, reason.as_deref(), body)
            } else {
                endpoint.respond_extended(now, tx, status, reason.as_deref(), body, extra)
            };
            let _ = reply.send(result.map_err(UaError::from));
        }
        Command::DialogRequest {
            dialog,
            method,
            reply,
        } => {
            let result = endpoint
                .dialog_request(&dialog, method)
                .and_then(|r| endpoint.next_hop(&dialog).map(|hop| (r, hop)))
                .map_err(UaError::from);
            let _ = reply.send(result);
        }
        Command::NextHop { dialog, reply } => {
            let _ = reply.send(endpoint.next_hop(&dialog).map_err(UaError::from));
        }
        Command::Ack {
            dialog,
            destination,
            body,
            reply,
        } => {
            let _ = reply.send(
                endpoint
                    .send_ack(&dialog, destination, body)
                    .map_err(UaError::from),
            );
        }
        Command::Export { dialog, reply } => {
            let _ = reply.send(endpoint.export_dialog(&dialog));
        }
        Command::Import { record, reply } => {
            let _ = reply.send(endpoint.import_dialog(&record).map_err(UaError::from));
        }
        Command::Redeliver(tx) => endpoint.redeliver(now, tx),
        Command::Adopt {
            request,
            source,
            to_tag,
            reply,
        } => {
            let result = endpoint.adopt_invite(now, *request, source, to_tag);
            let _ = reply.send(result.map_err(UaError::from));
        }
        Command::Abandon(tx) => {
            endpoint.abandon(now, tx);
        }
        Command::RejectUnknown(tx) => endpoint.reject_unknown(now, tx),
        Command::RemoveDialog(id) => {
            endpoint.remove_dialog(&id);
        }
        Command::SetLimits {
            max_transactions,
            per_source,
            exempt,
            reply,
        } => {
            endpoint.set_limits(max_transactions, per_source, exempt);
            let _ = reply.send(());
        }
        Command::Stats(reply) => {
            let _ = reply.send((
                endpoint.stats(),
                endpoint.transaction_count(),
                endpoint.dialogs().len(),
            ));
        }
    }
}

async fn dispatch(
    calls: &mut HashMap<TransactionKey, mpsc::Sender<ClientEvent>>,
    events: &mpsc::Sender<UaEvent>,
    event: EndpointEvent,
) {
    let to_call = |calls: &mut HashMap<TransactionKey, mpsc::Sender<ClientEvent>>,
                   key: TransactionKey,
                   event: ClientEvent| {
        if let Some(tx) = calls.get(&key) {
            if tx.try_send(event).is_err() {
                warn!("a client call's response queue is full or closed; response dropped");
            }
        }
    };
    let ua_event = match event {
        EndpointEvent::Response {
            key,
            response,
            dialog,
        } => {
            let response = Box::new(response);
            to_call(calls, key, ClientEvent::Response { response, dialog });
            return;
        }
        EndpointEvent::Timeout { key } => {
            to_call(calls, key, ClientEvent::Timeout);
            return;
        }
        EndpointEvent::TransportError { key } => {
            to_call(calls, key, ClientEvent::TransportError);
            return;
        }
        EndpointEvent::Terminated { key } => {
            calls.remove(&key);
            return;
        }
        EndpointEvent::Request {
            key,
            request,
            source,
        } => UaEvent::Request {
            tx: key,
            request,
            source,
        },
        EndpointEvent::DialogRequest {
            key,
            dialog,
            request,
            source,
        } => UaEvent::DialogRequest {
            tx: key,
            dialog,
            request,
            source,
        },
        EndpointEvent::UnknownDialog {
            key,
            request,
            source,
        } => UaEvent::UnknownDialog {
            tx: key,
            request,
            source,
        },
        EndpointEvent::Ack { dialog, request } => UaEvent::Ack { dialog, request },
        EndpointEvent::Cancelled { invite } => UaEvent::Cancelled { tx: invite },
        EndpointEvent::AckTimeout { dialog } => UaEvent::AckTimeout { dialog },
        EndpointEvent::PrackTimeout { invite } => UaEvent::PrackTimeout { tx: invite },
    };
    if events.send(ua_event).await.is_err() {
        debug!("the TU dropped its event channel");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reliable_provisionals_are_pracked_once_in_order() {
        let dialog = DialogId::new("c", "l", "r");
        let ringing = |rseq: Option<u32>, require: bool| {
            let mut r = Response::new(180);
            r.headers
                .set_cseq(&crate::message::CSeq::new(7, Method::Invite));
            if require {
                r.headers.push(HeaderName::Require, "100rel");
            }
            if let Some(n) = rseq {
                r.headers.set(HeaderName::RSeq, n);
            }
            r
        };
        let mut pracked = HashMap::new();
        assert!(matches!(
            prack_for(&ringing(Some(5), false), &dialog, &mut pracked),
            Prack::None
        ));
        assert!(matches!(
            prack_for(&ringing(None, true), &dialog, &mut pracked),
            Prack::None
        ));
        match prack_for(&ringing(Some(5), true), &dialog, &mut pracked) {
            Prack::Send(rack) => assert_eq!(rack, "5 7 INVITE"),
            _ => panic!("not PRACKed"),
        }
        // A retransmission, then one out of order: neither PRACKed nor passed on.
        for rseq in [5, 7] {
            assert!(matches!(
                prack_for(&ringing(Some(rseq), true), &dialog, &mut pracked),
                Prack::Repeat
            ));
        }
        assert!(matches!(
            prack_for(&ringing(Some(6), true), &dialog, &mut pracked),
            Prack::Send(_)
        ));
    }

    #[test]
    fn credentials_answer_only_the_realms_hosts_and_algorithms_they_are_for() {
        let challenge = |realm: &str, algorithm: &str, qop: bool| {
            format!(
                "Digest realm=\"{realm}\", nonce=\"n1\", algorithm={algorithm}{}",
                if qop { ", qop=\"auth\"" } else { "" }
            )
            .parse::<crate::digest::Challenge>()
            .unwrap()
        };
        let trunk: SocketAddr = "203.0.113.5:5060".parse().unwrap();
        let elsewhere: SocketAddr = "198.51.100.9:5060".parse().unwrap();
        let uri = Uri::parse("sip:bob@carrier.example").unwrap();
        let auth = DigestAuth {
            realms: vec!["carrier.example".into()],
            hosts: vec!["203.0.113.5".into()],
            ..DigestAuth::anywhere("gw", "pw")
        };
        let ok = challenge("carrier.example", "SHA-256", true);
        assert_eq!(auth.refuses(&ok, &uri, trunk), None);
        assert!(auth
            .refuses(&challenge("evil.example", "SHA-256", true), &uri, trunk)
            .is_some());
        assert!(auth.refuses(&ok, &uri, elsewhere).is_some());
        // The Request-URI's host counts too (a name the next hop was resolved from).
        let named = DigestAuth {
            hosts: vec!["carrier.example".into()],
            ..auth.clone()
        };
        assert_eq!(named.refuses(&ok, &uri, elsewhere), None);
        // MD5 without qop only when allowed; with qop it is fine.
        let rfc2069 = challenge("carrier.example", "MD5", false);
        assert!(auth.refuses(&rfc2069, &uri, trunk).is_some());
        assert_eq!(
            auth.refuses(&challenge("carrier.example", "MD5", true), &uri, trunk),
            None
        );
        let legacy = DigestAuth {
            allow_md5_without_qop: true,
            ..auth.clone()
        };
        assert_eq!(legacy.refuses(&rfc2069, &uri, trunk), None);
        // Unscoped credentials (a test tool's) answer any realm and host.
        let any = DigestAuth::anywhere("gw", "pw");
        assert_eq!(
            any.refuses(&challenge("x", "SHA-256", true), &uri, elsewhere),
            None
        );
    }
}

#[cfg(test)]
mod contact_tests {
    use super::*;

    #[tokio::test]
    async fn the_contact_names_the_transport_and_scheme_the_request_goes_over() {
        let (ua, _events) = UserAgent::start(UaConfig {
            transport: TransportConfig {
                udp: Some("127.0.0.1:0".parse().unwrap()),
                tcp: None,
                tls: Some(crate::transport::TlsTransportConfig {
                    listen: None,
                    server: None,
                    client: crate::transport::tls::client_config(&[], false).unwrap(),
                    handshake_timeout: std::time::Duration::from_secs(1),
                }),
                ..Default::default()
            },
            resolver: Resolver::fixed(),
            ..Default::default()
        })
        .await
        .unwrap();
        let contact = |target: &str| {
            let uri = Uri::parse(target).unwrap();
            let from: NameAddr = "<sip:dev@thalamus.local>".parse().unwrap();
            ua.new_request(Method::Invite, uri.clone(), from, NameAddr::new(uri))
        };
        for (target, expected) in [
            ("sip:bob@127.0.0.1:5070", "<sip:dev@127.0.0.1:"),
            (
                "sip:bob@127.0.0.1;transport=tls",
                "<sip:dev@127.0.0.1:5061;transport=tls>",
            ),
            ("sips:bob@127.0.0.1", "<sips:dev@127.0.0.1:5061>"),
        ] {
            let got = ua
                .contact_for(Some("dev"), &contact(target))
                .await
                .0
                .to_string();
            assert!(got.starts_with(expected), "{target}: {got}");
        }
    }
}
