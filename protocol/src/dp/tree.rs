//! The binary-tree mechanism for continual counting (Dwork, Naor, Pitassi,
//! Rothblum, STOC 2010; Chan, Shi, Song, TISSEC 2011), vector-valued.
//!
//! **Stream.** Records `x_1, …, x_T ∈ ℤ^d` from a declared [`RecordDomain`];
//! after record `t` the counter releases a noisy prefix sum `≈ Σ_{s≤t} x_s`.
//! Counts are integers; a caller with fixed-point data scales to integers
//! first and declares the domain (and so the sensitivity) in scaled units.
//!
//! **Tree.** `L = ⌊log₂T⌋ + 1` levels (the bit length of `T`: the levels
//! whose first node completes by `T`). Node `(ℓ, i)` covers records
//! `i·2^ℓ + 1 ..= (i+1)·2^ℓ`; its noisy value is the exact sum of its records
//! plus independent noise per coordinate, drawn when the node completes (at
//! `t = (i+1)·2^ℓ`). The release at `t` sums the nodes of the dyadic
//! decomposition of `[1, t]`: one per set bit `ℓ` of `t`, node
//! `(ℓ, ⌊t/2^ℓ⌋ − 1)`. So its error is a sum of `popcount(t)` independent
//! node noises. Only one node per level is kept (the partial sums of the
//! set bits of `t`), `O(L·d)` memory.
//!
//! **Sensitivity.** Each record lies in exactly one node per level, so
//! replacing one record moves all node sums by at most `L·Δ₁` in L1 and
//! `√L·Δ₂` in L2, with `(Δ₁, Δ₂²)` of the domain ([`RecordDomain`]).
//!
//! **Noise** ([`TreeNoise`]):
//! * Laplace, ε-DP: discrete Laplace of scale `b = L·Δ₁/ε` per node and
//!   coordinate. Each level is `(ε/L)`-DP, so the whole output is ε-DP.
//!   Per-release error variance `popcount(t)·Var(b)` with
//!   `Var(b) = 2q/(1−q)²`, `q = e^{−1/b}` (≤ `2b²`).
//! * Gaussian, ρ-zCDP: discrete Gaussian `σ² = L·Δ₂²/(2ρ)`. Each level is
//!   `(ρ/L)`-zCDP (Canonne–Kamath–Steinke 2020, Theorem 14: the discrete
//!   Gaussian mechanism with L2 sensitivity Δ is `Δ²/(2σ²)`-zCDP).
//!   Per-release error variance `popcount(t)·σ²` (up to the discrete
//!   Gaussian's variance, below σ², within 10⁻⁸ of it for σ ≥ 1).
//!
//! **Accounting.** Releases `1..t` depend only on nodes completed by `t`,
//! which lie on levels `0..=⌊log₂t⌋`; so after release `t` the spent
//! privacy is `(⌊log₂t⌋ + 1)` level costs, charged to the [`Accountant`]
//! when each level's first node completes (`t` a power of two). At `t = T`
//! this is at most the configured ε or ρ. A release past `T` is refused
//! ([`DpError::HorizonExhausted`]).
//!
//! **Noise streams.** Node `(ℓ, i)` draws its `d` values in coordinate
//! order from noise stream `(round = instance, client = ℓ, step = i)` of the
//! server's [`NoiseSeed`] ([`super::noise`]). So a node's noise depends on
//! nothing but the seed, the instance and the node, and a counter restored
//! from a [`TreeState`] regenerates the noise of its stored nodes and
//! continues bit for bit. Distinct mechanisms of a run take distinct
//! `instance` numbers.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use super::accountant::{Accountant, Budget, Cost, Spent};
use super::noise::NoiseSeed;
use super::sampler::{DiscreteGaussian, DiscreteLaplace};
use super::{DpError, NoiseSource, Ratio};

/// Largest horizon T, 2³²: node indices are the `u32` `step` of a noise
/// stream's name.
pub const MAX_HORIZON: u64 = 1 << 32;

/// Largest L1 norm of an [`RecordDomain::Integer`] record, 2²⁴: exact sums
/// of up to [`MAX_HORIZON`] records (≤ 2⁵⁶) plus up to 33 noise values
/// (each ≤ 2⁵³, [`super::sampler::NOISE_MAX`]) stay below 2⁶³.
pub const MAX_RECORD_L1: u64 = 1 << 24;

/// Version of [`TreeState`]; bumped on any change to its meaning.
pub const TREE_STATE_VERSION: u32 = 1;

