//! History through the Redis engine: a topic with history is numbered in Redis, so every
//! node delivers its messages with the same offsets, and its recent messages are a capped
//! Redis stream any node reads to recover a client.
//!
//! # Keys
//!
//! Per (project, topic) with history, beside its channel `<prefix><project>:<topic>`:
//!
//! - `<prefix>~h:<project>:<topic>`: a stream of the topic's messages, entry id `<offset>-0`,
//!   one field `d` holding the message body, capped at the rule's `size` (`MAXLEN`);
//! - `<prefix>~m:<project>:<topic>`: a hash of the stream's epoch (`e`) and last offset (`s`).
//!
//! Both expire `ttl_secs` after the topic's last publish. The epoch is made with the stream,
//! or by a read before its first message (which then keeps it): a stream lost in Redis,
//! expired or deleted, comes back with another epoch and offsets from 1.
//!
//! # Publishing
//!
//! One script ([`PUBLISH_SCRIPT`], loaded once per connection with `SCRIPT LOAD`, run with
//! `EVALSHA`) per topic with history: it increments the offset, appends to the stream, sets
//! the keys' TTL, and publishes on the topic's channel the body behind a numbered header
//! ([`numbered_payload`]): `#<offset>:<epoch>\n`. A body starts with the message's data (a
//! JSON value), never `#`, so the two kinds of payload cannot be mistaken for one another.
//!
//! # Recovering
//!
//! A node mirrors the topics it receives in its own store ([`crate::history`]), with the
//! offsets and epoch Redis gave. A client whose `since` the mirror cannot answer (the node
//! did not receive the topic then) is served once the bridge has read the stream from Redis
//! (`HMGET` of the epoch and offset, `XRANGE` from `since + 1`) into the mirror.

use std::collections::HashMap;

use bytes::Bytes;

use super::HistoryRead;

/// The publish of one message of a topic with history. `KEYS[1]`: the stream, `KEYS[2]`: its
/// epoch and offset. `ARGV`: channel, body, size, TTL in seconds, the epoch to give a new
/// stream. Answers the offset.
pub const PUBLISH_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('HEXISTS', KEYS[2], 's') == 1 then
  redis.call('DEL', KEYS[2])
end
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[2], 'e', epoch)
end
local offset = redis.call('HINCRBY', KEYS[2], 's', 1)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], offset .. '-0', 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[1], '#' .. offset .. ':' .. epoch .. '\n' .. ARGV[2])
return offset
";

/// The stream key of (project id, topic).
pub fn stream_key(prefix: &str, project: &str, topic: &str) -> String {
    format!("{prefix}~h:{project}:{topic}")
}

/// The epoch-and-offset key of (project id, topic).
pub fn meta_key(prefix: &str, project: &str, topic: &str) -> String {
    format!("{prefix}~m:{project}:{topic}")
}

/// Reads the stream at `stream` (its epoch and offset at `meta`) for a recovery, atomically:
/// its epoch (made now if it has none), its last offset, and with `read.after` the entries
/// after it, at most `read.count`, as (offset, body).
///
/// # Errors
/// Redis's error, described.
pub async fn read(
    conn: &mut redis::aio::MultiplexedConnection,
    (stream, meta): (&str, &str),
    read: HistoryRead,
) -> Result<(String, u64, Vec<(u64, Bytes)>), redis::RedisError> {
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("HSETNX")
        .arg(meta)
        .arg("e")
        .arg(new_epoch())
        .ignore()
        .cmd("EXPIRE")
        .arg(meta)
        .arg(read.ttl_secs)
        .arg("NX")
        .ignore()
        .cmd("HMGET")
        .arg(meta)
        .arg("e")
        .arg("s");
    // Without `after`, an empty range: the position only.
    let (start, end) = match read.after {
        Some(after) => (format!("{}-0", after.saturating_add(1)), "+".to_owned()),
        None => ("1".to_owned(), "0".to_owned()),
    };
    pipe.cmd("XRANGE")
        .arg(stream)
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(read.count.max(1));
    type Entries = Vec<(String, HashMap<String, Vec<u8>>)>;
    let ((epoch, top), entries): ((Option<String>, Option<u64>), Entries) =
        pipe.query_async(conn).await?;
    let entries = entries
        .into_iter()
        .filter_map(|(id, mut fields)| {
            let offset = id.split_once('-')?.0.parse().ok()?;
            Some((offset, Bytes::from(fields.remove("d")?)))
        })
        .collect();
    Ok((epoch.unwrap_or_default(), top.unwrap_or(0), entries))
}

