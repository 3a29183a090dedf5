//! wss:// on both sides, with certificates made at test time: echo, trust (unknown issuer,
//! wrong name, expired, `--insecure`), mutual TLS, a certificate rotated under a running
//! server, shutdown of idle wss connections, and hostile TLS input.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;
use websocket_test::client::{Counter, Failure};
use websocket_test::ending::Reason;

use crate::harness::{TestClient, TestServer};
use crate::pki::{tls_connect, Pair, Pki, Use};
use crate::support::{self, patience, scaled, TIMER_SLACK};

/// The names the test server's certificate carries.
const SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// A wss server with a certificate from `pki`, and `extra` flags.
fn wss_server(pki: &Pki, pair: &Pair, extra: &[&str]) -> TestServer {
    let (cert, key) = (path(&pair.cert), path(&pair.key));
    let mut flags = vec!["--tls-cert", &cert, "--tls-key", &key];
    flags.extend_from_slice(extra);
    let _ = pki;
    TestServer::start(&flags)
}

fn path(path: &std::path::Path) -> String {
    path.to_str().unwrap().to_owned()
}

/// A tungstenite client over a verified TLS stream.
type Wss = tungstenite::WebSocket<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

fn wss_connect(server: &TestServer, pki: &Pki, client: Option<&Pair>) -> std::io::Result<Wss> {
    let stream = tls_connect(server.addr, "localhost", pki.client_config(client))?;
    let (ws, _) = tungstenite::client(format!("wss://localhost:{}/ws", server.addr.port()), stream)
        .map_err(std::io::Error::other)?;
    Ok(ws)
}

fn echo(ws: &mut Wss, text: &str) {
    ws.send(Message::text(text)).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text(text));
}

#[test]
fn our_client_and_server_echo_over_wss_and_verify_every_message() {
    let pki = Pki::new("echo");
    let pair = pki.issue("server", &SERVER_NAMES, Use::Server);
    let server = wss_server(&pki, &pair, &[]);
    let ca = path(&pki.ca);
    // Load mode: every echo is checked byte for byte; 64 KiB messages span several TLS
    // records each way.
    let client = TestClient::start(
        server.addr,
        &[
            "--tls",
            "--ca-file",
            &ca,
            "--connections",
            "3",
            "--message-size",
            "64KiB",
            "--messages-per-connection",
            "20",
        ],
    );
    client.wait("100 verified echoes", Duration::from_secs(20), |s| {
        s.get(Counter::Received) >= 100
    });
    let stats = client.stats();
    assert_eq!(stats.get(Counter::Corrupted), 0);
    assert_eq!(stats.get(Counter::ConnectFailures), 0);
    assert!(
        stats.ended(Reason::Finished) >= 3,
        "connections closed after 20 echoes"
    );
    // Each of those ended with the close handshake, seen by the server as the client's 1000.
    assert!(server.closed("peer_close", "1000") >= 3.0);
}

#[test]
fn a_tungstenite_client_echoes_over_wss() {
    let pki = Pki::new("tungstenite");
    let pair = pki.issue("server", &SERVER_NAMES, Use::Server);
    let server = wss_server(&pki, &pair, &[]);
    let mut ws = wss_connect(&server, &pki, None).unwrap();
    server.wait_settled(1);
    for size in [0, 125, 70_000, 1 << 20] {
        let payload = support::binary_payload(size);
        ws.send(Message::binary(payload.clone())).unwrap();
        assert_eq!(ws.read().unwrap(), Message::binary(payload));
    }
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    server.wait_settled(0);
}

