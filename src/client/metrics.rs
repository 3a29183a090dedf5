//! The client's metrics port (`--metrics-port`): `/metrics` built at each scrape from the
//! counters the connection threads keep ([`ClientStats`]), `/healthz`, `/readyz` (ready
//! while a connection is up), and `/debug/connections`.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::{Encoder, TextEncoder};

use super::stats::{ClientStats, Counter, Failure};
use super::{lock, Live, Slot};
use crate::debug::{self, Row};
use crate::http::{self, Endpoint, Response};
use crate::metrics::{family, RTT_BUCKETS};

/// The metrics port of a running client.
pub(super) struct ClientEndpoint {
    _endpoint: Endpoint,
    stopping: Arc<AtomicBool>,
}

impl ClientEndpoint {
    /// Serves the routes on `listener` until dropped.
    pub(super) fn start(
        listener: TcpListener,
        stats: Arc<ClientStats>,
        slots: Arc<[Slot]>,
    ) -> std::io::Result<Self> {
        let stopping = Arc::new(AtomicBool::new(false));
        let handler = {
            let stopping = stopping.clone();
            move |path: &str| route(path, &stats, &slots, &stopping)
        };
        Ok(ClientEndpoint {
            _endpoint: http::serve(listener, Arc::new(handler))?,
            stopping,
        })
    }

