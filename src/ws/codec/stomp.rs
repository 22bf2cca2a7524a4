//! STOMP 1.2 over WebSocket (1.1 and 1.0 negotiated as the specification says), sans-IO:
//! client frames are parsed from the text of WebSocket messages, server frames are encoded
//! as WebSocket text frames. No socket, no clock, no connection state beyond what a caller
//! hands in: the connection machine (`crate::ws::machine`) runs the conversation.
//!
//! A STOMP frame is independent of WebSocket messages: several may share one message and one
//! may be split over several (Spring splits frames over 64 KiB), so [`Parser`] keeps the
//! unfinished tail of a connection's stream between messages. End-of-line bytes between
//! frames are heart-beats. Header values are escaped (`\c`, `\n`, `\r`, `\\`) in 1.1 and
//! 1.2, except in `CONNECT`, `STOMP` and `CONNECTED`; 1.0 escapes nothing. A body ends at the
//! first NUL, or after `content-length` bytes, which may hold NULs themselves.
//!
//! A delivery is one `MESSAGE` frame per subscription, in four pieces: a small head made per
//! connection (the WebSocket header, `subscription`, `destination`, `ack`), the headers every
//! subscriber shares ([`message_shared`]), the publish's data (a slice of the body herald.v1
//! already shares, not a copy) and the closing NUL.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

use crate::pubsub::TopicId;
use crate::ws::frame;
use crate::ws::handshake::Upgrade;

/// Most headers a client frame may carry.
pub const MAX_HEADERS: usize = 64;

/// The closing NUL of every frame, shared.
pub static NUL: Bytes = Bytes::from_static(b"\0");

/// A STOMP protocol version. One byte; ordered, so the highest of two is `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
#[repr(u8)]
pub enum Version {
    /// STOMP 1.0: no header escaping, no heart-beats required.
    V10,
    /// STOMP 1.1.
    V11,
    /// STOMP 1.2.
    #[default]
    V12,
}

impl Version {
    /// Every version herald speaks, lowest first.
    pub const ALL: [Self; 3] = [Self::V10, Self::V11, Self::V12];

    /// The version as STOMP headers write it (`1.2`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V10 => "1.0",
            Self::V11 => "1.1",
            Self::V12 => "1.2",
        }
    }

    /// The WebSocket subprotocol that names it (`v12.stomp`).
    pub fn subprotocol(self) -> &'static str {
        match self {
            Self::V10 => "v10.stomp",
            Self::V11 => "v11.stomp",
            Self::V12 => "v12.stomp",
        }
    }

    /// The version a WebSocket subprotocol names, if it is a STOMP one.
    pub fn from_subprotocol(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.subprotocol() == name)
    }

    /// Header values are escaped in this version (outside `CONNECT`/`CONNECTED`).
    fn escapes(self) -> bool {
        self != Self::V10
    }
}

/// The version a connection speaks: the highest of the `accept-version` list (absent: 1.0)
/// that herald speaks, no higher than the subprotocol the upgrade answered (if any).
/// `None`: nothing in common.
pub fn negotiate(subprotocol: Option<Version>, accept_version: Option<&str>) -> Option<Version> {
    let cap = subprotocol.unwrap_or(Version::V12);
    let Some(list) = accept_version else {
        return Some(Version::V10);
    };
    list.split(',')
        .filter_map(|v| Version::ALL.into_iter().find(|k| k.as_str() == v.trim()))
        .filter(|v| *v <= cap)
        .max()
}

/// A client command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `CONNECT`.
    Connect,
    /// `STOMP` (1.1+'s name for `CONNECT`).
    Stomp,
    /// `SEND`.
    Send,
    /// `SUBSCRIBE`.
    Subscribe,
    /// `UNSUBSCRIBE`.
    Unsubscribe,
    /// `ACK`.
    Ack,
    /// `NACK`.
    Nack,
    /// `BEGIN`.
    Begin,
    /// `COMMIT`.
    Commit,
    /// `ABORT`.
    Abort,
    /// `DISCONNECT`.
    Disconnect,
}

impl Command {
    fn parse(line: &[u8]) -> Option<Self> {
        Some(match line {
            b"CONNECT" => Self::Connect,
            b"STOMP" => Self::Stomp,
            b"SEND" => Self::Send,
            b"SUBSCRIBE" => Self::Subscribe,
            b"UNSUBSCRIBE" => Self::Unsubscribe,
            b"ACK" => Self::Ack,
            b"NACK" => Self::Nack,
            b"BEGIN" => Self::Begin,
            b"COMMIT" => Self::Commit,
            b"ABORT" => Self::Abort,
            b"DISCONNECT" => Self::Disconnect,
            _ => return None,
        })
    }

