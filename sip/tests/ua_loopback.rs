//! Two user agents on loopback sockets: a call (INVITE, 200, ACK, BYE, 200) over UDP and over
//! TCP, a CANCEL, and a digest-protected request, all through the public `ua` API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use thalamus_sip::message::{MediaType, Method, NameAddr, Uri};
use thalamus_sip::transport::{PeerTransport, TransportConfig};
use thalamus_sip::ua::{ClientEvent, UaConfig, UaEvent, UserAgent};
use tokio::sync::mpsc;

async fn ua() -> (UserAgent, mpsc::Receiver<UaEvent>) {
    UserAgent::start(UaConfig {
        transport: TransportConfig {
            udp: Some("127.0.0.1:0".parse().unwrap()),
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        },
        resolver: thalamus_sip::resolve::Resolver::fixed(),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn next_event(rx: &mut mpsc::Receiver<UaEvent>) -> UaEvent {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("event in time")
        .expect("channel open")
}

async fn call(transport: PeerTransport) {
    let (alice, _alice_events) = ua().await;
    let (bob, mut bob_events) = ua().await;
    let bob_addr = bob.local_addr(transport).unwrap();
    let target = format!(
        "sip:bob@{bob_addr}{}",
        if transport == PeerTransport::Tcp {
            ";transport=tcp"
        } else {
            ""
        }
    );
    let mut invite = alice.new_request(
        Method::Invite,
        Uri::parse(&target).unwrap(),
        "<sip:alice@example.com>".parse::<NameAddr>().unwrap(),
        NameAddr::new(Uri::parse(&target).unwrap()),
    );
    invite
        .headers
        .push_contact(&alice.contact(Some("alice"), transport));
    invite.set_body(Bytes::from_static(b"v=0\r\n"), Some(&MediaType::sdp()));
    let mut call = alice.send(invite, None).await.unwrap();

    let UaEvent::Request { tx, request, .. } = next_event(&mut bob_events).await else {
        panic!("expected INVITE")
    };
    assert_eq!(request.method, Method::Invite);
    bob.respond(tx, 180, None, None).await.unwrap();
    let bob_dialog = bob.respond(tx, 200, None, None).await.unwrap().unwrap();

    let alice_dialog = loop {
        match tokio::time::timeout(Duration::from_secs(5), call.events.recv())
            .await
            .unwrap()
        {
            Some(ClientEvent::Response { response, dialog }) if response.status == 200 => {
                break dialog.unwrap()
            }
            Some(ClientEvent::Response { .. }) => {}
            other => panic!("{other:?}"),
        }
    };
    alice.ack(&alice_dialog, None).await.unwrap();
    match next_event(&mut bob_events).await {
        UaEvent::Ack { dialog, .. } => assert_eq!(dialog, bob_dialog),
        other => panic!("{other:?}"),
    }

    let mut bye = alice
        .request_in_dialog(&alice_dialog, Method::Bye, None, vec![])
        .await
        .unwrap();
    let UaEvent::DialogRequest { tx, request, .. } = next_event(&mut bob_events).await else {
        panic!()
    };
    assert_eq!(request.method, Method::Bye);
    bob.respond(tx, 200, None, None).await.unwrap();
    match bye.final_response().await {
        ClientEvent::Response { response, .. } => assert_eq!(response.status, 200),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn call_over_udp() {
    call(PeerTransport::Udp).await;
}

#[tokio::test]
async fn call_over_tcp() {
    call(PeerTransport::Tcp).await;
}

#[tokio::test]
async fn cancel_before_answer() {
    let (alice, _a) = ua().await;
    let (bob, mut bob_events) = ua().await;
    let target = format!("sip:bob@{}", bob.local_addr(PeerTransport::Udp).unwrap());
    let mut invite = alice.new_request(
        Method::Invite,
        Uri::parse(&target).unwrap(),
        "<sip:alice@example.com>".parse().unwrap(),
        NameAddr::new(Uri::parse(&target).unwrap()),
    );
    invite
        .headers
        .push_contact(&alice.contact(Some("alice"), PeerTransport::Udp));
    let mut call = alice.send(invite, None).await.unwrap();
    let UaEvent::Request { tx, .. } = next_event(&mut bob_events).await else {
        panic!()
    };
    bob.respond(tx, 180, None, None).await.unwrap();
    // Wait for the 180 before cancelling (RFC 3261 9.1).
    match call.events.recv().await.unwrap() {
        ClientEvent::Response { response, .. } => assert_eq!(response.status, 180),
        other => panic!("{other:?}"),
    }
    alice.cancel(call.key()).await.unwrap();
    match next_event(&mut bob_events).await {
        UaEvent::Cancelled { tx: cancelled } => assert_eq!(cancelled, tx),
        other => panic!("{other:?}"),
    }
    match call.final_response().await {
        ClientEvent::Response { response, .. } => assert_eq!(response.status, 487),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn digest_challenge_is_answered() {
    use thalamus_sip::digest::{DigestServer, DigestServerConfig, UserSecret};
    let (alice, _a) = ua().await;
    let (bob, mut bob_events) = ua().await;
    let target = format!("sip:bob@{}", bob.local_addr(PeerTransport::Udp).unwrap());
    let request = alice.new_request(
        Method::Message,
        Uri::parse(&target).unwrap(),
        "<sip:alice@example.com>".parse().unwrap(),
        NameAddr::new(Uri::parse(&target).unwrap()),
    );
    let mut call = alice
        .send_with_auth(
            request,
            None,
            Some(thalamus_sip::ua::DigestAuth::anywhere("alice", "secret")),
        )
        .await
        .unwrap();
    let server = DigestServer::new(DigestServerConfig::new("test", vec![7u8; 32])).unwrap();
    let now = 1_700_000_000;
    // First MESSAGE: challenge.
    let UaEvent::Request { tx, .. } = next_event(&mut bob_events).await else {
        panic!()
    };
    let challenge = server.challenges(now, false);
    bob.respond_with_headers(
        tx,
        401,
        None,
        None,
        challenge
            .iter()
            .map(|c| {
                (
                    thalamus_sip::message::HeaderName::WwwAuthenticate,
                    c.to_string(),
                )
            })
            .collect(),
    )
    .await
    .unwrap();
    // Second MESSAGE: verify and accept.
    let UaEvent::Request { tx, request, .. } = next_event(&mut bob_events).await else {
        panic!()
    };
    assert_eq!(request.headers.cseq().unwrap().seq, 2);
    let creds = request.headers.authorization().unwrap();
    let value = request
        .headers
        .get(&thalamus_sip::message::HeaderName::Authorization)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(creds.len(), 1);
    let parsed = thalamus_sip::digest::Credentials::parse(&value).unwrap();
    let uri = request.uri.to_string();
    let verified = server.verify(
        &parsed,
        &thalamus_sip::digest::DigestRequest::new("MESSAGE", &uri),
        UserSecret::Password("secret"),
        now,
    );
    assert!(verified.is_ok(), "{verified:?}");
    bob.respond(tx, 200, None, None).await.unwrap();
    match call.final_response().await {
        ClientEvent::Response { response, .. } => assert_eq!(response.status, 200),
        other => panic!("{other:?}"),
    }
}
