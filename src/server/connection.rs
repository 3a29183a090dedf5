//! One client connection on its own thread: the opening request, then the echo loop.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tungstenite::{Error as WsError, Message};

use super::acceptor::{spawn_connection_thread, Lease, CONNECTION_STACK_SIZE};
use super::access::{Access, Admission, ClientAddr, Refusal};
use super::handshake::{self, Answer, Handshake};
use super::proxy_protocol;
use super::registry::Registry;
use crate::activity::Activity;
use crate::ending::{self, Ending, Reason};
use crate::frame::close_frame;
use crate::metrics::Metrics;
use crate::net;
use crate::shutdown::Shutdown;
use crate::stream::{SharedStream, WsStream};

/// After echoing a message larger than this, a connection swaps tungstenite's buffers (grown
/// to the message's size) for small ones; smaller messages leave them as they are, so a
/// steady stream of small or medium echoes allocates nothing per message.
const GIVE_BACK_ABOVE: usize = 64 << 10;

/// With an idle timeout, the most unsent data the kernel may hold for a connection.
#[cfg(any(target_os = "linux", target_os = "android"))]
const UNSENT_LIMIT: u32 = 128 * 1024;

/// What every connection thread needs, shared by all of them.
pub struct Context {
    /// The path that accepts upgrades.
    pub ws_path: String,
    /// Time a client has to send its opening request.
    pub handshake_timeout: Duration,
    /// Options for every accepted socket, set here where the listener did not pass them on.
    pub accepted: net::AcceptedOptions,
    /// Buffer sizes and limits for tungstenite.
    pub ws_config: WebSocketConfig,
    /// The live connections.
    pub registry: Registry,
    /// Counters.
    pub metrics: Metrics,
    /// Server shutdown.
    pub shutdown: Shutdown,
    /// The Close frame sent to every client at shutdown.
    pub going_away: Arc<[u8]>,
    /// Server-side pings and the idle timeout.
    pub keepalive: Keepalive,
    /// Header lines for every answer (`X-Served-By: NAME`).
    pub answer_headers: String,
    /// `hello from NAME`: the first message of a connection whose upgrade asked for it
    /// (`?hello`), or of every connection with `--hello`.
    pub hello: String,
    /// Send [`hello`](Self::hello) on every connection (`--hello`).
    pub hello_always: bool,
    /// Serve the browser probe page on `/ui` (`--ui`).
    pub ui: bool,
    /// The memory budget for messages, shared by all connections.
    pub budget: Arc<crate::budget::Budget>,
    /// Set while the server drains: new upgrades and `GET /` get 503.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Serve `wss://`: every accepted socket starts with a TLS handshake.
    pub tls: Option<crate::tls::ServerTls>,
    /// Token, origins, subprotocols, per-address limits, the client's real address.
    pub access: Access,
}

impl Context {
    /// Counts a failed handshake under `cause`.
    fn handshake_failed(&self, cause: &str) {
        self.metrics
            .handshake_failures
            .with_label_values(&[cause])
            .inc();
    }
}

/// The `cause` label of a handshake that failed with `error`.
fn error_cause(error: &std::io::Error) -> &'static str {
    if crate::stream::is_tls_error(error) {
        "tls"
    } else if net::is_timeout(error) || error.kind() == std::io::ErrorKind::TimedOut {
        "timeout"
    } else if error.kind() == std::io::ErrorKind::ConnectionAborted {
        "closed"
    } else {
        "error"
    }
}

/// Server-side liveness checks, both off by default: an idle connection then blocks in
/// `read` with no timeout at all.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    /// Send a ping this often.
    pub ping_interval: Option<Duration>,
    /// Close a connection the client has sent nothing on (not even a pong) for this long.
    pub idle_timeout: Option<Duration>,
}

