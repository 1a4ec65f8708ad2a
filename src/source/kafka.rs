//! The Kafka source: consumes the Debezium topic in a consumer group, feeds every message
//! through the [`Pipeline`], and commits offsets only once they are durable.
//!
//! # Offsets (why this order is safe)
//! 1. A message's state change and its partition's next offset enter the state overlay
//!    together ([`crate::state::Store::apply_event`]); a dead-lettered message's offset only
//!    advances after the dead-letter topic acked it, so nothing is skipped unseen.
//! 2. As soon as there is work (and at least every `--checkpoint-interval`) the overlay and
//!    offsets are written in one atomic sled batch and flushed ([`Pipeline::checkpoint`]).
//! 3. Only then are those offsets committed to the consumer group, and only for partitions this
//!    instance still owns, at most once per `--checkpoint-interval` (and at a clean stop). The
//!    group's offsets are for lag tooling; they never run ahead of durable state.
//! 4. On assignment each partition starts at the offset stored in sled, not the group's; with
//!    none stored it starts at the beginning, rebuilding state from the topic. With
//!    `--changelog` the partition's state (and that offset) is first made current from the
//!    state changelog ([`crate::scaleout`]), so a partition that moved between instances
//!    resumes where its last owner's checkpoint ended.
//!
//! A crash anywhere replays at most the messages since the last checkpoint, and applying a
//! Debezium event twice yields the same state (upsert / remove by id).
//!
//! # Revokes
//! A revoke stops polls of the partitions, waits briefly for polls under way, checkpoints and
//! commits, and only then lets the partitions go. When that checkpoint fails (the group lease
//! lapsed during the rebalance, the changelog's broker is away) the partitions go anyway: the
//! group has given them away already, and holding them would stall it. Their new owner resumes
//! from the last durable checkpoint, so nothing is lost, but it polls again what this instance
//! polled since, and may emit a status event again (the same `event_id`; the updater's
//! forward-only write makes it harmless). The same holds for a final checkpoint that fails at a
//! clean stop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;

use super::{Source, SourceError};
use crate::clock::Clock;
use crate::kafka::{client_config, BrokerWatch, STATS_INTERVAL_MS};
use crate::metrics::events::{emit, ConsumeFailed, LeaseRenewal, OffsetCommitFailed};
use crate::metrics::METRICS;
use crate::pipeline::Pipeline;
use crate::scaleout::changelog::{HandoffError, KafkaChangelog};
use crate::scaleout::{self, Ownership};
use crate::state::{ChangeLog, Checkpoint, Position, StateError, Store};

/// What the Kafka source needs (`--brokers`, `--kafka-option`, `--group-id`, `--cdc-topic`,
/// `--changelog`, `--kafka-startup-timeout`).
pub struct KafkaSettings {
    pub brokers: String,
    pub options: Vec<(String, String)>,
    pub group_id: String,
    pub topic: String,
    /// Scale-out: partitions move between instances with their state (the state changelog).
    pub changelog: bool,
    pub startup_timeout: Duration,
    /// How often checkpoints renew the group lease (`--checkpoint-interval`): checkpoints run as
    /// often as there is work, and a synchronous commit each would load the coordinator.
    pub renew_every: Duration,
}

/// What the consumer's callbacks (statistics, rebalances) work with.
pub struct SourceContext {
    state: Arc<Store>,
    ownership: Arc<Ownership>,
    /// The consumer's view of the brokers (librdkafka statistics), for readiness.
    brokers: BrokerWatch,
    /// At least one CDC partition is assigned, for readiness.
    assigned: AtomicBool,
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
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::kafka::on_client_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        crate::kafka::on_client_error(&error, reason);
    }

    fn stats(&self, stats: rdkafka::Statistics) {
        self.brokers.on_stats(&stats);
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
        self.assigned.store(n > 0, Ordering::Relaxed);
    }

    /// One checkpoint, through the changelog when there is one, for a revoke (inside the
    /// rebalance callback, on this thread). Blocking.
    fn checkpoint(&self) -> Result<Checkpoint, StateError> {
        self.state.checkpoint_logged(
            self.changelog.as_deref().map(|c| c as &dyn ChangeLog),
            |_| {},
        )
    }

    /// The takeover failure that must stop the daemon, if any.
    fn take_failure(&self) -> Option<HandoffError> {
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
                    let offset = match self.state.stored(&Position::kafka(topic, partition)) {
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
                        Ok(cp) => commit(
                            consumer,
                            &owned_offsets(&cp.positions, tpl),
                            CommitMode::Sync,
                        ),
                        // Expected when the group lease lapsed during the rebalance: the
                        // partition goes anyway, its new owner resumes from the last durable
                        // checkpoint (re-polls, may re-emit the same event_id). A warning, not
                        // an error: nothing is lost (docs/scaling-out.md).
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

/// The offsets of `positions` for the partitions in `owned` only: committing for a partition
/// another member now owns would move its position.
fn owned_offsets(positions: &[(Position, i64)], owned: &TopicPartitionList) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (at, off) in positions {
        if let Position::Kafka { topic, partition } = at {
            if owned.find_partition(topic, *partition).is_some() {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*off));
            }
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
        emit(OffsetCommitFailed { error: &e });
    }
}

