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
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

    /// On SIGTERM, keep serving this long before closing connections: /readyz and GET /
    /// answer 503 and new upgrades get 503 with Retry-After, so load balancers and clients
    /// go elsewhere first; live connections carry on [default: 0]
    #[arg(long, env = "WEBSOCKET_TEST_DRAIN_DELAY", default_value = "0", value_parser = parse_duration)]
    pub drain_delay: Duration,

    /// Then send the Close 1001 frames spread over this long rather than all at once, so a
    /// rollout does not reconnect every client in the same second [default: 0]
    #[arg(long, env = "WEBSOCKET_TEST_DRAIN_PERIOD", default_value = "0", value_parser = parse_duration)]
    pub drain_period: Duration,

    /// This server's name, sent as an `X-Served-By` header with every answer (and with
    /// --hello as the first message), so clients can tell which backend they reached
    /// [default: $POD_NAME, else the host name]
    #[arg(long, env = "WEBSOCKET_TEST_SERVER_NAME")]
    pub server_name: Option<String>,

    /// Send "hello from NAME" as the first (text) message of every connection (without it,
    /// of those whose upgrade URL asks with `?hello`)
    #[arg(long, env = "WEBSOCKET_TEST_HELLO")]
    pub hello: bool,

    /// Serve the browser probe page on GET /ui of the WebSocket port; `false` leaves only
    /// the echo and the health check
    #[arg(long, env = "WEBSOCKET_TEST_UI", value_name = "BOOL", default_value_t = true,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub ui: bool,

    /// Time a client has to send its complete upgrade request
    #[arg(long, env = "WEBSOCKET_TEST_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_interval)]
    pub handshake_timeout: Duration,

    /// A write that makes no progress for this long closes the connection
    #[arg(long, env = "WEBSOCKET_TEST_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_interval)]
    pub write_timeout: Duration,

    /// TCP keepalive: silence before the kernel probes a connection (then every third of
    /// it); `off` disables. With --tcp-user-timeout it ends a silently vanished client
    /// within about a minute
    #[arg(long, env = "WEBSOCKET_TEST_TCP_KEEPALIVE", default_value = "15s", value_parser = parse_optional_interval)]
    pub tcp_keepalive: OptionalDuration,

    /// TCP_USER_TIMEOUT: data (or keepalive probes) unacknowledged this long ends the
    /// connection; `off` keeps the kernel's default (about 15 minutes)
    #[arg(long, env = "WEBSOCKET_TEST_TCP_USER_TIMEOUT", default_value = "45s", value_parser = parse_optional_interval)]
    pub tcp_user_timeout: OptionalDuration,

    /// Largest message accepted; a larger one closes the connection with 1009
    #[arg(long, env = "WEBSOCKET_TEST_MAX_MESSAGE_SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub max_message_size: usize,

    /// Most bytes all connections together may hold for incomplete messages and echoes
    /// being written; a connection whose next bytes would break it is closed with 1013
    /// [default: half the memory cgroup's limit, else a quarter of the machine's memory;
    /// logged at start]
    #[arg(long, env = "WEBSOCKET_TEST_MAX_BUFFERED_MEMORY", value_parser = parse_size)]
    pub max_buffered_memory: Option<usize>,

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

    /// Require `Authorization: Bearer TOKEN` on every upgrade (401 without it). Visible to
    /// `ps` as a flag: prefer the environment or --auth-token-file [default: off]
    #[arg(long, env = "WEBSOCKET_TEST_AUTH_TOKEN", value_name = "TOKEN", hide_env_values = true,
          value_parser = SecretParser, conflicts_with = "auth_token_file")]
    pub auth_token: Option<Secret>,

    /// Like --auth-token, the token read from this file (a mounted Secret; surrounding
    /// whitespace ignored), re-read when it changes
    #[arg(long, env = "WEBSOCKET_TEST_AUTH_TOKEN_FILE", value_name = "FILE", value_parser = parse_token_file)]
    pub auth_token_file: Option<PathBuf>,

    /// Origins allowed to upgrade, e.g. `https://app.example.com,https://*.example.com`;
    /// any other Origin gets 403 [default: every origin]
    #[arg(long, env = "WEBSOCKET_TEST_ALLOWED_ORIGINS", value_name = "ORIGINS",
          value_delimiter = ',', value_parser = parse_origin_pattern)]
    pub allowed_origins: Vec<OriginPattern>,

    /// Refuse (403) upgrades that carry no Origin header (non-browser clients send none)
    #[arg(long, env = "WEBSOCKET_TEST_REQUIRE_ORIGIN")]
    pub require_origin: bool,

    /// Most connections from one client address at once; the next gets 429 [default: no
    /// limit]
    #[arg(long, env = "WEBSOCKET_TEST_MAX_CONNECTIONS_PER_IP", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_ip: Option<u32>,

    /// New connections per client address, a token bucket: 20/s, 600/m, 1000/h or a bare
    /// number per second, optionally with a burst: 20/s,burst=40 [default: no limit; burst:
    /// one second's worth]
    #[arg(long, env = "WEBSOCKET_TEST_MAX_CONNECT_RATE_PER_IP", value_name = "RATE",
          value_parser = parse_connect_rate)]
    pub max_connect_rate_per_ip: Option<ConnectRate>,

    /// Every connection starts with a PROXY protocol header, v1 or v2 (HAProxy, AWS NLB),
    /// which gives the client's address; a connection without one is closed
    #[arg(long, env = "WEBSOCKET_TEST_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,

    /// Take the client's address from X-Forwarded-For (or Forwarded) on requests from
    /// these addresses: the right-most address not in the list, e.g. 10.0.0.0/8,::1
    #[arg(long, env = "WEBSOCKET_TEST_TRUSTED_PROXIES", value_name = "CIDRS",
          value_delimiter = ',', value_parser = parse_cidr)]
    pub trusted_proxies: Vec<Cidr>,

    /// Subprotocols accepted, e.g. chat,superchat: the first the client offers (in its
    /// order) is answered in Sec-WebSocket-Protocol [default: none]
    #[arg(long, env = "WEBSOCKET_TEST_SUBPROTOCOLS", value_name = "NAMES",
          value_delimiter = ',', value_parser = parse_subprotocol)]
    pub subprotocols: Vec<String>,

    /// Log level: off, error, warn, info, debug or trace
    #[arg(long, env = "WEBSOCKET_TEST_LOG_LEVEL", default_value = "info", value_parser = parse_log_level)]
    pub log_level: LevelFilter,
}

