//! Which shards need a publication: a pure function, testable without a runtime.
//!
//! Every shard keeps its own topic index and no shard knows another's, so a publication goes
//! to every shard: one message per shard, never one per connection, and a shard with no
//! subscriber drops it after one hash lookup per topic. The cost of a unicast is therefore
//! O(shards), independent of the number of connections. (A shared interest table would save
//! the lookup but put a cross-core write on every subscribe; measure before adding one.)

/// Shards a publication is sent to.
pub fn shards_for_publication(nr_shards: usize) -> std::ops::Range<usize> {
    0..nr_shards
}

/// The shard owning a connection id's slot (the id carries it).
pub fn shard_of(id: &crate::pubsub::ConnId, nr_shards: usize) -> Option<usize> {
    let s = id.shard as usize;
    (s < nr_shards).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pubsub::ConnId;

    #[test]
    fn routes() {
        assert_eq!(shards_for_publication(3).collect::<Vec<_>>(), [0, 1, 2]);
        let id = ConnId {
            shard: 2,
            slot: 0,
            generation: 1,
        };
        assert_eq!(shard_of(&id, 3), Some(2));
        assert_eq!(shard_of(&id, 2), None);
    }
}
