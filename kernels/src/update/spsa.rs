//! One-byte SPSA's client side: the round's zeroth-order steps
//! ([`crate::zo::spsa_steps`]), one byte each. The model is dense, so
//! evaluation is the default.

use tally_protocol::spsa::SpsaConfig;
use tally_protocol::wire::ClientUpdate;

use super::{LocalKind, LocalRound};
use crate::KernelError;

/// SPSA's local steps with the run's settings.
#[derive(Clone, Copy, Debug)]
pub struct SpsaLocal<'a>(pub &'a SpsaConfig);

impl LocalKind for SpsaLocal<'_> {
    fn train(&self, r: &LocalRound<'_>) -> Result<ClientUpdate, KernelError> {
        let spsa = self.0;
        let steps = crate::zo::spsa_steps(
            &r.run.arch,
            r.model,
            r.data,
            spsa,
            r.round,
            r.client_id,
            spsa.steps_per_client,
            r.seed,
            r.device,
        )?;
        Ok(ClientUpdate {
            num_samples: u64::from(spsa.steps_per_client) * u64::from(spsa.batch_size),
            train_loss: steps.mean_loss,
            payload: tally_protocol::spsa::payload(steps.bytes),
        })
    }
}
