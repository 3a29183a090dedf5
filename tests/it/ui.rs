//! The browser probe page, `GET /ui`: over plain HTTP (the route, its policy, the off
//! switch, `?hello`), and in a real headless Chromium, which connects, shows round trips, and
//! shows how its connections ended: a server stopped by SIGTERM (Close 1001 and the
//! connection's age), and, in silent mode behind a real nginx with a short
//! `proxy_read_timeout`, the cut and the silence before it.
//!
//! The browser tests drive Debian's `chromium` through `chromedriver` with selenium, by a
//! small Python script (tests/ui/bridge.py) that relays one command per line; the scenario
//! and every wait and assertion are here. They write a screenshot of each state to
//! `target/ui-screenshots/`. What they need (scripts/ci-setup --with-ui installs it all):
//! `apt-get install -y chromium chromium-driver nginx` and selenium in a venv
//! (target/ci-venv). Without it they fail and say what is missing; outside CI,
//! `WEBSOCKET_TEST_SKIP_BROWSER=1` skips them, loudly. `WEBSOCKET_TEST_CHROMIUM`,
//! `WEBSOCKET_TEST_CHROMEDRIVER` and `WEBSOCKET_TEST_PYTHON` pick the programs.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::harness::TestServer;
use crate::pki::{Pair, Pki, Use};
use crate::support::{self, patience, scaled, time_scale};

// ---- over HTTP ----

