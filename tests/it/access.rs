//! Access control and the client's real address, against a server in this process: the
//! bearer token (and its file, re-read after a change), allowed origins, per-address
//! connection limits and rates (429 without a thread of their own), the PROXY protocol
//! (v1, v2, LOCAL, garbled), X-Forwarded-For from trusted proxies only, and subprotocol
//! selection. Tests wait on the server's state (registry, peers, threads, metrics); a few
//! run the binary for exit codes and log lines.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;

use crate::harness::TestServer;
use crate::pki::{Pki, Use};
use crate::support::{
    self, assert_echo, close_normally, masked_frame, patience, read_frame, scaled, send_for_head,
    time_scale, upgrade_request, upgrade_request_with, Head, Proc, TIMER_SLACK,
};

/// Slack on top of a configured interval for an upper bound (scaled where it is used).
const SLACK: Duration = Duration::from_secs(2);
/// How often the server may look at its token file again (`TOKEN_RELOAD_CHECK`).
const TOKEN_RELOAD_CHECK: Duration = Duration::from_secs(1);
const TOKEN: &str = "s3cret-T0ken_for.tests";

/// Sends a hand-made upgrade with `extra` header lines; returns the socket and the head.
fn upgrade(server: &TestServer, extra: &str) -> (TcpStream, Head) {
    send_for_head(server.addr, upgrade_request_with(extra).as_bytes())
}

/// Sends `prefix` (a PROXY header), then an upgrade with `extra` header lines.
fn upgrade_after(server: &TestServer, prefix: &[u8], extra: &str) -> (TcpStream, Head) {
    let bytes = [prefix, upgrade_request_with(extra).as_bytes()].concat();
    send_for_head(server.addr, &bytes)
}

/// Asserts a 101; the socket is then a WebSocket.
fn assert_upgraded((tcp, head): (TcpStream, Head), what: &str) -> TcpStream {
    assert_eq!(head.status, 101, "{what}: {}", head.text);
    tcp
}

/// Asserts a 429 with a `Retry-After` of whole seconds, at least 1; returns it.
fn assert_too_many(head: &Head, what: &str) -> u64 {
    assert_eq!(head.status, 429, "{what}: {}", head.text);
    let retry_after = head
        .header("Retry-After")
        .unwrap_or_else(|| panic!("{what}: no Retry-After in {}", head.text));
    let seconds: u64 = retry_after
        .parse()
        .unwrap_or_else(|e| panic!("{what}: Retry-After {retry_after:?}: {e}"));
    assert!(seconds >= 1, "{what}: Retry-After {seconds}");
    seconds
}

/// One echo over a raw WebSocket, then the close handshake from our side.
fn echo_and_close(mut tcp: TcpStream) {
    tcp.write_all(&masked_frame(0x81, b"through")).unwrap();
    assert_eq!(read_frame(&mut tcp).unwrap(), (0x81, b"through".to_vec()));
    tcp.write_all(&masked_frame(0x88, &1000u16.to_be_bytes()))
        .unwrap();
    let (byte0, payload) = read_frame(&mut tcp).unwrap();
    assert_eq!((byte0, support::close_code(&payload)), (0x88, Some(1000)));
}

/// Waits until `websocket_handshake_failures_total` is `n` (it is counted just after the
/// response is written).
fn wait_failures(server: &TestServer, n: u32) {
    support::wait_until(&format!("{n} handshake failures are counted"), || {
        server.handshake_failures() == f64::from(n)
    });
}

/// Waits until `websocket_connections_rejected_total` is `n`.
fn wait_rejected(server: &TestServer, n: u32) {
    support::wait_until(&format!("{n} rejected connections are counted"), || {
        server.metric("websocket_connections_rejected_total") == f64::from(n)
    });
}

