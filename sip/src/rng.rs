//! The randomness of the SIP stack: tags, branches and Call-IDs, the first local CSeq of a
//! dialog, SDP session ids and digest nonces and cnonces all come from [`with`].
//!
//! By default that is the thread's OS-seeded CSPRNG (`rand::thread_rng`). [`seed`] replaces it,
//! on the calling thread only, with a generator seeded from a number, so a test (or a sans-IO
//! simulation on one thread) makes the same identifiers on every run; [`unseed`] goes back.
//! Uniqueness across nodes comes from the identifiers' length, not from this module.

use std::cell::RefCell;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

thread_local! {
    static SEEDED: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Makes this thread's SIP randomness the deterministic sequence of `seed`.
pub fn seed(seed: u64) {
    SEEDED.with(|s| *s.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

/// Goes back to the OS-seeded generator on this thread.
pub fn unseed() {
    SEEDED.with(|s| *s.borrow_mut() = None);
}

/// Runs `f` with this thread's generator (seeded, or the OS-seeded one).
pub fn with<R>(f: impl FnOnce(&mut dyn RngCore) -> R) -> R {
    SEEDED.with(|s| match s.borrow_mut().as_mut() {
        Some(rng) => f(rng),
        None => f(&mut rand::thread_rng()),
    })
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;
    use crate::message::{generate_branch, generate_call_id, generate_tag};

    fn identifiers() -> Vec<String> {
        vec![
            generate_tag(),
            generate_branch(),
            generate_call_id(Some("gw")),
            crate::sdp::SdpSession::with_random_id()
                .session_id()
                .to_string(),
            with(|r| r.gen::<u32>()).to_string(),
        ]
    }

    #[test]
    fn a_seeded_thread_repeats_its_identifiers() {
        seed(7);
        let first = identifiers();
        seed(7);
        assert_eq!(identifiers(), first);
        seed(8);
        assert_ne!(identifiers(), first);
        unseed();
        assert_ne!(identifiers(), identifiers());
    }
}
