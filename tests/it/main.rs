//! Integration tests: the built binaries on loopback, driven over real sockets.

mod client;
mod client_process;
mod harness;
mod hostile;
mod server;
mod support;
