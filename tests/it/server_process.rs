//! The `server` binary as a process: what only a process shows. Signals and the exit
//! status, flags and their environment twins, `--help` and `--version`, thread names in
//! /proc, and the format of the connect and disconnect log lines. Behaviour is tested in
//! process (`server.rs`, `hostile.rs`).

use std::collections::BTreeSet;
use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::CommandFactory;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;
use websocket_test::ServerConfig;

use crate::support::{
    self, assert_closed, assert_echo, assert_serves, binary_payload, patience, read_close, Proc,
    Server, Ws,
};

/// How a short-lived server run ended.
struct Exit {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs the server binary to completion with separate stdout and stderr (it must exit by
/// itself within [`patience`]).
fn run_server(args: &[&str], env: &[(&str, &str)]) -> Exit {
    fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    }
    let mut child = Command::new(support::binary("server"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + patience();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "server {args:?} {env:?} did not exit within {:?}; stdout:\n{}\nstderr:\n{}",
                patience(),
                stdout.join().unwrap(),
                stderr.join().unwrap()
            );
        }
        thread::sleep(Duration::from_millis(5)); // polling interval
    };
    Exit {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The names of the threads of process `pid`.
fn thread_names(pid: u32) -> BTreeSet<String> {
    support::thread_names(pid).into_iter().collect()
}

// ----------------------------------------------------------------------------------------
// Signals
// ----------------------------------------------------------------------------------------

/// `signal` closes three connections with 1001 and the process exits 0 once they have
/// answered, long before its 30 s shutdown timeout.
fn signal_closes_every_connection_with_1001_and_exits_0(signal: &str) {
    let server = Server::start(&["--shutdown-timeout", "30s"]);
    let mut clients: Vec<Ws> = (0..3).map(|_| server.connect()).collect();
    // An echo shows each connection is in the server's echo loop.
    for ws in &mut clients {
        assert_echo(ws, 5);
    }

    let Server { mut proc, .. } = server;
    proc.signal(signal);
    // Every client answers on its own thread, as independent clients would.
    let clients: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            thread::spawn(move || {
                let frame = read_close(&mut ws);
                assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
                assert_eq!(frame.reason.as_str(), "server shutting down");
                assert_closed(&mut ws);
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    let status = proc.wait_exit(patience());
    let (_, output) = proc.finish(patience());
    assert_eq!(status.code(), Some(0), "SIG{signal}; output:\n{output}");
    assert!(output.contains("Server stopped"), "{output}");
}

#[test]
fn sigterm_closes_every_connection_with_1001_and_exits_0() {
    signal_closes_every_connection_with_1001_and_exits_0("TERM");
}

#[test]
fn sigint_closes_every_connection_with_1001_and_exits_0() {
    signal_closes_every_connection_with_1001_and_exits_0("INT");
}

// ----------------------------------------------------------------------------------------
// What /proc and the log show
// ----------------------------------------------------------------------------------------

#[test]
fn every_thread_is_named() {
    let server = Server::start(&[]);
    let pid = server.proc.pid();
    // A new thread names itself once it runs, so the workers may show as `server` briefly.
    for name in ["acceptor", "reporter", "metrics-http", "rejecter"] {
        support::wait_until(&format!("a thread is named {name}"), || {
            thread_names(pid).contains(name)
        });
    }
    let names = thread_names(pid);
    assert!(
        !names.iter().any(|name| name.starts_with("conn-")),
        "{names:?}"
    );

    let ws = server.connect();
    support::wait_until("thread conn-1 runs", || {
        thread_names(pid).contains("conn-1")
    });
    support::close_normally(ws);
    support::wait_until("thread conn-1 ends", || {
        !thread_names(pid).contains("conn-1")
    });

    let _ws = server.connect();
    support::wait_until("thread conn-2 runs", || {
        thread_names(pid).contains("conn-2")
    });
}

#[test]
fn connects_and_disconnects_are_logged_with_the_peer_and_the_close() {
    let server = Server::start(&[]);
    let mut ws = server.connect();
    let port = support::local_addr(&ws).port();
    server
        .proc
        .wait_for(&format!("Connected: 127.0.0.1:{port}"), patience());

    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "test over".into(),
    }))
    .unwrap();
    assert_eq!(read_close(&mut ws).reason.as_str(), "test over");
    assert_closed(&mut ws);
    let line = server
        .proc
        .wait_for(&format!("Disconnected: 127.0.0.1:{port} "), patience());
    assert!(
        line.contains(&format!(
            "Disconnected: 127.0.0.1:{port} (close 1000 \"test over\""
        )),
        "{line}"
    );
}

// ----------------------------------------------------------------------------------------
// Flags and environment twins
// ----------------------------------------------------------------------------------------

#[test]
fn bad_flags_exit_2_and_say_what_is_wrong() {
    // Every case asks for free loopback ports, so a wrongly accepted flag cannot bind
    // 3003/9100 (and no flag is given twice, which clap would reject for another reason).
    const FREE: [&str; 6] = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"];
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &[
                "--host",
                "127.0.0.1",
                "--port",
                "notanumber",
                "--metrics-port",
                "0",
            ],
            &["--port", "notanumber"],
        ),
        (
            &[&FREE[..], &["--log-interval", "0"]].concat(),
            &["--log-interval", "greater than zero"],
        ),
        (
            &[&FREE[..], &["--max-message-size", "0"]].concat(),
            &["--max-message-size"],
        ),
        (
            &[&FREE[..], &["--shutdown-timeout", "5 parsecs"]].concat(),
            &["--shutdown-timeout", "parsecs"],
        ),
        (
            &[&FREE[..], &["--no-such-flag"]].concat(),
            &["--no-such-flag"],
        ),
    ];
    for (args, mentions) in cases {
        let exit = run_server(args, &[]);
        assert_eq!(
            exit.status.code(),
            Some(2),
            "{args:?}: stderr:\n{}",
            exit.stderr
        );
        for mention in mentions {
            assert!(
                exit.stderr.contains(mention),
                "{args:?}: stderr does not mention {mention:?}:\n{}",
                exit.stderr
            );
        }
        assert!(
            !exit.stdout.contains("Listening"),
            "{args:?}: {}",
            exit.stdout
        );
    }
}

