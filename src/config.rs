//! Configuration: one struct per command, each field a flag, a `PAYSTREAM_<FLAG>` environment
//! variable and a key of the optional `--config FILE` (TOML).
//!
//! Precedence: flag > environment > file > default. The file is applied by exporting each key
//! as its environment variable when that variable is not already set, so clap parses and
//! validates every source with the same code and names the field in every error. Unknown keys
//! in the file are rejected at start.

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

/// Kafka connection settings shared by every command that talks to the broker.
#[derive(Args, Debug, Clone)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated.
    #[arg(long, env = "PAYSTREAM_BROKERS", default_value = DEFAULT_BROKERS)]
    pub brokers: String,
    /// Extra librdkafka setting (KEY=VALUE, repeatable), e.g. security.protocol=SASL_SSL or
    /// session.timeout.ms=6000. Applied to every client after paystream's own settings.
    #[arg(long = "kafka-option", env = "PAYSTREAM_KAFKA_OPTIONS", value_delimiter = ';', value_parser = kv)]
    pub kafka_options: Vec<(String, String)>,
    /// How long start-up waits for a broker to answer before it fails (a wrong --brokers, a
    /// firewall). Once running, outages are ridden out instead.
    #[arg(long, env = "PAYSTREAM_KAFKA_STARTUP_TIMEOUT", default_value = DEFAULT_KAFKA_STARTUP_TIMEOUT, value_parser = duration)]
    pub kafka_startup_timeout: Duration,
}

impl KafkaArgs {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(bad("--brokers", "is empty"));
        }
        if self.kafka_startup_timeout < Duration::from_millis(100) {
            return Err(bad("--kafka-startup-timeout", "must be at least 100ms"));
        }
        Ok(())
    }
}

/// Names of the payments table's columns.
#[derive(Args, Debug, Clone)]
pub struct ColumnArgs {
    #[arg(long, env = "PAYSTREAM_COLUMN_ID", default_value = "id")]
    pub column_id: String,
    #[arg(
        long,
        env = "PAYSTREAM_COLUMN_IDEMPOTENCY_KEY",
        default_value = "idempotency_key"
    )]
    pub column_idempotency_key: String,
    #[arg(long, env = "PAYSTREAM_COLUMN_AMOUNT", default_value = "amount")]
    pub column_amount: String,
    #[arg(long, env = "PAYSTREAM_COLUMN_CURRENCY", default_value = "currency")]
    pub column_currency: String,
    #[arg(long, env = "PAYSTREAM_COLUMN_STATUS", default_value = "status")]
    pub column_status: String,
    #[arg(
        long,
        env = "PAYSTREAM_COLUMN_STRIPE_PAYMENT_INTENT_ID",
        default_value = "stripe_payment_intent_id"
    )]
    pub column_stripe_payment_intent_id: String,
    #[arg(
        long,
        env = "PAYSTREAM_COLUMN_CREATED_AT",
        default_value = "created_at"
    )]
    pub column_created_at: String,
    #[arg(
        long,
        env = "PAYSTREAM_COLUMN_UPDATED_AT",
        default_value = "updated_at"
    )]
    pub column_updated_at: String,
    /// The status value that means "pending" in the table.
    #[arg(long, env = "PAYSTREAM_PENDING_STATUS", default_value = "pending")]
    pub pending_status: String,
    /// Stripe Connect: the column holding each payment's connected account (`acct_…`); its
    /// intent is looked up in that account (the `Stripe-Account` header). A row whose column
    /// is NULL uses --stripe-account, or the platform account.
    #[arg(long, env = "PAYSTREAM_ACCOUNT_COLUMN")]
    pub account_column: Option<String>,
}

impl ColumnArgs {
    /// The columns the Postgres writer touches.
    pub fn write_columns(&self) -> crate::sink::postgres::Columns {
        crate::sink::postgres::Columns {
            id: self.column_id.clone(),
            status: self.column_status.clone(),
            stripe_payment_intent_id: self.column_stripe_payment_intent_id.clone(),
            updated_at: self.column_updated_at.clone(),
            pending_status: self.pending_status.clone(),
        }
    }