type CdcConsumer = StreamConsumer<SourceContext>;

/// The consumer and everything its callbacks need.
pub struct KafkaSource {
    consumer: Arc<CdcConsumer>,
    clock: Clock,
    renew_every_ms: u64,
    /// When the lease was last renewed (or tried), ms.
    last_renewal_ms: AtomicU64,
    /// When offsets were last committed to the group, ms.
    last_commit_ms: AtomicU64,
    /// Durable offsets not committed to the group yet (checkpoints between two commits).
    uncommitted: Mutex<HashMap<i32, i64>>,
}

impl KafkaSource {
    /// The ownership of partitions (scale-out's lease with `--changelog`), the state
    /// changelog, and the consumer, subscribed and probed once so a wrong address fails at
    /// start.
    pub fn new(s: KafkaSettings, state: Arc<Store>, clock: Clock) -> Result<Self, SourceError> {
        let ownership = Arc::new(if s.changelog {
            Ownership::leased(clock, scaleout::session_timeout(&s.options))
        } else {
            Ownership::unleased(clock)
        });
        let changelog = if s.changelog {
            let log = KafkaChangelog::new(
                &s.brokers,
                &s.options,
                &s.group_id,
                &s.topic,
                ownership.clone(),
            )?;
            tracing::info!(topic = log.topic(), "scale-out: state changelog on");
            Some(Arc::new(log))
        } else {
            None
        };
        let mut c = client_config(&s.brokers, &[]);
        c.set("client.id", "paystream-source")
            .set("group.id", &s.group_id)
            // A rebalance moves only the partitions that must move; the others keep being read
            // and polled throughout (`--kafka-option` may choose another assignor).
            .set("partition.assignment.strategy", "cooperative-sticky")
            // Offsets come from sled; the group's are written only after durable checkpoints.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", STATS_INTERVAL_MS);
        for (k, v) in &s.options {
            c.set(k, v);
        }
        let consumer: CdcConsumer = c.create_with_context(SourceContext {
            state,
            ownership,
            brokers: BrokerWatch::default(),
            assigned: AtomicBool::new(false),
            changelog,
            cdc_topic: s.topic.clone(),
            takeover_failed: Mutex::new(None),
            changelog_ready: AtomicBool::new(false),
        })?;
        consumer.subscribe(&[&s.topic])?;
        if !crate::kafka::probe_brokers(&consumer, &s.brokers, &s.topic, s.startup_timeout)? {
            tracing::warn!(topic = %s.topic, "the CDC topic does not exist yet (Debezium creates it on its first event); waiting for it");
        }
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            clock,
            renew_every_ms: s.renew_every.as_millis() as u64,
            last_renewal_ms: AtomicU64::new(0),
            last_commit_ms: AtomicU64::new(0),
            uncommitted: Mutex::new(HashMap::new()),
        })
    }

    fn context(&self) -> &SourceContext {
        self.consumer.context()
    }

    /// Renews the group lease: commits each owned partition's durable offset synchronously (0
    /// when none is durable yet: nothing was read from it, and its resume point comes from
    /// state, never from the group).
    async fn renew_lease(&self) {
        let ctx = self.context();
        let mut tpl = TopicPartitionList::new();
        for p in ctx.ownership.acting() {
            let at = Position::kafka(&ctx.cdc_topic, p);
            let off = ctx.state.stored(&at).ok().flatten().unwrap_or(0);
            let _ = tpl.add_partition_offset(&ctx.cdc_topic, p, Offset::Offset(off));
        }
        let sent = self.clock.now_ms();
        let c = self.consumer.clone();
        let r = tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync))
            .await
            .expect("lease task");
        match r {
            Ok(()) => {
                ctx.ownership.renew(sent);
                emit(LeaseRenewal { error: None });
            }
            Err(e) => emit(LeaseRenewal { error: Some(&e) }),
        }
    }

    /// One checkpoint followed by the commit of its offsets for the partitions still owned.
    ///
    /// With a group lease (scale-out), the lease is renewed first, once per `renew_every`: a
    /// synchronous commit of every owned partition's durable offset, which the coordinator
    /// accepts only from a current member of the current generation. A lapsed lease makes the
    /// changelog refuse the checkpoint (retried by the next one), so a zombie writes nothing.
    async fn checkpoint_and_commit(
        &self,
        pipeline: &Pipeline,
        force: bool,
    ) -> Result<(), StateError> {
        let ctx = self.context();
        let now = self.clock.now_ms();
        // Three quarters of the interval: a checkpoint on the interval's own tick always renews
        // (clock truncation can make two ticks 999 ms apart), one triggered by work in between
        // does not. Skipping a tick's renewal would leave the lease to the next, a second later.
        let every = self.renew_every_ms - self.renew_every_ms / 4;
        let due = now.saturating_sub(self.last_renewal_ms.load(Ordering::Relaxed)) >= every;
        if ctx.ownership.is_leased() && ctx.ownership.owns_any() && due {
            self.last_renewal_ms.store(now, Ordering::Relaxed);
            self.renew_lease().await;
        }
        let log = ctx
            .changelog
            .clone()
            .map(|l| l as Arc<dyn ChangeLog + Send + Sync>);
        let cp = pipeline.checkpoint(log).await?;
        // The group's offsets are for lag tooling (the resume point is sled's), so they are
        // committed at most once per interval however often checkpoints run: the durable
        // offsets gather here, and the next due commit carries the newest of each partition.
        let batch: Vec<(Position, i64)> = {
            let mut pending = self.uncommitted.lock().expect("uncommitted lock");
            for (at, off) in &cp.positions {
                if let Some(p) = at.kafka_partition_of(&ctx.cdc_topic) {
                    pending.insert(p, *off);
                }
            }
            let due =
                force || now.saturating_sub(self.last_commit_ms.load(Ordering::Relaxed)) >= every;
            if !due || pending.is_empty() {
                return Ok(());
            }
            self.last_commit_ms.store(now, Ordering::Relaxed);
            pending
                .drain()
                .map(|(p, off)| (Position::kafka(&ctx.cdc_topic, p), off))
                .collect()
        };
        if let Ok(owned) = self.consumer.assignment() {
            let tpl = owned_offsets(&batch, &owned);
            // Drop librdkafka's list before any later use of the consumer (see notes on hangs).
            drop(owned);
            commit(self.consumer.as_ref(), &tpl, CommitMode::Async);
        }
        Ok(())
    }
}

