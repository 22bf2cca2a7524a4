//! One connection's state as its shard holds it: the life phase, the identity, the
//! subscriptions, the frame-layer and limiter state, and the outbound queue of shared frames.
//! Data only: the connection machine (`super::machine`) runs the protocol over it, and the
//! shard's I/O driver (`crate::shard`) reads and writes the socket.
//!
//! An idle connection owns no read buffer and no timer. Per-connection buffers, and the fields
//! that only matter while something is in flight ([`InFlight`]), exist only while a partial
//! frame, a fragmented message or a queued frame is in flight.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use slab::Slab;
use smallvec::SmallVec;
use thin_vec::ThinVec;

use super::codec::{Codec, stomp};
use super::session::Session;
use super::sockjs;
use crate::auth::Project;
use crate::pubsub::{Sub, TopicId};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnPhase {
    /// Waiting for the upgrade request.
    Handshake,
    /// Authenticated; receives messages.
    Open,
    /// Our close frame (or refusal) is queued; waiting for the peer or the deadline.
    Closing,
}

/// Identity of an authenticated connection.
pub struct Identity {
    /// Its project.
    pub project: Arc<Project>,
    /// Token `sub`.
    pub user: Box<str>,
    /// Token `device`.
    pub device: Option<Box<str>>,
    /// Token `topics` (subscription allowlist); `None` = any topic.
    pub topics: Option<Box<[Box<str>]>>,
    /// `kid` of the key that verified the token (revoking it disconnects).
    pub kid: Option<Arc<str>>,
    /// Connect time, ms since the epoch.
    pub connected_at: u64,
    /// Its topics with history ([`crate::ws::recovery`]); empty without. One pointer and no
    /// allocation while empty, which keeps the box in mimalloc's 96-byte class.
    pub history: ThinVec<Mark>,
}

/// A topic with history on a connection ([`crate::ws::recovery`]).
#[derive(Debug)]
pub struct Mark {
    /// The topic.
    pub topic: TopicId,
    /// Deliveries at or below this offset are not live for the connection: it got them from
    /// the store, or they came before its subscription, or it was told it could not have them.
    pub floor: u64,
    /// While the implicit topics are held after the welcome: the epoch the welcome told.
    pub held: Option<Arc<str>>,
}

/// A connection's subscriptions: the two implicit ones (`all`, `user.<sub>`) inline, in the
/// space a `Vec` header takes, so an idle connection allocates nothing for them.
pub type Subs = SmallVec<[Sub; 2]>;

/// One connection's state, owned by its shard.
pub struct Conn {
    /// The socket, owned by the connection: registered with the shard's epoll instance at
    /// accept, closed when the connection is removed.
    pub fd: i32,
    /// Generation of this occupant of the slot.
    pub generation: u32,
    /// Life phase.
    pub phase: ConnPhase,
    /// Set to end the connection (the shard's ready loop then removes it).
    pub kill: bool,
    /// The socket buffer is full; the connection waits for writability.
    pub want_write: bool,
    /// In the shard's dirty list.
    pub dirty: bool,
    /// Kill once the outbound queue is empty (after a refusal or a close echo).
    pub kill_after_flush: bool,
    /// A heartbeat ping is unanswered.
    pub ping_outstanding: bool,
    /// A whole frame arrived since the last heartbeat ping (bytes of a frame that never
    /// completes do not count: a peer trickling one does not stay alive by it).
    pub rx_since_ping: bool,
    /// `peer` is the client (not a trusted proxy yet to name it), and the connection is
    /// counted against its address (`limits.connections_per_ip`).
    pub client_known: bool,
    /// When counted, the address already held `limits.connections_per_ip` connections: the
    /// handshake is answered 429 (decided in arrival order, at accept).
    pub over_ip_limit: bool,
    /// A handshake token of the client's address was taken for this connection (at accept,
    /// or when its request was read if the bucket was empty at accept).
    pub hs_charged: bool,
    /// The connection is a SockJS session: what is queued to it is wrapped in SockJS
    /// framing (`super::sockjs`), and its messages arrive wrapped.
    pub sockjs: bool,
    /// Number of implicit subscriptions at the front of `subs`.
    pub nr_implicit: u8,
    /// The client protocol the connection speaks (chosen at the handshake).
    pub codec: Codec,
    /// Error replies so far (saturating: 16 bits keep `Conn` in its size budget).
    pub bad_requests: u16,
    /// What is in flight (partial input, a fragmented message, queued output); `None` while
    /// idle ([`Conn::settle`]).
    pub flight: Option<Box<InFlight>>,
    /// Message rate limit: the theoretical arrival time of the next message on the shard's
    /// microsecond clock (GCRA; a token bucket in four bytes).
    pub msg_tat: u32,
    /// `refresh` rate limit: the theoretical arrival time of the next refresh on the shard's
    /// millisecond clock (GCRA, like `msg_tat`).
    pub refresh_tat: u32,
    /// Peer address.
    pub peer: SocketAddr,
    /// Set once authenticated.
    pub identity: Option<Box<Identity>>,
    /// Subscriptions (implicit first).
    pub subs: Subs,
    /// When the token expires, seconds since the epoch (exp + leeway; see `expiry_of`);
    /// 0 = never.
    pub expires_at: u32,
}

