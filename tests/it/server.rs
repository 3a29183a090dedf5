//! The server in this process: echo, control frames, the close handshake, the connection
//! gauge and close counters, HTTP answers, size limits, graceful shutdown and the drain
//! delay. Every test runs its own [`TestServer`] on free loopback ports and waits on its
//! state (registry, threads, metrics) and on what its clients see, never on log lines.
//! What only a process shows (signals, exit codes, flags, thread names, the log format) is
//! in `server_process.rs`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Error as WsError, Message};

use websocket_test::ending::Reason;

use crate::harness::TestServer;
use crate::support::{
    self, assert_closed, assert_echo, assert_serves, binary_payload, close_normally, describe,
    patience, read_close, scaled, Ws, SAMPLE_KEY, TIMER_SLACK,
};

/// After the shutdown timeout, how long the server waits for the connections it aborted
/// (`ABORT_GRACE` in src/server/mod.rs).
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// The body of an HTTP response.
fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// Waits (up to [`patience`]) until the server ends the TCP connection after the close
/// handshake.
fn assert_ended(ws: &mut Ws, what: &str) {
    match ws.read() {
        Err(WsError::ConnectionClosed) => {}
        Err(WsError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            panic!("{what}: the connection stayed open for {:?}", patience())
        }
        Ok(message) => panic!("{what}: expected the end, got {}", describe(&message)),
        Err(error) => panic!("{what}: expected the end, got error {error}"),
    }
}

// ----------------------------------------------------------------------------------------
// Echo and control frames
// ----------------------------------------------------------------------------------------

#[test]
fn echoes_text_and_binary_byte_exact_with_their_type() {
    let server = TestServer::start(&[]);
    let mut ws = server.connect();
    // 125/126: 7-bit vs 16-bit length; 65535/65536: 16-bit vs 64-bit length.
    for size in [0, 1, 125, 126, 65535, 64 << 10, 1 << 20] {
        assert_echo(&mut ws, size);
    }
    close_normally(ws);
    server.wait_settled(0);
    assert_eq!(server.closed("peer_close", "1000"), 1.0);
}

#[test]
fn ping_is_answered_with_a_pong_carrying_the_same_payload() {
    let server = TestServer::start(&[]);
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
    server.wait_settled(0);
}

// ----------------------------------------------------------------------------------------
// The close handshake, the gauge and the close counters
// ----------------------------------------------------------------------------------------

#[test]
fn the_close_handshake_is_answered_and_counted_by_its_code() {
    let server = TestServer::start(&[]);
    let frame = |code, reason: &str| {
        Some(CloseFrame {
            code,
            reason: reason.into(),
        })
    };
    // (the client's Close, the `code` label it is counted under)
    let cases = [
        (frame(CloseCode::Normal, "test over"), "1000"),
        (frame(CloseCode::Away, ""), "1001"),
        (frame(CloseCode::Library(4000), "custom"), "4000"),
        (None, "none"),
    ];
    for (sent, label) in &cases {
        let mut ws = server.connect();
        server.wait_settled(1);
        assert_echo(&mut ws, 100);
        ws.close(sent.clone()).unwrap();
        // The reply carries the same code and reason (none for a Close without a code).
        match support::read_skipping_pings(&mut ws) {
            Ok(Message::Close(reply)) => assert_eq!(&reply, sent, "reply to {sent:?}"),
            other => panic!("expected the reply to {sent:?}, got {other:?}"),
        }
        assert_closed(&mut ws);
        server.wait_settled(0);
        assert_eq!(server.closed("peer_close", label), 1.0, "{sent:?}");
    }
    assert_eq!(
        server.metric("websocket_connections_opened_total"),
        cases.len() as f64
    );
}

#[test]
fn the_gauge_and_the_counters_follow_opens_and_closes() {
    let server = TestServer::start(&[]);
    assert_eq!(server.metric("websocket_connections"), 0.0);
    assert_eq!(server.metric("websocket_connections_opened_total"), 0.0);

    let mut clients = Vec::new();
    for n in 1..=5 {
        clients.push(server.connect());
        server.wait_settled(n);
        // The counter is bumped just after the gauge, outside the registry lock.
        support::wait_until(&format!("websocket_connections_total is {n}"), || {
            server.metric("websocket_connections_opened_total") == n as f64
        });
    }
    for n in (0..5).rev() {
        close_normally(clients.pop().unwrap());
        server.wait_settled(n);
        assert_eq!(server.closed("peer_close", "1000"), (5 - n) as f64);
    }
    assert_eq!(server.metric("websocket_connections_opened_total"), 5.0);
}

