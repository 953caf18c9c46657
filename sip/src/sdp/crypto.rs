//! SDES keys in SDP (RFC 4568): the `a=crypto` attribute of an `RTP/SAVP` stream, parsed and
//! written, and the choice an answerer makes among the offered ones.
//!
//! `a=crypto:<tag> <suite> inline:<base64 key||salt>[|<lifetime>][|<MKI>:<length>] [<session
//! parameters>]`. A [`Crypto`] keeps the tag, the suite, the decoded key and salt of the first
//! `inline` key, and whether anything this crate does not use is there (a lifetime, an MKI,
//! several keys, session parameters). [`choose`] picks the first offered attribute this side
//! can use, in the offerer's order, as section 7.1.1 asks, and answers it with this side's key
//! for that suite under the offered tag.
//!
//! What it does not do: no key generation (the caller gives its keys), no SRTP (the media relay
//! protects packets), no DTLS-SRTP, no MKI and no key lifetimes (an offer that needs them is not
//! chosen).

use std::fmt;

use base64::Engine;

/// Whether a side's streams use SRTP (with SDES keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SrtpPolicy {
    /// Plain RTP only: `RTP/SAVP` offers are rejected (port 0).
    #[default]
    Off,
    /// Offers go as plain RTP; an `RTP/SAVP` offer with a usable key is answered with SRTP.
    Accept,
    /// Offers go as `RTP/SAVP` with this side's keys; plain RTP offers are rejected.
    Require,
}

/// A crypto suite this crate knows the key length of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CryptoSuite {
    /// `AES_CM_128_HMAC_SHA1_80` (RFC 4568): 16-byte key, 14-byte salt, 80-bit tag.
    AesCm128HmacSha1_80,
    /// `AES_CM_128_HMAC_SHA1_32` (RFC 4568): as above with a 32-bit tag.
    AesCm128HmacSha1_32,
    /// `AEAD_AES_128_GCM` (RFC 7714): 16-byte key, 12-byte salt.
    AeadAes128Gcm,
    /// `AEAD_AES_256_GCM` (RFC 7714): 32-byte key, 12-byte salt.
    AeadAes256Gcm,
}

impl CryptoSuite {
    /// Every suite, strongest first (the order an offer lists them in).
    pub const ALL: [CryptoSuite; 4] = [
        CryptoSuite::AeadAes256Gcm,
        CryptoSuite::AeadAes128Gcm,
        CryptoSuite::AesCm128HmacSha1_80,
        CryptoSuite::AesCm128HmacSha1_32,
    ];

    /// The suite's name in SDP.
    pub fn as_str(self) -> &'static str {
        match self {
            CryptoSuite::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
            CryptoSuite::AesCm128HmacSha1_32 => "AES_CM_128_HMAC_SHA1_32",
            CryptoSuite::AeadAes128Gcm => "AEAD_AES_128_GCM",
            CryptoSuite::AeadAes256Gcm => "AEAD_AES_256_GCM",
        }
    }

    /// The suite named `name` (case as written in SDP, compared exactly).
    pub fn from_name(name: &str) -> Option<CryptoSuite> {
        CryptoSuite::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Bytes of the master key and of the master salt.
    pub fn key_and_salt_len(self) -> (usize, usize) {
        match self {
            CryptoSuite::AesCm128HmacSha1_80 | CryptoSuite::AesCm128HmacSha1_32 => (16, 14),
            CryptoSuite::AeadAes128Gcm => (16, 12),
            CryptoSuite::AeadAes256Gcm => (32, 12),
        }
    }
}

impl fmt::Display for CryptoSuite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `a=crypto` attribute.
#[derive(Clone, PartialEq, Eq)]
pub struct Crypto {
    /// The tag (1-999999999) the answer repeats.
    pub tag: u32,
    /// The suite as written.
    pub suite: String,
    /// The first `inline` key's key and salt, decoded.
    pub key_salt: Vec<u8>,
    /// Something this crate does not use is there: a lifetime, an MKI, several keys or session
    /// parameters. Such an attribute is never chosen.
    pub has_extras: bool,
}

impl fmt::Debug for Crypto {
    /// The key is not printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Crypto")
            .field("tag", &self.tag)
            .field("suite", &self.suite)
            .field("key_salt", &format_args!("<{} bytes>", self.key_salt.len()))
            .field("has_extras", &self.has_extras)
            .finish()
    }
}

impl Crypto {
    /// An attribute with tag `tag` for `suite` and this key and salt.
    pub fn new(tag: u32, suite: CryptoSuite, key_salt: Vec<u8>) -> Self {
        Crypto {
            tag,
            suite: suite.as_str().to_string(),
            key_salt,
            has_extras: false,
        }
    }

