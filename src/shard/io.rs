//! The I/O driver of a shard's connections: one epoll instance per shard holds every
//! connection's socket (level-triggered, tagged with its slot and generation), and one task
//! per shard ([`ready_loop`]) waits for that instance through the runtime, reads what became
//! readable into the shard's scratch buffer, writes outbound queues with non-blocking
//! vectored sends, and removes the connections the shard killed.
//!
//! A connection is a slab entry and a registration, not a task: an idle one costs no future,
//! no runtime file handle and no pending poll, and pins no buffer; deadlines live in the
//! shard's sweep.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};

use tracing::warn;

use super::{SCRATCH_BYTES, Shard};
use crate::metrics::ShardStats;
use crate::ws::conn::{ConnPhase, InFlight};
use crate::ws::machine;

/// Most iovecs per send.
pub(crate) const MAX_IOV: usize = 64;
/// Most bytes read for one readiness event before other connections get a turn.
const READ_BUDGET: usize = 4 * SCRATCH_BYTES;
/// Most readiness events taken from the epoll instance per turn of [`ready_loop`]; the rest
/// stay ready (level-triggered) for the next turn, after other tasks had theirs.
const MAX_EVENTS: usize = 256;

/// The shard's readiness set: its epoll instance, and the connections killed since the
/// ready loop last ran (removed by it, after whatever killed them has returned).
pub struct Poller {
    /// The epoll instance.
    epoll: OwnedFd,
    /// Killed connections to remove, as (slot, generation).
    reap: Vec<(u32, u32)>,
    /// The ready loop's waker while it waits.
    waker: Option<Waker>,
}

impl Poller {
    /// A new, empty readiness set.
    ///
    /// # Errors
    /// The kernel refused an epoll instance (descriptors or memory exhausted).
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked before it is owned.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: a fresh descriptor nothing else owns.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            reap: Vec::new(),
            waker: None,
        })
    }

    /// Watches `fd` for the connection in `slot` with `generation`: readable (and hang-up or
    /// error) while `want_write` is false, writable while it is true.
    fn control(&self, op: i32, fd: i32, slot: u32, generation: u32, want_write: bool) {
        let mut ev = libc::epoll_event {
            events: (if want_write {
                libc::EPOLLOUT
            } else {
                libc::EPOLLIN | libc::EPOLLRDHUP
            }) as u32,
            u64: u64::from(generation) << 32 | u64::from(slot),
        };
        // SAFETY: `ev` is a live epoll_event for the duration of the call.
        let r = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) };
        if r < 0 {
            warn!(
                fd,
                slot,
                error = %io::Error::last_os_error(),
                "cannot change a connection's readiness interest"
            );
        }
    }

    /// Starts watching a new connection's socket for readability.
    ///
    /// # Errors
    /// The kernel refused the registration (memory exhausted).
    pub(crate) fn add(&self, fd: i32, slot: u32, generation: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: u64::from(generation) << 32 | u64::from(slot),
        };
        // SAFETY: `ev` is a live epoll_event for the duration of the call.
        let r =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Queues a killed connection for removal and wakes the ready loop.
    fn reap(&mut self, slot: u32, generation: u32) {
        self.reap.push((slot, generation));
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Takes the ready events, up to `events.len()`, without waiting.
    fn take_events(&self, events: &mut [libc::epoll_event]) -> usize {
        // SAFETY: `events` is live and writable for `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                0,
            )
        };
        n.max(0) as usize
    }
}

/// The shard's connection loop: waits until its epoll instance has events (through the
/// runtime: an io_uring poll or epoll of the instance's descriptor) or a killed connection is
/// waiting for removal, then handles up to [`MAX_EVENTS`] events and removes the killed.
pub(crate) async fn ready_loop(shard: Rc<RefCell<Shard>>) {
    let raw = shard.borrow().poller.epoll.as_raw_fd();
    let Some(waiter) = runtime_waiter(raw, "the shard's epoll descriptor") else {
        return;
    };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
    loop {
        // One poll of the instance stays submitted across removals: only its completion
        // makes a new one.
        let mut readable = pin!(waiter.readable(false));
        loop {
            let ready = poll_fn(|cx| {
                if let Poll::Ready(r) = readable.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                let mut s = shard.borrow_mut();
                if !s.poller.reap.is_empty() {
                    return Poll::Ready(None);
                }
                if !s
                    .poller
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    s.poller.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            })
            .await;
            match ready {
                Some(Err(e)) => {
                    warn!("waiting for connection readiness failed: {e}");
                    return;
                }
                Some(Ok(())) => {
                    let mut s = shard.borrow_mut();
                    let n = s.poller.take_events(&mut events);
                    for ev in &events[..n] {
                        let (slot, generation) = (ev.u64 as u32, (ev.u64 >> 32) as u32);
                        s.on_ready(slot, generation);
                    }
                    s.reap_killed();
                    break;
                }
                None => shard.borrow_mut().reap_killed(),
            }
        }
    }
}

