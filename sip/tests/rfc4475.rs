//! RFC 4475 (SIP torture test messages) against the parser, the validator and the stream framer.
//!
//! Every one of the 50 byte-exact files in `testdata/rfc4475/` has one row in [`cases`] with the
//! expected outcome and the layer that owns the RFC's final verdict:
//!
//! * `Accept`: parses as a UDP datagram, passes `validate_request`/`validate_response`, and
//!   round-trips (parse, serialize, parse gives the same message, Content-Length made exact).
//! * `ParseReject`: `Message::parse` fails with the given error kind; requests carry the status
//!   to answer (400...), responses are discarded (no status).
//! * `ValidationReject`: the message parses but validation fails with the given status (requests)
//!   or is discarded (responses).
//!
//! For the transaction-layer (3.2) and application-layer (3.3) messages, the row shows that the
//! message is syntactically accepted and that the typed accessor the deciding layer needs works;
//! the `layer` column records who turns it into the RFC's answer (416, 420, 415, 483...).
//! The test fails if any verdict changes.

// A test crate: panicking on unexpected values is how it reports failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use bytes::Bytes;
use thalamus_sip::message::{
    check, is_rfc3261_branch, validate_request, validate_response, Contact, FramingError,
    HeaderName, Host, Message, Method, ParseErrorKind, ParseLimits, Rport, StreamError,
    StreamFrame, StreamFramer, StreamItem, Transport, Uri, ValidationError,
};

fn data(file: &str) -> Bytes {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "testdata", "rfc4475", file]
        .iter()
        .collect();
    Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// Who makes the final decision the RFC describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// The message parser (this crate, `Message::parse` / `check`).
    Parser,
    /// `validate_request` / `validate_response` (this crate).
    Validation,
    /// The transaction layer (branch matching, RFC 2543 fallback).
    Transaction,
    /// The transaction user: proxy, registrar or UAS logic.
    Application,
}

#[derive(Clone, Copy)]
enum Verdict {
    Accept(fn(&Message)),
    /// `status`: what to answer (`None` for a response, discarded); `answerable`: whether enough
    /// was read (a Via) to answer statelessly.
    ParseReject {
        status: Option<u16>,
        answerable: bool,
        kind: fn(&ParseErrorKind) -> bool,
    },
    ValidationReject {
        status: Option<u16>,
        check: fn(&Message, &ValidationError),
    },
}

struct Case {
    file: &'static str,
    section: &'static str,
    layer: Layer,
    verdict: Verdict,
}

fn req(m: &Message) -> &thalamus_sip::message::Request {
    m.as_request().expect("a request")
}

fn resp(m: &Message) -> &thalamus_sip::message::Response {
    m.as_response().expect("a response")
}

