//! The registry file: its records, reading it from disk and writing it back atomically.
//!
//! It does not hash or verify secrets (see `secret`), keep the file in memory between calls,
//! or notice when another process changes the file: the caller reads again when it wants
//! fresh contents.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::{valid_device_id, FormatError};

/// Largest registry file read (1 GiB; a million devices take about 150 MB).
pub const MAX_REGISTRY_FILE_BYTES: u64 = 1 << 30;

/// One registered device as stored on disk (a `[[device]]` table).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// Device id; also the user part of its SIP address-of-record.
    pub id: String,
    /// PHC string of the argon2id hash of the secret (see [`crate::hash_secret`]).
    pub secret_hash: String,
    /// When the device was added (unix seconds; 0 when unknown, and when absent from the file).
    #[serde(default)]
    pub created_unix: u64,
}

impl DeviceRecord {
    /// A record for `id` with an already hashed secret, added now.
    pub fn created_now(id: impl Into<String>, secret_hash: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            secret_hash: secret_hash.into(),
            created_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

/// The whole registry file: every device in file order.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryFile {
    /// The devices, in file order.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceRecord>,
}

impl RegistryFile {
    /// Parses registry text. The error is the TOML parser's message.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The file's text.
    pub fn to_toml(&self) -> Result<String, String> {
        toml::to_string(self).map_err(|e| e.to_string())
    }

    /// Reads the registry at `path`. A missing file is an empty registry.
    pub fn read(path: &Path) -> Result<Self, FormatError> {
        Self::read_with_modified(path).map(|(file, _)| file)
    }

    /// Reads the registry at `path` and returns it with the file's modification time, taken
    /// before reading (so a change made during the read shows as a later time). A missing file
    /// is an empty registry with no time.
    pub fn read_with_modified(path: &Path) -> Result<(Self, Option<SystemTime>), FormatError> {
        let io = |source| FormatError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Self::default(), None))
            }
            Err(e) => return Err(io(e)),
        };
        if meta.len() > MAX_REGISTRY_FILE_BYTES {
            return Err(FormatError::TooLarge {
                path: path.to_path_buf(),
                size: meta.len(),
            });
        }
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Self::default(), None))
            }
            Err(e) => return Err(io(e)),
        };
        let file = Self::parse(&text).map_err(|message| FormatError::Malformed {
            path: path.to_path_buf(),
            message,
        })?;
        Ok((file, meta.modified().ok()))
    }

    /// Writes the registry to `path` atomically: the text goes to a temporary file beside it,
    /// which is then renamed over `path`, so a reader sees the old file or the new one, never
    /// a partial one. Creates the parent folder when missing.
    pub fn write(&self, path: &Path) -> Result<(), FormatError> {
        let io = |source| FormatError::Io {
            path: path.to_path_buf(),
            source,
        };
        let text = self.to_toml().map_err(|message| FormatError::Malformed {
            path: path.to_path_buf(),
            message,
        })?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = temp_path(path);
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io)
    }

    /// Whether a device with this id is in the file.
    pub fn contains(&self, id: &str) -> bool {
        self.devices.iter().any(|d| d.id == id)
    }

    /// Appends `records`, all or none: every id must pass [`valid_device_id`] and be new (not
    /// in the file, not twice among `records`). Returns how many were added.
    pub fn add(
        &mut self,
        records: impl IntoIterator<Item = DeviceRecord>,
    ) -> Result<usize, FormatError> {
        let records: Vec<DeviceRecord> = records.into_iter().collect();
        {
            let mut taken: BTreeSet<&str> = self.devices.iter().map(|d| d.id.as_str()).collect();
            for record in &records {
                if !valid_device_id(&record.id) {
                    return Err(FormatError::InvalidId(record.id.clone()));
                }
                if !taken.insert(record.id.as_str()) {
                    return Err(FormatError::Exists(record.id.clone()));
                }
            }
        }
        let added = records.len();
        self.devices.extend(records);
        Ok(added)
    }

    /// Removes the device `id`. Returns whether it was there.
    pub fn remove(&mut self, id: &str) -> bool {
        let before = self.devices.len();
        self.devices.retain(|d| d.id != id);
        self.devices.len() != before
    }
}