    /// `CONNECT` or `STOMP`: the frames whose headers are never escaped.
    pub fn is_connect(self) -> bool {
        matches!(self, Self::Connect | Self::Stomp)
    }
}

/// One client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The command.
    pub command: Command,
    /// Headers in order, unescaped; a repeated header's first value is the one that counts.
    pub headers: Vec<(String, String)>,
    /// The body (bytes up to the NUL, or `content-length` bytes).
    pub body: Vec<u8>,
}

impl Frame {
    /// A header's value (the first, if repeated).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a client's stream cannot be read: the connection gets an ERROR frame saying so, then
/// is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A frame (headers and body) longer than the connection allows.
    #[error("frame over {max} bytes")]
    TooLarge {
        /// The connection's limit (`ws.max_message_bytes`).
        max: usize,
    },
    /// More headers than [`MAX_HEADERS`].
    #[error("more than {max} headers")]
    TooManyHeaders {
        /// [`MAX_HEADERS`].
        max: usize,
    },
    /// Not a client command.
    #[error("unknown command `{0}`")]
    UnknownCommand(String),
    /// A header line without `:`.
    #[error("header line without `:`")]
    NoColon,
    /// A `\` not followed by `c`, `n`, `r` or `\`.
    #[error("undefined escape sequence in a header")]
    BadEscape,
    /// `content-length` is not a number.
    #[error("content-length is not a number")]
    BadContentLength,
    /// The `content-length` bytes are not followed by NUL.
    #[error("no NUL after content-length bytes")]
    NoNul,
    /// A header that is not UTF-8.
    #[error("header not UTF-8")]
    NotUtf8,
}

/// The unfinished part of a connection's client stream, kept between WebSocket messages.
/// Empty and unallocated between whole frames.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
    /// Bytes of `buf` already read.
    start: usize,
}

impl Parser {
    /// Adds a WebSocket message's text to the stream.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame of the stream, heart-beats (EOLs between frames) skipped; `None`
    /// until more arrives. `version`: the negotiated version (header escaping);
    /// `max_frame_bytes`: the longest frame allowed, finished or not.
    ///
    /// # Errors
    /// The stream is not STOMP; nothing more can be read from it.
    pub fn next_frame(
        &mut self,
        version: Version,
        max_frame_bytes: usize,
    ) -> Result<Option<Frame>, ParseError> {
        loop {
            match next(&self.buf[self.start..], version, max_frame_bytes)? {
                Next::Beat(n) => self.start += n,
                Next::Frame(f, n) => {
                    self.start += n;
                    self.compact();
                    return Ok(Some(f));
                }
                Next::Incomplete => {
                    self.compact();
                    return Ok(None);
                }
            }
        }
    }

    /// Bytes held of an unfinished frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    fn compact(&mut self) {
        if self.start == self.buf.len() {
            self.buf = Vec::new();
            self.start = 0;
        }
    }
}

enum Next {
    Beat(usize),
    Frame(Frame, usize),
    Incomplete,
}

/// The line at the start of `buf` without its EOL (`\n` or `\r\n`), and its length with it.
fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let text = &buf[..end];
    Some((text.strip_suffix(b"\r").unwrap_or(text), end + 1))
}

