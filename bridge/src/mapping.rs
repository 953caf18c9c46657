//! The mapping between SIP statuses and MBFP call events, as docs/protocol.md section 9
//! specifies it. Pure functions; the bridge calls them.

use thalamus_proto::v1::{CallEvent, CallState, EndReason};

/// The MBFP end reason for a final SIP status that ended a call (4xx-6xx).
pub fn end_reason_for_status(status: u16) -> EndReason {
    match status {
        486 | 600 => EndReason::Busy,
        480 => EndReason::Unavailable,
        408 => EndReason::Timeout,
        404 | 484 => EndReason::NotFound,
        603 => EndReason::Rejected,
        487 => EndReason::Cancelled,
        488 | 415 => EndReason::IncompatibleMedia,
        _ => EndReason::Failed,
    }
}

/// The call state a provisional response reports: 180 ringing, 183 (or any 1xx with a body)
/// early media, other 1xx trying.
pub fn state_for_provisional(status: u16, has_body: bool) -> CallState {
    match status {
        180 if !has_body => CallState::Ringing,
        180 | 183 => CallState::EarlyMedia,
        181 | 182 if !has_body => CallState::Ringing,
        _ if has_body => CallState::EarlyMedia,
        _ => CallState::Trying,
    }
}

/// A `CallEvent` for `call_ref` in `state` caused by SIP `status` with `reason`.
pub fn call_event(call_ref: u32, state: CallState, status: u16, reason: &str) -> CallEvent {
    CallEvent {
        call_ref,
        state: state as i32,
        sip_status: u32::from(status),
        reason: reason.to_string(),
        ..Default::default()
    }
}

/// The `CallEvent{ENDED}` for a call that failed with final status `status`.
pub fn ended_by_status(call_ref: u32, status: u16, reason: &str) -> CallEvent {
    CallEvent {
        end_reason: end_reason_for_status(status) as i32,
        ..call_event(call_ref, CallState::Ended, status, reason)
    }
}

/// The `CallEvent{ENDED}` for a call that ended without a SIP status (BYE, hangup, timeouts).
pub fn ended_by(call_ref: u32, end_reason: EndReason, reason: &str) -> CallEvent {
    CallEvent {
        end_reason: end_reason as i32,
        ..call_event(call_ref, CallState::Ended, 0, reason)
    }
}

/// The SIP status a device's `Reject` maps to: its own 4xx-6xx status, else 486 Busy Here.
pub fn reject_status(requested: u32) -> u16 {
    u16::try_from(requested)
        .ok()
        .filter(|s| (400..=699).contains(s))
        .unwrap_or(486)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_of_protocol_md_section_9() {
        let cases = [
            (486, EndReason::Busy),
            (600, EndReason::Busy),
            (480, EndReason::Unavailable),
            (408, EndReason::Timeout),
            (404, EndReason::NotFound),
            (484, EndReason::NotFound),
            (603, EndReason::Rejected),
            (487, EndReason::Cancelled),
            (488, EndReason::IncompatibleMedia),
            (415, EndReason::IncompatibleMedia),
            (403, EndReason::Failed),
            (500, EndReason::Failed),
            (503, EndReason::Failed),
            (699, EndReason::Failed),
        ];
        for (status, reason) in cases {
            assert_eq!(end_reason_for_status(status), reason, "{status}");
            let ev = ended_by_status(7, status, "x");
            assert_eq!(ev.end_reason, reason as i32);
            assert_eq!(ev.sip_status, u32::from(status));
            assert_eq!(ev.state, CallState::Ended as i32);
        }
    }

    #[test]
    fn provisional_states() {
        assert_eq!(state_for_provisional(100, false), CallState::Trying);
        assert_eq!(state_for_provisional(180, false), CallState::Ringing);
        assert_eq!(state_for_provisional(180, true), CallState::EarlyMedia);
        assert_eq!(state_for_provisional(183, true), CallState::EarlyMedia);
        assert_eq!(state_for_provisional(183, false), CallState::EarlyMedia);
    }

    #[test]
    fn reject_statuses() {
        assert_eq!(reject_status(0), 486);
        assert_eq!(reject_status(603), 603);
        assert_eq!(reject_status(200), 486);
        assert_eq!(reject_status(70_000), 486);
    }
}