impl Conn {
    /// A connection that has not sent its upgrade request yet.
    pub fn new(fd: i32, generation: u32, peer: SocketAddr) -> Self {
        Self {
            fd,
            generation,
            phase: ConnPhase::Handshake,
            kill: false,
            want_write: false,
            dirty: false,
            kill_after_flush: false,
            ping_outstanding: false,
            rx_since_ping: false,
            client_known: false,
            over_ip_limit: false,
            hs_charged: false,
            sockjs: false,
            nr_implicit: 0,
            codec: Codec::default(),
            bad_requests: 0,
            flight: None,
            msg_tat: 0,
            refresh_tat: 0,
            peer,
            identity: None,
            subs: Subs::new(),
            expires_at: 0,
        }
    }

    /// The in-flight state, made if the connection was idle.
    pub fn flight(&mut self) -> &mut InFlight {
        self.flight.get_or_insert_with(Box::default)
    }

    /// Bytes queued and not yet written.
    pub fn out_bytes(&self) -> usize {
        self.flight.as_ref().map_or(0, |f| f.out_bytes)
    }

    /// Takes the unconsumed input out (empty if none).
    pub fn take_inbuf(&mut self) -> Vec<u8> {
        self.flight
            .as_mut()
            .map(|f| std::mem::take(&mut f.inbuf))
            .unwrap_or_default()
    }

    /// Keeps `buf` as the unconsumed input (an unallocated one keeps nothing).
    pub fn set_inbuf(&mut self, buf: Vec<u8>) {
        if buf.capacity() > 0 || self.flight.is_some() {
            self.flight().inbuf = buf;
            self.settle();
        }
    }

    /// Takes the frame-layer state out (a fresh one if idle).
    pub fn take_session(&mut self) -> Session {
        self.flight
            .as_mut()
            .map(|f| std::mem::take(&mut f.session))
            .unwrap_or_default()
    }

    /// Puts the frame-layer state back.
    pub fn set_session(&mut self, session: Session) {
        if !session.is_idle() || self.flight.is_some() {
            self.flight().session = session;
            self.settle();
        }
    }

    /// Frees the in-flight state once nothing is in flight any more.
    pub fn settle(&mut self) {
        if self.flight.as_ref().is_some_and(|f| f.is_idle()) {
            self.flight = None;
        }
    }