/// Waits until the registry's client addresses are `expected` (in any order).
fn wait_peers(server: &TestServer, expected: &[SocketAddr]) {
    let mut expected = expected.to_vec();
    expected.sort();
    let deadline = Instant::now() + patience();
    loop {
        let mut seen = server.state().peers();
        seen.sort();
        if seen == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the registry lists {seen:?}, expected {expected:?}"
        );
        thread::sleep(Duration::from_millis(5)); // polling interval
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// A PROXY protocol version 1 line for a TCP connection from `source`.
fn proxy_v1(source: SocketAddr) -> Vec<u8> {
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    let destination = if source.is_ipv4() {
        "10.0.0.1"
    } else {
        "fd00::1"
    };
    format!(
        "PROXY {family} {} {destination} {} 3003\r\n",
        source.ip(),
        source.port()
    )
    .into_bytes()
}

/// A PROXY protocol version 2 header: `command` 0 (LOCAL) or 1 (PROXY), from `source`.
fn proxy_v2(command: u8, source: Option<SocketAddr>) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    let body = match source {
        Some(SocketAddr::V4(v4)) => {
            header.extend([0x20 | command, 0x11]);
            [
                &v4.ip().octets()[..],
                &[10, 0, 0, 1],
                &v4.port().to_be_bytes(),
                &[0x0b, 0xbb],
            ]
            .concat()
        }
        Some(SocketAddr::V6(v6)) => {
            header.extend([0x20 | command, 0x21]);
            let destination = "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
            [
                &v6.ip().octets()[..],
                &destination,
                &v6.port().to_be_bytes(),
                &[0x0b, 0xbb],
            ]
            .concat()
        }
        None => {
            header.extend([0x20 | command, 0x00]);
            Vec::new()
        }
    };
    header.extend((body.len() as u16).to_be_bytes());
    header.extend(body);
    header
}

/// A directory of this test's own under the system temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("websocket-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces `path` in one step, as Kubernetes swaps a Secret's files.
fn replace_file(path: &Path, content: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, content).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

// ----------------------------------------------------------------------------------------
// The bearer token
// ----------------------------------------------------------------------------------------

#[test]
fn upgrades_without_the_right_bearer_token_get_401() {
    let server = TestServer::start(&["--auth-token", TOKEN]);
    let (_, head) = upgrade(&server, "");
    assert_eq!(head.status, 401, "{}", head.text);
    assert_eq!(head.header("WWW-Authenticate"), Some("Bearer"));
    let near_misses = [
        "wrong".to_owned(),
        TOKEN[..TOKEN.len() - 1].to_owned(),
        format!("{TOKEN}x"),
        TOKEN.to_uppercase(),
    ];
    for wrong in &near_misses {
        let (_, head) = upgrade(&server, &format!("Authorization: Bearer {wrong}\r\n"));
        assert_eq!(head.status, 401, "{wrong}: {}", head.text);
        let challenge = head.header("WWW-Authenticate").unwrap();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
    }
    let (_, head) = upgrade(&server, &format!("Authorization: Basic {TOKEN}\r\n"));
    assert_eq!(head.status, 401, "{}", head.text);
    wait_failures(&server, 2 + near_misses.len() as u32);
    assert_eq!(server.state().connections(), 0);

    // The right token, by hand and from tungstenite's client.
    let tcp = assert_upgraded(
        upgrade(&server, &format!("Authorization: Bearer {TOKEN}\r\n")),
        "the right token",
    );
    server.wait_settled(1);
    echo_and_close(tcp);
    let mut request = server.url().into_client_request().unwrap();
    request.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Bearer {TOKEN}")).unwrap(),
    );
    let (mut ws, _) = tungstenite::connect(request).unwrap();
    server.wait_settled(1);
    assert_echo(&mut ws, 100);
    close_normally(ws);
    server.wait_settled(0);
    assert_eq!(server.metric("websocket_connections_opened_total"), 2.0);
    assert_eq!(server.metric("websocket_connections_rejected_total"), 0.0);
    // Health checks need no token.
    assert_eq!(support::http_get(server.addr, "/").0, 200);
    wait_failures(&server, 2 + near_misses.len() as u32);
}

