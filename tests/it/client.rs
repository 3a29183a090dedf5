//! The client in this process ([`TestClient`]): holding connections, noticing dead ones,
//! reconnecting, shutting down. Tests wait on what can be observed: the client's counters,
//! the real server's registry and metrics ([`TestServer`]), and what a small tungstenite
//! [`Peer`] written here records, with the time it recorded it.
//!
//! Timing rules: a lower bound ("not before the pong timeout") is measured from a moment
//! known to come no later than the event it starts from, to an observation made no earlier
//! than the event it ends at, so delays on a busy machine only lengthen what is measured.
//! Upper bounds are generous and scaled by `WEBSOCKET_TEST_TIME_SCALE`.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Error as WsError, Message, WebSocket};
use websocket_test::client::{ClientStats, Counter, CLOSE_TIMEOUT};
use websocket_test::config::parse_duration;
use websocket_test::ending::Reason;

use crate::harness::{TestClient, TestServer, FAST};
use crate::support::{self, patience, scaled};

/// For what normally takes milliseconds (the wait helpers scale it).
const SOON: Duration = Duration::from_secs(10);
/// Timer granularity allowed on lower bounds.
const SLACK: Duration = Duration::from_millis(20);
/// After [`CLOSE_TIMEOUT`], how long shutdown waits for aborted connections (private in
/// `src/client/mod.rs`).
const ABORT_GRACE: Duration = Duration::from_millis(200);
/// How long `Client::run` may take to return after shutdown is requested.
const STOP_LIMIT: Duration = CLOSE_TIMEOUT.saturating_add(ABORT_GRACE);

/// The value of `flag` in the harness's [`FAST`] timings.
fn fast(flag: &str) -> Duration {
    let (_, value) = FAST
        .iter()
        .find(|(name, _)| *name == flag)
        .unwrap_or_else(|| panic!("{flag} is not among the harness timings"));
    parse_duration(value).unwrap()
}

fn ping_interval() -> Duration {
    fast("--ping-interval")
}

fn pong_timeout() -> Duration {
    fast("--pong-timeout")
}

fn reconnect_delay() -> Duration {
    fast("--reconnect-delay")
}

/// The reasons the client's connections ended so far, with counts (only those that
/// happened), e.g. `[("shutdown", 1)]`.
fn endings(stats: &ClientStats) -> Vec<(&'static str, u64)> {
    Reason::ALL
        .iter()
        .map(|&reason| (reason.label(), stats.ended(reason)))
        .filter(|&(_, n)| n > 0)
        .collect()
}

/// The client's counters, for failure messages.
fn describe(stats: &ClientStats) -> String {
    format!(
        "up={} connects={} connect_failures={} losses={} pings={} pongs={} ended={:?}",
        stats.connections_up(),
        stats.get(Counter::Connects),
        stats.get(Counter::ConnectFailures),
        stats.get(Counter::Losses),
        stats.get(Counter::Pings),
        stats.get(Counter::Pongs),
        endings(stats)
    )
}

/// Waits up to `within` (scaled) until the client's counters satisfy `condition`; a
/// timeout names them all.
fn wait_for(
    client: &TestClient,
    what: &str,
    within: Duration,
    condition: impl Fn(&ClientStats) -> bool,
) {
    let deadline = Instant::now() + scaled(within);
    while !condition(client.stats()) {
        assert!(
            Instant::now() < deadline,
            "timed out after {:?} waiting until {what}; client: {}",
            scaled(within),
            describe(client.stats())
        );
        thread::sleep(Duration::from_millis(5)); // polling interval
    }
}

/// Asserts `earlier + at_least <= later` (less [`SLACK`]), naming `what`.
fn assert_not_before(what: &str, earlier: Instant, later: Instant, at_least: Duration) {
    let took = later.saturating_duration_since(earlier);
    assert!(
        took + SLACK >= at_least,
        "{what} after {took:?}, sooner than {at_least:?}"
    );
}

// ----------------------------------------------------------------------------------------
// Peer: a tungstenite server that records what it sees
// ----------------------------------------------------------------------------------------

