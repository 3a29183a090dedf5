//! Hostile input against a server in this process: garbage and malformed upgrade requests,
//! protocol violations on an open connection, silent, slow and oversized requests, floods
//! of abandoned and short-lived connections, clients that stop reading or answer no ping,
//! and the connection ceiling.
//!
//! After every hostile step the server must still serve a new client, and its state must
//! be exact: the registry, the `websocket_connections` gauge and the count of connection
//! threads (no `conn-N` thread may be left behind), and every ended connection counted
//! under the reason and Close code it ended with.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

use crate::harness::TestServer;
use crate::support::{
    self, assert_echo, assert_serves, close_normally, patience, scaled, wait_for_buffered, Ws,
    TIMER_SLACK,
};

/// Slack on top of a configured interval for an upper bound (scaled where it is used).
const SLACK: Duration = Duration::from_secs(3);

// ----------------------------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------------------------

/// Waits until exactly `live` connections and their threads are left, then checks that a
/// new client is served (an echo and a clean close) and that the server settles again.
fn assert_recovered(server: &TestServer, live: usize) {
    server.wait_settled(live);
    assert_serves(&server.url());
    server.wait_settled(live);
}

/// All connections counted as ended, whatever the reason.
fn closed_total(server: &TestServer) -> f64 {
    let (status, body) = support::http_get(server.metrics, "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|line| line.starts_with("websocket_connections_closed_total{"))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// How the server ended a connection we were reading.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum End {
    Eof,
    Reset,
    /// Still open after [`patience`] without a byte.
    Timeout,
}

/// Everything received until the server ended the connection.
#[derive(Debug)]
struct Answer {
    bytes: Vec<u8>,
    end: End,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Reads until EOF, a reset, or [`patience`] of silence.
fn read_to_end(tcp: &mut TcpStream) -> Answer {
    tcp.set_read_timeout(Some(patience())).unwrap();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let end = loop {
        match tcp.read(&mut buf) {
            Ok(0) => break End::Eof,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break End::Timeout
            }
            Err(_) => break End::Reset,
        }
    };
    Answer { bytes, end }
}

/// Sends `request` (a write the server cuts short is not an error) and reads the answer.
fn exchange(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut tcp = TcpStream::connect(addr).unwrap();
    let _ = tcp.write_all(request);
    read_to_end(&mut tcp)
}

/// A parsed, checked HTTP error response.
#[derive(Debug)]
struct Response {
    status: u16,
    /// Header lines as sent, `Name: value`.
    headers: Vec<String>,
    body: String,
}

/// Parses an HTTP/1.1 response and checks its framing: a status line, `Content-Length`
/// matching the body, `Connection: close`, and a one-line body.
fn parse_response(answer: &Answer, what: &str) -> Response {
    let text = answer.text();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{what}: no complete HTTP head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{what}: bad status line {status_line:?}"));
    let headers: Vec<String> = lines.map(str::to_owned).collect();
    let length: usize = headers
        .iter()
        .find_map(|h| h.strip_prefix("Content-Length: "))
        .unwrap_or_else(|| panic!("{what}: no Content-Length in {text:?}"))
        .parse()
        .unwrap();
    assert_eq!(
        length,
        body.len(),
        "{what}: Content-Length vs body: {text:?}"
    );
    assert!(
        headers.iter().any(|h| h == "Connection: close"),
        "{what}: no Connection: close in {text:?}"
    );
    assert!(
        body.ends_with('\n') && body.trim_end().lines().count() == 1,
        "{what}: expected a one-line reason, got {body:?}"
    );
    Response {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// Reads server frames until a Close frame; returns the frames before it and its code.
fn read_until_close(tcp: &mut TcpStream, what: &str) -> (Vec<(u8, Vec<u8>)>, Option<u16>) {
    let mut before = Vec::new();
    loop {
        let (byte0, payload) = support::read_frame(tcp)
            .unwrap_or_else(|e| panic!("{what}: no Close frame, the read failed: {e}"));
        if byte0 == 0x88 {
            return (before, support::close_code(&payload));
        }
        assert!(before.len() < 1000, "{what}: no Close frame in 1000 frames");
        before.push((byte0, payload));
    }
}

/// Whether `bytes` (short unmasked server frames from their start) hold a Close frame.
fn holds_close(bytes: &[u8]) -> bool {
    let mut at = 0;
    while at + 2 <= bytes.len() {
        if bytes[at] == 0x88 {
            return true;
        }
        let len = usize::from(bytes[at + 1] & 0x7f);
        assert!(len < 126, "unexpected long frame in {bytes:?}");
        at += 2 + len;
    }
    false
}

/// A request line plus header lines, ending with the blank line.
fn request(first_line: &str, headers: &[&str]) -> String {
    let mut request = format!("{first_line}\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request
}

const HOST: &str = "Host: test";
const UPGRADE: &str = "Upgrade: websocket";
const CONNECTION: &str = "Connection: Upgrade";
const VERSION: &str = "Sec-WebSocket-Version: 13";
const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";

/// Deterministic noise.
fn noise(n: usize, seed: u32) -> Vec<u8> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect()
}

// ----------------------------------------------------------------------------------------
// Not HTTP, not a valid upgrade
// ----------------------------------------------------------------------------------------

#[test]
fn garbage_instead_of_http_is_refused_or_dropped_and_survived() {
    // Only "blank lines only" waits for the timeout; a short one would answer 408 to a
    // client that stalled between its connect and its write.
    let server = TestServer::start(&["--handshake-timeout", "1s"]);
    let tls_client_hello = [
        &[
            0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
        ][..],
        &noise(160, 7),
    ]
    .concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a TLS ClientHello", tls_client_hello),
        ("NUL bytes", vec![0; 64]),
        ("binary noise", noise(512, 1)),
        ("an SSH banner", b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()),
        ("blank lines only", b"\r\n\r\n\r\n\r\n".to_vec()),
        ("a request line alone", b"GET\r\n\r\n".to_vec()),
        (
            "a header without a colon",
            request("GET /ws HTTP/1.1", &[HOST, "Upgrade websocket"]).into_bytes(),
        ),
        (
            "control bytes in the path",
            request("GET /w\x01s HTTP/1.1", &[HOST]).into_bytes(),
        ),
        ("20 KiB without a line break", vec![b'A'; 20 << 10]),
    ];
    for (what, bytes) in &cases {
        let answer = exchange(server.addr, bytes);
        assert_ne!(
            answer.end,
            End::Timeout,
            "{what}: the server neither answered nor closed: {:?}",
            answer.text()
        );
        if !answer.bytes.is_empty() {
            let response = parse_response(&answer, what);
            assert!(
                (400..500).contains(&response.status),
                "{what}: expected a 4xx, got {response:?}"
            );
            assert_eq!(answer.end, End::Eof, "{what}: reset after the response");
        }
    }
    server.wait_settled(0);
    assert_eq!(server.handshake_failures(), cases.len() as f64);
    assert_eq!(server.metric("websocket_connections_opened_total"), 0.0);
    assert_recovered(&server, 0);
}

#[test]
fn refused_upgrades_get_a_status_line_before_the_close() {
    let server = TestServer::start(&["--handshake-timeout", "30s"]);
    let get = "GET /ws HTTP/1.1";
    let all = [HOST, UPGRADE, CONNECTION, KEY, VERSION];
    // (what, request, acceptable statuses, a header line the response must carry)
    let cases: Vec<(&str, String, &[u16], Option<&str>)> = vec![
        (
            "PUT",
            request("PUT /ws HTTP/1.1", &all),
            &[405],
            Some("Allow: GET"),
        ),
        (
            "POST with a body",
            request(
                "POST /ws HTTP/1.1",
                &[HOST, UPGRADE, CONNECTION, KEY, VERSION, "Content-Length: 0"],
            ),
            &[405],
            Some("Allow: GET"),
        ),
        (
            "HTTP/1.0",
            request("GET /ws HTTP/1.0", &all),
            &[505, 400],
            None,
        ),
        (
            "HTTP/2.0",
            request("GET /ws HTTP/2.0", &all),
            &[505, 400],
            None,
        ),
        (
            "no Sec-WebSocket-Key",
            request(get, &[HOST, UPGRADE, CONNECTION, VERSION]),
            &[400],
            None,
        ),
        (
            "an empty Sec-WebSocket-Key",
            request(
                get,
                &[HOST, UPGRADE, CONNECTION, "Sec-WebSocket-Key: ", VERSION],
            ),
            &[400],
            None,
        ),
        (
            "a key of 5 bytes",
            request(
                get,
                &[
                    HOST,
                    UPGRADE,
                    CONNECTION,
                    "Sec-WebSocket-Key: c2hvcnQ=",
                    VERSION,
                ],
            ),
            &[400],
            None,
        ),
        (
            "a key that is not base64",
            request(
                get,
                &[
                    HOST,
                    UPGRADE,
                    CONNECTION,
                    "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==",
                    VERSION,
                ],
            ),
            &[400],
            None,
        ),
        (
            "two keys",
            request(
                get,
                &[
                    HOST,
                    UPGRADE,
                    CONNECTION,
                    KEY,
                    "Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==",
                    VERSION,
                ],
            ),
            &[400],
            None,
        ),
        (
            "no Sec-WebSocket-Version",
            request(get, &[HOST, UPGRADE, CONNECTION, KEY]),
            &[426],
            Some("Sec-WebSocket-Version: 13"),
        ),
        (
            "Sec-WebSocket-Version: 14",
            request(
                get,
                &[HOST, UPGRADE, CONNECTION, KEY, "Sec-WebSocket-Version: 14"],
            ),
            &[426],
            Some("Sec-WebSocket-Version: 13"),
        ),
        (
            "versions 13 and 8",
            request(
                get,
                &[
                    HOST,
                    UPGRADE,
                    CONNECTION,
                    KEY,
                    VERSION,
                    "Sec-WebSocket-Version: 8",
                ],
            ),
            &[426],
            Some("Sec-WebSocket-Version: 13"),
        ),
        (
            "Upgrade: h2c",
            request(get, &[HOST, "Upgrade: h2c", CONNECTION, KEY, VERSION]),
            &[400],
            None,
        ),
        (
            "Connection: keep-alive",
            request(
                get,
                &[HOST, UPGRADE, "Connection: keep-alive", KEY, VERSION],
            ),
            &[400],
            None,
        ),
        (
            "no Host",
            request(get, &[UPGRADE, CONNECTION, KEY, VERSION]),
            &[400],
            None,
        ),
    ];
    for (what, request, statuses, header) in &cases {
        let answer = exchange(server.addr, request.as_bytes());
        assert_eq!(
            answer.end,
            End::Eof,
            "{what}: the response must be followed by a clean close: {:?}",
            answer.text()
        );
        let response = parse_response(&answer, what);
        assert!(
            statuses.contains(&response.status),
            "{what}: expected {statuses:?}, got {response:?}"
        );
        if let Some(header) = header {
            assert!(
                response.headers.iter().any(|h| h == header),
                "{what}: no {header:?} in {response:?}"
            );
        }
        assert!(!response.body.trim().is_empty(), "{what}: no reason given");
    }
    server.wait_settled(0);
    assert_eq!(server.handshake_failures(), cases.len() as f64);
    assert_eq!(server.metric("websocket_connections_opened_total"), 0.0);
    assert_recovered(&server, 0);
}

// ----------------------------------------------------------------------------------------
// Protocol violations on an open connection
// ----------------------------------------------------------------------------------------

/// The `reason` label of a connection we closed with `code`.
fn violation_reason(code: u16) -> &'static str {
    match code {
        1002 => "protocol_error",
        1007 => "invalid_data",
        1009 => "too_big",
        other => panic!("no violation closes with {other}"),
    }
}

#[test]
fn protocol_violations_get_their_close_code_then_tcp_closes() {
    let server = TestServer::start(&["--max-frame-size", "64KiB"]);
    let mut bystander = server.connect();
    server.wait_settled(1);

    let masked = support::masked_frame;
    let unmasked = |byte0, payload: &[u8]| support::encode_frame(byte0, payload, None, None);
    let declaring = |len| support::encode_frame(0x82, &[], Some(support::FRAME_MASK), Some(len));
    let normal_close = [0x03, 0xe8];
    let long_close: Vec<u8> = [&normal_close[..], &[b'a'; 124]].concat();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("an unmasked text frame", unmasked(0x81, b"hi"), 1002),
        ("an unmasked binary frame", unmasked(0x82, b"abc"), 1002),
        (
            "an unmasked Close frame",
            unmasked(0x88, &normal_close),
            1002,
        ),
        ("RSV1 on a text frame", masked(0xc1, b"deflated?"), 1002),
        ("RSV2 on a binary frame", masked(0xa2, b"x"), 1002),
        ("RSV3 on a ping", masked(0x99, b""), 1002),
        ("reserved data opcode 0x3", masked(0x83, b"x"), 1002),
        ("reserved data opcode 0x7", masked(0x87, b"x"), 1002),
        ("reserved control opcode 0xB", masked(0x8b, b""), 1002),
        ("reserved control opcode 0xF", masked(0x8f, b""), 1002),
        ("a fragmented ping", masked(0x09, b"part"), 1002),
        ("a fragmented Close", masked(0x08, &normal_close), 1002),
        (
            "a fragmented ping inside a fragmented message",
            [masked(0x01, b"a"), masked(0x09, b"p")].concat(),
            1002,
        ),
        ("a 126-byte ping", masked(0x89, &[7; 126]), 1002),
        ("a 126-byte Close", masked(0x88, &long_close), 1002),
        ("a continuation of nothing", masked(0x80, b"x"), 1002),
        (
            "a new message inside a fragmented one",
            [masked(0x01, b"a"), masked(0x81, b"b")].concat(),
            1002,
        ),
        ("a Close with a 1-byte payload", masked(0x88, &[0x03]), 1002),
        ("a Close with code 1005", masked(0x88, &[0x03, 0xed]), 1002),
        ("a Close with code 999", masked(0x88, &[0x03, 0xe7]), 1002),
        ("a 2^63-byte length", declaring(1 << 63), 1009),
        ("a 2^64-1-byte length", declaring(u64::MAX), 1009),
        (
            "a frame header 1 byte over --max-frame-size",
            declaring((64 << 10) + 1),
            1009,
        ),
        (
            "invalid UTF-8 in a text frame",
            masked(0x81, &[b'o', b'k', 0xff, 0xfe]),
            1007,
        ),
        (
            "invalid UTF-8 split across fragments",
            [masked(0x01, &[b'o', 0xc3]), masked(0x80, &[0x28])].concat(),
            1007,
        ),
        (
            "invalid UTF-8 in a Close reason",
            masked(0x88, &[0x03, 0xe8, 0xff]),
            1007,
        ),
    ];
    let mut counted: HashMap<(&str, u16), f64> = HashMap::new();
    for (what, bytes, code) in &cases {
        let mut tcp = support::raw_upgrade(server.addr);
        tcp.write_all(bytes).unwrap();
        let (before, got) = read_until_close(&mut tcp, what);
        assert!(
            before.is_empty(),
            "{what}: frames before the Close: {before:?}"
        );
        assert_eq!(got, Some(*code), "{what}: wrong close code");
        // Then the server ends the TCP connection; nothing follows the Close frame.
        let rest = read_to_end(&mut tcp);
        assert_eq!(rest.end, End::Eof, "{what}: {rest:?}");
        assert!(
            rest.bytes.is_empty(),
            "{what}: bytes after the Close: {rest:?}"
        );
        drop(tcp);
        server.wait_settled(1);
        let reason = violation_reason(*code);
        let count = counted.entry((reason, *code)).or_default();
        *count += 1.0;
        assert_eq!(
            server.closed(reason, &code.to_string()),
            *count,
            "{what}: not counted as {reason} {code}"
        );
    }
    assert_eq!(closed_total(&server), cases.len() as f64);
    assert_eq!(
        server.metric("websocket_connections_opened_total"),
        1.0 + cases.len() as f64
    );
    assert_echo(&mut bystander, 10);
    assert_recovered(&server, 1);
    close_normally(bystander);
    server.wait_settled(0);
}

// ----------------------------------------------------------------------------------------
// Requests that never end, or are too big
// ----------------------------------------------------------------------------------------

/// The timeout is 300 ms: each socket must be dropped no earlier, and within a few seconds
/// (scaled) after it.
#[test]
fn silent_and_trickling_clients_are_dropped_at_the_handshake_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let server = TestServer::start(&["--handshake-timeout", "300ms"]);
    let addr = server.addr;
    let full = support::upgrade_request();

    // Silent sockets and one that stops one byte short of the blank line. The clock starts
    // before the connect, so it cannot start after the server's.
    let mut waiters = Vec::new();
    for i in 0..11 {
        let partial = if i == 10 {
            full[..full.len() - 1].to_owned()
        } else {
            String::new()
        };
        waiters.push(thread::spawn(move || {
            let start = Instant::now();
            let mut tcp = TcpStream::connect(addr).unwrap();
            tcp.write_all(partial.as_bytes()).unwrap();
            let answer = read_to_end(&mut tcp);
            (answer, start.elapsed())
        }));
    }

    // Slowloris: one byte every 20 ms, so the request would take 3 s to complete.
    let start = Instant::now();
    let mut slow = TcpStream::connect(addr).unwrap();
    let ended = Arc::new(AtomicBool::new(false));
    let reader = {
        let mut slow = slow.try_clone().unwrap();
        let ended = ended.clone();
        thread::spawn(move || {
            let answer = read_to_end(&mut slow);
            ended.store(true, Ordering::SeqCst);
            (answer, start.elapsed())
        })
    };
    let mut sent = 0;
    while sent < full.len() && !ended.load(Ordering::SeqCst) {
        if slow.write_all(&full.as_bytes()[sent..sent + 1]).is_err() {
            break;
        }
        sent += 1;
        thread::sleep(Duration::from_millis(20)); // the trickle itself, not a wait
    }
    let (answer, elapsed) = reader.join().unwrap();
    assert!(
        sent < full.len(),
        "the slowloris completed its request before the timeout"
    );
    waiters.push(thread::spawn(move || (answer, elapsed)));

    for (i, waiter) in waiters.into_iter().enumerate() {
        let (answer, elapsed) = waiter.join().unwrap();
        assert_ne!(answer.end, End::Timeout, "socket {i} was never dropped");
        // Silent sockets are just closed; the two that started a request learn why (408).
        if i < 10 {
            assert!(
                answer.bytes.is_empty(),
                "socket {i}: unexpected answer {:?}",
                answer.text()
            );
        } else {
            assert!(
                answer.text().starts_with("HTTP/1.1 408 "),
                "socket {i}: expected 408, got {:?}",
                answer.text()
            );
        }
        assert!(
            elapsed >= TIMEOUT - TIMER_SLACK && elapsed < scaled(TIMEOUT + SLACK),
            "socket {i} dropped after {elapsed:?} (timeout {TIMEOUT:?})"
        );
    }
    server.wait_settled(0);
    // Silent or not, each timed out handshake counts as a failure.
    assert_eq!(server.handshake_failures(), 12.0);
    assert_eq!(server.metric("websocket_connections_opened_total"), 0.0);
    assert_recovered(&server, 0);
}

