//! `paystream updater`: applies status events to the Postgres master, forward only.
//!
//! Each batch is one set-based statement (one implicit transaction), in effect
//! `UPDATE payments SET status = ev.status, stripe_payment_intent_id =
//!  COALESCE(stripe_payment_intent_id, ev.intent), updated_at = now() FROM <batch> ev
//!  WHERE id = ev.id AND status = 'pending'`
//! (the intent id is filled in only where the row had none: a payment found by Search on its
//! idempotency key gets the intent that answered):
//! a row changes only while it is still pending, so duplicates, replays and late events are
//! harmless. Kafka offsets are committed only after the statement committed; a crash in
//! between replays the batch, which changes nothing the second time. Unknown ids and rows
//! already final are counted, not errors. When Postgres is down the batch is retried with
//! backoff, offsets held, until it applies.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::clock::Backoff;
use crate::config::UpdaterConfig;
use crate::kafka::{client_config, BrokerWatch, STATS_INTERVAL_MS};
use crate::metrics::events::{emit, ConsumeFailed, PostgresWriteFailed};
use crate::metrics::METRICS;
use crate::sink::postgres::{applied, apply_batch, connect_retrying, prepare, SchemaError};
use crate::sink::{decode_status, StatusDecodeError};

#[derive(Debug, thiserror::Error)]
pub enum UpdaterError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("kafka client setup failed")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    KafkaUnreachable(#[from] crate::kafka::Unreachable),
    #[error("admin endpoint")]
    Admin(#[from] std::io::Error),
    /// The table or columns do not match the configuration: the operator must fix it.
    #[error(transparent)]
    Schema(#[from] SchemaError),
}

impl UpdaterError {
    /// Whether starting again later may succeed without anyone changing anything.
    pub fn retryable(&self) -> bool {
        matches!(self, UpdaterError::KafkaUnreachable(_))
    }
}

/// The updater's consumer reports broker state to readiness and errors to the metrics.
struct UpdaterContext {
    kafka: Arc<BrokerWatch>,
}

impl rdkafka::ClientContext for UpdaterContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::kafka::on_client_log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::kafka::on_client_error(&error, reason);
    }

    fn stats(&self, stats: rdkafka::Statistics) {
        self.kafka.on_stats(&stats);
    }
}

impl rdkafka::consumer::ConsumerContext for UpdaterContext {}

