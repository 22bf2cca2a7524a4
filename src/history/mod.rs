//! Message history: the recent publications of the topics a project keeps history for, held
//! where publishes are ordered (the hub), so a client that reconnects to any shard recovers
//! what it missed.
//!
//! Each topic with history is a *stream*: its publications numbered 1, 2, 3.. (the *offset*)
//! within an *epoch*, a name the stream gets when it is created. A stream that is lost (its
//! last entry evicted, so its offsets start again at 1) comes back with another epoch, so an
//! offset is only ever compared within the epoch it was given in.
//!
//! An entry holds the delivery frame fan-out sends (its head and the publish's shared body,
//! both reference-counted [`Bytes`]): history costs no copy of the payload. The store is
//! bounded by each stream's `size` and `ttl_secs` and by `server.history_max_bytes` for the
//! node (the oldest entries go first).
//!
//! Offsets are given and entries appended under the store's lock, by the hub while it sends
//! the publication to the shards ([`crate::hub::Hub`]); a shard reads the store under the
//! same lock after its connection is subscribed. So a shard knows, for the position it read,
//! that every later offset reaches its inbox after the read, and every earlier one is in the
//! store or already in its inbox (docs/architecture.md, "History and recovery").
//!
//! With an engine the streams are numbered in Redis ([`crate::broker::redis_history`]) and
//! the store is the node's copy of those it receives ([`History::append_at`]) or reads for a
//! recovery ([`History::fill`]), kept and read under the same lock, so the same reasoning
//! holds.
//!
//! This module must not know about connections or shards: it answers with positions and
//! entries.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::pubsub::topic_permitted;

/// Bytes counted for a stream beside its entries (its name, epoch and bookkeeping).
pub const STREAM_OVERHEAD_BYTES: usize = 160;
/// Bytes counted for an entry beside its frame (its offset, time and bookkeeping).
pub const ENTRY_OVERHEAD_BYTES: usize = 64;

/// History settings of one topic pattern of a project (`[[projects.history]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The topics it covers: a name, or a prefix ending in `*`.
    pub pattern: Box<str>,
    /// Most messages a stream keeps.
    pub size: usize,
    /// How long an entry is kept, in milliseconds.
    pub ttl_ms: u64,
}

/// The first rule of `rules` that covers `topic`.
pub fn rule_for<'a>(rules: &'a [Rule], topic: &str) -> Option<&'a Rule> {
    rules
        .iter()
        .find(|r| topic_permitted(std::slice::from_ref(&r.pattern), topic))
}

/// Where a client stands in a stream: the last offset it saw, in an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    /// The stream's epoch when the client saw `offset`.
    pub epoch: Box<str>,
    /// The last offset the client saw (0: none).
    pub offset: u64,
}

/// A stream's position: its epoch and its last offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The stream's epoch.
    pub epoch: Arc<str>,
    /// Its last offset (0: nothing published yet).
    pub offset: u64,
}

/// Why the store cannot give a client what it missed. Nothing is replayed then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecoverable {
    /// The stream is not the one the client saw (lost and started again, or another node's).
    EpochChanged,
    /// Some of the missed messages are older than the topic's `ttl_secs`.
    Expired,
    /// More messages were missed than the stream holds (`size`, or the node's cap).
    TooMany,
    /// More messages were missed than `server.history_max_replay`.
    OverLimit,
}

impl Unrecoverable {
    /// Every reason, in the order of the recovery counters.
    pub const ALL: [Self; 4] = [
        Self::EpochChanged,
        Self::Expired,
        Self::TooMany,
        Self::OverLimit,
    ];

    /// The `reason` of the reply.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EpochChanged => "epoch_changed",
            Self::Expired => "expired",
            Self::TooMany => "too_many",
            Self::OverLimit => "over_limit",
        }
    }
}

/// One stored publication: its delivery frame for the stream's topic.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its offset in the stream.
    pub offset: u64,
    /// The frame's head (with `"offset"`), shared with the fan-out.
    pub head: Bytes,
    /// The publish's body, shared with the fan-out and every other topic of the publish.
    pub body: Bytes,
}

impl Entry {
    fn nr_bytes(&self) -> usize {
        self.head.len() + self.body.len() + ENTRY_OVERHEAD_BYTES
    }
}

