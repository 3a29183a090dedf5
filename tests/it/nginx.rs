//! A real TLS-terminating reverse proxy between our client and server: nginx from the
//! distribution's package (`apt-get install -y nginx`; CI's scripts/ci-setup installs it),
//! started by each test in the foreground on a loopback port with a config, pid file, logs
//! and temp paths of its own under the target dir, never as the system service, and stopped
//! by its pid. Two shapes an ingress takes: terminating wss and forwarding ws, and
//! re-encrypting to a wss backend that nginx verifies (and presents a client certificate
//! to). Through both, our client connects, pings flow, and a server shutdown reaches it as
//! Close 1001.
//!
//! Without nginx these tests fail and say how to install it; `WEBSOCKET_TEST_SKIP_NGINX=1`
//! skips them, loudly, outside CI. `WEBSOCKET_TEST_NGINX=/path/to/nginx` picks the binary.

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;
use websocket_test::client::{Counter, Failure};
use websocket_test::ending::Reason;

use crate::harness::{TestClient, TestServer};
use crate::pki::{tls_connect, Pair, Pki, Use};
use crate::support::{self, patience};

/// How to get nginx, for the failure message.
const INSTALL: &str = "install it with `apt-get install -y nginx` (Debian and Ubuntu; CI's \
                       scripts/ci-setup does), or point WEBSOCKET_TEST_NGINX at an nginx binary; \
                       outside CI, WEBSOCKET_TEST_SKIP_NGINX=1 skips these tests";

/// The name nginx's own certificate carries (besides 127.0.0.1), as clients know the proxy.
const EDGE_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];
/// The backend's name in its certificate: not its address, so nginx must be told it
/// (`proxy_ssl_name`) to verify the backend.
const BACKEND_NAME: &str = "backend.websocket-test.internal";

/// The nginx binary, or `None` when the tests are to be skipped (said loudly on stderr).
fn nginx_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("WEBSOCKET_TEST_NGINX") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "WEBSOCKET_TEST_NGINX={path:?} is not a file"
        );
        return Some(path);
    }
    if let Some(path) = support::find_program("nginx") {
        return Some(path);
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    if std::env::var("WEBSOCKET_TEST_SKIP_NGINX").as_deref() == Ok("1") {
        assert!(!ci, "nginx is not installed and CI is set: WEBSOCKET_TEST_SKIP_NGINX is not honoured in CI; {INSTALL}");
        // Straight to stderr: the test harness captures eprintln! of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!! SKIPPED: nginx is not installed and WEBSOCKET_TEST_SKIP_NGINX=1: the \
             real-proxy tests did not run; {INSTALL}\n"
        );
        return None;
    }
    panic!("nginx is not installed (not on PATH nor in /usr/sbin): {INSTALL}");
}

/// An nginx master process (one worker) listening with TLS on a loopback port.
struct Nginx {
    child: Child,
    dir: PathBuf,
    /// Where it listens (TLS).
    addr: SocketAddr,
}

impl Nginx {
    /// Starts nginx with `cert` as its server certificate and `locations` (nginx `location`
    /// blocks) inside its one `server`. Picks a free port and retries on a clash.
    fn start(binary: &Path, name: &str, cert: &Pair, locations: &str) -> Nginx {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "nginx-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let mut clashes = Vec::new();
        loop {
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            let port = support::free_loopback_port();
            let conf = dir.join("nginx.conf");
            fs::write(&conf, config(&dir, port, cert, locations)).unwrap();
            let child = command(binary, &dir, &conf)
                .stdout(fs::File::create(dir.join("stdout.log")).unwrap())
                .stderr(fs::File::create(dir.join("stderr.log")).unwrap())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL}", binary.display()));
            let mut nginx = Nginx {
                child,
                dir: dir.clone(),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            };
            match nginx.wait_ready() {
                Ok(()) => return nginx,
                Err(logs) if logs.contains("Address already in use") && clashes.len() < 10 => {
                    clashes.push(port);
                }
                Err(logs) => panic!(
                    "nginx did not start (ports that clashed before: {clashes:?}):\n{logs}\nconfig:\n{}",
                    fs::read_to_string(&conf).unwrap_or_default()
                ),
            }
        }
    }

    /// Waits until the master has written its pid file, which it does after binding its
    /// listening socket; on an exit or a timeout returns nginx's output.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + patience();
        let pid_file = self.dir.join("nginx.pid");
        let pid = self.child.id().to_string();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("nginx exited with {status}:\n{}", self.logs()));
            }
            if fs::read_to_string(&pid_file).is_ok_and(|text| text.trim() == pid) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nginx did not write {} within {:?}:\n{}",
                    pid_file.display(),
                    patience(),
                    self.logs()
                ));
            }
            thread::sleep(Duration::from_millis(10)); // polling interval
        }
    }

    /// stderr, the error log and the access log.
    fn logs(&self) -> String {
        let read = |file: &str| fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        format!(
            "--- stderr\n{}--- error.log\n{}--- access.log\n{}",
            read("stderr.log"),
            read("error.log"),
            read("access.log")
        )
    }

    /// `wss://localhost:PORT{path}`.
    fn url(&self, path: &str) -> String {
        format!("wss://localhost:{}{path}", self.addr.port())
    }
}

