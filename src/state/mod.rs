//! Pending payments in sled, with a due-time index and the source offsets, checkpointed in one
//! atomic step.
//!
//! # Layout (one sled tree, so one `Batch` is atomic across all of it)
//! - `p\0<id>` → [`Entry`] as JSON: one pending payment.
//! - `d\0<next_poll_ms: u64 BE><id>` → empty: the due index. "What is due now" is a range scan
//!   from `d\0` to `d\0<now>`. Only entries still to be polled are indexed (not those whose
//!   status event was already emitted).
//! - `o\0<topic>\0<partition: i32 BE>` → the next offset to read (i64 BE).
//! - `c\0<partition: i32 BE>` → the next offset of the CDC partition's state changelog that
//!   this store has seen (i64 BE): written with the entries it logged (scale-out only, see
//!   [`changelog`]). Equal to the changelog's end: the local entries of that partition are
//!   current. Absent: this store never logged that partition.
//! - `m\0tally`, `h\0f<minute>`, `h\0n<minute>` → counts of the pending entries (how many,
//!   flagged, declined; by first-seen minute; by due minute), kept at write time in the same
//!   batch as the entries (see the `tally` module).
//! - `x\0<value>\0<id>` → empty: the lookup index, the ids an idempotency key or an intent id
//!   names, for `state get` (see the `lookup` module).
//! - `m\0format` → the layout version (4; a version-1 store gains its tally at its first
//!   recovery check, a version-2 store its journal at its first checkpoint, a version-3 store
//!   its lookup index at its first recovery check).
//! - `m\0journal` → the last checkpoint's changes, written in its atomic commit and applied to
//!   the tree in small slices after it (see the `journal` module): what keeps a checkpoint's
//!   memory from growing with the number of keys it writes.
//! - `m\0entries` → how many `p\0` entries the last checkpoint left (u64 BE), written in the
//!   same batch as they are.
//! - `m\0checkpoint_ms` → wall-clock time of the last checkpoint (u64 BE ms), for `state stats`.
//! - `m\0poll_interval_ms` → the poll interval the daemon last ran with (u64 BE ms), so an
//!   offline `state stats` counts "due in the next interval" as the daemon would.
//!
//! Entries are JSON so that fields can be added without a layout change: a field added later
//! carries `#[serde(default)]`, and fields a newer build dropped are ignored when read.
//!
//! # Recovery check
//! sled 0.34 has open reports of stores that come back corrupt after an abrupt stop (for example
//! spacejam/sled#1533). [`Store::check`] checks every invariant the layout promises: each entry
//! parses and sits under its own id, the due index and the entries match one to one (and so do
//! the lookup index and the entries' keys and intents), the entry
//! count is the one the last checkpoint wrote, offsets are well formed (and the tally is that of
//! the entries: derived data, rewritten from the scan with an error logged if not). Any breach is a
//! [`StateError::Inconsistent`] naming the problem, instead of running on state that may have
//! lost a pending payment. [`Store::open`] runs it before returning; the daemon opens with
//! [`Store::open_unchecked`] and runs it beside its start (seconds at a million entries), and
//! no checkpoint writes to the store until it passed ([`StateError::Unchecked`]), so a failing
//! check stops the daemon with nothing written and no offset committed. Polls in that window
//! are harmless: only Stripe's final answers resolve, and the updater only moves rows forward.
//!
//! # Why checkpoints are safe
//! Every change (from the CDC stream or from a poll) goes into an in-memory overlay first.
//! [`Store::checkpoint`] writes the whole overlay (as one journal value) *and* the offsets of the
//! messages that caused it in one `apply_batch` and then flushes. sled recovers a batch entirely
//! or not at all, so after a crash the store holds some checkpoint's state together with exactly
//! the offsets that produced it: replaying from those offsets rebuilds whatever came after. The
//! journal then reaches the entries in slices; an open applies it again first, so no reader ever
//! sees a checkpoint half applied. Offsets are committed to the
//! Kafka group only after the flush returns, and on start the daemon resumes from sled's offsets,
//! never the group's, so a commit can never run ahead of durable state.
//!
//! Poll results are in the overlay too. Losing them in a crash means a payment is polled again;
//! a status event already produced is then produced again with the same deterministic
//! `event_id`, and the updater's forward-only write makes the duplicate harmless.
//!
//! # Where each part lives
//! This file holds the layout (the keys above), opening a store and its errors. Each concern
//! has its own file, all of them `impl Store` blocks over the same fields:
//! - `entry`: what an entry holds ([`Entry`]) and what applying a change did ([`Applied`]);
//! - `overlay`: the in-memory overlay and the CDC semantics (upsert, remove, truncate), reads;
//! - `position`: each source's position ([`Position`]), stored beside the state it produced;
//! - `due`: the due index (what to poll now, spreading and pulling in polls);
//! - `checkpoint`: the one atomic write of overlay and positions, through the changelog;
//! - `journal`: how that write is committed whole and applied in slices;
//! - `lookup`: the index of ids by idempotency key and intent id;
//! - `partitions`: scale-out's partition replace and adopt;
//! - `recovery`: the recovery check;
//! - `tally`: the counts kept at write time, with their deltas;
//! - `stats`: counts for `state stats` and the gauges, read from the tally;
//! - [`changelog`]: the state changelog's records; [`inspect`]: what `paystream state` prints.
//!
//! # Blocking
//! Every method here is synchronous and may touch the disk (point reads on an overlay miss; full
//! or range scans in `due`, `stats`, `scan`, truncate and the recovery check; writes and syncs
//! in checkpoints). The rule for async callers, written once: anything but a point read or an
//! overlay-only change (`apply_event` of anything but a truncate, `advance`, `update`, `get`)
//! goes through [`blocking`], on tokio's blocking pool, so a scan never stalls the runtime's
//! workers (the Kafka consumer, the polls, the admin endpoint). The overlay's mutex is never
//! held across the I/O of a checkpoint's write.

