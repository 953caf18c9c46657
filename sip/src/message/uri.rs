//! URIs carried by SIP messages: `sip:`/`sips:` (RFC 3261 section 19.1), `tel:` (RFC 3966) and
//! any other absolute URI, kept opaque (so that a Request-URI with an unknown scheme still
//! parses and the application can answer 416).
//!
//! Parsing validates the RFC 3261 character sets and `%` escapes but keeps every component as
//! written (escapes included) so that `Display` writes the URI back unchanged; unescaped views are
//! offered by accessors. Comparison by the RFC 3261 section 19.1.4 rules is
//! [`Uri::equivalent`]; the derived `PartialEq` is plain structural equality. This module does not
//! resolve hosts (RFC 3263) and does not know about name-addr (`<...>`) forms.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use super::params::{Param, Params};
use super::syntax::{byte_table, hex_value, percent_decode, percent_encode_into};

/// Why a URI was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// The URI is empty.
    #[error("empty URI")]
    Empty,
    /// A byte that can never appear in a URI (white space, control, non-ASCII, `<`, `>`, `"`).
    #[error("invalid character in URI")]
    InvalidCharacter,
    /// Missing or malformed scheme.
    #[error("invalid URI scheme")]
    InvalidScheme,
    /// Malformed user part.
    #[error("invalid user part in URI")]
    InvalidUser,
    /// Malformed password.
    #[error("invalid password in URI")]
    InvalidPassword,
    /// Malformed host.
    #[error("invalid host in URI")]
    InvalidHost,
    /// Malformed or out of range port.
    #[error("invalid port in URI")]
    InvalidPort,
    /// Malformed `;name=value` parameter.
    #[error("invalid URI parameter")]
    InvalidParam,
    /// Malformed `?name=value` header.
    #[error("invalid URI header")]
    InvalidHeader,
    /// A `%` not followed by two hexadecimal digits.
    #[error("invalid % escape in URI")]
    InvalidEscape,
    /// Malformed telephone number in a `tel:` URI.
    #[error("invalid telephone number in tel URI")]
    InvalidTelNumber,
    /// Nothing after the scheme of an absolute URI.
    #[error("empty URI body")]
    EmptyBody,
}

/// A URI found in a Request-URI or a header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Uri {
    /// `sip:` or `sips:` URI.
    Sip(SipUri),
    /// `tel:` URI.
    Tel(TelUri),
    /// Any other absolute URI, kept opaque.
    Other(AbsoluteUri),
}

/// A `sip:` or `sips:` URI. Text components are kept as written, `%` escapes included.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SipUri {
    /// True for `sips:`.
    pub secure: bool,
    /// User part as written (escaped); see [`SipUri::user_unescaped`].
    pub user: Option<String>,
    /// Password as written (escaped). Its use is deprecated by RFC 3261 but it still parses.
    pub password: Option<String>,
    /// Host name or address.
    pub host: Host,
    /// Port, when written.
    pub port: Option<u16>,
    /// uri-parameters (`;transport=tcp;lr`), names and values as written.
    pub params: Params,
    /// URI headers (`?Subject=x&Route=...`), as written.
    pub headers: Vec<UriHeader>,
}

/// One `name=value` header of a SIP URI, as written (escaped).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UriHeader {
    /// Header name as written.
    pub name: String,
    /// Header value as written (may be empty).
    pub value: String,
}

impl UriHeader {
    /// A header whose value is escaped as a URI header value must be (RFC 3261 section 25.1,
    /// `hvalue`): every byte other than unreserved and `[]/?:+$` is written `%XX`, so a value
    /// such as a Replaces (`call-id;to-tag=..;from-tag=..`) survives inside a Refer-To.
    pub fn escaped(name: impl Into<String>, value: &str) -> Self {
        let mut escaped = String::with_capacity(value.len() + 8);
        for b in value.bytes() {
            if header_byte_pred(b) {
                escaped.push(char::from(b));
            } else {
                escaped.push_str(&format!("%{b:02X}"));
            }
        }
        Self {
            name: name.into(),
            value: escaped,
        }
    }

    /// The value with its `%XX` escapes decoded, as the header it becomes in a request
    /// (RFC 3261 section 19.1.5); `None` for a malformed escape or a value that is not UTF-8.
    pub fn unescaped(&self) -> Option<String> {
        let bytes = self.value.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).ok()
    }
}