#[test]
fn the_token_file_is_read_again_after_a_change() {
    let dir = TempDir::new("token-file");
    let file = dir.path().join("token");
    std::fs::write(&file, "first-token\n").unwrap();
    let server = TestServer::start(&["--auth-token-file", file.to_str().unwrap()]);
    let bearer = |token: &str| format!("Authorization: Bearer {token}\r\n");
    let tcp = assert_upgraded(upgrade(&server, &bearer("first-token")), "the file's token");
    echo_and_close(tcp);
    assert_eq!(upgrade(&server, &bearer("second-token")).1.status, 401);

    replace_file(&file, "second-token\n");
    // The server looks at the file at most once a second, when a request comes.
    support::wait_within(
        "the new token is accepted",
        TOKEN_RELOAD_CHECK + SLACK,
        || upgrade(&server, &bearer("second-token")).1.status == 101,
    );
    assert_eq!(upgrade(&server, &bearer("first-token")).1.status, 401);

    // A file that cannot be read any more keeps the token in force, through at least one
    // more reload check.
    std::fs::remove_file(&file).unwrap();
    let removed = Instant::now();
    while removed.elapsed() < TOKEN_RELOAD_CHECK * 3 / 2 {
        let tcp = assert_upgraded(upgrade(&server, &bearer("second-token")), "the kept token");
        echo_and_close(tcp);
        thread::sleep(Duration::from_millis(50)); // polling interval
    }
    server.wait_settled(0);
}

// ----------------------------------------------------------------------------------------
// Origins
// ----------------------------------------------------------------------------------------

#[test]
fn origins_not_listed_get_403_and_wildcards_match_subdomains() {
    let server = TestServer::start(&[
        "--allowed-origins",
        "https://app.example.com,https://*.example.org",
    ]);
    let cases = [
        ("https://app.example.com", 101),
        ("https://APP.example.com:443", 101),
        ("https://chat.example.org", 101),
        ("https://a.b.example.org", 101),
        ("https://evil.example.com", 403),
        ("http://app.example.com", 403),
        ("https://app.example.com:8443", 403),
        ("https://example.org", 403),
        ("https://example.org.evil.test", 403),
        ("null", 403),
    ];
    let mut refused = 0;
    for (origin, status) in cases {
        let (tcp, head) = upgrade(&server, &format!("Origin: {origin}\r\n"));
        assert_eq!(head.status, status, "{origin}: {}", head.text);
        if status == 101 {
            echo_and_close(tcp);
        } else {
            refused += 1;
        }
    }
    // Without an Origin (a non-browser client), it passes.
    echo_and_close(assert_upgraded(upgrade(&server, ""), "no Origin"));
    server.wait_settled(0);
    wait_failures(&server, refused);
    assert_eq!(server.metric("websocket_connections_rejected_total"), 0.0);

    let strict = TestServer::start(&[
        "--allowed-origins",
        "https://app.example.com",
        "--require-origin",
    ]);
    let (_, head) = upgrade(&strict, "");
    assert_eq!(head.status, 403, "{}", head.text);
    let listed = upgrade(&strict, "Origin: https://app.example.com\r\n");
    echo_and_close(assert_upgraded(listed, "a listed Origin"));
    wait_failures(&strict, 1);
}

// ----------------------------------------------------------------------------------------
// Per-address limits
// ----------------------------------------------------------------------------------------

