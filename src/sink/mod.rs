//! Everything paystream writes to Kafka: `payment-status-update` events and dead letters.
//!
//! One idempotent producer (`enable.idempotence=true`, `acks=all`): a send returns only once
//! every in-sync replica has the record, and broker retries cannot duplicate or reorder it.

pub mod postgres;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::rfc3339_ms;
use crate::kafka::{idempotent_producer_config, LogContext};
use crate::metrics::METRICS;
use crate::state::Entry;

/// The status event. Schema: `schemas/payment-status-update.schema.json` (and `.avsc`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEvent {
    /// Deterministic from payment id and status, so a replayed or re-polled event carries the
    /// same id and consumers can deduplicate.
    pub event_id: String,
    pub payment_id: String,
    pub idempotency_key: String,
    pub stripe_payment_intent_id: Option<String>,
    /// `succeeded` or `failed`.
    pub status: String,
    /// The PaymentIntent status Stripe reported.
    pub stripe_status: String,
    pub reason: Option<String>,
    pub observed_at: String,
    pub producer: String,
    /// What Stripe received (`amount_received`), in the currency's minor unit. For `succeeded`
    /// it equals the row's amount (paystream checked); absent in events written before it.
    #[serde(default)]
    pub amount_received: Option<i64>,
    /// The intent's currency as Stripe reported it (lower case).
    #[serde(default)]
    pub currency: Option<String>,
    /// Declined attempts paystream saw before the final answer.
    #[serde(default)]
    pub decline_count: u32,
}

/// `event_id` for a payment reaching a status: SHA-256 of both, first 16 bytes as a UUID-shaped
/// hex string.
pub fn event_id(payment_id: &str, status: &str) -> String {
    let h = Sha256::digest(format!("paystream/v1\0{payment_id}\0{status}").as_bytes());
    let x: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

/// What Stripe said about the intent an answer rests on. The status event carries it, so a
/// ledger downstream does not have to ask Stripe again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub intent_id: String,
    pub stripe_status: String,
    /// `amount_received`, in the currency's minor unit; `None` when the answer lacks it.
    pub amount_received: Option<i64>,
    /// Lower case, as Stripe writes it.
    pub currency: Option<String>,
}

impl StatusEvent {
    /// The event for `e` reaching `status` on what Stripe said (`seen`).
    pub fn new(
        e: &Entry,
        status: &str,
        reason: Option<String>,
        seen: &Seen,
        observed_ms: u64,
    ) -> Self {
        StatusEvent {
            event_id: event_id(&e.id, status),
            payment_id: e.id.clone(),
            idempotency_key: e.idempotency_key.clone(),
            stripe_payment_intent_id: Some(seen.intent_id.clone()),
            status: status.to_string(),
            stripe_status: seen.stripe_status.clone(),
            reason,
            observed_at: rfc3339_ms(observed_ms),
            producer: "paystream".into(),
            amount_received: seen.amount_received,
            currency: seen.currency.clone(),
            decline_count: e.decline_count(),
        }
    }
}

/// The status event's Avro schema (the `.avsc` beside the JSON Schema).
pub const STATUS_AVSC: &str = include_str!("../../schemas/payment-status-update.avsc");

/// How status events are written: `--status-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusFormat {
    Json,
    /// Confluent wire format, the schema registered under `<status-topic>-value`.
    Avro,
}

/// The status events' encoding, resolved at start.
pub enum StatusEncoding {
    Json,
    Avro {
        id: u32,
        schema: apache_avro::Schema,
    },
}

impl StatusEncoding {
    /// Registers (or finds) the Avro schema under the TopicNameStrategy subject.
    pub async fn avro(
        registry: &crate::decode::registry::Registry,
        status_topic: &str,
    ) -> Result<StatusEncoding, crate::decode::registry::RegistryError> {
        let subject = format!("{status_topic}-value");
        let id = registry.register(&subject, STATUS_AVSC).await?;
        let schema = apache_avro::Schema::parse_str(STATUS_AVSC).expect("the .avsc parses");
        tracing::info!(schema_id = id, %subject, "status schema registered");
        Ok(StatusEncoding::Avro { id, schema })
    }

