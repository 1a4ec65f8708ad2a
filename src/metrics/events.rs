//! What paystream reports, as typed events: each one logs (tracing) and counts (prometheus) in
//! one place, so a log line and its counter cannot drift apart. The model is vector's
//! `src/internal_events/`: the code where something happens builds the event with the facts
//! it has and calls [`emit`]; the event decides the level, the message, the fields and the
//! series.
//!
//! Events carry plain values only (this module is a leaf: it knows no other module). A
//! payment's ids are log fields, never labels (unbounded cardinality).

use std::fmt::Display;

use super::METRICS;

/// Something that happened, reported once.
pub trait InternalEvent {
    fn emit(self);
}

/// Reports `event`: its log line and its counts.
pub fn emit(event: impl InternalEvent) {
    event.emit();
}

/// Which payment an event is about, as far as it is known (a tombstone carries only the id).
#[derive(Debug, Clone, Copy, Default)]
pub struct PaymentRef<'a> {
    pub id: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub intent_id: Option<&'a str>,
}

// ---- Kafka ----------------------------------------------------------------------------------

/// librdkafka reported a client error; it retries by itself (an outage shows in the broker
/// watch).
pub struct KafkaClientError<'a> {
    pub error: &'a dyn Display,
    pub reason: &'a str,
}

impl InternalEvent for KafkaClientError<'_> {
    fn emit(self) {
        METRICS.kafka_errors.with_label_values(&["client"]).inc();
        tracing::warn!(error = %self.error, reason = self.reason, "kafka client error");
    }
}

/// A consumer's `recv` failed; the loop waits briefly and reads on.
pub struct ConsumeFailed<'a> {
    pub error: &'a dyn Display,
}

impl InternalEvent for ConsumeFailed<'_> {
    fn emit(self) {
        METRICS.kafka_errors.with_label_values(&["consume"]).inc();
        tracing::warn!(error = %self.error, "consume error");
    }
}

/// Committing offsets to the group failed. State is durable already: only lag tooling lags.
pub struct OffsetCommitFailed<'a> {
    pub error: &'a dyn Display,
}

impl InternalEvent for OffsetCommitFailed<'_> {
    fn emit(self) {
        METRICS.kafka_errors.with_label_values(&["commit"]).inc();
        tracing::warn!(error = %self.error, "offset commit failed (state is durable; lag tooling lags)");
    }
}

/// A group lease renewal (a generation-checked offset commit) succeeded or failed.
pub struct LeaseRenewal<'a> {
    /// `None`: renewed.
    pub error: Option<&'a dyn Display>,
}

impl InternalEvent for LeaseRenewal<'_> {
    fn emit(self) {
        match self.error {
            None => METRICS.lease_renewals.with_label_values(&["ok"]).inc(),
            Some(error) => {
                METRICS.lease_renewals.with_label_values(&["failed"]).inc();
                tracing::warn!(error = %error, "group lease not renewed (offset commit refused or failed); polls and changelog writes wait for it");
            }
        }
    }
}

/// A periodic checkpoint was not written for a reason a later one may not meet (the
/// changelog's broker, the lease): the changes wait in memory.
pub struct CheckpointDeferred<'a> {
    pub error: &'a dyn Display,
}

impl InternalEvent for CheckpointDeferred<'_> {
    fn emit(self) {
        METRICS.kafka_errors.with_label_values(&["changelog"]).inc();
        tracing::warn!(error = %self.error, "checkpoint not written; retrying");
    }
}

// ---- The pipeline ---------------------------------------------------------------------------

/// A source stopped reading while too many payments had changes not yet checkpointed, until a
/// checkpoint took them: a backlog read faster than the disk writes. Normal during a replay
/// or a catch-up; a debug line, since it can happen many times a second.
pub struct Backpressured {
    pub unwritten: usize,
    pub waited: std::time::Duration,
}

impl InternalEvent for Backpressured {
    fn emit(self) {
        METRICS
            .backpressure_wait_seconds
            .observe(self.waited.as_secs_f64());
        tracing::debug!(
            unwritten = self.unwritten,
            waited_ms = self.waited.as_millis() as u64,
            "source waited for a checkpoint"
        );
    }
}

/// A change event was applied to state.
pub struct CdcEventApplied<'a> {
    pub op: &'a str,
    /// tracked, updated, removed, ignored.
    pub outcome: &'a str,
    pub payment: PaymentRef<'a>,
    pub partition: i32,
    pub offset: i64,
}

