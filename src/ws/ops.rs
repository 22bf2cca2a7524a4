//! The client protocol of protocol.md: ops a client sends, replies the server sends.
//!
//! Parsing borrows from the frame (`id` and `data` stay raw JSON, echoed byte for byte).
//! Invalid JSON is a close (1007); well-formed JSON that is not a valid op is an error reply
//! that keeps the connection open.

use serde::Deserialize;
use serde_json::value::RawValue;

pub use crate::history::Since;

/// A client op, parsed.
#[derive(Debug)]
pub enum Op<'a> {
    /// Subscribe to a topic, recovering what was missed after `since` when given.
    Subscribe(&'a str, Option<Since>),
    /// Unsubscribe from a topic.
    Unsubscribe(&'a str),
    /// Replace the token (same project, same `sub`).
    Refresh(&'a str),
    /// Publish to a topic (where the project allows it).
    Publish(&'a str, &'a RawValue),
    /// Application-level ping.
    Ping,
    /// Recover the implicit topics with history, each after its `since` (right after the
    /// welcome).
    Recover(Vec<(String, Since)>),
}

/// A request: the op and its optional `id`.
#[derive(Debug)]
pub struct Request<'a> {
    /// Raw JSON of `id`, echoed in the reply.
    pub id: Option<&'a RawValue>,
    /// The op, or why it is not one (an error reply).
    pub op: Result<Op<'a>, String>,
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(borrow)]
    op: Option<&'a str>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    topic: Option<&'a str>,
    #[serde(borrow)]
    token: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    since: Option<&'a RawValue>,
}

/// `{"epoch":E,"offset":N}`: the last message a client saw of a topic with history.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSince {
    epoch: String,
    offset: u64,
}

impl From<RawSince> for Since {
    fn from(r: RawSince) -> Self {
        Self {
            epoch: r.epoch.into(),
            offset: r.offset,
        }
    }
}

const SINCE_SHAPE: &str = "`since` must be {\"epoch\":string,\"offset\":integer}";

fn since_of(raw: Option<&RawValue>) -> Result<Option<Since>, String> {
    raw.map(|v| serde_json::from_str::<RawSince>(v.get()).map(Into::into))
        .transpose()
        .map_err(|_| SINCE_SHAPE.into())
}

fn recover_of(raw: Option<&RawValue>) -> Result<Op<'_>, String> {
    let Some(v) = raw else {
        return Err("`recover` requires `since`".into());
    };
    serde_json::from_str::<std::collections::BTreeMap<String, RawSince>>(v.get())
        .map(|m| Op::Recover(m.into_iter().map(|(t, s)| (t, s.into())).collect()))
        .map_err(|_| "`since` must map topics to {\"epoch\":string,\"offset\":integer}".into())
}

/// A raw JSON field as given, `null` included (serde would read `null` as an absent
/// `Option`). Used by every `data` field.
pub fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue as Deserialize>::deserialize(d).map(Some)
}

/// A text message that is not JSON at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotJson;

/// Parses one text message.
///
/// # Errors
/// The text is not JSON (the connection closes with 1007).
pub fn parse<'a>(text: &'a str) -> Result<Request<'a>, NotJson> {
    let value: &'a RawValue = serde_json::from_str(text).map_err(|_| NotJson)?;
    let Ok(raw) = serde_json::from_str::<Raw<'a>>(value.get()) else {
        return Ok(Request {
            id: None,
            op: Err("expected an object {\"op\":..} with string fields".into()),
        });
    };
    let id = raw.id.filter(|v| {
        let s = v.get().as_bytes();
        s.first()
            .is_some_and(|c| *c == b'"' || *c == b'-' || c.is_ascii_digit())
    });
    let need = |field: Option<&'a str>, name: &str| {
        field.ok_or_else(|| format!("`{}` requires `{name}`", raw.op.unwrap_or("")))
    };
    let op = match raw.op {
        Some("subscribe") => {
            need(raw.topic, "topic").and_then(|t| since_of(raw.since).map(|s| Op::Subscribe(t, s)))
        }
        Some("recover") => recover_of(raw.since),
        Some("unsubscribe") => need(raw.topic, "topic").map(Op::Unsubscribe),
        Some("refresh") => need(raw.token, "token").map(Op::Refresh),
        Some("publish") => match (raw.topic, raw.data) {
            (Some(t), Some(d)) => Ok(Op::Publish(t, d)),
            _ => Err("`publish` requires `topic` and `data`".into()),
        },
        Some("ping") => Ok(Op::Ping),
        Some(other) => Err(format!("unknown op `{other}`")),
        None => Err("missing `op`".into()),
    };
    Ok(Request { id, op })
}

