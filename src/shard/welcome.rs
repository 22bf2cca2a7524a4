//! Welcomes held until the node's engine subscriptions of a connection's implicit topics
//! exist, so that a publish accepted once the client has its welcome reaches it.
//!
//! A welcome waits, as a `subscribe` ack does ([`Shard::hold_ack`](super::Shard)), for each
//! implicit topic whose engine subscription is new (or still pending on the shard). While it
//! waits the connection is open: what it is sent meanwhile (replies to ops the client
//! pipelined, deliveries of topics the node already receives) queues behind the welcome, in
//! order, within the connection's queue cap, and follows it. No timer: the engine's answer
//! releases it (the broker keeps the question while the engine is away).

use std::collections::HashMap;

use bytes::Bytes;

use crate::ws::conn::Push;

/// A connection's welcome waiting for its topics ([`super::Shard::held_welcomes`]).
#[derive(Debug)]
pub(crate) struct HeldWelcome {
    /// The connection's generation (a slot's next occupant is not this connection).
    pub(crate) generation: u32,
    /// Topics whose engine subscription the welcome still waits for.
    pub(crate) nr_waiting: u8,
    /// The welcome, once the machine has made it.
    pub(crate) welcome: Option<Bytes>,
    /// Frames sent to the connection meanwhile, each as its pieces, in order.
    pub(crate) behind: Vec<Vec<Bytes>>,
    /// Bytes of `behind` (counted against the connection's queue cap).
    pub(crate) behind_bytes: usize,
}

impl HeldWelcome {
    pub(crate) fn new(generation: u32) -> Self {
        Self {
            generation,
            nr_waiting: 0,
            welcome: None,
            behind: Vec::new(),
            behind_bytes: 0,
        }
    }

    /// Whether the welcome can go: it is made and waits for no topic any more.
    pub(crate) fn ready(&self) -> bool {
        self.nr_waiting == 0 && self.welcome.is_some()
    }
}

/// Queues a frame (`parts`) for `slot` behind its held welcome. `None`: no welcome of the
/// connection is held (the caller queues the frame as usual); else `Queued`, or `Overflow`
/// when the frames behind the welcome pass `cap` bytes.
pub(crate) fn behind(
    held: &mut HashMap<u32, HeldWelcome>,
    slot: u32,
    parts: &[&Bytes],
    cap: usize,
) -> Option<Push> {
    if held.is_empty() {
        return None;
    }
    let w = held.get_mut(&slot)?;
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if w.behind_bytes.saturating_add(len) > cap {
        return Some(Push::Overflow);
    }
    w.behind_bytes += len;
    w.behind.push(parts.iter().map(|p| (*p).clone()).collect());
    Some(Push::Queued)
}