    /// The columns the forward-only write names (the updater, `--sink postgres`).
    pub fn validate_written(&self) -> Result<(), ConfigError> {
        for (field, c) in [
            ("--column-id", &self.column_id),
            ("--column-status", &self.column_status),
            ("--column-updated-at", &self.column_updated_at),
        ] {
            if !ident_ok(c) || c.contains('.') {
                return Err(bad(field, "must be a plain column name"));
            }
        }
        Ok(())
    }

    pub fn names(&self) -> ColumnNames {
        ColumnNames {
            id: self.column_id.clone(),
            idempotency_key: self.column_idempotency_key.clone(),
            amount: self.column_amount.clone(),
            currency: self.column_currency.clone(),
            status: self.column_status.clone(),
            stripe_payment_intent_id: self.column_stripe_payment_intent_id.clone(),
            created_at: self.column_created_at.clone(),
            updated_at: self.column_updated_at.clone(),
            account: self.account_column.clone(),
        }
    }
}

/// Decoding settings (also used by `paystream decode`).
#[derive(Args, Debug, Clone)]
pub struct DecodeArgs {
    /// Which converter wrote the CDC messages: auto tells Confluent Avro (first byte 0x00) from
    /// JSON per message.
    #[arg(long, env = "PAYSTREAM_FORMAT", value_enum, default_value = "auto")]
    pub format: Format,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Scale of Connect Decimal bytes when the connector runs with schemas off.
    #[arg(long, env = "PAYSTREAM_AMOUNT_SCALE", default_value = "2")]
    pub amount_scale: u32,
    /// The connector's unavailable.value.placeholder (unchanged TOASTed columns).
    #[arg(long, env = "PAYSTREAM_UNAVAILABLE_PLACEHOLDER", default_value = crate::decode::TOAST_PLACEHOLDER)]
    pub unavailable_placeholder: String,
    #[command(flatten)]
    pub columns: ColumnArgs,
}

/// The Confluent schema registry, for Avro messages in and out.
#[derive(Args, Debug, Clone)]
pub struct RegistryArgs {
    /// Schema registry base URL (http or https); needed for Avro.
    #[arg(long, env = "PAYSTREAM_SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
    /// Basic auth for the registry, `user:password` (Confluent's basic.auth.user.info). Never
    /// logged.
    #[arg(long, env = "PAYSTREAM_SCHEMA_REGISTRY_AUTH", hide_env_values = true)]
    pub schema_registry_auth: Option<Secret>,
    /// Per-request timeout for the registry.
    #[arg(long, env = "PAYSTREAM_SCHEMA_REGISTRY_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub schema_registry_timeout: Duration,
    /// Attempts per registry request before a message goes to the dead letters.
    #[arg(long, env = "PAYSTREAM_SCHEMA_REGISTRY_ATTEMPTS", default_value = "4")]
    pub schema_registry_attempts: u32,
}

impl RegistryArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(u) = &self.schema_registry_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(bad("--schema-registry-url", "must be an http(s) URL"));
            }
        }
        if self.schema_registry_attempts == 0 {
            return Err(bad("--schema-registry-attempts", "must be at least 1"));
        }
        Ok(())
    }

    /// The registry client's settings, if a URL is set.
    pub fn settings(&self) -> Option<RegistrySettings> {
        self.schema_registry_url
            .as_ref()
            .map(|url| RegistrySettings {
                url: url.clone(),
                auth: self.schema_registry_auth.clone(),
                timeout: self.schema_registry_timeout,
                attempts: self.schema_registry_attempts,
            })
    }
}

