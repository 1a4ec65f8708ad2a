//! `paystream run` (and `state`, `replay`, which read the same flags): its arguments and their
//! validation.

// The defaults, parsers and error constructor of `config`, shared by every command.
use super::*;

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
    /// Longest time between durable checkpoints of state and offsets. A checkpoint also starts
    /// as soon as there are changes (after a 5 ms linger), so under load they run back to back;
    /// with scale-out, the group lease is renewed once per this interval.
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
    /// whole seconds; each time reads the counts kept at write time (no scan of state).
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
