//! The cluster layer: the replicated dialog store (memory, embedded redb, Redis), takeover and membership.
