//! The echo server: a blocking accept loop that gives every socket its own named thread.
//!
//! Threads: `acceptor` (accept loop), `conn-N` (one per connection: handshake, then echo),
//! `reporter` (logs the connection count), `metrics-http` (Prometheus endpoint), and the
//! caller's thread, which waits for shutdown and then drains the connections.

mod connection;
pub mod handshake;
mod registry;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{select, Sender};
use log::{debug, error, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::config::ServerConfig;
use crate::error::{Error, Result};
use crate::metrics::{Metrics, MetricsServer};
use crate::net;
use crate::shutdown::Shutdown;
use crate::stream::{close_all, close_frame};
use connection::Context;
use registry::Registry;

/// Stack of a connection thread. The echo loop needs little stack, and a small one keeps
/// thousands of threads cheap; the kernel maps only the pages a thread touches.
pub const CONNECTION_STACK_SIZE: usize = 64 * 1024;
/// tungstenite's read chunk per connection (its default, 128 KiB, would be resident per
/// connection as soon as it first reads).
pub const READ_BUFFER_SIZE: usize = 4096;
/// Backoff bounds after a failed `accept` (EMFILE and friends repeat until a socket closes).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
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
            shutdown: shutdown.clone(),
            going_away: close_frame(Role::Server, CloseCode::Away, "server shutting down").into(),
        });

        // Every connection thread holds a clone of `alive`; the channel disconnects when
        // the last one has finished.
        let (alive, all_finished) = crossbeam_channel::bounded::<()>(0);
        let acceptor = spawn("acceptor", {
            let context = context.clone();
            move || accept_loop(&listener, &context, alive)
        })?;
        let reporter = spawn("reporter", {
            let (registry, shutdown, interval) =
                (registry.clone(), shutdown.clone(), config.log_interval);
            move || report(&registry, &shutdown, interval)
        })?;
        info!("Listening on ws://{local_addr}{}", config.path);
        info!("Metrics on http://{metrics_addr}/metrics");

        shutdown.wait();
        let entries = registry.entries();
        info!("Shutting down: closing {} connections", entries.len());
        for (id, entry) in &entries {
            debug!(
                "closing conn-{id} {} (up {:.1}s)",
                entry.peer,
                entry.connected_at.elapsed().as_secs_f64()
            );
        }
        metrics_server.set_not_ready();
        net::wake_acceptor(local_addr);
        join(acceptor);
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

fn accept_loop(listener: &TcpListener, context: &Arc<Context>, alive: Sender<()>) {
    let mut next_id: u64 = 0;
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        match listener.accept() {
            Ok((tcp, peer)) => {
                if context.shutdown.is_requested() {
                    return;
                }
                backoff = ACCEPT_BACKOFF.0;
                next_id += 1;
                let id = next_id;
                let (context, alive) = (context.clone(), alive.clone());
                let spawned = thread::Builder::new()
                    .name(format!("conn-{id}"))
                    .stack_size(CONNECTION_STACK_SIZE)
                    .spawn(move || {
                        let _alive = alive;
                        connection::run(id, tcp, peer, &context);
                    });
                if let Err(error) = spawned {
                    warn!("Cannot start a thread for {peer}: {error}; connection refused");
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionAborted => {}
            Err(error) => {
                error!("accept failed: {error}; retrying in {backoff:?}");
                if context.shutdown.wait_timeout(backoff) {
                    return;
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
            }
        }
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
fn join(handle: JoinHandle<()>) {
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}