fn next(buf: &[u8], version: Version, max: usize) -> Result<Next, ParseError> {
    match buf {
        [] => return Ok(Next::Incomplete),
        [b'\n', ..] => return Ok(Next::Beat(1)),
        [b'\r', b'\n', ..] => return Ok(Next::Beat(2)),
        [b'\r'] => return Ok(Next::Incomplete),
        _ => {}
    }
    let incomplete = || {
        if buf.len() > max {
            Err(ParseError::TooLarge { max })
        } else {
            Ok(Next::Incomplete)
        }
    };
    let Some((cmd, mut at)) = line(buf) else {
        return incomplete();
    };
    let command = Command::parse(cmd)
        .ok_or_else(|| ParseError::UnknownCommand(String::from_utf8_lossy(cmd).into_owned()))?;
    let escaped = version.escapes() && !command.is_connect();
    let mut headers = Vec::new();
    loop {
        let Some((text, n)) = line(&buf[at..]) else {
            return incomplete();
        };
        at += n;
        if text.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Err(ParseError::TooManyHeaders { max: MAX_HEADERS });
        }
        let colon = text
            .iter()
            .position(|&b| b == b':')
            .ok_or(ParseError::NoColon)?;
        let (k, v) = (&text[..colon], &text[colon + 1..]);
        headers.push(if escaped {
            (unescape(k)?, unescape(v)?)
        } else {
            (utf8(k)?, utf8(v)?)
        });
    }
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.trim().parse::<usize>())
        .transpose()
        .map_err(|_| ParseError::BadContentLength)?;
    let (body_end, end) = match length {
        Some(n) => {
            let end = at.saturating_add(n);
            if end > max {
                return Err(ParseError::TooLarge { max });
            }
            match buf.get(end) {
                None => return incomplete(),
                Some(0) => (end, end + 1),
                Some(_) => return Err(ParseError::NoNul),
            }
        }
        None => match buf[at..].iter().position(|&b| b == 0) {
            None => return incomplete(),
            Some(i) => (at + i, at + i + 1),
        },
    };
    if end > max.saturating_add(1) {
        return Err(ParseError::TooLarge { max });
    }
    Ok(Next::Frame(
        Frame {
            command,
            headers,
            body: buf[at..body_end].to_vec(),
        },
        end,
    ))
}

fn utf8(b: &[u8]) -> Result<String, ParseError> {
    String::from_utf8(b.to_vec()).map_err(|_| ParseError::NotUtf8)
}

fn unescape(b: &[u8]) -> Result<String, ParseError> {
    if !b.contains(&b'\\') {
        return utf8(b);
    }
    let mut out = Vec::with_capacity(b.len());
    let mut it = b.iter();
    while let Some(&c) = it.next() {
        if c != b'\\' {
            out.push(c);
            continue;
        }
        out.push(match it.next() {
            Some(b'c') => b':',
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b'\\') => b'\\',
            _ => return Err(ParseError::BadEscape),
        });
    }
    String::from_utf8(out).map_err(|_| ParseError::NotUtf8)
}

/// A header value as `version` writes it: escaped in 1.1 and 1.2; in 1.0, which cannot
/// carry them, line ends become spaces.
fn escape(out: &mut Vec<u8>, v: &str, version: Version) {
    for &b in v.as_bytes() {
        match (b, version.escapes()) {
            (b'\\', true) => out.extend_from_slice(b"\\\\"),
            (b':', true) => out.extend_from_slice(b"\\c"),
            (b'\n', true) => out.extend_from_slice(b"\\n"),
            (b'\r', true) => out.extend_from_slice(b"\\r"),
            (b'\n' | b'\r', false) => out.push(b' '),
            _ => out.push(b),
        }
    }
}

fn header(out: &mut Vec<u8>, name: &str, value: &str, version: Version) {
    out.extend_from_slice(name.as_bytes());
    out.push(b':');
    escape(out, value, version);
    out.push(b'\n');
}

/// `CONNECTED` (never escaped): the version and the heart-beats (ms) the server sends and
/// wants.
pub fn connected(version: Version, heart_beat: (u64, u64), user: &str) -> Bytes {
    let text = format!(
        "CONNECTED\nversion:{}\nheart-beat:{},{}\nserver:herald/{}\nuser-name:{}\n\n\0",
        version.as_str(),
        heart_beat.0,
        heart_beat.1,
        env!("CARGO_PKG_VERSION"),
        user.replace(['\n', '\r'], " "),
    );
    frame::text(text.as_bytes())
}

/// `RECEIPT` for a frame's `receipt` header.
pub fn receipt(version: Version, id: &str) -> Bytes {
    let mut out = b"RECEIPT\n".to_vec();
    header(&mut out, "receipt-id", id, version);
    out.extend_from_slice(b"\n\0");
    frame::text(&out)
}

/// `ERROR` with a `message` header (and the same text as its body), naming the receipt of
/// the frame that caused it, if it asked for one.
pub fn error(version: Version, message: &str, receipt_id: Option<&str>) -> Bytes {
    let mut out = b"ERROR\n".to_vec();
    header(&mut out, "message", message, version);
    if let Some(r) = receipt_id {
        header(&mut out, "receipt-id", r, version);
    }
    header(&mut out, "content-type", "text/plain", version);
    header(
        &mut out,
        "content-length",
        &message.len().to_string(),
        version,
    );
    out.push(b'\n');
    out.extend_from_slice(message.as_bytes());
    out.push(0);
    frame::text(&out)
}

