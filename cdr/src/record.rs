//! The record of one call ([`CallRecord`], schema [`SCHEMA_VERSION`]) and its JSON form. It
//! holds data only; the writer keeps it and the bridge fills it.

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The schema of the records this build writes (the `v` field).
pub const SCHEMA_VERSION: u32 = 1;

/// Who placed the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The device called SIP.
    Outgoing,
    /// SIP called the device.
    Incoming,
}

/// The media of the call as the relay on the last owner saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaSummary {
    /// RTP packets sent to the peer.
    pub packets_sent: u64,
    /// RTP packets received from the peer.
    pub packets_received: u64,
    /// RTP packets from the peer that never arrived (by sequence number).
    pub packets_lost: u64,
    /// Interarrival jitter of the peer's stream, microseconds.
    pub jitter_us: u64,
}

/// One call, as billed. Times are RFC 3339 in UTC with milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub v: u32,
    /// The SIP Call-ID (absent when no dialog was ever set up).
    pub call_id: Option<String>,
    /// The device.
    pub device: String,
    /// The device's reference for the call.
    pub call_ref: u32,
    /// Who placed it.
    pub direction: Direction,
    /// The SIP party (callee of an outgoing call, caller of an incoming one).
    pub peer: String,
    /// When the call started (first owner's clock).
    pub start: String,
    /// When it was answered (absent: never answered).
    pub answer: Option<String>,
    /// When it ended.
    pub end: String,
    /// Answered time, ms (0 when never answered).
    pub duration_ms: u64,
    /// How it ended (`remote_hangup`, `local_hangup`, `busy`, `no_answer`, `rejected`,
    /// `cancelled`, `not_found`, `unavailable`, `timeout`, `incompatible_media`,
    /// `media_timeout`, `failed`, `normal`, `unspecified`).
    pub end_reason: String,
    /// The SIP status that ended the set-up (absent when none did).
    pub sip_status: Option<u16>,
    /// The reason text the device was given.
    pub reason: String,
    /// Every node that owned the call, in order; the last one wrote this record.
    pub nodes: Vec<String>,
    /// Whether the call was taken over from a node that died or left.
    pub taken_over: bool,
    /// Media figures (absent when the call had no relay).
    pub media: Option<MediaSummary>,
}

impl CallRecord {
    /// `ms` since the Unix epoch as RFC 3339, UTC, milliseconds.
    pub fn time(ms: u64) -> String {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    }

    /// One JSON line (no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_json_object_with_utc_millisecond_times() {
        let r = CallRecord {
            v: SCHEMA_VERSION,
            call_id: Some("abc@host".into()),
            device: "earpiece-1".into(),
            call_ref: 7,
            direction: Direction::Outgoing,
            peer: "sip:bob@example.com".into(),
            start: CallRecord::time(1_800_000_000_123),
            answer: None,
            end: CallRecord::time(1_800_000_001_000),
            duration_ms: 0,
            end_reason: "busy".into(),
            sip_status: Some(486),
            reason: "Busy Here".into(),
            nodes: vec!["node-1".into()],
            taken_over: false,
            media: None,
        };
        let line = r.to_json();
        assert!(!line.contains('\n'));
        assert!(
            line.contains("\"start\":\"2027-01-15T08:00:00.123Z\""),
            "{line}"
        );
        assert!(line.contains("\"direction\":\"outgoing\""), "{line}");
        let back: CallRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
    }
}
