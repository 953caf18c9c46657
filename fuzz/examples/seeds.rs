//! Writes the generated part of the seed corpus: valid MBFP frames and media datagrams, RTP and
//! RTCP packets, heartbeat and live-set datagrams (plain and sealed with the targets' secret),
//! digest challenges and credentials from the real client and server, and SDP offers and
//! answers from the real negotiation code, as `corpus/<target>/gen-*` files. Text seeds taken
//! from elsewhere (RFC 4475 messages, real-world SDP and auth headers) are committed as they are
//! and not written here. It does not fuzz anything.
//!
//! Run from fuzz/: `cargo run --example seeds` (stable is enough). Deterministic except for the
//! digest nonces and cnonces, which are random by design.

use bytes::BytesMut;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use thalamus_media::rtcp::{
    write_bye, write_receiver_report, write_sdes_cname, write_sender_report, ReportBlock,
    SenderInfo,
};
use thalamus_media::rtp::{RtpHeader, TelephoneEvent};
use thalamus_ownership::{Heartbeat, LiveNode, LiveSetReport, Load, NodeId};
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{
    CallEvent, Capabilities, Dial, Dtmf, Envelope, Hello, LiveCall, MediaOffer, Ping, SendText,
    ServerLimits, TextReceived, Welcome,
};
use thalamus_proto::{frame_bytes, MediaHeader, StreamId, DEFAULT_MAX_FRAME_BYTES};
use thalamus_sip::digest::{
    Algorithm, DigestClient, DigestRequest, DigestServer, DigestServerConfig, Qop,
};
use thalamus_sip::sdp::{Codec, Direction, HoldMode, LocalMedia, SdpSession};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Out {
    root: PathBuf,
    written: usize,
}

impl Out {
    fn write(&mut self, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("gen-{name}")), bytes)?;
        self.written += 1;
        Ok(())
    }
}

fn envelope(request_id: u64, body: Body) -> Envelope {
    Envelope {
        request_id,
        body: Some(body),
    }
}

fn mbfp(out: &mut Out) -> Result<()> {
    let hello = envelope(
        1,
        Body::Hello(Hello {
            device_id: "earpiece-1".into(),
            credential: "s3cr3t-credential".into(),
            capabilities: Some(Capabilities {
                audio_codecs: vec![1, 2, 4, 5],
                video_codecs: vec![1],
                video: true,
                text: true,
                transfer: true,
            }),
            software_version: "device-sim 0.1.0".into(),
            resume_token: vec![0xde, 0xad, 0xbe, 0xef],
        }),
    );
    let welcome = envelope(
        1,
        Body::Welcome(Welcome {
            session_id: "3f2a9c".into(),
            resume_token: vec![1, 2, 3, 4, 5, 6, 7, 8],
            address_of_record: "sip:earpiece-1@thalamus.local".into(),
            limits: Some(ServerLimits {
                max_frame_bytes: 65_536,
                max_calls: 4,
                max_datagram_bytes: 1200,
                max_text_bytes: 4096,
            }),
            keepalive_interval_ms: 15_000,
            idle_timeout_ms: 60_000,
            resumed: true,
            live_calls: vec![LiveCall {
                call_ref: 7,
                remote_uri: "sip:bob@example.com".into(),
                state: 4,
            }],
            node_id: "node-a".into(),
        }),
    );
    let mut headers = BTreeMap::new();
    headers.insert("X-Room".to_string(), "42".to_string());
    let dial = envelope(
        2,
        Body::Dial(Dial {
            call_ref: 7,
            target: "sip:bob@example.com".into(),
            media: Some(MediaOffer {
                audio_codecs: vec![1, 2],
                video_codecs: vec![],
                remote_sdp: String::new(),
            }),
            headers,
        }),
    );
    let event = envelope(
        0,
        Body::CallEvent(CallEvent {
            call_ref: 7,
            state: 7,
            sip_status: 486,
            reason: "Busy Here".into(),
            end_reason: 4,
            media: None,
            stats: None,
        }),
    );
    let ping = envelope(9, Body::Ping(Ping { nonce: u64::MAX }));
    let dtmf = envelope(
        0,
        Body::Dtmf(Dtmf {
            call_ref: 7,
            digit: "#".into(),
            duration_ms: 160,
        }),
    );
    let text = envelope(
        3,
        Body::SendText(SendText {
            to: "sip:bob@example.com".into(),
            content_type: "text/plain".into(),
            body: b"hello".to_vec(),
        }),
    );
    let received = envelope(
        0,
        Body::TextReceived(TextReceived {
            from_uri: "sip:alice@example.com".into(),
            display_name: "Alice".into(),
            content_type: "text/plain;charset=utf-8".into(),
            body: "h\u{e9}llo".as_bytes().to_vec(),
        }),
    );
    let mut stream = BytesMut::new();
    for (name, env) in [
        ("hello", &hello),
        ("welcome", &welcome),
        ("dial", &dial),
        ("call-event", &event),
        ("ping", &ping),
        ("dtmf", &dtmf),
        ("send-text", &text),
        ("text-received", &received),
    ] {
        let frame = frame_bytes(env, DEFAULT_MAX_FRAME_BYTES)?;
        out.write("mbfp_frame", name, &frame)?;
        stream.extend_from_slice(&frame);
    }
    out.write("mbfp_frame", "stream", &stream)?;
    out.write(
        "mbfp_frame",
        "empty-envelope",
        &frame_bytes(&Envelope::default(), 64)?,
    )?;
    let media = MediaHeader {
        marker: true,
        payload_type: 0,
        sequence: 1,
        timestamp: 160,
        call_ref: 7,
        stream_id: StreamId::AUDIO,
    };
    out.write("mbfp_frame", "media-audio", &media.to_bytes(&[0xff; 160])?)?;
    let video = MediaHeader {
        payload_type: 96,
        stream_id: StreamId::VIDEO,
        ..media
    };
    out.write("mbfp_frame", "media-video", &video.to_bytes(&[0x41; 32])?)?;
    Ok(())
}