/// Error codes of error replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Malformed request.
    BadRequest,
    /// Not allowed for this connection.
    Forbidden,
    /// No such subscription.
    NotFound,
    /// Over a limit.
    Limit,
    /// Over a rate limit (`refresh`); the same op may succeed later.
    RateLimited,
}

impl ErrorCode {
    fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::Limit => "limit",
            Self::RateLimited => "rate_limited",
        }
    }
}

fn id_field(out: &mut String, id: Option<&RawValue>) {
    if let Some(id) = id {
        out.push_str(",\"id\":");
        out.push_str(id.get());
    }
}

/// The fields a subscribe ack adds for a topic with history: its position, and with a
/// `since`, whether what was missed follows (or why not).
pub fn position_fields(
    out: &mut String,
    epoch: &str,
    offset: u64,
    recovered: Option<Result<(), &str>>,
) {
    out.push_str("\"epoch\":");
    out.push_str(&serde_json::to_string(epoch).expect("strings serialise"));
    out.push_str(&format!(",\"offset\":{offset}"));
    match recovered {
        Some(Ok(())) => out.push_str(",\"recovered\":true"),
        Some(Err(reason)) => {
            out.push_str(",\"recovered\":false,\"reason\":\"");
            out.push_str(reason);
            out.push('"');
        }
        None => {}
    }
}

/// `{"type":"ack","id":..,"epoch":..,"offset":..}` (and `"recovered"`): a subscribe to a
/// topic with history.
pub fn ack_position(
    id: Option<&RawValue>,
    epoch: &str,
    offset: u64,
    recovered: Option<Result<(), &str>>,
) -> String {
    let mut s = String::from("{\"type\":\"ack\"");
    id_field(&mut s, id);
    s.push(',');
    position_fields(&mut s, epoch, offset, recovered);
    s.push('}');
    s
}

/// `{"type":"ack","id":..,"history":{T:{"epoch":..,"offset":..,"recovered":..},..}}`: a
/// `recover`'s answer, one entry per topic.
pub fn ack_recover(
    id: Option<&RawValue>,
    topics: &[(&str, &str, u64, Result<(), &str>)],
) -> String {
    let mut s = String::from("{\"type\":\"ack\"");
    id_field(&mut s, id);
    s.push_str(",\"history\":{");
    for (i, (topic, epoch, offset, recovered)) in topics.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&serde_json::to_string(topic).expect("strings serialise"));
        s.push_str(":{");
        position_fields(&mut s, epoch, *offset, Some(*recovered));
        s.push('}');
    }
    s.push_str("}}");
    s
}

/// `{"type":"ack","id":..}` (and `"exp"` for a refresh).
pub fn ack(id: Option<&RawValue>, exp: Option<Option<u64>>) -> String {
    let mut s = String::from("{\"type\":\"ack\"");
    id_field(&mut s, id);
    match exp {
        Some(Some(e)) => s.push_str(&format!(",\"exp\":{e}")),
        Some(None) => s.push_str(",\"exp\":null"),
        None => {}
    }
    s.push('}');
    s
}

/// Why the server dropped a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The connection's token (after a `refresh`) no longer allows the topic.
    NotAllowed,
}

impl DropReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::NotAllowed => "not_allowed",
        }
    }
}

/// `{"type":"unsubscribed","topic":..,"reason":..}`: the server dropped a subscription.
pub fn unsubscribed(topic: &str, reason: DropReason) -> String {
    let mut s = String::from("{\"type\":\"unsubscribed\",\"topic\":");
    s.push_str(&serde_json::to_string(topic).expect("strings serialise"));
    s.push_str(",\"reason\":\"");
    s.push_str(reason.as_str());
    s.push_str("\"}");
    s
}

