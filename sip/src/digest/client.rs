//! The client side: answering digest challenges.
//!
//! [`answer_challenge`] is the pure computation (cnonce and nc given). [`DigestClient`] holds a
//! user's credentials, picks the strongest challenge, draws a random cnonce and counts `nc` per
//! nonce so that a nonce can be reused for later requests (e.g. REGISTER refreshes). It does
//! not decide when to give up (a second challenge without `stale=TRUE` after answering means the
//! password is wrong: the caller counts attempts) and sends nothing.

use super::challenge::{select_challenge, Challenge};
use super::credentials::Credentials;
use super::hash::{compute_ha1, compute_response, ResponseInputs};
use super::params::is_header_safe;
use super::{DigestError, DigestRequest, Qop};
use rand::Rng;
use std::fmt;

/// How many nonces a [`DigestClient`] keeps counts for (oldest forgotten first).
const MAX_TRACKED_NONCES: usize = 16;

/// Computes credentials for a challenge with the given cnonce and nonce count.
///
/// The qop used is `auth` when offered, else `auth-int` (covering `request.body`), else none
/// (RFC 2069 mode, where `cnonce` and `nc` are not sent). Fails for challenges that cannot be
/// answered and for values that cannot be carried in a header (control characters).
pub fn answer_challenge(
    challenge: &Challenge,
    username: &str,
    password: &str,
    request: &DigestRequest<'_>,
    cnonce: &str,
    nonce_count: u32,
) -> Result<Credentials, DigestError> {
    for (name, value) in [
        ("username", username),
        ("uri", request.uri),
        ("method", request.method),
        ("cnonce", cnonce),
    ] {
        if !is_header_safe(value) {
            return Err(DigestError::UnsafeValue(name));
        }
    }
    if request.method.is_empty() {
        return Err(DigestError::InvalidParam("method"));
    }
    let algorithm = challenge.effective_algorithm();
    let qop = match &challenge.qop {
        None if algorithm.is_session() => return Err(DigestError::SessionAlgorithmWithoutQop),
        None => None,
        Some(options) if options.contains(&Qop::Auth) => Some(Qop::Auth),
        Some(options) if options.contains(&Qop::AuthInt) => Some(Qop::AuthInt),
        Some(_) => return Err(DigestError::UnsupportedQop),
    };
    if qop.is_some() && (cnonce.is_empty() || nonce_count == 0) {
        return Err(DigestError::InvalidParam("cnonce"));
    }
    let ha1 = compute_ha1(algorithm, username, &challenge.realm, password);
    let response = compute_response(&ResponseInputs {
        algorithm,
        ha1: &ha1,
        nonce: &challenge.nonce,
        method: request.method,
        uri: request.uri,
        body: request.body,
        qop: qop.map(|q| (q, nonce_count, cnonce)),
    });
    Ok(Credentials {
        username: username.to_string(),
        realm: challenge.realm.clone(),
        nonce: challenge.nonce.clone(),
        uri: request.uri.to_string(),
        response,
        algorithm: challenge.algorithm,
        cnonce: qop.map(|_| cnonce.to_string()),
        opaque: challenge.opaque.clone(),
        qop,
        nonce_count: qop.map(|_| nonce_count),
    })
}

/// Answers digest challenges for one user, tracking nonce counts.
///
/// ```
/// use thalamus_sip::digest::{DigestClient, DigestRequest};
/// let mut client = DigestClient::new("alice", "secret");
/// let www_authenticate = [
///     "Digest realm=\"example.com\", nonce=\"abc\", algorithm=MD5, qop=\"auth\"",
///     "Digest realm=\"example.com\", nonce=\"abc\", algorithm=SHA-256, qop=\"auth\"",
/// ];
/// let request = DigestRequest::new("REGISTER", "sip:example.com");
/// let credentials = client.respond_to_headers(www_authenticate, &request).unwrap();
/// assert!(credentials.to_string().contains("algorithm=SHA-256"));
/// // The next REGISTER can reuse the nonce: nc goes up.
/// let again = client.authorize_again(&request).unwrap().unwrap();
/// assert_eq!(again.nonce_count, Some(2));
/// ```
pub struct DigestClient {
    username: String,
    password: String,
    /// (realm, nonce, last nc used), most recent last.
    nonce_counts: Vec<(String, String, u32)>,
    last_challenge: Option<Challenge>,
}

impl fmt::Debug for DigestClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestClient")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("tracked_nonces", &self.nonce_counts.len())
            .finish()
    }
}

