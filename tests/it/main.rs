//! Integration tests: the built binaries on loopback, driven over real sockets.

mod client;
mod server;
mod support;
