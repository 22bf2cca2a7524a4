//! The WebSocket frame layer of one connection, sans-IO: bytes in, [`Event`]s out.
//!
//! Parses client frames with tungstenite's [`FrameHeader`], unmasks in place, reassembles
//! fragments, and enforces RFC 6455 (masking, reserved bits, control frame rules, UTF-8, close
//! payloads) and the message size cap. No sockets, no clock: the I/O driver (`conn.rs`) feeds it
//! whatever bytes arrived and keeps the unconsumed tail. An idle session owns no heap memory.

use std::io::Cursor;

use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};

use super::close::CloseReason;

/// Something the peer said.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete text message.
    Text(&'a str),
    /// A frame of a text message that is not its last (the message comes as `Text` once
    /// complete); reported so every frame a peer sends can be counted.
    Fragment,
    /// A ping; answer with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong.
    Pong,
    /// The peer's close frame: its code (none for an empty payload).
    Close(Option<u16>),
}

/// Whether to keep parsing after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Parse the next frame.
    Continue,
    /// Stop: the connection is closing.
    Stop,
}

/// A text message arriving in fragments.
#[derive(Debug)]
struct Fragments {
    /// Unmasked payload so far.
    buf: Vec<u8>,
}

/// Frame-layer state of one connection.
#[derive(Debug, Default)]
pub struct Session {
    /// The message being reassembled, boxed so an idle session is one pointer.
    frag: Option<Box<Fragments>>,
}

/// Longest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

impl Session {
    /// No fragmented message is being reassembled.
    pub fn is_idle(&self) -> bool {
        self.frag.is_none()
    }

    /// Parses every complete frame at the start of `buf` (unmasking it in place) and reports
    /// each event to `on`. Returns how many bytes were consumed; the caller keeps the rest and
    /// feeds it again with more bytes.
    ///
    /// # Errors
    /// The [`CloseReason`] the connection must be closed with.
    pub fn feed(
        &mut self,
        buf: &mut [u8],
        max_message_bytes: usize,
        on: &mut dyn FnMut(Event<'_>) -> Flow,
    ) -> Result<usize, CloseReason> {
        let mut consumed = 0;
        loop {
            let mut cursor = Cursor::new(&buf[consumed..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(consumed),
                Err(_) => return Err(CloseReason::Protocol("reserved opcode")),
            };
            let header_len = cursor.position() as usize;
            self.check_header(&header, len, max_message_bytes)?;
            let len = len as usize;
            if buf.len() - consumed - header_len < len {
                return Ok(consumed);
            }
            let start = consumed + header_len;
            let payload = &mut buf[start..start + len];
            if let Some(mask) = header.mask {
                unmask(payload, mask);
            }
            consumed = start + len;
            let flow = self.frame(&header, payload, on)?;
            if flow == Flow::Stop {
                return Ok(consumed);
            }
        }
    }

    /// Rules that can be checked before the payload arrives, so an oversized or bad frame is
    /// refused without buffering it.
    fn check_header(
        &self,
        h: &FrameHeader,
        len: u64,
        max_message_bytes: usize,
    ) -> Result<(), CloseReason> {
        if h.rsv1 || h.rsv2 || h.rsv3 {
            return Err(CloseReason::Protocol("reserved bits set"));
        }
        if h.mask.is_none() {
            return Err(CloseReason::Protocol("client frames must be masked"));
        }
        match h.opcode {
            OpCode::Control(_) => {
                if len > MAX_CONTROL_PAYLOAD {
                    return Err(CloseReason::Protocol("control frame over 125 bytes"));
                }
                if !h.is_final {
                    return Err(CloseReason::Protocol("fragmented control frame"));
                }
            }
            OpCode::Data(Data::Continue) => {
                let Some(f) = &self.frag else {
                    return Err(CloseReason::Protocol("continuation frame without a start"));
                };
                if (f.buf.len() as u64).saturating_add(len) > max_message_bytes as u64 {
                    return Err(CloseReason::TooBig);
                }
            }
            OpCode::Data(Data::Binary) => return Err(CloseReason::Unsupported),
            OpCode::Data(_) => {
                if self.frag.is_some() {
                    return Err(CloseReason::Protocol(
                        "new message before the last one ended",
                    ));
                }
                if len > max_message_bytes as u64 {
                    return Err(CloseReason::TooBig);
                }
            }
        }
        Ok(())
    }

    fn frame(
        &mut self,
        h: &FrameHeader,
        payload: &[u8],
        on: &mut dyn FnMut(Event<'_>) -> Flow,
    ) -> Result<Flow, CloseReason> {
        match h.opcode {
            OpCode::Control(Control::Ping) => Ok(on(Event::Ping(payload))),
            OpCode::Control(Control::Pong) => Ok(on(Event::Pong)),
            OpCode::Control(Control::Close) => Ok(on(Event::Close(parse_close(payload)?))),
            OpCode::Data(Data::Text) if h.is_final => Ok(on(Event::Text(utf8(payload)?))),
            OpCode::Data(Data::Text) => {
                self.frag = Some(Box::new(Fragments {
                    buf: payload.to_vec(),
                }));
                Ok(on(Event::Fragment))
            }
            OpCode::Data(Data::Continue) => {
                let f = self.frag.as_mut().expect("checked in check_header");
                f.buf.extend_from_slice(payload);
                if !h.is_final {
                    return Ok(on(Event::Fragment));
                }
                let f = self.frag.take().expect("present above");
                Ok(on(Event::Text(utf8(&f.buf)?)))
            }
            // Binary and reserved opcodes are refused in check_header / FrameHeader::parse.
            _ => Err(CloseReason::Protocol("unexpected opcode")),
        }
    }

    /// Whether a fragmented message is being reassembled (it owns a buffer).
    pub fn is_mid_message(&self) -> bool {
        self.frag.is_some()
    }
}

fn utf8(b: &[u8]) -> Result<&str, CloseReason> {
    std::str::from_utf8(b).map_err(|_| CloseReason::InvalidData("invalid UTF-8"))
}

fn parse_close(payload: &[u8]) -> Result<Option<u16>, CloseReason> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(CloseReason::Protocol("close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !CloseCode::from(code).is_allowed() || (1016..3000).contains(&code) {
                return Err(CloseReason::Protocol("invalid close code"));
            }
            utf8(&payload[2..])?;
            Ok(Some(code))
        }
    }
}

/// XORs `buf` with the 4-byte client mask.
fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = buf.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn run(s: &mut Session, bytes: &[u8]) -> (Result<usize, CloseReason>, Vec<String>) {
        let mut buf = bytes.to_vec();
        let mut seen = Vec::new();
        let r = s.feed(&mut buf, 1000, &mut |e| {
            seen.push(format!("{e:?}"));
            Flow::Continue
        });
        (r, seen)
    }

