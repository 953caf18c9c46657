//! The syntactic message parser (RFC 3261 section 7): start line, header fields (folding, compact
//! names, raw values kept as zero-copy slices of the input) and body framing by Content-Length.
//!
//! Two framings: a datagram (UDP; a missing Content-Length means "the rest of the datagram",
//! trailing bytes after the body are ignored, a body shorter than Content-Length is an error) and
//! a stream frame already delimited by [`super::framing::check`]. Semantic checks (mandatory
//! headers, CSeq/method agreement, version 2.0...) are not done here but in the `validate`
//! module; typed header values are parsed lazily by the accessors on `Headers`.
//!
//! A failure returns a [`ParseError`] that keeps whatever header fields could be read, so that a
//! transport can still answer 400 statelessly.

use bytes::Bytes;
use memchr::{memchr, memchr2, memrchr};

use super::header::{Header, HeaderName, HeaderValue, Headers};
use super::method::Method;
use super::syntax::{is_ws, trim_ws};
use super::uri::{Uri, UriError};
use super::{Message, Request, Response, Version};

impl Message {
    /// Parses one UDP datagram with the default [`ParseLimits`]: leading CRLFs are skipped,
    /// a missing Content-Length means the body is the rest of the datagram, bytes after the body
    /// are ignored (RFC 4475 dblreq), and a body shorter than Content-Length is an error.
    pub fn parse(datagram: impl Into<Bytes>) -> Result<Message, ParseError> {
        Self::parse_with_limits(datagram.into(), &ParseLimits::DEFAULT)
    }

    /// [`Message::parse`] with explicit limits.
    pub fn parse_with_limits(datagram: Bytes, limits: &ParseLimits) -> Result<Message, ParseError> {
        parse_message(datagram, limits, Framing::Datagram)
    }
}

/// Bounds applied while parsing and framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// Largest accepted message (start line, headers and body), in bytes.
    pub max_message_size: usize,
    /// Largest accepted number of header lines.
    pub max_headers: usize,
}

impl ParseLimits {
    /// 64 KiB messages, 256 header lines.
    pub const DEFAULT: ParseLimits = ParseLimits {
        max_message_size: 64 * 1024,
        max_headers: 256,
    };
}

impl Default for ParseLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What is wrong with a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    /// Nothing but line breaks.
    #[error("empty message")]
    Empty,
    /// The message exceeds [`ParseLimits::max_message_size`].
    #[error("message larger than {limit} bytes")]
    MessageTooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// The message has more than [`ParseLimits::max_headers`] header lines.
    #[error("more than {limit} header fields")]
    TooManyHeaders {
        /// The limit in force.
        limit: usize,
    },
    /// The start line is neither a request line nor a status line (missing parts, extra
    /// spaces, stray CR).
    #[error("malformed start line")]
    InvalidStartLine,
    /// The request method is not a token.
    #[error("invalid method")]
    InvalidMethod,
    /// The Request-URI does not parse.
    #[error("invalid Request-URI: {0}")]
    InvalidRequestUri(UriError),
    /// The version is not `SIP/<digits>.<digits>` (a well-formed but unsupported version is
    /// reported by validation, with status 505).
    #[error("malformed SIP version")]
    InvalidVersion,
    /// The status code is not three digits between 100 and 699.
    #[error("invalid status code")]
    InvalidStatusCode,
    /// A header line without a colon, with a bad name, a stray CR or leading white space.
    #[error("malformed header line {line}")]
    InvalidHeaderLine {
        /// 1-based logical line number within the message (folded lines count once).
        line: usize,
    },
    /// The stream ended inside the header section.
    #[error("header section not terminated by an empty line")]
    UnterminatedHeaders,
    /// Content-Length is not a non-negative decimal number.
    #[error("invalid Content-Length")]
    InvalidContentLength,
    /// More than one Content-Length header.
    #[error("several Content-Length headers")]
    MultipleContentLength,
    /// The datagram holds fewer body bytes than Content-Length announces.
    #[error("body shorter than Content-Length ({available} of {expected} bytes)")]
    BodyTruncated {
        /// Content-Length.
        expected: usize,
        /// Bytes present.
        available: usize,
    },
}

