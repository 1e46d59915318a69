//! Continual top-k selection and MaxSum over running column sums by the
//! sparse-vector technique: the `Õ(T^{1/3})` mechanism for the problems of
//! Jain, Raskhodnikova, Sivakumar and Smith, "The Price of Differential
//! Privacy under Continual Observation" (ICML 2023). The construction is
//! ours (the paper's exact algorithm is not reproduced); the argument is in
//! `docs/dp.md`.
//!
//! **Stream.** Records `x_t ∈ {0,1}^d`; exact column sums `C_t = Σ_{s≤t} x_s`
//! are kept inside. Replacing one record moves every `C_t[j]` by at most 1.
//!
//! **Mechanism.** An output (a k-set `Y`, or an estimate `m̂` of
//! `M_t = max_j C_t[j]`) is kept until AboveThreshold says it has fallen
//! behind, then refreshed:
//!
//! ```text
//! k_max = ⌈2T/τ⌉ + 1;  Δ = 2 (top-k) or 1 (MaxSum)
//! init:   Y ← PF-top-k(C = 0) (data-free) or m̂ ← 0;  τ̂ ← τ + Lap(2Δ/ε_svt)
//! step t: C += x_t
//!         q_t = C^{(k)} − min_{j∈Y} C[j]    (top-k; C^{(k)} the k-th largest)
//!         q_t = |M_t − m̂|                   (MaxSum)
//!         if s < k_max and q_t + Lap(4Δ/ε_svt) ≥ τ̂:
//!             refresh: Y ← PF-top-k(C) with ε_sel,  or  m̂ ← M_t + Lap(1/ε_sel)
//!             s += 1;  if s < k_max: τ̂ ← τ + Lap(2Δ/ε_svt)   (new AboveThreshold)
//!         output Y or m̂
//! ```
//!
//! Once `s = k_max` it halts: the last output stands until `T`. Noise is
//! the exact discrete Laplace ([`super::sampler`]); AboveThreshold's proof
//! goes through with integer noise, integer queries and integer shifts.
//! PF-top-k is `k` rounds of permute-and-flip (McKenna–Sheldon, NeurIPS
//! 2020) with `ε_sel/k` each on the utilities `C[j]` (sensitivity 1, not
//! monotone under replacement, hence the `ε/2` in its acceptance
//! probability `exp(−ε_sel·(q* − C[r])/(2k))`), each pick removed before the
//! next. It is ε-DP like the exponential mechanism and needs only exact
//! Bernoulli(exp(−γ)) draws.
//!
//! **Privacy.** At most `k_max` AboveThreshold instances (each `ε_svt`-DP
//! until it fires) and `k_max` refreshes (each `ε_sel`-DP), composed
//! adaptively: `k_max·(ε_svt + ε_sel)`-DP, and
//! `k_max·(ε_svt² + ε_sel²)/2`-zCDP. The [`Accountant`] is charged `ε_svt`
//! when an instance starts and `ε_sel` at each refresh.
//!
//! **Noise streams** (server-secret, [`super::noise`]), with
//! `round = instance`: threshold of instance `a`: `client =`
//! [`THRESHOLD_STREAM`], `step = a`; query noise at `t`: [`QUERY_STREAM`],
//! `t − 1`; refresh number `s` (0 = the initial, data-free one):
//! [`SELECT_STREAM`], `s`. These `client` values are above any tree level,
//! so a tree and an SVT sharing an instance number still draw apart.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use super::accountant::{Accountant, Budget, Cost, Spent};
use super::noise::NoiseSeed;
use super::sampler::{DiscreteLaplace, bernoulli_exp};
use super::tree::MAX_HORIZON;
use super::{DpError, NoiseSource, Ratio};

/// `client` of threshold-noise streams.
pub const THRESHOLD_STREAM: u32 = 0x8000_0000;
/// `client` of query-noise streams.
pub const QUERY_STREAM: u32 = 0x8000_0001;
/// `client` of refresh (selection / estimate) streams.
pub const SELECT_STREAM: u32 = 0x8000_0002;