#[test]
fn an_unknown_issuer_a_wrong_name_and_an_expired_certificate_fail_as_tls_and_are_retried() {
    let pki = Pki::new("trust");
    let stranger = Pki::new("stranger");
    let good = pki.issue("server", &SERVER_NAMES, Use::Server);
    let expired = pki.issue("expired", &SERVER_NAMES, Use::ExpiredServer);
    let ca = path(&pki.ca);
    let stranger_ca = path(&stranger.ca);
    let good_server = wss_server(&pki, &good, &[]);
    let expired_server = wss_server(&pki, &expired, &[]);
    let cases: [(&str, &TestServer, Vec<&str>); 3] = [
        (
            "an unknown issuer",
            &good_server,
            vec!["--tls", "--ca-file", &stranger_ca, "--no-builtin-roots"],
        ),
        (
            "a name the certificate does not carry",
            &good_server,
            vec![
                "--tls",
                "--ca-file",
                &ca,
                "--tls-server-name",
                "elsewhere.example",
            ],
        ),
        (
            "an expired certificate",
            &expired_server,
            vec!["--tls", "--ca-file", &ca],
        ),
    ];
    for (what, server, flags) in cases {
        // Two failures prove the retry after the reconnect delay (300 ms).
        let client = TestClient::start(server.addr, &flags);
        client.wait(
            &format!("{what}: two TLS failures"),
            Duration::from_secs(5),
            |s| s.failed(Failure::Tls) >= 2,
        );
        assert_eq!(client.stats().get(Counter::Connects), 0, "{what}");
        assert_eq!(
            client.stats().get(Counter::ConnectFailures),
            client.stats().failed(Failure::Tls),
            "{what}"
        );
    }
    // The server counts what its clients refused.
    support::wait_until("the server counts the refused handshakes", || {
        good_server.handshake_failures() >= 4.0
    });
    assert_eq!(good_server.state().connections(), 0);
}

#[test]
fn insecure_connects_to_a_certificate_nobody_trusts() {
    let pki = Pki::new("insecure");
    let pair = pki.issue("server", &["elsewhere.example"], Use::Server);
    let server = wss_server(&pki, &pair, &[]);
    let client = TestClient::start(server.addr, &["--tls", "--insecure"]);
    client.wait(
        "pongs over an unverified wss connection",
        Duration::from_secs(5),
        |s| s.get(Counter::Pongs) >= 2,
    );
    assert_eq!(client.stats().get(Counter::ConnectFailures), 0);
}

#[test]
fn mutual_tls_refuses_a_client_without_a_certificate_and_accepts_one_with() {
    let pki = Pki::new("mtls");
    let pair = pki.issue("server", &SERVER_NAMES, Use::Server);
    let client_pair = pki.issue("client", &["client.example"], Use::Client);
    let ca = path(&pki.ca);
    let server = wss_server(&pki, &pair, &["--tls-client-ca", &ca]);

    let anonymous = TestClient::start(server.addr, &["--tls", "--ca-file", &ca]);
    anonymous.wait("a refused TLS handshake", Duration::from_secs(5), |s| {
        s.failed(Failure::Tls) >= 1
    });
    assert_eq!(anonymous.stats().get(Counter::Connects), 0);
    drop(anonymous);
    assert!(wss_connect(&server, &pki, None).is_err());

    let (cert, key) = (path(&client_pair.cert), path(&client_pair.key));
    let known = TestClient::start(
        server.addr,
        &[
            "--tls",
            "--ca-file",
            &ca,
            "--client-cert",
            &cert,
            "--client-key",
            &key,
        ],
    );
    known.wait(
        "pongs with a client certificate",
        Duration::from_secs(5),
        |s| s.get(Counter::Pongs) >= 2,
    );
    let mut ws = wss_connect(&server, &pki, Some(&client_pair)).unwrap();
    echo(&mut ws, "with a certificate");
}

