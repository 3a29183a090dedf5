//! One client connection: connect, hold it with pings timed by socket read timeouts,
//! report it, and reconnect after any loss.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig};
use tungstenite::{Error as WsError, Message};

use super::backoff::{unit_random, Backoff};
use super::handshake::{self, Request};
use super::load::{Generator, LoadConfig};
use super::proxy::{self, Route};
use super::stats::{ClientStats, Counter, Failure};
use super::{Live, Slot, CLOSE_TIMEOUT};
use crate::activity::{Activity, Seconds};
use crate::config::{read_token_file, ClientConfig, Keepalive, Secret, Target};
use crate::ending::{describe_close, Ending, Reason};
use crate::frame::close_frame;
use crate::net;
use crate::shutdown::Shutdown;
use crate::stream::{SharedStream, WsStream};
use crate::tls::{ClientTls, ClientTlsOptions};

/// Read chunk of a connection that only pings (small, as thousands may be held).
const READ_BUFFER_SIZE: usize = 1024;
/// Read chunk in load mode: a large echo comes through the stream's read-ahead in two or
/// three system calls anyway; 16 KiB takes it in four copies rather than 64, and costs a
/// reconnect (which zeroes it on the first read) a quarter of what 64 KiB did.
const LOAD_READ_BUFFER_SIZE: usize = 16 * 1024;

/// Connects and reconnects until shutdown, waiting as [`Backoff`] says between attempts.
pub(super) fn run(
    index: u32,
    config: &ClientConfig,
    dialer: &Dialer,
    shutdown: &Shutdown,
    slot: &Slot,
    stats: &ClientStats,
) {
    let mut backoff = Backoff::new(
        config.reconnect_delay,
        config.reconnect_max_delay,
        config.reconnect_jitter,
    );
    // Since when the connection has been down, and how many attempts failed since.
    let mut outage: Option<(Instant, u32)> = None;
    // The thread is the connection's for all its reconnects: named and counted once.
    let (thread, tid) = (format!("client-{index}"), crate::debug::thread_id());
    loop {
        let mut retry_after = None;
        let outcome = match dialer.connect(config, index) {
            Ok(Connected {
                mut socket,
                stream,
                protocol,
                backend,
            }) => {
                stats.connection_opened();
                let url = dialer.describe(protocol.as_deref());
                // The log lines name the backend too; /debug/connections has the URL alone.
                let shown = match &backend {
                    Some(backend) => format!("{url} (backend {backend})"),
                    None => url.clone(),
                };
                let _on_backend = stats.on_backend(backend.as_deref().unwrap_or("unknown"));
                match outage.take() {
                    Some((since, attempts)) => {
                        stats.add(Counter::Reconnects, 1);
                        let failed = match attempts {
                            0 => String::new(),
                            n => format!(", {} failed", crate::count(n as usize, "attempt")),
                        };
                        info!(
                            "[Connection {index}] Connected to {shown} after {} down{failed}",
                            Seconds(since.elapsed()),
                        );
                    }
                    None => info!("[Connection {index}] Connected to {shown}"),
                }
                if dialer.insecure {
                    warn!("[Connection {index}] The server's certificate was not verified (--insecure)");
                }
                let activity = Arc::new(Activity::new());
                set_slot(
                    slot,
                    Some(Live {
                        stream: stream.clone(),
                        activity: activity.clone(),
                        url: url.clone(),
                        thread: thread.clone(),
                        tid,
                    }),
                );
                let outcome =
                    Session::new(index, &shown, config, shutdown, &stream, stats, &activity)
                        .hold(&mut socket);
                set_slot(slot, None);
                stats.connection_ended(
                    outcome.reason(),
                    outcome.code(),
                    activity.opened().elapsed(),
                );
                backoff.connected_for(activity.opened().elapsed());
                if let Outcome::Lost(ending) = &outcome {
                    stats.add(Counter::Losses, 1);
                    warn!(
                        "[Connection {index}] Connection lost: {}",
                        ending.describe(&activity.snapshot())
                    );
                }
                outcome
            }
            Err(error) => {
                stats.attempt_failed(error.cause);
                // Many connections failing the same way make one line a minute, not one each.
                match stats.log_failure(error.cause) {
                    Some(0) => warn!("[Connection {index}] Connection failed: {error}"),
                    Some(more) => warn!(
                        "[Connection {index}] Connection failed: {error} ({more} more like it since the last such line)"
                    ),
                    None => debug!("[Connection {index}] Connection failed: {error}"),
                }
                retry_after = error.retry_after;
                Outcome::Failed
            }
        };
        match outcome {
            Outcome::Shutdown => return,
            Outcome::Finished => {
                debug!("[Connection {index}] Sent all its messages; connecting again");
                continue;
            }
            Outcome::Lost(_) => outage = Some((Instant::now(), 0)),
            Outcome::Failed => outage.get_or_insert((Instant::now(), 0)).1 += 1,
        }
        if shutdown.is_requested() {
            return;
        }
        let delay = backoff.next_delay(retry_after, unit_random());
        info!("[Connection {index}] Reconnecting in {}", Millis(delay));
        if shutdown.wait_timeout(delay) {
            return;
        }
    }
}