impl ParseErrorKind {
    /// The status to answer a request with: 513 for a too large message, 400 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            ParseErrorKind::MessageTooLarge { .. } => 513,
            _ => 400,
        }
    }

    /// True for errors that make the message boundaries unknown: on a stream the connection must
    /// be closed; on a datagram the rest of the datagram is discarded (RFC 4475 ncl, mcl01).
    pub fn is_framing_error(&self) -> bool {
        matches!(
            self,
            ParseErrorKind::MessageTooLarge { .. }
                | ParseErrorKind::TooManyHeaders { .. }
                | ParseErrorKind::UnterminatedHeaders
                | ParseErrorKind::InvalidContentLength
                | ParseErrorKind::MultipleContentLength
        )
    }
}

/// What could be read of a message that failed to parse.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Partial {
    looks_like_response: bool,
    method: Option<Method>,
    headers: Headers,
}

/// A message that could not be parsed, with the header fields that could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct ParseError {
    kind: ParseErrorKind,
    partial: Option<Box<Partial>>,
}

impl ParseError {
    pub(crate) fn new(kind: ParseErrorKind) -> Self {
        Self {
            kind,
            partial: None,
        }
    }

    /// What is wrong.
    pub fn kind(&self) -> &ParseErrorKind {
        &self.kind
    }

    /// The status to answer a request with (see [`ParseErrorKind::status`]).
    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// True when the start line looked like a status line: a broken response is discarded,
    /// never answered.
    pub fn is_response(&self) -> bool {
        self.partial.as_ref().is_some_and(|p| p.looks_like_response)
    }

    /// The request method, when the request line got that far.
    pub fn method(&self) -> Option<&Method> {
        self.partial.as_ref().and_then(|p| p.method.as_ref())
    }

    /// The header fields that could be read (all well-formed lines before the error; after a
    /// start-line error, all well-formed lines of the header section).
    pub fn headers(&self) -> Option<&Headers> {
        self.partial.as_ref().map(|p| &p.headers)
    }

    /// The stateless error response (400 or 513) to send back, copying Via, From, To, Call-ID
    /// and CSeq from what could be read. `None` when the message is a response, an ACK, or has
    /// no Via to send the answer to.
    pub fn response(&self) -> Option<Response> {
        let p = self.partial.as_ref()?;
        if p.looks_like_response || p.method == Some(Method::Ack) {
            return None;
        }
        if !p.headers.contains(&HeaderName::Via) {
            return None;
        }
        let status = self.status();
        let reason = format!("{} ({})", super::reason_phrase(status), self.kind);
        Some(Response::from_headers(&p.headers, status, &reason))
    }
}

/// How the end of the message is determined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// The input is one UDP datagram.
    Datagram,
    /// The input is exactly one frame found by `framing::check`.
    Stream,
}

/// One logical line (a header with its continuation lines, or the blank line ending the head).
enum Line {
    /// Content range `[start, end)` (may contain CRLF when folded), the index after it, whether
    /// it was folded and whether it holds a stray CR.
    Text {
        start: usize,
        end: usize,
        next: usize,
        folded: bool,
        bare_cr: bool,
    },
    /// The empty line; body starts at `next`.
    Blank { next: usize },
    /// No more input.
    Eof,
}

fn line_end(buf: &[u8], pos: usize) -> Option<usize> {
    memchr(b'\n', buf.get(pos..)?).map(|i| pos + i)
}

fn content_end(buf: &[u8], start: usize, lf: usize) -> usize {
    if lf > start && buf.get(lf - 1) == Some(&b'\r') {
        lf - 1
    } else {
        lf
    }
}

/// One physical line starting at `pos`: the end of its content, the index after its line
/// break, and whether it holds a CR that is not part of its CRLF. `None` when no line break
/// follows (the caller treats the rest of the input as the last line).
fn physical_line(buf: &[u8], pos: usize) -> Option<(usize, usize, bool)> {
    let mut i = pos;
    let mut bare_cr = false;
    loop {
        let at = i + memchr2(b'\r', b'\n', buf.get(i..)?)?;
        if buf.get(at) == Some(&b'\n') {
            return Some((at, at + 1, bare_cr));
        }
        if buf.get(at + 1) == Some(&b'\n') {
            return Some((at, at + 2, bare_cr));
        }
        bare_cr = true;
        i = at + 1;
    }
}

