//! Measurements that cross process boundaries: HDR histograms (serialised as V2 + base64 so
//! workers can ship them to the parent, which adds them up) and counters by reason.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

/// Highest value a histogram records, in microseconds (one hour); larger values saturate.
const MAX_US: u64 = 3_600_000_000;

/// A new latency histogram in microseconds with 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant figures: fixed bounds, so construction cannot fail.
    Histogram::new_with_bounds(1, MAX_US, 3).expect("constant histogram bounds are valid")
}

/// Records `ns` nanoseconds as microseconds (at least 1).
pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record((ns / 1000).max(1));
}

/// A histogram in transit: HDR V2 encoding, base64.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct HistB64(pub String);

impl HistB64 {
    /// Encodes a histogram.
    pub fn encode(h: &Histogram<u64>) -> Self {
        let mut buf = Vec::new();
        // Writing to a Vec cannot fail; V2 fails only on histograms it cannot represent,
        // which ours (u64 counts, fixed bounds) always are.
        V2Serializer::new()
            .serialize(h, &mut buf)
            .expect("V2 serialisation into a Vec");
        Self(STANDARD.encode(buf))
    }

    /// Decodes a histogram.
    ///
    /// # Errors
    /// Bad base64 or a bad V2 payload.
    pub fn decode(&self) -> Result<Histogram<u64>> {
        if self.0.is_empty() {
            return Ok(new_hist());
        }
        let bytes = STANDARD.decode(&self.0).context("histogram base64")?;
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| anyhow::anyhow!("histogram V2 payload: {e:?}"))?;
        Ok(h)
    }
}

/// Adds `other` into `into`, widening nothing (same bounds everywhere).
pub fn merge(into: &mut Histogram<u64>, other: &Histogram<u64>) {
    // Both come from `new_hist` (same bounds), or `other` was auto-sized by the decoder
    // within the same bounds: adding cannot overflow the range.
    if into.add(other).is_err() {
        for v in other.iter_recorded() {
            into.saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
    }
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Summary {
    /// Number of samples.
    pub count: u64,
    /// Smallest sample.
    pub min_us: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest sample.
    pub max_us: u64,
}

impl Summary {
    /// Summarises `h` (all zeros when empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            min_us: h.min(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// Counts by reason (failure kinds, close codes...). Ordered, so output is stable.
pub type Counts = BTreeMap<String, u64>;

/// Adds `other` into `into`.
pub fn add_counts(into: &mut Counts, other: &Counts) {
    for (k, v) in other {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// Sum of all counts.
pub fn total(c: &Counts) -> u64 {
    c.values().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_round_trip_and_merge() {
        let mut a = new_hist();
        let mut b = new_hist();
        for v in 1..=1000 {
            a.record(v).unwrap();
            b.record(v * 1000).unwrap();
        }
        let a2 = HistB64::encode(&a).decode().unwrap();
        assert_eq!(a2.len(), 1000);
        let mut m = new_hist();
        merge(&mut m, &a2);
        merge(&mut m, &HistB64::encode(&b).decode().unwrap());
        assert_eq!(m.len(), 2000);
        assert!(m.max() >= 999_000);
        assert_eq!(HistB64::default().decode().unwrap().len(), 0);
    }
}