#[test]
fn the_connection_after_the_limit_from_one_address_gets_429_without_a_thread() {
    const MAX: usize = 3;
    const REFUSERS: usize = 3;
    const REFUSALS: usize = 5;
    let server = TestServer::start(&["--max-connections-per-ip", "3"]);
    let mut live: Vec<_> = (0..MAX).map(|_| server.connect()).collect();
    server.wait_settled(MAX);

    // Several refused clients at once, while the thread count is watched.
    let addr = server.addr;
    let done = Arc::new(AtomicBool::new(false));
    let refusers: Vec<_> = (0..REFUSERS)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..REFUSALS {
                    let (_, head) = send_for_head(addr, upgrade_request().as_bytes());
                    assert_too_many(&head, "past the per-address limit");
                }
            })
        })
        .collect();
    let watcher = {
        let (state, done) = (server.state().clone(), done.clone());
        thread::spawn(move || {
            let mut most = 0;
            while !done.load(Ordering::SeqCst) {
                most = most.max(state.connection_threads());
                thread::yield_now();
            }
            most
        })
    };
    for refuser in refusers {
        refuser.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let most_threads = watcher.join().unwrap();
    assert!(
        most_threads <= MAX,
        "{most_threads} connection threads while refusing ({MAX} connections)"
    );
    wait_rejected(&server, (REFUSERS * REFUSALS) as u32);
    assert_eq!(server.handshake_failures(), 0.0);
    assert_eq!(
        server.metric("websocket_connections_opened_total"),
        MAX as f64,
        "a refused connection was counted as accepted"
    );
    for ws in &mut live {
        assert_echo(ws, 10);
    }

    // One leaves: the next is admitted, and the one after is refused again.
    close_normally(live.pop().unwrap());
    server.wait_settled(MAX - 1);
    live.push(server.connect());
    server.wait_settled(MAX);
    let (_, head) = upgrade(&server, "");
    assert_eq!(assert_too_many(&head, "the limit again"), 5);
    wait_rejected(&server, (REFUSERS * REFUSALS) as u32 + 1);
    // Health checks from the address are refused too: the acceptor cannot tell them apart.
    assert_eq!(support::http_get(server.addr, "/").0, 429);
    for ws in live {
        close_normally(ws);
    }
    server.wait_settled(0);
    support::assert_serves(&server.url());
}

#[test]
fn the_connect_rate_refuses_a_burst_beyond_the_bucket_and_admits_after_refill() {
    const BURST: usize = 3;
    // About one connection per second, slower on a slow machine (so the burst below stays
    // well inside one interval).
    let per_minute = ((60.0 / time_scale()).floor() as u32).max(1);
    let interval = Duration::from_secs(60) / per_minute;
    let rate = format!("{per_minute}/m,burst={BURST}");
    let server = TestServer::start(&["--max-connect-rate-per-ip", &rate]);

    let start = Instant::now();
    for n in 1..=BURST {
        let tcp = assert_upgraded(
            upgrade(&server, ""),
            &format!("connection {n} of the burst"),
        );
        drop(tcp);
    }
    let (_, head) = upgrade(&server, "");
    let burst_took = start.elapsed();
    let retry_after = assert_too_many(
        &head,
        &format!("the connection after a burst of {BURST} ({burst_took:?} after the first)"),
    );
    assert!(
        retry_after <= interval.as_secs().max(1),
        "Retry-After {retry_after} for one connection every {interval:?}"
    );
    let mut refused = 1;

    // The bucket gains one token per interval: the next connection is admitted then, not
    // before. Refused attempts take no token.
    let deadline = start + scaled(interval + SLACK);
    let admitted_after = loop {
        let (tcp, head) = upgrade(&server, "");
        if head.status == 101 {
            drop(tcp);
            break start.elapsed();
        }
        assert_too_many(&head, "before the refill");
        refused += 1;
        assert!(
            Instant::now() < deadline,
            "no connection admitted within {:?} of the burst (rate {rate})",
            scaled(interval + SLACK)
        );
        thread::sleep(Duration::from_millis(20)); // polling interval
    };
    assert!(
        admitted_after + TIMER_SLACK >= interval,
        "admitted {admitted_after:?} after the burst, before one token ({interval:?}) was back"
    );
    // That took the only token.
    assert_too_many(&upgrade(&server, "").1, "right after the refill");
    refused += 1;
    wait_rejected(&server, refused);
    assert_eq!(server.handshake_failures(), 0.0);
    assert_eq!(
        server.metric("websocket_connections_opened_total"),
        (BURST + 1) as f64
    );
    server.wait_settled(0);
}

