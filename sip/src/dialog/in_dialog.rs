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
use super::state::{first_contact, route_set_from, text, Dialog, DialogState, Role};

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
/// Route value when there is one, otherwise the Request-URI.
///
/// A request built by a dialog whose route set starts with a strict router must go to its
/// Request-URI instead (the strict router); use [`Dialog::next_hop`] for dialog requests, which
/// knows the routing mode.
pub fn next_hop(request: &Request) -> Result<Uri, HeaderError> {
    if request.headers.contains(&HeaderName::Route) {
        if let Some(first) = request.headers.route()?.into_iter().next() {
            return Ok(first.uri);
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

/// The URI of a route entry as a Request-URI: URI headers and the `method` parameter, which a
/// Request-URI may not carry (RFC 3261 section 19.1.1), removed.
fn request_uri_of_route(route: &str) -> Result<Uri, DialogError> {
    let mut uri = NameAddr::parse(route)?.uri;
    if let Some(sip) = uri.as_sip_mut() {
        sip.headers.clear();
        sip.params.remove("method");
    }
    Ok(uri)
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
            None => crate::rng::with(|rng| rng.gen_range(1..(1u32 << 30))),
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
                let uri = request_uri_of_route(text(first))?;
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
    /// the first route when there is a route set (a loose router, or a strict router which is
    /// then also the Request-URI, without the parameters a Request-URI may not carry), the
    /// remote target otherwise.
    pub fn next_hop(&self) -> Result<Uri, DialogError> {
        match self.route_set.first() {
            Some(first) if self.strict_route => Ok(request_uri_of_route(text(first))?),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialog::test_support::*;
    use crate::dialog::RequestRejection;
    use crate::message::{validate_request, Transport, Via};

    fn uac() -> Dialog {
        Dialog::new_uac(&request(INVITE), &ok_with_record_route()).unwrap()
    }

    fn uas() -> (Request, Dialog) {
        let invite = request(INVITE_AT_BOB);
        let ok = uas_response(&invite, 200, None, "b0b7a6", &bob_contact());
        let d = Dialog::new_uas(&invite, &ok).unwrap();
        (invite, d)
    }

    fn routes(r: &Request) -> Vec<String> {
        r.headers
            .route()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn with_via(mut r: Request) -> Request {
        let via = Via::new(
            Transport::Udp,
            "pc33.atlanta.example.com".parse().unwrap(),
            None,
        )
        .with_branch(&crate::message::generate_branch());
        r.headers.prepend_via(&via);
        r
    }

    #[test]
    fn bye_with_loose_routing() {
        let mut d = uac();
        let bye = d.create_request(Method::Bye).unwrap();
        assert_eq!(bye.method, Method::Bye);
        assert_eq!(bye.uri.to_string(), "sip:bob@192.0.2.4");
        assert_eq!(
            routes(&bye),
            ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
        );
        assert_eq!(bye.headers.from_tag(), Some("1928301774"));
        assert_eq!(bye.headers.to_tag(), Some("a6c85cf"));
        assert_eq!(
            bye.headers.call_id().unwrap(),
            "a84b4c76e66710@pc33.atlanta.example.com"
        );
        assert_eq!(bye.headers.cseq().unwrap(), CSeq::new(314160, Method::Bye));
        assert_eq!(bye.headers.max_forwards().unwrap(), Some(70));
        assert!(!bye.headers.contains(&HeaderName::Contact));
        assert_eq!(validate_request(&with_via(bye.clone())), Ok(()));
        assert_eq!(next_hop(&bye).unwrap().to_string(), "sip:p1.example.com;lr");
        assert_eq!(d.next_hop().unwrap().to_string(), "sip:p1.example.com;lr");
        assert_eq!(d.state(), DialogState::Terminated);
        assert_eq!(d.create_request(Method::Info), Err(DialogError::Terminated));
        // The ACK of a retransmitted 2xx can still be built.
        assert!(d.create_ack().is_ok());
    }

    #[test]
    fn cseq_increments_and_target_refresh_requests_carry_contact() {
        let mut d = uac();
        let info = d.create_request(Method::Info).unwrap();
        let update = d.create_request(Method::Update).unwrap();
        let message = d.create_request(Method::Message).unwrap();
        let options = d.create_request(Method::Options).unwrap();
        let reinvite = d.create_request(Method::Invite).unwrap();
        let seqs: Vec<u32> = [&info, &update, &message, &options, &reinvite]
            .iter()
            .map(|r| r.headers.cseq().unwrap().seq)
            .collect();
        assert_eq!(seqs, [314160, 314161, 314162, 314163, 314164]);
        assert_eq!(d.local_cseq(), Some(314164));
        assert_eq!(d.local_invite_cseq(), Some(314164));
        for r in [&update, &reinvite] {
            assert_eq!(
                r.headers
                    .get(&HeaderName::Contact)
                    .unwrap()
                    .to_str()
                    .unwrap(),
                "<sip:alice@pc33.atlanta.example.com>"
            );
        }
        for r in [&info, &message, &options] {
            assert!(!r.headers.contains(&HeaderName::Contact));
        }
        // The ACK of the re-INVITE takes its number; CANCEL too, and neither increments.
        let ack = d.create_request(Method::Ack).unwrap();
        assert_eq!(ack.headers.cseq().unwrap(), CSeq::new(314164, Method::Ack));
        let cancel = d.create_request(Method::Cancel).unwrap();
        assert_eq!(
            cancel.headers.cseq().unwrap(),
            CSeq::new(314164, Method::Cancel)
        );
        assert_eq!(d.local_cseq(), Some(314164));
    }

    #[test]
    fn strict_routing_puts_the_first_route_in_the_request_uri() {
        let ok = invite_response(
            200,
            "a6c85cf",
            "Record-Route: <sip:p2.example.com;lr>\nRecord-Route: <sip:p1.example.com;method=INVITE?X=1>\nContact: <sip:bob@192.0.2.4>\n",
        );
        let mut d = Dialog::new_uac(&request(INVITE), &ok).unwrap();
        assert!(d.uses_strict_routing());
        let bye = d.create_request(Method::Bye).unwrap();
        assert_eq!(bye.uri.to_string(), "sip:p1.example.com");
        assert_eq!(
            routes(&bye),
            ["<sip:p2.example.com;lr>", "<sip:bob@192.0.2.4>"]
        );
        // The request goes to the strict router in the Request-URI.
        assert_eq!(d.next_hop().unwrap(), bye.uri);
        assert_eq!(validate_request(&with_via(bye)), Ok(()));
    }

    #[test]
    fn without_route_set_the_request_goes_to_the_remote_target() {
        let ok = invite_response(200, "x", "Contact: <sip:bob@192.0.2.4:5070>\n");
        let mut d = Dialog::new_uac(&request(INVITE), &ok).unwrap();
        let bye = d.create_request(Method::Bye).unwrap();
        assert!(!bye.headers.contains(&HeaderName::Route));
        assert_eq!(
            next_hop(&bye).unwrap().to_string(),
            "sip:bob@192.0.2.4:5070"
        );
        assert_eq!(d.next_hop().unwrap(), bye.uri);
    }

    #[test]
    fn ack_for_the_2xx_and_its_resending() {
        let mut d = uac();
        let ack = d.create_ack().unwrap();
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.headers.cseq().unwrap(), CSeq::new(314159, Method::Ack));
        assert_eq!(ack.uri.to_string(), "sip:bob@192.0.2.4");
        assert_eq!(routes(&ack).len(), 2);
        assert_eq!(ack.headers.to_tag(), Some("a6c85cf"));
        assert!(!ack.headers.contains(&HeaderName::Contact));
        assert_eq!(
            d.local_cseq(),
            Some(314159),
            "the ACK does not use a new CSeq"
        );
        let sent = with_via(ack);
        assert_eq!(validate_request(&sent), Ok(()));
        assert_eq!(d.ack_to_resend(), None);
        d.remember_ack(sent.clone());
        // The 2xx is retransmitted: the same ACK (same branch) goes again.
        assert_eq!(
            d.receive_response(&ok_with_record_route()),
            ResponseOutcome::InviteRetransmission
        );
        assert_eq!(d.ack_to_resend(), Some(&sent));
        // A re-INVITE makes the kept ACK stale.
        d.create_request(Method::Invite).unwrap();
        assert_eq!(d.ack_to_resend(), None);
        d.forget_ack();
        let (_, uas) = uas();
        assert_eq!(uas.create_ack(), Err(DialogError::NoInvite));
    }

    #[test]
    fn remote_cseq_is_checked() {
        let mut d = uac();
        assert_eq!(d.remote_cseq(), None);
        let info = from_bob("INFO", 7, "");
        assert_eq!(d.receive_request(&info), Ok(InDialogRequest::Other));
        assert_eq!(d.remote_cseq(), Some(7));
        let older = from_bob("INFO", 6, "");
        let rejection = d.receive_request(&older).unwrap_err();
        assert_eq!(
            rejection,
            RequestRejection::OutOfOrder {
                cseq: 6,
                remote_cseq: 7
            }
        );
        assert_eq!(rejection.status(), 500);
        assert_eq!(d.remote_cseq(), Some(7));
        assert_eq!(
            d.receive_request(&from_bob("OPTIONS", 7, "")),
            Ok(InDialogRequest::Other)
        );
        assert_eq!(
            d.receive_request(&from_bob("MESSAGE", 9, "")),
            Ok(InDialogRequest::Other)
        );
        assert_eq!(d.remote_cseq(), Some(9));
        // ACK and CANCEL are not CSeq-checked.
        assert_eq!(
            d.receive_request(&from_bob("ACK", 1, "")),
            Ok(InDialogRequest::Ack)
        );
        // A request of another dialog is refused.
        let other = edit_request(&from_bob("INFO", 10, ""), "tag=a6c85cf", "tag=zzz");
        assert_eq!(d.receive_request(&other), Err(RequestRejection::NoDialog));
    }

    #[test]
    fn uas_checks_against_the_invite_cseq() {
        let (_, mut d) = uas();
        let old = from_alice("INFO", 314158, "b0b7a6", "");
        assert_eq!(d.receive_request(&old).unwrap_err().status(), 500);
        let ack = from_alice("ACK", 314159, "b0b7a6", "");
        assert_eq!(d.receive_request(&ack), Ok(InDialogRequest::Ack));
        let info = from_alice("INFO", 314160, "b0b7a6", "");
        assert_eq!(d.receive_request(&info), Ok(InDialogRequest::Other));
    }

    #[test]
    fn bye_received_terminates() {
        let (_, mut d) = uas();
        let bye = from_alice("BYE", 314160, "b0b7a6", "");
        assert_eq!(d.receive_request(&bye), Ok(InDialogRequest::Bye));
        assert_eq!(d.state(), DialogState::Terminated);
        let ok = d.create_response(&bye, 200, None);
        assert_eq!(ok.headers.to_tag(), Some("b0b7a6"));
        assert_eq!(ok.headers.from_tag(), Some("1928301774"));
        assert_eq!(ok.headers.cseq().unwrap(), CSeq::new(314160, Method::Bye));
        assert!(!ok.headers.contains(&HeaderName::Contact));
        assert_eq!(ok.headers.count(&HeaderName::Via), 2);
        // A later request gets 481; a BYE retransmitted past the transaction layer gets 200.
        let info = from_alice("INFO", 314161, "b0b7a6", "");
        assert_eq!(d.receive_request(&info).unwrap_err().status(), 481);
        assert_eq!(d.receive_request(&bye), Ok(InDialogRequest::Bye));
        assert_eq!(d.create_request(Method::Bye), Err(DialogError::Terminated));
    }

    #[test]
    fn uas_requests_start_from_a_random_cseq_and_increment() {
        let (_, mut d) = uas();
        let bye_first = d.clone().create_request(Method::Info).unwrap();
        let first = bye_first.headers.cseq().unwrap().seq;
        assert!((1..(1 << 30)).contains(&first));
        let info = d.create_request(Method::Info).unwrap();
        let n = info.headers.cseq().unwrap().seq;
        let options = d.create_request(Method::Options).unwrap();
        assert_eq!(options.headers.cseq().unwrap().seq, n + 1);
        assert_eq!(d.local_cseq(), Some(n + 1));
        // Bob's request goes to Alice's Contact through p2 then p1, From Bob To Alice.
        assert_eq!(info.uri.to_string(), "sip:alice@pc33.atlanta.example.com");
        assert_eq!(
            routes(&info),
            ["<sip:p2.example.com;lr>", "<sip:p1.example.com;lr>"]
        );
        assert_eq!(info.headers.from_tag(), Some("b0b7a6"));
        assert_eq!(info.headers.to_tag(), Some("1928301774"));
    }

    #[test]
    fn local_cseq_exhaustion_is_an_error() {
        let mut d = uac();
        d.local_cseq = Some(u32::MAX);
        assert_eq!(
            d.create_request(Method::Info),
            Err(DialogError::CSeqExhausted)
        );
        assert_eq!(d.local_cseq(), Some(u32::MAX));
    }

    #[test]
    fn uas_cannot_bye_an_early_dialog() {
        let invite = request(INVITE_AT_BOB);
        let ringing = uas_response(&invite, 180, None, "b0b7a6", &bob_contact());
        let mut d = Dialog::new_uas(&invite, &ringing).unwrap();
        assert_eq!(
            d.create_request(Method::Bye),
            Err(DialogError::ByeOnEarlyDialog)
        );
        // UPDATE is fine on an early dialog.
        assert!(d.create_request(Method::Update).is_ok());
    }

    #[test]
    fn early_dialog_confirmed_by_200_recomputes_the_route_set() {
        let ringing = invite_response(
            180,
            "a6c85cf",
            "Record-Route: <sip:p1.example.com;lr>\nContact: <sip:bob@192.0.2.99>\n",
        );
        let mut d = Dialog::new_uac(&request(INVITE), &ringing).unwrap();
        assert_eq!(d.state(), DialogState::Early);
        assert_eq!(
            d.route_set().collect::<Vec<_>>(),
            ["<sip:p1.example.com;lr>"]
        );
        assert_eq!(d.remote_target().to_string(), "sip:bob@192.0.2.99");
        // A second 180 with a new Contact refreshes the early target.
        let ringing2 = invite_response(180, "a6c85cf", "Contact: <sip:bob@192.0.2.98>\n");
        assert_eq!(d.receive_response(&ringing2), ResponseOutcome::Provisional);
        assert_eq!(d.remote_target().to_string(), "sip:bob@192.0.2.98");
        assert_eq!(
            d.receive_response(&ok_with_record_route()),
            ResponseOutcome::InviteAccepted
        );
        assert_eq!(d.state(), DialogState::Confirmed);
        assert_eq!(
            d.route_set().collect::<Vec<_>>(),
            ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
        );
        assert_eq!(d.remote_target().to_string(), "sip:bob@192.0.2.4");
        assert_eq!(
            d.receive_response(&ok_with_record_route()),
            ResponseOutcome::InviteRetransmission
        );
    }

    #[test]
    fn early_dialog_without_contact_targets_the_request_uri() {
        let ringing = invite_response(180, "a6c85cf", "");
        let d = Dialog::new_uac(&request(INVITE), &ringing).unwrap();
        assert_eq!(d.remote_target().to_string(), "sip:bob@biloxi.example.com");
    }

    #[test]
    fn early_dialog_failure_terminates() {
        let ringing = invite_response(180, "a6c85cf", "Contact: <sip:bob@192.0.2.4>\n");
        let mut d = Dialog::new_uac(&request(INVITE), &ringing).unwrap();
        assert_eq!(
            d.receive_response(&invite_response(486, "a6c85cf", "")),
            ResponseOutcome::Terminated
        );
        assert_eq!(d.state(), DialogState::Terminated);
    }

    fn response_to(req: &Request, status: u16, extra_contact: Option<&str>) -> Response {
        let mut r = Response::from_request(req, status, None);
        if let Some(c) = extra_contact {
            r.headers.push(HeaderName::Contact, c);
        }
        r
    }

    #[test]
    fn uac_target_refresh_on_reinvite_and_update_2xx() {
        let mut d = uac();
        let reinvite = d.create_request(Method::Invite).unwrap();
        assert_eq!(
            d.receive_response(&response_to(&reinvite, 100, None)),
            ResponseOutcome::Provisional
        );
        let ok = response_to(&reinvite, 200, Some("<sip:bob@198.51.100.7:5062>"));
        assert_eq!(d.receive_response(&ok), ResponseOutcome::InviteAccepted);
        assert_eq!(d.remote_target().to_string(), "sip:bob@198.51.100.7:5062");
        assert_eq!(
            d.receive_response(&ok),
            ResponseOutcome::InviteRetransmission
        );
        let ack = d.create_ack().unwrap();
        assert_eq!(ack.uri.to_string(), "sip:bob@198.51.100.7:5062");
        assert_eq!(ack.headers.cseq().unwrap().seq, 314160);
        // The route set does not change on a target refresh.
        assert_eq!(d.route_set().len(), 2);

        let update = d.create_request(Method::Update).unwrap();
        let ok = response_to(&update, 200, Some("<sip:bob@198.51.100.8>"));
        assert_eq!(d.receive_response(&ok), ResponseOutcome::Success);
        assert_eq!(d.remote_target().to_string(), "sip:bob@198.51.100.8");

        // A failed refresh changes nothing.
        let reinvite = d.create_request(Method::Invite).unwrap();
        let pending = response_to(&reinvite, 491, Some("<sip:bob@203.0.113.1>"));
        assert_eq!(d.receive_response(&pending), ResponseOutcome::Rejected);
        assert_eq!(d.remote_target().to_string(), "sip:bob@198.51.100.8");
        assert_eq!(d.state(), DialogState::Confirmed);

        // INFO's 2xx is not a refresh even with a Contact.
        let info = d.create_request(Method::Info).unwrap();
        let ok = response_to(&info, 200, Some("<sip:bob@203.0.113.2>"));
        assert_eq!(d.receive_response(&ok), ResponseOutcome::Success);
        assert_eq!(d.remote_target().to_string(), "sip:bob@198.51.100.8");
    }

    #[test]
    fn a_481_or_408_terminates() {
        for status in [481, 408] {
            let mut d = uac();
            let info = d.create_request(Method::Info).unwrap();
            assert_eq!(
                d.receive_response(&response_to(&info, status, None)),
                ResponseOutcome::Terminated
            );
            assert_eq!(d.state(), DialogState::Terminated);
        }
        let mut d = uac();
        let info = d.create_request(Method::Info).unwrap();
        assert_eq!(
            d.receive_response(&response_to(&info, 404, None)),
            ResponseOutcome::Rejected
        );
        let bye = d.create_request(Method::Bye).unwrap();
        assert_eq!(
            d.receive_response(&response_to(&bye, 200, None)),
            ResponseOutcome::Terminated
        );
        let mut garbled = response_to(&bye, 200, None);
        garbled.headers.remove(&HeaderName::CSeq);
        assert_eq!(d.receive_response(&garbled), ResponseOutcome::Ignored);
    }

    #[test]
    fn uas_target_refresh_when_the_2xx_is_sent() {
        let (invite, mut d) = uas();
        assert_eq!(
            d.response_sent(&invite, &d.create_response(&invite, 200, None)),
            DialogState::Confirmed
        );
        let reinvite = from_alice(
            "INVITE",
            314160,
            "b0b7a6",
            "Contact: <sip:alice@198.51.100.20>\n",
        );
        assert_eq!(d.receive_request(&reinvite), Ok(InDialogRequest::Other));
        assert_eq!(d.remote_invite_cseq(), Some(314160));
        assert_eq!(
            d.remote_target().to_string(),
            "sip:alice@pc33.atlanta.example.com",
            "not before the 2xx"
        );
        let ok = d.create_response(&reinvite, 200, None);
        assert_eq!(
            ok.headers
                .get(&HeaderName::Contact)
                .unwrap()
                .to_str()
                .unwrap(),
            "<sip:bob@192.0.2.4>"
        );
        assert_eq!(ok.headers.to_tag(), Some("b0b7a6"));
        assert!(!ok.headers.contains(&HeaderName::RecordRoute));
        d.response_sent(&reinvite, &ok);
        assert_eq!(d.remote_target().to_string(), "sip:alice@198.51.100.20");

        let update = from_alice(
            "UPDATE",
            314161,
            "b0b7a6",
            "Contact: <sip:alice@198.51.100.21>\n",
        );
        assert_eq!(d.receive_request(&update), Ok(InDialogRequest::Other));
        let refused = d.create_response(&update, 488, None);
        assert!(!refused.headers.contains(&HeaderName::Contact));
        d.response_sent(&update, &refused);
        assert_eq!(d.remote_target().to_string(), "sip:alice@198.51.100.20");
        let update = from_alice(
            "UPDATE",
            314162,
            "b0b7a6",
            "Contact: <sip:alice@198.51.100.22>\n",
        );
        d.receive_request(&update).unwrap();
        d.response_sent(&update, &d.create_response(&update, 200, None));
        assert_eq!(d.remote_target().to_string(), "sip:alice@198.51.100.22");
    }

    #[test]
    fn uas_early_dialog_confirmed_or_failed_by_the_final_response() {
        let invite = request(INVITE_AT_BOB);
        let ringing = uas_response(&invite, 180, None, "b0b7a6", &bob_contact());
        let early = Dialog::new_uas(&invite, &ringing).unwrap();
        let mut d = early.clone();
        let ok = d.create_response(&invite, 200, None);
        assert_eq!(ok.headers.to_tag(), Some("b0b7a6"));
        assert_eq!(ok.headers.count(&HeaderName::RecordRoute), 2);
        assert_eq!(d.response_sent(&invite, &ok), DialogState::Confirmed);
        let mut d = early;
        let busy = d.create_response(&invite, 486, None);
        assert!(!busy.headers.contains(&HeaderName::Contact));
        assert_eq!(d.response_sent(&invite, &busy), DialogState::Terminated);
    }

    #[test]
    fn uas_response_copies_record_route_and_sets_tag_and_contact() {
        let invite = request(INVITE_AT_BOB);
        let ok = uas_response(&invite, 200, Some("OK"), "b0b7a6", &bob_contact());
        assert_eq!(ok.status, 200);
        assert_eq!(ok.headers.to_tag(), Some("b0b7a6"));
        assert_eq!(
            ok.headers
                .record_route()
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["<sip:p2.example.com;lr>", "<sip:p1.example.com;lr>"]
        );
        assert_eq!(
            ok.headers
                .get(&HeaderName::Contact)
                .unwrap()
                .to_str()
                .unwrap(),
            "<sip:bob@192.0.2.4>"
        );
        assert_eq!(ok.headers.count(&HeaderName::Via), 3);
        let busy = uas_response(&invite, 486, None, "b0b7a6", &bob_contact());
        assert_eq!(busy.headers.to_tag(), Some("b0b7a6"));
        assert!(!busy.headers.contains(&HeaderName::Contact));
        assert!(!busy.headers.contains(&HeaderName::RecordRoute));
    }

    #[test]
    fn uas_response_uses_sips_contact_when_the_invite_requires_it() {
        let by_ruri = request(&INVITE_AT_BOB.replace("INVITE sip:bob@", "INVITE sips:bob@"));
        let by_rr = request(&INVITE_AT_BOB.replace(
            "Record-Route: <sip:p2.example.com;lr>",
            "Record-Route: <sips:p2.example.com;lr>",
        ));
        let by_contact = request(
            &INVITE_AT_BOB
                .replace("Record-Route: <sip:p2.example.com;lr>\n", "")
                .replace("Record-Route: <sip:p1.example.com;lr>\n", "")
                .replace("Contact: <sip:alice", "Contact: <sips:alice"),
        );
        for invite in [by_ruri, by_rr, by_contact] {
            let ok = uas_response(&invite, 200, None, "t", &bob_contact());
            assert_eq!(
                ok.headers
                    .get(&HeaderName::Contact)
                    .unwrap()
                    .to_str()
                    .unwrap(),
                "<sips:bob@192.0.2.4>"
            );
        }
        let plain = uas_response(&request(INVITE_AT_BOB), 200, None, "t", &bob_contact());
        assert_eq!(
            plain
                .headers
                .get(&HeaderName::Contact)
                .unwrap()
                .to_str()
                .unwrap(),
            "<sip:bob@192.0.2.4>"
        );
    }

    #[test]
    fn next_hop_of_requests() {
        let plain = request(INVITE);
        assert_eq!(next_hop(&plain).unwrap(), plain.uri);
        let routed = request(&INVITE.replace(
            "Max-Forwards: 70\n",
            "Max-Forwards: 70\nRoute: <sip:edge.example.com;lr;transport=tcp>, <sip:core.example.com;lr>\n",
        ));
        assert_eq!(
            next_hop(&routed).unwrap().to_string(),
            "sip:edge.example.com;lr;transport=tcp"
        );
        let broken = request(&INVITE.replace("Max-Forwards: 70\n", "Route: <bad\n"));
        assert!(next_hop(&broken).is_err());
        assert!(is_target_refresh(&Method::Update));
        assert!(!is_target_refresh(&Method::Bye));
    }
}
