//! Message framing on stream transports (TCP, TLS; RFC 3261 section 18.3): a message ends
//! Content-Length bytes after the blank line that ends its header section. [`check`] inspects a
//! buffer without consuming it (like mini-redis' `Frame::check`) and tells how long the next item
//! is, or that more bytes are needed; [`StreamFramer`] owns a buffer and yields parsed messages.
//!
//! CRLFs between messages are keep-alives (RFC 5626 section 3.5.1: a double CRLF is a ping to
//! answer with a single CRLF pong). A missing Content-Length on a stream is taken as 0. This
//! module does no I/O and does not decide when to close a connection; it reports framing errors
//! after which the connection cannot be resynchronized.

use bytes::BytesMut;
use memchr::memchr;

use super::parser::{self, parse_content_length, Framing, ParseError, ParseErrorKind, ParseLimits};
use super::syntax::{is_ws, trim_ws};
use super::Message;

/// What [`check`] found at the start of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFrame {
    /// `len` bytes of CR/LF between messages. `ping` is true for a double CRLF (RFC 5626 ping,
    /// answer with a single CRLF); a single CRLF is a pong.
    KeepAlive {
        /// Bytes to skip.
        len: usize,
        /// True for a ping.
        ping: bool,
    },
    /// A complete message of `len` bytes.
    Message {
        /// Bytes of the message, body included.
        len: usize,
    },
}

/// Why [`check`] could not return a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// More bytes are needed.
    #[error("incomplete message")]
    Incomplete,
    /// The stream cannot be framed (bad or duplicate Content-Length, too large, too many
    /// headers): the connection should be closed.
    #[error("framing error: {0}")]
    Invalid(ParseError),
}

fn framing_error(kind: ParseErrorKind) -> FramingError {
    FramingError::Invalid(ParseError::new(kind))
}

fn is_content_length_name(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l")
}

/// Inspects `buf` and returns the length of the next item without consuming anything.
pub fn check(buf: &[u8], limits: &ParseLimits) -> Result<StreamFrame, FramingError> {
    let leading = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    if leading > 0 {
        // A trailing CR may be the first half of a CRLF still in flight.
        let len = if leading == buf.len() && buf.last() == Some(&b'\r') {
            leading - 1
        } else {
            leading
        };
        if len == 0 {
            return Err(FramingError::Incomplete);
        }
        let lf_count = buf
            .get(..len)
            .map_or(0, |s| s.iter().filter(|&&b| b == b'\n').count());
        return Ok(StreamFrame::KeepAlive {
            len,
            ping: lf_count >= 2,
        });
    }
    let scan_len = buf.len().min(limits.max_message_size);
    let scan = buf.get(..scan_len).unwrap_or_default();
    // Skip the start line.
    let Some(first_lf) = memchr(b'\n', scan) else {
        return too_large_or_incomplete(buf, limits);
    };
    let mut pos = first_lf + 1;
    let mut headers = 0usize;
    let mut content_length: Option<usize> = None;
    let mut seen_length = false;
    let head_end = loop {
        let Some(rel) = scan.get(pos..).and_then(|s| memchr(b'\n', s)) else {
            return too_large_or_incomplete(buf, limits);
        };
        let lf = pos + rel;
        let line = scan.get(pos..lf).unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break lf + 1;
        }
        let continuation = line.first().is_some_and(|&b| is_ws(b));
        if !continuation {
            headers += 1;
            if headers > limits.max_headers {
                return Err(framing_error(ParseErrorKind::TooManyHeaders {
                    limit: limits.max_headers,
                }));
            }
            if let Some(colon) = memchr(b':', line) {
                let name = trim_ws(line.get(..colon).unwrap_or_default());
                if is_content_length_name(name) {
                    if seen_length {
                        return Err(framing_error(ParseErrorKind::MultipleContentLength));
                    }
                    seen_length = true;
                    // The value may continue on folded lines: gather them.
                    let mut value: Vec<u8> = line.get(colon + 1..).unwrap_or_default().to_vec();
                    let mut next = lf + 1;
                    while scan.get(next).is_some_and(|&b| is_ws(b)) {
                        let Some(r) = scan.get(next..).and_then(|s| memchr(b'\n', s)) else {
                            return too_large_or_incomplete(buf, limits);
                        };
                        let cont = scan.get(next..next + r).unwrap_or_default();
                        value.push(b' ');
                        value.extend_from_slice(cont.strip_suffix(b"\r").unwrap_or(cont));
                        next += r + 1;
                    }
                    content_length = Some(
                        parse_content_length(&value)
                            .ok_or_else(|| framing_error(ParseErrorKind::InvalidContentLength))?,
                    );
                }
            }
        }
        pos = lf + 1;
    };
    let total = head_end.saturating_add(content_length.unwrap_or(0));
    if total > limits.max_message_size {
        return Err(framing_error(ParseErrorKind::MessageTooLarge {
            limit: limits.max_message_size,
        }));
    }
    if buf.len() < total {
        return Err(FramingError::Incomplete);
    }
    Ok(StreamFrame::Message { len: total })
}

