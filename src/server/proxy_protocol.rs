//! The PROXY protocol header a load balancer (HAProxy, AWS NLB, ...) puts in front of a
//! connection to pass on the client's address: version 1 (a text line) and version 2
//! (binary). Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.
//!
//! [`parse`] is pure (bytes in, verdict out) so it can be tested and fuzzed on its own;
//! [`read_header`] reads exactly the header from the socket, not a byte more, so what
//! follows (a TLS ClientHello or the HTTP request) is left for the next reader.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Instant;

/// Longest version 1 header, CRLF included (spec §2.1).
pub const MAX_V1_LEN: usize = 107;
/// Longest version 2 header accepted (16-byte fixed part plus addresses and TLVs). The
/// format allows 64 KiB; balancers send well under 1 KiB.
pub const MAX_V2_LEN: usize = 4096;
/// The version 2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";

/// What the bytes received so far hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid start of a header: read more. Every byte so far belongs to the header.
    Incomplete,
    /// A complete header of `len` bytes.
    Header {
        /// Length of the header; the connection's own bytes follow it.
        len: usize,
        /// The client's address, or `None` when the header carries none: a version 2
        /// LOCAL command (the balancer's own health check), version 1 `UNKNOWN`, or an
        /// address family without one (UNIX sockets, unspecified).
        source: Option<SocketAddr>,
    },
}

/// Why the bytes are not a PROXY protocol header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The connection does not start with a PROXY header at all (a client that bypassed
    /// the balancer, or a balancer without the protocol enabled).
    Missing,
    /// A header that breaks the format; the text says where.
    Garbled(&'static str),
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::Missing => f.write_str("no PROXY protocol header"),
            ProxyError::Garbled(why) => write!(f, "garbled PROXY protocol header: {why}"),
        }
    }
}

impl std::error::Error for ProxyError {}

