//! Per-shard counters, written only by the owning shard (relaxed atomics on the shard's own
//! cache lines, so no cross-core contention) and summed by readers on the control plane.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::ws::close::CLOSE_CODES;

/// Handshake outcomes counted separately.
pub const HANDSHAKE_OUTCOMES: [&str; 7] = [
    "accepted",
    "bad_request",
    "unauthorized",
    "forbidden",
    "unknown_project",
    "at_capacity",
    "timeout",
];

/// Counters of one shard.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardStats {
    /// Open (authenticated) connections now.
    pub connections: AtomicI64,
    /// Handshakes by outcome, indexed like [`HANDSHAKE_OUTCOMES`].
    pub handshakes: [AtomicU64; 7],
    /// Publications taken from the inbox.
    pub publications: AtomicU64,
    /// Messages queued to a connection.
    pub delivered: AtomicU64,
    /// Messages not queued because the connection was closing or over its cap.
    pub dropped: AtomicU64,
    /// Connections closed for a full outbound queue.
    pub slow_consumer_closes: AtomicU64,
    /// Close frames sent, indexed like [`CLOSE_CODES`].
    pub closes: [AtomicU64; CLOSE_CODES.len()],
    /// Bytes read from clients.
    pub bytes_in: AtomicU64,
    /// Bytes written to clients.
    pub bytes_out: AtomicU64,
}

impl ShardStats {
    /// Adds `n` to a counter (owner thread only; relaxed).
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Index of a handshake outcome name.
    pub fn outcome(name: &str) -> usize {
        HANDSHAKE_OUTCOMES
            .iter()
            .position(|o| *o == name)
            .unwrap_or(0)
    }
}

/// Reads a counter.
pub fn read(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}
