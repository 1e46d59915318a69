//! Sign flipping: every malicious client trains benignly on its own shard
//! and sends `−s ×` its update.
//!
//! Knowledge: none beyond the client's own data. The malicious clients do
//! not collude, see no other update, and do not know the aggregation rule.
//! Applies to the dense kinds (fedavg, fedavgm) and Ferret (projected).

use tally_protocol::kind::KindSettings;
use tally_protocol::wire::UpdatePayload;

use super::{Attack, AttackEnv, AttackError, RoundTask, dense};
use crate::SimError;

/// Name in scenario files.
pub const NAME: &str = "sign-flip";

/// The attack.
#[derive(Debug, Clone)]
pub struct SignFlip {
    fraction: f64,
    scale: f32,
}

impl SignFlip {
    /// `fraction` malicious clients sending `−scale ×` their benign update.
    pub fn new(fraction: f64, scale: f32) -> Result<Self, AttackError> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(AttackError::Invalid { attack: NAME, reason: "scale must be finite and positive" });
        }
        Ok(SignFlip { fraction, scale })
    }
}

/// `−s · u`.
pub fn flip(update: &[f32], s: f32) -> Vec<f32> {
    update.iter().map(|v| -s * v).collect()
}

impl Attack for SignFlip {
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
        let benign = dense::benign_updates(env, task, clients)?;
        clients
            .iter()
            .zip(&benign)
            .map(|(&c, u)| dense::payload(env, NAME, task.round, c, &flip(u, self.scale)))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn flips_and_scales() {
        assert_eq!(flip(&[1.0, -2.0, 0.5], 2.0), vec![-2.0, 4.0, -1.0]);
        assert!(SignFlip::new(0.1, 0.0).is_err());
        assert!(SignFlip::new(0.1, f32::NAN).is_err());
    }
}