#[test]
fn abrupt_disconnects_are_counted_as_reset_and_eof() {
    let server = TestServer::start(&[]);

    // A reset: close the socket while the echo sits unread in its receive buffer, which
    // makes Linux send RST instead of FIN.
    let mut tcp = support::raw_upgrade(server.addr);
    server.wait_settled(1);
    let payload = b"never read";
    tcp.write_all(&support::masked_frame(0x82, payload))
        .unwrap();
    let expected = [&[0x82, payload.len() as u8][..], payload].concat();
    support::wait_for_buffered(&tcp, "the echo", |bytes| bytes.len() >= expected.len());
    let mut buf = [0u8; 64];
    let n = tcp.peek(&mut buf).unwrap();
    assert_eq!(buf[..n], expected[..]);
    drop(tcp);
    server.wait_settled(0);
    assert_eq!(server.closed("reset", "none"), 1.0);

    // A FIN without a Close frame.
    let mut ws = server.connect();
    assert_echo(&mut ws, 10);
    drop(ws);
    server.wait_settled(0);
    assert_eq!(server.closed("eof", "none"), 1.0);
    assert_eq!(server.closed("reset", "none"), 1.0);
    assert_eq!(server.metric("websocket_connections_opened_total"), 2.0);
}

// ----------------------------------------------------------------------------------------
// Plain HTTP on the WebSocket port
// ----------------------------------------------------------------------------------------

#[test]
fn http_requests_get_the_right_status_and_leave_the_server_working() {
    let server = TestServer::start(&[]);
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

    server.wait_settled(0);
    // 400, 405, 505 and 426 on /ws plus the 404 count as failed handshakes; the 200s do not.
    assert_eq!(server.handshake_failures(), 5.0);
    assert_eq!(server.metric("websocket_connections_opened_total"), 6.0);
    assert_eq!(server.closed("peer_close", "1000"), 6.0);
}

// ----------------------------------------------------------------------------------------
// Size limits (protocol violations are in hostile.rs)
// ----------------------------------------------------------------------------------------

#[test]
fn oversized_messages_get_close_1009_and_spare_other_connections() {
    let server = TestServer::start(&["--max-message-size", "1KiB", "--max-frame-size", "1KiB"]);
    let mut bystander = server.connect();
    let mut big = server.connect();
    let mut fragmented = server.connect();
    server.wait_settled(3);

    // Exactly at the limit is fine.
    assert_echo(&mut big, 1024);

    // One frame over the limit.
    big.send(Message::binary(binary_payload(2048))).unwrap();
    let frame = read_close(&mut big);
    assert_eq!(frame.code, CloseCode::Size, "{frame:?}");
    assert_closed(&mut big);
    drop(big);
    server.wait_settled(2);
    assert_eq!(server.closed("too_big", "1009"), 1.0);

    // Frames under the frame limit that add up to a message over the message limit.
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
    server.wait_settled(1);
    assert_eq!(server.closed("too_big", "1009"), 2.0);

    assert_echo(&mut bystander, 1024);
    close_normally(bystander);
    server.wait_settled(0);
    assert_eq!(server.closed("peer_close", "1000"), 1.0);
}

// ----------------------------------------------------------------------------------------
// Graceful shutdown
// ----------------------------------------------------------------------------------------

/// The shutdown timeout of tests that check shutdown does *not* wait for something: far
/// beyond [`patience`], so waiting for it cannot pass for a slow machine.
const LONG_SHUTDOWN: [&str; 2] = ["--shutdown-timeout", "30s"];