/// Topics tracked by [`Delivered`] at most; past it, it starts again empty (a gap is then
/// missed once, or a repair repeats messages the connections' floors drop).
pub const MAX_TRACKED: usize = 65_536;
/// Most messages one repair delivers; a larger gap gets the resync notice instead.
pub const MAX_REPAIR: u64 = 10_000;

/// A (project id, topic).
pub type Key = (Box<str>, Box<str>);

/// The last offset (and its epoch) the node delivered of each topic with history: what tells
/// it missed messages (a gap) or has one already (delivered by a repair).
#[derive(Debug, Default)]
pub struct Delivered {
    last: HashMap<Key, (Box<str>, u64)>,
    /// Topics the node unsubscribed from since (their last offset no longer tells a gap).
    unsubscribed: Unsubscribed,
}

/// Where the subscription manager puts the topics the node unsubscribes from, for
/// [`Delivered`] to forget.
pub type Unsubscribed = std::sync::Arc<std::sync::Mutex<Vec<Key>>>;

/// What to do with a numbered message ([`Delivered::step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The next one: deliver it.
    Deliver,
    /// Delivered already (by a repair): drop it.
    Skip,
    /// Messages from this offset up to it were missed: repair, then deliver it.
    Repair(u64),
}

impl Delivered {
    /// What to do with the message at `offset` of `epoch` of `key`.
    pub fn step(&self, key: &Key, epoch: &str, offset: u64) -> Step {
        match self.last.get(key) {
            Some((e, last)) if **e == *epoch => {
                if offset <= *last {
                    Step::Skip
                } else if offset > last + 1 {
                    Step::Repair(last + 1)
                } else {
                    Step::Deliver
                }
            }
            _ => Step::Deliver,
        }
    }

    /// The node delivered the message at `offset` of `epoch` of `key`.
    pub fn note(&mut self, key: Key, epoch: &str, offset: u64) {
        if self.last.len() >= MAX_TRACKED && !self.last.contains_key(&key) {
            self.last.clear();
        }
        self.last.insert(key, (epoch.into(), offset));
    }

    /// Where to put the topics the node unsubscribes from.
    pub fn unsubscribed(&self) -> Unsubscribed {
        self.unsubscribed.clone()
    }

    /// Forgets the topics the node unsubscribed from.
    pub fn forget_unsubscribed(&mut self) {
        let gone =
            std::mem::take(&mut *self.unsubscribed.lock().unwrap_or_else(|e| e.into_inner()));
        for key in gone {
            self.last.remove(&key);
        }
    }

    /// Keeps only the topics `keep` says.
    pub fn retain(&mut self, keep: impl Fn(&Key) -> bool) {
        self.forget_unsubscribed();
        self.last.retain(|k, _| keep(k));
    }

    /// The last delivered (epoch, offset) of `key`.
    pub fn last(&self, key: &Key) -> Option<(&str, u64)> {
        self.last.get(key).map(|(e, o)| (&**e, *o))
    }
}

/// Delivers, in order, the messages `from..=to` of `epoch` of (project id, topic) that the
/// node missed, read from the stream. `false` when the stream no longer holds them all (or
/// cannot be read): nothing delivered, the topic's subscribers are to be told to resync.
pub async fn repair(
    conn: &mut redis::aio::MultiplexedConnection,
    node: &(dyn super::Deliver + Send + Sync),
    (prefix, timeout): (&str, std::time::Duration),
    (project, topic): (&str, &str),
    (epoch, from, to): (&str, u64, u64),
    delivered: &mut Delivered,
) -> bool {
    let mut xrange = redis::cmd("XRANGE");
    xrange
        .arg(stream_key(prefix, project, topic))
        .arg(format!("{from}-0"))
        .arg(format!("{to}-0"));
    type Entries = Vec<(String, HashMap<String, Vec<u8>>)>;
    let read = if to < from || to - from >= MAX_REPAIR {
        None
    } else {
        tokio::time::timeout(timeout, xrange.query_async::<Entries>(conn))
            .await
            .ok()
            .and_then(Result::ok)
    };
    let entries: Vec<(u64, Bytes)> = read
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(id, mut fields)| {
            Some((
                id.split_once('-')?.0.parse().ok()?,
                Bytes::from(fields.remove("d")?),
            ))
        })
        .collect();
    let whole = entries.len() as u64 == to.saturating_sub(from) + 1
        && entries.iter().zip(from..).all(|((o, _), want)| *o == want);
    if !whole {
        tracing::warn!(
            topic,
            from,
            to,
            "messages of a topic with history were missed by this node and the stream no \
             longer holds them all: its subscribers are told to resync"
        );
        return false;
    }
    let key: Key = (project.into(), topic.into());
    for (offset, body) in entries {
        node.deliver_numbered(project, topic, (offset, epoch), body);
        delivered.note(key.clone(), epoch, offset);
    }
    true
}

