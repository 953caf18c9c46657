//! Header storage: [`HeaderName`] (standard names and compact forms normalized, others kept as
//! written), [`HeaderValue`] (raw bytes, zero-copy slices of the received buffer) and [`Headers`],
//! the ordered header list of a message with its generic operations (get, push, set, remove,
//! prepend, first-value removal).
//!
//! Values are kept raw: typed views (Via, CSeq, From...) are parsed on demand by the accessors in
//! the `typed` module. Header order and repeated headers are preserved.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use bytes::Bytes;

use super::syntax::{is_token, split_list, trim_ws};

macro_rules! header_names {
    ($( $variant:ident => $canonical:literal, $lower:literal, $compact:expr; )+) => {
        /// A header field name. Standard names are variants (their compact forms, such as `v`
        /// for Via, map to the same variant); any other name is [`HeaderName::Other`], kept as
        /// written and compared case-insensitively.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum HeaderName {
            $(
                #[doc = concat!("`", $canonical, "`")]
                $variant,
            )+
            /// A header this crate does not know, kept as written.
            Other(OtherHeaderName),
        }

        impl HeaderName {
            /// The name to write on the wire: the canonical long form for standard headers.
            pub fn as_str(&self) -> &str {
                match self {
                    $( HeaderName::$variant => $canonical, )+
                    HeaderName::Other(n) => n.as_str(),
                }
            }

            /// The compact form (RFC 3261 section 7.3.3 and later RFCs), if the header has one.
            pub fn compact_form(&self) -> Option<char> {
                let c: Option<u8> = match self {
                    $( HeaderName::$variant => $compact, )+
                    HeaderName::Other(_) => None,
                };
                c.map(char::from)
            }

            /// Standard names in lower case (a `match` on byte strings compiles to a faster
            /// dispatch than a binary search over this table, measured).
            #[cfg(test)]
            const STANDARD: &'static [(&'static [u8], HeaderName)] = &[
                $( ($lower as &[u8], HeaderName::$variant), )+
            ];

            fn from_lowercase(lower: &[u8]) -> Option<HeaderName> {
                match lower {
                    $( $lower => Some(HeaderName::$variant), )+
                    _ => None,
                }
            }

            fn from_compact(c: u8) -> Option<HeaderName> {
                $(
                    if $compact == Some(c) {
                        return Some(HeaderName::$variant);
                    }
                )+
                None
            }
        }
    };
}

header_names! {
    Accept => "Accept", b"accept", None;
    AcceptContact => "Accept-Contact", b"accept-contact", Some(b'a');
    AcceptEncoding => "Accept-Encoding", b"accept-encoding", None;
    AcceptLanguage => "Accept-Language", b"accept-language", None;
    AlertInfo => "Alert-Info", b"alert-info", None;
    Allow => "Allow", b"allow", None;
    AllowEvents => "Allow-Events", b"allow-events", Some(b'u');
    AuthenticationInfo => "Authentication-Info", b"authentication-info", None;
    Authorization => "Authorization", b"authorization", None;
    CallId => "Call-ID", b"call-id", Some(b'i');
    CallInfo => "Call-Info", b"call-info", None;
    Contact => "Contact", b"contact", Some(b'm');
    ContentDisposition => "Content-Disposition", b"content-disposition", None;
    ContentEncoding => "Content-Encoding", b"content-encoding", Some(b'e');
    ContentLanguage => "Content-Language", b"content-language", None;
    ContentLength => "Content-Length", b"content-length", Some(b'l');
    ContentType => "Content-Type", b"content-type", Some(b'c');
    CSeq => "CSeq", b"cseq", None;
    Date => "Date", b"date", None;
    ErrorInfo => "Error-Info", b"error-info", None;
    Event => "Event", b"event", Some(b'o');
    Expires => "Expires", b"expires", None;
    From => "From", b"from", Some(b'f');
    Identity => "Identity", b"identity", Some(b'y');
    IdentityInfo => "Identity-Info", b"identity-info", Some(b'n');
    InReplyTo => "In-Reply-To", b"in-reply-to", None;
    MaxForwards => "Max-Forwards", b"max-forwards", None;
    MimeVersion => "MIME-Version", b"mime-version", None;
    MinExpires => "Min-Expires", b"min-expires", None;
    MinSe => "Min-SE", b"min-se", None;
    Organization => "Organization", b"organization", None;
    PAssertedIdentity => "P-Asserted-Identity", b"p-asserted-identity", None;
    PPreferredIdentity => "P-Preferred-Identity", b"p-preferred-identity", None;
    Path => "Path", b"path", None;
    Priority => "Priority", b"priority", None;
    Privacy => "Privacy", b"privacy", None;
    ProxyAuthenticate => "Proxy-Authenticate", b"proxy-authenticate", None;
    ProxyAuthorization => "Proxy-Authorization", b"proxy-authorization", None;
    ProxyRequire => "Proxy-Require", b"proxy-require", None;
    RAck => "RAck", b"rack", None;
    Reason => "Reason", b"reason", None;
    RecordRoute => "Record-Route", b"record-route", None;
    ReferSub => "Refer-Sub", b"refer-sub", None;
    ReferTo => "Refer-To", b"refer-to", Some(b'r');
    ReferredBy => "Referred-By", b"referred-by", Some(b'b');
    RejectContact => "Reject-Contact", b"reject-contact", Some(b'j');
    Replaces => "Replaces", b"replaces", None;
    ReplyTo => "Reply-To", b"reply-to", None;
    RequestDisposition => "Request-Disposition", b"request-disposition", Some(b'd');
    Require => "Require", b"require", None;
    RetryAfter => "Retry-After", b"retry-after", None;
    Route => "Route", b"route", None;
    RSeq => "RSeq", b"rseq", None;
    Server => "Server", b"server", None;
    ServiceRoute => "Service-Route", b"service-route", None;
    SessionExpires => "Session-Expires", b"session-expires", Some(b'x');
    SipETag => "SIP-ETag", b"sip-etag", None;
    SipIfMatch => "SIP-If-Match", b"sip-if-match", None;
    Subject => "Subject", b"subject", Some(b's');
    SubscriptionState => "Subscription-State", b"subscription-state", None;
    Supported => "Supported", b"supported", Some(b'k');
    Timestamp => "Timestamp", b"timestamp", None;
    To => "To", b"to", Some(b't');
    Unsupported => "Unsupported", b"unsupported", None;
    UserAgent => "User-Agent", b"user-agent", None;
    Via => "Via", b"via", Some(b'v');
    Warning => "Warning", b"warning", None;
    WwwAuthenticate => "WWW-Authenticate", b"www-authenticate", None;
}

