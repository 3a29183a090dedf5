//! Command-line and environment configuration of the server and the client.
//!
//! Every flag has an environment-variable twin (`WEBSOCKET_TEST_*`); a flag wins over its
//! variable. Durations are written as in Go, `250ms`, `15s`, `1m30s`, `1.5s`, `2h` (a bare
//! number means seconds); sizes are bytes, optionally with a `KiB`/`MiB`/`GiB` (or
//! `K`/`M`/`G`) suffix. [`parse_or_exit`] reads both and names the variable a bad value came
//! from.

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Command, Parser};
use log::LevelFilter;

/// Port the server accepts WebSocket upgrades on.
pub const DEFAULT_PORT: u16 = 3003;
/// Port the server serves Prometheus metrics on.
pub const DEFAULT_METRICS_PORT: u16 = 9100;
/// Path that accepts WebSocket upgrades.
pub const DEFAULT_PATH: &str = "/ws";
/// Largest message (and frame) the server accepts; Autobahn's 9.* cases send 16 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 << 20;
/// Smallest `--message-size`: a load message's header (connection id, sequence, checksum).
pub const MIN_MESSAGE_SIZE: usize = 16;
/// Longest duration accepted, about 584 million years: an `Instant` plus this cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_millis(u64::MAX);

/// Configuration of the `server` binary.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "server",
    version,
    about = "WebSocket echo server with Prometheus metrics",
    long_about = "WebSocket echo server with Prometheus metrics.\n\n\
                  Accepts WebSocket upgrades on ws://HOST:PORT/ws and echoes every message; \
                  serves /metrics on the metrics port. Durations are written like 15s, 1m30s, \
                  1.5s or 250ms; a bare number is seconds."
)]
pub struct ServerConfig {
    /// Address to listen on (IPv4 or IPv6, e.g. 0.0.0.0 or ::), or a host name whose first
    /// address is used (e.g. localhost)
    #[arg(long, env = "WEBSOCKET_TEST_HOST", default_value = "0.0.0.0", value_parser = parse_host)]
    pub host: IpAddr,

    /// WebSocket port (0 picks a free port)
    #[arg(long, env = "WEBSOCKET_TEST_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,

    /// Path that accepts WebSocket upgrades
    #[arg(long, env = "WEBSOCKET_TEST_PATH", default_value = DEFAULT_PATH, value_parser = parse_path)]
    pub path: String,

    /// Prometheus metrics port, served on the same address (0 picks a free port)
    #[arg(long, env = "WEBSOCKET_TEST_METRICS_PORT", default_value_t = DEFAULT_METRICS_PORT)]
    pub metrics_port: u16,

    /// How often to log "Active connections: N"
    #[arg(long, env = "WEBSOCKET_TEST_LOG_INTERVAL", default_value = "30s", value_parser = parse_interval)]
    pub log_interval: Duration,

    /// How long shutdown waits for clients to answer the Close frame
    #[arg(long, env = "WEBSOCKET_TEST_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_interval)]
    pub shutdown_timeout: Duration,

    /// On SIGTERM, keep serving this long with /readyz answering 503 before closing
    /// connections, so load balancers stop sending new ones first [default: 0]
    #[arg(long, env = "WEBSOCKET_TEST_DRAIN_DELAY", default_value = "0", value_parser = parse_duration)]
    pub drain_delay: Duration,

    /// Time a client has to send its complete upgrade request
    #[arg(long, env = "WEBSOCKET_TEST_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_interval)]
    pub handshake_timeout: Duration,

    /// A write that makes no progress for this long closes the connection
    #[arg(long, env = "WEBSOCKET_TEST_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_interval)]
    pub write_timeout: Duration,

    /// Largest message accepted; a larger one closes the connection with 1009
    #[arg(long, env = "WEBSOCKET_TEST_MAX_MESSAGE_SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub max_message_size: usize,

    /// Largest single frame accepted; a larger one closes the connection with 1009
    #[arg(long, env = "WEBSOCKET_TEST_MAX_FRAME_SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub max_frame_size: usize,

    /// Most connections held at once; beyond it new ones get 503 [default: what the OS
    /// limits allow, computed at start-up and logged]
    #[arg(long, env = "WEBSOCKET_TEST_MAX_CONNECTIONS", value_parser = parse_max_connections)]
    pub max_connections: Option<u64>,

    /// Send each client a ping this often [default: off]
    #[arg(long, env = "WEBSOCKET_TEST_SERVER_PING_INTERVAL", value_parser = parse_interval)]
    pub server_ping_interval: Option<Duration>,

    /// Close a connection that sends nothing (no message, no pong) for this long
    /// [default: off; twice the server ping interval when that is set]
    #[arg(long, env = "WEBSOCKET_TEST_IDLE_TIMEOUT", value_parser = parse_interval)]
    pub idle_timeout: Option<Duration>,

    /// Serve wss:// with this certificate chain (PEM); the file is re-read when it changes
    /// (new connections get the new certificate) [default: plain ws://]
    #[arg(long, env = "WEBSOCKET_TEST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1)
    #[arg(long, env = "WEBSOCKET_TEST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates issued by this CA (PEM): mutual TLS
    #[arg(long, env = "WEBSOCKET_TEST_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Log level: off, error, warn, info, debug or trace
    #[arg(long, env = "WEBSOCKET_TEST_LOG_LEVEL", default_value = "info", value_parser = parse_log_level)]
    pub log_level: LevelFilter,
}

impl ServerConfig {
    /// `ws` or `wss`, as the server is configured.
    pub fn scheme(&self) -> &'static str {
        if self.tls_cert.is_some() {
            "wss"
        } else {
            "ws"
        }
    }

    /// The idle timeout in force: the flag, else twice the server ping interval, else none.
    pub fn effective_idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
            .or(self.server_ping_interval.map(|interval| interval * 2))
    }
}

