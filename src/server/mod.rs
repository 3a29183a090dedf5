//! The echo server: a blocking accept loop that gives every socket its own named thread.
//!
//! Threads: `acceptor` (accept loop), `conn-N` (one per connection: handshake, then echo),
//! `reporter` (logs the connection count), `metrics-http` (Prometheus endpoint), and the
//! caller's thread, which waits for shutdown and then drains the connections.

mod acceptor;
pub mod capacity;
mod connection;
pub mod handshake;
mod registry;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::select;
use log::{debug, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::config::ServerConfig;
use crate::error::{Error, Result};
use crate::metrics::{Metrics, MetricsServer};
use crate::net;
use crate::shutdown::{self, Shutdown};
use crate::stream::{close_all, close_frame};
use capacity::Capacity;
use connection::{Context, Keepalive};
use registry::Registry;

pub use acceptor::CONNECTION_STACK_SIZE;
/// tungstenite's read chunk per connection (its default, 128 KiB, would be resident per
/// connection as soon as it first reads).
pub const READ_BUFFER_SIZE: usize = 1024;
/// After the shutdown timeout, how long to wait for the aborted connections' threads.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// A bound, not yet running server.
pub struct Server {
    config: ServerConfig,
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics_listener: TcpListener,
    metrics_addr: SocketAddr,
    metrics: Metrics,
}

impl Server {
    /// Binds the WebSocket and metrics ports.
    pub fn bind(config: ServerConfig) -> Result<Self> {
        let bind = |port| {
            let addr = SocketAddr::new(config.host, port);
            net::bind_listener(addr).map_err(|source| Error::Bind { addr, source })
        };
        let listener = bind(config.port)?;
        let metrics_listener = bind(config.metrics_port)?;
        Ok(Server {
            local_addr: listener.local_addr()?,
            metrics_addr: metrics_listener.local_addr()?,
            listener,
            metrics_listener,
            metrics: Metrics::new(),
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

    /// Serves until `shutdown` is requested, then closes every connection with 1001 and
    /// waits up to the shutdown timeout for them to finish.
    pub fn run(self, shutdown: Shutdown) -> Result<()> {
        let Server {
            config,
            listener,
            local_addr,
            metrics_listener,
            metrics_addr,
            metrics,
        } = self;
        let registry = Registry::new(
            metrics.connections.clone(),
            metrics.connections_total.clone(),
        );
        let metrics_server = MetricsServer::start(metrics_listener, metrics.clone())?;
        // Connections and the acceptor stop on `closing`, which follows `shutdown` after
        // the drain delay.
        let (close_connections, closing) = shutdown::channel();
        let context = Arc::new(Context {
            ws_path: config.path.clone(),
            handshake_timeout: config.handshake_timeout,
            write_timeout: config.write_timeout,
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
        });
        let capacity = Capacity::detect(
            config
                .max_connections
                .map(|max| max.min(usize::MAX as u64) as usize),
        );
        info!("Connection ceiling: {capacity}");

        // Every connection thread holds a clone of `alive`; the channel disconnects when
        // the last one has finished.
        let (alive, all_finished) = crossbeam_channel::bounded::<()>(0);
        // The reporter stops with the connections; if a thread cannot start, whatever did
        // start is stopped before the error is returned.
        let reporter = match spawn("reporter", {
            let (registry, closing, interval) =
                (registry.clone(), closing.clone(), config.log_interval);
            move || report(&registry, &closing, interval)
        }) {
            Ok(reporter) => reporter,
            Err(error) => {
                metrics_server.stop();
                return Err(error.into());
            }
        };
        let acceptor = match spawn("acceptor", {
            let context = context.clone();
            move || acceptor::accept_loop(&listener, &context, capacity.ceiling, alive)
        }) {
            Ok(acceptor) => acceptor,
            Err(error) => {
                close_connections.trigger();
                join(reporter);
                metrics_server.stop();
                return Err(error.into());
            }
        };
        info!("Listening on ws://{local_addr}{}", config.path);
        info!("Metrics on http://{metrics_addr}/metrics");

        shutdown.wait();
        metrics_server.set_not_ready();
        if !config.drain_delay.is_zero() {
            info!(
                "Draining: /readyz answers 503; closing connections in {:?}",
                config.drain_delay
            );
            let _ = crossbeam_channel::after(config.drain_delay).recv();
        }
        close_connections.trigger();
        let entries = registry.entries();
        info!("Shutting down: closing {} connections", entries.len());
        for (id, entry) in &entries {
            debug!(
                "closing conn-{id} {} (up {:.1}s)",
                entry.peer,
                entry.connected_at.elapsed().as_secs_f64()
            );
        }
        drop(entries); // holding their streams would keep finished connections' sockets open
                       // A wake-up connect can fail (a firewall, a full backlog): retry until the acceptor sees it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !acceptor.is_finished() && std::time::Instant::now() < deadline {
            net::wake_acceptor(local_addr);
            let _ = crossbeam_channel::after(Duration::from_millis(20)).recv();
        }
        join(acceptor);
        let cut_short = registry.abort_handshakes();
        if cut_short > 0 {
            info!("Closed {cut_short} sockets that had not finished their upgrade request");
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
            &all_finished,
            config.shutdown_timeout,
            ABORT_GRACE,
        );
        if aborted > 0 {
            warn!(
                "{aborted} connections did not close within {:?}; dropped them",
                config.shutdown_timeout
            );
        }
        join(reporter);
        metrics_server.stop();
        info!("Server stopped");
        Ok(())
    }
}

fn report(registry: &Registry, shutdown: &Shutdown, interval: Duration) {
    let ticks = crossbeam_channel::tick(interval);
    loop {
        select! {
            recv(ticks) -> _ => info!("Active connections: {}", registry.len()),
            recv(shutdown.receiver()) -> _ => return,
        }
    }
}

fn spawn(name: &str, work: impl FnOnce() + Send + 'static) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new().name(name.into()).spawn(work)
}

/// Joins a worker, re-raising its panic.
pub(crate) fn join(handle: JoinHandle<()>) {
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}
