//! A TCP stream shared between the thread that runs a WebSocket over it and the threads
//! that may have to close it from outside (shutdown), with or without TLS.
//!
//! A thread blocked in `read` on an idle connection cannot be asked to send anything, and
//! polling would cost every idle connection CPU. Instead the stream keeps a small write lock:
//! whoever holds it writes whole frames, so another thread can put a Close frame on the wire
//! between two frames of the owner. The peer's Close reply then wakes the owner. After our
//! Close has gone out, later writes are discarded: RFC 6455 §5.5.1 forbids sending anything
//! after a Close frame, and tungstenite, which did not see ours, would answer the peer's.
//!
//! With TLS the same lock guards the rustls connection: the owner waits for ciphertext in
//! `peek` on the socket *without* the lock, then takes it briefly to read and decrypt what
//! arrived; a writer on any thread encrypts and sends under it. So another thread can still
//! send a Close to an idle wss connection whose owner sleeps in `peek`, and an idle
//! connection stays idle.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::boundary::Boundaries;

/// The shared half: the socket, and under its lock the write state and the TLS session.
#[derive(Debug)]
pub struct SharedStream {
    tcp: TcpStream,
    /// Whether `inner` holds a TLS session: a plain read then needs no lock at all.
    encrypted: bool,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Our Close frame has been written, or a write failed part-way: nothing more may go out.
    done: bool,
    /// Boxed: a rustls session is over 1 KiB, which a plain connection should not carry.
    tls: Option<Box<rustls::Connection>>,
}

impl SharedStream {
    /// Wraps a connected socket.
    pub fn new(tcp: TcpStream) -> Arc<Self> {
        Self::wrap(tcp, None)
    }

    /// Wraps a connected socket whose bytes go through the TLS session `tls` (its
    /// handshake not done yet: see [`tls_handshake`](Self::tls_handshake)).
    pub fn with_tls(tcp: TcpStream, tls: impl Into<rustls::Connection>) -> Arc<Self> {
        Self::wrap(tcp, Some(Box::new(tls.into())))
    }

    fn wrap(tcp: TcpStream, tls: Option<Box<rustls::Connection>>) -> Arc<Self> {
        Arc::new(SharedStream {
            tcp,
            encrypted: tls.is_some(),
            inner: Mutex::new(Inner { done: false, tls }),
        })
    }

