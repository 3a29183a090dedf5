//! The opening HTTP request parser: any bytes give a decision, never a panic, and every
//! reply is a well-formed status line; with no access rules and with all of them on.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use websocket_test::config::{parse_cidr, parse_origin_pattern};
use websocket_test::server::handshake::{decide, Decision, Rules, MAX_HEAD_SIZE};

fuzz_target!(|data: &[u8]| {
    let origins = [parse_origin_pattern("https://*.example.com").unwrap()];
    let trusted = [parse_cidr("127.0.0.0/8").unwrap()];
    let subprotocols = ["chat".to_owned()];
    let peer = SocketAddr::from(([127, 0, 0, 1], 5000));
    let strict = Rules {
        token: Some(b"token"),
        origins: &origins,
        require_origin: true,
        subprotocols: &subprotocols,
        trusted_proxies: &trusted,
        peer,
    };
    for rules in [Rules::open(peer), strict] {
        match decide(data, "/ws", &rules) {
            Decision::Upgrade { head_len, accept_key, protocol, .. } => {
                assert!(head_len <= data.len());
                assert_eq!(accept_key.len(), 28);
                assert!(protocol.is_none_or(|p| subprotocols.contains(&p)));
            }
            Decision::Reply(reply) => {
                let bytes = reply.to_bytes();
                assert!(bytes.starts_with(format!("HTTP/1.1 {} ", reply.status).as_bytes()));
            }
            Decision::NeedMore => assert!(data.len() < MAX_HEAD_SIZE),
        }
    }
});
