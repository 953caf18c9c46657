//! The `c=` line ([`Connection`]): network type, address type and address. Data only.

use std::net::IpAddr;

/// A `c=` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// Network type, `IN`.
    pub net_type: String,
    /// Address type, `IP4` or `IP6`.
    pub addr_type: String,
    /// The address as written (an IP address or a name, possibly with `/ttl` for multicast).
    pub address: String,
}

impl Connection {
    /// `IN IP4 <ip>` or `IN IP6 <ip>`.
    pub fn from_ip(ip: IpAddr) -> Self {
        Connection {
            net_type: "IN".into(),
            addr_type: match ip {
                IpAddr::V4(_) => "IP4".into(),
                IpAddr::V6(_) => "IP6".into(),
            },
            address: ip.to_string(),
        }
    }

    /// The address as an IP address (without any `/ttl` suffix); `None` for host names.
    pub fn ip(&self) -> Option<IpAddr> {
        let host = self.address.split('/').next().unwrap_or_default();
        host.parse().ok()
    }

    /// Whether this is the RFC 2543 hold address `0.0.0.0` (or `::`).
    pub fn is_unspecified(&self) -> bool {
        self.ip().is_some_and(|ip| ip.is_unspecified())
    }
}
