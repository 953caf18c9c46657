//! The device registry: which devices exist and how to check their credentials.
//!
//! The file format, the id rule, argon2id hashing and the atomic file writes are the
//! `thalamus-registry` crate's (shared with the simulator's `provision`); this module adds what
//! a running gateway needs on top. The file is re-read when it changes on disk, so a device
//! added while the gateway runs can connect at once. Only a slow argon2id hash of each secret
//! is kept; the secret itself is printed once by `thalamus device add` and never stored.
//!
//! Verification is CPU-heavy by design; callers run [`DeviceRegistry::verify`] off the async
//! executor, through a [`VerifierPool`]. A successful verification is remembered as a SHA-256
//! of the secret, so a device that reconnects does not pay the slow hash again.
//!
//! It does not parse or write the file itself, and does not lock against another writer (the
//! last atomic rename wins).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use thalamus_registry::{verify_secret, FormatError, RegistryFile};

pub use thalamus_registry::{
    generate_secret, hash_secret, valid_device_id, DeviceRecord, MAX_DEVICE_ID_LEN,
};

/// Registry errors.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Reading, parsing, changing or writing the file failed, or a hash is unusable.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The device is not registered.
    #[error("device {0} does not exist")]
    NotFound(String),
}

#[derive(Debug, Default)]
struct Loaded {
    modified: Option<SystemTime>,
    devices: BTreeMap<String, DeviceRecord>,
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
    /// argon2 checks run so far (known and unknown ids alike).
    slow_checks: std::sync::atomic::AtomicU64,
}

/// A hash no secret is expected to match, made once with the registry's argon2 parameters:
/// checking a credential of an unknown id against it costs what a known id costs, so the
/// answer's timing does not say whether an id exists.
fn decoy_hash() -> Option<&'static str> {
    static DECOY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    DECOY
        .get_or_init(|| hash_secret(&generate_secret()).ok())
        .as_deref()
}

impl DeviceRegistry {
    /// Opens (not yet reads) the registry at `path`. A missing file is an empty registry.
    pub fn open(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            loaded: Mutex::new(Loaded::default()),
            slow_checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
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
        let (file, modified) = RegistryFile::read_with_modified(&self.path)?;
        let mut loaded = self.lock();
        let devices: BTreeMap<String, DeviceRecord> = file
            .devices
            .into_iter()
            .map(|d| (d.id.clone(), d))
            .collect();
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

    /// Whether `secret` is one that verified for `device_id` before (a SHA-256 compare, no
    /// argon2): `Some(Valid)` then, `None` when only the slow check can tell. Cheap enough to
    /// run on the executor before queueing for the slow check.
    pub fn check_cached(&self, device_id: &str, secret: &str) -> Option<Verdict> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        (self.lock().verified.get(device_id) == Some(&digest)).then_some(Verdict::Valid)
    }

