//! Least-squares fits on log scales, and the small statistics the report
//! needs. Pure functions of their inputs (no randomness), so the fitted
//! numbers in the report are reproducible to the bit.

/// A fitted line `ln y = intercept + slope · ln x` (or `· x` for
/// [`fit_semilog`]-style callers that pass already-transformed x).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    /// Slope: the exponent of a power law `y ∝ x^slope`.
    pub slope: f64,
    /// Intercept, `ln c` of `y = c·x^slope`.
    pub intercept: f64,
    /// Coefficient of determination of the fit on the log scale.
    pub r2: f64,
}

impl Fit {
    /// The fitted `y` at `x`.
    pub fn at(&self, x: f64) -> f64 {
        (self.intercept + self.slope * x.ln()).exp()
    }
}

/// Ordinary least squares of `y` on `x` (plain, not logged). `None` with
/// fewer than two points or when all `x` are equal (no slope exists).
pub fn ols(xs: &[f64], ys: &[f64]) -> Option<Fit> {
    let n = xs.len().min(ys.len());
    if n < 2 {
        return None;
    }
    let (xs, ys) = (&xs[..n], &ys[..n]);
    let mx = xs.iter().sum::<f64>() / n as f64;
    let my = ys.iter().sum::<f64>() / n as f64;
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let syy: f64 = ys.iter().map(|y| (y - my) * (y - my)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let intercept = my - slope * mx;
    // A constant y is fitted exactly by slope 0.
    let r2 = if syy > 0.0 { (sxy * sxy) / (sxx * syy) } else { 1.0 };
    Some(Fit { slope, intercept, r2 })
}

/// The power-law exponent: least squares of `ln y` on `ln x` over the points
/// with finite `x, y > 0` (an error of exactly 0 has no logarithm, nor has a
/// ratio over a zero error; such points are dropped, and the caller reports
/// how many were left).
pub fn fit_loglog(points: &[(f64, f64)]) -> Option<Fit> {
    let ok = |v: f64| v > 0.0 && v.is_finite();
    let (xs, ys): (Vec<f64>, Vec<f64>) =
        points.iter().filter(|(x, y)| ok(*x) && ok(*y)).map(|(x, y)| (x.ln(), y.ln())).unzip();
    ols(&xs, &ys)
}

/// Mean of `v` (0 for an empty slice).
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
}

/// The `p`-quantile of `v` (`0 ≤ p ≤ 1`), linear interpolation between order
/// statistics (NumPy's default), 0 for an empty slice.
pub fn quantile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = p.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dp_fit_recovers_exact_power_laws() {
        for &(c, k) in &[(3.0, 1.0 / 3.0), (0.5, 2.0), (7.0, -0.5), (1.0, 0.0)] {
            let pts: Vec<(f64, f64)> =
                (6..=14).map(|e| (f64::from(1u32 << e), c * f64::from(1u32 << e).powf(k))).collect();
            let f = fit_loglog(&pts).unwrap();
            assert!((f.slope - k).abs() < 1e-12, "slope {} for exponent {k}", f.slope);
            assert!((f.intercept.exp() - c).abs() < 1e-9 * c.max(1.0));
            assert!((f.r2 - 1.0).abs() < 1e-12);
            assert!((f.at(100.0) - c * 100f64.powf(k)).abs() < 1e-9 * f.at(100.0));
        }
    }

    #[test]
    fn dp_fit_is_least_squares_not_endpoints() {
        // y = x·e^{±0.1} alternately: the least-squares slope stays 1 while
        // the endpoint slope of an even-length series is off.
        let pts: Vec<(f64, f64)> = (1..=8)
            .map(|i| (f64::from(i), f64::from(i) * if i % 2 == 0 { 0.1f64.exp() } else { (-0.1f64).exp() }))
            .collect();
        let f = fit_loglog(&pts).unwrap();
        assert!((f.slope - 1.0).abs() < 0.1);
        assert!(f.r2 < 1.0);
        // Zeros are dropped, not fitted as −∞; one point left has no slope.
        assert!(fit_loglog(&[(1.0, 0.0), (2.0, 4.0)]).is_none());
        assert!(fit_loglog(&[(2.0, 1.0), (2.0, 4.0)]).is_none());
    }

    #[test]
    fn dp_quantiles_interpolate() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert_eq!(quantile(&v, 0.5), 2.5);
        assert_eq!(mean(&v), 2.5);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
