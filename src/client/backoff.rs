//! The reconnect schedule: exponential backoff from `--reconnect-delay` up to
//! `--reconnect-max-delay`, each delay spread by `--reconnect-jitter`, so connections cut
//! at the same moment come back spread over a window instead of in one wave.

use std::time::Duration;

/// When to try again after a loss or a failed attempt.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    jitter: f64,
    /// Failures (losses or failed attempts) since the last connection that held.
    failures: u32,
}

impl Backoff {
    /// A schedule starting at `base`, doubling up to `max`, spread by `jitter` (0 to 1: each
    /// delay is drawn uniformly from `delay * (1 - jitter)` to `delay * (1 + jitter)`).
    pub(crate) fn new(base: Duration, max: Duration, jitter: f64) -> Self {
        Backoff {
            base,
            max: max.max(base),
            jitter: jitter.clamp(0.0, 1.0),
            failures: 0,
        }
    }

    /// The delay before the next attempt; at least `retry_after` when the server asked for
    /// that (a 503 or 429 with `Retry-After`). `unit` is a random number in `[0, 1)`.
    pub(crate) fn next_delay(&mut self, retry_after: Option<Duration>, unit: f64) -> Duration {
        let doublings = self.failures.min(31);
        self.failures = self.failures.saturating_add(1);
        let nominal = self
            .base
            .checked_mul(1 << doublings)
            .map_or(self.max, |delay| delay.min(self.max));
        let spread = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        let delay = nominal.mul_f64(spread);
        retry_after.map_or(delay, |asked| delay.max(asked))
    }

    /// A connection held for `uptime`: once that outlasts the delay it would wait next, it
    /// was no flap, and the schedule starts again from `base`.
    pub(crate) fn connected_for(&mut self, uptime: Duration) {
        let nominal = self
            .base
            .checked_mul(1 << self.failures.min(31))
            .map_or(self.max, |delay| delay.min(self.max));
        if uptime >= nominal {
            self.failures = 0;
        }
    }
}

/// A random number in `[0, 1)` for the jitter (rand's thread-local generator).
pub(crate) fn unit_random() -> f64 {
    rand::random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn without_jitter_the_delays_double_up_to_the_max() {
        let mut backoff = Backoff::new(5 * S, 60 * S, 0.0);
        let delays: Vec<u64> = (0..6)
            .map(|_| backoff.next_delay(None, 0.9).as_secs())
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60]);
    }

    #[test]
    fn the_design_documents_fixed_delay_is_jitter_0_and_max_equal_to_base() {
        let mut backoff = Backoff::new(5 * S, 5 * S, 0.0);
        for _ in 0..10 {
            assert_eq!(backoff.next_delay(None, 0.3), 5 * S);
        }
    }

    #[test]
    fn jitter_spreads_each_delay_around_its_nominal_value() {
        let mut low = Backoff::new(10 * S, 60 * S, 0.2);
        let mut high = low.clone();
        assert_eq!(low.next_delay(None, 0.0), 8 * S);
        assert_eq!(high.next_delay(None, 0.999_999).as_secs(), 11);
        let mut middle = Backoff::new(10 * S, 60 * S, 0.2);
        assert_eq!(middle.next_delay(None, 0.5), 10 * S);
    }

    #[test]
    fn retry_after_is_honoured_as_a_minimum() {
        let mut backoff = Backoff::new(S, 60 * S, 0.0);
        assert_eq!(backoff.next_delay(Some(30 * S), 0.5), 30 * S);
        assert_eq!(backoff.next_delay(Some(S / 2), 0.5), 2 * S);
    }

    #[test]
    fn a_connection_that_held_resets_the_schedule_and_a_flap_does_not() {
        let mut backoff = Backoff::new(S, 60 * S, 0.0);
        for _ in 0..3 {
            backoff.next_delay(None, 0.5);
        }
        backoff.connected_for(S); // shorter than the next delay (8 s): a flap
        assert_eq!(backoff.next_delay(None, 0.5), 8 * S);
        backoff.connected_for(20 * S);
        assert_eq!(backoff.next_delay(None, 0.5), S);
    }
}
