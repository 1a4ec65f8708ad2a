//! The lookup index: which payments an idempotency key or a PaymentIntent id names, so that
//! `state get <key|pi_…>` reads what it returns instead of scanning every entry.
//!
//! Rows are `x\0<value>\0<id>` → empty, one per value an entry is found by (its idempotency key
//! and its intent id, once each). A value names a set of ids, not one: two payments may share
//! an intent (a double charge), and a key can only be trusted as far as the database's unique
//! constraint goes. Neither a key nor an id can hold a NUL (Postgres text cannot), so the first
//! NUL after the prefix ends the value.
//!
//! The rows are written where the entries are: by the checkpoint journal (a record carries the
//! values the id had and has, only when they changed, see `journal`) and by a partition
//! replace, in the same batches. The recovery check compares them with the entries as a count
//! and a sum of hashes; a store of layout 3 or older has none, and its check builds them.

use std::collections::BTreeMap;

use super::overlay::stable_hash;
use super::{Entry, StateError, Store, P};

/// The prefix of the lookup index's rows.
pub(super) const X: &[u8] = b"x\0";

/// Ids written per sled batch while the index is built (see `journal` for why batches stay
/// small).
const BUILD_SLICE: usize = 256;

/// The values an entry is found by: its idempotency key and its intent id, once each.
pub(super) type Values<'a> = [Option<&'a str>; 2];

pub(super) fn values<'a>(key: &'a str, intent: Option<&'a str>) -> Values<'a> {
    [Some(key), intent.filter(|i| *i != key)]
}

pub(super) fn x_key(value: &str, id: &str) -> Vec<u8> {
    [X, value.as_bytes(), b"\0", id.as_bytes()].concat()
}

/// The (value, id) a row's key holds; `None` for a malformed key.
pub(super) fn split(key: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = key.strip_prefix(X)?;
    let nul = rest.iter().position(|b| *b == 0)?;
    Some((&rest[..nul], &rest[nul + 1..]))
}

/// What a row contributes to the recovery check's sum (the same for an entry's value).
pub(super) fn row_hash(value: &[u8], id: &[u8]) -> u64 {
    stable_hash((value, id))
}

fn matches(e: &Entry, q: &str) -> bool {
    e.lookups().contains(&Some(q))
}

impl Store {
    /// The entries whose idempotency key or intent id is `q`, including changes not yet
    /// checkpointed, in id order. Reads the index rows of `q` and their entries, and the
    /// overlay (at most what one checkpoint writes, see `crate::pipeline`'s bound), not the
    /// tree's entries.
    ///
    /// Concurrency: under the checkpoint lock, so the tree does not change between the index
    /// read and the overlay read (a checkpoint moving an entry from the one to the other in
    /// between would hide it). It waits for a running checkpoint to end.
    pub fn find_by_value(&self, q: &str) -> Result<Vec<Entry>, StateError> {
        let _one = self.checkpointing.lock().expect("checkpoint lock");
        // The rows of `q` and no other value: `x\0<q>\0`.
        let prefix = x_key(q, "");
        let mut ids = Vec::new();
        for kv in self.db.scan_prefix(&prefix) {
            let (k, _) = kv.map_err(|e| self.io(e))?;
            ids.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        let ov = self.overlay.lock().expect("state lock");
        // No checkpoint runs (its lock is held), so none has frozen changes aside: the overlay's
        // changes are all in `entries`.
        let mut found: BTreeMap<String, Entry> = ov
            .entries
            .iter()
            .filter_map(|(id, e)| Some((id, e.as_deref()?)))
            .filter(|(_, e)| matches(e, q))
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect();
        for id in ids {
            if ov.change(&id).is_some() {
                continue; // the overlay's version stands (looked at above)
            }
            // A row whose entry no longer has the value would be a bug the recovery check
            // reports; it is not shown.
            if let Some(e) = self.read_durable(&id)?.filter(|e| matches(e, q)) {
                found.insert(id, e);
            }
        }
        Ok(found.into_values().collect())
    }

    /// Rebuilds the index from the entries: removes every row, then writes each entry's, in
    /// small batches, then flushes. Call under the checkpoint lock (the recovery check does), so
    /// no checkpoint writes meanwhile. A crash midway leaves the layout version as it was, and
    /// the next recovery check builds it again.
    pub(super) fn build_lookups(&self) -> Result<u64, StateError> {
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        let mut written = |batch: &mut sled::Batch| {
            in_batch += 1;
            if in_batch == BUILD_SLICE {
                in_batch = 0;
                self.db
                    .apply_batch(std::mem::take(batch))
                    .map_err(|e| self.io(e))?;
            }
            Ok::<(), StateError>(())
        };
        for kv in self.db.scan_prefix(X) {
            let (k, _) = kv.map_err(|e| self.io(e))?;
            batch.remove(k);
            written(&mut batch)?;
        }
        let mut rows = 0u64;
        for kv in self.db.scan_prefix(P) {
            let (k, v) = kv.map_err(|e| self.io(e))?;
            let id = String::from_utf8_lossy(&k[P.len()..]).into_owned();
            let h: super::Head = serde_json::from_slice(&v).map_err(|e| StateError::Corrupt {
                key: id.clone(),
                detail: e.to_string(),
            })?;
            for v in h.lookups().into_iter().flatten() {
                batch.insert(x_key(v, &id), &[][..]);
                rows += 1;
            }
            written(&mut batch)?;
        }
        self.db.apply_batch(batch).map_err(|e| self.io(e))?;
        self.db.flush().map_err(|e| self.io(e))?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_key_splits_back_into_its_value_and_id() {
        let k = x_key("pi_1", "42");
        assert_eq!(split(&k), Some((&b"pi_1"[..], &b"42"[..])));
        assert_eq!(split(&x_key("", "")), Some((&b""[..], &b""[..])));
        assert_eq!(split(b"x\0no-nul"), None);
        assert_eq!(split(b"p\0a\0b"), None);
        // A value that is a prefix of another does not find the other's rows.
        assert!(!x_key("ab", "1").starts_with(&[X, b"a", b"\0"].concat()));
    }

    #[test]
    fn an_entry_is_found_by_each_value_once() {
        assert_eq!(values("k", Some("pi")), [Some("k"), Some("pi")]);
        assert_eq!(values("k", None), [Some("k"), None]);
        assert_eq!(values("same", Some("same")), [Some("same"), None]);
    }
}
