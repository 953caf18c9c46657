//! Control-stream framing: a 4-byte big-endian length, then one protobuf `Envelope`.
//!
//! Sans-IO in the style of mini-redis: [`FrameDecoder::decode`] looks at a buffer the caller
//! owns, returns `Ok(None)` while a frame is incomplete, and consumes exactly one frame when it
//! is whole. It never reads a socket and never allocates beyond the frame it returns. It does
//! not interpret the message (sessions do that).

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

use crate::v1::Envelope;

/// Size of the length prefix in bytes.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Default largest frame body (the protobuf envelope, without the prefix): 64 KiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Announced (or encoded) length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The frame body is not a valid `Envelope`.
    #[error("frame does not decode as an MBFP envelope: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Decodes length-prefixed `Envelope`s from a byte buffer.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame_bytes: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

impl FrameDecoder {
    /// A decoder that refuses frames larger than `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes }
    }

    /// The configured maximum frame body size.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Checks whether `buf` starts with a whole frame. Returns the body length when it does,
    /// `Ok(None)` when more bytes are needed, and an error as soon as the prefix announces an
    /// oversized frame (so the caller never buffers it).
    pub fn check(&self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        let Some(prefix) = buf.get(..LENGTH_PREFIX_BYTES) else {
            return Ok(None);
        };
        let mut prefix_bytes = [0u8; LENGTH_PREFIX_BYTES];
        prefix_bytes.copy_from_slice(prefix);
        let len = u32::from_be_bytes(prefix_bytes) as usize;
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        if buf.len() - LENGTH_PREFIX_BYTES < len {
            return Ok(None);
        }
        Ok(Some(len))
    }

    /// Decodes one frame from the front of `buf`, consuming it. `Ok(None)` means incomplete
    /// (nothing consumed). A frame that does not decode is consumed before the error returns,
    /// so the stream stays aligned if the caller chooses to continue.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Envelope>, FrameError> {
        let Some(len) = self.check(buf)? else {
            return Ok(None);
        };
        buf.advance(LENGTH_PREFIX_BYTES);
        let body = buf.split_to(len).freeze();
        Ok(Some(Envelope::decode(body)?))
    }
}

