//! The `client` binary: holding connections, noticing dead ones, reconnecting, shutting down,
//! and its command line. Peers are the real `server` binary or small tungstenite servers
//! written here, all on 127.0.0.1.

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

use crate::support::{self, Proc, Server, PATIENCE};

/// Timings of every test client (flags listed in `extra` replace these).
const FAST: [(&str, &str); 5] = [
    ("--ping-interval", "100ms"),
    ("--pong-timeout", "300ms"),
    ("--status-interval", "200ms"),
    ("--reconnect-delay", "300ms"),
    ("--connect-timeout", "2s"),
];
const PING_INTERVAL_MS: i64 = 100;
const PONG_TIMEOUT_MS: i64 = 300;
const RECONNECT_DELAY_MS: i64 = 300;
/// How long after a signal the client must have exited.
const EXIT_LIMIT: Duration = Duration::from_secs(1);

/// Arguments for a client of 127.0.0.1:`port` with the [`FAST`] timings and `extra` flags.
fn client_args(port: Option<u16>, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--host".to_string(), "127.0.0.1".to_string()];
    if let Some(port) = port {
        args.extend(["--port".to_string(), port.to_string()]);
    }
    for (flag, value) in FAST {
        if !extra.contains(&flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend(extra.iter().map(std::string::ToString::to_string));
    args
}

/// Starts a client of 127.0.0.1:`port` with the [`FAST`] timings and `extra` flags.
fn start_client(port: u16, extra: &[&str]) -> Proc {
    let args = client_args(Some(port), extra);
    Proc::start(
        "client",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}

/// `ws://127.0.0.1:PORT/ws`, as the client logs it.
fn url(port: u16) -> String {
    format!("ws://127.0.0.1:{port}/ws")
}

/// A port nothing listens on (bound by the OS, then released).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Milliseconds since midnight UTC of a log line (`2026-01-01T12:34:56.789Z ...`).
fn log_ms(line: &str) -> i64 {
    let time = line
        .get(11..23)
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"));
    let parse = |range: std::ops::Range<usize>| -> i64 {
        time[range]
            .parse()
            .unwrap_or_else(|e| panic!("no timestamp in {line:?}: {e}"))
    };
    ((parse(0..2) * 60 + parse(3..5)) * 60 + parse(6..8)) * 1000 + parse(9..12)
}

/// Milliseconds from log line `from` to log line `to` (across midnight too).
fn ms_between(from: &str, to: &str) -> i64 {
    (log_ms(to) - log_ms(from)).rem_euclid(86_400_000)
}

/// The connection index of a `[Connection i] ...` line.
fn connection_index(line: &str) -> u32 {
    let (_, rest) = line
        .split_once("[Connection ")
        .unwrap_or_else(|| panic!("no index in {line:?}"));
    rest[..rest.find(']').unwrap()].parse().unwrap()
}

/// Sends `signal` to `client` and returns its exit status and how long it took to exit.
fn stop(client: &mut Proc, signal: &str) -> (std::process::ExitStatus, Duration) {
    let sent = Instant::now();
    client.signal(signal);
    let status = client.wait_exit(PATIENCE);
    (status, sent.elapsed())
}

/// Asserts `client` exited 0 within [`EXIT_LIMIT`] and said goodbye.
fn assert_clean_exit(client: &Proc, status: std::process::ExitStatus, took: Duration) {
    client.wait_for("Client stopped", PATIENCE);
    assert!(
        status.success(),
        "client exited with {status}; output:\n{}",
        client.output()
    );
    assert!(
        took < EXIT_LIMIT,
        "client took {took:?} to exit after the signal; output:\n{}",
        client.output()
    );
}

type Socket = WebSocket<TcpStream>;
/// What an in-test server does with its `n`th accepted (1-based) and upgraded connection;
/// a socket it returns is kept open, unread, until the server is dropped.
type Behaviour = dyn Fn(usize, Socket) -> Option<Socket> + Send + Sync;

/// A tungstenite WebSocket server on 127.0.0.1 with one thread per connection.
struct TestServer {
    port: u16,
    accepted: Arc<AtomicUsize>,
    held: Arc<Mutex<Vec<Socket>>>,
    stop: Arc<AtomicBool>,
}

impl TestServer {
    fn start(
        behaviour: impl Fn(usize, Socket) -> Option<Socket> + Send + Sync + 'static,
    ) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let behaviour: Arc<Behaviour> = Arc::new(behaviour);
        let (accepted2, held2, stop2) = (accepted.clone(), held.clone(), stop.clone());
        thread::spawn(move || {
            for (index, tcp) in listener.incoming().enumerate() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(tcp) = tcp else { continue };
                let (behaviour, accepted, held) =
                    (behaviour.clone(), accepted2.clone(), held2.clone());
                thread::spawn(move || {
                    tcp.set_read_timeout(Some(PATIENCE)).unwrap();
                    let socket = tungstenite::accept(tcp).expect("the client's upgrade is valid");
                    accepted.fetch_add(1, Ordering::SeqCst);
                    if let Some(socket) = behaviour(index + 1, socket) {
                        held.lock().unwrap().push(socket);
                    }
                });
            }
        });
        TestServer {
            port,
            accepted,
            held,
            stop,
        }
    }

    /// Connections upgraded so far.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

/// Reads until the connection ends (tungstenite answers pings and Close frames on its own),
/// counting the pings.
fn serve(mut socket: Socket, pings: &AtomicUsize) {
    socket.get_mut().set_read_timeout(None).unwrap();
    loop {
        match socket.read() {
            Ok(Message::Ping(_)) => {
                pings.fetch_add(1, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Starts the real server on 127.0.0.1:`port`, retrying while the port cannot be bound yet.
fn start_server_on(port: u16) -> Server {
    let port_arg = port.to_string();
    let args = [
        "--host",
        "127.0.0.1",
        "--port",
        &port_arg,
        "--metrics-port",
        "0",
    ];
    let mut failures = Vec::new();
    for _ in 0..5 {
        let proc = Proc::start("server", &args);
        support::wait_until("the server listens or fails to bind", || {
            proc.count("Listening on ws://") > 0 || proc.count("cannot listen") > 0
        });
        if proc.count("Listening on ws://") > 0 {
            let addr =
                support::address_after(&proc.wait_for("Listening on ws://", PATIENCE), "ws://");
            let metrics =
                support::address_after(&proc.wait_for("Metrics on http://", PATIENCE), "http://");
            assert_eq!(addr.port(), port);
            return Server {
                proc,
                addr,
                metrics,
            };
        }
        failures.push(proc.output());
    }
    panic!(
        "cannot start a server on port {port}:\n{}",
        failures.join("\n")
    );
}

#[test]
fn stays_connected_to_the_real_server() {
    let server = Server::start(&[]);
    let client = start_client(server.addr.port(), &[]);
    client.wait_for(
        &format!("[Connection 1] Connected to {}", server.url()),
        PATIENCE,
    );
    server.wait_for_gauge(1);
    client.wait_for_nth(
        &format!(
            "[Connection 1] Connection status: CONNECTED to {}",
            server.url()
        ),
        3,
        PATIENCE,
    );
    // Three status lines at 200 ms span several pings and pong timeouts of 300 ms.
    assert_eq!(
        client.count("Connection lost"),
        0,
        "output:\n{}",
        client.output()
    );
    assert_eq!(
        client.count("Connected to"),
        1,
        "output:\n{}",
        client.output()
    );
    assert_eq!(server.metric("websocket_connections"), 1.0);
}

#[test]
fn pings_flow_and_pongs_keep_the_connection() {
    let pings = Arc::new(AtomicUsize::new(0));
    let server = TestServer::start({
        let pings = pings.clone();
        move |_, socket| {
            serve(socket, &pings);
            None
        }
    });
    let client = start_client(server.port, &[]);
    client.wait_for("[Connection 1] Connected to", PATIENCE);
    let connected = Instant::now();
    support::wait_until("3 pings arrive", || pings.load(Ordering::SeqCst) >= 3);
    let took = connected.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "3 pings at a 100ms interval took {took:?}"
    );
    // Eight pings take 800 ms, well past the 300 ms pong timeout of the first one.
    support::wait_until("8 pings arrive", || pings.load(Ordering::SeqCst) >= 8);
    assert_eq!(
        client.count("Connection lost"),
        0,
        "output:\n{}",
        client.output()
    );
    assert_eq!(server.accepted(), 1);
    assert!(
        client.count("Connection status: CONNECTED") >= 2,
        "output:\n{}",
        client.output()
    );
}

#[test]
fn a_server_that_stops_answering_is_declared_dead_and_reconnected() {
    // Completes the handshake, then never reads again: pings go unanswered.
    let server = TestServer::start(|_, socket| Some(socket));
    let client = start_client(server.port, &[]);
    let connected = client.wait_for(
        &format!("[Connection 1] Connected to {}", url(server.port)),
        PATIENCE,
    );
    let lost = client.wait_for(
        "[Connection 1] Connection lost: no pong within 300ms",
        PATIENCE,
    );
    let after = ms_between(&connected, &lost);
    assert!(
        after >= PONG_TIMEOUT_MS,
        "declared dead {after} ms after connecting, before the pong timeout"
    );
    assert!(
        after < PING_INTERVAL_MS + PONG_TIMEOUT_MS + 1000,
        "declared dead only {after} ms after connecting; output:\n{}",
        client.output()
    );
    client.wait_for("[Connection 1] Reconnecting in 300ms", PATIENCE);
    let again = client.wait_for_nth("[Connection 1] Connected to", 2, PATIENCE);
    assert!(
        ms_between(&lost, &again) >= RECONNECT_DELAY_MS,
        "reconnected before the delay:\n{lost}\n{again}"
    );
    // The client may log before the server thread has counted its side of the upgrade.
    support::wait_until("the server upgrades the second connection", || {
        server.accepted() == 2
    });
}

#[test]
fn reconnects_to_a_restarted_server_after_the_delay() {
    let mut first = Server::start(&[]);
    let port = first.addr.port();
    let client = start_client(port, &[]);
    client.wait_for(
        &format!("[Connection 1] Connected to {}", url(port)),
        PATIENCE,
    );
    first.wait_for_gauge(1);

    first.proc.signal("TERM");
    let lost = client.wait_for(
        "[Connection 1] Connection lost: server closed the connection: close 1001 \"server shutting down\"",
        PATIENCE,
    );
    client.wait_for("[Connection 1] Reconnecting in 300ms", PATIENCE);
    let status = first.proc.wait_exit(PATIENCE);
    assert!(
        status.success(),
        "first server: {status}; output:\n{}",
        first.proc.output()
    );

    let second = start_server_on(port);
    let again = client.wait_for_nth(
        &format!("[Connection 1] Connected to {}", url(port)),
        2,
        PATIENCE,
    );
    second.wait_for_gauge(1);
    let after = ms_between(&lost, &again);
    assert!(
        after >= RECONNECT_DELAY_MS,
        "reconnected {after} ms after the loss, before the 300ms delay"
    );
    assert_eq!(
        client.count("Connection lost"),
        1,
        "output:\n{}",
        client.output()
    );
}

fn shutdown_closes_with_1000(signal: &str) {
    let server = Server::start(&[]);
    let mut client = start_client(server.addr.port(), &[]);
    client.wait_for("[Connection 1] Connected to", PATIENCE);
    server.wait_for_gauge(1);

    let (status, took) = stop(&mut client, signal);
    assert_clean_exit(&client, status, took);
    let disconnected = server
        .proc
        .wait_for("(close 1000 \"client shutting down\"", PATIENCE);
    assert!(
        disconnected.contains("Disconnected: 127.0.0.1:"),
        "{disconnected}"
    );
    server.wait_for_gauge(0);
    assert_eq!(
        client.count("Connection lost"),
        0,
        "output:\n{}",
        client.output()
    );
}

#[test]
fn sigterm_closes_with_1000_and_exits_promptly() {
    shutdown_closes_with_1000("TERM");
}

#[test]
fn sigint_closes_with_1000_and_exits_promptly() {
    shutdown_closes_with_1000("INT");
}

#[test]
fn a_signal_during_the_reconnect_delay_exits_promptly() {
    let mut client = start_client(closed_port(), &["--reconnect-delay", "10s"]);
    client.wait_for("[Connection 1] Connection failed:", PATIENCE);
    client.wait_for("[Connection 1] Reconnecting in 10s", PATIENCE);
    let (status, took) = stop(&mut client, "TERM");
    assert_clean_exit(&client, status, took);
    assert_eq!(
        client.count("Connection failed"),
        1,
        "output:\n{}",
        client.output()
    );
}

#[test]
fn fifty_connections_on_named_threads() {
    let server = Server::start(&[]);
    let mut client = start_client(server.addr.port(), &["--connections", "50"]);
    server.wait_for_gauge(50);

    let names: BTreeSet<String> = std::fs::read_dir(format!("/proc/{}/task", client.pid()))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|comm| comm.trim().to_string())
        .collect();
    let missing: Vec<String> = (1..=50)
        .map(|i| format!("client-{i}"))
        .filter(|n| !names.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "threads {missing:?} missing; threads: {names:?}"
    );

    let (status, took) = stop(&mut client, "TERM");
    assert_clean_exit(&client, status, took);
    server.wait_for_gauge(0);
    assert_eq!(
        server.proc.count("(close 1000 \"client shutting down\""),
        50,
        "output:\n{}",
        server.proc.output()
    );
}

#[test]
fn connections_are_independent() {
    // The second upgraded connection is closed with 1000 "bye"; the others are served.
    let pings = Arc::new(AtomicUsize::new(0));
    let server = TestServer::start({
        let pings = pings.clone();
        move |n, mut socket| {
            if n == 2 {
                socket
                    .close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "bye".into(),
                    }))
                    .unwrap();
            }
            serve(socket, &pings);
            None
        }
    });
    let client = start_client(server.port, &["--connections", "3"]);
    let lost = client.wait_for(
        "Connection lost: server closed the connection: close 1000 \"bye\"",
        PATIENCE,
    );
    let victim = connection_index(&lost);
    // The closed connection comes back as the fourth accepted one, which is served.
    client.wait_for_nth(&format!("[Connection {victim}] Connected to"), 2, PATIENCE);
    support::wait_until("the fourth connection is accepted", || {
        server.accepted() == 4
    });

    let others: Vec<u32> = (1..=3).filter(|&i| i != victim).collect();
    for &i in &others {
        let status = format!("[Connection {i}] Connection status: CONNECTED");
        let before = client.count(&status);
        client.wait_for_nth(&status, before + 2, PATIENCE);
    }
    assert_eq!(
        client.count("Connection lost"),
        1,
        "output:\n{}",
        client.output()
    );
    for &i in &others {
        assert_eq!(
            client.count(&format!("[Connection {i}] Connected to")),
            1,
            "output:\n{}",
            client.output()
        );
        assert_eq!(
            client.count(&format!("[Connection {i}] Reconnecting")),
            0,
            "output:\n{}",
            client.output()
        );
    }
}

/// Runs the client with `args` (and `env`) to completion; returns its exit code and output.
fn run_client(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let (status, output) = Proc::start_with_env("client", args, env).finish(PATIENCE);
    (status.code(), output)
}

#[test]
fn bad_flags_exit_2_with_a_message() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["--connections", "0"],
            "invalid value '0' for '--connections",
        ),
        (
            &["--ping-interval", "10parsecs"],
            "unknown unit \"parsecs\"",
        ),
        (&["--port", "70000"], "invalid value '70000' for '--port"),
        (&["--pong-timeout", "0ms"], "must be greater than zero"),
        (&["--no-such-flag"], "unexpected argument '--no-such-flag'"),
    ];
    for (args, message) in cases {
        let (code, output) = run_client(args, &[]);
        assert_eq!(code, Some(2), "client {args:?}: {output}");
        assert!(
            output.contains(message),
            "client {args:?} should say {message:?}: {output}"
        );
        assert!(
            !output.contains("Starting"),
            "client {args:?} started: {output}"
        );
    }
    // An environment twin is validated like its flag.
    let (code, output) = run_client(&[], &[("WEBSOCKET_TEST_CONNECTIONS", "0")]);
    assert_eq!(code, Some(2), "WEBSOCKET_TEST_CONNECTIONS=0: {output}");
    assert!(output.contains("invalid value '0'"), "{output}");
}

