//! One vocabulary for how a connection ended, shared by the server's and the client's log
//! lines and metric labels: the [`Reason`] (a small, fixed set: a metric label) and the
//! Close code that went out or came in.

use std::fmt;
use std::io;

use tungstenite::error::ProtocolError;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Error as WsError;

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The peer sent a Close frame.
    PeerClose,
    /// The TCP connection ended (FIN) without a Close frame.
    Eof,
    /// The TCP connection was reset.
    Reset,
    /// The peer broke RFC 6455; we sent Close 1002.
    ProtocolError,
    /// A text message or Close reason was not UTF-8; we sent Close 1007.
    InvalidData,
    /// A message or frame was over the size limit; we sent Close 1009.
    TooBig,
    /// The peer sent nothing for the idle timeout; we sent Close 1001.
    IdleTimeout,
    /// A ping got no pong within the pong timeout.
    PongTimeout,
    /// A write made no progress within the write timeout: the peer stopped reading.
    WriteTimeout,
    /// We were shutting down and closed the connection.
    Shutdown,
    /// Load mode: the connection sent its messages and closed normally.
    Finished,
    /// The server's memory budget for messages was used up; we sent Close 1013.
    Overloaded,
    /// TCP keepalive or the user timeout gave up: the peer vanished without a word (a
    /// pulled cable, a forgotten NAT entry, a firewall that drops).
    Vanished,
    /// Any other transport or protocol error.
    Error,
}

impl Reason {
    /// Every reason, in label order.
    pub const ALL: [Reason; 14] = [
        Reason::PeerClose,
        Reason::Eof,
        Reason::Reset,
        Reason::ProtocolError,
        Reason::InvalidData,
        Reason::TooBig,
        Reason::IdleTimeout,
        Reason::PongTimeout,
        Reason::WriteTimeout,
        Reason::Shutdown,
        Reason::Finished,
        Reason::Overloaded,
        Reason::Vanished,
        Reason::Error,
    ];

    /// The metric label value, e.g. `peer_close`.
    pub fn label(self) -> &'static str {
        match self {
            Reason::PeerClose => "peer_close",
            Reason::Eof => "eof",
            Reason::Reset => "reset",
            Reason::ProtocolError => "protocol_error",
            Reason::InvalidData => "invalid_data",
            Reason::TooBig => "too_big",
            Reason::IdleTimeout => "idle_timeout",
            Reason::PongTimeout => "pong_timeout",
            Reason::WriteTimeout => "write_timeout",
            Reason::Shutdown => "shutdown",
            Reason::Finished => "finished",
            Reason::Overloaded => "overloaded",
            Reason::Vanished => "vanished",
            Reason::Error => "error",
        }
    }

    /// Position in [`Reason::ALL`], for per-reason counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Who ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// This side: a Close frame of ours, a timeout of ours, our shutdown.
    Us,
    /// The other side, with a Close frame.
    Peer,
    /// Nobody said so: TCP ended or broke without a Close frame (the peer's process died,
    /// or a proxy, NAT or firewall on the way cut it).
    Network,
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Who::Us => "ended by us",
            Who::Peer => "ended by the peer",
            Who::Network => "ended by the network",
        })
    }
}

/// How one connection ended: the reason, the Close code sent or received (if any), and a
/// human-readable detail for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// Why it ended.
    pub reason: Reason,
    /// The Close frame's status code, ours or the peer's.
    pub code: Option<u16>,
    /// What the log line says, e.g. `close 1000 "bye"` or `Connection reset by peer`.
    pub detail: String,
}