/// A delay as log lines show it: `5.0s`, `250ms`.
struct Millis(Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 < Duration::from_secs(1) {
            write!(f, "{}ms", self.0.as_millis())
        } else {
            write!(f, "{:.1}s", self.0.as_secs_f64())
        }
    }
}

fn set_slot(slot: &Slot, live: Option<Live>) {
    *super::lock(slot) = live;
}

/// How every connection of a client reaches the server: the target, the route (directly
/// or through a proxy), for `wss://` the TLS settings and the name the certificate must
/// carry, and the upgrade request.
pub(super) struct Dialer {
    pub(super) target: Target,
    pub(super) route: Route,
    pub(super) tls: Option<ClientTls>,
    pub(super) server_name: String,
    pub(super) insecure: bool,
    request: Request,
    auth: Auth,
}

impl Dialer {
    /// The dialer for `config`, with `env` reading the proxy variables; fails when the TLS
    /// files or the token file do not load, a proxy variable cannot be used, or flags do
    /// not fit together (TLS flags for a `ws://` target, two flags for one header).
    pub(super) fn new(
        config: &ClientConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let target = config.target();
        let tls = if target.tls {
            Some(ClientTls::load(&ClientTlsOptions {
                ca_files: config.ca_file.clone(),
                no_builtin_roots: config.no_builtin_roots,
                client_cert: config.client_cert.clone().zip(config.client_key.clone()),
                insecure: config.insecure,
            })?)
        } else if config.has_tls_options() {
            // A flag that would do nothing is a mistake worth an error.
            return Err(format!(
                "TLS flags (--ca-file, --client-cert, --tls-server-name, --insecure) apply to \
                 wss:// only, and the target is {target}: add --tls or use --url wss://..."
            ));
        } else {
            None
        };
        Ok(Dialer {
            server_name: config
                .tls_server_name
                .clone()
                .unwrap_or_else(|| target.host.clone()),
            insecure: config.insecure && target.tls,
            tls,
            route: proxy::route(
                &target,
                config.proxy.as_ref(),
                config.no_proxy.as_deref(),
                env,
            )?,
            request: Request::new(&target, config)?,
            auth: Auth::new(config)?,
            target,
        })
    }

    /// The URL, and the subprotocol when some were offered: `ws://host/ws (subprotocol:
    /// chat)`.
    pub(super) fn describe(&self, protocol: Option<&str>) -> String {
        match (protocol, self.request.protocols.is_empty()) {
            (Some(protocol), _) => format!("{} (subprotocol: {protocol})", self.target),
            (None, false) => format!("{} (no subprotocol picked)", self.target),
            (None, true) => self.target.to_string(),
        }
    }

