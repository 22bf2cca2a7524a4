//! Server frame encoding over tungstenite's frame header codec. Server frames are unmasked, so
//! a frame is encoded once and the same bytes go to every recipient.

use bytes::{BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use super::close::CloseReason;

/// Bytes a delivery frame adds to its topic and data: the WebSocket header (at most 10) and
/// the JSON envelope with the longest id (33) and timestamp (20).
pub const MESSAGE_FRAME_OVERHEAD: usize =
    10 + r#"{"type":"message","topic":"","data":,"id":"","ts":}"#.len() + 33 + 20;

/// Encodes one unfragmented, unmasked frame.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    head(opcode, payload, 0)
}

/// The start of a text frame whose payload is `start` followed by `rest_len` more bytes held
/// elsewhere (a payload part several frames share, queued after this head).
pub fn text_head(start: &[u8], rest_len: usize) -> Bytes {
    head(OpCode::Data(Data::Text), start, rest_len)
}

/// The header of a frame of `start.len() + rest_len` payload bytes, then `start`.
fn head(opcode: OpCode, start: &[u8], rest_len: usize) -> Bytes {
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    let len = (start.len() + rest_len) as u64;
    let mut out = BytesMut::with_capacity(header.len(len) + start.len());
    let mut w = (&mut out).writer();
    header
        .format(len, &mut w)
        .expect("writing to memory cannot fail");
    out.extend_from_slice(start);
    out.freeze()
}

/// A text frame.
pub fn text(payload: &[u8]) -> Bytes {
    encode(OpCode::Data(Data::Text), payload)
}

/// A close frame for `reason`.
pub fn close(reason: CloseReason) -> Bytes {
    close_code(reason.code(), reason.text())
}

/// A close frame with an explicit code and text (text is cut to fit 125 bytes).
pub fn close_code(code: u16, text: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + text.len());
    payload.extend_from_slice(&code.to_be_bytes());
    let mut end = text.len().min(123);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&text.as_bytes()[..end]);
    encode(OpCode::Control(Control::Close), &payload)
}

/// A pong answering a ping's payload.
pub fn pong(payload: &[u8]) -> Bytes {
    encode(OpCode::Control(Control::Pong), payload)
}

/// The server's heartbeat ping (empty payload), shared by every connection.
pub fn ping() -> Bytes {
    Bytes::from_static(&[0x89, 0x00])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_extended_lengths() {
        let f = text(b"hi");
        assert_eq!(&f[..], &[0x81, 2, b'h', b'i']);
        let big = text(&[b'a'; 300]);
        assert_eq!(&big[..4], &[0x81, 126, 1, 44]);
        assert_eq!(big.len(), 304);
        let huge = text(&vec![b'a'; 70_000]);
        assert_eq!(huge[1], 127);
        assert_eq!(huge.len(), 70_010);
    }

    #[test]
    fn close_frames() {
        assert_eq!(
            &close(CloseReason::SlowConsumer)[..4],
            &[0x88, 15, 0x0f, 0xa8]
        );
        assert_eq!(
            &ping()[..],
            &encode(OpCode::Control(Control::Ping), b"")[..]
        );
        let long = close_code(1000, &"é".repeat(100));
        assert!(long.len() <= 127);
    }
}
