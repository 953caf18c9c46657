//! One load device's calls and texts, sans-IO: told of the calls and texts the device's SDK
//! session sent (their call refs and request ids are the session's), fed the gateway's frames
//! and `now`, it returns the frames to send (Answer, Hangup) and what happened ([`Outcome`]s:
//! a call answered, a call finished and how, a text delivered or not).
//!
//! Outgoing calls are dialed on request, hung up `hold` after the answer (or left to the other
//! side when `hold` is zero), and given up after `call_timeout` without an answer. Incoming
//! calls are answered at once. Media frames are counted per call; sending them is the caller's
//! job (see [`DeviceCalls::media_due`]). It does not own a connection or a clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{
    Answer, AudioCodec, CallEvent, CallState, EndReason, Envelope, ErrorCode, Hangup, MediaOffer,
};

/// Media stops this long before a planned hangup, so the last echoes are back before the end.
const MEDIA_QUIET_BEFORE_HANGUP: Duration = Duration::from_millis(100);

/// Most texts awaiting their status at once on one device.
const MAX_PENDING_TEXTS: usize = 256;

/// Settings shared by all devices of a run.
#[derive(Debug, Clone)]
pub struct CallSettings {
    /// Time answered before the device hangs up (zero: the other side hangs up).
    pub hold: Duration,
    /// An unanswered call is given up after this long; an answered one that has not ended
    /// this long after its hangup is closed out too.
    pub call_timeout: Duration,
    /// Whether answered calls carry media.
    pub media: bool,
}

/// Something that happened, for the run's report.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// An incoming call was offered to the device (outgoing calls are counted when dialed).
    Offered {
        /// When.
        at: Instant,
    },
    /// A call was answered after `setup` (Dial, or IncomingCall, to the answered event).
    Answered {
        /// When.
        at: Instant,
        /// Set-up latency.
        setup: Duration,
    },
    /// A call is over. Every call started produces exactly one of these.
    Finished {
        /// When.
        at: Instant,
        /// Whether it had been answered.
        answered: bool,
        /// How it ended: the end reason and SIP status, `error <code>`, `timeout`, ...
        reason: String,
        /// Media frames sent on it.
        media_sent: u64,
        /// Media frames that came back on it.
        media_received: u64,
    },
    /// The device lost its node and logged in again (at another entry point, or where a
    /// redirect sent it), resuming its session when `resumed`. Calls the new node still holds
    /// go on; the others finished as `lost with its node`.
    Reconnected {
        /// When it was logged in again.
        at: Instant,
        /// Why it logged in again: `connection lost`, or `goodbye <reason>` from its node.
        cause: String,
        /// Whether the session was resumed (the token was accepted).
        resumed: bool,
        /// Calls that went on.
        calls_kept: u64,
        /// Calls that did not.
        calls_lost: u64,
        /// From the loss to the new Welcome.
        took: Duration,
    },
    /// A text got its final status (or failed).
    Text {
        /// When.
        at: Instant,
        /// Time from SendText to the status.
        latency: Duration,
        /// Delivered (2xx).
        delivered: bool,
        /// SIP status, or the error.
        reason: String,
    },
}

#[derive(Debug)]
struct CallSlot {
    started: Instant,
    dial_request: Option<u64>,
    answered: Option<Instant>,
    hangup_at: Option<Instant>,
    give_up_at: Instant,
    hung_up: bool,
    media_sent: u64,
    media_received: u64,
    media_seq: u16,
}

/// The calls of one device.
#[derive(Debug)]
pub struct DeviceCalls {
    settings: CallSettings,
    calls: HashMap<u32, CallSlot>,
    dials: HashMap<u64, u32>,
    texts: HashMap<u64, Instant>,
}

/// The device's media offer: narrowband audio and DTMF events.
pub fn device_media() -> MediaOffer {
    MediaOffer {
        audio_codecs: vec![
            AudioCodec::Pcmu as i32,
            AudioCodec::Pcma as i32,
            AudioCodec::TelephoneEvent as i32,
        ],
        ..Default::default()
    }
}

fn end_reason_name(code: i32) -> String {
    EndReason::try_from(code).map_or_else(
        |_| format!("end_reason_{code}"),
        |r| {
            r.as_str_name()
                .strip_prefix("END_REASON_")
                .unwrap_or(r.as_str_name())
                .to_ascii_lowercase()
        },
    )
}

