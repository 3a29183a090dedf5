//! The accept loop: admits each socket to a `conn-N` thread of its own, or, past the
//! connection ceiling or when the OS refuses a thread, hands it to the `rejecter`, which
//! answers 503 without a thread per socket; past a per-address limit, 429 the same way.

use std::borrow::Cow;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{debug, error, warn};

use super::access::Admission;
use super::capacity::Capacity;
use super::connection::{self, Context};
use super::handshake::Reply;
use crate::net;
use crate::repeats::Repeats;

/// Stack of a connection thread. The echo loop needs little stack, and a small one keeps
/// thousands of threads cheap; the kernel maps only the pages a thread touches.
pub const CONNECTION_STACK_SIZE: usize = 64 * 1024;
/// Stack of the thread that runs a wss connection's TLS handshake, then hands the
/// connection to a fresh `CONNECTION_STACK_SIZE` thread (see `connection::run`). Smaller on
/// purpose: glibc keeps the stacks of ended threads, their touched pages still resident,
/// for new threads asking no more than their size, so a fresh connection thread never
/// inherits a handshake's deep pages.
const TLS_HANDSHAKE_STACK_SIZE: usize = 60 * 1024;
/// Backoff bounds after a failed `accept` (EMFILE and friends repeat until a socket closes).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// Sockets waiting for their 503 (fewer under a small file limit: see `Capacity`); beyond
/// this a refused socket is simply closed.
pub const REJECT_QUEUE: usize = 64;
/// How long the rejecter waits for a refused client's request and for it to hang up.
const REJECT_LINGER: Duration = Duration::from_millis(100);

