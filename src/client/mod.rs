//! The client: holds `--connections` WebSocket connections, each on its own named thread
//! (`client-N`), and closes them all with 1000 on shutdown.

mod connection;
mod handshake;
pub mod load;

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use log::{error, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::Role;

use crate::config::ClientConfig;
use crate::error::Result;
use crate::shutdown::{self, Shutdown};
use crate::stream::{close_all, close_frame, SharedStream};
use load::LoadStats;

/// Stack of a connection thread: the handshake (URL and HTTP parsing) needs more than the
/// server's echo loop, still far below std's 2 MiB default.
pub const CONNECTION_STACK_SIZE: usize = 128 * 1024;
/// At shutdown, how long connections wait for the server's Close reply.
pub const CLOSE_TIMEOUT: Duration = Duration::from_millis(600);
/// After that, how long to wait for the threads of connections that were shut down.
const ABORT_GRACE: Duration = Duration::from_millis(200);

/// The socket each connection thread currently holds, so shutdown can reach it.
type Slot = Mutex<Option<Arc<SharedStream>>>;

/// Runs the connections until `shutdown` is requested (or `--duration` has passed); returns
/// within about a second of it, after logging the final summary.
pub fn run(config: ClientConfig, shutdown: Shutdown) -> Result<()> {
    let config = Arc::new(config);
    let slots: Arc<[Slot]> = (0..config.connections).map(|_| Mutex::new(None)).collect();
    let stats = Arc::new(LoadStats::default());
    // The connection threads stop on `stop`: a signal, or the end of `--duration`.
    let (stop_trigger, stop) = shutdown::channel();
    let (alive, all_finished) = crossbeam_channel::bounded::<()>(0);
    info!(
        "Starting {} connection(s) to {}",
        config.connections,
        config.url()
    );
    let mut threads = Vec::with_capacity(config.connections as usize);
    for index in 1..=config.connections {
        let (config, stop, slots, stats, alive) = (
            config.clone(),
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
                connection::run(index, &config, &stop, &slots[index as usize - 1], &stats);
            });
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(error) => {
                error!(
                    "Cannot start a thread for connection {index}: {error}; running {} connections",
                    index - 1
                );
                break;
            }
        }
    }
    drop(alive);
    let reporter = thread::Builder::new().name("load-report".into()).spawn({
        let (stats, stop, interval) = (stats.clone(), stop.clone(), config.report_interval);
        move || report(&stats, &stop, interval)
    })?;
    let started = stats.snapshot();

    match config.duration {
        Some(duration) if !shutdown.wait_timeout(duration) => {
            info!("Ran for {duration:?}: stopping")
        }
        _ => shutdown.wait(),
    }
    stop_trigger.trigger();
    info!("Shutting down: closing connections");
    let live = || {
        slots
            .iter()
            .filter_map(|slot| slot.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    };
    let frame = || close_frame(Role::Client, CloseCode::Normal, "client shutting down");
    let aborted = close_all(live, frame, &all_finished, CLOSE_TIMEOUT, ABORT_GRACE);
    if aborted > 0 {
        warn!("{aborted} connections got no Close reply within {CLOSE_TIMEOUT:?}; dropped them");
    }
    // Once `all_finished` has disconnected every thread is past its work and joins at
    // once; otherwise the threads still connecting (a connect or DNS lookup cannot be
    // interrupted) are left to end with the process.
    let all_done = matches!(
        all_finished.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    );
    let (joinable, unfinished): (Vec<_>, Vec<_>) = threads
        .into_iter()
        .partition(|t| all_done || t.is_finished());
    for handle in joinable.into_iter().chain(std::iter::once(reporter)) {
        if let Err(panic) = handle.join() {
            std::panic::resume_unwind(panic);
        }
    }
    if !unfinished.is_empty() {
        info!(
            "{} connection(s) still connecting were abandoned",
            unfinished.len()
        );
    }
    info!("Final summary: {}", stats.snapshot().report_since(&started));
    info!("Client stopped");
    Ok(())
}

/// Logs a summary of the last period every `interval`.
fn report(stats: &LoadStats, stop: &Shutdown, interval: Duration) {
    let ticks = crossbeam_channel::tick(interval);
    let mut last = stats.snapshot();
    loop {
        crossbeam_channel::select! {
            recv(ticks) -> _ => {
                let now = stats.snapshot();
                info!("Summary: {}", now.report_since(&last));
                last = now;
            }
            recv(stop.receiver()) -> _ => return,
        }
    }
}
