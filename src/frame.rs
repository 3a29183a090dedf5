//! Frames we build ourselves: the Close frames written from outside a connection's thread
//! (shutdown, limits), masked with keys from the OS's entropy as RFC 6455 §5.3 requires.

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::{CloseFrame, Role};

/// Encodes a Close frame as `role` must send it (a client masks its frames).
pub(crate) fn close_frame(role: Role, code: CloseCode, reason: &str) -> Vec<u8> {
    let mut frame = Frame::close(Some(CloseFrame {
        code,
        reason: reason.to_owned().into(),
    }));
    if role == Role::Client {
        frame.header_mut().mask = Some(mask());
    }
    let mut bytes = Vec::with_capacity(2 + 4 + 2 + reason.len());
    frame
        .format(&mut bytes)
        .expect("writing to a Vec cannot fail");
    bytes
}

/// A masking key that a proxy cannot predict (§5.3 asks for "a strong source of entropy"):
/// rand's thread-local generator, a CSPRNG seeded from the OS, as tungstenite's own masks.
fn mask() -> [u8; 4] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_frames_are_encoded_for_their_role() {
        let server = close_frame(Role::Server, CloseCode::Away, "bye");
        assert_eq!(server, [0x88, 5, 0x03, 0xE9, b'b', b'y', b'e']);
        let client = close_frame(Role::Client, CloseCode::Normal, "");
        assert_eq!(client.len(), 2 + 4 + 2);
        assert_eq!(client[..2], [0x88, 0x80 | 2]);
        let mask = &client[2..6];
        assert_eq!([client[6] ^ mask[0], client[7] ^ mask[1]], [0x03, 0xE8]);
    }

    #[test]
    fn masks_differ() {
        let masks: std::collections::HashSet<[u8; 4]> = (0..64).map(|_| mask()).collect();
        assert!(masks.len() > 60, "{} distinct masks of 64", masks.len());
    }
}
