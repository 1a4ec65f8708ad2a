//! Configuration: one struct per command, each field a flag, a `PAYSTREAM_<FLAG>` environment
//! variable and a key of the optional `--config FILE` (TOML).
//!
//! Precedence: flag > environment > file > default. The file is applied by exporting each key
//! as its environment variable when that variable is not already set, so clap parses and
//! validates every source with the same code and names the field in every error. Unknown keys
//! in the file are rejected at start.

mod args;
mod file;
mod run;
mod updater;

pub use args::{ColumnArgs, DecodeArgs, KafkaArgs, RegistryArgs};
pub use file::apply_config_file;
pub use run::{RunConfig, SinkKind, SourceKind};
pub use updater::UpdaterConfig;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory};

use crate::decode::registry::RegistrySettings;
use crate::decode::{ColumnNames, DecodeOptions, DecoderSettings, Format};
use crate::secret::Secret;

pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";
pub const DEFAULT_CDC_TOPIC: &str = "payment.public.payments";
pub const DEFAULT_STATUS_TOPIC: &str = "payment-status-update";
pub const DEFAULT_DLQ_TOPIC: &str = "paystream-dlq";
pub const DEFAULT_GROUP_ID: &str = "paystream";
pub const DEFAULT_UPDATER_GROUP_ID: &str = "paystream-updater";
pub const DEFAULT_POLL_INTERVAL: &str = "10m";
pub const DEFAULT_KAFKA_STARTUP_TIMEOUT: &str = "30s";
pub const DEFAULT_CHECKPOINT_INTERVAL: &str = "1s";
pub const DEFAULT_STATE_STATS_INTERVAL: &str = "15s";
pub const DEFAULT_STRIPE_API_BASE: &str = "https://api.stripe.com";
/// Half of Stripe's default 25 requests/s per endpoint: every PaymentIntent retrieve of the
/// account (the payment service's checkout included) shares that one bucket, so paystream
/// leaves most of it to the service that takes the payments.
pub const DEFAULT_STRIPE_RPS: &str = "10";
/// Stripe's Search allows 20 reads/s of its own; paystream searches only for rows without an
/// intent id.
pub const DEFAULT_STRIPE_SEARCH_RPS: &str = "5";
pub const DEFAULT_STRIPE_CONCURRENCY: &str = "8";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9898";
pub const DEFAULT_UPDATER_METRICS_ADDR: &str = "127.0.0.1:9899";
pub const DEFAULT_SLOT: &str = "paystream";
pub const DEFAULT_PUBLICATION: &str = "paystream_payments";
pub const DEFAULT_TABLE: &str = "payments";
pub const DEFAULT_FALLBACK_POLL_INTERVAL: &str = "6h";
pub const DEFAULT_STALE_AFTER: &str = "24h";
pub const DEFAULT_EVENTS_FEED_OVERLAP: &str = "60s";
pub const DEFAULT_STALE_POLL_INTERVAL: &str = "6h";

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use humantime syntax: 10m, 1s, 250ms)"))
}

fn kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// A `[schema.]name` of letters, digits and `_` (quoted where used, so no injection either).
fn ident_ok(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

/// A configuration error, found at start. The operator is at fault; fix the named field.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}
