//! A shard: one OS thread pinned to one core, running one monoio runtime, owning a slab of
//! connections, a topic index, deadlines and counters. Nothing here is shared with another
//! thread except through the [`mailbox`] and the read-only [`Hub`].
//!
//! Four long-lived tasks per shard: the accept loop (its own SO_REUSEPORT listener), the ready
//! loop ([`io::ready_loop`]: the readiness of every connection, through one epoll instance),
//! the inbox loop (cross-core work, woken by an eventfd) and the sweep (one timer for the
//! whole shard: heartbeats, handshake and close deadlines, token expiry). A connection is a
//! slab entry woken by readiness: no task of its own, and no buffer while idle.

mod coalesce;
mod control;
mod driver;
pub mod fanout;
pub mod io;
pub mod mailbox;
mod refusals;
mod trim;
mod uring;
mod welcome;

pub(crate) use refusals::REFUSAL_LOG_EVERY;

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;
use tracing::{debug, info, warn};

use crate::config::IoDriver;
use crate::hub::Hub;
use crate::metrics::ShardStats;
use crate::pubsub::TopicIndex;
use crate::settings::Limits;
use crate::ws::close::CloseReason;
use crate::ws::codec::stomp;
use crate::ws::conn::{self, Conn, ConnPhase};
use crate::ws::handshake::HandshakeOutcome;
use crate::ws::machine::{self, Beat, CLOSE_GRACE, Rules};
use mailbox::{Inbox, ShardMsg};

/// Size of the per-shard read buffer every connection reads into.
pub const SCRATCH_BYTES: usize = 64 * 1024;
/// Inbox messages handled before other tasks get a turn.
const INBOX_BUDGET: usize = 1024;

/// A deadline for one connection occupant: 12 bytes, as every handshake holds one until its
/// timeout passes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    /// When, on the shard's wrapping millisecond clock ([`machine::Now::ms`]), rounded up.
    pub(crate) at: u32,
    pub(crate) slot: u32,
    pub(crate) generation: u32,
}

impl Deadline {
    /// The deadline has passed at `now_ms` (modulo 2^32: deadlines are never weeks ahead).
    pub(crate) fn due(&self, now_ms: u32) -> bool {
        now_ms.wrapping_sub(self.at) as i32 >= 0
    }
}

/// Everything one core owns.
pub struct Shard {
    /// This shard's id (also in every connection id it hands out).
    pub id: u16,
    /// Node-wide handle.
    pub hub: Arc<Hub>,
    /// Limits.
    pub limits: Limits,
    /// The connection machine's rules (from `limits`).
    pub(crate) rules: Rules,
    /// This shard's counters.
    pub stats: Arc<ShardStats>,
    /// Connections, by slot.
    pub(crate) conns: Slab<Conn>,
    /// The connections' readiness (epoll instance) and the killed ones awaiting removal.
    pub(crate) poller: io::Poller,
    /// Local subscriptions.
    pub(crate) topics: TopicIndex,
    /// Open connections per project (by registry index), in slot order: a listing of one
    /// project walks its own connections from the cursor, never the whole slab. A few bytes
    /// per connection (a B-tree of `u32`s).
    pub(crate) by_project: Vec<BTreeSet<u32>>,
    /// Next generation handed to a new occupant.
    next_generation: u32,
    /// Read buffer shared by every connection of the shard.
    pub(crate) scratch: Box<[u8]>,
    /// Slots with queued output to flush at the end of the current batch, and the bytes
    /// queued across the shard's connections.
    pub(crate) dirty: conn::Dirty,
    /// The ring a batch's sends are submitted to (`server.write_batch = "io_uring"`);
    /// `None`: one `sendmsg` per connection. Taken out while a batch is in flight.
    pub(crate) ring: Option<uring::WriteRing>,
    /// Holds a dense fan-out's write for more to share it (`server.write_coalesce_ms`).
    pub(crate) coalesce: coalesce::Coalesce,
    /// Handshakes in progress, in deadline order (the timeout is constant).
    pub(crate) handshake_deadlines: VecDeque<Deadline>,
    /// Connections waiting for the peer's close frame, in deadline order.
    pub(crate) close_deadlines: VecDeque<Deadline>,
    /// Token expiries: (close-at seconds, slot, generation). An entry is live while its
    /// occupant is open with that `expires_at`; the others (superseded by a refresh, or of a
    /// connection that left) are skipped when they fall due, and dropped all at once when they
    /// outnumber the connections ([`Shard::push_expiry`]), so the heap stays O(connections).
    pub(crate) expiries: BinaryHeap<Reverse<(u32, u32, u32)>>,
    /// Next slot the heartbeat sweep visits.
    hb_cursor: usize,
    /// Heartbeat visits owed but not yet made, in slot·milliseconds (below one interval's
    /// worth). Carrying the fraction keeps a small slab from being swept faster than once per
    /// interval.
    hb_carry: u128,
    /// Set by a drain: no more accepts, every connection closing.
    pub(crate) draining: bool,
    /// Wakes the accept loop (on drain) or the drain waiter (when empty).
    lifecycle_waker: Option<Waker>,
    /// Handshakes per source address (token buckets, bounded).
    pub(crate) hs_limiter: crate::protection::limiter::HandshakeLimiter,
    /// Start of the shard's wrapping microsecond and millisecond clocks (the connections'
    /// message and refresh limits).
    pub(crate) epoch: Instant,
    /// Connections in the handshake phase.
    pub(crate) pending_handshakes: usize,
    /// Handshakes evicted at the pending-handshake cap (a warning at most once per
    /// [`OVERLOAD_LOG_EVERY`]).
    evictions: Throttled,
    /// New sockets at the descriptor ceiling (its own warning, as often).
    fd_ceiling: Throttled,
    /// Refused handshakes of the current log interval (one line in full, then a summary).
    pub(crate) refusals: refusals::RefusalLog,
    /// The STOMP conversations of the STOMP connections, by slot (removed with the
    /// connection). Kept beside the slab so other connections pay nothing for them, and so
    /// fan-out on a shard without STOMP connections never looks.
    pub(crate) stomp: HashMap<u32, Box<stomp::Session>>,
    /// Subscribe acks waiting for the node's engine subscription of their topic (only with
    /// an engine), by (project, topic).
    pub(crate) held_acks: HashMap<(u32, Box<str>), HeldAcks>,
    /// The last subscription made on the shard was the shard's first of a topic whose
    /// engine subscription is new or still pending on the node (read by the ack of that
    /// subscription, [`Shard::hold_ack`]).
    pub(crate) awaits_engine: bool,
    /// Welcomes waiting for the engine subscriptions of their connection's implicit topics
    /// (only with an engine), by slot ([`welcome`]).
    pub(crate) held_welcomes: HashMap<u32, welcome::HeldWelcome>,
    /// Subscribes waiting for their topic's stream to be read from the engine.
    pub(crate) fetches: driver::Fetches,
    /// Gives the memory freed by the arrays' growth back to the OS ([`trim`]).
    trim: trim::Trim,
}

