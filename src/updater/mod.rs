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

use crate::config::{ColumnArgs, UpdaterConfig};
use crate::kafka::{client_config, BrokerWatch, STATS_INTERVAL_MS};
use crate::metrics::METRICS;
use crate::pg::quote_ident;
use crate::sink::{decode_status, StatusDecodeError, StatusEvent};

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
    #[error("payments table check failed: {0}")]
    Schema(String),
}

/// What one status event did to its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowResult {
    Updated,
    AlreadyFinal,
    UnknownId,
}

impl RowResult {
    fn as_str(self) -> &'static str {
        match self {
            RowResult::Updated => "updated",
            RowResult::AlreadyFinal => "already_final",
            RowResult::UnknownId => "unknown_id",
        }
    }
}

/// The updater's consumer reports broker state to readiness and errors to the metrics.
struct UpdaterContext {
    kafka: Arc<BrokerWatch>,
}

impl rdkafka::ClientContext for UpdaterContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::kafka::on_client_error(&error, reason);
    }

    fn stats(&self, stats: rdkafka::Statistics) {
        self.kafka.on_stats(&stats);
    }
}

impl rdkafka::consumer::ConsumerContext for UpdaterContext {}

struct Sql {
    apply: String,
}

async fn build_sql(
    client: &tokio_postgres::Client,
    table: &str,
    c: &ColumnArgs,
) -> Result<Sql, UpdaterError> {
    // The id and status are compared in their own types (cast from the text we carry), so the
    // primary key index serves the lookup whether the key is bigint, uuid or text, and a status
    // column of an enum type works as well as text.
    let column_type = |column: &str| {
        let column = column.to_string();
        async move {
            let row = client
                .query_opt(
                    "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
                    &[&table, &column],
                )
                .await
                .map_err(|e| UpdaterError::Schema(e.to_string()))?
                .ok_or_else(|| UpdaterError::Schema(format!("table {:?} has no column {column:?} (--table / --column-*)", table)))?;
            Ok::<String, UpdaterError>(row.get(0))
        }
    };
    let id_type = column_type(&c.column_id).await?;
    let status_type = column_type(&c.column_status).await?;
    // A table without the intent column (the updater needs only id, status, updated_at) is
    // written without filling it in.
    let has_intent = column_type(&c.column_stripe_payment_intent_id)
        .await
        .is_ok();
    let (t, id, status, updated, intent) = (
        quote_ident(table),
        quote_ident(&c.column_id),
        quote_ident(&c.column_status),
        quote_ident(&c.column_updated_at),
        quote_ident(&c.column_stripe_payment_intent_id),
    );
    // One statement per batch, set-based: the events arrive as two parallel arrays (id, status)
    // numbered by their position. Only the first event per id in the batch may write, as if the
    // events ran one after another: a later one for the same id would find the row final.
    // A row changes only while it is still pending. Per event the statement answers whether it
    // wrote and whether the row exists, which tells "already final" from "unknown id"; the
    // existence check reads the snapshot from before the UPDATE, which is what we want.
    let fill_intent = if has_intent {
        format!("{intent} = COALESCE({t}.{intent}, first.intent), ")
    } else {
        String::new()
    };
    let apply = format!(
        "WITH ev AS ( \
             SELECT e.ord, (e.id)::{id_type} AS id, (e.status)::{status_type} AS status, e.intent \
             FROM unnest($1::text[], $2::text[], $4::text[]) WITH ORDINALITY AS e(id, status, intent, ord)), \
         first AS (SELECT DISTINCT ON (id) ord, id, status, intent FROM ev ORDER BY id, ord), \
         upd AS ( \
             UPDATE {t} SET {status} = first.status, {fill_intent}{updated} = now() FROM first \
             WHERE {t}.{id} = first.id AND {t}.{status} = ($3::text)::{status_type} RETURNING first.ord) \
         SELECT (upd.ord IS NOT NULL), EXISTS (SELECT 1 FROM {t} WHERE {t}.{id} = ev.id) \
         FROM ev LEFT JOIN upd ON upd.ord = ev.ord ORDER BY ev.ord"
    );
    Ok(Sql { apply })
}

/// Applies one batch in one statement (so one implicit transaction). Returns each event's
/// result, in order.
async fn apply_batch(
    client: &tokio_postgres::Client,
    sql: &Sql,
    pending: &str,
    events: &[StatusEvent],
) -> Result<Vec<RowResult>, tokio_postgres::Error> {
    let ids: Vec<&str> = events.iter().map(|e| e.payment_id.as_str()).collect();
    let statuses: Vec<&str> = events.iter().map(|e| e.status.as_str()).collect();
    let intents: Vec<Option<&str>> = events
        .iter()
        .map(|e| e.stripe_payment_intent_id.as_deref())
        .collect();
    let rows = client
        .query(&sql.apply, &[&ids, &statuses, &pending, &intents])
        .await?;
    Ok(rows
        .iter()
        .map(|row| match (row.get::<_, bool>(0), row.get::<_, bool>(1)) {
            (true, _) => RowResult::Updated,
            (false, false) => RowResult::UnknownId,
            (false, true) => RowResult::AlreadyFinal,
        })
        .collect())
}

