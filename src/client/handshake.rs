//! The client's opening handshake (RFC 6455 §4.1), done here rather than by tungstenite so
//! a connection thread's stack stays small (tungstenite parses responses into 124 headers
//! on the stack) and a churning client spends less per connection.
//!
//! The request is shaped like a real client's: Host from the URL, a User-Agent, and the
//! user's Origin, subprotocols, token and headers, sent alike on every connect. A refusal
//! is explained by the status, the `Server` header and the first line of the body.

use std::io;
use std::time::Instant;

use super::connection::ConnectError;
use super::response::{self, Head, HeadError};
use super::stats::Failure;
use crate::config::{ClientConfig, Target};
use crate::stream::SharedStream;

/// The User-Agent of every request (upgrade and CONNECT).
pub(super) const USER_AGENT: &str = concat!("websocket-test/", env!("CARGO_PKG_VERSION"));

/// The upgrade request, prepared once: [`render`](Self::render) adds what changes on every
/// connect (the key and the token).
#[derive(Debug)]
pub(super) struct Request {
    /// The request line and the headers before the key: Host, User-Agent, Upgrade,
    /// Connection.
    start: String,
    /// The headers after the key: version, subprotocols, Origin, the user's own.
    rest: String,
    /// The subprotocols offered, in order.
    pub(super) protocols: Vec<String>,
}

impl Request {
    /// The request for `target` with the headers `config` asks for. Fails when two flags
    /// set the same header (`--origin` and `--header 'Origin: ...'`, a token and
    /// `--header 'Authorization: ...'`).
    pub(super) fn new(target: &Target, config: &ClientConfig) -> Result<Self, String> {
        let named = |name: &str| {
            config
                .headers()
                .filter(|h| h.name.eq_ignore_ascii_case(name))
                .collect::<Vec<_>>()
        };
        if config.origin.is_some() && !named("Origin").is_empty() {
            return Err("--origin and --header 'Origin: ...' both set Origin: give one".into());
        }
        let token = config.auth_token.is_some() || config.auth_token_file.is_some();
        if token && !named("Authorization").is_empty() {
            return Err(
                "--auth-token(-file) and --header 'Authorization: ...' both set Authorization: \
                 give one"
                    .into(),
            );
        }
        let mut start = format!("GET {} HTTP/1.1\r\n", target.path);
        // The user's Host or User-Agent takes the place of ours.
        for (name, ours) in [
            ("Host", target.authority()),
            ("User-Agent", USER_AGENT.into()),
        ] {
            let theirs = named(name);
            if theirs.is_empty() {
                start += &format!("{name}: {ours}\r\n");
            }
            for header in theirs {
                start += &format!("{}: {}\r\n", header.name, header.value);
            }
        }
        start += "Upgrade: websocket\r\nConnection: Upgrade\r\n";
        let mut rest = "Sec-WebSocket-Version: 13\r\n".to_owned();
        if !config.subprotocols.is_empty() {
            rest += &format!(
                "Sec-WebSocket-Protocol: {}\r\n",
                config.subprotocols.join(", ")
            );
        }
        if let Some(origin) = &config.origin {
            rest += &format!("Origin: {origin}\r\n");
        }
        for header in config.headers() {
            if !["Host", "User-Agent"]
                .iter()
                .any(|name| header.name.eq_ignore_ascii_case(name))
            {
                rest += &format!("{}: {}\r\n", header.name, header.value);
            }
        }
        Ok(Request {
            start,
            rest,
            protocols: config.subprotocols.clone(),
        })
    }

    /// The whole request with `key` and, when given, `Authorization: Bearer TOKEN`.
    fn render(&self, key: &str, token: Option<&str>) -> String {
        let authorization = token
            .map(|token| format!("Authorization: Bearer {token}\r\n"))
            .unwrap_or_default();
        format!(
            "{}Sec-WebSocket-Key: {key}\r\n{}{authorization}\r\n",
            self.start, self.rest
        )
    }
}

/// A completed upgrade.
#[derive(Debug)]
pub(super) struct Upgraded {
    /// Bytes received after the response head (the first WebSocket frames).
    pub(super) leftover: Vec<u8>,
    /// The subprotocol the server picked, if any.
    pub(super) protocol: Option<String>,
    /// The backend that answered, from its `X-Served-By` header (our server's --server-name).
    pub(super) backend: Option<String>,
}

