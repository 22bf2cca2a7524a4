//! API requests per key: one token bucket per authenticated key (a project's API key counts
//! under its project id, the admin key under its own entry), taken after authentication so
//! an unauthenticated request costs no key anything. Over the rate the request is answered
//! 429 `rate_limited` with `Retry-After`.
//!
//! The state is one [`RateLimiter`] behind a mutex held only for the take. It owns no I/O and
//! no clock: the caller passes `now`, so the logic is tested without sleeps.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hashbrown::HashMap;

use crate::protection::limiter::RateLimiter;

/// Keys remembered at most. Only authenticated keys get an entry (a project key or the admin
/// key), so this is reached only by a node with more projects than this; at the cap the
/// oldest entry is forgotten (its next request starts a full bucket).
pub const MAX_KEYS: usize = 4096;

/// At most one refusal log line per key per this interval; the refusals in between are
/// counted and reported on the next line.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Whose bucket a request takes from. Never the key itself, so it can be logged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyId {
    /// The admin key (cannot collide with a project: it is a separate variant).
    Admin,
    /// A project's API key, by project id.
    Project(Arc<str>),
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Admin => f.write_str("admin"),
            Self::Project(id) => write!(f, "project `{id}`"),
        }
    }
}

/// A refusal: what to answer and whether to log it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// Seconds until a token is back (at least 1), for `Retry-After`.
    pub retry_after_secs: u32,
    /// `Some(n)` when this refusal is to be logged, `n` being the refusals of the same key
    /// not logged since its previous line; `None` to stay quiet.
    pub log: Option<u64>,
}

/// When a key's refusals were last logged, and how many were not logged since.
#[derive(Debug, Clone, Copy)]
struct LogState {
    at: Instant,
    suppressed: u64,
}

#[derive(Debug)]
struct Inner {
    buckets: RateLimiter<KeyId>,
    /// Refusal log state of keys refused lately; bounded like `buckets` (cleared of entries
    /// older than [`LOG_INTERVAL`] at [`MAX_KEYS`]).
    logged: HashMap<KeyId, LogState>,
}

/// Token buckets of the API keys.
#[derive(Debug)]
pub struct KeyLimiter {
    rate: u32,
    burst: u32,
    inner: Mutex<Inner>,
}

impl KeyLimiter {
    /// `rate` requests per second per key, `burst` at once; `rate == 0` turns it off.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate,
            burst,
            inner: Mutex::new(Inner {
                buckets: RateLimiter::new(rate, burst, MAX_KEYS),
                logged: HashMap::new(),
            }),
        }
    }

    /// Whether the limit is on.
    pub fn enabled(&self) -> bool {
        self.rate > 0
    }

    /// Requests per second per key (0 = off).
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Requests at once per key.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Takes one request's token from `key`'s bucket.
    ///
    /// # Errors
    /// The key is over its rate: the [`Refusal`] says when to retry and whether to log.
    pub fn take(&self, key: &KeyId, now: Instant) -> Result<(), Refusal> {
        if !self.enabled() {
            return Ok(());
        }
        // A panic while holding the lock leaves at worst one bucket a token off.
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let retry_after_secs = match inner.buckets.take(key.clone(), now) {
            Ok(()) => return Ok(()),
            Err(secs) => secs,
        };
        let due = |s: &LogState| now.saturating_duration_since(s.at) >= LOG_INTERVAL;
        let log = match inner.logged.get_mut(key) {
            Some(s) if due(s) => {
                let n = s.suppressed;
                *s = LogState {
                    at: now,
                    suppressed: 0,
                };
                Some(n)
            }
            Some(s) => {
                s.suppressed += 1;
                None
            }
            None => {
                if inner.logged.len() >= MAX_KEYS {
                    inner.logged.retain(|_, s| !due(s));
                    if inner.logged.len() >= MAX_KEYS {
                        inner.logged.clear();
                    }
                }
                inner.logged.insert(
                    key.clone(),
                    LogState {
                        at: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        };
        Err(Refusal {
            retry_after_secs,
            log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(id: &str) -> KeyId {
        KeyId::Project(id.into())
    }

    #[test]
    fn each_key_has_its_own_bucket() {
        let l = KeyLimiter::new(1, 3);
        let t = Instant::now();
        let shop = project("shop");
        for _ in 0..3 {
            l.take(&shop, t).unwrap();
        }
        let r = l.take(&shop, t).unwrap_err();
        assert_eq!(r.retry_after_secs, 1);
        // Another project and the admin key are unaffected.
        l.take(&project("blog"), t).unwrap();
        for _ in 0..3 {
            l.take(&KeyId::Admin, t).unwrap();
        }
        assert!(l.take(&KeyId::Admin, t).is_err());
        // One second refills one token at 1/s.
        let later = t + Duration::from_millis(1100);
        l.take(&shop, later).unwrap();
        assert!(l.take(&shop, later).is_err());
    }

    #[test]
    fn admin_does_not_collide_with_a_project_named_admin() {
        let l = KeyLimiter::new(1, 1);
        let t = Instant::now();
        l.take(&KeyId::Admin, t).unwrap();
        l.take(&project("admin"), t).unwrap();
        assert_eq!(KeyId::Admin.to_string(), "admin");
        assert_eq!(project("admin").to_string(), "project `admin`");
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let l = KeyLimiter::new(1, 1);
        let t = Instant::now();
        let k = project("shop");
        l.take(&k, t).unwrap();
        // 0.8 s to the next token rounds up to 1.
        let r = l.take(&k, t + Duration::from_millis(200)).unwrap_err();
        assert_eq!(r.retry_after_secs, 1);
    }

    #[test]
    fn refusals_are_logged_once_per_key_per_interval_with_the_count_in_between() {
        let l = KeyLimiter::new(1, 1);
        let t = Instant::now();
        let (shop, blog) = (project("shop"), project("blog"));
        l.take(&shop, t).unwrap();
        l.take(&blog, t).unwrap();
        assert_eq!(
            l.take(&shop, t).unwrap_err().log,
            Some(0),
            "first refusal logs"
        );
        for _ in 0..5 {
            assert_eq!(l.take(&shop, t).unwrap_err().log, None, "then quiet");
        }
        // Another key logs its own first refusal.
        assert_eq!(l.take(&blog, t).unwrap_err().log, Some(0));
        // A second on, the next refusal logs again with what was suppressed. (The bucket
        // has refilled one token: take it first.)
        let later = t + LOG_INTERVAL;
        l.take(&shop, later).unwrap();
        assert_eq!(l.take(&shop, later).unwrap_err().log, Some(5));
        assert_eq!(l.take(&shop, later).unwrap_err().log, None);
    }

    #[test]
    fn zero_rate_is_off_and_remembers_nothing() {
        let l = KeyLimiter::new(0, 1);
        assert!(!l.enabled());
        let t = Instant::now();
        for _ in 0..100 {
            l.take(&KeyId::Admin, t).unwrap();
        }
        assert!(l.inner.lock().unwrap().buckets.is_empty());
    }

    #[test]
    fn maps_stay_bounded() {
        let l = KeyLimiter::new(1, 1);
        let t = Instant::now();
        for i in 0..(2 * MAX_KEYS) {
            let k = project(&format!("p{i}"));
            l.take(&k, t).unwrap();
            let _ = l.take(&k, t).unwrap_err();
        }
        let inner = l.inner.lock().unwrap();
        assert!(inner.buckets.len() <= MAX_KEYS);
        assert!(inner.logged.len() <= MAX_KEYS);
    }
}
