//! Embedded mode's source (`--source postgres`): the payments table's logical replication,
//! read directly from Postgres (pgoutput), with no Kafka or Debezium in between.
//!
//! The replication protocol is [`pgwire_replication`]'s: a maintained client that speaks the
//! walsender protocol itself, sends standby status updates on its own (also on an idle stream,
//! so Postgres sees progress on a quiet table) and reports only the position we tell it is
//! durable. tokio-postgres has no replication support. The pgoutput messages are decoded by
//! [`crate::decode::pgoutput`] into the same change events the Debezium decoder gives, and
//! applied by the same [`Pipeline::apply`]: everything past this module is shared with the
//! Kafka path.
//!
//! # Position (why this order is safe)
//! The position is an LSN ([`Position::Slot`]), stored in sled like a Kafka offset, in the same
//! atomic batch as the state it produced.
//! 1. Row changes enter the state overlay with the position of the last *complete*
//!    transaction (its commit's end LSN), never their own: a checkpoint in the middle of a
//!    transaction stores the previous commit, and a restart replays the whole transaction.
//!    Applying a change twice gives the same state.
//! 2. A Commit moves the position to its end LSN; a keepalive outside a transaction moves it
//!    to the server's WAL end (everything committed before it was sent already), so a quiet
//!    table does not hold WAL back while other tables write.
//! 3. Only after a checkpoint is durable is its LSN acknowledged to Postgres
//!    (`confirmed_flush_lsn`), so the slot never frees WAL that state still needs; and it is
//!    acknowledged at every checkpoint, so the slot never holds WAL forever.
//! 4. On start the stream resumes at the stored LSN (Postgres skips transactions that
//!    committed before it). With none stored, a new slot is created with an exported snapshot,
//!    the pending rows are read in that snapshot, and streaming starts at the slot's
//!    consistent point: every change after the snapshot, none before.
//!
//! Known gaps: TLS (see `Cargo.toml`); one slot is read by one instance (scale-out is Kafka's);
//! a snapshot is applied in memory before its single checkpoint (about 200 bytes a pending row).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio::sync::watch;

use super::{Source, SourceError};
use crate::clock::{Backoff, Clock};
use crate::decode::pgoutput::{Column, PgOutput};
use crate::metrics::METRICS;
use crate::pg::quote_ident;
use crate::pipeline::Pipeline;
use crate::scaleout::Ownership;
use crate::sink::DeadLetter;
use crate::state::{Position, StateError, Store};

/// How long start-up waits for Postgres to answer before it fails.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Rows fetched per round trip of the snapshot's cursor.
const SNAPSHOT_BATCH: u64 = 5000;
/// How soon a raised position reaches the server (standby status update).
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// The walsender's session settings: values render the same on every server.
const SESSION_OPTIONS: &str = "-c datestyle=ISO,MDY -c timezone=UTC -c intervalstyle=postgres";

/// Why embedded mode's source stopped or could not start. Each says who is at fault.
#[derive(Debug, thiserror::Error)]
pub enum PgSourceError {
    /// Postgres did not answer, or ended the session: retry helps once it is back.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("logical replication: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    /// The operator: the server is not set up for logical decoding.
    #[error("wal_level is {0:?}: logical replication needs wal_level = logical (set it in postgresql.conf and restart Postgres)")]
    WalLevel(String),
    /// The operator: the table or publication does not fit.
    #[error("{0}")]
    Setup(String),
    /// An operator dropped the slot (or pointed paystream at another server): the WAL since
    /// the stored position is gone, and with it changes state has not seen.
    #[error("replication slot {slot:?} does not exist, but state holds a position from it (LSN {lsn}): the changes after it went with the slot. Restart once with --resnapshot to rebuild state from the table's pending rows (docs/operations.md, \"Embedded mode: the slot is gone\")")]
    SlotMissing { slot: String, lsn: String },
    /// State is older than what the slot confirmed (a data dir restored from an old backup).
    #[error("replication slot {slot:?} confirmed LSN {confirmed}, past the position state holds ({lsn}): the WAL between is gone. Restart once with --resnapshot")]
    StateBehindSlot {
        slot: String,
        lsn: String,
        confirmed: String,
    },
    /// Another process streams from the slot (a second paystream on the same slot).
    #[error("replication slot {slot:?} is in use by server process {pid}: one paystream per slot (--slot)")]
    SlotActive { slot: String, pid: i32 },
    /// The data dir holds state of another source (the Kafka topic, another slot, a replayed
    /// file): the positions cannot be mixed.
    #[error("the data dir holds state read from {0}: give embedded mode its own --data-dir")]
    MixedState(Position),
    #[error(transparent)]
    State(#[from] StateError),
}

impl PgSourceError {
    /// Whether a later start may succeed without anyone changing anything: only while Postgres
    /// is away. Every other variant needs the operator.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            PgSourceError::Postgres(_)
                | PgSourceError::Replication(_)
                | PgSourceError::SlotActive { .. }
        )
    }
}