/// Largest dimension, 2³²: selected columns are reported as `u32`.
pub const MAX_DIM: usize = 1 << 32;

/// Version of [`SvtState`].
pub const SVT_STATE_VERSION: u32 = 1;

/// What is released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A set of `k` columns with (nearly) the largest sums (SumSelect for
    /// k = 1).
    TopK {
        /// Set size, `1 ≤ k ≤ d`.
        k: usize,
    },
    /// An estimate of the largest column sum.
    MaxSum,
}

/// Configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvtConfig {
    /// Horizon T, at most [`MAX_HORIZON`].
    pub horizon: u64,
    /// Columns d.
    pub dim: usize,
    /// What to release.
    pub target: Target,
    /// Threshold τ ≥ 1 (error scale; switches ≤ `⌈2T/τ⌉ + 1`).
    pub threshold: u64,
    /// ε of each AboveThreshold instance.
    pub eps_svt: Ratio,
    /// ε of each refresh.
    pub eps_sel: Ratio,
    /// The server's secret noise seed.
    pub seed: NoiseSeed,
    /// Which mechanism of the run this is (the `round` of its streams).
    pub instance: u32,
    /// How PF-top-k draws its selection.
    pub sampler: Sampler,
}

/// How PF-top-k is run. Both draw from exactly the same distribution (the
/// selection's law depends only on the utilities); they read the noise
/// stream differently, so a run keeps the one it started with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sampler {
    /// Lazy Fisher–Yates over the candidates in canonical order, re-sorted
    /// after each pick: `O(k·d·log d)` per refresh. Fine for the stream
    /// experiments' small d; the original, whose outputs existing results
    /// were made with.
    #[default]
    Scan,
    /// Candidates grouped by their count ("buckets"): a uniformly random
    /// unvisited candidate is a bucket drawn with probability proportional
    /// to its unvisited members, and since members of a bucket are
    /// exchangeable the accepted one is uniform among the bucket's
    /// remaining members. `O(d + k·b)` per refresh for `b ≤ T + 1` distinct
    /// counts when acceptance is likely (as it is when `ε_sel/k` is small),
    /// so a layer of 1.6 M edges with `k = d/2` is feasible.
    Buckets,
}

impl SvtConfig {
    /// The switch budget `⌈2T/τ⌉ + 1`.
    pub fn max_switches(&self) -> u64 {
        (2 * self.horizon).div_ceil(self.threshold.max(1)) + 1
    }
}

/// State between releases, for the server's snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct SvtState {
    /// [`SVT_STATE_VERSION`].
    pub version: u32,
    /// Releases made.
    pub t: u64,
    /// Exact column sums.
    pub counts: Vec<u64>,
    /// Current selection, ascending (top-k; empty for MaxSum).
    pub selected: Vec<u32>,
    /// Current estimate (MaxSum; 0 for top-k).
    pub estimate: i64,
    /// Refreshes made (s).
    pub switches: u64,
    /// Noisy threshold τ̂ of the running AboveThreshold instance.
    pub noisy_threshold: i64,
}

/// One release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvtRelease {
    /// Its index t.
    pub t: u64,
    /// The selection, ascending (top-k; empty for MaxSum).
    pub selected: Vec<u32>,
    /// The estimate (MaxSum; `None` for top-k).
    pub estimate: Option<i64>,
    /// Whether this step refreshed the output.
    pub switched: bool,
    /// Refreshes so far.
    pub switches: u64,
    /// Privacy spent so far.
    pub spent: Spent,
    /// What this release added to it (`ε_sel` and, unless the budget of
    /// switches is now used up, `ε_svt` for the next instance), for a caller
    /// that also keeps a run-wide [`Accountant`].
    pub charged: Vec<Cost>,
}

/// The sparse-vector mechanism (module docs).
#[derive(Clone, Debug)]
pub struct SparseVector {
    cfg: SvtConfig,
    k_max: u64,
    threshold_noise: DiscreteLaplace,
    query_noise: DiscreteLaplace,
    /// MaxSum refresh noise, scale `1/ε_sel`.
    estimate_noise: Option<DiscreteLaplace>,
    accountant: Accountant,
    state: SvtState,
}

