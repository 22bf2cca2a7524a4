//! The shard side of the connection machine ([`crate::ws::machine`]): [`ShardHost`] hands the
//! machine one connection of the shard with the facts only the shard knows (the registry, the
//! key sets tokens verify with, the caps, the topic index) and executes the actions it takes
//! on the shard's state. [`Shard::set_phase`] is the one place a connection changes phase.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use serde_json::value::RawValue;
use tracing::{debug, info, warn};

use super::{AcceptRefusal, Deadline, Limits, Shard};
use crate::auth::{AuthError, Project, Verified};
use crate::metrics::ShardStats;
use crate::pubsub::{ConnId, Sub, Topic, TopicId, Unsubscribed};
use crate::ws::close::CloseReason;
use crate::ws::codec::stomp;
use crate::ws::conn::{Conn, ConnPhase, OutPart, Push, push_frame};
use crate::ws::handshake::{HandshakeOutcome, Refusal};
use crate::ws::machine::{self, Host, Now, Rate, Rules};

/// How long held subscribe acks wait, with the engine up, before the shard asks again
/// whether their topic is subscribed.
const HELD_ACK_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// The machine's rules from the shard's limits.
pub(super) fn rules(l: &Limits) -> Rules {
    Rules {
        max_handshake_bytes: l.max_handshake_bytes,
        max_message_bytes: l.max_message_bytes,
        max_topics_per_connection: l.max_topics_per_connection,
        max_bad_requests: l.max_bad_requests,
        messages: Rate {
            interval: l.msg_interval_us,
            tolerance: l.msg_tolerance_us,
        },
        refreshes: Rate {
            interval: l.refresh_interval_ms,
            tolerance: l.refresh_tolerance_ms,
        },
        refreshes_per_min: l.refreshes_per_min,
        refresh_burst: l.refresh_burst,
        heartbeat_secs: l.heartbeat.as_millis().div_ceil(1000) as u64,
        proxy_protocol: l.proxies.proxy_protocol,
    }
}

/// One connection of a shard, as the machine's [`Host`].
pub(crate) struct ShardHost<'a> {
    shard: &'a mut Shard,
    slot: u32,
}

