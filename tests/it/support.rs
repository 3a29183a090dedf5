//! Helpers: deadlines, HTTP and WebSocket over real sockets (tungstenite and raw frames),
//! and the built binaries for the few tests that need a process. Every wait has a
//! deadline, and a failing wait panics with what it was waiting for.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Error as WsError, Message, WebSocket};

/// The multiplier for every deadline: `WEBSOCKET_TEST_TIME_SCALE` (default 1). A slow or
/// loaded machine raises it; lower bounds (nothing may happen before a timeout) stay as
/// they are.
pub fn time_scale() -> f64 {
    static SCALE: OnceLock<f64> = OnceLock::new();
    *SCALE.get_or_init(|| match std::env::var("WEBSOCKET_TEST_TIME_SCALE") {
        Ok(text) => text
            .parse()
            .ok()
            .filter(|scale: &f64| *scale >= 1.0)
            .unwrap_or_else(|| {
                panic!("WEBSOCKET_TEST_TIME_SCALE={text:?}: expected a number >= 1")
            }),
        Err(_) => 1.0,
    })
}

/// How early a timer may seem to fire, measured from outside (clock reads on either side
/// of it): lower bounds allow this much.
pub const TIMER_SLACK: Duration = Duration::from_millis(20);

/// `duration` stretched by [`time_scale`].
pub fn scaled(duration: Duration) -> Duration {
    duration.mul_f64(time_scale())
}

/// How long to wait for what normally takes milliseconds: 10 s, scaled.
pub fn patience() -> Duration {
    scaled(Duration::from_secs(10))
}

/// Polls `condition` every 5 ms until it holds; panics naming `what` once `within`
/// (scaled) has passed. Returns how long it took.
pub fn wait_within(what: &str, within: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    let deadline = start + scaled(within);
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {:?} waiting until {what}",
            scaled(within)
        );
        thread::sleep(Duration::from_millis(5)); // polling interval
    }
    start.elapsed()
}

/// A client WebSocket as tests use it.
pub type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

/// A running binary whose stdout and stderr are collected line by line.
pub struct Proc {
    name: String,
    child: Child,
    output: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Proc {
    /// Starts `bin` (`"server"` or `"client"`) with `args`.
    pub fn start(bin: &str, args: &[&str]) -> Proc {
        Proc::start_with_env(bin, args, &[])
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// All output so far.
    pub fn output(&self) -> String {
        self.output.0.lock().unwrap().join("\n")
    }

    /// Number of output lines containing `pattern`.
    pub fn count(&self, pattern: &str) -> usize {
        self.output
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(pattern))
            .count()
    }

    /// Waits until `n` output lines contain `pattern`; returns the `n`th such line.
    pub fn wait_for_nth(&self, pattern: &str, n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (lines, changed) = &*self.output;
        let mut lines = lines.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().filter(|l| l.contains(pattern)).nth(n - 1) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "`{}` did not print {n}x {pattern:?} within {timeout:?}; output:\n{}",
                    self.name,
                    lines.join("\n")
                );
            }
            lines = changed.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Waits for the first output line containing `pattern`.
    pub fn wait_for(&self, pattern: &str, timeout: Duration) -> String {
        self.wait_for_nth(pattern, 1, timeout)
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`, `STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// Waits for the process to exit; panics with its output if it does not in time.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "`{}` did not exit within {timeout:?}; output:\n{}",
                    self.name,
                    self.output()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for exit and returns the status with everything printed.
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, String) {
        let status = self.wait_exit(timeout);
        // The reader threads finish right after the pipes close.
        let deadline = Instant::now() + Duration::from_secs(1);
        while Arc::strong_count(&self.output) > 1 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        (status, self.output())
    }

    /// The thread count of the process, from /proc.
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .map(std::iter::Iterator::count)
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(pipe: impl Read + Send + 'static, output: Arc<(Mutex<Vec<String>>, Condvar)>) {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            output.0.lock().unwrap().push(line);
            output.1.notify_all();
        }
    });
}

/// A server binary on free loopback ports.
pub struct Server {
    /// The process.
    pub proc: Proc,
    /// Its WebSocket address.
    pub addr: SocketAddr,
    /// Its metrics address.
    pub metrics: SocketAddr,
}

impl Server {
    /// Starts a server on 127.0.0.1 with ports chosen by the OS and `extra` flags.
    pub fn start(extra: &[&str]) -> Server {
        Server::start_with_env(extra, &[])
    }

