//! The CDC source: consumes the Debezium topic, applies each event to state, and checkpoints.
//!
//! # Offsets (why this order is safe)
//! 1. A message's state change and its partition's next offset enter the state overlay
//!    together ([`Store::apply_event`]); a dead-lettered message's offset only advances after
//!    the dead-letter topic acked it, so nothing is skipped unseen.
//! 2. Every `checkpoint_interval` the overlay and offsets are written in one atomic sled batch
//!    and flushed.
//! 3. Only then are those offsets committed to the consumer group, and only for partitions this
//!    instance still owns. The group's offsets are for lag tooling; they never run ahead of
//!    durable state.
//! 4. On assignment each partition starts at the offset stored in sled, not the group's; with
//!    none stored it starts at the beginning, rebuilding state from the topic.
//!
//! A crash anywhere replays at most the messages since the last checkpoint, and applying a
//! Debezium event twice yields the same state (upsert / remove by id).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::decode::{Col, Decoder};
use crate::kafka::{client_config, BrokerWatch, STATS_INTERVAL_MS};
use crate::metrics::METRICS;
use crate::sink::{DeadLetter, DeadLetterError, DeadLetters};
use crate::state::{Applied, StateError, Store};

/// Liveness facts the admin endpoints report.
#[derive(Default)]
pub struct Health {
    pub last_checkpoint_ms: AtomicU64,
    pub assigned: AtomicBool,
    /// The state store passed its recovery check (run beside the start).
    pub checked: AtomicBool,
    /// The consumer's view of the brokers (librdkafka statistics).
    pub kafka: BrokerWatch,
}

pub struct SourceContext {
    state: Arc<Store>,
    health: Arc<Health>,
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        crate::kafka::on_client_error(&error, reason);
    }

    fn stats(&self, stats: rdkafka::Statistics) {
        self.health.kafka.on_stats(&stats);
        // Lag as this instance reads: the partition's end minus the next offset it will read
        // (not the durable position; that is paystream_stored_offset).
        for topic in stats.topics.values() {
            for p in topic.partitions.values() {
                if p.partition >= 0 && p.desired && p.hi_offset >= 0 && p.app_offset >= 0 {
                    METRICS
                        .consumer_lag
                        .with_label_values(&[&p.partition.to_string()])
                        .set((p.hi_offset - p.app_offset).max(0));
                }
            }
        }
    }
}

impl SourceContext {
    /// Publishes how many partitions this instance now owns (metric and readiness).
    fn record_assignment(&self, consumer: &BaseConsumer<Self>) {
        let n = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        METRICS.partitions_assigned.set(n as i64);
        self.health.assigned.store(n > 0, Ordering::Relaxed);
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            rdkafka::consumer::RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                for (topic, partition) in &parts {
                    // Resume where durable state ends, not where the group's commit says.
                    let offset = match self.state.stored_offset(topic, *partition) {
                        Ok(Some(o)) => Offset::Offset(o),
                        Ok(None) => Offset::Beginning,
                        Err(e) => {
                            // Cannot read our own offsets: refuse to guess. The daemon's
                            // checkpoint will hit the same store error and stop.
                            tracing::error!(error = %e, topic, partition, "cannot read stored offset");
                            Offset::Beginning
                        }
                    };
                    let _ = tpl.set_partition_offset(topic, *partition, offset);
                    tracing::info!(topic, partition, offset = ?offset, "partition assigned");
                }
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "assign failed");
                }
                self.record_assignment(consumer);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Make everything read from these partitions durable before another member may
                // take them (it resumes from the group's commit or its own state).
                match self.state.checkpoint() {
                    Ok(cp) => commit(consumer, &owned_offsets(&cp.offsets, tpl), CommitMode::Sync),
                    Err(e) => tracing::error!(error = %e, "checkpoint on revoke failed"),
                }
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "unassign failed");
                }
                self.record_assignment(consumer);
                tracing::info!(partitions = tpl.count(), "partitions revoked");
            }
            other => tracing::error!(error = ?other, "rebalance error"),
        }
    }
}

/// The offsets of `offsets` for the partitions in `owned` only: committing for a partition
/// another member now owns would move its position.
fn owned_offsets(offsets: &[(String, i32, i64)], owned: &TopicPartitionList) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, off) in offsets {
        if owned.find_partition(topic, *partition).is_some() {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*off));
        }
    }
    tpl
}

fn commit<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    tpl: &TopicPartitionList,
    mode: CommitMode,
) {
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.commit(tpl, mode) {
        METRICS.kafka_errors.with_label_values(&["commit"]).inc();
        tracing::warn!(error = %e, "offset commit failed (state is durable; lag tooling lags)");
    }
}

pub type CdcConsumer = StreamConsumer<SourceContext>;

pub fn consumer(
    brokers: &str,
    extra: &[(String, String)],
    group_id: &str,
    topic: &str,
    state: Arc<Store>,
    health: Arc<Health>,
) -> Result<CdcConsumer, KafkaError> {
    let mut c = client_config(brokers, &[]);
    c.set("client.id", "paystream-source")
        .set("group.id", group_id)
        // Offsets come from sled; the group's are written only after durable checkpoints.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", STATS_INTERVAL_MS);
    for (k, v) in extra {
        c.set(k, v);
    }
    let consumer: CdcConsumer = c.create_with_context(SourceContext { state, health })?;
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}