    /// The underlying socket, for options, timeouts and addresses.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        self.encrypted
    }

    /// Runs the TLS handshake (a no-op without TLS) within `deadline`; on a failure the
    /// alert rustls prepared is sent before the error returns.
    pub fn tls_handshake(&self, deadline: Instant) -> io::Result<()> {
        loop {
            {
                let mut inner = self.lock();
                let Some(tls) = inner.tls.as_mut() else {
                    return Ok(());
                };
                flush_tls(tls, &self.tcp)?;
                if !tls.is_handshaking() {
                    return Ok(());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ));
            }
            self.tcp.set_read_timeout(Some(left))?;
            if self.receive_tls()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed during the TLS handshake",
                ));
            }
        }
    }

    /// Reads plaintext: on the owner's thread only.
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.encrypted {
            return (&self.tcp).read(buf);
        }
        loop {
            {
                let mut inner = self.lock();
                let Some(tls) = inner.tls.as_mut() else {
                    drop(inner);
                    return (&self.tcp).read(buf);
                };
                match tls.reader().read(buf) {
                    // No plaintext yet: wait for more ciphertext, without the lock.
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    // Ok(0) after the peer's close_notify; UnexpectedEof without one.
                    other => return other,
                }
            }
            self.receive_tls()?;
        }
    }

    /// Waits for ciphertext (blocking, without the lock), then lets rustls read it from the
    /// socket into its own buffer and answer what needs answering (handshake, alerts).
    /// Returns the number of bytes read: 0 at EOF, which rustls sees too.
    // Waiting in `peek` needs no buffer of our own: one on the stack (ciphertext comes in
    // records of up to 16 KiB) would keep its pages resident in every idle wss thread, and
    // rustls keeps a read buffer anyway. The read under the lock does not block: the bytes,
    // or the EOF, are there.
    fn receive_tls(&self) -> io::Result<usize> {
        self.tcp.peek(&mut [0u8; 1])?;
        let mut inner = self.lock();
        let tls = inner.tls.as_mut().expect("a TLS stream");
        let n = tls.read_tls(&mut &self.tcp)?;
        process_tls(tls, &self.tcp)?;
        Ok(n)
    }

    /// Writes `bytes` whole, outside the WebSocket framing (the HTTP upgrade).
    pub fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        let mut inner = self.lock();
        write_locked(&mut inner, &self.tcp, bytes)
    }

    /// Writes an encoded Close frame unless one already went out; waits for a
    /// write in progress to finish. Returns whether this call sent it.
    pub fn send_close(&self, frame: &[u8]) -> io::Result<bool> {
        Self::close_locked(&self.tcp, self.lock(), frame)
    }

    /// Like [`send_close`](Self::send_close) for a thread other than the owner: returns
    /// `None` instead of waiting when the owner is writing, and gives up after `timeout`
    /// when the peer's receive window is full (a peer that does not read).
    pub fn try_send_close(&self, frame: &[u8], timeout: Duration) -> Option<io::Result<bool>> {
        let inner = match self.inner.try_lock() {
            Ok(inner) => inner,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        // Only the lock holder writes, so the owner never sees the shorter timeout.
        let owner_timeout = self.tcp.write_timeout().unwrap_or(None);
        let _ = self.tcp.set_write_timeout(Some(timeout));
        let sent = Self::close_locked(&self.tcp, inner, frame);
        let _ = self.tcp.set_write_timeout(owner_timeout);
        Some(sent)
    }

    /// Ends the connection politely: TLS's close_notify (if encrypted), then a half-close
    /// and a drain of what the peer still sends, for at most `linger` (see
    /// [`net::close_gracefully`](crate::net::close_gracefully)).
    pub fn close_gracefully(&self, linger: Duration) {
        self.send_close_notify();
        crate::net::close_gracefully(&self.tcp, linger);
    }

    /// Sends TLS's close_notify alert (a no-op without TLS), so the peer can tell our end
    /// from a truncation.
    pub fn send_close_notify(&self) {
        let mut inner = self.lock();
        if let Some(tls) = inner.tls.as_mut() {
            tls.send_close_notify();
            let _ = flush_tls(tls, &self.tcp);
        }
    }

    /// Makes the socket's close a reset: for a peer whose receive window stays full, which
    /// a Close frame or a FIN could not get through.
    pub fn reset_on_close(&self) {
        let _ = socket2::SockRef::from(&self.tcp).set_linger(Some(Duration::ZERO));
    }

    /// Shuts the socket down in both directions: blocked reads and writes return at once.
    pub fn abort(&self) {
        let _ = self.tcp.shutdown(Shutdown::Both);
    }

    fn close_locked(
        tcp: &TcpStream,
        mut inner: MutexGuard<'_, Inner>,
        frame: &[u8],
    ) -> io::Result<bool> {
        if inner.done {
            return Ok(false);
        }
        inner.done = true;
        write_locked(&mut inner, tcp, frame)?;
        Ok(true)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reads plaintext, for the opening handshake: on the owner's thread only.
impl Read for &SharedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        SharedStream::read(self, buf)
    }
}

/// Writes `bytes` whole: straight to the socket, or encrypted.
fn write_locked(inner: &mut Inner, tcp: &TcpStream, bytes: &[u8]) -> io::Result<()> {
    match inner.tls.as_mut() {
        None => WithinTimeout::new(tcp).write_all(bytes),
        Some(tls) => {
            // rustls takes plaintext only while its outgoing buffer has room: encrypt and
            // send in turns.
            let mut rest = bytes;
            while !rest.is_empty() {
                let taken = tls.writer().write(rest)?;
                rest = &rest[taken..];
                flush_tls(tls, tcp)?;
            }
            Ok(())
        }
    }
}

