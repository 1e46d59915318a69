//! Ferret's client side: local first-order training ([`crate::train`]), then
//! the update `Δ = model − trained` projected onto the run's shared bases
//! ([`tally_protocol::ferret::project`]): only the coefficients leave the
//! client.

use tally_protocol::ferret::{FerretConfig, blocks, payload, project};
use tally_protocol::wire::ClientUpdate;

use super::{LocalKind, LocalRound};
use crate::KernelError;
use crate::train::{TrainConfig, train_local};

/// Local SGD, then the projection.
#[derive(Clone, Copy, Debug)]
pub struct FerretLocal<'a>(pub &'a FerretConfig);

impl LocalKind for FerretLocal<'_> {
    fn train(&self, r: &LocalRound<'_>) -> Result<ClientUpdate, KernelError> {
        let train = &r.run.train;
        let cfg = TrainConfig::from_spec(train, r.seed);
        let (trained, report) = train_local(&r.run.arch, r.model, r.data, &cfg, r.device)?;
        // Descent sign, as the reference code: the server subtracts.
        let delta: Vec<f32> = r.model.iter().zip(&trained).map(|(m, t)| m - t).collect();
        // The seeds each block uses are the client's private choice; derive
        // them from the round seed apart from the training shuffle's stream.
        let private = tally_protocol::rng::mix(r.seed, r.round, PROJECTION_DRAW);
        let entries = project(self.0, &blocks(&r.run.arch), r.round, &delta, private);
        Ok(ClientUpdate { num_samples: r.data.len() as u64, train_loss: report.mean_loss, payload: payload(&entries) })
    }
}

/// The `mix` draw index of the projection's seed choice.
const PROJECTION_DRAW: u32 = 0xFE55;