impl Keepalive {
    /// The socket read timeout that wakes the thread to check: the ping interval, or a
    /// quarter of the idle timeout (so it is enforced within 25%), whichever is shorter.
    fn tick(&self) -> Option<Duration> {
        let idle_tick = self
            .idle_timeout
            .map(|idle| (idle / 4).max(Duration::from_millis(1)));
        match (self.ping_interval, idle_tick) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Serves one accepted socket until it closes. `admission` says whether the per-address
/// limits were applied at accept; if not, they are applied here once the client's address
/// is known (after the PROXY header, or from a trusted proxy's request). `lease` is held
/// as long as a thread serves the connection.
pub fn run(
    id: u64,
    tcp: TcpStream,
    peer: SocketAddr,
    admission: Admission,
    lease: Lease,
    context: &Arc<Context>,
) {
    // Calls that are never inlined into one frame: the thread's stack pages, once touched,
    // stay resident for the life of the connection, so the deepest point of any phase, not
    // of all together, sets what an idle connection costs.
    let Some(upgraded) = open(id, tcp, peer, admission, context) else {
        return;
    };
    if upgraded.stream.is_tls() {
        hand_over(id, upgraded, lease, context);
    } else {
        established(id, upgraded, context);
    }
}

/// Serves the rest of a wss connection on a fresh thread of the same name, and lets this
/// one end: the TLS handshake runs deepest of all (rustls's and ring's signing frames pass
/// 4 KiB), three more stack pages that an idle connection would keep for its life. If the
/// OS refuses the thread, the connection stays here.
#[inline(never)]
fn hand_over(id: u64, upgraded: Box<Upgraded>, lease: Lease, context: &Arc<Context>) {
    let fresh = Arc::clone(context);
    let handed = spawn_connection_thread(
        id,
        CONNECTION_STACK_SIZE,
        (upgraded, lease),
        move |(upgraded, _lease)| {
            established(id, upgraded, &fresh);
        },
    );
    if let Err((error, Some((upgraded, _lease)))) = handed {
        debug!("conn-{id} stays on the thread of its TLS handshake: {error}");
        established(id, upgraded, context);
    }
}

/// Registers an upgraded connection, echoes until it ends, and records how. Registering
/// (with its connect log line) happens here, above the echo loop's frame, not in it.
#[allow(clippy::boxed_local)] // boxed on purpose: see `Upgraded`
fn established(id: u64, upgraded: Box<Upgraded>, context: &Context) {
    let Upgraded {
        stream,
        leftover,
        hello,
        client,
        slot,
    } = *upgraded;
    let mut registration = context.registry.register(id, client, stream.clone());
    let ending = serve(stream, leftover, hello, registration.activity(), context);
    registration.set_ending(ending);
    // The address's place is given back after the connection has left the registry.
    drop(registration);
    drop(slot);
}

/// What a successful opening handshake leaves for the echo phase. Boxed, so that moving it
/// from frame to frame (or to another thread) copies a pointer.
struct Upgraded {
    stream: Arc<SharedStream>,
    /// Bytes that came after the upgrade request.
    leftover: Vec<u8>,
    /// Send the server's name first (`?hello` or `--hello`).
    hello: bool,
    client: ClientAddr,
    /// The client address's place under the per-address limit, held for the connection's life.
    slot: Option<super::access::Slot>,
}

/// The TLS handshake, the PROXY header and the upgrade request; `None` once the connection
/// has been answered or has failed (logged and counted here).
#[inline(never)]
fn open(
    id: u64,
    tcp: TcpStream,
    peer: SocketAddr,
    admission: Admission,
    context: &Context,
) -> Option<Box<Upgraded>> {
    context.accepted.set_on_accepted(&tcp);
    let stream = match &context.tls {
        Some(tls) => match tls.wrap(tcp) {
            Ok(stream) => stream,
            Err(error) => {
                warn!("Cannot start a TLS session for {peer}: {error}");
                return None;
            }
        },
        None => SharedStream::new(tcp),
    };
    let tcp = stream.tcp();
    // Listed while the request is read, so shutdown can cut a slow or silent client short.
    let handshaking = context.registry.begin_handshake(id, stream.clone());
    if context.shutdown.is_requested() {
        return None;
    }
    // The PROXY header, the TLS handshake and the upgrade request share the handshake
    // timeout.
    let deadline = Instant::now() + context.handshake_timeout;
    let access = &context.access;
    let mut client = ClientAddr::direct(peer);
    if access.proxy_protocol() {
        // Before TLS and HTTP: the balancer writes it first thing.
        match proxy_protocol::read_header(tcp, deadline) {
            Ok(Some(source)) => client = client.forwarded(source),
            Ok(None) => debug!("PROXY header from {peer} without a client address (LOCAL or UNKNOWN): the balancer's own connection"),
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                debug!("Connection from {peer} failed: {error}");
                return None;
            }
            Err(error) => {
                context.handshake_failed("proxy");
                info!("Connection from {peer} failed: {error}");
                return None;
            }
        }
    }
    let (mut slot, mut pending) = match admission {
        Admission::Done(slot) => (slot, false),
        Admission::Pending => (None, true),
    };
    let mut refused: Option<(std::net::IpAddr, Refusal)> = None;
    if pending && !access.is_trusted_proxy(client.addr.ip()) {
        pending = false;
        match access.admit(client.addr.ip()) {
            Ok(admitted) => slot = admitted,
            // Answered once the request is in: the client expects an HTTP response.
            Err(refusal) => refused = Some((client.addr.ip(), refusal)),
        }
    }
    let token = access.token();
    let rules = access.rules(token.as_deref(), client.addr);
    let admit = |forwarded: SocketAddr| {
        if pending {
            match access.admit(forwarded.ip()) {
                Ok(admitted) => slot = admitted,
                Err(refusal) => refused = Some((forwarded.ip(), refusal)),
            }
        }
        match &refused {
            Some((_, refusal)) => Err(refusal.reply()),
            None => Ok(()),
        }
    };
    let opened = stream.tls_handshake(deadline).and_then(|()| {
        let answer = Answer {
            headers: &context.answer_headers,
            ui: context.ui,
            draining: context.draining.load(std::sync::atomic::Ordering::SeqCst),
        };
        handshake::accept(&stream, &context.ws_path, &rules, &answer, deadline, admit)
    });
    let (leftover, hello) = match opened {
        Ok(Handshake::Upgraded {
            leftover,
            client: forwarded,
            protocol,
            hello,
        }) => {
            client = client.forwarded(forwarded);
            if let Some(protocol) = protocol {
                debug!("Subprotocol for {client}: {protocol}");
            }
            (leftover, hello || context.hello_always)
        }
        Ok(Handshake::Answered { status, message }) => {
            match &refused {
                Some((ip, refusal)) if status == 429 => {
                    context.metrics.connections_rejected.inc();
                    warn!("Refused {client}: {}; answered 429", refusal.why(*ip));
                }
                _ if status >= 400 => {
                    context.handshake_failed(crate::metrics::failure_cause(status));
                    info!("Rejected request from {client}: {status} {message}");
                }
                _ => debug!("Answered {client}: {status} {message}"),
            }
            stream.close_gracefully(net::LINGER);
            return None;
        }
        // A connect-and-close with nothing sent is a TCP health check or a port scan, not a
        // failed upgrade.
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            debug!("Upgrade from {client} failed: {error}");
            return None;
        }
        Err(error) => {
            context.handshake_failed(error_cause(&error));
            info!("Upgrade from {client} failed: {error}");
            return None;
        }
    };
    drop(handshaking);
    let upgraded = Upgraded {
        stream,
        leftover,
        hello,
        client,
        slot,
    };
    Some(Box::new(upgraded))
}