/// A host: a domain name, an IPv4 address or an IPv6 address (written `[...]` in URIs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A domain name as written (compare case-insensitively).
    Domain(String),
    /// An IPv4 address.
    Ipv4(Ipv4Addr),
    /// An IPv6 address.
    Ipv6(Ipv6Addr),
}

/// A `tel:` URI (RFC 3966).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TelUri {
    /// The number as written, visual separators included (`+1-212-555-0101`).
    pub number: String,
    /// Parameters (`;phone-context=...;ext=...`), as written.
    pub params: Params,
}

/// An absolute URI of a scheme this crate does not interpret.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AbsoluteUri {
    /// Scheme as written.
    pub scheme: String,
    /// Everything after the `:`, as written.
    pub opaque: String,
}

/// `unreserved` (RFC 3261 section 25.1) without the escapes.
const fn unreserved_pred(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'_' | b'.' | b'!' | b'~' | b'*' | b'\'' | b'(' | b')'
        )
}

const fn user_byte_pred(b: u8) -> bool {
    unreserved_pred(b) || matches!(b, b'&' | b'=' | b'+' | b'$' | b',' | b';' | b'?' | b'/')
}

const fn password_byte_pred(b: u8) -> bool {
    unreserved_pred(b) || matches!(b, b'&' | b'=' | b'+' | b'$' | b',')
}

const fn param_byte_pred(b: u8) -> bool {
    unreserved_pred(b) || matches!(b, b'[' | b']' | b'/' | b':' | b'&' | b'+' | b'$')
}

const fn header_byte_pred(b: u8) -> bool {
    unreserved_pred(b) || matches!(b, b'[' | b']' | b'/' | b'?' | b':' | b'+' | b'$')
}

const fn hostname_byte_pred(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')
}

const fn tel_byte_pred(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'*' | b'#' | b'+' | b'-' | b'.' | b'(' | b')')
}

static USER: [bool; 256] = byte_table!(user_byte_pred);
static PASSWORD: [bool; 256] = byte_table!(password_byte_pred);
static PARAM: [bool; 256] = byte_table!(param_byte_pred);
static HEADER: [bool; 256] = byte_table!(header_byte_pred);
static HOSTNAME: [bool; 256] = byte_table!(hostname_byte_pred);
static TEL: [bool; 256] = byte_table!(tel_byte_pred);
static URI_CHAR: [bool; 256] = byte_table!(uri_char_pred);

/// Bytes that may appear somewhere in a URI: visible ASCII except `<`, `>` and `"`.
const fn uri_char_pred(b: u8) -> bool {
    b >= 0x21 && b <= 0x7e && !matches!(b, b'<' | b'>' | b'"')
}

fn is_user_byte(b: u8) -> bool {
    USER[usize::from(b)]
}

fn is_password_byte(b: u8) -> bool {
    PASSWORD[usize::from(b)]
}

fn is_param_byte(b: u8) -> bool {
    PARAM[usize::from(b)]
}

fn is_header_byte(b: u8) -> bool {
    HEADER[usize::from(b)]
}

fn is_hostname_byte(b: u8) -> bool {
    HOSTNAME[usize::from(b)]
}

fn is_tel_byte(b: u8) -> bool {
    TEL[usize::from(b)]
}

/// Checks that `s` only holds bytes accepted by `allowed` and valid `%HH` escapes.
fn check_escaped(s: &str, allowed: impl Fn(u8) -> bool, err: UriError) -> Result<(), UriError> {
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let ok = b.get(i + 1).copied().and_then(hex_value).is_some()
                && b.get(i + 2).copied().and_then(hex_value).is_some();
            if !ok {
                return Err(UriError::InvalidEscape);
            }
            i += 3;
        } else if allowed(c) {
            i += 1;
        } else {
            return Err(err);
        }
    }
    Ok(())
}

fn is_valid_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