fn too_large_or_incomplete(buf: &[u8], limits: &ParseLimits) -> Result<StreamFrame, FramingError> {
    if buf.len() >= limits.max_message_size {
        Err(framing_error(ParseErrorKind::MessageTooLarge {
            limit: limits.max_message_size,
        }))
    } else {
        Err(FramingError::Incomplete)
    }
}

/// One item read from a stream.
// Messages are by far the most common item: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamItem {
    /// A message.
    Message(Message),
    /// A double-CRLF keep-alive ping: answer with a single CRLF.
    KeepAlivePing,
    /// A single-CRLF keep-alive pong.
    KeepAlivePong,
}

/// Why [`StreamFramer::next_item`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The stream cannot be framed any more: close the connection. The framer keeps returning
    /// this error.
    #[error("framing error: {0}")]
    Framing(ParseError),
    /// One framed message did not parse. It has been consumed: answer it (see
    /// [`ParseError::response`]) and keep reading.
    #[error("malformed message: {0}")]
    Message(ParseError),
}

/// Buffers bytes read from a stream connection and yields complete messages (zero-copy: each
/// message's values share one frozen chunk of the buffer).
#[derive(Debug)]
pub struct StreamFramer {
    buf: BytesMut,
    limits: ParseLimits,
    failed: Option<ParseError>,
}

impl StreamFramer {
    /// A framer with the given limits.
    pub fn new(limits: ParseLimits) -> Self {
        Self {
            buf: BytesMut::with_capacity(4096),
            limits,
            failed: None,
        }
    }

    /// Appends bytes read from the connection.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The buffer, for reading into it directly (`read_buf`).
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next item, or `Ok(None)` when more bytes are needed.
    pub fn next_item(&mut self) -> Result<Option<StreamItem>, StreamError> {
        if let Some(e) = &self.failed {
            return Err(StreamError::Framing(e.clone()));
        }
        match check(&self.buf, &self.limits) {
            Err(FramingError::Incomplete) => Ok(None),
            Err(FramingError::Invalid(e)) => {
                self.failed = Some(e.clone());
                Err(StreamError::Framing(e))
            }
            Ok(StreamFrame::KeepAlive { len, ping }) => {
                let _ = self.buf.split_to(len);
                Ok(Some(if ping {
                    StreamItem::KeepAlivePing
                } else {
                    StreamItem::KeepAlivePong
                }))
            }
            Ok(StreamFrame::Message { len }) => {
                let frame = self.buf.split_to(len).freeze();
                parser::parse_message(frame, &self.limits, Framing::Stream)
                    .map(|m| Some(StreamItem::Message(m)))
                    .map_err(StreamError::Message)
            }
        }
    }
}

