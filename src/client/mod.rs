//! The client: holds `--connections` WebSocket connections, each on its own named thread
//! (`client-N`), and closes them all with 1000 on shutdown.

mod backoff;
mod connection;
mod handshake;
mod idle;
mod load;
mod metrics;
mod proxy;
mod response;
mod stats;

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use log::{error, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::Role;

use crate::config::ClientConfig;
use crate::error::{Error, Result};
use crate::frame::close_frame;
use crate::shutdown::Shutdown;
use crate::stream::{close_all, SharedStream};
use crate::threads::{self, Helpers};
use connection::Dialer;
pub use idle::IdleLimit;
use load::LoadConfig;
use metrics::ClientEndpoint;
pub use stats::{ClientStats, Counter, Failure};

/// Stack of a connection thread: the handshake (URL and HTTP parsing) needs more than the
/// server's echo loop, still far below std's 2 MiB default.
pub const CONNECTION_STACK_SIZE: usize = 128 * 1024;
/// At shutdown, how long connections wait for the server's Close reply.
pub const CLOSE_TIMEOUT: Duration = Duration::from_millis(600);
/// After that, how long to wait for the threads of connections that were shut down.
const ABORT_GRACE: Duration = Duration::from_millis(200);

/// The connection each connection thread holds now: shutdown reaches its socket,
/// `/debug/connections` shows it.
type Slot = Mutex<Option<Live>>;

/// A connection as shutdown and `/debug/connections` see it.
#[derive(Clone)]
struct Live {
    stream: Arc<SharedStream>,
    activity: Arc<crate::activity::Activity>,
    url: String,
    thread: String,
    tid: Option<u32>,
}

fn lock(slot: &Slot) -> std::sync::MutexGuard<'_, Option<Live>> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A client not yet running, with the counters its connections will keep.
pub struct Client {
    config: Arc<ClientConfig>,
    dialer: Arc<Dialer>,
    stats: Arc<ClientStats>,
    metrics_listener: Option<TcpListener>,
}

impl Client {
    /// A client for `config`, with the proxy variables (`HTTPS_PROXY`, `NO_PROXY`, ...) of
    /// this process; fails when its TLS or token files do not load, a proxy variable
    /// cannot be used, or its flags do not fit together.
    pub fn new(config: ClientConfig) -> Result<Self> {
        let dialer = Dialer::new(&config, |name| std::env::var(name).ok()).map_err(Error::Setup)?;
        if dialer.insecure {
            warn!("--insecure: server certificates are not verified; connections are encrypted but not authenticated");
        }
        let metrics_listener = match config.metrics_port {
            Some(port) => {
                let addr = SocketAddr::new(config.metrics_host, port);
                Some(
                    crate::net::bind_listener(addr)
                        .map_err(|source| Error::Bind { addr, source })?,
                )
            }
            None => None,
        };
        Ok(Client {
            config: Arc::new(config),
            dialer: Arc::new(dialer),
            stats: Arc::default(),
            metrics_listener,
        })
    }

    /// The bound metrics address, with `--metrics-port`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
    }

    /// The counters, readable while [`run`](Self::run) goes on.
    pub fn stats(&self) -> Arc<ClientStats> {
        self.stats.clone()
    }

    /// Runs the connections until `shutdown` is requested (or `--duration` has passed);
    /// returns within about a second of it, after logging the final summary in load mode.
    pub fn run(self, shutdown: Shutdown) -> Result<()> {
        let metrics_addr = self.metrics_addr();
        let Client {
            config,
            dialer,
            stats,
            metrics_listener,
        } = self;
        if config.find_idle_timeout {
            return find_idle_timeout(&config, &dialer, &stats, &shutdown);
        }
        let load = LoadConfig::from_config(&config).is_some();
        let slots: Arc<[Slot]> = (0..config.connections).map(|_| Mutex::new(None)).collect();
        let endpoint = match metrics_listener {
            Some(listener) => {
                let endpoint = ClientEndpoint::start(listener, stats.clone(), slots.clone())?;
                if let Some(addr) = metrics_addr {
                    info!("Metrics on http://{addr}/metrics");
                }
                Some(endpoint)
            }
            None => None,
        };
        // The connection threads and the reporter stop on `stop`: a signal, or the end of
        // `--duration`.
        let mut helpers = Helpers::new();
        let stop = helpers.shutdown().clone();
        let (alive, all_finished) = crossbeam_channel::bounded::<()>(0);
        info!(
            "Starting {} to {}",
            crate::count(config.connections as usize, "connection"),
            dialer.target
        );
        if !dialer.route.why.is_empty() {
            info!("{}", dialer.route.why);
        }
        let mut connections = Vec::with_capacity(config.connections as usize);
        for index in 1..=config.connections {
            let (config, dialer, stop, slots, stats, alive) = (
                config.clone(),
                dialer.clone(),
                stop.clone(),
                slots.clone(),
                stats.clone(),
                alive.clone(),
            );
            let ramp_delay = config.ramp.map_or(Duration::ZERO, |per_second| {
                Duration::from_secs_f64(f64::from(index - 1) / f64::from(per_second))
            });
            let spawned = thread::Builder::new()
                .name(format!("client-{index}"))
                .stack_size(CONNECTION_STACK_SIZE)
                .spawn(move || {
                    let _alive = alive;
                    if !ramp_delay.is_zero() && stop.wait_timeout(ramp_delay) {
                        return;
                    }
                    let slot = &slots[index as usize - 1];
                    connection::run(index, &config, &dialer, &stop, slot, &stats);
                });
            match spawned {
                Ok(handle) => connections.push(handle),
                Err(error) => {
                    error!(
                        "Cannot start a thread for connection {index}: {error}; running {}",
                        crate::count(index as usize - 1, "connection")
                    );
                    break;
                }
            }
        }
        drop(alive);
        let started = stats.snapshot();
        if load {
            let (stats, stop, interval) = (stats.clone(), stop.clone(), config.report_interval);
            helpers.spawn("load-report", move || {
                let mut last = stats.snapshot();
                threads::every(interval, &stop, || {
                    let now = stats.snapshot();
                    info!("Summary: {}", now.report_since(&last));
                    last = now;
                });
            })?;
        }

        match config.duration {
            Some(duration) if !shutdown.wait_timeout(duration) => {
                info!("Ran for {duration:?}: stopping");
            }
            _ => shutdown.wait(),
        }
        helpers.trigger();
        if let Some(endpoint) = &endpoint {
            endpoint.set_not_ready();
        }
        info!("Shutting down: closing connections");
        let live = || {
            slots
                .iter()
                .filter_map(|slot| Some(lock(slot).as_ref()?.stream.clone()))
                .collect()
        };
        let frame = || close_frame(Role::Client, CloseCode::Normal, "client shutting down");
        let aborted = close_all(
            live,
            frame,
            &all_finished,
            Duration::ZERO,
            CLOSE_TIMEOUT,
            ABORT_GRACE,
        );
        if aborted > 0 {
            warn!(
                "{} got no Close reply within {CLOSE_TIMEOUT:?}; dropped them",
                crate::count(aborted, "connection")
            );
        }
        // Once `all_finished` has disconnected every thread is past its work and joins at
        // once; otherwise the threads still connecting (a connect or DNS lookup cannot be
        // interrupted) are left to end with the process.
        let all_done = matches!(
            all_finished.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        );
        let (joinable, unfinished): (Vec<_>, Vec<_>) = connections
            .into_iter()
            .partition(|t| all_done || t.is_finished());
        joinable.into_iter().for_each(threads::join);
        helpers.stop();
        if !unfinished.is_empty() {
            info!(
                "{} still connecting were abandoned",
                crate::count(unfinished.len(), "connection")
            );
        }
        if load {
            info!("Final summary: {}", stats.snapshot().report_since(&started));
        }
        info!("Client stopped");
        Ok(())
    }
}

