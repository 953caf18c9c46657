//! The server side: issuing challenges and verifying credentials.
//!
//! Nonces are stateless: `hex(issued_at (8 bytes, big endian) | salt (8 random bytes) |
//! HMAC-SHA-256(secret, tag | realm | issued_at | salt) truncated to 16 bytes)`. Any node that
//! shares the secret and realm can check a nonce and its age without having seen it, which suits
//! a cluster. Time is passed in (`now`, unix seconds); nothing here reads the clock.
//!
//! Replay of nonce counts is detected per node, in bounded memory, with a 64-wide sliding
//! window per nonce (so parallel requests that arrive out of order still pass), for the most
//! recent [`DigestServerConfig::replay_window_nonces`] nonces. A nonce evicted from that table,
//! or seen by another node, is not protected against replay of its counts; its age limit still
//! applies.
//!
//! It stores no users: the caller looks the user up by [`super::Credentials::username`] and
//! passes the password or HA1.

use super::challenge::Challenge;
use super::credentials::Credentials;
use super::hash::{compute_ha1, compute_response, constant_time_eq, hmac_sha256, ResponseInputs};
use super::params::is_header_safe;
use super::{Algorithm, DigestError, DigestRequest, Qop};
use rand::Rng;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Mutex;

/// Domain-separation tag of the nonce MAC (bump the version to invalidate all old nonces).
const NONCE_MAC_TAG: &[u8] = b"thalamus-digest-nonce-v1\0";
/// Bytes of the MAC kept in a nonce.
const NONCE_MAC_LEN: usize = 16;
/// Length of a nonce in hex characters.
const NONCE_HEX_LEN: usize = 2 * (8 + 8 + NONCE_MAC_LEN);
/// Shortest accepted server secret, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// Settings of a [`DigestServer`].
#[derive(Clone)]
pub struct DigestServerConfig {
    /// The realm challenged with and required in credentials.
    pub realm: String,
    /// The nonce MAC key; every node of a cluster needs the same one. At least
    /// [`MIN_SECRET_LEN`] bytes.
    pub secret: Vec<u8>,
    /// How long a nonce is accepted after it was issued; after that, correct credentials get
    /// [`VerifyError::StaleNonce`].
    pub nonce_lifetime_secs: u64,
    /// How far in the future a nonce's issue time may be (clock differences between nodes).
    pub max_clock_skew_secs: u64,
    /// Algorithms challenged with, in order of preference (one challenge each), and accepted.
    pub algorithms: Vec<Algorithm>,
    /// The qop options offered; credentials must use one of them. Empty means RFC 2069 mode
    /// (no qop), which only makes sense for very old clients.
    pub qop: Vec<Qop>,
    /// Whether the credentials' `uri` must equal the Request-URI of the request.
    pub verify_uri: bool,
    /// How many nonces to track for `nc` replay detection; 0 disables it.
    pub replay_window_nonces: usize,
    /// Opaque value sent in challenges and required back, if any.
    pub opaque: Option<String>,
}

impl fmt::Debug for DigestServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestServerConfig")
            .field("realm", &self.realm)
            .field("secret", &"<redacted>")
            .field("nonce_lifetime_secs", &self.nonce_lifetime_secs)
            .field("max_clock_skew_secs", &self.max_clock_skew_secs)
            .field("algorithms", &self.algorithms)
            .field("qop", &self.qop)
            .field("verify_uri", &self.verify_uri)
            .field("replay_window_nonces", &self.replay_window_nonces)
            .field("opaque", &self.opaque)
            .finish()
    }
}

impl DigestServerConfig {
    /// Defaults: nonces live 300 s with 30 s of clock skew allowed, SHA-256 then MD5 challenges,
    /// `qop=auth`, URI checked, 4096 nonces tracked for replay, no opaque.
    pub fn new(realm: impl Into<String>, secret: impl Into<Vec<u8>>) -> Self {
        DigestServerConfig {
            realm: realm.into(),
            secret: secret.into(),
            nonce_lifetime_secs: 300,
            max_clock_skew_secs: 30,
            algorithms: vec![Algorithm::Sha256, Algorithm::Md5],
            qop: vec![Qop::Auth],
            verify_uri: true,
            replay_window_nonces: 4096,
            opaque: None,
        }
    }
}

