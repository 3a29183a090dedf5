//! The `server` binary end to end: echo, control frames, the close handshake, the
//! connection gauge, HTTP answers, size limits, graceful shutdown, thread names, flags and
//! environment twins. Every test runs its own server on free loopback ports.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::CloseFrame;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Error as WsError, Message};

use crate::support::{self, raw_upgrade, Proc, Server, Ws, PATIENCE, SAMPLE_KEY};

// ----------------------------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------------------------

/// The client's local port: the server logs peers as `127.0.0.1:PORT`.
fn local_port(ws: &Ws) -> u16 {
    let MaybeTlsStream::Plain(tcp) = ws.get_ref() else {
        panic!("tests use plain TCP")
    };
    tcp.local_addr().unwrap().port()
}

/// `n` bytes of valid UTF-8 mixing 1- to 4-byte characters (period 104 characters, so
/// not aligned with any power-of-two buffer size).
fn text_payload(n: usize) -> String {
    const CHARS: [char; 8] = ['a', 'é', '€', '😀', 'Z', 'ß', '中', '\n'];
    let mut text = String::with_capacity(n);
    for i in 0.. {
        let c = CHARS[(i * 7 + i / 13) % CHARS.len()];
        if text.len() + c.len_utf8() > n {
            break;
        }
        text.push(c);
    }
    while text.len() < n {
        text.push('.');
    }
    text
}

/// `n` bytes covering every byte value (for n >= 256), not repeating with period 256.
fn binary_payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8).collect()
}

/// Sends a text and a binary message and checks both come back byte-exact, typed right.
fn assert_echo(ws: &mut Ws, size: usize) {
    let text = text_payload(size);
    assert_eq!(text.len(), size);
    ws.send(Message::text(text.clone())).unwrap();
    match ws.read().unwrap() {
        Message::Text(echo) => assert!(
            echo.as_str() == text,
            "text echo of {size} bytes differs ({} bytes back)",
            echo.len()
        ),
        other => panic!("sent {size} bytes of text, got {}", describe(&other)),
    }
    let binary = binary_payload(size);
    ws.send(Message::binary(binary.clone())).unwrap();
    match ws.read().unwrap() {
        Message::Binary(echo) => assert!(
            echo[..] == binary[..],
            "binary echo of {size} bytes differs ({} bytes back)",
            echo.len()
        ),
        other => panic!("sent {size} bytes of binary, got {}", describe(&other)),
    }
}

fn describe(message: &Message) -> String {
    match message {
        Message::Text(t) => format!("Text({} bytes)", t.len()),
        Message::Binary(b) => format!("Binary({} bytes)", b.len()),
        other => format!("{other:?}"),
    }
}

/// Reads until a Close frame arrives and returns it (tungstenite queues the reply).
fn read_close(ws: &mut Ws) -> CloseFrame {
    match ws.read() {
        Ok(Message::Close(Some(frame))) => frame,
        Ok(other) => panic!("expected a Close frame, got {}", describe(&other)),
        Err(error) => panic!("expected a Close frame, got error {error}"),
    }
}

/// After the close handshake, the next read sends any queued reply and sees the server's EOF.
fn assert_closed(ws: &mut Ws) {
    match ws.read() {
        Err(WsError::ConnectionClosed) => {}
        Ok(message) => panic!("expected the connection to end, got {}", describe(&message)),
        Err(error) => panic!("expected ConnectionClosed, got error {error}"),
    }
}

/// Closes from the client side with 1000 and waits for the handshake to finish.
fn close_normally(mut ws: Ws) {
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
    .unwrap();
    let frame = read_close(&mut ws);
    assert_eq!(frame.code, CloseCode::Normal);
    assert_closed(&mut ws);
}

/// Connects to `url`, checks one echo and closes cleanly: the server still works.
fn assert_serves(url: &str) {
    let mut ws = support::connect(url);
    assert_echo(&mut ws, 17);
    close_normally(ws);
}

