//! The arguments several commands share: Kafka, the table's columns, decoding and the schema
//! registry.

// The defaults, parsers and error constructor of `config`, shared by every command.
use super::*;

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
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
