//! herald.v1, the JSON client protocol of docs/protocol.md: text frames in, text frames out.
//! The op syntax and reply bodies are [`crate::ws::ops`]; this module frames them and builds
//! the welcome and the delivery frames.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::Opened;
use crate::ws::frame;
use crate::ws::ops::{self, ErrorCode, NotJson, Request};

/// Parses one text message.
///
/// # Errors
/// Not JSON.
pub fn decode(text: &str) -> Result<Request<'_>, NotJson> {
    ops::parse(text)
}

/// `ack` as a text frame.
pub fn ack(id: Option<&RawValue>, exp: Option<Option<u64>>) -> Bytes {
    frame::text(ops::ack(id, exp).as_bytes())
}

/// `pong` as a text frame.
pub fn pong(id: Option<&RawValue>) -> Bytes {
    frame::text(ops::pong(id).as_bytes())
}

/// `error` as a text frame.
pub fn error(id: Option<&RawValue>, code: ErrorCode, message: &str) -> Bytes {
    frame::text(ops::error(id, code, message).as_bytes())
}

/// `unsubscribed` (reason `not_allowed`) as a text frame.
pub fn unsubscribed(topic: &str) -> Bytes {
    frame::text(ops::unsubscribed(topic, ops::DropReason::NotAllowed).as_bytes())
}

/// `{"type":"resync","topic":..,"reason":"engine"}` as a text frame: the node's engine
/// subscription of the topic was made again after the engine was away, so messages of the
/// topic may have been missed.
pub fn resync(topic: &str) -> Bytes {
    let mut s = String::from("{\"type\":\"resync\",\"topic\":");
    s.push_str(&serde_json::to_string(topic).expect("strings serialise"));
    s.push_str(",\"reason\":\"engine\"}");
    frame::text(s.as_bytes())
}

/// The first frame of a connection (field order as in protocol.md).
#[derive(serde::Serialize)]
struct Welcome<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    conn: String,
    project: &'a str,
    user: &'a str,
    exp: Option<u64>,
    heartbeat: u64,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    history: serde_json::Map<String, serde_json::Value>,
}

/// The welcome frame.
pub fn welcome(o: &Opened<'_>) -> Bytes {
    let welcome = Welcome {
        kind: "welcome",
        conn: o.conn.to_string(),
        project: o.project,
        user: o.user,
        exp: o.exp,
        heartbeat: o.heartbeat_secs,
        history: o
            .history
            .iter()
            .map(|(t, p)| {
                let at = serde_json::json!({"epoch": &*p.epoch, "offset": p.offset});
                (t.to_string(), at)
            })
            .collect(),
    };
    let json = serde_json::to_string(&welcome).expect("welcome serialises");
    frame::text(json.as_bytes())
}

/// The start of a delivery frame for `topic`, up to `"data":`, its WebSocket header
/// counting `body_len` more bytes.
pub fn message_head(topic: &str, body_len: usize) -> Bytes {
    let mut json = String::with_capacity(48 + topic.len());
    json.push_str("{\"type\":\"message\",\"topic\":");
    // A `user.<sub>` topic may hold any character but a control one, `"` and `\\` included.
    json.push_str(&serde_json::to_string(topic).expect("strings always serialise"));
    json.push_str(",\"data\":");
    frame::text_head(json.as_bytes(), body_len)
}

/// [`message_head`] of a topic with history: `"offset"` after the topic.
pub fn message_head_at(topic: &str, offset: u64, body_len: usize) -> Bytes {
    let mut json = String::with_capacity(72 + topic.len());
    json.push_str("{\"type\":\"message\",\"topic\":");
    json.push_str(&serde_json::to_string(topic).expect("strings always serialise"));
    json.push_str(",\"offset\":");
    json.push_str(&offset.to_string());
    json.push_str(",\"data\":");
    frame::text_head(json.as_bytes(), body_len)
}

/// The data's length and the message id of a [`message_body`] (as it comes back from an
/// engine); `None` if `body` is not one.
pub fn split_body(body: &[u8]) -> Option<(usize, &str)> {
    const ID: &[u8] = b",\"id\":\"";
    // The id and time follow the data, so the last `,"id":"` is the body's own.
    let at = body.windows(ID.len()).rposition(|w| w == ID)?;
    let rest = &body[at + ID.len()..];
    let end = rest.iter().position(|&b| b == b'"')?;
    let id = std::str::from_utf8(&rest[..end]).ok()?;
    (rest[end..].starts_with(b"\",\"ts\":") && body.ends_with(b"}")).then_some((at, id))
}

/// The end of a delivery frame, the same for every topic: the data, the id and the time.
pub fn message_body(data: &str, id: &str, ts: u64) -> Bytes {
    let mut json = String::with_capacity(data.len() + 32 + id.len());
    json.push_str(data);
    json.push_str(",\"id\":\"");
    json.push_str(id);
    json.push_str("\",\"ts\":");
    json.push_str(&ts.to_string());
    json.push('}');
    json.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_gives_back_its_data_length_and_id() {
        let data = r#"{"id":"x","n":[1,{"id":"y"}]}"#;
        let body = message_body(data, "n1-18c-7", 1_700_000_000_000);
        assert_eq!(split_body(&body), Some((data.len(), "n1-18c-7")));
        assert_eq!(split_body(b"42"), None);
        assert_eq!(split_body(br#"1,"id":"a","tx":1}"#), None);
    }
}