/// Configuration of the `client` binary.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "client",
    version,
    about = "Holds WebSocket connections open: pings, detects dead connections, reconnects",
    long_about = "Holds one or more WebSocket connections to a server unattended: pings every \
                  --ping-interval, declares a connection dead when no pong arrives within \
                  --pong-timeout, and reconnects --reconnect-delay after any loss. \
                  Durations are written like 15s, 1m30s, 1.5s or 250ms; a bare number is seconds."
)]
pub struct ClientConfig {
    /// Server URL, `ws://HOST[:PORT]/PATH[?QUERY]` or `wss://...`: instead of --host, --port,
    /// --path and --tls
    #[arg(long, env = "WEBSOCKET_TEST_URL", value_parser = parse_url,
          conflicts_with_all = ["host", "port", "path", "tls"])]
    pub url: Option<Target>,

    /// Server host name or IP address (no scheme, port or path: see --url)
    #[arg(long, env = "WEBSOCKET_TEST_HOST", default_value = "localhost", value_parser = parse_client_host)]
    pub host: String,

    /// Server port
    #[arg(long, env = "WEBSOCKET_TEST_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,

    /// Path of the WebSocket endpoint
    #[arg(long, env = "WEBSOCKET_TEST_PATH", default_value = DEFAULT_PATH, value_parser = parse_path)]
    pub path: String,

    /// Connect with TLS (wss://)
    #[arg(long, env = "WEBSOCKET_TEST_TLS")]
    pub tls: bool,

    /// wss: also trust the CA certificates in this PEM file (repeatable; the built-in
    /// Mozilla roots stay trusted unless --no-builtin-roots)
    #[arg(long, env = "WEBSOCKET_TEST_CA_FILE", value_delimiter = ',')]
    pub ca_file: Vec<PathBuf>,

    /// wss: trust only the --ca-file certificates
    #[arg(long, env = "WEBSOCKET_TEST_NO_BUILTIN_ROOTS", requires = "ca_file")]
    pub no_builtin_roots: bool,

    /// wss: present this client certificate chain (PEM) for mutual TLS
    #[arg(long, env = "WEBSOCKET_TEST_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,

    /// wss: the private key of --client-cert (PEM)
    #[arg(long, env = "WEBSOCKET_TEST_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,

    /// wss: the name sent as SNI and checked in the server's certificate [default: the
    /// host], for connecting by IP address or through a tunnel
    #[arg(long, env = "WEBSOCKET_TEST_TLS_SERVER_NAME", value_parser = parse_client_host)]
    pub tls_server_name: Option<String>,

    /// wss: accept any server certificate (the connection is encrypted, not authenticated;
    /// logged at WARN on every connect)
    #[arg(long, env = "WEBSOCKET_TEST_INSECURE")]
    pub insecure: bool,

    /// Send this request header with every upgrade, e.g. 'X-Team: sre' (repeatable; in
    /// the environment, one header per line). Replaces the client's own Host or User-Agent;
    /// Upgrade, Connection and the Sec-WebSocket-* headers cannot be set
    #[arg(long, value_name = "NAME: VALUE", env = "WEBSOCKET_TEST_HEADER",
          value_parser = parse_header_list)]
    pub header: Vec<HeaderList>,

    /// Send this Origin header, e.g. `https://app.example.com` [default: none]
    #[arg(long, env = "WEBSOCKET_TEST_ORIGIN", value_parser = parse_origin)]
    pub origin: Option<String>,

    /// Offer this subprotocol (repeatable, in order of preference; in the environment,
    /// comma-separated). The one the server picks is logged; a server picking one not
    /// offered fails the handshake
    #[arg(long = "subprotocol", value_name = "NAME", env = "WEBSOCKET_TEST_SUBPROTOCOL",
          value_delimiter = ',', value_parser = parse_subprotocol)]
    pub subprotocols: Vec<String>,

    /// Send 'Authorization: Bearer TOKEN' with every upgrade (never logged)
    #[arg(long, value_name = "TOKEN", env = "WEBSOCKET_TEST_AUTH_TOKEN", hide_env_values = true,
          value_parser = Quiet(parse_token), conflicts_with = "auth_token_file")]
    pub auth_token: Option<Secret>,

    /// Like --auth-token, with the token read from this file on every connect, so a rotated
    /// Secret is picked up (surrounding whitespace is ignored)
    #[arg(long, value_name = "PATH", env = "WEBSOCKET_TEST_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Connect through this HTTP proxy with CONNECT, `http://[USER:PASSWORD@]HOST[:PORT]`
    /// (port 1080 when left out); an empty value connects directly [default: from
    /// https_proxy/HTTPS_PROXY for wss://, http_proxy/HTTP_PROXY for ws://]
    #[arg(long, value_name = "URL", env = "WEBSOCKET_TEST_PROXY", hide_env_values = true,
          value_parser = Quiet(parse_proxy))]
    pub proxy: Option<Proxy>,

    /// Hosts to reach without the proxy: a comma-separated list of names (each also
    /// matches its subdomains; a leading dot is ignored), IP addresses or CIDR ranges,
    /// optionally with :PORT; '*' means every host [default: no_proxy/NO_PROXY]
    #[arg(long, value_name = "LIST", env = "WEBSOCKET_TEST_NO_PROXY")]
    pub no_proxy: Option<String>,

    /// Number of connections to hold, each on its own thread
    #[arg(long, env = "WEBSOCKET_TEST_CONNECTIONS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub connections: u32,

    /// How often each connection sends a ping
    #[arg(long, env = "WEBSOCKET_TEST_PING_INTERVAL", default_value = "15s", value_parser = parse_interval)]
    pub ping_interval: Duration,

    /// A connection whose ping gets no pong within this time is declared dead
    #[arg(long, env = "WEBSOCKET_TEST_PONG_TIMEOUT", default_value = "10s", value_parser = parse_interval)]
    pub pong_timeout: Duration,

    /// How often each connection logs "Connection status: CONNECTED to ..."
    #[arg(long, env = "WEBSOCKET_TEST_STATUS_INTERVAL", default_value = "30s", value_parser = parse_interval)]
    pub status_interval: Duration,

    /// Wait after a lost connection (or a failed attempt) before connecting again; it
    /// doubles with each failure in a row, up to --reconnect-max-delay
    #[arg(long, env = "WEBSOCKET_TEST_RECONNECT_DELAY", default_value = "5s", value_parser = parse_interval)]
    pub reconnect_delay: Duration,

    /// The longest wait between attempts (`--reconnect-max-delay 5s` with
    /// `--reconnect-jitter 0` waits exactly --reconnect-delay every time)
    #[arg(long, env = "WEBSOCKET_TEST_RECONNECT_MAX_DELAY", default_value = "60s", value_parser = parse_interval)]
    pub reconnect_max_delay: Duration,

    /// Spread of each wait, as a fraction: 0.2 waits 80% to 120% of it, so connections cut
    /// together come back over a window, not in one wave
    #[arg(long, env = "WEBSOCKET_TEST_RECONNECT_JITTER", default_value = "0.2", value_parser = parse_fraction)]
    pub reconnect_jitter: f64,

    /// What keeps a connection alive: `ping` (a ping every --ping-interval, dead without a
    /// pong within --pong-timeout) or `none` (send nothing, only answer: to find how long a
    /// path lets a silent connection live)
    #[arg(
        long,
        env = "WEBSOCKET_TEST_KEEPALIVE",
        default_value = "ping",
        value_enum
    )]
    pub keepalive: Keepalive,

    /// Limit for the TCP connect plus the WebSocket handshake
    #[arg(long, env = "WEBSOCKET_TEST_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_interval)]
    pub connect_timeout: Duration,

    /// New connections per second while starting up [default: all at once]
    #[arg(long, env = "WEBSOCKET_TEST_RAMP", value_parser = clap::value_parser!(u32).range(1..))]
    pub ramp: Option<u32>,

    /// Load mode: each connection sends binary messages of this size (at least 16 bytes)
    /// and verifies every echo [default: off]
    #[arg(long, env = "WEBSOCKET_TEST_MESSAGE_SIZE", value_parser = parse_message_size)]
    pub message_size: Option<usize>,

    /// Load mode: time between messages per connection; 0 sends the next message as soon
    /// as the echo of the last one arrives (closed loop)
    #[arg(long, env = "WEBSOCKET_TEST_MESSAGE_INTERVAL", default_value = "0", value_parser = parse_duration)]
    pub message_interval: Duration,

    /// Load mode: close each connection normally after this many echoes and open a new one
    /// at once (connection churn) [default: never]
    #[arg(long, env = "WEBSOCKET_TEST_MESSAGES_PER_CONNECTION", value_parser = clap::value_parser!(u64).range(1..))]
    pub messages_per_connection: Option<u64>,

    /// How often to log the load summary (connections up, messages/s, round trips, errors)
    #[arg(long, env = "WEBSOCKET_TEST_REPORT_INTERVAL", default_value = "10s", value_parser = parse_interval)]
    pub report_interval: Duration,

    /// Stop after this long, as on SIGTERM, and log the final summary [default: run until
    /// signalled]
    #[arg(long, env = "WEBSOCKET_TEST_DURATION", value_parser = parse_interval)]
    pub duration: Option<Duration>,

    /// Instead of holding connections: find how long the path lets a silent connection
    /// live (hold one silent for growing periods, then ping), report it and exit
    #[arg(long, env = "WEBSOCKET_TEST_FIND_IDLE_TIMEOUT")]
    pub find_idle_timeout: bool,

    /// --find-idle-timeout: the first silence tried (it doubles until a connection dies)
    #[arg(long, env = "WEBSOCKET_TEST_FIND_IDLE_START", default_value = "10s", value_parser = parse_interval)]
    pub find_idle_start: Duration,

    /// --find-idle-timeout: stop doubling past this silence
    #[arg(long, env = "WEBSOCKET_TEST_FIND_IDLE_MAX", default_value = "1h", value_parser = parse_interval)]
    pub find_idle_max: Duration,

    /// --find-idle-timeout: stop once the limit is known this closely
    #[arg(long, env = "WEBSOCKET_TEST_FIND_IDLE_PRECISION", default_value = "1s", value_parser = parse_interval)]
    pub find_idle_precision: Duration,

    /// Serve the client's Prometheus metrics, /healthz, /readyz and /debug/connections on
    /// this port (0 picks a free one) [default: off]
    #[arg(long, env = "WEBSOCKET_TEST_METRICS_PORT")]
    pub metrics_port: Option<u16>,

    /// Address the metrics port listens on (with --metrics-port)
    #[arg(long, env = "WEBSOCKET_TEST_METRICS_HOST", default_value = "0.0.0.0", value_parser = parse_host)]
    pub metrics_host: IpAddr,

    /// Log level: off, error, warn, info, debug or trace
    #[arg(long, env = "WEBSOCKET_TEST_LOG_LEVEL", default_value = "info", value_parser = parse_log_level)]
    pub log_level: LevelFilter,
}

