//! The per-shard topic index: which local connections subscribe to which topic.
//!
//! Owned by one shard, touched by one thread, so no locks. A topic's subscribers are a dense
//! list of slab slots (4 bytes each): fan-out is a linear walk, and removal is `swap_remove`
//! at a position the connection remembers, so unsubscribing is O(1) and a unicast topic
//! (`user.<sub>`) costs the same whatever the total number of connections.
//!
//! Memory matters here (every connection has its own `user.<sub>` topic): a topic's name is
//! stored once, in its entry; the per-project name table holds only topic ids and hashes the
//! entry's name; a list of up to two subscribers lives inline, without a heap allocation.
//!
//! It reports a topic's first local subscriber ([`Subscribed::first`]) and its last local
//! unsubscribe ([`Unsubscribed::Last`]): the shard turns those into the node's interest (see
//! [`crate::broker`]), so a publish goes only to the shards holding subscribers of its topics.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use slab::Slab;
use smallvec::SmallVec;

/// Shard-local id of a topic with at least one local subscriber.
pub type TopicId = u32;

/// One topic with local subscribers.
#[derive(Debug)]
struct Entry {
    /// Index of the owning project in the registry.
    project: u32,
    /// Name, as published to.
    name: Box<str>,
    /// Subscribed slots, in no particular order.
    subs: SmallVec<[u32; 2]>,
}

/// Topics of one shard, per project.
#[derive(Debug, Default)]
pub struct TopicIndex {
    /// `by_name[project]`: topic ids, found by hashing the name stored in their entry.
    by_name: Vec<HashTable<TopicId>>,
    /// The topics themselves.
    topics: Slab<Entry>,
    /// Hashes topic names.
    hasher: std::collections::hash_map::RandomState,
}

/// What a subscription records so that it can be undone in O(1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sub {
    /// The topic.
    pub topic: TopicId,
    /// Position of the slot in the topic's subscriber list.
    pub pos: u32,
}

/// What [`TopicIndex::subscribe`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscribed {
    /// The record to keep for undoing it.
    pub sub: Sub,
    /// The topic had no local subscriber before: the shard's interest in it starts here.
    pub first: bool,
}

/// What [`TopicIndex::unsubscribe`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsubscribed {
    /// Other subscribers remain; the slot that moved into the freed position, if any (its
    /// record for this topic must be updated to the freed position).
    Remaining(Option<u32>),
    /// That was the topic's last local subscriber: the topic is gone from the index and the
    /// shard's interest in it ends.
    Last {
        /// The topic's project.
        project: u32,
        /// The topic's name, handed back from the removed entry.
        name: Box<str>,
    },
}

impl TopicIndex {
    fn hash(&self, name: &str) -> u64 {
        self.hasher.hash_one(name)
    }

    /// Topic id of `name` in `project`, if it has local subscribers.
    pub fn lookup(&self, project: u32, name: &str) -> Option<TopicId> {
        let table = self.by_name.get(project as usize)?;
        table
            .find(self.hash(name), |&t| *self.topics[t as usize].name == *name)
            .copied()
    }

    /// Subscribed slots of a topic.
    pub fn subscribers(&self, topic: TopicId) -> &[u32] {
        self.topics.get(topic as usize).map_or(&[], |e| &e.subs)
    }

    /// Name of a topic.
    pub fn name(&self, topic: TopicId) -> &str {
        &self.topics[topic as usize].name
    }

    /// Number of topics with local subscribers.
    pub fn nr_topics(&self) -> usize {
        self.topics.len()
    }

    /// Adds `slot` to a topic, creating it if needed. The caller must not subscribe a slot
    /// twice to one topic (it keeps the list of its [`Sub`]s and checks first).
    pub fn subscribe(&mut self, project: u32, name: &str, slot: u32) -> Subscribed {
        let p = project as usize;
        if self.by_name.len() <= p {
            self.by_name.resize_with(p + 1, HashTable::new);
        }
        let (topic, first) = match self.lookup(project, name) {
            Some(t) => (t, false),
            None => {
                let entry = Entry {
                    project,
                    name: name.into(),
                    subs: SmallVec::new(),
                };
                let t = self.topics.insert(entry) as TopicId;
                let hash = self.hash(name);
                let (topics, hasher) = (&self.topics, &self.hasher);
                self.by_name[p]
                    .insert_unique(hash, t, |&t| hasher.hash_one(&*topics[t as usize].name));
                (t, true)
            }
        };
        let subs = &mut self.topics[topic as usize].subs;
        subs.push(slot);
        Subscribed {
            sub: Sub {
                topic,
                pos: (subs.len() - 1) as u32,
            },
            first,
        }
    }

