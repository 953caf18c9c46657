//! Costs of the per-request work of digest authentication (a REGISTER storm is mostly this)
//! and of SDP handling per call (parse the offer, build the answer, serialize it).
#![allow(clippy::unwrap_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use thalamus_sip::digest::{
    Algorithm, Challenge, Credentials, DigestClient, DigestRequest, DigestServer,
    DigestServerConfig, UserSecret,
};
use thalamus_sip::sdp::{Codec, LocalMedia, SdpSession, SessionDescription};

const NOW: u64 = 1_750_000_000;

const OFFER: &str = "v=0\r\n\
o=- 1386218455 2386218455 IN IP4 192.168.1.10\r\n\
s=-\r\n\
c=IN IP4 192.168.1.10\r\n\
t=0 0\r\n\
m=audio 10770 RTP/AVP 96 9 0 8 101\r\n\
a=rtpmap:96 opus/48000/2\r\n\
a=fmtp:96 stereo=1;sprop-stereo=1\r\n\
a=rtpmap:9 G722/8000\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\n\
a=ptime:20\r\n\
a=sendrecv\r\n";

fn digest(c: &mut Criterion) {
    let server = DigestServer::new(DigestServerConfig::new(
        "sip.example.net",
        *b"0123456789abcdef",
    ))
    .unwrap();
    let request = DigestRequest::new("REGISTER", "sip:sip.example.net");
    for algorithm in [Algorithm::Sha256, Algorithm::Md5] {
        let challenge = server
            .challenges(NOW, false)
            .into_iter()
            .find(|c| c.algorithm == Some(algorithm))
            .unwrap();
        let challenge_text = challenge.to_string();
        let mut client = DigestClient::new("device-42", "s3cret");
        let header = client.respond(&challenge, &request).unwrap().to_string();

        c.bench_function(&format!("digest/{algorithm}/client_respond"), |b| {
            b.iter(|| {
                let challenge = Challenge::parse(black_box(&challenge_text)).unwrap();
                client.respond(&challenge, &request).unwrap().to_string()
            })
        });
        // Without the replay guard, so the same credentials verify on every iteration.
        let mut config = DigestServerConfig::new("sip.example.net", *b"0123456789abcdef");
        config.replay_window_nonces = 0;
        let stateless = DigestServer::new(config).unwrap();
        c.bench_function(
            &format!("digest/{algorithm}/server_parse_and_verify"),
            |b| {
                b.iter(|| {
                    let credentials = Credentials::parse(black_box(&header)).unwrap();
                    stateless
                        .verify(&credentials, &request, UserSecret::Password("s3cret"), NOW)
                        .unwrap()
                })
            },
        );
    }
    c.bench_function("digest/server_challenges", |b| {
        b.iter(|| {
            server
                .challenges(black_box(NOW), false)
                .iter()
                .map(ToString::to_string)
                .count()
        })
    });
}

fn sdp(c: &mut Criterion) {
    let local = LocalMedia::audio(
        "192.0.2.10".parse().unwrap(),
        40000,
        vec![
            Codec::opus(111),
            Codec::pcma(),
            Codec::pcmu(),
            Codec::telephone_event(101, 8000),
        ],
    );
    c.bench_function("sdp/parse_offer", |b| {
        b.iter(|| SessionDescription::parse(black_box(OFFER)).unwrap())
    });
    c.bench_function("sdp/parse_answer_serialize", |b| {
        b.iter(|| {
            let offer = SessionDescription::parse(black_box(OFFER)).unwrap();
            let mut session = SdpSession::new(1);
            session.create_answer(&offer, &local).unwrap().to_string()
        })
    });
}

criterion_group!(benches, digest, sdp);
criterion_main!(benches);