impl ClientConfig {
    /// Where to connect: `--url`, or `--host`, `--port`, `--path` and `--tls`.
    pub fn target(&self) -> Target {
        self.url.clone().unwrap_or_else(|| Target {
            tls: self.tls,
            host: self
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: self.port,
            path: self.path.clone(),
        })
    }

    /// The `--header` headers, in the order given.
    pub fn headers(&self) -> impl Iterator<Item = &Header> {
        self.header.iter().flat_map(|list| &list.0)
    }

    /// Whether any TLS-only flag is given.
    pub fn has_tls_options(&self) -> bool {
        !self.ca_file.is_empty()
            || self.client_cert.is_some()
            || self.tls_server_name.is_some()
            || self.insecure
    }
}

/// What the client sends to keep a connection alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Keepalive {
    /// A ping every --ping-interval; no pong within --pong-timeout ends the connection.
    Ping,
    /// Nothing: the client only answers the server's pings.
    None,
}

/// Where the client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `wss://` rather than `ws://`.
    pub tls: bool,
    /// Host name or IP address, without brackets.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Path and query, e.g. `/ws?room=1`.
    pub path: String,
}

impl Target {
    /// `HOST[:PORT]` as the Host header wants it: brackets around an IPv6 address, and the
    /// port left out when it is the scheme's default, as browsers do.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// `HOST:PORT` with the port always given, as a CONNECT request names its target.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Target {
    /// The URL, e.g. `wss://example.com/ws` or `ws://[::1]:3003/ws`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "wss" } else { "ws" };
        write!(f, "{scheme}://{}{}", self.authority(), self.path)
    }
}

/// A request header given with `--header`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The name, a token, as given.
    pub name: String,
    /// The value, without surrounding spaces.
    pub value: String,
}

/// The headers of one `--header` value: one per line (the environment variable holds them
/// all, one per line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderList(pub Vec<Header>);

/// A value that must never appear in logs or error messages (an auth token): its `Debug`
/// shows `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// `--proxy`: an HTTP proxy to tunnel through, or none at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proxy {
    /// Connect directly, whatever the environment says (an empty `--proxy`).
    Direct,
    /// Tunnel through this proxy with HTTP CONNECT.
    Http(ProxyUrl),
}

/// An HTTP proxy: `http://[USER[:PASSWORD]@]HOST[:PORT]`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Host name or IP address, without brackets.
    pub host: String,
    /// TCP port (1080 when the URL leaves it out, as curl does).
    pub port: u16,
    /// User name and password (percent-decoded), for `Proxy-Authorization: Basic`.
    pub credentials: Option<(String, Secret)>,
}

impl fmt::Display for ProxyUrl {
    /// `http://HOST:PORT`: never the credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = self.credentials.as_ref().map(|(user, _)| user.as_str());
        write!(f, "ProxyUrl({self}, user: {user:?})")
    }
}

/// Default port of a proxy URL without one (curl's).
pub const DEFAULT_PROXY_PORT: u16 = 1080;