impl DecodeArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.registry.validate()?;
        if self.format == Format::Avro && self.registry.schema_registry_url.is_none() {
            return Err(bad(
                "--schema-registry-url",
                "is required with --format avro",
            ));
        }
        Ok(())
    }

    /// What the decoder is made from.
    pub fn decoder_settings(&self) -> DecoderSettings {
        DecoderSettings {
            format: self.format,
            opts: self.options(),
            registry: self.registry.settings(),
        }
    }

    pub fn options(&self) -> DecodeOptions {
        DecodeOptions {
            amount_scale: self.amount_scale,
            columns: self.columns.names(),
            unavailable_placeholder: self.unavailable_placeholder.clone(),
        }
    }
}

/// `paystream run`: the daemon.
#[derive(Args, Debug, Clone)]
pub struct RunConfig {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Debezium topic of the payments table.
    #[arg(long, env = "PAYSTREAM_CDC_TOPIC", default_value = DEFAULT_CDC_TOPIC)]
    pub cdc_topic: String,
    /// Topic the final status events go to.
    #[arg(long, env = "PAYSTREAM_STATUS_TOPIC", default_value = DEFAULT_STATUS_TOPIC)]
    pub status_topic: String,
    /// Topic undecodable CDC messages go to, with the reason in headers.
    #[arg(long, env = "PAYSTREAM_DLQ_TOPIC", default_value = DEFAULT_DLQ_TOPIC)]
    pub dlq_topic: String,
    /// Consumer group of the CDC topic.
    #[arg(long, env = "PAYSTREAM_GROUP_ID", default_value = DEFAULT_GROUP_ID)]
    pub group_id: String,
    /// Directory of the sled state store.
    #[arg(long, env = "PAYSTREAM_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Time between Stripe polls of one pending payment.
    #[arg(long, env = "PAYSTREAM_POLL_INTERVAL", default_value = DEFAULT_POLL_INTERVAL, value_parser = duration)]
    pub poll_interval: Duration,
    /// Time between durable checkpoints of state and offsets.
    #[arg(long, env = "PAYSTREAM_CHECKPOINT_INTERVAL", default_value = DEFAULT_CHECKPOINT_INTERVAL, value_parser = duration)]
    pub checkpoint_interval: Duration,
    /// Stripe API base URL (point it at an emulator in tests).
    #[arg(long, env = "PAYSTREAM_STRIPE_API_BASE", default_value = DEFAULT_STRIPE_API_BASE)]
    pub stripe_api_base: String,
    /// Stripe secret key. Never logged.
    #[arg(long, env = "STRIPE_SECRET_KEY", hide_env_values = true)]
    pub stripe_key: Option<Secret>,
    /// Most Stripe requests per second, across all payments (retrieves, searches and event
    /// pages). A ceiling: a 429 halves the rate, which then climbs back to it over a minute.
    /// Every PaymentIntent retrieve of the account shares Stripe's 25/s endpoint bucket with
    /// the payment service, hence the low default.
    #[arg(long, env = "PAYSTREAM_STRIPE_RPS", default_value = DEFAULT_STRIPE_RPS)]
    pub stripe_rps: f64,
    /// Stripe Connect: the connected account (`acct_…`) every request acts on (the
    /// `Stripe-Account` header), unless --account-column names one for the row.
    #[arg(long, env = "PAYSTREAM_STRIPE_ACCOUNT")]
    pub stripe_account: Option<String>,
    /// Most Stripe Search requests per second (rows without an intent id), on top of
    /// --stripe-rps; Stripe limits Search to 20/s of its own.
    #[arg(long, env = "PAYSTREAM_STRIPE_SEARCH_RPS", default_value = DEFAULT_STRIPE_SEARCH_RPS)]
    pub stripe_search_rps: f64,
    /// Most Stripe requests in flight at once.
    #[arg(long, env = "PAYSTREAM_STRIPE_CONCURRENCY", default_value = DEFAULT_STRIPE_CONCURRENCY)]
    pub stripe_concurrency: usize,
    /// Per-request timeout for Stripe calls; a timeout never resolves a payment.
    #[arg(long, env = "PAYSTREAM_STRIPE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub stripe_timeout: Duration,
    /// First backoff after a poll got no answer (429, 5xx, timeout, unknown id); it doubles per
    /// failure, with jitter, up to the poll interval.
    #[arg(long, env = "PAYSTREAM_RETRY_BACKOFF", default_value = "5s", value_parser = duration)]
    pub retry_backoff: Duration,
    /// Address of /metrics, /healthz, /readyz and the state API `paystream state` reads.
    #[arg(long, env = "PAYSTREAM_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// How often the state gauges (pending by age, polls due, oldest age) are recomputed, in
    /// whole seconds; each time is one scan of state.
    #[arg(long, env = "PAYSTREAM_STATE_STATS_INTERVAL", default_value = DEFAULT_STATE_STATS_INTERVAL, value_parser = duration)]
    pub state_stats_interval: Duration,
    /// Format of the status events: json, or avro (Confluent wire format; the schema is
    /// registered under `<status-topic>-value` at start).
    #[arg(
        long,
        env = "PAYSTREAM_STATUS_FORMAT",
        value_enum,
        default_value = "json"
    )]
    pub status_format: crate::sink::StatusFormat,
    /// Scale-out: copy state changes to the compacted topic `<group-id>-state-changelog` at
    /// each checkpoint, restore a newly assigned partition from it when another instance
    /// wrote it last, and act on a partition only under a fresh group lease. Required when
    /// more than one instance shares the group id (docs/scaling-out.md).
    #[arg(long, env = "PAYSTREAM_CHANGELOG")]
    pub changelog: bool,
    /// Resolve payments from Stripe's events feed (payment_intent.succeeded / canceled /
    /// payment_failed, a few pages per poll interval, in the same rate budget) instead of one
    /// retrieve per payment per interval; a payment Stripe still calls pending is then retrieved
    /// again after --fallback-poll-interval. Needs the key to read events.
    #[arg(long, env = "PAYSTREAM_EVENTS_FEED")]
    pub events_feed: bool,
    /// With --events-feed: how long a payment still pending in Stripe waits for its next
    /// retrieve while the feed is healthy (it falls back to --poll-interval when the feed fails).
    #[arg(long, env = "PAYSTREAM_FALLBACK_POLL_INTERVAL", default_value = DEFAULT_FALLBACK_POLL_INTERVAL, value_parser = duration)]
    pub fallback_poll_interval: Duration,
    /// With --events-feed: how far before its cursor each cycle reads again, because Stripe's
    /// event list is eventually consistent (an event may become visible a little after events
    /// created later). Whole seconds; raise it if Stripe reports list delays.
    #[arg(long, env = "PAYSTREAM_EVENTS_FEED_OVERLAP", default_value = DEFAULT_EVENTS_FEED_OVERLAP, value_parser = duration)]
    pub events_feed_overlap: Duration,
    /// A payment still pending this long after paystream first saw it is stale: Stripe never
    /// cancels an incomplete intent by itself, so it may wait for ever. A stale payment is
    /// polled every --stale-poll-interval instead of every --poll-interval; staleness alone
    /// never resolves anything.
    #[arg(long, env = "PAYSTREAM_STALE_AFTER", default_value = DEFAULT_STALE_AFTER, value_parser = duration)]
    pub stale_after: Duration,
    /// How often stale payments, unknown intents (404, search misses) and payments flagged for
    /// an amount mismatch or a double charge are asked about.
    #[arg(long, env = "PAYSTREAM_STALE_POLL_INTERVAL", default_value = DEFAULT_STALE_POLL_INTERVAL, value_parser = duration)]
    pub stale_poll_interval: Duration,
    /// Off by default. Cancel in Stripe (cancellation_reason=abandoned, with an Idempotency-Key)
    /// the intent of a payment still pending this long after it was first seen, while Stripe
    /// lets it be canceled (requires_payment_method, requires_confirmation, requires_action,
    /// requires_capture); the payment resolves failed (reason abandoned) only when Stripe
    /// answers canceled. Needs a key that may write PaymentIntents. Rows without an intent id
    /// are never canceled.
    #[arg(long, env = "PAYSTREAM_CANCEL_ABANDONED_AFTER", value_parser = duration)]
    pub cancel_abandoned_after: Option<Duration>,
    /// Where changes come from: the Debezium topic (kafka), or the table's logical replication
    /// read directly (postgres: embedded mode, no Kafka or Debezium).
    #[arg(long, env = "PAYSTREAM_SOURCE", value_enum, default_value = "kafka")]
    pub source: SourceKind,
    /// Where final answers go: the status topic the updater reads (kafka), or the payments
    /// table itself through the updater's forward-only write (postgres).
    #[arg(long, env = "PAYSTREAM_SINK", value_enum, default_value = "kafka")]
    pub sink: SinkKind,
    /// Connection string of the Postgres master (libpq key=value or URL form), for
    /// `--source postgres` and `--sink postgres`. Never logged.
    #[arg(long, env = "PAYSTREAM_POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: Option<Secret>,
    /// Embedded mode: the logical replication slot, created when missing.
    #[arg(long, env = "PAYSTREAM_SLOT", default_value = DEFAULT_SLOT)]
    pub slot: String,
    /// Embedded mode: the publication of the payments table, created when missing.
    #[arg(long, env = "PAYSTREAM_PUBLICATION", default_value = DEFAULT_PUBLICATION)]
    pub publication: String,
    /// The payments table (`[schema.]name`), for `--source postgres` and `--sink postgres`.
    #[arg(long, env = "PAYSTREAM_TABLE", default_value = DEFAULT_TABLE)]
    pub table: String,
    /// Embedded mode: drop the slot if it exists and rebuild state from a fresh snapshot of the
    /// pending rows (after an operator dropped the slot, or state was restored from a backup
    /// older than the slot). Poll history is lost; no pending payment is.
    #[arg(long, env = "PAYSTREAM_RESNAPSHOT")]
    pub resnapshot: bool,
    #[command(flatten)]
    pub decode: DecodeArgs,
}

