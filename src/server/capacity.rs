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

/// One limit: its value now and the connections it leaves room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The limit, e.g. `vm.max_map_count`.
    pub name: &'static str,
    /// Its value, e.g. 65530.
    pub value: usize,
    /// The connections it allows once what is in use and the reserve are set aside.
    pub connections: usize,
}

impl Budget {
    /// `name` at `value` leaves room for `connections`.
    pub fn new(name: &'static str, value: usize, connections: usize) -> Self {
        Budget {
            name,
            value,
            connections,
        }
    }
}

/// The connection ceiling and what sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    /// Connections the server accepts at most (each its own thread); beyond it, 503.
    pub ceiling: usize,
    /// The limit that sets the ceiling, e.g. `vm.max_map_count`.
    pub limited_by: &'static str,
    /// Each limit with its value and the connections it allows, for the log.
    pub budgets: Vec<Budget>,
    /// Refused sockets that may wait for their 503 (each holds a file descriptor).
    pub reject_queue: usize,
}

impl Capacity {
    /// Reads the limits of this process and system; `max_connections` is the user's cap.
    pub fn detect(max_connections: Option<usize>) -> Self {
        let mut budgets = Vec::new();
        if let Some(max) = max_connections {
            budgets.push(Budget::new("--max-connections", max, max));
        }
        let mut reject_queue = REJECT_QUEUE;
        if let Some(soft) = proc_limit("Max open files") {
            // A small limit keeps a quarter free rather than the full reserve, so it still
            // serves what fits; refused sockets waiting for their 503 may take half of it,
            // the metrics port and the rest the other half.
            let reserve = FDS_RESERVE.min(soft / 4).max(OWN_FDS);
            reject_queue = REJECT_QUEUE.min(reserve / 2).max(1);
            budgets.push(Budget::new(
                "RLIMIT_NOFILE",
                soft,
                soft.saturating_sub(count_dir("/proc/self/fd") + reserve),
            ));
        }
        if let Some(max_maps) = read_number("/proc/sys/vm/max_map_count") {
            let used = fs::read_to_string("/proc/self/maps")
                .map(|maps| maps.lines().count())
                .unwrap_or(0);
            budgets.push(Budget::new(
                "vm.max_map_count",
                max_maps,
                max_maps.saturating_sub(used + MAPS_RESERVE) / MAPS_PER_THREAD,
            ));
        }
        let system_threads = system_threads();
        for (name, path) in [
            ("kernel.pid_max", "/proc/sys/kernel/pid_max"),
            ("kernel.threads-max", "/proc/sys/kernel/threads-max"),
        ] {
            if let Some(max) = read_number(path) {
                let connections = max.saturating_sub(system_threads + THREADS_RESERVE);
                budgets.push(Budget::new(name, max, connections));
            }
        }
        if let Some(nproc) = proc_limit("Max processes") {
            // Counted per user, so the user's other processes share it; a small limit keeps a
            // quarter free rather than the full reserve, as for descriptors.
            budgets.push(Budget::new(
                "RLIMIT_NPROC",
                nproc,
                nproc.saturating_sub(count_dir("/proc/self/task") + THREADS_RESERVE.min(nproc / 4)),
            ));
        }
        if let (Some(max), Some(current)) = (
            read_number("/sys/fs/cgroup/pids.max"),
            read_number("/sys/fs/cgroup/pids.current"),
        ) {
            budgets.push(Budget::new(
                "cgroup pids.max",
                max,
                max.saturating_sub(current + THREADS_RESERVE),
            ));
        }
        Capacity {
            reject_queue,
            ..Self::from_budgets(budgets)
        }
    }

    /// The smallest budget wins; without any, the ceiling is unbounded.
    pub fn from_budgets(budgets: Vec<Budget>) -> Self {
        let (limited_by, ceiling) = budgets
            .iter()
            .min_by_key(|budget| budget.connections)
            .map_or(("nothing", usize::MAX), |budget| {
                (budget.name, budget.connections)
            });
        Capacity {
            ceiling,
            limited_by,
            budgets,
            reject_queue: REJECT_QUEUE,
        }
    }

