//! `thalamus-sim provision`: creates many test devices (`<prefix><n>`) that share one secret,
//! for load runs.
//!
//! Two ways in: [`provision_registry`] writes the gateway's registry file directly (the same
//! TOML format as the gateway's `registry` module: `[[device]] id, secret_hash, created_unix`,
//! the hash an argon2id PHC string with the gateway's parameters m = 19 MiB, t = 2, p = 1),
//! hashing the shared secret once; [`provision_with_gateway`] runs the gateway binary's
//! `thalamus --config FILE device add-bulk`, which finds the registry from the gateway's own
//! configuration. Existing devices are kept; an id that is already there is refused.
//!
//! It does not talk to a running gateway (the gateway re-reads the file when it changes) and
//! does not remove devices.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use argon2::password_hash::{PasswordHasher, SaltString};
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Most devices one call provisions (a registry of a million entries is ~150 MB of TOML).
pub const MAX_PROVISIONED_DEVICES: u32 = 1_000_000;

/// Longest device id the gateway accepts.
const MAX_DEVICE_ID_LEN: usize = 64;

/// Provisioning errors.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// Reading or writing the registry failed.
    #[error("device registry {path}: {source}")]
    Io {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The existing registry does not parse.
    #[error("device registry {path} is malformed: {message}")]
    Malformed {
        /// File path.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A generated id is not a valid device id.
    #[error("invalid device id {0:?}: use 1-64 characters from [A-Za-z0-9._-]")]
    InvalidId(String),
    /// A device with this id is already registered.
    #[error("device {0} already exists in the registry")]
    Exists(String),
    /// Too many devices asked for.
    #[error("at most {MAX_PROVISIONED_DEVICES} devices at once (asked for {0})")]
    TooMany(u32),
    /// Hashing the secret failed.
    #[error("hashing the secret: {0}")]
    Hash(String),
    /// The gateway binary could not be run or failed.
    #[error("thalamus device add-bulk: {0}")]
    Gateway(String),
}

/// One device entry, in the gateway's on-disk format.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    /// Device id.
    pub id: String,
    /// argon2id PHC hash of the secret.
    pub secret_hash: String,
    /// When the device was added (unix seconds).
    #[serde(default)]
    pub created_unix: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    device: Vec<RegistryEntry>,
}

/// What to provision.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    /// Id prefix (`load-` gives `load-0`, `load-1`, ...).
    pub prefix: String,
    /// First number.
    pub first: u32,
    /// How many devices.
    pub count: u32,
    /// The shared secret.
    pub secret: String,
}

impl ProvisionRequest {
    /// The device ids, checked.
    pub fn ids(&self) -> Result<Vec<String>, ProvisionError> {
        if self.count > MAX_PROVISIONED_DEVICES {
            return Err(ProvisionError::TooMany(self.count));
        }
        let end = self.first.saturating_add(self.count);
        (self.first..end)
            .map(|n| {
                let id = format!("{}{n}", self.prefix);
                if valid_device_id(&id) {
                    Ok(id)
                } else {
                    Err(ProvisionError::InvalidId(id))
                }
            })
            .collect()
    }
}

/// Whether `id` is acceptable to the gateway (and a valid SIP user part).
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A fresh random secret: 32 random bytes as 64 hex digits.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The argon2id PHC hash of `secret` with a random salt and the gateway's parameters.
pub fn hash_secret(secret: &str) -> Result<String, ProvisionError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2::Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ProvisionError::Hash(e.to_string()))
}

