//! The SIP load balancer: a stateless proxy that routes by rendezvous hash over live nodes.
