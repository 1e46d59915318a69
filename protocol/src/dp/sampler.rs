//! Exact samplers on the integers: Bernoulli(exp(−γ)), the discrete Laplace
//! and the discrete Gaussian, after Canonne, Kamath and Steinke, "The
//! Discrete Gaussian for Differential Privacy" (NeurIPS 2020; arXiv
//! 2004.00010), Algorithms 1–3.
//!
//! **Why exact integer sampling.** Mironov ("On Significance of the Least
//! Significant Bits for Differential Privacy", CCS 2012) showed that the
//! textbook floating-point Laplace sampler `−b·ln(U)` leaks the input: the
//! set of doubles that `x + noise` can produce depends on `x`, so some
//! outputs are possible for one input and impossible for its neighbour, and
//! privacy fails outright. Here every value is an integer built from
//! uniform integers ([`NoiseSource::below`]) by rejection, and the output
//! distribution is the stated one *exactly* (up to the documented
//! truncation), on every machine.
//!
//! **Parameters** are [`Ratio`]s. Limits, each with its reason:
//! * [`MAX_PARAM_PART`] bounds numerators and denominators, so every
//!   intermediate product fits in 128 bits (the Gaussian's squared
//!   deviation is a 256-bit product, `ratio::mul_wide`).
//! * [`MAX_LAPLACE_SCALE`] and [`MAX_GAUSSIAN_VARIANCE`] keep the noise far
//!   inside [`NOISE_MAX`].
//! * [`NOISE_MAX`]: samples are conditioned on `|Y| ≤ 2⁵³` (a rejected
//!   sample is redrawn), so a sum of up to 64 of them fits in an `i64` and
//!   every sample is exact in an `f64` report. With the scale limits the
//!   discarded tail has probability below `exp(−2²¹)`; the samplers are
//!   therefore exactly the truncated distributions. Truncation makes the
//!   guarantees approximate: a neighbour shifts the support by at most the
//!   sensitivity, so "ε-DP" is (ε, δ)-DP and "ρ-zCDP" is δ-approximate
//!   ρ-zCDP with `δ < exp(−2²⁰)`, far below anything a report prints.
//!
//! Not constant time: rejection loops run longer for some values than for
//! others (a release a round makes this a small channel, but one).
//!
//! Loop counters: the number of Bernoulli(exp(−1)) trials in
//! Bernoulli(exp(−γ)) for `γ ≥ 2¹²⁸` is capped at `2¹²⁸ − 1`; reaching the
//! cap would need `2¹²⁸` consecutive successes of probability `1/e` each.

use super::DpError;
use super::noise::NoiseSource;
use super::ratio::{Ratio, divrem_wide, mul_wide};

/// Largest numerator or denominator of a sampler parameter, 2⁶⁰: keeps
/// `2·n·d·t²` (the Gaussian's acceptance denominator) below 2¹²⁵ and the
/// Laplace's `(NOISE_MAX+1)·den` below 2¹¹⁴.
pub const MAX_PARAM_PART: u128 = 1 << 60;

/// Largest magnitude of a sample, 2⁵³ (module docs).
pub const NOISE_MAX: u64 = 1 << 53;

/// Largest discrete Laplace scale, 2³²: the mass beyond [`NOISE_MAX`] is
/// then below `exp(−2²¹)`.
pub const MAX_LAPLACE_SCALE: u128 = 1 << 32;

/// Largest discrete Gaussian variance, 2⁵⁸ (σ ≤ 2²⁹): the mass beyond
/// [`NOISE_MAX`] (2²⁴ σ) is then below `exp(−2⁴⁷)`, and the Laplace proposal
/// (scale `⌊σ⌋ + 1`) stays within [`MAX_LAPLACE_SCALE`].
pub const MAX_GAUSSIAN_VARIANCE: u128 = 1 << 58;

fn check_part(what: &'static str, r: Ratio) -> Result<(), DpError> {
    if r.num() > MAX_PARAM_PART || r.den() > MAX_PARAM_PART {
        return Err(DpError::OutOfRange {
            what,
            limit: "numerator and denominator at most 2^60 (sampler::MAX_PARAM_PART)",
        });
    }
    Ok(())
}

