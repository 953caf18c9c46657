//! The dialog state of RFC 3261 section 12: [`Dialog`], its [`DialogId`], [`Role`] and
//! [`DialogState`], and its creation on the UAC side (section 12.1.2) and on the UAS side
//! (section 12.1.1).
//!
//! Header texts are normalized once, when the dialog is created (From and To with their tags,
//! Contact, Route values), and kept as small shared buffers that later requests reuse without
//! copying. Nothing here sends, receives or reads a clock; the in-dialog procedures live in the
//! `in_dialog` module.

use std::fmt;

use crate::message::{
    Contact, HeaderName, HeaderValue, Headers, Method, NameAddr, Request, Response, Uri,
};

use super::error::DialogError;

/// Largest route set a dialog keeps (Record-Route entries); a longer one is refused.
pub const MAX_ROUTE_SET_LEN: usize = 16;

/// A dialog identifier: Call-ID, local tag and remote tag (RFC 3261 section 12).
///
/// The remote tag is empty for a peer that sent no From tag (RFC 2543).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DialogId {
    /// The Call-ID.
    pub call_id: String,
    /// Our tag (From of our requests, To of the requests we receive).
    pub local_tag: String,
    /// The peer's tag (empty for an RFC 2543 peer without From tag).
    pub remote_tag: String,
}

impl DialogId {
    /// A dialog id from its three parts.
    pub fn new(
        call_id: impl Into<String>,
        local_tag: impl Into<String>,
        remote_tag: impl Into<String>,
    ) -> Self {
        Self {
            call_id: call_id.into(),
            local_tag: local_tag.into(),
            remote_tag: remote_tag.into(),
        }
    }

    /// The value of a Replaces header (RFC 3891) that names this dialog to its peer: the tags
    /// are written from the side of the UA that receives the INVITE carrying it, which is the
    /// peer (`to-tag` is the peer's tag, `from-tag` ours).
    pub fn replaces(&self) -> String {
        format!(
            "{};to-tag={};from-tag={}",
            self.call_id, self.remote_tag, self.local_tag
        )
    }

    /// True when the id has these three parts (tags compare exactly, as RFC 3261 section 19.3
    /// asks).
    pub fn matches(&self, call_id: &str, local_tag: &str, remote_tag: &str) -> bool {
        self.call_id == call_id && self.local_tag == local_tag && self.remote_tag == remote_tag
    }
}

/// The option tag of the Replaces extension (RFC 3891 section 6.2).
pub const REPLACES_TAG: &str = "replaces";

/// The option tag of REFER without its implicit subscription (RFC 4488 section 4): a REFER
/// with `Refer-Sub: false` is accepted with `Refer-Sub: false` and no NOTIFY follows.
pub const NOREFERSUB_TAG: &str = "norefersub";

/// A Replaces header (RFC 3891 section 6.1) as the UA that receives it reads it: the dialog
/// it names, from that UA's side (`to-tag` is its own tag, `from-tag` the other's), and
/// whether only an early dialog may be replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaces {
    /// The dialog to replace, as the receiver holds it.
    pub dialog: DialogId,
    /// `early-only`: a confirmed dialog must not be replaced (486).
    pub early_only: bool,
}

impl Replaces {
    /// Parses `callid;to-tag=..;from-tag=..[;early-only]` (parameters in any order, names
    /// case-insensitive, others ignored); `None` without a Call-ID or either tag.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.split(';');
        let call_id = parts.next()?.trim();
        if call_id.is_empty() {
            return None;
        }
        let (mut to_tag, mut from_tag, mut early_only) = (None, None, false);
        for part in parts {
            let (name, value) = match part.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (part.trim(), None),
            };
            match (name.to_ascii_lowercase().as_str(), value) {
                ("to-tag", Some(v)) => to_tag = Some(v),
                ("from-tag", Some(v)) => from_tag = Some(v),
                ("early-only", None) => early_only = true,
                _ => {}
            }
        }
        Some(Self {
            dialog: DialogId::new(call_id, to_tag?, from_tag?),
            early_only,
        })
    }
}

impl fmt::Display for DialogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{};local-tag={};remote-tag={}",
            self.call_id, self.local_tag, self.remote_tag
        )
    }
}

