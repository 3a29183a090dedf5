//! `server`: the WebSocket echo server. See `server --help`.

#[path = "common.rs"]
mod common;

use std::process::ExitCode;

use log::error;
use websocket_test::{config, shutdown, Server, ServerConfig};

fn main() -> ExitCode {
    let config: ServerConfig = config::parse_or_exit();
    common::init_logger(config.log_level);
    let (trigger, shutdown) = shutdown::channel();
    if let Err(error) = common::on_signal(trigger) {
        error!("cannot install the signal handler: {error}");
        return ExitCode::FAILURE;
    }
    let result = Server::bind(config).and_then(|server| server.run(shutdown));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!("{error}");
            common::exit_code(&error)
        }
    }
}
