//! The replicated dialog record: [`StoredDialog`], its key [`DialogKey`], size limits, and its
//! explicit, versioned JSON encoding (schema [`SCHEMA_VERSION`]).
//!
//! The encoding is a hand-written wire struct with fixed field names, not a serialisation of the
//! in-memory type: renaming a Rust field never changes what is stored, and a record written by a
//! newer schema is refused with [`StoreError::UnsupportedSchema`] instead of being misread.
//! This module does not talk to any store and does not interpret the SIP dialog payload, which
//! the SIP stack produces and reads back (the store treats it as opaque text with its own
//! format version).

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// The record schema this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Largest Call-ID accepted, in bytes.
pub const MAX_CALL_ID_LEN: usize = 1024;
/// Largest local or remote tag accepted, in bytes.
pub const MAX_TAG_LEN: usize = 256;
/// Largest device id or node id accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;
/// Largest SIP dialog payload accepted, in bytes.
pub const MAX_SIP_DIALOG_LEN: usize = 64 * 1024;
/// Largest SDP body (local or remote) accepted, in bytes.
pub const MAX_SDP_LEN: usize = 16 * 1024;
/// Largest application data accepted, in bytes.
pub const MAX_APP_DATA_LEN: usize = 64 * 1024;
/// Largest encoded record accepted when decoding, in bytes (covers every field at its limit, even fully escaped).
pub const MAX_ENCODED_LEN: usize = 1024 * 1024;

/// Identity of one SIP dialog: Call-ID, local tag and remote tag (RFC 3261 §12), seen from the
/// gateway's side.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DialogKey {
    /// The Call-ID header value.
    pub call_id: String,
    /// The gateway's tag (From tag as UAC, To tag as UAS).
    pub local_tag: String,
    /// The peer's tag.
    pub remote_tag: String,
}

impl DialogKey {
    /// A key from its three parts.
    pub fn new(
        call_id: impl Into<String>,
        local_tag: impl Into<String>,
        remote_tag: impl Into<String>,
    ) -> Self {
        Self {
            call_id: call_id.into(),
            local_tag: local_tag.into(),
            remote_tag: remote_tag.into(),
        }
    }

    /// Checks the parts: a non-empty Call-ID and every part within its size limit. Tags may be
    /// empty (an RFC 2543 peer may send no From tag).
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.call_id.is_empty() {
            return Err(StoreError::InvalidRecord("empty Call-ID".into()));
        }
        check_len("Call-ID", &self.call_id, MAX_CALL_ID_LEN)?;
        check_len("local tag", &self.local_tag, MAX_TAG_LEN)?;
        check_len("remote tag", &self.remote_tag, MAX_TAG_LEN)?;
        Ok(())
    }

    /// The key as one unambiguous string, used as the storage key by every backend: each part
    /// prefixed by its byte length, `<len>:<call-id><len>:<local-tag><len>:<remote-tag>`.
    pub fn storage_key(&self) -> String {
        let mut out = String::with_capacity(
            self.call_id.len() + self.local_tag.len() + self.remote_tag.len() + 16,
        );
        for part in [&self.call_id, &self.local_tag, &self.remote_tag] {
            out.push_str(&part.len().to_string());
            out.push(':');
            out.push_str(part);
        }
        out
    }
}

impl std::fmt::Display for DialogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{};local-tag={};remote-tag={}",
            self.call_id, self.local_tag, self.remote_tag
        )
    }
}

/// Whether a stored dialog is in progress or has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DialogState {
    /// The dialog is confirmed and in progress.
    Live,
    /// The dialog ended (BYE); the record stays for the tombstone TTL so a late retransmission
    /// gets the right answer.
    Tombstone,
}

/// The SIP stack's dialog export, opaque to the store: text (JSON) and the format version the
/// SIP stack gave it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SipDialogPayload {
    /// The SIP stack's own format version of `data`.
    pub format_version: u32,
    /// The exported dialog (URIs, route set, CSeqs, role, ...), as the SIP stack wrote it.
    pub data: String,
}

