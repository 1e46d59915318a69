//! The stream experiments: one function per (problem, cell, seed), each
//! returning the error of every mechanism on the same stream.
//!
//! **Randomness.** A cell (experiment, T, d) run with seed `s` draws its
//! stream from a [`LocalRng`] keyed by `hash_seed(s, TAG_DP_DATA, cell)` and
//! all its noise from a [`NoiseSeed`] built from
//! `hash_seed(s, TAG_DP_NOISE, cell)`, as one run of a server would: one
//! secret seed per run, and a distinct `instance` per mechanism of the run
//! (the dp module's naming rule). So every number depends only on the seed
//! and the cell, not on thread count or the order in which cells run.
//! `NoiseSeed::insecure_from_u64` is the constructor the dp module reserves
//! for simulations.

use tally_protocol::dp::sampler::bernoulli_exp;
use tally_protocol::dp::svt::{Sampler, SvtRelease};
use tally_protocol::dp::tree::levels_for;
use tally_protocol::dp::{
    DiscreteGaussian, DiscreteLaplace, NoiseSeed, NoiseSource, Ratio, RecordDomain, SparseVector, SvtConfig, Target,
    TreeConfig, TreeCounter, TreeNoise,
};
use tally_protocol::rng::LocalRng;

use super::{DpStreamError, Row};
use crate::hash_seed;

/// Sub-seed tag of the experiments' data streams (the scenario tags of
/// `lib.rs` end at 6).
pub(crate) const TAG_DP_DATA: u64 = 7;
/// Sub-seed tag of the experiments' noise seeds.
pub(crate) const TAG_DP_NOISE: u64 = 8;

/// Denominator of the rationals that approximate real parameters (ε of a
/// segment, the batch ε): 2²⁴, fine enough that rounding down loses < 10⁻⁶
/// of the budget, small enough for the samplers' 2⁶⁰ limit.
const RATIO_DEN: u128 = 1 << 24;

/// `x` rounded down to a multiple of 2⁻²⁴ (so a budget computed from it is
/// never exceeded); refuses values that round to 0.
pub(crate) fn ratio_floor(x: f64, what: &'static str) -> Result<Ratio, DpStreamError> {
    let num = (x * RATIO_DEN as f64).floor();
    if !(1.0..1e30).contains(&num) {
        return Err(DpStreamError::Config(format!("{what} = {x} is not a usable positive number")));
    }
    Ok(Ratio::new(num as u128, RATIO_DEN)?)
}

/// The per-cell seeds (module docs).
fn cell_rngs(seed: u64, cell: u64) -> (LocalRng, NoiseSeed) {
    (
        LocalRng::new(hash_seed(seed, TAG_DP_DATA, cell)),
        NoiseSeed::insecure_from_u64(hash_seed(seed, TAG_DP_NOISE, cell)),
    )
}

/// ℓ∞ distance of a release from the truth.
fn linf(values: &[i64], truth: &[i64]) -> u64 {
    values.iter().zip(truth).map(|(v, c)| v.abs_diff(*c)).max().unwrap_or(0)
}

/// Independent batch releases per seed and cell; their mean error
/// estimates the batch mechanism's expected error.
pub(crate) const BATCH_RELEASES: u32 = 256;

/// The record domain of the counting experiments: one-hot votes (at most
/// one 1), so the sensitivities do not grow with d and the error's
/// dependence on d is the union over coordinates alone.
pub(crate) const COUNT_DOMAIN: RecordDomain = RecordDomain::BinaryWeight { max_ones: 1 };

