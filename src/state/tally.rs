//! Counts kept at write time, so the state gauges, `state stats` and the poller's overdue count
//! cost the same at ten pending payments as at a million (issue 23, target 5).
//!
//! Every write of an entry (a checkpoint, a partition replace) knows the entry's old facts (its
//! head in the tree) and its new ones, and adds the difference to a [`Delta`]; the delta enters
//! the same atomic batch as the entries, so the counts are always those of the entries beside
//! them. The recovery check recomputes them from its scan and compares. The counts are derived
//! data, so a difference (a bug) never stops the daemon or refuses the store, which would stop
//! the watching of payments for a wrong gauge: it is logged as an error and the tally rewritten
//! from the scan; a count a checkpoint would take below zero is held at zero and logged.
//!
//! Layout (beside the keys in [`crate::state`]):
//! - `m\0tally` → pending, flagged, declined (three u64 BE): entries still to be polled, and of
//!   those the flagged ones and the ones with a declined attempt.
//! - `h\0f<minute: u64 BE>` → pending entries first seen in that minute (u64 BE; absent: 0).
//! - `h\0n<minute: u64 BE>` → pending entries due in that minute.
//!
//! Resolution: ages come from the first-seen minute, so the age buckets, the stale count and the
//! oldest age count a payment as first seen at the start of its minute (up to 60 s older than it
//! is). Due counts are exact: whole minutes come from the histogram, and the two partial minutes
//! at a window's edges from a key-only range of the due index (at most a minute of polls).
//! Everything here is as of the last checkpoint (milliseconds behind, at most
//! `--checkpoint-interval`).

use std::collections::BTreeMap;

use super::{d_key, Entry, Head, StateError, Store};

pub(super) const META_TALLY: &[u8] = b"m\0tally";
/// The histograms' keys, both of them.
const H: &[u8] = b"h\0";
const H_FIRST: &[u8] = b"h\0f";
const H_DUE: &[u8] = b"h\0n";
pub(super) const MINUTE_MS: u64 = 60_000;

/// The counts of the entries in the tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Tally {
    pub(super) pending: u64,
    pub(super) flagged: u64,
    pub(super) declined: u64,
    /// Pending entries by first-seen minute.
    pub(super) first_seen: BTreeMap<u64, u64>,
    /// Pending entries by due minute.
    pub(super) due: BTreeMap<u64, u64>,
}

/// What one entry adds to the tally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Facts {
    /// Its due time while it is still to be polled (`None` once its status was emitted: such
    /// an entry counts in none of the tally's figures).
    pub(super) due: Option<u64>,
    pub(super) first_seen_ms: u64,
    pub(super) flagged: bool,
    pub(super) declined: bool,
}

impl From<&Entry> for Facts {
    fn from(e: &Entry) -> Facts {
        Facts {
            due: e.emitted.is_none().then_some(e.next_poll_ms),
            first_seen_ms: e.first_seen_ms,
            flagged: e.flag.is_some(),
            declined: e.declines.is_some(),
        }
    }
}

impl From<&Head<'_>> for Facts {
    fn from(h: &Head<'_>) -> Facts {
        Facts {
            due: h.due(),
            first_seen_ms: h.first_seen_ms,
            flagged: h.flag.is_some(),
            declined: h.declines.is_some(),
        }
    }
}

/// Changes to the tally from a batch of entry writes.
#[derive(Debug, Default)]
pub(super) struct Delta {
    pending: i64,
    flagged: i64,
    declined: i64,
    first_seen: BTreeMap<u64, i64>,
    due: BTreeMap<u64, i64>,
}

impl Delta {
    /// One entry's write: `old` its facts in the tree (`None`: new), `new` after (`None`: gone).
    pub(super) fn change(&mut self, old: Option<Facts>, new: Option<Facts>) {
        if old == new {
            return;
        }
        for (f, sign) in [(old, -1), (new, 1)] {
            let Some(f) = f else { continue };
            let Some(due) = f.due else { continue };
            self.pending += sign;
            self.flagged += sign * i64::from(f.flagged);
            self.declined += sign * i64::from(f.declined);
            *self
                .first_seen
                .entry(f.first_seen_ms / MINUTE_MS)
                .or_default() += sign;
            *self.due.entry(due / MINUTE_MS).or_default() += sign;
        }
    }
}

