//! The Via header value (RFC 3261 section 20.42, RFC 3581 rport): sent-protocol, sent-by and
//! parameters, with accessors for branch, received, rport, maddr and ttl.
//!
//! White space is accepted around `/`, `:`, `;` and `=` (as RFC 3261 and RFC 4475 wsinv require).
//! Splitting a Via header into its comma-separated values is done by the callers.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::name_addr::parse_params;
use super::params::Params;
use super::syntax::{find_param, is_token_byte, skip_ws, trim_ws_str, SyntaxResult};
use super::uri::{parse_port, Host, UriError};

/// The magic cookie that starts every RFC 3261 branch.
pub const BRANCH_MAGIC_COOKIE: &str = "z9hG4bK";

/// True for an RFC 3261 branch: it starts with the magic cookie `z9hG4bK` and has something
/// after it (RFC 4475 badbranch: a bare cookie is not a transaction identifier).
pub fn is_rfc3261_branch(branch: &str) -> bool {
    branch.len() > BRANCH_MAGIC_COOKIE.len() && branch.starts_with(BRANCH_MAGIC_COOKIE)
}

/// The transport named in a Via sent-protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
    /// SCTP.
    Sctp,
    /// TLS over SCTP.
    TlsSctp,
    /// WebSocket (RFC 7118).
    Ws,
    /// Secure WebSocket (RFC 7118).
    Wss,
    /// Any other transport token, as written.
    Other(String),
}

impl Transport {
    /// Parses a transport token, ignoring case.
    pub fn parse(s: &str) -> Self {
        for (name, t) in [
            ("UDP", Transport::Udp),
            ("TCP", Transport::Tcp),
            ("TLS", Transport::Tls),
            ("SCTP", Transport::Sctp),
            ("TLS-SCTP", Transport::TlsSctp),
            ("WS", Transport::Ws),
            ("WSS", Transport::Wss),
        ] {
            if s.eq_ignore_ascii_case(name) {
                return t;
            }
        }
        Transport::Other(s.to_owned())
    }

