//! Typed, lazily parsed views of the standard headers, as methods on [`Headers`]: Via, From, To,
//! Call-ID, CSeq, Max-Forwards, Contact, Route, Record-Route, Content-Length, Content-Type,
//! Expires, the four authentication headers, Allow, Supported, Require, Proxy-Require and
//! Unsupported; plus typed setters. Also the small value types [`CSeq`] and [`MediaType`].
//!
//! Nothing is cached: each accessor parses the raw value when called. The hot lookups used for
//! transaction and dialog matching (`top_via_branch`, `from_tag`, `to_tag`, `call_id`) do not
//! allocate. Checking which headers must be present is the job of the `validate` module.

use std::fmt;
use std::str::FromStr;

use super::auth::{Challenge, Credentials};
use super::header::{HeaderName, HeaderValue, Headers};
use super::method::Method;
use super::name_addr::{
    parse_delta_seconds, parse_params, split_name_addr, Contact, NameAddr, NameAddrError,
};
use super::params::Params;
use super::syntax::{find_param, is_token, is_token_byte, split_list, trim_ws_str};
use super::via::{via_branch, Via, ViaError};

/// Why a typed header accessor failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The header is required by the accessor but absent.
    #[error("missing {0} header")]
    Missing(HeaderName),
    /// The raw value is not UTF-8.
    #[error("{0} header is not valid UTF-8")]
    NotUtf8(HeaderName),
    /// The value is malformed.
    #[error("invalid {name} header: {reason}")]
    Invalid {
        /// Header concerned.
        name: HeaderName,
        /// What is wrong.
        reason: String,
    },
}

impl HeaderError {
    pub(crate) fn invalid(name: HeaderName, reason: impl fmt::Display) -> Self {
        HeaderError::Invalid {
            name,
            reason: reason.to_string(),
        }
    }

    /// The header the error is about.
    pub fn header(&self) -> &HeaderName {
        match self {
            HeaderError::Missing(n) | HeaderError::NotUtf8(n) => n,
            HeaderError::Invalid { name, .. } => name,
        }
    }
}

/// The CSeq header value: a sequence number and a method.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CSeq {
    /// Sequence number.
    pub seq: u32,
    /// Method (must equal the request method).
    pub method: Method,
}

impl CSeq {
    /// A CSeq value.
    pub fn new(seq: u32, method: Method) -> Self {
        Self { seq, method }
    }

    /// Parses `1*DIGIT LWS Method`; the number must fit in 32 bits.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let s = trim_ws_str(s);
        let digits_end = s
            .bytes()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(s.len());
        let (digits, rest) = s.split_at(digits_end);
        if digits.is_empty() {
            return Err("missing sequence number");
        }
        if digits.len() > 10 {
            return Err("sequence number too large");
        }
        let seq = digits
            .parse::<u32>()
            .map_err(|_| "sequence number too large")?;
        let method_text = trim_ws_str(rest);
        if method_text.len() == rest.len() {
            return Err("missing white space before the method");
        }
        let method = Method::from_str(method_text).map_err(|_| "invalid method")?;
        Ok(Self { seq, method })
    }
}

impl fmt::Display for CSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.seq, self.method)
    }
}

/// A media type (`type/subtype;params`), as in Content-Type and Accept.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MediaType {
    /// Top-level type as written (`application`).
    pub main_type: String,
    /// Subtype as written (`sdp`).
    pub sub_type: String,
    /// Parameters (`boundary`, `charset`...), as written.
    pub params: Params,
}

impl MediaType {
    /// A media type without parameters.
    pub fn new(main_type: &str, sub_type: &str) -> Self {
        Self {
            main_type: main_type.to_owned(),
            sub_type: sub_type.to_owned(),
            params: Params::new(),
        }
    }

    /// `application/sdp`.
    pub fn sdp() -> Self {
        Self::new("application", "sdp")
    }