impl Shard {
    /// The machine's host for the connection in `slot` (which must be occupied).
    pub(crate) fn host(&mut self, slot: u32) -> ShardHost<'_> {
        ShardHost { shard: self, slot }
    }

    /// The time of the event being handled, on every clock the machine uses.
    pub(crate) fn now(&self) -> Now {
        let at = Instant::now();
        let since = at.duration_since(self.epoch);
        Now {
            at,
            // Wrapping on purpose: the limiters compare these clocks modulo 2^32.
            us: since.as_micros() as u32,
            ms: since.as_millis() as u32,
            unix_ms: crate::hub::now_ms(),
        }
    }

    /// The one place a connection's phase changes (Handshake → Open → Closing → gone, `None`),
    /// and with it the count of handshakes in progress: the shard's, and its address's when
    /// the connection leaves the handshake for another phase (a connection that is gone gives
    /// its address back when it is removed). A new connection enters the handshake here.
    pub(crate) fn set_phase(&mut self, slot: u32, to: Option<ConnPhase>) {
        let c = &mut self.conns[slot as usize];
        match (c.phase, to) {
            (_, Some(ConnPhase::Handshake)) => self.pending_handshakes += 1,
            (ConnPhase::Handshake, to) => {
                self.pending_handshakes -= 1;
                if to.is_some() && c.client_known {
                    self.hub.ip_conns.handshake_over(c.peer.ip());
                }
            }
            _ => {}
        }
        if let Some(to) = to {
            c.phase = to;
        }
    }

    /// Starts the closing handshake of the connection in `slot`, if any, with `reason` (see
    /// [`machine::close`]).
    pub(crate) fn close_with(&mut self, slot: u32, reason: CloseReason) {
        if self.conns.contains(slot as usize) {
            let now = self.now();
            machine::close(&mut self.host(slot), now, reason);
        }
    }

    /// Adds `slot` to a topic of the index. The topic's first local subscriber declares the
    /// shard's interest to the broker, which returns once the node's interest table has the
    /// shard's bit: whatever the caller queues afterwards (an ack, the welcome) reaches the
    /// client only when publishes of the topic are routed here.
    pub(super) fn subscribe_slot(&mut self, project: u32, name: &str, slot: u32) -> Sub {
        let s = self.topics.subscribe(project, name, slot);
        self.awaits_engine = s.first && self.hub.broker.subscribe(self.id as usize, project, name);
        s.sub
    }

    /// Holds the ack of a new subscription of `slot` to `topic` until the node's engine
    /// subscription of the topic exists (see [`Host::hold_until_subscribed`]): when the
    /// subscription just made was the shard's first of a topic whose engine subscription is
    /// new or still pending (asked for by another shard and not confirmed: nothing of the
    /// topic reaches the node before it exists), or acks of the topic are held here already. Otherwise, and on a node without an engine,
    /// `false`: the ack goes now (the node receives the topic already; holding the ack would
    /// let messages overtake it). The first ack held for a topic asks the broker to be told
    /// ([`ShardMsg::Subscribed`](super::mailbox::ShardMsg::Subscribed)).
    pub(super) fn hold_ack(&mut self, slot: u32, project: u32, topic: &str, ack: &Bytes) -> bool {
        let generation = self.conns[slot as usize].generation;
        self.wait_for_engine(project, topic, |held| {
            held.acks.push((slot, generation, ack.clone()));
        })
    }

    /// The welcome of `slot` waits for `topic`, an implicit subscription just made, by the
    /// rule of [`Shard::hold_ack`]: `true` when it does ([`super::welcome`]).
    pub(super) fn welcome_waits_for(&mut self, slot: u32, project: u32, topic: &str) -> bool {
        let generation = self.conns[slot as usize].generation;
        let waits = self.wait_for_engine(project, topic, |held| {
            held.welcomes.push((slot, generation));
        });
        if waits {
            self.held_welcomes
                .entry(slot)
                .or_insert_with(|| super::welcome::HeldWelcome::new(generation))
                .nr_waiting += 1;
        }
        waits
    }

    /// Holds the welcome of `slot` if it waits for a topic: `false` when it does not (the
    /// machine queues it now). A welcome made after its topics were subscribed (STOMP's
    /// `CONNECTED` comes when the client asks) goes at once, before what queued behind it.
    pub(super) fn hold_welcome(&mut self, slot: u32, welcome: &Bytes) -> bool {
        let Some(w) = self.held_welcomes.get_mut(&slot) else {
            return false;
        };
        w.welcome = Some(welcome.clone());
        self.send_welcome_if_ready(slot);
        true
    }

    /// Registers a wait (`add`) for the node's engine subscription of `topic` when the
    /// subscription just made found it new or pending, or waits are held for it here
    /// already; asks the broker on the topic's first wait. `false`: nothing to wait for.
    fn wait_for_engine(
        &mut self,
        project: u32,
        topic: &str,
        add: impl FnOnce(&mut super::HeldAcks),
    ) -> bool {
        let awaits_engine = std::mem::take(&mut self.awaits_engine);
        if self.hub.broker.engine().is_none() {
            return false;
        }
        let key = (project, Box::<str>::from(topic));
        let first = !self.held_acks.contains_key(&key);
        if first && !awaits_engine {
            return false;
        }
        let now = Instant::now();
        add(self
            .held_acks
            .entry(key)
            .or_insert_with(|| super::HeldAcks {
                asked_at: now,
                acks: Vec::new(),
                welcomes: Vec::new(),
            }));
        if first {
            self.ask_when_subscribed(project, topic);
        }
        true
    }

    /// Asks the broker to tell this shard (through its inbox) once `topic` is subscribed.
    pub(super) fn ask_when_subscribed(&self, project: u32, topic: &str) {
        let hub = Arc::downgrade(&self.hub);
        let shard = self.id as usize;
        let name: Box<str> = topic.into();
        self.hub.broker.when_subscribed(
            project,
            topic,
            Box::new(move || {
                let Some(hub) = hub.upgrade() else {
                    return;
                };
                // A full inbox loses the message; the sweep asks again (`retry_held_acks`).
                if let Ok(mut r) = hub.mailboxes[shard].try_reserve(1, 0) {
                    let _ = r.send(super::mailbox::ShardMsg::Subscribed {
                        project,
                        topic: name,
                    });
                }
            }),
        );
    }

    /// Asks the broker to read the streams of `then`'s topics (for the subscribe or
    /// `recover` of `slot`) into the node's copy, and to tell this shard once all are
    /// ([`ShardMsg::Fetched`](super::mailbox::ShardMsg::Fetched)).
    pub(super) fn fetch_history(
        &mut self,
        slot: u32,
        generation: u32,
        project: u32,
        then: machine::Fetch,
    ) {
        // The subscription asks no ack of its own (`hold_ack`): the answer waits for the read.
        self.awaits_engine = false;
        let token = self.fetches.next;
        self.fetches.next += 1;
        let reads: Vec<(Box<str>, crate::broker::HistoryRead)> = {
            let registry = self.hub.registry.load();
            let rules = registry.project_at(project).map(|p| &p.history[..]);
            then.topics
                .iter()
                .map(|(topic, since)| {
                    let ttl_ms = rules
                        .and_then(|r| crate::history::rule_for(r, topic))
                        .map_or(0, |r| r.ttl_ms);
                    let read = crate::broker::HistoryRead {
                        after: since.as_ref().map(|s| s.offset),
                        count: self.hub.history.max_replay(),
                        ttl_secs: (ttl_ms / 1000).max(1),
                    };
                    (topic.clone(), read)
                })
                .collect()
        };
        if then.welcome.is_some() {
            self.held_welcomes
                .entry(slot)
                .or_insert_with(|| super::welcome::HeldWelcome::new(generation))
                .nr_waiting += 1;
        }
        self.fetches.waiting.insert(token, (slot, generation, then));
        let left = Arc::new(std::sync::atomic::AtomicUsize::new(reads.len()));
        for (topic, read) in reads {
            let hub = Arc::downgrade(&self.hub);
            let shard = self.id as usize;
            let left = left.clone();
            self.hub.broker.fetch_history(
                project,
                &topic,
                read,
                Box::new(move || {
                    if left.fetch_sub(1, Ordering::AcqRel) != 1 {
                        return;
                    }
                    if let Some(hub) = hub.upgrade() {
                        // Past the bound: a waiting request is answered even on a full inbox.
                        let _ = hub.mailboxes[shard]
                            .send_over_bound(super::mailbox::ShardMsg::Fetched { token });
                    }
                }),
            );
        }
    }

    /// Answers the subscribe numbered `token`, its stream read, if its connection is there.
    pub(super) fn fetched(&mut self, token: u64) {
        let Some((slot, generation, then)) = self.fetches.waiting.remove(&token) else {
            return;
        };
        let here = self
            .conns
            .get(slot as usize)
            .is_some_and(|c| c.generation == generation);
        if here {
            let now = self.now();
            machine::fetched(&mut self.host(slot), now, then);
        }
    }

    /// Sends the acks held for `topic` to the connections still there, and the welcomes that
    /// waited for it last.
    pub(super) fn release_acks(&mut self, project: u32, topic: Box<str>) {
        let Some(held) = self.held_acks.remove(&(project, topic)) else {
            return;
        };
        for (slot, generation) in held.welcomes {
            self.welcome_topic_subscribed(slot, generation);
        }
        for (slot, generation, ack) in held.acks {
            let open = self
                .conns
                .get(slot as usize)
                .is_some_and(|c| c.generation == generation && c.phase == ConnPhase::Open);
            if open {
                self.push_or_close(slot, &[&ack]);
            }
        }
    }

    /// Queues a frame to `slot` (behind its welcome while that is held); a connection whose
    /// queue overflows is closed as a slow consumer.
    fn push_or_close(&mut self, slot: u32, parts: &[&Bytes]) {
        let cap = self.limits.max_outbound_queue_bytes;
        let pushed = super::welcome::behind(&mut self.held_welcomes, slot, parts, cap)
            .unwrap_or_else(|| push_frame(&mut self.conns, &mut self.dirty, slot, parts, cap));
        if pushed == Push::Overflow {
            self.close_with(slot, CloseReason::SlowConsumer);
        }
    }

    /// One topic the welcome of `slot` waited for is subscribed: the welcome goes once it
    /// waits for none, followed by what queued behind it.
    fn welcome_topic_subscribed(&mut self, slot: u32, generation: u32) {
        let Some(w) = self.held_welcomes.get_mut(&slot) else {
            return;
        };
        if w.generation != generation {
            return;
        }
        w.nr_waiting = w.nr_waiting.saturating_sub(1);
        self.send_welcome_if_ready(slot);
    }

    /// The welcome of `slot`, made from the positions read from the engine: it goes once
    /// it waits for nothing else ([`super::welcome`]).
    pub(super) fn welcome_read(&mut self, slot: u32, welcome: Bytes) {
        let Some(w) = self.held_welcomes.get_mut(&slot) else {
            return;
        };
        w.welcome = Some(welcome);
        w.nr_waiting = w.nr_waiting.saturating_sub(1);
        self.send_welcome_if_ready(slot);
    }

    /// Sends the held welcome of `slot`, followed by what queued behind it, once it is made
    /// and waits for nothing.
    fn send_welcome_if_ready(&mut self, slot: u32) {
        if !self.held_welcomes.get(&slot).is_some_and(|w| w.ready()) {
            return;
        }
        let Some(w) = self.held_welcomes.remove(&slot) else {
            return;
        };
        let cap = self.limits.max_outbound_queue_bytes;
        let frames = w.welcome.into_iter().map(|f| vec![f]).chain(w.behind);
        for parts in frames {
            let refs: Vec<&Bytes> = parts.iter().collect();
            if push_frame(&mut self.conns, &mut self.dirty, slot, &refs, cap) == Push::Overflow {
                self.close_with(slot, CloseReason::SlowConsumer);
                return;
            }
        }
    }

    /// Tells every local herald.v1 subscriber of `topic` that messages of it may have been
    /// missed while the engine was away (`resync`); a STOMP subscriber gets nothing (STOMP
    /// has no such frame). A subscriber whose queue is full is closed as a slow consumer.
    pub(super) fn resync(&mut self, project: u32, topic: &str) {
        let Some(t) = self.topics.lookup(project, topic) else {
            return;
        };
        // With history, what follows may be a stream started again: offsets from 1.
        for slot in self.topics.subscribers(t).to_vec() {
            if let Some(id) = self
                .conns
                .get_mut(slot as usize)
                .and_then(|c| c.identity.as_deref_mut())
            {
                crate::ws::recovery::restart(id, t);
            }
        }
        let frame = crate::ws::codec::herald_v1::resync(topic);
        let slots: Vec<u32> = self
            .topics
            .subscribers(t)
            .iter()
            .copied()
            .filter(|slot| !self.stomp.contains_key(slot))
            .collect();
        for slot in slots {
            self.push_or_close(slot, &[&frame]);
        }
    }

    /// Asks again for topics whose acks have waited [`HELD_ACK_RETRY`] while the engine is
    /// up (the answer was lost to a full inbox); while it is down, the broker keeps the
    /// question until it is back.
    pub(super) fn retry_held_acks(&mut self, now: Instant) {
        if self.held_acks.is_empty()
            || !self
                .hub
                .broker
                .engine()
                .is_some_and(|e| e.up.load(Ordering::Relaxed))
        {
            return;
        }
        let due: Vec<(u32, Box<str>)> = self
            .held_acks
            .iter_mut()
            .filter(|(_, h)| now.duration_since(h.asked_at) >= HELD_ACK_RETRY)
            .map(|(k, h)| {
                h.asked_at = now;
                k.clone()
            })
            .collect();
        for (project, topic) in due {
            self.ask_when_subscribed(project, &topic);
        }
    }

    /// Takes a subscription (already removed from its connection's list) out of the topic
    /// index and fixes the position record of the connection whose slot moved into its place.
    /// The topic's last local unsubscribe withdraws the shard's interest; a publication
    /// already routed here still arrives and finds no subscriber.
    pub(super) fn release_sub(&mut self, sub: Sub) {
        match self.topics.unsubscribe(sub) {
            Unsubscribed::Remaining(Some(moved)) => {
                if let Some(m) = self.conns.get_mut(moved as usize)
                    && let Some(rec) = m.subs.iter_mut().find(|s| s.topic == sub.topic)
                {
                    rec.pos = sub.pos;
                }
            }
            Unsubscribed::Remaining(None) => {}
            Unsubscribed::Last { project, name } => {
                self.hub
                    .broker
                    .unsubscribe(self.id as usize, project, &name);
            }
        }
    }

    /// Queues one piece regardless of phase and cap.
    fn push_part(&mut self, slot: u32, part: OutPart) {
        let c = &mut self.conns[slot as usize];
        if c.sockjs && !part.more && !part.started {
            // A whole frame of a SockJS session, in SockJS framing (a close becomes two).
            let mut frames = crate::ws::sockjs::wrap(&[&part.bytes])
                .into_iter()
                .peekable();
            let f = c.flight();
            while let Some(bytes) = frames.next() {
                f.out_bytes += bytes.len();
                self.dirty.queued_bytes += bytes.len();
                let more = frames.peek().is_some();
                f.out.push_back(OutPart {
                    bytes,
                    more,
                    started: false,
                });
            }
        } else {
            let f = c.flight();
            f.out_bytes += part.bytes.len();
            self.dirty.queued_bytes += part.bytes.len();
            f.out.push_back(part);
        }
        if !c.dirty && !c.want_write {
            c.dirty = true;
            self.dirty.slots.push(slot);
        }
    }

    /// After a connection opened (`rose`) or closed: logs the 90%-of-cap warnings once per
    /// rise, and their re-arming below 80% (see [`crate::protection::limiter::cap_rose`]).
    pub(super) fn watch_caps(&self, node: usize, p: &Project, in_project: usize, rose: bool) {
        let check = if rose {
            crate::protection::limiter::cap_rose
        } else {
            crate::protection::limiter::cap_fell
        };
        let scopes = [
            (
                None,
                node,
                self.hub.max_connections,
                &self.hub.near_cap_warned,
            ),
            (
                Some(&*p.id),
                in_project,
                p.max_connections,
                &p.near_cap_warned,
            ),
        ];
        for (project, count, cap, warned) in scopes {
            if !check(count, cap, warned) {
                continue;
            }
            let key = match project {
                None => "server.max_connections",
                Some(_) => "projects[].max_connections",
            };
            if rose {
                warn!(
                    project,
                    connections = count,
                    cap,
                    "connections at 90% of {key}; at the cap handshakes get 503"
                );
            } else {
                info!(
                    project,
                    connections = count,
                    cap,
                    "connections back below 80% of {key}"
                );
            }
        }
    }
}

