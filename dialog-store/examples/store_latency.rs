//! What a replicated write costs: `writes` dialogs created and then updated once each through
//! the Redis store, `concurrency` at a time, against the Redis given by `--url`, with
//! `--wait-replicas N` (0: no WAIT). Prints one JSON line: the setting, writes per second, and
//! the latency of one write (p50, p99, max, in ms). `bench/store-wait.sh` runs it against a
//! master with a replica, with and without WAIT, in one run.
//!
//! It starts no Redis and changes nothing but the dialogs it writes (under its own key prefix).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use thalamus_dialog_store::conformance::record;
use thalamus_dialog_store::redis::{RedisDialogStore, RedisStoreConfig};
use thalamus_dialog_store::{DialogStore, StoreSettings, SystemClock};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let url = arg("--url", "redis://127.0.0.1:6379/0");
    let wait: u32 = arg("--wait-replicas", "0").parse()?;
    let writes: usize = arg("--writes", "5000").parse()?;
    let concurrency: usize = arg("--concurrency", "16").parse()?;
    let mut config = RedisStoreConfig::with_url(&url);
    config.key_prefix = format!("latency-{}:", std::process::id());
    config.wait_replicas = wait;
    config.wait_timeout_ms = 200;
    let store = Arc::new(
        RedisDialogStore::connect(&config, StoreSettings::default(), Arc::new(SystemClock)).await?,
    );
    let started = Instant::now();
    let per_task = writes.div_ceil(concurrency.max(1));
    let mut tasks = Vec::new();
    for t in 0..concurrency.max(1) {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_task * 2);
            for i in 0..per_task {
                let r = record(&format!("lat-{t}-{i}"), &format!("dev-{t}"), "node-a");
                let at = Instant::now();
                let v = store.put(&r, None).await?;
                latencies.push(at.elapsed());
                let at = Instant::now();
                store.put(&r, Some(v)).await?;
                latencies.push(at.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all: Vec<Duration> = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let took = started.elapsed();
    all.sort_unstable();
    let at = |q: f64| {
        let i = ((all.len() as f64 - 1.0) * q).round() as usize;
        all.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{}",
        serde_json::json!({
            "wait_replicas": wait,
            "writes": all.len(),
            "concurrency": concurrency,
            "writes_per_sec": (all.len() as f64 / took.as_secs_f64()).round(),
            "p50_ms": (at(0.5) * 1000.0).round() / 1000.0,
            "p99_ms": (at(0.99) * 1000.0).round() / 1000.0,
            "max_ms": (at(1.0) * 1000.0).round() / 1000.0,
        })
    );
    store.close().await?;
    Ok(())
}
