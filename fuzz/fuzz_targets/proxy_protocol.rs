//! The PROXY protocol header parser: any bytes give a verdict, never a panic; a header
//! never claims more bytes than it was given, and a prefix of a complete header is never
//! complete (so reading stops exactly at its end).
#![no_main]

use libfuzzer_sys::fuzz_target;
use websocket_test::server::proxy_protocol::{parse, Parsed};

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Header { len, .. }) = parse(data) {
        assert!(len <= data.len());
        assert_eq!(parse(&data[..len - 1]), Ok(Parsed::Incomplete));
    }
});