/// The temporary file a write goes through: beside `path`, named after this process.
fn temp_path(path: &Path) -> PathBuf {
    path.with_extension(format!("tmp.{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> DeviceRecord {
        DeviceRecord {
            id: id.into(),
            secret_hash: format!("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$hash-of-{id}"),
            created_unix: 1_700_000_000,
        }
    }

    #[test]
    fn a_written_file_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/devices.toml");
        let mut file = RegistryFile::default();
        assert_eq!(file.add([record("a"), record("b-2")]).unwrap(), 2);
        file.write(&path).unwrap();
        let (back, modified) = RegistryFile::read_with_modified(&path).unwrap();
        assert_eq!(back, file);
        assert!(modified.is_some());
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("devices.toml")]);
    }

    #[test]
    fn the_on_disk_format_is_unchanged() {
        // A file as the gateway wrote it before this crate existed, and one without the
        // optional `created_unix`.
        let text = "[[device]]\nid = \"earpiece-1\"\nsecret_hash = \"$argon2id$v=19$m=19456,t=2,p=1$abc$def\"\ncreated_unix = 5\n\n[[device]]\nid = \"old\"\nsecret_hash = \"h\"\n";
        let file = RegistryFile::parse(text).unwrap();
        assert_eq!(file.devices.len(), 2);
        assert_eq!(file.devices[0].id, "earpiece-1");
        assert_eq!(
            file.devices[0].secret_hash,
            "$argon2id$v=19$m=19456,t=2,p=1$abc$def"
        );
        assert_eq!(file.devices[0].created_unix, 5);
        assert_eq!(file.devices[1].created_unix, 0);
        let written = file.to_toml().unwrap();
        assert!(
            written.starts_with("[[device]]\nid = \"earpiece-1\"\n"),
            "{written}"
        );
        assert_eq!(RegistryFile::parse(&written).unwrap(), file);
        assert_eq!(RegistryFile::parse("").unwrap(), RegistryFile::default());
    }

    #[test]
    fn a_missing_file_is_an_empty_registry() {
        let dir = tempfile::tempdir().unwrap();
        let (file, modified) =
            RegistryFile::read_with_modified(&dir.path().join("none.toml")).unwrap();
        assert!(file.devices.is_empty());
        assert!(modified.is_none());
    }

    #[test]
    fn a_malformed_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("wrong-type.toml", "[[device]]\nid = 3\n"),
            ("not-toml.toml", "not = [toml"),
            (
                "unknown-field.toml",
                "[[device]]\nid = \"a\"\nsecret_hash = \"h\"\nx = 1\n",
            ),
            ("unknown-table.toml", "[devices]\n"),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let err = RegistryFile::read(&path).unwrap_err();
            assert!(
                matches!(&err, FormatError::Malformed { path: p, .. } if p == &path),
                "{err:?}"
            );
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn reading_a_folder_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = RegistryFile::read(dir.path()).unwrap_err();
        assert!(matches!(err, FormatError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    #[test]
    fn add_refuses_bad_and_duplicate_ids_and_changes_nothing() {
        let mut file = RegistryFile::default();
        file.add([record("a")]).unwrap();
        let before = file.clone();
        assert!(matches!(
            file.add([record("b"), record("a")]),
            Err(FormatError::Exists(id)) if id == "a"
        ));
        assert!(matches!(
            file.add([record("c"), record("c")]),
            Err(FormatError::Exists(id)) if id == "c"
        ));
        assert!(matches!(
            file.add([record("d"), record("no spaces")]),
            Err(FormatError::InvalidId(_))
        ));
        assert_eq!(file, before);
        assert!(file.contains("a") && !file.contains("b"));
    }

    #[test]
    fn remove_says_whether_the_device_was_there() {
        let mut file = RegistryFile::default();
        file.add([record("a"), record("b")]).unwrap();
        assert!(file.remove("a"));
        assert!(!file.remove("a"));
        assert_eq!(file.devices, [record("b")]);
    }

    #[test]
    fn created_now_is_a_recent_time() {
        let r = DeviceRecord::created_now("a", "h");
        assert!(r.created_unix > 1_700_000_000);
        assert_eq!((r.id.as_str(), r.secret_hash.as_str()), ("a", "h"));
    }
}
