//! Outbound HTTP proxies: which one a target goes through, read as curl reads `--proxy`,
//! `https_proxy`/`HTTPS_PROXY` (wss), `http_proxy`/`HTTP_PROXY` (ws) and
//! `no_proxy`/`NO_PROXY`; and the CONNECT tunnel through it, inside which TLS and the
//! upgrade go to the real target.

use std::io::Write;
use std::net::{IpAddr, TcpStream};
use std::time::Instant;

use super::connection::ConnectError;
use super::handshake::USER_AGENT;
use super::response::{self, HeadError};
use super::stats::Failure;
use crate::config::{parse_proxy_url, Proxy, ProxyUrl, Target};

/// How the client reaches its target.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Route {
    /// The proxy to tunnel through, if any.
    pub(super) proxy: Option<ProxyUrl>,
    /// Where that choice came from, for the start-up log line; empty when no proxy was
    /// configured at all.
    pub(super) why: String,
}

/// Chooses the route to `target`: `--proxy` (`flag`, empty meaning none) wins, else the
/// scheme's variables, lower case first as curl reads them; then `--no-proxy`
/// (`no_proxy_flag`), else `no_proxy`/`NO_PROXY`, may send the target around the proxy.
/// `env` reads a variable; empty variables count as unset. Fails on a proxy URL that
/// cannot be used, naming the variable (never the URL: it may hold a password).
pub(super) fn route(
    target: &Target,
    flag: Option<&Proxy>,
    no_proxy_flag: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Route, String> {
    let first_set = |names: [&'static str; 2]| {
        names.into_iter().find_map(|name| {
            env(name)
                .filter(|value| !value.trim().is_empty())
                .map(|value| (name, value))
        })
    };
    let (proxy, source) = match flag {
        Some(Proxy::Direct) => {
            return Ok(Route {
                proxy: None,
                why: "--proxy is empty: connecting directly".into(),
            })
        }
        Some(Proxy::Http(url)) => (url.clone(), "--proxy"),
        None => {
            let names = if target.tls {
                ["https_proxy", "HTTPS_PROXY"]
            } else {
                ["http_proxy", "HTTP_PROXY"]
            };
            let Some((name, value)) = first_set(names) else {
                return Ok(Route {
                    proxy: None,
                    why: String::new(),
                });
            };
            let url = parse_proxy_url(&value)
                .map_err(|why| format!("cannot use the proxy in {name}: {why}"))?;
            (url, name)
        }
    };
    let (list, list_source) = match no_proxy_flag {
        Some(list) => (list.to_owned(), "--no-proxy"),
        None => first_set(["no_proxy", "NO_PROXY"])
            .map(|(name, list)| (list, name))
            .unwrap_or_default(),
    };
    if bypasses(&list, &target.host, target.port) {
        return Ok(Route {
            proxy: None,
            why: format!(
                "Not using the proxy from {source}: {} matches {list_source}",
                target.host
            ),
        });
    }
    Ok(Route {
        why: format!("Connecting through the proxy {proxy} (from {source})"),
        proxy: Some(proxy),
    })
}

/// Whether `host` (a name or an IP address without brackets) on `port` is in the no-proxy
/// `list`, as curl matches it: entries separated by commas or spaces; `*` matches every
/// host; a name matches itself and its subdomains (a leading and a trailing dot are
/// ignored, case too); an IP address matches an address or a CIDR range (`10.0.0.0/8`,
/// `fd00::/8`), never a name. An entry with a port (`host:8080`, `[::1]:8080`) matches
/// that port only (curl ignores such entries; Go and Python read them so).
pub(super) fn bypasses(list: &str, host: &str, port: u16) -> bool {
    let host = host.trim_end_matches('.');
    let ip: Option<IpAddr> = host.parse().ok();
    list.split(|c: char| c == ',' || c.is_ascii_whitespace())
        .filter(|entry| !entry.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            let (pattern, entry_port) = split_port(entry);
            if entry_port.is_some_and(|entry_port| entry_port != port) {
                return false;
            }
            match ip {
                Some(ip) => ip_matches(ip, pattern),
                None => {
                    let pattern = pattern.strip_prefix('.').unwrap_or(pattern);
                    let pattern = pattern.strip_suffix('.').unwrap_or(pattern);
                    !pattern.is_empty() && name_matches(host, pattern)
                }
            }
        })
}