impl Uri {
    /// Parses a URI (an addr-spec: no `<>`, no surrounding white space).
    pub fn parse(s: &str) -> Result<Self, UriError> {
        if s.is_empty() {
            return Err(UriError::Empty);
        }
        if !s.bytes().all(|b| URI_CHAR[usize::from(b)]) {
            return Err(UriError::InvalidCharacter);
        }
        let (scheme, rest) = s.split_once(':').ok_or(UriError::InvalidScheme)?;
        if !is_valid_scheme(scheme) {
            return Err(UriError::InvalidScheme);
        }
        if scheme.eq_ignore_ascii_case("sip") {
            SipUri::parse_after_scheme(rest, false).map(Uri::Sip)
        } else if scheme.eq_ignore_ascii_case("sips") {
            SipUri::parse_after_scheme(rest, true).map(Uri::Sip)
        } else if scheme.eq_ignore_ascii_case("tel") {
            TelUri::parse_after_scheme(rest).map(Uri::Tel)
        } else if rest.is_empty() {
            Err(UriError::EmptyBody)
        } else {
            Ok(Uri::Other(AbsoluteUri {
                scheme: scheme.to_owned(),
                opaque: rest.to_owned(),
            }))
        }
    }

    /// The scheme: `sip`, `sips`, `tel`, or the scheme of an opaque URI as written.
    pub fn scheme(&self) -> &str {
        match self {
            Uri::Sip(u) if u.secure => "sips",
            Uri::Sip(_) => "sip",
            Uri::Tel(_) => "tel",
            Uri::Other(u) => &u.scheme,
        }
    }

    /// The SIP or SIPS URI, if this is one.
    pub fn as_sip(&self) -> Option<&SipUri> {
        match self {
            Uri::Sip(u) => Some(u),
            _ => None,
        }
    }

    /// Mutable access to the SIP or SIPS URI, if this is one.
    pub fn as_sip_mut(&mut self) -> Option<&mut SipUri> {
        match self {
            Uri::Sip(u) => Some(u),
            _ => None,
        }
    }

    /// The tel URI, if this is one.
    pub fn as_tel(&self) -> Option<&TelUri> {
        match self {
            Uri::Tel(u) => Some(u),
            _ => None,
        }
    }

    /// True for `sip:` and `sips:` URIs.
    pub fn is_sip(&self) -> bool {
        matches!(self, Uri::Sip(_))
    }

    /// The host of a SIP URI.
    pub fn host(&self) -> Option<&Host> {
        self.as_sip().map(|u| &u.host)
    }

    /// The user part of a SIP URI as written (escaped).
    pub fn user(&self) -> Option<&str> {
        self.as_sip().and_then(|u| u.user.as_deref())
    }

    /// Compares two URIs by the rules of RFC 3261 section 19.1.4 (SIP URIs), RFC 3966
    /// section 4 (tel URIs, visual separators ignored) or, for other schemes, case-insensitive
    /// scheme and exact body.
    pub fn equivalent(&self, other: &Uri) -> bool {
        match (self, other) {
            (Uri::Sip(a), Uri::Sip(b)) => a.equivalent(b),
            (Uri::Tel(a), Uri::Tel(b)) => a.equivalent(b),
            (Uri::Other(a), Uri::Other(b)) => {
                a.scheme.eq_ignore_ascii_case(&b.scheme) && a.opaque == b.opaque
            }
            _ => false,
        }
    }
}

impl FromStr for Uri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uri::parse(s)
    }
}

impl From<SipUri> for Uri {
    fn from(u: SipUri) -> Self {
        Uri::Sip(u)
    }
}

impl From<TelUri> for Uri {
    fn from(u: TelUri) -> Self {
        Uri::Tel(u)
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uri::Sip(u) => u.fmt(f),
            Uri::Tel(u) => u.fmt(f),
            Uri::Other(u) => write!(f, "{}:{}", u.scheme, u.opaque),
        }
    }
}

/// Parses `;name[=value]` URI parameters starting at `s` (which begins with `;`), stopping at
/// `?` or the end. Returns the parameters and the rest (empty or starting with `?`).
fn parse_uri_params(mut s: &str) -> Result<(Params, &str), UriError> {
    let mut params = Params::new();
    while let Some(rest) = s.strip_prefix(';') {
        let end = rest.find([';', '?']).unwrap_or(rest.len());
        let (item, tail) = rest.split_at(end);
        let (name, value) = match item.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (item, None),
        };
        if name.is_empty() || value.is_some_and(str::is_empty) {
            return Err(UriError::InvalidParam);
        }
        check_escaped(name, is_param_byte, UriError::InvalidParam)?;
        if let Some(v) = value {
            check_escaped(v, is_param_byte, UriError::InvalidParam)?;
        }
        params.push(Param::new(name, value));
        s = tail;
    }
    Ok((params, s))
}

