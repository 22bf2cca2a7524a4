//! The cluster's control plane: requests from one node to the others over the engine, and
//! the node membership they are addressed by.
//!
//! # Channels and membership
//!
//! Every node subscribes, beside its topics, to its own control channel
//! `<prefix>~ctl:<node>` and to the cluster's `<prefix>~ctl` (`~` is in no project id, so
//! neither is a topic's channel). A request is one JSON message published on a node's channel
//! (or on the cluster's, for every node at once) with an id and the asking node's name; the
//! answering node publishes its reply on the asking node's channel with the same id.
//!
//! Nodes announce themselves: every [`HEARTBEAT`] the bridge sets the node's score in the
//! sorted set `<prefix>~nodes` to the time (milliseconds since the epoch), and removes the
//! members not heard of for [`NODE_TTL`]. The members of the cluster are those heard of
//! within [`NODE_TTL`]: a node that died stays a member, and is reported as not answering,
//! until then.
//!
//! # Bounds
//!
//! A request waits for its answers at most `engine.command_timeout_ms`; the nodes that did
//! not answer in time are named in the result, never waited for longer. Requests from other
//! nodes wait for this node's API runtime in a queue of [`REQUEST_QUEUE`]; past it a request
//! is dropped (its asker reports this node as not answering) and counted. Commands for Redis
//! itself (membership, idempotency keys) go to the bridge through a queue of
//! [`COMMAND_QUEUE`] and are answered within `engine.command_timeout_ms`.
//!
//! This module knows no connection and no shard: the API executes requests
//! (`crate::api::cluster`) and hands back the reply.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// How often a node announces itself.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a node that stopped announcing itself stays a member (reported as not answering).
pub const NODE_TTL: Duration = Duration::from_secs(15);
/// Requests from other nodes waiting for the API at most.
pub const REQUEST_QUEUE: usize = 1024;
/// Redis commands waiting for the bridge at most.
pub const COMMAND_QUEUE: usize = 4096;

/// Milliseconds since the Unix epoch (membership scores).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The channel of node `node`'s control requests and replies.
pub fn node_channel(prefix: &str, node: &str) -> String {
    format!("{prefix}~ctl:{node}")
}

/// The channel every node receives requests on.
pub fn cluster_channel(prefix: &str) -> String {
    format!("{prefix}~ctl")
}

/// The sorted set of the cluster's nodes, scored by when each was last heard of.
pub fn members_key(prefix: &str) -> String {
    format!("{prefix}~nodes")
}

/// One control message on the wire.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Envelope {
    /// A request from `from`, answered on `from`'s channel with the same `id`.
    Request { id: u64, from: String, body: Value },
    /// The reply of node `from` to request `id`.
    Reply { id: u64, from: String, body: Value },
}

/// A request from another node, for the API to execute.
#[derive(Debug)]
pub struct Request {
    /// The asking node's request id.
    pub id: u64,
    /// The asking node.
    pub from: String,
    /// What it asks.
    pub body: Value,
}

/// A Redis command for the bridge to run on its publishing connection.
pub(super) struct Command {
    /// The command (or an atomic group).
    pub pipe: redis::Pipeline,
    /// Where the bridge answers.
    pub ack: oneshot::Sender<Result<redis::Value, String>>,
}

/// What a node answered, or why it did not.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Its reply.
    Reply(Value),
    /// No reply within the timeout (dead, partitioned or overloaded), or the request could
    /// not be sent.
    NoAnswer,
}