#[test]
fn the_page_is_served_on_ui_under_a_strict_policy() {
    let server = TestServer::start(&[]);
    let (status, page) = support::http_get(server.addr, "/ui?connections=3&silent=1");
    assert_eq!(status, 200, "{page}");
    let head = page.split("\r\n\r\n").next().unwrap();
    assert!(
        head.contains("\r\nContent-Type: text/html; charset=utf-8\r\n"),
        "{head}"
    );
    let policy = head
        .lines()
        .find_map(|line| line.strip_prefix("Content-Security-Policy: "))
        .unwrap_or_else(|| panic!("no Content-Security-Policy in {head}"));
    for directive in [
        "default-src 'none'",
        "script-src 'sha256-",
        "style-src 'sha256-",
        "connect-src 'self' ws://test wss://test",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{directive} in {policy}");
    }
    assert!(!policy.contains("unsafe"), "{policy}");
    let body = &page[head.len() + 4..];
    assert!(body.starts_with("<!doctype html>") && body.ends_with("</html>\n"));
    assert!(body.contains(r#"<meta name="websocket-path" content="/ws">"#));

    // HEAD: the same head, no body. The health check is unchanged.
    let head_only = support::raw_exchange(
        server.addr,
        b"HEAD /ui HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head_only, format!("{head}\r\n\r\n"));
    assert_eq!(support::http_get(server.addr, "/").0, 200);

    // Another WebSocket path shows in the page.
    let elsewhere = TestServer::start(&["--path", "/probe/ws"]);
    let (_, page) = support::http_get(elsewhere.addr, "/ui");
    assert!(page.contains(r#"content="/probe/ws">"#));
}

#[test]
fn ui_false_leaves_only_the_echo_and_the_health_check() {
    let server = TestServer::start(&["--ui", "false"]);
    let (status, response) = support::http_get(server.addr, "/ui");
    assert_eq!(status, 404, "{response}");
    assert!(!response.contains("<html"), "{response}");
    assert_eq!(support::http_get(server.addr, "/").0, 200);
    support::assert_serves(&server.url());
}

#[test]
fn an_upgrade_that_asks_with_hello_first_hears_the_servers_name() {
    let server = TestServer::start(&["--server-name", "pod-a"]);
    let mut asked = support::connect(&format!("{}?hello", server.url()));
    assert_eq!(asked.read().unwrap(), Message::text("hello from pod-a"));
    support::assert_echo(&mut asked, 10);
    // Without the query, the first message is the echo of ours.
    let mut plain = server.connect();
    support::assert_echo(&mut plain, 10);
    support::close_normally(asked);
    support::close_normally(plain);
}

// ---- in a browser ----

#[test]
fn a_browser_shows_round_trips_then_the_close_1001_of_a_server_stopped_by_sigterm() {
    let Some(mut browser) = Browser::start("shutdown", false) else {
        return;
    };
    let mut server = support::Server::start(&["--server-name", "pod-a"]);
    browser.open(&format!("http://{}/ui?connections=2&rate=10", server.addr));
    browser.wait_for(
        "two connections open, served by pod-a, with round trips",
        Duration::from_secs(10),
        "const rows = [...document.querySelectorAll('#rows tr')];
         return rows.length === 2 && rows.every((row) =>
             row.querySelector('.state').textContent === 'open' &&
             row.querySelector('.backend').textContent === 'pod-a' &&
             Number(row.querySelector('.echoes').textContent) >= 20);",
    );
    let target = browser.text("#target");
    assert_eq!(target, format!("ws://{}/ws?hello", server.addr));
    for id in ["#summary-p50", "#summary-p99"] {
        let rtt = browser.text(id);
        assert!(rtt.ends_with(" ms"), "{id}: {rtt:?}");
    }
    assert_eq!(browser.text("#summary-backends"), "pod-a");
    browser.screenshot("shutdown-1-open");

    server.proc.signal("TERM");
    browser.wait_for(
        "both closes in the log",
        Duration::from_secs(10),
        "return document.getElementById('log').innerText.split('close 1001').length === 3;",
    );
    let status = server.proc.wait_exit(patience());
    assert!(status.success(), "{status}: {}", server.proc.output());
    let log = browser.text("#log");
    for index in [1, 2] {
        let line = log
            .lines()
            .find(|line| line.contains(&format!("[Connection {index}] Connection lost:")))
            .unwrap_or_else(|| panic!("no loss of connection {index} in the log:\n{log}"));
        assert!(
            line.contains(
                "Connection lost: server closed the connection: close 1001 \"server shutting \
                 down\" (code 1001, wasClean true); ended by the peer; age "
            ),
            "{line}"
        );
        // The page and the server agree on how long the connection lived (each clock runs
        // from its own side's open to its own side's close).
        let age = seconds_after(line, "; age ");
        assert!(age > 0.0, "{line}");
        let server_ages: Vec<f64> = server
            .proc
            .output()
            .lines()
            .filter(|line| line.contains("Disconnected:"))
            .map(|line| seconds_after(line, "; age "))
            .collect();
        assert!(
            server_ages
                .iter()
                .any(|server_age| (server_age - age).abs() <= 0.5 * time_scale()),
            "the page says age {age}s, the server {server_ages:?}"
        );
    }
    browser.wait_for(
        "the page to show both connections closed",
        Duration::from_secs(5),
        "return document.getElementById('summary-state').textContent.startsWith('closed');",
    );
    browser.screenshot("shutdown-2-closed-1001");
}

#[test]
fn a_browser_in_silent_mode_behind_nginx_shows_the_idle_cut_and_the_silence_before_it() {
    /// nginx's `proxy_read_timeout`: the silence it allows.
    const IDLE_CUT: Duration = Duration::from_secs(2);
    let Some(mut browser) = Browser::start("silent", true) else {
        return;
    };
    let Some(nginx_binary) = nginx_binary() else {
        return;
    };
    let edge = Pki::new("ui-nginx");
    let cert = edge.issue("edge", &["localhost", "127.0.0.1"], Use::Server);
    let server = TestServer::start(&["--server-name", "pod-b"]);
    let nginx = Nginx::start(&nginx_binary, server.addr, &cert, IDLE_CUT);
    // Through a TLS-terminating proxy: the page comes over https and connects with wss.
    browser.open(&format!("https://localhost:{}/ui?rate=10", nginx.port));
    browser.wait_for(
        "an open connection through nginx, served by pod-b, with round trips",
        Duration::from_secs(10),
        "const row = document.querySelector('#rows tr');
         return row !== null && row.querySelector('.state').textContent === 'open' &&
             row.querySelector('.backend').textContent === 'pod-b' &&
             Number(row.querySelector('.echoes').textContent) >= 20;",
    );
    assert_eq!(
        browser.text("#target"),
        format!("wss://localhost:{}/ws?hello", nginx.port)
    );
    browser.screenshot("silent-1-open");

    browser.click("#silent");
    let silent_since = Instant::now();
    browser.wait_for(
        "nginx to cut the silent connection",
        IDLE_CUT + Duration::from_secs(10),
        "return document.getElementById('log').innerText.includes('died silent');",
    );
    let waited = silent_since.elapsed();
    let log = browser.text("#log");
    let line = log
        .lines()
        .find(|line| line.contains("died silent"))
        .expect("waited for");
    assert!(
        line.contains(
            "[Connection 1] Connection lost: connection closed without a close frame (code \
             1006, wasClean false); ended by the network, died silent: nothing received for "
        ),
        "{line}"
    );
    // The silence the page measured is nginx's timeout. nginx re-arms a timer only when the
    // new expiry is 300 ms or more past the old one (NGX_TIMER_LAZY_DELAY), so with an echo
    // every 100 ms it cuts up to 0.3 s early.
    let silence = seconds_after(line, "nothing received for ");
    assert!(
        silence >= IDLE_CUT.as_secs_f64() - 0.35
            && silence <= IDLE_CUT.as_secs_f64() + time_scale(),
        "the page says {silence}s of silence before the cut, nginx allows {IDLE_CUT:?}: {line}"
    );
    assert!(
        waited >= IDLE_CUT - Duration::from_millis(500)
            && waited <= IDLE_CUT + scaled(Duration::from_secs(2)),
        "the cut came {waited:?} after silent mode began, nginx allows {IDLE_CUT:?}"
    );
    // It reconnects, still silent, and would be cut again.
    browser.wait_for(
        "the reconnect",
        Duration::from_secs(10),
        "return document.getElementById('summary-reconnects').textContent === '1' &&
             document.querySelector('#rows tr .state').textContent === 'open, silent';",
    );
    browser.screenshot("silent-2-cut-by-nginx");
    assert!(
        nginx.error_log().contains("upstream timed out"),
        "nginx did not log its idle cut:\n{}",
        nginx.error_log()
    );
}

/// The number of seconds (`12.3s`) after `marker` in `line`.
fn seconds_after(line: &str, marker: &str) -> f64 {
    let rest = line
        .split_once(marker)
        .unwrap_or_else(|| panic!("no {marker:?} in {line}"))
        .1;
    let number = rest.split_once('s').map_or(rest, |(number, _)| number);
    number
        .parse()
        .unwrap_or_else(|e| panic!("{number:?} after {marker:?} in {line}: {e}"))
}

// ---- the browser, through tests/ui/bridge.py ----

/// How to install what the browser tests need, for the failure message.
const INSTALL: &str = "install them with `apt-get install -y chromium chromium-driver` and selenium \
                       in a venv (`python3 -m venv target/ci-venv && target/ci-venv/bin/pip install \
                       selenium`); scripts/ci-setup --with-ui does both. Outside CI, \
                       WEBSOCKET_TEST_SKIP_BROWSER=1 skips these tests";

/// The target directory (CARGO_TARGET_TMPDIR is its `tmp`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is inside the target directory")
        .to_owned()
}

/// The program `env` names, else the first of `candidates`; `None` when that is no file.
fn program(env: &str, candidates: &[PathBuf]) -> Option<PathBuf> {
    match std::env::var_os(env) {
        Some(path) => Some(PathBuf::from(path)).filter(|path| path.is_file()),
        None => candidates.iter().find(|path| path.is_file()).cloned(),
    }
}

/// Chromium, chromedriver and a Python with selenium; `None` when the browser tests are to
/// be skipped (said loudly on stderr).
fn browser_programs() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let chromium = program(
        "WEBSOCKET_TEST_CHROMIUM",
        &support::find_program("chromium")
            .into_iter()
            .collect::<Vec<_>>(),
    );
    let driver = program(
        "WEBSOCKET_TEST_CHROMEDRIVER",
        &support::find_program("chromedriver")
            .into_iter()
            .collect::<Vec<_>>(),
    );
    let mut pythons = vec![
        target_dir().join("ci-venv/bin/python3"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/bin/python3"),
    ];
    pythons.extend(support::find_program("python3"));
    let python = program("WEBSOCKET_TEST_PYTHON", &pythons).filter(|python| {
        Command::new(python)
            .args(["-c", "import selenium"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    });
    let mut missing = Vec::new();
    if chromium.is_none() {
        missing.push("chromium (not on PATH, nor WEBSOCKET_TEST_CHROMIUM)".to_owned());
    }
    if driver.is_none() {
        missing.push("chromedriver (not on PATH, nor WEBSOCKET_TEST_CHROMEDRIVER)".to_owned());
    }
    if python.is_none() {
        missing.push(format!(
            "a Python with selenium (WEBSOCKET_TEST_PYTHON, else one of {pythons:?})"
        ));
    }
    if let (Some(chromium), Some(driver), Some(python)) = (chromium, driver, python) {
        return Some((chromium, driver, python));
    }
    let missing = missing.join(", ");
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    if std::env::var("WEBSOCKET_TEST_SKIP_BROWSER").as_deref() == Ok("1") {
        assert!(
            !ci,
            "missing {missing} and CI is set: WEBSOCKET_TEST_SKIP_BROWSER is not honoured in CI; {INSTALL}"
        );
        // Straight to stderr: the test harness captures eprintln! of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!! SKIPPED: missing {missing} and WEBSOCKET_TEST_SKIP_BROWSER=1: the browser \
             tests did not run; {INSTALL}\n"
        );
        return None;
    }
    panic!("the browser tests need {missing}; {INSTALL}");
}

/// A headless Chromium driven through tests/ui/bridge.py. Dropping it quits the browser; a
/// failing test first gets a screenshot, the page's text and the browser's console.
struct Browser {
    name: &'static str,
    bridge: Child,
    commands: ChildStdin,
    replies: Receiver<String>,
    profile: PathBuf,
    shots: PathBuf,
}

impl Browser {
    /// Starts Chromium for the test `name`; `None` when browser tests are skipped. With
    /// `insecure_certs`, any TLS certificate is accepted (the test's own CA made it).
    fn start(name: &'static str, insecure_certs: bool) -> Option<Browser> {
        let (chromium, driver, python) = browser_programs()?;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let profile = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "browser-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&profile);
        fs::create_dir_all(&profile).unwrap();
        let shots = target_dir().join("ui-screenshots");
        fs::create_dir_all(&shots).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/bridge.py");
        let mut command = Command::new(&python);
        command
            .arg(&script)
            .arg("--chromium")
            .arg(&chromium)
            .arg("--chromedriver")
            .arg(&driver)
            .arg("--profile")
            .arg(&profile);
        if insecure_certs {
            command.arg("--insecure-certs");
        }
        // Its own process group, so that the browser and its driver can be stopped with it.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut bridge = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(profile.join("bridge.stderr")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} {}: {e}",
                    python.display(),
                    script.display()
                )
            });
        let (send, replies) = mpsc::channel();
        let stdout = bridge.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let commands = bridge.stdin.take().unwrap();
        let browser = Browser {
            name,
            bridge,
            commands,
            replies,
            profile,
            shots,
        };
        let started = Instant::now();
        let ready = browser
            .replies
            .recv_timeout(scaled(Duration::from_secs(60)));
        match ready.as_deref().map(|line| line.split_once(' ')) {
            Ok(Some(("ready", version))) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "{name}: Chromium {} started in {:?}",
                    decode_json_string(version),
                    started.elapsed()
                );
                Some(browser)
            }
            other => panic!(
                "the browser did not start ({other:?}): {}; stderr:\n{}",
                chromium.display(),
                fs::read_to_string(browser.profile.join("bridge.stderr")).unwrap_or_default()
            ),
        }
    }

    /// Runs bridge command `name` with `argument`; the bridge's error as `Err`.
    fn call(&mut self, name: &str, argument: &str) -> Result<String, String> {
        writeln!(self.commands, "{name} {}", encode_json_string(argument))
            .and_then(|()| self.commands.flush())
            .map_err(|e| format!("the bridge is gone: {e}"))?;
        let line = self
            .replies
            .recv_timeout(scaled(Duration::from_secs(45)))
            .map_err(|e| format!("no answer to {name}: {e}"))?;
        match line.split_once(' ') {
            Some(("ok", value)) => Ok(decode_json_string(value)),
            Some(("error", message)) => Err(decode_json_string(message)),
            _ => Err(format!("a garbled answer to {name}: {line:?}")),
        }
    }

    fn must(&mut self, name: &str, argument: &str) -> String {
        self.call(name, argument)
            .unwrap_or_else(|e| panic!("{name} {argument}: {e}"))
    }

    fn open(&mut self, url: &str) {
        self.must("open", url);
    }

    /// What `script` (a function body) returns, as text.
    fn eval(&mut self, script: &str) -> String {
        self.must("eval", script)
    }

    /// The text of the element `selector` finds, as the page shows it.
    fn text(&mut self, selector: &str) -> String {
        self.eval(&format!(
            "return document.querySelector({}).innerText;",
            encode_json_string(selector)
        ))
    }

    fn click(&mut self, selector: &str) {
        self.must("click", selector);
    }

    /// Polls `script` (returning true or false) until it returns true; panics naming `what`
    /// after `within` (scaled).
    fn wait_for(&mut self, what: &str, within: Duration, script: &str) {
        let deadline = Instant::now() + scaled(within);
        while self.eval(script) != "true" {
            assert!(
                Instant::now() < deadline,
                "the page did not show {what} within {:?}",
                scaled(within)
            );
            thread::sleep(Duration::from_millis(50)); // polling interval
        }
    }

    /// Saves the window as target/ui-screenshots/NAME.png.
    fn screenshot(&mut self, name: &str) -> PathBuf {
        let path = self.shots.join(format!("{name}.png"));
        self.must("screenshot", path.to_str().unwrap());
        path
    }
}