/// `host` is `pattern` or a subdomain of it, in any case.
fn name_matches(host: &str, pattern: &str) -> bool {
    let (host, pattern) = (host.as_bytes(), pattern.as_bytes());
    match host.len().checked_sub(pattern.len()) {
        Some(0) => host.eq_ignore_ascii_case(pattern),
        Some(dot) => host[dot - 1] == b'.' && host[dot..].eq_ignore_ascii_case(pattern),
        None => false,
    }
}

/// An entry's pattern and port: `name:80`, `1.2.3.4:80`, `[::1]:80`; a bare IPv6 address
/// (more than one colon) has none.
fn split_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(bracketed) = entry.strip_prefix('[') {
        return match bracketed.split_once(']') {
            Some((address, after)) => (
                address,
                after.strip_prefix(':').and_then(|p| p.parse().ok()),
            ),
            None => (entry, None),
        };
    }
    match entry.split_once(':') {
        Some((pattern, port)) if !port.contains(':') => match port.parse() {
            Ok(port) => (pattern, Some(port)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

/// `ip` is the address `pattern` or in its CIDR range `ADDRESS/BITS`.
fn ip_matches(ip: IpAddr, pattern: &str) -> bool {
    let (address, bits) = match pattern.split_once('/') {
        Some((address, bits)) => match bits.parse::<u32>() {
            Ok(bits) => (address, Some(bits)),
            Err(_) => return false,
        },
        None => (pattern, None),
    };
    match (ip, address.parse::<IpAddr>()) {
        (IpAddr::V4(ip), Ok(IpAddr::V4(net))) => prefix_matches(
            u128::from(u32::from(ip)),
            u128::from(u32::from(net)),
            bits.unwrap_or(32),
            32,
        ),
        (IpAddr::V6(ip), Ok(IpAddr::V6(net))) => {
            prefix_matches(u128::from(ip), u128::from(net), bits.unwrap_or(128), 128)
        }
        _ => false,
    }
}

/// The first `bits` of the `width`-bit numbers `a` and `b` agree.
fn prefix_matches(a: u128, b: u128, bits: u32, width: u32) -> bool {
    if bits > width {
        return false;
    }
    let shift = width - bits;
    shift >= 128 || a >> shift == b >> shift
}

/// Opens a tunnel to `target` (`HOST:PORT`) through `proxy`, connected on `tcp`: sends
/// CONNECT (with `Proxy-Authorization: Basic` when the URL has credentials) and waits for
/// a 2xx answer, all by `deadline`. Every failure is a [`Failure::Proxy`] whose message
/// carries the proxy's status line, `Server` and first body line.
pub(super) fn tunnel(
    tcp: &TcpStream,
    proxy: &ProxyUrl,
    target: &str,
    deadline: Instant,
) -> Result<(), ConnectError> {
    let fail = |why: String| ConnectError::new(Failure::Proxy, format!("proxy {proxy}: {why}"));
    let mut request =
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: {USER_AGENT}\r\n");
    if let Some((user, password)) = &proxy.credentials {
        let credentials = format!("{user}:{}", password.as_str());
        request += &format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64(credentials.as_bytes())
        );
    }
    request += "\r\n";
    response::time_left(tcp, deadline)
        .and_then(|()| (&*tcp).write_all(request.as_bytes()))
        .map_err(|error| fail(format!("cannot send CONNECT: {error}")))?;
    let (head, after) = response::read_head(tcp, tcp, deadline).map_err(|error| {
        fail(match error {
            HeadError::TimedOut => "no answer to CONNECT in time".into(),
            HeadError::Closed => "closed the connection without answering CONNECT".into(),
            HeadError::TooLarge => "answer to CONNECT larger than 8 KiB".into(),
            HeadError::Malformed(error) => format!("malformed answer to CONNECT: {error}"),
            HeadError::Io(error) => format!("CONNECT failed: {error}"),
        })
    })?;
    if !(200..300).contains(&head.status) {
        let line = response::body_line(tcp, tcp, deadline, &head, after);
        return Err(fail(format!(
            "CONNECT {target} answered {}",
            head.summary(line.as_deref())
        )));
    }
    // The target speaks only after we do (a WebSocket server waits for the request, a TLS
    // server for the ClientHello): anything here is the proxy's own doing.
    if !after.is_empty() {
        return Err(fail(format!(
            "sent {} bytes after its {} answer to CONNECT",
            after.len(),
            head.status
        )));
    }
    Ok(())
}

/// Standard base64 with padding (RFC 4648 §4), for Basic credentials.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_url;
    use std::collections::HashMap;

    /// The route to `url` with `--proxy` `flag` (parsed as clap would), `--no-proxy`
    /// `no_proxy` and the variables `env`: the proxy's `host:port`, or `direct`.
    fn route_to(
        url: &str,
        flag: Option<&str>,
        no_proxy: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<String, String> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let flag = flag.map(|text| match text {
            "" => Proxy::Direct,
            text => Proxy::Http(parse_proxy_url(text).unwrap()),
        });
        let route = route(&parse_url(url).unwrap(), flag.as_ref(), no_proxy, |name| {
            env.get(name).cloned()
        })?;
        Ok(route.proxy.map_or_else(
            || "direct".to_owned(),
            |proxy| format!("{}:{}", proxy.host, proxy.port),
        ))
    }

    #[test]
    fn the_schemes_variable_is_used_lower_case_first() {
        let env = [
            ("https_proxy", "http://lower-s:1"),
            ("HTTPS_PROXY", "http://upper-s:2"),
            ("http_proxy", "lower:3"),
            ("HTTP_PROXY", "upper:4"),
        ];
        assert_eq!(
            route_to("wss://x/", None, None, &env),
            Ok("lower-s:1".into())
        );
        assert_eq!(route_to("ws://x/", None, None, &env), Ok("lower:3".into()));
        assert_eq!(
            route_to("wss://x/", None, None, &env[1..]),
            Ok("upper-s:2".into())
        );
        assert_eq!(
            route_to("ws://x/", None, None, &env[3..]),
            Ok("upper:4".into())
        );
        // ws:// never uses the https variables, nor wss:// the http ones.
        assert_eq!(
            route_to("ws://x/", None, None, &env[..2]),
            Ok("direct".into())
        );
        assert_eq!(
            route_to("wss://x/", None, None, &env[2..]),
            Ok("direct".into())
        );
        // An empty variable counts as unset.
        let empty = [("https_proxy", " "), ("HTTPS_PROXY", "http://upper-s:2")];
        assert_eq!(
            route_to("wss://x/", None, None, &empty),
            Ok("upper-s:2".into())
        );
        assert_eq!(route_to("wss://x/", None, None, &[]), Ok("direct".into()));
    }

    #[test]
    fn the_flag_wins_and_an_empty_one_goes_direct() {
        let env = [
            ("HTTPS_PROXY", "http://env:1"),
            ("HTTP_PROXY", "http://env:1"),
        ];
        assert_eq!(
            route_to("wss://x/", Some("http://flag:2"), None, &env),
            Ok("flag:2".into())
        );
        assert_eq!(
            route_to("ws://x/", Some("flag"), None, &env),
            Ok("flag:1080".into())
        );
        assert_eq!(
            route_to("wss://x/", Some(""), None, &env),
            Ok("direct".into())
        );
    }

    #[test]
    fn no_proxy_applies_to_every_source_and_the_flag_replaces_the_variable() {
        let env = [("HTTPS_PROXY", "http://env:1"), ("NO_PROXY", "x.example")];
        assert_eq!(
            route_to("wss://a.x.example/", None, None, &env),
            Ok("direct".into())
        );
        assert_eq!(
            route_to("wss://a.x.example/", Some("http://flag:2"), None, &env),
            Ok("direct".into())
        );
        assert_eq!(
            route_to("wss://y.example/", None, None, &env),
            Ok("env:1".into())
        );
        // --no-proxy replaces NO_PROXY; an empty one clears it (curl's --noproxy "").
        assert_eq!(
            route_to("wss://a.x.example/", None, Some(""), &env),
            Ok("env:1".into())
        );
        assert_eq!(
            route_to("wss://y.example/", None, Some("y.example"), &env),
            Ok("direct".into())
        );
        let lower_first = [
            ("HTTPS_PROXY", "http://env:1"),
            ("no_proxy", "a.example"),
            ("NO_PROXY", "*"),
        ];
        assert_eq!(
            route_to("wss://b.example/", None, None, &lower_first),
            Ok("env:1".into())
        );
    }

    #[test]
    fn unusable_proxy_variables_are_named_without_their_value() {
        let error = route_to(
            "wss://x/",
            None,
            None,
            &[("HTTPS_PROXY", "socks5://user:hunter2@p:1080")],
        )
        .unwrap_err();
        assert!(
            error.starts_with("cannot use the proxy in HTTPS_PROXY: "),
            "{error}"
        );
        assert!(error.contains("only http://"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn no_proxy_matches_names_as_curl_does() {
        let cases = [
            ("example.com", "example.com", true),
            ("example.com", "www.example.com", true),
            ("example.com", "WWW.Example.COM", true),
            (".example.com", "www.example.com", true),
            (".example.com", "example.com", true),
            ("example.com.", "www.example.com", true),
            ("example.com", "www.example.com.", true),
            ("example.com", "notexample.com", false),
            ("www.example.com", "example.com", false),
            ("a.com, b.com", "b.com", true),
            ("a.com b.com", "b.com", true),
            (" , ,b.com,,", "b.com", true),
            ("*", "anything", true),
            ("a.com,*", "anything", true),
            ("", "anything", false),
            (".", "anything", false),
            ("127.0.0.1", "localhost", false),
            ("localhost", "127.0.0.1", false),
        ];
        for (list, host, expected) in cases {
            assert_eq!(bypasses(list, host, 443), expected, "{list:?} vs {host}");
        }
    }

    #[test]
    fn no_proxy_matches_addresses_and_ranges_and_entries_with_ports() {
        let cases = [
            ("127.0.0.1", "127.0.0.1", true),
            ("127.0.0.0/8", "127.9.9.9", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("10.0.0.0/33", "10.0.0.1", false),
            ("10.0.0.0/x", "10.0.0.1", false),
            ("::1", "::1", true),
            ("[::1]", "::1", true),
            ("fd00::/8", "fd12::1", true),
            ("fd00::/8", "fe80::1", false),
            ("::/0", "2001:db8::1", true),
            ("127.0.0.1", "::1", false),
            ("example.com:443", "www.example.com", true),
            ("example.com:80", "www.example.com", false),
            ("127.0.0.1:443", "127.0.0.1", true),
            ("127.0.0.1:80", "127.0.0.1", false),
            ("[::1]:443", "::1", true),
            ("[::1]:80", "::1", false),
        ];
        for (list, host, expected) in cases {
            assert_eq!(bypasses(list, host, 443), expected, "{list:?} vs {host}");
        }
    }

    #[test]
    fn base64_pads_as_rfc_4648_says() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain}");
        }
        assert_eq!(base64(&[0xff, 0xfe]), "//4=");
    }
}
