//! The connection machine, sans-IO: what one connection does with the bytes it receives and
//! with the passing of time, from the upgrade request to the close handshake. Handshake
//! admission, the client ops, refresh and expiry, the message and refresh limits, heartbeat
//! accounting and the close handshake are decided here.
//!
//! It owns no socket and reads no clock: the shard's I/O driver (`crate::shard`) hands it
//! `(bytes, now)` and the facts only the shard knows (projects, the key set tokens verify
//! with, caps, the topic index) through [`Host`], and executes the actions it takes through
//! the same trait (queue a frame, subscribe, publish, arm a deadline, kill). The state it
//! runs on is the connection's [`Conn`], which the shard keeps in its slab; the machine is
//! generic over the host, so nothing here costs a virtual call.
//!
//! Unit tests drive it with a host that records actions: no sockets, no real clock.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::value::RawValue;
use tracing::{debug, info};

use super::close::CloseReason;
use super::codec::stomp::{self, Destination};
use super::codec::{Codec, Opened};
use super::conn::{Conn, ConnPhase, Identity, OutPart, Push, expiry_of, gcra_take};
use super::frame;
use super::handshake::{self, HandshakeOutcome, Refusal, Upgrade};
use super::ops::{ErrorCode, Op};
use super::recovery;
use super::session::{Event, Flow};
use super::sockjs;
use crate::auth::{AuthError, Project, Verified};
use crate::protection::proxy::{self, ProxyHeader};
use crate::pubsub::{ConnId, Sub, TOPIC_ALL, Topic, TopicId, topic_permitted};

/// How long a closing connection may take to answer our close frame.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// `Retry-After` for a refusal over `limits.connections_per_ip`: connections from an address
/// free up as its clients leave, not at a rate.
const IP_LIMIT_RETRY_SECS: u32 = 5;

/// The time an event happens at, read once by the driver per event and handed in.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time (deadlines, the handshake limiter).
    pub at: Instant,
    /// The shard's wrapping microsecond clock (the message limiter).
    pub us: u32,
    /// The shard's wrapping millisecond clock (the refresh limiter).
    pub ms: u32,
    /// Wall-clock milliseconds since the Unix epoch (token expiry, connect time).
    pub unix_ms: u64,
}

impl Now {
    /// Wall-clock seconds since the Unix epoch.
    pub fn unix_secs(&self) -> u64 {
        self.unix_ms / 1000
    }
}

/// The rules the machine applies, taken from the shard's limits once.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Largest upgrade request (and PROXY header).
    pub max_handshake_bytes: usize,
    /// Largest client message.
    pub max_message_bytes: usize,
    /// Explicit subscriptions per connection.
    pub max_topics_per_connection: usize,
    /// Error replies before close 1008.
    pub max_bad_requests: u32,
    /// The message limit, on the shard's microsecond clock (`limits.messages_per_conn_per_sec`,
    /// `limits.message_burst_per_conn`).
    pub messages: Rate,
    /// The `refresh` limit, on the shard's millisecond clock.
    pub refreshes: Rate,
    /// `limits.refreshes_per_conn_per_min`, for the error message.
    pub refreshes_per_min: u32,
    /// `limits.refresh_burst_per_conn`, for the error message.
    pub refresh_burst: u32,
    /// The heartbeat interval the welcome announces, whole seconds.
    pub heartbeat_secs: u64,
    /// Connections start with a PROXY protocol header (a trusted proxy's).
    pub proxy_protocol: bool,
}

/// A GCRA limit on a wrapping 32-bit clock (see `gcra_take`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Rate {
    /// Clock units between events at the sustained rate; 0 = no limit.
    pub interval: u32,
    /// How far ahead of the sustained rate a connection may run (the burst), clock units.
    pub tolerance: u32,
}

impl Rate {
    /// Takes one event's token.
    ///
    /// # Errors
    /// Over the limit: clock units until the event would be allowed.
    fn take(self, tat: &mut u32, now: u32) -> Result<(), u32> {
        if self.interval == 0 {
            return Ok(());
        }
        gcra_take(tat, now, self.interval, self.tolerance)
    }

    /// How far ahead of now a connection's theoretical arrival time can legitimately be.
    pub fn stale_after(self) -> u32 {
        self.tolerance.saturating_add(self.interval)
    }
}

/// What the machine needs from the shard it runs on: facts only the shard knows, and the
/// actions the shard executes for it. One host value stands for one connection.
pub trait Host {
    /// The connection's state.
    fn conn(&mut self) -> &mut Conn;
    /// The rules in force.
    fn rules(&self) -> &Rules;
    /// The connection's STOMP conversation, if it speaks STOMP (kept beside its `Conn`, so a
    /// connection of another protocol pays nothing for it).
    fn stomp(&mut self) -> Option<&mut stomp::Session>;
    /// Starts the connection's STOMP conversation.
    fn start_stomp(&mut self, session: Box<stomp::Session>);
    /// The connection's id.
    fn conn_id(&self) -> ConnId;

    // Admission facts.

    /// Names the client a trusted proxy announced, checks it against the global `[access]`
    /// lists and counts it against its address. `None`: refused by `[access]` (nothing
    /// counted); `Some(over)`: counted, `over` when the address already held
    /// `limits.connections_per_ip` connections.
    fn name_client(&mut self, ip: IpAddr) -> Option<bool>;
    /// The client an `X-Forwarded-For` value from a trusted proxy names, if any.
    fn forwarded_client(&self, header: &str) -> Option<IpAddr>;
    /// Takes a handshake token of the address.
    ///
    /// # Errors
    /// The bucket is empty: seconds until a token is due.
    fn take_handshake_token(&mut self, ip: IpAddr, at: Instant) -> Result<(), u32>;
    /// `limits.connections_per_ip`.
    fn ip_limit(&self) -> usize;
    /// A project of the registry as it is now.
    fn project(&self, id: &str) -> Option<Arc<Project>>;
    /// Verifies a token with the project's keys as they are now.
    ///
    /// # Errors
    /// Why the token is refused.
    fn verify(&self, project: &Project, token: &str) -> Result<Verified, AuthError>;
    /// Open connections on the node and `server.max_connections` (0 = no cap).
    fn node_connections(&self) -> (usize, usize);
    /// The shard is draining: no connection opens any more.
    fn draining(&self) -> bool;

    // Actions.

    /// Moves the connection to another phase of its life.
    fn set_phase(&mut self, to: ConnPhase);
    /// Counts a handshake's outcome.
    fn outcome(&mut self, outcome: HandshakeOutcome);
    /// Counts and logs a refused handshake (the answer is queued by the machine).
    fn refused(&mut self, refusal: &Refusal, at: Instant);
    /// A client a PROXY header names is refused by `[access]`: counted and logged as a socket
    /// closed unread (the machine then kills the connection).
    fn denied(&mut self, peer: SocketAddr);
    /// The connection is open (identity and implicit subscriptions set): count it.
    fn opened(&mut self);
    /// Counts a close frame sent for `reason`.
    fn closing(&mut self, reason: CloseReason);
    /// Queues a frame to the open connection, within its queue cap.
    fn send(&mut self, frame: &[&Bytes]) -> Push;
    /// Queues a piece regardless of phase and cap (handshake answers, close frames).
    fn send_raw(&mut self, part: OutPart);
    /// Drops the queued frames that have not started to go out (`Conn::truncate_out`); a
    /// host that keeps a total of its queues overrides it to count the bytes dropped.
    fn truncate_out(&mut self) {
        self.conn().truncate_out();
    }
    /// Writes what the socket takes now.
    fn flush(&mut self);
    /// Ends the connection (the driver removes it).
    fn kill(&mut self);
    /// Kills the connection at `at` if it is still closing.
    fn arm_close_deadline(&mut self, at: Instant);
    /// Calls [`on_expiry`] with `at` once the wall clock reaches `at` (seconds).
    fn arm_expiry(&mut self, at: u32);
    /// Adds the connection to a topic of the project (declaring the shard's interest first if
    /// it is the topic's first local subscriber).
    fn subscribe(&mut self, project: u32, topic: &str) -> Sub;
    /// Takes a subscription (already removed from the connection's list) out of the index.
    fn release(&mut self, sub: Sub);
    /// Holds `ack`, the acknowledgement of a new subscription to `topic`, until the node
    /// receives the topic's publications from every node (its engine subscription exists) and
    /// sends it then: `true`. `false`: nothing to wait for (a node of its own); the machine
    /// sends it now.
    fn hold_until_subscribed(&mut self, project: u32, topic: &str, ack: &Bytes) -> bool;
    /// The welcome waits for `topic`, an implicit subscription just made, by the rule of
    /// [`Host::hold_until_subscribed`]: `true` when it does. Default: it never waits.
    fn welcome_waits_for(&mut self, project: u32, topic: &str) -> bool {
        let _ = (project, topic);
        false
    }
    /// Holds `welcome` until every topic it waits for ([`Host::welcome_waits_for`]) is
    /// subscribed, then sends it, followed by whatever the connection was sent meanwhile:
    /// `true`. `false`: it waits for nothing; the machine queues it now.
    fn hold_welcome(&mut self, welcome: &Bytes) -> bool {
        let _ = welcome;
        false
    }
    /// The welcome, made once the positions of the implicit topics were read from the
    /// engine ([`Fetch::welcome`]): it goes once it waits for nothing else
    /// ([`Host::hold_welcome`]).
    fn welcome_read(&mut self, welcome: Bytes) {
        let _ = welcome;
    }
    /// Whether streams are read from an engine ([`Host::fetch_history`]) rather than from the
    /// node's store, which is then the stream.
    fn fetches_history(&self) -> bool {
        false
    }
    /// Reads the streams of `then`'s topics (topics with history the connection is
    /// subscribed to) from the engine into the node's copy, once the node's engine
    /// subscriptions exist, then calls [`fetched`] with `then`. Only when
    /// [`Host::fetches_history`].
    fn fetch_history(&mut self, project: u32, then: Fetch) {
        let _ = (project, then);
    }
    /// The topic of the project with local subscribers, if any.
    fn lookup(&self, project: u32, topic: &str) -> Option<TopicId>;
    /// A topic's name.
    fn topic_name(&self, topic: TopicId) -> &str;
    /// The node's message history, read by subscribers once subscribed ([`crate::history`]).
    fn history(&self) -> &crate::history::History;
    /// Publishes a client's message.
    ///
    /// # Errors
    /// Why the publish was refused.
    fn publish(
        &mut self,
        project: u32,
        topic: &Topic,
        data: &serde_json::value::RawValue,
    ) -> Result<(), String>;
}

/// Bytes arrived: the upgrade request, or frames.
pub fn on_bytes<H: Host>(h: &mut H, now: Now, data: &mut [u8]) {
    let c = h.conn();
    match c.phase {
        // A STOMP connection whose upgrade was answered waits in its handshake for the token
        // in `CONNECT`: what follows the upgrade is frames.
        ConnPhase::Handshake if c.codec == Codec::Stomp => on_frame_bytes(h, now, data),
        ConnPhase::Handshake => on_handshake_bytes(h, now, data),
        ConnPhase::Open | ConnPhase::Closing => on_frame_bytes(h, now, data),
    }
}

fn on_handshake_bytes<H: Host>(h: &mut H, now: Now, data: &[u8]) {
    let max = h.rules().max_handshake_bytes;
    let proxied = h.rules().proxy_protocol;
    let c = h.conn();
    let mut buf = c.take_inbuf();
    buf.extend_from_slice(data);
    if !c.client_known && proxied {
        match proxy::parse_header(&buf) {
            ProxyHeader::Incomplete if buf.len() <= max => h.conn().set_inbuf(buf),
            ProxyHeader::Incomplete => refuse(
                h,
                now,
                Refusal::bad_request("PROXY protocol header too long"),
            ),
            ProxyHeader::Invalid(why) => refuse(h, now, Refusal::bad_request(why)),
            ProxyHeader::Complete { len, client } => {
                let peer = client.unwrap_or(h.conn().peer);
                if name_client(h, peer).is_err() {
                    // Refused by [access], like a direct peer: closed without an answer.
                    h.denied(peer);
                    h.kill();
                    return;
                }
                if buf.len() > len {
                    on_handshake_bytes(h, now, &buf[len..]);
                }
            }
        }
        return;
    }
    if let Some(req) = sockjs::plain_request(&buf) {
        sockjs_plain(h, now, &req);
        return;
    }
    let too_long = || Refusal::bad_request(format!("upgrade request over {max} bytes"));
    match handshake::parse(&buf) {
        Ok(None) if buf.len() > max => refuse_request(h, now, too_long()),
        Ok(None) => h.conn().set_inbuf(buf),
        Err(r) => refuse_request(h, now, r),
        Ok(Some(up)) if up.len > max => refuse_request(h, now, too_long()),
        Ok(Some(up)) => match forwarded_check(h, &up)
            .and_then(|()| rate_check(h, now))
            .and_then(|()| authenticate(h, &up, up.token.as_ref().map(|(t, _)| t.as_str())))
        {
            Err(r) => refuse(h, now, r),
            Ok((project, verified)) => {
                open(h, now, &up, project, verified);
                let rest = &mut buf[up.len..];
                if !rest.is_empty() {
                    on_frame_bytes(h, now, rest);
                }
            }
        },
    }
}

