//! A global request budget: at most `rate` requests per second, spaced evenly.
//!
//! Each caller reserves the next free slot (`max(now, next_free)`) and sleeps until it, so there
//! is no burst above the rate in any second. A 429 pushes every later slot back by a cooldown.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct RateLimiter {
    spacing: Duration,
    next_free: Mutex<Instant>,
}

impl RateLimiter {
    pub fn new(per_second: f64) -> Self {
        RateLimiter {
            spacing: Duration::from_secs_f64(1.0 / per_second),
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// The budget, in requests per second.
    pub fn rate(&self) -> f64 {
        1.0 / self.spacing.as_secs_f64()
    }

    /// Waits for this caller's slot.
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next_free.lock().expect("limiter lock");
            let slot = (*next).max(Instant::now());
            *next = slot + self.spacing;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }

    /// No request starts before `d` from now (after Stripe said 429).
    pub fn cooldown(&self, d: Duration) {
        let mut next = self.next_free.lock().expect("limiter lock");
        *next = (*next).max(Instant::now() + d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_rate_in_any_second() {
        let l = std::sync::Arc::new(RateLimiter::new(20.0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..100 {
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
        // Every window of one second holds at most 20 starts.
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .take_while(|u| **u < *t + Duration::from_secs(1))
                .count();
            assert!(in_window <= 20, "{in_window} starts within 1s of {t:?}");
        }
        assert!(times[99] >= Duration::from_millis(4950));
        l.cooldown(Duration::from_secs(3));
        let before = Instant::now();
        l.acquire().await;
        assert!(Instant::now() - before >= Duration::from_secs(3));
    }
}
