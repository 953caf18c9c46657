//! Procedures within a dialog: building requests (RFC 3261 section 12.2.1.1, with loose and
//! strict routing) and the ACK of a 2xx (section 13.2.2.4), handling the requests we receive
//! (section 12.2.2: remote CSeq, BYE), the responses we receive (section 12.2.1.2: confirmation,
//! target refresh, 481/408) and the responses we send (confirmation, target refresh, failure of an
//! early dialog), and building responses (section 12.1.1: To tag, Contact, Record-Route).
//!
//! Target refresh follows RFC 6141's atomic reading: the remote target changes when a re-INVITE,
//! UPDATE, SUBSCRIBE or NOTIFY succeeds (a 2xx sent or received), never when it fails.
//!
//! Nothing here adds a Via, resolves an address, retransmits a request or detects glare (491):
//! those belong to the transaction layer and the endpoint.

use rand::Rng;

use crate::message::{
    CSeq, HeaderError, HeaderName, HeaderValue, Headers, Method, NameAddr, Request, Response, Uri,
};

use super::error::{DialogError, RequestRejection};
use super::state::{
    first_contact, is_strict_router, route_set_from, text, Dialog, DialogState, Role,
};

/// Max-Forwards of the requests this module builds.
const MAX_FORWARDS: u32 = 70;

/// True for the methods that refresh the remote target (RFC 3261 section 12.2: re-INVITE;
/// RFC 3311: UPDATE; RFC 6665: SUBSCRIBE and NOTIFY). Their requests and 2xx carry a Contact.
pub fn is_target_refresh(method: &Method) -> bool {
    matches!(
        method,
        Method::Invite | Method::Update | Method::Subscribe | Method::Notify
    )
}

/// The URI the transport layer resolves to send `request` (RFC 3261 section 8.1.2): the first
/// Route when it is a loose router (`lr`), otherwise the Request-URI (no Route, or a strict
/// router already moved into the Request-URI).
pub fn next_hop(request: &Request) -> Result<Uri, HeaderError> {
    if request.headers.contains(&HeaderName::Route) {
        if let Some(first) = request.headers.route()?.into_iter().next() {
            if !is_strict_router(&first) {
                return Ok(first.uri);
            }
        }
    }
    Ok(request.uri.clone())
}

/// True when the INVITE requires a SIPS Contact in the response (RFC 3261 section 12.1.1): a
/// SIPS Request-URI, or a SIPS top Record-Route, or (without Record-Route) a SIPS Contact.
fn requires_sips_contact(invite: &Request) -> bool {
    let sips = |uri: &Uri| uri.as_sip().is_some_and(|u| u.secure);
    if sips(&invite.uri) {
        return true;
    }
    if invite.headers.contains(&HeaderName::RecordRoute) {
        return invite
            .headers
            .record_route()
            .ok()
            .and_then(|r| r.into_iter().next())
            .is_some_and(|top| sips(&top.uri));
    }
    first_contact(&invite.headers)
        .ok()
        .flatten()
        .is_some_and(|c| sips(&c.uri))
}

/// Copies every Record-Route value of `request` into `response`, in order.
fn copy_record_route(request: &Request, response: &mut Response) {
    for value in request.headers.get_all(&HeaderName::RecordRoute) {
        response
            .headers
            .push(HeaderName::RecordRoute, value.clone());
    }
}

/// The response of a UAS to an `invite` that creates (1xx other than 100, 2xx) or refuses a
/// dialog (RFC 3261 sections 8.2.6 and 12.1.1): Via, From, To, Call-ID and CSeq copied; the To
/// tag set to `local_tag` (unless the INVITE already has one); for 101 to 299, `local_contact`
/// as Contact (turned into a SIPS URI when the INVITE requires it) and every Record-Route value
/// copied in order. Pass the response to [`Dialog::new_uas`] to create the dialog.
pub fn uas_response(
    invite: &Request,
    status: u16,
    reason: Option<&str>,
    local_tag: &str,
    local_contact: &NameAddr,
) -> Response {
    let mut response = Response::from_request(invite, status, reason);
    if status > 100 {
        response.set_to_tag(local_tag);
    }
    if (101..300).contains(&status) {
        let mut contact = local_contact.clone();
        if requires_sips_contact(invite) {
            if let Some(sip) = contact.uri.as_sip_mut() {
                sip.secure = true;
            }
        }
        response.headers.push_contact(&contact);
        copy_record_route(invite, &mut response);
    }
    response
}