impl DigestClient {
    /// A client for the given user name and password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        DigestClient {
            username: username.into(),
            password: password.into(),
            nonce_counts: Vec::new(),
            last_challenge: None,
        }
    }

    /// The user name.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// Answers one challenge: draws a fresh cnonce, uses the next nonce count for the
    /// challenge's nonce, and remembers the challenge for [`DigestClient::authorize_again`].
    pub fn respond(
        &mut self,
        challenge: &Challenge,
        request: &DigestRequest<'_>,
    ) -> Result<Credentials, DigestError> {
        let nonce_count = self.peek_next_nc(challenge);
        let cnonce = random_cnonce();
        let credentials = answer_challenge(
            challenge,
            &self.username,
            &self.password,
            request,
            &cnonce,
            nonce_count,
        )?;
        self.record_nc(challenge, nonce_count);
        self.last_challenge = Some(challenge.clone());
        Ok(credentials)
    }

    /// Answers the strongest supported challenge among all `WWW-Authenticate` (or
    /// `Proxy-Authenticate`) header values of a 401 (407) response.
    pub fn respond_to_headers<'a, I>(
        &mut self,
        header_values: I,
        request: &DigestRequest<'_>,
    ) -> Result<Credentials, DigestError>
    where
        I: IntoIterator<Item = &'a str>,
    {
        let challenge = select_challenge(header_values)?;
        self.respond(&challenge, request)
    }

    /// Credentials for a new request reusing the last challenge answered (its nonce with the
    /// next nonce count), so a refresh need not be challenged again. `None` when no challenge
    /// was answered yet. A server that no longer accepts the nonce answers with a new
    /// challenge (usually `stale=TRUE`).
    pub fn authorize_again(
        &mut self,
        request: &DigestRequest<'_>,
    ) -> Option<Result<Credentials, DigestError>> {
        let challenge = self.last_challenge.clone()?;
        Some(self.respond(&challenge, request))
    }

    /// Forgets the remembered challenge and nonce counts.
    pub fn reset(&mut self) {
        self.nonce_counts.clear();
        self.last_challenge = None;
    }

    fn peek_next_nc(&self, challenge: &Challenge) -> u32 {
        self.nonce_counts
            .iter()
            .find(|(realm, nonce, _)| *realm == challenge.realm && *nonce == challenge.nonce)
            .map_or(1, |(_, _, nc)| nc.saturating_add(1))
    }

    fn record_nc(&mut self, challenge: &Challenge, nonce_count: u32) {
        self.nonce_counts
            .retain(|(realm, nonce, _)| !(*realm == challenge.realm && *nonce == challenge.nonce));
        if self.nonce_counts.len() >= MAX_TRACKED_NONCES {
            self.nonce_counts.remove(0);
        }
        self.nonce_counts.push((
            challenge.realm.clone(),
            challenge.nonce.clone(),
            nonce_count,
        ));
    }
}