/// Subscribe acks held for one topic ([`Shard::held_acks`]).
#[derive(Debug)]
pub(crate) struct HeldAcks {
    /// When the broker was last asked to tell the shard.
    pub(crate) asked_at: Instant,
    /// (slot, generation, ack frame) of each connection waiting.
    pub(crate) acks: Vec<(u32, u32, bytes::Bytes)>,
    /// (slot, generation) of each connection whose welcome waits for the topic.
    pub(crate) welcomes: Vec<(u32, u32)>,
}

/// Expiry-heap entries allowed beyond twice the shard's connections before the stale ones
/// are dropped (keeps a nearly empty shard from compacting on every push).
const EXPIRY_SLACK: usize = 64;

/// Gives back a deadline queue's room once it is mostly empty (a burst of handshakes fills
/// it for one timeout, then it drains): above 1,024 entries of room and under a quarter
/// used, it shrinks to twice its length.
fn shrink_idle(q: &mut VecDeque<Deadline>) {
    if q.capacity() > 1024 && q.len() < q.capacity() / 4 {
        q.shrink_to(q.len() * 2);
    }
}

/// Least time between two warnings about handshakes evicted at the pending cap.
const OVERLOAD_LOG_EVERY: Duration = Duration::from_secs(10);

/// Descriptors above the client ceiling (of the API's reserve, `api.max_connections` + 256)
/// a new socket may hold while the handshake evicted for it closes.
const CEILING_SLACK: u64 = 64;

/// Events of one kind, warned about at most once per [`OVERLOAD_LOG_EVERY`].
#[derive(Debug, Default)]
struct Throttled {
    logged: Option<Instant>,
    unlogged: u64,
}

impl Throttled {
    /// Counts one event; when a warning is due, the events it covers.
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self
            .logged
            .is_some_and(|at| now.duration_since(at) < OVERLOAD_LOG_EVERY)
        {
            return None;
        }
        self.logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Why a socket is closed at accept, unread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcceptRefusal {
    /// Refused by `[access]`.
    Denied,
    /// The address is at its connection ceiling.
    AddressCeiling,
    /// The address holds `limits.max_pending_handshakes_per_ip` handshakes in progress.
    AddressPending,
    /// The shard has its share of `limits.max_pending_handshakes` in progress and none of
    /// them can be evicted.
    PendingCap,
    /// The socket's descriptor is among those kept for the API ([`crate::system::hostcheck::client_fd_ceiling`]).
    FdReserve,
}

impl AcceptRefusal {
    /// The outcome counted in `herald_handshakes_total`.
    fn outcome(self) -> HandshakeOutcome {
        match self {
            Self::Denied => HandshakeOutcome::Forbidden,
            Self::AddressCeiling | Self::AddressPending => HandshakeOutcome::RateLimited,
            Self::PendingCap | Self::FdReserve => HandshakeOutcome::AtCapacity,
        }
    }

    /// The reason in the refusal log's summary.
    fn reason(self) -> &'static str {
        match self {
            Self::Denied => "closed_unread_denied",
            Self::AddressCeiling => "closed_unread_address_ceiling",
            Self::AddressPending => "closed_unread_address_pending",
            Self::PendingCap => "closed_unread_pending_cap",
            Self::FdReserve => "closed_unread_fd_reserve",
        }
    }
}

/// A socket that passed the checks at accept, from a client (not a trusted proxy).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Admitted {
    /// The address already holds `limits.connections_per_ip` connections: the handshake is
    /// to be answered 429.
    over_ip_limit: bool,
    /// A handshake token of the address was taken at accept.
    charged: bool,
}