impl SparseVector {
    /// A fresh mechanism; draws the initial (data-free) output and the first
    /// threshold.
    pub fn new(cfg: SvtConfig) -> Result<Self, DpError> {
        let mut m = SparseVector::unstarted(cfg)?;
        let mut st = m.state.clone();
        if let Target::TopK { k } = m.cfg.target {
            st.selected = m.select(&st.counts, k, 0)?;
        }
        st.noisy_threshold = m.draw_threshold(0);
        m.accountant.charge(Cost::Pure(m.cfg.eps_svt))?;
        m.state = st;
        Ok(m)
    }

    fn unstarted(cfg: SvtConfig) -> Result<Self, DpError> {
        if cfg.horizon == 0 || cfg.horizon > MAX_HORIZON {
            return Err(DpError::OutOfRange { what: "horizon", limit: "1 to 2^32 (tree::MAX_HORIZON)" });
        }
        if cfg.dim == 0 || cfg.dim > MAX_DIM {
            return Err(DpError::OutOfRange { what: "dimension", limit: "1 to 2^32 (svt::MAX_DIM)" });
        }
        if let Target::TopK { k } = cfg.target
            && (k == 0 || k > cfg.dim)
        {
            return Err(DpError::InvalidParameter { what: "k", reason: "must be in 1..=d" });
        }
        if cfg.threshold == 0 || cfg.threshold > MAX_HORIZON {
            return Err(DpError::OutOfRange { what: "threshold", limit: "1 to 2^32" });
        }
        if cfg.eps_svt.is_zero() || cfg.eps_sel.is_zero() {
            return Err(DpError::InvalidParameter { what: "epsilon", reason: "must be positive" });
        }
        let delta = Ratio::integer(match cfg.target {
            Target::TopK { .. } => 2,
            Target::MaxSum => 1,
        });
        let two_delta = delta.checked_mul(Ratio::integer(2))?;
        let threshold_noise = DiscreteLaplace::new(two_delta.checked_div(cfg.eps_svt)?)?;
        let query_noise = DiscreteLaplace::new(two_delta.checked_mul(Ratio::integer(2))?.checked_div(cfg.eps_svt)?)?;
        let estimate_noise = match cfg.target {
            Target::MaxSum => Some(DiscreteLaplace::new(Ratio::integer(1).checked_div(cfg.eps_sel)?)?),
            Target::TopK { .. } => None,
        };
        let k_max = cfg.max_switches();
        if k_max > u64::from(u32::MAX) {
            // Refresh and threshold streams are named by the switch number.
            return Err(DpError::OutOfRange { what: "switch budget 2T/τ + 1", limit: "below 2^32 (raise τ)" });
        }
        let total = Ratio::integer(u128::from(k_max)).checked_mul(cfg.eps_svt.checked_add(cfg.eps_sel)?)?;
        let state = SvtState {
            version: SVT_STATE_VERSION,
            t: 0,
            counts: vec![0; cfg.dim],
            selected: Vec::new(),
            estimate: 0,
            switches: 0,
            noisy_threshold: 0,
        };
        Ok(SparseVector {
            k_max,
            threshold_noise,
            query_noise,
            estimate_noise,
            accountant: Accountant::new(Budget::Pure(total)),
            state,
            cfg,
        })
    }

