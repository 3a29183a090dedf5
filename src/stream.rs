//! A TCP stream shared between the thread that runs a WebSocket over it and the threads
//! that may have to close it from outside (shutdown).
//!
//! A thread blocked in `read` on an idle connection cannot be asked to send anything, and
//! polling would cost every idle connection CPU. Instead the stream keeps a small write lock:
//! whoever holds it writes whole frames, so another thread can put a Close frame on the wire
//! between two frames of the owner. The peer's Close reply then wakes the owner. After our
//! Close has gone out, later writes are discarded: RFC 6455 §5.5.1 forbids sending anything
//! after a Close frame, and tungstenite, which did not see ours, would answer the peer's.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

/// The shared half: the socket and its write lock.
#[derive(Debug)]
pub struct SharedStream {
    tcp: TcpStream,
    writer: Mutex<WriterState>,
}

#[derive(Debug, Default)]
struct WriterState {
    /// Our Close frame has been written, or a write failed part-way: nothing more may go out.
    done: bool,
}

impl SharedStream {
    /// Wraps a connected socket.
    pub fn new(tcp: TcpStream) -> Arc<Self> {
        Arc::new(SharedStream {
            tcp,
            writer: Mutex::new(WriterState::default()),
        })
    }

    /// The underlying socket, for options and addresses.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
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
        let writer = match self.writer.try_lock() {
            Ok(writer) => writer,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        // Only the lock holder writes, so the owner never sees the shorter timeout.
        let owner_timeout = self.tcp.write_timeout().unwrap_or(None);
        let _ = self.tcp.set_write_timeout(Some(timeout));
        let sent = Self::close_locked(&self.tcp, writer, frame);
        let _ = self.tcp.set_write_timeout(owner_timeout);
        Some(sent)
    }

    /// Shuts the socket down in both directions: blocked reads and writes return at once.
    pub fn abort(&self) {
        let _ = self.tcp.shutdown(Shutdown::Both);
    }

    fn close_locked(
        tcp: &TcpStream,
        mut writer: MutexGuard<'_, WriterState>,
        frame: &[u8],
    ) -> io::Result<bool> {
        if writer.done {
            return Ok(false);
        }
        writer.done = true;
        (&*tcp).write_all(frame)?;
        Ok(true)
    }

    fn lock(&self) -> MutexGuard<'_, WriterState> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The owner's half, given to tungstenite: reads freely, writes whole buffers under the lock,
/// and counts the bytes that arrive (a large frame arriving slowly shows the peer is alive
/// before the whole message has).
#[derive(Debug)]
pub struct WsStream {
    shared: Arc<SharedStream>,
    bytes_read: u64,
}

impl WsStream {
    /// The owner's half of `shared`.
    pub fn new(shared: Arc<SharedStream>) -> Self {
        WsStream {
            shared,
            bytes_read: 0,
        }
    }

    /// Bytes received from the peer so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }
}

impl Read for WsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (&self.shared.tcp).read(buf)?;
        self.bytes_read += n as u64;
        Ok(n)
    }
}

impl Write for WsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut writer = self.shared.lock();
        if writer.done {
            return Ok(buf.len());
        }
        // tungstenite hands over whole frames; writing all of them under the lock keeps a
        // Close frame from another thread from landing inside one.
        if let Err(error) = (&self.shared.tcp).write_all(buf) {
            writer.done = true;
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
            writer.done = true;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Closes connections from outside their threads (at shutdown): sends each stream in
/// `live()` the Close frame `frame()` builds, retrying streams whose owner is mid-write,
/// and waits until `finished` disconnects (every owner thread has ended) or `timeout`
/// passes. Then it shuts the remaining sockets down and waits up to `grace` for their
/// threads. Returns how many connections had to be shut down that way.
pub fn close_all(
    live: impl Fn() -> Vec<Arc<SharedStream>>,
    frame: impl Fn() -> Vec<u8>,
    finished: &Receiver<()>,
    timeout: Duration,
    grace: Duration,
) -> usize {
    const RETRY: Duration = Duration::from_millis(10);
    const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_millis(50);
    let deadline = Instant::now() + timeout;
    let mut busy = live();
    loop {
        // Past the deadline the rest stay busy: each try may wait CLOSE_WRITE_TIMEOUT.
        busy.retain(|stream| {
            Instant::now() >= deadline
                || stream
                    .try_send_close(&frame(), CLOSE_WRITE_TIMEOUT)
                    .is_none()
        });
        let wake = if busy.is_empty() {
            deadline
        } else {
            deadline.min(Instant::now() + RETRY)
        };
        match finished.recv_deadline(wake) {
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