/// A final client frame with `opcode`, masked or not.
fn client_frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask = masked.then_some(support::FRAME_MASK);
    support::encode_frame(0x80 | opcode, payload, mask, None)
}

/// Reads one server frame: (first header byte, payload).
fn read_server_frame(tcp: &mut TcpStream) -> (u8, Vec<u8>) {
    support::read_frame(tcp).unwrap()
}

/// The names of the threads of process `pid`.
fn thread_names(pid: u32) -> BTreeSet<String> {
    support::thread_names(pid).into_iter().collect()
}

/// The body of an HTTP response.
fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// How a short-lived server run ended.
struct Exit {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs the server binary to completion with separate stdout and stderr (it must exit
/// by itself within [`PATIENCE`]).
fn run_server(args: &[&str], env: &[(&str, &str)]) -> Exit {
    fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_server"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "server {args:?} {env:?} did not exit within {PATIENCE:?}; stdout:\n{}\nstderr:\n{}",
                stdout.join().unwrap(),
                stderr.join().unwrap()
            );
        }
        thread::sleep(Duration::from_millis(5));
    };
    Exit {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

// ----------------------------------------------------------------------------------------
// 1. Echo
// ----------------------------------------------------------------------------------------

#[test]
fn echoes_text_and_binary_byte_exact_with_their_type() {
    let server = Server::start(&[]);
    let mut ws = server.connect();
    // 125/126: 7-bit vs 16-bit length; 65535/65536: 16-bit vs 64-bit length.
    for size in [0, 1, 125, 126, 65535, 64 << 10, 1 << 20] {
        assert_echo(&mut ws, size);
    }
    close_normally(ws);
}

// ----------------------------------------------------------------------------------------
// 2. Ping / pong
// ----------------------------------------------------------------------------------------

#[test]
fn ping_is_answered_with_a_pong_carrying_the_same_payload() {
    let server = Server::start(&[]);
    let mut ws = server.connect();
    for payload in [Vec::new(), b"are you there?".to_vec(), binary_payload(125)] {
        ws.send(Message::Ping(payload.clone().into())).unwrap();
        match ws.read().unwrap() {
            Message::Pong(pong) => assert_eq!(pong[..], payload[..]),
            other => panic!(
                "expected a pong for a {}-byte ping, got {}",
                payload.len(),
                describe(&other)
            ),
        }
    }
    // An unsolicited pong is not answered and not echoed: the next frame is the text echo.
    ws.send(Message::Pong(b"unsolicited".to_vec().into()))
        .unwrap();
    ws.send(Message::text("after the pong")).unwrap();
    match ws.read().unwrap() {
        Message::Text(text) => assert_eq!(text.as_str(), "after the pong"),
        other => panic!("expected the text echo, got {}", describe(&other)),
    }
    close_normally(ws);
}

// ----------------------------------------------------------------------------------------
// 3. Close handshake
// ----------------------------------------------------------------------------------------

#[test]
fn close_handshake_is_answered_and_logged() {
    let server = Server::start(&[]);
    let mut ws = server.connect();
    let port = local_port(&ws);
    server
        .proc
        .wait_for(&format!("Connected: 127.0.0.1:{port}"), PATIENCE);
    server.wait_for_gauge(1);

    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "test over".into(),
    }))
    .unwrap();
    let reply = read_close(&mut ws);
    assert_eq!(reply.code, CloseCode::Normal);
    assert_eq!(reply.reason.as_str(), "test over");
    assert_closed(&mut ws);

    let line = server
        .proc
        .wait_for(&format!("Disconnected: 127.0.0.1:{port} "), PATIENCE);
    assert!(
        line.contains(&format!(
            "Disconnected: 127.0.0.1:{port} (close 1000 \"test over\""
        )),
        "{line}"
    );
    server.wait_for_gauge(0);
}

