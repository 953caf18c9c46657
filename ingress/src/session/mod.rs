//! Device sessions: the sans-IO session state machine ([`core`]), its tokio driver over one
//! QUIC connection or WebTransport session ([`driver`], `link`), the authentication
//! throttle ([`throttle`]) and the table of live sessions by device id ([`Sessions`]), which
//! enforces one session per device.

pub mod core;
pub mod driver;
pub(crate) mod link;
pub mod throttle;

pub use link::LinkError;

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use thalamus_proto::v1::Envelope;
use tokio::sync::mpsc;

use crate::resume::SessionId;

/// A command to a live session's driver from elsewhere in the gateway.
#[derive(Debug)]
pub enum SessionCommand {
    /// A newer login of the same device took over.
    Replaced,
    /// The gateway is stopping (or draining).
    Shutdown {
        /// Draining rather than stopping.
        draining: bool,
    },
    /// Send this frame to the device (boxed: keeps the channel's slots small).
    Send(Box<Envelope>),
    /// Ping the device now and close the session if nothing comes back within this long (the
    /// node was frozen: the device may have given up on it and moved elsewhere).
    Probe(std::time::Duration),
}

/// How to reach a live session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// The session id.
    pub session_id: SessionId,
    /// Identifies the connection (a resumed session gets a new one).
    pub connection_id: u64,
    /// Command channel.
    pub commands: mpsc::Sender<SessionCommand>,
}

/// Live sessions by device id: at most one per device.
#[derive(Debug, Default)]
pub struct Sessions {
    by_device: DashMap<String, SessionHandle>,
    next_connection_id: AtomicU64,
}

impl Sessions {
    /// A fresh connection id.
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Installs `handle` as `device_id`'s session and returns the one it replaces.
    pub fn install(&self, device_id: &str, handle: SessionHandle) -> Option<SessionHandle> {
        self.by_device.insert(device_id.to_string(), handle)
    }

    /// Removes `device_id`'s session if it is still the one on `connection_id`.
    pub fn remove_if_current(&self, device_id: &str, connection_id: u64) -> bool {
        self.by_device
            .remove_if(device_id, |_, h| h.connection_id == connection_id)
            .is_some()
    }

    /// The live session of `device_id`.
    pub fn get(&self, device_id: &str) -> Option<SessionHandle> {
        self.by_device.get(device_id).map(|h| h.clone())
    }

    /// Connections opened so far (a generation: it changes whenever a device connects, so a
    /// sweep that found every device settled knows when to look again).
    pub fn connections_opened(&self) -> u64 {
        self.next_connection_id.load(Ordering::Relaxed)
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.by_device.len()
    }

    /// Whether there is no live session.
    pub fn is_empty(&self) -> bool {
        self.by_device.is_empty()
    }

    /// Ids of devices with a live session.
    pub fn device_ids(&self) -> Vec<String> {
        self.by_device.iter().map(|e| e.key().clone()).collect()
    }

    /// Sends `command` to every live session (shutdown, draining).
    pub fn broadcast(&self, make: impl Fn() -> SessionCommand) {
        for entry in self.by_device.iter() {
            let _ = entry.value().commands.try_send(make());
        }
    }
}

/// A device's connection as the rest of the node sees it: where its media datagrams go. Cheap
/// to clone; the QUIC connection itself stays inside this crate.
#[derive(Debug, Clone)]
pub struct DeviceLink {
    conn: link::Transport,
    takes_transfers: bool,
    resumed: bool,
}

impl DeviceLink {
    pub(crate) fn new(conn: link::Transport, takes_transfers: bool, resumed: bool) -> Self {
        Self {
            conn,
            takes_transfers,
            resumed,
        }
    }

    /// The transport the device came over: `quic` or `webtransport`.
    pub fn transport(&self) -> &'static str {
        self.conn.label()
    }

    /// Whether the session was resumed ([`crate::DeviceRequests::resume`] ran for it before
    /// its `Welcome`).
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Whether the device follows transfers its remote party asks for (its Hello's
    /// `Capabilities.transfer`, MBFP revision 2).
    pub fn takes_transfers(&self) -> bool {
        self.takes_transfers
    }

    /// Sends one datagram without waiting. A full send buffer is reported as
    /// [`LinkError::Blocked`] (quinn itself would drop its oldest datagram), so the caller's
    /// own drop-oldest buffer, which counts, decides.
    pub fn send_datagram(&self, datagram: Bytes) -> Result<(), LinkError> {
        self.conn.send_datagram(datagram)
    }

    /// The largest datagram the link accepts now, if it knows (header included).
    pub fn max_datagram_bytes(&self) -> Option<usize> {
        self.conn.max_datagram_size()
    }
}