fn error_name(code: i32) -> String {
    ErrorCode::try_from(code).map_or_else(
        |_| format!("code_{code}"),
        |c| {
            c.as_str_name()
                .strip_prefix("ERROR_CODE_")
                .unwrap_or(c.as_str_name())
                .to_ascii_lowercase()
        },
    )
}

/// How a call ended, as the report groups it: `busy 486`, `remote_hangup`, ...
pub fn end_description(event: &CallEvent) -> String {
    let name = end_reason_name(event.end_reason);
    if event.sip_status == 0 {
        name
    } else {
        format!("{name} {}", event.sip_status)
    }
}

impl DeviceCalls {
    /// A device with no calls.
    pub fn new(settings: CallSettings) -> Self {
        Self {
            settings,
            calls: HashMap::new(),
            dials: HashMap::new(),
            texts: HashMap::new(),
        }
    }

    /// Whether answered calls carry media.
    pub fn media_enabled(&self) -> bool {
        self.settings.media
    }

    /// Calls not yet finished.
    pub fn calls_in_progress(&self) -> usize {
        self.calls.len()
    }

    /// An outgoing call the session placed (its `Dial` sent as `call_ref`, `request_id`).
    pub fn dialed(&mut self, now: Instant, call_ref: u32, request_id: u64) {
        self.calls.insert(
            call_ref,
            CallSlot {
                started: now,
                dial_request: Some(request_id),
                answered: None,
                hangup_at: None,
                give_up_at: now + self.settings.call_timeout,
                hung_up: false,
                media_sent: 0,
                media_received: 0,
                media_seq: 0,
            },
        );
        self.dials.insert(request_id, call_ref);
    }

    /// Whether another text may go (not too many await their status).
    pub fn may_text(&self) -> bool {
        self.texts.len() < MAX_PENDING_TEXTS
    }

    /// A text the session sent as `request_id`.
    pub fn texted(&mut self, now: Instant, request_id: u64) {
        self.texts.insert(request_id, now);
    }

    fn finish(&mut self, now: Instant, call_ref: u32, reason: String, outcomes: &mut Vec<Outcome>) {
        if let Some(slot) = self.calls.remove(&call_ref) {
            if let Some(id) = slot.dial_request {
                self.dials.remove(&id);
            }
            outcomes.push(Outcome::Finished {
                at: now,
                answered: slot.answered.is_some(),
                reason,
                media_sent: slot.media_sent,
                media_received: slot.media_received,
            });
        }
    }

    /// Feeds one frame from the gateway.
    pub fn on_frame(
        &mut self,
        now: Instant,
        env: &Envelope,
        out: &mut Vec<Envelope>,
        outcomes: &mut Vec<Outcome>,
    ) {
        match &env.body {
            Some(Body::IncomingCall(c)) => {
                if self.calls.contains_key(&c.call_ref) {
                    return;
                }
                self.calls.insert(
                    c.call_ref,
                    CallSlot {
                        started: now,
                        dial_request: None,
                        answered: None,
                        hangup_at: None,
                        give_up_at: now + self.settings.call_timeout,
                        hung_up: false,
                        media_sent: 0,
                        media_received: 0,
                        media_seq: 0,
                    },
                );
                outcomes.push(Outcome::Offered { at: now });
                out.push(Envelope {
                    request_id: 0,
                    body: Some(Body::Answer(Answer {
                        call_ref: c.call_ref,
                        media: Some(device_media()),
                    })),
                });
            }
            Some(Body::CallEvent(e)) => self.on_call_event(now, e, outcomes),
            Some(Body::Error(e)) => {
                let id = if e.request_id != 0 {
                    e.request_id
                } else {
                    env.request_id
                };
                if let Some(call_ref) = self.dials.get(&id).copied() {
                    self.finish(
                        now,
                        call_ref,
                        format!("error {}", error_name(e.code)),
                        outcomes,
                    );
                } else if let Some(sent) = self.texts.remove(&id) {
                    outcomes.push(Outcome::Text {
                        at: now,
                        latency: now.saturating_duration_since(sent),
                        delivered: false,
                        reason: format!("error {}", error_name(e.code)),
                    });
                }
            }
            Some(Body::TextStatus(t)) => {
                if let Some(sent) = self.texts.remove(&env.request_id) {
                    let delivered = (200..300).contains(&t.sip_status);
                    outcomes.push(Outcome::Text {
                        at: now,
                        latency: now.saturating_duration_since(sent),
                        delivered,
                        reason: t.sip_status.to_string(),
                    });
                }
            }
            _ => {}
        }
    }

