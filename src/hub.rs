//! The node-wide handle shared by every thread: the shards' mailboxes, the registry, the
//! counters, the lifecycle phase, the broker and the interest table, and publishing (encode
//! once, one message per interested shard).
//!
//! A publish goes through the [`Broker`]; what reaches this node comes back through
//! [`Deliver::deliver`], which sends it only to the shards the [`Interest`] table names for its
//! topics. Delivery is all or nothing: room is reserved in every target shard's inbox before
//! any is sent the message, so a full inbox refuses the whole publish (or batch) and nothing
//! goes out. The phase check and the sends happen under a shared gate that the drain takes
//! exclusively to flip the phase and queue its own order: every accepted publish is ahead of
//! the drain in every inbox it was sent to, so it reaches the connections subscribed when it
//! was accepted.

use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::auth::SharedRegistry;
pub use crate::broker::PublishError;
use crate::broker::{Broker, Deliver, Delivered, Interest, LocalBroker, Pending};
use crate::metrics::ShardStats;
use crate::pubsub::Topic;
use crate::route;
use crate::shard::fanout::Shards;
use crate::shard::mailbox::{Mailbox, Publication, Reservation, ShardMsg};
use crate::ws::codec::Codec;
use crate::ws::codec::herald_v1;
pub use crate::ws::frame::MESSAGE_FRAME_OVERHEAD;

/// Lifecycle of the node, observable by `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Shards starting.
    Starting = 0,
    /// Every shard listens.
    Running = 1,
    /// Closing connections; not accepting.
    Draining = 2,
    /// Done.
    Stopped = 3,
}

