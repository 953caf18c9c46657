//! SDP attributes (`a=` lines): typed `rtpmap`, `fmtp`, `ptime`, direction and `rtcp`
//! attributes, everything else kept verbatim. Parsing of one attribute value and its
//! serialization; no knowledge of sessions or negotiation.

use super::connection::Connection;
use std::fmt;

/// A media direction attribute (RFC 4566 section 6, RFC 3264 section 5.1), from the point of
/// view of the side that wrote the description.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// `sendrecv` (the default when no direction is given).
    SendRecv,
    /// `sendonly`: the writer sends but does not want to receive.
    SendOnly,
    /// `recvonly`: the writer receives but does not send.
    RecvOnly,
    /// `inactive`: neither.
    Inactive,
}

impl Direction {
    /// The attribute name.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }

    /// Parses an attribute name (case-insensitive).
    pub fn from_name(name: &str) -> Option<Direction> {
        [
            Direction::SendRecv,
            Direction::SendOnly,
            Direction::RecvOnly,
            Direction::Inactive,
        ]
        .into_iter()
        .find(|d| d.as_str().eq_ignore_ascii_case(name))
    }

    /// A direction from its two halves.
    pub fn from_flags(sends: bool, receives: bool) -> Direction {
        match (sends, receives) {
            (true, true) => Direction::SendRecv,
            (true, false) => Direction::SendOnly,
            (false, true) => Direction::RecvOnly,
            (false, false) => Direction::Inactive,
        }
    }

    /// Whether the writer sends media.
    pub fn sends(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::SendOnly)
    }

    /// Whether the writer receives media.
    pub fn receives(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::RecvOnly)
    }

    /// The same stream seen from the other side (sendonly <-> recvonly).
    pub fn reversed(self) -> Direction {
        Direction::from_flags(self.receives(), self.sends())
    }

    /// The direction to answer an offered direction with, given what we would like
    /// (`local`, usually sendrecv): RFC 3264 section 6.1 (sendonly -> recvonly, recvonly ->
    /// sendonly, inactive -> inactive, sendrecv -> any), narrowed by `local`.
    pub fn answer_to(self, local: Direction) -> Direction {
        Direction::from_flags(
            self.receives() && local.sends(),
            self.sends() && local.receives(),
        )
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `a=rtpmap:<payload type> <encoding name>/<clock rate>[/<encoding parameters>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpMap {
    /// The RTP payload type (0..=127).
    pub payload_type: u8,
    /// The encoding name as written, e.g. `opus` or `PCMU`.
    pub encoding: String,
    /// The RTP clock rate in Hz.
    pub clock_rate: u32,
    /// The encoding parameters: the channel count for audio, when written.
    pub channels: Option<u16>,
}

impl RtpMap {
    fn parse(value: &str) -> Option<RtpMap> {
        let (pt, rest) = value.trim().split_once(|c: char| c.is_ascii_whitespace())?;
        let payload_type: u8 = pt.parse().ok().filter(|pt| *pt <= 127)?;
        let mut parts = rest.trim().split('/');
        let encoding = parts.next().filter(|e| !e.is_empty())?;
        if encoding.contains(char::is_whitespace) {
            return None;
        }
        let clock_rate: u32 = parts.next()?.trim().parse().ok().filter(|r| *r > 0)?;
        let channels = match parts.next() {
            None => None,
            Some(c) => Some(c.trim().parse().ok().filter(|c| *c > 0)?),
        };
        if parts.next().is_some() {
            return None;
        }
        Some(RtpMap {
            payload_type,
            encoding: encoding.to_string(),
            clock_rate,
            channels,
        })
    }
}

impl fmt::Display for RtpMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}",
            self.payload_type, self.encoding, self.clock_rate
        )?;
        if let Some(channels) = self.channels {
            write!(f, "/{channels}")?;
        }
        Ok(())
    }
}

/// `a=fmtp:<format> <format specific parameters>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fmtp {
    /// The format (payload type for RTP) the parameters apply to.
    pub format: String,
    /// The parameters, verbatim (e.g. `0-16` or `profile-level-id=42e01f;packetization-mode=1`).
    pub params: String,
}

impl Fmtp {
    fn parse(value: &str) -> Option<Fmtp> {
        let value = value.trim_start();
        let (format, params) = match value.split_once(|c: char| c.is_ascii_whitespace()) {
            Some((format, params)) => (format, params.trim()),
            None => (value, ""),
        };
        if format.is_empty() {
            return None;
        }
        Some(Fmtp {
            format: format.to_string(),
            params: params.to_string(),
        })
    }

    /// The value of one `key=value` parameter (`;`-separated, keys compared ignoring case).
    pub fn param(&self, key: &str) -> Option<&str> {
        fmtp_param(&self.params, key)
    }
}

/// Looks up `key` in `;`-separated `key=value` format parameters.
pub(crate) fn fmtp_param<'a>(params: &'a str, key: &str) -> Option<&'a str> {
    params.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim().eq_ignore_ascii_case(key).then(|| v.trim())
    })
}

