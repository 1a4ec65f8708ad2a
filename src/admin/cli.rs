//! `paystream state …`: inspects the state store, through the running daemon's admin API when a
//! daemon owns the data dir, or directly when none does. Both paths compute the answer with
//! [`crate::state::inspect`] and print it here, so the output is the same; one line on stderr
//! says which was used.
//!
//! Which one: the CLI first asks `--metrics-addr` for `/state/info`. If a daemon answers and
//! serves the same data dir (compared as canonical paths), it is used. Otherwise the store is
//! opened directly, which takes sled's lock for as long as the command runs: a daemon started
//! in that moment fails with "in use" and should be restarted (its orchestrator does that).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::{Info, ENTRIES_HEADER};
use crate::clock::wall_ms;
use crate::config::{DEFAULT_METRICS_ADDR, DEFAULT_POLL_INTERVAL, DEFAULT_STALE_AFTER};
use crate::state::inspect::{self, ListQuery, PaymentView, StatsReport, Status};
use crate::state::{StateError, Store};

/// Where `state` finds the store: the same flags and environment as `run`, so a shell that
/// runs the daemon inspects it with no extra options.
#[derive(Args, Debug, Clone)]
pub struct StateArgs {
    /// The daemon's data dir.
    #[arg(long, env = "PAYSTREAM_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// The daemon's admin address (its --metrics-addr), asked first.
    #[arg(long, env = "PAYSTREAM_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Poll interval for "due in the next interval" when reading offline; by default the one
    /// the daemon recorded in the store (a running daemon always uses its own).
    #[arg(long, env = "PAYSTREAM_POLL_INTERVAL", value_parser = humantime::parse_duration)]
    pub poll_interval: Option<Duration>,
    /// The status value that means "pending" (as for `run`).
    #[arg(long, env = "PAYSTREAM_PENDING_STATUS", default_value = "pending")]
    pub pending_status: String,
    /// The age at which a pending payment counts as stale (as for `run`), for `stats` read
    /// offline and `list --stale` (a running daemon's `stats` uses its own).
    #[arg(long, env = "PAYSTREAM_STALE_AFTER", default_value = DEFAULT_STALE_AFTER, value_parser = humantime::parse_duration)]
    pub stale_after: Duration,
    #[command(subcommand)]
    pub command: StateCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum StateCommand {
    /// Counts (kept at write time), the oldest pending minute, polls due, stored offsets, size,
    /// last checkpoint.
    Stats {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Payments in state, oldest first (with --due: most overdue first).
    List {
        /// Only pending payments whose poll is due now.
        #[arg(long)]
        due: bool,
        /// Only payments first seen at least this long ago (e.g. 2h).
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
        /// Only stale payments: pending, first seen at least --stale-after ago.
        #[arg(long, conflicts_with_all = ["older_than", "status"])]
        stale: bool,
        /// Only payments flagged for a person (an amount mismatch, a double charge).
        #[arg(long)]
        flagged: bool,
        #[arg(long, value_enum)]
        status: Option<Status>,
        #[arg(long, default_value_t = inspect::DEFAULT_LIST_LIMIT)]
        limit: usize,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Everything known about one payment: by payment id, idempotency key or pi_… id.
    Get {
        query: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Every entry as one JSON line, to stdout (backups, audits).
    Export {
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Jsonl,
}

/// Why a `state` command failed, and whose move it is.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The store could not be read (missing, corrupt, locked…): see the message.
    #[error(transparent)]
    State(#[from] StateError),
    /// The data dir is locked by a process that is not the daemon at `--metrics-addr`.
    #[error("{dir} is in use by another process, and no paystream daemon serving it answered at {addr} ({why}); pass that daemon's --metrics-addr")]
    Elsewhere {
        dir: String,
        addr: SocketAddr,
        why: String,
    },
    /// The daemon answered with an error; retrying may help if it was starting or stopping.
    #[error("the daemon at {addr} failed the request: {detail}")]
    Daemon { addr: SocketAddr, detail: String },
    #[error("no payment matching {0:?} in state (a payment leaves state once the CDC stream shows it final)")]
    NotFound(String),
    #[error("writing output")]
    Output(#[from] std::io::Error),
}

impl InspectError {
    /// Whether the same command may succeed if run again: only when the daemon failed the
    /// request (it may be starting, or busy).
    pub fn retryable(&self) -> bool {
        match self {
            InspectError::State(e) => e.retryable(),
            InspectError::Daemon { .. } => true,
            _ => false,
        }
    }
}

enum Source {
    Live(SocketAddr),
    Offline(Box<Store>, PathBuf),
}

/// Runs one `state` command, printing to stdout (and the source line, progress to stderr).
pub async fn run(args: StateArgs) -> Result<(), InspectError> {
    let source = open(&args).await?;
    match &source {
        Source::Live(addr) => eprintln!(
            "paystream state: from the running daemon at {addr} (data dir {})",
            canonical(&args.data_dir).display()
        ),
        Source::Offline(_, dir) => eprintln!(
            "paystream state: offline from {} (no daemon serving it at {})",
            dir.display(),
            args.metrics_addr
        ),
    }
    let mut out = std::io::stdout().lock();
    match &args.command {
        StateCommand::Stats { format } => {
            let r: StatsReport = match &source {
                Source::Live(addr) => get_json(*addr, "/state/stats").await?,
                Source::Offline(store, dir) => {
                    let interval = match args.poll_interval {
                        Some(d) => d,
                        None => store
                            .recorded_poll_interval()?
                            .map(Duration::from_millis)
                            // A store no daemon recorded one in: the daemon's default.
                            .unwrap_or_else(|| {
                                humantime::parse_duration(DEFAULT_POLL_INTERVAL)
                                    .expect("default interval")
                            }),
                    };
                    inspect::stats(store, dir, wall_ms(), interval, args.stale_after)?
                }
            };
            match format {
                Format::Json => writeln!(out, "{}", pretty(&r))?,
                Format::Table => write_stats(&mut out, &r)?,
            }
        }
        StateCommand::List {
            due,
            older_than,
            stale,
            flagged,
            status,
            limit,
            format,
        } => {
            let q = ListQuery {
                due: *due,
                older_than: if *stale {
                    Some(args.stale_after)
                } else {
                    *older_than
                },
                status: if *stale {
                    Some(Status::Pending)
                } else {
                    *status
                },
                flagged: *flagged,
                limit: *limit,
            };
            let rows: Vec<PaymentView> = match &source {
                Source::Live(addr) => {
                    get_json(*addr, &format!("/state/list?{}", q.to_query())).await?
                }
                Source::Offline(store, _) => {
                    inspect::list(store, &q, wall_ms(), &args.pending_status)?
                }
            };
            match format {
                Format::Json => writeln!(out, "{}", pretty(&rows))?,
                Format::Table => write_list(&mut out, &rows)?,
            }
        }
        StateCommand::Get { query, format } => {
            let found: Vec<PaymentView> = match &source {
                Source::Live(addr) => {
                    let path = format!("/state/get?q={}", inspect::percent_encode(query));
                    get_json(*addr, &path).await?
                }
                Source::Offline(store, _) => inspect::find(store, query, &args.pending_status)?,
            };
            if found.is_empty() {
                return Err(InspectError::NotFound(query.clone()));
            }
            if found.len() > 1 {
                eprintln!("{} payments match {query:?}", found.len());
            }
            for p in &found {
                match format {
                    Format::Json => writeln!(out, "{}", pretty(p))?,
                    Format::Table => write_payment(&mut out, p)?,
                }
            }
        }
        StateCommand::Export { format: _ } => {
            let mut progress = Progress::new();
            match &source {
                Source::Live(addr) => export_live(*addr, &mut out, &mut progress).await?,
                Source::Offline(store, _) => {
                    progress.total = store.entry_count();
                    let mut err = None;
                    store.scan(|e| {
                        let r = serde_json::to_writer(&mut out, &e)
                            .map_err(std::io::Error::from)
                            .and_then(|_| out.write_all(b"\n"));
                        progress.add(1);
                        err = r.err();
                        err.is_none()
                    })?;
                    if let Some(e) = err {
                        return Err(e.into());
                    }
                }
            }
            progress.done();
        }
    }
    out.flush()?;
    Ok(())
}

fn canonical(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

async fn open(args: &StateArgs) -> Result<Source, InspectError> {
    let dir = canonical(&args.data_dir);
    let why = match get_json::<Info>(args.metrics_addr, "/state/info").await {
        Ok(info) if canonical(&info.data_dir) == dir => return Ok(Source::Live(args.metrics_addr)),
        Ok(info) => format!("it serves {}", info.data_dir.display()),
        Err(e) => e.to_string(),
    };
    match Store::open_existing(&dir) {
        Ok(store) => Ok(Source::Offline(Box::new(store), dir)),
        Err(StateError::Locked { path }) => Err(InspectError::Elsewhere {
            dir: path,
            addr: args.metrics_addr,
            why,
        }),
        Err(e) => Err(e.into()),
    }
}

/// One GET to the admin API; the response's status is checked, the body left to the caller.
async fn request(
    addr: SocketAddr,
    path: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, InspectError> {
    let fail = |detail: String| InspectError::Daemon { addr, detail };
    let stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| fail("connect timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(e.to_string()))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| fail(e.to_string()))?;
    if resp.status() != hyper::StatusCode::OK {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        return Err(fail(format!("{status}: {body}")));
    }
    Ok(resp)
}

async fn get_json<T: DeserializeOwned>(addr: SocketAddr, path: &str) -> Result<T, InspectError> {
    let body = request(addr, path)
        .await?
        .into_body()
        .collect()
        .await
        .map_err(|e| InspectError::Daemon {
            addr,
            detail: e.to_string(),
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| InspectError::Daemon {
        addr,
        detail: format!("unreadable answer to {path}: {e}"),
    })
}

async fn export_live(
    addr: SocketAddr,
    out: &mut impl Write,
    progress: &mut Progress,
) -> Result<(), InspectError> {
    let resp = request(addr, "/state/export").await?;
    progress.total = resp
        .headers()
        .get(ENTRIES_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let mut body = resp.into_body();
    let mut last = b'\n';
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| InspectError::Daemon {
            addr,
            detail: format!("export interrupted: {e}"),
        })?;
        if let Some(data) = frame.data_ref() {
            // The daemon signals a failed scan with a plain-text line after the JSON ones.
            if data.starts_with(b"export failed") {
                return Err(InspectError::Daemon {
                    addr,
                    detail: String::from_utf8_lossy(data).trim().to_string(),
                });
            }
            out.write_all(data)?;
            progress.add(data.iter().filter(|b| **b == b'\n').count() as u64);
            last = *data.last().unwrap_or(&last);
        }
    }
    if last != b'\n' {
        return Err(InspectError::Daemon {
            addr,
            detail: "export ended in the middle of a line".into(),
        });
    }
    Ok(())
}

/// Export progress on stderr, only when stderr is a terminal (never in logs or pipes).
struct Progress {
    on: bool,
    done: u64,
    total: u64,
    shown_at: u64,
}

impl Progress {
    fn new() -> Self {
        Progress {
            on: std::io::stderr().is_terminal(),
            done: 0,
            total: 0,
            shown_at: 0,
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        if self.on && self.done >= self.shown_at + 10_000 {
            self.shown_at = self.done;
            eprint!("\rexported {} of about {}", self.done, self.total);
        }
    }

    fn done(&self) {
        if self.on {
            eprintln!("\rexported {} entries{:20}", self.done, "");
        }
    }
}

fn pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("serializes")
}

/// Milliseconds since an RFC 3339 time, by this machine's clock.
fn since_ms(rfc3339: &str) -> Option<i64> {
    let t = chrono::DateTime::parse_from_rfc3339(rfc3339).ok()?;
    Some(wall_ms() as i64 - t.timestamp_millis())
}

/// A signed span in whole seconds: "3h 12m 5s".
fn span(ms: i64) -> String {
    humantime::format_duration(Duration::from_secs(ms.unsigned_abs() / 1000)).to_string()
}

fn age(rfc3339: &str) -> String {
    since_ms(rfc3339).map_or("?".into(), span)
}

fn next_poll(p: &PaymentView) -> String {
    match p.next_poll.as_deref().and_then(since_ms) {
        None => "-".into(),
        Some(ms) if ms >= 0 => format!("overdue {}", span(ms)),
        Some(ms) => format!("in {}", span(ms)),
    }
}

fn write_stats(out: &mut impl Write, r: &StatsReport) -> std::io::Result<()> {
    let mib = r.data_dir_bytes as f64 / (1024.0 * 1024.0);
    writeln!(out, "data dir          {} ({mib:.1} MiB)", r.data_dir)?;
    writeln!(out, "pending           {}", r.pending)?;
    writeln!(out, "awaiting cdc      {}", r.awaiting_cdc)?;
    match &r.oldest_pending {
        Some(o) => writeln!(
            out,
            "oldest pending    {}first seen in the minute from {} ({} ago; `state list --limit 1` names it)",
            o.id.as_ref().map(|id| format!("{id}, ")).unwrap_or_default(),
            o.first_seen,
            span((o.age_seconds * 1000.0) as i64)
        )?,
        None => writeln!(out, "oldest pending    -")?,
    }
    writeln!(out, "due now           {}", r.due_now)?;
    writeln!(
        out,
        "stale             {} (pending since {} or more)",
        r.stale, r.stale_after
    )?;
    writeln!(out, "flagged           {}", r.flagged)?;
    writeln!(out, "with a decline    {}", r.declined)?;
    writeln!(
        out,
        "due next {:<8} {}",
        r.poll_interval, r.due_next_interval
    )?;
    match (&r.last_checkpoint, r.last_checkpoint_age_seconds) {
        (Some(t), Some(a)) => writeln!(
            out,
            "last checkpoint   {t} ({} ago)",
            span((a * 1000.0) as i64)
        )?,
        _ => writeln!(out, "last checkpoint   never")?,
    }
    writeln!(out, "pending by age")?;
    for a in &r.by_age {
        writeln!(out, "  {:<8} {}", a.age, a.pending)?;
    }
    writeln!(out, "stored offsets (next to read)")?;
    for o in &r.offsets {
        writeln!(out, "  {}[{}]  {}", o.topic, o.partition, o.next_offset)?;
    }
    Ok(())
}

fn write_list(out: &mut impl Write, rows: &[PaymentView]) -> std::io::Result<()> {
    let table: Vec<[String; 9]> = rows
        .iter()
        .map(|p| {
            [
                p.id.clone(),
                p.state.clone(),
                p.amount.clone(),
                p.currency.clone(),
                p.stripe_payment_intent_id.clone().unwrap_or("-".into()),
                age(&p.first_seen),
                p.polls.to_string(),
                p.last_outcome.clone().unwrap_or("-".into()),
                next_poll(p),
            ]
        })
        .collect();
    let header = [
        "ID",
        "STATE",
        "AMOUNT",
        "CURRENCY",
        "INTENT",
        "AGE",
        "POLLS",
        "LAST OUTCOME",
        "NEXT POLL",
    ];
    let mut widths = header.map(str::len);
    for row in &table {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in &table {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

fn write_payment(out: &mut impl Write, p: &PaymentView) -> std::io::Result<()> {
    let opt = |v: &Option<String>| v.clone().unwrap_or("-".into());
    writeln!(out, "payment           {}", p.id)?;
    writeln!(out, "idempotency key   {}", p.idempotency_key)?;
    writeln!(
        out,
        "intent            {}",
        opt(&p.stripe_payment_intent_id)
    )?;
    writeln!(out, "amount            {} {}", p.amount, p.currency)?;
    writeln!(out, "state             {}", p.state)?;
    writeln!(
        out,
        "first seen        {} ({} ago)",
        p.first_seen,
        age(&p.first_seen)
    )?;
    writeln!(
        out,
        "next poll         {} ({})",
        opt(&p.next_poll),
        next_poll(p)
    )?;
    writeln!(
        out,
        "polls             {} ({} unanswered in a row)",
        p.polls, p.failures
    )?;
    if let Some(d) = &p.declines {
        writeln!(
            out,
            "declines          {} (last {} at {}; not final: the customer may retry)",
            d.count, d.last_code, d.last_at
        )?;
    }
    if let Some(f) = &p.flag {
        writeln!(
            out,
            "flagged           {} since {}: {}",
            f.kind, f.since, f.detail
        )?;
    }
    match &p.status_event {
        Some(s) => writeln!(
            out,
            "status event      {} {} at {} (event_id {})",
            s.status,
            s.reason.as_deref().unwrap_or(""),
            s.emitted_at,
            s.event_id
        )?,
        None => writeln!(out, "status event      none yet")?,
    }
    if let Some(c) = &p.last_cdc {
        writeln!(
            out,
            "last cdc event    op={} partition={} offset={} lsn={} committed={} applied={}",
            c.op,
            c.partition,
            c.offset,
            c.lsn.map_or("-".into(), |l| l.to_string()),
            opt(&c.source_ts),
            c.applied_at
        )?;
        for (k, v) in &c.row {
            writeln!(out, "  {k:<24} {}", opt(v))?;
        }
    }
    writeln!(
        out,
        "poll history (newest {}, oldest first)",
        p.history.len()
    )?;
    for h in &p.history {
        writeln!(
            out,
            "  {}  {:<14} {}",
            h.at,
            h.outcome,
            opt(&h.stripe_status)
        )?;
    }
    Ok(())
}