/// Shared by the shards, the API and the signal handler.
pub struct Hub {
    /// One mailbox per shard, by shard id.
    pub mailboxes: Vec<Mailbox>,
    /// Counters per shard.
    pub stats: Vec<Arc<ShardStats>>,
    /// Which shards hold subscribers of which topics; routes deliveries.
    pub interest: Arc<Interest>,
    /// Where publications go and where shards declare their interest.
    pub broker: Box<dyn Broker>,
    /// Projects and keys.
    pub registry: SharedRegistry,
    /// Authenticated connections on the node (checked against `server.max_connections`).
    pub nr_connections: AtomicUsize,
    /// Cap from the config; 0 = none.
    pub max_connections: usize,
    /// The 90%-of-cap warning was logged (re-armed below 80%).
    pub near_cap_warned: std::sync::atomic::AtomicBool,
    /// Concurrent connections per client address (`limits.connections_per_ip`).
    pub ip_conns: crate::protection::limiter::ConnCounter,
    /// Publishes accepted through the API (written by the API thread only).
    pub api_published: AtomicU64,
    /// API requests refused 429 for their key's rate (`limits.api_requests_per_key_per_sec`).
    pub api_rate_limited: AtomicU64,
    /// Largest delivery frame (`ws.max_outbound_queue_bytes`): what an empty connection
    /// queue holds. A larger publish is refused, as no connection could take it.
    pub max_frame_bytes: usize,
    /// Open API connections (bounded by `api.max_connections`; written by the API thread).
    pub api_connections: AtomicU64,
    /// Node-wide flow control: publishes are admitted against it ([`Hub::send`]).
    pub flow: crate::flow::Flow,
    phase: AtomicU8,
    /// Held shared by publishers across their phase check and sends, and exclusively by the
    /// drain while it flips the phase and queues its order behind them.
    gate: RwLock<()>,
    /// The shard thread that died first, plus one (0 = none).
    failed: AtomicUsize,
    /// Set once the failure has been handled (readiness off, drain started).
    failure_handled: AtomicBool,
    /// When a publish refused for a full inbox was last logged, and how many were refused
    /// since without a log line.
    busy_log: crate::flow::LogThrottle,
    /// Publish sequence, for message ids.
    seq: AtomicU64,
    /// The recent messages of topics with history, numbered and stored as they are sent.
    pub history: crate::history::History,
    /// Start of every message id: the start time in ms (hex), so ids stay unique across
    /// restarts, after the node's name in a cluster ([`Hub::set_node`]), so they stay unique
    /// across nodes.
    id_prefix: String,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Hub {
    /// A hub over the given mailboxes, with the local broker.
    ///
    /// # Panics
    /// With more than [`route::MAX_SHARDS`] mailboxes (the config refuses more shards).
    pub fn new(
        mailboxes: Vec<Mailbox>,
        stats: Vec<Arc<ShardStats>>,
        registry: SharedRegistry,
        max_connections: usize,
    ) -> Self {
        assert!(
            mailboxes.len() <= route::MAX_SHARDS,
            "at most {} shards",
            route::MAX_SHARDS
        );
        let interest = Arc::new(Interest::default());
        Self {
            mailboxes,
            stats,
            broker: Box::new(LocalBroker::new(interest.clone())),
            interest,
            registry,
            nr_connections: AtomicUsize::new(0),
            max_connections,
            near_cap_warned: std::sync::atomic::AtomicBool::new(false),
            ip_conns: crate::protection::limiter::ConnCounter::new(0, 0, 0),
            api_published: AtomicU64::new(0),
            api_rate_limited: AtomicU64::new(0),
            max_frame_bytes: usize::MAX,
            api_connections: AtomicU64::new(0),
            flow: crate::flow::Flow::default(),
            phase: AtomicU8::new(Phase::Starting as u8),
            gate: RwLock::new(()),
            failed: AtomicUsize::new(0),
            failure_handled: AtomicBool::new(false),
            busy_log: crate::flow::LogThrottle::default(),
            seq: AtomicU64::new(0),
            history: crate::history::History::new(64 << 20, 1000),
            id_prefix: format!("{:x}", now_ms()),
        }
    }

    /// Number of shards.
    pub fn nr_shards(&self) -> usize {
        self.mailboxes.len()
    }

    /// The shards, to send orders and questions to ([`Shards`]: the one way off-shard code
    /// talks to them).
    pub fn shards(&self) -> Shards<'_> {
        Shards::new(&self.mailboxes)
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Running,
            2 => Phase::Draining,
            _ => Phase::Stopped,
        }
    }

    /// Moves to `p`.
    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    /// Names the node in its cluster: message ids become `<node>-<start>-<seq>`.
    pub fn set_node(&mut self, node: &str) {
        self.id_prefix = format!("{node}-{}", self.id_prefix);
    }

    /// A fresh message id.
    pub fn next_message_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.id_prefix)
    }

    /// The shard whose thread died, if one did.
    pub fn failed_shard(&self) -> Option<usize> {
        self.failed.load(Ordering::Acquire).checked_sub(1)
    }

    /// Records that shard `id`'s thread died (a panic): readiness goes off, publishes are
    /// refused, and the other shards drain, so the process ends and exits non-zero
    /// (see `main.rs`). Only the first failure drains.
    ///
    /// The dying shard calls this before its inbox is dropped, and it returns only once no
    /// publish is between its checks and its sends (it takes the gate): every publish then
    /// either reached every inbox it targets before, or sees the failure and sends nothing.
    pub fn shard_failed(&self, id: usize) {
        let _ = self
            .failed
            .compare_exchange(0, id + 1, Ordering::AcqRel, Ordering::Acquire);
        if !self.failure_handled.swap(true, Ordering::AcqRel) {
            self.drain();
        } else {
            drop(self.gate.write().unwrap_or_else(|e| e.into_inner()));
        }
    }

    /// Encodes a publication once (a head per topic, one shared body) and checks that its
    /// largest frame fits an empty connection queue.
    ///
    /// # Errors
    /// [`PublishError::TooLarge`].
    pub fn prepare(
        &self,
        project: u32,
        topics: &[Topic],
        data: &RawValue,
    ) -> Result<(String, Arc<Publication>), PublishError> {
        let data = data.get();
        // A topic's length in the frame: `"` and `\\` (allowed in `user.<sub>`) are escaped.
        let escaped = |t: &Topic| {
            t.as_str().len()
                + t.as_str()
                    .bytes()
                    .filter(|b| matches!(b, b'"' | b'\\'))
                    .count()
        };
        let longest = topics.iter().map(escaped).max().unwrap_or(0);
        // A topic with history has `,"offset":N` in its frame too.
        let with_offset = self.registry.load().project_at(project).is_some_and(|p| {
            topics
                .iter()
                .any(|t| crate::history::rule_for(&p.history, t.as_str()).is_some())
        });
        let offset = if with_offset { OFFSET_FIELD_BYTES } else { 0 };
        let size = longest + data.len() + MESSAGE_FRAME_OVERHEAD + offset;
        if size > self.max_frame_bytes {
            return Err(PublishError::TooLarge {
                size,
                max: self.max_frame_bytes,
            });
        }
        let accepted_at = std::time::Instant::now();
        let id = self.next_message_id();
        let body = Codec::HeraldV1.message_body(data, &id, now_ms());
        let heads = topics
            .iter()
            .map(|t| {
                (
                    t.as_str().into(),
                    Codec::HeraldV1.message_head(t.as_str(), body.len()),
                )
            })
            .collect();
        Ok((
            id.clone(),
            Arc::new(Publication {
                project,
                heads,
                body,
                id: id.into(),
                data_len: data.len(),
                accepted_at,
                offsets: Box::default(),
            }),
        ))
    }

    /// Encodes a publication once and hands it to the broker without waiting for an engine's
    /// acknowledgement (for a client's `publish` on a shard, which never blocks): with no
    /// engine it is in every interested shard's inbox when this returns; with one it is queued
    /// for it.
    ///
    /// # Errors
    /// [`PublishError`]; nothing was sent.
    pub fn publish(
        &self,
        project: u32,
        topics: &[Topic],
        data: &RawValue,
    ) -> Result<String, PublishError> {
        let (id, publication) = self.prepare(project, topics, data)?;
        // Not awaited: see above.
        drop(self.submit(std::slice::from_ref(&publication))?);
        Ok(id)
    }

    /// Publishes prepared publications, in order, through the broker: all of them to every
    /// shard holding subscribers of their topics, or, when the node is draining, has failed or
    /// such a shard lacks room for all of them, none. With an engine, completes once the
    /// engine has them (at most `engine.command_timeout_ms`; it awaits on the caller's tokio
    /// runtime and blocks no thread).
    ///
    /// # Errors
    /// [`PublishError::Draining`], [`PublishError::Failed`], [`PublishError::Busy`],
    /// [`PublishError::Overloaded`] (the node is over its flow budget or behind), and with
    /// an engine [`PublishError::EngineUnavailable`] or [`PublishError::EngineBusy`].
    pub async fn send(&self, publications: &[Arc<Publication>]) -> Result<(), PublishError> {
        self.submit(publications)?.acknowledged().await
    }

    /// [`Hub::send`] up to the broker's acknowledgement, which the caller awaits or not. The
    /// gate is released before anyone waits on the acknowledgement.
    fn submit(&self, publications: &[Arc<Publication>]) -> Result<Pending, PublishError> {
        let _gate = self.open_gate()?;
        self.flow
            .admit(&self.stats, &self.mailboxes, publications.len())
            .map_err(PublishError::Overloaded)?;
        self.broker.publish(self, publications)
    }

    /// The publish gate, held shared, once the node is neither draining nor failed.
    fn open_gate(&self) -> Result<std::sync::RwLockReadGuard<'_, ()>, PublishError> {
        // A poisoned gate only means a publisher panicked between check and send; the phase
        // it guards is an atomic and stays consistent.
        let gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        if let Some(shard) = self.failed_shard() {
            return Err(PublishError::Failed(shard));
        }
        if matches!(self.phase(), Phase::Draining | Phase::Stopped) {
            return Err(PublishError::Draining);
        }
        Ok(gate)
    }

    /// Counts and logs (at most once a second) a publish refused for shard `shard`'s full
    /// inbox.
    fn refused_busy(&self, shard: usize) -> PublishError {
        if let Some(suppressed) = self.busy_log.note(now_ms()) {
            tracing::warn!(
                shard,
                depth = self.mailboxes[shard].depth(),
                depth_bytes = self.mailboxes[shard].depth_bytes(),
                suppressed,
                "shard inbox full: publish refused with 503 busy, nothing sent (logged at most \
                 once a second; `suppressed` refusals since the previous line)"
            );
        }
        PublishError::Busy(shard)
    }

    /// Asks every shard to drain. Publishes accepted before are ahead of the drain order in
    /// every inbox; later ones are refused [`PublishError::Draining`].
    pub fn drain(&self) {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        if self.phase() != Phase::Stopped {
            self.set_phase(Phase::Draining);
        }
        // Past the bound: a full inbox still drains.
        self.shards().order_all_over_bound(|_| ShardMsg::Drain);
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("nr_shards", &self.nr_shards())
            .finish_non_exhaustive()
    }
}