/// The last line of a datagram, without line break: it runs to the end of the input.
fn unterminated_line(buf: &[u8], pos: usize) -> Line {
    let bare_cr = buf
        .get(pos..)
        .is_some_and(|rest| memchr(b'\r', rest).is_some());
    Line::Text {
        start: pos,
        end: buf.len(),
        next: buf.len(),
        folded: false,
        bare_cr,
    }
}

/// Reads the logical line at `pos`. A last line without a line break runs to the end of input.
fn logical_line(buf: &[u8], pos: usize) -> Line {
    if pos >= buf.len() {
        return Line::Eof;
    }
    let Some((mut end, mut next, mut bare_cr)) = physical_line(buf, pos) else {
        return unterminated_line(buf, pos);
    };
    if end == pos {
        return Line::Blank { next };
    }
    let mut folded = false;
    while buf.get(next).is_some_and(|&b| is_ws(b)) {
        folded = true;
        match physical_line(buf, next) {
            Some((e, n, cr)) => {
                end = e;
                next = n;
                bare_cr |= cr;
            }
            None => {
                bare_cr |= buf
                    .get(next..)
                    .is_some_and(|rest| memchr(b'\r', rest).is_some());
                end = buf.len();
                next = buf.len();
            }
        }
    }
    Line::Text {
        start: pos,
        end,
        next,
        folded,
        bare_cr,
    }
}

/// Parses `SIP/<digits>.<digits>` (the `SIP` is case-insensitive).
fn parse_version(b: &[u8]) -> Option<Version> {
    if b == b"SIP/2.0" {
        return Some(Version::SIP_2_0);
    }
    let prefix = b.get(..4)?;
    if !prefix.eq_ignore_ascii_case(b"SIP/") {
        return None;
    }
    let rest = b.get(4..)?;
    let dot = memchr(b'.', rest)?;
    let num = |d: &[u8]| -> Option<u16> {
        if d.is_empty() || d.len() > 4 || !d.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(d).ok()?.parse().ok()
    };
    Some(Version {
        major: num(rest.get(..dot)?)?,
        minor: num(rest.get(dot + 1..)?)?,
    })
}

enum StartLine {
    Request {
        method: Method,
        uri: Uri,
        version: Version,
    },
    Response {
        version: Version,
        status: u16,
        reason: String,
    },
}

fn parse_start_line(line: &[u8]) -> Result<StartLine, (ParseErrorKind, Option<Method>)> {
    if line.contains(&b'\r') {
        return Err((ParseErrorKind::InvalidStartLine, None));
    }
    if line
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"SIP/"))
    {
        let sp = memchr(b' ', line).ok_or((ParseErrorKind::InvalidStartLine, None))?;
        let version = line
            .get(..sp)
            .and_then(parse_version)
            .ok_or((ParseErrorKind::InvalidVersion, None))?;
        let rest = line.get(sp + 1..).unwrap_or_default();
        let code = rest
            .get(..3)
            .ok_or((ParseErrorKind::InvalidStatusCode, None))?;
        let separated = rest.len() == 3 || rest.get(3) == Some(&b' ');
        if !separated || !code.iter().all(u8::is_ascii_digit) {
            return Err((ParseErrorKind::InvalidStatusCode, None));
        }
        let status = code
            .iter()
            .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
        if !(100..=699).contains(&status) {
            return Err((ParseErrorKind::InvalidStatusCode, None));
        }
        let reason = String::from_utf8_lossy(rest.get(4..).unwrap_or_default()).into_owned();
        return Ok(StartLine::Response {
            version,
            status,
            reason,
        });
    }
    let sp1 = memchr(b' ', line).ok_or((ParseErrorKind::InvalidStartLine, None))?;
    let sp2 = memrchr(b' ', line).ok_or((ParseErrorKind::InvalidStartLine, None))?;
    let method = line
        .get(..sp1)
        .ok_or(ParseErrorKind::InvalidMethod)
        .and_then(|m| Method::from_bytes(m).map_err(|_| ParseErrorKind::InvalidMethod))
        .map_err(|k| (k, None))?;
    if sp2 == sp1 || sp2 + 1 == line.len() {
        // Two parts only, or trailing white space (RFC 4475 trws).
        return Err((ParseErrorKind::InvalidStartLine, Some(method)));
    }
    let uri = line
        .get(sp1 + 1..sp2)
        .and_then(|u| std::str::from_utf8(u).ok())
        .ok_or(UriError::InvalidCharacter)
        .and_then(Uri::parse)
        .map_err(|e| (ParseErrorKind::InvalidRequestUri(e), Some(method.clone())))?;
    let version = line
        .get(sp2 + 1..)
        .and_then(parse_version)
        .ok_or((ParseErrorKind::InvalidVersion, Some(method.clone())))?;
    Ok(StartLine::Request {
        method,
        uri,
        version,
    })
}