/// Processes what rustls has received and sends what it answers; a protocol failure sends
/// rustls's alert and becomes an `InvalidData` error carrying a [`TlsError`].
fn process_tls(tls: &mut rustls::Connection, tcp: &TcpStream) -> io::Result<()> {
    if let Err(error) = tls.process_new_packets() {
        let _ = flush_tls(tls, tcp);
        return Err(io::Error::new(io::ErrorKind::InvalidData, TlsError(error)));
    }
    flush_tls(tls, tcp)
}

/// Sends everything rustls has queued.
fn flush_tls(tls: &mut rustls::Connection, tcp: &TcpStream) -> io::Result<()> {
    let mut socket = WithinTimeout::new(tcp);
    while tls.wants_write() {
        tls.write_tls(&mut socket)?;
    }
    Ok(())
}

/// The socket as a writer whose writes for one frame all end within the socket's write
/// timeout. That timeout bounds each system call only, so a peer that reads a little now
/// and then could stretch one frame's write without end; after the first write that did
/// not take everything, each further one gets only what is left of the timeout. (A write
/// that takes everything at once costs no extra system call.)
struct WithinTimeout<'a> {
    tcp: &'a TcpStream,
    started: Instant,
    /// The socket's own write timeout, read after the first partial write and put back
    /// when done.
    slow: Option<Option<Duration>>,
}

impl<'a> WithinTimeout<'a> {
    fn new(tcp: &'a TcpStream) -> Self {
        WithinTimeout {
            tcp,
            started: Instant::now(),
            slow: None,
        }
    }
}

impl Write for WithinTimeout<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(Some(limit)) = self.slow {
            let left = limit.saturating_sub(self.started.elapsed());
            if left.is_zero() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.tcp.set_write_timeout(Some(left))?;
        }
        let written = (&*self.tcp).write(buf)?;
        if written < buf.len() && self.slow.is_none() {
            self.slow = Some(self.tcp.write_timeout()?);
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for WithinTimeout<'_> {
    fn drop(&mut self) {
        if let Some(limit) = self.slow {
            let _ = self.tcp.set_write_timeout(limit);
        }
    }
}

/// A TLS protocol failure (bad certificate, alert, garbage instead of a record), kept as
/// the source of an `InvalidData` I/O error so callers can tell it apart.
#[derive(Debug)]
pub struct TlsError(pub rustls::Error);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::tls::Explained(&self.0).fmt(f)
    }
}

impl std::error::Error for TlsError {}

/// Whether `error` is a TLS protocol failure (see [`TlsError`]).
pub fn is_tls_error(error: &io::Error) -> bool {
    matches!(error.get_ref(), Some(inner) if inner.is::<TlsError>())
}

/// The owner's half, given to tungstenite: reads freely, writes whole buffers under the lock,
/// and counts the bytes that arrive (a large frame arriving slowly shows the peer is alive
/// before the whole message has).
#[derive(Debug)]
pub struct WsStream {
    shared: Arc<SharedStream>,
    bytes_read: u64,
    /// What the message being read holds of the server's memory budget.
    account: Option<crate::budget::Account>,
    ahead: ReadAhead,
    boundaries: Boundaries,
}

/// Largest read-ahead buffer: a 64 KiB message arrives in one or two reads, and the
/// buffer stays below glibc's 128 KiB threshold for serving an allocation with mmap.
const READ_AHEAD: usize = 120 << 10;

/// Read-ahead buffers not in use, for the next connection that needs one. Taking one from
/// here instead of the allocator matters for musl's, which hands a block this size back to the
/// system on free: a fresh one for every large message cost a page fault per 4 KiB (the
/// static server echoed 64 KiB messages at a quarter of the glibc build's speed).
static SPARE_READ_AHEAD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Spares kept at most: a bound on memory that no connection holds (about 2 MiB).
const SPARES: usize = 16;