/// Decides what `buf`, the first bytes of a connection, holds.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(&first) = buf.first() else {
        return Ok(Parsed::Incomplete);
    };
    if first == V1_PREFIX[0] {
        parse_v1(buf)
    } else if first == V2_SIGNATURE[0] {
        parse_v2(buf)
    } else {
        Err(ProxyError::Missing)
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let prefix = buf.len().min(V1_PREFIX.len());
    if buf[..prefix] != V1_PREFIX[..prefix] {
        return Err(ProxyError::Missing);
    }
    let window = &buf[..buf.len().min(MAX_V1_LEN)];
    // A bare LF is refused wherever it is, so that a prefix of the line is never refused
    // for what the whole line is accepted with, nor the other way round.
    let end = window.windows(2).position(|pair| pair == b"\r\n");
    if window[..end.unwrap_or(window.len())].contains(&b'\n') {
        return Err(ProxyError::Garbled("version 1 line ends without CR"));
    }
    let Some(end) = end else {
        if buf.len() >= MAX_V1_LEN {
            return Err(ProxyError::Garbled("version 1 line longer than 107 bytes"));
        }
        return Ok(Parsed::Incomplete);
    };
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..end])
        .map_err(|_| ProxyError::Garbled("version 1 line is not ASCII"))?;
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or_default();
    let source = match family {
        // "UNKNOWN" may be followed by anything: the receiver ignores it (spec §2.1).
        "UNKNOWN" => None,
        "TCP4" | "TCP6" => {
            let mut next = |what| fields.next().ok_or(ProxyError::Garbled(what));
            let (src, dst) = (
                next("missing source address")?,
                next("missing destination")?,
            );
            let (sport, dport) = (next("missing source port")?, next("missing port")?);
            if fields.next().is_some() {
                return Err(ProxyError::Garbled("extra fields in the version 1 line"));
            }
            let address = |text: &str| -> Result<IpAddr, ProxyError> {
                let ip = if family == "TCP4" {
                    text.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    text.parse::<Ipv6Addr>().map(IpAddr::V6)
                };
                ip.map_err(|_| ProxyError::Garbled("bad address for its family"))
            };
            let port = |text: &str| -> Result<u16, ProxyError> {
                let digits_only = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
                let leading_zero = text.len() > 1 && text.starts_with('0');
                match text.parse() {
                    Ok(port) if digits_only && !leading_zero => Ok(port),
                    _ => Err(ProxyError::Garbled("bad port")),
                }
            };
            address(dst)?;
            port(dport)?;
            Some(SocketAddr::new(address(src)?, port(sport)?))
        }
        _ => {
            return Err(ProxyError::Garbled(
                "version 1 protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    Ok(Parsed::Header {
        len: end + 2,
        source,
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let signature = buf.len().min(V2_SIGNATURE.len());
    if buf[..signature] != V2_SIGNATURE[..signature] {
        return Err(ProxyError::Missing);
    }
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let (version_command, family, declared) = (buf[12], buf[13], [buf[14], buf[15]]);
    if version_command >> 4 != 2 {
        return Err(ProxyError::Garbled(
            "version 2 signature with another version",
        ));
    }
    let local = match version_command & 0x0F {
        0 => true,
        1 => false,
        _ => {
            return Err(ProxyError::Garbled(
                "version 2 command is neither LOCAL nor PROXY",
            ))
        }
    };
    let len = 16 + usize::from(u16::from_be_bytes(declared));
    if len > MAX_V2_LEN {
        return Err(ProxyError::Garbled("version 2 header longer than 4 KiB"));
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let body = &buf[16..len];
    // The address family (high nibble) and transport (low nibble): STREAM, or DGRAM,
    // which a balancer has no reason to send here but whose addresses read the same.
    let needed = match family >> 4 {
        0 => 0,
        1 => 12,
        2 => 36,
        3 => 216,
        _ => return Err(ProxyError::Garbled("version 2 address family unknown")),
    };
    if family & 0x0F > 2 {
        return Err(ProxyError::Garbled("version 2 transport unknown"));
    }
    if body.len() < needed {
        return Err(ProxyError::Garbled(
            "version 2 addresses shorter than their family",
        ));
    }
    let source = match family >> 4 {
        _ if local => None,
        1 => {
            let ip: [u8; 4] = body[..4].try_into().expect("checked length");
            Some(SocketAddr::new(
                IpAddr::from(ip),
                u16::from_be_bytes([body[8], body[9]]),
            ))
        }
        2 => {
            let ip: [u8; 16] = body[..16].try_into().expect("checked length");
            Some(SocketAddr::new(
                IpAddr::from(ip),
                u16::from_be_bytes([body[32], body[33]]),
            ))
        }
        _ => None,
    };
    Ok(Parsed::Header { len, source })
}

/// Reads the PROXY header at the start of `tcp` before `deadline`, leaving every byte
/// after it unread. Returns the client's address (`None` for LOCAL or UNKNOWN). Errors:
/// `UnexpectedEof` when the peer closed without sending anything (a TCP health check),
/// `ConnectionAborted` when it closed part-way, `TimedOut`, or `InvalidData` carrying a
/// [`ProxyError`].
pub fn read_header(tcp: &TcpStream, deadline: Instant) -> io::Result<Option<SocketAddr>> {
    // `peek` shows what has arrived without taking it. Bytes are taken only once parsing
    // says they belong to the header, so a peek never sees the same bytes twice and never
    // spins: it blocks until more arrive.
    let mut header = Vec::new();
    let mut window = vec![0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete PROXY protocol header within the handshake timeout",
            ));
        }
        tcp.set_read_timeout(Some(left))?;
        let seen = match tcp.peek(&mut window) {
            Ok(0) if header.is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed without sending anything",
                ))
            }
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "closed in the middle of the PROXY protocol header",
                ))
            }
            Ok(seen) => seen,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) if crate::net::is_timeout(&error) => continue,
            Err(error) => return Err(error),
        };
        let before = header.len();
        header.extend_from_slice(&window[..seen]);
        let (take, source) = match parse(&header) {
            Ok(Parsed::Incomplete) => (seen, None),
            Ok(Parsed::Header { len, source }) => (len - before, Some(source)),
            Err(error) => return Err(io::Error::new(io::ErrorKind::InvalidData, error)),
        };
        header.truncate(before + take);
        io::Read::read_exact(&mut &*tcp, &mut window[..take])?;
        if let Some(source) = source {
            return Ok(source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(bytes: &[u8]) -> (usize, Option<SocketAddr>) {
        match parse(bytes) {
            Ok(Parsed::Header { len, source }) => (len, source),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend([0x20 | command, family]);
        bytes.extend((body.len() as u16).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn version_1_gives_the_source_address() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 4444 3003\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            header(line),
            (43, Some("203.0.113.7:4444".parse().unwrap()))
        );
        let line = b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 443\r\n";
        assert_eq!(
            header(line),
            (line.len(), Some("[2001:db8::7]:65535".parse().unwrap()))
        );
        assert_eq!(header(b"PROXY UNKNOWN\r\n"), (15, None));
        let unknown = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
        assert_eq!(header(unknown), (unknown.len(), None));
        // The longest possible lines are accepted.
        let longest = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(header(longest).0, longest.len());
        let longest = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(longest.len(), MAX_V1_LEN);
        assert_eq!(header(longest), (MAX_V1_LEN, None));
    }

    #[test]
    fn version_2_gives_the_source_address_and_skips_tlvs() {
        let mut body = vec![203, 0, 113, 7, 10, 0, 0, 1];
        body.extend(4444u16.to_be_bytes());
        body.extend(3003u16.to_be_bytes());
        body.extend([0x04, 0x00, 0x03, b'a', b'b', b'c']); // a TLV (NOOP)
        let bytes = v2(1, 0x11, &body);
        assert_eq!(
            header(&[&bytes[..], b"\x16\x03\x01"].concat()),
            (bytes.len(), Some("203.0.113.7:4444".parse().unwrap()))
        );

        let mut body = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        body.extend(Ipv6Addr::LOCALHOST.octets());
        body.extend([0x11, 0x5c, 0x0b, 0xbb]);
        let bytes = v2(1, 0x21, &body);
        assert_eq!(
            header(&bytes),
            (52, Some("[2001:db8::7]:4444".parse().unwrap()))
        );
    }

    #[test]
    fn version_2_local_and_addressless_families_give_no_address() {
        // LOCAL: the balancer's own connection (a health check), addresses or not.
        assert_eq!(header(&v2(0, 0x00, &[])), (16, None));
        assert_eq!(header(&v2(0, 0x11, &[1; 12])), (28, None));
        // PROXY over UNIX sockets, or an unspecified family.
        assert_eq!(header(&v2(1, 0x31, &[0; 216])), (232, None));
        assert_eq!(header(&v2(1, 0x00, &[])), (16, None));
    }

    #[test]
    fn every_truncation_of_a_valid_header_needs_more() {
        let mut body = vec![203, 0, 113, 7, 10, 0, 0, 1];
        body.extend([0x11, 0x5c, 0x0b, 0xbb]);
        for whole in [
            v2(1, 0x11, &body),
            b"PROXY TCP4 203.0.113.7 10.0.0.1 4444 3003\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
        ] {
            for cut in 0..whole.len() {
                assert_eq!(
                    parse(&whole[..cut]),
                    Ok(Parsed::Incomplete),
                    "{:?}",
                    &whole[..cut]
                );
            }
        }
    }

    #[test]
    fn anything_else_is_missing_or_garbled() {
        let missing = [
            &b"GET /ws HTTP/1.1\r\n"[..],
            b"\x16\x03\x01\x02\x00",
            b"PROXX TCP4",
            b"\r\n\r\n\0\r\nQUIX\n",
        ];
        for bytes in missing {
            assert_eq!(parse(bytes), Err(ProxyError::Missing), "{bytes:?}");
        }
        let garbled: [&[u8]; 15] = [
            b"PROXY TCP4 203.0.113.7 10.0.0.1 4444\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 4444 3003 9\r\n",
            b"PROXY TCP4 2001:db8::1 10.0.0.1 4444 3003\r\n",
            b"PROXY TCP6 203.0.113.7 ::1 4444 3003\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 3003\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 +444 3003\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 0444 3003\r\n",
            b"PROXY TCP4  203.0.113.7 10.0.0.1 4444 3003\r\n",
            b"PROXY UDP4 203.0.113.7 10.0.0.1 4444 3003\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 4444 3003\n",
            b"PROXY UNKNOWN x\n\r\n",
            b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c",
            b"\r\n\r\n\0\r\nQUIT\n\x22\x11\x00\x0c",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x04\x01\x02\x03\x04",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x41\x00\x00",
        ];
        for bytes in garbled {
            assert!(
                matches!(parse(bytes), Err(ProxyError::Garbled(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(bytes),
                parse(bytes)
            );
        }
        let endless = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 200]].concat();
        assert!(matches!(parse(&endless), Err(ProxyError::Garbled(_))));
        let huge = [&V2_SIGNATURE[..], &[0x21, 0x11, 0xff, 0xff]].concat();
        assert!(matches!(parse(&huge), Err(ProxyError::Garbled(_))));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Any bytes: a verdict, never a panic; a header never claims more than it got.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Parsed::Header { len, .. }) = parse(&bytes) {
                prop_assert!(len <= bytes.len());
            }
        }

        /// Bytes after the signature: the same, with the v2 path exercised.
        #[test]
        fn arbitrary_v2_bodies_never_panic(rest in proptest::collection::vec(any::<u8>(), 0..300)) {
            let bytes = [&V2_SIGNATURE[..], &rest].concat();
            if let Ok(Parsed::Header { len, .. }) = parse(&bytes) {
                prop_assert!((16..=bytes.len()).contains(&len));
            }
        }

        /// A complete header's prefixes are all incomplete: reading stops exactly at its
        /// end, and a header trickling in is judged as it would be whole.
        #[test]
        fn prefixes_of_a_header_are_incomplete(bytes in proptest::collection::vec(any::<u8>(), 0..300), v1 in any::<bool>()) {
            let prefix: &[u8] = if v1 { b"PROXY UNKNOWN " } else { &V2_SIGNATURE };
            let bytes = [prefix, &bytes].concat();
            if let Ok(Parsed::Header { len, .. }) = parse(&bytes) {
                for cut in 0..len {
                    prop_assert_eq!(parse(&bytes[..cut]), Ok(Parsed::Incomplete));
                }
            }
        }

        /// Any TCP4 address and port round-trips through a version 1 line.
        #[test]
        fn v1_addresses_round_trip(ip in any::<[u8; 4]>(), port in any::<u16>()) {
            let source = SocketAddr::new(IpAddr::from(ip), port);
            let line = format!("PROXY TCP4 {} 10.0.0.1 {port} 3003\r\n", source.ip());
            prop_assert_eq!(
                parse(line.as_bytes()),
                Ok(Parsed::Header { len: line.len(), source: Some(source) })
            );
        }
    }
}

#[cfg(test)]
mod corpus {
    use super::*;

    /// Replays the fuzzing corpus (fuzz/corpus/proxy_protocol) with the fuzz target's checks.
    #[test]
    fn fuzz_corpus_regressions() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/proxy_protocol");
        let mut replayed = 0;
        for entry in std::fs::read_dir(dir).expect("the corpus is in the repository") {
            let data =
                std::fs::read(entry.expect("a directory entry").path()).expect("a corpus file");
            if let Ok(Parsed::Header { len, .. }) = parse(&data) {
                assert!(len <= data.len());
                assert_eq!(parse(&data[..len - 1]), Ok(Parsed::Incomplete), "{data:?}");
            }
            replayed += 1;
        }
        // An empty or missing corpus must not pass silently.
        assert!(replayed >= 20, "only {replayed} corpus files");
    }
}
