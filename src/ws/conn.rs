//! The I/O driver of one connection: waits for readiness, reads into the shard's scratch
//! buffer, writes its outbound queue with non-blocking vectored sends, and runs the handshake
//! and client ops against the shard's state.
//!
//! An idle connection owns no read buffer and no timer: its task waits on one readiness poll,
//! and deadlines live in the shard's sweep. Per-connection buffers exist only while a partial
//! frame or a queued message is in flight.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use slab::Slab;
use tracing::{debug, info, warn};

use super::close::CloseReason;
use super::frame;
use super::handshake::{self, HandshakeOutcome, Refusal, Upgrade};
use super::ops::{self, ErrorCode, Op};
use super::session::{Event, Flow, Session};
use crate::auth::{AuthError, Project, Verified};
use crate::metrics::ShardStats;
use crate::net::proxy::{self, ProxyHeader};
use crate::pubsub::{ConnId, Sub, TOPIC_ALL, Topic, Unsubscribed, topic_permitted};
use crate::shard::{AcceptRefusal, Deadline, Shard};

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
}

/// One connection's state, owned by its shard.
pub struct Conn {
    /// The socket (owned by the connection's task; closed when the task ends).
    pub fd: i32,
    /// Generation of this occupant of the slot.
    pub generation: u32,
    /// Life phase.
    pub phase: ConnPhase,
    /// Set to make the task end (it then removes the connection).
    pub kill: bool,
    /// The socket buffer is full; the task waits for writability.
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
    /// Number of implicit subscriptions at the front of `subs`.
    pub nr_implicit: u8,
    /// Error replies so far.
    pub bad_requests: u32,
    /// The task's waker while it waits.
    pub waker: Option<Waker>,
    /// Unconsumed input (a partial request or frame); empty and unallocated when idle.
    pub inbuf: Vec<u8>,
    /// Frames waiting to be written, in pieces; unallocated when empty.
    pub out: VecDeque<OutPart>,
    /// Bytes in `out` not yet written.
    pub out_bytes: usize,
    /// Bytes of `out[0]` already written.
    pub out_head: u32,
    /// Message rate limit: the theoretical arrival time of the next message on the shard's
    /// microsecond clock (GCRA; a token bucket in four bytes).
    pub msg_tat: u32,
    /// `refresh` rate limit: the theoretical arrival time of the next refresh on the shard's
    /// millisecond clock (GCRA, like `msg_tat`).
    pub refresh_tat: u32,
    /// Frame-layer state.
    pub session: Session,
    /// Peer address.
    pub peer: SocketAddr,
    /// Set once authenticated.
    pub identity: Option<Box<Identity>>,
    /// Subscriptions (implicit first).
    pub subs: Vec<Sub>,
    /// When the token expires, seconds since the epoch (exp + leeway; see [`expiry_of`]);
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
            nr_implicit: 0,
            bad_requests: 0,
            waker: None,
            inbuf: Vec::new(),
            out: VecDeque::new(),
            out_bytes: 0,
            out_head: 0,
            msg_tat: 0,
            refresh_tat: 0,
            session: Session::default(),
            peer,
            identity: None,
            subs: Vec::new(),
            expires_at: 0,
        }
    }

    /// Drops the queued frames that have not started to go out; a started frame is kept whole.
    fn truncate_out(&mut self) {
        let keep = match self.out.front() {
            Some(f) if self.out_head > 0 || f.started => self
                .out
                .iter()
                .position(|p| !p.more)
                .map_or(self.out.len(), |i| i + 1),
            _ => 0,
        };
        self.out.truncate(keep);
        self.out_bytes =
            self.out.iter().map(|p| p.bytes.len()).sum::<usize>() - self.out_head as usize;
        if self.out.is_empty() {
            self.out = VecDeque::new();
        }
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
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
    fn whole(bytes: Bytes) -> Self {
        Self {
            bytes,
            more: false,
            started: false,
        }
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
pub fn push_frame(
    conns: &mut Slab<Conn>,
    dirty: &mut Vec<u32>,
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
    if c.out_bytes.saturating_add(len) > cap {
        return Push::Overflow;
    }
    c.out_bytes += len;
    for (i, p) in parts.iter().enumerate() {
        c.out.push_back(OutPart {
            bytes: (*p).clone(),
            more: i + 1 < parts.len(),
            started: false,
        });
    }
    if !c.dirty && !c.want_write {
        c.dirty = true;
        dirty.push(slot);
    }
    Push::Queued
}

/// Waits for the socket (`io`: a readable or writable poll) or for the shard to signal the
/// connection: killed, or its write interest changed. Hand-rolled rather than `select!` to keep
/// the per-connection task small.
struct Wait<'a, F> {
    io: F,
    shard: &'a RefCell<Shard>,
    slot: u32,
    want_write: bool,
}

impl<F: Future<Output = io::Result<()>>> Future for Wait<'_, F> {
    type Output = Option<bool>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<bool>> {
        // SAFETY: `io` is structurally pinned: it is never moved out of `self`.
        let this = unsafe { self.get_unchecked_mut() };
        let io = unsafe { Pin::new_unchecked(&mut this.io) };
        if let Poll::Ready(r) = io.poll(cx) {
            return Poll::Ready(Some(r.is_ok()));
        }
        let mut s = this.shard.borrow_mut();
        let Some(c) = s.conns.get_mut(this.slot as usize) else {
            return Poll::Ready(None);
        };
        if c.kill || c.want_write != this.want_write {
            return Poll::Ready(None);
        }
        if !c.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            c.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The task of one connection: from accept to removal.
pub async fn drive(
    shard: Rc<RefCell<Shard>>,
    stream: monoio::net::TcpStream,
    slot: u32,
    generation: u32,
) {
    loop {
        let want_write = match shard.borrow().occupant(slot, generation) {
            Some(c) if !c.kill => c.want_write,
            _ => break,
        };
        // While the socket's send buffer is full, wait for it to drain and do not read: the
        // peer gets back-pressure.
        let ready = if want_write {
            let io = stream.writable(false);
            Wait {
                io,
                shard: &shard,
                slot,
                want_write,
            }
            .await
        } else {
            let io = stream.readable(false);
            Wait {
                io,
                shard: &shard,
                slot,
                want_write,
            }
            .await
        };
        let mut s = shard.borrow_mut();
        match ready {
            Some(true) if want_write => {
                s.flush(slot);
                s.flush_dirty();
            }
            Some(true) => s.on_readable(slot),
            Some(false) => s.kill(slot),
            None => {}
        }
    }
    shard.borrow_mut().remove(slot, generation);
    drop(stream);
}

fn recv(fd: i32, buf: &mut [u8]) -> io::Result<usize> {
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

/// When a token with `exp` stops being valid (`exp + leeway`), as the seconds since the epoch
/// a connection stores in 32 bits (enough until 2106, saturating beyond); 0 = never.
fn expiry_of(exp: Option<u64>, leeway_secs: u64) -> u32 {
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
fn gcra_take(tat: &mut u32, now: u32, interval: u32, tolerance: u32) -> Result<(), u32> {
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

/// `Retry-After` for a refusal over `limits.connections_per_ip`: connections from an address
/// free up as its clients leave, not at a rate.
const IP_LIMIT_RETRY_SECS: u32 = 5;

/// Most iovecs per send.
const MAX_IOV: usize = 64;
/// Most bytes read for one readiness event before other connections get a turn.
const READ_BUDGET: usize = 4 * crate::shard::SCRATCH_BYTES;

impl Shard {
    /// Reads what arrived and acts on it.
    pub(crate) fn on_readable(&mut self, slot: u32) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut total = 0;
        self.update_clock();
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
                    self.on_bytes(slot, &mut scratch[..n]);
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

    fn on_bytes(&mut self, slot: u32, data: &mut [u8]) {
        let c = &mut self.conns[slot as usize];
        match c.phase {
            ConnPhase::Handshake => self.on_handshake_bytes(slot, data),
            ConnPhase::Open | ConnPhase::Closing => self.on_frame_bytes(slot, data),
        }
    }

    fn on_handshake_bytes(&mut self, slot: u32, data: &[u8]) {
        let c = &mut self.conns[slot as usize];
        let mut buf = std::mem::take(&mut c.inbuf);
        buf.extend_from_slice(data);
        if !c.client_known && self.limits.proxies.proxy_protocol {
            match proxy::parse_header(&buf) {
                ProxyHeader::Incomplete if buf.len() <= self.limits.max_handshake_bytes => {
                    self.conns[slot as usize].inbuf = buf;
                }
                ProxyHeader::Incomplete => {
                    self.refuse(slot, Refusal::bad_request("PROXY protocol header too long"))
                }
                ProxyHeader::Invalid(why) => self.refuse(slot, Refusal::bad_request(why)),
                ProxyHeader::Complete { len, client } => {
                    let peer = client.unwrap_or(self.conns[slot as usize].peer);
                    if self.name_client(slot, peer).is_err() {
                        // Refused by [access], like a direct peer: closed without an answer.
                        self.refused_at_accept(peer, AcceptRefusal::Denied);
                        self.kill(slot);
                        return;
                    }
                    if buf.len() > len {
                        self.on_handshake_bytes(slot, &buf[len..]);
                    }
                }
            }
            return;
        }
        match handshake::parse(&buf) {
            Ok(None) if buf.len() > self.limits.max_handshake_bytes => self.refuse_request(
                slot,
                Refusal::bad_request(format!(
                    "upgrade request over {} bytes",
                    self.limits.max_handshake_bytes
                )),
            ),
            Ok(None) => self.conns[slot as usize].inbuf = buf,
            Err(r) => self.refuse_request(slot, r),
            Ok(Some(up)) if up.len > self.limits.max_handshake_bytes => self.refuse_request(
                slot,
                Refusal::bad_request(format!(
                    "upgrade request over {} bytes",
                    self.limits.max_handshake_bytes
                )),
            ),
            Ok(Some(up)) => match self
                .forwarded_check(slot, &up)
                .and_then(|()| self.rate_check(slot))
                .and_then(|()| self.authenticate(&up, self.conns[slot as usize].peer))
            {
                Err(r) => self.refuse(slot, r),
                Ok((project, verified)) => {
                    self.open(slot, &up, project, verified);
                    let rest = &mut buf[up.len..];
                    if !rest.is_empty() {
                        self.on_frame_bytes(slot, rest);
                    }
                }
            },
        }
    }

    /// A trusted proxy's connection in `X-Forwarded-For` mode names its client now: the
    /// address lists and the per-address count apply to the client from here on.
    fn forwarded_check(&mut self, slot: u32, up: &Upgrade) -> Result<(), Refusal> {
        let c = &self.conns[slot as usize];
        if c.client_known {
            return Ok(());
        }
        // No header: the proxy's own connection. A header that names no usable client is
        // refused: falling back to the proxy's address would let a client escape its own
        // address's lists and limits by sending garbage.
        let peer = match up.forwarded_for.as_deref() {
            None => c.peer,
            Some(v) => match self.limits.proxies.forwarded_client(v) {
                Some(ip) => SocketAddr::new(ip, 0),
                None => {
                    return Err(Refusal::bad_request(
                        "X-Forwarded-For from a trusted proxy names no client address",
                    ));
                }
            },
        };
        self.name_client(slot, peer)
            .map_err(|()| Refusal::forbidden("this address may not connect"))
    }

    /// Records the client a trusted proxy named and counts it against its address.
    ///
    /// # Errors
    /// The global `[access]` lists refuse the client (nothing is counted).
    fn name_client(&mut self, slot: u32, peer: SocketAddr) -> Result<(), ()> {
        if !self.hub.registry.load().access.permits(peer.ip()) {
            return Err(());
        }
        let over = self.hub.ip_conns.admit_always(peer.ip());
        let c = &mut self.conns[slot as usize];
        c.peer = peer;
        c.client_known = true;
        c.over_ip_limit = over;
        Ok(())
    }

    /// The per-address handshake token bucket (unless a token was taken at accept): 429 with
    /// `Retry-After`. Nothing to take for a trusted proxy's connection whose client is not
    /// named yet.
    fn charge(&mut self, slot: u32) -> Result<(), Refusal> {
        let c = &self.conns[slot as usize];
        if c.hs_charged || !c.client_known {
            return Ok(());
        }
        let ip = c.peer.ip();
        self.hs_limiter
            .take(crate::limiter::client_key(ip), Instant::now())
            .map_err(|secs| Refusal::rate_limited("too many handshakes from this address", secs))?;
        self.conns[slot as usize].hs_charged = true;
        Ok(())
    }

    /// Refuses a request that was read but cannot be served (malformed, too long): it counts
    /// against its address's handshake rate like any other, so over the rate the answer is
    /// 429, not the reason.
    fn refuse_request(&mut self, slot: u32, r: Refusal) {
        let r = self.charge(slot).err().unwrap_or(r);
        self.refuse(slot, r);
    }

    /// The per-address handshake token bucket and concurrent-connection limit (429 with
    /// `Retry-After`).
    fn rate_check(&mut self, slot: u32) -> Result<(), Refusal> {
        self.charge(slot)?;
        if self.conns[slot as usize].over_ip_limit {
            return Err(Refusal::rate_limited(
                format!(
                    "more than {} connections from this address",
                    self.hub.ip_conns.limit()
                ),
                IP_LIMIT_RETRY_SECS,
            ));
        }
        Ok(())
    }

    fn authenticate(
        &self,
        up: &Upgrade,
        peer: SocketAddr,
    ) -> Result<(Arc<Project>, Verified), Refusal> {
        let registry = self.hub.registry.load();
        let project = registry
            .project(&up.project)
            .ok_or_else(|| Refusal::unknown_project(&up.project))?;
        if !project.enabled {
            return Err(Refusal::forbidden(format!(
                "project `{}` is disabled",
                project.id
            )));
        }
        if !project.ip_access.permits(peer.ip()) {
            return Err(Refusal::forbidden(
                "this address may not connect to this project",
            ));
        }
        if !project.origin_allowed(up.origin.as_deref()) {
            return Err(Refusal::forbidden("Origin not allowed for this project"));
        }
        let Some((token, _source)) = &up.token else {
            return Err(Refusal::unauthorized(AuthError::Missing.to_string()));
        };
        let verified = project
            .verify(token)
            .map_err(|e| Refusal::unauthorized(e.to_string()))?;
        let max = self.hub.max_connections;
        if max > 0 && self.hub.nr_connections.load(Ordering::Relaxed) >= max {
            return Err(Refusal::at_capacity(format!(
                "server at its cap of {max} connections"
            )));
        }
        let pmax = project.max_connections;
        if pmax > 0 && project.nr_connections.load(Ordering::Relaxed) >= pmax {
            return Err(Refusal::at_capacity(format!(
                "project `{}` at its cap of {pmax} connections",
                project.id
            )));
        }
        if self.draining {
            return Err(Refusal::at_capacity("server is draining"));
        }
        Ok((project.clone(), verified))
    }

    /// Answers a refused handshake and closes once the answer is written.
    fn refuse(&mut self, slot: u32, r: Refusal) {
        let outcome = r.outcome();
        self.stats.handshake(outcome);
        let peer = self.conns[slot as usize].peer;
        // A flood of refusals is one line in full and a summary per interval (the sweep
        // logs it); each one is still there at debug.
        if self.refusals.note(Instant::now(), outcome.label(), true) {
            info!(
                %peer,
                status = r.status,
                error = r.error,
                reason = %r.message,
                "handshake refused (further refusals in the next {} s are summed up in one line)",
                crate::shard::REFUSAL_LOG_EVERY.as_secs()
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
        self.push_raw(slot, Bytes::from(r.response()));
        self.handshake_over(slot);
        let c = &mut self.conns[slot as usize];
        c.phase = ConnPhase::Closing;
        c.kill_after_flush = true;
        self.arm_close_deadline(slot);
    }

    /// The handshake of `slot` is over (opened, refused or evicted; the caller moves it out of
    /// the handshake phase): it no longer counts as in progress, for the shard or its address.
    pub(crate) fn handshake_over(&mut self, slot: u32) {
        let c = &self.conns[slot as usize];
        if c.phase != ConnPhase::Handshake {
            return;
        }
        self.pending_handshakes -= 1;
        if c.client_known {
            self.hub.ip_conns.handshake_over(c.peer.ip());
        }
    }

    fn arm_close_deadline(&mut self, slot: u32) {
        let generation = self.conns[slot as usize].generation;
        self.close_deadlines.push_back(Deadline {
            at: Instant::now() + crate::shard::CLOSE_GRACE,
            slot,
            generation,
        });
    }

    /// Queues bytes regardless of phase and cap (handshake answers, close frames).
    fn push_raw(&mut self, slot: u32, bytes: Bytes) {
        self.push_part(slot, OutPart::whole(bytes));
    }

    /// Queues one piece regardless of phase and cap.
    fn push_part(&mut self, slot: u32, part: OutPart) {
        let c = &mut self.conns[slot as usize];
        c.out_bytes += part.bytes.len();
        c.out.push_back(part);
        if !c.dirty && !c.want_write {
            c.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// Completes the upgrade: 101, welcome, implicit subscriptions, expiry.
    fn open(&mut self, slot: u32, up: &Upgrade, project: Arc<Project>, verified: Verified) {
        let Verified { claims, kid } = verified;
        let project_counter = project.nr_connections.clone();
        let hb_secs = self.limits.heartbeat.as_millis().div_ceil(1000) as u64;
        let id = ConnId {
            shard: self.id,
            slot,
            generation: self.conns[slot as usize].generation,
        };
        let welcome = Welcome {
            kind: "welcome",
            conn: id.to_string(),
            project: &project.id,
            user: &claims.sub,
            exp: claims.exp,
            heartbeat: hb_secs,
        };
        let welcome = serde_json::to_string(&welcome).expect("welcome serialises");
        // The 101 and the welcome go out as one pinned unit, marked started: a close caused
        // by bytes pipelined behind the upgrade truncates the queue, and must not take the
        // HTTP answer (or the welcome) with it. Both are only queued: nothing is written before
        // this function returns, after the implicit subscriptions below are in the node's
        // interest table, so a publish accepted once the client has the welcome reaches it.
        let answer = Bytes::from(handshake::accept_response(&up.key, up.subprotocol));
        let welcome = frame::text(welcome.as_bytes());
        self.push_part(
            slot,
            OutPart {
                bytes: answer,
                more: true,
                started: true,
            },
        );
        self.push_raw(slot, welcome);
        let project_idx = project.idx;
        let mut implicit = vec![Topic::all(), Topic::user(&claims.sub)];
        if let Some(d) = &claims.device {
            implicit.push(Topic::device(d));
        }
        let expires_at = expiry_of(claims.exp, project.leeway_secs);
        let now_ms = self.clock_ms();
        self.handshake_over(slot);
        let c = &mut self.conns[slot as usize];
        c.phase = ConnPhase::Open;
        c.expires_at = expires_at;
        c.msg_tat = self.clock_us;
        c.refresh_tat = now_ms;
        c.identity = Some(Box::new(Identity {
            project,
            user: claims.sub.into(),
            device: claims.device.map(Into::into),
            topics: claims
                .topics
                .map(|t| t.into_iter().map(Into::into).collect()),
            kid,
            connected_at: crate::hub::now_ms(),
        }));
        self.conns[slot as usize].subs = Vec::with_capacity(implicit.len());
        for t in &implicit {
            let sub = self.subscribe_slot(project_idx, t.as_str(), slot);
            self.conns[slot as usize].subs.push(sub);
        }
        self.conns[slot as usize].nr_implicit = implicit.len() as u8;
        let p = project_idx as usize;
        if self.by_project.len() <= p {
            self.by_project.resize_with(p + 1, Default::default);
        }
        self.by_project[p].insert(slot);
        if expires_at > 0 {
            self.push_expiry(expires_at, slot, id.generation);
        }
        let node = self.hub.nr_connections.fetch_add(1, Ordering::Relaxed) + 1;
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let in_project = project_counter.fetch_add(1, Ordering::Relaxed) + 1;
        let p = &self.conns[slot as usize]
            .identity
            .as_ref()
            .expect("set above")
            .project;
        self.watch_caps(node, p, in_project, true);
        self.stats.handshake(HandshakeOutcome::Accepted);
        debug!(conn = %id, "connection open");
    }

    fn on_frame_bytes(&mut self, slot: u32, data: &mut [u8]) {
        let max = self.limits.max_message_bytes;
        let c = &mut self.conns[slot as usize];
        let mut session = std::mem::take(&mut c.session);
        let mut inbuf = std::mem::take(&mut c.inbuf);
        let from_inbuf = !inbuf.is_empty();
        if from_inbuf {
            inbuf.extend_from_slice(data);
        }
        let buf: &mut [u8] = if from_inbuf { &mut inbuf } else { data };
        let result = session.feed(buf, max, &mut |ev| self.on_event(slot, ev));
        let c = &mut self.conns[slot as usize];
        c.session = session;
        if matches!(result, Ok(n) if n > 0) {
            c.rx_since_ping = true;
        }
        match result {
            Ok(consumed) if !c.kill => {
                let rest = &buf[consumed..];
                if rest.is_empty() {
                    c.inbuf = Vec::new();
                } else if from_inbuf {
                    inbuf.drain(..consumed);
                    c.inbuf = inbuf;
                } else {
                    c.inbuf = rest.to_vec();
                }
            }
            Ok(_) => {}
            Err(reason) => {
                debug!(peer = %c.peer, code = reason.code(), why = reason.text(), "protocol close");
                self.close_with(slot, reason);
                // The stream can no longer be parsed, so no close handshake can follow:
                // close the socket once our close frame is written (RFC 6455 §7.1.7).
                if let Some(c) = self.conns.get_mut(slot as usize) {
                    c.kill_after_flush = true;
                }
            }
        }
    }

    fn on_event(&mut self, slot: u32, ev: Event<'_>) -> Flow {
        // Every frame but a close takes a token: messages, fragments of one, pings and pongs
        // (a pong answering our heartbeat costs one token per interval).
        if !matches!(ev, Event::Close(_))
            && self.conns[slot as usize].phase == ConnPhase::Open
            && !self.take_message(slot)
        {
            let c = &self.conns[slot as usize];
            info!(
                peer = %c.peer,
                conn = %ConnId { shard: self.id, slot, generation: c.generation },
                "message rate limit exceeded; closing 4029"
            );
            // Replies to the messages taken before this one go out first (what the socket
            // takes now); the close then drops only what could not be written.
            self.flush(slot);
            self.close_with(slot, CloseReason::RateLimited);
            return Flow::Stop;
        }
        let c = &mut self.conns[slot as usize];
        match ev {
            Event::Ping(p) => {
                if c.phase == ConnPhase::Open {
                    let pong = frame::pong(p);
                    self.reply(slot, pong);
                }
                Flow::Continue
            }
            Event::Pong => {
                c.ping_outstanding = false;
                Flow::Continue
            }
            Event::Close(code) => {
                if c.phase == ConnPhase::Open {
                    // Echo the peer's code, then close once it is written.
                    let echo = frame::close_code(code.unwrap_or(1000), "");
                    c.phase = ConnPhase::Closing;
                    c.kill_after_flush = true;
                    ShardStats::add(&self.stats.closes[CloseReason::Normal.counter_index()], 1);
                    self.truncate_queue(slot);
                    self.push_raw(slot, echo);
                    self.arm_close_deadline(slot);
                } else {
                    // The answer to our own close: done.
                    self.kill(slot);
                }
                Flow::Stop
            }
            // Closing: what the peer sent before our close frame reached it is skipped, and
            // parsing goes on to its close answer (stopping here left that answer unread
            // behind the skipped frames until the close grace ran out).
            Event::Text(_) | Event::Fragment if c.phase != ConnPhase::Open => Flow::Continue,
            Event::Fragment => Flow::Continue,
            Event::Text(text) => self.on_text(slot, text),
        }
    }

    /// The per-connection message limit (GCRA): a message may arrive when the connection's
    /// theoretical arrival time is at most `msg_tolerance_us` ahead of now; each message moves
    /// it on by `msg_interval_us`. Times are on the shard's wrapping 32-bit microsecond clock;
    /// a time further ahead than the limiter can ever put it is stale (the connection was
    /// quiet), and the sweep refreshes such times long before the clock wraps.
    pub(crate) fn take_message(&mut self, slot: u32) -> bool {
        let interval = self.limits.msg_interval_us;
        if interval == 0 {
            return true;
        }
        let now = self.clock_us;
        let tolerance = self.limits.msg_tolerance_us;
        gcra_take(
            &mut self.conns[slot as usize].msg_tat,
            now,
            interval,
            tolerance,
        )
        .is_ok()
    }

    /// How far ahead of now a connection's message time can legitimately be.
    pub(crate) fn msg_stale_after(&self) -> u32 {
        self.limits
            .msg_tolerance_us
            .saturating_add(self.limits.msg_interval_us)
    }

    fn on_text(&mut self, slot: u32, text: &str) -> Flow {
        let Ok(req) = ops::parse(text) else {
            self.close_with(slot, CloseReason::InvalidData("invalid JSON"));
            return Flow::Stop;
        };
        let result = match req.op {
            Err(msg) => Err((ErrorCode::BadRequest, msg)),
            Ok(op) => self.execute(slot, op),
        };
        let json = match &result {
            Ok(Reply::Ack) => ops::ack(req.id, None),
            Ok(Reply::AckExp(exp)) => ops::ack(req.id, Some(*exp)),
            Ok(Reply::Pong) => ops::pong(req.id),
            Err((code, msg)) => ops::error(req.id, *code, msg),
        };
        self.reply(slot, frame::text(json.as_bytes()));
        if result.is_err() {
            let c = &mut self.conns[slot as usize];
            c.bad_requests += 1;
            if c.bad_requests > self.limits.max_bad_requests {
                self.close_with(slot, CloseReason::Policy("too many bad requests"));
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    fn execute(&mut self, slot: u32, op: Op<'_>) -> Result<Reply, (ErrorCode, String)> {
        let bad = |e: crate::pubsub::NameError| (ErrorCode::BadRequest, format!("bad topic: {e}"));
        match op {
            Op::Ping => Ok(Reply::Pong),
            Op::Subscribe(name) => {
                let topic = Topic::parse(name).map_err(bad)?;
                self.check_topic_allowed(slot, &topic)?;
                let c = &self.conns[slot as usize];
                let project = c
                    .identity
                    .as_ref()
                    .expect("open connections have one")
                    .project
                    .idx;
                if let Some(t) = self.topics.lookup(project, topic.as_str())
                    && c.subs.iter().any(|s| s.topic == t)
                {
                    return Ok(Reply::Ack);
                }
                let explicit = c.subs.len() - c.nr_implicit as usize;
                if explicit >= self.limits.max_topics_per_connection {
                    return Err((
                        ErrorCode::Limit,
                        format!(
                            "at most {} subscriptions per connection",
                            self.limits.max_topics_per_connection
                        ),
                    ));
                }
                // The ack is queued after this returns, so the interest table has the shard's
                // bit before the client can see it.
                let sub = self.subscribe_slot(project, topic.as_str(), slot);
                self.conns[slot as usize].subs.push(sub);
                Ok(Reply::Ack)
            }
            Op::Unsubscribe(name) => {
                let topic = Topic::parse(name).map_err(bad)?;
                if topic.is_implicit_only() || topic.as_str() == TOPIC_ALL {
                    return Err((
                        ErrorCode::Forbidden,
                        format!("`{topic}` is an implicit subscription"),
                    ));
                }
                let c = &self.conns[slot as usize];
                let project = c
                    .identity
                    .as_ref()
                    .expect("open connections have one")
                    .project
                    .idx;
                let found = self
                    .topics
                    .lookup(project, topic.as_str())
                    .and_then(|t| c.subs.iter().position(|s| s.topic == t));
                let Some(i) = found else {
                    return Err((ErrorCode::NotFound, format!("not subscribed to `{topic}`")));
                };
                self.unsubscribe_at(slot, i);
                Ok(Reply::Ack)
            }
            Op::Refresh(token) => self.refresh(slot, token),
            Op::Publish(name, data) => {
                let topic = Topic::parse(name).map_err(bad)?;
                let c = &self.conns[slot as usize];
                let id = c.identity.as_ref().expect("open connections have one");
                // Settings as they are now (a reload may have changed them).
                let registry = self.hub.registry.load();
                let Some(project) = registry.project(&id.project.id).cloned() else {
                    return Err((ErrorCode::Forbidden, "the project no longer exists".into()));
                };
                if !project.allow_client_publish {
                    return Err((
                        ErrorCode::Forbidden,
                        "this project does not let clients publish".into(),
                    ));
                }
                self.check_topic_allowed(slot, &topic)?;
                self.hub
                    .publish(project.idx, std::slice::from_ref(&topic), data)
                    .map(|_| {
                        ShardStats::add(&self.stats.published, 1);
                        Reply::Ack
                    })
                    .map_err(|e| (ErrorCode::Limit, e.to_string()))
            }
        }
    }

    /// `refresh`: the new token is verified with the project's keys as they are now (rotated
    /// in or revoked since the connection opened) and must name the same `sub`; its claims
    /// then replace the old ones: expiry, `kid`, the `device` topic and the `topics`
    /// allowlist. Explicit subscriptions the new token does not allow are dropped, each with
    /// an `unsubscribed` message, before the ack.
    fn refresh(&mut self, slot: u32, token: &str) -> Result<Reply, (ErrorCode, String)> {
        if let Err(wait_ms) = self.take_refresh(slot) {
            // Per connection at most `ws.max_bad_requests` of these before it is closed 1008.
            debug!(
                conn = %ConnId { shard: self.id, slot, generation: self.conns[slot as usize].generation },
                wait_ms,
                "refresh over limits.refreshes_per_conn_per_min; refused"
            );
            return Err((
                ErrorCode::RateLimited,
                format!(
                    "at most {} refreshes per minute (burst {}); retry in {} s",
                    self.limits.refreshes_per_min,
                    self.limits.refresh_burst,
                    wait_ms.div_ceil(1000).max(1)
                ),
            ));
        }
        let c = &self.conns[slot as usize];
        let id = c.identity.as_ref().expect("open connections have one");
        let registry = self.hub.registry.load();
        let Some(project) = registry.project(&id.project.id) else {
            return Err((ErrorCode::Forbidden, "the project no longer exists".into()));
        };
        let Verified { claims, kid } = project
            .verify(token)
            .map_err(|e| (ErrorCode::Forbidden, format!("refresh refused: {e}")))?;
        if *claims.sub != *id.user {
            return Err((ErrorCode::Forbidden, "refresh token has another sub".into()));
        }
        let expires_at = expiry_of(claims.exp, project.leeway_secs);
        let (generation, old_expiry) = (c.generation, c.expires_at);
        self.set_device(slot, claims.device.as_deref());
        let c = &mut self.conns[slot as usize];
        c.expires_at = expires_at;
        let id = c.identity.as_mut().expect("checked above");
        id.kid = kid;
        id.topics = claims
            .topics
            .map(|t| t.into_iter().map(Into::into).collect());
        self.drop_disallowed(slot);
        // The heap's entry for the old expiry is now stale; an unchanged one is still live.
        if expires_at > 0 && expires_at != old_expiry {
            self.push_expiry(expires_at, slot, generation);
        }
        Ok(Reply::AckExp(claims.exp))
    }

    /// Takes a token from the connection's refresh bucket (GCRA on the shard's millisecond
    /// clock).
    ///
    /// # Errors
    /// Over the limit: milliseconds until a refresh is allowed again.
    fn take_refresh(&mut self, slot: u32) -> Result<(), u32> {
        let (interval, tolerance) = (
            self.limits.refresh_interval_ms,
            self.limits.refresh_tolerance_ms,
        );
        if interval == 0 {
            return Ok(());
        }
        let now = self.clock_ms();
        gcra_take(
            &mut self.conns[slot as usize].refresh_tat,
            now,
            interval,
            tolerance,
        )
    }

    /// How far ahead of now a connection's refresh time can legitimately be.
    pub(crate) fn refresh_stale_after(&self) -> u32 {
        self.limits
            .refresh_tolerance_ms
            .saturating_add(self.limits.refresh_interval_ms)
    }

    /// Replaces the connection's implicit `device.<id>` subscription (the last implicit one)
    /// when a refresh changed or removed the `device` claim.
    fn set_device(&mut self, slot: u32, device: Option<&str>) {
        let c = &mut self.conns[slot as usize];
        let id = c.identity.as_mut().expect("open connections have one");
        if id.device.as_deref() == device {
            return;
        }
        let project = id.project.idx;
        let had = id.device.is_some();
        id.device = device.map(Into::into);
        if had {
            c.nr_implicit -= 1;
            let sub = c.subs.remove(c.nr_implicit as usize);
            self.release_sub(sub);
        }
        if let Some(d) = device {
            let sub = self.subscribe_slot(project, Topic::device(d).as_str(), slot);
            let c = &mut self.conns[slot as usize];
            c.subs.insert(c.nr_implicit as usize, sub);
            c.nr_implicit += 1;
        }
    }

    /// Drops the explicit subscriptions the connection's `topics` allowlist does not allow,
    /// telling the client about each (in subscription order).
    fn drop_disallowed(&mut self, slot: u32) {
        let c = &self.conns[slot as usize];
        let Some(allowed) = &c.identity.as_ref().expect("open").topics else {
            return;
        };
        let dropped: Vec<(usize, String)> = (c.nr_implicit as usize..c.subs.len())
            .map(|i| (i, self.topics.name(c.subs[i].topic)))
            .filter(|(_, name)| *name != TOPIC_ALL && !topic_permitted(allowed, name))
            .map(|(i, name)| (i, name.to_owned()))
            .collect();
        if dropped.is_empty() {
            return;
        }
        debug!(
            conn = %ConnId { shard: self.id, slot, generation: c.generation },
            dropped = dropped.len(),
            "refresh narrowed the token's topics; subscriptions dropped"
        );
        // Highest position first: the positions still to remove do not shift.
        for (i, _) in dropped.iter().rev() {
            self.unsubscribe_at(slot, *i);
        }
        for (_, name) in &dropped {
            let msg = ops::unsubscribed(name, ops::DropReason::NotAllowed);
            self.reply(slot, frame::text(msg.as_bytes()));
        }
    }

    /// Explicit subscribe/publish rules: never `user.`/`device.`, and within the token's
    /// `topics` claim when it has one.
    fn check_topic_allowed(&self, slot: u32, topic: &Topic) -> Result<(), (ErrorCode, String)> {
        if topic.is_implicit_only() {
            return Err((
                ErrorCode::Forbidden,
                "user. and device. topics cannot be subscribed to explicitly".into(),
            ));
        }
        let id = self.conns[slot as usize]
            .identity
            .as_ref()
            .expect("open connections have one");
        if let Some(allowed) = &id.topics
            && topic.as_str() != TOPIC_ALL
            && !topic_permitted(allowed, topic.as_str())
        {
            return Err((
                ErrorCode::Forbidden,
                format!("the token does not allow `{topic}`"),
            ));
        }
        Ok(())
    }

    /// Removes `subs[i]` of a connection, keeping the others in subscription order (the
    /// `unsubscribed` messages and the connection listing follow it; a list holds at most the
    /// implicit topics and `max_topics_per_connection`, so the shift is short), and fixes the
    /// position record of the connection whose slot moved into the freed place.
    fn unsubscribe_at(&mut self, slot: u32, i: usize) {
        let sub = self.conns[slot as usize].subs.remove(i);
        self.release_sub(sub);
    }

    /// Adds `slot` to a topic of the index. The topic's first local subscriber declares the
    /// shard's interest to the broker, which returns once the node's interest table has the
    /// shard's bit: whatever the caller queues afterwards (an ack, the welcome) reaches the
    /// client only when publishes of the topic are routed here.
    fn subscribe_slot(&mut self, project: u32, name: &str, slot: u32) -> Sub {
        let s = self.topics.subscribe(project, name, slot);
        if s.first {
            self.hub.broker.subscribe(self.id as usize, project, name);
        }
        s.sub
    }

    /// Takes a subscription (already removed from its connection's list) out of the topic
    /// index and fixes the position record of the connection whose slot moved into its place.
    /// The topic's last local unsubscribe withdraws the shard's interest; a publication
    /// already routed here still arrives and finds no subscriber.
    fn release_sub(&mut self, sub: Sub) {
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

    /// Queues a reply to the connection itself; over the cap it is a slow consumer too.
    fn reply(&mut self, slot: u32, frame: Bytes) {
        let cap = self.limits.max_outbound_queue_bytes;
        if push_frame(&mut self.conns, &mut self.dirty, slot, &[&frame], cap) == Push::Overflow {
            ShardStats::add(&self.stats.slow_consumer_closes, 1);
            self.close_with(slot, CloseReason::SlowConsumer);
        }
    }

    /// Drops queued frames that have not started to go out (a partly written frame must
    /// finish, every piece of it, or the stream would be corrupt).
    fn truncate_queue(&mut self, slot: u32) {
        self.conns[slot as usize].truncate_out();
    }

    /// Starts the closing handshake with `reason`: unsent messages are dropped, the close
    /// frame is queued, and the peer has [`crate::shard::CLOSE_GRACE`] to answer.
    pub(crate) fn close_with(&mut self, slot: u32, reason: CloseReason) {
        let Some(c) = self.conns.get_mut(slot as usize) else {
            return;
        };
        match c.phase {
            ConnPhase::Closing => return,
            ConnPhase::Handshake => {
                self.kill(slot);
                return;
            }
            ConnPhase::Open => {}
        }
        c.phase = ConnPhase::Closing;
        ShardStats::add(&self.stats.closes[reason.counter_index()], 1);
        // A drain sends what was published before it (every publish answered 2xx reaches the
        // connections open then), then the close; every other close drops the backlog.
        if reason != CloseReason::GoingAway {
            self.truncate_queue(slot);
        }
        self.push_raw(slot, frame::close(reason));
        self.arm_close_deadline(slot);
    }

    /// Ends the connection: its task wakes, removes it and closes the socket.
    pub(crate) fn kill(&mut self, slot: u32) {
        if let Some(c) = self.conns.get_mut(slot as usize) {
            c.kill = true;
            c.wake();
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
        while !c.out.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (i, f) in c.out.iter().take(MAX_IOV).enumerate() {
                let f = &f.bytes;
                iov[i] = IoSlice::new(if i == 0 { &f[c.out_head as usize..] } else { f });
                n += 1;
            }
            match send_vectored(c.fd, &iov[..n]) {
                Ok(mut written) => {
                    ShardStats::add(&self.stats.bytes_out, written as u64);
                    c.out_bytes -= written;
                    while written > 0 {
                        let left = c.out[0].bytes.len() - c.out_head as usize;
                        if written >= left {
                            written -= left;
                            let done = c.out.pop_front();
                            c.out_head = 0;
                            if done.is_some_and(|p| p.more)
                                && let Some(next) = c.out.front_mut()
                            {
                                next.started = true;
                            }
                        } else {
                            // Below the frame's length, which fits a u32 (message
                            // sizes are capped far below 4 GiB).
                            c.out_head += written as u32;
                            written = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !c.want_write {
                        c.want_write = true;
                        c.wake();
                    }
                    return;
                }
                Err(_) => {
                    c.kill = true;
                    c.wake();
                    return;
                }
            }
        }
        c.out = VecDeque::new();
        if c.want_write {
            c.want_write = false;
            c.wake();
        }
        if c.kill_after_flush {
            c.kill = true;
            c.wake();
        }
    }

    /// Flushes every connection queued to since the last flush.
    pub(crate) fn flush_dirty(&mut self) {
        while let Some(slot) = self.dirty.pop() {
            if self.conns.get(slot as usize).is_some_and(|c| c.dirty) {
                self.flush(slot);
            }
        }
    }

    /// After a connection opened (`rose`) or closed: logs the 90%-of-cap warnings once per
    /// rise, and their re-arming below 80% (see [`crate::limiter::cap_rose`]).
    fn watch_caps(&self, node: usize, p: &Project, in_project: usize, rose: bool) {
        let check = if rose {
            crate::limiter::cap_rose
        } else {
            crate::limiter::cap_fell
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

    /// Called by the connection's task when it ends: unsubscribes, counts, frees the slot.
    pub(crate) fn remove(&mut self, slot: u32, generation: u32) {
        if self.occupant(slot, generation).is_none() {
            return;
        }
        while !self.conns[slot as usize].subs.is_empty() {
            let last = self.conns[slot as usize].subs.len() - 1;
            self.unsubscribe_at(slot, last);
        }
        let c = self.conns.remove(slot as usize);
        let in_handshake = c.phase == ConnPhase::Handshake;
        if in_handshake {
            self.pending_handshakes -= 1;
        }
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
        self.on_removed();
    }
}

/// The first frame of a connection (field order as in protocol.md).
#[derive(serde::Serialize)]
struct Welcome<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    conn: String,
    project: &'a str,
    user: &'a str,
    exp: Option<u64>,
    heartbeat: u64,
}

/// A successful op's reply.
enum Reply {
    Ack,
    AckExp(Option<u64>),
    Pong,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, F: Future>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    fn open_conn(conns: &mut Slab<Conn>) -> u32 {
        let mut c = Conn::new(-1, 1, "127.0.0.1:1".parse().unwrap());
        c.phase = ConnPhase::Open;
        conns.insert(c) as u32
    }

    #[test]
    fn a_frame_of_the_cap_fits_an_empty_queue_and_no_more() {
        let mut conns = Slab::new();
        let mut dirty = Vec::new();
        let slot = open_conn(&mut conns);
        let (head, body) = (Bytes::from_static(b"head"), Bytes::from(vec![b'x'; 96]));
        let push = |conns: &mut Slab<Conn>, dirty: &mut Vec<u32>, cap| {
            push_frame(conns, dirty, slot, &[&head, &body], cap)
        };
        assert_eq!(push(&mut conns, &mut dirty, 99), Push::Overflow);
        assert_eq!(push(&mut conns, &mut dirty, 100), Push::Queued);
        assert_eq!(push(&mut conns, &mut dirty, 199), Push::Overflow);
        assert_eq!(push(&mut conns, &mut dirty, 200), Push::Queued);
        let c = &conns[slot as usize];
        assert_eq!((c.out.len(), c.out_bytes), (4, 200));
        assert!(
            c.out[1].bytes.as_ptr() == body.as_ptr() && c.out[3].bytes.as_ptr() == body.as_ptr(),
            "the body is shared, not copied"
        );
    }

    #[test]
    fn truncation_keeps_every_piece_of_a_started_frame() {
        let mut conns = Slab::new();
        let mut dirty = Vec::new();
        let slot = open_conn(&mut conns);
        let (head, body) = (Bytes::from_static(b"head"), Bytes::from_static(b"body"));
        for _ in 0..2 {
            push_frame(&mut conns, &mut dirty, slot, &[&head, &body], 1000);
        }
        let c = &mut conns[slot as usize];
        c.truncate_out();
        assert_eq!(
            (c.out.len(), c.out_bytes),
            (0, 0),
            "nothing started: all dropped"
        );
        for _ in 0..2 {
            push_frame(&mut conns, &mut dirty, slot, &[&head, &body], 1000);
        }
        let c = &mut conns[slot as usize];
        // The head of the first frame went out; its body must follow.
        c.out.pop_front();
        c.out[0].started = true;
        c.out_bytes -= 4;
        c.truncate_out();
        assert_eq!((c.out.len(), c.out_bytes), (1, 4));
        assert_eq!(&c.out[0].bytes[..], b"body");
        // Half of a one-piece frame went out.
        c.out_head = 2;
        c.out[0].started = false;
        c.out_bytes = 2;
        c.truncate_out();
        assert_eq!((c.out.len(), c.out_bytes), (1, 2));
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

    /// The idle-memory budget (~1 KiB per connection) is dominated by the connection task:
    /// monoio adds a 48 B header, so a future of at most 336 B lands in mimalloc's 384 B size
    /// class (448 B did, in the 512 B class, before `Wait` replaced a three-way `select!`).
    #[test]
    fn idle_connection_footprint() {
        let task = future_size(drive);
        let conn = std::mem::size_of::<Conn>();
        eprintln!("drive future {task} B, Conn {conn} B");
        assert!(task <= 336, "drive future is {task} B");
        assert!(conn <= 192, "Conn is {conn} B");
    }
}