    /// `ws://ADDR/ws`.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Opens a WebSocket connection (blocking, with a read timeout so tests cannot hang).
    pub fn connect(&self) -> Ws {
        connect(&self.url())
    }

    /// The value of metric `name` (a line `name VALUE`).
    pub fn metric(&self, name: &str) -> f64 {
        metric(self.metrics, name)
    }

    /// Waits until `websocket_connections` equals `n`.
    pub fn wait_for_gauge(&self, n: i64) {
        let deadline = Instant::now() + patience();
        loop {
            let value = self.metric("websocket_connections");
            if value == n as f64 {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "websocket_connections stayed {value}, expected {n}; output:\n{}",
                    self.proc.output()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Parses the `host:port` after `scheme` in a log line.
pub fn address_after(line: &str, scheme: &str) -> SocketAddr {
    let rest = &line[line.find(scheme).unwrap() + scheme.len()..];
    let end = rest.find('/').unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|e| panic!("no address in {line:?}: {e}"))
}

/// Opens a WebSocket connection to `url` with a read timeout of [`patience`].
pub fn connect(url: &str) -> Ws {
    let (socket, _) =
        tungstenite::connect(url).unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    if let MaybeTlsStream::Plain(tcp) = socket.get_ref() {
        tcp.set_read_timeout(Some(patience())).unwrap();
    }
    socket
}

/// The client's local address: the server knows the connection by it.
pub fn local_addr(ws: &Ws) -> SocketAddr {
    let MaybeTlsStream::Plain(tcp) = ws.get_ref() else {
        panic!("tests use plain TCP")
    };
    tcp.local_addr().unwrap()
}

/// A loopback address that refuses connections: a socket bound to it that never listens,
/// so the port stays reserved (no other test can take it) while the socket lives.
pub fn refusing_addr() -> (socket2::Socket, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (socket, addr)
}

/// `n` bytes of valid UTF-8 mixing 1- to 4-byte characters (period 104 characters, so
/// not aligned with any power-of-two buffer size).
pub fn text_payload(n: usize) -> String {
    const CHARS: [char; 8] = ['a', 'é', '€', '😀', 'Z', 'ß', '中', '\n'];
    let mut text = String::with_capacity(n);
    for i in 0.. {
        let c = CHARS[(i * 7 + i / 13) % CHARS.len()];
        if text.len() + c.len_utf8() > n {
            break;
        }
        text.push(c);
    }
    while text.len() < n {
        text.push('.');
    }
    text
}

/// `n` bytes covering every byte value (for n >= 256), not repeating with period 256.
pub fn binary_payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8).collect()
}

/// A message for a failure text: its type and size, not megabytes of payload.
pub fn describe(message: &Message) -> String {
    match message {
        Message::Text(t) => format!("Text({} bytes)", t.len()),
        Message::Binary(b) => format!("Binary({} bytes)", b.len()),
        other => format!("{other:?}"),
    }
}

/// The next message that is not a ping (servers with keepalive on send them at any time;
/// tungstenite answers them).
pub fn read_skipping_pings(ws: &mut Ws) -> Result<Message, WsError> {
    loop {
        match ws.read() {
            Ok(Message::Ping(_)) => {}
            other => return other,
        }
    }
}

/// Sends a text and a binary message of `size` bytes and checks both come back
/// byte-exact, typed right.
pub fn assert_echo(ws: &mut Ws, size: usize) {
    let text = text_payload(size);
    ws.send(Message::text(text.clone())).unwrap();
    match read_skipping_pings(ws) {
        Ok(Message::Text(echo)) => assert!(
            echo.as_str() == text,
            "text echo of {size} bytes differs ({} bytes back)",
            echo.len()
        ),
        other => panic!("sent {size} bytes of text, got {other:?}"),
    }
    let binary = binary_payload(size);
    ws.send(Message::binary(binary.clone())).unwrap();
    match read_skipping_pings(ws) {
        Ok(Message::Binary(echo)) => assert!(
            echo[..] == binary[..],
            "binary echo of {size} bytes differs ({} bytes back)",
            echo.len()
        ),
        Ok(other) => panic!("sent {size} bytes of binary, got {}", describe(&other)),
        Err(error) => panic!("sent {size} bytes of binary, got error {error}"),
    }
}

/// Reads until a Close frame arrives and returns it (tungstenite queues the reply).
pub fn read_close(ws: &mut Ws) -> CloseFrame {
    match read_skipping_pings(ws) {
        Ok(Message::Close(Some(frame))) => frame,
        Ok(other) => panic!("expected a Close frame, got {}", describe(&other)),
        Err(error) => panic!("expected a Close frame, got error {error}"),
    }
}

/// After the close handshake, the next read sends any queued reply and sees the end.
pub fn assert_closed(ws: &mut Ws) {
    match ws.read() {
        Err(WsError::ConnectionClosed) => {}
        Ok(message) => panic!("expected the connection to end, got {}", describe(&message)),
        Err(error) => panic!("expected ConnectionClosed, got error {error}"),
    }
}

/// Closes from the client side with 1000 and waits for the handshake to finish.
pub fn close_normally(mut ws: Ws) {
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
    .unwrap();
    let frame = read_close(&mut ws);
    assert_eq!(frame.code, CloseCode::Normal);
    assert_closed(&mut ws);
}

/// Sends raw bytes to `addr` and returns everything received until the peer closes.
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(patience())).unwrap();
    tcp.write_all(request).unwrap();
    let mut response = Vec::new();
    let _ = tcp.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