/// What a [`Peer`] saw of one connection. Times are taken after the event, never before.
#[derive(Debug, Clone)]
struct Seen {
    /// The client's address: each connection has its own port.
    client: SocketAddr,
    /// When `accept` returned: before the 101, so before the client's session started.
    accepted: Instant,
    /// When each ping arrived.
    pings: Vec<Instant>,
    /// When each Close frame from the client arrived.
    closes: Vec<Instant>,
    /// When the peer stopped reading (it holds the socket open, silent).
    deaf: Option<Instant>,
    /// When the peer saw the connection end.
    ended: Option<Instant>,
}

/// The records for a failure message, times in milliseconds since the first accept.
fn report(seen: &[Seen]) -> String {
    let Some(start) = seen.first().map(|first| first.accepted) else {
        return "no connection accepted".into();
    };
    let ms = |at: &Instant| at.saturating_duration_since(start).as_millis();
    let all = |times: &[Instant]| times.iter().map(ms).collect::<Vec<_>>();
    let when = |at: &Option<Instant>| at.as_ref().map(ms);
    seen.iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "\n  {} from {}: accepted {} ms, pings {:?}, closes {:?}, deaf {:?}, ended {:?}",
                i + 1,
                s.client,
                ms(&s.accepted),
                all(&s.pings),
                all(&s.closes),
                when(&s.deaf),
                when(&s.ended)
            )
        })
        .collect()
}

/// What the acceptor and the connection threads share.
#[derive(Default)]
struct Records {
    seen: Mutex<Vec<Seen>>,
    /// A clone of every accepted socket: it keeps a connection open after its thread lets
    /// go of it, and dropping the peer shuts them all down.
    sockets: Mutex<Vec<TcpStream>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A WebSocket server on 127.0.0.1 with one named thread (`peer-N`) per connection, each
/// running the test's behaviour; it records every connection in a [`Seen`].
struct Peer {
    addr: SocketAddr,
    records: Arc<Records>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

type Ws = WebSocket<TcpStream>;

/// Connection `n` (1-based, in accept order) as a behaviour sees it.
struct Conn {
    n: usize,
    records: Arc<Records>,
}

impl Peer {
    fn start(behaviour: impl Fn(Conn, TcpStream) + Send + Sync + 'static) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let records = Arc::new(Records::default());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(behaviour);
        let acceptor = thread::Builder::new()
            .name("peer-acceptor".into())
            .spawn({
                let (records, stop, threads) = (records.clone(), stop.clone(), threads.clone());
                move || {
                    for tcp in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(tcp) = tcp else { continue };
                        let n = {
                            let mut seen = lock(&records.seen);
                            seen.push(Seen {
                                client: tcp.peer_addr().unwrap(),
                                accepted: Instant::now(),
                                pings: Vec::new(),
                                closes: Vec::new(),
                                deaf: None,
                                ended: None,
                            });
                            seen.len()
                        };
                        lock(&records.sockets).push(tcp.try_clone().unwrap());
                        let conn = Conn {
                            n,
                            records: records.clone(),
                        };
                        let behaviour = behaviour.clone();
                        let thread = thread::Builder::new()
                            .name(format!("peer-{n}"))
                            .spawn(move || behaviour(conn, tcp))
                            .unwrap();
                        lock(&threads).push(thread);
                    }
                }
            })
            .unwrap();
        Peer {
            addr,
            records,
            stop,
            acceptor: Some(acceptor),
            threads,
        }
    }

    /// Everything recorded so far, one entry per accepted connection.
    fn seen(&self) -> Vec<Seen> {
        lock(&self.records.seen).clone()
    }

    /// Waits up to `within` (scaled) until the records satisfy `condition`; returns them.
    fn wait(&self, what: &str, within: Duration, condition: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let deadline = Instant::now() + scaled(within);
        loop {
            let seen = self.seen();
            if condition(&seen) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {:?} waiting until {what}; the peer saw:{}",
                scaled(within),
                report(&seen)
            );
            thread::sleep(Duration::from_millis(5)); // polling interval
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor with a connection of our own.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for socket in lock(&self.records.sockets).drain(..) {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        for thread in lock(&self.threads).drain(..) {
            let _ = thread.join();
        }
    }
}

impl Conn {
    fn note(&self, update: impl FnOnce(&mut Seen)) {
        update(&mut lock(&self.records.seen)[self.n - 1]);
    }

    /// Answers the client's upgrade; `None` (the connection recorded as ended) if it fails.
    fn upgrade(&self, tcp: TcpStream) -> Option<Ws> {
        tcp.set_read_timeout(Some(patience())).unwrap();
        match tungstenite::accept(tcp) {
            Ok(ws) => Some(ws),
            Err(_) => {
                self.note(|seen| seen.ended = Some(Instant::now()));
                None
            }
        }
    }

