//! Digest challenges: the value of `WWW-Authenticate` / `Proxy-Authenticate`.
//!
//! Parses one challenge ([`Challenge::parse`]), all challenges of one or more header values
//! ([`parse_challenges`]) and picks the strongest one the client supports
//! ([`select_challenge`]). Formats a challenge with [`std::fmt::Display`] (quoting what must be
//! quoted). It does not compute anything.

use super::params::{parse_auth_items, write_quoted, write_token, AuthItem, ParamTable};
use super::{Algorithm, DigestError, Qop};
use std::fmt;
use std::str::FromStr;

/// A digest challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The protection space, e.g. `example.com`.
    pub realm: String,
    /// The server nonce.
    pub nonce: String,
    /// Opaque data the client must echo.
    pub opaque: Option<String>,
    /// The algorithm; `None` when the challenge names none, which means MD5.
    pub algorithm: Option<Algorithm>,
    /// The qop options offered: `None` when the challenge has no `qop` directive (RFC 2069
    /// mode); `Some` with the supported options otherwise (empty if only unknown ones were
    /// offered, which makes the challenge unanswerable).
    pub qop: Option<Vec<Qop>>,
    /// `stale=TRUE`: the previous credentials were right but their nonce expired; retry with the
    /// new nonce without asking the user again.
    pub stale: bool,
    /// The `domain` directive, kept verbatim.
    pub domain: Option<String>,
}

impl Challenge {
    /// A challenge with the given realm and nonce and nothing else.
    pub fn new(realm: impl Into<String>, nonce: impl Into<String>) -> Self {
        Challenge {
            realm: realm.into(),
            nonce: nonce.into(),
            opaque: None,
            algorithm: None,
            qop: None,
            stale: false,
            domain: None,
        }
    }

    /// Parses a header value holding exactly one Digest challenge.
    pub fn parse(value: &str) -> Result<Self, DigestError> {
        let items = parse_auth_items(value)?;
        match items.as_slice() {
            [item] => Challenge::from_item(item),
            _ => Err(DigestError::MultipleChallenges),
        }
    }

    /// The algorithm in effect (MD5 when none is named).
    pub fn effective_algorithm(&self) -> Algorithm {
        self.algorithm.unwrap_or(Algorithm::Md5)
    }

    /// Whether a client of this module can answer the challenge.
    pub fn is_answerable(&self) -> bool {
        let qop_ok = match &self.qop {
            None => !self.effective_algorithm().is_session(),
            Some(options) => !options.is_empty(),
        };
        qop_ok && !self.nonce.is_empty()
    }

    pub(crate) fn from_item(item: &AuthItem) -> Result<Self, DigestError> {
        if !item.is_digest() {
            return Err(DigestError::NotDigest(item.scheme.clone()));
        }
        let table = ParamTable::new(&item.params)?;
        let algorithm = match table.get("algorithm") {
            None => None,
            Some(token) => Some(
                Algorithm::from_token(token)
                    .ok_or_else(|| DigestError::UnsupportedAlgorithm(token.to_string()))?,
            ),
        };
        let qop = table.get("qop").map(|list| {
            let mut options: Vec<Qop> = Vec::new();
            for option in list.split(',').filter_map(Qop::from_token) {
                if !options.contains(&option) {
                    options.push(option);
                }
            }
            options
        });
        let stale = match table.get("stale") {
            None => false,
            Some(v) if v.trim().eq_ignore_ascii_case("true") => true,
            Some(v) if v.trim().eq_ignore_ascii_case("false") => false,
            Some(_) => return Err(DigestError::InvalidParam("stale")),
        };
        Ok(Challenge {
            realm: table.require("realm")?.to_string(),
            nonce: table.require("nonce")?.to_string(),
            opaque: table.get("opaque").map(str::to_string),
            algorithm,
            qop,
            stale,
            domain: table.get("domain").map(str::to_string),
        })
    }
}

impl FromStr for Challenge {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Challenge::parse(s)
    }
}

impl fmt::Display for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::from("Digest ");
        write_quoted(&mut out, "realm", &self.realm);
        if let Some(domain) = &self.domain {
            out.push_str(", ");
            write_quoted(&mut out, "domain", domain);
        }
        out.push_str(", ");
        write_quoted(&mut out, "nonce", &self.nonce);
        if let Some(opaque) = &self.opaque {
            out.push_str(", ");
            write_quoted(&mut out, "opaque", opaque);
        }
        if self.stale {
            out.push_str(", stale=TRUE");
        }
        if let Some(algorithm) = self.algorithm {
            out.push_str(", ");
            write_token(&mut out, "algorithm", algorithm.as_str());
        }
        if let Some(options) = &self.qop {
            let list: Vec<&str> = options.iter().map(|q| q.as_str()).collect();
            out.push_str(", ");
            write_quoted(&mut out, "qop", &list.join(","));
        }
        f.write_str(&out)
    }
}

/// Parses every challenge in the given header values (each value may hold several
/// challenges). Each entry is the parse result of one challenge, so one bad or non-Digest
/// challenge does not hide the others; a value that cannot be tokenized at all gives one error.
pub fn parse_challenges<'a, I>(header_values: I) -> Vec<Result<Challenge, DigestError>>
where
    I: IntoIterator<Item = &'a str>,
{
    let mut out = Vec::new();
    for value in header_values {
        match parse_auth_items(value) {
            Ok(items) => out.extend(items.iter().map(Challenge::from_item)),
            Err(e) => out.push(Err(e)),
        }
        if out.len() > super::MAX_PARAMS {
            break;
        }
    }
    out
}