// ----------------------------------------------------------------------------------------
// The PROXY protocol
// ----------------------------------------------------------------------------------------

#[test]
fn proxy_protocol_v1_and_v2_give_the_client_address() {
    let server = TestServer::start(&["--proxy-protocol"]);
    let v4 = addr("203.0.113.7:4444");
    let v6 = addr("[2001:db8::7]:5555");
    let other = addr("198.51.100.9:6666");

    let first = assert_upgraded(upgrade_after(&server, &proxy_v1(v4), ""), "v1");
    wait_peers(&server, &[v4]);
    let second = assert_upgraded(upgrade_after(&server, &proxy_v2(1, Some(v6)), ""), "v2");
    wait_peers(&server, &[v4, v6]);

    // A header trickling in a byte at a time, each byte its own segment.
    let mut tcp = TcpStream::connect(server.addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    for byte in proxy_v1(other) {
        tcp.write_all(&[byte]).unwrap();
    }
    tcp.write_all(upgrade_request().as_bytes()).unwrap();
    tcp.set_read_timeout(Some(patience())).unwrap();
    let head = support::read_head(&mut tcp);
    let third = assert_upgraded((tcp, head), "a trickled header");
    wait_peers(&server, &[v4, v6, other]);
    server.wait_settled(3);

    for tcp in [first, second, third] {
        echo_and_close(tcp);
    }
    server.wait_settled(0);
    assert_eq!(server.closed("peer_close", "1000"), 3.0);
    assert_eq!(server.metric("websocket_connections_opened_total"), 3.0);
    assert_eq!(server.handshake_failures(), 0.0);
}

#[test]
fn proxy_protocol_local_health_checks_and_missing_or_garbled_headers() {
    let timeout = Duration::from_millis(500);
    let server = TestServer::start(&["--proxy-protocol", "--handshake-timeout", "500ms"]);

    // LOCAL: the balancer's own connection, e.g. its health check; not a failure.
    let health = [
        &proxy_v2(0, None)[..],
        b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n",
    ]
    .concat();
    assert_eq!(send_for_head(server.addr, &health).1.status, 200);
    let health = [
        &b"PROXY UNKNOWN\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n",
    ]
    .concat();
    assert_eq!(send_for_head(server.addr, &health).1.status, 200);
    // An upgrade after LOCAL keeps the socket's own address.
    let (tcp, head) = upgrade_after(&server, &proxy_v2(0, Some(addr("203.0.113.7:4444"))), "");
    let tcp = assert_upgraded((tcp, head), "an upgrade after LOCAL");
    wait_peers(&server, &[tcp.local_addr().unwrap()]);
    echo_and_close(tcp);
    server.wait_settled(0);
    // A bare connect-and-close (a TCP health check) is not a failure either.
    drop(TcpStream::connect(server.addr).unwrap());
    assert_eq!(server.handshake_failures(), 0.0);

    // A request without the header, or with a garbled one: closed without an answer.
    let (_, head) = send_for_head(server.addr, upgrade_request().as_bytes());
    assert_eq!(head.text, "", "no header: the connection must just close");
    wait_failures(&server, 1);
    let garbled = [
        &b"PROXY TCP4 203.0.113.7 nonsense\r\n"[..],
        upgrade_request().as_bytes(),
    ]
    .concat();
    let (_, head) = send_for_head(server.addr, &garbled);
    assert_eq!(
        head.text, "",
        "a garbled header: the connection must just close"
    );
    wait_failures(&server, 2);

    // Part of a header, then silence: closed at the handshake timeout.
    let start = Instant::now();
    let (_, head) = send_for_head(server.addr, b"PROXY TCP4 203.0.");
    let took = start.elapsed();
    assert_eq!(head.text, "");
    assert!(
        took + TIMER_SLACK >= timeout && took < scaled(timeout + SLACK),
        "a partial header was closed after {took:?} (handshake timeout {timeout:?})"
    );
    wait_failures(&server, 3);
    server.wait_settled(0);
    echo_and_close(assert_upgraded(
        upgrade_after(&server, &proxy_v1(addr("203.0.113.7:4444")), ""),
        "after all that",
    ));
}

#[test]
fn the_proxy_header_comes_before_tls() {
    let pki = Pki::new("proxy-before-tls");
    let pair = pki.issue("server", &["localhost"], Use::Server);
    let (cert, key) = (pair.cert.to_str().unwrap(), pair.key.to_str().unwrap());
    let server = TestServer::start(&[
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--proxy-protocol",
        "--max-connections-per-ip",
        "1",
    ]);
    // The balancer's header in the clear, then TLS, then the upgrade.
    let wss = |source: SocketAddr| {
        let mut tcp = TcpStream::connect(server.addr).unwrap();
        tcp.set_read_timeout(Some(patience())).unwrap();
        tcp.write_all(&proxy_v2(1, Some(source))).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let session = rustls::ClientConnection::new(pki.client_config(None), name).unwrap();
        let stream = rustls::StreamOwned::new(session, tcp);
        // Err: the status of a refusal, and whether it carried Retry-After.
        match tungstenite::client(format!("wss://localhost:{}/ws", server.addr.port()), stream) {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => Err((
                response.status().as_u16(),
                response.headers().contains_key("Retry-After"),
            )),
            Err(other) => panic!("wss after a PROXY header: {other}"),
        }
    };
    let client = addr("[2001:db8::7]:4444");
    let mut ws = wss(client).unwrap_or_else(|e| panic!("wss after a PROXY header: {e:?}"));
    wait_peers(&server, &[client]);
    ws.send(tungstenite::Message::text("over TLS")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("over TLS"));
    // The same client again: its 429 comes over TLS, from the connection's thread.
    match wss(addr("[2001:db8::7]:5555")) {
        Err(refusal) => assert_eq!(refusal, (429, true)),
        Ok(_) => panic!("a second connection from the same client was admitted"),
    }
    wait_rejected(&server, 1);
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    server.wait_settled(0);
    assert_eq!(server.handshake_failures(), 0.0);
}

#[test]
fn per_address_limits_apply_to_the_proxy_protocol_address() {
    let server = TestServer::start(&["--proxy-protocol", "--max-connections-per-ip", "1"]);
    let (a, b) = (addr("203.0.113.7:4444"), addr("203.0.113.8:4444"));
    let first = assert_upgraded(upgrade_after(&server, &proxy_v1(a), ""), "from a");
    // Another client through the same balancer address.
    let second = assert_upgraded(upgrade_after(&server, &proxy_v2(1, Some(b)), ""), "from b");
    wait_peers(&server, &[a, b]);
    // The same client again, from another port: 429, answered by its connection thread.
    let again = addr("203.0.113.7:5555");
    let (_, head) = upgrade_after(&server, &proxy_v1(again), "");
    assert_eq!(assert_too_many(&head, "a again"), 5);
    wait_rejected(&server, 1);
    assert_eq!(server.handshake_failures(), 0.0);
    echo_and_close(first);
    server.wait_settled(1);
    let third = assert_upgraded(upgrade_after(&server, &proxy_v1(again), ""), "a once free");
    wait_peers(&server, &[again, b]);
    echo_and_close(second);
    echo_and_close(third);
    server.wait_settled(0);
}

// ----------------------------------------------------------------------------------------
// X-Forwarded-For and Forwarded
// ----------------------------------------------------------------------------------------

#[test]
fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
    let xff = "X-Forwarded-For: 198.51.100.1, 203.0.113.7\r\n";
    let trusted = TestServer::start(&["--trusted-proxies", "127.0.0.1/32"]);
    let first = assert_upgraded(upgrade(&trusted, xff), "X-Forwarded-For");
    wait_peers(&trusted, &[addr("203.0.113.7:0")]);
    let forwarded = "Forwarded: for=192.0.2.60;proto=http, for=\"[2001:db8::7]:4711\"\r\n";
    let second = assert_upgraded(upgrade(&trusted, forwarded), "Forwarded");
    wait_peers(
        &trusted,
        &[addr("203.0.113.7:0"), addr("[2001:db8::7]:4711")],
    );
    // Without a header, the proxy is the client.
    let third = assert_upgraded(upgrade(&trusted, ""), "no header");
    let own = third.local_addr().unwrap();
    wait_peers(
        &trusted,
        &[addr("203.0.113.7:0"), addr("[2001:db8::7]:4711"), own],
    );
    for tcp in [first, second, third] {
        echo_and_close(tcp);
    }
    trusted.wait_settled(0);

    // 127.0.0.1 is not in the trusted range: the header is ignored.
    let untrusted = TestServer::start(&["--trusted-proxies", "10.0.0.0/8,::1"]);
    let tcp = assert_upgraded(upgrade(&untrusted, xff), "from an untrusted peer");
    wait_peers(&untrusted, &[tcp.local_addr().unwrap()]);
    echo_and_close(tcp);
    untrusted.wait_settled(0);
}

