//! Counts over state for `state stats` and the state gauges, from the tally kept at write time
//! (`tally`): the same cost at any number of pending payments, as of the last checkpoint.

use std::collections::BTreeMap;

use super::tally::MINUTE_MS;
use super::{Entry, StateError, Store, P};
use crate::metrics::METRICS;

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
    /// When the pending payment first seen longest ago was first seen, to the minute (the
    /// minute's start). Which payment it is takes a scan: `state list --limit 1`.
    pub oldest_pending: Option<u64>,
    /// Pending payments per [`AGE_BUCKETS`] entry.
    pub by_age: [u64; AGE_BUCKETS.len()],
    /// Pending payments first seen at least the stale age ago ([`Entry::is_stale`]).
    pub stale: u64,
    /// Pending payments flagged for a person ([`Entry::flag`]).
    pub flagged: u64,
    /// Pending payments with at least one declined attempt.
    pub declined: u64,
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
        .map_or(0, |t| now_ms.saturating_sub(*t));
    m.oldest_pending_age_seconds.set(oldest as f64 / 1000.0);
}

/// The age-bucket series at 0, before the first stats pass (see
/// [`crate::metrics::init_run_series`]).
pub fn init_series() {
    for (age, _) in AGE_BUCKETS {
        METRICS.pending_by_age.with_label_values(&[age]);
    }
}

impl Store {
    /// Calls `f` with every entry, including changes not yet checkpointed, in id order (bytes),
    /// until `f` returns false. The same order whether the daemon runs or not, so `state export`
    /// gives the same lines from both.
    ///
    /// The overlay is copied first and the lock released, so a scan of a large store never
    /// stalls the pipeline; a checkpoint during the scan moves entries from the copy to the tree
    /// and the scan sees each once, as of the copy or newer.
    pub fn scan(&self, mut f: impl FnMut(Entry) -> bool) -> Result<(), StateError> {
        let overlay: BTreeMap<String, Option<Box<Entry>>> = {
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
            .filter_map(|(id, e)| e.as_deref().map(|e| (id, e)))
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
    /// `stale_after_ms`, from the tally: no scan (see `tally` for the resolution). Under the
    /// checkpoint lock, so the tally and the due index are of the same checkpoint.
    pub fn stats(
        &self,
        now_ms: u64,
        interval_ms: u64,
        stale_after_ms: u64,
    ) -> Result<Stats, StateError> {
        let _one = self.checkpointing.lock().expect("checkpoint lock");
        let Some(t) = self.tally.lock().expect("tally lock").clone() else {
            return Err(StateError::Unchecked {
                path: self.path.clone(),
            });
        };
        let entries = self.overlay.lock().expect("state lock").durable_entries;
        let mut s = Stats {
            pending: t.pending,
            awaiting_confirmation: entries.saturating_sub(t.pending),
            due_now: self.due_between(&t, 0, now_ms.saturating_add(1))?,
            due_next_interval: self.due_between(
                &t,
                now_ms.saturating_add(1),
                now_ms.saturating_add(interval_ms).saturating_add(1),
            )?,
            oldest_pending: t.first_seen.keys().next().map(|m| m * MINUTE_MS),
            flagged: t.flagged,
            declined: t.declined,
            ..Stats::default()
        };
        for (&minute, &n) in &t.first_seen {
            let age = now_ms.saturating_sub(minute * MINUTE_MS);
            s.by_age[age_bucket(age)] += n;
            if age >= stale_after_ms {
                s.stale += n;
            }
        }
        Ok(s)
    }

    /// [`Store::stats`] by a scan of every entry, at millisecond resolution: what the tally must
    /// agree with (the tests compare them).
    #[cfg(test)]
    pub(super) fn stats_by_scan(
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
            s.by_age[age_bucket(now_ms.saturating_sub(e.first_seen_ms))] += 1;
            s.stale += u64::from(e.is_stale(now_ms, stale_after_ms));
            s.flagged += u64::from(e.flag.is_some());
            s.declined += u64::from(e.declines.is_some());
            if s.oldest_pending.is_none_or(|t| e.first_seen_ms < t) {
                s.oldest_pending = Some(e.first_seen_ms);
            }
            true
        })?;
        Ok(s)
    }
}

/// The [`AGE_BUCKETS`] entry of an age.
fn age_bucket(age_ms: u64) -> usize {
    AGE_BUCKETS
        .iter()
        .position(|(_, upper)| age_ms < *upper)
        .unwrap_or(AGE_BUCKETS.len() - 1)
}
