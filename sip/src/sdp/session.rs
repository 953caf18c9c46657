//! The session description model (RFC 4566 section 5), its line-by-line parser and its CRLF
//! serializer, plus read-only helpers (effective direction and connection of a media stream,
//! codecs of a stream). Offer/answer logic lives in `negotiation`.

use super::attribute::{Attribute, Direction, Rtcp};
use super::codec::Codec;
use super::connection::Connection;
use super::{SdpError, MAX_ATTRIBUTES, MAX_FORMATS, MAX_MEDIA, MAX_REPEATED_LINES, MAX_SDP_LEN};
use std::fmt::{self, Write as _};
use std::str::FromStr;

/// The `o=` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The user name (`-` when none).
    pub username: String,
    /// The session id (a numeric string, kept as text since some peers exceed 64 bits).
    pub session_id: String,
    /// The session version, incremented on each change.
    pub session_version: u64,
    /// Network type, `IN`.
    pub net_type: String,
    /// Address type, `IP4` or `IP6`.
    pub addr_type: String,
    /// The originator's address.
    pub address: String,
}

/// A `b=<type>:<bandwidth>` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bandwidth {
    /// The bandwidth type, e.g. `AS`, `CT`, `TIAS`.
    pub kind: String,
    /// The value (kilobits per second for `AS` and `CT`).
    pub value: u64,
}

/// A `t=` line with its `r=` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// Start time (NTP seconds, 0 for unbounded).
    pub start: u64,
    /// Stop time (NTP seconds, 0 for unbounded).
    pub stop: u64,
    /// `r=` repeat lines, verbatim.
    pub repeats: Vec<String>,
}

/// The media type of an `m=` line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MediaKind {
    /// `audio`.
    Audio,
    /// `video`.
    Video,
    /// `text`.
    Text,
    /// `application`.
    Application,
    /// `message`.
    Message,
    /// `image` (e.g. T.38 fax).
    Image,
    /// Anything else, as written.
    Other(String),
}

impl MediaKind {
    /// The token as written.
    pub fn as_str(&self) -> &str {
        match self {
            MediaKind::Audio => "audio",
            MediaKind::Video => "video",
            MediaKind::Text => "text",
            MediaKind::Application => "application",
            MediaKind::Message => "message",
            MediaKind::Image => "image",
            MediaKind::Other(s) => s,
        }
    }

    fn parse(token: &str) -> MediaKind {
        match token.to_ascii_lowercase().as_str() {
            "audio" => MediaKind::Audio,
            "video" => MediaKind::Video,
            "text" => MediaKind::Text,
            "application" => MediaKind::Application,
            "message" => MediaKind::Message,
            "image" => MediaKind::Image,
            _ => MediaKind::Other(token.to_string()),
        }
    }
}

impl fmt::Display for MediaKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The transport protocol of an `m=` line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `RTP/AVP`: plain RTP (RFC 3551).
    RtpAvp,
    /// `RTP/SAVP`: SRTP (RFC 3711).
    RtpSavp,
    /// `RTP/AVPF`: RTP with RTCP feedback (RFC 4585).
    RtpAvpf,
    /// `RTP/SAVPF`: SRTP with RTCP feedback.
    RtpSavpf,
    /// Anything else (e.g. `UDP/TLS/RTP/SAVPF`, `udptl`), as written.
    Other(String),
}

impl Protocol {
    /// The token as written.
    pub fn as_str(&self) -> &str {
        match self {
            Protocol::RtpAvp => "RTP/AVP",
            Protocol::RtpSavp => "RTP/SAVP",
            Protocol::RtpAvpf => "RTP/AVPF",
            Protocol::RtpSavpf => "RTP/SAVPF",
            Protocol::Other(s) => s,
        }
    }

    fn parse(token: &str) -> Protocol {
        match token.to_ascii_uppercase().as_str() {
            "RTP/AVP" => Protocol::RtpAvp,
            "RTP/SAVP" => Protocol::RtpSavp,
            "RTP/AVPF" => Protocol::RtpAvpf,
            "RTP/SAVPF" => Protocol::RtpSavpf,
            _ => Protocol::Other(token.to_string()),
        }
    }

