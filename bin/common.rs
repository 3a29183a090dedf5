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

/// The first SIGINT/SIGTERM requests a graceful shutdown; a second one exits at once.
fn on_signal(trigger: websocket_test::shutdown::Trigger) -> Result<(), ctrlc::Error> {
    let mut trigger = Some(trigger);
    ctrlc::set_handler(move || match trigger.take() {
        Some(trigger) => {
            log::info!("Signal received: shutting down (send it again to exit at once)");
            trigger.trigger();
        }
        None => {
            log::warn!("Second signal: exiting now");
            std::process::exit(130);
        }
    })
}