/// `--source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    Kafka,
    Postgres,
}

/// `--sink`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    Kafka,
    Postgres,
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

impl RunConfig {
    /// The settings that shape state (all `replay --no-poll` uses).
    pub fn validate_state_settings(&self) -> Result<(), ConfigError> {
        self.decode.validate()?;
        if self.poll_interval < Duration::from_millis(100) {
            return Err(bad("--poll-interval", "must be at least 100ms"));
        }
        if self.checkpoint_interval.is_zero() {
            return Err(bad("--checkpoint-interval", "must be positive"));
        }
        Ok(())
    }

    /// Whether anything of this run talks to Kafka.
    pub fn uses_kafka(&self) -> bool {
        self.source == SourceKind::Kafka || self.sink == SinkKind::Kafka
    }

    /// The Postgres connection string, for embedded mode's source and sink.
    pub fn postgres_url(&self) -> &str {
        self.postgres_url.as_ref().map_or("", |u| u.expose())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.uses_kafka() {
            self.kafka.validate()?;
        }
        if self.source == SourceKind::Postgres || self.sink == SinkKind::Postgres {
            if self.postgres_url().is_empty() {
                return Err(bad(
                    "--postgres-url (PAYSTREAM_POSTGRES_URL)",
                    "is required with --source postgres or --sink postgres",
                ));
            }
            let pg: tokio_postgres::Config = self
                .postgres_url()
                .parse()
                .map_err(|e| bad("--postgres-url (PAYSTREAM_POSTGRES_URL)", format!("{e}")))?;
            if self.source == SourceKind::Postgres
                && pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require
            {
                return Err(bad(
                    "--postgres-url (PAYSTREAM_POSTGRES_URL)",
                    "sslmode=require: embedded mode connects without TLS (a known gap); run it beside the database or use Kafka mode",
                ));
            }
            if !ident_ok(&self.table) {
                return Err(bad(
                    "--table",
                    "must be [schema.]name of letters, digits and _",
                ));
            }
            self.decode.columns.validate_written()?;
        }
        if self.source == SourceKind::Postgres {
            // Postgres' own rule for slot names.
            if self.slot.is_empty()
                || self.slot.len() > 63
                || !self
                    .slot
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(bad(
                    "--slot",
                    "must be 1-63 lower-case letters, digits and _",
                ));
            }
            if !ident_ok(&self.publication) || self.publication.contains('.') {
                return Err(bad(
                    "--publication",
                    "must be a name of letters, digits and _",
                ));
            }
            if self.changelog {
                return Err(bad(
                    "--changelog",
                    "scale-out shares Kafka partitions; embedded mode (--source postgres) runs one instance per slot",
                ));
            }
        }
        if self.status_format == crate::sink::StatusFormat::Avro
            && self.decode.registry.schema_registry_url.is_none()
        {
            return Err(bad(
                "--schema-registry-url",
                "is required with --status-format avro",
            ));
        }
        if self
            .stripe_key
            .as_ref()
            .is_none_or(|k| k.expose().len() < 6)
        {
            return Err(bad(
                "--stripe-key (STRIPE_SECRET_KEY)",
                "a Stripe secret or restricted key (sk_… or rk_…) is required",
            ));
        }
        if !(self.stripe_rps.is_finite() && self.stripe_rps > 0.0) {
            return Err(bad("--stripe-rps", "must be a positive number"));
        }
        if self
            .stripe_account
            .as_deref()
            .is_some_and(|a| !crate::poll::stripe::is_account_id(a))
        {
            return Err(bad(
                "--stripe-account",
                "must be a connected account id (acct_…)",
            ));
        }
        if !(self.stripe_search_rps.is_finite() && self.stripe_search_rps > 0.0) {
            return Err(bad("--stripe-search-rps", "must be a positive number"));
        }
        if self.stripe_concurrency == 0 {
            return Err(bad("--stripe-concurrency", "must be at least 1"));
        }
        self.validate_state_settings()?;
        // tokio-cron-scheduler keeps a repeated job's period in whole seconds.
        if self.state_stats_interval < Duration::from_secs(1)
            || self.state_stats_interval.subsec_nanos() != 0
        {
            return Err(bad(
                "--state-stats-interval",
                "must be whole seconds, at least 1s (the job scheduler counts seconds)",
            ));
        }
        if self.events_feed {
            if self.fallback_poll_interval < self.poll_interval {
                return Err(bad(
                    "--fallback-poll-interval",
                    "must be at least --poll-interval",
                ));
            }
            // The feed's cycle is a repeated job of the scheduler, which counts whole seconds.
            if self.poll_interval < Duration::from_secs(1) || self.poll_interval.subsec_nanos() != 0
            {
                return Err(bad(
                    "--poll-interval",
                    "must be whole seconds with --events-feed (the feed's cycle is a scheduled job)",
                ));
            }
        }
        if self.retry_backoff.is_zero() {
            return Err(bad("--retry-backoff", "must be positive"));
        }
        if self
            .cancel_abandoned_after
            .is_some_and(|d| d < self.poll_interval)
        {
            return Err(bad(
                "--cancel-abandoned-after",
                "must be at least --poll-interval",
            ));
        }
        if self.stale_poll_interval < self.poll_interval {
            return Err(bad(
                "--stale-poll-interval",
                "must be at least --poll-interval (stale payments are asked about less often)",
            ));
        }
        if self.changelog {
            // The lease (half the session) must be renewed several times over, or polls and
            // checkpoints would stall between renewals.
            let session = crate::scaleout::session_timeout(&self.kafka.kafka_options);
            if self.checkpoint_interval * 4 > session {
                return Err(bad(
                    "--checkpoint-interval",
                    format!("must be at most a quarter of session.timeout.ms ({session:?}) with --changelog: each checkpoint renews the group lease"),
                ));
            }
        }
        if !(self.stripe_api_base.starts_with("http://")
            || self.stripe_api_base.starts_with("https://"))
        {
            return Err(bad("--stripe-api-base", "must be an http(s) URL"));
        }
        for (name, topic) in [
            ("--cdc-topic", &self.cdc_topic),
            ("--status-topic", &self.status_topic),
            ("--dlq-topic", &self.dlq_topic),
        ] {
            if topic.is_empty() {
                return Err(bad(name, "is empty"));
            }
        }
        Ok(())
    }
}

