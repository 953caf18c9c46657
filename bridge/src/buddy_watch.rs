//! A device watching a SIP buddy's presence (RFC 3856 over RFC 6665, as the subscriber), sans-IO:
//! one [`WatchCore`] per watch, fed the answers to its SUBSCRIBEs, the NOTIFYs of its dialog,
//! the device's `Unwatch` and timestamps; it says which SUBSCRIBE to send (the first one, each
//! refresh before the granted period runs out, the unsubscribe), what to tell the device
//! (`PresenceUpdate` on each change the PIDF shows, `WatchStatus` as the subscription starts
//! and ends) and when it is over. [`read_pidf`] reads a buddy's PIDF document (RFC 3863, with
//! the RPID activities of RFC 4480).
//!
//! It does not send anything, read a clock or know the device's session: `crate::buddies` is
//! the shell (a task per watch, the limits per device and in total, the dialogs' routing).
//! Watches are not replicated: they live on the node of the device's session, and a device
//! that moves to another node watches again there.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use quick_xml::events::Event;
use thalamus_proto::v1::PresenceState;
use thalamus_sip::dialog::DialogId;

/// The longest note kept from a buddy's document, in bytes.
pub const MAX_NOTE_BYTES: usize = 256;
/// XML events read from one document at most (a bound on work per NOTIFY).
const MAX_XML_EVENTS: usize = 4096;
/// Element nesting read at most.
const MAX_XML_DEPTH: usize = 32;
/// A refresh never comes sooner than this after the last one.
const MIN_REFRESH: Duration = Duration::from_secs(5);
/// A failed refresh that leaves the subscription valid (RFC 6665 section 4.1.2.2) is tried
/// again this long after, while the period granted lasts.
const REFRESH_RETRY: Duration = Duration::from_secs(10);
/// How long an unsubscribed watch waits for the buddy's last NOTIFY (`terminated`), so that it
/// is answered 200 rather than 481.
pub const LAST_NOTIFY_WAIT: Duration = Duration::from_secs(5);

/// What to do for a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchAction {
    /// Send a SUBSCRIBE with this Expires: out of dialog for the first one, in the watch's
    /// dialog afterwards (0: the unsubscribe). Feed its outcome back with
    /// [`WatchCore::answered`].
    Subscribe {
        /// Seconds asked.
        expires: u32,
    },
    /// Tell the device the buddy's presence (a `PresenceUpdate`).
    Presence {
        /// The state the document shows.
        state: PresenceState,
        /// Its note (at most [`MAX_NOTE_BYTES`]).
        note: String,
    },
    /// Tell the device how the watch stands (a `WatchStatus`).
    Status {
        /// The subscription runs.
        active: bool,
        /// The SUBSCRIBE's final status, or 0.
        sip_status: u16,
        /// Why (the reason phrase, or why it ended).
        reason: String,
    },
    /// The watch is over: forget it and its dialog.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The first SUBSCRIBE is out.
    Subscribing,
    /// Subscribed; no SUBSCRIBE out.
    Active,
    /// A refresh is out.
    Refreshing,
    /// The unsubscribe is out.
    Unsubscribing,
    /// Unsubscribed: waiting (until this instant) for the last NOTIFY.
    Closing(Instant),
    /// Over.
    Ended,
}

/// One device's watch of one buddy.
#[derive(Debug)]
pub struct WatchCore {
    phase: Phase,
    asked: u32,
    dialog: Option<DialogId>,
    refresh_at: Option<Instant>,
    /// When the period last granted runs out.
    expires_at: Option<Instant>,
    unwatch: bool,
    last: Option<(PresenceState, String)>,
    actions: VecDeque<WatchAction>,
}

impl WatchCore {
    /// A watch asking for `expires` seconds per period: its first SUBSCRIBE is the first action.
    pub fn new(expires: u32) -> Self {
        let asked = expires.max(1);
        Self {
            phase: Phase::Subscribing,
            asked,
            dialog: None,
            refresh_at: None,
            expires_at: None,
            unwatch: false,
            last: None,
            actions: VecDeque::from([WatchAction::Subscribe { expires: asked }]),
        }
    }

    /// The subscription's dialog, once the buddy accepted it.
    pub fn dialog(&self) -> Option<&DialogId> {
        self.dialog.as_ref()
    }