/// What a read of a stream gives a subscriber.
#[derive(Debug)]
pub struct Replay {
    /// The stream's position when read: deliveries at or below it are not live for the reader.
    pub position: Position,
    /// With a `since`: the missed entries, in order, or why there are none.
    pub outcome: Option<Result<Vec<Entry>, Unrecoverable>>,
}

/// The store's counters, read by `/metrics`.
#[derive(Debug, Default)]
pub struct HistoryStats {
    /// Bytes held (entries and streams, as counted against the cap).
    pub bytes: AtomicU64,
    /// Entries held.
    pub entries: AtomicU64,
    /// Streams held.
    pub streams: AtomicU64,
    /// Entries evicted for the node's byte cap.
    pub evicted_cap: AtomicU64,
    /// Recoveries that replayed what was missed (possibly nothing).
    pub recovered: AtomicU64,
    /// Recoveries refused, by [`Unrecoverable::ALL`] order.
    pub not_recovered: [AtomicU64; 4],
}

/// The node's history.
#[derive(Debug)]
pub struct History {
    /// `server.history_max_bytes`.
    max_bytes: usize,
    /// `server.history_max_replay`: most messages one recovery replays.
    max_replay: u64,
    /// Start of every epoch: the node's start time, so epochs differ across restarts.
    node_epoch: String,
    inner: Mutex<Inner>,
    /// Counters.
    pub stats: HistoryStats,
}

/// The streams, under the store's lock.
#[derive(Debug, Default)]
pub struct Inner {
    /// Stream id by (project, topic).
    ids: HashMap<(u32, Box<str>), u64>,
    /// Streams by id.
    streams: HashMap<u64, Stream>,
    /// Every held entry's (sequence, stream id), oldest first: the node's eviction order.
    order: BTreeMap<u64, u64>,
    next_seq: u64,
    next_stream: u64,
    /// Streams lost so far: part of every new epoch, so a stream started again never reuses
    /// the epoch of one that was lost.
    nr_lost: u64,
    bytes: usize,
}

#[derive(Debug)]
struct Stream {
    key: (u32, Box<str>),
    epoch: Arc<str>,
    /// Last offset given.
    top: u64,
    entries: VecDeque<Stored>,
    /// Offsets up to this were dropped for their age.
    expired_through: u64,
}

#[derive(Debug)]
struct Stored {
    seq: u64,
    at_ms: u64,
    entry: Entry,
}