#[test]
fn help_lists_every_environment_twin_and_version_prints() {
    let help = run_server(&["--help"], &[]);
    assert!(help.status.success(), "{}", help.stderr);
    let command = ServerConfig::command();
    let twins: Vec<String> = command
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|var| var.to_string_lossy().into_owned())
        .collect();
    assert!(
        twins.contains(&"WEBSOCKET_TEST_PATH".to_string()),
        "{twins:?}"
    );
    for var in &twins {
        // A secret's variable is listed without its value (`[env: NAME]`).
        assert!(
            help.stdout.contains(&format!("[env: {var}="))
                || help.stdout.contains(&format!("[env: {var}]")),
            "--help does not mention {var}:\n{}",
            help.stdout
        );
    }

    let version = run_server(&["--version"], &[]);
    assert!(version.status.success(), "{}", version.stderr);
    assert!(
        version.stdout.contains(env!("CARGO_PKG_VERSION")),
        "{}",
        version.stdout
    );
}

#[test]
fn environment_twins_set_the_address_path_interval_and_limits() {
    let proc = Proc::start_with_env(
        "server",
        &[],
        &[
            ("WEBSOCKET_TEST_HOST", "127.0.0.1"),
            ("WEBSOCKET_TEST_PORT", "0"),
            ("WEBSOCKET_TEST_METRICS_PORT", "0"),
            ("WEBSOCKET_TEST_PATH", "/echo"),
            ("WEBSOCKET_TEST_LOG_INTERVAL", "100ms"),
            ("WEBSOCKET_TEST_MAX_MESSAGE_SIZE", "1KiB"),
        ],
    );
    let listening = proc.wait_for("Listening on ws://", patience());
    let addr = support::address_after(&listening, "ws://");
    assert!(
        listening.ends_with(&format!("ws://{addr}/echo")),
        "{listening}"
    );
    let metrics =
        support::address_after(&proc.wait_for("Metrics on http://", patience()), "http://");
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 3003);
    assert_ne!(metrics.port(), 9100);
    // The default interval is 30 s: this line would not come within patience.
    proc.wait_for("Active connections: 0", patience());

    assert_serves(&format!("ws://{addr}/echo"));
    assert_eq!(support::http_get(addr, "/ws").0, 404);
    let mut ws = support::connect(&format!("ws://{addr}/echo"));
    assert_echo(&mut ws, 1024);
    ws.send(Message::binary(binary_payload(1025))).unwrap();
    assert_eq!(read_close(&mut ws).code, CloseCode::Size);
}

#[test]
fn a_flag_wins_over_its_environment_twin() {
    let server = Server::start_with_env(&["--path", "/flag"], &[("WEBSOCKET_TEST_PATH", "/echo")]);
    assert_serves(&format!("ws://{}/flag", server.addr));
    assert_eq!(support::http_get(server.addr, "/echo").0, 404);
}

#[test]
fn a_bad_environment_value_exits_2() {
    let exit = run_server(
        &["--host", "127.0.0.1", "--metrics-port", "0"],
        &[("WEBSOCKET_TEST_PORT", "notaport")],
    );
    assert_eq!(exit.status.code(), Some(2), "stderr:\n{}", exit.stderr);
    assert!(exit.stderr.contains("notaport"), "{}", exit.stderr);
    assert!(
        exit.stderr.contains("WEBSOCKET_TEST_PORT") || exit.stderr.contains("--port"),
        "{}",
        exit.stderr
    );
}
