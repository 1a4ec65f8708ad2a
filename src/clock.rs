//! Time behind one clock that tests can pause.
//!
//! Due times are stored as wall-clock milliseconds (they must mean something after a restart),
//! but they advance with `tokio::time::Instant`, so under `tokio::time::pause()` a test moves
//! "every ten minutes" forward in milliseconds of real time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall_at_start_ms: u64,
    start: tokio::time::Instant,
}

impl Clock {
    /// Must be created inside a tokio runtime.
    pub fn new() -> Self {
        Clock {
            wall_at_start_ms: wall_ms(),
            start: tokio::time::Instant::now(),
        }
    }

    /// Milliseconds since the Unix epoch, advancing with tokio's (pausable) clock.
    pub fn now_ms(&self) -> u64 {
        self.wall_at_start_ms + self.start.elapsed().as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Milliseconds since the Unix epoch by the system clock (not pausable: for records of when
/// something happened, such as a checkpoint).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// The wait between attempts of a loop that rides out an outage (a broker, Postgres, the disk):
/// doubling from a first wait up to a cap, on tokio's pausable clock. The one backoff of every
/// reconnect and retry loop; poll retries, spread over many payments, use
/// [`crate::poll::backoff`] (jittered per payment) instead.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff { next: first, cap }
    }

    /// 250 ms doubling to 10 s: short enough to notice a server back at once, long enough not
    /// to hammer one that is restarting.
    pub fn outage() -> Self {
        Backoff::new(Duration::from_millis(250), Duration::from_secs(10))
    }

    /// The wait the next [`Backoff::wait`] sleeps.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Sleeps the next wait, then doubles it. `false`: shutdown came first (the caller stops).
    pub async fn wait(&mut self, shutdown: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            _ = self.sleep() => true,
            _ = shutdown.changed() => false,
        }
    }

    /// Sleeps the next wait, then doubles it (a loop with a bounded number of attempts).
    pub async fn sleep(&mut self) {
        let delay = self.next;
        self.next = (self.next * 2).min(self.cap);
        tokio::time::sleep(delay).await;
    }
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339_ms(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_its_cap_and_stops_on_shutdown() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let (tx, mut rx) = watch::channel(false);
        let mut waits = Vec::new();
        for _ in 0..4 {
            let t = tokio::time::Instant::now();
            assert!(b.wait(&mut rx).await);
            waits.push(t.elapsed().as_millis());
        }
        assert_eq!(waits, [100, 200, 350, 350]);
        tx.send(true).unwrap();
        assert!(!b.wait(&mut rx).await, "shutdown ends the wait");
    }

    #[tokio::test(start_paused = true)]
    async fn paused_clock_advances_by_tokio_time() {
        let c = Clock::new();
        let t0 = c.now_ms();
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(c.now_ms() - t0, 600_000);
    }
}