pub mod changelog;
mod checkpoint;
mod due;
mod entry;
pub mod inspect;
mod journal;
mod lookup;
mod overlay;
mod partitions;
mod position;
mod recovery;
mod stats;
mod tally;
#[cfg(test)]
mod tests;

pub use checkpoint::{ChangeLog, Checkpoint, LogBatch, Stage};
pub use entry::{Applied, CdcSeen, Declines, Emitted, Entry, Flag, PollRecord};
pub use position::Position;
pub use stats::{init_series, set_gauges, Stats, AGE_BUCKETS};

use std::path::Path;
use std::sync::Mutex;

use entry::Head;
use overlay::Overlay;

/// The layout version. 2 added the tally (`tally`); a version-1 store is upgraded in place by
/// its first recovery check, which writes the tally and the new version in one batch. A build
/// that reads only version 1 then refuses the store rather than leave its counts behind.
///
/// 3 added the checkpoint journal (`journal`): a version-2 store has none, so it is read as it
/// is and marked 3 by its first checkpoint, whose journal a version-2 build would not apply
/// (it refuses the store instead).
///
/// 4 added the lookup index (`lookup`): a store of version 3 or older has none, and its first
/// recovery check builds it and writes the new version (a crash midway: the next check builds
/// it again). A version-3 build refuses a version-4 store, whose index it would not keep.
const FORMAT: &[u8] = b"4";
const FORMAT_V3: &[u8] = b"3";
const FORMAT_V2: &[u8] = b"2";
const FORMAT_V1: &[u8] = b"1";
const P: &[u8] = b"p\0";
const D: &[u8] = b"d\0";
const O: &[u8] = b"o\0";
const C: &[u8] = b"c\0";
const META_FORMAT: &[u8] = b"m\0format";
const META_ENTRIES: &[u8] = b"m\0entries";
const META_CHECKPOINT_MS: &[u8] = b"m\0checkpoint_ms";
const META_POLL_INTERVAL_MS: &[u8] = b"m\0poll_interval_ms";
/// Polls kept in an entry's history (the newest); `Entry::polls` counts them all. Bounded so a
/// payment pending for days does not grow without limit.
pub const HISTORY_LEN: usize = 8;
/// sled's page cache. Its default (1 GiB) would make the daemon's memory grow with state; reads
/// of state are rare on the hot path (new payments skip the tree, see `Overlay::durable_ids`).
const SLED_CACHE_BYTES: u64 = 32 << 20;
/// How many recovery-check problems an error lists (the count covers all).
const PROBLEMS_SHOWN: usize = 5;

