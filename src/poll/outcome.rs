//! What an answer does: Stripe's final answers are emitted (and recorded), a pending answer or
//! a decline is recorded and polled again, a mismatch is flagged for a person, no answer backs
//! off. Only final answers resolve; everything else keeps the payment pending.

use std::time::Duration;

use super::stripe::{self, Decline, Expected, FinalStatus, Lookup, LookupError, MismatchKind};
use super::{backoff, payment_ref, Poller};
use crate::metrics::events::{emit, AbandonedCancel, MoneyMismatch, PaymentRef, PollPending};
use crate::metrics::METRICS;
use crate::sink::{Seen, StatusEvent};
use crate::state::{Emitted, Entry, Flag, StateError};

impl Poller {
    /// `--cancel-abandoned-after`: the intent is still cancelable that long after the payment
    /// was first seen, so it is canceled in Stripe (reason `abandoned`, one idempotent request
    /// in the same budget). Only Stripe's `canceled` answer resolves the payment (`failed`,
    /// reason `abandoned`); a cancel that fails or answers anything else is doubt: nothing is
    /// written, and the payment is asked about again after a backoff.
    pub(super) async fn cancel_abandoned(
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
    pub(super) fn record_pending(
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
    pub(super) fn record_mismatch(
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

    /// Emits a final answer (from a poll or from the events feed, `via`) and marks the payment
    /// emitted once the sink stored it; a failed store keeps it pending for another poll.
    pub(super) async fn emit_final(
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
    pub(super) fn reschedule_after_failure(
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
