//! The `client` binary as a process: only what a process shows. Signals and the exit code,
//! the command line (flags, `--help`, environment twins), thread names in `/proc`, and the
//! log lines SREs grep for. The server is the real one, in this process ([`TestServer`]).

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use clap::CommandFactory;
use websocket_test::ClientConfig;

use crate::client_handshake::{Answer, ConnectProxy, Recorder, Tunnel, NGINX_403};
use crate::harness::{TestServer, FAST};
use crate::pki::{Pki, Use};
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
    let cases: [(&[&str], &str); 10] = [
        (
            &["--connections", "0"],
            "invalid value '0' for '--connections",
        ),
        (&["--host", "wss://lb.example.com"], "use --url"),
        (&["--header", "Upgrade: h2c"], "Upgrade cannot be set"),
        (&["--header", "X-A"], "expected 'Name: value'"),
        (&["--subprotocol", "a b"], "invalid subprotocol"),
        (
            &["--auth-token", "t", "--auth-token-file", "/t"],
            "cannot be used with",
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
    let mut server = TestServer::start(&["--server-name", "pod-7"]);
    let client = start_client(Some(server.addr), &[], &[]);
    let url = format!("{} (backend pod-7)", server.url());
    let line = client.wait_for("Connected to", patience());
    assert_eq!(
        log_message(&line, "INFO", "client-1"),
        format!("[Connection 1] Connected to {url}")
    );
    let line = client.wait_for("Connection status:", patience());
    let status = log_message(&line, "INFO", "client-1");
    assert!(
        status.starts_with(&format!(
            "[Connection 1] Connection status: CONNECTED to {url} (up "
        )) && status.contains(" pong"),
        "{line}"
    );

    server.shut_down();
    server.wait_stopped(Duration::from_secs(10));
    let line = client.wait_for("Connection lost:", patience());
    let lost = log_message(&line, "WARN", "client-1");
    assert!(
        lost.starts_with(
            "[Connection 1] Connection lost: server closed the connection: \
             close 1001 \"server shutting down\"; ended by the peer; age "
        ),
        "{line}"
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

/// The message of the first `Connection failed:` line of a client of `target` with `flags`.
fn first_failure(target: SocketAddr, flags: &[&str]) -> String {
    let client = start_client(Some(target), flags, &[]);
    let line = client.wait_for("Connection failed:", patience());
    log_message(&line, "WARN", "client-1").to_owned()
}

#[test]
fn a_refused_upgrade_is_logged_with_its_status_server_and_first_body_line() {
    // nginx: an HTML page with a Content-Length; its first line with text is the title.
    let nginx = Recorder::start(|_, _| Answer::Raw(NGINX_403.into()));
    assert_eq!(
        first_failure(nginx.addr, &[]),
        "[Connection 1] Connection failed: handshake failed: server answered 403 Forbidden \
         (Server: nginx/1.22.1): <head><title>403 Forbidden</title></head>"
    );
    // A body that ends when the connection does, as HAProxy's error files may.
    let haproxy = Recorder::start(|_, _| {
        Answer::Raw(
            "HTTP/1.1 503 Service Unavailable\r\ncache-control: no-cache\r\n\
             content-type: text/html\r\n\r\n<html><body><h1>503 Service Unavailable</h1>\n\
             No server is available to handle this request.\n</body></html>\n"
                .into(),
        )
    });
    assert_eq!(
        first_failure(haproxy.addr, &[]),
        "[Connection 1] Connection failed: handshake failed: server answered 503 Service \
         Unavailable: <html><body><h1>503 Service Unavailable</h1>"
    );
    // A chunked body, and a redirect's Location.
    let envoy = Recorder::start(|_, _| {
        Answer::Raw(
            "HTTP/1.1 401 Unauthorized\r\nserver: envoy\r\nlocation: https://sso.example/\r\n\
             transfer-encoding: chunked\r\n\r\n4\r\nJwt \r\na\r\nis missing\r\n0\r\n\r\n"
                .into(),
        )
    });
    assert_eq!(
        first_failure(envoy.addr, &[]),
        "[Connection 1] Connection failed: handshake failed: server answered 401 Unauthorized \
         (Server: envoy; Location: https://sso.example/): Jwt is missing"
    );
    // Our own server, on a path it does not serve.
    let server = TestServer::start(&[]);
    assert_eq!(
        first_failure(server.addr, &["--path", "/nope"]),
        "[Connection 1] Connection failed: handshake failed: server answered 404 Not Found: \
         not found"
    );
}

#[test]
fn a_refused_connect_is_logged_with_the_proxys_status_line_and_no_password() {
    let server = TestServer::start(&[]);
    let proxy = ConnectProxy::start(Tunnel::Refuse(
        "HTTP/1.1 407 Proxy Authentication Required\r\nServer: squid/5.7\r\n\
         Proxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 22\r\n\r\n\
         authentication needed\n",
    ));
    let client = start_client(
        Some(server.addr),
        &["--proxy", &proxy.url(Some("sre:hunter2"))],
        &[],
    );
    let line = client.wait_for("Connecting through the proxy", patience());
    assert_eq!(
        log_message(&line, "INFO", "main"),
        format!(
            "Connecting through the proxy http://{} (from --proxy)",
            proxy.addr
        )
    );
    let line = client.wait_for("Connection failed:", patience());
    assert_eq!(
        log_message(&line, "WARN", "client-1"),
        format!(
            "[Connection 1] Connection failed: proxy http://{}: CONNECT {} answered 407 Proxy \
             Authentication Required (Server: squid/5.7): authentication needed",
            proxy.addr, server.addr
        )
    );
    assert!(!client.output().contains("hunter2"), "{}", client.output());
}

#[test]
fn proxy_variables_are_read_as_curl_reads_them() {
    let pki = Pki::new("proxy-env");
    let pair = pki.issue("server", &["localhost", "127.0.0.1"], Use::Server);
    let (cert, key, ca) = (
        pair.cert.to_str().unwrap(),
        pair.key.to_str().unwrap(),
        pki.ca.to_str().unwrap(),
    );
    let wss = TestServer::start(&["--tls-cert", cert, "--tls-key", key]);
    let ws = TestServer::start(&[]);
    let proxy = ConnectProxy::start(Tunnel::AsAsked);
    let (_reserved, nowhere) = support::refusing_addr();
    let (proxy_url, nowhere) = (proxy.url(None), format!("http://{nowhere}"));
    let tls = ["--tls", "--ca-file", ca];
    // The server, the flags, the environment, and the proxy's source if it is used.
    type Case<'a> = (
        &'a TestServer,
        &'a [&'a str],
        &'a [(&'a str, &'a str)],
        Option<&'a str>,
    );
    let cases: [Case; 5] = [
        // wss:// reads HTTPS_PROXY, lower case first; ws:// reads HTTP_PROXY.
        (
            &wss,
            &tls,
            &[("HTTPS_PROXY", &proxy_url)],
            Some("from HTTPS_PROXY"),
        ),
        (
            &wss,
            &tls,
            &[("https_proxy", &proxy_url), ("HTTPS_PROXY", &nowhere)],
            Some("from https_proxy"),
        ),
        (
            &ws,
            &[],
            &[("HTTP_PROXY", &proxy_url), ("HTTPS_PROXY", &nowhere)],
            Some("from HTTP_PROXY"),
        ),
        // NO_PROXY, and the other scheme's variable, leave the proxy out.
        (
            &wss,
            &tls,
            &[
                ("HTTPS_PROXY", &nowhere),
                ("NO_PROXY", ".example.com, 127.0.0.1"),
            ],
            None,
        ),
        (&wss, &tls, &[("HTTP_PROXY", &nowhere)], None),
    ];
    for (server, flags, env, through) in cases {
        let before = proxy.requests().len();
        let client = start_client(Some(server.addr), flags, env);
        wait_for_connections(server, &client, 1);
        match through {
            Some(source) => {
                client.wait_for(&format!("{proxy_url} ({source})"), patience());
                assert!(proxy.requests().len() > before, "{env:?}");
            }
            None => assert_eq!(proxy.requests().len(), before, "{env:?}"),
        }
        if env.iter().any(|(name, _)| *name == "NO_PROXY") {
            client.wait_for(
                "Not using the proxy from HTTPS_PROXY: 127.0.0.1 matches NO_PROXY",
                patience(),
            );
        }
        drop(client);
        server.wait_settled(0);
    }
    // A proxy variable the client cannot use stops it at start, named, the URL not shown.
    let (code, output) = run_client(&["--tls"], &[("HTTPS_PROXY", "socks5://u:hunter2@p:1080")]);
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("cannot use the proxy in HTTPS_PROXY: "),
        "{output}"
    );
    assert!(!output.contains("hunter2"), "{output}");
}