/// Parses `ws://HOST[:PORT]/PATH[?QUERY]` or `wss://...` (port 80 or 443 when left out).
pub fn parse_url(text: &str) -> Result<Target, String> {
    let invalid = |why: &str| format!("invalid URL {text:?}: {why}");
    let (tls, rest) = if let Some(rest) = text.strip_prefix("wss://") {
        (true, rest)
    } else if let Some(rest) = text.strip_prefix("ws://") {
        (false, rest)
    } else if text.starts_with("http://") || text.starts_with("https://") {
        return Err(invalid("use ws:// or wss:// (the WebSocket schemes)"));
    } else {
        return Err(invalid("expected ws://HOST[:PORT]/PATH or wss://..."));
    };
    if text.contains(char::is_whitespace) || text.contains('#') {
        return Err(invalid("no spaces or fragments (#) allowed"));
    }
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.contains('@') {
        return Err(invalid("user names and passwords in the URL are not supported (use --header 'Authorization: ...')"));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| invalid("an IPv6 address needs its closing ']'"))?;
        host.parse::<Ipv6Addr>()
            .map_err(|_| invalid("not an IPv6 address between the brackets"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    let port = match port {
        Some(port) => port
            .parse()
            .map_err(|_| invalid("the port must be a number from 0 to 65535"))?,
        None if tls => 443,
        None => 80,
    };
    let path = match path {
        "" => "/".to_owned(),
        query if query.starts_with('?') => format!("/{query}"),
        path => path.to_owned(),
    };
    Ok(Target {
        tls,
        host: host.to_owned(),
        port,
        path,
    })
}

/// A host for the client: a name or an address, nothing more.
fn parse_client_host(text: &str) -> Result<String, String> {
    let hint = |what: &str| {
        format!("invalid host {text:?}: {what}; use --url ws://HOST:PORT/PATH (or wss://) to give a whole URL")
    };
    if text.contains("://") {
        return Err(hint("a host has no scheme"));
    }
    if text.contains(['/', '?', '#', '@']) || text.contains(char::is_whitespace) {
        return Err(hint("a host has no path, query or spaces"));
    }
    let unbracketed = text
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(text);
    if unbracketed.contains(':') && unbracketed.parse::<Ipv6Addr>().is_err() {
        return Err(hint("a host has no port (use --port)"));
    }
    if unbracketed.is_empty() {
        return Err(hint("empty"));
    }
    Ok(text.to_owned())
}

/// A value parser whose errors never repeat the value (clap's own do): for flags that may
/// carry a secret (a token, a proxy password), whose errors can end up in a pod's log.
#[derive(Clone)]
struct Quiet<F>(F);

impl<T, F> clap::builder::TypedValueParser for Quiet<F>
where
    F: Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    type Value = T;

    fn parse_ref(
        &self,
        command: &Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        let why = match value.to_str() {
            Some(text) => match (self.0)(text) {
                Ok(parsed) => return Ok(parsed),
                Err(why) => why,
            },
            None => "not valid UTF-8".to_owned(),
        };
        let flag = arg.and_then(clap::Arg::get_long).unwrap_or("value");
        let env = arg
            .and_then(clap::Arg::get_env)
            .and_then(std::ffi::OsStr::to_str)
            .map(|env| format!(" (or {env})"))
            .unwrap_or_default();
        let message =
            format!("invalid value for '--{flag}'{env} (not shown, as it may be secret): {why}");
        Err(command
            .clone()
            .error(clap::error::ErrorKind::ValueValidation, message))
    }
}

/// Whether `byte` may appear in an HTTP token (RFC 9110 §5.6.2): header names,
/// subprotocols.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

const TOKEN_CHARS: &str = "letters, digits and !#$%&'*+-.^_`|~";

/// A header value may hold anything but control characters (a tab aside): a CR or LF
/// would end the header and let the value inject others.
fn check_header_value(value: &str) -> Result<(), String> {
    match value.chars().find(|&c| c.is_control() && c != '\t') {
        Some(c) => Err(format!(
            "the value holds the control character {c:?} (no CR, LF or other control characters)"
        )),
        None => Ok(()),
    }
}

/// One or more `Name: value` headers, one per line (blank lines skipped, so an
/// environment variable may end in a newline).
fn parse_header_list(text: &str) -> Result<HeaderList, String> {
    text.split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .filter(|line| !line.trim().is_empty())
        .map(parse_header)
        .collect::<Result<_, _>>()
        .map(HeaderList)
}

/// A `Name: value` header that the handshake lets the user set.
fn parse_header(text: &str) -> Result<Header, String> {
    let invalid = |why: String| format!("invalid header {text:?}: {why}");
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| invalid("expected 'Name: value'".into()))?;
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(invalid(format!(
            "the name must be a token ({TOKEN_CHARS}), with no space before the ':'"
        )));
    }
    let value = value.trim_matches([' ', '\t']);
    check_header_value(value).map_err(invalid)?;
    let refused = match name.to_ascii_lowercase().as_str() {
        "upgrade" | "connection" | "sec-websocket-key" | "sec-websocket-version" => {
            "the WebSocket handshake sets it itself"
        }
        "sec-websocket-protocol" => "use --subprotocol, so the answer can be checked",
        "sec-websocket-extensions" => "the client negotiates no extensions",
        "content-length" | "transfer-encoding" => "an upgrade request has no body",
        _ => {
            return Ok(Header {
                name: name.to_owned(),
                value: value.to_owned(),
            })
        }
    };
    Err(invalid(format!("{name} cannot be set: {refused}")))
}

/// An Origin header value, e.g. `https://app.example.com`.
fn parse_origin(text: &str) -> Result<String, String> {
    let origin = text.trim();
    if origin.is_empty() {
        return Err("invalid origin: empty".into());
    }
    check_header_value(origin).map_err(|why| format!("invalid origin {text:?}: {why}"))?;
    Ok(origin.to_owned())
}

/// A subprotocol name: a token (RFC 6455 §4.1).
fn parse_subprotocol(text: &str) -> Result<String, String> {
    let name = text.trim();
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(format!(
            "invalid subprotocol {text:?}: a subprotocol is a non-empty token ({TOKEN_CHARS})"
        ));
    }
    Ok(name.to_owned())
}

/// Checks a bearer token (surrounding whitespace, such as a file's final newline, is
/// dropped) and returns it. Errors never include the token.
pub fn check_token(text: &str) -> Result<&str, String> {
    let token = text.trim();
    if token.is_empty() {
        Err("the token is empty".into())
    } else if token.contains(|c: char| c.is_whitespace() || c.is_control()) {
        Err("the token holds a space or a control character".into())
    } else {
        Ok(token)
    }
}

fn parse_token(text: &str) -> Result<Secret, String> {
    check_token(text).map(|token| Secret(token.to_owned()))
}

/// `--proxy`: a proxy URL (see [`parse_proxy_url`]), or empty for none.
fn parse_proxy(text: &str) -> Result<Proxy, String> {
    if text.trim().is_empty() {
        Ok(Proxy::Direct)
    } else {
        parse_proxy_url(text).map(Proxy::Http)
    }
}