    /// Whether the formats are RTP payload types.
    pub fn is_rtp(&self) -> bool {
        match self {
            Protocol::Other(s) => s.to_ascii_uppercase().contains("RTP/"),
            _ => true,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One media description: an `m=` line and the lines that follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaDescription {
    /// The media type.
    pub kind: MediaKind,
    /// The transport port; 0 means the stream is rejected or disabled.
    pub port: u16,
    /// The `/<number of ports>` suffix, if written.
    pub port_count: Option<u16>,
    /// The transport protocol.
    pub protocol: Protocol,
    /// The formats (RTP payload types as text for RTP protocols).
    pub formats: Vec<String>,
    /// `i=`.
    pub title: Option<String>,
    /// `c=` at media level.
    pub connection: Option<Connection>,
    /// `b=` lines.
    pub bandwidths: Vec<Bandwidth>,
    /// `k=`, verbatim.
    pub encryption_key: Option<String>,
    /// `a=` lines in order.
    pub attributes: Vec<Attribute>,
}

impl MediaDescription {
    /// A media description with no lines besides `m=`.
    pub fn new(kind: MediaKind, port: u16, protocol: Protocol, formats: Vec<String>) -> Self {
        MediaDescription {
            kind,
            port,
            port_count: None,
            protocol,
            formats,
            title: None,
            connection: None,
            bandwidths: Vec::new(),
            encryption_key: None,
            attributes: Vec::new(),
        }
    }

    /// Whether the stream is rejected/disabled (port 0).
    pub fn is_rejected(&self) -> bool {
        self.port == 0
    }

    /// The direction attribute at media level, if any (see
    /// [`SessionDescription::media_direction`] for the effective one).
    pub fn direction(&self) -> Option<Direction> {
        self.attributes.iter().find_map(|a| match a {
            Attribute::Direction(d) => Some(*d),
            _ => None,
        })
    }

    /// Replaces any direction attribute with `direction`.
    pub fn set_direction(&mut self, direction: Direction) {
        self.attributes
            .retain(|a| !matches!(a, Attribute::Direction(_)));
        self.attributes.push(Attribute::Direction(direction));
    }

    /// The `ptime` attribute, if any.
    pub fn ptime(&self) -> Option<u32> {
        self.attributes.iter().find_map(|a| match a {
            Attribute::Ptime(p) => Some(*p),
            _ => None,
        })
    }

    /// The `rtcp` attribute, if any.
    pub fn rtcp(&self) -> Option<&Rtcp> {
        self.attributes.iter().find_map(|a| match a {
            Attribute::Rtcp(r) => Some(r),
            _ => None,
        })
    }

    /// The `fmtp` parameters for a format, if any.
    pub fn fmtp(&self, format: &str) -> Option<&str> {
        self.attributes.iter().find_map(|a| match a {
            Attribute::Fmtp(f) if f.format == format => Some(f.params.as_str()),
            _ => None,
        })
    }

    /// The `a=crypto` attributes (RFC 4568) that parse, in order.
    pub fn cryptos(&self) -> Vec<super::crypto::Crypto> {
        self.attributes
            .iter()
            .filter_map(|a| match a {
                Attribute::Other {
                    name,
                    value: Some(value),
                } if name.eq_ignore_ascii_case("crypto") => super::crypto::Crypto::parse(value),
                _ => None,
            })
            .collect()
    }

    /// Whether the stream has `a=rtcp-mux` (RFC 5761: RTCP on the RTP port).
    pub fn rtcp_mux(&self) -> bool {
        self.attributes.iter().any(|a| {
            matches!(a, Attribute::Other { name, value: None } if name.eq_ignore_ascii_case("rtcp-mux"))
        })
    }

    /// The stream's `a=rtcp-fb` attributes (RFC 4585).
    pub fn rtcp_feedback(&self) -> super::feedback::RtcpFeedback {
        let mut feedback = super::feedback::RtcpFeedback::default();
        for attribute in &self.attributes {
            if let Attribute::Other {
                name,
                value: Some(value),
            } = attribute
            {
                if name.eq_ignore_ascii_case("rtcp-fb") {
                    feedback.add(value);
                }
            }
        }
        feedback
    }

    /// Whether the protocol is SRTP (`RTP/SAVP` or `RTP/SAVPF`).
    pub fn is_secure(&self) -> bool {
        matches!(self.protocol, Protocol::RtpSavp | Protocol::RtpSavpf)
    }

    /// The codecs of an RTP stream in the order of the `m=` line: each payload type resolved
    /// through its `rtpmap`, or the static table when there is none, with its `fmtp`. Formats
    /// that cannot be resolved (dynamic without `rtpmap`, not numeric) are left out.
    pub fn codecs(&self) -> Vec<Codec> {
        if !self.protocol.is_rtp() {
            return Vec::new();
        }
        self.formats
            .iter()
            .filter_map(|format| {
                let pt: u8 = format.parse().ok().filter(|pt| *pt <= 127)?;
                let rtpmap = self.attributes.iter().find_map(|a| match a {
                    Attribute::RtpMap(m) if m.payload_type == pt => Some(m),
                    _ => None,
                });
                let mut codec = match rtpmap {
                    Some(m) => Codec::from_rtpmap(m),
                    None => Codec::from_static_payload_type(pt)?,
                };
                codec.fmtp = self.fmtp(format).map(str::to_string);
                Some(codec)
            })
            .collect()
    }
}

/// A session description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDescription {
    /// `o=`.
    pub origin: Origin,
    /// `s=`.
    pub session_name: String,
    /// `i=`.
    pub session_info: Option<String>,
    /// `u=`.
    pub uri: Option<String>,
    /// `e=` lines.
    pub emails: Vec<String>,
    /// `p=` lines.
    pub phones: Vec<String>,
    /// `c=` at session level.
    pub connection: Option<Connection>,
    /// `b=` lines at session level.
    pub bandwidths: Vec<Bandwidth>,
    /// `t=` lines (with their `r=` lines); parsing adds `t=0 0` when there is none.
    pub timings: Vec<Timing>,
    /// `z=`, verbatim.
    pub time_zones: Option<String>,
    /// `k=` at session level, verbatim.
    pub encryption_key: Option<String>,
    /// `a=` lines at session level.
    pub attributes: Vec<Attribute>,
    /// The media descriptions in order.
    pub media: Vec<MediaDescription>,
}

/// Which part of the description the parser is in.
enum Level {
    Session,
    Media,
}

fn invalid(line: usize, what: &'static str) -> SdpError {
    SdpError::InvalidValue { line, what }
}

fn set_once<T>(slot: &mut Option<T>, value: T, line: usize, kind: char) -> Result<(), SdpError> {
    if slot.is_some() {
        return Err(SdpError::DuplicateLine { line, kind });
    }
    *slot = Some(value);
    Ok(())
}

fn push_bounded<T>(
    list: &mut Vec<T>,
    value: T,
    max: usize,
    what: &'static str,
) -> Result<(), SdpError> {
    if list.len() >= max {
        return Err(SdpError::TooMany(what));
    }
    list.push(value);
    Ok(())
}

fn parse_connection(value: &str, line: usize) -> Result<Connection, SdpError> {
    let parts: Vec<&str> = value.split_ascii_whitespace().collect();
    match parts.as_slice() {
        [net, addr_type, address] => Ok(Connection {
            net_type: (*net).to_string(),
            addr_type: (*addr_type).to_string(),
            address: (*address).to_string(),
        }),
        _ => Err(invalid(line, "connection")),
    }
}

fn parse_origin(value: &str, line: usize) -> Result<Origin, SdpError> {
    let parts: Vec<&str> = value.split_ascii_whitespace().collect();
    let [username, session_id, version, net, addr_type, address] = parts.as_slice() else {
        return Err(invalid(line, "origin"));
    };
    if !session_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(line, "origin session id"));
    }
    Ok(Origin {
        username: (*username).to_string(),
        session_id: (*session_id).to_string(),
        session_version: version
            .parse()
            .map_err(|_| invalid(line, "origin session version"))?,
        net_type: (*net).to_string(),
        addr_type: (*addr_type).to_string(),
        address: (*address).to_string(),
    })
}

