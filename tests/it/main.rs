//! Integration tests: the built binaries on loopback, driven over real sockets.

mod client;
mod hostile;
mod process;
mod server;
mod support;
