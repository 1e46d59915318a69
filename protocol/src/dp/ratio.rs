//! Exact non-negative rationals for privacy parameters (ε, ρ, scales,
//! variances), and the 256-bit product the discrete Gaussian needs.
//!
//! Parameters are rationals so that the samplers never see a float and the
//! accountant's "is this over budget?" is an exact comparison that every
//! machine answers the same way. Floats appear only in [`Ratio::to_f64`],
//! for reports.

use super::DpError;

/// A non-negative rational `num/den` in lowest terms, `den > 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ratio {
    num: u128,
    den: u128,
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Ratio {
    /// Zero.
    pub const ZERO: Ratio = Ratio { num: 0, den: 1 };

    /// `num/den`, reduced. Refuses `den = 0`.
    pub fn new(num: u128, den: u128) -> Result<Ratio, DpError> {
        if den == 0 {
            return Err(DpError::InvalidParameter { what: "ratio", reason: "zero denominator" });
        }
        let g = gcd(num, den);
        Ok(Ratio { num: num / g, den: den / g })
    }

    /// The integer `n`.
    pub fn integer(n: u128) -> Ratio {
        Ratio { num: n, den: 1 }
    }

    /// Numerator (lowest terms).
    pub fn num(&self) -> u128 {
        self.num
    }

    /// Denominator (lowest terms, positive).
    pub fn den(&self) -> u128 {
        self.den
    }

    /// Whether it is zero.
    pub fn is_zero(&self) -> bool {
        self.num == 0
    }

    /// `self + other`, exactly; [`DpError::Overflow`] if the reduced result
    /// does not fit in `u128`.
    pub fn checked_add(self, other: Ratio) -> Result<Ratio, DpError> {
        let of = || DpError::Overflow { what: "ratio sum" };
        let g = gcd(self.den, other.den);
        let (a, b) = (self.den / g, other.den / g);
        let num = self.num.checked_mul(b).and_then(|x| other.num.checked_mul(a).and_then(|y| x.checked_add(y)));
        let den = self.den.checked_mul(b);
        Ratio::new(num.ok_or_else(of)?, den.ok_or_else(of)?)
    }

    /// `self · other`, exactly; [`DpError::Overflow`] if it does not fit.
    pub fn checked_mul(self, other: Ratio) -> Result<Ratio, DpError> {
        // Cross-reduce first so that products stay as small as possible.
        let g1 = gcd(self.num, other.den).max(1);
        let g2 = gcd(other.num, self.den).max(1);
        let num = (self.num / g1).checked_mul(other.num / g2);
        let den = (self.den / g2).checked_mul(other.den / g1);
        let of = || DpError::Overflow { what: "ratio product" };
        Ratio::new(num.ok_or_else(of)?, den.ok_or_else(of)?)
    }

    /// `self / other` (`other > 0`).
    pub fn checked_div(self, other: Ratio) -> Result<Ratio, DpError> {
        if other.num == 0 {
            return Err(DpError::InvalidParameter { what: "ratio", reason: "division by zero" });
        }
        self.checked_mul(Ratio { num: other.den, den: other.num })
    }

    /// `⌊self⌋`.
    pub fn floor(&self) -> u128 {
        self.num / self.den
    }

    /// The nearest `f64`, for reports only.
    pub fn to_f64(&self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

impl PartialOrd for Ratio {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ratio {
    /// Exact: compares `a·d` with `c·b` as 256-bit products.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        mul_wide(self.num, other.den).cmp(&mul_wide(other.num, self.den))
    }
}

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.den == 1 { write!(f, "{}", self.num) } else { write!(f, "{}/{}", self.num, self.den) }
    }
}

