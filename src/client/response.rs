//! HTTP/1.1 responses as the client reads them, from the server (the upgrade) or from a
//! proxy (CONNECT), within the connect deadline: the head, and for a refusal a few KiB of
//! the body, whose first line usually says who refused and why (nginx, HAProxy and our
//! server each say something different there).

use std::io::{self, Read};
use std::net::TcpStream;
use std::ops::Range;
use std::time::Instant;

/// Largest response head accepted.
pub(super) const MAX_HEAD_SIZE: usize = 8192;
const MAX_HEADERS: usize = 32;
/// Most body bytes read to find its first line.
const MAX_BODY: usize = 4096;
/// Longest body line quoted in a log line, in characters.
const MAX_LINE: usize = 200;

/// A response head, its header values decoded lossily and trimmed. Its text is kept in one
/// string (every connect reads a head: two allocations, not two per header).
#[derive(Debug)]
pub(super) struct Head {
    pub(super) status: u16,
    /// The reason phrase, then each header's name and value, end to end.
    text: String,
    reason: Range<usize>,
    headers: Vec<(Range<usize>, Range<usize>)>,
}

impl Head {
    /// The reason phrase of the status line.
    pub(super) fn reason(&self) -> &str {
        &self.text[self.reason.clone()]
    }

    /// The values of header `name`, in order.
    pub(super) fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| self.text[n.clone()].eq_ignore_ascii_case(name))
            .map(|(_, value)| &self.text[value.clone()])
    }

    /// The first value of header `name`.
    pub(super) fn get<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.all(name).next()
    }

    /// `403 Forbidden (Server: nginx/1.22.1): <first body line>`: the status line, the
    /// headers that tell who answered and where it sends the client, and the body's line.
    pub(super) fn summary(&self, body_line: Option<&str>) -> String {
        let mut text = format!("{} {}", self.status, self.reason());
        let notable: Vec<String> = ["Server", "Location"]
            .iter()
            .filter_map(|name| Some(format!("{name}: {}", self.get(name)?)))
            .collect();
        if !notable.is_empty() {
            text = format!("{text} ({})", notable.join("; "));
        }
        match body_line {
            Some(line) => format!("{text}: {line}"),
            None => text,
        }
    }
}

/// Why no response head could be read.
#[derive(Debug)]
pub(super) enum HeadError {
    /// The deadline passed first.
    TimedOut,
    /// The peer closed the connection first.
    Closed,
    /// The head was longer than [`MAX_HEAD_SIZE`].
    TooLarge,
    /// Not an HTTP/1.x response.
    Malformed(httparse::Error),
    /// The socket (or TLS) failed.
    Io(io::Error),
}

impl HeadError {
    fn from_io(error: io::Error) -> Self {
        if crate::net::is_timeout(&error) {
            HeadError::TimedOut
        } else {
            HeadError::Io(error)
        }
    }
}

/// Sets the read and write timeouts of `tcp` to what is left until `deadline`, so a peer
/// trickling its answer cannot stretch an exchange past it; `TimedOut` once it has passed.
pub(super) fn time_left(tcp: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
    }
    tcp.set_read_timeout(Some(left))?;
    tcp.set_write_timeout(Some(left))
}

/// Reads a response head from `source` (whose socket is `tcp`) by `deadline`. Returns it
/// with the bytes received after it.
pub(super) fn read_head(
    mut source: impl Read,
    tcp: &TcpStream,
    deadline: Instant,
) -> Result<(Head, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(512);
    loop {
        if buf.len() >= MAX_HEAD_SIZE {
            return Err(HeadError::TooLarge);
        }
        time_left(tcp, deadline).map_err(HeadError::from_io)?;
        match crate::net::read_head_chunk(&mut source, &mut buf, MAX_HEAD_SIZE) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(HeadError::from_io(error)),
        }
        if let Some((head, len)) = parse_head(&buf)? {
            buf.drain(..len);
            return Ok((head, buf));
        }
    }
}

/// `Ok(None)` while the head in `buf` is incomplete; the head and its length once it is.
pub(super) fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(HeadError::Malformed(error)),
    };
    let mut text = String::with_capacity(len);
    let mut push = |part: &str| {
        let start = text.len();
        text.push_str(part);
        start..text.len()
    };
    let reason = push(response.reason.unwrap_or_default());
    let headers = response
        .headers
        .iter()
        .map(|h| {
            let name = push(h.name);
            (name, push(&String::from_utf8_lossy(h.value.trim_ascii())))
        })
        .collect();
    let head = Head {
        status: response.code.unwrap_or_default(),
        text,
        reason,
        headers,
    };
    Ok(Some((head, len)))
}

/// How a body ends (RFC 9112 §6.3).
enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

