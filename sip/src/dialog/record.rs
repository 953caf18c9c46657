//! [`DialogRecord`]: the explicit, versioned form of a dialog that another node imports to
//! continue it (the gateway replicates it to its dialog store; after a node dies a survivor
//! imports it and answers, for example, the dialog's BYE).
//!
//! The record is a plain serde struct of strings and numbers, not a serialized object graph:
//! URIs are their text, the role and state are words, and a `version` field names the schema.
//! Unknown fields are ignored when deserializing (a newer writer may add some), optional fields
//! may be absent. [`Dialog::import`] validates every field and bounds every length. What is not
//! exported: the ACK kept for re-sending and any 2xx retransmission in progress (both last at
//! most 64*T1, and a node that takes over rebuilds an ACK with [`Dialog::create_ack`]).

use serde::{Deserialize, Serialize};

use crate::message::{NameAddr, Uri};

use super::error::ImportError;
use super::state::{
    is_strict_router, stored_text, tagged_text, text, Dialog, DialogId, DialogState, Role,
    MAX_ROUTE_SET_LEN,
};

/// The record schema version this code writes and reads.
pub const DIALOG_RECORD_VERSION: u32 = 1;

/// Longest text field accepted by [`Dialog::import`], in bytes.
const MAX_FIELD_LEN: usize = 1024;

/// Everything needed to continue a dialog on another node, as plain data (schema version
/// [`DIALOG_RECORD_VERSION`]).
///
/// Serialized with serde (JSON, for example). Name-addr fields are written as in headers
/// (`"Alice" <sip:alice@example.com>;tag=...`); their `tag` parameter is replaced on import by
/// the tag fields, which are authoritative.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialogRecord {
    /// Schema version ([`DIALOG_RECORD_VERSION`]).
    pub version: u32,
    /// The Call-ID.
    pub call_id: String,
    /// Our tag.
    pub local_tag: String,
    /// The peer's tag (empty for an RFC 2543 peer).
    #[serde(default)]
    pub remote_tag: String,
    /// `uac` or `uas`.
    pub role: String,
    /// `early`, `confirmed` or `terminated`.
    pub state: String,
    /// Local URI as a name-addr (the From of our requests).
    pub local_uri: String,
    /// Remote URI as a name-addr (the To of our requests).
    pub remote_uri: String,
    /// Remote target URI (Request-URI of our requests).
    pub remote_target: String,
    /// Route set as name-addrs, in the order of the Route headers of our requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route_set: Vec<String>,
    /// CSeq number of our last request (absent before the first request of a UAS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_cseq: Option<u32>,
    /// Highest CSeq number received from the peer (absent before its first request to a UAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_cseq: Option<u32>,
    /// CSeq number of our latest INVITE in the dialog (the number of its ACK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_invite_cseq: Option<u32>,
    /// CSeq number of the peer's latest INVITE in the dialog (the number of its ACK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_invite_cseq: Option<u32>,
    /// True when the dialog was created by a SIPS Request-URI.
    #[serde(default)]
    pub secure: bool,
    /// Our Contact as a name-addr.
    pub local_contact: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ImportError {
    ImportError::InvalidField {
        field,
        reason: reason.into(),
    }
}

fn bounded<'a>(field: &'static str, value: &'a str) -> Result<&'a str, ImportError> {
    if value.len() > MAX_FIELD_LEN {
        return Err(invalid(field, format!("longer than {MAX_FIELD_LEN} bytes")));
    }
    Ok(value)
}

/// RFC 3261 token characters (tags are tokens).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
                )
        })
}

fn name_addr(field: &'static str, value: &str) -> Result<NameAddr, ImportError> {
    NameAddr::parse(bounded(field, value)?).map_err(|e| ImportError::InvalidUri {
        field,
        reason: e.to_string(),
    })
}