/// Which side of the dialog-creating INVITE we were.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// We sent the INVITE (caller).
    Uac,
    /// We received the INVITE (callee).
    Uas,
}

impl Role {
    /// `uac` or `uas` (the spelling used in [`crate::dialog::DialogRecord`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Uac => "uac",
            Role::Uas => "uas",
        }
    }

    /// Parses `uac` or `uas`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "uac" => Some(Role::Uac),
            "uas" => Some(Role::Uas),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of a dialog (RFC 3261 section 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DialogState {
    /// Created by a provisional response; not yet answered with a 2xx.
    Early,
    /// Established by a 2xx.
    Confirmed,
    /// Ended (BYE sent or received, a failure response to an early dialog, 481 or 408).
    Terminated,
}

impl DialogState {
    /// `early`, `confirmed` or `terminated` (the spelling used in
    /// [`crate::dialog::DialogRecord`]).
    pub fn as_str(self) -> &'static str {
        match self {
            DialogState::Early => "early",
            DialogState::Confirmed => "confirmed",
            DialogState::Terminated => "terminated",
        }
    }

    /// Parses `early`, `confirmed` or `terminated`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "early" => Some(DialogState::Early),
            "confirmed" => Some(DialogState::Confirmed),
            "terminated" => Some(DialogState::Terminated),
            _ => None,
        }
    }
}

impl fmt::Display for DialogState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One dialog: the state of RFC 3261 section 12 plus what this crate needs to acknowledge 2xx
/// responses.
///
/// Build one with [`Dialog::new_uac`], [`Dialog::new_uas`] or [`Dialog::import`]; the
/// in-dialog procedures are [`Dialog::create_request`], [`Dialog::create_ack`],
/// [`Dialog::receive_request`], [`Dialog::receive_response`], [`Dialog::response_sent`] and
/// [`Dialog::create_response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dialog {
    pub(super) id: DialogId,
    pub(super) role: Role,
    pub(super) state: DialogState,
    pub(super) secure: bool,
    /// False from the moment we send an INVITE until its first 2xx arrives.
    pub(super) invite_answered: bool,
    /// Whether the first route set entry is a strict router (no `lr`).
    pub(super) strict_route: bool,
    pub(super) local_cseq: Option<u32>,
    pub(super) remote_cseq: Option<u32>,
    /// CSeq number of the latest INVITE we sent in this dialog (for its ACK).
    pub(super) local_invite_cseq: Option<u32>,
    /// CSeq number of the latest INVITE the peer sent in this dialog (to match its ACK).
    pub(super) remote_invite_cseq: Option<u32>,
    /// From of our requests: local URI with the local tag, normalized name-addr text.
    pub(super) local_uri: HeaderValue,
    /// To of our requests: remote URI with the remote tag (if any), normalized text.
    pub(super) remote_uri: HeaderValue,
    /// Our Contact, normalized name-addr text.
    pub(super) local_contact: HeaderValue,
    pub(super) remote_target: Uri,
    /// Route values in the order they go into requests, normalized name-addr texts.
    pub(super) route_set: Box<[HeaderValue]>,
    /// The ACK last sent for a 2xx, kept to be re-sent when the 2xx is retransmitted.
    pub(super) sent_ack: Option<Box<Request>>,
}

/// The text of a value this module built from a `String` (always UTF-8).
pub(super) fn text(value: &HeaderValue) -> &str {
    value.to_str().unwrap_or_default()
}

/// A stored header text: an exact-size buffer (a `String` with spare capacity would keep the
/// spare bytes and need an extra shared-buffer header once the value is cloned).
pub(super) fn stored_text(addr: &NameAddr) -> HeaderValue {
    let mut text = addr.to_string();
    text.shrink_to_fit();
    HeaderValue::from(text)
}

/// The name-addr text of `addr` with `tag` as its tag parameter (none when `tag` is empty).
pub(super) fn tagged_text(mut addr: NameAddr, tag: &str) -> HeaderValue {
    if tag.is_empty() {
        addr.params.remove("tag");
    } else {
        addr.set_tag(tag);
    }
    stored_text(&addr)
}