/// What a record may be; it fixes the replacement sensitivities `(Δ₁, Δ₂²)`
/// the noise is calibrated to, and every record is checked against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordDomain {
    /// `x ∈ {0,1}^d`: `Δ₁ = d`, `Δ₂² = d`.
    Binary,
    /// `x ∈ {0,1}^d` with at most `max_ones` ones (approval votes):
    /// `Δ₁ = Δ₂² = min(2·max_ones, d)`.
    BinaryWeight {
        /// Most ones in a record.
        max_ones: u64,
    },
    /// Signed integers with `Σ|x_j| ≤ l1` and `Σx_j² ≤ l2_sq` (clipped,
    /// fixed-point-scaled vectors): `Δ₁ = 2·l1`, `Δ₂² = 4·l2_sq`.
    Integer {
        /// L1 bound, at most [`MAX_RECORD_L1`].
        l1: u64,
        /// Squared L2 bound, at most [`MAX_RECORD_L1`]².
        l2_sq: u64,
    },
    /// The sum of at most `count` contributions, each an integer vector of
    /// `norm`-norm at most `bound` (DP-FTRL: a round's clipped,
    /// fixed-point-scaled client updates, [`crate::dpftrl`]). Neighbouring
    /// streams differ in **one contribution** of one record (replaced), so
    /// `Δ₂² = 4·bound²`, and `Δ₁ = 2·bound` for the L1 norm or
    /// `2·bound·⌈√d⌉` for the L2 norm (Cauchy–Schwarz). The tree sees only
    /// the sum: the caller must check every contribution's norm (the
    /// sensitivity rests on it); the tree refuses a record no sum of
    /// `count` such contributions can be (triangle inequality), which
    /// catches a caller that skipped the check by much, not by little.
    ClippedSum {
        /// The norm contributions are clipped in.
        norm: ClipNorm,
        /// Norm bound of one contribution, in integer units.
        bound: u64,
        /// Most contributions in a record; `count·bound` is at most
        /// [`MAX_RECORD_L1`] (each coordinate of a record is then at most
        /// that, the bound the overflow argument needs).
        count: u64,
    },
}

/// The norm a [`RecordDomain::ClippedSum`] contribution is bounded in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipNorm {
    /// `Σ|x_j|` (Laplace noise: its sensitivity is the L1 one).
    L1,
    /// `√Σx_j²` (Gaussian noise).
    L2,
}

impl RecordDomain {
    /// `(Δ₁, Δ₂²)` under replacement of one record, for dimension `d`.
    pub fn sensitivity(&self, d: usize) -> (u128, u128) {
        let d = d as u128;
        match *self {
            RecordDomain::Binary => (d, d),
            RecordDomain::BinaryWeight { max_ones } => {
                let s = (2 * u128::from(max_ones)).min(d);
                (s, s)
            }
            RecordDomain::Integer { l1, l2_sq } => (2 * u128::from(l1), 4 * u128::from(l2_sq)),
            RecordDomain::ClippedSum { norm, bound, .. } => {
                let b = u128::from(bound);
                let l1 = match norm {
                    ClipNorm::L1 => b,
                    // ‖x‖₁ ≤ √d·‖x‖₂ ≤ ⌈√d⌉·bound.
                    ClipNorm::L2 => {
                        let r = d.isqrt();
                        b * if r * r == d { r } else { r + 1 }
                    }
                };
                (2 * l1, 4 * b * b)
            }
        }
    }

    /// Refuses a record outside the domain.
    pub fn check(&self, x: &[i64]) -> Result<(), DpError> {
        match *self {
            RecordDomain::Binary | RecordDomain::BinaryWeight { .. } => {
                if x.iter().any(|&v| v != 0 && v != 1) {
                    return Err(DpError::RecordOutOfDomain { reason: "entry not 0 or 1" });
                }
                if let RecordDomain::BinaryWeight { max_ones } = *self
                    && x.iter().filter(|&&v| v == 1).count() as u64 > max_ones
                {
                    return Err(DpError::RecordOutOfDomain { reason: "more ones than max_ones" });
                }
            }
            RecordDomain::Integer { l1, l2_sq } => {
                let n1: u128 = x.iter().map(|v| u128::from(v.unsigned_abs())).sum();
                if n1 > u128::from(l1) {
                    return Err(DpError::RecordOutOfDomain { reason: "L1 norm above l1" });
                }
                // Each |x_j| ≤ l1 ≤ 2²⁴ here, so squares and their sum fit.
                let n2: u128 = x.iter().map(|v| u128::from(v.unsigned_abs()).pow(2)).sum();
                if n2 > u128::from(l2_sq) {
                    return Err(DpError::RecordOutOfDomain { reason: "squared L2 norm above l2_sq" });
                }
            }
            RecordDomain::ClippedSum { norm, bound, count } => {
                // count·bound ≤ MAX_RECORD_L1 (checked by `TreeCounter::new`).
                let most = u128::from(count) * u128::from(bound);
                if x.iter().any(|v| u128::from(v.unsigned_abs()) > most) {
                    return Err(DpError::RecordOutOfDomain { reason: "entry above count·bound" });
                }
                let within = match norm {
                    ClipNorm::L1 => x.iter().map(|v| u128::from(v.unsigned_abs())).sum::<u128>() <= most,
                    // Each square ≤ 2⁴⁸ and d < 2⁶⁴: the sum fits in u128.
                    ClipNorm::L2 => x.iter().map(|v| u128::from(v.unsigned_abs()).pow(2)).sum::<u128>() <= most * most,
                };
                if !within {
                    return Err(DpError::RecordOutOfDomain { reason: "norm above count·bound" });
                }
            }
        }
        Ok(())
    }
}

