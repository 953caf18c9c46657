//! The device registry: which devices exist and how to check their credentials.
//!
//! Stored as a TOML file (`[[device]] id = "...", secret_hash = "$argon2id$..."`). Only a slow
//! argon2id hash of each secret is kept; the secret itself is printed once by
//! `thalamus device add` and never stored. The file is re-read when it changes on disk, so a
//! device added while the gateway runs can connect at once. Writes are atomic (temp + rename).
//!
//! Verification is CPU-heavy by design; callers run [`DeviceRegistry::verify`] off the async
//! executor. A successful verification is remembered as a SHA-256 of the secret, so a device
//! that reconnects does not pay the slow hash again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest accepted device id.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// Registry errors.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// File I/O failed.
    #[error("device registry {path}: {source}")]
    Io {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not a valid registry.
    #[error("device registry {path} is malformed: {message}")]
    Malformed {
        /// File path.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// The id is not acceptable.
    #[error("invalid device id {0:?}: use 1-64 characters from [A-Za-z0-9._-]")]
    InvalidId(String),
    /// The device is already registered.
    #[error("device {0} already exists")]
    Exists(String),
    /// The device is not registered.
    #[error("device {0} does not exist")]
    NotFound(String),
    /// Hashing failed.
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// One registered device as stored on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// Device id; also the user part of its SIP address-of-record.
    pub id: String,
    /// PHC string of the argon2id hash of the secret.
    pub secret_hash: String,
    /// When the device was added (unix seconds).
    #[serde(default)]
    pub created_unix: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    device: Vec<DeviceEntry>,
}

#[derive(Debug, Default)]
struct Loaded {
    modified: Option<SystemTime>,
    devices: BTreeMap<String, DeviceEntry>,
    /// SHA-256 of secrets that verified against the current hash, by device id.
    verified: BTreeMap<String, [u8; 32]>,
}

/// Outcome of a credential check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The credential is right.
    Valid,
    /// The device exists and the credential is wrong.
    WrongSecret,
    /// No such device.
    UnknownDevice,
}

/// The device registry backed by a TOML file.
#[derive(Debug)]
pub struct DeviceRegistry {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

/// Whether `id` is an acceptable device id (also a valid SIP user part).
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn hasher() -> Argon2<'static> {
    // argon2id, OWASP's m=19 MiB, t=2, p=1.
    Argon2::default()
}