/// Adds the requested devices to the registry file at `path` (created when missing), all with
/// one hash of the shared secret; one atomic write. Returns the number added.
pub fn provision_registry(path: &Path, request: &ProvisionRequest) -> Result<u32, ProvisionError> {
    let ids = request.ids()?;
    let io = |source| ProvisionError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file: RegistryFile = match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| ProvisionError::Malformed {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => RegistryFile::default(),
        Err(e) => return Err(io(e)),
    };
    let existing: BTreeSet<&str> = file.device.iter().map(|d| d.id.as_str()).collect();
    if let Some(dup) = ids.iter().find(|id| existing.contains(id.as_str())) {
        return Err(ProvisionError::Exists(dup.clone()));
    }
    let secret_hash = hash_secret(&request.secret)?;
    let created_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let added = ids.len() as u32;
    file.device.extend(ids.into_iter().map(|id| RegistryEntry {
        id,
        secret_hash: secret_hash.clone(),
        created_unix,
    }));
    let text = toml::to_string(&file).map_err(|e| ProvisionError::Malformed {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(added)
}

/// The gateway binary: `thalamus` next to this executable when there is one, else from `PATH`.
pub fn default_gateway_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("thalamus")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("thalamus"))
}

/// Runs `<gateway> --config <config> device add-bulk` for the request. Returns the number
/// added.
pub fn provision_with_gateway(
    gateway: &Path,
    config: &Path,
    request: &ProvisionRequest,
) -> Result<u32, ProvisionError> {
    let ids = request.ids()?;
    let out = std::process::Command::new(gateway)
        .arg("--config")
        .arg(config)
        .args(["device", "add-bulk", "--prefix", &request.prefix])
        .args(["--first", &request.first.to_string()])
        .args(["--count", &request.count.to_string()])
        .args(["--secret", &request.secret])
        .env_remove("THALAMUS_CONFIG")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| ProvisionError::Gateway(format!("running {}: {e}", gateway.display())))?;
    if !out.status.success() {
        return Err(ProvisionError::Gateway(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(ids.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHash, PasswordVerifier};

    fn request(count: u32, secret: &str) -> ProvisionRequest {
        ProvisionRequest {
            prefix: "load-".into(),
            first: 0,
            count,
            secret: secret.into(),
        }
    }

    #[test]
    fn writes_entries_whose_hash_verifies_the_shared_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/devices.toml");
        assert_eq!(provision_registry(&path, &request(3, "s3cret")).unwrap(), 3);
        let file: RegistryFile = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let ids: Vec<&str> = file.device.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["load-0", "load-1", "load-2"]);
        let hash = PasswordHash::new(&file.device[2].secret_hash).unwrap();
        assert_eq!(hash.algorithm.as_str(), "argon2id");
        assert!(argon2::Argon2::default()
            .verify_password(b"s3cret", &hash)
            .is_ok());
        assert!(argon2::Argon2::default()
            .verify_password(b"other", &hash)
            .is_err());
        assert!(file.device[0].created_unix > 0);
    }

    #[test]
    fn keeps_existing_devices_and_refuses_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.toml");
        std::fs::write(
            &path,
            "[[device]]\nid = \"earpiece-1\"\nsecret_hash = \"$argon2id$x\"\ncreated_unix = 5\n",
        )
        .unwrap();
        provision_registry(&path, &request(2, "a")).unwrap();
        let file: RegistryFile = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(file.device.len(), 3);
        assert_eq!(file.device[0].id, "earpiece-1");
        let err = provision_registry(&path, &request(1, "a")).unwrap_err();
        assert!(
            matches!(err, ProvisionError::Exists(ref id) if id == "load-0"),
            "{err}"
        );
    }

    #[test]
    fn bad_ids_counts_and_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.toml");
        let mut bad = request(1, "a");
        bad.prefix = "no spaces ".into();
        assert!(matches!(
            provision_registry(&path, &bad),
            Err(ProvisionError::InvalidId(_))
        ));
        assert!(matches!(
            request(MAX_PROVISIONED_DEVICES + 1, "a").ids(),
            Err(ProvisionError::TooMany(_))
        ));
        std::fs::write(&path, "not = [toml").unwrap();
        assert!(matches!(
            provision_registry(&path, &request(1, "a")),
            Err(ProvisionError::Malformed { .. })
        ));
    }

    #[test]
    fn secrets_are_64_hex_digits_and_differ() {
        let (a, b) = (generate_secret(), generate_secret());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
