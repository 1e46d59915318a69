//! The FedAvg attack of FRL's code (`docs/algorithms.md` §1.8): every
//! malicious client sends `scale · θ` (the current global parameters,
//! scaled) as its delta. Applies to the dense kinds (fedavg, fedavgm).

use tally_protocol::kind::{KindId, KindSettings};
use tally_protocol::wire::UpdatePayload;

use super::{Attack, AttackEnv, AttackError, RoundTask};
use crate::SimError;

/// Name in scenario files.
pub const NAME: &str = "scale";

const NEEDS: &str = "a dense kind (fedavg or fedavgm)";

/// The attack.
#[derive(Debug, Clone)]
pub struct Scale {
    fraction: f64,
    scale: f32,
}

impl Scale {
    /// `fraction` malicious clients sending `scale · θ`.
    pub fn new(fraction: f64, scale: f32) -> Result<Self, AttackError> {
        if !scale.is_finite() {
            return Err(AttackError::Invalid { attack: NAME, reason: "scale must be finite" });
        }
        Ok(Scale { fraction, scale })
    }
}

/// The payload tag of a dense kind; the others are refused.
fn dense_kind(kind: &KindSettings) -> Result<KindId, AttackError> {
    match kind {
        KindSettings::FedAvg => Ok(tally_protocol::fedavg::ID),
        KindSettings::FedAvgM(_) => Ok(tally_protocol::fedavgm::ID),
        other => Err(AttackError::WrongKind { attack: NAME, needs: NEEDS, kind: other.name() }),
    }
}

impl Attack for Scale {
    fn name(&self) -> &'static str {
        NAME
    }

    fn fraction(&self) -> f64 {
        self.fraction
    }

    fn check(&self, kind: &KindSettings) -> Result<(), AttackError> {
        dense_kind(kind).map(|_| ())
    }

    /// A scaled model ruins the global model at once: evaluated every round.
    fn evaluate_every_round(&self) -> bool {
        true
    }

    fn craft(
        &self,
        env: &AttackEnv<'_>,
        task: &RoundTask<'_>,
        clients: &[usize],
    ) -> Result<Vec<UpdatePayload>, SimError> {
        let id = dense_kind(&env.run.kind)?;
        let delta: Vec<f32> = task.model.iter().map(|v| v * self.scale).collect();
        let payload = tally_protocol::fedavg::encode_delta(id, &delta);
        Ok(vec![payload; clients.len()])
    }
}
