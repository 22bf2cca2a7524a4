//! The broker seam: where publications leave the node and come back, and where the node's
//! interest in topics is declared.
//!
//! Shards never talk to a broker about connections: they report a topic's first local
//! subscriber and its last local unsubscribe ([`Broker::subscribe`], [`Broker::unsubscribe`]),
//! and they receive publications in their inbox. Between the two, a [`Broker`] moves
//! publications: the [`LocalBroker`] hands them straight back to the node's delivery path
//! ([`Deliver`], implemented by [`crate::hub::Hub`]), which sends each only to the shards
//! the [`Interest`] table says hold subscribers of its topics. An engine shared by several
//! nodes implements the same trait: it keeps the node's table up to date as the local broker
//! does, carries its own interest and the publications to the other nodes, and calls
//! [`Deliver::deliver`] for what comes back. Shards do not change.
//!
//! With an engine ([`redis::RedisBroker`]) a publish is accepted once the engine has it
//! ([`Pending::acknowledged`]), and every node, this one included, delivers it from its own
//! subscription through [`Deliver::deliver_each`], under the same publish gate as a local
//! publish.
//!
//! Ordering: a shard calls [`Broker::subscribe`] before it queues the `subscribe` ack (or the
//! welcome, for the implicit topics), and the call returns once the table has the shard's bit;
//! so a publish accepted after the client saw the ack is routed to that shard (see
//! docs/architecture.md, "Fan-out").

pub mod control;
mod interest;
pub mod redis;
pub mod redis_history;
pub mod tls;

pub use interest::{Added, ENTRY_BYTES, Interest, NR_STRIPES};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use bytes::Bytes;

use crate::shard::mailbox::Publication;

/// Why a publish failed. In every case nothing was sent.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    /// A shard's inbox is full (back-pressure): nothing was sent; retry later.
    #[error("shard {0} inbox is full; nothing was sent, retry later")]
    Busy(usize),
    /// The node is draining.
    #[error("server is draining")]
    Draining,
    /// The delivery frame is larger than a connection's outbound queue can ever hold.
    #[error(
        "message frame of {size} bytes is over ws.max_outbound_queue_bytes ({max}); \
         no connection could take it"
    )]
    TooLarge {
        /// The frame's size in bytes.
        size: usize,
        /// `ws.max_outbound_queue_bytes`.
        max: usize,
    },
    /// A shard thread has died; the node is stopping.
    #[error("shard {0} has failed; the server is restarting")]
    Failed(usize),
    /// The engine the cluster shares publishes through cannot take it.
    #[error("{0}")]
    EngineUnavailable(EngineDown),
    /// The queue to the engine is full (back-pressure): nothing was sent; retry later.
    #[error("the queue to the engine is full; nothing was sent, retry later")]
    EngineBusy,
    /// The node is over its budget for queued outbound data or behind its publications
    /// ([`crate::flow`]): nothing was sent; retry later.
    #[error("{0}")]
    Overloaded(crate::flow::Overload),
}

/// Why the engine did not take a publish.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum EngineDown {
    /// Not connected (starting, or reconnecting after a failure).
    #[error("the engine is not connected; nothing was sent, retry later")]
    NotConnected,
    /// The connection failed while the publish was on its way.
    #[error("the connection to the engine failed; the message was not acknowledged, retry")]
    Lost,
    /// No answer within `engine.command_timeout_ms`: the engine may or may not have it.
    #[error(
        "no answer from the engine within {0} ms; the message was not acknowledged and may \
         or may not be delivered"
    )]
    NoAnswer(u64),
}