/// The negotiated media of the dialog: the last offer/answer pair, as SDP text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NegotiatedMedia {
    /// The SDP the gateway sent (its RTP address and codecs).
    pub local_sdp: String,
    /// The SDP the peer sent (where media goes).
    pub remote_sdp: String,
}

/// One replicated dialog, as stored.
///
/// `version`, `updated_at_ms` and `state` are set by the store on every write; the values a
/// caller puts there are ignored by [`DialogStore::put`](crate::DialogStore::put).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDialog {
    /// The record schema version ([`SCHEMA_VERSION`] for records this build writes).
    pub schema_version: u32,
    /// The dialog identity.
    pub key: DialogKey,
    /// The SIP stack's dialog export (opaque here).
    pub sip_dialog: SipDialogPayload,
    /// The device the dialog belongs to (the index by device uses it).
    pub device_id: String,
    /// The device's reference for the call (MBFP `call_ref`).
    pub call_ref: u32,
    /// The negotiated media.
    pub media: NegotiatedMedia,
    /// The node that owns the dialog (runs its timers and answers it).
    pub owner: String,
    /// Ownership epoch: raised by one on every successful claim.
    pub epoch: u64,
    /// Record version: raised by one on every write (put, claim, delete).
    pub version: u64,
    /// When the record was last written, milliseconds since the Unix epoch (the writer's clock).
    pub updated_at_ms: u64,
    /// Application data replicated with the dialog (absent under the
    /// `confirmed-dialog-no-app-data` strategy).
    pub app_data: Option<Bytes>,
    /// Live or tombstone.
    pub state: DialogState,
}

