//! Error types of the dialog layer: building or updating a dialog ([`DialogError`]), importing a
//! record ([`ImportError`]), the dialog table ([`DialogsError`]) and the rejection of an incoming
//! in-dialog request with the status to answer ([`RequestRejection`]).
//!
//! This module only defines the types; the checks are made where the dialogs are built and used.

use crate::message::{HeaderError, HeaderName, Method, NameAddrError};

/// Why a dialog could not be created, or a request could not be built within it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialogError {
    /// A header needed by the dialog is missing or malformed.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// From (of the request) or To (of the response) carries no tag.
    #[error("{0} header has no tag")]
    MissingTag(HeaderName),
    /// The message has no Contact address (or only `*`) where one is required.
    #[error("no Contact address")]
    MissingContact,
    /// The request that should create the dialog is not an INVITE.
    #[error("{0} does not create an INVITE dialog")]
    NotInvite(Method),
    /// The INVITE already carries a To tag: it is a re-INVITE within an existing dialog.
    #[error("the INVITE already belongs to a dialog (it has a To tag)")]
    AlreadyInDialog,
    /// The status does not create a dialog (only 101 to 299 do).
    #[error("status {0} does not create a dialog")]
    NotDialogCreating(u16),
    /// The response does not answer the request (Call-ID, From tag or CSeq differ).
    #[error("the response does not belong to the request: {0} differs")]
    Mismatch(HeaderName),
    /// More Record-Route entries than [`crate::dialog::MAX_ROUTE_SET_LEN`].
    #[error("route set of {0} entries exceeds the limit")]
    RouteSetTooLong(usize),
    /// A stored address no longer parses (cannot happen for dialogs built by this module).
    #[error("invalid address in the dialog state: {0}")]
    Address(#[from] NameAddrError),
    /// The dialog is terminated: only ACK and CANCEL can still be built.
    #[error("the dialog is terminated")]
    Terminated,
    /// A UAS must not send BYE on an early dialog (RFC 3261 section 15).
    #[error("the callee must not send BYE on an early dialog")]
    ByeOnEarlyDialog,
    /// ACK or CANCEL was asked for but this side never sent an INVITE in the dialog.
    #[error("no INVITE of ours to acknowledge or cancel")]
    NoInvite,
    /// Only a 2xx response to an INVITE is retransmitted by the dialog layer.
    #[error("not a 2xx response to an INVITE")]
    NotInvite2xx,
    /// The local CSeq reached 2^32 - 1.
    #[error("local CSeq exhausted")]
    CSeqExhausted,
}

/// Why a [`crate::dialog::DialogRecord`] could not be imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// The record was written with a schema version this code does not know.
    #[error("unsupported dialog record version {found} (supported: {supported})")]
    UnsupportedVersion {
        /// Version in the record.
        found: u32,
        /// Version this code reads.
        supported: u32,
    },
    /// A URI or name-addr field does not parse.
    #[error("invalid URI in field {field}: {reason}")]
    InvalidUri {
        /// Record field name.
        field: &'static str,
        /// Parser message.
        reason: String,
    },
    /// Any other field is out of its domain (unknown role or state, bad tag, too long...).
    #[error("invalid field {field}: {reason}")]
    InvalidField {
        /// Record field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Why the dialog table refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialogsError {
    /// The table holds its maximum number of dialogs.
    #[error("dialog table full ({0} dialogs)")]
    Full(usize),
    /// The Call-ID already has the maximum number of dialogs (forks).
    #[error("too many dialogs for one Call-ID ({0})")]
    TooManyForks(usize),
    /// No dialog has this id.
    #[error("no such dialog")]
    NotFound,
    /// Creating the dialog failed.
    #[error(transparent)]
    Dialog(#[from] DialogError),
    /// Importing the record failed.
    #[error(transparent)]
    Import(#[from] ImportError),
}

/// Why an incoming request within a dialog is refused, with the status to answer it with.
///
/// An ACK is never answered: the caller drops it whatever the rejection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestRejection {
    /// No dialog matches the Call-ID and tags (481, RFC 3261 section 12.2.2).
    #[error("no matching dialog")]
    NoDialog,
    /// The dialog is terminated (481).
    #[error("the dialog is terminated")]
    Terminated,
    /// The CSeq number is lower than the remote CSeq (500, RFC 3261 section 12.2.2).
    #[error("CSeq {cseq} is lower than the remote CSeq {remote_cseq}")]
    OutOfOrder {
        /// CSeq number of the request.
        cseq: u32,
        /// Highest CSeq number received so far.
        remote_cseq: u32,
    },
    /// Call-ID, CSeq or the tags are missing or malformed (400).
    #[error(transparent)]
    Malformed(#[from] HeaderError),
}

impl RequestRejection {
    /// The status to answer the request with (never used for an ACK).
    pub fn status(&self) -> u16 {
        match self {
            RequestRejection::NoDialog | RequestRejection::Terminated => 481,
            RequestRejection::OutOfOrder { .. } => 500,
            RequestRejection::Malformed(_) => 400,
        }
    }
}
