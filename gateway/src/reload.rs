//! What a configuration reload (`SIGHUP`) may change while the node runs, and what needs a
//! restart: [`plan`] compares the running configuration with the one just read, key by key
//! (dotted names, e.g. `sip.inbound.trusted`), and sorts each changed key into one of the two
//! lists. It applies nothing: `crate::node` does, and logs both lists.
//!
//! Applied without a restart: the log level, who may reach devices and the per-source SIP
//! limits (`[sip.inbound]`, the transaction limits of `[sip.limits]`), per-device settings
//! (`[devices]`: address books and credentials), and the QUIC certificate files (read again
//! at every reload, so a renewed certificate serves new connections). The device registry
//! file is read again at every reload too. Everything else (listen addresses, the store,
//! media ports, session limits...) needs a restart.

use crate::config::Config;

/// Keys (and key prefixes) a reload applies.
pub const RELOADABLE: &[&str] = &[
    "log.level",
    "sip.inbound",
    "sip.limits.max_transactions",
    "sip.limits.source_rate",
    "sip.limits.source_burst",
    "sip.limits.source_max_live",
    "sip.limits.max_sources",
    "devices",
    "quic.cert",
    "quic.key",
];

/// The changed keys of a reload, sorted into what is applied and what needs a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// Changed keys the reload applies.
    pub apply: Vec<String>,
    /// Changed keys that take effect only after a restart.
    pub restart: Vec<String>,
}

impl ReloadPlan {
    /// Whether a changed key under `prefix` (a key of [`RELOADABLE`] or a section) is applied.
    pub fn applies(&self, prefix: &str) -> bool {
        self.apply.iter().any(|k| under(k, prefix))
    }
}

fn under(key: &str, prefix: &str) -> bool {
    key == prefix
        || key
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// Compares `running` with `new`.
pub fn plan(running: &Config, new: &Config) -> ReloadPlan {
    let mut changed = Vec::new();
    match (toml::Value::try_from(running), toml::Value::try_from(new)) {
        (Ok(a), Ok(b)) => diff("", &a, &b, &mut changed),
        // Cannot happen for a configuration that was loaded; say everything needs a restart.
        _ => changed.push("*".to_string()),
    }
    let mut plan = ReloadPlan::default();
    for key in changed {
        if RELOADABLE.iter().any(|r| under(&key, r)) {
            plan.apply.push(key);
        } else {
            plan.restart.push(key);
        }
    }
    plan
}

/// Pushes the dotted keys whose values differ between `a` and `b` (tables compared key by
/// key; anything else as a whole).
fn diff(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match (a, b) {
        (toml::Value::Table(ta), toml::Value::Table(tb)) => {
            let keys: std::collections::BTreeSet<&String> = ta.keys().chain(tb.keys()).collect();
            for k in keys {
                match (ta.get(k), tb.get(k)) {
                    (Some(va), Some(vb)) => diff(&join(k), va, vb, out),
                    _ => out.push(join(k)),
                }
            }
        }
        _ if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_are_sorted_into_applied_and_restart() {
        let running = Config::default();
        let mut new = running.clone();
        assert_eq!(plan(&running, &new), ReloadPlan::default());
        new.log.level = "debug".into();
        new.sip.inbound.trusted = vec!["10.0.0.0/8".parse().unwrap()];
        new.sip.limits.source_rate = 7;
        new.sip.limits.max_tcp_connections = 3;
        new.sip.listen = "127.0.0.1:5999".parse().unwrap();
        new.devices.insert("dev-1".into(), Default::default());
        new.media.rtp_port_min += 2;
        let p = plan(&running, &new);
        assert_eq!(
            p.apply,
            vec![
                "devices.dev-1",
                "log.level",
                "sip.inbound.trusted",
                "sip.limits.source_rate"
            ]
        );
        assert_eq!(
            p.restart,
            vec![
                "media.rtp_port_min",
                "sip.limits.max_tcp_connections",
                "sip.listen"
            ]
        );
        assert!(p.applies("sip.inbound"));
        assert!(p.applies("devices"));
        assert!(!p.applies("quic.cert"));
        // A key that is a prefix of another is not mistaken for it.
        assert!(!under("sip.inbound_x", "sip.inbound"));
    }
}
