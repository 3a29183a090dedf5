//! A real Prometheus watches a scripted scenario, and the README's PromQL and the
//! PrometheusRule's alerts are checked against what it saw.
//!
//! Prometheus (Debian's package: `scripts/ci-setup` extracts the binary into target/ci-tools)
//! and nginx run as processes on loopback ports of their own, with configs, data and logs under
//! the target dir, and are stopped by their pids. The server and two clients run in process:
//! `client-direct` holds two connections to the server and pings them; `client-cut` holds one
//! through nginx with `--keepalive none`, so nginx's `proxy_read_timeout` cuts it again and
//! again without a Close. Prometheus scrapes them every second as job="websocket-test-server"
//! and job="websocket-test-client" (file-based discovery, so a restarted server is a new
//! target, as a new pod is), and evaluates the rules of manifests/monitoring/prometheusrule.yaml
//! every second, with every `for:` shortened to [`HOLD`].
//!
//! The scenario: connect; the idle cut; the server stops (Close 1001) and stays down until the
//! alerts of an outage fire; it starts again on the same port under another name; the clients
//! reconnect. Every wait is on Prometheus's answers, with deadlines derived from the intervals
//! (and scaled by `WEBSOCKET_TEST_TIME_SCALE`). Checked on the way: the README's PromQL
//! (connections held, the per-backend spread, disconnects by reason and code on both sides,
//! lifetime quantiles overall and per pod, lifetimes at a known timeout, reconnects) gives the
//! answers the scenario implies; the alerts it provokes fire (the clients' silent deaths, their
//! lost connections and outage, the server's metrics down) and the others do not; every query
//! of the Grafana dashboard is valid and answers, and every metric it or the rules name exists.
//!
//! Without Prometheus (or nginx) the test fails and says how to get it;
//! `WEBSOCKET_TEST_SKIP_PROMETHEUS=1` skips it, loudly, outside CI (and so does
//! `WEBSOCKET_TEST_SKIP_NGINX=1` without nginx). `WEBSOCKET_TEST_PROMETHEUS=/path/to/prometheus`
//! and `WEBSOCKET_TEST_NGINX` pick the binaries.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use websocket_test::client::Counter;
use websocket_test::ending::Reason;

use crate::harness::{TestClient, TestServer};
use crate::support::{self, patience, scaled};

/// How to get Prometheus, for the failure message.
const INSTALL: &str = "run scripts/ci-setup (it extracts prometheus from Debian's package into \
                       target/ci-tools), `apt-get install -y prometheus`, or point \
                       WEBSOCKET_TEST_PROMETHEUS at a prometheus binary; outside CI, \
                       WEBSOCKET_TEST_SKIP_PROMETHEUS=1 skips this test";
/// How to get nginx, for the failure message.
const INSTALL_NGINX: &str = "install it with `apt-get install -y nginx` (CI's scripts/ci-setup \
                             does), or point WEBSOCKET_TEST_NGINX at an nginx binary; outside CI, \
                             WEBSOCKET_TEST_SKIP_PROMETHEUS=1 or WEBSOCKET_TEST_SKIP_NGINX=1 \
                             skips this test";

/// Prometheus's scrape and rule evaluation interval here.
const INTERVAL: Duration = Duration::from_secs(1);
/// Every `for:` of the rules, shortened from minutes: long enough that an alert goes through
/// pending (three evaluations), short enough to wait for. The promtool unit tests in
/// manifests/monitoring/tests/ check the real durations.
const HOLD: Duration = Duration::from_secs(3);
/// Prometheus 2.42 applies target changes (a new file of targets, the first targets after
/// start) on its discovery manager's 5 s tick, then its scrape manager's 5 s reload tick.
const DISCOVERY: Duration = Duration::from_secs(10);
/// nginx's `proxy_read_timeout`: a proxied connection silent this long is cut.
const IDLE_CUT: Duration = Duration::from_secs(2);
/// The client's reconnect delay in the test harness (`FAST`).
const RECONNECT: Duration = Duration::from_millis(300);

/// The client's metrics port on loopback.
const METRICS: [&str; 4] = ["--metrics-port", "0", "--metrics-host", "127.0.0.1"];

const CLIENT_JOB: &str = "websocket-test-client";
const SERVER_JOB: &str = "websocket-test-server";

const RULES: &str = include_str!("../../manifests/monitoring/prometheusrule.yaml");
const DASHBOARD: &str = include_str!("../../manifests/monitoring/dashboards/websocket-test.json");
const README: &str = include_str!("../../README.md");

// The README's PromQL ("Which middlebox cuts my connections"), verbatim: the test checks that
// the README still holds each of them.
const HELD_BY_CLIENTS: &str = r#"sum(websocket_client_connections{job="websocket-test-client"})"#;
const HELD_BY_SERVERS: &str = r#"sum(websocket_connections{job="websocket-test-server"})"#;
const PER_BACKEND: &str =
    r#"sum by (backend) (websocket_client_backend_connections{job="websocket-test-client"})"#;