impl ServerConfig {
    /// The name this server answers with: --server-name, else `$POD_NAME`, else the host
    /// name; `None` when there is none (or it could not go in a header).
    pub fn identity(&self) -> Option<String> {
        self.server_name
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|name| name.trim().to_owned())
            })
            .filter(|name| {
                !name.is_empty() && name.chars().all(|c| c.is_ascii_graphic() || c == ' ')
            })
    }

    /// How accepted sockets notice a client that vanished.
    pub(crate) fn liveness(&self) -> crate::net::Liveness {
        crate::net::Liveness {
            keepalive: self.tcp_keepalive.0,
            user_timeout: self.tcp_user_timeout.0,
        }
    }

    /// The options of every accepted socket.
    pub(crate) fn accepted_options(&self) -> crate::net::AcceptedOptions {
        crate::net::AcceptedOptions {
            liveness: self.liveness(),
            write_timeout: self.write_timeout,
        }
    }

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
          value_parser = SecretParser, conflicts_with = "auth_token_file")]
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

    /// TCP keepalive: silence before the kernel probes a connection (then every third of
    /// it); `off` disables
    #[arg(long, env = "WEBSOCKET_TEST_TCP_KEEPALIVE", default_value = "15s", value_parser = parse_optional_interval)]
    pub tcp_keepalive: OptionalDuration,

    /// TCP_USER_TIMEOUT: data (or keepalive probes) unacknowledged this long ends the
    /// connection; `off` keeps the kernel's default
    #[arg(long, env = "WEBSOCKET_TEST_TCP_USER_TIMEOUT", default_value = "45s", value_parser = parse_optional_interval)]
    pub tcp_user_timeout: OptionalDuration,

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
    /// How dialled sockets notice a server that vanished.
    pub(crate) fn liveness(&self) -> crate::net::Liveness {
        crate::net::Liveness {
            keepalive: self.tcp_keepalive.0,
            user_timeout: self.tcp_user_timeout.0,
        }
    }

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
            Some((
                percent_decode(user)?,
                Secret::text(&percent_decode(password)?),
            ))
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