impl InternalEvent for CdcEventApplied<'_> {
    fn emit(self) {
        METRICS
            .cdc_events
            .with_label_values(&[self.op, self.outcome])
            .inc();
        tracing::debug!(
            payment_id = self.payment.id,
            idempotency_key = self.payment.idempotency_key,
            intent_id = self.payment.intent_id,
            op = self.op,
            outcome = self.outcome,
            partition = self.partition,
            offset = self.offset,
            "cdc event"
        );
    }
}

/// Where an undecodable message came from and why it is undecodable.
#[derive(Clone, Copy)]
pub struct Undecodable<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub reason: &'a str,
    pub error: &'a str,
}

/// An undecodable message is stored as a dead letter; its position may now pass it.
pub struct DeadLettered<'a>(pub Undecodable<'a>);

impl InternalEvent for DeadLettered<'_> {
    fn emit(self) {
        let m = self.0;
        METRICS
            .cdc_events
            .with_label_values(&["unknown", "dead_lettered"])
            .inc();
        METRICS.dlq_messages.with_label_values(&[m.reason]).inc();
        tracing::warn!(topic = m.topic, partition = m.partition, offset = m.offset, reason = m.reason, error = %m.error, "undecodable CDC message sent to the dead letters");
    }
}

/// A dead letter could not be stored yet; it is retried (the position waits for it).
pub struct DeadLetterRetry<'a> {
    pub message: Undecodable<'a>,
    /// The dead-letter topic (counted as a Kafka error), else the file.
    pub to_kafka: bool,
    pub error: &'a dyn Display,
}

impl InternalEvent for DeadLetterRetry<'_> {
    fn emit(self) {
        if self.to_kafka {
            METRICS
                .kafka_errors
                .with_label_values(&["produce_dlq"])
                .inc();
        }
        let m = self.message;
        tracing::warn!(error = %self.error, topic = m.topic, partition = m.partition, offset = m.offset, "dead letter not stored yet; retrying");
    }
}

// ---- Polls ----------------------------------------------------------------------------------

/// A poll or its answer was withheld: the partition is not owned, or the group lease lapsed.
pub struct PollFenced<'a> {
    pub payment: PaymentRef<'a>,
    pub partition: i32,
    /// `poll`: not asked; `answer`: asked, answer not acted on.
    pub stage: &'static str,
    /// For an answer: whether the partition is still assigned (only the lease lapsed).
    pub still_assigned: bool,
}

impl InternalEvent for PollFenced<'_> {
    fn emit(self) {
        METRICS.polls_fenced.with_label_values(&[self.stage]).inc();
        let (id, partition) = (self.payment.id, self.partition);
        match (self.stage, self.still_assigned) {
            ("poll", _) => {
                tracing::debug!(payment_id = %id, partition, "poll withheld: partition not owned or group lease lapsed")
            }
            (_, false) => {
                tracing::info!(payment_id = %id, partition, "Stripe answer dropped: partition no longer owned")
            }
            (_, true) => {
                tracing::info!(payment_id = %id, partition, "group lease lapsed while Stripe answered: nothing emitted")
            }
        }
    }
}

/// Stripe gave no answer (timeout, 429, 5xx, an unknown id, …): kept pending, asked again
/// after a backoff.
pub struct PollUnanswered<'a> {
    pub payment: PaymentRef<'a>,
    pub outcome: &'a str,
    pub error: &'a dyn Display,
}

impl InternalEvent for PollUnanswered<'_> {
    fn emit(self) {
        METRICS.polls.with_label_values(&[self.outcome]).inc();
        let p = self.payment;
        tracing::warn!(payment_id = %p.id, idempotency_key = p.idempotency_key, intent_id = p.intent_id,
            outcome = self.outcome, error = %self.error, "poll: no answer, kept pending");
    }
}

/// Stripe still calls the payment pending, or declined an attempt (not final: the customer
/// may retry on the same intent).
pub struct PollPending<'a> {
    pub payment: PaymentRef<'a>,
    pub stripe_status: &'a str,
    /// The decline of an attempt first seen now, with the declines counted so far.
    pub new_decline: Option<(&'a str, u32)>,
    /// `declined` when the answer carries a decline (new or not), else `still_pending`.
    pub outcome: &'a str,
}

