//! The poll scheduler: asks Stripe about each pending payment once per interval.
//!
//! A loop takes due payments from the state's due index (most overdue first), and for each one
//! a task waits for the global rate budget, looks the payment up, and records the result. At
//! most `concurrency` lookups are in flight; a payment in flight is never picked twice.
//!
//! Only a final answer from Stripe produces a status event, and only after it is stored (acked
//! by the broker, or committed to the table with `--sink postgres`) is the payment marked
//! emitted (no more polls). Everything else (still pending, 404, 429,
//! 5xx, timeouts, unreadable answers, a failed produce) reschedules the payment: a plain
//! pending answer one interval later, an error after a jittered exponential backoff capped at
//! the interval. Each outcome is logged with the payment's ids and counted.

pub mod ratelimit;
pub mod stripe;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::clock::Clock;
use crate::metrics::METRICS;
use crate::sink::{StatusEvent, StatusSink};
use crate::source::handoff::Ownership;
use crate::state::{Emitted, Entry, StateError, Store};
use ratelimit::RateLimiter;
use stripe::{Lookup, LookupError, StripeApi};

#[derive(Debug, Clone)]
pub struct PollerConfig {
    pub interval: Duration,
    pub concurrency: usize,
    pub retry_backoff: Duration,
    /// Cooldown of the whole budget after a 429.
    pub rate_limit_cooldown: Duration,
    /// How long to wait for in-flight polls at shutdown before abandoning them.
    pub shutdown_grace: Duration,
}

pub struct Poller {
    state: Arc<Store>,
    api: Arc<StripeApi>,
    sink: Arc<StatusSink>,
    limiter: Arc<RateLimiter>,
    clock: Clock,
    cfg: PollerConfig,
    in_flight: Arc<Mutex<HashSet<String>>>,
    /// Which partitions this instance acts on (see `source::handoff`).
    ownership: Arc<Ownership>,
}

/// How long the loop sleeps when nothing is due or every slot is busy.
const IDLE_TICK: Duration = Duration::from_millis(100);

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
        limiter: Arc<RateLimiter>,
        clock: Clock,
        cfg: PollerConfig,
        ownership: Arc<Ownership>,
    ) -> Self {
        Poller {
            state,
            api,
            sink,
            limiter,
            clock,
            cfg,
            in_flight: Arc::default(),
            ownership,
        }
    }

    /// Runs until `shutdown` turns true. A state error stops it (and the daemon).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), StateError> {
        let this = Arc::new(self);
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
                let own = &this.ownership;
                this.state.due(
                    this.clock.now_ms(),
                    free,
                    |id| in_flight.contains(id),
                    |p| own.may_act(p),
                )?
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
        self.limiter.acquire().await;
        // Checked again after the rate budget's wait, and again once Stripe answered: a
        // revoke or a lapsed lease in between means another instance may own the payment now.
        // A revoke waits for polls under way (the guard counts this one).
        let Some(guard) = self.ownership.begin_poll(e.partition) else {
            METRICS.polls_fenced.with_label_values(&["poll"]).inc();
            tracing::debug!(payment_id = %e.id, partition = e.partition, "poll withheld: partition not owned or group lease lapsed");
            return Ok(());
        };
        let started = tokio::time::Instant::now();
        let res = self
            .api
            .lookup(e.stripe_payment_intent_id.as_deref(), &e.idempotency_key)
            .await;
        METRICS
            .stripe_request_seconds
            .observe(started.elapsed().as_secs_f64());
        let now = self.clock.now_ms();
        let interval_ms = self.cfg.interval.as_millis() as u64;
        if !guard.may_finish() {
            METRICS.polls_fenced.with_label_values(&["answer"]).inc();
            if !guard.still_assigned() {
                // Released: neither recorded nor emitted; the owner polls it on its own
                // schedule.
                tracing::info!(payment_id = %e.id, partition = e.partition, "Stripe answer dropped: partition no longer owned");
                return Ok(());
            }
            // Still assigned, but the lease lapsed (a rebalance in progress, a broker
            // hiccup): nothing is emitted. A "still pending" is recorded as usual, anything
            // else retried after a backoff, so the answer is not asked for again at once when
            // the lease returns. Only a renewed lease makes either durable (the changelog
            // refuses writes without it), and a lost partition drops them.
            tracing::info!(payment_id = %e.id, partition = e.partition, "group lease lapsed while Stripe answered: nothing emitted");
            if !matches!(res, Ok(Lookup::Pending { .. })) {
                self.reschedule_after_failure(e, now, "fenced", None)?;
                return Ok(());
            }
        }
        match res {
            Ok(Lookup::Pending { stripe_status }) => {
                METRICS.polls.with_label_values(&["still_pending"]).inc();
                tracing::info!(payment_id = %e.id, idempotency_key = %e.idempotency_key, intent_id = e.stripe_payment_intent_id.as_deref(), stripe_status, "poll: still pending");
                self.state.update(&e.id, |x| {
                    x.failures = 0;
                    x.record_poll(now, "still_pending", Some(&stripe_status));
                    x.next_poll_ms = now + interval_ms;
                })?;
            }
            Ok(Lookup::Final {
                status,
                stripe_status,
                reason,
                intent_id,
            }) => {
                METRICS.polls.with_label_values(&[status.as_str()]).inc();
                // The CDC stream may have removed it while we asked (someone else finalized the
                // row): then there is nothing to write back.
                if self.state.get(&e.id)?.is_none() {
                    tracing::info!(payment_id = %e.id, idempotency_key = %e.idempotency_key, intent_id = e.stripe_payment_intent_id.as_deref(),
                        stripe_status, "poll: final answer for a payment no longer tracked; not emitted");
                    return Ok(());
                }
                let ev = StatusEvent::new(
                    e,
                    status.as_str(),
                    &stripe_status,
                    reason,
                    Some(intent_id),
                    now,
                );
                match self.sink.send_status(&ev).await {
                    Ok(()) => {
                        METRICS
                            .status_events
                            .with_label_values(&[status.as_str()])
                            .inc();
                        tracing::info!(payment_id = %e.id, idempotency_key = %e.idempotency_key, intent_id = ev.stripe_payment_intent_id.as_deref(),
                            status = status.as_str(), stripe_status, reason = ev.reason.as_deref(), event_id = %ev.event_id, "status event emitted");
                        self.state.update(&e.id, |x| {
                            x.failures = 0;
                            x.record_poll(now, status.as_str(), Some(&stripe_status));
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
                        )?;
                    }
                }
            }
            Err(err) => {
                METRICS.polls.with_label_values(&[err.outcome()]).inc();
                tracing::warn!(payment_id = %e.id, idempotency_key = %e.idempotency_key, intent_id = e.stripe_payment_intent_id.as_deref(),
                    outcome = err.outcome(), error = %err, "poll: no answer, kept pending");
                if matches!(err, LookupError::RateLimited) {
                    self.limiter.cooldown(self.cfg.rate_limit_cooldown);
                }
                self.reschedule_after_failure(e, now, err.outcome(), None)?;
            }
        }
        Ok(())
    }

    fn reschedule_after_failure(
        &self,
        e: &Entry,
        now: u64,
        outcome: &str,
        stripe_status: Option<&str>,
    ) -> Result<(), StateError> {
        self.state.update(&e.id, |x| {
            x.failures += 1;
            x.record_poll(now, outcome, stripe_status);
            x.next_poll_ms = now
                + backoff(self.cfg.retry_backoff, x.failures, self.cfg.interval).as_millis() as u64;
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
