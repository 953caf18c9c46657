//! What ingress hands devices to: [`DeviceRequests`] (the bridge: calls, texts, media, the
//! comings and goings of devices) and [`DevicePlacement`] (the node: where a device belongs).
//! Traits only; the bridge and the node implement them, tests fake them.

use thalamus_proto::v1::{Envelope, LiveCall, Redirect};

use crate::session::DeviceLink;

/// Answers device requests (calls, texts, presence) and follows device sessions. The SIP
/// bridge implements it.
pub trait DeviceRequests: Send + Sync {
    /// Handles one request from `device_id`; returns frames to send back at once.
    fn handle(&self, device_id: &str, request: Envelope) -> Vec<Envelope>;
    /// A session of `device_id` went live on `link` (before its Welcome is sent).
    fn online(&self, _device_id: &str, _link: DeviceLink) {}
    /// The session of `device_id` ended (not when it was replaced by a newer one).
    fn offline(&self, _device_id: &str) {}
    /// A media datagram from `device_id`.
    fn datagram(&self, _device_id: &str, _datagram: bytes::Bytes) {}
    /// The calls of `device_id` still up (listed in the Welcome of a resumed session).
    fn live_calls(&self, _device_id: &str) -> Vec<LiveCall> {
        Vec::new()
    }
    /// Whether `device_id` has any call here (cheaper than [`Self::live_calls`]).
    fn has_calls(&self, device_id: &str) -> bool {
        !self.live_calls(device_id).is_empty()
    }
    /// `device_id` presented a valid resume token; runs before its Welcome is built, so the
    /// calls it finds (held by a node that died, say) are in `live_calls`. The implementation
    /// bounds its own time.
    fn resume<'a>(
        &'a self,
        _device_id: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(std::future::ready(()))
    }
}

/// Where devices belong.
pub trait DevicePlacement: Send + Sync {
    /// Where `device_id`, whose credential just checked out, should log in instead of here;
    /// `None` serves it here.
    fn redirect_for(&self, device_id: &str) -> Option<Redirect>;
}

/// Serves every device here (a single node).
#[derive(Debug, Default, Clone, Copy)]
pub struct ServeHere;

impl DevicePlacement for ServeHere {
    fn redirect_for(&self, _device_id: &str) -> Option<Redirect> {
        None
    }
}