/// Parses one header line `[start, end)` of `data`.
fn parse_header(data: &Bytes, start: usize, end: usize, folded: bool) -> Option<Header> {
    let line = data.get(start..end)?;
    // Names are short: a plain loop beats a vectorized search here.
    let colon = line.iter().position(|&b| b == b':')?;
    let name_len = line
        .get(..colon)?
        .iter()
        .rposition(|&b| !is_ws(b))
        .map_or(0, |i| i + 1);
    let name = HeaderName::from_shared(data.slice(start..start + name_len)).ok()?;
    let raw_value = line.get(colon + 1..)?;
    let value = if folded {
        let mut v = Vec::with_capacity(raw_value.len());
        let mut i = 0;
        while let Some(&b) = raw_value.get(i) {
            match b {
                b'\r' if raw_value.get(i + 1) == Some(&b'\n') => i += 2,
                b'\r' => return None,
                b'\n' => i += 1,
                _ => {
                    v.push(b);
                    i += 1;
                }
            }
        }
        HeaderValue::from_parsed(Bytes::from(trim_ws(&v).to_vec()))
    } else {
        let lead = raw_value
            .iter()
            .position(|&b| !is_ws(b))
            .unwrap_or(raw_value.len());
        let end = raw_value
            .iter()
            .rposition(|&b| !is_ws(b))
            .map_or(lead, |i| i + 1);
        let offset = start + colon + 1;
        HeaderValue::from_parsed(data.slice(offset + lead..offset + end))
    };
    Some(Header { name, value })
}

