//! Prometheus metrics of the server and the tiny_http thread that serves them.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use log::{debug, warn};
use prometheus::{Encoder, IntCounter, IntGauge, Registry, TextEncoder};

/// The server's metrics in a registry of their own (not the process-global one, so several
/// servers can live in one process).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `websocket_connections`: open WebSocket connections, updated as they open and close.
    pub connections: IntGauge,
    /// `websocket_connections_total`: WebSocket connections accepted since start.
    pub connections_total: IntCounter,
    /// `websocket_handshake_failures_total`: upgrade requests answered with an error.
    pub handshake_failures: IntCounter,
    /// `websocket_connections_rejected_total`: connections refused with 503 (at the
    /// connection ceiling, or when the OS refused a thread).
    pub connections_rejected: IntCounter,
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
        let connections_total = IntCounter::new(
            "websocket_connections_total",
            "WebSocket connections accepted since start",
        )
        .expect("valid metric");
        let handshake_failures = IntCounter::new(
            "websocket_handshake_failures_total",
            "Requests to the WebSocket port that did not become a WebSocket connection",
        )
        .expect("valid metric");
        let connections_rejected = IntCounter::new(
            "websocket_connections_rejected_total",
            "Connections refused with 503: at the connection ceiling or without a thread",
        )
        .expect("valid metric");
        for metric in [
            Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(connections_total.clone()),
            Box::new(handshake_failures.clone()),
            Box::new(connections_rejected.clone()),
        ] {
            registry.register(metric).expect("metric names are unique");
        }
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
    http: Arc<tiny_http::Server>,
    thread: JoinHandle<()>,
    ready: Arc<AtomicBool>,
}

impl MetricsServer {
    /// Serves `metrics` on `listener` from a thread named `metrics-http`.
    pub fn start(listener: TcpListener, metrics: Metrics) -> std::io::Result<Self> {
        let http =
            tiny_http::Server::from_listener(listener, None).map_err(std::io::Error::other)?;
        let http = Arc::new(http);
        let ready = Arc::new(AtomicBool::new(true));
        let thread = thread::Builder::new().name("metrics-http".into()).spawn({
            let (http, ready) = (http.clone(), ready.clone());
            move || serve(&http, &metrics, &ready)
        })?;
        Ok(MetricsServer {
            http,
            thread,
            ready,
        })
    }

    /// Makes `/readyz` answer 503, so load balancers stop sending new connections.
    pub fn set_not_ready(&self) {
        self.ready.store(false, Ordering::SeqCst);
    }

    /// Stops serving and joins the thread.
    pub fn stop(self) {
        self.http.unblock();
        if let Err(panic) = self.thread.join() {
            std::panic::resume_unwind(panic);
        }
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
