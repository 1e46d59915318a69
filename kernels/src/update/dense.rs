//! FedAvg's, FedAvgM's and DP-FTRL's client side: local SGD
//! ([`crate::train`]), returning `trained − model` as a dense delta. The
//! kinds differ only on the server (momentum; DP-FTRL's clipping and noise);
//! the payload is tagged with the run's kind.

use tally_protocol::kind::KindId;
use tally_protocol::model::ModelArch;
use tally_protocol::wire::ClientUpdate;

use super::{LocalKind, LocalRound};
use crate::data::Dataset;
use crate::train::{TrainConfig, train_local};
use crate::{Device, KernelError};

/// Local SGD for a dense kind; payloads tagged `kind`
/// (`tally_protocol::fedavg::ID`, `tally_protocol::fedavgm::ID` or
/// `tally_protocol::dpftrl::ID`).
#[derive(Clone, Copy, Debug)]
pub struct DenseLocal {
    /// The run's kind.
    pub kind: KindId,
}

impl LocalKind for DenseLocal {
    fn train(&self, r: &LocalRound<'_>) -> Result<ClientUpdate, KernelError> {
        let train = &r.run.train;
        let cfg = TrainConfig::from_spec(train, r.seed);
        dense_update(self.kind, &r.run.arch, r.model, r.data, &cfg, r.device)
    }
}

/// Local SGD, returning `trained − model` as a payload of `kind`.
pub fn dense_update(
    kind: KindId,
    arch: &ModelArch,
    model: &[f32],
    data: &Dataset,
    cfg: &TrainConfig,
    device: &Device,
) -> Result<ClientUpdate, KernelError> {
    let (trained, report) = train_local(arch, model, data, cfg, device)?;
    let delta: Vec<f32> = trained.iter().zip(model).map(|(t, m)| t - m).collect();
    Ok(ClientUpdate {
        num_samples: data.len() as u64,
        train_loss: report.mean_loss,
        payload: tally_protocol::fedavg::encode_delta(kind, &delta),
    })
}
