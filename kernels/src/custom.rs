//! Bring your own model: federated training of a model written in Rust.
//!
//! A program that embeds Tally (a client built on `tally-client`, or a
//! simulation through `tally-sim`'s library) can train a model that is no
//! `ModelArch` at all:
//!
//! 1. write the network as a burn module and implement [`BurnNet`] for it
//!    (how to build it, its forward pass, and optionally its loss: the
//!    local training step), or implement the lower-level
//!    [`FederatedModel`] directly for full control of local training;
//! 2. [`register`] it once at start-up, under a name;
//! 3. use its [`FederatedModel::arch`] (a `ModelArch::Custom` carrying the
//!    name and the parameter tensors' shapes) as the run's model: in a
//!    simulation's `Scenario`, or in the server's TOML
//!    (`model = { kind = "custom", name = "…", input = …, classes = …,
//!    tensors = [...] }`).
//!
//! From then on the run is an ordinary run: [`crate::train::train_local`],
//! [`crate::train::evaluate`] and [`crate::train::batch_loss`] hand a
//! `ModelArch::Custom` to the registered implementation, so FedAvg,
//! FedAvgM, Ferret and SPSA clients train it, and the server (which never
//! links burn) validates, initialises and aggregates it from the tensor
//! shapes alone. A client that has no implementation of the run's model
//! refuses it with [`KernelError::UnknownModel`].
//!
//! # Flat order
//!
//! A [`BurnNet`]'s parameters travel as burn visits them (`Module::visit`,
//! field declaration order), each tensor in burn's own layout (a burn
//! `Linear` weight is `[in, out]`, not PyTorch's `[out, in]`). The initial
//! model is the server's: `U(±1/√fan_in)` per tensor, with fan-ins guessed
//! from the shapes ([`burn_arch`]) unless the implementation says otherwise;
//! the module's own initialisation is not used.
//!
//! # The registry
//!
//! The registry is one table per process, filled before the run starts and
//! read by every training call. It is the only state of this crate outside
//! a call's arguments; a registered model must itself be a pure function of
//! its inputs (parameters, data, config, device) for runs to be
//! reproducible, as the built-in models are.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock, RwLock};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use tally_protocol::model::{CustomArch, CustomTensor, ModelArch};

use crate::KernelError;
use crate::data::Dataset;
use crate::train::{EvalReport, TrainConfig, TrainReport};

/// A model the protocol knows only by name and tensor shapes: the local
/// work a client does with it. Parameters are flat `f32` vectors in the
/// order of [`FederatedModel::arch`]'s tensors.
pub trait FederatedModel: Send + Sync + std::fmt::Debug {
    /// The run's model description: `ModelArch::Custom` with this model's
    /// name, input size, classes and tensors.
    fn arch(&self) -> CustomArch;

    /// Local training from `params` on `data` (inputs `[batch, values]`
    /// scaled to `[0, 1]`, labels below `classes`). Must be a pure function
    /// of its arguments.
    fn train(
        &self,
        params: &[f32],
        data: &Dataset,
        cfg: &TrainConfig,
        device: &Device,
    ) -> Result<(Vec<f32>, TrainReport), KernelError>;

    /// Mean loss of `params` on the examples `indices` (forward only, no
    /// randomness: SPSA's replicas evaluate the same losses).
    fn batch_loss(
        &self,
        params: &[f32],
        data: &Dataset,
        indices: &[usize],
        device: &Device,
    ) -> Result<f32, KernelError>;

    /// Loss and accuracy of `params` on `data`.
    fn evaluate(
        &self,
        params: &[f32],
        data: &Dataset,
        device: &Device,
        batch_size: usize,
    ) -> Result<EvalReport, KernelError>;
}

fn registry() -> &'static RwLock<BTreeMap<String, Arc<dyn FederatedModel>>> {
    static REGISTRY: OnceLock<RwLock<BTreeMap<String, Arc<dyn FederatedModel>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| RwLock::new(BTreeMap::new()))
}

