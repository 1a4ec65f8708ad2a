//! The events feed (`--events-feed`): resolves pending payments from Stripe's event list, a few
//! pages per interval, instead of one retrieve per payment per interval.
//!
//! Every half poll interval (and at start) a cycle lists `payment_intent.succeeded`,
//! `payment_intent.canceled` and `payment_intent.payment_failed` events created since the
//! cursor, in one listing (`types[]`, newest first, paged to the end), matches them to pending payments by intent id (or by `metadata.idempotency_key` for a
//! row that has no intent id yet), and acts on each match:
//! - **resolved from the feed**: a `succeeded` or `canceled` event whose snapshot is final.
//!   Both states are terminal for a PaymentIntent, so no later change can contradict them;
//! - **confirmed by a retrieve** (the payment's poll is made due now), where the snapshot is
//!   doubt: a `payment_failed` event (the customer may retry with another payment method: the
//!   snapshot says nothing of what came after), a snapshot whose status is not final, or a
//!   match by idempotency key while the row names another intent.
//!
//! Each page takes a slot of the same rate budget as the retrieves. The cursor is the newest
//! event's `created` seen in a complete listing (why that skips nothing: `Poller::reconcile`),
//! kept in state beside the source positions ([`crate::state::Position::FeedCursor`]), so it
//! becomes durable in the same checkpoint as the resolutions it led to: a crash re-reads those
//! events, never skips them. Each cycle re-reads a minute before the cursor, since the list is
//! eventually consistent; re-reading is harmless (a resolved payment is not matched again).
//!
//! With the feed on, a payment's first retrieve comes one fallback interval after it was first
//! seen, and a payment Stripe still calls pending waits the fallback interval for its next one:
//! the feed reports a resolution within one interval, so retrieves are the safety net, not the
//! way answers arrive. The first cycle ever reads back Stripe's whole retention (30 days), so
//! payments that resolved before paystream first ran are found without a retrieve each. When
//! cycles fail for two intervals (a start counts as a cycle), the polls left a fallback interval
//! ahead are pulled into the next interval once, and every payment is asked about each
//! interval again until a cycle works (see [`super::Poller`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use futures::StreamExt;

use super::stripe::{classify, Expected, IntentEvent, Lookup, LookupError, MismatchKind};
use super::{Poller, FEED_EMIT_CONCURRENCY};
use crate::metrics::METRICS;
use crate::state::{Entry, Position, StateError};

/// The event types a cycle lists.
pub const EVENT_TYPES: [&str; 3] = [
    "payment_intent.succeeded",
    "payment_intent.canceled",
    "payment_intent.payment_failed",
];

/// Events per page (Stripe's maximum).
pub const PAGE: u32 = 100;

/// Stripe keeps events 30 days: a cursor older than that starts where the list does.
pub const RETENTION_S: i64 = 30 * 24 * 3600;

/// What a cycle does with one pending payment it found events for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Final without doubt: emit it, no retrieve.
    Resolve(Lookup),
    /// Doubt: retrieve the intent now and let that answer decide.
    Confirm(&'static str),
}

/// Events of one cycle, by intent id and by idempotency key.
#[derive(Default)]
pub struct Matches {
    by_intent: HashMap<String, Vec<IntentEvent>>,
    by_key: HashMap<String, Vec<String>>,
}