fn parse_bandwidth(value: &str, line: usize) -> Result<Bandwidth, SdpError> {
    let (kind, bw) = value.split_once(':').ok_or(invalid(line, "bandwidth"))?;
    if kind.is_empty() || kind.contains(char::is_whitespace) {
        return Err(invalid(line, "bandwidth"));
    }
    Ok(Bandwidth {
        kind: kind.to_string(),
        value: bw.trim().parse().map_err(|_| invalid(line, "bandwidth"))?,
    })
}

fn parse_timing(value: &str, line: usize) -> Result<Timing, SdpError> {
    let parts: Vec<&str> = value.split_ascii_whitespace().collect();
    let [start, stop] = parts.as_slice() else {
        return Err(invalid(line, "timing"));
    };
    Ok(Timing {
        start: start.parse().map_err(|_| invalid(line, "timing"))?,
        stop: stop.parse().map_err(|_| invalid(line, "timing"))?,
        repeats: Vec::new(),
    })
}

fn parse_media(value: &str, line: usize) -> Result<MediaDescription, SdpError> {
    let mut parts = value.split_ascii_whitespace();
    let (Some(kind), Some(port), Some(proto)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid(line, "media line"));
    };
    let (port, port_count) = match port.split_once('/') {
        Some((port, count)) => (
            port,
            Some(
                count
                    .parse::<u16>()
                    .ok()
                    .filter(|c| *c > 0)
                    .ok_or(invalid(line, "media port count"))?,
            ),
        ),
        None => (port, None),
    };
    let port: u16 = port.parse().map_err(|_| invalid(line, "media port"))?;
    let mut formats = Vec::new();
    for format in parts {
        push_bounded(&mut formats, format.to_string(), MAX_FORMATS, "formats")?;
    }
    let protocol = Protocol::parse(proto);
    if formats.is_empty() {
        return Err(invalid(line, "media line without formats"));
    }
    if protocol.is_rtp()
        && formats
            .iter()
            .any(|f| f.parse::<u8>().ok().filter(|pt| *pt <= 127).is_none())
    {
        return Err(invalid(line, "RTP payload type"));
    }
    let mut media = MediaDescription::new(MediaKind::parse(kind), port, protocol, formats);
    media.port_count = port_count;
    Ok(media)
}