/// An EOL heart-beat.
pub fn heart_beat() -> Bytes {
    Bytes::from_static(&[0x81, 0x01, b'\n'])
}

/// The headers of a `MESSAGE` every subscriber shares, up to the body: `message-id`,
/// `content-type`, `content-length` and the blank line. Ids are herald's (no escaping needed).
pub fn message_shared(id: &str, data_len: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(80 + id.len());
    out.extend_from_slice(b"message-id:");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\ncontent-type:application/json\ncontent-length:");
    out.extend_from_slice(data_len.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
    out.freeze()
}

/// The start of one subscription's `MESSAGE`: the WebSocket header (counting `rest_len`
/// more bytes: the shared headers, the data and the NUL), the command, `subscription`,
/// `destination` and, for a subscription acknowledged by the client, `ack`.
pub fn message_head(sub: &Subscription, version: Version, ack: &str, rest_len: usize) -> Bytes {
    frame::text_head(&message_head_text(sub, version, ack), rest_len)
}

/// The text of [`message_head`] without its WebSocket header (SockJS frames it itself).
pub fn message_head_text(sub: &Subscription, version: Version, ack: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + sub.id.len() + sub.destination.len());
    out.extend_from_slice(b"MESSAGE\n");
    header(&mut out, "subscription", &sub.id, version);
    header(&mut out, "destination", &sub.destination, version);
    if sub.client_ack {
        header(&mut out, "ack", ack, version);
    }
    out
}

/// A STOMP destination, as herald maps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination<'a> {
    /// `/topic/<t>`: herald topic `<t>`.
    Topic(&'a str),
    /// `/user/queue/<name>`: the user's own `user.<sub>` topic.
    UserQueue,
    /// `/app/<t>` (SEND only): herald topic `<t>`.
    App(&'a str),
    /// `/queue/...`: point-to-point queues, not supported.
    Queue,
    /// Anything else.
    Unknown,
}

impl<'a> Destination<'a> {
    /// Reads a `destination` header.
    pub fn parse(d: &'a str) -> Self {
        if let Some(t) = d.strip_prefix("/topic/") {
            Self::Topic(t)
        } else if d
            .strip_prefix("/user/queue/")
            .is_some_and(|n| !n.is_empty())
        {
            Self::UserQueue
        } else if let Some(t) = d.strip_prefix("/app/") {
            Self::App(t)
        } else if d.starts_with("/queue/") {
            Self::Queue
        } else {
            Self::Unknown
        }
    }
}

/// The herald topic a `/topic/` or `/app/` destination names, for a connection of `project`:
/// the path after the prefix, without a leading `<project>/` (Spring push centers put the
/// project in the path: `/topic/<projectId>/shanghai` is topic `shanghai`), and with `/` as
/// herald's `.` (`/topic/orders/eu` is topic `orders.eu`).
pub fn herald_topic<'a>(project: &str, path: &'a str) -> Cow<'a, str> {
    let path = path
        .strip_prefix(project)
        .and_then(|rest| rest.strip_prefix('/'))
        .unwrap_or(path);
    if path.contains('/') {
        Cow::Owned(path.replace('/', "."))
    } else {
        Cow::Borrowed(path)
    }
}

/// One `SUBSCRIBE` of a connection.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The client's `id`.
    pub id: Box<str>,
    /// The herald topic it receives.
    pub topic: TopicId,
    /// The destination it subscribed to, echoed in every `MESSAGE`.
    pub destination: Box<str>,
    /// `ack:client` or `client-individual`: each `MESSAGE` carries an `ack` header.
    pub client_ack: bool,
}

/// A STOMP connection's state, kept boxed in its `Conn` (herald.v1 connections hold none).
#[derive(Debug, Default)]
pub struct Session {
    /// The version the upgrade's subprotocol named, if any (the cap of the negotiation).
    pub offered: Option<Version>,
    /// The negotiated version (before `CONNECT`: the offered one, or 1.2).
    pub version: Version,
    /// `CONNECTED` was sent.
    pub connected: bool,
    /// The client asked for server heart-beats: the heartbeat sweep sends an EOL too.
    pub beats: bool,
    /// The upgrade, kept while the token is awaited in `CONNECT` (none was sent with it).
    pub upgrade: Option<Box<Upgrade>>,
    /// The unfinished tail of the client's stream.
    pub parser: Parser,
    /// Subscriptions, in order.
    pub subs: Vec<Subscription>,
}