/// A duration flag that can be turned `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalDuration(pub Option<Duration>);

/// Parses an interval (greater than zero) or `off`.
fn parse_optional_interval(text: &str) -> Result<OptionalDuration, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(OptionalDuration(None));
    }
    parse_interval(text).map(|duration| OptionalDuration(Some(duration)))
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

// ----------------------------------------------------------------------------------------
// Access-control values of the server: the bearer token, origin patterns, address ranges,
// connection rates and subprotocol names.
// ----------------------------------------------------------------------------------------

/// A secret from the command line, the environment or a file (the bearer token): `Debug`
/// never shows it, and no error message repeats it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// Checks `bytes` as a bearer token: at least one byte, visible ASCII only (what an
    /// `Authorization` header can carry). The error says what is wrong, not the value.
    pub fn new(bytes: &[u8]) -> Result<Self, &'static str> {
        if bytes.is_empty() {
            return Err("the token is empty");
        }
        if !bytes.iter().all(u8::is_ascii_graphic) {
            return Err("a bearer token holds visible ASCII only (no spaces, control or non-ASCII characters)");
        }
        Ok(Secret(bytes.into()))
    }

    /// Any text kept secret (a proxy password), unchecked.
    pub fn text(text: &str) -> Self {
        Secret(text.as_bytes().into())
    }

    /// The secret's bytes.
    pub fn expose(&self) -> &Arc<[u8]> {
        &self.0
    }

    /// The secret as text, for the one place that sends it.
    pub fn as_str(&self) -> &str {
        // Made from text, or checked to be ASCII: always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Parses `--auth-token` without ever putting the value into an error message (clap's
/// value parsers quote the bad value).
#[derive(Clone, Copy)]
struct SecretParser;

impl clap::builder::TypedValueParser for SecretParser {
    type Value = Secret;

    fn parse_ref(
        &self,
        command: &Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Secret, clap::Error> {
        // Surrounding whitespace (a final newline from a file or a Secret) is not part of it.
        let bytes = value.as_encoded_bytes().trim_ascii();
        Secret::new(bytes).map_err(|why| {
            let name = arg
                .and_then(clap::Arg::get_long)
                .map_or_else(|| "the token".to_owned(), |long| format!("--{long}"));
            let source = arg
                .and_then(clap::Arg::get_env)
                .filter(|env| std::env::var_os(env).is_some_and(|set| set == value))
                .map(|env| format!(" (from environment variable {})", env.to_string_lossy()))
                .unwrap_or_default();
            command.clone().error(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for {name}{source}: {why}"),
            )
        })
    }
}

/// Reads a bearer token from `path`: the file's content without surrounding whitespace
/// (a Secret's file often ends in a newline). Errors name the file, never its content.
pub fn read_token_file(path: &Path) -> Result<Secret, String> {
    let bytes = std::fs::read(path)
        .map_err(|error| format!("cannot read the token file {}: {error}", path.display()))?;
    Secret::new(bytes.trim_ascii())
        .map_err(|why| format!("the token file {}: {why}", path.display()))
}

/// `--auth-token-file`: a file that holds a usable token now.
fn parse_token_file(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    read_token_file(&path)?;
    Ok(path)
}

/// An address range: `10.0.0.0/8`, `2001:db8::/32`, or one address (`192.0.2.1`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the range; an IPv4 address written as IPv6 (`::ffff:10.1.2.3`, as
    /// a dual-stack listener sees IPv4 clients) counts as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(ip) & mask == u32::from(network)
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(ip) & mask == u128::from(network)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Parses a [`Cidr`]. A range with host bits set (`10.0.0.1/8`) is refused with the range
/// it probably means, as a typo there would trust the wrong addresses.
pub fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let invalid = |why: String| format!("invalid address range {text:?}: {why}");
    let (address, prefix) = match text.trim().split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text.trim(), None),
    };
    let unbracketed = address
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(address);
    let ip: IpAddr = unbracketed.parse().map_err(|_| {
        invalid("expected an IP address or a range such as 10.0.0.0/8 or fd00::/8".into())
    })?;
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => bits,
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            match digits.parse::<u8>() {
                Ok(prefix) if prefix <= bits => prefix,
                _ => return Err(invalid(format!("the prefix length must be 0 to {bits}"))),
            }
        }
        Some(_) => return Err(invalid(format!("the prefix length must be 0 to {bits}"))),
    };
    let (network, prefix) = match ip {
        // A mapped IPv4 range is an IPv4 range: contains() compares IPv4 clients as IPv4.
        IpAddr::V6(v6) if prefix >= 96 && v6.to_ipv4_mapped().is_some() => (
            IpAddr::V4(v6.to_ipv4_mapped().expect("checked to be mapped")),
            prefix - 96,
        ),
        ip => (ip, prefix),
    };
    let cidr = Cidr { network, prefix };
    let masked = match network {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    };
    if masked != network {
        return Err(invalid(format!(
            "host bits are set; the range is {masked}/{prefix}"
        )));
    }
    Ok(cidr)
}

