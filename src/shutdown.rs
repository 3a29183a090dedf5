//! Shutdown signalling over a crossbeam channel.
//!
//! The [`Trigger`] owns the only `Sender`; dropping it (or calling [`Trigger::trigger`])
//! disconnects the channel, and every [`Shutdown`] clone sees that at once: in `select!`,
//! in [`Shutdown::wait_timeout`], or by polling [`Shutdown::is_requested`]. A panic that drops
//! the trigger stops the workers the same way a signal does.

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

/// Creates a connected trigger and shutdown handle.
pub fn channel() -> (Trigger, Shutdown) {
    let (sender, receiver) = crossbeam_channel::bounded(0);
    (Trigger(sender), Shutdown(receiver))
}

/// Requests shutdown when triggered or dropped.
#[derive(Debug)]
pub struct Trigger(#[allow(dead_code)] Sender<()>);

impl Trigger {
    /// Requests shutdown.
    pub fn trigger(self) {}
}

/// Observes a shutdown request; cheap to clone and to poll.
#[derive(Debug, Clone)]
pub struct Shutdown(Receiver<()>);

impl Shutdown {
    /// True once shutdown has been requested.
    pub fn is_requested(&self) -> bool {
        matches!(self.0.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Waits up to `timeout`; returns true if shutdown was requested meanwhile.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        matches!(self.0.recv_timeout(timeout), Err(RecvTimeoutError::Disconnected))
    }

    /// Blocks until shutdown is requested.
    pub fn wait(&self) {
        let _ = self.0.recv();
    }

    /// The channel to use in `crossbeam_channel::select!`: it becomes ready (with an
    /// error) when shutdown is requested.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.0
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
