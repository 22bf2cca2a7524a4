//! The only cross-core API: a bounded inbox per shard plus an eventfd wake-up.
//!
//! The bound is two counters, of queued messages and of their publications' bytes, not the
//! channel's own: a sender first reserves room in both ([`Mailbox::try_reserve`]), then
//! sends, and a send on a reservation cannot fail for lack of room. A publish therefore
//! reserves on every target shard before it sends to any, so it reaches all of them or none.
//! The shard gives the room back as it takes each message.
//!
//! A sender pushes a [`ShardMsg`] and writes the eventfd only when the inbox was not already
//! armed, so a burst costs one syscall. The shard waits for the eventfd through the runtime
//! (an io_uring poll, or epoll on the legacy driver): it neither spins nor polls on a timer.
//!
//! A thread that sends many messages in a row (the API thread) may hold its eventfd writes
//! back ([`defer_wakes`]): a send then only arms the inbox, and the thread writes each armed
//! inbox's eventfd once, when its runtime has run what was ready ([`flush_deferred_wakes`]).
//! Its answers go out before the shards it woke take a core, and one wake-up carries every
//! message sent in the meantime.
//!
//! A publisher may wait for an inbox to be shallow again ([`Mailbox::shallow`]): the shard
//! tells the waiters when it takes the inbox down to [`SHALLOW_DEPTH`] messages.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;

use crate::ws::codec::stomp;
use crossbeam_channel::{Receiver, Sender};

/// One publish, encoded once and shared by every recipient on every shard. The frame for a
/// topic is its `head` followed by the shared `body`: the payload is held once however many
/// topics the publish names.
#[derive(Debug)]
pub struct Publication {
    /// Registry index of the project.
    pub project: u32,
    /// (topic, frame head) pairs: the WebSocket header and the JSON up to `"data":`.
    pub heads: Vec<(Box<str>, Bytes)>,
    /// The rest of every frame: the data, the id and the timestamp.
    pub body: Bytes,
    /// The message id.
    pub id: Box<str>,
    /// Bytes of `body` that are the data (a STOMP `MESSAGE`'s body is this prefix).
    pub data_len: usize,
    /// When `Hub::publish` accepted it (for the publish-to-enqueue histogram).
    pub accepted_at: std::time::Instant,
    /// The offset of each topic of `heads` in its history stream, 0 for a topic without
    /// history; empty when none has any.
    pub offsets: Box<[u64]>,
}

impl Publication {
    /// The pieces of a STOMP `MESSAGE` every subscriber shares: the headers after
    /// `destination`, the data (a slice of `body`, not a copy) and the closing NUL.
    pub fn stomp_parts(&self) -> [Bytes; 3] {
        [
            stomp::message_shared(&self.id, self.data_len),
            self.body.slice(..self.data_len),
            stomp::NUL.clone(),
        ]
    }

    /// The bytes it holds (its heads, topics and shared body), as an inbox counts them.
    pub fn nr_bytes(&self) -> usize {
        self.body.len()
            + self
                .heads
                .iter()
                .map(|(t, h)| t.len() + h.len())
                .sum::<usize>()
    }
}

