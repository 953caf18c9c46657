//! Who may reach a device over SIP: the inbound policy, sans-IO, and what an out-of-dialog
//! request is addressed to (the device, the merged-request key of loop detection).
//!
//! A request that would reach a device (INVITE, MESSAGE) from a trusted source (a CIDR of
//! `[sip.inbound] trusted`; loopback by default) passes. From anywhere else it must carry
//! digest credentials of one of `[sip.inbound] users` answering this node's challenge (401 with
//! `WWW-Authenticate`); with no users configured, or with wrong credentials, it is refused 403.
//! The verdict is reached before the device is looked up, so a stranger gets the same answer
//! for a device that does not exist, one that is offline and one that is online: the answers
//! reveal nothing about the fleet.
//!
//! Nonces are stateless (`thalamus_sip::digest::DigestServer`): nodes that share
//! `nonce_secret` accept each other's. Time is passed in; nothing here reads a clock or a
//! socket. In-dialog requests are not checked here (they belong to a dialog that was).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use thalamus_ingress::registry::valid_device_id;
use thalamus_sip::digest::{
    Credentials, DigestRequest, DigestServer, DigestServerConfig, UserSecret,
};
use thalamus_sip::message::{HeaderName, Request};

/// A user an untrusted source may authenticate as (`[[sip.inbound.users]]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InboundUser {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

/// The `[sip.inbound]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct InboundConfig {
    /// Sources whose requests pass without credentials (CIDR blocks; default loopback only).
    pub trusted: Vec<IpNet>,
    /// Credentials other sources may answer the digest challenge with (none: they get 403).
    pub users: Vec<InboundUser>,
    /// Realm of the challenge (default: `sip.domain`).
    pub realm: Option<String>,
    /// Secret of the stateless nonces, hex, at least 16 bytes; nodes that share it accept each
    /// other's nonces. Default: random per process.
    pub nonce_secret: Option<String>,
}

impl Default for InboundConfig {
    fn default() -> Self {
        // Loopback only. (Both prefixes are valid; were one not, it would be left out: the
        // policy fails closed.)
        let loopback = [
            Ipv4Net::new(Ipv4Addr::LOCALHOST, 8)
                .map(|n| IpNet::V4(n.trunc()))
                .ok(),
            Ipv6Net::new(Ipv6Addr::LOCALHOST, 128).map(IpNet::V6).ok(),
        ];
        Self {
            trusted: loopback.into_iter().flatten().collect(),
            users: Vec::new(),
            realm: None,
            nonce_secret: None,
        }
    }
}

/// What the policy says of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundVerdict {
    /// Let it through.
    Allow,
    /// Answer 401 with these `WWW-Authenticate` values.
    Challenge(Vec<String>),
    /// Answer 403 (the label says why, for the metric).
    Forbidden(&'static str),
}

/// Why the policy could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// The nonce secret is not usable.
    #[error("sip.inbound.nonce_secret: {0}")]
    Secret(String),
}

/// The inbound policy of a node.
#[derive(Debug)]
pub struct InboundPolicy {
    trusted: Vec<IpNet>,
    users: Vec<InboundUser>,
    digest: std::sync::Arc<DigestServer>,
    /// What the digest server was made of (`realm`, `nonce_secret`): a reload that changes
    /// neither keeps it, so nonces handed out before the reload stay good.
    digest_from: (Option<String>, Option<String>, String),
}

impl InboundPolicy {
    /// The policy of `config`, challenging in `default_realm` unless the config names one.
    pub fn new(config: &InboundConfig, default_realm: &str) -> Result<Self, InboundError> {
        let secret = match &config.nonce_secret {
            Some(text) => hex::decode(text.trim())
                .ok()
                .filter(|s| s.len() >= 16)
                .ok_or_else(|| InboundError::Secret("must be at least 32 hex digits".into()))?,
            None => thalamus_sip::rng::with(|rng| {
                let mut bytes = vec![0u8; 32];
                rng.fill_bytes(&mut bytes);
                bytes
            }),
        };
        let realm = config
            .realm
            .clone()
            .unwrap_or_else(|| default_realm.to_string());
        let digest = DigestServer::new(DigestServerConfig::new(realm, secret))
            .map_err(|e| InboundError::Secret(e.to_string()))?;
        Ok(Self {
            trusted: config.trusted.clone(),
            users: config.users.clone(),
            digest: std::sync::Arc::new(digest),
            digest_from: (
                config.realm.clone(),
                config.nonce_secret.clone(),
                default_realm.to_string(),
            ),
        })
    }