/// An allowed origin: `https://app.example.com`, `http://localhost:8080`,
/// `https://*.example.com` (any subdomain, not the domain itself), `http://localhost:*`
/// (any port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: String,
    /// Lowercase host; for a wildcard pattern, what follows `*.`.
    host: String,
    subdomains: bool,
    /// `None`: any port (`:*`).
    port: Option<Option<u16>>,
}

impl OriginPattern {
    /// Whether the value of an `Origin` header matches: the same scheme and host (ASCII
    /// case ignored) and the same port, a missing port meaning the scheme's default. An
    /// opaque origin (`null`) or a value that is not an origin matches nothing.
    pub fn matches(&self, origin: &str) -> bool {
        let Some((scheme, host, port)) = split_origin(origin) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(&self.scheme) {
            return false;
        }
        let host_matches = if self.subdomains {
            // At least one label, a dot, then the domain.
            let (host, domain) = (host.as_bytes(), self.host.as_bytes());
            host.len() > domain.len() + 1
                && host[host.len() - domain.len() - 1] == b'.'
                && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain)
        } else {
            host.eq_ignore_ascii_case(&self.host)
        };
        let port_matches = match self.port {
            None => true,
            Some(expected) => {
                let default = default_port(scheme);
                port.or(default) == expected.or(default)
            }
        };
        host_matches && port_matches
    }
}

impl fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wildcard = if self.subdomains { "*." } else { "" };
        write!(f, "{}://{wildcard}{}", self.scheme, self.host)?;
        match self.port {
            None => f.write_str(":*"),
            Some(Some(port)) => write!(f, ":{port}"),
            Some(None) => Ok(()),
        }
    }
}

/// The port a scheme implies when an origin leaves it out.
fn default_port(scheme: &str) -> Option<u16> {
    match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// Whether `scheme` is a URL scheme: a letter, then letters, digits, `+`, `-` or `.`.
fn is_scheme(scheme: &str) -> bool {
    scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Splits `host[:port]` where a bracketed IPv6 host keeps its brackets; the port text is
/// `None` when left out. `None` for an empty host or stray characters.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if authority.contains(['/', '?', '#', '@', ' ']) || authority.chars().any(char::is_control) {
        return None;
    }
    let (host, port) = match authority.rfind(':') {
        Some(colon) if !authority[colon..].contains(']') => {
            (&authority[..colon], Some(&authority[colon + 1..]))
        }
        _ => (authority, None),
    };
    let host_ok = match host.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<Ipv6Addr>().is_ok()),
        None => !host.is_empty() && !host.contains([':', '[', ']']),
    };
    host_ok.then_some((host, port))
}

