//! thalamus-telemetry: what every Thalamus process (a gateway node, the balancer) shares for
//! being observed, written once.
//!
//! * [`LogConfig`] and [`LogFormat`]: the `[log]` configuration section.
//! * [`init_logging`]: installs the `tracing` subscriber it describes (stderr, `THALAMUS_LOG`
//!   overrides the level) and returns the [`LogReload`] that changes the level later.
//! * [`ReasonLabel`]: the Prometheus label that names a reason or a kind, and [`inc`], which
//!   counts one event under it.
//! * [`encode_gauge`], [`encode_counter`]: one unlabelled value in a custom `Collector` (the
//!   SIP stack's and the media engine's figures, read when scraped).
//!
//! It does not define any metric (each component registers its own) and starts nothing.
#![forbid(unsafe_code)]

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};

/// Log output format.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line, with the current span's fields.
    Json,
}

/// The `[log]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info,thalamus_bridge=debug` (`THALAMUS_LOG`
    /// overrides it).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

/// Whether `level` parses as a `tracing` filter directive (`[log] level`); the reason when not.
pub fn check_level(level: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Sets the log filter of the running process (what `SIGHUP` uses when `[log] level` changed).
pub struct LogReload {
    set: Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>,
    from_env: bool,
}

impl LogReload {
    /// Replaces the filter with `level` (a `tracing` directive). Refused, with the reason, when
    /// it does not parse, and ignored (`Ok(false)`) while `THALAMUS_LOG` set the filter: the
    /// environment wins over the file, at a reload as at start. `Ok(true)` when applied.
    pub fn set_level(&self, level: &str) -> Result<bool, String> {
        if self.from_env {
            return Ok(false);
        }
        let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        (self.set)(filter).map(|()| true)
    }
}

impl std::fmt::Debug for LogReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReload")
            .field("from_env", &self.from_env)
            .finish_non_exhaustive()
    }
}

/// Installs the process's `tracing` subscriber: lines to stderr (colours only on a terminal),
/// filtered by `THALAMUS_LOG` when set, else by `config.level` (`info` when that does not
/// parse). Returns the handle that changes the filter later; `None` when a subscriber was
/// already installed (then nothing changed).
pub fn init_logging(config: &LogConfig) -> Option<LogReload> {
    let env = tracing_subscriber::EnvFilter::try_from_env("THALAMUS_LOG").ok();
    let from_env = env.is_some();
    let filter = env
        .or_else(|| tracing_subscriber::EnvFilter::try_new(&config.level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.format {
        LogFormat::Json => {
            let builder = builder
                .json()
                .with_current_span(true)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().ok()?;
            Some(LogReload {
                set: Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
                from_env,
            })
        }
        LogFormat::Human => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().ok()?;
            Some(LogReload {
                set: Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
                from_env,
            })
        }
    }
}

/// A label naming a reason or a kind, e.g. `reason="per_ip_limit"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason.
    pub reason: &'static str,
}

/// Counts one event with a reason label.
pub fn inc(family: &Family<ReasonLabel, Counter>, reason: &'static str) {
    family.get_or_create(&ReasonLabel { reason }).inc();
}

/// Encodes one constant metric `name` (for a custom `Collector`).
fn encode_const(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl prometheus_client::encoding::EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// Encodes one gauge `name` with `value` (for a custom `Collector`).
pub fn encode_gauge(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let gauge = prometheus_client::metrics::gauge::ConstGauge::new(value);
    encode_const(encoder, name, help, gauge)
}

/// Encodes one counter `name` with `value` (for a custom `Collector`; `_total` is added).
pub fn encode_counter(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let counter = prometheus_client::metrics::counter::ConstCounter::new(value);
    encode_const(encoder, name, help, counter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_section_reads_both_formats_and_refuses_unknown_keys() {
        let c: LogConfig = toml_like(r#"{"format":"json","level":"debug"}"#);
        assert_eq!(c.format, LogFormat::Json);
        assert_eq!(c.level, "debug");
        let d: LogConfig = toml_like("{}");
        assert_eq!(d, LogConfig::default());
        assert!(serde_json_value(r#"{"colour":true}"#).is_err());
    }

    fn toml_like(text: &str) -> LogConfig {
        serde_json_value(text).unwrap()
    }

    fn serde_json_value(text: &str) -> Result<LogConfig, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
}