// ----------------------------------------------------------------------------------------
// 4. The connection gauge
// ----------------------------------------------------------------------------------------

#[test]
fn connection_gauge_follows_opens_and_closes() {
    let server = Server::start(&["--log-interval", "100ms"]);
    assert_eq!(server.metric("websocket_connections"), 0.0);
    assert_eq!(server.metric("websocket_connections_total"), 0.0);

    let mut clients = Vec::new();
    for n in 1..=5 {
        clients.push(server.connect());
        server.wait_for_gauge(n);
        // The counter is bumped just after the gauge, outside the registry lock.
        support::wait_until(&format!("websocket_connections_total is {n}"), || {
            server.metric("websocket_connections_total") == n as f64
        });
        server
            .proc
            .wait_for_nth("Connected: 127.0.0.1:", n as usize, PATIENCE);
    }
    server.proc.wait_for("Active connections: 5", PATIENCE);

    let zeros = server.proc.count("Active connections: 0");
    for n in (0..5).rev() {
        close_normally(clients.pop().unwrap());
        server.wait_for_gauge(n);
    }
    assert_eq!(server.metric("websocket_connections_total"), 5.0);
    assert_eq!(server.proc.count("Connected: 127.0.0.1:"), 5);
    server
        .proc
        .wait_for_nth("Disconnected: 127.0.0.1:", 5, PATIENCE);
    server
        .proc
        .wait_for_nth("Active connections: 0", zeros + 1, PATIENCE);
}

#[test]
fn abrupt_disconnects_release_the_connection() {
    let server = Server::start(&[]);

    // A reset: close the socket while the echo sits unread in its receive buffer, which
    // makes Linux send RST instead of FIN.
    let mut tcp = raw_upgrade(server.addr);
    let port = tcp.local_addr().unwrap().port();
    server.wait_for_gauge(1);
    let payload = b"never read";
    tcp.write_all(&client_frame(0x2, payload, true)).unwrap();
    let expected = [&[0x82, payload.len() as u8][..], payload].concat();
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + PATIENCE;
    while tcp.peek(&mut buf).unwrap() < expected.len() {
        assert!(Instant::now() < deadline, "the echo did not arrive");
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(buf[..expected.len()], expected[..]);
    drop(tcp);
    let line = server
        .proc
        .wait_for(&format!("Disconnected: 127.0.0.1:{port} "), PATIENCE);
    assert!(line.contains("reset"), "expected a reset: {line}");
    server.wait_for_gauge(0);

    // A FIN without a Close frame.
    let mut ws = server.connect();
    let port = local_port(&ws);
    assert_echo(&mut ws, 10);
    server.wait_for_gauge(1);
    drop(ws);
    let line = server
        .proc
        .wait_for(&format!("Disconnected: 127.0.0.1:{port} "), PATIENCE);
    assert!(line.contains("without a close frame"), "{line}");
    server.wait_for_gauge(0);
    assert_eq!(server.metric("websocket_connections_total"), 2.0);
}

// ----------------------------------------------------------------------------------------
// 5. Plain HTTP on the WebSocket port
// ----------------------------------------------------------------------------------------

#[test]
fn http_requests_get_the_right_status_and_leave_the_server_working() {
    let server = Server::start(&[]);
    let url = server.url();
    let exchange = |request: &str| support::raw_exchange(server.addr, request.as_bytes());

    let (status, response) = support::http_get(server.addr, "/");
    assert_eq!(status, 200, "{response}");
    assert_eq!(body(&response), "ok\n");
    assert_serves(&url);

    let response = exchange("HEAD / HTTP/1.1\r\nHost: test\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    assert_eq!(body(&response), "", "HEAD must have no body");

    let (status, response) = support::http_get(server.addr, "/nope");
    assert_eq!(status, 404, "{response}");
    assert_serves(&url);

    let (status, response) = support::http_get(server.addr, "/ws");
    assert_eq!(status, 400, "{response}");
    let reason = body(&response);
    assert!(
        reason.ends_with('\n') && reason.trim_end().lines().count() == 1,
        "one-line reason expected: {reason:?}"
    );
    assert!(
        reason.contains("Upgrade"),
        "the reason should name the missing header: {reason:?}"
    );
    assert_serves(&url);

    let response = exchange("POST /ws HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 405 "), "{response}");
    assert!(response.contains("\r\nAllow: GET\r\n"), "{response}");
    assert_serves(&url);

    let response = exchange("GET /ws HTTP/1.0\r\nHost: test\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 505 "), "{response}");
    assert_serves(&url);

    let response = exchange(&format!(
        "GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {SAMPLE_KEY}\r\nSec-WebSocket-Version: 8\r\n\r\n"
    ));
    assert!(response.starts_with("HTTP/1.1 426 "), "{response}");
    assert!(
        response.contains("\r\nSec-WebSocket-Version: 13\r\n"),
        "{response}"
    );
    assert_serves(&url);

    // 400, 405, 505 and 426 on /ws plus the 404 count as failed handshakes; the 200s do not.
    assert_eq!(server.metric("websocket_handshake_failures_total"), 5.0);
    assert_eq!(server.metric("websocket_connections_total"), 6.0);
    server.wait_for_gauge(0);
}