/// A port number in decimal digits only.
fn parse_port(digits: &str) -> Option<u16> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Splits `scheme://host[:port]` (an `Origin` value); `None` for anything else (`null`
/// included). The port is `None` when left out.
fn split_origin(origin: &str) -> Option<(&str, &str, Option<u16>)> {
    let (scheme, authority) = origin.split_once("://")?;
    if !is_scheme(scheme) {
        return None;
    }
    let (host, port) = split_host_port(authority)?;
    let port = match port {
        Some(digits) => Some(parse_port(digits)?),
        None => None,
    };
    Some((scheme, host, port))
}

/// Parses an [`OriginPattern`]; the scheme is required, since the same host over `http`
/// and over `https` are different origins.
pub fn parse_origin_pattern(text: &str) -> Result<OriginPattern, String> {
    const FORM: &str = "expected scheme://host[:port] as a browser sends it, e.g. \
                        https://app.example.com, https://*.example.com or http://localhost:*";
    let invalid = |why: &str| format!("invalid origin {text:?}: {why}");
    let trimmed = text.trim();
    let Some((scheme, rest)) = trimmed.split_once("://") else {
        return Err(invalid(&format!("the scheme is missing; {FORM}")));
    };
    if !is_scheme(scheme) {
        return Err(invalid(FORM));
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err(invalid("an origin has no path, query or fragment"));
    }
    let (host, port) = split_host_port(authority).ok_or_else(|| invalid(FORM))?;
    let port = match port {
        Some("*") => None,
        Some(digits) => {
            Some(Some(parse_port(digits).ok_or_else(|| {
                invalid("the port must be 0 to 65535 or *")
            })?))
        }
        None => Some(None),
    };
    let (subdomains, host) = match host.strip_prefix("*.") {
        Some(domain) => (true, domain),
        None => (false, host),
    };
    if host.is_empty() || host.contains('*') || (subdomains && host.starts_with('.')) {
        return Err(invalid(
            "a wildcard is allowed only as the whole first label, as in https://*.example.com",
        ));
    }
    Ok(OriginPattern {
        scheme: scheme.to_ascii_lowercase(),
        host: host.to_ascii_lowercase(),
        subdomains,
        port,
    })
}

/// A token bucket: `per_second` new connections on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectRate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size: connections allowed back to back after a quiet spell.
    pub burst: u32,
}

impl fmt::Display for ConnectRate {
    /// `20/s (burst 40)`, `1/m (burst 1)`: in the largest unit that gives at least one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (count, unit) = if self.per_second >= 1.0 {
            (self.per_second, "s")
        } else if self.per_second * 60.0 >= 1.0 {
            (self.per_second * 60.0, "m")
        } else {
            (self.per_second * 3600.0, "h")
        };
        let count = (count * 1000.0).round() / 1000.0;
        write!(f, "{count}/{unit} (burst {})", self.burst)
    }
}

