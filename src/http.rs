//! A small HTTP/1.1 endpoint for probes and scrapes (the metrics port): one `GET` or `HEAD`
//! per connection, answered by a handler that maps the path to a [`Response`], then closed.
//!
//! Threads: `metrics-http` accepts and queues each socket on a bounded channel
//! ([`QUEUE`]); a fixed pool of [`WORKERS`] threads, `metrics-1` to `metrics-N`, reads the
//! request and answers it. A full queue closes the new socket at once, and every request
//! must be complete within [`REQUEST_TIMEOUT`] of its accept (queueing included), so a
//! flood of silent connections costs a bounded number of threads and at most
//! `REQUEST_TIMEOUT` of the workers' time, never a thread per socket.

use std::io::{self, Write};
use std::net::{Shutdown as Direction, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender, TrySendError};
use log::{debug, error};

use crate::net;
use crate::shutdown::Shutdown;
use crate::threads::Helpers;

/// Worker threads that read and answer requests.
pub const WORKERS: usize = 4;
/// Accepted sockets waiting for a worker; past this a new socket is closed at once.
pub const QUEUE: usize = 64;
/// Time from accept to a complete request head, and the write timeout of the response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted; a longer one is answered 431.
pub const MAX_HEAD_SIZE: usize = 8192;
const MAX_HEADERS: usize = 64;
/// The shortest read wait, so a socket whose deadline passed in the queue still gets its
/// request read if the request has already arrived.
const LAST_CHANCE: Duration = Duration::from_millis(10);
/// Backoff bounds after a failed `accept` (EMFILE and friends repeat until a socket closes).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Maps a request path (without its query string) to the response.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// What a [`Handler`] answers. The endpoint adds the status line, `Content-Length` and
/// `Connection: close`, and leaves out the body for `HEAD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The `Content-Type` header value.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A plain-text response whose body is `message` on one line (line breaks in it become
    /// spaces).
    pub fn text(status: u16, message: &str) -> Response {
        let mut body = message.replace(['\r', '\n'], " ");
        body.push('\n');
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into_bytes(),
        }
    }

    /// The response on the wire; without the body when `head_only`.
    pub fn to_bytes(&self, head_only: bool) -> Vec<u8> {
        // This endpoint serves only GET and HEAD, so every 405 says so.
        let allow = if self.status == 405 {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len(),
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// A running endpoint. [`stop`](Endpoint::stop) or drop it to stop serving: the accept
/// thread is woken by a connect to itself, a worker blocked in `read` by a shutdown of its
/// socket (a response being written is finished), the queued sockets are closed, and every
/// thread is joined, re-raising a panic of any of them.
pub struct Endpoint {
    helpers: Helpers,
}

/// One accepted socket on its way to a worker.
struct Job {
    tcp: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
}

/// Serves `handler` on `listener` from a `metrics-http` accept thread and [`WORKERS`]
/// worker threads. If a thread cannot start, those already started are stopped.
pub fn serve(listener: TcpListener, handler: Handler) -> io::Result<Endpoint> {
    let mut helpers = Helpers::new();
    let stopping = helpers.shutdown().clone();
    let (queue, jobs) = crossbeam_channel::bounded(QUEUE);
    for n in 1..=WORKERS {
        // A clone of the socket being served, so a stop can wake a worker blocked in `read`.
        let current = Arc::new(Mutex::new(None::<TcpStream>));
        let work = {
            let (jobs, stopping, current, handler) = (
                jobs.clone(),
                stopping.clone(),
                current.clone(),
                handler.clone(),
            );
            move || work(&jobs, &stopping, &current, &*handler)
        };
        let wake = move || {
            if let Some(tcp) = lock(&current).as_ref() {
                let _ = tcp.shutdown(Direction::Read);
            }
        };
        helpers.spawn_woken(&format!("metrics-{n}"), work, wake)?;
    }
    let addr = listener.local_addr()?;
    helpers.spawn_woken(
        "metrics-http",
        move || accept_loop(&listener, &queue, &stopping),
        // A wake-up connect can fail (a full backlog): it is retried.
        move || net::wake_acceptor(addr),
    )?;
    Ok(Endpoint { helpers })
}

impl Endpoint {
    /// Stops serving and joins every thread (what dropping the endpoint does).
    pub fn stop(self) {
        self.helpers.stop();
    }
}

fn lock(current: &Mutex<Option<TcpStream>>) -> MutexGuard<'_, Option<TcpStream>> {
    current.lock().unwrap_or_else(PoisonError::into_inner)
}

fn accept_loop(listener: &TcpListener, queue: &Sender<Job>, stopping: &Shutdown) {
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        let (tcp, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) if error.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(error) => {
                error!("metrics accept failed: {error}; retrying in {backoff:?}");
                if stopping.wait_timeout(backoff) {
                    return;
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        if stopping.is_requested() {
            return;
        }
        backoff = ACCEPT_BACKOFF.0;
        let job = Job {
            tcp,
            peer,
            accepted: Instant::now(),
        };
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) = queue.try_send(job)
        {
            debug!(
                "Closed metrics connection from {}: {QUEUE} requests already wait",
                job.peer
            );
        }
    }
}

fn work(
    jobs: &Receiver<Job>,
    stopping: &Shutdown,
    current: &Mutex<Option<TcpStream>>,
    handler: &dyn Fn(&str) -> Response,
) {
    loop {
        let job = select! {
            recv(jobs) -> job => match job {
                Ok(job) => job,
                Err(_) => return,
            },
            recv(stopping.receiver()) -> _ => return,
        };
        *lock(current) = job.tcp.try_clone().ok();
        let _serving = Serving(current);
        if !stopping.is_requested() {
            answer(&job, handler);
        }
    }
}

/// Empties a worker's socket slot when its request ends, also by a handler's panic (which
/// would otherwise keep the socket open through the clone).
struct Serving<'a>(&'a Mutex<Option<TcpStream>>);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        *lock(self.0) = None;
    }
}

