//! The backoff of kvip's watches. kube's default backoff is reset by every `Ok` item, and its
//! watcher yields one (`Init`) before each list attempt, so a watch whose list keeps failing
//! (a 403, say) retries, and logs, about once a second forever. This one grows from 1 s to a
//! maximum and is reset only once the watch has gone [`QUIET`] without an error.

use std::time::Duration;

use kube::runtime::utils::Backoff;
use tokio::time::Instant;

/// How long a watch must go without an error before its backoff starts again from the
/// minimum.
pub const QUIET: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct WatchBackoff {
    min: Duration,
    max: Duration,
    next: Duration,
    last_error: Option<Instant>,
}

impl WatchBackoff {
    /// From 1 s, doubling, up to `max`.
    pub fn up_to(max: Duration) -> Self {
        let min = Duration::from_secs(1).min(max);
        WatchBackoff {
            min,
            max,
            next: min,
            last_error: None,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        self.last_error = Some(Instant::now());
        Some(now)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        if self.last_error.is_none_or(|t| t.elapsed() >= QUIET) {
            self.next = self.min;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn grows_through_ok_items_and_resets_after_a_quiet_spell() {
        let mut b = WatchBackoff::up_to(Duration::from_secs(8));
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(b.next().unwrap().as_secs());
            // The watcher's `Init` before each list attempt.
            b.reset();
        }
        assert_eq!(seen, [1, 2, 4, 8, 8]);
        tokio::time::advance(QUIET).await;
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_secs(1)));
    }
}
