//! The browser probe page, `GET /ui` on the WebSocket port: one HTML page whose style and
//! script (`page.css`, `page.js`, beside `page.html`, embedded at build time) are inlined, so
//! the page is a single response with nothing to fetch from anywhere else. It is served under
//! a Content-Security-Policy that allows exactly that script and that style (by their
//! SHA-256, computed once), WebSocket connections back to the host the page was asked for,
//! and nothing else.
//!
//! The page finds the WebSocket path in a `<meta>` tag, the one part that changes with the
//! server (`--path`).

use std::sync::OnceLock;

/// Where the page is served.
pub const PATH: &str = "/ui";

/// What the log line of an answered page request says.
pub const MESSAGE: &str = "the browser probe page";

const HTML: &str = include_str!("page.html");
const STYLE: &str = include_str!("page.css");
const SCRIPT: &str = include_str!("page.js");
const PATH_SLOT: &str = "{{WEBSOCKET_PATH}}";

/// The page around its WebSocket path, and the fixed part of its policy.
struct Assembled {
    before: String,
    after: String,
    /// Every directive but `connect-src`.
    policy: String,
}

fn assembled() -> &'static Assembled {
    static PAGE: OnceLock<Assembled> = OnceLock::new();
    PAGE.get_or_init(|| {
        let html = HTML
            .replacen("{{STYLE}}", STYLE, 1)
            .replacen("{{SCRIPT}}", SCRIPT, 1);
        let (before, after) = html
            .split_once(PATH_SLOT)
            .expect("page.html has a slot for the WebSocket path");
        Assembled {
            before: before.to_owned(),
            after: after.to_owned(),
            policy: format!(
                "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; img-src data:; \
                 base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                sha256_base64(SCRIPT.as_bytes()),
                sha256_base64(STYLE.as_bytes())
            ),
        }
    })
}

/// The page for a server whose WebSocket path is `ws_path`.
pub fn page(ws_path: &str) -> String {
    let page = assembled();
    let mut out = String::with_capacity(page.before.len() + page.after.len() + ws_path.len());
    out.push_str(&page.before);
    for c in ws_path.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out.push_str(&page.after);
    out
}

/// The header lines (each ending in CRLF) the page is served with. `host` is the request's
/// `Host`: the page may open WebSockets to it, by `ws://` or `wss://` (a TLS-terminating
/// proxy in front decides which). `'self'` covers that too in current browsers; the
/// explicit sources are for those that do not count ws: as 'self'.
pub fn headers(host: Option<&str>) -> String {
    let sockets = match host.filter(|host| is_plain_host(host)) {
        Some(host) => format!(" ws://{host} wss://{host}"),
        None => String::new(),
    };
    format!(
        "Content-Security-Policy: {}; connect-src 'self'{sockets}\r\n\
         Cache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\n\
         Referrer-Policy: no-referrer\r\n",
        assembled().policy
    )
}

/// Whether `host` is a `host[:port]` that can stand in a policy as it is: letters, digits,
/// dots, dashes, and the colons and brackets of a port or an IPv6 address.
fn is_plain_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 261
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// SHA-256 of `data` in base64, as a policy's hash source writes it (rustls's ring provider
/// computes it).
fn sha256_base64(data: &[u8]) -> String {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .expect("a TLS 1.3 cipher suite");
    let hash = suite.common.hash_provider;
    debug_assert_eq!(
        hash.algorithm(),
        rustls::crypto::hash::HashAlgorithm::SHA256
    );
    base64(hash.hash(data).as_ref())
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
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

    #[test]
    fn base64_and_sha256_match_known_values() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        // FIPS 180-2's "abc" example.
        assert_eq!(
            sha256_base64(b"abc"),
            "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
    }

    #[test]
    fn the_page_inlines_exactly_what_the_policy_allows() {
        let page = page("/ws");
        let script = page
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .expect("one inline script")
            .0;
        let style = page
            .split_once("<style>")
            .and_then(|(_, rest)| rest.split_once("</style>"))
            .expect("one inline style")
            .0;
        assert_eq!(script, SCRIPT);
        assert_eq!(style, STYLE);
        let headers = headers(Some("example.com:8443"));
        for expected in [
            format!("script-src 'sha256-{}'", sha256_base64(script.as_bytes())),
            format!("style-src 'sha256-{}'", sha256_base64(style.as_bytes())),
            "default-src 'none'".to_owned(),
            "frame-ancestors 'none'".to_owned(),
            "connect-src 'self' ws://example.com:8443 wss://example.com:8443\r\n".to_owned(),
        ] {
            assert!(headers.contains(&expected), "{expected} in {headers}");
        }
        assert!(!headers.contains("unsafe"), "{headers}");
        // One script and one style element: nothing else the policy would have to allow.
        assert_eq!(page.matches("<script").count(), 1);
        assert_eq!(page.matches("<style").count(), 1);
        // No inline style or event handler attributes either.
        assert!(!page.contains(" style="));
        let handler = |rest: &str| {
            rest.split_once('=')
                .is_some_and(|(name, _)| name.bytes().all(|b| b.is_ascii_lowercase()))
        };
        assert!(
            !page.split(" on").skip(1).any(handler),
            "an on...= attribute"
        );
    }

    #[test]
    fn the_page_is_self_contained_and_small() {
        let page = page("/ws");
        // Nothing from elsewhere: the only URL is the SVG namespace, which is never fetched.
        let urls: Vec<&str> = page.matches("://").collect();
        assert_eq!(
            urls.len(),
            1,
            "{:?}",
            page.match_indices("://").collect::<Vec<_>>()
        );
        assert!(page.contains("\"http://www.w3.org/2000/svg\""));
        assert!(page.len() < 32 * 1024, "{} bytes", page.len());
        assert!(page.contains(r#"<meta name="websocket-path" content="/ws">"#));
    }

    #[test]
    fn the_path_and_host_cannot_break_out() {
        let page = page("/a\"><script>x</script>&'");
        assert!(page.contains(r#"content="/a&quot;&gt;&lt;script&gt;x&lt;/script&gt;&amp;&#39;""#));
        assert_eq!(page.matches("<script").count(), 1);
        for bad in ["a b", "a;b", "a'b", "", "a,b", "*"] {
            assert!(
                headers(Some(bad)).contains("connect-src 'self'\r\n"),
                "{bad:?}"
            );
        }
        assert!(headers(None).contains("connect-src 'self'\r\n"));
        assert!(headers(Some("[::1]:3003")).contains("ws://[::1]:3003 wss://[::1]:3003"));
    }
}
