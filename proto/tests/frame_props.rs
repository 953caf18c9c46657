//! Property tests of the control-stream frame codec: round trips of arbitrary envelopes, frames
//! split across reads at arbitrary points, several frames per read, size limits, and arbitrary
//! bytes never panicking the decoder.

// Test helpers outside #[test] functions may unwrap too: a failure here is a test failure.
#![allow(clippy::unwrap_used)]

use bytes::{BufMut, BytesMut};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::strategy::Union;
use prost::Message;
use thalamus_proto::frame::LENGTH_PREFIX_BYTES;
use thalamus_proto::v1::{envelope::Body, *};
use thalamus_proto::{encode_frame, FrameDecoder, FrameError, DEFAULT_MAX_FRAME_BYTES};

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}

fn blob() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..48)
}

/// Enum fields are open in proto3: any i32 must survive, not only the named values.
fn enum_value() -> impl Strategy<Value = i32> {
    prop_oneof![4 => 0i32..16, 1 => any::<i32>()]
}

fn media_offer() -> impl Strategy<Value = MediaOffer> {
    (
        vec(enum_value(), 0..5),
        vec(enum_value(), 0..3),
        text(),
        any::<bool>(),
    )
        .prop_map(
            |(audio_codecs, video_codecs, remote_sdp, signal)| MediaOffer {
                audio_codecs,
                video_codecs,
                remote_sdp,
                signal,
            },
        )
}

fn media_stats() -> impl Strategy<Value = MediaStats> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        (any::<u32>(), any::<u32>(), any::<u64>()),
    )
        .prop_map(
            |(ps, pr, bs, br, pl, jitter_us, relay_latency_us, (stream_id, rtt, peer_lost))| {
                MediaStats {
                    packets_sent: ps,
                    packets_received: pr,
                    bytes_sent: bs,
                    bytes_received: br,
                    packets_lost: pl,
                    jitter_us,
                    relay_latency_us,
                    stream_id,
                    round_trip_us: rtt,
                    peer_reported_lost: peer_lost,
                }
            },
        )
}

fn hello() -> impl Strategy<Value = Body> {
    (
        text(),
        text(),
        proptest::option::of((
            vec(enum_value(), 0..5),
            vec(enum_value(), 0..3),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )),
        text(),
        blob(),
    )
        .prop_map(
            |(device_id, credential, caps, software_version, resume_token)| {
                Body::Hello(Hello {
                    device_id,
                    credential,
                    capabilities: caps.map(
                        |(audio_codecs, video_codecs, video, text, transfer)| Capabilities {
                            audio_codecs,
                            video_codecs,
                            video,
                            text,
                            transfer,
                        },
                    ),
                    software_version,
                    resume_token,
                })
            },
        )
}

fn welcome() -> impl Strategy<Value = Body> {
    let limits = proptest::option::of(
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(f, c, d, t)| {
            ServerLimits {
                max_frame_bytes: f,
                max_calls: c,
                max_datagram_bytes: d,
                max_text_bytes: t,
            }
        }),
    );
    let live_calls = vec(
        (any::<u32>(), text(), enum_value()).prop_map(|(call_ref, remote_uri, state)| LiveCall {
            call_ref,
            remote_uri,
            state,
        }),
        0..4,
    );
    (
        (text(), blob(), text(), limits),
        (
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
            live_calls,
            text(),
        ),
    )
        .prop_map(
            |(
                (session_id, resume_token, address_of_record, limits),
                (keepalive_interval_ms, idle_timeout_ms, resumed, live_calls, node_id),
            )| {
                Body::Welcome(Welcome {
                    session_id,
                    resume_token,
                    address_of_record,
                    limits,
                    keepalive_interval_ms,
                    idle_timeout_ms,
                    resumed,
                    live_calls,
                    node_id,
                })
            },
        )
}

fn call_event() -> impl Strategy<Value = Body> {
    (
        any::<u32>(),
        enum_value(),
        any::<u32>(),
        text(),
        enum_value(),
        proptest::option::of(media_offer()),
        proptest::option::of(media_stats()),
        vec(media_stats(), 0..4),
    )
        .prop_map(
            |(call_ref, state, sip_status, reason, end_reason, media, stats, streams)| {
                Body::CallEvent(CallEvent {
                    call_ref,
                    state,
                    sip_status,
                    reason,
                    end_reason,
                    media,
                    stats,
                    streams,
                })
            },
        )
}