    /// The token to write (upper case for the known transports).
    pub fn as_str(&self) -> &str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
            Transport::Sctp => "SCTP",
            Transport::TlsSctp => "TLS-SCTP",
            Transport::Ws => "WS",
            Transport::Wss => "WSS",
            Transport::Other(s) => s,
        }
    }

    /// True for transports that deliver reliably (everything but UDP), which changes the
    /// retransmission rules of RFC 3261 section 17.
    pub fn is_reliable(&self) -> bool {
        !matches!(self, Transport::Udp)
    }

    /// True for transports secured by TLS.
    pub fn is_secure(&self) -> bool {
        matches!(self, Transport::Tls | Transport::TlsSctp | Transport::Wss)
    }

    /// The port used when a Via has none: 5061 for TLS, 5060 otherwise.
    pub fn default_port(&self) -> u16 {
        if self.is_secure() {
            5061
        } else {
            5060
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `rport` parameter (RFC 3581): requested by the client, or filled in by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rport {
    /// `;rport` without value: the client asks for the source port to be recorded.
    Requested,
    /// `;rport=1234`: the source port the server saw.
    Port(u16),
}

/// One Via header value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Via {
    /// Protocol name as written (normally `SIP`).
    pub protocol: String,
    /// Protocol version as written (normally `2.0`).
    pub version: String,
    /// Transport.
    pub transport: Transport,
    /// sent-by host.
    pub host: Host,
    /// sent-by port, when written.
    pub port: Option<u16>,
    /// Parameters (branch, received, rport...), as written.
    pub params: Params,
}

/// Why a Via value was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ViaError {
    /// Syntax error.
    #[error("{0}")]
    Syntax(&'static str),
    /// Malformed sent-by host.
    #[error("invalid sent-by host: {0}")]
    Host(#[from] UriError),
}

/// The pieces of a Via value borrowed from the header text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ViaParts<'a> {
    pub protocol: &'a str,
    pub version: &'a str,
    pub transport: &'a str,
    pub host: &'a str,
    pub port: Option<u16>,
    pub params: &'a str,
}

fn token_at(s: &str, start: usize) -> SyntaxResult<(&str, usize)> {
    let b = s.as_bytes();
    let mut i = start;
    while b.get(i).is_some_and(|&c| is_token_byte(c)) {
        i += 1;
    }
    if i == start {
        return Err("expected a token");
    }
    Ok((s.get(start..i).unwrap_or_default(), i))
}

fn expect_slash(b: &[u8], i: usize) -> SyntaxResult<usize> {
    let i = skip_ws(b, i);
    if b.get(i) != Some(&b'/') {
        return Err("expected '/' in sent-protocol");
    }
    Ok(skip_ws(b, i + 1))
}

/// Splits one Via value into its pieces; the parameters are not checked.
pub(crate) fn split_via(s: &str) -> SyntaxResult<ViaParts<'_>> {
    let s = trim_ws_str(s);
    let b = s.as_bytes();
    let (protocol, i) = token_at(s, 0)?;
    let (version, i) = token_at(s, expect_slash(b, i)?)?;
    let (transport, i) = token_at(s, expect_slash(b, i)?)?;
    let host_start = skip_ws(b, i);
    if host_start == i {
        return Err("expected white space before sent-by");
    }
    let host_end = if b.get(host_start) == Some(&b'[') {
        s.get(host_start..)
            .and_then(|r| r.find(']'))
            .map(|e| host_start + e + 1)
            .ok_or("unterminated IPv6 reference")?
    } else {
        let mut j = host_start;
        while b
            .get(j)
            .is_some_and(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
        {
            j += 1;
        }
        j
    };
    if host_end == host_start {
        return Err("missing sent-by host");
    }
    let host = s.get(host_start..host_end).unwrap_or_default();
    let mut i = skip_ws(b, host_end);
    let mut port = None;
    if b.get(i) == Some(&b':') {
        let start = skip_ws(b, i + 1);
        let mut end = start;
        while b.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        port =
            Some(parse_port(s.get(start..end).unwrap_or_default()).ok_or("invalid sent-by port")?);
        i = end;
    }
    Ok(ViaParts {
        protocol,
        version,
        transport,
        host,
        port,
        params: s.get(i..).unwrap_or_default(),
    })
}

/// The branch of a Via value, without allocating; `None` when absent or when the value is
/// malformed before its parameters.
pub(crate) fn via_branch(s: &str) -> Option<&str> {
    let parts = split_via(s).ok()?;
    find_param(parts.params, "branch").flatten()
}

impl Via {
    /// A `SIP/2.0/<transport>` Via for `host[:port]` without parameters.
    pub fn new(transport: Transport, host: Host, port: Option<u16>) -> Self {
        Self {
            protocol: "SIP".to_owned(),
            version: "2.0".to_owned(),
            transport,
            host,
            port,
            params: Params::new(),
        }
    }

    /// Sets the branch; builder style.
    pub fn with_branch(mut self, branch: &str) -> Self {
        self.set_branch(branch);
        self
    }

    /// Adds a valueless `rport` (RFC 3581 request); builder style.
    pub fn with_rport(mut self) -> Self {
        self.params.set("rport", None);
        self
    }

    /// Parses one Via value (not a list) and checks the well-known parameters: `branch` needs a
    /// value, `rport` is empty or a port, `ttl` is 0 to 255, `received` and `maddr` are hosts.
    pub fn parse(s: &str) -> Result<Self, ViaError> {
        let parts = split_via(s).map_err(ViaError::Syntax)?;
        let host = Host::parse(parts.host)?;
        let params = parse_params(parts.params).map_err(ViaError::Syntax)?;
        for p in &params {
            let v = p.value.as_deref();
            let name = p.name.as_str();
            let ok = if name.eq_ignore_ascii_case("branch") {
                v.is_some()
            } else if name.eq_ignore_ascii_case("rport") {
                v.is_none_or(|v| parse_port(v).is_some())
            } else if name.eq_ignore_ascii_case("ttl") {
                v.is_some_and(|v| v.len() <= 3 && v.parse::<u8>().is_ok())
            } else if name.eq_ignore_ascii_case("received") {
                v.is_some_and(|v| v.parse::<IpAddr>().is_ok() || Host::parse(v).is_ok())
            } else if name.eq_ignore_ascii_case("maddr") {
                v.is_some_and(|v| Host::parse(v).is_ok())
            } else {
                true
            };
            if !ok {
                return Err(ViaError::Syntax(
                    "invalid value of a well-known Via parameter",
                ));
            }
        }
        Ok(Self {
            protocol: parts.protocol.to_owned(),
            version: parts.version.to_owned(),
            transport: Transport::parse(parts.transport),
            host,
            port: parts.port,
            params,
        })
    }

    /// The `branch` parameter.
    pub fn branch(&self) -> Option<&str> {
        self.params.value("branch")
    }

    /// Sets the `branch` parameter.
    pub fn set_branch(&mut self, branch: &str) {
        self.params.set("branch", Some(branch));
    }

    /// True when the branch is an RFC 3261 one (see [`is_rfc3261_branch`]).
    pub fn has_rfc3261_branch(&self) -> bool {
        self.branch().is_some_and(is_rfc3261_branch)
    }

    /// The `received` parameter, as written.
    pub fn received(&self) -> Option<&str> {
        self.params.value("received")
    }

    /// The `received` parameter as an address (IPv6 with or without brackets).
    pub fn received_ip(&self) -> Option<IpAddr> {
        let v = self.received()?;
        let v = v
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(v);
        v.parse().ok()
    }

    /// Sets the `received` parameter (RFC 3261 section 18.2.1).
    pub fn set_received(&mut self, ip: IpAddr) {
        self.params.set("received", Some(&ip.to_string()));
    }

    /// The `rport` parameter.
    pub fn rport(&self) -> Option<Rport> {
        let p = self.params.get("rport")?;
        Some(match p.value.as_deref().and_then(parse_port) {
            Some(port) => Rport::Port(port),
            None => Rport::Requested,
        })
    }

    /// Fills in `rport` with the source port seen (RFC 3581 section 4).
    pub fn set_rport(&mut self, port: u16) {
        self.params.set("rport", Some(&port.to_string()));
    }

    /// The `maddr` parameter.
    pub fn maddr(&self) -> Option<&str> {
        self.params.value("maddr")
    }

    /// The `ttl` parameter.
    pub fn ttl(&self) -> Option<u8> {
        self.params.value("ttl").and_then(|v| v.parse().ok())
    }

    /// The sent-by port, or the transport's default port.
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or_else(|| self.transport.default_port())
    }
}

