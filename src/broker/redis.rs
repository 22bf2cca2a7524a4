//! The Redis engine: nodes of one cluster share publishes through Redis PUB/SUB.
//!
//! # Channels
//!
//! One channel per (project, topic): `<engine.prefix><project id>:<topic>` (a project id has
//! no `:`), the implicit `all` and `user.<sub>` topics included. A publish is one `PUBLISH`
//! per topic whose payload is the end of the delivery frame (data, id, time: the publication's
//! shared body); every node, the publishing one too, delivers what its own subscription
//! receives, so every node delivers a topic's messages in the order Redis took them. A node
//! builds each topic's frame head once on receipt and its shards share the body (encoded once
//! per node).
//!
//! A topic with history is published by a script that numbers it in Redis instead, and its
//! payload carries its offset and epoch ([`super::redis_history`]); the bridge reads streams
//! for recoveries and repairs the gaps it sees in a topic's offsets.
//!
//! # Interest
//!
//! A node is subscribed to a channel only while one of its connections is subscribed to the
//! topic: the shards' first and last local subscribers change the node's [`Interest`] table,
//! whose first and last per node are sent to the bridge as changes. The bridge batches them
//! into `SUBSCRIBE` commands and keeps a channel for `engine.unsubscribe_linger_ms` after its
//! last subscriber before `UNSUBSCRIBE`, so a topic that comes and goes does not churn.
//!
//! # The bridge thread
//!
//! [`RedisBroker`] is what the shards and the API hold; the bridge ([`Bridge::spawn`]) is one
//! thread with its own tokio runtime owning the two Redis connections (one for `PUBLISH`, one
//! for subscriptions, in RESP3 so pushes come with their channel). Nothing waits on the other
//! side without a bound:
//!
//! - publishes go to the bridge through a bounded queue ([`PUBLISH_QUEUE`]): full, the publish
//!   is refused (503 `busy`); the API then awaits Redis's answer to its `PUBLISH`, at most
//!   `engine.command_timeout_ms` (a shard never waits: [`crate::hub::Hub::publish`]);
//! - interest changes go through a bounded queue ([`CHANGE_QUEUE`]): full, the change is
//!   dropped and the bridge reconciles its subscriptions with the whole table instead;
//! - messages from Redis go through a bounded queue ([`MESSAGE_QUEUE`]) to the bridge's
//!   delivery loop: full, a message is dropped and counted (`queue_full`);
//! - deliveries go into the shards' inboxes through [`Deliver::deliver_each`], under the
//!   publish gate and the inboxes' reservations; a shard whose inbox is full does not get the
//!   message, which is counted (`inbox_full`) and logged at most once a second.
//!
//! # The engine going away
//!
//! While Redis is not connected, publishes are refused 503 `engine_unavailable`, `/readyz`
//! says `degraded`, and clients stay connected. The bridge logs one line per change of state,
//! reconnects with exponential backoff and jitter, and on reconnect subscribes again to every
//! channel the interest table names, in batches, then tells the subscribers of each that
//! they may have missed messages ([`Deliver::resync`], from `tell_resync` only). A subscription that stays open but no longer
//! receives is found by a liveness probe on the node's own channel (`engine.probe_interval_ms`).
//!
//! # Not here yet
//!
//! STOMP clients get no `resync` notice; no Sentinel or Redis Cluster. (A `subscribe` ack, a
//! STOMP `SUBSCRIBE`'s `RECEIPT` and the welcome wait for the node's Redis subscriptions
//! through [`Broker::when_subscribed`]; TLS is [`super::tls`].)

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ProtocolVersion, PushKind, Value};
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use super::control::{self, ControlPlane};
use super::redis_history::{self, Numbering};
use super::{
    Broker, Deliver, EngineDown, EngineStats, Interest, Pending, Publication as Pub, PublishError,
};
use crate::auth::SharedRegistry;
use crate::settings::EngineSettings;

/// Publish commands (one publish or batch each) waiting for the bridge at most.
pub const PUBLISH_QUEUE: usize = 4096;
/// Interest changes waiting for the bridge at most; past it the bridge reconciles with the
/// whole table.
pub const CHANGE_QUEUE: usize = 65_536;
/// Messages from Redis waiting for delivery to the shards at most.
pub const MESSAGE_QUEUE: usize = 65_536;
/// Channels in one `SUBSCRIBE` or `UNSUBSCRIBE` command.
pub const CHANNELS_PER_COMMAND: usize = 1000;
/// Publish commands sent to Redis in one pipeline at most.
const PUBLISHES_PER_PIPELINE: usize = 256;
/// First wait before reconnecting; doubled after each failure up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest wait before reconnecting.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Adds `n` to a counter.
fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// A publish or batch on its way to Redis.
struct PublishCmd {
    /// (channel, payload, numbering for a topic with history) per topic of every
    /// publication, in order.
    messages: Vec<(String, Bytes, Option<Numbering>)>,
    /// Where the bridge answers.
    ack: tokio::sync::oneshot::Sender<Result<(), PublishError>>,
}

/// A (project, topic): one channel.
type Key = (u32, Box<str>);
/// Called once a channel is subscribed.
type Waiter = Box<dyn FnOnce() + Send>;

/// What the shards tell the bridge.
enum Change {
    /// The node's interest in (project, topic) started or ended: the bridge looks at the
    /// table when it acts.
    Topic(u32, Box<str>),
    /// Call this once (project, topic)'s channel is subscribed.
    Waiter(u32, Box<str>, Waiter),
    /// Read (project, topic)'s stream into the node's copy once its channel is subscribed,
    /// then call this.
    Fetch(u32, Box<str>, super::HistoryRead, Waiter),
}