// ----------------------------------------------------------------------------------------
// 6. Size limits and protocol violations
// ----------------------------------------------------------------------------------------

#[test]
fn oversized_messages_get_close_1009_and_spare_other_connections() {
    let server = Server::start(&["--max-message-size", "1KiB", "--max-frame-size", "1KiB"]);
    let mut bystander = server.connect();
    let mut big = server.connect();
    let mut fragmented = server.connect();
    server.wait_for_gauge(3);

    // Exactly at the limit is fine.
    assert_echo(&mut big, 1024);

    // One frame over the limit.
    let port = local_port(&big);
    big.send(Message::binary(binary_payload(2048))).unwrap();
    let frame = read_close(&mut big);
    assert_eq!(frame.code, CloseCode::Size, "{frame:?}");
    assert_closed(&mut big);
    drop(big);
    let line = server
        .proc
        .wait_for(&format!("Disconnected: 127.0.0.1:{port} "), PATIENCE);
    assert!(line.contains("sent close 1009"), "{line}");
    server.wait_for_gauge(2);

    // Frames under the frame limit that add up to a message over the message limit.
    let port = local_port(&fragmented);
    let part = vec![b'a'; 600];
    fragmented
        .write(Message::Frame(Frame::message(
            part.clone(),
            OpCode::Data(Data::Text),
            false,
        )))
        .unwrap();
    fragmented
        .write(Message::Frame(Frame::message(
            part,
            OpCode::Data(Data::Continue),
            true,
        )))
        .unwrap();
    fragmented.flush().unwrap();
    let frame = read_close(&mut fragmented);
    assert_eq!(frame.code, CloseCode::Size, "{frame:?}");
    assert_closed(&mut fragmented);
    drop(fragmented);
    let line = server
        .proc
        .wait_for(&format!("Disconnected: 127.0.0.1:{port} "), PATIENCE);
    assert!(line.contains("sent close 1009"), "{line}");
    server.wait_for_gauge(1);

    assert_echo(&mut bystander, 1024);
    close_normally(bystander);
    server.wait_for_gauge(0);
}

#[test]
fn protocol_violations_get_their_close_codes() {
    let server = Server::start(&[]);
    for (name, frame, code) in [
        (
            "invalid UTF-8 in a text frame",
            client_frame(0x1, &[b'o', b'k', 0xff, 0xfe], true),
            1007u16,
        ),
        (
            "an unmasked client frame",
            client_frame(0x2, b"abc", false),
            1002,
        ),
    ] {
        let mut tcp = raw_upgrade(server.addr);
        let port = tcp.local_addr().unwrap().port();
        tcp.write_all(&frame).unwrap();
        let (header, payload) = read_server_frame(&mut tcp);
        assert_eq!(header, 0x88, "{name}: expected a Close frame");
        assert!(payload.len() >= 2, "{name}: Close frame without a code");
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code, "{name}");
        drop(tcp);
        let line = server
            .proc
            .wait_for(&format!("Disconnected: 127.0.0.1:{port} "), PATIENCE);
        assert!(
            line.contains(&format!("sent close {code}")),
            "{name}: {line}"
        );
    }
    server.wait_for_gauge(0);
    assert_serves(&server.url());
}

