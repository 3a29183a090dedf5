//! Prometheus metrics of the server and the endpoint that serves them: `/metrics`,
//! `/healthz` and `/readyz` on the bounded HTTP endpoint of [`crate::http`].

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::warn;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::http::{self, Endpoint, Response};

/// The server's metrics in a registry of their own (not the process-global one, so several
/// servers can live in one process).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `websocket_connections`: open WebSocket connections, updated as they open and close.
    pub connections: IntGauge,
    /// `websocket_connections_opened_total`: WebSocket connections accepted since start.
    pub connections_opened: IntCounter,
    /// `websocket_handshake_failures_total{cause}`: requests answered with an error status,
    /// or cut off by the handshake timeout (a connect-and-close with nothing sent does not
    /// count); `cause` is one of [`HANDSHAKE_FAILURES`].
    pub handshake_failures: IntCounterVec,
    /// `websocket_connection_duration_seconds`: how long connections lasted.
    pub connection_duration: prometheus::Histogram,
    /// `websocket_connections_rejected_total`: connections refused with 503 (at the
    /// connection ceiling, or when the OS refused a thread) or 429 (past a per-address
    /// limit).
    pub connections_rejected: IntCounter,
    /// `websocket_connections_closed_total{reason,code}`: ended connections by
    /// [`Reason`](crate::ending::Reason) label and Close code (`none` without one).
    pub connections_closed: IntCounterVec,
    /// `log_lines_dropped_total`: log lines the logger could not write (a closed pipe, a
    /// full disk), read from [`logger::dropped_lines`](crate::logger::dropped_lines).
    log_lines_dropped: IntCounter,
    /// Held while `log_lines_dropped` catches up, so two scrapes cannot both add the news.
    log_sync: Arc<std::sync::Mutex<()>>,
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
        let connections_opened = counter(
            "websocket_connections_opened_total",
            "WebSocket connections accepted since start",
        );
        let handshake_failures = IntCounterVec::new(
            Opts::new(
                "websocket_handshake_failures_total",
                "Requests on the WebSocket port answered with an error status or cut off by the handshake timeout, by cause",
            ),
            &["cause"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(handshake_failures.clone()))
            .expect("metric names are unique");
        // Every cause is there from the start, at 0, so rate() sees the first one.
        for cause in HANDSHAKE_FAILURES {
            handshake_failures.with_label_values(&[cause]);
        }
        let connection_duration = histogram(
            "websocket_connection_duration_seconds",
            "How long WebSocket connections lasted, from the upgrade to their end",
            &DURATION_BUCKETS,
        );
        registry
            .register(Box::new(connection_duration.clone()))
            .expect("metric names are unique");
        let connections_rejected = counter(
            "websocket_connections_rejected_total",
            "Connections refused: 503 at the connection ceiling or without a thread, 429 past a per-address limit",
        );
        let log_lines_dropped = counter(
            "log_lines_dropped_total",
            "Log lines dropped because stdout could not take them (closed pipe, full disk)",
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
            connections_opened,
            handshake_failures,
            connection_duration,
            connections_rejected,
            connections_closed,
            log_lines_dropped,
            log_sync: Arc::default(),
        }
    }

    /// The metrics in the Prometheus text exposition format, with `extra` families (counts
    /// read from the live connections at this moment). Fails when a collector yields a
    /// metric family the encoder refuses (one without a name, say).
    pub fn render(
        &self,
        extra: Vec<prometheus::proto::MetricFamily>,
    ) -> prometheus::Result<Vec<u8>> {
        {
            let _sync = self
                .log_sync
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let dropped = crate::logger::dropped_lines();
            self.log_lines_dropped
                .inc_by(dropped.saturating_sub(self.log_lines_dropped.get()));
        }
        let mut families = self.registry.gather();
        families.extend(extra);
        let mut out = Vec::with_capacity(4096);
        TextEncoder::new().encode(&families, &mut out)?;
        Ok(out)
    }
}

/// The `cause` label values of `websocket_handshake_failures_total`.
pub const HANDSHAKE_FAILURES: [&str; 13] = [
    "malformed",   // 400: not HTTP, or not a WebSocket upgrade
    "auth",        // 401: no or a wrong bearer token
    "origin",      // 403: an Origin not allowed
    "path",        // 404
    "method",      // 405
    "timeout",     // 408, or silence: not within the handshake timeout
    "version",     // 426 or 505
    "too_large",   // 431
    "tls",         // the TLS handshake failed
    "proxy",       // the PROXY protocol header was missing or wrong
    "unavailable", // 503 while draining
    "closed",      // the client closed in the middle of its request
    "error",       // anything else
];