const DISCONNECTS: &str = r#"sum by (reason, code) (
    (max_over_time(websocket_client_disconnects_total{job="websocket-test-client"}[1h])
      unless websocket_client_disconnects_total{job="websocket-test-client"} offset 1h)
  or increase(websocket_client_disconnects_total{job="websocket-test-client"}[1h])
)"#;
const SERVER_ENDS: &str = r#"sum by (reason, code) (
    (max_over_time(websocket_connections_closed_total{job="websocket-test-server"}[1h])
      unless websocket_connections_closed_total{job="websocket-test-server"} offset 1h)
  or increase(websocket_connections_closed_total{job="websocket-test-server"}[1h])
)"#;
const LIFETIME_P50: &str = r#"histogram_quantile(0.5, sum by (le) (rate(websocket_client_connection_duration_seconds_bucket{job="websocket-test-client"}[1h])))"#;
const LIFETIME_P50_BY_POD: &str = r#"histogram_quantile(0.5, sum by (pod, le) (rate(websocket_client_connection_duration_seconds_bucket{job="websocket-test-client"}[1h])))"#;
const NEAR_60S: &str = r#"  sum(increase(websocket_client_connection_duration_seconds_bucket{job="websocket-test-client", le="65"}[1h]))
- sum(increase(websocket_client_connection_duration_seconds_bucket{job="websocket-test-client", le="55"}[1h]))"#;
const RECONNECTS: &str = r#"sum by (pod) (increase(websocket_client_reconnects_total{job="websocket-test-client"}[1h]))"#;

