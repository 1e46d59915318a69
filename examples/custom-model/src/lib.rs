//! Bring your own model: a network written as an ordinary burn module,
//! trained by a Tally federation.
//!
//! [`TwoPath`] is not expressible as a layer list (a convolutional path and
//! a linear skip path, summed), so it can't be a `model = { kind =
//! "sequential", … }` description. Implementing
//! [`tally_kernels::custom::BurnNet`] for it (how to build it and its
//! forward pass; the loss, i.e. the local training step, is overridden here
//! to add label smoothing) is all it takes: [`register`] puts it in the
//! process's model registry and returns the run's `ModelArch::Custom`
//! (name and tensor shapes), and from there a `tally-sim` simulation
//! ([`simulate`]) or a `tally-client` (`tally_client::run`) trains it with
//! FedAvg, FedAvgM, Ferret or SPSA like a built-in model. The server needs
//! no code for it: it sees only the tensor shapes.

use std::sync::Arc;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::{Device, Int, Tensor};
use tally_kernels::custom::{BurnModel, BurnNet};
use tally_kernels::data::Split;
use tally_protocol::model::ModelArch;

/// The name clients and the run config know the model by.
pub const NAME: &str = "two-path-mnist";

/// Label smoothing of the training loss (the overridden local step).
pub const SMOOTHING: f32 = 0.1;

/// A two-path MNIST classifier: `head(relu(hidden(relu(conv(x)))))` plus
/// a linear `skip(x)` on the raw pixels.
#[derive(Module, Debug)]
pub struct TwoPath {
    /// 1 → 4 channels, 5×5, stride 3: 28×28 → 8×8.
    pub conv: Conv2d,
    /// 256 → 32.
    pub hidden: Linear,
    /// 32 → 10.
    pub head: Linear,
    /// 784 → 10, straight from the pixels.
    pub skip: Linear,
}

impl BurnNet for TwoPath {
    fn build(device: &Device) -> Self {
        TwoPath {
            conv: Conv2dConfig::new([1, 4], [5, 5]).with_stride([3, 3]).init(device),
            hidden: LinearConfig::new(256, 32).init(device),
            head: LinearConfig::new(32, 10).init(device),
            skip: LinearConfig::new(784, 10).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [batch, _] = x.dims();
        let img = x.clone().reshape([batch, 1, 28, 28]);
        let features: Tensor<2> = relu(self.conv.forward(img)).flatten(1, 3);
        self.head.forward(relu(self.hidden.forward(features))) + self.skip.forward(x)
    }

    /// Cross-entropy against smoothed targets: `(1 − s)` on the label and
    /// `s / classes` spread over every class.
    fn loss(&self, x: Tensor<2>, y: Tensor<1, Int>) -> Tensor<1> {
        let logp = log_softmax(self.forward(x), 1);
        let [batch, _] = logp.dims();
        let picked = logp.clone().gather(1, y.unsqueeze_dim(1)).reshape([batch]);
        let uniform = logp.mean_dim(1).reshape([batch]);
        let per_example = picked.mul_scalar(-(1.0 - SMOOTHING)) - uniform.mul_scalar(SMOOTHING);
        per_example.mean()
    }
}

/// Registers [`TwoPath`] for 28×28 inputs and 10 classes; returns the run's
/// model description.
pub fn register() -> Result<ModelArch, tally_kernels::KernelError> {
    tally_kernels::custom::register(Arc::new(BurnModel::<TwoPath>::new(NAME, 784, 10)))
}

/// A FedAvg simulation of `clients` clients (all sampled every round) over
/// `rounds` rounds on `split`, training [`TwoPath`].
pub fn simulate(split: &Split, clients: usize, rounds: u32) -> anyhow::Result<tally_sim::SimReport> {
    let scenario = tally_sim::Scenario {
        clients,
        clients_per_round: clients,
        rounds,
        model: register()?,
        train: tally_protocol::wire::TrainSpec::sgd(0.1, 32, 1),
        ..tally_sim::Scenario::default()
    };
    Ok(tally_sim::run_on(&scenario, split, &tally_kernels::cpu_device(), &mut |_| {})?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn small_mnist() -> Split {
        let full = tally_kernels::data::embedded_mnist();
        Split {
            train: full.train.subset(&(0..600).collect::<Vec<_>>()).unwrap(),
            test: full.test.subset(&(0..300).collect::<Vec<_>>()).unwrap(),
        }
    }

    /// The acceptance test of "models from Rust": three clients train the
    /// user's burn model by FedAvg in a simulation; accuracy rises well
    /// above chance, and a second run gives the same model hashes.
    #[test]
    fn three_client_simulation_trains_the_custom_model() {
        let split = small_mnist();
        let a = simulate(&split, 3, 3).unwrap();
        let (first, last) = (a.records[0].test_accuracy.unwrap(), a.final_accuracy().unwrap());
        assert!(a.records[1..].iter().all(|r| r.accepted == 3 && r.rejected == 0), "{:?}", a.records);
        assert!(last > 0.6 && last > first + 0.4, "{first} → {last}");
        let b = simulate(&split, 3, 3).unwrap();
        let hashes = |r: &tally_sim::SimReport| r.records.iter().map(|x| x.model_hash.clone()).collect::<Vec<_>>();
        assert_eq!(hashes(&a), hashes(&b));
    }

    /// The layout the server sees is burn's, in visiting order, and the
    /// flat vector round-trips through the module bit for bit.
    #[test]
    fn layout_and_flat_round_trip() {
        let model = BurnModel::<TwoPath>::new(NAME, 784, 10);
        let arch = ModelArch::Custom(tally_kernels::custom::FederatedModel::arch(&model));
        arch.validate().unwrap();
        assert_eq!(arch.num_params(), 4 * 25 + 4 + 256 * 32 + 32 + 32 * 10 + 10 + 784 * 10 + 10);
        let shapes: Vec<Vec<usize>> = arch.tensors().into_iter().map(|t| t.shape).collect();
        assert_eq!(shapes[0], vec![4, 1, 5, 5]);
        assert_eq!(shapes[2], vec![256, 32]);
        let p = arch.init_params(4);
        let net = model.from_flat(&p, &tally_kernels::cpu_device()).unwrap();
        assert_eq!(BurnModel::<TwoPath>::to_flat(&net).unwrap(), p);
    }

    /// A client without the implementation refuses the run's model by name.
    #[test]
    fn an_unregistered_model_is_refused_by_name() {
        let custom = BurnModel::<TwoPath>::new("nobody-registered-this", 784, 10);
        let arch = ModelArch::Custom(tally_kernels::custom::FederatedModel::arch(&custom));
        let split = small_mnist();
        let err = tally_kernels::evaluate(&arch, &arch.init_params(1), &split.test, &tally_kernels::cpu_device(), 100)
            .unwrap_err();
        assert!(matches!(err, tally_kernels::KernelError::UnknownModel(ref n) if n == "nobody-registered-this"));
        // A registered name with another layout (a server that lies about
        // the shapes) is refused too, before any tensor is built.
        let ModelArch::Custom(mut other) = register().unwrap() else { unreachable!() };
        other.tensors.swap(0, 1);
        let other = ModelArch::Custom(other);
        let err =
            tally_kernels::evaluate(&other, &other.init_params(1), &split.test, &tally_kernels::cpu_device(), 100)
                .unwrap_err();
        assert!(matches!(err, tally_kernels::KernelError::InvalidConfig(ref m) if m.contains("differs")), "{err}");
    }
}