/// Work for a shard.
#[derive(Debug)]
pub enum ShardMsg {
    /// Deliver to local subscribers.
    Publish(Arc<Publication>),
    /// Close (4003) every connection of `project` whose token was verified by key `kid`.
    RevokeKey {
        /// Registry index of the project.
        project: u32,
        /// The revoked key id.
        kid: std::sync::Arc<str>,
    },
    /// Stop accepting, close every connection with 1001, exit when empty or at the deadline.
    Drain,
    /// List open connections matching a filter, in slot order, after a cursor position.
    List {
        /// What to list.
        query: ListQuery,
        /// Where the shard answers (the API awaits it).
        reply: tokio::sync::oneshot::Sender<Vec<ConnInfo>>,
    },
    /// Close (4003) one connection if it is open, still has `generation` and, when `project`
    /// is set, belongs to that project. The shard answers what it did.
    Kick {
        /// Slab slot.
        slot: u32,
        /// Generation it must still have.
        generation: u32,
        /// Registry index the connection must belong to (a project key's own project).
        project: Option<u32>,
        /// Where the shard answers.
        reply: tokio::sync::oneshot::Sender<KickOutcome>,
    },
    /// The node now receives `topic` of `project` from every node (its engine subscription
    /// exists): the subscribe acks held for it go out.
    Subscribed {
        /// Registry index of the project.
        project: u32,
        /// The topic.
        topic: Box<str>,
    },
    /// The stream a subscribe waits for was read from the engine ([`crate::broker::Broker::fetch_history`]):
    /// the subscribe numbered `token` is answered.
    Fetched {
        /// The shard's number of the waiting subscribe.
        token: u64,
    },
    /// Close (4003) every open connection of `user` in `project`; answers how many.
    DisconnectUser {
        /// Registry index of the project.
        project: u32,
        /// Token `sub`.
        user: Box<str>,
        /// Where the shard answers.
        reply: tokio::sync::oneshot::Sender<usize>,
    },
    /// The node's engine subscription of `topic` of `project` was made again after the
    /// engine was away: messages may have been missed; tell the topic's subscribers.
    Resync {
        /// Registry index of the project.
        project: u32,
        /// The topic.
        topic: Box<str>,
    },
}

impl ShardMsg {
    /// The bytes it counts against an inbox's byte bound: a publication's, 0 for the rest
    /// (small, and bounded by the message count).
    pub fn nr_bytes(&self) -> usize {
        match self {
            Self::Publish(p) => p.nr_bytes(),
            _ => 0,
        }
    }
}

/// A filter for [`ShardMsg::List`].
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only this project (registry index).
    pub project: Option<u32>,
    /// Only connections subscribed (explicitly or implicitly) to this topic.
    pub topic: Option<Box<str>>,
    /// Only connections whose token `sub` is this.
    pub user: Option<Box<str>>,
    /// Only connections after this (slot, generation) position.
    pub after: Option<(u32, u32)>,
    /// Most connections to return.
    pub limit: usize,
}

/// One open connection, as listed by the API.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Its id.
    pub id: crate::pubsub::ConnId,
    /// Project id.
    pub project: Arc<str>,
    /// Token `sub`.
    pub user: Box<str>,
    /// Peer address.
    pub peer: std::net::SocketAddr,
    /// Connect time, ms since the epoch.
    pub connected_at: u64,
    /// Subscribed topics, implicit ones first.
    pub topics: Vec<Box<str>>,
}

/// What a [`ShardMsg::Kick`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickOutcome {
    /// The connection was open and is now closing with 4003.
    Closed,
    /// No open connection with that slot and generation.
    NotFound,
    /// The connection belongs to another project than the one required; nothing done.
    OtherProject,
}

/// State shared by the senders and the shard.
#[derive(Debug)]
struct Shared {
    /// The eventfd.
    efd: OwnedFd,
    /// True while a wake-up is pending; senders skip the eventfd write then.
    armed: AtomicBool,
    /// True while the shard holds a write ([`Inbox::hold_wakes`]): it looks at the inbox only
    /// at the hold's end, or when a publisher starts waiting for it ([`Mailbox::shallow`]).
    held: AtomicBool,
    /// True once the inbox is dropped (its shard has stopped): nothing sent arrives.
    gone: AtomicBool,
    /// Messages queued or reserved (the inbox's bound applies to this).
    queued: AtomicUsize,
    /// Most messages queued or reserved at once.
    capacity: usize,
    /// Bytes of the messages queued or reserved ([`ShardMsg::nr_bytes`]).
    queued_bytes: AtomicUsize,
    /// Most bytes queued or reserved at once (an empty inbox still takes one reservation of
    /// any size, so a publication larger than this is not refused forever).
    max_bytes: usize,
    /// Publishers waiting in [`Mailbox::shallow`]: the shard tells `shallow` only then.
    nr_waiting: AtomicUsize,
    /// Told when the inbox is taken down to [`SHALLOW_DEPTH`] while someone waits.
    shallow: tokio::sync::Notify,
}

