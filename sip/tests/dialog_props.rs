//! Property tests of the dialog layer on hostile input: records with arbitrary field values
//! import or fail cleanly (and re-export to themselves when they import), and a dialog fed
//! arbitrary sequences of responses and requests never panics, never lowers its remote CSeq and
//! never leaves the terminated state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use thalamus_sip::dialog::{Dialog, DialogRecord, DialogState, Dialogs, RequestMatch};
use thalamus_sip::message::{Message, Request, Response};

const INVITE: &str = "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnashds8\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@pc33.atlanta.example.com>\r\n\
Content-Length: 0\r\n\r\n";

fn parse(text: &str) -> Option<Message> {
    Message::parse(text.as_bytes().to_vec()).ok()
}

fn invite() -> Request {
    match parse(INVITE) {
        Some(Message::Request(r)) => r,
        _ => panic!("fixture"),
    }
}

fn response(status: u16, cseq: u32, method: &str, contact: &str) -> Option<Response> {
    let text = format!(
        "SIP/2.0 {status} X\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnashds8\r\n\
Record-Route: <sip:p1.example.com;lr>\r\n\
To: Bob <sip:bob@biloxi.example.com>;tag=b0b\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710\r\n\
CSeq: {cseq} {method}\r\n\
Contact: {contact}\r\n\
Content-Length: 0\r\n\r\n"
    );
    match parse(&text)? {
        Message::Response(r) => Some(r),
        Message::Request(_) => None,
    }
}

fn from_bob(method: &str, cseq: u32, to_tag: &str) -> Option<Request> {
    let text = format!(
        "{method} sip:alice@pc33.atlanta.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.4;branch=z9hG4bKb{cseq}\r\n\
From: Bob <sip:bob@biloxi.example.com>;tag=b0b\r\n\
To: Alice <sip:alice@atlanta.example.com>;tag={to_tag}\r\n\
Call-ID: a84b4c76e66710\r\n\
CSeq: {cseq} {method}\r\n\
Contact: <sip:bob@192.0.2.4>\r\n\
Content-Length: 0\r\n\r\n"
    );
    match parse(&text)? {
        Message::Request(r) => Some(r),
        Message::Response(_) => None,
    }
}

fn confirmed() -> Dialog {
    let ok = response(200, 1, "INVITE", "<sip:bob@192.0.2.4>").unwrap();
    Dialog::new_uac(&invite(), &ok).unwrap()
}

fn field_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[ -~]{0,40}",
        "<sips?:[a-z]{1,8}@[a-z0-9.]{1,12}(;lr)?>(;tag=[a-z0-9]{1,6})?",
        "sips?:[a-z0-9.@:;=]{1,30}",
        ".{0,20}",
    ]
}

fn method() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("INVITE"),
        Just("ACK"),
        Just("BYE"),
        Just("UPDATE"),
        Just("INFO"),
        Just("CANCEL"),
        Just("OPTIONS"),
    ]
}

#[derive(Debug, Clone)]
enum Step {
    Response(u16, u32, &'static str, String),
    Request(&'static str, u32, bool),
    Create(&'static str),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (100u16..700, 0u32..6, method(), field_text())
            .prop_map(|(s, c, m, ct)| Step::Response(s, c, m, ct)),
        (method(), 0u32..10, any::<bool>()).prop_map(|(m, c, ours)| Step::Request(m, c, ours)),
        method().prop_map(Step::Create),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn records_import_or_fail_cleanly(
        edits in proptest::collection::vec((0usize..9, field_text()), 1..4),
        version in prop_oneof![Just(1u32), any::<u32>()],
    ) {
        let mut record: DialogRecord = confirmed().export();
        record.version = version;
        for (field, value) in edits {
            match field {
                0 => record.call_id = value,
                1 => record.local_tag = value,
                2 => record.remote_tag = value,
                3 => record.local_uri = value,
                4 => record.remote_uri = value,
                5 => record.remote_target = value,
                6 => record.route_set.push(value),
                7 => record.local_contact = value,
                _ => record.state = value,
            }
        }
        if let Ok(d) = Dialog::import(&record) {
            prop_assert_eq!(record.version, 1);
            let again = Dialog::import(&d.export()).unwrap();
            prop_assert_eq!(again, d);
        }
    }

    #[test]
    fn a_dialog_survives_any_message_sequence(steps in proptest::collection::vec(step(), 1..30)) {
        let mut dialogs = Dialogs::default();
        dialogs.receive_invite_response(
            &invite(),
            &response(200, 1, "INVITE", "<sip:bob@192.0.2.4>").unwrap(),
        ).unwrap();
        let id = dialogs.iter().next().unwrap().id().clone();
        let mut terminated = false;
        let mut remote_cseq = None;
        for step in steps {
            match step {
                Step::Response(status, cseq, m, contact) => {
                    if let Some(r) = response(status, cseq, m, &contact) {
                        let _ = dialogs.receive_response(&r);
                    }
                }
                Step::Request(m, cseq, ours) => {
                    let tag = if ours { "1928301774" } else { "someone" };
                    if let Some(r) = from_bob(m, cseq, tag) {
                        if let RequestMatch::Rejected(e) = dialogs.receive_request(&r) {
                            prop_assert!([400, 481, 500].contains(&e.status()));
                        }
                    }
                }
                Step::Create(m) => {
                    let d = dialogs.get_mut(&id).unwrap();
                    if let Ok(r) = d.create_request(m.parse().unwrap()) {
                        prop_assert!(Message::parse(r.to_bytes()).is_ok());
                    }
                }
            }
            let d = dialogs.get(&id).unwrap();
            if terminated {
                prop_assert_eq!(d.state(), DialogState::Terminated);
            }
            terminated = d.state() == DialogState::Terminated;
            prop_assert!(d.remote_cseq() >= remote_cseq);
            remote_cseq = d.remote_cseq();
            prop_assert_eq!(Dialog::import(&d.export()).unwrap().export(), d.export());
        }
    }
}
