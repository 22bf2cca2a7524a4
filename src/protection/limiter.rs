//! Token-bucket rate limits keyed by source address (handshakes, per shard) or by API key, kept
//! in a map bounded by a cap (at the cap the oldest entry is evicted, so an attacker rotating
//! addresses cannot grow it).

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use hashbrown::{DefaultHashBuilder, HashMap};

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by `K`, at most `cap` of them.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: f64,
    burst: f64,
    cap: usize,
    buckets: HashMap<K, Bucket>,
    /// Insertion order, for eviction at the cap (same keys as `buckets`).
    order: VecDeque<K>,
}

/// Handshake token buckets of one shard, by source address.
pub type HandshakeLimiter = RateLimiter<IpAddr>;

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `rate` handshakes per second, `burst` at once, at most `cap` addresses remembered;
    /// `rate == 0` turns the limiter off.
    pub fn new(rate: u32, burst: u32, cap: usize) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            cap: cap.max(1),
            buckets: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Addresses remembered now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no address is remembered.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Whether the limiter is on (a rate of 0 turns it off).
    pub fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    /// Takes one token for `key`: `Ok` when allowed, else the seconds until one is available.
    ///
    /// # Errors
    /// Seconds to wait (at least 1), for `Retry-After`.
    pub fn take(&mut self, key: K, now: Instant) -> Result<(), u32> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        if let Some(b) = self.buckets.get_mut(&key) {
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
            b.at = now;
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                return Ok(());
            }
            let wait = ((1.0 - b.tokens) / self.rate).ceil().max(1.0);
            return Err(wait.min(f64::from(u32::MAX)) as u32);
        }
        while self.buckets.len() >= self.cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.buckets.remove(&old);
        }
        self.buckets.insert(
            key.clone(),
            Bucket {
                tokens: self.burst - 1.0,
                at: now,
            },
        );
        self.order.push_back(key);
        Ok(())
    }
}

/// Whether `count` is at or above 90% of `cap` (0 = no cap).
pub fn near_cap(count: usize, cap: usize) -> bool {
    cap > 0 && count.saturating_mul(10) >= cap.saturating_mul(9)
}

/// Whether a count just rose to 90% of its cap and the warning is due: true once per rise,
/// re-armed by [`cap_fell`] when the count drops below 80% (so a count hovering at 90% does
/// not repeat the warning).
pub fn cap_rose(count: usize, cap: usize, warned: &AtomicBool) -> bool {
    near_cap(count, cap) && !warned.swap(true, Ordering::Relaxed)
}

/// Re-arms the 90% warning once a count is below 80% of its cap; true when it re-armed.
pub fn cap_fell(count: usize, cap: usize, warned: &AtomicBool) -> bool {
    cap > 0
        && count.saturating_mul(10) < cap.saturating_mul(8)
        && warned.load(Ordering::Relaxed)
        && warned.swap(false, Ordering::Relaxed)
}

/// The key per-address limits count by: an IPv4 address (also when IPv4-mapped), or an IPv6
/// address's /64 network (one host is usually given a whole /64, so counting single IPv6
/// addresses would let one host multiply its allowance).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (!0u128 << 64))),
        },
    }
}

/// Concurrent connections per client address across the node, handshakes included, and the
/// handshakes in progress among them: striped maps touched on connect, at the end of the
/// handshake and on close only (never per message). An entry exists only while its address
/// has connections, so the maps are bounded by the connections themselves.
pub struct ConnCounter {
    /// Connections an address may hold; over it the handshake is refused (0 = off).
    limit: u32,
    /// Connections an address may have open or in handshake at all; beyond it a socket is
    /// closed at accept.
    ceiling: u32,
    /// Handshakes in progress an address may hold; beyond it a socket is closed at accept
    /// (0 = off).
    pending_limit: u32,
    stripes: Box<[Mutex<HashMap<IpAddr, Held>>]>,
    hasher: DefaultHashBuilder,
}

/// What one address holds.
#[derive(Debug, Clone, Copy, Default)]
struct Held {
    /// Connections, handshakes included (counted while the connection limit is on).
    conns: u32,
    /// Handshakes in progress (counted while the pending limit is on).
    pending: u32,
}

/// Why [`ConnCounter::admit`] refused a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressFull {
    /// The address holds `connections_per_ip + handshake_burst_per_ip` sockets.
    Ceiling,
    /// The address holds `max_pending_handshakes_per_ip` handshakes in progress.
    Pending,
}

/// Stripes of the connection counter (a power of two).
const STRIPES: usize = 64;