/// A trusted proxy's connection in `X-Forwarded-For` mode names its client now: the
/// address lists and the per-address count apply to the client from here on.
fn forwarded_check<H: Host>(h: &mut H, up: &Upgrade) -> Result<(), Refusal> {
    let c = h.conn();
    if c.client_known {
        return Ok(());
    }
    // No header: the proxy's own connection. A header that names no usable client is
    // refused: falling back to the proxy's address would let a client escape its own
    // address's lists and limits by sending garbage.
    let peer = match up.forwarded_for.as_deref() {
        None => c.peer,
        Some(v) => match h.forwarded_client(v) {
            Some(ip) => SocketAddr::new(ip, 0),
            None => {
                return Err(Refusal::bad_request(
                    "X-Forwarded-For from a trusted proxy names no client address",
                ));
            }
        },
    };
    name_client(h, peer).map_err(|()| Refusal::forbidden("this address may not connect"))
}

/// Records the client a trusted proxy named and counts it against its address.
///
/// # Errors
/// The global `[access]` lists refuse the client (nothing is counted).
fn name_client<H: Host>(h: &mut H, peer: SocketAddr) -> Result<(), ()> {
    let over = h.name_client(peer.ip()).ok_or(())?;
    let c = h.conn();
    c.peer = peer;
    c.client_known = true;
    c.over_ip_limit = over;
    Ok(())
}

/// The per-address handshake token bucket (unless a token was taken at accept): 429 with
/// `Retry-After`. Nothing to take for a trusted proxy's connection whose client is not
/// named yet.
fn charge<H: Host>(h: &mut H, now: Now) -> Result<(), Refusal> {
    let c = h.conn();
    if c.hs_charged || !c.client_known {
        return Ok(());
    }
    let ip = c.peer.ip();
    h.take_handshake_token(ip, now.at)
        .map_err(|secs| Refusal::rate_limited("too many handshakes from this address", secs))?;
    h.conn().hs_charged = true;
    Ok(())
}

/// Refuses a request that was read but cannot be served (malformed, too long): it counts
/// against its address's handshake rate like any other, so over the rate the answer is
/// 429, not the reason.
fn refuse_request<H: Host>(h: &mut H, now: Now, r: Refusal) {
    let r = charge(h, now).err().unwrap_or(r);
    refuse(h, now, r);
}

/// The per-address handshake token bucket and concurrent-connection limit (429 with
/// `Retry-After`).
fn rate_check<H: Host>(h: &mut H, now: Now) -> Result<(), Refusal> {
    charge(h, now)?;
    if h.conn().over_ip_limit {
        return Err(Refusal::rate_limited(
            format!("more than {} connections from this address", h.ip_limit()),
            IP_LIMIT_RETRY_SECS,
        ));
    }
    Ok(())
}

/// Admits a connection with `token` (from the upgrade, or from a STOMP `CONNECT`). A STOMP
/// upgrade without one passes with `None`: the project's address and `Origin` rules are
/// checked now, the token and the caps when its `CONNECT` comes.
fn authenticate<H: Host>(
    h: &mut H,
    up: &Upgrade,
    token: Option<&str>,
) -> Result<(Arc<Project>, Option<Verified>), Refusal> {
    let peer = h.conn().peer;
    let project = h
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
    let Some(token) = token else {
        if up.stomp {
            return Ok((project, None));
        }
        return Err(Refusal::unauthorized(AuthError::Missing.to_string()));
    };
    let verified = h
        .verify(&project, token)
        .map_err(|e| Refusal::unauthorized(e.to_string()))?;
    let (open, max) = h.node_connections();
    if max > 0 && open >= max {
        return Err(Refusal::at_capacity(format!(
            "server at its cap of {max} connections"
        )));
    }
    let pmax = project.max_connections;
    if pmax > 0
        && project
            .nr_connections
            .load(std::sync::atomic::Ordering::Relaxed)
            >= pmax
    {
        return Err(Refusal::at_capacity(format!(
            "project `{}` at its cap of {pmax} connections",
            project.id
        )));
    }
    if h.draining() {
        return Err(Refusal::at_capacity("server is draining"));
    }
    Ok((project, Some(verified)))
}

/// A plain HTTP request to a SockJS path: `<base>/info` (and its CORS preflight) is
/// answered for a project that exists; any other SockJS transport is refused 404, since only
/// WebSocket is served. The connection is closed once the answer is written. It counts
/// against the address's handshake rate like an upgrade.
fn sockjs_plain<H: Host>(h: &mut H, now: Now, req: &sockjs::Plain) {
    if let Err(r) = charge(h, now) {
        refuse(h, now, r);
        return;
    }
    let project = match &req.route {
        sockjs::PlainRoute::Info(p) => p,
        sockjs::PlainRoute::InfoWithoutProject => {
            let r = Refusal::bad_request(
                "the SockJS base /sockjs needs the project in a `projectId` query parameter \
                 (or use the base /sockjs/{project})",
            );
            refuse(h, now, r);
            return;
        }
        sockjs::PlainRoute::NotServed => {
            let r = Refusal {
                status: 404,
                error: "not_found",
                message: "only SockJS's websocket transport is served: \
                          <base>/info and <base>/{server}/{session}/websocket"
                    .into(),
                retry_after: None,
            };
            refuse(h, now, r);
            return;
        }
    };
    if h.project(project).is_none() {
        refuse(h, now, Refusal::unknown_project(project));
        return;
    }
    debug!(conn = %h.conn_id(), project, preflight = req.preflight, "SockJS info answered");
    // The entropy is for clients that want a random seed; its source need not be strong.
    let entropy = (now.unix_ms as u32) ^ now.us.rotate_left(16);
    h.send_raw(OutPart::whole(Bytes::from(sockjs::info_response(
        req, entropy,
    ))));
    h.set_phase(ConnPhase::Closing);
    h.conn().kill_after_flush = true;
    h.arm_close_deadline(now.at + CLOSE_GRACE);
}

/// Answers a refused handshake and closes once the answer is written.
fn refuse<H: Host>(h: &mut H, now: Now, r: Refusal) {
    h.refused(&r, now.at);
    h.send_raw(OutPart::whole(Bytes::from(r.response())));
    h.set_phase(ConnPhase::Closing);
    h.conn().kill_after_flush = true;
    h.arm_close_deadline(now.at + CLOSE_GRACE);
}

/// Completes the upgrade: 101, then (herald.v1) the welcome, implicit subscriptions and
/// expiry. A STOMP connection without a verified token yet waits for its `CONNECT`.
fn open<H: Host>(
    h: &mut H,
    now: Now,
    up: &Upgrade,
    project: Arc<Project>,
    verified: Option<Verified>,
) {
    let codec = Codec::for_upgrade(up);
    let answer = Bytes::from(handshake::accept_response(&up.key, up.subprotocol));
    h.conn().codec = codec;
    let welcome = verified.as_ref().and_then(|v| {
        codec.welcome(&Opened {
            conn: h.conn_id(),
            project: &project.id,
            user: &v.claims.sub,
            exp: v.claims.exp,
            heartbeat_secs: h.rules().heartbeat_secs,
            history: &[],
        })
    });
    // With history on implicit topics, the welcome tells their positions, read once they
    // are subscribed (`admit`): it is made again then.
    let with_history = codec == Codec::HeraldV1
        && verified.as_ref().is_some_and(|v| {
            [TOPIC_ALL, Topic::user(&v.claims.sub).as_str()]
                .iter()
                .any(|t| crate::history::rule_for(&project.history, t).is_some())
        });
    if codec == Codec::Stomp {
        let offered = up.subprotocol.and_then(stomp::Version::from_subprotocol);
        h.start_stomp(Box::new(stomp::Session {
            offered,
            version: offered.unwrap_or_default(),
            upgrade: verified.is_none().then(|| Box::new(up.clone())),
            ..stomp::Session::default()
        }));
    }
    // The 101 and the welcome go out as one pinned unit, marked started: a close caused by
    // bytes pipelined behind the upgrade truncates the queue, and must not take the HTTP
    // answer (or the welcome) with it. They are queued after the implicit subscriptions are
    // in the node's interest table, and with an engine the welcome waits for their engine
    // subscriptions (`Host::hold_welcome`), so a publish accepted once the client has the
    // welcome reaches it.
    let verified = match verified {
        Some(v) if with_history => v,
        Some(verified) => {
            admit(h, now, project, verified);
            send_opening(h, answer, welcome, up.sockjs);
            return;
        }
        None => {
            send_opening(h, answer, welcome, up.sockjs);
            return;
        }
    };
    let exp = verified.claims.exp;
    let positions = admit(h, now, project.clone(), verified);
    if h.fetches_history() {
        // The positions are the engine's: the welcome is made once its streams are read
        // (`fetched`), and is held until then.
        let topics = implicit_with_history(h);
        for (t, _) in &topics {
            if let Some(t) = h.lookup(project.idx, t) {
                recovery::shut(identity(h), t);
            }
        }
        let then = Fetch {
            id: None,
            topics,
            recover: false,
            welcome: Some(exp),
        };
        h.fetch_history(project.idx, then);
        send_opening(h, answer, None, up.sockjs);
        return;
    }
    let welcome = welcome_telling(h, exp, &positions);
    send_opening(h, answer, welcome, up.sockjs);
}

/// The welcome of an open connection, telling `positions` of its implicit topics with
/// history; `exp` is its token's.
fn welcome_telling<H: Host>(
    h: &mut H,
    exp: Option<u64>,
    positions: &[(Box<str>, crate::history::Position)],
) -> Option<Bytes> {
    let id = identity(h);
    let (project, user) = (id.project.clone(), id.user.clone());
    h.conn().codec.welcome(&Opened {
        conn: h.conn_id(),
        project: &project.id,
        user: &user,
        exp,
        heartbeat_secs: h.rules().heartbeat_secs,
        history: positions,
    })
}

/// Queues the 101, SockJS's `o` for a SockJS session, and the welcome when there is one
/// (unless the host holds it for the engine).
fn send_opening<H: Host>(h: &mut H, answer: Bytes, welcome: Option<Bytes>, in_sockjs: bool) {
    let welcome = welcome.filter(|w| !h.hold_welcome(w));
    h.send_raw(OutPart {
        bytes: answer,
        more: welcome.is_some() || in_sockjs,
        started: true,
    });
    if in_sockjs {
        // SockJS opens its session with `o`; what follows is in SockJS framing.
        h.send_raw(OutPart {
            bytes: sockjs::OPEN.clone(),
            more: welcome.is_some(),
            started: true,
        });
        h.conn().sockjs = true;
    }
    if let Some(welcome) = welcome {
        h.send_raw(OutPart::whole(welcome));
    }
}

/// Opens an authenticated connection: identity, implicit subscriptions, expiry. Answers the
/// positions of its implicit topics with history, which are held until the client recovers
/// them ([`super::recovery`]).
fn admit<H: Host>(
    h: &mut H,
    now: Now,
    project: Arc<Project>,
    verified: Verified,
) -> Vec<(Box<str>, crate::history::Position)> {
    let Verified { claims, kid } = verified;
    let project_idx = project.idx;
    let mut implicit = vec![Topic::all(), Topic::user(&claims.sub)];
    if let Some(d) = &claims.device {
        implicit.push(Topic::device(d));
    }
    let expires_at = expiry_of(claims.exp, project.leeway_secs);
    h.set_phase(ConnPhase::Open);
    let c = h.conn();
    c.expires_at = expires_at;
    c.msg_tat = now.us;
    c.refresh_tat = now.ms;
    c.identity = Some(Box::new(Identity {
        project,
        user: claims.sub.into(),
        device: claims.device.map(Into::into),
        topics: claims
            .topics
            .map(|t| t.into_iter().map(Into::into).collect()),
        kid,
        connected_at: now.unix_ms,
        history: Default::default(),
    }));
    c.subs = crate::ws::conn::Subs::with_capacity(implicit.len());
    // The welcome (STOMP: `CONNECTED`) waits for the engine subscriptions of these.
    for t in &implicit {
        let sub = h.subscribe(project_idx, t.as_str());
        h.conn().subs.push(sub);
        h.welcome_waits_for(project_idx, t.as_str());
    }
    h.conn().nr_implicit = implicit.len() as u8;
    let mut positions = Vec::new();
    if h.conn().codec == Codec::HeraldV1 && !h.fetches_history() {
        for t in &implicit {
            if let Some(r) = read_history(h, now, (project_idx, t.as_str()), None, true) {
                positions.push((t.as_str().into(), r.position));
            }
        }
    }
    if expires_at > 0 {
        h.arm_expiry(expires_at);
    }
    h.opened();
    h.outcome(HandshakeOutcome::Accepted);
    positions
}

