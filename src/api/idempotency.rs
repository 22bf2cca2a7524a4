//! Replays of publishes by `Idempotency-Key`: a publish retried with the key of one that was
//! accepted gets the first answer again (the same message ids) and publishes nothing.
//!
//! Keys are scoped by the caller (a project's API key acts in its project's scope, the admin
//! key in its own) and by endpoint, and remembered for [`TTL`], at most [`MAX_KEYS_PER_SCOPE`]
//! per scope (the oldest is forgotten first). Only accepted publishes are remembered: a
//! refused one sent nothing, so its retry publishes.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Caller;

/// How long an accepted publish's answer is remembered.
pub const TTL: Duration = Duration::from_secs(300);
/// Keys one scope remembers; past it the oldest is forgotten.
pub const MAX_KEYS_PER_SCOPE: usize = 10_000;
/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// Which publish endpoint a key was used on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /api/v1/publish`.
    Single,
    /// `POST /api/v1/publish/batch`.
    Batch,
}

/// A remembered answer.
#[derive(Debug, Clone)]
struct Entry {
    at: Instant,
    /// Hash of the request body, to tell a retry from a different publish under the same key.
    fingerprint: u64,
    answer: Bytes,
}

/// One caller's keys, oldest first.
#[derive(Debug, Default)]
struct Scope {
    entries: HashMap<(Endpoint, Box<str>), Entry>,
    order: VecDeque<(Endpoint, Box<str>)>,
}

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The key is new (or forgotten): publish.
    New,
    /// The same body was accepted under this key: answer this again.
    Replay(Bytes),
    /// A different body was accepted under this key.
    Conflict,
}

/// Remembered answers of every caller.
#[derive(Debug, Default)]
pub struct IdempotencyCache {
    scopes: HashMap<Caller, Scope>,
}

/// The fingerprint of a request body.
pub fn fingerprint(body: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    body.hash(&mut h);
    h.finish()
}

/// Checks an `Idempotency-Key` value: 1 to [`MAX_KEY_BYTES`] visible ASCII characters.
///
/// # Errors
/// What is wrong with it.
pub fn parse_key(raw: &[u8]) -> Result<&str, String> {
    if raw.is_empty() || raw.len() > MAX_KEY_BYTES {
        return Err(format!(
            "Idempotency-Key must be 1 to {MAX_KEY_BYTES} characters"
        ));
    }
    if !raw.iter().all(|b| b.is_ascii_graphic()) {
        return Err("Idempotency-Key must be visible ASCII characters (no spaces)".into());
    }
    // Checked above: ASCII only.
    Ok(std::str::from_utf8(raw).expect("ASCII is UTF-8"))
}

impl IdempotencyCache {
    /// What `key` of `who` on `endpoint` holds now.
    pub fn lookup(
        &mut self,
        who: Caller,
        endpoint: Endpoint,
        key: &str,
        fingerprint: u64,
        now: Instant,
    ) -> Lookup {
        let Some(scope) = self.scopes.get_mut(&who) else {
            return Lookup::New;
        };
        scope.expire(now);
        match scope.entries.get(&(endpoint, key.into())) {
            None => Lookup::New,
            Some(e) if e.fingerprint == fingerprint => Lookup::Replay(e.answer.clone()),
            Some(_) => Lookup::Conflict,
        }
    }

    /// Remembers the answer of an accepted publish.
    pub fn remember(
        &mut self,
        who: Caller,
        endpoint: Endpoint,
        key: &str,
        fingerprint: u64,
        answer: Bytes,
        now: Instant,
    ) {
        let scope = self.scopes.entry(who).or_default();
        scope.expire(now);
        while scope.order.len() >= MAX_KEYS_PER_SCOPE {
            if let Some(old) = scope.order.pop_front() {
                scope.entries.remove(&old);
            }
        }
        let k = (endpoint, Box::<str>::from(key));
        let entry = Entry {
            at: now,
            fingerprint,
            answer,
        };
        if scope.entries.insert(k.clone(), entry).is_none() {
            scope.order.push_back(k);
        }
    }
}

impl Scope {
    /// Forgets the keys older than [`TTL`] (they are in age order).
    fn expire(&mut self, now: Instant) {
        while let Some(k) = self.order.front() {
            let old = self
                .entries
                .get(k)
                .is_none_or(|e| now.duration_since(e.at) >= TTL);
            if !old {
                break;
            }
            if let Some(k) = self.order.pop_front() {
                self.entries.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_within_the_window_and_scopes_by_caller_and_endpoint() {
        let mut c = IdempotencyCache::default();
        let t0 = Instant::now();
        let (who, other) = (Caller::Project(1), Caller::Project(2));
        assert_eq!(c.lookup(who, Endpoint::Single, "k", 7, t0), Lookup::New);
        c.remember(who, Endpoint::Single, "k", 7, Bytes::from_static(b"a"), t0);
        let later = t0 + TTL - Duration::from_secs(1);
        assert_eq!(
            c.lookup(who, Endpoint::Single, "k", 7, later),
            Lookup::Replay(Bytes::from_static(b"a"))
        );
        assert_eq!(
            c.lookup(who, Endpoint::Single, "k", 8, later),
            Lookup::Conflict
        );
        assert_eq!(
            c.lookup(other, Endpoint::Single, "k", 7, later),
            Lookup::New
        );
        assert_eq!(c.lookup(who, Endpoint::Batch, "k", 7, later), Lookup::New);
        assert_eq!(
            c.lookup(who, Endpoint::Single, "k", 7, t0 + TTL),
            Lookup::New
        );
    }

    #[test]
    fn a_scope_forgets_its_oldest_key_at_the_cap() {
        let mut c = IdempotencyCache::default();
        let now = Instant::now();
        let who = Caller::Admin;
        for i in 0..=MAX_KEYS_PER_SCOPE {
            c.remember(who, Endpoint::Single, &i.to_string(), 0, Bytes::new(), now);
        }
        assert_eq!(c.lookup(who, Endpoint::Single, "0", 0, now), Lookup::New);
        assert!(matches!(
            c.lookup(who, Endpoint::Single, "1", 0, now),
            Lookup::Replay(_)
        ));
        assert_eq!(c.scopes[&who].entries.len(), MAX_KEYS_PER_SCOPE);
    }

    #[test]
    fn keys_are_visible_ascii_of_bounded_length() {
        assert_eq!(parse_key(b"order-42:retry"), Ok("order-42:retry"));
        assert!(parse_key(b"").is_err());
        assert!(parse_key(b"a b").is_err());
        assert!(parse_key(&[b'a'; MAX_KEY_BYTES + 1]).is_err());
        assert!(parse_key(&[b'a'; MAX_KEY_BYTES]).is_ok());
    }
}