    fn encode(&self, ev: &StatusEvent) -> (Vec<u8>, &'static str) {
        match self {
            StatusEncoding::Json => (
                serde_json::to_vec(ev).expect("status event serializes"),
                "application/json",
            ),
            StatusEncoding::Avro { id, schema } => {
                // The unit test below proves every event fits the schema.
                let datum = apache_avro::to_value(ev)
                    .and_then(|v| v.resolve(schema))
                    .and_then(|v| apache_avro::to_avro_datum(schema, v))
                    .expect("status events fit their Avro schema");
                let mut out = Vec::with_capacity(5 + datum.len());
                out.push(crate::decode::avro::MAGIC);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&datum);
                (out, "application/vnd.confluent.avro")
            }
        }
    }
}

/// Why a status event could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusDecodeError {
    /// The bytes are not a status event: the producer's fault; no retry helps.
    #[error("{0}")]
    Invalid(String),
    /// The registry did not answer: its fault; a retry helps, and the event must wait for it.
    #[error(transparent)]
    RegistryUnavailable(crate::decode::registry::RegistryError),
}

impl StatusDecodeError {
    /// An invalid event stays invalid; the registry may come back.
    pub fn retryable(&self) -> bool {
        matches!(self, StatusDecodeError::RegistryUnavailable(_))
    }
}

/// Reads a status event in either format (the updater): Confluent Avro by its first byte,
/// otherwise JSON.
pub async fn decode_status(
    bytes: &[u8],
    registry: Option<&crate::decode::registry::Registry>,
) -> Result<StatusEvent, StatusDecodeError> {
    use StatusDecodeError::Invalid;
    if bytes.first() != Some(&crate::decode::avro::MAGIC) {
        return serde_json::from_slice(bytes).map_err(|e| Invalid(e.to_string()));
    }
    let (id, body) = crate::decode::avro::split_wire(bytes).map_err(|e| Invalid(e.to_string()))?;
    let registry = registry.ok_or_else(|| {
        Invalid(format!(
            "Avro status event (schema id {id}) but no --schema-registry-url is set"
        ))
    })?;
    let schema = registry.schema(id).await.map_err(|e| match e {
        crate::decode::registry::RegistryError::Unavailable { .. } => {
            StatusDecodeError::RegistryUnavailable(e)
        }
        other => Invalid(other.to_string()),
    })?;
    let v = crate::decode::avro::read_datum(body, &schema).map_err(|e| Invalid(e.to_string()))?;
    apache_avro::from_value(&v).map_err(|e| Invalid(format!("Avro datum: {e}")))
}

/// A failed write to Kafka. The broker (or the network to it) is at fault; retrying helps.
#[derive(Debug, thiserror::Error)]
#[error("producing to {topic} failed: {source}")]
pub struct SinkError {
    pub topic: String,
    pub source: rdkafka::error::KafkaError,
}

impl SinkError {
    /// The broker is at fault unless librdkafka refused the record itself (too large, no such
    /// topic and auto-creation off, bad configuration): then the operator must look.
    pub fn retryable(&self) -> bool {
        use rdkafka::types::RDKafkaErrorCode as C;
        !matches!(
            self.source.rdkafka_error_code(),
            Some(
                C::MessageSizeTooLarge
                    | C::InvalidConfig
                    | C::TopicAuthorizationFailed
                    | C::ClusterAuthorizationFailed
            )
        )
    }
}

/// Where final answers go: the Kafka topic the updater reads (`--sink kafka`), or straight to
/// the payments table through the updater's forward-only write (`--sink postgres`).
pub enum StatusSink {
    Kafka(Arc<Sink>),
    Postgres(Box<crate::sink::postgres::Writer>),
}

