//! [`TransactionKey`]: the handle on one transaction. Data only.

/// A handle on one transaction of a [`TransactionLayer`](super::TransactionLayer): cheap to copy and compare, and never
/// reused for another transaction (a slot index plus a generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransactionKey {
    pub(super) index: u32,
    pub(super) generation: u32,
}

impl TransactionKey {
    /// A key from its parts. Only the layer issues keys that name a transaction; this is for
    /// tests of transaction users (a sans-IO call core, say), which need distinct handles
    /// without a transaction layer behind them.
    pub fn from_parts(index: u32, generation: u32) -> Self {
        Self { index, generation }
    }
}
