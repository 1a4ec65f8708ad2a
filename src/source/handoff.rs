//! Scale-out on Kafka's consumer group: which CDC partitions this instance owns, the group
//! lease that gates every action on them, and the state changelog that hands a partition's
//! state to its next owner (record format: [`crate::state::changelog`]).
//!
//! # Who acts on a partition
//! The group coordinator assigns each CDC partition to one member. An instance polls Stripe,
//! emits status events and writes the changelog for a partition only while
//! [`Ownership::may_act`] says so:
//! - the partition is in its current assignment (added after the takeover below, removed first
//!   thing in a revoke, before the revoke's checkpoint), and
//! - with `--changelog`, its **group lease** is fresh: a generation-checked offset commit
//!   succeeded less than half a `session.timeout.ms` ago. The coordinator rejects commits from
//!   a member of an old generation or one it expelled (`ILLEGAL_GENERATION`,
//!   `UNKNOWN_MEMBER_ID`), and it moves a live member's partitions only after that member
//!   revoked them or missed its session timeout, which a commit renews. So while the lease
//!   holds, no other member has been given the partition.
//!
//! A **zombie** (an instance paused, by GC, SIGSTOP or a stalled VM, past its session timeout,
//! then resumed) wakes with a lapsed lease: its poller neither calls Stripe nor emits, its
//! checkpoints write nothing to the changelog, and its first commit fails, after which
//! librdkafka reports the assignment lost. What is left: an action that passed its lease check
//! before the pause and is carried out after it (a status event already handed to the producer,
//! a changelog batch being written). Closing that needs the broker to fence the producer
//! (transactions); the dev broker shows aborted transactions to `read_committed` readers, so
//! it is not used. Such a late status event carries the same deterministic `event_id` and a
//! final Stripe answer, and the updater only moves `pending` rows: a duplicate, never a wrong
//! write. A late changelog record is an older view of a payment; restoring it can bring back a
//! payment already resolved (polled once more, then dropped when its row's change is seen
//! again), never lose one.
//!
//! # Taking a partition over (on assign)
//! With `--changelog`, before a newly assigned partition is read or polled:
//! - its changelog's end equals the position this store last wrote: local state is current and
//!   is used as it is (a restart, or a partition that came back untouched);
//! - its changelog is empty: this store's entries of the partition (state built before the
//!   changelog existed, or by `replay`) are adopted, logged whole at the next checkpoint;
//! - otherwise another instance wrote last: local entries of the partition are dropped and the
//!   changelog is read from its beginning to its end; the CDC partition resumes at the offset
//!   its last marker names (no full replay of the CDC topic).
//!
//! Local partitions an assignment does not include are evicted then (their changelog holds
//! them), so state on disk follows the partitions.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::clock::Clock;
use crate::kafka::{client_config, ReaderContext};
use crate::metrics::METRICS;
use crate::state::changelog::{
    LogError, OffsetMarker, RestoreError, Restored, OFFSET_KEY, VERSION, VERSION_HEADER,
};
use crate::state::{ChangeLog, LogBatch, StateError, Store};

/// librdkafka's default `session.timeout.ms`, used when `--kafka-option` does not set one.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(45);

/// The session timeout the consumer runs with (`--kafka-option session.timeout.ms=…`).
pub fn session_timeout(kafka_options: &[(String, String)]) -> Duration {
    kafka_options
        .iter()
        .rev()
        .find(|(k, _)| k == "session.timeout.ms")
        .and_then(|(_, v)| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_SESSION_TIMEOUT)
}

