//! Fuzz target `digest_params`: arbitrary text as the value of a WWW-Authenticate /
//! Proxy-Authenticate header (digest `Challenge::parse`, `parse_challenges`,
//! `select_challenge`) and of an Authorization header (digest `Credentials::parse`), plus the
//! message layer's generic auth syntax (`message::Challenge` / `message::Credentials`).
//!
//! Checks: nothing panics; a parsed challenge or credentials value whose fields carry no control
//! characters (the formatter drops those, as a header cannot carry them) formats to text that
//! parses back equal; a DigestServer never accepts credentials it did not issue the nonce for;
//! credentials a client computes for any parsed challenge format to text that parses back equal.
//! It does not check digest arithmetic (the RFC test vectors in sip/src/digest do).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use thalamus_sip::digest::{
    answer_challenge, parse_challenges, select_challenge, Challenge, Credentials, DigestClient,
    DigestRequest, DigestServer, DigestServerConfig, UserSecret, MAX_HEADER_VALUE_LEN,
};
use thalamus_sip::message;

const NOW: u64 = 1_700_000_000;

fn server() -> Option<&'static DigestServer> {
    static SERVER: OnceLock<Option<DigestServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            DigestServer::new(DigestServerConfig::new("example.com", *b"0123456789abcdef")).ok()
        })
        .as_ref()
}

/// What the formatter writes unchanged (it drops control characters other than tab).
fn safe(value: &str) -> bool {
    !value.chars().any(|c| c.is_control() && c != '\t')
}

fn safe_opt(value: &Option<String>) -> bool {
    value.as_deref().is_none_or(safe)
}

fn challenge_round_trip(c: &Challenge) {
    if !(safe(&c.realm) && safe(&c.nonce) && safe_opt(&c.opaque) && safe_opt(&c.domain)) {
        return;
    }
    let text = c.to_string();
    if text.len() <= MAX_HEADER_VALUE_LEN {
        assert_eq!(
            Challenge::parse(&text).as_ref(),
            Ok(c),
            "challenge round trip: {text:?}"
        );
    }
}

fn credentials_round_trip(c: &Credentials) {
    let fields = [&c.username, &c.realm, &c.nonce, &c.uri, &c.response];
    if !(fields.iter().all(|f| safe(f)) && safe_opt(&c.cnonce) && safe_opt(&c.opaque)) {
        return;
    }
    let text = c.to_string();
    if text.len() <= MAX_HEADER_VALUE_LEN {
        assert_eq!(
            Credentials::parse(&text).as_ref(),
            Ok(c),
            "credentials round trip: {text:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let value = String::from_utf8_lossy(data);
    let value = value.as_ref();
    let request = DigestRequest::new("REGISTER", "sip:example.com");

    if let Ok(challenge) = Challenge::parse(value) {
        let _ = (challenge.effective_algorithm(), challenge.is_answerable());
        challenge_round_trip(&challenge);
        if let Ok(creds) = answer_challenge(&challenge, "alice", "pw", &request, "0a4f113b", 1) {
            credentials_round_trip(&creds);
        }
    }
    for challenge in parse_challenges([value, value]).into_iter().flatten() {
        challenge_round_trip(&challenge);
    }
    if let Ok(best) = select_challenge([value]) {
        assert!(best.is_answerable(), "selected an unanswerable challenge");
    }
    let mut client = DigestClient::new("alice", "pw");
    if let Ok(creds) = client.respond_to_headers([value], &request) {
        let _ = client.authorize_again(&request);
        // The cnonce is random hex and the rest came from a parsed challenge.
        let _ = creds.to_string();
    }

    if let Ok(creds) = Credentials::parse(value) {
        let _ = creds.effective_algorithm();
        credentials_round_trip(&creds);
        if let Some(server) = server() {
            for secret in [UserSecret::Password("pw"), UserSecret::Ha1("00")] {
                assert!(
                    server.verify(&creds, &request, secret, NOW).is_err(),
                    "accepted credentials with a nonce it never issued"
                );
            }
        }
    }

    if let Ok(list) = message::Challenge::parse_list(value) {
        for c in &list {
            let _ = (c.is_scheme("digest"), c.param("realm"), c.to_string());
        }
    }
    if let Ok(list) = message::Credentials::parse_list(value) {
        for c in &list {
            let _ = (c.is_scheme("digest"), c.param("username"), c.to_string());
        }
    }
});
