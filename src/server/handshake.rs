//! The HTTP/1.1 request that opens a connection: a WebSocket upgrade on the configured path,
//! a health check on `/`, or an error with a status line that says what was wrong.
//!
//! [`decide`] is pure (bytes in, decision out) so it can be tested and fuzzed on its own;
//! [`accept`] does the socket I/O around it under the handshake deadline.

use std::io;
use std::time::{Duration, Instant};

use crate::stream::SharedStream;

/// Largest request head accepted; a longer one is answered 431.
pub const MAX_HEAD_SIZE: usize = 8192;
const MAX_HEADERS: usize = 64;

/// What to do with the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The head is incomplete: read more.
    NeedMore,
    /// A valid upgrade: answer 101 with this accept key. The head is `head_len` bytes;
    /// anything after it is already WebSocket data.
    Upgrade {
        /// Length of the request head, including the blank line.
        head_len: usize,
        /// The `Sec-WebSocket-Accept` value.
        accept_key: String,
    },
    /// Answer with this response and close.
    Reply(Reply),
}

/// A complete non-upgrade HTTP response.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The one-line body: what happened or what was wrong.
    pub message: &'static str,
    /// Extra header lines, each ending in CRLF.
    pub headers: &'static str,
    /// Whether to omit the body (a HEAD request).
    pub head_only: bool,
}

impl Reply {
    fn new(status: u16, message: &'static str) -> Self {
        Reply {
            status,
            message,
            headers: "",
            head_only: false,
        }
    }

    /// 503 with `Retry-After`: the server cannot take another connection now.
    pub fn service_unavailable() -> Self {
        Reply::new(503, "server at its connection limit, retry later")
            .with_headers("Retry-After: 5\r\n")
    }

    fn with_headers(self, headers: &'static str) -> Self {
        Reply { headers, ..self }
    }

    /// The response as bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = format!("{}\n", self.message);
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
            self.status,
            reason_phrase(self.status),
            body.len(),
            self.headers
        );
        if !self.head_only {
            out.push_str(&body);
        }
        out.into_bytes()
    }
}

/// Decides how to answer the request head in `buf` for a server whose WebSocket endpoint is
/// `ws_path`.
pub fn decide(buf: &[u8], ws_path: &str) -> Decision {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_SIZE => {
            return Decision::Reply(Reply::new(431, "request head larger than 8 KiB"))
        }
        Ok(httparse::Status::Partial) => return Decision::NeedMore,
        Err(httparse::Error::TooManyHeaders) => {
            return Decision::Reply(Reply::new(431, "too many request headers"))
        }
        Err(httparse::Error::Version) => {
            return Decision::Reply(Reply::new(505, "HTTP/1.1 required"))
        }
        Err(_) => return Decision::Reply(Reply::new(400, "malformed HTTP request")),
    };
    if head_len > MAX_HEAD_SIZE {
        return Decision::Reply(Reply::new(431, "request head larger than 8 KiB"));
    }
    if request.version != Some(1) {
        return Decision::Reply(Reply::new(505, "HTTP/1.1 required"));
    }
    let method = request.method.unwrap_or_default();
    let path = request.path.unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default();

    if path == "/" && path != ws_path {
        return match method {
            "GET" => Decision::Reply(Reply::new(200, "ok")),
            "HEAD" => Decision::Reply(Reply {
                head_only: true,
                ..Reply::new(200, "ok")
            }),
            _ => Decision::Reply(
                Reply::new(405, "method not allowed").with_headers("Allow: GET, HEAD\r\n"),
            ),
        };
    }
    if path != ws_path {
        return Decision::Reply(Reply::new(404, "not found"));
    }
    if method != "GET" {
        return Decision::Reply(
            Reply::new(405, "WebSocket upgrades must use GET").with_headers("Allow: GET\r\n"),
        );
    }
    match check_upgrade(request.headers) {
        Ok(key) => Decision::Upgrade {
            head_len,
            accept_key: tungstenite::handshake::derive_accept_key(key.as_bytes()),
        },
        Err(reply) => Decision::Reply(reply),
    }
}