impl Matches {
    pub fn add(&mut self, ev: IntentEvent) {
        let intent = ev.data.object.id.clone();
        if let Some(key) = ev
            .data
            .object
            .metadata
            .as_ref()
            .and_then(|m| m.get("idempotency_key"))
            .and_then(|v| v.as_str())
        {
            let ids = self.by_key.entry(key.to_string()).or_default();
            if !ids.contains(&intent) {
                ids.push(intent.clone());
            }
        }
        let evs = self.by_intent.entry(intent).or_default();
        if !evs.iter().any(|e| e.id == ev.id) {
            evs.push(ev);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_intent.is_empty()
    }

    /// The verdict for a pending payment, if the cycle saw events for it.
    pub fn verdict(&self, e: &Entry) -> Option<Verdict> {
        let row = Expected {
            amount: &e.amount,
            currency: &e.currency,
        };
        if let Some(v) = self.double_charge(&e.idempotency_key) {
            return Some(v);
        }
        let known = e.declines.as_ref().map(|d| d.last_attempt.as_str());
        if let Some(intent) = &e.stripe_payment_intent_id {
            if let Some(evs) = self.by_intent.get(intent) {
                return Some(judge(evs, row, known));
            }
        }
        let intents = self.by_key.get(&e.idempotency_key)?;
        match &e.stripe_payment_intent_id {
            // The row names an intent, and the key's events are another's: doubt.
            Some(own) if !intents.contains(own) => Some(Verdict::Confirm("other_intent")),
            _ => {
                // Several intents for one key: one that succeeded means the money moved;
                // anything else is confirmed by the lookup, which weighs them all.
                let verdicts: Vec<Verdict> = intents
                    .iter()
                    .map(|i| judge(&self.by_intent[i], row, known))
                    .collect();
                let succeeded = verdicts.iter().find(|v| {
                    matches!(v, Verdict::Resolve(Lookup::Final { status, .. }) if *status == super::stripe::FinalStatus::Succeeded)
                });
                // A canceled intent found by key alone is not the payment's failure: the
                // payment service may have made (or make) another intent for the key, so it
                // is confirmed by a lookup, which never fails a payment on a key match.
                match (succeeded, verdicts.len()) {
                    (Some(v), _) => Some(v.clone()),
                    (None, 1) => match verdicts.into_iter().next() {
                        Some(Verdict::Resolve(Lookup::Final { .. })) => {
                            Some(Verdict::Confirm("canceled_by_key"))
                        }
                        v => v,
                    },
                    (None, _) => Some(Verdict::Confirm("several_intents")),
                }
            }
        }
    }
}

impl Matches {
    /// More than one intent of the key succeeded in this cycle's events: a double charge,
    /// flagged whatever intent the row names (a cycle sees only its own window of events; a
    /// double charge whose two successes fall in different cycles is found only by Search,
    /// for a row without an intent id).
    fn double_charge(&self, key: &str) -> Option<Verdict> {
        let succeeded: Vec<&IntentEvent> = self
            .by_key
            .get(key)?
            .iter()
            .filter_map(|i| {
                self.by_intent[i]
                    .iter()
                    .find(|ev| ev.data.object.status == "succeeded")
            })
            .collect();
        let [first, _, ..] = succeeded.as_slice() else {
            return None;
        };
        let ids: Vec<&str> = succeeded
            .iter()
            .map(|ev| ev.data.object.id.as_str())
            .collect();
        Some(Verdict::Resolve(Lookup::Mismatch {
            kind: MismatchKind::DoubleCharge,
            detail: format!(
                "{} intents succeeded for one idempotency key: {}",
                ids.len(),
                ids.join(", ")
            ),
            seen: super::stripe::seen(&first.data.object),
        }))
    }
}

/// One intent's events of a cycle → the verdict. A terminal event (succeeded, canceled) whose
/// snapshot is final resolves, whatever else was seen (nothing follows a terminal state): to
/// a status, or to a flag when the money does not match the row. Otherwise the intent is
/// retrieved, but not for a `payment_failed` event of the decline the payment already recorded
/// (`known_decline`, its attempt): each cycle re-reads the overlap, and a payment stays pending
/// after a decline, so without this every cycle of that window would retrieve it again.
pub fn judge(events: &[IntentEvent], row: Expected<'_>, known_decline: Option<&str>) -> Verdict {
    let terminal = events.iter().find_map(|ev| {
        let kind_terminal = matches!(
            ev.kind.as_str(),
            "payment_intent.succeeded" | "payment_intent.canceled"
        );
        match classify(&ev.data.object, row) {
            l @ (Lookup::Final { .. } | Lookup::Mismatch { .. }) if kind_terminal => Some(l),
            _ => None,
        }
    });
    let failed = |e: &&IntentEvent| e.kind == "payment_intent.payment_failed";
    let known = |e: &IntentEvent| match classify(&e.data.object, row) {
        Lookup::Pending {
            decline: Some(d), ..
        } => known_decline == Some(d.attempt.as_str()),
        _ => false,
    };
    match terminal {
        Some(l) => Verdict::Resolve(l),
        None if events.iter().filter(failed).any(|e| !known(e)) => {
            Verdict::Confirm("payment_failed")
        }
        // Only declines already recorded: nothing new to ask Stripe.
        None if events.iter().all(|e| failed(&e)) => Verdict::Resolve(Lookup::Pending {
            stripe_status: "requires_payment_method".into(),
            decline: None,
        }),
        None => Verdict::Confirm("snapshot_not_final"),
    }
}

/// Why a cycle stopped early; the cursor does not move, and the next cycle reads again.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// Stripe did not answer a page (counted by outcome; retried next interval).
    #[error("events page: {0}")]
    Stripe(#[from] LookupError),
    /// The local store failed: the poller stops the daemon on the same error.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

impl FeedError {
    /// A Stripe failure retries at the next cycle; a state error stops the daemon.
    pub fn retryable(&self) -> bool {
        match self {
            FeedError::Stripe(e) => e.retryable(),
            FeedError::State(e) => e.retryable(),
        }
    }
}

impl Poller {
    /// Whether the feed is on and its last cycle completed within two intervals.
    pub(super) fn feed_healthy(&self) -> bool {
        let ok = self.feed_ok_ms.load(Ordering::Relaxed);
        self.cfg.fallback_interval.is_some()
            && self.clock.now_ms().saturating_sub(ok) <= 2 * self.cfg.interval.as_millis() as u64
    }

    /// A feed cycle failed: once the feed has been down two intervals, the polls it left a
    /// fallback interval ahead are pulled into the next interval (once per outage), and
    /// payments are asked about every interval until a cycle works again.
    pub(super) fn on_feed_failure(&self) {
        if self.feed_healthy() || self.feed_down.swap(true, Ordering::Relaxed) {
            return;
        }
        let now = self.clock.now_ms();
        match self
            .state
            .pull_in(now, self.cfg.interval.as_millis() as u64)
        {
            Ok(n) => tracing::warn!(
                pulled_in = n,
                "events feed down for two intervals: polling every interval until it answers again"
            ),
            Err(e) => tracing::error!(error = %e, "events feed down: polls not pulled in"),
        }
    }

    /// One cycle of the events feed (see the module doc): lists the events since the cursor, each
    /// page in the rate budget, resolves what they settle beyond doubt, makes the rest due for a
    /// retrieve, and moves the cursor (durable with the next checkpoint, with those changes).
    /// A page that fails ends the cycle with the cursor where it was.
    pub async fn reconcile(&self) -> Result<(), FeedError> {
        let mut cursor = self.cursor.lock().await;
        let now = self.clock.now_ms();
        let now_s = (now / 1000) as i64;
        let overlap_s = self.cfg.feed_overlap.as_secs() as i64;
        let start = match *cursor {
            Some(c) => c,
            None => match self.state.stored(&Position::FeedCursor) {
                Ok(Some(c)) => c,
                // First start: everything Stripe still lists, so payments that resolved
                // before paystream ever ran are found too (a one-time read of the retention).
                _ => now_s - RETENTION_S + overlap_s + 3600,
            },
        };
        let since = (start - overlap_s).max(now_s - RETENTION_S + 3600);
        let mut matches = Matches::default();
        // The cursor this cycle may move to. Why the newest `created` seen in ONE complete
        // listing cannot pass an event not yet read: Stripe lists newest first, so the first
        // page holds the newest events visible when the listing began. An event this listing
        // did not read is either (a) created after that first page was served, so its
        // `created` is at or after every event the listing saw (the same second at least:
        // `since` is inclusive, `gte`), or (b) created earlier but not yet visible (the list
        // is eventually consistent), which the next cycle's re-read of the overlap before the
        // cursor covers. Both need the three types in one listing (`types[]`): listed one
        // after another, a later type's newer events moved the cursor past events of an
        // earlier type created while the later one was listed. A listing that fails part way
        // leaves the cursor where it was.
        let mut newest = start;
        let (mut pages, mut events) = (0u64, 0u64);
        let mut after: Option<String> = None;
        loop {
            self.limiter.acquire().await;
            let page = match self
                .api
                .list_events(&EVENT_TYPES, since, PAGE, after.as_deref())
                .await
            {
                Ok(p) => p,
                Err(err) => {
                    METRICS.feed_pages.with_label_values(&[err.outcome()]).inc();
                    if matches!(err, LookupError::RateLimited) {
                        self.limiter.on_rate_limited(self.cfg.rate_limit_cooldown);
                    }
                    tracing::warn!(outcome = err.outcome(), error = %err, "events feed page failed; the cycle ends, the cursor stays");
                    self.on_feed_failure();
                    return Err(err.into());
                }
            };
            pages += 1;
            METRICS.feed_pages.with_label_values(&["ok"]).inc();
            events += page.data.len() as u64;
            for ev in page.data {
                newest = newest.max(ev.created);
                after = Some(ev.id.clone());
                matches.add(ev);
            }
            if !page.has_more || after.is_none() {
                break;
            }
        }
        METRICS.feed_events.inc_by(events);
        let (mut resolved, mut confirm) = (0u64, 0u64);
        if !matches.is_empty() {
            // One scan of state finds the payments the events are about (the feed's events are
            // few beside the payments; an index by intent would cost every event a write).
            let in_flight = self.in_flight.lock().expect("in-flight lock").clone();
            let hits = crate::state::blocking(&self.state, move |s| {
                let mut hits = Vec::new();
                s.scan(|e| {
                    if e.emitted.is_none() && !in_flight.contains(&e.id) {
                        if let Some(v) = matches.verdict(&e) {
                            hits.push((e, v));
                        }
                    }
                    true
                })
                .map(|()| hits)
            })
            .await?;
            let mut finals = Vec::new();
            for (e, verdict) in hits {
                match verdict {
                    Verdict::Resolve(Lookup::Final {
                        status,
                        reason,
                        seen,
                    }) => finals.push((e, status, reason, seen)),
                    Verdict::Resolve(Lookup::Pending { .. }) => {}
                    Verdict::Resolve(Lookup::Mismatch { kind, detail, seen }) => {
                        if self.ownership.may_act(e.partition) {
                            self.record_mismatch(&e, kind, detail, &seen, now, "feed")?;
                        }
                    }
                    Verdict::Confirm(why) => {
                        if !self.ownership.may_act(e.partition) {
                            continue;
                        }
                        confirm += 1;
                        METRICS.feed_matches.with_label_values(&["confirm"]).inc();
                        tracing::info!(payment_id = %e.id, idempotency_key = %e.idempotency_key, intent_id = e.stripe_payment_intent_id.as_deref(),
                            why, "events feed: doubt, retrieving the intent now");
                        self.state.update(&e.id, |x| x.next_poll_ms = now)?;
                    }
                }
            }
            // The resolutions are written concurrently: one at a time, a cycle that found
            // 20,000 took 32 s on this machine (each waits for the sink to store it).
            let emits = futures::stream::iter(finals.into_iter().map(
                |(e, status, reason, seen)| async move {
                    // Owned partitions only, under the lease, as a poll (scale-out).
                    let Some(guard) = self.ownership.begin_poll(e.partition) else {
                        return Ok(false);
                    };
                    if !guard.may_finish() {
                        return Ok(false);
                    }
                    // Held as in flight meanwhile, so a poll of it does not emit as well.
                    self.in_flight
                        .lock()
                        .expect("in-flight lock")
                        .insert(e.id.clone());
                    let r = self.emit_final(&e, status, reason, seen, now, "feed").await;
                    self.in_flight.lock().expect("in-flight lock").remove(&e.id);
                    r.map(|()| true)
                },
            ))
            .buffer_unordered(FEED_EMIT_CONCURRENCY)
            .collect::<Vec<Result<bool, StateError>>>()
            .await;
            for r in emits {
                if r? {
                    resolved += 1;
                    METRICS.feed_matches.with_label_values(&["resolved"]).inc();
                }
            }
        }
        self.state.advance(&Position::FeedCursor, newest);
        *cursor = Some(newest);
        self.feed_ok_ms
            .store(self.clock.now_ms(), Ordering::Relaxed);
        self.feed_down.store(false, Ordering::Relaxed);
        tracing::info!(
            pages,
            events,
            resolved,
            confirm,
            cursor = newest,
            "events feed cycle"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::stripe::{FinalStatus, IntentEventData, IntentView};
    use super::*;

    fn event(id: &str, kind: &str, intent: &str, status: &str, key: Option<&str>) -> IntentEvent {
        IntentEvent {
            id: id.into(),
            created: 1,
            kind: format!("payment_intent.{kind}"),
            data: IntentEventData {
                object: IntentView {
                    id: intent.into(),
                    status: status.into(),
                    // The rows below hold 1.00 USD.
                    amount_received: Some(if status == "succeeded" { 100 } else { 0 }),
                    currency: Some("usd".into()),
                    cancellation_reason: None,
                    last_payment_error: (kind == "payment_failed").then(|| {
                        super::super::stripe::PaymentError {
                            code: Some("card_declined".into()),
                            decline_code: None,
                            charge: Some(format!("ch_{id}")),
                            payment_method: None,
                        }
                    }),
                    metadata: key
                        .map(|k| [("idempotency_key".to_string(), serde_json::json!(k))].into()),
                },
            },
        }
    }

    fn entry(key: &str, intent: Option<&str>) -> Entry {
        serde_json::from_value(serde_json::json!({
            "id": "1", "idempotency_key": key, "amount": "1.00", "currency": "usd",
            "stripe_payment_intent_id": intent, "created_at": null, "partition": 0,
            "first_seen_ms": 0, "next_poll_ms": 0, "failures": 0, "polls": 0, "emitted": null
        }))
        .unwrap()
    }

    fn resolved(v: Option<Verdict>) -> Option<FinalStatus> {
        match v {
            Some(Verdict::Resolve(Lookup::Final { status, .. })) => Some(status),
            _ => None,
        }
    }

    #[test]
    fn terminal_events_resolve_and_failures_are_confirmed() {
        let mut m = Matches::default();
        m.add(event("e1", "succeeded", "pi_a", "succeeded", None));
        m.add(event("e2", "canceled", "pi_b", "canceled", None));
        m.add(event(
            "e3",
            "payment_failed",
            "pi_c",
            "requires_payment_method",
            None,
        ));
        // A failure, then a retry that succeeded: the money moved.
        m.add(event(
            "e4",
            "payment_failed",
            "pi_d",
            "requires_payment_method",
            None,
        ));
        m.add(event("e5", "succeeded", "pi_d", "succeeded", None));
        // A terminal type whose snapshot is not final: doubt.
        m.add(event("e6", "succeeded", "pi_e", "processing", None));
        assert_eq!(
            resolved(m.verdict(&entry("k", Some("pi_a")))),
            Some(FinalStatus::Succeeded)
        );
        assert_eq!(
            resolved(m.verdict(&entry("k", Some("pi_b")))),
            Some(FinalStatus::Failed)
        );
        assert_eq!(
            m.verdict(&entry("k", Some("pi_c"))),
            Some(Verdict::Confirm("payment_failed"))
        );
        assert_eq!(
            resolved(m.verdict(&entry("k", Some("pi_d")))),
            Some(FinalStatus::Succeeded)
        );
        assert_eq!(
            m.verdict(&entry("k", Some("pi_e"))),
            Some(Verdict::Confirm("snapshot_not_final"))
        );
        assert_eq!(
            m.verdict(&entry("k", Some("pi_zzz"))),
            None,
            "no event, no verdict"
        );
    }

    #[test]
    fn matching_by_idempotency_key() {
        let mut m = Matches::default();
        m.add(event(
            "e1",
            "succeeded",
            "pi_a",
            "succeeded",
            Some("order-1"),
        ));
        m.add(event("e2", "canceled", "pi_b", "canceled", Some("order-2")));
        m.add(event("e3", "canceled", "pi_c", "canceled", Some("order-2")));
        // The row has no intent id yet: the key's intent decides.
        assert_eq!(
            resolved(m.verdict(&entry("order-1", None))),
            Some(FinalStatus::Succeeded)
        );
        // The row names another intent than the key's events: doubt.
        assert_eq!(
            m.verdict(&entry("order-1", Some("pi_other"))),
            Some(Verdict::Confirm("other_intent"))
        );
        // Two intents for one key, neither succeeded: the lookup weighs them.
        assert_eq!(
            m.verdict(&entry("order-2", None)),
            Some(Verdict::Confirm("several_intents"))
        );
        // One canceled intent found by key alone: not the payment's failure.
        m.add(event("e4", "canceled", "pi_d", "canceled", Some("order-3")));
        assert_eq!(
            m.verdict(&entry("order-3", None)),
            Some(Verdict::Confirm("canceled_by_key"))
        );
        // The same event seen twice (the overlap) counts once.
        m.add(event(
            "e1",
            "succeeded",
            "pi_a",
            "succeeded",
            Some("order-1"),
        ));
        assert_eq!(m.by_intent["pi_a"].len(), 1);
    }

    #[test]
    fn a_decline_already_recorded_is_not_retrieved_again() {
        let mut m = Matches::default();
        m.add(event(
            "e1",
            "payment_failed",
            "pi_a",
            "requires_payment_method",
            None,
        ));
        let mut e = entry("k", Some("pi_a"));
        assert_eq!(m.verdict(&e), Some(Verdict::Confirm("payment_failed")));
        // The retrieve recorded that attempt (the event's charge): the re-read is no doubt.
        e.record_decline(1, "card_declined", "ch_e1");
        assert!(matches!(
            m.verdict(&e),
            Some(Verdict::Resolve(Lookup::Pending { .. }))
        ));
        // A newer decline of the same intent is.
        m.add(event(
            "e2",
            "payment_failed",
            "pi_a",
            "requires_payment_method",
            None,
        ));
        assert_eq!(m.verdict(&e), Some(Verdict::Confirm("payment_failed")));
    }

    fn flag_of(v: Option<Verdict>) -> Option<MismatchKind> {
        match v {
            Some(Verdict::Resolve(Lookup::Mismatch { kind, .. })) => Some(kind),
            _ => None,
        }
    }

    #[test]
    fn money_that_does_not_match_is_flagged_not_resolved() {
        let mut m = Matches::default();
        let mut partial = event("e1", "succeeded", "pi_a", "succeeded", None);
        partial.data.object.amount_received = Some(50);
        m.add(partial);
        let mut other_currency = event("e2", "succeeded", "pi_b", "succeeded", None);
        other_currency.data.object.currency = Some("eur".into());
        m.add(other_currency);
        assert_eq!(
            flag_of(m.verdict(&entry("k", Some("pi_a")))),
            Some(MismatchKind::Amount)
        );
        assert_eq!(
            flag_of(m.verdict(&entry("k", Some("pi_b")))),
            Some(MismatchKind::Amount)
        );
    }

    #[test]
    fn two_intents_that_succeeded_for_one_key_are_a_double_charge() {
        let mut m = Matches::default();
        m.add(event(
            "e1",
            "succeeded",
            "pi_a",
            "succeeded",
            Some("order-1"),
        ));
        m.add(event(
            "e2",
            "succeeded",
            "pi_b",
            "succeeded",
            Some("order-1"),
        ));
        // Whether the row names one of them or none.
        for intent in [Some("pi_a"), None] {
            match m.verdict(&entry("order-1", intent)) {
                Some(Verdict::Resolve(Lookup::Mismatch { kind, detail, .. })) => {
                    assert_eq!(kind, MismatchKind::DoubleCharge);
                    assert!(
                        detail.contains("pi_a") && detail.contains("pi_b"),
                        "{detail}"
                    );
                }
                other => panic!("{intent:?}: {other:?}"),
            }
        }
    }
}