/// Continual counting of a d-dimensional vote stream: at each step a voter
/// picks one of `d` options uniformly, or abstains (probability 1/2; all
/// zeros). The tree's error does not depend on the data (it is the sum of
/// the decomposition's node noises), but the stream is real so the code path
/// is the one a server runs. Rows: tree with Laplace (ε) and Gaussian (ρ)
/// noise, max over t and mean over t of the ℓ∞ error; the batch baselines
/// release `C_T` once with the whole budget.
pub(crate) fn counting(
    experiment: &'static str,
    horizon: u64,
    dim: usize,
    epsilon: Ratio,
    rho: Ratio,
    seed: u64,
    cell: u64,
) -> Result<Vec<Row>, DpStreamError> {
    let (mut data, noise) = cell_rngs(seed, cell);
    let tree = |instance, n| TreeConfig { horizon, dim, domain: COUNT_DOMAIN, noise: n, seed: noise.clone(), instance };
    let mut lap = TreeCounter::new(tree(0, TreeNoise::Laplace { epsilon }))?;
    let mut gau = TreeCounter::new(tree(1, TreeNoise::Gaussian { rho }))?;
    let mut counts = vec![0i64; dim];
    let mut record = vec![0i64; dim];
    let (mut lap_max, mut lap_sum, mut gau_max, mut gau_sum) = (0u64, 0f64, 0u64, 0f64);
    for _ in 0..horizon {
        record.fill(0);
        let r = data.below(2 * dim as u64) as usize;
        if r < dim {
            record[r] = 1;
            counts[r] += 1;
        }
        let e = linf(&lap.step(&record)?.values, &counts);
        lap_max = lap_max.max(e);
        lap_sum += e as f64;
        let e = linf(&gau.step(&record)?.values, &counts);
        gau_max = gau_max.max(e);
        gau_sum += e as f64;
    }
    // Batch: one release of C_T, noise calibrated to one record's
    // replacement sensitivity with the whole ε (Laplace) or ρ (Gaussian).
    // Release 0 is the batch mechanism's error; the mean over
    // BATCH_RELEASES independent releases estimates its expected error, the
    // denominator of the price (a single draw would make the ratio noisy).
    let (d1, d2) = COUNT_DOMAIN.sensitivity(dim);
    let bl = DiscreteLaplace::new(Ratio::integer(d1).checked_div(epsilon)?)?;
    let bg = DiscreteGaussian::new(Ratio::integer(d2).checked_div(rho.checked_mul(Ratio::integer(2))?)?)?;
    let batch = |instance: u32, sample: &dyn Fn(&mut NoiseSource) -> i64| {
        let errs: Vec<u64> = (0..BATCH_RELEASES)
            .map(|i| {
                let mut src = noise.stream(instance, 0, i);
                (0..dim).map(|_| sample(&mut src).unsigned_abs()).max().unwrap_or(0)
            })
            .collect();
        (errs[0], errs.iter().sum::<u64>() as f64 / f64::from(BATCH_RELEASES))
    };
    let (batch_lap, batch_lap_mean) = batch(2, &|src| bl.sample(src));
    let (batch_gau, batch_gau_mean) = batch(3, &|src| bg.sample(src));
    let t = horizon as f64;
    let row = |mechanism: &'static str, max_error: u64, mean_error: f64| Row {
        experiment,
        problem: "count",
        mechanism,
        horizon,
        dim,
        seed,
        tau_mult: 0.0,
        tau: 0,
        max_switches: 0,
        switches: 0,
        max_error,
        mean_error,
    };
    Ok(vec![
        row("tree-laplace", lap_max, lap_sum / t),
        row("tree-gaussian", gau_max, gau_sum / t),
        row("batch-laplace", batch_lap, batch_lap_mean),
        row("batch-gaussian", batch_gau, batch_gau_mean),
    ])
}

/// The "pull-ahead / catch-up" selection stream (`docs/dp.md`, experiments).
/// `T` is cut into 8 blocks of `B = ⌈T/8⌉` steps. In even blocks a hot
/// column, drawn uniformly among the d, gets a 1 at every step and every
/// other column a fair coin; in odd blocks the same hot column gets the fair
/// coin and every other column a 1, so the pack catches up. The leader is
/// overtaken by about `B/2` each even block (a SumSelect output that does not
/// move falls that far behind, and the running max grows at rate ≥ 1/2
/// throughout, so a MaxSum output that does not move falls behind too),
/// while the pack's coin flips keep its top columns near-tied, which is
/// what a batch selection pays for.
#[derive(Debug)]
pub(crate) struct Leapfrog {
    dim: usize,
    block: u64,
    t: u64,
    hot: usize,
    rng: LocalRng,
}

impl Leapfrog {
    pub(crate) fn new(horizon: u64, dim: usize, rng: LocalRng) -> Self {
        Leapfrog { dim, block: horizon.div_ceil(8).max(1), t: 0, hot: 0, rng }
    }

    /// The next record into `out` (length d).
    pub(crate) fn fill_next(&mut self, out: &mut [i64]) {
        let b = self.t / self.block;
        if self.t.is_multiple_of(self.block) && b.is_multiple_of(2) {
            self.hot = self.rng.below(self.dim as u64) as usize;
        }
        self.t += 1;
        let pull = b.is_multiple_of(2);
        let mut word = 0u64;
        for (j, x) in out.iter_mut().enumerate() {
            if j % 64 == 0 {
                word = self.rng.next_u64();
            }
            let coin = i64::from((word >> (j % 64)) & 1 == 1);
            *x = if (j == self.hot) == pull { 1 } else { coin };
        }
    }
}

