//! The Postgres writer: status events applied to the payments table, forward only.
//!
//! One set-based statement per batch (one implicit transaction), in effect
//! `UPDATE payments SET status = ev.status, stripe_payment_intent_id =
//!  COALESCE(stripe_payment_intent_id, ev.intent), updated_at = now() FROM <batch> ev
//!  WHERE id = ev.id AND status = 'pending'`
//! (the intent id is filled in only where the row had none: a payment found by Search on its
//! idempotency key gets the intent that answered). A row changes only while it is still
//! pending, so duplicates, replays and late events are harmless. Used by `paystream updater`
//! (batches from the status topic) and by `paystream run --sink postgres` ([`Writer`], one
//! event at a time).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::StatusEvent;
use crate::clock::Backoff;
use crate::metrics::events::{emit, PaymentRef, PostgresWriteFailed, StatusApplied};
use crate::metrics::METRICS;
use crate::pg::quote_ident;

/// The `application_name` of the write-back's connections, in the updater and in `run --sink
/// postgres` alike: the write is the same, so a DBA sees one name for it.
pub const APP_NAME: &str = "paystream-updater";

/// The columns the write touches (`--table`'s `--column-*` and `--pending-status`).
#[derive(Debug, Clone)]
pub struct Columns {
    pub id: String,
    pub status: String,
    pub stripe_payment_intent_id: String,
    pub updated_at: String,
    /// The status value that means "pending": the only one a write moves away from.
    pub pending_status: String,
}

/// The table or its columns do not match the configuration: the operator's fault; retrying
/// cannot help.
#[derive(Debug, thiserror::Error)]
#[error("payments table check failed: {0}")]
pub struct SchemaError(pub String);

/// What one status event did to its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowResult {
    Updated,
    AlreadyFinal,
    UnknownId,
}

impl RowResult {
    pub fn as_str(self) -> &'static str {
        match self {
            RowResult::Updated => "updated",
            RowResult::AlreadyFinal => "already_final",
            RowResult::UnknownId => "unknown_id",
        }
    }
}

/// The prepared write: one statement that applies a batch of status events, forward only.
pub struct Statement {
    apply: String,
}

/// Reads the table's column types and builds the batch statement: a table or column that does
/// not match the configuration fails here, at start.
pub async fn prepare(
    client: &tokio_postgres::Client,
    table: &str,
    c: &Columns,
) -> Result<Statement, SchemaError> {
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
                .map_err(|e| SchemaError(e.to_string()))?
                .ok_or_else(|| SchemaError(format!("table {:?} has no column {column:?} (--table / --column-*)", table)))?;
            Ok::<String, SchemaError>(row.get(0))
        }
    };
    let id_type = column_type(&c.id).await?;
    let status_type = column_type(&c.status).await?;
    // A table without the intent column (the updater needs only id, status, updated_at) is
    // written without filling it in.
    let has_intent = column_type(&c.stripe_payment_intent_id).await.is_ok();
    let (t, id, status, updated, intent) = (
        quote_ident(table),
        quote_ident(&c.id),
        quote_ident(&c.status),
        quote_ident(&c.updated_at),
        quote_ident(&c.stripe_payment_intent_id),
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
    Ok(Statement { apply })
}

/// Applies one batch in one statement (so one implicit transaction). Returns each event's
/// result, in order.
pub async fn apply_batch(
    client: &tokio_postgres::Client,
    sql: &Statement,
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
    columns: Columns,
    /// The current connection and its statement; `None` after it ended, until the next write.
    conn: tokio::sync::Mutex<Option<(Arc<tokio_postgres::Client>, Arc<Statement>)>>,
    ok: Arc<AtomicBool>,
}

/// A status write that did not happen: Postgres is unreachable or refused (retry helps), or the
/// table does not match the configuration (the operator must fix it).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Schema(#[from] SchemaError),
}

impl WriteError {
    /// Postgres being away is retried; a table that does not fit needs the operator.
    pub fn retryable(&self) -> bool {
        matches!(self, WriteError::Postgres(_))
    }
}

impl Writer {
    /// Connects and checks the table (`--table`, `--column-*`): a wrong name fails here, at
    /// start, not at the first final answer.
    pub async fn connect(url: &str, table: &str, columns: &Columns) -> Result<Self, WriteError> {
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

    async fn current(&self) -> Result<(Arc<tokio_postgres::Client>, Arc<Statement>), WriteError> {
        let mut conn = self.conn.lock().await;
        if let Some((c, sql)) = conn.as_ref().filter(|(c, _)| !c.is_closed()) {
            return Ok((c.clone(), sql.clone()));
        }
        // Not retried here: the caller's poll retries the payment later (logged by it).
        let client = connect(&self.url, &self.ok).await.inspect_err(|_| {
            METRICS
                .updater_postgres_errors
                .with_label_values(&["connect"])
                .inc();
        })?;
        let sql = prepare(&client, &self.table, &self.columns).await?;
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
                applied(ev, r);
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
pub async fn connect(
    url: &str,
    ok: &Arc<AtomicBool>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = crate::pg::connect(url, APP_NAME).await?;
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

/// Reports what writing `ev` back did to its row (the updater and `--sink postgres` alike).
pub fn applied(ev: &StatusEvent, result: RowResult) {
    emit(StatusApplied {
        payment: PaymentRef {
            id: &ev.payment_id,
            idempotency_key: Some(&ev.idempotency_key),
            intent_id: ev.stripe_payment_intent_id.as_deref(),
        },
        status: &ev.status,
        event_id: &ev.event_id,
        result: result.as_str(),
    });
}

/// Connects, retrying with backoff until Postgres answers or shutdown.
pub async fn connect_retrying(
    url: &str,
    ok: &Arc<AtomicBool>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<tokio_postgres::Client> {
    let mut backoff = Backoff::outage();
    loop {
        match connect(url, ok).await {
            Ok(c) => return Some(c),
            Err(e) => emit(PostgresWriteFailed {
                stage: "connect",
                error: &e,
                retry_in: backoff.peek(),
                events: 0,
            }),
        }
        if !backoff.wait(shutdown).await {
            return None;
        }
    }
}