#[test]
fn headers_and_subprotocols_from_the_environment_and_the_picked_one_in_the_log() {
    let recorder = Recorder::start(|_, _| Answer::Hold("Sec-WebSocket-Protocol: chat\r\n".into()));
    let client = start_client(
        Some(recorder.addr),
        // The held connection never answers pings: nothing may end it before its status line.
        &["--pong-timeout", "1h"],
        &[
            ("WEBSOCKET_TEST_HEADER", "X-A: 1\nX-B: two words\n"),
            ("WEBSOCKET_TEST_SUBPROTOCOL", "chat,superchat"),
            ("WEBSOCKET_TEST_ORIGIN", "https://app.example.com"),
        ],
    );
    let url = format!("ws://{}/ws (subprotocol: chat)", recorder.addr);
    let line = client.wait_for("Connected to", patience());
    assert_eq!(
        log_message(&line, "INFO", "client-1"),
        format!("[Connection 1] Connected to {url}")
    );
    let line = client.wait_for("Connection status:", patience());
    assert!(
        log_message(&line, "INFO", "client-1").starts_with(&format!(
            "[Connection 1] Connection status: CONNECTED to {url} (up "
        )),
        "{line}"
    );
    let request = recorder.requests().swap_remove(0);
    assert_eq!(request.header("X-A"), "1");
    assert_eq!(request.header("X-B"), "two words");
    assert_eq!(request.header("Sec-WebSocket-Protocol"), "chat, superchat");
    assert_eq!(request.header("Origin"), "https://app.example.com");
}

