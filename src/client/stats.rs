//! The client's counters, shared by all its connection threads: connects, failures, ends
//! of connections by [`Reason`], pings and pongs, and in load mode messages, bytes and
//! round trips. Tests and the summary line read them; nothing here blocks a connection.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;

use super::idle::IdleLimit;
use crate::ending::Reason;
use crate::metrics;
use crate::repeats::Repeats;

/// Round trips above this are recorded as this (microseconds).
pub(super) const MAX_RTT_MICROS: u64 = 60_000_000;

/// Why a connection attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// The host name did not resolve.
    Resolve,
    /// The TCP connect failed (refused, unreachable).
    Connect,
    /// The connect timeout passed (TCP, TLS or the upgrade).
    Timeout,
    /// The TLS handshake failed (certificate, protocol).
    Tls,
    /// The server answered the upgrade with another status than 101.
    Refused,
    /// The upgrade response was not a valid WebSocket handshake (a subprotocol or extension
    /// that was not offered, say), or the connection ended.
    Handshake,
    /// The outbound proxy failed: it could not be resolved or reached, did not answer
    /// CONNECT in time, or answered it with another status than 2xx.
    Proxy,
}

impl Failure {
    /// Every cause, in index order.
    pub const ALL: [Failure; 7] = [
        Failure::Resolve,
        Failure::Connect,
        Failure::Timeout,
        Failure::Tls,
        Failure::Refused,
        Failure::Handshake,
        Failure::Proxy,
    ];

    /// The label, e.g. `tls`.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Resolve => "resolve",
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Tls => "tls",
            Failure::Refused => "refused",
            Failure::Handshake => "handshake",
            Failure::Proxy => "proxy",
        }
    }
}

/// Counters shared by all connections of a client.
#[derive(Debug)]
pub struct ClientStats {
    connections_up: AtomicI64,
    counters: [AtomicU64; Counter::COUNT],
    /// Ended connections by reason and Close code (changed once per connection: a lock).
    ended: Mutex<BTreeMap<(Reason, Option<u16>), u64>>,
    failed: [AtomicU64; Failure::ALL.len()],
    rtt_micros: Mutex<Histogram<u64>>,
    /// How long connections lasted, in seconds.
    pub(super) durations: prometheus::Histogram,
    /// Ping round trips, in seconds.
    pub(super) ping_rtts: prometheus::Histogram,
    /// What `--find-idle-timeout` found.
    idle_limit: Mutex<Option<IdleLimit>>,
    /// Connections up now by the backend that answered them (`X-Served-By`).
    backends: Mutex<BTreeMap<String, i64>>,
    /// Per failure cause: when a failure of it was last logged, and how many have not been
    /// logged since.
    failure_log: Mutex<[Repeats; Failure::ALL.len()]>,
}

/// How often one cause of failed attempts is logged at WARN (the others are counted and
/// logged at DEBUG): one clear line per cause, not one per attempt.
const FAILURE_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The things counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    /// Load messages sent.
    Sent,
    /// Echoes received and verified.
    Received,
    /// Payload bytes sent.
    BytesSent,
    /// Payload bytes received.
    BytesReceived,
    /// Echoes that differ from what was sent (wrong id, checksum or body).
    Corrupted,
    /// Echoes that arrived after a later message's echo.
    Reordered,
    /// Messages whose echo never came (counted when their connection ends).
    Lost,
    /// WebSocket handshakes completed.
    Connects,
    /// Connection attempts that failed (by cause: [`ClientStats::failed`]).
    ConnectFailures,
    /// Established connections lost (error, close by the server, pong timeout).
    Losses,
    /// Pings sent.
    Pings,
    /// Pongs received for them.
    Pongs,
    /// Connections made again after a loss or failed attempts.
    Reconnects,
}

impl Counter {
    /// Number of counters.
    pub const COUNT: usize = 13;
}

impl Default for ClientStats {
    fn default() -> Self {
        ClientStats {
            connections_up: AtomicI64::new(0),
            counters: Default::default(),
            ended: Mutex::default(),
            failed: Default::default(),
            rtt_micros: Mutex::new(new_histogram()),
            durations: metrics::histogram(
                "websocket_client_connection_duration_seconds",
                "How long connections lasted, from the upgrade to their end",
                &metrics::DURATION_BUCKETS,
            ),
            ping_rtts: metrics::histogram(
                "websocket_client_ping_rtt_seconds",
                "Ping to pong round trips",
                &metrics::RTT_BUCKETS,
            ),
            idle_limit: Mutex::default(),
            backends: Mutex::default(),
            failure_log: Mutex::default(),
        }
    }
}

pub(super) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_RTT_MICROS, 3).expect("valid histogram bounds")
}