    /// The policy of `config` after a reload of this one: trusted networks and users as
    /// `config` says; the digest server (and so the nonces handed out) kept unless the realm
    /// or the nonce secret changed.
    pub fn reloaded(
        &self,
        config: &InboundConfig,
        default_realm: &str,
    ) -> Result<Self, InboundError> {
        let from = (
            config.realm.clone(),
            config.nonce_secret.clone(),
            default_realm.to_string(),
        );
        if from != self.digest_from {
            return Self::new(config, default_realm);
        }
        Ok(Self {
            trusted: config.trusted.clone(),
            users: config.users.clone(),
            digest: self.digest.clone(),
            digest_from: from,
        })
    }

    /// Whether `source` is trusted.
    pub fn trusts(&self, source: IpAddr) -> bool {
        let source = match source {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(source, IpAddr::V4),
            v4 => v4,
        };
        self.trusted.iter().any(|net| net.contains(&source))
    }

    /// The verdict on `request` from `source` at `now` (Unix seconds).
    pub fn check(&self, source: IpAddr, request: &Request, now: u64) -> InboundVerdict {
        if self.trusts(source) {
            return InboundVerdict::Allow;
        }
        if self.users.is_empty() {
            return InboundVerdict::Forbidden("untrusted");
        }
        let Some(value) = request.headers.get(&HeaderName::Authorization) else {
            return self.challenge(now, false);
        };
        let Some(credentials) = value.to_str().ok().and_then(|v| Credentials::parse(v).ok()) else {
            return InboundVerdict::Forbidden("bad_credentials");
        };
        let Some(user) = self
            .users
            .iter()
            .find(|u| u.username == credentials.username)
        else {
            return InboundVerdict::Forbidden("bad_credentials");
        };
        let method = request.method.to_string();
        let uri = request.uri.to_string();
        let digest_request = DigestRequest {
            method: &method,
            uri: &uri,
            body: &request.body,
        };
        match self.digest.verify(
            &credentials,
            &digest_request,
            UserSecret::Password(&user.password),
            now,
        ) {
            Ok(_) => InboundVerdict::Allow,
            Err(e) if e.is_stale() => self.challenge(now, true),
            Err(_) => InboundVerdict::Forbidden("bad_credentials"),
        }
    }

    fn challenge(&self, now: u64, stale: bool) -> InboundVerdict {
        InboundVerdict::Challenge(
            self.digest
                .challenges(now, stale)
                .iter()
                .map(ToString::to_string)
                .collect(),
        )
    }
}

/// From tag, Call-ID and CSeq of a request outside a dialog (the merged-request key).
pub fn merge_key(request: &Request) -> Option<(String, String, u32)> {
    Some((
        request.headers.from_tag()?.to_string(),
        request.headers.call_id().ok()?.to_string(),
        request.headers.cseq().ok()?.seq,
    ))
}