    fn on_call_event(&mut self, now: Instant, e: &CallEvent, outcomes: &mut Vec<Outcome>) {
        let Ok(state) = CallState::try_from(e.state) else {
            return;
        };
        match state {
            CallState::Answered => {
                let hold = self.settings.hold;
                let Some(slot) = self.calls.get_mut(&e.call_ref) else {
                    return;
                };
                if slot.answered.is_some() {
                    return;
                }
                slot.answered = Some(now);
                if let Some(id) = slot.dial_request.take() {
                    self.dials.remove(&id);
                }
                if !hold.is_zero() {
                    slot.hangup_at = Some(now + hold);
                }
                outcomes.push(Outcome::Answered {
                    at: now,
                    setup: now.saturating_duration_since(slot.started),
                });
            }
            CallState::Ended if e.stats.is_none() || e.reason != "media statistics" => {
                self.finish(now, e.call_ref, end_description(e), outcomes);
            }
            _ => {}
        }
    }

    /// Counts a media frame that came back on `call_ref`.
    pub fn on_media(&mut self, call_ref: u32) {
        if let Some(slot) = self.calls.get_mut(&call_ref) {
            slot.media_received += 1;
        }
    }

    /// The answered calls that should send a media frame now, each with its next sequence
    /// number (counted as sent).
    pub fn media_due(&mut self, now: Instant) -> Vec<(u32, u16)> {
        if !self.settings.media {
            return Vec::new();
        }
        let mut due = Vec::new();
        for (call_ref, slot) in &mut self.calls {
            let quiet = slot
                .hangup_at
                .is_some_and(|at| now + MEDIA_QUIET_BEFORE_HANGUP >= at);
            if slot.answered.is_some() && !slot.hung_up && !quiet {
                due.push((*call_ref, slot.media_seq));
                slot.media_seq = slot.media_seq.wrapping_add(1);
                slot.media_sent += 1;
            }
        }
        due
    }

