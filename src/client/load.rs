//! Load mode: every connection sends messages that carry its id, a sequence number and a
//! checksum, verifies each echo byte for byte, and measures round trips. Counters are kept
//! per connection thread and folded into the shared [`ClientStats`] every [`FLUSH_EVERY`],
//! so connection threads do not contend on one cache line per message.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use super::stats::{ClientStats, Counter, MAX_RTT_MICROS};
use crate::config::ClientConfig;

/// Bytes of the header every load message starts with: connection id (4), sequence
/// number (8), checksum of those two (4).
pub const HEADER_SIZE: usize = 16;
// The config module checks --message-size against its own copy of the header size.
const _: () = assert!(HEADER_SIZE == crate::config::MIN_MESSAGE_SIZE);
/// How often a connection thread folds its counters into the shared ones.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Round trips a connection keeps before it flushes them anyway (8 KiB).
const FLUSH_RTTS: usize = 1024;

/// What load each connection generates.
#[derive(Debug, Clone, Copy)]
pub struct LoadConfig {
    /// Size of each message; at least [`HEADER_SIZE`].
    pub message_size: usize,
    /// Time between messages; zero means closed loop (send the next when the echo arrives).
    pub interval: Duration,
    /// Close normally and reconnect at once after this many echoes (0: never).
    pub messages_per_connection: u64,
}

impl LoadConfig {
    /// The load each connection of `config` generates, if load mode is on.
    pub fn from_config(config: &ClientConfig) -> Option<LoadConfig> {
        config.message_size.map(|message_size| LoadConfig {
            message_size,
            interval: config.message_interval,
            messages_per_connection: config.messages_per_connection.unwrap_or(0),
        })
    }
}

/// One connection's load generator: builds messages, matches echoes, keeps local counts.
pub struct Generator {
    config: LoadConfig,
    connection: u32,
    next_seq: u64,
    in_flight: VecDeque<(u64, Instant, Bytes)>,
    /// Memory for the next message, reclaimed once no message of it is in flight.
    scratch: BytesMut,
    highest_received: Option<u64>,
    echoes: u64,
    local: [u64; Counter::COUNT],
    /// Round trips since the last flush. A list, not a histogram of our own: an HDR
    /// histogram is 139 KiB, which every connection would carry and every reconnect zero.
    rtt_micros: Vec<u64>,
    last_flush: Instant,
}

impl Generator {
    /// A generator for connection `connection` (its id goes into every message).
    pub fn new(config: LoadConfig, connection: u32) -> Self {
        Generator {
            config,
            connection,
            next_seq: 0,
            in_flight: VecDeque::new(),
            scratch: BytesMut::new(),
            highest_received: None,
            echoes: 0,
            local: [0; Counter::COUNT],
            rtt_micros: Vec::new(),
            last_flush: Instant::now(),
        }
    }

    /// When the next message is due, given when the previous one was sent; `None` while a
    /// closed loop waits for its echo.
    pub fn next_send(&self, last_sent: Instant) -> Option<Instant> {
        if self.config.interval.is_zero() {
            self.in_flight.is_empty().then_some(last_sent)
        } else {
            Some(last_sent + self.config.interval)
        }
    }

    /// Whether this connection has had all its echoes and should close.
    pub fn finished(&self) -> bool {
        self.config.messages_per_connection > 0
            && self.echoes >= self.config.messages_per_connection
    }

    /// The next message to send.
    pub fn next_message(&mut self) -> Bytes {
        let seq = self.next_seq;
        self.next_seq += 1;
        let message = encode(
            &mut self.scratch,
            self.connection,
            seq,
            self.config.message_size,
        );
        self.in_flight
            .push_back((seq, Instant::now(), message.clone()));
        self.local[Counter::Sent as usize] += 1;
        self.local[Counter::BytesSent as usize] += message.len() as u64;
        message
    }

    /// Checks an echo against what was sent and records its round trip.
    pub fn on_echo(&mut self, echo: &[u8]) {
        self.local[Counter::BytesReceived as usize] += echo.len() as u64;
        let Some(seq) = decode(self.connection, echo) else {
            self.local[Counter::Corrupted as usize] += 1;
            return;
        };
        if self.highest_received.is_some_and(|highest| seq < highest) {
            self.local[Counter::Reordered as usize] += 1;
        }
        self.highest_received = Some(self.highest_received.map_or(seq, |h| h.max(seq)));
        let Some(index) = self
            .in_flight
            .iter()
            .position(|(sent_seq, _, _)| *sent_seq == seq)
        else {
            self.local[Counter::Corrupted as usize] += 1; // an echo of nothing we sent
            return;
        };
        let (_, sent_at, sent) = self.in_flight.remove(index).expect("index is in range");
        if !same_bytes(&sent, echo) {
            self.local[Counter::Corrupted as usize] += 1;
            return;
        }
        self.echoes += 1;
        self.local[Counter::Received as usize] += 1;
        let micros = (sent_at.elapsed().as_micros() as u64).clamp(1, MAX_RTT_MICROS);
        self.rtt_micros.push(micros);
    }

    /// Folds local counts into `stats` if [`FLUSH_EVERY`] has passed (or `force`).
    pub fn flush(&mut self, stats: &ClientStats, force: bool) {
        if !force && self.rtt_micros.len() < FLUSH_RTTS && self.last_flush.elapsed() < FLUSH_EVERY {
            return;
        }
        self.last_flush = Instant::now();
        stats.add_all(&mut self.local);
        if !self.rtt_micros.is_empty() {
            stats.record_rtts(&self.rtt_micros);
            self.rtt_micros.clear();
        }
    }

