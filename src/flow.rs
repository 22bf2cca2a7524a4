//! Node-wide flow control: a budget for the outbound data the node holds and a target for how
//! far its shards may fall behind their publications. Publishes are admitted while the node is
//! within both and refused ([`Overload`]) while it is not, so a fast publisher gets pushed back
//! (503 `overloaded` with `Retry-After` on the API, error `limit` for a client's `publish`)
//! instead of the node queueing without end.
//!
//! What is counted: every connection's outbound queue (the bytes still to be written, each
//! delivery counted whole although its frame is shared) plus the publications waiting in the
//! shards' inboxes. Each shard keeps its own queue total in a plain integer and stores it in
//! its [`ShardStats::queued_out_bytes`] once per batch (a relaxed store on its own cache line,
//! only when it changed), and the publication lag in [`ShardStats::delivery_lag_us`] once per
//! publication; [`Flow::admit`] reads them on the publishing thread. Nothing here takes a lock
//! or writes a shared cache line per delivery.
//!
//! Admission is checked before a publish is sent: a publish (or batch) admitted just under the
//! budget is delivered whole, so the node passes the budget by at most what the publishes
//! admitted last add. Publications arriving from the engine were accepted by another node and
//! cannot be refused: they are delivered, and counted when they arrive over budget.
//!
//! This module must not know about the hub, HTTP or Prometheus: it reads counters and answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::metrics::{ShardStats, read};
use crate::shard::mailbox::Mailbox;

/// Share of the node's memory (the lower of `MemTotal` and the cgroup limit) that the default
/// budget takes: an eighth. Queued deliveries share their frames, so the memory they hold is
/// far below the bytes counted (about 80 B per queued delivery plus each frame once); the
/// rest is left to the idle footprint of the connections (about 1 KiB each) and the heap.
pub const DEFAULT_BUDGET_DIVISOR: u64 = 8;

/// The budget when the node's memory cannot be read: 1 GiB.
pub const FALLBACK_BUDGET_BYTES: u64 = 1 << 30;

/// Seconds a refused publisher is told to wait (`Retry-After`): a shard writes its queues
/// down within this time unless its consumers stopped reading, and those are closed at their
/// own cap (4008).
pub const RETRY_AFTER_SECS: u32 = 1;

/// How often a refusal is logged at most.
const LOG_EVERY_MS: u64 = 1000;

/// `[flow]`: the node-wide budget for queued outbound data and the lag target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FlowConfig {
    /// Most bytes of outbound data queued on the node (every connection's outbound queue plus
    /// the shards' inboxes) before publishes are refused 503 `overloaded`. 0 = an eighth of
    /// the node's memory (the lower of `MemTotal` and the cgroup limit). Default 0.
    pub max_queued_bytes: u64,
    /// Longest a shard may lag behind its publications (from acceptance to queueing on the
    /// shard's connections) while more wait in its inbox, milliseconds, before publishes are
    /// refused 503 `overloaded`. 0 = no target. Default 500.
    pub max_delivery_lag_ms: u64,
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            max_queued_bytes: 0,
            max_delivery_lag_ms: 500,
        }
    }
}

impl FlowConfig {
    /// The budget in force: the configured one, or the share of memory.
    pub fn budget_bytes(&self) -> u64 {
        if self.max_queued_bytes > 0 {
            return self.max_queued_bytes;
        }
        node_memory_bytes().map_or(FALLBACK_BUDGET_BYTES, |m| m / DEFAULT_BUDGET_DIVISOR)
    }
}

/// The memory the node may use: `MemTotal`, lowered to the cgroup's limit (v2 `memory.max`,
/// or v1 `memory.limit_in_bytes`) when there is one.
pub fn node_memory_bytes() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| mem_total(&m));
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .and_then(|s| s.trim().parse::<u64>().ok());
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Why a publish was refused: the node is over its budget or behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overload {
    /// The outbound data queued on the node is at or over `flow.max_queued_bytes`.
    #[error(
        "{queued} bytes of outbound data are queued on the node, at or over \
         flow.max_queued_bytes ({max}); nothing was sent, retry later"
    )]
    QueuedBytes {
        /// Bytes queued on the node.
        queued: u64,
        /// The budget.
        max: u64,
    },
    /// A shard with publications waiting lags behind them by more than
    /// `flow.max_delivery_lag_ms`.
    #[error(
        "shard {shard} is {lag_ms} ms behind its publications, over \
         flow.max_delivery_lag_ms ({max_ms}); nothing was sent, retry later"
    )]
    Lagging {
        /// The shard.
        shard: usize,
        /// Its lag, milliseconds.
        lag_ms: u64,
        /// The target.
        max_ms: u64,
    },
}