impl StoredDialog {
    /// A new live record at version 0 (not yet stored) with the current schema version, no
    /// application data, and empty media.
    pub fn new(
        key: DialogKey,
        sip_dialog: SipDialogPayload,
        device_id: impl Into<String>,
        call_ref: u32,
        owner: impl Into<String>,
    ) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            key,
            sip_dialog,
            device_id: device_id.into(),
            call_ref,
            media: NegotiatedMedia::default(),
            owner: owner.into(),
            epoch: 0,
            version: 0,
            updated_at_ms: 0,
            app_data: None,
            state: DialogState::Live,
        }
    }

    /// Whether the record is live (not a tombstone).
    pub fn is_live(&self) -> bool {
        self.state == DialogState::Live
    }

    /// Checks every field against its limit; device and owner ids must be non-empty.
    pub fn validate(&self) -> Result<(), StoreError> {
        self.key.validate()?;
        if self.schema_version != SCHEMA_VERSION {
            return Err(StoreError::UnsupportedSchema {
                found: self.schema_version,
                supported: SCHEMA_VERSION,
            });
        }
        if self.device_id.is_empty() {
            return Err(StoreError::InvalidRecord("empty device id".into()));
        }
        if self.owner.is_empty() {
            return Err(StoreError::InvalidRecord("empty owner node id".into()));
        }
        check_len("device id", &self.device_id, MAX_ID_LEN)?;
        check_len("owner node id", &self.owner, MAX_ID_LEN)?;
        check_len(
            "SIP dialog payload",
            &self.sip_dialog.data,
            MAX_SIP_DIALOG_LEN,
        )?;
        check_len("local SDP", &self.media.local_sdp, MAX_SDP_LEN)?;
        check_len("remote SDP", &self.media.remote_sdp, MAX_SDP_LEN)?;
        if let Some(data) = &self.app_data {
            if data.len() > MAX_APP_DATA_LEN {
                return Err(StoreError::InvalidRecord(format!(
                    "application data is {} bytes, limit {MAX_APP_DATA_LEN}",
                    data.len()
                )));
            }
        }
        Ok(())
    }

    /// Encodes the record as schema-1 JSON.
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let wire = WireRecordV1 {
            schema: SCHEMA_VERSION,
            call_id: self.key.call_id.clone(),
            local_tag: self.key.local_tag.clone(),
            remote_tag: self.key.remote_tag.clone(),
            sip_dialog: WireSipDialog {
                format_version: self.sip_dialog.format_version,
                data: self.sip_dialog.data.clone(),
            },
            device_id: self.device_id.clone(),
            call_ref: self.call_ref,
            media: WireMedia {
                local_sdp: self.media.local_sdp.clone(),
                remote_sdp: self.media.remote_sdp.clone(),
            },
            owner: self.owner.clone(),
            epoch: self.epoch,
            version: self.version,
            updated_at_ms: self.updated_at_ms,
            app_data: self
                .app_data
                .as_ref()
                .map(|d| base64::engine::general_purpose::STANDARD.encode(d)),
            state: match self.state {
                DialogState::Live => WireState::Live,
                DialogState::Tombstone => WireState::Tombstone,
            },
        };
        serde_json::to_vec(&wire).map_err(|e| StoreError::Corrupt(format!("encode: {e}")))
    }

    /// Decodes a record written by [`StoredDialog::encode`]; a record of another schema version
    /// is refused with [`StoreError::UnsupportedSchema`], malformed bytes with
    /// [`StoreError::Corrupt`].
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        if bytes.len() > MAX_ENCODED_LEN {
            return Err(StoreError::Corrupt(format!(
                "encoded record is {} bytes, limit {MAX_ENCODED_LEN}",
                bytes.len()
            )));
        }
        let probe: SchemaProbe = serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Corrupt(format!("decode: {e}")))?;
        if probe.schema != SCHEMA_VERSION {
            return Err(StoreError::UnsupportedSchema {
                found: probe.schema,
                supported: SCHEMA_VERSION,
            });
        }
        let wire: WireRecordV1 = serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Corrupt(format!("decode: {e}")))?;
        let app_data = match wire.app_data {
            None => None,
            Some(text) => Some(Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(text.as_bytes())
                    .map_err(|e| StoreError::Corrupt(format!("app_data: {e}")))?,
            )),
        };
        Ok(Self {
            schema_version: wire.schema,
            key: DialogKey {
                call_id: wire.call_id,
                local_tag: wire.local_tag,
                remote_tag: wire.remote_tag,
            },
            sip_dialog: SipDialogPayload {
                format_version: wire.sip_dialog.format_version,
                data: wire.sip_dialog.data,
            },
            device_id: wire.device_id,
            call_ref: wire.call_ref,
            media: NegotiatedMedia {
                local_sdp: wire.media.local_sdp,
                remote_sdp: wire.media.remote_sdp,
            },
            owner: wire.owner,
            epoch: wire.epoch,
            version: wire.version,
            updated_at_ms: wire.updated_at_ms,
            app_data,
            state: match wire.state {
                WireState::Live => DialogState::Live,
                WireState::Tombstone => DialogState::Tombstone,
            },
        })
    }
}

fn check_len(what: &str, value: &str, limit: usize) -> Result<(), StoreError> {
    if value.len() > limit {
        return Err(StoreError::InvalidRecord(format!(
            "{what} is {} bytes, limit {limit}",
            value.len()
        )));
    }
    Ok(())
}

/// Reads only the schema number, so a newer record is refused before its fields are parsed.
#[derive(Deserialize)]
struct SchemaProbe {
    schema: u32,
}

/// Schema 1 on the wire. Field names here are the stored format: never rename them.
#[derive(Serialize, Deserialize)]
struct WireRecordV1 {
    schema: u32,
    call_id: String,
    local_tag: String,
    remote_tag: String,
    sip_dialog: WireSipDialog,
    device_id: String,
    call_ref: u32,
    media: WireMedia,
    owner: String,
    epoch: u64,
    version: u64,
    updated_at_ms: u64,
    /// Standard base64, or absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    app_data: Option<String>,
    state: WireState,
}

#[derive(Serialize, Deserialize)]
struct WireSipDialog {
    format_version: u32,
    data: String,
}

