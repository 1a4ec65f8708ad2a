//! Prometheus metrics, named the Prometheus way, and [`events`]: what happens is reported as a
//! typed event that logs and counts in one place, so logs and metrics tell the same story.
//! Gauges are set where their value is known. No payment id is ever a label (unbounded
//! cardinality); ids go in log fields.

pub mod events;

use std::sync::LazyLock;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    /// CDC events by op and outcome (tracked, updated, removed, ignored, dead_lettered).
    pub cdc_events: IntCounterVec,
    pub dlq_messages: IntCounterVec,
    pub pending_payments: IntGauge,
    pub awaiting_confirmation: IntGauge,
    /// Pending payments by time since first seen (label `age`, [`crate::state::AGE_BUCKETS`]).
    pub pending_by_age: IntGaugeVec,
    pub oldest_pending_age_seconds: Gauge,
    /// Pending payments whose poll is due now (overdue included).
    pub polls_due: IntGauge,
    /// Polls by outcome ([`POLL_OUTCOMES`]).
    pub polls: IntCounterVec,
    pub stripe_request_seconds: Histogram,
    pub status_events: IntCounterVec,
    pub checkpoint_seconds: Histogram,
    pub last_checkpoint_timestamp: Gauge,
    pub kafka_errors: IntCounterVec,
    pub partitions_assigned: IntGauge,
    pub kafka_brokers_up: IntGauge,
    pub kafka_outages: IntCounter,
    pub producer_rebuilds: IntCounter,
    pub stored_offset: IntGaugeVec,
    pub consumer_lag: IntGaugeVec,
    pub updater_rows: IntCounterVec,
    pub updater_batch_seconds: Histogram,
    pub updater_postgres_errors: IntCounterVec,
    /// Failed schema registry requests (each retry counts).
    pub schema_registry_errors: IntCounter,
    /// Scale-out: records written to the state changelog (entries, tombstones, markers).
    pub changelog_records: IntCounter,
    /// Scale-out: changelog records read by restores.
    pub changelog_restored: IntCounter,
    pub changelog_restore_seconds: Histogram,
    /// Scale-out: partitions taken over, by how (current, adopted, restored).
    pub partition_takeovers: IntCounterVec,
    /// Polls not made and answers not acted on because the partition is not owned or the
    /// group lease lapsed, by stage (poll, answer).
    pub polls_fenced: IntCounterVec,
    /// Group lease renewals (generation-checked offset commits) by result (ok, failed).
    pub lease_renewals: IntCounterVec,
    /// Embedded mode: 1 while the logical replication stream is connected.
    pub replication_connected: IntGauge,
    /// Embedded mode: replication sessions that ended and were opened again.
    pub replication_reconnects: IntCounter,
    /// Embedded mode: WAL bytes between the server's position (its last keepalive) and the
    /// position durable in state: what the slot still holds back for paystream.
    pub replication_lag_bytes: IntGauge,
    /// Embedded mode: pending rows read by initial snapshots.
    pub snapshot_rows: IntCounter,
    /// Waits of a source that stopped reading until a checkpoint took the changes in memory
    /// (`pipeline::MAX_UNWRITTEN`): how many, how long.
    pub backpressure_wait_seconds: Histogram,
    /// How far behind the most overdue due poll is (0 when none is due).
    pub poll_lag_seconds: Gauge,
    /// Events feed: pages listed, by result (ok, or the lookup outcome of a failure).
    pub feed_pages: IntCounterVec,
    /// Events feed: events read.
    pub feed_events: IntCounter,
    /// Events feed: pending payments an event was about, by verdict (resolved, confirm).
    pub feed_matches: IntCounterVec,
    /// The Stripe request rate paystream allows itself now: `--stripe-rps`, halved by 429s and
    /// climbing back (AIMD).
    pub stripe_rate_limit: Gauge,
    /// Declined attempts seen (each attempt once); none resolves a payment.
    pub declines: IntCounter,
    /// Stripe answers `succeeded` that were not written because the money did not match the
    /// row, by kind (amount_mismatch, double_charge).
    pub mismatches: IntCounterVec,
    /// `--cancel-abandoned-after`: cancels of abandoned intents, by result (canceled,
    /// not_canceled).
    pub abandoned: IntCounterVec,
    /// Pending payments first seen at least --stale-after ago.
    pub stale_payments: IntGauge,
    /// Pending payments flagged for a person (amount mismatch, double charge).
    pub flagged_payments: IntGauge,
    /// Pending payments with at least one declined attempt.
    pub declined_payments: IntGauge,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
    r.register(Box::new(c.clone())).expect("register");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("metric");
    r.register(Box::new(h.clone())).expect("register");
    h
}

fn int_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("metric");
    r.register(Box::new(c.clone())).expect("register");
    c
}