#[test]
fn per_address_limits_apply_to_the_forwarded_address() {
    let server = TestServer::start(&[
        "--trusted-proxies",
        "127.0.0.1",
        "--max-connections-per-ip",
        "1",
    ]);
    let from = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");
    let first = assert_upgraded(upgrade(&server, &from("203.0.113.7")), "from a");
    let second = assert_upgraded(upgrade(&server, &from("203.0.113.8")), "from b");
    wait_peers(&server, &[addr("203.0.113.7:0"), addr("203.0.113.8:0")]);
    let (_, head) = upgrade(&server, &from("203.0.113.7"));
    assert_too_many(&head, "a again");
    wait_rejected(&server, 1);
    echo_and_close(first);
    echo_and_close(second);
    server.wait_settled(0);
}

// ----------------------------------------------------------------------------------------
// Subprotocols
// ----------------------------------------------------------------------------------------

#[test]
fn the_first_offered_subprotocol_the_server_speaks_is_answered() {
    let server = TestServer::start(&["--subprotocols", "chat,superchat"]);
    let offer = |value: &str| format!("Sec-WebSocket-Protocol: {value}\r\n");
    for (offered, chosen) in [
        (offer("superchat, chat"), Some("superchat")),
        (offer("mqtt, chat"), Some("chat")),
        (format!("{}{}", offer("mqtt"), offer("chat")), Some("chat")),
        (offer("mqtt"), None),
        (String::new(), None),
    ] {
        let (tcp, head) = upgrade(&server, &offered);
        assert_eq!(head.status, 101, "{offered:?}: {}", head.text);
        assert_eq!(
            head.header("Sec-WebSocket-Protocol"),
            chosen,
            "{offered:?}: {}",
            head.text
        );
        echo_and_close(tcp);
    }
    // tungstenite's client checks the answer against its offer.
    let mut request = server.url().into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("v2.chat, superchat"),
    );
    let (mut ws, response) = tungstenite::connect(request).unwrap();
    assert_eq!(
        response.headers().get("Sec-WebSocket-Protocol"),
        Some(&HeaderValue::from_static("superchat"))
    );
    assert_echo(&mut ws, 64);
    close_normally(ws);
    server.wait_settled(0);
}

