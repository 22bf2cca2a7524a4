//! The client-protocol codecs: how a connection's text messages become ops and how the
//! server's answers, notices and deliveries become frames. The connection machine
//! (`super::machine`) speaks ops and replies; it never builds a client-protocol payload
//! itself, so a second protocol on the same path is a second codec, not a change to the
//! machine, the fan-out, authentication or the shard.
//!
//! A connection's codec is chosen once, at the handshake ([`Codec::for_upgrade`]), and kept
//! as one byte in its state. Deliveries are encoded once per codec per publish (a head per
//! topic and one body every topic shares), never per connection.
//!
//! Two codecs: herald.v1 JSON ([`herald_v1`]) and STOMP 1.2/1.1/1.0 ([`stomp`]). herald.v1's
//! ops map onto the methods below; STOMP frames carry more than an op (receipts,
//! subscription ids, `CONNECT`), so the machine reads them with [`stomp::Parser`] and answers
//! with [`stomp`]'s encoders directly. The op methods below (`decode` to `unsubscribed`) are
//! herald.v1's; a STOMP connection never reaches them, and their STOMP arms give frames a
//! STOMP client reads harmlessly (an EOL, an ERROR). A publish is encoded once in herald.v1's
//! form (`message_head`, `message_body`); a STOMP delivery takes its data from that body.

pub mod herald_v1;
pub mod stomp;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::handshake::Upgrade;
use super::ops::{ErrorCode, NotJson, Request};
use crate::pubsub::ConnId;

/// What the first frame of an open connection tells the client.
#[derive(Debug, Clone, Copy)]
pub struct Opened<'a> {
    /// The connection's id.
    pub conn: ConnId,
    /// Its project.
    pub project: &'a str,
    /// The token's `sub`.
    pub user: &'a str,
    /// The token's `exp`, if any.
    pub exp: Option<u64>,
    /// The heartbeat interval, whole seconds.
    pub heartbeat_secs: u64,
    /// The positions of its implicit topics with history.
    pub history: &'a [(Box<str>, crate::history::Position)],
}

/// A client protocol. One byte: connections store it by value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Codec {
    /// herald.v1: JSON text frames (docs/protocol.md).
    #[default]
    HeraldV1,
    /// STOMP over WebSocket (docs/stomp.md).
    Stomp,
}

impl Codec {
    /// The codec a connection speaks, from its upgrade request (the offered subprotocol, the
    /// path).
    pub fn for_upgrade(up: &Upgrade) -> Self {
        if up.stomp {
            Self::Stomp
        } else {
            Self::HeraldV1
        }
    }

    /// Reads one client text message.
    ///
    /// # Errors
    /// The message is not in the codec's syntax at all (the connection is closed 1007).
    pub fn decode(self, text: &str) -> Result<Request<'_>, NotJson> {
        match self {
            Self::HeraldV1 => herald_v1::decode(text),
            Self::Stomp => Err(NotJson),
        }
    }

    /// The frame acknowledging a request (`exp`: for a refresh, the new token's expiry).
    pub fn ack(self, id: Option<&RawValue>, exp: Option<Option<u64>>) -> Bytes {
        match self {
            Self::HeraldV1 => herald_v1::ack(id, exp),
            Self::Stomp => stomp::heart_beat(),
        }
    }

    /// The frame answering an application-level ping.
    pub fn pong(self, id: Option<&RawValue>) -> Bytes {
        match self {
            Self::HeraldV1 => herald_v1::pong(id),
            Self::Stomp => stomp::heart_beat(),
        }
    }

    /// The frame refusing a request.
    pub fn error(self, id: Option<&RawValue>, code: ErrorCode, message: &str) -> Bytes {
        match self {
            Self::HeraldV1 => herald_v1::error(id, code, message),
            Self::Stomp => stomp::error(stomp::Version::V12, message, None),
        }
    }

    /// The frame telling the client the server dropped its subscription to `topic` (the
    /// refreshed token no longer allows it).
    pub fn unsubscribed(self, topic: &str) -> Bytes {
        match self {
            Self::HeraldV1 => herald_v1::unsubscribed(topic),
            Self::Stomp => stomp::error(
                stomp::Version::V12,
                &format!("subscription to `{topic}` dropped"),
                None,
            ),
        }
    }

    /// The first frame of an open connection (STOMP has none: its `CONNECTED` answers the
    /// client's `CONNECT`).
    pub fn welcome(self, opened: &Opened<'_>) -> Option<Bytes> {
        match self {
            Self::HeraldV1 => Some(herald_v1::welcome(opened)),
            Self::Stomp => None,
        }
    }

    /// The start of a delivery frame for `topic`, its frame header counting `body_len` more
    /// bytes: the body [`Codec::message_body`] made, shared by every topic of the publish.
    pub fn message_head(self, topic: &str, body_len: usize) -> Bytes {
        // STOMP's per-subscription head is `stomp::message_head`, made at delivery.
        match self {
            Self::HeraldV1 | Self::Stomp => herald_v1::message_head(topic, body_len),
        }
    }

    /// The end of a delivery frame, the same for every topic of a publish: its data (copied
    /// byte for byte), id and time.
    pub fn message_body(self, data: &str, id: &str, ts: u64) -> Bytes {
        // STOMP's body is this body's data prefix (`Publication::stomp_parts`).
        match self {
            Self::HeraldV1 | Self::Stomp => herald_v1::message_body(data, id, ts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection keeps its codec in one byte.
    #[test]
    fn a_codec_is_one_byte() {
        assert_eq!(std::mem::size_of::<Codec>(), 1);
    }
}
