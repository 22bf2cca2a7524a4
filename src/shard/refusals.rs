//! The shard's log of refused handshakes, throttled: a flood of refusals (bad requests, bad
//! tokens, rate limits, sockets closed at accept) must not become a flood of log lines. The
//! first answered refusal of an interval is logged in full; every other one is counted by
//! reason and logged at debug, and one summary line per interval reports the counts.

use std::time::{Duration, Instant};

/// Length of one interval: at most one refusal logged in full and one summary line per shard.
pub(crate) const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Refusals of the current interval.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    /// Start of the interval (its first refusal); `None` when nothing was refused since the
    /// last summary.
    since: Option<Instant>,
    /// A refusal of this interval was logged in full.
    logged_full: bool,
    /// Refusals not logged in full, by reason (a handful of reasons: a linear search).
    counts: Vec<(&'static str, u64)>,
}

/// What the summary line reports.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Summary {
    /// Refusals not logged in full in the interval.
    pub(crate) more: u64,
    /// `reason:count` pairs, space-separated, most frequent first.
    pub(crate) reasons: String,
}

impl RefusalLog {
    /// Records a refusal for `reason`. True when it is to be logged in full: the first
    /// `answered` refusal (one with an HTTP answer, whose reason text says most) of the
    /// interval. Otherwise it is counted for the summary.
    pub(crate) fn note(&mut self, now: Instant, reason: &'static str, answered: bool) -> bool {
        self.since.get_or_insert(now);
        if answered && !self.logged_full {
            self.logged_full = true;
            return true;
        }
        match self.counts.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.counts.push((reason, 1)),
        }
        false
    }

    /// Ends the interval if it is over (or `force`, at shutdown): the summary, when any
    /// refusal was not logged in full.
    pub(crate) fn due(&mut self, now: Instant, force: bool) -> Option<Summary> {
        let since = self.since?;
        if !force && now.duration_since(since) < REFUSAL_LOG_EVERY {
            return None;
        }
        let mut counts = std::mem::take(&mut self.counts);
        *self = Self::default();
        if counts.is_empty() {
            return None;
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let more = counts.iter().map(|(_, n)| n).sum();
        let reasons = counts
            .iter()
            .map(|(r, n)| format!("{r}:{n}"))
            .collect::<Vec<_>>()
            .join(" ");
        Some(Summary { more, reasons })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_in_full_per_interval_the_rest_summed_by_reason() {
        let mut log = RefusalLog::default();
        let t = Instant::now();
        // Closed at accept: counted, never in full.
        assert!(!log.note(t, "closed_unread", false));
        assert!(log.note(t, "bad_request", true), "first answered refusal");
        for _ in 0..2999 {
            assert!(!log.note(t, "rate_limited", true));
        }
        assert!(!log.note(t, "bad_request", true));
        assert_eq!(log.due(t + Duration::from_secs(9), false), None, "not yet");
        let s = log.due(t + REFUSAL_LOG_EVERY, false).expect("a summary");
        assert_eq!(s.more, 3001);
        assert_eq!(s.reasons, "rate_limited:2999 bad_request:1 closed_unread:1");
        // A new interval: the next refusal is logged in full again; alone, it needs no summary.
        let t2 = t + Duration::from_secs(30);
        assert!(log.note(t2, "unauthorized", true));
        assert_eq!(log.due(t2 + REFUSAL_LOG_EVERY, false), None);
        // At shutdown what is counted is reported at once.
        assert!(log.note(t2, "unauthorized", true));
        assert!(!log.note(t2, "unauthorized", true));
        let s = log.due(t2, true).expect("forced summary");
        assert_eq!((s.more, s.reasons.as_str()), (1, "unauthorized:1"));
        assert_eq!(log.due(t2, true), None, "nothing left");
    }
}
