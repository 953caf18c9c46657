//! The fast paths: UDP messages relayed by editing their bytes, without parsing the message
//! whole and writing it again.
//!
//! A stateless proxy does one thing to a response (RFC 3261 section 16.7 item 3, 18.2.2): it
//! takes its own Via off the top and sends the rest to the next Via. For the responses that
//! make up nearly all of the traffic (our Via first on the first Via line, every line plain
//! `Name: value` ended by CRLF, a Content-Length that matches the body),
//! [`BalancerCore::route_response_datagram`] finds the Via lines and the Call-ID in one pass over
//! the header lines, parses only the next Via, and cuts ours out of the datagram: its whole line,
//! or its value and comma when the sender wrote the Vias on one line (as SIPp does).
//!
//! To a request it does more (Route, Via, Record-Route, Max-Forwards), decided by the same code
//! as for a parsed request: [`BalancerCore::route_request_datagram`] parses only the fields that
//! code reads ([`ROUTED`]) into a request, stamps its top Via as the transport would, routes it,
//! and writes the datagram again with those fields as the router left them and every other line
//! as it came.
//!
//! Both decide as [`BalancerCore::route`] does on the parsed message (the router's tests check
//! both ways on every message they route, and on random edits of real ones). Everything of an
//! unusual shape returns `None`, and the caller parses the message and routes it the full way:
//! folded or malformed lines, quotes or angle brackets in the Via values, a response whose top
//! Via is not written as we write ours or that has no next Via, a Content-Length absent or not
//! the body's, a version other than SIP/2.0, more than [`MAX_FAST_LINES`] header lines,
//! anything over TCP or TLS. They keep no state.

use bytes::Bytes;
use memchr::memchr;
use thalamus_sip::message::{HeaderName, HeaderValue, Headers, Method, Request, Uri, Version, Via};
use thalamus_sip::transport::{Peer, PeerTransport};

use super::{dialog_key, via_destination, BalancerCore, Decision, Outgoing};

/// Most header lines a message may have to take a fast path (the transport's own limit is
/// higher; longer messages go the full way, where that limit is applied).
pub const MAX_FAST_LINES: usize = 64;

/// What the fast path read of a response.
#[derive(Debug)]
pub struct FastResponse {
    /// The decision, as [`BalancerCore::route`] takes it.
    pub decision: Decision,
    /// [`dialog_key`](super::dialog_key) of the Call-ID, when it is one word (as
    /// `Headers::call_id` accepts it).
    pub dialog: Option<u64>,
}

/// A header line: where its name and its value (trimmed) are, and where the line ends (after
/// its CRLF).
#[derive(Debug, Clone, Copy)]
struct Line {
    start: usize,
    name_end: usize,
    value: (usize, usize),
    end: usize,
}

fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// RFC 3261 `token` characters.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

/// The header lines of `data` from `pos`, and where the body starts; `None` when a line is not
/// a plain `Name: value` line ended by CRLF (folding, a bare CR or LF, a bad name), when the
/// header section does not end, or when there are more than [`MAX_FAST_LINES`].
fn header_lines(data: &[u8], mut pos: usize) -> Option<(Vec<Line>, usize)> {
    let mut lines = Vec::with_capacity(16);
    loop {
        let lf = pos + memchr(b'\n', data.get(pos..)?)?;
        if lf == pos || data.get(lf - 1) != Some(&b'\r') {
            return None;
        }
        let content = data.get(pos..lf - 1)?;
        if content.is_empty() {
            return Some((lines, lf + 1));
        }
        if lines.len() == MAX_FAST_LINES || memchr(b'\r', content).is_some() {
            return None;
        }
        let colon = memchr(b':', content)?;
        let name = content.get(..colon)?;
        if name.is_empty() || !name.iter().all(|&b| is_token_char(b)) {
            return None;
        }
        let value = content.get(colon + 1..)?;
        let lead = value.iter().position(|&b| !is_ws(b)).unwrap_or(value.len());
        let trail = value
            .iter()
            .rposition(|&b| !is_ws(b))
            .map_or(lead, |i| i + 1);
        let at = pos + colon + 1;
        lines.push(Line {
            start: pos,
            name_end: pos + colon,
            value: (at + lead, at + trail),
            end: lf + 1,
        });
        pos = lf + 1;
    }
}

/// A list whose commas all separate values: no quoted string or `<...>` that would hide one
/// (the parser's list splitting skips commas inside both).
fn plain_list(text: &str) -> bool {
    !text.contains(['"', '<'])
}

/// Whether a line's name is `header`, in its long or compact form, any case.
fn named(data: &[u8], line: &Line, header: &HeaderName) -> bool {
    let name = data.get(line.start..line.name_end).unwrap_or_default();
    name.eq_ignore_ascii_case(header.as_str().as_bytes())
        || (name.len() == 1
            && header
                .compact_form()
                .is_some_and(|c| name[0].eq_ignore_ascii_case(&(c as u8))))
}

