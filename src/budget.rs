//! The server's memory budget for messages: the bytes held for incomplete messages and for
//! echoes being written, across all connections, stay under `--max-buffered-memory`. Each
//! connection charges what it holds past a small free allowance (so small messages never
//! touch the shared counter); one whose next bytes would break the budget is closed with
//! 1013 (try again later) and the others carry on.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes of a message a connection holds without charging the budget: small messages
/// cost no shared atomic operation, and all connections together hold at most this times
/// the connection ceiling this way.
pub const FREE_PER_CONNECTION: usize = 64 << 10;

/// The shared budget.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    held: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Budget {
            limit,
            held: AtomicUsize::new(0),
        }
    }

    /// Bytes charged now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Charges `bytes` if they fit; false when they would break the budget.
    fn try_charge(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// One connection's account: what it holds since its last complete message, and how much
/// of that is charged to the budget.
#[derive(Debug)]
pub struct Account {
    budget: std::sync::Arc<Budget>,
    pending: usize,
    charged: usize,
}

impl Account {
    /// An account against `budget`.
    pub fn new(budget: std::sync::Arc<Budget>) -> Self {
        Account {
            budget,
            pending: 0,
            charged: 0,
        }
    }

    /// `bytes` more arrived for the message being read; an error when they do not fit.
    pub fn received(&mut self, bytes: usize) -> io::Result<()> {
        self.pending += bytes;
        let owed = self.pending.saturating_sub(FREE_PER_CONNECTION);
        if owed > self.charged {
            if !self.budget.try_charge(owed - self.charged) {
                return Err(io::Error::other(OverBudget {
                    limit: self.budget.limit,
                }));
            }
            self.charged = owed;
        }
        Ok(())
    }

    /// The message is done with (read and echoed): what it held is given back.
    pub fn settled(&mut self) {
        self.budget.release(self.charged);
        self.pending = 0;
        self.charged = 0;
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        self.settled();
    }
}

/// The error a read becomes when the bytes it brought would break the budget.
#[derive(Debug)]
pub struct OverBudget {
    limit: usize,
}

impl fmt::Display for OverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server's memory budget for messages ({} MiB, --max-buffered-memory) is used up",
            self.limit >> 20
        )
    }
}

impl std::error::Error for OverBudget {}

/// Whether `error` is a read that broke the budget.
pub fn is_over_budget(error: &io::Error) -> bool {
    matches!(error.get_ref(), Some(inner) if inner.is::<OverBudget>())
}

/// The default budget: half the memory cgroup's limit when there is one, else a quarter of
/// the machine's memory, else 1 GiB; and where it came from, for the log.
pub fn default_limit() -> (usize, &'static str) {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .or_else(|_| std::fs::read_to_string("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        // cgroup v1 says "no limit" with a huge number.
        .filter(|limit| *limit < 1 << 60);
    if let Some(limit) = cgroup {
        return (to_usize(limit / 2), "half the memory cgroup's limit");
    }
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<u64>()
                .ok()
        });
    match total {
        Some(kib) => (
            to_usize(kib * 1024 / 4),
            "a quarter of the machine's memory",
        ),
        None => (1 << 30, "a fixed 1 GiB"),
    }
}

fn to_usize(bytes: u64) -> usize {
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn small_messages_cost_nothing_and_large_ones_are_charged_until_settled() {
        let budget = Arc::new(Budget::new(100 << 10));
        let mut account = Account::new(budget.clone());
        account.received(FREE_PER_CONNECTION).unwrap();
        assert_eq!(budget.held(), 0);
        account.received(60 << 10).unwrap();
        assert_eq!(budget.held(), 60 << 10);
        let mut other = Account::new(budget.clone());
        other
            .received(FREE_PER_CONNECTION + (50 << 10))
            .unwrap_err();
        account.settled();
        assert_eq!(budget.held(), 0);
        other.received(50 << 10).unwrap();
        drop(other);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn the_default_is_some_share_of_memory() {
        let (limit, from) = default_limit();
        assert!(limit >= 1 << 20, "{limit} from {from}");
    }
}