/// The CDC partitions this instance owns, and its group lease (see the module doc).
pub struct Ownership {
    /// Partitions polled and emitted for.
    acting: RwLock<HashSet<i32>>,
    /// Partitions whose changes may be logged: `acting`, plus those being revoked until their
    /// last checkpoint is written.
    logging: RwLock<HashSet<i32>>,
    /// Lease length; `None`: no lease (one instance alone, no changelog).
    lease: Option<u64>,
    /// End of the lease (clock ms); 0: none.
    lease_until: AtomicU64,
    /// Owns every partition, assigned or not (`replay`: no group).
    all: bool,
    /// Polls under way per partition (past their ownership check, result not yet recorded):
    /// a revoke waits for them, so their answers are recorded and logged by this owner instead
    /// of the next owner asking Stripe again at once.
    busy: Mutex<HashMap<i32, usize>>,
    clock: Clock,
}

/// A poll under way on an owned partition (see [`Ownership::begin_poll`]).
pub struct PollGuard<'a> {
    ownership: &'a Ownership,
    partition: i32,
}

impl PollGuard<'_> {
    /// Whether the poll's answer may still be recorded and emitted: the partition is not
    /// released (a revoke waits for this poll) and the lease holds.
    pub fn may_finish(&self) -> bool {
        let o = self.ownership;
        o.all || (o.logs(self.partition) && o.lease_holds())
    }
}

impl PollGuard<'_> {
    /// Whether the partition is still this instance's (not released), lease or not.
    pub fn still_assigned(&self) -> bool {
        self.ownership.all || self.ownership.logs(self.partition)
    }
}

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.ownership.busy.lock().expect("ownership");
        if let Some(n) = busy.get_mut(&self.partition) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.partition);
            }
        }
    }
}

impl Ownership {
    /// Owns what it is assigned; no lease (without `--changelog`).
    pub fn unleased(clock: Clock) -> Self {
        Ownership {
            acting: RwLock::default(),
            logging: RwLock::default(),
            lease: None,
            lease_until: AtomicU64::new(0),
            all: false,
            busy: Mutex::default(),
            clock,
        }
    }

    /// Owns every partition (`replay` polls what it read, with no group).
    pub fn all(clock: Clock) -> Self {
        Ownership {
            all: true,
            ..Ownership::unleased(clock)
        }
    }

    /// Owns what it is assigned while its lease, half of `session_timeout`, holds.
    pub fn leased(clock: Clock, session_timeout: Duration) -> Self {
        Ownership {
            lease: Some(session_timeout.as_millis() as u64 / 2),
            ..Ownership::unleased(clock)
        }
    }

    pub fn is_leased(&self) -> bool {
        self.lease.is_some()
    }

    fn lease_holds(&self) -> bool {
        self.lease.is_none() || self.clock.now_ms() < self.lease_until.load(Ordering::Acquire)
    }

    /// Whether this instance may poll, emit and log for `partition` now.
    pub fn may_act(&self, partition: i32) -> bool {
        self.all
            || (self.acting.read().expect("ownership").contains(&partition) && self.lease_holds())
    }