/// The broker the shards and the API hold when the node shares an engine.
pub struct RedisBroker {
    /// The node's table, shared with its delivery path.
    interest: Arc<Interest>,
    /// To name a project's channels.
    registry: SharedRegistry,
    /// `engine.prefix`.
    prefix: Arc<str>,
    /// To the bridge's publisher.
    publishes: mpsc::Sender<PublishCmd>,
    /// To the bridge's subscription manager.
    changes: mpsc::Sender<Change>,
    /// Set when a change was dropped: the bridge reconciles with the whole table.
    resync: Arc<Resync>,
    /// Counters, shared with the bridge.
    stats: Arc<EngineStats>,
    /// How long a publish waits for Redis.
    command_timeout: Duration,
    /// Requests to the other nodes.
    control: Arc<ControlPlane>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A request to reconcile the subscriptions with the whole interest table.
#[derive(Debug, Default)]
struct Resync {
    /// A reconcile is wanted.
    wanted: AtomicBool,
    /// Wakes the bridge.
    notify: Notify,
}

impl Resync {
    fn request(&self) {
        self.wanted.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    fn take(&self) -> bool {
        self.wanted.swap(false, Ordering::AcqRel)
    }
}

/// The channel of (project id, topic).
pub fn channel(prefix: &str, project: &str, topic: &str) -> String {
    let mut c = String::with_capacity(prefix.len() + project.len() + 1 + topic.len());
    c.push_str(prefix);
    c.push_str(project);
    c.push(':');
    c.push_str(topic);
    c
}

/// The channel a node publishes its liveness probe on: `<prefix>~node:<node>` (`~` is in no
/// project id, so it is no topic's channel).
pub fn probe_channel(prefix: &str, node: &str) -> String {
    format!("{prefix}~node:{node}")
}

/// (project id, topic) of a channel, `None` if it is not one of `prefix`'s.
pub fn parse_channel<'a>(prefix: &str, channel: &'a str) -> Option<(&'a str, &'a str)> {
    channel.strip_prefix(prefix)?.split_once(':')
}

impl RedisBroker {
    /// A broker keeping `interest` up to date and the bridge that will carry its publishes
    /// and subscriptions ([`Bridge::spawn`] it once the node's hub exists).
    pub fn new(
        settings: &EngineSettings,
        node: &str,
        interest: Arc<Interest>,
        registry: SharedRegistry,
    ) -> (Self, Bridge) {
        let (publishes, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        let (changes, change_rx) = mpsc::channel(CHANGE_QUEUE);
        let stats = Arc::new(EngineStats::default());
        let resync = Arc::new(Resync::default());
        let (control, commands_rx) =
            ControlPlane::new(node, &settings.prefix, settings.command_timeout);
        let control = Arc::new(control);
        let broker = Self {
            control: control.clone(),
            interest: interest.clone(),
            registry: registry.clone(),
            prefix: settings.prefix.clone(),
            publishes,
            changes,
            resync: resync.clone(),
            stats: stats.clone(),
            command_timeout: settings.command_timeout,
        };
        let delivered = redis_history::Delivered::default();
        let unsubscribed = delivered.unsubscribed();
        let bridge = Bridge {
            delivered,
            publish_rx,
            commands_rx,
            control,
            subs: Subscriptions {
                probe_channel: probe_channel(&settings.prefix, node),
                settings: settings.clone(),
                interest,
                registry,
                stats,
                resync,
                change_rx,
                subscribed: HashSet::new(),
                lingering: HashMap::new(),
                waiters: HashMap::new(),
                fetches: HashMap::new(),
                reader: None,
                unsubscribed,
            },
        };
        (broker, bridge)
    }

    /// Tells the bridge to look at (project, topic); a full queue makes it reconcile with
    /// the whole table instead.
    fn changed(&self, project: u32, topic: &str) {
        if self
            .changes
            .try_send(Change::Topic(project, topic.into()))
            .is_err()
        {
            add(&self.stats.changes_overflowed, 1);
            self.resync.request();
        }
    }
}

impl Broker for RedisBroker {
    fn publish(
        &self,
        _node: &dyn Deliver,
        publications: &[Arc<Pub>],
    ) -> Result<Pending, PublishError> {
        if !self.stats.up.load(Ordering::Acquire) {
            return Err(PublishError::EngineUnavailable(EngineDown::NotConnected));
        }
        let registry = self.registry.load();
        let mut messages = Vec::with_capacity(publications.iter().map(|p| p.heads.len()).sum());
        for p in publications {
            // A project removed since the publish was checked: nowhere to send it.
            let Some(project) = registry.project_at(p.project) else {
                continue;
            };
            for (topic, _) in &p.heads {
                let numbering =
                    crate::history::rule_for(&project.history, topic).map(|r| Numbering {
                        stream: redis_history::stream_key(&self.prefix, &project.id, topic),
                        meta: redis_history::meta_key(&self.prefix, &project.id, topic),
                        size: r.size,
                        ttl_secs: (r.ttl_ms / 1000).max(1),
                        meta_ttl_secs: redis_history::meta_ttl_secs((r.ttl_ms / 1000).max(1)),
                    });
                let ch = channel(&self.prefix, &project.id, topic);
                messages.push((ch, p.body.clone(), numbering));
            }
        }
        let (ack, acked) = tokio::sync::oneshot::channel();
        match self.publishes.try_send(PublishCmd { messages, ack }) {
            Ok(()) => Ok(Pending::awaiting(acked, self.command_timeout)),
            Err(mpsc::error::TrySendError::Full(_)) => Err(PublishError::EngineBusy),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(PublishError::EngineUnavailable(EngineDown::NotConnected))
            }
        }
    }

    fn subscribe(&self, shard: usize, project: u32, topic: &str) -> bool {
        let added = self.interest.add(shard, project, topic);
        if added.first {
            self.changed(project, topic);
        }
        !added.confirmed
    }

    fn unsubscribe(&self, shard: usize, project: u32, topic: &str) {
        if self.interest.remove(shard, project, topic) {
            self.changed(project, topic);
        }
    }

    fn when_subscribed(&self, project: u32, topic: &str, done: Box<dyn FnOnce() + Send>) {
        match self
            .changes
            .try_send(Change::Waiter(project, topic.into(), done))
        {
            Ok(()) => {}
            Err(e) => {
                add(&self.stats.changes_overflowed, 1);
                self.resync.request();
                // No room to wait: the ack goes now, as on a node of its own.
                if let Change::Waiter(_, _, done) = e.into_inner() {
                    done();
                }
            }
        }
    }

    fn fetch_history(
        &self,
        project: u32,
        topic: &str,
        read: super::HistoryRead,
        done: Box<dyn FnOnce() + Send>,
    ) {
        if let Err(e) = self
            .changes
            .try_send(Change::Fetch(project, topic.into(), read, done))
        {
            add(&self.stats.changes_overflowed, 1);
            self.resync.request();
            // No room to ask: the node's copy answers what it holds.
            if let Change::Fetch(.., done) = e.into_inner() {
                done();
            }
        }
    }

    fn engine(&self) -> Option<&EngineStats> {
        Some(&self.stats)
    }