fn int_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric");
    r.register(Box::new(g.clone())).expect("register");
    g
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("metric");
    r.register(Box::new(g.clone())).expect("register");
    g
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    let latency = vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    let oldest = Gauge::new(
        "paystream_oldest_pending_age_seconds",
        "Time since the oldest pending payment in state was first seen (0 when none)",
    )
    .expect("metric");
    r.register(Box::new(oldest.clone())).expect("register");
    let last_cp = Gauge::new(
        "paystream_last_checkpoint_timestamp_seconds",
        "Unix time of the last durable checkpoint",
    )
    .expect("metric");
    r.register(Box::new(last_cp.clone())).expect("register");
    let poll_lag = Gauge::new(
        "paystream_poll_lag_seconds",
        "How far behind the most overdue due Stripe poll is (0 when none is due)",
    )
    .expect("metric");
    r.register(Box::new(poll_lag.clone())).expect("register");
    let stripe_rate = Gauge::new(
        "paystream_stripe_rate_limit",
        "Stripe requests per second paystream allows itself now: --stripe-rps, halved on 429 and recovering over a minute",
    )
    .expect("metric");
    r.register(Box::new(stripe_rate.clone())).expect("register");
    Metrics {
        stripe_rate_limit: stripe_rate,
        cdc_events: counter(&r, "paystream_cdc_events_total", "CDC events consumed, by op and outcome", &["op", "outcome"]),
        dlq_messages: counter(&r, "paystream_dlq_messages_total", "Messages sent to the dead-letter topic, by reason", &["reason"]),
        pending_payments: int_gauge(&r, "paystream_pending_payments", "Pending payments in state still polled"),
        awaiting_confirmation: int_gauge(&r, "paystream_awaiting_confirmation_payments", "Payments whose status event was emitted, waiting for the CDC stream to confirm"),
        pending_by_age: int_gauge_vec(&r, "paystream_pending_payments_by_age", "Pending payments in state by time since first seen", &["age"]),
        oldest_pending_age_seconds: oldest,
        polls_due: int_gauge(&r, "paystream_polls_due", "Pending payments whose Stripe poll is due now (overdue included)"),
        polls: counter(&r, "paystream_polls_total", "Stripe polls, by outcome", &["outcome"]),
        stripe_request_seconds: histogram(&r, "paystream_stripe_request_duration_seconds", "Stripe request latency", latency.clone()),
        status_events: counter(&r, "paystream_status_events_total", "Status events produced, by status", &["status"]),
        checkpoint_seconds: histogram(&r, "paystream_checkpoint_duration_seconds", "Time to write and flush a checkpoint", latency.clone()),
        last_checkpoint_timestamp: last_cp,
        kafka_errors: counter(&r, "paystream_kafka_errors_total", "Kafka client errors, by kind", &["kind"]),
        partitions_assigned: int_gauge(&r, "paystream_partitions_assigned", "CDC partitions assigned to this instance"),
        kafka_brokers_up: int_gauge(&r, "paystream_kafka_brokers_up", "Brokers this process has a live connection to (librdkafka statistics)"),
        producer_rebuilds: int_counter(&r, "paystream_kafka_producer_rebuilds_total", "Times the producer was replaced after failed sends in a row"),
        kafka_outages: int_counter(&r, "paystream_kafka_outages_total", "Times every broker connection was lost"),
        stored_offset: int_gauge_vec(&r, "paystream_stored_offset", "Next CDC offset durable in state, by partition", &["partition"]),
        consumer_lag: int_gauge_vec(&r, "paystream_consumer_lag", "Messages between the next offset this instance reads and the partition's end, by partition", &["partition"]),
        updater_rows: counter(&r, "paystream_updater_rows_total", "Status events applied by the updater, by result (updated, already_final, unknown_id, invalid)", &["result"]),
        updater_batch_seconds: histogram(&r, "paystream_updater_batch_duration_seconds", "Time to apply one batch to Postgres", latency),
        updater_postgres_errors: counter(&r, "paystream_updater_postgres_errors_total", "Postgres errors in the updater, by kind", &["kind"]),
        schema_registry_errors: int_counter(&r, "paystream_schema_registry_errors_total", "Failed schema registry requests (connection errors, timeouts, 429, 5xx), each attempt counted"),
        changelog_records: int_counter(&r, "paystream_changelog_records_total", "Records written to the state changelog (entries, tombstones, offset markers)"),
        changelog_restored: int_counter(&r, "paystream_changelog_restored_records_total", "State changelog records read to restore partitions"),
        changelog_restore_seconds: histogram(&r, "paystream_changelog_restore_duration_seconds", "Time to restore one partition from the state changelog", vec![0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]),
        partition_takeovers: counter(&r, "paystream_partition_takeovers_total", "CDC partitions taken over on assignment, by how (current, adopted, restored)", &["how"]),
        polls_fenced: counter(&r, "paystream_polls_fenced_total", "Polls withheld or answers dropped because the partition is not owned or the group lease lapsed, by stage", &["stage"]),
        lease_renewals: counter(&r, "paystream_group_lease_renewals_total", "Group lease renewals (generation-checked offset commits), by result", &["result"]),
        replication_connected: int_gauge(&r, "paystream_replication_connected", "Embedded mode: 1 while the logical replication stream is connected"),
        replication_reconnects: int_counter(&r, "paystream_replication_reconnects_total", "Embedded mode: replication sessions that ended and were opened again"),
        replication_lag_bytes: int_gauge(&r, "paystream_replication_lag_bytes", "Embedded mode: WAL bytes between the server's last reported position and the position durable in state"),
        snapshot_rows: int_counter(&r, "paystream_snapshot_rows_total", "Embedded mode: pending rows read by initial snapshots"),
        backpressure_wait_seconds: histogram(&r, "paystream_backpressure_wait_seconds", "Waits of a source for a checkpoint to take the changes in memory, when too many were unwritten", vec![0.001, 0.01, 0.1, 1.0, 10.0]),
        poll_lag_seconds: poll_lag,
        feed_pages: counter(&r, "paystream_feed_pages_total", "Events feed: pages of Stripe events listed, by result", &["result"]),
        feed_events: int_counter(&r, "paystream_feed_events_total", "Events feed: Stripe events read"),
        feed_matches: counter(&r, "paystream_feed_matches_total", "Events feed: pending payments an event was about, by verdict (resolved: no retrieve; confirm: retrieved now)", &["verdict"]),
        declines: int_counter(&r, "paystream_declines_total", "Declined payment attempts seen, each once; a decline is not final (the customer may retry on the same intent)"),
        mismatches: counter(&r, "paystream_mismatches_total", "Stripe succeeded answers not written because the money does not match the row, by kind (amount_mismatch, double_charge)", &["kind"]),
        abandoned: counter(&r, "paystream_abandoned_cancels_total", "With --cancel-abandoned-after: cancels of abandoned intents in Stripe, by result (canceled: resolved failed/abandoned; not_canceled: nothing written)", &["result"]),
        stale_payments: int_gauge(&r, "paystream_stale_payments", "Pending payments first seen at least --stale-after ago (polled every --stale-poll-interval)"),
        flagged_payments: int_gauge(&r, "paystream_flagged_payments", "Pending payments flagged for a person: Stripe says succeeded but the money does not match the row, or a double charge"),
        declined_payments: int_gauge(&r, "paystream_declined_payments", "Pending payments with at least one declined attempt"),
        registry: r.clone(),
    }
});

