//! The client's opening handshake as a real ingress sees it, and outbound proxies, with the
//! client in this process ([`TestClient`]). A [`Recorder`] written here captures every
//! request head and answers it as a test says (a 101, an nginx refusal); a [`ConnectProxy`]
//! tunnels CONNECT requests like squid or a corporate proxy, or refuses them.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use websocket_test::client::{ClientStats, Counter, Failure};
use websocket_test::config::parse_duration;

use crate::harness::{TestClient, TestServer, FAST};
use crate::pki::{Pki, Use};
use crate::support::{self, patience};

/// The User-Agent the client sends.
pub const USER_AGENT: &str = concat!("websocket-test/", env!("CARGO_PKG_VERSION"));

/// For what normally takes milliseconds (the wait helpers scale it).
const SOON: Duration = Duration::from_secs(10);

/// The harness's `--reconnect-delay`.
fn reconnect_delay() -> Duration {
    let (_, value) = FAST
        .iter()
        .find(|(flag, _)| *flag == "--reconnect-delay")
        .expect("the harness sets a reconnect delay");
    parse_duration(value).unwrap()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads from `tcp` until a blank line ends an HTTP head; returns the head without it.
/// Byte by byte, so nothing after the head is consumed (a tunnel's first bytes).
fn read_head(tcp: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed after {:?}", String::from_utf8_lossy(&head)),
            ));
        }
        head.push(byte[0]);
    }
    head.truncate(head.len() - 4);
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// A request head as it arrived.
#[derive(Debug, Clone)]
pub struct Request {
    /// The whole head, without the blank line.
    pub head: String,
}

impl Request {
    /// The request line, e.g. `GET /ws HTTP/1.1`.
    pub fn line(&self) -> &str {
        self.head.lines().next().unwrap_or_default()
    }

    /// Every value of header `name`, in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim())
            .collect()
    }

    /// The only value of header `name`; panics if it is missing or repeated.
    pub fn header(&self, name: &str) -> &str {
        match self.all(name)[..] {
            [value] => value,
            ref values => panic!("{name}: {values:?} in\n{}", self.head),
        }
    }
}

/// How a [`Recorder`] answers a request.
pub enum Answer {
    /// 101 with the right accept key and these extra header lines (each ending in CRLF),
    /// then a close: the client reconnects after its delay.
    Upgrade(String),
    /// Like `Upgrade`, and the connection stays open (unread) until the recorder is dropped.
    Hold(String),
    /// These bytes, then a close.
    Raw(String),
}