    /// Reads until the connection ends, recording pings and Close frames; tungstenite
    /// answers both. Once `freeze` is set the peer stops reading and keeps the socket open
    /// (through the peer's clone): neither pongs nor a Close reply come back.
    fn serve(&self, mut ws: Ws, freeze: Option<&AtomicBool>) {
        // With a freeze flag, poll it between reads.
        let timeout = freeze.map(|_| Duration::from_millis(5));
        ws.get_mut().set_read_timeout(timeout).unwrap();
        loop {
            if freeze.is_some_and(|freeze| freeze.load(Ordering::SeqCst)) {
                self.note(|seen| seen.deaf = Some(Instant::now()));
                return;
            }
            match ws.read() {
                Ok(Message::Ping(_)) => self.note(|seen| seen.pings.push(Instant::now())),
                Ok(Message::Close(_)) => self.note(|seen| seen.closes.push(Instant::now())),
                Ok(_) => {}
                Err(WsError::Io(error))
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        self.end(ws.get_ref());
    }

    /// Reads the client's frames raw and never answers: records pings and Close frames
    /// until the connection ends.
    fn listen(&self, mut tcp: TcpStream) {
        tcp.set_read_timeout(None).unwrap();
        let mut header = [0u8; 2];
        while tcp.read_exact(&mut header).is_ok() {
            let len = match header[1] & 0x7f {
                126 => {
                    let mut ext = [0u8; 2];
                    if tcp.read_exact(&mut ext).is_err() {
                        break;
                    }
                    u64::from(u16::from_be_bytes(ext))
                }
                127 => {
                    let mut ext = [0u8; 8];
                    if tcp.read_exact(&mut ext).is_err() {
                        break;
                    }
                    u64::from_be_bytes(ext)
                }
                short => u64::from(short),
            };
            let mask = if header[1] & 0x80 != 0 { 4 } else { 0 };
            let skipped = io::copy(&mut (&tcp).take(mask + len), &mut io::sink());
            if skipped.ok() != Some(mask + len) {
                break;
            }
            let now = Instant::now();
            match header[0] & 0x0f {
                0x9 => self.note(|seen| seen.pings.push(now)),
                0x8 => self.note(|seen| seen.closes.push(now)),
                _ => {}
            }
        }
        self.end(&tcp);
    }

    /// Records the end and closes the TCP connection (the peer's clone would keep it open).
    fn end(&self, tcp: &TcpStream) {
        self.note(|seen| seen.ended = Some(Instant::now()));
        let _ = tcp.shutdown(std::net::Shutdown::Both);
    }
}

/// A peer that answers everything (tungstenite's pongs and Close replies).
fn serving_peer() -> Peer {
    Peer::start(|conn, tcp| {
        if let Some(ws) = conn.upgrade(tcp) {
            conn.serve(ws, None);
        }
    })
}

// ----------------------------------------------------------------------------------------
// The real server again, on the same port
// ----------------------------------------------------------------------------------------

// ----------------------------------------------------------------------------------------
// Holding connections
// ----------------------------------------------------------------------------------------

#[test]
fn stays_connected_to_the_real_server_across_pong_timeouts() {
    let server = TestServer::start(&[]);
    let mut client = TestClient::start(server.addr, &[]);
    // Eight pongs at the ping interval span several pong timeouts.
    let pongs = 8;
    wait_for(
        &client,
        &format!("{pongs} pongs"),
        ping_interval() * pongs + Duration::from_secs(2),
        |s| s.get(Counter::Pongs) >= u64::from(pongs),
    );
    assert!(ping_interval() * pongs > pong_timeout() * 2);
    server.wait_settled(1);
    let stats = client.stats();
    assert_eq!(stats.connections_up(), 1, "{}", describe(stats));
    assert_eq!(stats.get(Counter::Connects), 1, "{}", describe(stats));
    assert_eq!(stats.get(Counter::Losses), 0, "{}", describe(stats));
    assert_eq!(endings(stats), [], "{}", describe(stats));

    client.wait_stopped(STOP_LIMIT);
    assert_eq!(endings(client.stats()), [("shutdown", 1)]);
}

#[test]
fn pings_flow_at_the_interval_and_pongs_keep_the_connection() {
    let peer = serving_peer();
    let mut client = TestClient::start(peer.addr, &[]);
    let pings = 8;
    let seen = peer.wait(
        &format!("{pings} pings arrive"),
        ping_interval() * pings as u32 + Duration::from_secs(2),
        |seen| seen.len() == 1 && seen[0].pings.len() >= pings,
    );
    // Ping k goes out no sooner than k intervals after the session starts, which is after
    // the peer accepted the connection.
    for (k, &at) in seen[0].pings.iter().enumerate() {
        assert_not_before(
            &format!("ping {} arrived", k + 1),
            seen[0].accepted,
            at,
            ping_interval() * (k as u32 + 1),
        );
    }
    let stats = client.stats();
    assert_eq!(stats.get(Counter::Losses), 0, "{}", describe(stats));
    assert_eq!(stats.connections_up(), 1, "{}", describe(stats));
    wait_for(&client, "the pongs are counted", SOON, |s| {
        s.get(Counter::Pongs) >= pings as u64 - 1
    });

    client.wait_stopped(STOP_LIMIT);
    assert_eq!(peer.seen().len(), 1, "{}", report(&peer.seen()));
    assert_eq!(endings(client.stats()), [("shutdown", 1)]);
}

#[test]
fn a_server_that_stops_answering_is_declared_dead_and_reconnected() {
    // Completes the first handshake, then reads raw frames and answers none: no pong comes
    // back. Serves the connections after it.
    let peer = Peer::start(|conn, tcp| match conn.upgrade(tcp) {
        Some(ws) if conn.n == 1 => conn.listen(ws.into_inner()),
        Some(ws) => conn.serve(ws, None),
        None => {}
    });
    let mut client = TestClient::start(peer.addr, &[]);
    wait_for(&client, "the client connects", SOON, |s| {
        s.get(Counter::Connects) == 1
    });
    wait_for(
        &client,
        "the client declares the connection dead",
        ping_interval() + pong_timeout() + Duration::from_secs(2),
        |s| s.ended(Reason::PongTimeout) == 1,
    );
    let declared = Instant::now();
    let seen = peer.wait("the peer sees the connection end", SOON, |seen| {
        seen[0].ended.is_some()
    });
    assert!(!seen[0].pings.is_empty(), "{}", report(&seen));
    // The first ping goes out a ping interval after the session starts at the earliest.
    assert_not_before(
        "declared dead",
        seen[0].accepted + ping_interval(),
        declared,
        pong_timeout(),
    );
    assert_eq!(client.stats().get(Counter::Pongs), 0);

    wait_for(
        &client,
        "the client reconnects",
        reconnect_delay() + Duration::from_secs(2),
        |s| s.get(Counter::Connects) == 2,
    );
    let seen = peer.wait("the peer accepts it", SOON, |seen| seen.len() == 2);
    // The loss came no sooner than a ping interval plus the pong timeout after the first
    // accept.
    assert_not_before(
        "reconnected",
        seen[0].accepted + ping_interval() + pong_timeout(),
        seen[1].accepted,
        reconnect_delay(),
    );

    wait_for(&client, "a pong on the new connection", SOON, |s| {
        s.get(Counter::Pongs) >= 1
    });

    client.wait_stopped(STOP_LIMIT);
    let stats = client.stats();
    assert_eq!(
        stats.get(Counter::ConnectFailures),
        0,
        "{}",
        describe(stats)
    );
    assert_eq!(stats.get(Counter::Losses), 1, "{}", describe(stats));
    assert_eq!(
        endings(stats),
        [("pong_timeout", 1), ("shutdown", 1)],
        "{}",
        describe(stats)
    );
}

#[test]
fn reconnects_to_a_restarted_server_after_the_delay() {
    let mut first = TestServer::start(&[]);
    let mut client = TestClient::start(first.addr, &[]);
    first.wait_settled(1);

    let stopping = Instant::now();
    first.shut_down();
    first.wait_stopped(SOON);
    wait_for(&client, "the client counts the server's Close", SOON, |s| {
        s.ended(Reason::PeerClose) == 1 && s.get(Counter::Losses) == 1
    });
    let second = TestServer::start_on(first.addr.port(), &[]);
    wait_for(&client, "the client reconnects", SOON, |s| {
        s.get(Counter::Connects) == 2 && s.connections_up() == 1
    });
    assert_not_before("reconnected", stopping, Instant::now(), reconnect_delay());
    support::wait_until("the second server registers the client", || {
        second.state().connections() == 1
    });

    client.wait_stopped(STOP_LIMIT);
    let stats = client.stats();
    assert_eq!(stats.get(Counter::Losses), 1, "{}", describe(stats));
    assert_eq!(
        endings(stats),
        [("peer_close", 1), ("shutdown", 1)],
        "{}",
        describe(stats)
    );
}

#[test]
fn fifty_connections() {
    let server = TestServer::start(&[]);
    let mut client = TestClient::start(server.addr, &["--connections", "50"]);
    wait_for(&client, "50 connections are up", SOON, |s| {
        s.connections_up() == 50
    });
    server.wait_settled(50);
    assert_eq!(client.stats().get(Counter::Connects), 50);

    client.wait_stopped(STOP_LIMIT);
    server.wait_settled(0);
    support::wait_until("the server counts 50 closes with 1000", || {
        server.closed("peer_close", "1000") == 50.0
    });
    let stats = client.stats();
    assert_eq!(endings(stats), [("shutdown", 50)], "{}", describe(stats));
    assert_eq!(stats.get(Counter::Losses), 0, "{}", describe(stats));
}

#[test]
fn connections_are_independent() {
    // The second connection accepted is closed with 1000 "bye"; every other one is served.
    let peer = Peer::start(|conn, tcp| {
        if let Some(mut ws) = conn.upgrade(tcp) {
            if conn.n == 2 {
                ws.close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "bye".into(),
                }))
                .unwrap();
            }
            conn.serve(ws, None);
        }
    });
    let mut client = TestClient::start(peer.addr, &["--connections", "3"]);
    wait_for(&client, "the closed connection is back", SOON, |s| {
        s.get(Counter::Connects) == 4 && s.connections_up() == 3
    });
    let before = peer.wait(
        "the peer sees the close and the new connection",
        SOON,
        |seen| seen.len() == 4 && seen[1].ended.is_some(),
    );
    // The two untouched connections and the new one keep pinging.
    let kept = [0, 2, 3];
    let seen = peer.wait("two more pings on each connection left", SOON, |seen| {
        kept.iter()
            .all(|&i| seen[i].pings.len() >= before[i].pings.len() + 2)
    });
    for i in kept {
        assert!(
            seen[i].ended.is_none(),
            "connection {}: {}",
            i + 1,
            report(&seen)
        );
    }
    let stats = client.stats();
    assert_eq!(stats.get(Counter::Losses), 1, "{}", describe(stats));
    assert_eq!(endings(stats), [("peer_close", 1)], "{}", describe(stats));
    // Four TCP connections from four ports: the victim came back on its own.
    let ports: BTreeSet<u16> = seen.iter().map(|s| s.client.port()).collect();
    assert_eq!(ports.len(), 4, "{}", report(&seen));