#[test]
fn prometheus_sees_a_restart_and_an_idle_cut_and_the_alerts_fire() {
    let Some(prometheus_binary) = support::external_program(
        "prometheus",
        "WEBSOCKET_TEST_PROMETHEUS",
        &[Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-tools/prometheus")],
        &["WEBSOCKET_TEST_SKIP_PROMETHEUS"],
        INSTALL,
    ) else {
        return;
    };
    let Some(nginx_binary) = support::external_program(
        "nginx",
        "WEBSOCKET_TEST_NGINX",
        &[],
        &[
            "WEBSOCKET_TEST_SKIP_PROMETHEUS",
            "WEBSOCKET_TEST_SKIP_NGINX",
        ],
        INSTALL_NGINX,
    ) else {
        return;
    };
    for query in [
        HELD_BY_CLIENTS,
        HELD_BY_SERVERS,
        PER_BACKEND,
        DISCONNECTS,
        SERVER_ENDS,
        LIFETIME_P50,
        LIFETIME_P50_BY_POD,
        NEAR_60S,
        RECONNECTS,
    ] {
        assert!(
            README.contains(query),
            "README.md no longer gives this query; update the test with it:\n{query}"
        );
    }
    let mut timings = Timings::new();

    // --- Connect: a server, nginx in front of it, a client each way ------------------------
    let mut server = TestServer::start(&["--server-name", "server-a"]);
    let port = server.addr.port();
    let nginx = Nginx::start(&nginx_binary, server.addr);
    // Pings every second, answered within 5 s even on a loaded machine: this client's
    // connections end only when the server ends them.
    let direct = TestClient::start(
        server.addr,
        &[
            &METRICS[..],
            &[
                "--connections",
                "2",
                "--ping-interval",
                "1s",
                "--pong-timeout",
                "5s",
            ],
        ]
        .concat(),
    );
    let cut = TestClient::start(
        nginx.addr,
        &[&METRICS[..], &["--keepalive", "none"]].concat(),
    );
    direct.wait("client-direct connected", Duration::from_secs(5), |s| {
        s.connections_up() == 2
    });
    cut.wait(
        "client-cut connected through nginx",
        Duration::from_secs(5),
        |s| s.connections_up() == 1,
    );
    let dir = temp_dir("prometheus");
    let targets = Targets::new(&dir);
    targets.write(SERVER_JOB, &[(server.metrics, "server-a")]);
    targets.write(
        CLIENT_JOB,
        &[
            (direct.metrics.expect("a metrics port"), "client-direct"),
            (cut.metrics.expect("a metrics port"), "client-cut"),
        ],
    );
    let prometheus = Prometheus::start(&prometheus_binary, &dir, &targets);
    timings.lap("start server, nginx, clients, prometheus");

    let within_discovery = DISCOVERY + 3 * INTERVAL;
    prometheus.wait_until(
        "all three targets are up",
        within_discovery,
        "up == 1",
        |r| r.len() == 3,
    );
    let rules = prometheus.rules_loaded();
    let in_crd = RULES.matches("- alert: ").count();
    assert_eq!(
        rules, in_crd,
        "Prometheus loaded {rules} of the PrometheusRule's {in_crd} alerts"
    );
    // Until the first targets came, there was no server to scrape: WebSocketTestMetricsAbsent
    // may have fired (a real Prometheus waits its `for: 5m`). From here on it must not.
    let targets_up = Instant::now();
    timings.lap("first scrapes (discovery ticks)");

    // --- The idle cut: nginx ends client-cut's silent connection every IDLE_CUT ----------
    // Cuts before the first scrape count in the totals but not in rate() or increase() of
    // the histograms, which see only what happens after a series' first sample: wait for two
    // more.
    let per_cut = IDLE_CUT + RECONNECT;
    let eof = [("reason", "eof"), ("code", "none")];
    let before = value_of(&prometheus.query(DISCONNECTS), &eof);
    let answer = prometheus.wait_until(
        "two more idle cuts show as eof disconnects",
        3 * per_cut + 3 * INTERVAL,
        DISCONNECTS,
        |r| value_of(r, &eof) >= before + 2.0,
    );
    assert_eq!(
        answer.len(),
        1,
        "only the idle cut has ended connections yet: {answer:?}"
    );
    prometheus.wait_firing(
        "WebSocketTestClientConnectionsDiedSilent",
        &[("pod", "client-cut"), ("reason", "eof")],
        3 * INTERVAL,
    );
    assert_eq!(direct.stats().get(Counter::Losses), 0);
    prometheus.wait_until(
        "the clients' connections on server-a",
        3 * INTERVAL,
        PER_BACKEND,
        |r| two_or_three(value_of(r, &[("backend", "server-a")])) && r.len() == 1,
    );
    timings.lap("idle cuts seen, WebSocketTestClientConnectionsDiedSilent firing");

    // --- The server stops: Close 1001, then nothing answers ------------------------------
    server.shut_down();
    server.wait_stopped(Duration::from_secs(5));
    direct.wait("client-direct's two losses", Duration::from_secs(5), |s| {
        s.ended_with(Reason::PeerClose, Some(1001)) == 2 && s.connections_up() == 0
    });
    let alert_within = HOLD + 4 * INTERVAL;
    prometheus.wait_firing(
        "WebSocketTestClientConnectionsLost",
        &[
            ("pod", "client-direct"),
            ("reason", "peer_close"),
            ("code", "1001"),
        ],
        alert_within,
    );
    // The server's pod is still a target (a container restarting in its pod), scraped in vain.
    prometheus.wait_firing(
        "WebSocketTestMetricsDown",
        &[("pod", "server-a")],
        alert_within,
    );
    prometheus.wait_firing(
        "WebSocketTestClientNotConnected",
        &[("pod", "client-direct")],
        alert_within,
    );
    timings.lap("outage alerts firing");

    // --- It starts again on the same port, under another name: a new target ---------------
    let server = TestServer::start_on(port, &["--server-name", "server-b"]);
    targets.write(SERVER_JOB, &[(server.metrics, "server-b")]);
    direct.wait("client-direct reconnected", Duration::from_secs(5), |s| {
        s.connections_up() == 2 && s.get(Counter::Reconnects) == 2
    });
    prometheus.wait_until(
        "the clients' connections on server-b, none left on server-a",
        3 * INTERVAL,
        PER_BACKEND,
        |r| {
            two_or_three(value_of(r, &[("backend", "server-b")]))
                && value_of(r, &[("backend", "server-a")]) == 0.0
        },
    );
    prometheus.wait_until(
        "the clients hold 2 or 3 connections",
        3 * INTERVAL,
        HELD_BY_CLIENTS,
        |r| only(r).is_some_and(two_or_three),
    );
    prometheus.wait_until(
        "server-b is scraped and holds them",
        within_discovery,
        HELD_BY_SERVERS,
        |r| only(r).is_some_and(two_or_three),
    );
    timings.lap("restarted server scraped (discovery ticks)");

    // --- The README's PromQL answers ------------------------------------------------------
    // Disconnects by reason and code: every series is younger than the window, so the
    // answer is exact: the Close 1001s of the restart, and the idle cuts (Prometheus may be a
    // scrape behind the client's own count).
    let closes = direct.stats().ended_with(Reason::PeerClose, Some(1001))
        + cut.stats().ended_with(Reason::PeerClose, Some(1001));
    let answer = prometheus.wait_until(
        "disconnects by reason and code: the restart's Close 1001s, and a cut since",
        per_cut + 3 * INTERVAL,
        DISCONNECTS,
        |r| {
            value_of(r, &[("reason", "peer_close"), ("code", "1001")]) == closes as f64
                && value_of(r, &eof) >= before + 3.0
        },
    );
    let eofs = value_of(&answer, &eof);
    assert!(
        eofs <= cut.stats().ended(Reason::Eof) as f64,
        "eof disconnects {eofs}, the client counted {}: {answer:?}",
        cut.stats().ended(Reason::Eof)
    );
    assert_eq!(answer.len(), 2, "no other reason: {answer:?}");
    // The server counts nginx's cuts as eof too (server-b's, at least).
    let ends = prometheus.wait_until(
        "the servers' ends by reason and code show the cuts",
        IDLE_CUT + 3 * INTERVAL,
        SERVER_ENDS,
        |r| value_of(r, &eof) >= 1.0,
    );
    // Lifetimes: most connections lived IDLE_CUT (the 1-5 s bucket), the direct ones longer.
    let p50 = prometheus.wait_until(
        "the median lifetime is the idle cut's bucket",
        per_cut + 3 * INTERVAL,
        LIFETIME_P50,
        |r| only(r).is_some_and(|p50| (1.0..=5.0).contains(&p50)),
    );
    let by_pod = prometheus.query(LIFETIME_P50_BY_POD);
    let cut_p50 = value_of(&by_pod, &[("pod", "client-cut")]);
    let direct_p50 = value_of(&by_pod, &[("pod", "client-direct")]);
    assert!(
        (1.0..=5.0).contains(&cut_p50) && direct_p50 > 5.0,
        "client-cut's median lifetime should sit in the 1-5 s bucket (nginx's {IDLE_CUT:?}), \
         client-direct's above it: {by_pod:?}"
    );
    // None lived about 60 s here; the same query at this test's scale finds the cuts.
    assert_eq!(single(&prometheus.query(NEAR_60S)), 0.0);
    let near_cut = NEAR_60S
        .replace(r#"le="65""#, r#"le="5""#)
        .replace(r#"le="55""#, r#"le="1""#);
    let at_cut = single(&prometheus.query(&near_cut));
    assert!(at_cut >= 2.0, "lifetimes of 1-5 s: {at_cut}");
    // Reconnects: client-direct's two connections came back once each (increase()
    // extrapolates a little); client-cut's after every cut.
    let reconnects = prometheus.query(RECONNECTS);
    let direct_reconnects = value_of(&reconnects, &[("pod", "client-direct")]);
    assert!(
        (2.0..3.0).contains(&direct_reconnects)
            && value_of(&reconnects, &[("pod", "client-cut")]) >= 2.0,
        "reconnects by pod: {reconnects:?}"
    );
    timings.lap("README queries answered");

    // --- Alerts: those the scenario provokes fired, the others did not ----------------------
    let fired = prometheus.query(r#"max_over_time(ALERTS{alertstate="firing"}[1h])"#);
    let names: BTreeSet<&str> = fired.iter().map(|s| s.label("alertname")).collect();
    for expected in [
        "WebSocketTestClientConnectionsDiedSilent",
        "WebSocketTestClientConnectionsLost",
        "WebSocketTestClientNotConnected",
        "WebSocketTestMetricsDown",
    ] {
        assert!(
            names.contains(expected),
            "{expected} never fired: {fired:?}"
        );
    }
    for never in [
        "WebSocketTestNoConnections",
        "WebSocketTestTooManyConnections",
        "WebSocketTestConnectionsRejected",
    ] {
        assert!(!names.contains(never), "{never} fired: {fired:?}");
    }
    // Not even while the restarted server's target replaced the old one. (Its start-up firing
    // resolves at the first evaluation after the first scrape.)
    let since = targets_up.elapsed().saturating_sub(scaled(3 * INTERVAL));
    let absent = prometheus.query(&format!(
        r#"max_over_time(ALERTS{{alertstate="firing", alertname="WebSocketTestMetricsAbsent"}}[{}ms])"#,
        since.as_millis()
    ));
    assert!(
        absent.is_empty(),
        "WebSocketTestMetricsAbsent fired in the last {since:?}: {absent:?}"
    );
    assert!(
        !fired.iter().any(
            |s| s.label("alertname") == "WebSocketTestClientConnectionsDiedSilent"
                && s.label("pod") == "client-direct"
        ),
        "client-direct's pinged connections never died silent: {fired:?}"
    );

    // --- Every dashboard query is valid PromQL and every metric it names exists --------------
    let exported: BTreeSet<String> = prometheus
        .query(r#"count by (__name__) (last_over_time({job=~"websocket-test-server|websocket-test-client"}[1h]))"#)
        .iter()
        .map(|s| s.label("__name__").to_owned())
        .collect();
    let mut checked = 0;
    for expr in dashboard_queries() {
        let query = expr
            .replace("$__rate_interval", "1m")
            .replace("$namespace", ".*")
            .replace("$pod", ".*")
            .replace("$client", ".*");
        // rate() and increase() need two samples of the restarted server.
        prometheus.wait_until(
            &format!("dashboard query {query} answers"),
            3 * INTERVAL,
            &query,
            |r| !r.is_empty(),
        );
        checked += 1;
    }
    for name in metric_names(DASHBOARD).union(&metric_names(RULES)) {
        // A histogram is named without its _bucket, _sum and _count in descriptions.
        assert!(
            exported.contains(name) || exported.contains(&format!("{name}_bucket")),
            "{name} (dashboard or rules) is not among the scraped metrics: {exported:?}"
        );
    }
    timings.lap(&format!("alerts and {checked} dashboard queries checked"));
    note(&format!(
        "prometheus test: {} (server ends {ends:?}, p50 {p50:?})",
        timings.report()
    ));
    drop((direct, cut, server, nginx));
}

/// Prints to the test's captured output (shown with `--nocapture` or on failure).
#[allow(clippy::print_stderr)]
fn note(text: &str) {
    eprintln!("{text}");
}

/// How long each phase of the scenario took.
struct Timings {
    start: Instant,
    last: Instant,
    laps: Vec<String>,
}

impl Timings {
    fn new() -> Timings {
        let now = Instant::now();
        Timings {
            start: now,
            last: now,
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, what: &str) {
        let now = Instant::now();
        self.laps
            .push(format!("{what} {:.1}s", (now - self.last).as_secs_f64()));
        self.last = now;
    }

    fn report(&self) -> String {
        format!(
            "{:.1}s: {}",
            self.start.elapsed().as_secs_f64(),
            self.laps.join(", ")
        )
    }
}

// ----------------------------------------------------------------------------------------
// Prometheus and nginx as processes on loopback
// ----------------------------------------------------------------------------------------

/// A fresh directory under the target dir for one program's files.
fn temp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{:?}",
        std::process::id(),
        thread::current().id()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A program in the foreground on a loopback port it was told (neither nginx nor Prometheus
/// can bind port 0), with every file under `dir`; stopped by its pid when dropped.
struct Daemon {
    name: &'static str,
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
    /// The log files to show when something fails, relative to `dir`.
    logs: &'static [&'static str],
}

impl Daemon {
    /// Picks a free port, lets `command` write the config for it and build the command line,
    /// starts it and waits until `ready`; starts again on another port when the port was
    /// taken meanwhile (the logs say "address already in use").
    fn start(
        name: &'static str,
        dir: &Path,
        logs: &'static [&'static str],
        command: impl Fn(u16) -> Command,
        ready: impl Fn(&Daemon) -> bool,
    ) -> Daemon {
        let mut clashes = Vec::new();
        loop {
            let port = support::free_loopback_port();
            let child = command(port)
                .stdin(Stdio::null())
                .stdout(fs::File::create(dir.join("stdout.log")).unwrap())
                .stderr(fs::File::create(dir.join("stderr.log")).unwrap())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
            let mut daemon = Daemon {
                name,
                child,
                dir: dir.to_owned(),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                logs,
            };
            let deadline = Instant::now() + patience();
            let failure = loop {
                if let Some(status) = daemon.child.try_wait().unwrap() {
                    break format!("{name} exited with {status}");
                }
                if ready(&daemon) {
                    return daemon;
                }
                if Instant::now() >= deadline {
                    break format!("{name} was not ready within {:?}", patience());
                }
                thread::sleep(Duration::from_millis(20)); // polling interval
            };
            let logs = daemon.logs();
            if logs.to_lowercase().contains("address already in use") && clashes.len() < 10 {
                clashes.push(port);
                continue; // dropping `daemon` stops it
            }
            panic!("{failure} (ports that clashed before: {clashes:?}):\n{logs}");
        }
    }

    /// Its stdout, stderr and log files.
    fn logs(&self) -> String {
        let mut text = String::new();
        for file in ["stdout.log", "stderr.log"].iter().chain(self.logs) {
            let content = fs::read_to_string(self.dir.join(file)).unwrap_or_default();
            let _ = write!(text, "--- {file}\n{content}");
        }
        text
    }
}

impl Drop for Daemon {
    /// SIGTERM to the process (nginx's master stops its workers); if it is still there after
    /// a while, SIGKILL to it and its children. Its files go, unless the test is failing: then
    /// it prints the logs and keeps them.
    #[allow(clippy::print_stderr)]
    fn drop(&mut self) {
        support::stop_daemon(&mut self.child);
        if thread::panicking() {
            eprintln!(
                "{} in {} (kept) on {}:\n{}",
                self.name,
                self.dir.display(),
                self.addr,
                self.logs()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// nginx as a plain-HTTP WebSocket reverse proxy whose idle cut is [`IDLE_CUT`]; stopped
/// when dropped.
struct Nginx {
    _daemon: Daemon,
    /// Where it listens.
    addr: SocketAddr,
}

impl Nginx {
    fn start(binary: &Path, backend: SocketAddr) -> Nginx {
        let dir = temp_dir("nginx-idle-cut");
        let conf = dir.join("nginx.conf");
        let daemon = Daemon::start(
            "nginx",
            &dir,
            &["error.log", "access.log"],
            |port| {
                fs::write(&conf, nginx_config(&dir, port, backend)).unwrap();
                crate::nginx::command(binary, &dir, &conf)
            },
            // The master writes its pid file after binding its listening socket.
            |daemon| {
                fs::read_to_string(daemon.dir.join("nginx.pid"))
                    .is_ok_and(|pid| pid.trim() == daemon.child.id().to_string())
            },
        );
        let addr = daemon.addr;
        Nginx {
            _daemon: daemon,
            addr,
        }
    }
}

fn nginx_config(dir: &Path, port: u16, backend: SocketAddr) -> String {
    let dir = dir.display();
    let cut = IDLE_CUT.as_secs();
    format!(
        r#"daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{
    worker_connections 64;
}}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    server {{
        listen 127.0.0.1:{port};
        location /ws {{
            proxy_pass http://{backend};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            # The cut under test: no frame either way for this long ends both connections,
            # without a Close frame.
            proxy_read_timeout {cut}s;
        }}
    }}
}}
"#
    )
}

/// The files of targets Prometheus discovers, one per job, each target with a `pod` label.
struct Targets {
    dir: PathBuf,
}

impl Targets {
    fn new(dir: &Path) -> Targets {
        let targets = Targets {
            dir: dir.to_owned(),
        };
        targets.write(SERVER_JOB, &[]);
        targets.write(CLIENT_JOB, &[]);
        targets
    }

    fn path(&self, job: &str) -> PathBuf {
        self.dir.join(format!("{job}.json"))
    }

    /// Replaces the job's targets (written aside and renamed: Prometheus never reads half).
    fn write(&self, job: &str, targets: &[(SocketAddr, &str)]) {
        let entries: Vec<String> = targets
            .iter()
            .map(|(addr, pod)| {
                format!(r#"{{"targets": ["{addr}"], "labels": {{"pod": "{pod}"}}}}"#)
            })
            .collect();
        let aside = self.dir.join(format!(".{job}.json"));
        fs::write(&aside, format!("[{}]\n", entries.join(", "))).unwrap();
        fs::rename(&aside, self.path(job)).unwrap();
    }
}

/// Prometheus with the PrometheusRule's rules, scraping the jobs of [`Targets`].
struct Prometheus {
    daemon: Daemon,
}

impl Prometheus {
    fn start(binary: &Path, dir: &Path, targets: &Targets) -> Prometheus {
        let rules = dir.join("rules.yaml");
        fs::write(&rules, rules_file(RULES, HOLD)).unwrap();
        let config = dir.join("prometheus.yml");
        let interval = format!("{}s", INTERVAL.as_secs());
        let mut text = format!(
            "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  \
             evaluation_interval: {interval}\nrule_files:\n  - {}\nscrape_configs:\n",
            rules.display()
        );
        for job in [SERVER_JOB, CLIENT_JOB] {
            let _ = write!(
                text,
                "  - job_name: {job}\n    file_sd_configs:\n      - files: ['{}']\n        \
                 refresh_interval: {interval}\n",
                targets.path(job).display()
            );
        }
        fs::write(&config, text).unwrap();
        let daemon = Daemon::start(
            "prometheus",
            dir,
            &["prometheus.yml", "rules.yaml"],
            |port| {
                let _ = fs::remove_dir_all(dir.join("data"));
                let mut command = Command::new(binary);
                command
                    .arg("--config.file")
                    .arg(&config)
                    .arg("--storage.tsdb.path")
                    .arg(dir.join("data"))
                    .arg(format!("--web.listen-address=127.0.0.1:{port}"));
                command
            },
            |daemon| matches!(http_get(daemon.addr, "/-/ready"), Ok((200, _))),
        );
        Prometheus { daemon }
    }

    /// The answer of an instant query; panics (with Prometheus's logs) on an error.
    fn query(&self, promql: &str) -> Vec<Sample> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let body = match http_get(self.daemon.addr, &path) {
            Ok((200, body)) => body,
            Ok((status, body)) => panic!("{promql}: HTTP {status}: {body}"),
            Err(error) => panic!("{promql}: {error}\n{}", self.daemon.logs()),
        };
        let json = Json::parse(&body).unwrap_or_else(|e| panic!("{promql}: {e}: {body}"));
        assert_eq!(
            json.get("status").and_then(Json::as_str),
            Some("success"),
            "{body}"
        );
        let data = json.get("data").expect("data");
        assert_eq!(
            data.get("resultType").and_then(Json::as_str),
            Some("vector"),
            "{promql}: {body}"
        );
        data.get("result")
            .map(Json::items)
            .unwrap_or_default()
            .iter()
            .map(Sample::from_json)
            .collect()
    }

    /// Queries `promql` until its answer satisfies `condition`; panics after `within`
    /// (scaled) with the last answer.
    fn wait_until(
        &self,
        what: &str,
        within: Duration,
        promql: &str,
        condition: impl Fn(&[Sample]) -> bool,
    ) -> Vec<Sample> {
        let deadline = Instant::now() + scaled(within);
        loop {
            let answer = self.query(promql);
            if condition(&answer) {
                return answer;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {:?} waiting until {what}; `{promql}` answers {answer:?}\n\
                 firing: {:?}",
                scaled(within),
                self.query("ALERTS")
            );
            thread::sleep(Duration::from_millis(100)); // polling interval
        }
    }

    /// Waits until `alert` fires with (at least) `labels`.
    fn wait_firing(&self, alert: &str, labels: &[(&str, &str)], within: Duration) {
        let query = format!(r#"ALERTS{{alertstate="firing", alertname="{alert}"}}"#);
        self.wait_until(&format!("{alert} {labels:?} fires"), within, &query, |r| {
            r.iter().any(|sample| sample.has(labels))
        });
    }

    /// How many alerting rules Prometheus has loaded.
    fn rules_loaded(&self) -> usize {
        let (status, body) = http_get(self.daemon.addr, "/api/v1/rules?type=alert").unwrap();
        assert_eq!(status, 200, "{body}");
        let json = Json::parse(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        let groups = json.get("data").and_then(|d| d.get("groups")).expect(&body);
        groups
            .items()
            .iter()
            .map(|group| group.get("rules").map_or(0, |rules| rules.items().len()))
            .sum()
    }
}

/// The PrometheusRule's `spec:`, which holds the standard `groups:`, as a rules file, with
/// every `for:` set to `hold`.
fn rules_file(crd: &str, hold: Duration) -> String {
    let mut lines = crd.lines().skip_while(|line| *line != "spec:");
    assert_eq!(
        lines.next(),
        Some("spec:"),
        "no `spec:` line in the PrometheusRule"
    );
    let mut rules = String::new();
    for line in lines {
        let line = if line.is_empty() {
            line
        } else {
            line.strip_prefix("  ")
                .unwrap_or_else(|| panic!("not inside spec: {line:?}"))
        };
        let indent = &line[..line.len() - line.trim_start().len()];
        if line.trim_start().starts_with("for: ") {
            let _ = writeln!(rules, "{indent}for: {}s", hold.as_secs());
        } else {
            let _ = writeln!(rules, "{line}");
        }
    }
    rules
}

/// The `expr` of every panel target in the dashboard JSON.
fn dashboard_queries() -> Vec<String> {
    let dashboard = Json::parse(DASHBOARD).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard.get("panels").map(Json::items).unwrap_or_default() {
        for target in panel.get("targets").map(Json::items).unwrap_or_default() {
            exprs.push(
                target
                    .get("expr")
                    .and_then(Json::as_str)
                    .unwrap()
                    .to_owned(),
            );
        }
    }
    assert!(exprs.len() > 20, "only {} dashboard queries", exprs.len());
    exprs
}

/// The metric names (`websocket_*`, `process_*`) a text mentions.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (start, _) in text
        .match_indices("websocket_")
        .chain(text.match_indices("process_"))
    {
        if start > 0 && text.as_bytes()[start - 1].is_ascii_alphanumeric() {
            continue;
        }
        let name: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        // Not a prefix such as `websocket_client_*` in a comment.
        if !name.ends_with('_') {
            names.insert(name);
        }
    }
    names
}

/// One series of an instant query's answer.
#[derive(Debug)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn from_json(json: &Json) -> Sample {
        let labels = match json.get("metric") {
            Some(Json::Object(fields)) => fields
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect(),
            other => panic!("no metric in {other:?}"),
        };
        let value = json
            .get("value")
            .and_then(|v| v.items().get(1))
            .and_then(Json::as_str)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no value in {json:?}"));
        Sample { labels, value }
    }

    fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }

    fn has(&self, labels: &[(&str, &str)]) -> bool {
        labels.iter().all(|(k, v)| self.label(k) == *v)
    }
}

/// The value of the one series with `labels` in `answer`, 0 when there is none.
fn value_of(answer: &[Sample], labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = answer.iter().filter(|s| s.has(labels)).collect();
    assert!(
        found.len() <= 1,
        "several series with {labels:?}: {answer:?}"
    );
    found.first().map_or(0.0, |s| s.value)
}

/// Connections held: client-direct's two, and client-cut's one unless nginx just cut it.
fn two_or_three(value: f64) -> bool {
    value == 2.0 || value == 3.0
}

/// The value of a one-series answer (an aggregate without `by`), if it is one.
fn only(answer: &[Sample]) -> Option<f64> {
    match answer {
        [sample] => Some(sample.value),
        _ => None,
    }
}

/// The value of a one-series answer (an aggregate without `by`).
fn single(answer: &[Sample]) -> f64 {
    assert_eq!(answer.len(), 1, "expected one series: {answer:?}");
    answer[0].value
}

/// `GET path` over HTTP/1.0, so the answer comes whole (no chunks) and the server closes.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(patience()))?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    Ok((status, body))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

// ----------------------------------------------------------------------------------------
// Just enough JSON for Prometheus's answers and the dashboard
// ----------------------------------------------------------------------------------------

/// A JSON value.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Result<Json, String> {
        let mut parser = JsonParser {
            bytes: text.as_bytes(),
            pos: 0,
        };
        let value = parser.value()?;
        parser.skip_space();
        if parser.pos != parser.bytes.len() {
            return Err(format!("trailing data at byte {}", parser.pos));
        }
        Ok(value)
    }

    /// An object's field.
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(text) => Some(text),
            _ => None,
        }
    }

    /// An array's items (none for anything else).
    fn items(&self) -> &[Json] {
        match self {
            Json::Array(items) => items,
            _ => &[],
        }
    }
}

