//! The balancer's routing core: a stateless SIP proxy (RFC 3261 section 16.11) over the
//! membership table. Sans-IO: a parsed message and its source go in, one [`Decision`] comes out
//! (bytes to send and where, a stateless answer, or a drop). No per-call state is kept
//! anywhere; every choice is a function of the message and the live node set.
//!
//! Requests:
//! * Checked (RFC 3261 16.3): a malformed request is answered 400 statelessly, Max-Forwards 0
//!   gets 483 (or 200 for OPTIONS), a loop (our own Via with the same request hash) gets 482.
//! * OPTIONS addressed to the balancer itself (Request-URI is us with no user part) is answered
//!   200 with Allow.
//! * A top Route naming us is removed (16.4; a strict router's Request-URI naming us is fixed
//!   too). Its `node`, `ns` (session tag) and `kh` (key hash) parameters, stamped by us in the
//!   Record-Route of the initial request, say where the dialog lives.
//! * In-dialog (To tag, or our Route with `node`): to the node that pins the dialog's key (a
//!   device whose session stayed on another node than its owner, see `Heartbeat::pinned`);
//!   else to the named node while it is up with the same session; otherwise by the hash over
//!   the eligible nodes (the clustered stack takes the dialog over there).
//! * Initial requests to devices (Request-URI host is the gateway domain, the balancer or a
//!   node): to the eligible node that pins the routing key, else to the rendezvous owner of
//!   the key among the eligible (up, not draining) nodes. Dialog-creating ones get our
//!   Record-Route `;lr;node=..;ns=..;kh=..`. No node: 503.
//! * Requests from a node to elsewhere are forwarded by their next Route or Request-URI, with our
//!   Record-Route (naming the sending node) on dialog-creating ones.
//! * CANCEL and ACK have no dialog parameters of their own when they follow a non-2xx: they
//!   hash exactly as their INVITE did (same key, same eligible set), so they reach its node.
//! * Every forwarded request gets our Via, with a branch derived from the incoming top Via branch
//!   and a hash of the request (16.6 step 8, 16.11): retransmissions, the CANCEL and the non-2xx
//!   ACK of an INVITE get the same branch, with no state. Max-Forwards is decremented (70 when
//!   absent).
//!
//! Responses: our top Via is removed and the response goes to the next Via (RFC 3261 18.2.2,
//! `received` and RFC 3581 `rport`); a response whose top Via is not ours is dropped.
//!
//! A UDP message of the common shape takes the same decision from its bytes (`fast`): a
//! response has our Via cut out ([`BalancerCore::route_response_datagram`]); a request has only
//! the fields this module reads parsed, is routed by the same code, and goes out as its bytes
//! with those fields written again ([`BalancerCore::route_request_datagram`]).
//!
//! Routing key: the Request-URI user when the Request-URI host is the gateway domain, the
//! balancer or a node; otherwise the From user; otherwise the Call-ID.
//!
//! Not done here: DNS (a next hop may be a name for the shell to resolve; no SRV/NAPTR), TLS,
//! SCTP and WebSocket transports (answered 502), forking, transactions, and authentication.

use std::borrow::Cow;
use std::net::SocketAddr;

use bytes::Bytes;
use thalamus_sip::message::{
    HeaderName, HeaderValue, Host, Message, Method, NameAddr, Request, Response, Rport, Uri,
    Version, Via,
};
use thalamus_sip::transport::{Peer, PeerTransport};

use crate::membership::{Membership, NodeEntry};
use thalamus_ownership::hash::{key_hash, owner_by_hash, stable_hash, NodeId, StableHasher};

mod fast;
pub use fast::{FastRequest, FastResponse, MAX_FAST_LINES};

/// The prefix of every branch this balancer writes (after the RFC 3261 magic cookie).
pub const BRANCH_PREFIX: &str = "z9hG4bK-lb-";
/// Methods the balancer lists in Allow when answering OPTIONS.
pub const ALLOW: &str =
    "INVITE, ACK, CANCEL, BYE, OPTIONS, PRACK, UPDATE, INFO, MESSAGE, REFER, SUBSCRIBE, NOTIFY";
const DEFAULT_SIP_PORT: u16 = 5060;

