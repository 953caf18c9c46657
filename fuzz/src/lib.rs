//! Helpers shared by the fuzz targets (not a target itself): the heartbeat MAC line, computed
//! independently of `thalamus_ownership` so that the heartbeat and live-set targets can reach
//! the JSON decoding behind a valid MAC. Nothing here is used outside fuzz/.
#![forbid(unsafe_code)]

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The secret the heartbeat and live-set targets authenticate with.
pub const SECRET: &[u8] = b"fuzz-shared-secret-0123456789";
/// Another secret, which must never verify what [`SECRET`] sealed.
pub const OTHER_SECRET: &[u8] = b"another-secret";

/// The line that separates a heartbeat's JSON from its MAC (docs/balancer.md).
pub const MAC_PREFIX: &[u8] = b"\nhmac-sha256=";

/// `json` followed by the MAC line for `secret`, as a sender with that secret writes it.
pub fn seal(json: &[u8], secret: &[u8]) -> Vec<u8> {
    let mut out = json.to_vec();
    // HMAC takes keys of any length, so this never fails; an empty MAC would only make the
    // sealed datagram fail to verify, which the targets tolerate.
    if let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) {
        mac.update(json);
        out.extend_from_slice(MAC_PREFIX);
        out.extend_from_slice(hex::encode(mac.finalize().into_bytes()).as_bytes());
    }
    out
}

/// Whether two f32 values are equal or one unit in the last place apart (a JSON round trip of
/// an `f32` goes through `f64` and may land on a neighbour).
pub fn close_f32(a: f32, b: f32) -> bool {
    a == b || (i64::from(a.to_bits() as i32) - i64::from(b.to_bits() as i32)).abs() <= 1
}