impl History {
    /// An empty store of at most `max_bytes` that replays at most `max_replay` messages at once.
    pub fn new(max_bytes: usize, max_replay: u64) -> Self {
        Self {
            max_bytes,
            max_replay,
            node_epoch: format!(
                "{:x}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            ),
            inner: Mutex::new(Inner::default()),
            stats: HistoryStats::default(),
        }
    }

    /// `server.history_max_replay`: most messages one recovery replays.
    pub fn max_replay(&self) -> u64 {
        self.max_replay
    }

    /// Takes the store's lock. The hub holds it while it numbers, stores and sends
    /// publications of streams; a shard while it reads one.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under the lock leaves counts, never a broken invariant the readers rely on
        // (offsets only grow).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends the entry of `topic` of `project` (kept as `rule` says) whose head
    /// `head(offset)` makes, under the lock `inner`, evicting what the bounds require, and
    /// returns its offset.
    pub fn append(
        &self,
        inner: &mut Inner,
        (project, topic): (u32, &str),
        rule: &Rule,
        now_ms: u64,
        head: impl FnOnce(u64) -> Bytes,
        body: &Bytes,
    ) -> u64 {
        let id = self.stream_id(inner, project, topic);
        let s = inner.streams.get_mut(&id).expect("ids name streams");
        s.top += 1;
        let entry = Entry {
            offset: s.top,
            head: head(s.top),
            body: body.clone(),
        };
        let offset = entry.offset;
        self.push(inner, id, rule, now_ms, entry);
        offset
    }

    /// Stores, under the lock `inner`, an entry of `topic` of `project` numbered elsewhere
    /// (by the engine) in the stream of `epoch`: the node's copy of the engine's stream, for
    /// recoveries on this node. A stream of another epoch is replaced; an offset held already
    /// is skipped; past a gap the entries before it are dropped (what is held stays
    /// contiguous). Returns whether it was stored.
    pub fn append_at(
        &self,
        inner: &mut Inner,
        (project, topic): (u32, &str),
        rule: &Rule,
        now_ms: u64,
        epoch: &str,
        entry: Entry,
    ) -> bool {
        let mut id = self.mirror(inner, (project, topic), epoch);
        let top = inner.streams[&id].top;
        if entry.offset <= top {
            return false;
        }
        if entry.offset > top + 1 {
            self.drop_entries(inner, id);
            // The stream (and its epoch) stays, held from this entry on.
            id = self.mirror(inner, (project, topic), epoch);
        }
        inner.streams.get_mut(&id).expect("ids name streams").top = entry.offset;
        self.push(inner, id, rule, now_ms, entry);
        true
    }

    /// The epoch of the stream of `topic` of `project` held under the lock `inner`, if it has
    /// offsets.
    pub fn epoch_held(&self, inner: &Inner, (project, topic): (u32, &str)) -> Option<Arc<str>> {
        let s = &inner.streams[inner.ids.get(&(project, Box::from(topic)))?];
        (s.top > 0).then(|| s.epoch.clone())
    }

    /// Stores what the engine's stream of `topic` of `project` held, read for a recovery:
    /// its `epoch`, its last offset `top` and its entries from some offset on, in order.
    /// Entries held already are kept; the stream's other epoch is replaced; a copy behind the
    /// engine that the entries read do not join is dropped for them (what is held stays
    /// contiguous, up to the engine's last offset).
    pub fn fill(
        &self,
        (project, topic): (u32, &str),
        rule: &Rule,
        now_ms: u64,
        (epoch, top): (&str, u64),
        entries: Vec<Entry>,
    ) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mut id = self.mirror(inner, (project, topic), epoch);
        let behind = inner.streams[&id].top;
        if top > behind {
            let joins = !inner.streams[&id].entries.is_empty()
                && entries.iter().any(|e| e.offset == behind + 1);
            if !joins {
                self.drop_entries(inner, id);
                id = self.mirror(inner, (project, topic), epoch);
            }
            inner.streams.get_mut(&id).expect("ids name streams").top = top;
            let held_top = if joins { behind } else { 0 };
            let newer: Vec<Entry> = entries
                .iter()
                .filter(|e| e.offset > held_top && e.offset <= top)
                .cloned()
                .collect();
            for e in newer {
                let seq = inner.next_seq;
                inner.next_seq += 1;
                self.store(inner, id, seq, now_ms, e, false);
            }
        }
        // Older entries go in front of those held, newest first, while they join.
        let held_from = inner.streams[&id]
            .entries
            .front()
            .map_or(inner.streams[&id].top + 1, |e| e.entry.offset);
        for e in entries.into_iter().rev().filter(|e| e.offset < held_from) {
            let front = inner.streams[&id]
                .entries
                .front()
                .map_or(inner.streams[&id].top + 1, |f| f.entry.offset);
            if front != e.offset + 1 {
                break;
            }
            let seq = inner.next_seq;
            inner.next_seq += 1;
            self.store(inner, id, seq, now_ms, e, true);
        }
        self.bound(inner, id, rule, now_ms);
    }

    /// The stream of `topic` of `project` in `epoch`: made, or made again over another epoch.
    fn mirror(&self, inner: &mut Inner, (project, topic): (u32, &str), epoch: &str) -> u64 {
        let id = self.stream_id(inner, project, topic);
        if *inner.streams[&id].epoch != *epoch {
            let s = inner.streams.get_mut(&id).expect("ids name streams");
            if s.entries.is_empty() {
                s.epoch = epoch.into();
                s.top = 0;
                s.expired_through = 0;
                return id;
            }
            while inner.streams.contains_key(&id) {
                self.pop_front(inner, id, false);
            }
            let id = self.stream_id(inner, project, topic);
            inner.streams.get_mut(&id).expect("ids name streams").epoch = epoch.into();
            return id;
        }
        id
    }

    /// Drops every entry of stream `id` (which is then lost, see [`History::pop_front`]).
    fn drop_entries(&self, inner: &mut Inner, id: u64) {
        while inner
            .streams
            .get(&id)
            .is_some_and(|s| !s.entries.is_empty())
        {
            self.pop_front(inner, id, false);
        }
    }

