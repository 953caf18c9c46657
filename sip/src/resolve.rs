//! RFC 3263 server location: to which address, over which transport, requests for a SIP URI go.
//!
//! Order of RFC 3263 section 4 without NAPTR (which SIP deployments rarely publish): a
//! `transport` parameter or an explicit port fixes the transport; `maddr` replaces the host; an
//! IP literal is used as is; with a port, A/AAAA records; without one, SRV records
//! (`_sip._udp`, then `_sip._tcp`; `_sips._tcp` for TLS) ordered by priority and weight, falling
//! back to A/AAAA on the default port (5060, 5061 for TLS). A `sips:` URI or `transport=tls`
//! goes over TLS only (RFC 3261 section 26.2). Lookups go through hickory-resolver with the
//! system configuration, or through fixed answers given by the caller (tests, and hosts without
//! DNS).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;

use crate::message::{Host, SipUri};
use crate::transport::{Peer, PeerTransport};

/// The transport a URI asks for: TLS for a `sips:` URI (RFC 3261 section 26.2; `transport=tcp`
/// on it means TLS over TCP, RFC 5630) and for `transport=tls`, else the one its `transport`
/// parameter names, `None` when it names none. An error for a transport the stack does not run
/// (or `sips:` with `transport=udp`).
pub fn uri_transport(uri: &SipUri) -> Result<Option<PeerTransport>, ResolveError> {
    let named = uri.transport().map(str::to_ascii_lowercase);
    Ok(match (uri.secure, named.as_deref()) {
        (true, None | Some("tcp") | Some("tls")) | (false, Some("tls")) => Some(PeerTransport::Tls),
        (false, None) => None,
        (false, Some("udp")) => Some(PeerTransport::Udp),
        (false, Some("tcp")) => Some(PeerTransport::Tcp),
        (_, Some(other)) => return Err(ResolveError::UnsupportedTransport(other.into())),
    })
}

/// The port a URI without one is reached on: 5061 over TLS, 5060 otherwise.
pub fn default_port(transport: Option<PeerTransport>) -> u16 {
    if transport == Some(PeerTransport::Tls) {
        5061
    } else {
        5060
    }
}

/// Resolution errors.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The URI asks for a transport this stack does not run.
    #[error("unsupported transport {0}")]
    UnsupportedTransport(String),
    /// The name has no usable records.
    #[error("no address for {0}")]
    NoAddress(String),
}

/// Looks up names: through DNS (hickory) or a fixed table.
#[derive(Clone)]
pub struct Resolver {
    dns: Option<TokioResolver>,
    fixed: HashMap<String, Vec<IpAddr>>,
    fixed_srv: HashMap<String, Vec<(u16, u16, u16, String)>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("dns", &self.dns.is_some())
            .field("fixed", &self.fixed)
            .finish()
    }
}

impl Resolver {
    /// A resolver using the system DNS configuration; without one (no resolv.conf), names
    /// resolve through the operating system's `getaddrinfo` only (no SRV).
    pub fn system() -> Self {
        let dns = TokioResolver::builder_tokio().ok().map(|b| b.build());
        Self {
            dns,
            fixed: HashMap::new(),
            fixed_srv: HashMap::new(),
        }
    }

    /// A resolver that answers only from fixed tables (no DNS at all).
    pub fn fixed() -> Self {
        Self {
            dns: None,
            fixed: HashMap::new(),
            fixed_srv: HashMap::new(),
        }
    }

    /// Adds a fixed A/AAAA answer for `name`.
    pub fn with_host(mut self, name: &str, addrs: Vec<IpAddr>) -> Self {
        self.fixed.insert(name.to_ascii_lowercase(), addrs);
        self
    }

    /// Adds a fixed SRV answer `(priority, weight, port, target)` for a name such as
    /// `_sip._udp.example.com`.
    pub fn with_srv(mut self, name: &str, records: Vec<(u16, u16, u16, String)>) -> Self {
        self.fixed_srv.insert(name.to_ascii_lowercase(), records);
        self
    }

