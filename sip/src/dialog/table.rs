//! [`Dialogs`]: the bounded table of a user agent's dialogs, keyed by (Call-ID, local tag,
//! remote tag), and the entry points an endpoint calls for each message of a dialog:
//!
//! * [`Dialogs::receive_invite_response`]: a response to an INVITE we sent outside a dialog
//!   creates early dialogs (one per remote tag when the INVITE forks), confirms them, and removes
//!   them all when the INVITE fails.
//! * [`Dialogs::response_sent`]: a response we send to an INVITE creates, confirms or removes the
//!   UAS dialog and starts the 2xx retransmission ([`Pending2xx`]).
//! * [`Dialogs::receive_request`]: an incoming request with a To tag is matched (To tag = local
//!   tag, From tag = remote tag) and checked; an ACK stops the 2xx retransmission.
//! * [`Dialogs::receive_response`]: a response to a request sent within a dialog (matched by From
//!   tag = local tag, To tag = remote tag).
//! * [`Dialogs::poll_timeout`] / [`Dialogs::handle_timeout`]: the 2xx retransmission timers.
//! * [`Dialogs::import`]: a dialog continued from another node's record.
//!
//! Lookups do not allocate: dialogs are grouped by a hash of their Call-ID, and the few dialogs
//! of one Call-ID (forks) are compared by tags. Early dialogs that fail are removed by the table;
//! a dialog that was confirmed stays (terminated) until [`Dialogs::remove`], so that its owner
//! can delete its replicated record first. The table sends nothing and reads no clock.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::time::Instant;

use crate::message::{HeaderName, Method, Request, Response};

use super::error::{DialogError, DialogsError, RequestRejection};
use super::in_dialog::{InDialogRequest, ResponseOutcome};
use super::record::DialogRecord;
use super::retransmit::{Pending2xx, Pending2xxAction, RetransmitTimers};
use super::state::{Dialog, DialogId, DialogState};

/// Limits and timers of a [`Dialogs`] table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DialogsConfig {
    /// Most dialogs held at once (early, confirmed and terminated-but-not-removed).
    pub max_dialogs: usize,
    /// Most dialogs sharing one Call-ID (early dialogs of a forked INVITE).
    pub max_dialogs_per_call: usize,
    /// T1 and T2 for the 2xx retransmission.
    pub timers: RetransmitTimers,
}

impl Default for DialogsConfig {
    /// 100,000 dialogs, 16 per Call-ID, RFC 3261 timers.
    fn default() -> Self {
        Self {
            max_dialogs: 100_000,
            max_dialogs_per_call: 16,
            timers: RetransmitTimers::DEFAULT,
        }
    }
}

/// How [`Dialogs::receive_request`] matched an incoming request.
#[derive(Debug)]
pub enum RequestMatch<'a> {
    /// The request has no To tag: it does not belong to a dialog (a new INVITE, OPTIONS,
    /// REGISTER, or a CANCEL of an initial INVITE).
    OutOfDialog,
    /// The request belongs to this dialog and was accepted.
    Accepted(&'a mut Dialog, InDialogRequest),
    /// Answer with [`RequestRejection::status`] (never answer an ACK).
    Rejected(RequestRejection),
}

/// Work the 2xx retransmission timers ask for ([`Dialogs::handle_timeout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerEvent {
    /// Pass this 2xx to the transport again.
    Retransmit2xx {
        /// The dialog.
        id: DialogId,
        /// The 2xx as first sent.
        response: Response,
    },
    /// No ACK came within 64*T1: the dialog is confirmed but should be ended with a BYE
    /// (RFC 3261 section 13.3.1.4).
    AckTimeout {
        /// The dialog.
        id: DialogId,
    },
}

/// A bounded table of dialogs keyed by (Call-ID, local tag, remote tag).
#[derive(Debug)]
pub struct Dialogs {
    config: DialogsConfig,
    hasher: RandomState,
    /// Dialogs grouped by the hash of their Call-ID.
    buckets: HashMap<u64, Vec<Dialog>>,
    len: usize,
    pending: HashMap<DialogId, Pending2xx>,
}

impl Default for Dialogs {
    fn default() -> Self {
        Self::new(DialogsConfig::default())
    }
}