/// The echo phase of an upgraded connection: how it ended.
#[inline(never)]
fn serve(
    stream: Arc<SharedStream>,
    leftover: Vec<u8>,
    hello: bool,
    activity: &Activity,
    context: &Context,
) -> Ending {
    let tcp = stream.tcp();
    // The write timeout (a client that stops reading must not hold this thread forever) came
    // with the socket: see `net::AcceptedOptions`.
    let _ = tcp.set_read_timeout(context.keepalive.tick());
    if context.keepalive.idle_timeout.is_some() {
        // An echo is "sent" once the kernel has it, but megabytes of it may still wait in the
        // send buffer, with our pings queued behind: a client reading as fast as its link
        // allows could not answer in time. Keeping little unsent data in the kernel makes the
        // write itself last until the client has nearly caught up.
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let _ = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(UNSENT_LIMIT);
    }

    // The leftover goes through the stream, which follows the frames tungstenite is given.
    let ws_stream = WsStream::with_budget(stream.clone(), context.budget.clone()).after(leftover);
    let mut socket = on_heap(ws_stream, context.ws_config);
    if hello {
        let hello = context.hello.as_str();
        if let Err(error) = socket.send(Message::text(hello)) {
            return Ending::from_ws_error(&error);
        }
        activity.sent(hello.len());
    }
    let ending = echo(socket, &stream, activity, context);
    if matches!(
        ending.reason,
        Reason::ProtocolError
            | Reason::InvalidData
            | Reason::TooBig
            | Reason::IdleTimeout
            | Reason::Overloaded
    ) {
        // We sent a Close the peer has not answered: let it reach the peer before the
        // socket closes.
        stream.close_gracefully(net::LINGER);
    } else if ending.reason == Reason::WriteTimeout {
        // Nothing more gets through to a peer that stopped reading: end with a reset.
        stream.reset_on_close();
    } else {
        stream.send_close_notify();
    }
    ending
}

