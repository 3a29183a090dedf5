//! The binaries as processes: they survive a closed stdout, their flags read Go-style
//! durations and host names, their errors name what is wrong (and the environment variable
//! a bad value came from), and their log lines keep one format.
//!
//! These tests are about process output, so they wait for log lines; every wait has a
//! deadline of [`patience`] (10 s times `WEBSOCKET_TEST_TIME_SCALE`).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::support::{self, address_after, patience, Proc};

/// The flags that put a server on free loopback ports.
const FREE: [&str; 6] = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"];

/// A binary whose stdout the test reads until some lines have appeared, then closes, as
/// `server | head` does. Its stderr is collected to the end.
struct Muted {
    name: String,
    child: Child,
    /// The stdout lines read before the pipe was closed.
    seen: Vec<String>,
    stderr: Receiver<String>,
}

impl Muted {
    /// Starts `bin` with `args` and reads its stdout until each of `wanted` has appeared
    /// in a line; returns once the read end of the pipe is closed.
    fn start(bin: &str, args: &[&str], wanted: &[&str]) -> Muted {
        let name = format!("{bin} {}", args.join(" "));
        let mut child = Command::new(support::binary(bin))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{name}`: {e}"));
        let (stderr_tx, stderr) = mpsc::channel();
        let mut stderr_pipe = child.stderr.take().unwrap();
        thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr_pipe.read_to_string(&mut text);
            let _ = stderr_tx.send(text);
        });
        // The reader sends each line, then None once it has dropped the pipe.
        let (line_tx, lines) = mpsc::channel::<Option<String>>();
        let stdout = child.stdout.take().unwrap();
        let mut missing: Vec<String> = wanted
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout).lines();
            while !missing.is_empty() {
                let Some(Ok(line)) = reader.next() else {
                    return;
                };
                missing.retain(|w| !line.contains(w.as_str()));
                if line_tx.send(Some(line)).is_err() {
                    return;
                }
            }
            drop(reader);
            let _ = line_tx.send(None);
        });
        let mut muted = Muted {
            name,
            child,
            seen: Vec::new(),
            stderr,
        };
        let deadline = Instant::now() + patience();
        loop {
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Some(line)) => muted.seen.push(line),
                Ok(None) => return muted,
                Err(_) => muted.fail(&format!("did not print {wanted:?} within {:?}", patience())),
            }
        }
    }

    /// The address after `scheme` in the first stdout line that has it.
    fn address(&self, scheme: &str) -> SocketAddr {
        match self.seen.iter().find(|line| line.contains(scheme)) {
            Some(line) => address_after(line, scheme),
            None => panic!("`{}` printed no {scheme} line: {:?}", self.name, self.seen),
        }
    }

    /// Sends SIGTERM.
    fn terminate(&self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// Waits for the exit; returns the status and everything written to stderr.
    fn finish(&mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + patience();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("did not exit within {:?}", patience()));
            }
            thread::sleep(Duration::from_millis(5));
        };
        let stderr = self.stderr.recv_timeout(patience()).unwrap_or_default();
        (status, stderr)
    }

    /// Kills the process and panics with `what` and all it printed.
    fn fail(&mut self, what: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let stderr = self.stderr.recv_timeout(patience()).unwrap_or_default();
        panic!(
            "`{}` {what}; stdout read:\n{}\nstderr:\n{stderr}",
            self.name,
            self.seen.join("\n")
        );
    }
}

impl Drop for Muted {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until metric `name` at `metrics` equals `value`.
fn wait_for_metric(metrics: SocketAddr, name: &str, value: f64) {
    let deadline = Instant::now() + patience();
    loop {
        let now = support::metric(metrics, name);
        if now == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed {now}, expected {value}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Starts a server on free loopback ports with `extra` flags; returns it with its
/// WebSocket and metrics addresses.
fn start_server(extra: &[&str]) -> (Proc, SocketAddr, SocketAddr) {
    let args = [&FREE[..], extra].concat();
    let server = Proc::start("server", &args);
    let addr = address_after(&server.wait_for("Listening on ws://", patience()), "ws://");
    let metrics = address_after(
        &server.wait_for("Metrics on http://", patience()),
        "http://",
    );
    (server, addr, metrics)
}

/// Runs `bin` to completion; returns its exit code and everything it printed.
fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let (status, output) = Proc::start_with_env(bin, args, env).finish(patience());
    (status.code(), output)
}

/// Checks a finished run: exit code 2, the output mentions each of `mentions`, and the
/// process never got as far as logging.
fn assert_refused(bin: &str, args: &[&str], env: &[(&str, &str)], mentions: &[&str]) {
    let (code, output) = run(bin, args, env);
    assert_eq!(code, Some(2), "{env:?} {bin} {args:?}:\n{output}");
    for mention in mentions {
        assert!(
            output.contains(mention),
            "{env:?} {bin} {args:?} does not say {mention:?}:\n{output}"
        );
    }
    assert!(
        !output.contains(" INFO "),
        "{env:?} {bin} {args:?} started:\n{output}"
    );
}

// ----------------------------------------------------------------------------------------
// A closed stdout
// ----------------------------------------------------------------------------------------

#[test]
fn a_server_whose_stdout_is_closed_keeps_serving_and_exits_cleanly() {
    let args = [&FREE[..], &["--log-level", "debug"]].concat();
    let mut server = Muted::start(
        "server",
        &args,
        &["Listening on ws://", "Metrics on http://"],
    );
    let (addr, metrics) = (server.address("ws://"), server.address("http://"));

    // Every step logs (connected, each message, disconnected) into the closed pipe.
    let mut ws = support::connect(&format!("ws://{addr}/ws"));
    ws.send(Message::text("still here")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("still here"));
    wait_for_metric(metrics, "websocket_connections", 1.0);
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    wait_for_metric(metrics, "websocket_connections", 0.0);
    let (status, _) = support::http_get(metrics, "/healthz");
    assert_eq!(status, 200);
    // The lines that could not be written were counted.
    let dropped = support::metric(metrics, "log_lines_dropped_total");
    assert!(dropped >= 3.0, "log_lines_dropped_total {dropped}");

    server.terminate();
    let (status, stderr) = server.finish();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
}

#[test]
fn a_client_whose_stdout_is_closed_keeps_its_connection_and_exits_cleanly() {
    let (_server, addr, metrics) = start_server(&[]);
    let port = addr.port().to_string();
    let args = [
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--status-interval",
        "100ms",
    ];
    let mut client = Muted::start("client", &args, &["[Connection 1] Connected to ws://"]);

    wait_for_metric(metrics, "websocket_connections", 1.0);
    // The signal handler and the shutdown log into the closed pipe before the exit.
    client.terminate();
    let (status, stderr) = client.finish();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
    wait_for_metric(metrics, "websocket_connections", 0.0);
}

// ----------------------------------------------------------------------------------------
// Flags
// ----------------------------------------------------------------------------------------

#[test]
fn durations_are_written_as_in_go() {
    let (_server, _, _) = start_server(&["--log-interval", "1m30s"]);
    let (server, _, _) = start_server(&["--log-interval", "1.5s"]);
    server.wait_for("Active connections: 0", patience());
    let (_server, _, _) =
        start_server(&["--handshake-timeout", "2h", "--shutdown-timeout", "250ms"]);
}

#[test]
fn a_bad_value_from_the_environment_names_the_variable() {
    assert_refused(
        "server",
        &FREE,
        &[("WEBSOCKET_TEST_LOG_INTERVAL", "5parsecs")],
        &[
            "invalid value '5parsecs' for '--log-interval <LOG_INTERVAL>' \
             (from environment variable WEBSOCKET_TEST_LOG_INTERVAL)",
            "unknown unit \"parsecs\"",
        ],
    );
    assert_refused(
        "client",
        &["--port", "1"],
        &[("WEBSOCKET_TEST_PING_INTERVAL", "0")],
        &[
            "(from environment variable WEBSOCKET_TEST_PING_INTERVAL)",
            "must be greater than zero",
        ],
    );
    // On the command line, the flag is the source: clap's own message.
    let (code, output) = run(
        "server",
        &[&FREE[..], &["--log-interval", "5parsecs"]].concat(),
        &[("WEBSOCKET_TEST_LOG_INTERVAL", "5parsecs")],
    );
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("error: invalid value '5parsecs' for '--log-interval <LOG_INTERVAL>': "),
        "{output}"
    );
    assert!(!output.contains("environment variable"), "{output}");
}

#[test]
fn help_and_version_exit_0() {
    for bin in ["server", "client"] {
        for flag in ["--help", "--version"] {
            let (code, output) = run(bin, &[flag], &[]);
            assert_eq!(code, Some(0), "{bin} {flag}:\n{output}");
        }
    }
}

#[test]
fn the_server_host_may_be_a_name() {
    let server = Proc::start(
        "server",
        &["--host", "localhost", "--port", "0", "--metrics-port", "0"],
    );
    let line = server.wait_for("Listening on ws://", patience());
    assert!(
        line.contains("ws://127.0.0.1:") || line.contains("ws://[::1]:"),
        "{line}"
    );
    // A label longer than DNS allows (63 bytes): refused without asking a name server.
    let unresolvable = format!("{}.invalid", "x".repeat(64));
    assert_refused(
        "server",
        &[
            "--host",
            &unresolvable,
            "--port",
            "0",
            "--metrics-port",
            "0",
        ],
        &[],
        &[&format!("cannot resolve host \"{unresolvable}\"")],
    );
}

#[test]
fn a_zero_connection_ceiling_and_an_unknown_log_level_are_explained() {
    assert_refused(
        "server",
        &[&FREE[..], &["--max-connections", "0"]].concat(),
        &[],
        &["must be at least 1; omit the flag to use the OS ceiling"],
    );
    for bin in ["server", "client"] {
        assert_refused(
            bin,
            &["--log-level", "verbose"],
            &[],
            &["invalid log level \"verbose\": use off, error, warn, info, debug or trace"],
        );
    }
}

// ----------------------------------------------------------------------------------------
// The log format
// ----------------------------------------------------------------------------------------

/// Whether `line` matches
/// `^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO |WARN |ERROR|DEBUG|TRACE) \[[^@\]]+@[^\]]+\] `.
fn is_log_line(line: &str) -> bool {
    const TIMESTAMP: &[u8] = b"0000-00-00T00:00:00.000Z ";
    let bytes = line.as_bytes();
    let timestamp_ok = bytes.len() > TIMESTAMP.len()
        && TIMESTAMP
            .iter()
            .zip(bytes)
            .all(|(&shape, &byte)| match shape {
                b'0' => byte.is_ascii_digit(),
                _ => byte == shape,
            });
    if !timestamp_ok {
        return false;
    }
    let rest = &line[TIMESTAMP.len()..];
    let Some(rest) = ["INFO ", "WARN ", "ERROR", "DEBUG", "TRACE"]
        .iter()
        .find_map(|level| rest.strip_prefix(level))
    else {
        return false;
    };
    let Some(rest) = rest.strip_prefix(" [") else {
        return false;
    };
    let Some((target, rest)) = rest.split_once('@') else {
        return false;
    };
    let Some((thread, _message)) = rest.split_once("] ") else {
        return false;
    };
    !target.is_empty() && !target.contains(']') && !thread.is_empty() && !thread.contains(']')
}

#[test]
fn the_log_line_check_accepts_only_the_format() {
    assert!(is_log_line(
        "2026-12-02T09:44:20.856Z INFO  [websocket_test::server@main] Listening on ws://x/ws"
    ));
    assert!(is_log_line("2026-12-02T09:44:20.856Z ERROR [server@?] "));
    for bad in [
        "2026-12-02T09:44:20Z INFO  [a@b] m",
        "2026-12-02 09:44:20.856Z INFO  [a@b] m",
        "2026-12-02T09:44:20.856Z INFO [a@b] m",
        "2026-12-02T09:44:20.856Z NOTE  [a@b] m",
        "2026-12-02T09:44:20.856Z INFO  [ab] m",
        "2026-12-02T09:44:20.856Z INFO  [@b] m",
        "2026-12-02T09:44:20.856Z INFO  [a@] m",
        "2026-12-02T09:44:20.856Z INFO  [a]@b] m",
        "2026-12-02T09:44:20.856Z INFO  [a@b]m",
        "x2026-12-02T09:44:20.856Z INFO  [a@b] m",
    ] {
        assert!(!is_log_line(bad), "{bad:?}");
    }
}

#[test]
fn log_lines_carry_time_level_target_and_thread() {
    let (server, addr, _) = start_server(&["--log-interval", "100ms"]);
    let mut ws = support::connect(&format!("ws://{addr}/ws"));
    ws.send(Message::text("hi")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hi"));
    let lines = [
        server.wait_for("Listening on ws://", patience()),
        server.wait_for("Active connections:", patience()),
        server.wait_for("Connected: ", patience()),
    ];
    for line in &lines {
        assert!(is_log_line(line), "not in the log format: {line:?}");
    }
    assert!(
        lines[0].contains(" INFO  [websocket_test::server@main] "),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("@reporter] "), "{}", lines[1]);
    assert!(lines[2].contains("@conn-"), "{}", lines[2]);
    for line in server.output().lines() {
        assert!(is_log_line(line), "not in the log format: {line:?}");
    }
}
