//! The one way off-shard code talks to shards: orders (`send_*`) and questions (`ask_*`) to
//! one shard, some or all, through their [`Mailbox`]es.
//!
//! # Policy
//!
//! Nothing here blocks the caller's thread (the API's current-thread runtime):
//!
//! - A message goes in with a non-blocking send. While a shard's inbox is full the send is
//!   retried asynchronously every [`RETRY_EVERY`], all shards of the call together, until one
//!   overall deadline ([`Shards::order_within`]); then the call reports every shard that did
//!   not take it ([`FanoutError::NotTaken`], which the API answers 503 `busy`). Shards that took
//!   it keep it: the order is not taken back.
//! - A question carries a tokio oneshot for the answer. It is sent to every shard first (as
//!   above), then the answers are awaited under one overall deadline for the whole call
//!   ([`Shards::ask_within`], counted from the call); the shards that did not answer by then are
//!   reported ([`FanoutError::NoAnswer`], 503 `busy`).
//! - A shard that has stopped (its drain ended, its inbox dropped) holds no connection: an
//!   order to it is moot and counts as taken, and its answer to a question is `None`; it is
//!   neither waited for nor reported.
//!
//! Two sends keep their own rule, outside this module's calls: a publish reserves room on all
//! its target shards before it sends to any (all or none, `Hub::deliver`), and the drain order
//! goes past the bound ([`Shards::order_all_over_bound`]) so that a full inbox still drains.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::mailbox::{Mailbox, ShardMsg};

/// How long a full inbox is left before a send is tried again.
pub const RETRY_EVERY: Duration = Duration::from_millis(10);
/// Default overall deadline for an order to be taken by every shard it goes to.
pub const ORDER_WITHIN: Duration = Duration::from_secs(2);
/// Default overall deadline for a question to be taken and answered by every shard.
pub const ASK_WITHIN: Duration = Duration::from_secs(5);

/// Why a call to shards failed; each names the shards concerned, in ascending order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FanoutError {
    /// These shards' inboxes stayed full until the deadline.
    #[error("shard {shards:?} inbox stayed full for {within:?}")]
    NotTaken {
        /// The shards that did not take the message.
        shards: Vec<usize>,
        /// The deadline that passed.
        within: Duration,
    },
    /// These shards took the question but did not answer by the deadline.
    #[error("shard {shards:?} did not answer within {within:?}")]
    NoAnswer {
        /// The shards that did not answer.
        shards: Vec<usize>,
        /// The deadline that passed.
        within: Duration,
    },
}

/// The node's shards as a caller off the shards sees them.
#[derive(Debug, Clone, Copy)]
pub struct Shards<'a> {
    /// One per shard, by shard id.
    mailboxes: &'a [Mailbox],
    /// Overall deadline of a `send_*` call.
    pub order_within: Duration,
    /// Overall deadline of an `ask_*` call (sending and answers together).
    pub ask_within: Duration,
}

impl<'a> Shards<'a> {
    /// The shards behind these mailboxes, with the default deadlines.
    pub fn new(mailboxes: &'a [Mailbox]) -> Self {
        Self {
            mailboxes,
            order_within: ORDER_WITHIN,
            ask_within: ASK_WITHIN,
        }
    }

    /// How many shards.
    pub fn nr_shards(&self) -> usize {
        self.mailboxes.len()
    }

    /// Sends `msg` to `shard` under the policy.
    ///
    /// # Errors
    /// [`FanoutError::NotTaken`].
    pub async fn send_one(&self, shard: usize, msg: ShardMsg) -> Result<(), FanoutError> {
        let mut msg = Some(msg);
        self.send_some([shard], |_| msg.take().expect("one shard, one message"))
            .await
    }

    /// Sends `make(shard)` to every shard under the policy.
    ///
    /// # Errors
    /// [`FanoutError::NotTaken`].
    pub async fn send_all(&self, make: impl FnMut(usize) -> ShardMsg) -> Result<(), FanoutError> {
        self.send_some(0..self.nr_shards(), make).await
    }

    /// Sends `make(shard)` to each of `shards` under the policy.
    ///
    /// # Errors
    /// [`FanoutError::NotTaken`].
    pub async fn send_some(
        &self,
        shards: impl IntoIterator<Item = usize>,
        make: impl FnMut(usize) -> ShardMsg,
    ) -> Result<(), FanoutError> {
        let deadline = Instant::now() + self.order_within;
        self.deliver(shards, make, deadline, self.order_within)
            .await
    }