/// The server certificate's common name, as a connection sees it.
fn presented_name(stream: &rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> Vec<u8> {
    stream.conn.peer_certificates().unwrap()[0].to_vec()
}

#[test]
fn a_rotated_certificate_reaches_new_connections_while_old_ones_stay() {
    let pki = Pki::new("rotation");
    let first = pki.issue("first", &SERVER_NAMES, Use::Server);
    // The server reads fixed paths, as it would a mounted Secret.
    let live = Pair {
        cert: pki.path("live.pem"),
        key: pki.path("live.key"),
    };
    std::fs::copy(&first.cert, &live.cert).unwrap();
    std::fs::copy(&first.key, &live.key).unwrap();
    let server = wss_server(&pki, &live, &[]);
    let config = pki.client_config(None);

    let old_stream = tls_connect(server.addr, "localhost", config.clone()).unwrap();
    let old_cert = presented_name(&old_stream);
    let (mut old, _) = tungstenite::client(
        format!("wss://localhost:{}/ws", server.addr.port()),
        old_stream,
    )
    .unwrap();
    echo(&mut old, "before the rotation");

    let second = pki.issue("second", &SERVER_NAMES, Use::Server);
    // Replaced the way Kubernetes does it: new files renamed into place.
    std::fs::copy(&second.cert, pki.path("next.pem")).unwrap();
    std::fs::copy(&second.key, pki.path("next.key")).unwrap();
    std::fs::rename(pki.path("next.key"), &live.key).unwrap();
    std::fs::rename(pki.path("next.pem"), &live.cert).unwrap();
    let new_der: Vec<u8> = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(&second.cert)
            .unwrap()
            .to_vec()
    };
    // The server looks at the files at most once a second.
    support::wait_within(
        "a new connection gets the new certificate",
        Duration::from_secs(5),
        || {
            let stream = tls_connect(server.addr, "localhost", config.clone()).unwrap();
            presented_name(&stream) == new_der
        },
    );
    assert_ne!(old_cert, new_der);
    // The old connection kept its session.
    echo(&mut old, "after the rotation");
}

#[test]
fn shutdown_closes_idle_wss_connections_with_1001_at_once() {
    let pki = Pki::new("shutdown");
    let pair = pki.issue("server", &SERVER_NAMES, Use::Server);
    let mut server = wss_server(&pki, &pair, &["--shutdown-timeout", "30s"]);
    let mut clients: Vec<Wss> = (0..3)
        .map(|_| wss_connect(&server, &pki, None).unwrap())
        .collect();
    server.wait_settled(3);
    server.shut_down();
    // The connections' threads sleep in `read` with no timeout: the Close is written to
    // them from the shutting-down thread, through the TLS session's lock.
    for ws in &mut clients {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Away),
            other => panic!("expected Close 1001, got {other:?}"),
        }
        while ws.read().is_ok() {}
    }
    // Far below the 30 s shutdown timeout: nobody waited for a timer.
    server.wait_stopped(Duration::from_secs(10));
    assert_eq!(server.state().closed(Reason::Shutdown, Some(1001)), 3);
}

#[test]
fn garbage_a_stalled_handshake_and_a_vanishing_client_cost_only_their_connection() {
    const HANDSHAKE: Duration = Duration::from_millis(500);
    let pki = Pki::new("hostile");
    let pair = pki.issue("server", &SERVER_NAMES, Use::Server);
    let server = wss_server(&pki, &pair, &["--handshake-timeout", "500ms"]);
    let mut bystander = wss_connect(&server, &pki, None).unwrap();
    server.wait_settled(1);

    // Plain HTTP (or any garbage) where a ClientHello belongs: closed at once, counted.
    let mut plain = TcpStream::connect(server.addr).unwrap();
    plain.set_read_timeout(Some(patience())).unwrap();
    plain
        .write_all(support::upgrade_request().as_bytes())
        .unwrap();
    let mut sink = Vec::new();
    let _ = plain.read_to_end(&mut sink);
    assert!(
        !String::from_utf8_lossy(&sink).contains("HTTP/1.1 101"),
        "plain HTTP was upgraded on a TLS port"
    );
    support::wait_until("the garbage is counted", || {
        server.handshake_failures() >= 1.0
    });

    // Half a ClientHello, then silence: cut off at the handshake timeout, not before.
    let mut stalled = TcpStream::connect(server.addr).unwrap();
    let started = Instant::now();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    stalled.set_read_timeout(Some(patience())).unwrap();
    let _ = stalled.read_to_end(&mut Vec::new());
    let took = started.elapsed();
    assert!(
        took >= HANDSHAKE - TIMER_SLACK && took < scaled(HANDSHAKE + Duration::from_secs(3)),
        "a stalled TLS handshake was cut off after {took:?} (timeout {HANDSHAKE:?})"
    );

    // A client that vanishes in the middle of a TLS record after the upgrade.
    let mut vanishing = wss_connect(&server, &pki, None).unwrap();
    server.wait_settled(2);
    vanishing.send(Message::text("half of me")).unwrap();
    let mut tcp = vanishing.get_mut().sock.try_clone().unwrap();
    tcp.write_all(&[0x17, 0x03, 0x03, 0x40, 0x00, 1, 2, 3])
        .unwrap();
    drop(tcp);
    vanishing
        .get_mut()
        .sock
        .shutdown(std::net::Shutdown::Both)
        .unwrap();
    drop(vanishing);
    server.wait_settled(1);
    echo(&mut bystander, "the bystander is untouched");
    assert!(
        server.state().closed(Reason::Eof, None)
            + server.state().closed(Reason::Reset, None)
            + server.state().closed(Reason::Error, None)
            >= 1
    );
    thread::yield_now();
}