impl Overload {
    /// Every reason, in the order of [`Overload::index`].
    pub const REASONS: [&'static str; 2] = ["queued_bytes", "delivery_lag"];

    /// Index into [`Overload::REASONS`] and the refusal counters.
    pub fn index(&self) -> usize {
        match self {
            Self::QueuedBytes { .. } => 0,
            Self::Lagging { .. } => 1,
        }
    }

    /// Seconds the publisher should wait before retrying.
    pub fn retry_after_secs(&self) -> u32 {
        RETRY_AFTER_SECS
    }
}

/// The node's admission state: limits and what was refused.
#[derive(Debug)]
pub struct Flow {
    /// The budget, bytes.
    pub max_queued_bytes: u64,
    /// The lag target, microseconds; 0 = none.
    max_lag_us: u64,
    /// Publications refused, by [`Overload::index`].
    rejected: [AtomicU64; Overload::REASONS.len()],
    /// Publications from the engine delivered while the node was over its budget or behind.
    engine_over: AtomicU64,
    /// When a refusal was last logged, and how many since without a line.
    log: LogThrottle,
}

/// One log line a second at most, from any thread: when the last was written (ms since the
/// epoch) and how many events went unlogged since.
#[derive(Debug, Default)]
pub struct LogThrottle {
    logged_ms: AtomicU64,
    unlogged: AtomicU64,
}

impl LogThrottle {
    /// Notes an event at `now_ms`: `Some(events since the last line, unlogged)` when this one
    /// is to be logged.
    pub fn note(&self, now_ms: u64) -> Option<u64> {
        let suppressed = self.unlogged.fetch_add(1, Ordering::Relaxed);
        let last = self.logged_ms.load(Ordering::Relaxed);
        let due = now_ms.saturating_sub(last) >= LOG_EVERY_MS
            && self
                .logged_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        due.then(|| {
            self.unlogged.store(0, Ordering::Relaxed);
            suppressed
        })
    }
}

impl Default for Flow {
    /// No budget and no target: everything is admitted.
    fn default() -> Self {
        Self::new(u64::MAX, Duration::ZERO)
    }
}

impl Flow {
    /// A budget of `max_queued_bytes` and a lag target of `max_lag` (zero = none).
    pub fn new(max_queued_bytes: u64, max_lag: Duration) -> Self {
        Self {
            max_queued_bytes,
            max_lag_us: u64::try_from(max_lag.as_micros()).unwrap_or(u64::MAX),
            rejected: Default::default(),
            engine_over: AtomicU64::new(0),
            log: LogThrottle::default(),
        }
    }

    /// From `[flow]`.
    pub fn from_config(c: &FlowConfig) -> Self {
        Self::new(
            c.budget_bytes(),
            Duration::from_millis(c.max_delivery_lag_ms),
        )
    }

    /// Bytes of outbound data queued on the node: the shards' connection queues as of their
    /// last batch, and their inboxes.
    pub fn queued_bytes(stats: &[Arc<ShardStats>], mailboxes: &[Mailbox]) -> u64 {
        let queues: u64 = stats.iter().map(|s| read(&s.queued_out_bytes)).sum();
        let inboxes: u64 = mailboxes.iter().map(|m| m.depth_bytes() as u64).sum();
        queues + inboxes
    }

    /// Whether the node is within its budget and target.
    ///
    /// # Errors
    /// [`Overload`]: over the budget, or a shard with publications waiting lags too far.
    pub fn check(&self, stats: &[Arc<ShardStats>], mailboxes: &[Mailbox]) -> Result<(), Overload> {
        let queued = Self::queued_bytes(stats, mailboxes);
        if queued >= self.max_queued_bytes {
            return Err(Overload::QueuedBytes {
                queued,
                max: self.max_queued_bytes,
            });
        }
        if self.max_lag_us == 0 {
            return Ok(());
        }
        for (shard, (s, m)) in stats.iter().zip(mailboxes).enumerate() {
            let lag_us = read(&s.delivery_lag_us);
            if lag_us > self.max_lag_us && m.depth() > 0 {
                return Err(Overload::Lagging {
                    shard,
                    lag_ms: lag_us / 1000,
                    max_ms: self.max_lag_us / 1000,
                });
            }
        }
        Ok(())
    }

