//! A condition that repeats (a failing connect, a thread that cannot start) logged once a
//! period, with the count of the ones in between, rather than once each.

use std::time::{Duration, Instant};

/// When a repeating condition was last logged, and how often it came since.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Repeats {
    logged: Option<Instant>,
    since: u64,
}

impl Repeats {
    /// Notes one more occurrence. Returns `Some(n)` when it should be logged (the first, or
    /// the first `every` after the last logged one), `n` being how many were not logged in
    /// between; `None` when it should not.
    pub(crate) fn occurred(&mut self, every: Duration) -> Option<u64> {
        match self.logged {
            Some(at) if at.elapsed() < every => {
                self.since += 1;
                None
            }
            _ => {
                self.logged = Some(Instant::now());
                Some(std::mem::take(&mut self.since))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_is_logged_then_one_per_period_with_the_count_between() {
        let mut repeats = Repeats::default();
        assert_eq!(repeats.occurred(Duration::from_secs(60)), Some(0));
        assert_eq!(repeats.occurred(Duration::from_secs(60)), None);
        assert_eq!(repeats.occurred(Duration::from_secs(60)), None);
        // A period of zero has always passed.
        assert_eq!(repeats.occurred(Duration::ZERO), Some(2));
        assert_eq!(repeats.occurred(Duration::ZERO), Some(0));
    }
}