    /// `/readyz` answers 503 from now on.
    pub(super) fn set_not_ready(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

fn route(path: &str, stats: &ClientStats, slots: &[Slot], stopping: &AtomicBool) -> Response {
    match path {
        "/metrics" => match render(stats) {
            Ok(body) => Response {
                status: 200,
                content_type: prometheus::TEXT_FORMAT,
                body,
            },
            Err(error) => Response::text(500, &format!("cannot encode the metrics: {error}")),
        },
        "/healthz" => Response::text(200, "ok"),
        "/readyz" if stopping.load(Ordering::SeqCst) => Response::text(503, "shutting down"),
        "/readyz" if stats.connections_up() > 0 => Response::text(200, "ready"),
        "/readyz" => Response::text(503, "no connection is up"),
        "/debug/connections" => Response {
            status: 200,
            content_type: "application/json",
            body: debug_connections(slots).into_bytes(),
        },
        _ => Response::text(404, "not found"),
    }
}

/// The client's metrics in the Prometheus text format.
pub(super) fn render(stats: &ClientStats) -> prometheus::Result<Vec<u8>> {
    let count = |counter| stats.get(counter);
    let mut families = vec![
        family::gauge(
            "websocket_client_connections",
            "Connections up now",
            &[(&[], stats.connections_up() as f64)],
        ),
        family::counter(
            "websocket_client_connect_attempts_total",
            "Connection attempts (TCP, TLS and the upgrade)",
            &[(
                &[],
                count(Counter::Connects) + count(Counter::ConnectFailures),
            )],
        ),
        family::counter(
            "websocket_client_reconnects_total",
            "Connections made again after a loss or failed attempts",
            &[(&[], count(Counter::Reconnects))],
        ),
        family::counter(
            "websocket_client_pings_total",
            "Pings sent",
            &[(&[], count(Counter::Pings))],
        ),
        family::counter(
            "websocket_client_pongs_total",
            "Pongs received for them",
            &[(&[], count(Counter::Pongs))],
        ),
        family::counter(
            "websocket_client_messages_total",
            "Load messages sent, and echoes received and verified",
            &[
                (&[("direction", "received")], count(Counter::Received)),
                (&[("direction", "sent")], count(Counter::Sent)),
            ],
        ),
        family::counter(
            "websocket_client_bytes_total",
            "Load message payload bytes sent and echoed back",
            &[
                (&[("direction", "received")], count(Counter::BytesReceived)),
                (&[("direction", "sent")], count(Counter::BytesSent)),
            ],
        ),
        family::counter(
            "websocket_client_echo_errors_total",
            "Echoes that differed from what was sent, came out of order, or never came \
             (counted when their connection ended)",
            &[
                (&[("kind", "corrupted")], count(Counter::Corrupted)),
                (&[("kind", "lost")], count(Counter::Lost)),
                (&[("kind", "reordered")], count(Counter::Reordered)),
            ],
        ),
    ];
    let causes: Vec<[(&str, &str); 1]> = Failure::ALL
        .iter()
        .map(|cause| [("cause", cause.label())])
        .collect();
    let failures: Vec<(&[(&str, &str)], u64)> = causes
        .iter()
        .zip(Failure::ALL)
        .map(|(labels, cause)| (&labels[..], stats.failed(cause)))
        .collect();
    families.push(family::counter(
        "websocket_client_connect_failures_total",
        "Connection attempts that failed, by cause",
        &failures,
    ));
    let endings = stats.endings();
    let labels: Vec<[(&str, String); 2]> = endings
        .keys()
        .map(|(reason, code)| {
            // In name order, as Prometheus prints a registry's labels.
            [
                (
                    "code",
                    code.map_or_else(|| "none".to_owned(), |c| c.to_string()),
                ),
                ("reason", reason.label().to_owned()),
            ]
        })
        .collect();
    let borrowed: Vec<[(&str, &str); 2]> = labels
        .iter()
        .map(|[(a, x), (b, y)]| [(*a, x.as_str()), (*b, y.as_str())])
        .collect();
    let samples: Vec<(&[(&str, &str)], u64)> = borrowed
        .iter()
        .zip(endings.values())
        .map(|(labels, n)| (&labels[..], *n))
        .collect();
    families.push(family::counter(
        "websocket_client_disconnects_total",
        "Connections that ended, by reason and Close code (none without one)",
        &samples,
    ));
    let backends = stats.backends();
    let backend_labels: Vec<[(&str, &str); 1]> = backends
        .keys()
        .map(|backend| [("backend", backend.as_str())])
        .collect();
    let per_backend: Vec<(&[(&str, &str)], f64)> = backend_labels
        .iter()
        .zip(backends.values())
        .map(|(labels, n)| (&labels[..], *n as f64))
        .collect();
    families.push(family::gauge(
        "websocket_client_backend_connections",
        "Connections up now by the backend that answered them (its X-Served-By header)",
        &per_backend,
    ));
    families.extend(stats.durations.collect());
    families.extend(stats.ping_rtts.collect());
    families.push(echo_rtts(stats));
    // The text format has no empty family (no connection has ended yet, say).
    families.retain(|family| !family.get_metric().is_empty());
    let mut out = Vec::with_capacity(8192);
    TextEncoder::new().encode(&families, &mut out)?;
    Ok(out)
}

/// Load mode's echo round trips, from the HDR histogram the summary line uses.
fn echo_rtts(stats: &ClientStats) -> prometheus::proto::MetricFamily {
    let rtts = stats.echo_rtts();
    let cumulative: Vec<u64> = RTT_BUCKETS
        .iter()
        .map(|bound| rtts.count_between(0, (bound * 1e6) as u64))
        .collect();
    let mut sum_micros = 0.0;
    for value in rtts.iter_recorded() {
        sum_micros += value.value_iterated_to() as f64 * value.count_at_value() as f64;
    }
    family::histogram(
        "websocket_client_echo_rtt_seconds",
        "Load mode: round trips of verified echoes",
        &RTT_BUCKETS,
        &cumulative,
        rtts.len(),
        sum_micros / 1e6,
    )
}

/// `/debug/connections`: the connection each thread holds now.
fn debug_connections(slots: &[Slot]) -> String {
    let live: Vec<(u64, Live)> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, slot)| Some((i as u64 + 1, lock(slot).clone()?)))
        .collect();
    let rows: Vec<Row<'_>> = live
        .iter()
        .map(|(id, live)| Row {
            id: *id,
            thread: &live.thread,
            tid: live.tid,
            peer: &live.url,
            activity: live.activity.snapshot(),
        })
        .collect();
    debug::render(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_counts_and_echo_errors_are_exported_with_zeroes() {
        let stats = ClientStats::default();
        stats.add(Counter::Sent, 5);
        stats.add(Counter::Received, 4);
        stats.add(Counter::BytesSent, 160);
        stats.add(Counter::BytesReceived, 128);
        stats.add(Counter::Lost, 1);
        let text = String::from_utf8(render(&stats).unwrap()).unwrap();
        for line in [
            "websocket_client_messages_total{direction=\"received\"} 4",
            "websocket_client_messages_total{direction=\"sent\"} 5",
            "websocket_client_bytes_total{direction=\"received\"} 128",
            "websocket_client_bytes_total{direction=\"sent\"} 160",
            "websocket_client_echo_errors_total{kind=\"corrupted\"} 0",
            "websocket_client_echo_errors_total{kind=\"lost\"} 1",
            "websocket_client_echo_errors_total{kind=\"reordered\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
