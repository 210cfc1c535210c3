//! A count/total/min/max plus an HDR histogram for percentiles.

use hdrhistogram::Histogram;

/// Distribution of a non-negative quantity (nanoseconds, or entries per call).
#[derive(Clone, Debug)]
pub struct Latency {
    hist: Histogram<u64>,
    total: u64,
    min: u64,
    max: u64,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            // 2 significant digits, auto-resizing: ~1% error on percentiles, tiny footprint.
            hist: Histogram::new(2).unwrap_or_else(|_| unreachable_hist()),
            total: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

fn unreachable_hist() -> Histogram<u64> {
    // `Histogram::new(2)` only fails for sigfig > 5; keep a fallback anyway.
    Histogram::new_with_bounds(1, u64::MAX / 2, 2).unwrap_or_else(|_| std::process::abort())
}

impl Latency {
    /// Records one value.
    pub fn record(&mut self, v: u64) {
        let _ = self.hist.record(v.max(1));
        self.total = self.total.saturating_add(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Adds another distribution.
    pub fn merge(&mut self, o: &Latency) {
        let _ = self.hist.add(&o.hist);
        self.total = self.total.saturating_add(o.total);
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    /// What was recorded after `earlier` (a snapshot of this same distribution). Min and
    /// max of the interval come from the histogram (within its 1% precision).
    pub fn since(&self, earlier: &Latency) -> Latency {
        let mut hist = self.hist.clone();
        if hist.subtract(&earlier.hist).is_err() {
            return self.clone();
        }
        let empty = hist.is_empty();
        let max = if empty { 0 } else { hist.max().min(self.max) };
        Latency {
            total: self.total.saturating_sub(earlier.total),
            // The histogram holds a 0 as 1: never above the max (an interval of zeros).
            min: if empty {
                u64::MAX
            } else {
                hist.min().max(self.min).min(max)
            },
            max,
            hist,
        }
    }

    /// Number of values.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }
    /// Sum of values.
    pub fn total(&self) -> u64 {
        self.total
    }
    /// Smallest value (0 when empty).
    pub fn min(&self) -> u64 {
        if self.count() == 0 {
            0
        } else {
            self.min
        }
    }
    /// Largest value.
    pub fn max(&self) -> u64 {
        self.max
    }
    /// Integer mean (0 when empty).
    pub fn mean(&self) -> u64 {
        self.total.checked_div(self.count()).unwrap_or(0)
    }
    /// Value at quantile `q` in 0..=1, clamped into [min, max].
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count() == 0 {
            return 0;
        }
        let max = self.max;
        self.hist
            .value_at_quantile(q)
            .clamp(self.min().min(max), max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_of_zeros_has_a_minimum_not_above_its_maximum() {
        let mut l = Latency::default();
        l.record(0);
        let earlier = l.clone();
        l.record(0);
        l.record(0);
        let d = l.since(&earlier);
        assert_eq!((d.count(), d.min(), d.max()), (2, 0, 0));
        assert_eq!(d.quantile(0.5), 0);
        assert_eq!(d.quantile(0.99), 0);
    }
}
