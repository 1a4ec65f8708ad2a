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
//!    none stored it starts at the beginning, rebuilding state from the topic. With
//!    `--changelog` the partition's state (and that offset) is first made current from the
//!    state changelog ([`crate::scaleout`]), so a partition that moved between instances resumes where
//!    its last owner's checkpoint ended.
//!
//! A crash anywhere replays at most the messages since the last checkpoint, and applying a
//! Debezium event twice yields the same state (upsert / remove by id).

pub mod postgres;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::change::{ChangeEvent, Col};
use crate::clock::Clock;
use crate::decode::Decoder;
use crate::kafka::{client_config, BrokerWatch, STATS_INTERVAL_MS};
use crate::metrics::METRICS;
use crate::scaleout::changelog::{HandoffError, KafkaChangelog};
use crate::scaleout::Ownership;
use crate::sink::{DeadLetter, DeadLetterError, DeadLetters};
use crate::state::{Applied, ChangeLog, Checkpoint, StateError, Store};

/// Liveness facts the admin endpoints report.
#[derive(Default)]
pub struct Health {
    pub last_checkpoint_ms: AtomicU64,
    pub assigned: AtomicBool,
    /// The state store passed its recovery check (run beside the start).
    pub checked: AtomicBool,
    /// The consumer's view of the brokers (librdkafka statistics).
    pub kafka: BrokerWatch,
    /// Embedded mode: the replication stream is connected.
    pub replication: AtomicBool,
}

pub struct SourceContext {
    state: Arc<Store>,
    health: Arc<Health>,
    ownership: Arc<Ownership>,
    /// Scale-out's state changelog (`--changelog`).
    changelog: Option<Arc<KafkaChangelog>>,
    cdc_topic: String,
    /// A partition whose state could not be taken over: the daemon stops on it (the group
    /// then gives the partition to another member, or to this one after its restart).
    takeover_failed: Mutex<Option<HandoffError>>,
    /// The changelog topic was checked or created (once per process).
    changelog_ready: AtomicBool,
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

/// How long a revoke waits for polls of the revoked partitions under way.
const POLL_DRAIN: Duration = Duration::from_secs(5);

/// Attempts at taking one partition over before the daemon gives up on it and stops.
const TAKEOVER_ATTEMPTS: u32 = 5;

impl SourceContext {
    /// Publishes how many partitions this instance now owns (metric and readiness).
    fn record_assignment(&self, consumer: &BaseConsumer<Self>) {
        let n = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        METRICS.partitions_assigned.set(n as i64);
        self.health.assigned.store(n > 0, Ordering::Relaxed);
    }

    /// One checkpoint, through the changelog when there is one. Blocking.
    pub fn checkpoint(&self) -> Result<Checkpoint, StateError> {
        self.state.checkpoint_logged(
            self.changelog.as_deref().map(|c| c as &dyn ChangeLog),
            || {},
        )
    }

    pub fn ownership(&self) -> &Arc<Ownership> {
        &self.ownership
    }

    /// The takeover failure that must stop the daemon, if any.
    pub fn take_failure(&self) -> Option<HandoffError> {
        self.takeover_failed.lock().expect("takeover lock").take()
    }