/// Registers `model` under its [`CustomArch::name`], replacing any model of
/// that name; returns the run's model description (`ModelArch::Custom`).
/// Refuses a layout the protocol would refuse.
pub fn register(model: Arc<dyn FederatedModel>) -> Result<ModelArch, KernelError> {
    let arch = model.arch();
    arch.validate()?;
    // A poisoned lock means another thread panicked mid-insert; the map
    // itself is still a valid map, so carry on with it.
    let mut map = registry().write().unwrap_or_else(std::sync::PoisonError::into_inner);
    map.insert(arch.name.clone(), model);
    Ok(ModelArch::Custom(arch))
}

/// The registered implementation of `arch`, checked to have the run's
/// layout (a server could name a registered model with other shapes).
pub fn lookup(arch: &CustomArch) -> Result<Arc<dyn FederatedModel>, KernelError> {
    let map = registry().read().unwrap_or_else(std::sync::PoisonError::into_inner);
    let model = map.get(&arch.name).cloned().ok_or_else(|| KernelError::UnknownModel(arch.name.clone()))?;
    if &model.arch() != arch {
        return Err(KernelError::InvalidConfig(format!(
            "the run's layout of custom model {:?} differs from the registered implementation's",
            arch.name
        )));
    }
    Ok(model)
}

/// A burn network a user writes: how to build it and run it. [`BurnModel`]
/// turns it into a [`FederatedModel`] with Tally's training loop (minibatch
/// SGD with the run's momentum and weight decay, the seeded sample order of
/// [`crate::train::train_rng`]).
pub trait BurnNet: Module + std::fmt::Debug + 'static {
    /// A module of the right shapes on `device` (its values are replaced by
    /// the run's parameters before use).
    fn build(device: &Device) -> Self;

    /// Logits `[batch, classes]` for inputs `[batch, values]` in `[0, 1]`.
    fn forward(&self, x: Tensor<2>) -> Tensor<2>;

    /// The loss one training step minimises for a batch: by default the
    /// mean cross-entropy of [`BurnNet::forward`]. Override for another
    /// objective (label smoothing, a regulariser, …); it must be
    /// deterministic.
    fn loss(&self, x: Tensor<2>, y: Tensor<1, Int>) -> Tensor<1> {
        let logits = self.forward(x);
        CrossEntropyLossConfig::new().init(&logits.device()).forward(logits, y)
    }
}

/// Shapes of every float parameter, in visiting order.
struct Shapes(Vec<Vec<usize>>);

impl ModuleVisitor for Shapes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.dims().to_vec());
    }
}

/// Reads every float parameter into one flat vector.
struct Reader {
    out: Vec<f32>,
    error: Option<KernelError>,
}

impl ModuleVisitor for Reader {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        match crate::model::read_tensor(param.val()) {
            Ok(v) => self.out.extend(v),
            Err(e) => self.error = self.error.take().or(Some(e)),
        }
    }
}

/// Replaces every float parameter by the next slice of a flat vector.
struct Writer<'a> {
    rest: &'a [f32],
    device: Device,
}

impl ModuleMapper for Writer<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let dims = param.dims();
        let n: usize = dims.iter().product();
        // The length was checked against the layout, which is these very
        // shapes; a short vector leaves the parameter as built rather than
        // panic (and `from_flat` reports the mismatch).
        let Some((head, tail)) = self.rest.split_at_checked(n) else { return param };
        self.rest = tail;
        Param::from_tensor(Tensor::from_data(TensorData::new(head.to_vec(), dims), &self.device))
    }
}