/// Routing settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    /// Host written in our Via and Record-Route (an IP address or a name).
    pub advertised_host: Host,
    /// Port written in our Via and Record-Route.
    pub advertised_port: u16,
    /// Other `host:port` pairs that mean "this balancer" in a Route or Request-URI.
    pub aliases: Vec<(Host, u16)>,
    /// Gateway domains: a Request-URI with one of these hosts addresses a device by its user.
    pub domains: Vec<String>,
    /// Requests larger than this go over TCP instead of UDP (RFC 3261 18.1.1).
    pub udp_max_bytes: usize,
    /// The port of our TLS listener (same host), when there is one: TLS dialogs are
    /// Record-Routed through it, and `sips:`/`transport=tls` targets need it.
    pub tls_port: Option<u16>,
}

impl RouterConfig {
    /// Settings for a balancer reached at `host:port`, with no domain.
    pub fn new(advertised_host: Host, advertised_port: u16) -> Self {
        Self {
            advertised_host,
            advertised_port,
            aliases: Vec::new(),
            domains: Vec::new(),
            udp_max_bytes: 1300,
            tls_port: None,
        }
    }
}

/// Where to send bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextHop {
    /// An address.
    Addr(SocketAddr),
    /// A host name to resolve (A/AAAA) and a port.
    Name {
        /// The name.
        host: String,
        /// The port.
        port: u16,
    },
}

/// Bytes to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Destination.
    pub to: NextHop,
    /// Transport to use.
    pub transport: PeerTransport,
    /// The serialized message.
    pub bytes: Bytes,
}

/// Why a message is dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A response whose top Via is not ours.
    NotOurVia,
    /// A response with no Via after ours.
    NoNextVia,
    /// A Via that names no usable destination (bad syntax or unsupported transport).
    UnusableVia,
    /// A malformed ACK (never answered).
    InvalidAck,
    /// A request so malformed that no answer can be addressed.
    Unanswerable,
    /// An ACK that cannot be routed (no node, Max-Forwards 0, loop, unsupported transport).
    AckNotRoutable,
    /// No node to send a request to while the balancer is starting (it has not heard every
    /// node's heartbeat yet): not answered 503, so the sender retransmits to a balancer that
    /// knows its nodes by then.
    StartingUp,
}

impl DropReason {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DropReason::NotOurVia => "not_our_via",
            DropReason::NoNextVia => "no_next_via",
            DropReason::UnusableVia => "unusable_via",
            DropReason::InvalidAck => "invalid_ack",
            DropReason::Unanswerable => "unanswerable",
            DropReason::AckNotRoutable => "ack_not_routable",
            DropReason::StartingUp => "starting_up",
        }
    }
}

/// What to do with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward a request to a gateway node.
    ToNode {
        /// The node.
        node: NodeId,
        /// What to send.
        out: Outgoing,
    },
    /// Forward a request away from the cluster (sent by a node).
    Outward {
        /// The sending node, when the source is one.
        from_node: Option<NodeId>,
        /// What to send.
        out: Outgoing,
    },
    /// Forward a response.
    Response {
        /// The node that sent it, when the source is one.
        from_node: Option<NodeId>,
        /// Its status.
        status: u16,
        /// What to send.
        out: Outgoing,
    },
    /// Answer a request statelessly.
    Answer {
        /// The status answered.
        status: u16,
        /// What to send.
        out: Outgoing,
    },
    /// Drop the message.
    Drop(DropReason),
}

/// Dialog parameters we stamped in a Record-Route and got back in a Route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct DialogParams {
    node: Option<NodeId>,
    session_tag: Option<u32>,
    key_hash: Option<u64>,
}

impl DialogParams {
    fn from_uri(uri: &Uri) -> Self {
        let Some(sip) = uri.as_sip() else {
            return Self::default();
        };
        Self {
            node: sip.param("node").and_then(|v| NodeId::new(v).ok()),
            session_tag: sip
                .param("ns")
                .and_then(|v| u32::from_str_radix(v, 16).ok()),
            key_hash: sip
                .param("kh")
                .and_then(|v| u64::from_str_radix(v, 16).ok()),
        }
    }
}

enum Target {
    Node(NodeId),
    Outward(Uri),
    Unavailable,
}