    /// Holds `entry` (at the back, or in `front`) in stream `id`, counted.
    fn store(&self, inner: &mut Inner, id: u64, seq: u64, now_ms: u64, entry: Entry, front: bool) {
        let nr_bytes = entry.nr_bytes();
        let s = inner.streams.get_mut(&id).expect("ids name streams");
        let stored = Stored {
            seq,
            at_ms: now_ms,
            entry,
        };
        if front {
            s.entries.push_front(stored);
        } else {
            s.entries.push_back(stored);
        }
        inner.order.insert(seq, id);
        inner.bytes += nr_bytes;
        self.stats.entries.fetch_add(1, Ordering::Relaxed);
    }

    /// Appends `entry` to stream `id` and evicts what the bounds require.
    fn push(&self, inner: &mut Inner, id: u64, rule: &Rule, now_ms: u64, entry: Entry) {
        let seq = inner.next_seq;
        inner.next_seq += 1;
        self.store(inner, id, seq, now_ms, entry, false);
        self.bound(inner, id, rule, now_ms);
    }

    /// Evicts from stream `id` and the node what their bounds require.
    fn bound(&self, inner: &mut Inner, id: u64, rule: &Rule, now_ms: u64) {
        // The stream's own bounds: its size, then its age.
        while let Some(s) = inner.streams.get(&id) {
            let Some(front) = s.entries.front() else {
                break;
            };
            let old = now_ms.saturating_sub(front.at_ms) > rule.ttl_ms;
            if s.entries.len() <= rule.size && !old {
                break;
            }
            self.pop_front(inner, id, old);
        }
        // The node's cap: the oldest entries of any stream.
        while inner.bytes > self.max_bytes {
            let Some((_, &oldest)) = inner.order.first_key_value() else {
                break;
            };
            self.stats.evicted_cap.fetch_add(1, Ordering::Relaxed);
            self.pop_front(inner, oldest, false);
        }
        self.publish_stats(inner);
    }

