//! The crate's error type: what can stop a server or client from starting or running.
//! Per-connection failures are not errors of the process; they end that connection and
//! are logged.

use std::fmt;
use std::io;
use std::net::SocketAddr;

/// Shorthand for results with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failure that stops the server or client.
#[derive(Debug)]
pub enum Error {
    /// A listening socket could not be bound (port taken, address not local, no permission).
    Bind {
        /// The address we tried to bind.
        addr: SocketAddr,
        /// What the OS said.
        source: io::Error,
    },
    /// Any other OS failure at start-up, such as a thread that could not be spawned.
    Io(io::Error),
    /// A setting that cannot be used: a certificate file that does not load, flags that do
    /// not fit together.
    Setup(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::Io(source) => write!(f, "{source}"),
            Error::Setup(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Bind { source, .. } | Error::Io(source) => Some(source),
            Error::Setup(_) => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(error: io::Error) -> Self {
        Error::Io(error)
    }
}