/// The engine's counters, read by `/metrics`.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Connected to Redis, subscriptions restored.
    pub up: AtomicBool,
    /// Connections made (the first one and every reconnection).
    pub connects: AtomicU64,
    /// Connections lost.
    pub disconnects: AtomicU64,
    /// Messages Redis acknowledged (`PUBLISH` per topic).
    pub published: AtomicU64,
    /// Messages received from the node's subscriptions.
    pub received: AtomicU64,
    /// Messages dropped because the queue to the delivery loop was full.
    pub dropped_queue_full: AtomicU64,
    /// (message, shard) pairs dropped because the shard's inbox was full.
    pub dropped_inbox_full: AtomicU64,
    /// Messages dropped because the node was draining.
    pub dropped_draining: AtomicU64,
    /// Messages on a channel naming no project of this node.
    pub dropped_unknown: AtomicU64,
    /// Messages whose payload is no message body (another program publishing on herald's
    /// channels).
    pub dropped_malformed: AtomicU64,
    /// Interest changes dropped for a full queue (each makes the bridge reconcile).
    pub changes_overflowed: AtomicU64,
    /// Channels the node is subscribed to.
    pub channels: AtomicU64,
}

/// A publish handed to the broker, not yet acknowledged by it.
#[derive(Debug)]
#[must_use = "a publish is accepted only once its acknowledgement is awaited"]
pub struct Pending(Option<(Ack, Duration)>);

/// Where a broker acknowledges a publish.
pub type Ack = tokio::sync::oneshot::Receiver<Result<(), PublishError>>;

impl Pending {
    /// Already done (the local broker delivered it).
    pub fn done() -> Self {
        Self(None)
    }

    /// Waiting for `ack`, at most `within`.
    pub fn awaiting(ack: Ack, within: Duration) -> Self {
        Self(Some((ack, within)))
    }

    /// Waits (asynchronously, on a tokio runtime with timers) until the broker has the
    /// publish, at most the broker's command timeout.
    ///
    /// # Errors
    /// [`PublishError`]: the broker did not acknowledge the publish.
    pub async fn acknowledged(self) -> Result<(), PublishError> {
        let Some((ack, within)) = self.0 else {
            return Ok(());
        };
        match tokio::time::timeout(within, ack).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(PublishError::EngineUnavailable(EngineDown::Lost)),
            Err(_) => Err(PublishError::EngineUnavailable(EngineDown::NoAnswer(
                within.as_millis() as u64,
            ))),
        }
    }
}

/// What became of one publication from the engine ([`Deliver::deliver_each`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivered {
    /// Shards it was queued to.
    pub nr_shards: u32,
    /// Shards whose inbox was full: they did not get it.
    pub nr_full: u32,
    /// The node refused it whole (draining or failed).
    pub refused: bool,
    /// It names a project the node does not have: not delivered.
    pub unknown_project: bool,
    /// Its payload is no message body this node can deliver: not delivered.
    pub malformed: bool,
}

/// The node's delivery path: sends publications to the shards holding their subscribers.
pub trait Deliver {
    /// Sends `publications`, in order, to every shard that holds a subscriber of one of their
    /// topics: all of them to each such shard, or none to any.
    ///
    /// # Errors
    /// [`PublishError`]; nothing was sent.
    fn deliver(&self, publications: &[Arc<Publication>]) -> Result<(), PublishError>;

    /// Delivers one message that came back from the engine: `body` (the end of the delivery
    /// frame: data, id, time) to `topic` of the project with id `project`. The node encodes
    /// the frame once and, under the publish gate (nothing once the node drains or has
    /// failed), sends it to each shard holding a subscriber of the topic that has room for
    /// it: a shard whose inbox is full does not get it (the caller counts it). Never blocks.
    fn deliver_each(&self, project: &str, topic: &str, body: Bytes) -> Delivered;

    /// [`Deliver::deliver_each`] of a message of a topic with history, numbered by the
    /// engine: `offset` in the stream of `epoch`. The node keeps it in its copy of the stream
    /// ([`crate::history::History::append_at`]) and its frame carries the offset.
    fn deliver_numbered(
        &self,
        project: &str,
        topic: &str,
        at: (u64, &str),
        body: Bytes,
    ) -> Delivered;

    /// The registry index of the project with id `project`.
    fn project_index(&self, project: &str) -> Option<u32>;

    /// Keeps what the engine's stream of `topic` of project `project` (registry index) held
    /// when read for a recovery: its epoch and last offset, and its (offset, body) entries
    /// from some offset on ([`crate::history::History::fill`]).
    fn fill_history(&self, project: u32, topic: &str, at: (&str, u64), entries: Vec<(u64, Bytes)>);