/// An HTTP server on 127.0.0.1 that records every request head and answers it as told:
/// a WebSocket server, an ingress controller or a load balancer, as a test needs.
pub struct Recorder {
    /// Where it listens.
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Recorder {
    /// Starts answering request `n` (1-based) with `answer(n, request)`.
    pub fn start(answer: impl Fn(usize, &Request) -> Answer + Send + 'static) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let held = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = thread::Builder::new()
            .name("recorder".into())
            .spawn({
                let (requests, held, stop) = (requests.clone(), held.clone(), stop.clone());
                move || {
                    for tcp in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(mut tcp) = tcp else { continue };
                        tcp.set_read_timeout(Some(patience())).unwrap();
                        // The client sends its request at once; one that does not is a
                        // failure the test sees as a missing request.
                        let Ok(head) = read_head(&mut tcp) else {
                            continue;
                        };
                        let request = Request { head };
                        let n = {
                            let mut requests = lock(&requests);
                            requests.push(request.clone());
                            requests.len()
                        };
                        let (response, hold) = match answer(n, &request) {
                            Answer::Upgrade(extra) => (switching(&request, &extra), false),
                            Answer::Hold(extra) => (switching(&request, &extra), true),
                            Answer::Raw(bytes) => (bytes, false),
                        };
                        let _ = tcp.write_all(response.as_bytes());
                        if hold {
                            lock(&held).push(tcp);
                        } else {
                            // The whole request was read: this close is a FIN, never a
                            // reset that could destroy the answer.
                            let _ = tcp.shutdown(Shutdown::Write);
                        }
                    }
                }
            })
            .unwrap();
        Recorder {
            addr,
            requests,
            held,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// The requests so far.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.requests).clone()
    }

    /// Waits up to `within` (scaled) until `n` requests have arrived; returns them.
    pub fn wait_for(&self, n: usize, within: Duration) -> Vec<Request> {
        support::wait_within(&format!("{n} requests reach the recorder"), within, || {
            lock(&self.requests).len() >= n
        });
        self.requests()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for tcp in lock(&self.held).drain(..) {
            let _ = tcp.shutdown(Shutdown::Both);
        }
    }
}

/// A 101 answering `request`'s key, with `extra` header lines.
fn switching(request: &Request, extra: &str) -> String {
    let accept =
        tungstenite::handshake::derive_accept_key(request.header("Sec-WebSocket-Key").as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
    )
}

/// What nginx 1.22 answers when an ingress denies a request.
pub const NGINX_403: &str = "HTTP/1.1 403 Forbidden\r\nServer: nginx/1.22.1\r\n\
    Date: Thu, 26 Nov 2026 05:35:07 GMT\r\nContent-Type: text/html\r\nContent-Length: 153\r\n\
    Connection: close\r\n\r\n<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n\
    <center><h1>403 Forbidden</h1></center>\r\n<hr><center>nginx/1.22.1</center>\r\n</body>\r\n\
    </html>\r\n";

/// A CONNECT proxy on 127.0.0.1: it records every request head, then refuses with a fixed
/// answer, or connects to the target (or to one fixed address, whatever the request
/// names), answers 200 and splices both ways on a thread per direction.
pub struct ConnectProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

/// What a [`ConnectProxy`] does with a CONNECT.
#[derive(Clone)]
pub enum Tunnel {
    /// Connects to the address the request names.
    AsAsked,
    /// Connects here, whatever the request names (a host name, `[::1]`).
    To(SocketAddr),
    /// Answers this and closes.
    Refuse(&'static str),
}

impl ConnectProxy {
    /// Starts a proxy that handles every CONNECT as `tunnel` says.
    pub fn start(tunnel: Tunnel) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = thread::Builder::new()
            .name("proxy".into())
            .spawn({
                let (requests, sockets, threads, stop) = (
                    requests.clone(),
                    sockets.clone(),
                    threads.clone(),
                    stop.clone(),
                );
                move || {
                    for (n, tcp) in listener.incoming().enumerate() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(tcp) = tcp else { continue };
                        lock(&sockets).push(tcp.try_clone().unwrap());
                        let (tunnel, requests, sockets) =
                            (tunnel.clone(), requests.clone(), sockets.clone());
                        let thread = thread::Builder::new()
                            .name(format!("proxy-{}", n + 1))
                            .spawn(move || serve_connect(tcp, &tunnel, &requests, &sockets))
                            .unwrap();
                        lock(&threads).push(thread);
                    }
                }
            })
            .unwrap();
        ConnectProxy {
            addr,
            requests,
            sockets,
            threads,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// `http://ADDR` (with `userinfo@` when given).
    pub fn url(&self, userinfo: Option<&str>) -> String {
        match userinfo {
            Some(userinfo) => format!("http://{userinfo}@{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    /// The CONNECT requests so far.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.requests).clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for tcp in lock(&self.sockets).drain(..) {
            let _ = tcp.shutdown(Shutdown::Both);
        }
        for thread in lock(&self.threads).drain(..) {
            let _ = thread.join();
        }
    }
}

/// One proxy connection: reads the CONNECT, then refuses or tunnels until either side ends.
fn serve_connect(
    mut client: TcpStream,
    tunnel: &Tunnel,
    requests: &Mutex<Vec<Request>>,
    sockets: &Mutex<Vec<TcpStream>>,
) {
    client.set_read_timeout(Some(patience())).unwrap();
    let Ok(head) = read_head(&mut client) else {
        return;
    };
    let request = Request { head };
    lock(requests).push(request.clone());
    let upstream = match tunnel {
        Tunnel::Refuse(answer) => {
            let _ = client.write_all(answer.as_bytes());
            let _ = client.shutdown(Shutdown::Write);
            return;
        }
        Tunnel::To(addr) => *addr,
        Tunnel::AsAsked => {
            let target = request.line().split(' ').nth(1).unwrap_or_default();
            target
                .parse()
                .unwrap_or_else(|e| panic!("CONNECT target {target:?}: {e}"))
        }
    };
    let Ok(upstream) = TcpStream::connect(upstream) else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    lock(sockets).push(upstream.try_clone().unwrap());
    client.set_read_timeout(None).unwrap();
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .unwrap();
    let name = format!("{}-up", thread::current().name().unwrap_or("proxy"));
    let (from_upstream, to_client) = (upstream.try_clone().unwrap(), client.try_clone().unwrap());
    let down = thread::Builder::new()
        .name(name)
        .spawn(move || splice(from_upstream, to_client))
        .unwrap();
    splice(client, upstream);
    let _ = down.join();
}

/// Copies `from` to `to` until `from` ends, then half-closes `to`.
fn splice(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

/// The client's counters, for failure messages.
fn describe(stats: &ClientStats) -> String {
    let failed: Vec<_> = Failure::ALL
        .iter()
        .map(|&cause| (cause.label(), stats.failed(cause)))
        .filter(|&(_, n)| n > 0)
        .collect();
    format!(
        "connects={} pongs={} failed={failed:?}",
        stats.get(Counter::Connects),
        stats.get(Counter::Pongs)
    )
}

/// Waits up to `within` (scaled) until the client's counters satisfy `condition`.
fn wait_for(
    client: &TestClient,
    what: &str,
    within: Duration,
    condition: impl Fn(&ClientStats) -> bool,
) {
    let stats = client.stats();
    support::wait_within(&format!("{what} ({})", describe(stats)), within, || {
        condition(stats)
    });
}

// ----------------------------------------------------------------------------------------
// The request
// ----------------------------------------------------------------------------------------

#[test]
fn headers_origin_subprotocols_and_user_agent_arrive_on_every_reconnect() {
    let recorder = Recorder::start(|_, _| Answer::Upgrade(String::new()));
    let client = TestClient::start(
        recorder.addr,
        &[
            "--origin",
            "https://app.example.com",
            "--subprotocol",
            "chat",
            "--subprotocol",
            "superchat",
            "--header",
            "X-Team: sre",
            "--header",
            "X-Trace:  a b  ",
        ],
    );
    // The recorder closes each connection after its 101: every request is a reconnect.
    let requests = recorder.wait_for(3, reconnect_delay() * 3 + SOON);
    let mut keys = Vec::new();
    for request in &requests {
        assert_eq!(request.line(), "GET /ws HTTP/1.1");
        assert_eq!(request.header("Host"), recorder.addr.to_string());
        assert_eq!(request.header("User-Agent"), USER_AGENT);
        assert_eq!(request.header("Origin"), "https://app.example.com");
        assert_eq!(request.header("Sec-WebSocket-Protocol"), "chat, superchat");
        assert_eq!(request.header("X-Team"), "sre");
        assert_eq!(request.header("X-Trace"), "a b");
        assert_eq!(request.header("Upgrade"), "websocket");
        assert_eq!(request.header("Sec-WebSocket-Version"), "13");
        assert!(request.all("Authorization").is_empty(), "{}", request.head);
        keys.push(request.header("Sec-WebSocket-Key").to_owned());
    }
    keys.dedup();
    assert_eq!(keys.len(), requests.len(), "a fresh key on every connect");
    // Offered subprotocols the server did not pick are no failure.
    wait_for(&client, "three connects", SOON, |s| {
        s.get(Counter::Connects) >= 3
    });
    assert_eq!(client.stats().get(Counter::ConnectFailures), 0);
}

#[test]
fn host_follows_the_url_with_its_port_and_brackets_unless_a_header_replaces_it() {
    // Names no resolver knows and [::1] reach a recorder on 127.0.0.1 through a proxy that
    // connects there whatever the CONNECT names.
    let cases: [(&[&str], &str, &str, &str); 5] = [
        (
            &["--url", "ws://[::1]:8080/ws"],
            "[::1]:8080",
            "GET /ws",
            "[::1]:8080",
        ),
        (
            &["--url", "ws://echo.example/ws"],
            "echo.example:80",
            "GET /ws",
            "echo.example",
        ),
        (
            &["--url", "ws://Echo.Example:3003/chat?room=1"],
            "Echo.Example:3003",
            "GET /chat?room=1",
            "Echo.Example:3003",
        ),
        (
            &[
                "--url",
                "ws://echo.example:8080/ws",
                "--header",
                "Host: front.example",
            ],
            "echo.example:8080",
            "GET /ws",
            "front.example",
        ),
        (
            &[
                "--host",
                "::1",
                "--port",
                "80",
                "--header",
                "user-agent: probe/2",
            ],
            "[::1]:80",
            "GET /ws",
            "[::1]",
        ),
    ];
    for (i, (flags, connect, get, host)) in cases.into_iter().enumerate() {
        // Fresh ones for each client, so no late request of the last one can mix in.
        let recorder = Recorder::start(|_, _| Answer::Upgrade(String::new()));
        let proxy = ConnectProxy::start(Tunnel::To(recorder.addr));
        let proxy_url = proxy.url(None);
        let mut args = vec!["--proxy", &proxy_url];
        args.extend_from_slice(flags);
        let client = TestClient::start_with(&args);
        let request = recorder.wait_for(1, SOON).swap_remove(0);
        drop(client);
        let tunnel = &proxy.requests()[0];
        assert_eq!(
            tunnel.line(),
            format!("CONNECT {connect} HTTP/1.1"),
            "{flags:?}"
        );
        assert_eq!(tunnel.header("Host"), connect, "{flags:?}");
        assert_eq!(request.line(), format!("{get} HTTP/1.1"), "{flags:?}");
        assert_eq!(request.header("Host"), host, "{flags:?}");
        let agent = if i == 4 { "probe/2" } else { USER_AGENT };
        assert_eq!(request.header("User-Agent"), agent, "{flags:?}");
    }
}

// ----------------------------------------------------------------------------------------
// The answer
// ----------------------------------------------------------------------------------------

#[test]
fn a_subprotocol_the_server_picked_is_a_connect_and_one_never_offered_a_failed_handshake() {
    let recorder =
        Recorder::start(|_, _| Answer::Upgrade("Sec-WebSocket-Protocol: superchat\r\n".into()));
    let picked = TestClient::start(
        recorder.addr,
        &["--subprotocol", "chat", "--subprotocol", "superchat"],
    );
    wait_for(&picked, "two connects", SOON, |s| {
        s.get(Counter::Connects) >= 2
    });
    assert_eq!(picked.stats().get(Counter::ConnectFailures), 0);
    drop(picked);

    for flags in [&["--subprotocol", "chat"][..], &[][..]] {
        let unasked = TestClient::start(recorder.addr, flags);
        wait_for(
            &unasked,
            &format!("{flags:?}: two failed handshakes"),
            reconnect_delay() + SOON,
            |s| s.failed(Failure::Handshake) >= 2,
        );
        let stats = unasked.stats();
        assert_eq!(stats.get(Counter::Connects), 0, "{}", describe(stats));
        assert_eq!(
            stats.get(Counter::ConnectFailures),
            stats.failed(Failure::Handshake),
            "{}",
            describe(stats)
        );
    }
}

#[test]
fn refused_upgrades_count_as_refused_and_are_retried() {
    let nginx = Recorder::start(|_, _| Answer::Raw(NGINX_403.into()));
    let client = TestClient::start(nginx.addr, &[]);
    wait_for(&client, "two refusals", reconnect_delay() + SOON, |s| {
        s.failed(Failure::Refused) >= 2
    });
    assert_eq!(client.stats().get(Counter::Connects), 0);
    drop(client);

    // Our own server's 404 for a path it does not serve.
    let server = TestServer::start(&[]);
    let client = TestClient::start(server.addr, &["--path", "/nope"]);
    wait_for(&client, "a refusal", SOON, |s| {
        s.failed(Failure::Refused) >= 1
    });
    let stats = client.stats();
    assert_eq!(stats.get(Counter::Connects), 0, "{}", describe(stats));
    assert_eq!(
        stats.get(Counter::ConnectFailures),
        stats.failed(Failure::Refused),
        "{}",
        describe(stats)
    );
}

// ----------------------------------------------------------------------------------------
// Tokens
// ----------------------------------------------------------------------------------------

#[test]
fn the_token_is_sent_and_its_file_read_again_on_every_connect() {
    let recorder = Recorder::start(|_, _| Answer::Upgrade(String::new()));
    let client = TestClient::start(recorder.addr, &["--auth-token", "fixed-t0ken"]);
    let request = recorder.wait_for(1, SOON).swap_remove(0);
    assert_eq!(request.header("Authorization"), "Bearer fixed-t0ken");
    drop(client);

    let pki = Pki::new("token"); // only for its directory
    let file = pki.path("token");
    std::fs::write(&file, "first-t0ken\n").unwrap();
    let path = file.to_str().unwrap();
    let recorder = Recorder::start(|_, _| Answer::Upgrade(String::new()));
    let client = TestClient::start(recorder.addr, &["--auth-token-file", path]);
    let first = recorder.wait_for(2, SOON);
    for request in first {
        assert_eq!(request.header("Authorization"), "Bearer first-t0ken");
    }
    // Rotated as Kubernetes does it: a new file renamed into place.
    std::fs::write(pki.path("next"), "second-t0ken").unwrap();
    std::fs::rename(pki.path("next"), &file).unwrap();
    // The next request to arrive may come from an attempt that read the file before the
    // rename; the attempt after it starts later, so it reads the new token.
    let seen = recorder.requests().len();
    let requests = recorder.wait_for(seen + 2, reconnect_delay() * 2 + SOON);
    assert_eq!(
        requests[seen + 1].header("Authorization"),
        "Bearer second-t0ken"
    );
    assert!(client.stats().get(Counter::Connects) >= 2);
}

// ----------------------------------------------------------------------------------------
// Proxies
// ----------------------------------------------------------------------------------------

#[test]
fn a_ws_connection_goes_through_a_connect_proxy_with_basic_credentials() {
    let server = TestServer::start(&[]);
    let proxy = ConnectProxy::start(Tunnel::AsAsked);
    let client = TestClient::start(server.addr, &["--proxy", &proxy.url(Some("sre:pa%3Ass"))]);
    // Pongs prove the tunnel carries both ways.
    wait_for(&client, "two pongs through the tunnel", SOON, |s| {
        s.get(Counter::Pongs) >= 2
    });
    server.wait_settled(1);
    let connect = &proxy.requests()[0];
    assert_eq!(connect.line(), format!("CONNECT {} HTTP/1.1", server.addr));
    assert_eq!(connect.header("Host"), server.addr.to_string());
    assert_eq!(connect.header("User-Agent"), USER_AGENT);
    // base64("sre:pa:ss")
    assert_eq!(connect.header("Proxy-Authorization"), "Basic c3JlOnBhOnNz");
}

#[test]
fn a_wss_connection_does_tls_to_the_target_inside_the_tunnel() {
    let pki = Pki::new("proxy");
    let pair = pki.issue("server", &["localhost", "127.0.0.1"], Use::Server);
    let (cert, key, ca) = (
        pair.cert.to_str().unwrap(),
        pair.key.to_str().unwrap(),
        pki.ca.to_str().unwrap(),
    );
    let server = TestServer::start(&["--tls-cert", cert, "--tls-key", key]);
    // The name is the proxy's to resolve (the client resolves only the proxy): this one
    // sends every tunnel to the server on 127.0.0.1. TLS inside it checks "localhost".
    let proxy = ConnectProxy::start(Tunnel::To(server.addr));
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    let client =
        TestClient::start_with(&["--url", &url, "--ca-file", ca, "--proxy", &proxy.url(None)]);
    wait_for(
        &client,
        "two pongs over wss through the tunnel",
        SOON,
        |s| s.get(Counter::Pongs) >= 2,
    );
    server.wait_settled(1);
    assert_eq!(
        proxy.requests()[0].line(),
        format!("CONNECT localhost:{} HTTP/1.1", server.addr.port())
    );
    assert_eq!(client.stats().get(Counter::ConnectFailures), 0);
}

#[test]
fn a_proxy_that_refuses_or_cannot_be_reached_is_a_proxy_failure() {
    let server = TestServer::start(&[]);
    let refusing = ConnectProxy::start(Tunnel::Refuse(
        "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\n\
         Content-Length: 0\r\n\r\n",
    ));
    let client = TestClient::start(server.addr, &["--proxy", &refusing.url(None)]);
    wait_for(&client, "two 407s", reconnect_delay() + SOON, |s| {
        s.failed(Failure::Proxy) >= 2
    });
    drop(client);

    let (_reserved, nowhere) = support::refusing_addr();
    let client = TestClient::start(server.addr, &["--proxy", &format!("http://{nowhere}")]);
    wait_for(&client, "an unreachable proxy", SOON, |s| {
        s.failed(Failure::Proxy) >= 1
    });
    let stats = client.stats();
    assert_eq!(stats.get(Counter::Connects), 0, "{}", describe(stats));
    assert_eq!(
        stats.get(Counter::ConnectFailures),
        stats.failed(Failure::Proxy),
        "{}",
        describe(stats)
    );
    assert_eq!(server.state().connections(), 0);
}

#[test]
fn no_proxy_sends_matching_hosts_around_the_proxy() {
    let server = TestServer::start(&[]);
    let (_reserved, nowhere) = support::refusing_addr();
    let proxy = format!("http://{nowhere}");
    for list in ["127.0.0.1", "127.0.0.0/8", "*", "localhost, 127.0.0.1"] {
        let client = TestClient::start(server.addr, &["--proxy", &proxy, "--no-proxy", list]);
        wait_for(
            &client,
            &format!("--no-proxy {list:?}: a pong"),
            SOON,
            |s| s.get(Counter::Pongs) >= 1,
        );
        assert_eq!(client.stats().get(Counter::ConnectFailures), 0, "{list}");
    }
    // A list that does not match leaves the proxy in the way.
    let client = TestClient::start(
        server.addr,
        &["--proxy", &proxy, "--no-proxy", "127.0.0.2,localhost"],
    );
    wait_for(&client, "the proxy is tried", SOON, |s| {
        s.failed(Failure::Proxy) >= 1
    });
}