    /// True when the type and subtype are `main_type/sub_type`, ignoring case.
    pub fn is(&self, main_type: &str, sub_type: &str) -> bool {
        self.main_type.eq_ignore_ascii_case(main_type)
            && self.sub_type.eq_ignore_ascii_case(sub_type)
    }

    /// Parses `type SWS / SWS subtype *(; param)`.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let s = trim_ws_str(s);
        let (main_type, rest) = s.split_once('/').ok_or("missing '/'")?;
        let main_type = trim_ws_str(main_type);
        let rest = rest.trim_start_matches([' ', '\t']);
        let sub_end = rest
            .bytes()
            .position(|c| !is_token_byte(c))
            .unwrap_or(rest.len());
        let (sub_type, params) = rest.split_at(sub_end);
        if !is_token(main_type.as_bytes()) || !is_token(sub_type.as_bytes()) {
            return Err("invalid type or subtype");
        }
        let params = parse_params(params)?;
        Ok(Self {
            main_type: main_type.to_owned(),
            sub_type: sub_type.to_owned(),
            params,
        })
    }
}

impl FromStr for MediaType {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MediaType::parse(s)
    }
}

impl fmt::Display for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}{}", self.main_type, self.sub_type, self.params)
    }
}

fn name_addr_error(name: HeaderName, e: NameAddrError) -> HeaderError {
    HeaderError::invalid(name, e)
}