/// Echoes every data message back with its type until the connection ends.
fn echo(
    mut socket: Box<WebSocket<WsStream>>,
    stream: &SharedStream,
    activity: &Activity,
    context: &Context,
) -> Ending {
    let Keepalive {
        ping_interval,
        idle_timeout,
    } = context.keepalive;
    // Without keepalive an idle connection just blocks in `read`: no clock, no checks.
    let keepalive = context.keepalive.tick().is_some();
    // Bytes arriving count as activity, and so does sending an echo: to a client on a slow
    // link the write itself can outlast the idle timeout. Our own pings do not: they succeed
    // on a dead connection too.
    let mut last_activity = Instant::now();
    let mut bytes_seen = 0;
    let mut next_ping = ping_interval.map(|interval| last_activity + interval);
    let mut pings_sent: u64 = 0;
    // The last ping: its sequence number (its payload) and when it went out.
    let mut last_ping: Option<(u64, Instant)> = None;
    let mut peer_close = None;
    // Messages tungstenite has returned, control frames included.
    let mut taken: u64 = 0;
    loop {
        if context.shutdown.is_requested() {
            let _ = stream.send_close(&context.going_away);
        }
        let read = socket.read();
        if read.is_ok() {
            taken += 1;
        }
        match read {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                let size = message.len();
                debug!("echo {size} bytes");
                activity.heard();
                activity.received(size);
                if let Err(error) = socket.send(message) {
                    return end_with_error(&error, stream);
                }
                socket.get_mut().settled();
                activity.sent(size);
                if keepalive {
                    last_activity = Instant::now();
                }
                if size > GIVE_BACK_ABOVE && socket.get_ref().all_taken(taken) {
                    // tungstenite keeps its read and write buffers at the size of the
                    // largest frame they carried; a fresh one starts small. It holds no
                    // byte of the peer's and nothing unsent, so nothing is lost.
                    socket = renewed(socket, context.ws_config);
                }
            }
            Ok(Message::Close(frame)) => {
                activity.heard();
                peer_close = Some(frame);
            }
            Ok(Message::Pong(payload)) => {
                activity.heard();
                socket.get_mut().settled();
                if let Some((seq, sent)) = last_ping {
                    if payload[..] == seq.to_be_bytes() {
                        activity.pong(sent.elapsed());
                        last_ping = None;
                    }
                }
            }
            // tungstenite queues the pong and sends it before the next read.
            Ok(Message::Ping(_) | Message::Frame(_)) => {
                activity.heard();
                socket.get_mut().settled();
            }
            Err(WsError::Io(error)) if net::is_timeout(&error) => {}
            // Our shutdown Close went first: whatever ends the connection now (the peer's
            // reply, or the abort after the shutdown timeout) ends it for the shutdown.
            Err(_) if context.shutdown.is_requested() => {
                return Ending::sent_close(
                    Reason::Shutdown,
                    CloseCode::Away,
                    "server shutting down",
                )
            }
            Err(WsError::ConnectionClosed) => {
                return match peer_close {
                    Some(frame) if ending::is_rewritten_close(&frame) => Ending::sent_close(
                        Reason::ProtocolError,
                        CloseCode::Protocol,
                        "close frame with a code that must not be sent",
                    ),
                    Some(frame) => Ending::peer_close(&frame),
                    None => Ending::new(Reason::Eof, "connection closed"),
                };
            }
            Err(error) => return end_with_error(&error, stream),
        }
        if !keepalive {
            continue;
        }

        let now = Instant::now();
        if socket.get_ref().bytes_read() != bytes_seen {
            bytes_seen = socket.get_ref().bytes_read();
            last_activity = now;
        }
        if let Some(idle) = idle_timeout.filter(|idle| now.duration_since(last_activity) >= *idle) {
            let _ = stream.send_close(&close_frame(Role::Server, CloseCode::Away, "idle timeout"));
            return Ending::sent_close(
                Reason::IdleTimeout,
                CloseCode::Away,
                format_args!("nothing received for {idle:?}"),
            );
        }
        if let (Some(interval), Some(due)) = (ping_interval, next_ping) {
            if now >= due && socket.can_write() {
                pings_sent += 1;
                if let Err(error) =
                    socket.send(Message::Ping(pings_sent.to_be_bytes().to_vec().into()))
                {
                    return end_with_error(&error, stream);
                }
                last_ping = Some((pings_sent, now));
                next_ping = Some(now + interval);
            }
        }
    }
}

/// A fresh socket, with small buffers, over the stream of `socket`.
#[cold]
fn renewed(socket: Box<WebSocket<WsStream>>, config: WebSocketConfig) -> Box<WebSocket<WsStream>> {
    on_heap(socket.into_inner(), config)
}

/// A server socket over `stream`, built on the heap in a frame of its own: moved between
/// frames, the socket would be copied into each of them, and the echo loop's frame, which an
/// idle connection keeps, would be as much deeper.
#[inline(never)]
fn on_heap(stream: WsStream, config: WebSocketConfig) -> Box<WebSocket<WsStream>> {
    Box::new(WebSocket::from_raw_socket(
        stream,
        Role::Server,
        Some(config),
    ))
}

/// Ends the connection after a tungstenite error: a protocol or limit violation gets the
/// Close frame RFC 6455 asks for (tungstenite itself sends none); a transport error just
/// ends it.
fn end_with_error(error: &WsError, stream: &SharedStream) -> Ending {
    match ending::violation(error) {
        Some((reason, code)) => {
            let _ = stream.send_close(&close_frame(
                Role::Server,
                code,
                ending::violation_reason(code),
            ));
            Ending::sent_close(reason, code, error)
        }
        None => Ending::from_ws_error(error),
    }
}
