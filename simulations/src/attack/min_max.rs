//! Min-max and min-sum (Shejwalkar and Houmansadr, "Manipulating the
//! Byzantine", NDSS 2021), the aggregator-agnostic versions: every malicious
//! client of a round sends `m = μ − γ·p`, where `μ` is the mean of the
//! attackers' benign updates (up to `pool` attackers drawn from all
//! malicious clients, each trained from the global model on its own shard),
//! `p` a perturbation direction (their coordinate-wise std by default, as in
//! the paper; or `μ/‖μ‖`, or `sign(μ)`), and `γ` the largest value the
//! paper's halving search finds (from `gamma_init`, down to a step of 1e-5)
//! such that
//!
//! - min-max: `maxᵢ ‖m − bᵢ‖² ≤ maxᵢ,ⱼ ‖bᵢ − bⱼ‖²`,
//! - min-sum: `Σᵢ ‖m − bᵢ‖² ≤ maxᵢ Σⱼ ‖bᵢ − bⱼ‖²`,
//!
//! over the attackers' benign updates `bᵢ`: the malicious update is no
//! farther from them than the farthest of them.
//!
//! Knowledge: the malicious clients collude and see their own benign updates
//! (the paper's "partial knowledge": never honest clients' updates); they do
//! not know the aggregation rule. Applies to the dense kinds (fedavg,
//! fedavgm) and Ferret (projected).

use serde::{Deserialize, Serialize};
use tally_protocol::kind::KindSettings;
use tally_protocol::wire::UpdatePayload;

use super::{Attack, AttackEnv, AttackError, RoundTask, dense};
use crate::SimError;

/// Name of min-max in scenario files.
pub const MIN_MAX: &str = "min-max";
/// Name of min-sum in scenario files.
pub const MIN_SUM: &str = "min-sum";

/// Where the halving search stops: the step below which `γ` is final.
pub const TOLERANCE: f64 = 1e-5;

/// The perturbation direction `p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Deviation {
    /// The coordinate-wise standard deviation (`n − 1`) of the benign updates.
    #[default]
    Std,
    /// `μ/‖μ‖` (zero if `μ` is).
    UnitVec,
    /// `sign(μ)`.
    Sign,
}

impl Deviation {
    /// `p` for benign updates `benign` of mean `mu`.
    pub fn direction(self, benign: &[Vec<f32>], mu: &[f64]) -> Vec<f64> {
        match self {
            Deviation::Std => dense::std(benign, mu),
            Deviation::UnitVec => {
                let norm = mu.iter().map(|x| x * x).sum::<f64>().sqrt();
                if norm > 0.0 { mu.iter().map(|x| x / norm).collect() } else { vec![0.0; mu.len()] }
            }
            Deviation::Sign => mu
                .iter()
                .map(|&x| {
                    if x > 0.0 {
                        1.0
                    } else if x < 0.0 {
                        -1.0
                    } else {
                        0.0
                    }
                })
                .collect(),
        }
    }
}

/// Which bound `γ` must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Min-max: the largest distance.
    Max,
    /// Min-sum: the sum of distances.
    Sum,
}

/// The attack.
#[derive(Debug, Clone)]
pub struct MinMax {
    objective: Objective,
    fraction: f64,
    deviation: Deviation,
    gamma_init: f64,
    pool: usize,
}

impl MinMax {
    /// `fraction` malicious clients; the search from `gamma_init`; `pool` attackers.
    pub fn new(
        objective: Objective,
        fraction: f64,
        deviation: Deviation,
        gamma_init: f64,
        pool: usize,
    ) -> Result<Self, AttackError> {
        let attack = name(objective);
        if !(gamma_init.is_finite() && gamma_init > TOLERANCE) {
            return Err(AttackError::Invalid { attack, reason: "gamma_init must be finite and above 1e-5" });
        }
        if pool == 0 {
            return Err(AttackError::Invalid { attack, reason: "pool must be at least 1" });
        }
        Ok(MinMax { objective, fraction, deviation, gamma_init, pool })
    }
}

fn name(objective: Objective) -> &'static str {
    match objective {
        Objective::Max => MIN_MAX,
        Objective::Sum => MIN_SUM,
    }
}

/// The paper's halving search: from `γ = init` with step `init`, a `γ` that
/// passes `ok` is kept and the next try is `γ + step/2`, a failing one is
/// followed by `γ − step/2`; the step halves each time, and the search ends
/// once the try is within [`TOLERANCE`] of the last success. Returns the
/// last success (0 if none).
pub fn halving_search(init: f64, mut ok: impl FnMut(f64) -> bool) -> f64 {
    let (mut gamma, mut step, mut success) = (init, init, 0.0f64);
    // The step halves every time: 200 tries reach any tolerance.
    for _ in 0..200 {
        if (success - gamma).abs() <= TOLERANCE {
            break;
        }
        if ok(gamma) {
            success = gamma;
            gamma += step / 2.0;
        } else {
            gamma -= step / 2.0;
        }
        step /= 2.0;
    }
    success
}