struct JsonParser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl JsonParser<'_> {
    fn skip_space(&mut self) {
        while self
            .bytes
            .get(self.pos)
            .is_some_and(u8::is_ascii_whitespace)
        {
            self.pos += 1;
        }
    }

    fn error<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at byte {}", self.pos))
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        self.skip_space();
        if self.bytes.get(self.pos) == Some(&byte) {
            self.pos += 1;
            Ok(())
        } else {
            self.error(&format!("expected {:?}", char::from(byte)))
        }
    }

    fn literal(&mut self, word: &str, value: Json) -> Result<Json, String> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(value)
        } else {
            self.error("unknown literal")
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.skip_space();
        match self.bytes.get(self.pos) {
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'"') => self.string().map(Json::String),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => self.error("expected a value"),
        }
    }

    fn object(&mut self) -> Result<Json, String> {
        self.expect(b'{')?;
        let mut fields = Vec::new();
        self.skip_space();
        if self.bytes.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            return Ok(Json::Object(fields));
        }
        loop {
            self.skip_space();
            let key = self.string()?;
            self.expect(b':')?;
            fields.push((key, self.value()?));
            self.skip_space();
            match self.bytes.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Json::Object(fields));
                }
                _ => return self.error("expected ',' or '}'"),
            }
        }
    }

    fn array(&mut self) -> Result<Json, String> {
        self.expect(b'[')?;
        let mut items = Vec::new();
        self.skip_space();
        if self.bytes.get(self.pos) == Some(&b']') {
            self.pos += 1;
            return Ok(Json::Array(items));
        }
        loop {
            items.push(self.value()?);
            self.skip_space();
            match self.bytes.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Json::Array(items));
                }
                _ => return self.error("expected ',' or ']'"),
            }
        }
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.pos;
        while self
            .bytes
            .get(self.pos)
            .is_some_and(|b| b.is_ascii_digit() || b"+-.eE".contains(b))
        {
            self.pos += 1;
        }
        let text = std::str::from_utf8(&self.bytes[start..self.pos]).unwrap();
        text.parse()
            .map(Json::Number)
            .or_else(|_| self.error("bad number"))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let digits = self
            .bytes
            .get(self.pos..self.pos + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u32::from_str_radix(d, 16).ok());
        match digits {
            Some(value) => {
                self.pos += 4;
                Ok(value)
            }
            None => self.error("bad \\u escape"),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut text = Vec::new();
        loop {
            let Some(&byte) = self.bytes.get(self.pos) else {
                return self.error("unterminated string");
            };
            self.pos += 1;
            match byte {
                b'"' => return String::from_utf8(text).or_else(|_| self.error("bad UTF-8")),
                b'\\' => {
                    let Some(&escape) = self.bytes.get(self.pos) else {
                        return self.error("unterminated escape");
                    };
                    self.pos += 1;
                    let c = match escape {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let mut code = self.hex4()?;
                            if (0xd800..0xdc00).contains(&code)
                                && self.bytes[self.pos..].starts_with(b"\\u")
                            {
                                self.pos += 2;
                                let low = self.hex4()?;
                                code = 0x10000
                                    + ((code - 0xd800) << 10)
                                    + (low.wrapping_sub(0xdc00) & 0x3ff);
                            }
                            char::from_u32(code).unwrap_or('\u{fffd}')
                        }
                        _ => return self.error("bad escape"),
                    };
                    text.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                }
                _ => text.push(byte),
            }
        }
    }
}

#[test]
fn the_rules_file_is_the_crds_groups_with_short_holds() {
    let rules = rules_file(RULES, HOLD);
    assert!(rules.starts_with("groups:\n"), "{rules}");
    assert_eq!(
        rules.matches("- alert: ").count(),
        RULES.matches("- alert: ").count()
    );
    assert!(rules.contains("\n        for: 3s\n"), "{rules}");
    assert!(
        !rules.contains("for: 2m") && !rules.contains("for: 5m"),
        "{rules}"
    );
}

#[test]
fn json_as_prometheus_writes_it() {
    let json = Json::parse(
        r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"a":"x\"\u00e9\ud83d\ude00"},"value":[1.5e9,"NaN"]}]}}"#,
    )
    .unwrap();
    let result = json.get("data").unwrap().get("result").unwrap().items();
    assert_eq!(
        result[0].get("metric").unwrap().get("a").unwrap().as_str(),
        Some("x\"é😀")
    );
    assert!(Sample::from_json(&result[0]).value.is_nan());
    assert!(Json::parse("[1, 2").is_err());
    assert!(Json::parse("{} x").is_err());
}
