//! Flag value parsers: any text parses or gives an error that names the problem.
#![no_main]

use libfuzzer_sys::fuzz_target;
use websocket_test::config::{parse_duration, parse_size};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(message) = parse_duration(text) {
            assert!(message.starts_with("invalid duration"));
        }
        if let Err(message) = parse_size(text) {
            assert!(message.starts_with("invalid size"));
        }
    }
});
