//! SDP (RFC 4566) parsing and building, a codec model, and RFC 3264 offer/answer.
//!
//! What it does:
//! - parses session descriptions ([`SessionDescription::parse`]) into a typed model: `v o s i u
//!   e p c b t r z k a m` lines, media with port, protocol and formats, and the attributes
//!   `rtpmap`, `fmtp`, `ptime`, the direction attributes and `rtcp` (others are kept verbatim).
//!   LF-only line ends are accepted; unknown line types, missing mandatory lines and malformed
//!   values are errors; sizes and counts are bounded;
//! - serializes them with CRLF line ends ([`std::fmt::Display`]);
//! - models codecs ([`Codec`]) with the well-known static payload types and the usual dynamic
//!   ones;
//! - builds offers and answers ([`SdpSession`]): codec intersection in the offerer's order,
//!   offerer's payload type numbers, telephone-event matched by clock rate, port 0 for rejected
//!   streams, direction answers per RFC 3264 section 6.1, hold and resume offers (section 8.4),
//!   the `o=` version bumped whenever our description changes;
//! - reads what a media relay needs from a remote description ([`RemoteMedia`]) and detects
//!   hold.
//!
//! - SDES keys (RFC 4568, `a=crypto`) on `RTP/SAVP` streams: offered and answered by
//!   [`SrtpPolicy`], the first usable offered suite chosen ([`Crypto`]);
//! - key frame feedback (`a=rtcp-fb` `nack pli` and `ccm fir`, [`RtcpFeedback`]): offered
//!   where the stream asks for it, answered with what both sides list.
//!
//! What it does not do: no ICE, no DTLS-SRTP, no SRTP itself (the media relay), no bundling, no simulcast, no
//! multicast semantics beyond keeping the `c=` address text; it opens no sockets.

mod attribute;
mod codec;
mod connection;
mod crypto;
mod feedback;
mod negotiation;
mod session;

pub use attribute::{Attribute, Direction, Fmtp, Rtcp, RtpMap};
pub use codec::Codec;
pub use connection::Connection;
pub use crypto::{choose as choose_crypto, Crypto, CryptoSuite, SrtpPolicy};
pub use feedback::RtcpFeedback;
pub use negotiation::{
    HoldMode, LocalMedia, MediaConfig, NegotiationError, RemoteMedia, SdpSession,
};
pub use session::{
    Bandwidth, MediaDescription, MediaKind, Origin, Protocol, SessionDescription, Timing,
};

/// Longest session description accepted, in bytes.
pub const MAX_SDP_LEN: usize = 64 * 1024;
/// Most media descriptions (`m=` lines) accepted.
pub const MAX_MEDIA: usize = 32;
/// Most attributes accepted per session or media level.
pub const MAX_ATTRIBUTES: usize = 256;
/// Most formats accepted on one `m=` line.
pub const MAX_FORMATS: usize = 128;
/// Most lines of any other repeatable type (`b=`, `e=`, `p=`, `t=`, `r=`) per level.
pub const MAX_REPEATED_LINES: usize = 32;

/// Errors from parsing session descriptions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    /// The description is longer than [`MAX_SDP_LEN`].
    #[error("session description too long ({0} bytes)")]
    TooLong(usize),
    /// The bytes are not UTF-8.
    #[error("session description is not UTF-8")]
    NotUtf8,
    /// The description is empty.
    #[error("empty session description")]
    Empty,
    /// A line is not of the form `<letter>=<value>`.
    #[error("line {line}: not a `<type>=<value>` line")]
    MalformedLine {
        /// 1-based line number.
        line: usize,
    },
    /// A line type that RFC 4566 does not define, or one not allowed where it appears.
    #[error("line {line}: unexpected `{kind}=` line")]
    UnexpectedLine {
        /// 1-based line number.
        line: usize,
        /// The type letter.
        kind: char,
    },
    /// The first line is not `v=0`.
    #[error("first line must be v=0")]
    BadVersion,
    /// A mandatory line is missing.
    #[error("missing `{0}=` line")]
    MissingLine(char),
    /// A line that may appear once appears twice.
    #[error("line {line}: duplicate `{kind}=` line")]
    DuplicateLine {
        /// 1-based line number.
        line: usize,
        /// The type letter.
        kind: char,
    },
    /// A line's value is malformed.
    #[error("line {line}: invalid {what}")]
    InvalidValue {
        /// 1-based line number.
        line: usize,
        /// What was being parsed.
        what: &'static str,
    },
    /// A count limit was exceeded.
    #[error("too many {0}")]
    TooMany(&'static str),
}