    /// A mechanism continuing from `state` (same configuration).
    pub fn restore(cfg: SvtConfig, state: &SvtState) -> Result<Self, DpError> {
        let mut m = SparseVector::unstarted(cfg)?;
        let bad = |reason| Err(DpError::InvalidState { reason });
        if state.version != SVT_STATE_VERSION {
            return bad("unknown SVT state version");
        }
        if state.t > m.cfg.horizon || state.switches > m.k_max || state.counts.len() != m.cfg.dim {
            return bad("release count, switch count or dimension out of range");
        }
        if state.counts.iter().any(|&c| c > state.t) {
            return bad("a column sum exceeds the number of records");
        }
        match m.cfg.target {
            Target::TopK { k } => {
                let ascending = state.selected.windows(2).all(|w| w[0] < w[1]);
                if state.selected.len() != k || !ascending || state.selected.iter().any(|&j| j as usize >= m.cfg.dim) {
                    return bad("selection is not k distinct columns in ascending order");
                }
            }
            Target::MaxSum => {
                if !state.selected.is_empty() {
                    return bad("MaxSum state with a selection");
                }
            }
        }
        // Replay the charges: the first instance, then each refresh and the
        // instance it starts.
        m.accountant.charge(Cost::Pure(m.cfg.eps_svt))?;
        for s in 1..=state.switches {
            m.accountant.charge(Cost::Pure(m.cfg.eps_sel))?;
            if s < m.k_max {
                m.accountant.charge(Cost::Pure(m.cfg.eps_svt))?;
            }
        }
        m.state = state.clone();
        Ok(m)
    }

    /// The state to snapshot.
    pub fn state(&self) -> &SvtState {
        &self.state
    }

    /// The switch budget k_max.
    pub fn max_switches(&self) -> u64 {
        self.k_max
    }

    /// Privacy spent so far.
    pub fn spent(&self) -> Spent {
        self.accountant.spent()
    }

    fn stream(&self, client: u32, step: u64) -> NoiseSource {
        // step is t − 1 < T ≤ 2³² or a switch number ≤ k_max < 2³² (both
        // checked at construction), so it fits.
        self.cfg.seed.stream(self.cfg.instance, client, step as u32)
    }

    fn draw_threshold(&self, instance: u64) -> i64 {
        let noise = self.threshold_noise.sample(&mut self.stream(THRESHOLD_STREAM, instance));
        // τ ≤ 2³², |noise| ≤ 2⁵³.
        self.cfg.threshold as i64 + noise
    }

    /// PF-top-k (module docs) over `counts`, from refresh stream `refresh`.
    fn select(&self, counts: &[u64], k: usize, refresh: u64) -> Result<Vec<u32>, DpError> {
        if self.cfg.sampler == Sampler::Buckets {
            return self.select_buckets(counts, k, refresh);
        }
        let mut src = self.stream(SELECT_STREAM, refresh);
        let mut candidates: Vec<u32> = (0..counts.len() as u64).map(|j| j as u32).collect();
        let per_pick = self.cfg.eps_sel.checked_div(Ratio::integer(2 * k as u128))?;
        let mut picked = Vec::with_capacity(k);
        for _ in 0..k {
            let best = candidates.iter().map(|&j| counts[j as usize]).max().unwrap_or(0);
            // Permute-and-flip: visit candidates in a uniformly random order
            // (lazy Fisher–Yates), accept each with exp(−ε·gap/(2k)); the
            // best has gap 0 and is always accepted, so one pass suffices.
            let n = candidates.len();
            let mut chosen = n.saturating_sub(1);
            for i in 0..n {
                let j = i + src.below((n - i) as u128) as usize;
                candidates.swap(i, j);
                let gap = best - counts[candidates[i] as usize];
                if bernoulli_exp(&mut src, per_pick.checked_mul(Ratio::integer(u128::from(gap)))?) {
                    chosen = i;
                    break;
                }
            }
            picked.push(candidates.swap_remove(chosen));
            // Canonical candidate order for the next pick.
            candidates.sort_unstable();
        }
        picked.sort_unstable();
        Ok(picked)
    }