#[test]
fn request_heads_over_8_kib_get_431_and_exactly_8_kib_upgrades() {
    let server = TestServer::start(&["--handshake-timeout", "30s"]);
    let addr = server.addr;
    let all = [HOST, UPGRADE, CONNECTION, KEY, VERSION];
    // An upgrade whose head is exactly `size` bytes, padded with one header.
    let padded_upgrade = |size: usize| {
        let bare = request("GET /ws HTTP/1.1", &all).len() + "X-Pad: \r\n".len();
        let pad = format!("X-Pad: {}", "p".repeat(size - bare));
        let request = request(
            "GET /ws HTTP/1.1",
            &[HOST, UPGRADE, CONNECTION, KEY, VERSION, &pad],
        );
        assert_eq!(request.len(), size);
        request
    };

    let huge_header = request(
        "GET /ws HTTP/1.1",
        &[
            HOST,
            UPGRADE,
            CONNECTION,
            KEY,
            VERSION,
            &format!("X-Pad: {}", "p".repeat(16 << 10)),
        ],
    );
    let many: Vec<String> = (0..100).map(|i| format!("X-H{i}: {i}")).collect();
    let mut many_headers: Vec<&str> = all.to_vec();
    many_headers.extend(many.iter().map(String::as_str));
    let many_headers = request("GET /ws HTTP/1.1", &many_headers);
    for (what, request) in [
        ("a 16 KiB header", huge_header),
        ("an 8193-byte head", padded_upgrade(8193)),
        ("105 headers", many_headers),
    ] {
        let answer = exchange(addr, request.as_bytes());
        assert_eq!(answer.end, End::Eof, "{what}: {:?}", answer.text());
        let response = parse_response(&answer, what);
        assert_eq!(response.status, 431, "{what}: {response:?}");
    }
    server.wait_settled(0);
    assert_eq!(server.handshake_failures(), 3.0);
    assert_recovered(&server, 0);

    // Exactly 8 KiB is within the limit, and the connection works.
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(patience())).unwrap();
    tcp.write_all(padded_upgrade(8192).as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tcp.read(&mut byte).unwrap(), 1, "{head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    tcp.write_all(&support::masked_frame(0x81, b"eight KiB"))
        .unwrap();
    assert_eq!(
        support::read_frame(&mut tcp).unwrap(),
        (0x81, b"eight KiB".to_vec())
    );
    tcp.write_all(&support::masked_frame(0x88, &[0x03, 0xe8]))
        .unwrap();
    let (before, code) = read_until_close(&mut tcp, "the 8 KiB upgrade");
    assert!(before.is_empty());
    assert_eq!(code, Some(1000));
    assert_eq!(read_to_end(&mut tcp).end, End::Eof);
    assert_recovered(&server, 0);
    assert_eq!(server.handshake_failures(), 3.0);
    // The recovery checks and the 8 KiB upgrade.
    assert_eq!(server.closed("peer_close", "1000"), 3.0);
}