/// The device a request addresses: the Request-URI user, when it is a valid device id.
pub fn addressed_device(request: &Request) -> Option<String> {
    let user = request.uri.user()?;
    valid_device_id(user).then(|| user.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use thalamus_sip::digest::answer_challenge;
    use thalamus_sip::digest::Challenge;
    use thalamus_sip::message::Message;

    const NOW: u64 = 1_800_000_000;

    fn invite(auth: Option<&str>) -> Request {
        let text = format!(
            "INVITE sip:dev-1@gw.example SIP/2.0\r\n\
             Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bK-1\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:trunk@carrier.example>;tag=a\r\n\
             To: <sip:dev-1@gw.example>\r\n\
             Call-ID: c1\r\n\
             CSeq: 1 INVITE\r\n\
             {}Content-Length: 0\r\n\r\n",
            auth.map(|a| format!("Authorization: {a}\r\n"))
                .unwrap_or_default()
        );
        match Message::parse(Bytes::from(text)).unwrap() {
            Message::Request(r) => r,
            Message::Response(_) => unreachable!(),
        }
    }

    fn policy(users: &[(&str, &str)]) -> InboundPolicy {
        InboundPolicy::new(
            &InboundConfig {
                users: users
                    .iter()
                    .map(|(u, p)| InboundUser {
                        username: (*u).into(),
                        password: (*p).into(),
                    })
                    .collect(),
                nonce_secret: Some("00112233445566778899aabbccddeeff".into()),
                ..InboundConfig::default()
            },
            "gw.example",
        )
        .unwrap()
    }

    fn stranger() -> IpAddr {
        "198.51.100.7".parse().unwrap()
    }

    #[test]
    fn loopback_is_trusted_by_default_and_strangers_are_refused_without_users() {
        let p = policy(&[]);
        assert!(p.trusts("127.0.0.1".parse().unwrap()));
        assert!(p.trusts("127.8.9.1".parse().unwrap()));
        assert!(p.trusts("::1".parse().unwrap()));
        assert!(p.trusts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!p.trusts(stranger()));
        assert_eq!(
            p.check("127.0.0.1".parse().unwrap(), &invite(None), NOW),
            InboundVerdict::Allow
        );
        assert_eq!(
            p.check(stranger(), &invite(None), NOW),
            InboundVerdict::Forbidden("untrusted")
        );
    }

    #[test]
    fn a_stranger_is_challenged_and_passes_with_the_right_credentials() {
        let p = policy(&[("trunk", "s3cret")]);
        let InboundVerdict::Challenge(values) = p.check(stranger(), &invite(None), NOW) else {
            panic!("expected a challenge");
        };
        assert!(values.iter().all(|v| v.contains("realm=\"gw.example\"")));
        let challenge: Challenge = values[0].parse().unwrap();
        let answer = |password: &str| {
            answer_challenge(
                &challenge,
                "trunk",
                password,
                &DigestRequest::new("INVITE", "sip:dev-1@gw.example"),
                "0a4f113b",
                1,
            )
            .unwrap()
            .to_string()
        };
        assert_eq!(
            p.check(stranger(), &invite(Some(&answer("s3cret"))), NOW + 1),
            InboundVerdict::Allow
        );
        assert_eq!(
            p.check(stranger(), &invite(Some(&answer("guess"))), NOW + 1),
            InboundVerdict::Forbidden("bad_credentials")
        );
        // An old nonce with the right password: challenged again, as stale.
        match p.check(stranger(), &invite(Some(&answer("s3cret"))), NOW + 3_600) {
            InboundVerdict::Challenge(v) => assert!(v[0].contains("stale=TRUE"), "{v:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p.check(stranger(), &invite(Some("Digest garbage")), NOW),
            InboundVerdict::Forbidden("bad_credentials")
        );
    }

    #[test]
    fn trusted_networks_and_secrets_are_configurable() {
        let config: InboundConfig = toml::from_str(
            "trusted = [\"10.0.0.0/8\", \"2001:db8::/32\"]\nnonce_secret = \"abcd\"\n",
        )
        .unwrap();
        assert!(InboundPolicy::new(&config, "d").is_err(), "short secret");
        let config = InboundConfig {
            nonce_secret: None,
            ..config
        };
        let p = InboundPolicy::new(&config, "d").unwrap();
        assert!(p.trusts("10.1.2.3".parse().unwrap()));
        assert!(p.trusts("2001:db8::5".parse().unwrap()));
        assert!(
            !p.trusts("127.0.0.1".parse().unwrap()),
            "replaced, not added"
        );
        assert!(toml::from_str::<InboundConfig>("trusted = [\"not-a-net\"]").is_err());
    }
}