/// The first line of the body of `head` with text in it (lines of bare tags, such as
/// nginx's `<html>`, are skipped), at most [`MAX_LINE`] characters. Reads at most
/// [`MAX_BODY`] bytes: `already` (what came with the head), then from `source` by
/// Content-Length, chunks or until the peer closes, stopping at `deadline`.
pub(super) fn body_line(
    mut source: impl Read,
    tcp: &TcpStream,
    deadline: Instant,
    head: &Head,
    mut body: Vec<u8>,
) -> Option<String> {
    let framing = if matches!(head.status, 100..=199 | 204 | 304) {
        Framing::None
    } else if head
        .all("Transfer-Encoding")
        .any(|value| value.to_ascii_lowercase().contains("chunked"))
    {
        Framing::Chunked
    } else if let Some(length) = head.get("Content-Length") {
        Framing::Length(length.parse().unwrap_or(0))
    } else {
        Framing::UntilClose
    };
    let complete = |body: &[u8]| {
        body.len() >= MAX_BODY
            || match framing {
                Framing::None => true,
                Framing::Length(length) => body.len() >= length,
                Framing::Chunked => dechunk(body).1,
                Framing::UntilClose => false,
            }
    };
    let mut chunk = [0u8; 1024];
    while !complete(&body) && time_left(tcp, deadline).is_ok() {
        match source.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    body.truncate(MAX_BODY);
    let body = match framing {
        Framing::None => return None,
        Framing::Length(length) => {
            body.truncate(length);
            body
        }
        Framing::Chunked => dechunk(&body).0,
        Framing::UntilClose => body,
    };
    first_text_line(&String::from_utf8_lossy(&body))
}

/// The data of a chunked body as far as it has arrived, and whether its last chunk has.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut data = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return (data, false);
        };
        let size = std::str::from_utf8(&raw[..eol])
            .ok()
            .and_then(|line| line.split(';').next())
            .and_then(|size| usize::from_str_radix(size.trim(), 16).ok());
        let Some(size) = size else {
            return (data, true);
        };
        if size == 0 {
            return (data, true);
        }
        let rest = &raw[eol + 2..];
        data.extend_from_slice(&rest[..size.min(rest.len())]);
        match rest.get(size + 2..) {
            Some(next) => raw = next,
            None => return (data, false),
        }
    }
}

/// The first line of `text` that still has text once tags are removed, trimmed and cut to
/// [`MAX_LINE`] characters.
fn first_text_line(text: &str) -> Option<String> {
    let line = text.lines().map(str::trim).find(|line| has_text(line))?;
    Some(match line.char_indices().nth(MAX_LINE) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line.to_owned(),
    })
}

/// Whether `line` has anything but whitespace outside `<...>` tags.
fn has_text(line: &str) -> bool {
    let mut in_tag = false;
    line.chars().any(|c| match c {
        '<' => {
            in_tag = true;
            false
        }
        '>' if in_tag => {
            in_tag = false;
            false
        }
        c => !in_tag && !c.is_whitespace(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes())
            .expect("well formed")
            .expect("complete")
            .0
    }

    #[test]
    fn heads_are_parsed_when_complete() {
        let text =
            "HTTP/1.1 403 Forbidden\r\nServer: nginx/1.22.1\r\nX-A:  1 \r\nx-a: 2\r\n\r\nbody";
        let (parsed, len) = parse_head(text.as_bytes()).unwrap().unwrap();
        assert_eq!(len, text.len() - 4);
        assert_eq!((parsed.status, parsed.reason()), (403, "Forbidden"));
        assert_eq!(parsed.all("X-A").collect::<Vec<_>>(), ["1", "2"]);
        assert!(parse_head(&text.as_bytes()[..20]).unwrap().is_none());
        assert!(matches!(
            parse_head(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn summaries_name_the_status_the_server_and_the_body_line() {
        let nginx = head("HTTP/1.1 403 Forbidden\r\nServer: nginx/1.22.1\r\n\r\n");
        assert_eq!(
            nginx.summary(Some("<head><title>403 Forbidden</title></head>")),
            "403 Forbidden (Server: nginx/1.22.1): <head><title>403 Forbidden</title></head>"
        );
        let redirect = head("HTTP/1.1 308 Permanent Redirect\r\nLocation: https://x/\r\n\r\n");
        assert_eq!(
            redirect.summary(None),
            "308 Permanent Redirect (Location: https://x/)"
        );
    }

    #[test]
    fn the_first_line_with_text_is_quoted() {
        let nginx = "<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n";
        assert_eq!(
            first_text_line(nginx).as_deref(),
            Some("<head><title>403 Forbidden</title></head>")
        );
        let haproxy =
            "<html><body><h1>403 Forbidden</h1>\nRequest forbidden by administrative rules.\n";
        assert_eq!(
            first_text_line(haproxy).as_deref(),
            Some("<html><body><h1>403 Forbidden</h1>")
        );
        assert_eq!(
            first_text_line("\n\nnot found\n").as_deref(),
            Some("not found")
        );
        assert_eq!(first_text_line("<html>\n<body>\n</body>"), None);
        assert_eq!(first_text_line(""), None);
        let long = "é".repeat(300);
        assert_eq!(
            first_text_line(&long).unwrap(),
            format!("{}...", "é".repeat(MAX_LINE))
        );
    }

    #[test]
    fn chunked_bodies_are_decoded_as_far_as_they_came() {
        assert_eq!(
            dechunk(b"4\r\nnot \r\n5;x=1\r\nfound\r\n0\r\n\r\n"),
            (b"not found".to_vec(), true)
        );
        assert_eq!(dechunk(b"4\r\nno"), (b"no".to_vec(), false));
        assert_eq!(dechunk(b"4\r\nnot \r\n"), (b"not ".to_vec(), false));
        assert_eq!(dechunk(b"zz\r\n"), (Vec::new(), true));
    }
}
