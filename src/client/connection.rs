//! One client connection: connect, hold it with pings timed by socket read timeouts,
//! report it, and reconnect after any loss.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig};
use tungstenite::{Error as WsError, Message};

use super::handshake;
use super::load::{Counter, Generator, LoadConfig, LoadStats};
use super::{Slot, CLOSE_TIMEOUT};
use crate::config::ClientConfig;
use crate::net;
use crate::shutdown::Shutdown;
use crate::stream::{close_frame, describe_close, SharedStream, WsStream};

/// Read chunk of a connection that only pings (small, as thousands may be held).
const READ_BUFFER_SIZE: usize = 1024;
/// Read chunk in load mode, where fewer reads per large echo matter more than memory.
const LOAD_READ_BUFFER_SIZE: usize = 64 * 1024;

/// Connects and reconnects until shutdown.
pub fn run(index: u32, config: &ClientConfig, shutdown: &Shutdown, slot: &Slot, stats: &LoadStats) {
    let url = config.url();
    loop {
        let outcome = match connect(config) {
            Ok((mut socket, stream)) => {
                stats.add(Counter::Connects, 1);
                stats.connections_up.fetch_add(1, Ordering::Relaxed);
                info!("[Connection {index}] Connected to {url}");
                set_slot(slot, Some(stream.clone()));
                let session = Session {
                    index,
                    url: &url,
                    config,
                    shutdown,
                    stream: &stream,
                    stats,
                };
                let outcome = session.hold(&mut socket);
                set_slot(slot, None);
                stats.connections_up.fetch_sub(1, Ordering::Relaxed);
                outcome
            }
            Err(error) => {
                stats.add(Counter::ConnectFailures, 1);
                Outcome::Failed(error)
            }
        };
        match outcome {
            Outcome::Shutdown => return,
            Outcome::Finished => {
                debug!("[Connection {index}] Sent all its messages; connecting again");
                continue;
            }
            Outcome::Lost(reason) => {
                stats.add(Counter::Losses, 1);
                warn!("[Connection {index}] Connection lost: {reason}");
            }
            Outcome::Failed(error) => warn!("[Connection {index}] Connection failed: {error}"),
        }
        if shutdown.is_requested() {
            return;
        }
        info!(
            "[Connection {index}] Reconnecting in {:?}",
            config.reconnect_delay
        );
        if shutdown.wait_timeout(config.reconnect_delay) {
            return;
        }
    }
}

fn set_slot(slot: &Slot, stream: Option<Arc<SharedStream>>) {
    *slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = stream;
}

/// TCP connect plus WebSocket handshake, both within the connect timeout.
fn connect(config: &ClientConfig) -> Result<(WebSocket<WsStream>, Arc<SharedStream>), String> {
    let deadline = Instant::now() + config.connect_timeout;
    let host = config.host.trim_start_matches('[').trim_end_matches(']');
    let addrs = (host, config.port)
        .to_socket_addrs()
        .map_err(|error| format!("cannot resolve {}: {error}", config.host))?;
    let mut last_error = format!("{} resolved to no address", config.host);
    let mut connected = None;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            last_error = format!("connect timed out after {:?}", config.connect_timeout);
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(tcp) => {
                connected = Some(tcp);
                break;
            }
            Err(error) => last_error = format!("{addr}: {error}"),
        }
    }
    let tcp = connected.ok_or(last_error)?;
    tcp.set_nodelay(true).map_err(|error| error.to_string())?;
    let leftover = handshake::upgrade(&tcp, &config.host_port(), &config.path, deadline)?;
    let stream = SharedStream::new(tcp);
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(if LoadConfig::from_config(config).is_some() {
            LOAD_READ_BUFFER_SIZE
        } else {
            READ_BUFFER_SIZE
        })
        .write_buffer_size(0);
    let socket = WebSocket::from_partially_read(
        WsStream::new(stream.clone()),
        leftover,
        Role::Client,
        Some(ws_config),
    );
    // From here on, reads time the pings. A write that makes no progress for as long as a
    // pong may take means the server stopped reading: the connection is as dead as one
    // that stopped answering pings.
    stream
        .tcp()
        .set_write_timeout(Some(config.pong_timeout))
        .map_err(|error| error.to_string())?;
    Ok((socket, stream))
}

/// How a connection attempt or session ended.
enum Outcome {
    /// Shutdown was requested and the connection is closed.
    Shutdown,
    /// Load mode: the connection sent its messages and closed normally.
    Finished,
    /// The connection was lost, for this reason.
    Lost(String),
    /// The connection could not be made.
    Failed(String),
}

/// One established connection and what it needs while it lasts.
struct Session<'a> {
    index: u32,
    url: &'a str,
    config: &'a ClientConfig,
    shutdown: &'a Shutdown,
    stream: &'a SharedStream,
    stats: &'a LoadStats,
}

