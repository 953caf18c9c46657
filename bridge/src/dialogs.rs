//! From a live call to its stored record and back: the conversions between the SIP stack's
//! dialog export ([`DialogRecord`]) and the store's [`StoredDialog`], the gateway's application
//! data, and the rules a node applies to a record before it continues the dialog.
//!
//! Rules written down here (and tested without any I/O):
//! - The dialog key is the dialog id seen from the gateway: for a request received, the local
//!   tag is the To tag and the remote tag the From tag ([`key_of_request`]).
//! - Write-ahead of the local CSeq: before an in-dialog request the record is written with the
//!   CSeq that request will use ([`reserve_next_local_cseq`]), so a survivor's next request
//!   uses a higher one even if this node dies right after sending.
//! - A dialog whose local CSeq was never used (a UAS that sent no request yet) is imported with
//!   [`UNUSED_LOCAL_CSEQ_FLOOR`]: the stack starts such a dialog at a random number below 2^30,
//!   which the old owner may have used just before it died, unwritten; the floor is above them
//!   all and stays below 2^31 (RFC 3261 8.1.1.5).
//! - An imported dialog's Contact is replaced by this node's, so its next target refresh
//!   (the re-INVITE that moves the media) points the peer here.
//!
//! - An early record (strategy `early-and-confirmed`) has the same key as the dialog its
//!   incoming call will confirm, and instead of the SIP stack's export it holds the INVITE and
//!   where it came from ([`EARLY_INVITE_FORMAT`], [`early_payload`], [`early_invite_of`]): a
//!   survivor adopts that INVITE's transaction and answers it with the same To tag. The 2xx's
//!   record overwrites it; a final error ends it.
//! - A subscription record (a SIP watcher's subscription to a device's presence) holds the
//!   subscription's dialog with what the notifier keeps about it ([`SUBSCRIPTION_FORMAT`],
//!   [`StoredSubscription`]); its `call_ref` is 0. Its local CSeq is written ahead by a block
//!   of NOTIFYs ([`NOTIFY_CSEQ_BLOCK`]), so a survivor's NOTIFY is numbered above the old
//!   owner's.
//!
//! This module does no I/O: it neither reads the store nor talks to the user agent.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use thalamus_sip::dialog::{DialogId, DialogRecord, DIALOG_RECORD_VERSION};
use thalamus_sip::message::{Message, Method, Request};
use thalamus_sip::peer::{Peer, PeerTransport};

use thalamus_dialog_store::{DialogKey, NegotiatedMedia, SipDialogPayload, StoredDialog};

/// The local CSeq an imported dialog gets when its record has none (see the module notes).
pub const UNUSED_LOCAL_CSEQ_FLOOR: u32 = 1 << 30;

/// NOTIFYs a subscription's record reserves local CSeqs for: its record is written with its
/// local CSeq this far ahead, and again before the block runs out.
pub const NOTIFY_CSEQ_BLOCK: u32 = 32;

/// Largest application data this module encodes or decodes, in bytes.
pub const MAX_APP_DATA_LEN: usize = 8 * 1024;

/// Why a stored record cannot be continued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The SIP payload was written by a format this build does not read.
    #[error("SIP dialog payload format {found} (this build reads {supported})")]
    UnsupportedFormat {
        /// The format found.
        found: u32,
        /// The format this build reads.
        supported: u32,
    },
    /// The SIP payload is not a dialog export.
    #[error("SIP dialog payload: {0}")]
    Malformed(String),
    /// The SIP payload names another dialog than the record's key.
    #[error("SIP dialog payload is for another dialog")]
    KeyMismatch,
}

/// The store key of a dialog id (same three parts).
pub fn key_of_dialog(id: &DialogId) -> DialogKey {
    DialogKey::new(
        id.call_id.clone(),
        id.local_tag.clone(),
        id.remote_tag.clone(),
    )
}

/// The dialog id of a store key.
pub fn dialog_of_key(key: &DialogKey) -> DialogId {
    DialogId::new(
        key.call_id.clone(),
        key.local_tag.clone(),
        key.remote_tag.clone(),
    )
}

