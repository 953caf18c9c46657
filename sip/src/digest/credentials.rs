//! Digest credentials: the value of `Authorization` / `Proxy-Authorization`.
//!
//! Parses ([`Credentials::parse`]) and formats ([`std::fmt::Display`]) credentials. It checks
//! their shape (required fields, `nc` syntax, qop consistency) but not whether they are right;
//! that is [`super::DigestServer`]'s job.

use super::hash::format_nc;
use super::params::{parse_auth_items, write_quoted, write_token, ParamTable};
use super::{Algorithm, DigestError, Qop};
use std::fmt;
use std::str::FromStr;

/// Digest credentials answering a challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The realm of the challenge answered.
    pub realm: String,
    /// The nonce of the challenge answered.
    pub nonce: String,
    /// The digest-uri: the Request-URI the client used.
    pub uri: String,
    /// The computed response, hex.
    pub response: String,
    /// The algorithm; `None` means MD5.
    pub algorithm: Option<Algorithm>,
    /// The client nonce (present when a qop is used).
    pub cnonce: Option<String>,
    /// The opaque value echoed from the challenge.
    pub opaque: Option<String>,
    /// The qop used; `None` in RFC 2069 mode.
    pub qop: Option<Qop>,
    /// The nonce count (present when a qop is used).
    pub nonce_count: Option<u32>,
}

impl Credentials {
    /// Parses a header value holding one set of Digest credentials.
    pub fn parse(value: &str) -> Result<Self, DigestError> {
        let items = parse_auth_items(value)?;
        let item = match items.as_slice() {
            [item] => item,
            _ => return Err(DigestError::MultipleChallenges),
        };
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
        let qop = match table.get("qop") {
            None => None,
            Some(token) => Some(Qop::from_token(token).ok_or(DigestError::UnsupportedQop)?),
        };
        let nonce_count = match table.get("nc") {
            None => None,
            Some(text) => Some(parse_nc(text)?),
        };
        let cnonce = table.get("cnonce").map(str::to_string);
        if qop.is_some() {
            if cnonce.is_none() {
                return Err(DigestError::MissingParam("cnonce"));
            }
            if nonce_count.is_none() {
                return Err(DigestError::MissingParam("nc"));
            }
        }
        Ok(Credentials {
            username: table.require("username")?.to_string(),
            realm: table.require("realm")?.to_string(),
            nonce: table.require("nonce")?.to_string(),
            uri: table.require("uri")?.to_string(),
            response: table.require("response")?.to_string(),
            algorithm,
            cnonce,
            opaque: table.get("opaque").map(str::to_string),
            qop,
            nonce_count,
        })
    }

    /// The algorithm in effect (MD5 when none is named).
    pub fn effective_algorithm(&self) -> Algorithm {
        self.algorithm.unwrap_or(Algorithm::Md5)
    }
}

/// `nc` is exactly 8 hex digits; peers that quote it are tolerated.
fn parse_nc(text: &str) -> Result<u32, DigestError> {
    let text = text.trim();
    if text.len() != 8 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DigestError::InvalidParam("nc"));
    }
    u32::from_str_radix(text, 16).map_err(|_| DigestError::InvalidParam("nc"))
}

impl FromStr for Credentials {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Credentials::parse(s)
    }
}