/// A state store failure. The local disk is at fault; retrying does not help until it is fixed,
/// so the daemon stops rather than run on state it cannot save.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no state store at {path} (nothing was ever checkpointed there; check --data-dir)")]
    Missing { path: String },
    #[error("state store I/O failed at {path}: {source}")]
    Io { path: String, source: sled::Error },
    #[error("state store at {path} has layout version {found:?}, this build reads \"1\" to \"4\" (upgrading older ones to \"4\")")]
    Format { path: String, found: String },
    #[error("state entry {key:?} is unreadable: {detail}")]
    Corrupt { key: String, detail: String },
    /// Another process (usually another paystream) has the store open; sled allows one.
    #[error("state store at {path} is in use by another process (sled's lock is held): stop the other instance or give this one its own --data-dir")]
    Locked { path: String },
    /// A checkpoint was asked of a store whose recovery check has not passed (a bug, or a stop
    /// during a failing check): nothing is written.
    #[error("state store at {path} has not passed its recovery check; nothing written")]
    Unchecked { path: String },
    /// The state changelog did not take a checkpoint's changes: the broker is at fault and a
    /// later checkpoint retries (nothing was written to the tree either).
    #[error(transparent)]
    Changelog(#[from] changelog::LogError),
    /// The store broke an invariant of its layout: it is not safe to run on.
    #[error("state store at {path} failed its recovery check with {count} problem(s), e.g. {}; not running on it. Move the directory aside and restart to rebuild state from the CDC topic (needs the topic's full history, e.g. log compaction), or restore a backup", problems.join("; "))]
    Inconsistent {
        path: String,
        count: usize,
        problems: Vec<String>,
    },
}

impl StateError {
    /// Whether a later attempt may succeed without anyone fixing the disk: only the
    /// changelog's broker errors.
    pub fn retryable(&self) -> bool {
        matches!(self, StateError::Changelog(_))
    }
}

pub struct Store {
    db: sled::Db,
    path: String,
    overlay: Mutex<Overlay>,
    /// One checkpoint at a time (the checkpoint loop and a rebalance's revoke may race): the
    /// tree's entries change only under it, so a checkpoint reads them without the overlay lock.
    checkpointing: Mutex<()>,
    /// Woken by every change to the overlay: the checkpoint loop starts a checkpoint as soon as
    /// there is work, instead of waiting out a fixed tick (see [`Store::changed`]).
    changed: tokio::sync::Notify,
    /// Woken when a checkpoint takes the overlay's changes, and when it ends (written or not):
    /// a reader waiting for the overlay to shrink ([`Store::room`]) looks again.
    checkpointed: tokio::sync::Notify,
    /// Woken when a reader starts waiting for room: a checkpoint loop on a fixed interval
    /// ([`Store::full`]) checkpoints now rather than at its next tick.
    full: tokio::sync::Notify,
    /// The tally of the entries in the tree (`tally`), changed only by writes to the tree under
    /// the checkpoint lock. `None` until known: a version-1 store gets it from its recovery check.
    tally: Mutex<Option<tally::Tally>>,
    /// Whether the tree lacks the lookup index (a store of layout 3 or older, until its
    /// recovery check builds it).
    lookups_missing: std::sync::atomic::AtomicBool,
}

fn p_key(id: &str) -> Vec<u8> {
    [P, id.as_bytes()].concat()
}

fn d_key(due_ms: u64, id: &str) -> Vec<u8> {
    [D, &due_ms.to_be_bytes(), id.as_bytes()].concat()
}

fn c_key(partition: i32) -> Vec<u8> {
    [C, &partition.to_be_bytes()[..]].concat()
}

/// sled's snapshot files that were being written when the process died (see
/// [`Store::open_unchecked`]).
fn incomplete_snapshots(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snap.") && n.ends_with(".generating"))
        })
        .collect()
}