/// The depth (messages queued or reserved) at or under which an inbox is shallow: a publisher
/// waiting in [`Mailbox::shallow`] goes on. Deeper, the shard has that many publishes to work
/// through before a new one, and each adds its time to the next one's delivery.
pub const SHALLOW_DEPTH: usize = 8;

/// The sending side, held by the hub (any thread).
#[derive(Debug, Clone)]
pub struct Mailbox {
    tx: Sender<ShardMsg>,
    shared: Arc<Shared>,
}

/// The receiving side, owned by the shard.
#[derive(Debug)]
pub struct Inbox {
    rx: Receiver<ShardMsg>,
    shared: Arc<Shared>,
}

/// Room for messages in one inbox, taken before sending ([`Mailbox::try_reserve`]). Room not
/// used by [`Reservation::send`] is given back when the reservation is dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    mailbox: &'a Mailbox,
    left: usize,
    left_bytes: usize,
}

impl Reservation<'_> {
    /// Queues `msg` on reserved room and wakes the shard.
    ///
    /// # Errors
    /// The shard is gone (its thread ended); the message is handed back.
    ///
    /// # Panics
    /// More sends (or bytes) than reserved (a bug in the caller).
    pub fn send(&mut self, msg: ShardMsg) -> Result<(), ShardMsg> {
        let nr_bytes = msg.nr_bytes();
        assert!(
            self.left > 0 && nr_bytes <= self.left_bytes,
            "send beyond the reservation"
        );
        self.left -= 1;
        self.left_bytes -= nr_bytes;
        self.mailbox
            .push(msg)
            .inspect_err(|_| self.mailbox.shared.give_back(1, nr_bytes))
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.left > 0 || self.left_bytes > 0 {
            self.mailbox.shared.give_back(self.left, self.left_bytes);
        }
    }
}

impl Shared {
    /// Frees room for `n` messages of `nr_bytes` bytes.
    fn give_back(&self, n: usize, nr_bytes: usize) {
        // SeqCst, like the waiter's count and check in `Mailbox::shallow`: either the shard
        // sees the waiter, or the waiter sees the room.
        let depth = self.queued.fetch_sub(n, Ordering::SeqCst) - n;
        if depth <= SHALLOW_DEPTH && self.nr_waiting.load(Ordering::SeqCst) > 0 {
            self.shallow.notify_waiters();
        }
        self.queued_bytes.fetch_sub(nr_bytes, Ordering::AcqRel);
    }
}

/// A bounded mailbox and its inbox: at most `capacity` messages and `max_bytes` bytes queued
/// or reserved.
///
/// # Errors
/// eventfd creation failed.
pub fn channel(capacity: usize, max_bytes: usize) -> std::io::Result<(Mailbox, Inbox)> {
    // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let efd = unsafe { OwnedFd::from_raw_fd(fd) };
    let shared = Arc::new(Shared {
        efd,
        armed: AtomicBool::new(false),
        held: AtomicBool::new(false),
        gone: AtomicBool::new(false),
        queued: AtomicUsize::new(0),
        capacity,
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        nr_waiting: AtomicUsize::new(0),
        shallow: tokio::sync::Notify::new(),
    });
    // Unbounded: the bound is `Shared::queued`, so a send on reserved room never fails.
    let (tx, rx) = crossbeam_channel::unbounded();
    Ok((
        Mailbox {
            tx,
            shared: shared.clone(),
        },
        Inbox { rx, shared },
    ))
}

