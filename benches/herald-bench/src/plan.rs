//! The shape of a run, shared by the parent and every worker: who subscribes to what, which
//! publishes happen in which order, and who must receive each of them. Pure functions of the
//! plan, so the publisher and the receivers agree without talking.
//!
//! Connection `i` has user `b<i>`. Publish number `k` of round `r` (the round is the sequence
//! number within its topic):
//! - broadcast: `k = r`, topic `--topic`, received by all N;
//! - groups: `k = r * nr_groups + g`, topic `g<g>`, received by connections
//!   `g*G .. (g+1)*G`; every connection also holds its personal topic `user.b<i>`;
//! - unicast: `k = r * N + i`, topic `user.b<i>`, received by connection `i` only.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// The scenarios.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// N idle authenticated connections; server memory per connection.
    Hold,
    /// N subscribers of one topic; delivery latency and completion.
    Broadcast,
    /// Personal topic + a group topic of ~10 per connection; publishes to the groups.
    Groups,
    /// One user per connection; publishes to `user.<sub>`.
    Unicast,
    /// Steady connect/disconnect rate.
    Churn,
    /// Connect + upgrade + welcome + close, flat out.
    Handshake,
}

impl Kind {
    /// Whether the scenario publishes and measures deliveries.
    pub fn delivers(self) -> bool {
        matches!(self, Self::Broadcast | Self::Groups | Self::Unicast)
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hold => "hold",
            Self::Broadcast => "broadcast",
            Self::Groups => "groups",
            Self::Unicast => "unicast",
            Self::Churn => "churn",
            Self::Handshake => "handshake",
        }
    }
}

/// What a run does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The scenario.
    pub kind: Kind,
    /// Connections held for the whole run.
    pub nr_conns: u64,
    /// Rounds: messages per topic.
    pub nr_rounds: u64,
    /// Topic of the broadcast scenario.
    pub topic: String,
    /// Connections per group (groups scenario).
    pub group_size: u64,
}

impl Plan {
    /// Number of group topics.
    pub fn nr_groups(&self) -> u64 {
        self.nr_conns.div_ceil(self.group_size.max(1))
    }

    /// Publishes per round.
    pub fn per_round(&self) -> u64 {
        match self.kind {
            Kind::Broadcast => 1,
            Kind::Groups => self.nr_groups(),
            Kind::Unicast => self.nr_conns,
            _ => 0,
        }
    }

    /// Total publishes.
    pub fn nr_publishes(&self) -> u64 {
        self.per_round() * self.nr_rounds
    }

    /// Deliveries the run expects in total (one per recipient per publish).
    #[cfg(test)]
    pub fn expected_deliveries(&self) -> u64 {
        if self.kind.delivers() {
            self.nr_conns * self.nr_rounds
        } else {
            0
        }
    }

    /// Deliveries connection `i` expects: one per round.
    pub fn expected_per_conn(&self) -> u64 {
        if self.kind.delivers() {
            self.nr_rounds
        } else {
            0
        }
    }

    /// Topics connection `i` (user `sub`) must receive on.
    pub fn topics(&self, conn: u64, sub: &str) -> Vec<String> {
        match self.kind {
            Kind::Broadcast => vec![self.topic.clone()],
            Kind::Groups => vec![
                format!("user.{sub}"),
                format!("g{}", conn / self.group_size.max(1)),
            ],
            Kind::Unicast => vec![format!("user.{sub}")],
            _ => Vec::new(),
        }
    }

    /// Topic of unicast recipient `i` (user `b<i>`): `user.b<i>`.
    fn user_topic(i: u64) -> String {
        format!("user.b{i}")
    }

    /// Publish `k`: its topic and round.
    pub fn publish(&self, k: u64) -> (String, u64) {
        let per = self.per_round().max(1);
        let (round, slot) = (k / per, k % per);
        let topic = match self.kind {
            Kind::Groups => format!("g{slot}"),
            Kind::Unicast => Self::user_topic(slot),
            _ => self.topic.clone(),
        };
        (topic, round)
    }

    /// The slot of publish `k` within its round (the group, or the user).
    pub fn slot(&self, k: u64) -> u64 {
        k % self.per_round().max(1)
    }

    /// Recipients of publish `k`.
    pub fn recipients(&self, k: u64) -> u64 {
        match self.kind {
            Kind::Broadcast => self.nr_conns,
            Kind::Groups => {
                let g = self.slot(k);
                let gs = self.group_size.max(1);
                gs.min(self.nr_conns - g * gs)
            }
            Kind::Unicast => 1,
            _ => 0,
        }
    }

    /// Alignment of worker shares: a group never spans two workers, so each worker sees
    /// every recipient of its groups' publishes and computes their completion itself.
    pub fn share_align(&self) -> u64 {
        if self.kind == Kind::Groups {
            self.group_size.max(1)
        } else {
            1
        }
    }
}

/// Splits `0..n` into `parts` contiguous ranges whose boundaries are multiples of `align`
/// (except the end), as even as that allows. Empty ranges are dropped.
pub fn split(n: u64, parts: usize, align: u64) -> Vec<Range<u64>> {
    let parts = parts.max(1) as u64;
    let align = align.max(1);
    let units = n.div_ceil(align);
    let mut out = Vec::new();
    let mut start_unit = 0;
    for p in 0..parts {
        let end_unit = units * (p + 1) / parts;
        let (lo, hi) = ((start_unit * align).min(n), (end_unit * align).min(n));
        if hi > lo {
            out.push(lo..hi);
        }
        start_unit = end_unit;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(kind: Kind, n: u64) -> Plan {
        Plan {
            kind,
            nr_conns: n,
            nr_rounds: 3,
            topic: "bench".into(),
            group_size: 10,
        }
    }

    #[test]
    fn groups_plan() {
        let p = plan(Kind::Groups, 25);
        assert_eq!(p.nr_groups(), 3);
        assert_eq!(p.nr_publishes(), 9);
        assert_eq!(p.publish(4), ("g1".into(), 1));
        assert_eq!(p.recipients(2), 5);
        assert_eq!(p.recipients(3), 10);
        assert_eq!(
            p.topics(24, "b24"),
            vec!["user.b24".to_string(), "g2".into()]
        );
        let total: u64 = (0..p.nr_publishes()).map(|k| p.recipients(k)).sum();
        assert_eq!(total, p.expected_deliveries());
    }

    #[test]
    fn unicast_and_broadcast_plans() {
        let u = plan(Kind::Unicast, 4);
        assert_eq!(u.publish(5), ("user.b1".into(), 1));
        assert_eq!(u.topics(1, "b1"), vec!["user.b1".to_string()]);
        let b = plan(Kind::Broadcast, 4);
        assert_eq!(b.nr_publishes(), 3);
        assert_eq!(b.recipients(2), 4);
        assert_eq!(b.expected_deliveries(), 12);
    }

    #[test]
    fn split_aligns() {
        assert_eq!(split(10, 3, 1), vec![0..3, 3..6, 6..10]);
        assert_eq!(split(25, 2, 10), vec![0..10, 10..25]);
        assert_eq!(split(5, 8, 1).len(), 5);
        assert_eq!(split(0, 2, 1), Vec::<Range<u64>>::new());
        let s = split(1000, 7, 10);
        assert_eq!(s.iter().map(|r| r.end - r.start).sum::<u64>(), 1000);
        assert!(s.iter().all(|r| r.start % 10 == 0));
    }
}