    fn control(&self) -> Option<&Arc<ControlPlane>> {
        Some(&self.control)
    }
}

/// The bridge: owns the Redis connections on its own thread ([`Bridge::spawn`]).
pub struct Bridge {
    /// Publishes from the API and the shards.
    publish_rx: mpsc::Receiver<PublishCmd>,
    /// Redis commands of the control plane.
    commands_rx: mpsc::Receiver<control::Command>,
    /// The control plane: its channels' messages go to it.
    control: Arc<ControlPlane>,
    /// The node's subscriptions.
    subs: Subscriptions,
    /// The last offset delivered of each topic with history: tells gaps, across sessions.
    delivered: redis_history::Delivered,
}

/// The node's subscriptions in Redis and what changes them.
struct Subscriptions {
    /// The node's own channel, for the liveness probe.
    probe_channel: String,
    /// `[engine]`.
    settings: EngineSettings,
    /// The node's table: what it wants subscribed, looked at when the bridge acts.
    interest: Arc<Interest>,
    /// To name a project's channels.
    registry: SharedRegistry,
    /// Counters, shared with the broker and `/metrics`.
    stats: Arc<EngineStats>,
    /// Set by the broker when a change was dropped.
    resync: Arc<Resync>,
    /// Interest changes and waiters from the shards.
    change_rx: mpsc::Receiver<Change>,
    /// Channels subscribed on the current connection, by (project, topic).
    subscribed: HashSet<Key>,
    /// Subscribed channels without a local subscriber, and when to drop them.
    lingering: HashMap<Key, Instant>,
    /// Callbacks waiting for a channel's subscription.
    waiters: HashMap<Key, Vec<Waiter>>,
    /// Reads of streams waiting for their channel's subscription.
    fetches: HashMap<Key, Vec<(super::HistoryRead, Waiter)>>,
    /// Where streams are read and what they are read into, while connected.
    reader: Option<(MultiplexedConnection, Weak<dyn Deliver + Send + Sync>)>,
    /// The topics unsubscribed from, for the delivery loop to forget their last offset.
    unsubscribed: redis_history::Unsubscribed,
}

/// Oldest Redis herald runs on: 7.0 (RESP3 pushes, `CLIENT PAUSE WRITE`, ACL users).
pub const MIN_REDIS: (u32, u32) = (7, 0);

/// Connects to the engine once (`herald check-config --connect`), with its credentials, and
/// reads its version (`INFO server`), which must be at least [`MIN_REDIS`]. Returns the
/// version.
///
/// # Errors
/// Why the engine cannot be used: not reachable, refused the credentials, too old. Never
/// quotes the address.
pub fn check_engine(settings: &EngineSettings) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("no runtime: {e}"))?;
    rt.block_on(async {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.command_timeout));
        let mut conn = Client::open(settings.address.clone())
            .map_err(describe)?
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| format!("cannot connect: {}", describe(e)))?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("INFO server refused: {}", describe(e)))?;
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(str::trim)
            .ok_or("INFO server names no redis_version")?
            .to_owned();
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if found < MIN_REDIS {
            return Err(format!(
                "Redis {version} is too old: herald needs {}.{} or later",
                MIN_REDIS.0, MIN_REDIS.1
            ));
        }
        Ok(version)
    })
}

/// Why a session with Redis ended.
enum Ended {
    /// The node is gone (its queues closed): the bridge stops.
    Stopped,
    /// The connection failed; reconnect.
    Lost(String),
}

