//! What a connection does to its shard: the handshake (PROXY header, upgrade, admission,
//! welcome), the client ops, refresh, the message and refresh limits, the close handshake and
//! the bookkeeping when a connection opens.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::{AcceptRefusal, Deadline, Shard};
use crate::auth::{AuthError, Project, Verified};
use crate::metrics::ShardStats;
use crate::net::proxy::{self, ProxyHeader};
use crate::pubsub::{ConnId, Sub, TOPIC_ALL, Topic, Unsubscribed, topic_permitted};
use crate::ws::close::CloseReason;
use crate::ws::conn::{ConnPhase, Identity, OutPart, Push, expiry_of, gcra_take, push_frame};
use crate::ws::frame;
use crate::ws::handshake::{self, HandshakeOutcome, Refusal, Upgrade};
use crate::ws::ops::{self, ErrorCode, Op};
use crate::ws::session::{Event, Flow};

/// `Retry-After` for a refusal over `limits.connections_per_ip`: connections from an address
/// free up as its clients leave, not at a rate.
const IP_LIMIT_RETRY_SECS: u32 = 5;

impl Shard {
    pub(super) fn on_bytes(&mut self, slot: u32, data: &mut [u8]) {
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
            at: Instant::now() + super::CLOSE_GRACE,
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
    pub(super) fn unsubscribe_at(&mut self, slot: u32, i: usize) {
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
    /// frame is queued, and the peer has [`super::CLOSE_GRACE`] to answer.
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

    /// After a connection opened (`rose`) or closed: logs the 90%-of-cap warnings once per
    /// rise, and their re-arming below 80% (see [`crate::limiter::cap_rose`]).
    pub(super) fn watch_caps(&self, node: usize, p: &Project, in_project: usize, rose: bool) {
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