/// The updater's forward-only write done in process (`paystream run --sink postgres`): each
/// status event is one run of the same statement, so it changes its row only while the row is
/// still pending, and a duplicate or a replay after a crash changes nothing. The connection is
/// made at start (checking the table and columns) and again whenever it ended.
pub struct Writer {
    url: String,
    table: String,
    columns: ColumnArgs,
    /// The current connection and its statement; `None` after it ended, until the next write.
    conn: tokio::sync::Mutex<Option<(Arc<tokio_postgres::Client>, Arc<Sql>)>>,
    ok: Arc<AtomicBool>,
}

/// A status write that did not happen: Postgres is unreachable or refused (retry helps), or the
/// table does not match the configuration (the operator must fix it).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Schema(UpdaterError),
}

impl Writer {
    /// Connects and checks the table (`--table`, `--column-*`): a wrong name fails here, at
    /// start, not at the first final answer.
    pub async fn connect(url: &str, table: &str, columns: &ColumnArgs) -> Result<Self, WriteError> {
        let w = Writer {
            url: url.into(),
            table: table.into(),
            columns: columns.clone(),
            conn: tokio::sync::Mutex::new(None),
            ok: Arc::new(AtomicBool::new(false)),
        };
        w.current().await?;
        Ok(w)
    }

    /// Whether the last connection is up (readiness).
    pub fn is_up(&self) -> bool {
        self.ok.load(Ordering::Relaxed)
    }

    async fn current(&self) -> Result<(Arc<tokio_postgres::Client>, Arc<Sql>), WriteError> {
        let mut conn = self.conn.lock().await;
        if let Some((c, sql)) = conn.as_ref().filter(|(c, _)| !c.is_closed()) {
            return Ok((c.clone(), sql.clone()));
        }
        let client = connect(&self.url, &self.ok).await.inspect_err(|_| {
            METRICS
                .updater_postgres_errors
                .with_label_values(&["connect"])
                .inc();
        })?;
        let sql = build_sql(&client, &self.table, &self.columns)
            .await
            .map_err(WriteError::Schema)?;
        let pair = (Arc::new(client), Arc::new(sql));
        *conn = Some(pair.clone());
        Ok(pair)
    }

    /// Writes one status event; counted as the updater counts its rows.
    pub async fn write(&self, ev: &StatusEvent) -> Result<RowResult, WriteError> {
        let (client, sql) = self.current().await?;
        let pending = &self.columns.pending_status;
        let started = tokio::time::Instant::now();
        let r = apply_batch(&client, &sql, pending, std::slice::from_ref(ev)).await;
        METRICS
            .updater_batch_seconds
            .observe(started.elapsed().as_secs_f64());
        match r {
            Ok(results) => {
                let r = results[0];
                METRICS.updater_rows.with_label_values(&[r.as_str()]).inc();
                tracing::info!(payment_id = %ev.payment_id, idempotency_key = %ev.idempotency_key, intent_id = ev.stripe_payment_intent_id.as_deref(),
                    status = %ev.status, event_id = %ev.event_id, result = r.as_str(), "status applied");
                Ok(r)
            }
            Err(e) => {
                self.ok.store(false, Ordering::Relaxed);
                METRICS
                    .updater_postgres_errors
                    .with_label_values(&["apply"])
                    .inc();
                Err(e.into())
            }
        }
    }
}

/// Connects; `ok` turns false when the connection ends (readiness), true once connected.
async fn connect(
    url: &str,
    ok: &Arc<AtomicBool>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = crate::pg::connect(url, "paystream-updater").await?;
    let ok_now = ok.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "postgres connection ended");
        }
        ok_now.store(false, Ordering::Relaxed);
    });
    ok.store(true, Ordering::Relaxed);
    Ok(client)
}

/// Connects, retrying with backoff until Postgres answers or shutdown.
async fn connect_retrying(
    url: &str,
    ok: &Arc<AtomicBool>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<tokio_postgres::Client> {
    let mut delay = Duration::from_millis(250);
    loop {
        match connect(url, ok).await {
            Ok(c) => return Some(c),
            Err(e) => {
                METRICS
                    .updater_postgres_errors
                    .with_label_values(&["connect"])
                    .inc();
                tracing::warn!(error = %e, retry_in = ?delay, "postgres unavailable");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

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
    let registry = cfg.registry.client();

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
    let sql = build_sql(&client, &cfg.table, &cfg.columns).await?;

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
                    METRICS.kafka_errors.with_label_values(&["consume"]).inc();
                    tracing::warn!(error = %e, "consume error");
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
        let mut delay = Duration::from_millis(250);
        let results = loop {
            match apply_batch(&client, &sql, &pending, &events).await {
                Ok(r) => {
                    pg_ok.store(true, Ordering::Relaxed);
                    break r;
                }
                Err(e) => {
                    pg_ok.store(false, Ordering::Relaxed);
                    METRICS
                        .updater_postgres_errors
                        .with_label_values(&["apply"])
                        .inc();
                    tracing::warn!(error = %e, events = events.len(), retry_in = ?delay, "batch not applied; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => break 'outer,
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
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
            METRICS.updater_rows.with_label_values(&[r.as_str()]).inc();
            tracing::info!(payment_id = %ev.payment_id, idempotency_key = %ev.idempotency_key, intent_id = ev.stripe_payment_intent_id.as_deref(),
                status = %ev.status, event_id = %ev.event_id, result = r.as_str(), "status applied");
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
