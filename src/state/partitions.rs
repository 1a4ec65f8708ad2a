//! Scale-out's partition moves: replacing a CDC partition's state with what its changelog
//! restored, and adopting state that was never logged.

use super::lookup::x_key;
use super::overlay::{forget_id, id_hash};
use super::tally::{Delta, Facts};
use super::{
    c_key, changelog, d_key, p_key, Entry, Head, Position, StateError, Store, META_ENTRIES, P,
};

impl Store {
    /// Replaces everything this store holds of a source's partition `at` (its entries,
    /// including changes not yet checkpointed, its stored position and its changelog
    /// position) with what was restored from the changelog, in one atomic batch, flushed.
    /// With nothing restored it is an eviction.
    ///
    /// Concurrency: under the checkpoint lock, so no checkpoint writes the partition's old
    /// entries back after they were dropped. The caller does not own the partition meanwhile,
    /// so no event or poll changes its entries.
    pub fn replace_partition(
        &self,
        at: &Position,
        restored: &changelog::Restored,
    ) -> Result<(), StateError> {
        let partition = at.partition();
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
        let mut delta = Delta::default();
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
            for v in h.lookups().into_iter().flatten() {
                batch.remove(x_key(v, &h.id));
            }
            delta.change(Some(Facts::from(&h)), None);
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
                    Some(old) => {
                        if let Some(due) = old.facts.due {
                            batch.remove(d_key(due, id));
                        }
                        for v in old.lookups.iter().flatten() {
                            batch.remove(x_key(v, id));
                        }
                        delta.change(Some(old.facts), None);
                    }
                    None => {
                        count += 1;
                        added.push(id.as_str());
                    }
                }
            }
            // Inserts after the removals above, so a row both removed and written stays.
            batch.insert(p_key(id), json.as_slice());
            if let Some(due) = h.due() {
                batch.insert(d_key(due, id), &[][..]);
            }
            for v in h.lookups().into_iter().flatten() {
                batch.insert(x_key(v, id), &[][..]);
            }
            delta.change(None, Some(Facts::from(&h)));
        }
        // Evicted ids that were restored again stayed in the tree: only the rest are gone.
        dropped.extend(evicted.iter().map(String::as_str));
        batch.insert(META_ENTRIES, &count.to_be_bytes()[..]);
        let tally = self.next_tally(&delta, &mut batch)?;
        match restored.next_offset {
            Some(o) => batch.insert(at.key(), &o.to_be_bytes()[..]),
            None => batch.remove(at.key()),
        }
        match restored.log_position {
            Some(o) => batch.insert(c_key(partition), &o.to_be_bytes()[..]),
            None => batch.remove(c_key(partition)),
        }
        // The last checkpoint's journal is wholly in the tree (checkpoints flush its
        // application before they return, and this holds their lock); applied again at a
        // reopen it would put back what this batch replaces.
        batch.remove(super::journal::META_JOURNAL);
        // Known gap: this is one batch of every key of the partition, so its memory grows with
        // the partition (see `journal`); a takeover of a large partition peaks accordingly.
        self.db.apply_batch(batch).map_err(|e| self.io(e))?;
        *self.tally.lock().expect("tally lock") = Some(tally);
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
        ov.positions.remove(at);
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
                slot.insert(Some(Box::new(e)));
                n += 1;
            }
        }
        if n > 0 {
            self.touched();
        }
        Ok(n)
    }
}
