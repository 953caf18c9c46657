//! One call, device side and SIP side: the sans-IO [`core::CallCore`] that holds its protocol
//! logic, and the task ([`driver`]) that runs it with the user agent, the media relay and the
//! replicator. This module says how a call starts ([`CallSetup`]) and starts its task; what
//! the bridge keeps of a running call is in `crate::table`.
//!
//! Every change reaches the device as a `CallEvent`; the final one carries the media
//! statistics. A call started by a takeover ([`CallSetup::TakenOver`]) continues a stored
//! dialog (see `crate::takeover`).

pub mod core;
pub mod driver;
pub mod relays;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use thalamus_dialog_store::StoredDialog;
use thalamus_proto::v1::MediaOffer;
use thalamus_sip::dialog::{DialogId, DialogRecord};
use thalamus_sip::message::{Request, Uri};
use thalamus_sip::peer::Peer;
use thalamus_sip::ua::ServerTx;

pub use self::core::{CallCore, TakeoverTrigger};

/// How a call starts (built once per call, so the size difference of the variants is moot).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum CallSetup {
    /// The device dialled.
    Outgoing {
        /// Request-URI.
        target: Uri,
        /// The device's codecs.
        media: Option<MediaOffer>,
        /// Extra headers for the INVITE.
        headers: BTreeMap<String, String>,
        /// Placed for the transfer the remote party of this call asked for: its progress goes
        /// there.
        transfer_of: Option<crate::call::core::CallKey>,
    },
    /// A SIP INVITE for the device.
    Incoming {
        /// Its server transaction.
        tx: ServerTx,
        /// The INVITE.
        invite: Box<Request>,
        /// Where it came from (kept in its early record).
        source: Peer,
        /// The device already has a call.
        call_waiting: bool,
        /// The device's answered call this one replaces (its INVITE's Replaces, RFC 3891).
        replaces: Option<(u32, thalamus_sip::dialog::DialogId)>,
        /// Held until the INVITE has its final response (loop detection).
        in_progress: Box<crate::shared::InProgress>,
    },
    /// A stored dialog this node just claimed and imported.
    TakenOver(Box<TakeoverSetup>),
    /// A ringing call's early record this node just claimed, its INVITE adopted.
    Adopted(Box<AdoptSetup>),
}

/// What a call continuing a ringing call of another node starts from.
#[derive(Debug)]
pub struct AdoptSetup {
    /// The adopted INVITE's server transaction here.
    pub tx: ServerTx,
    /// The INVITE.
    pub invite: Request,
    /// The claimed early record (owner: this node).
    pub record: StoredDialog,
    /// What caused the takeover.
    pub trigger: TakeoverTrigger,
    /// The node that owned the call before the claim.
    pub previous_owner: String,
    /// How long the call has rung already (from the record's start, by the wall clock).
    pub rang_for: std::time::Duration,
    /// Held until the INVITE has its final response (loop detection).
    pub in_progress: crate::shared::InProgress,
}

/// What a call continuing a stored dialog starts from.
#[derive(Debug)]
pub struct TakeoverSetup {
    /// The claimed record (owner: this node).
    pub record: StoredDialog,
    /// The SIP dialog as imported.
    pub sip: DialogRecord,
    /// The imported dialog's id.
    pub dialog: DialogId,
    /// What caused the takeover.
    pub trigger: TakeoverTrigger,
    /// The node that owned the dialog before the claim.
    pub previous_owner: String,
}
