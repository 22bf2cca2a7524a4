//! Per-shard, per-source-IP handshake limits: a token bucket of handshakes per address, kept in
//! a map bounded by `limits.limiter_max_ips` (at the cap the oldest entry is evicted, so an
//! attacker rotating addresses cannot grow it), and a count of open connections per address.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Instant;

use hashbrown::HashMap;

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Handshake token buckets of one shard.
#[derive(Debug)]
pub struct HandshakeLimiter {
    rate: f64,
    burst: f64,
    cap: usize,
    buckets: HashMap<IpAddr, Bucket>,
    /// Insertion order, for eviction at the cap (same keys as `buckets`).
    order: VecDeque<IpAddr>,
}

impl HandshakeLimiter {
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

    /// Takes one token for `ip`: `Ok` when allowed, else the seconds until one is available.
    ///
    /// # Errors
    /// Seconds to wait (at least 1), for `Retry-After`.
    pub fn take(&mut self, ip: IpAddr, now: Instant) -> Result<(), u32> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        if let Some(b) = self.buckets.get_mut(&ip) {
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
            ip,
            Bucket {
                tokens: self.burst - 1.0,
                at: now,
            },
        );
        self.order.push_back(ip);
        Ok(())
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
}