impl FromStr for Via {
    type Err = ViaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Via::parse(s)
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{} {}",
            self.protocol, self.version, self.transport, self.host
        )?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        write!(f, "{}", self.params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn plain_via() {
        let v =
            Via::parse("SIP/2.0/UDP pc33.atlanta.com:5066;branch=z9hG4bK776asdhds;rport").unwrap();
        assert_eq!(v.protocol, "SIP");
        assert_eq!(v.version, "2.0");
        assert_eq!(v.transport, Transport::Udp);
        assert_eq!(v.host, Host::Domain("pc33.atlanta.com".into()));
        assert_eq!(v.port, Some(5066));
        assert_eq!(v.branch(), Some("z9hG4bK776asdhds"));
        assert!(v.has_rfc3261_branch());
        assert_eq!(v.rport(), Some(Rport::Requested));
        assert_eq!(
            v.to_string(),
            "SIP/2.0/UDP pc33.atlanta.com:5066;branch=z9hG4bK776asdhds;rport"
        );
    }

    #[test]
    fn white_space_everywhere() {
        let v = Via::parse("SIP  /   2.0 /UDP    192.0.2.2;branch=390skdjuw").unwrap();
        assert_eq!(v.host, Host::Ipv4(Ipv4Addr::new(192, 0, 2, 2)));
        assert_eq!(v.branch(), Some("390skdjuw"));
        assert!(!v.has_rfc3261_branch());
        let w =
            Via::parse("SIP  / 2.0  / TCP     spindle.example.com   ;  branch  =   z9hG4bK9ikj8")
                .unwrap();
        assert_eq!(w.transport, Transport::Tcp);
        assert_eq!(w.branch(), Some("z9hG4bK9ikj8"));
        let p = Via::parse("SIP/2.0/UDP host : 5070 ;branch= z9hG4bK30239").unwrap();
        assert_eq!(p.port, Some(5070));
        assert_eq!(p.branch(), Some("z9hG4bK30239"));
    }

    #[test]
    fn received_and_rport() {
        let mut v = Via::new(
            Transport::Udp,
            Host::Domain("client.example.com".into()),
            None,
        )
        .with_branch("z9hG4bKabc")
        .with_rport();
        v.set_received("192.0.2.7".parse().unwrap());
        v.set_rport(40000);
        assert_eq!(v.received(), Some("192.0.2.7"));
        assert_eq!(v.received_ip(), Some("192.0.2.7".parse().unwrap()));
        assert_eq!(v.rport(), Some(Rport::Port(40000)));
        assert_eq!(
            v.to_string(),
            "SIP/2.0/UDP client.example.com;branch=z9hG4bKabc;rport=40000;received=192.0.2.7"
        );
        assert_eq!(Via::parse(&v.to_string()).unwrap(), v);
        let six = Via::parse(
            "SIP/2.0/TCP [2001:db8::9]:5061;received=2001:db8::1;ttl=16;maddr=224.2.0.1",
        )
        .unwrap();
        assert_eq!(six.host, Host::Ipv6("2001:db8::9".parse().unwrap()));
        assert_eq!(six.received_ip(), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(six.ttl(), Some(16));
        assert_eq!(six.maddr(), Some("224.2.0.1"));
        assert_eq!(six.port_or_default(), 5061);
    }

    #[test]
    fn transports() {
        for (t, expected) in [
            ("udp", Transport::Udp),
            ("SCTP", Transport::Sctp),
            ("TLS", Transport::Tls),
            ("ws", Transport::Ws),
            ("UNKNOWN", Transport::Other("UNKNOWN".into())),
        ] {
            let v = Via::parse(&format!("SIP/2.0/{t} h;branch=z9hG4bKx")).unwrap();
            assert_eq!(v.transport, expected);
        }
        assert!(!Transport::Udp.is_reliable());
        assert!(Transport::Tcp.is_reliable());
    }

    #[test]
    fn rejects_malformed_vias() {
        for bad in [
            "SIP/2.0/UDP 192.0.2.15;;",
            "SIP/2.0/UDP",
            "SIP/2.0 host",
            "SIP/2.0/UDPhost",
            "SIP/2.0/UDP host:99999",
            "SIP/2.0/UDP host:",
            "SIP/2.0/UDP host;branch",
            "SIP/2.0/UDP host;branch=",
            "SIP/2.0/UDP host;rport=x",
            "SIP/2.0/UDP host;ttl=256",
            "SIP/2.0/UDP host;received=not an ip",
            "SIP/2.0/UDP [::1",
            "SIP/2.0/UDP host junk",
            "",
        ] {
            assert!(Via::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn branch_helpers() {
        assert!(is_rfc3261_branch("z9hG4bK1"));
        assert!(!is_rfc3261_branch("z9hG4bK"));
        assert!(!is_rfc3261_branch("390skdjuw"));
        assert_eq!(
            via_branch("SIP/2.0/UDP h ; branch = z9hG4bKq ;rport"),
            Some("z9hG4bKq")
        );
        assert_eq!(via_branch("SIP/2.0/UDP h"), None);
    }
}