/// Bernoulli(`num / (den·k)`), `num ≤ den·k`, without forming `den·k`: a
/// uniform `U` on `0..den·k` is `a·k + b` with `a` uniform on `0..den` and
/// `b` on `0..k`, and `U < num` iff `a < ⌊num/k⌋`, or `a = ⌊num/k⌋` and
/// `b < num mod k`.
fn bernoulli_over(src: &mut NoiseSource, num: u128, den: u128, k: u128) -> bool {
    let (q, r) = (num / k, num % k);
    let a = src.below(den);
    if a != q {
        return a < q;
    }
    src.below(k) < r
}

/// Bernoulli(exp(−num/den)) for `num ≤ den` (CKS Algorithm 1, γ ∈ [0, 1]):
/// draw Bernoulli(γ/k) for k = 1, 2, … until one fails; return whether the
/// failing k is odd.
fn bernoulli_exp_unit(src: &mut NoiseSource, num: u128, den: u128) -> bool {
    let mut k: u128 = 1;
    while bernoulli_over(src, num, den, k) {
        // k grows by one per trial; it can't reach 2¹²⁸ in any run.
        k = k.saturating_add(1);
    }
    k % 2 == 1
}

/// Bernoulli(exp(−(whole + num/den))), `num < den`: `whole` independent
/// Bernoulli(exp(−1)) trials (stopping at the first failure), then the
/// fractional part (CKS Algorithm 1, γ > 1).
fn bernoulli_exp_split(src: &mut NoiseSource, whole: u128, num: u128, den: u128) -> bool {
    let mut i: u128 = 0;
    while i < whole {
        if !bernoulli_exp_unit(src, 1, 1) {
            return false;
        }
        i += 1;
    }
    bernoulli_exp_unit(src, num, den)
}

/// One draw of Bernoulli(exp(−γ)), exactly, for a rational `γ ≥ 0`.
pub fn bernoulli_exp(src: &mut NoiseSource, gamma: Ratio) -> bool {
    bernoulli_exp_split(src, gamma.floor(), gamma.num() % gamma.den(), gamma.den())
}

/// The discrete Laplace distribution `P(y) ∝ exp(−|y|/scale)` on ℤ,
/// conditioned on `|y| ≤` [`NOISE_MAX`]. Variance `2q/(1−q)²` with
/// `q = exp(−1/scale)` (≤ `2·scale²`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscreteLaplace {
    scale: Ratio,
}

impl DiscreteLaplace {
    /// The sampler of scale `scale > 0`, within the module's limits.
    pub fn new(scale: Ratio) -> Result<Self, DpError> {
        if scale.is_zero() {
            return Err(DpError::InvalidParameter { what: "laplace scale", reason: "must be positive" });
        }
        check_part("laplace scale", scale)?;
        if scale > Ratio::integer(MAX_LAPLACE_SCALE) {
            return Err(DpError::OutOfRange {
                what: "laplace scale",
                limit: "at most 2^32 (sampler::MAX_LAPLACE_SCALE)",
            });
        }
        Ok(DiscreteLaplace { scale })
    }

    /// Its scale.
    pub fn scale(&self) -> Ratio {
        self.scale
    }

    /// One sample (CKS Algorithm 2 with `t = num`, `s = den` of the scale).
    pub fn sample(&self, src: &mut NoiseSource) -> i64 {
        let (t, s) = (self.scale.num(), self.scale.den());
        // X ≥ limit ⇒ Y = ⌊X/s⌋ > NOISE_MAX. Fits: 2⁵³·2⁶⁰.
        let limit = (u128::from(NOISE_MAX) + 1) * s;
        'restart: loop {
            // X = U + t·V with U uniform on 0..t accepted w.p. exp(−U/t) and
            // V geometric (Bernoulli(exp(−1)) successes) is geometric with
            // P(X = x) ∝ exp(−x/t).
            let u = src.below(t);
            if !bernoulli_exp_unit(src, u, t) {
                continue;
            }
            let mut tv: u128 = 0;
            while bernoulli_exp_unit(src, 1, 1) {
                tv += t;
                if tv >= limit {
                    // Truncation (module docs): this sample would exceed
                    // NOISE_MAX whatever follows, so redraw.
                    continue 'restart;
                }
            }
            let y = (u + tv) / s;
            if y > u128::from(NOISE_MAX) {
                continue;
            }
            // y ≤ NOISE_MAX < 2⁶³.
            let y = y as i64;
            // A fair sign, rejecting "−0" so that 0 is not counted twice.
            let negative = src.bit();
            if negative && y == 0 {
                continue;
            }
            return if negative { -y } else { y };
        }
    }
}