/// The node's end of the control plane, held by its broker.
pub struct ControlPlane {
    /// This node's name.
    node: String,
    /// `engine.prefix`.
    prefix: String,
    /// How long a request waits for answers (`engine.command_timeout_ms`).
    timeout: Duration,
    /// To the bridge.
    commands: mpsc::Sender<Command>,
    /// Requests in flight, by id: where their replies go.
    pending: Mutex<HashMap<u64, mpsc::UnboundedSender<(String, Value)>>>,
    /// The next request id.
    next_id: AtomicU64,
    /// Requests from other nodes, for the API.
    requests: mpsc::Sender<Request>,
    /// The API's end of `requests`, taken once ([`ControlPlane::take_requests`]).
    requests_rx: Mutex<Option<mpsc::Receiver<Request>>>,
    /// Requests from other nodes dropped for a full queue.
    pub dropped_requests: AtomicU64,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// The control plane of node `node`, and the bridge's end of its command queue.
    pub(super) fn new(
        node: &str,
        prefix: &str,
        timeout: Duration,
    ) -> (Self, mpsc::Receiver<Command>) {
        let (commands, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let (requests, requests_rx) = mpsc::channel(REQUEST_QUEUE);
        let plane = Self {
            node: node.into(),
            prefix: prefix.into(),
            timeout,
            commands,
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            requests,
            requests_rx: Mutex::new(Some(requests_rx)),
            dropped_requests: AtomicU64::new(0),
        };
        (plane, commands_rx)
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// `engine.prefix`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How long a request waits for answers.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The requests other nodes send this one; `None` after the first call.
    pub fn take_requests(&self) -> Option<mpsc::Receiver<Request>> {
        self.requests_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Runs `pipe` on the engine and returns its answer, within the timeout.
    ///
    /// # Errors
    /// Why there is no answer: not connected, the command failed, no answer in time.
    pub async fn query(&self, pipe: redis::Pipeline) -> Result<redis::Value, String> {
        let (ack, answer) = oneshot::channel();
        self.commands
            .try_send(Command { pipe, ack })
            .map_err(|_| "the queue to the engine is full or closed".to_owned())?;
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the engine connection was lost".into()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// The nodes of the cluster heard of within [`NODE_TTL`], this one included, sorted.
    ///
    /// # Errors
    /// The engine did not answer.
    pub async fn members(&self) -> Result<Vec<String>, String> {
        let since = now_ms().saturating_sub(NODE_TTL.as_millis() as u64);
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE")
            .arg(members_key(&self.prefix))
            .arg(since)
            .arg("+inf")
            .arg("BYSCORE");
        let v = self.query(pipe).await?;
        let mut nodes: Vec<String> = match v {
            redis::Value::Array(mut a) if a.len() == 1 => {
                redis::from_redis_value(a.remove(0)).map_err(|e| format!("membership: {e}"))?
            }
            other => redis::from_redis_value(other).map_err(|e| format!("membership: {e}"))?,
        };
        if !nodes.contains(&self.node) {
            nodes.push(self.node.clone());
        }
        nodes.sort();
        Ok(nodes)
    }

    /// Sends `body` to each node of `nodes` (this one excluded: the caller answers for it
    /// itself), on the cluster's channel when `everyone`, else on each node's own, and waits
    /// for their replies at most the timeout. Every node of `nodes` is in the result.
    pub async fn ask(
        &self,
        nodes: &[String],
        everyone: bool,
        body: Value,
    ) -> Vec<(String, Answer)> {
        let mut answers: Vec<(String, Answer)> = nodes
            .iter()
            .filter(|n| **n != self.node)
            .map(|n| (n.clone(), Answer::NoAnswer))
            .collect();
        if answers.is_empty() {
            return answers;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let message = serde_json::to_string(&Envelope::Request {
            id,
            from: self.node.clone(),
            body,
        })
        .expect("a request always serialises");
        let channels: Vec<String> = if everyone {
            vec![cluster_channel(&self.prefix)]
        } else {
            answers
                .iter()
                .map(|(n, _)| node_channel(&self.prefix, n))
                .collect()
        };
        let mut pipe = redis::pipe();
        for ch in channels {
            pipe.cmd("PUBLISH").arg(ch).arg(&message);
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        if self.query(pipe).await.is_ok() {
            let mut missing = answers.len();
            while missing > 0 {
                let Ok(Some((from, body))) = tokio::time::timeout_at(deadline, rx.recv()).await
                else {
                    break;
                };
                if let Some((_, a)) = answers.iter_mut().find(|(n, _)| *n == from)
                    && *a == Answer::NoAnswer
                {
                    *a = Answer::Reply(body);
                    missing -= 1;
                }
            }
        }
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        answers
    }

    /// Publishes this node's reply to request `id` of node `to`. A reply that cannot be sent
    /// is the asker's timeout.
    pub async fn reply(&self, to: &str, id: u64, body: Value) {
        let reply = Envelope::Reply {
            id,
            from: self.node.clone(),
            body,
        };
        let message = serde_json::to_string(&reply).expect("a reply always serialises");
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH")
            .arg(node_channel(&self.prefix, to))
            .arg(message);
        if let Err(e) = self.query(pipe).await {
            warn!(to, "control reply not sent: {e}");
        }
    }

    /// A message on a control channel (from the bridge's delivery loop): a reply goes to its
    /// request, a request from another node to the API.
    pub(super) fn received(&self, payload: &[u8]) {
        match serde_json::from_slice::<Envelope>(payload) {
            Ok(Envelope::Reply { id, from, body }) => {
                let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(tx) = pending.get(&id) {
                    let _ = tx.send((from, body));
                }
            }
            Ok(Envelope::Request { from, .. }) if from == self.node => {}
            Ok(Envelope::Request { id, from, body }) => {
                if self.requests.try_send(Request { id, from, body }).is_err() {
                    let n = self.dropped_requests.fetch_add(1, Ordering::Relaxed) + 1;
                    // Logged at the 1st, 2nd, 4th, 8th... drop: never a flood.
                    if n.is_power_of_two() {
                        warn!(
                            dropped = n,
                            "control requests from other nodes dropped: {REQUEST_QUEUE} wait \
                             for this node's API already (the askers report this node as not \
                             answering)"
                        );
                    }
                }
            }
            Err(_) => {}
        }
    }

    /// The heartbeat: this node's score now, and the members not heard of for [`NODE_TTL`]
    /// removed.
    pub(super) fn heartbeat(&self) -> redis::Pipeline {
        let now = now_ms();
        let key = members_key(&self.prefix);
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD").arg(&key).arg(now).arg(&self.node).ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(format!(
                "({}",
                now.saturating_sub(NODE_TTL.as_millis() as u64)
            ))
            .ignore();
        pipe
    }

    /// The control channels this node subscribes to.
    pub(super) fn channels(&self) -> [String; 2] {
        [
            node_channel(&self.prefix, &self.node),
            cluster_channel(&self.prefix),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_channels_are_no_topics_channels() {
        assert_eq!(node_channel("h:", "a:1"), "h:~ctl:a:1");
        assert_eq!(cluster_channel("h:"), "h:~ctl");
        assert_eq!(
            super::super::redis::parse_channel("h:", "h:~ctl:a"),
            Some(("~ctl", "a"))
        );
        assert!(crate::pubsub::ProjectId::parse("~ctl").is_err());
    }
}