/// What an incoming in-dialog request is, once accepted by [`Dialog::receive_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InDialogRequest {
    /// An ACK (for a 2xx to an INVITE). Never answered.
    Ack,
    /// A BYE: the dialog is now terminated; answer 200 ([`Dialog::create_response`]).
    Bye,
    /// Any other request, in order (the remote CSeq was updated). A re-INVITE or UPDATE
    /// refreshes the remote target when its 2xx is reported with [`Dialog::response_sent`].
    Other,
}

/// What a response we received did to the dialog ([`Dialog::receive_response`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseOutcome {
    /// No dialog matches the response (from [`crate::dialog::Dialogs`] only).
    NoDialog,
    /// Nothing to do: 100 Trying, a 1xx without To tag, a response to an older INVITE, a
    /// malformed CSeq.
    Ignored,
    /// A provisional response; an early dialog was created, or its remote target refreshed when
    /// the response had a Contact.
    Provisional,
    /// The first 2xx to our latest INVITE: an early dialog is now confirmed (route set
    /// recomputed from this 2xx) or a re-INVITE succeeded (remote target refreshed). Send the
    /// ACK ([`Dialog::create_ack`]).
    InviteAccepted,
    /// A retransmission of a 2xx already acknowledged: re-send the ACK
    /// ([`Dialog::ack_to_resend`], or [`Dialog::create_ack`] when none was kept).
    InviteRetransmission,
    /// A 2xx to another request (the remote target refreshed for UPDATE, SUBSCRIBE, NOTIFY).
    Success,
    /// A failure response that leaves the dialog as it was (for example 491 to a re-INVITE).
    Rejected,
    /// The dialog is now terminated: failure of the INVITE of an early dialog, 481 or 408 to
    /// any request, or the final response to our BYE.
    Terminated,
}

impl Dialog {
    /// The next local CSeq number: the stored one plus one, or a random start below 2^30 for
    /// the first request of a UAS (RFC 3261 section 8.1.1.5 asks for less than 2^31).
    fn next_local_cseq(&mut self) -> Result<u32, DialogError> {
        let next = match self.local_cseq {
            Some(n) => n.checked_add(1).ok_or(DialogError::CSeqExhausted)?,
            None => rand::thread_rng().gen_range(1..(1u32 << 30)),
        };
        self.local_cseq = Some(next);
        Ok(next)
    }

    /// Builds the common part of a request: Request-URI and Route by the routing rules,
    /// Max-Forwards, From, To, Call-ID and CSeq.
    fn build_request(&self, method: Method, seq: u32) -> Result<Request, DialogError> {
        let strict_first = if self.strict_route {
            self.route_set.first()
        } else {
            None
        };
        let (uri, routes) = match strict_first {
            Some(first) => {
                // Strict routing: the first route becomes the Request-URI (without the
                // parameters a Request-URI may not carry) and the remote target the last Route.
                let mut uri = NameAddr::parse(text(first))?.uri;
                if let Some(sip) = uri.as_sip_mut() {
                    sip.headers.clear();
                    sip.params.remove("method");
                }
                (uri, self.route_set.get(1..).unwrap_or_default())
            }
            None => (self.remote_target.clone(), &*self.route_set),
        };
        let mut request = Request::new(method.clone(), uri);
        let headers = &mut request.headers;
        headers.set_max_forwards(MAX_FORWARDS);
        for route in routes {
            headers.push(HeaderName::Route, route.clone());
        }
        if strict_first.is_some() {
            headers.push_route(&NameAddr::new(self.remote_target.clone()));
        }
        headers.push(HeaderName::From, self.local_uri.clone());
        headers.push(HeaderName::To, self.remote_uri.clone());
        headers.push(
            HeaderName::CallId,
            HeaderValue::from(self.id.call_id.as_str()),
        );
        headers.set_cseq(&CSeq::new(seq, method));
        Ok(request)
    }