/// Picks the challenge to answer among all challenges of the given header values: the
/// strongest supported algorithm (SHA-256 over MD5), and among equals the first one, which is
/// the server's preference (RFC 7616 section 3.7). Non-Digest, malformed and unanswerable
/// challenges are skipped.
pub fn select_challenge<'a, I>(header_values: I) -> Result<Challenge, DigestError>
where
    I: IntoIterator<Item = &'a str>,
{
    let mut best: Option<Challenge> = None;
    for challenge in parse_challenges(header_values).into_iter().flatten() {
        if !challenge.is_answerable() {
            continue;
        }
        let better = match &best {
            None => true,
            Some(b) => {
                challenge.effective_algorithm().strength() > b.effective_algorithm().strength()
            }
        };
        if better {
            best = Some(challenge);
        }
    }
    best.ok_or(DigestError::NoUsableChallenge)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC2617: &str = "Digest realm=\"testrealm@host.com\", qop=\"auth,auth-int\", nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"";

    #[test]
    fn parses_rfc2617_challenge() {
        let c = Challenge::parse(RFC2617).unwrap();
        assert_eq!(c.realm, "testrealm@host.com");
        assert_eq!(c.nonce, "dcd98b7102dd2f0e8b11d0f600bfb0c093");
        assert_eq!(
            c.opaque.as_deref(),
            Some("5ccc069c403ebaf9f0171e9517f40e41")
        );
        assert_eq!(c.qop, Some(vec![Qop::Auth, Qop::AuthInt]));
        assert_eq!(c.algorithm, None);
        assert_eq!(c.effective_algorithm(), Algorithm::Md5);
        assert!(!c.stale);
    }

    #[test]
    fn tolerates_case_spacing_and_unquoted_values() {
        let c = Challenge::parse(
            "digest REALM=sip.example.net ,  NONCE = \"n1\",ALGORITHM=sha-256-SESS,qop=AUTH ,stale=true",
        )
        .unwrap();
        assert_eq!(c.realm, "sip.example.net");
        assert_eq!(c.nonce, "n1");
        assert_eq!(c.algorithm, Some(Algorithm::Sha256Sess));
        assert_eq!(c.qop, Some(vec![Qop::Auth]));
        assert!(c.stale);
    }

    #[test]
    fn formats_and_reparses() {
        let mut c = Challenge::new("a \"quoted\" realm", "n");
        c.algorithm = Some(Algorithm::Sha256);
        c.qop = Some(vec![Qop::Auth, Qop::AuthInt]);
        c.stale = true;
        c.opaque = Some("op".into());
        c.domain = Some("sip:example.com".into());
        let text = c.to_string();
        assert_eq!(
            text,
            "Digest realm=\"a \\\"quoted\\\" realm\", domain=\"sip:example.com\", nonce=\"n\", opaque=\"op\", stale=TRUE, algorithm=SHA-256, qop=\"auth,auth-int\""
        );
        assert_eq!(Challenge::parse(&text).unwrap(), c);
    }

    #[test]
    fn rejects_bad_challenges() {
        assert!(matches!(
            Challenge::parse("Basic realm=\"x\""),
            Err(DigestError::NotDigest(_))
        ));
        assert_eq!(
            Challenge::parse("Digest nonce=\"x\""),
            Err(DigestError::MissingParam("realm"))
        );
        assert_eq!(
            Challenge::parse("Digest realm=\"x\""),
            Err(DigestError::MissingParam("nonce"))
        );
        assert!(matches!(
            Challenge::parse("Digest realm=x, nonce=y, algorithm=SHA-512-256"),
            Err(DigestError::UnsupportedAlgorithm(a)) if a == "SHA-512-256"
        ));
        assert_eq!(
            Challenge::parse("Digest realm=x, nonce=y, stale=maybe"),
            Err(DigestError::InvalidParam("stale"))
        );
        assert_eq!(
            Challenge::parse("Digest realm=x, nonce=y, Digest realm=x, nonce=z"),
            Err(DigestError::MultipleChallenges)
        );
    }

    #[test]
    fn unknown_qop_options_are_dropped() {
        let c = Challenge::parse("Digest realm=x, nonce=y, qop=\"auth-conf, auth\"").unwrap();
        assert_eq!(c.qop, Some(vec![Qop::Auth]));
        let c = Challenge::parse("Digest realm=x, nonce=y, qop=\"auth-conf\"").unwrap();
        assert_eq!(c.qop, Some(vec![]));
        assert!(!c.is_answerable());
    }

    #[test]
    fn selects_strongest_supported_challenge() {
        let md5 = "Digest realm=\"r\", nonce=\"m\", algorithm=MD5, qop=\"auth\"";
        let sha = "Digest realm=\"r\", nonce=\"s\", algorithm=SHA-256, qop=\"auth\"";
        assert_eq!(select_challenge([md5, sha]).unwrap().nonce, "s");
        assert_eq!(select_challenge([sha, md5]).unwrap().nonce, "s");
        // Both in one value, plus an unsupported one and a Basic one.
        let combined = format!(
            "Basic realm=\"r\", Digest realm=\"r\", nonce=\"x\", algorithm=SHA-512-256, {md5}"
        );
        assert_eq!(select_challenge([combined.as_str()]).unwrap().nonce, "m");
        // Equal strength: the first (server preference) wins.
        let md5b = "Digest realm=\"r\", nonce=\"m2\", qop=\"auth\"";
        assert_eq!(select_challenge([md5, md5b]).unwrap().nonce, "m");
        assert_eq!(
            select_challenge(["Basic realm=x", "garbage \"", ""]),
            Err(DigestError::NoUsableChallenge)
        );
    }
}
