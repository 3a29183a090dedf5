//! The plain server `scripts/bench` measures ours against, in the same run: std's
//! `TcpListener`, one thread per connection with our stack size and listen backlog, and
//! tungstenite with its defaults (a 128 KiB read buffer). It echoes every message and does
//! nothing else: no registry, metrics, logs, limits or timeouts.
//!
//! ```sh
//! cargo run --release --example reference_server -- 127.0.0.1:0
//! ```

// A bare program: its one line of output is how the benchmark learns the port.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;

use socket2::{Domain, Socket, Type};
use tungstenite::Message;
use websocket_test::server::{CONNECTION_STACK_SIZE, LISTEN_BACKLOG};

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = match std::env::args()
        .nth(1)
        .unwrap_or("127.0.0.1:3003".into())
        .parse()
    {
        Ok(addr) => addr,
        Err(error) => {
            eprintln!("usage: reference_server [ADDRESS:PORT]: {error}");
            std::process::exit(2);
        }
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    let listener: TcpListener = socket.into();
    println!("Listening on ws://{}/ws", listener.local_addr()?);
    for stream in listener.incoming().flatten() {
        // Past the OS's thread limit the socket is dropped, as a plain server would.
        let _ = thread::Builder::new()
            .stack_size(CONNECTION_STACK_SIZE)
            .spawn(move || echo(stream));
    }
    Ok(())
}

fn echo(stream: TcpStream) {
    let Ok(mut socket) = tungstenite::accept(stream) else {
        return;
    };
    // Pings and the close handshake are answered by tungstenite inside `read`.
    while let Ok(message) = socket.read() {
        if matches!(message, Message::Text(_) | Message::Binary(_)) && socket.send(message).is_err()
        {
            return;
        }
    }
}