impl Dialogs {
    /// An empty table.
    pub fn new(config: DialogsConfig) -> Self {
        Self {
            config,
            hasher: RandomState::new(),
            buckets: HashMap::new(),
            len: 0,
            pending: HashMap::new(),
        }
    }

    /// The limits and timers in force.
    pub fn config(&self) -> &DialogsConfig {
        &self.config
    }

    /// Number of dialogs held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no dialog is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn bucket_key(&self, call_id: &str) -> u64 {
        self.hasher.hash_one(call_id)
    }

    fn position(&self, call_id: &str, local_tag: &str, remote_tag: &str) -> Option<(u64, usize)> {
        let key = self.bucket_key(call_id);
        let index = self
            .buckets
            .get(&key)?
            .iter()
            .position(|d| d.id.matches(call_id, local_tag, remote_tag))?;
        Some((key, index))
    }

    fn at_mut(&mut self, (key, index): (u64, usize)) -> Option<&mut Dialog> {
        self.buckets.get_mut(&key)?.get_mut(index)
    }

    /// The dialog with this id.
    pub fn get(&self, id: &DialogId) -> Option<&Dialog> {
        self.find(&id.call_id, &id.local_tag, &id.remote_tag)
    }

    /// The dialog with this id, mutable (to build requests).
    pub fn get_mut(&mut self, id: &DialogId) -> Option<&mut Dialog> {
        self.find_mut(&id.call_id, &id.local_tag, &id.remote_tag)
    }

    /// The dialog with these Call-ID and tags.
    pub fn find(&self, call_id: &str, local_tag: &str, remote_tag: &str) -> Option<&Dialog> {
        self.buckets
            .get(&self.bucket_key(call_id))?
            .iter()
            .find(|d| d.id.matches(call_id, local_tag, remote_tag))
    }

    /// The dialog with these Call-ID and tags, mutable.
    pub fn find_mut(
        &mut self,
        call_id: &str,
        local_tag: &str,
        remote_tag: &str,
    ) -> Option<&mut Dialog> {
        let at = self.position(call_id, local_tag, remote_tag)?;
        self.at_mut(at)
    }

    /// The dialog an incoming request belongs to: same Call-ID, To tag = local tag, From tag =
    /// remote tag.
    pub fn find_for_request(&mut self, request: &Request) -> Option<&mut Dialog> {
        let call_id = request.headers.call_id().ok()?;
        let local = request.headers.to_tag()?;
        let remote = request.headers.from_tag().unwrap_or_default();
        let at = self.position(call_id, local, remote)?;
        self.at_mut(at)
    }

    /// The dialog an incoming response belongs to: same Call-ID, From tag = local tag, To tag =
    /// remote tag.
    pub fn find_for_response(&mut self, response: &Response) -> Option<&mut Dialog> {
        let call_id = response.headers.call_id().ok()?;
        let local = response.headers.from_tag()?;
        let remote = response.headers.to_tag().unwrap_or_default();
        let at = self.position(call_id, local, remote)?;
        self.at_mut(at)
    }

    /// Every dialog, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Dialog> + '_ {
        self.buckets.values().flatten()
    }

    /// Every dialog, mutable, in no particular order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Dialog> + '_ {
        self.buckets.values_mut().flatten()
    }

    /// The dialogs of one Call-ID (several when an INVITE forked).
    pub fn dialogs_of_call<'a>(&'a self, call_id: &'a str) -> impl Iterator<Item = &'a Dialog> {
        self.buckets
            .get(&self.bucket_key(call_id))
            .into_iter()
            .flatten()
            .filter(move |d| d.id.call_id == call_id)
    }

    /// Adds a dialog, replacing the one with the same id if any. Fails when the table or the
    /// Call-ID is full.
    pub fn insert(&mut self, dialog: Dialog) -> Result<&mut Dialog, DialogsError> {
        let key = self.bucket_key(&dialog.id.call_id);
        if let Some((_, index)) = self.position(
            &dialog.id.call_id,
            &dialog.id.local_tag,
            &dialog.id.remote_tag,
        ) {
            self.pending.remove(&dialog.id);
            let slot = self.at_mut((key, index)).ok_or(DialogsError::NotFound)?;
            *slot = dialog;
            return Ok(slot);
        }
        if self.len >= self.config.max_dialogs {
            return Err(DialogsError::Full(self.config.max_dialogs));
        }
        let same_call = self.dialogs_of_call(&dialog.id.call_id).count();
        if same_call >= self.config.max_dialogs_per_call {
            return Err(DialogsError::TooManyForks(same_call));
        }
        // Most Call-IDs have one dialog: start each bucket with room for exactly one (a default
        // Vec would reserve four, 1 KiB per dialog).
        let bucket = self
            .buckets
            .entry(key)
            .or_insert_with(|| Vec::with_capacity(1));
        bucket.push(dialog);
        self.len += 1;
        bucket.last_mut().ok_or(DialogsError::NotFound)
    }

    /// Removes a dialog (and its 2xx retransmission, if any).
    pub fn remove(&mut self, id: &DialogId) -> Option<Dialog> {
        let (key, index) = self.position(&id.call_id, &id.local_tag, &id.remote_tag)?;
        self.pending.remove(id);
        let bucket = self.buckets.get_mut(&key)?;
        let dialog = bucket.swap_remove(index);
        if bucket.is_empty() {
            self.buckets.remove(&key);
        }
        self.len -= 1;
        Some(dialog)
    }

    /// Removes the early dialogs of the INVITE with this Call-ID and From tag (what a failure
    /// response to the INVITE does; also for the endpoint when the INVITE transaction ends after
    /// one fork answered 2xx). Returns the removed dialogs.
    pub fn terminate_early(&mut self, call_id: &str, local_tag: &str) -> Vec<Dialog> {
        let ids: Vec<DialogId> = self
            .dialogs_of_call(call_id)
            .filter(|d| d.id.local_tag == local_tag && d.state == DialogState::Early)
            .map(|d| d.id.clone())
            .collect();
        ids.iter()
            .filter_map(|id| self.remove(id))
            .map(|mut d| {
                d.state = DialogState::Terminated;
                d
            })
            .collect()
    }

    /// Adds the dialog of a record exported by another node (replacing a stale copy with the
    /// same id).
    pub fn import(&mut self, record: &DialogRecord) -> Result<&mut Dialog, DialogsError> {
        let dialog = Dialog::import(record)?;
        self.insert(dialog)
    }

    /// Handles an incoming request: out of dialog when it has no To tag; otherwise matched
    /// (481 when no dialog matches) and checked by [`Dialog::receive_request`]. A matching ACK
    /// stops the retransmission of the 2xx it acknowledges.
    pub fn receive_request(&mut self, request: &Request) -> RequestMatch<'_> {
        let Some(local_tag) = request.headers.to_tag() else {
            return RequestMatch::OutOfDialog;
        };
        let call_id = match request.headers.call_id() {
            Ok(c) => c,
            Err(e) => return RequestMatch::Rejected(RequestRejection::Malformed(e)),
        };
        let remote_tag = request.headers.from_tag().unwrap_or_default();
        let Some((key, index)) = self.position(call_id, local_tag, remote_tag) else {
            return RequestMatch::Rejected(RequestRejection::NoDialog);
        };
        let Some(dialog) = self.buckets.get_mut(&key).and_then(|b| b.get_mut(index)) else {
            return RequestMatch::Rejected(RequestRejection::NoDialog);
        };
        if request.method == Method::Ack {
            let acknowledged = self
                .pending
                .get_mut(&dialog.id)
                .is_some_and(|p| p.handle_ack(request));
            if acknowledged {
                self.pending.remove(&dialog.id);
            }
        }
        match dialog.receive_request(request) {
            Ok(kind) => RequestMatch::Accepted(dialog, kind),
            Err(rejection) => RequestMatch::Rejected(rejection),
        }
    }

    /// Handles a response to a request sent within an existing dialog (including a 2xx to our
    /// INVITE retransmitted after a takeover): see [`Dialog::receive_response`].
    /// [`ResponseOutcome::NoDialog`] when no dialog matches.
    pub fn receive_response(
        &mut self,
        response: &Response,
    ) -> (ResponseOutcome, Option<&mut Dialog>) {
        match self.find_for_response(response) {
            Some(dialog) => (dialog.receive_response(response), Some(dialog)),
            None => (ResponseOutcome::NoDialog, None),
        }
    }

    /// Handles a response to an `invite` we sent (RFC 3261 sections 12.1.2 and 13.2.2.4).
    ///
    /// For an INVITE outside a dialog: a 1xx with a new To tag creates an early dialog (one per
    /// remote tag, so forks are distinct dialogs), a 2xx confirms the matching early dialog or
    /// creates a confirmed one ([`ResponseOutcome::InviteAccepted`]: send the ACK), a
    /// retransmitted 2xx gives [`ResponseOutcome::InviteRetransmission`], and a failure (300 to
    /// 699) removes every early dialog of the INVITE ([`ResponseOutcome::Terminated`] when there
    /// were some). For a re-INVITE (it has a To tag), this is [`Dialogs::receive_response`].
    pub fn receive_invite_response(
        &mut self,
        invite: &Request,
        response: &Response,
    ) -> Result<(ResponseOutcome, Option<&mut Dialog>), DialogsError> {
        if invite.headers.to_tag().is_some() {
            return Ok(self.receive_response(response));
        }
        let (Ok(call_id), Some(local_tag)) =
            (response.headers.call_id(), response.headers.from_tag())
        else {
            return Ok((ResponseOutcome::Ignored, None));
        };
        if response.status >= 300 {
            let removed = self.terminate_early(call_id, local_tag);
            let outcome = if removed.is_empty() {
                ResponseOutcome::Ignored
            } else {
                ResponseOutcome::Terminated
            };
            return Ok((outcome, None));
        }
        let Some(remote_tag) = response.headers.to_tag() else {
            if response.is_success() {
                return Err(DialogError::MissingTag(HeaderName::To).into());
            }
            return Ok((ResponseOutcome::Ignored, None));
        };
        if response.status == 100 {
            return Ok((ResponseOutcome::Ignored, None));
        }
        if let Some(at) = self.position(call_id, local_tag, remote_tag) {
            let dialog = self.at_mut(at).ok_or(DialogsError::NotFound)?;
            return Ok((dialog.receive_response(response), Some(dialog)));
        }
        let dialog = Dialog::new_uac(invite, response)?;
        let outcome = if dialog.state == DialogState::Early {
            ResponseOutcome::Provisional
        } else {
            ResponseOutcome::InviteAccepted
        };
        Ok((outcome, Some(self.insert(dialog)?)))
    }

    /// Records a response we send to `request` (UAS side), before it goes to the transport.
    ///
    /// For an INVITE outside a dialog, a 101 to 299 with a To tag creates the UAS dialog
    /// ([`Dialog::new_uas`]) unless it exists; a failure removes the early dialog. Then
    /// [`Dialog::response_sent`] applies (confirmation, target refresh), and a 2xx to an INVITE
    /// starts its retransmission until the ACK ([`Dialogs::handle_timeout`]). Returns the dialog
    /// when one remains.
    pub fn response_sent(
        &mut self,
        request: &Request,
        response: &Response,
        now: Instant,
    ) -> Result<Option<&mut Dialog>, DialogsError> {
        let (Ok(call_id), Some(local_tag)) =
            (response.headers.call_id(), response.headers.to_tag())
        else {
            return Ok(None);
        };
        let remote_tag = response.headers.from_tag().unwrap_or_default();
        let at = match self.position(call_id, local_tag, remote_tag) {
            Some(at) => at,
            None => {
                let creates = request.headers.to_tag().is_none()
                    && match request.method {
                        Method::Invite => (101..300).contains(&response.status),
                        // RFC 6665 section 4.2.1: a 2xx to a SUBSCRIBE creates the dialog.
                        Method::Subscribe => response.is_success(),
                        _ => false,
                    };
                if !creates {
                    return Ok(None);
                }
                self.insert(Dialog::new_uas(request, response)?)?;
                self.position(call_id, local_tag, remote_tag)
                    .ok_or(DialogsError::NotFound)?
            }
        };
        let timers = self.config.timers;
        let (id, failed_early) = {
            let dialog = self.at_mut(at).ok_or(DialogsError::NotFound)?;
            let was_early = dialog.state == DialogState::Early;
            let state = dialog.response_sent(request, response);
            (
                dialog.id.clone(),
                was_early && state == DialogState::Terminated,
            )
        };
        if failed_early {
            self.remove(&id);
            return Ok(None);
        }
        if response.is_success() && request.method == Method::Invite {
            let pending = Pending2xx::new(response.clone(), now, timers)?;
            self.pending.insert(id, pending);
        }
        Ok(self.at_mut(at))
    }

    /// Starts retransmitting `response` (a 2xx to an INVITE of dialog `id`) until its ACK;
    /// [`Dialogs::response_sent`] does this by itself.
    pub fn start_2xx_retransmission(
        &mut self,
        id: &DialogId,
        response: Response,
        now: Instant,
    ) -> Result<(), DialogsError> {
        if self.get(id).is_none() {
            return Err(DialogsError::NotFound);
        }
        let pending = Pending2xx::new(response, now, self.config.timers)?;
        self.pending.insert(id.clone(), pending);
        Ok(())
    }

    /// The 2xx retransmission in progress for dialog `id`, if any.
    pub fn pending_2xx(&self, id: &DialogId) -> Option<&Pending2xx> {
        self.pending.get(id)
    }

    /// When [`Dialogs::handle_timeout`] should be called next; `None` when no 2xx awaits its
    /// ACK.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending
            .values()
            .filter_map(Pending2xx::poll_timeout)
            .min()
    }

    /// Advances the 2xx retransmission timers to `now` and returns the work to do.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<TimerEvent> {
        let mut events = Vec::new();
        self.pending
            .retain(|id, pending| match pending.handle_timeout(now) {
                Pending2xxAction::Retransmit => {
                    events.push(TimerEvent::Retransmit2xx {
                        id: id.clone(),
                        response: pending.response().clone(),
                    });
                    true
                }
                Pending2xxAction::GiveUp => {
                    events.push(TimerEvent::AckTimeout { id: id.clone() });
                    false
                }
                Pending2xxAction::Wait => !pending.is_finished(),
            });
        events
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::dialog::test_support::*;
    use crate::dialog::{uas_response, RequestRejection};

    fn ringing(tag: &str, contact: &str) -> Response {
        invite_response(180, tag, &format!("Contact: <{contact}>\n"))
    }

    #[test]
    fn forked_180s_give_distinct_early_dialogs() {
        let invite = request(INVITE);
        let mut dialogs = Dialogs::default();
        let trying = invite_response(100, "", "");
        let trying = edit_response(&trying, ";tag=", "");
        assert_eq!(
            dialogs.receive_invite_response(&invite, &trying).unwrap().0,
            ResponseOutcome::Ignored
        );
        let (outcome, d) = dialogs
            .receive_invite_response(&invite, &ringing("fork1", "sip:bob@192.0.2.10"))
            .unwrap();
        assert_eq!(outcome, ResponseOutcome::Provisional);
        assert_eq!(d.unwrap().state(), DialogState::Early);
        let (outcome, _) = dialogs
            .receive_invite_response(&invite, &ringing("fork2", "sip:bob@192.0.2.20"))
            .unwrap();
        assert_eq!(outcome, ResponseOutcome::Provisional);
        // A repeated 180 of fork 1 updates it instead of creating a third dialog.
        dialogs
            .receive_invite_response(&invite, &ringing("fork1", "sip:bob@192.0.2.11"))
            .unwrap();
        assert_eq!(dialogs.len(), 2);
        let call_id = "a84b4c76e66710@pc33.atlanta.example.com";
        assert_eq!(dialogs.dialogs_of_call(call_id).count(), 2);
        let fork1 = dialogs.find(call_id, "1928301774", "fork1").unwrap();
        let fork2 = dialogs.find(call_id, "1928301774", "fork2").unwrap();
        assert_ne!(fork1.id(), fork2.id());
        assert_eq!(fork1.remote_target().to_string(), "sip:bob@192.0.2.11");
        assert_eq!(fork2.remote_target().to_string(), "sip:bob@192.0.2.20");

        // Fork 2 answers: its dialog is confirmed, fork 1 stays early.
        let ok = invite_response(200, "fork2", "Contact: <sip:bob@192.0.2.21>\n");
        let (outcome, d) = dialogs.receive_invite_response(&invite, &ok).unwrap();
        assert_eq!(outcome, ResponseOutcome::InviteAccepted);
        let d = d.unwrap();
        assert_eq!(d.state(), DialogState::Confirmed);
        assert_eq!(d.remote_target().to_string(), "sip:bob@192.0.2.21");
        assert_eq!(
            dialogs.receive_invite_response(&invite, &ok).unwrap().0,
            ResponseOutcome::InviteRetransmission
        );
        assert_eq!(
            dialogs
                .find(call_id, "1928301774", "fork1")
                .unwrap()
                .state(),
            DialogState::Early
        );
        // When the INVITE transaction ends, the remaining early dialog goes.
        let removed = dialogs.terminate_early(call_id, "1928301774");
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].remote_tag(), "fork1");
        assert_eq!(removed[0].state(), DialogState::Terminated);
        assert_eq!(dialogs.len(), 1);
    }

    #[test]
    fn a_second_2xx_from_another_fork_creates_another_confirmed_dialog() {
        let invite = request(INVITE);
        let mut dialogs = Dialogs::default();
        for tag in ["a", "b"] {
            let ok = invite_response(200, tag, "Contact: <sip:bob@192.0.2.4>\n");
            let (outcome, d) = dialogs.receive_invite_response(&invite, &ok).unwrap();
            assert_eq!(outcome, ResponseOutcome::InviteAccepted);
            assert_eq!(d.unwrap().remote_tag(), tag);
        }
        assert_eq!(dialogs.len(), 2);
    }

    #[test]
    fn a_failure_removes_every_early_dialog_of_the_invite() {
        let invite = request(INVITE);
        let mut dialogs = Dialogs::default();
        for tag in ["f1", "f2"] {
            dialogs
                .receive_invite_response(&invite, &ringing(tag, "sip:bob@192.0.2.10"))
                .unwrap();
        }
        let busy = invite_response(486, "f2", "");
        let (outcome, d) = dialogs.receive_invite_response(&invite, &busy).unwrap();
        assert_eq!(outcome, ResponseOutcome::Terminated);
        assert!(d.is_none());
        assert!(dialogs.is_empty());
        assert_eq!(
            dialogs.receive_invite_response(&invite, &busy).unwrap().0,
            ResponseOutcome::Ignored
        );
        let untagged_ok = edit_response(&ok_with_record_route(), ";tag=a6c85cf", "");
        assert_eq!(
            dialogs
                .receive_invite_response(&invite, &untagged_ok)
                .unwrap_err(),
            DialogsError::Dialog(DialogError::MissingTag(HeaderName::To))
        );
    }

    #[test]
    fn responses_within_a_dialog_are_matched_by_tags() {
        let invite = request(INVITE);
        let mut dialogs = Dialogs::default();
        dialogs
            .receive_invite_response(&invite, &ok_with_record_route())
            .unwrap();
        let id = DialogId::new(
            "a84b4c76e66710@pc33.atlanta.example.com",
            "1928301774",
            "a6c85cf",
        );
        let reinvite = dialogs
            .get_mut(&id)
            .unwrap()
            .create_request(Method::Invite)
            .unwrap();
        let mut ok = Response::from_request(&reinvite, 200, None);
        ok.headers
            .push(HeaderName::Contact, "<sip:bob@198.51.100.1>");
        // A re-INVITE's responses go through receive_invite_response too.
        let (outcome, d) = dialogs.receive_invite_response(&reinvite, &ok).unwrap();
        assert_eq!(outcome, ResponseOutcome::InviteAccepted);
        assert_eq!(
            d.unwrap().remote_target().to_string(),
            "sip:bob@198.51.100.1"
        );
        let (outcome, _) = dialogs.receive_response(&ok);
        assert_eq!(outcome, ResponseOutcome::InviteRetransmission);
        let stranger = edit_response(&ok, "tag=a6c85cf", "tag=nobody");
        let (outcome, d) = dialogs.receive_response(&stranger);
        assert_eq!(outcome, ResponseOutcome::NoDialog);
        assert!(d.is_none());
    }

    #[test]
    fn uas_flow_with_2xx_retransmission_until_the_ack() {
        let t0 = Instant::now();
        let invite = request(INVITE_AT_BOB);
        let mut dialogs = Dialogs::default();
        let ringing = uas_response(&invite, 180, None, "b0b7a6", &bob_contact());
        let d = dialogs
            .response_sent(&invite, &ringing, t0)
            .unwrap()
            .unwrap();
        assert_eq!(d.state(), DialogState::Early);
        let id = d.id().clone();
        assert_eq!(dialogs.poll_timeout(), None, "no retransmission for a 1xx");
        let ok = dialogs
            .get(&id)
            .unwrap()
            .create_response(&invite, 200, None);
        let t1 = t0 + Duration::from_secs(2);
        let d = dialogs.response_sent(&invite, &ok, t1).unwrap().unwrap();
        assert_eq!(d.state(), DialogState::Confirmed);
        assert_eq!(dialogs.len(), 1);
        assert_eq!(
            dialogs.poll_timeout(),
            Some(t1 + Duration::from_millis(500))
        );
        assert!(dialogs.handle_timeout(t1).is_empty());
        let events = dialogs.handle_timeout(t1 + Duration::from_millis(500));
        assert_eq!(
            events,
            [TimerEvent::Retransmit2xx {
                id: id.clone(),
                response: ok.clone()
            }]
        );
        assert_eq!(dialogs.pending_2xx(&id).unwrap().retransmissions(), 1);
        // The ACK arrives: the retransmission stops.
        let ack = from_alice("ACK", 314159, "b0b7a6", "");
        match dialogs.receive_request(&ack) {
            RequestMatch::Accepted(d, InDialogRequest::Ack) => assert_eq!(d.id(), &id),
            other => panic!("{other:?}"),
        }
        assert!(dialogs.pending_2xx(&id).is_none());
        assert_eq!(dialogs.poll_timeout(), None);
        assert!(dialogs
            .handle_timeout(t1 + Duration::from_secs(60))
            .is_empty());
    }

    #[test]
    fn no_ack_within_64_t1_asks_for_a_bye() {
        let t0 = Instant::now();
        let invite = request(INVITE_AT_BOB);
        let mut dialogs = Dialogs::default();
        let ok = uas_response(&invite, 200, None, "b0b7a6", &bob_contact());
        let id = dialogs
            .response_sent(&invite, &ok, t0)
            .unwrap()
            .unwrap()
            .id()
            .clone();
        let mut retransmissions = 0;
        let mut timeout_at = None;
        while let Some(at) = dialogs.poll_timeout() {
            for event in dialogs.handle_timeout(at) {
                match event {
                    TimerEvent::Retransmit2xx { .. } => retransmissions += 1,
                    TimerEvent::AckTimeout { id: timed_out } => {
                        assert_eq!(timed_out, id);
                        timeout_at = Some(at);
                    }
                }
            }
        }
        assert_eq!(retransmissions, 10);
        assert_eq!(timeout_at, Some(t0 + Duration::from_secs(32)));
        // The dialog stays confirmed; the endpoint sends the BYE.
        let d = dialogs.get_mut(&id).unwrap();
        assert_eq!(d.state(), DialogState::Confirmed);
        assert_eq!(d.create_request(Method::Bye).unwrap().method, Method::Bye);
    }

    #[test]
    fn a_uas_failure_after_180_removes_the_early_dialog() {
        let t0 = Instant::now();
        let invite = request(INVITE_AT_BOB);
        let mut dialogs = Dialogs::default();
        let ringing = uas_response(&invite, 180, None, "b0b7a6", &bob_contact());
        dialogs.response_sent(&invite, &ringing, t0).unwrap();
        assert_eq!(dialogs.len(), 1);
        let busy = uas_response(&invite, 486, None, "b0b7a6", &bob_contact());
        assert!(dialogs.response_sent(&invite, &busy, t0).unwrap().is_none());
        assert!(dialogs.is_empty());
        // A failure without a dialog creates none.
        assert!(dialogs.response_sent(&invite, &busy, t0).unwrap().is_none());
        assert!(dialogs.is_empty());
    }

    #[test]
    fn request_matching() {
        let t0 = Instant::now();
        let invite = request(INVITE_AT_BOB);
        let mut dialogs = Dialogs::default();
        let ok = uas_response(&invite, 200, None, "b0b7a6", &bob_contact());
        dialogs.response_sent(&invite, &ok, t0).unwrap();
        assert!(matches!(
            dialogs.receive_request(&invite),
            RequestMatch::OutOfDialog
        ));
        let unknown = from_alice("BYE", 314160, "unknown", "");
        match dialogs.receive_request(&unknown) {
            RequestMatch::Rejected(r) => {
                assert_eq!(r, RequestRejection::NoDialog);
                assert_eq!(r.status(), 481);
            }
            other => panic!("{other:?}"),
        }
        let mut no_call_id = from_alice("INFO", 314160, "b0b7a6", "");
        no_call_id.headers.remove(&HeaderName::CallId);
        match dialogs.receive_request(&no_call_id) {
            RequestMatch::Rejected(r) => assert_eq!(r.status(), 400),
            other => panic!("{other:?}"),
        }
        let old = from_alice("INFO", 3, "b0b7a6", "");
        match dialogs.receive_request(&old) {
            RequestMatch::Rejected(r) => assert_eq!(r.status(), 500),
            other => panic!("{other:?}"),
        }
        let bye = from_alice("BYE", 314160, "b0b7a6", "");
        assert!(dialogs.find_for_request(&bye).is_some());
        match dialogs.receive_request(&bye) {
            RequestMatch::Accepted(d, InDialogRequest::Bye) => {
                assert_eq!(d.state(), DialogState::Terminated);
                let ok = d.create_response(&bye, 200, None);
                assert_eq!(ok.headers.to_tag(), Some("b0b7a6"));
            }
            other => panic!("{other:?}"),
        }
        // Terminated dialogs stay until removed; removing also drops the pending 2xx.
        let id = dialogs.iter().next().unwrap().id().clone();
        assert!(dialogs.pending_2xx(&id).is_some());
        assert_eq!(
            dialogs.remove(&id).unwrap().state(),
            DialogState::Terminated
        );
        assert!(dialogs.pending_2xx(&id).is_none());
        assert!(dialogs.is_empty());
        assert!(dialogs.remove(&id).is_none());
    }

    #[test]
    fn the_table_is_bounded() {
        let config = DialogsConfig {
            max_dialogs: 3,
            max_dialogs_per_call: 2,
            ..DialogsConfig::default()
        };
        let mut dialogs = Dialogs::new(config);
        let invite = request(INVITE);
        for tag in ["f1", "f2"] {
            dialogs
                .receive_invite_response(&invite, &ringing(tag, "sip:b@192.0.2.1"))
                .unwrap();
        }
        assert_eq!(
            dialogs
                .receive_invite_response(&invite, &ringing("f3", "sip:b@192.0.2.1"))
                .unwrap_err(),
            DialogsError::TooManyForks(2)
        );
        let other_call = request(&INVITE.replace("a84b4c76e66710", "second"));
        let ok = edit_response(&ok_with_record_route(), "a84b4c76e66710", "second");
        dialogs.receive_invite_response(&other_call, &ok).unwrap();
        assert_eq!(dialogs.len(), 3);
        let third = request(&INVITE.replace("a84b4c76e66710", "third"));
        let ok = edit_response(&ok_with_record_route(), "a84b4c76e66710", "third");
        assert_eq!(
            dialogs.receive_invite_response(&third, &ok).unwrap_err(),
            DialogsError::Full(3)
        );
        // Replacing an existing dialog needs no room.
        let existing = dialogs.iter().next().unwrap().clone();
        dialogs.insert(existing.clone()).unwrap();
        assert_eq!(dialogs.len(), 3);
        let mut record = existing.export();
        record.local_cseq = Some(99);
        assert_eq!(dialogs.import(&record).unwrap().local_cseq(), Some(99));
        assert_eq!(dialogs.get(existing.id()).unwrap().local_cseq(), Some(99));
        assert_eq!(dialogs.len(), 3);
        assert!(matches!(
            dialogs.start_2xx_retransmission(
                &DialogId::new("x", "y", "z"),
                ok_with_record_route(),
                Instant::now()
            ),
            Err(DialogsError::NotFound)
        ));
    }
}
