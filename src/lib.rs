//! herald: a WebSocket push center for bare-metal Linux.
//!
//! # Layout
//!
//! - [`config`]: the one configuration struct; load → parse → validate.
//! - [`settings`]: what the node applies, derived once from the validated config (the shards'
//!   limits, the API's settings, the trusted proxies, listeners, node-wide bounds).
//! - [`server`]: wires a node from its settings: listeners, shards, the API; the
//!   [`server::ServerHandle`].
//! - [`lifecycle`]: a served node's life: process setup, settings, wiring, signals (drain,
//!   SIGHUP reload), readiness and systemd notifications, the outcome.
//! - [`commands`]: the binary's one-shot subcommands (token, genconfig, check-config,
//!   check-host).
//! - [`hub`]: the node-wide handle every thread shares: mailboxes, registry, counters, phase,
//!   and publishing (encode once, one message per interested shard).
//! - [`history`]: the recent publications of topics with history (offsets, epochs, bounded
//!   by size, age and a node-wide byte cap), held by the hub for recovery.
//! - [`broker`]: the broker seam: publish, first/last topic interest per shard, deliveries
//!   back into the node; the local broker and the node's interest table (topic → shards);
//!   [`broker::redis`], the Redis engine a cluster's nodes share publishes through, and its
//!   bridge thread; [`broker::redis_history`], topics with history numbered and kept in
//!   Redis; [`broker::control`], requests between a cluster's nodes over it.
//! - [`shard`]: one pinned thread + monoio runtime per core owning its connections;
//!   [`shard::mailbox`] is the only cross-core API, [`shard::fanout`] the one way
//!   off-shard code sends orders and questions through it, and [`shard::io`] the I/O driver
//!   of the shard's connections.
//! - [`net`]: the per-shard SO_REUSEPORT listeners.
//! - [`ws`]: the WebSocket side: handshake, session (frames, sans-IO), the connection machine
//!   (sans-IO: bytes and time in, actions out), the client-protocol codecs (herald.v1's ops, STOMP),
//!   SockJS framing around them, frame encoding, close codes, and the connection's state; it never imports [`shard`].
//! - [`auth`]: projects, keys, token verification.
//! - [`pubsub`]: parsed names (project, topic, connection id) and the per-shard topic index.
//! - [`route`]: which shards a publication goes to: the union of its topics' interest masks.
//! - [`api`]: the HTTP API on hyper.
//! - [`admin`]: project and key management (API and SIGHUP): build, persist, swap.
//! - [`metrics`]: per-shard counters (written by the owning shard, summed by readers).
//! - [`flow`]: node-wide flow control: the budget for queued outbound bytes and the lag
//!   target that publishes are admitted against.
//! - [`exposition`]: the Prometheus exposition of those counters (`GET /metrics`), read on
//!   scrape.
//! - [`redact`]: error messages with the quoted values (possible secrets) left out.
//! - [`store`]: the persisted API state (projects and keys), replaced atomically.
//! - [`protection`]: IP deny lists ([`protection::access`]), per-address handshake and
//!   connection limits ([`protection::limiter`]), the API's per-key request buckets
//!   ([`protection::ratelimit`]), the PROXY header and trusted proxies
//!   ([`protection::proxy`]).
//! - [`system`]: the node and its host: process setup before serving
//!   ([`system::process`]: huge pages, the open-files limit, the host check's log line, the
//!   development-mode warning), the connection ceiling the host allows
//!   ([`system::hostcheck`]), systemd notifications ([`system::notify`]).

pub mod admin;
pub mod api;
pub mod auth;
pub mod broker;
pub mod commands;
pub mod config;
pub mod exposition;
pub mod flow;
pub mod history;
pub mod hub;
pub mod lifecycle;
pub mod metrics;
pub mod net;
pub mod protection;
pub mod pubsub;
pub mod redact;
pub mod route;
pub mod server;
pub mod settings;
pub mod shard;
pub mod store;
pub mod system;
pub mod ws;
