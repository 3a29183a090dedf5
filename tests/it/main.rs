//! Integration tests: the server and client in process (harness.rs) and, for what only a
//! process shows, the built binaries; all over real sockets on loopback.

// A failed unwrap is a failed test; helpers read into buffers on
// the test threads' 2 MiB stacks.
#![allow(clippy::unwrap_used, clippy::large_stack_frames)]

/// The system allocator, counting: [`ALLOCATOR`]`.allocated()` is the bytes live in the
/// process (faults.rs reads it in a test that runs alone).
#[global_allocator]
static ALLOCATOR: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

mod access;
mod client;
mod client_handshake;
mod client_process;
mod faults;
mod footprint;
mod harness;
mod hostile;
mod limits;
mod metrics_http;
mod netcut;
mod nginx;
mod pki;
mod probe;
mod process;
mod prometheus;
mod readme;
mod server;
mod server_process;
mod support;
mod tls;
mod ui;