/// A zeroed buffer of [`READ_AHEAD`] bytes.
fn take_read_ahead() -> Vec<u8> {
    let spare = SPARE_READ_AHEAD
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pop();
    spare.unwrap_or_else(|| vec![0; READ_AHEAD])
}

fn give_back_read_ahead(buf: Vec<u8>) {
    if buf.len() != READ_AHEAD {
        return;
    }
    let mut spares = SPARE_READ_AHEAD
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if spares.len() < SPARES {
        spares.push(buf);
    }
}

/// Reads ahead for tungstenite, which asks for at most its read buffer size (1 KiB, to keep
/// idle connections small) at a time, so a large message would cost one system call per
/// KiB. Once a read fills tungstenite's whole request (more is probably waiting), the next
/// socket reads go into a buffer of up to [`READ_AHEAD`] here and tungstenite is served from
/// it; once a socket read no longer fills tungstenite's request, the buffer is given back as
/// soon as it is drained. Small messages are read straight into tungstenite's buffer: one
/// system call each, and an idle connection holds no buffer here.
#[derive(Debug, Default)]
struct ReadAhead {
    /// Allocated and zeroed once while reads stay eager; bytes `start..end` are unread.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eager: bool,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        give_back_read_ahead(std::mem::take(&mut self.buf));
    }
}

impl WsStream {
    /// The owner's half of `shared`.
    pub fn new(shared: Arc<SharedStream>) -> Self {
        WsStream {
            shared,
            bytes_read: 0,
            account: None,
            ahead: ReadAhead::default(),
            boundaries: Boundaries::default(),
        }
    }

    /// Serves `leftover` (bytes that came with the upgrade request) before reading the socket.
    pub fn after(mut self, leftover: Vec<u8>) -> Self {
        self.ahead = ReadAhead {
            end: leftover.len(),
            buf: leftover,
            start: 0,
            eager: false,
        };
        self
    }

    /// The owner's half of `shared`, its messages charged to `budget`: a read whose bytes
    /// would break the budget fails (see [`crate::budget`]).
    pub fn with_budget(shared: Arc<SharedStream>, budget: Arc<crate::budget::Budget>) -> Self {
        WsStream {
            account: Some(crate::budget::Account::new(budget)),
            ..Self::new(shared)
        }
    }

    /// Bytes received from the peer so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The message read last is done with (echoed): what it held goes back to the budget.
    pub fn settled(&mut self) {
        if let Some(account) = &mut self.account {
            account.settled();
        }
    }

    /// True when everything read so far belongs to the first `taken` messages (control
    /// frames included), all of them whole: a reader that took exactly that many holds none
    /// of the peer's bytes.
    pub fn all_taken(&self, taken: u64) -> bool {
        self.boundaries.all_taken(taken)
    }
}

impl WsStream {
    /// Reads from the socket, counting what arrives.
    fn receive(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.shared.read(buf)?;
        self.bytes_read += n as u64;
        if let Some(account) = &mut self.account {
            account.received(n)?;
        }
        Ok(n)
    }
}

impl Read for WsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.read_ahead(buf)?;
        self.boundaries.pass(&buf[..n]);
        Ok(n)
    }
}