/// Starts the client binary with `flags`, the harness's fast timings and no other target.
fn client_process(target: std::net::SocketAddr, flags: &[&str]) -> support::Proc {
    let port = target.port().to_string();
    let mut args = vec![
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--reconnect-delay",
        "300ms",
    ];
    args.extend_from_slice(flags);
    support::Proc::start("client", &args)
}

#[test]
fn tls_failures_and_insecure_connections_are_said_plainly_in_the_log() {
    let pki = Pki::new("log");
    let stranger = Pki::new("log-stranger");
    let pair = pki.issue("server", &SERVER_NAMES, Use::Server);
    let server = wss_server(&pki, &pair, &[]);
    let stranger_ca = path(&stranger.ca);

    let refused = client_process(
        server.addr,
        &["--tls", "--ca-file", &stranger_ca, "--no-builtin-roots"],
    );
    let line = refused.wait_for("Connection failed", patience());
    assert!(
        line.contains("unknown issuer") && line.contains("--ca-file"),
        "{line}"
    );
    // Then the normal reconnects; the same failure again is counted, not logged again.
    refused.wait_for_nth("Reconnecting in", 3, patience());
    assert_eq!(
        refused.count("Connection failed"),
        1,
        "{}",
        refused.output()
    );

    let insecure = client_process(server.addr, &["--tls", "--insecure"]);
    insecure.wait_for(
        "--insecure: server certificates are not verified",
        patience(),
    );
    insecure.wait_for("Connected to wss://", patience());
    let warning = insecure.wait_for("certificate was not verified", patience());
    assert!(warning.contains(" WARN "), "{warning}");
}

#[test]
fn a_wss_connection_is_served_after_its_handshake_by_the_thread_the_debug_page_names() {
    // The TLS handshake runs on one thread, the echo on a fresh one (see
    // `connection::hand_over`): the page must name the thread that serves it now.
    let pki = Pki::new("handover");
    let pair = pki.issue("server", &SERVER_NAMES, Use::Server);
    let server = wss_server(&pki, &pair, &["--server-ping-interval", "50ms"]);
    let mut ws = wss_connect(&server, &pki, None).unwrap();
    server.wait_settled(1);
    echo(&mut ws, "after the handshake");
    let (status, response) = support::http_get(server.metrics, "/debug/connections");
    assert_eq!(status, 200, "{response}");
    let tid: u32 = response
        .split("\"tid\": ")
        .nth(1)
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no tid in {response}"));
    let name = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .unwrap_or_else(|error| panic!("thread {tid}: {error}"));
    assert_eq!(name.trim(), "conn-1", "{response}");
    // The server's pings still reach the client, answered by the new thread's reads.
    ws.get_ref()
        .sock
        .set_read_timeout(Some(patience()))
        .unwrap();
    while !matches!(ws.read().expect("a ping from the server"), Message::Ping(_)) {}
    echo(&mut ws, "and after a ping");
}