/// `{"type":"pong","id":..}`.
pub fn pong(id: Option<&RawValue>) -> String {
    let mut s = String::from("{\"type\":\"pong\"");
    id_field(&mut s, id);
    s.push('}');
    s
}

/// `{"type":"error","id":..,"code":..,"message":..}`.
pub fn error(id: Option<&RawValue>, code: ErrorCode, message: &str) -> String {
    let mut s = String::from("{\"type\":\"error\"");
    id_field(&mut s, id);
    s.push_str(",\"code\":\"");
    s.push_str(code.as_str());
    s.push_str("\",\"message\":");
    s.push_str(&serde_json::to_string(message).expect("strings serialise"));
    s.push('}');
    s
}

impl PartialEq for Op<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Subscribe(a, x), Self::Subscribe(b, y)) => a == b && x == y,
            (Self::Recover(a), Self::Recover(b)) => a == b,
            (Self::Unsubscribe(a), Self::Unsubscribe(b)) | (Self::Refresh(a), Self::Refresh(b)) => {
                a == b
            }
            (Self::Publish(a, x), Self::Publish(b, y)) => a == b && x.get() == y.get(),
            (Self::Ping, Self::Ping) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops() {
        let r = parse(r#"{"op":"subscribe","topic":"news","id":7}"#).unwrap();
        assert_eq!(r.op, Ok(Op::Subscribe("news", None)));
        assert_eq!(ack(r.id, None), r#"{"type":"ack","id":7}"#);
        let r =
            parse(r#"{"op":"subscribe","topic":"news","since":{"epoch":"e","offset":2}}"#).unwrap();
        let since = Since {
            epoch: "e".into(),
            offset: 2,
        };
        assert_eq!(r.op, Ok(Op::Subscribe("news", Some(since.clone()))));
        let r = parse(r#"{"op":"subscribe","topic":"news","since":{"offset":2}}"#).unwrap();
        assert_eq!(r.op, Err(SINCE_SHAPE.into()));
        let r = parse(r#"{"op":"recover","since":{"all":{"epoch":"e","offset":2}}}"#).unwrap();
        assert_eq!(r.op, Ok(Op::Recover(vec![("all".into(), since)])));
        let r = parse(r#"{"op":"recover"}"#).unwrap();
        assert_eq!(r.op, Err("`recover` requires `since`".into()));
        assert_eq!(
            unsubscribed("news.eu", DropReason::NotAllowed),
            r#"{"type":"unsubscribed","topic":"news.eu","reason":"not_allowed"}"#
        );
        let r = parse(r#"{"op":"ping","id":"a\"b"}"#).unwrap();
        assert_eq!(pong(r.id), r#"{"type":"pong","id":"a\"b"}"#);
        let r = parse(r#"{"op":"publish","topic":"t","data":null}"#).unwrap();
        assert!(matches!(r.op, Ok(Op::Publish("t", d)) if d.get() == "null"));
        let r = parse(r#"{"op":"publish","topic":"t","data":{"x": [1, 2.50]}}"#).unwrap();
        match r.op {
            Ok(Op::Publish("t", d)) => assert_eq!(d.get(), r#"{"x": [1, 2.50]}"#),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors() {
        assert!(parse("{nope").is_err());
        assert!(parse("").is_err());
        let r = parse(r#"{"op":"dance","id":1}"#).unwrap();
        assert_eq!(r.op, Err("unknown op `dance`".into()));
        assert_eq!(
            error(r.id, ErrorCode::BadRequest, "unknown op `dance`"),
            r#"{"type":"error","id":1,"code":"bad_request","message":"unknown op `dance`"}"#
        );
        let r = parse("[1,2]").unwrap();
        assert!(r.op.is_err());
        let r = parse(r#"{"op":"subscribe"}"#).unwrap();
        assert_eq!(r.op, Err("`subscribe` requires `topic`".into()));
        // Object ids are not echoed (only numbers and strings are ids).
        let r = parse(r#"{"op":"ping","id":{"a":1}}"#).unwrap();
        assert_eq!(pong(r.id), r#"{"type":"pong"}"#);
    }
}