pub async fn run(
    cfg: UpdaterConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), UpdaterError> {
    cfg.validate()?;
    let url = cfg
        .postgres_url
        .as_ref()
        .map(|u| u.expose().to_string())
        .unwrap_or_default();
    let pending = cfg.columns.pending_status.clone();
    let registry = cfg
        .registry
        .settings()
        .map(|s| Arc::new(crate::decode::registry::Registry::new(s)));

    crate::metrics::init_updater_series();
    let pg_ok = Arc::new(AtomicBool::new(false));
    let kafka = Arc::new(BrokerWatch::default());
    let (ready_pg, ready_kafka) = (pg_ok.clone(), kafka.clone());
    let bound = crate::admin::serve(
        cfg.metrics_addr,
        Arc::new(move || {
            if !ready_pg.load(Ordering::Relaxed) {
                Err("postgres not connected".into())
            } else if !ready_kafka.is_up() {
                Err("no connection to any Kafka broker".into())
            } else {
                Ok(())
            }
        }),
        None,
    )
    .await?;
    tracing::info!(addr = %bound, "admin endpoint listening");

    let Some(mut client) = connect_retrying(&url, &pg_ok, &mut shutdown).await else {
        return Ok(());
    };
    let sql = prepare(&client, &cfg.table, &cfg.columns.write_columns()).await?;

    let mut cc = client_config(&cfg.kafka.brokers, &[]);
    cc.set("client.id", "paystream-updater")
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", STATS_INTERVAL_MS);
    for (k, v) in &cfg.kafka.kafka_options {
        cc.set(k, v);
    }
    let consumer: StreamConsumer<UpdaterContext> =
        cc.create_with_context(UpdaterContext { kafka })?;
    consumer.subscribe(&[&cfg.status_topic])?;
    if !crate::kafka::probe_brokers(
        &consumer,
        &cfg.kafka.brokers,
        &cfg.status_topic,
        cfg.kafka.kafka_startup_timeout,
    )? {
        tracing::warn!(topic = %cfg.status_topic, "the status topic does not exist yet; waiting for it");
    }
    tracing::info!(topic = %cfg.status_topic, group = %cfg.group_id, "updater consuming");

    'outer: loop {
        // Collect a batch: wait for the first event, then take more until full or the linger ends.
        let mut events = Vec::new();
        let mut next_offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let deadline = tokio::time::sleep(cfg.batch_linger);
        tokio::pin!(deadline);
        while events.len() < cfg.batch_size {
            let msg = tokio::select! {
                _ = shutdown.changed() => break 'outer,
                _ = &mut deadline, if !next_offsets.is_empty() => break,
                m = consumer.recv() => m,
            };
            let m = match msg {
                Ok(m) => m,
                Err(e) => {
                    emit(ConsumeFailed { error: &e });
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            // The linger counts from a batch's first event: counted from the batch's start, a
            // quiet spell would use it up and the next batch would close at one event.
            if next_offsets.is_empty() {
                deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + cfg.batch_linger);
            }
            next_offsets.insert((m.topic().to_string(), m.partition()), m.offset() + 1);
            let decoded = match m.payload() {
                Some(bytes) => Some(loop {
                    // A registry outage must not skip an event: wait for the registry (the
                    // offsets are held meanwhile). Only new schema ids need it; ids are cached.
                    match decode_status(bytes, registry.as_deref()).await {
                        Err(StatusDecodeError::RegistryUnavailable(e)) => {
                            tracing::warn!(error = %e, "status event waits for the schema registry");
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                _ = shutdown.changed() => break 'outer,
                            }
                        }
                        other => break other,
                    }
                }),
                None => None,
            };
            match decoded {
                Some(Ok(ev)) if ev.status == "succeeded" || ev.status == "failed" => {
                    events.push(ev)
                }
                other => {
                    // Known gap: an unreadable status event is counted and logged, not
                    // dead-lettered; only paystream writes this topic.
                    METRICS.updater_rows.with_label_values(&["invalid"]).inc();
                    let why = match other {
                        Some(Err(e)) => e.to_string(),
                        Some(Ok(ev)) => format!("status {:?} is not final", ev.status),
                        None => "empty value".into(),
                    };
                    tracing::error!(partition = m.partition(), offset = m.offset(), error = %why, "unreadable status event skipped");
                }
            }
        }
        // Apply until it sticks: Postgres being down holds the offsets, never skips events.
        let started = tokio::time::Instant::now();
        let mut backoff = Backoff::outage();
        let results = loop {
            match apply_batch(&client, &sql, &pending, &events).await {
                Ok(r) => {
                    pg_ok.store(true, Ordering::Relaxed);
                    break r;
                }
                Err(e) => {
                    pg_ok.store(false, Ordering::Relaxed);
                    emit(PostgresWriteFailed {
                        stage: "apply",
                        error: &e,
                        retry_in: backoff.peek(),
                        events: events.len(),
                    });
                    if !backoff.wait(&mut shutdown).await {
                        break 'outer;
                    }
                    if client.is_closed() {
                        let Some(c) = connect_retrying(&url, &pg_ok, &mut shutdown).await else {
                            break 'outer;
                        };
                        client = c;
                    }
                }
            }
        };
        METRICS
            .updater_batch_seconds
            .observe(started.elapsed().as_secs_f64());
        for (ev, r) in events.iter().zip(&results) {
            applied(ev, *r);
        }
        // Committed only now that the transaction is: a crash before this replays the batch,
        // which the forward-only UPDATE makes harmless.
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &next_offsets {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                METRICS.kafka_errors.with_label_values(&["commit"]).inc();
                tracing::warn!(error = %e, "offset commit failed; the batch may be applied again (harmless)");
            }
        }
    }
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    Ok(())
}