/// What the server compares the response against.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum UserSecret<'a> {
    /// The user's plain password.
    Password(&'a str),
    /// The precomputed HA1 for the credentials' algorithm (see [`super::compute_ha1`]), hex.
    /// It must have been computed for this server's realm.
    Ha1(&'a str),
}

impl fmt::Debug for UserSecret<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserSecret::Password(_) => f.write_str("Password(<redacted>)"),
            UserSecret::Ha1(_) => f.write_str("Ha1(<redacted>)"),
        }
    }
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCredentials {
    /// The authenticated user name.
    pub username: String,
    /// The algorithm used.
    pub algorithm: Algorithm,
    /// When the nonce was issued (unix seconds).
    pub nonce_issued_at: u64,
    /// The nonce count, when a qop was used.
    pub nonce_count: Option<u32>,
}

/// Why credentials were not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The algorithm is not one this server accepts.
    #[error("algorithm {0} not accepted")]
    UnsupportedAlgorithm(Algorithm),
    /// The realm differs from the server's.
    #[error("wrong realm")]
    RealmMismatch,
    /// The nonce was not issued by a server with this secret and realm (or is from the future).
    #[error("nonce not issued here")]
    InvalidNonce,
    /// The qop used was not offered.
    #[error("qop not offered")]
    QopMismatch,
    /// The opaque value differs from the one challenged with.
    #[error("wrong opaque")]
    OpaqueMismatch,
    /// The digest-uri differs from the Request-URI.
    #[error("digest uri does not match the request uri")]
    UriMismatch,
    /// The response is wrong (wrong password, or altered request).
    #[error("wrong response")]
    WrongResponse,
    /// The response is right but the nonce expired: challenge again with `stale=TRUE`.
    #[error("nonce expired")]
    StaleNonce,
    /// The nonce count was already used with this nonce (or is too old to tell).
    #[error("nonce count replayed")]
    Replay,
    /// The HA1 given for the user is not a hex digest of the algorithm's length.
    #[error("stored HA1 has the wrong format")]
    InvalidHa1,
}

impl VerifyError {
    /// Whether the answer should be a new challenge with `stale=TRUE` (the user knows the
    /// password; only the nonce is too old).
    pub fn is_stale(&self) -> bool {
        matches!(self, VerifyError::StaleNonce)
    }
}

/// Issues challenges and verifies credentials for one realm.
///
/// ```
/// use thalamus_sip::digest::{
///     Credentials, DigestClient, DigestRequest, DigestServer, DigestServerConfig, UserSecret,
/// };
/// let server =
///     DigestServer::new(DigestServerConfig::new("example.com", *b"0123456789abcdef")).unwrap();
/// let now = 1_700_000_000;
/// let challenges: Vec<String> = server.challenges(now, false).iter().map(|c| c.to_string()).collect();
///
/// let mut client = DigestClient::new("alice", "secret");
/// let request = DigestRequest::new("REGISTER", "sip:example.com");
/// let header = client
///     .respond_to_headers(challenges.iter().map(String::as_str), &request)
///     .unwrap()
///     .to_string();
///
/// let credentials = Credentials::parse(&header).unwrap();
/// let verified = server
///     .verify(&credentials, &request, UserSecret::Password("secret"), now + 1)
///     .unwrap();
/// assert_eq!(verified.username, "alice");
/// ```
pub struct DigestServer {
    config: DigestServerConfig,
    replay: Option<Mutex<ReplayGuard>>,
}

impl fmt::Debug for DigestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestServer")
            .field("config", &self.config)
            .finish()
    }
}

