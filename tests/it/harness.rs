//! In-process servers and clients: each runs the library's `Server::run` or `Client::run`
//! on a named thread of this test process, bound to 127.0.0.1 port 0, and is shut down
//! (triggered, then joined) when dropped. Tests observe their state, the server's registry
//! and metrics or the client's counters, instead of reading log lines.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::Parser;
use websocket_test::client::{Client, ClientStats};
use websocket_test::server::ServerState;
use websocket_test::shutdown::{self, Trigger};
use websocket_test::{ClientConfig, Server, ServerConfig};

use crate::support::{self, patience, scaled, Ws};

/// A server running on a thread named `test-server`.
pub struct TestServer {
    /// The WebSocket address.
    pub addr: SocketAddr,
    /// The metrics address.
    pub metrics: SocketAddr,
    state: ServerState,
    runner: Runner,
}

impl TestServer {
    /// Starts a server on 127.0.0.1 with free ports and `flags` (as on the command line).
    pub fn start(flags: &[&str]) -> TestServer {
        Self::start_on(0, flags)
    }

    /// Like [`start`](Self::start) on WebSocket port `port`, retrying while it is still
    /// taken (by a server just stopped, say).
    pub fn start_on(port: u16, flags: &[&str]) -> TestServer {
        let port = port.to_string();
        let mut args = vec![
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--metrics-port",
            "0",
        ];
        args.extend_from_slice(flags);
        let config =
            ServerConfig::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let deadline = Instant::now() + patience();
        let server = loop {
            match Server::bind(config.clone()) {
                Ok(server) => break server,
                Err(error) => assert!(
                    port != "0" && Instant::now() < deadline,
                    "{args:?}: {error}"
                ),
            }
            thread::sleep(Duration::from_millis(10)); // polling interval
        };
        let (addr, metrics, state) = (server.local_addr(), server.metrics_addr(), server.state());
        let runner = Runner::start("test-server", move |shutdown| {
            server.run(shutdown).map_err(|e| e.to_string())
        });
        TestServer {
            addr,
            metrics,
            state,
            runner,
        }
    }

    /// `ws://ADDR/ws`.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Opens a WebSocket connection and waits until the server has registered it.
    pub fn connect(&self) -> Ws {
        let before = self.state.connections();
        let ws = support::connect(&self.url());
        // The client has its 101 just before the server registers the connection.
        support::wait_until("the server registers the new connection", || {
            self.state.connections() > before
        });
        ws
    }

    /// The registry and thread counts.
    pub fn state(&self) -> &ServerState {
        &self.state
    }

    /// The value of metric `name` (with its labels, e.g. `x{reason="eof",code="none"}`),
    /// read from `/metrics` over HTTP.
    pub fn metric(&self, name: &str) -> f64 {
        support::metric(self.metrics, name)
    }

    /// Like [`metric`](Self::metric), 0 for a labelled series that has not appeared yet.
    pub fn count(&self, series: &str) -> f64 {
        support::try_metric(self.metrics, series).unwrap_or(0.0)
    }

    /// Failed handshakes of every cause (`websocket_handshake_failures_total`).
    pub fn handshake_failures(&self) -> f64 {
        support::metric_sum(self.metrics, "websocket_handshake_failures_total")
    }

    /// How many connections ended for `reason` (a label of
    /// `websocket_connections_closed_total`, e.g. `peer_close`) with Close `code` (`none`
    /// for no code).
    pub fn closed(&self, reason: &str, code: &str) -> f64 {
        self.count(&format!(
            "websocket_connections_closed_total{{code=\"{code}\",reason=\"{reason}\"}}"
        ))
    }

    /// Waits until exactly `n` connections are open, no socket is in its handshake and no
    /// other connection thread is left (a closing one, say); then the gauge must agree.
    pub fn wait_settled(&self, n: usize) {
        let state = &self.state;
        let settled = || {
            state.connections() == n && state.handshakes() == 0 && state.connection_threads() == n
        };
        let deadline = Instant::now() + patience();
        while !settled() {
            assert!(
                Instant::now() < deadline,
                "{n} connections and threads were not left within {:?}: {} connections, {} \
                 handshakes, {} threads",
                patience(),
                state.connections(),
                state.handshakes(),
                state.connection_threads()
            );
            thread::sleep(Duration::from_millis(5)); // polling interval
        }
        assert_eq!(self.metric("websocket_connections"), n as f64);
    }

    /// Requests shutdown (as SIGTERM does) without waiting for it.
    pub fn shut_down(&mut self) {
        self.runner.trigger();
    }