    /// TCP connect (to the proxy, then CONNECT through it), TLS handshake and WebSocket
    /// upgrade, all within the connect timeout.
    pub(super) fn connect(
        &self,
        config: &ClientConfig,
        index: u32,
    ) -> Result<Connected, ConnectError> {
        let target = &self.target;
        let deadline = Instant::now() + config.connect_timeout;
        let tcp = match &self.route.proxy {
            Some(proxy) => {
                let tcp =
                    tcp_connect(&proxy.host, proxy.port, deadline, config).map_err(|error| {
                        ConnectError::new(Failure::Proxy, format!("proxy {proxy}: {error}"))
                    })?;
                proxy::tunnel(&tcp, proxy, &target.host_port(), deadline)?;
                tcp
            }
            None => tcp_connect(&target.host, target.port, deadline, config)?,
        };
        let _ = tcp.set_nodelay(true);
        config.liveness().apply(socket2::SockRef::from(&tcp));
        let stream = match &self.tls {
            Some(tls) => tls
                .wrap(tcp, &self.server_name)
                .map_err(|error| ConnectError::new(Failure::Tls, error.to_string()))?,
            None => SharedStream::new(tcp),
        };
        stream.tls_handshake(deadline).map_err(|error| {
            let cause = match error.kind() {
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Failure::Timeout,
                std::io::ErrorKind::InvalidData => Failure::Tls,
                _ => Failure::Connect,
            };
            ConnectError::new(cause, error.to_string())
        })?;
        let token = self.auth.token(index);
        let upgraded = handshake::upgrade(&stream, &self.request, token.as_deref(), deadline)?;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(if LoadConfig::from_config(config).is_some() {
                LOAD_READ_BUFFER_SIZE
            } else {
                READ_BUFFER_SIZE
            })
            .write_buffer_size(0);
        let socket = WebSocket::from_partially_read(
            WsStream::new(stream.clone()),
            upgraded.leftover,
            Role::Client,
            Some(ws_config),
        );
        // From here on, reads time the pings. A write that makes no progress for as long as
        // a pong may take means the server stopped reading: the connection is as dead as
        // one that stopped answering pings.
        stream
            .tcp()
            .set_write_timeout(Some(config.pong_timeout))
            .map_err(|error| ConnectError::io(&error, error.to_string()))?;
        Ok(Connected {
            socket,
            stream,
            protocol: upgraded.protocol,
            backend: upgraded.backend,
        })
    }
}

/// An established connection.
pub(super) struct Connected {
    pub(super) socket: WebSocket<WsStream>,
    pub(super) stream: Arc<SharedStream>,
    /// The subprotocol the server picked.
    pub(super) protocol: Option<String>,
    /// The backend that answered (`X-Served-By`).
    pub(super) backend: Option<String>,
}

/// Resolves `host` and connects to its first address that answers, by `deadline`.
fn tcp_connect(
    host: &str,
    port: u16,
    deadline: Instant,
    config: &ClientConfig,
) -> Result<TcpStream, ConnectError> {
    let addrs = (host, port).to_socket_addrs().map_err(|error| {
        ConnectError::new(Failure::Resolve, format!("cannot resolve {host}: {error}"))
    })?;
    let mut last_error = None;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ConnectError::new(
                Failure::Timeout,
                format!("connect timed out after {:?}", config.connect_timeout),
            ));
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(tcp) => return Ok(tcp),
            Err(error) => last_error = Some(ConnectError::io(&error, format!("{addr}: {error}"))),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        ConnectError::new(Failure::Resolve, format!("{host} resolved to no address"))
    }))
}

/// The bearer token sent with every upgrade: none, `--auth-token`, or
/// `--auth-token-file`, read again on every connect so a rotated Secret is picked up.
enum Auth {
    None,
    Token(Secret),
    File {
        path: PathBuf,
        /// The token last read, kept for when the file cannot be read (mid-rotation).
        last: Mutex<String>,
    },
}

impl Auth {
    /// Checks the token, or reads the file once so a missing or empty one fails at start.
    fn new(config: &ClientConfig) -> Result<Self, String> {
        if let Some(token) = &config.auth_token {
            return Ok(Auth::Token(token.clone()));
        }
        let Some(path) = &config.auth_token_file else {
            return Ok(Auth::None);
        };
        Ok(Auth::File {
            last: Mutex::new(read_token(path)?),
            path: path.clone(),
        })
    }

    /// The token for connection `index`'s next attempt. Errors are logged, never the token.
    fn token(&self, index: u32) -> Option<String> {
        match self {
            Auth::None => None,
            Auth::Token(token) => Some(token.as_str().to_owned()),
            Auth::File { path, last } => {
                let mut last = last
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match read_token(path) {
                    Ok(token) => *last = token,
                    Err(error) => {
                        warn!("[Connection {index}] {error}; sending the token read before");
                    }
                }
                Some(last.clone())
            }
        }
    }
}