impl SipUri {
    /// A `sip:` URI with only a host.
    pub fn new(host: Host) -> Self {
        Self {
            secure: false,
            user: None,
            password: None,
            host,
            port: None,
            params: Params::new(),
            headers: Vec::new(),
        }
    }

    /// Parses a `sip:` or `sips:` URI.
    pub fn parse(s: &str) -> Result<Self, UriError> {
        match Uri::parse(s)? {
            Uri::Sip(u) => Ok(u),
            _ => Err(UriError::InvalidScheme),
        }
    }

    /// Sets the user part from raw (unescaped) bytes, escaping what needs to be; builder style.
    pub fn with_user(mut self, user: &str) -> Self {
        self.set_user_unescaped(user.as_bytes());
        self
    }

    /// Sets the port; builder style.
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Adds or replaces a uri-parameter (name and value as they are to be written); builder style.
    pub fn with_param(mut self, name: &str, value: Option<&str>) -> Self {
        self.params.set(name, value);
        self
    }

    fn parse_after_scheme(rest: &str, secure: bool) -> Result<Self, UriError> {
        let (userinfo, hostpart) = match rest.split_once('@') {
            Some((ui, hp)) => (Some(ui), hp),
            None => (None, rest),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(ui) => {
                let (user, password) = match ui.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (ui, None),
                };
                if user.is_empty() {
                    return Err(UriError::InvalidUser);
                }
                check_escaped(user, is_user_byte, UriError::InvalidUser)?;
                if let Some(p) = password {
                    check_escaped(p, is_password_byte, UriError::InvalidPassword)?;
                }
                (Some(user.to_owned()), password.map(str::to_owned))
            }
        };
        let host_end = if hostpart.starts_with('[') {
            hostpart
                .find(']')
                .map(|i| i + 1)
                .ok_or(UriError::InvalidHost)?
        } else {
            hostpart
                .bytes()
                .position(|b| matches!(b, b':' | b';' | b'?'))
                .unwrap_or(hostpart.len())
        };
        let (host_text, mut rest) = hostpart.split_at(host_end);
        let host = Host::parse(host_text)?;
        let mut port = None;
        if let Some(after) = rest.strip_prefix(':') {
            let end = after.find([';', '?']).unwrap_or(after.len());
            let (digits, tail) = after.split_at(end);
            port = Some(parse_port(digits).ok_or(UriError::InvalidPort)?);
            rest = tail;
        }
        let (params, rest) = parse_uri_params(rest)?;
        let mut headers = Vec::new();
        if let Some(hs) = rest.strip_prefix('?') {
            for item in hs.split('&') {
                let (name, value) = item.split_once('=').ok_or(UriError::InvalidHeader)?;
                if name.is_empty() {
                    return Err(UriError::InvalidHeader);
                }
                check_escaped(name, is_header_byte, UriError::InvalidHeader)?;
                check_escaped(value, is_header_byte, UriError::InvalidHeader)?;
                headers.push(UriHeader {
                    name: name.to_owned(),
                    value: value.to_owned(),
                });
            }
        } else if !rest.is_empty() {
            return Err(UriError::InvalidHost);
        }
        Ok(Self {
            secure,
            user,
            password,
            host,
            port,
            params,
            headers,
        })
    }

    /// The user part with `%` escapes resolved (it may hold any byte, `%00` included).
    pub fn user_unescaped(&self) -> Option<Cow<'_, [u8]>> {
        self.user.as_deref().map(percent_decode)
    }

    /// Sets the user part from raw bytes, escaping every byte that may not appear literally.
    pub fn set_user_unescaped(&mut self, user: &[u8]) {
        let mut out = String::with_capacity(user.len());
        percent_encode_into(&mut out, user, is_user_byte);
        self.user = Some(out);
    }

    /// Value of a uri-parameter, as written.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.value(name)
    }

    /// The `transport` uri-parameter.
    pub fn transport(&self) -> Option<&str> {
        self.params.value("transport")
    }

    /// The `maddr` uri-parameter.
    pub fn maddr(&self) -> Option<&str> {
        self.params.value("maddr")
    }

    /// True when the `lr` (loose routing) parameter is present.
    pub fn is_loose_router(&self) -> bool {
        self.params.contains("lr")
    }

    /// Value of a URI header, as written.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    /// The port to use when none is written: 5061 for SIPS, 5060 otherwise.
    pub fn default_port(&self) -> u16 {
        if self.secure {
            5061
        } else {
            5060
        }
    }

    /// RFC 3261 section 19.1.4 comparison.
    pub fn equivalent(&self, other: &SipUri) -> bool {
        fn decoded_eq(a: Option<&str>, b: Option<&str>) -> bool {
            match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => percent_decode(a) == percent_decode(b),
                _ => false,
            }
        }
        fn value_eq(a: Option<&str>, b: Option<&str>) -> bool {
            match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => percent_decode(a).eq_ignore_ascii_case(&percent_decode(b)),
                _ => false,
            }
        }
        if self.secure != other.secure
            || !decoded_eq(self.user.as_deref(), other.user.as_deref())
            || !decoded_eq(self.password.as_deref(), other.password.as_deref())
            || !self.host.eq_ignore_case(&other.host)
            || self.port != other.port
        {
            return false;
        }
        for name in ["user", "ttl", "method", "maddr", "transport"] {
            let (a, b) = (self.params.get(name), other.params.get(name));
            match (a, b) {
                (None, None) => {}
                (Some(a), Some(b)) if value_eq(a.value.as_deref(), b.value.as_deref()) => {}
                _ => return false,
            }
        }
        for a in &self.params {
            if let Some(b) = other.params.get(&a.name) {
                if !value_eq(a.value.as_deref(), b.value.as_deref()) {
                    return false;
                }
            }
        }
        if self.headers.len() != other.headers.len() {
            return false;
        }
        self.headers.iter().all(|a| {
            other.headers.iter().any(|b| {
                percent_decode(&a.name).eq_ignore_ascii_case(&percent_decode(&b.name))
                    && percent_decode(&a.value) == percent_decode(&b.value)
            })
        })
    }
}