/// Every body kind, plus envelopes with no body.
fn body() -> impl Strategy<Value = Option<Body>> {
    let kinds: Vec<BoxedStrategy<Body>> = vec![
        hello().boxed(),
        welcome().boxed(),
        (text(), text())
            .prop_map(|(address, node_id)| Body::Redirect(Redirect { address, node_id }))
            .boxed(),
        (enum_value(), text())
            .prop_map(|(reason, message)| Body::Goodbye(Goodbye { reason, message }))
            .boxed(),
        any::<u64>()
            .prop_map(|nonce| Body::Ping(Ping { nonce }))
            .boxed(),
        any::<u64>()
            .prop_map(|nonce| Body::Pong(Pong { nonce }))
            .boxed(),
        (enum_value(), text(), any::<u64>())
            .prop_map(|(code, message, request_id)| {
                Body::Error(Error {
                    code,
                    message,
                    request_id,
                })
            })
            .boxed(),
        (
            any::<u32>(),
            text(),
            proptest::option::of(media_offer()),
            btree_map("X-[A-Za-z-]{1,12}", text(), 0..4),
        )
            .prop_map(|(call_ref, target, media, headers)| {
                Body::Dial(Dial {
                    call_ref,
                    target,
                    media,
                    headers,
                })
            })
            .boxed(),
        call_event().boxed(),
        (
            any::<u32>(),
            text(),
            text(),
            text(),
            proptest::option::of(media_offer()),
            any::<bool>(),
            any::<u32>(),
        )
            .prop_map(
                |(call_ref, from_uri, display_name, to_uri, media, call_waiting, replaces)| {
                    Body::IncomingCall(IncomingCall {
                        call_ref,
                        from_uri,
                        display_name,
                        to_uri,
                        media,
                        call_waiting,
                        replaces_call_ref: replaces,
                    })
                },
            )
            .boxed(),
        (any::<u32>(), proptest::option::of(media_offer()))
            .prop_map(|(call_ref, media)| Body::Answer(Answer { call_ref, media }))
            .boxed(),
        (any::<u32>(), any::<u32>(), text())
            .prop_map(|(call_ref, sip_status, reason)| {
                Body::Reject(Reject {
                    call_ref,
                    sip_status,
                    reason,
                })
            })
            .boxed(),
        any::<u32>()
            .prop_map(|call_ref| Body::Hangup(Hangup { call_ref }))
            .boxed(),
        any::<u32>()
            .prop_map(|call_ref| Body::Hold(Hold { call_ref }))
            .boxed(),
        any::<u32>()
            .prop_map(|call_ref| Body::Resume(Resume { call_ref }))
            .boxed(),
        (any::<u32>(), "[0-9*#A-D]", any::<u32>())
            .prop_map(|(call_ref, digit, duration_ms)| {
                Body::Dtmf(Dtmf {
                    call_ref,
                    digit,
                    duration_ms,
                })
            })
            .boxed(),
        (text(), text(), blob())
            .prop_map(|(to, content_type, body)| {
                Body::SendText(SendText {
                    to,
                    content_type,
                    body,
                })
            })
            .boxed(),
        (text(), text(), text(), blob())
            .prop_map(|(from_uri, display_name, content_type, body)| {
                Body::TextReceived(TextReceived {
                    from_uri,
                    display_name,
                    content_type,
                    body,
                })
            })
            .boxed(),
        (any::<u32>(), text(), any::<bool>())
            .prop_map(|(sip_status, reason, delivered)| {
                Body::TextStatus(TextStatus {
                    sip_status,
                    reason,
                    delivered,
                })
            })
            .boxed(),
        (text(), enum_value(), text())
            .prop_map(|(uri, state, note)| {
                Body::PresenceUpdate(PresenceUpdate { uri, state, note })
            })
            .boxed(),
        (text(), any::<u32>())
            .prop_map(|(target, expires_secs)| {
                Body::Watch(Watch {
                    target,
                    expires_secs,
                })
            })
            .boxed(),
        text()
            .prop_map(|target| Body::Unwatch(Unwatch { target }))
            .boxed(),
        (text(), any::<bool>(), any::<u32>(), text())
            .prop_map(|(target, active, sip_status, reason)| {
                Body::WatchStatus(WatchStatus {
                    target,
                    active,
                    sip_status,
                    reason,
                })
            })
            .boxed(),
        (any::<u32>(), text(), any::<u32>())
            .prop_map(|(call_ref, target, replaces_call_ref)| {
                Body::Transfer(Transfer {
                    call_ref,
                    target,
                    replaces_call_ref,
                })
            })
            .boxed(),
        (any::<u32>(), any::<u32>(), text(), any::<bool>())
            .prop_map(|(call_ref, sip_status, reason, done)| {
                Body::TransferStatus(TransferStatus {
                    call_ref,
                    sip_status,
                    reason,
                    done,
                })
            })
            .boxed(),
        (any::<u32>(), any::<u32>(), text(), text())
            .prop_map(|(call_ref, new_call_ref, target, referred_by)| {
                Body::TransferRequested(TransferRequested {
                    call_ref,
                    new_call_ref,
                    target,
                    referred_by,
                })
            })
            .boxed(),
    ];
    prop_oneof![1 => Just(None), 20 => Union::new(kinds).prop_map(Some)]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (any::<u64>(), body()).prop_map(|(request_id, body)| Envelope { request_id, body })
}

fn encode_all(envelopes: &[Envelope]) -> BytesMut {
    let mut wire = BytesMut::new();
    for env in envelopes {
        encode_frame(env, DEFAULT_MAX_FRAME_BYTES, &mut wire).unwrap();
    }
    wire
}