/// `GET path` over HTTP/1.1; returns the status code and the whole response.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = raw_exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response)
}

/// Reads metric `name` from the `/metrics` endpoint at `addr`. A labelled series is
/// named as Prometheus prints it, labels sorted: `x{code="1000",reason="peer_close"}`.
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    try_metric(addr, name).unwrap_or_else(|| panic!("no metric {name} at http://{addr}/metrics"))
}

/// The sum of every series of metric `name` (all its label values).
pub fn metric_sum(addr: SocketAddr, name: &str) -> f64 {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Like [`metric`], `None` when the series is not (yet) there.
pub fn try_metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Polls `condition` until it holds; panics with `what` after [`patience`].
pub fn wait_until(what: &str, condition: impl FnMut() -> bool) {
    wait_within(what, Duration::from_secs(10), condition);
}

impl Proc {
    /// Like [`Proc::start`], with extra environment variables set for the child.
    pub fn start_with_env(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::spawn(&[], bin, args, env)
    }

    /// Like [`Proc::start`], inside network namespace `netns` (`ip netns exec`, which execs
    /// the binary: the process is the binary itself).
    pub fn start_in(netns: &str, bin: &str, args: &[&str]) -> Proc {
        Proc::start_wrapped(&["ip", "netns", "exec", netns], bin, args)
    }

    /// Like [`Proc::start`], through `wrapper` (a command that execs the binary, such as
    /// `prlimit --nofile=64:64`): the process is the binary itself.
    pub fn start_wrapped(wrapper: &[&str], bin: &str, args: &[&str]) -> Proc {
        Proc::spawn(wrapper, bin, args, &[])
    }

    /// Like [`Proc::start_wrapped`], for the binary at `path` (a copy, say).
    pub fn start_command(wrapper: &[&str], path: &str, args: &[&str]) -> Proc {
        Proc::run(wrapper, path, args, &[])
    }

    fn spawn(wrapper: &[&str], bin: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::run(wrapper, &binary(bin), args, env)
    }

    fn run(wrapper: &[&str], path: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(path);
                command
            }
            None => Command::new(path),
        };
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {path}: {e}"));
        let output = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        collect(child.stdout.take().unwrap(), output.clone());
        collect(child.stderr.take().unwrap(), output.clone());
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        Proc {
            name: format!("{} {path} {}", env.join(" "), args.join(" ")),
            child,
            output,
        }
    }
}

/// The binary `bin` (`"server"` or `"client"`) to run: from `$WEBSOCKET_TEST_BIN_DIR` when
/// set (the fault tests run against the release build that way), else the one cargo built
/// for these tests.
pub fn binary(bin: &str) -> String {
    let built = match bin {
        "server" => env!("CARGO_BIN_EXE_server"),
        "client" => env!("CARGO_BIN_EXE_client"),
        other => panic!("unknown binary {other}"),
    };
    match std::env::var_os("WEBSOCKET_TEST_BIN_DIR") {
        Some(dir) => {
            let path = std::path::Path::new(&dir).join(bin);
            assert!(
                path.is_file(),
                "WEBSOCKET_TEST_BIN_DIR has no {bin}: {}",
                path.display()
            );
            path.to_string_lossy().into_owned()
        }
        None => built.to_owned(),
    }
}

