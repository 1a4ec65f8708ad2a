//! The poll scheduler: asks Stripe about each pending payment once per interval.
//!
//! A loop takes due payments from the state's due index (most overdue first), and for each one
//! a task waits for the global rate budget, looks the payment up, and records the result. At
//! most `concurrency` lookups are in flight; a payment in flight is never picked twice.
//!
//! Only a final answer from Stripe (`succeeded` with the row's amount and currency, or
//! `canceled`) produces a status event, and only after it is stored (acked by the broker, or
//! committed to the table with `--sink postgres`) is the payment marked emitted (no more
//! polls). Everything else reschedules the payment:
//! - still pending, a decline included (the customer may retry on the same intent): one
//!   interval later, or one stale interval once the payment is stale;
//! - `succeeded` with money that does not match the row, or a double charge: flagged for a
//!   person, asked again at the stale cadence, never written;
//! - no answer (429, 5xx, timeouts, unreadable answers, a failed produce): a jittered
//!   exponential backoff capped at the interval; an unknown intent (404, a search miss) backs
//!   off up to the stale interval.
//!
//! Each outcome is logged with the payment's ids and counted.

pub mod feed;
pub mod money;
pub mod ratelimit;
pub mod stripe;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::clock::Clock;
use crate::metrics::events::{
    emit, AbandonedCancel, MoneyMismatch, PaymentRef, PollFenced, PollPending, PollUnanswered,
};
use crate::metrics::METRICS;
use crate::scaleout::Ownership;
use crate::sink::{Seen, StatusEvent, StatusSink};
use crate::state::{Emitted, Entry, Flag, Position, StateError, Store};
use ratelimit::RateLimiter;
use stripe::{Decline, Expected, FinalStatus, Lookup, LookupError, MismatchKind, StripeApi};

#[derive(Debug, Clone)]
pub struct PollerConfig {
    pub interval: Duration,
    pub concurrency: usize,
    pub retry_backoff: Duration,
    /// Cooldown of the whole budget after a 429.
    pub rate_limit_cooldown: Duration,
    /// How long to wait for in-flight polls at shutdown before abandoning them.
    pub shutdown_grace: Duration,
    /// With the events feed (`--events-feed`): how long a payment Stripe still calls pending
    /// waits for its next retrieve while the feed is healthy (the feed reports a resolution
    /// within one interval). `None`: every payment is retrieved every interval.
    pub fallback_interval: Option<Duration>,
    /// How far before its cursor each feed cycle reads again: Stripe's list is eventually
    /// consistent, so an event may show up a little after events created later.
    pub feed_overlap: Duration,
    /// A payment pending this long after it was first seen is stale ([`Entry::is_stale`]).
    pub stale_after: Duration,
    /// How often stale, unknown and flagged payments are asked about.
    pub stale_interval: Duration,
    /// `--cancel-abandoned-after`: cancel in Stripe an intent still cancelable this long after
    /// its payment was first seen. `None`: never.
    pub cancel_abandoned_after: Option<Duration>,
}

impl PollerConfig {
    fn stale_after_ms(&self) -> u64 {
        self.stale_after.as_millis() as u64
    }
}

pub struct Poller {
    state: Arc<Store>,
    api: Arc<StripeApi>,
    sink: Arc<StatusSink>,
    limiter: Arc<RateLimiter>,
    /// Search's own budget (Stripe limits Search apart from retrieves), taken on top of
    /// `limiter` by a lookup of a row without an intent id.
    search_limiter: Arc<RateLimiter>,
    clock: Clock,
    cfg: PollerConfig,
    in_flight: Arc<Mutex<HashSet<String>>>,
    /// Which partitions this instance acts on (see `scaleout`).
    ownership: Arc<Ownership>,
    /// The events feed's cursor (Unix seconds of the newest event seen), once read from state.
    cursor: tokio::sync::Mutex<Option<i64>>,
    /// When the last feed cycle completed (clock ms; the start until the first one).
    feed_ok_ms: AtomicU64,
    /// The feed was found down and far-off polls were pulled in; cleared by a cycle that works.
    feed_down: std::sync::atomic::AtomicBool,
    /// When the poller last logged that it is behind (clock ms), so it says so once a minute.
    behind_logged_ms: AtomicU64,
}

