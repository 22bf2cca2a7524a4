//! Coalescing dense fan-outs: when a shard is about to write a publication to many connections
//! soon after its previous such write, it holds the write a moment first, so that
//! publications arriving meanwhile go out in the same send to each connection.
//!
//! A fan-out costs one send per connection whatever the send carries (on loopback ~1.5 µs of
//! kernel time each, and as much again for the reader), so a shard that writes every
//! publication on its own saturates the machine long before one that writes two or three per
//! send. The wait is bounded (`server.write_coalesce_ms`), one timer per shard, and taken only
//! when the previous wide write ended less than two waits ago (the next publication is then
//! likely to arrive within the wait; publishers rarely keep a steady pace): sparse fan-outs,
//! and batches whose publications each reach few connections (unicast, small groups,
//! replies), go out at once. What a hold defers is the write: a publisher that starts waiting
//! for the shard's inbox wakes it (the inbox is taken, the publisher answered) and the hold
//! goes on.
//!
//! It must not: hold a batch whose widest publication reaches fewer than [`MIN_CONNS`]
//! connections, hold a batch twice, or read the clock for a narrow batch.

use std::time::{Duration, Instant};

/// Fewest connections one publication of a batch must reach for the batch to be held.
const MIN_CONNS: usize = 64;

/// One shard's coalescing state.
#[derive(Debug)]
pub(crate) struct Coalesce {
    /// The wait (`server.write_coalesce_ms`); zero: never wait.
    wait: Duration,
    /// Connections the widest publication queued since the last write reached.
    widest: usize,
    /// When the last write of a batch with a wide publication ended.
    last_wide: Option<Instant>,
}

impl Coalesce {
    pub(crate) fn new(wait: Duration) -> Self {
        Self {
            wait,
            widest: 0,
            last_wide: None,
        }
    }

    /// Notes a publication queued to `conns` connections.
    pub(crate) fn fanned_out(&mut self, conns: usize) {
        self.widest = self.widest.max(conns);
    }

    /// How long to wait before writing what is queued: `None` to write at once (no wide
    /// publication queued, no wait configured, or no wide write in the last two waits).
    pub(crate) fn hold(&self) -> Option<Duration> {
        if self.widest < MIN_CONNS || self.wait.is_zero() {
            return None;
        }
        let since = Instant::now().saturating_duration_since(self.last_wide?);
        (since < 2 * self.wait).then_some(self.wait)
    }

    /// Notes that everything queued was written.
    pub(crate) fn wrote(&mut self) {
        if self.widest >= MIN_CONNS {
            self.last_wide = Some(Instant::now());
        }
        self.widest = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a batch with a wide publication, soon after another wide write, waits; and only
    /// when a wait is set.
    #[test]
    fn a_wide_batch_soon_after_a_wide_write_waits() {
        let wait = Duration::from_secs(60);
        let mut c = Coalesce::new(wait);
        c.fanned_out(MIN_CONNS);
        assert_eq!(c.hold(), None, "no wide write before");
        c.wrote();
        for _ in 0..100 {
            c.fanned_out(MIN_CONNS - 1);
        }
        assert_eq!(
            c.hold(),
            None,
            "many narrow publications are not a wide one"
        );
        c.fanned_out(MIN_CONNS);
        assert_eq!(c.hold(), Some(wait));
        c.wrote();
        assert_eq!(c.hold(), None, "nothing queued since the write");
        c.last_wide = Instant::now().checked_sub(2 * wait);
        c.fanned_out(1000);
        assert_eq!(
            c.hold(),
            None,
            "sparse: two waits since the last wide write"
        );
        let mut off = Coalesce::new(Duration::ZERO);
        off.last_wide = Some(Instant::now());
        off.fanned_out(1000);
        assert_eq!(off.hold(), None, "zero: never wait");
    }
}