/// The discrete Gaussian `P(y) ∝ exp(−y²/(2σ²))` on ℤ, conditioned on
/// `|y| ≤` [`NOISE_MAX`]. Its variance is below σ² and within `10⁻⁸` of it
/// for `σ ≥ 1` (CKS Corollary 9 gives the bounds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscreteGaussian {
    variance: Ratio,
    /// The Laplace proposal's scale `t = ⌊σ⌋ + 1`.
    t: u128,
    proposal: DiscreteLaplace,
    /// `2·n·d·t²` for `σ² = n/d`: the acceptance exponent is
    /// `(|Y|·d·t − n)² / (2·n·d·t²)`.
    denom: u128,
}

impl DiscreteGaussian {
    /// The sampler of variance parameter `σ² > 0`, within the module's
    /// limits.
    pub fn new(variance: Ratio) -> Result<Self, DpError> {
        if variance.is_zero() {
            return Err(DpError::InvalidParameter { what: "gaussian variance", reason: "must be positive" });
        }
        check_part("gaussian variance", variance)?;
        if variance > Ratio::integer(MAX_GAUSSIAN_VARIANCE) {
            return Err(DpError::OutOfRange {
                what: "gaussian variance",
                limit: "at most 2^58 (sampler::MAX_GAUSSIAN_VARIANCE)",
            });
        }
        let (n, d) = (variance.num(), variance.den());
        // ⌊σ⌋ = ⌊√⌊n/d⌋⌋ (an integer k has k ≤ √x iff k² ≤ ⌊x⌋).
        let t = (n / d).isqrt() + 1;
        let of = || DpError::Overflow { what: "gaussian acceptance denominator" };
        let denom = (2 * n).checked_mul(d).and_then(|x| x.checked_mul(t * t)).ok_or_else(of)?;
        if denom >= 1 << 126 {
            return Err(of());
        }
        Ok(DiscreteGaussian { variance, t, proposal: DiscreteLaplace::new(Ratio::integer(t))?, denom })
    }

    /// Its variance parameter σ².
    pub fn variance(&self) -> Ratio {
        self.variance
    }

