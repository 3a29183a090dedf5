//! Prometheus metrics of the server and the tiny_http thread that serves them.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, error, warn};
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// The server's metrics in a registry of their own (not the process-global one, so several
/// servers can live in one process).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `websocket_connections`: open WebSocket connections, updated as they open and close.
    pub connections: IntGauge,
    /// `websocket_connections_total`: WebSocket connections accepted since start.
    pub connections_total: IntCounter,
    /// `websocket_handshake_failures_total`: requests answered with an error status, or cut
    /// off by the handshake timeout (a connect-and-close with nothing sent does not count).
    pub handshake_failures: IntCounter,
    /// `websocket_connections_rejected_total`: connections refused with 503 (at the
    /// connection ceiling, or when the OS refused a thread).
    pub connections_rejected: IntCounter,
    /// `websocket_connections_closed_total{reason,code}`: ended connections by
    /// [`Reason`](crate::ending::Reason) label and Close code (`none` without one).
    pub connections_closed: IntCounterVec,
}

impl Metrics {
    /// Creates the metrics, with the `process_*` collector where the platform has one.
    pub fn new() -> Self {
        let registry = Registry::new();
        let connections = IntGauge::new(
            "websocket_connections",
            "Current number of active WebSocket connections",
        )
        .expect("valid metric");
        registry
            .register(Box::new(connections.clone()))
            .expect("metric names are unique");
        let counter = |name: &str, help: &str| {
            let counter = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(counter.clone()))
                .expect("metric names are unique");
            counter
        };
        let connections_total = counter(
            "websocket_connections_total",
            "WebSocket connections accepted since start",
        );
        let handshake_failures = counter(
            "websocket_handshake_failures_total",
            "Requests on the WebSocket port answered with an error status or cut off by the handshake timeout",
        );
        let connections_rejected = counter(
            "websocket_connections_rejected_total",
            "Connections refused with 503: at the connection ceiling or without a thread",
        );
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "websocket_connections_closed_total",
                "WebSocket connections ended, by reason and Close code",
            ),
            &["reason", "code"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(connections_closed.clone()))
            .expect("metric names are unique");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics register once");
        Metrics {
            registry,
            connections,
            connections_total,
            handshake_failures,
            connections_rejected,
            connections_closed,
        }
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The HTTP endpoint: `/metrics`, `/healthz` (alive) and `/readyz` (accepting connections).
pub struct MetricsServer {
    shared: Arc<Shared>,
    thread: JoinHandle<()>,
}

struct Shared {
    ready: AtomicBool,
    stopping: AtomicBool,
    /// The tiny_http server now serving, so `stop` can unblock it.
    current: Mutex<Option<Arc<tiny_http::Server>>>,
}

/// Wait before serving again after tiny_http gave up (its accept thread ends for good on
/// an accept error such as EMFILE).
const RESTART_DELAY: Duration = Duration::from_secs(1);

impl MetricsServer {
    /// Serves `metrics` on `listener` from a thread named `metrics-http`.
    pub fn start(listener: TcpListener, metrics: Metrics) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            ready: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            current: Mutex::new(None),
        });
        let first = Arc::new(
            tiny_http::Server::from_listener(listener.try_clone()?, None)
                .map_err(std::io::Error::other)?,
        );
        let thread = thread::Builder::new().name("metrics-http".into()).spawn({
            let shared = shared.clone();
            move || supervise(listener, first, &metrics, &shared)
        })?;
        Ok(MetricsServer { shared, thread })
    }

    /// Makes `/readyz` answer 503, so load balancers stop sending new connections.
    pub fn set_not_ready(&self) {
        self.shared.ready.store(false, Ordering::SeqCst);
    }

    /// Stops serving and joins the thread.
    pub fn stop(self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(http) = self.shared.lock_current().as_ref() {
            http.unblock();
        }
        if let Err(panic) = self.thread.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Shared {
    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<Arc<tiny_http::Server>>> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Serves until stopped, starting a new tiny_http server on the same listener whenever the
/// current one gives up, so a burst of EMFILE cannot take the probes down for good.
fn supervise(
    listener: TcpListener,
    first: Arc<tiny_http::Server>,
    metrics: &Metrics,
    shared: &Shared,
) {
    let mut http = first;
    loop {
        *shared.lock_current() = Some(http.clone());
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        serve(&http, metrics, &shared.ready);
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        error!("metrics endpoint stopped accepting; serving again in {RESTART_DELAY:?}");
        http = loop {
            let _ = crossbeam_channel::after(RESTART_DELAY).recv();
            if shared.stopping.load(Ordering::SeqCst) {
                return;
            }
            let restarted = listener
                .try_clone()
                .map_err(|error| error.to_string())
                .and_then(|clone| {
                    tiny_http::Server::from_listener(clone, None).map_err(|e| e.to_string())
                });
            match restarted {
                Ok(next) => break Arc::new(next),
                Err(error) => error!("cannot restart the metrics endpoint: {error}; trying again"),
            }
        };
    }
}

fn serve(http: &tiny_http::Server, metrics: &Metrics, ready: &AtomicBool) {
    for request in http.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or("");
        debug!(
            "{} {} from {:?}",
            request.method(),
            request.url(),
            request.remote_addr()
        );
        let response = match path {
            "/metrics" => tiny_http::Response::from_data(metrics.render()).with_header(
                tiny_http::Header::from_bytes("Content-Type", prometheus::TEXT_FORMAT)
                    .expect("valid header"),
            ),
            "/healthz" => tiny_http::Response::from_string("ok\n"),
            "/readyz" if ready.load(Ordering::SeqCst) => {
                tiny_http::Response::from_string("ready\n")
            }
            "/readyz" => tiny_http::Response::from_string("shutting down\n").with_status_code(503),
            _ => tiny_http::Response::from_string("not found\n").with_status_code(404),
        };
        if let Err(error) = request.respond(response) {
            warn!("metrics response failed: {error}");
        }
    }
}