/// The connection's implicit topics with history, for a read of their positions.
fn implicit_with_history<H: Host>(h: &mut H) -> Vec<(Box<str>, Option<crate::history::Since>)> {
    let nr = h.conn().nr_implicit as usize;
    let topics: Vec<TopicId> = h.conn().subs[..nr].iter().map(|s| s.topic).collect();
    let project = identity(h).project.clone();
    topics
        .into_iter()
        .map(|t| h.topic_name(t))
        .filter(|name| crate::history::rule_for(&project.history, name).is_some())
        .map(|name| (name.into(), None))
        .collect()
}

/// Reads the stream of a topic the connection has just subscribed to and sets its floor
/// ([`super::recovery`]); `None` when the topic has no history.
fn read_history<H: Host>(
    h: &mut H,
    now: Now,
    (project, name): (u32, &str),
    since: Option<&crate::history::Since>,
    hold: bool,
) -> Option<crate::history::Replay> {
    let rule = crate::history::rule_for(&identity(h).project.history, name)?.clone();
    let topic = h.lookup(project, name)?;
    let replay = h.history().read((project, name), &rule, since, now.unix_ms);
    recovery::mark(identity(h), topic, &replay.position, hold);
    Some(replay)
}

/// Ends the hold of the implicit topics ([`super::recovery`]): each recovers after its entry
/// in `since`, else after the position the welcome told. Answers each topic's read.
fn end_hold<H: Host>(
    h: &mut H,
    now: Now,
    since: &[(String, crate::history::Since)],
) -> Vec<(Box<str>, crate::history::Replay)> {
    let project = identity(h).project.idx;
    let held = recovery::held(identity(h));
    let mut out = Vec::with_capacity(held.len());
    for (topic, welcome) in held {
        let name: Box<str> = h.topic_name(topic).into();
        let since = since
            .iter()
            .find(|(t, _)| **t == *name)
            .map_or(welcome, |(_, s)| s.clone());
        if let Some(r) = read_history(h, now, (project, &name), Some(&since), false) {
            out.push((name, r));
        }
    }
    out
}

/// Ends the hold, if any, of a client that did not ask to recover (another op, or the
/// heartbeat): what was held since the welcome follows. A connection whose queue overflows
/// closes as a slow consumer.
pub fn resume<H: Host>(h: &mut H, now: Now) {
    let held = h
        .conn()
        .identity
        .as_deref()
        .is_some_and(|id| id.history.iter().any(|m| m.held.is_some()));
    if !held {
        return;
    }
    for (_, r) in end_hold(h, now, &[]) {
        if let Some(Ok(entries)) = &r.outcome
            && !replay(h, now, entries)
        {
            return;
        }
    }
}

/// A subscribe (or a `recover`) waiting for its topics' streams to be read from the engine
/// ([`Host::fetch_history`]).
#[derive(Debug)]
pub struct Fetch {
    /// The request's `id`.
    pub id: Option<Box<RawValue>>,
    /// The topics, each with where the client stands in its stream if it recovers.
    pub topics: Vec<(Box<str>, Option<crate::history::Since>)>,
    /// A `recover` of the implicit topics, not a subscribe.
    pub recover: bool,
    /// The welcome waits for the positions of the implicit topics (`topics`), not a
    /// subscribe: it carries the token's `exp`.
    pub welcome: Option<Option<u64>>,
}

/// The stream of a subscribe's topic has been read from the engine into the node's copy
/// ([`Host::fetch_history`]): the subscribe is answered from it as on a node of its own (the
/// position, and what was missed, replayed), and live deliveries past the position follow.
/// Nothing when the connection left the topic meanwhile.
pub fn fetched<H: Host>(h: &mut H, now: Now, then: Fetch) {
    let Some(id) = h.conn().identity.as_deref() else {
        return;
    };
    let project = id.project.idx;
    if h.conn().phase != ConnPhase::Open {
        return;
    }
    if let Some(exp) = then.welcome {
        let mut positions = Vec::with_capacity(then.topics.len());
        for (name, _) in &then.topics {
            if let Some(r) = read_history(h, now, (project, &**name), None, true) {
                positions.push((name.clone(), r.position));
            }
        }
        if let Some(welcome) = welcome_telling(h, exp, &positions) {
            h.welcome_read(welcome);
        }
        return;
    }
    if then.recover {
        let mut topics = Vec::with_capacity(then.topics.len());
        for (name, since) in &then.topics {
            if let Some(r) = read_history(h, now, (project, &**name), since.as_ref(), false) {
                topics.push((name.clone(), r));
            }
        }
        answer_recovered(h, now, then.id.as_deref(), &topics);
        return;
    }
    let Some((topic, since)) = then.topics.first() else {
        return;
    };
    let subscribed = h
        .lookup(project, topic)
        .is_some_and(|t| h.conn().subs.iter().any(|s| s.topic == t));
    if !subscribed {
        return;
    }
    match read_history(h, now, (project, &**topic), since.as_ref(), false) {
        Some(r) => answer_subscribed(h, now, then.id.as_deref(), &r),
        // The topic lost its history meanwhile (a reload): a plain ack.
        None => {
            let ack = h.conn().codec.ack(then.id.as_deref(), None);
            reply(h, now, ack);
        }
    }
}

/// Answers a `recover`: the position of each implicit topic (and whether the client
/// recovered it), then what it missed of each, in order.
fn answer_recovered<H: Host>(
    h: &mut H,
    now: Now,
    id: Option<&RawValue>,
    topics: &[(Box<str>, crate::history::Replay)],
) {
    let parts: Vec<_> = topics
        .iter()
        .map(|(t, r)| {
            let recovered = match &r.outcome {
                Some(Err(why)) => Err(why.as_str()),
                _ => Ok(()),
            };
            (&**t, &*r.position.epoch, r.position.offset, recovered)
        })
        .collect();
    reply(
        h,
        now,
        frame::text(super::ops::ack_recover(id, &parts).as_bytes()),
    );
    for (_, r) in topics {
        if let Some(Ok(entries)) = &r.outcome
            && !replay(h, now, entries)
        {
            break;
        }
    }
}

/// Answers a subscribe to a topic with history: the ack with the stream's position (and
/// whether the client recovered), then what it missed.
fn answer_subscribed<H: Host>(
    h: &mut H,
    now: Now,
    id: Option<&RawValue>,
    r: &crate::history::Replay,
) {
    let recovered = r.outcome.as_ref().map(|o| match o {
        Ok(_) => Ok(()),
        Err(why) => Err(why.as_str()),
    });
    let ack = super::ops::ack_position(id, &r.position.epoch, r.position.offset, recovered);
    reply(h, now, frame::text(ack.as_bytes()));
    if let Some(Ok(entries)) = &r.outcome {
        replay(h, now, entries);
    }
}

/// Queues replayed entries in order; `false` when the connection's queue overflowed (it then
/// closes as a slow consumer).
fn replay<H: Host>(h: &mut H, now: Now, entries: &[crate::history::Entry]) -> bool {
    for e in entries {
        if h.send(&[&e.head, &e.body]) == Push::Overflow {
            close(h, now, CloseReason::SlowConsumer);
            return false;
        }
    }
    true
}

fn on_frame_bytes<H: Host>(h: &mut H, now: Now, data: &mut [u8]) {
    let max = h.rules().max_message_bytes;
    let c = h.conn();
    let mut session = c.take_session();
    let mut inbuf = c.take_inbuf();
    let from_inbuf = !inbuf.is_empty();
    if from_inbuf {
        inbuf.extend_from_slice(data);
    }
    let buf: &mut [u8] = if from_inbuf { &mut inbuf } else { data };
    let result = session.feed(buf, max, &mut |ev| on_event(h, now, ev));
    let c = h.conn();
    c.set_session(session);
    if matches!(result, Ok(n) if n > 0) {
        c.rx_since_ping = true;
    }
    match result {
        Ok(consumed) if !c.kill => {
            let rest = &buf[consumed..];
            if rest.is_empty() {
                c.set_inbuf(Vec::new());
            } else if from_inbuf {
                inbuf.drain(..consumed);
                c.set_inbuf(inbuf);
            } else {
                c.set_inbuf(rest.to_vec());
            }
        }
        Ok(_) => {}
        Err(reason) => {
            debug!(peer = %c.peer, code = reason.code(), why = reason.text(), "protocol close");
            close(h, now, reason);
            // The stream can no longer be parsed, so no close handshake can follow: close
            // the socket once our close frame is written (RFC 6455 §7.1.7).
            h.conn().kill_after_flush = true;
        }
    }
}

fn on_event<H: Host>(h: &mut H, now: Now, ev: Event<'_>) -> Flow {
    // Every frame but a close takes a token: messages, fragments of one, pings and pongs
    // (a pong answering our heartbeat costs one token per interval).
    if !matches!(ev, Event::Close(_)) && h.conn().phase == ConnPhase::Open && !take_message(h, now)
    {
        let (peer, conn) = (h.conn().peer, h.conn_id());
        info!(
            %peer,
            %conn,
            "message rate limit exceeded; closing 4029"
        );
        // Replies to the messages taken before this one go out first (what the socket takes
        // now); the close then drops only what could not be written.
        h.flush();
        close(h, now, CloseReason::RateLimited);
        return Flow::Stop;
    }
    let c = h.conn();
    // A STOMP connection in its handshake has had its 101: it reads frames, `CONNECT` first.
    let open =
        c.phase == ConnPhase::Open || (c.phase == ConnPhase::Handshake && c.codec == Codec::Stomp);
    match ev {
        Event::Ping(p) => {
            if open {
                reply(h, now, frame::pong(p));
            }
            Flow::Continue
        }
        Event::Pong => {
            h.conn().ping_outstanding = false;
            Flow::Continue
        }
        Event::Close(code) => {
            if open {
                // Echo the peer's code, then close once it is written.
                let echo = frame::close_code(code.unwrap_or(1000), "");
                h.set_phase(ConnPhase::Closing);
                h.closing(CloseReason::Normal);
                h.conn().kill_after_flush = true;
                h.truncate_out();
                h.send_raw(OutPart::whole(echo));
                h.arm_close_deadline(now.at + CLOSE_GRACE);
            } else {
                // The answer to our own close: done.
                h.kill();
            }
            Flow::Stop
        }
        // Closing: what the peer sent before our close frame reached it is skipped, and
        // parsing goes on to its close answer (stopping here left that answer unread behind
        // the skipped frames until the close grace ran out).
        Event::Text(_) | Event::Fragment if !open => Flow::Continue,
        Event::Fragment => Flow::Continue,
        Event::Text(text) => on_text(h, now, text),
    }
}

/// The per-connection message limit (GCRA): a message may arrive when the connection's
/// theoretical arrival time is at most the rate's tolerance ahead of now; each message moves
/// it on by its interval. Times are on the shard's wrapping 32-bit microsecond clock; a time
/// further ahead than the limiter can ever put it is stale (the connection was quiet), and
/// the heartbeat ([`heartbeat`]) refreshes such times long before the clock wraps.
fn take_message<H: Host>(h: &mut H, now: Now) -> bool {
    let rate = h.rules().messages;
    rate.take(&mut h.conn().msg_tat, now.us).is_ok()
}

fn on_text<H: Host>(h: &mut H, now: Now, text: &str) -> Flow {
    if h.conn().sockjs {
        return on_sockjs_text(h, now, text);
    }
    on_codec_text(h, now, text)
}

/// A SockJS session's message: a JSON array of codec messages, read in order. One that is not
/// closes the connection 1007 (a STOMP connection gets an ERROR first).
fn on_sockjs_text<H: Host>(h: &mut H, now: Now, text: &str) -> Flow {
    if text.is_empty() {
        return Flow::Continue;
    }
    let Ok(messages) = sockjs::decode(text) else {
        debug!(conn = %h.conn_id(), "SockJS message not a JSON array of strings; closing");
        let reason = CloseReason::InvalidData("invalid SockJS message");
        if h.conn().codec == Codec::Stomp {
            let e = StompError {
                message: sockjs::BadFrame.to_string(),
                reason,
                refusal: None,
            };
            stomp_fail(h, now, e, None);
        } else {
            close(h, now, reason);
        }
        return Flow::Stop;
    };
    for m in &messages {
        if on_codec_text(h, now, m) == Flow::Stop {
            return Flow::Stop;
        }
    }
    Flow::Continue
}