impl Server {
    /// Like [`Server::start`], with extra environment variables for the server process.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut args = vec!["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"];
        args.extend_from_slice(extra);
        let proc = Proc::start_with_env("server", &args, env);
        // `wss://` under --tls-cert.
        let listening = proc.wait_for("Listening on ", patience());
        let addr = address_after(&listening, "://");
        let metrics = address_after(&proc.wait_for("Metrics on http://", patience()), "http://");
        Server {
            proc,
            addr,
            metrics,
        }
    }
}

// ----------------------------------------------------------------------------------------
// Raw WebSocket over a plain TcpStream: hand-made upgrades, arbitrary client frames, and
// server frames read byte by byte (for inputs tungstenite's client refuses to produce).
// ----------------------------------------------------------------------------------------

/// The RFC 6455 sample key and the `Sec-WebSocket-Accept` value that answers it.
pub const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// `Sec-WebSocket-Accept` for [`SAMPLE_KEY`].
pub const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// The mask [`masked_frame`] uses.
pub const FRAME_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A complete, valid upgrade request for `/ws` with [`SAMPLE_KEY`].
pub fn upgrade_request() -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {SAMPLE_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Sends [`upgrade_request`] on a connected socket and reads the 101 head byte by byte (so
/// nothing after it is consumed); returns the socket with a read timeout of [`patience`].
pub fn upgrade_on(mut tcp: TcpStream) -> TcpStream {
    tcp.set_read_timeout(Some(patience())).unwrap();
    tcp.write_all(upgrade_request().as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tcp.read(&mut byte).unwrap_or_else(|e| {
            panic!(
                "upgrade: read failed after {:?}: {e}",
                String::from_utf8_lossy(&head)
            )
        });
        assert_eq!(
            n,
            1,
            "connection ended during the upgrade: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.contains(&format!("Sec-WebSocket-Accept: {SAMPLE_ACCEPT}\r\n")),
        "{head}"
    );
    tcp
}

/// Connects to `addr` and upgrades by hand (see [`upgrade_on`]).
pub fn raw_upgrade(addr: SocketAddr) -> TcpStream {
    upgrade_on(TcpStream::connect(addr).unwrap())
}

/// Encodes a client frame: `byte0` goes out verbatim (FIN, RSV1-3, opcode); the length
/// field says `declared` (default: the payload's length) in the shortest form that holds
/// it; the payload is masked with `mask` when one is given (a client must mask).
pub fn encode_frame(
    byte0: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
    declared: Option<u64>,
) -> Vec<u8> {
    let len = declared.unwrap_or(payload.len() as u64);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.push(byte0);
    if len < 126 {
        frame.push(mask_bit | len as u8);
    } else if len <= u64::from(u16::MAX) {
        frame.push(mask_bit | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(mask_bit | 127);
        frame.extend_from_slice(&len.to_be_bytes());
    }
    match mask {
        Some(mask) => {
            frame.extend_from_slice(&mask);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => frame.extend_from_slice(payload),
    }
    frame
}

/// A client frame masked with [`FRAME_MASK`], its length field telling the truth.
pub fn masked_frame(byte0: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(byte0, payload, Some(FRAME_MASK), None)
}

/// Reads one server frame (which must be unmasked): (first header byte, payload).
pub fn read_frame(tcp: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 2];
    tcp.read_exact(&mut header)?;
    assert_eq!(header[1] & 0x80, 0, "server frames must not be masked");
    let len = match header[1] & 0x7f {
        126 => {
            let mut ext = [0u8; 2];
            tcp.read_exact(&mut ext)?;
            u64::from(u16::from_be_bytes(ext))
        }
        127 => {
            let mut ext = [0u8; 8];
            tcp.read_exact(&mut ext)?;
            u64::from_be_bytes(ext)
        }
        short => u64::from(short),
    };
    assert!(len <= 64 << 20, "implausible server frame length {len}");
    let mut payload = vec![0u8; len as usize];
    tcp.read_exact(&mut payload)?;
    Ok((header[0], payload))
}

/// The status code at the start of a Close frame's payload.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*payload.first()?, *payload.get(1)?]))
}

/// The names of the threads of process `pid` (one entry per thread, duplicates kept).
pub fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_owned())
        .collect()
}

/// Connects to `url`, checks one echo and closes cleanly: the server still serves.
pub fn assert_serves(url: &str) {
    let mut ws = connect(url);
    assert_echo(&mut ws, 17);
    close_normally(ws);
}

/// Polls, without consuming anything (so the server sees a client that does not read),
/// until the bytes waiting on `tcp` satisfy `enough`; returns when that was seen.
pub fn wait_for_buffered(
    tcp: &TcpStream,
    what: &str,
    mut enough: impl FnMut(&[u8]) -> bool,
) -> Instant {
    let mut buf = vec![0u8; 64 << 10];
    tcp.set_nonblocking(true).unwrap();
    wait_within(what, Duration::from_secs(10), || match tcp.peek(&mut buf) {
        Ok(n) if enough(&buf[..n]) => true,
        Ok(0) => panic!("{what}: the connection ended first"),
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("{what}: {e}"),
    });
    let seen = Instant::now();
    tcp.set_nonblocking(false).unwrap();
    seen
}

// ----------------------------------------------------------------------------------------
// Hand-made upgrades with extra bytes in front (a PROXY header) or extra headers, and the
// response head they get (access control, subprotocols, client addresses).
// ----------------------------------------------------------------------------------------

/// [`upgrade_request`] with `extra` header lines (each ending in CRLF) before the blank line.
pub fn upgrade_request_with(extra: &str) -> String {
    let request = upgrade_request();
    let head = request.strip_suffix("\r\n").unwrap();
    format!("{head}{extra}\r\n")
}

/// A response head as received: the status and the header lines.
#[derive(Debug)]
pub struct Head {
    /// The status code; 0 when the connection ended before a status line.
    pub status: u16,
    /// The whole head as text (empty when nothing came).
    pub text: String,
}

impl Head {
    /// The value of header `name` (case ignored), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.text.split("\r\n").skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// Sends `bytes` on a new connection to `addr` and reads the response head byte by byte
/// (nothing after it is consumed, so the socket can go on as a WebSocket after a 101).
/// The head is empty when the server closed without answering.
pub fn send_for_head(addr: SocketAddr, bytes: &[u8]) -> (TcpStream, Head) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(patience())).unwrap();
    // The server may close before taking everything (a refused PROXY header).
    let _ = tcp.write_all(bytes);
    let head = read_head(&mut tcp);
    (tcp, head)
}

