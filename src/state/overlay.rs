//! The overlay and CDC semantics: every change (an event, a poll's result) lands here first,
//! in memory, and reaches the tree only in a checkpoint. Readers see the overlay over the tree.
//!
//! Concurrency: the overlay has one mutex, held only for in-memory work (and a point read of
//! the tree on a miss). A checkpoint swaps the changes out under it and writes them without it
//! (`frozen` keeps them visible meanwhile).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{p_key, Applied, CdcSeen, Entry, Position, StateError, Store, P};
use crate::change::{ChangeEvent, Col, Op, Payment};

/// Drops one count of `id` from the durable id hashes.
pub(super) fn forget_id(ids: &mut HashMap<u64, u32>, id: &str) {
    let h = id_hash(id);
    if let Some(n) = ids.get_mut(&h) {
        *n -= 1;
        if *n == 0 {
            ids.remove(&h);
        }
    }
}

/// The overlay's changes by id (`None`: removed). Entries are boxed: a table slot then costs a
/// pointer, not a whole entry, so the slack of a growing table (up to half its slots) is cheap
/// (heaptrack: the unboxed table was the largest single consumer of a replay's peak heap).
pub(super) type Changes = HashMap<String, Option<Box<Entry>>>;

#[derive(Default)]
pub(super) struct Overlay {
    /// `None`: removed since the last checkpoint.
    pub(super) entries: Changes,
    /// The changes a checkpoint in progress is writing: still visible to readers (under
    /// `entries`, which is newer) until the tree has them.
    pub(super) frozen: Option<Arc<Changes>>,
    /// Each position's next offset since the last checkpoint.
    pub(super) positions: BTreeMap<Position, i64>,
    /// How many entries the tree holds after the last checkpoint (`m\0entries`).
    pub(super) durable_entries: u64,
    /// Hashes of the ids the tree holds, counted (two ids may share a hash): an id whose hash
    /// is not here is not in the tree, so a new payment costs no tree lookup. About 20 bytes
    /// per entry in state. `None` until the recovery check has counted them: any id may then
    /// be in the tree.
    pub(super) durable_ids: Option<HashMap<u64, u32>>,
}

impl Overlay {
    /// The newest change for `id` not yet in the tree: `Some(None)` if removed.
    pub(super) fn change(&self, id: &str) -> Option<&Option<Box<Entry>>> {
        self.entries
            .get(id)
            .or_else(|| self.frozen.as_ref().and_then(|f| f.get(id)))
    }

    pub(super) fn maybe_durable(&self, id: &str) -> bool {
        self.durable_ids
            .as_ref()
            .is_none_or(|ids| ids.contains_key(&id_hash(id)))
    }
}

/// Records a position's next offset; clones the position only the first time.
pub(super) fn set_position(positions: &mut BTreeMap<Position, i64>, at: &Position, next: i64) {
    match positions.get_mut(at) {
        Some(o) => *o = next,
        None => {
            positions.insert(at.clone(), next);
        }
    }
}

/// A hash that is the same in every process (std's default hasher with fixed keys).
pub(super) fn stable_hash(x: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(x)
}

pub(super) fn id_hash(id: &str) -> u64 {
    stable_hash(id)
}

impl Store {
    pub(super) fn read_durable(&self, id: &str) -> Result<Option<Entry>, StateError> {
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

    pub(super) fn get_in(&self, ov: &Overlay, id: &str) -> Result<Option<Entry>, StateError> {
        match ov.change(id) {
            Some(e) => Ok(e.as_deref().cloned()),
            None if ov.maybe_durable(id) => self.read_durable(id),
            None => Ok(None),
        }
    }

    /// Whether `id` is in state (overlay or tree), without reading its entry from the overlay.
    pub(super) fn exists_in(&self, ov: &Overlay, id: &str) -> Result<bool, StateError> {
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

    /// Applies one decoded CDC event and records `next_offset` for its partition in the same
    /// overlay, so both reach disk in the same checkpoint.
    ///
    /// `key_id` is the payment id from the message key (needed for tombstones).
    #[allow(clippy::too_many_arguments)]
    pub fn apply_event(
        &self,
        ev: &ChangeEvent,
        key_id: Option<&str>,
        source: (&Position, i64),
        now_ms: u64,
        poll_interval_ms: u64,
        pending_status: &str,
    ) -> Result<Applied, StateError> {
        let (at, next_offset) = source;
        let partition = at.partition();
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
        set_position(&mut ov.positions, at, next_offset);
        drop(ov);
        self.touched();
        Ok(applied)
    }

    /// Records the next offset for a message that changed no state (ignored or dead-lettered),
    /// so it is not read again after a restart.
    pub fn advance(&self, at: &Position, next_offset: i64) {
        let mut ov = self.overlay.lock().expect("state lock");
        set_position(&mut ov.positions, at, next_offset);
        drop(ov);
        self.touched();
    }

    pub(super) fn upsert_pending(
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
            ov.entries.insert(p.id.clone(), Some(Box::new(e)));
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

    pub(super) fn remove_in(&self, ov: &mut Overlay, id: &str) -> Result<Applied, StateError> {
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
        } else {
            let Some(mut e) = self.get_in(&ov, id)? else {
                return Ok(false);
            };
            f(&mut e);
            ov.entries.insert(id.to_string(), Some(Box::new(e)));
        }
        drop(ov);
        self.touched();
        Ok(true)
    }
}