/// The privacy target, which fixes the node noise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeNoise {
    /// ε-DP with discrete Laplace noise of scale `L·Δ₁/ε`.
    Laplace {
        /// Total ε over the horizon.
        epsilon: Ratio,
    },
    /// ρ-zCDP with discrete Gaussian noise of variance `L·Δ₂²/(2ρ)`.
    Gaussian {
        /// Total ρ over the horizon.
        rho: Ratio,
    },
}

/// A counter's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeConfig {
    /// Horizon T: releases `1..=T`, at most [`MAX_HORIZON`].
    pub horizon: u64,
    /// Dimension d of records.
    pub dim: usize,
    /// What records may be.
    pub domain: RecordDomain,
    /// Privacy target.
    pub noise: TreeNoise,
    /// The server's secret noise seed.
    pub seed: NoiseSeed,
    /// Which mechanism of the run this is (the `round` of its noise streams).
    pub instance: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeNoise {
    Laplace(DiscreteLaplace),
    Gaussian(DiscreteGaussian),
}

impl NodeNoise {
    fn sample(&self, src: &mut NoiseSource) -> i64 {
        match self {
            NodeNoise::Laplace(l) => l.sample(src),
            NodeNoise::Gaussian(g) => g.sample(src),
        }
    }
}

/// A counter's state between releases, for the server's durable snapshot:
/// the releases made and the exact partial sums of the nodes the next
/// releases still need (the set bits of `t`). Noise is not stored; it is
/// regenerated from the seed on restore.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct TreeState {
    /// [`TREE_STATE_VERSION`].
    pub version: u32,
    /// Releases made.
    pub t: u64,
    /// Per level `ℓ < L`: the exact sum of node `(ℓ, ⌊t/2^ℓ⌋ − 1)` when bit
    /// `ℓ` of `t` is set, else empty.
    pub nodes: Vec<Vec<i64>>,
}

/// One release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeRelease {
    /// Its index t (1-based).
    pub t: u64,
    /// The noisy prefix sum, per coordinate.
    pub values: Vec<i64>,
    /// Privacy spent by releases `1..=t`.
    pub spent: Spent,
    /// What this release added to it (a level's cost when `t` is a power of
    /// two), for a caller that also keeps a run-wide [`Accountant`].
    pub charged: Option<Cost>,
}

/// The binary-tree continual counter (module docs).
#[derive(Clone, Debug)]
pub struct TreeCounter {
    cfg: TreeConfig,
    levels: usize,
    noise: NodeNoise,
    level_cost: Cost,
    accountant: Accountant,
    t: u64,
    /// Exact node sums per level (zeros where bit ℓ of t is clear).
    exact: Vec<Vec<i64>>,
    /// Noisy node values per level (zeros where bit ℓ of t is clear).
    noisy: Vec<Vec<i64>>,
}

/// `⌊log₂T⌋ + 1` for `T ≥ 1` (1 for `T = 0`): every `t ≤ T` is below
/// `2^L`, so its dyadic decomposition uses levels `0..L` only, and each of
/// them completes a node by `T`, so the whole budget is spent by `T`. (Up
/// to 2026-12-05 this was `⌈log₂T⌉ + 1`, one level more when `T` is not a
/// power of two: a level that never completed, so such runs spent only
/// part of their budget and drew more noise than needed.)
pub fn levels_for(horizon: u64) -> usize {
    (64 - horizon.leading_zeros()).max(1) as usize
}

