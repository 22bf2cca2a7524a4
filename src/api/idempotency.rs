//! Replays of publishes by `Idempotency-Key`: a publish retried with the key of one that was
//! accepted gets the first answer again (the same message ids) and publishes nothing.
//!
//! Keys are scoped by the caller (a project's API key acts in its project's scope, the admin
//! key in its own) and by endpoint, and remembered for [`TTL`]; a live key is never forgotten.
//! An answer is kept compact: the message ids' shared prefix and runs of consecutive sequence
//! numbers (a batch is usually one run), plus a hash of the request body for the reuse check.
//! The whole node remembers at most [`MAX_BYTES`] (each key costs [`ENTRY_BYTES`] plus its
//! length plus [`RUN_BYTES`] per run); a new key that would go over it is refused
//! ([`Lookup::Full`], 503 `busy` with `Retry-After`) and nothing is published. Expired keys of
//! every scope are swept, oldest first, whenever a keyed publish arrives. Only accepted
//! publishes are remembered: a refused one sent nothing, so its retry publishes.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Caller;

/// How long an accepted publish's answer is remembered.
pub const TTL: Duration = Duration::from_secs(300);
/// Bytes the whole node spends on remembered keys: about 250,000 keys of 36 characters, the
/// default request rate of one API key (1,000 a second) for 250 of the [`TTL`]'s 300 s.
pub const MAX_BYTES: usize = 64 << 20;
/// What one remembered key costs besides its characters and runs: the map slot, the age
/// record and the key's allocation.
pub const ENTRY_BYTES: usize = 200;
/// What one run of consecutive message ids costs.
pub const RUN_BYTES: usize = 16;
/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// Which publish endpoint a key was used on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /api/v1/publish`: the answer is `{"id":..}`.
    Single,
    /// `POST /api/v1/publish/batch`: the answer is `{"ids":[..]}`.
    Batch,
}

/// Message ids, compactly: `<prefix>-<seq in hex>` for each seq of each run.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ids {
    /// The ids share `prefix`; each run is (first seq, how many).
    Runs {
        prefix: Box<str>,
        runs: Box<[(u64, u64)]>,
    },
    /// Ids of another shape, kept as they are.
    Verbatim(Box<[Box<str>]>),
}

impl Ids {
    fn compact(ids: &[String]) -> Self {
        let mut prefix: Option<&str> = None;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for id in ids {
            let parsed = id.rsplit_once('-').and_then(|(p, hex)| {
                let n = u64::from_str_radix(hex, 16).ok()?;
                // Only ids the rendering gives back byte for byte.
                (format!("{n:x}") == hex && prefix.is_none_or(|q| q == p)).then_some((p, n))
            });
            let Some((p, n)) = parsed else {
                return Self::Verbatim(ids.iter().map(|s| s.as_str().into()).collect());
            };
            prefix = Some(p);
            match runs.last_mut() {
                Some((first, len)) if first.checked_add(*len) == Some(n) => *len += 1,
                _ => runs.push((n, 1)),
            }
        }
        Self::Runs {
            prefix: prefix.unwrap_or_default().into(),
            runs: runs.into(),
        }
    }