impl Shard {
    fn new(id: u16, hub: Arc<Hub>, limits: Limits, poller: io::Poller) -> Self {
        let stats = hub.stats[id as usize].clone();
        let hs_limiter = crate::protection::limiter::HandshakeLimiter::new(
            limits.handshakes_per_ip_per_sec,
            limits.handshake_burst_per_ip,
            limits.limiter_max_ips,
        );
        let ring = match limits.write_batch {
            crate::config::WriteBatch::IoUring => uring::WriteRing::new(id),
            crate::config::WriteBatch::Sendmsg => None,
        };
        let coalesce = coalesce::Coalesce::new(limits.write_coalesce);
        Self {
            id,
            hub,
            rules: driver::rules(&limits),
            limits,
            stats,
            conns: Slab::new(),
            poller,
            topics: TopicIndex::default(),
            by_project: Vec::new(),
            next_generation: 1,
            scratch: vec![0; SCRATCH_BYTES].into_boxed_slice(),
            dirty: conn::Dirty::default(),
            ring,
            coalesce,
            handshake_deadlines: VecDeque::new(),
            close_deadlines: VecDeque::new(),
            expiries: BinaryHeap::new(),
            hb_cursor: 0,
            hb_carry: 0,
            draining: false,
            lifecycle_waker: None,
            hs_limiter,
            epoch: Instant::now(),
            pending_handshakes: 0,
            evictions: Throttled::default(),
            fd_ceiling: Throttled::default(),
            refusals: refusals::RefusalLog::default(),
            stomp: HashMap::new(),
            held_acks: HashMap::new(),
            held_welcomes: HashMap::new(),
            awaits_engine: false,
            fetches: driver::Fetches::default(),
            trim: trim::Trim::default(),
        }
    }

    /// The checks on a freshly accepted socket that cost no read: the global IP lists, a
    /// handshake token of the address (taken here, so a socket that never sends a request,
    /// or is refused below, costs one too), the per-address connection ceiling and
    /// pending-handshake limit. A trusted proxy's peer is checked once it names the client
    /// ([`crate::protection::proxy`]). `Ok(None)`: a trusted proxy, not counted.
    fn screen(&mut self, peer: SocketAddr) -> Result<Option<Admitted>, AcceptRefusal> {
        let ip = peer.ip();
        if self.limits.proxies.trusts(ip) {
            return Ok(None);
        }
        if !self.hub.registry.load().access.permits(ip) {
            return Err(AcceptRefusal::Denied);
        }
        let charged = self
            .hs_limiter
            .take(crate::protection::limiter::client_key(ip), Instant::now())
            .is_ok();
        match self.hub.ip_conns.admit(ip) {
            Err(crate::protection::limiter::AddressFull::Ceiling) => {
                Err(AcceptRefusal::AddressCeiling)
            }
            Err(crate::protection::limiter::AddressFull::Pending) => {
                Err(AcceptRefusal::AddressPending)
            }
            Ok(over_ip_limit) => Ok(Some(Admitted {
                over_ip_limit,
                charged,
            })),
        }
    }

    /// Makes room for one more handshake at this shard's share of
    /// `limits.max_pending_handshakes`: the oldest handshake in progress (the front of the
    /// deadline queue, which is in accept order) is closed unread. False when the cap is
    /// reached and nothing can be evicted.
    fn make_room(&mut self) -> bool {
        let cap = self.limits.max_pending_handshakes;
        if cap == 0 || self.pending_handshakes < cap {
            return true;
        }
        if !self.evict_oldest_handshake() {
            return false;
        }
        if let Some(evicted) = self.evictions.note(Instant::now()) {
            warn!(
                shard = self.id,
                pending = self.pending_handshakes,
                evicted,
                "handshakes in progress at this shard's share of \
                 limits.max_pending_handshakes; closing the oldest to make room"
            );
        }
        self.pending_handshakes < cap
    }

    /// Makes room for a new socket whose descriptor `fd` is at or above the client ceiling
    /// `max` (the descriptors above are the API's): the oldest handshake in progress is closed
    /// for it, as at the pending-handshake cap, so idle unauthenticated sockets cannot hold
    /// every client descriptor. False (close the new socket) when there is none, or when the
    /// new socket's descriptor is past the slack the closing one is allowed.
    fn make_room_at_fd_ceiling(&mut self, fd: u64, max: u64) -> bool {
        let evicted = fd < max.saturating_add(CEILING_SLACK) && self.evict_oldest_handshake();
        if let Some(n) = self.fd_ceiling.note(Instant::now()) {
            warn!(
                shard = self.id,
                new_sockets = n,
                pending = self.pending_handshakes,
                "open descriptors near RLIMIT_NOFILE, the rest are kept for the API \
                 (api.max_connections); for each new socket the oldest handshake in progress \
                 is closed, or the new socket when there is none"
            );
        }
        evicted
    }

    /// Closes the oldest handshake in progress unread; false when there is none.
    fn evict_oldest_handshake(&mut self) -> bool {
        while let Some(d) = self.handshake_deadlines.pop_front() {
            let live = self
                .occupant(d.slot, d.generation)
                .is_some_and(|c| c.phase == ConnPhase::Handshake && !c.kill);
            if !live {
                continue;
            }
            self.set_phase(d.slot, Some(ConnPhase::Closing));
            self.kill(d.slot);
            self.stats.handshake(HandshakeOutcome::Evicted);
            self.refusals
                .note(Instant::now(), HandshakeOutcome::Evicted.label(), false);
            return true;
        }
        false
    }

    /// Counts and logs a socket closed at accept (or, for a client a trusted proxy names in
    /// a PROXY header, as soon as it is named).
    pub(crate) fn refused_at_accept(&mut self, peer: SocketAddr, why: AcceptRefusal) {
        self.stats.handshake(why.outcome());
        self.refusals.note(Instant::now(), why.reason(), false);
        let what = match why {
            AcceptRefusal::Denied => "address refused by [access]",
            AcceptRefusal::AddressCeiling => {
                "address over its connection ceiling (limits.connections_per_ip + \
                 handshake_burst_per_ip)"
            }
            AcceptRefusal::AddressPending => {
                "address holds limits.max_pending_handshakes_per_ip handshakes in progress"
            }
            AcceptRefusal::PendingCap => {
                "handshakes in progress at this shard's share of limits.max_pending_handshakes"
            }
            AcceptRefusal::FdReserve => {
                "open descriptors near RLIMIT_NOFILE, the rest are kept for the API \
                 (api.max_connections)"
            }
        };
        debug!(shard = self.id, %peer, "{what}; closed unread");
    }