fn rtp(out: &mut Out) -> Result<()> {
    let header = RtpHeader {
        marker: false,
        payload_type: 0,
        sequence: 1000,
        timestamp: 160_000,
        ssrc: 0x1234_5678,
    };
    let mut pcmu = BytesMut::new();
    header.encode(&[0xff; 160], &mut pcmu)?;
    out.write("rtp", "pcmu", &pcmu)?;

    let event = TelephoneEvent {
        event: 11,
        end: true,
        volume: 10,
        duration: 1280,
    };
    let mut dtmf = BytesMut::new();
    RtpHeader {
        marker: true,
        payload_type: 101,
        ..header
    }
    .encode(&event.to_bytes(), &mut dtmf)?;
    out.write("rtp", "telephone-event", &dtmf)?;

    // Version 2, padding, extension, 2 CSRCs; one extension word; 2-byte payload; 2 bytes of
    // padding.
    let mut full = vec![0xb2, 0x60, 0x00, 0x01, 0, 0, 0, 160, 0xca, 0xfe, 0xba, 0xbe];
    full.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2]);
    full.extend_from_slice(&[0xbe, 0xde, 0x00, 0x01, 0x10, 0xaa, 0x00, 0x00]);
    full.extend_from_slice(&[0x55, 0x66, 0x00, 0x02]);
    out.write("rtp", "csrc-extension-padding", &full)?;
    Ok(())
}

fn rtcp(out: &mut Out) -> Result<()> {
    let info = SenderInfo {
        ntp_timestamp: 0xe9a1_b2c3_8000_0000,
        rtp_timestamp: 160_000,
        packet_count: 1000,
        octet_count: 160_000,
    };
    let block = ReportBlock {
        ssrc: 0x1234_5678,
        fraction_lost: 12,
        cumulative_lost: -3,
        highest_sequence: 0x0001_03e8,
        jitter: 42,
        last_sender_report: 0xb2c3_8000,
        delay_since_last_sender_report: 0x0001_0000,
    };
    let mut sr = BytesMut::new();
    write_sender_report(&mut sr, 0xcafe_babe, &info, Some(&block));
    write_sdes_cname(&mut sr, 0xcafe_babe, "thalamus@node-a");
    out.write("rtcp", "sr-sdes", &sr)?;

    let mut rr = BytesMut::new();
    write_receiver_report(&mut rr, 0x0bad_f00d, Some(&block));
    write_sdes_cname(&mut rr, 0x0bad_f00d, "phone");
    write_bye(&mut rr, 0x0bad_f00d);
    out.write("rtcp", "rr-sdes-bye", &rr)?;

    let mut empty_rr = BytesMut::new();
    write_receiver_report(&mut empty_rr, 1, None);
    out.write("rtcp", "rr-empty", &empty_rr)?;

    // An APP packet (PT 204, name "TEST") with padding, after a receiver report.
    let mut app = empty_rr.to_vec();
    app.extend_from_slice(&[0xa0, 204, 0x00, 0x03, 0, 0, 0, 1, b'T', b'E', b'S', b'T']);
    app.extend_from_slice(&[0, 0, 0, 4]);
    out.write("rtcp", "rr-app-padded", &app)?;
    Ok(())
}

fn node(id: &str) -> Result<NodeId> {
    Ok(NodeId::new(id)?)
}

