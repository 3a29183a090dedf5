//! The echo server: a blocking accept loop that gives every socket its own named thread.
//!
//! Threads: `acceptor` (accept loop), `conn-N` (one per connection: handshake, then echo),
//! `rejecter` (503 past the ceiling, 429 past a per-address limit), `reporter` (logs the
//! connection count), `metrics-http`
//! and `metrics-1..4` (the metrics endpoint), and the caller's thread, which waits for
//! shutdown and then drains the connections.

mod acceptor;
mod access;
mod capacity;
mod connection;
pub mod handshake;
pub mod proxy_protocol;
mod registry;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::config::ServerConfig;
use crate::ending::Reason;
use crate::error::{Error, Result};
use crate::frame::close_frame;
use crate::metrics::{Metrics, MetricsServer};
use crate::net;
use crate::shutdown::Shutdown;
use crate::stream::close_all;
use crate::threads::{self, Helpers};
use crate::tls::ServerTls;
use access::Access;
use capacity::Capacity;
use connection::{Context, Keepalive};
use registry::Registry;

pub use crate::net::LISTEN_BACKLOG;
pub use acceptor::CONNECTION_STACK_SIZE;
/// tungstenite's read chunk per connection (its default, 128 KiB, would be resident per
/// connection as soon as it first reads).
pub const READ_BUFFER_SIZE: usize = 1024;
/// After the shutdown timeout, how long to wait for the aborted connections' threads.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// A bound, not yet running server.
pub struct Server {
    config: ServerConfig,
    capacity: Capacity,
    tls: Option<ServerTls>,
    access: Access,
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics_listener: TcpListener,
    metrics_addr: SocketAddr,
    metrics: Metrics,
    state: ServerState,
}

/// A live view of a server's connections, cheap to clone: what tests and tools observe
/// while [`Server::run`] serves.
#[derive(Clone)]
pub struct ServerState {
    registry: Registry,
    threads: Arc<AtomicUsize>,
    metrics: Metrics,
}

impl ServerState {
    /// WebSocket connections open now (what the `websocket_connections` gauge says).
    pub fn connections(&self) -> usize {
        self.registry.len()
    }

    /// The client addresses of the open WebSocket connections (behind a balancer or proxy,
    /// the addresses it reported; port 0 when it reported none).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.registry.peers()
    }

    /// Sockets still sending their opening request.
    pub fn handshakes(&self) -> usize {
        self.registry.handshakes()
    }

    /// Connection threads alive now: open connections, handshakes in progress, and
    /// connections still finishing their close.
    pub fn connection_threads(&self) -> usize {
        self.threads.load(Ordering::SeqCst)
    }

    /// Connections that ended for `reason` with Close `code` so far (what
    /// `websocket_connections_closed_total` says; readable after the server has stopped).
    pub fn closed(&self, reason: Reason, code: Option<u16>) -> u64 {
        let code = code.map_or_else(|| "none".to_owned(), |code| code.to_string());
        self.metrics
            .connections_closed
            .with_label_values(&[reason.label(), &code])
            .get()
    }
}