/// Parses a proxy URL as curl reads one: `http://[USER[:PASSWORD]@]HOST[:PORT][/]`, the
/// scheme optional (http), the port 1080 when left out, user and password
/// percent-decoded. Errors never include the URL, which may hold a password.
pub fn parse_proxy_url(text: &str) -> Result<ProxyUrl, String> {
    let text = text.trim();
    let rest = match text.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "the scheme {scheme:?} is not supported: only http:// proxies (HTTP CONNECT)"
            ))
        }
        None => text,
    };
    if rest.contains(char::is_whitespace) {
        return Err("a proxy URL holds no spaces".into());
    }
    // What follows the authority (a path, usually "/") means nothing to a proxy.
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => (Some(userinfo), host_port),
        None => (None, authority),
    };
    let credentials = match userinfo {
        Some(userinfo) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            Some((percent_decode(user)?, Secret(percent_decode(password)?)))
        }
        None => None,
    };
    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or("an IPv6 address needs its closing ']'")?;
        host.parse::<Ipv6Addr>()
            .map_err(|_| "not an IPv6 address between the brackets")?;
        (host, after.strip_prefix(':'))
    } else {
        match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err("no proxy host".into());
    }
    let port = match port {
        Some(port) => port
            .parse()
            .ok()
            .filter(|&port| port != 0)
            .ok_or("the proxy port must be a number from 1 to 65535")?,
        None => DEFAULT_PROXY_PORT,
    };
    Ok(ProxyUrl {
        host: host.to_owned(),
        port,
        credentials,
    })
}

/// Decodes `%XX` escapes (a user name or password in a URL).
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = text
                .get(i + 1..i + 3)
                .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or("a '%' in the user or password must be followed by two hex digits")?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the user or password is not UTF-8 once decoded".into())
}

/// Parses a duration as Go writes them, `250ms`, `15s`, `1m30s`, `1.5s`, `2h`, `300us`
/// (also `ns`, `d` and the longer names `sec`, `min`, `hours`), or a bare number of seconds
/// (`15`, `0.5`), up to [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let invalid = |why: String| format!("invalid duration {text:?}: {why}");
    // humantime reads `M` as months; someone who types it almost surely means minutes.
    if text.contains('M') {
        return Err(invalid(
            "unknown unit \"M\" (use m for minutes, d for days)".into(),
        ));
    }
    let bare_number = !text.is_empty() && text.chars().all(|c| c.is_ascii_digit() || c == '.');
    let with_unit;
    let text_with_unit = if bare_number {
        with_unit = format!("{text}s");
        &with_unit
    } else {
        text
    };
    let duration = humantime::parse_duration(text_with_unit)
        .map_err(|error| invalid(explain_duration_error(text_with_unit, error)))?;
    if duration > MAX_DURATION {
        return Err(invalid("too large".into()));
    }
    Ok(duration)
}

/// What is wrong with `text`, in words that suggest the fix.
fn explain_duration_error(text: &str, error: humantime::DurationError) -> String {
    use humantime::DurationError as E;
    const UNITS: &str = "use ns, us, ms, s, m, h or d, e.g. 1m30s";
    match error {
        E::Empty | E::NumberExpected(_) => "expected a number such as 15s, 1.5s or 250ms".into(),
        E::InvalidCharacter(at) => match text.get(at..).and_then(|rest| rest.chars().next()) {
            Some(c) => format!("unexpected {c:?} (write e.g. 1.5s or 1m30s)"),
            None => "incomplete number (write e.g. 1.5s or 1m30s)".into(),
        },
        E::UnknownUnit { unit, value, .. } if unit.is_empty() => {
            format!("no unit after {value} ({UNITS})")
        }
        E::UnknownUnit { unit, .. } => format!("unknown unit {unit:?} ({UNITS})"),
        E::NumberOverflow => "too large, or finer than a nanosecond".into(),
    }
}

/// Parses a fraction from 0 to 1, e.g. `0.2`.
fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!(
            "invalid fraction {text:?}: expected a number from 0 to 1, such as 0.2"
        )),
    }
}

/// Parses a duration that must be greater than zero (an interval or a timeout).
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err(format!(
            "invalid duration {text:?}: must be greater than zero"
        )),
        duration => Ok(duration),
    }
}

/// Parses a byte count: `65536`, `64KiB`, `16MiB`, `1GiB` (`K`, `M`, `G` mean the same).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: usize = number
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected bytes such as 65536 or 16MiB"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        other => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {other:?} (use KiB, MiB or GiB)"
            ))
        }
    };
    match value.checked_mul(1 << shift) {
        Some(0) | None => Err(format!(
            "invalid size {text:?}: must be between 1 byte and {}",
            usize::MAX
        )),
        Some(bytes) => Ok(bytes),
    }
}

/// A load message size: a size of at least [`MIN_MESSAGE_SIZE`], the header.
fn parse_message_size(text: &str) -> Result<usize, String> {
    match parse_size(text)? {
        size if size < MIN_MESSAGE_SIZE => Err(format!(
            "invalid message size {text:?}: load messages need at least {MIN_MESSAGE_SIZE} bytes"
        )),
        size => Ok(size),
    }
}

/// An IP address (`0.0.0.0`, `::`, `[::1]`), or a host name resolved to its first address.
fn parse_host(text: &str) -> Result<IpAddr, String> {
    let unbracketed = text
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(text);
    if let Ok(address) = unbracketed.parse() {
        return Ok(address);
    }
    match (unbracketed, 0).to_socket_addrs() {
        Ok(mut addresses) => addresses
            .next()
            .map(|address| address.ip())
            .ok_or_else(|| format!("cannot resolve host {text:?}: it has no address")),
        Err(error) => Err(format!("cannot resolve host {text:?}: {error}")),
    }
}

/// A connection ceiling: a whole number of at least 1.
fn parse_max_connections(text: &str) -> Result<u64, String> {
    match text.parse() {
        Ok(0) => Err("must be at least 1; omit the flag to use the OS ceiling".into()),
        Ok(limit) => Ok(limit),
        Err(_) => Err(format!(
            "invalid number {text:?}: expected a whole number of connections such as 10000"
        )),
    }
}

/// A log level, in any case: `off`, `error`, `warn`, `info`, `debug` or `trace`.
fn parse_log_level(text: &str) -> Result<LevelFilter, String> {
    text.parse().map_err(|_| {
        format!("invalid log level {text:?}: use off, error, warn, info, debug or trace")
    })
}

/// Accepts an absolute request path such as `/ws`.
fn parse_path(text: &str) -> Result<String, String> {
    if text.starts_with('/') && !text.contains(char::is_whitespace) && !text.contains(['?', '#']) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "invalid path {text:?}: must start with '/' and hold no spaces, '?' or '#'"
        ))
    }
}