impl FromStr for SipUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SipUri::parse(s)
    }
}

impl fmt::Display for SipUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.secure { "sips:" } else { "sip:" })?;
        if let Some(user) = &self.user {
            f.write_str(user)?;
            if let Some(pw) = &self.password {
                write!(f, ":{pw}")?;
            }
            f.write_str("@")?;
        }
        write!(f, "{}", self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        write!(f, "{}", self.params)?;
        for (i, h) in self.headers.iter().enumerate() {
            f.write_str(if i == 0 { "?" } else { "&" })?;
            write!(f, "{}={}", h.name, h.value)?;
        }
        Ok(())
    }
}

/// Parses 1 to 5 decimal digits as a port.
pub(crate) fn parse_port(digits: &str) -> Option<u16> {
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl Host {
    /// Parses a host: a domain name, a dotted IPv4 address or a bracketed IPv6 reference.
    pub fn parse(s: &str) -> Result<Self, UriError> {
        if let Some(inner) = s.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or(UriError::InvalidHost)?;
            return inner
                .parse()
                .map(Host::Ipv6)
                .map_err(|_| UriError::InvalidHost);
        }
        if s.is_empty() || !s.bytes().all(is_hostname_byte) {
            return Err(UriError::InvalidHost);
        }
        if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return s.parse().map(Host::Ipv4).map_err(|_| UriError::InvalidHost);
        }
        Ok(Host::Domain(s.to_owned()))
    }

    /// Parses `host` or `host:port`, an IPv6 address in brackets (`[::1]:5060`): the form
    /// of configuration values such as an advertised address. `None` when either part is bad.
    pub fn parse_with_port(s: &str) -> Option<(Host, Option<u16>)> {
        let s = s.trim();
        if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
            return Some((Host::from(addr.ip()), Some(addr.port())));
        }
        if s.starts_with('[') {
            let end = s.find(']')?;
            let host = Host::parse(s.get(..=end)?).ok()?;
            let rest = s.get(end + 1..)?;
            if rest.is_empty() {
                return Some((host, None));
            }
            return Some((host, Some(rest.strip_prefix(':')?.parse().ok()?)));
        }
        match s.rsplit_once(':') {
            Some((h, p)) => Some((Host::parse(h).ok()?, Some(p.parse().ok()?))),
            None => Some((Host::parse(s).ok()?, None)),
        }
    }

    /// The address, when the host is an IP address.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Domain(_) => None,
            Host::Ipv4(a) => Some(IpAddr::V4(*a)),
            Host::Ipv6(a) => Some(IpAddr::V6(*a)),
        }
    }

    /// Equality with domain names compared case-insensitively.
    pub fn eq_ignore_case(&self, other: &Host) -> bool {
        match (self, other) {
            (Host::Domain(a), Host::Domain(b)) => a.eq_ignore_ascii_case(b),
            _ => self == other,
        }
    }
}