impl DigestServer {
    /// A server with the given settings; fails for a short secret, no algorithms, a realm or
    /// opaque with control characters, a zero lifetime, or a `-sess` algorithm without qop.
    pub fn new(config: DigestServerConfig) -> Result<Self, DigestError> {
        if config.secret.len() < MIN_SECRET_LEN {
            return Err(DigestError::InvalidConfig("secret shorter than 16 bytes"));
        }
        if config.algorithms.is_empty() {
            return Err(DigestError::InvalidConfig("no algorithms"));
        }
        if config.nonce_lifetime_secs == 0 {
            return Err(DigestError::InvalidConfig("zero nonce lifetime"));
        }
        if !is_header_safe(&config.realm) || !config.opaque.as_deref().is_none_or(is_header_safe) {
            return Err(DigestError::InvalidConfig(
                "realm or opaque contains control characters",
            ));
        }
        if config.qop.is_empty() && config.algorithms.iter().any(|a| a.is_session()) {
            return Err(DigestError::InvalidConfig("session algorithm without qop"));
        }
        let replay = (config.replay_window_nonces > 0)
            .then(|| Mutex::new(ReplayGuard::new(config.replay_window_nonces)));
        Ok(DigestServer { config, replay })
    }

    /// The settings.
    pub fn config(&self) -> &DigestServerConfig {
        &self.config
    }

    /// A fresh nonce issued at `now` (unix seconds).
    pub fn issue_nonce(&self, now: u64) -> String {
        let salt: [u8; 8] = crate::rng::with(|rng| rng.gen());
        let ts = now.to_be_bytes();
        let mac = self.nonce_mac(&ts, &salt);
        let mut bytes = Vec::with_capacity(8 + 8 + NONCE_MAC_LEN);
        bytes.extend_from_slice(&ts);
        bytes.extend_from_slice(&salt);
        bytes.extend(mac.iter().take(NONCE_MAC_LEN));
        hex::encode(bytes)
    }

    /// One challenge per configured algorithm, in preference order, sharing a fresh nonce:
    /// send each as its own `WWW-Authenticate` (or `Proxy-Authenticate`) header. Set `stale`
    /// when answering [`VerifyError::StaleNonce`].
    pub fn challenges(&self, now: u64, stale: bool) -> Vec<Challenge> {
        let nonce = self.issue_nonce(now);
        self.config
            .algorithms
            .iter()
            .map(|&algorithm| Challenge {
                realm: self.config.realm.clone(),
                nonce: nonce.clone(),
                opaque: self.config.opaque.clone(),
                algorithm: Some(algorithm),
                qop: (!self.config.qop.is_empty()).then(|| self.config.qop.clone()),
                stale,
                domain: None,
            })
            .collect()
    }

