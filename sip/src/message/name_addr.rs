//! The address form shared by From, To, Contact, Route, Record-Route, Reply-To, Refer-To...:
//! `[display-name] <URI> *(;param)` (name-addr) or `URI *(;param)` (addr-spec), RFC 3261
//! section 20.10 and 25.1.
//!
//! In the addr-spec form everything after the first `;` is a header parameter, never a URI
//! parameter (RFC 3261 section 20.10), and a URI holding `?` must be enclosed in `<>`. The
//! tolerance of RFC 4475 is applied: no white space is needed between a display name and `<`,
//! and white space is allowed around `;` and `=`. Lists are split by the callers.

use std::fmt;
use std::str::FromStr;

use super::params::{Param, Params};
use super::syntax::{
    is_token_byte, quote_into, quoted_end, scan_params, skip_ws, trim_ws_str, unquote, SyntaxResult,
};
use super::uri::{Uri, UriError};

/// An address with an optional display name and header parameters (such as `tag`, `expires`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NameAddr {
    /// The display name, unquoted (quoted-pairs resolved); `None` when absent.
    pub display_name: Option<String>,
    /// The address.
    pub uri: Uri,
    /// Header parameters (after the `>` or after the addr-spec), as written.
    pub params: Params,
}

/// Why an address was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameAddrError {
    /// Syntax error outside the URI.
    #[error("{0}")]
    Syntax(&'static str),
    /// The URI itself is malformed.
    #[error("invalid URI: {0}")]
    Uri(#[from] UriError),
}

/// The pieces of an address, borrowed from the header text, before any validation of the URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NameAddrParts<'a> {
    /// Display name as written: a quoted-string (quotes kept) or tokens and spaces.
    pub display: Option<&'a str>,
    /// URI text.
    pub uri: &'a str,
    /// Text after the URI (or after `>`): the parameters, with their leading `;`.
    pub params: &'a str,
}

/// Splits one address (a single list element) into its pieces.
pub(crate) fn split_name_addr(s: &str) -> SyntaxResult<NameAddrParts<'_>> {
    let s = trim_ws_str(s);
    let b = s.as_bytes();
    if b.is_empty() {
        return Err("empty address");
    }
    let (display, lt) = if b.first() == Some(&b'"') {
        let end = quoted_end(b, 0).ok_or("unterminated quoted display name")?;
        let lt = skip_ws(b, end);
        if b.get(lt) != Some(&b'<') {
            return Err("display name not followed by <");
        }
        (s.get(..end), lt)
    } else {
        let mut i = 0;
        while b
            .get(i)
            .is_some_and(|&c| is_token_byte(c) || c == b' ' || c == b'\t')
        {
            i += 1;
        }
        if b.get(i) == Some(&b'<') {
            let name = trim_ws_str(s.get(..i).unwrap_or_default());
            ((!name.is_empty()).then_some(name), i)
        } else {
            // addr-spec: the URI runs up to the first `;` or white space.
            let end = b
                .iter()
                .position(|&c| matches!(c, b';' | b' ' | b'\t'))
                .unwrap_or(s.len());
            let (uri, params) = s.split_at(end);
            if uri.contains(['?', ',']) {
                return Err("an address with '?' or ',' must be enclosed in <>");
            }
            return Ok(NameAddrParts {
                display: None,
                uri,
                params,
            });
        }
    };
    let rest = s.get(lt + 1..).unwrap_or_default();
    let gt = rest.find('>').ok_or("missing >")?;
    let (uri, params) = rest.split_at(gt);
    Ok(NameAddrParts {
        display,
        uri,
        params: params.get(1..).unwrap_or_default(),
    })
}

impl NameAddr {
    /// An address without display name or parameters.
    pub fn new(uri: Uri) -> Self {
        Self {
            display_name: None,
            uri,
            params: Params::new(),
        }
    }

    /// Sets the display name; builder style.
    pub fn with_display_name(mut self, name: impl Into<String>) -> Self {
        self.display_name = Some(name.into());
        self
    }

    /// Adds or replaces a header parameter; builder style.
    pub fn with_param(mut self, name: &str, value: Option<&str>) -> Self {
        self.params.set(name, value);
        self
    }

    /// Parses one address (not a list).
    pub fn parse(s: &str) -> Result<Self, NameAddrError> {
        let parts = split_name_addr(s).map_err(NameAddrError::Syntax)?;
        Self::from_parts(parts)
    }

    pub(crate) fn from_parts(parts: NameAddrParts<'_>) -> Result<Self, NameAddrError> {
        let uri = Uri::parse(parts.uri)?;
        let params = parse_params(parts.params).map_err(NameAddrError::Syntax)?;
        let display_name = parts.display.map(|d| unquote(d).into_owned());
        Ok(Self {
            display_name,
            uri,
            params,
        })
    }

    /// The `tag` parameter (From and To).
    pub fn tag(&self) -> Option<&str> {
        self.params.value("tag")
    }

    /// Sets the `tag` parameter.
    pub fn set_tag(&mut self, tag: &str) {
        self.params.set("tag", Some(tag));
    }

    /// Value of a header parameter, as written.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.value(name)
    }

    /// The `expires` parameter of a Contact, when it is a valid number (values too large for 32
    /// bits are reported as `u32::MAX`).
    pub fn expires(&self) -> Option<u32> {
        self.params.value("expires").and_then(parse_delta_seconds)
    }

    /// The `q` parameter of a Contact, when valid (0 to 1).
    pub fn q(&self) -> Option<f32> {
        self.params
            .value("q")
            .and_then(|q| q.parse::<f32>().ok())
            .filter(|q| (0.0..=1.0).contains(q))
    }
}