/// Parses the command line and the environment into `T`, or prints the error and exits as
/// [`Parser::parse`] does (2 for a bad value; 0 after `--help` or `--version`). An error
/// about a value from an environment variable names the variable, as a value the user never
/// typed on the command line is otherwise hard to trace.
pub fn parse_or_exit<T: Parser>() -> T {
    T::try_parse().unwrap_or_else(|error| {
        let args: Vec<OsString> = std::env::args_os().collect();
        let error = name_env_source(error, &T::command(), &args, |name| {
            std::env::var_os(name).is_some()
        });
        error.exit()
    })
}

/// `error`, reworded to name the environment variable when it reports a bad value of a flag
/// that is absent from `args` but whose variable is set (`env_is_set`).
fn name_env_source(
    error: clap::Error,
    command: &Command,
    args: &[OsString],
    env_is_set: impl Fn(&str) -> bool,
) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use std::error::Error as _;

    if error.kind() != ErrorKind::ValueValidation {
        return error;
    }
    let (Some(ContextValue::String(shown)), Some(ContextValue::String(value)), Some(cause)) = (
        error.get(ContextKind::InvalidArg),
        error.get(ContextKind::InvalidValue),
        error.source(),
    ) else {
        return error;
    };
    // `shown` is how clap names the argument, e.g. `--port <PORT>`.
    let flag = shown.split(' ').next().unwrap_or_default();
    let Some(env) = command
        .get_arguments()
        .find(|arg| {
            arg.get_long()
                .is_some_and(|long| flag == format!("--{long}"))
        })
        .and_then(|arg| arg.get_env())
        .and_then(|env| env.to_str())
    else {
        return error;
    };
    let on_command_line = args.iter().skip(1).any(|arg| {
        arg.to_str().is_some_and(|arg| {
            arg.strip_prefix(flag)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
        })
    });
    if on_command_line || !env_is_set(env) {
        return error;
    }
    let message =
        format!("invalid value '{value}' for '{shown}' (from environment variable {env}): {cause}");
    command.clone().error(ErrorKind::ValueValidation, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("200ms"), Ok(ms(200)));
        assert_eq!(parse_duration("15s"), Ok(ms(15_000)));
        assert_eq!(parse_duration("15"), Ok(ms(15_000)));
        assert_eq!(parse_duration(" 15s "), Ok(ms(15_000)));
        assert_eq!(parse_duration("2m"), Ok(ms(120_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("2h"), Ok(ms(7_200_000)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration("1h2m3s4ms"), Ok(ms(3_723_004)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1_500)));
        assert_eq!(parse_duration("1.5"), Ok(ms(1_500)));
        assert_eq!(parse_duration("0.25h"), Ok(ms(900_000)));
        assert_eq!(parse_duration("250ms"), Ok(ms(250)));
        assert_eq!(parse_duration("300us"), Ok(Duration::from_micros(300)));
        assert_eq!(parse_duration("300µs"), Ok(Duration::from_micros(300)));
        assert_eq!(parse_duration("10ns"), Ok(Duration::from_nanos(10)));
        assert_eq!(parse_duration("2d"), Ok(ms(172_800_000)));
        assert_eq!(
            parse_duration("5000000000000h"),
            Ok(Duration::from_secs(18_000_000_000_000_000))
        );
        for bad in [
            "",
            " ",
            "s",
            ".",
            "1.",
            ".5s",
            "1.2.3s",
            "-1s",
            "+1s",
            "1m30",
            "5M",
            "15S",
            "10 parsecs",
            "0.5ns",
            "99999999999999999999s",
            "18446744073709551615h",
            "18446744073709551616ms",
            "5200000000000h",
        ] {
            match parse_duration(bad) {
                Err(message) => assert!(message.starts_with("invalid duration"), "{message}"),
                Ok(duration) => panic!("{bad:?} should be rejected, got {duration:?}"),
            }
        }
        assert_eq!(
            parse_interval("0ms"),
            Err("invalid duration \"0ms\": must be greater than zero".into())
        );
        assert_eq!(parse_interval("1.5s"), Ok(ms(1_500)));
    }

    #[test]
    fn duration_errors_name_the_problem() {
        let error = |text| parse_duration(text).unwrap_err();
        assert!(error("5parsecs").contains("unknown unit \"parsecs\""));
        assert!(error("1m30").contains("no unit after 30"));
        assert!(error("5M").contains("m for minutes"));
        assert!(error("").contains("expected a number"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        for bad in ["", "0", "MiB", "1TiB", "-5", "1.5MiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(parse_host("0.0.0.0"), Ok(IpAddr::from([0, 0, 0, 0])));
        assert_eq!(parse_host("::1"), Ok("::1".parse().unwrap()));
        assert_eq!(parse_host("[::1]"), Ok("::1".parse().unwrap()));
        let localhost = parse_host("localhost").expect("localhost resolves");
        assert!(localhost.is_loopback(), "{localhost}");
        // A label longer than DNS allows (63 bytes): refused without asking a name server.
        let unresolvable = format!("{}.invalid", "x".repeat(64));
        let error = parse_host(&unresolvable).unwrap_err();
        assert!(
            error.starts_with(&format!("cannot resolve host \"{unresolvable}\": ")),
            "{error}"
        );
    }

    #[test]
    fn max_connections() {
        assert_eq!(parse_max_connections("1"), Ok(1));
        assert_eq!(
            parse_max_connections("0"),
            Err("must be at least 1; omit the flag to use the OS ceiling".into())
        );
        assert!(parse_max_connections("many").is_err());
    }

    #[test]
    fn log_levels() {
        assert_eq!(parse_log_level("debug"), Ok(LevelFilter::Debug));
        assert_eq!(parse_log_level("WARN"), Ok(LevelFilter::Warn));
        assert_eq!(parse_log_level("off"), Ok(LevelFilter::Off));
        assert_eq!(
            parse_log_level("verbose"),
            Err("invalid log level \"verbose\": use off, error, warn, info, debug or trace".into())
        );
    }

    #[test]
    fn message_sizes() {
        assert_eq!(parse_message_size("16"), Ok(MIN_MESSAGE_SIZE));
        assert!(parse_message_size("15").is_err());
    }

    /// A bad `--port` as clap reports it, run through [`name_env_source`] with `args` on the
    /// command line and `WEBSOCKET_TEST_PORT` set or not.
    fn port_error(args: &[&str], env_set: bool) -> String {
        use clap::CommandFactory;
        let error = ServerConfig::try_parse_from(["server", "--port", "notaport"]).unwrap_err();
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let error = name_env_source(error, &ServerConfig::command(), &args, |name| {
            env_set && name == "WEBSOCKET_TEST_PORT"
        });
        assert_eq!(error.exit_code(), 2);
        error.render().to_string()
    }

    #[test]
    fn errors_name_the_environment_variable_a_value_came_from() {
        let from_env = port_error(&["server"], true);
        assert!(
            from_env.starts_with(
                "error: invalid value 'notaport' for '--port <PORT>' \
                 (from environment variable WEBSOCKET_TEST_PORT): invalid digit"
            ),
            "{from_env}"
        );
        for (args, env_set) in [
            (&["server", "--port", "notaport"][..], true),
            (&["server", "--port=notaport"][..], true),
            (&["server"][..], false),
        ] {
            let message = port_error(args, env_set);
            assert!(
                message.starts_with("error: invalid value 'notaport' for '--port <PORT>': "),
                "{args:?}: {message}"
            );
        }
    }

    #[test]
    fn paths() {
        assert!(parse_path("/ws").is_ok());
        assert!(parse_path("ws").is_err());
        assert!(parse_path("/a b").is_err());
        assert!(parse_path("/ws?x=1").is_err());
    }

    #[test]
    fn targets_from_host_port_path_and_tls() {
        let target = |args: &[&str]| {
            let mut all = vec!["client"];
            all.extend_from_slice(args);
            ClientConfig::try_parse_from(all).map(|c| c.target().to_string())
        };
        assert_eq!(target(&[]).unwrap(), "ws://localhost:3003/ws");
        assert_eq!(target(&["--host", "::1"]).unwrap(), "ws://[::1]:3003/ws");
        assert_eq!(target(&["--host", "[::1]"]).unwrap(), "ws://[::1]:3003/ws");
        assert_eq!(
            target(&["--tls", "--port", "443", "--host", "lb.example.com"]).unwrap(),
            "wss://lb.example.com/ws"
        );
        assert_eq!(
            target(&["--url", "wss://lb.example.com:8443/echo?x=1"]).unwrap(),
            "wss://lb.example.com:8443/echo?x=1"
        );
        // --url and the parts it replaces cannot both be given.
        for extra in [["--host", "x"], ["--port", "1"], ["--path", "/p"]] {
            let mut args = vec!["--url", "ws://a/"];
            args.extend_from_slice(&extra);
            assert!(target(&args).is_err(), "{args:?}");
        }
        assert!(target(&["--url", "ws://a/", "--tls"]).is_err());
    }

    #[test]
    fn urls() {
        let parsed = |text| parse_url(text).map(|t| (t.tls, t.host, t.port, t.path));
        assert_eq!(
            parsed("ws://example.com"),
            Ok((false, "example.com".into(), 80, "/".into()))
        );
        assert_eq!(
            parsed("wss://example.com?room=1"),
            Ok((true, "example.com".into(), 443, "/?room=1".into()))
        );
        assert_eq!(
            parsed("ws://[::1]:3003/ws"),
            Ok((false, "::1".into(), 3003, "/ws".into()))
        );
        for (bad, says) in [
            ("http://example.com/ws", "ws:// or wss://"),
            ("example.com/ws", "expected ws://"),
            ("ws://:3003/ws", "no host"),
            ("ws://host:99999/ws", "port"),
            ("ws://[::1/ws", "']'"),
            ("ws://user:pw@host/ws", "user names"),
            ("ws://host/ws#x", "fragments"),
        ] {
            let error = parse_url(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn client_hosts_are_names_or_addresses_only() {
        for good in ["localhost", "10.0.0.1", "::1", "[::1]", "lb.example.com"] {
            assert!(parse_client_host(good).is_ok(), "{good}");
        }
        for bad in [
            "wss://lb.example.com",
            "lb.example.com:443",
            "lb.example.com/ws",
            "",
            "a b",
        ] {
            let error = parse_client_host(bad).unwrap_err();
            assert!(error.contains("--url"), "{bad}: {error}");
        }
    }

    fn client(args: &[&str]) -> Result<ClientConfig, String> {
        let mut all = vec!["client"];
        all.extend_from_slice(args);
        ClientConfig::try_parse_from(all).map_err(|e| e.render().to_string())
    }

    #[test]
    fn headers_are_tokens_with_clean_values() {
        let header = |name: &str, value: &str| Header {
            name: name.into(),
            value: value.into(),
        };
        assert_eq!(parse_header("X-Team: sre"), Ok(header("X-Team", "sre")));
        assert_eq!(parse_header("X-Empty:"), Ok(header("X-Empty", "")));
        assert_eq!(
            parse_header("Host:\tinternal:8443 "),
            Ok(header("Host", "internal:8443"))
        );
        assert_eq!(
            parse_header("X-Tab: a\tb: c"),
            Ok(header("X-Tab", "a\tb: c"))
        );
        for (bad, says) in [
            ("X-Team", "expected 'Name: value'"),
            (": x", "token"),
            ("X Team: x", "token"),
            ("X-Team : x", "no space before"),
            ("X(Team): x", "token"),
            ("X-A: a\rb", "control character '\\r'"),
            ("X-A: a\u{0}b", "control character"),
            ("Upgrade: h2c", "sets it itself"),
            ("connection: close", "sets it itself"),
            ("Sec-WebSocket-Key: x", "sets it itself"),
            ("SEC-WEBSOCKET-VERSION: 8", "sets it itself"),
            ("Sec-WebSocket-Protocol: chat", "--subprotocol"),
            (
                "Sec-WebSocket-Extensions: permessage-deflate",
                "no extensions",
            ),
            ("Content-Length: 5", "no body"),
        ] {
            let error = parse_header(bad).unwrap_err();
            assert!(error.contains(says), "{bad:?}: {error}");
        }
    }

    #[test]
    fn header_lists_hold_one_header_a_line() {
        // The environment variable's form, with CRLF and a final newline from a YAML block.
        let list = parse_header_list("X-A: 1\r\nX-B: 2\n\n").unwrap();
        let names: Vec<&str> = list.0.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["X-A", "X-B"]);
        assert_eq!(parse_header_list(""), Ok(HeaderList(Vec::new())));
        assert!(parse_header_list("X-A: 1\nnot a header").is_err());
        // A lone CR is not a line break: it stays in the value and is refused.
        assert!(parse_header_list("X-A: 1\rX-B: 2").is_err());
        let config = client(&["--header", "X-A: 1", "--header", "X-B: 2\nX-C: 3"]).unwrap();
        let names: Vec<&str> = config.headers().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["X-A", "X-B", "X-C"]);
    }

    #[test]
    fn refused_headers_exit_2_with_a_message() {
        let error =
            ClientConfig::try_parse_from(["client", "--header", "Upgrade: h2c"]).unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(
            error.to_string().contains("Upgrade cannot be set"),
            "{error}"
        );
    }

    #[test]
    fn subprotocols_and_origins() {
        let config = client(&[
            "--subprotocol",
            "chat, v2.chat",
            "--subprotocol",
            "mqtt",
            "--origin",
            " https://app.example.com ",
        ])
        .unwrap();
        assert_eq!(config.subprotocols, ["chat", "v2.chat", "mqtt"]);
        assert_eq!(config.origin.as_deref(), Some("https://app.example.com"));
        for bad in ["", "a b", "chat/1", "chat,"] {
            assert!(
                client(&["--subprotocol", bad]).is_err(),
                "subprotocol {bad:?}"
            );
        }
        assert!(parse_origin("").is_err());
        assert!(parse_origin("https://a\r\nX-Evil: 1").is_err());
    }

    #[test]
    fn tokens_conflict_and_are_never_shown() {
        let config = client(&["--auth-token", " s3cr3t\n"]).unwrap();
        assert_eq!(
            config.auth_token.as_ref().map(Secret::expose),
            Some("s3cr3t")
        );
        assert!(!format!("{config:?}").contains("s3cr3t"));
        let error = client(&["--auth-token", "t", "--auth-token-file", "/f"]).unwrap_err();
        assert!(error.contains("cannot be used with"), "{error}");
        for bad in ["", "two words", "a\u{1b}b"] {
            let error = client(&["--auth-token", bad]).unwrap_err();
            assert!(
                error.contains("'--auth-token' (or WEBSOCKET_TEST_AUTH_TOKEN)"),
                "{error}"
            );
            assert!(error.contains("not shown"), "{error}");
            if !bad.is_empty() {
                assert!(!error.contains(bad), "{error}");
            }
        }
        assert_eq!(check_token("abc.DEF-_~+/=\n"), Ok("abc.DEF-_~+/="));
    }

    #[test]
    fn proxy_urls_are_read_as_curl_reads_them() {
        let parsed = |text: &str| {
            parse_proxy_url(text).map(|p| {
                let credentials = p
                    .credentials
                    .map(|(user, password)| format!("{user}:{}", password.expose()));
                (p.host, p.port, credentials)
            })
        };
        assert_eq!(
            parsed("http://proxy:3128"),
            Ok(("proxy".into(), 3128, None))
        );
        assert_eq!(
            parsed("HTTP://proxy:3128/"),
            Ok(("proxy".into(), 3128, None))
        );
        assert_eq!(parsed("proxy.corp"), Ok(("proxy.corp".into(), 1080, None)));
        assert_eq!(parsed("10.0.0.1:8080"), Ok(("10.0.0.1".into(), 8080, None)));
        assert_eq!(parsed("http://[::1]:3128"), Ok(("::1".into(), 3128, None)));
        assert_eq!(
            parsed("http://us%40er:p%3Ass@proxy:3128"),
            Ok(("proxy".into(), 3128, Some("us@er:p:ss".into())))
        );
        assert_eq!(
            parsed("http://user@proxy:3128"),
            Ok(("proxy".into(), 3128, Some("user:".into())))
        );
        for (bad, says) in [
            ("https://proxy:443", "only http://"),
            ("socks5h://proxy:1080", "only http://"),
            ("http://:3128", "no proxy host"),
            ("http://proxy:0", "port"),
            ("http://proxy:http", "port"),
            ("http://[::1:3128", "']'"),
            ("http://u:%zz@proxy", "two hex digits"),
            ("http://u:%+1@proxy", "two hex digits"),
            ("http://pro xy", "no spaces"),
        ] {
            let error = parse_proxy_url(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
        // Neither the flag's errors nor the URL's Display or Debug show the password.
        let error = client(&["--proxy", "http://u:hunter2@proxy:99999"]).unwrap_err();
        assert!(
            error.contains("'--proxy' (or WEBSOCKET_TEST_PROXY)"),
            "{error}"
        );
        assert!(!error.contains("hunter2"), "{error}");
        let url = parse_proxy_url("http://u:hunter2@[::1]:3128").unwrap();
        assert_eq!(url.to_string(), "http://[::1]:3128");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert_eq!(client(&["--proxy", ""]).unwrap().proxy, Some(Proxy::Direct));
    }

    #[test]
    fn connect_targets_always_name_the_port() {
        assert_eq!(
            parse_url("wss://a.example/").unwrap().host_port(),
            "a.example:443"
        );
        assert_eq!(parse_url("ws://[::1]/").unwrap().host_port(), "[::1]:80");
    }

    #[test]
    fn cli_definitions_are_consistent() {
        use clap::CommandFactory;
        ServerConfig::command().debug_assert();
        ClientConfig::command().debug_assert();
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn durations_round_trip(value in 0u64..1_000_000, unit in prop_oneof!["us", "ms", "s", "m", "h", ""]) {
            let micros = match unit.as_str() {
                "us" => value,
                "ms" => value * 1_000,
                "m" => value * 60_000_000,
                "h" => value * 3_600_000_000,
                _ => value * 1_000_000,
            };
            prop_assert_eq!(parse_duration(&format!("{value}{unit}")), Ok(Duration::from_micros(micros)));
        }

        #[test]
        fn go_style_compound_and_fractional_durations(
            h in 0u64..100, m in 0u64..60, s in 0u64..60, millis in 0u64..1000,
        ) {
            let expected = Duration::from_millis(((h * 60 + m) * 60 + s) * 1000 + millis);
            prop_assert_eq!(parse_duration(&format!("{h}h{m}m{s}s{millis}ms")), Ok(expected));
            let seconds = Duration::from_millis(s * 1000 + millis);
            prop_assert_eq!(parse_duration(&format!("{s}.{millis:03}s")), Ok(seconds));
            prop_assert_eq!(parse_duration(&format!("{s}.{millis:03}")), Ok(seconds));
        }

        #[test]
        fn any_text_parses_or_explains(text in "\\PC{0,24}") {
            if let Err(message) = parse_duration(&text) {
                prop_assert!(message.starts_with("invalid duration"));
            }
            if let Err(message) = parse_size(&text) {
                prop_assert!(message.starts_with("invalid size"));
            }
        }
    }
}

#[cfg(test)]
mod corpus {
    use super::*;

    /// Replays the fuzzing corpus (fuzz/corpus/config) with the fuzz target's checks.
    #[test]
    fn fuzz_corpus_regressions() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/config");
        let mut replayed = 0;
        for entry in std::fs::read_dir(dir).expect("the corpus is in the repository") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let Ok(text) = std::str::from_utf8(&data) else {
                continue;
            };
            if let Err(message) = parse_duration(text) {
                assert!(
                    message.starts_with("invalid duration"),
                    "{text:?}: {message}"
                );
            }
            if let Err(message) = parse_size(text) {
                assert!(message.starts_with("invalid size"), "{text:?}: {message}");
            }
            replayed += 1;
        }
        // An empty or missing corpus must not pass silently (it holds 100+ inputs).
        assert!(replayed >= 50, "only {replayed} corpus inputs replayed");
    }
}