/// The first Contact address of a message, if any (`*` is skipped).
pub(super) fn first_contact(headers: &Headers) -> Result<Option<NameAddr>, DialogError> {
    if !headers.contains(&HeaderName::Contact) {
        return Ok(None);
    }
    Ok(headers.contact()?.into_iter().find_map(|c| match c {
        Contact::Address(a) => Some(a),
        Contact::Wildcard => None,
    }))
}

/// True when a route entry is a strict router (not a SIP URI with `lr`).
pub(super) fn is_strict_router(route: &NameAddr) -> bool {
    !route.uri.as_sip().is_some_and(|u| u.is_loose_router())
}

/// The route set from the Record-Route of a message: reversed for the UAC, in order for the UAS.
/// Returns the normalized texts and whether the first entry is a strict router.
pub(super) fn route_set_from(
    headers: &Headers,
    role: Role,
) -> Result<(Box<[HeaderValue]>, bool), DialogError> {
    if !headers.contains(&HeaderName::RecordRoute) {
        return Ok((Box::default(), false));
    }
    let mut routes = headers.record_route()?;
    if routes.len() > MAX_ROUTE_SET_LEN {
        return Err(DialogError::RouteSetTooLong(routes.len()));
    }
    if role == Role::Uac {
        routes.reverse();
    }
    let strict = routes.first().is_some_and(is_strict_router);
    let texts = routes.iter().map(stored_text).collect();
    Ok((texts, strict))
}

/// Checks that the response answers the request: same Call-ID, From tag and CSeq.
fn check_answers(request: &Request, response: &Response) -> Result<(), DialogError> {
    if response.headers.call_id()? != request.headers.call_id()? {
        return Err(DialogError::Mismatch(HeaderName::CallId));
    }
    if response.headers.from_tag() != request.headers.from_tag() {
        return Err(DialogError::Mismatch(HeaderName::From));
    }
    if response.headers.cseq()? != request.headers.cseq()? {
        return Err(DialogError::Mismatch(HeaderName::CSeq));
    }
    Ok(())
}

fn state_for_status(status: u16) -> Result<DialogState, DialogError> {
    match status {
        101..=199 => Ok(DialogState::Early),
        200..=299 => Ok(DialogState::Confirmed),
        s => Err(DialogError::NotDialogCreating(s)),
    }
}

fn is_sips(uri: &Uri) -> bool {
    uri.as_sip().is_some_and(|u| u.secure)
}

impl Dialog {
    /// The UAC dialog created by `response` (a 1xx with a To tag gives an early dialog, a 2xx a
    /// confirmed one) to the `invite` we sent (RFC 3261 section 12.1.2).
    ///
    /// The route set is the Record-Route of the response reversed; the remote target is its
    /// Contact (the Request-URI of the INVITE when a provisional response has none); the local
    /// CSeq is the INVITE's; the remote CSeq is empty; the secure flag is set when the
    /// Request-URI is a SIPS URI (the caller sends such requests over TLS only).
    ///
    /// A 2xx to a SUBSCRIBE we sent creates the subscription's dialog the same way (RFC 6665
    /// section 4.1.2.1); no ACK follows it and it carries no INVITE CSeq.
    pub fn new_uac(invite: &Request, response: &Response) -> Result<Dialog, DialogError> {
        let subscribe = invite.method == Method::Subscribe;
        if invite.method != Method::Invite && !(subscribe && response.is_success()) {
            return Err(DialogError::NotInvite(invite.method.clone()));
        }
        let state = state_for_status(response.status)?;
        check_answers(invite, response)?;
        let call_id = invite.headers.call_id()?;
        let local_tag = invite
            .headers
            .from_tag()
            .ok_or(DialogError::MissingTag(HeaderName::From))?;
        let remote_tag = response
            .headers
            .to_tag()
            .ok_or(DialogError::MissingTag(HeaderName::To))?;
        let cseq = invite.headers.cseq()?;
        let local_contact = first_contact(&invite.headers)?.ok_or(DialogError::MissingContact)?;
        let remote_target = match first_contact(&response.headers)? {
            Some(c) => c.uri,
            None => invite.uri.clone(),
        };
        let (route_set, strict_route) = route_set_from(&response.headers, Role::Uac)?;
        Ok(Dialog {
            id: DialogId::new(call_id, local_tag, remote_tag),
            role: Role::Uac,
            state,
            secure: is_sips(&invite.uri),
            invite_answered: subscribe || state == DialogState::Confirmed,
            strict_route,
            local_cseq: Some(cseq.seq),
            remote_cseq: None,
            local_invite_cseq: (!subscribe).then_some(cseq.seq),
            remote_invite_cseq: None,
            local_uri: tagged_text(invite.headers.from()?, local_tag),
            remote_uri: tagged_text(invite.headers.to()?, remote_tag),
            local_contact: stored_text(&local_contact),
            remote_target,
            route_set,
            sent_ack: None,
        })
    }