// ----------------------------------------------------------------------------------------
// 7. Graceful shutdown
// ----------------------------------------------------------------------------------------

#[test]
fn sigterm_closes_every_connection_with_1001_and_exits_0() {
    let server = Server::start(&["--shutdown-timeout", "3s"]);
    let mut clients: Vec<Ws> = (0..3).map(|_| server.connect()).collect();
    server.wait_for_gauge(3);
    for ws in &mut clients {
        assert_echo(ws, 5);
    }

    let Server { mut proc, .. } = server;
    let start = Instant::now();
    proc.signal("TERM");
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
    let status = proc.wait_exit(Duration::from_millis(3000 + 1500));
    let elapsed = start.elapsed();
    let (_, output) = proc.finish(PATIENCE);
    assert!(status.success(), "exit status {status}; output:\n{output}");
    // Clients that answer let the server finish long before its shutdown timeout.
    assert!(
        elapsed < Duration::from_secs(3),
        "exit took {elapsed:?}; output:\n{output}"
    );
    assert!(
        output.contains("Shutting down: closing 3 connections"),
        "{output}"
    );
    assert_eq!(output.matches("sent close 1001").count(), 3, "{output}");
    assert!(!output.contains("did not close within"), "{output}");
    assert!(output.contains("Server stopped"), "{output}");
}

/// Regression: during shutdown `Server::run` once kept `registry.entries()`
/// (which hold every connection's socket) alive until it returns, so a connection whose
/// close handshake is complete is not closed (no FIN) while others are still draining.
#[test]
fn shutdown_ends_each_connection_once_its_close_handshake_is_done() {
    let server = Server::start(&["--shutdown-timeout", "2s"]);
    let mut prompt = server.connect();
    let _slow = server.connect();
    server.wait_for_gauge(2);

    let Server { proc, .. } = server;
    let start = Instant::now();
    proc.signal("TERM");
    assert_eq!(read_close(&mut prompt).code, CloseCode::Away);
    // Our reply completes the handshake; the server must then close the TCP connection
    // at once, not when the other client has answered or the shutdown timeout is over.
    assert_closed(&mut prompt);
    let elapsed = start.elapsed();
    assert!(
        elapsed < Duration::from_secs(1),
        "the connection ended only after {elapsed:?} (shutdown timeout 2s); output:\n{}",
        proc.output()
    );
}

#[test]
fn sigterm_with_a_silent_client_exits_after_the_shutdown_timeout() {
    let server = Server::start(&["--shutdown-timeout", "500ms"]);
    let mut silent = server.connect();
    server.wait_for_gauge(1);

    let Server {
        mut proc, metrics, ..
    } = server;
    let start = Instant::now();
    proc.signal("TERM");
    // While it waits for the client, the server tells load balancers it is not ready.
    support::wait_until("/readyz answers 503", || {
        support::http_get(metrics, "/readyz").0 == 503
    });
    let status = proc.wait_exit(Duration::from_millis(500 + 1500));
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(500),
        "exited after {elapsed:?}, before the shutdown timeout"
    );
    let (_, output) = proc.finish(PATIENCE);
    assert!(status.success(), "exit status {status}; output:\n{output}");
    assert!(
        output.contains("1 connection did not close within"),
        "{output}"
    );
    assert!(output.contains("Server stopped"), "{output}");

    // The Close frame did go out; it has been waiting in the client's receive buffer.
    let frame = read_close(&mut silent);
    assert_eq!(frame.code, CloseCode::Away);
}

