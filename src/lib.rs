//! websocket-test: a WebSocket echo server and a long-lived client for proving that
//! connections survive load balancers, ingress controllers, service meshes, NAT and
//! firewalls, and for counting how many connections a path can hold.
//!
//! Synchronous and thread-per-connection: no async runtime. The server's `acceptor` thread
//! hands every socket to its own named thread (`conn-N`) that answers the HTTP request,
//! then runs a tungstenite echo loop blocked in `read` (an idle connection costs no CPU).
//! The client runs one thread per connection (`client-N`) that times its pings with
//! socket read timeouts. Thread names show in `gdb`, `top -H` and `/proc/PID/task/*/comm`.
//! Run with `--log-level debug` to see every message.
//!
//! Codemap (public modules are what the binaries, the fuzz targets and the tests use):
//! - [`config`]: flags, environment twins, defaults, duration and size parsing.
//! - [`server`]: accept loop, opening handshake, echo threads, connection registry.
//! - [`client`]: connection threads: connect, ping, status, reconnect; their counters.
//! - [`ending`]: how a connection ended, the words both sides log and count it with.
//! - `debug`: `/debug/connections`, every live connection with its thread.
//! - `budget`: the server's memory budget for messages (`--max-buffered-memory`).
//! - `activity`: what a connection did (messages, bytes, silence, round trip), lock-free.
//! - `stream`: the socket shared between a connection's thread and shutdown.
//! - `frame`: the Close frames written from outside a connection's thread.
//! - `metrics`: the Prometheus registry and the routes of the metrics port.
//! - [`http`]: the metrics port's HTTP endpoint: bounded, named threads, a deadline per request.
//! - [`logger`]: the binaries' stdout logger (a failed write drops the line, never panics).
//! - `threads`: named helper threads that a drop stops and joins.
//! - `tls`: rustls set-up for both sides: certificates, their reload, trust.
//! - `ui`: the browser probe page (`src/ui/page.{html,css,js}`, embedded), served on `/ui`.
//! - [`shutdown`], `net`, [`error`]: signalling, socket set-up, errors.
//!
//! Invariants: `websocket_connections` equals the number of entries in the server's
//! registry at every moment (both change under one lock); after our Close frame nothing
//! more is written to a socket; every wait is bounded or wakes on shutdown.

mod activity;
mod boundary;
mod budget;
pub mod client;
pub mod config;
mod debug;
pub mod ending;
pub mod error;
mod frame;
pub mod http;
pub mod logger;
mod metrics;
mod net;
mod repeats;
pub mod server;
pub mod shutdown;
mod stream;
mod threads;
mod tls;
mod ui;

pub use config::{ClientConfig, ServerConfig};
pub use error::{Error, Result};
pub use server::Server;

/// `1 connection`, `2 connections`: a count with its noun, for log lines.
pub(crate) fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
