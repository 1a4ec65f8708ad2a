//! What every Kafka client of paystream shares: base settings, the start-up reachability probe,
//! and the broker watch that turns librdkafka's statistics into readiness, a metric and a log
//! line when the brokers go away and come back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::statistics::Statistics;
use rdkafka::ClientConfig;

use crate::metrics::events::{emit, KafkaClientError};
use crate::metrics::METRICS;

/// How often librdkafka reports statistics (broker states, consumer lag) to the watch.
pub const STATS_INTERVAL_MS: &str = "1000";

/// librdkafka settings shared by paystream's clients, then the user's `--kafka-option`s.
pub fn client_config(brokers: &str, extra: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4");
    for (k, v) in extra {
        c.set(k, v);
    }
    c
}

/// An idempotent producer's settings, then the user's `--kafka-option`s that apply to producers.
/// `acks=all` and idempotence: a send is acked only once every in-sync replica has it, and
/// broker retries cannot duplicate or reorder records within a partition. The message timeout
/// is bounded, so a long outage surfaces as an error the caller retries and counts instead of a
/// send that never returns.
pub fn idempotent_producer_config(
    brokers: &str,
    extra: &[(String, String)],
    client_id: &str,
) -> ClientConfig {
    let mut c = client_config(brokers, &[]);
    c.set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000");
    for (k, v) in extra.iter().filter(|(k, _)| is_producer_key(k)) {
        c.set(k, v);
    }
    c
}

/// Why start-up stopped: no broker answered. The operator (address, network, credentials) or
/// the broker is at fault; a restart helps once it answers.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach Kafka at {brokers} (--brokers) within {timeout:?}: {source}")]
pub struct Unreachable {
    pub brokers: String,
    pub timeout: Duration,
    pub source: rdkafka::error::KafkaError,
}

/// Asks the brokers for `topic`'s metadata once, at start, so a wrong address fails fast with a
/// clear line instead of a daemon that waits forever. Returns whether the topic exists.
/// Blocks in place (librdkafka's call is synchronous): needs the multi-thread runtime.
pub fn probe_brokers<C, K>(
    client: &K,
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> Result<bool, Unreachable>
where
    C: rdkafka::consumer::ConsumerContext,
    K: rdkafka::consumer::Consumer<C>,
{
    let md = tokio::task::block_in_place(|| client.fetch_metadata(Some(topic), timeout)).map_err(
        |source| Unreachable {
            brokers: brokers.into(),
            timeout,
            source,
        },
    )?;
    Ok(md
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none()))
}

/// What every consumer context does with a librdkafka client error: count it and log it.
/// librdkafka retries by itself; an outage shows in [`BrokerWatch`].
pub fn on_client_error(error: &rdkafka::error::KafkaError, reason: &str) {
    emit(KafkaClientError { error, reason });
}

/// librdkafka's own log lines, at levels chosen for operators who alert on ERROR. librdkafka
/// logs a lost broker connection, a refused connect or a timed-out request at its own error
/// level and then retries by itself; an outage that lasts is reported once by [`BrokerWatch`]
/// (readiness, `paystream_kafka_brokers_up`, one warning when it starts and one when it ends).
/// So librdkafka's errors and warnings are warnings here; only its emergency, alert and
/// critical lines are errors, its notices are info, and its info and debug lines are debug.
pub fn on_client_log(level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical => tracing::error!(fac, "librdkafka: {message}"),
        L::Error | L::Warning => tracing::warn!(fac, "librdkafka: {message}"),
        L::Notice => tracing::info!(fac, "librdkafka: {message}"),
        L::Info | L::Debug => tracing::debug!(fac, "librdkafka: {message}"),
    }
}

/// The context of every producer (status events, dead letters, the state changelog) and admin
/// client: its
/// errors and logs go where the consumers' go ([`on_client_error`], [`on_client_log`]), instead
/// of rdkafka's default context, which logs every transient broker error at ERROR.
#[derive(Clone, Copy, Default)]
pub struct LogContext;

impl rdkafka::ClientContext for LogContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        on_client_log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        on_client_error(&error, reason);
    }
}

/// The context of a reader that asks librdkafka for `enable.partition.eof` (the changelog's
/// restore reader): librdkafka reports each partition's end through the error callback too,
/// and rdkafka's default context logs that at ERROR ("PartitionEOF (Broker: No more
/// messages)"), which operators would alert on. A partition's end is news, not an error: it is
/// logged at DEBUG; every other error goes through [`on_client_error`].
pub struct ReaderContext;

impl rdkafka::ClientContext for ReaderContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        on_client_log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if matches!(error, rdkafka::error::KafkaError::PartitionEOF(_)) {
            tracing::debug!(reason, "kafka reader reached a partition's end");
        } else {
            on_client_error(&error, reason);
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

/// Whether this client has a live connection to at least one broker, from librdkafka's
/// statistics. librdkafka reconnects by itself; the watch only makes an outage visible: it
/// flips readiness, sets `paystream_kafka_brokers_up`, counts `paystream_kafka_outages_total`
/// and logs when the outage starts and ends.
///
/// Up until the statistics say otherwise: start-up already proved a broker answers.
#[derive(Default)]
pub struct BrokerWatch {
    /// When the current outage began; `None` while connected.
    down_since: Mutex<Option<Instant>>,
}

impl BrokerWatch {
    pub fn is_up(&self) -> bool {
        self.down_since.lock().expect("broker watch").is_none()
    }

    /// Called with each statistics report (every [`STATS_INTERVAL_MS`]).
    pub fn on_stats(&self, stats: &Statistics) {
        // Real brokers only: bootstrap entries (-1) and the internal/logical ones do not count.
        let up = stats
            .brokers
            .values()
            .filter(|b| b.nodeid >= 0 && b.state == "UP")
            .count();
        METRICS.kafka_brokers_up.set(up as i64);
        let mut down_since = self.down_since.lock().expect("broker watch");
        match (up, *down_since) {
            (0, None) => {
                *down_since = Some(Instant::now());
                METRICS.kafka_outages.inc();
                tracing::error!(client = %stats.client_id, "kafka outage: no connection to any broker; reconnecting (offsets held, nothing is skipped)");
            }
            (1.., Some(since)) => {
                *down_since = None;
                tracing::warn!(client = %stats.client_id, outage_ms = since.elapsed().as_millis() as u64, brokers_up = up, "kafka reachable again");
            }
            _ => {}
        }
    }
}

/// Consumer-only settings from `--kafka-option` are not passed to the producer (librdkafka
/// would warn on each).
fn is_producer_key(k: &str) -> bool {
    !matches!(
        k,
        "session.timeout.ms"
            | "heartbeat.interval.ms"
            | "max.poll.interval.ms"
            | "auto.offset.reset"
            | "partition.assignment.strategy"
            | "group.instance.id"
            | "fetch.wait.max.ms"
            | "isolation.level"
    )
}