    /// PF-top-k by buckets ([`Sampler::Buckets`]): the same distribution as
    /// the scan.
    fn select_buckets(&self, counts: &[u64], k: usize, refresh: u64) -> Result<Vec<u32>, DpError> {
        let mut src = self.stream(SELECT_STREAM, refresh);
        let per_pick = self.cfg.eps_sel.checked_div(Ratio::integer(2 * k as u128))?;
        // Buckets by count, descending; members ascending (canonical).
        let mut order: Vec<u32> = (0..counts.len() as u64).map(|j| j as u32).collect();
        order.sort_by_key(|&j| std::cmp::Reverse(counts[j as usize]));
        let mut buckets: Vec<(u64, Vec<u32>)> = Vec::new();
        for j in order {
            let c = counts[j as usize];
            match buckets.last_mut() {
                Some((bc, members)) if *bc == c => members.push(j),
                _ => buckets.push((c, vec![j])),
            }
        }
        let mut picked = Vec::with_capacity(k);
        let mut unvisited: Vec<u64> = Vec::with_capacity(buckets.len());
        for _ in 0..k {
            buckets.retain(|(_, m)| !m.is_empty());
            // k ≤ d, so a candidate remains; the first bucket holds the best.
            let best = buckets.first().map(|b| b.0).unwrap_or(0);
            unvisited.clear();
            unvisited.extend(buckets.iter().map(|(_, m)| m.len() as u64));
            let mut total: u64 = unvisited.iter().sum();
            let chosen = loop {
                // The next candidate of the random visiting order.
                let mut r = src.below(u128::from(total)) as u64;
                let mut b = 0;
                while r >= unvisited[b] {
                    r -= unvisited[b];
                    b += 1;
                }
                let gap = best - buckets[b].0;
                // The best bucket (gap 0) always accepts, so this ends
                // before every candidate is visited.
                if gap == 0 || bernoulli_exp(&mut src, per_pick.checked_mul(Ratio::integer(u128::from(gap)))?) {
                    break b;
                }
                unvisited[b] -= 1;
                total -= 1;
            };
            let members = &mut buckets[chosen].1;
            let i = src.below(members.len() as u128) as usize;
            // swap_remove keeps the order a function of the draws alone
            // (deterministic) at O(1); a uniform draw needs no other order.
            picked.push(members.swap_remove(i));
        }
        picked.sort_unstable();
        Ok(picked)
    }

    fn query(&self, counts: &[u64]) -> i64 {
        match self.cfg.target {
            Target::TopK { k } => {
                let mut sorted = counts.to_vec();
                let kth = *sorted.select_nth_unstable_by(k - 1, |a, b| b.cmp(a)).1;
                let min_sel = self.state.selected.iter().map(|&j| counts[j as usize]).min().unwrap_or(0);
                // Counts ≤ T ≤ 2³²; C^{(k)} ≥ the minimum over any k columns.
                kth as i64 - min_sel as i64
            }
            Target::MaxSum => {
                let max = counts.iter().copied().max().unwrap_or(0) as i64;
                (max - self.state.estimate).abs()
            }
        }
    }