// ----------------------------------------------------------------------------------------
// As a process: flag errors, log lines with the real address, the token kept out of them
// ----------------------------------------------------------------------------------------

#[test]
fn bad_access_values_exit_2_and_say_what_is_wrong() {
    const FREE: [&str; 6] = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"];
    /// Flags, environment variables, what the error must mention.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case; 7] = [
        (
            &["--trusted-proxies", "10.0.0.1/8"],
            &[],
            &["--trusted-proxies", "10.0.0.0/8"],
        ),
        (
            &["--allowed-origins", "app.example.com"],
            &[],
            &["--allowed-origins", "scheme"],
        ),
        (
            &["--auth-token-file", "/nonexistent/token"],
            &[],
            &[
                "--auth-token-file",
                "cannot read the token file",
                "/nonexistent/token",
            ],
        ),
        (
            &["--max-connect-rate-per-ip", "fast"],
            &[],
            &["--max-connect-rate-per-ip", "20/s"],
        ),
        (
            &["--max-connections-per-ip", "0"],
            &[],
            &["--max-connections-per-ip"],
        ),
        (
            &["--subprotocols", "a b"],
            &[],
            &["--subprotocols", "invalid subprotocol"],
        ),
        (
            &[],
            &[("WEBSOCKET_TEST_TRUSTED_PROXIES", "10.0.0.0/8,bogus")],
            &["WEBSOCKET_TEST_TRUSTED_PROXIES", "bogus"],
        ),
    ];
    for (args, env, mentions) in cases {
        let args = [&FREE[..], args].concat();
        let proc = Proc::start_with_env("server", &args, env);
        let (status, output) = proc.finish(patience());
        assert_eq!(status.code(), Some(2), "{args:?} {env:?}:\n{output}");
        for mention in mentions {
            assert!(
                output.contains(mention),
                "{args:?} {env:?}: no {mention:?} in:\n{output}"
            );
        }
        assert!(!output.contains("Listening"), "{output}");
    }
    // A token with a space: refused, without repeating it.
    let proc = Proc::start_with_env(
        "server",
        &FREE,
        &[("WEBSOCKET_TEST_AUTH_TOKEN", "secret with spaces")],
    );
    let (status, output) = proc.finish(patience());
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("WEBSOCKET_TEST_AUTH_TOKEN"), "{output}");
    assert!(
        !output.contains("secret with"),
        "the error repeats the token: {output}"
    );
}