impl TreeCounter {
    /// A fresh counter (no release yet).
    pub fn new(cfg: TreeConfig) -> Result<Self, DpError> {
        if cfg.horizon == 0 || cfg.horizon > MAX_HORIZON {
            return Err(DpError::OutOfRange { what: "horizon", limit: "1 to 2^32 (tree::MAX_HORIZON)" });
        }
        if cfg.dim == 0 {
            return Err(DpError::InvalidParameter { what: "dimension", reason: "must be positive" });
        }
        if let RecordDomain::Integer { l1, l2_sq } = cfg.domain
            && (l1 == 0 || l1 > MAX_RECORD_L1 || l2_sq > MAX_RECORD_L1 * MAX_RECORD_L1)
        {
            return Err(DpError::OutOfRange {
                what: "record bound",
                limit: "l1 in 1..=2^24 and l2_sq at most 2^48 (tree::MAX_RECORD_L1)",
            });
        }
        if let RecordDomain::ClippedSum { bound, count, .. } = cfg.domain
            && (bound == 0 || count == 0 || u128::from(bound) * u128::from(count) > u128::from(MAX_RECORD_L1))
        {
            return Err(DpError::OutOfRange {
                what: "clipped-sum bound",
                limit: "bound and count at least 1, count·bound at most 2^24 (tree::MAX_RECORD_L1)",
            });
        }
        let levels = levels_for(cfg.horizon);
        let (d1, d2) = cfg.domain.sensitivity(cfg.dim);
        if d1 == 0 || d2 == 0 {
            return Err(DpError::InvalidParameter { what: "record domain", reason: "zero sensitivity" });
        }
        let l = Ratio::integer(levels as u128);
        let (noise, level_cost, budget) = match cfg.noise {
            TreeNoise::Laplace { epsilon } => {
                if epsilon.is_zero() {
                    return Err(DpError::InvalidParameter { what: "epsilon", reason: "must be positive" });
                }
                let scale = l.checked_mul(Ratio::integer(d1))?.checked_div(epsilon)?;
                let noise = NodeNoise::Laplace(DiscreteLaplace::new(scale)?);
                (noise, Cost::Pure(epsilon.checked_div(l)?), Budget::Pure(epsilon))
            }
            TreeNoise::Gaussian { rho } => {
                if rho.is_zero() {
                    return Err(DpError::InvalidParameter { what: "rho", reason: "must be positive" });
                }
                let var = l.checked_mul(Ratio::integer(d2))?.checked_div(rho.checked_mul(Ratio::integer(2))?)?;
                let noise = NodeNoise::Gaussian(DiscreteGaussian::new(var)?);
                (noise, Cost::Zcdp(rho.checked_div(l)?), Budget::Zcdp(rho))
            }
        };
        let zeros = vec![vec![0i64; cfg.dim]; levels];
        Ok(TreeCounter {
            levels,
            noise,
            level_cost,
            accountant: Accountant::new(budget),
            t: 0,
            exact: zeros.clone(),
            noisy: zeros,
            cfg,
        })
    }

    /// A counter continuing from `state` (taken by [`Self::state`] of a
    /// counter with the same configuration).
    pub fn restore(cfg: TreeConfig, state: &TreeState) -> Result<Self, DpError> {
        let mut c = TreeCounter::new(cfg)?;
        let bad = |reason| Err(DpError::InvalidState { reason });
        if state.version != TREE_STATE_VERSION {
            return bad("unknown tree state version");
        }
        if state.t > c.cfg.horizon {
            return bad("more releases than the horizon");
        }
        if state.nodes.len() != c.levels {
            return bad("level count differs from the configuration's");
        }
        for (l, node) in state.nodes.iter().enumerate() {
            let set = (state.t >> l) & 1 == 1;
            match (set, node.len()) {
                (true, n) if n == c.cfg.dim => {
                    c.exact[l].clone_from(node);
                    c.noisy[l] = add(node, &c.node_noise(l, (state.t >> l) - 1))?;
                }
                (false, 0) => {}
                _ => return bad("node present where the release count has no such node, or of the wrong dimension"),
            }
        }
        c.t = state.t;
        // Replay the level charges of releases 1..=t (one per power of two).
        let charged = if state.t == 0 { 0 } else { state.t.ilog2() + 1 };
        for _ in 0..charged {
            c.accountant.charge(c.level_cost)?;
        }
        Ok(c)
    }

    /// The state to snapshot.
    pub fn state(&self) -> TreeState {
        let nodes =
            (0..self.levels).map(|l| if (self.t >> l) & 1 == 1 { self.exact[l].clone() } else { Vec::new() }).collect();
        TreeState { version: TREE_STATE_VERSION, t: self.t, nodes }
    }

    /// Levels L.
    pub fn levels(&self) -> usize {
        self.levels
    }

    /// Releases made.
    pub fn releases(&self) -> u64 {
        self.t
    }

    /// Privacy spent so far.
    pub fn spent(&self) -> Spent {
        self.accountant.spent()
    }