/// A replication slot as `pg_replication_slots` shows it.
struct Slot {
    active_pid: Option<i32>,
    confirmed: Option<Lsn>,
}

pub struct PgSource {
    url: String,
    pg: tokio_postgres::Config,
    slot: String,
    publication: String,
    table: String,
    pending_status: String,
    resnapshot: bool,
    /// Where state keeps this slot's LSN.
    at: Position,
    state: Arc<Store>,
    clock: Clock,
    /// The replication stream is connected (readiness).
    replication: AtomicBool,
    /// The stream [`Source::start`] opened, until [`Source::run`] takes it.
    stream: Mutex<Option<ReplicationClient>>,
    /// The LSN durable in state, sent by each checkpoint to the stream, which acknowledges it.
    durable: watch::Sender<u64>,
    decode: crate::decode::DecodeOptions,
}

/// What embedded mode's source needs (`--postgres-url`, `--slot`, `--publication`, `--table`,
/// `--pending-status`, `--resnapshot` and the decode options).
pub struct PgSourceSettings {
    pub url: String,
    pub slot: String,
    pub publication: String,
    /// `schema.table`, or a bare name in `public`.
    pub table: String,
    pub pending_status: String,
    pub resnapshot: bool,
    pub decode: crate::decode::DecodeOptions,
}