// ----------------------------------------------------------------------------------------
// Floods
// ----------------------------------------------------------------------------------------

#[test]
fn a_thousand_connections_abandoned_mid_handshake() {
    const WAVE: usize = 500;
    // The handshake timeout must not end any of them: the test drops them.
    let server = TestServer::start(&["--handshake-timeout", "60s"]);
    let addr = server.addr;
    let state = server.state();
    let full = support::upgrade_request();
    for wave in 0..2 {
        let mut held = Vec::with_capacity(WAVE);
        for i in 0..WAVE {
            let mut tcp = TcpStream::connect(addr).unwrap();
            match i % 3 {
                0 => {}
                1 => tcp.write_all(&full.as_bytes()[..20]).unwrap(),
                _ => tcp.write_all(&full.as_bytes()[..full.len() - 2]).unwrap(),
            }
            held.push(tcp);
        }
        // Every socket has its thread, in its handshake: none is a connection yet.
        support::wait_until(
            &format!("wave {wave}: {WAVE} handshakes in progress"),
            || state.handshakes() == WAVE && state.connection_threads() == WAVE,
        );
        assert_eq!(state.connections(), 0);
        assert_eq!(server.metric("websocket_connections"), 0.0);
        // A real client is still served meanwhile.
        assert_serves(&server.url());
        drop(held);
        server.wait_settled(0);
        // The two thirds that sent part of a request count; the silent third (a TCP probe,
        // as far as the server can tell) does not.
        let partial_per_wave = (0..WAVE).filter(|i| i % 3 != 0).count();
        assert_eq!(
            server.handshake_failures(),
            ((wave + 1) * partial_per_wave) as f64
        );
    }
    assert_recovered(&server, 0);
    assert_eq!(server.metric("websocket_connections_opened_total"), 3.0);
    assert_eq!(server.closed("peer_close", "1000"), 3.0);
}

