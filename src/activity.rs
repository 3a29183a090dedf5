//! What one connection has done so far: messages and bytes each way, when the peer was last
//! heard from, the last ping round trip. Its own thread updates these with relaxed atomics
//! (no lock on the message path); other threads read them for `/debug/connections`, and
//! the end-of-connection line reads them last.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A connection's live counters.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    /// Nanoseconds after `opened` that the last bytes arrived.
    last_heard: AtomicU64,
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
    /// The last ping's round trip in microseconds; 0 before the first pong.
    last_rtt_micros: AtomicU64,
    pongs: AtomicU64,
}

impl Activity {
    /// A connection opened now.
    pub fn new() -> Self {
        Activity {
            opened: Instant::now(),
            last_heard: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            last_rtt_micros: AtomicU64::new(0),
            pongs: AtomicU64::new(0),
        }
    }

    /// When the connection opened.
    pub fn opened(&self) -> Instant {
        self.opened
    }

    /// Bytes arrived from the peer just now (any frame, or part of one).
    pub fn heard(&self) {
        let since = self.opened.elapsed().as_nanos();
        self.last_heard
            .store(u64::try_from(since).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// A data message of `bytes` arrived.
    pub fn received(&self, bytes: usize) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A data message of `bytes` went out.
    pub fn sent(&self, bytes: usize) {
        self.messages_out.fetch_add(1, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A pong answered a ping after `rtt`.
    pub fn pong(&self, rtt: Duration) {
        self.pongs.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
        self.last_rtt_micros.store(micros, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        let age = self.opened.elapsed();
        let heard = Duration::from_nanos(self.last_heard.load(Ordering::Relaxed));
        let rtt = self.last_rtt_micros.load(Ordering::Relaxed);
        Snapshot {
            age,
            silence: age.saturating_sub(heard),
            messages_in: self.messages_in.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            last_rtt: (rtt > 0).then(|| Duration::from_micros(rtt)),
            pongs: self.pongs.load(Ordering::Relaxed),
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// A connection's counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Time since the connection opened.
    pub age: Duration,
    /// Time since the peer last sent anything (the whole age if it never did).
    pub silence: Duration,
    /// Data messages received.
    pub messages_in: u64,
    /// Payload bytes received.
    pub bytes_in: u64,
    /// Data messages sent.
    pub messages_out: u64,
    /// Payload bytes sent.
    pub bytes_out: u64,
    /// The last ping's round trip.
    pub last_rtt: Option<Duration>,
    /// Pongs received for our pings.
    pub pongs: u64,
}

impl fmt::Display for Snapshot {
    /// `age 61.2s, silent 60.0s, rtt 0.41ms, in 3 msgs 120 B, out 3 msgs 120 B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "age {}, silent {}",
            Seconds(self.age),
            Seconds(self.silence)
        )?;
        if let Some(rtt) = self.last_rtt {
            write!(f, ", rtt {:.2}ms", rtt.as_secs_f64() * 1000.0)?;
        }
        write!(
            f,
            ", in {} msgs {} B, out {} msgs {} B",
            self.messages_in, self.bytes_in, self.messages_out, self.bytes_out
        )
    }
}

/// A duration in seconds with one decimal, as log lines show ages and silences.
pub struct Seconds(pub Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1}s", self.0.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_silence() {
        let activity = Activity::new();
        activity.received(10);
        activity.received(5);
        activity.sent(7);
        activity.pong(Duration::from_micros(410));
        activity.heard();
        let snapshot = activity.snapshot();
        assert_eq!(
            (
                snapshot.messages_in,
                snapshot.bytes_in,
                snapshot.messages_out,
                snapshot.bytes_out
            ),
            (2, 15, 1, 7)
        );
        assert_eq!(snapshot.pongs, 1);
        assert!(snapshot.silence <= snapshot.age);
        let text = snapshot.to_string();
        assert!(text.contains("rtt 0.41ms"), "{text}");
        assert!(text.ends_with("in 2 msgs 15 B, out 1 msgs 7 B"), "{text}");
    }

    #[test]
    fn a_peer_never_heard_from_is_silent_for_the_whole_age() {
        let snapshot = Activity::new().snapshot();
        assert_eq!(snapshot.silence, snapshot.age);
        assert_eq!(snapshot.last_rtt, None);
    }
}
