//! The metrics port's HTTP endpoint: routes and methods against the `server` binary, a
//! flood of silent connections that must cost no thread per socket and be closed at the
//! request timeout, a request split over several writes; and, in process, how
//! `Endpoint::stop` ends the threads.
//!
//! Deadlines that depend on the request timeout are multiplied by
//! `WEBSOCKET_TEST_TIME_SCALE` (default 1) for slow machines.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use websocket_test::http::{self, Response, QUEUE, REQUEST_TIMEOUT, WORKERS};

use crate::support::{self, patience, Server};

/// Silent connections opened by the flood test: more than the workers and the queue hold.
const FLOOD: usize = 200;
/// Threads the process may have beyond its idle count while flooded (none are expected).
const THREAD_SLACK: usize = 2;

fn time_scale() -> u32 {
    std::env::var("WEBSOCKET_TEST_TIME_SCALE")
        .ok()
        .and_then(|scale| scale.parse().ok())
        .filter(|&scale| scale >= 1)
        .unwrap_or(1)
}

/// Sends `request` and returns (status, head, body) once the server has closed.
fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let response = support::raw_exchange(addr, request);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response head to {request:?}: {response:?}"));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP/1.1 status line: {response:?}"));
    (status, head.to_owned(), body.to_owned())
}

fn get(addr: SocketAddr, target: &str) -> (u16, String, String) {
    exchange(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
    )
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|line| line.strip_prefix("Content-Length: "))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"))
}

/// The names of the process's threads that start with `metrics`, sorted.
fn metrics_threads(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = support::thread_names(pid)
        .into_iter()
        .filter(|name| name.starts_with("metrics"))
        .collect();
    names.sort();
    names
}

fn expected_metrics_threads() -> Vec<String> {
    let mut names: Vec<String> = (1..=WORKERS).map(|n| format!("metrics-{n}")).collect();
    names.push("metrics-http".into());
    names
}

#[test]
fn paths_methods_and_query_strings() {
    let server = Server::start(&[]);
    let addr = server.metrics;

    let (status, head, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4\r\n"),
        "{head}"
    );
    assert!(head.ends_with("\r\nConnection: close"), "{head}");
    assert_eq!(content_length(&head), body.len(), "{head}");
    assert!(body.contains("\nwebsocket_connections 0\n"), "{body}");

    assert_eq!(get(addr, "/healthz").2, "ok\n");
    assert_eq!(get(addr, "/readyz").2, "ready\n");
    let (status, head, body) = get(addr, "/nope");
    assert_eq!((status, body.as_str()), (404, "not found\n"), "{head}");

    // Query strings do not change the route.
    assert_eq!(get(addr, "/healthz?probe=1&x").2, "ok\n");
    let (status, _, body) = get(addr, "/metrics?name[]=websocket_connections");
    assert_eq!(status, 200);
    assert!(
        body.contains("websocket_connections_opened_total"),
        "{body}"
    );

    let (status, head, _) = exchange(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\n\r\nx=1",
    );
    assert_eq!(status, 405, "{head}");
    assert!(head.contains("\r\nAllow: GET, HEAD\r\n"), "{head}");

    let (status, head, body) = exchange(addr, b"HEAD /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(status, 200, "{head}");
    assert!(content_length(&head) > 0, "{head}");
    assert_eq!(body, "", "a HEAD response has no body");

    assert_eq!(exchange(addr, b"GET /healthz HTTP/1.0\r\n\r\n").2, "ok\n");
    assert_eq!(exchange(addr, b"\x16\x03\x01garbage\r\n\r\n").0, 400);
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    assert_eq!(exchange(addr, huge.as_bytes()).0, 431);
}

#[test]
fn a_request_split_over_several_writes_is_served() {
    let server = Server::start(&[]);
    let mut tcp = TcpStream::connect(server.metrics).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(patience())).unwrap();
    for piece in [
        "GE",
        "T /heal",
        "thz?x=1 HTTP/1.1\r\nHo",
        "st: test\r\n",
        "\r\n",
    ] {
        tcp.write_all(piece.as_bytes()).unwrap();
        // Not a synchronisation: a gap so the pieces tend to arrive in separate reads.
        thread::sleep(Duration::from_millis(20));
    }
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nok\n"), "{response}");
}

/// Reads from a socket the server never writes to until it closes; returns when, or an
/// error message if it is still open at `deadline`.
fn wait_closed(tcp: &mut TcpStream, deadline: Instant) -> Result<Instant, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    tcp.set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .unwrap();
    match tcp.read(&mut [0u8; 64]) {
        Ok(0) => Ok(Instant::now()),
        Ok(n) => Err(format!("the server sent {n} bytes on a silent connection")),
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err("still open".into())
        }
        Err(_) => Ok(Instant::now()),
    }
}

