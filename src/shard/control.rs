//! Control-plane commands a shard answers for the API: list its open connections, kick one,
//! disconnect a user. Each runs on the shard's own thread from its inbox and answers through
//! the reply channel carried by the message; none of them touches another shard.

use std::collections::BTreeSet;

use super::Shard;
use super::mailbox::{ConnInfo, KickOutcome, ListQuery};
use crate::metrics::ShardStats;
use crate::pubsub::{ConnId, Topic, TopicId};
use crate::ws::close::CloseReason;
use crate::ws::conn::ConnPhase;

impl Shard {
    /// Open connections matching `q`, in slot order, strictly after `q.after`, at most
    /// `q.limit`. What a page costs is proportional to the page, not to the shard:
    ///
    /// - one project, no topic or user: its own connections in slot order
    ///   ([`Shard::by_project`]), from the cursor on;
    /// - the admin key, no project: the slab from the cursor's slot instead;
    /// - a topic (or a user's `user.<sub>` topic) with `k` subscribers among the `n`
    ///   connections above: a topic held by few (`k² ≤ limit·n`) is taken whole, and the
    ///   `limit` lowest after the cursor are selected (no sort of all of them); a dense one
    ///   (like `all`) is read by walking those `n` connections from the cursor, where about
    ///   one in `n/k` matches. Either way about `√(limit·n)` entries at most.
    ///
    /// Every entry looked at is counted in `list_visited`.
    pub(crate) fn list(&self, q: &ListQuery) -> Vec<ConnInfo> {
        let mut out = Vec::new();
        if q.limit == 0 {
            return out;
        }
        let start = q.after.map_or(0, |(slot, _)| slot);
        // A topic filter (or the user's own topic) narrows the candidates to its subscribers.
        let narrowing = match (&q.topic, &q.user) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(u)) => Some(Topic::user(u).as_str().to_owned()),
            (None, None) => None,
        };
        let mut visited = 0u64;
        // The connections a walk may visit, in slot order from the cursor: one project's own,
        // or (the admin key, no project) the slab's.
        let ordered = |project: Option<u32>| -> Box<dyn Iterator<Item = u32> + '_> {
            match project {
                Some(p) => Box::new(
                    self.by_project
                        .get(p as usize)
                        .into_iter()
                        .flat_map(move |s| s.range(start..))
                        .copied(),
                ),
                None => Box::new(
                    (start as usize..self.conns.capacity())
                        .filter(|&i| self.conns.contains(i))
                        .map(|i| i as u32),
                ),
            }
        };
        let topics: Vec<TopicId> = match &narrowing {
            None => Vec::new(),
            Some(name) => {
                let projects: Vec<u32> = match q.project {
                    Some(p) => vec![p],
                    None => self.hub.registry.load().projects().map(|p| p.idx).collect(),
                };
                projects
                    .iter()
                    .filter_map(|&p| self.topics.lookup(p, name))
                    .collect()
            }
        };
        let k: usize = topics
            .iter()
            .map(|&t| self.topics.subscribers(t).len())
            .sum();
        let n = match q.project {
            Some(p) => self.by_project.get(p as usize).map_or(0, BTreeSet::len),
            None => self.conns.len(),
        };
        let dense = k.saturating_mul(k) > q.limit.saturating_mul(n);
        if narrowing.is_none() || dense {
            for slot in ordered(q.project) {
                if out.len() >= q.limit {
                    break;
                }
                visited += 1;
                if self.matches(slot, q, &topics) {
                    out.push(self.info(slot));
                }
            }
        } else {
            visited += k as u64;
            let mut slots: Vec<u32> = topics
                .iter()
                .flat_map(|&t| self.topics.subscribers(t))
                .copied()
                .filter(|&slot| slot >= start && self.matches(slot, q, &[]))
                .collect();
            if slots.len() > q.limit {
                slots.select_nth_unstable(q.limit);
                slots.truncate(q.limit);
            }
            slots.sort_unstable();
            out.extend(slots.into_iter().map(|slot| self.info(slot)));
        }
        ShardStats::add(&self.stats.list_visited, visited);
        out
    }

    /// Whether the connection in `slot` is listed for `q`: open, after the cursor, of the
    /// project and user asked for, and (unless `topics` is empty) subscribed to one of
    /// `topics`.
    fn matches(&self, slot: u32, q: &ListQuery, topics: &[TopicId]) -> bool {
        let Some(c) = self.conns.get(slot as usize) else {
            return false;
        };
        if c.phase != ConnPhase::Open || q.after.is_some_and(|pos| (slot, c.generation) <= pos) {
            return false;
        }
        let Some(id) = c.identity.as_ref() else {
            return false;
        };
        q.project.is_none_or(|p| p == id.project.idx)
            && q.user.as_deref().is_none_or(|u| u == &*id.user)
            && (topics.is_empty() || c.subs.iter().any(|s| topics.contains(&s.topic)))
    }

    /// What the listing says about the (open) connection in `slot`.
    fn info(&self, slot: u32) -> ConnInfo {
        let c = &self.conns[slot as usize];
        let id = c.identity.as_ref().expect("listed connections are open");
        ConnInfo {
            id: ConnId {
                shard: self.id,
                slot,
                generation: c.generation,
            },
            project: id.project.id.clone(),
            user: id.user.clone(),
            peer: c.peer,
            connected_at: id.connected_at,
            topics: c
                .subs
                .iter()
                .map(|s| self.topics.name(s.topic).into())
                .collect(),
        }
    }

    /// Closes one open connection with 4003 if it still has `generation` (and belongs to
    /// `project` when given).
    pub(crate) fn kick(&mut self, slot: u32, generation: u32, project: Option<u32>) -> KickOutcome {
        let Some(c) = self.occupant(slot, generation) else {
            return KickOutcome::NotFound;
        };
        if c.phase != ConnPhase::Open {
            return KickOutcome::NotFound;
        }
        let owner = c.identity.as_ref().map(|id| id.project.idx);
        if project.is_some() && owner != project {
            return KickOutcome::OtherProject;
        }
        self.close_with(slot, CloseReason::Kicked);
        self.flush_dirty();
        KickOutcome::Closed
    }

    /// Closes with 4003 every open connection of `user` in `project`: the subscribers of its
    /// `user.<sub>` topic, so the cost is the number of that user's connections here.
    pub(crate) fn disconnect_user(&mut self, project: u32, user: &str) -> usize {
        let topic = Topic::user(user);
        let Some(t) = self.topics.lookup(project, topic.as_str()) else {
            return 0;
        };
        let slots: Vec<u32> = self
            .topics
            .subscribers(t)
            .iter()
            .copied()
            .filter(|&s| {
                self.conns.get(s as usize).is_some_and(|c| {
                    c.phase == ConnPhase::Open
                        && c.identity.as_ref().is_some_and(|id| &*id.user == user)
                })
            })
            .collect();
        for &slot in &slots {
            self.close_with(slot, CloseReason::Kicked);
        }
        self.flush_dirty();
        slots.len()
    }
}