    /// Removes the subscription `sub`: either other subscribers remain (and one may have moved
    /// into `sub.pos`), or it was the last and the topic is gone.
    pub fn unsubscribe(&mut self, sub: Sub) -> Unsubscribed {
        let entry = &mut self.topics[sub.topic as usize];
        entry.subs.swap_remove(sub.pos as usize);
        if entry.subs.is_empty() {
            let hash = self.hash(&self.topics[sub.topic as usize].name);
            let entry = self.topics.remove(sub.topic as usize);
            if let Ok(e) =
                self.by_name[entry.project as usize].find_entry(hash, |&t| t == sub.topic)
            {
                e.remove();
            }
            return Unsubscribed::Last {
                project: entry.project,
                name: entry.name,
            };
        }
        if entry.subs.capacity() > 64 && entry.subs.len() < entry.subs.capacity() / 4 {
            entry.subs.shrink_to_fit();
        }
        Unsubscribed::Remaining(entry.subs.get(sub.pos as usize).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_lookup_unsubscribe() {
        let mut ix = TopicIndex::default();
        let a = ix.subscribe(0, "news", 10);
        let b = ix.subscribe(0, "news", 11);
        let c = ix.subscribe(0, "news", 12);
        let other = ix.subscribe(1, "news", 13);
        assert!(
            a.first && !b.first && !c.first,
            "only the first local subscriber"
        );
        assert!(other.first, "a topic of another project is another topic");
        let (a, b, other) = (a.sub, b.sub, other.sub);
        assert_ne!(a.topic, other.topic, "projects never share a topic");
        let t = ix.lookup(0, "news").unwrap();
        assert_eq!(ix.subscribers(t), &[10, 11, 12]);
        // Removing the first moves the last into its place.
        assert_eq!(ix.unsubscribe(a), Unsubscribed::Remaining(Some(12)));
        assert_eq!(ix.subscribers(t), &[12, 11]);
        assert_eq!(ix.unsubscribe(b), Unsubscribed::Remaining(None));
        assert_eq!(ix.subscribers(t), &[12]);
        assert_eq!(
            ix.unsubscribe(Sub { topic: t, pos: 0 }),
            Unsubscribed::Last {
                project: 0,
                name: "news".into()
            },
            "the last local unsubscribe hands the name back"
        );
        assert_eq!(ix.lookup(0, "news"), None);
        assert_eq!(ix.lookup(1, "news"), Some(other.topic));
        assert_eq!(ix.nr_topics(), 1);
        assert_eq!(ix.name(other.topic), "news");
        // Interest starts again with the next subscriber.
        let again = ix.subscribe(0, "news", 14);
        assert!(again.first);
        assert!(!ix.subscribe(0, "news", 15).first);
    }

    #[test]
    fn many_topics_grow_and_shrink() {
        let mut ix = TopicIndex::default();
        let subs: Vec<Sub> = (0..5000)
            .map(|i| {
                let s = ix.subscribe(0, &format!("user.{i}"), i);
                assert!(s.first);
                s.sub
            })
            .collect();
        assert_eq!(ix.nr_topics(), 5000);
        for i in (0..5000).step_by(7) {
            assert_eq!(
                ix.subscribers(ix.lookup(0, &format!("user.{i}")).unwrap()),
                &[i]
            );
        }
        for (i, s) in subs.into_iter().enumerate() {
            assert_eq!(
                ix.unsubscribe(s),
                Unsubscribed::Last {
                    project: 0,
                    name: format!("user.{i}").into()
                }
            );
        }
        assert_eq!(ix.nr_topics(), 0);
        assert_eq!(ix.lookup(0, "user.1"), None);
    }
}