    fn expand(&self) -> Vec<String> {
        match self {
            Self::Runs { prefix, runs } => runs
                .iter()
                .flat_map(|&(first, len)| {
                    (first..first + len).map(move |n| format!("{prefix}-{n:x}"))
                })
                .collect(),
            Self::Verbatim(ids) => ids.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Bytes beyond [`ENTRY_BYTES`].
    fn cost(&self) -> usize {
        match self {
            Self::Runs { prefix, runs } => prefix.len() + runs.len() * RUN_BYTES,
            Self::Verbatim(ids) => ids.iter().map(|s| s.len() + RUN_BYTES).sum(),
        }
    }
}

/// The answer body of an accepted publish with these ids.
pub fn answer(endpoint: Endpoint, ids: &[String]) -> Bytes {
    /// Serialised straight from the ids (no intermediate JSON tree).
    #[derive(serde::Serialize)]
    enum Answer<'a> {
        #[serde(rename = "id")]
        One(&'a str),
        #[serde(rename = "ids")]
        Many(&'a [String]),
    }
    let v = match (endpoint, ids) {
        (Endpoint::Single, [id]) => Answer::One(id),
        _ => Answer::Many(ids),
    };
    Bytes::from(serde_json::to_vec(&v).expect("API bodies always serialise"))
}

/// A remembered answer.
#[derive(Debug, Clone)]
struct Entry {
    at: Instant,
    /// Hash of the request body, to tell a retry from a different publish under the same key.
    fingerprint: u64,
    ids: Ids,
    /// What it counts against [`MAX_BYTES`].
    cost: usize,
}

/// A key: its caller, endpoint and characters.
type Key = (Caller, Endpoint, Arc<str>);

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The key is new (or expired), and there is room to remember it: publish.
    New,
    /// The same body was accepted under this key: answer this again.
    Replay(Bytes),
    /// A different body was accepted under this key.
    Conflict,
    /// The key is new but the node remembers all it may: refuse, publishing nothing; the
    /// oldest key expires in this many seconds (at least 1).
    Full {
        /// Seconds until the oldest remembered key expires.
        retry_after_secs: u32,
    },
}

/// Remembered answers of every caller, with one age order across them.
#[derive(Debug)]
pub struct IdempotencyCache {
    entries: HashMap<Key, Entry>,
    /// Every remembered key, oldest first.
    order: VecDeque<(Instant, Key)>,
    /// Sum of the entries' costs.
    nr_bytes: usize,
    /// [`MAX_BYTES`], smaller in tests.
    max_bytes: usize,
    /// When a refusal at the bound was last logged.
    full_logged: Option<Instant>,
}

/// At most one log line per this long about refusals at the bound.
const FULL_LOG_EVERY: Duration = Duration::from_secs(10);

impl Default for IdempotencyCache {
    fn default() -> Self {
        Self::with_max_bytes(MAX_BYTES)
    }
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
    /// A cache that remembers at most `max_bytes` of keys.
    pub fn with_max_bytes(max_bytes: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            nr_bytes: 0,
            max_bytes,
            full_logged: None,
        }
    }

    /// What `key` of `who` on `endpoint` holds now; for a new key, whether an answer of up to
    /// `nr_ids` ids fits. Sweeps the expired keys of every caller first.
    pub fn lookup(
        &mut self,
        who: Caller,
        endpoint: Endpoint,
        key: &str,
        fingerprint: u64,
        nr_ids: usize,
        now: Instant,
    ) -> Lookup {
        self.expire(now);
        match self.entries.get(&(who, endpoint, key.into())) {
            Some(e) if e.fingerprint == fingerprint => {
                Lookup::Replay(answer(endpoint, &e.ids.expand()))
            }
            Some(_) => Lookup::Conflict,
            None if self.nr_bytes + worst_cost(key, nr_ids) > self.max_bytes => {
                let retry_after_secs = self.order.front().map_or(1, |(at, _)| {
                    let left = (*at + TTL).saturating_duration_since(now);
                    left.as_secs_f64().ceil().max(1.0) as u32
                });
                if self
                    .full_logged
                    .is_none_or(|t| now.duration_since(t) >= FULL_LOG_EVERY)
                {
                    self.full_logged = Some(now);
                    tracing::warn!(
                        nr_keys = self.entries.len(),
                        nr_bytes = self.nr_bytes,
                        retry_after_secs,
                        "idempotency keys at their {} MiB bound: new keys are refused (503 busy) \
                         until the oldest expire",
                        self.max_bytes >> 20
                    );
                }
                Lookup::Full { retry_after_secs }
            }
            None => Lookup::New,
        }
    }

    /// Remembers the ids of an accepted publish (looked up as [`Lookup::New`] just before,
    /// under the same lock, with at least `ids.len()` ids).
    pub fn remember(
        &mut self,
        who: Caller,
        endpoint: Endpoint,
        key: &str,
        fingerprint: u64,
        ids: &[String],
        now: Instant,
    ) {
        let ids = Ids::compact(ids);
        let cost = ENTRY_BYTES + key.len() + ids.cost();
        let k: Key = (who, endpoint, key.into());
        let entry = Entry {
            at: now,
            fingerprint,
            ids,
            cost,
        };
        self.nr_bytes += cost;
        if let Some(old) = self.entries.insert(k.clone(), entry) {
            self.nr_bytes -= old.cost;
        }
        self.order.push_back((now, k));
    }

    /// Forgets the keys older than [`TTL`], of every caller (they are in age order).
    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < TTL {
                break;
            }
            let Some((at, k)) = self.order.pop_front() else {
                break;
            };
            // Only the record of the entry as it is now (not of one it replaced).
            if self.entries.get(&k).is_some_and(|e| e.at == at)
                && let Some(e) = self.entries.remove(&k)
            {
                self.nr_bytes -= e.cost;
            }
        }
        if self.order.is_empty() {
            // Give the memory of a past burst back.
            self.entries.shrink_to_fit();
            self.order.shrink_to_fit();
        }
    }
}

