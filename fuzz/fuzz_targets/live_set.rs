//! Fuzz target `live_set`: arbitrary bytes as a balancer's live-set report
//! (`LiveSetReport::decode`), without a secret, with the node's secret and with a wrong one, and
//! the same bytes sealed with a valid MAC so that the JSON decoding behind the HMAC check runs;
//! a decoded report becomes a `LiveSet` whose owner lookup runs.
//!
//! Checks: nothing panics; with a valid MAC, decoding with the secret gives the same result as
//! decoding without one, and a wrong secret gives `BadMac`; a decoded report re-encodes (with
//! the secret) to a datagram that decodes to an equal report; the owner of a key is one of the
//! eligible nodes, exists whenever one is eligible, and does not depend on their order. It does
//! not check which node should own a key (the ownership crate's tests do).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;
use thalamus_fuzz::{seal, OTHER_SECRET, SECRET};
use thalamus_ownership::heartbeat::MAX_REPORT_BYTES;
use thalamus_ownership::{HeartbeatError, LiveSet, LiveSetReport};

fn round_trip(report: &LiveSetReport) {
    let sealed = report.encode(Some(SECRET));
    if sealed.len() > MAX_REPORT_BYTES {
        assert_eq!(
            LiveSetReport::decode(&sealed, Some(SECRET)),
            Err(HeartbeatError::TooLarge)
        );
        return;
    }
    assert_eq!(
        LiveSetReport::decode(&sealed, Some(SECRET)).as_ref(),
        Ok(report),
        "report changed in a round trip"
    );
    assert_eq!(
        LiveSetReport::decode(&sealed, Some(OTHER_SECRET)),
        Err(HeartbeatError::BadMac)
    );
}

fn owners(report: &LiveSetReport) {
    let from = SocketAddr::from((Ipv4Addr::LOCALHOST, 7000));
    let set = LiveSet {
        received: Instant::now(),
        from,
        eligible: report.eligible.clone(),
        alive: (report.silence_ms > 0).then(|| report.alive.clone()),
        settled: report.up_ms >= report.silence_ms,
        store_down: report.store_down.clone(),
    };
    // Whoever asks, the answer needs another alive node the report does not list as cut off.
    for n in set.alive.iter().flatten() {
        if set.store_reached_by_another(n) {
            assert!(set
                .alive
                .iter()
                .flatten()
                .any(|o| o != n && !set.store_down.contains(o)));
        }
    }
    let mut reversed = set.clone();
    reversed.eligible.reverse();
    for key in ["device-1", "earpiece-42", ""] {
        let owner = set.owner(key);
        assert_eq!(owner.is_some(), !set.eligible.is_empty(), "no owner");
        if let Some(n) = owner {
            assert!(set.eligible.contains(n), "owner not eligible");
        }
        assert_eq!(
            owner.map(|n| &n.node),
            reversed.owner(key).map(|n| &n.node),
            "owner depends on order"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let open = LiveSetReport::decode(data, None);
    if let Ok(report) = &open {
        round_trip(report);
        owners(report);
    }
    if let Ok(report) = LiveSetReport::decode(data, Some(SECRET)) {
        assert_eq!(
            open.as_ref().ok(),
            Some(&report),
            "MAC check changed the decoding"
        );
    }
    let _ = LiveSetReport::decode(data, Some(OTHER_SECRET));

    let sealed = seal(data, SECRET);
    if sealed.len() <= MAX_REPORT_BYTES {
        let with = LiveSetReport::decode(&sealed, Some(SECRET));
        let without = LiveSetReport::decode(&sealed, None);
        assert_eq!(with, without, "a valid MAC changed the decoding");
        assert_eq!(
            LiveSetReport::decode(&sealed, Some(OTHER_SECRET)),
            Err(HeartbeatError::BadMac)
        );
    }
});