/// The header lines of a message whose start line ends at `start_end` (its LF), and where its
/// body starts: `None` unless [`header_lines`] reads them all, the head is UTF-8 (all the parser
/// would read as text) and one Content-Length gives the body's length (the full path writes it
/// from the body: the same bytes go out only when the message already has it).
fn framed_head(data: &[u8], start_end: usize) -> Option<(Vec<Line>, usize)> {
    let (lines, body_start) = header_lines(data, start_end + 1)?;
    std::str::from_utf8(data.get(..body_start)?).ok()?;
    let mut lengths = lines
        .iter()
        .filter(|l| named(data, l, &HeaderName::ContentLength));
    let length = lengths.next()?;
    if lengths.next().is_some()
        || content_length(data.get(length.value.0..length.value.1)?)? != data.len() - body_start
    {
        return None;
    }
    Some((lines, body_start))
}

/// A Content-Length value: digits only, as the parser takes it.
fn content_length(v: &[u8]) -> Option<usize> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

impl BalancerCore {
    /// Routes a UDP response from its bytes, when it is of the common shape the module
    /// comment describes; `None` means "parse it and call [`BalancerCore::route`]".
    pub fn route_response_datagram(&self, data: &[u8], source: Peer) -> Option<FastResponse> {
        if source.transport != PeerTransport::Udp {
            return None;
        }
        let rest = data.strip_prefix(b"SIP/2.0 ")?;
        let code = rest.get(..3)?;
        if !code.iter().all(u8::is_ascii_digit) || !matches!(rest.get(3), Some(b' ' | b'\r')) {
            return None;
        }
        let status = code
            .iter()
            .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
        if !(100..=699).contains(&status) {
            return None;
        }
        let start_end = memchr(b'\n', data)?;
        let start_line = data.get(..start_end)?;
        if start_line.last() != Some(&b'\r') || memchr(b'\r', start_line)? != start_end - 1 {
            return None;
        }
        let (lines, _) = framed_head(data, start_end)?;
        let mut vias = lines.iter().filter(|l| named(data, l, &HeaderName::Via));
        let top = vias.next()?;
        let mut call_ids = lines.iter().filter(|l| named(data, l, &HeaderName::CallId));
        let call_id = call_ids.next().map(|l| l.value);
        if call_ids.next().is_some() {
            return None;
        }
        let text = |r: (usize, usize)| data.get(r.0..r.1).and_then(|b| std::str::from_utf8(b).ok());
        // Quotes and angle brackets may hide a comma: such Via lists go the full way.
        let top_text = text(top.value).filter(|t| plain_list(t))?;
        // What to cut (our Via: the whole line, or the first value of a list and its comma)
        // and the next Via (the next value on the line, or the next Via line's first).
        let (ours, cut, next_list) = match top_text.find(',') {
            Some(comma) => {
                let rest = top_text.get(comma + 1..)?;
                let skip = rest.len() - rest.trim_start().len();
                let cut = (top.value.0, top.value.0 + comma + 1 + skip);
                (top_text.get(..comma)?.trim_end(), cut, rest.trim_start())
            }
            None => {
                let next = vias.next()?;
                let list = text(next.value).filter(|t| plain_list(t))?;
                (top_text, (top.start, top.end), list)
            }
        };
        if !self.is_our_via_text(ours) {
            return None;
        }
        let next_first = next_list.split(',').next()?.trim();
        let via = Via::parse(next_first).ok()?;
        let (to, transport) = via_destination(&via)?;

        let mut out = Vec::with_capacity(data.len());
        out.extend_from_slice(data.get(..cut.0)?);
        out.extend_from_slice(data.get(cut.1..)?);
        let dialog = call_id
            .and_then(|r| data.get(r.0..r.1))
            .filter(|v| !v.is_empty() && v.iter().all(|&b| b > 0x20 && b != 0x7f))
            .map(dialog_key);
        Some(FastResponse {
            decision: Decision::Response {
                from_node: self.membership.node_at(source.addr).map(|n| n.id.clone()),
                status,
                out: Outgoing {
                    to,
                    transport,
                    bytes: Bytes::from(out),
                },
            },
            dialog,
        })
    }
}

/// How many fields [`ROUTED`] names.
const ROUTED_COUNT: usize = 8;

/// The header fields the request router reads or writes. On the request fast path only these
/// are parsed; every other line goes out as it came.
const ROUTED: [HeaderName; ROUTED_COUNT] = [
    HeaderName::Via,
    HeaderName::Route,
    HeaderName::RecordRoute,
    HeaderName::To,
    HeaderName::From,
    HeaderName::CallId,
    HeaderName::CSeq,
    HeaderName::MaxForwards,
];

