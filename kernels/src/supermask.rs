//! FRL's client-side model: supermask networks (edge-popup) over frozen,
//! seed-derived signed weights, trained through per-edge scores and exchanged
//! as per-layer rankings.
//!
//! Paper: Mozaffari, Shejwalkar, Houmansadr, *Every Vote Counts: Ranking-Based
//! Training of Federated Learning to Resist Poisoning Attacks* (FRL, USENIX
//! Security 2023); code `SPIN-UMass/FRL` (`models/{small,modules,module_util,
//! init,builder}.py`, `FL_train.py`, `utils.py`). Edge-popup: Ramanujan et al.,
//! *What's Hidden in a Randomly Weighted Neural Network?* (CVPR 2020), code
//! `allenai/hidden-networks`. The team's notes: `docs/algorithms.md` §1.
//!
//! # Network, edge order, frozen weights, initial scores
//!
//! Defined once, in [`tally_protocol::supermask`] (re-exported here): the
//! layer list of each [`FrlArch`], the canonical edge order rankings index,
//! `W_l[i] = ±σ_l` from the Rademacher stream `(run_seed, FrlWeights, 0, 0, l)`
//! and `S_l[i] = (2·u_i − 1)·b_l` from the stream `(run_seed, FrlScores, 0, 0,
//! l)`. The server builds the initial global ranking from the same
//! definition without linking burn. Inputs are `(pixel/255 − mean)/std`
//! ([`InputNorm`]; FRL's MNIST transform uses mean 0.1307, std 0.3081).
//! 2×2 max pooling is computed as pool-then-ReLU, which is the same function
//! as FRL's ReLU-then-pool.
//!
//! The server keeps `s̄_l = sort_asc(S_l)` ([`sorted_initial_scores`]); every
//! later global score vector is a permutation of it.
//!
//! # Mask, gradient, ranking
//!
//! * **Mask** (per layer): keep the `n − ⌊(1−k)·n⌋` edges of largest `|S|`
//!   ([`keep_count`], the protocol's; `(1−k)·n` computed in binary64 as Python's
//!   `int((1 - k) * numel)` does). Ties in `|S|` are broken by index: among
//!   equal `|S|`, lower indices are pruned first (FRL's `torch.sort` leaves
//!   ties unspecified). See [`MaskThreshold`].
//! * **Straight-through gradient**: FRL's `GetSubnet` passes the gradient of
//!   the mask unchanged to `|S|`, and `abs` multiplies by `sign(S)`, so
//!   `∂L/∂S = sign(S) ⊙ W ⊙ ∂L/∂W_eff` with `W_eff = W ⊙ mask` and
//!   `sign(0) = 0` (PyTorch's `abs` backward). burn computes `∂L/∂W_eff`; the
//!   product is formed here.
//! * **Ranking** (`utils.py::Find_rank`): `R = argsort_asc(S)` on the signed
//!   scores ([`MaskRule::TwoSided`]), or on `|S|` ([`MaskRule::OneSidedTopK`],
//!   the one-sided reading of the paper, `algorithms.md` §1.4). The sort is
//!   stable: ties in value keep ascending index order; `−0.0` and `+0.0` are
//!   equal. Defined once, in the protocol ([`rank_layer`], re-exported here),
//!   which the server's [`tally_protocol::frl::Ranking::from_scores`] uses too.
//! * **Scores from a ranking** (`utils.py::FRL_Vote`): `S[R[j]] = s̄[j]`
//!   ([`scores_from_ranking`]); in magnitude mode `s̄` is `sort_asc(|S⁰|)`.
//!
//! # Local training
//!
//! SGD with momentum and weight decay on the scores only, PyTorch's update
//! (`d = g + wd·S; buf = d` on the first step, `buf = μ·buf + d` after;
//! `S ← S − η·buf`), cosine annealing of η over the local epochs, mean
//! cross-entropy, the local data reshuffled every epoch. See
//! [`FrlTrainConfig`]. Deterministic like [`crate::train`]: the sample order
//! comes from [`crate::train::train_rng`].
//!
//! # Two implementations, chosen by the device
//!
//! The native kernels (`native.rs`: single-threaded CPU, AVX2+FMA through
//! `pulp`, sparse convolution backward after max-pool, fc backward fused with
//! the SGD update and the next step's mask threshold; bit-identical on the
//! SIMD and scalar paths, about 3× faster than burn's flex backend here) and
//! burn ([`Supermask::train_burn`], [`Supermask::evaluate_scores_burn`]: the
//! same functions on any burn device, and the reference the native kernels'
//! parity tests compare against).
//!
//! [`Supermask::train`] and [`Supermask::evaluate_scores`] take the device
//! the caller chose and pick the implementation through one seam,
//! [`SupermaskBackend::for_device`]: the CPU device ([`crate::cpu_device`],
//! burn's flex backend, with or without autodiff) gets the native kernels;
//! any other device (a GPU, say) gets burn on that device. Both paths make
//! the same checks and follow the same sample order and update, so a result
//! depends on the device only through f32 rounding (summation order), as
//! with [`crate::train`]. In both, the scores, the momentum buffer and the
//! mask are plain `Vec<f32>` updated here, which keeps the per-step mask an
//! `O(n)` radix selection ([`mask_threshold`]) and gives exact control over
//! FRL's update order.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::activation::relu;
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};

use crate::KernelError;
use crate::data::Dataset;
use crate::model::read_tensor;
use crate::train::{EvalReport, batch, train_rng};

mod native;

/// FRL's default keep fraction `k` (`args.sparsity = 0.5`): half of every
/// layer's edges are in the mask.
pub const DEFAULT_KEEP_FRACTION: f64 = 0.5;

// The network definitions (layers, canonical edge order, seed-derived
// weights and scores) are the protocol's, so the server knows them without
// burn and no party can derive a different network.
pub use tally_protocol::supermask::{
    FrlArch, LENET_SIDE, LayerKind, MaskedLayer, frozen_layer_weights, initial_layer_scores,
};

// The ranking, its vocabulary ([`MaskRule`]: which order the ranking follows,
// `algorithms.md` §1.4) and the keep count are the protocol's too: the one
// definition the server's vote and every client use.
use tally_protocol::frl::magnitude_key;
pub use tally_protocol::frl::{MaskRule, keep_count, rank_layer, rank_value};

/// Which implementation of the supermask kernels runs on a device (see the
/// module docs, "Two implementations, chosen by the device").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SupermaskBackend {
    /// The native single-threaded CPU kernels (`native.rs`); the device is
    /// not used.
    Native,
    /// burn on the caller's device ([`Supermask::train_burn`],
    /// [`Supermask::evaluate_scores_burn`]).
    Burn,
}

impl SupermaskBackend {
    /// The implementation for `device`: [`SupermaskBackend::Native`] for the
    /// CPU device (burn's flex backend, whether or not autodiff is enabled:
    /// burn's device equality ignores autodiff), [`SupermaskBackend::Burn`]
    /// for any other.
    pub fn for_device(device: &Device) -> Self {
        if *device == Device::flex() { SupermaskBackend::Native } else { SupermaskBackend::Burn }
    }
}

/// Input normalisation: a pixel `p` becomes `(p/255 − mean)/std`, in f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InputNorm {
    /// Subtracted after scaling to `[0, 1]`.
    pub mean: f32,
    /// Divides after subtracting the mean.
    pub std: f32,
}

impl InputNorm {
    /// FRL's MNIST transform (`data/mnist.py`).
    pub const MNIST: InputNorm = InputNorm { mean: 0.1307, std: 0.3081 };
    /// The usual Fashion-MNIST statistics (FRL has no Fashion-MNIST loader).
    pub const FASHION_MNIST: InputNorm = InputNorm { mean: 0.2860, std: 0.3530 };
    /// Pixels scaled to `[0, 1]` only.
    pub const NONE: InputNorm = InputNorm { mean: 0.0, std: 1.0 };

    fn table(&self) -> [f32; 256] {
        std::array::from_fn(|p| (p as f32 / 255.0 - self.mean) / self.std)
    }
}

impl Default for InputNorm {
    fn default() -> Self {
        InputNorm::MNIST
    }
}

/// The shared definition of an FRL run's network: every party derives the same
/// frozen weights and reference scores from it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SupermaskConfig {
    /// The architecture.
    pub arch: FrlArch,
    /// The run's shared seed (names the [`tally_protocol::prng`] streams).
    pub run_seed: u64,
    /// Fraction of each layer's edges kept in the mask, in `[0, 1]`.
    /// Default [`DEFAULT_KEEP_FRACTION`].
    pub keep_fraction: f64,
    /// Signed ranking ([`MaskRule::TwoSided`], FRL's code, default) or
    /// magnitude ranking ([`MaskRule::OneSidedTopK`]).
    pub mask_rule: MaskRule,
    /// Input normalisation. Default [`InputNorm::MNIST`].
    pub input_norm: InputNorm,
}