impl FromStr for Host {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Host::parse(s)
    }
}

impl From<IpAddr> for Host {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => Host::Ipv4(a),
            IpAddr::V6(a) => Host::Ipv6(a),
        }
    }
}

/// Writes IPv6 addresses in brackets, as URIs and Via headers need them.
impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Domain(d) => f.write_str(d),
            Host::Ipv4(a) => write!(f, "{a}"),
            Host::Ipv6(a) => write!(f, "[{a}]"),
        }
    }
}

impl TelUri {
    fn parse_after_scheme(rest: &str) -> Result<Self, UriError> {
        let end = rest.find(';').unwrap_or(rest.len());
        let (number, tail) = rest.split_at(end);
        if number.is_empty() || !number.bytes().all(is_tel_byte) {
            return Err(UriError::InvalidTelNumber);
        }
        let (params, rest) = parse_uri_params(tail)?;
        if !rest.is_empty() {
            return Err(UriError::InvalidParam);
        }
        Ok(Self {
            number: number.to_owned(),
            params,
        })
    }

    /// True for a global number (starting with `+`).
    pub fn is_global(&self) -> bool {
        self.number.starts_with('+')
    }

    /// The number without visual separators (`-`, `.`, `(`, `)`).
    pub fn digits(&self) -> String {
        self.number
            .chars()
            .filter(|c| !matches!(c, '-' | '.' | '(' | ')'))
            .collect()
    }

    /// RFC 3966 section 4 comparison: numbers without visual separators, parameters as sets.
    pub fn equivalent(&self, other: &TelUri) -> bool {
        self.digits().eq_ignore_ascii_case(&other.digits())
            && self.params.len() == other.params.len()
            && self.params.iter().all(|a| {
                other
                    .params
                    .get(&a.name)
                    .is_some_and(|b| match (&a.value, &b.value) {
                        (None, None) => true,
                        (Some(x), Some(y)) => x.eq_ignore_ascii_case(y),
                        _ => false,
                    })
            })
    }
}