/// Counts the sockets the server has already closed, without waiting.
fn closed_now(sockets: &[TcpStream]) -> usize {
    sockets
        .iter()
        .filter(|tcp| {
            tcp.set_nonblocking(true).unwrap();
            let closed = match (&**tcp).read(&mut [0u8; 64]) {
                Ok(_) => true,
                Err(error) => error.kind() != ErrorKind::WouldBlock,
            };
            tcp.set_nonblocking(false).unwrap();
            closed
        })
        .count()
}

#[test]
fn a_flood_of_silent_connections_costs_no_thread_each_and_times_out() {
    let server = Server::start(&[]);
    let (pid, addr) = (server.proc.pid(), server.metrics);
    assert_eq!(get(addr, "/metrics").0, 200);
    support::wait_until("the metrics threads run under their names", || {
        metrics_threads(pid) == expected_metrics_threads()
    });
    let baseline = server.proc.threads();

    let started = Instant::now();
    // Connected first, so it reaches a worker or the queue rather than being closed for a
    // full queue; it is answered 408 at its deadline.
    let mut partial = TcpStream::connect(addr).unwrap();
    partial
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n")
        .unwrap();
    let mut silent: Vec<TcpStream> = (0..FLOOD)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();

    // Past the workers and the queue, sockets are closed at once.
    let held = WORKERS + QUEUE;
    support::wait_until("the sockets past the queue are closed", || {
        closed_now(&silent) >= FLOOD + 1 - held
    });
    let closed_at_once = closed_now(&silent);
    // The sockets held by workers stay open until REQUEST_TIMEOUT after `started` at the
    // earliest: sample the threads for half of that.
    let mut most_threads = 0;
    while started.elapsed() < REQUEST_TIMEOUT / 2 {
        let threads = server.proc.threads();
        most_threads = most_threads.max(threads);
        assert!(
            threads <= baseline + THREAD_SLACK,
            "{threads} threads while flooded, {baseline} idle: {:?}",
            support::thread_names(pid)
        );
        assert_eq!(metrics_threads(pid), expected_metrics_threads());
        thread::sleep(Duration::from_millis(10));
    }

    let deadline = started + REQUEST_TIMEOUT + REQUEST_TIMEOUT * time_scale();
    let mut last_closed = started;
    for (n, tcp) in silent.iter_mut().enumerate() {
        match wait_closed(tcp, deadline) {
            Ok(at) => last_closed = last_closed.max(at),
            Err(why) => panic!(
                "silent connection {n} of {FLOOD}: {why} {:?} after the flood began; \
                 output:\n{}",
                started.elapsed(),
                server.proc.output()
            ),
        }
    }
    let all_closed_after = last_closed - started;
    assert!(
        all_closed_after >= REQUEST_TIMEOUT,
        "silent connections closed after {all_closed_after:?}, before the request timeout"
    );
    partial
        .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now())))
        .unwrap();
    let mut response = String::new();
    let _ = partial.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 408 "), "{response:?}");

    let (status, _, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    support::wait_until("the thread count is back to idle", || {
        server.proc.threads() <= baseline
    });
    eprintln!(
        "flood of {FLOOD}: threads {baseline} idle, at most {most_threads} while flooded; \
         {closed_at_once} closed at once, all closed {all_closed_after:?} after the flood began"
    );
}

#[test]
fn stop_wakes_a_worker_waiting_on_a_silent_socket() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let endpoint = http::serve(listener, Arc::new(|path: &str| Response::text(200, path))).unwrap();
    let mut silent = TcpStream::connect(addr).unwrap();
    // The queue is first in, first out: once a later request is answered, a worker has
    // taken the silent socket.
    assert_eq!(get(addr, "/after").2, "/after\n");
    let stopping = Instant::now();
    endpoint.stop();
    let took = stopping.elapsed();
    assert!(
        took < REQUEST_TIMEOUT / 2,
        "stop took {took:?} with a silent socket open"
    );
    assert!(wait_closed(&mut silent, Instant::now() + patience()).is_ok());
    assert!(TcpStream::connect(addr).is_err(), "still listening");
}

#[test]
fn stop_reraises_a_handler_panic() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let endpoint = http::serve(
        listener,
        Arc::new(|path: &str| match path {
            "/panic" => panic!("handler failed on purpose"),
            _ => Response::text(200, "ok"),
        }),
    )
    .unwrap();
    let response = support::raw_exchange(addr, b"GET /panic HTTP/1.1\r\n\r\n");
    assert_eq!(response, "", "the connection closes without a response");
    assert_eq!(
        get(addr, "/healthz").0,
        200,
        "the other workers still serve"
    );
    let panic = std::panic::catch_unwind(AssertUnwindSafe(|| endpoint.stop()))
        .expect_err("stop re-raises the worker's panic");
    assert_eq!(
        panic.downcast_ref::<&str>(),
        Some(&"handler failed on purpose")
    );
}