    /// Drops the queued frames that have not started to go out; a started frame is kept whole.
    /// Answers the bytes dropped.
    pub(crate) fn truncate_out(&mut self) -> usize {
        let Some(f) = self.flight.as_deref_mut() else {
            return 0;
        };
        let keep = match f.out.front() {
            Some(p) if f.out_head > 0 || p.started => f
                .out
                .iter()
                .position(|p| !p.more)
                .map_or(f.out.len(), |i| i + 1),
            _ => 0,
        };
        f.out.truncate(keep);
        let before = f.out_bytes;
        f.out_bytes = f.out.iter().map(|p| p.bytes.len()).sum::<usize>() - f.out_head as usize;
        if f.out.is_empty() {
            f.out = VecDeque::new();
        }
        let dropped = before - f.out_bytes;
        self.settle();
        dropped
    }
}

/// The part of a connection's state that only matters while something is in flight, boxed
/// so an idle connection pays one pointer for it. Made by the first byte of a partial
/// request or frame, or the first queued frame; freed ([`Conn::settle`]) when the queue is
/// written, the input consumed and no fragmented message is being reassembled. Each time a
/// connection goes from idle to busy this costs one small allocation beside the queue's own.
#[derive(Default)]
pub struct InFlight {
    /// Unconsumed input (a partial request or frame).
    pub inbuf: Vec<u8>,
    /// Frames waiting to be written, in pieces.
    pub out: VecDeque<OutPart>,
    /// Bytes in `out` not yet written.
    pub out_bytes: usize,
    /// Bytes of `out[0]` already written.
    pub out_head: u32,
    /// Frame-layer state (a fragmented message being reassembled).
    pub session: Session,
}

impl InFlight {
    /// Nothing is in flight: no input kept, nothing queued, no message being reassembled.
    fn is_idle(&self) -> bool {
        self.inbuf.capacity() == 0 && self.out.is_empty() && self.session.is_idle()
    }
}

/// A piece of a queued frame. A frame may be queued as several pieces (a delivery's head and
/// the body that every topic of its publish shares), written with one vectored send.
#[derive(Debug, Clone)]
pub struct OutPart {
    /// The bytes.
    pub bytes: Bytes,
    /// The next piece continues this frame.
    pub more: bool,
    /// Earlier pieces of this frame are written: the frame must finish before anything is
    /// dropped from the queue.
    pub started: bool,
}

impl OutPart {
    /// A whole frame in one piece.
    pub(crate) fn whole(bytes: Bytes) -> Self {
        Self {
            bytes,
            more: false,
            started: false,
        }
    }
}

/// The connections of a shard queued to since the last flush, and the bytes waiting in all of
/// its connections' queues (the sum of their `out_bytes`, kept by every queue change so the
/// node's flow control reads one number per shard: [`crate::flow`]). Every change to a
/// connection's `out_bytes` on a shard goes through here: [`push_frame`] adds, the shard's
/// writes, truncations and removals call [`Dirty::dequeued`].
#[derive(Debug, Default)]
pub struct Dirty {
    /// Slots to flush at the end of the batch.
    pub slots: Vec<u32>,
    /// Bytes queued across the shard's connections.
    pub queued_bytes: usize,
}

impl Dirty {
    /// `n` queued bytes left a connection's queue (written, dropped, or the connection gone).
    pub fn dequeued(&mut self, n: usize) {
        debug_assert!(
            n <= self.queued_bytes,
            "{n} bytes dequeued of {} queued",
            self.queued_bytes
        );
        // Saturating: a miscount must not turn into a huge total that refuses every publish.
        self.queued_bytes = self.queued_bytes.saturating_sub(n);
    }
}

/// Result of queueing a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued.
    Queued,
    /// Not queued: the connection is not open.
    Dropped,
    /// Not queued: the queue is at its cap; the caller closes the connection with 4008.
    Overflow,
}

