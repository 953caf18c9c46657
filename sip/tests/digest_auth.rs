//! Digest authentication through the public API: client and server talking through header
//! strings, as they would through SIP messages, and parsers fed arbitrary input.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use thalamus_sip::digest::{
    compute_ha1, parse_challenges, select_challenge, Algorithm, Challenge, Credentials,
    DigestClient, DigestError, DigestRequest, DigestServer, DigestServerConfig, UserSecret,
    VerifyError,
};

const SECRET: [u8; 32] = *b"cluster-wide-secret-0123456789ab";
const T0: u64 = 1_750_000_000;

fn server_with(algorithms: Vec<Algorithm>) -> DigestServer {
    let mut config = DigestServerConfig::new("sip.example.net", SECRET);
    config.algorithms = algorithms;
    DigestServer::new(config).unwrap()
}

/// What a 401 would carry: one header value per challenge.
fn www_authenticate(server: &DigestServer, now: u64, stale: bool) -> Vec<String> {
    server
        .challenges(now, stale)
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn register_round_trip_through_header_strings() {
    let node_a = server_with(vec![Algorithm::Sha256, Algorithm::Md5]);
    // Another cluster node with the same secret verifies what node A issued.
    let node_b = server_with(vec![Algorithm::Sha256, Algorithm::Md5]);
    let mut client = DigestClient::new("device-42", "s3cret");
    let request = DigestRequest::new("REGISTER", "sip:sip.example.net");

    let headers = www_authenticate(&node_a, T0, false);
    let authorization = client
        .respond_to_headers(headers.iter().map(String::as_str), &request)
        .unwrap()
        .to_string();
    assert!(authorization.contains("algorithm=SHA-256"));

    let credentials = Credentials::parse(&authorization).unwrap();
    let verified = node_b
        .verify(
            &credentials,
            &request,
            UserSecret::Password("s3cret"),
            T0 + 5,
        )
        .unwrap();
    assert_eq!(verified.username, "device-42");
    assert_eq!(verified.algorithm, Algorithm::Sha256);
    assert_eq!(verified.nonce_count, Some(1));

    // A refresh reuses the nonce with nc=2.
    let refresh = client
        .authorize_again(&request)
        .unwrap()
        .unwrap()
        .to_string();
    let credentials = Credentials::parse(&refresh).unwrap();
    assert_eq!(credentials.nonce_count, Some(2));
    assert!(node_b
        .verify(
            &credentials,
            &request,
            UserSecret::Password("s3cret"),
            T0 + 60
        )
        .is_ok());
}

#[test]
fn md5_only_server_and_precomputed_ha1() {
    let server = server_with(vec![Algorithm::Md5]);
    let mut client = DigestClient::new("bob", "pw");
    let request = DigestRequest::new("INVITE", "sip:alice@sip.example.net");
    let headers = www_authenticate(&server, T0, false);
    let authorization = client
        .respond_to_headers(headers.iter().map(String::as_str), &request)
        .unwrap()
        .to_string();
    let credentials = Credentials::parse(&authorization).unwrap();
    assert_eq!(credentials.effective_algorithm(), Algorithm::Md5);
    let ha1 = compute_ha1(Algorithm::Md5, "bob", "sip.example.net", "pw");
    assert!(server
        .verify(&credentials, &request, UserSecret::Ha1(&ha1), T0)
        .is_ok());
}

#[test]
fn expired_nonce_gets_stale_challenge_then_succeeds() {
    let server = server_with(vec![Algorithm::Sha256]);
    let mut client = DigestClient::new("dev", "pw");
    let request = DigestRequest::new("REGISTER", "sip:sip.example.net");
    let headers = www_authenticate(&server, T0, false);
    client
        .respond_to_headers(headers.iter().map(String::as_str), &request)
        .unwrap();

    // An hour later the client reuses the old nonce.
    let later = T0 + 3600;
    let old = client.authorize_again(&request).unwrap().unwrap();
    let err = server
        .verify(&old, &request, UserSecret::Password("pw"), later)
        .unwrap_err();
    assert_eq!(err, VerifyError::StaleNonce);

    let stale_headers = www_authenticate(&server, later, err.is_stale());
    let challenge = select_challenge(stale_headers.iter().map(String::as_str)).unwrap();
    assert!(challenge.stale);
    let fresh = client.respond(&challenge, &request).unwrap();
    assert_eq!(fresh.nonce_count, Some(1));
    assert!(server
        .verify(&fresh, &request, UserSecret::Password("pw"), later + 1)
        .is_ok());
}

#[test]
fn wrong_password_is_rejected_not_stale() {
    let server = server_with(vec![Algorithm::Sha256]);
    let mut client = DigestClient::new("dev", "wrong");
    let request = DigestRequest::new("REGISTER", "sip:sip.example.net");
    let headers = www_authenticate(&server, T0, false);
    let creds = client
        .respond_to_headers(headers.iter().map(String::as_str), &request)
        .unwrap();
    for now in [T0, T0 + 3600] {
        assert_eq!(
            server.verify(&creds, &request, UserSecret::Password("right"), now),
            Err(VerifyError::WrongResponse)
        );
    }
}

#[test]
fn client_prefers_sha256_in_either_order_and_falls_back_to_md5() {
    let md5 = "Digest realm=\"r\", nonce=\"n1\", algorithm=MD5, qop=\"auth\"";
    let sha = "Digest realm=\"r\", nonce=\"n2\", algorithm=SHA-256, qop=\"auth\"";
    let unsupported = "Digest realm=\"r\", nonce=\"n3\", algorithm=SHA-512-256, qop=\"auth\"";
    let request = DigestRequest::new("REGISTER", "sip:r");
    for headers in [[md5, sha, unsupported], [unsupported, sha, md5]] {
        let mut client = DigestClient::new("u", "p");
        let creds = client.respond_to_headers(headers, &request).unwrap();
        assert_eq!(creds.algorithm, Some(Algorithm::Sha256));
    }
    let mut client = DigestClient::new("u", "p");
    let creds = client
        .respond_to_headers([unsupported, md5], &request)
        .unwrap();
    assert_eq!(creds.algorithm, Some(Algorithm::Md5));
    assert_eq!(
        client.respond_to_headers([unsupported], &request),
        Err(DigestError::NoUsableChallenge)
    );
}

#[test]
fn real_world_challenge_shapes_parse() {
    // Shapes seen from Kamailio, Asterisk, FreeSWITCH and carriers: odd spacing, upper-case
    // tokens, unquoted algorithm, qop lists with spaces.
    for value in [
        "Digest realm=\"sip.example.net\", nonce=\"ZfS3jWX0tmGzRmeo0Hz1u3zH1hXwS4/m\"",
        "Digest  realm=\"asterisk\",nonce=\"1a2b3c4d\",opaque=\"5e6f\",algorithm=MD5,qop=\"auth\"",
        "Digest realm=\"10.0.0.1\", nonce=\"b8a4e2a0-1\", algorithm=MD5, qop=\"auth, auth-int\"",
        "DIGEST REALM=\"x\" , NONCE=\"y\" , ALGORITHM=SHA-256 , QOP=\"AUTH\" , STALE=FALSE",
        "Digest\trealm=\"x\",\r\n nonce=\"y\", algorithm=\"MD5\"",
    ] {
        let challenge = Challenge::parse(value).unwrap_or_else(|e| panic!("{value}: {e}"));
        assert!(challenge.is_answerable(), "{value}");
        let reparsed = Challenge::parse(&challenge.to_string()).unwrap();
        assert_eq!(reparsed, challenge);
    }
    let all = parse_challenges([
        "Digest realm=\"a\", nonce=\"1\", algorithm=SHA-256, Digest realm=\"a\", nonce=\"1\"",
        "Basic realm=\"a\"",
    ]);
    assert_eq!(all.len(), 3);
    assert!(all[0].is_ok() && all[1].is_ok());
    assert!(matches!(all[2], Err(DigestError::NotDigest(_))));
}

fn arbitrary_header() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        // Strings made of the characters that matter to the tokenizer.
        proptest::collection::vec(
            prop_oneof![
                Just("Digest ".to_string()),
                Just("realm".to_string()),
                Just("nonce".to_string()),
                Just("qop".to_string()),
                Just("nc".to_string()),
                Just("=".to_string()),
                Just(",".to_string()),
                Just("\"".to_string()),
                Just("\\".to_string()),
                Just(" ".to_string()),
                Just("\r\n".to_string()),
                Just("é".to_string()),
                "[a-zA-Z0-9-]{0,6}",
            ],
            0..40
        )
        .prop_map(|parts| parts.concat()),
    ]
}

