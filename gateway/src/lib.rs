//! thalamus-gateway: the Thalamus gateway node.
//!
//! QUIC device ingress and authenticated device sessions (MBFP v1), with the admin endpoint and
//! metrics. The SIP bridge, media relay, cluster layer and load balancer attach here as they
//! land. Protocol rules live in sans-IO cores (`session::core`); the rest is thin tokio driving.
#![forbid(unsafe_code)]

pub mod admin;
pub mod bridge;
pub mod cluster;
pub mod config;
pub mod heartbeat;
pub mod metrics;
pub mod node;
pub mod registry;
pub mod resume;
pub mod session;
pub mod tls;