    /// [`Flow::check`] for `nr_publications` about to be sent; a refusal is counted for each
    /// and logged (at most once a second).
    ///
    /// # Errors
    /// [`Overload`]; the caller sends nothing.
    pub fn admit(
        &self,
        stats: &[Arc<ShardStats>],
        mailboxes: &[Mailbox],
        nr_publications: usize,
    ) -> Result<(), Overload> {
        let Err(e) = self.check(stats, mailboxes) else {
            return Ok(());
        };
        self.rejected[e.index()].fetch_add(nr_publications as u64, Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if let Some(suppressed) = self.log.note(now) {
            tracing::warn!(
                reason = Overload::REASONS[e.index()],
                suppressed,
                "publish refused with 503 overloaded, nothing sent: {e} (logged at most once a \
                 second; `suppressed` refusals since the previous line)"
            );
        }
        Err(e)
    }

    /// Notes a publication from the engine, which is delivered whatever the node's state:
    /// counted when the node is over its budget or behind.
    pub fn note_engine(&self, stats: &[Arc<ShardStats>], mailboxes: &[Mailbox]) {
        if self.check(stats, mailboxes).is_err() {
            self.engine_over.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Publications refused, by reason ([`Overload::REASONS`]).
    pub fn rejected(&self) -> [u64; Overload::REASONS.len()] {
        std::array::from_fn(|i| read(&self.rejected[i]))
    }

    /// Publications from the engine delivered while over the budget or behind.
    pub fn engine_over(&self) -> u64 {
        read(&self.engine_over)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::mailbox;

    #[test]
    fn mem_total_is_read_in_bytes() {
        let m = "MemTotal:       16318480 kB\nMemFree:          512 kB\n";
        assert_eq!(mem_total(m), Some(16_318_480 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn the_default_budget_is_a_share_of_memory() {
        let c = FlowConfig::default();
        let expected = node_memory_bytes().map_or(FALLBACK_BUDGET_BYTES, |m| m / 8);
        assert_eq!(c.budget_bytes(), expected);
        let set = FlowConfig {
            max_queued_bytes: 4096,
            ..FlowConfig::default()
        };
        assert_eq!(set.budget_bytes(), 4096);
    }

    /// Queues and inboxes count against the budget; a lag counts only while publications
    /// wait; refusals are counted per publication, by reason.
    #[test]
    fn admission_follows_the_queues_the_inboxes_and_the_lag() {
        let stats: Vec<Arc<ShardStats>> = (0..2).map(|_| Arc::default()).collect();
        let (mailboxes, _inboxes): (Vec<_>, Vec<_>) = (0..2)
            .map(|_| mailbox::channel(16, 1 << 20).unwrap())
            .unzip();
        let flow = Flow::new(1000, Duration::from_millis(100));
        assert_eq!(flow.admit(&stats, &mailboxes, 1), Ok(()));

        stats[0].queued_out_bytes.store(600, Ordering::Relaxed);
        stats[1].queued_out_bytes.store(300, Ordering::Relaxed);
        assert_eq!(flow.admit(&stats, &mailboxes, 1), Ok(()));
        let held = mailboxes[1].try_reserve(1, 100).unwrap();
        assert_eq!(
            flow.admit(&stats, &mailboxes, 3),
            Err(Overload::QueuedBytes {
                queued: 1000,
                max: 1000
            })
        );
        drop(held);
        assert_eq!(flow.admit(&stats, &mailboxes, 1), Ok(()));

        stats[1].delivery_lag_us.store(250_000, Ordering::Relaxed);
        assert_eq!(
            flow.admit(&stats, &mailboxes, 1),
            Ok(()),
            "no publication waits"
        );
        let held = mailboxes[1].try_reserve(1, 0).unwrap();
        assert_eq!(
            flow.admit(&stats, &mailboxes, 2),
            Err(Overload::Lagging {
                shard: 1,
                lag_ms: 250,
                max_ms: 100
            })
        );
        drop(held);
        assert_eq!(flow.rejected(), [3, 2]);

        let unbounded = Flow::default();
        stats[0]
            .queued_out_bytes
            .store(u64::MAX / 4, Ordering::Relaxed);
        assert_eq!(unbounded.admit(&stats, &mailboxes, 1), Ok(()));
    }
}