/// Queues a frame, given as its pieces in order, to an open connection without flushing (the
/// caller flushes the dirty list at the end of its batch). A free function so fan-out can
/// borrow the topic index alongside. A frame no larger than `cap` always fits an empty queue.
/// A SockJS session's frame is wrapped in SockJS framing first (made for this connection:
/// fan-out wraps its shared pieces once and queues them with [`push_framed`]).
pub fn push_frame(
    conns: &mut Slab<Conn>,
    dirty: &mut Dirty,
    slot: u32,
    parts: &[&Bytes],
    cap: usize,
) -> Push {
    if conns.get(slot as usize).is_some_and(|c| c.sockjs) {
        let wrapped = sockjs::wrap(parts);
        let refs: Vec<&Bytes> = wrapped.iter().collect();
        return push_framed(conns, dirty, slot, &refs, cap);
    }
    push_framed(conns, dirty, slot, parts, cap)
}

/// [`push_frame`] of pieces already in the connection's framing (SockJS or not).
pub fn push_framed(
    conns: &mut Slab<Conn>,
    dirty: &mut Dirty,
    slot: u32,
    parts: &[&Bytes],
    cap: usize,
) -> Push {
    let Some(c) = conns.get_mut(slot as usize) else {
        return Push::Dropped;
    };
    if c.phase != ConnPhase::Open {
        return Push::Dropped;
    }
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if c.out_bytes().saturating_add(len) > cap {
        return Push::Overflow;
    }
    let f = c.flight();
    f.out_bytes += len;
    dirty.queued_bytes += len;
    for (i, p) in parts.iter().enumerate() {
        f.out.push_back(OutPart {
            bytes: (*p).clone(),
            more: i + 1 < parts.len(),
            started: false,
        });
    }
    if !c.dirty && !c.want_write {
        c.dirty = true;
        dirty.slots.push(slot);
    }
    Push::Queued
}

/// Queues a publish's `MESSAGE` to each STOMP subscription of `topic` of the connection in
/// `slot`, whose conversation is `s`: the whole frame its subscription's head makes with the
/// publication's shared rest ([`StompHeads`]), queued by reference as one piece. `None`: the
/// connection has no STOMP subscription of the topic (an implicit topic it did not ask for).
#[allow(clippy::too_many_arguments)]
pub fn push_stomp_message(
    conns: &mut Slab<Conn>,
    dirty: &mut Dirty,
    slot: u32,
    s: &stomp::Session,
    topic: TopicId,
    heads: &mut StompHeads<'_>,
    cap: usize,
) -> Option<Push> {
    push_each(s, topic, |sub| match heads.frame(sub, s.version) {
        StompFrame::Whole(frame) => push_framed(conns, dirty, slot, &[&frame], cap),
        StompFrame::Head(head) => push_framed(conns, dirty, slot, &[&head, &heads.rest], cap),
    })
}

/// Runs `push` for each STOMP subscription of `topic` in `s`, stopping at the first frame
/// that is not queued; answers the last outcome (`None`: no such subscription).
fn push_each(
    s: &stomp::Session,
    topic: TopicId,
    mut push: impl FnMut(&stomp::Subscription) -> Push,
) -> Option<Push> {
    let mut pushed = None;
    for sub in s.subs.iter().filter(|sub| sub.topic == topic) {
        let p = push(sub);
        pushed = Some(p);
        if p != Push::Queued {
            break;
        }
    }
    pushed
}

/// The `MESSAGE` frames of one publication on one shard. A frame depends only on the
/// subscription's id, destination and ack mode and the session's version, which subscribers
/// share (stomp.js numbers its subscriptions `sub-0`, `sub-1`.. on every connection): each
/// distinct frame is made once per publication, whole (its head, then the headers, data and
/// NUL every subscriber shares), and queued by reference: one piece, one iovec and one
/// reference count per delivery, as few as a herald.v1 delivery takes.
pub struct StompHeads<'a> {
    message_id: &'a str,
    /// The rest of every frame in one piece: the shared headers, the data and the NUL.
    rest: Bytes,
    made: Vec<MadeHead>,
    /// The entry of `made` the previous delivery used, tried first.
    last: usize,
}