/// The layout of the [`BurnNet`] `M`: tensors `params.{i}` in visiting
/// order with burn's shapes, and fan-ins guessed from the shapes: a rank-2
/// weight is burn's `[in, out]` (fan-in `in`), a rank-3 or rank-4 weight is
/// `[out, in, …]` (fan-in the product of all but the first axis), and a
/// rank-1 tensor (a bias) takes the fan-in of the tensor before it.
pub fn burn_arch<M: BurnNet>(name: &str, input: u32, classes: u32) -> CustomArch {
    let mut shapes = Shapes(Vec::new());
    M::build(&crate::train::cpu_device()).visit(&mut shapes);
    let mut prev = 1usize;
    let tensors = shapes
        .0
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            let fan_in = match shape.len() {
                1 => prev,
                2 => shape[0],
                _ => shape[1..].iter().product(),
            };
            prev = fan_in;
            CustomTensor {
                name: format!("params.{i}"),
                shape: shape.iter().map(|&d| u32::try_from(d).unwrap_or(u32::MAX)).collect(),
                fan_in: u32::try_from(fan_in.max(1)).unwrap_or(u32::MAX),
            }
        })
        .collect();
    CustomArch { name: name.to_owned(), input, classes, tensors }
}

/// A [`BurnNet`] as a [`FederatedModel`].
#[derive(Debug)]
pub struct BurnModel<M> {
    arch: CustomArch,
    _net: PhantomData<fn() -> M>,
}

impl<M: BurnNet> BurnModel<M> {
    /// The model `M` under `name`, for inputs of `input` values and
    /// `classes` outputs; its layout is [`burn_arch`]'s.
    pub fn new(name: &str, input: u32, classes: u32) -> Self {
        BurnModel { arch: burn_arch::<M>(name, input, classes), _net: PhantomData }
    }

    /// `M` on `device` holding `params`.
    pub fn from_flat(&self, params: &[f32], device: &Device) -> Result<M, KernelError> {
        ModelArch::Custom(self.arch.clone()).check_params(params)?;
        let mut writer = Writer { rest: params, device: device.clone() };
        let net = M::build(device).map(&mut writer);
        if !writer.rest.is_empty() {
            return Err(KernelError::InvalidConfig("parameter vector longer than the module".into()));
        }
        Ok(net)
    }

    /// `net`'s parameters, flat.
    pub fn to_flat(net: &M) -> Result<Vec<f32>, KernelError> {
        let mut reader = Reader { out: Vec::new(), error: None };
        net.visit(&mut reader);
        match reader.error {
            Some(e) => Err(e),
            None => Ok(reader.out),
        }
    }

    fn check(&self, data: &Dataset) -> Result<(), KernelError> {
        crate::train::check_data(&ModelArch::Custom(self.arch.clone()), data)
    }
}

impl<M: BurnNet> FederatedModel for BurnModel<M> {
    fn arch(&self) -> CustomArch {
        self.arch.clone()
    }

    fn train(
        &self,
        params: &[f32],
        data: &Dataset,
        cfg: &TrainConfig,
        device: &Device,
    ) -> Result<(Vec<f32>, TrainReport), KernelError> {
        cfg.check()?;
        self.check(data)?;
        let device = device.clone().autodiff();
        let net = self.from_flat(params, &device)?;
        if cfg.epochs == 0 {
            return Ok((params.to_vec(), TrainReport { mean_loss: 0.0, steps: 0, samples: 0 }));
        }
        let (net, report) = crate::train::sgd(net, data, cfg, &device, |m: &M, x, y, _| m.loss(x, y))?;
        let out = Self::to_flat(&net)?;
        crate::train::check_finite(&out, report.steps)?;
        Ok((out, report))
    }

    fn batch_loss(
        &self,
        params: &[f32],
        data: &Dataset,
        indices: &[usize],
        device: &Device,
    ) -> Result<f32, KernelError> {
        let device = device.clone().without_autodiff();
        let net = self.from_flat(params, &device)?;
        crate::train::loss_on(data, indices, &device, |x, y| net.loss(x, y))
    }

    fn evaluate(
        &self,
        params: &[f32],
        data: &Dataset,
        device: &Device,
        batch_size: usize,
    ) -> Result<EvalReport, KernelError> {
        self.check(data)?;
        let device = device.clone().without_autodiff();
        let net = self.from_flat(params, &device)?;
        crate::train::evaluate_with(data, &device, batch_size, self.arch.classes as usize, |x| net.forward(x))
    }
}