impl Dialog {
    /// The record of this dialog, to be imported on another node.
    pub fn export(&self) -> DialogRecord {
        DialogRecord {
            version: DIALOG_RECORD_VERSION,
            call_id: self.id.call_id.clone(),
            local_tag: self.id.local_tag.clone(),
            remote_tag: self.id.remote_tag.clone(),
            role: self.role.as_str().to_owned(),
            state: self.state.as_str().to_owned(),
            local_uri: text(&self.local_uri).to_owned(),
            remote_uri: text(&self.remote_uri).to_owned(),
            remote_target: self.remote_target.to_string(),
            route_set: self.route_set.iter().map(|r| text(r).to_owned()).collect(),
            local_cseq: self.local_cseq,
            remote_cseq: self.remote_cseq,
            local_invite_cseq: self.local_invite_cseq,
            remote_invite_cseq: self.remote_invite_cseq,
            secure: self.secure,
            local_contact: text(&self.local_contact).to_owned(),
        }
    }

    /// A dialog continued from a record written by [`Dialog::export`] (here or on another
    /// node).
    ///
    /// Fails on an unknown schema version, an unparsable URI or name-addr, an unknown role or
    /// state, a Call-ID or tag that could not appear in a header, a field longer than 1 KiB or
    /// a route set longer than [`MAX_ROUTE_SET_LEN`]. A 2xx to our INVITE arriving after the
    /// import confirms an early UAC dialog; for a confirmed one it is a retransmission (re-send
    /// an ACK built with [`Dialog::create_ack`]).
    pub fn import(record: &DialogRecord) -> Result<Dialog, ImportError> {
        if record.version != DIALOG_RECORD_VERSION {
            return Err(ImportError::UnsupportedVersion {
                found: record.version,
                supported: DIALOG_RECORD_VERSION,
            });
        }
        let call_id = bounded("call_id", &record.call_id)?;
        if call_id.is_empty() || call_id.bytes().any(|b| b <= 0x20 || b >= 0x7f) {
            return Err(invalid("call_id", "not a single visible word"));
        }
        let local_tag = bounded("local_tag", &record.local_tag)?;
        if !is_token(local_tag) {
            return Err(invalid("local_tag", "not a token"));
        }
        let remote_tag = bounded("remote_tag", &record.remote_tag)?;
        if !remote_tag.is_empty() && !is_token(remote_tag) {
            return Err(invalid("remote_tag", "not a token"));
        }
        let role = Role::parse(&record.role)
            .ok_or_else(|| invalid("role", format!("unknown role {:?}", record.role)))?;
        let state = DialogState::parse(&record.state)
            .ok_or_else(|| invalid("state", format!("unknown state {:?}", record.state)))?;
        let local = name_addr("local_uri", &record.local_uri)?;
        let remote = name_addr("remote_uri", &record.remote_uri)?;
        let contact = name_addr("local_contact", &record.local_contact)?;
        let remote_target =
            Uri::parse(bounded("remote_target", &record.remote_target)?).map_err(|e| {
                ImportError::InvalidUri {
                    field: "remote_target",
                    reason: e.to_string(),
                }
            })?;
        if record.route_set.len() > MAX_ROUTE_SET_LEN {
            return Err(invalid(
                "route_set",
                format!("more than {MAX_ROUTE_SET_LEN} entries"),
            ));
        }
        let routes = record
            .route_set
            .iter()
            .map(|r| name_addr("route_set", r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Dialog {
            id: DialogId::new(call_id, local_tag, remote_tag),
            role,
            state,
            secure: record.secure,
            // An early UAC dialog still awaits the 2xx of its INVITE; otherwise a 2xx to our
            // INVITE after the import is a retransmission.
            invite_answered: !(role == Role::Uac && state == DialogState::Early),
            strict_route: routes.first().is_some_and(is_strict_router),
            local_cseq: record.local_cseq,
            remote_cseq: record.remote_cseq,
            local_invite_cseq: record.local_invite_cseq,
            remote_invite_cseq: record.remote_invite_cseq,
            local_uri: tagged_text(local, local_tag),
            remote_uri: tagged_text(remote, remote_tag),
            local_contact: stored_text(&contact),
            remote_target,
            route_set: routes.iter().map(stored_text).collect(),
            sent_ack: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialog::test_support::*;
    use crate::dialog::uas_response;
    use crate::message::Method;

    fn uac() -> Dialog {
        Dialog::new_uac(&request(INVITE), &ok_with_record_route()).unwrap()
    }

    fn uas() -> Dialog {
        let invite = request(INVITE_AT_BOB);
        let ok = uas_response(&invite, 200, None, "b0b7a6", &bob_contact());
        Dialog::new_uas(&invite, &ok).unwrap()
    }

    fn json_round_trip(d: &Dialog) -> Dialog {
        let json = serde_json::to_string(&d.export()).unwrap();
        let record: DialogRecord = serde_json::from_str(&json).unwrap();
        Dialog::import(&record).unwrap()
    }

    #[test]
    fn uac_and_uas_round_trips() {
        for d in [uac(), uas()] {
            let back = json_round_trip(&d);
            assert_eq!(back, d);
            assert_eq!(back.export(), d.export());
        }
        // After requests in both directions, a strict route, a secure flag and an RFC 2543 peer.
        let mut d = uac();
        d.create_request(Method::Info).unwrap();
        d.receive_request(&from_bob("INFO", 12, "")).unwrap();
        assert_eq!(json_round_trip(&d), d);
        let strict = invite_response(
            200,
            "a6c85cf",
            "Record-Route: <sip:p1.example.com>\nContact: <sips:bob@192.0.2.4;transport=tls>\n",
        );
        let invite = request(&INVITE.replace("INVITE sip:bob@", "INVITE sips:bob@"));
        let d = Dialog::new_uac(&invite, &strict).unwrap();
        assert!(d.uses_strict_routing() && d.is_secure());
        let back = json_round_trip(&d);
        assert_eq!(back, d);
        assert!(back.uses_strict_routing() && back.is_secure());
        let invite = request(&INVITE_AT_BOB.replace(";tag=1928301774", ""));
        let ok = uas_response(&invite, 200, None, "b0b7a6", &bob_contact());
        let d = Dialog::new_uas(&invite, &ok).unwrap();
        assert_eq!(json_round_trip(&d), d);
    }

    #[test]
    fn the_record_holds_plain_fields() {
        let record = uac().export();
        let json: serde_json::Value = serde_json::to_value(&record).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["call_id"], "a84b4c76e66710@pc33.atlanta.example.com");
        assert_eq!(json["local_tag"], "1928301774");
        assert_eq!(json["remote_tag"], "a6c85cf");
        assert_eq!(json["role"], "uac");
        assert_eq!(json["state"], "confirmed");
        assert_eq!(
            json["local_uri"],
            "\"Alice A.\" <sip:alice@atlanta.example.com>;tag=1928301774"
        );
        assert_eq!(json["remote_target"], "sip:bob@192.0.2.4");
        assert_eq!(
            json["route_set"],
            serde_json::json!(["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"])
        );
        assert_eq!(json["local_cseq"], 314159);
        assert_eq!(json["local_invite_cseq"], 314159);
        assert!(json.get("remote_cseq").is_none(), "absent while empty");
        assert_eq!(json["secure"], false);
        assert_eq!(
            json["local_contact"],
            "<sip:alice@pc33.atlanta.example.com>"
        );
    }

    #[test]
    fn unknown_fields_are_ignored_and_optional_ones_may_be_absent() {
        let json = r#"{
            "version": 1,
            "call_id": "c1@example.com",
            "local_tag": "l1",
            "role": "uas",
            "state": "confirmed",
            "local_uri": "<sip:bob@example.com>",
            "remote_uri": "<sip:alice@example.com;transport=tcp>;tag=old",
            "remote_target": "sip:alice@192.0.2.1:5070",
            "local_contact": "<sip:bob@192.0.2.4>",
            "owner_node": "node-7",
            "added_in_a_later_version": {"nested": [1, 2]}
        }"#;
        let record: DialogRecord = serde_json::from_str(json).unwrap();
        let d = Dialog::import(&record).unwrap();
        assert_eq!(d.remote_tag(), "");
        assert_eq!(d.local_uri(), "<sip:bob@example.com>;tag=l1");
        assert_eq!(d.remote_uri(), "<sip:alice@example.com;transport=tcp>");
        assert_eq!(d.route_set().len(), 0);
        assert_eq!(d.local_cseq(), None);
        assert!(!d.is_secure());
    }

    #[test]
    fn an_imported_early_uac_dialog_is_confirmed_by_the_2xx() {
        let ringing = invite_response(180, "a6c85cf", "Contact: <sip:bob@192.0.2.4>\n");
        let early = Dialog::new_uac(&request(INVITE), &ringing).unwrap();
        let mut d = json_round_trip(&early);
        assert_eq!(d, early);
        assert_eq!(
            d.receive_response(&ok_with_record_route()),
            crate::dialog::ResponseOutcome::InviteAccepted
        );
        assert_eq!(d.state(), DialogState::Confirmed);
        assert_eq!(d.route_set().len(), 2);
    }

    #[test]
    fn the_tag_fields_win_over_tags_in_the_uris() {
        let mut record = uac().export();
        record.local_uri = "<sip:alice@atlanta.example.com>;tag=stale".into();
        let d = Dialog::import(&record).unwrap();
        assert_eq!(
            d.local_uri(),
            "<sip:alice@atlanta.example.com>;tag=1928301774"
        );
    }

    #[test]
    fn import_errors() {
        let good = uac().export();
        let mut r = good.clone();
        r.version = 2;
        assert_eq!(
            Dialog::import(&r),
            Err(ImportError::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        );
        type Edit = fn(&mut DialogRecord);
        let uri_errors: [(&str, Edit); 5] = [
            ("remote_target", |r| r.remote_target = "sip:".into()),
            ("local_uri", |r| r.local_uri = "<sip:alice@".into()),
            ("remote_uri", |r| r.remote_uri = "not an address".into()),
            ("local_contact", |r| r.local_contact = String::new()),
            ("route_set", |r| r.route_set.push("<sip:[::1>".into())),
        ];
        for (field, edit) in uri_errors {
            let mut r = good.clone();
            edit(&mut r);
            match Dialog::import(&r) {
                Err(ImportError::InvalidUri { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let field_errors: [(&str, Edit); 7] = [
            ("role", |r| r.role = "proxy".into()),
            ("state", |r| r.state = "Confirmed".into()),
            ("call_id", |r| r.call_id = "two words".into()),
            ("call_id", |r| r.call_id = "x".repeat(MAX_FIELD_LEN + 1)),
            ("local_tag", |r| r.local_tag = String::new()),
            ("remote_tag", |r| r.remote_tag = "a;b".into()),
            ("route_set", |r| {
                r.route_set = vec!["<sip:p.example.com;lr>".into(); MAX_ROUTE_SET_LEN + 1]
            }),
        ];
        for (field, edit) in field_errors {
            let mut r = good.clone();
            edit(&mut r);
            match Dialog::import(&r) {
                Err(ImportError::InvalidField { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(Dialog::import(&good).is_ok());
        // A record missing a required field does not deserialize at all.
        let mut json = serde_json::to_value(&good).unwrap();
        json.as_object_mut().unwrap().remove("remote_target");
        assert!(serde_json::from_value::<DialogRecord>(json).is_err());
    }

    /// Sizes quoted in the module report: run with `--nocapture` to see them.
    #[test]
    fn a_confirmed_dialog_and_its_record_stay_small() {
        let d = uas();
        let inline = std::mem::size_of::<Dialog>();
        let heap = d.estimated_heap_bytes();
        let json = serde_json::to_string(&d.export()).unwrap();
        println!(
            "size_of::<Dialog>() = {inline} B, heap ~{heap} B, record JSON {} B",
            json.len()
        );
        assert!(inline + heap < 2048, "{inline} + {heap}");
        assert!(json.len() < 1024, "{json}");
    }
}
