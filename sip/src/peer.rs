//! Where a message comes from or goes to ([`Peer`]: a socket address and the transport the
//! stack runs on it, [`PeerTransport`]). One type for the transport layer, the transaction
//! layer, the endpoint, the user agent and the balancer. Data only.
//!
//! For a connection-oriented transport the address names the connection: the transport maps
//! `(transport, addr)` to its connection with that peer.

use std::net::SocketAddr;

use crate::message::Transport;

/// A remote transport address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Socket address of the remote end.
    pub addr: SocketAddr,
    /// Transport (decides the retransmission rules: only UDP is unreliable).
    pub transport: PeerTransport,
}

impl Peer {
    /// A peer.
    pub fn new(addr: SocketAddr, transport: PeerTransport) -> Self {
        Self { addr, transport }
    }

    /// A UDP peer.
    pub fn udp(addr: SocketAddr) -> Self {
        Self::new(addr, PeerTransport::Udp)
    }

    /// A TCP peer.
    pub fn tcp(addr: SocketAddr) -> Self {
        Self::new(addr, PeerTransport::Tcp)
    }

    /// True unless the transport is UDP.
    pub fn is_reliable(&self) -> bool {
        self.transport.is_reliable()
    }
}

/// The transports the stack runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerTransport {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// TLS over TCP (RFC 3261 section 26; `sips:` and `transport=tls`).
    Tls,
}

impl PeerTransport {
    /// The Via transport token.
    pub fn as_transport(self) -> Transport {
        match self {
            PeerTransport::Udp => Transport::Udp,
            PeerTransport::Tcp => Transport::Tcp,
            PeerTransport::Tls => Transport::Tls,
        }
    }

    /// The transport a Via token names, if the stack runs it.
    pub fn from_transport(transport: &Transport) -> Option<PeerTransport> {
        match transport {
            Transport::Udp => Some(PeerTransport::Udp),
            Transport::Tcp => Some(PeerTransport::Tcp),
            Transport::Tls => Some(PeerTransport::Tls),
            _ => None,
        }
    }

    /// Whether the transport is reliable (changes transaction timers).
    pub fn is_reliable(self) -> bool {
        matches!(self, PeerTransport::Tcp | PeerTransport::Tls)
    }
}
