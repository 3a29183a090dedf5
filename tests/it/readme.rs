//! The README's flag tables keep up with the binaries: every flag and its environment
//! variable appear in their binary's table.

use clap::CommandFactory;
use websocket_test::{ClientConfig, ServerConfig};

const README: &str = include_str!("../../README.md");

/// The README from the heading `start` to the next heading at its level or above.
fn section(start: &str) -> &'static str {
    let level = start.chars().take_while(|&c| c == '#').count();
    let from = README
        .find(&format!("\n{start}\n"))
        .unwrap_or_else(|| panic!("README.md has no {start:?}"))
        + start.len()
        + 2;
    let rest = &README[from..];
    let end = rest
        .match_indices("\n#")
        .find(|(at, _)| {
            let hashes = rest[at + 1..].chars().take_while(|&c| c == '#').count();
            hashes <= level
        })
        .map_or(rest.len(), |(at, _)| at);
    &rest[..end]
}

fn assert_documented(command: clap::Command, heading: &str) {
    let table = section(heading);
    let mut checked = 0;
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version") {
            continue;
        }
        let flag = format!("`--{long}`");
        let listed = format!("`--{long},");
        assert!(
            table.contains(&flag) || table.contains(&listed),
            "README.md's {heading:?} table does not list --{long}"
        );
        if let Some(var) = arg.get_env() {
            let var = var.to_string_lossy();
            assert!(
                table.contains(&*var),
                "README.md's {heading:?} table does not name {var} (--{long})"
            );
        }
        checked += 1;
    }
    assert!(checked > 10, "only {checked} flags found for {heading:?}");
}

#[test]
fn the_readme_lists_every_server_flag_with_its_environment_variable() {
    assert_documented(ServerConfig::command(), "### server");
}

#[test]
fn the_readme_lists_every_client_flag_with_its_environment_variable() {
    assert_documented(ClientConfig::command(), "### client");
}