    /// Takes record `x_t ∈ {0,1}^d` and releases the output at `t`. Refuses
    /// (state unchanged) a record that is not 0/1 or of the wrong length, and
    /// any release past the horizon.
    pub fn step(&mut self, record: &[i64]) -> Result<SvtRelease, DpError> {
        if self.state.t >= self.cfg.horizon {
            return Err(DpError::HorizonExhausted { horizon: self.cfg.horizon });
        }
        if record.len() != self.cfg.dim {
            return Err(DpError::WrongDimension { expected: self.cfg.dim, got: record.len() });
        }
        if record.iter().any(|&v| v != 0 && v != 1) {
            return Err(DpError::RecordOutOfDomain { reason: "entry not 0 or 1" });
        }
        let mut st = self.state.clone();
        let mut accountant = self.accountant.clone();
        st.t += 1;
        for (c, &v) in st.counts.iter_mut().zip(record) {
            *c += v as u64;
        }
        let mut switched = false;
        let mut charged = Vec::new();
        if st.switches < self.k_max {
            let q = self.query(&st.counts);
            let nu = self.query_noise.sample(&mut self.stream(QUERY_STREAM, st.t - 1));
            if q + nu >= st.noisy_threshold {
                let s = st.switches + 1;
                match self.cfg.target {
                    Target::TopK { k } => st.selected = self.select(&st.counts, k, s)?,
                    Target::MaxSum => {
                        let max = st.counts.iter().copied().max().unwrap_or(0) as i64;
                        let noise = match &self.estimate_noise {
                            Some(l) => l.sample(&mut self.stream(SELECT_STREAM, s)),
                            None => 0,
                        };
                        st.estimate = max + noise;
                    }
                }
                charged.push(Cost::Pure(self.cfg.eps_sel));
                if s < self.k_max {
                    st.noisy_threshold = self.draw_threshold(s);
                    charged.push(Cost::Pure(self.cfg.eps_svt));
                }
                for &cost in &charged {
                    accountant.charge(cost)?;
                }
                st.switches = s;
                switched = true;
            }
        }
        self.state = st;
        self.accountant = accountant;
        let (selected, estimate) = match self.cfg.target {
            Target::TopK { .. } => (self.state.selected.clone(), None),
            Target::MaxSum => (Vec::new(), Some(self.state.estimate)),
        };
        Ok(SvtRelease {
            t: self.state.t,
            selected,
            estimate,
            switched,
            switches: self.state.switches,
            spent: self.accountant.spent(),
            charged,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::rng::splitmix64;

    fn r(n: u128, d: u128) -> Ratio {
        Ratio::new(n, d).unwrap()
    }

    fn cfg(horizon: u64, dim: usize, target: Target, threshold: u64, eps: Ratio, seed: u64) -> SvtConfig {
        SvtConfig {
            horizon,
            dim,
            target,
            threshold,
            eps_svt: eps,
            eps_sel: eps,
            seed: NoiseSeed::insecure_from_u64(seed),
            instance: 0,
            sampler: Sampler::Scan,
        }
    }

    /// Column `winners` always 1, others Bernoulli(1/4), deterministically.
    fn clear_winner(t: u64, dim: usize, winners: &[usize]) -> Vec<i64> {
        (0..dim)
            .map(|j| if winners.contains(&j) { 1 } else { i64::from(splitmix64(t << 20 | j as u64).is_multiple_of(4)) })
            .collect()
    }

    /// Leader rotation: blocks of `b` steps, each adding to the next of
    /// `lead` columns, so the leader changes often.
    fn rotation(t: u64, dim: usize, lead: usize, b: u64) -> Vec<i64> {
        let hot = ((t / b) as usize) % lead;
        (0..dim).map(|j| i64::from(j == hot)).collect()
    }

    #[test]
    fn dp_svt_releases_a_clear_winner() {
        for seed in 0..5 {
            let mut m = SparseVector::new(cfg(400, 16, Target::TopK { k: 1 }, 30, r(1, 1), seed)).unwrap();
            let mut last = None;
            for t in 1..=400 {
                last = Some(m.step(&clear_winner(t, 16, &[5])).unwrap());
            }
            let last = last.unwrap();
            assert_eq!(last.selected, vec![5], "seed {seed}");
            assert!(last.switches >= 1 && last.switches <= m.max_switches());
            let mut m = SparseVector::new(cfg(400, 16, Target::TopK { k: 2 }, 30, r(1, 1), seed)).unwrap();
            let mut sel = Vec::new();
            for t in 1..=400 {
                sel = m.step(&clear_winner(t, 16, &[3, 11])).unwrap().selected;
            }
            assert_eq!(sel, vec![3, 11], "seed {seed}");
        }
    }

    #[test]
    fn dp_svt_maxsum_tracks_the_maximum() {
        let tau = 30;
        for seed in 0..5 {
            let mut m = SparseVector::new(cfg(400, 16, Target::MaxSum, tau, r(1, 1), seed)).unwrap();
            let mut worst = 0;
            for t in 1..=400u64 {
                let rel = m.step(&clear_winner(t, 16, &[5])).unwrap();
                // M_t = t (column 5 is always 1).
                worst = worst.max((rel.estimate.unwrap() - t as i64).abs());
            }
            // Error stays about τ plus noise; with ε = 1 the noises are a few units.
            assert!(worst <= 2 * tau as i64, "seed {seed}: max error {worst}");
            assert!(m.state().switches <= m.max_switches());
        }
    }

    #[test]
    fn dp_svt_never_exceeds_its_switch_budget_and_then_halts() {
        // Heavy noise (ε = 1/100) makes AboveThreshold fire about every
        // other step, far more often than k_max = ⌈2T/τ⌉ + 1 allows.
        let (horizon, tau) = (200u64, 20u64);
        for target in [Target::TopK { k: 1 }, Target::TopK { k: 3 }, Target::MaxSum] {
            let c = cfg(horizon, 12, target, tau, r(1, 100), 4);
            let k_max = c.max_switches();
            assert_eq!(k_max, 21);
            let mut m = SparseVector::new(c).unwrap();
            let mut halted_output = None;
            for t in 1..=horizon {
                let rel = m.step(&rotation(t, 12, 4, 3)).unwrap();
                assert!(rel.switches <= k_max);
                if rel.switches == k_max {
                    let out = (rel.selected.clone(), rel.estimate);
                    match &halted_output {
                        None => halted_output = Some((out, rel.spent)),
                        Some((o, spent)) => {
                            assert!(!rel.switched);
                            assert_eq!(&out, o, "output changed after halting");
                            assert_eq!(&rel.spent, spent, "spent grew after halting");
                        }
                    }
                }
            }
            assert!(halted_output.is_some(), "{target:?}: the budget was never reached (test too weak)");
            // Everything charged: k_max·(ε_svt + ε_sel) = 21·2/100.
            assert_eq!(m.spent().epsilon, Some(r(42, 100)));
        }
        // With a sane threshold and budget the rotation stream switches far
        // less than k_max, and never more.
        for seed in 0..10 {
            let c = cfg(2000, 32, Target::TopK { k: 1 }, 40, r(1, 2), seed);
            let k_max = c.max_switches();
            let mut m = SparseVector::new(c).unwrap();
            for t in 1..=2000 {
                assert!(m.step(&rotation(t, 32, 6, 25)).unwrap().switches <= k_max);
            }
        }
    }

    #[test]
    fn dp_svt_accounting_deterministic_and_restores_bit_identically() {
        let c = cfg(300, 10, Target::TopK { k: 2 }, 12, r(1, 3), 8);
        let mut a = SparseVector::new(c.clone()).unwrap();
        assert_eq!(a.spent().epsilon, Some(r(1, 3)), "the first AboveThreshold is charged at start");
        let mut outs = Vec::new();
        let mut run = Accountant::new(Budget::Pure(r(1000, 1)));
        run.charge(Cost::Pure(r(1, 3))).unwrap();
        for t in 1..=300 {
            let rel = a.step(&rotation(t, 10, 3, 7)).unwrap();
            for &cost in &rel.charged {
                run.charge(cost).unwrap();
            }
            assert_eq!(run.spent(), rel.spent);
            assert_eq!(rel.switched, !rel.charged.is_empty());
            let s = u128::from(rel.switches);
            let instances = (s + 1).min(u128::from(a.max_switches()));
            assert_eq!(rel.spent.epsilon, Some(r(s + instances, 3)));
            outs.push(rel);
        }
        assert_eq!(a.step(&[0; 10]), Err(DpError::HorizonExhausted { horizon: 300 }));
        // Same seed ⇒ same releases; another seed ⇒ others.
        let replay = |seed: u64| {
            let mut m = SparseVector::new(SvtConfig { seed: NoiseSeed::insecure_from_u64(seed), ..c.clone() }).unwrap();
            (1..=300).map(|t| m.step(&rotation(t, 10, 3, 7)).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(replay(8), outs);
        assert_ne!(replay(9), outs);
        // Snapshot at several cuts, through bincode, and continue.
        for cut in [0u64, 1, 50, 299] {
            let mut live = SparseVector::new(c.clone()).unwrap();
            for t in 1..=cut {
                live.step(&rotation(t, 10, 3, 7)).unwrap();
            }
            let bytes = bincode::encode_to_vec(live.state(), bincode::config::standard()).unwrap();
            let (state, _): (SvtState, _) = bincode::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
            let mut restored = SparseVector::restore(c.clone(), &state).unwrap();
            assert_eq!(restored.spent(), live.spent());
            for t in cut + 1..=300 {
                let x = rotation(t, 10, 3, 7);
                assert_eq!(restored.step(&x).unwrap(), live.step(&x).unwrap(), "cut {cut}, t {t}");
            }
        }
        // Bad records and states are refused.
        let mut m = SparseVector::new(c.clone()).unwrap();
        assert!(matches!(m.step(&[2; 10]), Err(DpError::RecordOutOfDomain { .. })));
        let mut s = m.state().clone();
        s.selected = vec![3, 3];
        assert!(matches!(SparseVector::restore(c.clone(), &s), Err(DpError::InvalidState { .. })));
        assert!(matches!(
            SparseVector::new(SvtConfig { target: Target::TopK { k: 11 }, ..c.clone() }),
            Err(DpError::InvalidParameter { .. })
        ));
        // A switch budget whose stream names would not fit in u32.
        assert!(matches!(
            SparseVector::new(SvtConfig { horizon: MAX_HORIZON, threshold: 1, ..c }),
            Err(DpError::OutOfRange { .. })
        ));
    }

    #[test]
    fn dp_svt_bucket_sampler_draws_the_scan_samplers_distribution() {
        // Selection frequencies of both samplers over many refresh streams,
        // against each other and against permute-and-flip's exact law for
        // k = 1 (utilities 6, 5, 5, 0 at ε = 1: acceptance exp(−gap/2)).
        let counts = [6u64, 5, 5, 0, 2];
        for k in [1usize, 2] {
            let freq = |sampler: Sampler| {
                let c = SvtConfig { sampler, ..cfg(100, 5, Target::TopK { k }, 10, r(1, 1), 3) };
                let m = SparseVector::new(c).unwrap();
                let mut f = std::collections::BTreeMap::<Vec<u32>, f64>::new();
                let n = 20_000u64;
                for refresh in 1..=n {
                    *f.entry(m.select(&counts, k, refresh).unwrap()).or_default() += 1.0 / n as f64;
                }
                f
            };
            let (scan, buckets) = (freq(Sampler::Scan), freq(Sampler::Buckets));
            for (set, p) in scan.iter().chain(buckets.iter()) {
                let (a, b) = (scan.get(set).copied().unwrap_or(0.0), buckets.get(set).copied().unwrap_or(0.0));
                assert!((a - b).abs() < 0.02, "k {k}, {set:?}: scan {a:.3}, buckets {b:.3} ({p})");
            }
            if k == 1 {
                // Exact PF law for utilities q with ε/2 per gap unit.
                let q: Vec<f64> = counts.iter().map(|&c| (-(6.0 - c as f64) / 2.0).exp()).collect();
                let exact = pf_law(&q);
                for (j, want) in exact.iter().enumerate() {
                    let got = buckets.get(&vec![j as u32]).copied().unwrap_or(0.0);
                    assert!((got - want).abs() < 0.02, "column {j}: {got:.3} vs exact {want:.3}");
                }
            }
        }
    }

    /// Permute-and-flip's selection law for acceptance probabilities `p`
    /// (exact, by enumerating visiting orders).
    fn pf_law(p: &[f64]) -> Vec<f64> {
        fn rec(p: &[f64], left: &mut Vec<usize>, mass: f64, out: &mut [f64]) {
            let n = left.len();
            for i in 0..n {
                let j = left.remove(i);
                out[j] += mass / n as f64 * p[j];
                if p[j] < 1.0 {
                    rec(p, left, mass / n as f64 * (1.0 - p[j]), out);
                }
                left.insert(i, j);
            }
        }
        let mut out = vec![0.0; p.len()];
        rec(p, &mut (0..p.len()).collect(), 1.0, &mut out);
        out
    }

    #[test]
    fn dp_svt_bucket_sampler_releases_a_clear_winner_and_restores() {
        for seed in 0..3 {
            let c = SvtConfig { sampler: Sampler::Buckets, ..cfg(400, 16, Target::TopK { k: 2 }, 30, r(1, 1), seed) };
            let mut m = SparseVector::new(c.clone()).unwrap();
            let mut sel = Vec::new();
            for t in 1..=400 {
                if t == 200 {
                    m = SparseVector::restore(c.clone(), m.state()).unwrap();
                }
                sel = m.step(&clear_winner(t, 16, &[3, 11])).unwrap().selected;
            }
            assert_eq!(sel, vec![3, 11], "seed {seed}");
        }
    }
}