/// `n + d`, held at zero; a count that would go below zero is named in `problems` (the tally
/// and the entries disagree: a bug, which the next recovery check repairs).
fn add(n: u64, d: i64, what: &str, problems: &mut Vec<String>) -> u64 {
    n.checked_add_signed(d).unwrap_or_else(|| {
        problems.push(format!("the {what} count would go below zero ({n} {d:+})"));
        0
    })
}

fn h_key(prefix: &[u8], minute: u64) -> Vec<u8> {
    [prefix, &minute.to_be_bytes()[..]].concat()
}

impl Tally {
    /// The tally after `delta`, with its changed keys written to `batch`, and the counts that
    /// would have gone below zero (held at zero).
    pub(super) fn apply(&self, delta: &Delta, batch: &mut sled::Batch) -> (Tally, Vec<String>) {
        let mut t = self.clone();
        let mut problems = Vec::new();
        t.pending = add(t.pending, delta.pending, "pending", &mut problems);
        t.flagged = add(t.flagged, delta.flagged, "flagged", &mut problems);
        t.declined = add(t.declined, delta.declined, "declined", &mut problems);
        for (prefix, hist, changes) in [
            (H_FIRST, &mut t.first_seen, &delta.first_seen),
            (H_DUE, &mut t.due, &delta.due),
        ] {
            for (&minute, &d) in changes.iter().filter(|(_, d)| **d != 0) {
                let n = add(
                    hist.get(&minute).copied().unwrap_or(0),
                    d,
                    "per-minute",
                    &mut problems,
                );
                if n == 0 {
                    hist.remove(&minute);
                    batch.remove(h_key(prefix, minute));
                } else {
                    hist.insert(minute, n);
                    batch.insert(h_key(prefix, minute), &n.to_be_bytes()[..]);
                }
            }
        }
        batch.insert(META_TALLY, t.head_bytes());
        (t, problems)
    }

    fn head_bytes(&self) -> Vec<u8> {
        [self.pending, self.flagged, self.declined]
            .iter()
            .flat_map(|n| n.to_be_bytes())
            .collect()
    }

    /// Every key of this tally, for a store that had none or a wrong one (see [`Store::check`]):
    /// the histogram keys already in `db` are removed first.
    pub(super) fn write_all(&self, db: &sled::Db, batch: &mut sled::Batch) -> sled::Result<()> {
        for kv in db.scan_prefix(H) {
            batch.remove(kv?.0);
        }
        batch.insert(META_TALLY, self.head_bytes());
        for (prefix, hist) in [(H_FIRST, &self.first_seen), (H_DUE, &self.due)] {
            for (&minute, &n) in hist {
                batch.insert(h_key(prefix, minute), &n.to_be_bytes()[..]);
            }
        }
        Ok(())
    }

    /// The tally the tree holds; `None` if it has none (a store written before counts were kept).
    pub(super) fn read(db: &sled::Db) -> sled::Result<Option<Tally>> {
        let Some(head) = db.get(META_TALLY)? else {
            return Ok(None);
        };
        let n = |i: usize| {
            head.get(i * 8..i * 8 + 8)
                .map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        };
        let mut t = Tally {
            pending: n(0),
            flagged: n(1),
            declined: n(2),
            ..Tally::default()
        };
        for (prefix, hist) in [(H_FIRST, &mut t.first_seen), (H_DUE, &mut t.due)] {
            for kv in db.scan_prefix(prefix) {
                let (k, v) = kv?;
                let minute = k.get(prefix.len()..).and_then(|b| b.try_into().ok());
                let count = v.as_ref().try_into().ok();
                // A malformed key or value reads as a different histogram, which the recovery
                // check then finds and rewrites.
                if let (Some(m), Some(c)) = (minute, count) {
                    hist.insert(u64::from_be_bytes(m), u64::from_be_bytes(c));
                } else {
                    hist.insert(u64::MAX, u64::MAX);
                }
            }
        }
        Ok(Some(t))
    }