impl Bridge {
    /// Starts the bridge thread. It delivers to `hub` while the hub lives and stops once the
    /// broker (held by the hub) is dropped.
    ///
    /// # Errors
    /// The thread or its runtime could not be made.
    pub fn spawn(self, hub: Weak<dyn Deliver + Send + Sync>) -> std::io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("herald-engine".into())
            .spawn(move || rt.block_on(self.run(hub)))?;
        Ok(())
    }

    async fn run(mut self, hub: Weak<dyn Deliver + Send + Sync>) {
        let mut backoff = RECONNECT_MIN;
        let mut was_up = None;
        loop {
            let reason = match self.session(&hub, &mut was_up).await {
                Ended::Stopped => return,
                Ended::Lost(reason) => reason,
            };
            if self.subs.stats.up.swap(false, Ordering::AcqRel) {
                add(&self.subs.stats.disconnects, 1);
                backoff = RECONNECT_MIN;
            }
            if was_up != Some(false) {
                warn!(
                    reason,
                    "engine unavailable: publishes answer 503 `engine_unavailable` until Redis is \
                     back; reconnecting with backoff"
                );
                was_up = Some(false);
            }
            self.subs.subscribed.clear();
            self.subs.lingering.clear();
            self.subs.reader = None;
            self.subs.stats.channels.store(0, Ordering::Relaxed);
            // Full jitter: a cluster's nodes do not come back all at once.
            let wait = backoff.mul_f64(rand::random_range(0.5..1.0));
            backoff = (backoff * 2).min(RECONNECT_MAX);
            if self.refuse_until(Instant::now() + wait).await {
                return;
            }
        }
    }

    /// Until `deadline`: answers queued publishes `engine_unavailable` and keeps the waiters
    /// (changes need nothing: every channel is subscribed again on reconnect). True when the
    /// node is gone.
    async fn refuse_until(&mut self, deadline: Instant) -> bool {
        let sleep = tokio::time::sleep_until(deadline.into());
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return false,
                cmd = self.publish_rx.recv() => match cmd {
                    Some(cmd) => {
                        let _ = cmd.ack.send(Err(PublishError::EngineUnavailable(EngineDown::NotConnected)));
                    }
                    None => return true,
                },
                cmd = self.commands_rx.recv() => {
                    if let Some(cmd) = cmd {
                        let _ = cmd.ack.send(Err("the engine is not connected".into()));
                    }
                }
                change = self.subs.change_rx.recv() => match change {
                    Some(Change::Waiter(p, t, done)) => {
                        self.subs.waiters.entry((p, t)).or_default().push(done);
                    }
                    Some(Change::Fetch(p, t, read, done)) => {
                        self.subs.fetches.entry((p, t)).or_default().push((read, done));
                        self.subs.count_pending();
                    }
                    Some(Change::Topic(p, t)) => self.subs.answer_if_unwanted(&(p, t)),
                    None => return true,
                },
            }
        }
    }

    /// Connects, subscribes to every channel of the table, then serves until the connection
    /// fails or the node is gone.
    async fn session(
        &mut self,
        hub: &Weak<dyn Deliver + Send + Sync>,
        was_up: &mut Option<bool>,
    ) -> Ended {
        let Self {
            publish_rx,
            commands_rx,
            control,
            subs,
            delivered,
        } = self;
        let (msg_tx, mut msg_rx) = mpsc::channel::<(Vec<u8>, Vec<u8>)>(MESSAGE_QUEUE);
        let lost = Arc::new(Notify::new());
        let (mut publisher, mut subscriber) = match subs.connect(msg_tx, lost.clone()).await {
            Ok(c) => c,
            Err(e) => return Ended::Lost(e),
        };
        if let Err(e) = subscriber.subscribe(&subs.probe_channel).await {
            return Ended::Lost(describe(e));
        }
        if let Err(e) = subscriber.subscribe(&control.channels()).await {
            return Ended::Lost(describe(e));
        }
        if let Err(e) = control.heartbeat().query_async::<()>(&mut publisher).await {
            return Ended::Lost(describe(e));
        }
        let script = match load_script(&mut publisher).await {
            Ok(sha) => sha,
            Err(e) => return Ended::Lost(e),
        };
        subs.reader = Some((publisher.clone(), hub.clone()));
        if let Err(e) = subs.reconcile(&mut subscriber).await {
            return Ended::Lost(e);
        }
        let reconnected = subs.stats.connects.load(Ordering::Relaxed) > 0;
        subs.stats.up.store(true, Ordering::Release);
        add(&subs.stats.connects, 1);
        if reconnected {
            // Topics with history are repaired from their streams; the others, and those that
            // cannot be, are told to resync.
            let mut unrepaired = HashSet::new();
            for key in &subs.subscribed {
                if !repair_after_away(&mut publisher, hub, subs, key, delivered).await {
                    unrepaired.insert(key.clone());
                }
            }
            tell_resync(hub, &unrepaired, &subs.stats);
            // Topics not subscribed again: their last offset tells nothing any more.
            let registry = subs.registry.load();
            let now: HashSet<redis_history::Key> = subs
                .subscribed
                .iter()
                .filter_map(|(p, t)| {
                    Some((Box::<str>::from(&*registry.project_at(*p)?.id), t.clone()))
                })
                .collect();
            delivered.retain(|k| now.contains(k));
        }
        if *was_up != Some(true) {
            info!(
                channels = subs.subscribed.len(),
                "engine connected: Redis subscriptions in place, publishes accepted"
            );
            *was_up = Some(true);
        }
        let stats = subs.stats.clone();
        let prefix = subs.settings.prefix.clone();
        let command_timeout = subs.settings.command_timeout;
        let mut probe = Probe {
            publisher: publisher.clone(),
            channel: subs.probe_channel.clone(),
            interval: subs.settings.probe_interval,
            timeout: command_timeout,
            sent: None,
        };
        // When a message (any, the probe included) last came from Redis.
        let heard = std::cell::Cell::new(Instant::now());
        let commander = publisher.clone();
        let publishing = publish_loop(publish_rx, &mut publisher, &script, command_timeout, &stats);
        let delivering = deliver_loop(
            &mut msg_rx,
            hub,
            control,
            (&prefix, command_timeout),
            (&commander, delivered),
            &heard,
            &stats,
        );
        tokio::pin!(publishing, delivering);
        // The subscription manager and the probe run here, beside the two loops.
        let mut tick = tokio::time::interval(lingering_period(subs.settings.unsubscribe_linger));
        let mut probe_tick = tokio::time::interval(probe.period());
        let mut heartbeat = tokio::time::interval(control::HEARTBEAT);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    let mut conn = commander.clone();
                    let pipe = control.heartbeat();
                    tokio::spawn(async move { pipe.query_async::<()>(&mut conn).await });
                }
                cmd = commands_rx.recv() => {
                    let Some(control::Command { pipe, ack }) = cmd else { return Ended::Stopped };
                    let mut conn = commander.clone();
                    tokio::spawn(async move {
                        let _ = ack.send(pipe.query_async::<Value>(&mut conn).await.map_err(describe));
                    });
                }
                ended = &mut publishing => return ended,
                ended = &mut delivering => return ended,
                () = lost.notified() => return Ended::Lost("connection closed".into()),
                _ = probe_tick.tick() => {
                    if let Err(e) = probe.check(heard.get()).await {
                        return Ended::Lost(e);
                    }
                }
                change = subs.change_rx.recv() => {
                    let Some(change) = change else { return Ended::Stopped };
                    let mut changes = vec![change];
                    while changes.len() < CHANNELS_PER_COMMAND {
                        match subs.change_rx.try_recv() {
                            Ok(c) => changes.push(c),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = subs.apply(changes, &mut subscriber).await {
                        return Ended::Lost(e);
                    }
                }
                () = subs.resync.notify.notified() => {
                    if subs.resync.take()
                        && let Err(e) = subs.reconcile(&mut subscriber).await
                    {
                        return Ended::Lost(e);
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = subs.expire(&mut subscriber).await {
                        return Ended::Lost(e);
                    }
                }
            }
        }
    }
}

