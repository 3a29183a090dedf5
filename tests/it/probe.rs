//! The client as a connection-survival probe: how a restart, a cut and silence show in its
//! counters and metrics, the reconnect schedule, `--keepalive none`, and its metrics port.

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::Message;
use websocket_test::client::Counter;
use websocket_test::ending::Reason;

use crate::harness::{TestClient, TestServer};
use crate::support::{self, patience, TIMER_SLACK};

/// The client's metrics address (`--metrics-port 0 --metrics-host 127.0.0.1`).
const METRICS: [&str; 4] = ["--metrics-port", "0", "--metrics-host", "127.0.0.1"];

#[test]
fn a_server_restart_moves_the_counters_by_one_disconnect_and_one_reconnect() {
    let mut first = TestServer::start(&[]);
    let port = first.addr.port();
    let client = TestClient::start(first.addr, &METRICS);
    let metrics = client.metrics.expect("a metrics port");
    client.wait("connected", Duration::from_secs(5), |s| {
        s.connections_up() == 1
    });
    assert_eq!(support::http_get(metrics, "/readyz").0, 200);

    first.shut_down();
    first.wait_stopped(Duration::from_secs(10));
    // Down: not ready. The loss is one disconnect, by the server's Close 1001.
    client.wait("the loss", Duration::from_secs(5), |s| {
        s.connections_up() == 0
    });
    assert_eq!(support::http_get(metrics, "/readyz").0, 503);
    let second = TestServer::start_on(port, &[]);
    client.wait("the reconnect", Duration::from_secs(5), |s| {
        s.get(Counter::Reconnects) == 1 && s.connections_up() == 1
    });
    second.wait_settled(1);

    let stats = client.stats();
    assert_eq!(stats.ended_with(Reason::PeerClose, Some(1001)), 1);
    assert_eq!(stats.get(Counter::Losses), 1);
    for (series, value) in [
        ("websocket_client_connections", 1.0),
        ("websocket_client_reconnects_total", 1.0),
        (
            "websocket_client_disconnects_total{code=\"1001\",reason=\"peer_close\"}",
            1.0,
        ),
        ("websocket_client_connection_duration_seconds_count", 1.0),
    ] {
        assert_eq!(support::metric(metrics, series), value, "{series}");
    }
    assert!(support::metric(metrics, "websocket_client_pongs_total") >= 0.0);
    assert_eq!(support::http_get(metrics, "/readyz").0, 200);
}

/// Records when each connection attempt arrives, and closes it.
struct Arrivals {
    times: Arc<Mutex<Vec<Instant>>>,
}

impl Arrivals {
    fn listen(port: u16) -> Arrivals {
        let deadline = Instant::now() + patience();
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(listener) => break listener,
                Err(error) => assert!(Instant::now() < deadline, "rebind {port}: {error}"),
            }
            thread::sleep(Duration::from_millis(5)); // polling interval
        };
        let times = Arc::new(Mutex::new(Vec::new()));
        thread::spawn({
            let times = times.clone();
            move || {
                for tcp in listener.incoming() {
                    let Ok(tcp) = tcp else { return };
                    times.lock().unwrap().push(Instant::now());
                    drop(tcp);
                }
            }
        });
        Arrivals { times }
    }

    fn times(&self) -> Vec<Instant> {
        self.times.lock().unwrap().clone()
    }
}