/// Decodes every whole frame at the front of `buf`.
fn drain(decoder: &FrameDecoder, buf: &mut BytesMut, out: &mut Vec<Envelope>) {
    while let Some(env) = decoder.decode(buf).unwrap() {
        out.push(env);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn one_envelope_round_trips(env in envelope()) {
        let mut wire = BytesMut::new();
        encode_frame(&env, DEFAULT_MAX_FRAME_BYTES, &mut wire).unwrap();
        prop_assert_eq!(wire.len(), LENGTH_PREFIX_BYTES + env.encoded_len());
        let prefix = u32::from_be_bytes([wire[0], wire[1], wire[2], wire[3]]) as usize;
        prop_assert_eq!(prefix, env.encoded_len());
        let decoded = FrameDecoder::default().decode(&mut wire).unwrap();
        prop_assert_eq!(decoded, Some(env));
        prop_assert!(wire.is_empty());
    }

    #[test]
    fn several_frames_in_one_read_decode_in_order(envs in vec(envelope(), 0..8)) {
        let mut wire = encode_all(&envs);
        let mut got = Vec::new();
        drain(&FrameDecoder::default(), &mut wire, &mut got);
        prop_assert_eq!(got, envs);
        prop_assert!(wire.is_empty());
    }

    #[test]
    fn frames_split_across_reads_decode_to_the_same_sequence(
        envs in vec(envelope(), 1..8),
        cuts in vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let wire = encode_all(&envs);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        points.push(0);
        points.push(wire.len());
        points.sort_unstable();
        points.dedup();

        // Where each frame ends on the wire.
        let frame_ends: Vec<usize> = envs
            .iter()
            .scan(0, |end, env| {
                *end += LENGTH_PREFIX_BYTES + env.encoded_len();
                Some(*end)
            })
            .collect();

        let decoder = FrameDecoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for pair in points.windows(2) {
            buf.extend_from_slice(&wire[pair[0]..pair[1]]);
            drain(&decoder, &mut buf, &mut got);
            // Exactly the frames whose last byte has arrived are decoded; the rest stays buffered.
            let whole = frame_ends.iter().filter(|end| **end <= pair[1]).count();
            prop_assert_eq!(got.len(), whole);
            let consumed = if whole == 0 { 0 } else { frame_ends[whole - 1] };
            prop_assert_eq!(buf.len(), pair[1] - consumed);
        }
        prop_assert_eq!(got, envs);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn byte_at_a_time_decodes_to_the_same_sequence(envs in vec(envelope(), 1..4)) {
        let wire = encode_all(&envs);
        let decoder = FrameDecoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in wire.iter() {
            buf.put_u8(*byte);
            drain(&decoder, &mut buf, &mut got);
        }
        prop_assert_eq!(got, envs);
    }

    #[test]
    fn size_limit_is_enforced_on_both_sides(env in envelope(), max in 0usize..256) {
        let len = env.encoded_len();
        let mut wire = BytesMut::new();
        let encoded = encode_frame(&env, max, &mut wire);
        if len > max {
            let refused = matches!(encoded, Err(FrameError::TooLarge { .. }));
            prop_assert!(refused);
            prop_assert!(wire.is_empty());
            // The same frame built without the limit is refused by a decoder with the limit.
            encode_frame(&env, DEFAULT_MAX_FRAME_BYTES, &mut wire).unwrap();
            let err = FrameDecoder::new(max).decode(&mut wire).unwrap_err();
            let too_large = matches!(err, FrameError::TooLarge { len: l, max: m } if l == len && m == max);
            prop_assert!(too_large);
        } else {
            prop_assert!(encoded.is_ok());
            let decoded = FrameDecoder::new(max).decode(&mut wire).unwrap();
            prop_assert_eq!(decoded, Some(env));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_always_make_progress(
        bytes in vec(any::<u8>(), 0..512),
        max in prop_oneof![0usize..64, Just(DEFAULT_MAX_FRAME_BYTES)],
    ) {
        let decoder = FrameDecoder::new(max);
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(_)) | Err(FrameError::Decode(_)) => prop_assert!(buf.len() < before),
                Ok(None) | Err(FrameError::TooLarge { .. }) => {
                    prop_assert_eq!(buf.len(), before);
                    break;
                }
            }
        }
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_prefix_are_consumed_whole(
        bodies in vec(vec(any::<u8>(), 0..64), 1..6),
    ) {
        let mut buf = BytesMut::new();
        for body in &bodies {
            buf.put_u32(body.len() as u32);
            buf.put_slice(body);
        }
        let decoder = FrameDecoder::default();
        for body in &bodies {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(_)) | Err(FrameError::Decode(_)) => {}
                other => prop_assert!(false, "unexpected {:?}", other),
            }
            prop_assert_eq!(before - buf.len(), LENGTH_PREFIX_BYTES + body.len());
        }
        prop_assert!(buf.is_empty());
    }
}