/// Resolutions from one feed cycle written at once.
const FEED_EMIT_CONCURRENCY: usize = 32;

/// How far behind the most overdue poll may be before the poller reports that the budget does
/// not keep the interval.
const BEHIND_AFTER_MS: u64 = 5_000;

/// How long the loop sleeps when nothing is due or every slot is busy.
const IDLE_TICK: Duration = Duration::from_millis(100);

/// The payment's ids as events log them.
fn payment_ref(e: &Entry) -> PaymentRef<'_> {
    PaymentRef {
        id: &e.id,
        idempotency_key: Some(&e.idempotency_key),
        intent_id: e.stripe_payment_intent_id.as_deref(),
    }
}

/// Jittered exponential backoff after `failures` unanswered polls: base·2^(n-1), capped at the
/// interval, then scaled by a random factor in [0.5, 1.0] so retries of many payments spread.
pub fn backoff(base: Duration, failures: u32, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    exp.min(cap)
        .mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

impl Poller {
    pub fn new(
        state: Arc<Store>,
        api: Arc<StripeApi>,
        sink: Arc<StatusSink>,
        budgets: ratelimit::Budgets,
        clock: Clock,
        cfg: PollerConfig,
        ownership: Arc<Ownership>,
    ) -> Self {
        Poller {
            state,
            api,
            sink,
            limiter: Arc::new(budgets.requests),
            search_limiter: Arc::new(budgets.search),
            clock,
            cfg,
            in_flight: Arc::default(),
            ownership,
            cursor: tokio::sync::Mutex::new(None),
            // A start counts as a cycle: a feed that never works is down two intervals later.
            feed_ok_ms: AtomicU64::new(clock.now_ms()),
            feed_down: std::sync::atomic::AtomicBool::new(false),
            behind_logged_ms: AtomicU64::new(0),
        }
    }

    /// Whether the feed is on and its last cycle completed within two intervals.
    fn feed_healthy(&self) -> bool {
        let ok = self.feed_ok_ms.load(Ordering::Relaxed);
        self.cfg.fallback_interval.is_some()
            && self.clock.now_ms().saturating_sub(ok) <= 2 * self.cfg.interval.as_millis() as u64
    }

    /// When a payment Stripe calls pending is asked about again: after the fallback interval
    /// while the feed watches for its resolution, else after one interval; a stale payment
    /// not sooner than the stale interval.
    fn pending_interval(&self, e: &Entry, now: u64) -> Duration {
        let base = match self.cfg.fallback_interval {
            Some(f) if self.feed_healthy() => f,
            _ => self.cfg.interval,
        };
        if e.is_stale(now, self.cfg.stale_after_ms()) {
            base.max(self.cfg.stale_interval)
        } else {
            base
        }
    }

    /// A feed cycle failed: once the feed has been down two intervals, the polls it left a
    /// fallback interval ahead are pulled into the next interval (once per outage), and
    /// payments are asked about every interval until a cycle works again.
    fn on_feed_failure(&self) {
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

    /// Reports how far behind the most overdue due poll is (a gauge, and a log line a minute at
    /// most while it is more than a few seconds): the rate budget cannot keep the interval for
    /// every pending payment.
    async fn report_lag(&self, oldest_due_ms: Option<u64>, now: u64) -> Result<(), StateError> {
        let behind = oldest_due_ms.map_or(0, |d| now.saturating_sub(d));
        METRICS.poll_lag_seconds.set(behind as f64 / 1000.0);
        let last = self.behind_logged_ms.load(Ordering::Relaxed);
        if behind > BEHIND_AFTER_MS && now.saturating_sub(last) >= 60_000 {
            self.behind_logged_ms.store(now, Ordering::Relaxed);
            let since = now.saturating_sub(BEHIND_AFTER_MS);
            let overdue = crate::state::blocking(&self.state, move |s| s.count_due(since)).await?;
            tracing::warn!(
                behind_s = behind / 1000,
                overdue_payments = overdue,
                pending_payments = self.state.entry_count(),
                stripe_rps = self.limiter.rate(),
                "Stripe budget does not keep the poll interval: polls are behind (raise --stripe-rps within the account's limit, or turn on --events-feed)"
            );
        }
        Ok(())
    }

    /// Runs until `shutdown` turns true. A state error stops it (and the daemon).
    pub async fn run(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), StateError> {
        let this = self;
        let slots = Arc::new(Semaphore::new(this.cfg.concurrency));
        let mut tasks = JoinSet::new();
        while !*shutdown.borrow() {
            while let Some(done) = tasks.try_join_next() {
                done.expect("poll task panicked")?;
            }
            let free = slots.available_permits();
            // Nothing is polled before a partition is assigned (and taken over).
            let due = if free > 0 && this.ownership.owns_any() {
                let in_flight = this.in_flight.lock().expect("in-flight lock").clone();
                let own = this.ownership.clone();
                let now = this.clock.now_ms();
                let due = crate::state::blocking(&this.state, move |s| {
                    s.due(now, free, |id| in_flight.contains(id), |p| own.may_act(p))
                })
                .await?;
                // Most overdue first: the first one says how far behind the budget is.
                this.report_lag(due.first().map(|e| e.next_poll_ms), now)
                    .await?;
                due
            } else {
                Vec::new()
            };
            if due.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(IDLE_TICK) => {}
                    _ = shutdown.changed() => {}
                    Some(done) = tasks.join_next() => { done.expect("poll task panicked")?; }
                }
                continue;
            }
            for entry in due {
                let permit = slots.clone().acquire_owned().await.expect("semaphore open");
                this.in_flight
                    .lock()
                    .expect("in-flight lock")
                    .insert(entry.id.clone());
                let me = this.clone();
                tasks.spawn(async move {
                    let r = me.poll_one(&entry).await;
                    me.in_flight
                        .lock()
                        .expect("in-flight lock")
                        .remove(&entry.id);
                    drop(permit);
                    r
                });
            }
        }
        // Shutdown: let in-flight polls finish briefly. An abandoned poll changes nothing: the
        // payment stays pending in state and is polled again after the restart.
        let _ = tokio::time::timeout(this.cfg.shutdown_grace, async {
            while let Some(done) = tasks.join_next().await {
                let _ = done;
            }
        })
        .await;
        tasks.abort_all();
        Ok(())
    }

    async fn poll_one(&self, e: &Entry) -> Result<(), StateError> {
        let search = e.stripe_payment_intent_id.is_none();
        if search {
            self.search_limiter.acquire().await;
        }
        self.limiter.acquire().await;
        // Checked again after the rate budget's wait, and again once Stripe answered: a
        // revoke or a lapsed lease in between means another instance may own the payment now.
        // A revoke waits for polls under way (the guard counts this one).
        let Some(guard) = self.ownership.begin_poll(e.partition) else {
            emit(PollFenced {
                payment: payment_ref(e),
                partition: e.partition,
                stage: "poll",
                still_assigned: false,
            });
            return Ok(());
        };
        let started = tokio::time::Instant::now();
        let res = self
            .api
            .lookup(
                e.stripe_payment_intent_id.as_deref(),
                &e.idempotency_key,
                Expected {
                    amount: &e.amount,
                    currency: &e.currency,
                },
                e.account.as_deref(),
            )
            .await;
        METRICS
            .stripe_request_seconds
            .observe(started.elapsed().as_secs_f64());
        let now = self.clock.now_ms();
        if !guard.may_finish() {
            let still_assigned = guard.still_assigned();
            emit(PollFenced {
                payment: payment_ref(e),
                partition: e.partition,
                stage: "answer",
                still_assigned,
            });
            if !still_assigned {
                // Released: neither recorded nor emitted; the owner polls it on its own
                // schedule.
                return Ok(());
            }
            // Still assigned, but the lease lapsed (a rebalance in progress, a broker
            // hiccup): nothing is emitted. A "still pending" is recorded as usual, anything
            // else retried after a backoff, so the answer is not asked for again at once when
            // the lease returns. Only a renewed lease makes either durable (the changelog
            // refuses writes without it), and a lost partition drops them.
            if !matches!(res, Ok(Lookup::Pending { .. })) {
                self.reschedule_after_failure(e, now, "fenced", None, self.cfg.interval)?;
                return Ok(());
            }
        }
        match res {
            Ok(Lookup::Pending {
                stripe_status,
                decline,
            }) => match (&e.stripe_payment_intent_id, self.cfg.cancel_abandoned_after) {
                (Some(intent), Some(after))
                    if stripe::CANCELABLE.contains(&stripe_status.as_str())
                        && now.saturating_sub(e.first_seen_ms) >= after.as_millis() as u64 =>
                {
                    self.cancel_abandoned(e, intent, &stripe_status, now)
                        .await?
                }
                _ => self.record_pending(e, &stripe_status, decline.as_ref(), now)?,
            },
            Ok(Lookup::Final {
                status,
                reason,
                seen,
            }) => {
                METRICS.polls.with_label_values(&[status.as_str()]).inc();
                self.emit_final(e, status, reason, seen, now, "poll")
                    .await?;
            }
            Ok(Lookup::Mismatch { kind, detail, seen }) => {
                self.record_mismatch(e, kind, detail, &seen, now, "poll")?;
            }
            Err(err) => {
                emit(PollUnanswered {
                    payment: payment_ref(e),
                    outcome: err.outcome(),
                    error: &err,
                });
                if matches!(err, LookupError::RateLimited) {
                    let l = if search {
                        &self.search_limiter
                    } else {
                        &self.limiter
                    };
                    l.on_rate_limited(self.cfg.rate_limit_cooldown);
                }
                // An unknown intent may never appear (a row whose intent was never created):
                // it backs off to the stale cadence, not one retry per interval for ever.
                let cap = match err {
                    LookupError::NotFound => self.cfg.stale_interval,
                    _ => self.cfg.interval,
                };
                self.reschedule_after_failure(e, now, err.outcome(), None, cap)?;
            }
        }
        Ok(())
    }

    /// `--cancel-abandoned-after`: the intent is still cancelable that long after the payment
    /// was first seen, so it is canceled in Stripe (reason `abandoned`, one idempotent request
    /// in the same budget). Only Stripe's `canceled` answer resolves the payment (`failed`,
    /// reason `abandoned`); a cancel that fails or answers anything else is doubt: nothing is
    /// written, and the payment is asked about again after a backoff.
    async fn cancel_abandoned(
        &self,
        e: &Entry,
        intent: &str,
        stripe_status: &str,
        now: u64,
    ) -> Result<(), StateError> {
        self.limiter.acquire().await;
        let res = self
            .api
            .cancel_abandoned(intent, e.account.as_deref())
            .await;
        let row = Expected {
            amount: &e.amount,
            currency: &e.currency,
        };
        match res.map(|pi| stripe::classify(&pi, row)) {
            Ok(Lookup::Final {
                status: FinalStatus::Failed,
                reason,
                seen,
            }) => {
                emit(AbandonedCancel {
                    payment: payment_ref(e),
                    stripe_status,
                    failure: None,
                });
                self.emit_final(e, FinalStatus::Failed, reason, seen, now, "poll")
                    .await
            }
            other => {
                let why = match &other {
                    Err(LookupError::Rejected(s @ (401 | 403), m)) => format!(
                        "Stripe refused the cancel ({s}: {m}): the key may not write PaymentIntents (a restricted key needs PaymentIntents write for --cancel-abandoned-after)"
                    ),
                    Err(err) => err.to_string(),
                    Ok(l) => format!("Stripe answered {} to the cancel", l.stripe_status()),
                };
                emit(AbandonedCancel {
                    payment: payment_ref(e),
                    stripe_status,
                    failure: Some(&why),
                });
                if matches!(other, Err(LookupError::RateLimited)) {
                    self.limiter.on_rate_limited(self.cfg.rate_limit_cooldown);
                }
                self.reschedule_after_failure(
                    e,
                    now,
                    "cancel_failed",
                    Some(stripe_status),
                    self.cfg.stale_interval,
                )
            }
        }
    }

    /// Stripe still calls the payment pending: asked again after [`Self::pending_interval`].
    /// A decline is recorded (counted once per attempt) and changes nothing else: the customer
    /// may retry on the same intent, and the retry may succeed.
    fn record_pending(
        &self,
        e: &Entry,
        stripe_status: &str,
        decline: Option<&Decline>,
        now: u64,
    ) -> Result<(), StateError> {
        let outcome = if decline.is_some() {
            "declined"
        } else {
            "still_pending"
        };
        let next = self.pending_interval(e, now).as_millis() as u64;
        let mut new_decline = false;
        self.state.update(&e.id, |x| {
            x.failures = 0;
            x.flag = None;
            x.record_poll(now, outcome, Some(stripe_status));
            if let Some(d) = decline {
                new_decline = x.record_decline(now, &d.code, &d.attempt);
            }
            x.next_poll_ms = now + next;
        })?;
        emit(PollPending {
            payment: payment_ref(e),
            stripe_status,
            new_decline: decline
                .filter(|_| new_decline)
                .map(|d| (d.code.as_str(), e.decline_count() + 1)),
            outcome,
        });
        Ok(())
    }

    /// Stripe says `succeeded`, but not with the row's money (or twice): nothing is written.
    /// The payment is flagged for a person (counted, logged with both sides, shown by `state`),
    /// and asked about again at the stale cadence.
    fn record_mismatch(
        &self,
        e: &Entry,
        kind: MismatchKind,
        detail: String,
        seen: &Seen,
        now: u64,
        via: &'static str,
    ) -> Result<(), StateError> {
        emit(MoneyMismatch {
            payment: PaymentRef {
                intent_id: Some(&seen.intent_id),
                ..payment_ref(e)
            },
            kind: kind.as_str(),
            detail: &detail,
            row_amount: &e.amount,
            row_currency: &e.currency,
            stripe_amount_received: seen.amount_received,
            stripe_currency: seen.currency.as_deref(),
            via,
        });
        let next = now + self.cfg.stale_interval.as_millis() as u64;
        self.state.update(&e.id, |x| {
            x.failures = 0;
            if via == "poll" {
                x.record_poll(now, kind.as_str(), Some(&seen.stripe_status));
            }
            let since_ms = match &x.flag {
                Some(f) if f.kind == kind.as_str() => f.since_ms,
                _ => now,
            };
            x.flag = Some(Flag {
                kind: kind.as_str().into(),
                detail: detail.clone(),
                since_ms,
            });
            x.next_poll_ms = next;
        })?;
        Ok(())
    }

    /// One cycle of the events feed (see [`feed`]): lists the events since the cursor, each
    /// page in the rate budget, resolves what they settle beyond doubt, makes the rest due for a
    /// retrieve, and moves the cursor (durable with the next checkpoint, with those changes).
    /// A page that fails ends the cycle with the cursor where it was.
    pub async fn reconcile(&self) -> Result<(), feed::FeedError> {
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
                _ => now_s - feed::RETENTION_S + overlap_s + 3600,
            },
        };
        let since = (start - overlap_s).max(now_s - feed::RETENTION_S + 3600);
        let mut matches = feed::Matches::default();
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
                .list_events(&feed::EVENT_TYPES, since, feed::PAGE, after.as_deref())
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
                    feed::Verdict::Resolve(Lookup::Final {
                        status,
                        reason,
                        seen,
                    }) => finals.push((e, status, reason, seen)),
                    feed::Verdict::Resolve(Lookup::Pending { .. }) => {}
                    feed::Verdict::Resolve(Lookup::Mismatch { kind, detail, seen }) => {
                        if self.ownership.may_act(e.partition) {
                            self.record_mismatch(&e, kind, detail, &seen, now, "feed")?;
                        }
                    }
                    feed::Verdict::Confirm(why) => {
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

    /// Emits a final answer (from a poll or from the events feed, `via`) and marks the payment
    /// emitted once the sink stored it; a failed store keeps it pending for another poll.
    async fn emit_final(
        &self,
        e: &Entry,
        status: FinalStatus,
        reason: Option<String>,
        seen: Seen,
        now: u64,
        via: &'static str,
    ) -> Result<(), StateError> {
        // A double charge stays flagged whatever one of its intents says later: only a person
        // (who refunds one and writes the row) settles it.
        if let Some(f) = e
            .flag
            .as_ref()
            .filter(|f| f.kind == MismatchKind::DoubleCharge.as_str())
        {
            if status == FinalStatus::Succeeded {
                let detail = f.detail.clone();
                return self.record_mismatch(
                    e,
                    MismatchKind::DoubleCharge,
                    detail,
                    &seen,
                    now,
                    via,
                );
            }
        }
        let stripe_status = seen.stripe_status.clone();
        // The CDC stream may have removed it while we asked (someone else finalized the
        // row): then there is nothing to write back.
        if self.state.get(&e.id)?.is_none() {
            tracing::info!(payment_id = %e.id, idempotency_key = %e.idempotency_key, intent_id = e.stripe_payment_intent_id.as_deref(),
                        stripe_status, "poll: final answer for a payment no longer tracked; not emitted");
            return Ok(());
        }
        let ev = StatusEvent::new(e, status.as_str(), reason, &seen, now);
        match self.sink.send_status(&ev).await {
            Ok(()) => {
                METRICS
                    .status_events
                    .with_label_values(&[status.as_str()])
                    .inc();
                tracing::info!(payment_id = %e.id, idempotency_key = %e.idempotency_key, intent_id = ev.stripe_payment_intent_id.as_deref(),
                            status = status.as_str(), stripe_status, reason = ev.reason.as_deref(), event_id = %ev.event_id, via, "status event emitted");
                self.state.update(&e.id, |x| {
                    x.failures = 0;
                    // A resolution from the feed made no call: the poll history stays.
                    if via == "poll" {
                        x.record_poll(now, status.as_str(), Some(&stripe_status));
                    }
                    x.emitted = Some(Emitted {
                        status: status.as_str().into(),
                        event_id: ev.event_id.clone(),
                        at_ms: now,
                        reason: ev.reason.clone(),
                    });
                })?;
            }
            Err(err) => {
                tracing::warn!(payment_id = %e.id, idempotency_key = %e.idempotency_key, intent_id = e.stripe_payment_intent_id.as_deref(),
                            error = %err, "status event not produced; will poll again");
                self.reschedule_after_failure(
                    e,
                    now,
                    "produce_failed",
                    Some(&stripe_status),
                    self.cfg.interval,
                )?;
            }
        }
        Ok(())
    }

    /// No answer: asked again after a jittered backoff that doubles per failure, up to `cap`.
    fn reschedule_after_failure(
        &self,
        e: &Entry,
        now: u64,
        outcome: &str,
        stripe_status: Option<&str>,
        cap: Duration,
    ) -> Result<(), StateError> {
        self.state.update(&e.id, |x| {
            x.failures += 1;
            x.record_poll(now, outcome, stripe_status);
            x.next_poll_ms =
                now + backoff(self.cfg.retry_backoff, x.failures, cap).as_millis() as u64;
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_secs(5);
        let cap = Duration::from_secs(600);
        for _ in 0..100 {
            let b1 = backoff(base, 1, cap);
            assert!(b1 >= Duration::from_millis(2500) && b1 <= base, "{b1:?}");
            let b3 = backoff(base, 3, cap);
            assert!(
                b3 >= Duration::from_secs(10) && b3 <= Duration::from_secs(20),
                "{b3:?}"
            );
            assert!(backoff(base, 40, cap) <= cap);
        }
    }
}
