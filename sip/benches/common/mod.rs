//! What the benchmarks of the endpoint share: a simulated peer that writes its messages the way
//! SIPp's built-in `uac` and `uas` scenarios do (counter-derived Call-IDs, branches and tags, the
//! header lines of our messages copied as SIPp's `[last_Name:]` keywords copy them), and the SDP
//! bodies of both sides.
#![allow(dead_code)]

use std::io::Write;

use bytes::Bytes;

/// The peer's SDP offer or answer.
pub const PEER_SDP: &str = "v=0\r\n\
o=user1 53655765 2353687637 IN IP4 127.0.0.1\r\n\
s=-\r\n\
c=IN IP4 127.0.0.1\r\n\
t=0 0\r\n\
m=audio 6000 RTP/AVP 0\r\n\
a=rtpmap:0 PCMU/8000\r\n";

/// Our SDP offer or answer.
pub const OUR_SDP: &str = "v=0\r\n\
o=thalamus 1 1 IN IP4 127.0.0.1\r\n\
s=-\r\n\
c=IN IP4 127.0.0.1\r\n\
t=0 0\r\n\
m=audio 20000 RTP/AVP 0\r\n\
a=rtpmap:0 PCMU/8000\r\n";

/// The value of header `name` in a serialized message (the text after `Name: ` up to the line
/// end), as SIPp's `[last_Name:]` keywords find it.
pub fn header_line<'a>(message: &'a [u8], name: &str) -> &'a [u8] {
    let mut needle = [0u8; 32];
    let len = name.len() + 4;
    needle[..2].copy_from_slice(b"\r\n");
    needle[2..2 + name.len()].copy_from_slice(name.as_bytes());
    needle[2 + name.len()..len].copy_from_slice(b": ");
    let start = memchr::memmem::find(message, &needle[..len]).expect("header present") + len;
    let end = memchr::memchr(b'\r', &message[start..]).expect("line end") + start;
    &message[start..end]
}

/// Every Via value of a serialized message, in order.
pub fn via_lines(message: &[u8]) -> impl Iterator<Item = &[u8]> + '_ {
    memchr::memmem::find_iter(message, b"\r\nVia: ").map(move |at| {
        let start = at + 7;
        let end = memchr::memchr(b'\r', &message[start..]).expect("line end") + start;
        &message[start..end]
    })
}

/// The simulated peer: writes its messages into a reused buffer, then copies them into the
/// `Bytes` a socket read would produce.
pub struct SippPeer {
    transport: &'static str,
    buf: Vec<u8>,
}

impl SippPeer {
    /// A peer on `transport` (`UDP` or `TCP`, as its Via spells it).
    pub fn new(transport: &'static str) -> Self {
        Self {
            transport,
            buf: Vec::with_capacity(2048),
        }
    }

    fn take(&mut self) -> Bytes {
        Bytes::copy_from_slice(&self.buf)
    }

    /// SIPp `uac` INVITE number `call`.
    pub fn invite(&mut self, call: u64) -> Bytes {
        self.buf.clear();
        write!(
            self.buf,
            "INVITE sip:service@127.0.0.1:5080 SIP/2.0\r\n\
Via: SIP/2.0/{t} 127.0.0.1:5061;branch=z9hG4bK-3719-{call}-0\r\n\
From: sipp <sip:sipp@127.0.0.1:5061>;tag=3719SIPpTag00{call}\r\n\
To: service <sip:service@127.0.0.1:5080>\r\n\
Call-ID: {call}-3719@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: sip:sipp@127.0.0.1:5061\r\n\
Max-Forwards: 70\r\n\
Subject: Performance Test\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {len}\r\n\
\r\n\
{PEER_SDP}",
            t = self.transport,
            len = PEER_SDP.len()
        )
        .unwrap();
        self.take()
    }

    /// SIPp `uac` ACK (CSeq 1) or BYE (CSeq 2) of call `call`, with the To header of our 200
    /// (`[last_To:]`) and our Contact as Request-URI.
    pub fn in_dialog(&mut self, call: u64, method: &str, cseq: u32, to: &[u8]) -> Bytes {
        self.buf.clear();
        write!(
            self.buf,
            "{method} sip:service@127.0.0.1:5080 SIP/2.0\r\n\
Via: SIP/2.0/{t} 127.0.0.1:5061;branch=z9hG4bK-3719-{call}-{cseq}\r\n\
From: sipp <sip:sipp@127.0.0.1:5061>;tag=3719SIPpTag00{call}\r\n\
To: ",
            t = self.transport
        )
        .unwrap();
        self.buf.extend_from_slice(to);
        write!(
            self.buf,
            "\r\n\
Call-ID: {call}-3719@127.0.0.1\r\n\
CSeq: {cseq} {method}\r\n\
Contact: sip:sipp@127.0.0.1:5061\r\n\
Max-Forwards: 70\r\n\
Subject: Performance Test\r\n\
Content-Length: 0\r\n\
\r\n"
        )
        .unwrap();
        self.take()
    }

    /// SIPp `uas` response to `request` (serialized): Via, From, To (plus the peer's tag when
    /// the request has none), Call-ID and CSeq copied; Contact and SDP on a 2xx to INVITE.
    pub fn response(&mut self, request: &[u8], status_line: &str, call: u64, sdp: bool) -> Bytes {
        self.buf.clear();
        write!(self.buf, "SIP/2.0 {status_line}\r\n").unwrap();
        for via in via_lines(request) {
            self.buf.extend_from_slice(b"Via: ");
            self.buf.extend_from_slice(via);
            self.buf.extend_from_slice(b"\r\n");
        }
        self.buf.extend_from_slice(b"From: ");
        self.buf.extend_from_slice(header_line(request, "From"));
        self.buf.extend_from_slice(b"\r\nTo: ");
        let to = header_line(request, "To");
        self.buf.extend_from_slice(to);
        if memchr::memmem::find(to, b";tag=").is_none() {
            write!(self.buf, ";tag=4211SIPpTag01{call}").unwrap();
        }
        self.buf.extend_from_slice(b"\r\nCall-ID: ");
        self.buf.extend_from_slice(header_line(request, "Call-ID"));
        self.buf.extend_from_slice(b"\r\nCSeq: ");
        self.buf.extend_from_slice(header_line(request, "CSeq"));
        self.buf.extend_from_slice(b"\r\n");
        if sdp {
            write!(
                self.buf,
                "Contact: <sip:127.0.0.1:5070;transport=UDP>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\
\r\n\
{PEER_SDP}",
                PEER_SDP.len()
            )
            .unwrap();
        } else {
            self.buf.extend_from_slice(
                b"Contact: <sip:127.0.0.1:5070;transport=UDP>\r\nContent-Length: 0\r\n\r\n",
            );
        }
        self.take()
    }
}