impl InternalEvent for PollPending<'_> {
    fn emit(self) {
        METRICS.polls.with_label_values(&[self.outcome]).inc();
        let p = self.payment;
        match self.new_decline {
            Some((code, declines)) => {
                METRICS.declines.inc();
                tracing::info!(payment_id = %p.id, idempotency_key = p.idempotency_key, intent_id = p.intent_id,
                    decline_code = %code, declines, stripe_status = self.stripe_status,
                    "poll: attempt declined; still pending (the customer may retry on the same intent)");
            }
            None => {
                tracing::info!(payment_id = %p.id, idempotency_key = p.idempotency_key, intent_id = p.intent_id,
                    stripe_status = self.stripe_status, outcome = self.outcome, "poll: still pending");
            }
        }
    }
}

/// Stripe says `succeeded`, but not with the row's money (or twice): nothing is written, the
/// payment is flagged for a person.
pub struct MoneyMismatch<'a> {
    pub payment: PaymentRef<'a>,
    pub kind: &'a str,
    pub detail: &'a str,
    pub row_amount: &'a str,
    pub row_currency: &'a str,
    pub stripe_amount_received: Option<i64>,
    pub stripe_currency: Option<&'a str>,
    /// `poll` or `feed`: what found it.
    pub via: &'a str,
}

impl InternalEvent for MoneyMismatch<'_> {
    fn emit(self) {
        METRICS.polls.with_label_values(&[self.kind]).inc();
        METRICS.mismatches.with_label_values(&[self.kind]).inc();
        let p = self.payment;
        tracing::warn!(payment_id = %p.id, idempotency_key = p.idempotency_key, intent_id = p.intent_id,
            kind = self.kind, detail = %self.detail, row_amount = %self.row_amount, row_currency = %self.row_currency,
            stripe_amount_received = self.stripe_amount_received, stripe_currency = self.stripe_currency, via = self.via,
            "Stripe says succeeded but the money does not match the row: not written, flagged for a person");
    }
}

/// `--cancel-abandoned-after`: the cancel of an abandoned intent was answered `canceled`, or
/// not (then nothing is written and the payment is asked about again later).
pub struct AbandonedCancel<'a> {
    pub payment: PaymentRef<'a>,
    pub stripe_status: &'a str,
    /// `None`: canceled.
    pub failure: Option<&'a str>,
}

impl InternalEvent for AbandonedCancel<'_> {
    fn emit(self) {
        let p = self.payment;
        match self.failure {
            None => {
                METRICS.abandoned.with_label_values(&["canceled"]).inc();
                METRICS.polls.with_label_values(&["failed"]).inc();
                tracing::info!(payment_id = %p.id, idempotency_key = p.idempotency_key, intent_id = p.intent_id,
                    stripe_status = self.stripe_status, "abandoned intent canceled in Stripe");
            }
            Some(why) => {
                METRICS.abandoned.with_label_values(&["not_canceled"]).inc();
                METRICS.polls.with_label_values(&["cancel_failed"]).inc();
                tracing::warn!(payment_id = %p.id, idempotency_key = p.idempotency_key, intent_id = p.intent_id,
                    stripe_status = self.stripe_status, error = %why, "cancel of an abandoned intent failed: nothing written, kept pending");
            }
        }
    }
}

// ---- Postgres -------------------------------------------------------------------------------

/// The status write-back could not reach Postgres or apply a batch; it retries.
pub struct PostgresWriteFailed<'a> {
    /// `connect` or `apply`.
    pub stage: &'static str,
    pub error: &'a dyn Display,
    pub retry_in: std::time::Duration,
    /// Events in the batch (apply only).
    pub events: usize,
}

impl InternalEvent for PostgresWriteFailed<'_> {
    fn emit(self) {
        METRICS
            .updater_postgres_errors
            .with_label_values(&[self.stage])
            .inc();
        match self.stage {
            "connect" => {
                tracing::warn!(error = %self.error, retry_in = ?self.retry_in, "postgres unavailable")
            }
            _ => {
                tracing::warn!(error = %self.error, events = self.events, retry_in = ?self.retry_in, "batch not applied; retrying")
            }
        }
    }
}

/// A status event was written back to its row (or found it final already, or unknown).
pub struct StatusApplied<'a> {
    pub payment: PaymentRef<'a>,
    pub status: &'a str,
    pub event_id: &'a str,
    /// updated, already_final, unknown_id.
    pub result: &'a str,
}

impl InternalEvent for StatusApplied<'_> {
    fn emit(self) {
        METRICS.updater_rows.with_label_values(&[self.result]).inc();
        let p = self.payment;
        tracing::info!(payment_id = %p.id, idempotency_key = p.idempotency_key, intent_id = p.intent_id,
            status = %self.status, event_id = %self.event_id, result = self.result, "status applied");
    }
}