impl Mailbox {
    /// Reserves room for `n` messages of `nr_bytes` bytes in all.
    ///
    /// # Errors
    /// Less than `n` messages or `nr_bytes` bytes free (bytes are always free in an inbox
    /// that holds none): nothing is reserved.
    pub fn try_reserve(&self, n: usize, nr_bytes: usize) -> Result<Reservation<'_>, Full> {
        let shared = &self.shared;
        take(&shared.queued, n, |cur| {
            cur.saturating_add(n) <= shared.capacity
        })?;
        take(&shared.queued_bytes, nr_bytes, |cur| {
            cur == 0 || cur.saturating_add(nr_bytes) <= shared.max_bytes
        })
        .inspect_err(|_| {
            shared.queued.fetch_sub(n, Ordering::AcqRel);
        })?;
        Ok(Reservation {
            mailbox: self,
            left: n,
            left_bytes: nr_bytes,
        })
    }

    /// Queues `msg` and wakes the shard.
    ///
    /// # Errors
    /// The inbox is full or the shard is gone; the message is handed back.
    pub fn send(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        match self.try_reserve(1, msg.nr_bytes()) {
            Ok(mut r) => r.send(msg),
            Err(Full) => Err(msg),
        }
    }

    /// Queues `msg` even over the bound (the drain order, one per shard, must not be lost).
    ///
    /// # Errors
    /// The shard is gone; the message is handed back.
    pub fn send_over_bound(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        let nr_bytes = msg.nr_bytes();
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        self.shared
            .queued_bytes
            .fetch_add(nr_bytes, Ordering::AcqRel);
        Reservation {
            mailbox: self,
            left: 1,
            left_bytes: nr_bytes,
        }
        .send(msg)
    }

    /// Queues on room already counted in `queued`.
    fn push(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.tx.send(msg).map_err(|e| e.into_inner())?;
        if !self.shared.armed.swap(true, Ordering::AcqRel) && !defer_wake(&self.shared) {
            wake(self.shared.efd.as_raw_fd());
        }
        Ok(())
    }

    /// Returns once the inbox holds at most [`SHALLOW_DEPTH`] messages (at once if it does),
    /// or its shard has stopped.
    pub async fn shallow(&self) {
        let shared = &self.shared;
        if shared.queued.load(Ordering::SeqCst) <= SHALLOW_DEPTH {
            return;
        }
        /// Counts a waiter for as long as it waits.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        shared.nr_waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&shared.nr_waiting);
        loop {
            let mut told = std::pin::pin!(shared.shallow.notified());
            // Registered before the check: a notification after it is not missed.
            told.as_mut().enable();
            if shared.queued.load(Ordering::SeqCst) <= SHALLOW_DEPTH
                || shared.gone.load(Ordering::Acquire)
            {
                return;
            }
            // A shard holding a write takes its inbox only at the hold's end: wake it now
            // (each time the publisher finds it still deep), so the publisher is answered at
            // the inbox's pace, not the hold's.
            if shared.held.load(Ordering::SeqCst) {
                wake(shared.efd.as_raw_fd());
            }
            told.await;
        }
    }

    /// Messages waiting (or reserved and about to be sent).
    pub fn depth(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// Most messages the inbox holds.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Bytes of the messages waiting (or reserved and about to be sent).
    pub fn depth_bytes(&self) -> usize {
        self.shared.queued_bytes.load(Ordering::Acquire)
    }

    /// Whether the shard has stopped (its inbox is dropped), so a refused send is not a
    /// full inbox.
    pub fn is_gone(&self) -> bool {
        self.shared.gone.load(Ordering::Acquire)
    }
}

/// Adds `n` to `counter` if `fits` the current value; all or nothing.
fn take(counter: &AtomicUsize, n: usize, fits: impl Fn(usize) -> bool) -> Result<(), Full> {
    let mut cur = counter.load(Ordering::Acquire);
    loop {
        if !fits(cur) {
            return Err(Full);
        }
        match counter.compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(()),
            Err(now) => cur = now,
        }
    }
}

/// The inbox has not the room asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shard inbox is full")]
pub struct Full;

