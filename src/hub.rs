//! The node-wide handle shared by every thread: the shards' mailboxes, the registry, the
//! counters, the lifecycle phase, and publishing (encode once, one message per shard).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::auth::SharedRegistry;
use crate::metrics::ShardStats;
use crate::pubsub::Topic;
use crate::route;
use crate::shard::mailbox::{Mailbox, Publication, ShardMsg};
use crate::ws::frame;

/// Lifecycle of the node, observable by `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Shards starting.
    Starting = 0,
    /// Every shard listens.
    Running = 1,
    /// Closing connections; not accepting.
    Draining = 2,
    /// Done.
    Stopped = 3,
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    /// A shard's inbox is full (back-pressure): retry later. Shards before it got the message.
    #[error("shard {0} inbox is full; retry later")]
    Busy(usize),
    /// The node is draining.
    #[error("server is draining")]
    Draining,
}

/// Shared by the shards, the API and the signal handler.
pub struct Hub {
    /// One mailbox per shard, by shard id.
    pub mailboxes: Vec<Mailbox>,
    /// Counters per shard.
    pub stats: Vec<Arc<ShardStats>>,
    /// Projects and keys.
    pub registry: SharedRegistry,
    /// Authenticated connections on the node (checked against `server.max_connections`).
    pub nr_connections: AtomicUsize,
    /// Cap from the config; 0 = none.
    pub max_connections: usize,
    /// The 90%-of-cap warning was logged (re-armed below 80%).
    pub near_cap_warned: std::sync::atomic::AtomicBool,
    /// Concurrent connections per client address (`limits.connections_per_ip`).
    pub ip_conns: crate::limiter::ConnCounter,
    /// Publishes accepted through the API (written by the API thread only).
    pub api_published: AtomicU64,
    /// API requests refused 429 for their key's rate (`limits.api_requests_per_key_per_sec`).
    pub api_rate_limited: AtomicU64,
    /// Open API connections (bounded by `api.max_connections`; written by the API thread).
    pub api_connections: AtomicU64,
    phase: AtomicU8,
    /// Publish sequence, for message ids.
    seq: AtomicU64,
    /// Start time in ms, prefix of message ids so they stay unique across restarts.
    boot_ms: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Hub {
    /// A hub over the given mailboxes.
    pub fn new(
        mailboxes: Vec<Mailbox>,
        stats: Vec<Arc<ShardStats>>,
        registry: SharedRegistry,
        max_connections: usize,
    ) -> Self {
        Self {
            mailboxes,
            stats,
            registry,
            nr_connections: AtomicUsize::new(0),
            max_connections,
            near_cap_warned: std::sync::atomic::AtomicBool::new(false),
            ip_conns: crate::limiter::ConnCounter::new(0, 0),
            api_published: AtomicU64::new(0),
            api_rate_limited: AtomicU64::new(0),
            api_connections: AtomicU64::new(0),
            phase: AtomicU8::new(Phase::Starting as u8),
            seq: AtomicU64::new(0),
            boot_ms: now_ms(),
        }
    }

    /// Number of shards.
    pub fn nr_shards(&self) -> usize {
        self.mailboxes.len()
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Running,
            2 => Phase::Draining,
            _ => Phase::Stopped,
        }
    }

    /// Moves to `p`.
    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    /// A fresh message id.
    pub fn next_message_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n:x}", self.boot_ms)
    }

    /// Encodes a publication once and sends it to every shard that may have subscribers.
    ///
    /// # Errors
    /// [`PublishError`].
    pub fn publish(
        &self,
        project: u32,
        topics: &[Topic],
        data: &RawValue,
    ) -> Result<String, PublishError> {
        if self.phase() == Phase::Draining {
            return Err(PublishError::Draining);
        }
        let accepted_at = std::time::Instant::now();
        let id = self.next_message_id();
        let ts = now_ms();
        let frames = topics
            .iter()
            .map(|t| {
                (
                    t.as_str().into(),
                    message_frame(t.as_str(), data.get(), &id, ts),
                )
            })
            .collect();
        let publication = Arc::new(Publication {
            project,
            frames,
            accepted_at,
        });
        for shard in route::shards_for_publication(self.nr_shards()) {
            self.mailboxes[shard]
                .send(ShardMsg::Publish(publication.clone()))
                .map_err(|_| PublishError::Busy(shard))?;
        }
        Ok(id)
    }

    /// Asks every shard to drain.
    pub fn drain(&self) {
        self.set_phase(Phase::Draining);
        for m in &self.mailboxes {
            // A full inbox still drains: the shard sees the phase on its next tick.
            let _ = m.send(ShardMsg::Drain);
        }
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("nr_shards", &self.nr_shards())
            .finish_non_exhaustive()
    }
}

/// The delivery frame of protocol.md; `data` is copied byte for byte.
pub fn message_frame(topic: &str, data: &str, id: &str, ts: u64) -> Bytes {
    let mut json = String::with_capacity(64 + topic.len() + data.len() + id.len());
    json.push_str("{\"type\":\"message\",\"topic\":\"");
    json.push_str(topic); // topic characters never need escaping
    json.push_str("\",\"data\":");
    json.push_str(data);
    json.push_str(",\"id\":\"");
    json.push_str(id);
    json.push_str("\",\"ts\":");
    json.push_str(&ts.to_string());
    json.push('}');
    frame::text(json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_frame_passes_data_through() {
        let f = message_frame("news", r#"{"b": 1,  "a":[1.50]}"#, "x-1", 7);
        let text = std::str::from_utf8(&f[2..]).unwrap();
        assert_eq!(
            text,
            r#"{"type":"message","topic":"news","data":{"b": 1,  "a":[1.50]},"id":"x-1","ts":7}"#
        );
    }
}
