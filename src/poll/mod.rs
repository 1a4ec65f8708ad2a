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
mod outcome;
pub mod ratelimit;
pub mod stripe;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::clock::Clock;
use crate::metrics::events::{emit, PaymentRef, PollFenced, PollUnanswered};
use crate::metrics::METRICS;
use crate::scaleout::Ownership;
use crate::sink::StatusSink;
use crate::state::{Entry, StateError, Store};
use ratelimit::RateLimiter;
use stripe::{Expected, Lookup, LookupError, StripeApi};

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