    async fn lookup_ip(&self, name: &str, port: u16) -> Vec<SocketAddr> {
        if let Some(addrs) = self.fixed.get(&name.to_ascii_lowercase()) {
            return addrs.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        }
        if let Some(dns) = &self.dns {
            if let Ok(found) = dns.lookup_ip(name).await {
                let addrs: Vec<SocketAddr> =
                    found.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                if !addrs.is_empty() {
                    return addrs;
                }
            }
        }
        tokio::net::lookup_host((name, port))
            .await
            .map(|it| it.collect())
            .unwrap_or_default()
    }

    async fn lookup_srv(&self, name: &str) -> Vec<(u16, u16, u16, String)> {
        if let Some(records) = self.fixed_srv.get(&name.to_ascii_lowercase()) {
            return records.clone();
        }
        let Some(dns) = &self.dns else {
            return Vec::new();
        };
        match dns.srv_lookup(name).await {
            Ok(found) => found
                .iter()
                .map(|srv| {
                    (
                        srv.priority(),
                        srv.weight(),
                        srv.port(),
                        srv.target().to_utf8().trim_end_matches('.').to_string(),
                    )
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The ordered list of places to try for requests to `uri`.
    pub async fn resolve(&self, uri: &SipUri) -> Result<Vec<Peer>, ResolveError> {
        let fixed_transport = uri_transport(uri)?;
        let default_port = default_port(fixed_transport);
        let host = match uri.maddr() {
            Some(maddr) => Host::parse(maddr).unwrap_or_else(|_| uri.host.clone()),
            None => uri.host.clone(),
        };
        let peers = |addrs: Vec<SocketAddr>, transport| -> Vec<Peer> {
            addrs
                .into_iter()
                .map(|addr| Peer { addr, transport })
                .collect()
        };
        if let Some(ip) = host.ip() {
            let transport = fixed_transport.unwrap_or(PeerTransport::Udp);
            return Ok(peers(
                vec![SocketAddr::new(ip, uri.port.unwrap_or(default_port))],
                transport,
            ));
        }
        let name = match &host {
            Host::Domain(d) => d.trim_end_matches('.').to_string(),
            other => other.to_string(),
        };
        if let Some(port) = uri.port {
            let addrs = self.lookup_ip(&name, port).await;
            if addrs.is_empty() {
                return Err(ResolveError::NoAddress(name));
            }
            return Ok(peers(addrs, fixed_transport.unwrap_or(PeerTransport::Udp)));
        }
        let candidates: &[PeerTransport] = match fixed_transport {
            Some(PeerTransport::Udp) => &[PeerTransport::Udp],
            Some(PeerTransport::Tcp) => &[PeerTransport::Tcp],
            Some(PeerTransport::Tls) => &[PeerTransport::Tls],
            None => &[PeerTransport::Udp, PeerTransport::Tcp],
        };
        for transport in candidates {
            let service = match transport {
                PeerTransport::Udp => "_sip._udp",
                PeerTransport::Tcp => "_sip._tcp",
                PeerTransport::Tls => "_sips._tcp",
            };
            let mut records = self.lookup_srv(&format!("{service}.{name}")).await;
            if records.is_empty() {
                continue;
            }
            // Lowest priority first; among equals, heavier weight first (a deterministic
            // stand-in for RFC 2782's weighted random choice).
            records.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            let mut out = Vec::new();
            for (_, _, port, target) in records {
                out.extend(peers(self.lookup_ip(&target, port).await, *transport));
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
        let addrs = self.lookup_ip(&name, default_port).await;
        if addrs.is_empty() {
            return Err(ResolveError::NoAddress(name));
        }
        Ok(peers(addrs, fixed_transport.unwrap_or(PeerTransport::Udp)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> SipUri {
        SipUri::parse(s).unwrap()
    }

    #[tokio::test]
    async fn ip_literals_go_direct() {
        let r = Resolver::fixed();
        let p = r.resolve(&uri("sip:bob@127.0.0.1:5070")).await.unwrap();
        assert_eq!(p[0].addr, "127.0.0.1:5070".parse().unwrap());
        assert_eq!(p[0].transport, PeerTransport::Udp);
        let p = r
            .resolve(&uri("sip:bob@[::1];transport=tcp"))
            .await
            .unwrap();
        assert_eq!(p[0].addr, "[::1]:5060".parse().unwrap());
        assert_eq!(p[0].transport, PeerTransport::Tcp);
        let p = r
            .resolve(&uri("sip:bob@example.com;maddr=10.0.0.9"))
            .await
            .unwrap();
        assert_eq!(p[0].addr, "10.0.0.9:5060".parse().unwrap());
    }

    #[tokio::test]
    async fn srv_before_a_records_and_ordered() {
        let r = Resolver::fixed()
            .with_srv(
                "_sip._udp.example.com",
                vec![
                    (20, 0, 5080, "b.example.com".into()),
                    (10, 0, 5070, "a.example.com".into()),
                ],
            )
            .with_host("a.example.com", vec!["10.0.0.1".parse().unwrap()])
            .with_host("b.example.com", vec!["10.0.0.2".parse().unwrap()])
            .with_host("example.com", vec!["10.0.0.3".parse().unwrap()]);
        let p = r.resolve(&uri("sip:bob@example.com")).await.unwrap();
        assert_eq!(p[0].addr, "10.0.0.1:5070".parse().unwrap());
        assert_eq!(p[1].addr, "10.0.0.2:5080".parse().unwrap());
        // An explicit port skips SRV.
        let p = r.resolve(&uri("sip:bob@example.com:5099")).await.unwrap();
        assert_eq!(p[0].addr, "10.0.0.3:5099".parse().unwrap());
    }

    #[tokio::test]
    async fn tcp_srv_and_a_fallback() {
        let r = Resolver::fixed()
            .with_srv(
                "_sip._tcp.t.example",
                vec![(0, 0, 5090, "h.t.example".into())],
            )
            .with_host("h.t.example", vec!["10.1.1.1".parse().unwrap()])
            .with_host("plain.example", vec!["10.2.2.2".parse().unwrap()]);
        let p = r.resolve(&uri("sip:x@t.example")).await.unwrap();
        assert_eq!(p[0].transport, PeerTransport::Tcp);
        assert_eq!(p[0].addr, "10.1.1.1:5090".parse().unwrap());
        let p = r.resolve(&uri("sip:x@plain.example")).await.unwrap();
        assert_eq!(p[0].addr, "10.2.2.2:5060".parse().unwrap());
    }

    #[tokio::test]
    async fn sips_and_transport_tls_go_over_tls_on_5061_or_sips_srv() {
        let r = Resolver::fixed()
            .with_srv(
                "_sips._tcp.s.example",
                vec![(0, 0, 5071, "h.s.example".into())],
            )
            .with_host("h.s.example", vec!["10.3.3.3".parse().unwrap()]);
        for (text, addr) in [
            ("sips:bob@10.0.0.1", "10.0.0.1:5061"),
            ("sips:bob@10.0.0.1;transport=tcp", "10.0.0.1:5061"),
            ("sip:bob@10.0.0.1:5099;transport=tls", "10.0.0.1:5099"),
            ("sips:bob@s.example", "10.3.3.3:5071"),
        ] {
            let p = r.resolve(&uri(text)).await.unwrap();
            assert_eq!(
                (p[0].addr, p[0].transport),
                (addr.parse().unwrap(), PeerTransport::Tls),
                "{text}"
            );
        }
        assert!(matches!(
            r.resolve(&uri("sips:bob@10.0.0.1;transport=udp")).await,
            Err(ResolveError::UnsupportedTransport(_))
        ));
    }

    #[tokio::test]
    async fn unsupported_and_unknown() {
        let r = Resolver::fixed();
        assert!(matches!(
            r.resolve(&uri("sip:bob@10.0.0.1;transport=sctp")).await,
            Err(ResolveError::UnsupportedTransport(_))
        ));
        assert!(matches!(
            r.resolve(&uri("sip:bob@does-not-exist.invalid")).await,
            Err(ResolveError::NoAddress(_))
        ));
    }
}
