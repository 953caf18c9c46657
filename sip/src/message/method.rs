//! SIP request methods: the ones defined by RFC 3261, 3262, 3311, 3428, 3515, 3903, 6086 and
//! 6665, plus any extension method (a token) kept verbatim.
//!
//! Methods are case-sensitive (RFC 3261 section 7.1): `invite` is an extension method, not INVITE.
//! This module does not decide which methods an element supports.

use std::fmt;
use std::str::FromStr;

use super::syntax::is_token;

/// A SIP request method.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// INVITE (RFC 3261).
    Invite,
    /// ACK (RFC 3261).
    Ack,
    /// BYE (RFC 3261).
    Bye,
    /// CANCEL (RFC 3261).
    Cancel,
    /// OPTIONS (RFC 3261).
    Options,
    /// REGISTER (RFC 3261).
    Register,
    /// PRACK (RFC 3262).
    Prack,
    /// UPDATE (RFC 3311).
    Update,
    /// MESSAGE (RFC 3428).
    Message,
    /// REFER (RFC 3515).
    Refer,
    /// SUBSCRIBE (RFC 6665).
    Subscribe,
    /// NOTIFY (RFC 6665).
    Notify,
    /// PUBLISH (RFC 3903).
    Publish,
    /// INFO (RFC 6086).
    Info,
    /// Any other method token, as written.
    Extension(String),
}

/// The method is not a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid method token")]
pub struct InvalidMethod;

impl Method {
    /// Parses a method token.
    pub fn from_bytes(b: &[u8]) -> Result<Self, InvalidMethod> {
        Ok(match b {
            b"INVITE" => Method::Invite,
            b"ACK" => Method::Ack,
            b"BYE" => Method::Bye,
            b"CANCEL" => Method::Cancel,
            b"OPTIONS" => Method::Options,
            b"REGISTER" => Method::Register,
            b"PRACK" => Method::Prack,
            b"UPDATE" => Method::Update,
            b"MESSAGE" => Method::Message,
            b"REFER" => Method::Refer,
            b"SUBSCRIBE" => Method::Subscribe,
            b"NOTIFY" => Method::Notify,
            b"PUBLISH" => Method::Publish,
            b"INFO" => Method::Info,
            _ if is_token(b) => {
                // Token bytes are ASCII, so this conversion cannot fail.
                Method::Extension(String::from_utf8_lossy(b).into_owned())
            }
            _ => return Err(InvalidMethod),
        })
    }

    /// The method name as written on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Options => "OPTIONS",
            Method::Register => "REGISTER",
            Method::Prack => "PRACK",
            Method::Update => "UPDATE",
            Method::Message => "MESSAGE",
            Method::Refer => "REFER",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Publish => "PUBLISH",
            Method::Info => "INFO",
            Method::Extension(s) => s,
        }
    }

    /// True for methods this crate does not know ([`Method::Extension`]).
    pub fn is_extension(&self) -> bool {
        matches!(self, Method::Extension(_))
    }

    /// True for methods that can establish a dialog (INVITE, SUBSCRIBE, REFER).
    pub fn creates_dialog(&self) -> bool {
        matches!(self, Method::Invite | Method::Subscribe | Method::Refer)
    }
}

impl FromStr for Method {
    type Err = InvalidMethod;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Method::from_bytes(s.as_bytes())
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_methods_round_trip() {
        for m in [
            Method::Invite,
            Method::Ack,
            Method::Bye,
            Method::Cancel,
            Method::Options,
            Method::Register,
            Method::Prack,
            Method::Update,
            Method::Message,
            Method::Refer,
            Method::Subscribe,
            Method::Notify,
            Method::Publish,
            Method::Info,
        ] {
            assert_eq!(m.as_str().parse::<Method>().unwrap(), m);
            assert!(!m.is_extension());
        }
    }

    #[test]
    fn extension_and_case_sensitivity() {
        assert_eq!(
            "invite".parse::<Method>().unwrap(),
            Method::Extension("invite".into())
        );
        let weird = "!interesting-Method0123456789_*+`.%indeed'~";
        assert_eq!(weird.parse::<Method>().unwrap().as_str(), weird);
        assert_eq!(
            "RE%47IST%45R".parse::<Method>().unwrap().to_string(),
            "RE%47IST%45R"
        );
        assert!("".parse::<Method>().is_err());
        assert!("IN VITE".parse::<Method>().is_err());
        assert!("<INVITE>".parse::<Method>().is_err());
        assert!(Method::Invite.creates_dialog());
        assert!(!Method::Bye.creates_dialog());
    }
}