    /// Logs the summary of refused handshakes when its interval is over (`force`: now).
    fn log_refusals(&mut self, force: bool) {
        if let Some(s) = self.refusals.due(Instant::now(), force) {
            info!(
                shard = self.id,
                more = s.more,
                reasons = %s.reasons,
                interval_secs = refusals::REFUSAL_LOG_EVERY.as_secs(),
                "handshakes refused and not logged one by one (the first of the interval \
                 is; RUST_LOG=herald=debug logs each)"
            );
        }
    }

    /// Takes a freshly accepted socket: a slot, a generation, a handshake deadline.
    /// `admitted`: the peer is the client, counted against its address.
    fn admit(&mut self, fd: i32, peer: SocketAddr, admitted: Option<Admitted>) -> (u32, u32) {
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let mut conn = Conn::new(fd, generation, peer);
        if let Some(a) = admitted {
            conn.client_known = true;
            conn.over_ip_limit = a.over_ip_limit;
            conn.hs_charged = a.charged;
        }
        let slot = self.conns.insert(conn) as u32;
        self.set_phase(slot, Some(ConnPhase::Handshake));
        self.handshake_deadlines.push_back(Deadline {
            at: self.clock_ms(Instant::now() + self.limits.handshake_timeout),
            slot,
            generation,
        });
        if self.conns.capacity() != self.trim.conns()
            && self.conns.capacity() >= trim::PROMPT_SLAB_ENTRIES
        {
            // The slab just doubled: its old copy, the largest array freed, goes back now
            // rather than at the next tick (once per doubling, not per connection).
            self.give_back_memory();
        }
        (slot, generation)
    }