/// The eventfd writes a thread holds back ([`defer_wakes`]).
struct Deferred {
    /// Inboxes armed by a send on this thread whose eventfd is not written yet.
    pending: Vec<Arc<Shared>>,
    /// Asks the thread's runtime to call [`flush_deferred_wakes`] once it has run what is
    /// ready now.
    schedule: Box<dyn Fn()>,
}

thread_local! {
    static DEFERRED: RefCell<Option<Deferred>> = const { RefCell::new(None) };
}

/// Holds back the eventfd writes of this thread's sends until [`flush_deferred_wakes`]; the
/// first held-back write calls `schedule`, which must make the thread's runtime call
/// [`flush_deferred_wakes`] soon (after the tasks ready now). Dropping the guard writes what
/// is still held back and ends the deferral.
#[must_use = "the deferral ends when the guard is dropped"]
pub fn defer_wakes(schedule: impl Fn() + 'static) -> DeferWakes {
    DEFERRED.with(|d| {
        *d.borrow_mut() = Some(Deferred {
            pending: Vec::new(),
            schedule: Box::new(schedule),
        });
    });
    DeferWakes(std::marker::PhantomData)
}

/// Ends [`defer_wakes`] on drop (on the thread that started it: the guard is not `Send`).
pub struct DeferWakes(std::marker::PhantomData<*const ()>);

impl Drop for DeferWakes {
    fn drop(&mut self) {
        flush_deferred_wakes();
        let _ = DEFERRED.try_with(|d| d.borrow_mut().take());
    }
}

/// Writes the eventfd of every inbox this thread armed since the last flush.
pub fn flush_deferred_wakes() {
    let pending = DEFERRED
        .try_with(|d| {
            d.borrow_mut()
                .as_mut()
                .map(|d| std::mem::take(&mut d.pending))
        })
        .ok()
        .flatten()
        .unwrap_or_default();
    for shared in &pending {
        wake(shared.efd.as_raw_fd());
    }
}

/// Holds `shared`'s eventfd write back if this thread defers its wake-ups.
fn defer_wake(shared: &Arc<Shared>) -> bool {
    DEFERRED
        .try_with(|d| {
            let mut d = d.borrow_mut();
            let Some(d) = d.as_mut() else {
                return false;
            };
            if d.pending.is_empty() {
                (d.schedule)();
            }
            d.pending.push(shared.clone());
            true
        })
        .unwrap_or(false)
}

fn wake(fd: i32) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd. EAGAIN (counter saturated) still
    // leaves it readable, which is all we need.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.shared.gone.store(true, Ordering::Release);
        self.shared.held.store(false, Ordering::SeqCst);
        // Nobody waits for a stopped shard's inbox.
        self.shared.shallow.notify_waiters();
    }
}

impl Inbox {
    /// Raw eventfd, for the runtime to wait on.
    pub fn raw_fd(&self) -> i32 {
        self.shared.efd.as_raw_fd()
    }

    /// Resets the eventfd and disarms; call before draining so a send that races the drain
    /// re-arms and wakes again.
    pub fn disarm(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
        unsafe { libc::read(self.raw_fd(), (&mut v as *mut u64).cast(), 8) };
        self.shared.held.store(false, Ordering::SeqCst);
        self.shared.armed.store(false, Ordering::SeqCst);
    }

    /// While the shard holds a write: senders see the inbox armed and skip their wake-ups
    /// (the shard takes what they queue at the hold's end, after [`Inbox::disarm`]), except a
    /// publisher that starts waiting for the inbox to be shallow, which wakes it.
    pub fn hold_wakes(&self) {
        self.shared.held.store(true, Ordering::SeqCst);
        self.shared.armed.store(true, Ordering::SeqCst);
    }

    /// Wakes this inbox's own shard again (used when a drain stops at its budget).
    pub fn rearm(&self) {
        if !self.shared.armed.swap(true, Ordering::AcqRel) {
            wake(self.raw_fd());
        }
    }