    /// Whether the watch is over.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<WatchAction> {
        self.actions.pop_front()
    }

    /// When [`WatchCore::handle_timeout`] wants to run (the next refresh).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Active => self.refresh_at,
            Phase::Closing(until) => Some(until),
            _ => None,
        }
    }

    /// The time is `now`: a refresh that is due goes out; an unsubscribed watch whose last
    /// NOTIFY did not come is over.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Phase::Closing(until) = self.phase {
            if until <= now {
                self.end(0, "unwatched".to_string());
            }
            return;
        }
        if self.phase == Phase::Active && self.refresh_at.is_some_and(|at| at <= now) {
            self.phase = Phase::Refreshing;
            self.refresh_at = None;
            self.actions.push_back(WatchAction::Subscribe {
                expires: self.asked,
            });
        }
    }

    /// The final outcome of the SUBSCRIBE last asked for: its status and reason, the Expires
    /// the buddy granted, and the dialog a 2xx created or belongs to (`status` 408 when it went
    /// unanswered, 503 when it could not be sent).
    pub fn answered(
        &mut self,
        now: Instant,
        status: u16,
        reason: &str,
        granted: Option<u32>,
        dialog: Option<DialogId>,
    ) {
        let ok = (200..300).contains(&status);
        match self.phase {
            Phase::Subscribing => {
                if !ok || dialog.is_none() {
                    return self.end(status, reason.to_string());
                }
                self.dialog = dialog;
                if self.unwatch {
                    return self.unsubscribe();
                }
                self.phase = Phase::Active;
                self.schedule(now, granted);
                self.actions.push_back(WatchAction::Status {
                    active: true,
                    sip_status: status,
                    reason: reason.to_string(),
                });
            }
            Phase::Refreshing => {
                if !ok {
                    // RFC 6665 section 4.1.2.2: these end the subscription; after any other
                    // failure it is valid until the period granted runs out, and the refresh
                    // is tried again meanwhile.
                    let retry = now + REFRESH_RETRY;
                    let valid = self.expires_at.is_some_and(|at| retry < at);
                    if terminates_subscription(status) || !valid || self.unwatch {
                        return self.end(0, format!("refresh failed: {status} {reason}"));
                    }
                    self.phase = Phase::Active;
                    self.refresh_at = Some(retry);
                    return;
                }
                if self.unwatch {
                    return self.unsubscribe();
                }
                self.phase = Phase::Active;
                self.schedule(now, granted);
            }
            Phase::Unsubscribing if ok => self.phase = Phase::Closing(now + LAST_NOTIFY_WAIT),
            Phase::Unsubscribing => self.end(0, "unwatched".to_string()),
            Phase::Active | Phase::Closing(_) | Phase::Ended => {}
        }
    }

    /// A NOTIFY in the watch's dialog, with its `Event`, `Subscription-State` and body: the
    /// status to answer it with (481 once the watch is over, 489 for another event package). A
    /// changed presence goes to the device, unless it unwatched; a `terminated` state ends the
    /// watch.
    pub fn notify(
        &mut self,
        now: Instant,
        event: &str,
        subscription_state: &str,
        body: &[u8],
    ) -> u16 {
        if self.phase == Phase::Ended {
            return 481;
        }
        let package = event.split(';').next().unwrap_or_default().trim();
        if !package.eq_ignore_ascii_case("presence") {
            return 489;
        }
        if let Phase::Closing(_) = self.phase {
            // The last NOTIFY after our unsubscribe: taken, nothing more for the device.
            if subscription_state
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("terminated")
            {
                self.end(0, "unwatched".to_string());
            }
            return 200;
        }
        let unwatching = self.phase == Phase::Unsubscribing || self.unwatch;
        if let Some((state, note)) = read_pidf(body).filter(|_| !unwatching) {
            if self.last.as_ref() != Some(&(state, note.clone())) {
                self.last = Some((state, note.clone()));
                self.actions
                    .push_back(WatchAction::Presence { state, note });
            }
        }
        let mut params = subscription_state.split(';').map(str::trim);
        let value = params.next().unwrap_or_default().to_ascii_lowercase();
        if value == "terminated" {
            // The buddy's answer to our unsubscribe may overtake its 2xx (the NOTIFY comes
            // straight, the 2xx through a proxy): still the end the device asked for.
            if self.phase == Phase::Unsubscribing || self.unwatch {
                self.end(0, "unwatched".to_string());
                return 200;
            }
            let why = params
                .find_map(|p| p.strip_prefix("reason="))
                .unwrap_or("no reason given");
            self.end(0, format!("terminated: {why}"));
            return 200;
        }
        // A shorter period than we were granted: refresh within it.
        if self.phase == Phase::Active {
            if let Some(left) = params
                .find_map(|p| p.strip_prefix("expires="))
                .and_then(|v| v.parse::<u32>().ok())
            {
                let at = now + refresh_after(left);
                if self.refresh_at.is_none_or(|r| at < r) {
                    self.refresh_at = Some(at);
                }
            }
        }
        200
    }

    /// The device stops watching (or left): the subscription ends with an unsubscribe once
    /// no other SUBSCRIBE is out.
    pub fn unwatch(&mut self) {
        match self.phase {
            Phase::Active => self.unsubscribe(),
            Phase::Subscribing | Phase::Refreshing => self.unwatch = true,
            Phase::Unsubscribing | Phase::Closing(_) | Phase::Ended => {}
        }
    }

    fn unsubscribe(&mut self) {
        self.phase = Phase::Unsubscribing;
        self.refresh_at = None;
        self.actions
            .push_back(WatchAction::Subscribe { expires: 0 });
    }

    fn schedule(&mut self, now: Instant, granted: Option<u32>) {
        let period = granted.unwrap_or(self.asked).min(self.asked.max(1));
        self.refresh_at = Some(now + refresh_after(period));
        self.expires_at = Some(now + Duration::from_secs(u64::from(period)));
    }

    fn end(&mut self, sip_status: u16, reason: String) {
        self.phase = Phase::Ended;
        self.refresh_at = None;
        self.actions.push_back(WatchAction::Status {
            active: false,
            sip_status,
            reason,
        });
        self.actions.push_back(WatchAction::Done);
    }
}