/// The token in the file at `path`, without surrounding whitespace.
fn read_token(path: &Path) -> Result<String, String> {
    read_token_file(path).map(|token| token.as_str().to_owned())
}

/// A failed connection attempt: the cause it is counted under and what the log line says.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ConnectError {
    pub(super) cause: Failure,
    message: String,
    /// How long the server asked us to wait (`Retry-After`).
    retry_after: Option<Duration>,
}

impl ConnectError {
    pub(super) fn new(cause: Failure, message: impl Into<String>) -> Self {
        ConnectError {
            cause,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error, with the wait the server asked for.
    pub(super) fn retry_after(self, wait: Option<Duration>) -> Self {
        ConnectError {
            retry_after: wait,
            ..self
        }
    }

    /// A socket error: a timeout, or the connect failed.
    fn io(error: &std::io::Error, message: String) -> Self {
        let cause = if net::is_timeout(error) || error.kind() == std::io::ErrorKind::TimedOut {
            Failure::Timeout
        } else {
            Failure::Connect
        };
        ConnectError::new(cause, message)
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// How a connection attempt or session ended.
enum Outcome {
    /// Shutdown was requested and the connection is closed.
    Shutdown,
    /// Load mode: the connection sent its messages and closed normally.
    Finished,
    /// The connection was lost.
    Lost(Ending),
    /// The connection could not be made.
    Failed,
}

impl Outcome {
    /// The Close code of a lost connection's ending; a normal close's 1000.
    fn code(&self) -> Option<u16> {
        match self {
            Outcome::Shutdown | Outcome::Finished => Some(1000),
            Outcome::Lost(ending) => ending.code,
            Outcome::Failed => None,
        }
    }

    /// The reason an established connection ended.
    fn reason(&self) -> Reason {
        match self {
            Outcome::Shutdown => Reason::Shutdown,
            Outcome::Finished => Reason::Finished,
            Outcome::Lost(ending) => ending.reason,
            Outcome::Failed => Reason::Error,
        }
    }
}

/// One established connection as a state machine: its deadlines (the next ping, the pong
/// expected, the next status line, the next load message, the end of a close handshake)
/// decide the next wake-up, which the socket's read timeout delivers. Each event has its
/// handler: [`on_timers`](Self::on_timers) when woken, [`on_message`](Self::on_message)
/// for a frame, [`on_error`](Self::on_error) when the read fails.
struct Session<'a> {
    index: u32,
    url: &'a str,
    config: &'a ClientConfig,
    shutdown: &'a Shutdown,
    stream: &'a SharedStream,
    stats: &'a ClientStats,
    activity: &'a Activity,
    /// The next ping; `None` with `--keepalive none`.
    next_ping: Option<Instant>,
    pong_due: Option<Instant>,
    pings_sent: u64,
    /// The last ping: its sequence number (its payload) and when it went out.
    last_ping: Option<(u64, Instant)>,
    next_status: Instant,
    load: Option<Load>,
    /// Set once a close handshake is under way, by us or by the server.
    closing: Option<Closing>,
    /// The read timeout now set on the socket.
    read_timeout: Option<Duration>,
}

/// Load mode's part of a session.
struct Load {
    generator: Generator,
    /// When the next message goes out; `None` while a closed loop waits for its echo.
    next_send: Option<Instant>,
}

/// A close handshake under way.
struct Closing {
    /// When to stop waiting for its completion.
    deadline: Instant,
    /// We started it because the load is done (rather than at shutdown or the server's
    /// request).
    finished: bool,
    /// The server's Close frame, once it has come.
    server_close: Option<Option<CloseFrame>>,
}

impl<'a> Session<'a> {
    fn new(
        index: u32,
        url: &'a str,
        config: &'a ClientConfig,
        shutdown: &'a Shutdown,
        stream: &'a SharedStream,
        stats: &'a ClientStats,
        activity: &'a Activity,
    ) -> Self {
        let start = Instant::now();
        Session {
            index,
            url,
            config,
            shutdown,
            stream,
            stats,
            activity,
            next_ping: (config.keepalive == Keepalive::Ping).then(|| start + config.ping_interval),
            pong_due: None,
            pings_sent: 0,
            last_ping: None,
            next_status: start + config.status_interval,
            load: LoadConfig::from_config(config).map(|load| Load {
                generator: Generator::new(load, index),
                next_send: Some(start),
            }),
            closing: None,
            read_timeout: None,
        }
    }

    /// Holds the connection until it is gone: pings, pong deadline, status lines, load
    /// messages, and the close handshake.
    fn hold(mut self, socket: &mut WebSocket<WsStream>) -> Outcome {
        let outcome = loop {
            if let Some(outcome) = self.on_timers(socket) {
                break outcome;
            }
            if let Err(error) = self.set_read_timeout() {
                break self.lost(Ending::from_io(&error));
            }
            match socket.read() {
                Ok(message) => {
                    self.activity.heard();
                    self.on_message(message);
                }
                Err(WsError::Io(error)) if net::is_timeout(&error) => {}
                Err(error) => break self.on_error(&error),
            }
        };
        if let Some(load) = &mut self.load {
            let stopping = matches!(outcome, Outcome::Shutdown | Outcome::Finished);
            load.generator.end(self.stats, stopping);
        }
        outcome
    }

    /// Does whatever is due now; returns the outcome once the connection is over.
    fn on_timers(&mut self, socket: &mut WebSocket<WsStream>) -> Option<Outcome> {
        let now = Instant::now();
        if self.shutdown.is_requested() && self.closing.is_none() {
            self.start_close("client shutting down", false);
        }
        if let Some(closing) = &self.closing {
            return (now >= closing.deadline).then(|| self.close_timed_out());
        }
        if self.pong_due.is_some_and(|due| now >= due) {
            let waited = self.config.pong_timeout;
            return Some(self.lost(Ending::new(
                Reason::PongTimeout,
                format!("no pong within {waited:?}"),
            )));
        }
        if self.next_ping.is_some_and(|due| now >= due) {
            self.pings_sent += 1;
            let ping = Message::Ping(self.pings_sent.to_be_bytes().to_vec().into());
            if let Err(error) = socket.send(ping) {
                return Some(self.lost(failed("ping", &error)));
            }
            self.stats.add(Counter::Pings, 1);
            self.last_ping = Some((self.pings_sent, now));
            self.pong_due.get_or_insert(now + self.config.pong_timeout);
            self.next_ping = Some(now + self.config.ping_interval);
        }
        if now >= self.next_status {
            let activity = self.activity.snapshot();
            let rtt = activity
                .last_rtt
                .map(|rtt| format!(", last rtt {:.2}ms", rtt.as_secs_f64() * 1000.0))
                .unwrap_or_default();
            info!(
                "[Connection {}] Connection status: CONNECTED to {} (up {}, {}{rtt})",
                self.index,
                self.url,
                Seconds(activity.age),
                crate::count(activity.pongs as usize, "pong"),
            );
            self.next_status = now + self.config.status_interval;
        }
        self.send_load(socket, now)
    }

    /// Load mode: sends the message that is due, or starts the close once all are echoed.
    fn send_load(&mut self, socket: &mut WebSocket<WsStream>, now: Instant) -> Option<Outcome> {
        let load = self.load.as_mut()?;
        if load.generator.finished() {
            load.next_send = None;
            self.start_close("done", true);
            return None;
        }
        if let Some(due) = load.next_send.filter(|due| now >= *due) {
            let message = load.generator.next_message();
            let size = message.len();
            if let Err(error) = socket.send(Message::Binary(message)) {
                return Some(self.lost(failed("send", &error)));
            }
            self.activity.sent(size);
            // Keep the rate, but never try to catch up with a burst.
            load.next_send = load.generator.next_send(due).map(|next| next.max(now));
        }
        load.generator.flush(self.stats, false);
        None
    }

    fn on_message(&mut self, message: Message) {
        match message {
            Message::Binary(echo) => {
                self.activity.received(echo.len());
                let finished = self.closing.as_ref().is_some_and(|c| c.finished);
                if let Some(load) = &mut self.load {
                    load.generator.on_echo(&echo);
                    if load.next_send.is_none() && !finished {
                        load.next_send = load.generator.next_send(Instant::now());
                    }
                }
            }
            Message::Pong(payload) if self.pong_due.take().is_some() => {
                self.stats.add(Counter::Pongs, 1);
                if let Some((seq, sent)) = self.last_ping {
                    if payload[..] == seq.to_be_bytes() {
                        let rtt = sent.elapsed();
                        self.activity.pong(rtt);
                        self.stats.ping_rtt(rtt);
                    }
                }
                debug!("[Connection {}] pong", self.index);
            }
            Message::Close(frame) => {
                debug!(
                    "[Connection {}] server sent close: {}",
                    self.index,
                    describe_close(&frame)
                );
                let closing = self.closing.get_or_insert(Closing {
                    deadline: Instant::now() + CLOSE_TIMEOUT,
                    finished: false,
                    server_close: None,
                });
                closing.server_close = Some(frame);
            }
            _ => {}
        }
    }

    fn on_error(&self, error: &WsError) -> Outcome {
        if self.shutdown.is_requested() {
            // Our own shutdown broke the connection (a send cut off by the abort, say).
            return Outcome::Shutdown;
        }
        match (error, &self.closing) {
            (WsError::ConnectionClosed | WsError::AlreadyClosed, Some(closing))
                if closing.finished =>
            {
                Outcome::Finished
            }
            (WsError::ConnectionClosed | WsError::AlreadyClosed, _) => {
                self.lost(Ending::new(Reason::Eof, "connection closed"))
            }
            _ => self.lost(Ending::from_ws_error(error)),
        }
    }

    /// Sends our Close frame and gives the server [`CLOSE_TIMEOUT`] to answer it.
    fn start_close(&mut self, reason: &str, finished: bool) {
        let _ = self
            .stream
            .send_close(&close_frame(Role::Client, CloseCode::Normal, reason));
        self.closing = Some(Closing {
            deadline: Instant::now() + CLOSE_TIMEOUT,
            finished,
            server_close: None,
        });
    }

    /// The close handshake did not complete in time.
    fn close_timed_out(&self) -> Outcome {
        let closing = self.closing.as_ref().expect("a close is under way");
        match closing.server_close {
            _ if self.shutdown.is_requested() => Outcome::Shutdown,
            Some(_) if closing.finished => Outcome::Finished,
            Some(_) => self.lost(Ending::new(Reason::Eof, "connection closed")),
            None => self.lost(Ending::new(Reason::Error, "close handshake timed out")),
        }
    }

    /// The connection is gone, for `ending` or, if the server had sent a Close, for that.
    fn lost(&self, ending: Ending) -> Outcome {
        if self.shutdown.is_requested() {
            return Outcome::Shutdown;
        }
        match self.closing.as_ref().and_then(|c| c.server_close.as_ref()) {
            Some(frame) => {
                let mut ending = Ending::peer_close(frame);
                ending.detail = format!("server closed the connection: {}", ending.detail);
                Outcome::Lost(ending)
            }
            None => Outcome::Lost(ending),
        }
    }

    /// Sets the read timeout to wake at the next deadline. A timeout longer than needed
    /// would oversleep a deadline; a shorter one only wakes the loop early, so the system
    /// call is skipped while the current one is close enough. A long one is set a little
    /// short: the next deadline comes closer with every message, and without the margin a
    /// busy connection would set it again for each one.
    fn set_read_timeout(&mut self) -> std::io::Result<()> {
        const MARGIN: Duration = Duration::from_millis(100);
        let wanted = self
            .next_wake()
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        if self
            .read_timeout
            .is_none_or(|current| wanted < current || wanted > current * 2)
        {
            let timeout = if wanted > MARGIN * 4 {
                wanted - MARGIN
            } else {
                wanted
            };
            self.stream.tcp().set_read_timeout(Some(timeout))?;
            self.read_timeout = Some(timeout);
        }
        Ok(())
    }

    /// The earliest deadline.
    fn next_wake(&self) -> Instant {
        if let Some(closing) = &self.closing {
            return closing.deadline;
        }
        let next_send = self.load.as_ref().and_then(|load| load.next_send);
        [self.next_ping, self.pong_due, next_send]
            .into_iter()
            .flatten()
            .fold(self.next_status, Instant::min)
    }
}

/// A failed ping or load send.
fn failed(what: &str, error: &WsError) -> Ending {
    let mut ending = Ending::from_ws_error(error);
    ending.detail = format!("{what} failed: {}", ending.detail);
    ending
}
