//! Aggregation rules over vectors: the second axis beside the update kind.
//!
//! A rule turns a round's vectors (in ascending client order, each with its
//! sample-count weight) into one vector. Kinds whose payload is a vector
//! (FedAvg and FedAvgM deltas) combine through a rule; a kind lists the rules
//! it supports ([`crate::kind::UpdateKind::rules`]). Rules compute in f64 over
//! a fixed order, so the result never depends on arrival order.

use crate::aggregate::ClientIndex;
use crate::kind::RuleSpec;

/// One client's vector in a round.
#[derive(Clone, Copy, Debug)]
pub struct Weighted<'a> {
    /// The client.
    pub client: ClientIndex,
    /// Its weight (sample count).
    pub weight: u64,
    /// Its vector.
    pub values: &'a [f32],
}

/// Combines a round's vectors into one.
pub trait VectorRule: Send + Sync + std::fmt::Debug {
    /// Name in logs.
    fn name(&self) -> &'static str;
    /// Writes the combination of `updates` into `out`. `updates` is non-empty,
    /// in ascending client order, and every vector has `out.len()` values.
    fn combine(&self, updates: &[Weighted<'_>], out: &mut [f64]);
}

/// The rule `spec` names.
pub fn vector_rule(spec: &RuleSpec) -> Box<dyn VectorRule> {
    match spec {
        RuleSpec::Mean => Box::new(Mean),
        RuleSpec::Median => Box::new(Median),
    }
}

/// The sample-weighted mean `Σ nᵢ·vᵢ / Σ nᵢ` (FedAvg): products summed in
/// f64 in client order, then one division.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mean;

impl VectorRule for Mean {
    fn name(&self) -> &'static str {
        "mean"
    }

    fn combine(&self, updates: &[Weighted<'_>], out: &mut [f64]) {
        out.fill(0.0);
        // Each weight is at most MAX_SAMPLES_PER_UPDATE (2^32) and a round
        // has at most MAX_ENROLLED (2^20) updates, so this can't saturate; it
        // saturates so that no caller can make it wrap.
        let total = updates.iter().fold(0u64, |t, u| t.saturating_add(u.weight)) as f64;
        for u in updates {
            let w = u.weight as f64;
            for (a, v) in out.iter_mut().zip(u.values) {
                *a += w * *v as f64;
            }
        }
        for a in out.iter_mut() {
            *a /= total;
        }
    }
}

/// The coordinate-wise median (Yin et al., "Byzantine-robust distributed
/// learning", ICML 2018), unweighted: a client can't buy influence by
/// claiming more samples. With an even count, the mean of the two middle
/// values.
#[derive(Clone, Copy, Debug, Default)]
pub struct Median;

impl VectorRule for Median {
    fn name(&self) -> &'static str {
        "median"
    }

    fn combine(&self, updates: &[Weighted<'_>], out: &mut [f64]) {
        let n = updates.len();
        let mut column = vec![0f32; n];
        for (i, o) in out.iter_mut().enumerate() {
            for (c, u) in column.iter_mut().zip(updates) {
                *c = u.values[i];
            }
            column.sort_unstable_by(f32::total_cmp);
            *o = if n % 2 == 1 {
                f64::from(column[n / 2])
            } else {
                (f64::from(column[n / 2 - 1]) + f64::from(column[n / 2])) / 2.0
            };
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn w(client: u32, weight: u64, values: &[f32]) -> Weighted<'_> {
        Weighted { client, weight, values }
    }

    #[test]
    fn mean_is_sample_weighted() {
        let mut out = [0f64; 2];
        Mean.combine(&[w(0, 1, &[1.0, 0.0]), w(1, 3, &[-1.0, 4.0])], &mut out);
        assert_eq!(out, [-0.5, 3.0]);
    }

    #[test]
    fn median_ignores_an_outlier_and_weights() {
        let mut out = [0f64; 2];
        let a = [1.0, 2.0];
        let b = [2.0, 3.0];
        let evil = [1e30, -1e30];
        Median.combine(&[w(0, 1, &a), w(1, 1, &b), w(2, 1_000_000, &evil)], &mut out);
        assert_eq!(out, [2.0, 2.0]);
        Median.combine(&[w(0, 1, &a), w(1, 1, &b)], &mut out);
        assert_eq!(out, [1.5, 2.5]);
    }
}