impl SupermaskConfig {
    /// FRL's defaults for `arch` and `run_seed`.
    pub fn new(arch: FrlArch, run_seed: u64) -> Self {
        SupermaskConfig {
            arch,
            run_seed,
            keep_fraction: DEFAULT_KEEP_FRACTION,
            mask_rule: MaskRule::TwoSided,
            input_norm: InputNorm::MNIST,
        }
    }
}

/// Local training settings (FRL's `args.py` and `experiments/*.txt`).
#[derive(Clone, Debug, PartialEq)]
pub struct FrlTrainConfig {
    /// Base learning rate at round 0 (FRL: 0.4).
    pub lr: f64,
    /// Per-round decay: round `r` starts at `lr · lr_decay^r` (FRL: 0.999).
    pub lr_decay: f64,
    /// The federated round (sets the decayed base rate).
    pub round: u32,
    /// SGD momentum (FRL: 0.9). The buffer is fresh every call.
    pub momentum: f32,
    /// L2 weight decay on the scores (FRL: 1e-4).
    pub weight_decay: f32,
    /// Samples per step (FRL: 8); the last batch of an epoch may be smaller.
    pub batch_size: usize,
    /// Local epochs `E` (FRL: 2 on MNIST, 5 on CIFAR-10). Epoch `i` uses
    /// `η_r·(1 + cos(π·i/E))/2` (cosine annealing over the local epochs).
    pub epochs: u32,
    /// Seeds the per-epoch shuffle.
    pub seed: u64,
}

impl FrlTrainConfig {
    /// FRL's MNIST/LeNet settings for `round` (2 local epochs).
    pub fn mnist(round: u32, seed: u64) -> Self {
        FrlTrainConfig {
            lr: 0.4,
            lr_decay: 0.999,
            round,
            momentum: 0.9,
            weight_decay: 1e-4,
            batch_size: 8,
            epochs: 2,
            seed,
        }
    }

    /// FRL's CIFAR-10/Conv8 settings for `round` (5 local epochs).
    pub fn cifar10(round: u32, seed: u64) -> Self {
        FrlTrainConfig { epochs: 5, ..FrlTrainConfig::mnist(round, seed) }
    }

    /// The learning rate of local epoch `epoch`.
    pub fn epoch_lr(&self, epoch: u32) -> f64 {
        let base = self.lr * self.lr_decay.powi(self.round as i32);
        let e = f64::from(self.epochs.max(1));
        base * (1.0 + (std::f64::consts::PI * f64::from(epoch) / e).cos()) / 2.0
    }

    fn validate(&self) -> Result<(), KernelError> {
        let bad = |m: String| Err(KernelError::InvalidConfig(m));
        if self.batch_size == 0 {
            return bad("batch_size must be > 0".into());
        }
        if !(self.lr.is_finite() && self.lr_decay.is_finite() && self.momentum.is_finite()) {
            return bad("lr, lr_decay and momentum must be finite".into());
        }
        if !self.weight_decay.is_finite() {
            return bad("weight_decay must be finite".into());
        }
        Ok(())
    }
}

/// What a training call did.
#[derive(Clone, Debug, PartialEq)]
pub struct FrlTrainReport {
    /// Mean per-sample training loss over all steps; 0 when no step ran.
    pub mean_loss: f32,
    /// SGD steps taken.
    pub steps: u64,
    /// Samples processed (`epochs · len`).
    pub samples: u64,
}

// ---------------------------------------------------------------------------
// Seed-derived tensors (the specification in the module docs).
// ---------------------------------------------------------------------------

/// The frozen weights of every layer of `arch`, in canonical order.
pub fn frozen_weights(arch: &FrlArch, run_seed: u64) -> Vec<Vec<f32>> {
    arch.layers().iter().enumerate().map(|(l, spec)| frozen_layer_weights(run_seed, l, spec)).collect()
}

/// The initial scores `S⁰` of every layer of `arch`.
pub fn initial_scores(arch: &FrlArch, run_seed: u64) -> Vec<Vec<f32>> {
    arch.layers().iter().enumerate().map(|(l, spec)| initial_layer_scores(run_seed, l, spec)).collect()
}

/// `s̄_l`: the initial scores of every layer sorted ascending (`|S⁰|` sorted
/// for [`MaskRule::OneSidedTopK`]), i.e. [`rank_value`] in [`rank_layer`]
/// order, as the server's [`tally_protocol::frl::reference`]. The values a
/// ranking is turned back into.
pub fn sorted_initial_scores(arch: &FrlArch, run_seed: u64, rule: MaskRule) -> Vec<Vec<f32>> {
    initial_scores(arch, run_seed)
        .into_iter()
        .map(|s| rank_layer(&s, rule).iter().map(|&i| rank_value(s[i as usize], rule)).collect())
        .collect()
}

// ---------------------------------------------------------------------------
// Mask: top-k of |S| by radix selection.
// ---------------------------------------------------------------------------

/// The boundary of a layer's mask: edge `i` with score `s` is kept iff
/// `(|s|, i) ≥ (key, index)` in lexicographic order, `|s|` compared by its
/// bits (= by value). So exactly the [`keep_count`] largest `(|s|, i)` pairs
/// are kept: among equal `|s|`, higher indices win.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskThreshold {
    key: u32,
    index: usize,
}

impl MaskThreshold {
    /// Keeps every edge.
    pub const ALL: MaskThreshold = MaskThreshold { key: 0, index: 0 };
    /// Keeps no edge.
    pub const NONE: MaskThreshold = MaskThreshold { key: u32::MAX, index: usize::MAX };

    /// Whether edge `index` with score `score` is in the mask.
    #[inline]
    pub fn keeps(&self, score: f32, index: usize) -> bool {
        let k = magnitude_key(score);
        k > self.key || (k == self.key && index >= self.index)
    }
}

/// Bits of the `|s|` key used by the first radix pass (top 15 of 31).
const SELECT_SHIFT: u32 = 16;

/// The threshold keeping the `keep` edges of largest `|score|` (ties by index,
/// see [`MaskThreshold`]), in `O(n)`: one histogram pass over the top 15 key
/// bits, one pass collecting the boundary bucket, then a selection within it.
pub fn mask_threshold(scores: &[f32], keep: usize) -> MaskThreshold {
    let n = scores.len();
    if keep >= n {
        return MaskThreshold::ALL;
    }
    if keep == 0 {
        return MaskThreshold::NONE;
    }
    // The first kept pair is the `prune`-th smallest (0-based).
    let prune = n - keep;
    let mut hist = vec![0u32; 1 << (31 - SELECT_SHIFT)];
    for &s in scores {
        hist[(magnitude_key(s) >> SELECT_SHIFT) as usize] += 1;
    }
    let (mut below, mut bucket) = (0usize, 0u32);
    for (b, &c) in hist.iter().enumerate() {
        if below + c as usize > prune {
            bucket = b as u32;
            break;
        }
        below += c as usize;
    }
    let mut cand: Vec<(u32, usize)> = scores
        .iter()
        .enumerate()
        .filter(|&(_, &s)| magnitude_key(s) >> SELECT_SHIFT == bucket)
        .map(|(i, &s)| (magnitude_key(s), i))
        .collect();
    let rank = prune - below;
    let (_, &mut (key, index), _) = cand.select_nth_unstable(rank);
    MaskThreshold { key, index }
}

/// The mask of one layer as booleans (kept = `true`).
pub fn mask(scores: &[f32], keep: usize) -> Vec<bool> {
    let t = mask_threshold(scores, keep);
    scores.iter().enumerate().map(|(i, &s)| t.keeps(s, i)).collect()
}

// ---------------------------------------------------------------------------
// Ranking <-> scores.
// ---------------------------------------------------------------------------

/// The inverse of a ranking: `position[e]` = rank of edge `e` (0 = lowest).
/// Refuses anything that is not a permutation of `0..n`.
pub fn positions(ranking: &[u32]) -> Result<Vec<u32>, KernelError> {
    let n = ranking.len();
    let mut pos = vec![u32::MAX; n];
    for (j, &e) in ranking.iter().enumerate() {
        match pos.get_mut(e as usize) {
            Some(p) if *p == u32::MAX => *p = j as u32,
            Some(_) => return Err(KernelError::BadRanking(format!("edge {e} appears twice"))),
            None => return Err(KernelError::BadRanking(format!("edge {e} out of range 0..{n}"))),
        }
    }
    Ok(pos)
}

