//! A global request budget: at most `rate` requests per second, spaced evenly, adapting to
//! Stripe's 429s.
//!
//! Each caller reserves the next free slot (`max(now, next_free)`) and sleeps until it, so there
//! is no burst above the rate in any second. Two things keep that true at Stripe's side, where
//! the limit is counted (requests arriving per second), not only in the schedule:
//! - A caller that wakes late (the runtime was busy, the process was stopped) does not fire at
//!   once with every other late caller: its slot has passed, so it takes a new one. Without
//!   this, a stall of a few hundred milliseconds let every slot that fell in it go out together
//!   on resume, on top of the slots after it (23 requests in one second were seen at the
//!   emulator with a budget of 20).
//! - AIMD: a 429 halves the rate (at most once per second, since the requests in flight when
//!   Stripe started refusing answer 429 together) and pushes every later slot back by a
//!   cooldown; the rate then climbs back linearly, to the ceiling (`--stripe-rps`) in
//!   [`RECOVERY`], never above it. The current rate is the `paystream_stripe_rate_limit` gauge.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The time the rate takes to climb from nothing back to the ceiling after 429s.
pub const RECOVERY: Duration = Duration::from_secs(60);

/// The rate never drops below this share of the ceiling.
const FLOOR_SHARE: f64 = 1.0 / 64.0;

/// A second 429 within this time of a halving is part of the same refusal.
const HALVE_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// Stripe's budgets paystream keeps: every request, and Search's own on top (Stripe limits
/// Search apart from the rest).
pub struct Budgets {
    pub requests: RateLimiter,
    pub search: RateLimiter,
}

pub struct RateLimiter {
    ceiling: f64,
    /// What to report the current rate to (a gauge), if anything.
    gauge: Option<prometheus::Gauge>,
    inner: Mutex<Inner>,
}

struct Inner {
    rate: f64,
    /// When `rate` was last brought up to date.
    updated: Instant,
    last_halved: Option<Instant>,
    next_free: Instant,
}

impl RateLimiter {
    pub fn new(per_second: f64) -> Self {
        let now = Instant::now();
        RateLimiter {
            ceiling: per_second,
            gauge: None,
            inner: Mutex::new(Inner {
                rate: per_second,
                updated: now,
                last_halved: None,
                next_free: now,
            }),
        }
    }

    /// Reports the current rate to `gauge` (set now and at every change).
    pub fn with_gauge(mut self, gauge: prometheus::Gauge) -> Self {
        gauge.set(self.ceiling);
        self.gauge = Some(gauge);
        self
    }

    /// The configured ceiling, in requests per second.
    pub fn ceiling(&self) -> f64 {
        self.ceiling
    }

    /// The current rate, in requests per second.
    pub fn rate(&self) -> f64 {
        let mut g = self.inner.lock().expect("limiter lock");
        self.recover(&mut g, Instant::now());
        g.rate
    }

    /// Additive increase since the last update, up to the ceiling.
    fn recover(&self, g: &mut Inner, now: Instant) {
        let elapsed = now.saturating_duration_since(g.updated).as_secs_f64();
        let rate = (g.rate + elapsed * self.ceiling / RECOVERY.as_secs_f64()).min(self.ceiling);
        g.updated = now;
        if rate != g.rate {
            g.rate = rate;
            if let Some(gauge) = &self.gauge {
                gauge.set(rate);
            }
        }
    }

    /// Waits for this caller's slot.
    pub async fn acquire(&self) {
        loop {
            let (slot, spacing) = {
                let mut g = self.inner.lock().expect("limiter lock");
                let now = Instant::now();
                self.recover(&mut g, now);
                let spacing = Duration::from_secs_f64(1.0 / g.rate);
                let slot = g.next_free.max(now);
                g.next_free = slot + spacing;
                (slot, spacing)
            };
            tokio::time::sleep_until(slot).await;
            // Woken more than half a spacing late: the slot is gone, and going now would send
            // it together with the slots after it. Take a new one.
            if Instant::now() <= slot + spacing / 2 {
                return;
            }
        }
    }