/// The answers to a refresh that end the subscription (RFC 6665 section 4.1.2.2).
fn terminates_subscription(status: u16) -> bool {
    matches!(status, 404 | 405 | 410 | 416 | 480..=485 | 489 | 501 | 604)
}

/// When to refresh a period of `secs`: at three quarters of it (RFC 6665 leaves the margin to
/// the subscriber), never sooner than [`MIN_REFRESH`].
fn refresh_after(secs: u32) -> Duration {
    Duration::from_secs(u64::from(secs) * 3 / 4).max(MIN_REFRESH)
}

/// What a PIDF document (RFC 3863) says of its presentity: `closed` is `OFFLINE`; `open` is
/// `AVAILABLE`, or `BUSY` / `AWAY` when an RPID activity (RFC 4480) says so (on-the-phone,
/// busy, meeting; away, vacation, sleeping...); the first `<note>`, cut to [`MAX_NOTE_BYTES`].
/// Namespace prefixes are ignored. `None` for a body that is not such a document.
pub fn read_pidf(body: &[u8]) -> Option<(PresenceState, String)> {
    // Text is kept as written: an entity splits a note into several text events.
    let mut reader = quick_xml::Reader::from_reader(body);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut presence = false;
    let mut basic: Option<bool> = None;
    let mut activity: Option<PresenceState> = None;
    let mut note: Option<String> = None;
    let mut in_first_note = false;
    for _ in 0..MAX_XML_EVENTS {
        match reader.read_event().ok()? {
            Event::Start(e) => {
                let name = e.local_name().as_ref().to_vec();
                element(&path, &name, &mut presence, &mut activity);
                if name == b"note" && note.is_none() {
                    note = Some(String::new());
                    in_first_note = true;
                }
                if path.len() >= MAX_XML_DEPTH {
                    return None;
                }
                path.push(name);
            }
            Event::Empty(e) => {
                let name = e.local_name().as_ref().to_vec();
                element(&path, &name, &mut presence, &mut activity);
            }
            Event::End(_) => {
                if path.last().is_some_and(|n| n == b"note") {
                    in_first_note = false;
                }
                path.pop();
            }
            Event::Text(t) => {
                let text = t.decode().ok()?;
                if path.last().is_some_and(|n| n == b"basic") {
                    // Open when any tuple is open (RFC 3863: each tuple is one way to reach
                    // the presentity).
                    match text.trim() {
                        "open" => basic = Some(true),
                        "closed" if basic.is_none() => basic = Some(false),
                        _ => {}
                    }
                } else if in_first_note {
                    if let Some(n) = note.as_mut() {
                        n.push_str(&text);
                    }
                }
            }
            Event::GeneralRef(r) if in_first_note => {
                let resolved = match r.resolve_char_ref().ok()? {
                    Some(c) => c.to_string(),
                    None => {
                        let name = r.decode().ok()?;
                        quick_xml::escape::resolve_predefined_entity(&name)?.to_string()
                    }
                };
                if let Some(n) = note.as_mut() {
                    n.push_str(&resolved);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !presence {
        return None;
    }
    let state = match (basic, activity) {
        (Some(false), _) => PresenceState::Offline,
        (_, Some(a)) => a,
        (Some(true), None) => PresenceState::Available,
        (None, None) => return None,
    };
    let mut note = note.unwrap_or_default().trim().to_string();
    if note.len() > MAX_NOTE_BYTES {
        let mut cut = MAX_NOTE_BYTES;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    Some((state, note))
}

/// An element opened at `path`: the root `presence`, or an RPID activity.
fn element(
    path: &[Vec<u8>],
    name: &[u8],
    presence: &mut bool,
    activity: &mut Option<PresenceState>,
) {
    if path.is_empty() && name == b"presence" {
        *presence = true;
    }
    if activity.is_none() && path.last().is_some_and(|p| p == b"activities") {
        *activity = match name {
            b"on-the-phone" | b"busy" | b"meeting" | b"performance" | b"presentation"
            | b"in-transit" | b"steering" => Some(PresenceState::Busy),
            b"away" | b"vacation" | b"sleeping" | b"holiday" | b"appointment" => {
                Some(PresenceState::Away)
            }
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    //! `Instant::now()` only gives the virtual clock its origin.
    #![allow(clippy::unwrap_used, clippy::disallowed_methods)]
    use super::*;

    fn dialog() -> DialogId {
        DialogId::new("w1@gw", "ours", "buddy")
    }

    const OPEN: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:bob@example.org">
  <tuple id="t1"><status><basic>open</basic></status><note>at my desk &amp; free</note></tuple>
</presence>"#;

    const ON_THE_PHONE: &str = r#"<?xml version="1.0"?>
<presence xmlns="urn:ietf:params:xml:ns:pidf" xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model"
  xmlns:rpid="urn:ietf:params:xml:ns:pidf:rpid" entity="sip:bob@example.org">
  <tuple id="t1"><status><basic>open</basic></status></tuple>
  <dm:person id="p1"><rpid:activities><rpid:on-the-phone/></rpid:activities>
  <dm:note>call me later</dm:note></dm:person>
</presence>"#;

    fn drain(w: &mut WatchCore) -> Vec<WatchAction> {
        std::iter::from_fn(|| w.poll_action()).collect()
    }

    #[test]
    fn pidf_documents_are_read_with_any_prefix_and_bounded() {
        assert_eq!(
            read_pidf(OPEN.as_bytes()),
            Some((PresenceState::Available, "at my desk & free".to_string()))
        );
        assert_eq!(
            read_pidf(ON_THE_PHONE.as_bytes()),
            Some((PresenceState::Busy, "call me later".to_string()))
        );
        let closed = OPEN.replace(">open<", ">closed<");
        assert_eq!(
            read_pidf(closed.as_bytes()).map(|p| p.0),
            Some(PresenceState::Offline)
        );
        // Two tuples, one open: reachable.
        let two = OPEN.replace(
            "<tuple id=\"t1\">",
            "<tuple id=\"t0\"><status><basic>closed</basic></status></tuple><tuple id=\"t1\">",
        );
        assert_eq!(
            read_pidf(two.as_bytes()).map(|p| p.0),
            Some(PresenceState::Available)
        );
        let away = ON_THE_PHONE.replace("rpid:on-the-phone", "rpid:vacation");
        assert_eq!(
            read_pidf(away.as_bytes()).map(|p| p.0),
            Some(PresenceState::Away)
        );
        let long = OPEN.replace("at my desk &amp; free", &"é".repeat(300));
        let note = read_pidf(long.as_bytes()).unwrap().1;
        assert!(note.len() <= MAX_NOTE_BYTES && note.starts_with('é'));
        // Not PIDF, not XML, no status, too deep: nothing.
        assert_eq!(read_pidf(b"<html><body>open</body></html>"), None);
        assert_eq!(read_pidf(b"\xff\xfe garbage <<<"), None);
        assert_eq!(read_pidf(b"<presence><tuple/></presence>"), None);
        let deep = format!("<presence>{}", "<a>".repeat(100));
        assert_eq!(read_pidf(deep.as_bytes()), None);
        assert_eq!(read_pidf(b""), None);
    }

    #[test]
    fn a_watch_subscribes_reports_changes_refreshes_and_unsubscribes() {
        let t0 = Instant::now();
        let mut w = WatchCore::new(600);
        assert_eq!(drain(&mut w), vec![WatchAction::Subscribe { expires: 600 }]);
        // The buddy grants less than asked: the refresh follows its period.
        w.answered(t0, 200, "OK", Some(120), Some(dialog()));
        assert_eq!(
            drain(&mut w),
            vec![WatchAction::Status {
                active: true,
                sip_status: 200,
                reason: "OK".into()
            }]
        );
        assert_eq!(w.dialog(), Some(&dialog()));
        assert_eq!(w.poll_timeout(), Some(t0 + Duration::from_secs(90)));
        assert_eq!(
            w.notify(t0, "presence", "active;expires=120", OPEN.as_bytes()),
            200
        );
        assert_eq!(
            drain(&mut w),
            vec![WatchAction::Presence {
                state: PresenceState::Available,
                note: "at my desk & free".into()
            }]
        );
        // The same document again: nothing new for the device.
        assert_eq!(
            w.notify(t0, "presence", "active;expires=120", OPEN.as_bytes()),
            200
        );
        assert!(drain(&mut w).is_empty());
        assert_eq!(
            w.notify(t0, "presence", "active", ON_THE_PHONE.as_bytes()),
            200
        );
        assert_eq!(drain(&mut w).len(), 1);
        // Not yet due; then due: the refresh, and its 2xx schedules the next.
        w.handle_timeout(t0 + Duration::from_secs(89));
        assert!(drain(&mut w).is_empty());
        let t1 = t0 + Duration::from_secs(90);
        w.handle_timeout(t1);
        assert_eq!(drain(&mut w), vec![WatchAction::Subscribe { expires: 600 }]);
        assert_eq!(w.poll_timeout(), None, "nothing while the refresh is out");
        w.answered(t1, 200, "OK", Some(120), Some(dialog()));
        assert!(drain(&mut w).is_empty());
        assert_eq!(w.poll_timeout(), Some(t1 + Duration::from_secs(90)));
        // A NOTIFY saying less time is left brings the refresh forward.
        w.notify(t1, "presence", "active;expires=20", b"");
        assert_eq!(w.poll_timeout(), Some(t1 + Duration::from_secs(15)));
        // Unwatched: the unsubscribe, then the end.
        w.unwatch();
        assert_eq!(drain(&mut w), vec![WatchAction::Subscribe { expires: 0 }]);
        w.answered(t1, 200, "OK", Some(0), Some(dialog()));
        // The buddy's last NOTIFY is still answered 200, and ends the watch.
        assert!(drain(&mut w).is_empty());
        assert_eq!(w.poll_timeout(), Some(t1 + LAST_NOTIFY_WAIT));
        assert_eq!(
            w.notify(t1, "presence", "terminated;reason=timeout", OPEN.as_bytes()),
            200
        );
        assert_eq!(
            drain(&mut w),
            vec![
                WatchAction::Status {
                    active: false,
                    sip_status: 0,
                    reason: "unwatched".into()
                },
                WatchAction::Done
            ]
        );
        assert!(w.is_done());
        // A NOTIFY after the end (the buddy's last one, or a stray): 481.
        assert_eq!(w.notify(t1, "presence", "terminated", OPEN.as_bytes()), 481);
    }

    #[test]
    fn refusals_failed_refreshes_and_terminations_end_the_watch() {
        let t0 = Instant::now();
        let mut w = WatchCore::new(300);
        drain(&mut w);
        w.answered(t0, 403, "Forbidden", None, None);
        assert_eq!(
            drain(&mut w),
            vec![
                WatchAction::Status {
                    active: false,
                    sip_status: 403,
                    reason: "Forbidden".into()
                },
                WatchAction::Done
            ]
        );

        let mut w = WatchCore::new(300);
        drain(&mut w);
        w.answered(t0, 202, "Accepted", Some(300), Some(dialog()));
        drain(&mut w);
        w.handle_timeout(t0 + Duration::from_secs(225));
        drain(&mut w);
        // A 503 leaves the subscription valid: tried again 10 s later, within the period.
        let t1 = t0 + Duration::from_secs(225);
        w.answered(t1, 503, "Service Unavailable", None, None);
        assert!(drain(&mut w).is_empty());
        assert_eq!(w.poll_timeout(), Some(t1 + REFRESH_RETRY));
        w.handle_timeout(t1 + REFRESH_RETRY);
        assert_eq!(drain(&mut w), vec![WatchAction::Subscribe { expires: 300 }]);
        // A 481 ends it.
        w.answered(t1, 481, "Call/Transaction Does Not Exist", None, None);
        let a = drain(&mut w);
        assert!(
            matches!(&a[0], WatchAction::Status { active: false, reason, .. }
            if reason.starts_with("refresh failed: 481"))
        );

        let mut w = WatchCore::new(300);
        drain(&mut w);
        w.answered(t0, 200, "OK", Some(300), Some(dialog()));
        drain(&mut w);
        let closed = OPEN.replace(">open<", ">closed<");
        assert_eq!(
            w.notify(
                t0,
                "presence",
                "terminated;reason=deactivated",
                closed.as_bytes()
            ),
            200
        );
        let a = drain(&mut w);
        assert_eq!(
            a,
            vec![
                WatchAction::Presence {
                    state: PresenceState::Offline,
                    note: "at my desk & free".into()
                },
                WatchAction::Status {
                    active: false,
                    sip_status: 0,
                    reason: "terminated: deactivated".into()
                },
                WatchAction::Done
            ]
        );
    }

    #[test]
    fn a_notify_of_another_package_gets_489_and_an_unwatched_buddy_is_not_reported() {
        let t0 = Instant::now();
        let mut w = WatchCore::new(300);
        drain(&mut w);
        w.answered(t0, 200, "OK", Some(300), Some(dialog()));
        drain(&mut w);
        assert_eq!(w.notify(t0, "dialog", "active", OPEN.as_bytes()), 489);
        assert!(drain(&mut w).is_empty(), "nothing for the device");
        assert_eq!(
            w.notify(t0, "Presence;id=1", "active", OPEN.as_bytes()),
            200
        );
        assert_eq!(drain(&mut w).len(), 1);
        // Unwatched: a change that crosses the unsubscribe is not passed on.
        w.unwatch();
        drain(&mut w);
        let closed = OPEN.replace(">open<", ">closed<");
        assert_eq!(w.notify(t0, "presence", "active", closed.as_bytes()), 200);
        assert!(drain(&mut w).is_empty());
    }

    #[test]
    fn an_unwatch_while_a_subscribe_is_out_waits_for_its_answer() {
        let t0 = Instant::now();
        let mut w = WatchCore::new(300);
        drain(&mut w);
        w.unwatch();
        assert!(drain(&mut w).is_empty());
        // Accepted meanwhile: unsubscribed at once, the device hears no "active".
        w.answered(t0, 200, "OK", Some(300), Some(dialog()));
        assert_eq!(drain(&mut w), vec![WatchAction::Subscribe { expires: 0 }]);
        // The last NOTIFY overtakes the unsubscribe's 2xx: the end the device asked for.
        let mut v = WatchCore::new(300);
        drain(&mut v);
        v.answered(t0, 200, "OK", Some(300), Some(dialog()));
        drain(&mut v);
        v.unwatch();
        assert_eq!(drain(&mut v), vec![WatchAction::Subscribe { expires: 0 }]);
        assert_eq!(
            v.notify(t0, "presence", "terminated;reason=timeout", b""),
            200
        );
        assert_eq!(
            drain(&mut v),
            vec![
                WatchAction::Status {
                    active: false,
                    sip_status: 0,
                    reason: "unwatched".into()
                },
                WatchAction::Done
            ]
        );
        // No last NOTIFY comes: over after the wait.
        w.answered(t0, 200, "OK", Some(0), Some(dialog()));
        w.handle_timeout(t0 + LAST_NOTIFY_WAIT - Duration::from_millis(1));
        assert!(drain(&mut w).is_empty());
        w.handle_timeout(t0 + LAST_NOTIFY_WAIT);
        assert_eq!(drain(&mut w).last(), Some(&WatchAction::Done));
        // Refused meanwhile: just over.
        let mut w = WatchCore::new(300);
        drain(&mut w);
        w.unwatch();
        w.answered(t0, 404, "Not Found", None, None);
        assert_eq!(drain(&mut w).last(), Some(&WatchAction::Done));
        // A 2xx without a dialog (a broken peer) is no subscription.
        let mut w = WatchCore::new(300);
        drain(&mut w);
        w.answered(t0, 200, "OK", None, None);
        assert_eq!(drain(&mut w).last(), Some(&WatchAction::Done));
    }
}
