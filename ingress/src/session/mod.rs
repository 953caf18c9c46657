//! Device sessions: the sans-IO session state machine ([`core`]), its tokio driver over one
//! QUIC connection ([`driver`]), the authentication throttle ([`throttle`]) and the table of
//! live sessions by device id ([`Sessions`]), which enforces one session per device.

pub mod core;
pub mod driver;
pub mod throttle;

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

/// Why a datagram could not be sent to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The link's send buffer is full: try again shortly.
    #[error("datagram send buffer full")]
    Blocked,
    /// Larger than the link can carry now.
    #[error("datagram too large for the device link")]
    TooLarge,
    /// The device does not accept datagrams.
    #[error("datagrams not supported on the device link")]
    Unsupported,
    /// The connection is gone.
    #[error("device connection closed")]
    Closed,
}

/// A device's connection as the rest of the node sees it: where its media datagrams go. Cheap
/// to clone; the QUIC connection itself stays inside this crate.
#[derive(Debug, Clone)]
pub struct DeviceLink {
    conn: quinn::Connection,
    takes_transfers: bool,
    resumed: bool,
}

impl DeviceLink {
    pub(crate) fn new(conn: quinn::Connection, takes_transfers: bool, resumed: bool) -> Self {
        Self {
            conn,
            takes_transfers,
            resumed,
        }
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
        if self.conn.datagram_send_buffer_space() < datagram.len() {
            return Err(LinkError::Blocked);
        }
        self.conn.send_datagram(datagram).map_err(|e| match e {
            quinn::SendDatagramError::TooLarge => LinkError::TooLarge,
            quinn::SendDatagramError::UnsupportedByPeer | quinn::SendDatagramError::Disabled => {
                LinkError::Unsupported
            }
            quinn::SendDatagramError::ConnectionLost(_) => LinkError::Closed,
        })
    }

    /// The largest datagram the link accepts now, if it knows (header included).
    pub fn max_datagram_bytes(&self) -> Option<usize> {
        self.conn.max_datagram_size()
    }
}
