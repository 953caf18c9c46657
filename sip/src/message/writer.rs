//! Serialization of a message: start line, header fields (Content-Length always written, and
//! written once, from the body's length) and body. It parses nothing (the parser does).

use bytes::BytesMut;

use super::header::{HeaderName, Headers};

/// Appends the message to `out`: start line, headers in order (standard names in their long
/// form), a Content-Length equal to the body length (in place of the first Content-Length header,
/// others dropped, or appended last), the blank line and the body.
pub(crate) fn write_message(
    start_line: impl FnOnce(&mut BytesMut),
    headers: &Headers,
    body: &[u8],
    out: &mut BytesMut,
) {
    let estimate = 64
        + headers
            .iter()
            .map(|h| h.name.as_str().len() + h.value.len() + 4)
            .sum::<usize>()
        + body.len();
    out.reserve(estimate);
    start_line(out);
    out.extend_from_slice(b"\r\n");
    let mut length_written = false;
    for h in headers {
        if h.name == HeaderName::ContentLength {
            if !length_written {
                write_content_length(out, body.len());
                length_written = true;
            }
            continue;
        }
        out.extend_from_slice(h.name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !length_written {
        write_content_length(out, body.len());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

fn write_content_length(out: &mut BytesMut, len: usize) {
    use std::fmt::Write as _;
    // Writing into a BytesMut cannot fail: it grows as needed.
    let _ = write!(out, "Content-Length: {len}\r\n");
}