    /// The dialog of a subscription created by its first NOTIFY (`notify`) when it arrives
    /// before the 2xx to our `subscribe` (RFC 6665 section 4.1.2.4): ours as the subscriber
    /// (UAC role), the remote tag the NOTIFY's From tag, the remote target its Contact, the route
    /// set its Record-Route in order (as for any dialog a received request creates), the local
    /// CSeq the SUBSCRIBE's.
    pub fn new_subscriber(subscribe: &Request, notify: &Request) -> Result<Dialog, DialogError> {
        if subscribe.method != Method::Subscribe {
            return Err(DialogError::NotInvite(subscribe.method.clone()));
        }
        let call_id = subscribe.headers.call_id()?;
        let local_tag = subscribe
            .headers
            .from_tag()
            .ok_or(DialogError::MissingTag(HeaderName::From))?;
        let remote_tag = notify
            .headers
            .from_tag()
            .ok_or(DialogError::MissingTag(HeaderName::From))?;
        let cseq = subscribe.headers.cseq()?;
        let local_contact =
            first_contact(&subscribe.headers)?.ok_or(DialogError::MissingContact)?;
        let remote_target = first_contact(&notify.headers)?
            .ok_or(DialogError::MissingContact)?
            .uri;
        let (route_set, strict_route) = route_set_from(&notify.headers, Role::Uas)?;
        Ok(Dialog {
            id: DialogId::new(call_id, local_tag, remote_tag),
            role: Role::Uac,
            state: DialogState::Confirmed,
            secure: is_sips(&subscribe.uri),
            invite_answered: true,
            strict_route,
            local_cseq: Some(cseq.seq),
            remote_cseq: None,
            local_invite_cseq: None,
            remote_invite_cseq: None,
            local_uri: tagged_text(subscribe.headers.from()?, local_tag),
            remote_uri: tagged_text(subscribe.headers.to()?, remote_tag),
            local_contact: stored_text(&local_contact),
            remote_target,
            route_set,
            sent_ack: None,
        })
    }

    /// The UAS dialog created when we send `response` (a 1xx with a To tag gives an early
    /// dialog, a 2xx a confirmed one) to the `invite` we received (RFC 3261 section 12.1.1).
    ///
    /// The local tag is the To tag of `response` and the local Contact its Contact (build the
    /// response with [`crate::dialog::uas_response`]), or by our 2xx to a SUBSCRIBE (RFC 6665
    /// section 4.2.1: the NOTIFYs go in it). The route set is the Record-Route of the
    /// INVITE in order; the remote target is its Contact; the remote CSeq is its CSeq; the local
    /// CSeq stays empty until our first request.
    pub fn new_uas(invite: &Request, response: &Response) -> Result<Dialog, DialogError> {
        let subscribe = invite.method == Method::Subscribe;
        if invite.method != Method::Invite && !subscribe {
            return Err(DialogError::NotInvite(invite.method.clone()));
        }
        if invite.headers.to_tag().is_some() {
            return Err(DialogError::AlreadyInDialog);
        }
        let state = state_for_status(response.status)?;
        check_answers(invite, response)?;
        let call_id = invite.headers.call_id()?;
        let local_tag = response
            .headers
            .to_tag()
            .ok_or(DialogError::MissingTag(HeaderName::To))?;
        let remote_tag = invite.headers.from_tag().unwrap_or_default();
        let cseq = invite.headers.cseq()?;
        let local_contact = first_contact(&response.headers)?.ok_or(DialogError::MissingContact)?;
        let remote_target = first_contact(&invite.headers)?
            .ok_or(DialogError::MissingContact)?
            .uri;
        let (route_set, strict_route) = route_set_from(&invite.headers, Role::Uas)?;
        Ok(Dialog {
            id: DialogId::new(call_id, local_tag, remote_tag),
            role: Role::Uas,
            state,
            secure: is_sips(&invite.uri),
            invite_answered: true,
            strict_route,
            local_cseq: None,
            remote_cseq: Some(cseq.seq),
            local_invite_cseq: None,
            remote_invite_cseq: (!subscribe).then_some(cseq.seq),
            local_uri: tagged_text(invite.headers.to()?, local_tag),
            remote_uri: tagged_text(invite.headers.from()?, remote_tag),
            local_contact: stored_text(&local_contact),
            remote_target,
            route_set,
            sent_ack: None,
        })
    }

