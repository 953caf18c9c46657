//! Criterion benchmarks of the SIP message parser and serializer on three typical messages: an
//! INVITE with an SDP offer, a 200 OK with an SDP answer, and a BYE.
//!
//! Measured per message: datagram parsing, parsing plus the lookups a transaction and dialog
//! layer make (branch, CSeq, Call-ID, tags), stream framing (`check`), and serialization into a
//! reused buffer. A floor for parsing, `memchr scan`: finding every line end and the colon of
//! every line with memchr over the same bytes, nothing else (no names, no values, no copies).

// Benchmark setup panics on a broken fixture, which is the right outcome.
#![allow(clippy::expect_used)]

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use thalamus_sip::message::{check, Message, ParseLimits};

const INVITE: &str = "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;rport\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@pc33.atlanta.example.com:5060;transport=udp>\r\n\
Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, PRACK, INFO, MESSAGE, NOTIFY, REFER\r\n\
Supported: replaces, timer, 100rel\r\n\
User-Agent: Thalamus-Bench/1.0\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 253\r\n\
\r\n\
v=0\r\n\
o=alice 2890844526 2890844526 IN IP4 pc33.atlanta.example.com\r\n\
s=-\r\n\
c=IN IP4 192.0.2.101\r\n\
t=0 0\r\n\
m=audio 49172 RTP/AVP 0 8 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-16\r\n\
a=sendrecv\r\n\
a=ptime:20\r\n";

const OK: &str = "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;rport=5060;received=192.0.2.101\r\n\
Record-Route: <sip:proxy.biloxi.example.com;lr>\r\n\
To: Bob <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:bob@192.0.2.4:5060>\r\n\
Allow: INVITE, ACK, CANCEL, BYE, OPTIONS\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 129\r\n\
\r\n\
v=0\r\n\
o=bob 2808844564 2808844564 IN IP4 192.0.2.4\r\n\
s=-\r\n\
c=IN IP4 192.0.2.4\r\n\
t=0 0\r\n\
m=audio 3456 RTP/AVP 0\r\n\
a=rtpmap:0 PCMU/8000\r\n";

const BYE: &str = "BYE sip:alice@pc33.atlanta.example.com:5060;transport=udp SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.4:5060;branch=z9hG4bKnashds10\r\n\
Max-Forwards: 70\r\n\
Route: <sip:proxy.biloxi.example.com;lr>\r\n\
From: Bob <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n\
To: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 231 BYE\r\n\
Content-Length: 0\r\n\
\r\n";

fn bench_message(c: &mut Criterion, name: &str, text: &'static str) {
    let data = Bytes::from_static(text.as_bytes());
    let parsed = Message::parse(data.clone()).expect("benchmark message parses");
    assert_eq!(
        parsed.to_bytes().len(),
        data.len(),
        "{name}: serializer output differs in size"
    );
    let limits = ParseLimits::default();

    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse", |b| {
        b.iter(|| Message::parse(black_box(data.clone())))
    });
    group.bench_function("parse+lookups", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(data.clone())).expect("parses");
            let h = m.headers();
            let branch = h.top_via_branch().map(str::len);
            let cseq = h.cseq().map(|c| c.seq).ok();
            let call_id = h.call_id().map(str::len).ok();
            let tags = (h.from_tag().map(str::len), h.to_tag().map(str::len));
            black_box((branch, cseq, call_id, tags))
        })
    });
    group.bench_function("memchr scan", |b| {
        b.iter(|| {
            let bytes: &[u8] = black_box(&data);
            let mut colons = 0usize;
            let mut start = 0;
            for end in memchr::memchr_iter(b'\n', bytes) {
                colons += memchr::memchr(b':', &bytes[start..end]).map_or(0, |_| 1);
                start = end + 1;
            }
            black_box(colons)
        })
    });
    group.bench_function("stream check", |b| {
        b.iter(|| check(black_box(&data), &limits))
    });
    let mut out = BytesMut::with_capacity(4096);
    group.bench_function("serialize", |b| {
        b.iter(|| {
            out.clear();
            black_box(&parsed).write_to(&mut out);
            black_box(out.len())
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_message(c, "invite", INVITE);
    bench_message(c, "200ok", OK);
    bench_message(c, "bye", BYE);
}

criterion_group!(parse_benches, benches);
criterion_main!(parse_benches);
