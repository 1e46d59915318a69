//! A client's round of local work, whatever the run's update kind: the
//! functions the client binary and the simulator both call
//! ([`local_update`], [`evaluate_run`]).
//!
//! Each update kind's client side is one module implementing [`LocalKind`]:
//! [`dense`] (FedAvg, FedAvgM and DP-FTRL: local SGD returning the dense delta),
//! [`spsa`] (zeroth-order steps, one byte each), [`ferret`] (local SGD
//! projected onto shared bases) and [`frl`] (supermask
//! scores trained locally, returned as a ranking). [`local_kind`] is the
//! registry: the one `match` over kinds in this crate, mirroring
//! `tally_protocol::kind::KindSettings::build` on the protocol side. Adding a
//! kind is its module here and one arm there.

use tally_protocol::kind::KindSettings;
use tally_protocol::participant::local_seed;
use tally_protocol::wire::{ClientUpdate, EvalReport, RunConfig};

use crate::data::Dataset;
use crate::{Device, KernelError};

pub mod dense;
pub mod ferret;
pub mod frl;
pub mod spsa;

pub use dense::{DenseLocal, dense_update};
pub use ferret::FerretLocal;
pub use frl::{FrlDpLocal, FrlLocal, frl_network, frl_train_config, frl_update};
pub use spsa::SpsaLocal;

/// One client's round of local work: what every kind's
/// [`LocalKind::train`] gets.
#[derive(Clone, Copy, Debug)]
pub struct LocalRound<'a> {
    /// The run (model, training settings, kind settings).
    pub run: &'a RunConfig,
    /// The client.
    pub client_id: u32,
    /// The round, from 1.
    pub round: u32,
    /// The client's seed for this round: `local_seed(round_seed, client_id)`
    /// of the round's `RoundStart` seed.
    pub seed: u64,
    /// The model the round starts from (parameters, or FRL's scores).
    pub model: &'a [f32],
    /// The client's training data.
    pub data: &'a Dataset,
    /// The compute device.
    pub device: &'a Device,
}

/// An update kind's client side: how a round's local work turns the model
/// into the kind's payload, and how the run's model is evaluated.
pub trait LocalKind: Send + Sync + std::fmt::Debug {
    /// Trains from `round.model` on `round.data` and returns the update,
    /// its payload tagged with the kind's id.
    fn train(&self, round: &LocalRound<'_>) -> Result<ClientUpdate, KernelError>;

    /// Loss and accuracy of the run's global `model` on `data`. By default
    /// the model is the dense parameters of `run.arch`.
    fn evaluate(
        &self,
        run: &RunConfig,
        model: &[f32],
        data: &Dataset,
        device: &Device,
        batch_size: usize,
    ) -> Result<EvalReport, KernelError> {
        crate::train::evaluate(&run.arch, model, data, device, batch_size)
    }
}

/// The registry: the client side of the kind `settings` configure. The only
/// `match` over kinds in `tally-kernels`.
pub fn local_kind(settings: &KindSettings) -> Box<dyn LocalKind + '_> {
    match settings {
        KindSettings::FedAvg => Box::new(DenseLocal { kind: tally_protocol::fedavg::ID }),
        KindSettings::FedAvgM(_) => Box::new(DenseLocal { kind: tally_protocol::fedavgm::ID }),
        KindSettings::Spsa(cfg) => Box::new(SpsaLocal(cfg)),
        KindSettings::Frl(run) => Box::new(FrlLocal(run)),
        KindSettings::Ferret(cfg) => Box::new(FerretLocal(cfg)),
        // DP-FTRL clients train as FedAvg's do; clipping and noise are the
        // server's (a client can't be trusted to clip).
        KindSettings::DpFtrl(_) => Box::new(DenseLocal { kind: tally_protocol::dpftrl::ID }),
        // Private FRL clients train as FRL's do and send their kept set.
        KindSettings::FrlDp(cfg) => Box::new(FrlDpLocal(&cfg.run)),
    }
}

/// Trains from `model` on `data` for round `round` as the run's kind asks
/// ([`local_kind`]): local SGD returning the dense delta, SPSA steps
/// returning one byte each, or FRL's ranking. `round_seed` is the seed of the
/// round's `RoundStart`.
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
    local_kind(&run.kind).train(&LocalRound { run, client_id, round, seed, model, data, device })
}

/// Loss and accuracy of the run's global `model` on `data`: a dense model
/// as it is, an FRL model (scores) through its supermask.
pub fn evaluate_run(
    run: &RunConfig,
    model: &[f32],
    data: &Dataset,
    device: &Device,
    batch_size: usize,
) -> Result<EvalReport, KernelError> {
    local_kind(&run.kind).evaluate(run, model, data, device, batch_size)
}