    /// Handles one inbox message.
    fn handle(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Publish(p) => self.deliver(&p),
            ShardMsg::RevokeKey { project, kid } => self.revoke_key(project, &kid),
            ShardMsg::Drain => self.start_drain(),
            ShardMsg::List { query, reply } => {
                let _ = reply.send(self.list(&query));
            }
            ShardMsg::Kick {
                slot,
                generation,
                project,
                reply,
            } => {
                let _ = reply.send(self.kick(slot, generation, project));
            }
            ShardMsg::Subscribed { project, topic } => self.release_acks(project, topic),
            ShardMsg::Resync { project, topic } => self.resync(project, &topic),
            ShardMsg::Fetched { token } => self.fetched(token),
            ShardMsg::DisconnectUser {
                project,
                user,
                reply,
            } => {
                let _ = reply.send(self.disconnect_user(project, &user));
            }
        }
    }

    /// Queues a publication's frames to every local subscriber.
    fn deliver(&mut self, p: &mailbox::Publication) {
        ShardStats::add(&self.stats.publications, 1);
        let cap = self.limits.max_outbound_queue_bytes;
        let mut overflow = Vec::new();
        // Connections whose implicit topics are held past the hold (`ws::recovery`).
        let mut resume = Vec::new();
        let (mut delivered, mut dropped) = (0u64, 0u64);
        // STOMP's shared pieces, made on the shard's first STOMP subscriber of the publish.
        let mut stomp_shared = None;
        // No lookup at all on a shard without STOMP connections.
        let any_stomp = !self.stomp.is_empty();
        // SockJS framing of the publish's pieces, made on its first SockJS subscriber.
        let mut sockjs = crate::ws::sockjs::Delivery::default();
        for (i, (topic, head)) in p.heads.iter().enumerate() {
            let Some(t) = self.topics.lookup(p.project, topic) else {
                continue;
            };
            let frame = [head, &p.body];
            let mut sockjs_frame = None;
            // A topic with history: each connection takes only offsets past its floor.
            let offset = p.offsets.get(i).copied().unwrap_or(0);
            for &slot in self.topics.subscribers(t) {
                if offset > 0
                    && let Some(id) = self
                        .conns
                        .get(slot as usize)
                        .and_then(|c| c.identity.as_deref())
                    && !crate::ws::recovery::live(id, t, offset)
                {
                    if crate::ws::recovery::hold_over(id, crate::hub::now_ms()) {
                        resume.push(slot);
                    }
                    continue;
                }
                let stomp = if any_stomp {
                    self.stomp.get(&slot)
                } else {
                    None
                };
                let in_sockjs = self.conns.get(slot as usize).is_some_and(|c| c.sockjs);
                let pushed = if let Some(queued) =
                    welcome::behind(&mut self.held_welcomes, slot, &frame, cap)
                {
                    Some(queued)
                } else if let Some(s) = stomp {
                    let (shared, heads) = stomp_shared.get_or_insert_with(|| {
                        let shared = p.stomp_parts();
                        let heads = conn::StompHeads::new(&p.id, &shared);
                        (shared, heads)
                    });
                    let (conns, dirty) = (&mut self.conns, &mut self.dirty);
                    if in_sockjs {
                        let rest = sockjs.stomp_rest(shared);
                        conn::push_sockjs_stomp_message(conns, dirty, slot, s, t, &rest, &p.id, cap)
                    } else {
                        conn::push_stomp_message(conns, dirty, slot, s, t, heads, cap)
                    }
                } else if in_sockjs {
                    let [h, rest] = sockjs_frame
                        .get_or_insert_with(|| sockjs.herald_v1(head, &p.body))
                        .clone();
                    Some(conn::push_framed(
                        &mut self.conns,
                        &mut self.dirty,
                        slot,
                        &[&h, &rest],
                        cap,
                    ))
                } else {
                    Some(conn::push_framed(
                        &mut self.conns,
                        &mut self.dirty,
                        slot,
                        &frame,
                        cap,
                    ))
                };
                match pushed {
                    None => {}
                    Some(conn::Push::Queued) => delivered += 1,
                    Some(conn::Push::Dropped) => dropped += 1,
                    Some(conn::Push::Overflow) => {
                        dropped += 1;
                        overflow.push(slot);
                    }
                }
            }
        }
        ShardStats::add(&self.stats.delivered, delivered);
        ShardStats::add(&self.stats.dropped, dropped);
        self.coalesce.fanned_out(delivered as usize);
        let lag = p.accepted_at.elapsed();
        self.stats.publish_enqueue.observe(lag);
        self.stats.delivery_lag_us.store(
            u64::try_from(lag.as_micros()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        for slot in overflow {
            self.close_with(slot, CloseReason::SlowConsumer);
        }
        if !resume.is_empty() {
            resume.dedup();
            let now = self.now();
            for slot in resume {
                machine::resume(&mut self.host(slot), now);
            }
        }
    }

    /// Closes with 4003 every open connection of `project` verified by key `kid`.
    fn revoke_key(&mut self, project: u32, kid: &str) {
        let slots: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.phase == ConnPhase::Open
                    && c.identity.as_ref().is_some_and(|id| {
                        id.project.idx == project && id.kid.as_deref() == Some(kid)
                    })
            })
            .map(|(k, _)| k as u32)
            .collect();
        for &slot in &slots {
            self.close_with(slot, CloseReason::Kicked);
        }
        if !slots.is_empty() {
            info!(
                shard = self.id,
                kid,
                closed = slots.len(),
                "closed connections of a revoked key"
            );
        }
        self.flush_dirty();
    }

    fn start_drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        let slots: Vec<u32> = self.conns.iter().map(|(k, _)| k as u32).collect();
        for slot in slots {
            match self.conns[slot as usize].phase {
                ConnPhase::Open => self.close_with(slot, CloseReason::GoingAway),
                ConnPhase::Handshake => self.kill(slot),
                ConnPhase::Closing => {}
            }
        }
        self.flush_dirty();
        self.wake_lifecycle();
    }

    fn wake_lifecycle(&mut self) {
        if let Some(w) = self.lifecycle_waker.take() {
            w.wake();
        }
    }

    /// Called when a connection leaves the slab.
    pub(crate) fn on_removed(&mut self) {
        if self.draining && self.conns.is_empty() {
            self.wake_lifecycle();
        }
    }

    /// The sweep: deadlines, expiries and one slice of the heartbeat round.
    fn tick(&mut self, tick: Duration) {
        // Liveness for the watchdog (crate::system::notify): this shard's loop is still turning.
        ShardStats::add(&self.stats.sweeps, 1);
        #[cfg(debug_assertions)]
        if let Some(path) = std::env::var_os(TEST_PANIC_FILE_ENV)
            && std::fs::read_to_string(path).is_ok_and(|t| t.trim() == self.id.to_string())
        {
            panic!("shard {} panics as {TEST_PANIC_FILE_ENV} asks", self.id);
        }
        self.stats.pending_handshakes.store(
            self.pending_handshakes as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let now = self.now();
        while let Some(d) = self.handshake_deadlines.front().copied() {
            if !d.due(now.ms) {
                break;
            }
            self.handshake_deadlines.pop_front();
            if self.occupant(d.slot, d.generation).is_some() {
                machine::on_handshake_deadline(&mut self.host(d.slot));
            }
        }
        while let Some(d) = self.close_deadlines.front().copied() {
            if !d.due(now.ms) {
                break;
            }
            self.close_deadlines.pop_front();
            if self.occupant(d.slot, d.generation).is_some() {
                machine::on_close_deadline(&mut self.host(d.slot));
            }
        }
        // A burst of handshakes or closes leaves its room in the queues once it is over, and
        // connections that left take their expiry entries' worth with them.
        shrink_idle(&mut self.handshake_deadlines);
        shrink_idle(&mut self.close_deadlines);
        self.bound_expiries();
        while let Some(&Reverse((at, slot, generation))) = self.expiries.peek() {
            if u64::from(at) > now.unix_secs() {
                break;
            }
            self.expiries.pop();
            if self.occupant(slot, generation).is_some() {
                machine::on_expiry(&mut self.host(slot), now, at);
            }
        }
        self.stats.expiry_entries.store(
            self.expiries.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.retry_held_acks(now.at);
        self.heartbeat_slice(tick, now);
        self.flush_dirty();
        self.log_refusals(false);
        self.give_back_memory();
    }

    /// After a tick or a doubling of the connection slab: if the shard's arrays changed size
    /// since it last did, asks the allocator to return what they freed ([`trim`]).
    fn give_back_memory(&mut self) {
        let now = trim::Footprint {
            conns: self.conns.capacity(),
            topics: self.topics.nr_topics().next_power_of_two(),
            deadlines: self.handshake_deadlines.capacity() + self.close_deadlines.capacity(),
            expiries: self.expiries.capacity(),
        };
        if let Some(took) = self.trim.after_tick(now) {
            let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            ShardStats::add(&self.stats.allocator_collects, 1);
            ShardStats::add(&self.stats.allocator_collect_us, us);
            debug!(shard = self.id, us, "freed memory returned to the OS");
        }
    }

    /// Queues a token-expiry check for the occupant of `slot` (whose `expires_at` is `at`).
    pub(crate) fn push_expiry(&mut self, at: u32, slot: u32, generation: u32) {
        self.expiries.push(Reverse((at, slot, generation)));
        self.bound_expiries();
    }

    /// Keeps the expiry heap within `2 × connections + EXPIRY_SLACK` entries: beyond that it
    /// is rebuilt from its live entries (at most one per connection), so each rebuild follows
    /// at least as many pushes as it keeps entries (amortised O(log n) a push), and neither
    /// churn nor a refresh loop grows it past O(open connections).
    fn bound_expiries(&mut self) {
        if self.expiries.len() <= 2 * self.conns.len() + EXPIRY_SLACK {
            return;
        }
        let conns = &self.conns;
        let mut live: Vec<Reverse<(u32, u32, u32)>> = std::mem::take(&mut self.expiries)
            .into_vec()
            .into_iter()
            .filter(|Reverse((at, slot, generation))| {
                conns.get(*slot as usize).is_some_and(|c| {
                    c.generation == *generation && c.expires_at == *at && c.phase == ConnPhase::Open
                })
            })
            .collect();
        // A refresh back to an earlier `exp` (A, B, A) leaves two live copies of one entry.
        live.sort_unstable();
        live.dedup();
        live.shrink_to_fit();
        self.expiries = BinaryHeap::from(live);
    }

    /// Visits the next `capacity × tick / heartbeat` slots, so each slot is visited once per
    /// heartbeat interval: a peer that sent nothing since the last ping is dropped, the others
    /// are pinged.
    fn heartbeat_slice(&mut self, tick: Duration, now: machine::Now) {
        let cap = self.conns.capacity();
        if cap == 0 {
            return;
        }
        // `cap × tick / heartbeat` visits per tick, the remainder carried to the next tick.
        // (Rounding each tick up to at least one visit swept a slab smaller than
        // `heartbeat / tick` slots several times per interval: peers were pinged more often
        // than the welcome's `heartbeat` says and dropped if they took longer than a fraction
        // of it to answer.)
        let hb_ms = self.limits.heartbeat.as_millis().max(1);
        self.hb_carry += cap as u128 * tick.as_millis();
        let per_tick = (self.hb_carry / hb_ms) as usize;
        self.hb_carry %= hb_ms;
        let mut dead = Vec::new();
        for _ in 0..per_tick.min(cap) {
            let slot = self.hb_cursor % cap;
            self.hb_cursor = (slot + 1) % cap;
            let Some(c) = self.conns.get_mut(slot) else {
                continue;
            };
            match machine::heartbeat(c, &self.rules, now) {
                Beat::Skip => {}
                Beat::Dead => dead.push(slot as u32),
                Beat::Ping => {
                    // Implicit topics still held after the welcome: the client did not ask
                    // to recover them, so what was held follows now.
                    machine::resume(&mut self.host(slot as u32), now);
                    let _ = conn::push_frame(
                        &mut self.conns,
                        &mut self.dirty,
                        slot as u32,
                        &[&crate::ws::frame::ping()],
                        usize::MAX,
                    );
                    // SockJS clients count only SockJS traffic: an `h` too.
                    if self.conns[slot].sockjs {
                        let _ = conn::push_framed(
                            &mut self.conns,
                            &mut self.dirty,
                            slot as u32,
                            &[&crate::ws::sockjs::HEARTBEAT],
                            usize::MAX,
                        );
                    }
                    // STOMP clients count only STOMP traffic: those that asked for
                    // heart-beats get an EOL too.
                    if self.stomp.get(&(slot as u32)).is_some_and(|s| s.beats) {
                        let _ = conn::push_frame(
                            &mut self.conns,
                            &mut self.dirty,
                            slot as u32,
                            &[&stomp::heart_beat()],
                            usize::MAX,
                        );
                    }
                }
            }
        }
        for slot in dead {
            debug!(shard = self.id, slot, "no answer to heartbeat; dropping");
            self.kill(slot);
        }
    }

    /// `at` on the shard's wrapping millisecond clock, rounded up (a deadline never fires
    /// early).
    pub(crate) fn clock_ms(&self, at: Instant) -> u32 {
        // Wrapping on purpose, like `Now::ms`.
        at.saturating_duration_since(self.epoch)
            .as_micros()
            .div_ceil(1000) as u32
    }

    /// The connection in `slot` if it still has `generation`.
    pub(crate) fn occupant(&self, slot: u32, generation: u32) -> Option<&Conn> {
        self.conns
            .get(slot as usize)
            .filter(|c| c.generation == generation)
    }
}

/// Future resolving when the shard starts draining (for the accept loop) or, once draining,
/// when it has no connection left.
struct Lifecycle<'a> {
    shard: &'a RefCell<Shard>,
    want_empty: bool,
}