    /// A request within the dialog (RFC 3261 section 12.2.1.1): BYE, re-INVITE, UPDATE, INFO,
    /// MESSAGE, OPTIONS, PRACK, REFER, NOTIFY...
    ///
    /// The Request-URI is the remote target and the Route headers the route set, or, when the
    /// first route is a strict router, the Request-URI is that route and the remote target is
    /// appended as the last Route. From and To carry the tags, CSeq is the local CSeq plus one
    /// (stored), Max-Forwards is 70, and target refresh requests carry our Contact. The caller
    /// adds the Via (with a new branch), a body and any other header, then sends to
    /// [`Dialog::next_hop`].
    ///
    /// ACK is [`Dialog::create_ack`]. CANCEL takes the CSeq number of our latest INVITE and
    /// increments nothing; it must be sent with that INVITE's top Via, so
    /// [`Request::cancel`] of the INVITE is usually simpler.
    ///
    /// Building a BYE terminates the dialog. A terminated dialog builds only ACK and CANCEL; a
    /// UAS builds no BYE on an early dialog.
    pub fn create_request(&mut self, method: Method) -> Result<Request, DialogError> {
        match method {
            Method::Ack => return self.create_ack(),
            Method::Cancel => {
                let seq = self.local_invite_cseq.ok_or(DialogError::NoInvite)?;
                return self.build_request(Method::Cancel, seq);
            }
            _ => {}
        }
        if self.state == DialogState::Terminated {
            return Err(DialogError::Terminated);
        }
        if method == Method::Bye && self.role == Role::Uas && self.state == DialogState::Early {
            return Err(DialogError::ByeOnEarlyDialog);
        }
        let previous = self.local_cseq;
        let seq = self.next_local_cseq()?;
        let mut request = match self.build_request(method.clone(), seq) {
            Ok(r) => r,
            Err(e) => {
                self.local_cseq = previous;
                return Err(e);
            }
        };
        if is_target_refresh(&method) {
            request
                .headers
                .push(HeaderName::Contact, self.local_contact.clone());
        }
        match method {
            Method::Invite => {
                self.local_invite_cseq = Some(seq);
                self.invite_answered = false;
                self.sent_ack = None;
            }
            Method::Bye => self.state = DialogState::Terminated,
            _ => {}
        }
        Ok(request)
    }

    /// The ACK for a 2xx to our latest INVITE (RFC 3261 section 13.2.2.4): the CSeq number of
    /// that INVITE with method ACK, the same routing, From, To and Call-ID as any request of the
    /// dialog, no Contact. The caller adds a Via with a new branch (and the body when the 2xx
    /// carried an offer), sends it outside any transaction, and may keep it with
    /// [`Dialog::remember_ack`] to re-send it for retransmissions of the 2xx.
    pub fn create_ack(&self) -> Result<Request, DialogError> {
        let seq = self.local_invite_cseq.ok_or(DialogError::NoInvite)?;
        self.build_request(Method::Ack, seq)
    }

    /// Keeps the ACK as sent (with its Via) so that [`Dialog::ack_to_resend`] returns it for a
    /// retransmitted 2xx. The ACK is not exported; drop it with [`Dialog::forget_ack`] once the
    /// INVITE client transaction has ended (64*T1 after the 2xx).
    pub fn remember_ack(&mut self, ack: Request) {
        self.sent_ack = Some(Box::new(ack));
    }