/// Sends `request` (with `token`, if any) and checks the server's answer by `deadline`.
pub(super) fn upgrade(
    stream: &SharedStream,
    request: &Request,
    token: Option<&str>,
    deadline: Instant,
) -> Result<Upgraded, ConnectError> {
    let tcp = stream.tcp();
    let key = tungstenite::handshake::client::generate_key();
    response::time_left(tcp, deadline).map_err(describe_io)?;
    stream
        .write_all(request.render(&key, token).as_bytes())
        .map_err(describe_io)?;
    let (head, after) =
        response::read_head(stream, tcp, deadline).map_err(|error| match error {
            HeadError::TimedOut => timed_out(),
            HeadError::Closed => invalid("handshake failed: the server closed the connection"),
            HeadError::TooLarge => invalid("handshake failed: response head larger than 8 KiB"),
            HeadError::Malformed(error) => {
                invalid(format!("handshake failed: malformed response: {error}"))
            }
            HeadError::Io(error) => describe_io(error),
        })?;
    if head.status != 101 {
        let line = response::body_line(stream, tcp, deadline, &head, after);
        // A 503 or 429 may say when to come back (in seconds; an HTTP date is not read).
        let retry_after = head
            .get("Retry-After")
            .and_then(|value| value.trim().parse().ok())
            .map(std::time::Duration::from_secs);
        return Err(ConnectError::new(
            Failure::Refused,
            format!(
                "handshake failed: server answered {}",
                head.summary(line.as_deref())
            ),
        )
        .retry_after(retry_after));
    }
    let protocol = check_upgrade(&head, &key, &request.protocols)?;
    Ok(Upgraded {
        leftover: after,
        protocol,
        backend: head
            .get("X-Served-By")
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_owned),
    })
}