/// Which of [`ROUTED`] a line's name is.
fn routed(data: &[u8], line: &Line) -> Option<usize> {
    ROUTED.iter().position(|h| named(data, line, h))
}

/// What the request fast path read of a request.
#[derive(Debug)]
pub struct FastRequest {
    /// The decision, as [`BalancerCore::route`] takes it on the request as the transport
    /// delivers it (its top Via stamped).
    pub decision: Decision,
    /// [`dialog_key`](super::dialog_key) of the Call-ID.
    pub dialog: Option<u64>,
}

impl BalancerCore {
    /// Routes a UDP request from its bytes: only the eight fields the router uses are
    /// parsed, into a request the router routes as it would the whole one, and the request
    /// goes out as its bytes with those fields written again. A stateless answer is the full
    /// path's too: it copies only fields among those eight (RFC 3261 section 8.2.6.2).
    /// `None` (parse it and call [`BalancerCore::route`]) for requests of an unusual shape (as
    /// for responses).
    pub fn route_request_datagram(&self, data: &[u8], source: Peer) -> Option<FastRequest> {
        if source.transport != PeerTransport::Udp {
            return None;
        }
        let start_end = memchr(b'\n', data)?;
        let start_line = data.get(..start_end.checked_sub(1)?)?;
        if data.get(start_end - 1) != Some(&b'\r') || memchr(b'\r', start_line).is_some() {
            return None;
        }
        let sp1 = memchr(b' ', start_line)?;
        let sp2 = memchr::memrchr(b' ', start_line)?;
        if sp2 <= sp1 + 1 || start_line.get(sp2 + 1..)? != b"SIP/2.0" {
            return None;
        }
        let method = Method::from_bytes(start_line.get(..sp1)?).ok()?;
        let uri_text = std::str::from_utf8(start_line.get(sp1 + 1..sp2)?).ok()?;
        let uri = Uri::parse(uri_text).ok()?;
        let (lines, body_start) = framed_head(data, start_end)?;

        let shared = Bytes::copy_from_slice(data);
        let mut headers = Headers::with_capacity(12);
        let mut kinds = Vec::with_capacity(lines.len());
        for line in &lines {
            let kind = routed(data, line);
            if let Some(i) = kind {
                let value = HeaderValue::from_bytes(shared.slice(line.value.0..line.value.1));
                headers.push(ROUTED.get(i)?.clone(), value);
            }
            kinds.push(kind);
        }
        let mut req = Request {
            method,
            uri: uri.clone(),
            version: Version::SIP_2_0,
            headers,
            body: Bytes::new(),
        };
        // As the transport does before delivering (a Via it cannot read is left for the router).
        let _ = thalamus_sip::transaction::stamp_received(&mut req, source.addr);
        let dialog = req.headers.call_id().ok().map(|c| dialog_key(c.as_bytes()));
        let write = |routed_req: &Request| {
            merged(
                data,
                &lines,
                &kinds,
                body_start,
                routed_req,
                routed_req.uri != uri,
            )
        };
        Some(FastRequest {
            decision: self.route_request_with(req, source, &write),
            dialog,
        })
    }
}

/// The request's bytes again: its request line (written anew only when the router changed
/// the Request-URI), its lines with the [`ROUTED`] fields as the router left them (each name's
/// fields where its first line was; names it added first), the others as they came, and the
/// body.
fn merged(
    data: &[u8],
    lines: &[Line],
    kinds: &[Option<usize>],
    body_start: usize,
    req: &Request,
    uri_changed: bool,
) -> Bytes {
    use std::io::Write as _;
    let mut out = Vec::with_capacity(data.len() + 256);
    let first = lines.first().map_or(body_start - 2, |l| l.start);
    if uri_changed {
        // Writing into a Vec cannot fail.
        let _ = write!(out, "{} {} SIP/2.0\r\n", req.method, req.uri);
    } else {
        out.extend_from_slice(data.get(..first).unwrap_or_default());
    }
    let fields = |out: &mut Vec<u8>, i: usize| {
        if let Some(name) = ROUTED.get(i) {
            for value in req.headers.get_all(name) {
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
    };
    let mut written = [false; ROUTED_COUNT];
    for (i, done) in written.iter_mut().enumerate() {
        if !kinds.contains(&Some(i)) {
            fields(&mut out, i);
            *done = true;
        }
    }
    for (line, kind) in lines.iter().zip(kinds) {
        match kind {
            Some(i) => {
                if let Some(done) = written.get_mut(*i) {
                    if !*done {
                        fields(&mut out, *i);
                        *done = true;
                    }
                }
            }
            None => out.extend_from_slice(data.get(line.start..line.end).unwrap_or_default()),
        }
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data.get(body_start..).unwrap_or_default());
    Bytes::from(out)
}
