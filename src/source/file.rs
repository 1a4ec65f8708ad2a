//! The file source of `paystream replay`: files of Debezium message values, one per line, read
//! in order into the [`Pipeline`].
//!
//! Each file's position ([`Position::File`], by file name) is the next line to read, stored in
//! the same atomic checkpoint as the state it produced: a replay killed at any moment resumes
//! after the last checkpoint, and applying a line twice is harmless (upsert / remove by id).
//! An empty line or `null` is a Kafka null (a tombstone, which without its key changes
//! nothing: the delete before it already removed the payment). Once durable, a position is
//! handed to no one.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::{Source, SourceError};
use crate::clock::Clock;
use crate::pipeline::{Handled, Pipeline};
use crate::scaleout::Ownership;
use crate::state::{Applied, Position, StateError};

/// How often (in lines) the reader looks at the shutdown signal and yields to the runtime.
const YIELD_EVERY: u64 = 4096;

/// What the lines read did, counted.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Lines read and handled (applied, ignored or dead-lettered).
    pub events: u64,
    /// Lines before a file's stored position, not read again.
    pub skipped: u64,
    pub tracked: u64,
    pub updated: u64,
    pub resolved: u64,
    pub ignored: u64,
    pub dead_lettered: u64,
}

pub struct FileSource {
    files: Vec<PathBuf>,
    clock: Clock,
    tally: Mutex<Tally>,
}

impl FileSource {
    pub fn new(files: Vec<PathBuf>, clock: Clock) -> Self {
        FileSource {
            files,
            clock,
            tally: Mutex::new(Tally::default()),
        }
    }

    /// What has been read so far.
    pub fn tally(&self) -> Tally {
        *self.tally.lock().expect("tally lock")
    }

    /// Reads one file from its stored position. `Ok(false)`: shutdown came first.
    async fn read(
        &self,
        path: &PathBuf,
        pipeline: &Pipeline,
        sum: &mut Tally,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, SourceError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let at = Position::File(name);
        let start = pipeline.state.stored(&at)?.unwrap_or(0);
        let err = |source| SourceError::Input {
            path: path.display().to_string(),
            source,
        };
        let mut reader =
            std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path).map_err(err)?);
        let mut line = Vec::with_capacity(64 * 1024);
        let mut offset: i64 = 0;
        if start > 0 {
            tracing::info!(file = %path.display(), from_line = start + 1, "resuming replay");
        }
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line).map_err(err)? == 0 {
                return Ok(true);
            }
            if offset < start {
                offset += 1;
                sum.skipped += 1;
                continue;
            }
            let text = line.trim_ascii_end();
            let value = match text.trim_ascii_start() {
                b"" | b"null" => None,
                _ => Some(text),
            };
            match pipeline.handle(&at, offset, None, value, shutdown).await? {
                Handled::Applied(a) => match a {
                    Applied::Tracked => sum.tracked += 1,
                    Applied::Updated => sum.updated += 1,
                    Applied::Removed => sum.resolved += 1,
                    Applied::Ignored => sum.ignored += 1,
                },
                Handled::DeadLettered => sum.dead_lettered += 1,
                Handled::Interrupted => return Ok(false),
            }
            sum.events += 1;
            offset += 1;
            if sum.events.is_multiple_of(YIELD_EVERY) {
                *self.tally.lock().expect("tally lock") = *sum;
                if *shutdown.borrow() {
                    return Ok(false);
                }
                // Lets the checkpoint and poll tasks run on a single-threaded runtime too.
                tokio::task::yield_now().await;
            }
        }
    }
}

impl Source for FileSource {
    /// `replay` opens its store checked ([`crate::state::Store::open`]).
    const CHECK_BEFORE_START: bool = true;

    /// Reads the files in order; returns when they end or at shutdown.
    async fn run(
        &self,
        pipeline: &Pipeline,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SourceError> {
        let mut sum = self.tally();
        let mut result = Ok(());
        for path in &self.files {
            match self.read(path, pipeline, &mut sum, &mut shutdown).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        *self.tally.lock().expect("tally lock") = sum;
        result
    }

    async fn checkpoint(&self, pipeline: &Pipeline) -> Result<(), StateError> {
        pipeline.checkpoint(None).await.map(|_| ())
    }

    fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    fn ownership(&self) -> Arc<Ownership> {
        Arc::new(Ownership::all(self.clock))
    }

    fn owns_position(&self, at: &Position) -> bool {
        matches!(at, Position::File(_))
    }
}