impl ClientStats {
    /// Adds `n` to a counter.
    pub fn add(&self, counter: Counter, n: u64) {
        self.counters[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// The current value of a counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.counters[counter as usize].load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn connections_up(&self) -> i64 {
        self.connections_up.load(Ordering::Relaxed)
    }

    /// Connections that ended for `reason` so far.
    pub fn ended(&self, reason: Reason) -> u64 {
        self.endings()
            .iter()
            .filter(|((r, _), _)| *r == reason)
            .map(|(_, n)| n)
            .sum()
    }

    /// Connections that ended for `reason` with Close `code` (ours or the server's) so far.
    pub fn ended_with(&self, reason: Reason, code: Option<u16>) -> u64 {
        self.endings().get(&(reason, code)).copied().unwrap_or(0)
    }

    /// Every (reason, code) that ended a connection, with its count.
    pub(super) fn endings(&self) -> BTreeMap<(Reason, Option<u16>), u64> {
        self.ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Connections open now as counted, with histograms and the load mode's round trips.
    pub(super) fn echo_rtts(&self) -> Histogram<u64> {
        self.rtt_micros
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Connections up now on each backend (`unknown` when the server did not say).
    pub fn backends(&self) -> BTreeMap<String, i64> {
        self.backends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counts a connection on `backend` until the guard drops.
    pub(super) fn on_backend(&self, backend: &str) -> OnBackend<'_> {
        *self
            .backends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(backend.to_owned())
            .or_default() += 1;
        OnBackend {
            stats: self,
            backend: backend.to_owned(),
        }
    }

    /// What `--find-idle-timeout` found, once it is done.
    pub fn idle_limit(&self) -> Option<IdleLimit> {
        *self
            .idle_limit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn set_idle_limit(&self, limit: IdleLimit) {
        *self
            .idle_limit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(limit);
    }

    /// Connection attempts that failed for `cause` so far.
    pub fn failed(&self, cause: Failure) -> u64 {
        self.failed[cause as usize].load(Ordering::Relaxed)
    }

    /// Whether a failure of `cause` should be logged at WARN now (the first in
    /// [`FAILURE_LOG_EVERY`]), with how many of its kind were not logged before it.
    pub(super) fn log_failure(&self, cause: Failure) -> Option<u64> {
        self.failure_log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)[cause as usize]
            .occurred(FAILURE_LOG_EVERY)
    }

    pub(super) fn attempt_failed(&self, cause: Failure) {
        self.add(Counter::ConnectFailures, 1);
        self.failed[cause as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn connection_opened(&self) {
        self.add(Counter::Connects, 1);
        self.connections_up.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn connection_ended(
        &self,
        reason: Reason,
        code: Option<u16>,
        lasted: std::time::Duration,
    ) {
        self.connections_up.fetch_sub(1, Ordering::Relaxed);
        *self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((reason, code))
            .or_default() += 1;
        self.durations.observe(lasted.as_secs_f64());
    }

    pub(super) fn ping_rtt(&self, rtt: std::time::Duration) {
        self.ping_rtts.observe(rtt.as_secs_f64());
    }

    /// Adds a connection's local counts and zeroes them.
    pub(super) fn add_all(&self, local: &mut [u64; Counter::COUNT]) {
        for (shared, n) in self.counters.iter().zip(local.iter_mut()) {
            if *n > 0 {
                shared.fetch_add(std::mem::take(n), Ordering::Relaxed);
            }
        }
    }

    pub(super) fn record_rtts(&self, micros: &[u64]) {
        let mut shared = self
            .rtt_micros
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for &rtt in micros {
            let _ = shared.record(rtt);
        }
    }

    /// A copy of everything, for a report.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            connections_up: self.connections_up(),
            counters: std::array::from_fn(|i| self.counters[i].load(Ordering::Relaxed)),
            rtt_micros: self
                .rtt_micros
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }
}

/// A connection counted on its backend; dropping it takes it off.
pub(super) struct OnBackend<'a> {
    stats: &'a ClientStats,
    backend: String,
}

impl Drop for OnBackend<'_> {
    fn drop(&mut self) {
        // A backend's count stays (at 0) once seen, so its series does not vanish.
        if let Some(count) = self
            .stats
            .backends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(&self.backend)
        {
            *count -= 1;
        }
    }
}

/// The shared counters at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    at: Instant,
    connections_up: i64,
    counters: [u64; Counter::COUNT],
    rtt_micros: Histogram<u64>,
}

impl Snapshot {
    fn get(&self, counter: Counter) -> u64 {
        self.counters[counter as usize]
    }

    /// A report of the period from `earlier` to this snapshot: rates and round trips over
    /// the period, message and error counts since the start.
    pub fn report_since(&self, earlier: &Snapshot) -> Report {
        let mut rtt_micros = self.rtt_micros.clone();
        let _ = rtt_micros.subtract(&earlier.rtt_micros);
        Report {
            seconds: self.at.duration_since(earlier.at).as_secs_f64(),
            earlier: earlier.counters,
            now: self.clone(),
            rtt_micros,
        }
    }
}

/// A one-line summary: `connections=.. messages/s=.. ...`; keys never contain spaces so
/// scripts can split on them.
pub struct Report {
    seconds: f64,
    earlier: [u64; Counter::COUNT],
    now: Snapshot,
    rtt_micros: Histogram<u64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = self.seconds.max(1e-9);
        let delta = |c: Counter| self.now.get(c) - self.earlier[c as usize];
        let rtt = &self.rtt_micros;
        let ms = |micros: u64| micros as f64 / 1000.0;
        write!(
            f,
            "connections={} messages/s={:.0} sent_MB/s={:.2} received_MB/s={:.2} \
             rtt_ms_p50={:.3} rtt_ms_p90={:.3} rtt_ms_p99={:.3} rtt_ms_max={:.3} \
             sent={} received={} corrupted={} reordered={} lost={} connects={} connect_failures={} losses={}",
            self.now.connections_up,
            delta(Counter::Received) as f64 / seconds,
            delta(Counter::BytesSent) as f64 / seconds / 1e6,
            delta(Counter::BytesReceived) as f64 / seconds / 1e6,
            ms(rtt.value_at_quantile(0.50)),
            ms(rtt.value_at_quantile(0.90)),
            ms(rtt.value_at_quantile(0.99)),
            ms(rtt.max()),
            self.now.get(Counter::Sent),
            self.now.get(Counter::Received),
            self.now.get(Counter::Corrupted),
            self.now.get(Counter::Reordered),
            self.now.get(Counter::Lost),
            self.now.get(Counter::Connects),
            self.now.get(Counter::ConnectFailures),
            self.now.get(Counter::Losses),
        )
    }
}
