//! DTMF as RFC 4733 telephone-events on the device link: the event code of a digit and back,
//! and the datagrams (media header + telephone-event payload, payload type 101, 8 kHz clock) of
//! one key press, so a `Dtmf` request can enter the relay as if the device had sent it.
//!
//! Sans-IO. It does not choose between RFC 4733 and SIP INFO (the call does, from what was
//! negotiated) and does not send anything.

use bytes::Bytes;

/// The RFC 4733 event code of a DTMF digit.
pub fn event_code(digit: &str) -> Option<u8> {
    match digit {
        "*" => Some(10),
        "#" => Some(11),
        "A" => Some(12),
        "B" => Some(13),
        "C" => Some(14),
        "D" => Some(15),
        d if d.len() == 1 => d.parse::<u8>().ok(),
        _ => None,
    }
}

/// The digit of an RFC 4733 event code.
pub fn digit(code: u8) -> Option<&'static str> {
    const DIGITS: [&str; 16] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "*", "#", "A", "B", "C", "D",
    ];
    DIGITS.get(usize::from(code)).copied()
}

/// The device-link datagrams of one RFC 4733 event (payload type 101, 8 kHz): an update every
/// 50 ms while it lasts, then three end packets, all with the event's start timestamp.
pub fn datagrams(call_ref: u32, digit: &str, duration_ms: u32, timestamp: &mut u32) -> Vec<Bytes> {
    let Some(event) = event_code(digit) else {
        return Vec::new();
    };
    let duration_ms = if duration_ms == 0 {
        100
    } else {
        duration_ms.min(5_000)
    };
    let total = u16::try_from(duration_ms * 8).unwrap_or(u16::MAX);
    let start = *timestamp;
    *timestamp = timestamp.wrapping_add(u32::from(total) + 400);
    let mut steps: Vec<(u16, bool)> = (1u16..)
        .map(|i| i.saturating_mul(400).min(total))
        .take_while(|d| *d < total)
        .map(|d| (d, false))
        .collect();
    steps.extend([(total, true); 3]);
    steps
        .into_iter()
        .enumerate()
        .filter_map(|(i, (duration, end))| {
            let payload = crate::rtp::TelephoneEvent {
                event,
                end,
                volume: 10,
                duration,
            }
            .to_bytes();
            thalamus_proto::media::MediaHeader {
                marker: i == 0,
                payload_type: 101,
                sequence: 0,
                timestamp: start,
                call_ref,
                stream_id: thalamus_proto::media::StreamId::AUDIO,
            }
            .to_bytes(&payload)
            .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_and_event_codes() {
        for (key, code) in [
            ("0", 0),
            ("9", 9),
            ("*", 10),
            ("#", 11),
            ("A", 12),
            ("D", 15),
        ] {
            assert_eq!(event_code(key), Some(code));
            assert_eq!(digit(code), Some(key));
        }
        assert_eq!(event_code("E"), None);
        assert_eq!(event_code("10"), None);
        assert_eq!(digit(16), None);
    }

    #[test]
    fn an_event_is_updates_then_three_ends_on_one_timestamp() {
        let mut ts = 1000;
        let packets = datagrams(7, "5", 100, &mut ts);
        // 100 ms = 800 units: one update at 400, then three ends at 800.
        assert_eq!(packets.len(), 4);
        let decoded: Vec<_> = packets
            .iter()
            .map(|p| thalamus_proto::media::MediaDatagram::decode(p.clone()).unwrap())
            .collect();
        assert!(decoded
            .iter()
            .all(|d| d.header.timestamp == 1000 && d.header.payload_type == 101));
        assert!(decoded[0].header.marker);
        let events: Vec<_> = decoded
            .iter()
            .map(|d| crate::rtp::TelephoneEvent::parse(&d.payload).unwrap())
            .collect();
        assert_eq!(events[0].event, 5);
        assert!(!events[0].end);
        assert_eq!(events[0].duration, 400);
        assert!(events[1..].iter().all(|e| e.end && e.duration == 800));
        assert!(ts > 1800, "the next event starts after this one");
        assert!(datagrams(7, "x", 100, &mut ts).is_empty());
    }
}