/// The routing core: configuration plus the membership table.
#[derive(Debug, Clone)]
pub struct BalancerCore {
    config: RouterConfig,
    sent_by: String,
    /// `host:port` of our TLS listener, when there is one.
    tls_sent_by: Option<String>,
    membership: Membership,
    starting: bool,
    learning: bool,
}

impl BalancerCore {
    /// A core with `membership` as its node table.
    pub fn new(mut config: RouterConfig, membership: Membership) -> Self {
        let sent_by = format!("{}:{}", config.advertised_host, config.advertised_port);
        let tls_sent_by = config.tls_port.map(|port| {
            config.aliases.push((config.advertised_host.clone(), port));
            format!("{}:{port}", config.advertised_host)
        });
        Self {
            config,
            sent_by,
            tls_sent_by,
            membership,
            starting: false,
            learning: false,
        }
    }

    /// Whether the balancer is starting: for one silence window after it starts it may not
    /// know every node yet, so a request over UDP with no node to go to is dropped (the sender
    /// retransmits) rather than answered 503. Over TCP the sender does not retransmit: it gets
    /// the answer as before. The shell sets it at start and clears it.
    pub fn set_starting(&mut self, starting: bool) {
        self.starting = starting;
    }

    /// Whether the balancer is still learning its nodes: for about one heartbeat interval after
    /// it starts, some nodes have not heartbeated it yet, so the hash over the nodes it knows
    /// would send calls to the wrong node. Requests over UDP that would be routed by the hash
    /// are then dropped (the sender retransmits); those for a node named in their Route still
    /// go there, and so does everything over TCP (its sender does not retransmit).
    /// The shell sets it at start and clears it.
    pub fn set_learning(&mut self, learning: bool) {
        self.learning = learning;
    }

    /// The routing settings.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// The membership table.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The membership table, to feed heartbeats and ticks.
    pub fn membership_mut(&mut self) -> &mut Membership {
        &mut self.membership
    }

    /// Routes one message received from `source`. Requests are expected as the transport
    /// delivers them (`received`/`rport` already stamped on the top Via).
    pub fn route(&self, message: Message, source: Peer) -> Decision {
        match message {
            Message::Request(req) => self.route_request(req, source),
            Message::Response(resp) => self.route_response(resp, source),
        }
    }

    fn source_node(&self, source: Peer, req: &Request) -> Option<&NodeEntry> {
        if let Some(node) = self.membership.node_at(source.addr) {
            return Some(node);
        }
        // Over TCP the source port is ephemeral: trust the Via sent-by when the IP matches.
        if source.transport == PeerTransport::Tcp {
            let via = req.headers.top_via().ok()?;
            let ip = via.host.ip()?;
            if ip != source.addr.ip() {
                return None;
            }
            let addr = SocketAddr::new(ip, via.port.unwrap_or(DEFAULT_SIP_PORT));
            return self.membership.node_at(addr);
        }
        None
    }

    fn is_us(&self, host: &Host, port: Option<u16>) -> bool {
        let port = port.unwrap_or(DEFAULT_SIP_PORT);
        (port == self.config.advertised_port && host.eq_ignore_case(&self.config.advertised_host))
            || self
                .config
                .aliases
                .iter()
                .any(|(h, p)| *p == port && host.eq_ignore_case(h))
    }

    fn is_us_uri(&self, uri: &Uri) -> bool {
        uri.as_sip().is_some_and(|u| self.is_us(&u.host, u.port))
    }

    fn is_our_via(&self, via: &Via) -> bool {
        self.is_us(&via.host, via.port)
    }

    /// Fast path for a Via exactly as we write it (`SIP/2.0/UDP <sent-by>;...`); a false answer
    /// only means "parse it to know".
    fn is_our_via_text(&self, via: &str) -> bool {
        via.strip_prefix("SIP/2.0/")
            .and_then(|rest| rest.get(4..))
            .and_then(|rest| rest.strip_prefix(self.sent_by.as_str()))
            .is_some_and(|rest| rest.starts_with(';'))
    }

    /// The node whose SIP address a URI names.
    fn node_of_uri(&self, uri: &Uri) -> Option<&NodeEntry> {
        let sip = uri.as_sip()?;
        let ip = sip.host.ip()?;
        self.membership
            .node_at(SocketAddr::new(ip, sip.port.unwrap_or(DEFAULT_SIP_PORT)))
    }

