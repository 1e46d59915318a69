//! FRL's client side: the global scores trained locally on the run's
//! supermask network ([`crate::supermask`]) and returned as the client's
//! packed ranking; evaluation goes through the supermask too.

use std::sync::{Arc, Mutex};

use tally_protocol::frl::{FrlRun, Ranking};
use tally_protocol::model::ModelArch;
use tally_protocol::wire::{ClientUpdate, EvalReport, RunConfig};

use super::{LocalKind, LocalRound};
use crate::data::Dataset;
use crate::supermask::{FrlTrainConfig, FrlTrainReport, InputNorm, Supermask, SupermaskConfig};
use crate::{Device, KernelError};

/// FRL's local round and evaluation with the run's settings.
#[derive(Clone, Copy, Debug)]
pub struct FrlLocal<'a>(pub &'a FrlRun);

impl LocalKind for FrlLocal<'_> {
    fn train(&self, r: &LocalRound<'_>) -> Result<ClientUpdate, KernelError> {
        frl_update(r.run, self.0, r.round, r.seed, r.model, r.data, r.device)
    }

    fn evaluate(
        &self,
        run: &RunConfig,
        model: &[f32],
        data: &Dataset,
        device: &Device,
        batch_size: usize,
    ) -> Result<EvalReport, KernelError> {
        let net = frl_network(&run.arch, self.0)?;
        let scores = split_layers(&net, model)?;
        net.evaluate_scores(&scores, data, device, batch_size)
    }
}

/// Private FRL's local round ([`tally_protocol::frl::dp`]) and evaluation:
/// trained exactly as FRL's, but the update is the approval bitset of the
/// client's kept set (its mask after training) instead of its ranking.
#[derive(Clone, Copy, Debug)]
pub struct FrlDpLocal<'a>(pub &'a FrlRun);

impl LocalKind for FrlDpLocal<'_> {
    fn train(&self, r: &LocalRound<'_>) -> Result<ClientUpdate, KernelError> {
        let (net, scores, report) = train_scores(r.run, self.0, r.round, r.seed, r.model, r.data, r.device)?;
        let approvals = tally_protocol::frl::dp::Approvals::from_masks(&net.masks(&scores));
        Ok(ClientUpdate {
            num_samples: r.data.len() as u64,
            train_loss: report.mean_loss,
            payload: approvals.payload(),
        })
    }

    fn evaluate(
        &self,
        run: &RunConfig,
        model: &[f32],
        data: &Dataset,
        device: &Device,
        batch_size: usize,
    ) -> Result<EvalReport, KernelError> {
        FrlLocal(self.0).evaluate(run, model, data, device, batch_size)
    }
}

/// FRL's local round: the global scores `model` trained on `data` with the
/// run's settings (round `r` at `lr · lr_decay^(r−1)`), returned as the
/// client's packed ranking.
pub fn frl_update(
    run: &RunConfig,
    frl: &FrlRun,
    round: u32,
    seed: u64,
    model: &[f32],
    data: &Dataset,
    device: &Device,
) -> Result<ClientUpdate, KernelError> {
    let (net, scores, report) = train_scores(run, frl, round, seed, model, data, device)?;
    let ranking = Ranking::new(net.rankings(&scores), &frl.vote.layer_sizes)
        .map_err(|e| KernelError::BadRanking(e.to_string()))?;
    Ok(ClientUpdate {
        num_samples: data.len() as u64,
        train_loss: report.mean_loss,
        payload: tally_protocol::frl::payload(&ranking),
    })
}

/// The network, its trained scores and the training report.
type TrainedScores = (Arc<Supermask>, Vec<Vec<f32>>, FrlTrainReport);

/// FRL's local training, shared by FRL and private FRL (which differ only
/// in what they upload): the network, its trained scores and the report.
fn train_scores(
    run: &RunConfig,
    frl: &FrlRun,
    round: u32,
    seed: u64,
    model: &[f32],
    data: &Dataset,
    device: &Device,
) -> Result<TrainedScores, KernelError> {
    let net = frl_network(&run.arch, frl)?;
    let cfg = frl_train_config(run, frl, round, seed);
    let scores = split_layers(&net, model)?;
    let (scores, report) = net.train(scores, data, &cfg, device)?;
    Ok((net, scores, report))
}

/// The local training settings of round `round` (from 1) of an FRL run.
pub fn frl_train_config(run: &RunConfig, frl: &FrlRun, round: u32, seed: u64) -> FrlTrainConfig {
    FrlTrainConfig {
        lr: f64::from(run.train.lr),
        lr_decay: frl.lr_decay,
        // FRL's rounds count from 0; ours from 1.
        round: round.saturating_sub(1),
        momentum: frl.momentum,
        weight_decay: frl.weight_decay,
        batch_size: run.train.batch_size as usize,
        epochs: run.train.epochs,
        seed,
    }
}

/// Networks built so far: deriving one (1.6 M frozen weights and the sorted
/// initial scores for LeNet) costs about a tenth of a second, far more than
/// a simulated client's round of bookkeeping, and every client of a run
/// shares it. A process serves one run at a time; two entries cover a
/// simulation comparing rules.
static NETWORKS: Mutex<Vec<(SupermaskConfig, Arc<Supermask>)>> = Mutex::new(Vec::new());
const NETWORK_CACHE_ENTRIES: usize = 2;

/// The supermask network of an FRL run (cached).
pub fn frl_network(arch: &ModelArch, frl: &FrlRun) -> Result<Arc<Supermask>, KernelError> {
    let ModelArch::Supermask(net) = arch else {
        return Err(KernelError::InvalidConfig("an FRL run needs a supermask model".into()));
    };
    let config = SupermaskConfig {
        arch: *net,
        run_seed: frl.seed,
        keep_fraction: frl.vote.k_fraction,
        mask_rule: frl.vote.mask,
        input_norm: InputNorm { mean: frl.input_mean, std: frl.input_std },
    };
    // A poisoned lock means a thread panicked while holding it; the entries
    // are whole `Arc`s either way.
    let mut cache = NETWORKS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, n)) = cache.iter().find(|(c, _)| *c == config) {
        return Ok(n.clone());
    }
    let built = Arc::new(Supermask::new(&config)?);
    if cache.len() >= NETWORK_CACHE_ENTRIES {
        cache.remove(0);
    }
    cache.push((config, built.clone()));
    Ok(built)
}

/// The flat score vector cut into the network's layers.
fn split_layers(net: &Supermask, model: &[f32]) -> Result<Vec<Vec<f32>>, KernelError> {
    let sizes = net.layer_sizes();
    let total: usize = sizes.iter().sum();
    if model.len() != total {
        return Err(KernelError::InvalidConfig(format!("{} scores for a network of {total} edges", model.len())));
    }
    let mut out = Vec::with_capacity(sizes.len());
    let mut rest = model;
    for n in sizes {
        let (layer, tail) = rest.split_at(n);
        out.push(layer.to_vec());
        rest = tail;
    }
    Ok(out)
}
