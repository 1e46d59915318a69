//! Local training (plain minibatch SGD on cross-entropy) and evaluation.
//!
//! # Determinism
//!
//! `train_local` is a pure function of its inputs: the same architecture,
//! parameters, data, config and device kind give bit-identical parameters on
//! the same machine. The sample order comes from ChaCha20 keyed by the seed
//! (see [`train_rng`]); burn itself draws no random numbers here (parameters
//! are loaded, never initialised by burn, and dropout masks come from
//! [`crate::model::DropoutRng`], keyed by the same seed).
//!
//! The flex backend is deterministic as this workspace builds it: burn is used
//! with `default-features = false`, which leaves burn-flex's `rayon` feature
//! off, so every matmul, convolution and reduction runs on the calling thread
//! in a fixed order. (With `rayon` on, large reductions are split across
//! threads by work stealing, and float sums could then differ run to run.
//! Don't enable burn's `rayon` feature without re-running the determinism
//! test.) Bit-identity across *machines* is not promised: gemm picks SIMD
//! kernels (AVX2, AVX-512, FMA) from the CPU at run time.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand_chacha::ChaCha20Rng;
use tally_protocol::model::ModelArch;

use crate::KernelError;
use crate::data::Dataset;
use crate::model::{Model, check_image_size};

/// The CPU device (burn's pure-Rust flex backend), without autodiff;
/// [`train_local`] adds autodiff itself.
pub fn cpu_device() -> Device {
    Device::flex()
}

/// Local training settings.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// SGD step size. Must be finite; negative values are allowed (gradient
    /// ascent, for attack simulations).
    pub lr: f32,
    /// Samples per step; the last batch of an epoch may be smaller. Must be > 0.
    pub batch_size: usize,
    /// Passes over the local data. Zero returns the parameters unchanged.
    pub epochs: u32,
    /// Seeds the per-epoch shuffle.
    pub seed: u64,
    /// SGD momentum as PyTorch's (no dampening, not Nesterov); the buffer
    /// starts at zero every call. 0: plain SGD, exactly as before it existed.
    pub momentum: f32,
    /// L2 weight decay added to the gradient. 0: none.
    pub weight_decay: f32,
}

impl TrainConfig {
    /// Plain SGD.
    pub fn sgd(lr: f32, batch_size: usize, epochs: u32, seed: u64) -> Self {
        TrainConfig { lr, batch_size, epochs, seed, momentum: 0.0, weight_decay: 0.0 }
    }

    /// The run's training settings, with this round's shuffle seed.
    pub fn from_spec(spec: &tally_protocol::wire::TrainSpec, seed: u64) -> Self {
        TrainConfig {
            lr: spec.lr,
            batch_size: spec.batch_size as usize,
            epochs: spec.epochs,
            seed,
            momentum: spec.momentum,
            weight_decay: spec.weight_decay,
        }
    }
}

/// What a training call did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainReport {
    /// Mean per-sample training loss over all steps (each step's mean loss
    /// weighted by its batch size); 0 when no step ran.
    pub mean_loss: f32,
    /// SGD steps taken.
    pub steps: u64,
    /// Samples processed (`epochs * len`).
    pub samples: u64,
}

/// Evaluation totals (sums, so reports over shards add up): the protocol's
/// type, so a client sends what it computed without conversion.
pub use tally_protocol::wire::EvalReport;

/// The generator for the sample order: ChaCha20 with key
/// `seed (8 bytes LE) || "tallytrain" || zeros`, stream 0
/// ([`tally_protocol::rng::keyed_chacha20`]).
pub fn train_rng(seed: u64) -> ChaCha20Rng {
    tally_protocol::rng::keyed_chacha20(seed, b"tallytrain")
}

/// `pixel / 255` for every byte value, computed once (a lookup beats a divide
/// per pixel, and the values are exactly those of `p as f32 / 255.0`).
fn pixel_table() -> [f32; 256] {
    std::array::from_fn(|p| p as f32 / 255.0)
}

/// Checks the dataset against the model before any tensor is built.
pub(crate) fn check_data(arch: &ModelArch, data: &Dataset) -> Result<(), KernelError> {
    if data.is_empty() {
        return Err(KernelError::EmptyDataset);
    }
    check_image_size(arch, data.rows, data.cols)?;
    data.validate()?;
    crate::model::check_inputs(arch, data)?;
    let classes = arch.classes();
    if let Some((index, &label)) = data.labels.iter().enumerate().find(|&(_, &l)| usize::from(l) >= classes) {
        return Err(KernelError::LabelOutOfRange { index, label, classes });
    }
    Ok(())
}

