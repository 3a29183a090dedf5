//! The binaries' logger: one line per record on stdout, and a write that fails (a closed
//! pipe, a full disk) drops the line instead of taking the process down.
//!
//! A line reads `2026-12-02T09:44:20.856Z INFO  [websocket_test::server@main] message`:
//! RFC 3339 UTC time with milliseconds, the level padded to 5, `[target@thread]` (`?` for an
//! unnamed thread), the message. Control and other non-printable characters in the message
//! are escaped (`\n`, `\x1b`, `\u{85}`), so a line stays one line and `grep` never takes the
//! log for binary. Only the binaries call [`init`]; the library just uses the `log` macros.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use log::{LevelFilter, Log, Metadata, Record, SetLoggerError};

static LOGGER: Logger = Logger;
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Installs the logger for the whole process, passing records at `level` and above.
///
/// Fails if a logger is already installed.
pub fn init(level: LevelFilter) -> Result<(), SetLoggerError> {
    log::set_logger(&LOGGER)?;
    log::set_max_level(level);
    Ok(())
}

/// Lines that could not be written to stdout since the process started.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

struct Logger;

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let thread = std::thread::current();
        let line = format_line(SystemTime::now(), record, thread.name());
        if write_line(line.as_bytes()).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {
        let _ = std::io::stdout().lock().flush();
    }
}

/// Writes a whole line with one write(2) on a copy of stdout's descriptor, without std's
/// stdout lock: the kernel keeps concurrent writes of a line each whole (a file's offset
/// lock, a pipe's atomic writes up to 4 KiB), and threads logging at once (every connect
/// and disconnect) no longer queue on a user-space lock held across the system call.
#[cfg(unix)]
fn write_line(line: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    static STDOUT: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    let copy = STDOUT.get_or_init(|| {
        let fd = std::io::stdout().as_fd().try_clone_to_owned().ok();
        fd.map(std::fs::File::from)
    });
    match copy {
        Some(file) => (&*file).write_all(line),
        None => Err(std::io::ErrorKind::NotConnected.into()),
    }
}

/// Writes a whole line: stdout's LineWriter hands a line that ends in '\n' to one write.
#[cfg(not(unix))]
fn write_line(line: &[u8]) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(line).and_then(|()| stdout.flush())
}

/// The whole line for `record`, newline included.
fn format_line(now: SystemTime, record: &Record, thread: Option<&str>) -> String {
    let target = match record.target() {
        "" => record.module_path().unwrap_or_default(),
        target => target,
    };
    let mut line = String::with_capacity(128);
    // Writing to a String cannot fail, and Escaped::write_str never fails either.
    let _ = write!(
        line,
        "{} {:<5} [{target}@{}] ",
        humantime::format_rfc3339_millis(now),
        record.level().as_str(),
        thread.unwrap_or("?"),
    );
    let _ = write!(Escaped(&mut line), "{}", record.args());
    line.push('\n');
    line
}

/// Appends to a String with control and non-printable characters escaped.
struct Escaped<'a>(&'a mut String);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for c in text.chars() {
            match c {
                ' '..='~' => self.0.push(c),
                '\n' => self.0.push_str("\\n"),
                '\r' => self.0.push_str("\\r"),
                '\t' => self.0.push_str("\\t"),
                '\0'..='\x1f' | '\x7f' => write!(self.0, "\\x{:02x}", c as u32)?,
                c if is_printable(c) => self.0.push(c),
                c => write!(self.0, "{}", c.escape_unicode())?,
            }
        }
        Ok(())
    }
}

/// Whether `c` (not ASCII) shows as itself: false for C1 controls, format characters
/// (bidi overrides, zero-width), line and paragraph separators, private use and
/// unassigned code points.
fn is_printable(c: char) -> bool {
    // str::escape_debug leaves exactly the printable characters alone; behind a base
    // character, so that a combining accent counts as printable.
    let mut pair = String::with_capacity(5);
    pair.push('a');
    pair.push(c);
    pair.escape_debug().nth(1) == Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn line(level: log::Level, target: &str, thread: Option<&str>, message: &str) -> String {
        let at = UNIX_EPOCH + Duration::from_millis(1_796_204_660_856);
        format_line(
            at,
            &Record::builder()
                .level(level)
                .target(target)
                .args(format_args!("{message}"))
                .build(),
            thread,
        )
    }

    #[test]
    fn format_matches_the_documented_line() {
        assert_eq!(
            line(
                log::Level::Info,
                "websocket_test::server",
                Some("main"),
                "Listening on ws://0.0.0.0:3003/ws"
            ),
            "2026-12-02T09:44:20.856Z INFO  [websocket_test::server@main] \
             Listening on ws://0.0.0.0:3003/ws\n"
        );
        assert_eq!(
            line(log::Level::Error, "client", None, "x"),
            "2026-12-02T09:44:20.856Z ERROR [client@?] x\n"
        );
        assert_eq!(
            line(log::Level::Warn, "t", Some("conn-1"), ""),
            "2026-12-02T09:44:20.856Z WARN  [t@conn-1] \n"
        );
    }

    #[test]
    fn timestamps_keep_milliseconds_and_z() {
        let at = UNIX_EPOCH + Duration::from_secs(1_796_204_660);
        let record = Record::builder().args(format_args!("m")).build();
        assert!(format_line(at, &record, None).starts_with("2026-12-02T09:44:20.000Z "));
    }

    fn escape(text: &str) -> String {
        let mut out = String::new();
        write!(Escaped(&mut out), "{text}").unwrap();
        out
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(escape("\0\x01\x1b[31m\x7f"), "\\x00\\x01\\x1b[31m\\x7f");
        assert_eq!(escape("\u{80}\u{85}\u{9f}"), "\\u{80}\\u{85}\\u{9f}");
        assert_eq!(
            escape("\u{2028}\u{202e}\u{200b}"),
            "\\u{2028}\\u{202e}\\u{200b}"
        );
    }

    #[test]
    fn printable_text_is_kept() {
        let text = r#"close 1000 "bye" \ 'q' {} ~ café e\u{301} Grüße 日本語 🦀"#;
        assert_eq!(escape(text), text);
        assert_eq!(escape("e\u{301}"), "e\u{301}");
    }

    #[test]
    fn a_record_stays_on_one_line() {
        let text = line(log::Level::Trace, "tungstenite", Some("conn-7"), "a\nb\r\n");
        assert_eq!(text.matches('\n').count(), 1);
        assert!(text.ends_with("] a\\nb\\r\\n\n"), "{text:?}");
    }
}
