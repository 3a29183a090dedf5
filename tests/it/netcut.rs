//! A silent network cut, for real: the server and the client each in a network namespace of
//! their own, joined by a veth pair, then iptables DROP on both sides (nothing arrives, no
//! RST, no FIN: a pulled cable or a forgotten NAT entry). TCP keepalive and the user
//! timeout must end the connection on both sides within the bound their flags give.
//!
//! Needs root, `ip` (iproute2) and `iptables` (CI installs them); elsewhere set
//! `WEBSOCKET_TEST_SKIP_NETNS=1` to skip it, loudly.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::{self, patience, Proc, TIMER_SLACK};

/// Runs `ip`/`iptables` arguments, panicking with what they printed on failure.
fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (install iproute2 and iptables)"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Two namespaces joined by a veth pair: `a` holds 10.201.N.1, `b` 10.201.N.2. Deleted on
/// drop (which removes the veth pair too).
struct Pair {
    a: String,
    b: String,
    a_ip: String,
    b_ip: String,
}

impl Pair {
    fn new() -> Pair {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = (std::process::id() + NEXT.fetch_add(1, Ordering::SeqCst)) % 250 + 1;
        let id = format!("{}-{n}", std::process::id() % 100_000);
        let pair = Pair {
            a: format!("wst-a-{id}"),
            b: format!("wst-b-{id}"),
            a_ip: format!("10.201.{n}.1"),
            b_ip: format!("10.201.{n}.2"),
        };
        let (veth_a, veth_b) = (format!("wsa{id}"), format!("wsb{id}"));
        run("ip", &["netns", "add", &pair.a]);
        run("ip", &["netns", "add", &pair.b]);
        run(
            "ip",
            &[
                "link", "add", &veth_a, "type", "veth", "peer", "name", &veth_b,
            ],
        );
        for (netns, veth, ip) in [
            (&pair.a, &veth_a, &pair.a_ip),
            (&pair.b, &veth_b, &pair.b_ip),
        ] {
            run("ip", &["link", "set", veth, "netns", netns]);
            run("ip", &["-n", netns, "link", "set", "lo", "up"]);
            run(
                "ip",
                &["-n", netns, "addr", "add", &format!("{ip}/30"), "dev", veth],
            );
            run("ip", &["-n", netns, "link", "set", veth, "up"]);
        }
        pair
    }

    /// Drops everything each side receives from the other.
    fn cut(&self) {
        for (netns, from) in [(&self.a, &self.b_ip), (&self.b, &self.a_ip)] {
            run(
                "ip",
                &[
                    "netns", "exec", netns, "iptables", "-A", "INPUT", "-s", from, "-j", "DROP",
                ],
            );
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for netns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
    }
}

/// `websocket_connections` of the server at `metrics` inside `netns`.
fn gauge(netns: &str, metrics: &str) -> Option<f64> {
    let output = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-s", "--max-time", "2"])
        .arg(format!("http://{metrics}/metrics"))
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            line.strip_prefix("websocket_connections ")?
                .trim()
                .parse()
                .ok()
        })
}

#[test]
fn a_silent_cut_ends_the_connection_on_both_sides_within_the_keepalive_bound() {
    if std::env::var_os("WEBSOCKET_TEST_SKIP_NETNS").is_some() {
        eprintln!("SKIPPED: the network-namespace cut test (WEBSOCKET_TEST_SKIP_NETNS is set)");
        return;
    }
    // Keepalive after 1 s of silence, probes every second, 3 s user timeout: the bound is
    // 4 s (see net::Liveness::bound); the defaults (15 s, 45 s) give 50 s the same way.
    const BOUND: Duration = Duration::from_secs(4);
    let liveness = ["--tcp-keepalive", "1s", "--tcp-user-timeout", "3s"];
    let pair = Pair::new();
    let server_args = [
        &["--host", &pair.a_ip, "--port", "0", "--metrics-port", "0"][..],
        &liveness,
    ]
    .concat();
    let server = Proc::start_in(&pair.a, "server", &server_args);
    let ws = support::address_after(&server.wait_for("Listening on ws://", patience()), "ws://");
    let metrics = server.wait_for("Metrics on http://", patience());
    let metrics = support::address_after(&metrics, "http://").to_string();
    let url = format!("ws://{ws}/ws");
    // The client sends nothing (no pings): only TCP can notice the cut.
    let client_args = [&["--url", &url, "--keepalive", "none"][..], &liveness].concat();
    let client = Proc::start_in(&pair.b, "client", &client_args);
    support::wait_until("the client connects", || {
        gauge(&pair.a, &metrics) == Some(1.0)
    });

    pair.cut();
    let cut = Instant::now();
    let server_saw = support::wait_within(
        "the server drops the vanished client",
        BOUND + Duration::from_secs(6),
        || gauge(&pair.a, &metrics) == Some(0.0),
    );
    let line = client.wait_for(
        "Connection lost",
        support::scaled(BOUND + Duration::from_secs(6)),
    );
    let client_saw = cut.elapsed();
    // Not before a keepalive probe could have gone unanswered.
    assert!(
        server_saw >= Duration::from_secs(1) - TIMER_SLACK,
        "{server_saw:?}"
    );
    assert!(
        line.contains("vanished") || line.contains("timed out"),
        "{line}"
    );
    assert!(line.contains("ended by the network"), "{line}");
    let disconnected = server.wait_for("Disconnected", patience());
    assert!(
        disconnected.contains("ended by the network"),
        "{disconnected}"
    );
    assert!(client_saw <= support::scaled(BOUND + Duration::from_secs(6)));
}
