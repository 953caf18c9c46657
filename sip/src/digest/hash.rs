//! The digest computations of RFC 2617 section 3.2.2 / RFC 7616 section 3.4 (HA1, HA2,
//! response), an HMAC-SHA-256 (RFC 2104) used to authenticate server nonces, and a
//! constant-time comparison. No parsing, no policy.

use super::{Algorithm, Qop};
use md5::Md5;
use sha2::{Digest as _, Sha256};

/// Hex digest of the parts joined by `:`.
pub(crate) fn hex_hash(algorithm: Algorithm, parts: &[&[u8]]) -> String {
    fn run<D: sha2::Digest>(parts: &[&[u8]]) -> String {
        let mut hasher = D::new();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                hasher.update(b":");
            }
            hasher.update(part);
        }
        hex::encode(hasher.finalize())
    }
    match algorithm {
        Algorithm::Md5 | Algorithm::Md5Sess => run::<Md5>(parts),
        Algorithm::Sha256 | Algorithm::Sha256Sess => run::<Sha256>(parts),
    }
}

/// Computes the HA1 that a server can store instead of a password: the hex digest of
/// `username:realm:password` with the hash of `algorithm` (the same value for an algorithm and
/// its `-sess` variant; the session part is added per request).
pub fn compute_ha1(algorithm: Algorithm, username: &str, realm: &str, password: &str) -> String {
    hex_hash(
        algorithm,
        &[username.as_bytes(), realm.as_bytes(), password.as_bytes()],
    )
}

/// The per-request inputs of a response computation.
pub(crate) struct ResponseInputs<'a> {
    pub algorithm: Algorithm,
    /// HA1 without the session part (see [`compute_ha1`]), lower-case hex.
    pub ha1: &'a str,
    pub nonce: &'a str,
    pub method: &'a str,
    pub uri: &'a str,
    pub body: &'a [u8],
    /// `(qop, nc, cnonce)` when a qop is used; `None` for RFC 2069 compatibility.
    pub qop: Option<(Qop, u32, &'a str)>,
}

/// Formats a nonce count as the 8 hex digits the wire format uses.
pub(crate) fn format_nc(nc: u32) -> String {
    format!("{nc:08x}")
}

/// Computes the `response` value (lower-case hex).
pub(crate) fn compute_response(inputs: &ResponseInputs<'_>) -> String {
    let alg = inputs.algorithm;
    let ha1 = match (alg.is_session(), inputs.qop) {
        (true, Some((_, _, cnonce))) => hex_hash(
            alg,
            &[
                inputs.ha1.as_bytes(),
                inputs.nonce.as_bytes(),
                cnonce.as_bytes(),
            ],
        ),
        _ => inputs.ha1.to_string(),
    };
    let ha2 = match inputs.qop {
        Some((Qop::AuthInt, _, _)) => {
            let body_hash = hex_hash(alg, &[inputs.body]);
            hex_hash(
                alg,
                &[
                    inputs.method.as_bytes(),
                    inputs.uri.as_bytes(),
                    body_hash.as_bytes(),
                ],
            )
        }
        _ => hex_hash(alg, &[inputs.method.as_bytes(), inputs.uri.as_bytes()]),
    };
    match inputs.qop {
        Some((qop, nc, cnonce)) => {
            let nc = format_nc(nc);
            hex_hash(
                alg,
                &[
                    ha1.as_bytes(),
                    inputs.nonce.as_bytes(),
                    nc.as_bytes(),
                    cnonce.as_bytes(),
                    qop.as_str().as_bytes(),
                    ha2.as_bytes(),
                ],
            )
        }
        None => hex_hash(
            alg,
            &[ha1.as_bytes(), inputs.nonce.as_bytes(), ha2.as_bytes()],
        ),
    }
}

/// HMAC-SHA-256 (RFC 2104) over the concatenation of `parts`.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut key_block = [0u8; BLOCK];
    if key.len() > BLOCK {
        let hashed = Sha256::digest(key);
        key_block
            .iter_mut()
            .zip(hashed.iter())
            .for_each(|(k, h)| *k = *h);
    } else {
        key_block
            .iter_mut()
            .zip(key.iter())
            .for_each(|(k, h)| *k = *h);
    }
    let mut inner = Sha256::new();
    inner.update(key_block.map(|k| k ^ 0x36));
    for part in parts {
        inner.update(part);
    }
    let inner_hash = inner.finalize();
    let mut outer = Sha256::new();
    outer.update(key_block.map(|k| k ^ 0x5c));
    outer.update(inner_hash);
    outer.finalize().into()
}

/// Compares two byte strings in time that depends only on their lengths.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_test_case_2() {
        let mac = hmac_sha256(b"Jefe", &[b"what do ya ", b"want for nothing?"]);
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hmac_hashes_long_keys_first() {
        // Expected value computed independently with Python's hmac module.
        let mac = hmac_sha256(&[b'k'; 100], &[b"msg"]);
        assert_eq!(
            hex::encode(mac),
            "bd56a1782c2830e8abc6ed866a57a1230661e650b84c62f7ee3accc5fa5af491"
        );
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn nc_is_eight_hex_digits() {
        assert_eq!(format_nc(1), "00000001");
        assert_eq!(format_nc(0xabc), "00000abc");
    }

    #[test]
    fn auth_int_covers_the_body() {
        // Expected values computed independently with Python's hashlib.
        for (alg, expected) in [
            (Algorithm::Md5, "b927d71d78959f864227031fe3481908"),
            (
                Algorithm::Sha256,
                "f9e6b1e4f16180a280dced45456cc2627c5f42baaa0c4d5afaeb0d4151a183d8",
            ),
        ] {
            let ha1 = compute_ha1(alg, "alice", "example.com", "secret");
            let response = compute_response(&ResponseInputs {
                algorithm: alg,
                ha1: &ha1,
                nonce: "abc",
                method: "INVITE",
                uri: "sip:bob@example.com",
                body: b"v=0\r\n",
                qop: Some((Qop::AuthInt, 2, "xyz")),
            });
            assert_eq!(response, expected);
        }
    }
}