    /// The Laplace node scale, if this counter is ε-DP.
    pub fn laplace_scale(&self) -> Option<Ratio> {
        match self.noise {
            NodeNoise::Laplace(l) => Some(l.scale()),
            NodeNoise::Gaussian(_) => None,
        }
    }

    /// The Gaussian node variance σ², if this counter is zCDP.
    pub fn gaussian_variance(&self) -> Option<Ratio> {
        match self.noise {
            NodeNoise::Gaussian(g) => Some(g.variance()),
            NodeNoise::Laplace(_) => None,
        }
    }

    /// The `d` noise values of node `(level, index)` (module docs).
    fn node_noise(&self, level: usize, index: u64) -> Vec<i64> {
        // level < 33 and index < 2³² (t ≤ MAX_HORIZON), so both fit in u32.
        let mut src = self.cfg.seed.stream(self.cfg.instance, level as u32, index as u32);
        (0..self.cfg.dim).map(|_| self.noise.sample(&mut src)).collect()
    }

    /// Takes record `x_t` and releases the noisy prefix sum at `t`. Refuses
    /// (state unchanged) a record outside the domain or of the wrong length,
    /// and any release past the horizon.
    pub fn step(&mut self, record: &[i64]) -> Result<TreeRelease, DpError> {
        if self.t >= self.cfg.horizon {
            return Err(DpError::HorizonExhausted { horizon: self.cfg.horizon });
        }
        if record.len() != self.cfg.dim {
            return Err(DpError::WrongDimension { expected: self.cfg.dim, got: record.len() });
        }
        self.cfg.domain.check(record)?;
        let t = self.t + 1;
        // The node completing at t is at the level of t's lowest set bit; it
        // absorbs the nodes of the levels below (bits set in t−1, clear in t).
        let l0 = t.trailing_zeros() as usize;
        let mut node = record.to_vec();
        for l in 0..l0 {
            node = add(&node, &self.exact[l])?;
        }
        let noisy = add(&node, &self.node_noise(l0, (t >> l0) - 1))?;
        let mut values = noisy.clone();
        for l in l0 + 1..self.levels {
            if (t >> l) & 1 == 1 {
                values = add(&values, &self.noisy[l])?;
            }
        }
        let charged = t.is_power_of_two().then_some(self.level_cost);
        let spent = match charged {
            Some(cost) => self.accountant.after(cost)?,
            None => self.spent(),
        };
        // Commit.
        for l in 0..l0 {
            self.exact[l].fill(0);
            self.noisy[l].fill(0);
        }
        self.exact[l0] = node;
        self.noisy[l0] = noisy;
        self.t = t;
        if let Some(cost) = charged {
            self.accountant.charge(cost)?;
        }
        Ok(TreeRelease { t, values, spent, charged })
    }
}