    /// The dialog id.
    pub fn id(&self) -> &DialogId {
        &self.id
    }

    /// The Call-ID.
    pub fn call_id(&self) -> &str {
        &self.id.call_id
    }

    /// Our tag.
    pub fn local_tag(&self) -> &str {
        &self.id.local_tag
    }

    /// The peer's tag (empty for an RFC 2543 peer).
    pub fn remote_tag(&self) -> &str {
        &self.id.remote_tag
    }

    /// UAC or UAS.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Early, Confirmed or Terminated.
    pub fn state(&self) -> DialogState {
        self.state
    }

    /// True when the dialog was created by a SIPS Request-URI (its requests must use TLS).
    pub fn is_secure(&self) -> bool {
        self.secure
    }

    /// The CSeq number of our last request; `None` before our first request on the UAS side.
    pub fn local_cseq(&self) -> Option<u32> {
        self.local_cseq
    }

    /// The highest CSeq number received from the peer; `None` before its first request on the
    /// UAC side.
    pub fn remote_cseq(&self) -> Option<u32> {
        self.remote_cseq
    }

    /// The CSeq number of the latest INVITE we sent in this dialog (the number of its ACK).
    pub fn local_invite_cseq(&self) -> Option<u32> {
        self.local_invite_cseq
    }

    /// The CSeq number of the latest INVITE the peer sent in this dialog (the number of the ACK
    /// we expect).
    pub fn remote_invite_cseq(&self) -> Option<u32> {
        self.remote_invite_cseq
    }

    /// The local URI as the From of our requests: a name-addr with the local tag.
    pub fn local_uri(&self) -> &str {
        text(&self.local_uri)
    }

    /// The remote URI as the To of our requests: a name-addr with the remote tag.
    pub fn remote_uri(&self) -> &str {
        text(&self.remote_uri)
    }

    /// The local URI parsed (display name, URI, tag).
    pub fn local_address(&self) -> Result<NameAddr, DialogError> {
        Ok(NameAddr::parse(self.local_uri())?)
    }

    /// The remote URI parsed (display name, URI, tag).
    pub fn remote_address(&self) -> Result<NameAddr, DialogError> {
        Ok(NameAddr::parse(self.remote_uri())?)
    }

    /// Our Contact as a name-addr (sent in target refresh requests and their 2xx).
    pub fn local_contact(&self) -> &str {
        text(&self.local_contact)
    }

    /// The remote target: the URI requests within the dialog are sent to.
    pub fn remote_target(&self) -> &Uri {
        &self.remote_target
    }

    /// The route set, in the order the Route headers of our requests list it.
    pub fn route_set(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.route_set.iter().map(text)
    }

    /// True when the first route set entry is a strict router (no `lr` parameter), so that
    /// requests put it in the Request-URI (RFC 3261 section 12.2.1.1).
    pub fn uses_strict_routing(&self) -> bool {
        self.strict_route
    }