impl Drop for Browser {
    #[allow(clippy::print_stderr)]
    fn drop(&mut self) {
        if thread::panicking() {
            let shot = self.call(
                "screenshot",
                &format!("{}/{}-failed.png", self.shots.display(), self.name),
            );
            let text = self.call("eval", "return document.body.innerText;");
            let console = self.call("console", "");
            eprintln!(
                "browser of {}: screenshot {shot:?}\n--- page\n{}\n--- console\n{}",
                self.name,
                text.unwrap_or_else(|e| e),
                console.unwrap_or_else(|e| e)
            );
        }
        let _ = writeln!(self.commands, "quit");
        let _ = self.commands.flush();
        let deadline = Instant::now() + patience();
        while self.bridge.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10)); // polling interval
        }
        if self.bridge.try_wait().ok().flatten().is_none() {
            // The bridge's process group: the bridge, chromedriver and the browser.
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(format!("-{}", self.bridge.id()))
                .status();
            let _ = self.bridge.wait();
        }
        if !thread::panicking() {
            let _ = fs::remove_dir_all(&self.profile);
        }
    }
}

/// `text` as a JSON string literal.
fn encode_json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The text of a JSON string literal (as Python's `json.dumps` writes one).
fn decode_json_string(literal: &str) -> String {
    let inner = literal
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("not a JSON string: {literal:?}"));
    let mut units = Vec::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u16; 2];
            units.extend_from_slice(c.encode_utf16(&mut buf));
            continue;
        }
        let unit = match chars.next() {
            Some('n') => u16::from(b'\n'),
            Some('t') => u16::from(b'\t'),
            Some('r') => u16::from(b'\r'),
            Some('b') => 8,
            Some('f') => 12,
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                u16::from_str_radix(&hex, 16)
                    .unwrap_or_else(|e| panic!("\\u{hex} in {literal:?}: {e}"))
            }
            Some(other) => u16::try_from(u32::from(other)).expect("an ASCII escape"),
            None => panic!("a lone backslash ends {literal:?}"),
        };
        units.push(unit);
    }
    String::from_utf16_lossy(&units)
}