fn on_codec_text<H: Host>(h: &mut H, now: Now, text: &str) -> Flow {
    let codec = h.conn().codec;
    if codec == Codec::Stomp {
        return on_stomp_text(h, now, text);
    }
    let Ok(req) = codec.decode(text) else {
        close(h, now, CloseReason::InvalidData("invalid JSON"));
        return Flow::Stop;
    };
    if !matches!(req.op, Ok(Op::Recover(_))) {
        resume(h, now);
    }
    let result = match req.op {
        Err(msg) => Err((ErrorCode::BadRequest, msg)),
        Ok(op) => execute(h, now, op),
    };
    if let Ok(Reply::Subscribed(_, _, Some(r))) = &result {
        answer_subscribed(h, now, req.id, r);
        return Flow::Continue;
    }
    if let Ok(Reply::Fetching(project, topics, recover)) = result {
        let then = Fetch {
            id: req.id.map(|id| id.to_owned()),
            topics,
            recover,
            welcome: None,
        };
        h.fetch_history(project, then);
        return Flow::Continue;
    }
    if let Ok(Reply::Recovered(topics)) = &result {
        answer_recovered(h, now, req.id, topics);
        return Flow::Continue;
    }
    let answer = match &result {
        Ok(Reply::Ack | Reply::Subscribed(..) | Reply::Recovered(_) | Reply::Fetching(..)) => {
            codec.ack(req.id, None)
        }
        Ok(Reply::AckExp(exp, _)) => codec.ack(req.id, Some(*exp)),
        Ok(Reply::Pong) => codec.pong(req.id),
        Err((code, msg)) => codec.error(req.id, *code, msg),
    };
    match &result {
        Ok(Reply::Subscribed(project, topic, _) | Reply::AckExp(_, Some((project, topic))))
            if h.hold_until_subscribed(*project, topic, &answer) => {}
        _ => reply(h, now, answer),
    }
    if result.is_err() {
        let max = h.rules().max_bad_requests;
        let c = h.conn();
        c.bad_requests = c.bad_requests.saturating_add(1);
        if u32::from(c.bad_requests) > max.min(u32::from(u16::MAX - 1)) {
            close(h, now, CloseReason::Policy("too many bad requests"));
            return Flow::Stop;
        }
    }
    Flow::Continue
}

/// A successful op's reply.
enum Reply {
    Ack,
    /// A new subscription (project, topic): acknowledged once the node receives the topic
    /// from every node. With history: the stream's position (and what was missed).
    Subscribed(u32, Box<str>, Option<crate::history::Replay>),
    /// The implicit topics recovered (`recover`).
    Recovered(Vec<(Box<str>, crate::history::Replay)>),
    /// A new subscription to a topic with history (or, `true`, the implicit topics'
    /// `recover`) whose streams are read from the engine first ([`Host::fetch_history`]):
    /// answered then ([`fetched`]).
    Fetching(u32, Vec<(Box<str>, Option<crate::history::Since>)>, bool),
    /// `refresh`'s ack: the token's expiry, and the `device.<id>` topic it subscribed
    /// (project, topic), acknowledged like a new subscription.
    AckExp(Option<u64>, Option<(u32, Box<str>)>),
    Pong,
}

/// An op's error reply: its code and message.
type OpError = (ErrorCode, String);

fn execute<H: Host>(h: &mut H, now: Now, op: Op<'_>) -> Result<Reply, OpError> {
    let bad = |e: crate::pubsub::NameError| (ErrorCode::BadRequest, format!("bad topic: {e}"));
    match op {
        Op::Ping => Ok(Reply::Pong),
        Op::Subscribe(name, since) => {
            let topic = Topic::parse(name).map_err(bad)?;
            check_topic_allowed(h, &topic)?;
            let project = identity(h).project.idx;
            if let Some(t) = h.lookup(project, topic.as_str())
                && h.conn().subs.iter().any(|s| s.topic == t)
            {
                return Ok(Reply::Ack);
            }
            let max = h.rules().max_topics_per_connection;
            let c = h.conn();
            if c.subs.len() - c.nr_implicit as usize >= max {
                return Err((
                    ErrorCode::Limit,
                    format!("at most {max} subscriptions per connection"),
                ));
            }
            // The ack is queued after this returns, so the interest table has the shard's
            // bit before the client can see it.
            let sub = h.subscribe(project, topic.as_str());
            h.conn().subs.push(sub);
            if h.fetches_history()
                && crate::history::rule_for(&identity(h).project.history, topic.as_str()).is_some()
                && let Some(t) = h.lookup(project, topic.as_str())
            {
                // Nothing of the topic goes to the connection until the stream is read.
                recovery::shut(identity(h), t);
                let topics = vec![(topic.as_str().into(), since)];
                return Ok(Reply::Fetching(project, topics, false));
            }
            let replay = read_history(h, now, (project, topic.as_str()), since.as_ref(), false);
            Ok(Reply::Subscribed(project, topic.as_str().into(), replay))
        }
        Op::Recover(since) => {
            let held = recovery::held(identity(h));
            if held.is_empty() {
                return Err((
                    ErrorCode::BadRequest,
                    "nothing to recover: `recover` comes right after the welcome, for the \
                     implicit topics with history"
                        .into(),
                ));
            }
            let names: Vec<Box<str>> = held.iter().map(|(t, _)| h.topic_name(*t).into()).collect();
            if let Some((t, _)) = since
                .iter()
                .find(|(t, _)| !names.iter().any(|n| **n == **t))
            {
                return Err((
                    ErrorCode::BadRequest,
                    format!("`{t}` is no implicit topic with history of this connection"),
                ));
            }
            if h.fetches_history() {
                // Each from the client's position, else the welcome's; nothing of them goes
                // to the connection until their streams are read.
                let mut topics = Vec::with_capacity(held.len());
                for ((t, welcome), name) in held.into_iter().zip(names) {
                    let from = since
                        .iter()
                        .find(|(n, _)| **n == *name)
                        .map_or(welcome, |(_, s)| s.clone());
                    recovery::shut(identity(h), t);
                    topics.push((name, Some(from)));
                }
                return Ok(Reply::Fetching(identity(h).project.idx, topics, true));
            }
            Ok(Reply::Recovered(end_hold(h, now, &since)))
        }
        Op::Unsubscribe(name) => {
            let topic = Topic::parse(name).map_err(bad)?;
            if topic.is_implicit_only() || topic.as_str() == TOPIC_ALL {
                return Err((
                    ErrorCode::Forbidden,
                    format!("`{topic}` is an implicit subscription"),
                ));
            }
            let project = identity(h).project.idx;
            let found = h
                .lookup(project, topic.as_str())
                .and_then(|t| h.conn().subs.iter().position(|s| s.topic == t));
            let Some(i) = found else {
                return Err((ErrorCode::NotFound, format!("not subscribed to `{topic}`")));
            };
            unsubscribe_at(h, i);
            Ok(Reply::Ack)
        }
        Op::Refresh(token) => refresh(h, now, token),
        Op::Publish(name, data) => {
            let topic = Topic::parse(name).map_err(bad)?;
            // Settings as they are now (a reload may have changed them).
            let id = identity(h).project.id.clone();
            let Some(project) = h.project(&id) else {
                return Err((ErrorCode::Forbidden, "the project no longer exists".into()));
            };
            if !project.allow_client_publish {
                return Err((
                    ErrorCode::Forbidden,
                    "this project does not let clients publish".into(),
                ));
            }
            check_topic_allowed(h, &topic)?;
            h.publish(project.idx, &topic, data)
                .map(|()| Reply::Ack)
                .map_err(|e| (ErrorCode::Limit, e))
        }
    }
}

/// The identity of an open connection.
fn identity<H: Host>(h: &mut H) -> &mut Identity {
    h.conn()
        .identity
        .as_deref_mut()
        .expect("open connections have one")
}

/// `refresh`: the new token is verified with the project's keys as they are now (rotated in
/// or revoked since the connection opened) and must name the same `sub`; its claims then
/// replace the old ones: expiry, `kid`, the `device` topic and the `topics` allowlist.
/// Explicit subscriptions the new token does not allow are dropped, each with an
/// `unsubscribed` message, before the ack.
fn refresh<H: Host>(h: &mut H, now: Now, token: &str) -> Result<Reply, OpError> {
    if let Err(wait_ms) = take_refresh(h, now) {
        // Per connection at most `ws.max_bad_requests` of these before it is closed 1008.
        debug!(
            conn = %h.conn_id(),
            wait_ms,
            "refresh over limits.refreshes_per_conn_per_min; refused"
        );
        let r = h.rules();
        return Err((
            ErrorCode::RateLimited,
            format!(
                "at most {} refreshes per minute (burst {}); retry in {} s",
                r.refreshes_per_min,
                r.refresh_burst,
                wait_ms.div_ceil(1000).max(1)
            ),
        ));
    }
    let id = identity(h).project.id.clone();
    let Some(project) = h.project(&id) else {
        return Err((ErrorCode::Forbidden, "the project no longer exists".into()));
    };
    let Verified { claims, kid } = h
        .verify(&project, token)
        .map_err(|e| (ErrorCode::Forbidden, format!("refresh refused: {e}")))?;
    if *claims.sub != *identity(h).user {
        return Err((ErrorCode::Forbidden, "refresh token has another sub".into()));
    }
    let expires_at = expiry_of(claims.exp, project.leeway_secs);
    let old_expiry = h.conn().expires_at;
    let device = set_device(h, claims.device.as_deref());
    h.conn().expires_at = expires_at;
    let id = identity(h);
    id.kid = kid;
    id.topics = claims
        .topics
        .map(|t| t.into_iter().map(Into::into).collect());
    drop_disallowed(h, now);
    // The entry armed for the old expiry is now stale; an unchanged one is still live.
    if expires_at > 0 && expires_at != old_expiry {
        h.arm_expiry(expires_at);
    }
    Ok(Reply::AckExp(claims.exp, device.map(|t| (project.idx, t))))
}

/// Takes a token from the connection's refresh bucket (GCRA on the shard's millisecond
/// clock).
///
/// # Errors
/// Over the limit: milliseconds until a refresh is allowed again.
fn take_refresh<H: Host>(h: &mut H, now: Now) -> Result<(), u32> {
    let rate = h.rules().refreshes;
    rate.take(&mut h.conn().refresh_tat, now.ms)
}

/// Replaces the connection's implicit `device.<id>` subscription (the last implicit one) when
/// a refresh changed or removed the `device` claim. Returns the topic subscribed, if any.
fn set_device<H: Host>(h: &mut H, device: Option<&str>) -> Option<Box<str>> {
    let id = identity(h);
    if id.device.as_deref() == device {
        return None;
    }
    let project = id.project.idx;
    let had = id.device.is_some();
    id.device = device.map(Into::into);
    if had {
        let c = h.conn();
        c.nr_implicit -= 1;
        let sub = c.subs.remove(c.nr_implicit as usize);
        h.release(sub);
    }
    let d = device?;
    let topic = Topic::device(d);
    let sub = h.subscribe(project, topic.as_str());
    let c = h.conn();
    c.subs.insert(c.nr_implicit as usize, sub);
    c.nr_implicit += 1;
    Some(topic.as_str().into())
}

/// Drops the explicit subscriptions the connection's `topics` allowlist does not allow,
/// telling the client about each (in subscription order).
fn drop_disallowed<H: Host>(h: &mut H, now: Now) {
    let Some(allowed) = identity(h).topics.clone() else {
        return;
    };
    let c = h.conn();
    let (from, subs) = (c.nr_implicit as usize, c.subs.clone());
    let dropped: Vec<(usize, String)> = (from..subs.len())
        .map(|i| (i, h.topic_name(subs[i].topic)))
        .filter(|(_, name)| *name != TOPIC_ALL && !topic_permitted(&allowed, name))
        .map(|(i, name)| (i, name.to_owned()))
        .collect();
    if dropped.is_empty() {
        return;
    }
    debug!(
        conn = %h.conn_id(),
        dropped = dropped.len(),
        "refresh narrowed the token's topics; subscriptions dropped"
    );
    // Highest position first: the positions still to remove do not shift.
    for (i, _) in dropped.iter().rev() {
        unsubscribe_at(h, *i);
    }
    let codec = h.conn().codec;
    for (_, name) in &dropped {
        reply(h, now, codec.unsubscribed(name));
    }
}