    /// Makes the state of newly assigned `parts` current (scale-out) and drops local
    /// partitions the assignment does not include. Returns the partitions taken over.
    fn take_over(&self, consumer: &BaseConsumer<Self>, parts: &[i32]) -> Vec<i32> {
        let Some(log) = &self.changelog else {
            return parts.to_vec();
        };
        // The assignment just came from the coordinator: this member is current.
        self.ownership.renew_now();
        if !self.changelog_ready.load(Ordering::Relaxed) {
            let n = consumer
                .fetch_metadata(Some(&self.cdc_topic), Duration::from_secs(30))
                .ok()
                .and_then(|md| {
                    md.topics()
                        .iter()
                        .find(|t| t.name() == self.cdc_topic)
                        .map(|t| t.partitions().len() as i32)
                })
                .unwrap_or(0)
                .max(parts.iter().max().map_or(0, |m| m + 1));
            match log.ensure_topic(n) {
                Ok(()) => self.changelog_ready.store(true, Ordering::Relaxed),
                Err(e) => {
                    tracing::error!(error = %e, "state changelog topic not ready");
                    *self.takeover_failed.lock().expect("takeover lock") = Some(e);
                    return Vec::new();
                }
            }
        }
        let mut taken = Vec::new();
        for &p in parts {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match log.take_over(&self.state, p) {
                    Ok(how) => {
                        tracing::info!(partition = p, how = how.as_str(), "partition taken over");
                        taken.push(p);
                        break;
                    }
                    Err(e) if attempt < TAKEOVER_ATTEMPTS => {
                        tracing::warn!(partition = p, attempt, error = %e, "partition takeover failed; retrying");
                        std::thread::sleep(Duration::from_secs(2));
                    }
                    Err(e) => {
                        tracing::error!(partition = p, error = %e, "partition takeover failed; stopping");
                        *self.takeover_failed.lock().expect("takeover lock") = Some(e);
                        return taken;
                    }
                }
            }
        }
        // Local partitions nobody assigned to us: their changelog has them, their owner acts.
        // Only those this store logged: state it never logged (from before `--changelog`) is
        // nowhere else, so it stays until the partition comes back (adopted if its changelog is
        // still empty then, replaced by it otherwise).
        let keep: std::collections::HashSet<i32> = self
            .ownership
            .acting()
            .into_iter()
            .chain(parts.iter().copied())
            .collect();
        match self.state.local_partitions(&self.cdc_topic) {
            Ok(local) => {
                let logged = |p: &i32| matches!(self.state.log_position(*p), Ok(Some(_)));
                for p in local.into_iter().filter(|p| !keep.contains(p) && logged(p)) {
                    if let Err(e) = log.evict(&self.state, p) {
                        tracing::warn!(partition = p, error = %e, "evicting a partition owned elsewhere failed");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list local partitions"),
        }
        taken
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        // librdkafka serves rebalances inside `recv`, on a runtime worker, and this one blocks
        // (checkpoint, commits, restores, waiting for polls under way): hand the worker's other
        // tasks (those polls among them) to another worker meanwhile.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(|| self.on_rebalance(consumer, err, tpl))
        } else {
            self.on_rebalance(consumer, err, tpl)
        }
    }
}

impl SourceContext {
    fn on_rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            rdkafka::consumer::RebalanceProtocol::Cooperative
        );
        let cdc: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.cdc_topic)
            .map(|e| e.partition())
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // State first: nothing of a partition is read or polled before it is current.
                let taken = self.take_over(consumer, &cdc);
                let mut assign = TopicPartitionList::new();
                for e in tpl.elements() {
                    let (topic, partition) = (e.topic(), e.partition());
                    if topic == self.cdc_topic && !taken.contains(&partition) {
                        continue;
                    }
                    // Resume where durable state ends, not where the group's commit says.
                    let offset = match self.state.stored_offset(topic, partition) {
                        Ok(Some(o)) => Offset::Offset(o),
                        Ok(None) => Offset::Beginning,
                        Err(e) => {
                            // Cannot read our own offsets: refuse to guess. The daemon's
                            // checkpoint will hit the same store error and stop.
                            tracing::error!(error = %e, topic, partition, "cannot read stored offset");
                            Offset::Beginning
                        }
                    };
                    let _ = assign.add_partition_offset(topic, partition, offset);
                    tracing::info!(topic, partition, offset = ?offset, "partition assigned");
                }
                self.ownership.acquire(&taken);
                let r = if cooperative {
                    consumer.incremental_assign(&assign)
                } else {
                    consumer.assign(&assign)
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "assign failed");
                }
                self.record_assignment(consumer);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if consumer.assignment_lost() {
                    // The coordinator gave them away already (missed session): another member
                    // may own them now, so nothing more is done or written for them here.
                    self.ownership.release(&cdc);
                    tracing::warn!(partitions = ?cdc, "partitions lost (session expired); released without a checkpoint");
                } else {
                    // No more polls for them; then everything read from them becomes durable
                    // (and logged) before another member may take them.
                    self.ownership.stop_acting(&cdc);
                    // Polls under way finish first (bounded: a Stripe call has its timeout), so
                    // their answers are logged here and the next owner does not ask again.
                    if !self.ownership.wait_idle(&cdc, POLL_DRAIN) {
                        tracing::warn!(partitions = ?cdc, "polls still under way at revoke; their answers are dropped");
                    }
                    match self.checkpoint() {
                        Ok(cp) => {
                            commit(consumer, &owned_offsets(&cp.offsets, tpl), CommitMode::Sync)
                        }
                        // Expected when the group lease lapsed during the rebalance: the
                        // partition goes anyway, its new owner resumes from the last durable
                        // checkpoint (re-polls, may re-emit the same event_id). A warning, not
                        // an error: nothing is lost (README, Scaling out).
                        Err(e) => {
                            tracing::warn!(error = %e, "checkpoint on revoke failed; the next owner resumes from the last durable checkpoint")
                        }
                    }
                    self.ownership.release(&cdc);
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

/// What the CDC consumer works with besides its Kafka settings.
pub struct ConsumerParts {
    pub state: Arc<Store>,
    pub health: Arc<Health>,
    pub ownership: Arc<Ownership>,
    pub changelog: Option<Arc<KafkaChangelog>>,
}

pub fn consumer(
    brokers: &str,
    extra: &[(String, String)],
    group_id: &str,
    topic: &str,
    parts: ConsumerParts,
) -> Result<CdcConsumer, KafkaError> {
    let mut c = client_config(brokers, &[]);
    c.set("client.id", "paystream-source")
        .set("group.id", group_id)
        // A rebalance moves only the partitions that must move; the others keep being read
        // and polled throughout (`--kafka-option` may choose another assignor).
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Offsets come from sled; the group's are written only after durable checkpoints.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", STATS_INTERVAL_MS);
    for (k, v) in extra {
        c.set(k, v);
    }
    let consumer: CdcConsumer = c.create_with_context(SourceContext {
        state: parts.state,
        health: parts.health,
        ownership: parts.ownership,
        changelog: parts.changelog,
        cdc_topic: topic.into(),
        takeover_failed: Mutex::new(None),
        changelog_ready: AtomicBool::new(false),
    })?;
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
        // Rebalances run inside `recv` (librdkafka serves them from the consumer's queue),
        // between two messages; a failed takeover is picked up here.
        let mut watch_takeover = tokio::time::interval(Duration::from_millis(500));
        loop {
            let msg = tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                m = consumer.recv() => m,
                _ = watch_takeover.tick() => {
                    if let Some(e) = consumer.context().take_failure() {
                        return Err(StateError::Takeover(e.to_string()));
                    }
                    continue;
                }
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
                let applied =
                    self.apply(&ev, key_id.as_deref(), (topic, partition, next), offset)?;
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
                if !self.dead_letter(&dl, shutdown).await {
                    return Ok(Handled::Interrupted);
                }
                self.state.advance_offset(topic, partition, next);
                Ok(Handled::DeadLettered)
            }
        }
    }

    /// Applies one decoded change event to state with the source position it leaves behind
    /// (`(topic, partition, next)`: what a restart resumes from), counts and logs it. Every
    /// source comes through here: the Kafka topic, replayed files, Postgres replication.
    pub fn apply(
        &self,
        ev: &ChangeEvent,
        key_id: Option<&str>,
        position: (&str, i32, i64),
        offset: i64,
    ) -> Result<Applied, StateError> {
        let applied = self.state.apply_event(
            ev,
            key_id,
            position,
            self.clock.now_ms(),
            self.poll_interval.as_millis() as u64,
            &self.pending_status,
        )?;
        METRICS
            .cdc_events
            .with_label_values(&[ev.op.as_str(), applied.as_str()])
            .inc();
        let p = ev.payment.as_ref();
        let id = p.map(|p| p.id.as_str()).or(key_id).unwrap_or("");
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
            partition = position.1,
            offset,
            "cdc event"
        );
        Ok(applied)
    }

    /// Stores an undecodable message as a dead letter, retrying (the broker or the disk is at
    /// fault) until it is stored, then counts and logs it. Returns false if shutdown came
    /// first: the caller must then not move its position past the message.
    pub async fn dead_letter(
        &self,
        dl: &DeadLetter<'_>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.dead_letters.send(dl).await {
                Ok(()) => break,
                Err(e) => {
                    if matches!(e, DeadLetterError::Kafka(_)) {
                        METRICS
                            .kafka_errors
                            .with_label_values(&["produce_dlq"])
                            .inc();
                    }
                    tracing::warn!(error = %e, topic = dl.topic, partition = dl.partition, offset = dl.offset, "dead letter not stored yet; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return false,
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        METRICS
            .cdc_events
            .with_label_values(&["unknown", "dead_lettered"])
            .inc();
        METRICS.dlq_messages.with_label_values(&[dl.reason]).inc();
        tracing::warn!(topic = dl.topic, partition = dl.partition, offset = dl.offset, reason = dl.reason, error = %dl.detail, "undecodable CDC message sent to the dead letters");
        true
    }
}

/// Publishes a durable checkpoint: its time (readiness, metric), its duration and the
/// positions it stored. Shared by every source's checkpoint.
pub(crate) fn record_checkpoint(
    cp: &Checkpoint,
    started: tokio::time::Instant,
    health: &Health,
    clock: &Clock,
) {
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
}

/// One checkpoint followed by the commit of its offsets for the partitions still owned.
///
/// With a group lease (scale-out), the lease is renewed first: a synchronous commit of every
/// owned partition's durable offset, which the coordinator accepts only from a current member
/// of the current generation. A lapsed lease makes the changelog refuse the checkpoint
/// (retried on the next tick), so a zombie writes nothing.
pub async fn checkpoint_and_commit(
    state: &Arc<Store>,
    consumer: &Arc<CdcConsumer>,
    health: &Health,
    clock: &Clock,
) -> Result<(), StateError> {
    let ownership = consumer.context().ownership().clone();
    if ownership.is_leased() && ownership.owns_any() {
        renew_lease(state, consumer, &ownership, clock).await;
    }
    let started = tokio::time::Instant::now();
    let c = consumer.clone();
    let cp = tokio::task::spawn_blocking(move || c.context().checkpoint())
        .await
        .expect("checkpoint task")?;
    record_checkpoint(&cp, started, health, clock);
    if !cp.offsets.is_empty() {
        if let Ok(owned) = consumer.assignment() {
            let tpl = owned_offsets(&cp.offsets, &owned);
            // Drop librdkafka's list before any later use of the consumer (see notes on hangs).
            drop(owned);
            commit(consumer.as_ref(), &tpl, CommitMode::Async);
        }
    }
    Ok(())
}

/// Renews the group lease: commits each owned partition's durable offset synchronously (0
/// when none is durable yet: nothing was read from it, and its resume point comes from state,
/// never from the group).
async fn renew_lease(
    state: &Arc<Store>,
    consumer: &Arc<CdcConsumer>,
    ownership: &Ownership,
    clock: &Clock,
) {
    let topic = consumer.context().cdc_topic.clone();
    let mut tpl = TopicPartitionList::new();
    for p in ownership.acting() {
        let off = state.stored_offset(&topic, p).ok().flatten().unwrap_or(0);
        let _ = tpl.add_partition_offset(&topic, p, Offset::Offset(off));
    }
    let sent = clock.now_ms();
    let c = consumer.clone();
    let r = tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync))
        .await
        .expect("lease task");
    match r {
        Ok(()) => {
            ownership.renew(sent);
            METRICS.lease_renewals.with_label_values(&["ok"]).inc();
        }
        Err(e) => {
            METRICS.lease_renewals.with_label_values(&["failed"]).inc();
            tracing::warn!(error = %e, "group lease not renewed (offset commit refused or failed); polls and changelog writes wait for it");
        }
    }
}
