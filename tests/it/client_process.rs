//! The `client` binary as a process: only what a process shows. Signals and the exit code,
//! the command line (flags, `--help`, environment twins), thread names in `/proc`, and the
//! log lines SREs grep for. The server is the real one, in this process ([`TestServer`]).

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use clap::CommandFactory;
use websocket_test::ClientConfig;

use crate::harness::{TestServer, FAST};
use crate::support::{self, patience, scaled, Proc};

/// How long after a signal the client must have exited.
const EXIT_LIMIT: Duration = Duration::from_secs(1);

/// Starts the client binary with the harness's [`FAST`] timings, `--host` and `--port` of
/// `target` (no `--port` without one), `flags` and environment `env`.
fn start_client(target: Option<SocketAddr>, flags: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut args = vec!["--host".to_string(), "127.0.0.1".to_string()];
    if let Some(target) = target {
        args.extend(["--port".to_string(), target.port().to_string()]);
    }
    for (flag, value) in FAST {
        if !flags.contains(&flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend(flags.iter().map(std::string::ToString::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::start_with_env("client", &args, env)
}

/// Waits until `server` holds `n` connections; panics with the client's output if not.
fn wait_for_connections(server: &TestServer, client: &Proc, n: usize) {
    let deadline = Instant::now() + patience();
    while server.state().connections() != n {
        assert!(
            Instant::now() < deadline,
            "the server holds {} connections, not {n}, after {:?}; client output:\n{}",
            server.state().connections(),
            patience(),
            client.output()
        );
        thread::sleep(Duration::from_millis(5)); // polling interval
    }
}

/// Runs the client with `args` and `env` to completion; returns its exit code and output.
fn run_client(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let (status, output) = Proc::start_with_env("client", args, env).finish(patience());
    (status.code(), output)
}

fn a_signal_closes_with_1000_and_exits_0_within_a_second(signal: &str) {
    let server = TestServer::start(&[]);
    let mut client = start_client(Some(server.addr), &[], &[]);
    wait_for_connections(&server, &client, 1);

    client.signal(signal);
    let status = client.wait_exit(scaled(EXIT_LIMIT));
    assert!(
        status.success(),
        "client exited with {status} after SIG{signal}; output:\n{}",
        client.output()
    );
    server.wait_settled(0);
    support::wait_until("the server counts a close with 1000", || {
        server.closed("peer_close", "1000") == 1.0
    });
}

#[test]
fn sigterm_closes_with_1000_and_exits_0_within_a_second() {
    a_signal_closes_with_1000_and_exits_0_within_a_second("TERM");
}

#[test]
fn sigint_closes_with_1000_and_exits_0_within_a_second() {
    a_signal_closes_with_1000_and_exits_0_within_a_second("INT");
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
fn help_lists_every_flag_and_its_environment_twin() {
    let (code, output) = run_client(&["--help"], &[]);
    assert_eq!(code, Some(0), "{output}");
    let command = ClientConfig::command();
    let mut twins = 0;
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        assert!(
            output.contains(&format!("--{long}")),
            "--help does not mention --{long}:\n{output}"
        );
        if matches!(long, "help" | "version") {
            continue;
        }
        let env = arg
            .get_env()
            .unwrap_or_else(|| panic!("--{long} has no environment twin"));
        let env = env.to_str().unwrap();
        assert!(
            output.contains(env),
            "--help does not mention {env}:\n{output}"
        );
        twins += 1;
    }
    assert!(twins >= 10, "only {twins} environment twins:\n{output}");
}

#[test]
fn environment_twins_set_the_port_and_a_flag_wins() {
    let server = TestServer::start(&[]);
    let port = server.addr.port().to_string();

    // The port and the number of connections from the environment alone.
    let from_env = start_client(
        None,
        &[],
        &[
            ("WEBSOCKET_TEST_PORT", &port),
            ("WEBSOCKET_TEST_CONNECTIONS", "2"),
        ],
    );
    wait_for_connections(&server, &from_env, 2);
    drop(from_env);
    server.wait_settled(0);

    // Flags beat variables that point nowhere or do not even parse.
    let (_reserved, refusing) = support::refusing_addr();
    let refusing = refusing.port().to_string();
    let flagged = start_client(
        Some(server.addr),
        &[],
        &[
            ("WEBSOCKET_TEST_PORT", &refusing),
            ("WEBSOCKET_TEST_PING_INTERVAL", "10parsecs"),
        ],
    );
    wait_for_connections(&server, &flagged, 1);
}

#[test]
fn connection_threads_are_named_client_1_to_n() {
    let server = TestServer::start(&[]);
    let n = 10;
    let client = start_client(Some(server.addr), &["--connections", &n.to_string()], &[]);
    wait_for_connections(&server, &client, n);
    let names = support::thread_names(client.pid());
    let missing: Vec<String> = (1..=n)
        .map(|i| format!("client-{i}"))
        .filter(|name| !names.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "threads {missing:?} missing; threads: {names:?}"
    );
}

/// Checks `line` is `TIMESTAMP LEVEL [TARGET@THREAD] MESSAGE` with an RFC 3339 UTC
/// timestamp to the millisecond and the given level and thread, and returns the message.
fn log_message<'a>(line: &'a str, level: &str, thread: &str) -> &'a str {
    let shape = "dddd-dd-ddTdd:dd:dd.dddZ ";
    let timestamp_ok = line.len() > shape.len()
        && line.bytes().zip(shape.bytes()).all(|(c, s)| {
            if s == b'd' {
                c.is_ascii_digit()
            } else {
                c == s
            }
        });
    assert!(timestamp_ok, "no timestamp at the start of {line:?}");
    let rest = line[shape.len()..].trim_start();
    assert!(rest.starts_with(level), "not at level {level}: {line:?}");
    let marker = format!("@{thread}] ");
    let at = rest
        .find(&marker)
        .unwrap_or_else(|| panic!("not from thread {thread}: {line:?}"));
    &rest[at + marker.len()..]
}

#[test]
fn log_lines_name_the_connection_and_the_url() {
    let mut server = TestServer::start(&[]);
    let client = start_client(Some(server.addr), &[], &[]);
    let url = server.url();
    let line = client.wait_for("Connected to", patience());
    assert_eq!(
        log_message(&line, "INFO", "client-1"),
        format!("[Connection 1] Connected to {url}")
    );
    let line = client.wait_for("Connection status:", patience());
    assert_eq!(
        log_message(&line, "INFO", "client-1"),
        format!("[Connection 1] Connection status: CONNECTED to {url}")
    );

    server.shut_down();
    server.wait_stopped(Duration::from_secs(10));
    let line = client.wait_for("Connection lost:", patience());
    assert_eq!(
        log_message(&line, "WARN", "client-1"),
        "[Connection 1] Connection lost: server closed the connection: \
         close 1001 \"server shutting down\""
    );
    let line = client.wait_for("Reconnecting in", patience());
    assert_eq!(
        log_message(&line, "INFO", "client-1"),
        "[Connection 1] Reconnecting in 300ms"
    );

    let (_reserved, refusing) = support::refusing_addr();
    let refused = start_client(Some(refusing), &[], &[]);
    let line = refused.wait_for("Connection failed:", patience());
    let message = log_message(&line, "WARN", "client-1");
    let expected = format!("[Connection 1] Connection failed: {refusing}: Connection refused");
    assert!(message.starts_with(&expected), "{line:?}");
}