#[test]
fn connections_cut_together_come_back_spread_over_the_jitter_window() {
    const CONNECTIONS: usize = 200;
    const DELAY: Duration = Duration::from_secs(1);
    const JITTER: f64 = 0.5;
    let mut server = TestServer::start(&[]);
    let port = server.addr.port();
    let client = TestClient::start(
        server.addr,
        &[
            "--connections",
            "200",
            "--reconnect-delay",
            "1s",
            "--reconnect-max-delay",
            "1s",
            "--reconnect-jitter",
            "0.5",
            "--ping-interval",
            "10s",
        ],
    );
    client.wait("200 connections", Duration::from_secs(10), |s| {
        s.connections_up() == CONNECTIONS as i64
    });
    let cut = Instant::now();
    server.shut_down();
    server.wait_stopped(Duration::from_secs(10));
    let arrivals = Arrivals::listen(port);
    support::wait_within(
        "every connection tries again",
        DELAY.mul_f64(1.0 + JITTER) + Duration::from_secs(3),
        || arrivals.times().len() >= CONNECTIONS,
    );
    let times = arrivals.times();
    let first = times.iter().min().unwrap().duration_since(cut);
    let last = times.iter().max().unwrap().duration_since(cut);
    // Nobody came back before the shortest wait the jitter allows...
    assert!(
        first >= DELAY.mul_f64(1.0 - JITTER) - TIMER_SLACK,
        "a connection came back {first:?} after the cut"
    );
    // ... and they did not come back in one wave: uniform over a 1 s window, 200 arrivals
    // span most of it (a wave would span milliseconds).
    assert!(
        last - first >= DELAY.mul_f64(JITTER),
        "{CONNECTIONS} reconnects arrived within {:?}",
        last - first
    );
}

#[test]
fn keepalive_none_sends_no_frame_and_still_answers_pings() {
    const LISTEN: Duration = Duration::from_millis(600);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let peer = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(LISTEN)).unwrap();
        let mut ws = tungstenite::accept(tcp).unwrap();
        // Six of the client's 100 ms ping intervals without a frame from it.
        let silent = match ws.read() {
            Err(tungstenite::Error::Io(e)) => {
                matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
            other => panic!("the client sent {other:?}"),
        };
        // It still answers a ping of ours.
        ws.get_mut().set_read_timeout(Some(patience())).unwrap();
        ws.send(Message::Ping(b"there?".to_vec().into())).unwrap();
        let Message::Pong(pong) = ws.read().unwrap() else {
            panic!("expected a pong");
        };
        (silent, pong, ws)
    });
    let client = TestClient::start(addr, &["--keepalive", "none"]);
    // The peer hands its socket back, so the connection is still up while we look.
    let (silent, pong, _ws) = peer.join().unwrap();
    assert!(silent);
    assert_eq!(&pong[..], b"there?");
    assert_eq!(client.stats().get(Counter::Pings), 0);
    assert_eq!(client.stats().get(Counter::Losses), 0);
}

#[test]
fn the_metrics_port_shows_live_connections_with_their_threads() {
    let server = TestServer::start(&[]);
    let client = TestClient::start(
        server.addr,
        &[&METRICS[..], &["--connections", "2"]].concat(),
    );
    let metrics = client.metrics.expect("a metrics port");
    client.wait(
        "two connections with a round trip",
        Duration::from_secs(5),
        |s| s.connections_up() == 2 && s.get(Counter::Pongs) >= 2,
    );
    let (status, response) = support::http_get(metrics, "/debug/connections");
    assert_eq!(status, 200, "{response}");
    for n in [1, 2] {
        assert!(
            response.contains(&format!("\"thread\": \"client-{n}\"")),
            "{response}"
        );
    }
    assert!(
        response.contains(&format!("\"peer\": \"{}\"", server.url())),
        "{response}"
    );
    // The thread ids are this process's threads.
    let tids: Vec<u32> = response
        .split("\"tid\": ")
        .skip(1)
        .filter_map(|rest| rest.split(',').next()?.parse().ok())
        .collect();
    assert_eq!(tids.len(), 2, "{response}");
    for tid in tids {
        assert!(
            std::path::Path::new(&format!("/proc/self/task/{tid}")).exists(),
            "no thread {tid}"
        );
    }
    let (_, body) = support::http_get(metrics, "/metrics");
    for family in [
        "websocket_client_connections 2",
        "websocket_client_connect_failures_total{cause=\"tls\"} 0",
        "# TYPE websocket_client_ping_rtt_seconds histogram",
        "# TYPE websocket_client_echo_rtt_seconds histogram",
    ] {
        assert!(body.contains(family), "no {family:?} in\n{body}");
    }
    assert!(support::metric(metrics, "websocket_client_ping_rtt_seconds_count") >= 2.0);
}

