//! Criterion benchmarks of the dialog layer: creating a UAS dialog from a parsed INVITE,
//! building an in-dialog request (and serializing it), matching and checking an incoming
//! in-dialog request in a table of 10,000 dialogs, and the export/import of a dialog record
//! through JSON (what a takeover costs per dialog).

// Benchmark setup panics on a broken fixture, which is the right outcome.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use thalamus_sip::dialog::{
    uas_response, Dialog, DialogRecord, Dialogs, DialogsConfig, RequestMatch,
};
use thalamus_sip::message::{generate_branch, Message, Method, NameAddr, Request, Transport, Via};

fn invite_text(call: usize) -> String {
    format!(
        "INVITE sip:dev42@gw.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKlb{call}\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5061;branch=z9hG4bK-{call}-1-0\r\n\
Record-Route: <sip:192.0.2.1:5060;lr;node=node-a>\r\n\
Record-Route: <sip:edge.example.net;lr;transport=tcp>\r\n\
From: \"Buddy\" <sip:buddy@example.net>;tag={call}SIPpTag001\r\n\
To: <sip:dev42@gw.example.com>\r\n\
Call-ID: {call}-3719@198.51.100.7\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:buddy@198.51.100.7:5061>\r\n\
Max-Forwards: 69\r\n\
Content-Length: 0\r\n\
\r\n"
    )
}

fn parse_request(text: &str) -> Request {
    match Message::parse(text.as_bytes().to_vec()).expect("fixture parses") {
        Message::Request(r) => r,
        Message::Response(_) => panic!("fixture is a request"),
    }
}

fn our_contact() -> NameAddr {
    NameAddr::parse("<sip:gw@192.0.2.10:5080>").expect("contact")
}

fn uas_dialog(call: usize) -> Dialog {
    let invite = parse_request(&invite_text(call));
    let ok = uas_response(&invite, 200, None, &format!("gw{call}"), &our_contact());
    Dialog::new_uas(&invite, &ok).expect("dialog")
}

fn info_text(call: usize) -> String {
    format!(
        "INFO sip:gw@192.0.2.10:5080 SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKlbinfo\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5061;branch=z9hG4bK-{call}-1-2\r\n\
From: \"Buddy\" <sip:buddy@example.net>;tag={call}SIPpTag001\r\n\
To: <sip:dev42@gw.example.com>;tag=gw{call}\r\n\
Call-ID: {call}-3719@198.51.100.7\r\n\
CSeq: 2 INFO\r\n\
Max-Forwards: 69\r\n\
Content-Length: 0\r\n\
\r\n"
    )
}

fn benches(c: &mut Criterion) {
    let invite = parse_request(&invite_text(1));
    c.bench_function("dialog/uas_response+new_uas", |b| {
        b.iter(|| {
            let ok = uas_response(black_box(&invite), 200, None, "gw1", &our_contact());
            black_box(Dialog::new_uas(&invite, &ok).expect("dialog"))
        })
    });

    let mut dialog = uas_dialog(1);
    let via = Via::new(
        Transport::Udp,
        "192.0.2.10".parse().expect("host"),
        Some(5080),
    )
    .with_branch(&generate_branch());
    c.bench_function("dialog/create_request(INFO)+serialize", |b| {
        b.iter(|| {
            let mut info = dialog.create_request(Method::Info).expect("request");
            info.headers.prepend_via(&via);
            black_box(info.to_bytes())
        })
    });

    let mut table = Dialogs::new(DialogsConfig::default());
    for call in 0..10_000 {
        table.insert(uas_dialog(call)).expect("room");
    }
    let info = parse_request(&info_text(4242));
    c.bench_function("dialog/receive_request in 10k dialogs", |b| {
        b.iter(|| match table.receive_request(black_box(&info)) {
            RequestMatch::Accepted(d, kind) => {
                black_box((d.remote_cseq(), kind));
            }
            other => panic!("{other:?}"),
        })
    });
    let info_bytes = info_text(4242).into_bytes();
    c.bench_function("dialog/parse+receive_request in 10k dialogs", |b| {
        b.iter(|| {
            let Ok(Message::Request(r)) = Message::parse(black_box(info_bytes.clone())) else {
                panic!("parses")
            };
            matches!(table.receive_request(&r), RequestMatch::Accepted(..))
        })
    });

    let confirmed = uas_dialog(7);
    c.bench_function("dialog/export+to_json", |b| {
        b.iter(|| black_box(serde_json::to_vec(&black_box(&confirmed).export()).expect("json")))
    });
    let json = serde_json::to_vec(&confirmed.export()).expect("json");
    c.bench_function("dialog/from_json+import", |b| {
        b.iter(|| {
            let record: DialogRecord = serde_json::from_slice(black_box(&json)).expect("record");
            black_box(Dialog::import(&record).expect("import"))
        })
    });

    c.bench_function("dialog/uas 200 + ACK through the table", |b| {
        let t0 = Instant::now();
        let mut table = Dialogs::new(DialogsConfig::default());
        let ok = uas_response(&invite, 200, None, "gw1", &our_contact());
        let ack = parse_request(
            &info_text(1)
                .replace("INFO", "ACK")
                .replace("CSeq: 2 ACK", "CSeq: 1 ACK"),
        );
        b.iter(|| {
            table.response_sent(&invite, &ok, t0).expect("dialog");
            let acked = matches!(table.receive_request(&ack), RequestMatch::Accepted(..));
            black_box(acked);
            let id = table.iter().next().map(|d| d.id().clone()).expect("dialog");
            table.remove(&id)
        })
    });
}

criterion_group!(dialog_benches, benches);
criterion_main!(dialog_benches);