    /// Checks credentials for a request at time `now` (unix seconds).
    ///
    /// Checks in order: algorithm, realm, opaque, nonce authenticity, qop, URI, response, nonce
    /// age (only correct credentials are called stale), nonce-count replay.
    pub fn verify(
        &self,
        credentials: &Credentials,
        request: &DigestRequest<'_>,
        secret: UserSecret<'_>,
        now: u64,
    ) -> Result<VerifiedCredentials, VerifyError> {
        let algorithm = credentials.effective_algorithm();
        if !self.config.algorithms.contains(&algorithm) {
            return Err(VerifyError::UnsupportedAlgorithm(algorithm));
        }
        if credentials.realm != self.config.realm {
            return Err(VerifyError::RealmMismatch);
        }
        if let Some(opaque) = &self.config.opaque {
            if credentials.opaque.as_deref() != Some(opaque.as_str()) {
                return Err(VerifyError::OpaqueMismatch);
            }
        }
        let issued_at = self
            .check_nonce(&credentials.nonce)
            .ok_or(VerifyError::InvalidNonce)?;
        if issued_at > now.saturating_add(self.config.max_clock_skew_secs) {
            return Err(VerifyError::InvalidNonce);
        }
        let qop = match (credentials.qop, self.config.qop.is_empty()) {
            (None, true) => None,
            (Some(q), false) if self.config.qop.contains(&q) => {
                let nc = credentials.nonce_count.ok_or(VerifyError::QopMismatch)?;
                let cnonce = credentials
                    .cnonce
                    .as_deref()
                    .ok_or(VerifyError::QopMismatch)?;
                Some((q, nc, cnonce))
            }
            _ => return Err(VerifyError::QopMismatch),
        };
        if self.config.verify_uri && credentials.uri.trim() != request.uri.trim() {
            return Err(VerifyError::UriMismatch);
        }
        let ha1 = match secret {
            UserSecret::Password(password) => compute_ha1(
                algorithm,
                &credentials.username,
                &self.config.realm,
                password,
            ),
            UserSecret::Ha1(ha1) => {
                let ha1 = ha1.trim();
                if ha1.len() != algorithm.hex_len() || !ha1.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(VerifyError::InvalidHa1);
                }
                ha1.to_ascii_lowercase()
            }
        };
        let expected = compute_response(&ResponseInputs {
            algorithm,
            ha1: &ha1,
            nonce: &credentials.nonce,
            method: request.method,
            uri: &credentials.uri,
            body: request.body,
            qop,
        });
        let given = credentials.response.trim().to_ascii_lowercase();
        if !constant_time_eq(expected.as_bytes(), given.as_bytes()) {
            return Err(VerifyError::WrongResponse);
        }
        if now > issued_at.saturating_add(self.config.nonce_lifetime_secs) {
            return Err(VerifyError::StaleNonce);
        }
        if let (Some(guard), Some(nc)) = (&self.replay, credentials.nonce_count) {
            let mut guard = guard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if !guard.check_and_record(&credentials.nonce, nc) {
                return Err(VerifyError::Replay);
            }
        }
        Ok(VerifiedCredentials {
            username: credentials.username.clone(),
            algorithm,
            nonce_issued_at: issued_at,
            nonce_count: credentials.nonce_count,
        })
    }

    fn nonce_mac(&self, ts: &[u8; 8], salt: &[u8]) -> [u8; 32] {
        hmac_sha256(
            &self.config.secret,
            &[NONCE_MAC_TAG, self.config.realm.as_bytes(), b"\0", ts, salt],
        )
    }

    /// The issue time of a nonce this server (or a peer with the same secret) issued.
    fn check_nonce(&self, nonce: &str) -> Option<u64> {
        if nonce.len() != NONCE_HEX_LEN {
            return None;
        }
        let bytes = hex::decode(nonce).ok()?;
        let (ts, rest) = bytes.split_at_checked(8)?;
        let (salt, mac) = rest.split_at_checked(8)?;
        let ts: [u8; 8] = ts.try_into().ok()?;
        let expected = self.nonce_mac(&ts, salt);
        let expected = expected.get(..NONCE_MAC_LEN)?;
        constant_time_eq(expected, mac).then(|| u64::from_be_bytes(ts))
    }
}

/// Seen nonce counts of the most recent nonces.
struct ReplayGuard {
    capacity: usize,
    windows: HashMap<String, CountWindow>,
    order: VecDeque<String>,
}

/// The highest count seen and a bitmap of the 64 counts up to it (bit i = highest - i).
struct CountWindow {
    highest: u32,
    seen: u64,
}

