//! Aggregation rules over vectors: the second axis beside the update kind.
//!
//! A rule turns a round's vectors (in ascending client order, each with its
//! sample-count weight) into one vector. Kinds whose payload is a vector
//! (FedAvg and FedAvgM deltas) combine through a rule; a kind lists the rules
//! it supports ([`crate::kind::UpdateKind::rules`]). Rules compute in f64 over
//! a fixed order, so the result never depends on arrival order.

use std::collections::BTreeSet;

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
    match *spec {
        RuleSpec::Mean => Box::new(Mean),
        RuleSpec::Median => Box::new(Median),
        RuleSpec::TrimmedMean { trim } => Box::new(TrimmedMean { trim: trim as usize }),
        RuleSpec::Krum { byzantine } => Box::new(MultiKrum { byzantine: byzantine as usize, multi: false }),
        RuleSpec::MultiKrum { byzantine } => Box::new(MultiKrum { byzantine: byzantine as usize, multi: true }),
        RuleSpec::NormClip { max_norm } => Box::new(NormClip { max_norm: f64::from(max_norm) }),
    }
}

/// A run's rule as an aggregator holds it, with an optional simulation
/// device: rules whose parameter is a number of attackers (trimmed mean's
/// `trim`, Krum's `byzantine`) can be told each round's true count.
#[derive(Debug)]
pub struct RoundRule {
    spec: RuleSpec,
    rule: Box<dyn VectorRule>,
    /// Known attackers ([`RoundRule::know_attackers`]).
    attackers: Option<BTreeSet<ClientIndex>>,
}

impl RoundRule {
    /// The rule `spec` names, with its configured parameter.
    pub fn new(spec: &RuleSpec) -> Self {
        RoundRule { spec: *spec, rule: vector_rule(spec), attackers: None }
    }

    /// From now on the rule's attacker parameter is the number of `flagged`
    /// clients among each round's updates, as FRL's reference code runs its
    /// trimmed mean and Multi-Krum (its server is told that count). A real
    /// server cannot know it: this is for experiments that reproduce such
    /// papers. Rules without an attacker parameter are unaffected.
    pub fn know_attackers(&mut self, flagged: BTreeSet<ClientIndex>) {
        self.attackers = Some(flagged);
    }

