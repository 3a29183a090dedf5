//! Shutdown signalling over a crossbeam channel.
//!
//! The [`Trigger`] owns the only `Sender`; dropping it (or calling [`Trigger::trigger`])
//! disconnects the channel, and every [`Shutdown`] clone sees that at once: in `select!`,
//! in [`Shutdown::wait_timeout`], or by polling [`Shutdown::is_requested`]. A panic that drops
//! the trigger stops the workers the same way a signal does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

/// Creates a connected trigger and shutdown handle.
pub fn channel() -> (Trigger, Shutdown) {
    let (sender, receiver) = crossbeam_channel::bounded(0);
    let requested = Arc::new(AtomicBool::new(false));
    (
        Trigger {
            _sender: sender,
            requested: requested.clone(),
        },
        Shutdown {
            receiver,
            requested,
        },
    )
}

/// Requests shutdown when triggered or dropped.
#[derive(Debug)]
pub struct Trigger {
    _sender: Sender<()>,
    requested: Arc<AtomicBool>,
}

impl Trigger {
    /// Requests shutdown.
    pub fn trigger(self) {}
}

impl Drop for Trigger {
    fn drop(&mut self) {
        // Set before the sender drops, so whoever the disconnect wakes sees the flag.
        self.requested.store(true, Ordering::SeqCst);
    }
}

/// Observes a shutdown request; cheap to clone and to poll.
#[derive(Debug, Clone)]
pub struct Shutdown {
    receiver: Receiver<()>,
    // Polled once per message by every connection thread: an atomic load, where the
    // channel's `try_recv` would take a lock shared by all of them.
    requested: Arc<AtomicBool>,
}

impl Shutdown {
    /// True once shutdown has been requested.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout`; returns true if shutdown was requested meanwhile.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        matches!(
            self.receiver.recv_timeout(timeout),
            Err(RecvTimeoutError::Disconnected)
        )
    }

    /// Blocks until shutdown is requested.
    pub fn wait(&self) {
        let _ = self.receiver.recv();
    }

    /// The channel to use in `crossbeam_channel::select!`: it becomes ready (with an
    /// error) when shutdown is requested.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.receiver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_and_drop_both_request_shutdown() {
        let (trigger, shutdown) = channel();
        assert!(!shutdown.is_requested());
        assert!(!shutdown.wait_timeout(Duration::from_millis(1)));
        trigger.trigger();
        assert!(shutdown.is_requested());
        assert!(shutdown.clone().wait_timeout(Duration::from_secs(60)));

        let (trigger, shutdown) = channel();
        drop(trigger);
        shutdown.wait();
        assert!(shutdown.is_requested());
    }
}