/// The key of the dialog a received in-dialog request belongs to: Call-ID, To tag (ours) and
/// From tag (the peer's, empty when absent). `None` without a Call-ID or a To tag.
pub fn key_of_request(request: &Request) -> Option<DialogKey> {
    let call_id = request.headers.call_id().ok()?;
    let local = request.headers.to_tag()?;
    let remote = request.headers.from_tag().unwrap_or_default();
    Some(DialogKey::new(call_id, local, remote))
}

/// What the gateway keeps about a call besides the SIP dialog: replicated under the
/// `confirmed-dialog` strategy (JSON, schema 1), so a node that takes the call over restores
/// it as it was. Every field has a fallback read from the dialog or the SDP, so a record
/// without application data is still continued.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CallAppData {
    /// Schema, 1.
    pub v: u32,
    /// The remote party as shown to the device.
    pub remote_uri: String,
    /// Whether the device placed the call (false: the call came in from SIP).
    pub outgoing: bool,
    /// Whether the device holds the call.
    pub held: bool,
    /// When the call started, ms since the Unix epoch (the first owner's clock; absent in
    /// records of older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// When it was answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_ms: Option<u64>,
    /// The nodes that owned the call before the writer, in order (for the call record).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owners: Vec<String>,
    /// The call's session timer (RFC 4028), when one runs: a node that takes the call over
    /// keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_timer: Option<StoredTimer>,
    /// The device's transfer in progress (its REFER sent, or accepted and not yet reported
    /// done): the request id its progress is reported under, so a node that takes the call over
    /// passes the transferee's NOTIFYs on to the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<u64>,
}

/// A session timer as a record keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTimer {
    /// The session interval, in seconds.
    pub interval: u32,
    /// Whether the gateway refreshes (else the peer does).
    pub gateway_refreshes: bool,
    /// When the session was last refreshed, ms since the Unix epoch (the writer's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreshed_ms: Option<u64>,
}

impl CallAppData {
    /// Encodes as JSON.
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Decodes; `None` for anything that is not schema-1 data within the size limit.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > MAX_APP_DATA_LEN {
            return None;
        }
        serde_json::from_slice::<Self>(bytes)
            .ok()
            .filter(|d| d.v == 1)
    }
}

/// Everything a record holds besides the SIP dialog export.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CallFacts {
    /// The device the call belongs to.
    pub device_id: String,
    /// The device's call reference.
    pub call_ref: u32,
    /// This node's id (the owner).
    pub owner: String,
    /// The ownership epoch this node holds the dialog at (0 when it created it).
    pub epoch: u64,
    /// The store version this node's writes continue from (0: create; after a claim, the
    /// claimed record's version).
    pub base_version: u64,
    /// Negotiated media.
    pub media: NegotiatedMedia,
    /// Application data.
    pub app_data: Option<CallAppData>,
}

/// Builds the stored record of a call from the SIP stack's export and the call's facts.
pub fn to_stored(export: &DialogRecord, facts: &CallFacts) -> StoredDialog {
    let key = DialogKey::new(
        export.call_id.clone(),
        export.local_tag.clone(),
        export.remote_tag.clone(),
    );
    let payload = SipDialogPayload {
        format_version: export.version,
        data: serde_json::to_string(export).unwrap_or_default(),
    };
    stored_with(key, payload, facts)
}

/// The stored record of a call under `key`, with SIP payload `payload` (a dialog export, or an
/// early record's INVITE) and the call's facts.
pub fn stored_with(key: DialogKey, payload: SipDialogPayload, facts: &CallFacts) -> StoredDialog {
    let mut record = StoredDialog::new(
        key,
        payload,
        facts.device_id.clone(),
        facts.call_ref,
        facts.owner.clone(),
    );
    record.media = facts.media.clone();
    record.epoch = facts.epoch;
    record.version = facts.base_version;
    record.app_data = facts.app_data.as_ref().map(CallAppData::encode);
    record
}

/// The SIP payload format of an early record: not a SIP stack export (whose formats count up
/// from 1), so a build that does not know early records refuses to import one.
pub const EARLY_INVITE_FORMAT: u32 = 0x4541_0001;

/// Largest INVITE kept in an early record, in bytes (with its base64 encoding it stays within
/// the store's payload limit).
pub const MAX_EARLY_INVITE_LEN: usize = 32 * 1024;