/// A status event that was not stored; the poller keeps the payment pending and asks again.
#[derive(Debug, thiserror::Error)]
pub enum StatusSinkError {
    #[error(transparent)]
    Kafka(#[from] SinkError),
    #[error(transparent)]
    Postgres(#[from] crate::sink::postgres::WriteError),
}

impl StatusSinkError {
    pub fn retryable(&self) -> bool {
        match self {
            StatusSinkError::Kafka(e) => e.retryable(),
            StatusSinkError::Postgres(e) => e.retryable(),
        }
    }
}

impl StatusSink {
    /// Returns once the event is stored: acked by the broker, or committed to the table (where
    /// a row already final is stored too: it changes nothing, as the updater would).
    pub async fn send_status(&self, ev: &StatusEvent) -> Result<(), StatusSinkError> {
        match self {
            StatusSink::Kafka(sink) => sink.send_status(ev).await.map_err(|e| {
                METRICS
                    .kafka_errors
                    .with_label_values(&["produce_status"])
                    .inc();
                e.into()
            }),
            // The writer counts its own rows and errors.
            StatusSink::Postgres(w) => w.write(ev).await.map(|_| ()).map_err(Into::into),
        }
    }
}

/// Where a dead letter came from.
pub struct DeadLetter<'a> {
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub reason: &'a str,
    pub detail: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// Where undecodable CDC messages go: the dead-letter topic (the daemon) or a JSON-lines file
/// (`replay`, which reads files and needs no broker).
pub enum DeadLetters {
    Kafka(Arc<Sink>),
    File(DeadLetterFile),
}

/// A failed dead-letter write: the broker, or the local disk for a file. Retrying helps once
/// the broker is back or space is freed; until then the source does not move past the message.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(transparent)]
    Kafka(#[from] SinkError),
    #[error("writing dead letter to {path} failed: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
}

impl DeadLetterError {
    /// A dead letter is retried until stored either way (nothing may be skipped unseen); this
    /// says whether waiting alone can help: the broker's errors, yes; the disk's, only once
    /// someone frees or fixes it.
    pub fn retryable(&self) -> bool {
        match self {
            DeadLetterError::Kafka(e) => e.retryable(),
            DeadLetterError::File { .. } => false,
        }
    }
}

impl DeadLetters {
    /// Returns once the dead letter is stored durably (acked by the broker, or written and
    /// synced to disk): only then may the source's offset pass the message.
    pub async fn send(&self, d: &DeadLetter<'_>) -> Result<(), DeadLetterError> {
        match self {
            DeadLetters::Kafka(sink) => Ok(sink.send_dead_letter(d).await?),
            DeadLetters::File(f) => f.write(d).await,
        }
    }
}

/// Dead letters as JSON lines: source position, reason, error, and the message itself (as text
/// when it is UTF-8, else base64). Opened on the first dead letter, so a clean run leaves none.
pub struct DeadLetterFile {
    path: std::path::PathBuf,
    /// Shared with the blocking thread that appends and syncs.
    out: Arc<std::sync::Mutex<Option<std::fs::File>>>,
}

impl DeadLetterFile {
    pub fn new(path: std::path::PathBuf) -> Self {
        DeadLetterFile {
            path,
            out: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Appends the dead letter and syncs it, on tokio's blocking pool (an fsync may take a
    /// disk's whole latency).
    async fn write(&self, d: &DeadLetter<'_>) -> Result<(), DeadLetterError> {
        use base64::Engine;
        let bytes = |b: Option<&[u8]>| match b.map(std::str::from_utf8) {
            None => serde_json::Value::Null,
            Some(Ok(s)) => s.into(),
            Some(Err(_)) => {
                serde_json::json!({"base64": base64::engine::general_purpose::STANDARD.encode(b.unwrap_or_default())})
            }
        };
        let mut line = serde_json::to_vec(&serde_json::json!({
            "topic": d.topic,
            "partition": d.partition,
            "offset": d.offset,
            "reason": d.reason,
            "error": d.detail,
            "key": bytes(d.key),
            "value": bytes(d.payload),
        }))
        .expect("json");
        line.push(b'\n');
        let (path, out) = (self.path.clone(), self.out.clone());
        tokio::task::spawn_blocking(move || append_synced(&path, &out, &line))
            .await
            .expect("dead letter task")
    }
}

/// Appends `line` to the file at `path` (opened on first use) and syncs it.
fn append_synced(
    path: &std::path::Path,
    out: &std::sync::Mutex<Option<std::fs::File>>,
    line: &[u8],
) -> Result<(), DeadLetterError> {
    use std::io::Write;
    let err = |source| DeadLetterError::File {
        path: path.display().to_string(),
        source,
    };
    let mut out = out.lock().expect("dead letter lock");
    if out.is_none() {
        *out = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(err)?,
        );
    }
    let f = out.as_mut().expect("opened");
    // Synced per letter: dead letters are rare, and the offset moves past this message
    // at the next checkpoint.
    f.write_all(line).and_then(|_| f.sync_data()).map_err(err)
}

pub struct Sink {
    /// Replaced by a fresh producer when the current one stops delivering (see `send`).
    producer: RwLock<Current>,
    config: rdkafka::ClientConfig,
    /// Sends in a row that failed; reset by any success.
    failures: AtomicU32,
    status_topic: String,
    dlq_topic: String,
    encoding: StatusEncoding,
}

struct Current {
    producer: Arc<FutureProducer<LogContext>>,
    /// When this producer replaced a failing one (`None`: the first).
    since_rebuild: Option<Instant>,
}

/// Failed sends in a row after which the producer is rebuilt.
const REBUILD_AFTER_FAILURES: u32 = 3;
/// At most one rebuild per this long (a long outage would otherwise rebuild on every send).
const REBUILD_AT_MOST_EVERY: Duration = Duration::from_secs(10);

impl Sink {
    pub fn new(
        brokers: &str,
        extra: &[(String, String)],
        status_topic: &str,
        dlq_topic: &str,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let c = idempotent_producer_config(brokers, extra, "paystream-sink");
        Ok(Sink {
            producer: RwLock::new(Current {
                producer: Arc::new(c.create_with_context(LogContext)?),
                since_rebuild: None,
            }),
            config: c,
            failures: AtomicU32::new(0),
            status_topic: status_topic.into(),
            dlq_topic: dlq_topic.into(),
            encoding: StatusEncoding::Json,
        })
    }

    /// Writes status events in `encoding` from now on (the default is JSON).
    pub fn with_status_encoding(mut self, encoding: StatusEncoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Produces a status event keyed by payment id and waits for the broker's ack.
    pub async fn send_status(&self, ev: &StatusEvent) -> Result<(), SinkError> {
        let (payload, content_type) = self.encoding.encode(ev);
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "event_id",
                value: Some(ev.event_id.as_bytes()),
            })
            .insert(Header {
                key: "content-type",
                value: Some(content_type.as_bytes()),
            });
        let rec = FutureRecord::to(&self.status_topic)
            .key(&ev.payment_id)
            .payload(&payload)
            .headers(headers);
        self.send(rec).await
    }

    /// Copies an undecodable message to the dead-letter topic, with headers naming the reason
    /// and the exact source position, and waits for the ack.
    pub async fn send_dead_letter(&self, d: &DeadLetter<'_>) -> Result<(), SinkError> {
        let (partition, offset) = (d.partition.to_string(), d.offset.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "paystream.reason",
                value: Some(d.reason.as_bytes()),
            })
            .insert(Header {
                key: "paystream.error",
                value: Some(d.detail.as_bytes()),
            })
            .insert(Header {
                key: "paystream.source.topic",
                value: Some(d.topic.as_bytes()),
            })
            .insert(Header {
                key: "paystream.source.partition",
                value: Some(partition.as_bytes()),
            })
            .insert(Header {
                key: "paystream.source.offset",
                value: Some(offset.as_bytes()),
            });
        let mut rec: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.dlq_topic).headers(headers);
        if let Some(k) = d.key {
            rec = rec.key(k);
        }
        if let Some(p) = d.payload {
            rec = rec.payload(p);
        }
        self.send(rec).await
    }