impl Server {
    /// Binds the WebSocket and metrics ports.
    pub fn bind(config: ServerConfig) -> Result<Self> {
        let capacity = Capacity::detect(
            config
                .max_connections
                .map(|max| max.min(usize::MAX as u64) as usize),
        );
        if capacity.ceiling == 0 {
            // Listening while refusing everyone would look like a working server.
            return Err(Error::Setup(format!(
                "{} leaves room for no connection ({capacity}): raise it (for RLIMIT_NOFILE: ulimit -n)",
                capacity.limited_by
            )));
        }
        let bind = |port| {
            let addr = SocketAddr::new(config.host, port);
            net::bind_listener(addr).map_err(|source| Error::Bind { addr, source })
        };
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(
                ServerTls::load(cert, key, config.tls_client_ca.as_deref())
                    .map_err(Error::Setup)?,
            ),
            _ => None,
        };
        let access = Access::from_config(&config).map_err(Error::Setup)?;
        let listener = bind(config.port)?;
        config.accepted_options().set_on_listener(&listener);
        let metrics_listener = bind(config.metrics_port)?;
        let metrics = Metrics::new();
        Ok(Server {
            capacity,
            tls,
            access,
            local_addr: listener.local_addr()?,
            metrics_addr: metrics_listener.local_addr()?,
            listener,
            metrics_listener,
            state: ServerState {
                registry: Registry::new(&metrics),
                threads: Arc::default(),
                metrics: metrics.clone(),
            },
            metrics,
            config,
        })
    }

    /// The bound WebSocket address (useful with `--port 0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound metrics address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// A view of the connections that stays valid while the server runs.
    pub fn state(&self) -> ServerState {
        self.state.clone()
    }

    /// Serves until `shutdown` is requested, then closes every connection with 1001 and
    /// waits up to the shutdown timeout for them to finish.
    pub fn run(self, shutdown: Shutdown) -> Result<()> {
        let Server {
            config,
            capacity,
            tls,
            access,
            listener,
            local_addr,
            metrics_listener,
            metrics_addr,
            metrics,
            state: ServerState {
                registry, threads, ..
            },
        } = self;
        info!("Connection ceiling: {capacity}");
        if let Some(hint) = capacity.hint() {
            info!("{hint}");
        }
        match config.liveness().bound() {
            Some(bound) => info!(
                "A client that vanishes without a word is dropped within {} (--tcp-keepalive, --tcp-user-timeout)",
                crate::activity::Seconds(bound)
            ),
            None => warn!("--tcp-keepalive and --tcp-user-timeout are off: a client that vanishes without a word is counted until the kernel gives up (about 15 minutes, or never when idle)"),
        }
        if let Some(summary) = access.summary() {
            info!("Access: {summary}");
        }
        let (budget_limit, from) = match config.max_buffered_memory {
            Some(limit) => (limit, "--max-buffered-memory"),
            None => crate::budget::default_limit(),
        };
        info!(
            "Memory budget for messages: {} MiB ({from})",
            budget_limit >> 20
        );
        let budget = Arc::new(crate::budget::Budget::new(budget_limit));
        let metrics_server = MetricsServer::start(
            metrics_listener,
            metrics.clone(),
            Arc::new(LiveView {
                registry: registry.clone(),
                budget: budget.clone(),
            }),
        )?;
        // The reporter, the acceptor and the connections stop on `closing`, which follows
        // `shutdown` after the drain delay; dropping `helpers` (on any return) stops them.
        let mut helpers = Helpers::new();
        let closing = helpers.shutdown().clone();
        let identity = config.identity();
        if let Some(name) = &identity {
            info!("Server name: {name} (sent as X-Served-By)");
        }
        let context = Arc::new(Context {
            ws_path: config.path.clone(),
            handshake_timeout: config.handshake_timeout,
            accepted: config.accepted_options(),
            ws_config: WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER_SIZE)
                .write_buffer_size(0)
                .max_message_size(Some(config.max_message_size))
                .max_frame_size(Some(config.max_frame_size)),
            registry: registry.clone(),
            metrics,
            shutdown: closing.clone(),
            going_away: close_frame(Role::Server, CloseCode::Away, "server shutting down").into(),
            keepalive: Keepalive {
                ping_interval: config.server_ping_interval,
                idle_timeout: config.effective_idle_timeout(),
            },
            tls,
            access,
            answer_headers: identity
                .as_ref()
                .map(|name| format!("X-Served-By: {name}\r\n"))
                .unwrap_or_default(),
            hello: format!(
                "hello from {}",
                identity.as_deref().unwrap_or("websocket-test")
            ),
            hello_always: config.hello,
            ui: config.ui,
            draining: Arc::default(),
            budget: budget.clone(),
        });
        // Every connection thread holds a clone of `alive`; the channel disconnects when
        // the last one has finished.
        let (alive, all_finished) = crossbeam_channel::bounded::<()>(0);
        helpers.spawn("reporter", {
            let (registry, interval) = (registry.clone(), config.log_interval);
            move || {
                threads::every(interval, &closing, || {
                    info!("Active connections: {}", registry.len());
                });
            }
        })?;
        helpers.spawn_woken(
            "acceptor",
            {
                let context = context.clone();
                move || {
                    acceptor::accept_loop(&listener, &context, &capacity, &threads, alive);
                }
            },
            // A wake-up connect can fail (a firewall, a full backlog): it is retried.
            move || net::wake_acceptor(local_addr),
        )?;
        info!(
            "Listening on {}://{local_addr}{}",
            config.scheme(),
            config.path
        );
        info!("Metrics on http://{metrics_addr}/metrics");
        if config.ui {
            let scheme = if config.tls_cert.is_some() {
                "https"
            } else {
                "http"
            };
            info!("Browser probe page on {scheme}://{local_addr}/ui (off with --ui false)");
        }

        shutdown.wait();
        metrics_server.set_not_ready();
        if !config.drain_delay.is_zero() {
            context.draining.store(true, Ordering::SeqCst);
            info!(
                "Draining: /readyz and GET / answer 503, new upgrades get 503; closing connections in {:?}",
                config.drain_delay
            );
            let _ = crossbeam_channel::after(config.drain_delay).recv();
        }
        // No connection is admitted once the acceptor has been joined.
        helpers.stop();
        close_connections(
            &registry,
            &context,
            &all_finished,
            config.drain_period,
            config.shutdown_timeout,
        );
        metrics_server.stop();
        info!("Server stopped");
        Ok(())
    }
}