/// `paystream updater`: writes status events back to the Postgres master.
#[derive(Args, Debug, Clone)]
pub struct UpdaterConfig {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[arg(long, env = "PAYSTREAM_STATUS_TOPIC", default_value = DEFAULT_STATUS_TOPIC)]
    pub status_topic: String,
    #[arg(long, env = "PAYSTREAM_GROUP_ID", default_value = DEFAULT_UPDATER_GROUP_ID)]
    pub group_id: String,
    /// Connection string of the Postgres master (libpq key=value or URL form).
    #[arg(long, env = "PAYSTREAM_POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: Option<Secret>,
    /// The payments table, optionally schema-qualified.
    #[arg(long, env = "PAYSTREAM_TABLE", default_value = DEFAULT_TABLE)]
    pub table: String,
    /// Most status events written in one statement (one transaction).
    #[arg(long, env = "PAYSTREAM_BATCH_SIZE", default_value = "500")]
    pub batch_size: usize,
    /// Longest wait to fill a batch, counted from its first event.
    #[arg(long, env = "PAYSTREAM_BATCH_LINGER", default_value = "100ms", value_parser = duration)]
    pub batch_linger: Duration,
    #[arg(long, env = "PAYSTREAM_METRICS_ADDR", default_value = DEFAULT_UPDATER_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// For Avro status events (read by their first byte; JSON needs no registry).
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub columns: ColumnArgs,
}