#[test]
fn shutdown_closes_every_connection_with_1001_and_returns_once_they_answer() {
    let mut server = TestServer::start(&LONG_SHUTDOWN);
    let mut clients: Vec<Ws> = (0..3).map(|_| server.connect()).collect();
    server.wait_settled(3);
    for ws in &mut clients {
        assert_echo(ws, 5);
    }

    server.shut_down();
    // Every client answers on its own thread, as independent clients would.
    let clients: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            thread::spawn(move || {
                let frame = read_close(&mut ws);
                assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
                assert_eq!(frame.reason.as_str(), "server shutting down");
                assert_ended(&mut ws, "a client that answered");
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    // Clients that answer let `run` return long before the 30 s shutdown timeout.
    server.wait_stopped(Duration::from_secs(10));
    let state = server.state();
    assert_eq!(
        (
            state.connections(),
            state.handshakes(),
            state.connection_threads()
        ),
        (0, 0, 0)
    );
    assert_eq!(state.closed(Reason::Shutdown, Some(1001)), 3);
}

/// Regression: during shutdown `Server::run` once kept `registry.entries()` (which hold
/// every connection's socket) alive until it returned, so a connection whose close
/// handshake was complete was not closed (no FIN) while others were still draining.
#[test]
fn shutdown_ends_each_connection_once_its_close_handshake_is_done() {
    let mut server = TestServer::start(&LONG_SHUTDOWN);
    let mut prompt = server.connect();
    let mut slow = server.connect();
    server.wait_settled(2);

    server.shut_down();
    assert_eq!(read_close(&mut prompt).code, CloseCode::Away);
    // Our reply completes the handshake; the server must then close the TCP connection
    // at once, not when the other client has answered or the shutdown timeout is over.
    assert_ended(&mut prompt, "the prompt client");
    assert_eq!(server.closed("shutdown", "1001"), 1.0);
    assert_eq!(server.state().connections(), 1);

    assert_eq!(read_close(&mut slow).code, CloseCode::Away);
    assert_ended(&mut slow, "the slow client");
    server.wait_stopped(Duration::from_secs(10));
}

#[test]
fn a_silent_client_holds_shutdown_for_the_shutdown_timeout_with_readyz_503() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let mut server = TestServer::start(&["--shutdown-timeout", "1s"]);
    let mut silent = server.connect();
    server.wait_settled(1);
    assert_eq!(support::http_get(server.metrics, "/readyz").0, 200);

    server.shut_down();
    // While it waits for the client, the server tells load balancers it is not ready.
    support::wait_until("/readyz answers 503", || {
        support::http_get(server.metrics, "/readyz").0 == 503
    });
    let took = server.wait_stopped(TIMEOUT + ABORT_GRACE + Duration::from_secs(3));
    assert!(
        took >= TIMEOUT - TIMER_SLACK,
        "run returned {took:?} after the shutdown request, before the {TIMEOUT:?} timeout"
    );
    // The connection it gave up on is gone, thread and all.
    let state = server.state();
    support::wait_until("the aborted connection's thread ends", || {
        state.connections() == 0 && state.connection_threads() == 0
    });
    // Given up on, it still ended for the shutdown, with the 1001 we sent.
    assert_eq!(state.closed(Reason::Shutdown, Some(1001)), 1);
    // The Close frame did go out; it has been waiting in the client's receive buffer.
    assert_eq!(read_close(&mut silent).code, CloseCode::Away);
}

/// Regression: a socket still in its opening handshake was once not in the registry, so
/// shutdown could not close it, yet its thread held the "all finished" channel: the server
/// idled for the whole shutdown timeout plus the abort grace.
#[test]
fn shutdown_does_not_wait_for_a_socket_that_never_sent_a_request() {
    // Neither timeout may be what ends the socket.
    let mut server =
        TestServer::start(&["--shutdown-timeout", "30s", "--handshake-timeout", "30s"]);
    let mut mute = TcpStream::connect(server.addr).unwrap();
    support::wait_until("the mute socket is in its handshake", || {
        server.state().handshakes() == 1
    });

    server.shut_down();
    server.wait_stopped(Duration::from_secs(10));
    let state = server.state();
    assert_eq!((state.handshakes(), state.connection_threads()), (0, 0));
    // The server shut the socket down: it ends without an answer.
    mute.set_read_timeout(Some(patience())).unwrap();
    assert_eq!(mute.read(&mut [0u8; 64]).unwrap(), 0, "expected EOF");
}

#[test]
fn drain_delay_keeps_serving_live_connections_and_turns_new_ones_away_before_closing() {
    // Long enough for the checks below even on a slow machine; it is a lower bound only.
    let drain = scaled(Duration::from_secs(2));
    let drain_flag = format!("{}ms", drain.as_millis());
    let mut server =
        TestServer::start(&[&LONG_SHUTDOWN[..], &["--drain-delay", &drain_flag]].concat());
    let mut ws = server.connect();
    assert_eq!(support::http_get(server.metrics, "/readyz").0, 200);

    let start = Instant::now();
    server.shut_down();
    support::wait_until("/readyz answers 503", || {
        support::http_get(server.metrics, "/readyz").0 == 503
    });
    // While draining, the old connection still echoes; a new upgrade and the health check
    // are told to go elsewhere.
    assert_echo(&mut ws, 100);
    let (status, response) = support::http_get(server.addr, "/");
    assert_eq!(status, 503, "{response}");
    let refused = support::raw_exchange(server.addr, support::upgrade_request().as_bytes());
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
    assert!(refused.contains("\r\nRetry-After: "), "{refused}");
    assert!(
        start.elapsed() < drain,
        "the checks took {:?}, longer than the drain delay {drain:?}: they proved nothing \
         (raise WEBSOCKET_TEST_TIME_SCALE)",
        start.elapsed()
    );
    {
        let frame = read_close(&mut ws);
        assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
        let closed = start.elapsed();
        assert!(
            closed >= drain - TIMER_SLACK,
            "closed {closed:?} after the shutdown request, before the {drain:?} drain delay"
        );
        assert_ended(&mut ws, "a drained client");
    }
    server.wait_stopped(drain + Duration::from_secs(10));
}
