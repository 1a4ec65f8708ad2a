//! The state changelog's Kafka side (`<group>-state-changelog`): the writes a checkpoint
//! logs, and the read that restores a partition taken over from another instance. The store
//! calls it through [`ChangeLog`], so every write of a logged partition goes through one place
//! (Kafka Streams' `ChangeLoggingKeyValueBytesStore` is the model); the records' format is
//! [`crate::state::changelog`]'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::Ownership;
use crate::kafka::{client_config, LogContext, ReaderContext};
use crate::metrics::METRICS;
use crate::state::changelog::{
    LogError, OffsetMarker, RestoreError, Restored, OFFSET_KEY, VERSION, VERSION_HEADER,
};
use crate::state::{ChangeLog, LogBatch, Position, StateError, Store};

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

impl HandoffError {
    /// The changelog's broker may come back; a record that cannot be read, or the local disk,
    /// needs the operator.
    pub fn retryable(&self) -> bool {
        match self {
            HandoffError::Kafka { .. } => true,
            HandoffError::Restore(_) => false,
            HandoffError::State(e) => e.retryable(),
        }
    }
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
pub struct KafkaChangelog {
    topic: String,
    cdc_topic: String,
    brokers: String,
    options: Vec<(String, String)>,
    producer: FutureProducer<LogContext>,
    ownership: Arc<Ownership>,
    timeout: Duration,
}

/// The changelog topic of a consumer group.
pub fn topic_name(group_id: &str) -> String {
    format!("{group_id}-state-changelog")
}

impl KafkaChangelog {
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
        Ok(KafkaChangelog {
            topic: topic_name(group_id),
            cdc_topic: cdc_topic.into(),
            brokers: brokers.into(),
            options: options.to_vec(),
            producer: c.create_with_context(LogContext)?,
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
        let admin: AdminClient<LogContext> = client_config(&self.brokers, &self.options)
            .create_with_context(LogContext)
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
            store.replace_partition(&Position::kafka(&self.cdc_topic, partition), &restored)?;
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
        store.replace_partition(
            &Position::kafka(&self.cdc_topic, partition),
            &Restored::default(),
        )?;
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

impl ChangeLog for KafkaChangelog {
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