/// Parses delta-seconds, saturating at `u32::MAX` (RFC 3261 section 20.19 lets a too large value
/// be treated as the largest one).
pub(crate) fn parse_delta_seconds(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        s.parse::<u64>()
            .map_or(u32::MAX, |v| u32::try_from(v).unwrap_or(u32::MAX)),
    )
}

/// Parses a full generic-parameter list into owned [`Params`].
pub(crate) fn parse_params(s: &str) -> SyntaxResult<Params> {
    scan_params(s)
        .map(|r| r.map(|(n, v)| Param::new(n, v)))
        .collect()
}

impl FromStr for NameAddr {
    type Err = NameAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NameAddr::parse(s)
    }
}

/// Always writes the `<>` form, with the display name quoted.
impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.display_name {
            let mut q = String::new();
            quote_into(&mut q, d);
            write!(f, "{q} ")?;
        }
        write!(f, "<{}>{}", self.uri, self.params)
    }
}

/// One Contact header value: `*` (remove all bindings, REGISTER only) or an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Contact {
    /// `Contact: *`.
    Wildcard,
    /// A contact address with its parameters (`expires`, `q`...).
    Address(NameAddr),
}

impl Contact {
    /// The address, unless this is the wildcard.
    pub fn address(&self) -> Option<&NameAddr> {
        match self {
            Contact::Wildcard => None,
            Contact::Address(a) => Some(a),
        }
    }

    /// Parses one Contact value.
    pub fn parse(s: &str) -> Result<Self, NameAddrError> {
        if trim_ws_str(s) == "*" {
            Ok(Contact::Wildcard)
        } else {
            NameAddr::parse(s).map(Contact::Address)
        }
    }
}

impl fmt::Display for Contact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Contact::Wildcard => f.write_str("*"),
            Contact::Address(a) => a.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::uri::SipUri;

    fn na(s: &str) -> NameAddr {
        NameAddr::parse(s).unwrap()
    }

    #[test]
    fn name_addr_with_quoted_display_name() {
        let a = na(r#""J Rosenberg \\\""       <sip:jdrosen@example.com>  ;  tag = 98asjd8"#);
        assert_eq!(a.display_name.as_deref(), Some(r#"J Rosenberg \""#));
        assert_eq!(a.uri.to_string(), "sip:jdrosen@example.com");
        assert_eq!(a.tag(), Some("98asjd8"));
        let again = na(&a.to_string());
        assert_eq!(again, a);
    }

    #[test]
    fn addr_spec_params_belong_to_the_header() {
        let a = na("sip:+19725552222@gw1.example.net;unknownparam");
        assert!(a.uri.as_sip().unwrap().params.is_empty());
        assert!(a.params.contains("unknownparam"));
        let b = na("<sip:+19725552222@gw1.example.net;unknownparam>");
        assert!(b.uri.as_sip().unwrap().params.contains("unknownparam"));
        assert!(b.params.is_empty());
        let c = na("sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n");
        assert_eq!(c.tag(), Some("1918181833n"));
        assert_eq!(c.display_name, None);
    }

    #[test]
    fn token_display_names() {
        let a = na("caller<sip:caller@example.com>;tag=323");
        assert_eq!(a.display_name.as_deref(), Some("caller"));
        assert_eq!(a.tag(), Some("323"));
        let b = na("token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;tag=x");
        assert_eq!(
            b.display_name.as_deref(),
            Some("token1~` token2'+_ token3*%!.-")
        );
        let c = na("<sip:a@b>");
        assert_eq!(c.display_name, None);
    }

    #[test]
    fn rejects_malformed_addresses() {
        for bad in [
            r#""Mr. J. User <sip:j.user@example.com>"#,
            r#"" Watson, Thomas" < sip:t.watson@example.org >"#,
            "Bell, Alexander <sip:a.g.bell@example.com>;tag=43",
            "sip:user@example.com?Route=%3Csip:sip.example.com%3E",
            "<sip:joe@example.org>;;;;",
            "<sip:a@b",
            "\"x\" sip:a@b",
            "",
            "<sip:a@b> junk",
            "<sip:a@b>;tag=",
        ] {
            assert!(NameAddr::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(matches!(
            NameAddr::parse("<sip:a@b c>"),
            Err(NameAddrError::Uri(UriError::InvalidCharacter))
        ));
    }

    #[test]
    fn other_schemes_and_tel() {
        assert_eq!(na("isbn:2983792873").uri.scheme(), "isbn");
        assert_eq!(
            na("<http://www.example.com>;tag=3234233").uri.scheme(),
            "http"
        );
        assert_eq!(na("<tel:+1-201-555-0123>").uri.scheme(), "tel");
    }

    #[test]
    fn contact_values() {
        assert_eq!(Contact::parse(" * ").unwrap(), Contact::Wildcard);
        let c = Contact::parse("<sip:a@b>;expires=3600;q=0.7").unwrap();
        let a = c.address().unwrap();
        assert_eq!(a.expires(), Some(3600));
        assert_eq!(a.q(), Some(0.7));
        let big = na("<sip:user@host129.example.com>;expires=280297596632815");
        assert_eq!(big.expires(), Some(u32::MAX));
        assert_eq!(Contact::Wildcard.to_string(), "*");
    }

    #[test]
    fn builds_and_displays() {
        let mut a = NameAddr::new(Uri::Sip(
            SipUri::new("example.com".parse().unwrap()).with_user("bob"),
        ))
        .with_display_name("Bob \"B\"");
        a.set_tag("abc");
        assert_eq!(
            a.to_string(),
            r#""Bob \"B\"" <sip:bob@example.com>;tag=abc"#
        );
        assert_eq!(na(&a.to_string()), a);
    }
}