/// Reads one request head from the job's socket and answers it, or closes the socket when
/// the peer sent nothing in time, closed early or failed.
fn answer(job: &Job, handler: &dyn Fn(&str) -> Response) {
    let Job {
        tcp,
        peer,
        accepted,
    } = job;
    let deadline = *accepted + REQUEST_TIMEOUT;
    let _ = tcp.set_write_timeout(Some(REQUEST_TIMEOUT));
    let mut buf = Vec::new();
    let mut first = true;
    let (response, head_only) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() && !first {
            if buf.is_empty() {
                debug!("Closed silent metrics connection from {peer}");
                return;
            }
            let message = format!("no complete request within {REQUEST_TIMEOUT:?}");
            break (Response::text(408, &message), false);
        }
        first = false;
        if tcp.set_read_timeout(Some(left.max(LAST_CHANCE))).is_err() {
            return;
        }
        match net::read_head_chunk(tcp, &mut buf, MAX_HEAD_SIZE) {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) if net::is_timeout(&error) => continue,
            Err(error) => {
                debug!("Metrics request from {peer} failed: {error}");
                return;
            }
        }
        match parse(&buf) {
            Parsed::Partial => {}
            Parsed::Request { path, head_only } => break (handler(path), head_only),
            Parsed::Invalid(response) => break (response, false),
        }
    };
    debug!(
        "Metrics request from {peer}: {:?} -> {}",
        String::from_utf8_lossy(buf.split(|&b| b == b'\r').next().unwrap_or_default()),
        response.status
    );
    match (&*tcp).write_all(&response.to_bytes(head_only)) {
        // The peer may still be sending (a body, say): closing with input unread would
        // reset the connection and could destroy the response.
        Ok(()) => net::close_gracefully(tcp, net::LINGER),
        Err(error) => debug!("Metrics response to {peer} failed: {error}"),
    }
}

/// What the bytes received so far amount to.
#[derive(Debug, PartialEq, Eq)]
enum Parsed<'b> {
    /// An incomplete head: read more.
    Partial,
    /// A `GET` or `HEAD` of `path` (the query string removed).
    Request { path: &'b str, head_only: bool },
    /// Answer this error.
    Invalid(Response),
}

fn parse(buf: &[u8]) -> Parsed<'_> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_SIZE => {
            return Parsed::Invalid(Response::text(431, "request head larger than 8 KiB"))
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Invalid(Response::text(431, "too many request headers"))
        }
        Err(httparse::Error::Version) => {
            return Parsed::Invalid(Response::text(505, "HTTP/1.x required"))
        }
        Err(_) => return Parsed::Invalid(Response::text(400, "malformed HTTP request")),
    }
    let path = request.path.unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default();
    match request.method {
        Some("GET") => Parsed::Request {
            path,
            head_only: false,
        },
        Some("HEAD") => Parsed::Request {
            path,
            head_only: true,
        },
        _ => Parsed::Invalid(Response::text(405, "only GET and HEAD are served")),
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(request: &str) -> u16 {
        match parse(request.as_bytes()) {
            Parsed::Partial => 0,
            Parsed::Request { .. } => 200,
            Parsed::Invalid(response) => response.status,
        }
    }

    #[test]
    fn get_and_head_give_the_path_without_its_query() {
        assert_eq!(
            parse(b"GET /metrics?x=1&y HTTP/1.1\r\nHost: a\r\n\r\n"),
            Parsed::Request {
                path: "/metrics",
                head_only: false
            }
        );
        assert_eq!(
            parse(b"HEAD /healthz HTTP/1.0\r\n\r\n"),
            Parsed::Request {
                path: "/healthz",
                head_only: true
            }
        );
    }

    #[test]
    fn errors() {
        assert_eq!(status("GET /metrics HTTP/1.1\r\nHost: a\r\n"), 0);
        assert_eq!(status("GET /metr"), 0);
        assert_eq!(status("POST /metrics HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status("DELETE / HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status("\u{16}\u{3}\u{1}garbage\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/2.0\r\n\r\n"), 505);
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_SIZE));
        assert_eq!(status(&huge[..MAX_HEAD_SIZE]), 431);
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(status(&many), 431);
    }

    #[test]
    fn responses_close_and_say_their_length() {
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
        let response = Response::text(405, "only GET\nand HEAD");
        let full = text(response.to_bytes(false));
        assert!(
            full.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{full}"
        );
        assert!(full.contains("\r\nAllow: GET, HEAD\r\n"), "{full}");
        assert!(full.contains("\r\nContent-Length: 18\r\n"), "{full}");
        assert!(full.contains("\r\nConnection: close\r\n"), "{full}");
        assert!(full.ends_with("\r\n\r\nonly GET and HEAD\n"), "{full}");
        let head = text(response.to_bytes(true));
        assert!(
            head.ends_with(
                "\r\nContent-Length: 18\r\nAllow: GET, HEAD\r\nConnection: close\r\n\r\n"
            ),
            "{head}"
        );
        assert!(!text(Response::text(200, "ok").to_bytes(false)).contains("Allow"));
    }
}
