//! RTP/RTCP port pairs from a configured range, handed out as guards.
//!
//! [`PortAllocator`] owns the even ports of a range on the media address (RTP on the even
//! port, RTCP on the next odd one, RFC 3550 section 11). [`PortAllocator::allocate`] returns a
//! [`PortPair`] guard; dropping the guard (the call ended, its task stopped or panicked) puts
//! the pair back at the end of the free list, so a just-released pair is reused last and stray
//! packets of an old call rarely reach a new one. The number of pairs is bounded by the range.
//!
//! What it does not do: it binds no sockets and so cannot know that another process holds a
//! port; the media relay binds the pair and, on failure, drops the guard and asks again.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Why a port range is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    /// No even port `p` with `p + 1` inside the range (or the range starts at 0).
    #[error("port range {min}-{max} holds no RTP/RTCP pair (even port and the next one, above 0)")]
    NoPair {
        /// Lowest port.
        min: u16,
        /// Highest port.
        max: u16,
    },
}

/// Why no pair could be allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// Every pair of the range is in use.
    #[error("all {capacity} RTP port pairs are in use")]
    Exhausted {
        /// Pairs in the range.
        capacity: usize,
    },
}

#[derive(Debug)]
struct Pool {
    ip: IpAddr,
    free: Mutex<VecDeque<u16>>,
    capacity: usize,
    in_use: AtomicUsize,
}

impl Pool {
    fn free(&self) -> MutexGuard<'_, VecDeque<u16>> {
        // A panic while holding this lock cannot leave the list inconsistent (every operation
        // is one push or pop), so a poisoned lock is used as is.
        self.free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Hands out RTP/RTCP port pairs of a range (cheap to clone; clones share the pool).
#[derive(Debug, Clone)]
pub struct PortAllocator {
    pool: Arc<Pool>,
}

impl PortAllocator {
    /// An allocator for the pairs `(p, p + 1)` with `p` even and `min <= p`, `p + 1 <= max`, on
    /// `ip`.
    pub fn new(ip: IpAddr, min: u16, max: u16) -> Result<Self, PortRangeError> {
        let first = u32::from(min.max(1)).div_ceil(2) * 2;
        let free: VecDeque<u16> = (first..u32::from(max))
            .step_by(2)
            .filter_map(|p| u16::try_from(p).ok())
            .collect();
        if free.is_empty() {
            return Err(PortRangeError::NoPair { min, max });
        }
        Ok(PortAllocator {
            pool: Arc::new(Pool {
                ip,
                capacity: free.len(),
                free: Mutex::new(free),
                in_use: AtomicUsize::new(0),
            }),
        })
    }

    /// A free pair, held until the returned guard is dropped.
    pub fn allocate(&self) -> Result<PortPair, PortError> {
        let rtp_port = self.pool.free().pop_front().ok_or(PortError::Exhausted {
            capacity: self.pool.capacity,
        })?;
        self.pool.in_use.fetch_add(1, Ordering::AcqRel);
        Ok(PortPair {
            pool: Arc::clone(&self.pool),
            rtp_port,
        })
    }

    /// Pairs currently held by guards.
    pub fn in_use(&self) -> usize {
        self.pool.in_use.load(Ordering::Acquire)
    }

    /// Pairs in the range.
    pub fn capacity(&self) -> usize {
        self.pool.capacity
    }

    /// The media address the ports belong to.
    pub fn ip(&self) -> IpAddr {
        self.pool.ip
    }
}

/// One allocated RTP/RTCP pair; released when dropped.
#[derive(Debug)]
pub struct PortPair {
    pool: Arc<Pool>,
    rtp_port: u16,
}

impl PortPair {
    /// The RTP port (even).
    pub fn rtp_port(&self) -> u16 {
        self.rtp_port
    }

    /// The RTCP port (RTP + 1).
    pub fn rtcp_port(&self) -> u16 {
        self.rtp_port.saturating_add(1)
    }

    /// The RTP socket address on the media address.
    pub fn rtp_addr(&self) -> SocketAddr {
        SocketAddr::new(self.pool.ip, self.rtp_port())
    }