/// A descriptor that is not a socket (an eventfd, an epoll instance) waited on through the
/// runtime: a duplicate wrapped in a socket type whose `readable` submits a poll for it (an
/// io_uring poll, or epoll). `None` (and a warning naming `what`) if it cannot be made.
pub(crate) fn runtime_waiter(fd: i32, what: &str) -> Option<monoio::net::unix::UnixDatagram> {
    // SAFETY: dup returns a new descriptor (checked) that the wrapper then owns and closes.
    let dup = unsafe { libc::dup(fd) };
    if dup < 0 {
        warn!("cannot dup {what}: {}", io::Error::last_os_error());
        return None;
    }
    let std_fd = unsafe { std::os::unix::net::UnixDatagram::from_raw_fd(dup) };
    match monoio::net::unix::UnixDatagram::from_std(std_fd) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!("cannot register {what}: {e}");
            None
        }
    }
}

pub(crate) fn recv(fd: i32, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is a live, writable buffer of buf.len() bytes.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn send_vectored(fd: i32, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: IoSlice is ABI-compatible with iovec; msghdr points at live slices only for the
    // duration of the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// What a send's result means for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// The socket took this many bytes.
    Wrote(usize),
    /// Interrupted before sending anything: send again.
    Retry,
    /// The socket's send buffer is full: wait until it is writable.
    Blocked,
    /// The connection is broken.
    Failed,
}

fn outcome(r: io::Result<usize>) -> Sent {
    match r {
        Ok(n) => Sent::Wrote(n),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Sent::Retry,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Sent::Blocked,
        Err(_) => Sent::Failed,
    }
}

/// Calls `each` with the queue's first parts, at most [`MAX_IOV`], as one send writes them
/// (the first without its bytes already written).
pub(crate) fn queued_slices<'a>(f: &'a InFlight, mut each: impl FnMut(&'a [u8])) {
    for (i, p) in f.out.iter().take(MAX_IOV).enumerate() {
        let p = &p.bytes;
        each(if i == 0 { &p[f.out_head as usize..] } else { p });
    }
}

/// Takes `written` bytes off the front of the queue: whole parts leave it (the part after
/// one that continues a frame is marked started), a part written in part keeps its offset.
fn dequeue_written(f: &mut InFlight, mut written: usize) {
    f.out_bytes -= written;
    while written > 0 {
        let left = f.out[0].bytes.len() - f.out_head as usize;
        if written >= left {
            written -= left;
            let done = f.out.pop_front();
            f.out_head = 0;
            if done.is_some_and(|p| p.more)
                && let Some(next) = f.out.front_mut()
            {
                next.started = true;
            }
        } else {
            // Below the frame's length, which fits a u32 (message sizes are capped far
            // below 4 GiB).
            f.out_head += written as u32;
            written = 0;
        }
    }
}

impl Shard {
    /// Reads what arrived and acts on it.
    pub(crate) fn on_readable(&mut self, slot: u32) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut total = 0;
        let now = self.now();
        while total < READ_BUDGET {
            let Some(c) = self.conns.get_mut(slot as usize) else {
                break;
            };
            if c.kill {
                break;
            }
            match recv(c.fd, &mut scratch) {
                Ok(0) => {
                    self.kill(slot);
                    break;
                }
                Ok(n) => {
                    total += n;
                    ShardStats::add(&self.stats.bytes_in, n as u64);
                    machine::on_bytes(&mut self.host(slot), now, &mut scratch[..n]);
                    if n < scratch.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.kill(slot);
                    break;
                }
            }
        }
        self.scratch = scratch;
        self.flush(slot);
        self.flush_dirty();
    }

    /// Handles a readiness event of the connection in `slot` with `generation`: writes the
    /// queue if it waits for writability, else reads (a hang-up or an error reads as the end
    /// of the stream or as the error).
    fn on_ready(&mut self, slot: u32, generation: u32) {
        let want_write = match self.occupant(slot, generation) {
            Some(c) if !c.kill => c.want_write,
            _ => return,
        };
        if want_write {
            self.flush(slot);
            self.flush_dirty();
        } else {
            self.on_readable(slot);
        }
    }

    /// Ends the connection: the ready loop removes it and closes the socket once the caller
    /// has returned.
    pub(crate) fn kill(&mut self, slot: u32) {
        if let Some(c) = self.conns.get_mut(slot as usize)
            && !c.kill
        {
            c.kill = true;
            self.poller.reap(slot, c.generation);
        }
    }

    /// Removes the connections killed since the last call.
    pub(crate) fn reap_killed(&mut self) {
        while let Some((slot, generation)) = self.poller.reap.pop() {
            self.remove(slot, generation);
        }
        if self.poller.reap.capacity() > MAX_EVENTS {
            self.poller.reap = Vec::new();
        }
    }

    /// The socket's send buffer filled (`true`) or drained (`false`): while full, the
    /// connection waits for writability and is not read (the peer gets back-pressure).
    fn set_want_write(&mut self, slot: u32, want_write: bool) {
        let c = &mut self.conns[slot as usize];
        if c.want_write != want_write {
            c.want_write = want_write;
            self.poller
                .control(libc::EPOLL_CTL_MOD, c.fd, slot, c.generation, want_write);
        }
    }

    /// Writes as much of the queue as the socket takes.
    pub(crate) fn flush(&mut self, slot: u32) {
        let Some(c) = self.conns.get_mut(slot as usize) else {
            return;
        };
        c.dirty = false;
        if c.kill {
            return;
        }
        loop {
            let c = &mut self.conns[slot as usize];
            let Some(f) = c.flight.as_deref().filter(|f| !f.out.is_empty()) else {
                break;
            };
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            queued_slices(f, |s| {
                iov[n] = IoSlice::new(s);
                n += 1;
            });
            let r = send_vectored(c.fd, &iov[..n]);
            if !self.sent(slot, r) {
                return;
            }
        }
        let c = &mut self.conns[slot as usize];
        if let Some(f) = c.flight.as_deref_mut() {
            f.out = VecDeque::new();
        }
        // Written out: an idle connection frees its in-flight state.
        c.settle();
        let kill_after_flush = c.kill_after_flush;
        self.set_want_write(slot, false);
        if kill_after_flush {
            self.kill(slot);
        }
    }

    /// Applies the result of a send of the connection's queue (made by `sendmsg` or through
    /// the shard's ring): the written bytes leave the queue; a full socket buffer makes the
    /// connection wait for writability, any other error kills it. `true`: writing may go on
    /// (whatever is still queued).
    pub(crate) fn sent(&mut self, slot: u32, r: io::Result<usize>) -> bool {
        match outcome(r) {
            Sent::Wrote(written) => {
                ShardStats::add(&self.stats.bytes_out, written as u64);
                self.dirty.dequeued(written);
                if let Some(f) = self.conns[slot as usize].flight.as_deref_mut() {
                    dequeue_written(f, written);
                }
                true
            }
            Sent::Retry => true,
            Sent::Blocked => {
                self.set_want_write(slot, true);
                false
            }
            Sent::Failed => {
                self.kill(slot);
                false
            }
        }
    }

    /// Flushes every connection queued to since the last flush: through the shard's ring
    /// where it has one, else one `sendmsg` each.
    pub(crate) fn flush_dirty(&mut self) {
        if let Some(ring) = self.ring.take() {
            self.ring = Some(self.flush_dirty_ring(ring));
        }
        while let Some(slot) = self.dirty.slots.pop() {
            if self.conns.get(slot as usize).is_some_and(|c| c.dirty) {
                self.flush(slot);
            }
        }
        self.coalesce.wrote();
        self.store_queued_bytes();
    }

    /// Stores the bytes queued on the shard's connections for the node's flow control (once
    /// per batch, and only when it changed: one relaxed store on the shard's own counters).
    pub(crate) fn store_queued_bytes(&self) {
        let queued = self.dirty.queued_bytes as u64;
        if crate::metrics::read(&self.stats.queued_out_bytes) != queued {
            self.stats.queued_out_bytes.store(queued, Ordering::Relaxed);
        }
    }
    /// Ends a killed connection: unsubscribes, counts, frees the slot, closes the socket
    /// (which also takes it out of the epoll instance).
    pub(crate) fn remove(&mut self, slot: u32, generation: u32) {
        if self.occupant(slot, generation).is_none() {
            return;
        }
        while let Some(sub) = self.conns[slot as usize].subs.pop() {
            self.release_sub(sub);
        }
        self.stomp.remove(&slot);
        self.held_welcomes.remove(&slot);
        let in_handshake = self.conns[slot as usize].phase == ConnPhase::Handshake;
        self.set_phase(slot, None);
        let c = self.conns.remove(slot as usize);
        self.dirty.dequeued(c.out_bytes());
        self.store_queued_bytes();
        if c.client_known {
            self.hub.ip_conns.release(c.peer.ip(), in_handshake);
        }
        if let Some(id) = &c.identity {
            let node = self.hub.nr_connections.fetch_sub(1, Ordering::Relaxed) - 1;
            self.stats.connections.fetch_sub(1, Ordering::Relaxed);
            let p = &id.project;
            if let Some(open) = self.by_project.get_mut(p.idx as usize) {
                open.remove(&slot);
            }
            let in_project = p.nr_connections.fetch_sub(1, Ordering::Relaxed) - 1;
            self.watch_caps(node, p, in_project, false);
        }
        // Read what the peer still sent so closing does not turn into a reset that could
        // discard our close frame at the peer.
        let mut sink = [0u8; 1024];
        for _ in 0..64 {
            if !matches!(recv(c.fd, &mut sink), Ok(n) if n > 0) {
                break;
            }
        }
        // SAFETY: the connection owned `fd` since accept; it leaves the slab here, so nothing
        // uses the descriptor again.
        unsafe { libc::close(c.fd) };
        self.on_removed();
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use bytes::Bytes;

    use super::{Sent, dequeue_written, outcome, queued_slices};
    use crate::pubsub::Sub;
    use crate::ws::conn::{Conn, Identity, InFlight, OutPart, Subs};

    /// A queue of a frame in two pieces (`head` continues into `body`) and a whole frame.
    fn queue() -> InFlight {
        let mut f = InFlight::default();
        for (bytes, more) in [(&b"head"[..], true), (b"body!", false), (b"next", false)] {
            f.out.push_back(OutPart {
                bytes: Bytes::from_static(bytes),
                more,
                started: false,
            });
            f.out_bytes += bytes.len();
        }
        f
    }

    fn slices(f: &InFlight) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        queued_slices(f, |s| v.push(s.to_vec()));
        v
    }

    /// Written bytes leave the queue whole parts first; a part written in part keeps its
    /// offset and the next send starts after it; the piece after a written piece of the same
    /// frame is marked started (it must finish before anything is dropped).
    #[test]
    fn written_bytes_leave_the_queue_in_order() {
        let mut f = queue();
        dequeue_written(&mut f, 6);
        assert_eq!(f.out.len(), 2);
        assert_eq!((f.out_head, f.out_bytes), (2, 7));
        assert!(f.out[0].started, "the frame's second piece is started");
        assert_eq!(slices(&f), [b"dy!".to_vec(), b"next".to_vec()]);
        dequeue_written(&mut f, 3);
        assert_eq!((f.out.len(), f.out_head, f.out_bytes), (1, 0, 4));
        assert!(!f.out[0].started);
        assert_eq!(slices(&f), [b"next".to_vec()]);
        dequeue_written(&mut f, 0);
        assert_eq!((f.out.len(), f.out_head, f.out_bytes), (1, 0, 4));
        dequeue_written(&mut f, 4);
        assert!(f.out.is_empty());
        assert_eq!((f.out_head, f.out_bytes), (0, 0));
    }

    /// A send's result, from `sendmsg` or a ring completion alike: bytes written, retry on
    /// an interruption, wait for writability on a full buffer, anything else is fatal.
    #[test]
    fn send_results_map_to_what_the_connection_does() {
        let err = io::Error::from_raw_os_error;
        assert_eq!(outcome(Ok(7)), Sent::Wrote(7));
        assert_eq!(outcome(Err(err(libc::EINTR))), Sent::Retry);
        assert_eq!(outcome(Err(err(libc::EAGAIN))), Sent::Blocked);
        assert_eq!(outcome(Err(err(libc::EPIPE))), Sent::Failed);
        assert_eq!(outcome(Err(err(libc::ECONNRESET))), Sent::Failed);
    }

    /// An idle connection is its slab entry, with no task, future or runtime file handle of
    /// its own (a monoio task of 368 B, its socket handle of 56 B and a pending poll of 24 B
    /// before), and the fields that only matter while something is in flight live in one box
    /// it does not have while idle. `Conn` was 192 B with those fields and a task waker.
    #[test]
    fn idle_connection_footprint() {
        let conn = std::mem::size_of::<Conn>();
        let flight = std::mem::size_of::<InFlight>();
        eprintln!("Conn {conn} B, InFlight {flight} B");
        assert!(conn <= 112, "Conn is {conn} B");
        assert!(flight <= 80, "InFlight is {flight} B");
        // The identity box stays in mimalloc's 96-byte class (it was 104 B, in the 112 one).
        let identity = std::mem::size_of::<Identity>();
        assert!(identity <= 96, "Identity is {identity} B");
        // The two implicit subscriptions are held inline, with no allocation.
        let mut subs = Subs::new();
        subs.push(Sub { topic: 0, pos: 0 });
        subs.push(Sub { topic: 1, pos: 0 });
        assert!(!subs.spilled(), "two subscriptions allocated");
        assert_eq!(
            std::mem::size_of::<Subs>(),
            24,
            "Subs is not the size of a Vec"
        );
    }
}