impl Session<'_> {
    /// Keeps the connection: pings every interval, expects a pong within the pong timeout,
    /// logs its status, sends load messages, and notices a close or error. Returns when the
    /// connection is gone.
    fn hold(&self, socket: &mut WebSocket<WsStream>) -> Outcome {
        let (config, index) = (self.config, self.index);
        let start = Instant::now();
        let mut next_ping = start + config.ping_interval;
        let mut next_status = start + config.status_interval;
        let mut pong_due: Option<Instant> = None;
        let mut pings_sent: u64 = 0;
        let mut load = LoadConfig::from_config(config).map(|load| Generator::new(load, index));
        let mut next_send = load.as_ref().map(|_| start);
        // Set once a close handshake is under way: by us (shutdown, or load finished) or by
        // the server.
        let mut closing: Option<Instant> = None;
        let mut finished = false;
        let mut server_close: Option<Option<CloseFrame>> = None;
        let mut read_timeout: Option<Duration> = None;

        let outcome = loop {
            let now = Instant::now();
            if self.shutdown.is_requested() && closing.is_none() {
                let frame = close_frame(Role::Client, CloseCode::Normal, "client shutting down");
                let _ = self.stream.send_close(&frame);
                closing = Some(now + CLOSE_TIMEOUT);
            }
            match closing {
                Some(deadline) if now >= deadline => {
                    break match server_close {
                        _ if self.shutdown.is_requested() => Outcome::Shutdown,
                        Some(_) if finished => Outcome::Finished,
                        Some(_) => self.lost(&server_close, None),
                        None => self.lost(&server_close, Some("close handshake timed out".into())),
                    }
                }
                Some(_) => {}
                None => {
                    if pong_due.is_some_and(|due| now >= due) {
                        break Outcome::Lost(format!("no pong within {:?}", config.pong_timeout));
                    }
                    if now >= next_ping {
                        pings_sent += 1;
                        let ping = Message::Ping(pings_sent.to_be_bytes().to_vec().into());
                        if let Err(error) = socket.send(ping) {
                            break self.lost(&server_close, Some(format!("ping failed: {error}")));
                        }
                        pong_due.get_or_insert(now + config.pong_timeout);
                        next_ping = now + config.ping_interval;
                    }
                    if now >= next_status {
                        info!(
                            "[Connection {index}] Connection status: CONNECTED to {}",
                            self.url
                        );
                        next_status = now + config.status_interval;
                    }
                    if let Some(generator) = &mut load {
                        if generator.finished() {
                            finished = true;
                            next_send = None;
                            let frame = close_frame(Role::Client, CloseCode::Normal, "done");
                            let _ = self.stream.send_close(&frame);
                            closing = Some(now + CLOSE_TIMEOUT);
                        } else if let Some(due) = next_send.filter(|due| now >= *due) {
                            if let Err(error) =
                                socket.send(Message::Binary(generator.next_message()))
                            {
                                break self
                                    .lost(&server_close, Some(format!("send failed: {error}")));
                            }
                            // Keep the rate, but never try to catch up with a burst.
                            next_send = generator.next_send(due).map(|next| next.max(now));
                        }
                        generator.flush(self.stats, false);
                    }
                }
            }

            let wake = [
                Some(next_ping),
                Some(next_status),
                pong_due,
                closing,
                next_send,
            ]
            .into_iter()
            .flatten()
            .min();
            let wanted = wake.map_or(config.ping_interval, |at| {
                at.saturating_duration_since(Instant::now())
            });
            let wanted = wanted.max(Duration::from_millis(1));
            // A timeout longer than needed would oversleep a deadline; a shorter one only
            // wakes the loop early. Skip the system call when the current one is close enough.
            if read_timeout.is_none_or(|current| wanted < current || wanted > current * 2) {
                if let Err(error) = self.stream.tcp().set_read_timeout(Some(wanted)) {
                    break self.lost(&server_close, Some(error.to_string()));
                }
                read_timeout = Some(wanted);
            }
            match socket.read() {
                Ok(Message::Binary(echo)) => {
                    if let Some(generator) = &mut load {
                        generator.on_echo(&echo);
                        if next_send.is_none() && !finished {
                            next_send = generator.next_send(Instant::now());
                        }
                    }
                }
                Ok(Message::Pong(_)) => {
                    if pong_due.take().is_some() {
                        debug!("[Connection {index}] pong");
                    }
                }
                Ok(Message::Close(frame)) => {
                    debug!(
                        "[Connection {index}] server sent close: {}",
                        describe_close(&frame)
                    );
                    server_close = Some(frame);
                    closing.get_or_insert(Instant::now() + CLOSE_TIMEOUT);
                }
                Ok(_) => {}
                Err(WsError::Io(error)) if net::is_timeout(&error) => {}
                Err(_) if self.shutdown.is_requested() => break Outcome::Shutdown,
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) if finished => {
                    break Outcome::Finished
                }
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                    break self.lost(&server_close, None)
                }
                Err(error) => break self.lost(&server_close, Some(describe_error(&error))),
            }
        };
        if let Some(generator) = &mut load {
            generator.end(
                self.stats,
                matches!(outcome, Outcome::Shutdown | Outcome::Finished),
            );
        }
        outcome
    }

    fn lost(&self, server_close: &Option<Option<CloseFrame>>, error: Option<String>) -> Outcome {
        if self.shutdown.is_requested() {
            // Our own shutdown broke the connection (a send cut off by the abort, say).
            return Outcome::Shutdown;
        }
        match server_close {
            Some(frame) => Outcome::Lost(format!(
                "server closed the connection: {}",
                describe_close(frame)
            )),
            None => Outcome::Lost(error.unwrap_or_else(|| "connection closed".into())),
        }
    }
}

fn describe_error(error: &WsError) -> String {
    match error {
        WsError::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => {
            "connection closed without a close frame".into()
        }
        other => other.to_string(),
    }
}