/// The heart-beats of `CONNECTED`: `(server sends, server wants)` in ms, from the client's
/// `heart-beat` header (`cx,cy`) and the sweep's interval. The server sends at the sweep's
/// pace when the client wants heart-beats at all, and wants none (a silent client is found
/// by the sweep's WebSocket ping instead).
pub fn heart_beats(client: Option<&str>, sweep_ms: u64) -> (u64, u64) {
    let wants = client
        .and_then(|h| h.split_once(','))
        .and_then(|(_, cy)| cy.trim().parse::<u64>().ok())
        .unwrap_or(0);
    (if wants > 0 { sweep_ms.max(wants) } else { 0 }, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]], version: Version) -> Result<Vec<Frame>, ParseError> {
        let mut p = Parser::default();
        let mut frames = Vec::new();
        for c in chunks {
            p.feed(c);
            while let Some(f) = p.next_frame(version, 1024)? {
                frames.push(f);
            }
        }
        assert_eq!(p.pending(), 0, "nothing left over");
        Ok(frames)
    }

    fn h(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn several_frames_in_one_message() {
        let f = parse_all(
            &[b"SUBSCRIBE\nid:0\ndestination:/topic/a\n\n\0SUBSCRIBE\nid:1\ndestination:/topic/b\n\n\0"],
            Version::V12,
        )
        .unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].header("destination"), Some("/topic/b"));
    }

    #[test]
    fn one_frame_split_over_several_messages_at_every_byte() {
        let whole = b"SEND\ndestination:/topic/a\ncontent-length:5\n\n{\"a\"}\0";
        for cut in 1..whole.len() {
            let f = parse_all(&[&whole[..cut], &whole[cut..]], Version::V12).unwrap();
            assert_eq!(f.len(), 1, "cut at {cut}");
            assert_eq!(f[0].body, b"{\"a\"}");
        }
    }

    #[test]
    fn crlf_line_ends() {
        let f = parse_all(
            &[b"SEND\r\ndestination:/topic/a\r\nreceipt:7\r\n\r\nhi\0\r\n"],
            Version::V12,
        )
        .unwrap();
        assert_eq!(
            f[0].headers,
            [h("destination", "/topic/a"), h("receipt", "7")]
        );
        assert_eq!(f[0].body, b"hi");
    }

    #[test]
    fn headers_are_unescaped_in_1_1_and_1_2_but_not_in_connect_or_1_0() {
        let send = b"SEND\ndestination:/topic/a\nx\\cy:a\\\\b\\nc\\rd\n\n\0";
        for v in [Version::V11, Version::V12] {
            let f = parse_all(&[send], v).unwrap();
            assert_eq!(f[0].headers[1], h("x:y", "a\\b\nc\rd"), "{v:?}");
        }
        let f = parse_all(&[send], Version::V10).unwrap();
        assert_eq!(f[0].headers[1], h("x\\cy", "a\\\\b\\nc\\rd"));
        let f = parse_all(&[b"CONNECT\npasscode:a\\cb\n\n\0"], Version::V12).unwrap();
        assert_eq!(f[0].header("passcode"), Some("a\\cb"));
        assert_eq!(
            parse_all(&[b"SEND\nx:\\t\n\n\0"], Version::V12),
            Err(ParseError::BadEscape)
        );
    }

    #[test]
    fn content_length_bodies_may_hold_nul() {
        let f = parse_all(
            &[b"SEND\ndestination:/topic/a\ncontent-length:3\n\na\0b\0SEND\ndestination:/x\n\n\0"],
            Version::V12,
        )
        .unwrap();
        assert_eq!(f[0].body, b"a\0b");
        assert_eq!(f[1].body, b"");
        assert_eq!(
            parse_all(&[b"SEND\ncontent-length:1\n\nab\0"], Version::V12),
            Err(ParseError::NoNul)
        );
        assert_eq!(
            parse_all(&[b"SEND\ncontent-length:x\n\na\0"], Version::V12),
            Err(ParseError::BadContentLength)
        );
    }

    #[test]
    fn eol_heart_beats_between_frames_are_skipped() {
        let f = parse_all(
            &[b"\n", b"\r\n\nSEND\ndestination:/a\n\n\0\n", b"\r", b"\n"],
            Version::V12,
        )
        .unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].command, Command::Send);
    }

    #[test]
    fn size_limits() {
        let first = |data: &[u8], max| {
            let mut p = Parser::default();
            p.feed(data);
            p.next_frame(Version::V12, max)
        };
        // An unfinished frame over the limit is refused before its end arrives.
        assert_eq!(
            first(&[b'x'; 65], 64),
            Err(ParseError::TooLarge { max: 64 })
        );
        assert_eq!(
            first(b"SEND\ncontent-length:100\n\n", 64),
            Err(ParseError::TooLarge { max: 64 })
        );
        assert_eq!(
            first(b"SEND\n\nabc", 64),
            Ok(None),
            "within the limit: waits"
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}:v\n")).collect();
        let frame = format!("SEND\n{many}\n\0");
        assert_eq!(
            first(frame.as_bytes(), 4096),
            Err(ParseError::TooManyHeaders { max: MAX_HEADERS })
        );
    }

    #[test]
    fn unknown_commands_and_colonless_headers_are_errors() {
        assert_eq!(
            parse_all(&[b"MESSAGE\n\n\0"], Version::V12),
            Err(ParseError::UnknownCommand("MESSAGE".into()))
        );
        assert_eq!(
            parse_all(&[b"SEND\nnocolon\n\n\0"], Version::V12),
            Err(ParseError::NoColon)
        );
    }

    #[test]
    fn version_negotiation() {
        let v12 = Some(Version::V12);
        assert_eq!(negotiate(v12, Some("1.2,1.1,1.0")), v12);
        assert_eq!(negotiate(None, Some("1.0,1.1")), Some(Version::V11));
        assert_eq!(
            negotiate(Some(Version::V11), Some("1.2,1.1,1.0")),
            Some(Version::V11)
        );
        assert_eq!(negotiate(None, None), Some(Version::V10));
        assert_eq!(negotiate(v12, Some("2.0")), None);
        assert_eq!(Version::from_subprotocol("v10.stomp"), Some(Version::V10));
        assert_eq!(Version::from_subprotocol("herald.v1"), None);
    }

    #[test]
    fn server_frames() {
        let payload = |b: Bytes| b[2..].to_vec();
        assert_eq!(
            payload(receipt(Version::V12, "a:b")),
            b"RECEIPT\nreceipt-id:a\\cb\n\n\0"
        );
        assert_eq!(
            payload(error(Version::V10, "bad\nthing", None)),
            b"ERROR\nmessage:bad thing\ncontent-type:text/plain\ncontent-length:9\n\nbad\nthing\0"
        );
        let sub = Subscription {
            id: "sub-0".into(),
            topic: 0,
            destination: "/topic/news".into(),
            client_ack: true,
        };
        let shared = message_shared("m1", 2);
        let rest = shared.len() + 2 + 1;
        let head = message_head(&sub, Version::V12, "m1", rest);
        let mut whole = head.to_vec();
        whole.extend_from_slice(&shared);
        whole.extend_from_slice(b"{}\0");
        assert_eq!(
            whole[1] as usize,
            whole.len() - 2,
            "the WebSocket length counts it all"
        );
        assert_eq!(
            &whole[2..],
            b"MESSAGE\nsubscription:sub-0\ndestination:/topic/news\nack:m1\nmessage-id:m1\n\
              content-type:application/json\ncontent-length:2\n\n{}\0"
        );
        assert_eq!(heart_beats(Some("10000,10000"), 25_000), (25_000, 0));
        assert_eq!(heart_beats(Some("0,0"), 25_000), (0, 0));
        assert_eq!(heart_beats(None, 25_000), (0, 0));
    }

    #[test]
    fn destinations() {
        assert_eq!(
            Destination::parse("/topic/news"),
            Destination::Topic("news")
        );
        assert_eq!(
            Destination::parse("/user/queue/notice"),
            Destination::UserQueue
        );
        assert_eq!(Destination::parse("/app/chat"), Destination::App("chat"));
        assert_eq!(Destination::parse("/queue/jobs"), Destination::Queue);
        assert_eq!(Destination::parse("/exchange/x"), Destination::Unknown);
    }

    #[test]
    fn topic_paths_drop_the_project_and_use_dots() {
        assert_eq!(herald_topic("shop", "news"), "news");
        assert_eq!(herald_topic("shop", "shop/shanghai"), "shanghai");
        assert_eq!(herald_topic("shop", "shop/orders/eu"), "orders.eu");
        assert_eq!(herald_topic("shop", "orders/eu"), "orders.eu");
        assert_eq!(herald_topic("shop", "shopping/x"), "shopping.x");
        assert_eq!(herald_topic("shop", "shop"), "shop");
        assert!(matches!(herald_topic("shop", "news"), Cow::Borrowed(_)));
    }
}