impl SessionDescription {
    /// Parses a session description. Lines may end in CRLF or LF; blank lines are ignored.
    pub fn parse(text: &str) -> Result<Self, SdpError> {
        if text.len() > MAX_SDP_LEN {
            return Err(SdpError::TooLong(text.len()));
        }
        let mut lines = text
            .split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .enumerate()
            .map(|(i, l)| (i + 1, l))
            .filter(|(_, l)| !l.trim().is_empty());

        let Some((_, first)) = lines.next() else {
            return Err(SdpError::Empty);
        };
        if first.trim_end() != "v=0" {
            return Err(SdpError::BadVersion);
        }

        let mut origin = None;
        let mut session_name = None;
        let mut sd = SessionDescription {
            origin: Origin {
                username: String::new(),
                session_id: String::new(),
                session_version: 0,
                net_type: String::new(),
                addr_type: String::new(),
                address: String::new(),
            },
            session_name: String::new(),
            session_info: None,
            uri: None,
            emails: Vec::new(),
            phones: Vec::new(),
            connection: None,
            bandwidths: Vec::new(),
            timings: Vec::new(),
            time_zones: None,
            encryption_key: None,
            attributes: Vec::new(),
            media: Vec::new(),
        };
        let mut level = Level::Session;

        for (n, line) in lines {
            let bytes = line.as_bytes();
            let (Some(&kind), Some(b'=')) = (bytes.first(), bytes.get(1)) else {
                return Err(SdpError::MalformedLine { line: n });
            };
            if !kind.is_ascii_lowercase() {
                return Err(SdpError::MalformedLine { line: n });
            }
            let kind = char::from(kind);
            let value = line.get(2..).ok_or(SdpError::MalformedLine { line: n })?;
            if value.contains(['\r', '\0']) {
                return Err(SdpError::MalformedLine { line: n });
            }
            if kind == 'm' {
                if sd.media.len() >= MAX_MEDIA {
                    return Err(SdpError::TooMany("media descriptions"));
                }
                sd.media.push(parse_media(value, n)?);
                level = Level::Media;
                continue;
            }
            match (&level, sd.media.last_mut()) {
                (Level::Media, Some(media)) => match kind {
                    'i' => set_once(&mut media.title, value.to_string(), n, kind)?,
                    'c' => set_once(&mut media.connection, parse_connection(value, n)?, n, kind)?,
                    'b' => push_bounded(
                        &mut media.bandwidths,
                        parse_bandwidth(value, n)?,
                        MAX_REPEATED_LINES,
                        "bandwidth lines",
                    )?,
                    'k' => set_once(&mut media.encryption_key, value.to_string(), n, kind)?,
                    'a' => push_bounded(
                        &mut media.attributes,
                        Attribute::parse(value).map_err(|what| invalid(n, what))?,
                        MAX_ATTRIBUTES,
                        "attributes",
                    )?,
                    _ => return Err(SdpError::UnexpectedLine { line: n, kind }),
                },
                _ => match kind {
                    'o' => set_once(&mut origin, parse_origin(value, n)?, n, kind)?,
                    's' => set_once(&mut session_name, value.to_string(), n, kind)?,
                    'i' => set_once(&mut sd.session_info, value.to_string(), n, kind)?,
                    'u' => set_once(&mut sd.uri, value.to_string(), n, kind)?,
                    'e' => push_bounded(
                        &mut sd.emails,
                        value.to_string(),
                        MAX_REPEATED_LINES,
                        "email lines",
                    )?,
                    'p' => push_bounded(
                        &mut sd.phones,
                        value.to_string(),
                        MAX_REPEATED_LINES,
                        "phone lines",
                    )?,
                    'c' => set_once(&mut sd.connection, parse_connection(value, n)?, n, kind)?,
                    'b' => push_bounded(
                        &mut sd.bandwidths,
                        parse_bandwidth(value, n)?,
                        MAX_REPEATED_LINES,
                        "bandwidth lines",
                    )?,
                    't' => push_bounded(
                        &mut sd.timings,
                        parse_timing(value, n)?,
                        MAX_REPEATED_LINES,
                        "timing lines",
                    )?,
                    'r' => match sd.timings.last_mut() {
                        Some(t) => push_bounded(
                            &mut t.repeats,
                            value.to_string(),
                            MAX_REPEATED_LINES,
                            "repeat lines",
                        )?,
                        None => return Err(SdpError::UnexpectedLine { line: n, kind }),
                    },
                    'z' => set_once(&mut sd.time_zones, value.to_string(), n, kind)?,
                    'k' => set_once(&mut sd.encryption_key, value.to_string(), n, kind)?,
                    'a' => push_bounded(
                        &mut sd.attributes,
                        Attribute::parse(value).map_err(|what| invalid(n, what))?,
                        MAX_ATTRIBUTES,
                        "attributes",
                    )?,
                    'v' => return Err(SdpError::DuplicateLine { line: n, kind }),
                    _ => return Err(SdpError::UnexpectedLine { line: n, kind }),
                },
            }
        }

        sd.origin = origin.ok_or(SdpError::MissingLine('o'))?;
        sd.session_name = session_name.ok_or(SdpError::MissingLine('s'))?;
        if sd.timings.is_empty() {
            sd.timings.push(Timing {
                start: 0,
                stop: 0,
                repeats: Vec::new(),
            });
        }
        Ok(sd)
    }