/// Checks a 101 answer to `key` (RFC 6455 §4.1, the client's checks) and returns the
/// subprotocol picked from `offered`, if any.
fn check_upgrade(
    head: &Head,
    key: &str,
    offered: &[String],
) -> Result<Option<String>, ConnectError> {
    if !head
        .get("Upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
    {
        return Err(invalid(
            "handshake failed: 101 without 'Upgrade: websocket'",
        ));
    }
    let connection_upgrade = head.all("Connection").any(|value| {
        value
            .split(',')
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
    });
    if !connection_upgrade {
        return Err(invalid(
            "handshake failed: 101 without 'Connection: Upgrade'",
        ));
    }
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    if head.get("Sec-WebSocket-Accept") != Some(expected.as_str()) {
        return Err(invalid("handshake failed: wrong Sec-WebSocket-Accept"));
    }
    if let Some(extensions) = head.get("Sec-WebSocket-Extensions") {
        return Err(invalid(format!(
            "handshake failed: the server accepted extensions {extensions:?}, and none were offered"
        )));
    }
    let picked: Vec<&str> = head.all("Sec-WebSocket-Protocol").collect();
    match picked[..] {
        [] => Ok(None),
        [one] if offered.iter().any(|p| p == one) => Ok(Some(one.to_owned())),
        [one] if offered.is_empty() => Err(invalid(format!(
            "handshake failed: the server picked subprotocol {one:?}, and none was offered"
        ))),
        [one] => Err(invalid(format!(
            "handshake failed: the server picked subprotocol {one:?}, which was not offered \
             (offered: {})",
            offered.join(", ")
        ))),
        _ => Err(invalid(
            "handshake failed: the server sent more than one Sec-WebSocket-Protocol header",
        )),
    }
}

fn invalid(message: impl Into<String>) -> ConnectError {
    ConnectError::new(Failure::Handshake, message)
}

fn timed_out() -> ConnectError {
    ConnectError::new(Failure::Timeout, "handshake timed out")
}

fn describe_io(error: io::Error) -> ConnectError {
    if crate::net::is_timeout(&error) {
        timed_out()
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
    use clap::Parser;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn check(extra: &str, offered: &[&str]) -> Result<Option<String>, ConnectError> {
        let text = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {ACCEPT}\r\n{extra}\r\n"
        );
        let (head, _) = response::parse_head(text.as_bytes()).unwrap().unwrap();
        let offered: Vec<String> = offered.iter().map(|p| (*p).to_owned()).collect();
        check_upgrade(&head, KEY, &offered)
    }

    #[test]
    fn answers_are_checked() {
        assert_eq!(check("", &[]), Ok(None));
        assert_eq!(check("", &["chat"]), Ok(None));
        let text =
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                    Sec-WebSocket-Accept: AAAA\r\n\r\n";
        let (head, _) = response::parse_head(text.as_bytes()).unwrap().unwrap();
        let error = check_upgrade(&head, KEY, &[]).unwrap_err();
        assert_eq!(error.cause, Failure::Handshake);
        assert!(
            error.to_string().contains("Sec-WebSocket-Accept"),
            "{error}"
        );
    }

    #[test]
    fn only_an_offered_subprotocol_may_be_picked() {
        let picked = |name: &str| format!("Sec-WebSocket-Protocol: {name}\r\n");
        assert_eq!(
            check(&picked("superchat"), &["chat", "superchat"]),
            Ok(Some("superchat".into()))
        );
        for (answer, offered, says) in [
            (picked("chat"), &[][..], "none was offered"),
            (
                picked("other"),
                &["chat"][..],
                "not offered (offered: chat)",
            ),
            (picked("Chat"), &["chat"][..], "not offered"),
            (
                picked("chat, superchat"),
                &["chat", "superchat"][..],
                "not offered",
            ),
            (
                format!("{}{}", picked("chat"), picked("chat")),
                &["chat"][..],
                "more than one",
            ),
            (
                "Sec-WebSocket-Extensions: permessage-deflate\r\n".to_owned(),
                &[][..],
                "extensions",
            ),
        ] {
            let error = check(&answer, offered).unwrap_err();
            assert_eq!(error.cause, Failure::Handshake, "{answer}");
            assert!(error.to_string().contains(says), "{answer}: {error}");
        }
    }

    fn request(args: &[&str]) -> Result<String, String> {
        let mut all = vec!["client"];
        all.extend_from_slice(args);
        let config = ClientConfig::try_parse_from(all).map_err(|e| e.to_string())?;
        Ok(Request::new(&config.target(), &config)?.render(KEY, None))
    }

    #[test]
    fn requests_carry_host_user_agent_and_the_users_headers() {
        assert_eq!(
            request(&["--url", "ws://[::1]:8080/ws?x=1"]).unwrap(),
            format!(
                "GET /ws?x=1 HTTP/1.1\r\nHost: [::1]:8080\r\nUser-Agent: {USER_AGENT}\r\n\
                 Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            )
        );
        let text = request(&[
            "--url",
            "wss://lb.example.com/echo",
            "--origin",
            "https://app.example.com",
            "--subprotocol",
            "chat",
            "--subprotocol",
            "v2.chat",
            "--header",
            "X-Team: sre",
            "--header",
            "host: internal.example:8443",
            "--header",
            "user-agent: probe/1",
        ])
        .unwrap();
        assert!(
            text.starts_with(
                "GET /echo HTTP/1.1\r\nhost: internal.example:8443\r\nuser-agent: probe/1\r\n\
                 Upgrade: websocket\r\n"
            ),
            "{text}"
        );
        assert!(
            text.ends_with(
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat, v2.chat\r\n\
                 Origin: https://app.example.com\r\nX-Team: sre\r\n\r\n"
            ),
            "{text}"
        );
        assert_eq!(
            text.matches("Host").count() + text.matches("host").count(),
            1
        );
        let with_token = Request::new(
            &crate::config::parse_url("ws://a/").unwrap(),
            &ClientConfig::try_parse_from(["client"]).unwrap(),
        )
        .unwrap()
        .render(KEY, Some("t0k3n"));
        assert!(
            with_token.ends_with("Authorization: Bearer t0k3n\r\n\r\n"),
            "{with_token}"
        );
    }

    #[test]
    fn two_flags_for_one_header_are_refused() {
        for args in [
            &["--origin", "https://a", "--header", "Origin: https://b"][..],
            &["--auth-token", "t", "--header", "authorization: Basic eA=="][..],
            &["--auth-token-file", "/t", "--header", "Authorization: x"][..],
        ] {
            let error = request(args).unwrap_err();
            assert!(error.contains("give one"), "{args:?}: {error}");
        }
    }
}