/// 128 random bits as hex.
fn random_cnonce() -> String {
    let bytes: [u8; 16] = crate::rng::with(|rng| rng.gen());
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::super::Algorithm;
    use super::*;

    const RFC2617_CHALLENGE: &str = "Digest realm=\"testrealm@host.com\", qop=\"auth,auth-int\", nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"";

    fn rfc7616_challenge(algorithm: Algorithm) -> Challenge {
        Challenge {
            realm: "http-auth@example.org".into(),
            nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v".into(),
            opaque: Some("FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS".into()),
            algorithm: Some(algorithm),
            qop: Some(vec![Qop::Auth, Qop::AuthInt]),
            stale: false,
            domain: None,
        }
    }

    const RFC7616_CNONCE: &str = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";

    #[test]
    fn rfc2617_section_3_5_example() {
        let challenge = Challenge::parse(RFC2617_CHALLENGE).unwrap();
        let creds = answer_challenge(
            &challenge,
            "Mufasa",
            "Circle Of Life",
            &DigestRequest::new("GET", "/dir/index.html"),
            "0a4f113b",
            1,
        )
        .unwrap();
        assert_eq!(creds.response, "6629fae49393a05397450978507c4ef1");
        assert_eq!(creds.qop, Some(Qop::Auth));
        assert_eq!(creds.nonce_count, Some(1));
        assert_eq!(
            creds.opaque.as_deref(),
            Some("5ccc069c403ebaf9f0171e9517f40e41")
        );
        let text = creds.to_string();
        assert!(text.contains("response=\"6629fae49393a05397450978507c4ef1\""));
        assert!(text.contains("nc=00000001"));
    }

    #[test]
    fn rfc7616_section_3_9_1_examples() {
        // RFC 7616 section 3.9.1 gives the MD5 and SHA-256 responses for the same inputs; the
        // -sess values were computed independently with Python's hashlib.
        for (algorithm, expected) in [
            (Algorithm::Md5, "8ca523f5e9506fed4657c9700eebdbec"),
            (
                Algorithm::Sha256,
                "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
            ),
            (Algorithm::Md5Sess, "e783283f46242139c486a698fec7211d"),
            (
                Algorithm::Sha256Sess,
                "2fd51b3a77ad75bad6afad6003e818d767133c46d9e2749e7f5232ae1ea3efd7",
            ),
        ] {
            let creds = answer_challenge(
                &rfc7616_challenge(algorithm),
                "Mufasa",
                "Circle of Life",
                &DigestRequest::new("GET", "/dir/index.html"),
                RFC7616_CNONCE,
                1,
            )
            .unwrap();
            assert_eq!(creds.response, expected, "{algorithm}");
            assert_eq!(creds.algorithm, Some(algorithm));
            assert!(creds
                .to_string()
                .contains(&format!("algorithm={}", algorithm.as_str())));
        }
    }

    #[test]
    fn rfc2069_mode_without_qop() {
        // Expected value computed independently with Python's hashlib.
        let challenge = Challenge::parse(
            "Digest realm=\"testrealm@host.com\", nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\"",
        )
        .unwrap();
        let creds = answer_challenge(
            &challenge,
            "Mufasa",
            "Circle Of Life",
            &DigestRequest::new("GET", "/dir/index.html"),
            "ignored",
            1,
        )
        .unwrap();
        assert_eq!(creds.response, "670fd8c2df070c60b045671b8b24ff02");
        assert_eq!(creds.qop, None);
        assert_eq!(creds.cnonce, None);
        assert_eq!(creds.nonce_count, None);
        let text = creds.to_string();
        assert!(!text.contains("nc="), "{text}");
        assert!(!text.contains("cnonce"), "{text}");
    }

    #[test]
    fn unanswerable_challenges_fail() {
        let req = DigestRequest::new("REGISTER", "sip:example.com");
        let mut c = Challenge::new("r", "n");
        c.algorithm = Some(Algorithm::Md5Sess);
        assert_eq!(
            answer_challenge(&c, "u", "p", &req, "c", 1),
            Err(DigestError::SessionAlgorithmWithoutQop)
        );
        c.algorithm = None;
        c.qop = Some(vec![]);
        assert_eq!(
            answer_challenge(&c, "u", "p", &req, "c", 1),
            Err(DigestError::UnsupportedQop)
        );
        c.qop = None;
        assert_eq!(
            answer_challenge(&c, "u\r\nX: y", "p", &req, "c", 1),
            Err(DigestError::UnsafeValue("username"))
        );
    }

    #[test]
    fn auth_int_only_challenge_uses_auth_int() {
        let mut c = Challenge::new("r", "n");
        c.qop = Some(vec![Qop::AuthInt]);
        let with_body = |body: &'static [u8]| {
            answer_challenge(
                &c,
                "u",
                "p",
                &DigestRequest::with_body("INVITE", "sip:b@r", body),
                "c",
                1,
            )
            .unwrap()
        };
        let a = with_body(b"v=0\r\n");
        assert_eq!(a.qop, Some(Qop::AuthInt));
        assert_ne!(a.response, with_body(b"v=1\r\n").response);
    }

    #[test]
    fn client_counts_nonces_and_draws_fresh_cnonces() {
        let mut client = DigestClient::new("Mufasa", "Circle Of Life");
        let req = DigestRequest::new("GET", "/dir/index.html");
        assert!(client.authorize_again(&req).is_none());
        let first = client
            .respond_to_headers([RFC2617_CHALLENGE], &req)
            .unwrap();
        let second = client.authorize_again(&req).unwrap().unwrap();
        assert_eq!(first.nonce_count, Some(1));
        assert_eq!(second.nonce_count, Some(2));
        assert_ne!(first.cnonce, second.cnonce);
        assert_eq!(first.cnonce.as_ref().map(String::len), Some(32));
        // A new nonce starts at 1 again.
        let mut other = Challenge::parse(RFC2617_CHALLENGE).unwrap();
        other.nonce = "fresh".into();
        assert_eq!(client.respond(&other, &req).unwrap().nonce_count, Some(1));
        // The old nonce keeps counting.
        let old = Challenge::parse(RFC2617_CHALLENGE).unwrap();
        assert_eq!(client.respond(&old, &req).unwrap().nonce_count, Some(3));
        client.reset();
        assert!(client.authorize_again(&req).is_none());
        assert!(!format!("{client:?}").contains("Circle"));
    }

    #[test]
    fn client_tracks_a_bounded_number_of_nonces() {
        let mut client = DigestClient::new("u", "p");
        let req = DigestRequest::new("REGISTER", "sip:r");
        for i in 0..100 {
            let mut c = Challenge::new("r", format!("n{i}"));
            c.qop = Some(vec![Qop::Auth]);
            client.respond(&c, &req).unwrap();
        }
        assert_eq!(client.nonce_counts.len(), MAX_TRACKED_NONCES);
    }
}