    /// The connection ended: whatever is still in flight is lost, unless we were stopping
    /// (then the last messages may never have left: nothing goes out after our Close).
    pub fn end(&mut self, stats: &ClientStats, stopping: bool) {
        if !stopping {
            self.local[Counter::Lost as usize] += self.in_flight.len() as u64;
        }
        self.in_flight.clear();
        self.flush(stats, true);
    }
}

/// Builds a message in `scratch`: header (connection, sequence, checksum) and a body that
/// depends on both, so a byte moved between messages is caught too. `scratch` reuses its
/// memory when the message built last is gone: one allocation per connection, not one per
/// message (which musl's allocator serves slowly at 64 KiB).
pub fn encode(scratch: &mut BytesMut, connection: u32, seq: u64, size: usize) -> Bytes {
    let size = size.max(HEADER_SIZE);
    scratch.clear();
    scratch.reserve(size);
    scratch.put_u32(connection);
    scratch.put_u64(seq);
    scratch.put_u32(checksum(connection, seq));
    let seed = (seq as u8) ^ (connection as u8);
    scratch.extend((0..size - HEADER_SIZE).map(|i| seed.wrapping_add(i as u8)));
    scratch.split().freeze()
}

/// `a == b`, eight bytes at a time: a slice comparison calls the C library's `memcmp`,
/// which musl (the static binaries) runs a byte at a time.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (a_words, b_words) = (a.chunks_exact(8), b.chunks_exact(8));
    let tails_match = a_words.remainder() == b_words.remainder();
    tails_match
        && a_words.zip(b_words).all(|(x, y)| {
            u64::from_ne_bytes(x.try_into().unwrap_or_default())
                == u64::from_ne_bytes(y.try_into().unwrap_or_default())
        })
}

/// The sequence number of a message of `connection` whose header is intact.
pub fn decode(connection: u32, message: &[u8]) -> Option<u64> {
    let header = message.get(..HEADER_SIZE)?;
    let id = u32::from_be_bytes(header[0..4].try_into().ok()?);
    let seq = u64::from_be_bytes(header[4..12].try_into().ok()?);
    let sum = u32::from_be_bytes(header[12..16].try_into().ok()?);
    (id == connection && sum == checksum(id, seq)).then_some(seq)
}

/// FNV-1a over the connection id and sequence number.
fn checksum(connection: u32, seq: u64) -> u32 {
    connection
        .to_be_bytes()
        .iter()
        .chain(seq.to_be_bytes().iter())
        .fold(0x811c_9dc5u32, |hash, byte| {
            (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(interval_ms: u64) -> LoadConfig {
        LoadConfig {
            message_size: 32,
            interval: Duration::from_millis(interval_ms),
            messages_per_connection: 2,
        }
    }

    #[test]
    fn same_bytes_is_slice_equality() {
        let a: Vec<u8> = (0..100u8).collect();
        for len in [0, 1, 7, 8, 9, 64, 100] {
            assert!(same_bytes(&a[..len], &a[..len]));
            for flip in 0..len {
                let mut b = a[..len].to_vec();
                b[flip] ^= 0x10;
                assert!(!same_bytes(&a[..len], &b), "len {len}, byte {flip}");
            }
        }
        assert!(!same_bytes(&a[..8], &a[..9]));
    }

    #[test]
    fn messages_round_trip_and_corruption_is_caught() {
        let message = encode(&mut BytesMut::new(), 7, 42, 64);
        assert_eq!(message.len(), 64);
        assert_eq!(decode(7, &message), Some(42));
        assert_eq!(decode(8, &message), None);
        let mut flipped = message.to_vec();
        flipped[5] ^= 1;
        assert_eq!(decode(7, &flipped), None);
    }

    #[test]
    fn generator_counts_echoes_reorders_corruption_and_losses() {
        let stats = ClientStats::default();
        let mut generator = Generator::new(config(10), 1);
        let first = generator.next_message();
        let second = generator.next_message();
        let third = generator.next_message();
        generator.on_echo(&second);
        generator.on_echo(&first); // arrives after a later one
        let mut bad = third.to_vec();
        *bad.last_mut().unwrap() ^= 0xff;
        generator.on_echo(&bad); // body differs
        assert!(generator.finished());
        generator.end(&stats, false);
        assert_eq!(stats.get(Counter::Sent), 3);
        assert_eq!(stats.get(Counter::Received), 2);
        assert_eq!(stats.get(Counter::Reordered), 1);
        assert_eq!(stats.get(Counter::Corrupted), 1);
        assert_eq!(
            stats.get(Counter::Lost),
            0,
            "the corrupted one was answered"
        );
        let snapshot = stats.snapshot();
        assert!(snapshot
            .report_since(&snapshot)
            .to_string()
            .contains("received=2 corrupted=1 reordered=1"));
    }

    #[test]
    fn closed_loop_waits_for_the_echo() {
        let mut generator = Generator::new(config(0), 1);
        let now = Instant::now();
        assert_eq!(generator.next_send(now), Some(now));
        let message = generator.next_message();
        assert_eq!(generator.next_send(now), None);
        generator.on_echo(&message);
        assert_eq!(generator.next_send(now), Some(now));
        let stats = ClientStats::default();
        let mut unanswered = Generator::new(config(0), 2);
        unanswered.next_message();
        unanswered.end(&stats, false);
        assert_eq!(stats.get(Counter::Lost), 1);
    }
}
