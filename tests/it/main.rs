//! Integration tests: the built binaries on loopback, driven over real sockets.

mod client;
mod harness;
mod hostile;
mod server;
mod server_process;
mod support;