/// A row paystream cannot read, as a dead letter: its bytes (the pgoutput message, or a
/// snapshot row's values as JSON), the reason, and the LSN it came at.
fn dead_letter<'a>(
    topic: &'a str,
    payload: &'a [u8],
    err: &'a crate::decode::DecodeError,
    lsn: Lsn,
) -> DeadLetter<'a> {
    DeadLetter {
        key: None,
        payload: Some(payload),
        reason: err.kind.as_str(),
        detail: &err.detail,
        topic,
        partition: 0,
        offset: lsn.0 as i64,
    }
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl PgSource {
    /// The source as `run` configures it (the settings were validated).
    pub fn new(s: PgSourceSettings, state: Arc<Store>, clock: Clock) -> Self {
        let pg = s.url.parse().unwrap_or_default();
        PgSource {
            at: Position::Slot(s.slot.clone()),
            url: s.url,
            pg,
            slot: s.slot,
            publication: s.publication,
            table: if s.table.contains('.') {
                s.table
            } else {
                format!("public.{}", s.table)
            },
            pending_status: s.pending_status,
            resnapshot: s.resnapshot,
            state,
            clock,
            replication: AtomicBool::new(false),
            stream: Mutex::new(None),
            durable: watch::channel(0).0,
            decode: s.decode,
        }
    }

    fn stored_lsn(&self) -> Result<Option<Lsn>, StateError> {
        Ok(self.state.stored(&self.at)?.map(|o| Lsn(o as u64)))
    }

    fn replication_config(&self, start: Lsn, ack: Lsn) -> ReplicationConfig {
        let pg = &self.pg;
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let user = pg.get_user().unwrap_or("postgres").to_string();
        let password = pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let db = pg.get_dbname().unwrap_or(&user).to_string();
        ReplicationConfig::new(
            host,
            user,
            password,
            db,
            &self.slot,
            self.publication.as_str(),
        )
        .with_port(pg.get_ports().first().copied().unwrap_or(5432))
        .with_tls(TlsConfig::disabled())
        .with_start_lsn(start)
        .with_ack_lsn(ack)
        .with_status_interval(STATUS_INTERVAL)
        .with_wakeup_interval(Duration::from_secs(5))
        .with_options(SESSION_OPTIONS)
        .with_application_name("paystream-embedded")
    }

    /// A plain connection for the control plane (checks, publication, snapshot).
    async fn control(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = crate::pg::connect(&self.url, "paystream-embedded").await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "postgres control connection ended");
            }
        });
        client
            .batch_execute("SET TIME ZONE 'UTC'; SET datestyle = 'ISO, MDY'")
            .await?;
        Ok(client)
    }

    /// Connects for the start, retrying while Postgres does not answer, up to a bound.
    async fn control_at_start(&self) -> Result<tokio_postgres::Client, PgSourceError> {
        let end = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        loop {
            match self.control().await {
                Ok(c) => return Ok(c),
                Err(e) if tokio::time::Instant::now() < end => {
                    tracing::warn!(error = %e, "postgres not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Checks the server and the table, and creates the publication when it is missing.
    async fn prepare(&self, c: &tokio_postgres::Client) -> Result<(), PgSourceError> {
        let wal: String = c.query_one("SHOW wal_level", &[]).await?.get(0);
        if wal != "logical" {
            return Err(PgSourceError::WalLevel(wal));
        }
        let row = c
            .query_opt(
                "SELECT c.relreplident::text, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
                 FROM pg_class c WHERE c.oid = to_regclass($1)",
                &[&self.table],
            )
            .await?
            .ok_or_else(|| PgSourceError::Setup(format!("table {:?} does not exist (--table)", self.table)))?;
        let (identity, has_pk): (String, bool) = (row.get(0), row.get(1));
        // Deletes must carry the key: REPLICA IDENTITY DEFAULT needs a primary key, FULL
        // and USING INDEX carry it anyway; NOTHING would make Postgres refuse the updates.
        if identity == "n" || (identity == "d" && !has_pk) {
            return Err(PgSourceError::Setup(format!(
                "table {:?} has no replica identity (no primary key, or REPLICA IDENTITY NOTHING): deletes and updates cannot be streamed; add a primary key or ALTER TABLE … REPLICA IDENTITY FULL",
                self.table
            )));
        }
        let exists = c
            .query_opt(
                "SELECT puballtables FROM pg_publication WHERE pubname = $1",
                &[&self.publication],
            )
            .await?;
        match exists {
            None => {
                c.batch_execute(&format!(
                    "CREATE PUBLICATION {} FOR TABLE {}",
                    quote_ident(&self.publication),
                    quote_ident(&self.table)
                ))
                .await?;
                tracing::info!(publication = %self.publication, table = %self.table, "publication created");
            }
            Some(_) => {
                let (schema, name) = self.table.split_once('.').expect("qualified");
                let has = c
                    .query_opt(
                        "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                        &[&self.publication, &schema, &name],
                    )
                    .await?
                    .is_some();
                if !has {
                    return Err(PgSourceError::Setup(format!(
                        "publication {:?} exists but does not publish {:?} (--publication, --table)",
                        self.publication, self.table
                    )));
                }
            }
        }
        Ok(())
    }

    async fn slot(&self, c: &tokio_postgres::Client) -> Result<Option<Slot>, PgSourceError> {
        let row = c
            .query_opt(
                "SELECT active_pid, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?;
        Ok(row.map(|r| Slot {
            active_pid: r.get(0),
            confirmed: r
                .get::<_, Option<String>>(1)
                .and_then(|s| Lsn::parse(&s).ok()),
        }))
    }

    /// Readies the stream: resumes at the stored LSN, or creates the slot and loads the
    /// initial snapshot into state (checkpointed before anything streams). Needs the store's
    /// recovery check to have passed.
    async fn open(
        &self,
        pipeline: &Pipeline,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<ReplicationClient, PgSourceError> {
        if let Some((other, _)) = self
            .state
            .positions()?
            .into_iter()
            // The events feed keeps its cursor beside the source's position.
            .find(|(at, _)| *at != self.at && *at != Position::FeedCursor)
        {
            return Err(PgSourceError::MixedState(other));
        }
        let c = self.control_at_start().await?;
        self.prepare(&c).await?;
        let slot = self.slot(&c).await?;
        let stored = self.stored_lsn()?;
        if let Some(pid) = slot.as_ref().and_then(|s| s.active_pid) {
            return Err(PgSourceError::SlotActive {
                slot: self.slot.clone(),
                pid,
            });
        }
        match (self.resnapshot, stored, slot) {
            (false, Some(lsn), Some(slot)) => {
                if let Some(confirmed) = slot.confirmed.filter(|c| *c > lsn) {
                    return Err(PgSourceError::StateBehindSlot {
                        slot: self.slot.clone(),
                        lsn: lsn.to_string(),
                        confirmed: confirmed.to_string(),
                    });
                }
                tracing::info!(slot = %self.slot, lsn = %lsn, "resuming logical replication");
                self.durable.send_replace(lsn.0);
                let mut repl =
                    ReplicationClient::connect(self.replication_config(lsn, lsn)).await?;
                repl.wait_started().await?;
                Ok(repl)
            }
            (false, Some(lsn), None) => Err(PgSourceError::SlotMissing {
                slot: self.slot.clone(),
                lsn: lsn.to_string(),
            }),
            (_, stored, slot) => {
                if slot.is_some() {
                    // A slot with no position in state: made by a run whose snapshot never
                    // became durable (or --resnapshot). Nothing was acknowledged from it that
                    // state holds, so a new slot and snapshot lose nothing.
                    tracing::warn!(slot = %self.slot, "dropping the replication slot to take a new snapshot");
                    c.execute("SELECT pg_drop_replication_slot($1)", &[&self.slot])
                        .await?;
                }
                if stored.is_some() {
                    // --resnapshot: what state holds is replaced by the snapshot.
                    self.state
                        .replace_partition(&self.at, &Default::default())?;
                }
                self.snapshot(&c, pipeline, shutdown).await
            }
        }
    }

    /// Creates the slot with an exported snapshot, reads the pending rows in that snapshot,
    /// applies them at the slot's consistent point and checkpoints, then starts streaming.
    async fn snapshot(
        &self,
        c: &tokio_postgres::Client,
        pipeline: &Pipeline,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<ReplicationClient, PgSourceError> {
        // The slot is created on the replication session itself, which then waits (gated):
        // its exported snapshot lives until that session runs another command.
        let mut repl =
            ReplicationClient::connect_gated(self.replication_config(Lsn::ZERO, Lsn::ZERO)).await?;
        let rows = repl
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')",
                quote_ident(&self.slot)
            ))
            .await?;
        let field = |i: usize| -> Result<String, PgSourceError> {
            rows.first()
                .and_then(|r| r.get(i).cloned().flatten())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .ok_or_else(|| {
                    PgSourceError::Setup("CREATE_REPLICATION_SLOT returned no snapshot".into())
                })
        };
        let consistent = Lsn::parse(&field(1)?)
            .map_err(|e| PgSourceError::Setup(format!("slot's consistent point: {e}")))?;
        let snapshot = field(2)?;
        tracing::info!(slot = %self.slot, consistent_point = %consistent, "replication slot created");

        let columns: Vec<Column> = c
            .query(
                "SELECT attname::text, atttypid FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&self.table],
            )
            .await?
            .iter()
            .map(|r| Column {
                name: r.get(0),
                type_oid: r.get(1),
            })
            .collect();
        let list = columns
            .iter()
            .map(|c| format!("{}::text", quote_ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ");
        c.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET TRANSACTION SNAPSHOT {}; \
             DECLARE paystream_snapshot NO SCROLL CURSOR FOR SELECT {list} FROM {} WHERE {}::text = {}",
            quote_literal(&snapshot),
            quote_ident(&self.table),
            quote_ident(&self.decode.columns.status),
            quote_literal(&self.pending_status),
        ))
        .await?;
        let decoder = PgOutput::new(self.decode.clone(), &self.table);
        let topic = self.at.name();
        let position = (&self.at, consistent.0 as i64);
        let mut n = 0u64;
        loop {
            let batch = c
                .simple_query(&format!("FETCH {SNAPSHOT_BATCH} FROM paystream_snapshot"))
                .await?;
            let mut got = 0;
            for m in &batch {
                let tokio_postgres::SimpleQueryMessage::Row(row) = m else {
                    continue;
                };
                got += 1;
                let values: Vec<Option<&str>> = (0..columns.len()).map(|i| row.get(i)).collect();
                match decoder.snapshot_event(&columns, &values) {
                    Ok(ev) => {
                        pipeline
                            .apply(&ev, None, position, consistent.0 as i64)
                            .await?;
                    }
                    Err(err) => {
                        let text = serde_json::to_vec(&values).expect("json");
                        let dl = dead_letter(&topic, &text, &err, consistent);
                        if !pipeline.dead_letter(&dl, shutdown).await {
                            return Err(PgSourceError::Setup(
                                "shutdown during the snapshot".into(),
                            ));
                        }
                    }
                }
            }
            n += got;
            if got < SNAPSHOT_BATCH {
                break;
            }
        }
        c.batch_execute("COMMIT").await?;
        METRICS.snapshot_rows.inc_by(n);
        // The snapshot and its position become durable together; only then does the stream
        // start, and a crash before this point leaves no position (a new slot next time).
        self.state.advance(&self.at, consistent.0 as i64);
        crate::state::blocking(&self.state, |s| s.checkpoint()).await?;
        self.durable.send_replace(consistent.0);
        tracing::info!(pending = n, lsn = %consistent, "initial snapshot loaded");
        repl.start().await?;
        repl.wait_started().await?;
        repl.update_applied_lsn(consistent);
        Ok(repl)
    }

    /// Streams changes into state until shutdown, reconnecting when the session ends. Stops
    /// on a state error or when the slot is gone.
    async fn stream(
        &self,
        mut repl: ReplicationClient,
        pipeline: &Pipeline,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), PgSourceError> {
        let topic = self.at.name();
        let mut decoder = PgOutput::new(self.decode.clone(), &self.table);
        let mut durable = self.durable.subscribe();
        // The end of the last transaction applied to state (in memory): what row changes
        // carry as their position, and where a new session resumes.
        let mut applied = Lsn(*durable.borrow());
        let mut in_txn = false;
        self.connected(true);
        loop {
            let ev = tokio::select! {
                _ = shutdown.changed() => break,
                _ = durable.changed() => {
                    let lsn = Lsn(*durable.borrow_and_update());
                    repl.update_applied_lsn(lsn);
                    continue;
                }
                ev = repl.recv() => ev,
            };
            match ev {
                Ok(Some(ReplicationEvent::Begin { .. })) => in_txn = true,
                Ok(Some(ReplicationEvent::XLogData {
                    wal_start, data, ..
                })) => {
                    // Backpressure: a backlog read faster than checkpoints write waits here.
                    if !pipeline.room(&mut shutdown).await {
                        break;
                    }
                    let position = (&self.at, applied.0 as i64);
                    match decoder.decode(&data) {
                        Ok(events) => {
                            for ev in &events {
                                pipeline
                                    .apply(ev, None, position, wal_start.0 as i64)
                                    .await?;
                            }
                        }
                        Err(err) => {
                            let dl = dead_letter(&topic, &data, &err, wal_start);
                            if !pipeline.dead_letter(&dl, &mut shutdown).await {
                                break;
                            }
                        }
                    }
                }
                Ok(Some(ReplicationEvent::Commit { end_lsn, .. })) => {
                    in_txn = false;
                    applied = applied.max(end_lsn);
                    self.state.advance(&self.at, applied.0 as i64);
                }
                Ok(Some(ReplicationEvent::KeepAlive { wal_end, .. })) => {
                    METRICS
                        .replication_lag_bytes
                        .set(wal_end.0.saturating_sub(*durable.borrow()) as i64);
                    // Between transactions everything that committed before the server's
                    // position was sent already: the position may move past it.
                    if !in_txn && wal_end > applied {
                        applied = wal_end;
                        self.state.advance(&self.at, applied.0 as i64);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    if let Err(e) = &ev {
                        tracing::warn!(error = %e, "replication session ended");
                    } else {
                        tracing::warn!("replication session ended by the server");
                    }
                    self.connected(false);
                    in_txn = false;
                    match self.reconnect(applied, &mut shutdown).await? {
                        Some(r) => repl = r,
                        None => break,
                    }
                    METRICS.replication_reconnects.inc();
                    self.connected(true);
                }
            }
        }
        self.connected(false);
        // A clean end: the walsender sees CopyDone, the slot is free for the next start.
        let _ = tokio::time::timeout(Duration::from_secs(5), repl.shutdown()).await;
        Ok(())
    }

    fn connected(&self, up: bool) {
        self.replication.store(up, Ordering::Relaxed);
        METRICS.replication_connected.set(i64::from(up));
    }

    /// Opens a new session at `from` (what state holds in memory; a transaction cut off is
    /// replayed whole), acknowledging only what is durable. Retries with backoff while Postgres
    /// is away; fails when the slot is gone. `None`: shutdown came first.
    async fn reconnect(
        &self,
        from: Lsn,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<ReplicationClient>, PgSourceError> {
        let mut backoff = Backoff::outage();
        loop {
            if !backoff.wait(shutdown).await {
                return Ok(None);
            }
            // The slot is checked over a plain connection first: a dropped slot is final,
            // not an outage to wait out.
            match self.control().await {
                Ok(c) => match self.slot(&c).await {
                    Ok(None) => {
                        return Err(PgSourceError::SlotMissing {
                            slot: self.slot.clone(),
                            lsn: Lsn(*self.durable.borrow()).to_string(),
                        })
                    }
                    Ok(Some(_)) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "replication slot not readable yet; retrying");
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff.peek(), "postgres unavailable; retrying");
                    continue;
                }
            }
            let durable = Lsn(*self.durable.borrow());
            let cfg = self.replication_config(from.max(durable), durable);
            match ReplicationClient::connect(cfg).await {
                Ok(mut r) => match r.wait_started().await {
                    Ok(()) => {
                        tracing::info!(lsn = %from.max(durable), "replication resumed");
                        return Ok(Some(r));
                    }
                    // The old walsender may still hold the slot for a moment.
                    Err(e) => tracing::warn!(error = %e, "replication not started yet; retrying"),
                },
                Err(e) => tracing::warn!(error = %e, "replication not started yet; retrying"),
            }
        }
    }

    /// Raises the LSN the stream acknowledges to what a checkpoint made durable.
    fn acknowledge(&self, positions: &[(Position, i64)]) {
        if let Some((_, lsn)) = positions.iter().find(|(at, _)| *at == self.at) {
            self.durable.send_if_modified(|d| {
                let raised = (*lsn as u64) > *d;
                if raised {
                    *d = *lsn as u64;
                }
                raised
            });
        }
    }
}

impl Source for PgSource {
    /// A first start writes its snapshot into state: the store must have passed its check.
    const CHECK_BEFORE_START: bool = true;

    /// Resumes at the stored LSN, or creates the slot and loads the initial snapshot into
    /// state (checkpointed before anything streams).
    async fn start(
        &self,
        pipeline: &Pipeline,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), SourceError> {
        let repl = self.open(pipeline, shutdown).await?;
        *self.stream.lock().expect("stream lock") = Some(repl);
        Ok(())
    }

    /// Streams changes into state until shutdown, reconnecting when the session ends. Stops
    /// on a state error or when the slot is gone.
    async fn run(
        &self,
        pipeline: &Pipeline,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), SourceError> {
        let repl = self
            .stream
            .lock()
            .expect("stream lock")
            .take()
            .expect("Source::start opens the stream before Source::run");
        Ok(self.stream(repl, pipeline, shutdown).await?)
    }

    /// One checkpoint; its LSN then goes to the stream, which acknowledges it to Postgres.
    async fn checkpoint(&self, pipeline: &Pipeline) -> Result<(), StateError> {
        let cp = pipeline.checkpoint(None).await?;
        self.acknowledge(&cp.positions);
        Ok(())
    }

    fn ready(&self) -> Result<(), String> {
        if self.replication.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("logical replication not connected".into())
        }
    }

    /// One slot is read by one instance: it polls every payment.
    fn ownership(&self) -> Arc<Ownership> {
        Arc::new(Ownership::all(self.clock))
    }

    fn owns_position(&self, at: &Position) -> bool {
        *at == self.at
    }
}
