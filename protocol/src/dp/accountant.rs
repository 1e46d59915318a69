//! Privacy accounting: what has been spent, and refusal past a budget.
//!
//! Charges are exact [`Ratio`]s and compose by addition, which is valid for
//! adaptively chosen mechanisms in both currencies:
//! * **pure ε-DP** (basic composition): ε's add;
//! * **ρ-zCDP** (Bun–Steinke 2016): ρ's add, and an ε-DP mechanism is
//!   `ε²/2`-zCDP (their Proposition 1.4), so a pure charge also adds `ε²/2`
//!   to ρ.
//!
//! A ledger that ever took a zCDP-only charge (Gaussian noise) has no pure
//! ε any more ([`Spent::epsilon`] is `None`).
//!
//! **(ε, δ) reports** use the standard conversion ρ-zCDP ⇒
//! `(ρ + 2√(ρ·ln(1/δ)), δ)`-DP (Bun–Steinke 2016, Proposition 1.3). It is
//! not the tightest known (Canonne–Kamath–Steinke 2020 give a better one)
//! but it is the one in most papers, so numbers compare. For a pure ledger
//! the report is the smaller of that and the pure ε (both hold). These are
//! floats, for reports only: budget decisions compare exact rationals.

use super::{DpError, Ratio};

/// A total that charges may not exceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// Pure ε-DP: the sum of pure charges ≤ ε; zCDP charges are refused.
    Pure(Ratio),
    /// ρ-zCDP: the sum of ρ's (pure charges count `ε²/2`) ≤ ρ.
    Zcdp(Ratio),
}

/// One charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cost {
    /// An ε-DP mechanism.
    Pure(Ratio),
    /// A ρ-zCDP mechanism.
    Zcdp(Ratio),
}

/// What has been spent so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spent {
    /// Total pure ε, while every charge was pure.
    pub epsilon: Option<Ratio>,
    /// Total ρ (zCDP).
    pub rho: Ratio,
}

impl Spent {
    /// The (ε, δ)-DP guarantee for `0 < δ < 1` (module docs); a float for
    /// reports.
    pub fn epsilon_for_delta(&self, delta: f64) -> f64 {
        let rho = self.rho.to_f64();
        let from_rho = rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt();
        match self.epsilon {
            Some(e) => from_rho.min(e.to_f64()),
            None => from_rho,
        }
    }
}

impl std::fmt::Display for Spent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.epsilon {
            Some(e) => write!(f, "ε = {:.6}, ρ = {:.6}", e.to_f64(), self.rho.to_f64()),
            None => write!(f, "ρ = {:.6}", self.rho.to_f64()),
        }
    }
}

/// A ledger with a budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accountant {
    budget: Budget,
    spent: Spent,
}

impl Accountant {
    /// An empty ledger.
    pub fn new(budget: Budget) -> Self {
        Accountant { budget, spent: Spent { epsilon: Some(Ratio::ZERO), rho: Ratio::ZERO } }
    }

    /// The budget.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// What has been spent.
    pub fn spent(&self) -> Spent {
        self.spent
    }

    /// What the ledger would hold after `cost`, without charging it.
    pub fn after(&self, cost: Cost) -> Result<Spent, DpError> {
        let next = match cost {
            Cost::Pure(e) => Spent {
                epsilon: match self.spent.epsilon {
                    Some(s) => Some(s.checked_add(e)?),
                    None => None,
                },
                rho: self.spent.rho.checked_add(e.checked_mul(e)?.checked_div(Ratio::integer(2))?)?,
            },
            Cost::Zcdp(r) => Spent { epsilon: None, rho: self.spent.rho.checked_add(r)? },
        };
        match (self.budget, cost) {
            (Budget::Pure(_), Cost::Zcdp(_)) => return Err(DpError::NotPure),
            (Budget::Pure(b), Cost::Pure(c)) => {
                let spent = self.spent.epsilon.unwrap_or(Ratio::ZERO);
                if next.epsilon.is_some_and(|e| e > b) {
                    return Err(DpError::BudgetExceeded { unit: "epsilon", spent, cost: c, budget: b });
                }
            }
            (Budget::Zcdp(b), _) => {
                if next.rho > b {
                    let c = match cost {
                        Cost::Pure(e) => e.checked_mul(e)?.checked_div(Ratio::integer(2))?,
                        Cost::Zcdp(r) => r,
                    };
                    return Err(DpError::BudgetExceeded { unit: "rho", spent: self.spent.rho, cost: c, budget: b });
                }
            }
        }
        Ok(next)
    }

    /// Charges `cost`, or refuses it (the ledger unchanged) if the budget
    /// can't cover it.
    pub fn charge(&mut self, cost: Cost) -> Result<Spent, DpError> {
        self.spent = self.after(cost)?;
        Ok(self.spent)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn r(n: u128, d: u128) -> Ratio {
        Ratio::new(n, d).unwrap()
    }

    #[test]
    fn dp_accountant_composes_pure_and_zcdp_exactly() {
        let mut a = Accountant::new(Budget::Zcdp(r(1, 1)));
        a.charge(Cost::Pure(r(1, 2))).unwrap();
        a.charge(Cost::Pure(r(1, 2))).unwrap();
        // Two ε = 1/2 pieces: ε = 1, ρ = 2·(1/8) = 1/4.
        assert_eq!(a.spent(), Spent { epsilon: Some(r(1, 1)), rho: r(1, 4) });
        a.charge(Cost::Zcdp(r(1, 4))).unwrap();
        assert_eq!(a.spent(), Spent { epsilon: None, rho: r(1, 2) });
        // 1/2 + 1/2 = 1 is allowed, 1/2 + 1/2 + anything is not.
        a.charge(Cost::Zcdp(r(1, 2))).unwrap();
        let before = a.clone();
        let err = a.charge(Cost::Zcdp(r(1, 1_000_000))).unwrap_err();
        assert!(matches!(err, DpError::BudgetExceeded { unit: "rho", .. }), "{err}");
        assert_eq!(a, before, "a refused charge leaves the ledger unchanged");
    }

    #[test]
    fn dp_accountant_pure_budget_refuses_zcdp_and_overspend() {
        let mut a = Accountant::new(Budget::Pure(r(1, 1)));
        for _ in 0..3 {
            a.charge(Cost::Pure(r(1, 3))).unwrap();
        }
        assert_eq!(a.spent().epsilon, Some(r(1, 1)));
        assert!(matches!(a.charge(Cost::Pure(r(1, 1000))), Err(DpError::BudgetExceeded { unit: "epsilon", .. })));
        assert_eq!(a.charge(Cost::Zcdp(r(1, 1000))), Err(DpError::NotPure));
    }

    #[test]
    fn dp_zcdp_to_approximate_dp_conversion() {
        // ρ = 1/2, δ = 1e-6: ε = 0.5 + 2·√(0.5·ln 10⁶) = 0.5 + 2·2.628 = 5.757.
        let s = Spent { epsilon: None, rho: r(1, 2) };
        let e = s.epsilon_for_delta(1e-6);
        assert!((e - (0.5 + 2.0 * (0.5f64 * 1e6f64.ln()).sqrt())).abs() < 1e-12);
        assert!((e - 5.7566).abs() < 1e-3, "{e}");
        // A pure ledger reports the smaller of its ε and the conversion.
        let p = Spent { epsilon: Some(r(1, 10)), rho: r(1, 200) };
        assert_eq!(p.epsilon_for_delta(1e-6), 0.1);
        // ρ = 0 means no loss.
        assert_eq!(Spent { epsilon: None, rho: Ratio::ZERO }.epsilon_for_delta(1e-9), 0.0);
    }
}