fn heartbeats(out: &mut Out) -> Result<()> {
    let hb = Heartbeat {
        v: thalamus_ownership::HEARTBEAT_VERSION,
        node: node("node-a")?,
        session: "9f86d081884c7d659a2feaa0c55ad015".into(),
        seq: 42,
        sip: SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 5060)),
        quic: Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 4433))),
        draining: false,
        load: Load {
            devices: 12,
            calls: 3,
            cpu: 0.25,
        },
        ts_ms: 1_700_000_000_000,
        pinned: Vec::new(),
        store_down_ms: 0,
    };
    out.write("heartbeat", "plain", &hb.encode(None))?;
    out.write(
        "heartbeat",
        "sealed",
        &hb.encode(Some(thalamus_fuzz::SECRET)),
    )?;
    let minimal = Heartbeat {
        quic: None,
        draining: true,
        load: Load::default(),
        ts_ms: 0,
        sip: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 5060)),
        ..hb.clone()
    };
    out.write("heartbeat", "draining", &minimal.encode(None))?;

    let report = LiveSetReport {
        v: thalamus_ownership::HEARTBEAT_VERSION,
        to: node("node-a")?,
        session: hb.session.clone(),
        ack: 42,
        eligible: vec![
            LiveNode {
                node: node("node-a")?,
                quic: Some(SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 4433))),
            },
            LiveNode {
                node: node("node-b")?,
                quic: None,
            },
            LiveNode {
                node: node("node.c_3")?,
                quic: Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 4434))),
            },
        ],
        ts_ms: 1_700_000_000_123,
        alive: vec![node("node-a")?, node("node-b")?, node("node.c_3")?],
        silence_ms: 3_500,
        up_ms: 86_400_000,
        store_down: Vec::new(),
    };
    out.write("live_set", "plain", &report.encode(None))?;
    out.write(
        "live_set",
        "sealed",
        &report.encode(Some(thalamus_fuzz::SECRET)),
    )?;
    let empty = LiveSetReport {
        eligible: Vec::new(),
        ..report
    };
    out.write("live_set", "empty", &empty.encode(None))?;
    Ok(())
}

fn digest(out: &mut Out) -> Result<()> {
    let mut config = DigestServerConfig::new("example.com", *b"0123456789abcdef");
    config.algorithms = vec![Algorithm::Sha256, Algorithm::Md5, Algorithm::Sha256Sess];
    config.qop = vec![Qop::Auth, Qop::AuthInt];
    config.opaque = Some("5ccc069c403ebaf9f0171e9517f40e41".into());
    let server = DigestServer::new(config)?;
    let challenges = server.challenges(1_700_000_000, true);
    let texts: Vec<String> = challenges.iter().map(|c| c.to_string()).collect();
    for (i, text) in texts.iter().enumerate() {
        out.write("digest_params", &format!("challenge-{i}"), text.as_bytes())?;
    }
    out.write(
        "digest_params",
        "challenges-joined",
        texts.join(", ").as_bytes(),
    )?;
    let request = DigestRequest::with_body("INVITE", "sip:bob@example.com", b"v=0\r\n");
    let mut client = DigestClient::new("alice", "secret");
    let creds = client.respond_to_headers(texts.iter().map(String::as_str), &request)?;
    out.write("digest_params", "credentials", creds.to_string().as_bytes())?;
    Ok(())
}

fn sdp(out: &mut Out) -> Result<()> {
    let ours = LocalMedia::audio(
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        40_000,
        vec![
            Codec::opus(111),
            Codec::pcmu(),
            Codec::pcma(),
            Codec::telephone_event(101, 8000),
        ],
    )
    .with_video(40_002, vec![Codec::vp8(96)]);
    let mut offerer = SdpSession::new(1_700_000_000);
    let offer = offerer.create_offer(&ours)?;
    out.write("sdp", "offer", &offer.to_bytes())?;

    let theirs = LocalMedia::audio(
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        50_000,
        vec![Codec::pcma(), Codec::telephone_event(101, 8000)],
    )
    .with_direction(Direction::SendOnly);
    let mut answerer = SdpSession::new(7);
    let answer = answerer.create_answer(&offer, &theirs)?;
    out.write("sdp", "answer-ipv6-sendonly", &answer.to_bytes())?;
    let hold = offerer.create_hold_offer(HoldMode::Inactive)?;
    out.write("sdp", "hold-inactive", &hold.to_bytes())?;
    Ok(())
}

fn main() -> Result<()> {
    let root = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"),
    };
    let mut out = Out { root, written: 0 };
    mbfp(&mut out)?;
    rtp(&mut out)?;
    rtcp(&mut out)?;
    heartbeats(&mut out)?;
    digest(&mut out)?;
    sdp(&mut out)?;
    println!("wrote {} seeds under {}", out.written, out.root.display());
    Ok(())
}
