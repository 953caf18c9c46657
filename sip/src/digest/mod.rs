//! HTTP digest authentication for SIP (RFC 2617, RFC 7616, RFC 8760), client and server side.
//!
//! What it does:
//! - parses and formats digest challenges (the value of a `WWW-Authenticate` or
//!   `Proxy-Authenticate` header, [`Challenge`]) and credentials (the value of an
//!   `Authorization` or `Proxy-Authorization` header, [`Credentials`]), tolerant of the
//!   whitespace, case and quoting variations real peers send;
//! - computes responses for MD5, SHA-256 and their `-sess` variants, with `qop=auth`,
//!   `qop=auth-int` or no qop at all (RFC 2069 compatibility);
//! - [`DigestClient`] answers challenges, picking the strongest one it supports among several,
//!   and counts `nc` per nonce;
//! - [`DigestServer`] issues stateless nonces that carry their issue time and a MAC keyed by a
//!   server secret (any node of a cluster sharing the secret can check them), verifies
//!   credentials against a password or a precomputed HA1, reports stale nonces, and optionally
//!   detects `nc` replays in bounded memory.
//!
//! What it does not do: it reads no headers from SIP messages (callers pass header values as
//! `&str`), keeps no user database, never reads the clock (every time-dependent call takes `now`
//! in unix seconds), and does not implement `userhash`, SHA-512-256 or the `Authentication-Info`
//! header.

mod challenge;
mod client;
mod credentials;
mod hash;
mod params;
mod server;

pub use challenge::{parse_challenges, select_challenge, Challenge};
pub use client::{answer_challenge, DigestClient};
pub use credentials::Credentials;
pub use hash::compute_ha1;
pub use server::{
    DigestServer, DigestServerConfig, UserSecret, VerifiedCredentials, VerifyError, MIN_SECRET_LEN,
};

use std::fmt;

/// Longest header value (challenge or credentials) this module accepts, in bytes.
pub const MAX_HEADER_VALUE_LEN: usize = 8 * 1024;

/// Most auth-params accepted in one challenge or credentials value.
pub const MAX_PARAMS: usize = 32;

/// A digest algorithm (RFC 7616 section 3.3, RFC 8760).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `MD5`: the RFC 2617 default, used when a challenge names no algorithm.
    Md5,
    /// `MD5-sess`: MD5 with the session variant of HA1.
    Md5Sess,
    /// `SHA-256` (RFC 7616, RFC 8760).
    Sha256,
    /// `SHA-256-sess`: SHA-256 with the session variant of HA1.
    Sha256Sess,
}

impl Algorithm {
    /// Every supported algorithm, strongest first.
    pub const ALL: [Algorithm; 4] = [
        Algorithm::Sha256,
        Algorithm::Sha256Sess,
        Algorithm::Md5,
        Algorithm::Md5Sess,
    ];

    /// The token as written on the wire, e.g. `SHA-256-sess`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Md5Sess => "MD5-sess",
            Algorithm::Sha256 => "SHA-256",
            Algorithm::Sha256Sess => "SHA-256-sess",
        }
    }

    /// Parses an algorithm token, ignoring ASCII case; `None` for algorithms not supported here.
    pub fn from_token(token: &str) -> Option<Algorithm> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(token.trim()))
    }

    /// Whether this is a `-sess` variant, whose HA1 also covers the nonce and cnonce.
    pub fn is_session(self) -> bool {
        matches!(self, Algorithm::Md5Sess | Algorithm::Sha256Sess)
    }

    /// Relative strength of the hash function, higher is stronger.
    pub fn strength(self) -> u8 {
        match self {
            Algorithm::Md5 | Algorithm::Md5Sess => 1,
            Algorithm::Sha256 | Algorithm::Sha256Sess => 2,
        }
    }

    /// Length in hex characters of a digest computed with this algorithm.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Md5 | Algorithm::Md5Sess => 32,
            Algorithm::Sha256 | Algorithm::Sha256Sess => 64,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A quality of protection option (RFC 2617 section 3.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qop {
    /// `auth`: authentication of the method and URI.
    Auth,
    /// `auth-int`: authentication that also covers the message body.
    AuthInt,
}

impl Qop {
    /// The token as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Qop::Auth => "auth",
            Qop::AuthInt => "auth-int",
        }
    }

    /// Parses a qop token, ignoring ASCII case; `None` for unknown options.
    pub fn from_token(token: &str) -> Option<Qop> {
        let token = token.trim();
        if token.eq_ignore_ascii_case("auth") {
            Some(Qop::Auth)
        } else if token.eq_ignore_ascii_case("auth-int") {
            Some(Qop::AuthInt)
        } else {
            None
        }
    }
}

impl fmt::Display for Qop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parts of a request that a digest response covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestRequest<'a> {
    /// The request method, e.g. `REGISTER` (for ACK and CANCEL use the method of the request
    /// they relate to, as RFC 3261 section 22.1 says).
    pub method: &'a str,
    /// The digest-uri: the Request-URI of the request, as a string.
    pub uri: &'a str,
    /// The message body; only used with `qop=auth-int`.
    pub body: &'a [u8],
}

impl<'a> DigestRequest<'a> {
    /// A request without body.
    pub fn new(method: &'a str, uri: &'a str) -> Self {
        DigestRequest {
            method,
            uri,
            body: &[],
        }
    }

    /// A request with a body (relevant for `qop=auth-int`).
    pub fn with_body(method: &'a str, uri: &'a str, body: &'a [u8]) -> Self {
        DigestRequest { method, uri, body }
    }
}

/// Errors from parsing digest header values and computing responses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The header value is longer than [`MAX_HEADER_VALUE_LEN`].
    #[error("header value too long ({0} bytes)")]
    TooLong(usize),
    /// More than [`MAX_PARAMS`] parameters.
    #[error("too many auth parameters")]
    TooManyParams,
    /// The value could not be tokenized.
    #[error("malformed auth header at byte {at}: {reason}")]
    Malformed {
        /// Byte offset of the problem.
        at: usize,
        /// What was wrong.
        reason: &'static str,
    },
    /// The value holds no challenge or credentials at all.
    #[error("empty auth header value")]
    Empty,
    /// The scheme is not `Digest` (e.g. `Basic`).
    #[error("auth scheme {0:?} is not Digest")]
    NotDigest(String),
    /// The value holds several challenges where one was expected.
    #[error("more than one challenge in the value")]
    MultipleChallenges,
    /// A required parameter is missing.
    #[error("missing parameter {0}")]
    MissingParam(&'static str),
    /// A parameter appears twice.
    #[error("duplicate parameter {0}")]
    DuplicateParam(String),
    /// A parameter has an invalid value.
    #[error("invalid value for parameter {0}")]
    InvalidParam(&'static str),
    /// The algorithm is not one of [`Algorithm`].
    #[error("unsupported algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The challenge offers only qop options this module does not support.
    #[error("no supported qop option")]
    UnsupportedQop,
    /// A `-sess` algorithm was offered without qop, which RFC 2617 leaves undefined.
    #[error("session algorithm without qop")]
    SessionAlgorithmWithoutQop,
    /// A value to be sent contains characters that cannot be carried in a header.
    #[error("value of {0} contains control characters")]
    UnsafeValue(&'static str),
    /// None of the offered challenges can be answered.
    #[error("no usable digest challenge")]
    NoUsableChallenge,
    /// A server configuration is invalid.
    #[error("invalid digest server configuration: {0}")]
    InvalidConfig(&'static str),
}
