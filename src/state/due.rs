//! The due index: which payments to poll now, and spreading or pulling in polls.
//!
//! Blocking: these are range scans of the tree; async callers run them on a blocking thread.

use super::{d_key, Entry, StateError, Store, D};

impl Store {
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

    /// How many polls fall due at or before `now_ms` (as of the last checkpoint): the overdue
    /// count when the poller is behind. From the tally, plus a key-only range of the current
    /// minute's index (see `tally`); a key-only range of all of them before the recovery check.
    pub fn count_due(&self, now_ms: u64) -> Result<u64, StateError> {
        let _one = self.checkpointing.lock().expect("checkpoint lock");
        if let Some(t) = self.tally.lock().expect("tally lock").clone() {
            return self.due_between(&t, 0, now_ms.saturating_add(1));
        }
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
}