    /// What would lift a ceiling that an OS limit sets: that limit's value and the
    /// connections it allows, the next limit (the second smallest budget), and the setting
    /// that raises the first to reach it. `None` when `--max-connections` sets the ceiling,
    /// or no second limit is known.
    pub fn hint(&self) -> Option<String> {
        let mut budgets = self.budgets.clone();
        budgets.sort_by_key(|budget| budget.connections);
        let [binding, next, ..] = budgets[..] else {
            return None;
        };
        if binding.name == "--max-connections" {
            return None;
        }
        // A connection takes one descriptor or pid, but four maps; the value is rounded up to
        // a multiple of 65536 for maps (Elasticsearch recommends 262144), of 1024 otherwise.
        let (per_connection, step) = match binding.name {
            "vm.max_map_count" => (MAPS_PER_THREAD, 65_536),
            _ => (1, 1024),
        };
        let wanted = (next.connections - binding.connections)
            .saturating_mul(per_connection)
            .saturating_add(binding.value);
        let value = wanted.checked_next_multiple_of(step).unwrap_or(wanted);
        Some(format!(
            "{} {} allows {} connections; raise it to reach the next limit, {} {} ({} connections): {}",
            binding.name,
            binding.value,
            binding.connections,
            next.name,
            next.value,
            next.connections,
            setting(binding.name, value),
        ))
    }
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let noun = if self.ceiling == 1 {
            "connection"
        } else {
            "connections"
        };
        write!(
            f,
            "{} {noun}, limited by {} (",
            self.ceiling, self.limited_by
        )?;
        for (i, budget) in self.budgets.iter().enumerate() {
            let separator = if i == 0 { "" } else { ", " };
            write!(f, "{separator}{}: {}", budget.name, budget.connections)?;
        }
        write!(f, ")")
    }
}

/// How to set the limit `name` to `value` (README: The connection ceiling).
fn setting(name: &str, value: usize) -> String {
    match name {
        "RLIMIT_NOFILE" => format!(
            "ulimit -n {value} (systemd LimitNOFILE=, the container runtime's nofile ulimit)"
        ),
        "RLIMIT_NPROC" => format!("ulimit -u {value} (systemd LimitNPROC=)"),
        "cgroup pids.max" => format!(
            "pids.max {value} for the cgroup (systemd TasksMax=, Kubernetes: kubelet podPidsLimit)"
        ),
        // vm.max_map_count, kernel.pid_max, kernel.threads-max: system-wide.
        sysctl => format!("sysctl -w {sysctl}={value} on the host (in Kubernetes: on the node)"),
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
            Budget::new("RLIMIT_NOFILE", 20_000, 19_900),
            Budget::new("vm.max_map_count", 65_530, 16_000),
        ]);
        assert_eq!(
            (capacity.ceiling, capacity.limited_by),
            (16_000, "vm.max_map_count")
        );
        assert_eq!(capacity.to_string(), "16000 connections, limited by vm.max_map_count (RLIMIT_NOFILE: 19900, vm.max_map_count: 16000)");
        assert_eq!(Capacity::from_budgets(vec![]).ceiling, usize::MAX);
        let one = Capacity::from_budgets(vec![Budget::new("RLIMIT_NOFILE", 8, 1)]);
        assert_eq!(
            one.to_string(),
            "1 connection, limited by RLIMIT_NOFILE (RLIMIT_NOFILE: 1)"
        );
    }

    #[test]
    fn the_hint_names_the_limit_its_value_the_next_limit_and_the_setting() {
        // This machine's limits: 4 maps a connection, so reaching RLIMIT_NOFILE's 19928 takes
        // 65530 + (19928 - 16237) * 4 = 80294 maps, rounded up to a multiple of 65536.
        let maps = Budget::new("vm.max_map_count", 65_530, 16_237);
        let capacity = Capacity::from_budgets(vec![
            Budget::new("RLIMIT_NOFILE", 20_000, 19_928),
            maps,
            Budget::new("kernel.pid_max", 32_768, 32_360),
        ]);
        assert_eq!(
            capacity.hint().as_deref(),
            Some(
                "vm.max_map_count 65530 allows 16237 connections; raise it to reach the next limit, \
                 RLIMIT_NOFILE 20000 (19928 connections): \
                 sysctl -w vm.max_map_count=131072 on the host (in Kubernetes: on the node)"
            )
        );

        // One descriptor a connection: 1024 + (16237 - 900) = 16361, rounded up to 16384.
        let capacity = Capacity::from_budgets(vec![maps, Budget::new("RLIMIT_NOFILE", 1024, 900)]);
        assert_eq!(
            capacity.hint().as_deref(),
            Some(
                "RLIMIT_NOFILE 1024 allows 900 connections; raise it to reach the next limit, \
                 vm.max_map_count 65530 (16237 connections): \
                 ulimit -n 16384 (systemd LimitNOFILE=, the container runtime's nofile ulimit)"
            )
        );

        // A --max-connections above the OS limit is the next limit; below it, no hint.
        let cap = |max| Budget::new("--max-connections", max, max);
        let capacity = Capacity::from_budgets(vec![cap(20_000), maps]);
        assert!(capacity
            .hint()
            .is_some_and(|hint| hint.contains("next limit, --max-connections 20000 (20000 connections): sysctl -w vm.max_map_count=131072 ")));
        assert_eq!(Capacity::from_budgets(vec![cap(10_000), maps]).hint(), None);
        assert_eq!(Capacity::from_budgets(vec![maps]).hint(), None);
        assert_eq!(Capacity::from_budgets(vec![]).hint(), None);
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