// ---- nginx in front, as a TLS-terminating ingress with a short idle timeout ----

/// The nginx binary, or `None` when the real-proxy tests are to be skipped (as in
/// tests/it/nginx.rs).
fn nginx_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("WEBSOCKET_TEST_NGINX") {
        return Some(PathBuf::from(path));
    }
    if let Some(path) = support::find_program("nginx") {
        return Some(path);
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    let install = "install it with `apt-get install -y nginx` (scripts/ci-setup does); outside \
                   CI, WEBSOCKET_TEST_SKIP_NGINX=1 skips this test";
    if std::env::var("WEBSOCKET_TEST_SKIP_NGINX").as_deref() == Ok("1") && !ci {
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!! SKIPPED: nginx is not installed: the browser's silent-mode test did not run; {install}\n"
        );
        return None;
    }
    panic!("nginx is not installed (not on PATH nor in /usr/sbin): {install}");
}

/// One nginx process (`master_process off`: nothing else to stop) terminating TLS on a
/// loopback port and proxying everything, the page and the WebSocket, to one backend.
struct Nginx {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Nginx {
    fn start(binary: &Path, backend: SocketAddr, cert: &Pair, idle_cut: Duration) -> Nginx {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "nginx-ui-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        for _attempt in 0..10 {
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            let port = support::free_loopback_port();
            let conf = dir.join("nginx.conf");
            let d = dir.display();
            let (crt, key) = (cert.cert.display(), cert.key.display());
            let idle = idle_cut.as_millis();
            fs::write(
                &conf,
                format!(
                    "daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {crt};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://{backend};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout {idle}ms;
        }}
    }}
}}
"
                ),
            )
            .unwrap();
            let child = crate::nginx::command(binary, &dir, &conf)
                .stdout(Stdio::null())
                .stderr(fs::File::create(dir.join("stderr.log")).unwrap())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            let mut nginx = Nginx {
                child,
                dir: dir.clone(),
                port,
            };
            // The pid file is written once the listening socket is bound.
            let deadline = Instant::now() + patience();
            let pid = nginx.child.id().to_string();
            loop {
                if let Some(status) = nginx.child.try_wait().unwrap() {
                    let logs = format!(
                        "{}{}",
                        fs::read_to_string(nginx.dir.join("stderr.log")).unwrap_or_default(),
                        nginx.error_log()
                    );
                    assert!(
                        logs.contains("Address already in use"),
                        "nginx exited with {status}:\n{logs}"
                    );
                    break;
                }
                if fs::read_to_string(nginx.dir.join("nginx.pid"))
                    .is_ok_and(|text| text.trim() == pid)
                {
                    return nginx;
                }
                assert!(
                    Instant::now() < deadline,
                    "nginx did not start within {:?}:\n{}",
                    patience(),
                    nginx.error_log()
                );
                thread::sleep(Duration::from_millis(10)); // polling interval
            }
            // The port was taken in between: try another.
            drop(nginx);
        }
        panic!("nginx found no free port in 10 tries");
    }

    fn error_log(&self) -> String {
        fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    #[allow(clippy::print_stderr)]
    fn drop(&mut self) {
        // Its worker too: a SIGKILL to the master alone would leave the worker running.
        support::stop_daemon(&mut self.child);
        if thread::panicking() {
            eprintln!("nginx in {}:\n{}", self.dir.display(), self.error_log());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