    /// The rule applied to a round of `updates`: the configured one, or with
    /// known attackers the rule with their count among `updates`.
    pub fn combine(&self, updates: &[Weighted<'_>], out: &mut [f64]) {
        match &self.attackers {
            None => self.rule.combine(updates, out),
            Some(flagged) => {
                let f = updates.iter().filter(|u| flagged.contains(&u.client)).count();
                vector_rule(&self.spec.with_attackers(f, updates.len())).combine(updates, out);
            }
        }
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

/// The coordinate-wise trimmed mean (Yin et al., ICML 2018), unweighted:
/// per coordinate, the `trim` largest and `trim` smallest values dropped and
/// the rest averaged in f64. A round with no more than `2·trim` updates
/// (which [`RuleSpec::check_round_size`] refuses before the run) falls back
/// to the median rather than divide by zero.
#[derive(Clone, Copy, Debug)]
pub struct TrimmedMean {
    /// Values dropped at each end.
    pub trim: usize,
}

impl VectorRule for TrimmedMean {
    fn name(&self) -> &'static str {
        "trimmed-mean"
    }

    fn combine(&self, updates: &[Weighted<'_>], out: &mut [f64]) {
        let n = updates.len();
        if 2 * self.trim >= n {
            return Median.combine(updates, out);
        }
        let mut column = vec![0f32; n];
        for (i, o) in out.iter_mut().enumerate() {
            for (c, u) in column.iter_mut().zip(updates) {
                *c = u.values[i];
            }
            column.sort_unstable_by(f32::total_cmp);
            let kept = &column[self.trim..n - self.trim];
            *o = kept.iter().map(|v| f64::from(*v)).sum::<f64>() / kept.len() as f64;
        }
    }
}

/// Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui and Stainer, NeurIPS
/// 2017), unweighted, as FRL's reference code (after Shejwalkar and
/// Houmansadr's) computes them: among the `r` updates still in play, each
/// update's score is the sum of the `r − f − 2` smallest entries of its row
/// of squared distances (f64), the row including its zero distance to
/// itself; the best-scoring update is chosen (ties by client id) and taken
/// out of play. Krum stops after one choice and returns it; Multi-Krum goes
/// on while more than `2f + 2` updates are in play (so it chooses
/// `n − 2f − 2`, at least one) and averages the chosen ones. Counting the
/// self-distance makes the neighbourhood one smaller than the paper's
/// `n − f − 2`; we follow the code, whose numbers we compare against.
#[derive(Clone, Copy, Debug)]
pub struct MultiKrum {
    /// `f`, the Byzantine updates tolerated.
    pub byzantine: usize,
    /// Multi-Krum (true) or Krum.
    pub multi: bool,
}

impl MultiKrum {
    /// Indices (into `updates`) of the chosen updates, in choice order.
    pub fn choose(&self, updates: &[Weighted<'_>]) -> Vec<usize> {
        let n = updates.len();
        // Pairwise squared distances, computed once.
        let mut dist = vec![0f64; n * n];
        for i in 0..n {
            for j in i + 1..n {
                let d: f64 = updates[i]
                    .values
                    .iter()
                    .zip(updates[j].values)
                    .map(|(a, b)| {
                        let x = f64::from(*a) - f64::from(*b);
                        x * x
                    })
                    .sum();
                dist[i * n + j] = d;
                dist[j * n + i] = d;
            }
        }
        let f = self.byzantine;
        let mut left: Vec<usize> = (0..n).collect();
        let mut chosen = Vec::new();
        let mut row = Vec::with_capacity(n);
        // At least one choice, even from a round too small for `f` (which
        // `RuleSpec::check_round_size` refuses before the run).
        while !left.is_empty() && (chosen.is_empty() || (self.multi && left.len() > 2 * f + 2)) {
            let take = left.len().saturating_sub(f + 2).max(1);
            let mut best: Option<(f64, usize)> = None;
            for (pos, &i) in left.iter().enumerate() {
                row.clear();
                row.extend(left.iter().map(|&j| dist[i * n + j]));
                row.sort_unstable_by(f64::total_cmp);
                let score: f64 = row.iter().take(take).sum();
                // Strictly better only: ties keep the lower client id (the
                // updates are in ascending client order).
                if best.is_none_or(|(s, _)| score < s) {
                    best = Some((score, pos));
                }
            }
            let Some((_, pos)) = best else { break };
            chosen.push(left.remove(pos));
        }
        chosen
    }
}

impl VectorRule for MultiKrum {
    fn name(&self) -> &'static str {
        if self.multi { "multi-krum" } else { "krum" }
    }

    fn combine(&self, updates: &[Weighted<'_>], out: &mut [f64]) {
        let mut chosen = self.choose(updates);
        // Summed in client order whatever the choice order.
        chosen.sort_unstable();
        out.fill(0.0);
        for &c in &chosen {
            for (o, v) in out.iter_mut().zip(updates[c].values) {
                *o += f64::from(*v);
            }
        }
        let k = chosen.len().max(1) as f64;
        for o in out.iter_mut() {
            *o /= k;
        }
    }
}

/// Norm clipping then the sample-weighted mean (Sun, Kairouz, Suresh and
/// McMahan, "Can you really backdoor federated learning?", 2019): an update
/// whose L2 norm (f64) exceeds `max_norm` is scaled down to it.
#[derive(Clone, Copy, Debug)]
pub struct NormClip {
    /// The bound.
    pub max_norm: f64,
}

impl VectorRule for NormClip {
    fn name(&self) -> &'static str {
        "norm-clip"
    }

    fn combine(&self, updates: &[Weighted<'_>], out: &mut [f64]) {
        out.fill(0.0);
        let total = updates.iter().fold(0u64, |t, u| t.saturating_add(u.weight)) as f64;
        for u in updates {
            let norm = u.values.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt();
            let scale = if norm > self.max_norm { self.max_norm / norm } else { 1.0 };
            let w = u.weight as f64 * scale;
            for (a, v) in out.iter_mut().zip(u.values) {
                *a += w * f64::from(*v);
            }
        }
        for a in out.iter_mut() {
            *a /= total;
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
    fn known_attackers_set_the_rules_parameter_to_their_count_in_the_round() {
        // Clients 0..5 with 1-D values; 4 and 3 are the attackers.
        let v = [[0.0f32], [1.0], [2.0], [30.0], [100.0]];
        let ups: Vec<Weighted<'_>> = v.iter().enumerate().map(|(i, x)| w(i as u32, 1, x)).collect();
        let mut out = [0f64];
        let spec = RuleSpec::TrimmedMean { trim: 0 };
        let mut rule = RoundRule::new(&spec);
        rule.combine(&ups, &mut out);
        assert_eq!(out, [26.6], "configured: trim 0, the plain mean");
        rule.know_attackers([3, 4].into());
        rule.combine(&ups, &mut out);
        assert_eq!(out, [2.0], "two attackers in the round: trim 2 leaves the median");
        rule.combine(&ups[..4], &mut out);
        assert_eq!(out, [1.5], "one of them in a round of four: trim 1");
        rule.combine(&ups[..3], &mut out);
        assert_eq!(out, [1.0], "none: trim 0");

        // Multi-Krum chooses n − 2f − 2 updates: 7 of 9 as configured
        // (f = 0), 3 with the two attackers in the round (f = 2).
        let mut krum = RoundRule::new(&RuleSpec::MultiKrum { byzantine: 0 });
        let v: Vec<[f32; 1]> = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 9.0, 50.0].iter().map(|&x| [x]).collect();
        let ups: Vec<Weighted<'_>> = v.iter().enumerate().map(|(i, x)| w(i as u32, 1, x)).collect();
        let mean_of =
            |chosen: Vec<usize>| chosen.iter().map(|&i| f64::from(v[i][0])).sum::<f64>() / chosen.len() as f64;
        let configured = MultiKrum { byzantine: 0, multi: true }.choose(&ups);
        assert_eq!(configured.len(), 7);
        krum.combine(&ups, &mut out);
        assert_eq!(out, [mean_of(configured)]);
        krum.know_attackers([0, 8].into());
        let known = MultiKrum { byzantine: 2, multi: true }.choose(&ups);
        assert_eq!(known.len(), 3);
        krum.combine(&ups, &mut out);
        assert_eq!(out, [mean_of(known)]);
        assert_ne!(
            mean_of(MultiKrum { byzantine: 2, multi: true }.choose(&ups)),
            mean_of(MultiKrum { byzantine: 0, multi: true }.choose(&ups))
        );
    }

    #[test]
    fn an_attacker_count_is_capped_at_what_the_round_allows() {
        let tm = RuleSpec::TrimmedMean { trim: 1 };
        assert_eq!(tm.with_attackers(3, 10), RuleSpec::TrimmedMean { trim: 3 });
        assert_eq!(tm.with_attackers(10, 5), RuleSpec::TrimmedMean { trim: 2 });
        assert_eq!(tm.with_attackers(10, 6), RuleSpec::TrimmedMean { trim: 2 });
        let mk = RuleSpec::MultiKrum { byzantine: 1 };
        assert_eq!(mk.with_attackers(10, 8), RuleSpec::MultiKrum { byzantine: 2 });
        assert_eq!(mk.with_attackers(10, 2), RuleSpec::MultiKrum { byzantine: 0 });
        assert_eq!(RuleSpec::Krum { byzantine: 1 }.with_attackers(0, 8), RuleSpec::Krum { byzantine: 0 });
        assert_eq!(RuleSpec::Median.with_attackers(3, 10), RuleSpec::Median);
        for n in 1..12 {
            for f in 0..12 {
                for spec in [tm, mk] {
                    assert!(spec.with_attackers(f, n).check_round_size(n).is_ok() || n < 3, "{spec:?} {f} {n}");
                }
            }
        }
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

    #[test]
    fn trimmed_mean_drops_the_extremes_of_each_coordinate() {
        let v = [[1.0f32, 10.0], [2.0, 20.0], [3.0, -30.0], [100.0, 40.0], [-50.0, 50.0]];
        let ups: Vec<Weighted<'_>> = v.iter().enumerate().map(|(i, x)| w(i as u32, 1, x)).collect();
        let mut out = [0f64; 2];
        TrimmedMean { trim: 1 }.combine(&ups, &mut out);
        // Coordinate 0: drop -50 and 100 → mean(1, 2, 3); coordinate 1: drop -30 and 50 → mean(10, 20, 40).
        assert_eq!(out, [2.0, 70.0 / 3.0]);
        TrimmedMean { trim: 0 }.combine(&ups, &mut out);
        assert_eq!(out, [56.0 / 5.0, 90.0 / 5.0]);
    }

    #[test]
    fn krum_picks_the_update_closest_to_its_neighbours() {
        // Five honest updates near (1, 1), two identical far outliers (a
        // colluding pair: zero distance to each other).
        let v = [[1.0f32, 1.0], [1.1, 0.9], [0.8, 1.0], [1.0, 1.2], [0.9, 0.9], [50.0, -50.0], [50.0, -50.0]];
        let ups: Vec<Weighted<'_>> = v.iter().enumerate().map(|(i, x)| w(i as u32, 1, x)).collect();
        // n = 7, f = 2: each score sums the 3 smallest entries of its row
        // (its own 0 and its two nearest): a few hundredths for the honest
        // ones, 0 + 0 + ~5000 for the outliers. An honest update wins, and
        // Krum's output is that update itself.
        let krum = MultiKrum { byzantine: 2, multi: false };
        let pick = krum.choose(&ups);
        assert!(pick.len() == 1 && pick[0] < 5, "{pick:?}");
        let mut out = [0f64; 2];
        krum.combine(&ups, &mut out);
        assert_eq!(out, v[pick[0]].map(f64::from));
        // With f = 1 the pair is more than Krum tolerates: counted with its
        // self-distance (as FRL's code does), an outlier scores 0 + 0 once
        // only two entries are summed, and Multi-Krum picks it. Documented
        // behaviour, not a bug: f must cover the colluders.
        let chosen = MultiKrum { byzantine: 1, multi: true }.choose(&ups);
        assert_eq!(chosen.len(), 3);
        // Multi-Krum with f = 2 goes on while more than 2f + 2 = 6 are in
        // play: one choice here; the outliers are never chosen.
        let multi = MultiKrum { byzantine: 2, multi: true };
        assert_eq!(multi.choose(&ups), pick);
        let ten: Vec<[f32; 2]> = (0..10).map(|i| [1.0 + i as f32 * 0.01, 1.0]).chain([[9e3, 9e3]; 2]).collect();
        let ups: Vec<Weighted<'_>> = ten.iter().enumerate().map(|(i, x)| w(i as u32, 1, x)).collect();
        let chosen = multi.choose(&ups);
        assert_eq!(chosen.len(), 12 - 2 * 2 - 2);
        assert!(chosen.iter().all(|&c| c < 10), "{chosen:?}");
    }

    #[test]
    fn norm_clip_scales_long_updates_down_to_the_bound() {
        let long = [3.0f32, 4.0]; // norm 5
        let short = [0.3f32, 0.4]; // norm 0.5
        let mut out = [0f64; 2];
        NormClip { max_norm: 1.0 }.combine(&[w(0, 1, &long), w(1, 1, &short)], &mut out);
        // (0.6, 0.8) and (0.3, 0.4), averaged.
        let want = [(0.6 + f64::from(0.3f32)) / 2.0, (0.8 + f64::from(0.4f32)) / 2.0];
        assert!((out[0] - want[0]).abs() < 1e-12 && (out[1] - want[1]).abs() < 1e-12, "{out:?}");
    }
}
