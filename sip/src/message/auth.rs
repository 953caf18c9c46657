//! Authentication header values (RFC 3261 section 20.7, 20.27, 20.28, 20.44; RFC 7235 syntax):
//! [`Credentials`] for Authorization / Proxy-Authorization and [`Challenge`] for
//! WWW-Authenticate / Proxy-Authenticate. Each is a scheme plus either `name=value` parameters or
//! a token68 blob; unknown schemes parse the same way (RFC 4475 regaut01).
//!
//! This module only handles syntax; computing and checking digests lives in the `digest` module.

use std::fmt;

use super::syntax::{is_token_byte, quote_into, quoted_end, skip_ws, split_list, unquote};

/// One authentication parameter. The value is stored unquoted; `quoted` records whether it is
/// written as a quoted-string (digest requires some parameters quoted and others not).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuthParam {
    /// Parameter name as written (compare case-insensitively).
    pub name: String,
    /// Value, with quotes removed and quoted-pairs resolved.
    pub value: String,
    /// True when the value is written as a quoted-string.
    pub quoted: bool,
}

impl AuthParam {
    /// A parameter written as a quoted-string.
    pub fn quoted(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
            quoted: true,
        }
    }

    /// A parameter written as a bare token.
    pub fn token(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
            quoted: false,
        }
    }
}