/// The crafted update for `benign` (non-empty): `μ − γ·p` with the search's `γ`.
pub fn craft_update(
    objective: Objective,
    benign: &[Vec<f32>],
    deviation: Deviation,
    gamma_init: f64,
) -> (Vec<f32>, f64) {
    let mu = dense::mean(benign);
    let p = deviation.direction(benign, &mu);
    let wide: Vec<Vec<f64>> = benign.iter().map(|b| dense::widen(b)).collect();
    // Each benign update's squared distances to the others.
    let rows: Vec<Vec<f64>> = wide.iter().map(|a| benign.iter().map(|b| dense::sq_dist(a, b)).collect()).collect();
    let bound = match objective {
        Objective::Max => rows.iter().flatten().copied().fold(0.0, f64::max),
        Objective::Sum => rows.iter().map(|r| r.iter().sum::<f64>()).fold(0.0, f64::max),
    };
    let gamma = halving_search(gamma_init, |gamma| {
        let m: Vec<f64> = mu.iter().zip(&p).map(|(a, d)| a - gamma * d).collect();
        let d = benign.iter().map(|b| dense::sq_dist(&m, b));
        let score = match objective {
            Objective::Max => d.fold(0.0, f64::max),
            Objective::Sum => d.sum(),
        };
        score <= bound
    });
    (dense::shifted(&mu, gamma, &p), gamma)
}

impl Attack for MinMax {
    fn name(&self) -> &'static str {
        name(self.objective)
    }

    fn fraction(&self) -> f64 {
        self.fraction
    }

    fn check(&self, kind: &KindSettings) -> Result<(), AttackError> {
        dense::check_kind(self.name(), kind)
    }

    fn craft(
        &self,
        env: &AttackEnv<'_>,
        task: &RoundTask<'_>,
        clients: &[usize],
    ) -> Result<Vec<UpdatePayload>, SimError> {
        let attackers = dense::attacker_pool(env, task.round, self.pool);
        let benign = dense::benign_updates(env, task, &attackers)?;
        let (update, _) = craft_update(self.objective, &benign, self.deviation, self.gamma_init);
        dense::same_for_all(env, self.name(), task.round, clients, &update)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn halving_search_finds_the_threshold() {
        for t in [0.3, 1.0, 7.25, 49.0] {
            let g = halving_search(50.0, |g| g <= t);
            assert!(g <= t && t - g < 2.0 * TOLERANCE, "{t}: {g}");
        }
        assert_eq!(halving_search(50.0, |_| false), 0.0);
    }

    #[test]
    fn gamma_on_a_tiny_case() {
        // Benign 1-D updates {0, 0, 3}: μ = 1, unit vector p = 1, m = 1 − γ.
        // Min-max: max dist² (2 + γ)² ≤ max pairwise 9  ⇒ γ ≤ 1.
        // Min-sum: 2(1 − γ)² + (2 + γ)² = 6 + 3γ² ≤ max row sum 18 ⇒ γ ≤ 2.
        let benign = vec![vec![0.0], vec![0.0], vec![3.0]];
        let (m, g) = craft_update(Objective::Max, &benign, Deviation::UnitVec, 50.0);
        assert!((g - 1.0).abs() < 1e-4, "{g}");
        assert!((m[0] - 0.0).abs() < 1e-4, "{m:?}");
        let (m, g) = craft_update(Objective::Sum, &benign, Deviation::UnitVec, 50.0);
        assert!((g - 2.0).abs() < 1e-4, "{g}");
        assert!((m[0] + 1.0).abs() < 1e-4, "{m:?}");
        // std direction: σ = sqrt(3) (n − 1), so γ·sqrt(3) = 1 for min-max.
        let (_, g) = craft_update(Objective::Max, &benign, Deviation::Std, 50.0);
        assert!((g - 1.0 / 3f64.sqrt()).abs() < 1e-4, "{g}");
        // sign direction = 1 here as well.
        let (_, g) = craft_update(Objective::Sum, &benign, Deviation::Sign, 50.0);
        assert!((g - 2.0).abs() < 1e-4, "{g}");
    }

    #[test]
    fn settings_are_checked() {
        assert!(MinMax::new(Objective::Max, 0.1, Deviation::Std, 0.0, 1).is_err());
        assert!(MinMax::new(Objective::Sum, 0.1, Deviation::Std, 50.0, 0).is_err());
        assert!(MinMax::new(Objective::Sum, 0.1, Deviation::Sign, 50.0, 1).is_ok());
    }
}
