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
//! - `m\0format` → the layout version.
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
//! parses and sits under its own id, the due index and the entries match one to one, the entry
//! count is the one the last checkpoint wrote, offsets are well formed. Any breach is a
//! [`StateError::Inconsistent`] naming the problem, instead of running on state that may have
//! lost a pending payment. [`Store::open`] runs it before returning; the daemon opens with
//! [`Store::open_unchecked`] and runs it beside its start (seconds at a million entries), and
//! no checkpoint writes to the store until it passed ([`StateError::Unchecked`]), so a failing
//! check stops the daemon with nothing written and no offset committed. Polls in that window
//! are harmless: only Stripe's final answers resolve, and the updater only moves rows forward.
//!
//! # Why checkpoints are safe
//! Every change (from the CDC stream or from a poll) goes into an in-memory overlay first.
//! [`Store::checkpoint`] writes the whole overlay *and* the offsets of the messages that caused it
//! in one `apply_batch` and then flushes. sled recovers a batch entirely or not at all, so after a
//! crash the store holds some checkpoint's state together with exactly the offsets that produced
//! it: replaying from those offsets rebuilds whatever came after. Offsets are committed to the
//! Kafka group only after the flush returns, and on start the daemon resumes from sled's offsets,
//! never the group's, so a commit can never run ahead of durable state.
//!
//! Poll results are in the overlay too. Losing them in a crash means a payment is polled again;
//! a status event already produced is then produced again with the same deterministic
//! `event_id`, and the updater's forward-only write makes the duplicate harmless.

pub mod changelog;
pub mod inspect;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::change::{ChangeEvent, Col, Op, Payment};
use crate::metrics::METRICS;

const FORMAT: &[u8] = b"1";
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
    #[error("state store at {path} has layout version {found:?}, this build reads {FORMAT:?}")]
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
    /// A newly assigned partition's state could not be made current (scale-out): its
    /// changelog is unreachable or unreadable. The daemon stops; the group gives the partition
    /// to another member, or back to this one after a restart.
    #[error("partition takeover failed: {0}")]
    Takeover(String),
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
    pub fn is_retryable(&self) -> bool {
        matches!(self, StateError::Changelog(_))
    }
}

/// The status paystream decided and emitted for a payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Emitted {
    pub status: String,
    pub event_id: String,
    pub at_ms: u64,
    /// Why it failed (Stripe's decline code, `canceled`), as sent in the status event.
    #[serde(default)]
    pub reason: Option<String>,
}

/// One poll of Stripe for a payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollRecord {
    pub at_ms: u64,
    /// The poll outcome (the `paystream_polls_total` label).
    pub outcome: String,
    /// The PaymentIntent's status when Stripe answered.
    pub stripe_status: Option<String>,
}

/// Where the last CDC event about a payment came from. With the entry's columns it is the last
/// row image paystream saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdcSeen {
    /// Debezium op: c, r, u.
    pub op: String,
    pub partition: i32,
    pub offset: i64,
    pub lsn: Option<i64>,
    /// When the change was made in the database (Debezium `source.ts_ms`).
    pub source_ts_ms: Option<i64>,
    /// When paystream applied it.
    pub seen_ms: u64,
}

/// One pending payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub idempotency_key: String,
    /// Exact decimal string.
    pub amount: String,
    pub currency: String,
    pub stripe_payment_intent_id: Option<String>,
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
    /// The CDC partition the payment's events arrive on.
    pub partition: i32,
    pub first_seen_ms: u64,
    pub next_poll_ms: u64,
    /// Polls in a row that got no answer (errors); drives the backoff. Reset by any answer.
    pub failures: u32,
    /// Every poll so far; `history` keeps the newest [`HISTORY_LEN`].
    pub polls: u64,
    #[serde(default)]
    pub history: Vec<PollRecord>,
    #[serde(default)]
    pub last_cdc: Option<CdcSeen>,
    /// Set once the final status was produced: no more polls, waiting for the CDC stream to show
    /// the row non-pending (or deleted) before the entry is dropped.
    pub emitted: Option<Emitted>,
    /// Declined attempts Stripe reported. None is final: the customer may retry on the same
    /// intent, so the payment stays pending and is polled again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declines: Option<Declines>,
    /// Set while Stripe's final answer cannot be written (the money does not match the row, or
    /// a double charge): a person must look. Cleared by the next answer that can be written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<Flag>,
    /// Stripe Connect: the connected account the intent lives in (`--account-column`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

/// The declines of one payment's intent so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Declines {
    pub count: u32,
    /// Stripe's decline code of the newest one.
    pub last_code: String,
    pub last_at_ms: u64,
    /// What tells the newest attempt from an earlier one (`poll::stripe::Decline::attempt`):
    /// a poll that sees the same decline again does not count it twice.
    pub last_attempt: String,
}

/// Why a payment Stripe calls final is not written (see [`Entry::flag`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flag {
    /// `amount_mismatch` or `double_charge` (the poll outcome label).
    pub kind: String,
    /// Both sides, as the warning logged them.
    pub detail: String,
    /// When it was first seen (clock ms).
    pub since_ms: u64,
}

impl Entry {
    /// Records one poll: counts it and keeps the newest [`HISTORY_LEN`] in the history.
    pub fn record_poll(&mut self, at_ms: u64, outcome: &str, stripe_status: Option<&str>) {
        self.polls += 1;
        if self.history.len() >= HISTORY_LEN {
            self.history.remove(0);
        }
        self.history.push(PollRecord {
            at_ms,
            outcome: outcome.to_string(),
            stripe_status: stripe_status.map(str::to_string),
        });
    }

    pub fn last_outcome(&self) -> Option<&str> {
        self.history.last().map(|p| p.outcome.as_str())
    }

    /// Records a decline seen by a poll; returns whether it is a new attempt's (counted once,
    /// however many polls see it).
    pub fn record_decline(&mut self, at_ms: u64, code: &str, attempt: &str) -> bool {
        match &mut self.declines {
            Some(d) if d.last_attempt == attempt => false,
            Some(d) => {
                d.count += 1;
                d.last_code = code.to_string();
                d.last_at_ms = at_ms;
                d.last_attempt = attempt.to_string();
                true
            }
            None => {
                self.declines = Some(Declines {
                    count: 1,
                    last_code: code.to_string(),
                    last_at_ms: at_ms,
                    last_attempt: attempt.to_string(),
                });
                true
            }
        }
    }

    /// Declines seen so far.
    pub fn decline_count(&self) -> u32 {
        self.declines.as_ref().map_or(0, |d| d.count)
    }

    /// Stale: first seen at least `stale_after_ms` ago and still pending. Polled at the stale
    /// cadence; staleness alone never resolves anything.
    pub fn is_stale(&self, now_ms: u64, stale_after_ms: u64) -> bool {
        self.emitted.is_none() && now_ms.saturating_sub(self.first_seen_ms) >= stale_after_ms
    }
}

/// What an event did to state; `as_str` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Tracked,
    Updated,
    Removed,
    Ignored,
}

impl Applied {
    pub fn as_str(self) -> &'static str {
        match self {
            Applied::Tracked => "tracked",
            Applied::Updated => "updated",
            Applied::Removed => "removed",
            Applied::Ignored => "ignored",
        }
    }
}

/// Age buckets of pending payments (time since paystream first saw them pending): the label of
/// `paystream_pending_payments_by_age` and the rows of `state stats`, each with its upper bound.
pub const AGE_BUCKETS: [(&str, u64); 5] = [
    ("<10m", 600_000),
    ("10m-1h", 3_600_000),
    ("1h-6h", 21_600_000),
    ("6h-24h", 86_400_000),
    (">=24h", u64::MAX),
];

/// Counts for `state stats` and the metrics: one pass over state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub pending: u64,
    pub awaiting_confirmation: u64,
    /// Pending and due at `now` (overdue included).
    pub due_now: u64,
    /// Pending and due after `now`, within one poll interval.
    pub due_next_interval: u64,
    /// The pending payment first seen longest ago: (id, first_seen_ms).
    pub oldest_pending: Option<(String, u64)>,
    /// Pending payments per [`AGE_BUCKETS`] entry.
    pub by_age: [u64; AGE_BUCKETS.len()],
    /// Pending payments first seen at least the stale age ago ([`Entry::is_stale`]).
    pub stale: u64,
    /// Pending payments flagged for a person ([`Entry::flag`]).
    pub flagged: u64,
    /// Pending payments with at least one declined attempt.
    pub declined: u64,
}

/// The result of one checkpoint: the offsets now durable, to commit to the group.
#[derive(Debug, Default)]
pub struct Checkpoint {
    pub offsets: Vec<(String, i32, i64)>,
}

/// A change a checkpoint writes: id, partition, the new entry with its JSON (`None`: removed).
type Kept<'a> = (&'a str, i32, Option<(&'a Entry, Vec<u8>)>);

/// What [`Store::write_changes`] wrote.
struct Written<'a> {
    count: u64,
    added: Vec<&'a str>,
    removed: Vec<&'a str>,
    offsets: Vec<(String, i32, i64)>,
}