impl ReplayGuard {
    fn new(capacity: usize) -> Self {
        ReplayGuard {
            capacity,
            windows: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records `nc` for `nonce`; false if it was seen before or is too far behind.
    fn check_and_record(&mut self, nonce: &str, nc: u32) -> bool {
        if nc == 0 {
            return false;
        }
        let Some(window) = self.windows.get_mut(nonce) else {
            while self.windows.len() >= self.capacity {
                match self.order.pop_front() {
                    Some(old) => {
                        self.windows.remove(&old);
                    }
                    None => break,
                }
            }
            self.windows.insert(
                nonce.to_string(),
                CountWindow {
                    highest: nc,
                    seen: 1,
                },
            );
            self.order.push_back(nonce.to_string());
            return true;
        };
        if nc > window.highest {
            let shift = nc - window.highest;
            window.seen = if shift >= 64 { 0 } else { window.seen << shift };
            window.seen |= 1;
            window.highest = nc;
            return true;
        }
        let behind = window.highest - nc;
        if behind >= 64 {
            return false;
        }
        let bit = 1u64 << behind;
        if window.seen & bit != 0 {
            return false;
        }
        window.seen |= bit;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::client::answer_challenge;
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn server() -> DigestServer {
        DigestServer::new(DigestServerConfig::new("example.com", *b"0123456789abcdef")).unwrap()
    }

    fn answer(challenge: &Challenge, password: &str, nc: u32, req: &DigestRequest) -> Credentials {
        answer_challenge(challenge, "alice", password, req, "cn", nc).unwrap()
    }

    #[test]
    fn nonces_are_authenticated_and_carry_their_time() {
        let s = server();
        let nonce = s.issue_nonce(NOW);
        assert_eq!(nonce.len(), NONCE_HEX_LEN);
        assert_eq!(s.check_nonce(&nonce), Some(NOW));
        assert_ne!(s.issue_nonce(NOW), nonce, "salted");
        // Another secret or realm does not accept it.
        let other = DigestServer::new(DigestServerConfig::new("example.com", *b"0123456789abcdeX"))
            .unwrap();
        assert_eq!(other.check_nonce(&nonce), None);
        let other_realm =
            DigestServer::new(DigestServerConfig::new("example.org", *b"0123456789abcdef"))
                .unwrap();
        assert_eq!(other_realm.check_nonce(&nonce), None);
        // A node with the same secret (cluster peer) does.
        assert_eq!(server().check_nonce(&nonce), Some(NOW));
        // Tampering with the time breaks the MAC.
        let mut tampered = nonce.clone().into_bytes();
        tampered[15] = if tampered[15] == b'0' { b'1' } else { b'0' };
        assert_eq!(s.check_nonce(&String::from_utf8(tampered).unwrap()), None);
        for bad in [
            "",
            "zz",
            &nonce[..62],
            &format!("{nonce}00"),
            &"g".repeat(64),
        ] {
            assert_eq!(s.check_nonce(bad), None, "{bad}");
        }
    }

    #[test]
    fn challenges_follow_config() {
        let s = server();
        let cs = s.challenges(NOW, true);
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[0].algorithm, Some(Algorithm::Sha256));
        assert_eq!(cs[1].algorithm, Some(Algorithm::Md5));
        assert_eq!(cs[0].nonce, cs[1].nonce);
        assert!(cs.iter().all(|c| c.stale && c.qop == Some(vec![Qop::Auth])));
        assert!(cs[0].to_string().contains("stale=TRUE"));
    }

    #[test]
    fn accepts_right_credentials_with_password_or_ha1() {
        let s = server();
        let req = DigestRequest::new("REGISTER", "sip:example.com");
        // The challenges share one nonce, so each answer uses its own counts.
        for (i, challenge) in s.challenges(NOW, false).into_iter().enumerate() {
            let nc = 10 * i as u32;
            let alg = challenge.effective_algorithm();
            let creds = answer(&challenge, "secret", nc + 1, &req);
            let ok = s
                .verify(&creds, &req, UserSecret::Password("secret"), NOW + 10)
                .unwrap();
            assert_eq!(ok.username, "alice");
            assert_eq!(ok.algorithm, alg);
            assert_eq!(ok.nonce_issued_at, NOW);
            let ha1 = compute_ha1(alg, "alice", "example.com", "secret").to_uppercase();
            let creds = answer(&challenge, "secret", nc + 2, &req);
            s.verify(&creds, &req, UserSecret::Ha1(&ha1), NOW + 10)
                .unwrap();
            let creds = answer(&challenge, "secret", nc + 3, &req);
            assert_eq!(
                s.verify(&creds, &req, UserSecret::Ha1("abc"), NOW),
                Err(VerifyError::InvalidHa1)
            );
        }
    }

    #[test]
    fn rejects_wrong_password_realm_uri_method_and_nonce() {
        let s = server();
        let req = DigestRequest::new("INVITE", "sip:bob@example.com");
        let challenge = &s.challenges(NOW, false)[0];
        let pw = UserSecret::Password("secret");
        let wrong = answer(challenge, "guess", 1, &req);
        assert_eq!(
            s.verify(&wrong, &req, pw, NOW),
            Err(VerifyError::WrongResponse)
        );
        let creds = answer(challenge, "secret", 1, &req);
        let mut other_realm = creds.clone();
        other_realm.realm = "evil.com".into();
        assert_eq!(
            s.verify(&other_realm, &req, pw, NOW),
            Err(VerifyError::RealmMismatch)
        );
        assert_eq!(
            s.verify(
                &creds,
                &DigestRequest::new("INVITE", "sip:carol@example.com"),
                pw,
                NOW
            ),
            Err(VerifyError::UriMismatch)
        );
        assert_eq!(
            s.verify(
                &creds,
                &DigestRequest::new("BYE", "sip:bob@example.com"),
                pw,
                NOW
            ),
            Err(VerifyError::WrongResponse)
        );
        let mut forged = Challenge::new("example.com", "00".repeat(32));
        forged.qop = Some(vec![Qop::Auth]);
        forged.algorithm = Some(Algorithm::Sha256);
        assert_eq!(
            s.verify(&answer(&forged, "secret", 1, &req), &req, pw, NOW),
            Err(VerifyError::InvalidNonce)
        );
        let mut rfc2069 = challenge.clone();
        rfc2069.qop = None;
        assert_eq!(
            s.verify(&answer(&rfc2069, "secret", 1, &req), &req, pw, NOW),
            Err(VerifyError::QopMismatch)
        );
        let mut md5sess = challenge.clone();
        md5sess.algorithm = Some(Algorithm::Md5Sess);
        assert_eq!(
            s.verify(&answer(&md5sess, "secret", 1, &req), &req, pw, NOW),
            Err(VerifyError::UnsupportedAlgorithm(Algorithm::Md5Sess))
        );
        // Still fine after all that.
        assert!(s.verify(&creds, &req, pw, NOW).is_ok());
    }

    #[test]
    fn expired_nonce_is_stale_only_when_the_response_is_right() {
        let s = server();
        let req = DigestRequest::new("REGISTER", "sip:example.com");
        let challenge = &s.challenges(NOW, false)[0];
        let pw = UserSecret::Password("secret");
        let creds = answer(challenge, "secret", 1, &req);
        let late = NOW + 301;
        let err = s.verify(&creds, &req, pw, late).unwrap_err();
        assert_eq!(err, VerifyError::StaleNonce);
        assert!(err.is_stale());
        assert_eq!(
            s.verify(&answer(challenge, "guess", 1, &req), &req, pw, late),
            Err(VerifyError::WrongResponse)
        );
        // Right at the end of the lifetime it is still accepted.
        assert!(s.verify(&creds, &req, pw, NOW + 300).is_ok());
        // A nonce from too far in the future is not ours.
        let future = Challenge {
            nonce: s.issue_nonce(NOW + 31),
            ..challenge.clone()
        };
        assert_eq!(
            s.verify(&answer(&future, "secret", 1, &req), &req, pw, NOW),
            Err(VerifyError::InvalidNonce)
        );
        let near_future = Challenge {
            nonce: s.issue_nonce(NOW + 30),
            ..challenge.clone()
        };
        assert!(s
            .verify(&answer(&near_future, "secret", 1, &req), &req, pw, NOW)
            .is_ok());
    }

    #[test]
    fn nonce_count_replay_is_detected() {
        let s = server();
        let req = DigestRequest::new("MESSAGE", "sip:bob@example.com");
        let challenge = &s.challenges(NOW, false)[0];
        let pw = UserSecret::Password("secret");
        let c1 = answer(challenge, "secret", 1, &req);
        assert!(s.verify(&c1, &req, pw, NOW).is_ok());
        assert_eq!(s.verify(&c1, &req, pw, NOW), Err(VerifyError::Replay));
        // Out of order within the window is fine, once.
        let c3 = answer(challenge, "secret", 3, &req);
        let c2 = answer(challenge, "secret", 2, &req);
        assert!(s.verify(&c3, &req, pw, NOW).is_ok());
        assert!(s.verify(&c2, &req, pw, NOW).is_ok());
        assert_eq!(s.verify(&c2, &req, pw, NOW), Err(VerifyError::Replay));
        // A wrong response does not burn a count.
        let bad4 = answer(challenge, "guess", 4, &req);
        assert_eq!(
            s.verify(&bad4, &req, pw, NOW),
            Err(VerifyError::WrongResponse)
        );
        assert!(s
            .verify(&answer(challenge, "secret", 4, &req), &req, pw, NOW)
            .is_ok());
        // Disabled guard accepts replays.
        let mut config = DigestServerConfig::new("example.com", *b"0123456789abcdef");
        config.replay_window_nonces = 0;
        let lax = DigestServer::new(config).unwrap();
        assert!(lax.verify(&c1, &req, pw, NOW).is_ok());
        assert!(lax.verify(&c1, &req, pw, NOW).is_ok());
    }

    #[test]
    fn replay_guard_window_and_eviction() {
        let mut g = ReplayGuard::new(2);
        assert!(!g.check_and_record("a", 0));
        assert!(g.check_and_record("a", 100));
        assert!(!g.check_and_record("a", 36), "64 or more behind");
        assert!(g.check_and_record("a", 37));
        assert!(!g.check_and_record("a", 37));
        assert!(g.check_and_record("a", 1000));
        assert!(!g.check_and_record("a", 1000));
        assert!(g.check_and_record("b", 1));
        assert!(g.check_and_record("c", 1));
        assert_eq!(g.windows.len(), 2);
        // "a" was evicted: its counts are forgotten.
        assert!(g.check_and_record("a", 1000));
        assert!(g.windows.len() <= 2 && g.order.len() <= 2);
    }

    #[test]
    fn opaque_and_rfc2069_and_session_configs() {
        let mut config = DigestServerConfig::new("example.com", *b"0123456789abcdef");
        config.opaque = Some("cluster-a".into());
        config.algorithms = vec![Algorithm::Sha256Sess, Algorithm::Md5Sess];
        let s = DigestServer::new(config).unwrap();
        let req = DigestRequest::new("REGISTER", "sip:example.com");
        let pw = UserSecret::Password("secret");
        for (i, challenge) in s.challenges(NOW, false).into_iter().enumerate() {
            let nc = 10 * i as u32;
            let creds = answer(&challenge, "secret", nc + 1, &req);
            assert_eq!(creds.opaque.as_deref(), Some("cluster-a"));
            assert!(s.verify(&creds, &req, pw, NOW).is_ok());
            let mut no_opaque = answer(&challenge, "secret", nc + 2, &req);
            no_opaque.opaque = None;
            assert_eq!(
                s.verify(&no_opaque, &req, pw, NOW),
                Err(VerifyError::OpaqueMismatch)
            );
            // HA1 for -sess is the plain HA1; the session part is added per request.
            let ha1 = compute_ha1(
                challenge.effective_algorithm(),
                "alice",
                "example.com",
                "secret",
            );
            let creds = answer(&challenge, "secret", nc + 3, &req);
            assert!(s.verify(&creds, &req, UserSecret::Ha1(&ha1), NOW).is_ok());
        }

        let mut config = DigestServerConfig::new("example.com", *b"0123456789abcdef");
        config.qop.clear();
        config.algorithms = vec![Algorithm::Md5];
        let s = DigestServer::new(config).unwrap();
        let challenge = &s.challenges(NOW, false)[0];
        assert_eq!(challenge.qop, None);
        let creds = answer(challenge, "secret", 1, &req);
        assert_eq!(creds.qop, None);
        assert!(s.verify(&creds, &req, pw, NOW).is_ok());
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let base = || DigestServerConfig::new("example.com", *b"0123456789abcdef");
        let mut c = base();
        c.secret = b"short".to_vec();
        assert!(DigestServer::new(c).is_err());
        let mut c = base();
        c.algorithms.clear();
        assert!(DigestServer::new(c).is_err());
        let mut c = base();
        c.nonce_lifetime_secs = 0;
        assert!(DigestServer::new(c).is_err());
        let mut c = base();
        c.realm = "a\r\nb".into();
        assert!(DigestServer::new(c).is_err());
        let mut c = base();
        c.qop.clear();
        c.algorithms = vec![Algorithm::Md5Sess];
        assert!(DigestServer::new(c).is_err());
        assert!(!format!("{:?}", base()).contains("0123"));
    }
}