/// The SVT parameters for horizon T, ρ-zCDP in total, query sensitivity Δ
/// (1 for MaxSum, 2 for top-k) and threshold multiplier m: the balance of
/// `docs/dp.md` with the constants made explicit,
/// `τ₀ = (4Δ·ln T)^{2/3}·(2T/ρ)^{1/3}`, `τ = round(m·τ₀)`, `k_max = ⌈2T/τ⌉ + 1`
/// and `ε_svt = ε_sel = √(ρ/k_max)` rounded down, so that all `2·k_max`
/// pure charges together are at most ρ-zCDP (each `ε`-DP step is
/// `ε²/2`-zCDP). `(4Δ/ε)·ln T` is the size of the largest of T query-noise
/// draws; τ₀ makes the threshold twice that.
pub fn svt_tau0(horizon: u64, rho: f64, delta: u64) -> f64 {
    let t = horizon as f64;
    (4.0 * delta as f64 * t.ln().max(1.0)).powf(2.0 / 3.0) * (2.0 * t / rho).powf(1.0 / 3.0)
}

fn svt_config(
    horizon: u64,
    dim: usize,
    target: Target,
    rho: Ratio,
    mult: f64,
    noise: &NoiseSeed,
    instance: u32,
) -> Result<SvtConfig, DpStreamError> {
    let delta = match target {
        Target::MaxSum => 1,
        Target::TopK { .. } => 2,
    };
    let tau = ((mult * svt_tau0(horizon, rho.to_f64(), delta)).round() as u64).max(1);
    let k_max = (2 * horizon).div_ceil(tau) + 1;
    let eps = ratio_floor((rho.to_f64() / k_max as f64).sqrt(), "segment epsilon")?;
    // The whole-run guarantee, checked exactly: k_max·(ε_svt² + ε_sel²)/2 ≤ ρ.
    let total = Ratio::integer(u128::from(k_max)).checked_mul(eps.checked_mul(eps)?)?;
    if total > rho {
        return Err(DpStreamError::Privacy(format!("SVT budget {total} exceeds rho {rho}")));
    }
    Ok(SvtConfig {
        horizon,
        dim,
        target,
        threshold: tau,
        eps_svt: eps,
        eps_sel: eps,
        seed: noise.clone(),
        instance,
        sampler: Sampler::Scan,
    })
}

/// Permute-and-flip (McKenna–Sheldon 2020) with budget ε on utilities
/// `counts` (sensitivity 1 under replacement, not monotone, hence
/// `exp(−ε·gap/2)`): the batch SumSelect baseline, one release with the
/// whole budget. Exact like the dp module's own selection: uniform integers
/// and Bernoulli(exp(−γ)) only.
pub(crate) fn permute_and_flip(counts: &[u64], eps: Ratio, src: &mut NoiseSource) -> Result<usize, DpStreamError> {
    let best = counts.iter().copied().max().unwrap_or(0);
    let half = eps.checked_div(Ratio::integer(2))?;
    let mut order: Vec<usize> = (0..counts.len()).collect();
    let n = order.len();
    for i in 0..n {
        let j = i + src.below((n - i) as u128) as usize;
        order.swap(i, j);
        let gap = best - counts[order[i]];
        // The best column has gap 0 and is accepted with probability 1,
        // so the loop always returns by the time it reaches it.
        if bernoulli_exp(src, half.checked_mul(Ratio::integer(u128::from(gap)))?) {
            return Ok(order[i]);
        }
    }
    Err(DpStreamError::Config("permute-and-flip over no columns".into()))
}

/// The batch SumSelect error on its hard instances, which the
/// pull-ahead stream's end state is not: one column at `g`, the other
/// `d − 1` at 0, for every `g` up to `⌈4·ln d/ε⌉ + 2`; the largest expected
/// error `g·P(wrong pick)` (each estimated from 64 permute-and-flip runs)
/// is the batch mechanism's worst case, `Θ(log d/ε)`, the denominator of
/// the theory's price. Independent of T.
pub(crate) fn batch_worst_case(dim: usize, eps: Ratio, noise: &NoiseSeed) -> Result<f64, DpStreamError> {
    const RUNS: u32 = 64;
    let top = (4.0 * (dim as f64).ln() / eps.to_f64()).ceil() as u64 + 2;
    let mut worst = 0f64;
    let mut counts = vec![0u64; dim];
    for g in 1..=top {
        counts[0] = g;
        let mut wrong = 0u32;
        for i in 0..RUNS {
            // Instance 3, one stream per (gap, run).
            let mut src = noise.stream(3, g as u32, i);
            wrong += u32::from(permute_and_flip(&counts, eps, &mut src)? != 0);
        }
        worst = worst.max(g as f64 * f64::from(wrong) / f64::from(RUNS));
    }
    Ok(worst)
}