/// Most bytes the `"offset"` field adds to a frame's JSON (`,"offset":` and 20 digits).
const OFFSET_FIELD_BYTES: usize = 30;

/// Most bytes the `"offset"` field adds to a topic's frame head (`,"offset":` and 20 digits),
/// with the WebSocket header growing to its longest.
const OFFSET_FIELD_MAX_BYTES: usize = 40;

impl Hub {
    /// Reserves room for `publications` (and `extra` bytes) in the inbox of every shard holding
    /// subscribers of their topics.
    fn reserve(
        &self,
        publications: &[Arc<Publication>],
        extra: usize,
    ) -> Result<Vec<(usize, Reservation<'_>)>, PublishError> {
        let targets = route::shards_for_publication(publications.iter().map(|p| {
            self.interest
                .route(p.project, p.heads.iter().map(|(topic, _)| &**topic))
        }));
        let nr_bytes = publications.iter().map(|p| p.nr_bytes()).sum::<usize>() + extra;
        let mut reservations = Vec::with_capacity(targets.count_ones() as usize);
        for shard in route::shards(targets) {
            let r = self.mailboxes[shard]
                .try_reserve(publications.len(), nr_bytes)
                .map_err(|_| self.refused_busy(shard))?;
            reservations.push((shard, r));
        }
        Ok(reservations)
    }