    /// The RTCP socket address on the media address.
    pub fn rtcp_addr(&self) -> SocketAddr {
        SocketAddr::new(self.pool.ip, self.rtcp_port())
    }
}

impl Drop for PortPair {
    fn drop(&mut self) {
        self.pool.free().push_back(self.rtp_port);
        self.pool.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn localhost() -> IpAddr {
        IpAddr::from([127, 0, 0, 1])
    }

    #[test]
    fn pairs_are_even_and_inside_the_range() {
        let ports = PortAllocator::new(localhost(), 40_001, 40_010).unwrap();
        // Even ports 40002..=40008 (40010 has no 40011 in range).
        assert_eq!(ports.capacity(), 4);
        let pairs: Vec<PortPair> = (0..4).map(|_| ports.allocate().unwrap()).collect();
        let rtp: Vec<u16> = pairs.iter().map(PortPair::rtp_port).collect();
        assert_eq!(rtp, vec![40_002, 40_004, 40_006, 40_008]);
        assert!(pairs.iter().all(|p| p.rtcp_port() == p.rtp_port() + 1));
        assert_eq!(pairs[0].rtp_addr(), "127.0.0.1:40002".parse().unwrap());
        assert_eq!(pairs[0].rtcp_addr(), "127.0.0.1:40003".parse().unwrap());
        assert_eq!(ports.in_use(), 4);
        assert_eq!(
            ports.allocate().unwrap_err(),
            PortError::Exhausted { capacity: 4 }
        );
    }

    #[test]
    fn ranges_without_a_pair_are_refused() {
        assert!(PortAllocator::new(localhost(), 40_001, 40_002).is_err());
        assert!(PortAllocator::new(localhost(), 40_000, 40_000).is_err());
        assert!(PortAllocator::new(localhost(), 40_010, 40_000).is_err());
        assert!(PortAllocator::new(localhost(), 65_534, 65_535).is_ok());
        // Port 0 is never handed out.
        let ports = PortAllocator::new(localhost(), 0, 3).unwrap();
        assert_eq!(ports.allocate().unwrap().rtp_port(), 2);
    }

    #[test]
    fn dropping_the_guard_releases_the_pair_and_reuses_it_last() {
        let ports = PortAllocator::new(localhost(), 40_000, 40_005).unwrap();
        let first = ports.allocate().unwrap();
        assert_eq!(first.rtp_port(), 40_000);
        assert_eq!(ports.in_use(), 1);
        drop(first);
        assert_eq!(ports.in_use(), 0);
        assert_eq!(ports.allocate().unwrap().rtp_port(), 40_002);
        // Each guard below is dropped at the end of its statement and goes to the back.
        assert_eq!(ports.allocate().unwrap().rtp_port(), 40_004);
        assert_eq!(ports.allocate().unwrap().rtp_port(), 40_000);
        assert_eq!(ports.in_use(), 0);
    }

    #[test]
    fn a_panicking_holder_still_releases() {
        let ports = PortAllocator::new(localhost(), 40_000, 40_003).unwrap();
        let cloned = ports.clone();
        let result = std::thread::spawn(move || {
            let _pair = cloned.allocate().unwrap();
            panic!("call task failed");
        })
        .join();
        assert!(result.is_err());
        assert_eq!(ports.in_use(), 0);
        assert!(ports.allocate().is_ok());
    }

    #[test]
    fn concurrent_allocation_never_hands_out_a_pair_twice() {
        let ports = PortAllocator::new(localhost(), 20_000, 20_999).unwrap();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let ports = ports.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for _ in 0..100 {
                        held.push(ports.allocate().unwrap());
                    }
                    held
                })
            })
            .collect();
        let mut all = HashSet::new();
        let mut guards = Vec::new();
        for handle in handles {
            for pair in handle.join().unwrap() {
                assert!(all.insert(pair.rtp_port()));
                guards.push(pair);
            }
        }
        assert_eq!(ports.in_use(), 400);
        drop(guards);
        assert_eq!(ports.in_use(), 0);
    }
}