#[derive(Serialize, Deserialize)]
struct WireMedia {
    local_sdp: String,
    remote_sdp: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum WireState {
    Live,
    Tombstone,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredDialog {
        let mut r = StoredDialog::new(
            DialogKey::new("a84b4c76e66710@pc33", "1928301774", "a6c85cf"),
            SipDialogPayload {
                format_version: 3,
                data: r#"{"route_set":["<sip:lb;lr>"],"local_cseq":4}"#.into(),
            },
            "earpiece-1",
            7,
            "node-a",
        );
        r.media.local_sdp = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\n".into();
        r.media.remote_sdp = "v=0\r\no=- 2 2 IN IP4 10.0.0.2\r\n".into();
        r.epoch = 4;
        r.version = 9;
        r.updated_at_ms = 1_700_000_000_123;
        r.app_data = Some(Bytes::from_static(&[0, 1, 2, 255]));
        r
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let r = sample();
        let bytes = r.encode().unwrap();
        assert_eq!(StoredDialog::decode(&bytes).unwrap(), r);
        let mut t = r.clone();
        t.state = DialogState::Tombstone;
        t.app_data = None;
        assert_eq!(StoredDialog::decode(&t.encode().unwrap()).unwrap(), t);
    }

    #[test]
    fn wire_names_are_fixed() {
        let text = String::from_utf8(sample().encode().unwrap()).unwrap();
        for name in [
            "\"schema\":1",
            "\"call_id\":\"a84b4c76e66710@pc33\"",
            "\"local_tag\":",
            "\"remote_tag\":",
            "\"sip_dialog\":{\"format_version\":3",
            "\"device_id\":\"earpiece-1\"",
            "\"call_ref\":7",
            "\"owner\":\"node-a\"",
            "\"epoch\":4",
            "\"version\":9",
            "\"updated_at_ms\":1700000000123",
            "\"app_data\":\"AAEC/w==\"",
            "\"state\":\"live\"",
        ] {
            assert!(text.contains(name), "{name} missing in {text}");
        }
    }

    #[test]
    fn newer_schema_is_refused() {
        let text = String::from_utf8(sample().encode().unwrap())
            .unwrap()
            .replace("\"schema\":1", "\"schema\":2");
        assert_eq!(
            StoredDialog::decode(text.as_bytes()),
            Err(StoreError::UnsupportedSchema {
                found: 2,
                supported: 1
            })
        );
    }

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"{\"schema\":1}",
            b"{\"schema\":\"one\"}",
        ] {
            assert!(matches!(
                StoredDialog::decode(bad),
                Err(StoreError::Corrupt(_))
            ));
        }
        let text = String::from_utf8(sample().encode().unwrap())
            .unwrap()
            .replace("AAEC/w==", "!!!");
        assert!(matches!(
            StoredDialog::decode(text.as_bytes()),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            StoredDialog::decode(&vec![b' '; MAX_ENCODED_LEN + 1]),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn storage_key_is_unambiguous() {
        let a = DialogKey::new("ab", "c", "");
        let b = DialogKey::new("a", "bc", "");
        assert_ne!(a.storage_key(), b.storage_key());
        assert_eq!(a.storage_key(), "2:ab1:c0:");
        let c = DialogKey::new("1:a", "", "");
        let d = DialogKey::new("1", "a", "");
        assert_ne!(c.storage_key(), d.storage_key());
    }

    #[test]
    fn validation_enforces_limits() {
        assert!(sample().validate().is_ok());
        let mut r = sample();
        r.key.call_id.clear();
        assert!(matches!(r.validate(), Err(StoreError::InvalidRecord(_))));
        let mut r = sample();
        r.device_id.clear();
        assert!(matches!(r.validate(), Err(StoreError::InvalidRecord(_))));
        let mut r = sample();
        r.owner = "n".repeat(MAX_ID_LEN + 1);
        assert!(matches!(r.validate(), Err(StoreError::InvalidRecord(_))));
        let mut r = sample();
        r.media.remote_sdp = "x".repeat(MAX_SDP_LEN + 1);
        assert!(matches!(r.validate(), Err(StoreError::InvalidRecord(_))));
        let mut r = sample();
        r.app_data = Some(Bytes::from(vec![0u8; MAX_APP_DATA_LEN + 1]));
        assert!(matches!(r.validate(), Err(StoreError::InvalidRecord(_))));
        let mut r = sample();
        r.schema_version = 2;
        assert!(matches!(
            r.validate(),
            Err(StoreError::UnsupportedSchema { .. })
        ));
    }
}