/// Builds the `[b, pixels]` image tensor and `[b]` label tensor for the
/// samples at `indices` (already validated to be in range). Shared with
/// the supermask models' burn path.
pub(crate) fn batch(
    data: &Dataset,
    indices: &[usize],
    table: &[f32; 256],
    device: &Device,
) -> (Tensor<2>, Tensor<1, Int>) {
    let size = data.image_size();
    // One allocation per batch, handed to burn without a copy.
    let mut x = Vec::with_capacity(indices.len() * size);
    let mut y = Vec::with_capacity(indices.len());
    for &i in indices {
        if let (Some(img), Some(&l)) = (data.image(i), data.labels.get(i)) {
            x.extend(img.iter().map(|&p| table[usize::from(p)]));
            y.push(i64::from(l));
        } else if data.is_real() && data.push_sample(i, table, &mut x) {
            // Real-valued features go to the model as they are.
            y.push(data.labels.get(i).map_or(0, |&l| i64::from(l)));
        }
    }
    let b = y.len();
    (Tensor::from_data(TensorData::new(x, [b, size]), device), Tensor::from_data(TensorData::new(y, [b]), device))
}

fn scalar(t: Tensor<1>) -> Result<f32, KernelError> {
    t.try_into_scalar::<f32>().map_err(|e| KernelError::Backend(e.to_string()))
}

/// Steps between reads of the loss. Reading a value waits for the device:
/// on a GPU, a read every step drains the queue each time. The values, their
/// order and the
/// divergence check are the same; a diverged run is only noticed up to this
/// many steps later (its parameters are discarded either way).
const LOSS_READBACK_EVERY: usize = 16;

/// Reads the pending losses in one transfer and accounts for them in step
/// order; the first non-finite one is [`KernelError::Diverged`] with its step.
fn read_losses(
    pending: &mut Vec<(Tensor<1>, usize)>,
    steps: &mut u64,
    samples: &mut u64,
    loss_sum: &mut f64,
) -> Result<(), KernelError> {
    if pending.is_empty() {
        return Ok(());
    }
    let sizes: Vec<usize> = pending.iter().map(|(_, n)| *n).collect();
    let all = Tensor::cat(pending.drain(..).map(|(t, _)| t).collect(), 0);
    let values = all.into_data().try_to_vec::<f32>().map_err(|e| KernelError::Backend(format!("{e:?}")))?;
    for (value, n) in values.into_iter().zip(sizes) {
        if !value.is_finite() {
            return Err(KernelError::Diverged { step: *steps, loss: value });
        }
        *steps += 1;
        *samples += n as u64;
        *loss_sum += f64::from(value) * n as f64;
    }
    Ok(())
}

/// Trains `params` (flat, canonical order) on `data` with minibatch SGD and
/// cross-entropy, reshuffling every epoch; returns the new parameters.
///
/// `device` is the compute device without or with autodiff (it is enabled
/// here). Refuses mismatched parameters, an empty dataset, images of the
/// wrong size, labels beyond the model's classes, a zero batch size or a
/// non-finite learning rate; stops with [`KernelError::Diverged`] if the
/// loss becomes NaN or infinite.
pub fn train_local(
    arch: &ModelArch,
    params: &[f32],
    data: &Dataset,
    cfg: &TrainConfig,
    device: &Device,
) -> Result<(Vec<f32>, TrainReport), KernelError> {
    if let ModelArch::Custom(custom) = arch {
        return crate::custom::lookup(custom)?.train(params, data, cfg, device);
    }
    if cfg.batch_size == 0 {
        return Err(KernelError::InvalidConfig("batch_size must be > 0".into()));
    }
    if !cfg.lr.is_finite() {
        return Err(KernelError::InvalidConfig(format!("learning rate {} is not finite", cfg.lr)));
    }
    check_data(arch, data)?;
    let device = device.clone().autodiff();
    let model = Model::from_flat(arch, params, &device)?;
    if cfg.epochs == 0 {
        return Ok((params.to_vec(), TrainReport { mean_loss: 0.0, steps: 0, samples: 0 }));
    }
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let (model, report) =
        sgd(model, data, cfg, &device, |m: &Model, x, y, drop| loss_fn.forward(m.forward_train(x, drop), y))?;
    let out = model.to_flat()?;
    check_finite(&out, report.steps)?;
    Ok((out, report))
}

impl TrainConfig {
    /// Checks every setting [`train_local`] checks (for training loops
    /// outside it, such as [`crate::custom::BurnModel`]'s).
    pub fn check(&self) -> Result<(), KernelError> {
        if self.batch_size == 0 {
            return Err(KernelError::InvalidConfig("batch_size must be > 0".into()));
        }
        if !self.lr.is_finite() {
            return Err(KernelError::InvalidConfig(format!("learning rate {} is not finite", self.lr)));
        }
        check_optimizer(self)
    }
}

fn check_optimizer(cfg: &TrainConfig) -> Result<(), KernelError> {
    if !(cfg.momentum.is_finite() && (0.0..1.0).contains(&cfg.momentum)) {
        return Err(KernelError::InvalidConfig(format!("momentum {} is not in [0, 1)", cfg.momentum)));
    }
    if !(cfg.weight_decay.is_finite() && cfg.weight_decay >= 0.0) {
        return Err(KernelError::InvalidConfig(format!("weight decay {} is not finite and ≥ 0", cfg.weight_decay)));
    }
    Ok(())
}

