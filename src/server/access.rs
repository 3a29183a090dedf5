//! Who may connect, and who the client really is: the bearer token (re-read from its file
//! when it changes), per-address connection limits and rates, and the client's address
//! behind a load balancer (from a PROXY protocol header, or from `X-Forwarded-For` /
//! `Forwarded` sent by a trusted proxy). Everything here is off by default.
//!
//! The checks on the request itself (token, origin, subprotocol) are made by the pure
//! [`decide`](super::handshake::decide) from the [`Rules`](super::handshake::Rules) this
//! module hands out; the per-address state lives here.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use log::{info, warn};

use super::handshake::{Reply, Rules};
use crate::config::{read_token_file, Cidr, ConnectRate, OriginPattern, ServerConfig};

/// How often a request may make the server look at the token file again.
const TOKEN_RELOAD_CHECK: Duration = Duration::from_secs(1);
/// Most client addresses whose connections and rate are tracked at once (about 64 bytes
/// each). Past it, addresses with no connection open are forgotten first.
pub const MAX_TRACKED_ADDRESSES: usize = 65_536;
/// How often the per-address table drops addresses that are back to their initial state.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// `Retry-After` when an address is at its connection limit (when one of its connections
/// will close is unknown).
const RETRY_AFTER_CONNECTIONS: u64 = 5;

/// Compares a presented token with the expected one in time that depends only on the
/// expected token's length, never on where the two differ.
pub fn tokens_match(presented: &[u8], expected: &[u8]) -> bool {
    let mut difference = presented.len() ^ expected.len();
    for (i, &byte) in expected.iter().enumerate() {
        // The index is the same on every call: only the presented token's length, which
        // the client knows, decides whether `get` finds a byte.
        let other = presented.get(i).copied().unwrap_or(!byte);
        difference |= usize::from(byte ^ other);
    }
    std::hint::black_box(difference) == 0
}

/// The client's address as logs, limits and the registry use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    /// The client: the socket's peer, or the address a PROXY header or a trusted proxy's
    /// `X-Forwarded-For` gave (port 0 when the header gave none).
    pub addr: SocketAddr,
    /// The socket's peer (the balancer or proxy) when it is not the client.
    pub via: Option<SocketAddr>,
}

impl ClientAddr {
    /// A client connected directly.
    pub fn direct(peer: SocketAddr) -> Self {
        ClientAddr {
            addr: peer,
            via: None,
        }
    }

    /// This client, now known to be `addr`, having come through `self`'s socket peer.
    pub fn forwarded(self, addr: SocketAddr) -> Self {
        let peer = self.via.unwrap_or(self.addr);
        if addr == peer {
            ClientAddr::direct(peer)
        } else {
            ClientAddr {
                addr,
                via: Some(peer),
            }
        }
    }
}

impl fmt::Display for ClientAddr {
    /// `203.0.113.7:4444`, or `203.0.113.7:4444 via 10.0.0.5:40000` (`203.0.113.7 via ...`
    /// when the port is unknown).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.via {
            None => write!(f, "{}", self.addr),
            Some(via) if self.addr.port() == 0 => write!(f, "{} via {via}", self.addr.ip()),
            Some(via) => write!(f, "{} via {via}", self.addr),
        }
    }
}

/// The client's address behind trusted proxies: walking the forwarded-for list (in the
/// order the hops appended it) from the right, starting at the socket's `peer`, each hop
/// is believed while the address that reported it is in `trusted`. The result is the
/// right-most address not in `trusted` (the left-most if all are), or the last trusted
/// one when the next entry is not an address (`unknown`, `_hidden`, garbage). A client
/// can put anything at the left of the list; it cannot change what the proxies appended.
pub fn forwarded_client(
    hops: &[Option<SocketAddr>],
    peer: SocketAddr,
    trusted: &[Cidr],
) -> SocketAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|cidr| cidr.contains(ip));
    let mut client = peer;
    for hop in hops.iter().rev() {
        if !is_trusted(client.ip()) {
            break;
        }
        match hop {
            Some(addr) => client = *addr,
            None => break,
        }
    }
    client
}