/// `--find-idle-timeout`: the search runs on a thread of its own (`idle-finder`) while this
/// one waits for it or for shutdown, which cuts the trial under way short.
fn find_idle_timeout(
    config: &Arc<ClientConfig>,
    dialer: &Arc<Dialer>,
    stats: &Arc<ClientStats>,
    shutdown: &Shutdown,
) -> Result<()> {
    info!(
        "Searching the idle timeout of the path to {}",
        dialer.target
    );
    let current = Arc::new(Mutex::new(None));
    let mut helpers = Helpers::new();
    let stop = helpers.shutdown().clone();
    let (done, finished) = crossbeam_channel::bounded::<()>(1);
    helpers.spawn("idle-finder", {
        let (config, dialer, stats, current) = (
            config.clone(),
            dialer.clone(),
            stats.clone(),
            current.clone(),
        );
        move || {
            if let Some(limit) = idle::find(&config, &dialer, &stop, &current) {
                stats.set_idle_limit(limit);
            }
            let _ = done.send(());
        }
    })?;
    crossbeam_channel::select! {
        recv(finished) -> _ => {}
        recv(shutdown.receiver()) -> _ => {
            helpers.trigger();
            if let Some(stream) = current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
                stream.abort();
            }
        }
    }
    helpers.stop();
    info!("Client stopped");
    Ok(())
}

/// Runs a client for `config` until `shutdown` is requested: [`Client::new`] then
/// [`Client::run`].
pub fn run(config: ClientConfig, shutdown: Shutdown) -> Result<()> {
    Client::new(config)?.run(shutdown)
}
