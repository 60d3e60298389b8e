//! Percentiles of latency samples and median [min–max] summaries over rounds.

use std::time::Duration;

/// Most latency samples one measurement keeps (later ones are counted but not stored).
pub const MAX_SAMPLES: usize = 2_000_000;

/// Latency samples with a hard bound on memory.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    values: Vec<f64>,
    /// Samples seen, including those not stored after [`MAX_SAMPLES`].
    pub seen: u64,
}

impl Samples {
    /// Records one sample.
    pub fn push(&mut self, v: f64) {
        self.seen += 1;
        if self.values.len() < MAX_SAMPLES {
            self.values.push(v);
        }
    }

    /// Records a duration in microseconds.
    pub fn push_us(&mut self, d: Duration) {
        self.push(d.as_secs_f64() * 1e6);
    }

    /// Appends all samples of `other`.
    pub fn merge(&mut self, other: Samples) {
        self.seen += other.seen;
        let room = MAX_SAMPLES.saturating_sub(self.values.len());
        self.values.extend(other.values.into_iter().take(room));
    }

    /// Number of stored samples.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no sample was stored.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The `q`-th percentile (0–100) by linear interpolation; `None` without samples.
    pub fn percentile(&mut self, q: f64) -> Option<f64> {
        self.values.sort_by(f64::total_cmp);
        percentile_sorted(&self.values, q)
    }
}

/// Percentile of sorted values by linear interpolation between the closest ranks.
pub fn percentile_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let k = last as f64 * q.clamp(0.0, 100.0) / 100.0;
    let lo = k.floor() as usize;
    let hi = (lo + 1).min(last);
    let (a, b) = (*sorted.get(lo)?, *sorted.get(hi)?);
    Some(a + (b - a) * (k - lo as f64))
}

/// Median, minimum and maximum of the per-round values of one metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Median over rounds.
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Number of rounds with a value.
    pub n: usize,
}

impl Summary {
    /// Summarizes `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        Some(Self {
            median: percentile_sorted(&v, 50.0)?,
            min: *v.first()?,
            max: *v.last()?,
            n: v.len(),
        })
    }
}

/// Formats `v` with a precision that suits its magnitude (3 significant digits, at least 0
/// decimals for large values).
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else if a >= 0.001 {
        format!("{v:.4}")
    } else {
        format!("{v:.2e}")
    }
}

/// `median [min–max]`, or just the value for one round.
pub fn fmt_summary(s: &Summary) -> String {
    if s.n <= 1 || s.min == s.max {
        fmt_num(s.median)
    } else {
        format!(
            "{} [{}–{}]",
            fmt_num(s.median),
            fmt_num(s.min),
            fmt_num(s.max)
        )
    }
}

/// `a / b` as `0.42×`; `n/a` when `b` is zero or either is not finite.
pub fn fmt_ratio(a: f64, b: f64) -> String {
    if b == 0.0 || !a.is_finite() || !b.is_finite() {
        return "n/a".into();
    }
    let r = a / b;
    if r >= 100.0 {
        format!("{r:.0}×")
    } else if r >= 10.0 {
        format!("{r:.1}×")
    } else if r >= 0.1 || r == 0.0 {
        format!("{r:.2}×")
    } else if r >= 0.001 {
        format!("{r:.3}×")
    } else {
        format!("{r:.1e}×")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let mut s = Samples::default();
        for v in [4.0, 1.0, 3.0, 2.0, 5.0] {
            s.push(v);
        }
        assert_eq!(s.percentile(50.0), Some(3.0));
        assert_eq!(s.percentile(0.0), Some(1.0));
        assert_eq!(s.percentile(100.0), Some(5.0));
        assert_eq!(s.percentile(25.0), Some(2.0));
        assert_eq!(Samples::default().percentile(50.0), None);
    }

    #[test]
    fn summary_and_format() {
        let s = Summary::of(&[3.0, 1.0, 2.0, f64::NAN]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(fmt_summary(&s), "2.00 [1.00–3.00]");
        assert_eq!(fmt_num(16516.4), "16516");
        assert_eq!(fmt_ratio(1.0, 4.0), "0.25×");
        assert_eq!(fmt_ratio(1.0, 0.0), "n/a");
        assert!(Summary::of(&[]).is_none());
    }
}