fn cases() -> Vec<Case> {
    use Layer::*;
    use Verdict::*;
    vec![
        // 3.1.1: valid messages.
        Case {
            file: "wsinv.dat",
            section: "3.1.1.1",
            layer: Parser,
            verdict: Accept(|m| {
                let h = m.headers();
                assert_eq!(
                    req(m)
                        .uri
                        .as_sip()
                        .unwrap()
                        .params
                        .iter()
                        .next()
                        .unwrap()
                        .name,
                    "unknownparam"
                );
                assert_eq!(h.to().unwrap().tag(), Some("1918181833n"));
                let from = h.from().unwrap();
                assert_eq!(from.display_name.as_deref(), Some("J Rosenberg \\\""));
                assert_eq!(from.tag(), Some("98asjd8"));
                assert_eq!(h.max_forwards().unwrap(), Some(68));
                assert_eq!(h.cseq().unwrap().seq, 9);
                let vias = h.via().unwrap();
                assert_eq!(vias.len(), 3);
                assert_eq!(vias[0].branch(), Some("390skdjuw"));
                assert_eq!(vias[1].transport, Transport::Tcp);
                assert_eq!(vias[1].branch(), Some("z9hG4bK9ikj8"));
                assert_eq!(vias[2].branch(), Some("z9hG4bK30239"));
                assert_eq!(h.get(&HeaderName::Subject).unwrap().as_bytes(), b"");
                let unknown = "NewFangledHeader".parse().unwrap();
                assert_eq!(
                    h.get(&unknown).unwrap().as_bytes(),
                    b"newfangled value continued newfangled value"
                );
                let odd = "UnknownHeaderWithUnusualValue".parse().unwrap();
                assert_eq!(h.get(&odd).unwrap().as_bytes(), b";;,,;;,;");
                assert!(h.route().unwrap()[0]
                    .uri
                    .as_sip()
                    .unwrap()
                    .is_loose_router());
                let contact = h.contact().unwrap();
                let c = contact[0].address().unwrap();
                assert_eq!(c.display_name.as_deref(), Some("Quoted string \"\""));
                assert_eq!(c.param("newparam"), Some("newvalue"));
                assert!(c.params.contains("secondparam"));
                assert_eq!(c.q(), Some(0.33));
                assert_eq!(m.body().len(), 150);
            }),
        },
        Case {
            file: "intmeth.dat",
            section: "3.1.1.2",
            layer: Application,
            verdict: Accept(|m| {
                let r = req(m);
                assert_eq!(
                    r.method,
                    Method::Extension("!interesting-Method0123456789_*+`.%indeed'~".into())
                );
                assert!(
                    r.method.is_extension(),
                    "an endpoint answers 501 with Allow"
                );
                assert_eq!(
                    r.uri.as_sip().unwrap().password.as_deref(),
                    Some("&it+has=1,weird!*pas$wo~d_too.(doesn't-it)")
                );
                assert_eq!(r.branch(), Some("z9hG4bK-.!%66*_+`'~"));
                let to = r.headers.to().unwrap();
                assert_eq!(to.display_name.as_deref(), Some("BEL:\x07 NUL:\0 DEL:\x7f"));
                let from = r.headers.from().unwrap();
                assert_eq!(
                    from.display_name.as_deref(),
                    Some("token1~` token2'+_ token3*%!.-")
                );
                assert_eq!(from.tag(), Some("_token~1'+`*%!-."));
                assert_eq!(
                    from.params.unquoted_value("fromParam''~+*_!.-%").as_deref(),
                    Some("работающий")
                );
                assert_eq!(
                    r.headers.call_id().unwrap(),
                    "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
                );
                let ext = "extensionHeader-!.%*+_`'~".parse().unwrap();
                assert_eq!(
                    r.headers.text(&ext).unwrap(),
                    Some("\u{FEFF}\u{5927}\u{505C}\u{96FB}")
                );
            }),
        },
        Case {
            file: "esc01.dat",
            section: "3.1.1.3",
            layer: Parser,
            verdict: Accept(|m| {
                let r = req(m);
                assert_eq!(
                    &*r.uri.as_sip().unwrap().user_unescaped().unwrap(),
                    b"sips:user@example.com"
                );
                let to = r.headers.to().unwrap();
                assert_eq!(
                    &*to.uri.as_sip().unwrap().user_unescaped().unwrap(),
                    b"user"
                );
                let from = r.headers.from().unwrap();
                assert_eq!(
                    &*from.uri.as_sip().unwrap().user_unescaped().unwrap(),
                    b"I have spaces"
                );
                assert!(r
                    .headers
                    .content_type()
                    .unwrap()
                    .unwrap()
                    .is("application", "sdp"));
                let contact = r.headers.contact().unwrap();
                let cu = contact[0].address().unwrap().uri.as_sip().unwrap().clone();
                assert_eq!(&*cu.user_unescaped().unwrap(), b"caller");
                assert_eq!(cu.params.value("n%61me"), Some("v%61lue%25%34%31"));
                let plain = Uri::parse("sip:caller@host5.example.net;lr;name=value%41").unwrap();
                assert!(
                    Uri::Sip(cu).equivalent(&plain),
                    "escapes compare equal to the characters"
                );
            }),
        },
        Case {
            file: "escnull.dat",
            section: "3.1.1.4",
            layer: Parser,
            verdict: Accept(|m| {
                let h = m.headers();
                assert_eq!(
                    &*h.to()
                        .unwrap()
                        .uri
                        .as_sip()
                        .unwrap()
                        .user_unescaped()
                        .unwrap(),
                    b"null-\0-null"
                );
                let contacts = h.contact().unwrap();
                assert_eq!(contacts.len(), 2);
                let users: Vec<Vec<u8>> = contacts
                    .iter()
                    .map(|c| {
                        c.address()
                            .unwrap()
                            .uri
                            .as_sip()
                            .unwrap()
                            .user_unescaped()
                            .unwrap()
                            .into_owned()
                    })
                    .collect();
                assert_eq!(
                    users,
                    vec![b"\0".to_vec(), b"\0\0".to_vec()],
                    "two distinct contacts"
                );
            }),
        },
        Case {
            file: "esc02.dat",
            section: "3.1.1.5",
            layer: Application,
            verdict: Accept(|m| {
                let r = req(m);
                assert_eq!(
                    r.method,
                    Method::Extension("RE%47IST%45R".into()),
                    "not REGISTER: endpoints answer 501"
                );
                assert_eq!(
                    r.headers.contact().unwrap().len(),
                    2,
                    "C%6Fntact is not Contact"
                );
                assert_eq!(
                    r.headers.to().unwrap().display_name.as_deref(),
                    Some("%Z%45")
                );
                assert_eq!(r.branch(), Some("z9hG4bK209%fzsnel234"));
            }),
        },
        Case {
            file: "lwsdisp.dat",
            section: "3.1.1.6",
            layer: Parser,
            verdict: Accept(|m| {
                let from = m.headers().from().unwrap();
                assert_eq!(from.display_name.as_deref(), Some("caller"));
                assert_eq!(from.tag(), Some("323"));
            }),
        },
        Case {
            file: "longreq.dat",
            section: "3.1.1.7",
            layer: Parser,
            verdict: Accept(|m| {
                let h = m.headers();
                let vias = h.via().unwrap();
                assert_eq!(vias.len(), 34);
                assert_eq!(vias[0].host, Host::Domain("sip33.example.com".into()));
                assert_eq!(vias[33].received(), Some("192.0.2.5"));
                assert!(vias[33].branch().unwrap().len() > 100);
                assert!(h.to().unwrap().display_name.unwrap().len() > 80);
                assert_eq!(h.to().unwrap().uri.as_sip().unwrap().port, Some(6000));
                assert!(h.from().unwrap().tag().unwrap().len() > 100);
                assert!(h.call_id().unwrap().len() > 100);
                assert_eq!(m.body().len(), 150);
            }),
        },
        Case {
            file: "dblreq.dat",
            section: "3.1.1.8",
            layer: Parser,
            verdict: Accept(|m| {
                let r = req(m);
                assert_eq!(r.method, Method::Register);
                assert!(r.body.is_empty(), "the trailing INVITE is ignored");
                assert_eq!(
                    r.headers.call_id().unwrap(),
                    "dblreq.0ha0isndaksdj99sdfafnl3lk233412"
                );
            }),
        },
        Case {
            file: "semiuri.dat",
            section: "3.1.1.9",
            layer: Parser,
            verdict: Accept(|m| {
                let u = req(m).uri.as_sip().unwrap();
                assert_eq!(u.user.as_deref(), Some("user;par=u%40example.net"));
                assert_eq!(&*u.user_unescaped().unwrap(), b"user;par=u@example.net");
                assert!(u.params.is_empty());
                assert_eq!(u.host, Host::Domain("example.com".into()));
            }),
        },
        Case {
            file: "transports.dat",
            section: "3.1.1.10",
            layer: Parser,
            verdict: Accept(|m| {
                let t: Vec<Transport> = m
                    .headers()
                    .via()
                    .unwrap()
                    .into_iter()
                    .map(|v| v.transport)
                    .collect();
                assert_eq!(
                    t,
                    vec![
                        Transport::Udp,
                        Transport::Sctp,
                        Transport::Tls,
                        Transport::Other("UNKNOWN".into()),
                        Transport::Tcp
                    ]
                );
            }),
        },
        Case {
            file: "mpart01.dat",
            section: "3.1.1.11",
            layer: Parser,
            verdict: Accept(|m| {
                assert_eq!(m.body().len(), 553);
                assert!(m.body().contains(&0), "binary part framed whole");
                assert!(m.body().ends_with(b"--7a9cbec02ceef655--\r\n"));
                let ct = m.headers().content_type().unwrap().unwrap();
                assert!(ct.is("multipart", "mixed"));
                assert_eq!(ct.params.value("boundary"), Some("7a9cbec02ceef655"));
                assert_eq!(
                    m.headers().top_via().unwrap().rport(),
                    Some(Rport::Requested)
                );
            }),
        },
        Case {
            file: "unreason.dat",
            section: "3.1.1.12",
            layer: Parser,
            verdict: Accept(|m| {
                let r = resp(m);
                assert_eq!(r.status, 200);
                assert!(r.reason.starts_with("= 2**3 * 5**2 \u{43d}\u{43e}"));
                assert_eq!(r.body.len(), 154);
            }),
        },
        Case {
            file: "noreason.dat",
            section: "3.1.1.13",
            layer: Parser,
            verdict: Accept(|m| {
                let r = resp(m);
                assert_eq!(r.status, 100);
                assert_eq!(r.reason, "");
            }),
        },
        // 3.1.2: invalid messages.
        Case {
            file: "badinv01.dat",
            section: "3.1.2.1",
            layer: Validation,
            verdict: ValidationReject {
                status: Some(400),
                check: |_, e| assert_eq!(e.to_string(), "invalid Via header: empty list element"),
            },
        },
        Case {
            file: "clerr.dat",
            section: "3.1.2.2",
            layer: Parser,
            verdict: ParseReject {
                status: Some(400),
                answerable: true,
                kind: |k| {
                    *k == ParseErrorKind::BodyTruncated {
                        expected: 9999,
                        available: 154,
                    }
                },
            },
        },
        Case {
            file: "ncl.dat",
            section: "3.1.2.3",
            layer: Parser,
            verdict: ParseReject {
                status: Some(400),
                answerable: true,
                kind: |k| *k == ParseErrorKind::InvalidContentLength && k.is_framing_error(),
            },
        },
        Case {
            file: "scalar02.dat",
            section: "3.1.2.4",
            layer: Validation,
            verdict: ValidationReject {
                status: Some(400),
                check: |m, e| {
                    assert_eq!(
                        e.to_string(),
                        "invalid CSeq header: sequence number too large"
                    );
                    assert_eq!(m.headers().max_forwards().unwrap(), Some(300));
                    assert_eq!(
                        m.headers().expires().unwrap(),
                        Some(u32::MAX),
                        "treated as the largest value"
                    );
                },
            },
        },
        Case {
            file: "scalarlg.dat",
            section: "3.1.2.5",
            layer: Validation,
            verdict: ValidationReject {
                status: None,
                check: |_, e| assert!(e.to_string().contains("CSeq")),
            },
        },
        Case {
            file: "quotbal.dat",
            section: "3.1.2.6",
            layer: Validation,
            verdict: ValidationReject {
                status: Some(400),
                check: |_, e| assert!(e.to_string().starts_with("invalid To header")),
            },
        },
        Case {
            file: "ltgtruri.dat",
            section: "3.1.2.7",
            layer: Parser,
            verdict: ParseReject {
                status: Some(400),
                answerable: true,
                kind: |k| matches!(k, ParseErrorKind::InvalidRequestUri(_)),
            },
        },
        Case {
            file: "lwsruri.dat",
            section: "3.1.2.8",
            layer: Parser,
            verdict: ParseReject {
                status: Some(400),
                answerable: true,
                kind: |k| matches!(k, ParseErrorKind::InvalidRequestUri(_)),
            },
        },
        Case {
            file: "lwsstart.dat",
            section: "3.1.2.9",
            layer: Parser,
            verdict: ParseReject {
                status: Some(400),
                answerable: true,
                kind: |k| matches!(k, ParseErrorKind::InvalidRequestUri(_)),
            },
        },
        Case {
            file: "trws.dat",
            section: "3.1.2.10",
            layer: Parser,
            verdict: ParseReject {
                status: Some(400),
                answerable: true,
                kind: |k| *k == ParseErrorKind::InvalidStartLine,
            },
        },
        Case {
            file: "escruri.dat",
            section: "3.1.2.11",
            layer: Validation,
            verdict: ValidationReject {
                status: Some(400),
                check: |_, e| assert_eq!(*e, ValidationError::RequestUriHeaders),
            },
        },
        // The Date header is not interpreted, so the bad time zone is ignored (an allowed verdict).
        Case {
            file: "baddate.dat",
            section: "3.1.2.12",
            layer: Application,
            verdict: Accept(|m| {
                assert_eq!(
                    m.headers().text(&HeaderName::Date).unwrap(),
                    Some("Fri, 01 Jan 2010 16:00:00 EST")
                );
            }),
        },
        Case {
            file: "regbadct.dat",
            section: "3.1.2.13",
            layer: Validation,
            verdict: ValidationReject {
                status: Some(400),
                check: |_, e| assert!(e.to_string().starts_with("invalid Contact header")),
            },
        },
        Case {
            file: "badaspec.dat",
            section: "3.1.2.14",
            layer: Validation,
            verdict: ValidationReject {
                status: Some(400),
                check: |_, e| assert!(e.to_string().starts_with("invalid To header")),
            },
        },
        Case {
            file: "baddn.dat",
            section: "3.1.2.15",
            layer: Validation,
            verdict: ValidationReject {
                status: Some(400),
                check: |_, e| assert!(e.to_string().starts_with("invalid From header")),
            },
        },
        Case {
            file: "badvers.dat",
            section: "3.1.2.16",
            layer: Validation,
            verdict: ValidationReject {
                status: Some(505),
                check: |_, e| {
                    assert!(matches!(e, ValidationError::UnsupportedVersion(v) if v.major == 7))
                },
            },
        },
        Case {
            file: "mismatch01.dat",
            section: "3.1.2.17",
            layer: Validation,
            verdict: ValidationReject {
                status: Some(400),
                check: |_, e| assert!(matches!(e, ValidationError::CSeqMethodMismatch { .. })),
            },
        },
        Case {
            file: "mismatch02.dat",
            section: "3.1.2.18",
            layer: Validation,
            verdict: ValidationReject {
                status: Some(501),
                check: |_, e| assert!(matches!(e, ValidationError::CSeqMethodMismatch { .. })),
            },
        },
        Case {
            file: "bigcode.dat",
            section: "3.1.2.19",
            layer: Parser,
            verdict: ParseReject {
                status: None,
                answerable: false,
                kind: |k| *k == ParseErrorKind::InvalidStatusCode,
            },
        },
        // 3.2: transaction layer.
        Case {
            file: "badbranch.dat",
            section: "3.2.1",
            layer: Transaction,
            verdict: Accept(|m| {
                let branch = req(m).branch().unwrap();
                assert_eq!(branch, "z9hG4bK");
                assert!(!is_rfc3261_branch(branch), "RFC 2543 matching applies");
            }),
        },
        // 3.3: application layer.
        Case {
            file: "insuf.dat",
            section: "3.3.1",
            layer: Validation,
            verdict: ValidationReject {
                status: Some(400),
                check: |_, e| assert!(matches!(e, ValidationError::MissingHeader(_))),
            },
        },
        Case {
            file: "unkscm.dat",
            section: "3.3.2",
            layer: Application,
            verdict: Accept(|m| {
                let u = &req(m).uri;
                assert!(matches!(u, Uri::Other(_)), "416 Unsupported URI Scheme");
                assert_eq!(u.scheme(), "nobodyKnowsThisScheme");
                assert_eq!(u.to_string(), "nobodyKnowsThisScheme:totallyopaquecontent");
            }),
        },
        Case {
            file: "novelsc.dat",
            section: "3.3.3",
            layer: Application,
            verdict: Accept(|m| {
                assert_eq!(req(m).uri.scheme(), "soap.beep");
                assert!(!req(m).uri.is_sip());
            }),
        },
        Case {
            file: "unksm2.dat",
            section: "3.3.4",
            layer: Application,
            verdict: Accept(|m| {
                let h = m.headers();
                assert_eq!(
                    h.to().unwrap().uri.scheme(),
                    "isbn",
                    "a registrar answers 400"
                );
                assert_eq!(h.from().unwrap().uri.scheme(), "http");
                assert_eq!(
                    h.contact().unwrap()[0].address().unwrap().uri.scheme(),
                    "name"
                );
            }),
        },
        Case {
            file: "bext01.dat",
            section: "3.3.5",
            layer: Application,
            verdict: Accept(|m| {
                let h = m.headers();
                assert_eq!(
                    h.require().unwrap(),
                    vec!["nothingSupportsThis", "nothingSupportsThisEither"]
                );
                assert_eq!(
                    h.proxy_require().unwrap(),
                    vec!["noProxiesSupportThis", "norDoAnyProxiesSupportThis"]
                );
            }),
        },
        Case {
            file: "invut.dat",
            section: "3.3.6",
            layer: Application,
            verdict: Accept(|m| {
                let ct = m.headers().content_type().unwrap().unwrap();
                assert!(
                    ct.is("application", "unknownformat"),
                    "an endpoint answers 415"
                );
                assert_eq!(m.body().len(), 40);
            }),
        },
        Case {
            file: "regaut01.dat",
            section: "3.3.7",
            layer: Application,
            verdict: Accept(|m| {
                let creds = m.headers().authorization().unwrap();
                assert_eq!(creds.len(), 1);
                assert_eq!(creds[0].scheme, "NoOneKnowsThisScheme");
                assert_eq!(creds[0].param("opaque-data"), Some("here"));
            }),
        },
        Case {
            file: "multi01.dat",
            section: "3.3.8",
            layer: Validation,
            verdict: ValidationReject {
                status: Some(400),
                check: |_, e| assert!(matches!(e, ValidationError::DuplicateHeader(_))),
            },
        },
        Case {
            file: "mcl01.dat",
            section: "3.3.9",
            layer: Parser,
            verdict: ParseReject {
                status: Some(400),
                answerable: true,
                kind: |k| *k == ParseErrorKind::MultipleContentLength && k.is_framing_error(),
            },
        },
        Case {
            file: "bcast.dat",
            section: "3.3.10",
            layer: Application,
            verdict: Accept(|m| {
                let vias = m.headers().via().unwrap();
                assert_eq!(
                    vias[1].host,
                    Host::Ipv4("255.255.255.255".parse().unwrap()),
                    "a proxy drops it"
                );
            }),
        },
        Case {
            file: "zeromf.dat",
            section: "3.3.11",
            layer: Application,
            verdict: Accept(|m| {
                assert_eq!(
                    m.headers().max_forwards().unwrap(),
                    Some(0),
                    "a proxy answers 483"
                );
            }),
        },
        Case {
            file: "cparam01.dat",
            section: "3.3.12",
            layer: Application,
            verdict: Accept(|m| {
                let contacts = m.headers().contact().unwrap();
                let c = contacts[0].address().unwrap();
                assert!(c.params.contains("unknownparam"), "a contact-param");
                assert!(c.uri.as_sip().unwrap().params.is_empty());
            }),
        },
        Case {
            file: "cparam02.dat",
            section: "3.3.13",
            layer: Application,
            verdict: Accept(|m| {
                let contacts = m.headers().contact().unwrap();
                let c = contacts[0].address().unwrap();
                assert!(c.params.is_empty());
                assert!(
                    c.uri.as_sip().unwrap().params.contains("unknownparam"),
                    "a url-parameter"
                );
            }),
        },
        Case {
            file: "regescrt.dat",
            section: "3.3.14",
            layer: Application,
            verdict: Accept(|m| {
                let contacts = m.headers().contact().unwrap();
                let Contact::Address(c) = &contacts[0] else {
                    panic!("wildcard")
                };
                let u = c.uri.as_sip().unwrap();
                assert_eq!(u.header("Route"), Some("%3Csip:sip.example.com%3E"));
                assert_eq!(
                    c.uri.to_string(),
                    "sip:user@example.com?Route=%3Csip:sip.example.com%3E"
                );
            }),
        },
        Case {
            file: "sdp01.dat",
            section: "3.3.15",
            layer: Application,
            verdict: Accept(|m| {
                assert_eq!(
                    m.headers().text(&HeaderName::Accept).unwrap(),
                    Some("text/nobodyKnowsThis")
                );
                assert!(m
                    .headers()
                    .content_type()
                    .unwrap()
                    .unwrap()
                    .is("application", "sdp"));
            }),
        },
        // 3.4: backward compatibility.
        Case {
            file: "inv2543.dat",
            section: "3.4.1",
            layer: Transaction,
            verdict: Accept(|m| {
                let h = m.headers();
                assert_eq!(h.max_forwards().unwrap(), None);
                assert_eq!(h.content_length().unwrap(), None);
                assert_eq!(h.from_tag(), None);
                assert_eq!(req(m).branch(), None, "RFC 2543 transaction matching");
                assert_eq!(h.to().unwrap().param("user"), Some("phone"));
                assert!(
                    m.body().ends_with(b"m=audio 49217 RTP/AVP 0\r\n"),
                    "body runs to the end of the datagram"
                );
            }),
        },
        // Not referenced by the RFC text: an INVITE whose request line has no version.
        Case {
            file: "test.dat",
            section: "(none)",
            layer: Parser,
            verdict: ParseReject {
                status: Some(400),
                answerable: false,
                kind: |k| *k == ParseErrorKind::InvalidStartLine,
            },
        },
    ]
}