    /// The kept ACK when it acknowledges our latest INVITE (see [`Dialog::remember_ack`]).
    pub fn ack_to_resend(&self) -> Option<&Request> {
        let ack = self.sent_ack.as_deref()?;
        let seq = ack.headers.cseq().ok()?.seq;
        (Some(seq) == self.local_invite_cseq).then_some(ack)
    }

    /// Drops the kept ACK.
    pub fn forget_ack(&mut self) {
        self.sent_ack = None;
    }

    /// The URI to resolve to send the dialog's requests (RFC 3261 sections 8.1.2 and 12.2.1.1):
    /// the first route when there is a route set (loose or strict), the remote target otherwise.
    pub fn next_hop(&self) -> Result<Uri, DialogError> {
        match self.route_set.first() {
            Some(first) => Ok(NameAddr::parse(text(first))?.uri),
            None => Ok(self.remote_target.clone()),
        }
    }

    /// True when the request carries this dialog's Call-ID and tags (To tag = local tag, From
    /// tag = remote tag).
    pub fn matches_request(&self, request: &Request) -> bool {
        request.headers.call_id().ok() == Some(self.id.call_id.as_str())
            && request.headers.to_tag() == Some(self.id.local_tag.as_str())
            && request.headers.from_tag().unwrap_or_default() == self.id.remote_tag
    }

    /// True when the response carries this dialog's Call-ID and tags (From tag = local tag, To
    /// tag = remote tag).
    pub fn matches_response(&self, response: &Response) -> bool {
        response.headers.call_id().ok() == Some(self.id.call_id.as_str())
            && response.headers.from_tag() == Some(self.id.local_tag.as_str())
            && response.headers.to_tag().unwrap_or_default() == self.id.remote_tag
    }

    /// Handles a request received within the dialog (RFC 3261 section 12.2.2) once the
    /// transaction layer has filtered retransmissions.
    ///
    /// ACK and CANCEL are accepted without CSeq check. On a terminated dialog only BYE (a BYE
    /// crossing ours) is accepted; anything else is 481. A CSeq number lower than the remote
    /// CSeq is rejected with 500; otherwise the remote CSeq becomes the request's. A BYE
    /// terminates the dialog. A re-INVITE's CSeq is kept to match its ACK.
    pub fn receive_request(
        &mut self,
        request: &Request,
    ) -> Result<InDialogRequest, RequestRejection> {
        let cseq = request.headers.cseq()?;
        if !self.matches_request(request) {
            return Err(RequestRejection::NoDialog);
        }
        match request.method {
            Method::Ack => return Ok(InDialogRequest::Ack),
            Method::Cancel => return Ok(InDialogRequest::Other),
            _ => {}
        }
        if self.state == DialogState::Terminated {
            return if request.method == Method::Bye {
                Ok(InDialogRequest::Bye)
            } else {
                Err(RequestRejection::Terminated)
            };
        }
        if let Some(remote_cseq) = self.remote_cseq {
            if cseq.seq < remote_cseq {
                return Err(RequestRejection::OutOfOrder {
                    cseq: cseq.seq,
                    remote_cseq,
                });
            }
        }
        self.remote_cseq = Some(cseq.seq);
        match request.method {
            Method::Bye => {
                self.state = DialogState::Terminated;
                Ok(InDialogRequest::Bye)
            }
            Method::Invite => {
                self.remote_invite_cseq = Some(cseq.seq);
                Ok(InDialogRequest::Other)
            }
            _ => Ok(InDialogRequest::Other),
        }
    }

    /// Replaces the remote target with the first Contact address of `headers`, if any (a
    /// malformed Contact leaves it unchanged).
    fn refresh_target(&mut self, headers: &Headers) {
        if let Ok(Some(contact)) = first_contact(headers) {
            self.remote_target = contact.uri;
        }
    }