/// A frame of [`StompHeads`] and what it was made for.
struct MadeHead {
    id: Box<str>,
    destination: Box<str>,
    client_ack: bool,
    version: stomp::Version,
    frame: StompFrame,
}

/// A `MESSAGE` as queued.
#[derive(Clone)]
enum StompFrame {
    /// The whole frame.
    Whole(Bytes),
    /// Its head, followed by the publication's shared rest ([`StompHeads::rest`]).
    Head(Bytes),
}

impl<'a> StompHeads<'a> {
    /// Distinct frames kept per publication; further ones are made per subscriber.
    const MAX: usize = 32;
    /// Largest shared rest copied into each distinct frame. Above it a frame is queued as its
    /// head and the shared rest (two pieces), so a publication's data is copied at most once
    /// per shard; below it the copies (at most [`Self::MAX`]) cost less than the pieces.
    const MAX_WHOLE_REST_BYTES: usize = 16 * 1024;

    /// For the publication `message_id` whose shared rest (headers, data, NUL) is `shared`.
    pub fn new(message_id: &'a str, shared: &[Bytes; 3]) -> Self {
        StompHeads {
            message_id,
            rest: shared.concat().into(),
            made: Vec::new(),
            last: 0,
        }
    }

    fn frame(&mut self, sub: &stomp::Subscription, version: stomp::Version) -> StompFrame {
        let same = |m: &MadeHead| {
            m.client_ack == sub.client_ack
                && m.version == version
                && m.id == sub.id
                && m.destination == sub.destination
        };
        if let Some(m) = self.made.get(self.last).filter(|m| same(m)) {
            return m.frame.clone();
        }
        if let Some(i) = self.made.iter().position(same) {
            self.last = i;
            return self.made[i].frame.clone();
        }
        let head = stomp::message_head(sub, version, self.message_id, self.rest.len());
        if self.made.len() >= Self::MAX {
            return StompFrame::Head(head);
        }
        let frame = if self.rest.len() <= Self::MAX_WHOLE_REST_BYTES {
            StompFrame::Whole([&head[..], &self.rest[..]].concat().into())
        } else {
            StompFrame::Head(head)
        };
        self.last = self.made.len();
        self.made.push(MadeHead {
            id: sub.id.clone(),
            destination: sub.destination.clone(),
            client_ack: sub.client_ack,
            version,
            frame: frame.clone(),
        });
        frame
    }
}

/// [`push_stomp_message`] for a SockJS session: each subscription's head is made in SockJS
/// framing, and `rest` is the shared rest, escaped once per publish
/// ([`sockjs::Delivery::stomp_rest`]).
#[allow(clippy::too_many_arguments)]
pub fn push_sockjs_stomp_message(
    conns: &mut Slab<Conn>,
    dirty: &mut Dirty,
    slot: u32,
    s: &stomp::Session,
    topic: TopicId,
    rest: &Bytes,
    message_id: &str,
    cap: usize,
) -> Option<Push> {
    push_each(s, topic, |sub| {
        let text = stomp::message_head_text(sub, s.version, message_id);
        let head = sockjs::opened_head(&text, rest.len());
        push_framed(conns, dirty, slot, &[&head, rest], cap)
    })
}

/// When a token with `exp` stops being valid (`exp + leeway`), as the seconds since the epoch
/// a connection stores in 32 bits (enough until 2106, saturating beyond); 0 = never.
pub(crate) fn expiry_of(exp: Option<u64>, leeway_secs: u64) -> u32 {
    exp.map_or(0, |e| {
        u32::try_from(e.saturating_add(leeway_secs))
            .unwrap_or(u32::MAX)
            .max(1)
    })
}