impl Drop for Nginx {
    /// Stops nginx by its pid: SIGTERM (the master stops its worker, then itself); if it
    /// is still there after a while, SIGKILL to the master and its worker. A failing test
    /// prints nginx's logs with its own output.
    #[allow(clippy::print_stderr)]
    fn drop(&mut self) {
        support::stop_daemon(&mut self.child);
        if thread::panicking() {
            eprintln!("nginx in {}:\n{}", self.dir.display(), self.logs());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A whole nginx config: foreground master with one worker, every path under `dir`, TLS on
/// 127.0.0.1:`port` with `cert`, and `locations`.
fn config(dir: &Path, port: u16, cert: &Pair, locations: &str) -> String {
    let dir = dir.display();
    let (cert, key) = (cert.cert.display(), cert.key.display());
    format!(
        r#"daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{
    worker_connections 256;
}}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    # Connection: upgrade for an upgrade request, close otherwise.
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate     {cert};
        ssl_certificate_key {key};
{locations}
    }}
}}
"#
    )
}

/// The directives every WebSocket location needs: HTTP/1.1 to the backend, the hop-by-hop
/// Upgrade and Connection headers passed on, and an idle cut far above the ping interval.
const WEBSOCKET_PROXYING: &str = "
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;";

fn path(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

/// A tungstenite client over a verified TLS stream.
type Wss = tungstenite::WebSocket<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

/// A tungstenite client of nginx at `path`, trusting `edge`'s CA; the upgrade's error (a
/// 502 from nginx, say) when it fails.
fn wss_connect(nginx: &Nginx, edge: &Pki, path: &str) -> Result<Wss, tungstenite::Error> {
    let stream = tls_connect(nginx.addr, "localhost", edge.client_config(None))
        .unwrap_or_else(|e| panic!("TLS to nginx at {}: {e}", nginx.addr));
    match tungstenite::client(nginx.url(path), stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(error)) => Err(error),
        Err(tungstenite::HandshakeError::Interrupted(_)) => unreachable!("a blocking socket"),
    }
}

fn assert_echoes(ws: &mut Wss) {
    for size in [0, 125, 70_000] {
        let payload = support::binary_payload(size);
        ws.send(Message::binary(payload.clone())).unwrap();
        assert_eq!(ws.read().unwrap(), Message::binary(payload), "{size} bytes");
    }
    ws.send(Message::text("through nginx")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("through nginx"));
}