    /// Starts a poll of a payment of `partition` if this instance may act on it.
    pub fn begin_poll(&self, partition: i32) -> Option<PollGuard<'_>> {
        // Counted under the read lock: a `stop_acting` (write lock) that follows sees it.
        let acting = self.acting.read().expect("ownership");
        if !(self.all || (acting.contains(&partition) && self.lease_holds())) {
            return None;
        }
        *self
            .busy
            .lock()
            .expect("ownership")
            .entry(partition)
            .or_default() += 1;
        Some(PollGuard {
            ownership: self,
            partition,
        })
    }

    /// Waits (blocking) until no poll of `partitions` is under way, at most `limit`. Returns
    /// whether they finished; answers arriving later are dropped (`release` came first).
    pub fn wait_idle(&self, partitions: &[i32], limit: Duration) -> bool {
        let end = Instant::now() + limit;
        loop {
            let busy = {
                let b = self.busy.lock().expect("ownership");
                partitions.iter().any(|p| b.contains_key(p))
            };
            if !busy {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether any partition is owned (the poller idles otherwise).
    pub fn owns_any(&self) -> bool {
        self.all || !self.acting.read().expect("ownership").is_empty()
    }

    pub fn acting(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .acting
            .read()
            .expect("ownership")
            .iter()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    /// The lease, renewed by a generation-checked group request sent at `sent_ms` that
    /// succeeded: the coordinator kept the session alive from then on.
    pub fn renew(&self, sent_ms: u64) {
        if let Some(len) = self.lease {
            self.lease_until
                .fetch_max(sent_ms.saturating_add(len), Ordering::AcqRel);
        }
    }

    /// The lease, renewed now (an assignment just came from the coordinator).
    pub fn renew_now(&self) {
        self.renew(self.clock.now_ms());
    }

    /// Takes `partitions` on (after their state is in place).
    pub fn acquire(&self, partitions: &[i32]) {
        self.logging
            .write()
            .expect("ownership")
            .extend(partitions.iter().copied());
        self.acting
            .write()
            .expect("ownership")
            .extend(partitions.iter().copied());
    }

    /// First step of a revoke: no more polls or emissions for `partitions`; their changes may
    /// still be logged by the revoke's checkpoint.
    pub fn stop_acting(&self, partitions: &[i32]) {
        let mut a = self.acting.write().expect("ownership");
        for p in partitions {
            a.remove(p);
        }
    }

    /// Last step of a revoke, or all of a loss: nothing of `partitions` is ours any more.
    pub fn release(&self, partitions: &[i32]) {
        self.stop_acting(partitions);
        let mut l = self.logging.write().expect("ownership");
        for p in partitions {
            l.remove(p);
        }
    }

    fn logs(&self, partition: i32) -> bool {
        self.logging.read().expect("ownership").contains(&partition)
    }
}

/// A takeover that could not be done: the changelog's broker is unreachable (retry helps), or
/// its records cannot be read (someone must look), or local state failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("state changelog {topic}: {source}")]
    Kafka {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// How a partition was taken over (the `how` label of `paystream_partition_takeovers_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// Local state was current.
    Current,
    /// The changelog was empty; local entries adopted.
    Adopted,
    /// Restored from the changelog.
    Restored,
}

impl Takeover {
    pub fn as_str(self) -> &'static str {
        match self {
            Takeover::Current => "current",
            Takeover::Adopted => "adopted",
            Takeover::Restored => "restored",
        }
    }
}

/// The Kafka side of the state changelog: `<group>-state-changelog`.
pub struct Changelog {
    topic: String,
    cdc_topic: String,
    brokers: String,
    options: Vec<(String, String)>,
    producer: FutureProducer,
    ownership: Arc<Ownership>,
    timeout: Duration,
}

/// The changelog topic of a consumer group.
pub fn topic_name(group_id: &str) -> String {
    format!("{group_id}-state-changelog")
}

impl Changelog {
    pub fn new(
        brokers: &str,
        options: &[(String, String)],
        group_id: &str,
        cdc_topic: &str,
        ownership: Arc<Ownership>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        // Idempotent: a retried batch cannot be duplicated or reordered within a partition,
        // so the offset marker always follows the records it covers.
        let c = crate::kafka::idempotent_producer_config(brokers, options, "paystream-changelog");
        Ok(Changelog {
            topic: topic_name(group_id),
            cdc_topic: cdc_topic.into(),
            brokers: brokers.into(),
            options: options.to_vec(),
            producer: c.create()?,
            ownership,
            timeout: Duration::from_secs(30),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn kafka(&self, source: rdkafka::error::KafkaError) -> HandoffError {
        HandoffError::Kafka {
            topic: self.topic.clone(),
            source,
        }
    }

    /// Creates the changelog topic if it is missing: compacted, as many partitions as the CDC
    /// topic. Blocking.
    pub fn ensure_topic(&self, partitions: i32) -> Result<(), HandoffError> {
        // Asked through a consumer: a producer's metadata request would create the topic
        // with the broker's default partition count.
        let md = self
            .reader()?
            .fetch_metadata(Some(&self.topic), self.timeout)
            .map_err(|e| self.kafka(e))?;
        let have = md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32);
        match have {
            Some(n) if n >= partitions => return Ok(()),
            Some(n) => {
                // A partition with no changelog partition could not be handed over.
                return Err(self.kafka(rdkafka::error::KafkaError::AdminOpCreation(format!(
                    "has {n} partitions but the CDC topic has {partitions}: add partitions to the changelog first"
                ))));
            }
            None => {}
        }
        let admin: AdminClient<DefaultClientContext> = client_config(&self.brokers, &self.options)
            .create()
            .map_err(|e| self.kafka(e))?;
        let topic = NewTopic::new(&self.topic, partitions, TopicReplication::Fixed(-1))
            .set("cleanup.policy", "compact");
        let r = futures::executor::block_on(admin.create_topics(
            [&topic],
            &AdminOptions::new().operation_timeout(Some(self.timeout)),
        ))
        .map_err(|e| self.kafka(e))?;
        for res in r {
            match res {
                Ok(_) => {
                    tracing::info!(topic = %self.topic, partitions, "state changelog topic created")
                }
                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(self.kafka(rdkafka::error::KafkaError::AdminOp(code)))
                        .inspect_err(|e| tracing::error!(topic = %t, error = %e, "cannot create the state changelog"));
                }
            }
        }
        Ok(())
    }

    /// Makes `partition`'s state in `store` current before this instance acts on it (see the
    /// module doc). Blocking (broker round trips, a read of the partition's changelog).
    pub fn take_over(&self, store: &Store, partition: i32) -> Result<Takeover, HandoffError> {
        let started = Instant::now();
        let reader = self.reader()?;
        let (_, high) = reader
            .fetch_watermarks(&self.topic, partition, self.timeout)
            .map_err(|e| self.kafka(e))?;
        let local = store.log_position(partition)?;
        let how = if local == Some(high) {
            Takeover::Current
        } else if high == 0 {
            let n = store.adopt_partition(partition)?;
            tracing::info!(
                partition,
                entries = n,
                "empty state changelog: local entries adopted"
            );
            Takeover::Adopted
        } else {
            let (restored, first_ms) = self.restore(&reader, partition, high)?;
            store.replace_partition(&self.cdc_topic, partition, &restored)?;
            let secs = started.elapsed().as_secs_f64();
            METRICS.changelog_restored.inc_by(restored.records);
            METRICS.changelog_restore_seconds.observe(secs);
            tracing::info!(
                partition,
                records = restored.records,
                entries = restored.entries.len(),
                cdc_next_offset = restored.next_offset,
                local_position = local,
                changelog_end = high,
                restore_ms = (secs * 1000.0) as u64,
                first_record_ms = first_ms,
                records_per_s = (restored.records as f64 / secs.max(1e-6)) as u64,
                "partition state restored from the changelog"
            );
            Takeover::Restored
        };
        // Don't wait for the reader's teardown here: librdkafka may block in it.
        std::thread::spawn(move || drop(reader));
        METRICS
            .partition_takeovers
            .with_label_values(&[how.as_str()])
            .inc();
        Ok(how)
    }

    /// Drops a partition this instance does not own from local state (its changelog has it).
    pub fn evict(&self, store: &Store, partition: i32) -> Result<(), HandoffError> {
        store.replace_partition(&self.cdc_topic, partition, &Restored::default())?;
        tracing::info!(partition, "state of a partition owned elsewhere evicted");
        Ok(())
    }

    fn reader(&self) -> Result<BaseConsumer<ReaderContext>, HandoffError> {
        let mut c = client_config(&self.brokers, &[]);
        // No group: it reads by assignment and commits nothing.
        c.set("client.id", "paystream-changelog-restore")
            .set("group.id", format!("{}-restore", self.topic))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            // A restore reads a backlog as fast as it can: do not wait for fuller fetches.
            .set("fetch.wait.max.ms", "10");
        for (k, v) in self.options.iter().filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "session.timeout.ms"
                    | "heartbeat.interval.ms"
                    | "max.poll.interval.ms"
                    | "partition.assignment.strategy"
                    | "group.instance.id"
            )
        }) {
            c.set(k, v);
        }
        c.create_with_context(ReaderContext)
            .map_err(|e| self.kafka(e))
    }

    /// Reads `partition` of the changelog from its beginning up to `high`. Also returns how
    /// long the first record took to arrive (the broker's share, logged beside the total).
    fn restore(
        &self,
        reader: &BaseConsumer<ReaderContext>,
        partition: i32,
        high: i64,
    ) -> Result<(Restored, Option<u64>), HandoffError> {
        let started = Instant::now();
        let mut first_ms = None;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Beginning)
            .map_err(|e| self.kafka(e))?;
        reader.assign(&tpl).map_err(|e| self.kafka(e))?;
        let mut out = Restored {
            log_position: Some(high),
            ..Restored::default()
        };
        let deadline = Instant::now() + self.timeout.max(Duration::from_secs(300));
        // Compaction may have removed the last offsets: the end is where the next offset
        // reaches `high`, or the reader reports the partition's end.
        let mut next = 0i64;
        while next < high {
            if Instant::now() > deadline {
                return Err(self.kafka(rdkafka::error::KafkaError::MessageConsumption(
                    rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                )));
            }
            match reader.poll(Duration::from_millis(500)) {
                None => {}
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                    if let Ok(pos) = reader.position() {
                        if let Some(rdkafka::Offset::Offset(o)) = pos
                            .find_partition(&self.topic, partition)
                            .map(|e| e.offset())
                        {
                            next = next.max(o);
                        }
                    }
                    if next >= high {
                        break;
                    }
                }
                Some(Err(e)) => return Err(self.kafka(e)),
                Some(Ok(m)) => {
                    first_ms.get_or_insert(started.elapsed().as_millis() as u64);
                    if m.offset() >= high {
                        break;
                    }
                    next = m.offset() + 1;
                    let version = m.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == VERSION_HEADER)
                            .and_then(|h| h.value)
                    });
                    out.apply(m.key(), m.payload(), version)
                        .map_err(|detail| RestoreError {
                            topic: self.topic.clone(),
                            partition,
                            offset: m.offset(),
                            detail,
                        })?;
                }
            }
        }
        Ok((out, first_ms))
    }
}

