//! What the node's own tasks share ([`NodeShared`]: the node's id, its metrics, the device
//! sessions, the bridge, the heartbeats and the draining flag) and the node's rule for where a
//! device belongs ([`NodeShared::redirect_for`], from the live set the balancers report).
//!
//! It starts nothing; `node` builds it, and the admin endpoint, the ownership sweep and device
//! ingress read it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thalamus_bridge::Bridge;
use thalamus_ingress::{DevicePlacement, DeviceRegistry, DeviceRequests, Sessions};
use thalamus_ownership::heartbeat::LiveSet;
use thalamus_proto::v1::Redirect;
use tracing::{info, warn};

use crate::heartbeat::HeartbeatSender;
use crate::metrics::Metrics;

/// What the node's own tasks (admin, ownership sweep, device placement) share.
pub struct NodeShared {
    /// This node's id.
    pub node_id: String,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Registered devices.
    pub registry: Arc<DeviceRegistry>,
    /// Live device sessions.
    pub sessions: Arc<Sessions>,
    /// The SIP bridge (calls, and the admin endpoint's dialog operations).
    pub bridge: Bridge,
    /// Heartbeats to the balancers, and the live set they answer with (when configured).
    pub heartbeats: Option<Arc<HeartbeatSender>>,
    /// The bearer token admin requests that change anything must present.
    pub(crate) admin_token: String,
    /// Admin requests refused, by reason (`no_token`, `bad_token`, `cross_site`).
    pub(crate) admin_refused: prometheus_client::metrics::family::Family<
        thalamus_telemetry::ReasonLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    /// How old a live set may be to redirect devices by it; `None`: redirects are off.
    pub(crate) redirect_max_age: Option<Duration>,
    /// Draining: no new devices or calls; devices leave as their calls end.
    pub(crate) draining: AtomicBool,
    /// Stepped aside: draining because this node alone lost the dialog store.
    pub(crate) stepped_aside: AtomicBool,
    /// Whether the dialog store answers (the cluster layer's probe).
    pub(crate) store_up: tokio::sync::watch::Receiver<bool>,
    /// Times the node found it was out of the live set and checked its sessions and dialogs.
    pub(crate) recoveries: prometheus_client::metrics::counter::Counter,
    /// The balancers' node table, for the console (`[admin] balancers`).
    pub(crate) balancer_table: crate::cluster_table::BalancerTable,
}

impl NodeShared {
    /// Counts one recovery (see `recover_when_out_of_the_live_set`).
    pub(crate) fn count_recovery(&self) {
        self.recoveries.inc();
    }

    /// The live set the balancers last reported, when redirects are on and a report arrived
    /// within the balancers' miss window (a report answers every heartbeat; none for 3.5
    /// intervals means no balancer hears this node).
    pub(crate) fn fresh_live_set(&self) -> Option<LiveSet> {
        self.heartbeats.as_ref()?.live_set(self.redirect_max_age?)
    }

    /// `device_id`'s owner in `live` when that is another node with a device address and the
    /// device has no call here.
    pub(crate) fn owner_elsewhere(&self, live: &LiveSet, device_id: &str) -> Option<Redirect> {
        let owner = live.owner(device_id)?;
        if owner.node.as_str() == self.node_id {
            return None;
        }
        let address = owner.quic?;
        if self.bridge.has_calls(device_id) {
            return None;
        }
        Some(Redirect {
            address: address.to_string(),
            node_id: owner.node.as_str().to_string(),
        })
    }

    /// Whether the dialog store answers (false: the node serves, unreplicated).
    pub fn store_up(&self) -> bool {
        *self.store_up.borrow()
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts or stops draining. While draining, the heartbeats say so: the balancers send no
    /// new calls here and the live set they report leaves this node out, so logins are
    /// redirected to the devices' new owners and the ownership sweep moves the devices that
    /// have no call; devices' `Dial`s are refused (`Busy`: they call again from the node they
    /// move to). Calls in progress go on to their end. Without balancers there is nowhere to
    /// send devices: they stay, and their `Dial`s are refused while the node drains (a SIGTERM
    /// drain also answers new INVITEs 503: `GatewayNode::drain`).
    pub fn set_draining(&self, draining: bool) {
        if self.draining.swap(draining, Ordering::Relaxed) != draining {
            info!(draining, "node draining changed");
        }
        self.metrics.draining.set(i64::from(draining));
        // A device places new calls from the node it moves to, not from this one.
        self.bridge
            .refuse_dials(draining || self.stepped_aside.load(Ordering::Relaxed));
        if let Some(hb) = &self.heartbeats {
            hb.set_draining(draining);
        }
    }
}

impl NodeShared {
    /// Whether the node steps aside.
    pub fn is_stepped_aside(&self) -> bool {
        self.stepped_aside.load(Ordering::Relaxed)
    }

    /// Steps aside, or back: the node drains as for [`NodeShared::set_draining`] (announced
    /// in its heartbeats, devices' `Dial`s refused, devices moved by the sweep) without
    /// touching the operator's draining flag.
    pub fn set_stepped_aside(&self, aside: bool) {
        if self.stepped_aside.swap(aside, Ordering::Relaxed) == aside {
            return;
        }
        if aside {
            warn!("the dialog store does not answer this node while other nodes reach it: stepping aside (draining) until it answers");
        } else {
            info!("the dialog store answers again: taking calls again");
        }
        self.metrics.stepped_aside.set(i64::from(aside));
        self.bridge.refuse_dials(aside || self.is_draining());
        if let Some(hb) = &self.heartbeats {
            hb.set_stepped_aside(aside);
        }
    }
}

impl DevicePlacement for NodeShared {
    /// Where `device_id` should log in instead of here: its owner in the live set the
    /// balancers last reported, when that is another node. `None` (serve here) when redirects
    /// are off, when no fresh report arrived, when no node is eligible, and when the device
    /// has calls on this node.
    fn redirect_for(&self, device_id: &str) -> Option<Redirect> {
        let live = self.fresh_live_set()?;
        self.owner_elsewhere(&live, device_id)
    }
}

impl std::fmt::Debug for NodeShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeShared")
            .field("node", &self.node_id)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}