/// The most a key of `nr_ids` ids can cost: every id its own run.
fn worst_cost(key: &str, nr_ids: usize) -> usize {
    const MAX_PREFIX_BYTES: usize = 32;
    ENTRY_BYTES + key.len() + MAX_PREFIX_BYTES + nr_ids * RUN_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids as the hub makes them.
    fn ids(from: u64, n: u64) -> Vec<String> {
        (from..from + n)
            .map(|i| format!("19ad4f3c000-{i:x}"))
            .collect()
    }

    #[test]
    fn replays_within_the_window_and_scopes_by_caller_and_endpoint() {
        let mut c = IdempotencyCache::default();
        let t0 = Instant::now();
        let (who, other) = (Caller::Project(1), Caller::Project(2));
        assert_eq!(c.lookup(who, Endpoint::Single, "k", 7, 1, t0), Lookup::New);
        c.remember(who, Endpoint::Single, "k", 7, &ids(5, 1), t0);
        let later = t0 + TTL - Duration::from_secs(1);
        assert_eq!(
            c.lookup(who, Endpoint::Single, "k", 7, 1, later),
            Lookup::Replay(Bytes::from_static(b"{\"id\":\"19ad4f3c000-5\"}"))
        );
        assert_eq!(
            c.lookup(who, Endpoint::Single, "k", 8, 1, later),
            Lookup::Conflict
        );
        assert_eq!(
            c.lookup(other, Endpoint::Single, "k", 7, 1, later),
            Lookup::New
        );
        assert_eq!(
            c.lookup(who, Endpoint::Batch, "k", 7, 1, later),
            Lookup::New
        );
        assert_eq!(
            c.lookup(who, Endpoint::Single, "k", 7, 1, t0 + TTL),
            Lookup::New
        );
    }

    #[test]
    fn a_replayed_answer_is_the_first_answer_byte_for_byte() {
        let mut c = IdempotencyCache::default();
        let now = Instant::now();
        let who = Caller::Admin;
        // Two runs (another publish took seq 0x10 in between), and ids of another shape.
        let mut a = ids(0x0e, 2);
        a.extend(ids(0x11, 3));
        let b = vec!["x".to_owned(), "y-zz".to_owned()];
        for (key, ids) in [("a", &a), ("b", &b)] {
            c.remember(who, Endpoint::Batch, key, 1, ids, now);
            assert_eq!(
                c.lookup(who, Endpoint::Batch, key, 1, ids.len(), now),
                Lookup::Replay(answer(Endpoint::Batch, ids))
            );
        }
        assert_eq!(
            answer(Endpoint::Batch, &a),
            serde_json::to_vec(&serde_json::json!({ "ids": a })).unwrap()
        );
    }

    /// At 1,000 keyed publishes a second, a key is still remembered 11 s (and 299 s) later.
    #[test]
    fn a_key_is_remembered_for_the_whole_window_at_the_default_rate() {
        let mut c = IdempotencyCache::default();
        let t0 = Instant::now();
        let who = Caller::Project(1);
        c.remember(who, Endpoint::Single, "order-1", 7, &ids(0, 1), t0);
        for i in 0..250_000u64 {
            let at = t0 + Duration::from_micros(1000 * i);
            let key = format!("{i:036}");
            assert_eq!(c.lookup(who, Endpoint::Single, &key, 0, 1, at), Lookup::New);
            c.remember(who, Endpoint::Single, &key, 0, &ids(i + 1, 1), at);
        }
        for after in [11, 299] {
            assert!(matches!(
                c.lookup(
                    who,
                    Endpoint::Single,
                    "order-1",
                    7,
                    1,
                    t0 + Duration::from_secs(after)
                ),
                Lookup::Replay(_)
            ));
        }
    }

    /// 10,000 batch answers of 1,000 ids under the longest keys cost a few MiB, not the
    /// 190 MiB their JSON would.
    #[test]
    fn batch_answers_are_kept_compact() {
        let mut c = IdempotencyCache::default();
        let now = Instant::now();
        let who = Caller::Project(1);
        let key = "k".repeat(MAX_KEY_BYTES - 8);
        for i in 0..10_000u64 {
            let key = format!("{key}{i:08}");
            assert_eq!(
                c.lookup(who, Endpoint::Batch, &key, 0, 1000, now),
                Lookup::New
            );
            c.remember(who, Endpoint::Batch, &key, 0, &ids(1000 * i, 1000), now);
        }
        assert_eq!(c.entries.len(), 10_000);
        assert!(c.nr_bytes < 5 << 20, "{} bytes", c.nr_bytes);
    }

    /// At the byte bound a new key is refused until the oldest expires; a live key is never
    /// forgotten to make room.
    #[test]
    fn a_full_cache_refuses_new_keys_and_keeps_the_live_ones() {
        let per_key = ENTRY_BYTES + 2 + 32 + RUN_BYTES;
        let mut c = IdempotencyCache::with_max_bytes(10 * per_key);
        let t0 = Instant::now();
        let who = Caller::Project(1);
        let mut nr = 0;
        loop {
            let at = t0 + Duration::from_secs(nr);
            let key = format!("{nr:02}");
            match c.lookup(who, Endpoint::Single, &key, 0, 1, at) {
                Lookup::New => c.remember(who, Endpoint::Single, &key, 0, &ids(nr, 1), at),
                Lookup::Full { retry_after_secs } => {
                    // The first key, remembered at t0, expires at t0 + TTL.
                    assert_eq!(u64::from(retry_after_secs), TTL.as_secs() - nr);
                    break;
                }
                other => panic!("{other:?}"),
            }
            nr += 1;
        }
        assert!(nr >= 10, "{nr} keys fit");
        let at = t0 + Duration::from_secs(nr);
        for i in 0..nr {
            assert!(matches!(
                c.lookup(who, Endpoint::Single, &format!("{i:02}"), 0, 1, at),
                Lookup::Replay(_)
            ));
        }
        // Once the first expires, a new key fits again.
        assert_eq!(
            c.lookup(Caller::Admin, Endpoint::Single, "zz", 0, 1, t0 + TTL),
            Lookup::New
        );
    }

    /// Any keyed publish sweeps the expired keys of every caller (a deleted project's too).
    #[test]
    fn expired_keys_of_every_scope_are_swept() {
        let mut c = IdempotencyCache::default();
        let t0 = Instant::now();
        for p in 0..100 {
            c.remember(Caller::Project(p), Endpoint::Single, "k", 0, &ids(0, 1), t0);
        }
        assert_eq!(c.entries.len(), 100);
        let later = t0 + TTL;
        assert_eq!(
            c.lookup(Caller::Admin, Endpoint::Batch, "other", 0, 1, later),
            Lookup::New
        );
        assert!(c.entries.is_empty() && c.order.is_empty());
        assert_eq!(c.nr_bytes, 0);
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
