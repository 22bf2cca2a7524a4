//! Per-shard counters, written only by the owning shard (relaxed atomics on the shard's own
//! cache lines, so no cross-core contention) and summed by readers on the control plane.
//! Nothing here knows about Prometheus or the hub: the exposition that reads these counters on
//! scrape is [`crate::exposition`].

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::ws::close::CLOSE_CODES;
use crate::ws::handshake::HandshakeOutcome;

/// Upper bounds (seconds) of the publish-to-enqueue latency histogram buckets: from a few
/// microseconds (an idle shard) to a second (a shard far behind its inbox).
pub const ENQUEUE_BUCKETS: [f64; 14] = [
    0.000_01, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0,
];

/// A latency histogram owned by one shard: one atomic per bucket (non-cumulative; the last
/// counts what is above every bound), written by the owner only, read on scrape.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket, indexed like [`ENQUEUE_BUCKETS`], plus one for +Inf.
    buckets: [AtomicU64; ENQUEUE_BUCKETS.len() + 1],
    /// Sum of the observations, nanoseconds.
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// Records one observation (owner thread only; relaxed).
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = ENQUEUE_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(ENQUEUE_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// (sum in seconds, count, per-bucket `(upper bound, count)` with +Inf last) as of now.
    /// The counts are per bucket, not cumulative: the encoder accumulates them.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = ENQUEUE_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(read))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        (read(&self.sum_ns) as f64 / 1e9, count, buckets)
    }
}

/// Counters of one shard.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardStats {
    /// Open (authenticated) connections now.
    pub connections: AtomicI64,
    /// Handshakes by outcome, indexed by [`HandshakeOutcome::index`].
    pub handshakes: [AtomicU64; HandshakeOutcome::ALL.len()],
    /// Client publishes (the `publish` op) made on this shard.
    pub published: AtomicU64,
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
    /// Sends submitted through the shard's write ring (`server.write_batch = "io_uring"`).
    pub ring_sends: AtomicU64,
    /// Of `ring_sends`, those that left bytes queued (a partial write, a full socket buffer,
    /// an interruption or an error): the connection then carries on as on the `sendmsg`
    /// path (or is closed).
    pub ring_sends_unfinished: AtomicU64,
    /// Writes of a dense fan-out the shard held for `server.write_coalesce_ms`.
    pub coalesce_waits: AtomicU64,
    /// Time from `Hub::publish` to the last subscriber's queue, per publication.
    pub publish_enqueue: LatencyHistogram,
    /// Sweep ticks run (owner thread only): the liveness signal the systemd watchdog reads.
    pub sweeps: AtomicU64,
    /// Handshakes in progress, as of the last sweep tick.
    pub pending_handshakes: AtomicU64,
    /// Entries in the token-expiry heap (live and stale), as of the last sweep tick.
    pub expiry_entries: AtomicU64,
    /// Times the sweep asked the allocator to return the memory the shard's arrays freed as
    /// they changed size (`crate::shard`'s `trim`).
    pub allocator_collects: AtomicU64,
    /// Time those requests took, microseconds.
    pub allocator_collect_us: AtomicU64,
    /// Connection entries the listing (`GET /api/v1/connections`) has looked at: what a
    /// page costs the shard, for tests and debugging.
    pub list_visited: AtomicU64,
    /// Bytes waiting in this shard's connection queues, stored by the shard after each batch
    /// (read by [`crate::flow`]).
    pub queued_out_bytes: AtomicU64,
    /// Time from accepting the last publication this shard took to queueing it on its
    /// connections, microseconds (read by [`crate::flow`]).
    pub delivery_lag_us: AtomicU64,
}

impl ShardStats {
    /// Adds `n` to a counter (owner thread only; relaxed).
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one handshake that ended with `outcome` (owner thread only; relaxed).
    #[inline]
    pub fn handshake(&self, outcome: HandshakeOutcome) {
        Self::add(&self.handshakes[outcome.index()], 1);
    }
}

/// Reads a counter.
pub fn read(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_per_bound_and_sum() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(5)); // first bucket
        h.observe(Duration::from_micros(10)); // on the bound: first bucket
        h.observe(Duration::from_millis(3)); // 5 ms bucket
        h.observe(Duration::from_secs(2)); // +Inf
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 4);
        assert_eq!(buckets.len(), ENQUEUE_BUCKETS.len() + 1);
        assert_eq!(buckets[0], (0.000_01, 2));
        assert_eq!(buckets[7], (0.005, 1));
        assert_eq!(*buckets.last().unwrap(), (f64::INFINITY, 1));
        assert!((sum - 2.003_015).abs() < 1e-9, "{sum}");
    }
}
