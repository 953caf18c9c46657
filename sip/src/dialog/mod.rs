//! RFC 3261 section 12 dialogs, sans-IO, with export to and import from a versioned record.
//!
//! What it does:
//!
//! * [`Dialog`]: the dialog state of RFC 3261 section 12 (id, role, Early/Confirmed/Terminated,
//!   local and remote URI, local and remote CSeq, remote target, route set, secure flag, local
//!   Contact). Created on the UAC side from the INVITE we sent and a tagged 1xx or a 2xx
//!   ([`Dialog::new_uac`], section 12.1.2) and on the UAS side from the INVITE we received and the
//!   tagged 1xx or 2xx we send ([`Dialog::new_uas`], section 12.1.1; [`uas_response`] builds that
//!   response with To tag, Contact and the copied Record-Route).
//! * Requests within a dialog (section 12.2.1.1): [`Dialog::create_request`] for BYE, re-INVITE,
//!   UPDATE, INFO, MESSAGE, OPTIONS... with loose or strict routing, and [`Dialog::create_ack`]
//!   for the ACK of a 2xx (section 13.2.2.4), which can be kept and re-sent
//!   ([`Dialog::remember_ack`], [`Dialog::ack_to_resend`]). The caller adds the Via (with a new
//!   branch) and resolves [`Dialog::next_hop`] (or [`next_hop`] of a built request).
//! * Incoming requests (section 12.2.2): [`Dialog::receive_request`] checks the remote CSeq
//!   (a lower one is rejected with 500) and terminates on BYE; responses we send are reported
//!   with [`Dialog::response_sent`] (confirmation, target refresh on a 2xx to re-INVITE/UPDATE);
//!   responses we receive go to [`Dialog::receive_response`] (confirmation, target refresh, 481
//!   and 408 terminate). [`Dialog::create_response`] builds responses to in-dialog requests.
//! * [`Pending2xx`]: the retransmission of a 2xx to an INVITE until the ACK arrives (RFC 3261
//!   section 13.3.1.4, RFC 6026): T1, 2T1, 4T1... capped at T2, given up after 64*T1. Time is
//!   passed in; nothing here reads a clock.
//! * [`DialogRecord`]: a plain, versioned, serde record of everything needed to continue a dialog
//!   on another node ([`Dialog::export`], [`Dialog::import`]).
//! * [`Dialogs`]: a bounded table keyed by (Call-ID, local tag, remote tag), with the matching of
//!   incoming requests and responses, forking (one early dialog per remote tag), the 2xx
//!   retransmission timers and import.
//!
//! What it does not do: no I/O and no clock reads; no transactions (retransmission of requests,
//! matching of responses to requests and absorbing retransmitted requests belong to the
//! `transaction` module); no Via, no address resolution (RFC 3263) and no choice of transport
//! (the secure flag is reported, not enforced); no SDP offer/answer, no authentication, no session
//! timers, no PRACK/RSeq bookkeeping (RFC 3262), and no subscriptions (RFC 6665 dialog usages).
//!
//! Memory: a dialog keeps its header texts (From, To, Contact, Route values) as small shared
//! buffers built when the dialog is created, never slices of a received message (which would keep
//! the whole datagram alive), so building a request copies no text.

mod error;
mod in_dialog;
mod record;
mod retransmit;
mod state;
mod table;
#[cfg(test)]
mod test_support;

pub use error::{DialogError, DialogsError, ImportError, RequestRejection};
pub use in_dialog::{is_target_refresh, next_hop, uas_response, InDialogRequest, ResponseOutcome};
pub use record::{DialogRecord, DIALOG_RECORD_VERSION};
pub use retransmit::{Pending2xx, Pending2xxAction, RetransmitTimers};
pub use state::{
    Dialog, DialogId, DialogState, Replaces, Role, MAX_ROUTE_SET_LEN, NOREFERSUB_TAG, REPLACES_TAG,
};
pub use table::{Dialogs, DialogsConfig, RequestMatch, TimerEvent};
