// Shared by both binaries (included, not a module: each binary is one file plus this).

/// Logs to stdout with RFC 3339 UTC timestamps, the level and the thread name.
fn init_logger(level: log::LevelFilter) {
    simple_logger::SimpleLogger::new()
        .with_level(level)
        .with_utc_timestamps()
        .with_threads(true)
        .init()
        .expect("the logger is initialised once");
}

/// The first SIGINT/SIGTERM requests a graceful shutdown; another one a second or more
/// later exits at once. (Signals closer together are one request delivered twice, as
/// `timeout` does: it signals the child and then its whole process group.)
fn on_signal(trigger: websocket_test::shutdown::Trigger) -> Result<(), ctrlc::Error> {
    let mut trigger = Some(trigger);
    let mut first: Option<std::time::Instant> = None;
    ctrlc::set_handler(move || match (trigger.take(), first) {
        (Some(trigger), _) => {
            log::info!("Signal received: shutting down (send it again to exit at once)");
            first = Some(std::time::Instant::now());
            trigger.trigger();
        }
        (None, Some(at)) if at.elapsed() >= std::time::Duration::from_secs(1) => {
            log::warn!("Second signal: exiting now");
            #[allow(clippy::exit)] // the binary owns the process: this is the emergency exit
            std::process::exit(130);
        }
        (None, _) => {}
    })
}