    /// Hangs up calls whose hold is over and gives up on calls past their time.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Envelope>, outcomes: &mut Vec<Outcome>) {
        let mut hangups = Vec::new();
        let mut expired = Vec::new();
        for (call_ref, slot) in &mut self.calls {
            if !slot.hung_up && slot.hangup_at.is_some_and(|at| now >= at) {
                slot.hung_up = true;
                // An answered call may take a while to end cleanly; allow a fresh timeout.
                slot.give_up_at = now + self.settings.call_timeout;
                hangups.push(*call_ref);
            } else if now >= slot.give_up_at {
                expired.push(*call_ref);
            }
        }
        for call_ref in hangups {
            out.push(Envelope {
                request_id: 0,
                body: Some(Body::Hangup(Hangup { call_ref })),
            });
        }
        for call_ref in expired {
            let answered = self
                .calls
                .get(&call_ref)
                .is_some_and(|s| s.answered.is_some());
            if !answered {
                out.push(Envelope {
                    request_id: 0,
                    body: Some(Body::Hangup(Hangup { call_ref })),
                });
            }
            let reason = if answered {
                "no end after hangup"
            } else {
                "timeout"
            };
            self.finish(now, call_ref, reason.into(), outcomes);
        }
        let timeout = self.settings.call_timeout;
        let late: Vec<u64> = self
            .texts
            .iter()
            .filter(|(_, sent)| now >= **sent + timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(sent) = self.texts.remove(&id) {
                outcomes.push(Outcome::Text {
                    at: now,
                    latency: now.saturating_duration_since(sent),
                    delivered: false,
                    reason: "timeout".into(),
                });
            }
        }
    }

    /// The next instant [`DeviceCalls::poll`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        let calls = self.calls.values().map(|s| match s.hangup_at {
            Some(at) if !s.hung_up => at.min(s.give_up_at),
            _ => s.give_up_at,
        });
        let texts = self
            .texts
            .values()
            .map(|sent| *sent + self.settings.call_timeout);
        calls.chain(texts).min()
    }

    /// The device resumed on a node that holds the calls in `live` (the new Welcome's
    /// `live_calls`; empty when the session was not resumed): those go on, every other call
    /// finishes with `reason`, and texts awaiting a status fail (their answers were lost with
    /// the old connection). A kept call the device had already hung up gets its `Hangup` again
    /// (the first may have gone to the lost node). Returns (kept, lost).
    pub fn keep_only(
        &mut self,
        now: Instant,
        live: &std::collections::HashSet<u32>,
        reason: &str,
        out: &mut Vec<Envelope>,
        outcomes: &mut Vec<Outcome>,
    ) -> (u64, u64) {
        let gone: Vec<u32> = self
            .calls
            .keys()
            .filter(|r| !live.contains(r))
            .copied()
            .collect();
        let kept = (self.calls.len() - gone.len()) as u64;
        for call_ref in &gone {
            self.finish(now, *call_ref, reason.to_string(), outcomes);
        }
        for (call_ref, slot) in &mut self.calls {
            if slot.hung_up {
                slot.give_up_at = now + self.settings.call_timeout;
                out.push(Envelope {
                    request_id: 0,
                    body: Some(Body::Hangup(Hangup {
                        call_ref: *call_ref,
                    })),
                });
            }
        }
        for (_, sent) in self.texts.drain() {
            outcomes.push(Outcome::Text {
                at: now,
                latency: now.saturating_duration_since(sent),
                delivered: false,
                reason: reason.to_string(),
            });
        }
        (kept, gone.len() as u64)
    }

    /// The connection is gone: every call and text still open fails with `reason`.
    pub fn fail_all(&mut self, now: Instant, reason: &str, outcomes: &mut Vec<Outcome>) {
        let refs: Vec<u32> = self.calls.keys().copied().collect();
        for call_ref in refs {
            self.finish(now, call_ref, reason.to_string(), outcomes);
        }
        for (_, sent) in self.texts.drain() {
            outcomes.push(Outcome::Text {
                at: now,
                latency: now.saturating_duration_since(sent),
                delivered: false,
                reason: reason.to_string(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thalamus_proto::v1::{Error as ErrorFrame, IncomingCall, TextStatus};

    fn settings(hold_ms: u64) -> CallSettings {
        CallSettings {
            hold: Duration::from_millis(hold_ms),
            call_timeout: Duration::from_secs(10),
            media: true,
        }
    }

    fn event(call_ref: u32, state: CallState, end: EndReason, sip_status: u32) -> Envelope {
        Envelope {
            request_id: 0,
            body: Some(Body::CallEvent(CallEvent {
                call_ref,
                state: state as i32,
                end_reason: end as i32,
                sip_status,
                ..Default::default()
            })),
        }
    }

    /// Ids as the SDK session would hand them out.
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1_000);

    /// A call placed as the session would: the `Dial` it sent.
    fn dial(d: &mut DeviceCalls, now: Instant) -> Envelope {
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let call_ref = u32::try_from(id).unwrap();
        d.dialed(now, call_ref, id);
        Envelope {
            request_id: id,
            body: Some(Body::Dial(thalamus_proto::v1::Dial {
                call_ref,
                ..Default::default()
            })),
        }
    }

    /// A text sent as the session would, unless too many are pending.
    fn text(d: &mut DeviceCalls, now: Instant) -> Option<Envelope> {
        if !d.may_text() {
            return None;
        }
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        d.texted(now, id);
        Some(Envelope {
            request_id: id,
            body: None,
        })
    }

    fn dial_ref(env: &Envelope) -> u32 {
        match &env.body {
            Some(Body::Dial(d)) => d.call_ref,
            other => panic!("not a dial: {other:?}"),
        }
    }

    #[test]
    fn answered_call_is_hung_up_after_the_hold_and_finishes_once() {
        let t0 = Instant::now();
        let mut d = DeviceCalls::new(settings(500));
        let dial = dial(&mut d, t0);
        let call_ref = dial_ref(&dial);
        let (mut out, mut outcomes) = (Vec::new(), Vec::new());
        let t1 = t0 + Duration::from_millis(3);
        d.on_frame(
            t1,
            &event(call_ref, CallState::Ringing, EndReason::Unspecified, 180),
            &mut out,
            &mut outcomes,
        );
        assert!(outcomes.is_empty());
        d.on_frame(
            t1,
            &event(call_ref, CallState::Answered, EndReason::Unspecified, 200),
            &mut out,
            &mut outcomes,
        );
        assert_eq!(
            outcomes,
            vec![Outcome::Answered {
                at: t1,
                setup: Duration::from_millis(3)
            }]
        );
        assert_eq!(d.next_deadline(), Some(t1 + Duration::from_millis(500)));
        // Media flows until 100 ms before the hangup.
        assert_eq!(d.media_due(t1), vec![(call_ref, 0)]);
        assert_eq!(
            d.media_due(t1 + Duration::from_millis(20)),
            vec![(call_ref, 1)]
        );
        assert!(d.media_due(t1 + Duration::from_millis(450)).is_empty());
        d.on_media(call_ref);
        d.poll(t1 + Duration::from_millis(499), &mut out, &mut outcomes);
        assert!(out.is_empty());
        d.poll(t1 + Duration::from_millis(500), &mut out, &mut outcomes);
        assert_eq!(
            out,
            vec![Envelope {
                request_id: 0,
                body: Some(Body::Hangup(Hangup { call_ref }))
            }]
        );
        let t2 = t1 + Duration::from_millis(501);
        d.on_frame(
            t2,
            &event(call_ref, CallState::Ended, EndReason::LocalHangup, 0),
            &mut out,
            &mut outcomes,
        );
        assert_eq!(
            outcomes.last(),
            Some(&Outcome::Finished {
                at: t2,
                answered: true,
                reason: "local_hangup".into(),
                media_sent: 2,
                media_received: 1
            })
        );
        assert_eq!(d.calls_in_progress(), 0);
        // A repeated end is ignored.
        d.on_frame(
            t2,
            &event(call_ref, CallState::Ended, EndReason::LocalHangup, 0),
            &mut out,
            &mut outcomes,
        );
        assert_eq!(outcomes.len(), 2);
    }

    #[test]
    fn failures_carry_the_reason_and_status() {
        let t0 = Instant::now();
        let mut d = DeviceCalls::new(settings(0));
        let (mut out, mut outcomes) = (Vec::new(), Vec::new());
        let busy = dial_ref(&dial(&mut d, t0));
        d.on_frame(
            t0,
            &event(busy, CallState::Ended, EndReason::Busy, 486),
            &mut out,
            &mut outcomes,
        );
        let refused = dial(&mut d, t0);
        d.on_frame(
            t0,
            &Envelope {
                request_id: refused.request_id,
                body: Some(Body::Error(ErrorFrame {
                    code: ErrorCode::LimitExceeded as i32,
                    message: "at most 4".into(),
                    request_id: refused.request_id,
                })),
            },
            &mut out,
            &mut outcomes,
        );
        let reasons: Vec<(bool, String)> = outcomes
            .iter()
            .map(|o| match o {
                Outcome::Finished {
                    answered, reason, ..
                } => (*answered, reason.clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            reasons,
            vec![
                (false, "busy 486".to_string()),
                (false, "error limit_exceeded".to_string())
            ]
        );
        assert_ne!(busy, dial_ref(&refused), "call refs are not reused");
    }

    #[test]
    fn unanswered_calls_time_out_with_a_hangup() {
        let t0 = Instant::now();
        let mut d = DeviceCalls::new(settings(1000));
        let call_ref = dial_ref(&dial(&mut d, t0));
        let (mut out, mut outcomes) = (Vec::new(), Vec::new());
        assert_eq!(d.next_deadline(), Some(t0 + Duration::from_secs(10)));
        d.poll(t0 + Duration::from_secs(10), &mut out, &mut outcomes);
        assert_eq!(out.len(), 1);
        assert!(matches!(
            &outcomes[..],
            [Outcome::Finished { answered: false, reason, .. }] if reason == "timeout"
        ));
        // The late end of that call is not counted again.
        d.on_frame(
            t0 + Duration::from_secs(11),
            &event(call_ref, CallState::Ended, EndReason::Cancelled, 487),
            &mut out,
            &mut outcomes,
        );
        assert_eq!(outcomes.len(), 1);
    }

    #[test]
    fn incoming_calls_are_answered() {
        let t0 = Instant::now();
        let mut d = DeviceCalls::new(settings(0));
        let (mut out, mut outcomes) = (Vec::new(), Vec::new());
        d.on_frame(
            t0,
            &Envelope {
                request_id: 0,
                body: Some(Body::IncomingCall(IncomingCall {
                    call_ref: 77,
                    ..Default::default()
                })),
            },
            &mut out,
            &mut outcomes,
        );
        assert!(
            matches!(&out[..], [Envelope { body: Some(Body::Answer(a)), .. }] if a.call_ref == 77)
        );
        let t1 = t0 + Duration::from_millis(2);
        d.on_frame(
            t1,
            &event(77, CallState::Answered, EndReason::Unspecified, 0),
            &mut out,
            &mut outcomes,
        );
        // Hold zero: the device waits for the caller's hangup.
        d.poll(t1 + Duration::from_secs(5), &mut out, &mut outcomes);
        assert_eq!(out.len(), 1);
        d.on_frame(
            t1,
            &event(77, CallState::Ended, EndReason::RemoteHangup, 0),
            &mut out,
            &mut outcomes,
        );
        assert!(matches!(
            &outcomes[..],
            [Outcome::Offered { .. }, Outcome::Answered { setup, .. }, Outcome::Finished { answered: true, reason, .. }]
                if *setup == Duration::from_millis(2) && reason == "remote_hangup"
        ));
    }

    #[test]
    fn texts_report_status_latency_and_connection_loss() {
        let t0 = Instant::now();
        let mut d = DeviceCalls::new(settings(0));
        let (mut out, mut outcomes) = (Vec::new(), Vec::new());
        let sent = text(&mut d, t0).unwrap();
        d.on_frame(
            t0 + Duration::from_millis(4),
            &Envelope {
                request_id: sent.request_id,
                body: Some(Body::TextStatus(TextStatus {
                    sip_status: 200,
                    delivered: true,
                    ..Default::default()
                })),
            },
            &mut out,
            &mut outcomes,
        );
        assert!(matches!(
            &outcomes[..],
            [Outcome::Text { delivered: true, latency, .. }] if *latency == Duration::from_millis(4)
        ));
        text(&mut d, t0).unwrap();
        dial(&mut d, t0);
        d.fail_all(t0, "connection lost", &mut outcomes);
        assert_eq!(outcomes.len(), 3);
        assert_eq!(d.calls_in_progress(), 0);
        assert_eq!(d.next_deadline(), None);
    }

    #[test]
    fn a_resumed_device_keeps_the_calls_its_new_node_holds_and_hangs_them_up_later() {
        let t0 = Instant::now();
        let mut d = DeviceCalls::new(settings(500));
        let (mut out, mut outcomes) = (Vec::new(), Vec::new());
        let answered = dial_ref(&dial(&mut d, t0));
        let ringing = dial_ref(&dial(&mut d, t0));
        d.on_frame(
            t0,
            &event(answered, CallState::Answered, EndReason::Unspecified, 200),
            &mut out,
            &mut outcomes,
        );
        let _ = text(&mut d, t0);
        outcomes.clear();
        // The node died; the survivor resumed the session with the answered call only.
        let t1 = t0 + Duration::from_millis(100);
        let live = std::collections::HashSet::from([answered]);
        assert_eq!(
            d.keep_only(t1, &live, "lost with its node", &mut out, &mut outcomes),
            (1, 1)
        );
        assert!(out.is_empty(), "nothing hung up yet: {out:?}");
        assert_eq!(outcomes.len(), 2, "{outcomes:?}");
        assert!(outcomes.iter().any(|o| matches!(o,
            Outcome::Finished { answered: false, reason, .. } if reason == "lost with its node")));
        assert!(outcomes.iter().any(|o| matches!(
            o,
            Outcome::Text {
                delivered: false,
                ..
            }
        )));
        assert_eq!(d.calls_in_progress(), 1);
        // The kept call is still hung up when its hold ends, and finishes once.
        outcomes.clear();
        d.poll(t0 + Duration::from_millis(500), &mut out, &mut outcomes);
        assert!(out.iter().any(|e| matches!(&e.body,
            Some(Body::Hangup(Hangup { call_ref })) if *call_ref == answered)));
        assert!(!out.iter().any(|e| matches!(&e.body,
            Some(Body::Hangup(Hangup { call_ref })) if *call_ref == ringing)));
        // That Hangup went to a node that died: resumed again, the device sends it again.
        out.clear();
        assert_eq!(
            d.keep_only(t1, &live, "lost with its node", &mut out, &mut outcomes),
            (1, 0)
        );
        assert_eq!(
            out,
            vec![Envelope {
                request_id: 0,
                body: Some(Body::Hangup(Hangup { call_ref: answered }))
            }]
        );
        d.on_frame(
            t1,
            &event(answered, CallState::Ended, EndReason::LocalHangup, 0),
            &mut out,
            &mut outcomes,
        );
        assert_eq!(d.calls_in_progress(), 0);
        // Not resumed: nothing is kept.
        let mut d = DeviceCalls::new(settings(500));
        let _ = dial(&mut d, t0);
        let mut outcomes = Vec::new();
        assert_eq!(
            d.keep_only(
                t1,
                &std::collections::HashSet::new(),
                "lost",
                &mut out,
                &mut outcomes
            ),
            (0, 1)
        );
    }
}