/// Longest standard header name, in bytes.
const MAX_STANDARD_NAME_LEN: usize = 20;

/// The name is not a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid header name")]
pub struct InvalidHeaderName;

/// The name of a header this crate does not know: a token kept as written, compared
/// case-insensitively.
#[derive(Clone)]
pub struct OtherHeaderName(Bytes);

impl OtherHeaderName {
    /// The name as written.
    pub fn as_str(&self) -> &str {
        // Only token bytes (ASCII) are ever stored, so this never falls back.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Debug for OtherHeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq for OtherHeaderName {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}

impl Eq for OtherHeaderName {}

impl Hash for OtherHeaderName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_usize(self.0.len());
        for b in self.0.iter() {
            state.write_u8(b.to_ascii_lowercase());
        }
    }
}

impl HeaderName {
    /// Looks up a standard header by name or compact form, ignoring case.
    fn standard(name: &[u8]) -> Option<HeaderName> {
        match name {
            [c] => HeaderName::from_compact(c.to_ascii_lowercase()),
            _ if name.len() > MAX_STANDARD_NAME_LEN => None,
            _ => {
                let mut buf = [0u8; MAX_STANDARD_NAME_LEN];
                for (d, s) in buf.iter_mut().zip(name) {
                    *d = s.to_ascii_lowercase();
                }
                HeaderName::from_lowercase(buf.get(..name.len())?)
            }
        }
    }

    /// Parses a header name (a token); standard names and compact forms are normalized.
    pub fn from_bytes(name: &[u8]) -> Result<Self, InvalidHeaderName> {
        if let Some(h) = Self::standard(name) {
            return Ok(h);
        }
        if !is_token(name) {
            return Err(InvalidHeaderName);
        }
        Ok(HeaderName::Other(OtherHeaderName(Bytes::copy_from_slice(
            name,
        ))))
    }

    /// Like [`HeaderName::from_bytes`] but shares the buffer of an unknown name (zero-copy).
    pub(crate) fn from_shared(name: Bytes) -> Result<Self, InvalidHeaderName> {
        if let Some(h) = Self::standard(&name) {
            return Ok(h);
        }
        if !is_token(&name) {
            return Err(InvalidHeaderName);
        }
        Ok(HeaderName::Other(OtherHeaderName(name)))
    }