impl Future for Lifecycle<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.shard.borrow_mut();
        let done = if self.want_empty {
            s.conns.is_empty()
        } else {
            s.draining
        };
        if done {
            return Poll::Ready(());
        }
        s.lifecycle_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// What a shard thread needs to start.
pub struct ShardSpec {
    /// Shard id.
    pub id: u16,
    /// Node handle.
    pub hub: Arc<Hub>,
    /// Limits.
    pub limits: Limits,
    /// The bound (SO_REUSEPORT) listener.
    pub listener: std::net::TcpListener,
    /// Its inbox.
    pub inbox: Inbox,
    /// Core to pin to.
    pub core: Option<core_affinity::CoreId>,
    /// Driver choice.
    pub driver: IoDriver,
    /// Told once the runtime runs and the shard accepts.
    pub ready: std::sync::mpsc::Sender<Result<u16, String>>,
}

/// Starts a shard thread.
///
/// # Errors
/// The thread could not be spawned.
pub fn spawn(spec: ShardSpec) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("herald-shard-{}", spec.id))
        .spawn(move || {
            if let Some(core) = spec.core
                && !core_affinity::set_for_current(core)
            {
                warn!(
                    shard = spec.id,
                    core = core.id,
                    "could not pin shard thread to its core"
                );
            }
            let ready = spec.ready.clone();
            let id = spec.id;
            // A dead shard fails the node instead of leaving it half alive. The guard is made
            // inside each runtime's closure, after the runtime, so a panic fails the node
            // before the runtime drops its tasks and with them this shard's inbox: a publish
            // never finds the inbox gone while the node still takes publishes.
            let hub = spec.hub.clone();
            let fail_first = move || FailNode { hub, id };
            let result = match spec.driver {
                IoDriver::Legacy => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                    .enable_timer()
                    .build()
                    .map(|mut rt| {
                        let _failure = fail_first();
                        rt.block_on(run(spec))
                    }),
                IoDriver::Auto => {
                    if id == 0 && !monoio::utils::detect_uring() {
                        warn!(
                            "io_uring is not available here; shards fall back to the epoll driver"
                        );
                    }
                    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                        .with_entries(4096)
                        .enable_timer()
                        .build()
                        .map(|mut rt| {
                            let _failure = fail_first();
                            rt.block_on(run(spec))
                        })
                }
            };
            if let Err(e) = result {
                let _ = ready.send(Err(format!("shard {id}: cannot start runtime: {e}")));
            }
        })
}

