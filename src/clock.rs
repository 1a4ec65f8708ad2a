//! Time behind one clock that tests can pause.
//!
//! Due times are stored as wall-clock milliseconds (they must mean something after a restart),
//! but they advance with `tokio::time::Instant`, so under `tokio::time::pause()` a test moves
//! "every ten minutes" forward in milliseconds of real time.

use std::time::{SystemTime, UNIX_EPOCH};

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
    async fn paused_clock_advances_by_tokio_time() {
        let c = Clock::new();
        let t0 = c.now_ms();
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(c.now_ms() - t0, 600_000);
    }
}