/// One GCRA step on a wrapping 32-bit clock: an event may happen when its theoretical
/// arrival time `tat` is at most `tolerance` ahead of `now`; each event moves it on by
/// `interval`. A `tat` further ahead than `tolerance + interval` can never be reached by the
/// limiter, so it is stale (the connection was quiet long enough for the clock to lap it) and
/// counts as `now`; the sweep refreshes such times long before the clock wraps.
///
/// # Errors
/// Over the limit: how long until the event would be allowed, in clock units.
pub(crate) fn gcra_take(tat: &mut u32, now: u32, interval: u32, tolerance: u32) -> Result<(), u32> {
    let stale = tolerance.saturating_add(interval);
    let at = if tat.wrapping_sub(now) > stale {
        now
    } else {
        *tat
    };
    let ahead = at.wrapping_sub(now);
    if ahead > tolerance {
        return Err(ahead - tolerance);
    }
    *tat = at.wrapping_add(interval);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_conn(conns: &mut Slab<Conn>) -> u32 {
        let mut c = Conn::new(-1, 1, "127.0.0.1:1".parse().unwrap());
        c.phase = ConnPhase::Open;
        conns.insert(c) as u32
    }

    /// Each STOMP subscription of the topic gets a frame of its own, queued whole: one piece
    /// (one iovec, one reference) per delivery, its head then the shared headers, data and NUL.
    #[test]
    fn a_stomp_message_is_one_piece_per_subscription() {
        let mut conns = Slab::new();
        let mut dirty = Dirty::default();
        let slot = open_conn(&mut conns);
        let sub = |id: &str, topic| stomp::Subscription {
            id: id.into(),
            topic,
            destination: "/topic/news".into(),
            client_ack: false,
        };
        let s = stomp::Session {
            subs: vec![sub("a", 3), sub("b", 4), sub("c", 3)],
            ..stomp::Session::default()
        };
        let shared = news_shared();
        let push = |conns: &mut Slab<Conn>, dirty: &mut Dirty, topic| {
            let mut heads = StompHeads::new("m", &shared);
            push_stomp_message(conns, dirty, slot, &s, topic, &mut heads, 1 << 20)
        };
        let pushed = push(&mut conns, &mut dirty, 3);
        assert_eq!(pushed, Some(Push::Queued));
        let out = &conns[slot as usize].flight.as_ref().expect("queued").out;
        assert_eq!(out.len(), 2, "two frames of one piece each");
        for (piece, id) in out.iter().zip(["a", "c"]) {
            assert!(!piece.more);
            let text = String::from_utf8_lossy(&piece.bytes[2..]).into_owned();
            assert_eq!(
                text,
                format!(
                    "MESSAGE\nsubscription:{id}\ndestination:/topic/news\nmessage-id:m\n\
                     content-type:application/json\ncontent-length:7\n\n{{\"x\":1}}\0"
                )
            );
            assert_eq!(
                usize::from(piece.bytes[1]),
                piece.bytes.len() - 2,
                "frame length"
            );
        }
        assert_eq!(
            dirty.queued_bytes,
            out.iter().map(|p| p.bytes.len()).sum::<usize>()
        );
        let none = push(&mut conns, &mut dirty, 5);
        assert_eq!(none, None, "no subscription of the topic");
    }

    /// Past the size up to which the shared rest is copied into each distinct frame, a
    /// delivery is its head and the publication's rest, the same piece for every subscriber.
    #[test]
    fn a_large_stomp_message_shares_its_rest_by_reference() {
        let mut conns = Slab::new();
        let mut dirty = Dirty::default();
        let data = Bytes::from(vec![b'7'; StompHeads::MAX_WHOLE_REST_BYTES]);
        let shared = [
            stomp::message_shared("m", data.len()),
            data.clone(),
            stomp::NUL.clone(),
        ];
        let mut heads = StompHeads::new("m", &shared);
        let slots: Vec<u32> = (0..2).map(|_| open_conn(&mut conns)).collect();
        for (&slot, id) in slots.iter().zip(["sub-0", "sub-1"]) {
            let s = news_session(id);
            let pushed =
                push_stomp_message(&mut conns, &mut dirty, slot, &s, 3, &mut heads, 1 << 20);
            assert_eq!(pushed, Some(Push::Queued));
        }
        let out_of = |slot: u32| &conns[slot as usize].flight.as_ref().expect("queued").out;
        let (a, b) = (out_of(slots[0]), out_of(slots[1]));
        assert_eq!((a.len(), b.len()), (2, 2), "a head and the rest");
        assert_eq!(a[1].bytes.as_ptr(), b[1].bytes.as_ptr(), "one rest, shared");
        assert!(a[0].more && !a[1].more);
        let whole: Vec<u8> = a.iter().flat_map(|p| p.bytes.to_vec()).collect();
        let rest = shared.concat();
        assert!(whole.ends_with(&rest));
        assert!(whole[4..].starts_with(b"MESSAGE\nsubscription:sub-0\n"));
    }

    /// A STOMP session with one subscription `id` to `/topic/news` (topic 3).
    fn news_session(id: &str) -> stomp::Session {
        stomp::Session {
            subs: vec![stomp::Subscription {
                id: id.into(),
                topic: 3,
                destination: "/topic/news".into(),
                client_ack: false,
            }],
            ..stomp::Session::default()
        }
    }

    /// The shared rest of a `MESSAGE` of message `m` with data `{"x":1}`.
    fn news_shared() -> [Bytes; 3] {
        [
            stomp::message_shared("m", 7),
            Bytes::from_static(b"{\"x\":1}"),
            stomp::NUL.clone(),
        ]
    }

    #[test]
    fn subscribers_with_the_same_subscription_share_one_head_per_publication() {
        let mut conns = Slab::new();
        let mut dirty = Dirty::default();
        let shared = news_shared();
        let mut heads = StompHeads::new("m", &shared);
        let slots: Vec<u32> = (0..3).map(|_| open_conn(&mut conns)).collect();
        for (&slot, id) in slots.iter().zip(["sub-0", "sub-0", "sub-1"]) {
            let s = news_session(id);
            let pushed =
                push_stomp_message(&mut conns, &mut dirty, slot, &s, 3, &mut heads, 1 << 20);
            assert_eq!(pushed, Some(Push::Queued));
        }
        let head = |slot: u32| {
            conns[slot as usize].flight.as_ref().expect("queued").out[0]
                .bytes
                .clone()
        };
        assert_eq!(
            head(slots[0]).as_ptr(),
            head(slots[1]).as_ptr(),
            "one head, shared"
        );
        assert_ne!(head(slots[0]).as_ptr(), head(slots[2]).as_ptr());
        assert!(
            head(slots[2])[2..]
                .starts_with(b"MESSAGE\nsubscription:sub-1\ndestination:/topic/news\n")
        );
        assert_eq!(head(slots[0]), head(slots[1]));
    }

    /// A SockJS session's `MESSAGE`: its own escaped head, then the publish's escaped rest by
    /// reference; the whole is the `a["..."]` frame of the plain `MESSAGE`.
    #[test]
    fn a_sockjs_stomp_message_is_an_escaped_head_and_the_shared_escaped_rest() {
        let mut conns = Slab::new();
        let mut dirty = Dirty::default();
        let slot = open_conn(&mut conns);
        conns[slot as usize].sockjs = true;
        let s = news_session("a");
        let shared = news_shared();
        let rest = sockjs::Delivery::default().stomp_rest(&shared);
        let pushed =
            push_sockjs_stomp_message(&mut conns, &mut dirty, slot, &s, 3, &rest, "m", 1 << 20);
        assert_eq!(pushed, Some(Push::Queued));
        let out = &conns[slot as usize].flight.as_ref().expect("queued").out;
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].bytes.as_ptr(), rest.as_ptr(), "shared, not copied");
        let whole: Vec<u8> = out.iter().flat_map(|p| p.bytes.to_vec()).collect();
        let plain = stomp::message_head(&s.subs[0], s.version, "m", 7 + 1 + shared[0].len());
        let expected = sockjs::wrap(&[&plain, &shared[0], &shared[1], &shared[2]]);
        assert_eq!(whole, expected[0].to_vec());
    }

    #[test]
    fn a_frame_of_the_cap_fits_an_empty_queue_and_no_more() {
        let mut conns = Slab::new();
        let mut dirty = Dirty::default();
        let slot = open_conn(&mut conns);
        let (head, body) = (Bytes::from_static(b"head"), Bytes::from(vec![b'x'; 96]));
        let push = |conns: &mut Slab<Conn>, dirty: &mut Dirty, cap| {
            push_frame(conns, dirty, slot, &[&head, &body], cap)
        };
        assert_eq!(push(&mut conns, &mut dirty, 99), Push::Overflow);
        assert_eq!(push(&mut conns, &mut dirty, 100), Push::Queued);
        assert_eq!(push(&mut conns, &mut dirty, 199), Push::Overflow);
        assert_eq!(push(&mut conns, &mut dirty, 200), Push::Queued);
        let c = conns[slot as usize].flight.as_ref().expect("queued");
        assert_eq!((c.out.len(), c.out_bytes), (4, 200));
        assert_eq!(dirty.queued_bytes, 200, "the shard's total follows");
        assert!(
            c.out[1].bytes.as_ptr() == body.as_ptr() && c.out[3].bytes.as_ptr() == body.as_ptr(),
            "the body is shared, not copied"
        );
    }

    #[test]
    fn truncation_keeps_every_piece_of_a_started_frame() {
        let mut conns = Slab::new();
        let mut dirty = Dirty::default();
        let slot = open_conn(&mut conns);
        let (head, body) = (Bytes::from_static(b"head"), Bytes::from_static(b"body"));
        for _ in 0..2 {
            push_frame(&mut conns, &mut dirty, slot, &[&head, &body], 1000);
        }
        let c = &mut conns[slot as usize];
        assert_eq!(c.truncate_out(), 16, "the bytes dropped");
        assert!(
            c.flight.is_none(),
            "nothing started: all dropped, nothing in flight"
        );
        for _ in 0..2 {
            push_frame(&mut conns, &mut dirty, slot, &[&head, &body], 1000);
        }
        let c = &mut conns[slot as usize];
        // The head of the first frame went out; its body must follow.
        let f = c.flight();
        f.out.pop_front();
        f.out[0].started = true;
        f.out_bytes -= 4;
        assert_eq!(c.truncate_out(), 8);
        let f = c.flight();
        assert_eq!((f.out.len(), f.out_bytes), (1, 4));
        assert_eq!(&f.out[0].bytes[..], b"body");
        // Half of a one-piece frame went out.
        f.out_head = 2;
        f.out[0].started = false;
        f.out_bytes = 2;
        c.truncate_out();
        let f = c.flight();
        assert_eq!((f.out.len(), f.out_bytes), (1, 2));
    }

    /// Exactly the burst back to back, then the wait until the next; a time the limiter
    /// could never have set counts as now; the clock may wrap.
    #[test]
    fn gcra_burst_wait_and_wrap() {
        for now in [1000, u32::MAX - 150] {
            let mut tat = now.wrapping_sub(5000);
            for _ in 0..3 {
                assert_eq!(gcra_take(&mut tat, now, 100, 200), Ok(()));
            }
            assert_eq!(gcra_take(&mut tat, now, 100, 200), Err(100));
            assert_eq!(gcra_take(&mut tat, now.wrapping_add(60), 100, 200), Err(40));
            assert_eq!(gcra_take(&mut tat, now.wrapping_add(100), 100, 200), Ok(()));
        }
        assert_eq!(expiry_of(None, 30), 0);
        assert_eq!(expiry_of(Some(1_000), 30), 1_030);
        assert_eq!(expiry_of(Some(1 << 40), 30), u32::MAX);
    }
}
