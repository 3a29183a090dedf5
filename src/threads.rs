//! Named helper threads that are always joined: [`Helpers`] owns them and, when dropped
//! (on the normal path, an early error return or a panic), requests their stop, wakes the
//! ones blocked in a system call, and joins them all.

use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::select;

use crate::shutdown::{self, Shutdown, Trigger};

/// How long [`Helpers`] keeps waking a thread that has not noticed the stop request.
const WAKE_PATIENCE: Duration = Duration::from_secs(5);
/// Pause between two wake-ups of the same thread.
const WAKE_RETRY: Duration = Duration::from_millis(20);

/// Spawns a thread named `name` (at most 15 bytes show in `/proc/PID/task/*/comm`).
pub(crate) fn spawn(
    name: &str,
    work: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new().name(name.into()).spawn(work)
}

/// Joins a thread and re-raises its panic, unless this thread is already unwinding (a
/// second panic would abort the process).
pub(crate) fn join(handle: JoinHandle<()>) {
    if let Err(panic) = handle.join() {
        if !thread::panicking() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Runs `work` every `interval` until `shutdown` is requested.
pub(crate) fn every(interval: Duration, shutdown: &Shutdown, mut work: impl FnMut()) {
    let ticks = crossbeam_channel::tick(interval);
    loop {
        select! {
            recv(ticks) -> _ => work(),
            recv(shutdown.receiver()) -> _ => return,
        }
    }
}

/// A group of helper threads that stop together: dropping the group triggers their shared
/// [`Shutdown`], then joins them in reverse start order, calling each one's wake-up (for a
/// thread blocked in `accept`, say) until it has finished.
pub(crate) struct Helpers {
    stop: Option<Trigger>,
    shutdown: Shutdown,
    threads: Vec<Helper>,
}

struct Helper {
    handle: JoinHandle<()>,
    wake: Option<Box<dyn Fn() + Send>>,
}

impl Helpers {
    /// An empty group with a fresh stop signal.
    pub(crate) fn new() -> Self {
        let (stop, shutdown) = shutdown::channel();
        Helpers {
            stop: Some(stop),
            shutdown,
            threads: Vec::new(),
        }
    }

    /// The signal the group's threads stop on.
    pub(crate) fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Starts a thread that returns once [`shutdown`](Self::shutdown) is requested.
    pub(crate) fn spawn(
        &mut self,
        name: &str,
        work: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        self.push(name, work, None)
    }

    /// Starts a thread that may be blocked in a system call when asked to stop; `wake`
    /// unblocks it and is called until it has finished.
    pub(crate) fn spawn_woken(
        &mut self,
        name: &str,
        work: impl FnOnce() + Send + 'static,
        wake: impl Fn() + Send + 'static,
    ) -> std::io::Result<()> {
        self.push(name, work, Some(Box::new(wake)))
    }

    fn push(
        &mut self,
        name: &str,
        work: impl FnOnce() + Send + 'static,
        wake: Option<Box<dyn Fn() + Send>>,
    ) -> std::io::Result<()> {
        let handle = spawn(name, work)?;
        self.threads.push(Helper { handle, wake });
        Ok(())
    }

    /// Requests the stop without joining yet.
    pub(crate) fn trigger(&mut self) {
        self.stop.take();
    }

    /// Stops and joins every thread (what dropping the group does).
    pub(crate) fn stop(self) {}
}

impl Drop for Helpers {
    fn drop(&mut self) {
        self.trigger();
        while let Some(Helper { handle, wake }) = self.threads.pop() {
            if let Some(wake) = wake {
                let deadline = Instant::now() + WAKE_PATIENCE;
                while !handle.is_finished() && Instant::now() < deadline {
                    wake();
                    let _ = crossbeam_channel::after(WAKE_RETRY).recv();
                }
            }
            join(handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn dropping_the_group_stops_and_joins_every_thread() {
        let finished = Arc::new(AtomicUsize::new(0));
        let mut helpers = Helpers::new();
        for name in ["first", "second"] {
            let (shutdown, finished) = (helpers.shutdown().clone(), finished.clone());
            helpers
                .spawn(name, move || {
                    shutdown.wait();
                    finished.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
        }
        let (woken, blocked) = crossbeam_channel::bounded::<()>(1);
        helpers
            .spawn_woken(
                "blocked",
                {
                    let finished = finished.clone();
                    move || {
                        // Blocked in something that ignores the stop signal.
                        let _ = blocked.recv();
                        finished.fetch_add(1, Ordering::SeqCst);
                    }
                },
                move || {
                    let _ = woken.try_send(());
                },
            )
            .unwrap();
        drop(helpers);
        assert_eq!(finished.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn every_runs_until_shutdown() {
        let (trigger, shutdown) = shutdown::channel();
        let (ran, runs) = crossbeam_channel::unbounded();
        let ticker = spawn("ticker", move || {
            every(Duration::from_millis(1), &shutdown, || {
                ran.send(()).unwrap();
            });
        })
        .unwrap();
        for _ in 0..3 {
            runs.recv_timeout(Duration::from_secs(60)).unwrap();
        }
        trigger.trigger();
        join(ticker);
    }

    #[test]
    #[should_panic(expected = "worker failed")]
    fn join_re_raises_a_panic() {
        join(spawn("panicker", || panic!("worker failed")).unwrap());
    }
}