/// Explicit subscribe/publish rules: never `user.`/`device.`, and within the token's `topics`
/// claim when it has one.
fn check_topic_allowed<H: Host>(h: &mut H, topic: &Topic) -> Result<(), OpError> {
    if topic.is_implicit_only() {
        return Err((
            ErrorCode::Forbidden,
            "user. and device. topics cannot be subscribed to explicitly".into(),
        ));
    }
    if let Some(allowed) = &identity(h).topics
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
/// implicit topics and `max_topics_per_connection`, so the shift is short).
fn unsubscribe_at<H: Host>(h: &mut H, i: usize) {
    let sub = h.conn().subs.remove(i);
    if let Some(id) = h.conn().identity.as_deref_mut() {
        recovery::forget(id, sub.topic);
    }
    h.release(sub);
}

/// Queues a reply to the connection itself; over the cap it is a slow consumer too. (A STOMP
/// connection still in its handshake, waiting for `CONNECT`, is answered outside the cap.)
fn reply<H: Host>(h: &mut H, now: Now, frame: Bytes) {
    if h.conn().phase == ConnPhase::Handshake {
        h.send_raw(OutPart::whole(frame));
        return;
    }
    if h.send(&[&frame]) == Push::Overflow {
        close(h, now, CloseReason::SlowConsumer);
    }
}

/// Starts the closing handshake with `reason`: unsent messages are dropped, the close frame
/// is queued, and the peer has [`CLOSE_GRACE`] to answer. A connection still in its
/// handshake is killed; one already closing is left alone.
pub fn close<H: Host>(h: &mut H, now: Now, reason: CloseReason) {
    // A STOMP client learns why in an ERROR first (STOMP clients report ERROR frames, not
    // close reasons): a kick, a drain, a slow consumer, an expiry, a rate limit.
    let error = match reason {
        CloseReason::Normal => None,
        _ => h
            .stomp()
            .map(|s| stomp::error(s.version, reason.text(), None)),
    };
    close_after(h, now, reason, error);
}

/// [`close`], with `last` (a STOMP `ERROR` or `RECEIPT`) queued just before the close frame.
fn close_after<H: Host>(h: &mut H, now: Now, reason: CloseReason, last: Option<Bytes>) {
    match h.conn().phase {
        ConnPhase::Closing => return,
        ConnPhase::Handshake => {
            h.kill();
            return;
        }
        ConnPhase::Open => {}
    }
    h.set_phase(ConnPhase::Closing);
    h.closing(reason);
    // A drain sends what was published before it (every publish answered 2xx reaches the
    // connections open then), then the close, and so does a STOMP `DISCONNECT` (the receipts
    // of the frames before it); every other close drops the backlog.
    if !matches!(reason, CloseReason::GoingAway | CloseReason::Normal) {
        h.truncate_out();
    }
    if let Some(last) = last {
        h.send_raw(OutPart::whole(last));
    }
    h.send_raw(OutPart::whole(frame::close(reason)));
    h.arm_close_deadline(now.at + CLOSE_GRACE);
}

/// The handshake deadline passed: a connection still in its handshake is dropped.
pub fn on_handshake_deadline<H: Host>(h: &mut H) {
    if h.conn().phase == ConnPhase::Handshake {
        h.outcome(HandshakeOutcome::Timeout);
        debug!(conn = %h.conn_id(), "handshake deadline passed; dropping");
        h.kill();
    }
}

/// The close deadline passed: a connection still closing is dropped.
pub fn on_close_deadline<H: Host>(h: &mut H) {
    if h.conn().phase == ConnPhase::Closing {
        h.kill();
    }
}

/// An expiry armed at `at` fell due: the connection is closed 4001 if its token still expires
/// then (a refresh since makes the entry stale) and the wall clock has reached it.
pub fn on_expiry<H: Host>(h: &mut H, now: Now, at: u32) {
    let c = h.conn();
    if c.phase == ConnPhase::Open && c.expires_at == at && u64::from(at) <= now.unix_secs() {
        // STOMP has no refresh: its client learns why in an ERROR (`close`), then reconnects.
        close(h, now, CloseReason::TokenExpired);
    }
}

/// What the heartbeat does to a connection on its visit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Not open: nothing to do.
    Skip,
    /// Send a ping.
    Ping,

    /// No whole frame since the last ping: drop it.
    Dead,
}

/// The heartbeat's visit to a connection (once per interval): keeps its limiter clocks within
/// reach of the wrapping shard clocks, and decides between a ping and dropping it.
pub fn heartbeat(c: &mut Conn, rules: &Rules, now: Now) -> Beat {
    if c.phase != ConnPhase::Open {
        return Beat::Skip;
    }
    // Keep the message-rate clock of a quiet connection within half the wrap of the 32-bit
    // microsecond clock (see `take_message`).
    if c.msg_tat.wrapping_sub(now.us) > rules.messages.stale_after() {
        c.msg_tat = now.us;
    }
    // Likewise the refresh limiter's 32-bit millisecond clock.
    if c.refresh_tat.wrapping_sub(now.ms) > rules.refreshes.stale_after() {
        c.refresh_tat = now.ms;
    }
    if c.ping_outstanding && !c.rx_since_ping {
        return Beat::Dead;
    }
    c.ping_outstanding = true;
    c.rx_since_ping = false;
    Beat::Ping
}

// The STOMP conversation (docs/stomp.md): frames are read with `stomp::Parser` across the
// connection's text messages and answered with `stomp`'s encoders. Topic rules, limits and
// publishing are herald.v1's own (`execute`); every refused frame is an ERROR, then a close,
// as STOMP requires.

/// Why a STOMP frame was refused: the ERROR's `message`, the close that follows, and for a
/// `CONNECT` refused before the connection opened, the handshake refusal to count and log.
struct StompError {
    message: String,
    reason: CloseReason,
    refusal: Option<Refusal>,
}

impl StompError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            reason: CloseReason::Policy("STOMP frame refused"),
            refusal: None,
        }
    }
}

impl From<OpError> for StompError {
    fn from((_, message): OpError) -> Self {
        Self::new(message)
    }
}

/// What the connection does after a frame.
enum StompNext {
    Continue,
    /// A new subscription to a topic of a project: its RECEIPT waits, like herald.v1's ack,
    /// until the node receives the topic from every node.
    Subscribed(u32, Box<str>),
    Disconnect,
}

fn stomp_session<H: Host>(h: &mut H) -> &mut stomp::Session {
    h.stomp().expect("STOMP connections have a session")
}

fn on_stomp_text<H: Host>(h: &mut H, now: Now, text: &str) -> Flow {
    let max = h.rules().max_message_bytes;
    stomp_session(h).parser.feed(text.as_bytes());
    loop {
        let s = stomp_session(h);
        let frame = match s.parser.next_frame(s.version, max) {
            Ok(Some(f)) => f,
            Ok(None) => return Flow::Continue,
            Err(e) => {
                debug!(conn = %h.conn_id(), error = %e, "unreadable STOMP frame; closing");
                let reason = match e {
                    stomp::ParseError::TooLarge { .. } => CloseReason::TooBig,
                    _ => CloseReason::Policy("malformed STOMP frame"),
                };
                let e = StompError {
                    message: e.to_string(),
                    reason,
                    refusal: None,
                };
                stomp_fail(h, now, e, None);
                return Flow::Stop;
            }
        };
        let receipt = frame.header("receipt").map(str::to_owned);
        let next = on_stomp_frame(h, now, &frame);
        let version = stomp_session(h).version;
        let receipt = receipt.map(|r| stomp::receipt(version, &r));
        match next {
            Ok(StompNext::Continue) => {
                if let Some(r) = receipt {
                    reply(h, now, r);
                }
            }
            Ok(StompNext::Subscribed(project, topic)) => {
                // Without a receipt an EOL heart-beat stands in for it (the host must be told
                // of every new subscription; an EOL is nothing to a STOMP client).
                let held = receipt.clone().unwrap_or_else(stomp::heart_beat);
                if !h.hold_until_subscribed(project, &topic, &held)
                    && let Some(r) = receipt
                {
                    reply(h, now, r);
                }
            }
            Ok(StompNext::Disconnect) => {
                close_after(h, now, CloseReason::Normal, receipt);
                return Flow::Stop;
            }
            Err(e) => {
                let id = frame.header("receipt");
                debug!(conn = %h.conn_id(), reason = %e.message, "STOMP frame refused; closing");
                stomp_fail(h, now, e, id);
                return Flow::Stop;
            }
        }
        if h.conn().phase == ConnPhase::Closing {
            return Flow::Stop;
        }
    }
}

/// Answers a refused frame with an ERROR and closes.
fn stomp_fail<H: Host>(h: &mut H, now: Now, e: StompError, receipt: Option<&str>) {
    let error = stomp::error(stomp_session(h).version, &e.message, receipt);
    if h.conn().phase != ConnPhase::Handshake {
        close_after(h, now, e.reason, Some(error));
        return;
    }
    // Refused before it opened: a handshake refusal, answered in STOMP.
    let refusal = e
        .refusal
        .unwrap_or_else(|| Refusal::bad_request(e.message.clone()));
    h.refused(&refusal, now.at);
    h.set_phase(ConnPhase::Closing);
    h.closing(e.reason);
    h.send_raw(OutPart::whole(error));
    h.send_raw(OutPart::whole(frame::close(e.reason)));
    h.arm_close_deadline(now.at + CLOSE_GRACE);
}

fn on_stomp_frame<H: Host>(h: &mut H, now: Now, f: &stomp::Frame) -> Result<StompNext, StompError> {
    use stomp::Command as C;
    if !stomp_session(h).connected {
        if !f.command.is_connect() {
            return Err(StompError::new("the first frame must be CONNECT or STOMP"));
        }
        stomp_connect(h, now, f)?;
        return Ok(StompNext::Continue);
    }
    match f.command {
        C::Connect | C::Stomp => Err(StompError::new("already connected")),
        C::Subscribe => stomp_subscribe(h, now, f),
        C::Unsubscribe => stomp_unsubscribe(h, f),
        C::Send => stomp_send(h, now, f),
        // Deliveries are not redelivered, so there is nothing to acknowledge.
        C::Ack | C::Nack => Ok(StompNext::Continue),
        C::Begin | C::Commit | C::Abort => Err(StompError::new(
            "transactions (BEGIN, COMMIT, ABORT) are not supported",
        )),
        C::Disconnect => Ok(StompNext::Disconnect),
    }
}

/// `CONNECT`/`STOMP`: the version, the token (when the upgrade carried none), the
/// heart-beats, then `CONNECTED`.
fn stomp_connect<H: Host>(h: &mut H, now: Now, f: &stomp::Frame) -> Result<(), StompError> {
    let s = stomp_session(h);
    let version = stomp::negotiate(s.offered, f.header("accept-version")).ok_or_else(|| {
        StompError::new("no common STOMP version: herald speaks 1.0, 1.1 and 1.2")
    })?;
    s.version = version;
    if let Some(up) = s.upgrade.take() {
        let bearer = f.header("Authorization").and_then(|v| {
            v.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| v[7..].trim())
        });
        let refused = |r: Refusal| StompError {
            message: r.message.clone(),
            reason: CloseReason::Policy("authentication failed"),
            refusal: Some(r),
        };
        let Some(token) = bearer.or(f.header("passcode")) else {
            return Err(refused(Refusal::unauthorized(
                "no token: send it at the upgrade, or in CONNECT as `Authorization: Bearer \
                 <jwt>` or `passcode:<jwt>`",
            )));
        };
        match authenticate(h, &up, Some(token)).map_err(refused)? {
            (project, Some(verified)) => {
                admit(h, now, project, verified);
            }
            (_, None) => unreachable!("a token was given"),
        }
    }
    let sweep_ms = h.rules().heartbeat_secs * 1000;
    let beats = stomp::heart_beats(f.header("heart-beat"), sweep_ms);
    let s = stomp_session(h);
    s.beats = beats.0 > 0;
    s.connected = true;
    let connected = stomp::connected(version, beats, &identity(h).user);
    // Like herald.v1's welcome, it waits for the engine subscriptions of the implicit topics.
    if !h.hold_welcome(&connected) {
        reply(h, now, connected);
    }
    Ok(())
}

/// A header the frame must carry.
fn required<'f>(f: &'f stomp::Frame, name: &str) -> Result<&'f str, StompError> {
    f.header(name)
        .ok_or_else(|| StompError::new(format!("{:?} needs a `{name}` header", f.command)))
}

/// `SUBSCRIBE`: `/topic/<t>` subscribes as herald.v1's `subscribe` does; `/user/queue/<name>`
/// receives the connection's own `user.<sub>` topic.
fn stomp_subscribe<H: Host>(
    h: &mut H,
    now: Now,
    f: &stomp::Frame,
) -> Result<StompNext, StompError> {
    let destination = required(f, "destination")?;
    // 1.0 makes `id` optional: the destination names the subscription then.
    let id = match (f.header("id"), stomp_session(h).version) {
        (Some(id), _) => id,
        (None, stomp::Version::V10) => destination,
        (None, _) => required(f, "id")?,
    };
    if stomp_session(h).subs.iter().any(|s| &*s.id == id) {
        return Err(StompError::new(format!(
            "subscription id `{id}` is already in use"
        )));
    }
    // Several ids may receive one topic; each costs a frame per delivery, so they are
    // capped like herald.v1's subscriptions (the implicit topics free, as there).
    let max = h.rules().max_topics_per_connection + h.conn().nr_implicit as usize;
    if stomp_session(h).subs.len() >= max {
        return Err(StompError::new(format!(
            "at most {max} subscriptions per connection"
        )));
    }
    let project = identity(h).project.clone();
    let mut next = StompNext::Continue;
    let topic = match Destination::parse(destination) {
        Destination::Topic(t) => {
            let t = stomp::herald_topic(&project.id, t);
            if let Reply::Subscribed(p, topic, _) = execute(h, now, Op::Subscribe(&t, None))? {
                next = StompNext::Subscribed(p, topic);
            }
            h.lookup(project.idx, &t)
        }
        Destination::UserQueue => {
            let user = Topic::user(&identity(h).user);
            h.lookup(project.idx, user.as_str())
        }
        Destination::Queue => {
            return Err(StompError::new(
                "`/queue/` destinations are not supported: use `/topic/<topic>` or \
                 `/user/queue/<name>`",
            ));
        }
        Destination::App(_) | Destination::Unknown => {
            return Err(StompError::new(format!(
                "cannot subscribe to `{destination}`: use `/topic/<topic>` or `/user/queue/<name>`"
            )));
        }
    };
    let topic = topic.ok_or_else(|| StompError::new("the subscription was not recorded"))?;
    let client_ack = matches!(f.header("ack"), Some("client" | "client-individual"));
    stomp_session(h).subs.push(stomp::Subscription {
        id: id.into(),
        topic,
        destination: destination.into(),
        client_ack,
    });
    Ok(next)
}