#[test]
fn tokens_are_sent_but_never_logged() {
    const FIRST: &str = "first-Zm9vYmFy";
    const SECOND: &str = "second-YmF6cXV4";
    let recorder = Recorder::start(|_, _| Answer::Upgrade(String::new()));
    let pki = Pki::new("token-log"); // only for its directory
    let file = pki.path("token");
    std::fs::write(&file, format!("{FIRST}\n")).unwrap();
    let client = start_client(
        Some(recorder.addr),
        &[
            "--auth-token-file",
            file.to_str().unwrap(),
            "--log-level",
            "trace",
        ],
        &[],
    );
    client.wait_for_nth("Connected to", 2, patience());
    std::fs::write(pki.path("next"), SECOND).unwrap();
    std::fs::rename(pki.path("next"), &file).unwrap();
    support::wait_until("the rotated token arrives", || {
        recorder
            .requests()
            .iter()
            .any(|r| r.header("Authorization") == format!("Bearer {SECOND}"))
    });
    // A token file that vanishes keeps the last token, and says so without it.
    std::fs::remove_file(&file).unwrap();
    let line = client.wait_for("cannot read the token file", patience());
    assert!(line.contains("sending the token read before"), "{line}");
    let n = recorder.requests().len();
    let requests = recorder.wait_for(n + 1, patience());
    assert_eq!(
        requests[n].header("Authorization"),
        format!("Bearer {SECOND}")
    );
    let output = client.output();
    assert!(
        !output.contains(FIRST) && !output.contains(SECOND),
        "{output}"
    );

    // From the environment: not in --help, not in an error.
    let (code, output) = run_client(&["--help"], &[("WEBSOCKET_TEST_AUTH_TOKEN", SECOND)]);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("WEBSOCKET_TEST_AUTH_TOKEN"), "{output}");
    assert!(!output.contains(SECOND), "{output}");
    let bad = format!("{SECOND} {FIRST}");
    let (code, output) = run_client(&[], &[("WEBSOCKET_TEST_AUTH_TOKEN", &bad)]);
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("WEBSOCKET_TEST_AUTH_TOKEN"), "{output}");
    assert!(
        !output.contains(SECOND) && !output.contains(FIRST),
        "{output}"
    );
}