    /// Parses the value after `a=crypto:`; `None` when it is malformed.
    pub fn parse(value: &str) -> Option<Crypto> {
        let mut fields = value.split_ascii_whitespace();
        let tag: u32 = fields
            .next()?
            .parse()
            .ok()
            .filter(|t| (1..=999_999_999).contains(t))?;
        let suite = fields.next()?.to_string();
        let key_params = fields.next()?;
        let session_params = fields.next().is_some();
        let mut keys = key_params.split(';');
        let first = keys.next()?.strip_prefix("inline:")?;
        let mut parts = first.split('|');
        let key_salt = base64::engine::general_purpose::STANDARD
            .decode(parts.next()?)
            .ok()?;
        let has_extras = session_params || keys.next().is_some() || parts.next().is_some();
        Some(Crypto {
            tag,
            suite,
            key_salt,
            has_extras,
        })
    }

    /// The suite, if this crate knows it.
    pub fn known_suite(&self) -> Option<CryptoSuite> {
        CryptoSuite::from_name(&self.suite)
    }

    /// Whether this side can use it: a known suite, a key and salt of that suite's lengths,
    /// nothing else.
    pub fn is_usable(&self) -> bool {
        self.known_suite().is_some_and(|s| {
            let (key, salt) = s.key_and_salt_len();
            self.key_salt.len() == key + salt
        }) && !self.has_extras
    }
}

impl fmt::Display for Crypto {
    /// The value after `a=crypto:` (the key in base64).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = base64::engine::general_purpose::STANDARD.encode(&self.key_salt);
        write!(f, "{} {} inline:{key}", self.tag, self.suite)
    }
}

/// The answer to a list of offered attributes: the first usable one (in the offerer's order)
/// whose suite is among `ours`, answered with our key of that suite under the offered tag;
/// with the offered attribute (whose key the offerer sends with). `None` when none fits.
pub fn choose(offered: &[Crypto], ours: &[Crypto]) -> Option<(Crypto, Crypto)> {
    offered.iter().filter(|o| o.is_usable()).find_map(|o| {
        let mine = ours.iter().find(|m| m.suite == o.suite && m.is_usable())?;
        Some((
            Crypto {
                tag: o.tag,
                ..mine.clone()
            },
            o.clone(),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_parse_print_and_refuse_what_is_not_used() {
        // RFC 4568 section 9.1's example key.
        let c = Crypto::parse(
            "1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32",
        )
        .unwrap();
        assert_eq!(
            (c.tag, c.suite.as_str(), c.key_salt.len()),
            (1, "AES_CM_128_HMAC_SHA1_80", 30)
        );
        assert!(c.has_extras && !c.is_usable(), "a lifetime and an MKI");
        let plain = Crypto::parse(
            "7 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR",
        )
        .unwrap();
        assert!(plain.is_usable());
        assert_eq!(
            plain.to_string(),
            "7 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"
        );
        assert!(
            !format!("{plain:?}").contains("PS1u"),
            "the key is not printed"
        );
        for bad in [
            "",
            "x AES_CM_128_HMAC_SHA1_80 inline:AAAA",
            "0 AES_CM_128_HMAC_SHA1_80 inline:AAAA",
            "1 AES_CM_128_HMAC_SHA1_80",
            "1 AES_CM_128_HMAC_SHA1_80 uri:xyz",
            "1 AES_CM_128_HMAC_SHA1_80 inline:not*base64",
        ] {
            assert_eq!(Crypto::parse(bad), None, "{bad:?}");
        }
        // A key of the wrong length, an unknown suite, session parameters: not usable.
        assert!(!Crypto::parse("1 AES_CM_128_HMAC_SHA1_80 inline:AAAA")
            .unwrap()
            .is_usable());
        assert!(!Crypto::parse(
            "1 F8_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"
        )
        .unwrap()
        .is_usable());
        assert!(!Crypto::parse("1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR UNENCRYPTED_SRTP").unwrap().is_usable());
    }

    #[test]
    fn the_first_usable_offer_we_share_is_answered_under_its_tag_with_our_key() {
        let key = |n: u8, len: usize| vec![n; len];
        let offered = vec![
            Crypto::new(1, CryptoSuite::AeadAes256Gcm, key(1, 44)),
            Crypto::new(2, CryptoSuite::AesCm128HmacSha1_80, key(2, 30)),
            Crypto::new(3, CryptoSuite::AesCm128HmacSha1_32, key(3, 30)),
        ];
        let ours = vec![
            Crypto::new(1, CryptoSuite::AesCm128HmacSha1_32, key(9, 30)),
            Crypto::new(2, CryptoSuite::AesCm128HmacSha1_80, key(8, 30)),
        ];
        let (answer, theirs) = choose(&offered, &ours).unwrap();
        assert_eq!(answer.tag, 2);
        assert_eq!(answer.suite, "AES_CM_128_HMAC_SHA1_80");
        assert_eq!(answer.key_salt, key(8, 30));
        assert_eq!(theirs.key_salt, key(2, 30));
        assert_eq!(choose(&offered[..1], &ours), None);
    }
}
