//! Checkpoints: the overlay and its positions written in one atomic sled batch, then flushed;
//! through the state changelog first when scale-out logs the partitions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::journal::{self, Journal, Record, META_JOURNAL};
use super::overlay::{forget_id, id_hash, Changes};
use super::tally::{Delta, Facts};
use super::{
    c_key, changelog, p_key, Entry, Head, Position, StateError, Store, FORMAT, META_CHECKPOINT_MS,
    META_ENTRIES, META_FORMAT,
};

/// Where a checkpoint's write is, for a test to stop it there (see [`journal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The commit (journal, positions, counts) is written to sled, not yet flushed.
    Committed,
    /// The commit is durable, and one more slice of the journal is in the tree (not flushed).
    Applying,
}

/// The result of one checkpoint: the positions now durable, for their sources to hand on
/// (commit to the group, acknowledge to the slot).
#[derive(Debug, Default)]
pub struct Checkpoint {
    pub positions: Vec<(Position, i64)>,
}

/// A change a checkpoint writes: id, partition, the new entry with its JSON (`None`: removed).
pub(super) type Kept<'a> = (&'a str, i32, Option<(&'a Entry, Vec<u8>)>);

/// What the tree holds of an id a checkpoint changes ([`Store::read_head`]).
pub(super) struct Old {
    pub(super) partition: i32,
    pub(super) facts: Facts,
    pub(super) lookups: [Option<String>; 2],
}

/// What [`Store::write_changes`] wrote.
pub(super) struct Written<'a> {
    pub(super) count: u64,
    pub(super) added: Vec<&'a str>,
    pub(super) removed: Vec<&'a str>,
    pub(super) positions: Vec<(Position, i64)>,
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

impl Store {
    /// Writes the overlay and its offsets in one atomic commit, flushed, then applies it to the
    /// entries in slices (see [`journal`]). Blocking (disk I/O): call it from a blocking context.
    pub fn checkpoint(&self) -> Result<Checkpoint, StateError> {
        self.checkpoint_with(|_| {})
    }

    /// [`Store::checkpoint`], calling `seam` at each [`Stage`] of the write: where the
    /// durability test kills the process.
    ///
    /// Concurrency: the overlay's changes are frozen under the lock (a swap, no copy) and
    /// written without it, so the pipeline keeps applying events into a fresh overlay while
    /// the batch is built and applied. Readers see frozen changes until the tree has them.
    pub fn checkpoint_with(&self, seam: impl FnMut(Stage)) -> Result<Checkpoint, StateError> {
        self.checkpoint_logged(None, seam)
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
        seam: impl FnMut(Stage),
    ) -> Result<Checkpoint, StateError> {
        let written = self.checkpoint_locked(log, seam);
        // Also after a failed one, whose changes went back: a waiting reader looks again.
        self.checkpointed.notify_waiters();
        written
    }

    fn checkpoint_locked(
        &self,
        log: Option<&dyn ChangeLog>,
        seam: impl FnMut(Stage),
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
            if ov.entries.is_empty() && ov.positions.is_empty() {
                return Ok(Checkpoint::default());
            }
            let changes = Arc::new(std::mem::take(&mut ov.entries));
            ov.frozen = Some(changes.clone());
            (
                changes,
                std::mem::take(&mut ov.positions),
                ov.durable_entries,
            )
        };
        // The overlay is empty again: a reader waiting for room reads on while this writes
        // (what it then applies waits for the next checkpoint).
        self.checkpointed.notify_waiters();
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
        match self.write_changes(&changes, &offsets, count, &in_tree, log, seam) {
            Ok(written) => {
                // Durable and in the tree (see `write_changes`): callers commit offsets to
                // Kafka after this returns.
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
                Ok(Checkpoint {
                    positions: written.positions,
                })
            }
            Err(e) => {
                // Nothing was committed (a failure after the commit poisons the store, see
                // `write_changes`): the frozen changes go back under the newer ones, so a later
                // checkpoint (after the broker is back) still writes them.
                let mut ov = self.overlay.lock().expect("state lock");
                ov.frozen = None;
                for (id, c) in changes.iter() {
                    ov.entries.entry(id.clone()).or_insert_with(|| c.clone());
                }
                for (k, off) in offsets {
                    ov.positions.entry(k).or_insert(off);
                }
                Err(e)
            }
        }
    }

    /// Writes `changes` and `offsets` to the tree, after writing them to `log` if there is one:
    /// one atomic commit of the journal with the offsets and counts, flushed; then the journal
    /// applied in slices, flushed (see [`journal`]). Returns the new entry count, the ids added
    /// to and removed from the tree, and the offsets written.
    ///
    /// An error after the commit (the disk failed) poisons the store: its in-memory counts may
    /// no longer be the tree's, so every later checkpoint refuses ([`StateError::Unchecked`])
    /// until it is opened again, and the open applies the journal.
    pub(super) fn write_changes<'a>(
        &self,
        changes: &'a Changes,
        offsets: &BTreeMap<Position, i64>,
        mut count: u64,
        in_tree: &std::collections::HashSet<&str>,
        log: Option<&dyn ChangeLog>,
        mut seam: impl FnMut(Stage),
    ) -> Result<Written<'a>, StateError> {
        // What the tree holds of each changed id: its partition and its facts for the tally.
        let mut old: HashMap<&str, Old> = HashMap::new();
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
                (None, Some(o)) => o.partition,
                (None, None) => continue,
            };
            if log.is_some_and(|l| !l.logs(partition)) {
                continue;
            }
            let new = new
                .as_deref()
                .map(|e| (e, serde_json::to_vec(e).expect("entry serializes")));
            kept.push((id.as_str(), partition, new));
        }
        // With a log, only the positions of the CDC partitions it logs (this instance owns):
        // another member's partition keeps the position its owner wrote.
        let positions: Vec<(Position, i64)> = offsets
            .iter()
            .filter(|(at, _)| {
                log.is_none_or(|l| {
                    at.kafka_partition_of(l.cdc_topic())
                        .is_none_or(|p| l.logs(p))
                })
            })
            .map(|(at, o)| (at.clone(), *o))
            .collect();
        let mut batch = sled::Batch::default();
        if let Some(log) = log {
            let records = kept
                .iter()
                .map(|(id, p, new)| (*p, *id, new.as_ref().map(|(_, j)| j.as_slice())))
                .collect();
            let cdc_offsets = positions
                .iter()
                .filter_map(|(at, o)| Some((at.kafka_partition_of(log.cdc_topic())?, *o)))
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
        let mut delta = Delta::default();
        let mut journal = Journal::default();
        for (id, _, new) in &kept {
            let was = old.get(id);
            let lookups = {
                let before =
                    was.map_or([None, None], |o| o.lookups.each_ref().map(Option::as_deref));
                let after = new.as_ref().map_or([None, None], |(e, _)| e.lookups());
                (before != after).then_some((before, after))
            };
            let old = was.map(|o| o.facts);
            delta.change(old, new.as_ref().map(|(e, _)| Facts::from(*e)));
            journal.push(Record {
                id,
                lookups,
                old_due: old.and_then(|f| f.due),
                new: new.as_ref().map(|(e, json)| {
                    // Only entries still to be polled are in the due index.
                    (
                        json.as_slice(),
                        e.emitted.is_none().then_some(e.next_poll_ms),
                    )
                }),
            });
            match (new, old) {
                (Some(_), None) => {
                    count += 1;
                    added.push(*id);
                }
                (None, Some(_)) => {
                    count -= 1;
                    removed.push(*id);
                }
                _ => {}
            }
        }
        // The commit: the journal, and beside it the count (so the recovery check can tell a
        // whole checkpoint from a torn one), the tally (so it is always that of the entries)
        // and the positions, in one batch of a few keys, however many changes it carries.
        batch.insert(META_JOURNAL, journal.bytes());
        batch.insert(META_FORMAT, FORMAT);
        batch.insert(META_ENTRIES, &count.to_be_bytes()[..]);
        let tally = self.next_tally(&delta, &mut batch)?;
        batch.insert(
            META_CHECKPOINT_MS,
            &crate::clock::wall_ms().to_be_bytes()[..],
        );
        for (at, off) in &positions {
            batch.insert(at.key(), &off.to_be_bytes()[..]);
        }
        self.db.apply_batch(batch).map_err(|e| self.io(e))?;
        *self.tally.lock().expect("tally lock") = Some(tally);
        let applied = (|| {
            seam(Stage::Committed);
            // Durable from here. The application below may be cut short by a crash: the next
            // open applies the journal again.
            self.db.flush().map_err(|e| self.io(e))?;
            journal::apply(
                &self.db,
                journal.bytes(),
                || seam(Stage::Applying),
                |e| self.io(e),
            )?;
            // The next checkpoint's commit replaces this journal: only once the tree holds all
            // of it durably.
            self.db.flush().map_err(|e| self.io(e))?;
            Ok(())
        })();
        if let Err(e) = applied {
            *self.tally.lock().expect("tally lock") = None;
            self.overlay.lock().expect("state lock").durable_ids = None;
            return Err(e);
        }
        Ok(Written {
            count,
            added,
            removed,
            positions,
        })
    }

    /// Whether the tree holds `id`, and if so what a checkpoint needs of the old entry, without
    /// parsing all of it: its partition, its facts for the tally (its due time among them) and
    /// the values the lookup index finds it by.
    pub(super) fn read_head(&self, id: &str) -> Result<Option<Old>, StateError> {
        let Some(bytes) = self.db.get(p_key(id)).map_err(|e| self.io(e))? else {
            return Ok(None);
        };
        let h: Head = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            key: id.to_string(),
            detail: e.to_string(),
        })?;
        Ok(Some(Old {
            partition: h.partition,
            facts: Facts::from(&h),
            lookups: h.lookups().map(|v| v.map(str::to_string)),
        }))
    }

    /// The tally after `delta`, its changed keys added to `batch`. Call under the checkpoint
    /// lock, and store the result once the batch is applied. A tally that disagrees with the
    /// entries never fails the write (see `tally`).
    pub(super) fn next_tally(
        &self,
        delta: &Delta,
        batch: &mut sled::Batch,
    ) -> Result<super::tally::Tally, StateError> {
        let (next, problems) = match &*self.tally.lock().expect("tally lock") {
            Some(current) => current.apply(delta, batch),
            None => {
                return Err(StateError::Unchecked {
                    path: self.path.clone(),
                })
            }
        };
        for problem in problems {
            tracing::error!(%problem, "state tally disagrees with the entries (repaired at the next recovery check)");
        }
        Ok(next)
    }
}