    fn is_local_uri(&self, uri: &Uri) -> bool {
        let Some(sip) = uri.as_sip() else {
            return false;
        };
        if let Host::Domain(d) = &sip.host {
            if self
                .config
                .domains
                .iter()
                .any(|x| x.eq_ignore_ascii_case(d))
            {
                return true;
            }
        }
        self.is_us(&sip.host, sip.port) || self.node_of_uri(uri).is_some()
    }

    /// The routing key of a request: Request-URI user for requests to devices, else From user,
    /// else Call-ID.
    pub fn routing_key<'a>(&self, req: &'a Request) -> Cow<'a, str> {
        if self.is_local_uri(&req.uri) {
            if let Some(user) = req.uri.user().filter(|u| !u.is_empty()) {
                return Cow::Borrowed(user);
            }
        }
        let from_user = req
            .headers
            .from()
            .ok()
            .and_then(|f| f.uri.user().filter(|u| !u.is_empty()).map(str::to_owned));
        match from_user {
            Some(user) => Cow::Owned(user),
            None => Cow::Borrowed(req.headers.call_id().unwrap_or_default()),
        }
    }

    /// The node for `key_hash`. `udp`: the request came over UDP (its sender retransmits), so
    /// while the balancer learns its nodes it is not hashed over the few it knows yet.
    fn pick(&self, key_hash: u64, in_dialog: bool, udp: bool) -> Target {
        if self.learning && udp {
            return Target::Unavailable;
        }
        // A device whose session (and calls) stayed on another node than its owner, e.g. after
        // the owner came back: its requests go where the session is.
        if let Some(node) = self.membership.pinned(key_hash) {
            if in_dialog || node.eligible() {
                return Target::Node(node.id.clone());
            }
        }
        let found = owner_by_hash(key_hash, self.membership.eligible()).or_else(|| {
            if in_dialog {
                // Only draining nodes left: better one of them than nothing for a dialog.
                owner_by_hash(key_hash, self.membership.alive())
            } else {
                None
            }
        });
        match found {
            Some(n) => Target::Node(n.clone()),
            None => Target::Unavailable,
        }
    }

    fn node_or_pick(&self, node: &NodeEntry, key_hash: u64, in_dialog: bool, udp: bool) -> Target {
        if self.membership.is_alive(&node.id) {
            Target::Node(node.id.clone())
        } else {
            self.pick(key_hash, in_dialog, udp)
        }
    }

    fn route_request(&self, req: Request, source: Peer) -> Decision {
        self.route_request_with(req, source, &|req: &Request| req.to_bytes())
    }

    /// Routes a request; `write` gives the bytes of the request as routed (the whole request
    /// written again, or the fast path's edit of the datagram).
    fn route_request_with(
        &self,
        mut req: Request,
        source: Peer,
        write: &dyn Fn(&Request) -> Bytes,
    ) -> Decision {
        let is_ack = req.method == Method::Ack;
        let udp = source.transport == PeerTransport::Udp;
        if req.headers.top_via_value().is_none() {
            return Decision::Drop(DropReason::Unanswerable);
        }
        if let Err((status, reason)) = check_request(&req) {
            if is_ack {
                return Decision::Drop(DropReason::InvalidAck);
            }
            return self.answer(&req, source, status, Some(&reason), false);
        }
        let max_forwards = req.headers.max_forwards().ok().flatten();
        let to_us_no_user = self.is_us_uri(&req.uri) && req.uri.user().is_none();
        if max_forwards == Some(0) {
            return match req.method {
                Method::Options => self.answer(&req, source, 200, None, true),
                Method::Ack => Decision::Drop(DropReason::AckNotRoutable),
                _ => self.answer(&req, source, 483, None, false),
            };
        }
        let request_hash = request_hash(&req);
        if self.looped(&req, request_hash) {
            if is_ack {
                return Decision::Drop(DropReason::AckNotRoutable);
            }
            return self.answer(&req, source, 482, None, false);
        }
        let branch = self.branch(&req, request_hash);

        // Route processing (RFC 3261 16.4).
        let mut dialog = DialogParams::default();
        if self.is_us_uri(&req.uri) && req.uri.as_sip().is_some_and(|u| u.param("node").is_some()) {
            // A strict router put our Record-Route in the Request-URI.
            dialog = DialogParams::from_uri(&req.uri);
            if let Some(last) = pop_last_route(&mut req) {
                req.uri = last.uri;
            }
        }
        // Ours may be two entries (a TLS dialog is Record-Routed twice, RFC 5658): both go.
        for _ in 0..2 {
            let Some(first) = first_route(&req).filter(|r| self.is_us_uri(&r.uri)) else {
                break;
            };
            req.headers.remove_first_value(&HeaderName::Route);
            let params = DialogParams::from_uri(&first.uri);
            if params.node.is_some() {
                dialog = params;
            }
        }
        let next_route = first_route(&req);
        if to_us_no_user && next_route.is_none() && req.method == Method::Options {
            return self.answer(&req, source, 200, None, true);
        }

        let source_node = self.source_node(source, &req).map(|n| n.id.clone());
        let has_to_tag = req.headers.to_tag().is_some();
        let in_dialog = has_to_tag || dialog.node.is_some();
        let message_kh = key_hash(&self.routing_key(&req));
        let kh = dialog.key_hash.unwrap_or(message_kh);

        let target = match (&dialog.node, &source_node) {
            // From outside, inside a dialog we stamped: to its node while it lives. (A request
            // from a node goes by its Request-URI and next Route below even when our Route names
            // another node: that node is the sender's peer, or the node whose dialog the sender
            // took over.)
            (Some(n), None) => {
                let same_session =
                    |e: &NodeEntry| dialog.session_tag.is_none_or(|t| t == e.session_tag);
                // A device pinned to a node keeps its session and its calls there (it moved
                // while its node was away, and still has a call): that node holds the dialog.
                if let Some(pinned) = self.membership.pinned(kh) {
                    Target::Node(pinned.id.clone())
                } else {
                    match self.membership.node(n) {
                        Some(e) if self.membership.is_alive(n) && same_session(e) => {
                            Target::Node(n.clone())
                        }
                        _ => self.pick(kh, true, udp),
                    }
                }
            }
            (_, Some(_)) => {
                // From a node. A `kh` in our Route is the sending node's own key (it is the
                // route the sender stamped for itself); the target's key is in the message.
                let kh = message_kh;
                if let Some(route) = &next_route {
                    match self.node_of_uri(&route.uri) {
                        Some(n) => self.node_or_pick(n, kh, in_dialog, udp),
                        None => Target::Outward(route.uri.clone()),
                    }
                } else if let Some(n) = self.node_of_uri(&req.uri) {
                    self.node_or_pick(n, kh, in_dialog, udp)
                } else if self.is_local_uri(&req.uri) {
                    self.pick(kh, in_dialog, udp)
                } else {
                    Target::Outward(req.uri.clone())
                }
            }
            _ => {
                // From outside: always to a node.
                let named = next_route
                    .as_ref()
                    .and_then(|r| self.node_of_uri(&r.uri))
                    .or_else(|| self.node_of_uri(&req.uri));
                match named {
                    Some(n) => self.node_or_pick(n, kh, in_dialog, udp),
                    None => self.pick(kh, in_dialog, udp),
                }
            }
        };

        let record_route = !has_to_tag
            && dialog.node.is_none()
            && matches!(
                req.method,
                Method::Invite | Method::Subscribe | Method::Refer | Method::Notify
            );
        let (to, outward_transport, rr_node, decision_node) = match target {
            Target::Unavailable => {
                if is_ack {
                    return Decision::Drop(DropReason::AckNotRoutable);
                }
                if self.starting && udp {
                    return Decision::Drop(DropReason::StartingUp);
                }
                return self.answer(&req, source, 503, None, false);
            }
            Target::Node(id) => {
                let Some(entry) = self.membership.node(&id) else {
                    return self.answer(&req, source, 503, None, false);
                };
                (
                    NextHop::Addr(entry.sip),
                    PeerTransport::Udp,
                    Some(id.clone()),
                    Some(id),
                )
            }
            Target::Outward(uri) => match uri_destination(&uri)
                // Over TLS only with a TLS listener for the dialog to come back to.
                .filter(|(_, t)| *t != PeerTransport::Tls || self.tls_sent_by.is_some())
            {
                Some((hop, transport)) => (hop, transport, source_node.clone(), None),
                None => {
                    if is_ack {
                        return Decision::Drop(DropReason::AckNotRoutable);
                    }
                    return self.answer(
                        &req,
                        source,
                        502,
                        Some("Bad Gateway (unsupported URI scheme or transport)"),
                        false,
                    );
                }
            },
        };

        if record_route {
            if let Some(entry) = rr_node.as_ref().and_then(|n| self.membership.node(n)) {
                // The external side reaches us over the transport it used (inbound) or the one
                // we use toward it (outward).
                let external = if decision_node.is_some() {
                    source.transport
                } else {
                    outward_transport
                };
                let rr = |sent_by: &str, transport: &str| {
                    format!(
                        "<sip:{sent_by};lr;node={};ns={:08x};kh={:016x}{transport}>",
                        entry.id, entry.session_tag, kh,
                    )
                };
                match (external, &self.tls_sent_by) {
                    (PeerTransport::Tls, Some(tls_sent_by)) => {
                        // Two entries (RFC 5658): our TLS address toward the TLS side, our UDP
                        // one toward the node, each nearest the side that uses it. For a sips
                        // Request-URI the TLS one is a sips URI (RFC 3261 section 16.6).
                        let outer = if req.uri.as_sip().is_some_and(|u| u.secure) {
                            rr(tls_sent_by, "").replacen("<sip:", "<sips:", 1)
                        } else {
                            rr(tls_sent_by, ";transport=tls")
                        };
                        let inner = rr(&self.sent_by, "");
                        let (first, second) = if decision_node.is_some() {
                            (outer, inner)
                        } else {
                            (inner, outer)
                        };
                        req.headers.prepend(HeaderName::RecordRoute, first);
                        req.headers.prepend(HeaderName::RecordRoute, second);
                    }
                    (PeerTransport::Tcp, _) => {
                        req.headers
                            .prepend(HeaderName::RecordRoute, rr(&self.sent_by, ";transport=tcp"));
                    }
                    _ => req
                        .headers
                        .prepend(HeaderName::RecordRoute, rr(&self.sent_by, "")),
                }
            }
        }
        req.headers
            .set_max_forwards(max_forwards.map_or(70, |m| m.saturating_sub(1)));

        let mut transport = outward_transport;
        req.headers
            .prepend(HeaderName::Via, self.via_value(transport, &branch));
        let mut bytes = write(&req);
        if transport == PeerTransport::Udp && bytes.len() > self.config.udp_max_bytes {
            transport = PeerTransport::Tcp;
            req.headers.remove_top_via();
            req.headers
                .prepend(HeaderName::Via, self.via_value(transport, &branch));
            bytes = write(&req);
        }
        let out = Outgoing {
            to,
            transport,
            bytes,
        };
        match decision_node {
            Some(node) => Decision::ToNode { node, out },
            None => Decision::Outward {
                from_node: source_node,
                out,
            },
        }
    }

    fn via_value(&self, transport: PeerTransport, branch: &str) -> HeaderValue {
        let t = match transport {
            PeerTransport::Udp => "UDP",
            PeerTransport::Tcp => "TCP",
            PeerTransport::Tls => "TLS",
        };
        HeaderValue::from(format!(
            "SIP/2.0/{t} {};branch={branch};rport",
            self.sent_by
        ))
    }

    /// Our branch: the magic cookie, our prefix, a hash of the incoming top Via branch (or of
    /// the whole top Via for RFC 2543 requests) and the request hash used for loop detection.
    fn branch(&self, req: &Request, request_hash: u32) -> String {
        let incoming = match req.headers.top_via_branch() {
            Some(b) if thalamus_sip::message::is_rfc3261_branch(b) => b,
            _ => req.headers.top_via_value().unwrap_or_default(),
        };
        let h = stable_hash(&[b"branch", incoming.as_bytes()]);
        format!("{BRANCH_PREFIX}{h:016x}-{request_hash:08x}")
    }

    /// True when one of our Vias carries the same request hash (RFC 3261 16.3 item 4).
    fn looped(&self, req: &Request, request_hash: u32) -> bool {
        let marker = BRANCH_PREFIX.as_bytes();
        let any = req
            .headers
            .get_all(&HeaderName::Via)
            .any(|v| contains(v.as_bytes(), marker));
        if !any {
            return false;
        }
        let suffix = format!("-{request_hash:08x}");
        req.headers.via().is_ok_and(|vias| {
            vias.iter().any(|v| {
                self.is_our_via(v)
                    && v.branch().is_some_and(|b| {
                        b.starts_with(BRANCH_PREFIX) && b.ends_with(suffix.as_str())
                    })
            })
        })
    }

    /// A stateless answer to `req`, addressed by its top Via (or to its source).
    fn answer(
        &self,
        req: &Request,
        source: Peer,
        status: u16,
        reason: Option<&str>,
        allow: bool,
    ) -> Decision {
        let mut resp = Response::from_request(req, status, reason);
        if status >= 200 && req.headers.to_tag().is_none() {
            let tag = stable_hash(&[
                b"tag",
                req.headers.call_id().unwrap_or_default().as_bytes(),
                req.headers.from_tag().unwrap_or_default().as_bytes(),
                req.headers.top_via_branch().unwrap_or_default().as_bytes(),
            ]);
            resp.set_to_tag(&format!("lb{tag:016x}"));
        }
        if allow {
            resp.headers.push(HeaderName::Allow, ALLOW);
        }
        let to = match source.transport {
            // Over a connection the answer goes back on the connection it came on.
            PeerTransport::Tcp | PeerTransport::Tls => {
                Some((NextHop::Addr(source.addr), source.transport))
            }
            PeerTransport::Udp => req.headers.top_via().ok().and_then(|v| via_destination(&v)),
        };
        let (to, transport) = to.unwrap_or((NextHop::Addr(source.addr), source.transport));
        Decision::Answer {
            status,
            out: Outgoing {
                to,
                transport,
                bytes: resp.to_bytes(),
            },
        }
    }

    fn route_response(&self, mut resp: Response, source: Peer) -> Decision {
        let from_node = self.membership.node_at(source.addr).map(|n| n.id.clone());
        let Some(top) = resp.headers.top_via_value() else {
            return Decision::Drop(DropReason::UnusableVia);
        };
        if !self.is_our_via_text(top) {
            match Via::parse(top) {
                Ok(v) if self.is_our_via(&v) => {}
                Ok(_) => return Decision::Drop(DropReason::NotOurVia),
                Err(_) => return Decision::Drop(DropReason::UnusableVia),
            }
        }
        resp.headers.remove_top_via();
        let next = match resp.headers.top_via() {
            Ok(v) => v,
            Err(thalamus_sip::message::HeaderError::Missing(_)) => {
                return Decision::Drop(DropReason::NoNextVia)
            }
            Err(_) => return Decision::Drop(DropReason::UnusableVia),
        };
        let Some((to, transport)) = via_destination(&next) else {
            return Decision::Drop(DropReason::UnusableVia);
        };
        Decision::Response {
            from_node,
            status: resp.status,
            out: Outgoing {
                to,
                transport,
                bytes: resp.to_bytes(),
            },
        }
    }
}

