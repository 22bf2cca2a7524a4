//! The node's interest table: (project, topic) → the shards holding a local subscriber.
//!
//! Shards write it only on a topic's first local subscriber and its last local unsubscribe
//! (the events [`crate::pubsub::TopicIndex`] reports), so a connection's `all` topic costs one
//! write per shard while that shard has connections of the project, not one per connection.
//! Publishers read it to send a publication only to the shards that need it.
//!
//! With an engine, an entry also says whether the node's engine subscription of its topic is
//! confirmed ([`Interest::confirm`]): a shard subscribing a topic another shard has just
//! asked the engine for learns here that the subscription is still pending, so its ack waits
//! as the first one's does.
//!
//! It is striped: [`NR_STRIPES`] independent locks, a (project, topic) always in the same
//! one, so shards subscribing different topics and publishers reading rarely meet. A lock is
//! held for one hash-table probe. An entry exists only while its mask is not empty: the last
//! unsubscribe on the last interested shard removes it, so the table is bounded by the topics
//! with subscribers on the node.

use std::hash::BuildHasher;
use std::sync::Mutex;

use hashbrown::HashTable;

use crate::route::{self, ShardMask};

/// Independent locks; a power of two, well above the number of threads that touch the table
/// at once (the shards and the API thread), so two of them rarely want the same stripe.
pub const NR_STRIPES: usize = 64;

/// One (project, topic) with subscribers somewhere on the node.
#[derive(Debug)]
struct Entry {
    /// The shards holding a local subscriber.
    mask: ShardMask,
    /// Registry index of the project.
    project: u32,
    /// The topic's name.
    name: Box<str>,
    /// The node's engine subscription of the topic exists ([`Interest::confirm`]).
    confirmed: bool,
}

/// What [`Interest::add`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Added {
    /// The node had no subscriber of the topic before: its interest starts here.
    pub first: bool,
    /// The node's engine subscription of the topic is confirmed (never for a new entry).
    pub confirmed: bool,
}

/// Bytes an entry takes in its table, besides its name's own allocation: the entry and the
/// hash table's control byte.
pub const ENTRY_BYTES: usize = std::mem::size_of::<Entry>() + 1;

/// Topic → shards, for the whole node.
#[derive(Debug)]
pub struct Interest {
    /// Stripe `hash % NR_STRIPES` holds the entries of that hash.
    stripes: Box<[Mutex<HashTable<Entry>>]>,
    /// Hashes (project, topic).
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Interest {
    fn default() -> Self {
        Self {
            stripes: (0..NR_STRIPES).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
        }
    }
}

impl Interest {
    fn hash(&self, project: u32, name: &str) -> u64 {
        self.hasher.hash_one((project, name))
    }

    /// The stripe of a hash, locked. A poisoned lock only means a thread panicked while
    /// holding it; every change under it is one table operation, complete or not begun.
    fn stripe(&self, hash: u64) -> std::sync::MutexGuard<'_, HashTable<Entry>> {
        self.stripes[(hash >> 32) as usize % NR_STRIPES]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Shard `shard` now has a local subscriber of `name` in `project`. Returns whether the
    /// node had none before (the node's interest in the topic starts here) and whether its
    /// engine subscription is confirmed. When it returns, every later [`Interest::mask`] has
    /// the shard's bit.
    ///
    /// # Panics
    /// If `shard` is not below [`route::MAX_SHARDS`].
    pub fn add(&self, shard: usize, project: u32, name: &str) -> Added {
        let bit = route::bit(shard);
        let hash = self.hash(project, name);
        let mut table = self.stripe(hash);
        if let Some(e) = table.find_mut(hash, |e| e.project == project && *e.name == *name) {
            let first = e.mask == 0;
            e.mask |= bit;
            return Added {
                first,
                confirmed: e.confirmed,
            };
        }
        let entry = Entry {
            mask: bit,
            project,
            name: name.into(),
            confirmed: false,
        };
        table.insert_unique(hash, entry, |e| self.hash(e.project, &e.name));
        Added {
            first: true,
            confirmed: false,
        }
    }

    /// The node's engine subscription of `name` in `project` exists: shards subscribing the
    /// topic from now on need not wait for it. Nothing when no shard holds a subscriber (an
    /// entry made later starts unconfirmed, and is confirmed by the engine in turn).
    pub fn confirm(&self, project: u32, name: &str) {
        let hash = self.hash(project, name);
        if let Some(e) = self
            .stripe(hash)
            .find_mut(hash, |e| e.project == project && *e.name == *name)
        {
            e.confirmed = true;
        }
    }

    /// Shard `shard` no longer has a local subscriber of `name` in `project`. Returns whether
    /// no shard has one any more (the entry is gone and the node's interest ends).
    pub fn remove(&self, shard: usize, project: u32, name: &str) -> bool {
        let hash = self.hash(project, name);
        let mut table = self.stripe(hash);
        let Ok(mut e) = table.find_entry(hash, |e| e.project == project && *e.name == *name) else {
            return false;
        };
        e.get_mut().mask &= !route::bit(shard);
        if e.get().mask == 0 {
            e.remove();
            return true;
        }
        false
    }

    /// The shards holding a subscriber of `name` in `project`.
    pub fn mask(&self, project: u32, name: &str) -> ShardMask {
        let hash = self.hash(project, name);
        self.stripe(hash)
            .find(hash, |e| e.project == project && *e.name == *name)
            .map_or(0, |e| e.mask)
    }