    /// Stripe answered 429: halve the rate (once per refusal) and start no request before `d`
    /// from now.
    pub fn on_rate_limited(&self, d: Duration) {
        let mut g = self.inner.lock().expect("limiter lock");
        let now = Instant::now();
        self.recover(&mut g, now);
        if g.last_halved
            .is_none_or(|t| now.saturating_duration_since(t) >= HALVE_AT_MOST_EVERY)
        {
            g.rate = (g.rate / 2.0).max(self.ceiling * FLOOR_SHARE);
            g.last_halved = Some(now);
            if let Some(gauge) = &self.gauge {
                gauge.set(g.rate);
            }
            tracing::warn!(
                stripe_rps = g.rate,
                ceiling = self.ceiling,
                "Stripe rate limit (429): request rate halved; it climbs back to the ceiling over a minute without 429s"
            );
        }
        g.next_free = g.next_free.max(now + d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Most starts in any one-second window.
    fn peak(times: &[Duration]) -> usize {
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|u| **u < times[i] + Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    async fn starts(l: &std::sync::Arc<RateLimiter>, n: usize) -> Vec<Duration> {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..n {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                l.acquire().await;
                Instant::now().duration_since(start)
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap());
        }
        times.sort();
        times
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_rate_in_any_second() {
        let l = std::sync::Arc::new(RateLimiter::new(20.0));
        let times = starts(&l, 100).await;
        assert!(peak(&times) <= 20, "{} starts in one second", peak(&times));
        assert!(times[99] >= Duration::from_millis(4950));
        l.on_rate_limited(Duration::from_secs(3));
        let before = Instant::now();
        l.acquire().await;
        assert!(Instant::now() - before >= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_does_not_release_a_burst() {
        let l = std::sync::Arc::new(RateLimiter::new(20.0));
        let start = Instant::now();
        // Forty callers reserve their slots over the next two seconds...
        let mut tasks = Vec::new();
        for _ in 0..40 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                l.acquire().await;
                Instant::now().duration_since(start)
            }));
        }
        tokio::task::yield_now().await;
        // ...and the runtime stalls for 600 ms (a blocking call, a SIGSTOP) before any runs:
        // every slot in the stall has passed when they wake.
        tokio::time::advance(Duration::from_millis(600)).await;
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap());
        }
        times.sort();
        assert!(
            peak(&times) <= 21,
            "{} starts in one second: {times:?}",
            peak(&times)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_halves_the_rate_once_and_it_recovers_linearly_to_the_ceiling() {
        let gauge = prometheus::Gauge::new("t", "t").unwrap();
        let l = RateLimiter::new(10.0).with_gauge(gauge.clone());
        assert_eq!(gauge.get(), 10.0);
        // Eight requests in flight answer 429 together: one halving.
        for _ in 0..8 {
            l.on_rate_limited(Duration::from_millis(0));
        }
        assert_eq!(l.rate(), 5.0);
        assert_eq!(gauge.get(), 5.0);
        // Another refusal a second later halves again what a second of recovery brought.
        tokio::time::advance(Duration::from_secs(1)).await;
        l.on_rate_limited(Duration::from_millis(0));
        let r = l.rate();
        let want = (5.0 + 10.0 / 60.0) / 2.0;
        assert!((r - want).abs() < 1e-9, "{r}");
        // Back to the ceiling a minute later, and never above it.
        tokio::time::advance(RECOVERY).await;
        assert_eq!(l.rate(), 10.0);
        tokio::time::advance(RECOVERY).await;
        assert_eq!(l.rate(), 10.0);
        assert_eq!(gauge.get(), 10.0);
        // Never below the floor.
        for _ in 0..20 {
            l.on_rate_limited(Duration::from_millis(0));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert!(l.rate() >= 10.0 / 64.0);
    }
}