    /// Sends `publications` on the room reserved for them.
    fn send_reserved(
        reservations: &mut [(usize, Reservation<'_>)],
        publications: &[Arc<Publication>],
    ) -> Result<(), PublishError> {
        for (shard, r) in reservations {
            for p in publications {
                // Only a dead shard refuses reserved room, and none dies between the checks
                // in `send` and here: a panicking shard fails the node under the gate before
                // its inbox goes (`shard_failed`), and a drained one ends after the phase
                // turned. So this is not reached after an earlier shard took the publish.
                r.send(ShardMsg::Publish(p.clone()))
                    .map_err(|_| PublishError::Failed(*shard))?;
            }
        }
        Ok(())
    }

    /// `p` numbered in the streams of its topics with history (as `rules` say), and stored
    /// there: the heads of those topics carry their offset, the body stays shared.
    fn number(
        &self,
        inner: &mut crate::history::Inner,
        p: &Publication,
        rules: &[crate::history::Rule],
        now: u64,
    ) -> Publication {
        let mut offsets = vec![0; p.heads.len()];
        let mut heads = Vec::with_capacity(p.heads.len());
        for ((topic, head), offset) in p.heads.iter().zip(&mut offsets) {
            let Some(rule) = crate::history::rule_for(rules, topic) else {
                heads.push((topic.clone(), head.clone()));
                continue;
            };
            let mut numbered = Bytes::new();
            *offset = self.history.append(
                inner,
                (p.project, topic),
                rule,
                now,
                |o| {
                    numbered = herald_v1::message_head_at(topic, o, p.body.len());
                    numbered.clone()
                },
                &p.body,
            );
            heads.push((topic.clone(), numbered));
        }
        Publication {
            project: p.project,
            heads,
            body: p.body.clone(),
            id: p.id.clone(),
            data_len: p.data_len,
            accepted_at: p.accepted_at,
            offsets: offsets.into(),
        }
    }
}

impl Deliver for Hub {
    /// Routes by the interest table, reserves room in every target inbox, then sends. Called
    /// by the broker under the publish gate ([`Hub::send`]).
    fn deliver(&self, publications: &[Arc<Publication>]) -> Result<(), PublishError> {
        let registry = self.registry.load();
        let rules = |p: &Publication| {
            registry
                .project_at(p.project)
                .map(|pr| &pr.history[..])
                .filter(|r| {
                    p.heads
                        .iter()
                        .any(|(t, _)| crate::history::rule_for(r, t).is_some())
                })
        };
        if !publications.iter().any(|p| rules(p).is_some()) {
            let mut reservations = self.reserve(publications, 0)?;
            return Self::send_reserved(&mut reservations, publications);
        }
        // Numbered, stored and sent under the history lock, so each stream's offsets reach
        // every inbox in order, and a shard reading the stream under the same lock sees every
        // offset up to its read in the store or already in its inbox, and every later one
        // routed to it (see `crate::history`).
        let mut inner = self.history.lock();
        let extra = publications
            .iter()
            .map(|p| p.heads.len() * OFFSET_FIELD_MAX_BYTES)
            .sum();
        let mut reservations = self.reserve(publications, extra)?;
        let now = now_ms();
        let numbered: Vec<Arc<Publication>> = publications
            .iter()
            .map(|p| match rules(p) {
                None => p.clone(),
                Some(r) => Arc::new(self.number(&mut inner, p, r, now)),
            })
            .collect();
        drop(registry);
        Self::send_reserved(&mut reservations, &numbered)
    }

    fn resync(&self, project: u32, topic: &str) -> u32 {
        let mut nr_full = 0;
        for shard in route::shards(self.interest.mask(project, topic)) {
            let sent = self.mailboxes[shard]
                .try_reserve(1, 0)
                .ok()
                .is_some_and(|mut r| {
                    r.send(ShardMsg::Resync {
                        project,
                        topic: topic.into(),
                    })
                    .is_ok()
                });
            nr_full += u32::from(!sent);
        }
        nr_full
    }

    fn deliver_each(&self, project: &str, topic: &str, body: Bytes) -> Delivered {
        let mut out = Delivered::default();
        let Ok(_gate) = self.open_gate() else {
            out.refused = true;
            return out;
        };
        let Some(project) = self.registry.load().project(project).map(|p| p.idx) else {
            out.unknown_project = true;
            return out;
        };
        let targets = self.interest.mask(project, topic);
        if targets == 0 {
            return out;
        }
        let Some((data_len, id)) = crate::ws::codec::herald_v1::split_body(&body) else {
            out.malformed = true;
            return out;
        };
        let id = id.into();
        let p = Arc::new(Publication {
            project,
            heads: vec![(
                topic.into(),
                Codec::HeraldV1.message_head(topic, body.len()),
            )],
            body,
            id,
            data_len,
            accepted_at: std::time::Instant::now(),
            offsets: Box::default(),
        });
        self.send_each(targets, &p)
    }

    fn deliver_numbered(
        &self,
        project: &str,
        topic: &str,
        (offset, epoch): (u64, &str),
        body: Bytes,
    ) -> Delivered {
        let mut out = Delivered::default();
        let Ok(_gate) = self.open_gate() else {
            out.refused = true;
            return out;
        };
        let registry = self.registry.load();
        let Some(pr) = registry.project(project) else {
            out.unknown_project = true;
            return out;
        };
        let Some((data_len, id)) = crate::ws::codec::herald_v1::split_body(&body) else {
            out.malformed = true;
            return out;
        };
        let head = herald_v1::message_head_at(topic, offset, body.len());
        let p = Arc::new(Publication {
            project: pr.idx,
            heads: vec![(topic.into(), head.clone())],
            body: body.clone(),
            id: id.into(),
            data_len,
            accepted_at: std::time::Instant::now(),
            offsets: Box::new([offset]),
        });
        // Kept and sent under the history lock, as a local publish is (`deliver`).
        let mut inner = self.history.lock();
        // A stream started again in the engine (lost there): its subscribers are told, and
        // take its offsets from 1, before its first message.
        let restarted = self
            .history
            .epoch_held(&inner, (pr.idx, topic))
            .is_some_and(|e| *e != *epoch);
        if let Some(rule) = crate::history::rule_for(&pr.history, topic) {
            let entry = crate::history::Entry { offset, head, body };
            let at = (pr.idx, topic);
            self.history
                .append_at(&mut inner, at, rule, now_ms(), epoch, entry);
        }
        if restarted {
            self.resync(pr.idx, topic);
        }
        let targets = self.interest.mask(pr.idx, topic);
        self.send_each(targets, &p)
    }

    fn project_index(&self, project: &str) -> Option<u32> {
        self.registry.load().project(project).map(|p| p.idx)
    }

    fn fill_history(&self, project: u32, topic: &str, at: (&str, u64), entries: Vec<(u64, Bytes)>) {
        let registry = self.registry.load();
        let Some(rule) = registry
            .project_at(project)
            .and_then(|p| crate::history::rule_for(&p.history, topic))
        else {
            return;
        };
        let entries = entries
            .into_iter()
            .map(|(offset, body)| crate::history::Entry {
                offset,
                head: herald_v1::message_head_at(topic, offset, body.len()),
                body,
            })
            .collect();
        self.history
            .fill((project, topic), rule, now_ms(), at, entries);
    }
}

impl Hub {
    /// Sends `p`, from the engine, to each of the shards `targets` that has room for it.
    fn send_each(&self, targets: route::ShardMask, p: &Arc<Publication>) -> Delivered {
        let mut out = Delivered::default();
        // Accepted by another node: delivered whatever this node's state, and counted.
        self.flow.note_engine(&self.stats, &self.mailboxes);
        for shard in route::shards(targets) {
            let sent = self.mailboxes[shard]
                .try_reserve(1, p.nr_bytes())
                .ok()
                .is_some_and(|mut r| r.send(ShardMsg::Publish(p.clone())).is_ok());
            if sent {
                out.nr_shards += 1;
            } else {
                out.nr_full += 1;
            }
        }
        out
    }
}

/// The delivery frame of protocol.md, in one piece; `data` is copied byte for byte.
pub fn message_frame(topic: &str, data: &str, id: &str, ts: u64) -> Bytes {
    let body = Codec::HeraldV1.message_body(data, id, ts);
    let mut f = Codec::HeraldV1.message_head(topic, body.len()).to_vec();
    f.extend_from_slice(&body);
    f.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::mailbox::{self, Inbox};

    fn hub(nr_shards: usize, inbox_capacity: usize) -> (Hub, Vec<Inbox>) {
        hub_with_bytes(nr_shards, inbox_capacity, 1 << 30)
    }

    fn hub_with_bytes(
        nr_shards: usize,
        inbox_capacity: usize,
        inbox_bytes: usize,
    ) -> (Hub, Vec<Inbox>) {
        let (mailboxes, inboxes) = (0..nr_shards)
            .map(|_| mailbox::channel(inbox_capacity, inbox_bytes).unwrap())
            .unzip();
        let registry =
            crate::auth::Registry::from_config(&crate::config::Config::development()).unwrap();
        let stats = (0..nr_shards).map(|_| Arc::default()).collect();
        let hub = Hub::new(
            mailboxes,
            stats,
            Arc::new(arc_swap::ArcSwap::from_pointee(registry)),
            0,
        );
        hub.set_phase(Phase::Running);
        // Every shard has a subscriber of `news` in project 0.
        for shard in 0..nr_shards {
            hub.broker.subscribe(shard, 0, "news");
        }
        (hub, inboxes)
    }

    /// A message from the engine is encoded once for the node (every shard gets the same
    /// publication, holding the engine's bytes as they came), goes only to the interested
    /// shards, skips a shard whose inbox is full without holding back the others, and is
    /// refused once the node drains.
    #[test]
    fn an_engine_delivery_is_encoded_once_and_never_waits_for_a_full_inbox() {
        let (hub, inboxes) = hub(4, 4);
        hub.broker.subscribe(3, 0, "user.alice");
        let body = Bytes::from_static(br#""hi","id":"n-1-0","ts":7}"#);
        let d = hub.deliver_each(crate::config::DEV_PROJECT, "news", body.clone());
        assert_eq!(
            d,
            Delivered {
                nr_shards: 4,
                ..Delivered::default()
            }
        );
        let got: Vec<Arc<Publication>> =
            inboxes.iter().map(|i| drain_inbox(i).0.remove(0)).collect();
        assert!(
            got.iter().all(|p| Arc::ptr_eq(p, &got[0])),
            "one publication for the node"
        );
        assert_eq!(
            got[0].body.as_ptr(),
            body.as_ptr(),
            "the engine's bytes, not a copy"
        );
        let frame = [&got[0].heads[0].1[..], &got[0].body[..]].concat();
        assert_eq!(frame, &message_frame("news", r#""hi""#, "n-1-0", 7)[..]);

        let d = hub.deliver_each(crate::config::DEV_PROJECT, "user.alice", body.clone());
        assert_eq!(d.nr_shards, 1, "a unicast wakes the user's shard only");
        assert_eq!(drain_inbox(&inboxes[3]).0.len(), 1);

        let held = hub.mailboxes[1].try_reserve(4, 0).unwrap();
        let d = hub.deliver_each(crate::config::DEV_PROJECT, "news", body.clone());
        assert_eq!(
            (d.nr_shards, d.nr_full),
            (3, 1),
            "shard 1 is full; the others get it"
        );
        drop(held);
        let got: Vec<usize> = inboxes.iter().map(|i| drain_inbox(i).0.len()).collect();
        assert_eq!(got, [1, 0, 1, 1]);

        let d = hub.deliver_each("no-such-project", "news", body.clone());
        assert!(d.unknown_project && d.nr_shards == 0);
        hub.drain();
        let d = hub.deliver_each(crate::config::DEV_PROJECT, "news", body);
        assert!(
            d.refused && d.nr_shards == 0,
            "nothing once the node drains"
        );
    }

    /// Over the node's budget a publish or batch is refused whole and nothing is sent, while
    /// a publication from the engine (accepted by another node) is still delivered, and
    /// counted.
    #[test]
    fn over_budget_publishes_are_refused_and_engine_deliveries_counted() {
        let (mut hub, inboxes) = hub(2, 16);
        let topic = [Topic::parse("news").unwrap()];
        let data = raw("1");
        hub.publish(0, &topic, &data).unwrap();
        let one = hub.mailboxes[0].depth_bytes() as u64;
        // Room for what the two inboxes hold now, and no more.
        hub.flow = crate::flow::Flow::new(2 * one, std::time::Duration::ZERO);
        let batch: Vec<_> = (0..3)
            .map(|_| hub.prepare(0, &topic, &data).unwrap().1)
            .collect();
        let over = PublishError::Overloaded(crate::flow::Overload::QueuedBytes {
            queued: 2 * one,
            max: 2 * one,
        });
        assert_eq!(send(&hub, &batch), Err(over.clone()));
        assert_eq!(hub.publish(0, &topic, &data), Err(over));
        assert_eq!(hub.flow.rejected(), [4, 0], "each publication counted");
        assert_eq!(hub.flow.engine_over(), 0);
        let body = Bytes::from_static(br#""hi","id":"n-1-0","ts":7}"#);
        let d = hub.deliver_each(crate::config::DEV_PROJECT, "news", body);
        assert_eq!(d.nr_shards, 2, "the engine's publication is delivered");
        assert_eq!(hub.flow.engine_over(), 1, "and counted");
        for inbox in &inboxes {
            assert_eq!(
                drain_inbox(inbox).0.len(),
                2,
                "the first publish and the engine's"
            );
        }
        hub.publish(0, &topic, &data).unwrap();
    }

    /// A publish goes only to the shards holding subscribers of one of its topics, and the
    /// all-or-nothing reservation covers only those.
    #[test]
    fn a_publish_reaches_only_the_interested_shards() {
        let (hub, inboxes) = hub(4, 4);
        let news = Topic::parse("news").unwrap();
        let alice = Topic::parse("user.alice").unwrap();
        let nobody = Topic::parse("user.nobody").unwrap();
        hub.broker.subscribe(2, 0, "user.alice");
        let data = raw("1");
        hub.publish(0, std::slice::from_ref(&alice), &data).unwrap();
        hub.publish(0, std::slice::from_ref(&nobody), &data)
            .unwrap();
        let got: Vec<usize> = inboxes.iter().map(|i| drain_inbox(i).0.len()).collect();
        assert_eq!(
            got,
            [0, 0, 1, 0],
            "a unicast wakes one shard; no subscriber, none"
        );
        // Shard 0's full inbox does not refuse a publish that does not go there.
        let held = hub.mailboxes[0].try_reserve(4, 0).unwrap();
        hub.publish(0, std::slice::from_ref(&alice), &data).unwrap();
        assert_eq!(
            hub.publish(0, &[alice.clone(), news], &data),
            Err(PublishError::Busy(0))
        );
        drop(held);
        let got: Vec<usize> = inboxes.iter().map(|i| drain_inbox(i).0.len()).collect();
        assert_eq!(got, [0, 0, 1, 0]);
        hub.broker.unsubscribe(2, 0, "user.alice");
        hub.publish(0, std::slice::from_ref(&alice), &data).unwrap();
        assert!(inboxes.iter().all(|i| drain_inbox(i).0.is_empty()));
        assert_eq!(hub.interest.len(), 1, "only `news` is left");
    }

    /// [`Hub::send`] on the local broker, which acknowledges at once.
    fn send(hub: &Hub, publications: &[Arc<Publication>]) -> Result<(), PublishError> {
        hub.submit(publications).map(drop)
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    /// Ids of the publications waiting in `inbox`, up to (not counting) a drain order, and
    /// whether one was found.
    fn drain_inbox(inbox: &Inbox) -> (Vec<Arc<Publication>>, bool) {
        let mut got = Vec::new();
        while let Some(m) = inbox.try_recv() {
            match m {
                ShardMsg::Publish(p) => got.push(p),
                ShardMsg::Drain => return (got, true),
                other => panic!("unexpected {other:?}"),
            }
        }
        (got, false)
    }

    #[test]
    fn a_publish_to_64_topics_holds_its_data_once() {
        let (hub, _inboxes) = hub(1, 16);
        let topics: Vec<Topic> = (0..64)
            .map(|i| Topic::parse(&format!("topic-{i}")).unwrap())
            .collect();
        let data = format!("\"{}\"", "x".repeat(1 << 20));
        let (id, p) = hub.prepare(0, &topics, &raw(&data)).unwrap();
        assert_eq!(p.heads.len(), 64);
        let heads: usize = p.heads.iter().map(|(_, h)| h.len()).sum();
        assert!(heads < 64 * 64, "heads hold no data: {heads} B");
        assert!(
            p.body.len() < data.len() + 64,
            "one body: {} B",
            p.body.len()
        );
        // Each topic's frame is its head then the shared body, as one frame would be.
        for (t, (name, head)) in topics.iter().zip(&p.heads) {
            assert_eq!(&**name, t.as_str());
            let ts: u64 = std::str::from_utf8(&p.body)
                .unwrap()
                .rsplit_once("\"ts\":")
                .unwrap()
                .1
                .trim_end_matches('}')
                .parse()
                .unwrap();
            let whole = message_frame(t.as_str(), &data, &id, ts);
            assert_eq!([&head[..], &p.body[..]].concat(), &whole[..]);
        }
    }

    #[test]
    fn a_frame_no_connection_queue_can_hold_is_refused_and_nothing_is_sent() {
        let (mut hub, inboxes) = hub(2, 16);
        hub.max_frame_bytes = 1000;
        let topic = [Topic::parse("news").unwrap()];
        let fits = 1000 - MESSAGE_FRAME_OVERHEAD - "news".len() - 2;
        hub.publish(0, &topic, &raw(&format!("\"{}\"", "x".repeat(fits))))
            .unwrap();
        let err = hub
            .publish(0, &topic, &raw(&format!("\"{}\"", "x".repeat(fits + 1))))
            .unwrap_err();
        assert_eq!(
            err,
            PublishError::TooLarge {
                size: 1001,
                max: 1000
            }
        );
        for inbox in &inboxes {
            assert_eq!(drain_inbox(inbox).0.len(), 1, "only the first publish");
        }
    }

    #[test]
    fn a_publish_or_batch_reaches_every_shard_or_none() {
        let (hub, inboxes) = hub(3, 4);
        let topic = [Topic::parse("news").unwrap()];
        let data = raw("1");
        // Shard 2's inbox has room for one message only.
        let held = hub.mailboxes[2].try_reserve(3, 0).unwrap();
        let batch: Vec<_> = (0..2)
            .map(|_| hub.prepare(0, &topic, &data).unwrap().1)
            .collect();
        assert_eq!(send(&hub, &batch), Err(PublishError::Busy(2)));
        for inbox in &inboxes {
            assert!(
                drain_inbox(inbox).0.is_empty(),
                "a refused batch sends nothing"
            );
        }
        hub.publish(0, &topic, &data).unwrap();
        assert_eq!(hub.publish(0, &topic, &data), Err(PublishError::Busy(2)));
        for inbox in &inboxes {
            assert_eq!(
                drain_inbox(inbox).0.len(),
                1,
                "the first publish, everywhere"
            );
        }
        drop(held);
        send(&hub, &batch).unwrap();
        for inbox in &inboxes {
            let (got, _) = drain_inbox(inbox);
            assert_eq!(got.len(), 2);
            assert!(Arc::ptr_eq(&got[0], &batch[0]) && Arc::ptr_eq(&got[1], &batch[1]));
        }
        assert_eq!(hub.mailboxes[2].depth(), 0, "room given back");
    }

    /// A lagging shard holds back at most its inbox's bytes: a publish or batch over them is
    /// refused whole, and the room comes back as the shard takes the messages.
    #[test]
    fn an_inbox_is_bounded_in_bytes_all_or_nothing() {
        let topic = [Topic::parse("news").unwrap()];
        let data = raw(&format!("\"{}\"", "x".repeat(1000)));
        let one = hub(1, 4).0.prepare(0, &topic, &data).unwrap().1.nr_bytes();
        // Room for the bytes of three such publishes, messages for a hundred.
        let (hub, inboxes) = hub_with_bytes(2, 100, 3 * one + one / 2);
        let batch: Vec<_> = (0..2)
            .map(|_| hub.prepare(0, &topic, &data).unwrap().1)
            .collect();
        send(&hub, &batch).unwrap();
        hub.publish(0, &topic, &data).unwrap();
        assert_eq!(hub.publish(0, &topic, &data), Err(PublishError::Busy(0)));
        assert_eq!(send(&hub, &batch), Err(PublishError::Busy(0)));
        for m in &hub.mailboxes {
            assert_eq!((m.depth(), m.depth_bytes()), (3, 3 * one));
        }
        // Shard 1 lags; shard 0 takes its messages and its room comes back.
        assert_eq!(drain_inbox(&inboxes[0]).0.len(), 3);
        assert_eq!(hub.publish(0, &topic, &data), Err(PublishError::Busy(1)));
        assert_eq!(drain_inbox(&inboxes[0]).0.len(), 0, "nothing sent");
        assert_eq!(drain_inbox(&inboxes[1]).0.len(), 3);
        send(&hub, &batch).unwrap();
        for inbox in &inboxes {
            assert_eq!(drain_inbox(inbox).0.len(), 2);
        }
    }

    /// Publishers racing the drain: every publish answered Ok is ahead of the drain order in
    /// every inbox, and every later one is refused `Draining`.
    #[test]
    fn every_accepted_publish_is_ahead_of_the_drain() {
        for _ in 0..20 {
            let (hub, inboxes) = hub(2, 1 << 20);
            let hub = Arc::new(hub);
            let publishers: Vec<_> = (0..3)
                .map(|_| {
                    let hub = hub.clone();
                    std::thread::spawn(move || {
                        let topic = [Topic::parse("news").unwrap()];
                        let data = raw("1");
                        let mut accepted = Vec::new();
                        loop {
                            match hub.publish(0, &topic, &data) {
                                Ok(id) => accepted.push(id),
                                Err(PublishError::Draining) => return accepted,
                                Err(e) => panic!("{e}"),
                            }
                        }
                    })
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(2));
            hub.drain();
            let mut accepted: Vec<String> = publishers
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect();
            accepted.sort();
            for inbox in &inboxes {
                let (got, drained) = drain_inbox(inbox);
                assert!(drained, "the drain order is queued");
                let mut ids: Vec<String> = got
                    .iter()
                    .map(|p| {
                        let body = std::str::from_utf8(&p.body).unwrap();
                        body.split('"').nth(3).unwrap().to_owned()
                    })
                    .collect();
                ids.sort();
                assert_eq!(
                    ids, accepted,
                    "exactly the accepted publishes, before the drain"
                );
                assert!(inbox.try_recv().is_none(), "nothing after the drain");
            }
        }
    }

    #[test]
    fn message_frame_passes_data_through() {
        let f = message_frame("news", r#"{"b": 1,  "a":[1.50]}"#, "x-1", 7);
        let text = std::str::from_utf8(&f[2..]).unwrap();
        assert_eq!(
            text,
            r#"{"type":"message","topic":"news","data":{"b": 1,  "a":[1.50]},"id":"x-1","ts":7}"#
        );
    }

    #[test]
    fn message_frame_escapes_a_user_topic() {
        let f = message_frame(r#"user.a"b\é"#, "1", "x-1", 7);
        let v: serde_json::Value = serde_json::from_slice(&f[2..]).unwrap();
        assert_eq!(v["topic"], r#"user.a"b\é"#);
    }
}
