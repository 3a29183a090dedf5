//! Start-up shared by both binaries: the logger and the signal handler.

use std::time::{Duration, Instant};

use std::process::ExitCode;

use websocket_test::shutdown::Trigger;
use websocket_test::Error;

/// Logs to stdout (see `websocket_test::logger`): RFC 3339 UTC time, level, thread name.
pub fn init_logger(level: log::LevelFilter) {
    websocket_test::logger::init(level).expect("the logger is initialised once");
}

/// Exit 2 for settings that cannot work (a file that does not load, flags that do not fit
/// together), as for a bad flag; 1 for a failure while starting or running.
pub fn exit_code(error: &Error) -> ExitCode {
    match error {
        Error::Setup(_) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

/// The first SIGINT/SIGTERM requests a graceful shutdown; another one a second or more
/// later exits at once. (Signals closer together are one request delivered twice, as
/// `timeout` does: it signals the child and then its whole process group.)
pub fn on_signal(trigger: Trigger) -> Result<(), ctrlc::Error> {
    let mut trigger = Some(trigger);
    let mut first: Option<Instant> = None;
    // The target stays the binary's name, as when this file was include!d: `[server@ctrl-c]`.
    ctrlc::set_handler(move || match (trigger.take(), first) {
        (Some(trigger), _) => {
            log::info!(
                target: env!("CARGO_BIN_NAME"),
                "Signal received: shutting down (a second signal, 1 s or more later, exits at once)"
            );
            first = Some(Instant::now());
            trigger.trigger();
        }
        (None, Some(at)) if at.elapsed() >= Duration::from_secs(1) => {
            log::warn!(target: env!("CARGO_BIN_NAME"), "Second signal: exiting now");
            #[allow(clippy::exit)] // the binary owns the process: this is the emergency exit
            std::process::exit(130);
        }
        (None, _) => {}
    })
}
