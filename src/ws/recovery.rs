//! Recovery on a connection: what it was told of each topic with history it receives, so that
//! the offsets it is sent of a topic are strictly increasing and contiguous.
//!
//! A subscribe reads the topic's stream after the subscription is in the shard's index and
//! the node's interest table ([`crate::history`] says why that read is exact). The position
//! read is the connection's *floor* for the topic ([`Mark`]): a live delivery at or below it
//! is already in the replay (or came before the subscription), so it is dropped; the rest
//! follow the replay in the shard's inbox order.
//!
//! The implicit topics are subscribed before the welcome, which tells their positions; a
//! client that wants to recover them says so with `recover` right after. Until then their
//! live deliveries are *held*: dropped, as they are in the store, and replayed from the
//! welcome's position (or the client's `since`) when the hold ends: at `recover`, at any
//! other op, at the first message [`HOLD_MS`] after the welcome, or at the connection's next
//! heartbeat (see `machine`).

use super::conn::{Identity, Mark};
use crate::history::{Position, Since};
use crate::pubsub::TopicId;

/// Whether a delivery at `offset` of `topic` goes to the connection now.
pub fn live(id: &Identity, topic: TopicId, offset: u64) -> bool {
    id.history
        .iter()
        .find(|m| m.topic == topic)
        .is_none_or(|m| m.held.is_none() && offset > m.floor)
}

/// How long the implicit topics are held after the welcome, at most, while messages come:
/// the first message after it ends the hold (so does the client's first op, or the heartbeat).
pub const HOLD_MS: u64 = 1000;

/// Whether the connection's implicit topics are held and have been for [`HOLD_MS`] (`now_ms`:
/// the wall clock, ms since the epoch).
pub fn hold_over(id: &Identity, now_ms: u64) -> bool {
    now_ms.saturating_sub(id.connected_at) >= HOLD_MS && id.history.iter().any(|m| m.held.is_some())
}

/// Sets `topic`'s floor to the position just read (held when `hold`).
pub fn mark(id: &mut Identity, topic: TopicId, at: &Position, hold: bool) {
    let held = hold.then(|| at.epoch.clone());
    match id.history.iter_mut().find(|m| m.topic == topic) {
        Some(m) => (m.floor, m.held) = (at.offset, held),
        None => id.history.push(Mark {
            topic,
            floor: at.offset,
            held,
        }),
    }
}

/// Sends nothing of `topic` to the connection until its next [`mark`] (its stream is being
/// read from the engine: what is delivered meanwhile is in the node's copy read then).
pub fn shut(id: &mut Identity, topic: TopicId) {
    let at = Position {
        epoch: "".into(),
        offset: u64::MAX,
    };
    mark(id, topic, &at, false);
}

/// `topic`'s stream started again (another epoch, offsets from 1): the connection takes its
/// deliveries from the start, unless its subscribe is still reading the stream ([`shut`]) or
/// the topic is held (both end with a read that sets the floor again).
pub fn restart(id: &mut Identity, topic: TopicId) {
    if let Some(m) = id
        .history
        .iter_mut()
        .find(|m| m.topic == topic && m.held.is_none() && m.floor != u64::MAX)
    {
        m.floor = 0;
    }
}

/// Forgets `topic` (unsubscribed: its id may name another topic later).
pub fn forget(id: &mut Identity, topic: TopicId) {
    id.history.retain(|m| m.topic != topic);
}

/// The held topics, each with the position the welcome told.
pub fn held(id: &Identity) -> Vec<(TopicId, Since)> {
    id.history
        .iter()
        .filter_map(|m| {
            Some((
                m.topic,
                Since {
                    epoch: m.held.as_deref()?.into(),
                    offset: m.floor,
                },
            ))
        })
        .collect()
}
