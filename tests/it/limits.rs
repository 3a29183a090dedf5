//! Exhausted limits, survived and recovered from: the binaries run under `prlimit` with a
//! file-descriptor limit far below their usual ceiling (a process test: the limit is the
//! process's own).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::harness::TestServer;
use crate::support::{self, patience, Proc, Ws};

/// A server under `prlimit --nofile=LIMIT`, its addresses and the ceiling it logged.
fn limited_server(nofile: u32) -> (Proc, SocketAddr, SocketAddr, usize) {
    let limit = format!("--nofile={nofile}:{nofile}");
    let server = Proc::start_wrapped(
        &["prlimit", &limit],
        "server",
        &["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"],
    );
    let ceiling: usize = server
        .wait_for("Connection ceiling: ", patience())
        .split("Connection ceiling: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .expect("the ceiling is logged");
    let ws = support::address_after(&server.wait_for("Listening on ws://", patience()), "ws://");
    let metrics = support::address_after(
        &server.wait_for("Metrics on http://", patience()),
        "http://",
    );
    (server, ws, metrics, ceiling)
}

/// The server's CPU time so far, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn a_small_file_limit_serves_what_fits_refuses_the_rest_cleanly_and_recovers() {
    let (server, addr, metrics, ceiling) = limited_server(64);
    assert!(
        (10..64).contains(&ceiling),
        "a 64-descriptor limit should leave room for some connections: {ceiling}"
    );
    let url = format!("ws://{addr}/ws");
    let mut held: Vec<Ws> = (0..ceiling).map(|_| support::connect(&url)).collect();
    support::wait_until("the server holds what fits", || {
        support::metric(metrics, "websocket_connections") == ceiling as f64
    });

    // Past the ceiling: a clean refusal or, once the queue for them is full, a close; never
    // an upgrade, never a busy loop, and the metrics port keeps answering.
    let cpu_before = cpu_seconds(server.pid());
    let mut refused = 0;
    let mut extra: Vec<TcpStream> = Vec::new();
    for _ in 0..40 {
        let mut tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(patience())).unwrap();
        let _ = tcp.write_all(support::upgrade_request().as_bytes());
        let mut answer = Vec::new();
        let _ = tcp.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            !answer.starts_with("HTTP/1.1 101"),
            "upgraded past the ceiling"
        );
        if answer.starts_with("HTTP/1.1 503 ") {
            assert!(answer.contains("Retry-After: "), "{answer}");
            refused += 1;
        }
        extra.push(tcp);
        assert_eq!(support::http_get(metrics, "/healthz").0, 200);
    }
    assert!(refused > 0, "no 503 among 40 refused connections");
    let cpu = cpu_seconds(server.pid()) - cpu_before;
    assert!(
        cpu < 2.0,
        "the server burned {cpu:.2} s of CPU refusing 40 connections"
    );
    drop(extra);
    assert_eq!(
        support::metric(metrics, "websocket_connections"),
        ceiling as f64
    );

    // Connections leave: service resumes by itself.
    for ws in held.drain(..5) {
        support::close_normally(ws);
    }
    support::wait_until("five places free up", || {
        support::metric(metrics, "websocket_connections") == (ceiling - 5) as f64
    });
    for _ in 0..5 {
        held.push(support::connect(&url));
    }
    support::wait_until("the server is full again", || {
        support::metric(metrics, "websocket_connections") == ceiling as f64
    });
    for ws in &mut held {
        support::assert_echo(ws, 10);
    }
}

#[test]
fn a_limit_that_leaves_room_for_no_connection_refuses_to_start_and_names_it() {
    let server = Proc::start_wrapped(
        &["prlimit", "--nofile=8:8"],
        "server",
        &["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"],
    );
    let (status, output) = server.finish(patience());
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("RLIMIT_NOFILE leaves room for no connection"),
        "{output}"
    );
    assert!(!output.contains("Listening on"), "{output}");
}

#[test]
fn a_client_out_of_descriptors_says_so_once_and_holds_what_fits() {
    let server = TestServer::start(&[]);
    let port = server.addr.port().to_string();
    let client = Proc::start_wrapped(
        &["prlimit", "--nofile=24:24"],
        "client",
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--connections",
            "40",
            "--reconnect-delay",
            "100ms",
            "--reconnect-max-delay",
            "100ms",
        ],
    );
    // Several attempts per connection that does not fit fail with EMFILE...
    support::wait_within(
        "connections fail and retry",
        Duration::from_secs(10),
        || client.count("Reconnecting in") >= 40,
    );
    // ... and the log says so once, not once per attempt.
    let lines = client.count("Too many open files");
    assert_eq!(lines, 1, "{}", client.output());
    // What fits is held.
    let held = server.state().connections();
    assert!((5..40).contains(&held), "{held} connections held");
}

