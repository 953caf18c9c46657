//! The device registry file format, owned in one place: the gateway (`thalamus device add`, the
//! login check) and the simulator (`thalamus-sim provision`) both read and write it through
//! this crate.
//!
//! The file is TOML, one table per device:
//!
//! ```toml
//! [[device]]
//! id = "earpiece-1"
//! secret_hash = "$argon2id$v=19$m=19456,t=2,p=1$...$..."
//! created_unix = 1700000000
//! ```
//!
//! What it does: the on-disk records ([`DeviceRecord`], [`RegistryFile`]); reading a file (a
//! missing file is an empty registry; a bad one is an error naming the file) and writing it
//! atomically (temp file + rename); the device id rule ([`valid_device_id`],
//! [`MAX_DEVICE_ID_LEN`]); the argon2id parameters ([`ARGON2_M_COST_KIB`], [`ARGON2_T_COST`],
//! [`ARGON2_P_COST`]), [`hash_secret`], [`verify_secret`] and [`generate_secret`].
//!
//! What it does not do: no caching of the file or of verified secrets, no thread pool for the
//! slow hash, no watching or hot reload of the file, no locking against a concurrent writer
//! (the last rename wins). Those belong to the gateway's `registry` module, which wraps this
//! crate.
#![forbid(unsafe_code)]

mod file;
mod secret;

use std::path::PathBuf;

pub use file::{DeviceRecord, RegistryFile, MAX_REGISTRY_FILE_BYTES};
pub use secret::{
    generate_secret, hash_secret, verify_secret, ARGON2_M_COST_KIB, ARGON2_P_COST, ARGON2_T_COST,
};

/// Longest accepted device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// Whether `id` is an acceptable device id: 1 to [`MAX_DEVICE_ID_LEN`] characters from
/// `[A-Za-z0-9._-]`, so it is also a valid SIP user part.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What can go wrong reading, changing or writing a registry, or hashing a secret.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading or writing the file failed.
    #[error("device registry {path}: {source}")]
    Io {
        /// The registry file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a valid registry.
    #[error("device registry {path} is malformed: {message}")]
    Malformed {
        /// The registry file.
        path: PathBuf,
        /// What is wrong (the TOML parser's message, or the device whose hash is unusable).
        message: String,
    },
    /// The file is larger than [`MAX_REGISTRY_FILE_BYTES`].
    #[error("device registry {path} is {size} bytes, more than {MAX_REGISTRY_FILE_BYTES}")]
    TooLarge {
        /// The registry file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The id does not pass [`valid_device_id`].
    #[error("invalid device id {0:?}: use 1-64 characters from [A-Za-z0-9._-]")]
    InvalidId(String),
    /// A device with this id is already registered.
    #[error("device {0} already exists")]
    Exists(String),
    /// Hashing a secret failed.
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// A stored secret hash cannot be used to verify (not a PHC string, unknown algorithm,
    /// parameters out of bounds).
    #[error("unusable secret hash: {0}")]
    BadHash(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(valid_device_id("ear-piece_1.a"));
        assert!(valid_device_id(&"x".repeat(MAX_DEVICE_ID_LEN)));
        assert!(!valid_device_id(&"x".repeat(MAX_DEVICE_ID_LEN + 1)));
        assert!(!valid_device_id(""));
        assert!(!valid_device_id("a b"));
        assert!(!valid_device_id("a@b"));
        assert!(!valid_device_id("a:b"));
        assert!(!valid_device_id("é"));
    }
}
