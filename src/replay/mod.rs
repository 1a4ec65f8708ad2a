//! `paystream replay`: feeds files of Debezium message values ([`FileSource`]) through the same
//! [`Pipeline`] → state → checkpoint path as the Kafka source.
//!
//! Uses: rebuilding state from a topic dump (`kcat -C -e -t <topic> > dump.jsonl`), and the
//! benchmarks. Input is one message value per line; an empty line or `null` is a Kafka null (a
//! tombstone, which without its key changes nothing: the delete before it already removed
//! the payment). A folder is read file by file in name order.
//!
//! # Position and durability
//! Each file's position is an offset like a partition's: the next line to read, stored as
//! [`crate::state::Position::File`] in the same atomic checkpoint as the state it produced,
//! every `--checkpoint-interval`. A replay killed at any moment and started
//! again on the same data dir resumes after the last checkpoint, and applying a line twice is
//! harmless (upsert / remove by id). These positions never mix with the CDC topic's offsets, so
//! a `run` on the same data dir still reads its topic from its own stored offsets (or the
//! beginning) and re-applies what it finds.
//!
//! Undecodable lines go to a JSON-lines dead-letter file (synced before the position passes
//! them) instead of the dead-letter topic.
//!
//! Without `--no-poll` the poll scheduler runs beside the replay, as in `run` (Stripe key and
//! brokers for the status topic needed); with it, replay touches neither Stripe nor Kafka.

pub mod generate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::{ConfigError, RunConfig};
use crate::metrics;
use crate::pipeline::{Health, Pipeline};
use crate::run::RunError;
use crate::sink::{DeadLetterFile, DeadLetters};
use crate::source::file::FileSource;
use crate::source::Source;
use crate::state::{StateError, Store};

/// `paystream replay`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReplayArgs {
    /// A file of message values (one per line), or a folder of such files.
    #[arg(long)]
    pub input: PathBuf,
    /// Do not poll Stripe while replaying (no Stripe key, no Kafka needed).
    #[arg(long)]
    pub no_poll: bool,
    /// Where undecodable lines go, as JSON lines (default: `replay-dead-letters.jsonl` in the
    /// data dir).
    #[arg(long, env = "PAYSTREAM_DEAD_LETTER_FILE")]
    pub dead_letter_file: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunConfig,
}

/// The one line `replay` prints.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ReplaySummary {
    pub files: usize,
    /// Lines read in this run (lines before a file's stored position are skipped, not counted).
    pub events: u64,
    pub skipped: u64,
    /// Lines that changed state (tracked, updated or removed).
    pub applied: u64,
    pub tracked: u64,
    pub updated: u64,
    /// Payments removed from state: a final status, a delete, a truncate.
    pub resolved: u64,
    pub ignored: u64,
    pub dead_lettered: u64,
    /// Entries in state at the end (pending, or awaiting confirmation of an emitted status).
    pub pending: u64,
    pub checkpoints: u64,
    pub elapsed_s: f64,
    pub events_per_s: f64,
    /// The process's peak resident set (VmHWM), bytes; 0 where /proc is not there.
    pub peak_rss_bytes: u64,
    pub dead_letter_file: Option<String>,
}