impl Headers {
    /// The first value of `name` as text; `Ok(None)` when absent.
    pub fn text(&self, name: &HeaderName) -> Result<Option<&str>, HeaderError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(Some)
                .map_err(|_| HeaderError::NotUtf8(name.clone())),
        }
    }

    fn required_text(&self, name: HeaderName) -> Result<&str, HeaderError> {
        match self.text(&name)? {
            Some(t) => Ok(t),
            None => Err(HeaderError::Missing(name)),
        }
    }

    /// Every element of every `name` header, split at commas; an empty header contributes
    /// nothing, an empty element between commas is an error.
    pub fn list_items<'a>(&'a self, name: &HeaderName) -> Result<Vec<&'a str>, HeaderError> {
        let mut out = Vec::new();
        for v in self.get_all(name) {
            let text = v.to_str().map_err(|_| HeaderError::NotUtf8(name.clone()))?;
            if text.is_empty() {
                continue;
            }
            for item in split_list(text) {
                if item.is_empty() {
                    return Err(HeaderError::invalid(name.clone(), "empty list element"));
                }
                out.push(item);
            }
        }
        Ok(out)
    }

    /// Every Via value, top first.
    pub fn via(&self) -> Result<Vec<Via>, HeaderError> {
        self.list_items(&HeaderName::Via)?
            .into_iter()
            .map(|item| {
                Via::parse(item).map_err(|e: ViaError| HeaderError::invalid(HeaderName::Via, e))
            })
            .collect()
    }

    /// The top Via value.
    pub fn top_via(&self) -> Result<Via, HeaderError> {
        let text = self.required_text(HeaderName::Via)?;
        let first = split_list(text).next().unwrap_or_default();
        Via::parse(first).map_err(|e| HeaderError::invalid(HeaderName::Via, e))
    }

    /// The branch of the top Via, without allocating. `None` when there is no Via, no branch, or
    /// the top Via is malformed.
    pub fn top_via_branch(&self) -> Option<&str> {
        via_branch(self.top_via_value()?)
    }

    /// The top Via value as written (the first element of the first Via header), without
    /// allocating.
    pub fn top_via_value(&self) -> Option<&str> {
        let text = self.get(&HeaderName::Via)?.to_str().ok()?;
        split_list(text).next().filter(|v| !v.is_empty())
    }

    /// Inserts `via` as the new top Via (what a client or proxy does before sending a request).
    pub fn prepend_via(&mut self, via: &Via) {
        self.prepend(HeaderName::Via, HeaderValue::from_display(via));
    }

    /// Removes the top Via value (what a proxy does with a response); returns it as written.
    pub fn remove_top_via(&mut self) -> Option<String> {
        self.remove_first_value(&HeaderName::Via)
    }

    fn name_addr(&self, name: HeaderName) -> Result<NameAddr, HeaderError> {
        let text = self.required_text(name.clone())?;
        NameAddr::parse(text).map_err(|e| name_addr_error(name, e))
    }

    fn tag_of(&self, name: &HeaderName) -> Option<&str> {
        let text = self.get(name)?.to_str().ok()?;
        let parts = split_name_addr(text).ok()?;
        find_param(parts.params, "tag").flatten()
    }

    /// The From header.
    pub fn from(&self) -> Result<NameAddr, HeaderError> {
        self.name_addr(HeaderName::From)
    }

    /// The To header.
    pub fn to(&self) -> Result<NameAddr, HeaderError> {
        self.name_addr(HeaderName::To)
    }

    /// The From tag, without allocating.
    pub fn from_tag(&self) -> Option<&str> {
        self.tag_of(&HeaderName::From)
    }

    /// The To tag, without allocating.
    pub fn to_tag(&self) -> Option<&str> {
        self.tag_of(&HeaderName::To)
    }

    /// Replaces the From header.
    pub fn set_from(&mut self, from: &NameAddr) {
        self.set(HeaderName::From, HeaderValue::from_display(from));
    }

    /// Replaces the To header.
    pub fn set_to(&mut self, to: &NameAddr) {
        self.set(HeaderName::To, HeaderValue::from_display(to));
    }

    /// The Call-ID: one word, optionally `@` another (RFC 3261 section 25.1), i.e. a non-empty run
    /// of visible characters.
    pub fn call_id(&self) -> Result<&str, HeaderError> {
        let text = self.required_text(HeaderName::CallId)?;
        if text.is_empty() || text.bytes().any(|b| b <= 0x20 || b == 0x7f) {
            return Err(HeaderError::invalid(
                HeaderName::CallId,
                "not a single word",
            ));
        }
        Ok(text)
    }

    /// Replaces the Call-ID.
    pub fn set_call_id(&mut self, call_id: &str) {
        self.set(HeaderName::CallId, call_id);
    }

    /// The CSeq header.
    pub fn cseq(&self) -> Result<CSeq, HeaderError> {
        let text = self.required_text(HeaderName::CSeq)?;
        CSeq::parse(text).map_err(|e| HeaderError::invalid(HeaderName::CSeq, e))
    }

    /// Replaces the CSeq header.
    pub fn set_cseq(&mut self, cseq: &CSeq) {
        self.set(HeaderName::CSeq, HeaderValue::from_display(cseq));
    }

    fn number(&self, name: HeaderName) -> Result<Option<u64>, HeaderError> {
        let Some(text) = self.text(&name)? else {
            return Ok(None);
        };
        if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HeaderError::invalid(
                name,
                "not a non-negative decimal number",
            ));
        }
        text.parse()
            .map(Some)
            .map_err(|_| HeaderError::invalid(name, "number too large"))
    }

    /// Max-Forwards; `None` when absent (RFC 2543 requests may lack it).
    pub fn max_forwards(&self) -> Result<Option<u32>, HeaderError> {
        match self.number(HeaderName::MaxForwards)? {
            None => Ok(None),
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| HeaderError::invalid(HeaderName::MaxForwards, "number too large")),
        }
    }

    /// Replaces Max-Forwards.
    pub fn set_max_forwards(&mut self, n: u32) {
        self.set(HeaderName::MaxForwards, n);
    }

    /// Content-Length; `None` when absent.
    pub fn content_length(&self) -> Result<Option<usize>, HeaderError> {
        match self.number(HeaderName::ContentLength)? {
            None => Ok(None),
            Some(n) => usize::try_from(n)
                .map(Some)
                .map_err(|_| HeaderError::invalid(HeaderName::ContentLength, "number too large")),
        }
    }

    /// Replaces Content-Length (the serializer always writes the body length anyway).
    pub fn set_content_length(&mut self, len: usize) {
        self.set(HeaderName::ContentLength, len);
    }

    /// Expires in seconds; `None` when absent. Values beyond 32 bits are reported as
    /// `u32::MAX` (RFC 3261 section 20.19 allows treating them as the largest value).
    pub fn expires(&self) -> Result<Option<u32>, HeaderError> {
        let Some(text) = self.text(&HeaderName::Expires)? else {
            return Ok(None);
        };
        parse_delta_seconds(text)
            .map(Some)
            .ok_or_else(|| HeaderError::invalid(HeaderName::Expires, "not a number of seconds"))
    }

    /// Replaces Expires.
    pub fn set_expires(&mut self, seconds: u32) {
        self.set(HeaderName::Expires, seconds);
    }

    /// Content-Type; `None` when absent.
    pub fn content_type(&self) -> Result<Option<MediaType>, HeaderError> {
        let Some(text) = self.text(&HeaderName::ContentType)? else {
            return Ok(None);
        };
        MediaType::parse(text)
            .map(Some)
            .map_err(|e| HeaderError::invalid(HeaderName::ContentType, e))
    }

    /// Replaces Content-Type.
    pub fn set_content_type(&mut self, media_type: &MediaType) {
        self.set(
            HeaderName::ContentType,
            HeaderValue::from_display(media_type),
        );
    }

    fn name_addr_list(&self, name: HeaderName) -> Result<Vec<NameAddr>, HeaderError> {
        self.list_items(&name)?
            .into_iter()
            .map(|item| NameAddr::parse(item).map_err(|e| name_addr_error(name.clone(), e)))
            .collect()
    }

    /// Every Contact value (`*` is [`Contact::Wildcard`]).
    pub fn contact(&self) -> Result<Vec<Contact>, HeaderError> {
        self.list_items(&HeaderName::Contact)?
            .into_iter()
            .map(|item| Contact::parse(item).map_err(|e| name_addr_error(HeaderName::Contact, e)))
            .collect()
    }

    /// Appends a Contact header.
    pub fn push_contact(&mut self, contact: &NameAddr) {
        self.push(HeaderName::Contact, HeaderValue::from_display(contact));
    }

    /// Every Route value, in order.
    pub fn route(&self) -> Result<Vec<NameAddr>, HeaderError> {
        self.name_addr_list(HeaderName::Route)
    }

    /// Appends a Route header.
    pub fn push_route(&mut self, route: &NameAddr) {
        self.push(HeaderName::Route, HeaderValue::from_display(route));
    }

    /// Every Record-Route value, in order.
    pub fn record_route(&self) -> Result<Vec<NameAddr>, HeaderError> {
        self.name_addr_list(HeaderName::RecordRoute)
    }

    /// Inserts a Record-Route value on top (what a record-routing proxy does).
    pub fn prepend_record_route(&mut self, route: &NameAddr) {
        self.prepend(HeaderName::RecordRoute, HeaderValue::from_display(route));
    }

    fn auth_list<T>(
        &self,
        name: HeaderName,
        parse: fn(&str) -> Result<Vec<T>, super::auth::AuthError>,
    ) -> Result<Vec<T>, HeaderError> {
        let mut out = Vec::new();
        for v in self.get_all(&name) {
            let text = v.to_str().map_err(|_| HeaderError::NotUtf8(name.clone()))?;
            out.extend(parse(text).map_err(|e| HeaderError::invalid(name.clone(), e))?);
        }
        Ok(out)
    }

    /// Every Authorization credentials.
    pub fn authorization(&self) -> Result<Vec<Credentials>, HeaderError> {
        self.auth_list(HeaderName::Authorization, Credentials::parse_list)
    }

    /// Every Proxy-Authorization credentials.
    pub fn proxy_authorization(&self) -> Result<Vec<Credentials>, HeaderError> {
        self.auth_list(HeaderName::ProxyAuthorization, Credentials::parse_list)
    }

    /// Every WWW-Authenticate challenge.
    pub fn www_authenticate(&self) -> Result<Vec<Challenge>, HeaderError> {
        self.auth_list(HeaderName::WwwAuthenticate, Challenge::parse_list)
    }

    /// Every Proxy-Authenticate challenge.
    pub fn proxy_authenticate(&self) -> Result<Vec<Challenge>, HeaderError> {
        self.auth_list(HeaderName::ProxyAuthenticate, Challenge::parse_list)
    }

    fn token_list(&self, name: HeaderName) -> Result<Vec<&str>, HeaderError> {
        let items = self.list_items(&name)?;
        if let Some(bad) = items.iter().find(|i| !is_token(i.as_bytes())) {
            return Err(HeaderError::invalid(
                name,
                format!("{bad:?} is not a token"),
            ));
        }
        Ok(items)
    }

    /// Every method in Allow headers.
    pub fn allow(&self) -> Result<Vec<Method>, HeaderError> {
        self.token_list(HeaderName::Allow)?
            .into_iter()
            .map(|t| Method::from_str(t).map_err(|e| HeaderError::invalid(HeaderName::Allow, e)))
            .collect()
    }

    /// Every option tag in Supported headers.
    pub fn supported(&self) -> Result<Vec<&str>, HeaderError> {
        self.token_list(HeaderName::Supported)
    }

    /// Every option tag in Require headers.
    pub fn require(&self) -> Result<Vec<&str>, HeaderError> {
        self.token_list(HeaderName::Require)
    }

    /// Every option tag in Proxy-Require headers.
    pub fn proxy_require(&self) -> Result<Vec<&str>, HeaderError> {
        self.token_list(HeaderName::ProxyRequire)
    }

    /// Every option tag in Unsupported headers.
    pub fn unsupported(&self) -> Result<Vec<&str>, HeaderError> {
        self.token_list(HeaderName::Unsupported)
    }

    /// Sets a list header from items (`Allow`, `Supported`, ...), joined with `, `.
    pub fn set_list<T: fmt::Display>(&mut self, name: HeaderName, items: &[T]) {
        let joined = items
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        self.set(name, joined);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[(&str, &str)]) -> Headers {
        let mut h = Headers::new();
        for (n, v) in lines {
            h.push(n.parse().unwrap(), *v);
        }
        h
    }

    #[test]
    fn cseq_values() {
        assert_eq!(
            CSeq::parse("0009\t INVITE").unwrap(),
            CSeq::new(9, Method::Invite)
        );
        assert_eq!(CSeq::parse("4294967295 ACK").unwrap().seq, u32::MAX);
        assert!(CSeq::parse("36893488147419103232 REGISTER").is_err());
        assert!(CSeq::parse("4294967296 REGISTER").is_err());
        assert!(CSeq::parse("1INVITE").is_err());
        assert!(CSeq::parse("INVITE").is_err());
        assert!(CSeq::parse("1 ").is_err());
        assert!(CSeq::parse("-1 INVITE").is_err());
        assert_eq!(CSeq::new(3, Method::Bye).to_string(), "3 BYE");
    }

    #[test]
    fn media_types() {
        let m = MediaType::parse("multipart/mixed;boundary=7a9cbec02ceef655").unwrap();
        assert!(m.is("MULTIPART", "Mixed"));
        assert_eq!(m.params.value("boundary"), Some("7a9cbec02ceef655"));
        let q = MediaType::parse(r#"text / plain ; charset="utf-8""#).unwrap();
        assert_eq!(q.params.unquoted_value("charset").as_deref(), Some("utf-8"));
        assert_eq!(MediaType::sdp().to_string(), "application/sdp");
        assert!(MediaType::parse("application").is_err());
        assert!(MediaType::parse("application/").is_err());
        assert!(MediaType::parse("a/b junk").is_err());
    }

    #[test]
    fn via_list_across_lines_and_commas() {
        let h = headers(&[
            (
                "Via",
                "SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/TCP b;branch=z9hG4bK2",
            ),
            ("v", "SIP/2.0/TLS c:5061;branch=z9hG4bK3"),
        ]);
        let vias = h.via().unwrap();
        assert_eq!(vias.len(), 3);
        assert_eq!(vias[2].port, Some(5061));
        assert_eq!(h.top_via().unwrap().branch(), Some("z9hG4bK1"));
        assert_eq!(h.top_via_branch(), Some("z9hG4bK1"));
        let bad = headers(&[("Via", "SIP/2.0/UDP 192.0.2.15;;,;,,")]);
        assert!(bad.via().is_err());
        assert!(bad.top_via().is_err());
        assert_eq!(
            Headers::new().top_via(),
            Err(HeaderError::Missing(HeaderName::Via))
        );
    }

    #[test]
    fn via_manipulation() {
        let mut h = headers(&[(
            "Via",
            "SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b;branch=z9hG4bK2",
        )]);
        let mine = Via::new(
            super::super::via::Transport::Tcp,
            "proxy.example.com".parse().unwrap(),
            Some(5060),
        )
        .with_branch("z9hG4bKp");
        h.prepend_via(&mine);
        assert_eq!(h.top_via_branch(), Some("z9hG4bKp"));
        assert_eq!(h.via().unwrap().len(), 3);
        assert!(h.remove_top_via().unwrap().contains("z9hG4bKp"));
        assert!(h.remove_top_via().unwrap().contains("z9hG4bK1"));
        assert_eq!(h.top_via_branch(), Some("z9hG4bK2"));
    }

    #[test]
    fn from_to_tags_and_call_id() {
        let h = headers(&[
            ("f", r#""A" <sip:a@x>;tag=abc"#),
            ("t", "sip:b@y"),
            ("i", "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"),
        ]);
        assert_eq!(h.from_tag(), Some("abc"));
        assert_eq!(h.to_tag(), None);
        assert_eq!(h.from().unwrap().display_name.as_deref(), Some("A"));
        assert_eq!(h.to().unwrap().uri.to_string(), "sip:b@y");
        assert_eq!(
            h.call_id().unwrap(),
            "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
        );
        let bad = headers(&[("Call-ID", "two words")]);
        assert!(bad.call_id().is_err());
        assert_eq!(
            Headers::new().call_id(),
            Err(HeaderError::Missing(HeaderName::CallId))
        );
    }

    #[test]
    fn numbers() {
        let h = headers(&[
            ("Max-Forwards", "0068"),
            ("l", "150"),
            ("Expires", "10000000000000"),
        ]);
        assert_eq!(h.max_forwards().unwrap(), Some(68));
        assert_eq!(h.content_length().unwrap(), Some(150));
        assert_eq!(h.expires().unwrap(), Some(u32::MAX));
        let bad = headers(&[
            ("Content-Length", "-999"),
            ("Max-Forwards", "ten"),
            ("Expires", "x"),
        ]);
        assert!(bad.content_length().is_err());
        assert!(bad.max_forwards().is_err());
        assert!(bad.expires().is_err());
        assert_eq!(Headers::new().max_forwards().unwrap(), None);
        let huge = headers(&[("Content-Length", "99999999999999999999999")]);
        assert!(huge.content_length().is_err());
    }

    #[test]
    fn contact_route_record_route() {
        let h = headers(&[
            (
                "m",
                r#""Quoted string \"\"" <sip:jdrosen@example.com> ; newparam = newvalue ;  secondparam ; q = 0.33"#,
            ),
            ("Contact", "<sip:a@b>, sip:c@d;expires=60"),
            ("Route", "<sip:p1.example.com;lr>,<sip:p2.example.com;lr>"),
            ("Record-Route", "<sip:rr.example.com;lr>"),
        ]);
        let c = h.contact().unwrap();
        assert_eq!(c.len(), 3);
        let first = c[0].address().unwrap();
        assert_eq!(first.display_name.as_deref(), Some("Quoted string \"\""));
        assert_eq!(first.param("newparam"), Some("newvalue"));
        assert_eq!(first.q(), Some(0.33));
        assert_eq!(c[2].address().unwrap().expires(), Some(60));
        let r = h.route().unwrap();
        assert_eq!(r.len(), 2);
        assert!(r[0].uri.as_sip().unwrap().is_loose_router());
        assert_eq!(h.record_route().unwrap().len(), 1);
        let star = headers(&[("Contact", "*")]);
        assert_eq!(star.contact().unwrap(), vec![Contact::Wildcard]);
    }

    #[test]
    fn option_tags_and_allow() {
        let h = headers(&[
            ("Require", "nothingSupportsThis, nothingSupportsThisEither"),
            ("k", "100rel,timer"),
            ("Supported", ""),
            ("Allow", "INVITE, ACK, BYE, NEWMETHOD"),
        ]);
        assert_eq!(
            h.require().unwrap(),
            vec!["nothingSupportsThis", "nothingSupportsThisEither"]
        );
        assert_eq!(h.supported().unwrap(), vec!["100rel", "timer"]);
        assert_eq!(
            h.allow().unwrap(),
            vec![
                Method::Invite,
                Method::Ack,
                Method::Bye,
                Method::Extension("NEWMETHOD".into())
            ]
        );
        assert!(headers(&[("Require", "a b")]).require().is_err());
        assert!(headers(&[("Require", "a,,b")]).require().is_err());
        let mut s = Headers::new();
        s.set_list(HeaderName::Allow, &[Method::Invite, Method::Bye]);
        assert_eq!(
            s.get(&HeaderName::Allow).unwrap().as_bytes(),
            b"INVITE, BYE"
        );
    }

    #[test]
    fn auth_headers() {
        let h = headers(&[
            (
                "WWW-Authenticate",
                r#"Digest realm="atlanta.com", nonce="84a4cc6f", qop="auth""#,
            ),
            ("Proxy-Authenticate", r#"Digest realm="p", nonce="n""#),
            ("Authorization", "NoOneKnowsThisScheme opaque-data=here"),
            ("Proxy-Authorization", r#"Digest username="u", realm="p""#),
        ]);
        assert_eq!(h.www_authenticate().unwrap()[0].param("qop"), Some("auth"));
        assert_eq!(h.proxy_authenticate().unwrap()[0].param("nonce"), Some("n"));
        assert_eq!(
            h.authorization().unwrap()[0].param("opaque-data"),
            Some("here")
        );
        assert_eq!(
            h.proxy_authorization().unwrap()[0].param("username"),
            Some("u")
        );
    }

    #[test]
    fn setters() {
        let mut h = Headers::new();
        h.set_cseq(&CSeq::new(1, Method::Invite));
        h.set_call_id("abc@host");
        h.set_max_forwards(70);
        h.set_expires(3600);
        h.set_content_type(&MediaType::sdp());
        h.set_content_length(0);
        let to = NameAddr::parse("<sip:b@y>").unwrap();
        h.set_to(&to);
        h.set_from(&NameAddr::parse("<sip:a@x>;tag=1").unwrap());
        h.push_contact(&NameAddr::parse("<sip:a@10.0.0.1>").unwrap());
        h.push_route(&NameAddr::parse("<sip:r1;lr>").unwrap());
        h.prepend_record_route(&NameAddr::parse("<sip:rr;lr>").unwrap());
        assert_eq!(h.cseq().unwrap(), CSeq::new(1, Method::Invite));
        assert_eq!(h.call_id().unwrap(), "abc@host");
        assert_eq!(h.max_forwards().unwrap(), Some(70));
        assert_eq!(h.expires().unwrap(), Some(3600));
        assert!(h.content_type().unwrap().unwrap().is("application", "sdp"));
        assert_eq!(h.content_length().unwrap(), Some(0));
        assert_eq!(h.to().unwrap(), to);
        assert_eq!(h.from_tag(), Some("1"));
        assert_eq!(h.contact().unwrap().len(), 1);
        assert_eq!(h.route().unwrap().len(), 1);
        assert_eq!(h.record_route().unwrap().len(), 1);
    }
}