/// The `cause` label of a handshake answered with `status`.
pub(crate) fn failure_cause(status: u16) -> &'static str {
    match status {
        400 => "malformed",
        401 => "auth",
        403 => "origin",
        404 => "path",
        405 => "method",
        408 => "timeout",
        426 | 505 => "version",
        431 => "too_large",
        503 => "unavailable",
        _ => "error",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What the metrics port reads from the live connections at each request.
pub(crate) trait Live: Send + Sync {
    /// Metric families counted over the live connections (traffic, say).
    fn families(&self) -> Vec<prometheus::proto::MetricFamily>;
    /// `/debug/connections`: the live connections as JSON.
    fn connections_json(&self) -> String;
}

/// The metrics port: `/metrics`, `/healthz` (alive), `/readyz` (accepting connections) and
/// `/debug/connections`, served by [`http::serve`] from `metrics-http` and a few
/// `metrics-N` threads.
pub struct MetricsServer {
    ready: Arc<AtomicBool>,
    endpoint: Endpoint,
}

impl MetricsServer {
    /// Serves `metrics` and what `live` reads on `listener`.
    pub(crate) fn start(
        listener: TcpListener,
        metrics: Metrics,
        live: Arc<dyn Live>,
    ) -> std::io::Result<Self> {
        let ready = Arc::new(AtomicBool::new(true));
        let endpoint = http::serve(
            listener,
            Arc::new({
                let ready = ready.clone();
                move |path: &str| route(path, &metrics, &*live, &ready)
            }),
        )?;
        Ok(MetricsServer { ready, endpoint })
    }

    /// Makes `/readyz` answer 503, so load balancers stop sending new connections.
    pub fn set_not_ready(&self) {
        self.ready.store(false, Ordering::SeqCst);
    }

    /// Stops serving and joins the threads.
    pub fn stop(self) {
        self.endpoint.stop();
    }
}

fn route(path: &str, metrics: &Metrics, live: &dyn Live, ready: &AtomicBool) -> Response {
    match path {
        "/metrics" => match metrics.render(live.families()) {
            Ok(body) => Response {
                status: 200,
                content_type: prometheus::TEXT_FORMAT,
                body,
            },
            Err(error) => {
                warn!("cannot encode the metrics: {error}");
                Response::text(500, &format!("cannot encode the metrics: {error}"))
            }
        },
        "/healthz" => Response::text(200, "ok"),
        "/readyz" if ready.load(Ordering::SeqCst) => Response::text(200, "ready"),
        "/readyz" => Response::text(503, "shutting down"),
        "/debug/connections" => Response {
            status: 200,
            content_type: "application/json",
            body: live.connections_json().into_bytes(),
        },
        _ => Response::text(404, "not found"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::core::{Collector, Desc};
    use prometheus::proto::MetricFamily;

    /// No live connections: for a metrics page without a server behind it.
    struct NoLive;

    impl Live for NoLive {
        fn families(&self) -> Vec<prometheus::proto::MetricFamily> {
            Vec::new()
        }

        fn connections_json(&self) -> String {
            "[]\n".into()
        }
    }

    /// A collector whose family has lost its name, which the text encoder refuses.
    struct Nameless(IntCounter);

    impl Collector for Nameless {
        fn desc(&self) -> Vec<&Desc> {
            self.0.desc()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            let mut families = self.0.collect();
            families.iter_mut().for_each(MetricFamily::clear_name);
            families
        }
    }

    #[test]
    fn routes() {
        let (metrics, ready) = (Metrics::new(), AtomicBool::new(true));
        let metrics_page = route("/metrics", &metrics, &NoLive, &ready);
        assert_eq!(metrics_page.status, 200);
        assert_eq!(metrics_page.content_type, prometheus::TEXT_FORMAT);
        let text = String::from_utf8(metrics_page.body).unwrap();
        assert!(text.contains("\nwebsocket_connections 0\n"), "{text}");
        assert_eq!(
            route("/healthz", &metrics, &NoLive, &ready),
            Response::text(200, "ok")
        );
        assert_eq!(
            route("/readyz", &metrics, &NoLive, &ready),
            Response::text(200, "ready")
        );
        assert_eq!(route("/", &metrics, &NoLive, &ready).status, 404);
        assert_eq!(
            route("/debug/connections", &metrics, &NoLive, &ready).body,
            b"[]\n"
        );
        ready.store(false, Ordering::SeqCst);
        assert_eq!(route("/readyz", &metrics, &NoLive, &ready).status, 503);
    }

    #[test]
    fn an_encoding_error_answers_500_with_a_one_line_reason() {
        let metrics = Metrics::new();
        let broken = IntCounter::new("broken_total", "loses its name").unwrap();
        broken.inc();
        metrics
            .registry
            .register(Box::new(Nameless(broken)))
            .unwrap();
        assert!(metrics.render(Vec::new()).is_err());
        let response = route("/metrics", &metrics, &NoLive, &AtomicBool::new(true));
        assert_eq!(response.status, 500);
        let body = String::from_utf8(response.body).unwrap();
        assert!(body.starts_with("cannot encode the metrics: "), "{body}");
        assert_eq!(body.lines().count(), 1, "{body}");
    }
}

/// Connection lifetimes in seconds: a bound just below and just above each cut-off that
/// names a middlebox, 60 s (nginx, ALB idle), 350 s (AWS NLB idle), 3600 s (an hourly reset).
pub(crate) const DURATION_BUCKETS: [f64; 17] = [
    1.0, 5.0, 10.0, 30.0, 55.0, 65.0, 120.0, 300.0, 340.0, 360.0, 600.0, 1800.0, 3500.0, 3700.0,
    7200.0, 21600.0, 86400.0,
];

/// Round trips in seconds, from loopback to an intercontinental path under load.
pub(crate) const RTT_BUCKETS: [f64; 15] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram of durations with fixed buckets, `histogram_opts` style.
pub(crate) fn histogram(name: &str, help: &str, buckets: &[f64]) -> prometheus::Histogram {
    prometheus::Histogram::with_opts(
        prometheus::HistogramOpts::new(name, help).buckets(buckets.to_vec()),
    )
    .expect("valid histogram")
}

/// Builders for metric families whose values live elsewhere (the client's atomics), for a
/// text exposition without a second copy of every count.
pub(crate) mod family {
    use prometheus::proto::{
        Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
    };

    /// A family of `kind` named `name`, one sample per `(labels, metric)`.
    fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
        let mut family = MetricFamily::default();
        family.set_name(name.to_owned());
        family.set_help(help.to_owned());
        family.set_field_type(kind);
        family.set_metric(metrics);
        family
    }

    fn labelled(labels: &[(&str, &str)]) -> Metric {
        let mut metric = Metric::default();
        metric.set_label(
            labels
                .iter()
                .map(|(name, value)| {
                    let mut pair = LabelPair::default();
                    pair.set_name((*name).to_owned());
                    pair.set_value((*value).to_owned());
                    pair
                })
                .collect(),
        );
        metric
    }

    /// A counter family.
    pub(crate) fn counter(
        name: &str,
        help: &str,
        samples: &[(&[(&str, &str)], u64)],
    ) -> MetricFamily {
        let metrics = samples
            .iter()
            .map(|(labels, value)| {
                let mut metric = labelled(labels);
                let mut counter = Counter::default();
                counter.set_value(*value as f64);
                metric.set_counter(counter);
                metric
            })
            .collect();
        family(name, help, MetricType::COUNTER, metrics)
    }

    /// A gauge family with one sample.
    pub(crate) fn gauge(
        name: &str,
        help: &str,
        samples: &[(&[(&str, &str)], f64)],
    ) -> MetricFamily {
        let metrics = samples
            .iter()
            .map(|(labels, value)| {
                let mut metric = labelled(labels);
                let mut gauge = Gauge::default();
                gauge.set_value(*value);
                metric.set_gauge(gauge);
                metric
            })
            .collect();
        family(name, help, MetricType::GAUGE, metrics)
    }

    /// A histogram family with one sample: `cumulative[i]` observations at most `bounds[i]`.
    pub(crate) fn histogram(
        name: &str,
        help: &str,
        bounds: &[f64],
        cumulative: &[u64],
        count: u64,
        sum: f64,
    ) -> MetricFamily {
        let mut histogram = Histogram::default();
        histogram.set_sample_count(count);
        histogram.set_sample_sum(sum);
        histogram.set_bucket(
            bounds
                .iter()
                .zip(cumulative)
                .map(|(bound, below)| {
                    let mut bucket = Bucket::default();
                    bucket.set_upper_bound(*bound);
                    bucket.set_cumulative_count(*below);
                    bucket
                })
                .collect(),
        );
        let mut metric = Metric::default();
        metric.set_histogram(histogram);
        family(name, help, MetricType::HISTOGRAM, vec![metric])
    }
}