/// Checks the headers RFC 6455 §4.2.1 requires and returns the `Sec-WebSocket-Key`.
fn check_upgrade<'h>(headers: &[httparse::Header<'h>]) -> Result<&'h str, Reply> {
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let has_token = |name: &'static str, token: &str| {
        values(name).any(|value| {
            std::str::from_utf8(value)
                .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if values("Host").next().is_none() {
        return Err(Reply::new(400, "missing Host header"));
    }
    if !has_token("Upgrade", "websocket") {
        return Err(Reply::new(
            400,
            "not a WebSocket upgrade: missing 'Upgrade: websocket' header",
        ));
    }
    if !has_token("Connection", "upgrade") {
        return Err(Reply::new(
            400,
            "not a WebSocket upgrade: missing 'Connection: Upgrade' header",
        ));
    }
    let mut versions = values("Sec-WebSocket-Version");
    if versions.next().map(<[u8]>::trim_ascii) != Some(b"13") || versions.next().is_some() {
        return Err(Reply::new(
            426,
            "unsupported Sec-WebSocket-Version: only 13 is supported",
        )
        .with_headers("Sec-WebSocket-Version: 13\r\n"));
    }
    let mut keys = values("Sec-WebSocket-Key");
    match (keys.next(), keys.next()) {
        (Some(key), None) if is_valid_key(key.trim_ascii()) => {
            Ok(std::str::from_utf8(key.trim_ascii()).expect("checked to be base64"))
        }
        (None, _) => Err(Reply::new(400, "missing Sec-WebSocket-Key header")),
        _ => Err(Reply::new(
            400,
            "invalid Sec-WebSocket-Key: must be 16 bytes in base64",
        )),
    }
}

/// A key is 16 random bytes in base64: 22 significant characters and `==`.
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// How the opening request ended.
#[derive(Debug)]
pub enum Handshake {
    /// Upgraded: the 101 went out. `leftover` holds WebSocket bytes read past the request.
    Upgraded {
        /// Bytes received after the request head.
        leftover: Vec<u8>,
    },
    /// Answered with a plain HTTP response; the connection is done.
    Answered {
        /// The status sent.
        status: u16,
        /// The reason sent in the body.
        message: &'static str,
    },
}

/// Reads the request head from `stream` before `deadline` (one deadline across all reads,
/// so a client trickling a byte at a time is cut off too) and answers it.
pub fn accept(stream: &SharedStream, ws_path: &str, deadline: Instant) -> io::Result<Handshake> {
    let tcp = stream.tcp();
    let mut buf = Vec::with_capacity(1024);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() && !buf.is_empty() {
            // A client that started a request learns why it is cut off; a silent one (a
            // port scanner, a TCP health check) is just closed.
            let reply = Reply::new(408, "no complete request within the handshake timeout");
            let _ = tcp.set_write_timeout(Some(Duration::from_millis(100)));
            stream.write_all(&reply.to_bytes())?;
            return Ok(Handshake::Answered {
                status: reply.status,
                message: reply.message,
            });
        }
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request within the handshake timeout",
            ));
        }
        tcp.set_read_timeout(Some(left))?;
        match crate::net::read_head_chunk(stream, &mut buf, MAX_HEAD_SIZE) {
            // Nothing sent at all is a TCP health check or a port scan (UnexpectedEof); a
            // request cut short is a failed upgrade (ConnectionAborted).
            Ok(0) if buf.is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed without sending a request",
                ))
            }
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "closed before completing the request",
                ))
            }
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) if crate::net::is_timeout(&error) => continue,
            Err(error) => return Err(error),
        }
        match decide(&buf, ws_path) {
            Decision::NeedMore => {}
            Decision::Upgrade {
                head_len,
                accept_key,
            } => {
                let response = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_key}\r\n\r\n"
                );
                stream.write_all(response.as_bytes())?;
                buf.drain(..head_len);
                return Ok(Handshake::Upgraded { leftover: buf });
            }
            Decision::Reply(reply) => {
                stream.write_all(&reply.to_bytes())?;
                return Ok(Handshake::Answered {
                    status: reply.status,
                    message: reply.message,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn upgrade_request(extra: &str) -> String {
        format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn status(request: &str) -> u16 {
        match decide(request.as_bytes(), "/ws") {
            Decision::Reply(reply) => reply.status,
            Decision::Upgrade { .. } => 101,
            Decision::NeedMore => 0,
        }
    }

    #[test]
    fn valid_upgrade_uses_the_rfc_accept_key() {
        let request = upgrade_request("");
        let with_data = format!("{request}\u{81}");
        assert_eq!(
            decide(with_data.as_bytes(), "/ws"),
            Decision::Upgrade {
                head_len: request.len(),
                accept_key: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into()
            }
        );
    }

    #[test]
    fn routes_and_errors() {
        assert_eq!(status("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
        assert_eq!(status("GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"), 404);
        assert_eq!(status("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"), 400);
        assert_eq!(status("POST /ws HTTP/1.1\r\nHost: x\r\n\r\n"), 405);
        assert_eq!(status("GET /ws HTTP/1.0\r\nHost: x\r\n\r\n"), 505);
        assert_eq!(status("GET /ws HTTP/1.1\r\nHost: x\r\n"), 0);
        assert_eq!(status("\u{16}\u{3}\u{1}garbage\r\n\r\n"), 400);
        assert_eq!(status(&upgrade_request("").replace("13", "8")), 426);
        assert_eq!(status(&upgrade_request("").replace(KEY, "short")), 400);
        assert_eq!(
            status(&upgrade_request(&format!("Sec-WebSocket-Key: {KEY}\r\n"))),
            400
        );
        assert_eq!(status(&upgrade_request("").replace("Host: x\r\n", "")), 400);
        let huge = format!("GET /ws HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_SIZE));
        assert_eq!(status(&huge), 431);
    }

    #[test]
    fn replies_carry_a_status_line_and_one_line_reason() {
        let bytes = Reply::new(426, "only 13")
            .with_headers("Sec-WebSocket-Version: 13\r\n")
            .to_bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(text.ends_with("\r\n\r\nonly 13\n"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const PATH: &str = "/ws";

    fn header_line() -> impl Strategy<Value = String> {
        ("[A-Za-z-]{1,20}", "[ -~]{0,40}").prop_map(|(name, value)| format!("{name}: {value}\r\n"))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Any bytes at all: a decision, never a panic, and never an upgrade for garbage
        /// that lacks the required headers.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Decision::Upgrade { head_len, .. } = decide(&bytes, PATH) {
                prop_assert!(head_len <= bytes.len());
            }
        }

        /// Request-shaped input: every reply is a real status line with a one-line body.
        #[test]
        fn requests_get_a_status_line(
            method in "(GET|POST|HEAD|PUT|[A-Z]{1,8})",
            path in "/[a-z/]{0,10}",
            headers in proptest::collection::vec(header_line(), 0..12),
        ) {
            let request = format!("{method} {path} HTTP/1.1\r\n{}\r\n", headers.concat());
            match decide(request.as_bytes(), PATH) {
                Decision::Reply(reply) => {
                    let text = String::from_utf8(reply.to_bytes()).unwrap();
                    let status_line = format!("HTTP/1.1 {} ", reply.status);
                    prop_assert!(text.starts_with(&status_line), "{}", text);
                    prop_assert!(!reply.message.contains('\n'));
                }
                Decision::Upgrade { head_len, .. } => prop_assert_eq!(head_len, request.len()),
                Decision::NeedMore => prop_assert!(false, "a complete head needs no more bytes"),
            }
        }

        /// A valid upgrade split anywhere needs more bytes until the head is complete, and
        /// extra headers in any case never stop it from upgrading.
        #[test]
        fn valid_upgrades_upgrade_at_any_split(
            split in 0usize..200,
            extra in proptest::collection::vec(header_line(), 0..6),
        ) {
            let extra: String = extra.into_iter()
                .filter(|line| !line.to_ascii_lowercase().starts_with("sec-websocket") && !line.to_ascii_lowercase().starts_with("host:") && !line.to_ascii_lowercase().starts_with("upgrade:") && !line.to_ascii_lowercase().starts_with("connection:"))
                .collect();
            let request = format!(
                "GET /ws?x=1 HTTP/1.1\r\nhost: a\r\n{extra}UPGRADE: WebSocket\r\nconnection: Upgrade\r\n\
                 sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            );
            let split = split.min(request.len() - 1);
            prop_assert_eq!(decide(&request.as_bytes()[..split], PATH), Decision::NeedMore);
            let upgraded = matches!(decide(request.as_bytes(), PATH), Decision::Upgrade { .. });
            prop_assert!(upgraded);
        }
    }
}

#[cfg(test)]
mod corpus {
    use super::*;

    /// Replays the fuzzing corpus (fuzz/corpus/handshake) with the fuzz target's checks.
    #[test]
    fn fuzz_corpus_regressions() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/handshake");
        let mut replayed = 0;
        for entry in std::fs::read_dir(dir).expect("the corpus is in the repository") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            match decide(&data, "/ws") {
                Decision::Upgrade {
                    head_len,
                    accept_key,
                } => {
                    assert!(head_len <= data.len());
                    assert_eq!(accept_key.len(), 28);
                }
                Decision::Reply(reply) => {
                    assert!(reply
                        .to_bytes()
                        .starts_with(format!("HTTP/1.1 {} ", reply.status).as_bytes()));
                }
                Decision::NeedMore => assert!(data.len() < MAX_HEAD_SIZE),
            }
            replayed += 1;
        }
        // An empty or missing corpus must not pass silently (it holds about 500 inputs).
        assert!(replayed >= 100, "only {replayed} corpus files");
    }
}