/// The payload of an early record, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct EarlyInvite {
    /// Schema, 1.
    v: u32,
    /// The INVITE as received, base64.
    invite: String,
    /// Where it came from (UDP: responses go by its Via, from whichever node holds it).
    source: std::net::SocketAddr,
}

/// The SIP payload of an early record for `invite`, received from `source` over UDP; `None`
/// when it is too large or came over TCP (its responses cannot go from another node then).
pub fn early_payload(invite: &Request, source: &Peer) -> Option<SipDialogPayload> {
    use base64::Engine as _;
    if source.transport != PeerTransport::Udp {
        return None;
    }
    let bytes = invite.to_bytes();
    if bytes.len() > MAX_EARLY_INVITE_LEN {
        return None;
    }
    let payload = EarlyInvite {
        v: 1,
        invite: base64::engine::general_purpose::STANDARD.encode(&bytes),
        source: source.addr,
    };
    Some(SipDialogPayload {
        format_version: EARLY_INVITE_FORMAT,
        data: serde_json::to_string(&payload).ok()?,
    })
}

/// The INVITE of an early record and where it came from: `None` when the record is not early,
/// an error when its payload cannot be read or is not an INVITE of the record's dialog
/// (Call-ID and From tag).
pub fn early_invite_of(stored: &StoredDialog) -> Option<Result<(Request, Peer), RecordError>> {
    use base64::Engine as _;
    if stored.sip_dialog.format_version != EARLY_INVITE_FORMAT {
        return None;
    }
    let read = || {
        let payload: EarlyInvite = serde_json::from_str(&stored.sip_dialog.data)
            .map_err(|e| RecordError::Malformed(e.to_string()))?;
        if payload.v != 1 {
            return Err(RecordError::Malformed(format!(
                "early schema {}",
                payload.v
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload.invite.as_bytes())
            .map_err(|e| RecordError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_EARLY_INVITE_LEN {
            return Err(RecordError::Malformed("INVITE too large".into()));
        }
        let request = match Message::parse(Bytes::from(bytes)) {
            Ok(Message::Request(r)) if r.method == Method::Invite => r,
            Ok(_) => return Err(RecordError::Malformed("not an INVITE".into())),
            Err(e) => return Err(RecordError::Malformed(e.to_string())),
        };
        let call_id = request.headers.call_id().ok().map(str::to_string);
        let from_tag = request.headers.from_tag().unwrap_or_default().to_string();
        if call_id.as_deref() != Some(stored.key.call_id.as_str())
            || from_tag != stored.key.remote_tag
            || request.headers.to_tag().is_some()
        {
            return Err(RecordError::KeyMismatch);
        }
        Ok((request, Peer::udp(payload.source)))
    };
    Some(read())
}

/// The SIP payload format of a subscription record (a SIP watcher's subscription to a device's
/// presence): the SIP stack's export of the subscription's dialog and what the notifier keeps
/// about it, so a node that continues a call refuses one (and a build that does not know
/// subscriptions refuses to import it).
pub const SUBSCRIPTION_FORMAT: u32 = 0x5355_0001;

/// What a subscription record holds: the dialog, the device watched, the watcher's address
/// (its limit counts it) and when the subscription expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscription {
    /// Schema, 1.
    pub v: u32,
    /// The event package (`presence`).
    pub package: String,
    /// The watcher's address.
    pub watcher: std::net::IpAddr,
    /// When the subscription expires, ms since the Unix epoch (the writer's clock).
    pub expires_ms: u64,
    /// The SIP stack's export of the subscription's dialog.
    pub dialog: DialogRecord,
}

/// The record of a subscription: `sub` under its dialog's key, for `device`, owned by `owner`
/// at `epoch`, continuing from store version `base_version`.
pub fn subscription_record(
    sub: &StoredSubscription,
    device: &str,
    owner: &str,
    epoch: u64,
    base_version: u64,
) -> StoredDialog {
    let key = DialogKey::new(
        sub.dialog.call_id.clone(),
        sub.dialog.local_tag.clone(),
        sub.dialog.remote_tag.clone(),
    );
    let payload = SipDialogPayload {
        format_version: SUBSCRIPTION_FORMAT,
        data: serde_json::to_string(sub).unwrap_or_default(),
    };
    let mut record = StoredDialog::new(key, payload, device.to_string(), 0, owner.to_string());
    record.epoch = epoch;
    record.version = base_version;
    record
}

/// The subscription of a stored record: `None` when the record is not a subscription, an error
/// when its payload cannot be read or names another dialog.
pub fn subscription_of(stored: &StoredDialog) -> Option<Result<StoredSubscription, RecordError>> {
    if stored.sip_dialog.format_version != SUBSCRIPTION_FORMAT {
        return None;
    }
    let read = || {
        let sub: StoredSubscription = serde_json::from_str(&stored.sip_dialog.data)
            .map_err(|e| RecordError::Malformed(e.to_string()))?;
        if sub.v != 1 {
            return Err(RecordError::Malformed(format!(
                "subscription schema {}",
                sub.v
            )));
        }
        if sub.dialog.version != DIALOG_RECORD_VERSION {
            return Err(RecordError::UnsupportedFormat {
                found: sub.dialog.version,
                supported: DIALOG_RECORD_VERSION,
            });
        }
        if sub.dialog.call_id != stored.key.call_id
            || sub.dialog.local_tag != stored.key.local_tag
            || sub.dialog.remote_tag != stored.key.remote_tag
        {
            return Err(RecordError::KeyMismatch);
        }
        Ok(sub)
    };
    Some(read())
}

/// Reads the SIP dialog export back out of a stored record, checking its format and that it
/// is the record's dialog.
pub fn sip_record_of(stored: &StoredDialog) -> Result<DialogRecord, RecordError> {
    if stored.sip_dialog.format_version != DIALOG_RECORD_VERSION {
        return Err(RecordError::UnsupportedFormat {
            found: stored.sip_dialog.format_version,
            supported: DIALOG_RECORD_VERSION,
        });
    }
    let record: DialogRecord = serde_json::from_str(&stored.sip_dialog.data)
        .map_err(|e| RecordError::Malformed(e.to_string()))?;
    if record.call_id != stored.key.call_id
        || record.local_tag != stored.key.local_tag
        || record.remote_tag != stored.key.remote_tag
    {
        return Err(RecordError::KeyMismatch);
    }
    Ok(record)
}

/// The export with its local CSeq raised to the number the next request will use, and that
/// number; `None` (nothing to write ahead) when no local CSeq was used yet or it cannot grow.
pub fn reserve_next_local_cseq(mut export: DialogRecord) -> Option<(DialogRecord, u32)> {
    let next = export.local_cseq?.checked_add(1)?;
    export.local_cseq = Some(next);
    Some((export, next))
}

/// The transport a stored dialog's local Contact names (`transport=tls` or a `sips:` URI: TLS;
/// `transport=tcp`: TCP; else UDP), and whether it was a `sips:` URI: the node that imports
/// the dialog names its own address the same way, so the peer's requests keep coming over it.
pub fn contact_transport(record: &DialogRecord) -> (thalamus_sip::transport::PeerTransport, bool) {
    use thalamus_sip::transport::PeerTransport;
    let Ok(contact) = thalamus_sip::message::NameAddr::parse(&record.local_contact) else {
        return (PeerTransport::Udp, false);
    };
    let Some(sip) = contact.uri.as_sip() else {
        return (PeerTransport::Udp, false);
    };
    let transport = match sip.transport().map(str::to_ascii_lowercase).as_deref() {
        Some("tls") => PeerTransport::Tls,
        _ if sip.secure => PeerTransport::Tls,
        Some("tcp") => PeerTransport::Tcp,
        _ => PeerTransport::Udp,
    };
    (transport, sip.secure)
}

/// This node's Contact for an imported dialog: the one `ours` makes for the transport
/// [`contact_transport`] names, turned into a `sips:` URI when the dialog's was one.
pub fn import_contact(
    record: &DialogRecord,
    ours: impl FnOnce(thalamus_sip::transport::PeerTransport) -> thalamus_sip::message::NameAddr,
) -> String {
    let (transport, sips) = contact_transport(record);
    let mut contact = ours(transport);
    if let (true, thalamus_sip::message::Uri::Sip(uri)) = (sips, &mut contact.uri) {
        uri.secure = true;
        uri.params.remove("transport");
    }
    contact.to_string()
}

/// A stored dialog made ready for import on this node: the local CSeq floor applied when none
/// was used, and this node's Contact (`local_contact`, a name-addr) in place of the old
/// owner's.
pub fn prepare_for_import(mut record: DialogRecord, local_contact: &str) -> DialogRecord {
    if record.local_cseq.is_none() {
        record.local_cseq = Some(UNUSED_LOCAL_CSEQ_FLOOR);
    }
    record.local_contact = local_contact.to_string();
    record
}

/// The remote party to show the device for a stored dialog: the application data's, else the
/// dialog's remote URI (a name-addr; its URI part).
pub fn remote_uri_of(stored: &StoredDialog, sip: &DialogRecord) -> String {
    if let Some(app) = stored.app_data.as_deref().and_then(CallAppData::decode) {
        if !app.remote_uri.is_empty() {
            return app.remote_uri;
        }
    }
    match thalamus_sip::message::NameAddr::parse(&sip.remote_uri) {
        Ok(addr) => addr.uri.to_string(),
        Err(_) => sip.remote_uri.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_imported_dialog_keeps_its_contact_s_transport() {
        use thalamus_sip::transport::PeerTransport;
        let record = |contact: &str| DialogRecord {
            local_contact: contact.to_string(),
            ..export()
        };
        let ours = |transport| {
            assert_eq!(transport, PeerTransport::Tls);
            "<sip:d@10.0.0.2:5061;transport=tls>".parse().unwrap()
        };
        assert_eq!(
            import_contact(&record("<sips:d@10.0.0.1>"), ours),
            "<sips:d@10.0.0.2:5061>"
        );
        assert_eq!(
            import_contact(&record("<sip:d@10.0.0.1;transport=tls>"), ours),
            "<sip:d@10.0.0.2:5061;transport=tls>"
        );
        for (contact, transport) in [
            ("<sip:d@10.0.0.1:5061;transport=tls>", PeerTransport::Tls),
            ("<sips:d@10.0.0.1>", PeerTransport::Tls),
            ("<sip:d@10.0.0.1;transport=TCP>", PeerTransport::Tcp),
            ("<sip:d@10.0.0.1:5060>", PeerTransport::Udp),
            ("not a contact", PeerTransport::Udp),
        ] {
            assert_eq!(
                contact_transport(&record(contact)).0,
                transport,
                "{contact}"
            );
        }
    }

    fn export() -> DialogRecord {
        DialogRecord {
            version: DIALOG_RECORD_VERSION,
            call_id: "c1@host".into(),
            local_tag: "gw-tag".into(),
            remote_tag: "peer-tag".into(),
            role: "uas".into(),
            state: "confirmed".into(),
            local_uri: "<sip:dev@thalamus.local>;tag=gw-tag".into(),
            remote_uri: "\"Bob\" <sip:bob@example.com>;tag=peer-tag".into(),
            remote_target: "sip:bob@10.0.0.2:5060".into(),
            route_set: vec!["<sip:lb.example;lr;node=a>".into()],
            local_cseq: Some(7),
            remote_cseq: Some(1),
            local_invite_cseq: None,
            remote_invite_cseq: Some(1),
            secure: false,
            local_contact: "<sip:dev@10.0.0.1:5060>".into(),
        }
    }

    fn facts() -> CallFacts {
        CallFacts {
            device_id: "dev".into(),
            call_ref: 0x8000_0001,
            owner: "node-a".into(),
            epoch: 2,
            base_version: 5,
            media: NegotiatedMedia {
                local_sdp: "v=0\r\n".into(),
                remote_sdp: "v=0\r\n".into(),
            },
            app_data: Some(CallAppData {
                v: 1,
                remote_uri: "sip:bob@example.com".into(),
                outgoing: false,
                held: true,
                started_ms: Some(1_700_000_000_000),
                answered_ms: Some(1_700_000_001_000),
                owners: vec!["node-0".into()],
                session_timer: Some(StoredTimer {
                    interval: 1800,
                    gateway_refreshes: true,
                    refreshed_ms: Some(1_700_000_002_000),
                }),
                transfer: Some(9),
            }),
        }
    }

    #[test]
    fn a_record_round_trips_through_the_store_form() {
        let stored = to_stored(&export(), &facts());
        assert_eq!(stored.key, DialogKey::new("c1@host", "gw-tag", "peer-tag"));
        assert_eq!(
            (stored.epoch, stored.version, stored.owner.as_str()),
            (2, 5, "node-a")
        );
        assert!(stored.validate().is_ok());
        let encoded = stored.encode().unwrap();
        let decoded = StoredDialog::decode(&encoded).unwrap();
        assert_eq!(sip_record_of(&decoded).unwrap(), export());
        let app = CallAppData::decode(decoded.app_data.as_deref().unwrap()).unwrap();
        assert!(app.held && !app.outgoing);
        assert_eq!(
            remote_uri_of(&decoded, &export()),
            "sip:bob@example.com".to_string()
        );
    }

    #[test]
    fn bad_payloads_are_refused() {
        let mut stored = to_stored(&export(), &facts());
        stored.sip_dialog.format_version = 9;
        assert!(matches!(
            sip_record_of(&stored),
            Err(RecordError::UnsupportedFormat { found: 9, .. })
        ));
        let mut stored = to_stored(&export(), &facts());
        stored.sip_dialog.data = "{\"call_id\": 3".into();
        assert!(matches!(
            sip_record_of(&stored),
            Err(RecordError::Malformed(_))
        ));
        let mut stored = to_stored(&export(), &facts());
        stored.key.remote_tag = "other".into();
        assert_eq!(sip_record_of(&stored), Err(RecordError::KeyMismatch));
    }

    #[test]
    fn write_ahead_reserves_the_next_cseq() {
        let (reserved, next) = reserve_next_local_cseq(export()).unwrap();
        assert_eq!((reserved.local_cseq, next), (Some(8), 8));
        let mut unused = export();
        unused.local_cseq = None;
        assert!(reserve_next_local_cseq(unused).is_none());
        let mut full = export();
        full.local_cseq = Some(u32::MAX);
        assert!(reserve_next_local_cseq(full).is_none());
    }

    #[test]
    fn import_applies_the_floor_and_our_contact() {
        let mut unused = export();
        unused.local_cseq = None;
        let ready = prepare_for_import(unused, "<sip:dev@10.0.0.9:5060>");
        assert_eq!(ready.local_cseq, Some(UNUSED_LOCAL_CSEQ_FLOOR));
        assert_eq!(ready.local_contact, "<sip:dev@10.0.0.9:5060>");
        // The floor is above any random start the stack picks and below 2^31.
        const { assert!(UNUSED_LOCAL_CSEQ_FLOOR < (1u32 << 31)) };
        let used = prepare_for_import(export(), "<sip:x@y>");
        assert_eq!(used.local_cseq, Some(7));
        // The stack accepts what this module prepares.
        assert!(thalamus_sip::dialog::Dialog::import(&used).is_ok());
    }

    #[test]
    fn request_keys_are_seen_from_the_gateway() {
        let text = "BYE sip:dev@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK1\r\n\
                    From: <sip:bob@example.com>;tag=peer-tag\r\nTo: <sip:dev@thalamus.local>;tag=gw-tag\r\n\
                    Call-ID: c1@host\r\nCSeq: 2 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
        let thalamus_sip::message::Message::Request(request) =
            thalamus_sip::message::Message::parse(text.as_bytes().to_vec()).unwrap()
        else {
            panic!("not a request")
        };
        assert_eq!(
            key_of_request(&request),
            Some(DialogKey::new("c1@host", "gw-tag", "peer-tag"))
        );
        let id = dialog_of_key(&key_of_request(&request).unwrap());
        assert_eq!(key_of_dialog(&id), key_of_request(&request).unwrap());
    }

    #[test]
    fn app_data_is_bounded_and_versioned() {
        assert!(CallAppData::decode(&vec![b' '; MAX_APP_DATA_LEN + 1]).is_none());
        assert!(CallAppData::decode(
            b"{\"v\":2,\"remote_uri\":\"\",\"outgoing\":true,\"held\":false}"
        )
        .is_none());
        assert!(CallAppData::decode(b"not json").is_none());
    }

    fn early_invite() -> Request {
        let text = "INVITE sip:dev-1@gw.example SIP/2.0\r\n\
             Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bK-1\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:bob@example.org>;tag=peer-tag\r\n\
             To: <sip:dev-1@gw.example>\r\n\
             Call-ID: c1@host\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:bob@10.0.0.9:5060>\r\n\
             Content-Length: 0\r\n\r\n";
        match Message::parse(Bytes::from(text)) {
            Ok(Message::Request(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_early_record_carries_its_invite_and_source() {
        let source = Peer::udp("10.0.0.9:5060".parse().unwrap());
        let payload = early_payload(&early_invite(), &source).unwrap();
        assert_eq!(payload.format_version, EARLY_INVITE_FORMAT);
        let mut record = StoredDialog::new(
            DialogKey::new("c1@host", "gw-tag", "peer-tag"),
            payload,
            "dev-1",
            7,
            "gw-1",
        );
        let (invite, from) = early_invite_of(&record).unwrap().unwrap();
        assert_eq!(invite, early_invite());
        assert_eq!(from, source);
        // Not a dialog export: a build that only knows exports refuses it.
        assert!(matches!(
            sip_record_of(&record),
            Err(RecordError::UnsupportedFormat { .. })
        ));
        // An INVITE of another dialog, or a damaged payload, is refused.
        record.key.remote_tag = "other".into();
        assert_eq!(
            early_invite_of(&record).unwrap(),
            Err(RecordError::KeyMismatch)
        );
        record.sip_dialog.data = "{\"v\":1,\"invite\":\"!!\",\"source\":\"10.0.0.9:5060\"}".into();
        assert!(matches!(
            early_invite_of(&record),
            Some(Err(RecordError::Malformed(_)))
        ));
        // A confirmed record is not early; an INVITE over TCP is not kept.
        record.sip_dialog.format_version = DIALOG_RECORD_VERSION;
        assert!(early_invite_of(&record).is_none());
        let tcp = Peer::tcp("10.0.0.9:5060".parse().unwrap());
        assert!(early_payload(&early_invite(), &tcp).is_none());
    }

    #[test]
    fn a_subscription_record_round_trips_and_is_no_call() {
        let sub = StoredSubscription {
            v: 1,
            package: "presence".into(),
            watcher: std::net::IpAddr::from([10, 0, 0, 9]),
            expires_ms: 1_700_000_120_000,
            dialog: export(),
        };
        let record = subscription_record(&sub, "dev", "node-a", 3, 8);
        assert_eq!(record.key, DialogKey::new("c1@host", "gw-tag", "peer-tag"));
        assert_eq!((record.call_ref, record.epoch, record.version), (0, 3, 8));
        assert_eq!(record.device_id, "dev");
        // Through the store's encoding and back.
        let decoded = StoredDialog::decode(&record.encode().unwrap()).unwrap();
        assert_eq!(subscription_of(&decoded), Some(Ok(sub.clone())));
        // A call path reading it refuses it; an early-record reader does not see one.
        assert!(matches!(
            sip_record_of(&decoded),
            Err(RecordError::UnsupportedFormat { .. })
        ));
        assert!(early_invite_of(&decoded).is_none());
        // A call's record is no subscription.
        assert!(subscription_of(&to_stored(&export(), &facts())).is_none());
    }

    #[test]
    fn a_subscription_record_of_another_dialog_or_schema_is_refused() {
        let sub = StoredSubscription {
            v: 1,
            package: "presence".into(),
            watcher: std::net::IpAddr::from([10, 0, 0, 9]),
            expires_ms: 1,
            dialog: export(),
        };
        let mut record = subscription_record(&sub, "dev", "node-a", 0, 0);
        record.key.remote_tag = "other".into();
        assert_eq!(
            subscription_of(&record),
            Some(Err(RecordError::KeyMismatch))
        );
        let newer = StoredSubscription {
            v: 2,
            ..sub.clone()
        };
        let record = subscription_record(&newer, "dev", "node-a", 0, 0);
        assert!(matches!(
            subscription_of(&record),
            Some(Err(RecordError::Malformed(_)))
        ));
        let mut garbled = subscription_record(&sub, "dev", "node-a", 0, 0);
        garbled.sip_dialog.data = "{".into();
        assert!(matches!(
            subscription_of(&garbled),
            Some(Err(RecordError::Malformed(_)))
        ));
    }
}
