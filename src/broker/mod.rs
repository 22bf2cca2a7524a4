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
//! Ordering: a shard calls [`Broker::subscribe`] before it queues the `subscribe` ack (or the
//! welcome, for the implicit topics), and the call returns once the table has the shard's bit;
//! so a publish accepted after the client saw the ack is routed to that shard (see
//! docs/architecture.md, "Fan-out").

mod interest;

pub use interest::{ENTRY_BYTES, Interest, NR_STRIPES};

use std::sync::Arc;

use crate::shard::mailbox::Publication;

/// Why a publish failed. In every case nothing was sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
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
}

/// The node's delivery path: sends publications to the shards holding their subscribers.
pub trait Deliver {
    /// Sends `publications`, in order, to every shard that holds a subscriber of one of their
    /// topics: all of them to each such shard, or none to any.
    ///
    /// # Errors
    /// [`PublishError`]; nothing was sent.
    fn deliver(&self, publications: &[Arc<Publication>]) -> Result<(), PublishError>;
}

/// Where publications go and where interest in topics is declared.
pub trait Broker: Send + Sync + std::fmt::Debug {
    /// Publishes `publications` (already encoded once): those that reach this node come back
    /// through `node`.
    ///
    /// # Errors
    /// [`PublishError`]: the broker refused them and nothing was sent.
    fn publish(
        &self,
        node: &dyn Deliver,
        publications: &[Arc<Publication>],
    ) -> Result<(), PublishError>;

    /// Shard `shard` has its first local subscriber of `topic` in `project`. When it returns,
    /// publications of that topic accepted afterwards reach the shard.
    fn subscribe(&self, shard: usize, project: u32, topic: &str);

    /// Shard `shard` has lost its last local subscriber of `topic` in `project`. A publication
    /// already on its way to the shard still arrives; the shard finds no subscriber for it.
    fn unsubscribe(&self, shard: usize, project: u32, topic: &str);
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
    ) -> Result<(), PublishError> {
        node.deliver(publications)
    }

    fn subscribe(&self, shard: usize, project: u32, topic: &str) {
        self.interest.add(shard, project, topic);
    }

    fn unsubscribe(&self, shard: usize, project: u32, topic: &str) {
        self.interest.remove(shard, project, topic);
    }
}