impl fmt::Display for Fmtp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.format, self.params)
    }
}

/// `a=rtcp:<port> [<nettype> <addrtype> <address>]` (RFC 3605).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rtcp {
    /// The RTCP port.
    pub port: u16,
    /// The RTCP address, when it differs from the RTP one.
    pub connection: Option<Connection>,
}

impl Rtcp {
    fn parse(value: &str) -> Option<Rtcp> {
        let mut parts = value.split_ascii_whitespace();
        let port = parts.next()?.parse().ok()?;
        let rest: Vec<&str> = parts.collect();
        let connection = match rest.as_slice() {
            [] => None,
            [net, addr_type, address] => Some(Connection {
                net_type: (*net).to_string(),
                addr_type: (*addr_type).to_string(),
                address: (*address).to_string(),
            }),
            _ => return None,
        };
        Some(Rtcp { port, connection })
    }
}

impl fmt::Display for Rtcp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.port)?;
        if let Some(c) = &self.connection {
            write!(f, " {} {} {}", c.net_type, c.addr_type, c.address)?;
        }
        Ok(())
    }
}

/// One `a=` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    /// `a=rtpmap:`.
    RtpMap(RtpMap),
    /// `a=fmtp:`.
    Fmtp(Fmtp),
    /// `a=ptime:` in milliseconds.
    Ptime(u32),
    /// `a=sendrecv`, `a=sendonly`, `a=recvonly` or `a=inactive`.
    Direction(Direction),
    /// `a=rtcp:`.
    Rtcp(Rtcp),
    /// Any other attribute, verbatim: `a=<name>` or `a=<name>:<value>`.
    Other {
        /// The attribute name.
        name: String,
        /// The value after the first `:`, if any.
        value: Option<String>,
    },
}

impl Attribute {
    /// Parses the text after `a=`; `Err` names what was malformed.
    pub(crate) fn parse(text: &str) -> Result<Attribute, &'static str> {
        let (name, value) = match text.split_once(':') {
            Some((name, value)) => (name, Some(value)),
            None => (text, None),
        };
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err("attribute name");
        }
        let typed = match (name.to_ascii_lowercase().as_str(), value) {
            ("rtpmap", Some(v)) => Attribute::RtpMap(RtpMap::parse(v).ok_or("rtpmap")?),
            ("rtpmap", None) => return Err("rtpmap"),
            ("fmtp", Some(v)) => Attribute::Fmtp(Fmtp::parse(v).ok_or("fmtp")?),
            ("fmtp", None) => return Err("fmtp"),
            ("ptime", Some(v)) => Attribute::Ptime(parse_ptime(v).ok_or("ptime")?),
            ("ptime", None) => return Err("ptime"),
            ("rtcp", Some(v)) => Attribute::Rtcp(Rtcp::parse(v).ok_or("rtcp")?),
            ("rtcp", None) => return Err("rtcp"),
            (_, None) => match Direction::from_name(name) {
                Some(direction) => Attribute::Direction(direction),
                None => Attribute::Other {
                    name: name.to_string(),
                    value: None,
                },
            },
            (_, Some(v)) => Attribute::Other {
                name: name.to_string(),
                value: Some(v.to_string()),
            },
        };
        Ok(typed)
    }

    /// A value-less property attribute such as `a=rtcp-mux`.
    pub fn flag(name: impl Into<String>) -> Attribute {
        Attribute::Other {
            name: name.into(),
            value: None,
        }
    }

    /// A verbatim `a=name:value` attribute.
    pub fn other(name: impl Into<String>, value: impl Into<String>) -> Attribute {
        Attribute::Other {
            name: name.into(),
            value: Some(value.into()),
        }
    }
}