#[test]
fn logs_name_the_client_behind_the_balancer_and_never_the_token() {
    let server = support::Server::start_with_env(
        &["--proxy-protocol", "--log-level", "trace"],
        &[("WEBSOCKET_TEST_AUTH_TOKEN", TOKEN)],
    );
    server.proc.wait_for(
        "Access: bearer token required; PROXY protocol required",
        patience(),
    );
    let wrong = "not-the-token-at-all";
    let refused = [
        &proxy_v1(addr("198.51.100.2:1000"))[..],
        upgrade_request_with(&format!("Authorization: Bearer {wrong}\r\n")).as_bytes(),
    ]
    .concat();
    assert_eq!(send_for_head(server.addr, &refused).1.status, 401);
    server.proc.wait_for(
        "Rejected request from 198.51.100.2:1000 via 127.0.0.1:",
        patience(),
    );

    let right = [
        &proxy_v1(addr("203.0.113.7:4444"))[..],
        upgrade_request_with(&format!("Authorization: Bearer {TOKEN}\r\n")).as_bytes(),
    ]
    .concat();
    let (tcp, head) = send_for_head(server.addr, &right);
    let tcp = assert_upgraded((tcp, head), "the right token");
    let connected = server
        .proc
        .wait_for("Connected: 203.0.113.7:4444 via 127.0.0.1:", patience());
    echo_and_close(tcp);
    let disconnected = server
        .proc
        .wait_for("Disconnected: 203.0.113.7:4444 via 127.0.0.1:", patience());
    assert!(disconnected.contains("close 1000"), "{disconnected}");
    assert!(connected.contains("INFO"), "{connected}");

    server.proc.signal("TERM");
    let (status, output) = server.proc.finish(patience());
    assert!(status.success(), "{output}");
    assert!(!output.contains(TOKEN), "the token was logged:\n{output}");
    assert!(
        !output.contains(wrong),
        "a presented token was logged:\n{output}"
    );
}