/// The batch ε for a ρ-zCDP budget: a pure ε-DP release is `ε²/2`-zCDP, so
/// `ε = √(2ρ)` (rounded down) spends at most ρ.
pub(crate) fn batch_epsilon(rho: Ratio) -> Result<Ratio, DpStreamError> {
    let e = ratio_floor((2.0 * rho.to_f64()).sqrt(), "batch epsilon")?;
    if e.checked_mul(e)?.checked_div(Ratio::integer(2))? > rho {
        return Err(DpStreamError::Privacy(format!("batch epsilon {e} exceeds rho {rho}")));
    }
    Ok(e)
}

/// Continual MaxSum and SumSelect on the [`Leapfrog`] stream, all under
/// ρ-zCDP: the SVT mechanism at each threshold multiplier, the tree over
/// all d columns followed by max / argmax (the "√d mechanism", when
/// `with_tree`), and the batch baselines once at T (Laplace on `M_T`,
/// permute-and-flip on `C_T`, each with `ε = √(2ρ)`).
#[allow(clippy::too_many_arguments, reason = "one experiment cell: every argument is one of its coordinates")]
pub(crate) fn selection(
    experiment: &'static str,
    horizon: u64,
    dim: usize,
    rho: Ratio,
    mults: &[f64],
    with_tree: bool,
    seed: u64,
    cell: u64,
) -> Result<Vec<Row>, DpStreamError> {
    let (data, noise) = cell_rngs(seed, cell);
    let mut stream = Leapfrog::new(horizon, dim, data);
    // Instances: 0 the tree, 1 to 3 the batch releases, 10 + i the SVTs.
    let mut svts = Vec::new();
    for (i, &m) in mults.iter().enumerate() {
        for (k, target) in [Target::MaxSum, Target::TopK { k: 1 }].into_iter().enumerate() {
            let cfg = svt_config(horizon, dim, target, rho, m, &noise, 10 + 2 * i as u32 + k as u32)?;
            let tau = cfg.threshold;
            svts.push((SparseVector::new(cfg)?, target, m, tau, 0u64, 0f64));
        }
    }
    let mut tree = if with_tree {
        Some(TreeCounter::new(TreeConfig {
            horizon,
            dim,
            domain: RecordDomain::Binary,
            noise: TreeNoise::Gaussian { rho },
            seed: noise.clone(),
            instance: 0,
        })?)
    } else {
        None
    };
    let (mut tree_ms, mut tree_ss) = ((0u64, 0f64), (0u64, 0f64));
    let mut counts = vec![0u64; dim];
    let mut record = vec![0i64; dim];
    let mut max = 0u64;
    let mut last_switches = vec![0u64; svts.len()];
    for _ in 0..horizon {
        stream.fill_next(&mut record);
        for (c, &x) in counts.iter_mut().zip(&record) {
            *c += x as u64;
            max = max.max(*c);
        }
        for ((m, target, _, _, worst, sum), sw) in svts.iter_mut().zip(last_switches.iter_mut()) {
            let rel: SvtRelease = m.step(&record)?;
            let e = match target {
                Target::MaxSum => rel.estimate.unwrap_or(0).abs_diff(max as i64),
                Target::TopK { .. } => max - rel.selected.first().map_or(0, |&j| counts[j as usize]),
            };
            *worst = (*worst).max(e);
            *sum += e as f64;
            *sw = rel.switches;
        }
        if let Some(tree) = tree.as_mut() {
            let v = tree.step(&record)?.values;
            // First index of the largest noisy count.
            let (arg, top) = v.iter().enumerate().fold((0, i64::MIN), |a, (j, &x)| if x > a.1 { (j, x) } else { a });
            let e = top.abs_diff(max as i64);
            tree_ms = (tree_ms.0.max(e), tree_ms.1 + e as f64);
            let e = max - counts[arg];
            tree_ss = (tree_ss.0.max(e), tree_ss.1 + e as f64);
        }
    }
    // Batch (module docs of `counting` for release 0 and the mean).
    let eps_b = batch_epsilon(rho)?;
    let lap = DiscreteLaplace::new(Ratio::integer(1).checked_div(eps_b)?)?;
    let ms: Vec<u64> = (0..BATCH_RELEASES).map(|i| lap.sample(&mut noise.stream(1, 0, i)).unsigned_abs()).collect();
    let mut ss = Vec::with_capacity(BATCH_RELEASES as usize);
    for i in 0..BATCH_RELEASES {
        ss.push(max - counts[permute_and_flip(&counts, eps_b, &mut noise.stream(2, 0, i))?]);
    }
    let avg = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    let worst = batch_worst_case(dim, eps_b, &noise)?;
    let t = horizon as f64;
    let row = |problem, mechanism, max_error, mean_error| Row {
        experiment,
        problem,
        mechanism,
        horizon,
        dim,
        seed,
        tau_mult: 0.0,
        tau: 0,
        max_switches: 0,
        switches: 0,
        max_error,
        mean_error,
    };
    let mut rows = Vec::new();
    for ((m, target, mult, tau, worst, sum), sw) in svts.iter().zip(&last_switches) {
        // What was actually spent, from the mechanism's own ledger.
        if m.spent().rho > rho || *sw > m.max_switches() {
            return Err(DpStreamError::Privacy(format!("SVT spent {} (switches {sw}) over rho {rho}", m.spent())));
        }
        let problem = match target {
            Target::MaxSum => "maxsum",
            Target::TopK { .. } => "sumselect",
        };
        rows.push(Row {
            tau_mult: *mult,
            tau: *tau,
            max_switches: m.max_switches(),
            switches: *sw,
            ..row(problem, "svt", *worst, sum / t)
        });
    }
    if tree.is_some() {
        rows.push(row("maxsum", "tree-max", tree_ms.0, tree_ms.1 / t));
        rows.push(row("sumselect", "tree-max", tree_ss.0, tree_ss.1 / t));
    }
    rows.push(row("maxsum", "batch", ms[0], avg(&ms)));
    rows.push(row("sumselect", "batch", ss[0], avg(&ss)));
    rows.push(row("sumselect", "batch-worst", worst.round() as u64, worst));
    Ok(rows)
}