/// `UNSUBSCRIBE`: the topic is left once no other subscription of the connection receives it
/// (implicit topics stay).
fn stomp_unsubscribe<H: Host>(h: &mut H, f: &stomp::Frame) -> Result<StompNext, StompError> {
    let id = match f.header("id") {
        Some(id) => id,
        None => required(f, "destination")?,
    };
    let s = stomp_session(h);
    let Some(i) = s.subs.iter().position(|s| &*s.id == id) else {
        return Err(StompError::new(format!("no subscription `{id}`")));
    };
    let sub = s.subs.remove(i);
    if s.subs.iter().any(|s| s.topic == sub.topic) {
        return Ok(StompNext::Continue);
    }
    let c = h.conn();
    let from = c.nr_implicit as usize;
    if let Some(j) = c.subs[from..].iter().position(|s| s.topic == sub.topic) {
        unsubscribe_at(h, from + j);
    }
    Ok(StompNext::Continue)
}

/// `SEND` to `/topic/<t>` or `/app/<t>`: a client publish to topic `<t>`, as herald.v1's
/// `publish`; the body must be JSON.
fn stomp_send<H: Host>(h: &mut H, now: Now, f: &stomp::Frame) -> Result<StompNext, StompError> {
    let destination = required(f, "destination")?;
    let project = identity(h).project.id.clone();
    let name = match Destination::parse(destination) {
        Destination::Topic(t) | Destination::App(t) => stomp::herald_topic(&project, t),
        Destination::Queue => {
            return Err(StompError::new("`/queue/` destinations are not supported"));
        }
        Destination::UserQueue | Destination::Unknown => {
            return Err(StompError::new(format!(
                "cannot SEND to `{destination}`: use `/topic/<topic>` or `/app/<topic>`"
            )));
        }
    };
    let data: &serde_json::value::RawValue = std::str::from_utf8(&f.body)
        .ok()
        .and_then(|b| serde_json::from_str(b).ok())
        .ok_or_else(|| StompError::new("a SEND body must be JSON"))?;
    execute(h, now, Op::Publish(&name, data))?;
    Ok(StompNext::Continue)
}

/// A host that records what the machine does, for driving it without a shard: the unit
/// tests and the `machine` fuzz target.
#[cfg(any(test, feature = "fuzzing"))]
pub mod recorder {
    #![allow(missing_docs)]
    use super::*;
    pub use crate::auth::{Claims, Registry};
    use crate::config::Config;
    use slab::Slab;

    /// A shard stand-in: one connection, a topic list, and a record of every action.
    pub struct TestHost {
        pub conns: Slab<Conn>,
        pub dirty: super::super::conn::Dirty,
        pub rules: Rules,
        pub project: Arc<Project>,
        /// Tokens that verify, with their claims.
        pub tokens: Vec<(&'static str, Claims)>,
        /// The topic index: a topic's id is its position.
        pub topics: Vec<String>,
        pub queue_cap: usize,
        pub phases: Vec<ConnPhase>,
        pub outcomes: Vec<HandshakeOutcome>,
        pub closes: Vec<CloseReason>,
        pub close_deadlines: Vec<Instant>,
        pub expiries: Vec<u32>,
        pub released: Vec<String>,
        /// Acks of new subscriptions are held (as with an engine), not sent by the machine.
        pub hold_acks: bool,
        /// (topic, ack) held so far.
        pub held_acks: Vec<(String, Bytes)>,
        pub published: Vec<String>,
        /// The history store reads go to.
        pub history: crate::history::History,
        pub killed: bool,
        pub opened: bool,
        pub stomp: Option<Box<stomp::Session>>,
    }

    pub const BASE_SECS: u64 = 1_000_000;

    fn origin() -> Instant {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *ORIGIN.get_or_init(Instant::now)
    }

    /// `ms` milliseconds after the test's start, on every clock.
    pub fn at_ms(ms: u64) -> Now {
        Now {
            at: origin() + Duration::from_millis(ms),
            us: (ms * 1000) as u32,
            ms: ms as u32,
            unix_ms: BASE_SECS * 1000 + ms,
        }
    }

    pub fn claims(exp: Option<u64>, topics: Option<&[&str]>) -> Claims {
        Claims {
            sub: "42".into(),
            exp,
            topics: topics.map(|t| t.iter().map(|s| (*s).to_owned()).collect()),
            device: None,
        }
    }

    impl Default for TestHost {
        fn default() -> Self {
            Self::new()
        }
    }

    impl TestHost {
        pub fn new() -> Self {
            let mut cfg = Config::development();
            cfg.projects[0].leeway_secs = 30;
            cfg.projects[0].allow_client_publish = true;
            let project = Registry::from_config(&cfg)
                .unwrap()
                .project("demo")
                .unwrap()
                .clone();
            let mut conns = Slab::new();
            let mut c = Conn::new(-1, 1, "127.0.0.1:4000".parse().unwrap());
            c.client_known = true;
            c.hs_charged = true;
            conns.insert(c);
            Self {
                conns,
                dirty: Default::default(),
                rules: Rules {
                    max_handshake_bytes: 8192,
                    max_message_bytes: 1024,
                    max_topics_per_connection: 4,
                    max_bad_requests: 2,
                    messages: Rate::default(),
                    refreshes: Rate::default(),
                    refreshes_per_min: 0,
                    refresh_burst: 0,
                    heartbeat_secs: 25,
                    proxy_protocol: false,
                },
                project,
                tokens: vec![
                    ("t-open", claims(Some(BASE_SECS + 100), None)),
                    ("t-later", claims(Some(BASE_SECS + 200), Some(&["news.*"]))),
                    (
                        "t-other",
                        Claims {
                            sub: "7".into(),
                            ..claims(None, None)
                        },
                    ),
                ],
                topics: Vec::new(),
                queue_cap: 1 << 20,
                phases: Vec::new(),
                outcomes: Vec::new(),
                closes: Vec::new(),
                close_deadlines: Vec::new(),
                expiries: Vec::new(),
                released: Vec::new(),
                hold_acks: false,
                held_acks: Vec::new(),
                published: Vec::new(),
                history: crate::history::History::new(1 << 20, 100),
                killed: false,
                opened: false,
                stomp: None,
            }
        }

        /// A host whose connection has opened with `token` at time 0.
        pub fn open(token: &str) -> Self {
            let mut h = Self::new();
            let req = format!(
                "GET /ws/demo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: \
                 Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: \
                 dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\n\r\n"
            );
            on_bytes(&mut h, at_ms(0), &mut req.into_bytes());
            assert_eq!(h.conns[0].phase, ConnPhase::Open, "{:?}", h.outcomes);
            let sent = h.sent();
            assert!(sent[0].1.starts_with(b"{\"type\":\"welcome\""), "{sent:?}");
            h
        }

        pub fn c(&mut self) -> &mut Conn {
            &mut self.conns[0]
        }

        /// A STOMP upgrade (no token) answered with its subprotocol; the connection waits in its
        /// handshake for `CONNECT`.
        pub fn stomp_upgrade() -> Self {
            let mut h = Self::new();
            let req = "GET /ws/demo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: \
                       Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: \
                       dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: v11.stomp, v12.stomp\r\n\r\n";
            h.feed(at_ms(0), req.as_bytes());
            let out = String::from_utf8(h.queued()).unwrap();
            assert!(out.starts_with("HTTP/1.1 101 "), "{out}");
            assert!(
                out.contains("Sec-WebSocket-Protocol: v12.stomp\r\n"),
                "{out}"
            );
            assert!(h.sent().is_empty(), "no welcome");
            assert_eq!(h.c().phase, ConnPhase::Handshake);
            assert!(h.outcomes.is_empty() && !h.opened);
            h
        }

        /// A STOMP connection past its `CONNECT` (token `t-open` as `passcode`).
        pub fn open_stomp() -> Self {
            let mut h = Self::stomp_upgrade();
            h.feed(
                at_ms(0),
                &text("CONNECT\naccept-version:1.2\npasscode:t-open\n\n\0"),
            );
            assert_eq!(h.conns[0].phase, ConnPhase::Open, "{:?}", h.outcomes);
            h.sent();
            h
        }

        /// Feeds client bytes at `now`.
        pub fn feed(&mut self, now: Now, bytes: &[u8]) {
            on_bytes(self, now, &mut bytes.to_vec());
        }

        /// The bytes queued so far, left in the queue.
        pub fn queued(&mut self) -> Vec<u8> {
            let c = self.c();
            c.flight.as_ref().map_or_else(Vec::new, |f| {
                f.out.iter().flat_map(|p| p.bytes.to_vec()).collect()
            })
        }

        /// Takes the frames queued so far (after the HTTP answer, if any): (opcode, payload).
        pub fn sent(&mut self) -> Vec<(u8, Vec<u8>)> {
            let c = self.c();
            let f = c.flight();
            let mut bytes: Vec<u8> = f.out.iter().flat_map(|p| p.bytes.to_vec()).collect();
            f.out.clear();
            f.out_bytes = 0;
            c.settle();
            if bytes.starts_with(b"HTTP/1.1 ") {
                let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                bytes.drain(..end);
            }
            let mut frames = Vec::new();
            let mut b = &bytes[..];
            while !b.is_empty() {
                let (len, at) = match b[1] & 0x7f {
                    126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                    127 => (
                        u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    n => (n as usize, 2),
                };
                frames.push((b[0] & 0x0f, b[at..at + len].to_vec()));
                b = &b[at + len..];
            }
            frames
        }

        /// What must hold after any input (the fuzz targets check it each round): the queue's
        /// byte count matches its pieces, at most one close, a closing connection has its
        /// deadline.
        pub fn check_invariants(&mut self) {
            let c = self.c();
            let queued: usize = c
                .flight
                .as_ref()
                .map_or(0, |f| f.out.iter().map(|p| p.bytes.len()).sum());
            assert_eq!(c.out_bytes(), queued, "queue accounting");
            assert!(self.closes.len() <= 1, "closed twice: {:?}", self.closes);
            if self.c().phase == ConnPhase::Closing {
                assert!(
                    !self.close_deadlines.is_empty(),
                    "closing without a deadline"
                );
            }
        }

        /// The text of every text frame queued so far.
        pub fn texts(&mut self) -> Vec<String> {
            self.sent()
                .into_iter()
                .filter(|(op, _)| *op == 1)
                .map(|(_, p)| String::from_utf8(p).unwrap())
                .collect()
        }

        /// The code of the close frame queued last, if any.
        pub fn close_code(&mut self) -> Option<u16> {
            self.sent()
                .into_iter()
                .rev()
                .find(|(op, _)| *op == 8)
                .map(|(_, p)| u16::from_be_bytes([p[0], p[1]]))
        }
    }

