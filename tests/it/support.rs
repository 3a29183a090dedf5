//! Helpers: run the built binaries, read their logs, talk HTTP and WebSocket to them.
//! Every wait has a deadline, and a failing wait panics with everything the process said.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::stream::MaybeTlsStream;
use tungstenite::WebSocket;

/// Generous upper bound for things that normally take milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(10);

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
        let path = match bin {
            "server" => env!("CARGO_BIN_EXE_server"),
            "client" => env!("CARGO_BIN_EXE_client"),
            other => panic!("unknown binary {other}"),
        };
        let mut child = Command::new(path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {path}: {e}"));
        let output = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        collect(stdout, output.clone());
        collect(stderr, output.clone());
        Proc {
            name: format!("{bin} {}", args.join(" ")),
            child,
            output,
        }
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
            .map(|d| d.count())
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
        let mut args = vec!["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"];
        args.extend_from_slice(extra);
        let proc = Proc::start("server", &args);
        let addr = address_after(&proc.wait_for("Listening on ws://", PATIENCE), "ws://");
        let metrics = address_after(&proc.wait_for("Metrics on http://", PATIENCE), "http://");
        Server {
            proc,
            addr,
            metrics,
        }
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
        let deadline = Instant::now() + PATIENCE;
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

/// Opens a WebSocket connection to `url` with a read timeout of [`PATIENCE`].
pub fn connect(url: &str) -> Ws {
    let (socket, _) =
        tungstenite::connect(url).unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    if let MaybeTlsStream::Plain(tcp) = socket.get_ref() {
        tcp.set_read_timeout(Some(PATIENCE)).unwrap();
    }
    socket
}

/// Sends raw bytes to `addr` and returns everything received until the peer closes.
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(PATIENCE)).unwrap();
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

/// Reads metric `name` from the `/metrics` endpoint at `addr`.
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
}

/// Polls `condition` every 10 ms until it holds; panics with `what` after [`PATIENCE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

impl Proc {
    /// Like [`Proc::start`], with extra environment variables set for the child.
    pub fn start_with_env(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let path = match bin {
            "server" => env!("CARGO_BIN_EXE_server"),
            "client" => env!("CARGO_BIN_EXE_client"),
            other => panic!("unknown binary {other}"),
        };
        let mut child = Command::new(path)
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
            name: format!("{} {bin} {}", env.join(" "), args.join(" ")),
            child,
            output,
        }
    }
}

impl Server {
    /// Like [`Server::start`], with extra environment variables for the server process.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut args = vec!["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"];
        args.extend_from_slice(extra);
        let proc = Proc::start_with_env("server", &args, env);
        let addr = address_after(&proc.wait_for("Listening on ws://", PATIENCE), "ws://");
        let metrics = address_after(&proc.wait_for("Metrics on http://", PATIENCE), "http://");
        Server {
            proc,
            addr,
            metrics,
        }
    }
}
