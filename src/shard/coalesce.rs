//! Coalescing dense fan-outs: when a shard takes a publication for many connections soon after
//! the previous such publication, it holds its next write a moment, so that publications
//! arriving meanwhile go out in the same send to each connection.
//!
//! A fan-out costs one send per connection whatever the send carries (on loopback ~1.5 µs of
//! kernel time each, and as much again for the reader), so a shard that writes every
//! publication on its own saturates the machine long before one that writes two or three per
//! send. The hold is bounded (`server.write_coalesce_ms`), one timer per shard, and taken only
//! when a wide publication came less than two waits after the wide one before it: publishers
//! rarely keep a steady pace, and one that came that close is likely to have another within
//! the wait. A rate slower than one wide publication per two waits is never held (a hold
//! there would only delay), nor are batches whose publications each reach few connections
//! (unicast, small groups, replies). What a hold defers is the write: a publisher that starts
//! waiting for the shard's inbox wakes it (the inbox is taken, the publisher answered) and
//! the hold goes on.
//!
//! It must not: hold a batch without a publication reaching [`MIN_CONNS`] connections, hold
//! one that followed the previous wide publication by two waits or more, or read the clock.

use std::time::{Duration, Instant};

/// Fewest connections one publication must reach to count as wide.
const MIN_CONNS: usize = 64;

/// One shard's coalescing state.
#[derive(Debug)]
pub(crate) struct Coalesce {
    /// The wait (`server.write_coalesce_ms`); zero: never hold.
    wait: Duration,
    /// A wide publication queued since the last write came less than two waits after the
    /// wide one before it.
    dense: bool,
    /// When the shard last took a wide publication.
    last_wide: Option<Instant>,
}

impl Coalesce {
    pub(crate) fn new(wait: Duration) -> Self {
        Self {
            wait,
            dense: false,
            last_wide: None,
        }
    }

    /// Notes a publication queued to `conns` connections, taken at `now`.
    pub(crate) fn fanned_out(&mut self, conns: usize, now: Instant) {
        if conns < MIN_CONNS || self.wait.is_zero() {
            return;
        }
        if self
            .last_wide
            .is_some_and(|prev| now.saturating_duration_since(prev) < 2 * self.wait)
        {
            self.dense = true;
        }
        self.last_wide = Some(now);
    }

    /// How long to hold the write of what is queued: `None` to write at once.
    pub(crate) fn hold(&self) -> Option<Duration> {
        self.dense.then_some(self.wait)
    }

    /// Notes that everything queued was written.
    pub(crate) fn wrote(&mut self) {
        self.dense = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a wide publication less than two waits after the previous wide one is held, once
    /// per write; narrow ones, slower ones and a zero wait never are.
    #[test]
    fn a_wide_publication_close_after_another_is_held() {
        let wait = Duration::from_millis(5);
        let t0 = Instant::now();
        // In tenths of a millisecond.
        let at = |tenths: u64| t0 + Duration::from_micros(tenths * 100);
        let mut c = Coalesce::new(wait);
        c.fanned_out(MIN_CONNS, at(0));
        assert_eq!(c.hold(), None, "the first wide publication");
        c.wrote();
        for i in 1..=100 {
            c.fanned_out(MIN_CONNS - 1, at(i / 10));
        }
        assert_eq!(c.hold(), None, "narrow publications, however many");
        c.fanned_out(MIN_CONNS, at(99));
        assert_eq!(c.hold(), Some(wait), "9.9 ms after the previous wide one");
        c.fanned_out(MIN_CONNS, at(110));
        assert_eq!(c.hold(), Some(wait), "still held for the one before");
        c.wrote();
        assert_eq!(c.hold(), None, "nothing queued since the write");
        c.fanned_out(MIN_CONNS, at(210));
        assert_eq!(
            c.hold(),
            None,
            "exactly two waits after the previous: a slower rate"
        );
        c.wrote();
        for i in 1..=10 {
            c.fanned_out(1000, at(210 + 101 * i));
            assert_eq!(c.hold(), None, "a steady 10.1 ms apart is never held");
            c.wrote();
        }
        let mut off = Coalesce::new(Duration::ZERO);
        off.fanned_out(1000, at(0));
        off.fanned_out(1000, at(0));
        assert_eq!(off.hold(), None, "zero: never hold");
    }
}