/// A replay failure: the input (the operator's), or what `run` can fail on.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading {path} failed: {source}")]
    Input {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Run(#[from] RunError),
}

impl From<StateError> for ReplayError {
    fn from(e: StateError) -> Self {
        ReplayError::Run(e.into())
    }
}

impl From<ConfigError> for ReplayError {
    fn from(e: ConfigError) -> Self {
        ReplayError::Run(e.into())
    }
}

/// The files to read, in order.
fn input_files(input: &Path) -> Result<Vec<PathBuf>, ReplayError> {
    let err = |source| ReplayError::Input {
        path: input.display().to_string(),
        source,
    };
    if !input.is_dir() {
        // Opened here so a missing file fails before the state store is touched.
        std::fs::File::open(input).map_err(err)?;
        return Ok(vec![input.to_path_buf()]);
    }
    let mut files = Vec::new();
    for e in std::fs::read_dir(input).map_err(err)? {
        let p = e.map_err(err)?.path();
        if p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Peak resident set of this process, from /proc (Linux).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Replays `args.input` into the state store at `args.run.data_dir` until the input ends or
/// `shutdown` turns true, then writes a final checkpoint.
pub async fn replay(
    args: ReplayArgs,
    shutdown: watch::Receiver<bool>,
) -> Result<ReplaySummary, ReplayError> {
    let cfg = &args.run;
    if args.no_poll {
        cfg.validate_state_settings()?;
    } else {
        cfg.validate()?;
    }
    let files = input_files(&args.input)?;
    metrics::init_run_series();
    crate::decode::init_series();
    crate::state::init_series();
    let clock = Clock::new();
    let state = Arc::new(Store::open(&cfg.data_dir)?);
    let dead_letters = DeadLetterFile::new(
        args.dead_letter_file
            .clone()
            .unwrap_or_else(|| cfg.data_dir.join("replay-dead-letters.jsonl")),
    );
    let dead_letter_path = dead_letters.path().to_path_buf();
    let source = Arc::new(FileSource::new(files.clone(), clock));

    // Lines are text, so replay reads JSON values only (a known gap for Avro topic dumps).
    let decoder = crate::decode::Decoder::new(cfg.decode.decoder_settings());
    let (stop, stopped) = watch::channel(false);
    let poller = if args.no_poll {
        None
    } else {
        state.record_poll_interval(cfg.poll_interval.as_millis() as u64)?;
        // Replay keeps its own dead-letter file; the run's dead-letter target is not used.
        let (api, sink, _) = crate::run::stripe_and_sinks(cfg, &decoder).await?;
        let p = crate::run::poller(cfg, state.clone(), api, sink, clock, source.ownership());
        Some(tokio::spawn(std::sync::Arc::new(p).run(stopped.clone())))
    };
    let pipeline = Arc::new(Pipeline {
        state: state.clone(),
        dead_letters: DeadLetters::File(dead_letters),
        decoder,
        pending_status: cfg.decode.columns.pending_status.clone(),
        poll_interval: cfg.poll_interval,
        clock,
        health: Arc::new(Health::default()),
    });

    // Checkpoints run beside the reader, as in `run`: the reader only ever takes the overlay's
    // lock, and the checkpoint swaps the overlay out under it (see `Store::checkpoint`).
    let (cp_source, cp_pipeline) = (source.clone(), pipeline.clone());
    let mut cp_stop = stopped.clone();
    let every = cfg.checkpoint_interval;
    let checkpoints = tokio::spawn(async move {
        let mut n = 0u64;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            // Every interval, and at once when the reader waits for room (a backlog read faster
            // than the disk writes: see `pipeline::MAX_UNWRITTEN`).
            tokio::select! {
                _ = tick.tick() => {}
                _ = cp_pipeline.state.full() => {}
                _ = cp_stop.changed() => return Ok::<u64, StateError>(n),
            }
            cp_source.checkpoint(&cp_pipeline).await?;
            n += 1;
        }
    });

    let started = Instant::now();
    let read = source.run(&pipeline, shutdown).await;
    let _ = stop.send(true);
    let mut checkpoints_done = checkpoints.await.expect("checkpoint task")?;
    if let Some(p) = poller {
        p.await.expect("poller task")?;
    }
    read.map_err(RunError::from)?;
    // The last lines read become durable with their positions.
    source.checkpoint(&pipeline).await?;
    checkpoints_done += 1;
    let t = source.tally();
    let elapsed_s = started.elapsed().as_secs_f64();
    Ok(ReplaySummary {
        files: files.len(),
        events: t.events,
        skipped: t.skipped,
        applied: t.tracked + t.updated + t.resolved,
        tracked: t.tracked,
        updated: t.updated,
        resolved: t.resolved,
        ignored: t.ignored,
        dead_lettered: t.dead_lettered,
        pending: state.entry_count(),
        checkpoints: checkpoints_done,
        elapsed_s,
        events_per_s: t.events as f64 / elapsed_s.max(1e-9),
        peak_rss_bytes: peak_rss_bytes(),
        dead_letter_file: dead_letter_path
            .exists()
            .then(|| dead_letter_path.display().to_string()),
    })
}
