//! Integration tests: the built binaries on loopback, driven over real sockets.

mod client;
mod hostile;
mod metrics_http;
mod server;
mod support;
