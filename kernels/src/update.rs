//! A client's round of local work, whatever the run's update kind: the one
//! function the client binary and the simulator both call.

use tally_protocol::model::ModelArch;
use tally_protocol::participant::local_seed;
use tally_protocol::spsa::SpsaConfig;
use tally_protocol::wire::{ClientUpdate, RunConfig, UpdatePayload};

use crate::data::Dataset;
use crate::train::{TrainConfig, train_local};
use crate::{Device, KernelError};

/// Trains from `model` on `data` for round `round` as the run asks: local
/// SGD returning the dense delta, or SPSA steps returning one byte each.
/// `round_seed` is the seed of the round's `RoundStart`.
pub fn local_update(
    run: &RunConfig,
    client_id: u32,
    round: u32,
    round_seed: u64,
    model: &[f32],
    data: &Dataset,
    device: &Device,
) -> Result<ClientUpdate, KernelError> {
    let seed = local_seed(round_seed, client_id);
    match &run.spsa {
        Some(spsa) => spsa_update(&run.arch, spsa, client_id, round, seed, model, data, device),
        None => {
            let cfg = TrainConfig {
                lr: run.train.lr,
                batch_size: run.train.batch_size as usize,
                epochs: run.train.epochs,
                seed,
            };
            dense_update(&run.arch, model, data, &cfg, device)
        }
    }
}

/// Local SGD, returning `trained − model`.
pub fn dense_update(
    arch: &ModelArch,
    model: &[f32],
    data: &Dataset,
    cfg: &TrainConfig,
    device: &Device,
) -> Result<ClientUpdate, KernelError> {
    let (trained, report) = train_local(arch, model, data, cfg, device)?;
    let delta = trained.iter().zip(model).map(|(t, m)| t - m).collect();
    Ok(ClientUpdate {
        num_samples: data.len() as u64,
        train_loss: report.mean_loss,
        payload: UpdatePayload::DenseDelta(delta),
    })
}

#[allow(clippy::too_many_arguments, reason = "the protocol's named inputs, one to one")]
fn spsa_update(
    arch: &ModelArch,
    spsa: &SpsaConfig,
    client_id: u32,
    round: u32,
    seed: u64,
    model: &[f32],
    data: &Dataset,
    device: &Device,
) -> Result<ClientUpdate, KernelError> {
    let steps = crate::zo::spsa_steps(arch, model, data, spsa, round, client_id, spsa.steps_per_client, seed, device)?;
    Ok(ClientUpdate {
        num_samples: u64::from(spsa.steps_per_client) * u64::from(spsa.batch_size),
        train_loss: steps.mean_loss,
        payload: UpdatePayload::Spsa(steps.bytes),
    })
}
