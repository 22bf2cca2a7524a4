//! herald: a WebSocket push center for bare-metal Linux.
//!
//! # Layout
//!
//! - [`config`]: the one configuration struct; load → parse → validate.
//! - [`server`]: starts the shards and the API; the [`server::ServerHandle`].
//! - [`hub`]: the node-wide handle every thread shares: mailboxes, registry, counters, phase,
//!   and publishing (encode once, one message per interested shard).
//! - [`broker`]: the broker seam: publish, first/last topic interest per shard, deliveries
//!   back into the node; the local broker and the node's interest table (topic → shards).
//! - [`shard`]: one pinned thread + monoio runtime per core owning its connections;
//!   [`shard::mailbox`] is the only cross-core API, [`shard::fanout`] the one way
//!   off-shard code sends orders and questions through it, and [`shard::io`] the I/O driver
//!   of the shard's connections.
//! - [`net`]: the per-shard SO_REUSEPORT listeners.
//! - [`ws`]: the WebSocket side: handshake, session (frames, sans-IO), ops (client protocol),
//!   frame encoding, close codes, and the connection's state; it never imports [`shard`].
//! - [`auth`]: projects, keys, token verification.
//! - [`pubsub`]: parsed names (project, topic, connection id) and the per-shard topic index.
//! - [`route`]: which shards a publication goes to: the union of its topics' interest masks.
//! - [`api`]: the HTTP API on hyper.
//! - [`admin`]: project and key management (API and SIGHUP): build, persist, swap.
//! - [`metrics`]: per-shard counters.
//! - [`redact`]: error messages with the quoted values (possible secrets) left out.
//! - [`store`]: the persisted API state (projects and keys), replaced atomically.
//! - [`notify`]: systemd readiness, reload, stop and watchdog notifications.
//! - [`hostcheck`]: the connection ceiling the host allows (open files, sysctls).

pub mod access;
pub mod admin;
pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod hostcheck;
pub mod hub;
pub mod limiter;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod pubsub;
pub mod redact;
pub mod route;
pub mod server;
pub mod shard;
pub mod store;
pub mod ws;