/// Fails the node when a shard thread ends by a panic (see [`Hub::shard_failed`]).
struct FailNode {
    hub: Arc<Hub>,
    id: u16,
}

impl Drop for FailNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                shard = self.id,
                "shard thread panicked (message above); the node is no longer ready, drains the \
                 other shards and exits with status 70 for its supervisor to restart it"
            );
            self.hub.shard_failed(self.id as usize);
        }
    }
}

/// Test-only (debug builds): the file named by this variable holding a shard's id makes that
/// shard panic at its next sweep, so tests can check how the node fails. Release builds ignore
/// it.
#[cfg(debug_assertions)]
pub const TEST_PANIC_FILE_ENV: &str = "HERALD_TEST_PANIC_FILE";

async fn run(spec: ShardSpec) {
    let ShardSpec {
        id,
        hub,
        limits,
        listener,
        inbox,
        ready,
        ..
    } = spec;
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("shard {id}: listener: {e}")));
            return;
        }
    };
    let poller = match io::Poller::new() {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err(format!("shard {id}: epoll instance: {e}")));
            return;
        }
    };
    let drain_timeout = limits.drain_timeout;
    let tick = limits.tick();
    let shard = Rc::new(RefCell::new(Shard::new(id, hub, limits, poller)));
    monoio::spawn(io::ready_loop(shard.clone()));
    monoio::spawn(inbox_loop(shard.clone(), inbox));
    monoio::spawn(sweep_loop(shard.clone(), tick));
    let _ = ready.send(Ok(id));
    accept_loop(&shard, &listener).await;
    drop(listener);
    let waiter = Lifecycle {
        shard: &shard,
        want_empty: true,
    };
    monoio::select! {
        _ = waiter => debug!(shard = id, "drained"),
        _ = monoio::time::sleep(drain_timeout) => {
            let left = shard.borrow().conns.len();
            info!(shard = id, left, "drain timeout; dropping the remaining connections");
            // Drop the rest: the ready loop removes each and closes its socket.
            // (Returning with them still open left their sockets open for as long as the
            // process lived, and for ever in an in-process server.)
            let slots: Vec<u32> = shard.borrow().conns.iter().map(|(k, _)| k as u32).collect();
            for slot in slots {
                shard.borrow_mut().kill(slot);
            }
            let empty = Lifecycle {
                shard: &shard,
                want_empty: true,
            };
            monoio::select! {
                _ = empty => {}
                _ = monoio::time::sleep(CLOSE_GRACE) => {}
            }
        }
    }
    // Whatever is left (a connection killed as the grace ran out) is removed here, its socket
    // closed.
    let left: Vec<(u32, u32)> = shard
        .borrow()
        .conns
        .iter()
        .map(|(k, c)| (k as u32, c.generation))
        .collect();
    for (slot, generation) in left {
        shard.borrow_mut().remove(slot, generation);
    }
    shard.borrow_mut().log_refusals(true);
    // Under io_uring, monoio closes a dropped socket with a `Close` op that is only queued;
    // the runtime submits it when it next parks. Park once more before returning, or the
    // sockets dropped last are never closed: their peers wait for EOF until the process
    // exits, and an in-process server leaks them.
    monoio::time::sleep(Duration::from_millis(1)).await;
}