/// A diverged result: a finite loss with non-finite weights is possible on
/// the last step.
pub(crate) fn check_finite(out: &[f32], steps: u64) -> Result<(), KernelError> {
    if let Some(index) = out.iter().position(|v| !v.is_finite()) {
        return Err(KernelError::Diverged { step: steps, loss: out.get(index).copied().unwrap_or(f32::NAN) });
    }
    Ok(())
}

/// The training loop every model shares: `cfg.epochs` passes of minibatch
/// SGD (the run's momentum and weight decay) over `data` in the seeded
/// order of [`train_rng`], each step minimising `step_loss(model, x, y,
/// dropout)`. `model` lives on the autodiff `device`; the settings other
/// than momentum and decay are the caller's to check.
pub(crate) fn sgd<M: Module>(
    mut model: M,
    data: &Dataset,
    cfg: &TrainConfig,
    device: &Device,
    step_loss: impl Fn(&M, Tensor<2>, Tensor<1, Int>, &mut crate::model::DropoutRng) -> Tensor<1>,
) -> Result<(M, TrainReport), KernelError> {
    check_optimizer(cfg)?;
    // Zero momentum and decay configure nothing, so plain SGD runs the very
    // same optimizer (and bits) as before these settings existed.
    let mut sgd = SgdConfig::new();
    if cfg.momentum > 0.0 {
        sgd = sgd.with_momentum(Some(MomentumConfig {
            momentum: f64::from(cfg.momentum),
            dampening: 0.0,
            nesterov: false,
        }));
    }
    if cfg.weight_decay > 0.0 {
        sgd = sgd.with_weight_decay(Some(WeightDecayConfig { penalty: cfg.weight_decay }));
    }
    let mut optim = sgd.init();
    let table = pixel_table();
    let mut rng = train_rng(cfg.seed);
    // Only a sequential network with dropout layers draws from it.
    let mut drop = crate::model::DropoutRng::new(cfg.seed);
    let mut order: Vec<usize> = Vec::with_capacity(data.len());
    let (mut steps, mut samples, mut loss_sum) = (0u64, 0u64, 0f64);
    let mut pending: Vec<(Tensor<1>, usize)> = Vec::with_capacity(LOSS_READBACK_EVERY);
    for _ in 0..cfg.epochs {
        order.clear();
        order.extend(0..data.len());
        crate::data::partition::shuffle(&mut rng, &mut order);
        for idx in order.chunks(cfg.batch_size) {
            let (x, y) = batch(data, idx, &table, device);
            let loss = step_loss(&model, x, y, &mut drop);
            pending.push((loss.clone().detach(), idx.len()));
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(f64::from(cfg.lr), model, grads);
            if pending.len() == LOSS_READBACK_EVERY {
                read_losses(&mut pending, &mut steps, &mut samples, &mut loss_sum)?;
            }
        }
    }
    read_losses(&mut pending, &mut steps, &mut samples, &mut loss_sum)?;
    let mean_loss = (loss_sum / samples.max(1) as f64) as f32;
    Ok((model, TrainReport { mean_loss, steps, samples }))
}

/// Mean cross-entropy of `params` on the examples `indices` of `data`
/// (forward only, no autodiff): the loss a zeroth-order step evaluates.
/// `indices` must be in range (callers draw them from `0..data.len()`).
pub fn batch_loss(
    arch: &ModelArch,
    params: &[f32],
    data: &Dataset,
    indices: &[usize],
    device: &Device,
) -> Result<f32, KernelError> {
    if let ModelArch::Custom(custom) = arch {
        return crate::custom::lookup(custom)?.batch_loss(params, data, indices, device);
    }
    let device = device.clone().without_autodiff();
    let model = Model::from_flat(arch, params, &device)?;
    loss_on(data, indices, &device, |x, y| CrossEntropyLossConfig::new().init(&device).forward(model.forward(x), y))
}

/// `loss(x, y)` of the examples `indices` of `data` as one batch, read back.
pub(crate) fn loss_on(
    data: &Dataset,
    indices: &[usize],
    device: &Device,
    loss: impl FnOnce(Tensor<2>, Tensor<1, Int>) -> Tensor<1>,
) -> Result<f32, KernelError> {
    if indices.is_empty() {
        return Err(KernelError::EmptyDataset);
    }
    if let Some(&i) = indices.iter().find(|&&i| i >= data.len()) {
        return Err(KernelError::InvalidConfig(format!("example index {i} out of range")));
    }
    let (x, y) = batch(data, indices, &pixel_table(), device);
    scalar(loss(x, y))
}

/// Cross-entropy and accuracy of `params` on `data`, in batches of
/// `batch_size` (only memory use depends on it). Runs without autodiff.
pub fn evaluate(
    arch: &ModelArch,
    params: &[f32],
    data: &Dataset,
    device: &Device,
    batch_size: usize,
) -> Result<EvalReport, KernelError> {
    if let ModelArch::Custom(custom) = arch {
        return crate::custom::lookup(custom)?.evaluate(params, data, device, batch_size);
    }
    if batch_size == 0 {
        return Err(KernelError::InvalidConfig("batch_size must be > 0".into()));
    }
    check_data(arch, data)?;
    let device = device.clone().without_autodiff();
    let model = Model::from_flat(arch, params, &device)?;
    evaluate_with(data, &device, batch_size, arch.classes(), |x| model.forward(x))
}