impl ConnCounter {
    /// `limit` connections per address (0 = off); `slack` more may be accepted and read so
    /// they can be answered 429; at most `pending_limit` handshakes in progress per address
    /// (0 = off).
    pub fn new(limit: u32, slack: u32, pending_limit: u32) -> Self {
        Self {
            limit,
            ceiling: limit.saturating_add(slack),
            pending_limit,
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            hasher: DefaultHashBuilder::default(),
        }
    }

    /// Whether the connection limit is on.
    pub fn enabled(&self) -> bool {
        self.limit > 0
    }

    /// The configured limit (0 = off).
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Whether anything is counted at all.
    fn counting(&self) -> bool {
        self.limit > 0 || self.pending_limit > 0
    }

    fn stripe(&self, key: &IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Held>> {
        let i = self.hasher.hash_one(key) as usize & (STRIPES - 1);
        self.stripes[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a new socket from `ip`, in handshake. Refused (not counted) when the address is
    /// at its connection ceiling or at its pending-handshake limit; else whether it is now
    /// over the connection limit (the handshake is to be refused).
    ///
    /// # Errors
    /// The address is full: the socket is to be closed unread.
    pub fn admit(&self, ip: IpAddr) -> Result<bool, AddressFull> {
        self.count_in(ip, self.ceiling, self.pending_limit)
    }

    /// Counts a socket from `ip`, in handshake, even at the ceilings (its request has been
    /// read already or is being read: a client named by a trusted proxy). Whether it is now
    /// over the connection limit.
    pub fn admit_always(&self, ip: IpAddr) -> bool {
        self.count_in(ip, u32::MAX, u32::MAX).unwrap_or(true)
    }

    fn count_in(
        &self,
        ip: IpAddr,
        ceiling: u32,
        pending_ceiling: u32,
    ) -> Result<bool, AddressFull> {
        if !self.counting() {
            return Ok(false);
        }
        let key = client_key(ip);
        let mut map = self.stripe(&key);
        let held = map.get(&key).copied().unwrap_or_default();
        if self.limit > 0 && held.conns >= ceiling {
            return Err(AddressFull::Ceiling);
        }
        if self.pending_limit > 0 && held.pending >= pending_ceiling {
            return Err(AddressFull::Pending);
        }
        let n = map.entry(key).or_default();
        if self.limit > 0 {
            n.conns += 1;
        }
        if self.pending_limit > 0 {
            n.pending += 1;
        }
        Ok(self.limit > 0 && n.conns > self.limit)
    }

    /// Connections counted for `ip`.
    pub fn count(&self, ip: IpAddr) -> u32 {
        let key = client_key(ip);
        self.stripe(&key).get(&key).map_or(0, |h| h.conns)
    }

    /// Handshakes in progress counted for `ip`.
    pub fn pending(&self, ip: IpAddr) -> u32 {
        let key = client_key(ip);
        self.stripe(&key).get(&key).map_or(0, |h| h.pending)
    }

    /// A socket counted by [`ConnCounter::admit`] finished its handshake (opened or refused).
    pub fn handshake_over(&self, ip: IpAddr) {
        self.uncount(ip, false, true);
    }

    /// Uncounts a socket counted by [`ConnCounter::admit`]; `in_handshake`: its handshake
    /// had not finished.
    pub fn release(&self, ip: IpAddr, in_handshake: bool) {
        self.uncount(ip, true, in_handshake);
    }

    fn uncount(&self, ip: IpAddr, conn: bool, pending: bool) {
        if !self.counting() {
            return;
        }
        let key = client_key(ip);
        let mut map = self.stripe(&key);
        if let Some(n) = map.get_mut(&key) {
            if conn {
                n.conns = n.conns.saturating_sub(1);
            }
            if pending {
                n.pending = n.pending.saturating_sub(1);
            }
            if n.conns == 0 && n.pending == 0 {
                map.remove(&key);
            }
        }
    }

    /// Addresses with connections now.
    pub fn addresses(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum()
    }
}

impl std::fmt::Debug for ConnCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnCounter")
            .field("limit", &self.limit)
            .field("ceiling", &self.ceiling)
            .field("pending_limit", &self.pending_limit)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let mut l = HandshakeLimiter::new(2, 3, 100);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t = Instant::now();
        for _ in 0..3 {
            l.take(ip, t).unwrap();
        }
        assert_eq!(l.take(ip, t), Err(1));
        // Another address is unaffected.
        l.take("10.0.0.2".parse().unwrap(), t).unwrap();
        // Half a second refills one token at 2/s.
        l.take(ip, t + Duration::from_millis(500)).unwrap();
        assert!(l.take(ip, t + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn map_is_bounded() {
        let mut l = HandshakeLimiter::new(1, 1, 16);
        let t = Instant::now();
        for i in 0..10_000u32 {
            l.take(IpAddr::from(i.to_be_bytes()), t).unwrap();
            assert!(l.len() <= 16);
        }
        assert_eq!(l.order.len(), l.len());
    }

    #[test]
    fn zero_rate_is_off() {
        let mut l = HandshakeLimiter::new(0, 1, 1);
        let ip: IpAddr = "::1".parse().unwrap();
        for _ in 0..100 {
            l.take(ip, Instant::now()).unwrap();
        }
        assert!(l.is_empty());
    }

    #[test]
    fn connection_counter_limits_ceiling_and_frees() {
        let c = ConnCounter::new(2, 1, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(c.admit(a), Ok(false));
        assert_eq!(c.admit(a), Ok(false));
        // Third: counted (it will be answered 429), over the limit.
        assert_eq!(c.admit(a), Ok(true));
        assert_eq!(c.count(a), 3);
        // Fourth: at the ceiling, not counted.
        assert_eq!(c.admit(a), Err(AddressFull::Ceiling));
        assert_eq!(c.count(a), 3);
        // Other addresses are independent.
        assert_eq!(c.admit("10.0.0.2".parse().unwrap()), Ok(false));
        c.release(a, true);
        assert_eq!(c.count(a), 2);
        c.release(a, false);
        c.release(a, false);
        c.release("10.0.0.2".parse().unwrap(), true);
        assert_eq!(c.addresses(), 0, "entries go with their last connection");
    }

    #[test]
    fn ipv6_counts_by_slash_64_and_mapped_v4_as_v4() {
        let c = ConnCounter::new(1, 0, 0);
        assert_eq!(c.admit("2001:db8:1:2::1".parse().unwrap()), Ok(false));
        let full = Err(AddressFull::Ceiling);
        assert_eq!(c.admit("2001:db8:1:2::ffff".parse().unwrap()), full);
        assert_eq!(c.admit("2001:db8:1:3::1".parse().unwrap()), Ok(false));
        assert_eq!(c.admit("10.1.1.1".parse().unwrap()), Ok(false));
        assert_eq!(c.admit("::ffff:10.1.1.1".parse().unwrap()), full);
    }

    #[test]
    fn cap_warning_fires_once_per_rise_with_hysteresis() {
        let w = AtomicBool::new(false);
        assert!(!cap_rose(89, 100, &w));
        assert!(cap_rose(90, 100, &w));
        assert!(!cap_rose(91, 100, &w), "once per rise");
        assert!(!cap_fell(85, 100, &w), "85% does not re-arm");
        assert!(!cap_rose(90, 100, &w));
        assert!(cap_fell(79, 100, &w));
        assert!(cap_rose(90, 100, &w), "re-armed");
        assert!(!cap_rose(1_000_000, 0, &w), "no cap, no warning");
        assert!(near_cap(9, 10) && !near_cap(8, 10) && !near_cap(5, 0));
    }

    #[test]
    fn zero_limit_counts_nothing() {
        let c = ConnCounter::new(0, 100, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..1000 {
            assert_eq!(c.admit(a), Ok(false));
        }
        assert_eq!(c.addresses(), 0);
    }

    #[test]
    fn pending_handshakes_per_address_are_bounded_and_freed() {
        // Pending limit on, connection limit off.
        let c = ConnCounter::new(0, 0, 2);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::2".parse().unwrap();
        assert_eq!(c.admit(a), Ok(false));
        assert_eq!(c.admit(same_64), Ok(false));
        assert_eq!(
            c.admit(a),
            Err(AddressFull::Pending),
            "one /64 is one address"
        );
        assert_eq!(c.admit("2001:db8:0:1::1".parse().unwrap()), Ok(false));
        // A finished handshake frees its pending slot; the connection is not counted.
        c.handshake_over(a);
        assert_eq!((c.pending(a), c.count(a)), (1, 0));
        assert_eq!(c.admit(a), Ok(false));
        // Both on: a socket still in handshake at close gives back both counts.
        let c = ConnCounter::new(5, 0, 1);
        assert_eq!(c.admit(a), Ok(false));
        assert_eq!(c.admit(a), Err(AddressFull::Pending));
        c.handshake_over(a);
        assert_eq!(c.admit(a), Ok(false));
        assert_eq!((c.pending(a), c.count(a)), (1, 2));
        c.release(a, true);
        c.release(a, false);
        assert_eq!(c.addresses(), 0, "entries go with their last socket");
    }
}