#[test]
fn a_flood_of_connects_and_disconnects() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 60;
    let server = TestServer::start(&["--handshake-timeout", "30s"]);
    let addr = server.addr;
    let url = server.url();
    let upgrades = Arc::new(AtomicUsize::new(0));
    let clean = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (url, upgrades, clean, failures) = (
                url.clone(),
                upgrades.clone(),
                clean.clone(),
                failures.clone(),
            );
            thread::spawn(move || {
                for round in 0..ROUNDS {
                    match (round + t) % 6 {
                        0 => {
                            let mut ws = support::connect(&url);
                            upgrades.fetch_add(1, Ordering::SeqCst);
                            assert_echo(&mut ws, 5);
                            close_normally(ws);
                            clean.fetch_add(1, Ordering::SeqCst);
                        }
                        1 => {
                            // Abrupt: the echo is left unread, so the close is (usually) a
                            // reset.
                            let mut ws = support::connect(&url);
                            upgrades.fetch_add(1, Ordering::SeqCst);
                            ws.send(Message::binary(vec![1u8; 1000])).unwrap();
                            drop(ws);
                        }
                        2 => {
                            // A bare connect-and-close: a probe, not a failed upgrade.
                            drop(TcpStream::connect(addr).unwrap());
                        }
                        3 => {
                            drop(support::raw_upgrade(addr));
                            upgrades.fetch_add(1, Ordering::SeqCst);
                        }
                        4 => {
                            assert_eq!(support::http_get(addr, "/").0, 200);
                        }
                        _ => {
                            // A request cut short: a failed upgrade.
                            let mut tcp = TcpStream::connect(addr).unwrap();
                            tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").unwrap();
                            failures.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    server.wait_settled(0);
    let upgrades = upgrades.load(Ordering::SeqCst) as f64;
    let clean = clean.load(Ordering::SeqCst) as f64;
    assert_eq!(
        server.metric("websocket_connections_opened_total"),
        upgrades
    );
    assert_eq!(
        server.handshake_failures(),
        failures.load(Ordering::SeqCst) as f64
    );
    // Every connection is counted once as it ends: the clean ones as such, the abrupt ones
    // as a reset or a FIN without Close.
    assert_eq!(closed_total(&server), upgrades);
    assert_eq!(server.closed("peer_close", "1000"), clean);
    assert_eq!(
        server.closed("reset", "none") + server.closed("eof", "none"),
        upgrades - clean
    );
    assert_recovered(&server, 0);
}

// ----------------------------------------------------------------------------------------
// The connection ceiling
// ----------------------------------------------------------------------------------------

#[test]
fn beyond_max_connections_503_with_retry_after_and_live_ones_untouched() {
    const MAX: usize = 3;
    const REFUSERS: usize = 4;
    const REFUSALS: usize = 8;
    let server = TestServer::start(&["--max-connections", "3", "--handshake-timeout", "30s"]);
    let addr = server.addr;
    let state = server.state();
    let mut live: Vec<Ws> = (0..MAX).map(|_| server.connect()).collect();
    server.wait_settled(MAX);

    let refused = move |what: &str| {
        let answer = exchange(addr, support::upgrade_request().as_bytes());
        assert_eq!(answer.end, End::Eof, "{what}: {:?}", answer.text());
        let response = parse_response(&answer, what);
        assert_eq!(response.status, 503, "{what}: {response:?}");
        assert!(
            response
                .headers
                .iter()
                .any(|h| h.starts_with("Retry-After: ")),
            "{what}: no Retry-After in {response:?}"
        );
    };
    // Several clients at once; no refused socket may get a thread of its own.
    let done = Arc::new(AtomicUsize::new(0));
    let refusers: Vec<_> = (0..REFUSERS)
        .map(|_| {
            let (done, refused) = (done.clone(), refused);
            thread::spawn(move || {
                for _ in 0..REFUSALS {
                    refused("over the ceiling");
                }
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    let mut most_threads = 0;
    support::wait_until("the refusers are done", || {
        most_threads = most_threads.max(state.connection_threads());
        done.load(Ordering::SeqCst) == REFUSERS
    });
    for refuser in refusers {
        refuser.join().unwrap();
    }
    assert!(
        most_threads <= MAX,
        "{most_threads} connection threads while refusing ({MAX} connections)"
    );
    assert_eq!(
        server.metric("websocket_connections_rejected_total"),
        (REFUSERS * REFUSALS) as f64
    );
    server.wait_settled(MAX);
    for ws in &mut live {
        assert_echo(ws, 10);
    }

    // One leaves: a new one is admitted again, then the ceiling holds again.
    close_normally(live.pop().unwrap());
    server.wait_settled(MAX - 1);
    let mut admitted = server.connect();
    assert_echo(&mut admitted, 10);
    live.push(admitted);
    server.wait_settled(MAX);
    refused("the ceiling again");
    let rejected = (REFUSERS * REFUSALS + 1) as f64;
    assert_eq!(
        server.metric("websocket_connections_rejected_total"),
        rejected
    );
    for ws in &mut live {
        assert_echo(ws, 10);
    }
    for ws in live {
        close_normally(ws);
    }
    assert_recovered(&server, 0);
    assert_eq!(
        server.metric("websocket_connections_rejected_total"),
        rejected
    );
    assert_eq!(server.handshake_failures(), 0.0);
}

#[test]
fn refused_sockets_waiting_for_their_503_do_not_hold_up_shutdown() {
    // Each silent refused socket costs the rejecter up to ~200 ms; 60 of them queued would
    // take ~12 s. Shutdown must not wait for them before closing the live connection (nor
    // wait for the 30 s shutdown timeout).
    let mut server = TestServer::start(&["--max-connections", "1", "--shutdown-timeout", "30s"]);
    let mut live = server.connect();
    assert_echo(&mut live, 10);
    let silent: Vec<TcpStream> = (0..60)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    support::wait_until("the rejecter is busy with a refused socket", || {
        server.metric("websocket_connections_rejected_total") >= 1.0
    });

    let start = Instant::now();
    server.shut_down();
    let frame = support::read_close(&mut live);
    let took = start.elapsed();
    assert_eq!(frame.code, CloseCode::Away);
    assert!(
        took < scaled(SLACK),
        "Close 1001 came {took:?} after the shutdown request"
    );
    match live.read() {
        Err(tungstenite::Error::ConnectionClosed) => {}
        other => panic!("expected the end after the close handshake, got {other:?}"),
    }
    server.wait_stopped(Duration::from_secs(10));
    drop(silent);
}

// ----------------------------------------------------------------------------------------
// Clients that stop reading or answer nothing
// ----------------------------------------------------------------------------------------

#[test]
fn a_client_that_stops_reading_is_cut_off_by_the_write_timeout() {
    const MESSAGE: usize = 12 << 20;
    const TIMEOUT: Duration = Duration::from_millis(300);
    let server = TestServer::start(&["--write-timeout", "300ms"]);
    let state = server.state();
    let mut bystander = server.connect();
    server.wait_settled(1);

    // A small receive buffer, so the echo cannot all sit in the kernel.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut tcp = support::upgrade_on(socket.into());
    server.wait_settled(2);
    let frame = support::masked_frame(0x82, &vec![0x5a; MESSAGE]);
    tcp.write_all(&frame).unwrap();
    // The server echoes only once it has read the whole message, so its writes (and their
    // stalls) all come after this.
    let sent = Instant::now();
    drop(frame);
    wait_for_buffered(&tcp, "the echo", |bytes| !bytes.is_empty());
    support::wait_until("the server gives up on the stalled echo", || {
        state.connections() == 1
    });
    let took = sent.elapsed();
    assert!(
        took >= TIMEOUT - TIMER_SLACK && took < scaled(TIMEOUT + SLACK),
        "cut off {took:?} after the message was sent (write timeout {TIMEOUT:?})"
    );
    server.wait_settled(1);
    assert_eq!(server.closed("write_timeout", "none"), 1.0);
    assert_echo(&mut bystander, 10);

    // What did arrive is part of the echo, then the connection ends.
    let answer = read_to_end(&mut tcp);
    assert_ne!(answer.end, End::Timeout);
    assert!(
        answer.bytes.len() < MESSAGE,
        "the whole echo ({} bytes) arrived",
        answer.bytes.len()
    );
    assert_recovered(&server, 1);
    close_normally(bystander);
    server.wait_settled(0);
    assert_eq!(closed_total(&server), 3.0);
}

/// A peer that reads a few bytes now and then, and keeps sending pings: each of the
/// server's writes makes a little progress, so the socket's own write timeout (per system
/// call) never fires; the echo must still end within the write timeout, plus a second.
#[test]
fn a_client_that_reads_a_trickle_and_keeps_pinging_is_cut_off_by_the_write_timeout() {
    const MESSAGE: usize = 12 << 20;
    const TIMEOUT: Duration = Duration::from_secs(1);
    let server = TestServer::start(&["--write-timeout", "1s"]);
    let state = server.state();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut tcp = support::upgrade_on(socket.into());
    server.wait_settled(1);
    let frame = support::masked_frame(0x82, &vec![0x5a; MESSAGE]);
    tcp.write_all(&frame).unwrap();
    drop(frame);
    let echo_started = wait_for_buffered(&tcp, "the echo", |bytes| !bytes.is_empty());
    // The trickle: a receive buffer's worth every 300 ms (each read opens the window, so
    // every write of the server's makes progress), and a ping each time.
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = thread::spawn({
        let (mut tcp, stop) = (tcp.try_clone().unwrap(), stop.clone());
        move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                if tcp.read(&mut buf).unwrap_or(0) == 0 {
                    return;
                }
                let _ = tcp.write_all(&support::masked_frame(0x89, b"still here"));
                thread::sleep(Duration::from_millis(300)); // the trickle's pace
            }
        }
    });
    support::wait_within(
        "the server gives up on the echo",
        TIMEOUT + Duration::from_secs(1) + SLACK,
        || state.connections() == 0,
    );
    let took = echo_started.elapsed();
    stop.store(true, Ordering::SeqCst);
    assert!(
        took < scaled(TIMEOUT + Duration::from_secs(1)) + SLACK,
        "cut off {took:?} after the echo started (write timeout {TIMEOUT:?})"
    );
    assert_eq!(server.closed("write_timeout", "none"), 1.0);
    // A full window lets no Close through: the server resets the connection.
    tcp.set_read_timeout(Some(patience())).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let ended = loop {
        match tcp.read(&mut buf) {
            Ok(0) => break "eof",
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break "reset",
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(ended, "reset");
    let _ = trickle.join();
}

#[test]
fn idle_timeout_closes_a_mute_client_and_spares_one_that_answers_pings() {
    const PING: Duration = Duration::from_millis(200);
    const IDLE: Duration = Duration::from_millis(800);
    /// The server's wait for a peer that never closes its side (net::LINGER).
    const LINGER: Duration = Duration::from_secs(1);
    let server = TestServer::start(&["--server-ping-interval", "200ms", "--idle-timeout", "800ms"]);
    let state = server.state();

    // A tungstenite client that reads (and so answers every ping) for two idle timeouts
    // and at least six pings.
    let reader = {
        let mut ws = server.connect();
        thread::spawn(move || {
            let start = Instant::now();
            let mut pings = 0;
            while pings < 6 || start.elapsed() < IDLE * 2 {
                match ws.read() {
                    Ok(Message::Ping(_)) => pings += 1,
                    other => panic!("the reading client got {other:?} after {pings} pings"),
                }
            }
            ws
        })
    };

    // A raw socket that completes the upgrade and then neither reads nor writes. The clock
    // starts before the request, so before the server's.
    let start = Instant::now();
    let mut mute = support::raw_upgrade(server.addr);
    let closed = wait_for_buffered(&mute, "the mute client's Close", holds_close);
    let took = closed.duration_since(start);
    assert!(
        took >= IDLE - TIMER_SLACK && took < scaled(IDLE + PING + SLACK),
        "the mute client got its Close after {took:?} (idle timeout {IDLE:?})"
    );
    // It leaves the registry once the server stops waiting for it to close its side.
    support::wait_until("the mute client leaves", || state.connections() == 1);
    assert!(
        closed.elapsed() < scaled(LINGER + SLACK),
        "the mute client left {:?} after its Close (linger {LINGER:?})",
        closed.elapsed()
    );
    assert_eq!(server.closed("idle_timeout", "1001"), 1.0);
    // Its Close came after a few numbered pings; then the server ended the TCP connection.
    let (pings, code) = read_until_close(&mut mute, "the mute client");
    assert_eq!(code, Some(1001));
    assert!(
        pings.len() >= 2,
        "only {} pings before the close",
        pings.len()
    );
    for (i, (byte0, payload)) in pings.iter().enumerate() {
        assert_eq!(*byte0, 0x89, "frame {i} before the Close is not a ping");
        assert_eq!(payload[..], (i as u64 + 1).to_be_bytes(), "ping {i}");
    }
    assert_eq!(read_to_end(&mut mute).end, End::Eof);

    let mut ws = reader.join().unwrap();
    server.wait_settled(1);
    assert_echo(&mut ws, 10);
    assert_recovered(&server, 1);
    close_normally(ws);
    server.wait_settled(0);
    assert_eq!(server.closed("idle_timeout", "1001"), 1.0);
    assert_eq!(server.closed("peer_close", "1000"), 2.0);
}

/// A link that delivers at most 2 KiB per millisecond or so (about 2 MB/s).
struct SlowLink(TcpStream);

impl Read for SlowLink {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        thread::sleep(Duration::from_millis(1)); // the link's pace
        let n = buf.len().min(2048);
        self.0.read(&mut buf[..n])
    }
}

impl Write for SlowLink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Regression: the idle clock restarted when an echo had been handed to the kernel, but
/// the kernel may still hold megabytes of it unsent (the send buffer autotunes to
/// `net.ipv4.tcp_wmem`'s maximum, 4 MiB by default). The server's pings queue behind that
/// data, so a tungstenite client that reads all the time, at the speed of its link, cannot
/// answer one before the idle timeout and is closed with 1001 "idle timeout" right after
/// it has read the echo. The server now sets TCP_NOTSENT_LOWAT when an idle timeout is on.
///
/// At 2 MB/s, 4 MiB queued in the kernel take 2 s, far beyond the 800 ms idle timeout;
/// what the server may now queue (128 KiB, plus the client's receive buffer) takes a tenth
/// of that.
#[test]
fn a_reading_client_on_a_slow_link_is_not_idle() {
    const MESSAGE: usize = 6 << 20;
    let server = TestServer::start(&["--server-ping-interval", "200ms", "--idle-timeout", "800ms"]);
    // Made before the upgrade: until its first bytes arrive the client looks idle.
    let payload: Vec<u8> = (0..MESSAGE).map(|i| (i % 251) as u8).collect();
    let message = Message::binary(payload.clone());
    // A receive buffer of fixed size, so the echo waits on the link, not in the kernel.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(64 << 10).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(patience())).unwrap();
    let (mut ws, _) = tungstenite::client(server.url(), SlowLink(tcp)).unwrap();

    let start = Instant::now();
    ws.send(message).unwrap();
    let echo = loop {
        match ws.read() {
            Ok(Message::Binary(echo)) => break echo,
            Ok(Message::Ping(_)) => {}
            other => panic!("expected the echo, got {other:?}"),
        }
    };
    let took = start.elapsed();
    assert!(echo[..] == payload[..], "the echo differs");
    // The client answers at once: it is as alive as a client can be.
    ws.send(Message::text("still here")).unwrap();
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => {
                assert_eq!(text.as_str(), "still here");
                break;
            }
            Ok(Message::Ping(_)) => {}
            other => panic!(
                "a client that kept reading was dropped after the {} MiB echo took {took:?}: \
                 {other:?}",
                MESSAGE >> 20
            ),
        }
    }
    server.wait_settled(1);
    assert_eq!(server.closed("idle_timeout", "1001"), 0.0);
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    server.wait_settled(0);
}

/// A client whose single large frame arrives steadily over a slow link cannot send a pong
/// in the middle of the frame: its bytes are its sign of life, and the idle timeout must
/// not close it while they keep arriving (it did when only complete messages counted).
#[test]
fn a_client_uploading_a_large_frame_slowly_is_not_idle() {
    const MESSAGE: usize = 64 << 10;
    const CHUNKS: usize = 24;
    let server = TestServer::start(&["--server-ping-interval", "250ms", "--idle-timeout", "1s"]);
    let payload: Vec<u8> = (0..MESSAGE).map(|i| (i % 253) as u8).collect();
    let frame = support::masked_frame(0x82, &payload);
    let mut tcp = support::raw_upgrade(server.addr);
    // 24 chunks 100 ms apart: bytes arrive every 100 ms (a tenth of the idle timeout) for
    // about 2.4 s, more than twice the idle timeout.
    let chunk = frame.len().div_ceil(CHUNKS);
    let mut sent = 0;
    for part in frame.chunks(chunk) {
        if tcp.write_all(part).is_err() {
            break;
        }
        sent += part.len();
        thread::sleep(Duration::from_millis(100)); // the upload's pace
    }
    let mut pings = 0;
    loop {
        let (byte0, body) = support::read_frame(&mut tcp).unwrap();
        match byte0 {
            0x89 => pings += 1,
            0x82 => {
                assert!(body == payload, "the echo differs");
                break;
            }
            _ => panic!(
                "a client sending steadily ({sent} of {} bytes sent) got frame {byte0:#x} \
                 {:?} after {pings} pings",
                frame.len(),
                support::close_code(&body)
            ),
        }
    }
    server.wait_settled(1);
    assert_eq!(server.closed("idle_timeout", "1001"), 0.0);
}