fn validate(m: &Message) -> Result<(), ValidationError> {
    match m {
        Message::Request(r) => validate_request(r),
        Message::Response(r) => validate_response(r),
    }
}

fn assert_round_trip(file: &str, m: &Message) {
    let bytes = m.to_bytes();
    let again =
        Message::parse(bytes.clone()).unwrap_or_else(|e| panic!("{file}: reparse failed: {e}"));
    let mut expected = m.clone();
    expected.fix_content_length();
    assert_eq!(again, expected, "{file}: round trip changed the message");
    assert_eq!(
        again.to_bytes(),
        bytes,
        "{file}: serialization is not stable"
    );
    // The serialized form frames exactly on a stream too.
    assert_eq!(
        check(&bytes, &ParseLimits::default()),
        Ok(StreamFrame::Message { len: bytes.len() }),
        "{file}: stream framing"
    );
    let mut framer = StreamFramer::default();
    framer.push(&bytes);
    assert_eq!(
        framer.next_item(),
        Ok(Some(StreamItem::Message(expected))),
        "{file}: stream parse"
    );
}

#[test]
fn every_file_has_exactly_one_verdict() {
    let dir: PathBuf = [env!("CARGO_MANIFEST_DIR"), "testdata", "rfc4475"]
        .iter()
        .collect();
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".dat"))
        .collect();
    files.sort();
    let mut listed: Vec<String> = cases().iter().map(|c| c.file.to_owned()).collect();
    listed.sort();
    assert_eq!(files.len(), 50);
    assert_eq!(files, listed);
}