proptest! {
    #[test]
    fn parsers_never_panic(value in arbitrary_header()) {
        let _ = Challenge::parse(&value);
        let _ = Credentials::parse(&value);
        let _ = parse_challenges([value.as_str()]);
        let _ = select_challenge([value.as_str()]);
    }

    #[test]
    fn verifying_arbitrary_credentials_never_panics_or_succeeds(value in arbitrary_header()) {
        let server = server_with(vec![Algorithm::Sha256, Algorithm::Md5]);
        if let Ok(creds) = Credentials::parse(&value) {
            let request = DigestRequest::new("REGISTER", "sip:sip.example.net");
            prop_assert!(server.verify(&creds, &request, UserSecret::Password("pw"), T0).is_err());
            prop_assert!(server.verify(&creds, &request, UserSecret::Ha1("00"), T0).is_err());
        }
    }

    #[test]
    fn challenges_round_trip(
        realm in "[ -~]{0,20}",
        nonce in "[ -~]{1,40}",
        opaque in proptest::option::of("[ -~]{0,20}"),
        stale in any::<bool>(),
        algorithm in proptest::option::of(proptest::sample::select(Algorithm::ALL.to_vec())),
    ) {
        let mut challenge = Challenge::new(realm, nonce);
        challenge.opaque = opaque;
        challenge.stale = stale;
        challenge.algorithm = algorithm;
        let text = challenge.to_string();
        prop_assert_eq!(Challenge::parse(&text), Ok(challenge));
    }

    #[test]
    fn client_and_server_agree(
        user in "[a-zA-Z0-9._-]{1,16}",
        password in "[ -~]{0,24}",
        method in "[A-Z]{3,9}",
        alg_index in 0usize..4,
        offset in 0u64..300,
    ) {
        let algorithm = Algorithm::ALL[alg_index];
        let server = server_with(vec![algorithm]);
        let uri = format!("sip:{user}@sip.example.net");
        let request = DigestRequest::new(&method, &uri);
        let headers = www_authenticate(&server, T0, false);
        let mut client = DigestClient::new(user.as_str(), password.as_str());
        let creds = client.respond_to_headers(headers.iter().map(String::as_str), &request).unwrap();
        let parsed = Credentials::parse(&creds.to_string()).unwrap();
        prop_assert_eq!(&parsed, &creds);
        prop_assert!(server.verify(&parsed, &request, UserSecret::Password(&password), T0 + offset).is_ok());
        let wrong = format!("{password}x");
        let next = client.authorize_again(&request).unwrap().unwrap();
        prop_assert_eq!(
            server.verify(&next, &request, UserSecret::Password(&wrong), T0 + offset),
            Err(VerifyError::WrongResponse)
        );
    }
}