/// Scores `forward`'s logits over all of `data` in batches of `batch_size`
/// (the data already checked against the model).
pub(crate) fn evaluate_with(
    data: &Dataset,
    device: &Device,
    batch_size: usize,
    classes: usize,
    forward: impl Fn(Tensor<2>) -> Tensor<2>,
) -> Result<EvalReport, KernelError> {
    if batch_size == 0 {
        return Err(KernelError::InvalidConfig("batch_size must be > 0".into()));
    }
    let table = pixel_table();
    let all: Vec<usize> = (0..data.len()).collect();
    let mut report = EvalReport::default();
    for idx in all.chunks(batch_size) {
        let (x, _) = batch(data, idx, &table, device);
        let logits = crate::model::read_tensor(forward(x))?;
        score_logits(&mut report, &logits, classes, idx, data);
    }
    Ok(report)
}

/// Adds a batch's cross-entropy and hits to `report`: `logits` holds one row
/// of `classes` values per example `idx` of `data` (shared by every model's
/// evaluation so they all score the same way).
pub(crate) fn score_logits(report: &mut EvalReport, logits: &[f32], classes: usize, idx: &[usize], data: &Dataset) {
    for (row, &i) in logits.chunks_exact(classes).zip(idx) {
        let label = data.labels.get(i).map_or(0, |&l| usize::from(l));
        // log-softmax in f64 with the max subtracted, for a stable loss.
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = f64::from(max) + row.iter().map(|&v| (f64::from(v) - f64::from(max)).exp()).sum::<f64>().ln();
        report.loss_sum += lse - row.get(label).map_or(f64::NAN, |&v| f64::from(v));
        let argmax = row
            .iter()
            .enumerate()
            .fold(0, |best, (j, &v)| if v > row.get(best).copied().unwrap_or(f32::NEG_INFINITY) { j } else { best });
        report.correct += u64::from(argmax == label);
        report.total += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn tiny_data(n: usize, seed: u64) -> Dataset {
        // Two classes separable by mean brightness, 28x28.
        let mut rng = train_rng(seed);
        let mut pixels = Vec::with_capacity(n * 784);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let label = (i % 2) as u8;
            for _ in 0..784 {
                let noise = (rand::Rng::next_u32(&mut rng) % 100) as u8;
                pixels.push(if label == 1 { 120 + noise } else { noise });
            }
            labels.push(label);
        }
        Dataset::new(28, 28, pixels, labels, 10).unwrap()
    }

    fn cfg(seed: u64) -> TrainConfig {
        TrainConfig::sgd(0.05, 32, 1, seed)
    }

    #[test]
    fn training_is_bit_identical_across_runs() {
        let device = cpu_device();
        let data = tiny_data(200, 1);
        for arch in [ModelArch::mnist_mlp(), ModelArch::LeNet5 { classes: 10 }] {
            let p0 = arch.init_params(3);
            let (a, ra) = train_local(&arch, &p0, &data, &cfg(9), &device).unwrap();
            let (b, rb) = train_local(&arch, &p0, &data, &cfg(9), &device).unwrap();
            assert_eq!(ra, rb);
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{arch:?} not bit-identical");
            assert_ne!(a, p0, "{arch:?} didn't move");
            // A different shuffle seed changes the result.
            let (c, _) = train_local(&arch, &p0, &data, &cfg(10), &device).unwrap();
            assert_ne!(a, c);
            assert_eq!(ra.steps, 7);
            assert_eq!(ra.samples, 200);
        }
    }

    /// A host may train several clients on parallel threads: each call must
    /// still give the sequential result (no shared state in the backend that
    /// changes the arithmetic).
    #[test]
    fn concurrent_training_matches_sequential() {
        let device = cpu_device();
        let arch = ModelArch::mnist_mlp();
        let p0 = arch.init_params(4);
        let datasets: Vec<Dataset> = (0..3).map(|s| tiny_data(96, s)).collect();
        let sequential: Vec<Vec<f32>> =
            datasets.iter().map(|d| train_local(&arch, &p0, d, &cfg(1), &device).unwrap().0).collect();
        let parallel: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> =
                datasets.iter().map(|d| s.spawn(|| train_local(&arch, &p0, d, &cfg(1), &device).unwrap().0)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (a, b) in sequential.iter().zip(&parallel) {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }

    #[test]
    fn one_sgd_step_matches_hand_gradient() {
        // A 2-input, 2-class linear model (no hidden layer) on one sample:
        // dL/dz = softmax(z) - onehot(y); W' = W - lr * dz x^T; b' = b - lr * dz.
        let device = cpu_device();
        let arch = ModelArch::Mlp { input: 4, hidden: vec![], classes: 2 };
        let p = vec![0.1, -0.2, 0.3, 0.05, -0.1, 0.2, 0.0, 0.4, 0.01, -0.02];
        let data = Dataset::new(2, 2, vec![255, 0, 51, 102], vec![1], 2).unwrap();
        let c = TrainConfig::sgd(0.5, 4, 1, 0);
        let (got, report) = train_local(&arch, &p, &data, &c, &device).unwrap();
        let x = [1.0f64, 0.0, 0.2, 0.4];
        let z: Vec<f64> =
            (0..2).map(|o| p[8 + o] as f64 + (0..4).map(|i| p[o * 4 + i] as f64 * x[i]).sum::<f64>()).collect();
        let e: Vec<f64> = z.iter().map(|v| v.exp()).collect();
        let s = e[0] + e[1];
        let dz = [e[0] / s, e[1] / s - 1.0];
        let loss = -(e[1] / s).ln();
        assert!((report.mean_loss as f64 - loss).abs() < 1e-6);
        for o in 0..2 {
            for i in 0..4 {
                let want = p[o * 4 + i] as f64 - 0.5 * dz[o] * x[i];
                assert!((got[o * 4 + i] as f64 - want).abs() < 1e-6);
            }
            assert!((got[8 + o] as f64 - (p[8 + o] as f64 - 0.5 * dz[o])).abs() < 1e-6);
        }
    }

    /// Plain-Rust minibatch SGD for an MLP (f64, hand-written backprop) with
    /// the same sample order as `train_local`.
    #[cfg(feature = "embedded-data")]
    fn reference_mlp_sgd(arch: &ModelArch, p: &[f32], data: &Dataset, c: &TrainConfig) -> Vec<f64> {
        let specs = arch.tensors();
        let dims: Vec<(usize, usize)> = specs.chunks(2).map(|s| (s[0].shape[0], s[0].shape[1])).collect();
        let mut w: Vec<f64> = p.iter().map(|&v| v as f64).collect();
        let mut velocity = vec![0f64; w.len()];
        let mut first = true;
        let mut rng = train_rng(c.seed);
        for _ in 0..c.epochs {
            let mut order: Vec<usize> = (0..data.len()).collect();
            crate::data::partition::shuffle(&mut rng, &mut order);
            for idx in order.chunks(c.batch_size) {
                let mut grad = vec![0f64; w.len()];
                for &s in idx {
                    // Forward, keeping every layer's input.
                    let mut acts: Vec<Vec<f64>> =
                        vec![data.image(s).unwrap().iter().map(|&v| (v as f32 / 255.0) as f64).collect()];
                    let mut off = 0;
                    for (l, &(out, inp)) in dims.iter().enumerate() {
                        let x = acts.last().unwrap();
                        let z: Vec<f64> = (0..out)
                            .map(|o| {
                                let s =
                                    w[off + out * inp + o] + (0..inp).map(|i| w[off + o * inp + i] * x[i]).sum::<f64>();
                                if l + 1 < dims.len() { s.max(0.0) } else { s }
                            })
                            .collect();
                        off += out * inp + out;
                        acts.push(z);
                    }
                    // dL/dz of the last layer: softmax - onehot, averaged over the batch.
                    let z = acts.last().unwrap();
                    let m = z.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    let y = data.labels[s] as usize;
                    let mut dz: Vec<f64> =
                        e.iter().enumerate().map(|(k, v)| (v / sum - f64::from(k == y)) / idx.len() as f64).collect();
                    // Backward.
                    for (l, &(out, inp)) in dims.iter().enumerate().rev() {
                        let off: usize = dims[..l].iter().map(|&(o, i)| o * i + o).sum();
                        let x = &acts[l];
                        let mut dx = vec![0f64; inp];
                        for o in 0..out {
                            grad[off + out * inp + o] += dz[o];
                            for i in 0..inp {
                                grad[off + o * inp + i] += dz[o] * x[i];
                                dx[i] += dz[o] * w[off + o * inp + i];
                            }
                        }
                        // ReLU mask of the previous layer's output (x itself).
                        dz = dx.iter().zip(x).map(|(d, &a)| if a > 0.0 { *d } else { 0.0 }).collect();
                    }
                }
                // PyTorch's SGD: g += wd·w; v = g on the first step, else
                // μ·v + g; w -= lr·v.
                for ((wi, gi), vi) in w.iter_mut().zip(&grad).zip(velocity.iter_mut()) {
                    let g = gi + f64::from(c.weight_decay) * *wi;
                    *vi = if first || c.momentum == 0.0 { g } else { f64::from(c.momentum) * *vi + g };
                    *wi -= c.lr as f64 * *vi;
                }
                first = false;
            }
        }
        w
    }

    /// FRL's LeNet trained densely (FRL's FedAvg baseline): the generic
    /// trainer runs it, with momentum, and it learns.
    #[cfg(feature = "embedded-data")]
    #[test]
    fn frl_dense_lenet_trains_with_momentum() {
        let device = cpu_device();
        let arch = ModelArch::FrlDense(tally_protocol::supermask::FrlArch::MNIST_LENET);
        let split = crate::data::embedded_mnist();
        let data = split.train.subset(&(0..128).collect::<Vec<_>>()).unwrap();
        let p0 = arch.init_params(2);
        let before = evaluate(&arch, &p0, &data, &device, 64).unwrap();
        let c = TrainConfig { momentum: 0.9, ..TrainConfig::sgd(0.01, 16, 3, 1) };
        let (p1, r) = train_local(&arch, &p0, &data, &c, &device).unwrap();
        assert_eq!(r.steps, 24);
        let after = evaluate(&arch, &p1, &data, &device, 64).unwrap();
        assert!(
            after.loss_sum < 0.8 * before.loss_sum && after.correct > before.correct,
            "loss {} -> {}, correct {} -> {}",
            before.loss_sum,
            after.loss_sum,
            before.correct,
            after.correct
        );
    }

    #[cfg(feature = "embedded-data")]
    #[test]
    fn momentum_and_weight_decay_match_pytorch_sgd() {
        let device = cpu_device();
        let arch = ModelArch::Mlp { input: 784, hidden: vec![16], classes: 10 };
        let split = crate::data::embedded_mnist();
        let data = split.train.subset(&(0..64).collect::<Vec<_>>()).unwrap();
        let p0 = arch.init_params(6);
        let plain = TrainConfig::sgd(0.05, 16, 2, 4);
        let heavy = TrainConfig { momentum: 0.9, weight_decay: 1e-2, ..plain.clone() };
        let (got, _) = train_local(&arch, &p0, &data, &heavy, &device).unwrap();
        let want = reference_mlp_sgd(&arch, &p0, &data, &heavy);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - w).abs() < 5e-5, "param {i}: burn {g} vs reference {w}");
        }
        // The settings matter: plain SGD ends elsewhere.
        let (base, _) = train_local(&arch, &p0, &data, &plain, &device).unwrap();
        let apart = base.iter().zip(&got).map(|(a, b)| f64::from((a - b).abs())).fold(0.0, f64::max);
        assert!(apart > 1e-3, "momentum and decay changed nothing ({apart})");
        // Out-of-range settings are refused.
        for bad in [
            TrainConfig { momentum: 1.0, ..plain.clone() },
            TrainConfig { momentum: f32::NAN, ..plain.clone() },
            TrainConfig { weight_decay: -1.0, ..plain.clone() },
        ] {
            assert!(matches!(train_local(&arch, &p0, &data, &bad, &device), Err(KernelError::InvalidConfig(_))));
        }
    }

    #[cfg(feature = "embedded-data")]
    #[test]
    fn mlp_training_matches_reference_backprop() {
        let device = cpu_device();
        let arch = ModelArch::Mlp { input: 784, hidden: vec![24, 16], classes: 10 };
        let split = crate::data::embedded_mnist();
        let data = split.train.subset(&(0..96).collect::<Vec<_>>()).unwrap();
        let p0 = arch.init_params(5);
        let c = TrainConfig::sgd(0.1, 16, 2, 4);
        let (got, r) = train_local(&arch, &p0, &data, &c, &device).unwrap();
        assert_eq!(r.steps, 12);
        let want = reference_mlp_sgd(&arch, &p0, &data, &c);
        let moved = got.iter().zip(&p0).filter(|(a, b)| a != b).count();
        assert!(moved > got.len() / 2, "only {moved} parameters changed");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - w).abs() < 2e-5, "param {i}: burn {g} vs reference {w}");
        }
    }

    #[test]
    fn rejects_bad_inputs() {
        let device = cpu_device();
        let arch = ModelArch::mnist_mlp();
        let p = arch.init_params(1);
        let data = tiny_data(4, 1);
        let err = |r: Result<(Vec<f32>, TrainReport), KernelError>| r.unwrap_err();
        assert!(matches!(err(train_local(&arch, &p[1..], &data, &cfg(0), &device)), KernelError::Model(_)));
        assert!(matches!(
            err(train_local(&arch, &p, &data.subset(&[]).unwrap(), &cfg(0), &device)),
            KernelError::EmptyDataset
        ));
        let small = Dataset::new(14, 14, vec![0; 196], vec![0], 10).unwrap();
        assert!(matches!(err(train_local(&arch, &p, &small, &cfg(0), &device)), KernelError::ImageSize { .. }));
        let mut bad = data.clone();
        bad.labels[2] = 12;
        assert!(matches!(err(train_local(&arch, &p, &bad, &cfg(0), &device)), KernelError::Data(_)));
        let mut skew = data.clone();
        skew.classes = 20;
        skew.labels[1] = 15; // valid for the dataset, not for a 10-class model
        assert!(matches!(
            err(train_local(&arch, &p, &skew, &cfg(0), &device)),
            KernelError::LabelOutOfRange { index: 1, label: 15, classes: 10 }
        ));
        let mut broken = data.clone();
        broken.pixels.pop();
        assert!(matches!(err(train_local(&arch, &p, &broken, &cfg(0), &device)), KernelError::Data(_)));
        let c = TrainConfig { batch_size: 0, ..cfg(0) };
        assert!(matches!(err(train_local(&arch, &p, &data, &c, &device)), KernelError::InvalidConfig(_)));
        let c = TrainConfig { lr: f32::NAN, ..cfg(0) };
        assert!(matches!(err(train_local(&arch, &p, &data, &c, &device)), KernelError::InvalidConfig(_)));
        assert!(evaluate(&arch, &p, &data, &device, 0).is_err());
        // Zero epochs: unchanged.
        let c = TrainConfig { epochs: 0, ..cfg(0) };
        let (q, r) = train_local(&arch, &p, &data, &c, &device).unwrap();
        assert_eq!((q, r.steps), (p, 0));
    }

    #[test]
    fn divergence_is_an_error_not_nan_params() {
        let device = cpu_device();
        let arch = ModelArch::Mlp { input: 784, hidden: vec![32], classes: 10 };
        let data = tiny_data(64, 2);
        let c = TrainConfig::sgd(1e30, 8, 3, 0);
        assert!(matches!(
            train_local(&arch, &arch.init_params(0), &data, &c, &device),
            Err(KernelError::Diverged { .. })
        ));
    }

    #[test]
    fn evaluate_matches_hand_computation_and_batching() {
        let device = cpu_device();
        let arch = ModelArch::Mlp { input: 4, hidden: vec![], classes: 3 };
        let p: Vec<f32> = (0..15).map(|i| (i as f32 - 7.0) / 5.0).collect();
        let data = Dataset::new(2, 2, vec![255, 0, 0, 0, 0, 0, 0, 255, 10, 20, 30, 40], vec![0, 2, 1], 3).unwrap();
        let r = evaluate(&arch, &p, &data, &device, 2).unwrap();
        let mut loss = 0.0;
        let mut correct = 0;
        for s in 0..3 {
            let x: Vec<f64> = data.image(s).unwrap().iter().map(|&v| v as f64 / 255.0).collect();
            let z: Vec<f64> =
                (0..3).map(|o| p[12 + o] as f64 + (0..4).map(|i| p[o * 4 + i] as f64 * x[i]).sum::<f64>()).collect();
            let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
            let y = data.labels[s] as usize;
            loss += lse - z[y];
            let am = (0..3).fold(0, |b, j| if z[j] > z[b] { j } else { b });
            correct += u64::from(am == y);
        }
        assert_eq!((r.total, r.correct), (3, correct));
        assert!((r.loss_sum - loss).abs() < 1e-5, "{} vs {loss}", r.loss_sum);
        let r1 = evaluate(&arch, &p, &data, &device, 1).unwrap();
        assert_eq!(r1.correct, r.correct);
        assert!((r1.loss_sum - r.loss_sum).abs() < 1e-9);
    }

    #[cfg(feature = "embedded-data")]
    #[test]
    fn mlp_learns_embedded_mnist() {
        let device = cpu_device();
        let split = crate::data::embedded_mnist();
        let arch = ModelArch::Mlp { input: 784, hidden: vec![100], classes: 10 };
        // lr 0.1, not 0.05: with [0, 1] inputs and PyTorch's default init,
        // lr 0.05 reaches only 83-86% after this one epoch (8 seeds measured),
        // too close to the bar; lr 0.1 gives 85-87%, and seed 0 gives 86.5%
        // (training is bit-deterministic, so this is not flaky).
        let p0 = arch.init_params(0);
        let before = evaluate(&arch, &p0, &split.test, &device, 500).unwrap();
        let c = TrainConfig::sgd(0.1, 32, 1, 0);
        let t = std::time::Instant::now();
        let (p, report) = train_local(&arch, &p0, &split.train, &c, &device).unwrap();
        let secs = t.elapsed().as_secs_f64();
        let after = evaluate(&arch, &p, &split.test, &device, 500).unwrap();
        println!(
            "MLP 784-100-10, 1 epoch on 10k: {} steps in {secs:.2} s ({:.0} steps/s), train loss {:.4}, \
             test acc {:.4} (before {:.4}), test loss {:.4}",
            report.steps,
            report.steps as f64 / secs,
            report.mean_loss,
            after.accuracy(),
            before.accuracy(),
            after.mean_loss()
        );
        assert_eq!(report.steps, 313);
        assert_eq!(after.total, 2000);
        assert!(after.accuracy() > 0.85, "accuracy {}", after.accuracy());
        assert!(after.mean_loss() < before.mean_loss());
    }

    #[cfg(feature = "embedded-data")]
    #[test]
    fn lenet_loss_decreases() {
        let device = cpu_device();
        let split = crate::data::embedded_mnist();
        let arch = ModelArch::LeNet5 { classes: 10 };
        let p0 = arch.init_params(7);
        // LeNet from PyTorch's default init sits on a plateau (loss ~2.30) for
        // the first ~50 steps, so a few hundred samples barely move it
        // (2.302 -> 2.29 after 512); 2,048 samples (128 steps) get well past it.
        let train = split.train.subset(&(0..2048).collect::<Vec<_>>()).unwrap();
        let held = split.test.subset(&(0..500).collect::<Vec<_>>()).unwrap();
        let before = evaluate(&arch, &p0, &held, &device, 250).unwrap();
        let c = TrainConfig::sgd(0.1, 16, 1, 3);
        let t = std::time::Instant::now();
        let (p, report) = train_local(&arch, &p0, &train, &c, &device).unwrap();
        let secs = t.elapsed().as_secs_f64();
        let after = evaluate(&arch, &p, &held, &device, 250).unwrap();
        println!(
            "LeNet-5, 1 epoch on 2048: {} steps in {secs:.2} s, held-out loss {:.4} -> {:.4}, acc {:.4} -> {:.4}",
            report.steps,
            before.mean_loss(),
            after.mean_loss(),
            before.accuracy(),
            after.accuracy()
        );
        assert_eq!(report.steps, 128);
        assert!(after.mean_loss() < before.mean_loss() * 0.8, "{} -> {}", before.mean_loss(), after.mean_loss());
        assert!(after.accuracy() > 0.4, "accuracy {}", after.accuracy());
    }

    /// Throughput of the benchmark's model (784-200-200-10, batch 32); run with
    /// `cargo test --release -p tally-kernels -- --ignored --nocapture speed`.
    #[cfg(feature = "embedded-data")]
    #[test]
    #[ignore = "timing only"]
    fn speed_mnist_mlp() {
        let device = cpu_device();
        let split = crate::data::embedded_mnist();
        let arch = ModelArch::mnist_mlp();
        let p0 = arch.init_params(1);
        let data = split.train.subset(&(0..6000).collect::<Vec<_>>()).unwrap();
        let c = TrainConfig::sgd(0.05, 32, 1, 1);
        let _ = train_local(&arch, &p0, &data.subset(&(0..320).collect::<Vec<_>>()).unwrap(), &c, &device).unwrap();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let (_, r) = train_local(&arch, &p0, &data, &c, &device).unwrap();
            let s = t.elapsed().as_secs_f64();
            println!("784-200-200-10 b32: {} steps in {s:.3} s = {:.0} steps/s", r.steps, r.steps as f64 / s);
        }
        let arch = ModelArch::LeNet5 { classes: 10 };
        let p0 = arch.init_params(1);
        let t = std::time::Instant::now();
        let (_, r) = train_local(&arch, &p0, &data, &c, &device).unwrap();
        let s = t.elapsed().as_secs_f64();
        println!("LeNet-5 b32: {} steps in {s:.3} s = {:.0} steps/s", r.steps, r.steps as f64 / s);
        let t = std::time::Instant::now();
        let e = evaluate(&arch, &p0, &split.test, &device, 500).unwrap();
        println!("LeNet-5 evaluate 2000 images: {:.3} s", t.elapsed().as_secs_f64());
        assert_eq!(e.total, 2000);
    }

    /// A tiny next-character run on the embedded Shakespeare sample: a few
    /// SGD epochs lower the training loss and raise the accuracy.
    #[cfg(feature = "embedded-data")]
    #[test]
    fn char_gru_learns_on_the_shakespeare_sample() {
        use crate::data::shakespeare::{self, VOCAB_SIZE, WINDOW};
        let roles = shakespeare::embedded_sample();
        let clients = shakespeare::clients(&roles, WINDOW);
        let fed = shakespeare::federation(&clients, WINDOW).unwrap();
        // 512 training windows, every 8th, so the test stays short.
        let idx: Vec<usize> = (0..fed.train.len()).step_by(8).take(512).collect();
        let data = fed.train.subset(&idx).unwrap();
        let arch = ModelArch::CharGru { vocab: VOCAB_SIZE as u32, embed: 8, hidden: 32, seq: WINDOW as u32 };
        let device = cpu_device();
        let p0 = arch.init_params(1);
        let before = evaluate(&arch, &p0, &data, &device, 256).unwrap();
        let c = TrainConfig::sgd(1.0, 16, 3, 2);
        let t = std::time::Instant::now();
        let (p1, report) = train_local(&arch, &p0, &data, &c, &device).unwrap();
        let secs = t.elapsed().as_secs_f64();
        let after = evaluate(&arch, &p1, &data, &device, 256).unwrap();
        println!(
            "char-gru h32: {} samples in {secs:.2} s ({:.0} samples/s); loss {:.3} -> {:.3}, accuracy {:.3} -> {:.3}",
            report.samples,
            report.samples as f64 / secs,
            before.mean_loss(),
            after.mean_loss(),
            before.accuracy(),
            after.accuracy()
        );
        assert!(after.mean_loss() < before.mean_loss() - 0.5, "{before:?} -> {after:?}");
        // A model that learnt anything beats predicting the space (about 17% of characters).
        assert!(after.accuracy() > 0.2, "{after:?}");
        // Deterministic like every other model.
        let (p2, _) = train_local(&arch, &p0, &data, &c, &device).unwrap();
        assert!(p1.iter().zip(&p2).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
