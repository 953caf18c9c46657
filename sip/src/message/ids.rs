//! Random identifiers for new transactions and dialogs: tags (RFC 3261 section 19.3), branches
//! (section 8.1.1.7, with the `z9hG4bK` magic cookie) and Call-IDs (section 8.1.1.4).
//!
//! They use the stack's generator ([`crate::rng`]: the thread-local CSPRNG, or a seeded one in
//! reproducible tests); uniqueness across nodes comes from their length
//! (at least 64 random bits each). This module does not track which identifiers are in use.

use rand::distributions::Alphanumeric;
use rand::Rng;

use super::via::BRANCH_MAGIC_COOKIE;

fn random_alphanumeric(len: usize) -> String {
    crate::rng::with(|rng| {
        rng.sample_iter(&Alphanumeric)
            .take(len)
            .map(char::from)
            .collect()
    })
}

/// A random tag for From or To: 16 alphanumeric characters (about 95 bits).
pub fn generate_tag() -> String {
    random_alphanumeric(16)
}

/// A random RFC 3261 branch: `z9hG4bK` followed by 22 alphanumeric characters (about 130 bits).
pub fn generate_branch() -> String {
    let mut b = String::with_capacity(BRANCH_MAGIC_COOKIE.len() + 22);
    b.push_str(BRANCH_MAGIC_COOKIE);
    b.push_str(&random_alphanumeric(22));
    b
}

/// A random Call-ID: 24 alphanumeric characters, followed by `@host` when a host is given.
pub fn generate_call_id(host: Option<&str>) -> String {
    let mut id = random_alphanumeric(24);
    if let Some(h) = host {
        id.push('@');
        id.push_str(h);
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::via::is_rfc3261_branch;
    use std::collections::HashSet;

    #[test]
    fn identifiers_have_the_right_shape_and_differ() {
        let tag = generate_tag();
        assert_eq!(tag.len(), 16);
        assert!(tag.bytes().all(|b| b.is_ascii_alphanumeric()));
        let branch = generate_branch();
        assert!(is_rfc3261_branch(&branch));
        assert_eq!(branch.len(), 29);
        let call_id = generate_call_id(Some("gw.example.com"));
        assert!(call_id.ends_with("@gw.example.com"));
        assert_eq!(generate_call_id(None).len(), 24);
        let many: HashSet<String> = (0..1000).map(|_| generate_branch()).collect();
        assert_eq!(many.len(), 1000);
    }
}
