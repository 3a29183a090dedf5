//! Where the frames are in the bytes handed to tungstenite, so a connection knows when
//! tungstenite holds none of the peer's bytes and no part of a message: then its buffers,
//! which keep the size of the largest frame they carried, can be swapped for small ones.

/// The longest frame header: 2 bytes, a 64-bit length and a masking key.
const MAX_HEADER: usize = 14;

/// Follows the frame structure (RFC 6455 §5.2) of a byte stream as it is handed over.
#[derive(Debug, Default)]
pub(crate) struct Boundaries {
    header: [u8; MAX_HEADER],
    header_len: usize,
    payload_left: u64,
    /// The frame being handed over ends a message: a control frame, or a data frame with FIN.
    ends_message: bool,
    /// A data frame without FIN went by and its message has not ended.
    in_message: bool,
    /// Messages (control frames included) whose last byte has been handed over.
    messages: u64,
}

impl Boundaries {
    /// Notes `bytes`, the next bytes of the stream handed over.
    pub(crate) fn pass(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                self.payload_left -= n as u64;
                bytes = &bytes[n..];
                if self.payload_left == 0 {
                    self.frame_ended();
                }
                continue;
            }
            let wanted = self.header_wanted();
            let n = bytes.len().min(wanted - self.header_len);
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == self.header_wanted() {
                self.header_ended();
            }
        }
    }

    /// True when every byte handed over belongs to the first `taken` messages, all of them
    /// whole: the reader that took exactly `taken` messages holds nothing more.
    pub(crate) fn all_taken(&self, taken: u64) -> bool {
        self.header_len == 0 && self.payload_left == 0 && !self.in_message && self.messages == taken
    }

    /// The header's length as far as its bytes so far tell: 2 until the length byte is in.
    fn header_wanted(&self) -> usize {
        if self.header_len < 2 {
            return 2;
        }
        let extended = match self.header[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    fn header_ended(&mut self) {
        let length = match self.header[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => u64::from_be_bytes(self.header[2..10].try_into().expect("8 bytes")),
            short => u64::from(short),
        };
        let fin = self.header[0] & 0x80 != 0;
        let control = self.header[0] & 0x08 != 0;
        self.ends_message = control || fin;
        if !control {
            self.in_message = !fin;
        }
        self.header_len = 0;
        self.payload_left = length;
        if length == 0 {
            self.frame_ended();
        }
    }

    fn frame_ended(&mut self) {
        if self.ends_message {
            self.messages += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(byte0: u8, payload_len: usize, masked: bool) -> Vec<u8> {
        let mask_bit = if masked { 0x80 } else { 0 };
        let mut bytes = vec![byte0];
        match payload_len {
            0..=125 => bytes.push(mask_bit | payload_len as u8),
            126..=0xFFFF => {
                bytes.push(mask_bit | 126);
                bytes.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                bytes.push(mask_bit | 127);
                bytes.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        if masked {
            bytes.extend_from_slice(&[1, 2, 3, 4]);
        }
        bytes.resize(bytes.len() + payload_len, 0x55);
        bytes
    }

    #[test]
    fn whole_messages_are_counted_in_any_split() {
        // A ping, a text message in three fragments with a pong between them, an empty
        // binary message, and a message with a 64-bit length.
        let frames = [
            frame(0x89, 4, true),
            frame(0x01, 100, true),
            frame(0x00, 300, true),
            frame(0x8A, 0, true),
            frame(0x80, 70_000, true),
            frame(0x82, 0, false),
            frame(0x82, 5, false),
        ];
        let stream: Vec<u8> = frames.concat();
        // Messages ended at each frame's end, and whether a message is open after it.
        let expected = [
            (1, false),
            (1, true),
            (1, true),
            (2, true),
            (3, false),
            (4, false),
            (5, false),
        ];
        for chunk in [1, 2, 3, 7, 13, 1000, stream.len()] {
            let mut boundaries = Boundaries::default();
            let mut handed = 0;
            let mut ends = frames.iter().scan(0, |end, f| {
                *end += f.len();
                Some(*end)
            });
            let mut next_end = ends.next();
            let mut seen = 0;
            for piece in stream.chunks(chunk) {
                boundaries.pass(piece);
                handed += piece.len();
                while next_end.is_some_and(|end| end <= handed) {
                    if next_end == Some(handed) {
                        let (messages, open) = expected[seen];
                        assert_eq!(boundaries.messages, messages, "chunk {chunk}, frame {seen}");
                        assert_eq!(boundaries.in_message, open, "chunk {chunk}, frame {seen}");
                        assert_eq!(boundaries.all_taken(messages), !open);
                    }
                    seen += 1;
                    next_end = ends.next();
                }
            }
            assert!(boundaries.all_taken(5), "chunk {chunk}");
            assert!(!boundaries.all_taken(4));
        }
    }

    #[test]
    fn a_partial_header_or_payload_is_never_all_taken() {
        let bytes = frame(0x82, 200, true);
        for cut in 1..bytes.len() {
            let mut boundaries = Boundaries::default();
            boundaries.pass(&bytes[..cut]);
            assert!(!boundaries.all_taken(0), "cut at {cut}");
            assert!(!boundaries.all_taken(1), "cut at {cut}");
            boundaries.pass(&bytes[cut..]);
            assert!(boundaries.all_taken(1), "cut at {cut}");
        }
    }
}