    /// Waits up to `within` (scaled) for `run` to return after [`shut_down`](Self::shut_down);
    /// returns how long it took from the call and panics if `run` failed.
    pub fn wait_stopped(&mut self, within: Duration) -> Duration {
        self.runner.wait(within)
    }
}

/// Timings of every test client (flags given to [`TestClient::start`] replace these). The
/// reconnect delay is fixed, as in the design document (no backoff, no jitter), unless a
/// test asks for more.
pub const FAST: [(&str, &str); 7] = [
    ("--ping-interval", "100ms"),
    ("--pong-timeout", "300ms"),
    ("--status-interval", "200ms"),
    ("--reconnect-delay", "300ms"),
    ("--reconnect-max-delay", "300ms"),
    ("--reconnect-jitter", "0"),
    ("--connect-timeout", "2s"),
];

/// A client running on a thread named `test-client`.
pub struct TestClient {
    stats: Arc<ClientStats>,
    /// The metrics address, with `--metrics-port`.
    pub metrics: Option<SocketAddr>,
    runner: Runner,
}

impl TestClient {
    /// Starts a client of `target` with the [`FAST`] timings and `flags`.
    pub fn start(target: SocketAddr, flags: &[&str]) -> TestClient {
        let (host, port) = (target.ip().to_string(), target.port().to_string());
        let mut flags_with_target = vec!["--host", &host, "--port", &port];
        flags_with_target.extend_from_slice(flags);
        Self::start_with(&flags_with_target)
    }

    /// Starts a client with `flags` alone (they name the target: `--url`, or `--host` and
    /// `--port`) and the [`FAST`] timings they do not set.
    pub fn start_with(flags: &[&str]) -> TestClient {
        let mut args = vec!["client"];
        for (flag, value) in FAST {
            if !flags.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend_from_slice(flags);
        let config =
            ClientConfig::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let client = Client::new(config).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let (stats, metrics) = (client.stats(), client.metrics_addr());
        let runner = Runner::start("test-client", move |shutdown| {
            client.run(shutdown).map_err(|e| e.to_string())
        });
        TestClient {
            stats,
            metrics,
            runner,
        }
    }

    /// The client's counters.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// Waits up to `within` (scaled) until the counters satisfy `condition`.
    pub fn wait(&self, what: &str, within: Duration, condition: impl Fn(&ClientStats) -> bool) {
        support::wait_within(what, within, || condition(&self.stats));
    }

    /// Requests shutdown (as SIGTERM does) without waiting for it.
    pub fn shut_down(&mut self) {
        self.runner.trigger();
    }

    /// Waits up to `within` (scaled) for `run` to return after [`shut_down`](Self::shut_down);
    /// returns how long it took from the call.
    pub fn wait_stopped(&mut self, within: Duration) -> Duration {
        self.runner.wait(within)
    }
}

/// A `run` function on its own named thread, with its shutdown trigger.
struct Runner {
    name: &'static str,
    trigger: Option<Trigger>,
    triggered_at: Option<Instant>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Runner {
    fn start(
        name: &'static str,
        run: impl FnOnce(shutdown::Shutdown) -> Result<(), String> + Send + 'static,
    ) -> Runner {
        let (trigger, shutdown) = shutdown::channel();
        let thread = thread::Builder::new()
            .name(name.into())
            .spawn(move || run(shutdown))
            .unwrap();
        Runner {
            name,
            trigger: Some(trigger),
            triggered_at: None,
            thread: Some(thread),
        }
    }

    fn trigger(&mut self) {
        if let Some(trigger) = self.trigger.take() {
            self.triggered_at = Some(Instant::now());
            trigger.trigger();
        }
    }

    fn wait(&mut self, within: Duration) -> Duration {
        self.trigger();
        let thread = self.thread.take().expect("waited for once");
        let deadline = Instant::now() + scaled(within);
        while !thread.is_finished() {
            assert!(
                Instant::now() < deadline,
                "{} did not stop within {:?} of its shutdown",
                self.name,
                scaled(within)
            );
            thread::sleep(Duration::from_millis(1)); // polling interval
        }
        let took = self.triggered_at.expect("triggered").elapsed();
        match thread.join() {
            Ok(Ok(())) => took,
            Ok(Err(error)) => panic!("{} failed: {error}", self.name),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if self.thread.is_some() && !thread::panicking() {
            self.wait(Duration::from_secs(10));
        } else if let Some(thread) = self.thread.take() {
            // Already failing: stop it, but do not panic again.
            self.trigger();
            let deadline = Instant::now() + patience();
            while !thread.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