impl Ending {
    /// An ending without a Close code.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Ending {
            reason,
            code: None,
            detail: detail.into(),
        }
    }

    /// The peer's Close frame ended the connection.
    pub fn peer_close(frame: &Option<CloseFrame>) -> Self {
        Ending {
            reason: Reason::PeerClose,
            code: frame.as_ref().map(|frame| u16::from(frame.code)),
            detail: describe_close(frame),
        }
    }

    /// We sent Close `code` because of `detail`.
    pub fn sent_close(reason: Reason, code: CloseCode, detail: impl fmt::Display) -> Self {
        let code = u16::from(code);
        Ending {
            reason,
            code: Some(code),
            detail: format!("{detail}; sent close {code}"),
        }
    }

    /// Sorts a transport failure: a reset, a write timeout, or another error.
    pub fn from_io(error: &io::Error) -> Self {
        let reason = if is_write_timeout(error) {
            Reason::WriteTimeout
        } else {
            match error.kind() {
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => Reason::Reset,
                io::ErrorKind::UnexpectedEof => Reason::Eof,
                io::ErrorKind::TimedOut => Reason::Vanished,
                _ => Reason::Error,
            }
        };
        Ending::new(reason, error.to_string())
    }

    /// Sorts a tungstenite error that is not a protocol violation of the peer's.
    pub fn from_ws_error(error: &WsError) -> Self {
        match error {
            WsError::Io(error) => Ending::from_io(error),
            WsError::ConnectionClosed | WsError::AlreadyClosed => {
                Ending::new(Reason::Eof, "connection closed")
            }
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                Ending::new(Reason::Eof, "connection closed without a close frame")
            }
            other => Ending::new(Reason::Error, other.to_string()),
        }
    }

    /// Who ended the connection.
    pub fn who(&self) -> Who {
        match self.reason {
            Reason::PeerClose => Who::Peer,
            Reason::Eof | Reason::Reset | Reason::Vanished | Reason::Error => Who::Network,
            _ => Who::Us,
        }
    }

    /// The end-of-connection line's text: how, who, and what the connection did, with the
    /// silence before the end called out when no Close frame came and nothing arrived for
    /// [`SILENT_DEATH`] or more (that length names the idle timeout of whatever cut it).
    pub fn describe(&self, activity: &crate::activity::Snapshot) -> String {
        use crate::activity::Seconds;
        let silent = self.reason != Reason::PeerClose
            && self.reason != Reason::Shutdown
            && self.reason != Reason::Finished
            && activity.silence >= SILENT_DEATH;
        if silent {
            format!(
                "{}; {}, died silent: nothing received for {} before the end; {activity}",
                self.detail,
                self.who(),
                Seconds(activity.silence)
            )
        } else {
            format!("{}; {}; {activity}", self.detail, self.who())
        }
    }

    /// The `code` metric label: the Close code, or `none`.
    pub fn code_label(&self) -> String {
        self.code
            .map_or_else(|| "none".into(), |code| code.to_string())
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// How long a connection must have received nothing before its end for the end line to say
/// it died silent.
pub const SILENT_DEATH: std::time::Duration = std::time::Duration::from_secs(1);

/// The protocol violation a tungstenite error reports, as the Close code RFC 6455 asks for
/// (tungstenite itself sends none) and the reason it stands for; `None` for errors of the
/// transport.
pub fn violation(error: &WsError) -> Option<(Reason, CloseCode)> {
    match error {
        WsError::Capacity(_) => Some((Reason::TooBig, CloseCode::Size)),
        WsError::Utf8(_) => Some((Reason::InvalidData, CloseCode::Invalid)),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) | WsError::AttackAttempt => {
            Some((Reason::ProtocolError, CloseCode::Protocol))
        }
        WsError::Io(error) if crate::budget::is_over_budget(error) => {
            Some((Reason::Overloaded, CloseCode::Again))
        }
        _ => None,
    }
}

/// The reason text of the Close frame we send for a violation.
pub fn violation_reason(code: CloseCode) -> &'static str {
    match code {
        CloseCode::Size => "message too big",
        CloseCode::Invalid => "invalid UTF-8 in text message",
        CloseCode::Again => "server busy, try again later",
        _ => "protocol error",
    }
}

/// Whether `frame` is not what the peer sent but tungstenite's stand-in for a Close whose
/// code must not be sent (1005, 1006, 999...): tungstenite answers those with 1002
/// "Protocol violation" and hands that frame on, so the violation is ours to count.
pub fn is_rewritten_close(frame: &Option<CloseFrame>) -> bool {
    frame.as_ref().is_some_and(|frame| {
        frame.code == CloseCode::Protocol && frame.reason.as_str() == "Protocol violation"
    })
}

/// How a log line tells a received Close frame: `close 1001 "server shutting down"`.
pub fn describe_close(frame: &Option<CloseFrame>) -> String {
    match frame {
        Some(frame) if frame.reason.is_empty() => format!("close {}", u16::from(frame.code)),
        Some(frame) => format!(
            "close {} {:?}",
            u16::from(frame.code),
            frame.reason.as_str()
        ),
        None => "close without status code".into(),
    }
}

/// The error a write that timed out becomes: a read timeout is a tick (`WouldBlock`), so a
/// write timeout must not look like one.
#[derive(Debug)]
struct WriteTimedOut;

impl fmt::Display for WriteTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("write timed out: the peer is not reading")
    }
}

impl std::error::Error for WriteTimedOut {}

/// The error for a write that made no progress within the write timeout.
pub fn write_timed_out() -> io::Error {
    io::Error::other(WriteTimedOut)
}

fn is_write_timeout(error: &io::Error) -> bool {
    matches!(error.get_ref(), Some(inner) if inner.is::<WriteTimedOut>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_and_indexed_in_order() {
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
            assert_eq!(
                Reason::ALL
                    .iter()
                    .filter(|other| other.label() == reason.label())
                    .count(),
                1
            );
        }
    }

    #[test]
    fn io_errors_are_sorted() {
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(Ending::from_io(&reset).reason, Reason::Reset);
        assert_eq!(
            Ending::from_io(&write_timed_out()).reason,
            Reason::WriteTimeout
        );
        assert_eq!(
            Ending::from_io(&write_timed_out()).detail,
            "write timed out: the peer is not reading"
        );
        let other = io::Error::other("boom");
        assert_eq!(Ending::from_io(&other).reason, Reason::Error);
    }

    #[test]
    fn closes_are_described_with_their_code() {
        let frame = Some(CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        });
        let ending = Ending::peer_close(&frame);
        assert_eq!(ending.to_string(), "close 1001 \"bye\"");
        assert_eq!(ending.code_label(), "1001");
        assert_eq!(Ending::peer_close(&None).code_label(), "none");
        let sent = Ending::sent_close(Reason::TooBig, CloseCode::Size, "too big");
        assert_eq!(sent.to_string(), "too big; sent close 1009");
    }
}