async fn accept_loop(shard: &Rc<RefCell<Shard>>, listener: &monoio::net::TcpListener) {
    let mut backoff_logged = false;
    loop {
        let stop = Lifecycle {
            shard,
            want_empty: false,
        };
        let accepted = monoio::select! {
            r = listener.accept() => Some(r),
            _ = stop => None,
        };
        match accepted {
            None => return,
            Some(Ok((stream, peer))) => {
                backoff_logged = false;
                let fd = stream.as_raw_fd() as u64;
                let ceiling = shard.borrow().limits.max_client_fd.filter(|max| fd >= *max);
                // A refused peer costs no read, no buffer and no slot; its socket is closed
                // without an answer.
                let mut s = shard.borrow_mut();
                let admitted = s.screen(peer).and_then(|a| {
                    let (room, why) = match ceiling {
                        Some(max) => (s.make_room_at_fd_ceiling(fd, max), AcceptRefusal::FdReserve),
                        None => (s.make_room(), AcceptRefusal::PendingCap),
                    };
                    if room {
                        Ok(a)
                    } else {
                        if a.is_some() {
                            s.hub.ip_conns.release(peer.ip(), true);
                        }
                        Err(why)
                    }
                });
                let admitted = match admitted {
                    Ok(admitted) => admitted,
                    Err(why) => {
                        s.refused_at_accept(peer, why);
                        drop(s);
                        drop(stream);
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // The connection owns the descriptor from here: the runtime lets go of it.
                let fd = stream.into_raw_fd();
                let (slot, generation) = s.admit(fd, peer, admitted);
                if let Err(e) = s.poller.add(fd, slot, generation) {
                    warn!(shard = s.id, error = %e, "cannot watch a new connection; dropping it");
                    s.kill(slot);
                }
            }
            Some(Err(e)) => {
                let out_of_fds = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                if out_of_fds {
                    if !backoff_logged {
                        warn!(
                            shard = shard.borrow().id,
                            error = %e,
                            "accept failed: out of file descriptors or memory; backing off \
                             (raise LimitNOFILE / fs.nr_open, see tuning/)"
                        );
                        backoff_logged = true;
                    }
                    monoio::time::sleep(Duration::from_millis(100)).await;
                } else {
                    debug!(error = %e, "accept failed");
                }
            }
        }
    }
}

async fn inbox_loop(shard: Rc<RefCell<Shard>>, inbox: Inbox) {
    let Some(waiter) = io::runtime_waiter(inbox.raw_fd(), "the inbox eventfd") else {
        return;
    };
    loop {
        if let Err(e) = waiter.readable(false).await {
            warn!("inbox wait failed: {e}");
            return;
        }
        inbox.disarm();
        let more = drain_inbox(&mut shard.borrow_mut(), &inbox);
        // A deep inbox coalesces by itself: only a drained one holds its write for more.
        let hold = if more {
            None
        } else {
            shard.borrow().coalesce.hold()
        };
        if let Some(wait) = hold {
            ShardStats::add(&shard.borrow().stats.coalesce_waits, 1);
            // The write waits, the inbox barely: senders stop waking the shard, but a
            // publisher that starts waiting for the inbox does, and what is taken then (its
            // publishers answered) joins the write, which goes out at the deadline, or at once
            // when a drain stops at its budget.
            let deadline = monoio::time::Instant::now() + wait;
            loop {
                inbox.hold_wakes();
                let woken = monoio::select! {
                    () = monoio::time::sleep_until(deadline) => false,
                    r = waiter.readable(false) => r.is_ok(),
                };
                // At the deadline too: a sender may have queued without its wake-up yet (the
                // API thread writes its wake-ups after its answers).
                inbox.disarm();
                if drain_inbox(&mut shard.borrow_mut(), &inbox) || !woken {
                    break;
                }
            }
        }
        shard.borrow_mut().flush_dirty();
    }
}

/// Handles what waits in the inbox, up to [`INBOX_BUDGET`] messages; `true` when it stopped
/// at the budget (the inbox then wakes its shard again, once other tasks have run).
fn drain_inbox(s: &mut Shard, inbox: &Inbox) -> bool {
    for _ in 0..INBOX_BUDGET {
        let Some(msg) = inbox.try_take() else {
            return false;
        };
        let nr_bytes = msg.nr_bytes();
        s.handle(msg);
        // What the message queued is in the shard's total before its bytes leave the
        // inbox's count: flow control never sees them in neither.
        s.store_queued_bytes();
        inbox.give_back(nr_bytes);
    }
    inbox.rearm();
    true
}

async fn sweep_loop(shard: Rc<RefCell<Shard>>, tick: Duration) {
    loop {
        monoio::time::sleep(tick).await;
        shard.borrow_mut().tick(tick);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deadline is 12 bytes (it was 24 with an `Instant`) and falls due across the wrap of
    /// the shard's millisecond clock.
    #[test]
    fn deadlines_are_small_and_fall_due_across_the_wrap() {
        assert_eq!(std::mem::size_of::<Deadline>(), 12);
        let d = |at| Deadline {
            at,
            slot: 0,
            generation: 0,
        };
        assert!(!d(1000).due(999));
        assert!(d(1000).due(1000));
        assert!(d(1000).due(1001));
        assert!(!d(5).due(u32::MAX - 10), "due 16 ms after the wrap");
        assert!(d(5).due(5));
        assert!(d(u32::MAX - 10).due(3), "passed just before the wrap");
    }

    #[test]
    fn each_warning_is_throttled_on_its_own() {
        let (mut evictions, mut ceiling) = (Throttled::default(), Throttled::default());
        let t0 = Instant::now();
        assert_eq!(evictions.note(t0), Some(1));
        assert_eq!(evictions.note(t0), None);
        assert_eq!(
            ceiling.note(t0),
            Some(1),
            "not held back by the eviction warning"
        );
        assert_eq!(evictions.note(t0 + OVERLOAD_LOG_EVERY), Some(2));
    }
}