/// Reads a response head byte by byte until the blank line, or until the server closes.
pub fn read_head(tcp: &mut TcpStream) -> Head {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "reading a response head: {e} after {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Head { status, text }
}

/// A loopback port that was free a moment ago, for programs that cannot bind port 0
/// themselves (nginx): bound to 127.0.0.1:0, read back and released. Another process may
/// take it before the program binds it, so callers retry with a new one on a clash.
pub fn free_loopback_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// `program` as found on `PATH` or in the sbin directories a non-root `PATH` may lack
/// (Debian installs nginx as `/usr/sbin/nginx`).
pub fn find_program(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(std::path::PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// An external program a test needs (nginx, prometheus): the path in the environment variable
/// `path_var` if set; else the first of `candidates` that exists; else `program` as
/// [`find_program`] finds it. Missing, the test fails with `install` as advice, unless outside
/// CI one of the variables `skip_vars` is `1`: then `None`, said loudly on stderr, and the test
/// skips.
pub fn external_program(
    program: &str,
    path_var: &str,
    candidates: &[std::path::PathBuf],
    skip_vars: &[&str],
    install: &str,
) -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os(path_var) {
        let path = std::path::PathBuf::from(path);
        assert!(path.is_file(), "{path_var}={path:?} is not a file");
        return Some(path);
    }
    if let Some(path) = candidates.iter().find(|path| path.is_file()) {
        return Some(path.clone());
    }
    if let Some(path) = find_program(program) {
        return Some(path);
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    if let Some(skip_var) = skip_vars
        .iter()
        .find(|var| std::env::var(var).as_deref() == Ok("1"))
    {
        assert!(
            !ci,
            "{program} is not installed and CI is set: {skip_var} is not honoured in CI; {install}"
        );
        // Straight to stderr: the test harness captures eprintln! of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!! SKIPPED: {program} is not installed and {skip_var}=1: a test that needs it \
             did not run; {install}\n"
        );
        return None;
    }
    panic!("{program} is not installed: {install}");
}

/// Stops a daemon started as `child` (nginx's master, Prometheus): SIGTERM, and if it is
/// still there after [`patience`], SIGKILL to it and the children it had when asked to stop.
pub fn stop_daemon(child: &mut Child) {
    let pid = child.id();
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    kill(&pid.to_string(), "TERM");
    let deadline = Instant::now() + patience();
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10)); // polling interval
    }
    if child.try_wait().ok().flatten().is_none() {
        for other in children.split_whitespace() {
            kill(other, "KILL");
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn kill(pid: &str, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid)
        .stderr(Stdio::null())
        .status();
}