    /// A masked client frame.
    pub fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut f = vec![opcode | if fin { 0x80 } else { 0 }];
        match payload.len() {
            n @ 0..126 => f.push(0x80 | n as u8),
            n => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    pub fn text(s: &str) -> Vec<u8> {
        frame(1, true, s.as_bytes())
    }

    impl Host for TestHost {
        fn conn(&mut self) -> &mut Conn {
            &mut self.conns[0]
        }
        fn rules(&self) -> &Rules {
            &self.rules
        }
        fn stomp(&mut self) -> Option<&mut stomp::Session> {
            self.stomp.as_deref_mut()
        }
        fn start_stomp(&mut self, session: Box<stomp::Session>) {
            self.stomp = Some(session);
        }
        fn conn_id(&self) -> ConnId {
            ConnId {
                shard: 0,
                slot: 0,
                generation: 1,
            }
        }
        fn name_client(&mut self, _ip: IpAddr) -> Option<bool> {
            Some(false)
        }
        fn forwarded_client(&self, _header: &str) -> Option<IpAddr> {
            None
        }
        fn take_handshake_token(&mut self, _ip: IpAddr, _at: Instant) -> Result<(), u32> {
            Ok(())
        }
        fn ip_limit(&self) -> usize {
            0
        }
        fn project(&self, id: &str) -> Option<Arc<Project>> {
            (*self.project.id == *id).then(|| self.project.clone())
        }
        fn verify(&self, _project: &Project, token: &str) -> Result<Verified, AuthError> {
            self.tokens
                .iter()
                .find(|(t, _)| *t == token)
                .map(|(_, claims)| Verified {
                    claims: claims.clone(),
                    kid: None,
                })
                .ok_or(AuthError::Malformed)
        }
        fn node_connections(&self) -> (usize, usize) {
            (0, 0)
        }
        fn draining(&self) -> bool {
            false
        }
        fn set_phase(&mut self, to: ConnPhase) {
            self.phases.push(to);
            self.conns[0].phase = to;
        }
        fn outcome(&mut self, outcome: HandshakeOutcome) {
            self.outcomes.push(outcome);
        }
        fn refused(&mut self, refusal: &Refusal, _at: Instant) {
            self.outcomes.push(refusal.outcome());
        }
        fn denied(&mut self, _peer: SocketAddr) {
            self.outcomes.push(HandshakeOutcome::Forbidden);
        }
        fn opened(&mut self) {
            self.opened = true;
        }
        fn closing(&mut self, reason: CloseReason) {
            self.closes.push(reason);
        }
        fn send(&mut self, frame: &[&Bytes]) -> Push {
            super::super::conn::push_frame(
                &mut self.conns,
                &mut self.dirty,
                0,
                frame,
                self.queue_cap,
            )
        }
        fn send_raw(&mut self, part: OutPart) {
            let f = self.conns[0].flight();
            f.out_bytes += part.bytes.len();
            f.out.push_back(part);
        }
        fn flush(&mut self) {}
        fn kill(&mut self) {
            self.killed = true;
        }
        fn arm_close_deadline(&mut self, at: Instant) {
            self.close_deadlines.push(at);
        }
        fn arm_expiry(&mut self, at: u32) {
            self.expiries.push(at);
        }
        fn subscribe(&mut self, _project: u32, topic: &str) -> Sub {
            let id = match self.topics.iter().position(|t| t == topic) {
                Some(i) => i,
                None => {
                    self.topics.push(topic.to_owned());
                    self.topics.len() - 1
                }
            };
            Sub {
                topic: id as TopicId,
                pos: 0,
            }
        }
        fn release(&mut self, sub: Sub) {
            self.released.push(self.topics[sub.topic as usize].clone());
        }
        fn hold_until_subscribed(&mut self, _project: u32, topic: &str, ack: &Bytes) -> bool {
            if self.hold_acks {
                self.held_acks.push((topic.to_owned(), ack.clone()));
            }
            self.hold_acks
        }
        fn lookup(&self, _project: u32, topic: &str) -> Option<TopicId> {
            self.topics
                .iter()
                .position(|t| t == topic)
                .map(|i| i as TopicId)
        }
        fn topic_name(&self, topic: TopicId) -> &str {
            &self.topics[topic as usize]
        }
        fn history(&self) -> &crate::history::History {
            &self.history
        }
        fn publish(
            &mut self,
            _project: u32,
            topic: &Topic,
            data: &serde_json::value::RawValue,
        ) -> Result<(), String> {
            self.published.push(format!("{topic} {}", data.get()));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::recorder::*;
    use super::*;

    fn subscribed(h: &mut TestHost) -> Vec<String> {
        let subs = h.c().subs.clone();
        subs.iter()
            .map(|s| h.topics[s.topic as usize].clone())
            .collect()
    }

    #[test]
    fn the_upgrade_opens_with_the_welcome_implicit_topics_and_expiry() {
        let mut h = TestHost::open("t-open");
        assert_eq!(h.phases, [ConnPhase::Open]);
        assert_eq!(h.outcomes, [HandshakeOutcome::Accepted]);
        assert!(h.opened);
        assert_eq!(subscribed(&mut h), ["all", "user.42"]);
        assert_eq!(h.expiries, [(BASE_SECS + 130) as u32], "exp + leeway");
    }

    #[test]
    fn a_bad_token_is_refused_401_and_closed_after_the_answer() {
        let mut h = TestHost::new();
        let req = "GET /ws/demo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: \
                   Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: \
                   dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer nope\r\n\r\n";
        h.feed(at_ms(0), req.as_bytes());
        assert_eq!(h.outcomes, [HandshakeOutcome::Unauthorized]);
        assert_eq!(h.phases, [ConnPhase::Closing]);
        let out = h.queued();
        assert!(
            out.starts_with(b"HTTP/1.1 401 "),
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert!(h.c().kill_after_flush);
        assert_eq!(h.close_deadlines, [at_ms(0).at + CLOSE_GRACE]);
    }

    #[test]
    fn the_handshake_deadline_drops_only_a_connection_still_in_its_handshake() {
        let mut h = TestHost::new();
        h.feed(at_ms(0), b"GET /ws/demo HTTP/1.1\r\n");
        on_handshake_deadline(&mut h);
        assert!(h.killed);
        assert_eq!(h.outcomes, [HandshakeOutcome::Timeout]);
        let mut h = TestHost::open("t-open");
        on_handshake_deadline(&mut h);
        assert!(!h.killed);
    }

    /// Every close code but 1011 (which nothing sends) comes out of the machine, with its
    /// close counted once.
    #[test]
    fn every_close_code() {
        type Cause = fn(&mut TestHost);
        let cases: [(u16, CloseReason, Cause); 11] = [
            (1000, CloseReason::Normal, |h| {
                h.feed(at_ms(1), &frame(8, true, &1000u16.to_be_bytes()))
            }),
            (1001, CloseReason::GoingAway, |h| {
                close(h, at_ms(1), CloseReason::GoingAway)
            }),
            (
                1002,
                CloseReason::Protocol("client frames must be masked"),
                |h| h.feed(at_ms(1), &[0x81, 0x00]),
            ),
            (1003, CloseReason::Unsupported, |h| {
                h.feed(at_ms(1), &frame(2, true, b"x"))
            }),
            (1007, CloseReason::InvalidData("invalid JSON"), |h| {
                h.feed(at_ms(1), &text("{not json"))
            }),
            (1008, CloseReason::Policy("too many bad requests"), |h| {
                for _ in 0..3 {
                    h.feed(at_ms(1), &text(r#"{"op":"nope"}"#));
                }
            }),
            (1009, CloseReason::TooBig, |h| {
                h.feed(at_ms(1), &text(&"x".repeat(1025)))
            }),
            (4001, CloseReason::TokenExpired, |h| {
                on_expiry(h, at_ms(130_000), (BASE_SECS + 130) as u32)
            }),
            (4003, CloseReason::Kicked, |h| {
                close(h, at_ms(1), CloseReason::Kicked)
            }),
            (4008, CloseReason::SlowConsumer, |h| {
                h.queue_cap = 8;
                h.feed(at_ms(1), &text(r#"{"op":"ping","id":1}"#));
            }),
            (4029, CloseReason::RateLimited, |h| {
                h.rules.messages.interval = 1_000_000;
                for _ in 0..2 {
                    h.feed(at_ms(1), &text(r#"{"op":"ping"}"#));
                }
            }),
        ];
        for (code, reason, cause) in cases {
            let mut h = TestHost::open("t-open");
            cause(&mut h);
            assert_eq!(h.close_code(), Some(code), "{reason:?}");
            assert_eq!(h.closes, [reason], "{code}");
            assert_eq!(h.c().phase, ConnPhase::Closing, "{code}");
        }
    }

    #[test]
    fn bad_requests_are_answered_until_one_too_many() {
        let mut h = TestHost::open("t-open");
        for i in 0..2 {
            h.feed(
                at_ms(1),
                &text(&format!(
                    r#"{{"op":"subscribe","id":{i},"topic":"user.1"}}"#
                )),
            );
            let texts = h.texts();
            assert_eq!(texts.len(), 1);
            assert!(texts[0].contains("\"code\":\"forbidden\""), "{texts:?}");
            assert_eq!(h.c().phase, ConnPhase::Open);
        }
        h.feed(at_ms(1), &text(r#"{"op":"unsubscribe","topic":"nope"}"#));
        // The close drops the backlog, its unsent error reply too.
        assert_eq!(h.close_code(), Some(1008));
        assert_eq!(h.closes, [CloseReason::Policy("too many bad requests")]);
    }

    #[test]
    fn ops_subscribe_unsubscribe_publish_and_ping() {
        let mut h = TestHost::open("t-open");
        h.feed(
            at_ms(1),
            &text(r#"{"op":"subscribe","id":"a","topic":"news"}"#),
        );
        h.feed(
            at_ms(1),
            &text(r#"{"op":"subscribe","id":"b","topic":"news"}"#),
        );
        h.feed(
            at_ms(1),
            &text(r#"{"op":"publish","id":3,"topic":"news","data":{"x":1}}"#),
        );
        h.feed(at_ms(1), &text(r#"{"op":"ping","id":4}"#));
        assert_eq!(
            subscribed(&mut h),
            ["all", "user.42", "news"],
            "subscribed once"
        );
        h.feed(
            at_ms(1),
            &text(r#"{"op":"unsubscribe","id":5,"topic":"news"}"#),
        );
        assert_eq!(
            h.texts(),
            [
                r#"{"type":"ack","id":"a"}"#,
                r#"{"type":"ack","id":"b"}"#,
                r#"{"type":"ack","id":3}"#,
                r#"{"type":"pong","id":4}"#,
                r#"{"type":"ack","id":5}"#,
            ]
        );
        assert_eq!(h.published, [r#"news {"x":1}"#]);
        assert_eq!(subscribed(&mut h), ["all", "user.42"]);
        assert_eq!(h.released, ["news"]);
    }

    #[test]
    fn a_message_in_fragments_and_split_across_reads() {
        let mut h = TestHost::open("t-open");
        let msg = br#"{"op":"ping","id":7}"#;
        let mut bytes = frame(1, false, &msg[..5]);
        bytes.extend(frame(0, false, &msg[5..10]));
        bytes.extend(frame(0, true, &msg[10..]));
        // Byte by byte: every partial frame waits in the connection's buffer.
        for b in &bytes {
            assert!(h.texts().is_empty());
            h.feed(at_ms(1), std::slice::from_ref(b));
        }
        assert_eq!(h.texts(), [r#"{"type":"pong","id":7}"#]);
        assert!(h.c().flight.is_none(), "no buffer kept: nothing in flight");
    }

    #[test]
    fn ping_is_answered_with_its_payload_and_pong_answers_the_heartbeat() {
        let mut h = TestHost::open("t-open");
        h.feed(at_ms(1), &frame(9, true, b"hi"));
        assert_eq!(h.sent(), [(10, b"hi".to_vec())]);
        let rules = h.rules.clone();
        assert_eq!(heartbeat(h.c(), &rules, at_ms(2)), Beat::Ping);
        assert_eq!(heartbeat(h.c(), &rules, at_ms(3)), Beat::Dead, "no answer");
        let mut h = TestHost::open("t-open");
        assert_eq!(heartbeat(h.c(), &rules, at_ms(2)), Beat::Ping);
        h.feed(at_ms(3), &frame(10, true, b""));
        assert!(!h.c().ping_outstanding);
        assert_eq!(heartbeat(h.c(), &rules, at_ms(4)), Beat::Ping, "answered");
    }

    #[test]
    fn the_message_limit_allows_the_burst_then_closes_4029() {
        let mut h = TestHost::open("t-open");
        // 10 per second, burst 3.
        h.rules.messages = Rate {
            interval: 100_000,
            tolerance: 200_000,
        };
        for _ in 0..3 {
            h.feed(at_ms(1), &text(r#"{"op":"ping"}"#));
        }
        assert_eq!(h.texts().len(), 3);
        h.feed(at_ms(1), &text(r#"{"op":"ping"}"#));
        assert_eq!(h.close_code(), Some(4029));
        assert_eq!(h.closes, [CloseReason::RateLimited]);
        // A quiet connection gets its allowance back.
        let mut h = TestHost::open("t-open");
        h.rules.messages = Rate {
            interval: 100_000,
            tolerance: 200_000,
        };
        for i in 0..6 {
            h.feed(at_ms(1 + i * 100), &text(r#"{"op":"ping"}"#));
        }
        assert_eq!(h.texts().len(), 6);
        assert!(h.closes.is_empty());
    }

    /// The acks the host holds: (topic, frame payload).
    fn held_payloads(h: &TestHost) -> Vec<(String, Vec<u8>)> {
        h.held_acks
            .iter()
            .map(|(t, ack)| (t.clone(), ack[2..].to_vec()))
            .collect()
    }

    #[test]
    fn a_new_subscription_is_acknowledged_when_the_host_says_it_is_in_place() {
        let mut h = TestHost::open("t-open");
        h.sent();
        h.hold_acks = true;
        h.feed(
            at_ms(1),
            &text(r#"{"op":"subscribe","topic":"news","id":7}"#),
        );
        h.feed(at_ms(2), &text(r#"{"op":"ping","id":8}"#));
        // The ack is the host's to send; later replies do not wait for it.
        assert_eq!(h.texts(), [r#"{"type":"pong","id":8}"#]);
        assert_eq!(
            held_payloads(&h),
            [("news".to_owned(), br#"{"type":"ack","id":7}"#.to_vec())]
        );
        assert_eq!(subscribed(&mut h), ["all", "user.42", "news"]);
        // Subscribed already: nothing to wait for.
        h.feed(
            at_ms(3),
            &text(r#"{"op":"subscribe","topic":"news","id":9}"#),
        );
        assert_eq!(h.texts(), [r#"{"type":"ack","id":9}"#]);
        assert_eq!(h.held_acks.len(), 1);
    }

    #[test]
    fn refresh_replaces_the_claims_and_narrows_subscriptions() {
        let mut h = TestHost::open("t-open");
        for t in ["news.a", "sport"] {
            h.feed(
                at_ms(1),
                &text(&format!(r#"{{"op":"subscribe","topic":"{t}"}}"#)),
            );
        }
        h.sent();
        h.feed(
            at_ms(2),
            &text(r#"{"op":"refresh","id":1,"token":"t-later"}"#),
        );
        assert_eq!(
            h.texts(),
            [
                r#"{"type":"unsubscribed","topic":"sport","reason":"not_allowed"}"#.to_owned(),
                format!(r#"{{"type":"ack","id":1,"exp":{}}}"#, BASE_SECS + 200),
            ]
        );
        assert_eq!(subscribed(&mut h), ["all", "user.42", "news.a"]);
        assert_eq!(h.c().expires_at, (BASE_SECS + 230) as u32);
        assert_eq!(
            h.expiries,
            [(BASE_SECS + 130) as u32, (BASE_SECS + 230) as u32]
        );
        // The old expiry is stale now.
        on_expiry(&mut h, at_ms(130_000), (BASE_SECS + 130) as u32);
        assert!(h.closes.is_empty());
    }

    #[test]
    fn refresh_with_a_bad_token_or_another_sub_is_forbidden() {
        let mut h = TestHost::open("t-open");
        for token in ["nope", "t-other"] {
            h.feed(
                at_ms(1),
                &text(&format!(r#"{{"op":"refresh","id":1,"token":"{token}"}}"#)),
            );
            let texts = h.texts();
            assert!(texts[0].contains(r#""code":"forbidden""#), "{texts:?}");
        }
        assert_eq!(h.c().expires_at, (BASE_SECS + 130) as u32, "unchanged");
        assert_eq!(h.c().phase, ConnPhase::Open);
    }

    #[test]
    fn refresh_over_its_limit_is_rate_limited() {
        let mut h = TestHost::open("t-open");
        // 2 per minute, burst 1.
        h.rules.refreshes.interval = 30_000;
        h.rules.refreshes_per_min = 2;
        h.rules.refresh_burst = 1;
        h.feed(at_ms(1), &text(r#"{"op":"refresh","token":"t-open"}"#));
        h.feed(at_ms(10_000), &text(r#"{"op":"refresh","token":"t-open"}"#));
        let texts = h.texts();
        assert!(texts[0].starts_with(r#"{"type":"ack""#), "{texts:?}");
        assert_eq!(
            texts[1],
            r#"{"type":"error","code":"rate_limited","message":"at most 2 refreshes per minute (burst 1); retry in 21 s"}"#
        );
        h.feed(at_ms(30_001), &text(r#"{"op":"refresh","token":"t-open"}"#));
        assert!(h.texts()[0].starts_with(r#"{"type":"ack""#));
    }

    /// The connection is closed 4001 at exactly `exp + leeway`, not a second before.
    #[test]
    fn expiry_closes_at_exactly_exp_plus_leeway() {
        let mut h = TestHost::open("t-open");
        let at = (BASE_SECS + 130) as u32;
        on_expiry(&mut h, at_ms(129_999), at);
        assert!(h.closes.is_empty(), "a second before");
        assert_eq!(h.c().phase, ConnPhase::Open);
        on_expiry(&mut h, at_ms(130_000), at);
        assert_eq!(h.closes, [CloseReason::TokenExpired]);
        assert_eq!(h.close_code(), Some(4001));
    }

    #[test]
    fn peer_closes_first_we_echo_and_close_once_written() {
        let mut h = TestHost::open("t-open");
        h.feed(at_ms(1), &frame(8, true, &4321u16.to_be_bytes()));
        assert_eq!(h.close_code(), Some(4321), "the peer's code echoed");
        assert!(h.c().kill_after_flush);
        assert_eq!(h.closes, [CloseReason::Normal]);
        assert_eq!(h.close_deadlines, [at_ms(1).at + CLOSE_GRACE]);
        assert!(!h.killed);
    }

    #[test]
    fn we_close_first_and_the_peer_answers() {
        let mut h = TestHost::open("t-open");
        h.feed(at_ms(1), &text(r#"{"op":"subscribe","topic":"a"}"#));
        close(&mut h, at_ms(1), CloseReason::Kicked);
        // The unsent ack was dropped for the close frame.
        assert_eq!(h.sent().len(), 1);
        // What the peer sent before our close reached it is skipped; its answer ends it.
        let mut bytes = text(r#"{"op":"ping"}"#);
        bytes.extend(frame(8, true, &4003u16.to_be_bytes()));
        h.feed(at_ms(2), &bytes);
        assert!(h.sent().is_empty(), "no reply while closing");
        assert!(h.killed);
        assert_eq!(h.closes, [CloseReason::Kicked], "counted once");
    }

    #[test]
    fn stomp_connect_brings_the_token_split_over_two_messages() {
        let mut h = TestHost::stomp_upgrade();
        let connect =
            "CONNECT\naccept-version:1.2,1.1,1.0\nheart-beat:10000,10000\npasscode:t-open\n\n\0";
        h.feed(at_ms(1), &text(&connect[..20]));
        assert_eq!(h.c().phase, ConnPhase::Handshake, "half a frame");
        h.feed(at_ms(2), &text(&connect[20..]));
        assert_eq!(h.c().phase, ConnPhase::Open);
        assert_eq!(h.outcomes, [HandshakeOutcome::Accepted]);
        assert_eq!(subscribed(&mut h), ["all", "user.42"]);
        assert_eq!(
            h.texts(),
            [format!(
                "CONNECTED\nversion:1.2\nheart-beat:25000,0\nserver:herald/{}\nuser-name:42\n\n\0",
                env!("CARGO_PKG_VERSION")
            )]
        );
        assert!(
            h.stomp.as_ref().unwrap().beats,
            "EOLs with the heartbeat's pings"
        );
        h.feed(
            at_ms(4),
            &text("SUBSCRIBE\nid:0\ndestination:/topic/news\nreceipt:r\n\n\0\nDISCONNECT\nreceipt:bye\n\n\0"),
        );
        assert_eq!(subscribed(&mut h), ["all", "user.42", "news"]);
        let sent = h.sent();
        assert_eq!(sent[0], (1, b"RECEIPT\nreceipt-id:r\n\n\0".to_vec()));
        assert_eq!(sent[1], (1, b"RECEIPT\nreceipt-id:bye\n\n\0".to_vec()));
        assert_eq!(sent[2].0, 8, "then the close");
        assert_eq!(h.closes, [CloseReason::Normal]);
    }

    /// Subscriptions by id are capped even when they share one topic.
    #[test]
    fn stomp_subscriptions_are_capped() {
        let mut h = TestHost::stomp_upgrade();
        h.feed(at_ms(1), &text("CONNECT\npasscode:t-open\n\n\0"));
        // 4 explicit + 2 implicit topics.
        for i in 0..6 {
            let f = format!("SUBSCRIBE\nid:{i}\ndestination:/topic/news\n\n\0");
            h.feed(at_ms(2), &text(&f));
        }
        assert_eq!(h.c().phase, ConnPhase::Open);
        h.sent();
        h.feed(
            at_ms(3),
            &text("SUBSCRIBE\nid:x\ndestination:/topic/all\n\n\0"),
        );
        let sent = h.sent();
        assert!(
            sent[0]
                .1
                .starts_with(b"ERROR\nmessage:at most 6 subscriptions per connection\n"),
            "{:?}",
            String::from_utf8_lossy(&sent[0].1)
        );
        assert_eq!(h.closes, [CloseReason::Policy("STOMP frame refused")]);
    }

    #[test]
    fn stomp_connect_with_a_bad_token_is_an_error_then_close() {
        let mut h = TestHost::stomp_upgrade();
        h.feed(at_ms(1), &text("CONNECT\nAuthorization:Bearer nope\n\n\0"));
        assert_eq!(h.outcomes, [HandshakeOutcome::Unauthorized]);
        assert_eq!(h.c().phase, ConnPhase::Closing);
        let sent = h.sent();
        let error = String::from_utf8(sent[0].1.clone()).unwrap();
        assert!(error.starts_with("ERROR\nmessage:"), "{error}");
        assert_eq!(sent[1].0, 8);
        assert_eq!(h.closes, [CloseReason::Policy("authentication failed")]);
        // The handshake deadline has nothing left to do.
        on_handshake_deadline(&mut h);
        assert_eq!(h.outcomes.len(), 1);
    }

    #[test]
    fn stomp_expiry_is_an_error_then_4001() {
        let mut h = TestHost::stomp_upgrade();
        h.feed(at_ms(1), &text("CONNECT\npasscode:t-open\n\n\0"));
        assert_eq!(h.texts().len(), 1, "CONNECTED (1.0: no accept-version)");
        on_expiry(&mut h, at_ms(130_000), (BASE_SECS + 130) as u32);
        let sent = h.sent();
        assert_eq!(
            sent[0],
            (1, b"ERROR\nmessage:token expired\ncontent-type:text/plain\ncontent-length:13\n\ntoken expired\0".to_vec())
        );
        assert_eq!(u16::from_be_bytes([sent[1].1[0], sent[1].1[1]]), 4001);
    }

    /// Every close herald starts on a STOMP connection (kick, drain, slow consumer, rate) is
    /// an ERROR naming why, then the close frame.
    #[test]
    fn stomp_closes_are_an_error_then_the_close() {
        for reason in [
            CloseReason::Kicked,
            CloseReason::GoingAway,
            CloseReason::SlowConsumer,
            CloseReason::RateLimited,
        ] {
            let mut h = TestHost::open_stomp();
            close(&mut h, at_ms(1), reason);
            let sent = h.sent();
            assert_eq!(sent.len(), 2, "{reason:?}: {sent:?}");
            let why = reason.text();
            assert_eq!(
                String::from_utf8(sent[0].1.clone()).unwrap(),
                format!(
                    "ERROR\nmessage:{why}\ncontent-type:text/plain\ncontent-length:{}\n\n{why}\0",
                    why.len()
                ),
                "{reason:?}"
            );
            assert_eq!(sent[1].0, 8, "{reason:?}");
            assert_eq!(
                u16::from_be_bytes([sent[1].1[0], sent[1].1[1]]),
                reason.code()
            );
        }
    }

    /// A SUBSCRIBE's RECEIPT waits for the host, as herald.v1's ack does; a SUBSCRIBE without
    /// one hands the host a harmless EOL.
    #[test]
    fn a_stomp_subscribe_receipt_waits_for_the_subscription() {
        let mut h = TestHost::open_stomp();
        h.hold_acks = true;
        h.feed(
            at_ms(1),
            &text(
                "SUBSCRIBE\nid:0\ndestination:/topic/news\nreceipt:r1\n\n\0\
                 ACK\nid:x\nreceipt:r2\n\n\0\
                 SUBSCRIBE\nid:1\ndestination:/topic/sport\n\n\0",
            ),
        );
        assert_eq!(h.texts(), ["RECEIPT\nreceipt-id:r2\n\n\0"]);
        assert_eq!(
            held_payloads(&h),
            [
                ("news".to_owned(), b"RECEIPT\nreceipt-id:r1\n\n\0".to_vec()),
                ("sport".to_owned(), b"\n".to_vec())
            ]
        );
        // Without an engine to wait for, the RECEIPT goes at once.
        h.hold_acks = false;
        h.feed(
            at_ms(2),
            &text("SUBSCRIBE\nid:2\ndestination:/topic/x\nreceipt:r3\n\n\0"),
        );
        assert_eq!(h.texts(), ["RECEIPT\nreceipt-id:r3\n\n\0"]);
    }

    #[test]
    fn we_close_first_and_the_deadline_ends_it() {
        let mut h = TestHost::open("t-open");
        close(&mut h, at_ms(1), CloseReason::GoingAway);
        close(&mut h, at_ms(2), CloseReason::Kicked);
        assert_eq!(
            h.closes,
            [CloseReason::GoingAway],
            "a second close changes nothing"
        );
        assert_eq!(h.close_deadlines, [at_ms(1).at + CLOSE_GRACE]);
        assert!(!h.killed);
        on_close_deadline(&mut h);
        assert!(h.killed);
    }
}