    /// The shards a publication to `topics` of `project` goes to.
    pub fn route<'a>(&self, project: u32, topics: impl IntoIterator<Item = &'a str>) -> ShardMask {
        route::shards_for_publication(topics.into_iter().map(|t| self.mask(project, t)))
    }

    /// Number of (project, topic) entries: topics with a subscriber somewhere on the node.
    pub fn len(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// No topic has a subscriber.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries, as (project, topic, mask), in no particular order (for tests and
    /// diagnostics; it locks every stripe in turn).
    pub fn entries(&self) -> Vec<(u32, String, ShardMask)> {
        let mut out = Vec::new();
        for s in self.stripes.iter() {
            let table = s.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(
                table
                    .iter()
                    .map(|e| (e.project, e.name.to_string(), e.mask)),
            );
        }
        out
    }

    /// Bytes the table holds: its stripes' allocations, the entries' names and the stripes
    /// themselves (what the idle-memory figures count for interest).
    pub fn nr_bytes(&self) -> usize {
        let stripes = std::mem::size_of_val(&*self.stripes);
        self.stripes
            .iter()
            .map(|s| {
                let table = s.lock().unwrap_or_else(|e| e.into_inner());
                table.allocation_size() + table.iter().map(|e| e.name.len()).sum::<usize>()
            })
            .sum::<usize>()
            + stripes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_last_interest_per_node() {
        let t = Interest::default();
        assert!(t.add(0, 1, "news").first, "the node's first subscriber");
        assert!(!t.add(3, 1, "news").first, "another shard joins");
        assert!(!t.add(3, 1, "news").first, "setting a set bit is harmless");
        assert!(
            t.add(2, 2, "news").first,
            "another project's topic is another topic"
        );
        assert_eq!(t.mask(1, "news"), 0b1001);
        assert_eq!(t.mask(2, "news"), 0b0100);
        assert_eq!(t.mask(1, "other"), 0);
        assert_eq!(t.route(1, ["news", "other"]), 0b1001);
        assert_eq!(t.route(1, []), 0);
        assert_eq!(t.len(), 2);
        assert!(!t.remove(0, 1, "news"), "shard 3 still has one");
        assert_eq!(t.mask(1, "news"), 0b1000);
        assert!(t.remove(3, 1, "news"), "the node's last");
        assert!(!t.remove(3, 1, "news"), "gone already");
        assert_eq!(t.entries(), [(2, "news".to_owned(), 0b0100)]);
        assert!(t.remove(2, 2, "news"));
        assert!(t.is_empty());
    }

    /// A topic's engine subscription is pending for every shard joining it until the engine
    /// confirms it; an entry made again after the last shard left starts pending again.
    #[test]
    fn confirmation_is_node_wide_and_ends_with_the_entry() {
        let t = Interest::default();
        let pending = Added {
            first: false,
            confirmed: false,
        };
        assert_eq!(
            t.add(0, 1, "news"),
            Added {
                first: true,
                confirmed: false
            }
        );
        assert_eq!(t.add(1, 1, "news"), pending, "asked for, not confirmed yet");
        t.confirm(1, "other");
        assert_eq!(t.add(2, 1, "news"), pending, "another topic's confirmation");
        t.confirm(1, "news");
        assert_eq!(
            t.add(3, 1, "news"),
            Added {
                first: false,
                confirmed: true
            }
        );
        for shard in 0..4 {
            t.remove(shard, 1, "news");
        }
        t.confirm(1, "news");
        assert!(
            t.is_empty(),
            "confirming a topic nobody holds makes no entry"
        );
        assert_eq!(
            t.add(0, 1, "news"),
            Added {
                first: true,
                confirmed: false
            },
            "a new entry waits for its own confirmation"
        );
    }

    /// Shards add and remove the same topics at once: each ends with exactly its own bits, and
    /// with nothing once every shard has let go.
    #[test]
    fn concurrent_shards_keep_their_own_bits() {
        let t = std::sync::Arc::new(Interest::default());
        let threads: Vec<_> = (0..4)
            .map(|shard| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for round in 0..200 {
                        for i in 0..50 {
                            t.add(shard, 0, &format!("user.{i}"));
                        }
                        for i in 0..50 {
                            if round < 199 || i % 2 == 0 {
                                t.remove(shard, 0, &format!("user.{i}"));
                            }
                        }
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(t.len(), 25);
        for i in (1..50).step_by(2) {
            assert_eq!(t.mask(0, &format!("user.{i}")), 0b1111);
        }
        for i in 0..50 {
            t.remove(0, 0, &format!("user.{i}"));
            t.remove(1, 0, &format!("user.{i}"));
            t.remove(2, 0, &format!("user.{i}"));
            t.remove(3, 0, &format!("user.{i}"));
        }
        assert!(t.is_empty());
    }

    /// What one topic with subscribers costs the node (one per connected user for the
    /// `user.<sub>` topics): printed with `--nocapture`, bounded here.
    #[test]
    fn bytes_per_entry() {
        assert_eq!(
            ENTRY_BYTES, 33,
            "mask 8, project 4, confirmed 1 (+3), name 16, control byte 1"
        );
        let t = Interest::default();
        let empty = t.nr_bytes();
        let n = 100_000;
        for i in 0..n {
            t.add(i % 4, 0, &format!("user.{i:08}"));
        }
        let per_entry = (t.nr_bytes() - empty) as f64 / n as f64;
        println!("interest: {per_entry:.1} B per entry with a 13-byte name (table + name)");
        assert!(per_entry < 80.0, "{per_entry} B per entry");
    }
}