/// The epoch and last offset of (project id, topic)'s stream, if it exists.
///
/// # Errors
/// Redis's.
pub async fn position(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    (project, topic): (&str, &str),
) -> Result<(Option<String>, Option<u64>), redis::RedisError> {
    redis::cmd("HMGET")
        .arg(meta_key(prefix, project, topic))
        .arg("e")
        .arg("s")
        .query_async(conn)
        .await
}

/// An epoch for a stream Redis does not hold yet: the time and a random part, so two nodes
/// creating the same stream (only one wins) or a stream made again never share one.
pub fn new_epoch() -> String {
    format!("{:x}{:04x}", crate::hub::now_ms(), rand::random::<u16>())
}

/// What the script needs besides the channel and the body: the topic's keys and rule.
#[derive(Debug, Clone)]
pub struct Numbering {
    /// [`stream_key`].
    pub stream: String,
    /// [`meta_key`].
    pub meta: String,
    /// The rule's `size`.
    pub size: usize,
    /// The rule's TTL, in seconds (at least 1).
    pub ttl_secs: u64,
}

/// The payload the script publishes: `#<offset>:<epoch>\n` then the body.
pub fn numbered_payload(offset: u64, epoch: &str, body: &[u8]) -> Vec<u8> {
    let mut p = format!("#{offset}:{epoch}\n").into_bytes();
    p.extend_from_slice(body);
    p
}

/// A numbered payload's (offset, epoch, body); `None` for a plain one (a body).
pub fn split_numbered(payload: &Bytes) -> Option<(u64, Box<str>, Bytes)> {
    let rest = payload.strip_prefix(b"#")?;
    let nl = rest.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&rest[..nl]).ok()?;
    let (offset, epoch) = head.split_once(':')?;
    let offset = offset.parse().ok()?;
    Some((offset, epoch.into(), payload.slice(1 + nl + 1..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_numbered_payload_carries_its_offset_epoch_and_the_body_unchanged() {
        let body = br#""hi","id":"n-1-0","ts":7}"#;
        let p = Bytes::from(numbered_payload(42, "19abc0001", body));
        assert_eq!(&p[..], b"#42:19abc0001\n\"hi\",\"id\":\"n-1-0\",\"ts\":7}");
        let (offset, epoch, b) = split_numbered(&p).unwrap();
        assert_eq!((offset, &*epoch, &b[..]), (42, "19abc0001", &body[..]));
        assert_eq!(split_numbered(&Bytes::from_static(body)), None);
        assert_eq!(split_numbered(&Bytes::from_static(b"#x:e\n1")), None);
        assert_eq!(split_numbered(&Bytes::from_static(b"#1:e")), None);
    }

    #[test]
    fn a_jump_in_offsets_asks_for_a_repair_and_what_a_repair_delivered_is_dropped() {
        let mut d = Delivered::default();
        let key: Key = ("shop".into(), "news".into());
        assert_eq!(d.step(&key, "E", 7), Step::Deliver, "first seen");
        d.note(key.clone(), "E", 7);
        assert_eq!(d.step(&key, "E", 8), Step::Deliver);
        assert_eq!(d.step(&key, "E", 11), Step::Repair(8));
        assert_eq!(d.step(&key, "E", 7), Step::Skip);
        assert_eq!(d.step(&key, "F", 1), Step::Deliver, "another epoch");
        d.unsubscribed().lock().unwrap().push(key.clone());
        d.forget_unsubscribed();
        assert_eq!(
            d.step(&key, "E", 11),
            Step::Deliver,
            "forgotten once unsubscribed"
        );
        assert_eq!(d.last(&key), None);
    }

    #[test]
    fn keys_sit_beside_the_channel_under_the_prefix() {
        assert_eq!(stream_key("h:", "shop", "news"), "h:~h:shop:news");
        assert_eq!(meta_key("h:", "shop", "news"), "h:~m:shop:news");
    }
}