    client.wait_stopped(STOP_LIMIT);
    assert_eq!(
        endings(client.stats()),
        [("peer_close", 1), ("shutdown", 3)]
    );
}

#[test]
fn a_refused_connection_is_counted_and_retried_after_the_delay() {
    let (_reserved, addr) = support::refusing_addr();
    let started = Instant::now();
    let mut client = TestClient::start(addr, &[]);
    wait_for(&client, "the first attempt fails", SOON, |s| {
        s.get(Counter::ConnectFailures) >= 1
    });
    for attempt in 2..=3u32 {
        wait_for(
            &client,
            &format!("attempt {attempt} fails"),
            reconnect_delay() + Duration::from_secs(2),
            |s| s.get(Counter::ConnectFailures) >= u64::from(attempt),
        );
        assert_not_before(
            &format!("attempt {attempt}"),
            started,
            Instant::now(),
            reconnect_delay() * (attempt - 1),
        );
    }

    client.wait_stopped(STOP_LIMIT);
    let stats = client.stats();
    assert_eq!(stats.get(Counter::Connects), 0, "{}", describe(stats));
    assert_eq!(stats.get(Counter::Losses), 0, "{}", describe(stats));
    assert_eq!(endings(stats), [], "{}", describe(stats));
}

// ----------------------------------------------------------------------------------------
// Shutting down
// ----------------------------------------------------------------------------------------

#[test]
fn shutdown_closes_with_1000_and_returns_within_the_close_timeout() {
    let server = TestServer::start(&[]);
    let mut client = TestClient::start(server.addr, &[]);
    wait_for(&client, "a pong", SOON, |s| s.get(Counter::Pongs) >= 1);
    server.wait_settled(1);

    client.wait_stopped(STOP_LIMIT);
    server.wait_settled(0);
    support::wait_until("the server counts a close with 1000", || {
        server.closed("peer_close", "1000") == 1.0
    });
    let stats = client.stats();
    assert_eq!(endings(stats), [("shutdown", 1)], "{}", describe(stats));
    assert_eq!(stats.get(Counter::Losses), 0, "{}", describe(stats));
}

#[test]
fn shutdown_during_the_reconnect_delay_returns_promptly() {
    let (_reserved, addr) = support::refusing_addr();
    let mut client = TestClient::start(addr, &["--reconnect-delay", "1h"]);
    wait_for(&client, "the first attempt fails", SOON, |s| {
        s.get(Counter::ConnectFailures) == 1
    });
    let took = client.wait_stopped(STOP_LIMIT);
    // `run` waits up to the close timeout for connection threads and then leaves the
    // unfinished ones behind; a thread woken from its delay ends long before that.
    assert!(
        took < CLOSE_TIMEOUT,
        "stopped after {took:?}: the thread in its reconnect delay was not woken"
    );
    assert_eq!(client.stats().get(Counter::ConnectFailures), 1);
}

#[test]
fn shutdown_during_a_stalled_handshake_returns_promptly() {
    // Accepts TCP and never answers the upgrade request.
    let peer = Peer::start(|_, _| {});
    let mut client = TestClient::start(peer.addr, &["--connect-timeout", "1h"]);
    peer.wait("the client's TCP connection arrives", SOON, |seen| {
        seen.len() == 1
    });
    client.wait_stopped(STOP_LIMIT);
    let stats = client.stats();
    assert_eq!(stats.get(Counter::Connects), 0, "{}", describe(stats));
    // The thread still in its handshake is abandoned; it ends when the peer drops the socket.
}

#[test]
fn a_peer_that_stops_answering_during_shutdown_is_not_counted_lost() {
    // Serves normally until frozen, then holds the socket without reading: neither pongs
    // nor the Close reply come back. The long pong timeout keeps the freeze itself from
    // ending the connection before shutdown.
    let freeze = Arc::new(AtomicBool::new(false));
    let peer = Peer::start({
        let freeze = freeze.clone();
        move |conn, tcp| {
            if let Some(ws) = conn.upgrade(tcp) {
                conn.serve(ws, Some(&freeze));
            }
        }
    });
    let mut client = TestClient::start(peer.addr, &["--pong-timeout", "10s"]);
    wait_for(&client, "a pong", SOON, |s| s.get(Counter::Pongs) >= 1);
    freeze.store(true, Ordering::SeqCst);
    peer.wait("the peer stops reading", SOON, |seen| {
        seen[0].deaf.is_some()
    });

    let took = client.wait_stopped(STOP_LIMIT);
    // It did wait for the Close reply that never came.
    assert!(took + SLACK >= CLOSE_TIMEOUT, "stopped after {took:?}");
    let stats = client.stats();
    assert_eq!(stats.get(Counter::Losses), 0, "{}", describe(stats));
    assert_eq!(endings(stats), [("shutdown", 1)], "{}", describe(stats));
}

#[test]
fn a_close_reply_is_never_followed_by_a_second_close_at_shutdown() {
    // The peer closes first and keeps the TCP connection open, reading raw frames: the
    // client answers the Close, and its shutdown must not send another one.
    let peer = Peer::start(|conn, tcp| {
        if let Some(mut ws) = conn.upgrade(tcp) {
            ws.send(Message::Close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: "going".into(),
            })))
            .unwrap();
            conn.listen(ws.into_inner());
        }
    });
    let mut client = TestClient::start(peer.addr, &["--reconnect-delay", "1h"]);
    peer.wait("the client answers the Close", SOON, |seen| {
        seen.len() == 1 && !seen[0].closes.is_empty()
    });
    client.wait_stopped(STOP_LIMIT);
    let seen = peer.wait("the connection ends", SOON, |seen| seen[0].ended.is_some());
    assert_eq!(seen[0].closes.len(), 1, "{}", report(&seen));
    assert_eq!(seen.len(), 1, "{}", report(&seen));
}
