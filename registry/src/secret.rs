//! Device secrets: generating them, hashing them with argon2id for the registry, and checking a
//! secret against a stored hash.
//!
//! Hashing and checking are slow on purpose (about 18 ms of CPU and 19 MiB of memory each):
//! callers run them off any async executor. Checking reuses one argon2 working area per
//! thread. It does not remember which secrets verified, bound how many checks run at once, or
//! compare hashes in the file; that is the gateway's job.

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use rand::RngCore;

use crate::FormatError;

/// argon2id memory cost of new hashes, in KiB (19 MiB, OWASP's recommendation; argon2's
/// default).
pub const ARGON2_M_COST_KIB: u32 = 19 * 1024;
/// argon2id iterations of new hashes.
pub const ARGON2_T_COST: u32 = 2;
/// argon2id parallelism of new hashes.
pub const ARGON2_P_COST: u32 = 1;

/// The parameters of new hashes (checked when compiling).
const PARAMS: Params = match Params::new(ARGON2_M_COST_KIB, ARGON2_T_COST, ARGON2_P_COST, None) {
    Ok(params) => params,
    Err(_) => panic!("the registry's argon2 parameters are out of argon2's bounds"),
};

/// Largest argon2 memory cost a stored hash may ask a check for, in KiB (1 GiB).
const MAX_VERIFY_M_COST_KIB: usize = 1 << 20;

/// A fresh random secret: 32 random bytes, base64url without padding (43 characters). It
/// always starts with a letter or digit, so it never reads as an option on a command line.
pub fn generate_secret() -> String {
    loop {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        // A secret that starts with '-' reads as an option (`--secret -x...`): draw again (one
        // draw in 32 on average).
        if secret.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return secret;
        }
    }
}

/// The argon2id PHC hash string of `secret` with a random salt and the registry's parameters
/// ([`ARGON2_M_COST_KIB`], [`ARGON2_T_COST`], [`ARGON2_P_COST`]).
pub fn hash_secret(secret: &str) -> Result<String, FormatError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, PARAMS)
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| FormatError::Hash(e.to_string()))
}

thread_local! {
    /// Argon2 working memory, reused by each thread across checks: allocating ~19 MiB per
    /// check costs page faults, and freed blocks pile up in per-thread malloc arenas.
    static SCRATCH: std::cell::RefCell<Vec<argon2::Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether `secret` matches `secret_hash`, an argon2 PHC string (any argon2 variant and
/// parameters, memory cost at most 1 GiB). An unusable hash is [`FormatError::BadHash`].
pub fn verify_secret(secret: &str, secret_hash: &str) -> Result<bool, FormatError> {
    let bad = |e: &dyn std::fmt::Display| FormatError::BadHash(e.to_string());
    let parsed = PasswordHash::new(secret_hash).map_err(|e| bad(&e))?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(|e| bad(&e))?;
    let version = match parsed.version {
        Some(v) => Version::try_from(v).map_err(|e| bad(&e))?,
        None => Version::default(),
    };
    let params = Params::try_from(&parsed).map_err(|e| bad(&e))?;
    let expected = parsed.hash.ok_or_else(|| bad(&"no hash"))?;
    let salt = parsed.salt.ok_or_else(|| bad(&"no salt"))?;
    let mut salt_buf = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_buf).map_err(|e| bad(&e))?;
    let blocks = params.block_count();
    if blocks > MAX_VERIFY_M_COST_KIB {
        return Err(bad(&"argon2 memory cost above 1 GiB"));
    }
    let argon = Argon2::new(algorithm, version, params);
    let mut out = vec![0u8; expected.len()];
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < blocks {
            scratch.resize(blocks, argon2::Block::default());
        }
        let work = scratch
            .get_mut(..blocks)
            .ok_or_else(|| bad(&"working memory"))?;
        argon
            .hash_password_into_with_memory(secret.as_bytes(), salt, &mut out, work)
            .map_err(|e| bad(&e))
    })?;
    // Constant time in the contents: every byte is compared.
    let diff = out
        .iter()
        .zip(expected.as_bytes())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    Ok(diff == 0 && out.len() == expected.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::PasswordVerifier;

    #[test]
    fn a_hash_verifies_its_secret_and_no_other() {
        let hash = hash_secret("s3cret").unwrap();
        assert!(verify_secret("s3cret", &hash).unwrap());
        assert!(!verify_secret("s3cret ", &hash).unwrap());
        assert!(!verify_secret("", &hash).unwrap());
        // The same secret hashes differently each time (random salt); both verify.
        let again = hash_secret("s3cret").unwrap();
        assert_ne!(hash, again);
        assert!(verify_secret("s3cret", &again).unwrap());
    }

    #[test]
    fn hashes_use_the_documented_parameters() {
        let hash = hash_secret("x").unwrap();
        let parsed = PasswordHash::new(&hash).unwrap();
        assert_eq!(parsed.algorithm.as_str(), "argon2id");
        assert_eq!(parsed.version, Some(0x13));
        let params = Params::try_from(&parsed).unwrap();
        assert_eq!(
            (params.m_cost(), params.t_cost(), params.p_cost()),
            (19_456, 2, 1)
        );
        // argon2's defaults: hashes written before the parameters were spelled out match.
        assert_eq!(
            (ARGON2_M_COST_KIB, ARGON2_T_COST, ARGON2_P_COST),
            (
                Params::DEFAULT_M_COST,
                Params::DEFAULT_T_COST,
                Params::DEFAULT_P_COST
            )
        );
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
    }

    #[test]
    fn verify_agrees_with_the_argon2_crate() {
        // A hash made by argon2's own defaults (as the gateway and simulator wrote them before)
        // is checked the same way, and ours verifies with argon2's own checker.
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        let theirs = Argon2::default()
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string();
        assert!(verify_secret("pw", &theirs).unwrap());
        assert!(!verify_secret("pW", &theirs).unwrap());
        let ours = hash_secret("pw").unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default().verify_password(b"pw", &parsed).is_ok());
        assert!(Argon2::default().verify_password(b"px", &parsed).is_err());
    }

    #[test]
    fn unusable_hashes_are_errors_not_panics() {
        let good = hash_secret("pw").unwrap();
        let huge = good.replace("m=19456", "m=2000000");
        for hash in [
            "",
            "plain",
            "$argon2id$x",
            "$scrypt$ln=16,r=8,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ",
            huge.as_str(),
        ] {
            assert!(
                matches!(verify_secret("pw", hash), Err(FormatError::BadHash(_))),
                "{hash}"
            );
        }
    }

    #[test]
    fn secrets_are_random_and_never_start_like_an_option() {
        let first = generate_secret();
        for _ in 0..2_000 {
            let s = generate_secret();
            assert!(s.starts_with(|c: char| c.is_ascii_alphanumeric()), "{s}");
            assert_eq!(s.len(), 43);
            assert!(s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert_ne!(s, first);
        }
    }
}
