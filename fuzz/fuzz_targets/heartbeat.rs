//! Fuzz target `heartbeat`: arbitrary bytes as a node's heartbeat datagram
//! (`Heartbeat::decode`), without a secret, with the balancer's secret and with a wrong one, and
//! the same bytes sealed with a valid MAC so that the JSON decoding behind the HMAC check runs.
//!
//! Checks: nothing panics; with a valid MAC, decoding with the secret gives the same result as
//! decoding without one, and a wrong secret gives `BadMac`; whatever the secret accepts, no
//! secret accepts too; a decoded heartbeat re-encodes (with the secret) to a datagram that
//! decodes to the same heartbeat (the CPU figure within one f32 step), and an unauthenticated
//! encoding is refused by a balancer with a secret. It does not check liveness decisions (the
//! balancer's membership tests do).
#![no_main]

use libfuzzer_sys::fuzz_target;
use thalamus_fuzz::{close_f32, seal, OTHER_SECRET, SECRET};
use thalamus_ownership::heartbeat::{check_fresh, MAX_HEARTBEAT_BYTES};
use thalamus_ownership::{Heartbeat, HeartbeatError};

const NOW_MS: u64 = 1_700_000_000_000;

fn same(a: &Heartbeat, b: &Heartbeat) -> bool {
    let mut b_cpu = b.clone();
    b_cpu.load.cpu = a.load.cpu;
    close_f32(a.load.cpu, b.load.cpu) && *a == b_cpu
}

fn round_trip(hb: &Heartbeat) {
    let _ = check_fresh(hb.ts_ms, NOW_MS, 30_000);
    let sealed = hb.encode(Some(SECRET));
    if sealed.len() > MAX_HEARTBEAT_BYTES {
        assert_eq!(
            Heartbeat::decode(&sealed, Some(SECRET)),
            Err(HeartbeatError::TooLarge)
        );
        return;
    }
    match Heartbeat::decode(&sealed, Some(SECRET)) {
        Ok(again) => assert!(same(hb, &again), "heartbeat changed: {hb:?} -> {again:?}"),
        Err(e) => panic!("a re-encoded heartbeat does not decode: {e}"),
    }
    assert_eq!(
        Heartbeat::decode(&sealed, Some(OTHER_SECRET)),
        Err(HeartbeatError::BadMac)
    );
    let plain = hb.encode(None);
    if plain.len() <= MAX_HEARTBEAT_BYTES {
        assert_eq!(
            Heartbeat::decode(&plain, Some(SECRET)),
            Err(HeartbeatError::Unauthenticated)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let open = Heartbeat::decode(data, None);
    if let Ok(hb) = &open {
        let _ = hb.load.cpu.is_finite();
        round_trip(hb);
    }
    if let Ok(hb) = Heartbeat::decode(data, Some(SECRET)) {
        assert_eq!(
            open.as_ref().ok(),
            Some(&hb),
            "MAC check changed the decoding"
        );
    }
    let _ = Heartbeat::decode(data, Some(OTHER_SECRET)).map_err(|e| e.label());

    let sealed = seal(data, SECRET);
    if sealed.len() <= MAX_HEARTBEAT_BYTES {
        let with = Heartbeat::decode(&sealed, Some(SECRET));
        let without = Heartbeat::decode(&sealed, None);
        assert_eq!(with, without, "a valid MAC changed the decoding");
        assert_eq!(
            Heartbeat::decode(&sealed, Some(OTHER_SECRET)),
            Err(HeartbeatError::BadMac)
        );
    }
});