/// The key the split-brain watch knows a dialog by: a hash of its Call-ID.
pub fn dialog_key(call_id: &[u8]) -> u64 {
    stable_hash(&[call_id])
}

/// What a stateless proxy must be able to read in a request (RFC 3261 16.3 item 1: only the
/// fields it uses): version, Call-ID, CSeq agreeing with the method, From, To and Max-Forwards.
/// Everything else is the business of the node that gets the request. The error carries the
/// status and reason to answer with.
fn check_request(req: &Request) -> Result<(), (u16, String)> {
    let bad = |what: &str| Err((400, format!("Bad Request ({what})")));
    if req.version != Version::SIP_2_0 {
        return Err((505, "Version Not Supported".to_owned()));
    }
    if req.headers.call_id().is_err() {
        return bad("missing or invalid Call-ID");
    }
    match req.headers.cseq() {
        Ok(c) if c.method == req.method => {}
        Ok(_) => return bad("CSeq method does not match"),
        Err(_) => return bad("missing or invalid CSeq"),
    }
    if !req.headers.contains(&HeaderName::From) || !req.headers.contains(&HeaderName::To) {
        return bad("missing From or To");
    }
    if req.headers.count(&HeaderName::MaxForwards) > 1 || req.headers.max_forwards().is_err() {
        return bad("invalid Max-Forwards");
    }
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The hash of what identifies a request for loop detection: Request-URI, From tag, Call-ID and
/// CSeq number (not the To tag nor the method, so that the CANCEL and the non-2xx ACK of an
/// INVITE hash like it).
fn request_hash(req: &Request) -> u32 {
    let cseq = req.headers.cseq().map(|c| c.seq).unwrap_or_default();
    // The Request-URI's text goes straight into the hash (no string for it per request).
    let mut h = StableHasher::new();
    h.part(b"request");
    h.part_display(&req.uri);
    h.part(req.headers.from_tag().unwrap_or_default().as_bytes());
    h.part(req.headers.call_id().unwrap_or_default().as_bytes());
    h.part(&cseq.to_le_bytes());
    (h.finish() & 0xffff_ffff) as u32
}

fn first_route(req: &Request) -> Option<NameAddr> {
    let text = req.headers.get(&HeaderName::Route)?.to_str().ok()?;
    let first = first_list_item(text)?;
    NameAddr::parse(first).ok()
}

/// The first element of a comma-separated header value (commas inside `<>` or quotes do not
/// split).
fn first_list_item(text: &str) -> Option<&str> {
    let mut depth_angle = false;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if quoted {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            '<' => depth_angle = true,
            '>' => depth_angle = false,
            ',' if !depth_angle => return text.get(..i).map(str::trim).filter(|s| !s.is_empty()),
            _ => {}
        }
    }
    Some(text.trim()).filter(|s| !s.is_empty())
}

