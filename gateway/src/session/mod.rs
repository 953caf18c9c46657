//! Device sessions: the sans-IO session state machine ([`core`]), its tokio driver over one
//! QUIC connection ([`driver`]), the authentication throttle ([`throttle`]) and the table of
//! live sessions by device id ([`Sessions`]), which enforces one session per device.

pub mod core;
pub mod driver;
pub mod throttle;

use std::sync::atomic::{AtomicU64, Ordering};

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