/// How long an open waits for sled's file lock before it reports the store in use.
///
/// sled 0.34 releases its lock when the last handle on its log file closes, and its own thread
/// pool holds one while it finishes a write or a segment truncation it started before the store
/// was dropped. A store reopened in the same process right after a drop (a restart inside the
/// daemon, a test) can meet that lock for a few milliseconds; under load CI saw it. Another
/// process holding the store never lets go, so the wait is short and then the open fails.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// sled takes an exclusive file lock and reports a second opener only in the text of an
/// `ErrorKind::Other` (sled 0.34, config.rs).
pub fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Calls `open` until it does not fail on sled's lock, for at most `LOCK_WAIT` (2 s).
pub fn wait_for_lock<T>(mut open: impl FnMut() -> sled::Result<T>) -> sled::Result<T> {
    let started = std::time::Instant::now();
    loop {
        match open() {
            Err(e) if is_lock_error(&e) && started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Runs `f` on the store on tokio's blocking pool: how async code calls anything that scans
/// or writes the disk (see "Blocking" above).
pub async fn blocking<T: Send + 'static>(
    store: &std::sync::Arc<Store>,
    f: impl FnOnce(&Store) -> T + Send + 'static,
) -> T {
    let st = store.clone();
    tokio::task::spawn_blocking(move || f(&st))
        .await
        .expect("state task panicked")
}

impl Store {
    /// Opens a store that must already exist (the inspection CLI: it never creates one).
    pub fn open_existing(dir: &Path) -> Result<Store, StateError> {
        if !dir.join("conf").exists() {
            return Err(StateError::Missing {
                path: dir.display().to_string(),
            });
        }
        Store::open(dir)
    }

    /// Opens (or creates) the store and runs the recovery check (a full scan).
    pub fn open(dir: &Path) -> Result<Store, StateError> {
        let store = Store::open_unchecked(dir)?;
        store.check()?;
        Ok(store)
    }

    /// Opens (or creates) the store without the recovery check, which the caller runs with
    /// [`Store::check`] (the daemon runs it beside its start: seconds at a million entries).
    /// Until then the store works, only slower for new payments (every id may be in the tree).
    pub fn open_unchecked(dir: &Path) -> Result<Store, StateError> {
        let path = dir.display().to_string();
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let started = std::time::Instant::now();
        let open = || {
            wait_for_lock(|| {
                sled::Config::new()
                    .path(dir)
                    .cache_capacity(SLED_CACHE_BYTES)
                    .open()
            })
        };
        let opened = match open() {
            // sled 0.34.7 writes a snapshot to `snap.<lsn>.generating`, fsyncs it and renames
            // it to `snap.<lsn>`, but when it opens it picks the highest `snap.*` file without
            // skipping `.generating` ones (config.rs, get_snapshot_files filters only
            // `.in___motion`; upstream issue spacejam/sled#1527). A kill -9 during snapshot
            // generation (seen in tests/crash_run.rs) then leaves a store that refuses to open
            // with "Read corrupted data". Such a file is never the store's committed snapshot
            // (that is the one renamed after its fsync; the log after it is replayed anyway),
            // so it is removed and the open retried once. Only after sled failed: a store
            // another process has open fails on its lock first, and its files are left alone.
            Err(sled::Error::Corruption { at, bt }) => {
                let partial = incomplete_snapshots(dir);
                if partial.is_empty() {
                    Err(sled::Error::Corruption { at, bt })
                } else {
                    for f in partial {
                        tracing::warn!(file = %f.display(), "removing sled's incomplete snapshot left by a crash");
                        std::fs::remove_file(&f).map_err(|e| io(sled::Error::Io(e)))?;
                    }
                    open()
                }
            }
            other => other,
        };
        let db = match opened {
            Ok(db) => db,
            // sled takes an exclusive file lock and reports a second opener only in the text
            // of an `ErrorKind::Other` (sled 0.34, config.rs).
            Err(e) if is_lock_error(&e) => return Err(StateError::Locked { path }),
            Err(e) => return Err(io(e)),
        };
        let format = db.get(META_FORMAT).map_err(io)?;
        let fresh = match &format {
            Some(v) if [FORMAT, FORMAT_V3, FORMAT_V2, FORMAT_V1].contains(&v.as_ref()) => false,
            Some(v) => {
                return Err(StateError::Format {
                    path,
                    found: String::from_utf8_lossy(v).into(),
                })
            }
            None => true,
        };
        if fresh {
            // A store with no format marker must be empty: otherwise it is not ours, or the
            // marker was lost, and either way nothing in it can be trusted.
            if let Some(kv) = db.iter().next() {
                let (k, _) = kv.map_err(io)?;
                return Err(StateError::Inconsistent {
                    path,
                    count: 1,
                    problems: vec![format!(
                        "no layout marker, but it holds key {:?}",
                        String::from_utf8_lossy(&k)
                    )],
                });
            }
            let mut b = sled::Batch::default();
            b.insert(META_FORMAT, FORMAT);
            b.insert(META_ENTRIES, &0u64.to_be_bytes()[..]);
            tally::Tally::default().write_all(&db, &mut b).map_err(io)?;
            db.apply_batch(b).map_err(io)?;
            db.flush().map_err(io)?;
        }
        // Before anything reads the tree: the last checkpoint's journal, whose application a
        // crash may have cut short (see `journal`).
        let replayed = journal::replay(&db, io)?;
        // A fresh store was just written at the current version; a version-1 store has no
        // tally until its recovery check.
        let tally = match &format {
            Some(v) if v.as_ref() == FORMAT_V1 => None,
            _ => tally::Tally::read(&db).map_err(io)?,
        };
        let store = Store {
            db,
            path,
            overlay: Mutex::new(Overlay::default()),
            checkpointing: Mutex::new(()),
            changed: tokio::sync::Notify::new(),
            checkpointed: tokio::sync::Notify::new(),
            full: tokio::sync::Notify::new(),
            tally: Mutex::new(tally),
            lookups_missing: (!fresh && format.as_deref() != Some(FORMAT)).into(),
        };
        // The count the last checkpoint left; the recovery check confirms it.
        let entries = store.meta_u64(META_ENTRIES)?.unwrap_or(0);
        store.overlay.lock().expect("state lock").durable_entries = entries;
        tracing::debug!(
            entries,
            journal_records = replayed,
            open_ms = started.elapsed().as_millis() as u64,
            "state store opened"
        );
        Ok(store)
    }

    fn io(&self, source: sled::Error) -> StateError {
        StateError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, StateError> {
        let v = self.db.get(key).map_err(|e| self.io(e))?;
        Ok(v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(u64::from_be_bytes))
    }

    /// Wall-clock time of the last checkpoint, if any was written.
    pub fn last_checkpoint_ms(&self) -> Result<Option<u64>, StateError> {
        self.meta_u64(META_CHECKPOINT_MS)
    }

    /// Records the poll interval the daemon runs with (see the layout), durably.
    pub fn record_poll_interval(&self, ms: u64) -> Result<(), StateError> {
        self.db
            .insert(META_POLL_INTERVAL_MS, &ms.to_be_bytes()[..])
            .map_err(|e| self.io(e))?;
        self.db.flush().map_err(|e| self.io(e))?;
        Ok(())
    }

    /// The poll interval the daemon last ran with, if it recorded one.
    pub fn recorded_poll_interval(&self) -> Result<Option<u64>, StateError> {
        self.meta_u64(META_POLL_INTERVAL_MS)
    }

    /// How many entries the last checkpoint left (changes since are not counted).
    /// Returns once the overlay changed since the last call returned (or at once if it has):
    /// Notify keeps one permit, so a change made while nobody waits is not missed, and a burst
    /// of changes wakes the waiter once.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    fn touched(&self) {
        self.changed.notify_one();
    }

    /// Returns once a reader waits for room ([`Store::room`]), or at once if one started
    /// waiting since the last call returned (one permit, like [`Store::changed`]).
    pub async fn full(&self) {
        self.full.notified().await;
    }

    /// How many ids have changes not yet checkpointed (a checkpoint in progress has taken its
    /// own out).
    pub fn unwritten(&self) -> usize {
        self.overlay.lock().expect("state lock").entries.len()
    }

    /// Returns once fewer than `bound` ids have changes not yet checkpointed: at once if so,
    /// otherwise once a checkpoint took them (it then writes them while the reader goes on, so
    /// memory holds at most twice `bound`). The bound on what a reader may put in memory
    /// ahead of the disk, and so on what one checkpoint writes (see `crate::pipeline`).
    pub async fn room(&self, bound: usize) {
        loop {
            // Registered before the look, so a checkpoint that ends between the two is not
            // missed.
            let woken = self.checkpointed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.unwritten() < bound {
                return;
            }
            self.full.notify_one();
            woken.await;
        }
    }

    pub fn entry_count(&self) -> u64 {
        self.overlay.lock().expect("state lock").durable_entries
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}