fn record<'a>(topic: &'a str, partition: i32, key: &'a [u8]) -> FutureRecord<'a, [u8], [u8]> {
    FutureRecord::to(topic)
        .partition(partition)
        .key(key)
        .headers(OwnedHeaders::new().insert(Header {
            key: VERSION_HEADER,
            value: Some(VERSION),
        }))
}

impl ChangeLog for Changelog {
    fn cdc_topic(&self) -> &str {
        &self.cdc_topic
    }

    fn logs(&self, partition: i32) -> bool {
        self.ownership.logs(partition)
    }

    fn write(&self, batch: &LogBatch<'_>) -> Result<Vec<(i32, i64)>, LogError> {
        let err = |detail: String| LogError {
            topic: self.topic.clone(),
            detail,
        };
        if batch.records.is_empty() && batch.offsets.is_empty() {
            return Ok(Vec::new());
        }
        // A lapsed lease may mean another member owns these partitions now: write nothing
        // (the checkpoint keeps its changes and retries once the lease is renewed).
        if !self.ownership.lease_holds() {
            return Err(err(
                "group lease lapsed (no successful offset commit lately); not writing".into(),
            ));
        }
        let markers: Vec<(i32, Vec<u8>)> = batch
            .offsets
            .iter()
            .map(|(p, o)| {
                let m = OffsetMarker {
                    topic: self.cdc_topic.clone(),
                    partition: *p,
                    next_offset: *o,
                };
                (*p, serde_json::to_vec(&m).expect("marker serializes"))
            })
            .collect();
        let mut pending = std::collections::VecDeque::new();
        let mut positions: std::collections::BTreeMap<i32, i64> = Default::default();
        let wait_one =
            |pending: &mut std::collections::VecDeque<rdkafka::producer::DeliveryFuture>,
             positions: &mut std::collections::BTreeMap<i32, i64>|
             -> Result<(), LogError> {
                let Some(f) = pending.pop_front() else {
                    return Ok(());
                };
                match futures::executor::block_on(f) {
                    Ok(Ok(d)) => {
                        let e = positions.entry(d.partition).or_insert(0);
                        *e = (*e).max(d.offset + 1);
                        Ok(())
                    }
                    Ok(Err((e, _))) => Err(err(format!("record not delivered: {e}"))),
                    Err(_) => Err(err("producer went away".into())),
                }
            };
        let records = batch
            .records
            .iter()
            .map(|(p, id, v)| (*p, id.as_bytes(), *v))
            .chain(
                markers
                    .iter()
                    .map(|(p, m)| (*p, OFFSET_KEY, Some(m.as_slice()))),
            );
        for (p, key, value) in records {
            let mut rec = record(&self.topic, p, key);
            if let Some(v) = value {
                rec = rec.payload(v);
            }
            loop {
                match self.producer.send_result(rec) {
                    Ok(f) => {
                        pending.push_back(f);
                        break;
                    }
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        back,
                    )) => {
                        // The local queue is full: wait for the oldest record, then retry.
                        rec = back;
                        if pending.is_empty() {
                            self.producer.poll(Duration::from_millis(10));
                        }
                        wait_one(&mut pending, &mut positions)?;
                    }
                    Err((e, _)) => return Err(err(format!("record not queued: {e}"))),
                }
            }
        }
        while !pending.is_empty() {
            wait_one(&mut pending, &mut positions)?;
        }
        METRICS
            .changelog_records
            .inc_by(batch.records.len() as u64 + markers.len() as u64);
        Ok(positions.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn nothing_is_acted_on_once_the_lease_lapses() {
        let clock = Clock::new();
        let own = Ownership::leased(clock, Duration::from_secs(6));
        own.acquire(&[0, 1]);
        // Assigned, but no lease yet.
        assert!(!own.may_act(0));
        own.renew_now();
        assert!(own.may_act(0) && own.may_act(1) && !own.may_act(2));
        let guard = own.begin_poll(0).expect("owned and leased");
        // Half the session later, with no renewal: a paused (zombie) instance wakes here.
        tokio::time::advance(Duration::from_millis(3_001)).await;
        assert!(!own.may_act(0));
        assert!(own.begin_poll(1).is_none());
        assert!(
            !guard.may_finish(),
            "an answer that arrives now is not acted on"
        );
        assert!(guard.still_assigned(), "but the partition was not released");
        own.renew(clock.now_ms());
        assert!(own.may_act(0) && guard.may_finish());
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoke_waits_for_polls_under_way_and_lets_them_finish() {
        let own = Ownership::unleased(Clock::new());
        own.acquire(&[3]);
        let guard = own.begin_poll(3).unwrap();
        own.stop_acting(&[3]);
        assert!(
            own.begin_poll(3).is_none(),
            "no new poll once the revoke began"
        );
        assert!(
            guard.may_finish(),
            "the poll under way still records its answer"
        );
        assert!(!own.wait_idle(&[3], Duration::from_millis(30)));
        drop(guard);
        assert!(own.wait_idle(&[3], Duration::from_millis(30)));
        own.release(&[3]);
        assert!(!own.may_act(3));
        let late = PollGuard {
            ownership: &own,
            partition: 3,
        };
        assert!(!late.may_finish() && !late.still_assigned());
    }
}
