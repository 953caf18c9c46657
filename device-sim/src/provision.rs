//! `thalamus-sim provision`: creates many test devices (`<prefix><n>`) that share one secret,
//! for load runs.
//!
//! Two ways in: [`provision_registry`] writes the gateway's registry file directly through the
//! `thalamus-registry` crate (the file format, id rule and argon2id parameters the gateway
//! uses), hashing the shared secret once; [`provision_with_gateway`] runs the gateway binary's
//! `thalamus --config FILE device add-bulk`, which finds the registry from the gateway's own
//! configuration. Existing devices are kept; an id that is already there is refused.
//!
//! It does not talk to a running gateway (the gateway re-reads the file when it changes) and
//! does not remove devices.

use std::path::{Path, PathBuf};

use thalamus_registry::{hash_secret, DeviceRecord, FormatError, RegistryFile};

pub use thalamus_registry::{generate_secret, valid_device_id};

/// Most devices one call provisions (a registry of a million entries is ~150 MB of TOML).
pub const MAX_PROVISIONED_DEVICES: u32 = 1_000_000;

/// Provisioning errors.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// Reading, parsing or writing the registry failed, an id is invalid or already there, or
    /// hashing the secret failed.
    #[error(transparent)]
    Registry(#[from] FormatError),
    /// Too many devices asked for.
    #[error("at most {MAX_PROVISIONED_DEVICES} devices at once (asked for {0})")]
    TooMany(u32),
    /// The gateway binary could not be run or failed.
    #[error("thalamus device add-bulk: {0}")]
    Gateway(String),
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
                    Err(FormatError::InvalidId(id).into())
                }
            })
            .collect()
    }
}

/// Adds the requested devices to the registry file at `path` (created when missing), all with
/// one hash of the shared secret; one atomic write. Returns the number added.
pub fn provision_registry(path: &Path, request: &ProvisionRequest) -> Result<u32, ProvisionError> {
    let ids = request.ids()?;
    let mut file = RegistryFile::read(path)?;
    let secret_hash = hash_secret(&request.secret)?;
    let added = ids.len() as u32;
    file.add(
        ids.into_iter()
            .map(|id| DeviceRecord::created_now(id, secret_hash.as_str())),
    )?;
    file.write(path)?;
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
    use thalamus_registry::verify_secret;

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
        let file = RegistryFile::read(&path).unwrap();
        let ids: Vec<&str> = file.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["load-0", "load-1", "load-2"]);
        let hash = &file.devices[2].secret_hash;
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_secret("s3cret", hash).unwrap());
        assert!(!verify_secret("other", hash).unwrap());
        assert!(file.devices[0].created_unix > 0);
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
        let file = RegistryFile::read(&path).unwrap();
        assert_eq!(file.devices.len(), 3);
        assert_eq!(file.devices[0].id, "earpiece-1");
        assert_eq!(file.devices[0].created_unix, 5);
        let err = provision_registry(&path, &request(1, "a")).unwrap_err();
        assert!(
            matches!(err, ProvisionError::Registry(FormatError::Exists(ref id)) if id == "load-0"),
            "{err}"
        );
        assert_eq!(RegistryFile::read(&path).unwrap(), file);
    }

    #[test]
    fn bad_ids_counts_and_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.toml");
        let mut bad = request(1, "a");
        bad.prefix = "no spaces ".into();
        assert!(matches!(
            provision_registry(&path, &bad),
            Err(ProvisionError::Registry(FormatError::InvalidId(_)))
        ));
        assert!(!path.exists());
        assert!(matches!(
            request(MAX_PROVISIONED_DEVICES + 1, "a").ids(),
            Err(ProvisionError::TooMany(_))
        ));
        std::fs::write(&path, "not = [toml").unwrap();
        let err = provision_registry(&path, &request(1, "a")).unwrap_err();
        assert!(
            matches!(err, ProvisionError::Registry(FormatError::Malformed { .. })),
            "{err:?}"
        );
        assert!(err.to_string().contains("devices.toml"), "{err}");
    }
}
