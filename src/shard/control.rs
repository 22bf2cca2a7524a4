//! Control-plane commands a shard answers for the API: list its open connections, kick one,
//! disconnect a user. Each runs on the shard's own thread from its inbox and answers through
//! the reply channel carried by the message; none of them touches another shard.

use super::Shard;
use super::mailbox::{ConnInfo, KickOutcome, ListQuery};
use crate::pubsub::{ConnId, Topic};
use crate::ws::close::CloseReason;
use crate::ws::conn::ConnPhase;

impl Shard {
    /// Open connections matching `q`, in slot order, strictly after `q.after`, at most
    /// `q.limit`.
    ///
    /// With a `topic` or `user` filter only that topic's subscribers are visited (a unicast
    /// topic has a handful), otherwise the slab is walked from the cursor's slot.
    pub(crate) fn list(&self, q: &ListQuery) -> Vec<ConnInfo> {
        let mut out = Vec::new();
        if q.limit == 0 {
            return out;
        }
        let after = |slot: u32, generation: u32| match q.after {
            None => true,
            Some(pos) => (slot, generation) > pos,
        };
        // A topic filter (or the user's own topic) narrows the candidates to its subscribers.
        let narrowing = match (&q.topic, &q.user) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(u)) => Some(Topic::user(u).as_str().to_owned()),
            (None, None) => None,
        };
        let candidates: Box<dyn Iterator<Item = u32> + '_> = match narrowing {
            Some(name) => {
                let mut slots = Vec::new();
                let projects: Vec<u32> = match q.project {
                    Some(p) => vec![p],
                    None => self.hub.registry.load().projects().map(|p| p.idx).collect(),
                };
                for p in projects {
                    if let Some(t) = self.topics.lookup(p, &name) {
                        slots.extend_from_slice(self.topics.subscribers(t));
                    }
                }
                slots.sort_unstable();
                slots.dedup();
                Box::new(slots.into_iter())
            }
            None => {
                let start = q.after.map_or(0, |(slot, _)| slot as usize);
                Box::new(
                    (start..self.conns.capacity())
                        .filter(|&i| self.conns.contains(i))
                        .map(|i| i as u32),
                )
            }
        };
        for slot in candidates {
            if out.len() >= q.limit {
                break;
            }
            let Some(c) = self.conns.get(slot as usize) else {
                continue;
            };
            if c.phase != ConnPhase::Open || !after(slot, c.generation) {
                continue;
            }
            let Some(id) = c.identity.as_ref() else {
                continue;
            };
            if q.project.is_some_and(|p| p != id.project.idx)
                || q.user.as_deref().is_some_and(|u| u != &*id.user)
            {
                continue;
            }
            let topics: Vec<Box<str>> = c
                .subs
                .iter()
                .map(|s| self.topics.name(s.topic).into())
                .collect();
            if let Some(t) = &q.topic
                && !topics.iter().any(|n| n == t)
            {
                continue;
            }
            out.push(ConnInfo {
                id: ConnId {
                    shard: self.id,
                    slot,
                    generation: c.generation,
                },
                project: id.project.id.clone(),
                user: id.user.clone(),
                peer: c.peer,
                connected_at: id.connected_at,
                topics,
            });
        }
        out
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
