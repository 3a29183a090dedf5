//! `/debug/connections` for both binaries: every live connection as JSON, with the name and
//! OS thread id of the thread that serves it, so a peer address leads straight to
//! `gdb -p PID` (`thread find conn-12`) or `/proc/PID/task/TID/stack`.

use std::fmt::Write as _;

use crate::activity::Snapshot;

/// The OS id of the calling thread (Linux: from the `/proc/thread-self` link), for
/// `/proc/PID/task/TID`; `None` where there is no such link.
pub(crate) fn thread_id() -> Option<u32> {
    std::fs::read_link("/proc/thread-self")
        .ok()?
        .file_name()?
        .to_str()?
        .parse()
        .ok()
}

/// One live connection as `/debug/connections` shows it.
pub(crate) struct Row<'a> {
    /// The connection's number (the `N` of `conn-N` or `client-N`).
    pub id: u64,
    /// The thread's name.
    pub thread: &'a str,
    /// The thread's OS id.
    pub tid: Option<u32>,
    /// The other end: the client's address (server) or the URL (client).
    pub peer: &'a str,
    /// What the connection did so far.
    pub activity: Snapshot,
}

/// The rows as a JSON array, one object per connection.
pub(crate) fn render(rows: &[Row<'_>]) -> String {
    let mut out = String::from("[");
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let a = &row.activity;
        let _ = write!(out, "\n  {{\"id\": {}, \"thread\": ", row.id);
        json_string(&mut out, row.thread);
        match row.tid {
            Some(tid) => {
                let _ = write!(out, ", \"tid\": {tid}");
            }
            None => out.push_str(", \"tid\": null"),
        }
        out.push_str(", \"peer\": ");
        json_string(&mut out, row.peer);
        let _ = write!(
            out,
            ", \"age_seconds\": {:.3}, \"silent_seconds\": {:.3}, \"messages_in\": {}, \
             \"bytes_in\": {}, \"messages_out\": {}, \"bytes_out\": {}, \"pongs\": {}, \
             \"last_rtt_seconds\": ",
            a.age.as_secs_f64(),
            a.silence.as_secs_f64(),
            a.messages_in,
            a.bytes_in,
            a.messages_out,
            a.bytes_out,
            a.pongs
        );
        match a.last_rtt {
            Some(rtt) => {
                let _ = write!(out, "{:.6}}}", rtt.as_secs_f64());
            }
            None => out.push_str("null}"),
        }
    }
    out.push_str(if rows.is_empty() { "]\n" } else { "\n]\n" });
    out
}

/// Writes `text` as a JSON string.
fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activity::Activity;

    #[test]
    fn rows_are_json_objects() {
        let activity = Activity::new();
        activity.received(3);
        let text = render(&[Row {
            id: 12,
            thread: "conn-12",
            tid: Some(4242),
            peer: "127.0.0.1:5555 \"quoted\"",
            activity: activity.snapshot(),
        }]);
        assert!(text.starts_with("[\n  {\"id\": 12, \"thread\": \"conn-12\", \"tid\": 4242, \"peer\": \"127.0.0.1:5555 \\\"quoted\\\"\""), "{text}");
        assert!(
            text.contains("\"messages_in\": 1, \"bytes_in\": 3"),
            "{text}"
        );
        assert!(text.contains("\"last_rtt_seconds\": null}"), "{text}");
        assert_eq!(render(&[]), "[]\n");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_thread_has_an_id() {
        let tid = thread_id().expect("Linux has /proc/thread-self");
        assert!(std::path::Path::new(&format!("/proc/self/task/{tid}")).exists());
    }
}
