//! One client connection: connect, hold it with pings timed by socket read timeouts,
//! report it, and reconnect after any loss.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig};
use tungstenite::{Error as WsError, Message};

use super::{Slot, CLOSE_TIMEOUT};
use crate::config::ClientConfig;
use crate::net;
use crate::shutdown::Shutdown;
use crate::stream::{close_frame, SharedStream, WsStream};

/// Read chunk of a client connection; its traffic is pings and pongs.
const READ_BUFFER_SIZE: usize = 4096;

/// Connects and reconnects until shutdown.
pub fn run(index: u32, config: &ClientConfig, shutdown: &Shutdown, slot: &Slot) {
    let url = config.url();
    loop {
        match connect(config, &url) {
            Ok((mut socket, stream)) => {
                info!("[Connection {index}] Connected to {url}");
                set_slot(slot, Some(stream.clone()));
                let outcome = hold(index, &url, &mut socket, &stream, config, shutdown);
                set_slot(slot, None);
                match outcome {
                    Outcome::Shutdown => return,
                    Outcome::Lost(reason) => {
                        warn!("[Connection {index}] Connection lost: {reason}")
                    }
                }
            }
            Err(error) => warn!("[Connection {index}] Connection failed: {error}"),
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
fn connect(
    config: &ClientConfig,
    url: &str,
) -> Result<(WebSocket<WsStream>, Arc<SharedStream>), String> {
    let deadline = Instant::now() + config.connect_timeout;
    let addrs = (config.host.as_str(), config.port)
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
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let setup = |tcp: &TcpStream| -> std::io::Result<()> {
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(left))?;
        tcp.set_write_timeout(Some(left))
    };
    setup(&tcp).map_err(|error| error.to_string())?;

    let stream = SharedStream::new(tcp);
    let request = url
        .into_client_request()
        .map_err(|error| format!("invalid URL {url}: {error}"))?;
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_SIZE)
        .write_buffer_size(0);
    let socket = match tungstenite::client::client_with_config(
        request,
        WsStream(stream.clone()),
        Some(ws_config),
    ) {
        Ok((socket, _response)) => socket,
        Err(HandshakeError::Interrupted(_)) => {
            return Err(format!(
                "handshake timed out after {:?}",
                config.connect_timeout
            ))
        }
        Err(HandshakeError::Failure(error)) => return Err(format!("handshake failed: {error}")),
    };
    // From here on, reads time the pings; writes are small and wait as long as TCP does.
    stream
        .tcp()
        .set_write_timeout(None)
        .map_err(|error| error.to_string())?;
    Ok((socket, stream))
}

/// How holding a connection ended.
enum Outcome {
    /// Shutdown was requested and the connection is closed.
    Shutdown,
    /// The connection was lost, for this reason.
    Lost(String),
}

/// Keeps the connection: pings every interval, expects a pong within the pong timeout, logs
/// its status, and notices a close or error. Returns when the connection is gone.
fn hold(
    index: u32,
    url: &str,
    socket: &mut WebSocket<WsStream>,
    stream: &SharedStream,
    config: &ClientConfig,
    shutdown: &Shutdown,
) -> Outcome {
    let start = Instant::now();
    let mut next_ping = start + config.ping_interval;
    let mut next_status = start + config.status_interval;
    let mut pong_due: Option<Instant> = None;
    let mut pings_sent: u64 = 0;
    // Set once a close handshake is under way: by us at shutdown, or by the server.
    let mut closing: Option<Instant> = None;
    let mut server_close: Option<Option<CloseFrame>> = None;
    let lost = |server_close: &Option<Option<CloseFrame>>, error: Option<String>| match server_close
    {
        Some(frame) => Outcome::Lost(format!(
            "server closed the connection: {}",
            describe_close(frame)
        )),
        None => Outcome::Lost(error.unwrap_or_else(|| "connection closed".into())),
    };

    loop {
        let now = Instant::now();
        if shutdown.is_requested() && closing.is_none() {
            let _ = stream.send_close(&close_frame(
                Role::Client,
                CloseCode::Normal,
                "client shutting down",
            ));
            closing = Some(now + CLOSE_TIMEOUT);
        }
        match closing {
            Some(deadline) if now >= deadline => {
                return match server_close {
                    Some(_) if !shutdown.is_requested() => lost(&server_close, None),
                    _ if shutdown.is_requested() => Outcome::Shutdown,
                    _ => lost(&server_close, Some("close handshake timed out".into())),
                }
            }
            Some(_) => {}
            None => {
                if pong_due.is_some_and(|due| now >= due) {
                    return Outcome::Lost(format!("no pong within {:?}", config.pong_timeout));
                }
                if now >= next_ping {
                    pings_sent += 1;
                    if let Err(error) =
                        socket.send(Message::Ping(pings_sent.to_be_bytes().to_vec().into()))
                    {
                        return lost(&server_close, Some(format!("ping failed: {error}")));
                    }
                    pong_due.get_or_insert(now + config.pong_timeout);
                    next_ping = now + config.ping_interval;
                }
                if now >= next_status {
                    info!("[Connection {index}] Connection status: CONNECTED to {url}");
                    next_status = now + config.status_interval;
                }
            }
        }

        let wake = [Some(next_ping), Some(next_status), pong_due, closing]
            .into_iter()
            .flatten()
            .min();
        let timeout = wake.map_or(config.ping_interval, |at| {
            at.saturating_duration_since(Instant::now())
        });
        if let Err(error) = stream
            .tcp()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        {
            return lost(&server_close, Some(error.to_string()));
        }
        match socket.read() {
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
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) if shutdown.is_requested() => {
                return Outcome::Shutdown
            }
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                return lost(&server_close, None)
            }
            Err(_) if shutdown.is_requested() => return Outcome::Shutdown,
            Err(error) => return lost(&server_close, Some(describe_error(&error))),
        }
    }
}

fn describe_close(frame: &Option<CloseFrame>) -> String {
    match frame {
        Some(frame) if frame.reason.is_empty() => format!("close {}", u16::from(frame.code)),
        Some(frame) => format!(
            "close {} {:?}",
            u16::from(frame.code),
            frame.reason.as_str()
        ),
        None => "close without status code".into(),
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