    /// Reads the stream of `topic` of `project` (kept as `rule` says) for a subscriber: its
    /// position, and with `since` what the subscriber missed after it, all or nothing.
    pub fn read(
        &self,
        (project, topic): (u32, &str),
        rule: &Rule,
        since: Option<&Since>,
        now_ms: u64,
    ) -> Replay {
        let inner = self.lock();
        let stream = inner
            .ids
            .get(&(project, Box::from(topic)))
            .map(|id| &inner.streams[id]);
        let position = match stream {
            Some(s) => Position {
                epoch: s.epoch.clone(),
                offset: s.top,
            },
            // A stream not created yet has the epoch it will be created with.
            None => Position {
                epoch: self.epoch(inner.nr_lost).into(),
                offset: 0,
            },
        };
        let outcome = since.map(|since| self.missed(stream, &position, since, rule, now_ms));
        drop(inner);
        match &outcome {
            Some(Ok(_)) => {
                self.stats.recovered.fetch_add(1, Ordering::Relaxed);
            }
            Some(Err(why)) => {
                let i = Unrecoverable::ALL
                    .iter()
                    .position(|w| w == why)
                    .unwrap_or(0);
                self.stats.not_recovered[i].fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
        Replay { position, outcome }
    }

    fn missed(
        &self,
        stream: Option<&Stream>,
        position: &Position,
        since: &Since,
        rule: &Rule,
        now_ms: u64,
    ) -> Result<Vec<Entry>, Unrecoverable> {
        if *since.epoch != *position.epoch || since.offset > position.offset {
            return Err(Unrecoverable::EpochChanged);
        }
        let nr_missed = position.offset - since.offset;
        if nr_missed == 0 {
            return Ok(Vec::new());
        }
        if nr_missed > self.max_replay {
            return Err(Unrecoverable::OverLimit);
        }
        let s = stream.ok_or(Unrecoverable::EpochChanged)?;
        let first = since.offset + 1;
        if first <= s.expired_through {
            return Err(Unrecoverable::Expired);
        }
        let held_from = s.entries.front().map_or(s.top + 1, |e| e.entry.offset);
        if first < held_from {
            return Err(Unrecoverable::TooMany);
        }
        let skip = (first - held_from) as usize;
        let mut out = Vec::with_capacity(nr_missed as usize);
        for e in s.entries.iter().skip(skip) {
            if now_ms.saturating_sub(e.at_ms) > rule.ttl_ms {
                return Err(Unrecoverable::Expired);
            }
            out.push(e.entry.clone());
        }
        Ok(out)
    }

    fn epoch(&self, nr_lost: u64) -> String {
        format!("{}-{nr_lost:x}", self.node_epoch)
    }

    fn stream_id(&self, inner: &mut Inner, project: u32, topic: &str) -> u64 {
        let key = (project, Box::<str>::from(topic));
        if let Some(&id) = inner.ids.get(&key) {
            return id;
        }
        let id = inner.next_stream;
        inner.next_stream += 1;
        let epoch = self.epoch(inner.nr_lost).into();
        inner.bytes += STREAM_OVERHEAD_BYTES + topic.len();
        inner.ids.insert(key.clone(), id);
        inner.streams.insert(
            id,
            Stream {
                key,
                epoch,
                top: 0,
                entries: VecDeque::new(),
                expired_through: 0,
            },
        );
        id
    }

    /// Drops stream `id`'s oldest entry (`expired`: for its age); a stream left empty is lost.
    fn pop_front(&self, inner: &mut Inner, id: u64, expired: bool) {
        let s = inner.streams.get_mut(&id).expect("ids name streams");
        let Some(old) = s.entries.pop_front() else {
            return;
        };
        if expired {
            s.expired_through = old.entry.offset;
        }
        let empty = s.entries.is_empty();
        inner.order.remove(&old.seq);
        inner.bytes -= old.entry.nr_bytes();
        self.stats.entries.fetch_sub(1, Ordering::Relaxed);
        if empty {
            let s = inner.streams.remove(&id).expect("ids name streams");
            inner.ids.remove(&s.key);
            inner.bytes -= STREAM_OVERHEAD_BYTES + s.key.1.len();
            inner.nr_lost += 1;
        }
    }

    fn publish_stats(&self, inner: &Inner) {
        self.stats
            .bytes
            .store(inner.bytes as u64, Ordering::Relaxed);
        self.stats
            .streams
            .store(inner.streams.len() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(size: usize, ttl_ms: u64) -> Rule {
        Rule {
            pattern: "news*".into(),
            size,
            ttl_ms,
        }
    }

    fn push(h: &History, r: &Rule, topic: &str, at: u64) -> u64 {
        let mut inner = h.lock();
        let body = Bytes::from_static(b"1}");
        h.append(
            &mut inner,
            (0, topic),
            r,
            at,
            |o| Bytes::from(o.to_string()),
            &body,
        )
    }

    fn since(p: &Position, offset: u64) -> Since {
        Since {
            epoch: p.epoch.as_ref().into(),
            offset,
        }
    }

    #[test]
    fn a_subscriber_gets_what_it_missed_or_nothing_with_the_reason() {
        let h = History::new(1 << 20, 3);
        let r = rule(4, 1000);
        let p0 = h.read((0, "news"), &r, None, 0).position;
        assert_eq!(p0.offset, 0);
        for i in 1..=5 {
            assert_eq!(push(&h, &r, "news", i), i);
        }
        let p = h.read((0, "news"), &r, None, 5).position;
        assert_eq!((p.epoch.clone(), p.offset), (p0.epoch.clone(), 5));
        let got = h.read((0, "news"), &r, Some(&since(&p, 2)), 5);
        let offsets: Vec<u64> = got
            .outcome
            .unwrap()
            .unwrap()
            .iter()
            .map(|e| e.offset)
            .collect();
        assert_eq!(offsets, [3, 4, 5]);
        let nothing = h.read((0, "news"), &r, Some(&since(&p, 5)), 5);
        assert!(nothing.outcome.unwrap().unwrap().is_empty());
        let over = h.read((0, "news"), &r, Some(&since(&p, 1)), 5);
        assert_eq!(over.outcome.unwrap().unwrap_err(), Unrecoverable::OverLimit);
        // Size 4 holds 2..5.
        let h2 = History::new(1 << 20, 100);
        for i in 1..=5 {
            push(&h2, &r, "news", i);
        }
        let p2 = h2.read((0, "news"), &r, None, 5).position;
        let gone = h2.read((0, "news"), &r, Some(&since(&p2, 0)), 5);
        assert_eq!(gone.outcome.unwrap().unwrap_err(), Unrecoverable::TooMany);
        let ok = h2.read((0, "news"), &r, Some(&since(&p2, 1)), 5);
        assert_eq!(ok.outcome.unwrap().unwrap().len(), 4);
        let other = Since {
            epoch: "elsewhere".into(),
            offset: 1,
        };
        let e = h2.read((0, "news"), &r, Some(&other), 5);
        assert_eq!(e.outcome.unwrap().unwrap_err(), Unrecoverable::EpochChanged);
        // Past the TTL.
        let old = h2.read((0, "news"), &r, Some(&since(&p2, 3)), 2000);
        assert_eq!(old.outcome.unwrap().unwrap_err(), Unrecoverable::Expired);
        assert_eq!(h2.stats.recovered.load(Ordering::Relaxed), 1);
    }

    /// The node's copy of a stream numbered by the engine: entries with the engine's offsets,
    /// filled from the engine for a recovery, always contiguous.
    #[test]
    fn a_copy_of_an_engine_stream_stays_contiguous() {
        let h = History::new(1 << 20, 100);
        let r = rule(10, u64::MAX);
        let e = |o: u64| Entry {
            offset: o,
            head: Bytes::from(o.to_string()),
            body: Bytes::from_static(b"1}"),
        };
        let put = |epoch: &str, o| {
            let mut inner = h.lock();
            h.append_at(&mut inner, (0, "news"), &r, 0, epoch, e(o))
        };
        let got = |epoch: &str, offset| {
            let since = Since {
                epoch: epoch.into(),
                offset,
            };
            h.read((0, "news"), &r, Some(&since), 0)
                .outcome
                .unwrap()
                .map(|v| v.iter().map(|e| e.offset).collect::<Vec<_>>())
        };
        assert!(put("E", 5), "first seen: held from 5");
        assert!(put("E", 6));
        assert!(!put("E", 6), "held already");
        let p = h.read((0, "news"), &r, None, 0).position;
        assert_eq!((&*p.epoch, p.offset), ("E", 6));
        assert_eq!(got("E", 4), Ok(vec![5, 6]));
        assert_eq!(got("E", 2), Err(Unrecoverable::TooMany));
        h.fill((0, "news"), &r, 0, ("E", 6), vec![e(3), e(4), e(5), e(6)]);
        assert_eq!(got("E", 2), Ok(vec![3, 4, 5, 6]), "older entries in front");
        assert!(put("E", 9), "past a gap");
        assert_eq!(got("E", 6), Err(Unrecoverable::TooMany));
        assert_eq!(got("E", 8), Ok(vec![9]));
        h.fill((0, "news"), &r, 0, ("E", 11), vec![e(10), e(11)]);
        assert_eq!(
            got("E", 8),
            Ok(vec![9, 10, 11]),
            "the engine's newer entries join"
        );
        h.fill((0, "news"), &r, 0, ("E", 20), vec![e(18), e(19), e(20)]);
        assert_eq!(
            got("E", 17),
            Ok(vec![18, 19, 20]),
            "a copy left behind is replaced"
        );
        assert!(put("F", 1), "another epoch");
        assert_eq!(got("F", 0), Ok(vec![1]));
        assert_eq!(got("E", 20), Err(Unrecoverable::EpochChanged));
    }

    #[test]
    fn the_node_cap_holds_and_a_lost_stream_gets_a_new_epoch() {
        let cap = 64 * 1024;
        let h = History::new(cap, 100);
        let r = rule(1000, u64::MAX);
        push(&h, &r, "news.lone", 0);
        let first = h.read((0, "news.lone"), &r, None, 0).position;
        assert_eq!(first.offset, 1);
        for i in 0..100_000u64 {
            push(&h, &r, &format!("news.{}", i % 50), i);
            assert!(h.lock().bytes <= cap);
        }
        assert!(h.stats.bytes.load(Ordering::Relaxed) as usize <= cap);
        assert!(h.stats.evicted_cap.load(Ordering::Relaxed) > 90_000);
        let now = h.read((0, "news.lone"), &r, None, 0).position;
        assert_ne!(now.epoch, first.epoch, "news.lone was lost: another epoch");
        assert_eq!(now.offset, 0);
        let entries = h.stats.entries.load(Ordering::Relaxed) as usize;
        assert!(entries > 100 && entries * ENTRY_OVERHEAD_BYTES < cap);
    }
}