/// Settings of the processing loop.
pub struct Pipeline {
    pub state: Arc<Store>,
    pub dead_letters: DeadLetters,
    pub decoder: Decoder,
    pub pending_status: String,
    pub poll_interval: Duration,
    pub clock: Clock,
}

/// What one message did: its effect on state, or that it went to the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    Applied(Applied),
    DeadLettered,
    /// Shutdown came while the dead letter could not be stored: the offset did not move.
    Interrupted,
}

impl Pipeline {
    /// Reads until shutdown. Returns a state error (fatal); Kafka errors are logged, counted and
    /// ridden out (librdkafka reconnects by itself).
    pub async fn run(
        &self,
        consumer: &CdcConsumer,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), StateError> {
        loop {
            let msg = tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                m = consumer.recv() => m,
            };
            match msg {
                Ok(m) => {
                    self.handle(
                        m.topic(),
                        m.partition(),
                        m.offset(),
                        m.key(),
                        m.payload(),
                        &mut shutdown,
                    )
                    .await?;
                }
                Err(e) => {
                    METRICS.kafka_errors.with_label_values(&["consume"]).inc();
                    tracing::warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Applies one message. Public so replay and tests drive the same code as the Kafka path.
    pub async fn handle(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Handled, StateError> {
        let next = offset + 1;
        match self.decoder.for_state(payload).await {
            Ok(ev) => {
                // Only a tombstone needs the key: every other event carries the payment id.
                let key_id = match (&ev.payment, key) {
                    (None, Some(k)) => self.decoder.key(k).await.ok(),
                    _ => None,
                };
                let applied = self.state.apply_event(
                    &ev,
                    key_id.as_deref(),
                    (topic, partition, next),
                    self.clock.now_ms(),
                    self.poll_interval.as_millis() as u64,
                    &self.pending_status,
                )?;
                METRICS
                    .cdc_events
                    .with_label_values(&[ev.op.as_str(), applied.as_str()])
                    .inc();
                let p = ev.payment.as_ref();
                let id = p.map(|p| p.id.as_str()).or(key_id.as_deref()).unwrap_or("");
                // The key and intent as far as this event carries them (a tombstone or a TOASTed
                // column does not).
                let idempotency_key = p.and_then(|p| match &p.idempotency_key {
                    Col::Set(k) => Some(k.as_str()),
                    Col::Unknown => None,
                });
                let intent_id = p.and_then(|p| match &p.stripe_payment_intent_id {
                    Col::Set(i) => i.as_deref(),
                    Col::Unknown => None,
                });
                tracing::debug!(
                    payment_id = id,
                    idempotency_key,
                    intent_id,
                    op = ev.op.as_str(),
                    outcome = applied.as_str(),
                    partition,
                    offset,
                    "cdc event"
                );
                Ok(Handled::Applied(applied))
            }
            Err(err) => {
                let dl = DeadLetter {
                    key,
                    payload,
                    reason: err.kind.as_str(),
                    detail: &err.detail,
                    topic,
                    partition,
                    offset,
                };
                // The offset must not pass this message until the dead letter is safely stored:
                // retry (the broker is at fault) until it is, or until shutdown.
                let mut delay = Duration::from_millis(200);
                loop {
                    match self.dead_letters.send(&dl).await {
                        Ok(()) => break,
                        Err(e) => {
                            if matches!(e, DeadLetterError::Kafka(_)) {
                                METRICS
                                    .kafka_errors
                                    .with_label_values(&["produce_dlq"])
                                    .inc();
                            }
                            tracing::warn!(error = %e, topic, partition, offset, "dead letter not stored yet; retrying");
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = shutdown.changed() => return Ok(Handled::Interrupted),
                            }
                            delay = (delay * 2).min(Duration::from_secs(10));
                        }
                    }
                }
                self.state.advance_offset(topic, partition, next);
                METRICS
                    .cdc_events
                    .with_label_values(&["unknown", "dead_lettered"])
                    .inc();
                METRICS
                    .dlq_messages
                    .with_label_values(&[err.kind.as_str()])
                    .inc();
                tracing::warn!(topic, partition, offset, reason = err.kind.as_str(), error = %err.detail, "undecodable CDC message sent to the dead letters");
                Ok(Handled::DeadLettered)
            }
        }
    }
}

/// One checkpoint followed by the commit of its offsets for the partitions still owned.
pub async fn checkpoint_and_commit(
    state: &Arc<Store>,
    consumer: &CdcConsumer,
    health: &Health,
    clock: &Clock,
) -> Result<(), StateError> {
    let started = tokio::time::Instant::now();
    let st = state.clone();
    let cp = tokio::task::spawn_blocking(move || st.checkpoint())
        .await
        .expect("checkpoint task")?;
    METRICS
        .checkpoint_seconds
        .observe(started.elapsed().as_secs_f64());
    let now = clock.now_ms();
    health.last_checkpoint_ms.store(now, Ordering::Relaxed);
    METRICS.last_checkpoint_timestamp.set(now as f64 / 1000.0);
    for (_, p, o) in &cp.offsets {
        METRICS
            .stored_offset
            .with_label_values(&[&p.to_string()])
            .set(*o);
    }
    if !cp.offsets.is_empty() {
        if let Ok(owned) = consumer.assignment() {
            let tpl = owned_offsets(&cp.offsets, &owned);
            // Drop librdkafka's list before any later use of the consumer (see notes on hangs).
            drop(owned);
            commit(consumer, &tpl, CommitMode::Async);
        }
    }
    Ok(())
}
