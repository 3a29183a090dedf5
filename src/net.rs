//! Socket set-up shared by the server and the client.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// Listen backlog: std's `TcpListener::bind` uses 128, which makes bursts of connects wait
/// a second for SYN retries. The kernel caps it at `net.core.somaxconn` (4096 by default).
pub const LISTEN_BACKLOG: i32 = 4096;

/// Binds a listening TCP socket with `SO_REUSEADDR` (a restart does not wait for
/// `TIME_WAIT`) and a large backlog. An IPv6 wildcard also accepts IPv4.
pub fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// What every accepted socket gets: no Nagle delay, `liveness`, and `write_timeout` on each
/// write.
#[derive(Debug, Clone, Copy)]
pub struct AcceptedOptions {
    pub liveness: Liveness,
    pub write_timeout: Duration,
}

impl AcceptedOptions {
    /// Linux copies these options from the listener to every socket it accepts: set there,
    /// they spare each connection's thread seven system calls.
    const COPIED_ON_ACCEPT: bool = cfg!(target_os = "linux");

    /// Sets them on the listener, where the OS copies them on accept.
    pub fn set_on_listener(&self, listener: &TcpListener) {
        if Self::COPIED_ON_ACCEPT {
            self.set(socket2::SockRef::from(listener));
        }
    }

    /// Sets them on an accepted socket, where the OS did not copy them from the listener.
    pub fn set_on_accepted(&self, tcp: &TcpStream) {
        if !Self::COPIED_ON_ACCEPT {
            self.set(socket2::SockRef::from(tcp));
        }
    }

    fn set(&self, socket: socket2::SockRef<'_>) {
        let _ = socket.set_tcp_nodelay(true);
        let _ = socket.set_write_timeout(Some(self.write_timeout));
        self.liveness.apply(socket);
    }
}

/// An address that reaches `listen_addr` from this host: the loopback address when the
/// listener is bound to a wildcard.
pub fn local_reach(listen_addr: SocketAddr) -> SocketAddr {
    let ip = match listen_addr {
        SocketAddr::V4(v4) if v4.ip().is_unspecified() => Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(v6) if v6.ip().is_unspecified() => Ipv6Addr::LOCALHOST.into(),
        other => other.ip(),
    };
    SocketAddr::new(ip, listen_addr.port())
}

/// Unblocks a thread waiting in `accept()` on `listen_addr` by connecting to it.
pub fn wake_acceptor(listen_addr: SocketAddr) {
    let _ = TcpStream::connect_timeout(&local_reach(listen_addr), Duration::from_secs(1));
}

/// True for the error a socket read or write timeout produces (`WouldBlock` on Unix,
/// `TimedOut` on Windows): a tick, not a failure. On Unix `TimedOut` (ETIMEDOUT) means
/// something else: TCP keepalive or the user timeout gave up on the peer.
pub fn is_timeout(error: &io::Error) -> bool {
    match error.kind() {
        io::ErrorKind::WouldBlock => true,
        io::ErrorKind::TimedOut => cfg!(windows),
        _ => false,
    }
}

/// Reads more of an HTTP head from `source` straight into `buf`, growing it (from 1 KiB,
/// doubling) up to `max` bytes; a buffer on the stack would stay resident for the thread's
/// whole life.
/// Returns what `read` returned; `Ok(0)` also when `buf` is already full.
pub fn read_head_chunk(
    mut source: impl io::Read,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<usize> {
    let len = buf.len();
    if len >= max {
        return Ok(0);
    }
    if len == buf.capacity() {
        buf.reserve(1024);
    }
    buf.resize(buf.capacity().min(max), 0);
    let read = source.read(&mut buf[len..]);
    buf.truncate(len + *read.as_ref().unwrap_or(&0));
    read
}

/// How a socket notices a peer that vanished without a word (a cable pulled, a NAT entry
/// forgotten, a firewall that drops): TCP keepalive probes after `keepalive` of silence,
/// one every third of that, and `user_timeout` for data (or probes) left unacknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Silence before the first keepalive probe; `None`: no probes.
    pub keepalive: Option<Duration>,
    /// `TCP_USER_TIMEOUT`: unacknowledged data this old ends the connection; `None`: the
    /// kernel's default (about 15 minutes of retransmissions).
    pub user_timeout: Option<Duration>,
}

/// Keepalive probes before the kernel gives up when no user timeout is set.
const KEEPALIVE_PROBES: u32 = 3;

impl Liveness {
    /// The longest a silently vanished peer can hold a connection: the first probe, then
    /// the probes until the user timeout (or their count) gives up.
    pub fn bound(&self) -> Option<Duration> {
        match (self.keepalive, self.user_timeout) {
            (Some(idle), Some(user)) => Some(user.max(idle) + Self::interval(idle)),
            (Some(idle), None) => Some(idle + Self::interval(idle) * KEEPALIVE_PROBES),
            (None, Some(user)) => Some(user),
            (None, None) => None,
        }
    }

    fn interval(idle: Duration) -> Duration {
        (idle / 3).max(Duration::from_secs(1).min(idle))
    }

    /// Sets both on `socket` (best effort: a platform without them keeps its defaults).
    pub fn apply(&self, socket: socket2::SockRef<'_>) {
        if let Some(idle) = self.keepalive {
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(Self::interval(idle));
            #[cfg(any(target_os = "linux", target_os = "android"))]
            let keepalive = keepalive.with_retries(KEEPALIVE_PROBES);
            let _ = socket.set_tcp_keepalive(&keepalive);
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(timeout) = self.user_timeout {
            let _ = socket.set_tcp_user_timeout(Some(timeout));
        }
    }
}

/// How long [`close_gracefully`] usually waits for the peer to finish sending.
pub const LINGER: Duration = Duration::from_secs(1);

/// Closes our side after a final message (an HTTP error or a Close frame) so the peer can
/// read it: half-close, then discard what the peer still sends until it closes too, for at
/// most `linger`. Closing with unread input would make the kernel send a reset, and a
/// reset can destroy the final message before the peer reads it.
pub fn close_gracefully(tcp: &TcpStream, linger: Duration) {
    use std::io::Read;
    if tcp.shutdown(std::net::Shutdown::Write).is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + linger;
    let mut sink = [0u8; 4096];
    let mut budget = 1usize << 20;
    while budget > 0 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || tcp.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match (&*tcp).read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => budget = budget.saturating_sub(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_have_the_options_whichever_way_they_got_them() {
        let options = AcceptedOptions {
            liveness: Liveness {
                keepalive: Some(Duration::from_secs(15)),
                user_timeout: Some(Duration::from_secs(45)),
            },
            write_timeout: Duration::from_secs(10),
        };
        let listener = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        options.set_on_listener(&listener);
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        options.set_on_accepted(&accepted);

        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(15)
        );
        #[cfg(target_os = "linux")]
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(45))
        );
        assert_eq!(
            accepted.write_timeout().unwrap(),
            Some(Duration::from_secs(10))
        );
    }
}