impl WsStream {
    fn read_ahead(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ahead.start == self.ahead.end {
            if !self.ahead.eager {
                // Straight into tungstenite's buffer; a full read says more is waiting.
                let n = self.receive(buf)?;
                self.ahead.eager = n == buf.len() && n > 0;
                return Ok(n);
            }
            let mut ahead = std::mem::take(&mut self.ahead.buf);
            if ahead.len() != READ_AHEAD {
                give_back_read_ahead(ahead);
                ahead = take_read_ahead();
            }
            let received = self.receive(&mut ahead);
            let n = *received.as_ref().unwrap_or(&0);
            // A full read-ahead says more is waiting: the buffer stays for the next one.
            // Otherwise the next read after this one is drained goes straight into
            // tungstenite's buffer again, so an idle connection never waits holding it.
            self.ahead = ReadAhead {
                // Nothing came (an error, a timeout tick, the end): nothing to keep.
                buf: if n > 0 {
                    ahead
                } else {
                    give_back_read_ahead(ahead);
                    Vec::new()
                },
                start: 0,
                end: n,
                eager: n == READ_AHEAD,
            };
            received?;
        }
        let ReadAhead {
            buf: ahead,
            start,
            end,
            eager,
        } = &mut self.ahead;
        let n = buf.len().min(*end - *start);
        buf[..n].copy_from_slice(&ahead[*start..*start + n]);
        *start += n;
        if *start == *end {
            *start = 0;
            *end = 0;
            if !*eager {
                give_back_read_ahead(std::mem::take(ahead));
            }
        }
        Ok(n)
    }
}

impl Write for WsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut inner = self.shared.lock();
        if inner.done {
            return Ok(buf.len());
        }
        // tungstenite hands over whole frames; writing all of them under the lock keeps a
        // Close frame from another thread from landing inside one.
        if let Err(error) = write_locked(&mut inner, &self.shared.tcp, buf) {
            inner.done = true;
            // A write timeout surfaces as WouldBlock, which the owner would take for a
            // read-timeout tick; this error ends the connection instead.
            if crate::net::is_timeout(&error) {
                return Err(crate::ending::write_timed_out());
            }
            return Err(error);
        }
        // tungstenite writes each frame as it is made, so a buffer that starts with a Close
        // opcode is tungstenite's own Close (a reply): ours must not follow it.
        if buf.first().is_some_and(|byte| byte & 0x0F == 0x8) {
            inner.done = true;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Closes connections from outside their threads (at shutdown): sends each stream in
/// `live()` the Close frame `frame()` builds, spread evenly over `spread` (all at once when
/// zero), retrying streams whose owner is mid-write, and waits until `finished` disconnects
/// (every owner thread has ended) or `timeout` has passed after the spread. Then it shuts
/// the remaining sockets down and waits up to `grace` for their threads. Returns how many
/// connections had to be shut down that way.
pub fn close_all(
    live: impl Fn() -> Vec<Arc<SharedStream>>,
    frame: impl Fn() -> Vec<u8>,
    finished: &Receiver<()>,
    spread: Duration,
    timeout: Duration,
    grace: Duration,
) -> usize {
    const RETRY: Duration = Duration::from_millis(10);
    const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_millis(50);
    let start = Instant::now();
    let deadline = start + spread + timeout;
    let streams = live();
    let count = streams.len().max(1) as f64;
    // Each stream's turn; one whose owner is writing is tried again after RETRY.
    let mut pending: Vec<(Instant, Arc<SharedStream>)> = streams
        .into_iter()
        .enumerate()
        .map(|(i, stream)| (start + spread.mul_f64(i as f64 / count), stream))
        .collect();
    loop {
        let now = Instant::now();
        // Past the deadline the rest stay unsent: each try may wait CLOSE_WRITE_TIMEOUT.
        pending.retain(|(due, stream)| {
            now < *due
                || (now < deadline
                    && stream
                        .try_send_close(&frame(), CLOSE_WRITE_TIMEOUT)
                        .is_none())
        });
        let next = pending
            .iter()
            .map(|(due, _)| (*due).max(now + RETRY))
            .min()
            .unwrap_or(deadline);
        match finished.recv_deadline(next.min(deadline)) {
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(RecvTimeoutError::Timeout) => break,
            _ => return 0,
        }
    }
    let left = live();
    for stream in &left {
        stream.abort();
    }
    if !left.is_empty() {
        let _ = finished.recv_timeout(grace);
    }
    left.len()
}