/// A TCP proxy that cuts a connection through it after `idle` without a byte either way, as
/// nginx's `proxy_read_timeout` or a load balancer's idle timeout does.
struct IdleCutProxy {
    addr: SocketAddr,
}

impl IdleCutProxy {
    fn start(target: SocketAddr, idle: Duration) -> IdleCutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let last = Arc::new(Mutex::new(Instant::now()));
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let last = last.clone();
                    thread::spawn(move || splice(from, to, &last, idle));
                }
            }
        });
        IdleCutProxy { addr }
    }
}

/// Copies `from` to `to` until either ends or nothing went either way for `idle`.
fn splice(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    last: &Mutex<Instant>,
    idle: Duration,
) {
    use std::io::{Read, Write};
    // The watch interval: how often the proxy looks at the idle clock.
    from.set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                *last.lock().unwrap() = Instant::now();
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if last.lock().unwrap().elapsed() >= idle {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

#[test]
fn the_idle_timeout_finder_reports_the_limit_a_proxy_enforces() {
    const IDLE: Duration = Duration::from_millis(400);
    const PRECISION: Duration = Duration::from_millis(50);
    let server = TestServer::start(&[]);
    let proxy = IdleCutProxy::start(server.addr, IDLE);
    let mut client = TestClient::start(
        proxy.addr,
        &[
            "--find-idle-timeout",
            "--find-idle-start",
            "100ms",
            "--find-idle-precision",
            "50ms",
            "--find-idle-max",
            "10s",
        ],
    );
    client.wait("the search ends", Duration::from_secs(20), |s| {
        s.idle_limit().is_some()
    });
    let limit = client.stats().idle_limit().unwrap();
    let died = limit.died.expect("the proxy cut a connection");
    // The proxy's limit lies between what survived and what died, give or take the
    // proxy's own 5 ms watch interval and scheduling on a busy machine.
    let slack = support::scaled(Duration::from_millis(60));
    assert!(
        limit.survived <= IDLE + slack && died + slack >= IDLE,
        "found {limit:?} for a proxy that cuts after {IDLE:?}"
    );
    assert!(died - limit.survived <= PRECISION, "{limit:?}");
    // Done by itself.
    client.wait_stopped(Duration::from_secs(5));
}

// ----------------------------------------------------------------------------------------
// The server's side of the story
// ----------------------------------------------------------------------------------------

#[test]
fn the_server_counts_traffic_by_direction_and_connection_lifetimes() {
    let server = TestServer::start(&[]);
    let mut ws = server.connect();
    for _ in 0..3 {
        ws.send(Message::text("0123456789")).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text("0123456789"));
    }
    // Counted while the connection lives...
    for (series, value) in [
        ("websocket_messages_total{direction=\"in\"}", 3.0),
        ("websocket_messages_total{direction=\"out\"}", 3.0),
        ("websocket_bytes_total{direction=\"in\"}", 30.0),
        ("websocket_bytes_total{direction=\"out\"}", 30.0),
    ] {
        assert_eq!(server.metric(series), value, "{series}");
    }
    support::close_normally(ws);
    server.wait_settled(0);
    // ... and kept once it has ended, with its lifetime observed.
    assert_eq!(
        server.metric("websocket_messages_total{direction=\"in\"}"),
        3.0
    );
    assert_eq!(
        server.metric("websocket_bytes_total{direction=\"out\"}"),
        30.0
    );
    assert_eq!(
        server.metric("websocket_connection_duration_seconds_count"),
        1.0
    );
    assert_eq!(server.metric("websocket_connections_opened_total"), 1.0);
}

#[test]
fn failed_handshakes_are_counted_by_cause() {
    let server = TestServer::start(&["--handshake-timeout", "300ms"]);
    let failures = |cause: &str| {
        server.count(&format!(
            "websocket_handshake_failures_total{{cause=\"{cause}\"}}"
        ))
    };
    // Every cause is there from the start.
    assert_eq!(failures("tls"), 0.0);
    assert_eq!(support::http_get(server.addr, "/nope").0, 404);
    let answer = support::raw_exchange(
        server.addr,
        b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
    let answer = support::raw_exchange(server.addr, b"\x16\x03\x01garbage\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    // Half a request, then silence: cut off at the handshake timeout.
    let answer = support::raw_exchange(server.addr, b"GET /ws HTTP/1.1\r\nHost: x\r\n");
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    support::wait_until("four failures are counted", || {
        server.handshake_failures() == 4.0
    });
    for cause in ["path", "method", "malformed", "timeout"] {
        assert_eq!(failures(cause), 1.0, "{cause}");
    }
}

#[test]
fn the_servers_debug_page_names_each_connections_thread() {
    let server = TestServer::start(&["--server-ping-interval", "50ms"]);
    let mut clients: Vec<_> = (0..2).map(|_| server.connect()).collect();
    // Reading lets tungstenite answer the server's pings: a round trip to show.
    for ws in &mut clients {
        ws.send(Message::text("x")).unwrap();
        assert_eq!(
            support::read_skipping_pings(ws).unwrap(),
            Message::text("x")
        );
    }
    let (status, response) = support::http_get(server.metrics, "/debug/connections");
    assert_eq!(status, 200, "{response}");
    for ws in &clients {
        let peer = support::local_addr(ws).to_string();
        assert!(
            response.contains(&format!("\"peer\": \"{peer}\"")),
            "{response}"
        );
    }
    let threads = response.matches("\"thread\": \"conn-").count();
    assert_eq!(threads, 2, "{response}");
    let tids: Vec<u32> = response
        .split("\"tid\": ")
        .skip(1)
        .filter_map(|rest| rest.split(',').next()?.parse().ok())
        .collect();
    assert_eq!(tids.len(), 2, "{response}");
    for tid in tids {
        assert!(
            std::path::Path::new(&format!("/proc/self/task/{tid}")).exists(),
            "no thread {tid}"
        );
    }
}

#[test]
fn the_client_counts_connections_by_the_backend_that_answered() {
    let server = TestServer::start(&["--server-name", "pod-a", "--hello"]);
    let client = TestClient::start(server.addr, &["--connections", "2"]);
    client.wait("two connections on pod-a", Duration::from_secs(5), |s| {
        s.backends().get("pod-a") == Some(&2)
    });
    // A plain client sees the name in the first message too.
    let mut ws = support::connect(&server.url());
    assert_eq!(ws.read().unwrap(), Message::text("hello from pod-a"));
}

#[test]
fn a_drain_period_spreads_the_close_frames() {
    const CONNECTIONS: usize = 20;
    const PERIOD: Duration = Duration::from_secs(1);
    let mut server = TestServer::start(&["--drain-period", "1s", "--shutdown-timeout", "30s"]);
    let clients: Vec<_> = (0..CONNECTIONS).map(|_| server.connect()).collect();
    server.wait_settled(CONNECTIONS);
    let start = Instant::now();
    server.shut_down();
    // Each client reads its Close on a thread of its own, as independent clients would.
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            thread::spawn(move || {
                let frame = support::read_close(&mut ws);
                (frame.code, Instant::now())
            })
        })
        .collect();
    let times: Vec<Instant> = readers
        .into_iter()
        .map(|reader| {
            let (code, at) = reader.join().unwrap();
            assert_eq!(u16::from(code), 1001);
            at
        })
        .collect();
    let first = times.iter().min().unwrap().duration_since(start);
    let last = times.iter().max().unwrap().duration_since(start);
    // One Close every 50 ms: the last went out no earlier than 19/20 of the period.
    assert!(
        last >= PERIOD.mul_f64(0.9) - TIMER_SLACK,
        "the last Close came {last:?} after the shutdown, the period is {PERIOD:?}"
    );
    assert!(
        last - first >= PERIOD / 2,
        "closes spread over {:?}",
        last - first
    );
    server.wait_stopped(Duration::from_secs(10));
}