impl fmt::Display for TelUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tel:{}{}", self.number, self.params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_forms() {
        assert_eq!(
            Host::parse_with_port("[::1]:5060"),
            Some((Host::parse("[::1]").unwrap(), Some(5060)))
        );
        assert_eq!(
            Host::parse_with_port("[::1]"),
            Some((Host::parse("[::1]").unwrap(), None))
        );
        assert_eq!(
            Host::parse_with_port("10.0.0.1:5061"),
            Some((Host::Ipv4("10.0.0.1".parse().unwrap()), Some(5061)))
        );
        assert_eq!(
            Host::parse_with_port("lb.example"),
            Some((Host::Domain("lb.example".into()), None))
        );
        assert_eq!(Host::parse_with_port("lb:x"), None);
        assert_eq!(Host::parse_with_port("[::1]x"), None);
        assert_eq!(Host::parse_with_port(""), None);
    }

    fn sip(s: &str) -> SipUri {
        SipUri::parse(s).unwrap()
    }

    #[test]
    fn basic_sip_uri() {
        let u = sip("sip:alice:secret@Example.com:5070;transport=tcp;lr?Subject=hi&X=");
        assert!(!u.secure);
        assert_eq!(u.user.as_deref(), Some("alice"));
        assert_eq!(u.password.as_deref(), Some("secret"));
        assert_eq!(u.host, Host::Domain("Example.com".into()));
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.transport(), Some("tcp"));
        assert!(u.is_loose_router());
        assert_eq!(u.header("subject"), Some("hi"));
        assert_eq!(u.header("x"), Some(""));
        assert_eq!(
            u.to_string(),
            "sip:alice:secret@Example.com:5070;transport=tcp;lr?Subject=hi&X="
        );
    }

    #[test]
    fn sips_and_scheme_case() {
        let u = Uri::parse("SIPS:bob@10.0.0.1").unwrap();
        assert_eq!(u.scheme(), "sips");
        assert_eq!(u.host(), Some(&Host::Ipv4(Ipv4Addr::new(10, 0, 0, 1))));
        assert_eq!(u.to_string(), "sips:bob@10.0.0.1");
        assert_eq!(sip("sips:x@y").default_port(), 5061);
    }

    #[test]
    fn ipv6_hosts() {
        let u = sip("sip:[2001:db8::10]:5060;maddr=[::1]");
        assert_eq!(u.host, Host::Ipv6("2001:db8::10".parse().unwrap()));
        assert_eq!(u.port, Some(5060));
        assert_eq!(u.maddr(), Some("[::1]"));
        assert_eq!(u.to_string(), "sip:[2001:db8::10]:5060;maddr=[::1]");
        assert_eq!(Uri::parse("sip:[2001:db8::10"), Err(UriError::InvalidHost));
        assert_eq!(Uri::parse("sip:[nothex]"), Err(UriError::InvalidHost));
        assert_eq!(
            Host::parse("[::1]").unwrap().ip(),
            Some("::1".parse().unwrap())
        );
    }

    #[test]
    fn escaped_user_parts() {
        let u = sip("sip:sips%3Auser%40example.com@example.net");
        assert_eq!(u.user.as_deref(), Some("sips%3Auser%40example.com"));
        assert_eq!(&*u.user_unescaped().unwrap(), b"sips:user@example.com");
        let n = sip("sip:null-%00-null@example.com");
        assert_eq!(&*n.user_unescaped().unwrap(), b"null-\0-null");
        let mut b = SipUri::new(Host::Domain("h".into()));
        b.set_user_unescaped(b"a b@c;d");
        assert_eq!(b.to_string(), "sip:a%20b%40c;d@h");
        assert_eq!(&*b.user_unescaped().unwrap(), b"a b@c;d");
        assert_eq!(Uri::parse("sip:a%4@h"), Err(UriError::InvalidEscape));
        assert_eq!(Uri::parse("sip:a%zz@h"), Err(UriError::InvalidEscape));
    }

    #[test]
    fn user_part_with_semicolons_and_odd_characters() {
        let u = sip("sip:user;par=u%40example.net@example.com");
        assert_eq!(u.user.as_deref(), Some("user;par=u%40example.net"));
        assert!(u.params.is_empty());
        let weird = "sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com";
        let w = sip(weird);
        assert_eq!(
            w.user.as_deref(),
            Some("1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*")
        );
        assert_eq!(
            w.password.as_deref(),
            Some("&it+has=1,weird!*pas$wo~d_too.(doesn't-it)")
        );
        assert_eq!(w.to_string(), weird);
    }

    #[test]
    fn a_header_value_is_escaped_so_that_it_parses_back_as_one_header() {
        let mut uri = Uri::parse("sip:bob@example.org;transport=tcp").unwrap();
        let value = "a84b4c76e66710@pc33.example.com;to-tag=1928 301774;from-tag=a6c85cf";
        uri.as_sip_mut()
            .unwrap()
            .headers
            .push(UriHeader::escaped("Replaces", value));
        let written = uri.to_string();
        assert_eq!(
            written,
            "sip:bob@example.org;transport=tcp?Replaces=a84b4c76e66710%40pc33.example.com\
             %3Bto-tag%3D1928%20301774%3Bfrom-tag%3Da6c85cf"
        );
        let back = Uri::parse(&written).unwrap();
        let sip = back.as_sip().unwrap();
        assert_eq!(sip.headers.len(), 1);
        assert_eq!(sip.headers[0].unescaped().as_deref(), Some(value));
        let bad = |v: &str| UriHeader {
            name: "X".into(),
            value: v.into(),
        };
        assert_eq!(bad("a%4").unescaped(), None, "a cut escape");
        assert_eq!(bad("a%zz").unescaped(), None);
        assert_eq!(bad("%FF").unescaped(), None, "not UTF-8");
        assert_eq!(sip.params.len(), 1, "the header's ';' are not parameters");
    }

    #[test]
    fn escaped_params_and_headers_kept_as_written() {
        let u = sip("sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31");
        assert_eq!(u.params.len(), 2);
        assert_eq!(u.params.iter().next().unwrap().name, "%6C%72");
        assert_eq!(u.params.value("n%61me"), Some("v%61lue%25%34%31"));
        let r = sip("sip:user@example.com?Route=%3Csip:sip.example.com%3E");
        assert_eq!(r.header("Route"), Some("%3Csip:sip.example.com%3E"));
    }

    #[test]
    fn rejects_malformed_sip_uris() {
        for bad in [
            "",
            "sip:",
            "sip:@host",
            "sip:user@",
            "sip:user@host:",
            "sip:user@host:99999",
            "sip:user@host:5o60",
            "sip:user@host;",
            "sip:user@host;=x",
            "sip:user@host;a=",
            "sip:user@host?noequals",
            "sip:user@host?=v",
            "sip:user@ho st",
            "<sip:user@host>",
            "sip:user@host>",
            "sip:user@999.1.1.1",
            "sip:user@host junk",
            "nocolon",
            "1abc:rest",
            "sip:us\"er@host",
            "sip:user@exa\u{e9}mple.com",
        ] {
            assert!(Uri::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn tel_uris() {
        let Uri::Tel(t) =
            Uri::parse("tel:+1-201-555-0123;ext=12;phone-context=example.com").unwrap()
        else {
            panic!("not tel")
        };
        assert!(t.is_global());
        assert_eq!(t.number, "+1-201-555-0123");
        assert_eq!(t.digits(), "+12015550123");
        assert_eq!(t.params.value("ext"), Some("12"));
        assert_eq!(
            t.to_string(),
            "tel:+1-201-555-0123;ext=12;phone-context=example.com"
        );
        let other = Uri::parse("tel:+1.201.555.0123;phone-context=example.com;ext=12").unwrap();
        assert!(Uri::Tel(t).equivalent(&other));
        assert!(Uri::parse("tel:").is_err());
        assert!(Uri::parse("tel:12 3").is_err());
        assert!(Uri::parse("tel:12;").is_err());
    }

    #[test]
    fn other_schemes_are_opaque() {
        let u = Uri::parse("nobodyKnowsThisScheme:totallyopaquecontent").unwrap();
        assert_eq!(u.scheme(), "nobodyKnowsThisScheme");
        assert!(!u.is_sip());
        assert_eq!(u.to_string(), "nobodyKnowsThisScheme:totallyopaquecontent");
        let s = Uri::parse("soap.beep://192.0.2.103:3002").unwrap();
        assert_eq!(s.scheme(), "soap.beep");
        assert!(Uri::parse("isbn:").is_err());
    }

    #[test]
    fn rfc3261_equivalence() {
        let eq = |a: &str, b: &str| Uri::parse(a).unwrap().equivalent(&Uri::parse(b).unwrap());
        assert!(eq(
            "sip:%61lice@atlanta.com;transport=TCP",
            "sip:alice@AtLanTa.CoM;Transport=tcp"
        ));
        assert!(eq(
            "sip:carol@chicago.com",
            "sip:carol@chicago.com;newparam=5"
        ));
        assert!(eq(
            "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
            "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com"
        ));
        assert!(eq(
            "sip:alice@atlanta.com?subject=project%20x&priority=urgent",
            "sip:alice@atlanta.com?priority=urgent&subject=project%20x"
        ));
        assert!(!eq(
            "SIP:ALICE@AtLanTa.CoM;Transport=udp",
            "sip:alice@AtLanTa.CoM;Transport=UDP"
        ));
        assert!(!eq("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"));
        assert!(!eq(
            "sip:bob@biloxi.com",
            "sip:bob@biloxi.com;transport=udp"
        ));
        assert!(!eq(
            "sip:carol@chicago.com;security=on",
            "sip:carol@chicago.com;security=off"
        ));
        assert!(!eq("sip:a@h", "sips:a@h"));
        assert!(!eq("sip:a@h?x=1", "sip:a@h"));
    }
}