    /// A rough count of the heap bytes this dialog holds: strings, header buffers (with the
    /// shared-buffer header each gets once a request has cloned it), the route set and the URI
    /// of the remote target; allocator overhead not included. For memory budgets and metrics.
    pub fn estimated_heap_bytes(&self) -> usize {
        let id = self.id.call_id.capacity()
            + self.id.local_tag.capacity()
            + self.id.remote_tag.capacity();
        // bytes::Bytes allocates a 24-byte control block when a value is first cloned.
        const SHARED: usize = 24;
        let values =
            self.local_uri.len() + self.remote_uri.len() + self.local_contact.len() + 3 * SHARED;
        let routes = self.route_set.len() * (std::mem::size_of::<HeaderValue>() + SHARED)
            + self.route_set.iter().map(HeaderValue::len).sum::<usize>();
        let ack = self.sent_ack.as_ref().map_or(0, |a| {
            std::mem::size_of::<Request>() + a.to_bytes().len() + a.headers.len() * 64
        });
        id + values + routes + uri_heap_bytes(&self.remote_target) + ack
    }
}

/// A rough count of the heap bytes of a URI.
fn uri_heap_bytes(uri: &Uri) -> usize {
    match uri {
        Uri::Sip(u) => {
            let host = match &u.host {
                crate::message::Host::Domain(d) => d.capacity(),
                _ => 0,
            };
            let params = u.params.len() * std::mem::size_of::<crate::message::Param>()
                + u.params
                    .iter()
                    .map(|p| p.name.capacity() + p.value.as_ref().map_or(0, String::capacity))
                    .sum::<usize>();
            let headers = u.headers.len() * std::mem::size_of::<crate::message::UriHeader>()
                + u.headers
                    .iter()
                    .map(|h| h.name.capacity() + h.value.capacity())
                    .sum::<usize>();
            u.user.as_ref().map_or(0, String::capacity)
                + u.password.as_ref().map_or(0, String::capacity)
                + host
                + params
                + headers
        }
        other => other.to_string().len() + 32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialog::test_support::*;
    use crate::dialog::uas_response;

    #[test]
    fn replaces_names_the_dialog_from_the_peer_s_side() {
        let ours = DialogId::new("abc@host", "ours", "theirs");
        assert_eq!(ours.replaces(), "abc@host;to-tag=theirs;from-tag=ours");
        // The peer reads it as its own view of the dialog.
        let read = Replaces::parse(&ours.replaces()).unwrap();
        assert_eq!(read.dialog, DialogId::new("abc@host", "theirs", "ours"));
        assert!(!read.early_only);
        let early = Replaces::parse(" x ; From-Tag = a ;early-only; to-tag=b;foo=1").unwrap();
        assert_eq!(early.dialog, DialogId::new("x", "b", "a"));
        assert!(early.early_only);
        assert_eq!(Replaces::parse("x;to-tag=b"), None, "no from-tag");
        assert_eq!(Replaces::parse(";to-tag=b;from-tag=a"), None, "no Call-ID");
        assert_eq!(Replaces::parse(""), None);
    }

    #[test]
    fn uac_dialog_from_invite_and_200_reverses_the_record_route() {
        let invite = request(INVITE);
        let d = Dialog::new_uac(&invite, &ok_with_record_route()).unwrap();
        assert_eq!(
            d.id(),
            &DialogId::new(
                "a84b4c76e66710@pc33.atlanta.example.com",
                "1928301774",
                "a6c85cf"
            )
        );
        assert_eq!(d.role(), Role::Uac);
        assert_eq!(d.state(), DialogState::Confirmed);
        assert_eq!(
            d.route_set().collect::<Vec<_>>(),
            ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
        );
        assert!(!d.uses_strict_routing());
        assert_eq!(d.remote_target().to_string(), "sip:bob@192.0.2.4");
        assert_eq!(d.local_cseq(), Some(314159));
        assert_eq!(d.local_invite_cseq(), Some(314159));
        assert_eq!(d.remote_cseq(), None);
        assert_eq!(
            d.local_uri(),
            "\"Alice A.\" <sip:alice@atlanta.example.com>;tag=1928301774"
        );
        assert_eq!(
            d.remote_uri(),
            "\"Bob\" <sip:bob@biloxi.example.com>;tag=a6c85cf"
        );
        assert_eq!(d.remote_address().unwrap().tag(), Some("a6c85cf"));
        assert_eq!(
            d.local_address().unwrap().display_name.as_deref(),
            Some("Alice A.")
        );
        assert_eq!(d.local_contact(), "<sip:alice@pc33.atlanta.example.com>");
        assert!(!d.is_secure());
    }

    #[test]
    fn uac_dialog_without_record_route_has_an_empty_route_set() {
        let ok = invite_response(
            200,
            "x1",
            "Contact: <sip:bob@192.0.2.4:5070;transport=tcp>\n",
        );
        let d = Dialog::new_uac(&request(INVITE), &ok).unwrap();
        assert_eq!(d.route_set().len(), 0);
        assert_eq!(
            d.remote_target().to_string(),
            "sip:bob@192.0.2.4:5070;transport=tcp"
        );
    }

    #[test]
    fn uas_dialog_keeps_the_record_route_in_order() {
        let invite = request(INVITE_AT_BOB);
        let ok = uas_response(&invite, 200, None, "b0b7a6", &bob_contact());
        let d = Dialog::new_uas(&invite, &ok).unwrap();
        assert_eq!(d.role(), Role::Uas);
        assert_eq!(d.state(), DialogState::Confirmed);
        assert_eq!(
            d.id(),
            &DialogId::new(
                "a84b4c76e66710@pc33.atlanta.example.com",
                "b0b7a6",
                "1928301774"
            )
        );
        assert_eq!(
            d.route_set().collect::<Vec<_>>(),
            ["<sip:p2.example.com;lr>", "<sip:p1.example.com;lr>"]
        );
        assert_eq!(
            d.remote_target().to_string(),
            "sip:alice@pc33.atlanta.example.com"
        );
        assert_eq!(d.remote_cseq(), Some(314159));
        assert_eq!(d.remote_invite_cseq(), Some(314159));
        assert_eq!(d.local_cseq(), None);
        assert_eq!(
            d.local_uri(),
            "\"Bob\" <sip:bob@biloxi.example.com>;tag=b0b7a6"
        );
        assert_eq!(
            d.remote_uri(),
            "\"Alice A.\" <sip:alice@atlanta.example.com>;tag=1928301774"
        );
        assert_eq!(d.local_contact(), "<sip:bob@192.0.2.4>");
    }

    #[test]
    fn uas_early_dialog_from_a_tagged_180() {
        let invite = request(INVITE_AT_BOB);
        let ringing = uas_response(&invite, 180, None, "b0b7a6", &bob_contact());
        let d = Dialog::new_uas(&invite, &ringing).unwrap();
        assert_eq!(d.state(), DialogState::Early);
        let trying = uas_response(&invite, 100, None, "b0b7a6", &bob_contact());
        assert_eq!(trying.headers.to_tag(), None);
        assert_eq!(
            Dialog::new_uas(&invite, &trying),
            Err(DialogError::NotDialogCreating(100))
        );
        let mut untagged = Response::from_request(&invite, 180, None);
        untagged.headers.push_contact(&bob_contact());
        assert_eq!(
            Dialog::new_uas(&invite, &untagged),
            Err(DialogError::MissingTag(HeaderName::To))
        );
    }

    #[test]
    fn an_rfc_2543_peer_without_from_tag_gets_an_empty_remote_tag() {
        let invite = request(&INVITE_AT_BOB.replace(";tag=1928301774", ""));
        let ok = uas_response(&invite, 200, None, "b0b7a6", &bob_contact());
        let d = Dialog::new_uas(&invite, &ok).unwrap();
        assert_eq!(d.remote_tag(), "");
        assert_eq!(
            d.remote_uri(),
            "\"Alice A.\" <sip:alice@atlanta.example.com>"
        );
    }

    #[test]
    fn creation_errors() {
        let invite = request(INVITE);
        let ok = ok_with_record_route();
        let untagged = edit_response(&ok, ";tag=a6c85cf", "");
        assert_eq!(
            Dialog::new_uac(&invite, &untagged),
            Err(DialogError::MissingTag(HeaderName::To))
        );
        assert_eq!(
            Dialog::new_uac(&invite, &invite_response(100, "x", "")),
            Err(DialogError::NotDialogCreating(100))
        );
        assert_eq!(
            Dialog::new_uac(&invite, &invite_response(486, "x", "")),
            Err(DialogError::NotDialogCreating(486))
        );
        let options = request(&INVITE.replace("INVITE", "OPTIONS"));
        assert_eq!(
            Dialog::new_uac(&options, &ok),
            Err(DialogError::NotInvite(Method::Options))
        );
        let other_call = request(&INVITE.replace("a84b4c76e66710", "zzz"));
        assert_eq!(
            Dialog::new_uac(&other_call, &ok),
            Err(DialogError::Mismatch(HeaderName::CallId))
        );
        let other_cseq = request(&INVITE.replace("314159", "314158"));
        assert_eq!(
            Dialog::new_uac(&other_cseq, &ok),
            Err(DialogError::Mismatch(HeaderName::CSeq))
        );
        let no_contact =
            request(&INVITE.replace("Contact: <sip:alice@pc33.atlanta.example.com>\n", ""));
        assert_eq!(
            Dialog::new_uac(&no_contact, &ok),
            Err(DialogError::MissingContact)
        );
        // A UAS cannot create a dialog for an INVITE without Contact, nor for a re-INVITE.
        let bob_invite = request(INVITE_AT_BOB);
        let no_contact =
            request(&INVITE_AT_BOB.replace("Contact: <sip:alice@pc33.atlanta.example.com>\n", ""));
        let ok = uas_response(&no_contact, 200, None, "b0b", &bob_contact());
        assert_eq!(
            Dialog::new_uas(&no_contact, &ok),
            Err(DialogError::MissingContact)
        );
        let reinvite = request(&INVITE_AT_BOB.replace(
            "Bob <sip:bob@biloxi.example.com>",
            "Bob <sip:bob@biloxi.example.com>;tag=b0b",
        ));
        let ok = uas_response(&reinvite, 200, None, "b0b", &bob_contact());
        assert_eq!(
            Dialog::new_uas(&reinvite, &ok),
            Err(DialogError::AlreadyInDialog)
        );
        let ok = uas_response(&bob_invite, 200, None, "b0b", &bob_contact());
        assert!(Dialog::new_uas(&bob_invite, &ok).is_ok());
    }

    #[test]
    fn a_route_set_longer_than_the_limit_is_refused() {
        let rr: String = (0..=MAX_ROUTE_SET_LEN)
            .map(|i| format!("Record-Route: <sip:p{i}.example.com;lr>\n"))
            .collect();
        let ok = invite_response(200, "t", &format!("{rr}Contact: <sip:bob@192.0.2.4>\n"));
        assert_eq!(
            Dialog::new_uac(&request(INVITE), &ok),
            Err(DialogError::RouteSetTooLong(MAX_ROUTE_SET_LEN + 1))
        );
        let fits: String = (0..MAX_ROUTE_SET_LEN)
            .map(|i| format!("Record-Route: <sip:p{i}.example.com;lr>\n"))
            .collect();
        let ok = invite_response(200, "t", &format!("{fits}Contact: <sip:bob@192.0.2.4>\n"));
        assert_eq!(
            Dialog::new_uac(&request(INVITE), &ok)
                .unwrap()
                .route_set()
                .len(),
            MAX_ROUTE_SET_LEN
        );
    }

    #[test]
    fn a_sips_request_uri_sets_the_secure_flag() {
        let invite = request(&INVITE.replace("INVITE sip:bob@", "INVITE sips:bob@"));
        let d = Dialog::new_uac(&invite, &ok_with_record_route()).unwrap();
        assert!(d.is_secure());
    }

    #[test]
    fn role_and_state_words() {
        for role in [Role::Uac, Role::Uas] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        for state in [
            DialogState::Early,
            DialogState::Confirmed,
            DialogState::Terminated,
        ] {
            assert_eq!(DialogState::parse(&state.to_string()), Some(state));
        }
        assert_eq!(Role::parse("UAC"), None);
        assert_eq!(DialogState::parse("gone"), None);
        assert_eq!(
            DialogId::new("c", "l", "r").to_string(),
            "c;local-tag=l;remote-tag=r"
        );
    }
}