/// Regression: a socket still in its opening handshake was once not in the
/// registry, so shutdown cannot close it, yet its thread holds the "all finished" channel:
/// the server idles for the whole shutdown timeout plus the 1 s abort grace, then exits
/// without saying why ("closing 0 connections").
#[test]
fn shutdown_does_not_wait_for_a_socket_that_never_sent_a_request() {
    let server = Server::start(&["--shutdown-timeout", "1s"]);
    let _mute = TcpStream::connect(server.addr).unwrap();
    let pid = server.proc.pid();
    support::wait_until("the mute socket has its thread", || {
        thread_names(pid).contains("conn-1")
    });

    let Server { mut proc, .. } = server;
    let start = Instant::now();
    proc.signal("TERM");
    let status = proc.wait_exit(PATIENCE);
    let elapsed = start.elapsed();
    let (_, output) = proc.finish(PATIENCE);
    assert!(status.success(), "exit status {status}; output:\n{output}");
    assert!(
        elapsed < Duration::from_millis(800),
        "exit took {elapsed:?} with no WebSocket connection open; output:\n{output}"
    );
}

// ----------------------------------------------------------------------------------------
// 8. Thread names
// ----------------------------------------------------------------------------------------

#[test]
fn every_connection_has_a_named_thread() {
    let server = Server::start(&[]);
    let pid = server.proc.pid();
    // A new thread names itself once it runs, so the workers may show as `server` briefly.
    for name in ["acceptor", "reporter", "metrics-http"] {
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
    server.wait_for_gauge(1);
    let names = thread_names(pid);
    assert!(names.contains("conn-1"), "no thread conn-1 in {names:?}");

    close_normally(ws);
    support::wait_until("thread conn-1 ends", || {
        !thread_names(pid).contains("conn-1")
    });

    let _ws = server.connect();
    server.wait_for_gauge(1);
    let names = thread_names(pid);
    assert!(names.contains("conn-2"), "no thread conn-2 in {names:?}");
}

// ----------------------------------------------------------------------------------------
// 9. Flags
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
fn help_lists_every_environment_variable_and_version_prints() {
    let help = run_server(&["--help"], &[]);
    assert!(help.status.success(), "{}", help.stderr);
    // Every `env = "..."` of ServerConfig, read from the source so new flags are covered too.
    let config = include_str!("../../src/config.rs");
    let server_config = &config[config.find("pub struct ServerConfig").unwrap()..];
    let server_config = &server_config[..server_config.find("\n}").unwrap()];
    let vars: Vec<&str> = server_config
        .split("env = \"")
        .skip(1)
        .map(|rest| &rest[..rest.find('"').unwrap()])
        .collect();
    for var in [
        "WEBSOCKET_TEST_HOST",
        "WEBSOCKET_TEST_PORT",
        "WEBSOCKET_TEST_PATH",
    ] {
        assert!(
            vars.contains(&var),
            "{var} not found in ServerConfig: {vars:?}"
        );
    }
    for var in &vars {
        let shown = format!("[env: {var}=");
        assert!(
            help.stdout.contains(&shown),
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

// ----------------------------------------------------------------------------------------
// 10. Environment twins
// ----------------------------------------------------------------------------------------

#[test]
fn path_comes_from_the_environment() {
    let server = Server::start_with_env(&[], &[("WEBSOCKET_TEST_PATH", "/echo")]);
    server
        .proc
        .wait_for(&format!("Listening on ws://{}/echo", server.addr), PATIENCE);
    assert_serves(&format!("ws://{}/echo", server.addr));
    assert_eq!(support::http_get(server.addr, "/ws").0, 404);
}

#[test]
fn a_flag_wins_over_its_environment_twin() {
    let server = Server::start_with_env(&["--path", "/flag"], &[("WEBSOCKET_TEST_PATH", "/echo")]);
    assert_serves(&format!("ws://{}/flag", server.addr));
    assert_eq!(support::http_get(server.addr, "/echo").0, 404);
}

#[test]
fn listen_address_interval_and_limits_come_from_the_environment() {
    let proc = Proc::start_with_env(
        "server",
        &[],
        &[
            ("WEBSOCKET_TEST_HOST", "127.0.0.1"),
            ("WEBSOCKET_TEST_PORT", "0"),
            ("WEBSOCKET_TEST_METRICS_PORT", "0"),
            ("WEBSOCKET_TEST_LOG_INTERVAL", "100ms"),
            ("WEBSOCKET_TEST_MAX_MESSAGE_SIZE", "1KiB"),
        ],
    );
    let addr = support::address_after(&proc.wait_for("Listening on ws://", PATIENCE), "ws://");
    let metrics = support::address_after(&proc.wait_for("Metrics on http://", PATIENCE), "http://");
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 3003);
    assert_ne!(metrics.port(), 9100);
    // The default interval is 30 s: this line would not come within PATIENCE.
    proc.wait_for("Active connections: 0", PATIENCE);

    let mut ws = support::connect(&format!("ws://{addr}/ws"));
    assert_echo(&mut ws, 1024);
    ws.send(Message::binary(binary_payload(1025))).unwrap();
    assert_eq!(read_close(&mut ws).code, CloseCode::Size);
}

#[test]
fn a_bad_environment_value_exits_2() {
    let exit = run_server(
        &["--host", "127.0.0.1", "--metrics-port", "0"],
        &[("WEBSOCKET_TEST_PORT", "notaport")],
    );
    assert_eq!(exit.status.code(), Some(2), "stderr:\n{}", exit.stderr);
    assert!(exit.stderr.contains("notaport"), "{}", exit.stderr);
}

#[test]
fn drain_delay_keeps_serving_with_readiness_off_before_closing() {
    let server = Server::start(&["--drain-delay", "600ms", "--shutdown-timeout", "2s"]);
    let mut ws = server.connect();
    assert_eq!(support::http_get(server.metrics, "/readyz").0, 200);
    let start = Instant::now();
    server.proc.signal("TERM");
    support::wait_until("/readyz answers 503", || {
        support::http_get(server.metrics, "/readyz").0 == 503
    });
    // While draining, the old connection still echoes and a new one is still accepted.
    assert_echo(&mut ws, 100);
    let mut late = server.connect();
    assert_echo(&mut late, 10);
    assert!(
        start.elapsed() < Duration::from_millis(600),
        "the checks outlasted the drain delay; make it longer"
    );
    for mut ws in [ws, late] {
        let frame = read_close(&mut ws);
        assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
        assert!(
            start.elapsed() >= Duration::from_millis(600),
            "closed after {:?}, before the drain delay",
            start.elapsed()
        );
        assert_closed(&mut ws);
    }
    let Server { proc, .. } = server;
    let (status, output) = proc.finish(PATIENCE);
    assert!(status.success(), "exit status {status}; output:\n{output}");
    assert!(output.contains("Draining: /readyz answers 503"), "{output}");
}

// ----------------------------------------------------------------------------------------
// In process
// ----------------------------------------------------------------------------------------

#[test]
fn in_process_close_handshake_is_counted_by_reason_and_code() {
    use crate::harness::TestServer;
    let server = TestServer::start(&[]);
    let mut ws = server.connect();
    server.wait_settled(1);
    support::assert_echo(&mut ws, 100);
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "test over".into(),
    }))
    .unwrap();
    assert_eq!(support::read_close(&mut ws).reason.as_str(), "test over");
    support::assert_closed(&mut ws);
    server.wait_settled(0);
    assert_eq!(server.closed("peer_close", "1000"), 1.0);
    assert_eq!(server.metric("websocket_connections_total"), 1.0);
}