    /// Handles a response we received to a request of this dialog (RFC 3261 sections 12.1.2,
    /// 12.2.1.2, 13.2.2.4 and 15): see [`ResponseOutcome`] for what each case does.
    pub fn receive_response(&mut self, response: &Response) -> ResponseOutcome {
        let Ok(cseq) = response.headers.cseq() else {
            return ResponseOutcome::Ignored;
        };
        let status = response.status;
        let is_latest_invite =
            cseq.method == Method::Invite && Some(cseq.seq) == self.local_invite_cseq;
        if status < 200 {
            if status > 100 && is_latest_invite && self.state == DialogState::Early {
                self.refresh_target(&response.headers);
            }
            return ResponseOutcome::Provisional;
        }
        if cseq.method == Method::Invite {
            if !is_latest_invite {
                return ResponseOutcome::Ignored;
            }
            if status < 300 {
                if self.invite_answered {
                    return ResponseOutcome::InviteRetransmission;
                }
                self.invite_answered = true;
                if self.state == DialogState::Early {
                    // RFC 3261 section 13.2.2.4: the 2xx recomputes the route set.
                    if let Ok((routes, strict)) = route_set_from(&response.headers, Role::Uac) {
                        self.route_set = routes;
                        self.strict_route = strict;
                    }
                    self.state = DialogState::Confirmed;
                }
                self.refresh_target(&response.headers);
                return ResponseOutcome::InviteAccepted;
            }
            self.invite_answered = true;
            if self.state == DialogState::Early {
                self.state = DialogState::Terminated;
                return ResponseOutcome::Terminated;
            }
        }
        if status == 481 || status == 408 || cseq.method == Method::Bye {
            self.state = DialogState::Terminated;
            return ResponseOutcome::Terminated;
        }
        if status < 300 {
            if is_target_refresh(&cseq.method) {
                self.refresh_target(&response.headers);
            }
            return ResponseOutcome::Success;
        }
        ResponseOutcome::Rejected
    }

    /// Records that we sent `response` to `request` within this dialog (UAS side): a 2xx to the
    /// INVITE confirms an early dialog, a failure to it terminates an early dialog, and a 2xx to
    /// a target refresh request (re-INVITE, UPDATE...) replaces the remote target with the
    /// request's Contact. Returns the dialog state afterwards.
    pub fn response_sent(&mut self, request: &Request, response: &Response) -> DialogState {
        let status = response.status;
        if status < 200 {
            return self.state;
        }
        let is_peer_invite = request.method == Method::Invite
            && request.headers.cseq().ok().map(|c| c.seq) == self.remote_invite_cseq;
        if status >= 300 {
            if is_peer_invite && self.state == DialogState::Early {
                self.state = DialogState::Terminated;
            }
            return self.state;
        }
        if is_peer_invite && self.state == DialogState::Early {
            self.state = DialogState::Confirmed;
        }
        if is_target_refresh(&request.method) {
            self.refresh_target(&request.headers);
        }
        if request.method == Method::Bye {
            self.state = DialogState::Terminated;
        }
        self.state
    }

    /// A response to a request received within this dialog: Via, From, To, Call-ID and CSeq
    /// copied; the To tag added when the request has none (the dialog-creating INVITE); for 101
    /// to 299, our Contact when the method is a target refresh, and the Record-Route copied for
    /// the dialog-creating INVITE. Report it with [`Dialog::response_sent`] once sent.
    pub fn create_response(
        &self,
        request: &Request,
        status: u16,
        reason: Option<&str>,
    ) -> Response {
        let mut response = Response::from_request(request, status, reason);
        let creating = request.headers.to_tag().is_none();
        if creating && status > 100 {
            response.set_to_tag(&self.id.local_tag);
        }
        if (101..300).contains(&status) {
            if is_target_refresh(&request.method) {
                response
                    .headers
                    .push(HeaderName::Contact, self.local_contact.clone());
            }
            if creating {
                copy_record_route(request, &mut response);
            }
        }
        response
    }
}