    /// Tells the local subscribers of `topic` of project `project` (registry index) that
    /// messages of it may have been missed (the engine was away): one order to each shard
    /// holding a subscriber. Never blocks; returns the shards whose inbox was full (they
    /// were not told).
    fn resync(&self, project: u32, topic: &str) -> u32;
}

/// What a recovery reads of a stream in the engine ([`Broker::fetch_history`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRead {
    /// The entries after this offset, if any (a client's `since`); else only the position.
    pub after: Option<u64>,
    /// Entries read at most (`server.history_max_replay`).
    pub count: u64,
    /// The topic's TTL, in seconds: a stream's epoch made by the read expires with it.
    pub ttl_secs: u64,
}

/// Where publications go and where interest in topics is declared.
pub trait Broker: Send + Sync + std::fmt::Debug {
    /// Publishes `publications` (already encoded once): those that reach this node come back
    /// through `node`. Never blocks: what the broker has not acknowledged yet is [`Pending`].
    ///
    /// # Errors
    /// [`PublishError`]: the broker refused them and nothing was sent.
    fn publish(
        &self,
        node: &dyn Deliver,
        publications: &[Arc<Publication>],
    ) -> Result<Pending, PublishError>;

    /// Shard `shard` has its first local subscriber of `topic` in `project`. When it returns,
    /// publications of that topic accepted afterwards reach the shard. `true` when the node
    /// does not receive the topic from the other nodes yet: with an engine, its subscription
    /// to the topic is new or still pending (asked for by another shard, not confirmed), and
    /// [`Broker::when_subscribed`] tells when it exists. Without one, always `false`.
    fn subscribe(&self, shard: usize, project: u32, topic: &str) -> bool;

    /// Shard `shard` has lost its last local subscriber of `topic` in `project`. A publication
    /// already on its way to the shard still arrives; the shard finds no subscriber for it.
    fn unsubscribe(&self, shard: usize, project: u32, topic: &str);

    /// Calls `done` once the node receives `topic`'s publications from the other nodes too
    /// (at once with no engine, or when its engine subscription exists): what a `subscribe`
    /// ack waits for in a cluster. Call it after [`Broker::subscribe`]. Never blocks; `done`
    /// may run on the engine's thread and must not block either.
    fn when_subscribed(&self, project: u32, topic: &str, done: Box<dyn FnOnce() + Send>) {
        let _ = (project, topic);
        done();
    }

    /// Reads the stream of `topic` (a topic with history) from the engine into the node's
    /// copy ([`Deliver::fill_history`]) once the node's engine subscription of it exists, then
    /// calls `done` (also when the read failed: the copy answers what it holds). Never
    /// blocks; `done` may run on the engine's thread and must not block either. Without an
    /// engine the node's store is the stream: `done` at once.
    fn fetch_history(
        &self,
        project: u32,
        topic: &str,
        read: HistoryRead,
        done: Box<dyn FnOnce() + Send>,
    ) {
        let _ = (project, topic, read);
        done();
    }

    /// The engine's counters, when there is one.
    fn engine(&self) -> Option<&EngineStats> {
        None
    }

    /// The cluster's control plane, when the node shares an engine.
    fn control(&self) -> Option<&Arc<control::ControlPlane>> {
        None
    }
}

/// The broker of a node on its own: publications go straight to the node's shards, interest
/// is the node's table.
#[derive(Debug)]
pub struct LocalBroker {
    /// The node's table, shared with its delivery path.
    interest: Arc<Interest>,
}

impl LocalBroker {
    /// A broker keeping `interest` up to date.
    pub fn new(interest: Arc<Interest>) -> Self {
        Self { interest }
    }
}

impl Broker for LocalBroker {
    fn publish(
        &self,
        node: &dyn Deliver,
        publications: &[Arc<Publication>],
    ) -> Result<Pending, PublishError> {
        node.deliver(publications).map(|()| Pending::done())
    }

    fn subscribe(&self, shard: usize, project: u32, topic: &str) -> bool {
        self.interest.add(shard, project, topic);
        false
    }

    fn unsubscribe(&self, shard: usize, project: u32, topic: &str) {
        self.interest.remove(shard, project, topic);
    }
}