#[test]
fn rfc4475_verdicts() {
    let mut failures = Vec::new();
    for case in cases() {
        let bytes = data(case.file);
        let result = std::panic::catch_unwind(|| run_case(&case, bytes));
        if let Err(p) = result {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failures.push(format!(
                "{} ({}, {:?}): {msg}",
                case.file, case.section, case.layer
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} verdicts changed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn run_case(case: &Case, bytes: Bytes) {
    let file = case.file;
    match case.verdict {
        Verdict::Accept(check_fn) => {
            let m = Message::parse(bytes).unwrap_or_else(|e| panic!("{file}: parse failed: {e}"));
            if let Err(e) = validate(&m) {
                panic!("{file}: validation failed: {e}");
            }
            check_fn(&m);
            assert_round_trip(file, &m);
        }
        Verdict::ParseReject {
            status,
            answerable,
            kind,
        } => {
            let e = match Message::parse(bytes) {
                Ok(_) => panic!("{file}: parsed but must be rejected"),
                Err(e) => e,
            };
            assert!(
                kind(e.kind()),
                "{file}: unexpected error kind {:?}",
                e.kind()
            );
            match status {
                Some(s) => {
                    assert!(!e.is_response());
                    assert_eq!(e.status(), s, "{file}: status");
                    match e.response() {
                        Some(answer) => {
                            assert!(answerable, "{file}: unexpected stateless answer");
                            assert_eq!(answer.status, s);
                            assert!(answer.headers.top_via().is_ok());
                            assert!(answer.headers.cseq().is_ok());
                            assert!(answer.headers.call_id().is_ok());
                        }
                        None => assert!(!answerable, "{file}: no stateless answer"),
                    }
                }
                None => {
                    assert!(e.is_response(), "{file}: a response is discarded");
                    assert!(e.response().is_none());
                }
            }
        }
        Verdict::ValidationReject {
            status,
            check: check_fn,
        } => {
            let m = Message::parse(bytes).unwrap_or_else(|e| panic!("{file}: parse failed: {e}"));
            let e = validate(&m).expect_err("validation must fail");
            check_fn(&m, &e);
            match (status, &m) {
                (Some(s), Message::Request(r)) => {
                    assert_eq!(e.status(), s, "{file}: status ({e})");
                    let answer = e.response(r).unwrap_or_else(|| panic!("{file}: no answer"));
                    assert_eq!(answer.status, s);
                    assert_eq!(
                        answer.headers.count(&HeaderName::Via),
                        r.headers.count(&HeaderName::Via)
                    );
                }
                (None, Message::Response(_)) => {}
                _ => panic!("{file}: status expectation does not fit the message kind"),
            }
            // Syntactically accepted messages still round-trip.
            assert_round_trip(file, &m);
        }
    }
}

/// 3.1.2.2 over a stream: wait for more data (Incomplete), never answer early.
#[test]
fn clerr_over_a_stream_is_incomplete() {
    let bytes = data("clerr.dat");
    assert_eq!(
        check(&bytes, &ParseLimits::default()),
        Err(FramingError::Incomplete)
    );
    let mut framer = StreamFramer::default();
    framer.push(&bytes);
    assert_eq!(framer.next_item(), Ok(None));
    assert_eq!(framer.buffered(), bytes.len());
}

/// 3.1.2.3 and 3.3.9 over a stream: framing errors, the connection is to be closed.
#[test]
fn ncl_and_mcl01_over_a_stream_are_framing_errors() {
    for (file, kind) in [
        ("ncl.dat", ParseErrorKind::InvalidContentLength),
        ("mcl01.dat", ParseErrorKind::MultipleContentLength),
    ] {
        let bytes = data(file);
        match check(&bytes, &ParseLimits::default()) {
            Err(FramingError::Invalid(e)) => assert_eq!(e.kind(), &kind, "{file}"),
            other => panic!("{file}: {other:?}"),
        }
        let mut framer = StreamFramer::default();
        framer.push(&bytes);
        assert!(
            matches!(framer.next_item(), Err(StreamError::Framing(_))),
            "{file}"
        );
    }
}

/// 3.1.1.8 over a stream: the two requests are two messages. The INVITE's body is 5 bytes longer
/// than its Content-Length, so those bytes come out as a malformed message of their own, which
/// is consumed without breaking the stream.
#[test]
fn dblreq_over_a_stream_is_two_messages_and_garbage() {
    let mut framer = StreamFramer::default();
    framer.push(&data("dblreq.dat"));
    let mut methods = Vec::new();
    let mut errors = Vec::new();
    loop {
        match framer.next_item() {
            Ok(None) => break,
            Ok(Some(StreamItem::Message(m))) => {
                methods.push(m.as_request().unwrap().method.clone())
            }
            Ok(Some(_keepalive)) => {}
            Err(StreamError::Message(e)) => errors.push(e.kind().clone()),
            Err(StreamError::Framing(e)) => panic!("framing error {e}"),
        }
    }
    assert_eq!(methods, vec![Method::Register, Method::Invite]);
    assert_eq!(errors, vec![ParseErrorKind::InvalidStartLine]);
    assert_eq!(framer.buffered(), 0);
}