impl Subscriptions {
    /// The publishing and the subscribing connection (RESP3, its pushes into `msg_tx`).
    async fn connect(
        &self,
        msg_tx: mpsc::Sender<(Vec<u8>, Vec<u8>)>,
        lost: Arc<Notify>,
    ) -> Result<(MultiplexedConnection, MultiplexedConnection), String> {
        let s = &self.settings;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(s.connect_timeout))
            .set_response_timeout(Some(s.command_timeout));
        let client = Client::open(s.address.clone()).map_err(describe)?;
        let publisher = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(describe)?;
        let resp3 = s.address.clone().set_redis_settings(
            s.address
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3),
        );
        let stats = self.stats.clone();
        let pushes = move |push: redis::PushInfo| -> Result<(), std::convert::Infallible> {
            match push.kind {
                PushKind::Message => {
                    let mut data = push.data.into_iter();
                    if let (Some(Value::BulkString(ch)), Some(Value::BulkString(payload))) =
                        (data.next(), data.next())
                        && msg_tx.try_send((ch, payload)).is_err()
                    {
                        add(&stats.dropped_queue_full, 1);
                    }
                }
                PushKind::Disconnection => lost.notify_one(),
                _ => {}
            }
            Ok(())
        };
        let subscriber = Client::open(resp3)
            .map_err(describe)?
            .get_multiplexed_async_connection_with_config(&config.set_push_sender(pushes))
            .await
            .map_err(describe)?;
        Ok((publisher, subscriber))
    }

    /// The channels of `keys`, leaving out those of projects that left.
    fn channels_of(&self, keys: &[Key]) -> Vec<String> {
        let registry = self.registry.load();
        keys.iter()
            .filter_map(|(p, t)| {
                let p = registry.project_at(*p)?;
                Some(channel(&self.settings.prefix, &p.id, t))
            })
            .collect()
    }

    /// Subscribes to every (project, topic) of the table not subscribed yet and lets the
    /// others linger.
    async fn reconcile(&mut self, conn: &mut MultiplexedConnection) -> Result<(), String> {
        let wanted: HashSet<Key> = self
            .interest
            .entries()
            .into_iter()
            .map(|(p, t, _)| (p, t.into_boxed_str()))
            .collect();
        let now = Instant::now();
        for key in &self.subscribed {
            if !wanted.contains(key) {
                self.lingering
                    .entry(key.clone())
                    .or_insert(now + self.settings.unsubscribe_linger);
            }
        }
        let (old, new): (Vec<_>, Vec<_>) = wanted
            .into_iter()
            .partition(|k| self.subscribed.contains(k));
        for (project, topic) in old {
            self.interest.confirm(project, &topic);
        }
        self.subscribe(new, conn).await?;
        self.answer_unwanted();
        Ok(())
    }

    /// Answers the waiters and the reads queued for topics the node no longer has a
    /// subscriber of (the subscribe or welcome that asked was answered, or its connection
    /// left): their channel is not subscribed for them, so kept they would wait forever.
    fn answer_unwanted(&mut self) {
        let interest = &self.interest;
        let gone: Vec<Key> = self
            .waiters
            .keys()
            .chain(self.fetches.keys())
            .filter(|(p, t)| interest.mask(*p, t) == 0)
            .cloned()
            .collect();
        for key in gone {
            self.answer(&key);
        }
        self.count_pending();
    }

    /// [`Subscriptions::answer_unwanted`] for one topic whose interest changed: the node's
    /// interest in a topic ends only with such a change, so the other waiters need no look.
    fn answer_if_unwanted(&mut self, key: &Key) {
        if self.interest.mask(key.0, &key.1) == 0 {
            self.answer(key);
            self.count_pending();
        }
    }

    /// Answers the waiters and the reads queued for `key`.
    fn answer(&mut self, key: &Key) {
        for done in self.waiters.remove(key).unwrap_or_default() {
            done();
        }
        for (_, done) in self.fetches.remove(key).unwrap_or_default() {
            done();
        }
    }

    /// Publishes how many reads of streams wait for their channel's subscription.
    fn count_pending(&self) {
        let n: usize = self.fetches.values().map(Vec::len).sum();
        self.stats.reads_pending.store(n as u64, Ordering::Relaxed);
    }

    /// Acts on changes: subscribes to topics the node now has subscribers of, lets the
    /// channels of topics it has none of linger, registers waiters.
    async fn apply(
        &mut self,
        changes: Vec<Change>,
        conn: &mut MultiplexedConnection,
    ) -> Result<(), String> {
        let mut new = Vec::new();
        let now = Instant::now();
        for change in changes {
            let key = match change {
                Change::Topic(p, t) => (p, t),
                Change::Waiter(p, t, done) => {
                    // Subscribed already, or nobody left to wait for it: done now.
                    if self.subscribed.contains(&(p, t.clone())) || self.interest.mask(p, &t) == 0 {
                        done();
                    } else {
                        self.waiters.entry((p, t)).or_default().push(done);
                    }
                    continue;
                }
                Change::Fetch(p, t, read, done) => {
                    if self.interest.mask(p, &t) == 0 {
                        done();
                    } else if self.subscribed.contains(&(p, t.clone())) {
                        self.start_fetch((p, &t), read, done);
                    } else {
                        self.fetches.entry((p, t)).or_default().push((read, done));
                    }
                    continue;
                }
            };
            if self.interest.mask(key.0, &key.1) != 0 {
                self.lingering.remove(&key);
                if self.subscribed.contains(&key) {
                    // Interest back on a lingering channel: its entry is new, the
                    // subscription is not.
                    self.interest.confirm(key.0, &key.1);
                } else {
                    new.push(key);
                }
            } else {
                // Nobody waits for it any more: what was asked for it is answered.
                self.answer(&key);
                if self.subscribed.contains(&key) {
                    self.lingering
                        .entry(key)
                        .or_insert(now + self.settings.unsubscribe_linger);
                }
            }
        }
        new.sort();
        new.dedup();
        self.count_pending();
        self.subscribe(new, conn).await
    }

    /// `SUBSCRIBE`s `keys` in batches, then calls their waiters.
    async fn subscribe(
        &mut self,
        keys: Vec<Key>,
        conn: &mut MultiplexedConnection,
    ) -> Result<(), String> {
        for batch in keys.chunks(CHANNELS_PER_COMMAND) {
            let channels = self.channels_of(batch);
            if !channels.is_empty() {
                conn.subscribe(&channels).await.map_err(describe)?;
            }
            for key in batch {
                self.subscribed.insert(key.clone());
                self.interest.confirm(key.0, &key.1);
                for done in self.waiters.remove(key).unwrap_or_default() {
                    done();
                }
                for (read, done) in self.fetches.remove(key).unwrap_or_default() {
                    self.start_fetch((key.0, &key.1), read, done);
                }
            }
        }
        self.stats
            .channels
            .store(self.subscribed.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Reads the stream of (project, topic) into the node's copy on a task of its own (the
    /// bridge goes on meanwhile), then calls `done`: also when the read failed (logged), so
    /// the subscribe waiting for it is answered from what the copy holds.
    fn start_fetch(&self, (project, topic): (u32, &str), read: super::HistoryRead, done: Waiter) {
        let id = self
            .registry
            .load()
            .project_at(project)
            .map(|p| p.id.to_string());
        let (Some((mut conn, hub)), Some(id)) = (self.reader.clone(), id) else {
            done();
            return;
        };
        let prefix = &self.settings.prefix;
        let keys = (
            redis_history::stream_key(prefix, &id, topic),
            redis_history::meta_key(prefix, &id, topic),
        );
        let topic: Box<str> = topic.into();
        let timeout = self.settings.command_timeout;
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let got = tokio::time::timeout(
                timeout,
                redis_history::read(&mut conn, (&keys.0, &keys.1), read),
            )
            .await;
            match got {
                Ok(Ok((epoch, top, expired, entries))) => {
                    add(&stats.history_reads_ok, 1);
                    if let Some(hub) = hub.upgrade() {
                        hub.fill_history(project, &topic, (&epoch, top, expired), entries);
                    }
                }
                Ok(Err(e)) => {
                    add(&stats.history_reads_failed, 1);
                    warn!(
                        topic = %topic,
                        error = %describe(e),
                        "history not read from Redis: the subscribe is answered from the \
                         node's copy"
                    );
                }
                Err(_) => {
                    add(&stats.history_reads_failed, 1);
                    warn!(
                        topic = %topic,
                        "history not read from Redis within engine.command_timeout_ms: the \
                         subscribe is answered from the node's copy"
                    );
                }
            }
            done();
        });
    }

    /// `UNSUBSCRIBE`s the lingering channels whose time is up and that still have no local
    /// subscriber.
    async fn expire(&mut self, conn: &mut MultiplexedConnection) -> Result<(), String> {
        let now = Instant::now();
        let due: Vec<Key> = self
            .lingering
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut gone = Vec::new();
        for key in due {
            self.lingering.remove(&key);
            if self.interest.mask(key.0, &key.1) == 0 {
                gone.push(key);
            }
        }
        for batch in gone.chunks(CHANNELS_PER_COMMAND) {
            let channels = self.channels_of(batch);
            if !channels.is_empty() {
                conn.unsubscribe(&channels).await.map_err(describe)?;
            }
            for key in batch {
                self.subscribed.remove(key);
            }
            let registry = self.registry.load();
            let mut forget = self.unsubscribed.lock().unwrap_or_else(|e| e.into_inner());
            for (p, t) in batch {
                if let Some(p) = registry.project_at(*p) {
                    forget.push((Box::<str>::from(&*p.id), t.clone()));
                }
            }
        }
        self.stats
            .channels
            .store(self.subscribed.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// The liveness probe: when nothing came from Redis for `interval`, the node publishes on its
/// own channel, and a probe not heard back within `timeout` means the subscription no longer
/// receives (a failover left it on a demoted server, or the link hangs): reconnect.
struct Probe {
    /// A handle on the publishing connection.
    publisher: MultiplexedConnection,
    /// The node's own channel.
    channel: String,
    /// Quiet time before a probe.
    interval: Duration,
    /// How long a probe may take to come back.
    timeout: Duration,
    /// When the probe in flight was sent.
    sent: Option<Instant>,
}

impl Probe {
    /// How often [`Probe::check`] runs: a quarter of the shorter of the two durations.
    fn period(&self) -> Duration {
        (self.interval.min(self.timeout) / 4).max(Duration::from_millis(10))
    }

    /// Sends a probe when Redis has been quiet for the interval (nothing `heard` since);
    /// fails when the one in flight did not come back in time.
    async fn check(&mut self, heard: Instant) -> Result<(), String> {
        let now = Instant::now();
        if let Some(at) = self.sent {
            if heard >= at {
                self.sent = None;
            } else if now - at >= self.timeout {
                return Err(format!(
                    "liveness probe not received back within {:?}: the subscription no longer \
                     receives",
                    self.timeout
                ));
            } else {
                return Ok(());
            }
        }
        if now - heard < self.interval {
            return Ok(());
        }
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(&self.channel).arg("probe");
        match tokio::time::timeout(
            self.timeout,
            publish.query_async::<i64>(&mut self.publisher),
        )
        .await
        {
            Ok(Ok(_)) => {
                self.sent = Some(now);
                Ok(())
            }
            Ok(Err(e)) if !e.is_timeout() => {
                Err(format!("liveness probe not published: {}", describe(e)))
            }
            Ok(Err(_)) | Err(_) => Err(format!(
                "liveness probe not answered within {:?}",
                self.timeout
            )),
        }
    }
}

/// How often lingering channels are looked at: a tenth of the linger, 10 ms to 1 s.
fn lingering_period(linger: Duration) -> Duration {
    (linger / 10).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// After the engine was away: tells the local subscribers of every topic subscribed again
/// that they may have missed messages of it (a `resync` notice each). The one place that
/// does; topics with history are repaired from their streams instead when they can be
/// (`repair_after_away`, and gaps in `deliver_loop`).
fn tell_resync(hub: &Weak<dyn Deliver + Send + Sync>, topics: &HashSet<Key>, stats: &EngineStats) {
    let Some(node) = hub.upgrade() else {
        return;
    };
    let nr_full: u32 = topics.iter().map(|(p, t)| node.resync(*p, t)).sum();
    if nr_full > 0 {
        add(&stats.dropped_inbox_full, u64::from(nr_full));
        warn!(
            dropped = nr_full,
            "shard inbox full: resync notices after the engine came back were not sent to \
             that shard's subscribers (counted in herald_engine_dropped_total{{reason=\
             \"inbox_full\"}})"
        );
    }
}

/// After the engine was away: delivers what the node missed of `key`'s topic, when it has
/// history the node delivered before, from its stream ([`redis_history::repair`]). `false`
/// when its subscribers are to be told to resync instead (no history, nothing delivered
/// before, the stream lost, unreadable, or no longer holding what was missed).
async fn repair_after_away(
    conn: &mut MultiplexedConnection,
    hub: &Weak<dyn Deliver + Send + Sync>,
    subs: &Subscriptions,
    (project, topic): &Key,
    delivered: &mut redis_history::Delivered,
) -> bool {
    let Some(id) = subs
        .registry
        .load()
        .project_at(*project)
        .map(|p| p.id.to_string())
    else {
        return false;
    };
    let key: redis_history::Key = (id.as_str().into(), topic.clone());
    let Some((epoch, last)) = delivered.last(&key).map(|(e, o)| (e.to_owned(), o)) else {
        return false;
    };
    let prefix = &subs.settings.prefix;
    let timeout = subs.settings.command_timeout;
    let at = tokio::time::timeout(timeout, redis_history::position(conn, prefix, (&id, topic)));
    let Ok(Ok((Some(now_epoch), top))) = at.await else {
        add(&subs.stats.repairs_resync, 1);
        return false;
    };
    let top = top.unwrap_or(0);
    if now_epoch != epoch {
        add(&subs.stats.repairs_resync, 1);
        return false;
    }
    if top <= last {
        return true;
    }
    let Some(node) = hub.upgrade() else {
        return true;
    };
    let how = (&**prefix, timeout);
    let at = (&*epoch, last + 1, top);
    let repaired = redis_history::repair(conn, &*node, how, (&id, topic), at, delivered).await;
    count_repair(&subs.stats, repaired);
    if !repaired {
        // Given up on (its subscribers are told to resync): the stream goes on from its top.
        delivered.note(key, &epoch, top);
    }
    repaired
}

/// Counts a repair of a gap in a topic with history: `repaired`, or given up (resync).
fn count_repair(stats: &EngineStats, repaired: bool) {
    add(
        if repaired {
            &stats.repairs_done
        } else {
            &stats.repairs_resync
        },
        1,
    );
}

/// Sends queued publishes to Redis in pipelines, in queue order, and answers each.
async fn publish_loop(
    rx: &mut mpsc::Receiver<PublishCmd>,
    conn: &mut MultiplexedConnection,
    script: &str,
    timeout: Duration,
    stats: &EngineStats,
) -> Ended {
    let mut batch = Vec::new();
    loop {
        let Some(first) = rx.recv().await else {
            return Ended::Stopped;
        };
        batch.push(first);
        while batch.len() < PUBLISHES_PER_PIPELINE {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let mut pipe = redis::pipe();
        let numbered = batch
            .iter()
            .any(|cmd| cmd.messages.iter().any(|(.., n)| n.is_some()));
        if numbered {
            // The script is loaded again in the same transaction as the calls to it: a
            // Redis that lost it (`SCRIPT FLUSH`, a failover to a server that never had it)
            // has it for them, so no call fails while the others of the batch run.
            pipe.cmd("SCRIPT")
                .arg("LOAD")
                .arg(redis_history::PUBLISH_SCRIPT)
                .ignore();
        }
        let mut nr = 0;
        for cmd in &batch {
            for (ch, payload, numbering) in &cmd.messages {
                match numbering {
                    None => pipe.cmd("PUBLISH").arg(ch).arg(&payload[..]).ignore(),
                    Some(n) => pipe
                        .cmd("EVALSHA")
                        .arg(script)
                        .arg(2)
                        .arg(&n.stream)
                        .arg(&n.meta)
                        .arg(ch)
                        .arg(&payload[..])
                        .arg(n.size)
                        .arg(n.ttl_secs)
                        .arg(redis_history::new_epoch())
                        .arg(n.meta_ttl_secs)
                        .ignore(),
                };
                nr += 1;
            }
        }
        // All or none: a connection lost on the way loses the whole group, not part of a
        // batch (an answer lost after EXEC still leaves the outcome unknown: 503).
        if nr > 1 || numbered {
            pipe.atomic();
        }
        let outcome = if nr == 0 {
            Ok(Ok(()))
        } else {
            tokio::time::timeout(timeout, pipe.query_async::<()>(conn)).await
        };
        let (answer, ended) = match outcome {
            Ok(Ok(())) => {
                add(&stats.published, nr);
                (Ok(()), None)
            }
            Ok(Err(e)) => (
                Err(PublishError::EngineUnavailable(EngineDown::Lost)),
                Some(describe(e)),
            ),
            Err(_) => (
                Err(PublishError::EngineUnavailable(EngineDown::NoAnswer(
                    timeout.as_millis() as u64,
                ))),
                Some(format!("no answer to PUBLISH within {timeout:?}")),
            ),
        };
        for cmd in batch.drain(..) {
            let _ = cmd.ack.send(answer.clone());
        }
        if let Some(reason) = ended {
            return Ended::Lost(reason);
        }
    }
}

/// Hands messages from Redis to the node, which encodes each once for its shards (the body
/// is Redis's payload as it came). A gap in a topic with history is read from its stream on a
/// task of its own: the topic's messages wait behind it meanwhile, the others go on.
async fn deliver_loop(
    rx: &mut mpsc::Receiver<(Vec<u8>, Vec<u8>)>,
    hub: &Weak<dyn Deliver + Send + Sync>,
    control: &ControlPlane,
    (prefix, timeout): (&str, Duration),
    (conn, delivered): (&MultiplexedConnection, &mut redis_history::Delivered),
    heard: &std::cell::Cell<Instant>,
    stats: &EngineStats,
) -> Ended {
    let mut queue_full = Throttled::default();
    let mut queue_full_seen = stats.dropped_queue_full.load(Ordering::Relaxed);
    let mut gaps = Gaps {
        conn: conn.clone(),
        prefix: prefix.into(),
        timeout,
        reads: tokio::task::JoinSet::new(),
        repairing: redis_history::Repairing::default(),
        delivered,
        inbox_full: Throttled::default(),
    };
    loop {
        let (ch, payload) = tokio::select! {
            got = rx.recv() => match got {
                Some(m) => m,
                None => return Ended::Lost("subscription connection closed".into()),
            },
            Some(Ok(read)) = gaps.reads.join_next(), if !gaps.reads.is_empty() => {
                let Some(node) = hub.upgrade() else {
                    return Ended::Stopped;
                };
                gaps.repaired(&*node, hub, read, stats);
                continue;
            }
        };
        heard.set(Instant::now());
        let dropped = stats.dropped_queue_full.load(Ordering::Relaxed);
        if let Some(n) = queue_full.due(dropped - queue_full_seen) {
            warn!(
                dropped = n,
                "queue from Redis to the delivery loop full: messages from the engine were not \
                 delivered on this node (counted in herald_engine_dropped_total{{reason=\
                 \"queue_full\"}}; logged at most once a second)"
            );
        }
        queue_full_seen = dropped;
        if ch.starts_with(prefix.as_bytes()) && ch[prefix.len()..].starts_with(b"~node:") {
            // The node's own probe: heard, nothing to deliver.
            continue;
        }
        if ch.starts_with(prefix.as_bytes()) && ch[prefix.len()..].starts_with(b"~ctl") {
            control.received(&payload);
            continue;
        }
        add(&stats.received, 1);
        let Some(node) = hub.upgrade() else {
            return Ended::Stopped;
        };
        let Some((project, topic)) = std::str::from_utf8(&ch)
            .ok()
            .and_then(|ch| parse_channel(prefix, ch))
        else {
            add(&stats.dropped_unknown, 1);
            continue;
        };
        let payload = Bytes::from(payload);
        match redis_history::split_numbered(&payload) {
            Some(m) => {
                gaps.delivered.forget_unsubscribed();
                gaps.offer(&*node, (project.into(), topic.into()), m, stats);
            }
            None => {
                let d = node.deliver_each(project, topic, payload);
                gaps.count(d, stats);
            }
        }
    }
}

/// The delivery loop's gaps in topics with history: the reads under way, the messages
/// waiting behind them, and the last offset delivered of each topic.
struct Gaps<'a> {
    /// Where gaps are read.
    conn: MultiplexedConnection,
    /// `engine.prefix`.
    prefix: Box<str>,
    /// `engine.command_timeout_ms`.
    timeout: Duration,
    /// The reads under way, each on a task of its own.
    reads: tokio::task::JoinSet<redis_history::GapRead>,
    /// The topics under repair and their messages that came meanwhile.
    repairing: redis_history::Repairing,
    /// The last offset delivered of each topic.
    delivered: &'a mut redis_history::Delivered,
    /// Inbox-full drops, logged at most once a second.
    inbox_full: Throttled,
}

impl Gaps<'_> {
    /// A numbered message of `key`: delivered now, dropped (a repair delivered it), or, past
    /// a gap, kept while the gap is read; behind a gap being read, kept too.
    fn offer(
        &mut self,
        node: &(dyn Deliver + Send + Sync),
        key: redis_history::Key,
        (offset, epoch, body): (u64, Box<str>, Bytes),
        stats: &EngineStats,
    ) {
        if self.repairing.holds(&key) {
            self.repairing.hold(key, (epoch, offset, body));
            return;
        }
        match self.delivered.step(&key, &epoch, offset) {
            redis_history::Step::Skip => {}
            redis_history::Step::Repair(from) => {
                let (mut conn, prefix, timeout) =
                    (self.conn.clone(), self.prefix.clone(), self.timeout);
                let (gap_key, gap_epoch, to) = (key.clone(), epoch.clone(), offset - 1);
                self.reads.spawn(async move {
                    let (project, topic) = (&*gap_key.0, &*gap_key.1);
                    let how = (&*prefix, timeout);
                    let read =
                        redis_history::read_gap(&mut conn, how, (project, topic), (from, to)).await;
                    (gap_key, gap_epoch, to, read)
                });
                self.repairing.hold(key, (epoch, offset, body));
            }
            redis_history::Step::Deliver => {
                self.delivered.note(key.clone(), &epoch, offset);
                let d = node.deliver_numbered(&key.0, &key.1, (offset, &epoch), body);
                self.count(d, stats);
            }
        }
    }

    /// A gap was read: its messages are delivered (or the topic's subscribers told to
    /// resync), then those that waited behind it, in order.
    fn repaired(
        &mut self,
        node: &(dyn Deliver + Send + Sync),
        hub: &Weak<dyn Deliver + Send + Sync>,
        (key, epoch, to, read): redis_history::GapRead,
        stats: &EngineStats,
    ) {
        let topic = (&*key.0, &*key.1);
        let repaired = redis_history::deliver_gap(node, topic, &epoch, read, self.delivered);
        count_repair(stats, repaired);
        if !repaired {
            // Given up on: the topic goes on after the gap.
            self.delivered.note(key.clone(), &epoch, to);
            if let Some(idx) = node.project_index(&key.0) {
                tell_resync(hub, &HashSet::from([(idx, key.1.clone())]), stats);
            }
        }
        for (epoch, offset, body) in self.repairing.take(&key) {
            self.offer(node, key.clone(), (offset, epoch, body), stats);
        }
    }

    /// Counts what became of a delivery.
    fn count(&mut self, d: super::Delivered, stats: &EngineStats) {
        if d.unknown_project {
            add(&stats.dropped_unknown, 1);
        }
        if d.malformed {
            add(&stats.dropped_malformed, 1);
        }
        if d.refused {
            add(&stats.dropped_draining, 1);
        }
        add(&stats.dropped_inbox_full, u64::from(d.nr_full));
        if let Some(n) = self.inbox_full.due(u64::from(d.nr_full)) {
            warn!(
                dropped = n,
                "shard inbox full: a message from the engine was not delivered to that \
                 shard's subscribers (counted in herald_engine_dropped_total{{reason=\
                 \"inbox_full\"}}; logged at most once a second)"
            );
        }
    }
}

/// Loads the publish script of topics with history ([`redis_history::PUBLISH_SCRIPT`]) and
/// answers its SHA1, for `EVALSHA`.
async fn load_script(conn: &mut MultiplexedConnection) -> Result<String, String> {
    redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(redis_history::PUBLISH_SCRIPT)
        .query_async(conn)
        .await
        .map_err(|e| format!("SCRIPT LOAD refused: {}", describe(e)))
}

/// Drops logged at most once a second, each line with the drops since the last one.
#[derive(Debug, Default)]
struct Throttled {
    /// When the last line was logged.
    at: Option<Instant>,
    /// Drops since then.
    unlogged: u64,
}

impl Throttled {
    /// Counts `n` drops; `Some(count)` when a line is due, with the count to log.
    fn due(&mut self, n: u64) -> Option<u64> {
        self.unlogged += n;
        if self.unlogged == 0
            || self
                .at
                .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        self.at = Some(Instant::now());
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// A Redis error for the log: its category and detail, never the address (it may hold a
/// password).
fn describe(e: redis::RedisError) -> String {
    match (e.detail(), std::error::Error::source(&e)) {
        (Some(d), _) => format!("{}: {d}", e.category()),
        // An I/O error's own words: a refused connection, a TLS certificate not trusted.
        (None, Some(source)) => format!("{}: {source}", e.category()),
        (None, None) => e.category().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_logged_at_most_once_a_second_with_their_count() {
        let mut t = Throttled::default();
        assert_eq!(t.due(0), None, "nothing dropped, nothing to say");
        assert_eq!(t.due(2), Some(2));
        assert_eq!(t.due(3), None, "within the second: counted");
        assert_eq!(t.due(1), None);
        t.at = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(
            t.due(0),
            Some(4),
            "the next line carries what was held back"
        );
        assert_eq!(t.due(0), None);
    }

    #[test]
    fn channels_name_the_project_and_the_topic() {
        let c = channel("herald:", "shop", "user.a:b");
        assert_eq!(c, "herald:shop:user.a:b");
        assert_eq!(parse_channel("herald:", &c), Some(("shop", "user.a:b")));
        assert_eq!(parse_channel("other:", &c), None);
        assert_eq!(parse_channel("herald:", "herald:nocolon"), None);
    }
}
