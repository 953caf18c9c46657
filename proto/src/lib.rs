//! MBFP v1, the Thalamus device protocol: generated protobuf messages, the control-stream frame
//! codec and the media datagram header. Sans-IO: no sockets, no clock.
#![forbid(unsafe_code)]

/// Generated MBFP v1 messages (package `mbfp.v1`).
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/mbfp.v1.rs"));
}

/// The QUIC ALPN identifier of MBFP v1.
pub const ALPN: &[u8] = b"mbfp/1";