    #[test]
    fn text_ping_close() {
        let mut s = Session::default();
        let mut bytes = frame(0x81, b"hello");
        bytes.extend(frame(0x89, b"p"));
        bytes.extend(frame(0x88, &[0x03, 0xe8]));
        let (r, seen) = run(&mut s, &bytes);
        assert_eq!(r, Ok(bytes.len()));
        assert_eq!(
            seen,
            ["Text(\"hello\")", "Ping([112])", "Close(Some(1000))"]
        );
    }

    #[test]
    fn partial_frames_consume_nothing() {
        let mut s = Session::default();
        let bytes = frame(0x81, b"hello");
        for cut in 0..bytes.len() {
            assert_eq!(run(&mut s, &bytes[..cut]).0, Ok(0));
        }
    }

    #[test]
    fn fragments_reassemble() {
        let mut s = Session::default();
        let mut bytes = frame(0x01, b"hel");
        bytes.extend(frame(0x89, b""));
        bytes.extend(frame(0x80, b"lo"));
        let (r, seen) = run(&mut s, &bytes);
        assert_eq!(r, Ok(bytes.len()));
        // Each frame is reported (for counting), the message once it is whole.
        assert_eq!(seen, ["Fragment", "Ping([])", "Text(\"hello\")"]);
        assert!(!s.is_mid_message());
    }

    #[test]
    fn violations() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (vec![0x81, 0x02, b'h', b'i'], 1002),     // unmasked
            (frame(0xC1, b"x"), 1002),                // rsv1
            (frame(0x80, b"x"), 1002),                // continuation without start
            (frame(0x89, &[0; 126]), 1002),           // control over 125
            (frame(0x09, b""), 1002),                 // fragmented control
            (frame(0x83, b""), 1002),                 // reserved opcode
            (frame(0x82, b"x"), 1003),                // binary
            (frame(0x81, &[0xff, 0xfe]), 1007),       // bad UTF-8
            (frame(0x81, &[b'a'; 1001]), 1009),       // over max
            (frame(0x88, &[0x03]), 1002),             // 1-byte close
            (frame(0x88, &[0x03, 0xed]), 1002),       // close code 1005
            (frame(0x88, &[0x03, 0xe8, 0xff]), 1007), // close reason not UTF-8
        ];
        for (bytes, code) in cases {
            let mut s = Session::default();
            let (r, _) = run(&mut s, &bytes);
            assert_eq!(r.map_err(|e| e.code()), Err(code), "{bytes:x?}");
        }
        // Fragments summing over the cap.
        let mut s = Session::default();
        let mut bytes = frame(0x01, &[b'a'; 600]);
        bytes.extend(frame(0x80, &[b'a'; 600]));
        assert_eq!(run(&mut s, &bytes).0.map_err(|e| e.code()), Err(1009));
        // A new message inside a fragmented one.
        let mut s = Session::default();
        let mut bytes = frame(0x01, b"a");
        bytes.extend(frame(0x81, b"b"));
        assert_eq!(run(&mut s, &bytes).0.map_err(|e| e.code()), Err(1002));
    }

    #[test]
    fn oversize_refused_from_header_alone() {
        let mut s = Session::default();
        let bytes = frame(0x81, &[b'a'; 70_000]);
        // Only the header has arrived.
        assert_eq!(run(&mut s, &bytes[..14]).0.map_err(|e| e.code()), Err(1009));
    }

    #[test]
    fn continuation_with_huge_length_is_too_big() {
        // Found by fuzz/session: buffered + 2^64-1 overflowed (a panic in debug builds, a
        // wrap past the cap in release ones).
        let mut s = Session::default();
        let mut bytes = frame(0x01, b"a");
        bytes.extend_from_slice(&[0x80, 0x80 | 127]);
        bytes.extend_from_slice(&u64::MAX.to_be_bytes());
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(run(&mut s, &bytes).0.map_err(|e| e.code()), Err(1009));
        let mut buf = bytes.clone();
        // No cap at all: no overflow either, the frame is just incomplete.
        let r = Session::default().feed(&mut buf, usize::MAX, &mut |_| Flow::Continue);
        assert_eq!(r, Ok(7));
    }

    #[test]
    fn unmask_any_length() {
        for n in 0..9 {
            let mut b = vec![0u8; n];
            unmask(&mut b, [1, 2, 3, 4]);
            let want: Vec<u8> = (0..n).map(|i| [1, 2, 3, 4][i % 4]).collect();
            assert_eq!(b, want);
        }
    }
}
