//! `paystream updater`: its arguments and their validation.

// The defaults, parsers and error constructor of `config`, shared by every command.
use super::*;

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
    /// Longest wait to fill a batch, counted from its first event. Short: at the platform's
    /// 1,000 payments a minute every status event waits the whole linger (batches fill by
    /// themselves under load), and Stripe's answer should reach the row within 100 ms.
    #[arg(long, env = "PAYSTREAM_BATCH_LINGER", default_value = "10ms", value_parser = duration)]
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