/// High-probability bounds on the tree's max-over-(t, j) error, for the
/// report and the tests: with probability ≥ 1 − β, every release of every
/// coordinate is within the bound.
pub(crate) mod bounds {
    use super::*;

    /// Gaussian tree: a sum of `k ≤ L` discrete Gaussians of variance
    /// parameter σ² is sub-Gaussian with proxy `k·σ²` (Canonne–Kamath–Steinke
    /// 2020 bound its moment generating function by the continuous one's), so
    /// a union bound over `2·d·T` tails gives `√(2·L·σ²·ln(2dT/β))`, which is
    /// `L·Δ₂·√(ln(2dT/β)/ρ)` for `σ² = L·Δ₂²/(2ρ)` (`docs/dp.md`).
    pub(crate) fn gaussian_tree(horizon: u64, dim: usize, domain: RecordDomain, rho: f64, beta: f64) -> f64 {
        let l = levels_for(horizon) as f64;
        let d2 = domain.sensitivity(dim).1 as f64;
        let sigma2 = l * d2 / (2.0 * rho);
        (2.0 * l * sigma2 * (2.0 * dim as f64 * horizon as f64 / beta).ln()).sqrt()
    }

    /// Laplace tree: Chernoff's bound on a sum of `L` discrete Laplace
    /// variables of scale b, whose moment generating function is
    /// `(1−q)²/((1−q·e^λ)(1−q·e^{−λ}))`, `q = e^{−1/b}`, `λ < 1/b`, minimised
    /// over a grid of λ, and the smallest x whose union bound over `2·d·T`
    /// tails is ≤ β (bisection). Using `L` nodes for every t (not
    /// `popcount(t)`) only loosens it.
    pub(crate) fn laplace_tree(horizon: u64, dim: usize, domain: RecordDomain, epsilon: f64, beta: f64) -> f64 {
        let l = levels_for(horizon) as f64;
        let b = l * domain.sensitivity(dim).0 as f64 / epsilon;
        let q = (-1.0 / b).exp();
        let target = (beta / (2.0 * dim as f64 * horizon as f64)).ln();
        let log_tail = |x: f64| {
            (1..400)
                .map(|i| {
                    let lam = f64::from(i) / 400.0 / b;
                    let mgf = (1.0 - q).powi(2) / ((1.0 - q * lam.exp()) * (1.0 - q * (-lam).exp()));
                    -lam * x + l * mgf.ln()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let (mut lo, mut hi) = (0.0, 1.0);
        while log_tail(hi) > target {
            hi *= 2.0;
        }
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if log_tail(mid) > target { lo = mid } else { hi = mid }
        }
        hi
    }
}