/// Parses a [`ConnectRate`]: `20/s`, `600/m`, `1000/h`, `20` (per second), `0.5/s`,
/// each optionally followed by `,burst=N` (default: one second's worth, at least 1).
pub fn parse_connect_rate(text: &str) -> Result<ConnectRate, String> {
    const FORM: &str = "expected a rate such as 20/s, 600/m or 20/s,burst=40";
    let invalid = |why: &str| format!("invalid rate {text:?}: {why}");
    let (rate, burst) = match text.trim().split_once(',') {
        Some((rate, burst)) => {
            let digits = burst
                .trim()
                .strip_prefix("burst=")
                .ok_or_else(|| invalid(FORM))?;
            let burst = match digits.parse::<u32>() {
                Ok(burst) if burst >= 1 && digits.bytes().all(|b| b.is_ascii_digit()) => burst,
                _ => return Err(invalid("the burst must be a whole number from 1")),
            };
            (rate, Some(burst))
        }
        None => (text.trim(), None),
    };
    let (count, seconds) = match rate.split_once('/') {
        Some((count, "s" | "sec")) => (count, 1.0),
        Some((count, "m" | "min")) => (count, 60.0),
        Some((count, "h")) => (count, 3600.0),
        Some(_) => return Err(invalid("the unit must be /s, /m or /h")),
        None => (rate, 1.0),
    };
    let count: f64 = match count.parse() {
        Ok(value) if count.bytes().all(|b| b.is_ascii_digit() || b == b'.') => value,
        _ => return Err(invalid(FORM)),
    };
    let per_second = count / seconds;
    if !(per_second.is_finite() && per_second > 0.0 && per_second <= 1e9) {
        return Err(invalid("the rate must be above zero"));
    }
    let burst = burst.unwrap_or_else(|| per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
    Ok(ConnectRate { per_second, burst })
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
            config.auth_token.as_ref().map(Secret::as_str),
            Some("s3cr3t")
        );
        assert!(!format!("{config:?}").contains("s3cr3t"));
        let error = client(&["--auth-token", "t", "--auth-token-file", "/f"]).unwrap_err();
        assert!(error.contains("cannot be used with"), "{error}");
        for bad in ["", "two words", "a\u{1b}b"] {
            let error = client(&["--auth-token", bad]).unwrap_err();
            assert!(error.contains("invalid value for --auth-token"), "{error}");
            if !bad.is_empty() {
                assert!(!error.contains(bad), "{error}");
            }
        }
    }

    #[test]
    fn proxy_urls_are_read_as_curl_reads_them() {
        let parsed = |text: &str| {
            parse_proxy_url(text).map(|p| {
                let credentials = p
                    .credentials
                    .map(|(user, password)| format!("{user}:{}", password.as_str()));
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
    fn address_ranges() {
        let cidr = |text| parse_cidr(text).unwrap_or_else(|e| panic!("{e}"));
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let private = cidr("10.0.0.0/8");
        assert!(private.contains(ip("10.255.1.2")));
        assert!(!private.contains(ip("11.0.0.1")));
        // An IPv4 client seen by a dual-stack listener.
        assert!(private.contains(ip("::ffff:10.1.2.3")));
        assert!(!private.contains(ip("::1")));
        let one = cidr("127.0.0.1");
        assert_eq!(one.to_string(), "127.0.0.1/32");
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.7")));
        assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")));
        let v6 = cidr("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        assert!(cidr("::/0").contains(ip("::1")));
        assert_eq!(cidr("[::1]").to_string(), "::1/128");
        // A mapped IPv4 range is an IPv4 range.
        assert_eq!(cidr("::ffff:10.0.0.0/104"), private);
        for (bad, says) in [
            ("10.0.0.1/8", "the range is 10.0.0.0/8"),
            ("10.0.0.0/33", "0 to 32"),
            ("::/129", "0 to 128"),
            ("10.0.0.0/", "0 to 32"),
            ("10.0.0.0/+8", "0 to 32"),
            ("10.0.0/8", "expected an IP address"),
            ("example.com", "expected an IP address"),
            ("", "expected an IP address"),
        ] {
            let error = parse_cidr(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
            assert!(error.starts_with("invalid address range"), "{error}");
        }
    }

    #[test]
    fn origin_patterns() {
        let pattern = |text| parse_origin_pattern(text).unwrap_or_else(|e| panic!("{e}"));
        let exact = pattern("https://App.Example.com");
        assert!(exact.matches("https://app.example.com"));
        assert!(exact.matches("HTTPS://APP.EXAMPLE.COM:443"));
        assert!(!exact.matches("https://app.example.com:8443"));
        assert!(!exact.matches("http://app.example.com"));
        assert!(!exact.matches("https://app.example.com.evil.test"));
        assert!(!exact.matches("https://evilapp.example.com"));
        assert!(!exact.matches("null"));
        assert!(!exact.matches("https://app.example.com/path"));
        assert_eq!(pattern("https://app.example.com/"), exact);

        let wildcard = pattern("https://*.example.com");
        assert!(wildcard.matches("https://a.example.com"));
        assert!(wildcard.matches("https://a.b.example.com"));
        assert!(!wildcard.matches("https://example.com"));
        assert!(!wildcard.matches("https://.example.com"));
        assert!(!wildcard.matches("https://aexample.com"));
        assert!(!wildcard.matches("https://a.example.com.evil.test"));
        assert!(!wildcard.matches("https://ä.example.com:x"));

        let port = pattern("http://localhost:8080");
        assert!(port.matches("http://localhost:8080"));
        assert!(!port.matches("http://localhost"));
        let default_port = pattern("http://localhost:80");
        assert!(default_port.matches("http://localhost"));
        let any_port = pattern("http://localhost:*");
        assert!(any_port.matches("http://localhost:3000") && any_port.matches("http://localhost"));
        let v6 = pattern("http://[::1]:3000");
        assert!(v6.matches("http://[::1]:3000") && !v6.matches("http://[::1]"));
        assert!(pattern("chrome-extension://abcdef").matches("chrome-extension://abcdef"));

        for (bad, says) in [
            ("app.example.com", "the scheme is missing"),
            ("*.example.com", "the scheme is missing"),
            ("https://", "expected scheme://host"),
            ("https://app.example.com/ws", "no path"),
            ("https://app.example.com:99999", "the port"),
            ("https://app.*.com", "wildcard"),
            ("https://*example.com", "wildcard"),
            ("https://*.", "wildcard"),
            ("https://a b", "expected scheme://host"),
            ("1http://x", "expected scheme://host"),
        ] {
            let error = parse_origin_pattern(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn connect_rates() {
        let rate = |text| parse_connect_rate(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            rate("20/s"),
            ConnectRate {
                per_second: 20.0,
                burst: 20
            }
        );
        assert_eq!(
            rate("20"),
            ConnectRate {
                per_second: 20.0,
                burst: 20
            }
        );
        assert_eq!(
            rate("600/m"),
            ConnectRate {
                per_second: 10.0,
                burst: 10
            }
        );
        assert_eq!(
            rate("1/m"),
            ConnectRate {
                per_second: 1.0 / 60.0,
                burst: 1
            }
        );
        assert_eq!(
            rate("0.5/s"),
            ConnectRate {
                per_second: 0.5,
                burst: 1
            }
        );
        assert_eq!(
            rate("20/s,burst=40"),
            ConnectRate {
                per_second: 20.0,
                burst: 40
            }
        );
        assert_eq!(
            rate("3600/h, burst=5"),
            ConnectRate {
                per_second: 1.0,
                burst: 5
            }
        );
        assert_eq!(rate("20/s,burst=40").to_string(), "20/s (burst 40)");
        assert_eq!(rate("1/m").to_string(), "1/m (burst 1)");
        assert_eq!(rate("2/h").to_string(), "2/h (burst 1)");
        for bad in [
            "",
            "0",
            "0/s",
            "-1/s",
            "20/d",
            "20/s,40",
            "20/s,burst=0",
            "20/s,burst=-1",
            "fast",
            "nan",
            "inf/s",
            "1e3/s",
            "20/s,burst=1.5",
        ] {
            let error = parse_connect_rate(bad).unwrap_err();
            assert!(error.starts_with("invalid rate"), "{bad}: {error}");
        }
    }

    #[test]
    fn subprotocols_are_tokens() {
        assert_eq!(parse_subprotocol("v1.chat"), Ok("v1.chat".into()));
        for bad in ["", "a b", "a,b", "a;b", "ch\u{e4}t", "a/b"] {
            assert!(parse_subprotocol(bad).is_err(), "{bad:?}");
        }
        let config =
            ServerConfig::try_parse_from(["server", "--subprotocols", "chat,superchat"]).unwrap();
        assert_eq!(config.subprotocols, ["chat", "superchat"]);
        assert!(ServerConfig::try_parse_from(["server", "--subprotocols", "chat,,x"]).is_err());
    }

    #[test]
    fn tokens_never_show_and_are_checked() {
        let config =
            ServerConfig::try_parse_from(["server", "--auth-token", "s3cret-T0ken"]).unwrap();
        assert_eq!(
            &**config.auth_token.as_ref().unwrap().expose(),
            b"s3cret-T0ken"
        );
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        for bad in ["", "two words", "tab\there", "caf\u{e9}"] {
            let error = ServerConfig::try_parse_from(["server", "--auth-token", bad]).unwrap_err();
            assert_eq!(error.exit_code(), 2);
            let message = error.render().to_string();
            assert!(message.contains("--auth-token"), "{message}");
            if !bad.is_empty() {
                assert!(
                    !message.contains(bad),
                    "the error repeats the token: {message}"
                );
            }
        }
        // Both at once is ambiguous.
        let both = ServerConfig::try_parse_from([
            "server",
            "--auth-token",
            "a",
            "--auth-token-file",
            "/nonexistent",
        ]);
        assert!(both.is_err());
    }

    #[test]
    fn token_files() {
        let dir = std::env::temp_dir().join(format!("websocket-test-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "  s3cret-T0ken\n").unwrap();
        assert_eq!(&**read_token_file(&file).unwrap().expose(), b"s3cret-T0ken");
        let path = file.to_str().unwrap();
        let config = ServerConfig::try_parse_from(["server", "--auth-token-file", path]).unwrap();
        assert_eq!(config.auth_token_file.as_deref(), Some(file.as_path()));
        std::fs::write(&file, "\n").unwrap();
        let error = read_token_file(&file).unwrap_err();
        assert!(error.contains("empty") && error.contains(path), "{error}");
        std::fs::write(&file, "two words").unwrap();
        let error = read_token_file(&file).unwrap_err();
        assert!(
            !error.contains("two words") && error.contains("visible ASCII"),
            "{error}"
        );
        let missing = dir.join("missing");
        let error = ServerConfig::try_parse_from([
            "server",
            "--auth-token-file",
            missing.to_str().unwrap(),
        ])
        .unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(
            error.to_string().contains("cannot read the token file"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn access_flags_parse_lists() {
        let config = ServerConfig::try_parse_from([
            "server",
            "--allowed-origins",
            "https://a.example.com,https://*.example.org",
            "--trusted-proxies",
            "10.0.0.0/8,::1",
            "--max-connections-per-ip",
            "3",
            "--max-connect-rate-per-ip",
            "20/s,burst=40",
            "--proxy-protocol",
            "--require-origin",
        ])
        .unwrap();
        assert_eq!(config.allowed_origins.len(), 2);
        assert_eq!(config.trusted_proxies.len(), 2);
        assert_eq!(config.max_connections_per_ip, Some(3));
        assert_eq!(config.max_connect_rate_per_ip.map(|r| r.burst), Some(40));
        assert!(config.proxy_protocol && config.require_origin);
        let defaults = ServerConfig::try_parse_from(["server"]).unwrap();
        assert!(defaults.allowed_origins.is_empty() && defaults.trusted_proxies.is_empty());
        assert!(!defaults.proxy_protocol && defaults.auth_token.is_none());
        assert!(ServerConfig::try_parse_from(["server", "--max-connections-per-ip", "0"]).is_err());
    }

    #[test]
    fn by_default_a_vanished_peer_is_found_within_a_minute() {
        let server = ServerConfig::try_parse_from(["server"]).unwrap();
        let client = ClientConfig::try_parse_from(["client"]).unwrap();
        for liveness in [server.liveness(), client.liveness()] {
            let bound = liveness.bound().expect("on by default");
            assert!(bound <= Duration::from_secs(60), "{bound:?}");
        }
        let off = ServerConfig::try_parse_from([
            "server",
            "--tcp-keepalive",
            "off",
            "--tcp-user-timeout",
            "off",
        ])
        .unwrap();
        assert_eq!(off.liveness().bound(), None);
    }

    #[test]
    fn the_browser_page_is_on_unless_switched_off() {
        let ui = |args: &[&str]| {
            let mut all = vec!["server"];
            all.extend_from_slice(args);
            ServerConfig::try_parse_from(all).unwrap().ui
        };
        assert!(ui(&[]));
        assert!(ui(&["--ui"]));
        assert!(ui(&["--ui", "true"]));
        assert!(!ui(&["--ui", "false"]));
        assert!(!ui(&["--ui=off"]));
        assert!(!ui(&["--ui", "0"]));
        assert!(ServerConfig::try_parse_from(["server", "--ui", "maybe"]).is_err());
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