impl DeviceRegistry {
    /// Opens (not yet reads) the registry at `path`. A missing file is an empty registry.
    pub fn open(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            loaded: Mutex::new(Loaded::default()),
        }
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read_file(&self) -> Result<(Option<SystemTime>, RegistryFile), RegistryError> {
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok((None, RegistryFile::default()))
            }
            Err(source) => Err(RegistryError::Io {
                path: self.path.clone(),
                source,
            }),
            Ok(meta) => {
                let text =
                    std::fs::read_to_string(&self.path).map_err(|source| RegistryError::Io {
                        path: self.path.clone(),
                        source,
                    })?;
                let file: RegistryFile =
                    toml::from_str(&text).map_err(|e| RegistryError::Malformed {
                        path: self.path.clone(),
                        message: e.to_string(),
                    })?;
                Ok((meta.modified().ok(), file))
            }
        }
    }

    /// Re-reads the file if it changed since the last read.
    pub fn refresh(&self) -> Result<(), RegistryError> {
        let modified = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| m.modified().ok());
        {
            let loaded = self.lock();
            if loaded.modified.is_some() && loaded.modified == modified {
                return Ok(());
            }
        }
        let (modified, file) = self.read_file()?;
        let mut loaded = self.lock();
        let devices: BTreeMap<String, DeviceEntry> =
            file.device.into_iter().map(|d| (d.id.clone(), d)).collect();
        // Keep the verified cache only for devices whose hash did not change.
        let old = std::mem::take(&mut loaded.devices);
        loaded.verified.retain(|id, _| {
            old.get(id).map(|d| &d.secret_hash) == devices.get(id).map(|d| &d.secret_hash)
        });
        loaded.devices = devices;
        loaded.modified = modified;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Number of registered devices (after a refresh).
    pub fn len(&self) -> usize {
        self.lock().devices.len()
    }

    /// Whether no device is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `id` is a registered device.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().devices.contains_key(id)
    }

    /// Every registered device id, sorted.
    pub fn ids(&self) -> Vec<String> {
        self.lock().devices.keys().cloned().collect()
    }

    /// Checks `secret` for `device_id`. Slow (argon2) unless the same secret verified before:
    /// call it from a blocking thread.
    pub fn verify(&self, device_id: &str, secret: &str) -> Result<Verdict, RegistryError> {
        self.refresh()?;
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let hash = {
            let loaded = self.lock();
            let Some(entry) = loaded.devices.get(device_id) else {
                return Ok(Verdict::UnknownDevice);
            };
            if loaded.verified.get(device_id) == Some(&digest) {
                return Ok(Verdict::Valid);
            }
            entry.secret_hash.clone()
        };
        let matches =
            verify_phc(secret.as_bytes(), &hash).map_err(|message| RegistryError::Malformed {
                path: self.path.clone(),
                message: format!("device {device_id}: {message}"),
            })?;
        if matches {
            let mut loaded = self.lock();
            if loaded.devices.get(device_id).map(|d| &d.secret_hash) == Some(&hash) {
                loaded.verified.insert(device_id.to_string(), digest);
            }
            Ok(Verdict::Valid)
        } else {
            Ok(Verdict::WrongSecret)
        }
    }

    /// Adds a device with a new random secret, writes the file, and returns the secret.
    pub fn add(&self, device_id: &str) -> Result<String, RegistryError> {
        let secret = generate_secret();
        self.add_with_secret(device_id, &secret)?;
        Ok(secret)
    }

    /// Adds a device with the given secret (bulk provisioning and tests).
    pub fn add_with_secret(&self, device_id: &str, secret: &str) -> Result<(), RegistryError> {
        self.add_many(&[(device_id.to_string(), secret.to_string())])
    }

    /// Adds several devices in one write.
    pub fn add_many(&self, devices: &[(String, String)]) -> Result<(), RegistryError> {
        let (_, mut file) = self.read_file()?;
        let created_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for (id, secret) in devices {
            if !valid_device_id(id) {
                return Err(RegistryError::InvalidId(id.clone()));
            }
            if file.device.iter().any(|d| &d.id == id) {
                return Err(RegistryError::Exists(id.clone()));
            }
            file.device.push(DeviceEntry {
                id: id.clone(),
                secret_hash: hash_secret(secret)?,
                created_unix,
            });
        }
        self.write_file(&file)?;
        self.refresh()
    }

    /// Adds several devices that share one secret, hashed once (bulk provisioning for load
    /// runs: thousands of devices in one write).
    pub fn add_many_shared(&self, ids: &[String], secret: &str) -> Result<(), RegistryError> {
        let (_, mut file) = self.read_file()?;
        let secret_hash = hash_secret(secret)?;
        let created_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let existing: std::collections::BTreeSet<String> =
            file.device.iter().map(|d| d.id.clone()).collect();
        for id in ids {
            if !valid_device_id(id) {
                return Err(RegistryError::InvalidId(id.clone()));
            }
            if existing.contains(id) {
                return Err(RegistryError::Exists(id.clone()));
            }
            file.device.push(DeviceEntry {
                id: id.clone(),
                secret_hash: secret_hash.clone(),
                created_unix,
            });
        }
        self.write_file(&file)?;
        self.refresh()
    }

    /// Removes a device.
    pub fn remove(&self, device_id: &str) -> Result<(), RegistryError> {
        let (_, mut file) = self.read_file()?;
        let before = file.device.len();
        file.device.retain(|d| d.id != device_id);
        if file.device.len() == before {
            return Err(RegistryError::NotFound(device_id.into()));
        }
        self.write_file(&file)?;
        self.refresh()
    }

    fn write_file(&self, file: &RegistryFile) -> Result<(), RegistryError> {
        let io = |source| RegistryError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text = toml::to_string(file).map_err(|e| RegistryError::Malformed {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        let tmp = self
            .path
            .with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }
}

thread_local! {
    /// Argon2 working memory, reused by each thread across verifications: allocating ~19 MiB
    /// per check costs page faults, and freed blocks pile up in per-thread malloc arenas.
    static SCRATCH: std::cell::RefCell<Vec<argon2::Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Checks `secret` against a PHC argon2 hash string, reusing this thread's working memory.
fn verify_phc(secret: &[u8], phc: &str) -> Result<bool, String> {
    let parsed = PasswordHash::new(phc).map_err(|e| e.to_string())?;
    let algorithm = argon2::Algorithm::try_from(parsed.algorithm).map_err(|e| e.to_string())?;
    let version = match parsed.version {
        Some(v) => argon2::Version::try_from(v).map_err(|e| e.to_string())?,
        None => argon2::Version::default(),
    };
    let params = argon2::Params::try_from(&parsed).map_err(|e| e.to_string())?;
    let expected = parsed.hash.ok_or("hash string has no hash")?;
    let salt = parsed.salt.ok_or("hash string has no salt")?;
    let mut salt_buf = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_buf).map_err(|e| e.to_string())?;
    let blocks = params.block_count();
    if blocks > 1 << 20 {
        return Err("argon2 memory cost above 1 GiB".into());
    }
    let argon = Argon2::new(algorithm, version, params);
    let mut out = vec![0u8; expected.len()];
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < blocks {
            scratch.resize(blocks, argon2::Block::default());
        }
        argon
            .hash_password_into_with_memory(secret, salt, &mut out, &mut scratch[..blocks])
            .map_err(|e| e.to_string())
    })?;
    let diff = out
        .iter()
        .zip(expected.as_bytes())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    Ok(diff == 0 && out.len() == expected.len())
}