    /// True for headers whose value is a comma-separated list that may be split across several
    /// header lines (RFC 3261 section 7.3.1). False for headers whose values may contain bare
    /// commas (Date, authentication headers, unknown headers...).
    pub fn is_list(&self) -> bool {
        matches!(
            self,
            HeaderName::Accept
                | HeaderName::AcceptContact
                | HeaderName::AcceptEncoding
                | HeaderName::AcceptLanguage
                | HeaderName::AlertInfo
                | HeaderName::Allow
                | HeaderName::AllowEvents
                | HeaderName::CallInfo
                | HeaderName::Contact
                | HeaderName::ContentEncoding
                | HeaderName::ContentLanguage
                | HeaderName::ErrorInfo
                | HeaderName::InReplyTo
                | HeaderName::PAssertedIdentity
                | HeaderName::PPreferredIdentity
                | HeaderName::Path
                | HeaderName::Privacy
                | HeaderName::ProxyRequire
                | HeaderName::Reason
                | HeaderName::RecordRoute
                | HeaderName::RejectContact
                | HeaderName::Require
                | HeaderName::Route
                | HeaderName::ServiceRoute
                | HeaderName::Supported
                | HeaderName::Unsupported
                | HeaderName::Via
                | HeaderName::Warning
        )
    }
}

impl FromStr for HeaderName {
    type Err = InvalidHeaderName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HeaderName::from_bytes(s.as_bytes())
    }
}

impl fmt::Display for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A raw header value: bytes without CR, LF or surrounding white space (folded lines are
/// unfolded by the parser). Usually a zero-copy slice of the received message.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct HeaderValue(Bytes);

impl HeaderValue {
    /// An empty value.
    pub const fn empty() -> Self {
        Self(Bytes::new())
    }

    /// A value from static text (sanitized like [`HeaderValue::from_bytes`], copying only if
    /// needed).
    pub fn from_static(s: &'static str) -> Self {
        Self::from_bytes(Bytes::from_static(s.as_bytes()))
    }

    /// A value from bytes. CR and LF, which would let a value inject header lines, become spaces;
    /// surrounding spaces and tabs are trimmed (the parser trims them too).
    pub fn from_bytes(b: Bytes) -> Self {
        let trimmed = trim_ws(&b);
        if trimmed.len() == b.len() && !b.iter().any(|&c| c == b'\r' || c == b'\n') {
            return Self(b);
        }
        let cleaned: Vec<u8> = trimmed
            .iter()
            .map(|&c| if c == b'\r' || c == b'\n' { b' ' } else { c })
            .collect();
        Self(Bytes::from(trim_ws(&cleaned).to_vec()))
    }

    /// A value from anything displayable.
    pub fn from_display(v: &impl fmt::Display) -> Self {
        Self::from(v.to_string())
    }

    /// Wraps bytes the parser already checked (no CR/LF, trimmed).
    pub(crate) fn from_parsed(b: Bytes) -> Self {
        Self(b)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The raw bytes as a shared buffer.
    pub fn as_shared(&self) -> &Bytes {
        &self.0
    }

    /// The value as text, when it is valid UTF-8.
    pub fn to_str(&self) -> Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(&self.0)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for an empty value.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for HeaderValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&String::from_utf8_lossy(&self.0), f)
    }
}

impl From<String> for HeaderValue {
    fn from(s: String) -> Self {
        Self::from_bytes(Bytes::from(s))
    }
}

impl From<&str> for HeaderValue {
    fn from(s: &str) -> Self {
        Self::from_bytes(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<u32> for HeaderValue {
    fn from(n: u32) -> Self {
        Self(Bytes::from(n.to_string()))
    }
}

impl From<usize> for HeaderValue {
    fn from(n: usize) -> Self {
        Self(Bytes::from(n.to_string()))
    }
}

/// One header field: a name and its raw value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    /// The name (normalized for standard headers).
    pub name: HeaderName,
    /// The raw value.
    pub value: HeaderValue,
}

/// The ordered header fields of a message. Several fields may share a name; their order is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Headers {
    list: Vec<Header>,
}

impl Headers {
    /// An empty list.
    pub const fn new() -> Self {
        Self { list: Vec::new() }
    }