/// Removes the last Route value (strict-routing repair, RFC 3261 16.4) and returns it.
fn pop_last_route(req: &mut Request) -> Option<NameAddr> {
    let mut routes = req.headers.route().ok()?;
    let last = routes.pop()?;
    req.headers.remove(&HeaderName::Route);
    for r in &routes {
        req.headers.push_route(r);
    }
    Some(last)
}

/// Where a request for `uri` goes: host (maddr first), port, and the transport (TLS for a
/// `sips:` URI or `transport=tls`, on port 5061 by default). `None` for schemes and transports
/// the balancer does not speak.
fn uri_destination(uri: &Uri) -> Option<(NextHop, PeerTransport)> {
    let sip = uri.as_sip()?;
    let transport = thalamus_sip::resolve::uri_transport(sip).ok()?;
    let port = sip
        .port
        .unwrap_or(thalamus_sip::resolve::default_port(transport));
    let transport = transport.unwrap_or(PeerTransport::Udp);
    let host = match sip.maddr() {
        Some(m) => Host::parse(m).ok()?,
        None => sip.host.clone(),
    };
    Some((hop(&host, port), transport))
}

fn hop(host: &Host, port: u16) -> NextHop {
    match host {
        Host::Domain(d) => NextHop::Name {
            host: d.clone(),
            port,
        },
        other => match other.ip() {
            Some(ip) => NextHop::Addr(SocketAddr::new(ip, port)),
            None => NextHop::Name {
                host: other.to_string(),
                port,
            },
        },
    }
}

/// Where a response for `via` goes (RFC 3261 18.2.2, RFC 3581): `maddr`, else `received`
/// (with `rport` when filled in), else the sent-by. `None` for transports we do not speak.
fn via_destination(via: &Via) -> Option<(NextHop, PeerTransport)> {
    let transport = PeerTransport::from_transport(&via.transport)?;
    // 5061 for a TLS Via without a port (RFC 3261 section 18.2.2).
    let default = thalamus_sip::resolve::default_port(Some(transport));
    let port = match via.rport() {
        Some(Rport::Port(p)) => p,
        _ => via.port.unwrap_or(default),
    };
    if let Some(m) = via.maddr().and_then(|m| Host::parse(m).ok()) {
        return Some((hop(&m, via.port.unwrap_or(default)), transport));
    }
    if let Some(ip) = via.received_ip() {
        return Some((NextHop::Addr(SocketAddr::new(ip, port)), transport));
    }
    Some((hop(&via.host, port), transport))
}

#[cfg(test)]
mod tests;