impl ShardHost<'_> {
    fn generation(&self) -> u32 {
        self.shard.conns[self.slot as usize].generation
    }
}

impl Host for ShardHost<'_> {
    fn conn(&mut self) -> &mut Conn {
        &mut self.shard.conns[self.slot as usize]
    }

    fn rules(&self) -> &Rules {
        &self.shard.rules
    }

    fn conn_id(&self) -> ConnId {
        ConnId {
            shard: self.shard.id,
            slot: self.slot,
            generation: self.generation(),
        }
    }

    fn name_client(&mut self, ip: IpAddr) -> Option<bool> {
        let hub = &self.shard.hub;
        hub.registry
            .load()
            .access
            .permits(ip)
            .then(|| hub.ip_conns.admit_always(ip))
    }

    fn forwarded_client(&self, header: &str) -> Option<IpAddr> {
        self.shard.limits.proxies.forwarded_client(header)
    }

    fn take_handshake_token(&mut self, ip: IpAddr, at: Instant) -> Result<(), u32> {
        self.shard
            .hs_limiter
            .take(crate::protection::limiter::client_key(ip), at)
    }

    fn ip_limit(&self) -> usize {
        self.shard.hub.ip_conns.limit() as usize
    }

    fn project(&self, id: &str) -> Option<Arc<Project>> {
        self.shard.hub.registry.load().project(id).cloned()
    }

    fn verify(&self, project: &Project, token: &str) -> Result<Verified, AuthError> {
        project.verify(token)
    }

    fn node_connections(&self) -> (usize, usize) {
        let hub = &self.shard.hub;
        (
            hub.nr_connections.load(Ordering::Relaxed),
            hub.max_connections,
        )
    }

    fn draining(&self) -> bool {
        self.shard.draining
    }

    fn set_phase(&mut self, to: ConnPhase) {
        self.shard.set_phase(self.slot, Some(to));
    }

    fn outcome(&mut self, outcome: HandshakeOutcome) {
        self.shard.stats.handshake(outcome);
    }

    fn refused(&mut self, r: &Refusal, at: Instant) {
        let outcome = r.outcome();
        let s = &mut *self.shard;
        s.stats.handshake(outcome);
        let peer = s.conns[self.slot as usize].peer;
        // A flood of refusals is one line in full and a summary per interval (the sweep
        // logs it); each one is still there at debug.
        if s.refusals.note(at, outcome.label(), true) {
            info!(
                %peer,
                status = r.status,
                error = r.error,
                reason = %r.message,
                "handshake refused (further refusals in the next {} s are summed up in one line)",
                super::REFUSAL_LOG_EVERY.as_secs()
            );
        } else {
            debug!(
                %peer,
                status = r.status,
                error = r.error,
                reason = %r.message,
                "handshake refused"
            );
        }
    }

    fn denied(&mut self, peer: SocketAddr) {
        self.shard.refused_at_accept(peer, AcceptRefusal::Denied);
    }

    fn opened(&mut self) {
        let id = self.conn_id();
        let s = &mut *self.shard;
        let project = s.conns[self.slot as usize]
            .identity
            .as_ref()
            .expect("an open connection has its identity")
            .project
            .clone();
        let p = project.idx as usize;
        if s.by_project.len() <= p {
            s.by_project.resize_with(p + 1, Default::default);
        }
        s.by_project[p].insert(self.slot);
        let node = s.hub.nr_connections.fetch_add(1, Ordering::Relaxed) + 1;
        s.stats.connections.fetch_add(1, Ordering::Relaxed);
        let in_project = project.nr_connections.fetch_add(1, Ordering::Relaxed) + 1;
        s.watch_caps(node, &project, in_project, true);
        debug!(conn = %id, "connection open");
    }

    fn closing(&mut self, reason: CloseReason) {
        let stats = &self.shard.stats;
        ShardStats::add(&stats.closes[reason.counter_index()], 1);
        if reason == CloseReason::SlowConsumer {
            ShardStats::add(&stats.slow_consumer_closes, 1);
        }
    }

    fn send(&mut self, frame: &[&Bytes]) -> Push {
        let s = &mut *self.shard;
        let cap = s.limits.max_outbound_queue_bytes;
        super::welcome::behind(&mut s.held_welcomes, self.slot, frame, cap)
            .unwrap_or_else(|| push_frame(&mut s.conns, &mut s.dirty, self.slot, frame, cap))
    }

    fn stomp(&mut self) -> Option<&mut stomp::Session> {
        self.shard.stomp.get_mut(&self.slot).map(|s| &mut **s)
    }

    fn start_stomp(&mut self, session: Box<stomp::Session>) {
        self.shard.stomp.insert(self.slot, session);
    }

    fn send_raw(&mut self, part: OutPart) {
        self.shard.push_part(self.slot, part);
    }

    fn truncate_out(&mut self) {
        let s = &mut *self.shard;
        if let Some(c) = s.conns.get_mut(self.slot as usize) {
            s.dirty.dequeued(c.truncate_out());
        }
    }

    fn flush(&mut self) {
        self.shard.flush(self.slot);
    }

    fn kill(&mut self) {
        self.shard.kill(self.slot);
    }

    fn arm_close_deadline(&mut self, at: Instant) {
        let generation = self.generation();
        let at = self.shard.clock_ms(at);
        self.shard.close_deadlines.push_back(Deadline {
            at,
            slot: self.slot,
            generation,
        });
    }

    fn arm_expiry(&mut self, at: u32) {
        let generation = self.generation();
        self.shard.push_expiry(at, self.slot, generation);
    }

    fn subscribe(&mut self, project: u32, topic: &str) -> Sub {
        self.shard.subscribe_slot(project, topic, self.slot)
    }

    fn release(&mut self, sub: Sub) {
        self.shard.release_sub(sub);
    }

    fn hold_until_subscribed(&mut self, project: u32, topic: &str, ack: &Bytes) -> bool {
        self.shard.hold_ack(self.slot, project, topic, ack)
    }

    fn welcome_waits_for(&mut self, project: u32, topic: &str) -> bool {
        self.shard.welcome_waits_for(self.slot, project, topic)
    }

    fn hold_welcome(&mut self, welcome: &Bytes) -> bool {
        self.shard.hold_welcome(self.slot, welcome)
    }

    fn welcome_read(&mut self, welcome: Bytes) {
        self.shard.welcome_read(self.slot, welcome);
    }

    fn lookup(&self, project: u32, topic: &str) -> Option<TopicId> {
        self.shard.topics.lookup(project, topic)
    }

    fn topic_name(&self, topic: TopicId) -> &str {
        self.shard.topics.name(topic)
    }

    fn history(&self) -> &crate::history::History {
        &self.shard.hub.history
    }

    fn fetches_history(&self) -> bool {
        self.shard.hub.broker.engine().is_some()
    }

    fn fetch_history(&mut self, project: u32, then: machine::Fetch) {
        let generation = self.generation();
        self.shard
            .fetch_history(self.slot, generation, project, then);
    }

    fn publish(&mut self, project: u32, topic: &Topic, data: &RawValue) -> Result<(), String> {
        let s = &*self.shard;
        s.hub
            .publish(project, std::slice::from_ref(topic), data)
            .map(|_| ShardStats::add(&s.stats.published, 1))
            .map_err(|e| e.to_string())
    }
}

/// Subscribes waiting for their topic's stream to be read from the engine
/// ([`Shard::fetch_history`]).
#[derive(Debug, Default)]
pub(crate) struct Fetches {
    /// The next subscribe's number.
    next: u64,
    /// (slot, generation, subscribe) by number.
    waiting: HashMap<u64, (u32, u32, machine::Fetch)>,
}
