//! The live WebSocket connections: who they are and how to reach them from outside their
//! thread. A [`Registration`] guard keeps the map, the gauge and the connect/disconnect log
//! lines in step on every exit path, panics included.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use log::info;
use prometheus::{IntCounter, IntCounterVec, IntGauge};

use super::access::ClientAddr;
use crate::ending::{Ending, Reason};
use crate::metrics::Metrics;
use crate::stream::SharedStream;

/// One live connection.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The client's address (behind a balancer or proxy, the one it reported).
    pub peer: SocketAddr,
    /// When the upgrade completed.
    pub connected_at: Instant,
    /// The socket, to send a Close frame or shut it down from another thread.
    pub stream: Arc<SharedStream>,
}

/// Connections by id, shared by the connection threads, the reporter and shutdown.
#[derive(Clone)]
pub struct Registry {
    connections: Arc<RwLock<HashMap<u64, Entry>>>,
    /// Sockets still sending their opening request (not counted as connections).
    handshaking: Arc<Mutex<HashMap<u64, Arc<SharedStream>>>>,
    gauge: IntGauge,
    accepted: IntCounter,
    closed: IntCounterVec,
}

impl Registry {
    /// An empty registry that mirrors its size into the `websocket_connections` gauge and
    /// counts opened and closed connections.
    pub fn new(metrics: &Metrics) -> Self {
        metrics.connections.set(0);
        Registry {
            connections: Arc::default(),
            handshaking: Arc::default(),
            gauge: metrics.connections.clone(),
            accepted: metrics.connections_total.clone(),
            closed: metrics.connections_closed.clone(),
        }
    }

    /// Adds a connection and logs `Connected: CLIENT`; it stays until the guard drops.
    pub fn register(&self, id: u64, peer: ClientAddr, stream: Arc<SharedStream>) -> Registration {
        let connected_at = Instant::now();
        {
            let mut connections = self.write();
            connections.insert(
                id,
                Entry {
                    peer: peer.addr,
                    connected_at,
                    stream,
                },
            );
            self.gauge.set(connections.len() as i64);
        }
        self.accepted.inc();
        info!("Connected: {peer}");
        Registration {
            registry: self.clone(),
            id,
            peer,
            connected_at,
            ending: None,
        }
    }

    /// Lists a socket whose opening request is being read, until the guard drops.
    pub fn begin_handshake(&self, id: u64, stream: Arc<SharedStream>) -> Handshaking {
        self.lock_handshaking().insert(id, stream);
        Handshaking {
            registry: self.clone(),
            id,
        }
    }

    /// Shuts down every socket still in its handshake (at server shutdown): their threads
    /// wake at once instead of at the handshake timeout.
    pub fn abort_handshakes(&self) -> usize {
        let handshaking = self.lock_handshaking();
        for stream in handshaking.values() {
            stream.abort();
        }
        handshaking.len()
    }

    fn lock_handshaking(&self) -> MutexGuard<'_, HashMap<u64, Arc<SharedStream>>> {
        self.handshaking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Number of sockets still sending their opening request.
    pub fn handshakes(&self) -> usize {
        self.lock_handshaking().len()
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// The client addresses of the live connections.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.read().values().map(|entry| entry.peer).collect()
    }

    /// A copy of the live connections.
    pub fn entries(&self) -> Vec<(u64, Entry)> {
        self.read()
            .iter()
            .map(|(id, entry)| (*id, entry.clone()))
            .collect()
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<u64, Entry>> {
        self.connections
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<u64, Entry>> {
        self.connections
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Removes a socket from the handshake list when dropped.
pub struct Handshaking {
    registry: Registry,
    id: u64,
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.registry.lock_handshaking().remove(&self.id);
    }
}

/// Removes its connection from the registry when dropped and logs `Disconnected: PEER`.
pub struct Registration {
    registry: Registry,
    id: u64,
    peer: ClientAddr,
    connected_at: Instant,
    ending: Option<Ending>,
}

impl Registration {
    /// Records how the connection ended, for the disconnect log line and the metrics.
    pub fn set_ending(&mut self, ending: Ending) {
        self.ending = Some(ending);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let ending = self
            .ending
            .take()
            .unwrap_or_else(|| Ending::new(Reason::Error, "connection thread panicked"));
        // Counted before it leaves the registry: whoever sees the connection gone also sees
        // why it went.
        self.registry
            .closed
            .with_label_values(&[ending.reason.label(), &ending.code_label()])
            .inc();
        {
            let mut connections = self.registry.write();
            connections.remove(&self.id);
            self.registry.gauge.set(connections.len() as i64);
        }
        let lived = self.connected_at.elapsed().as_secs_f64();
        info!("Disconnected: {} ({ending}, after {lived:.1}s)", self.peer);
    }
}
