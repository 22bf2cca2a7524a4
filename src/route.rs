//! Which shards need a publication: a pure function over the interest table's masks, testable
//! without a runtime.
//!
//! The node's interest table ([`crate::broker::Interest`]) keeps, per (project, topic), a
//! bitmask of the shards holding a local subscriber. A publication to several topics goes to
//! the union of their masks: one message per interested shard, never one per connection, and
//! none to a shard without subscribers. A unicast (`user.<sub>`) wakes only the shards where
//! that user is connected.

/// Most shards a node can run: one bit each in a [`ShardMask`].
pub const MAX_SHARDS: usize = 64;

/// A set of shards, bit `i` for shard `i`.
pub type ShardMask = u64;

/// The shards a publication to topics with these interest masks goes to: their union.
pub fn shards_for_publication(masks: impl IntoIterator<Item = ShardMask>) -> ShardMask {
    masks.into_iter().fold(0, |all, m| all | m)
}

/// The shard ids in a mask, ascending.
pub fn shards(mut mask: ShardMask) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (mask != 0).then(|| {
            let shard = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            shard
        })
    })
}

/// The mask with only shard `shard`'s bit.
///
/// # Panics
/// If `shard` is [`MAX_SHARDS`] or more (the config refuses more shards).
pub fn bit(shard: usize) -> ShardMask {
    assert!(shard < MAX_SHARDS, "shard {shard} is over {MAX_SHARDS}");
    1 << shard
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publication_goes_to_the_union_of_its_topics_masks() {
        assert_eq!(shards_for_publication([]), 0, "no topic, no shard");
        assert_eq!(shards_for_publication([0]), 0, "no subscriber, no shard");
        assert_eq!(
            shards_for_publication([bit(2)]),
            0b100,
            "a unicast wakes one"
        );
        assert_eq!(shards_for_publication([0b0101, 0b0110, 0]), 0b0111);
        assert_eq!(shards(0b1010_0101).collect::<Vec<_>>(), [0, 2, 5, 7]);
        assert_eq!(shards(0).count(), 0);
        assert_eq!(shards(bit(63)).collect::<Vec<_>>(), [63]);
        assert_eq!(shards(u64::MAX).count(), MAX_SHARDS);
    }

    #[test]
    #[should_panic(expected = "over 64")]
    fn a_shard_past_the_mask_is_refused() {
        let _ = bit(64);
    }
}
