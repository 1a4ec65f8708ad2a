//! What `paystream state …` shows, computed from a [`Store`]: the daemon's admin API and the
//! offline CLI both call these functions and print the same types, so the output is the same
//! whichever of them answered.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Entry, StateError, Store, AGE_BUCKETS};
use crate::clock::rfc3339_ms;

/// One payment as `state list` and `state get` show it. Times are absolute (RFC 3339), so the
/// same state prints the same whenever it is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentView {
    pub id: String,
    pub idempotency_key: String,
    pub stripe_payment_intent_id: Option<String>,
    /// Exact decimal string.
    pub amount: String,
    pub currency: String,
    /// `pending` (still polled) or `awaiting-cdc` (status event emitted, waiting for the CDC
    /// stream to show the row final).
    pub state: String,
    pub first_seen: String,
    /// When the next poll is due; none once the status event was emitted.
    pub next_poll: Option<String>,
    pub polls: u64,
    /// Polls in a row without an answer (drives the backoff).
    pub failures: u32,
    pub last_outcome: Option<String>,
    /// The newest polls, oldest first.
    pub history: Vec<PollView>,
    /// The row as the last CDC event showed it.
    pub last_cdc: Option<CdcView>,
    pub status_event: Option<StatusEventView>,
    /// Declined attempts so far (none is final: the customer may retry on the same intent).
    #[serde(default)]
    pub declines: Option<DeclinesView>,
    /// Why Stripe's final answer is not written, when it is not: a person must look.
    #[serde(default)]
    pub flag: Option<FlagView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclinesView {
    pub count: u32,
    pub last_code: String,
    pub last_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlagView {
    /// `amount_mismatch` or `double_charge`.
    pub kind: String,
    pub detail: String,
    pub since: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollView {
    pub at: String,
    pub outcome: String,
    pub stripe_status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdcView {
    pub op: String,
    pub partition: i32,
    pub offset: i64,
    pub lsn: Option<i64>,
    /// When the change was committed in the database.
    pub source_ts: Option<String>,
    /// When paystream applied it.
    pub applied_at: String,
    pub row: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEventView {
    pub status: String,
    pub reason: Option<String>,
    pub event_id: String,
    pub emitted_at: String,
}

impl PaymentView {
    pub fn new(e: &Entry, pending_status: &str) -> Self {
        let last_cdc = e.last_cdc.as_ref().map(|c| CdcView {
            op: c.op.clone(),
            partition: c.partition,
            offset: c.offset,
            lsn: c.lsn,
            source_ts: c.source_ts_ms.map(|t| rfc3339_ms(t.max(0) as u64)),
            applied_at: rfc3339_ms(c.seen_ms),
            row: BTreeMap::from([
                ("id".into(), Some(e.id.clone())),
                ("idempotency_key".into(), Some(e.idempotency_key.clone())),
                ("amount".into(), Some(e.amount.clone())),
                ("currency".into(), Some(e.currency.clone())),
                // Only rows in the pending status are held, so that is what the event showed.
                ("status".into(), Some(pending_status.to_string())),
                (
                    "stripe_payment_intent_id".into(),
                    e.stripe_payment_intent_id.clone(),
                ),
                ("created_at".into(), e.created_at.clone()),
                ("updated_at".into(), e.updated_at.clone()),
            ]),
        });
        PaymentView {
            id: e.id.clone(),
            idempotency_key: e.idempotency_key.clone(),
            stripe_payment_intent_id: e.stripe_payment_intent_id.clone(),
            amount: e.amount.clone(),
            currency: e.currency.clone(),
            state: Status::of(e).as_str().into(),
            first_seen: rfc3339_ms(e.first_seen_ms),
            next_poll: e.emitted.is_none().then(|| rfc3339_ms(e.next_poll_ms)),
            polls: e.polls,
            failures: e.failures,
            last_outcome: e.last_outcome().map(str::to_string),
            history: e
                .history
                .iter()
                .map(|p| PollView {
                    at: rfc3339_ms(p.at_ms),
                    outcome: p.outcome.clone(),
                    stripe_status: p.stripe_status.clone(),
                })
                .collect(),
            last_cdc,
            status_event: e.emitted.as_ref().map(|x| StatusEventView {
                status: x.status.clone(),
                reason: x.reason.clone(),
                event_id: x.event_id.clone(),
                emitted_at: rfc3339_ms(x.at_ms),
            }),
            declines: e.declines.as_ref().map(|d| DeclinesView {
                count: d.count,
                last_code: d.last_code.clone(),
                last_at: rfc3339_ms(d.last_at_ms),
            }),
            flag: e.flag.as_ref().map(|f| FlagView {
                kind: f.kind.clone(),
                detail: f.detail.clone(),
                since: rfc3339_ms(f.since_ms),
            }),
        }
    }
}

/// Which payments `state list --status` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Status {
    Pending,
    AwaitingCdc,
}

impl Status {
    fn of(e: &Entry) -> Status {
        if e.emitted.is_some() {
            Status::AwaitingCdc
        } else {
            Status::Pending
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::AwaitingCdc => "awaiting-cdc",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "pending" => Some(Status::Pending),
            "awaiting-cdc" => Some(Status::AwaitingCdc),
            _ => None,
        }
    }
}

/// The filters of `state list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Only pending payments due now (overdue included), most overdue first.
    pub due: bool,
    /// Only payments first seen at least this long ago.
    pub older_than: Option<Duration>,
    pub status: Option<Status>,
    /// Only payments flagged for a person (amount mismatch, double charge).
    pub flagged: bool,
    pub limit: usize,
}

impl ListQuery {
    /// As URL query parameters for the admin API.
    pub fn to_query(&self) -> String {
        let mut q = vec![format!("limit={}", self.limit)];
        if self.due {
            q.push("due=true".into());
        }
        if let Some(d) = self.older_than {
            q.push(format!("older_than_ms={}", d.as_millis()));
        }
        if let Some(s) = self.status {
            q.push(format!("status={}", s.as_str()));
        }
        if self.flagged {
            q.push("flagged=true".into());
        }
        q.join("&")
    }

    /// Parses [`ListQuery::to_query`]'s form; the error names the parameter.
    pub fn from_query(q: &str) -> Result<ListQuery, String> {
        let mut out = ListQuery {
            due: false,
            older_than: None,
            status: None,
            flagged: false,
            limit: DEFAULT_LIST_LIMIT,
        };
        for (k, v) in query_pairs(q) {
            match k.as_str() {
                "due" => out.due = v == "true",
                "flagged" => out.flagged = v == "true",
                "older_than_ms" => {
                    out.older_than = Some(Duration::from_millis(
                        v.parse().map_err(|_| format!("older_than_ms: {v:?}"))?,
                    ))
                }
                "status" => {
                    out.status = Some(Status::parse(&v).ok_or_else(|| format!("status: {v:?}"))?)
                }
                "limit" => out.limit = v.parse().map_err(|_| format!("limit: {v:?}"))?,
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        Ok(out)
    }
}

pub const DEFAULT_LIST_LIMIT: usize = 100;

/// `state list`: the payments matching `q`, oldest first (by first seen; with `due`, by due
/// time), at most `q.limit`. One scan; memory bounded by the limit, not the state.
pub fn list(
    store: &Store,
    q: &ListQuery,
    now_ms: u64,
    pending_status: &str,
) -> Result<Vec<PaymentView>, StateError> {
    let cutoff = q
        .older_than
        .map(|d| now_ms.saturating_sub(d.as_millis() as u64));
    let status = if q.due {
        Some(Status::Pending)
    } else {
        q.status
    };
    let mut best: BTreeMap<(u64, String), Entry> = BTreeMap::new();
    store.scan(|e| {
        let keep = status.is_none_or(|s| Status::of(&e) == s)
            && (!q.due || e.next_poll_ms <= now_ms)
            && cutoff.is_none_or(|c| e.first_seen_ms <= c)
            && (!q.flagged || e.flag.is_some());
        if keep && q.limit > 0 {
            let order = if q.due {
                e.next_poll_ms
            } else {
                e.first_seen_ms
            };
            best.insert((order, e.id.clone()), e);
            if best.len() > q.limit {
                best.pop_last();
            }
        }
        true
    })?;
    Ok(best
        .values()
        .map(|e| PaymentView::new(e, pending_status))
        .collect())
}

/// `state get`: the payment with this id, or else those with this idempotency key or
/// PaymentIntent id (from the lookup index: it reads what it returns, not every entry).
pub fn find(store: &Store, q: &str, pending_status: &str) -> Result<Vec<PaymentView>, StateError> {
    if let Some(e) = store.get(q)? {
        return Ok(vec![PaymentView::new(&e, pending_status)]);
    }
    Ok(store
        .find_by_value(q)?
        .iter()
        .map(|e| PaymentView::new(e, pending_status))
        .collect())
}

/// `state stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    pub data_dir: String,
    pub data_dir_bytes: u64,
    pub pending: u64,
    pub awaiting_cdc: u64,
    pub oldest_pending: Option<Oldest>,
    pub due_now: u64,
    pub due_next_interval: u64,
    pub poll_interval: String,
    /// Pending payments first seen at least `stale_after` ago (polled at the stale cadence).
    #[serde(default)]
    pub stale: u64,
    #[serde(default)]
    pub stale_after: String,
    /// Pending payments flagged for a person (amount mismatch, double charge).
    #[serde(default)]
    pub flagged: u64,
    /// Pending payments with at least one declined attempt.
    #[serde(default)]
    pub declined: u64,
    pub by_age: Vec<AgeCount>,
    pub offsets: Vec<OffsetView>,
    pub last_checkpoint: Option<String>,
    pub last_checkpoint_age_seconds: Option<f64>,
    pub at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Oldest {
    /// Which payment, when known: `state stats` counts without a scan, so it gives only the
    /// minute (`state list --limit 1` names the payment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The start of the minute it was first seen in.
    pub first_seen: String,
    pub age_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgeCount {
    pub age: String,
    pub pending: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetView {
    pub topic: String,
    pub partition: i32,
    /// The next offset to read, durable in state.
    pub next_offset: i64,
}

pub fn stats(
    store: &Store,
    dir: &Path,
    now_ms: u64,
    interval: Duration,
    stale_after: Duration,
) -> Result<StatsReport, StateError> {
    let s = store.stats(
        now_ms,
        interval.as_millis() as u64,
        stale_after.as_millis() as u64,
    )?;
    let last_cp = store.last_checkpoint_ms()?;
    let secs = |ms: u64| now_ms.saturating_sub(ms) as f64 / 1000.0;
    let mut offsets: Vec<OffsetView> = store
        .positions()?
        .into_iter()
        .map(|(at, next_offset)| OffsetView {
            topic: at.name().into_owned(),
            partition: at.partition(),
            next_offset,
        })
        .collect();
    offsets.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(StatsReport {
        data_dir: dir.display().to_string(),
        data_dir_bytes: dir_size(dir),
        pending: s.pending,
        awaiting_cdc: s.awaiting_confirmation,
        oldest_pending: s.oldest_pending.map(|t| Oldest {
            id: None,
            first_seen: rfc3339_ms(t),
            age_seconds: secs(t),
        }),
        due_now: s.due_now,
        due_next_interval: s.due_next_interval,
        poll_interval: humantime::format_duration(interval).to_string(),
        stale: s.stale,
        stale_after: humantime::format_duration(stale_after).to_string(),
        flagged: s.flagged,
        declined: s.declined,
        by_age: AGE_BUCKETS
            .iter()
            .zip(s.by_age)
            .map(|((age, _), pending)| AgeCount {
                age: age.to_string(),
                pending,
            })
            .collect(),
        offsets,
        last_checkpoint: last_cp.map(rfc3339_ms),
        last_checkpoint_age_seconds: last_cp.map(secs),
        at: rfc3339_ms(now_ms),
    })
}

/// Bytes of every file under `dir` (sled's files; it has no subfolders beyond `blobs/`).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|d| match d.metadata() {
            Ok(m) if m.is_dir() => dir_size(&d.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// `k=v` pairs of a URL query, percent-decoded.
pub fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = || u8::from_str_radix(std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?, 16).ok();
        match (b[i], hex()) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_round_trip_through_the_url() {
        let q = ListQuery {
            due: true,
            older_than: Some(Duration::from_secs(7200)),
            status: Some(Status::AwaitingCdc),
            flagged: true,
            limit: 7,
        };
        assert_eq!(ListQuery::from_query(&q.to_query()).unwrap(), q);
        assert!(ListQuery::from_query("limit=x")
            .unwrap_err()
            .contains("limit"));
        assert!(ListQuery::from_query("bogus=1")
            .unwrap_err()
            .contains("bogus"));
    }

    #[test]
    fn ids_survive_percent_encoding() {
        for s in ["pi_123", "k 1/2?&=%", "ключ"] {
            let q = format!("q={}", percent_encode(s));
            assert_eq!(query_pairs(&q), vec![("q".to_string(), s.to_string())]);
        }
    }
}