/// Appends `envelope` to `dst` as one frame. Fails (writing nothing) if the encoded envelope is
/// larger than `max_frame_bytes`.
pub fn encode_frame(
    envelope: &Envelope,
    max_frame_bytes: usize,
    dst: &mut BytesMut,
) -> Result<(), FrameError> {
    let len = envelope.encoded_len();
    if len > max_frame_bytes || u32::try_from(len).is_err() {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    dst.reserve(LENGTH_PREFIX_BYTES + len);
    dst.put_u32(len as u32);
    envelope.encode(dst).map_err(|_| FrameError::TooLarge {
        len,
        max: max_frame_bytes,
    })?;
    Ok(())
}

/// Encodes `envelope` as one frame into a fresh buffer.
pub fn frame_bytes(envelope: &Envelope, max_frame_bytes: usize) -> Result<BytesMut, FrameError> {
    let mut dst = BytesMut::new();
    encode_frame(envelope, max_frame_bytes, &mut dst)?;
    Ok(dst)
}

/// The snake_case name of an envelope body kind (for logs, metrics and JSON output);
/// `"unknown"` when the body is absent or of a kind this version does not know.
pub fn body_kind(body: Option<&crate::v1::envelope::Body>) -> &'static str {
    use crate::v1::envelope::Body;
    match body {
        None => "unknown",
        Some(Body::Hello(_)) => "hello",
        Some(Body::Welcome(_)) => "welcome",
        Some(Body::Redirect(_)) => "redirect",
        Some(Body::Goodbye(_)) => "goodbye",
        Some(Body::Ping(_)) => "ping",
        Some(Body::Pong(_)) => "pong",
        Some(Body::Error(_)) => "error",
        Some(Body::ResumeToken(_)) => "resume_token",
        Some(Body::Dial(_)) => "dial",
        Some(Body::CallEvent(_)) => "call_event",
        Some(Body::IncomingCall(_)) => "incoming_call",
        Some(Body::Answer(_)) => "answer",
        Some(Body::Reject(_)) => "reject",
        Some(Body::Hangup(_)) => "hangup",
        Some(Body::Hold(_)) => "hold",
        Some(Body::Resume(_)) => "resume",
        Some(Body::Dtmf(_)) => "dtmf",
        Some(Body::Transfer(_)) => "transfer",
        Some(Body::TransferStatus(_)) => "transfer_status",
        Some(Body::TransferRequested(_)) => "transfer_requested",
        Some(Body::SendText(_)) => "send_text",
        Some(Body::TextReceived(_)) => "text_received",
        Some(Body::TextStatus(_)) => "text_status",
        Some(Body::PresenceUpdate(_)) => "presence_update",
        Some(Body::Watch(_)) => "watch",
        Some(Body::Unwatch(_)) => "unwatch",
        Some(Body::WatchStatus(_)) => "watch_status",
        Some(Body::KeyframeRequest(_)) => "keyframe_request",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{envelope::Body, Hello, Ping};

    fn hello(id: &str) -> Envelope {
        Envelope {
            request_id: 7,
            body: Some(Body::Hello(Hello {
                device_id: id.into(),
                credential: "secret".into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn round_trip_one_frame() {
        let buf = frame_bytes(&hello("dev-1"), DEFAULT_MAX_FRAME_BYTES).unwrap();
        let mut buf = buf;
        let got = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(got, hello("dev-1"));
        assert!(buf.is_empty());
    }

    #[test]
    fn incomplete_prefix_and_body_consume_nothing() {
        let full = frame_bytes(&hello("dev-1"), DEFAULT_MAX_FRAME_BYTES).unwrap();
        let dec = FrameDecoder::default();
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert!(dec.decode(&mut part).unwrap().is_none(), "cut at {cut}");
            assert_eq!(part.len(), cut);
        }
    }

    #[test]
    fn several_frames_in_one_read() {
        let mut buf = BytesMut::new();
        for i in 0..3u64 {
            let env = Envelope {
                request_id: i,
                body: Some(Body::Ping(Ping { nonce: i * 10 })),
            };
            encode_frame(&env, DEFAULT_MAX_FRAME_BYTES, &mut buf).unwrap();
        }
        let dec = FrameDecoder::default();
        for i in 0..3u64 {
            let env = dec.decode(&mut buf).unwrap().unwrap();
            assert_eq!(env.request_id, i);
        }
        assert!(dec.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        let mut buf = BytesMut::new();
        buf.put_u32(1_000_000);
        let err = FrameDecoder::new(1024).decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                len: 1_000_000,
                max: 1024
            }
        ));
    }

    #[test]
    fn encoder_refuses_oversized_envelope() {
        let env = Envelope {
            request_id: 1,
            body: Some(Body::Hello(Hello {
                device_id: "x".repeat(2000),
                ..Default::default()
            })),
        };
        let mut dst = BytesMut::new();
        assert!(matches!(
            encode_frame(&env, 1000, &mut dst),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(dst.is_empty());
    }

    #[test]
    fn garbage_body_is_a_decode_error_and_is_consumed() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0xff, 0xff, 0xff]);
        buf.put_u32(0); // an empty envelope follows
        let dec = FrameDecoder::default();
        assert!(matches!(dec.decode(&mut buf), Err(FrameError::Decode(_))));
        let next = dec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(next, Envelope::default());
    }

    #[test]
    fn unknown_body_kind_decodes_with_no_body() {
        // Field 99, wire type 2 (length-delimited), 1 byte: a message kind from a future version.
        let mut buf = BytesMut::new();
        let body = [0x08, 0x05, 0x9a, 0x06, 0x01, 0x00];
        buf.put_u32(body.len() as u32);
        buf.put_slice(&body);
        let env = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(env.request_id, 5);
        assert!(env.body.is_none());
    }
}