/// Runs the accept loop until shutdown. `live_threads` counts the connection threads
/// alive; `alive` is cloned into every one of them.
pub fn accept_loop(
    listener: &TcpListener,
    context: &Arc<Context>,
    capacity: &Capacity,
    live_threads: &Arc<AtomicUsize>,
    alive: Sender<()>,
) {
    let ceiling = capacity.ceiling;
    let (refuse, refused) = crossbeam_channel::bounded(capacity.reject_queue);
    let rejecter = crate::threads::spawn("rejecter", {
        let (metrics, shutdown) = (context.metrics.clone(), context.shutdown.clone());
        move || reject_all(&refused, &metrics.connections_rejected, &shutdown)
    });
    if let Err(error) = &rejecter {
        error!("cannot start the rejecter thread: {error}; refused sockets will be closed without a 503");
    }
    let mut next_id: u64 = 0;
    let mut backoff = ACCEPT_BACKOFF.0;
    // An exhausted limit fails every accept or spawn until it recovers: a line a minute.
    let (mut accept_failures, mut spawn_failures) = (Repeats::default(), Repeats::default());
    loop {
        let (tcp, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionAborted => continue,
            Err(error) => {
                if let Some(more) = accept_failures.occurred(FAILURE_LOG_EVERY) {
                    error!(
                        "accept failed: {error}; retrying in {backoff:?}{}",
                        since(more)
                    );
                }
                if context.shutdown.wait_timeout(backoff) {
                    break;
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        if context.shutdown.is_requested() {
            break;
        }
        backoff = ACCEPT_BACKOFF.0;
        if live_threads.load(Ordering::SeqCst) >= ceiling {
            let refused = Refused {
                tcp,
                peer,
                reply: Reply::service_unavailable(),
                why: "connection limit reached".into(),
            };
            refuse_socket(&refuse, refused, context);
            continue;
        }
        let admission = if context.access.limits_at_accept(peer.ip()) {
            match context.access.admit(peer.ip()) {
                Ok(slot) => Admission::Done(slot),
                Err(refusal) => {
                    let refused = Refused {
                        tcp,
                        peer,
                        reply: refusal.reply(),
                        why: refusal.why(peer.ip()).into(),
                    };
                    refuse_socket(&refuse, refused, context);
                    continue;
                }
            }
        } else {
            Admission::Pending
        };
        next_id += 1;
        let id = next_id;
        live_threads.fetch_add(1, Ordering::SeqCst);
        let lease = Lease {
            _alive: alive.clone(),
            _counted: ThreadCount(live_threads.clone()),
        };
        let conn_context = context.clone();
        let stack_size = match context.tls {
            Some(_) => TLS_HANDSHAKE_STACK_SIZE,
            None => CONNECTION_STACK_SIZE,
        };
        let spawned = spawn_connection_thread(id, stack_size, (tcp, lease), move |(tcp, lease)| {
            connection::run(id, tcp, peer, admission, lease, &conn_context);
        });
        if let Err((error, payload)) = spawned {
            if let Some(more) = spawn_failures.occurred(FAILURE_LOG_EVERY) {
                warn!(
                    "Cannot start a thread for {peer}: {error}; answering 503{}",
                    since(more)
                );
            }
            if let Some((tcp, _lease)) = payload {
                let refused = Refused {
                    tcp,
                    peer,
                    reply: Reply::service_unavailable(),
                    why: "cannot start a thread".into(),
                };
                refuse_socket(&refuse, refused, context);
            }
        }
    }
    drop(refuse);
    if let Ok(rejecter) = rejecter {
        crate::threads::join(rejecter);
    }
}

/// How often a failing accept or thread spawn is logged.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// The tail of a repeated failure's line: how many were not logged since the last one.
fn since(more: u64) -> String {
    match more {
        0 => String::new(),
        more => format!(" ({more} more since the last such line)"),
    }
}

/// Starts the thread `conn-ID` with a stack of `stack_size` bytes, running `work(payload)`.
/// If the OS refuses the thread, the error comes back with the payload (a socket to answer
/// 503, say).
pub(super) fn spawn_connection_thread<T: Send + 'static>(
    id: u64,
    stack_size: usize,
    payload: T,
    work: impl FnOnce(T) + Send + 'static,
) -> Result<(), (std::io::Error, Option<T>)> {
    // The payload goes in through a shared slot so that it can be taken back if the spawn
    // fails (a closure that was never run is dropped with whatever it captured).
    let slot = Arc::new(Mutex::new(Some(payload)));
    let taken_slot = Arc::clone(&slot);
    let spawned = thread::Builder::new()
        .name(format!("conn-{id}"))
        .stack_size(stack_size)
        .spawn(move || {
            if let Some(payload) = take(&taken_slot) {
                drop(taken_slot);
                work(payload);
            }
        });
    spawned.map(drop).map_err(|error| (error, take(&slot)))
}

fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// What a connection thread holds while it lives, and hands on with the connection if it
/// passes it to another thread: its place in the live-thread count, and a clone of the
/// channel whose disconnection tells shutdown that every connection thread has finished.
pub struct Lease {
    _alive: Sender<()>,
    _counted: ThreadCount,
}

/// Counts a live connection thread until dropped.
struct ThreadCount(Arc<AtomicUsize>);

impl Drop for ThreadCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A socket refused without a thread of its own, and what to answer it.
struct Refused {
    tcp: TcpStream,
    peer: SocketAddr,
    /// 503 or 429, with `Retry-After`.
    reply: Reply,
    /// Why, for the log line.
    why: Cow<'static, str>,
}

fn refuse_socket(refuse: &Sender<Refused>, refused: Refused, context: &Context) {
    if let Err(TrySendError::Full(refused) | TrySendError::Disconnected(refused)) =
        refuse.try_send(refused)
    {
        // A flood: no time to answer each one, but it still counts as refused.
        context.metrics.connections_rejected.inc();
        debug!(
            "Refused {} ({}); closed without a response, the rejecter's queue is full",
            refused.peer, refused.why
        );
    }
}

/// Answers each refused socket with its 503 or 429 and `Retry-After`, one at a time; once
/// shutdown has begun, the ones still queued are just closed, so they cannot hold it up.
fn reject_all(
    refused: &Receiver<Refused>,
    counter: &prometheus::IntCounter,
    shutdown: &crate::shutdown::Shutdown,
) {
    for Refused {
        tcp,
        peer,
        reply,
        why,
    } in refused
    {
        counter.inc();
        if shutdown.is_requested() {
            continue;
        }
        warn!("Refused {peer}: {why}; answered {}", reply.status);
        let reply = reply.to_bytes();
        // Read the request first: closing with it unread would reset the connection and
        // could destroy the 503 before the client reads it.
        let _ = tcp.set_read_timeout(Some(REJECT_LINGER));
        let _ = tcp.set_write_timeout(Some(REJECT_LINGER));
        let _ = (&tcp).read(&mut [0u8; 4096]);
        if (&tcp).write_all(&reply).is_ok() {
            net::close_gracefully(&tcp, REJECT_LINGER);
        }
    }
}