/// Runs credential checks on a fixed set of threads (one per core by default), so a burst of
/// logins costs bounded memory (one argon2 working set per thread) and cannot starve the async
/// executor. Jobs beyond the queue bound are refused rather than queued without limit.
#[derive(Debug, Clone)]
pub struct VerifierPool {
    jobs: std::sync::mpsc::SyncSender<VerifyJob>,
}

struct VerifyJob {
    registry: std::sync::Arc<DeviceRegistry>,
    device_id: String,
    secret: String,
    reply: tokio::sync::oneshot::Sender<Result<Verdict, RegistryError>>,
}

/// The pool's queue is full.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("too many logins in progress")]
pub struct PoolBusy;

impl VerifierPool {
    /// Starts `threads` workers with a queue of `queue` jobs.
    pub fn start(threads: usize, queue: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<VerifyJob>(queue);
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for n in 0..threads.max(1) {
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("verify-{n}"))
                .spawn(move || loop {
                    let job = {
                        let guard = rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        guard.recv()
                    };
                    let Ok(job) = job else { return };
                    let result = job.registry.verify(&job.device_id, &job.secret);
                    let _ = job.reply.send(result);
                });
        }
        Self { jobs: tx }
    }

    /// Queues a check; the answer arrives on the returned receiver.
    pub fn submit(
        &self,
        registry: std::sync::Arc<DeviceRegistry>,
        device_id: String,
        secret: String,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<Verdict, RegistryError>>, PoolBusy> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .try_send(VerifyJob {
                registry,
                device_id,
                secret,
                reply,
            })
            .map_err(|_| PoolBusy)?;
        Ok(rx)
    }
}

/// A fresh random secret: 32 bytes, base64url without padding.
pub fn generate_secret() -> String {
    loop {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        // A secret that starts with '-' reads as an option on command lines
        // (`--secret -x...`): draw again (one draw in 32 on average).
        if secret.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return secret;
        }
    }
}

/// The argon2id PHC hash of `secret` with a random salt.
pub fn hash_secret(secret: &str) -> Result<String, RegistryError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    hasher()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| RegistryError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_verify_remove() {
        let dir = tempfile::tempdir().unwrap();
        let reg = DeviceRegistry::open(dir.path().join("devices.toml"));
        let secret = reg.add("earpiece-1").unwrap();
        assert_eq!(reg.verify("earpiece-1", &secret).unwrap(), Verdict::Valid);
        // Second time through the cache.
        assert_eq!(reg.verify("earpiece-1", &secret).unwrap(), Verdict::Valid);
        assert_eq!(
            reg.verify("earpiece-1", "wrong").unwrap(),
            Verdict::WrongSecret
        );
        assert_eq!(
            reg.verify("nobody", &secret).unwrap(),
            Verdict::UnknownDevice
        );
        assert!(matches!(
            reg.add("earpiece-1"),
            Err(RegistryError::Exists(_))
        ));
        reg.remove("earpiece-1").unwrap();
        assert_eq!(
            reg.verify("earpiece-1", &secret).unwrap(),
            Verdict::UnknownDevice
        );
    }

    #[test]
    fn the_secret_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.toml");
        let reg = DeviceRegistry::open(&path);
        let secret = reg.add("d1").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&secret));
        assert!(text.contains("$argon2id$"));
    }

    #[test]
    fn another_writer_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.toml");
        let gateway_view = DeviceRegistry::open(&path);
        gateway_view.refresh().unwrap();
        assert!(gateway_view.is_empty());
        let cli_view = DeviceRegistry::open(&path);
        let secret = cli_view.add("late").unwrap();
        assert_eq!(
            gateway_view.verify("late", &secret).unwrap(),
            Verdict::Valid
        );
    }

    #[test]
    fn secrets_never_start_like_an_option() {
        for _ in 0..2_000 {
            let s = generate_secret();
            assert!(s.starts_with(|c: char| c.is_ascii_alphanumeric()), "{s}");
            assert_eq!(s.len(), 43);
        }
    }

    #[test]
    fn ids_are_checked() {
        assert!(valid_device_id("ear-piece_1.a"));
        assert!(!valid_device_id(""));
        assert!(!valid_device_id("a b"));
        assert!(!valid_device_id("a@b"));
        assert!(!valid_device_id(&"x".repeat(65)));
    }

    #[test]
    fn malformed_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.toml");
        std::fs::write(&path, "[[device]]\nid = 3\n").unwrap();
        let reg = DeviceRegistry::open(&path);
        assert!(matches!(
            reg.refresh(),
            Err(RegistryError::Malformed { .. })
        ));
    }
}
