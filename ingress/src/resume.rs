//! Resume tokens: let a device that lost its connection get its session back.
//!
//! A token is self-authenticating, so any node holding the shared secret can check it without
//! a lookup (a device whose node died resumes on a survivor): it binds the device id, the
//! session id and the time it was issued, under HMAC-SHA256. Layout (57 bytes):
//! `version (1) | session id (16) | issued unix seconds (8, big-endian) | mac (32)`, where the
//! MAC covers `version | device id length (1) | device id | session id | issued`.
//! This module signs and checks tokens; it does not decide what a resumed session gets back.

use std::path::Path;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

const TOKEN_VERSION: u8 = 1;
/// Length of an encoded token.
pub const TOKEN_LEN: usize = 1 + 16 + 8 + 32;

/// A session id: 16 random bytes, shown as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut b);
        Self(b)
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// Wrong length or version.
    #[error("malformed resume token")]
    Malformed,
    /// The MAC does not match (forged, or issued to another device).
    #[error("resume token does not belong to this device")]
    BadSignature,
    /// Older than the resume window.
    #[error("resume token expired")]
    Expired,
}

/// Signs and checks resume tokens with a secret shared by the nodes of a cluster.
#[derive(Clone)]
pub struct ResumeTokens {
    secret: [u8; 32],
    window_secs: u64,
}

impl std::fmt::Debug for ResumeTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeTokens")
            .field("window_secs", &self.window_secs)
            .finish_non_exhaustive()
    }
}

impl ResumeTokens {
    /// Tokens signed with `secret`, valid for `window_secs` after issue.
    pub fn new(secret: [u8; 32], window_secs: u64) -> Self {
        Self {
            secret,
            window_secs,
        }
    }

    /// Loads the secret from `path`, creating a random one on first use.
    pub fn load_or_create_secret(path: &Path) -> std::io::Result<[u8; 32]> {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(bytes) = hex::decode(text.trim()) {
                if let Ok(secret) = <[u8; 32]>::try_from(bytes.as_slice()) {
                    return Ok(secret);
                }
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} must hold 64 hex digits", path.display()),
            ));
        }
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, hex::encode(secret))?;
        Ok(secret)
    }

    fn mac(&self, device_id: &str, session: &SessionId, issued: u64) -> [u8; 32] {
        // HMAC accepts keys of any length; new_from_slice cannot fail for HMAC.
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&self.secret) {
            Ok(m) => m,
            Err(_) => return [0u8; 32],
        };
        mac.update(&[TOKEN_VERSION]);
        let id = device_id.as_bytes();
        mac.update(&[id.len().min(255) as u8]);
        mac.update(id);
        mac.update(&session.0);
        mac.update(&issued.to_be_bytes());
        mac.finalize().into_bytes().into()
    }

    /// How long a token is accepted after it was issued, seconds.
    pub fn window_secs(&self) -> u64 {
        self.window_secs
    }

    /// A token for `device_id`'s `session`, issued at `now_unix`.
    pub fn issue(&self, device_id: &str, session: &SessionId, now_unix: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(TOKEN_LEN);
        out.push(TOKEN_VERSION);
        out.extend_from_slice(&session.0);
        out.extend_from_slice(&now_unix.to_be_bytes());
        out.extend_from_slice(&self.mac(device_id, session, now_unix));
        out
    }

    /// Checks a token presented by `device_id` at `now_unix`; returns the session it resumes.
    pub fn check(
        &self,
        device_id: &str,
        token: &[u8],
        now_unix: u64,
    ) -> Result<SessionId, ResumeError> {
        if token.len() != TOKEN_LEN || token.first() != Some(&TOKEN_VERSION) {
            return Err(ResumeError::Malformed);
        }
        let mut session = [0u8; 16];
        session.copy_from_slice(token.get(1..17).ok_or(ResumeError::Malformed)?);
        let mut issued = [0u8; 8];
        issued.copy_from_slice(token.get(17..25).ok_or(ResumeError::Malformed)?);
        let issued = u64::from_be_bytes(issued);
        let session = SessionId(session);
        let expected = self.mac(device_id, &session, issued);
        let given = token.get(25..).ok_or(ResumeError::Malformed)?;
        // Constant-time comparison.
        let diff = expected
            .iter()
            .zip(given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(ResumeError::BadSignature);
        }
        if now_unix.saturating_sub(issued) > self.window_secs || issued > now_unix + 60 {
            return Err(ResumeError::Expired);
        }
        Ok(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> ResumeTokens {
        ResumeTokens::new([7u8; 32], 300)
    }

    #[test]
    fn issued_token_checks_for_its_device_only() {
        let t = tokens();
        let s = SessionId::random();
        let tok = t.issue("dev-1", &s, 1_000);
        assert_eq!(t.check("dev-1", &tok, 1_100), Ok(s));
        assert_eq!(
            t.check("dev-2", &tok, 1_100),
            Err(ResumeError::BadSignature)
        );
    }

    #[test]
    fn expiry_and_tampering() {
        let t = tokens();
        let s = SessionId::random();
        let tok = t.issue("dev-1", &s, 1_000);
        assert_eq!(t.check("dev-1", &tok, 1_301), Err(ResumeError::Expired));
        let mut bad = tok.clone();
        bad[3] ^= 1;
        assert_eq!(
            t.check("dev-1", &bad, 1_001),
            Err(ResumeError::BadSignature)
        );
        assert_eq!(
            t.check("dev-1", &tok[..10], 1_001),
            Err(ResumeError::Malformed)
        );
        let other = ResumeTokens::new([8u8; 32], 300);
        assert_eq!(
            other.check("dev-1", &tok, 1_001),
            Err(ResumeError::BadSignature)
        );
    }

    #[test]
    fn secret_file_is_created_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("resume.key");
        let a = ResumeTokens::load_or_create_secret(&p).unwrap();
        let b = ResumeTokens::load_or_create_secret(&p).unwrap();
        assert_eq!(a, b);
        std::fs::write(&p, "zz").unwrap();
        assert!(ResumeTokens::load_or_create_secret(&p).is_err());
    }
}