impl Default for StreamFramer {
    fn default() -> Self {
        Self::new(ParseLimits::DEFAULT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] =
        b"MESSAGE sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nl: 5\r\n\r\nhello";

    #[test]
    fn complete_and_incomplete() {
        let limits = ParseLimits::default();
        assert_eq!(
            check(MSG, &limits),
            Ok(StreamFrame::Message { len: MSG.len() })
        );
        for cut in 0..MSG.len() {
            assert_eq!(
                check(&MSG[..cut], &limits),
                Err(FramingError::Incomplete),
                "cut at {cut}"
            );
        }
        let mut two = MSG.to_vec();
        two.extend_from_slice(MSG);
        assert_eq!(
            check(&two, &limits),
            Ok(StreamFrame::Message { len: MSG.len() })
        );
    }

    #[test]
    fn keepalives() {
        let limits = ParseLimits::default();
        assert_eq!(
            check(b"\r\n\r\n", &limits),
            Ok(StreamFrame::KeepAlive { len: 4, ping: true })
        );
        assert_eq!(
            check(b"\r\nINVITE", &limits),
            Ok(StreamFrame::KeepAlive {
                len: 2,
                ping: false
            })
        );
        assert_eq!(check(b"\r", &limits), Err(FramingError::Incomplete));
        assert_eq!(
            check(b"\r\n\r", &limits),
            Ok(StreamFrame::KeepAlive {
                len: 2,
                ping: false
            })
        );
        assert_eq!(check(b"", &limits), Err(FramingError::Incomplete));
    }

    #[test]
    fn framing_errors() {
        let limits = ParseLimits::default();
        let bad = |m: &[u8]| match check(m, &limits) {
            Err(FramingError::Invalid(e)) => e.kind().clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            bad(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: -999\r\n\r\n"),
            ParseErrorKind::InvalidContentLength
        );
        assert_eq!(
            bad(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 13\r\nContent-Length: 5\r\n\r\n"),
            ParseErrorKind::MultipleContentLength
        );
        let small = ParseLimits {
            max_message_size: 64,
            max_headers: 2,
        };
        let huge_body = b"OPTIONS sip:a@b SIP/2.0\r\nl: 1000\r\n\r\n";
        assert!(matches!(
            check(huge_body, &small),
            Err(FramingError::Invalid(_))
        ));
        let endless = vec![b'a'; 100];
        assert!(matches!(
            check(&endless, &small),
            Err(FramingError::Invalid(_))
        ));
        let many = b"OPTIONS sip:a@b SIP/2.0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert!(matches!(check(many, &small), Err(FramingError::Invalid(_))));
    }

    #[test]
    fn folded_content_length() {
        let m = b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length:\r\n 3\r\n\r\nabc";
        assert_eq!(
            check(m, &ParseLimits::default()),
            Ok(StreamFrame::Message { len: m.len() })
        );
    }

    #[test]
    fn framer_yields_messages_across_reads() {
        let mut f = StreamFramer::default();
        let mut stream = b"\r\n\r\n".to_vec();
        stream.extend_from_slice(MSG);
        stream.extend_from_slice(b"\r\n");
        stream.extend_from_slice(MSG);
        let mut items = Vec::new();
        for chunk in stream.chunks(7) {
            f.push(chunk);
            while let Some(item) = f.next_item().unwrap() {
                items.push(item);
            }
        }
        assert_eq!(items.len(), 4);
        assert_eq!(items[0], StreamItem::KeepAlivePing);
        assert!(matches!(&items[1], StreamItem::Message(m) if m.body().as_ref() == b"hello"));
        assert_eq!(items[2], StreamItem::KeepAlivePong);
        assert!(matches!(items[3], StreamItem::Message(_)));
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn framer_reports_message_and_framing_errors() {
        let mut f = StreamFramer::default();
        f.push(b"OPTIONS <sip:a@b> SIP/2.0\r\nVia: SIP/2.0/TCP h\r\nl: 0\r\n\r\n");
        f.push(MSG);
        assert!(matches!(f.next_item(), Err(StreamError::Message(_))));
        assert!(matches!(f.next_item(), Ok(Some(StreamItem::Message(_)))));
        f.push(b"OPTIONS sip:a@b SIP/2.0\r\nl: x\r\n\r\n");
        assert!(matches!(f.next_item(), Err(StreamError::Framing(_))));
        f.push(MSG);
        assert!(matches!(f.next_item(), Err(StreamError::Framing(_))));
    }
}