#[test]
fn help_lists_flags_and_their_environment_twins() {
    let (code, output) = run_client(&["--help"], &[]);
    assert_eq!(code, Some(0), "{output}");
    for name in [
        "--ping-interval",
        "WEBSOCKET_TEST_HOST",
        "WEBSOCKET_TEST_PORT",
        "WEBSOCKET_TEST_PATH",
        "WEBSOCKET_TEST_CONNECTIONS",
        "WEBSOCKET_TEST_PING_INTERVAL",
        "WEBSOCKET_TEST_PONG_TIMEOUT",
        "WEBSOCKET_TEST_STATUS_INTERVAL",
        "WEBSOCKET_TEST_RECONNECT_DELAY",
        "WEBSOCKET_TEST_CONNECT_TIMEOUT",
        "WEBSOCKET_TEST_LOG_LEVEL",
    ] {
        assert!(
            output.contains(name),
            "--help does not mention {name}:\n{output}"
        );
    }
}

#[test]
fn environment_twins_set_the_port_and_flags_win() {
    let server = Server::start(&[]);
    let port = server.addr.port().to_string();

    // The port from the environment alone.
    let args = client_args(None, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let from_env = Proc::start_with_env("client", &args, &[("WEBSOCKET_TEST_PORT", &port)]);
    from_env.wait_for(
        &format!("[Connection 1] Connected to {}", server.url()),
        PATIENCE,
    );
    server.wait_for_gauge(1);
    drop(from_env);
    server.wait_for_gauge(0);

    // The flag beats a variable that points nowhere.
    let dead = closed_port().to_string();
    let args = client_args(Some(server.addr.port()), &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let flagged = Proc::start_with_env(
        "client",
        &args,
        &[
            ("WEBSOCKET_TEST_PORT", &dead),
            ("WEBSOCKET_TEST_PING_INTERVAL", "10parsecs"),
        ],
    );
    flagged.wait_for(
        &format!("[Connection 1] Connected to {}", server.url()),
        PATIENCE,
    );
    server.wait_for_gauge(1);
    assert_eq!(
        flagged.count("Connection failed"),
        0,
        "output:\n{}",
        flagged.output()
    );
}

#[test]
fn a_refused_connection_is_reported_and_retried_after_the_delay() {
    let client = start_client(closed_port(), &[]);
    let first = client.wait_for("[Connection 1] Connection failed:", PATIENCE);
    assert!(first.contains("Connection refused"), "{first}");
    client.wait_for("[Connection 1] Reconnecting in 300ms", PATIENCE);
    let second = client.wait_for_nth(
        "[Connection 1] Connection failed:",
        2,
        Duration::from_secs(2),
    );
    let after = ms_between(&first, &second);
    assert!(
        after >= RECONNECT_DELAY_MS,
        "retried {after} ms after the failure, before the 300ms delay"
    );
    assert!(
        after < RECONNECT_DELAY_MS + 1000,
        "retried only {after} ms after the failure"
    );
}

#[test]
fn a_signal_during_a_stalled_handshake_exits_promptly() {
    // Accepts TCP but never answers the upgrade request.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (accepted, stalled) = std::sync::mpsc::channel();
    thread::spawn(move || accepted.send(listener.accept().map(|(tcp, _)| tcp)));
    let mut client = start_client(port, &["--connect-timeout", "30s"]);
    let _stalled = stalled
        .recv_timeout(PATIENCE)
        .expect("the client connects")
        .unwrap();
    let (status, took) = stop(&mut client, "TERM");
    assert_clean_exit(&client, status, took);
    assert_eq!(
        client.count("Connected to"),
        0,
        "output:\n{}",
        client.output()
    );
}

#[test]
fn a_peer_that_stops_answering_during_shutdown_is_not_reported_lost() {
    // Serves normally until `frozen`, then holds the socket without reading: neither pongs
    // nor the Close reply come back.
    let frozen = Arc::new(AtomicBool::new(false));
    let server = TestServer::start({
        let frozen = frozen.clone();
        move |_, mut socket| {
            socket
                .get_mut()
                .set_read_timeout(Some(Duration::from_millis(5)))
                .unwrap();
            while !frozen.load(Ordering::SeqCst) {
                match socket.read() {
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return None,
                }
            }
            Some(socket)
        }
    });
    let mut client = start_client(server.port, &[]);
    client.wait_for("[Connection 1] Connection status: CONNECTED", PATIENCE);
    frozen.store(true, Ordering::SeqCst);
    let (status, took) = stop(&mut client, "TERM");
    assert_clean_exit(&client, status, took);
    assert_eq!(
        client.count("Connection lost"),
        0,
        "a connection being closed at shutdown was reported lost; output:\n{}",
        client.output()
    );
    let output = client.output();
    let after_shutdown = output
        .lines()
        .skip_while(|line| !line.contains("Shutting down"))
        .skip(1);
    let statuses: Vec<&str> = after_shutdown
        .filter(|line| line.contains("Connection status"))
        .collect();
    assert!(
        statuses.is_empty(),
        "status reported after shutdown began: {statuses:#?}\noutput:\n{output}"
    );
}

/// Reads masked client frames from `tcp` until it ends; returns their opcodes.
fn client_opcodes_until_eof(tcp: &mut TcpStream) -> Vec<u8> {
    use std::io::Read;
    let mut opcodes = Vec::new();
    let mut header = [0u8; 2];
    while tcp.read_exact(&mut header).is_ok() {
        assert_eq!(header[1] & 0x80, 0x80, "client frames must be masked");
        let len = usize::from(header[1] & 0x7f);
        assert!(
            len < 126,
            "expected short control frames, header {header:?}"
        );
        let mut rest = vec![0u8; 4 + len];
        if tcp.read_exact(&mut rest).is_err() {
            break;
        }
        opcodes.push(header[0] & 0x0f);
    }
    opcodes
}

#[test]
fn a_close_reply_is_never_followed_by_a_second_close_at_shutdown() {
    // The server closes first and then keeps the TCP connection open, reading raw frames:
    // the client answers the Close, and its shutdown must not send another one.
    let (frames, seen) = std::sync::mpsc::channel();
    let server = TestServer::start(move |_, mut socket| {
        socket
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: "going".into(),
            })))
            .unwrap();
        let mut tcp = socket.into_inner();
        tcp.set_read_timeout(Some(PATIENCE)).unwrap();
        let _ = frames.send(client_opcodes_until_eof(&mut tcp));
        None
    });
    let mut client = start_client(server.port, &["--reconnect-delay", "10s"]);
    client.wait_for("[Connection 1] Connected to", PATIENCE);
    let (status, took) = stop(&mut client, "TERM");
    assert_clean_exit(&client, status, took);
    let opcodes = seen
        .recv_timeout(PATIENCE)
        .expect("the server saw the client end");
    let closes = opcodes.iter().filter(|&&op| op == 0x8).count();
    assert!(
        closes <= 1,
        "the client sent {closes} Close frames: opcodes {opcodes:?}"
    );
}

#[test]
fn in_process_client_counts_pongs_and_closes_with_1000() {
    use crate::harness::{TestClient, TestServer};
    use websocket_test::client::Counter;
    let server = TestServer::start(&[]);
    let mut client = TestClient::start(server.addr, &[]);
    client.wait("3 pongs", Duration::from_secs(5), |s| {
        s.get(Counter::Pongs) >= 3
    });
    server.wait_settled(1);
    let took = client.wait_stopped(Duration::from_secs(5));
    assert!(took < Duration::from_secs(1), "{took:?}");
    server.wait_settled(0);
    assert_eq!(server.closed("peer_close", "1000"), 1.0);
    assert_eq!(client.stats().get(Counter::Losses), 0);
    assert_eq!(
        client
            .stats()
            .ended(websocket_test::ending::Reason::Shutdown),
        1
    );
}
