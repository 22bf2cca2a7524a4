//! Giving back the memory a shard's arrays leave behind when they grow or shrink.
//!
//! The slab of connections, the topic index, the deadline queues and the expiry heap grow by
//! doubling: each growth copies the array and frees the old copy (and the node-wide interest
//! table, whose stripes this shard grows when it adds topics, does the same). The allocator
//! (mimalloc) keeps freed pages for a while and returns them to the OS only when the thread
//! that owns them allocates again, which an idle shard does not: the old copies stayed
//! resident, about a quarter of an idle connection's cost. So the sweep asks the allocator to
//! return what this thread freed ([`libmimalloc_sys::mi_collect`], forced: the freed pages go
//! back at once, not after mimalloc's purge delay) after a sweep tick in which the shard's
//! arrays changed size, and at once when the connection slab doubles: never per message or
//! per connection, and not at all while the shard's load is steady.
//!
//! Under another global allocator (the in-process test server) the call only collects
//! mimalloc's own empty heap for this thread.

use std::time::{Duration, Instant};

/// From this many entries a doubling of the connection slab is given back at once (its old
/// copy is 56 KiB or more); smaller ones wait for the next tick.
pub(crate) const PROMPT_SLAB_ENTRIES: usize = 1024;

/// The sizes of a shard's arrays that grow by doubling, as of one sweep tick. Topics are
/// counted by the power of two at or above their number: the topic index and the node-wide
/// interest table grow when it changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Footprint {
    /// `Slab<Conn>` entries.
    pub(crate) conns: usize,
    /// Local topics, rounded up to a power of two.
    pub(crate) topics: usize,
    /// Room in the handshake and close deadline queues.
    pub(crate) deadlines: usize,
    /// Room in the token-expiry heap.
    pub(crate) expiries: usize,
}

/// When the shard last gave memory back.
#[derive(Debug, Default)]
pub(crate) struct Trim {
    /// The footprint at the last collect (or at start).
    last: Footprint,
}

impl Trim {
    /// Entries of the connection slab at the last collect.
    pub(crate) fn conns(&self) -> usize {
        self.last.conns
    }

    /// Called by every sweep tick (and by a doubling of the connection slab) with the shard's
    /// current footprint: if it changed since the
    /// last collect, asks the allocator to return what this thread freed, and answers how
    /// long that took (`None`: nothing changed, nothing done).
    pub(crate) fn after_tick(&mut self, now: Footprint) -> Option<Duration> {
        if now == self.last {
            return None;
        }
        self.last = now;
        let started = Instant::now();
        // SAFETY: `mi_collect` takes no pointer and may be called from any thread at any
        // time; it only walks and frees this thread's own allocator pages.
        unsafe { libmimalloc_sys::mi_collect(true) };
        Some(started.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_once_per_change_of_footprint() {
        let mut trim = Trim::default();
        assert!(
            trim.after_tick(Footprint::default()).is_none(),
            "nothing grew"
        );
        let grown = Footprint {
            conns: 4096,
            topics: 4096,
            deadlines: 0,
            expiries: 0,
        };
        assert!(trim.after_tick(grown).is_some(), "the arrays grew");
        assert!(trim.after_tick(grown).is_none(), "steady: no collect");
        let smaller = Footprint {
            topics: 2048,
            ..grown
        };
        assert!(trim.after_tick(smaller).is_some(), "the arrays shrank");
    }
}