/// Every poll outcome label (`LookupError::outcome`, the final statuses, a decline, the flags).
pub const POLL_OUTCOMES: [&str; 15] = [
    "succeeded",
    "failed",
    "still_pending",
    "declined",
    "cancel_failed",
    "amount_mismatch",
    "double_charge",
    "not_found",
    "rate_limited",
    "server_error",
    "timeout",
    "transport_error",
    "parse_error",
    "rejected",
    "search_unavailable",
];

/// Creates the daemon's labelled series at 0, so a dashboard or an `increase()` sees a series
/// before its first event (Prometheus' advice for label values known in advance). Label sets
/// that belong to another module are created by their owner: [`crate::decode::init_series`],
/// [`crate::state::init_series`].
pub fn init_run_series() {
    let m = &*METRICS;
    for o in POLL_OUTCOMES {
        m.polls.with_label_values(&[o]);
    }
    for s in ["succeeded", "failed"] {
        m.status_events.with_label_values(&[s]);
    }
    m.cdc_events
        .with_label_values(&["unknown", "dead_lettered"]);
    for k in [
        "client",
        "consume",
        "commit",
        "produce_status",
        "produce_dlq",
        "changelog",
    ] {
        m.kafka_errors.with_label_values(&[k]);
    }
    for s in ["poll", "answer"] {
        m.polls_fenced.with_label_values(&[s]);
    }
    for v in ["resolved", "confirm"] {
        m.feed_matches.with_label_values(&[v]);
    }
    for k in ["amount_mismatch", "double_charge"] {
        m.mismatches.with_label_values(&[k]);
    }
    for r in ["canceled", "not_canceled"] {
        m.abandoned.with_label_values(&[r]);
    }
    m.feed_pages.with_label_values(&["ok"]);
}

/// The updater's labelled series at 0 (see [`init_run_series`]).
pub fn init_updater_series() {
    let m = &*METRICS;
    for r in ["updated", "already_final", "unknown_id", "invalid"] {
        m.updater_rows.with_label_values(&[r]);
    }
    for k in ["connect", "apply"] {
        m.updater_postgres_errors.with_label_values(&[k]);
    }
    for k in ["client", "consume", "commit"] {
        m.kafka_errors.with_label_values(&[k]);
    }
}

/// The registry in Prometheus text format.
pub fn render() -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&METRICS.registry.gather(), &mut buf)
        .expect("encode metrics");
    String::from_utf8(buf).unwrap_or_default()
}
