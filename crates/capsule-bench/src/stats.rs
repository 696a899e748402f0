//! Summary statistics shared by every workload: n, median, p99, min, max, mean.
//!
//! Percentiles are nearest-rank (`sorted[ceil(p * n) - 1]`), the same rule as
//! `bench/jupyter/driver.py`, so the columns of the final table are computed alike.

use serde::{Deserialize, Serialize};

/// The figures printed for every measured quantity.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median (nearest rank).
    pub median: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Unit of every field above (`us`, `MB/s`, `cells/s`, `bytes`, ...).
    pub unit: String,
}

impl Summary {
    /// Summarises `values` (any order). An empty slice gives `n = 0` and zeros.
    pub fn of(values: &[f64], unit: &str) -> Summary {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Summary {
                unit: unit.to_string(),
                ..Summary::default()
            };
        }
        let rank = |p: f64| v[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Summary {
            n,
            median: rank(0.5),
            p99: rank(0.99),
            min: v[0],
            max: v[n - 1],
            mean: v.iter().sum::<f64>() / n as f64,
            unit: unit.to_string(),
        }
    }

    /// `n=… median=… p99=… min=…` with the unit, for logs.
    pub fn line(&self) -> String {
        format!(
            "n={} median={} p99={} min={} {}",
            self.n,
            fmt_num(self.median),
            fmt_num(self.p99),
            fmt_num(self.min),
            self.unit
        )
    }
}

/// A number with three significant figures (no exponent).
pub fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&v, "us");
        assert_eq!(
            (s.n, s.median, s.p99, s.min, s.max),
            (100, 50.0, 99.0, 1.0, 100.0)
        );
        let s = Summary::of(&[3.0], "us");
        assert_eq!((s.median, s.p99), (3.0, 3.0));
        assert_eq!(Summary::of(&[], "us").n, 0);
    }
}
