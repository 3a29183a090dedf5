//! `--find-idle-timeout`: how long a path lets a silent connection live. Each trial opens a
//! connection, sends nothing for a while, then pings: a pong means the path kept it. The
//! silence doubles until a trial dies, then bisects between the longest silence survived
//! and the shortest one that killed, down to `--find-idle-precision`. A middlebox that
//! closes the connection (nginx, HAProxy) says exactly when; one that forgets it silently
//! (NAT, a stateful firewall) is found by the ping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{info, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::Role;
use tungstenite::{Error as WsError, Message};

use super::connection::{Connected, Dialer};
use crate::activity::Seconds;
use crate::config::ClientConfig;
use crate::frame::close_frame;
use crate::net;
use crate::shutdown::Shutdown;
use crate::stream::SharedStream;

/// What the search found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleLimit {
    /// The longest silence a connection survived (zero if none did).
    pub survived: Duration,
    /// The shortest silence after which a connection was gone; `None` if every trial up to
    /// `--find-idle-max` survived.
    pub died: Option<Duration>,
}

/// How one trial ended.
enum Trial {
    /// The connection answered a ping after the silence.
    Survived,
    /// The connection was gone after this much silence.
    Died(Duration),
    /// Shutdown was requested.
    Stopped,
}

/// Runs the search until it is done or `shutdown` is requested; `current` holds the socket
/// of the trial under way, so shutdown can cut it short. Returns the limit found.
pub(super) fn find(
    config: &ClientConfig,
    dialer: &Dialer,
    shutdown: &Shutdown,
    current: &Mutex<Option<std::sync::Arc<SharedStream>>>,
) -> Option<IdleLimit> {
    let precision = config.find_idle_precision;
    let mut limit = IdleLimit {
        survived: Duration::ZERO,
        died: None,
    };
    let mut silence = config.find_idle_start;
    let mut failed_connects = 0;
    loop {
        if let Some(died) = limit.died {
            if died.saturating_sub(limit.survived) <= precision {
                break;
            }
            silence = limit.survived + (died - limit.survived) / 2;
        } else if silence > config.find_idle_max {
            break;
        }
        info!(
            "Idle timeout search: holding a connection silent for {}",
            Seconds(silence)
        );
        let trial = match trial(config, dialer, shutdown, current, silence) {
            Ok(trial) => trial,
            Err(error) => {
                failed_connects += 1;
                warn!("Idle timeout search: connection failed: {error}");
                if failed_connects >= 5 || shutdown.wait_timeout(config.reconnect_delay) {
                    return None;
                }
                continue;
            }
        };
        failed_connects = 0;
        match trial {
            Trial::Survived => {
                info!(
                    "Idle timeout search: survived {} of silence",
                    Seconds(silence)
                );
                limit.survived = silence;
                if limit.died.is_none() {
                    silence *= 2;
                }
            }
            Trial::Died(after) => {
                info!(
                    "Idle timeout search: gone after {} of silence",
                    Seconds(after)
                );
                // A cut can only come after the longest silence survived so far.
                let after = after.max(limit.survived);
                limit.died = Some(limit.died.map_or(after, |died| died.min(after)));
            }
            Trial::Stopped => return None,
        }
    }
    match limit.died {
        Some(died) => info!(
            "Idle timeout: a silent connection survives {} and is gone after {} (precision {})",
            Seconds(limit.survived),
            Seconds(died),
            Seconds(precision)
        ),
        None => info!(
            "Idle timeout: none found; a silent connection survived {} (--find-idle-max)",
            Seconds(limit.survived)
        ),
    }
    Some(limit)
}

/// One connection held silent for `silence`, then pinged.
fn trial(
    config: &ClientConfig,
    dialer: &Dialer,
    shutdown: &Shutdown,
    current: &Mutex<Option<std::sync::Arc<SharedStream>>>,
    silence: Duration,
) -> Result<Trial, String> {
    let Connected {
        mut socket, stream, ..
    } = dialer
        .connect(config, 1)
        .map_err(|error| error.to_string())?;
    *lock(current) = Some(stream.clone());
    if shutdown.is_requested() {
        return Ok(Trial::Stopped);
    }
    let opened = Instant::now();
    let deadline = opened + silence;
    // Silent on our side: read (tungstenite answers a server ping, but we send nothing)
    // until the silence is over or the connection is gone.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream
            .tcp()
            .set_read_timeout(Some(left))
            .map_err(|error| error.to_string())?;
        match socket.read() {
            Ok(_) => {}
            Err(WsError::Io(error)) if net::is_timeout(&error) => {}
            Err(_) if shutdown.is_requested() => return Ok(Trial::Stopped),
            Err(_) => return Ok(Trial::Died(opened.elapsed())),
        }
    }
    // Then a ping: a pong within the pong timeout means the path kept the connection.
    let probe = Message::Ping(b"idle?".to_vec().into());
    if socket.send(probe).is_err() {
        return Ok(Trial::Died(silence));
    }
    let pong_deadline = Instant::now() + config.pong_timeout;
    let outcome = loop {
        let left = pong_deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Trial::Died(silence);
        }
        let _ = stream.tcp().set_read_timeout(Some(left));
        match socket.read() {
            Ok(Message::Pong(_)) => break Trial::Survived,
            Ok(_) => {}
            Err(WsError::Io(error)) if net::is_timeout(&error) => {}
            Err(_) if shutdown.is_requested() => break Trial::Stopped,
            Err(_) => break Trial::Died(silence),
        }
    };
    let _ = stream.send_close(&close_frame(Role::Client, CloseCode::Normal, "trial over"));
    stream.close_gracefully(Duration::from_secs(1));
    *lock(current) = None;
    Ok(outcome)
}

fn lock(
    current: &Mutex<Option<std::sync::Arc<SharedStream>>>,
) -> std::sync::MutexGuard<'_, Option<std::sync::Arc<SharedStream>>> {
    current
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
