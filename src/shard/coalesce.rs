//! Coalescing back-to-back fan-outs: when a shard writes to many connections again soon after
//! it last did, it waits a moment first, so that messages arriving meanwhile go out in the
//! same write to each connection.
//!
//! A fan-out's cost is one send per connection whatever the send carries, and on a busy shard
//! the next publication is usually a few milliseconds away: two messages in one send cost
//! about what one does. The wait is bounded (`server.write_coalesce_us`), one timer per shard,
//! and only taken when the previous wide write was recent, so sparse traffic and writes to a
//! few connections (unicast, replies) go out at once.
//!
//! It must not: hold a write to fewer than [`MIN_CONNS`] connections, or hold the same batch
//! twice.

use std::time::{Duration, Instant};

/// Fewest connections a write must reach to be held.
pub(crate) const MIN_CONNS: usize = 64;
/// A wide write is held when the previous one ended within this many waits of it.
const DENSE_WITHIN: u32 = 8;

/// One shard's coalescing state.
#[derive(Debug)]
pub(crate) struct Coalesce {
    /// The wait (`server.write_coalesce_us`); zero: never wait.
    wait: Duration,
    /// When the last write to at least [`MIN_CONNS`] connections ended.
    last_wide: Option<Instant>,
}

impl Coalesce {
    pub(crate) fn new(wait: Duration) -> Self {
        Self {
            wait,
            last_wide: None,
        }
    }

    /// How long to wait before writing to `dirty` connections at `now`: `None` to write at
    /// once (a narrow write, no wait configured, or no wide write recently).
    pub(crate) fn hold(&self, dirty: usize, now: Instant) -> Option<Duration> {
        if dirty < MIN_CONNS || self.wait.is_zero() {
            return None;
        }
        let last = self.last_wide?;
        (now.saturating_duration_since(last) < self.wait * DENSE_WITHIN).then_some(self.wait)
    }

    /// Notes a write to `dirty` connections that ended at `now`.
    pub(crate) fn wrote(&mut self, dirty: usize, now: Instant) {
        if dirty >= MIN_CONNS {
            self.last_wide = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a wide write soon after another wide one waits, and only when a wait is set.
    #[test]
    fn a_wide_write_soon_after_another_waits() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut c = Coalesce::new(ms(1));
        assert_eq!(c.hold(MIN_CONNS, t0), None, "no wide write before");
        c.wrote(MIN_CONNS - 1, t0);
        assert_eq!(
            c.hold(1000, t0 + ms(1)),
            None,
            "a narrow write is not a wide one"
        );
        c.wrote(MIN_CONNS, t0);
        assert_eq!(c.hold(MIN_CONNS, t0 + ms(7)), Some(ms(1)));
        assert_eq!(
            c.hold(MIN_CONNS - 1, t0 + ms(1)),
            None,
            "a narrow write goes at once"
        );
        assert_eq!(
            c.hold(MIN_CONNS, t0 + ms(8)),
            None,
            "sparse: eight waits later"
        );
        let off = Coalesce {
            wait: Duration::ZERO,
            last_wide: Some(t0),
        };
        assert_eq!(off.hold(1000, t0), None, "zero: never wait");
    }
}