    /// One sample (CKS Algorithm 3): a discrete Laplace proposal of scale
    /// `t`, accepted with probability `exp(−(|Y| − σ²/t)²/(2σ²))`.
    pub fn sample(&self, src: &mut NoiseSource) -> i64 {
        let (n, d) = (self.variance.num() as i128, self.variance.den() as i128);
        let t = self.t as i128;
        loop {
            let y = self.proposal.sample(src);
            // |Y|·d·t − n: at most 2⁵³·2⁶¹ in magnitude (bounds in the
            // module docs), so i128 never overflows.
            let dev = i128::from(y.unsigned_abs() as i64) * d * t - n;
            let dev = dev.unsigned_abs();
            let (hi, lo) = mul_wide(dev, dev);
            let (whole, rem) = divrem_wide(hi, lo, self.denom);
            if bernoulli_exp_split(src, whole, rem, self.denom) {
                return y;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    //! Statistical calibration. Every check is a hypothesis test whose
    //! tolerance comes from the sampling distribution of its statistic,
    //! and every test also runs the same check against a parameter off by a
    //! factor of two and asserts that it rejects, so a check that could not
    //! fail would be caught.
    //!
    //! * **Variance.** The sample variance `s²` of `n` i.i.d. draws has
    //!   standard error `√((μ₄ − σ⁴)/n)` (μ₄ the fourth central moment).
    //!   We accept when `|s² − Var| ≤ 6` standard errors (a false alarm has
    //!   probability ~2·10⁻⁹ under normality), with `Var` and μ₄ summed
    //!   exactly from the pmf.
    //! * **Goodness of fit.** Pearson's χ² over the cells with expected count
    //!   ≥ 5, tails merged into two end cells; critical value the
    //!   Wilson–Hilferty approximation of the χ² quantile at z = 5
    //!   (p ≈ 3·10⁻⁷).
    //!
    //! Seeds are fixed, so the tests are deterministic; the tolerances say
    //! that a correct sampler would pass for all but a negligible fraction
    //! of seeds.
    use super::*;
    use crate::dp::noise::NoiseSeed;

    /// Standard errors of slack in variance checks.
    pub(crate) const VAR_Z: f64 = 6.0;
    /// z of the χ² critical value.
    const CHI_Z: f64 = 5.0;

    /// A symmetric pmf on ℤ as (support bound, unnormalised weight).
    pub(crate) fn laplace_weight(scale: f64) -> impl Fn(i64) -> f64 {
        move |y: i64| (-(y.abs() as f64) / scale).exp()
    }
    pub(crate) fn gauss_weight(var: f64) -> impl Fn(i64) -> f64 {
        move |y: i64| (-((y * y) as f64) / (2.0 * var)).exp()
    }

    /// Normalised pmf on `−b..=b` (b chosen so the rest is < 1e-300).
    pub(crate) fn pmf(w: &dyn Fn(i64) -> f64, b: i64) -> Vec<f64> {
        let raw: Vec<f64> = (-b..=b).map(w).collect();
        let z: f64 = raw.iter().sum();
        raw.iter().map(|p| p / z).collect()
    }

    /// (variance, fourth central moment) of a zero-mean pmf on `−b..=b`.
    pub(crate) fn moments(p: &[f64], b: i64) -> (f64, f64) {
        let mut m2 = 0.0;
        let mut m4 = 0.0;
        for (i, &pi) in p.iter().enumerate() {
            let y = (i as i64 - b) as f64;
            m2 += pi * y * y;
            m4 += pi * y * y * y * y;
        }
        (m2, m4)
    }

    /// Whether the sample variance of `xs` is within `VAR_Z` standard errors
    /// of `var` (fourth moment `m4`); returns the z-score too.
    pub(crate) fn variance_ok(xs: &[i64], var: f64, m4: f64) -> (bool, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let s2 = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let se = ((m4 - var * var) / n).sqrt();
        let z = (s2 - var) / se;
        (z.abs() <= VAR_Z, z)
    }

    fn chi_critical(df: f64) -> f64 {
        let a = 2.0 / (9.0 * df);
        df * (1.0 - a + CHI_Z * a.sqrt()).powi(3)
    }

    /// Pearson's χ² of samples against pmf `p` on `−b..=b`: whether it
    /// passes, and the statistic and critical value.
    fn chi_square_ok(xs: &[i64], p: &[f64], b: i64) -> (bool, f64, f64) {
        let n = xs.len() as f64;
        let mut counts = vec![0f64; p.len()];
        for &x in xs {
            if x.abs() <= b {
                counts[(x + b) as usize] += 1.0;
            }
        }
        // Cells with expected ≥ 5 form a central symmetric run; everything
        // else merges into the two tails (outside counts go to its side's tail).
        let c = b as usize;
        let mut half = 0;
        while half < c && p[c - half - 1] * n >= 5.0 {
            half += 1;
        }
        let lo = c - half;
        let hi = c + half;
        let mut cells: Vec<(f64, f64)> = (lo..=hi).map(|i| (counts[i], p[i] * n)).collect();
        let tail_p: f64 = p[..lo].iter().sum();
        let left_obs: f64 = counts[..lo].iter().sum::<f64>() + xs.iter().filter(|&&x| x < -b).count() as f64;
        let right_obs: f64 = counts[hi + 1..].iter().sum::<f64>() + xs.iter().filter(|&&x| x > b).count() as f64;
        if tail_p * n >= 1.0 {
            cells.push((left_obs, tail_p * n));
            cells.push((right_obs, tail_p * n));
        }
        let stat: f64 = cells.iter().map(|(o, e)| (o - e) * (o - e) / e).sum();
        let crit = chi_critical((cells.len() - 1) as f64);
        (stat <= crit, stat, crit)
    }

    fn draws(n: usize, seed: u64, mut f: impl FnMut(&mut NoiseSource) -> i64) -> Vec<i64> {
        let mut src = NoiseSeed::insecure_from_u64(seed).stream(1, 2, 3);
        (0..n).map(|_| f(&mut src)).collect()
    }

    fn r(n: u128, d: u128) -> Ratio {
        Ratio::new(n, d).unwrap()
    }

    #[test]
    fn dp_bernoulli_exp_frequency_matches_and_rejects_double_gamma() {
        let n = 200_000usize;
        for (gn, gd) in [(0u128, 1u128), (1, 3), (1, 1), (5, 2), (7, 3)] {
            let gamma = r(gn, gd);
            let mut src = NoiseSeed::insecure_from_u64(gn as u64 * 31 + gd as u64).stream(0, 0, 0);
            let hits = (0..n).filter(|_| bernoulli_exp(&mut src, gamma)).count() as f64;
            let p_hat = hits / n as f64;
            let check = |g: f64| {
                let p = (-g).exp();
                let se = (p * (1.0 - p) / n as f64).sqrt().max(1e-12);
                ((p_hat - p) / se).abs() <= VAR_Z
            };
            assert!(check(gamma.to_f64()), "γ={gamma}: {p_hat} vs {}", (-gamma.to_f64()).exp());
            if gn > 0 {
                assert!(!check(2.0 * gamma.to_f64()), "γ={gamma}: would accept 2γ");
            }
        }
    }

    #[test]
    fn dp_discrete_laplace_variance_and_pmf_match_and_reject_half_or_double_scale() {
        let n = 200_000;
        for (sn, sd, seed) in [(3u128, 1u128, 1u64), (7, 2, 2), (1, 2, 3), (25, 1, 4)] {
            let scale = r(sn, sd);
            let lap = DiscreteLaplace::new(scale).unwrap();
            let xs = draws(n, seed, |s| lap.sample(s));
            let b = (scale.to_f64() * 800.0) as i64 + 10;
            let fit = |sc: f64| {
                let p = pmf(&laplace_weight(sc), b);
                let (var, m4) = moments(&p, b);
                let (vok, z) = variance_ok(&xs, var, m4);
                let (cok, stat, crit) = chi_square_ok(&xs, &p, b);
                (vok, z, var, cok, stat, crit)
            };
            let (vok, z, var, cok, stat, crit) = fit(scale.to_f64());
            eprintln!(
                "laplace scale {scale}: variance z = {z:.2} vs theory {var:.4}; chi2 {stat:.1} (critical {crit:.1})"
            );
            assert!(vok, "scale {scale}: variance z = {z:.2} (theory {var:.4})");
            assert!(cok, "scale {scale}: chi2 {stat:.1} > {crit:.1}");
            for wrong in [2.0 * scale.to_f64(), 0.5 * scale.to_f64()] {
                let (vok, z, _, cok, stat, _) = fit(wrong);
                assert!(!vok, "scale {scale}: variance check accepts {wrong} (z = {z:.2})");
                assert!(!cok, "scale {scale}: chi-square accepts {wrong} ({stat:.1})");
            }
        }
    }

    #[test]
    fn dp_discrete_gaussian_variance_and_pmf_match_and_reject_half_or_double_variance() {
        let n = 200_000;
        for (vn, vd, seed) in [(1u128, 1u128, 11u64), (10, 1, 12), (9, 4, 13), (1, 5, 14), (400, 3, 15)] {
            let var = r(vn, vd);
            let g = DiscreteGaussian::new(var).unwrap();
            let xs = draws(n, seed, |s| g.sample(s));
            let b = (var.to_f64().sqrt() * 40.0) as i64 + 10;
            let fit = |v: f64| {
                let p = pmf(&gauss_weight(v), b);
                let (tv, m4) = moments(&p, b);
                let (vok, z) = variance_ok(&xs, tv, m4);
                let (cok, stat, crit) = chi_square_ok(&xs, &p, b);
                (vok, z, tv, cok, stat, crit)
            };
            let (vok, z, tv, cok, stat, crit) = fit(var.to_f64());
            eprintln!("gaussian σ² {var}: variance z = {z:.2} vs theory {tv:.4}; chi2 {stat:.1} (critical {crit:.1})");
            assert!(vok, "σ²={var}: variance z = {z:.2} (theory {tv:.4})");
            assert!(cok, "σ²={var}: chi2 {stat:.1} > {crit:.1}");
            for wrong in [2.0 * var.to_f64(), 0.5 * var.to_f64()] {
                let (vok, z, _, cok, stat, _) = fit(wrong);
                assert!(!vok, "σ²={var}: variance check accepts {wrong} (z = {z:.2})");
                assert!(!cok, "σ²={var}: chi-square accepts {wrong} ({stat:.1})");
            }
        }
    }

    /// The stream derivation and the samplers, pinned: a restored server
    /// (or any later build) must draw exactly these values. If this fails
    /// on purpose, bump `noise::NOISE_KEY_DOMAIN` and re-pin.
    #[test]
    fn dp_noise_golden_values() {
        let seed = NoiseSeed::insecure_from_u64(0x0123_4567_89ab_cdef);
        assert_eq!(hex::encode(seed.stream_key(1, 2, 3)), GOLDEN_KEY);
        let mut src = seed.stream(1, 2, 3);
        let words: Vec<u32> = (0..4).map(|_| src.word()).collect();
        assert_eq!(words, GOLDEN_WORDS);
        let lap = DiscreteLaplace::new(r(7, 2)).unwrap();
        assert_eq!(draws(12, 0x0123_4567_89ab_cdef, |s| lap.sample(s)), GOLDEN_LAPLACE);
        let g = DiscreteGaussian::new(r(10, 3)).unwrap();
        assert_eq!(draws(12, 0x0123_4567_89ab_cdef, |s| g.sample(s)), GOLDEN_GAUSSIAN);
        let mut src = seed.stream(0, 0, 0);
        let bits: Vec<bool> = (0..12).map(|_| bernoulli_exp(&mut src, r(1, 2))).collect();
        assert_eq!(bits, GOLDEN_BERNOULLI);
    }
    const GOLDEN_KEY: &str = "a27cda2b7d1c510ce7ba9fe5013df8fe985ee5d0b2e6b9a18ec7f00e7677caa7";
    const GOLDEN_WORDS: [u32; 4] = [1_325_224_462, 2_570_797_861, 4_021_462_385, 2_604_646_052];
    const GOLDEN_LAPLACE: [i64; 12] = [3, 7, -2, 7, 0, 1, 1, -5, -3, 8, 10, 2];
    const GOLDEN_GAUSSIAN: [i64; 12] = [4, -2, -1, 3, -1, 1, -1, 1, 1, 0, -3, 0];
    const GOLDEN_BERNOULLI: [bool; 12] = [false, true, true, false, true, true, true, true, true, true, true, false];

    #[test]
    fn dp_samplers_are_deterministic_per_stream() {
        let g = DiscreteGaussian::new(r(50, 1)).unwrap();
        let a = draws(1000, 5, |s| g.sample(s));
        assert_eq!(a, draws(1000, 5, |s| g.sample(s)));
        assert_ne!(a, draws(1000, 6, |s| g.sample(s)));
    }

    #[test]
    fn dp_sampler_limits_are_typed_errors_and_large_parameters_work() {
        assert!(matches!(DiscreteLaplace::new(Ratio::ZERO), Err(DpError::InvalidParameter { .. })));
        assert!(matches!(DiscreteLaplace::new(Ratio::integer(1 << 33)), Err(DpError::OutOfRange { .. })));
        assert!(matches!(DiscreteLaplace::new(r(1, 1 << 61)), Err(DpError::OutOfRange { .. })));
        assert!(matches!(DiscreteGaussian::new(Ratio::ZERO), Err(DpError::InvalidParameter { .. })));
        assert!(matches!(DiscreteGaussian::new(Ratio::integer(1 << 59)), Err(DpError::OutOfRange { .. })));
        // At the limits: samples come out, of the right order of magnitude.
        let g = DiscreteGaussian::new(Ratio::integer(MAX_GAUSSIAN_VARIANCE)).unwrap();
        let big = draws(200, 9, |s| g.sample(s));
        let rms = (big.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / 200.0).sqrt();
        assert!((rms / (1u64 << 29) as f64 - 1.0).abs() < 0.3, "rms {rms}");
        let g = DiscreteGaussian::new(r((1 << 60) - 1, (1 << 60) - 3)).unwrap();
        let _ = draws(100, 9, |s| g.sample(s));
        let l = DiscreteLaplace::new(Ratio::integer(MAX_LAPLACE_SCALE)).unwrap();
        assert!(draws(200, 9, |s| l.sample(s)).iter().all(|x| x.unsigned_abs() <= NOISE_MAX));
    }
}
