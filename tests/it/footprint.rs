//! What an idle connection keeps of its thread's stack, in the server binary as users run it:
//! the release build, which `scripts/fault-tests` builds and points `WEBSOCKET_TEST_BIN_DIR`
//! at (a debug build's frames are several times deeper). A thread's stack pages, once
//! touched, stay resident for the connection's life, so these tests guard the stack pages
//! the README counts: one frame made deeper on the handshake, echo or pong path costs every
//! held connection another 4 KiB.

use std::fs;

use tungstenite::{Message, WebSocket};

use crate::pki::{tls_connect, Pki, Use};
use crate::support::{self, Server};

/// Connections held while the stacks are read.
const CONNECTIONS: usize = 20;

#[test]
#[ignore = "measures the release binaries: run through scripts/fault-tests"]
fn an_idle_ws_connection_keeps_two_stack_pages_after_an_echo_and_a_ping() {
    require_release_binaries();
    let server = Server::start(&[]);
    let held: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let mut ws = server.connect();
            exercise(&mut ws);
            ws
        })
        .collect();
    assert_stack_pages_at_most(&server, 2);
    drop(held);
}

#[test]
#[ignore = "measures the release binaries: run through scripts/fault-tests"]
fn an_idle_wss_connection_keeps_at_most_three_stack_pages_after_its_handshake_moved_threads() {
    require_release_binaries();
    let pki = Pki::new("footprint");
    let pair = pki.issue("server", &["localhost"], Use::Server);
    let (cert, key) = (pair.cert.to_str().unwrap(), pair.key.to_str().unwrap());
    let server = Server::start(&["--tls-cert", cert, "--tls-key", key]);
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    let held: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let stream = tls_connect(server.addr, "localhost", pki.client_config(None)).unwrap();
            let (mut ws, _) = tungstenite::client(url.as_str(), stream).unwrap();
            exercise(&mut ws);
            ws
        })
        .collect();
    // 2 with musl, 3 with glibc, whose thread descriptor and static TLS take the top
    // 4.4 KiB of the stack (the README's wss section).
    assert_stack_pages_at_most(&server, 3);
    drop(held);
}

fn require_release_binaries() {
    assert!(
        std::env::var_os("WEBSOCKET_TEST_BIN_DIR").is_some(),
        "these tests measure the release binaries: run them through scripts/fault-tests"
    );
}

/// An echo and a ping answered: the paths an idle connection takes besides waiting.
fn exercise<S: std::io::Read + std::io::Write>(ws: &mut WebSocket<S>) {
    let text = support::text_payload(32);
    ws.send(Message::text(text.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text(text));
    ws.send(Message::Ping(b"footprint".to_vec().into()))
        .unwrap();
    // The server sends no pings of its own unless asked (--ping-interval).
    assert_eq!(
        ws.read().unwrap(),
        Message::Pong(b"footprint".to_vec().into())
    );
}

/// Waits until the server has a `conn-N` thread for each held connection, every one of
/// them blocked, and asserts that none keeps more than `limit` stack pages resident.
#[allow(clippy::print_stderr)] // the figure, in the CI log
fn assert_stack_pages_at_most(server: &Server, limit: u64) {
    let pid = server.proc.pid();
    let mut pages = Vec::new();
    support::wait_until("a blocked conn-N thread per held connection", || {
        pages = conn_stack_pages(pid);
        pages.len() == CONNECTIONS && pages.iter().all(Option::is_some)
    });
    let pages: Vec<u64> = pages.into_iter().flatten().collect();
    let deepest = pages.iter().copied().max().unwrap();
    assert!(
        deepest <= limit,
        "an idle connection thread keeps {deepest} stack pages resident (at most {limit}): {pages:?}"
    );
    eprintln!(
        "{} connection threads: at most {deepest} stack pages resident",
        pages.len()
    );
}

/// The resident stack pages of each `conn-N` thread of `pid`; `None` for a thread not
/// blocked in the kernel (its stack pointer is not shown then).
fn conn_stack_pages(pid: u32) -> Vec<Option<u64>> {
    let regions = regions(pid);
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let dir = task.path();
            let name = fs::read_to_string(dir.join("comm")).ok()?;
            if !name.starts_with("conn-") {
                return None;
            }
            // `NR ARGS... SP PC` while in a system call, `-1 SP PC` while blocked outside
            // one, `running` otherwise.
            let syscall = fs::read_to_string(dir.join("syscall")).ok()?;
            let fields: Vec<&str> = syscall.split_whitespace().collect();
            let pages = (fields.len() >= 3)
                .then(|| u64::from_str_radix(fields[fields.len() - 2].trim_start_matches("0x"), 16))
                .and_then(Result::ok)
                .and_then(|sp| regions.iter().find(|region| region.holds(sp)))
                .map(|region| {
                    // The stack sits at the bottom of its region, above a guard page that
                    // keeps it apart from the region below; musl puts a page of TLS above
                    // it. Another mapping may have merged into the region above that.
                    let own = region.end.min(region.start + STACK_SIZE + region.page);
                    resident_pages(pid, region.start, own, region.page)
                });
            Some(pages)
        })
        .collect()
}

/// A connection thread's stack size.
const STACK_SIZE: u64 = websocket_test::server::CONNECTION_STACK_SIZE as u64;

/// Pages of `pid` between `start` and `end` that are in memory, from `/proc/PID/pagemap`
/// (a 64-bit entry per page; bit 63: present).
fn resident_pages(pid: u32, start: u64, end: u64, page: u64) -> u64 {
    use std::io::{Read, Seek, SeekFrom};
    let mut pagemap = fs::File::open(format!("/proc/{pid}/pagemap")).unwrap();
    pagemap.seek(SeekFrom::Start(start / page * 8)).unwrap();
    let mut entries = vec![0u8; ((end - start) / page * 8) as usize];
    pagemap.read_exact(&mut entries).unwrap();
    entries
        .chunks_exact(8)
        .filter(|entry| u64::from_le_bytes((*entry).try_into().unwrap()) >> 63 == 1)
        .count() as u64
}

/// A memory region of a process, from `/proc/PID/smaps`.
struct Region {
    start: u64,
    end: u64,
    /// Its page size in bytes.
    page: u64,
}

impl Region {
    fn holds(&self, address: u64) -> bool {
        (self.start..self.end).contains(&address)
    }
}

fn regions(pid: u32) -> Vec<Region> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut regions: Vec<Region> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(first), Some(second)) = (fields.next(), fields.next()) else {
            continue;
        };
        match first {
            "KernelPageSize:" => {
                regions.last_mut().unwrap().page = second.parse::<u64>().unwrap_or(4) << 10;
            }
            range if !range.ends_with(':') => {
                let Some((start, end)) = range.split_once('-') else {
                    continue;
                };
                let (Ok(start), Ok(end)) =
                    (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
                else {
                    continue;
                };
                regions.push(Region {
                    start,
                    end,
                    page: 4096,
                });
            }
            _ => {}
        }
    }
    regions
}