/// What a checkpoint hands the state changelog: the changes of the partitions it logs, and
/// the CDC topic's next offsets for them.
pub struct LogBatch<'a> {
    /// (CDC partition, payment id, the entry's JSON; `None`: removed).
    pub records: Vec<(i32, &'a str, Option<&'a [u8]>)>,
    /// (CDC partition, next offset to read).
    pub offsets: Vec<(i32, i64)>,
}

/// Where checkpoints copy state changes before the tree has them: the state changelog of
/// scale-out ([`changelog`]; the Kafka side is `scaleout`).
pub trait ChangeLog: Sync {
    /// The CDC topic whose offsets the log carries.
    fn cdc_topic(&self) -> &str;
    /// Whether this instance logs `partition` (it owns it).
    fn logs(&self, partition: i32) -> bool;
    /// Writes the batch and waits until the broker acked all of it. Returns each partition's
    /// next changelog offset after the records written.
    fn write(&self, batch: &LogBatch<'_>) -> Result<Vec<(i32, i64)>, changelog::LogError>;
}

/// Drops one count of `id` from the durable id hashes.
fn forget_id(ids: &mut HashMap<u64, u32>, id: &str) {
    let h = id_hash(id);
    if let Some(n) = ids.get_mut(&h) {
        *n -= 1;
        if *n == 0 {
            ids.remove(&h);
        }
    }
}

type Changes = HashMap<String, Option<Entry>>;

#[derive(Default)]
struct Overlay {
    /// `None`: removed since the last checkpoint.
    entries: Changes,
    /// The changes a checkpoint in progress is writing: still visible to readers (under
    /// `entries`, which is newer) until the tree has them.
    frozen: Option<Arc<Changes>>,
    offsets: BTreeMap<(String, i32), i64>,
    /// How many entries the tree holds after the last checkpoint (`m\0entries`).
    durable_entries: u64,
    /// Hashes of the ids the tree holds, counted (two ids may share a hash): an id whose hash
    /// is not here is not in the tree, so a new payment costs no tree lookup. About 20 bytes
    /// per entry in state. `None` until the recovery check has counted them: any id may then
    /// be in the tree.
    durable_ids: Option<HashMap<u64, u32>>,
}

impl Overlay {
    /// The newest change for `id` not yet in the tree: `Some(None)` if removed.
    fn change(&self, id: &str) -> Option<&Option<Entry>> {
        self.entries
            .get(id)
            .or_else(|| self.frozen.as_ref().and_then(|f| f.get(id)))
    }

    fn maybe_durable(&self, id: &str) -> bool {
        self.durable_ids
            .as_ref()
            .is_none_or(|ids| ids.contains_key(&id_hash(id)))
    }
}

/// Records a partition's next offset; allocates the topic's name only the first time.
fn set_offset(offsets: &mut BTreeMap<(String, i32), i64>, topic: &str, partition: i32, next: i64) {
    match offsets
        .iter_mut()
        .find(|((t, p), _)| *p == partition && t == topic)
    {
        Some((_, o)) => *o = next,
        None => {
            offsets.insert((topic.to_string(), partition), next);
        }
    }
}

/// A hash that is the same in every process (std's default hasher with fixed keys).
fn stable_hash(x: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(x)
}

fn id_hash(id: &str) -> u64 {
    stable_hash(id)
}

/// The fields of a stored entry that the layout's invariants name, read without parsing the
/// rest (the recovery check and checkpoints need no more).
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    next_poll_ms: u64,
    emitted: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    partition: i32,
}

impl Head<'_> {
    /// Its place in the due index: `None` once its status was emitted.
    fn due(&self) -> Option<u64> {
        self.emitted.is_none().then_some(self.next_poll_ms)
    }
}