    /// argon2 checks run so far (for tests and metrics).
    pub fn slow_checks(&self) -> u64 {
        self.slow_checks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Checks `secret` for `device_id`. Slow (argon2) unless the same secret verified before:
    /// call it from a blocking thread. An unknown id costs the same argon2 check as a known
    /// one (against a decoy hash), so timing reveals nothing.
    pub fn verify(&self, device_id: &str, secret: &str) -> Result<Verdict, RegistryError> {
        self.refresh()?;
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let hash = {
            let loaded = self.lock();
            match loaded.devices.get(device_id) {
                None => None,
                Some(_) if loaded.verified.get(device_id) == Some(&digest) => {
                    return Ok(Verdict::Valid);
                }
                Some(entry) => Some(entry.secret_hash.clone()),
            }
        };
        self.slow_checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(hash) = hash else {
            if let Some(decoy) = decoy_hash() {
                let _ = verify_secret(secret, decoy);
            }
            return Ok(Verdict::UnknownDevice);
        };
        let matches = verify_secret(secret, &hash).map_err(|e| FormatError::Malformed {
            path: self.path.clone(),
            message: format!("device {device_id}: {e}"),
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

    /// Adds several devices (id, secret) in one write: all or none.
    pub fn add_many(&self, devices: &[(String, String)]) -> Result<(), RegistryError> {
        let mut file = RegistryFile::read(&self.path)?;
        let records = devices
            .iter()
            .map(|(id, secret)| Ok(DeviceRecord::created_now(id, hash_secret(secret)?)))
            .collect::<Result<Vec<_>, FormatError>>()?;
        file.add(records)?;
        self.write(&file)
    }

    /// Adds several devices that share one secret, hashed once (bulk provisioning for load
    /// runs: thousands of devices in one write); all or none.
    pub fn add_many_shared(&self, ids: &[String], secret: &str) -> Result<(), RegistryError> {
        let mut file = RegistryFile::read(&self.path)?;
        let secret_hash = hash_secret(secret)?;
        file.add(
            ids.iter()
                .map(|id| DeviceRecord::created_now(id, secret_hash.as_str())),
        )?;
        self.write(&file)
    }

    /// Removes a device.
    pub fn remove(&self, device_id: &str) -> Result<(), RegistryError> {
        let mut file = RegistryFile::read(&self.path)?;
        if !file.remove(device_id) {
            return Err(RegistryError::NotFound(device_id.into()));
        }
        self.write(&file)
    }

    /// Writes `file` (atomically) and reads it back into the cache.
    fn write(&self, file: &RegistryFile) -> Result<(), RegistryError> {
        file.write(&self.path)?;
        self.refresh()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_verify_remove() {
        let dir = tempfile::tempdir().unwrap();
        let reg = DeviceRegistry::open(dir.path().join("devices.toml"));
        let secret = reg.add("earpiece-1").unwrap();
        assert_eq!(reg.check_cached("earpiece-1", &secret), None);
        assert_eq!(reg.verify("earpiece-1", &secret).unwrap(), Verdict::Valid);
        assert_eq!(reg.slow_checks(), 1);
        // Second time through the cache, which the fast check also sees.
        assert_eq!(reg.verify("earpiece-1", &secret).unwrap(), Verdict::Valid);
        assert_eq!(reg.slow_checks(), 1);
        assert_eq!(
            reg.check_cached("earpiece-1", &secret),
            Some(Verdict::Valid)
        );
        assert_eq!(reg.check_cached("earpiece-1", "wrong"), None);
        assert_eq!(
            reg.verify("earpiece-1", "wrong").unwrap(),
            Verdict::WrongSecret
        );
        assert_eq!(reg.slow_checks(), 2);
        // An unknown id pays the same argon2 check as a known one.
        assert_eq!(
            reg.verify("nobody", &secret).unwrap(),
            Verdict::UnknownDevice
        );
        assert_eq!(reg.slow_checks(), 3);
        assert!(matches!(
            reg.add("earpiece-1"),
            Err(RegistryError::Format(FormatError::Exists(_)))
        ));
        reg.remove("earpiece-1").unwrap();
        assert_eq!(
            reg.verify("earpiece-1", &secret).unwrap(),
            Verdict::UnknownDevice
        );
        assert!(matches!(
            reg.remove("earpiece-1"),
            Err(RegistryError::NotFound(_))
        ));
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
    fn bulk_adds_are_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let reg = DeviceRegistry::open(dir.path().join("devices.toml"));
        reg.add_with_secret("a", "s").unwrap();
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(matches!(
            reg.add_many_shared(&ids(&["b", "a"]), "s"),
            Err(RegistryError::Format(FormatError::Exists(id))) if id == "a"
        ));
        assert!(matches!(
            reg.add_many_shared(&ids(&["c", "c"]), "s"),
            Err(RegistryError::Format(FormatError::Exists(id))) if id == "c"
        ));
        assert!(matches!(
            reg.add_many_shared(&ids(&["d", "no spaces"]), "s"),
            Err(RegistryError::Format(FormatError::InvalidId(_)))
        ));
        assert_eq!(reg.ids(), ["a"]);
        reg.add_many_shared(&ids(&["b", "c"]), "shared").unwrap();
        assert_eq!(reg.ids(), ["a", "b", "c"]);
        assert_eq!(reg.verify("c", "shared").unwrap(), Verdict::Valid);
        assert_eq!(reg.verify("a", "shared").unwrap(), Verdict::WrongSecret);
    }

    #[test]
    fn an_unusable_hash_is_an_error_naming_the_file_and_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.toml");
        std::fs::write(&path, "[[device]]\nid = \"d1\"\nsecret_hash = \"plain\"\n").unwrap();
        let reg = DeviceRegistry::open(&path);
        let err = reg.verify("d1", "x").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("devices.toml") && text.contains("device d1"),
            "{text}"
        );
    }

    #[test]
    fn malformed_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.toml");
        std::fs::write(&path, "[[device]]\nid = 3\n").unwrap();
        let reg = DeviceRegistry::open(&path);
        let err = reg.refresh().unwrap_err();
        assert!(
            matches!(&err, RegistryError::Format(FormatError::Malformed { path: p, .. }) if p == &path),
            "{err:?}"
        );
        assert!(err.to_string().contains("devices.toml"), "{err}");
    }
}
