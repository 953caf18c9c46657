//! Property tests of the message parser, framer and serializer:
//!
//! * arbitrary bytes never make the parser, the stream framer, the typed accessors or the
//!   validator panic;
//! * neither do mutated valid messages (bytes flipped, inserted, removed, lines duplicated or
//!   truncated), and whatever still parses round-trips;
//! * generated valid messages round-trip (serialize, parse, equal) and their typed accessors give
//!   back what was put in.

// A test crate: panicking on unexpected values is how it reports failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use bytes::Bytes;
use proptest::prelude::*;
use thalamus_sip::message::{
    check, validate_request, validate_response, CSeq, HeaderName, HeaderValue, Host, MediaType,
    Message, Method, NameAddr, ParseLimits, Request, Response, SipUri, StreamFramer, Transport,
    Uri, Via,
};

/// Calls every typed accessor and the validator, ignoring the results.
fn exercise(m: &Message) {
    let h = m.headers();
    let _ = h.via();
    let _ = h.top_via();
    let _ = h.top_via_branch();
    let _ = h.from();
    let _ = h.to();
    let _ = h.from_tag();
    let _ = h.to_tag();
    let _ = h.call_id();
    let _ = h.cseq();
    let _ = h.max_forwards();
    let _ = h.contact();
    let _ = h.route();
    let _ = h.record_route();
    let _ = h.content_length();
    let _ = h.content_type();
    let _ = h.expires();
    let _ = h.authorization();
    let _ = h.proxy_authorization();
    let _ = h.www_authenticate();
    let _ = h.proxy_authenticate();
    let _ = h.allow();
    let _ = h.supported();
    let _ = h.require();
    let _ = h.proxy_require();
    let _ = h.unsupported();
    match m {
        Message::Request(r) => {
            let _ = r.branch();
            if let Err(e) = validate_request(r) {
                let _ = e.response(r);
            }
            let mut resp = Response::from_request(r, 200, None);
            resp.set_to_tag("t");
            let _ = resp.to_bytes();
        }
        Message::Response(r) => {
            let _ = validate_response(r);
        }
    }
}

/// Parses `data` as a datagram; when it parses, checks the round trip.
fn parse_and_round_trip(data: &[u8]) -> Result<(), TestCaseError> {
    match Message::parse(Bytes::copy_from_slice(data)) {
        Ok(m) => {
            exercise(&m);
            let bytes = m.to_bytes();
            let again = Message::parse(bytes.clone());
            let mut expected = m.clone();
            expected.fix_content_length();
            prop_assert_eq!(
                again.as_ref().ok(),
                Some(&expected),
                "round trip of {:?}",
                bytes
            );
            prop_assert_eq!(again.map(|a| a.to_bytes()).ok(), Some(bytes));
        }
        Err(e) => {
            let _ = e.response();
            let _ = e.to_string();
        }
    }
    Ok(())
}

