//! A minimal earpiece on the device SDK: log in, call a SIP address, stream 20 ms PCMU frames
//! for a few seconds, count what comes back (an echoing peer sends it all back), hang up.
//!
//! ```text
//! cargo run -p thalamus-device --example earpiece -- \
//!     127.0.0.1:4433 <fingerprint> earpiece-1 <secret> sip:echo@127.0.0.1:5070 3
//! ```
//! (the gateway prints its fingerprint at start; `thalamus-sim buddy --echo` is an echoing
//! peer). It exits non-zero when the call fails or nothing came back.

use std::time::Duration;

use thalamus_device::media::{JitterBuffer, MediaSender};
use thalamus_device::session::{Event, SessionConfig};
use thalamus_device::{Client, ClientConfig};
use thalamus_proto::media::{MediaDatagram, StreamId};
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{AudioCodec, CallState, MediaOffer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [gateway, fingerprint, device, secret, target, secs] = args.as_slice() else {
        return Err("usage: earpiece <gateway host:port> <fingerprint> <device> <secret> <sip uri> <seconds>".into());
    };
    let secs: u64 = secs.parse()?;
    let pin = thalamus_device::quic::parse_fingerprint(fingerprint)?;
    let quic = thalamus_device::quic::client_config(Some(pin))?;
    let session = SessionConfig::new(device.as_str(), secret.as_str(), vec![gateway.clone()]);
    let (client, mut incoming) = Client::start(ClientConfig::new(session, quic, "localhost"))?;

    // Wait for the session.
    loop {
        match incoming.events.recv().await.ok_or("the client stopped")? {
            Event::Live(welcome) => {
                println!("live as {}", welcome.address_of_record);
                break;
            }
            Event::Refused { message, .. } => return Err(format!("refused: {message}").into()),
            other => println!("{other:?}"),
        }
    }

    let media = MediaOffer {
        audio_codecs: vec![AudioCodec::Pcmu as i32],
        ..Default::default()
    };
    let (call_ref, _) = client.dial(target, media).await?;
    loop {
        match incoming.events.recv().await.ok_or("the client stopped")? {
            Event::Frame(env) => match env.body {
                Some(Body::CallEvent(c)) if c.call_ref == call_ref => {
                    if c.state == CallState::Answered as i32 {
                        println!("answered");
                        break;
                    }
                    if c.state == CallState::Ended as i32 {
                        return Err(
                            format!("the call failed: {} {}", c.sip_status, c.reason).into()
                        );
                    }
                }
                _ => {}
            },
            other => println!("{other:?}"),
        }
    }

    let mut sender = MediaSender::new(call_ref, StreamId::AUDIO, 0, 1, 0);
    let mut jitter = JitterBuffer::new(16, Duration::from_millis(60));
    let mut received = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let frames = secs * 50;
    for _ in 0..frames {
        ticker.tick().await;
        // 160 bytes of PCMU silence.
        client.send_datagram(sender.next(&[0xff; 160], 160, false)?)?;
        while let Ok(bytes) = incoming.datagrams.try_recv() {
            if let Ok(d) = MediaDatagram::decode(bytes) {
                jitter.push(std::time::Instant::now(), d);
            }
            while jitter.pop(std::time::Instant::now()).is_some() {
                received += 1;
            }
        }
    }
    println!(
        "sent {frames} frames, {received} came back ({:?})",
        jitter.stats()
    );
    client.hangup(call_ref).await?;
    client.close().await;
    if received == 0 {
        return Err("no audio came back".into());
    }
    Ok(())
}