/// The consumer joined its group in [`KafkaSource::new`] (the default [`Source::start`]);
/// partitions arrive with the first rebalance, inside [`Source::run`].
impl Source for KafkaSource {
    /// The recovery check runs beside the start: nothing the consumer does before the first
    /// checkpoint needs it, and nothing is durable or committed before it passed.
    const CHECK_BEFORE_START: bool = false;

    /// Reads until shutdown. Kafka errors are logged, counted and ridden out (librdkafka
    /// reconnects by itself); a state error or a failed takeover stops it.
    async fn run(
        &self,
        pipeline: &Pipeline,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SourceError> {
        let consumer = &self.consumer;
        // Rebalances run inside `recv` (librdkafka serves them from the consumer's queue),
        // between two messages; a failed takeover is picked up here.
        let mut watch_takeover = tokio::time::interval(Duration::from_millis(500));
        // One position per partition, built once: the hot path allocates nothing for it.
        let mut positions: HashMap<i32, Position> = HashMap::new();
        loop {
            let msg = tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                m = consumer.recv() => m,
                _ = watch_takeover.tick() => {
                    if let Some(e) = self.context().take_failure() {
                        return Err(SourceError::Takeover(e));
                    }
                    continue;
                }
            };
            match msg {
                Ok(m) => {
                    let at = positions
                        .entry(m.partition())
                        .or_insert_with(|| Position::kafka(m.topic(), m.partition()));
                    pipeline
                        .handle(at, m.offset(), m.key(), m.payload(), &mut shutdown)
                        .await?;
                }
                Err(e) => {
                    emit(ConsumeFailed { error: &e });
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn checkpoint(&self, pipeline: &Pipeline) -> Result<(), StateError> {
        self.checkpoint_and_commit(pipeline, false).await
    }

    /// A clean stop commits what is durable at once (lag tooling then shows the group where
    /// state is).
    async fn final_checkpoint(&self, pipeline: &Pipeline) -> Result<(), StateError> {
        self.checkpoint_and_commit(pipeline, true).await
    }

    fn ready(&self) -> Result<(), String> {
        if !self.context().brokers.is_up() {
            return Err("no connection to any Kafka broker".into());
        }
        if !self.context().assigned.load(Ordering::Relaxed) {
            return Err("no CDC partition assigned yet".into());
        }
        Ok(())
    }

    fn ownership(&self) -> Arc<Ownership> {
        self.context().ownership.clone()
    }

    fn owns_position(&self, at: &Position) -> bool {
        at.kafka_partition_of(&self.context().cdc_topic).is_some()
    }
}