/// Feeds `data` to the stream framer in chunks, draining items.
fn frame_stream(data: &[u8], chunk: usize) {
    let limits = ParseLimits {
        max_message_size: 4096,
        max_headers: 64,
    };
    let _ = check(data, &limits);
    let mut framer = StreamFramer::new(limits);
    for c in data.chunks(chunk.max(1)) {
        framer.push(c);
        for _ in 0..64 {
            match framer.next_item() {
                Ok(Some(thalamus_sip::message::StreamItem::Message(m))) => exercise(&m),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let dir: PathBuf = [env!("CARGO_MANIFEST_DIR"), "testdata", "rfc4475"]
        .iter()
        .collect();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, byte: u8 },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
    Truncate { at: usize },
    DuplicateLine { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop::sample::select(vec![
        b'\r', b'\n', b' ', b'\t', b':', b';', b',', b'"', b'<', b'>', b'\\', b'%', b'@', b'[',
        b']', b'=', b'?', 0, 0xff, b'0', b'9', b'a',
    ]);
    prop_oneof![
        (
            any::<usize>(),
            prop_oneof![interesting.clone(), any::<u8>()]
        )
            .prop_map(|(at, byte)| Mutation::Flip { at, byte }),
        (
            any::<usize>(),
            prop::collection::vec(prop_oneof![interesting, any::<u8>()], 1..6)
        )
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..20).prop_map(|(at, len)| Mutation::Remove { at, len }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        any::<usize>().prop_map(|at| Mutation::DuplicateLine { at }),
    ]
}

fn apply(mut data: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let n = data.len().max(1);
    match m {
        Mutation::Flip { at, byte } => {
            if !data.is_empty() {
                data[at % n] = *byte;
            }
        }
        Mutation::Insert { at, bytes } => {
            let at = at % (data.len() + 1);
            data.splice(at..at, bytes.iter().copied());
        }
        Mutation::Remove { at, len } => {
            let at = at % n;
            let end = (at + len).min(data.len());
            if at < end {
                data.drain(at..end);
            }
        }
        Mutation::Truncate { at } => data.truncate(at % n),
        Mutation::DuplicateLine { at } => {
            let at = at % n;
            let start = data[..at.min(data.len())]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let end = data[at.min(data.len())..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(data.len(), |i| at + i + 1);
            let line = data[start..end].to_vec();
            data.splice(start..start, line);
        }
    }
    data
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..600), chunk in 1usize..64) {
        parse_and_round_trip(&data)?;
        frame_stream(&data, chunk);
    }

    #[test]
    fn sip_looking_noise_never_panics(
        start in prop::sample::select(vec!["INVITE sip:a@b SIP/2.0\r\n", "SIP/2.0 200 OK\r\n", "ACK sip:x SIP/2.0\n"]),
        lines in prop::collection::vec(
            (prop::sample::select(vec!["Via", "v", "From", "To", "t", "Call-ID", "CSeq", "Contact", "m", "Route",
                "Record-Route", "Content-Length", "l", "Content-Type", "Max-Forwards", "Expires", "Authorization",
                "WWW-Authenticate", "Allow", "Require", "Supported", "X-Other"]),
             "[ -~\t]{0,60}"),
            0..12),
        body in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut data = start.as_bytes().to_vec();
        for (name, value) in lines {
            data.extend_from_slice(name.as_bytes());
            data.extend_from_slice(b": ");
            data.extend_from_slice(value.as_bytes());
            data.extend_from_slice(b"\r\n");
        }
        data.extend_from_slice(b"\r\n");
        data.extend_from_slice(&body);
        parse_and_round_trip(&data)?;
        frame_stream(&data, 13);
    }

    #[test]
    fn mutated_valid_messages_never_panic(
        index in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
        chunk in 1usize..200,
    ) {
        let corpus = corpus();
        let mut data = index.get(&corpus).clone();
        for m in &mutations {
            data = apply(data, m);
        }
        parse_and_round_trip(&data)?;
        frame_stream(&data, chunk);
    }
}

// Generators of valid messages.

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9.!%*_+`'~-]{0,12}"
}

fn host() -> impl Strategy<Value = Host> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9-]{0,8}){0,3}".prop_map(Host::Domain),
        any::<[u8; 4]>().prop_map(|o| Host::Ipv4(o.into())),
        any::<[u16; 8]>().prop_map(|s| Host::Ipv6(s.into())),
    ]
}

fn sip_uri() -> impl Strategy<Value = SipUri> {
    (
        any::<bool>(),
        prop::option::of(prop::collection::vec(any::<u8>(), 1..12)),
        host(),
        prop::option::of(any::<u16>()),
        prop::collection::vec(
            ("[a-z][a-z0-9-]{0,8}", prop::option::of("[a-zA-Z0-9]{1,8}")),
            0..3,
        ),
    )
        .prop_map(|(secure, user, host, port, params)| {
            let mut u = SipUri::new(host);
            u.secure = secure;
            if let Some(user) = user {
                u.set_user_unescaped(&user);
            }
            u.port = port;
            for (n, v) in params {
                u.params.set(&n, v.as_deref());
            }
            u
        })
}

fn uri() -> impl Strategy<Value = Uri> {
    prop_oneof![
        4 => sip_uri().prop_map(Uri::Sip),
        1 => "\\+?[0-9]{1,15}".prop_map(|n| Uri::parse(&format!("tel:{n}")).unwrap()),
        1 => ("[a-z][a-z0-9+.-]{0,8}", "[a-zA-Z0-9/._~-]{1,20}")
            .prop_filter("a scheme this crate interprets", |(scheme, _)| !["sip", "sips", "tel"].contains(&scheme.as_str()))
            .prop_map(|(scheme, body)| Uri::parse(&format!("{scheme}:{body}")).unwrap()),
    ]
}

fn name_addr() -> impl Strategy<Value = NameAddr> {
    (
        prop::option::of("[ -~]{0,20}"),
        uri(),
        prop::option::of(token()),
    )
        .prop_map(|(display, uri, tag)| {
            let mut a = NameAddr::new(uri);
            a.display_name = display;
            if let Some(t) = tag {
                a.set_tag(&t);
            }
            a
        })
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::Invite),
        Just(Method::Ack),
        Just(Method::Bye),
        Just(Method::Cancel),
        Just(Method::Options),
        Just(Method::Register),
        Just(Method::Message),
        token().prop_map(|t| t.parse().unwrap()),
    ]
}

fn via() -> impl Strategy<Value = Via> {
    (
        prop::sample::select(vec![
            Transport::Udp,
            Transport::Tcp,
            Transport::Tls,
            Transport::Ws,
        ]),
        host(),
        prop::option::of(any::<u16>()),
        "[A-Za-z0-9]{1,20}",
        any::<bool>(),
    )
        .prop_map(|(t, host, port, branch, rport)| {
            let v = Via::new(t, host, port).with_branch(&format!("z9hG4bK{branch}"));
            if rport {
                v.with_rport()
            } else {
                v
            }
        })
}

#[derive(Debug, Clone)]
struct Parts {
    method: Method,
    uri: Uri,
    vias: Vec<Via>,
    from: NameAddr,
    to: NameAddr,
    call_id: String,
    seq: u32,
    max_forwards: u32,
    contacts: Vec<NameAddr>,
    extra: Vec<(String, String)>,
    body: Vec<u8>,
    status: u16,
    reason: String,
}

fn parts() -> impl Strategy<Value = Parts> {
    (
        (
            method(),
            uri(),
            prop::collection::vec(via(), 1..4),
            name_addr(),
            name_addr(),
        ),
        (
            "[!-~]{1,30}",
            any::<u32>(),
            0u32..256,
            prop::collection::vec(name_addr(), 0..3),
        ),
        (
            prop::collection::vec((token(), "[!-~][ -~]{0,30}[!-~]"), 0..4),
            prop::collection::vec(any::<u8>(), 0..300),
            100u16..700,
            "[ -~]{0,20}",
        ),
    )
        .prop_map(
            |(
                (method, uri, vias, from, to),
                (call_id, seq, max_forwards, contacts),
                (extra, body, status, reason),
            )| {
                Parts {
                    method,
                    uri,
                    vias,
                    from,
                    to,
                    call_id,
                    seq,
                    max_forwards,
                    contacts,
                    extra,
                    body,
                    status,
                    reason,
                }
            },
        )
}

fn fill_headers(h: &mut thalamus_sip::message::Headers, p: &Parts) {
    for v in &p.vias {
        h.push(HeaderName::Via, HeaderValue::from_display(v));
    }
    h.set_from(&p.from);
    h.set_to(&p.to);
    h.set_call_id(&p.call_id);
    h.set_cseq(&CSeq::new(p.seq, p.method.clone()));
    h.set_max_forwards(p.max_forwards);
    for c in &p.contacts {
        h.push_contact(c);
    }
    for (name, value) in &p.extra {
        let name: HeaderName = format!("X-{name}").parse().unwrap();
        h.push(name, value.as_str());
    }
}

fn check_typed(m: &Message, p: &Parts) -> Result<(), TestCaseError> {
    let h = m.headers();
    prop_assert_eq!(h.via().unwrap(), p.vias.clone());
    prop_assert_eq!(h.top_via_branch(), p.vias[0].branch());
    prop_assert_eq!(h.from().unwrap(), p.from.clone());
    prop_assert_eq!(h.to().unwrap(), p.to.clone());
    prop_assert_eq!(h.from_tag(), p.from.tag());
    prop_assert_eq!(h.to_tag(), p.to.tag());
    prop_assert_eq!(h.call_id().unwrap(), p.call_id.as_str());
    prop_assert_eq!(h.cseq().unwrap(), CSeq::new(p.seq, p.method.clone()));
    prop_assert_eq!(h.max_forwards().unwrap(), Some(p.max_forwards));
    let contacts: Vec<NameAddr> = h
        .contact()
        .unwrap()
        .into_iter()
        .map(|c| c.address().unwrap().clone())
        .collect();
    prop_assert_eq!(contacts, p.contacts.clone());
    prop_assert_eq!(h.content_length().unwrap(), Some(p.body.len()));
    prop_assert_eq!(m.body().as_ref(), p.body.as_slice());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn generated_requests_round_trip(p in parts()) {
        let mut r = Request::new(p.method.clone(), p.uri.clone());
        fill_headers(&mut r.headers, &p);
        r.set_body(Bytes::from(p.body.clone()), Some(&MediaType::new("application", "octet-stream")));
        let bytes = r.to_bytes();
        let parsed = Message::parse(bytes.clone()).unwrap();
        prop_assert_eq!(&parsed, &Message::Request(r.clone()));
        prop_assert_eq!(parsed.to_bytes(), bytes.clone());
        prop_assert_eq!(validate_request(parsed.as_request().unwrap()), Ok(()));
        check_typed(&parsed, &p)?;
        let mut framer = StreamFramer::default();
        framer.push(&bytes);
        framer.push(&bytes);
        for _ in 0..2 {
            let item = framer.next_item().unwrap();
            prop_assert_eq!(item, Some(thalamus_sip::message::StreamItem::Message(parsed.clone())));
        }
    }

    #[test]
    fn generated_responses_round_trip(p in parts()) {
        let mut req = Request::new(p.method.clone(), p.uri.clone());
        fill_headers(&mut req.headers, &p);
        let mut r = Response::from_request(&req, p.status, Some(&p.reason));
        r.set_to_tag("generated");
        for c in &p.contacts {
            r.headers.push_contact(c);
        }
        r.set_body(Bytes::from(p.body.clone()), None);
        let bytes = r.to_bytes();
        let parsed = Message::parse(bytes.clone()).unwrap();
        prop_assert_eq!(&parsed, &Message::Response(r.clone()));
        prop_assert_eq!(validate_response(parsed.as_response().unwrap()), Ok(()));
        let expected_tag = p.to.tag().unwrap_or("generated");
        prop_assert_eq!(parsed.headers().to_tag(), Some(expected_tag));
        prop_assert_eq!(parsed.headers().via().unwrap(), p.vias.clone());
    }

    #[test]
    fn generated_uris_round_trip(u in uri()) {
        let text = u.to_string();
        prop_assert_eq!(Uri::parse(&text).unwrap(), u.clone());
        prop_assert!(Uri::parse(&text).unwrap().equivalent(&u));
    }

    #[test]
    fn generated_name_addrs_round_trip(a in name_addr()) {
        prop_assert_eq!(NameAddr::parse(&a.to_string()).unwrap(), a);
    }
}