#[test]
fn connections_past_the_memory_budget_get_1013_and_the_others_carry_on() {
    const SIZE: usize = 800 << 10;
    let server = TestServer::start(&["--max-buffered-memory", "1MiB"]);
    let buffered = || server.metric("websocket_buffered_bytes");
    assert_eq!(
        server.metric("websocket_buffered_bytes_limit"),
        f64::from(1 << 20)
    );
    let payload = support::binary_payload(SIZE);

    // A holds most of a large message: charged to the budget while it is incomplete.
    let mut holder = support::raw_upgrade(server.addr);
    let frame = support::masked_frame(0x82, &payload);
    let (first, rest) = frame.split_at(frame.len() - (100 << 10));
    holder.write_all(first).unwrap();
    support::wait_until("the incomplete message is charged", || {
        buffered() > 512.0 * 1024.0
    });

    // B's whole message does not fit beside it: B is told to come back later.
    let mut late = support::raw_upgrade(server.addr);
    let _ = late.write_all(&frame);
    let (byte0, body) = support::read_frame(&mut late).unwrap();
    assert_eq!(byte0, 0x88, "expected a Close frame");
    assert_eq!(support::close_code(&body), Some(1013));
    support::wait_until("B's end is counted", || {
        server.closed("overloaded", "1013") == 1.0
    });

    // A finishes its message and gets its echo; then nothing is held any more.
    holder.write_all(rest).unwrap();
    let (byte0, echo) = support::read_frame(&mut holder).unwrap();
    assert_eq!(byte0, 0x82);
    assert!(echo == payload, "the echo differs");
    support::wait_until("the budget is given back", || buffered() == 0.0);
    // And a new large message fits again.
    holder.write_all(&frame).unwrap();
    let (_, echo) = support::read_frame(&mut holder).unwrap();
    assert_eq!(echo.len(), SIZE);
}

/// A process of user `nobody` that starts threads until the user's RLIMIT_NPROC refuses one,
/// holds them until dropped, and kills itself then.
struct ThreadHog {
    child: std::process::Child,
    threads: usize,
}

impl ThreadHog {
    fn start(nproc: usize) -> ThreadHog {
        const HOG: &str = "import sys, threading\n\
            stop = threading.Event()\n\
            n = 0\n\
            try:\n\
            \x20   while n < 10000:\n\
            \x20       threading.Thread(target=stop.wait, daemon=True).start()\n\
            \x20       n += 1\n\
            except RuntimeError:\n\
            \x20   pass\n\
            print(n, flush=True)\n\
            sys.stdin.read()\n";
        let limit = format!("--nproc={nproc}:{nproc}");
        let mut child = std::process::Command::new("prlimit")
            .args([&limit, "setpriv", "--reuid=65534", "--regid=65534"])
            .args(["--clear-groups", "/usr/bin/python3", "-c", HOG])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cannot start /usr/bin/python3 under prlimit and setpriv");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let threads = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("hog said {line:?}"));
        ThreadHog { child, threads }
    }
}

impl Drop for ThreadHog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// RLIMIT_NPROC binds only an unprivileged user and counts all the threads of that user, so
/// the server runs as `nobody` (from a copy of the binary `nobody` can reach), and a second
/// process of `nobody` takes what is left of the limit after the server started, as another
/// workload of the same user would: spawns fail, not the ceiling.
#[test]
fn a_thread_limit_reached_refuses_connections_cleanly_and_service_resumes() {
    const NPROC: usize = 120;
    let copy = std::env::temp_dir().join(format!("websocket-test-nproc-{}", std::process::id()));
    std::fs::create_dir_all(&copy).unwrap();
    let binary = copy.join("server");
    std::fs::copy(support::binary("server"), &binary).unwrap();
    let limit = format!("--nproc={NPROC}:{NPROC}");
    let server = Proc::start_command(
        &[
            "prlimit",
            &limit,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        binary.to_str().unwrap(),
        &["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"],
    );
    let addr = support::address_after(&server.wait_for("Listening on ws://", patience()), "ws://");
    let metrics = support::address_after(
        &server.wait_for("Metrics on http://", patience()),
        "http://",
    );
    let _ = std::fs::remove_dir_all(&copy);
    let url = format!("ws://{addr}/ws");
    let mut held: Vec<Ws> = (0..5).map(|_| support::connect(&url)).collect();

    let hog = ThreadHog::start(NPROC);
    assert!(
        hog.threads > 10,
        "the hog started only {} threads",
        hog.threads
    );
    let cpu_before = cpu_seconds(server.pid());
    for _ in 0..20 {
        let answer = support::raw_exchange(addr, support::upgrade_request().as_bytes());
        assert!(
            answer.starts_with("HTTP/1.1 503 "),
            "with no thread to be had: {answer}"
        );
        assert_eq!(support::http_get(metrics, "/healthz").0, 200);
    }
    let cpu = cpu_seconds(server.pid()) - cpu_before;
    assert!(
        cpu < 2.0,
        "the server burned {cpu:.2} s refusing 20 connections"
    );
    // One line for the 20, not one each.
    support::wait_until("the failure is logged", || {
        server.count("Cannot start a thread") == 1
    });
    assert_eq!(
        server.count("Cannot start a thread"),
        1,
        "{}",
        server.output()
    );
    for ws in &mut held {
        support::assert_echo(ws, 10);
    }

    // The other workload ends: new connections get threads again.
    drop(hog);
    support::wait_until(
        "a new connection is served",
        || match tungstenite::connect(&url) {
            Ok((ws, _)) => {
                held.push(ws);
                true
            }
            Err(_) => false,
        },
    );
    assert_eq!(support::metric(metrics, "websocket_connections"), 6.0);
    for ws in &mut held {
        support::assert_echo(ws, 10);
    }
}