    /// The tally of the entries a scan added to `d` (the recovery check's).
    pub(super) fn counted(d: &Delta) -> Tally {
        // A scan only adds: nothing goes below zero.
        Tally::default().apply(d, &mut sled::Batch::default()).0
    }

    /// The differences from `other`, described for the recovery check's error.
    pub(super) fn differences(&self, other: &Tally) -> Vec<String> {
        let mut out = Vec::new();
        for (what, a, b) in [
            ("pending", self.pending, other.pending),
            ("flagged", self.flagged, other.flagged),
            ("declined", self.declined, other.declined),
        ] {
            if a != b {
                out.push(format!(
                    "the stored {what} count is {a}, the entries hold {b}"
                ));
            }
        }
        if self.first_seen != other.first_seen {
            out.push("the stored first-seen histogram differs from the entries".into());
        }
        if self.due != other.due {
            out.push("the stored due histogram differs from the entries".into());
        }
        out
    }
}

impl Store {
    /// Pending entries due in `[from_ms, to_ms)` as of the last checkpoint: whole minutes from
    /// the histogram, the partial minutes at each end from a key-only range of the due index.
    /// Call under the checkpoint lock, so the index and the tally are of the same checkpoint.
    pub(super) fn due_between(
        &self,
        t: &Tally,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<u64, StateError> {
        if to_ms <= from_ms {
            return Ok(0);
        }
        let count_keys = |lo: u64, hi: u64| -> Result<u64, StateError> {
            let mut n = 0;
            for kv in self.db.range(d_key(lo, "")..d_key(hi, "")) {
                kv.map_err(|e| self.io(e))?;
                n += 1;
            }
            Ok(n)
        };
        let (first, last) = (from_ms.div_ceil(MINUTE_MS), to_ms / MINUTE_MS);
        if first >= last {
            // Inside one minute (or across one boundary without a whole minute between).
            return count_keys(from_ms, to_ms);
        }
        let whole: u64 = t.due.range(first..last).map(|(_, n)| n).sum();
        Ok(count_keys(from_ms, first * MINUTE_MS)? + whole + count_keys(last * MINUTE_MS, to_ms)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(due: Option<u64>, first: u64) -> Facts {
        Facts {
            due,
            first_seen_ms: first,
            flagged: false,
            declined: false,
        }
    }

    #[test]
    fn a_delta_moves_an_entry_between_minutes_and_out() {
        let mut b = sled::Batch::default();
        let mut d = Delta::default();
        d.change(None, Some(f(Some(61_000), 1_000)));
        let (t, _) = Tally::default().apply(&d, &mut b);
        assert_eq!(
            (t.pending, t.due.get(&1), t.first_seen.get(&0)),
            (1, Some(&1), Some(&1))
        );
        let mut d = Delta::default();
        d.change(Some(f(Some(61_000), 1_000)), Some(f(Some(125_000), 1_000)));
        let (t, _) = t.apply(&d, &mut b);
        assert_eq!(
            (t.pending, t.due.get(&1), t.due.get(&2)),
            (1, None, Some(&1))
        );
        let mut d = Delta::default();
        d.change(Some(f(Some(125_000), 1_000)), Some(f(None, 1_000)));
        let (t, _) = t.apply(&d, &mut b);
        assert_eq!(t, Tally::default(), "an emitted entry counts in nothing");
        let mut d = Delta::default();
        d.change(Some(f(Some(1), 1)), None);
        let (t, problems) = t.apply(&d, &mut b);
        assert_eq!(t.pending, 0, "a count never goes below zero");
        assert!(
            problems[0].contains("pending count would go below zero"),
            "{problems:?}"
        );
    }
}