    /// An empty list with room for `n` headers.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            list: Vec::with_capacity(n),
        }
    }

    /// Number of header fields.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// True when there is no header field.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Header fields in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Header> {
        self.list.iter()
    }

    /// Mutable header fields in order.
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Header> {
        self.list.iter_mut()
    }

    /// The value of the first field named `name`.
    pub fn get(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.list.iter().find(|h| h.name == *name).map(|h| &h.value)
    }

    /// The values of every field named `name`, in order.
    pub fn get_all(&self, name: &HeaderName) -> impl Iterator<Item = &HeaderValue> + '_ {
        let name = name.clone();
        self.list
            .iter()
            .filter(move |h| h.name == name)
            .map(|h| &h.value)
    }

    /// Number of fields named `name`.
    pub fn count(&self, name: &HeaderName) -> usize {
        self.list.iter().filter(|h| h.name == *name).count()
    }

    /// True when a field named `name` exists.
    pub fn contains(&self, name: &HeaderName) -> bool {
        self.list.iter().any(|h| h.name == *name)
    }

    /// Appends a field.
    pub fn push(&mut self, name: HeaderName, value: impl Into<HeaderValue>) {
        self.list.push(Header {
            name,
            value: value.into(),
        });
    }

    /// Inserts a field before the first field with the same name, or at the top when there is
    /// none (what a proxy does with Via and Record-Route).
    pub fn prepend(&mut self, name: HeaderName, value: impl Into<HeaderValue>) {
        let at = self.list.iter().position(|h| h.name == name).unwrap_or(0);
        self.list.insert(
            at,
            Header {
                name,
                value: value.into(),
            },
        );
    }

    /// Sets the single field `name`: replaces the value of the first field with that name in
    /// place and removes the others, or appends the field when there is none.
    pub fn set(&mut self, name: HeaderName, value: impl Into<HeaderValue>) {
        let mut value = Some(value.into());
        self.list.retain_mut(|h| {
            if h.name != name {
                return true;
            }
            match value.take() {
                Some(v) => {
                    h.value = v;
                    true
                }
                None => false,
            }
        });
        if let Some(v) = value {
            self.list.push(Header { name, value: v });
        }
    }

    /// Removes every field named `name`; returns how many were removed.
    pub fn remove(&mut self, name: &HeaderName) -> usize {
        let before = self.list.len();
        self.list.retain(|h| h.name != *name);
        before - self.list.len()
    }

    /// Removes the first field named `name` and returns its value.
    pub fn remove_first(&mut self, name: &HeaderName) -> Option<HeaderValue> {
        let at = self.list.iter().position(|h| h.name == *name)?;
        Some(self.list.remove(at).value)
    }

    /// Removes the first element of a comma-separated list header (the top Via, the first
    /// Route...), whether it stands alone on its line or starts a line holding several elements.
    /// Returns the removed element as written, or `None` when there is no such header. A value
    /// that is not UTF-8 is removed whole.
    pub fn remove_first_value(&mut self, name: &HeaderName) -> Option<String> {
        let at = self.list.iter().position(|h| h.name == *name)?;
        let split = self
            .list
            .get(at)
            .and_then(|h| h.value.to_str().ok())
            .map(|text| {
                let mut items = split_list(text);
                let first = items.next().unwrap_or_default().to_owned();
                let rest: Vec<&str> = items.collect();
                (first, rest.join(", "))
            });
        match split {
            Some((first, rest)) if !rest.is_empty() => {
                if let Some(h) = self.list.get_mut(at) {
                    h.value = HeaderValue::from(rest);
                }
                Some(first)
            }
            Some((first, _)) => {
                self.list.remove(at);
                Some(first)
            }
            None => {
                let removed = self.list.remove(at);
                Some(String::from_utf8_lossy(removed.value.as_bytes()).into_owned())
            }
        }
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = &'a Header;
    type IntoIter = std::slice::Iter<'a, Header>;

    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

impl FromIterator<Header> for Headers {
    fn from_iter<T: IntoIterator<Item = Header>>(iter: T) -> Self {
        Self {
            list: iter.into_iter().collect(),
        }
    }
}

impl Extend<Header> for Headers {
    fn extend<T: IntoIterator<Item = Header>>(&mut self, iter: T) {
        self.list.extend(iter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> HeaderName {
        s.parse().unwrap()
    }

    #[test]
    fn compact_and_case_insensitive_names() {
        for (text, expected) in [
            ("v", HeaderName::Via),
            ("V", HeaderName::Via),
            ("vIa", HeaderName::Via),
            ("i", HeaderName::CallId),
            ("call-id", HeaderName::CallId),
            ("m", HeaderName::Contact),
            ("e", HeaderName::ContentEncoding),
            ("l", HeaderName::ContentLength),
            ("L", HeaderName::ContentLength),
            ("c", HeaderName::ContentType),
            ("C", HeaderName::ContentType),
            ("f", HeaderName::From),
            ("s", HeaderName::Subject),
            ("k", HeaderName::Supported),
            ("t", HeaderName::To),
            ("TO", HeaderName::To),
            ("o", HeaderName::Event),
            ("u", HeaderName::AllowEvents),
            ("r", HeaderName::ReferTo),
            ("b", HeaderName::ReferredBy),
            ("x", HeaderName::SessionExpires),
            ("MaX-fOrWaRdS", HeaderName::MaxForwards),
            ("www-authenticate", HeaderName::WwwAuthenticate),
            ("Authentication-Info", HeaderName::AuthenticationInfo),
        ] {
            assert_eq!(name(text), expected, "{text}");
        }
        assert_eq!(HeaderName::Via.compact_form(), Some('v'));
        assert_eq!(HeaderName::CSeq.compact_form(), None);
        assert_eq!(HeaderName::CallId.as_str(), "Call-ID");
    }

    #[test]
    fn standard_table_is_sorted_and_consistent() {
        let table = HeaderName::STANDARD;
        assert!(
            table.windows(2).all(|w| w[0].0 < w[1].0),
            "table must stay sorted"
        );
        for (lower, h) in table {
            assert_eq!(h.as_str().to_ascii_lowercase().as_bytes(), *lower);
            assert_eq!(&HeaderName::from_bytes(lower).unwrap(), h);
            assert_eq!(&name(h.as_str()), h);
            if let Some(c) = h.compact_form() {
                assert_eq!(&name(&c.to_string()), h);
            }
        }
    }

    #[test]
    fn unknown_names_kept_and_compared_case_insensitively() {
        let a = name("NewFangledHeader");
        let b = name("newfangledheader");
        assert!(matches!(a, HeaderName::Other(_)));
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "NewFangledHeader");
        assert_eq!(name("C%6Fntact").as_str(), "C%6Fntact");
        assert_ne!(name("C%6Fntact"), HeaderName::Contact);
        assert_eq!(name("z"), name("Z"));
        assert!(matches!(name("z"), HeaderName::Other(_)));
        assert!("".parse::<HeaderName>().is_err());
        assert!("Bad Name".parse::<HeaderName>().is_err());
        assert!("Bad:Name".parse::<HeaderName>().is_err());
        use std::collections::hash_map::DefaultHasher;
        let h = |n: &HeaderName| {
            let mut s = DefaultHasher::new();
            n.hash(&mut s);
            s.finish()
        };
        assert_eq!(h(&a), h(&b));
    }

    #[test]
    fn values_are_sanitized() {
        let v = HeaderValue::from("  a\r\nInjected: x \t");
        assert_eq!(v.as_bytes(), b"a  Injected: x");
        assert_eq!(HeaderValue::from_static("plain").to_str().unwrap(), "plain");
        assert_eq!(HeaderValue::from(70u32).as_bytes(), b"70");
    }

    #[test]
    fn list_operations() {
        let mut h = Headers::new();
        h.push(HeaderName::To, "a");
        h.push(HeaderName::Via, "v1");
        h.push(HeaderName::Via, "v2");
        h.prepend(HeaderName::Via, "v0");
        h.prepend(HeaderName::RecordRoute, "rr");
        let names: Vec<&str> = h.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, vec!["Record-Route", "To", "Via", "Via", "Via"]);
        assert_eq!(h.get(&HeaderName::Via).unwrap().as_bytes(), b"v0");
        assert_eq!(h.count(&HeaderName::Via), 3);
        h.set(HeaderName::Via, "only");
        assert_eq!(h.count(&HeaderName::Via), 1);
        h.set(HeaderName::CSeq, "1 INVITE");
        assert_eq!(h.iter().last().unwrap().name, HeaderName::CSeq);
        assert_eq!(h.remove(&HeaderName::Via), 1);
        assert!(!h.contains(&HeaderName::Via));
        assert_eq!(h.remove_first(&HeaderName::To).unwrap().as_bytes(), b"a");
    }

    #[test]
    fn remove_first_value_of_lists() {
        let mut h = Headers::new();
        h.push(HeaderName::Route, "<sip:a;lr>, <sip:b;lr>");
        h.push(HeaderName::Route, "<sip:c>");
        assert_eq!(
            h.remove_first_value(&HeaderName::Route).as_deref(),
            Some("<sip:a;lr>")
        );
        assert_eq!(h.get(&HeaderName::Route).unwrap().as_bytes(), b"<sip:b;lr>");
        assert_eq!(
            h.remove_first_value(&HeaderName::Route).as_deref(),
            Some("<sip:b;lr>")
        );
        assert_eq!(
            h.remove_first_value(&HeaderName::Route).as_deref(),
            Some("<sip:c>")
        );
        assert_eq!(h.remove_first_value(&HeaderName::Route), None);
    }
}