impl UpdaterConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        self.registry.validate()?;
        if self
            .postgres_url
            .as_ref()
            .is_none_or(|u| u.expose().is_empty())
        {
            return Err(bad(
                "--postgres-url (PAYSTREAM_POSTGRES_URL)",
                "is required",
            ));
        }
        if self.batch_size == 0 {
            return Err(bad("--batch-size", "must be at least 1"));
        }
        if !ident_ok(&self.table) {
            return Err(bad(
                "--table",
                "must be [schema.]name of letters, digits and _",
            ));
        }
        self.columns.validate_written()
    }
}

/// Applies a TOML config file: each key becomes its `PAYSTREAM_*` (or declared) environment
/// variable unless that is already set. Keys must be flag names of `command` (`poll-interval`
/// or `poll_interval`); anything else is an error naming the key.
pub fn apply_config_file<C: CommandFactory>(
    path: &std::path::Path,
    subcommand: &str,
) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad("--config", format!("{}: {e}", path.display())))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| bad("--config", format!("{}: {e}", path.display())))?;
    let cmd = C::command();
    let sub = cmd
        .find_subcommand(subcommand)
        .ok_or_else(|| bad("--config", format!("no command {subcommand}")))?;
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let arg = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()))
            .ok_or_else(|| {
                bad(
                    "--config",
                    format!(
                        "{}: unknown key {key:?} for `paystream {subcommand}`",
                        path.display()
                    ),
                )
            })?;
        let env = arg
            .get_env()
            .and_then(|e| e.to_str())
            .ok_or_else(|| {
                bad(
                    "--config",
                    format!("{}: key {key:?} cannot be set from a file", path.display()),
                )
            })?
            .to_string();
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(a) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect::<Vec<_>>()
                .join(";"),
            other => {
                return Err(bad(
                    "--config",
                    format!(
                        "{}: key {key:?} has unsupported value {other}",
                        path.display()
                    ),
                ))
            }
        };
        if std::env::var_os(&env).is_none() {
            std::env::set_var(env, text);
        }
    }
    Ok(())
}