pub struct Store {
    db: sled::Db,
    path: String,
    overlay: Mutex<Overlay>,
    /// One checkpoint at a time (the checkpoint loop and a rebalance's revoke may race): the
    /// tree's entries change only under it, so a checkpoint reads them without the overlay lock.
    checkpointing: Mutex<()>,
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

fn o_key(topic: &str, partition: i32) -> Vec<u8> {
    [O, topic.as_bytes(), b"\0", &partition.to_be_bytes()].concat()
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
            sled::Config::new()
                .path(dir)
                .cache_capacity(SLED_CACHE_BYTES)
                .open()
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
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(StateError::Locked { path })
            }
            Err(e) => return Err(io(e)),
        };
        let fresh = match db.get(META_FORMAT).map_err(io)? {
            Some(v) if v.as_ref() == FORMAT => false,
            Some(v) => {
                return Err(StateError::Format {
                    path,
                    found: String::from_utf8_lossy(&v).into(),
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
            db.apply_batch(b).map_err(io)?;
            db.flush().map_err(io)?;
        }
        let store = Store {
            db,
            path,
            overlay: Mutex::new(Overlay::default()),
            checkpointing: Mutex::new(()),
        };
        // The count the last checkpoint left; the recovery check confirms it.
        let entries = store.meta_u64(META_ENTRIES)?.unwrap_or(0);
        store.overlay.lock().expect("state lock").durable_entries = entries;
        tracing::debug!(
            entries,
            open_ms = started.elapsed().as_millis() as u64,
            "state store opened"
        );
        Ok(store)
    }

    /// The recovery check (see the module doc); on success it also counts the ids the tree
    /// holds, so new payments skip tree lookups from then on.
    ///
    /// Concurrency: it holds the checkpoint lock for the whole scan, so no checkpoint changes
    /// the tree under it and the ids it counts are exactly the tree's when it ends. Events and
    /// polls go on meanwhile, into the overlay; they become durable at the first checkpoint
    /// after the check.
    pub fn check(&self) -> Result<(), StateError> {
        let _one = self.checkpointing.lock().expect("checkpoint lock");
        let started = std::time::Instant::now();
        let (n, ids) = self.verify()?;
        let mut ov = self.overlay.lock().expect("state lock");
        ov.durable_entries = n;
        ov.durable_ids = Some(ids);
        drop(ov);
        tracing::info!(
            entries = n,
            check_ms = started.elapsed().as_millis() as u64,
            "state store passed its recovery check"
        );
        Ok(())
    }

    /// The recovery check (see the module doc). Returns the number of entries and their id
    /// hashes.
    ///
    /// One streaming pass, in constant memory beyond the id hashes: the due index and the
    /// pending entries must hold the same (id, due) pairs, compared as a count and a sum of
    /// their hashes; every entry must be JSON holding its own id; the count must match the last
    /// checkpoint's. Only when that fails does [`Store::verify_detailed`] run, to name the
    /// problems. Entries are parsed for the fields the layout's invariants name; a value of a
    /// wrong type elsewhere in an entry is found when the entry is read (a `Corrupt` error).
    fn verify(&self) -> Result<(u64, HashMap<u64, u32>), StateError> {
        let pair = |id: &[u8], due: u64| stable_hash((id, due));
        let (mut indexed, mut indexed_sum) = (0u64, 0u64);
        let mut ok = true;
        for kv in self.db.scan_prefix(D) {
            let (k, _) = kv.map_err(|e| self.io(e))?;
            let Some(due) = k.get(D.len()..D.len() + 8) else {
                ok = false;
                break;
            };
            let due = u64::from_be_bytes(due.try_into().expect("8 bytes"));
            indexed += 1;
            indexed_sum = indexed_sum.wrapping_add(pair(&k[D.len() + 8..], due));
        }
        let (mut entries, mut pending, mut pending_sum) = (0u64, 0u64, 0u64);
        let mut ids: HashMap<u64, u32> = HashMap::new();
        for kv in self.db.scan_prefix(P) {
            if !ok {
                break;
            }
            let (k, v) = kv.map_err(|e| self.io(e))?;
            entries += 1;
            let id = &k[P.len()..];
            match serde_json::from_slice::<Head>(&v) {
                Ok(h) if h.id.as_bytes() == id => {
                    if let Some(due) = h.due() {
                        pending += 1;
                        pending_sum = pending_sum.wrapping_add(pair(id, due));
                    }
                    *ids.entry(id_hash(&h.id)).or_default() += 1;
                }
                _ => ok = false,
            }
        }
        ok = ok
            && indexed == pending
            && indexed_sum == pending_sum
            && self.meta_u64(META_ENTRIES)? == Some(entries);
        for kv in self.db.scan_prefix(O) {
            let (k, v) = kv.map_err(|e| self.io(e))?;
            ok = ok && v.len() == 8 && k.len() >= O.len() + 5;
        }
        if ok {
            return Ok((entries, ids));
        }
        self.verify_detailed()
    }

    /// The recovery check entry by entry, naming each problem (see [`Store::verify`]).
    fn verify_detailed(&self) -> Result<(u64, HashMap<u64, u32>), StateError> {
        let mut problems = Vec::new();
        let mut indexed: HashMap<String, u64> = HashMap::new();
        for kv in self.db.scan_prefix(D) {
            let (k, _) = kv.map_err(|e| self.io(e))?;
            let Some(due) = k.get(D.len()..D.len() + 8) else {
                problems.push(format!(
                    "short due-index key {:?}",
                    String::from_utf8_lossy(&k)
                ));
                continue;
            };
            let due = u64::from_be_bytes(due.try_into().expect("8 bytes"));
            let id = String::from_utf8_lossy(&k[D.len() + 8..]).into_owned();
            if indexed.insert(id.clone(), due).is_some() {
                problems.push(format!("payment {id} is in the due index twice"));
            }
        }
        let mut entries = 0u64;
        let mut ids: HashMap<u64, u32> = HashMap::new();
        for kv in self.db.scan_prefix(P) {
            let (k, v) = kv.map_err(|e| self.io(e))?;
            entries += 1;
            let id = String::from_utf8_lossy(&k[P.len()..]).into_owned();
            *ids.entry(id_hash(&id)).or_default() += 1;
            let e: Entry = match serde_json::from_slice(&v) {
                Ok(e) => e,
                Err(err) => {
                    problems.push(format!("entry {id} does not parse: {err}"));
                    continue;
                }
            };
            if e.id != id {
                problems.push(format!("entry under {id} holds payment {}", e.id));
            }
            match (e.emitted.is_none(), indexed.remove(&id)) {
                (true, Some(due)) if due == e.next_poll_ms => {}
                (true, Some(due)) => problems.push(format!(
                    "payment {id} is indexed due at {due} but due at {}",
                    e.next_poll_ms
                )),
                (true, None) => {
                    problems.push(format!("pending payment {id} is not in the due index"))
                }
                (false, Some(_)) => {
                    problems.push(format!("emitted payment {id} is still in the due index"))
                }
                (false, None) => {}
            }
        }
        for id in indexed.keys() {
            problems.push(format!("due index names payment {id}, which has no entry"));
        }
        match self.db.get(META_ENTRIES).map_err(|e| self.io(e))? {
            Some(v) if v.len() == 8 => {
                let want = u64::from_be_bytes(v.as_ref().try_into().expect("8 bytes"));
                if want != entries {
                    problems.push(format!(
                        "the last checkpoint left {want} entries, the store holds {entries}"
                    ));
                }
            }
            _ => problems.push("the entry count is missing".into()),
        }
        for kv in self.db.scan_prefix(O) {
            let (k, v) = kv.map_err(|e| self.io(e))?;
            if v.len() != 8 || k.len() < O.len() + 5 {
                problems.push(format!(
                    "malformed offset record {:?}",
                    String::from_utf8_lossy(&k)
                ));
            }
        }
        if problems.is_empty() {
            return Ok((entries, ids));
        }
        let count = problems.len();
        problems.truncate(PROBLEMS_SHOWN);
        Err(StateError::Inconsistent {
            path: self.path.clone(),
            count,
            problems,
        })
    }

    fn io(&self, source: sled::Error) -> StateError {
        StateError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn read_durable(&self, id: &str) -> Result<Option<Entry>, StateError> {
        let Some(bytes) = self.db.get(p_key(id)).map_err(|e| self.io(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                key: id.to_string(),
                detail: e.to_string(),
            })
    }

    fn get_in(&self, ov: &Overlay, id: &str) -> Result<Option<Entry>, StateError> {
        match ov.change(id) {
            Some(e) => Ok(e.clone()),
            None if ov.maybe_durable(id) => self.read_durable(id),
            None => Ok(None),
        }
    }

    /// Whether `id` is in state (overlay or tree), without reading its entry from the overlay.
    fn exists_in(&self, ov: &Overlay, id: &str) -> Result<bool, StateError> {
        match ov.change(id) {
            Some(e) => Ok(e.is_some()),
            None if ov.maybe_durable(id) => {
                Ok(self.db.contains_key(p_key(id)).map_err(|e| self.io(e))?)
            }
            None => Ok(false),
        }
    }

    /// The current entry, including changes not yet checkpointed.
    pub fn get(&self, id: &str) -> Result<Option<Entry>, StateError> {
        let ov = self.overlay.lock().expect("state lock");
        self.get_in(&ov, id)
    }

    /// The next offset stored for a partition by the last durable checkpoint.
    pub fn stored_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StateError> {
        let v = self
            .db
            .get(o_key(topic, partition))
            .map_err(|e| self.io(e))?;
        Ok(v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(i64::from_be_bytes))
    }

    /// All stored offsets (durable), as `(topic, partition, next_offset)`.
    pub fn stored_offsets(&self) -> Result<Vec<(String, i32, i64)>, StateError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(O) {
            let (k, v) = kv.map_err(|e| self.io(e))?;
            // `<topic>\0<partition: 4 bytes>`: the partition's bytes may hold NULs themselves,
            // so split by length, not by searching for the separator.
            let rest = &k[O.len()..];
            if rest.len() < 5 {
                continue;
            }
            let (topic, part) = (&rest[..rest.len() - 5], &rest[rest.len() - 4..]);
            if let (Ok(p), Ok(o)) = (<[u8; 4]>::try_from(part), <[u8; 8]>::try_from(v.as_ref())) {
                out.push((
                    String::from_utf8_lossy(topic).into(),
                    i32::from_be_bytes(p),
                    i64::from_be_bytes(o),
                ));
            }
        }
        Ok(out)
    }

    /// The next changelog offset this store has seen for a CDC partition (see the layout).
    pub fn log_position(&self, partition: i32) -> Result<Option<i64>, StateError> {
        let v = self.db.get(c_key(partition)).map_err(|e| self.io(e))?;
        Ok(v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(i64::from_be_bytes))
    }

    /// The CDC partitions of `topic` this store holds anything of: a stored offset or a
    /// changelog position.
    pub fn local_partitions(&self, topic: &str) -> Result<Vec<i32>, StateError> {
        let mut out: std::collections::BTreeSet<i32> = self
            .stored_offsets()?
            .into_iter()
            .filter(|(t, _, _)| t == topic)
            .map(|(_, p, _)| p)
            .collect();
        for kv in self.db.scan_prefix(C) {
            let (k, _) = kv.map_err(|e| self.io(e))?;
            if let Ok(p) = <[u8; 4]>::try_from(&k[C.len()..]) {
                out.insert(i32::from_be_bytes(p));
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Replaces everything this store holds of CDC partition `partition` of `topic` (its
    /// entries, including changes not yet checkpointed, its stored offset and its changelog
    /// position) with what was restored from the changelog, in one atomic batch, flushed.
    /// With nothing restored it is an eviction.
    ///
    /// Concurrency: under the checkpoint lock, so no checkpoint writes the partition's old
    /// entries back after they were dropped. The caller does not own the partition meanwhile,
    /// so no event or poll changes its entries.
    pub fn replace_partition(
        &self,
        topic: &str,
        partition: i32,
        restored: &changelog::Restored,
    ) -> Result<(), StateError> {
        let _one = self.checkpointing.lock().expect("checkpoint lock");
        if self
            .overlay
            .lock()
            .expect("state lock")
            .durable_ids
            .is_none()
        {
            return Err(StateError::Unchecked {
                path: self.path.clone(),
            });
        }
        let mut batch = sled::Batch::default();
        let mut count = self.overlay.lock().expect("state lock").durable_entries;
        let (mut dropped, mut added) = (Vec::new(), Vec::new());
        let mut evicted = std::collections::HashSet::new();
        for kv in self.db.scan_prefix(P) {
            let (k, v) = kv.map_err(|e| self.io(e))?;
            let h: Head = serde_json::from_slice(&v).map_err(|e| StateError::Corrupt {
                key: String::from_utf8_lossy(&k[P.len()..]).into(),
                detail: e.to_string(),
            })?;
            if h.partition != partition {
                continue;
            }
            batch.remove(&k);
            if let Some(due) = h.due() {
                batch.remove(d_key(due, &h.id));
            }
            count -= 1;
            evicted.insert(h.id.to_string());
        }
        for (id, json) in &restored.entries {
            let h: Head = serde_json::from_slice(json).map_err(|e| StateError::Corrupt {
                key: format!("changelog record {id}"),
                detail: e.to_string(),
            })?;
            if evicted.remove(id.as_str()) {
                count += 1;
            } else {
                // Held under another partition (its key moved): replaced, counted once.
                match self.read_head(id)? {
                    Some((_, old_due)) => {
                        if let Some(due) = old_due {
                            batch.remove(d_key(due, id));
                        }
                    }
                    None => {
                        count += 1;
                        added.push(id.as_str());
                    }
                }
            }
            batch.insert(p_key(id), json.as_slice());
            if let Some(due) = h.due() {
                batch.insert(d_key(due, id), &[][..]);
            }
        }
        // Evicted ids that were restored again stayed in the tree: only the rest are gone.
        dropped.extend(evicted.iter().map(String::as_str));
        batch.insert(META_ENTRIES, &count.to_be_bytes()[..]);
        match restored.next_offset {
            Some(o) => batch.insert(o_key(topic, partition), &o.to_be_bytes()[..]),
            None => batch.remove(o_key(topic, partition)),
        }
        match restored.log_position {
            Some(o) => batch.insert(c_key(partition), &o.to_be_bytes()[..]),
            None => batch.remove(c_key(partition)),
        }
        self.db.apply_batch(batch).map_err(|e| self.io(e))?;
        self.db.flush().map_err(|e| self.io(e))?;
        let mut ov = self.overlay.lock().expect("state lock");
        if let Some(ids) = ov.durable_ids.as_mut() {
            for id in &added {
                *ids.entry(id_hash(id)).or_default() += 1;
            }
            for id in &dropped {
                forget_id(ids, id);
            }
        }
        ov.durable_entries = count;
        // The overlay's changes of the partition are older than what was restored (or belong
        // to the owner that wrote the changelog): the tree's copy stands.
        ov.entries.retain(|id, c| match c {
            Some(e) => e.partition != partition && !restored.entries.contains_key(id),
            None => !evicted.contains(id.as_str()) && !restored.entries.contains_key(id),
        });
        ov.offsets
            .retain(|(t, p), _| !(t == topic && *p == partition));
        Ok(())
    }

    /// Marks every entry of `partition` changed, so the next checkpoint logs all of them:
    /// state built before this store ever logged the partition (an upgrade, a `replay`)
    /// enters an empty changelog. Returns how many entries.
    pub fn adopt_partition(&self, partition: i32) -> Result<usize, StateError> {
        let _one = self.checkpointing.lock().expect("checkpoint lock");
        let mut n = 0;
        for kv in self.db.scan_prefix(P) {
            let (k, v) = kv.map_err(|e| self.io(e))?;
            let id = String::from_utf8_lossy(&k[P.len()..]).into_owned();
            let e: Entry = serde_json::from_slice(&v).map_err(|err| StateError::Corrupt {
                key: id.clone(),
                detail: err.to_string(),
            })?;
            if e.partition != partition {
                continue;
            }
            let mut ov = self.overlay.lock().expect("state lock");
            if let std::collections::hash_map::Entry::Vacant(slot) = ov.entries.entry(id) {
                slot.insert(Some(e));
                n += 1;
            }
        }
        Ok(n)
    }

    /// Applies one decoded CDC event and records `next_offset` for its partition in the same
    /// overlay, so both reach disk in the same checkpoint.
    ///
    /// `key_id` is the payment id from the message key (needed for tombstones).
    #[allow(clippy::too_many_arguments)]
    pub fn apply_event(
        &self,
        ev: &ChangeEvent,
        key_id: Option<&str>,
        source: (&str, i32, i64),
        now_ms: u64,
        poll_interval_ms: u64,
        pending_status: &str,
    ) -> Result<Applied, StateError> {
        let (topic, partition, next_offset) = source;
        let mut ov = self.overlay.lock().expect("state lock");
        let applied = match (ev.op, &ev.payment) {
            (Op::Create | Op::Read | Op::Update, Some(p)) => match &p.status {
                Col::Set(s) if s == pending_status => self.upsert_pending(
                    &mut ov,
                    ev,
                    p,
                    (partition, next_offset - 1),
                    now_ms,
                    poll_interval_ms,
                )?,
                // Any other status is final in the database: nothing left to watch.
                Col::Set(_) => self.remove_in(&mut ov, &p.id)?,
                // Status not carried (TOAST): refresh what we hold, never start tracking.
                Col::Unknown => match self.get_in(&ov, &p.id)? {
                    Some(_) => self.upsert_pending(
                        &mut ov,
                        ev,
                        p,
                        (partition, next_offset - 1),
                        now_ms,
                        poll_interval_ms,
                    )?,
                    None => Applied::Ignored,
                },
            },
            (Op::Delete, Some(p)) => self.remove_in(&mut ov, &p.id)?,
            (Op::Tombstone, _) => match key_id {
                Some(id) => self.remove_in(&mut ov, id)?,
                None => Applied::Ignored,
            },
            // The table was emptied: every row, pending or not, is gone.
            // Known gap: with several CDC partitions the truncate record lands on one partition
            // only, but this clears all payments this instance holds; with scale-out (several
            // instances) others keep theirs until their rows' events arrive.
            (Op::Truncate, _) => {
                let mut ids = std::collections::BTreeSet::new();
                for kv in self.db.scan_prefix(P) {
                    let (k, _) = kv.map_err(|e| self.io(e))?;
                    ids.insert(String::from_utf8_lossy(&k[P.len()..]).into_owned());
                }
                for changes in ov.frozen.iter().map(|f| f.as_ref()).chain([&ov.entries]) {
                    ids.extend(changes.keys().cloned());
                }
                let mut n = 0;
                for id in ids {
                    n += usize::from(self.remove_in(&mut ov, &id)? == Applied::Removed);
                }
                if n > 0 {
                    Applied::Removed
                } else {
                    Applied::Ignored
                }
            }
            _ => Applied::Ignored,
        };
        set_offset(&mut ov.offsets, topic, partition, next_offset);
        Ok(applied)
    }

    /// Records the next offset for a message that changed no state (ignored or dead-lettered),
    /// so it is not read again after a restart.
    pub fn advance_offset(&self, topic: &str, partition: i32, next_offset: i64) {
        let mut ov = self.overlay.lock().expect("state lock");
        set_offset(&mut ov.offsets, topic, partition, next_offset);
    }

    fn upsert_pending(
        &self,
        ov: &mut Overlay,
        ev: &ChangeEvent,
        p: &Payment,
        (partition, offset): (i32, i64),
        now_ms: u64,
        poll_interval_ms: u64,
    ) -> Result<Applied, StateError> {
        // Updated in place when the overlay already holds it (most events of a payment arrive
        // close together); otherwise brought in from the last checkpoint, or new.
        let applied = if let Some(Some(_)) = ov.entries.get(&p.id) {
            Applied::Updated
        } else {
            let existing = self.get_in(ov, &p.id)?;
            let applied = if existing.is_some() {
                Applied::Updated
            } else {
                Applied::Tracked
            };
            let e = existing.unwrap_or_else(|| Entry {
                id: p.id.clone(),
                idempotency_key: String::new(),
                amount: String::new(),
                currency: String::new(),
                stripe_payment_intent_id: None,
                created_at: None,
                updated_at: None,
                partition,
                first_seen_ms: now_ms,
                // First poll one interval after the payment was first seen pending.
                next_poll_ms: now_ms + poll_interval_ms,
                failures: 0,
                polls: 0,
                history: Vec::new(),
                last_cdc: None,
                emitted: None,
                declines: None,
                flag: None,
                account: None,
            });
            ov.entries.insert(p.id.clone(), Some(e));
            applied
        };
        let Some(Some(e)) = ov.entries.get_mut(&p.id) else {
            unreachable!("inserted above")
        };
        // Only columns the event carries overwrite what we hold (TOAST: the old value stands).
        let set = |to: &mut String, col: &Col<String>| {
            if let Col::Set(v) = col {
                to.clone_from(v)
            }
        };
        set(&mut e.idempotency_key, &p.idempotency_key);
        set(&mut e.amount, &p.amount);
        set(&mut e.currency, &p.currency);
        let set = |to: &mut Option<String>, col: &Col<Option<String>>| {
            if let Col::Set(v) = col {
                to.clone_from(v)
            }
        };
        set(&mut e.stripe_payment_intent_id, &p.stripe_payment_intent_id);
        set(&mut e.created_at, &p.created_at);
        set(&mut e.updated_at, &p.updated_at);
        set(&mut e.account, &p.account);
        e.partition = partition;
        e.last_cdc = Some(CdcSeen {
            op: ev.op.as_str().to_string(),
            partition,
            offset,
            lsn: ev.source.lsn,
            source_ts_ms: ev.source.ts_ms,
            seen_ms: now_ms,
        });
        Ok(applied)
    }

    fn remove_in(&self, ov: &mut Overlay, id: &str) -> Result<Applied, StateError> {
        if !self.exists_in(ov, id)? {
            return Ok(Applied::Ignored);
        }
        let in_frozen = ov.frozen.as_ref().is_some_and(|f| f.contains_key(id));
        if in_frozen || ov.maybe_durable(id) {
            // The tree has it, or will once the checkpoint in progress is written.
            ov.entries.insert(id.to_string(), None);
        } else {
            // Created and gone since the last checkpoint: the tree never needs to hear of it.
            ov.entries.remove(id);
        }
        Ok(Applied::Removed)
    }

    /// Changes an entry if it is still there (a poll result must never resurrect a payment the
    /// CDC stream removed meanwhile). Returns whether it was there.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) -> Result<bool, StateError> {
        let mut ov = self.overlay.lock().expect("state lock");
        if let Some(Some(e)) = ov.entries.get_mut(id) {
            f(e);
            return Ok(true);
        }
        let Some(mut e) = self.get_in(&ov, id)? else {
            return Ok(false);
        };
        f(&mut e);
        ov.entries.insert(id.to_string(), Some(e));
        Ok(true)
    }

    /// Up to `limit` entries due at `now_ms`, most overdue first, skipping ids `skip` rejects
    /// (polls in flight).
    ///
    /// The index reflects the last checkpoint; each candidate is checked against the current
    /// entry, so a stale index row is skipped and a poll fires at most one checkpoint interval
    /// late, never twice.
    ///
    /// Entries of partitions `owns` rejects are skipped too: another instance polls them.
    pub fn due(
        &self,
        now_ms: u64,
        limit: usize,
        skip: impl Fn(&str) -> bool,
        owns: impl Fn(i32) -> bool,
    ) -> Result<Vec<Entry>, StateError> {
        let end = d_key(now_ms.saturating_add(1), "");
        let mut out = Vec::new();
        for kv in self.db.range(D.to_vec()..end) {
            if out.len() >= limit {
                break;
            }
            let (k, _) = kv.map_err(|e| self.io(e))?;
            let id = String::from_utf8_lossy(&k[D.len() + 8..]).into_owned();
            if skip(&id) {
                continue;
            }
            if let Some(e) = self.get(&id)? {
                if e.emitted.is_none() && e.next_poll_ms <= now_ms && owns(e.partition) {
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    /// How many polls the due index holds at or before `now_ms` (as of the last checkpoint):
    /// the overdue count when the poller is behind. Reads keys only.
    pub fn count_due(&self, now_ms: u64) -> Result<u64, StateError> {
        let end = d_key(now_ms.saturating_add(1), "");
        let mut n = 0;
        for kv in self.db.range(D.to_vec()..end) {
            kv.map_err(|e| self.io(e))?;
            n += 1;
        }
        Ok(n)
    }

    /// After a restart, polls that fell due while the daemon was down are rescheduled evenly over
    /// `window_ms(count)` (at most one interval, chosen by the caller from the rate budget), most
    /// overdue first, so they never fire at once. Returns how many were moved.
    pub fn spread_overdue(
        &self,
        now_ms: u64,
        window_ms: impl Fn(usize) -> u64,
    ) -> Result<usize, StateError> {
        let ids: Vec<String> = self
            .due(now_ms, usize::MAX, |_| false, |_| true)?
            .into_iter()
            .map(|e| e.id)
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let window = window_ms(ids.len());
        let n = ids.len() as u64;
        for (i, id) in ids.iter().enumerate() {
            let at = now_ms + window * i as u64 / n;
            self.update(id, |e| e.next_poll_ms = at)?;
        }
        Ok(ids.len())
    }

    /// Polls scheduled later than `now_ms + window_ms` (the events feed's fallback interval,
    /// while the feed is down) are moved into the next `window_ms`, spread evenly in due order,
    /// so the poll interval applies again without a burst. Emitted entries are left alone.
    /// Returns how many moved. One scan of the due index.
    pub fn pull_in(&self, now_ms: u64, window_ms: u64) -> Result<usize, StateError> {
        let start = d_key(now_ms.saturating_add(window_ms).saturating_add(1), "");
        let mut ids = Vec::new();
        for kv in self.db.range(start..d_key(u64::MAX, "")) {
            let (k, _) = kv.map_err(|e| self.io(e))?;
            ids.push(String::from_utf8_lossy(&k[D.len() + 8..]).into_owned());
        }
        let n = ids.len() as u64;
        for (i, id) in ids.iter().enumerate() {
            let at = now_ms + window_ms * i as u64 / n.max(1);
            self.update(id, |e| {
                if e.emitted.is_none() && e.next_poll_ms > at {
                    e.next_poll_ms = at;
                }
            })?;
        }
        Ok(ids.len())
    }

    /// Writes the overlay and its offsets in one atomic batch, then flushes. Blocking (disk I/O):
    /// call it from a blocking context.
    pub fn checkpoint(&self) -> Result<Checkpoint, StateError> {
        self.checkpoint_with(|| {})
    }

    /// [`Store::checkpoint`], calling `before_flush` between the batch write and the flush: the
    /// seam the durability test kills the process at.
    ///
    /// Concurrency: the overlay's changes are frozen under the lock (a swap, no copy) and
    /// written without it, so the pipeline keeps applying events into a fresh overlay while
    /// the batch is built and applied. Readers see frozen changes until the tree has them.
    pub fn checkpoint_with(&self, before_flush: impl FnOnce()) -> Result<Checkpoint, StateError> {
        self.checkpoint_logged(None, before_flush)
    }

    /// [`Store::checkpoint_with`], writing the changes to `log` (the state changelog, see
    /// [`changelog`]) before the tree: the broker has acked them before sled holds them, so
    /// local state is never ahead of the changelog, and the changelog's next offsets enter
    /// the tree in the same batch as the entries. With a log, changes and CDC offsets of
    /// partitions it does not log (this instance no longer owns them) are dropped: their new
    /// owner restored them from the changelog and applies the CDC events itself.
    pub fn checkpoint_logged(
        &self,
        log: Option<&dyn ChangeLog>,
        before_flush: impl FnOnce(),
    ) -> Result<Checkpoint, StateError> {
        let _one = self.checkpointing.lock().expect("checkpoint lock");
        let (changes, offsets, count) = {
            let mut ov = self.overlay.lock().expect("state lock");
            // Nothing is written to a store that has not passed its recovery check (the ids
            // are counted only once it has).
            if ov.durable_ids.is_none() {
                return Err(StateError::Unchecked {
                    path: self.path.clone(),
                });
            }
            if ov.entries.is_empty() && ov.offsets.is_empty() {
                return Ok(Checkpoint::default());
            }
            let changes = Arc::new(std::mem::take(&mut ov.entries));
            ov.frozen = Some(changes.clone());
            (changes, std::mem::take(&mut ov.offsets), ov.durable_entries)
        };
        // Which changed ids the tree may hold: only those need reading below. The id hashes
        // change only in checkpoints, which `_one` keeps to one at a time.
        let in_tree: std::collections::HashSet<&str> = {
            let ov = self.overlay.lock().expect("state lock");
            changes
                .keys()
                .filter(|id| ov.maybe_durable(id))
                .map(String::as_str)
                .collect()
        };
        match self.write_changes(&changes, &offsets, count, &in_tree, log) {
            Ok(written) => {
                let mut ov = self.overlay.lock().expect("state lock");
                if let Some(ids) = ov.durable_ids.as_mut() {
                    for id in &written.added {
                        *ids.entry(id_hash(id)).or_default() += 1;
                    }
                    for id in &written.removed {
                        forget_id(ids, id);
                    }
                }
                ov.durable_entries = written.count;
                ov.frozen = None;
                drop(ov);
                before_flush();
                // Durable only from here: callers commit offsets to Kafka after this returns.
                self.db.flush().map_err(|e| self.io(e))?;
                Ok(Checkpoint {
                    offsets: written.offsets,
                })
            }
            Err(e) => {
                // Nothing was written to the tree: the frozen changes go back under the newer
                // ones, so a later checkpoint (after the disk or the broker is back) still
                // writes them.
                let mut ov = self.overlay.lock().expect("state lock");
                ov.frozen = None;
                for (id, c) in changes.iter() {
                    ov.entries.entry(id.clone()).or_insert_with(|| c.clone());
                }
                for (k, off) in offsets {
                    ov.offsets.entry(k).or_insert(off);
                }
                Err(e)
            }
        }
    }

    /// Applies `changes` and `offsets` to the tree in one batch, after writing them to `log`
    /// if there is one. Returns the new entry count, the ids added to and removed from the
    /// tree, and the offsets written.
    fn write_changes<'a>(
        &self,
        changes: &'a Changes,
        offsets: &BTreeMap<(String, i32), i64>,
        mut count: u64,
        in_tree: &std::collections::HashSet<&str>,
        log: Option<&dyn ChangeLog>,
    ) -> Result<Written<'a>, StateError> {
        // What the tree holds of each changed id: (partition, due), due `None` once emitted.
        let mut old: HashMap<&str, (i32, Option<u64>)> = HashMap::new();
        for id in in_tree {
            if let Some(h) = self.read_head(id)? {
                old.insert(id, h);
            }
        }
        // Each change with its partition and its new JSON, serialized once for the changelog
        // and the tree. A removal of an id the tree never held needs no record at all.
        let mut kept: Vec<Kept<'a>> = Vec::new();
        for (id, new) in changes {
            let partition = match (new, old.get(id.as_str())) {
                (Some(e), _) => e.partition,
                (None, Some((p, _))) => *p,
                (None, None) => continue,
            };
            if log.is_some_and(|l| !l.logs(partition)) {
                continue;
            }
            let new = new
                .as_ref()
                .map(|e| (e, serde_json::to_vec(e).expect("entry serializes")));
            kept.push((id.as_str(), partition, new));
        }
        let offsets: Vec<(String, i32, i64)> = offsets
            .iter()
            .filter(|((t, p), _)| log.is_none_or(|l| t != l.cdc_topic() || l.logs(*p)))
            .map(|((t, p), o)| (t.clone(), *p, *o))
            .collect();
        let mut batch = sled::Batch::default();
        if let Some(log) = log {
            let records = kept
                .iter()
                .map(|(id, p, new)| (*p, *id, new.as_ref().map(|(_, j)| j.as_slice())))
                .collect();
            let cdc_offsets = offsets
                .iter()
                .filter(|(t, _, _)| t == log.cdc_topic())
                .map(|(_, p, o)| (*p, *o))
                .collect();
            let positions = log.write(&LogBatch {
                records,
                offsets: cdc_offsets,
            })?;
            for (p, next) in positions {
                batch.insert(c_key(p), &next.to_be_bytes()[..]);
            }
        }
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for (id, _, new) in kept {
            let old = old.get(id).map(|(_, due)| *due);
            if let Some(Some(due)) = old {
                batch.remove(d_key(due, id));
            }
            match new {
                Some((e, json)) => {
                    batch.insert(p_key(id), json);
                    if e.emitted.is_none() {
                        batch.insert(d_key(e.next_poll_ms, id), &[][..]);
                    }
                    if old.is_none() {
                        count += 1;
                        added.push(id);
                    }
                }
                None => {
                    batch.remove(p_key(id));
                    if old.is_some() {
                        count -= 1;
                        removed.push(id);
                    }
                }
            }
        }
        // The count travels in the same batch, so the recovery check can tell a whole
        // checkpoint from a torn one.
        batch.insert(META_ENTRIES, &count.to_be_bytes()[..]);
        batch.insert(
            META_CHECKPOINT_MS,
            &crate::clock::wall_ms().to_be_bytes()[..],
        );
        for (topic, partition, off) in &offsets {
            batch.insert(o_key(topic, *partition), &off.to_be_bytes()[..]);
        }
        self.db.apply_batch(batch).map_err(|e| self.io(e))?;
        Ok(Written {
            count,
            added,
            removed,
            offsets,
        })
    }

    /// Whether the tree holds `id`, and if so its partition and due time (`None` once its
    /// status was emitted): all a checkpoint needs of the old entry, without parsing all of it.
    fn read_head(&self, id: &str) -> Result<Option<(i32, Option<u64>)>, StateError> {
        let Some(bytes) = self.db.get(p_key(id)).map_err(|e| self.io(e))? else {
            return Ok(None);
        };
        let h: Head = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            key: id.to_string(),
            detail: e.to_string(),
        })?;
        Ok(Some((h.partition, h.due())))
    }

    /// Calls `f` with every entry, including changes not yet checkpointed, in id order (bytes),
    /// until `f` returns false. The same order whether the daemon runs or not, so `state export`
    /// gives the same lines from both.
    ///
    /// The overlay is copied first and the lock released, so a scan of a large store never
    /// stalls the pipeline; a checkpoint during the scan moves entries from the copy to the tree
    /// and the scan sees each once, as of the copy or newer.
    pub fn scan(&self, mut f: impl FnMut(Entry) -> bool) -> Result<(), StateError> {
        let overlay: BTreeMap<String, Option<Entry>> = {
            let ov = self.overlay.lock().expect("state lock");
            ov.frozen
                .iter()
                .flat_map(|f| f.iter())
                .chain(ov.entries.iter())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let mut newer = overlay
            .iter()
            .filter_map(|(id, e)| e.as_ref().map(|e| (id, e)))
            .peekable();
        for kv in self.db.scan_prefix(P) {
            let (k, v) = kv.map_err(|e| self.io(e))?;
            let id = String::from_utf8_lossy(&k[P.len()..]).into_owned();
            // Entries new since the checkpoint sort in before this one.
            while let Some((_, e)) = newer.next_if(|(nid, _)| nid.as_str() < id.as_str()) {
                if !f(e.clone()) {
                    return Ok(());
                }
            }
            let e = match overlay.get(&id) {
                Some(None) => continue,
                Some(Some(_)) => match newer.next() {
                    Some((_, e)) => e.clone(),
                    None => continue,
                },
                None => serde_json::from_slice(&v).map_err(|err| StateError::Corrupt {
                    key: id.clone(),
                    detail: err.to_string(),
                })?,
            };
            if !f(e) {
                return Ok(());
            }
        }
        for (_, e) in newer {
            if !f(e.clone()) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Every entry, including changes not yet checkpointed, in id order.
    pub fn entries(&self) -> Result<Vec<Entry>, StateError> {
        let mut out = Vec::new();
        self.scan(|e| {
            out.push(e);
            true
        })?;
        Ok(out)
    }

    /// Counts at `now_ms`, for a poll interval of `interval_ms` and a stale age of
    /// `stale_after_ms` (one scan).
    pub fn stats(
        &self,
        now_ms: u64,
        interval_ms: u64,
        stale_after_ms: u64,
    ) -> Result<Stats, StateError> {
        let mut s = Stats::default();
        self.scan(|e| {
            if e.emitted.is_some() {
                s.awaiting_confirmation += 1;
                return true;
            }
            s.pending += 1;
            if e.next_poll_ms <= now_ms {
                s.due_now += 1;
            } else if e.next_poll_ms <= now_ms.saturating_add(interval_ms) {
                s.due_next_interval += 1;
            }
            let age = now_ms.saturating_sub(e.first_seen_ms);
            let bucket = AGE_BUCKETS
                .iter()
                .position(|(_, upper)| age < *upper)
                .unwrap_or(AGE_BUCKETS.len() - 1);
            s.by_age[bucket] += 1;
            s.stale += u64::from(e.is_stale(now_ms, stale_after_ms));
            s.flagged += u64::from(e.flag.is_some());
            s.declined += u64::from(e.declines.is_some());
            if s.oldest_pending
                .as_ref()
                .is_none_or(|(_, t)| e.first_seen_ms < *t)
            {
                s.oldest_pending = Some((e.id, e.first_seen_ms));
            }
            true
        })?;
        Ok(s)
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
    pub fn entry_count(&self) -> u64 {
        self.overlay.lock().expect("state lock").durable_entries
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

/// Sets the state gauges from one pass of [`Store::stats`].
pub fn set_gauges(s: &Stats, now_ms: u64) {
    let m = &*METRICS;
    m.pending_payments.set(s.pending as i64);
    m.awaiting_confirmation.set(s.awaiting_confirmation as i64);
    m.polls_due.set(s.due_now as i64);
    m.stale_payments.set(s.stale as i64);
    m.flagged_payments.set(s.flagged as i64);
    m.declined_payments.set(s.declined as i64);
    for ((age, _), n) in AGE_BUCKETS.iter().zip(s.by_age) {
        m.pending_by_age.with_label_values(&[age]).set(n as i64);
    }
    let oldest = s
        .oldest_pending
        .as_ref()
        .map_or(0, |(_, t)| now_ms.saturating_sub(*t));
    m.oldest_pending_age_seconds.set(oldest as f64 / 1000.0);
}

/// The age-bucket series at 0, before the first stats pass (see
/// [`crate::metrics::init_run_series`]).
pub fn init_series() {
    for (age, _) in AGE_BUCKETS {
        METRICS.pending_by_age.with_label_values(&[age]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode_value, DecodeOptions};

    fn ev(json: &str) -> ChangeEvent {
        decode_value(Some(json.as_bytes()), &DecodeOptions::default()).unwrap()
    }

    /// Applies `ev` as if read at `offset` of partition 0 of topic `t`, pending status "pending".
    fn apply(
        s: &Store,
        ev: &ChangeEvent,
        key: Option<&str>,
        offset: i64,
        now_ms: u64,
        interval_ms: u64,
    ) -> Applied {
        s.apply_event(ev, key, ("t", 0, offset), now_ms, interval_ms, "pending")
            .unwrap()
    }

    fn create(id: &str, status: &str) -> ChangeEvent {
        ev(&format!(
            r#"{{"op":"c","after":{{"id":"{id}","idempotency_key":"k-{id}","amount":"10.00","currency":"usd","status":"{status}","stripe_payment_intent_id":"pi_{id}"}}}}"#
        ))
    }

    #[test]
    fn offsets_and_state_survive_reopen_only_after_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            apply(&s, &create("a", "pending"), None, 1, 1000, 600);
            s.checkpoint().unwrap();
            // Not checkpointed: must be gone after reopen, offset included.
            apply(&s, &create("b", "pending"), None, 2, 1000, 600);
        }
        let s = reopen(dir.path()).unwrap();
        assert_eq!(s.stored_offset("t", 0).unwrap(), Some(1));
        assert_eq!(s.stored_offsets().unwrap(), vec![("t".to_string(), 0, 1)]);
        let ids: Vec<_> = s.entries().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, vec!["a"]);
    }

    #[test]
    fn final_status_and_delete_and_tombstone_remove() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for id in ["a", "b", "c"] {
            assert_eq!(
                apply(&s, &create(id, "pending"), None, 1, 0, 10),
                Applied::Tracked
            );
        }
        s.checkpoint().unwrap();
        assert_eq!(
            apply(&s, &create("a", "succeeded"), None, 2, 0, 10),
            Applied::Removed
        );
        let del = ev(
            r#"{"op":"d","before":{"id":"b","idempotency_key":"","amount":"AA==","currency":"","status":"pending"}}"#,
        );
        assert_eq!(apply(&s, &del, None, 3, 0, 10), Applied::Removed);
        let tomb = decode_value(None, &DecodeOptions::default()).unwrap();
        assert_eq!(apply(&s, &tomb, Some("c"), 4, 0, 10), Applied::Removed);
        assert_eq!(apply(&s, &tomb, Some("c"), 5, 0, 10), Applied::Ignored);
        s.checkpoint().unwrap();
        assert!(s.entries().unwrap().is_empty());
        assert_eq!(
            s.due(u64::MAX - 1, 10, |_| false, |_| true).unwrap(),
            vec![]
        );
        assert_eq!(s.stored_offset("t", 0).unwrap(), Some(5));
    }

    #[test]
    fn due_index_follows_rescheduling_and_emission() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        apply(&s, &create("a", "pending"), None, 1, 0, 100);
        apply(&s, &create("b", "pending"), None, 2, 50, 100);
        s.checkpoint().unwrap();
        assert!(s.due(99, 10, |_| false, |_| true).unwrap().is_empty());
        let due: Vec<_> = s
            .due(160, 10, |_| false, |_| true)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(due, vec!["a", "b"]);
        // Rescheduled in the overlay: skipped at once, even before the index is rewritten.
        s.update("a", |e| e.next_poll_ms = 500).unwrap();
        s.update("b", |e| {
            e.emitted = Some(Emitted {
                status: "succeeded".into(),
                event_id: "x".into(),
                at_ms: 1,
                reason: None,
            })
        })
        .unwrap();
        assert!(s.due(160, 10, |_| false, |_| true).unwrap().is_empty());
        s.checkpoint().unwrap();
        let due: Vec<_> = s
            .due(600, 10, |_| false, |_| true)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(due, vec!["a"], "an emitted payment is not polled again");
        assert_eq!(
            s.stats(600, 100, u64::MAX).unwrap().awaiting_confirmation,
            1
        );
        // A pending-status update keeps the schedule and the emission.
        apply(&s, &create("b", "pending"), None, 3, 700, 100);
        assert!(s.get("b").unwrap().unwrap().emitted.is_some());
    }

    #[test]
    fn overdue_polls_are_spread_not_fired_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for i in 0..100 {
            apply(&s, &create(&format!("p{i:03}"), "pending"), None, i, 0, 10);
        }
        s.checkpoint().unwrap();
        assert_eq!(s.spread_overdue(1000, |n| n as u64 * 10).unwrap(), 100);
        s.checkpoint().unwrap();
        // 100 over a 1000 ms window: ten per 100 ms, never all at once.
        assert_eq!(s.due(1000, 1000, |_| false, |_| true).unwrap().len(), 1);
        assert_eq!(s.due(1099, 1000, |_| false, |_| true).unwrap().len(), 10);
        assert_eq!(s.due(1999, 1000, |_| false, |_| true).unwrap().len(), 100);
    }

    /// Runs `open` until it stops failing on sled's file lock (at most 5 s). Within one process
    /// sled releases the lock from its flusher thread a moment after the last handle drops, so
    /// an immediate reopen can still see it held; a new process never does (the lock dies with
    /// the old one).
    fn retry_locked<T, E: std::fmt::Display>(open: impl Fn() -> Result<T, E>) -> Result<T, E> {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match open() {
                Err(e)
                    if (e.to_string().contains("could not acquire lock")
                        || e.to_string().contains("in use by another process"))
                        && std::time::Instant::now() < end =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => return other,
            }
        }
    }

    /// Opens the store's sled tree directly, as a crash or a sled bug might have left it.
    fn raw(dir: &Path, f: impl FnOnce(&sled::Db)) {
        let db = retry_locked(|| sled::Config::new().path(dir).open()).unwrap();
        f(&db);
        db.flush().unwrap();
    }

    fn reopen(dir: &Path) -> Result<Store, StateError> {
        retry_locked(|| Store::open(dir))
    }

    fn open_err(dir: &Path) -> String {
        match reopen(dir) {
            Ok(_) => panic!("opened a broken store"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn recovery_check_refuses_a_store_that_broke_its_invariants() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            for id in ["a", "b", "c"] {
                apply(&s, &create(id, "pending"), None, 1, 0, 10);
            }
            s.checkpoint().unwrap();
            apply(&s, &create("b", "succeeded"), None, 2, 0, 10);
            s.checkpoint().unwrap();
        }
        // Whole checkpoints reopen fine.
        assert_eq!(reopen(dir.path()).unwrap().entries().unwrap().len(), 2);

        // A lost index row (half of a batch).
        raw(dir.path(), |db| {
            db.remove(d_key(10, "a")).unwrap();
        });
        let e = open_err(dir.path());
        assert!(
            e.contains("pending payment a is not in the due index"),
            "{e}"
        );
        assert!(e.contains("recovery check"), "{e}");
        raw(dir.path(), |db| {
            db.insert(d_key(10, "a"), &[][..]).unwrap();
        });

        // An entry the last checkpoint did not write (count mismatch), fully indexed.
        raw(dir.path(), |db| {
            let mut e: Entry =
                serde_json::from_slice(&db.get(p_key("a")).unwrap().unwrap()).unwrap();
            e.id = "z".into();
            db.insert(p_key("z"), serde_json::to_vec(&e).unwrap())
                .unwrap();
            db.insert(d_key(10, "z"), &[][..]).unwrap();
        });
        let e = open_err(dir.path());
        assert!(
            e.contains("the last checkpoint left 2 entries, the store holds 3"),
            "{e}"
        );
        raw(dir.path(), |db| {
            db.remove(p_key("z")).unwrap();
            db.remove(d_key(10, "z")).unwrap();
        });

        // An unreadable entry, and an index row pointing nowhere.
        raw(dir.path(), |db| {
            db.insert(p_key("c"), &b"{not json"[..]).unwrap();
            db.insert(d_key(5, "ghost"), &[][..]).unwrap();
        });
        let e = open_err(dir.path());
        assert!(e.contains("entry c does not parse"), "{e}");
        assert!(e.contains("ghost, which has no entry"), "{e}");
    }

    #[test]
    fn a_store_without_its_marker_but_with_data_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        raw(dir.path(), |db| {
            db.insert(b"something else", &b"x"[..]).unwrap();
        });
        assert!(open_err(dir.path()).contains("no layout marker"));
    }

    #[test]
    fn a_second_opener_is_told_the_store_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let e = match Store::open(dir.path()) {
            Ok(_) => panic!("opened a store another handle holds"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("in use by another process"), "{e}");
    }

    #[test]
    fn truncate_clears_everything() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        apply(&s, &create("a", "pending"), None, 1, 0, 10);
        s.checkpoint().unwrap();
        apply(&s, &create("b", "pending"), None, 2, 0, 10);
        let t = ev(
            r#"{"op":"t","before":null,"after":null,"source":{"schema":"public","table":"payments"}}"#,
        );
        assert_eq!(apply(&s, &t, None, 3, 0, 10), Applied::Removed);
        s.checkpoint().unwrap();
        assert!(s.entries().unwrap().is_empty());
    }

    #[test]
    fn scans_merge_the_overlay_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for id in ["b", "d", "f"] {
            apply(&s, &create(id, "pending"), None, 1, 0, 10);
        }
        s.checkpoint().unwrap();
        // Not checkpointed: a new first, middle and last entry, one removal, one change.
        for id in ["a", "c", "g"] {
            apply(&s, &create(id, "pending"), None, 2, 0, 10);
        }
        apply(&s, &create("d", "succeeded"), None, 3, 0, 10);
        s.update("f", |e| e.polls = 7).unwrap();
        let seen: Vec<(String, u64)> = s
            .entries()
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.polls))
            .collect();
        let want: Vec<(String, u64)> = [("a", 0), ("b", 0), ("c", 0), ("f", 7), ("g", 0)]
            .map(|(i, p)| (i.to_string(), p))
            .to_vec();
        assert_eq!(seen, want);
        // The same after the checkpoint, when all of it comes from the tree.
        s.checkpoint().unwrap();
        let again: Vec<(String, u64)> = s
            .entries()
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.polls))
            .collect();
        assert_eq!(again, want);
        // A scan stops when told to.
        let mut n = 0;
        s.scan(|_| {
            n += 1;
            n < 2
        })
        .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn stats_count_due_times_and_age_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let h = 3_600_000;
        // First seen at 0, 30 min, 2 h, 10 h, 30 h into a clock read at 30 h; interval 10 min.
        for (i, seen) in [0, h / 2, 2 * h, 10 * h, 30 * h].into_iter().enumerate() {
            apply(
                &s,
                &create(&format!("p{i}"), "pending"),
                None,
                i as i64,
                seen,
                600_000,
            );
        }
        s.update("p1", |e| {
            e.emitted = Some(Emitted {
                status: "failed".into(),
                event_id: "e".into(),
                at_ms: 1,
                reason: Some("card_declined".into()),
            })
        })
        .unwrap();
        let st = s.stats(30 * h, 600_000, 24 * h).unwrap();
        assert_eq!((st.pending, st.awaiting_confirmation), (4, 1));
        // p0, p2, p3 are overdue; p4 is due 10 min after it was seen, within the next interval.
        assert_eq!((st.due_now, st.due_next_interval), (3, 1));
        assert_eq!(
            st.by_age,
            [1, 0, 0, 1, 2],
            "<10m, 10m-1h, 1h-6h, 6h-24h, >=24h"
        );
        assert_eq!(st.oldest_pending, Some(("p0".to_string(), 0)));
        // Seen 24 h ago or more and still pending: p0 and p2 (p1 is emitted).
        assert_eq!(st.stale, 2);
        assert_eq!((st.flagged, st.declined), (0, 0));
    }

    #[test]
    fn poll_history_keeps_the_newest_and_counts_all() {
        let mut e = Store::open(tempfile::tempdir().unwrap().path())
            .map(|s| {
                apply(&s, &create("a", "pending"), None, 1, 0, 10);
                s.get("a").unwrap().unwrap()
            })
            .unwrap();
        for i in 0..(HISTORY_LEN as u64 + 3) {
            e.record_poll(i, "still_pending", Some("processing"));
        }
        assert_eq!(e.polls, HISTORY_LEN as u64 + 3);
        assert_eq!(e.history.len(), HISTORY_LEN);
        assert_eq!(e.history[0].at_ms, 3);
        assert_eq!(e.last_outcome(), Some("still_pending"));
        let c = e.last_cdc.as_ref().unwrap();
        assert_eq!((c.op.as_str(), c.offset), ("c", 0));
    }

    /// An entry as builds before poll history wrote it (layout 1): still read, its dropped
    /// field ignored, its new fields defaulted. Upgrades within a layout need no migration.
    #[test]
    fn entries_written_by_an_older_build_still_read() {
        let old = r#"{"id":"7","idempotency_key":"k","amount":"1.00","currency":"usd",
            "stripe_payment_intent_id":"pi_7","created_at":null,"partition":0,
            "first_seen_ms":5,"next_poll_ms":9,"failures":0,"polls":3,
            "last_outcome":"still_pending:processing","emitted":null}"#;
        let e: Entry = serde_json::from_str(old).unwrap();
        assert_eq!(
            (e.polls, e.history.len(), e.last_cdc.is_none()),
            (3, 0, true)
        );
        assert_eq!(e.updated_at, None);
        let emitted: Emitted =
            serde_json::from_str(r#"{"status":"failed","event_id":"x","at_ms":1}"#).unwrap();
        assert_eq!(emitted.reason, None);
    }

    /// A changelog that logs the partitions in `owned` and keeps what it was handed.
    struct Recorded {
        owned: Vec<i32>,
        fail: bool,
        records: Mutex<Vec<(i32, String, bool)>>,
        markers: Mutex<Vec<(i32, i64)>>,
    }

    impl ChangeLog for Recorded {
        fn cdc_topic(&self) -> &str {
            "t"
        }
        fn logs(&self, partition: i32) -> bool {
            self.owned.contains(&partition)
        }
        fn write(&self, b: &LogBatch<'_>) -> Result<Vec<(i32, i64)>, changelog::LogError> {
            if self.fail {
                return Err(changelog::LogError {
                    topic: "log".into(),
                    detail: "down".into(),
                });
            }
            let mut r = self.records.lock().unwrap();
            for (p, id, v) in &b.records {
                r.push((*p, id.to_string(), v.is_some()));
            }
            self.markers.lock().unwrap().extend(&b.offsets);
            // Like the broker: a next offset for each partition written to.
            let mut ps: Vec<i32> = b.records.iter().map(|r| r.0).collect();
            ps.extend(b.offsets.iter().map(|(p, _)| *p));
            ps.sort_unstable();
            ps.dedup();
            Ok(ps.into_iter().map(|p| (p, 100 + p as i64)).collect())
        }
    }

    fn log(owned: &[i32], fail: bool) -> Recorded {
        Recorded {
            owned: owned.to_vec(),
            fail,
            records: Mutex::default(),
            markers: Mutex::default(),
        }
    }

    fn apply_on(s: &Store, id: &str, status: &str, partition: i32, offset: i64) {
        s.apply_event(
            &create(id, status),
            None,
            ("t", partition, offset),
            1000,
            600,
            "pending",
        )
        .unwrap();
    }

    #[test]
    fn a_logged_checkpoint_logs_owned_partitions_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        apply_on(&s, "a", "pending", 0, 1);
        apply_on(&s, "b", "pending", 1, 1);
        let l = log(&[0], false);
        let cp = s.checkpoint_logged(Some(&l), || {}).unwrap();
        assert_eq!(cp.offsets, vec![("t".to_string(), 0, 1)]);
        assert_eq!(*l.records.lock().unwrap(), vec![(0, "a".to_string(), true)]);
        assert_eq!(*l.markers.lock().unwrap(), vec![(0, 1)]);
        assert_eq!(s.log_position(0).unwrap(), Some(100));
        assert_eq!(s.log_position(1).unwrap(), None);
        // Partition 1 is someone else's: neither in the tree nor in the overlay any more.
        assert!(s.get("b").unwrap().is_none());
        assert!(s.get("a").unwrap().is_some());

        // A removal is logged on the partition the tree holds the entry under.
        apply_on(&s, "a", "succeeded", 0, 2);
        s.checkpoint_logged(Some(&l), || {}).unwrap();
        assert_eq!(l.records.lock().unwrap()[1], (0, "a".to_string(), false));
        drop(s);
        let s = reopen(dir.path()).unwrap();
        assert_eq!(s.entry_count(), 0);
        assert_eq!(s.stored_offset("t", 0).unwrap(), Some(2));
    }

    #[test]
    fn a_failed_changelog_write_writes_nothing_and_keeps_the_changes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        apply_on(&s, "a", "pending", 0, 1);
        let e = s
            .checkpoint_logged(Some(&log(&[0], true)), || {})
            .unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert_eq!(s.stored_offset("t", 0).unwrap(), None);
        assert_eq!(s.entry_count(), 0);
        // The next checkpoint, with the broker back, writes them.
        let l = log(&[0], false);
        s.checkpoint_logged(Some(&l), || {}).unwrap();
        assert_eq!(l.records.lock().unwrap().len(), 1);
        assert_eq!(s.stored_offset("t", 0).unwrap(), Some(1));
        assert_eq!(s.entry_count(), 1);
    }

    #[test]
    fn replacing_a_partition_swaps_its_entries_offsets_and_position_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for (id, p) in [("a", 0), ("b", 1), ("c", 1)] {
            apply_on(&s, id, "pending", p, 5);
        }
        s.checkpoint().unwrap();
        // Not yet checkpointed: dropped with its partition.
        apply_on(&s, "d", "pending", 1, 6);
        let entry = |id: &str| {
            let mut e = s.get("b").unwrap().unwrap();
            e.id = id.into();
            e.next_poll_ms = 42;
            serde_json::to_vec(&e).unwrap()
        };
        let restored = changelog::Restored {
            entries: [("c".to_string(), entry("c")), ("e".to_string(), entry("e"))]
                .into_iter()
                .collect(),
            next_offset: Some(9),
            log_position: Some(77),
            records: 5,
        };
        s.replace_partition("t", 1, &restored).unwrap();
        let ids: Vec<String> = s.entries().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["a", "c", "e"]);
        assert_eq!(s.get("c").unwrap().unwrap().next_poll_ms, 42);
        assert_eq!(s.stored_offset("t", 1).unwrap(), Some(9));
        assert_eq!(s.stored_offset("t", 0).unwrap(), Some(5));
        assert_eq!(s.log_position(1).unwrap(), Some(77));
        assert_eq!(s.local_partitions("t").unwrap(), vec![0, 1]);
        let due: Vec<String> = s
            .due(1_000_000, 10, |_| false, |p| p == 1)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(due, ["c", "e"]);
        // Evicting leaves nothing of the partition; the recovery check agrees with the counts.
        s.replace_partition("t", 1, &changelog::Restored::default())
            .unwrap();
        assert_eq!(s.local_partitions("t").unwrap(), vec![0]);
        drop(s);
        let s = reopen(dir.path()).unwrap();
        assert_eq!(s.entry_count(), 1);
        assert_eq!(s.entries().unwrap().len(), 1);
    }

    #[test]
    fn adopting_a_partition_logs_all_its_entries_at_the_next_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for (id, p) in [("a", 0), ("b", 1), ("c", 1)] {
            apply_on(&s, id, "pending", p, 5);
        }
        s.checkpoint().unwrap();
        assert_eq!(s.adopt_partition(1).unwrap(), 2);
        let l = log(&[1], false);
        s.checkpoint_logged(Some(&l), || {}).unwrap();
        let ids: Vec<String> = l
            .records
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.1.clone())
            .collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&"b".to_string()) && ids.contains(&"c".to_string()));
        assert_eq!(s.log_position(1).unwrap(), Some(101));
    }
}