/// Our client (`--tls --ca-file EDGE_CA`) and a tungstenite client hold connections through
/// `nginx` to `server`; pings flow; the server's shutdown reaches both as Close 1001, and
/// nginx's 502 afterwards counts as a refused reconnect.
fn ping_through_and_shut_down(mut server: TestServer, nginx: &Nginx, edge: &Pki) {
    let ca = path(&edge.ca);
    let client = TestClient::start(
        nginx.addr,
        &["--tls", "--ca-file", &ca, "--no-builtin-roots"],
    );
    client.wait("pongs through nginx", Duration::from_secs(5), |s| {
        s.get(Counter::Pongs) >= 3
    });
    assert_eq!(client.stats().get(Counter::Connects), 1);
    assert_eq!(client.stats().get(Counter::ConnectFailures), 0);

    let mut ws = wss_connect(nginx, edge, "/ws").unwrap();
    assert_echoes(&mut ws);
    // Both reach the server as connections from nginx.
    server.wait_settled(2);
    let pongs = client.stats().get(Counter::Pongs);
    client.wait("more pongs", Duration::from_secs(5), |s| {
        s.get(Counter::Pongs) >= pongs + 2
    });

    server.shut_down();
    match ws.read() {
        Ok(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Away, "{frame:?}"),
        other => panic!("expected Close 1001 through nginx, got {other:?}"),
    }
    while ws.read().is_ok() {}
    client.wait(
        "the client sees the server's Close",
        Duration::from_secs(5),
        |s| s.ended(Reason::PeerClose) >= 1,
    );
    // Both answered the Close through nginx: nobody waited for the shutdown timeout.
    server.wait_stopped(Duration::from_secs(4));
    assert_eq!(server.state().closed(Reason::Shutdown, Some(1001)), 2);
    // With the backend gone, nginx answers the reconnect with 502.
    client.wait(
        "a reconnect refused by nginx",
        Duration::from_secs(5),
        |s| s.failed(Failure::Refused) >= 1,
    );
    assert_eq!(client.stats().failed(Failure::Tls), 0);
}

#[test]
fn nginx_terminates_wss_and_forwards_ws_to_the_server() {
    let Some(binary) = nginx_binary() else { return };
    let edge = Pki::new("nginx-edge");
    let edge_cert = edge.issue("edge", &EDGE_NAMES, Use::Server);
    let server = TestServer::start(&[]);
    let locations = format!(
        "        location /ws {{
            proxy_pass http://{};{WEBSOCKET_PROXYING}
        }}",
        server.addr
    );
    let nginx = Nginx::start(&binary, "terminate", &edge_cert, &locations);
    ping_through_and_shut_down(server, &nginx, &edge);
}

#[test]
fn nginx_reencrypts_to_a_wss_backend_it_verifies() {
    let Some(binary) = nginx_binary() else { return };
    let edge = Pki::new("nginx-edge");
    let edge_cert = edge.issue("edge", &EDGE_NAMES, Use::Server);
    // The backend's own CA: it signs the server's certificate and nginx's client certificate.
    let backend = Pki::new("nginx-backend");
    let server_cert = backend.issue("server", &[BACKEND_NAME], Use::Server);
    let nginx_cert = backend.issue("nginx", &["nginx.websocket-test.internal"], Use::Client);
    let (cert, key, backend_ca) = (
        path(&server_cert.cert),
        path(&server_cert.key),
        path(&backend.ca),
    );
    let server = TestServer::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &backend_ca,
    ]);
    let upstream_tls = format!(
        "
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {backend_ca};
            proxy_ssl_server_name on;
            proxy_ssl_certificate {};
            proxy_ssl_certificate_key {};",
        path(&nginx_cert.cert),
        path(&nginx_cert.key)
    );
    // /ws names the backend as its certificate does; /wrong-name must fail verification.
    let locations = format!(
        "        location /ws {{
            proxy_pass https://{addr};
            proxy_ssl_name {BACKEND_NAME};{upstream_tls}{WEBSOCKET_PROXYING}
        }}
        location = /wrong-name {{
            proxy_pass https://{addr}/ws;
            proxy_ssl_name elsewhere.example;{upstream_tls}{WEBSOCKET_PROXYING}
        }}",
        addr = server.addr
    );
    let nginx = Nginx::start(&binary, "reencrypt", &edge_cert, &locations);

    match wss_connect(&nginx, &edge, "/wrong-name") {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 502),
        Err(other) => panic!("expected 502 for a backend name that does not verify, got {other}"),
        Ok(_) => panic!("nginx connected to a backend whose certificate names another host"),
    }
    let logs = nginx.logs();
    assert!(
        logs.contains("upstream SSL certificate does not match"),
        "nginx did not log the failed verification:\n{logs}"
    );
    ping_through_and_shut_down(server, &nginx, &edge);
}

/// nginx in the foreground with every path under `dir` and the config `conf`, no input.
pub(crate) fn command(binary: &Path, dir: &Path, conf: &Path) -> Command {
    let mut command = Command::new(binary);
    command
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null());
    command
}