/// One entry of `X-Forwarded-For` or one `for=` value of `Forwarded` (RFC 7239): an
/// address, optionally with a port (`192.0.2.1:80`, `[2001:db8::1]:80`), or quoted.
pub fn parse_forwarded_address(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    let text = text
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(text);
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip.to_canonical(), 0));
    }
    if let Some(inner) = text
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
    {
        return inner
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip.to_canonical(), 0));
    }
    let addr: SocketAddr = text.parse().ok()?;
    Some(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

/// The hops a request's headers list, oldest first: `X-Forwarded-For` when the request
/// has one (what nginx, HAProxy, Envoy and cloud balancers append to), else the `for=`
/// values of `Forwarded`. `None` marks an entry that is not an address.
pub fn forwarded_hops<'h>(
    headers: impl Iterator<Item = (&'h str, &'h [u8])> + Clone,
) -> Vec<Option<SocketAddr>> {
    let values = |name: &'static str| {
        headers
            .clone()
            .filter(move |(header, _)| header.eq_ignore_ascii_case(name))
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
    };
    let xff: Vec<Option<SocketAddr>> = values("X-Forwarded-For")
        .flat_map(|value| {
            value
                .split(',')
                .map(parse_forwarded_address)
                .collect::<Vec<_>>()
        })
        .collect();
    if !xff.is_empty() {
        return xff;
    }
    values("Forwarded")
        .flat_map(|value| {
            value
                .split(',')
                .map(|element| {
                    element
                        .split(';')
                        .filter_map(|pair| pair.split_once('='))
                        .find(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
                        .and_then(|(_, value)| parse_forwarded_address(value))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The bearer token in force: given once, or read from a file that is looked at again at
/// most once a second (when requests arrive) and reloaded when its content changes.
#[derive(Debug)]
enum Token {
    Fixed(Arc<[u8]>),
    File {
        path: PathBuf,
        current: Mutex<FileToken>,
    },
}

#[derive(Debug)]
struct FileToken {
    token: Arc<[u8]>,
    checked: Instant,
    /// The last reload failed (logged once, until the file is usable again).
    failing: bool,
}

impl Token {
    fn current(&self) -> Arc<[u8]> {
        match self {
            Token::Fixed(token) => token.clone(),
            Token::File { path, current } => {
                let mut current = current.lock().unwrap_or_else(PoisonError::into_inner);
                if current.checked.elapsed() >= TOKEN_RELOAD_CHECK {
                    current.checked = Instant::now();
                    match read_token_file(path) {
                        Ok(token) if **token.expose() == *current.token => {
                            current.failing = false;
                        }
                        Ok(token) => {
                            info!("Auth token reloaded from {}", path.display());
                            current.token = token.expose().clone();
                            current.failing = false;
                        }
                        Err(error) if !current.failing => {
                            warn!("Auth token not reloaded, keeping the old one: {error}");
                            current.failing = true;
                        }
                        Err(_) => {}
                    }
                }
                current.token.clone()
            }
        }
    }
}

/// A client address refused by the per-address limits.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The address already holds the most connections allowed.
    Connections {
        /// The limit.
        max: u32,
    },
    /// The address opened connections faster than its rate allows.
    Rate {
        /// When the next connection will be allowed.
        retry_after: Duration,
    },
}

impl Refusal {
    /// The 429 answer, with `Retry-After` in whole seconds (at least 1).
    pub fn reply(&self) -> Reply {
        match self {
            Refusal::Connections { .. } => Reply::too_many_requests(
                "too many connections from your address, retry later",
                RETRY_AFTER_CONNECTIONS,
            ),
            Refusal::Rate { retry_after } => Reply::too_many_requests(
                "connecting too fast from your address, retry later",
                retry_after.as_secs_f64().ceil().max(1.0) as u64,
            ),
        }
    }

    /// Why, for the log line.
    pub fn why(&self, ip: IpAddr) -> String {
        match self {
            Refusal::Connections { max } => {
                format!(
                    "{ip} already holds {}",
                    crate::count(*max as usize, "connection")
                )
            }
            Refusal::Rate { retry_after } => {
                format!("{ip} connects too fast (next allowed in {retry_after:.1?})")
            }
        }
    }
}

/// Connections open and connection tokens per client address, in bounded memory.
#[derive(Debug)]
pub struct PerIp {
    max_connections: Option<u32>,
    rate: Option<ConnectRate>,
    capacity: usize,
    table: Mutex<Table>,
}

#[derive(Debug)]
struct Table {
    entries: HashMap<IpAddr, Tracked>,
    swept: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Tracked {
    connections: u32,
    tokens: f64,
    refilled: Instant,
}

impl PerIp {
    /// Limits with `max_connections` open and `rate` new connections per address, keeping
    /// at most `capacity` addresses.
    pub fn new(max_connections: Option<u32>, rate: Option<ConnectRate>, capacity: usize) -> Self {
        PerIp {
            max_connections,
            rate,
            capacity,
            table: Mutex::new(Table {
                entries: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    /// Admits a new connection from `ip` at `now` or says why not. The returned slot
    /// holds its place among the address's connections until dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Slot, Refusal> {
        let ip = ip.to_canonical();
        let mut table = self.lock();
        if now.saturating_duration_since(table.swept) >= SWEEP_INTERVAL {
            self.sweep(&mut table, now);
        }
        if !table.entries.contains_key(&ip) && table.entries.len() >= self.capacity {
            self.sweep(&mut table, now);
            if table.entries.len() >= self.capacity {
                // Still full of addresses whose buckets are refilling: forget those with
                // no connection open (their rates start over); counts must stay.
                table.entries.retain(|_, tracked| tracked.connections > 0);
            }
        }
        let fresh = Tracked {
            connections: 0,
            tokens: self.rate.map_or(0.0, |rate| f64::from(rate.burst)),
            refilled: now,
        };
        let room = table.entries.len() < self.capacity;
        let tracked = match table.entries.get_mut(&ip) {
            Some(tracked) => tracked,
            None if room => table.entries.entry(ip).or_insert(fresh),
            // Every tracked address holds a connection: admit untracked rather than refuse
            // a newcomer for what others hold.
            None => return Ok(Slot { per_ip: None, ip }),
        };
        if let Some(max) = self.max_connections {
            if tracked.connections >= max {
                return Err(Refusal::Connections { max });
            }
        }
        if let Some(rate) = self.rate {
            refill(tracked, rate, now);
            if tracked.tokens < 1.0 {
                let retry_after = Duration::from_secs_f64((1.0 - tracked.tokens) / rate.per_second);
                return Err(Refusal::Rate { retry_after });
            }
            tracked.tokens -= 1.0;
        }
        if self.max_connections.is_none() {
            return Ok(Slot { per_ip: None, ip });
        }
        tracked.connections += 1;
        Ok(Slot {
            per_ip: Some(self.clone()),
            ip,
        })
    }

    /// Addresses tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().entries.len()
    }

    /// Drops the addresses that are back where a new one starts: no connection open and a
    /// full bucket. Forgetting them changes nothing.
    fn sweep(&self, table: &mut Table, now: Instant) {
        table.swept = now;
        let rate = self.rate;
        table.entries.retain(|_, tracked| {
            if tracked.connections > 0 {
                return true;
            }
            match rate {
                Some(rate) => {
                    refill(tracked, rate, now);
                    tracked.tokens < f64::from(rate.burst)
                }
                None => false,
            }
        });
    }

    fn release(&self, ip: IpAddr) {
        let mut table = self.lock();
        if let Some(tracked) = table.entries.get_mut(&ip) {
            tracked.connections = tracked.connections.saturating_sub(1);
            if tracked.connections == 0 && self.rate.is_none() {
                table.entries.remove(&ip);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn refill(tracked: &mut Tracked, rate: ConnectRate, now: Instant) {
    let elapsed = now
        .saturating_duration_since(tracked.refilled)
        .as_secs_f64();
    tracked.tokens = (tracked.tokens + elapsed * rate.per_second).min(f64::from(rate.burst));
    tracked.refilled = now;
}

/// A connection's place among its address's connections, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    per_ip: Option<Arc<PerIp>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(per_ip) = &self.per_ip {
            per_ip.release(self.ip);
        }
    }
}

/// Where a connection stands with the per-address limits when its thread starts.
#[derive(Debug)]
pub enum Admission {
    /// Not checked yet: the client's real address is not known before the PROXY header
    /// or the forwarded-for header has been read.
    Pending,
    /// Checked at accept; the slot, if any, holds its place.
    Done(Option<Slot>),
}

/// The server's access rules and per-address state, shared by the acceptor and the
/// connection threads.
#[derive(Debug)]
pub struct Access {
    token: Option<Token>,
    origins: Vec<OriginPattern>,
    require_origin: bool,
    subprotocols: Vec<String>,
    trusted_proxies: Vec<Cidr>,
    proxy_protocol: bool,
    per_ip: Option<Arc<PerIp>>,
}

impl Access {
    /// The rules `config` asks for; fails when the token file cannot be read.
    pub fn from_config(config: &ServerConfig) -> Result<Self, String> {
        let token = match (&config.auth_token, &config.auth_token_file) {
            (Some(token), _) => Some(Token::Fixed(token.expose().clone())),
            (None, Some(path)) => Some(Token::File {
                current: Mutex::new(FileToken {
                    token: read_token_file(path)?.expose().clone(),
                    checked: Instant::now(),
                    failing: false,
                }),
                path: path.clone(),
            }),
            (None, None) => None,
        };
        let per_ip = (config.max_connections_per_ip.is_some()
            || config.max_connect_rate_per_ip.is_some())
        .then(|| {
            Arc::new(PerIp::new(
                config.max_connections_per_ip,
                config.max_connect_rate_per_ip,
                MAX_TRACKED_ADDRESSES,
            ))
        });
        Ok(Access {
            token,
            origins: config.allowed_origins.clone(),
            require_origin: config.require_origin,
            subprotocols: config.subprotocols.clone(),
            trusted_proxies: config.trusted_proxies.clone(),
            proxy_protocol: config.proxy_protocol,
            per_ip,
        })
    }

    /// The rules in force, for the start-up log (the token's source, never the token);
    /// `None` when everything is open.
    pub fn summary(&self) -> Option<String> {
        let list = |items: &[String]| items.join(",");
        let mut parts = Vec::new();
        match &self.token {
            Some(Token::Fixed(_)) => parts.push("bearer token required".to_owned()),
            Some(Token::File { path, .. }) => parts.push(format!(
                "bearer token required (from {}, re-read when it changes)",
                path.display()
            )),
            None => {}
        }
        if !self.origins.is_empty() {
            let origins: Vec<String> = self.origins.iter().map(ToString::to_string).collect();
            parts.push(format!("origins {}", list(&origins)));
        }
        if self.require_origin {
            parts.push("Origin required".to_owned());
        }
        if let Some(per_ip) = &self.per_ip {
            if let Some(max) = per_ip.max_connections {
                parts.push(format!("at most {max} connections per address"));
            }
            if let Some(rate) = per_ip.rate {
                parts.push(format!("at most {rate} new connections per address"));
            }
        }
        if self.proxy_protocol {
            parts.push("PROXY protocol required".to_owned());
        }
        if !self.trusted_proxies.is_empty() {
            let trusted: Vec<String> = self
                .trusted_proxies
                .iter()
                .map(ToString::to_string)
                .collect();
            parts.push(format!("X-Forwarded-For trusted from {}", list(&trusted)));
        }
        if !self.subprotocols.is_empty() {
            parts.push(format!("subprotocols {}", list(&self.subprotocols)));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// Whether every connection starts with a PROXY protocol header.
    pub fn proxy_protocol(&self) -> bool {
        self.proxy_protocol
    }

    /// The token a request must carry now (`None`: no token required).
    pub fn token(&self) -> Option<Arc<[u8]>> {
        self.token.as_ref().map(Token::current)
    }

    /// The rules for one request from `peer` (after any PROXY header), with `token` from
    /// [`token`](Self::token).
    pub fn rules<'a>(&'a self, token: Option<&'a [u8]>, peer: SocketAddr) -> Rules<'a> {
        Rules {
            token,
            origins: &self.origins,
            require_origin: self.require_origin,
            subprotocols: &self.subprotocols,
            trusted_proxies: &self.trusted_proxies,
            peer,
        }
    }

    /// Whether `ip` is a proxy whose forwarded-for headers are believed.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|cidr| cidr.contains(ip))
    }

    /// Whether the acceptor can apply the per-address limits to a socket from `peer`:
    /// limits are set, and the peer is the client (no PROXY header or forwarded-for
    /// header will name another one).
    pub fn limits_at_accept(&self, peer: IpAddr) -> bool {
        self.per_ip.is_some() && !self.proxy_protocol && !self.is_trusted_proxy(peer)
    }

    /// Applies the per-address limits to a new connection from `ip`.
    pub fn admit(&self, ip: IpAddr) -> Result<Option<Slot>, Refusal> {
        match &self.per_ip {
            Some(per_ip) => per_ip.admit(ip, Instant::now()).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_cidr;

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(tokens_match(b"s3cret", b"s3cret"));
        for other in [
            &b""[..],
            b"s3cre",
            b"s3cret!",
            b"S3cret",
            b"s3cres",
            b"\xff3cret",
        ] {
            assert!(!tokens_match(other, b"s3cret"), "{other:?}");
        }
        // A prefix padded with what the comparison uses for missing bytes still fails.
        let expected = b"ab";
        assert!(!tokens_match(b"a", expected));
        assert!(!tokens_match(&[b'a', !b'b'], expected));
    }

    fn addr(text: &str) -> SocketAddr {
        parse_forwarded_address(text).unwrap_or_else(|| panic!("{text}"))
    }

    #[test]
    fn forwarded_addresses_with_and_without_ports() {
        assert_eq!(addr("203.0.113.7"), "203.0.113.7:0".parse().unwrap());
        assert_eq!(
            addr(" 203.0.113.7:4444 "),
            "203.0.113.7:4444".parse().unwrap()
        );
        assert_eq!(addr("2001:db8::1"), "[2001:db8::1]:0".parse().unwrap());
        assert_eq!(addr("[2001:db8::1]"), "[2001:db8::1]:0".parse().unwrap());
        assert_eq!(
            addr("\"[2001:db8::1]:4711\""),
            "[2001:db8::1]:4711".parse().unwrap()
        );
        assert_eq!(addr("::ffff:192.0.2.1"), "192.0.2.1:0".parse().unwrap());
        for bad in ["unknown", "_hidden", "", "1.2.3", "203.0.113.7:x", "[::1"] {
            assert_eq!(parse_forwarded_address(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let trusted: Vec<Cidr> = ["127.0.0.1", "10.0.0.0/8"]
            .iter()
            .map(|text| parse_cidr(text).unwrap())
            .collect();
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let hops = |list: &[&str]| -> Vec<Option<SocketAddr>> {
            list.iter()
                .map(|hop| parse_forwarded_address(hop))
                .collect()
        };
        let client = |list: &[&str], peer| forwarded_client(&hops(list), peer, &trusted);
        // No header: the peer itself.
        assert_eq!(client(&[], peer), peer);
        // One proxy.
        assert_eq!(client(&["203.0.113.7"], peer), addr("203.0.113.7"));
        // A spoofed entry at the left is not believed.
        assert_eq!(
            client(&["198.51.100.1", "203.0.113.7", "10.1.2.3"], peer),
            addr("203.0.113.7")
        );
        // All trusted: the left-most.
        assert_eq!(client(&["10.9.9.9", "10.1.2.3"], peer), addr("10.9.9.9"));
        // An entry that is not an address stops the walk at the last trusted hop.
        assert_eq!(client(&["203.0.113.7", "unknown"], peer), peer);
        assert_eq!(
            client(&["203.0.113.7", "unknown", "10.1.2.3"], peer),
            addr("10.1.2.3")
        );
        // From an untrusted peer nothing is believed.
        let stranger: SocketAddr = "192.0.2.9:1".parse().unwrap();
        assert_eq!(client(&["203.0.113.7"], stranger), stranger);
    }

    #[test]
    fn forwarded_for_is_read_from_either_header() {
        let headers = |list: &'static [(&'static str, &'static str)]| {
            forwarded_hops(list.iter().map(|(name, value)| (*name, value.as_bytes())))
        };
        assert_eq!(
            headers(&[
                ("x-forwarded-for", "192.0.2.1, 203.0.113.7"),
                ("X-Forwarded-For", "10.0.0.1")
            ]),
            vec![
                Some(addr("192.0.2.1")),
                Some(addr("203.0.113.7")),
                Some(addr("10.0.0.1"))
            ]
        );
        assert_eq!(
            headers(&[(
                "Forwarded",
                "for=192.0.2.60;proto=http;by=203.0.113.43, For=\"[2001:db8:cafe::17]:4711\", for=unknown"
            )]),
            vec![Some(addr("192.0.2.60")), Some(addr("[2001:db8:cafe::17]:4711")), None]
        );
        // Both: X-Forwarded-For wins.
        assert_eq!(
            headers(&[
                ("Forwarded", "for=192.0.2.60"),
                ("X-Forwarded-For", "203.0.113.7")
            ]),
            vec![Some(addr("203.0.113.7"))]
        );
        assert_eq!(headers(&[("Host", "x")]), Vec::new());
    }

    #[test]
    fn client_addresses_display_both_ends() {
        let peer: SocketAddr = "10.0.0.5:40000".parse().unwrap();
        let direct = ClientAddr::direct(peer);
        assert_eq!(direct.to_string(), "10.0.0.5:40000");
        let proxied = direct.forwarded("203.0.113.7:4444".parse().unwrap());
        assert_eq!(proxied.to_string(), "203.0.113.7:4444 via 10.0.0.5:40000");
        let forwarded = direct.forwarded("203.0.113.7:0".parse().unwrap());
        assert_eq!(forwarded.to_string(), "203.0.113.7 via 10.0.0.5:40000");
        assert_eq!(proxied.forwarded(peer), direct);
    }

    #[test]
    fn the_summary_names_the_rules_but_not_the_token() {
        use clap::Parser;
        let config = |args: &[&str]| {
            let mut all = vec!["server"];
            all.extend_from_slice(args);
            Access::from_config(&ServerConfig::try_parse_from(all).unwrap()).unwrap()
        };
        assert_eq!(config(&[]).summary(), None);
        let summary = config(&[
            "--auth-token",
            "s3cret",
            "--allowed-origins",
            "https://*.example.com",
            "--max-connections-per-ip",
            "100",
            "--max-connect-rate-per-ip",
            "20/s,burst=40",
            "--trusted-proxies",
            "10.0.0.0/8",
            "--subprotocols",
            "chat,superchat",
        ])
        .summary()
        .unwrap();
        assert_eq!(
            summary,
            "bearer token required; origins https://*.example.com; at most 100 connections \
             per address; at most 20/s (burst 40) new connections per address; \
             X-Forwarded-For trusted from 10.0.0.0/8; subprotocols chat,superchat"
        );
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    #[test]
    fn connections_per_address_are_counted_until_the_slot_drops() {
        let per_ip = Arc::new(PerIp::new(Some(2), None, 16));
        let now = Instant::now();
        let first = per_ip.admit(IP, now).unwrap();
        let second = per_ip.admit(IP, now).unwrap();
        assert_eq!(
            per_ip.admit(IP, now).unwrap_err(),
            Refusal::Connections { max: 2 }
        );
        // Another address is not affected; an IPv4-mapped one is the same address.
        let other = per_ip.admit("192.0.2.2".parse().unwrap(), now).unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(per_ip.admit(mapped, now).is_err());
        drop(first);
        let third = per_ip.admit(mapped, now).unwrap();
        drop((second, third, other));
        // Without a rate, an address with nothing open is forgotten at once.
        assert_eq!(per_ip.tracked(), 0);
    }

    #[test]
    fn the_rate_is_a_token_bucket_per_address() {
        let rate = ConnectRate {
            per_second: 2.0,
            burst: 3,
        };
        let per_ip = Arc::new(PerIp::new(None, Some(rate), 16));
        let start = Instant::now();
        for _ in 0..3 {
            per_ip.admit(IP, start).unwrap();
        }
        let Err(Refusal::Rate { retry_after }) = per_ip.admit(IP, start) else {
            panic!("the fourth connection in a burst of 3 was admitted");
        };
        assert_eq!(retry_after, Duration::from_millis(500));
        assert_eq!(
            Refusal::Rate { retry_after }.reply().headers,
            "Retry-After: 1\r\n"
        );
        // Refused attempts take no token: half a second later one connection is allowed.
        per_ip
            .admit(IP, start + Duration::from_millis(499))
            .unwrap_err();
        per_ip
            .admit(IP, start + Duration::from_millis(500))
            .unwrap();
        per_ip
            .admit(IP, start + Duration::from_millis(500))
            .unwrap_err();
        // After a quiet spell the bucket is full again, never fuller.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            per_ip.admit(IP, later).unwrap();
        }
        per_ip.admit(IP, later).unwrap_err();
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_addresses_with_connections() {
        let rate = ConnectRate {
            per_second: 1.0,
            burst: 1,
        };
        let per_ip = Arc::new(PerIp::new(Some(5), Some(rate), 4));
        let now = Instant::now();
        let held = per_ip.admit(IP, now).unwrap();
        for i in 0..100u8 {
            let _ = per_ip.admit(IpAddr::from([198, 51, 100, i]), now).unwrap();
            assert!(per_ip.tracked() <= 4);
        }
        // The address with a connection open was never forgotten: its count holds.
        let lock = per_ip.lock();
        assert_eq!(lock.entries.get(&IP).map(|t| t.connections), Some(1));
        drop(lock);
        drop(held);
        // Back to the initial state (bucket refilled, nothing open): swept away.
        let later = now + SWEEP_INTERVAL + Duration::from_secs(1);
        per_ip.admit(IpAddr::from([203, 0, 113, 1]), later).unwrap();
        assert_eq!(per_ip.tracked(), 1);
    }

    #[test]
    fn a_table_full_of_open_connections_admits_untracked() {
        let per_ip = Arc::new(PerIp::new(Some(1), None, 2));
        let now = Instant::now();
        let a = per_ip.admit(IpAddr::from([192, 0, 2, 1]), now).unwrap();
        let b = per_ip.admit(IpAddr::from([192, 0, 2, 2]), now).unwrap();
        let c = per_ip.admit(IpAddr::from([192, 0, 2, 3]), now).unwrap();
        assert_eq!(per_ip.tracked(), 2);
        drop((a, b, c));
        assert_eq!(per_ip.tracked(), 0);
    }
}
