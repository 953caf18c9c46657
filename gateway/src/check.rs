//! `thalamus check`: validates a node's environment before it starts, one finding per check:
//! the data directory is writable, the listen addresses are free (SIP UDP and TCP, QUIC, admin),
//! the configured certificate and key load, the dialog store answers, and the system clock is
//! sane (after this build's year, and within 2 s of a Redis store's clock). The configuration
//! itself was checked when it loaded (`Config::load`), key by key.
//!
//! It starts nothing and changes nothing but a probe file in the data directory, which it
//! removes.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Config;

/// One check's finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was checked (names the configuration key when there is one).
    pub what: String,
    /// `Ok` with a detail, or `Err` with the reason.
    pub result: Result<String, String>,
}

impl Finding {
    fn new(what: impl Into<String>, result: Result<String, String>) -> Self {
        Self {
            what: what.into(),
            result,
        }
    }
}

/// 2026-01-01T00:00:00Z: a clock before it is wrong.
const EARLIEST_SANE_UNIX: u64 = 1_767_225_600;

/// Runs every check (the store's with a 3 s limit).
pub async fn check_environment(config: &Config) -> Vec<Finding> {
    let mut findings = vec![data_dir(config)];
    findings.push(udp_free("sip.listen (UDP)", config.sip.listen));
    findings.push(tcp_free("sip.listen (TCP)", config.sip.listen).await);
    findings.push(udp_free("quic.listen", config.quic.listen));
    findings.push(tcp_free("admin.listen", config.admin.listen).await);
    findings.push(certificate(config));
    if let Some(tls) = &config.sip.tls {
        let result = tls
            .transport("sip.tls")
            .map(|t| match t.listen {
                Some(addr) => format!("certificate and roots read; listens on {addr}"),
                None => "roots read (outbound TLS only)".to_string(),
            })
            .map_err(|e| e.to_string());
        findings.push(Finding::new("sip.tls", result));
        if let Some(addr) = tls.listen {
            findings.push(tcp_free("sip.tls.listen", addr).await);
        }
    }
    findings.push(store(config).await);
    findings.push(clock(config).await);
    findings
}

fn data_dir(config: &Config) -> Finding {
    let dir = &config.node.data_dir;
    let result = (|| {
        std::fs::create_dir_all(dir)?;
        let probe = dir.join(".thalamus-check");
        std::fs::write(&probe, b"probe")?;
        std::fs::remove_file(&probe)?;
        Ok::<_, std::io::Error>(format!("{} is writable", dir.display()))
    })()
    .map_err(|e| format!("{}: {e}", dir.display()));
    Finding::new("node.data_dir", result)
}

fn udp_free(what: &str, addr: SocketAddr) -> Finding {
    let result = std::net::UdpSocket::bind(addr)
        .map(|_| format!("{addr} is free"))
        .map_err(|e| format!("cannot bind {addr}: {e}"));
    Finding::new(what, result)
}

async fn tcp_free(what: &str, addr: SocketAddr) -> Finding {
    let result = tokio::net::TcpListener::bind(addr)
        .await
        .map(|_| format!("{addr} is free"))
        .map_err(|e| format!("cannot bind {addr}: {e}"));
    Finding::new(what, result)
}

fn certificate(config: &Config) -> Finding {
    let result = match (&config.quic.cert, &config.quic.key) {
        (Some(cert), Some(key)) => {
            thalamus_ingress::tls::load_or_generate(Some(cert), Some(key), &config.node.data_dir)
                .map(|m| format!("{} loads; SHA-256 {}", cert.display(), m.fingerprint()))
                .map_err(|e| e.to_string())
        }
        _ => Ok(
            "none configured: a self-signed one is generated (or reused) in the data directory"
                .to_string(),
        ),
    };
    Finding::new("quic.cert", result)
}

async fn store(config: &Config) -> Finding {
    let store_config = &config.cluster.store;
    let probe = async {
        let store = thalamus_dialog_store::open::open_dialog_store(
            store_config,
            &config.node.data_dir,
            std::sync::Arc::new(thalamus_dialog_store::clock::SystemClock),
        )
        .await
        .map_err(|e| e.to_string())?;
        let key = thalamus_dialog_store::DialogKey::new("thalamus-check", "probe", "probe");
        store.get(&key).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(format!("{:?} store answers", store_config.backend))
    };
    let result = match tokio::time::timeout(Duration::from_secs(3), probe).await {
        Ok(r) => r,
        Err(_) => Err("no answer within 3 s".to_string()),
    };
    Finding::new("cluster.store", result)
}

async fn clock(config: &Config) -> Finding {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    if now.as_secs() < EARLIEST_SANE_UNIX {
        return Finding::new(
            "system clock",
            Err(format!(
                "reads {} s since 1970, before this build: set the clock (NTP)",
                now.as_secs()
            )),
        );
    }
    if config.cluster.store.backend != thalamus_dialog_store::open::StoreBackend::Redis {
        return Finding::new("system clock", Ok("after this build's date".into()));
    }
    // A plain URL, or the first seed of a Redis Cluster (its nodes' clocks are the cluster's
    // business); a Sentinel store's master is not looked up here.
    let redis = &config.cluster.store.redis;
    let url = redis.url.clone().or_else(|| {
        redis.cluster_nodes.first().map(|seed| {
            if seed.contains("://") {
                seed.clone()
            } else {
                format!("redis://{seed}")
            }
        })
    });
    let Some(url) = url else {
        return Finding::new(
            "system clock",
            Ok("after this build's date (a Sentinel store's clock is not compared)".into()),
        );
    };
    let redis_time = async {
        let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(Duration::from_secs(secs) + Duration::from_micros(micros))
    };
    let result = match tokio::time::timeout(Duration::from_secs(3), redis_time).await {
        Ok(Ok(theirs)) => {
            let skew = theirs.abs_diff(now);
            if skew > Duration::from_secs(2) {
                Err(format!(
                    "{} ms apart from the Redis store's clock: leases and records compare times \
                     across nodes; synchronise the clocks (NTP)",
                    skew.as_millis()
                ))
            } else {
                Ok(format!(
                    "within {} ms of the Redis store's clock",
                    skew.as_millis()
                ))
            }
        }
        Ok(Err(e)) => Err(format!("cannot read the Redis store's clock: {e}")),
        Err(_) => Err("the Redis store's clock: no answer within 3 s".into()),
    };
    Finding::new("system clock", result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_port_and_an_unreadable_certificate_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut config = Config::default();
        config.node.data_dir = dir.path().to_path_buf();
        config.sip.listen = "127.0.0.1:0".parse().unwrap();
        config.quic.listen = "127.0.0.1:0".parse().unwrap();
        config.admin.listen = taken.local_addr().unwrap();
        config.quic.cert = Some(dir.path().join("missing-cert.pem"));
        config.quic.key = Some(dir.path().join("missing-key.pem"));
        let findings = check_environment(&config).await;
        let failed: Vec<&str> = findings
            .iter()
            .filter(|f| f.result.is_err())
            .map(|f| f.what.as_str())
            .collect();
        assert_eq!(failed, vec!["admin.listen", "quic.cert"], "{findings:?}");
        assert!(findings
            .iter()
            .any(|f| f.what == "cluster.store" && f.result.is_ok()));
    }
}
