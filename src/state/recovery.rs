//! The recovery check: every invariant the layout promises, checked before a checkpoint may
//! write (see the module doc of [`crate::state`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;

use super::lookup::{self, X};
use super::overlay::{id_hash, stable_hash};
use super::tally::{Delta, Facts, Tally};
use super::{
    Entry, Head, StateError, Store, D, FORMAT, META_ENTRIES, META_FORMAT, O, P, PROBLEMS_SHOWN,
};

/// What a passing recovery check counted: entries, their id hashes, their tally.
pub(super) type Counted = (u64, HashMap<u64, u32>, Tally);

impl Store {
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
        let (n, ids, tally) = self.verify()?;
        if self.lookups_missing.load(Relaxed) {
            // Layout 3 or older: the index is built, then the version says it is there.
            let rows = self.build_lookups()?;
            self.db
                .insert(META_FORMAT, FORMAT)
                .map_err(|e| self.io(e))?;
            self.db.flush().map_err(|e| self.io(e))?;
            self.lookups_missing.store(false, Relaxed);
            tracing::info!(
                rows,
                "state store upgraded to layout 4: a lookup index by idempotency key and intent id"
            );
        }
        let stored = self.tally.lock().expect("tally lock").clone();
        let differences = stored.as_ref().map(|s| s.differences(&tally));
        if differences.as_ref().is_none_or(|d| !d.is_empty()) {
            // A version-1 store, or a tally that is not the entries' (see `tally`): the tally
            // from this scan, and the current version, in one batch.
            let mut b = sled::Batch::default();
            tally.write_all(&self.db, &mut b).map_err(|e| self.io(e))?;
            b.insert(META_FORMAT, FORMAT);
            self.db.apply_batch(b).map_err(|e| self.io(e))?;
            self.db.flush().map_err(|e| self.io(e))?;
            match differences {
                None => tracing::info!(
                    pending = tally.pending,
                    "state store upgraded to layout 2: counts kept at write time"
                ),
                Some(d) => tracing::error!(
                    differences = d.join("; "),
                    "state tally disagreed with the entries; rewritten from the recovery check's scan"
                ),
            }
        }
        *self.tally.lock().expect("tally lock") = Some(tally);
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

    /// The recovery check (see the module doc). Returns the number of entries, their id hashes
    /// and their tally, which [`Store::check`] compares with the stored one.
    ///
    /// One streaming pass, in constant memory beyond the id hashes: the due index and the
    /// pending entries must hold the same (id, due) pairs, compared as a count and a sum of
    /// their hashes; every entry must be JSON holding its own id; the count must match the last
    /// checkpoint's. Only when that fails does [`Store::verify_detailed`] run, to name the
    /// problems. Entries are parsed for the fields the layout's invariants name; a value of a
    /// wrong type elsewhere in an entry is found when the entry is read (a `Corrupt` error).
    pub(super) fn verify(&self) -> Result<Counted, StateError> {
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
        // The lookup index against the entries' values, the same way (unless there is none yet).
        let (mut rows, mut rows_sum) = (0u64, 0u64);
        for kv in self.db.scan_prefix(X) {
            let (k, _) = kv.map_err(|e| self.io(e))?;
            let Some((value, id)) = lookup::split(&k) else {
                ok = false;
                break;
            };
            rows += 1;
            rows_sum = rows_sum.wrapping_add(lookup::row_hash(value, id));
        }
        let (mut values, mut values_sum) = (0u64, 0u64);
        let (mut entries, mut pending, mut pending_sum) = (0u64, 0u64, 0u64);
        let mut ids: HashMap<u64, u32> = HashMap::new();
        let mut scanned = Delta::default();
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
                    for v in h.lookups().into_iter().flatten() {
                        values += 1;
                        values_sum = values_sum.wrapping_add(lookup::row_hash(v.as_bytes(), id));
                    }
                    *ids.entry(id_hash(&h.id)).or_default() += 1;
                    // Emitted entries count in no figure of the tally (Delta::change skips them).
                    scanned.change(None, Some(Facts::from(&h)));
                }
                _ => ok = false,
            }
        }
        ok = ok
            && indexed == pending
            && indexed_sum == pending_sum
            && (self.lookups_missing.load(Relaxed) || (rows, rows_sum) == (values, values_sum))
            && self.meta_u64(META_ENTRIES)? == Some(entries);
        for kv in self.db.scan_prefix(O) {
            let (k, v) = kv.map_err(|e| self.io(e))?;
            ok = ok && v.len() == 8 && k.len() >= O.len() + 5;
        }
        let tally = Tally::counted(&scanned);
        if ok {
            return Ok((entries, ids, tally));
        }
        self.verify_detailed()
    }

    /// The recovery check entry by entry, naming each problem (see [`Store::verify`]).
    pub(super) fn verify_detailed(&self) -> Result<Counted, StateError> {
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
        let check_lookups = !self.lookups_missing.load(Relaxed);
        let mut rows: HashSet<(String, String)> = HashSet::new();
        if check_lookups {
            for kv in self.db.scan_prefix(X) {
                let (k, _) = kv.map_err(|e| self.io(e))?;
                match lookup::split(&k) {
                    Some((value, id)) => {
                        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                        rows.insert((s(value), s(id)));
                    }
                    None => problems.push(format!(
                        "malformed lookup-index key {:?}",
                        String::from_utf8_lossy(&k)
                    )),
                }
            }
        }
        let mut entries = 0u64;
        let mut ids: HashMap<u64, u32> = HashMap::new();
        let mut scanned = Delta::default();
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
            scanned.change(None, Some(Facts::from(&e)));
            for value in e.lookups().into_iter().flatten().filter(|_| check_lookups) {
                if !rows.remove(&(value.to_string(), id.clone())) {
                    problems.push(format!(
                        "payment {id} is not in the lookup index under {value:?}"
                    ));
                }
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
        for (value, id) in &rows {
            problems.push(format!(
                "lookup index finds payment {id} under {value:?}, which the entry does not hold"
            ));
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
        let tally = Tally::counted(&scanned);
        if problems.is_empty() {
            return Ok((entries, ids, tally));
        }
        let count = problems.len();
        problems.truncate(PROBLEMS_SHOWN);
        Err(StateError::Inconsistent {
            path: self.path.clone(),
            count,
            problems,
        })
    }
}
