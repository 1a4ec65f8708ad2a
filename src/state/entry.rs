//! What state holds per pending payment ([`Entry`] and its parts), what applying a change did
//! ([`Applied`]), and the few fields of a stored entry the layout's invariants read ([`Head`]).

use serde::{Deserialize, Serialize};

use super::HISTORY_LEN;

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
    /// The values the lookup index finds it by (`lookup`).
    pub(super) fn lookups(&self) -> super::lookup::Values<'_> {
        super::lookup::values(
            &self.idempotency_key,
            self.stripe_payment_intent_id.as_deref(),
        )
    }

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

/// The fields of a stored entry that the layout's invariants name, read without parsing the
/// rest (the recovery check and checkpoints need no more).
#[derive(Deserialize)]
pub(super) struct Head<'a> {
    #[serde(borrow)]
    pub(super) id: std::borrow::Cow<'a, str>,
    pub(super) next_poll_ms: u64,
    pub(super) emitted: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub(super) partition: i32,
    /// For the tally (`tally`): when it was first seen, and whether it is flagged or declined.
    pub(super) first_seen_ms: u64,
    #[serde(default)]
    pub(super) flag: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub(super) declines: Option<serde::de::IgnoredAny>,
    /// For the lookup index (`lookup`).
    #[serde(borrow)]
    pub(super) idempotency_key: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    pub(super) stripe_payment_intent_id: Option<std::borrow::Cow<'a, str>>,
}

impl Head<'_> {
    /// The values the lookup index finds it by.
    pub(super) fn lookups(&self) -> super::lookup::Values<'_> {
        super::lookup::values(
            &self.idempotency_key,
            self.stripe_payment_intent_id.as_deref(),
        )
    }

    /// Its place in the due index: `None` once its status was emitted.
    pub(super) fn due(&self) -> Option<u64> {
        self.emitted.is_none().then_some(self.next_poll_ms)
    }
}
