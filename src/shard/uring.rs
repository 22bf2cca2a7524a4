//! The shard's write ring: the sends of a batch (one per connection queued to since the last
//! flush) submitted to one io_uring with one system call, instead of one `sendmsg` per
//! connection.
//!
//! The sends are non-blocking (`MSG_DONTWAIT`), so the kernel runs each one inline while
//! submitting and answers a full socket buffer with `EAGAIN` instead of waiting: one
//! `io_uring_enter` both submits the batch and returns every completion. The ring holds the
//! message headers and iovecs the kernel reads until it has answered, and nothing the iovecs
//! point at (the connections' queued frames) is touched until every completion of the batch
//! is reaped. What a completion says is then applied exactly as a `sendmsg` result is
//! ([`Shard::sent`]).
//!
//! It must not: keep anything queued past the batch, or be used from another thread (the
//! ring is set up for a single issuer).

use std::io;
use std::sync::Once;

use io_uring::{IoUring, opcode, types};
use tracing::warn;

use super::Shard;
use crate::metrics::ShardStats;

/// Submission queue entries: the most sends submitted with one system call. A broadcast to
/// more connections takes one call per this many.
const ENTRIES: u32 = 1024;
/// Most iovecs the ring keeps room for between batches (two pieces per send of a full
/// batch, 32 KiB); a batch of deeper queues grows it and gives the excess back after.
const KEPT_IOVECS: usize = 2 * ENTRIES as usize;

/// One shard's ring and the storage its sends in flight point at.
pub struct WriteRing {
    /// The ring.
    ring: IoUring,
    /// The iovecs of the sends in flight, all sends' back to back.
    iovecs: Vec<libc::iovec>,
    /// One message header per send in flight, pointing into `iovecs`.
    msgs: Vec<libc::msghdr>,
    /// Per send in flight: the connection's slot, and its first iovec and iovec count.
    sends: Vec<(u32, usize, usize)>,
    /// Per send in flight: the completion's result (bytes written, or `-errno`).
    results: Vec<i32>,
}

impl WriteRing {
    /// A ring for the calling thread (the shard's), set up for a single issuer where the
    /// kernel allows it. `None` where the kernel refuses any ring: the shard then writes
    /// with `sendmsg`, and the first shard to find that says so once.
    pub fn new(shard: u16) -> Option<Self> {
        let tries: [fn(&mut io_uring::Builder); 3] = [
            |b| {
                b.setup_single_issuer().setup_defer_taskrun();
            },
            |b| {
                b.setup_single_issuer().setup_coop_taskrun();
            },
            |_| {},
        ];
        let mut last = None;
        for setup in tries {
            let mut b = IoUring::builder();
            setup(&mut b);
            match b.setup_cqsize(2 * ENTRIES).build(ENTRIES) {
                Ok(ring) => {
                    return Some(Self {
                        ring,
                        iovecs: Vec::new(),
                        msgs: Vec::new(),
                        sends: Vec::new(),
                        results: Vec::new(),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        static REFUSED: Once = Once::new();
        REFUSED.call_once(|| {
            warn!(
                shard,
                error = %last.map_or_else(String::new, |e| e.to_string()),
                "the kernel refuses an io_uring for the shards' writes; they write with one \
                 sendmsg per connection (server.write_batch = \"sendmsg\")"
            );
        });
        None
    }
}

/// A completion's result as a send's.
fn send_result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

impl Shard {
    /// Writes the queues of the connections queued to since the last flush through the
    /// shard's ring: one send per connection, up to [`ENTRIES`] per system call.
    pub(crate) fn flush_dirty_ring(&mut self, mut w: WriteRing) -> WriteRing {
        while !self.dirty.slots.is_empty() {
            // Gather: one send of up to `MAX_IOV` parts per dirty connection with something
            // queued; the others (nothing queued, or killed) are settled without a send.
            w.iovecs.clear();
            w.sends.clear();
            while w.sends.len() < ENTRIES as usize
                && let Some(slot) = self.dirty.slots.pop()
            {
                let Some(c) = self.conns.get_mut(slot as usize) else {
                    continue;
                };
                if !c.dirty {
                    continue;
                }
                match c.flight.as_deref() {
                    Some(f) if !c.kill && !f.out.is_empty() => {
                        c.dirty = false;
                        let first = w.iovecs.len();
                        super::io::queued_slices(f, |s| {
                            w.iovecs.push(libc::iovec {
                                iov_base: s.as_ptr().cast_mut().cast(),
                                iov_len: s.len(),
                            });
                        });
                        w.sends.push((slot, first, w.iovecs.len() - first));
                    }
                    _ => self.flush(slot),
                }
            }
            if w.sends.is_empty() {
                break;
            }
            // The headers point into `iovecs`, which is not touched again until the batch's
            // completions are all reaped.
            w.msgs.clear();
            for &(_, first, n) in &w.sends {
                // SAFETY: msghdr is plain data; all-zero is a valid (empty) header.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = w.iovecs[first..].as_mut_ptr();
                msg.msg_iovlen = n as _;
                w.msgs.push(msg);
            }
            {
                let mut sq = w.ring.submission();
                for (i, (&(slot, _, _), msg)) in w.sends.iter().zip(&w.msgs).enumerate() {
                    let fd = self.conns[slot as usize].fd;
                    let sqe = opcode::SendMsg::new(types::Fd(fd), msg)
                        .flags((libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32)
                        .build()
                        .user_data(i as u64);
                    // SAFETY: the header, its iovecs and the bytes they point at (frames in
                    // the connection's queue) stay alive and unchanged until this entry's
                    // completion is reaped below, before anything else runs on the shard.
                    // The batch is at most ENTRIES long, the queue's size, so it fits.
                    unsafe { sq.push(&sqe) }.expect("a batch fits the submission queue");
                }
            }
            // Counted before the kernel runs them: whoever reads a send's bytes finds it
            // counted.
            ShardStats::add(&self.stats.ring_sends, w.sends.len() as u64);
            self.reap_ring(&mut w);
            for i in 0..w.sends.len() {
                let slot = w.sends[i].0;
                if self.sent(slot, send_result(w.results[i])) {
                    if self.conns[slot as usize]
                        .flight
                        .as_deref()
                        .is_some_and(|f| !f.out.is_empty())
                    {
                        ShardStats::add(&self.stats.ring_sends_unfinished, 1);
                    }
                    // The rest of the queue (past MAX_IOV parts, or a partial write), or
                    // the connection settling once written out.
                    self.flush(slot);
                } else {
                    ShardStats::add(&self.stats.ring_sends_unfinished, 1);
                }
            }
        }
        if w.iovecs.capacity() > KEPT_IOVECS {
            w.iovecs = Vec::with_capacity(KEPT_IOVECS);
        }
        w
    }

    /// Submits the batch and waits until every send of it has completed, storing each
    /// result in `w.results` by its index.
    fn reap_ring(&self, w: &mut WriteRing) {
        let n = w.sends.len();
        w.results.clear();
        w.results.resize(n, 0);
        let mut reaped = 0;
        while reaped < n {
            match w.ring.submit_and_wait(n - reaped) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                // The kernel may still read entries it took: nothing they point at may be
                // freed, so the shard cannot carry on (and the node fails as it does for a
                // shard's panic).
                Err(e) => panic!(
                    "shard {}: the write ring refused its batch of {n} sends: {e}",
                    self.id
                ),
            }
            for cqe in w.ring.completion() {
                w.results[cqe.user_data() as usize] = cqe.result();
                reaped += 1;
            }
        }
    }
}
