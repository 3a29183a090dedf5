//! `client`: holds WebSocket connections to the server. See `client --help`.

#[path = "common.rs"]
mod common;

use std::process::ExitCode;

use log::error;
use websocket_test::{client, config, shutdown, ClientConfig};

fn main() -> ExitCode {
    let config: ClientConfig = config::parse_or_exit();
    common::init_logger(config.log_level);
    let (trigger, shutdown) = shutdown::channel();
    if let Err(error) = common::on_signal(trigger) {
        error!("cannot install the signal handler: {error}");
        return ExitCode::FAILURE;
    }
    match client::run(config, shutdown) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!("{error}");
            common::exit_code(&error)
        }
    }
}
