//! How many connections this process can hold before the OS refuses a thread or a file
//! descriptor, computed once at start-up from the limits in /proc.
//!
//! Each connection costs one socket and one thread. A thread costs a pid (bounded by
//! `kernel.pid_max` and `kernel.threads-max` system-wide, `RLIMIT_NPROC` per user and a
//! cgroup's `pids.max`), and four memory maps: its stack and guard page, and the signal
//! stack and guard page std gives every thread. When the map budget (`vm.max_map_count`) runs
//! out, std cannot map a new thread's signal stack and aborts the whole process, so the
//! server must refuse connections before that, not after.

use std::fmt;
use std::fs;

use super::acceptor::REJECT_QUEUE;

/// Memory maps per connection thread.
pub const MAPS_PER_THREAD: usize = 4;
/// Maps kept free for the allocator's arenas and everything else the process maps later.
const MAPS_RESERVE: usize = 512;
/// File descriptors kept free for the listeners, the metrics server, /proc reads and the
/// sockets waiting in the rejecter's queue.
const FDS_RESERVE: usize = 64 + REJECT_QUEUE;
/// Descriptors the server opens for itself after counting, whatever the limit: the two
/// listeners, a metrics scrape and one refused socket waiting for its 503.
const OWN_FDS: usize = 4;
/// Threads (pids) kept free for the rest of the system and our own helper threads.
const THREADS_RESERVE: usize = 256;

/// The connection ceiling and what sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    /// Connections the server accepts at most (each its own thread); beyond it, 503.
    pub ceiling: usize,
    /// The limit that sets the ceiling, e.g. `vm.max_map_count`.
    pub limited_by: &'static str,
    /// Each limit with the ceiling it allows, for the log.
    pub budgets: Vec<(&'static str, usize)>,
    /// Refused sockets that may wait for their 503 (each holds a file descriptor).
    pub reject_queue: usize,
}

impl Capacity {
    /// Reads the limits of this process and system; `max_connections` is the user's cap.
    pub fn detect(max_connections: Option<usize>) -> Self {
        let mut budgets = Vec::new();
        if let Some(max) = max_connections {
            budgets.push(("--max-connections", max));
        }
        let mut reject_queue = REJECT_QUEUE;
        if let Some(soft) = proc_limit("Max open files") {
            // A small limit keeps a quarter free rather than the full reserve, so it still
            // serves what fits; refused sockets waiting for their 503 may take half of it,
            // the metrics port and the rest the other half.
            let reserve = FDS_RESERVE.min(soft / 4).max(OWN_FDS);
            reject_queue = REJECT_QUEUE.min(reserve / 2).max(1);
            budgets.push((
                "RLIMIT_NOFILE",
                soft.saturating_sub(count_dir("/proc/self/fd") + reserve),
            ));
        }
        if let Some(max_maps) = read_number("/proc/sys/vm/max_map_count") {
            let used = fs::read_to_string("/proc/self/maps")
                .map(|maps| maps.lines().count())
                .unwrap_or(0);
            budgets.push((
                "vm.max_map_count",
                max_maps.saturating_sub(used + MAPS_RESERVE) / MAPS_PER_THREAD,
            ));
        }
        let system_threads = system_threads();
        for (name, path) in [
            ("kernel.pid_max", "/proc/sys/kernel/pid_max"),
            ("kernel.threads-max", "/proc/sys/kernel/threads-max"),
        ] {
            if let Some(max) = read_number(path) {
                budgets.push((name, max.saturating_sub(system_threads + THREADS_RESERVE)));
            }
        }
        if let Some(nproc) = proc_limit("Max processes") {
            // Counted per user, so the user's other processes share it; a small limit keeps a
            // quarter free rather than the full reserve, as for descriptors.
            budgets.push((
                "RLIMIT_NPROC",
                nproc.saturating_sub(count_dir("/proc/self/task") + THREADS_RESERVE.min(nproc / 4)),
            ));
        }
        if let (Some(max), Some(current)) = (
            read_number("/sys/fs/cgroup/pids.max"),
            read_number("/sys/fs/cgroup/pids.current"),
        ) {
            budgets.push((
                "cgroup pids.max",
                max.saturating_sub(current + THREADS_RESERVE),
            ));
        }
        Capacity {
            reject_queue,
            ..Self::from_budgets(budgets)
        }
    }

    /// The smallest budget wins; without any, the ceiling is unbounded.
    pub fn from_budgets(budgets: Vec<(&'static str, usize)>) -> Self {
        let (limited_by, ceiling) = budgets
            .iter()
            .copied()
            .min_by_key(|(_, budget)| *budget)
            .unwrap_or(("nothing", usize::MAX));
        Capacity {
            ceiling,
            limited_by,
            budgets,
            reject_queue: REJECT_QUEUE,
        }
    }
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} connections, limited by {} (",
            self.ceiling, self.limited_by
        )?;
        for (i, (name, budget)) in self.budgets.iter().enumerate() {
            write!(f, "{}{name}: {budget}", if i == 0 { "" } else { ", " })?;
        }
        write!(f, ")")
    }
}

/// The soft limit from a line of /proc/self/limits such as `Max open files  20000  20000  files`.
fn proc_limit(name: &str) -> Option<usize> {
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    parse_limit(&limits, name)
}

fn parse_limit(limits: &str, name: &str) -> Option<usize> {
    let line = limits.lines().find(|line| line.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok() // "unlimited" fails: no budget
}

fn read_number(path: &str) -> Option<usize> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn count_dir(path: &str) -> usize {
    fs::read_dir(path)
        .map(std::iter::Iterator::count)
        .unwrap_or(0)
}

/// Threads on the whole system: the fourth field of /proc/loadavg is `running/total`.
fn system_threads() -> usize {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|load| {
            load.split_whitespace()
                .nth(3)?
                .split('/')
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smallest_budget_sets_the_ceiling() {
        let capacity = Capacity::from_budgets(vec![
            ("RLIMIT_NOFILE", 19_900),
            ("vm.max_map_count", 16_000),
        ]);
        assert_eq!(
            (capacity.ceiling, capacity.limited_by),
            (16_000, "vm.max_map_count")
        );
        assert_eq!(capacity.to_string(), "16000 connections, limited by vm.max_map_count (RLIMIT_NOFILE: 19900, vm.max_map_count: 16000)");
        assert_eq!(Capacity::from_budgets(vec![]).ceiling, usize::MAX);
    }

    #[test]
    fn limits_file_lines() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             unlimited            unlimited            processes\n\
                      Max open files            20000                20000                files\n";
        assert_eq!(parse_limit(limits, "Max open files"), Some(20_000));
        assert_eq!(parse_limit(limits, "Max processes"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_machine_has_a_finite_ceiling() {
        let capacity = Capacity::detect(None);
        assert!(
            capacity.ceiling > 0 && capacity.ceiling < usize::MAX,
            "{capacity}"
        );
        assert_eq!(Capacity::detect(Some(7)).ceiling, 7);
    }
}