    /// Takes one waiting message, giving its room back.
    pub fn try_recv(&self) -> Option<ShardMsg> {
        let msg = self.try_take()?;
        self.give_back(msg.nr_bytes());
        Some(msg)
    }

    /// Takes one waiting message and keeps its room (and its bytes in the count flow control
    /// reads) until [`Inbox::give_back`]: the shard gives it back once what the message queued
    /// on its connections is in the shard's published total, so the node's figure never
    /// misses the bytes in between.
    pub fn try_take(&self) -> Option<ShardMsg> {
        self.rx.try_recv().ok()
    }

    /// Gives back the room of one message of `nr_bytes` taken with [`Inbox::try_take`].
    pub fn give_back(&self, nr_bytes: usize) {
        self.shared.give_back(1, nr_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_hands_back() {
        let (tx, rx) = channel(1, 1 << 20).unwrap();
        tx.send(ShardMsg::Drain).unwrap();
        assert!(matches!(tx.send(ShardMsg::Drain), Err(ShardMsg::Drain)));
        assert_eq!(tx.depth(), 1);
        rx.disarm();
        assert!(matches!(rx.try_recv(), Some(ShardMsg::Drain)));
        assert!(rx.try_recv().is_none());
    }

    #[test]
    fn a_reservation_is_all_or_nothing_and_gives_back_what_it_did_not_use() {
        let (tx, rx) = channel(3, 1 << 20).unwrap();
        let mut r = tx.try_reserve(2, 0).unwrap();
        assert_eq!(tx.try_reserve(2, 0).unwrap_err(), Full, "only one left");
        assert_eq!(tx.depth(), 2, "a failed reservation takes nothing");
        r.send(ShardMsg::Drain).unwrap();
        drop(r);
        assert_eq!(tx.depth(), 1, "the unused room is given back");
        tx.send_over_bound(ShardMsg::Drain).unwrap();
        tx.send_over_bound(ShardMsg::Drain).unwrap();
        tx.send_over_bound(ShardMsg::Drain).unwrap();
        assert_eq!(tx.depth(), 4, "the drain order passes the bound");
        assert!(tx.send(ShardMsg::Drain).is_err());
        while rx.try_recv().is_some() {}
        assert_eq!(tx.depth(), 0);
        assert!(tx.try_reserve(3, 0).is_ok());
    }

    fn publication(nr_bytes: usize) -> Arc<Publication> {
        Arc::new(Publication {
            project: 0,
            heads: Vec::new(),
            body: Bytes::from(vec![b'x'; nr_bytes]),
            id: "m".into(),
            data_len: nr_bytes,
            accepted_at: std::time::Instant::now(),
            offsets: Box::default(),
        })
    }

    #[test]
    fn bytes_are_bounded_too_and_given_back_as_the_shard_takes_them() {
        let (tx, rx) = channel(100, 1000).unwrap();
        tx.send(ShardMsg::Publish(publication(600))).unwrap();
        assert_eq!(tx.depth_bytes(), 600);
        // Room for messages, not for bytes: refused whole, nothing taken.
        assert_eq!(tx.try_reserve(2, 500).unwrap_err(), Full);
        assert!(tx.send(ShardMsg::Publish(publication(401))).is_err());
        assert_eq!((tx.depth(), tx.depth_bytes()), (1, 600));
        let mut r = tx.try_reserve(2, 400).unwrap();
        r.send(ShardMsg::Publish(publication(300))).unwrap();
        drop(r);
        assert_eq!(
            (tx.depth(), tx.depth_bytes()),
            (2, 900),
            "unused bytes given back"
        );
        while rx.try_recv().is_some() {}
        assert_eq!((tx.depth(), tx.depth_bytes()), (0, 0));
        // An empty inbox takes one publication larger than the bound.
        tx.send(ShardMsg::Publish(publication(5000))).unwrap();
        assert!(tx.send(ShardMsg::Publish(publication(1))).is_err());
    }

    #[test]
    fn one_wakeup_per_burst() {
        let (tx, rx) = channel(8, 1 << 20).unwrap();
        for _ in 0..3 {
            tx.send(ShardMsg::Drain).unwrap();
        }
        let mut v: u64 = 0;
        let n = unsafe { libc::read(rx.raw_fd(), (&mut v as *mut u64).cast(), 8) };
        assert_eq!((n, v), (8, 1), "three sends, one eventfd write");
    }

    /// The eventfd's counter, read (and reset) without blocking: 0 when nothing was written.
    fn wakes(rx: &Inbox) -> u64 {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
        unsafe { libc::read(rx.raw_fd(), (&mut v as *mut u64).cast(), 8) };
        v
    }

    /// A shard holding a write is not woken by sends, only by a publisher that starts waiting
    /// for its inbox; `disarm` ends the hold and sends wake it again.
    #[test]
    fn a_held_inbox_is_woken_only_by_a_waiting_publisher() {
        use std::future::Future;
        let (tx, rx) = channel(64, 1 << 20).unwrap();
        rx.disarm();
        rx.hold_wakes();
        for _ in 0..=SHALLOW_DEPTH {
            tx.send(ShardMsg::Drain).unwrap();
        }
        assert_eq!(wakes(&rx), 0, "sends do not wake a holding shard");
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut shallow = std::pin::pin!(tx.shallow());
        assert!(shallow.as_mut().poll(&mut cx).is_pending());
        assert_eq!(wakes(&rx), 1, "a waiting publisher wakes it");
        rx.disarm();
        assert!(rx.try_recv().is_some());
        assert!(
            shallow.as_mut().poll(&mut cx).is_ready(),
            "answered once shallow"
        );
        while rx.try_recv().is_some() {}
        tx.send(ShardMsg::Drain).unwrap();
        assert_eq!(wakes(&rx), 1, "after the hold a send wakes it");
        for _ in 0..SHALLOW_DEPTH {
            tx.send(ShardMsg::Drain).unwrap();
        }
        assert_eq!(wakes(&rx), 0, "once per arming");
        let mut waiting = std::pin::pin!(tx.shallow());
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            wakes(&rx),
            0,
            "a waiting publisher wakes only a holding shard"
        );
    }

    #[test]
    fn deferred_wakes_are_written_once_per_inbox_at_the_flush() {
        let (a, rx_a) = channel(8, 1 << 20).unwrap();
        let (b, rx_b) = channel(8, 1 << 20).unwrap();
        let scheduled = std::rc::Rc::new(std::cell::Cell::new(0));
        let guard = defer_wakes({
            let scheduled = scheduled.clone();
            move || scheduled.set(scheduled.get() + 1)
        });
        a.send(ShardMsg::Drain).unwrap();
        a.send(ShardMsg::Drain).unwrap();
        b.send(ShardMsg::Drain).unwrap();
        assert_eq!((wakes(&rx_a), wakes(&rx_b)), (0, 0), "held back");
        assert_eq!(scheduled.get(), 1, "one flush asked for");
        // Another thread's sends are not held back.
        let (c, rx_c) = channel(8, 1 << 20).unwrap();
        std::thread::spawn(move || c.send(ShardMsg::Drain).unwrap())
            .join()
            .unwrap();
        assert_eq!(wakes(&rx_c), 1);
        flush_deferred_wakes();
        assert_eq!((wakes(&rx_a), wakes(&rx_b)), (1, 1), "one write per inbox");
        rx_a.disarm();
        a.send(ShardMsg::Drain).unwrap();
        assert_eq!(scheduled.get(), 2);
        drop(guard);
        assert_eq!(wakes(&rx_a), 1, "the guard's drop writes what is held back");
        rx_a.disarm();
        a.send(ShardMsg::Drain).unwrap();
        assert_eq!(wakes(&rx_a), 1, "no deferral after the guard");
    }
}