    /// Asks `shard` the question `make(reply)` under the policy; `None` if the shard has
    /// stopped.
    ///
    /// # Errors
    /// [`FanoutError::NotTaken`] or [`FanoutError::NoAnswer`].
    pub async fn ask_one<T>(
        &self,
        shard: usize,
        make: impl FnOnce(oneshot::Sender<T>) -> ShardMsg,
    ) -> Result<Option<T>, FanoutError> {
        let mut make = Some(make);
        let mut answers = self
            .ask_some([shard], |_, reply| {
                make.take().expect("one shard, one question")(reply)
            })
            .await?;
        Ok(answers.pop().and_then(|(_, a)| a))
    }

    /// Asks every shard `make(shard, reply)` under the policy; answers by shard id.
    ///
    /// # Errors
    /// [`FanoutError::NotTaken`] or [`FanoutError::NoAnswer`].
    pub async fn ask_all<T>(
        &self,
        make: impl FnMut(usize, oneshot::Sender<T>) -> ShardMsg,
    ) -> Result<Vec<(usize, Option<T>)>, FanoutError> {
        self.ask_some(0..self.nr_shards(), make).await
    }

    /// Asks each of `shards` `make(shard, reply)` under the policy: every question is sent
    /// before any answer is awaited, so the shards work concurrently. Answers in the order of
    /// `shards`, `None` for a shard that has stopped.
    ///
    /// # Errors
    /// [`FanoutError::NotTaken`] or [`FanoutError::NoAnswer`].
    pub async fn ask_some<T>(
        &self,
        shards: impl IntoIterator<Item = usize>,
        mut make: impl FnMut(usize, oneshot::Sender<T>) -> ShardMsg,
    ) -> Result<Vec<(usize, Option<T>)>, FanoutError> {
        let deadline = Instant::now() + self.ask_within;
        let mut replies = Vec::new();
        self.deliver(
            shards,
            |shard| {
                let (tx, rx) = oneshot::channel();
                replies.push((shard, rx));
                make(shard, tx)
            },
            deadline,
            self.ask_within,
        )
        .await?;
        let mut answers = Vec::with_capacity(replies.len());
        let mut silent = Vec::new();
        for (shard, rx) in replies {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(answer) => answers.push((shard, answer.ok())),
                Err(_) => silent.push(shard),
            }
        }
        if silent.is_empty() {
            Ok(answers)
        } else {
            silent.sort_unstable();
            Err(FanoutError::NoAnswer {
                shards: silent,
                within: self.ask_within,
            })
        }
    }

    /// Queues `make(shard)` on every shard even over the inbox bound, without waiting: for
    /// the drain order, which must not be lost to a full inbox. A shard that is gone has
    /// nothing to drain.
    pub fn order_all_over_bound(&self, mut make: impl FnMut(usize) -> ShardMsg) {
        for (shard, m) in self.mailboxes.iter().enumerate() {
            let _ = m.send_over_bound(make(shard));
        }
    }

    /// Sends `make(shard)` to each shard, retrying the refused ones every [`RETRY_EVERY`]
    /// until `deadline`.
    async fn deliver(
        &self,
        shards: impl IntoIterator<Item = usize>,
        mut make: impl FnMut(usize) -> ShardMsg,
        deadline: Instant,
        within: Duration,
    ) -> Result<(), FanoutError> {
        let mut pending: Vec<(usize, ShardMsg)> =
            shards.into_iter().map(|s| (s, make(s))).collect();
        loop {
            pending = pending
                .into_iter()
                .filter_map(|(s, msg)| match self.mailboxes[s].send(msg) {
                    // A stopped shard: the message (and any reply sender in it) is dropped.
                    Err(_) if self.mailboxes[s].is_gone() => None,
                    Err(msg) => Some((s, msg)),
                    Ok(()) => None,
                })
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let mut shards: Vec<usize> = pending.iter().map(|(s, _)| *s).collect();
                shards.sort_unstable();
                return Err(FanoutError::NotTaken { shards, within });
            }
            tokio::time::sleep(RETRY_EVERY.min(deadline - now)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::mailbox::{Inbox, channel};

    /// Three shards whose inboxes hold two messages each.
    fn shards() -> (Vec<Mailbox>, Vec<Inbox>) {
        (0..3).map(|_| channel(2, 1 << 20).unwrap()).unzip()
    }

    fn quick(mailboxes: &[Mailbox]) -> Shards<'_> {
        Shards {
            order_within: Duration::from_millis(100),
            ask_within: Duration::from_millis(100),
            ..Shards::new(mailboxes)
        }
    }

    #[test]
    fn a_full_inbox_is_retried_until_the_deadline_then_reported() {
        let (mailboxes, inboxes) = shards();
        for m in [&mailboxes[1], &mailboxes[2]] {
            m.send(ShardMsg::Drain).unwrap();
            m.send(ShardMsg::Drain).unwrap();
        }
        let s = quick(&mailboxes);
        let started = Instant::now();
        let err = runtime()
            .block_on(s.send_all(|_| ShardMsg::Drain))
            .unwrap_err();
        assert!(
            started.elapsed() >= s.order_within,
            "retried until the deadline"
        );
        assert_eq!(
            err,
            FanoutError::NotTaken {
                shards: vec![1, 2],
                within: s.order_within
            }
        );
        assert_eq!(mailboxes[0].depth(), 1, "the shard with room took it");
        // Room made while the sender retries: the order goes in.
        let s = Shards {
            order_within: Duration::from_secs(30),
            ..s
        };
        let shard2 = &inboxes[2];
        std::thread::scope(|t| {
            t.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                assert!(shard2.try_recv().is_some());
            });
            let sent = runtime().block_on(s.send_one(2, ShardMsg::Drain));
            assert_eq!(sent, Ok(()));
        });
        assert_eq!(mailboxes[2].depth(), 2);
    }

    /// Takes one question from `inbox` (waiting for it) and hands its reply sender to `f`.
    fn serve<R>(inbox: &Inbox, f: impl FnOnce(oneshot::Sender<usize>) -> R) -> R {
        loop {
            match inbox.try_recv() {
                Some(ShardMsg::DisconnectUser { reply, .. }) => return f(reply),
                Some(other) => panic!("unexpected {other:?}"),
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    fn question(reply: oneshot::Sender<usize>) -> ShardMsg {
        ShardMsg::DisconnectUser {
            project: 0,
            user: "u".into(),
            reply,
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn every_shard_answers_and_a_stopped_one_answers_none() {
        let (mailboxes, inboxes) = shards();
        let s = Shards {
            ask_within: Duration::from_secs(30),
            ..quick(&mailboxes)
        };
        let answers = std::thread::scope(|t| {
            t.spawn(|| serve(&inboxes[0], |r| r.send(10)));
            t.spawn(|| serve(&inboxes[1], drop));
            t.spawn(|| serve(&inboxes[2], |r| r.send(12)));
            runtime().block_on(s.ask_all(|_, reply| question(reply)))
        });
        assert_eq!(answers, Ok(vec![(0, Some(10)), (1, None), (2, Some(12))]));
        let one = std::thread::scope(|t| {
            t.spawn(|| serve(&inboxes[1], |r| r.send(7)));
            runtime().block_on(s.ask_one(1, question))
        });
        assert_eq!(one, Ok(Some(7)));
        // A shard whose inbox is gone: an order counts as taken, a question answers `None`,
        // neither waits for the deadline.
        let s = Shards {
            order_within: Duration::from_secs(30),
            ..s
        };
        let mut inboxes = inboxes;
        drop(inboxes.remove(2));
        let started = Instant::now();
        let rt = runtime();
        let answers = std::thread::scope(|t| {
            t.spawn(|| serve(&inboxes[0], |r| r.send(1)));
            t.spawn(|| serve(&inboxes[1], |r| r.send(2)));
            rt.block_on(s.ask_all(|_, reply| question(reply)))
        });
        assert_eq!(answers, Ok(vec![(0, Some(1)), (1, Some(2)), (2, None)]));
        assert_eq!(rt.block_on(s.send_one(2, ShardMsg::Drain)), Ok(()));
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn a_missing_answer_is_reported_at_the_deadline() {
        let (mailboxes, inboxes) = shards();
        let s = quick(&mailboxes);
        let started = Instant::now();
        let answers = std::thread::scope(|t| {
            t.spawn(|| serve(&inboxes[0], |r| r.send(1)));
            // Shard 1 takes the question and sits on it; shard 2 never reads its inbox.
            let held = t.spawn(|| serve(&inboxes[1], |r| r));
            let answers = runtime().block_on(s.ask_all(|_, reply| question(reply)));
            drop(held.join());
            answers
        });
        assert!(started.elapsed() >= s.ask_within);
        assert_eq!(
            answers,
            Err(FanoutError::NoAnswer {
                shards: vec![1, 2],
                within: s.ask_within
            })
        );
    }
}
