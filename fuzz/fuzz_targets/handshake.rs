//! The opening HTTP request parser: any bytes give a decision, never a panic, and every
//! reply is a well-formed status line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use websocket_test::server::handshake::{decide, Decision};

fuzz_target!(|data: &[u8]| {
    match decide(data, "/ws") {
        Decision::Upgrade { head_len, accept_key } => {
            assert!(head_len <= data.len());
            assert_eq!(accept_key.len(), 28);
        }
        Decision::Reply(reply) => {
            let bytes = reply.to_bytes();
            assert!(bytes.starts_with(format!("HTTP/1.1 {} ", reply.status).as_bytes()));
        }
        Decision::NeedMore => assert!(data.len() < websocket_test::server::handshake::MAX_HEAD_SIZE),
    }
});