/// Rebuilds a layer's scores from a ranking (`FRL_Vote`): `S[R[j]] = s̄[j]`,
/// the edge ranked `j`-th gets the `j`-th smallest reference score. Refuses a
/// length mismatch or a ranking that is not a permutation of `0..n`.
pub fn scores_from_ranking(ranking: &[u32], sorted_initial_scores: &[f32]) -> Result<Vec<f32>, KernelError> {
    let n = sorted_initial_scores.len();
    if ranking.len() != n {
        return Err(KernelError::BadRanking(format!("{} entries for a layer of {n} edges", ranking.len())));
    }
    let mut out = vec![f32::NAN; n];
    let mut seen = vec![false; n];
    for (&e, &s) in ranking.iter().zip(sorted_initial_scores) {
        match seen.get_mut(e as usize) {
            Some(f) if !*f => {
                *f = true;
                out[e as usize] = s;
            }
            Some(_) => return Err(KernelError::BadRanking(format!("edge {e} appears twice"))),
            None => return Err(KernelError::BadRanking(format!("edge {e} out of range 0..{n}"))),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// The network.
// ---------------------------------------------------------------------------

/// An instantiated FRL network: the layer list, frozen weights and reference
/// scores of a [`SupermaskConfig`]. Holds about `3 × 4 B` per edge (20 MB for
/// LeNet). Immutable, so one instance can serve many clients (also from
/// several threads).
#[derive(Clone, Debug)]
pub struct Supermask {
    config: SupermaskConfig,
    layers: Vec<MaskedLayer>,
    keep: Vec<usize>,
    weights: Vec<Vec<f32>>,
    reference: Vec<Vec<f32>>,
}

/// A layer's effective weight as a burn tensor.
pub(crate) enum LayerTensor {
    Conv(Tensor<4>),
    Linear(Tensor<2>),
}

impl LayerTensor {
    fn grad(&self, grads: &burn::tensor::Gradients) -> Result<Vec<f32>, KernelError> {
        let missing = || KernelError::Backend("no gradient for an effective weight".into());
        match self {
            LayerTensor::Conv(t) => read_tensor(t.grad(grads).ok_or_else(missing)?),
            LayerTensor::Linear(t) => read_tensor(t.grad(grads).ok_or_else(missing)?),
        }
    }
}

/// Per-step working memory of training.
struct Trainer {
    momentum: Vec<Vec<f32>>,
    first_step: bool,
}

impl Supermask {
    /// Derives the network of `config` (weights and `s̄` from the run seed).
    pub fn new(config: &SupermaskConfig) -> Result<Self, KernelError> {
        config.arch.validate()?;
        if !(0.0..=1.0).contains(&config.keep_fraction) {
            return Err(KernelError::InvalidConfig(format!("keep fraction {} not in [0, 1]", config.keep_fraction)));
        }
        if !(config.input_norm.std.is_finite() && config.input_norm.std != 0.0 && config.input_norm.mean.is_finite()) {
            return Err(KernelError::InvalidConfig("input normalisation must be finite with std != 0".into()));
        }
        let layers = config.arch.layers();
        Ok(Supermask {
            keep: layers.iter().map(|l| keep_count(l.edges(), config.keep_fraction)).collect(),
            weights: frozen_weights(&config.arch, config.run_seed),
            reference: sorted_initial_scores(&config.arch, config.run_seed, config.mask_rule),
            layers,
            config: *config,
        })
    }

    /// The configuration this network was derived from.
    pub fn config(&self) -> &SupermaskConfig {
        &self.config
    }

    /// The masked layers in canonical order.
    pub fn layers(&self) -> &[MaskedLayer] {
        &self.layers
    }

    /// Edges per layer.
    pub fn layer_sizes(&self) -> Vec<usize> {
        self.layers.iter().map(MaskedLayer::edges).collect()
    }

    /// Edges kept in each layer's mask.
    pub fn keep_counts(&self) -> &[usize] {
        &self.keep
    }

    /// The frozen weights, per layer.
    pub fn weights(&self) -> &[Vec<f32>] {
        &self.weights
    }

    /// The reference scores `s̄` (sorted ascending) a ranking is turned into.
    pub fn reference_scores(&self) -> &[Vec<f32>] {
        &self.reference
    }

    /// The initial scores `S⁰` (regenerated from the seed).
    pub fn initial_scores(&self) -> Vec<Vec<f32>> {
        initial_scores(&self.config.arch, self.config.run_seed)
    }

    /// The global ranking of round 0: the ranking of `S⁰`.
    pub fn initial_ranking(&self) -> Vec<Vec<u32>> {
        self.rankings(&self.initial_scores())
    }

    /// Every layer's ranking of `scores` ([`rank_layer`]) under this
    /// network's [`MaskRule`].
    pub fn rankings(&self, scores: &[Vec<f32>]) -> Vec<Vec<u32>> {
        scores.iter().map(|s| rank_layer(s, self.config.mask_rule)).collect()
    }

    /// Scores rebuilt from a (global) ranking of every layer.
    pub fn scores_from_rankings(&self, rankings: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, KernelError> {
        if rankings.len() != self.layers.len() {
            return Err(KernelError::BadRanking(format!(
                "{} layers ranked, the network has {}",
                rankings.len(),
                self.layers.len()
            )));
        }
        rankings
            .iter()
            .zip(&self.reference)
            .enumerate()
            .map(|(l, (r, s))| {
                scores_from_ranking(r, s).map_err(|e| match e {
                    KernelError::BadRanking(m) => KernelError::BadRanking(format!("layer {l}: {m}")),
                    other => other,
                })
            })
            .collect()
    }

    /// Every layer's mask for `scores` (kept = `true`).
    pub fn masks(&self, scores: &[Vec<f32>]) -> Vec<Vec<bool>> {
        scores.iter().zip(&self.keep).map(|(s, &k)| mask(s, k)).collect()
    }

    fn check_scores(&self, scores: &[Vec<f32>]) -> Result<(), KernelError> {
        if scores.len() != self.layers.len() {
            return Err(KernelError::InvalidConfig(format!(
                "{} score layers for a network of {}",
                scores.len(),
                self.layers.len()
            )));
        }
        for (l, (s, spec)) in scores.iter().zip(&self.layers).enumerate() {
            if s.len() != spec.edges() {
                return Err(KernelError::InvalidConfig(format!(
                    "layer {l}: {} scores for {} edges",
                    s.len(),
                    spec.edges()
                )));
            }
            if let Some(i) = s.iter().position(|v| !v.is_finite()) {
                return Err(KernelError::InvalidConfig(format!("layer {l}: score {i} is not finite")));
            }
        }
        Ok(())
    }

    fn check_data(&self, data: &Dataset) -> Result<(), KernelError> {
        if data.is_empty() {
            return Err(KernelError::EmptyDataset);
        }
        let (c, side) = self.config.arch.input_shape();
        if c != 1 || data.rows != side || data.cols != side {
            return Err(KernelError::ImageSize {
                arch_input: format!("{c}x{side}x{side}"),
                expected: c * side * side,
                rows: data.rows,
                cols: data.cols,
            });
        }
        data.validate()?;
        if data.is_real() {
            // The native kernels read bytes (`Dataset::image`).
            return Err(KernelError::InvalidConfig(
                "supermask models take 8-bit images; the dataset holds real-valued features".into(),
            ));
        }
        let classes = self.config.arch.classes();
        if let Some((index, &label)) = data.labels.iter().enumerate().find(|&(_, &l)| usize::from(l) >= classes) {
            return Err(KernelError::LabelOutOfRange { index, label, classes });
        }
        Ok(())
    }

    /// `W ⊙ mask(S)` for layer `l`, in a fresh vector.
    fn effective_layer(&self, l: usize, scores: &[f32]) -> Vec<f32> {
        let t = mask_threshold(scores, self.keep[l]);
        self.weights[l]
            .iter()
            .zip(scores)
            .enumerate()
            .map(|(i, (&w, &s))| if t.keeps(s, i) { w } else { 0.0 })
            .collect()
    }

    /// The effective weights as burn tensors on `device` (gradient-requiring
    /// leaves when `track`).
    fn effective_tensors(&self, scores: &[Vec<f32>], device: &Device, track: bool) -> Vec<LayerTensor> {
        self.layers
            .iter()
            .enumerate()
            .map(|(l, spec)| {
                let w = self.effective_layer(l, &scores[l]);
                match spec.kind {
                    LayerKind::Conv3x3 => {
                        let t = Tensor::<4>::from_data(TensorData::new(w, [spec.outputs, spec.inputs, 3, 3]), device);
                        LayerTensor::Conv(if track { t.require_grad() } else { t })
                    }
                    LayerKind::Linear => {
                        let t = Tensor::<2>::from_data(TensorData::new(w, [spec.outputs, spec.inputs]), device);
                        LayerTensor::Linear(if track { t.require_grad() } else { t })
                    }
                }
            })
            .collect()
    }

    /// Logits `[batch, classes]` for normalised images `[batch, c·side²]`.
    fn forward(&self, x: Tensor<2>, weights: &[LayerTensor]) -> Tensor<2> {
        forward(&self.layers, self.config.arch.input_shape(), x, weights)
    }

    /// Trains `scores` (one vector per layer) on `data`; returns the new
    /// scores. Only the scores change; weights and mask rule are fixed.
    ///
    /// Runs on the implementation [`SupermaskBackend::for_device`] picks for
    /// `device`: the native CPU kernels for the CPU device,
    /// [`Supermask::train_burn`] on `device` for any other.
    ///
    /// Refuses scores that don't fit the network or aren't finite, an empty
    /// dataset, images of the wrong size, labels beyond the model's classes
    /// and invalid settings; stops with [`KernelError::Diverged`] on a
    /// non-finite loss or score.
    pub fn train(
        &self,
        scores: Vec<Vec<f32>>,
        data: &Dataset,
        cfg: &FrlTrainConfig,
        device: &Device,
    ) -> Result<(Vec<Vec<f32>>, FrlTrainReport), KernelError> {
        match SupermaskBackend::for_device(device) {
            SupermaskBackend::Native => {
                cfg.validate()?;
                self.check_scores(&scores)?;
                self.check_data(data)?;
                native::train(self, scores, data, cfg)
            }
            SupermaskBackend::Burn => self.train_burn(scores, data, cfg, device),
        }
    }

    /// [`Supermask::train`] computed by burn on `device` (autodiff over the
    /// effective weights): the reference the native kernels are tested
    /// against. Same inputs, same checks, same sample order and update; the
    /// results agree up to f32 rounding (summation order).
    pub fn train_burn(
        &self,
        scores: Vec<Vec<f32>>,
        data: &Dataset,
        cfg: &FrlTrainConfig,
        device: &Device,
    ) -> Result<(Vec<Vec<f32>>, FrlTrainReport), KernelError> {
        cfg.validate()?;
        self.check_scores(&scores)?;
        self.check_data(data)?;
        let mut scores = scores;
        let device = device.clone().autodiff();
        let loss_fn = CrossEntropyLossConfig::new().init(&device);
        let table = self.config.input_norm.table();
        let mut trainer = Trainer { momentum: scores.iter().map(|s| vec![0.0; s.len()]).collect(), first_step: true };
        let mut rng = train_rng(cfg.seed);
        let mut order: Vec<usize> = Vec::with_capacity(data.len());
        let (mut steps, mut samples, mut loss_sum) = (0u64, 0u64, 0f64);
        for epoch in 0..cfg.epochs {
            let lr = cfg.epoch_lr(epoch) as f32;
            order.clear();
            order.extend(0..data.len());
            crate::data::partition::shuffle(&mut rng, &mut order);
            for idx in order.chunks(cfg.batch_size) {
                let (x, y) = batch(data, idx, &table, &device);
                let weights = self.effective_tensors(&scores, &device, true);
                let loss = loss_fn.forward(self.forward(x, &weights), y);
                let value = loss.clone().try_into_scalar::<f32>().map_err(|e| KernelError::Backend(e.to_string()))?;
                if !value.is_finite() {
                    return Err(KernelError::Diverged { step: steps, loss: value });
                }
                let grads = loss.backward();
                for (l, w) in weights.iter().enumerate() {
                    let g = w.grad(&grads)?;
                    trainer.update(l, &mut scores[l], &self.weights[l], &g, lr, cfg);
                }
                trainer.first_step = false;
                steps += 1;
                samples += idx.len() as u64;
                loss_sum += f64::from(value) * idx.len() as f64;
            }
        }
        finish_training(scores, steps, samples, loss_sum)
    }

    /// A benign client's round: rebuild the scores from the global ranking,
    /// train locally, return the client's ranking of every layer.
    pub fn train_round(
        &self,
        global: &[Vec<u32>],
        data: &Dataset,
        cfg: &FrlTrainConfig,
        device: &Device,
    ) -> Result<(Vec<Vec<u32>>, FrlTrainReport), KernelError> {
        let scores = self.scores_from_rankings(global)?;
        let (scores, report) = self.train(scores, data, cfg, device)?;
        Ok((self.rankings(&scores), report))
    }

    /// Cross-entropy and accuracy of the network masked by `scores`, in
    /// batches of `batch_size` (only memory use depends on it). Runs on the
    /// implementation [`SupermaskBackend::for_device`] picks for `device`
    /// (see [`Supermask::train`]).
    pub fn evaluate_scores(
        &self,
        scores: &[Vec<f32>],
        data: &Dataset,
        device: &Device,
        batch_size: usize,
    ) -> Result<EvalReport, KernelError> {
        match SupermaskBackend::for_device(device) {
            SupermaskBackend::Native => {
                if batch_size == 0 {
                    return Err(KernelError::InvalidConfig("batch_size must be > 0".into()));
                }
                self.check_scores(scores)?;
                self.check_data(data)?;
                native::evaluate(self, scores, data, batch_size)
            }
            SupermaskBackend::Burn => self.evaluate_scores_burn(scores, data, device, batch_size),
        }
    }

    /// [`Supermask::evaluate_scores`] computed by burn on `device` (the
    /// reference of the native kernels). No autodiff.
    pub fn evaluate_scores_burn(
        &self,
        scores: &[Vec<f32>],
        data: &Dataset,
        device: &Device,
        batch_size: usize,
    ) -> Result<EvalReport, KernelError> {
        if batch_size == 0 {
            return Err(KernelError::InvalidConfig("batch_size must be > 0".into()));
        }
        self.check_scores(scores)?;
        self.check_data(data)?;
        let device = device.clone().without_autodiff();
        let weights = self.effective_tensors(scores, &device, false);
        let table = self.config.input_norm.table();
        let classes = self.config.arch.classes();
        let all: Vec<usize> = (0..data.len()).collect();
        let mut report = EvalReport::default();
        for idx in all.chunks(batch_size) {
            let (x, _) = batch(data, idx, &table, &device);
            let logits = read_tensor(self.forward(x, &weights))?;
            crate::train::score_logits(&mut report, &logits, classes, idx, data);
        }
        Ok(report)
    }

    /// Evaluates the network the server holds after a vote: scores rebuilt
    /// from the global `ranking` ([`Supermask::scores_from_rankings`]), masked
    /// by top-k of `|S|` per layer.
    pub fn evaluate_ranking(
        &self,
        ranking: &[Vec<u32>],
        data: &Dataset,
        device: &Device,
        batch_size: usize,
    ) -> Result<EvalReport, KernelError> {
        let scores = self.scores_from_rankings(ranking)?;
        self.evaluate_scores(&scores, data, device, batch_size)
    }
}

impl Trainer {
    /// PyTorch's SGD step on one layer's scores, with the straight-through
    /// gradient `g_S = sign(S)·W·g_Weff`:
    /// `d = g_S + wd·S`, `buf = d` (first step) or `μ·buf + d`, `S -= lr·buf`.
    fn update(&mut self, l: usize, scores: &mut [f32], weights: &[f32], g: &[f32], lr: f32, cfg: &FrlTrainConfig) {
        let buf = &mut self.momentum[l];
        let (wd, mu) = (cfg.weight_decay, cfg.momentum);
        let first = self.first_step;
        for (((s, b), &w), &g) in scores.iter_mut().zip(buf.iter_mut()).zip(weights).zip(g) {
            let gs = straight_through(*s, w, g);
            let d = gs + wd * *s;
            *b = if first { d } else { mu * *b + d };
            *s -= lr * *b;
        }
    }
}

/// The end of a training call, shared by the native and burn paths: a finite
/// loss with a non-finite score is possible on the last step, so the scores
/// are checked once more; then the report (mean per-sample loss).
fn finish_training(
    scores: Vec<Vec<f32>>,
    steps: u64,
    samples: u64,
    loss_sum: f64,
) -> Result<(Vec<Vec<f32>>, FrlTrainReport), KernelError> {
    if let Some(&v) = scores.iter().flatten().find(|v| !v.is_finite()) {
        return Err(KernelError::Diverged { step: steps, loss: v });
    }
    let mean_loss = (loss_sum / samples.max(1) as f64) as f32;
    Ok((scores, FrlTrainReport { mean_loss, steps, samples }))
}

/// `sign(s)·(w·g)`: the score gradient of edge-popup through `|s|`.
#[inline]
fn straight_through(s: f32, w: f32, g: f32) -> f32 {
    let p = w * g;
    if s > 0.0 {
        p
    } else if s < 0.0 {
        -p
    } else {
        0.0
    }
}

/// The forward pass of a layer list (see the module docs).
pub(crate) fn forward(
    layers: &[MaskedLayer],
    (c, side): (usize, usize),
    x: Tensor<2>,
    weights: &[LayerTensor],
) -> Tensor<2> {
    let [b, _] = x.dims();
    let last = layers.len().saturating_sub(1);
    let mut map: Tensor<4> = x.reshape([b, c, side, side]);
    let mut flat: Option<Tensor<2>> = None;
    for (l, (spec, w)) in layers.iter().zip(weights).enumerate() {
        match w {
            LayerTensor::Conv(w) => {
                let mut y = conv2d(map, w.clone(), None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
                // Pool before ReLU: `max(relu(a), …) = relu(max(a, …))` exactly,
                // and the gradients agree too (both are zero where the pooled
                // value is ≤ 0), but ReLU then runs on 4× fewer values.
                if spec.pool_after {
                    y = max_pool2d(y, MaxPoolOptions::new([2, 2]));
                }
                if l < last {
                    y = relu(y);
                }
                map = y;
            }
            LayerTensor::Linear(w) => {
                let h = match flat.take() {
                    Some(h) => h,
                    None => {
                        let [_, ch, hh, ww] = map.dims();
                        map.clone().reshape([b, ch * hh * ww])
                    }
                };
                let mut y = h.matmul(w.clone().transpose());
                if l < last {
                    y = relu(y);
                }
                flat = Some(y);
            }
        }
    }
    match flat {
        Some(y) => y,
        None => {
            let [_, ch, hh, ww] = map.dims();
            map.reshape([b, ch * hh * ww])
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::train::cpu_device;
    use burn::tensor::Int;
    use tally_protocol::prng::{Purpose, StreamId, rademacher};

    #[test]
    fn layer_sizes_match_the_spec() {
        assert_eq!(FrlArch::MNIST_LENET.layer_sizes(), vec![288, 18_432, 1_605_632, 1_280]);
        assert_eq!(FrlArch::MNIST_LENET.num_edges(), 1_625_632);
        let conv8 = FrlArch::Conv8 { channels: 3, side: 32, classes: 10 };
        assert_eq!(conv8.num_edges(), 5_275_840);
        assert_eq!(conv8.layer_sizes().len(), 11);
        assert_eq!(conv8.layer_sizes().into_iter().max(), Some(2_359_296));
        // edge-popup's CIFAR-10 Conv2 / Conv4 (allenai/hidden-networks).
        let conv2 = FrlArch::Conv2 { channels: 3, side: 32, classes: 10 };
        assert_eq!(conv2.layer_sizes(), vec![1_728, 36_864, 4_194_304, 65_536, 2_560]);
        let conv4 = FrlArch::Conv4 { channels: 3, side: 32, classes: 10 };
        assert_eq!(conv4.layers()[4].inputs, 8192);
        // On 28×28 greyscale.
        let conv4 = FrlArch::Conv4 { channels: 1, side: 28, classes: 10 };
        assert_eq!(conv4.layer_sizes(), vec![576, 36_864, 73_728, 147_456, 1_605_632, 65_536, 2_560]);
        assert!(FrlArch::Conv8 { channels: 1, side: 8, classes: 10 }.validate().is_err());
        assert!(FrlArch::LeNet { classes: 0 }.validate().is_err());
    }

    /// The documented derivation, written out element by element.
    #[test]
    fn frozen_weights_follow_the_documented_derivation() {
        let arch = FrlArch::MNIST_LENET;
        let seed = 0x5eed;
        let w = frozen_weights(&arch, seed);
        assert_eq!(w, frozen_weights(&arch, seed));
        for (l, spec) in arch.layers().iter().enumerate() {
            let id = StreamId { run_seed: seed, purpose: Purpose::FrlWeights, round: 0, client: 0, step: l as u32 };
            let n = spec.edges();
            let z = rademacher(&id, n);
            let sigma = (2f64.sqrt() / (spec.fan_in() as f64).sqrt()) as f32;
            assert_eq!(w[l].len(), n);
            for i in 0..n {
                let want = if z[i] > 0 { sigma } else { -sigma };
                assert_eq!(w[l][i].to_bits(), want.to_bits(), "layer {l} edge {i}");
            }
        }
        // Known magnitudes: √2/√9, √2/√288, √2/√12544, √2/√128.
        assert_eq!(arch.layers()[0].weight_scale(), (2f64 / 9.0).sqrt() as f32);
        assert!((arch.layers()[2].weight_scale() - 0.012_627_1).abs() < 1e-6);
        // Another seed, other signs; balanced signs.
        assert_ne!(w[2], frozen_weights(&arch, seed + 1)[2]);
        let plus = w[2].iter().filter(|&&v| v > 0.0).count() as f64 / w[2].len() as f64;
        assert!((plus - 0.5).abs() < 0.002, "{plus}");
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Golden values of the shared derivation (LeNet, run seed 0): if this
    /// fails, every party's network changed; bump the spec on purpose or fix it.
    #[test]
    fn golden_lenet_seed_0() {
        use tally_protocol::identity::params_hash;
        let w = frozen_weights(&FrlArch::MNIST_LENET, 0);
        let s = initial_scores(&FrlArch::MNIST_LENET, 0);
        let first: Vec<String> = s[0][..4].iter().map(|v| format!("{:08x}", v.to_bits())).collect();
        let signs: String = w[0][..32].iter().map(|&v| if v > 0.0 { '+' } else { '-' }).collect();
        let got = format!(
            "w={} s={} signs={signs} s0={}",
            hex(&params_hash(&w.concat())),
            hex(&params_hash(&s.concat())),
            first.join(" ")
        );
        println!("{got}");
        assert_eq!(got, GOLDEN_LENET_SEED_0);
    }

    const GOLDEN_LENET_SEED_0: &str = "w=73faf8c2ed7f0e53e0644d34266eb517df0c43881d85738526ef4643c5860a71 \
         s=a7baad4b2ee3771c8580f73e541c98a6b911cf536a76df9ee44dad74b10b5b44 \
         signs=-++---+--++++++---+----++-+--+++ s0=3e9affb6 bc978feb be8ac133 be9431ac";

    #[test]
    fn initial_scores_follow_the_documented_derivation() {
        let arch = FrlArch::MNIST_LENET;
        let s = initial_scores(&arch, 7);
        for (l, spec) in arch.layers().iter().enumerate() {
            let id = StreamId { run_seed: 7, purpose: Purpose::FrlScores, round: 0, client: 0, step: l as u32 };
            let mut words = vec![0u32; spec.edges()];
            id.words_from(0).fill(&mut words);
            let b = (1.0 / (spec.fan_in() as f64).sqrt()) as f32;
            for (i, &w) in words.iter().enumerate() {
                // (2u - 1) exact: compute it from the integer to check.
                let m = i64::from(w >> 8);
                let two_u_minus_1 = (2 * m - (1 << 24)) as f64 / (1u64 << 24) as f64;
                let want = (two_u_minus_1 * f64::from(b)) as f32;
                assert_eq!(s[l][i].to_bits(), want.to_bits(), "layer {l} edge {i}");
                assert!(s[l][i] >= -b && s[l][i] < b);
            }
        }
        let sorted = sorted_initial_scores(&arch, 7, MaskRule::TwoSided);
        for (l, v) in sorted.iter().enumerate() {
            assert!(v.windows(2).all(|p| p[0] <= p[1]));
            let mut want = s[l].clone();
            want.sort_by(f32::total_cmp);
            assert_eq!(v, &want);
        }
        let mag = sorted_initial_scores(&arch, 7, MaskRule::OneSidedTopK);
        assert!(mag[1].iter().all(|&v| v >= 0.0) && mag[1].windows(2).all(|p| p[0] <= p[1]));
    }

    #[test]
    fn keep_count_follows_python_rounding() {
        assert_eq!(keep_count(288, 0.5), 144);
        assert_eq!(keep_count(1_605_632, 0.5), 802_816);
        assert_eq!(keep_count(7, 0.5), 4); // int(3.5) = 3 pruned
        // Python: n - int((1 - k) * n) with binary64 rounding.
        assert_eq!(keep_count(10, 0.3), 3); // (1-0.3)*10 = 7.0
        assert_eq!(keep_count(10, 0.7), 7); // (1-0.7)*10 = 3.0000000000000004
        assert_eq!(keep_count(10, 0.9), 10); // (1-0.9)*10 = 0.9999999999999998
        assert_eq!(keep_count(100, 0.7), 70);
        assert_eq!(keep_count(10, 0.0), 0);
        assert_eq!(keep_count(10, 1.0), 10);
    }

    /// Plain reference: sort pairs (|s|, index), prune the first ⌊(1−k)n⌋.
    fn reference_mask(scores: &[f32], keep: usize) -> Vec<bool> {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].abs().total_cmp(&scores[b].abs()).then(a.cmp(&b)));
        let mut m = vec![true; scores.len()];
        for &i in &order[..scores.len() - keep] {
            m[i] = false;
        }
        m
    }

    #[test]
    fn mask_keeps_exactly_keep_count_with_index_tie_break() {
        let arch = FrlArch::MNIST_LENET;
        let s = initial_scores(&arch, 3);
        for layer in &s {
            let keep = keep_count(layer.len(), 0.5);
            let m = mask(layer, keep);
            assert_eq!(m.iter().filter(|&&b| b).count(), keep);
            if layer.len() < 100_000 {
                assert_eq!(m, reference_mask(layer, keep));
            }
        }
        // Heavy ties, signs, zeros, all one value, extremes of k.
        let tied: Vec<f32> =
            (0..1000).map(|i| [0.5f32, -0.5, 0.25, 0.0, -0.0, 1.0][i % 6] * ((i % 7) as f32)).collect();
        for keep in [0, 1, 2, 499, 500, 501, 999, 1000] {
            let m = mask(&tied, keep);
            assert_eq!(m.iter().filter(|&&b| b).count(), keep, "keep {keep}");
            assert_eq!(m, reference_mask(&tied, keep), "keep {keep}");
        }
        let same = vec![0.3f32; 101];
        let m = mask(&same, 50);
        assert!(m[..51].iter().all(|&b| !b) && m[51..].iter().all(|&b| b));
        assert_eq!(mask(&[], 0), Vec::<bool>::new());
    }

    fn reference_ranking(scores: &[f32], mode: MaskRule) -> Vec<u32> {
        let key = |v: f32| match mode {
            MaskRule::TwoSided => f64::from(v),
            MaskRule::OneSidedTopK => f64::from(v.abs()),
        };
        let mut order: Vec<u32> = (0..scores.len() as u32).collect();
        // A stable sort on the value; -0.0 == 0.0 under partial_cmp.
        order.sort_by(|&a, &b| key(scores[a as usize]).partial_cmp(&key(scores[b as usize])).unwrap());
        order
    }

    #[test]
    fn ranking_is_a_stable_argsort_and_inverts_with_scores_from_ranking() {
        let s = initial_scores(&FrlArch::MNIST_LENET, 11);
        for layer in [&s[0], &s[1], &s[3]] {
            for mode in [MaskRule::TwoSided, MaskRule::OneSidedTopK] {
                let r = rank_layer(layer, mode);
                assert_eq!(r, reference_ranking(layer, mode));
                positions(&r).unwrap(); // a permutation
            }
        }
        let big = rank_layer(&s[2], MaskRule::TwoSided);
        let pos = positions(&big).unwrap();
        assert!(big.windows(2).all(|p| (s[2][p[0] as usize], p[0]) < (s[2][p[1] as usize], p[1])));
        assert_eq!(pos[big[0] as usize], 0);
        // Ties, signed zeros and repeated values.
        let tied: Vec<f32> = (0..500).map(|i| [0.5f32, -0.5, 0.0, -0.0, 2.0][i % 5] * ((i % 3) as f32)).collect();
        for mode in [MaskRule::TwoSided, MaskRule::OneSidedTopK] {
            assert_eq!(rank_layer(&tied, mode), reference_ranking(&tied, mode));
        }

        // Inversion: rebuilding from the ranking with the sorted values
        // gives the scores back; ranking the rebuilt scores gives the ranking
        // back (values here are distinct).
        let layer = &s[1];
        let r = rank_layer(layer, MaskRule::TwoSided);
        let mut sorted = layer.clone();
        sorted.sort_by(f32::total_cmp);
        let rebuilt = scores_from_ranking(&r, &sorted).unwrap();
        assert_eq!(&rebuilt, layer);
        // Any permutation round-trips through scores_from_ranking when s̄ is
        // strictly increasing.
        let sbar: Vec<f32> = (0..layer.len()).map(|i| i as f32 - 100.0).collect();
        let perm = rank_layer(&initial_scores(&FrlArch::MNIST_LENET, 12)[1], MaskRule::TwoSided);
        let back = rank_layer(&scores_from_ranking(&perm, &sbar).unwrap(), MaskRule::TwoSided);
        assert_eq!(back, perm);

        // Non-permutations are refused.
        assert!(scores_from_ranking(&[0, 1, 1], &[1.0, 2.0, 3.0]).is_err());
        assert!(scores_from_ranking(&[0, 1, 3], &[1.0, 2.0, 3.0]).is_err());
        assert!(scores_from_ranking(&[0, 1], &[1.0, 2.0, 3.0]).is_err());
        assert!(positions(&[2, 0, 2]).is_err());
    }

    #[test]
    fn network_rebuilds_round_zero_exactly() {
        let net = Supermask::new(&SupermaskConfig::new(FrlArch::MNIST_LENET, 5)).unwrap();
        let r0 = net.initial_ranking();
        let s0 = net.scores_from_rankings(&r0).unwrap();
        assert_eq!(s0, net.initial_scores());
        assert_eq!(net.keep_counts(), &[144, 9216, 802_816, 640]);
        let mut bad = r0.clone();
        bad[3].swap(0, 1);
        bad[3][0] = bad[3][1];
        assert!(matches!(net.scores_from_rankings(&bad), Err(KernelError::BadRanking(_))));
        assert!(net.scores_from_rankings(&r0[..3]).is_err());
    }

    /// A tiny network for gradient checks: conv(1→2) on 4×4, pool, fc(8→3).
    fn tiny() -> (Vec<MaskedLayer>, (usize, usize)) {
        (vec![MaskedLayer::conv(1, 2, true), MaskedLayer::linear(8, 3)], (1, 4))
    }

    fn tensors(layers: &[MaskedLayer], w: &[Vec<f32>], device: &Device, track: bool) -> Vec<LayerTensor> {
        layers
            .iter()
            .zip(w)
            .map(|(spec, w)| match spec.kind {
                LayerKind::Conv3x3 => {
                    let t =
                        Tensor::<4>::from_data(TensorData::new(w.clone(), [spec.outputs, spec.inputs, 3, 3]), device);
                    LayerTensor::Conv(if track { t.require_grad() } else { t })
                }
                LayerKind::Linear => {
                    let t = Tensor::<2>::from_data(TensorData::new(w.clone(), [spec.outputs, spec.inputs]), device);
                    LayerTensor::Linear(if track { t.require_grad() } else { t })
                }
            })
            .collect()
    }

    fn tiny_loss(w_eff: &[Vec<f32>], x: &[f32], y: &[i64]) -> f64 {
        let (layers, shape) = tiny();
        let device = cpu_device();
        let b = y.len();
        let xt = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [b, 16]), &device);
        let logits = read_tensor(forward(&layers, shape, xt, &tensors(&layers, w_eff, &device, false))).unwrap();
        let mut loss = 0f64;
        for (row, &l) in logits.chunks(3).zip(y) {
            let lse = row.iter().map(|&v| f64::from(v).exp()).sum::<f64>().ln();
            loss += lse - f64::from(row[l as usize]);
        }
        loss / b as f64
    }

    /// Plain-Rust forward of the tiny network: checks the conv layout and
    /// padding, the pool and the flatten order.
    #[test]
    fn tiny_forward_matches_hand_computation() {
        let (layers, shape) = tiny();
        let device = cpu_device();
        let w: Vec<Vec<f32>> = vec![
            (0..18).map(|i| ((i * 7 % 11) as f32 - 5.0) / 7.0).collect(),
            (0..24).map(|i| ((i * 5 % 13) as f32 - 6.0) / 9.0).collect(),
        ];
        let x: Vec<f32> = (0..16).map(|i| ((i * 3 % 7) as f32 - 2.0) / 3.0).collect();
        let got = read_tensor(forward(
            &layers,
            shape,
            Tensor::from_data(TensorData::new(x.clone(), [1, 16]), &device),
            &tensors(&layers, &w, &device, false),
        ))
        .unwrap();
        let mut conv = vec![0f64; 2 * 16];
        for o in 0..2 {
            for r in 0..4i32 {
                for c in 0..4i32 {
                    let mut s = 0f64;
                    for kr in 0..3i32 {
                        for kc in 0..3i32 {
                            let (ir, ic) = (r + kr - 1, c + kc - 1);
                            if (0..4).contains(&ir) && (0..4).contains(&ic) {
                                s += f64::from(w[0][(o * 9) + (kr * 3 + kc) as usize])
                                    * f64::from(x[(ir * 4 + ic) as usize]);
                            }
                        }
                    }
                    conv[o * 16 + (r * 4 + c) as usize] = s.max(0.0);
                }
            }
        }
        let mut pooled = [0f64; 8];
        for o in 0..2 {
            for r in 0..2 {
                for c in 0..2 {
                    let at = |dr: usize, dc: usize| conv[o * 16 + (2 * r + dr) * 4 + 2 * c + dc];
                    pooled[o * 4 + r * 2 + c] = at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
                }
            }
        }
        for k in 0..3 {
            let want: f64 = (0..8).map(|i| f64::from(w[1][k * 8 + i]) * pooled[i]).sum();
            assert!((f64::from(got[k]) - want).abs() < 1e-5, "logit {k}: {} vs {want}", got[k]);
        }
    }

    /// The straight-through gradient: (a) burn's ∂L/∂W_eff against central
    /// finite differences of the loss in W_eff (pruned entries included);
    /// (b) the score gradient of the training step against the detach trick
    /// `W ⊙ (mask + |S| − |S|.detach())` differentiated by burn itself.
    #[test]
    fn straight_through_gradient_matches_finite_differences_and_detach_trick() {
        let (layers, shape) = tiny();
        let arch_w: Vec<Vec<f32>> =
            layers.iter().enumerate().map(|(l, spec)| frozen_layer_weights(9, l, spec)).collect();
        let scores: Vec<Vec<f32>> =
            layers.iter().enumerate().map(|(l, spec)| initial_layer_scores(9, l, spec)).collect();
        let keep: Vec<usize> = layers.iter().map(|l| keep_count(l.edges(), 0.5)).collect();
        let masks: Vec<Vec<bool>> = scores.iter().zip(&keep).map(|(s, &k)| mask(s, k)).collect();
        let w_eff: Vec<Vec<f32>> = arch_w
            .iter()
            .zip(&masks)
            .map(|(w, m)| w.iter().zip(m).map(|(&w, &k)| if k { w } else { 0.0 }).collect())
            .collect();
        let x: Vec<f32> = (0..32).map(|i| ((i * 13 % 17) as f32 - 8.0) / 4.0).collect();
        let y = [2i64, 0];

        // burn: dL/dW_eff.
        let ad = cpu_device().autodiff();
        let wt = tensors(&layers, &w_eff, &ad, true);
        let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [2, 16]), &ad);
        let yt = Tensor::<1, Int>::from_data(TensorData::new(y.to_vec(), [2]), &ad);
        let loss = CrossEntropyLossConfig::new().init(&ad).forward(forward(&layers, shape, xt, &wt), yt);
        let grads = loss.backward();
        let g: Vec<Vec<f32>> = wt.iter().map(|t| t.grad(&grads).unwrap()).collect();

        // (a) finite differences (f32 forward, eps 1e-3). Where the loss has
        // a kink within ±eps (ReLU, max-pool switch) the one-sided slopes
        // disagree; those entries are skipped, and must be few.
        let eps = 1e-3f32;
        let (mut checked_pruned, mut skipped, mut checked) = (0, 0, 0);
        let l0 = tiny_loss(&w_eff, &x, &y);
        for l in 0..2 {
            for i in 0..w_eff[l].len() {
                let mut p = w_eff.clone();
                p[l][i] += eps;
                let up = tiny_loss(&p, &x, &y);
                p[l][i] -= 2.0 * eps;
                let down = tiny_loss(&p, &x, &y);
                let e = f64::from(eps);
                let (fwd, bwd) = ((up - l0) / e, (l0 - down) / e);
                if (fwd - bwd).abs() > 1e-2 * (1.0 + fwd.abs()) {
                    skipped += 1;
                    continue;
                }
                let fd = (up - down) / (2.0 * e);
                let an = f64::from(g[l][i]);
                assert!((fd - an).abs() < 1e-3 + 1e-2 * an.abs(), "layer {l} edge {i}: fd {fd} vs burn {an}");
                checked += 1;
                checked_pruned += usize::from(!masks[l][i] && an.abs() > 1e-4);
            }
        }
        // (Half the conv weights are pruned, so some conv outputs sit at
        // exactly 0 and the 2×2 pools over them tie: genuine kinks.)
        assert!(checked >= 2 * skipped, "{skipped} kinks vs {checked} checked");
        assert!(checked_pruned > 0, "pruned edges must get a gradient too (straight-through)");

        // (b) the detach trick on the scores, differentiated by burn.
        let s_t: Vec<LayerTensor> = tensors(&layers, &scores, &ad, true);
        let eff: Vec<LayerTensor> = s_t
            .iter()
            .zip(layers.iter().zip(&arch_w).zip(&masks))
            .map(|(s, ((spec, w), m))| {
                let mf: Vec<f32> = m.iter().map(|&k| f32::from(u8::from(k))).collect();
                match s {
                    LayerTensor::Conv(s) => {
                        let dims = [spec.outputs, spec.inputs, 3, 3];
                        let w = Tensor::<4>::from_data(TensorData::new(w.clone(), dims), &ad);
                        let m = Tensor::<4>::from_data(TensorData::new(mf, dims), &ad);
                        let a = s.clone().abs();
                        LayerTensor::Conv(w * (m + a.clone() - a.detach()))
                    }
                    LayerTensor::Linear(s) => {
                        let dims = [spec.outputs, spec.inputs];
                        let w = Tensor::<2>::from_data(TensorData::new(w.clone(), dims), &ad);
                        let m = Tensor::<2>::from_data(TensorData::new(mf, dims), &ad);
                        let a = s.clone().abs();
                        LayerTensor::Linear(w * (m + a.clone() - a.detach()))
                    }
                }
            })
            .collect();
        let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [2, 16]), &ad);
        let yt = Tensor::<1, Int>::from_data(TensorData::new(y.to_vec(), [2]), &ad);
        let loss2 = CrossEntropyLossConfig::new().init(&ad).forward(forward(&layers, shape, xt, &eff), yt);
        let grads2 = loss2.backward();
        for l in 0..2 {
            let via_trick = s_t[l].grad(&grads2).unwrap();
            for i in 0..scores[l].len() {
                let ours = straight_through(scores[l][i], arch_w[l][i], g[l][i]);
                let want = scores[l][i].signum() * arch_w[l][i] * g[l][i];
                assert_eq!(ours, want);
                assert!((via_trick[i] - ours).abs() <= 1e-6 * (1.0 + ours.abs()), "layer {l} edge {i}");
            }
        }
    }

    #[test]
    fn sgd_update_matches_pytorch_formula() {
        let cfg = FrlTrainConfig::mnist(0, 0);
        let mut t = Trainer { momentum: vec![vec![0.0; 3]], first_step: true };
        let mut s = vec![0.5f32, -0.25, 0.0];
        let w = [0.1f32, 0.1, -0.1];
        let g = [1.0f32, 2.0, 3.0];
        t.update(0, &mut s, &w, &g, 0.4, &cfg);
        // d = sign(s) w g + 1e-4 s; buf = d; s -= 0.4 d
        let d0 = [0.1f32 + 1e-4 * 0.5, -0.2 + 1e-4 * -0.25, 0.0];
        let s1 = [0.5 - 0.4 * d0[0], -0.25 - 0.4 * d0[1], 0.0];
        assert_eq!(s, s1);
        t.first_step = false;
        t.update(0, &mut s, &w, &g, 0.2, &cfg);
        let d1 = [0.1f32 + 1e-4 * s1[0], -0.2 + 1e-4 * s1[1], 0.0];
        let b1 = [0.9 * d0[0] + d1[0], 0.9 * d0[1] + d1[1], 0.0];
        assert_eq!(s, [s1[0] - 0.2 * b1[0], s1[1] - 0.2 * b1[1], 0.0]);
        // Cosine over 2 epochs: lr, lr/2.
        let c = FrlTrainConfig::mnist(0, 0);
        assert!((c.epoch_lr(0) - 0.4).abs() < 1e-12 && (c.epoch_lr(1) - 0.2).abs() < 1e-12);
        assert!((FrlTrainConfig::mnist(1000, 0).epoch_lr(0) - 0.4 * 0.999f64.powi(1000)).abs() < 1e-12);
    }

    #[cfg(feature = "embedded-data")]
    #[test]
    fn lenet_supermask_learns_embedded_mnist_and_is_deterministic() {
        let device = cpu_device();
        let split = crate::data::embedded_mnist();
        let net = Supermask::new(&SupermaskConfig::new(FrlArch::MNIST_LENET, 1)).unwrap();
        let train = split.train.subset(&(0..800).collect::<Vec<_>>()).unwrap();
        let held = split.test.subset(&(0..500).collect::<Vec<_>>()).unwrap();
        let global = net.initial_ranking();
        let before = net.evaluate_ranking(&global, &held, &device, 250).unwrap();
        let cfg = FrlTrainConfig { epochs: 1, ..FrlTrainConfig::mnist(0, 3) };
        let t = std::time::Instant::now();
        let (ranking, report) = net.train_round(&global, &train, &cfg, &device).unwrap();
        let secs = t.elapsed().as_secs_f64();
        let after = net.evaluate_ranking(&ranking, &held, &device, 250).unwrap();
        println!(
            "FRL LeNet, 1 epoch on 800 (bs 8): {} steps in {secs:.2} s ({:.1} steps/s, {:.2} ms/sample), \
             train loss {:.4}, held-out acc {:.4} -> {:.4}, loss {:.4} -> {:.4}",
            report.steps,
            report.steps as f64 / secs,
            secs * 1e3 / report.samples as f64,
            report.mean_loss,
            before.accuracy(),
            after.accuracy(),
            before.mean_loss(),
            after.mean_loss()
        );
        assert_eq!(report.steps, 100);
        assert!(after.accuracy() > 0.5, "accuracy {}", after.accuracy());
        assert!(after.mean_loss() < before.mean_loss());
        for (r, n) in ranking.iter().zip(net.layer_sizes()) {
            assert_eq!(r.len(), n);
            positions(r).unwrap();
        }
        // Bit-identical on a second run (a smaller one, to keep the test fast).
        let small = split.train.subset(&(0..64).collect::<Vec<_>>()).unwrap();
        let (a, ra) = net.train(net.initial_scores(), &small, &cfg, &device).unwrap();
        let (b, rb) = net.train(net.initial_scores(), &small, &cfg, &device).unwrap();
        assert_eq!(ra, rb);
        assert!(a.iter().flatten().zip(b.iter().flatten()).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert_ne!(a, net.initial_scores());
    }

    #[cfg(feature = "embedded-data")]
    #[test]
    fn magnitude_mode_rebuilds_non_negative_scores_and_trains() {
        let device = cpu_device();
        let mut cfg = SupermaskConfig::new(FrlArch::MNIST_LENET, 2);
        cfg.mask_rule = MaskRule::OneSidedTopK;
        let net = Supermask::new(&cfg).unwrap();
        let r0 = net.initial_ranking();
        let s0 = net.scores_from_rankings(&r0).unwrap();
        let init = net.initial_scores();
        for (a, b) in s0.iter().zip(&init) {
            // |S⁰| exactly: the magnitude ranking of S⁰ rebuilt from sort(|S⁰|).
            assert!(a.iter().zip(b).all(|(x, y)| *x == y.abs()));
        }
        // The mask of rebuilt scores is the top-k of the ranking's tail
        // (distinct values here, so no tie at the boundary).
        let m = net.masks(&s0);
        let kept_by_rank: Vec<bool> = {
            let mut v = vec![false; r0[3].len()];
            for &e in &r0[3][r0[3].len() - net.keep_counts()[3]..] {
                v[e as usize] = true;
            }
            v
        };
        assert_eq!(m[3], kept_by_rank);
        let split = crate::data::embedded_mnist();
        let data = split.train.subset(&(0..40).collect::<Vec<_>>()).unwrap();
        let (r1, rep) = net.train_round(&r0, &data, &FrlTrainConfig::mnist(0, 1), &device).unwrap();
        assert_eq!(rep.steps, 10);
        assert_ne!(r1, r0);
        for r in &r1 {
            positions(r).unwrap();
        }
    }

    #[test]
    fn the_cpu_device_gets_the_native_kernels() {
        // Only the flex backend is compiled in; a GPU device would get burn.
        assert_eq!(SupermaskBackend::for_device(&cpu_device()), SupermaskBackend::Native);
        assert_eq!(SupermaskBackend::for_device(&cpu_device().autodiff()), SupermaskBackend::Native);
    }

    #[test]
    fn rejects_bad_inputs() {
        let device = cpu_device();
        let net = Supermask::new(&SupermaskConfig::new(FrlArch::MNIST_LENET, 1)).unwrap();
        let data = Dataset::new(28, 28, vec![0; 784 * 2], vec![1, 2], 10).unwrap();
        let cfg = FrlTrainConfig::mnist(0, 0);
        let mut s = net.initial_scores();
        s[0].pop();
        assert!(matches!(net.train(s, &data, &cfg, &device), Err(KernelError::InvalidConfig(_))));
        let mut s = net.initial_scores();
        s[3][5] = f32::NAN;
        assert!(net.evaluate_scores(&s, &data, &device, 8).is_err());
        let small = Dataset::new(14, 14, vec![0; 196], vec![0], 10).unwrap();
        assert!(matches!(net.train(net.initial_scores(), &small, &cfg, &device), Err(KernelError::ImageSize { .. })));
        let c = FrlTrainConfig { batch_size: 0, ..cfg.clone() };
        assert!(net.train(net.initial_scores(), &data, &c, &device).is_err());
        let mut k = SupermaskConfig::new(FrlArch::MNIST_LENET, 1);
        k.keep_fraction = 1.5;
        assert!(Supermask::new(&k).is_err());
        // Zero epochs: unchanged.
        let c = FrlTrainConfig { epochs: 0, ..cfg };
        let (s, r) = net.train(net.initial_scores(), &data, &c, &device).unwrap();
        assert_eq!((s, r.steps), (net.initial_scores(), 0));
    }

    /// Timing of the pieces of a LeNet step at FRL's batch size on the burn
    /// path (the reference; `native::tests::speed_frl_lenet_native` times the
    /// native kernels); run with
    /// `cargo test --release -p tally-kernels -- --ignored --nocapture --test-threads 1 speed_frl`.
    #[cfg(feature = "embedded-data")]
    #[test]
    #[ignore = "timing only"]
    fn speed_frl_lenet() {
        use std::time::Instant;
        let device = cpu_device();
        let split = crate::data::embedded_mnist();
        let net = Supermask::new(&SupermaskConfig::new(FrlArch::MNIST_LENET, 1)).unwrap();
        let scores = net.initial_scores();
        let reps = 20;

        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(mask_threshold(&scores[2], net.keep_counts()[2]));
        }
        println!("mask_threshold, 1.6M scores: {:.2} ms", t.elapsed().as_secs_f64() * 1e3 / reps as f64);
        let t = Instant::now();
        for _ in 0..reps {
            for l in 0..4 {
                std::hint::black_box(net.effective_layer(l, &scores[l]));
            }
        }
        println!("effective weights, all layers: {:.2} ms", t.elapsed().as_secs_f64() * 1e3 / reps as f64);
        let t = Instant::now();
        let r = net.rankings(&scores);
        println!("rankings (stable argsort, 1.63M): {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        std::hint::black_box(net.scores_from_rankings(&r).unwrap());
        println!("scores_from_rankings: {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
        // Forward + backward alone (fixed effective weights).
        let ad = device.clone().autodiff();
        let table = InputNorm::MNIST.table();
        let idx: Vec<usize> = (0..8).collect();
        let loss_fn = CrossEntropyLossConfig::new().init(&ad);
        let mut fb = 0.0;
        let mut mk = 0.0;
        let mut rd = 0.0;
        let mut trainer = Trainer { momentum: scores.iter().map(|s| vec![0.0; s.len()]).collect(), first_step: true };
        let mut s = scores.clone();
        let cfg = FrlTrainConfig::mnist(0, 0);
        let mut up = 0.0;
        for _ in 0..reps {
            let (x, y) = batch(&split.train, &idx, &table, &ad);
            let t = Instant::now();
            let w = net.effective_tensors(&s, &ad, true);
            mk += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let loss = loss_fn.forward(net.forward(x, &w), y);
            let grads = loss.backward();
            fb += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let g: Vec<Vec<f32>> = w.iter().map(|w| w.grad(&grads).unwrap()).collect();
            rd += t.elapsed().as_secs_f64();
            let t = Instant::now();
            for l in 0..4 {
                trainer.update(l, &mut s[l], &net.weights()[l], &g[l], 0.4, &cfg);
            }
            trainer.first_step = false;
            up += t.elapsed().as_secs_f64();
        }
        let ms = |x: f64| x * 1e3 / reps as f64;
        println!(
            "per step (bs 8): masks+tensors {:.2} ms, forward+backward {:.2} ms, read grads {:.2} ms, update {:.2} ms",
            ms(mk),
            ms(fb),
            ms(rd),
            ms(up)
        );

        // Whole local round as FRL's MNIST client runs it: 2 epochs of 64 samples (bs 8), 3 times.
        let data = split.train.subset(&(0..480).collect::<Vec<_>>()).unwrap();
        let cfg = FrlTrainConfig { epochs: 1, ..FrlTrainConfig::mnist(0, 0) };
        let global = net.initial_ranking();
        for _ in 0..2 {
            let t = Instant::now();
            let scores = net.scores_from_rankings(&global).unwrap();
            let (_, rep) = net.train_burn(scores, &data, &cfg, &device).unwrap();
            let secs = t.elapsed().as_secs_f64();
            println!(
                "burn: train 480 samples x 1 epoch: {} steps in {secs:.2} s = {:.1} steps/s, {:.2} ms/sample",
                rep.steps,
                rep.steps as f64 / secs,
                secs * 1e3 / rep.samples as f64
            );
        }
        let client = split.train.subset(&(0..60).collect::<Vec<_>>()).unwrap();
        let cfg = FrlTrainConfig::mnist(0, 0);
        let t = Instant::now();
        let scores = net.scores_from_rankings(&global).unwrap();
        let (scores, rep) = net.train_burn(scores, &client, &cfg, &device).unwrap();
        std::hint::black_box(net.rankings(&scores));
        let secs = t.elapsed().as_secs_f64();
        println!(
            "burn: one FRL MNIST client (60 samples, 2 epochs, incl. rebuild + ranking): {} steps, {secs:.3} s \
             -> 25 clients/round: {:.1} s",
            rep.steps,
            secs * 25.0
        );
        let test = split.test.subset(&(0..512).collect::<Vec<_>>()).unwrap();
        for bs in [8usize, 32, 128, 512] {
            let t = Instant::now();
            let e = net.evaluate_scores_burn(&net.scores_from_rankings(&global).unwrap(), &test, &device, bs).unwrap();
            println!(
                "burn: evaluate 512 test images, batch {bs}: {:.3} ms/image",
                t.elapsed().as_secs_f64() * 1e3 / 512.0
            );
            assert_eq!(e.total, 512);
        }
    }
}