/// ptime is integer milliseconds; some peers write a fraction (`20.0`), which is truncated.
fn parse_ptime(value: &str) -> Option<u32> {
    let value = value.trim();
    let whole = match value.split_once('.') {
        Some((whole, frac)) if frac.bytes().all(|b| b.is_ascii_digit()) => whole,
        Some(_) => return None,
        None => value,
    };
    whole.parse().ok().filter(|p| *p > 0)
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attribute::RtpMap(m) => write!(f, "rtpmap:{m}"),
            Attribute::Fmtp(m) => write!(f, "fmtp:{m}"),
            Attribute::Ptime(p) => write!(f, "ptime:{p}"),
            Attribute::Direction(d) => f.write_str(d.as_str()),
            Attribute::Rtcp(r) => write!(f, "rtcp:{r}"),
            Attribute::Other { name, value: None } => f.write_str(name),
            Attribute::Other {
                name,
                value: Some(v),
            } => write!(f, "{name}:{v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_typed_attributes() {
        assert_eq!(
            Attribute::parse("rtpmap:111 opus/48000/2"),
            Ok(Attribute::RtpMap(RtpMap {
                payload_type: 111,
                encoding: "opus".into(),
                clock_rate: 48000,
                channels: Some(2)
            }))
        );
        assert_eq!(
            Attribute::parse("fmtp:101 0-16"),
            Ok(Attribute::Fmtp(Fmtp {
                format: "101".into(),
                params: "0-16".into()
            }))
        );
        assert_eq!(Attribute::parse("ptime:20"), Ok(Attribute::Ptime(20)));
        assert_eq!(Attribute::parse("ptime:20.0"), Ok(Attribute::Ptime(20)));
        assert_eq!(
            Attribute::parse("sendonly"),
            Ok(Attribute::Direction(Direction::SendOnly))
        );
        assert_eq!(
            Attribute::parse("rtcp:53021 IN IP4 126.16.64.4"),
            Ok(Attribute::Rtcp(Rtcp {
                port: 53021,
                connection: Some(Connection {
                    net_type: "IN".into(),
                    addr_type: "IP4".into(),
                    address: "126.16.64.4".into()
                })
            }))
        );
        assert_eq!(
            Attribute::parse("rtcp-mux"),
            Ok(Attribute::flag("rtcp-mux"))
        );
        assert_eq!(
            Attribute::parse("candidate:1 1 UDP 2130706431 10.0.1.1 8998 typ host"),
            Ok(Attribute::other(
                "candidate",
                "1 1 UDP 2130706431 10.0.1.1 8998 typ host"
            ))
        );
    }

    #[test]
    fn rejects_malformed_typed_attributes() {
        for bad in [
            "rtpmap:abc PCMU/8000",
            "rtpmap:128 X/8000",
            "rtpmap:0 PCMU",
            "rtpmap:0 PCMU/0",
            "rtpmap:0 PCMU/8000/1/2",
            "rtpmap:0 PCMU/8000/x",
            "rtpmap:0",
            "rtpmap",
            "fmtp:",
            "ptime:abc",
            "ptime:0",
            "ptime:2.x",
            "rtcp:70000",
            "rtcp:5000 IN IP4",
            "",
            "bad name:x",
        ] {
            assert!(Attribute::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn attributes_serialize_as_parsed() {
        for text in [
            "rtpmap:0 PCMU/8000",
            "rtpmap:111 opus/48000/2",
            "fmtp:96 profile-level-id=42e01f;packetization-mode=1",
            "ptime:30",
            "inactive",
            "rtcp:9 IN IP6 ::1",
            "rtcp:5001",
            "ice-ufrag:abc",
            "rtcp-mux",
        ] {
            assert_eq!(Attribute::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn direction_answers_follow_rfc3264() {
        use Direction::*;
        assert_eq!(SendRecv.answer_to(SendRecv), SendRecv);
        assert_eq!(SendOnly.answer_to(SendRecv), RecvOnly);
        assert_eq!(RecvOnly.answer_to(SendRecv), SendOnly);
        assert_eq!(Inactive.answer_to(SendRecv), Inactive);
        assert_eq!(SendRecv.answer_to(SendOnly), SendOnly);
        assert_eq!(SendOnly.answer_to(SendOnly), Inactive);
        assert_eq!(SendRecv.reversed(), SendRecv);
        assert_eq!(SendOnly.reversed(), RecvOnly);
        assert_eq!(Direction::from_name("SENDRECV"), Some(SendRecv));
    }

    #[test]
    fn fmtp_params_are_looked_up() {
        let f = Fmtp::parse("96 profile-level-id=42e01f; packetization-mode=1").unwrap();
        assert_eq!(f.param("PACKETIZATION-MODE"), Some("1"));
        assert_eq!(f.param("profile-level-id"), Some("42e01f"));
        assert_eq!(f.param("level-asymmetry-allowed"), None);
    }
}