/// Closes every live connection with 1001 (the acceptor has stopped), spread over
/// `spread`, and cuts off sockets still in their handshake; waits up to `timeout` after the
/// last Close for the connection threads (their last clone of `alive` disconnects
/// `all_finished`), then aborts what is left.
fn close_connections(
    registry: &Registry,
    context: &Context,
    all_finished: &crossbeam_channel::Receiver<()>,
    spread: Duration,
    timeout: Duration,
) {
    if !spread.is_zero() {
        info!("Sending the Close frames over {spread:?}");
    }
    let entries = registry.entries();
    info!(
        "Shutting down: closing {}",
        crate::count(entries.len(), "connection")
    );
    for (id, entry) in &entries {
        debug!(
            "closing conn-{id} {} (up {:.1}s)",
            entry.peer,
            entry.connected_at.elapsed().as_secs_f64()
        );
    }
    drop(entries); // holding their streams would keep finished connections' sockets open
    let cut_short = registry.abort_handshakes();
    if cut_short > 0 {
        info!(
            "Closed {} that had not finished the upgrade request",
            crate::count(cut_short, "socket")
        );
    }
    let live = || {
        registry
            .entries()
            .into_iter()
            .map(|(_, entry)| entry.stream)
            .collect()
    };
    let aborted = close_all(
        live,
        || context.going_away.to_vec(),
        all_finished,
        spread,
        timeout,
        ABORT_GRACE,
    );
    if aborted > 0 {
        warn!(
            "{} did not close within {timeout:?}; dropped them",
            crate::count(aborted, "connection"),
        );
    }
}

/// What the metrics port reads from the running server at each request.
struct LiveView {
    registry: Registry,
    budget: Arc<crate::budget::Budget>,
}

impl crate::metrics::Live for LiveView {
    fn families(&self) -> Vec<prometheus::proto::MetricFamily> {
        use crate::metrics::family;
        let mut families = self.registry.traffic_families();
        families.push(family::gauge(
            "websocket_buffered_bytes",
            "Bytes held for incomplete messages and echoes being written, charged to the memory budget",
            &[(&[], self.budget.held() as f64)],
        ));
        families.push(family::gauge(
            "websocket_buffered_bytes_limit",
            "The memory budget for messages (--max-buffered-memory)",
            &[(&[], self.budget.limit() as f64)],
        ));
        families
    }

    fn connections_json(&self) -> String {
        self.registry.connections_json()
    }
}