fn add(a: &[i64], b: &[i64]) -> Result<Vec<i64>, DpError> {
    a.iter().zip(b).map(|(x, y)| x.checked_add(*y).ok_or(DpError::Overflow { what: "tree sum" })).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::dp::sampler::tests::{gauss_weight, laplace_weight, moments, pmf, variance_ok};

    fn r(n: u128, d: u128) -> Ratio {
        Ratio::new(n, d).unwrap()
    }

    fn cfg(horizon: u64, dim: usize, noise: TreeNoise, seed: u64) -> TreeConfig {
        TreeConfig {
            horizon,
            dim,
            domain: RecordDomain::Binary,
            noise,
            seed: NoiseSeed::insecure_from_u64(seed),
            instance: 0,
        }
    }

    /// A deterministic 0/1 stream.
    fn record(t: u64, dim: usize) -> Vec<i64> {
        (0..dim).map(|j| i64::from((crate::rng::splitmix64(t * 1000 + j as u64) & 1) == 1)).collect()
    }

    #[test]
    fn dp_tree_levels() {
        assert_eq!([1, 2, 3, 4, 5, 7, 8, 9, 50, 64].map(levels_for), [1, 2, 2, 3, 3, 3, 4, 4, 6, 7]);
        assert_eq!(levels_for(MAX_HORIZON), 33);
    }

    /// Release errors at each t over many seeds and coordinates: variance
    /// `popcount(t) × node variance`, 6 standard errors (fourth moment of a
    /// sum of k i.i.d. zero-mean terms: `k·μ₄ + 3k(k−1)·σ⁴`); the same check
    /// against a node variance off by 2× (or against L nodes instead of
    /// popcount(t)) must reject.
    fn check_tree_variance(noise: TreeNoise, node_var: f64, node_m4: f64, seeds: u64, dim: usize) {
        // A tree of T = 16 (L = 5); t = 1..15 covers popcounts 1 to 4.
        let horizon = 15;
        let mut errors: Vec<Vec<i64>> = vec![Vec::new(); horizon as usize];
        for seed in 0..seeds {
            let mut c = TreeCounter::new(cfg(16, dim, noise, 1000 + seed)).unwrap();
            let mut truth = vec![0i64; dim];
            for t in 1..=horizon {
                let x = record(t, dim);
                for (s, v) in truth.iter_mut().zip(&x) {
                    *s += v;
                }
                let rel = c.step(&x).unwrap();
                errors[t as usize - 1].extend(rel.values.iter().zip(&truth).map(|(a, b)| a - b));
            }
        }
        for t in 1..=horizon {
            let k = f64::from(t.count_ones());
            let check = |v: f64, m4: f64, k: f64| {
                variance_ok(&errors[t as usize - 1], k * v, k * m4 + 3.0 * k * (k - 1.0) * v * v)
            };
            let (ok, z) = check(node_var, node_m4, k);
            assert!(ok, "t={t}: z = {z:.2}");
            if t == 1 || t == 7 || t == 15 {
                let xs = &errors[t as usize - 1];
                let n = xs.len() as f64;
                let s2 = xs.iter().map(|&e| (e as f64).powi(2)).sum::<f64>() / n;
                eprintln!("t={t}: measured var {s2:.2}, theory {:.2} (popcount {k})", k * node_var);
            }
            for wrong in [2.0, 0.5] {
                let (ok, z) = check(wrong * node_var, wrong * wrong * node_m4, k);
                assert!(!ok, "t={t}: accepts node variance ×{wrong} (z = {z:.2})");
            }
            if t.count_ones() < 4 {
                // The looser count, L = 5 nodes at every t, must be rejected where popcount(t) ≤ 3.
                let (ok, z) = check(node_var, node_m4, 5.0);
                assert!(!ok, "t={t}: accepts L nodes (z = {z:.2})");
            }
        }
    }

    #[test]
    fn dp_tree_gaussian_error_variance_is_popcount_times_sigma2() {
        // d = 500, L = 5, ρ = 1/2: σ² = L·d/(2ρ) = 2500.
        let noise = TreeNoise::Gaussian { rho: r(1, 2) };
        let c = TreeCounter::new(cfg(16, 500, noise, 0)).unwrap();
        assert_eq!(c.gaussian_variance(), Some(Ratio::integer(2500)));
        let b = 2500;
        let p = pmf(&gauss_weight(2500.0), b * 4);
        let (v, m4) = moments(&p, b * 4);
        assert!((v - 2500.0).abs() < 1e-6);
        check_tree_variance(noise, v, m4, 40, 500);
    }

    #[test]
    fn dp_tree_laplace_error_variance_is_popcount_times_laplace_variance() {
        // d = 20, L = 5, ε = 10: scale = L·d/ε = 10.
        let noise = TreeNoise::Laplace { epsilon: Ratio::integer(10) };
        let c = TreeCounter::new(cfg(16, 20, noise, 0)).unwrap();
        assert_eq!(c.laplace_scale(), Some(Ratio::integer(10)));
        let b = 10_000;
        let p = pmf(&laplace_weight(10.0), b);
        let (v, m4) = moments(&p, b);
        let q = (-0.1f64).exp();
        assert!((v - 2.0 * q / (1.0 - q).powi(2)).abs() < 1e-6);
        check_tree_variance(noise, v, m4, 1000, 20);
    }

    fn run(c: &mut TreeCounter, from: u64, to: u64, dim: usize) -> Vec<Vec<i64>> {
        (from..=to).map(|t| c.step(&record(t, dim)).unwrap().values).collect()
    }

    #[test]
    fn dp_tree_is_deterministic_per_seed() {
        let noise = TreeNoise::Gaussian { rho: r(1, 10) };
        let a = run(&mut TreeCounter::new(cfg(50, 8, noise, 1)).unwrap(), 1, 50, 8);
        assert_eq!(a, run(&mut TreeCounter::new(cfg(50, 8, noise, 1)).unwrap(), 1, 50, 8));
        assert_ne!(a, run(&mut TreeCounter::new(cfg(50, 8, noise, 2)).unwrap(), 1, 50, 8));
        let mut other = cfg(50, 8, noise, 1);
        other.instance = 1;
        assert_ne!(a, run(&mut TreeCounter::new(other).unwrap(), 1, 50, 8));
    }

    #[test]
    fn dp_tree_snapshot_restores_bit_identically() {
        for noise in [TreeNoise::Gaussian { rho: r(1, 3) }, TreeNoise::Laplace { epsilon: r(3, 2) }] {
            let horizon = 100;
            let mut live = TreeCounter::new(cfg(horizon, 6, noise, 9)).unwrap();
            for cut in [0u64, 1, 37, 64, 99] {
                let done = live.releases();
                run(&mut live, done + 1, cut, 6);
                let state = live.state();
                // Through bincode (the server's snapshot format) and serde.
                let bytes = bincode::encode_to_vec(&state, bincode::config::standard()).unwrap();
                let (decoded, _): (TreeState, _) =
                    bincode::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
                let json: TreeState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
                assert_eq!(decoded, state);
                assert_eq!(json, state);
                let mut restored = TreeCounter::restore(cfg(horizon, 6, noise, 9), &decoded).unwrap();
                assert_eq!(restored.spent(), live.spent());
                assert_eq!(restored.state(), state);
                let mut cont = live.clone();
                assert_eq!(run(&mut restored, cut + 1, horizon, 6), run(&mut cont, cut + 1, horizon, 6), "cut {cut}");
            }
        }
        // Inconsistent states are refused.
        let noise = TreeNoise::Gaussian { rho: r(1, 3) };
        let mut c = TreeCounter::new(cfg(10, 3, noise, 1)).unwrap();
        run(&mut c, 1, 5, 3);
        let mut s = c.state();
        s.nodes[1] = vec![0; 3]; // bit 1 of 5 is clear
        assert!(matches!(TreeCounter::restore(cfg(10, 3, noise, 1), &s), Err(DpError::InvalidState { .. })));
        let mut s = c.state();
        s.t = 11;
        assert!(matches!(TreeCounter::restore(cfg(10, 3, noise, 1), &s), Err(DpError::InvalidState { .. })));
    }

    #[test]
    fn dp_tree_horizon_domain_and_accounting() {
        let eps = r(2, 1);
        // T = 12: L = ⌊log₂12⌋ + 1 = 4 levels, all completing by T.
        let mut c = TreeCounter::new(cfg(12, 4, TreeNoise::Laplace { epsilon: eps }, 3)).unwrap();
        assert_eq!(c.levels(), 4);
        let before = c.state();
        assert!(matches!(c.step(&[0, 1, 2, 0]), Err(DpError::RecordOutOfDomain { .. })));
        assert!(matches!(c.step(&[0, 1]), Err(DpError::WrongDimension { .. })));
        assert_eq!(c.state(), before);
        // A run-wide ledger fed with the releases' charges agrees, and one
        // with a smaller budget refuses at the level that would exceed it.
        let mut ledger = Accountant::new(Budget::Pure(eps));
        let mut small = Accountant::new(Budget::Pure(r(1, 1)));
        for t in 1..=12u64 {
            let rel = c.step(&record(t, 4)).unwrap();
            if let Some(cost) = rel.charged {
                assert!(t.is_power_of_two());
                assert_eq!(ledger.charge(cost).unwrap(), rel.spent);
                // ε/L = 2/4 per level: the third level (t = 4) would make 3/2 > 1.
                assert_eq!(small.charge(cost).is_ok(), t < 4, "t={t}");
            }
            // (⌊log₂t⌋ + 1) levels of ε/L each.
            let levels_used = u128::from(t.ilog2() + 1);
            assert_eq!(rel.spent.epsilon, Some(r(2 * levels_used, 4)), "t={t}");
            assert_eq!(rel.spent, c.spent());
        }
        // The whole budget is spent by T (since t = 8), none of it wasted.
        assert_eq!(c.spent().epsilon, Some(eps));
        let before = c.state();
        assert_eq!(c.step(&[0; 4]), Err(DpError::HorizonExhausted { horizon: 12 }));
        assert_eq!(c.state(), before);
        // Gaussian: ρ spent reaches ρ·(⌊log₂T⌋+1)/L; T = 16 uses all 5 levels.
        let rho = r(1, 4);
        let mut g = TreeCounter::new(cfg(16, 2, TreeNoise::Gaussian { rho }, 3)).unwrap();
        let last = run(&mut g, 1, 16, 2);
        assert_eq!(last.len(), 16);
        assert_eq!(g.spent().rho, rho);
        assert_eq!(g.spent().epsilon, None);
        // Weight-bounded and integer domains.
        let mut w = cfg(4, 5, TreeNoise::Gaussian { rho }, 3);
        w.domain = RecordDomain::BinaryWeight { max_ones: 2 };
        let mut wc = TreeCounter::new(w).unwrap();
        assert!(matches!(wc.step(&[1, 1, 1, 0, 0]), Err(DpError::RecordOutOfDomain { .. })));
        wc.step(&[1, 0, 1, 0, 0]).unwrap();
        let mut i = cfg(4, 3, TreeNoise::Gaussian { rho }, 3);
        i.domain = RecordDomain::Integer { l1: 10, l2_sq: 50 };
        let mut ic = TreeCounter::new(i).unwrap();
        assert!(matches!(ic.step(&[-6, 5, 0]), Err(DpError::RecordOutOfDomain { .. })));
        assert!(matches!(ic.step(&[8, 0, 0]), Err(DpError::RecordOutOfDomain { .. })));
        ic.step(&[-5, 4, 1]).unwrap();
        assert_eq!(RecordDomain::Integer { l1: 10, l2_sq: 50 }.sensitivity(3), (20, 200));
    }

    #[test]
    fn dp_tree_clipped_sum_domain_sensitivity_and_bounds() {
        // L2: Δ₂² = 4·bound², Δ₁ = 2·bound·⌈√d⌉ (d = 10 → 4); L1: Δ₁ = 2·bound.
        let l2 = RecordDomain::ClippedSum { norm: ClipNorm::L2, bound: 3, count: 2 };
        assert_eq!(l2.sensitivity(10), (24, 36));
        assert_eq!(l2.sensitivity(9), (18, 36));
        let l1 = RecordDomain::ClippedSum { norm: ClipNorm::L1, bound: 3, count: 2 };
        assert_eq!(l1.sensitivity(10), (6, 36));
        // Sums of two contributions of norm ≤ 3 pass; more can't be.
        assert!(l2.check(&[3, 3, 0]).is_ok()); // (3,0,0) + (0,3,0)
        assert!(l2.check(&[7, 0, 0]).is_err());
        assert!(l2.check(&[5, 5, 0]).is_err()); // ‖·‖₂ = 7.07 > 6
        assert!(l1.check(&[3, 3, 0]).is_ok());
        assert!(l1.check(&[3, 3, 1]).is_err());
        // count·bound above 2²⁴ is refused before any release.
        let mut c = cfg(4, 3, TreeNoise::Gaussian { rho: r(1, 2) }, 1);
        c.domain = RecordDomain::ClippedSum { norm: ClipNorm::L2, bound: 1 << 16, count: 257 };
        assert!(matches!(TreeCounter::new(c.clone()), Err(DpError::OutOfRange { .. })));
        c.domain = RecordDomain::ClippedSum { norm: ClipNorm::L2, bound: 1 << 16, count: 256 };
        let mut t = TreeCounter::new(c).unwrap();
        assert!(t.step(&[1 << 24, 0, 0]).is_ok());
        assert!(matches!(t.step(&[(1 << 24) + 1, 0, 0]), Err(DpError::RecordOutOfDomain { .. })));
    }

    /// Bit-level reference: every release equals the sum, over the set bits
    /// ℓ of t, of node (ℓ, ⌊t/2^ℓ⌋ − 1)'s exact sum plus the noise drawn
    /// afresh from that node's named stream.
    #[test]
    fn dp_tree_release_is_the_dyadic_sum_of_keyed_nodes() {
        let (horizon, dim) = (45u64, 3usize);
        for noise in [TreeNoise::Gaussian { rho: r(1, 2) }, TreeNoise::Laplace { epsilon: r(1, 1) }] {
            let mut c = cfg(horizon, dim, noise, 77);
            c.instance = 9;
            let seed = c.seed.clone();
            let mut counter = TreeCounter::new(c).unwrap();
            let sampler = counter.noise;
            let xs: Vec<Vec<i64>> = (1..=horizon).map(|t| record(t, dim)).collect();
            for t in 1..=horizon {
                let got = counter.step(&xs[t as usize - 1]).unwrap().values;
                let mut want = vec![0i64; dim];
                for l in 0..counter.levels() {
                    if (t >> l) & 1 == 0 {
                        continue;
                    }
                    let i = (t >> l) - 1;
                    let mut src = seed.stream(9, l as u32, i as u32);
                    for (j, w) in want.iter_mut().enumerate() {
                        let exact: i64 = (i << l..(i + 1) << l).map(|s| xs[s as usize][j]).sum();
                        *w += exact + sampler.sample(&mut src);
                    }
                }
                assert_eq!(got, want, "t={t}");
            }
        }
    }

    #[test]
    fn dp_tree_zero_noise_limit_is_exact_prefix_sum() {
        // With a huge ε the Laplace scale is tiny (L·d/ε ≪ 1): almost all
        // noise is 0, and the releases equal the prefix sums.
        let mut c = TreeCounter::new(cfg(33, 3, TreeNoise::Laplace { epsilon: Ratio::integer(1 << 40) }, 1)).unwrap();
        let mut truth = [0i64; 3];
        for t in 1..=33 {
            let x = record(t, 3);
            for j in 0..3 {
                truth[j] += x[j];
            }
            assert_eq!(c.step(&x).unwrap().values, truth.to_vec(), "t={t}");
        }
    }
}
