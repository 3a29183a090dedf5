//! The live WebSocket connections: who they are and how to reach them from outside their
//! thread. A [`Registration`] guard keeps the map, the gauge and the connect/disconnect log
//! lines in step on every exit path, panics included.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use log::info;
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};

use super::access::ClientAddr;
use crate::activity::{Activity, Snapshot};
use crate::debug::{self, Row};
use crate::ending::{Ending, Reason};
use crate::metrics::{family, Metrics};
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
    /// What the connection did so far.
    pub activity: Arc<Activity>,
    /// The OS id of its thread.
    pub tid: Option<u32>,
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
    duration: Histogram,
    /// Traffic of the connections that have ended: messages and bytes in, then out.
    finished: Arc<[AtomicU64; 4]>,
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
            accepted: metrics.connections_opened.clone(),
            closed: metrics.connections_closed.clone(),
            duration: metrics.connection_duration.clone(),
            finished: Arc::default(),
        }
    }

    /// Adds a connection and logs `Connected: CLIENT`; it stays until the guard drops.
    /// Called on the connection's own thread (its id goes into `/debug/connections`).
    #[inline(never)]
    pub fn register(&self, id: u64, peer: ClientAddr, stream: Arc<SharedStream>) -> Registration {
        let connected_at = Instant::now();
        let activity = Arc::new(Activity::new());
        {
            let mut connections = self.write();
            connections.insert(
                id,
                Entry {
                    peer: peer.addr,
                    connected_at,
                    stream,
                    activity: activity.clone(),
                    tid: debug::thread_id(),
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
            activity,
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
    activity: Arc<Activity>,
    ending: Option<Ending>,
}

impl Registration {
    /// What the connection does, for its thread to update.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

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
        let activity = self.activity.snapshot();
        // Counted before it leaves the registry: whoever sees the connection gone also sees
        // why it went and what it carried.
        self.registry
            .closed
            .with_label_values(&[ending.reason.label(), &ending.code_label()])
            .inc();
        self.registry.duration.observe(activity.age.as_secs_f64());
        {
            let mut connections = self.registry.write();
            for (total, n) in self.registry.finished.iter().zip(traffic(&activity)) {
                total.fetch_add(n, Ordering::Relaxed);
            }
            connections.remove(&self.id);
            self.registry.gauge.set(connections.len() as i64);
        }
        info!(
            "Disconnected: {} ({})",
            self.peer,
            ending.describe(&activity)
        );
    }
}

/// Messages and bytes in, then out.
fn traffic(activity: &Snapshot) -> [u64; 4] {
    [
        activity.messages_in,
        activity.bytes_in,
        activity.messages_out,
        activity.bytes_out,
    ]
}

impl Registry {
    /// `websocket_messages_total{direction}` and `websocket_bytes_total{direction}`: what
    /// the ended connections carried plus what the live ones have carried so far (counted
    /// by each connection's thread on its own counters, summed here, at the scrape).
    pub fn traffic_families(&self) -> Vec<MetricFamily> {
        let mut totals: [u64; 4] =
            std::array::from_fn(|i| self.finished[i].load(Ordering::Relaxed));
        // Under the read lock: a connection moves from live to finished under the write lock.
        let connections = self.read();
        for entry in connections.values() {
            for (total, n) in totals.iter_mut().zip(traffic(&entry.activity.snapshot())) {
                *total += n;
            }
        }
        drop(connections);
        let [messages_in, bytes_in, messages_out, bytes_out] = totals;
        vec![
            family::counter(
                "websocket_messages_total",
                "WebSocket data messages, by direction (in: from clients, out: echoes)",
                &[
                    (&[("direction", "in")], messages_in),
                    (&[("direction", "out")], messages_out),
                ],
            ),
            family::counter(
                "websocket_bytes_total",
                "WebSocket payload bytes, by direction",
                &[
                    (&[("direction", "in")], bytes_in),
                    (&[("direction", "out")], bytes_out),
                ],
            ),
        ]
    }

    /// `/debug/connections`: the live connections as JSON.
    pub fn connections_json(&self) -> String {
        let entries = self.entries();
        let names: Vec<(String, String)> = entries
            .iter()
            .map(|(id, entry)| (format!("conn-{id}"), entry.peer.to_string()))
            .collect();
        let rows: Vec<Row<'_>> = entries
            .iter()
            .zip(&names)
            .map(|((id, entry), (thread, peer))| Row {
                id: *id,
                thread,
                tid: entry.tid,
                peer,
                activity: entry.activity.snapshot(),
            })
            .collect();
        debug::render(&rows)
    }
}