    /// Sends and waits for the broker's ack (bounded by `message.timeout.ms`).
    async fn send<K, P>(&self, rec: FutureRecord<'_, K, P>) -> Result<(), SinkError>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        let topic = rec.topic.to_string();
        let producer = self
            .producer
            .read()
            .expect("producer lock")
            .producer
            .clone();
        match producer.send(rec, Duration::from_secs(30)).await {
            Ok(_) => {
                self.failures.store(0, Ordering::Relaxed);
                Ok(())
            }
            Err((source, _)) => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= REBUILD_AFTER_FAILURES || producer.client().fatal_error().is_some() {
                    self.rebuild(&producer);
                }
                Err(SinkError { topic, source })
            }
        }
    }

    /// Replaces a producer that keeps failing with a fresh one.
    ///
    /// Why: an idempotent producer whose messages timed out during a broker outage keeps its
    /// producer id and sequence numbers; a broker that lost that state on restart then rejects
    /// every later send (seen here against the dev broker: "Unknown broker error" for minutes
    /// after it came back). A new producer gets a new id and delivers at once. Delivery stays
    /// at least once: a status event whose ack was lost is polled and sent again with the same
    /// `event_id`, and dead letters are retried until acked.
    fn rebuild(&self, failing: &Arc<FutureProducer<LogContext>>) {
        let mut current = self.producer.write().expect("producer lock");
        // Another send already replaced it, or it replaced one only moments ago.
        if !Arc::ptr_eq(&current.producer, failing)
            || current
                .since_rebuild
                .is_some_and(|t| t.elapsed() < REBUILD_AT_MOST_EVERY)
        {
            return;
        }
        match self.config.create_with_context(LogContext) {
            Ok(fresh) => {
                let old = std::mem::replace(
                    &mut *current,
                    Current {
                        producer: Arc::new(fresh),
                        since_rebuild: Some(Instant::now()),
                    },
                )
                .producer;
                self.failures.store(0, Ordering::Relaxed);
                METRICS.producer_rebuilds.inc();
                tracing::warn!(
                    failures = REBUILD_AFTER_FAILURES,
                    "kafka producer rebuilt after failed sends in a row"
                );
                // librdkafka may block while it tears a producer down: not on the runtime.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => tracing::error!(error = %e, "kafka producer could not be rebuilt"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_in_the_repo_describe_the_event() {
        let ev = StatusEvent {
            event_id: event_id("42", "failed"),
            payment_id: "42".into(),
            idempotency_key: "k".into(),
            stripe_payment_intent_id: Some("pi_1".into()),
            status: "failed".into(),
            stripe_status: "canceled".into(),
            reason: Some("canceled".into()),
            observed_at: "2026-11-22T00:00:00.000Z".into(),
            producer: "paystream".into(),
            amount_received: Some(0),
            currency: Some("usd".into()),
            decline_count: 2,
        };
        let avsc = apache_avro::Schema::parse_str(include_str!(
            "../../schemas/payment-status-update.avsc"
        ))
        .unwrap();
        let datum = apache_avro::to_value(&ev)
            .unwrap()
            .resolve(&avsc)
            .expect("event fits the Avro schema");
        assert!(apache_avro::to_avro_datum(&avsc, datum).is_ok());
        // The JSON Schema lists exactly the event's fields.
        let js: serde_json::Value = serde_json::from_str(include_str!(
            "../../schemas/payment-status-update.schema.json"
        ))
        .unwrap();
        let mut props: Vec<_> = js["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let mut fields: Vec<_> = serde_json::to_value(&ev)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        props.sort();
        fields.sort();
        assert_eq!(props, fields);
    }

    /// The schema before `amount_received`, `currency` and `decline_count` were added.
    const STATUS_AVSC_V1: &str = r#"{"type": "record", "name": "PaymentStatusUpdate", "namespace": "dev.paystream",
      "fields": [
        {"name": "event_id", "type": "string"}, {"name": "payment_id", "type": "string"},
        {"name": "idempotency_key", "type": "string"},
        {"name": "stripe_payment_intent_id", "type": ["null", "string"], "default": null},
        {"name": "status", "type": {"type": "enum", "name": "FinalStatus", "symbols": ["succeeded", "failed"]}},
        {"name": "stripe_status", "type": "string"},
        {"name": "reason", "type": ["null", "string"], "default": null},
        {"name": "observed_at", "type": "string"}, {"name": "producer", "type": "string"}]}"#;

    #[test]
    fn events_written_before_the_stripe_fields_still_read() {
        let old = serde_json::json!({
            "event_id": "e", "payment_id": "1", "idempotency_key": "k",
            "stripe_payment_intent_id": "pi_1", "status": "succeeded", "stripe_status": "succeeded",
            "reason": null, "observed_at": "2026-11-22T00:00:00.000Z", "producer": "paystream"
        });
        let ev: StatusEvent = serde_json::from_value(old.clone()).unwrap();
        assert_eq!((ev.amount_received, ev.decline_count), (None, 0));
        // Avro: a datum of the old schema read with it as the writer's schema, as the updater
        // does with the id the event carries.
        let v1 = apache_avro::Schema::parse_str(STATUS_AVSC_V1).unwrap();
        let datum = apache_avro::to_avro_datum(
            &v1,
            apache_avro::to_value(&old).unwrap().resolve(&v1).unwrap(),
        )
        .unwrap();
        let read = apache_avro::from_avro_datum(&v1, &mut &datum[..], None).unwrap();
        let ev: StatusEvent = apache_avro::from_value(&read).unwrap();
        assert_eq!((ev.currency, ev.decline_count), (None, 0));
        // And the new schema reads old data through resolution (backward compatible): every
        // added field has a default.
        let new = apache_avro::Schema::parse_str(STATUS_AVSC).unwrap();
        let resolved = apache_avro::from_avro_datum(&v1, &mut &datum[..], Some(&new)).unwrap();
        let ev: StatusEvent = apache_avro::from_value(&resolved).unwrap();
        assert_eq!(ev.decline_count, 0);
    }

    #[test]
    fn event_id_is_deterministic_per_payment_and_status() {
        assert_eq!(event_id("42", "succeeded"), event_id("42", "succeeded"));
        assert_ne!(event_id("42", "succeeded"), event_id("42", "failed"));
        assert_ne!(event_id("42", "succeeded"), event_id("43", "succeeded"));
        assert_eq!(event_id("42", "succeeded").len(), 36);
    }
}