    /// Parses a session description from a message body.
    pub fn from_bytes(body: &[u8]) -> Result<Self, SdpError> {
        if body.len() > MAX_SDP_LEN {
            return Err(SdpError::TooLong(body.len()));
        }
        let text = std::str::from_utf8(body).map_err(|_| SdpError::NotUtf8)?;
        SessionDescription::parse(text)
    }

    /// The serialized description (CRLF line ends) as bytes, for a message body.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }

    /// The effective direction of media `index`: its own attribute, else the session-level one,
    /// else sendrecv. `None` if there is no such media.
    pub fn media_direction(&self, index: usize) -> Option<Direction> {
        let media = self.media.get(index)?;
        let session = self.attributes.iter().find_map(|a| match a {
            Attribute::Direction(d) => Some(*d),
            _ => None,
        });
        Some(media.direction().or(session).unwrap_or(Direction::SendRecv))
    }

    /// The effective connection of media `index`: its own `c=`, else the session-level one.
    pub fn media_connection(&self, index: usize) -> Option<&Connection> {
        let media = self.media.get(index)?;
        media.connection.as_ref().or(self.connection.as_ref())
    }

    /// Index of the first media of the given kind with a non-zero port.
    pub fn first_active(&self, kind: &MediaKind) -> Option<usize> {
        self.media
            .iter()
            .position(|m| &m.kind == kind && !m.is_rejected())
    }
}