impl fmt::Display for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::from("Digest ");
        write_quoted(&mut out, "username", &self.username);
        out.push_str(", ");
        write_quoted(&mut out, "realm", &self.realm);
        out.push_str(", ");
        write_quoted(&mut out, "nonce", &self.nonce);
        out.push_str(", ");
        write_quoted(&mut out, "uri", &self.uri);
        out.push_str(", ");
        write_quoted(&mut out, "response", &self.response);
        if let Some(algorithm) = self.algorithm {
            out.push_str(", ");
            write_token(&mut out, "algorithm", algorithm.as_str());
        }
        if let Some(cnonce) = &self.cnonce {
            out.push_str(", ");
            write_quoted(&mut out, "cnonce", cnonce);
        }
        if let Some(opaque) = &self.opaque {
            out.push_str(", ");
            write_quoted(&mut out, "opaque", opaque);
        }
        if let Some(qop) = self.qop {
            out.push_str(", ");
            write_token(&mut out, "qop", qop.as_str());
        }
        if let Some(nc) = self.nonce_count {
            out.push_str(", ");
            write_token(&mut out, "nc", &format_nc(nc));
        }
        f.write_str(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC2617: &str = "Digest username=\"Mufasa\",\r\n                 realm=\"testrealm@host.com\",\r\n                 nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\",\r\n                 uri=\"/dir/index.html\",\r\n                 qop=auth,\r\n                 nc=00000001,\r\n                 cnonce=\"0a4f113b\",\r\n                 response=\"6629fae49393a05397450978507c4ef1\",\r\n                 opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"";

    #[test]
    fn parses_rfc2617_credentials() {
        let c = Credentials::parse(RFC2617).unwrap();
        assert_eq!(c.username, "Mufasa");
        assert_eq!(c.realm, "testrealm@host.com");
        assert_eq!(c.uri, "/dir/index.html");
        assert_eq!(c.qop, Some(Qop::Auth));
        assert_eq!(c.nonce_count, Some(1));
        assert_eq!(c.cnonce.as_deref(), Some("0a4f113b"));
        assert_eq!(c.response, "6629fae49393a05397450978507c4ef1");
        assert_eq!(c.effective_algorithm(), Algorithm::Md5);
    }

    #[test]
    fn formats_and_reparses() {
        let c = Credentials::parse(RFC2617).unwrap();
        let text = c.to_string();
        assert_eq!(
            text,
            "Digest username=\"Mufasa\", realm=\"testrealm@host.com\", nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", uri=\"/dir/index.html\", response=\"6629fae49393a05397450978507c4ef1\", cnonce=\"0a4f113b\", opaque=\"5ccc069c403ebaf9f0171e9517f40e41\", qop=auth, nc=00000001"
        );
        assert_eq!(Credentials::parse(&text).unwrap(), c);
    }

    #[test]
    fn tolerates_quoted_qop_and_nc_and_odd_case() {
        let c = Credentials::parse(
            "DIGEST Username=\"u\",REALM=\"r\",nonce=\"n\",uri=\"sip:r\",response=\"ab\",qop=\"AUTH\",nc=\"0000000A\",cnonce=\"c\",algorithm=\"sha-256\"",
        )
        .unwrap();
        assert_eq!(c.qop, Some(Qop::Auth));
        assert_eq!(c.nonce_count, Some(10));
        assert_eq!(c.algorithm, Some(Algorithm::Sha256));
    }

    #[test]
    fn rfc2069_credentials_need_no_qop() {
        let c = Credentials::parse(
            "Digest username=\"u\", realm=\"r\", nonce=\"n\", uri=\"sip:r\", response=\"ab\"",
        )
        .unwrap();
        assert_eq!(c.qop, None);
        assert_eq!(c.nonce_count, None);
        assert_eq!(c.cnonce, None);
    }

    #[test]
    fn rejects_bad_credentials() {
        let base =
            "Digest username=\"u\", realm=\"r\", nonce=\"n\", uri=\"sip:r\", response=\"ab\"";
        for (extra, expected) in [
            (
                ", qop=auth, nc=00000001",
                DigestError::MissingParam("cnonce"),
            ),
            (", qop=auth, cnonce=\"c\"", DigestError::MissingParam("nc")),
            (
                ", qop=auth, cnonce=\"c\", nc=1",
                DigestError::InvalidParam("nc"),
            ),
            (
                ", qop=auth, cnonce=\"c\", nc=0000000g",
                DigestError::InvalidParam("nc"),
            ),
            (", qop=auth-conf", DigestError::UnsupportedQop),
            (
                ", algorithm=SHA-1",
                DigestError::UnsupportedAlgorithm("SHA-1".into()),
            ),
            (
                ", username=\"v\"",
                DigestError::DuplicateParam("username".into()),
            ),
        ] {
            assert_eq!(
                Credentials::parse(&format!("{base}{extra}")),
                Err(expected),
                "{extra}"
            );
        }
        assert_eq!(
            Credentials::parse("Digest realm=\"r\", nonce=\"n\", uri=\"u\", response=\"x\""),
            Err(DigestError::MissingParam("username"))
        );
        assert!(matches!(
            Credentials::parse("Basic dXNlcjpwYXNz"),
            Err(DigestError::NotDigest(_))
        ));
    }
}