/// Parses a Content-Length value.
pub(crate) fn parse_content_length(v: &[u8]) -> Option<usize> {
    let v = trim_ws(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Parses a whole message.
pub(crate) fn parse_message(
    data: Bytes,
    limits: &ParseLimits,
    framing: Framing,
) -> Result<Message, ParseError> {
    if data.len() > limits.max_message_size {
        return Err(ParseError::new(ParseErrorKind::MessageTooLarge {
            limit: limits.max_message_size,
        }));
    }
    let buf: &[u8] = &data;
    let mut pos = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    if pos == buf.len() {
        return Err(ParseError::new(ParseErrorKind::Empty));
    }
    let (start_range, after_start) = match line_end(buf, pos) {
        Some(lf) => ((pos, content_end(buf, pos, lf)), lf + 1),
        None => ((pos, buf.len()), buf.len()),
    };
    let start_line = buf.get(start_range.0..start_range.1).unwrap_or_default();
    let looks_like_response = start_line
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"SIP/"));
    let start = parse_start_line(start_line);
    pos = after_start;

    let mut headers = Headers::with_capacity(16);
    let mut error: Option<ParseErrorKind> = None;
    let mut content_length: Option<usize> = None;
    let mut line_no = 1;
    let body_start = loop {
        line_no += 1;
        match logical_line(buf, pos) {
            Line::Eof => {
                if framing == Framing::Stream {
                    error.get_or_insert(ParseErrorKind::UnterminatedHeaders);
                }
                break buf.len();
            }
            Line::Blank { next } => break next,
            Line::Text {
                start,
                end,
                next,
                folded,
                bare_cr,
            } => {
                pos = next;
                if headers.len() >= limits.max_headers {
                    error = Some(ParseErrorKind::TooManyHeaders {
                        limit: limits.max_headers,
                    });
                    break buf.len();
                }
                let parsed = if bare_cr {
                    None
                } else {
                    parse_header(&data, start, end, folded)
                };
                let Some(header) = parsed else {
                    error.get_or_insert(ParseErrorKind::InvalidHeaderLine { line: line_no });
                    continue;
                };
                if header.name == HeaderName::ContentLength {
                    if content_length.is_some() {
                        error.get_or_insert(ParseErrorKind::MultipleContentLength);
                    }
                    match parse_content_length(header.value.as_bytes()) {
                        Some(n) => content_length = Some(n),
                        None => {
                            error.get_or_insert(ParseErrorKind::InvalidContentLength);
                        }
                    }
                }
                headers.push(header.name, header.value);
            }
        }
    };

    let (start, method) = match start {
        Ok(s) => {
            let method = match &s {
                StartLine::Request { method, .. } => Some(method.clone()),
                StartLine::Response { .. } => None,
            };
            (Some(s), method)
        }
        Err((kind, method)) => {
            // The start-line error comes first: it is what the sender got most wrong.
            error = Some(kind);
            (None, method)
        }
    };

    let available = buf.len().saturating_sub(body_start);
    let body = if error.is_some() {
        Bytes::new()
    } else {
        match (content_length, framing) {
            (Some(n), _) if n > available => {
                error = Some(ParseErrorKind::BodyTruncated {
                    expected: n,
                    available,
                });
                Bytes::new()
            }
            (Some(n), _) => data.slice(body_start..body_start + n),
            (None, Framing::Datagram) => data.slice(body_start..),
            (None, Framing::Stream) => Bytes::new(),
        }
    };

    match (error, start) {
        (
            None,
            Some(StartLine::Request {
                method,
                uri,
                version,
            }),
        ) => Ok(Message::Request(Request {
            method,
            uri,
            version,
            headers,
            body,
        })),
        (
            None,
            Some(StartLine::Response {
                version,
                status,
                reason,
            }),
        ) => Ok(Message::Response(Response {
            version,
            status,
            reason,
            headers,
            body,
        })),
        (error, _) => Err(ParseError {
            kind: error.unwrap_or(ParseErrorKind::InvalidStartLine),
            partial: Some(Box::new(Partial {
                looks_like_response,
                method,
                headers,
            })),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[u8]) -> Result<Message, ParseError> {
        parse_message(
            Bytes::copy_from_slice(s),
            &ParseLimits::default(),
            Framing::Datagram,
        )
    }

    const INVITE: &[u8] = b"INVITE sip:bob@biloxi.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK776asdhds\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.com>\r\n\
From: Alice <sip:alice@atlanta.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@pc33.atlanta.com>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\
\r\n\
v=0\n";

    #[test]
    fn parses_a_request() {
        let Message::Request(r) = parse(INVITE).unwrap() else {
            panic!("not a request")
        };
        assert_eq!(r.method, Method::Invite);
        assert_eq!(r.uri.to_string(), "sip:bob@biloxi.com");
        assert_eq!(r.version, Version::SIP_2_0);
        assert_eq!(r.headers.len(), 9);
        assert_eq!(
            r.headers.call_id().unwrap(),
            "a84b4c76e66710@pc33.atlanta.com"
        );
        assert_eq!(&r.body[..], b"v=0\n");
        assert_eq!(r.branch(), Some("z9hG4bK776asdhds"));
    }

    #[test]
    fn header_values_share_the_input_buffer() {
        let data = Bytes::copy_from_slice(INVITE);
        let range = data.as_ptr() as usize..data.as_ptr() as usize + data.len();
        let Message::Request(r) =
            parse_message(data.clone(), &ParseLimits::default(), Framing::Datagram).unwrap()
        else {
            panic!("not a request")
        };
        for h in &r.headers {
            assert!(
                range.contains(&(h.value.as_bytes().as_ptr() as usize)),
                "{:?} copied",
                h.name
            );
        }
        assert!(range.contains(&(r.body.as_ptr() as usize)));
    }

    #[test]
    fn parses_responses() {
        let Message::Response(r) =
            parse(b"SIP/2.0 180 Ringing\r\nContent-Length: 0\r\n\r\n").unwrap()
        else {
            panic!("not a response")
        };
        assert_eq!(r.status, 180);
        assert_eq!(r.reason, "Ringing");
        let Message::Response(e) = parse(b"SIP/2.0 100 \r\n\r\n").unwrap() else {
            panic!()
        };
        assert_eq!(e.reason, "");
        let Message::Response(n) = parse(b"SIP/2.0 100\r\n\r\n").unwrap() else {
            panic!()
        };
        assert_eq!(n.reason, "");
        for bad in [
            &b"SIP/2.0 4294967301 better not break the receiver\r\n\r\n"[..],
            b"SIP/2.0 099 Low\r\n\r\n",
            b"SIP/2.0 700 High\r\n\r\n",
            b"SIP/2.0 20 Short\r\n\r\n",
            b"SIP/2.0 2x0 Bad\r\n\r\n",
            b"SIP/2.0\r\n\r\n",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.is_response(), "{e}");
            assert!(e.response().is_none());
        }
    }

    #[test]
    fn folding_and_compact_names() {
        let msg = b"OPTIONS sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP h\r\n ;branch=z9hG4bKx\r\n\t;rport\r\nSubject:\r\n  hello\r\n   world\r\ni: id\r\nl: 0\r\n\r\n";
        let m = parse(msg).unwrap();
        let h = m.headers();
        assert_eq!(
            h.get(&HeaderName::Via).unwrap().as_bytes(),
            b"SIP/2.0/UDP h ;branch=z9hG4bKx\t;rport"
        );
        assert_eq!(
            h.get(&HeaderName::Subject).unwrap().as_bytes(),
            b"hello   world"
        );
        assert_eq!(h.top_via().unwrap().branch(), Some("z9hG4bKx"));
        assert_eq!(h.call_id().unwrap(), "id");
    }

    #[test]
    fn bare_lf_line_endings_are_tolerated() {
        let m = parse(b"BYE sip:a@b SIP/2.0\nCall-ID: x\nContent-Length: 2\n\nhi").unwrap();
        assert_eq!(m.body().as_ref(), b"hi");
        assert_eq!(m.headers().call_id().unwrap(), "x");
    }

    #[test]
    fn datagram_body_rules() {
        let base = b"MESSAGE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nContent-Length: 5\r\n\r\n";
        let mut extra = base.to_vec();
        extra.extend_from_slice(b"helloTRAILING");
        assert_eq!(parse(&extra).unwrap().body().as_ref(), b"hello");
        let mut short = base.to_vec();
        short.extend_from_slice(b"hel");
        let e = parse(&short).unwrap_err();
        assert_eq!(
            e.kind(),
            &ParseErrorKind::BodyTruncated {
                expected: 5,
                available: 3
            }
        );
        let resp = e.response().unwrap();
        assert_eq!(resp.status, 400);
        assert_eq!(resp.headers.top_via_branch(), Some("z9hG4bK1"));
        let no_cl =
            parse(b"MESSAGE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n\r\nrest of it").unwrap();
        assert_eq!(no_cl.body().as_ref(), b"rest of it");
        let no_blank = parse(b"OPTIONS sip:a@b SIP/2.0\r\nCall-ID: x\r\nl: 0").unwrap();
        assert_eq!(no_blank.headers().call_id().unwrap(), "x");
    }

    #[test]
    fn content_length_errors() {
        let e = parse(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: -999\r\n\r\n").unwrap_err();
        assert_eq!(e.kind(), &ParseErrorKind::InvalidContentLength);
        assert!(e.kind().is_framing_error());
        let e =
            parse(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 1\r\nl: 1\r\n\r\nx").unwrap_err();
        assert_eq!(e.kind(), &ParseErrorKind::MultipleContentLength);
    }

    #[test]
    fn request_line_errors() {
        for (bad, kind) in [
            (
                &b"INVITE sip:alan@jasomi.com\r\n\r\n"[..],
                ParseErrorKind::InvalidStartLine,
            ),
            (b"INVITE\r\n\r\n", ParseErrorKind::InvalidStartLine),
            (
                b"INVITE <sip:user@example.com> SIP/2.0\r\n\r\n",
                ParseErrorKind::InvalidRequestUri(UriError::InvalidCharacter),
            ),
            (
                b"INVITE sip:user@example.com; lr SIP/2.0\r\n\r\n",
                ParseErrorKind::InvalidRequestUri(UriError::InvalidCharacter),
            ),
            (
                b"INVITE  sip:user@example.com  SIP/2.0\r\n\r\n",
                ParseErrorKind::InvalidRequestUri(UriError::InvalidCharacter),
            ),
            (
                b"OPTIONS sip:a@b SIP/2.0  \r\n\r\n",
                ParseErrorKind::InvalidStartLine,
            ),
            (
                b"OPTIONS sip:a@b HTTP/1.1\r\n\r\n",
                ParseErrorKind::InvalidVersion,
            ),
            (
                b"OPTIONS sip:a@b SIP/2.\r\n\r\n",
                ParseErrorKind::InvalidVersion,
            ),
            (
                b"OPTI\"ONS sip:a@b SIP/2.0\r\n\r\n",
                ParseErrorKind::InvalidMethod,
            ),
            (
                b"OPTIONS sip:a@b SIP/2.0\rX\r\n\r\n",
                ParseErrorKind::InvalidStartLine,
            ),
        ] {
            assert_eq!(
                parse(bad).unwrap_err().kind(),
                &kind,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let Message::Request(r) = parse(b"OPTIONS sip:a@b SIP/7.0\r\n\r\n").unwrap() else {
            panic!()
        };
        assert_eq!(r.version, Version { major: 7, minor: 0 });
    }

    #[test]
    fn header_line_errors_keep_partial_headers() {
        let e = parse(b"INVITE <sip:a@b> SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKq\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n").unwrap_err();
        assert_eq!(e.method(), Some(&Method::Invite));
        assert_eq!(e.headers().unwrap().call_id().unwrap(), "c");
        let r = e.response().unwrap();
        assert_eq!(r.status, 400);
        assert_eq!(r.headers.cseq().unwrap().seq, 1);
        for bad in [
            &b"OPTIONS sip:a@b SIP/2.0\r\nFoobar roobar\r\n\r\n"[..],
            b"OPTIONS sip:a@b SIP/2.0\r\n leading: ws\r\n\r\n",
            b"OPTIONS sip:a@b SIP/2.0\r\nBad Name: x\r\n\r\n",
            b"OPTIONS sip:a@b SIP/2.0\r\n: empty name\r\n\r\n",
            b"OPTIONS sip:a@b SIP/2.0\r\nX: a\rb\r\n\r\n",
            b"OPTIONS sip:a@b SIP/2.0\r\nX: a\r\n b\rc\r\n\r\n",
        ] {
            assert!(matches!(
                parse(bad).unwrap_err().kind(),
                ParseErrorKind::InvalidHeaderLine { line: 2 }
            ));
        }
        let ack = parse(b"ACK sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h\r\nX\r\n\r\n").unwrap_err();
        assert!(ack.response().is_none());
    }

    #[test]
    fn limits() {
        let limits = ParseLimits {
            max_message_size: 40,
            max_headers: 2,
        };
        let big = parse_message(
            Bytes::from_static(b"OPTIONS sip:a@b SIP/2.0\r\nSubject: 0123456789\r\n\r\n"),
            &limits,
            Framing::Datagram,
        )
        .unwrap_err();
        assert_eq!(big.kind(), &ParseErrorKind::MessageTooLarge { limit: 40 });
        assert_eq!(big.status(), 513);
        let limits = ParseLimits {
            max_message_size: 1000,
            max_headers: 2,
        };
        let many = parse_message(
            Bytes::from_static(b"OPTIONS sip:a@b SIP/2.0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n"),
            &limits,
            Framing::Datagram,
        )
        .unwrap_err();
        assert_eq!(many.kind(), &ParseErrorKind::TooManyHeaders { limit: 2 });
        assert_eq!(many.headers().unwrap().len(), 2);
    }

    #[test]
    fn empty_and_keepalive_input() {
        assert_eq!(parse(b"").unwrap_err().kind(), &ParseErrorKind::Empty);
        assert_eq!(
            parse(b"\r\n\r\n").unwrap_err().kind(),
            &ParseErrorKind::Empty
        );
        assert!(parse(b"\r\n\r\nOPTIONS sip:a@b SIP/2.0\r\n\r\n").is_ok());
    }
}