/// Why an authentication header was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid authentication header: {0}")]
pub struct AuthError(pub &'static str);

macro_rules! auth_value {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name {
            /// Scheme as written (`Digest`, `Basic`, ...; compare case-insensitively).
            pub scheme: String,
            /// `name=value` parameters, in order.
            pub params: Vec<AuthParam>,
            /// A token68 blob (`Basic dXNlcjpwYXNz`) instead of parameters.
            pub token68: Option<String>,
        }

        impl $name {
            /// A value with the given scheme and no parameters.
            pub fn new(scheme: impl Into<String>) -> Self {
                Self { scheme: scheme.into(), params: Vec::new(), token68: None }
            }

            /// The (unquoted) value of parameter `name`, ignoring case.
            pub fn param(&self, name: &str) -> Option<&str> {
                self.params
                    .iter()
                    .find(|p| p.name.eq_ignore_ascii_case(name))
                    .map(|p| p.value.as_str())
            }

            /// Sets parameter `name` (replacing an existing one) or appends it.
            pub fn set_param(&mut self, param: AuthParam) {
                match self.params.iter_mut().find(|p| p.name.eq_ignore_ascii_case(&param.name)) {
                    Some(p) => *p = param,
                    None => self.params.push(param),
                }
            }

            /// True when the scheme is `name`, ignoring case.
            pub fn is_scheme(&self, name: &str) -> bool {
                self.scheme.eq_ignore_ascii_case(name)
            }

            /// Parses every value in one header line (usually one; WWW-Authenticate may hold
            /// several challenges separated by commas).
            pub fn parse_list(s: &str) -> Result<Vec<Self>, AuthError> {
                Ok(parse_auth_list(s)?
                    .into_iter()
                    .map(|r| Self { scheme: r.scheme, params: r.params, token68: r.token68 })
                    .collect())
            }

            /// Parses a header line holding exactly one value.
            pub fn parse(s: &str) -> Result<Self, AuthError> {
                let mut list = Self::parse_list(s)?;
                match (list.pop(), list.is_empty()) {
                    (Some(v), true) => Ok(v),
                    (None, _) => Err(AuthError("empty value")),
                    (Some(_), false) => Err(AuthError("more than one scheme")),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_auth(f, &self.scheme, &self.params, self.token68.as_deref())
            }
        }
    };
}

auth_value! {
    /// Credentials from an Authorization or Proxy-Authorization header.
    Credentials
}

auth_value! {
    /// A challenge from a WWW-Authenticate or Proxy-Authenticate header.
    Challenge
}

fn write_auth(
    f: &mut fmt::Formatter<'_>,
    scheme: &str,
    params: &[AuthParam],
    token68: Option<&str>,
) -> fmt::Result {
    f.write_str(scheme)?;
    if let Some(t) = token68 {
        return write!(f, " {t}");
    }
    for (i, p) in params.iter().enumerate() {
        f.write_str(if i == 0 { " " } else { ", " })?;
        f.write_str(&p.name)?;
        f.write_str("=")?;
        if p.quoted {
            let mut q = String::with_capacity(p.value.len() + 2);
            quote_into(&mut q, &p.value);
            f.write_str(&q)?;
        } else {
            f.write_str(&p.value)?;
        }
    }
    Ok(())
}

struct RawAuth {
    scheme: String,
    params: Vec<AuthParam>,
    token68: Option<String>,
}

fn token_end(b: &[u8], start: usize) -> usize {
    let mut i = start;
    while b.get(i).is_some_and(|&c| is_token_byte(c)) {
        i += 1;
    }
    i
}

fn is_token68(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

/// Parses `name SWS = SWS (token / quoted-string)` filling the whole of `s`.
fn parse_auth_param(s: &str) -> Option<AuthParam> {
    let b = s.as_bytes();
    let name_end = token_end(b, 0);
    if name_end == 0 {
        return None;
    }
    let eq = skip_ws(b, name_end);
    if b.get(eq) != Some(&b'=') {
        return None;
    }
    let vstart = skip_ws(b, eq + 1);
    let (value, quoted, end) = if b.get(vstart) == Some(&b'"') {
        let end = quoted_end(b, vstart)?;
        (unquote(s.get(vstart..end)?).into_owned(), true, end)
    } else {
        let mut end = vstart;
        while b
            .get(end)
            .is_some_and(|&c| c > 0x20 && c != b'"' && c != b',' && c != 0x7f)
        {
            end += 1;
        }
        if end == vstart {
            return None;
        }
        (s.get(vstart..end)?.to_owned(), false, end)
    };
    if skip_ws(b, end) != b.len() {
        return None;
    }
    Some(AuthParam {
        name: s.get(..name_end)?.to_owned(),
        value,
        quoted,
    })
}

fn parse_auth_list(s: &str) -> Result<Vec<RawAuth>, AuthError> {
    let mut out: Vec<RawAuth> = Vec::new();
    for item in split_list(s) {
        if item.is_empty() {
            continue;
        }
        let b = item.as_bytes();
        let tok = token_end(b, 0);
        if tok == 0 {
            return Err(AuthError("expected a scheme or a parameter name"));
        }
        let after = skip_ws(b, tok);
        let starts_scheme = after == b.len() || (after > tok && b.get(after) != Some(&b'='));
        if !starts_scheme {
            let param = parse_auth_param(item).ok_or(AuthError("malformed parameter"))?;
            let current = out
                .last_mut()
                .ok_or(AuthError("parameter before any scheme"))?;
            if current.token68.is_some() {
                return Err(AuthError("parameter after a token68 value"));
            }
            current.params.push(param);
            continue;
        }
        let mut raw = RawAuth {
            scheme: item.get(..tok).unwrap_or_default().to_owned(),
            params: Vec::new(),
            token68: None,
        };
        let rest = item.get(after..).unwrap_or_default();
        if !rest.is_empty() {
            if is_token68(rest) {
                raw.token68 = Some(rest.to_owned());
            } else {
                raw.params
                    .push(parse_auth_param(rest).ok_or(AuthError("malformed parameter"))?);
            }
        }
        out.push(raw);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_credentials() {
        let c = Credentials::parse(
            r#"Digest username="bob", realm="biloxi.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="sip:bob@biloxi.com", qop=auth, nc=00000001, cnonce="0a4f113b", response="6629fae49393a05397450978507c4ef1", opaque="5ccc069c403ebaf9f0171e9517f40e41""#,
        )
        .unwrap();
        assert!(c.is_scheme("digest"));
        assert_eq!(c.param("USERNAME"), Some("bob"));
        assert_eq!(c.param("qop"), Some("auth"));
        assert_eq!(c.param("nc"), Some("00000001"));
        assert_eq!(c.params.len(), 9);
        assert!(c.params.iter().find(|p| p.name == "uri").unwrap().quoted);
        assert!(!c.params.iter().find(|p| p.name == "qop").unwrap().quoted);
        assert_eq!(Credentials::parse(&c.to_string()).unwrap(), c);
    }

    #[test]
    fn unknown_scheme_and_token68() {
        let c = Credentials::parse("NoOneKnowsThisScheme opaque-data=here").unwrap();
        assert_eq!(c.scheme, "NoOneKnowsThisScheme");
        assert_eq!(c.param("opaque-data"), Some("here"));
        let b = Credentials::parse("Basic dXNlcjpwYXNz==").unwrap();
        assert_eq!(b.token68.as_deref(), Some("dXNlcjpwYXNz=="));
        assert_eq!(b.to_string(), "Basic dXNlcjpwYXNz==");
    }

    #[test]
    fn several_challenges_in_one_line() {
        let list = Challenge::parse_list(
            r#"Digest realm="a, b", nonce = "n1", algorithm=MD5, Basic realm="x", Newauth"#,
        )
        .unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].param("realm"), Some("a, b"));
        assert_eq!(list[0].param("nonce"), Some("n1"));
        assert_eq!(list[0].param("algorithm"), Some("MD5"));
        assert_eq!(list[1].scheme, "Basic");
        assert_eq!(list[2].scheme, "Newauth");
        assert!(list[2].params.is_empty());
        assert!(Challenge::parse(r#"Digest realm="a", Basic realm="b""#).is_err());
    }

    #[test]
    fn quoted_values_escape_on_display() {
        let mut c = Challenge::new("Digest");
        c.set_param(AuthParam::quoted("realm", r#"a "q" \ b"#));
        c.set_param(AuthParam::token("stale", "FALSE"));
        c.set_param(AuthParam::token("stale", "TRUE"));
        assert_eq!(c.to_string(), r#"Digest realm="a \"q\" \\ b", stale=TRUE"#);
        assert_eq!(Challenge::parse(&c.to_string()).unwrap(), c);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "realm=\"x\"",
            "Digest realm=\"x\", nonce=",
            "Digest realm=\"open",
            "Digest realm=\"x\" junk",
            "",
            "Basic abc, realm=x",
            "\"Digest\"",
        ] {
            assert!(
                Credentials::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}
