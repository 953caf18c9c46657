//! MBFP v1, the Thalamus device protocol: generated protobuf messages, the control-stream frame
//! codec and the media datagram header. Sans-IO: no sockets, no clock.
#![forbid(unsafe_code)]

pub mod frame;
pub mod media;

/// Generated MBFP v1 messages (package `mbfp.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/mbfp.v1.rs"));
}

pub use frame::{
    body_kind, encode_frame, frame_bytes, FrameDecoder, FrameError, DEFAULT_MAX_FRAME_BYTES,
};
pub use media::{
    max_payload_bytes, MediaDatagram, MediaError, MediaHeader, StreamId, MAX_HEADER_BYTES,
};

/// The QUIC ALPN identifier of MBFP v1.
pub const ALPN: &[u8] = b"mbfp/1";

/// QUIC application error codes the gateway closes a connection with.
pub mod close_code {
    /// Normal close (Goodbye sent).
    pub const NORMAL: u32 = 0;
    /// A frame did not decode or broke the protocol.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// A frame exceeded the maximum frame size.
    pub const FRAME_TOO_LARGE: u32 = 2;
    /// Authentication failed.
    pub const UNAUTHENTICATED: u32 = 3;
    /// The session was replaced by a newer login of the same device.
    pub const REPLACED: u32 = 4;
    /// A connection limit was hit.
    pub const LIMIT_EXCEEDED: u32 = 5;
    /// Idle timeout.
    pub const IDLE: u32 = 6;
    /// The gateway is shutting down or draining.
    pub const SHUTDOWN: u32 = 7;
    /// Sent after a Redirect.
    pub const REDIRECTED: u32 = 8;
}
