//! Gaussian noise: every malicious client sends an update of independent
//! `N(0, σ²)` coordinates.
//!
//! Knowledge: none. The malicious clients do not collude, see no update (not
//! even their own benign one) and do not know the aggregation rule. Applies
//! to the dense kinds (fedavg, fedavgm) and Ferret (the noise is projected).

use tally_protocol::kind::KindSettings;
use tally_protocol::rng::LocalRng;
use tally_protocol::wire::UpdatePayload;

use super::{Attack, AttackEnv, AttackError, RoundTask, dense};
use crate::{SimError, TAG_ATTACK, hash_seed};

/// Name in scenario files.
pub const NAME: &str = "gaussian";

/// The attack.
#[derive(Debug, Clone)]
pub struct Gaussian {
    fraction: f64,
    std: f32,
}

impl Gaussian {
    /// `fraction` malicious clients sending `N(0, std²)` noise.
    pub fn new(fraction: f64, std: f32) -> Result<Self, AttackError> {
        if !(std.is_finite() && std > 0.0) {
            return Err(AttackError::Invalid { attack: NAME, reason: "std must be finite and positive" });
        }
        Ok(Gaussian { fraction, std })
    }
}

/// `n` independent `N(0, std²)` values from `rng` (Box–Muller, in f64).
pub fn noise(rng: &mut LocalRng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    let uniform = |rng: &mut LocalRng| ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    while out.len() < n {
        let (u, v) = (uniform(rng), uniform(rng));
        let r = (-2.0 * u.ln()).sqrt() * f64::from(std);
        let t = std::f64::consts::TAU * v;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

impl Attack for Gaussian {
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
        let dim = env.run.arch.num_params();
        clients
            .iter()
            .map(|&c| {
                // Each (round, client) its own stream, apart from the attacker
                // pool's draws.
                let seed = hash_seed(env.seed ^ 0x6A05_5140, TAG_ATTACK, u64::from(task.round) << 32 | c as u64);
                dense::payload(env, NAME, task.round, c, &noise(&mut LocalRng::new(seed), dim, self.std))
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn noise_has_the_asked_std_and_no_mean() {
        let v = noise(&mut LocalRng::new(7), 100_001, 2.0);
        assert_eq!(v.len(), 100_001);
        let m = v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64;
        let s = (v.iter().map(|x| (f64::from(*x) - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        // Standard error of the mean 2/sqrt(1e5) ≈ 0.006; of the std ≈ 0.0045.
        assert!(m.abs() < 0.03 && (s - 2.0).abs() < 0.03, "mean {m}, std {s}");
        assert_eq!(noise(&mut LocalRng::new(7), 3, 2.0), noise(&mut LocalRng::new(7), 3, 2.0));
        assert!(Gaussian::new(0.1, -1.0).is_err());
    }
}
