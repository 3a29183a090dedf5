//! The client's opening handshake (RFC 6455 §4.1), done here rather than by tungstenite so
//! a connection thread's stack stays small (tungstenite parses responses into 124 headers
//! on the stack) and a churning client spends less per connection.

use std::io;
use std::time::Instant;

use super::connection::ConnectError;
use super::stats::Failure;
use crate::stream::SharedStream;

/// Largest response head accepted.
const MAX_HEAD_SIZE: usize = 8192;
const MAX_HEADERS: usize = 32;

/// Sends the upgrade request for `path` on `authority` (the Host header) and checks the
/// server's answer. Returns the bytes received after the response head (the first
/// WebSocket frames).
pub fn upgrade(
    stream: &SharedStream,
    authority: &str,
    path: &str,
    deadline: Instant,
) -> Result<Vec<u8>, ConnectError> {
    let tcp = stream.tcp();
    // Every read and write gets what is left until the deadline, so a server trickling its
    // answer cannot stretch the handshake past it.
    let time_left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ConnectError::new(Failure::Timeout, "handshake timed out"));
        }
        tcp.set_read_timeout(Some(left))
            .and_then(|()| tcp.set_write_timeout(Some(left)))
            .map_err(describe_io)
    };
    let key = tungstenite::handshake::client::generate_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    time_left()?;
    stream.write_all(request.as_bytes()).map_err(describe_io)?;

    let mut buf = Vec::with_capacity(512);
    loop {
        if buf.len() == MAX_HEAD_SIZE {
            return Err(invalid("handshake failed: response head larger than 8 KiB"));
        }
        time_left()?;
        match crate::net::read_head_chunk(stream, &mut buf, MAX_HEAD_SIZE) {
            Ok(0) => {
                return Err(invalid(
                    "handshake failed: the server closed the connection",
                ))
            }
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(describe_io(error)),
        }
        if let Some(head_len) = check_response(&buf, &key)? {
            buf.drain(..head_len);
            return Ok(buf);
        }
    }
}

/// `Ok(None)` while the head is incomplete; `Ok(Some(len))` for a valid 101 of `len` bytes.
fn check_response(buf: &[u8], key: &str) -> Result<Option<usize>, ConnectError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => {
            return Err(invalid(format!(
                "handshake failed: malformed response: {error}"
            )))
        }
    };
    let status = response.code.unwrap_or_default();
    if status != 101 {
        let reason = response.reason.unwrap_or_default();
        return Err(ConnectError::new(
            Failure::Refused,
            format!("handshake failed: server answered {status} {reason}"),
        ));
    }
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.trim_ascii())
    };
    if !header("Upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket")) {
        return Err(invalid(
            "handshake failed: 101 without 'Upgrade: websocket'",
        ));
    }
    let connection_upgrade = header("Connection").is_some_and(|v| {
        v.split(|b| *b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    });
    if !connection_upgrade {
        return Err(invalid(
            "handshake failed: 101 without 'Connection: Upgrade'",
        ));
    }
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    if header("Sec-WebSocket-Accept") != Some(expected.as_bytes()) {
        return Err(invalid("handshake failed: wrong Sec-WebSocket-Accept"));
    }
    Ok(Some(head_len))
}

fn invalid(message: impl Into<String>) -> ConnectError {
    ConnectError::new(Failure::Handshake, message)
}

fn describe_io(error: io::Error) -> ConnectError {
    if crate::net::is_timeout(&error) {
        ConnectError::new(Failure::Timeout, "handshake timed out")
    } else if crate::stream::is_tls_error(&error) {
        // A server that wants a client certificate says so only after the handshake.
        ConnectError::new(Failure::Tls, error.to_string())
    } else {
        invalid(format!("handshake failed: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let good =
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                    Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert_eq!(check_response(good.as_bytes(), key), Ok(Some(good.len())));
        assert_eq!(check_response(&good.as_bytes()[..40], key), Ok(None));
        let wrong_key = good.replace("s3pP", "AAAA");
        let error = check_response(wrong_key.as_bytes(), key).unwrap_err();
        assert_eq!(error.cause, Failure::Handshake);
        assert!(error.to_string().contains("Sec-WebSocket-Accept"));
        let refused = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\n\r\n";
        let error = check_response(refused.as_bytes(), key).unwrap_err();
        assert_eq!(error.cause, Failure::Refused);
        assert_eq!(
            error.to_string(),
            "handshake failed: server answered 503 Service Unavailable"
        );
    }
}