impl FromStr for SessionDescription {
    type Err = SdpError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SessionDescription::parse(s)
    }
}

fn write_connection(out: &mut String, c: &Connection) {
    let _ = write!(out, "c={} {} {}\r\n", c.net_type, c.addr_type, c.address);
}

fn write_line(out: &mut String, kind: char, value: &str) {
    // A value must not break the line structure: line breaks are dropped.
    out.push(kind);
    out.push('=');
    out.extend(value.chars().filter(|c| !matches!(c, '\r' | '\n' | '\0')));
    out.push_str("\r\n");
}

impl fmt::Display for SessionDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::with_capacity(512);
        out.push_str("v=0\r\n");
        let o = &self.origin;
        write_line(
            &mut out,
            'o',
            &format!(
                "{} {} {} {} {} {}",
                o.username, o.session_id, o.session_version, o.net_type, o.addr_type, o.address
            ),
        );
        write_line(&mut out, 's', &self.session_name);
        if let Some(i) = &self.session_info {
            write_line(&mut out, 'i', i);
        }
        if let Some(u) = &self.uri {
            write_line(&mut out, 'u', u);
        }
        for e in &self.emails {
            write_line(&mut out, 'e', e);
        }
        for p in &self.phones {
            write_line(&mut out, 'p', p);
        }
        if let Some(c) = &self.connection {
            write_connection(&mut out, c);
        }
        for b in &self.bandwidths {
            write_line(&mut out, 'b', &format!("{}:{}", b.kind, b.value));
        }
        if self.timings.is_empty() {
            out.push_str("t=0 0\r\n");
        }
        for t in &self.timings {
            write_line(&mut out, 't', &format!("{} {}", t.start, t.stop));
            for r in &t.repeats {
                write_line(&mut out, 'r', r);
            }
        }
        if let Some(z) = &self.time_zones {
            write_line(&mut out, 'z', z);
        }
        if let Some(k) = &self.encryption_key {
            write_line(&mut out, 'k', k);
        }
        for a in &self.attributes {
            write_line(&mut out, 'a', &a.to_string());
        }
        for m in &self.media {
            let port = match m.port_count {
                Some(count) => format!("{}/{}", m.port, count),
                None => m.port.to_string(),
            };
            write_line(
                &mut out,
                'm',
                &format!("{} {} {} {}", m.kind, port, m.protocol, m.formats.join(" ")),
            );
            if let Some(i) = &m.title {
                write_line(&mut out, 'i', i);
            }
            if let Some(c) = &m.connection {
                write_connection(&mut out, c);
            }
            for b in &m.bandwidths {
                write_line(&mut out, 'b', &format!("{}:{}", b.kind, b.value));
            }
            if let Some(k) = &m.encryption_key {
                write_line(&mut out, 'k', k);
            }
            for a in &m.attributes {
                write_line(&mut out, 'a', &a.to_string());
            }
        }
        f.write_str(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC4566_EXAMPLE: &str = "v=0\r\n\
o=jdoe 2890844526 2890842807 IN IP4 10.47.16.5\r\n\
s=SDP Seminar\r\n\
i=A Seminar on the session description protocol\r\n\
u=http://www.example.com/seminars/sdp.pdf\r\n\
e=j.doe@example.com (Jane Doe)\r\n\
c=IN IP4 224.2.17.12/127\r\n\
t=2873397496 2873404696\r\n\
a=recvonly\r\n\
m=audio 49170 RTP/AVP 0\r\n\
m=video 51372 RTP/AVP 99\r\n\
a=rtpmap:99 h263-1998/90000\r\n";

    #[test]
    fn parses_and_reserializes_the_rfc4566_example() {
        let sd = SessionDescription::parse(RFC4566_EXAMPLE).unwrap();
        assert_eq!(sd.origin.username, "jdoe");
        assert_eq!(sd.origin.session_id, "2890844526");
        assert_eq!(sd.origin.session_version, 2890842807);
        assert_eq!(sd.session_name, "SDP Seminar");
        assert_eq!(sd.emails, vec!["j.doe@example.com (Jane Doe)"]);
        let c = sd.connection.as_ref().unwrap();
        assert_eq!(c.address, "224.2.17.12/127");
        assert_eq!(c.ip(), Some("224.2.17.12".parse().unwrap()));
        assert_eq!(sd.timings[0].start, 2873397496);
        assert_eq!(sd.media.len(), 2);
        assert_eq!(sd.media[0].kind, MediaKind::Audio);
        assert_eq!(sd.media[0].codecs(), vec![Codec::pcmu()]);
        assert_eq!(sd.media[1].codecs()[0].name, "h263-1998");
        assert_eq!(sd.media_direction(0), Some(Direction::RecvOnly));
        assert_eq!(sd.media_direction(2), None);
        assert_eq!(sd.to_string(), RFC4566_EXAMPLE);
    }

    #[test]
    fn accepts_lf_only_and_blank_lines_and_adds_missing_timing() {
        let text =
            "v=0\no=- 1 2 IN IP4 192.0.2.1\ns=-\nc=IN IP4 192.0.2.1\n\nm=audio 4000 RTP/AVP 8\n\n";
        let sd = SessionDescription::parse(text).unwrap();
        assert_eq!(sd.timings.len(), 1);
        assert_eq!(sd.media[0].port, 4000);
        let out = sd.to_string();
        assert!(out.contains("t=0 0\r\n"));
        assert!(out.ends_with("m=audio 4000 RTP/AVP 8\r\n"));
        assert!(!out.replace("\r\n", "").contains('\n'));
    }

    #[test]
    fn media_level_overrides() {
        let text = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\na=sendonly\r\n\
m=audio 4000 RTP/AVP 0\r\nc=IN IP4 198.51.100.7\r\na=inactive\r\nm=video 5000/2 RTP/AVP 31\r\n";
        let sd = SessionDescription::parse(text).unwrap();
        assert_eq!(sd.media_direction(0), Some(Direction::Inactive));
        assert_eq!(sd.media_direction(1), Some(Direction::SendOnly));
        assert_eq!(sd.media_connection(0).unwrap().address, "198.51.100.7");
        assert_eq!(sd.media_connection(1).unwrap().address, "192.0.2.1");
        assert_eq!(sd.media[1].port_count, Some(2));
        assert_eq!(sd.to_string(), text);
    }

    #[test]
    fn rejects_garbage() {
        let ok_head = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\n";
        let cases: Vec<(String, SdpError)> = vec![
            (String::new(), SdpError::Empty),
            ("\r\n\r\n".into(), SdpError::Empty),
            ("v=1\r\n".into(), SdpError::BadVersion),
            ("hello world".into(), SdpError::BadVersion),
            ("v=0\r\ns=-\r\n".into(), SdpError::MissingLine('o')),
            (
                "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\n".into(),
                SdpError::MissingLine('s'),
            ),
            (
                format!("{ok_head}garbage\r\n"),
                SdpError::MalformedLine { line: 5 },
            ),
            (
                format!("{ok_head}A=b\r\n"),
                SdpError::MalformedLine { line: 5 },
            ),
            (
                format!("{ok_head}a=b\rc\r\n"),
                SdpError::MalformedLine { line: 5 },
            ),
            (
                format!("{ok_head}a=b\0\r\n"),
                SdpError::MalformedLine { line: 5 },
            ),
            (
                format!("{ok_head}x=1\r\n"),
                SdpError::UnexpectedLine { line: 5, kind: 'x' },
            ),
            (
                format!("{ok_head}s=again\r\n"),
                SdpError::DuplicateLine { line: 5, kind: 's' },
            ),
            (
                format!("{ok_head}m=audio 1 RTP/AVP 0\r\no=- 1 1 IN IP4 1.2.3.4\r\n"),
                SdpError::UnexpectedLine { line: 6, kind: 'o' },
            ),
            (
                format!("{ok_head}m=audio 1 RTP/AVP 0\r\nc=IN IP4 1.1.1.1\r\nc=IN IP4 1.1.1.2\r\n"),
                SdpError::DuplicateLine { line: 7, kind: 'c' },
            ),
            (
                format!("{ok_head}m=audio 70000 RTP/AVP 0\r\n"),
                SdpError::InvalidValue {
                    line: 5,
                    what: "media port",
                },
            ),
            (
                format!("{ok_head}m=audio 7000 RTP/AVP\r\n"),
                SdpError::InvalidValue {
                    line: 5,
                    what: "media line without formats",
                },
            ),
            (
                format!("{ok_head}m=audio 7000 RTP/AVP 0 abc\r\n"),
                SdpError::InvalidValue {
                    line: 5,
                    what: "RTP payload type",
                },
            ),
            (
                format!("{ok_head}m=audio 7000 RTP/AVP 0\r\na=rtpmap:0 PCMU\r\n"),
                SdpError::InvalidValue {
                    line: 6,
                    what: "rtpmap",
                },
            ),
            (
                "v=0\r\no=- x 1 IN IP4 1.2.3.4\r\ns=-\r\n".into(),
                SdpError::InvalidValue {
                    line: 2,
                    what: "origin session id",
                },
            ),
            (
                "v=0\r\no=- 1 1 IN IP4\r\ns=-\r\n".into(),
                SdpError::InvalidValue {
                    line: 2,
                    what: "origin",
                },
            ),
            (
                format!("{ok_head}c=IN IP4\r\n"),
                SdpError::InvalidValue {
                    line: 5,
                    what: "connection",
                },
            ),
            (
                format!("{ok_head}b=AS\r\n"),
                SdpError::InvalidValue {
                    line: 5,
                    what: "bandwidth",
                },
            ),
            (
                "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nr=7d 1h 0 25h\r\n".into(),
                SdpError::UnexpectedLine { line: 4, kind: 'r' },
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(SessionDescription::parse(&text), Err(expected), "{text:?}");
        }
        assert_eq!(
            SessionDescription::from_bytes(b"v=0\r\n\xff\xfe"),
            Err(SdpError::NotUtf8)
        );
    }

    #[test]
    fn enforces_limits() {
        let head = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\n";
        let many_media = format!("{head}{}", "m=audio 1 RTP/AVP 0\r\n".repeat(MAX_MEDIA + 1));
        assert_eq!(
            SessionDescription::parse(&many_media),
            Err(SdpError::TooMany("media descriptions"))
        );
        let many_attrs = format!("{head}{}", "a=x\r\n".repeat(MAX_ATTRIBUTES + 1));
        assert_eq!(
            SessionDescription::parse(&many_attrs),
            Err(SdpError::TooMany("attributes"))
        );
        let formats: Vec<String> = (0..=MAX_FORMATS).map(|i| (i % 128).to_string()).collect();
        let many_formats = format!("{head}m=audio 1 RTP/AVP {}\r\n", formats.join(" "));
        assert_eq!(
            SessionDescription::parse(&many_formats),
            Err(SdpError::TooMany("formats"))
        );
        let long = format!("{head}a=x:{}\r\n", "y".repeat(MAX_SDP_LEN));
        assert!(matches!(
            SessionDescription::parse(&long),
            Err(SdpError::TooLong(_))
        ));
    }

    #[test]
    fn codecs_resolve_static_dynamic_and_fmtp() {
        let text = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\n\
m=audio 4000 RTP/AVP 111 0 101 98\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 useinbandfec=1\r\n\
a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n";
        let sd = SessionDescription::parse(text).unwrap();
        let codecs = sd.media[0].codecs();
        assert_eq!(
            codecs,
            vec![
                Codec::opus(111).with_fmtp("useinbandfec=1"),
                Codec::pcmu(),
                Codec::telephone_event(101, 8000).with_fmtp("0-15"),
            ]
        );
    }

    #[test]
    fn non_rtp_media_is_kept() {
        let text = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\n\
m=image 4002 udptl t38\r\na=T38FaxVersion:0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n";
        let sd = SessionDescription::parse(text).unwrap();
        assert_eq!(sd.media[0].kind, MediaKind::Image);
        assert_eq!(sd.media[0].protocol, Protocol::Other("udptl".into()));
        assert!(sd.media[0].codecs().is_empty());
        assert_eq!(sd.to_string(), text);
    }

    #[test]
    fn serializer_drops_line_breaks_in_values() {
        let mut sd = SessionDescription::parse("v=0\no=- 1 1 IN IP4 1.2.3.4\ns=x\n").unwrap();
        sd.session_name = "a\r\nm=video 1 RTP/AVP 0".into();
        let reparsed = SessionDescription::parse(&sd.to_string()).unwrap();
        assert!(reparsed.media.is_empty());
    }
}