/// The full 256-bit product `a·b` as `(high, low)` 128-bit halves.
pub(crate) fn mul_wide(a: u128, b: u128) -> (u128, u128) {
    const M: u128 = u64::MAX as u128;
    let (a1, a0) = (a >> 64, a & M);
    let (b1, b0) = (b >> 64, b & M);
    let (p00, p01, p10, p11) = (a0 * b0, a0 * b1, a1 * b0, a1 * b1);
    // Sum of the three terms that land on bits 64..128; at most 3·(2⁶⁴−1) < 2¹²⁸.
    let mid = (p00 >> 64) + (p01 & M) + (p10 & M);
    let lo = (p00 & M) | (mid << 64);
    let hi = p11 + (p01 >> 64) + (p10 >> 64) + (mid >> 64);
    (hi, lo)
}

/// `(⌊x/c⌋, x mod c)` for the 256-bit `x = (hi, lo)` and `0 < c < 2¹²⁷`; the
/// quotient saturates at `u128::MAX` (callers use it as a loop bound that is
/// never reached, see [`super::sampler`]).
pub(crate) fn divrem_wide(hi: u128, lo: u128, c: u128) -> (u128, u128) {
    debug_assert!(c > 0 && c < 1 << 127, "divisor out of range");
    let c = c.max(1);
    if hi == 0 {
        return (lo / c, lo % c);
    }
    // Binary long division; the remainder stays below c < 2¹²⁷, so shifting
    // it left by one never overflows.
    let mut rem = 0u128;
    let mut q = 0u128;
    let mut saturated = false;
    for i in (0..256u32).rev() {
        let bit = if i >= 128 { (hi >> (i - 128)) & 1 } else { (lo >> i) & 1 };
        rem = (rem << 1) | bit;
        if rem >= c {
            rem -= c;
            if i >= 128 {
                saturated = true;
            } else {
                q |= 1 << i;
            }
        }
    }
    (if saturated { u128::MAX } else { q }, rem)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn dp_ratio_arithmetic_is_exact() {
        let a = Ratio::new(1, 3).unwrap();
        let b = Ratio::new(1, 6).unwrap();
        assert_eq!(a.checked_add(b).unwrap(), Ratio::new(1, 2).unwrap());
        assert_eq!(a.checked_mul(b).unwrap(), Ratio::new(1, 18).unwrap());
        assert_eq!(a.checked_div(b).unwrap(), Ratio::integer(2));
        assert!(a > b);
        assert!(b < a);
        assert_eq!(a, Ratio::new(2, 6).unwrap());
        assert_eq!(Ratio::new(7, 2).unwrap().floor(), 3);
        assert!(Ratio::new(1, 0).is_err());
        let huge = Ratio::integer(u128::MAX);
        assert!(matches!(huge.checked_add(Ratio::integer(1)), Err(DpError::Overflow { .. })));
        // Comparison never overflows.
        assert!(Ratio::new(u128::MAX, u128::MAX - 1).unwrap() > Ratio::integer(1));
    }

    #[test]
    fn dp_wide_arithmetic_matches_u128_and_identities() {
        let vals = [0u128, 1, 2, 3, u64::MAX as u128, (1 << 64) + 7, (1 << 100) - 3, u128::MAX >> 3, u128::MAX];
        for &a in &vals {
            for &b in &vals {
                let (hi, lo) = mul_wide(a, b);
                if let Some(p) = a.checked_mul(b) {
                    assert_eq!((hi, lo), (0, p));
                }
                // (a·b) / b = a when b fits the divisor range.
                if b > 0 && b < 1 << 127 {
                    let (q, r) = divrem_wide(hi, lo, b);
                    assert_eq!((q, r), (a, 0), "{a}*{b}");
                }
            }
        }
        // (2¹²⁸ + 5) / 3: quotient 113427455640312821154458202477256070487, remainder 0.
        let (q, r) = divrem_wide(1, 5, 3);
        assert_eq!(q, 113_427_455_640_312_821_154_458_202_477_256_070_487);
        assert_eq!(r, 0);
        // A quotient of 2¹²⁸ or more saturates.
        assert_eq!(divrem_wide(5, 0, 2).0, u128::MAX);
    }
}
