//! "A little is enough" (Baruch, Baruch and Goldberg, NeurIPS 2019): every
//! malicious client of a round sends `μ − z·σ`, where `μ` and `σ` are the
//! coordinate-wise mean and standard deviation (`n − 1`) of the attackers'
//! benign updates: up to `pool` attackers drawn from all malicious clients,
//! each trained from the global model on its own shard.
//!
//! `z` defaults to the paper's: with `n` clients per round and `f` malicious
//! clients in the round, `s = ⌊n/2 + 1⌋ − f` and `z = Φ⁻¹((n − s)/n)` (the
//! largest shift that still leaves the malicious values closer to the mean
//! than `s` benign ones), floored at 0.
//!
//! Knowledge: the malicious clients collude and see their own benign
//! updates, never honest clients' ones; they do not know the aggregation
//! rule. Applies to the dense kinds (fedavg, fedavgm) and Ferret (projected).

use tally_protocol::kind::KindSettings;
use tally_protocol::wire::UpdatePayload;

use super::{Attack, AttackEnv, AttackError, RoundTask, dense};
use crate::SimError;

/// Name in scenario files.
pub const NAME: &str = "lie";

/// The attack.
#[derive(Debug, Clone)]
pub struct Lie {
    fraction: f64,
    z: Option<f64>,
    pool: usize,
}

impl Lie {
    /// `fraction` malicious clients, a fixed `z` or the paper's, `pool` attackers.
    pub fn new(fraction: f64, z: Option<f64>, pool: usize) -> Result<Self, AttackError> {
        if z.is_some_and(|z| !(z.is_finite() && z >= 0.0)) {
            return Err(AttackError::Invalid { attack: NAME, reason: "z must be finite and non-negative" });
        }
        if pool == 0 {
            return Err(AttackError::Invalid { attack: NAME, reason: "pool must be at least 1" });
        }
        Ok(Lie { fraction, z, pool })
    }
}

/// The paper's `z` for `n` clients of which `f` are malicious, floored at 0.
pub fn paper_z(n: usize, f: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let s = (n / 2 + 1) as f64 - f as f64;
    let p = ((n as f64 - s) / n as f64).clamp(0.0, 1.0 - 1e-12);
    inverse_normal_cdf(p).max(0.0)
}

/// `Φ⁻¹(p)`, the standard normal quantile (Acklam's rational approximation,
/// relative error below 1.2e-9); `−∞` at 0.
pub fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] =
        [7.784_695_709_041_462e-3, 3.224_671_290_700_398e-1, 2.445_134_137_142_996, 3.754_408_661_907_416];
    const LOW: f64 = 0.024_25;
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// `μ − z·σ` of `benign`.
pub fn lie_update(benign: &[Vec<f32>], z: f64) -> Vec<f32> {
    let mu = dense::mean(benign);
    let sigma = dense::std(benign, &mu);
    dense::shifted(&mu, z, &sigma)
}

impl Attack for Lie {
    fn name(&self) -> &'static str {
        NAME
    }

    fn fraction(&self) -> f64 {
        self.fraction
    }

    fn check(&self, kind: &KindSettings) -> Result<(), AttackError> {
        dense::check_kind(NAME, kind)
    }

    fn craft(
        &self,
        env: &AttackEnv<'_>,
        task: &RoundTask<'_>,
        clients: &[usize],
    ) -> Result<Vec<UpdatePayload>, SimError> {
        let attackers = dense::attacker_pool(env, task.round, self.pool);
        let benign = dense::benign_updates(env, task, &attackers)?;
        let z = self.z.unwrap_or_else(|| paper_z(env.per_round, task.malicious.max(clients.len())));
        dense::same_for_all(env, NAME, task.round, clients, &lie_update(&benign, z))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_match_tables() {
        assert_eq!(inverse_normal_cdf(0.5), 0.0);
        assert!((inverse_normal_cdf(0.975) - 1.959_963_985).abs() < 1e-8);
        assert!((inverse_normal_cdf(0.01) + 2.326_347_874).abs() < 1e-8);
        assert!((inverse_normal_cdf(0.72) - 0.582_841_507).abs() < 1e-8);
    }

    #[test]
    fn paper_z_by_hand() {
        // n = 50, f = 12: s = 26 − 12 = 14, Φ⁻¹(36/50) = Φ⁻¹(0.72).
        assert!((paper_z(50, 12) - 0.582_841_507).abs() < 1e-8);
        // n = 10, f = 1: s = 5, Φ⁻¹(0.5) = 0; f = 0 would be negative: floored.
        assert_eq!(paper_z(10, 1), 0.0);
        assert_eq!(paper_z(10, 0), 0.0);
        // n = 3, f = 1: s = 1, Φ⁻¹(2/3) ≈ 0.430727.
        assert!((paper_z(3, 1) - 0.430_727_299).abs() < 1e-8);
    }

    #[test]
    fn mean_minus_z_std_on_three_vectors() {
        // μ = (2, 2), σ = (1, sqrt(12)) (see dense's test); z = 1.5.
        let benign = vec![vec![1.0, 0.0], vec![2.0, 0.0], vec![3.0, 6.0]];
        let m = lie_update(&benign, 1.5);
        assert_eq!(m[0], 0.5);
        assert!((f64::from(m[1]) - (2.0 - 1.5 * 12f64.sqrt())).abs() < 1e-6);
        assert!(Lie::new(0.1, Some(-1.0), 1).is_err());
        assert!(Lie::new(0.1, None, 0).is_err());
    }
}
