//! FRL networks as every party sees them: the layer list of each supermask
//! architecture and the seed-derived tensors (frozen weights, initial scores).
//!
//! The server never links burn, yet it must know the layer sizes of an FRL
//! run, build the initial global ranking from the initial scores `S⁰`, and
//! write the final (masked) model; the clients must regenerate the same
//! frozen weights `W` and the same sorted initial scores `s̄`. So both
//! definitions live here, and `tally-kernels` trains on top of them.
//!
//! # Network
//!
//! Every layer is *masked*: convolutions (3×3, stride 1, padding 1) and
//! "linear" layers (FRL writes them as 1×1 convolutions; here they are matrix
//! products with the same `[out, in]` weight). No layer has a bias and there
//! is no batch norm, exactly as in FRL (`bias=False` in `Builder.conv`). ReLU
//! follows every layer but the last; 2×2 max pooling (stride 2, floor)
//! follows the ReLU of the convolutions marked so in [`FrlArch::layers`]; the
//! feature map is flattened in `(channel, row, col)` order (PyTorch's `view`)
//! before the first linear layer.
//!
//! # Canonical edge order (part of the protocol)
//!
//! Layers are numbered `0..L` in forward order: convolutions first, then
//! linear layers, the order of PyTorch's `named_modules()` on FRL's models.
//! Within a layer, edge `i` is the `i`-th element of the weight in row-major
//! PyTorch layout: `[out, in, 3, 3]` for a convolution, `[out, in]` for a
//! linear layer. A ranking of layer `l` is a permutation of `0..n_l` over
//! these indices; [`FrlArch::layer_sizes`] lists `n_l`. The parameter vector
//! of a [`crate::model::ModelArch::Supermask`] model is the scores of all
//! layers concatenated in this order.
//!
//! # Frozen weights (specification)
//!
//! For layer `l` with fan-in `f_l` (`in·9` for a 3×3 convolution, `in` for a
//! linear layer), FRL's "signed constant" initialisation is
//! `W_l[i] = sign(u_i)·gain/√f_l` with gain `√2` (ReLU, fan-in mode). Here:
//!
//! * `σ_l = f32( √2 / √f_l )`: both square roots and the division in IEEE
//!   binary64 (each correctly rounded), then rounded once to binary32.
//! * `z_i` = element `i` of the Rademacher sequence of the [`crate::prng`]
//!   stream `(run_seed, Purpose::FrlWeights, round 0, client 0, step l)`: bit
//!   `i mod 32` of word `i / 32`, 1 → `+1`, 0 → `−1`.
//! * `W_l[i] = z_i · σ_l`, i.e. exactly `+σ_l` or `−σ_l`.
//!
//! # Initial scores (specification)
//!
//! FRL draws `S_l ~ U(−b_l, b_l)`, `b_l = 1/√f_l` (`kaiming_uniform_` with
//! `a = √5`). Here, from the stream `(run_seed, Purpose::FrlScores, round 0,
//! client 0, step l)`: `b_l = f32(1/√f_l)` and `S_l[i] = (2·u_i − 1)·b_l` in
//! binary32, where `u_i = (w_i >> 8)·2⁻²⁴` is the 24-bit uniform of word `i`
//! ([`crate::prng::uniform24`]); the only rounding is the final product.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::model::{MAX_PARAMETERS, ModelError};
use crate::prng::{Purpose, StreamId, uniform24};

/// Widest layer (channels or features) an architecture may declare, and the
/// largest input side: far above FRL's models (512 channels, 32 pixels) and
/// small enough that no size computation of a decoded architecture overflows
/// before [`FrlArch::validate`] compares the total with [`MAX_PARAMETERS`].
pub const MAX_WIDTH: usize = 1 << 16;

/// What a masked layer computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// 3×3 convolution, stride 1, padding 1, no bias. Weight `[out, in, 3, 3]`.
    Conv3x3,
    /// Fully connected, no bias. Weight `[out, in]`.
    Linear,
}

/// One masked layer of an [`FrlArch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaskedLayer {
    /// Convolution or linear.
    pub kind: LayerKind,
    /// Input channels (convolution) or features (linear).
    pub inputs: usize,
    /// Output channels or features.
    pub outputs: usize,
    /// A 2×2 max pooling (stride 2) follows this layer's ReLU.
    pub pool_after: bool,
}

impl MaskedLayer {
    /// A 3×3 convolution layer.
    pub const fn conv(inputs: usize, outputs: usize, pool_after: bool) -> Self {
        MaskedLayer { kind: LayerKind::Conv3x3, inputs, outputs, pool_after }
    }

    /// A linear layer.
    pub const fn linear(inputs: usize, outputs: usize) -> Self {
        MaskedLayer { kind: LayerKind::Linear, inputs, outputs, pool_after: false }
    }

    /// Fan-in of one output unit: `in·9` for a convolution, `in` for linear.
    pub fn fan_in(&self) -> usize {
        match self.kind {
            LayerKind::Conv3x3 => self.inputs.saturating_mul(9),
            LayerKind::Linear => self.inputs,
        }
    }

    /// Number of weights (= ranked edges) of the layer.
    pub fn edges(&self) -> usize {
        self.outputs.saturating_mul(self.fan_in())
    }

    /// The weight's shape in PyTorch layout.
    pub fn shape(&self) -> Vec<usize> {
        match self.kind {
            LayerKind::Conv3x3 => vec![self.outputs, self.inputs, 3, 3],
            LayerKind::Linear => vec![self.outputs, self.inputs],
        }
    }

    /// `σ_l = f32(√2/√f_l)`, the magnitude of every frozen weight.
    pub fn weight_scale(&self) -> f32 {
        (2f64.sqrt() / (self.fan_in() as f64).sqrt()) as f32
    }

    /// `b_l = f32(1/√f_l)`, the bound of the initial scores.
    pub fn score_bound(&self) -> f32 {
        (1.0 / (self.fan_in() as f64).sqrt()) as f32
    }
}

/// FRL's architectures. Layer lists, in the canonical order, are given by
/// [`FrlArch::layers`]; every convolution is 3×3 with padding 1.
///
/// Sources: `LeNet` is `models/small.py::LeNet` of `SPIN-UMass/FRL`; `Conv2`,
/// `Conv4` and `Conv8` are `models/frankle.py` of `allenai/hidden-networks`
/// (edge-popup; FRL's `Conv8` is the same network), with the input shape made
/// a parameter so they also run on 28×28 greyscale images (the flatten width
/// becomes `channels_last · (side/2^pools)²`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
#[serde(tag = "net", rename_all = "kebab-case", deny_unknown_fields)]
pub enum FrlArch {
    /// For 1×28×28 images (MNIST, Fashion-MNIST): conv(1→32) → conv(32→64) →
    /// pool → fc(12544→128) → fc(128→classes). With 10 classes: 1,625,632
    /// edges in 4 layers (288 / 18,432 / 1,605,632 / 1,280).
    #[serde(rename = "lenet")]
    LeNet {
        /// Output classes (10 in FRL).
        classes: usize,
    },
    /// conv(c→64) → conv(64→64) → pool → fc(64·(s/2)²→256) → fc(256→256) →
    /// fc(256→classes).
    Conv2 {
        /// Input channels (1 for the greyscale datasets of this project).
        channels: usize,
        /// Input height = width.
        side: usize,
        /// Output classes.
        classes: usize,
    },
    /// conv(c→64) → conv(64→64) → pool → conv(64→128) → conv(128→128) → pool →
    /// fc(128·(s/4)²→256) → fc(256→256) → fc(256→classes).
    Conv4 {
        /// Input channels.
        channels: usize,
        /// Input height = width.
        side: usize,
        /// Output classes.
        classes: usize,
    },
    /// Four conv pairs (64, 128, 256, 512 channels), each followed by a pool,
    /// then fc(512·(s/16)²→256) → fc(256→256) → fc(256→classes). FRL's CIFAR-10
    /// model (`channels 3, side 32`: 5,275,840 edges in 11 layers).
    Conv8 {
        /// Input channels.
        channels: usize,
        /// Input height = width.
        side: usize,
        /// Output classes.
        classes: usize,
    },
}

/// The side of a LeNet input image.
pub const LENET_SIDE: usize = 28;

impl FrlArch {
    /// FRL's MNIST model.
    pub const MNIST_LENET: FrlArch = FrlArch::LeNet { classes: 10 };

    /// `(channels, side)` of an input image.
    pub fn input_shape(&self) -> (usize, usize) {
        match *self {
            FrlArch::LeNet { .. } => (1, LENET_SIDE),
            FrlArch::Conv2 { channels, side, .. }
            | FrlArch::Conv4 { channels, side, .. }
            | FrlArch::Conv8 { channels, side, .. } => (channels, side),
        }
    }

    /// Output classes.
    pub fn classes(&self) -> usize {
        match *self {
            FrlArch::LeNet { classes }
            | FrlArch::Conv2 { classes, .. }
            | FrlArch::Conv4 { classes, .. }
            | FrlArch::Conv8 { classes, .. } => classes,
        }
    }

    /// The masked layers in canonical order (see the module docs). Sizes
    /// saturate on absurd (unvalidated) inputs instead of wrapping.
    pub fn layers(&self) -> Vec<MaskedLayer> {
        let (c, side) = self.input_shape();
        let classes = self.classes();
        let conv_stack = |widths: &[usize]| {
            // Pairs of convolutions, a pool after each pair.
            let mut layers = Vec::new();
            let mut prev = c;
            for &w in widths {
                layers.push(MaskedLayer::conv(prev, w, false));
                layers.push(MaskedLayer::conv(w, w, true));
                prev = w;
            }
            let s = side >> widths.len();
            (layers, prev.saturating_mul(s).saturating_mul(s))
        };
        let head = |layers: &mut Vec<MaskedLayer>, flat: usize| {
            layers.push(MaskedLayer::linear(flat, 256));
            layers.push(MaskedLayer::linear(256, 256));
            layers.push(MaskedLayer::linear(256, classes));
        };
        match self {
            FrlArch::LeNet { .. } => vec![
                MaskedLayer::conv(1, 32, false),
                MaskedLayer::conv(32, 64, true),
                MaskedLayer::linear(64 * 14 * 14, 128),
                MaskedLayer::linear(128, classes),
            ],
            FrlArch::Conv2 { .. } => {
                let (mut l, flat) = conv_stack(&[64]);
                head(&mut l, flat);
                l
            }
            FrlArch::Conv4 { .. } => {
                let (mut l, flat) = conv_stack(&[64, 128]);
                head(&mut l, flat);
                l
            }
            FrlArch::Conv8 { .. } => {
                let (mut l, flat) = conv_stack(&[64, 128, 256, 512]);
                head(&mut l, flat);
                l
            }
        }
    }

    /// Number of ranked edges per layer, in canonical order.
    pub fn layer_sizes(&self) -> Vec<usize> {
        self.layers().iter().map(MaskedLayer::edges).collect()
    }

    /// Total number of edges (weights) over all layers (saturating).
    pub fn num_edges(&self) -> usize {
        self.layer_sizes().iter().fold(0usize, |t, &n| t.saturating_add(n))
    }

    /// Refuses zero or absurd sizes ([`MAX_WIDTH`]), inputs too small for the
    /// pooling, and more than [`MAX_PARAMETERS`] edges.
    pub fn validate(&self) -> Result<(), ModelError> {
        let (c, side) = self.input_shape();
        let classes = self.classes();
        if c == 0 || classes == 0 || side == 0 {
            return Err(ModelError::InvalidArch("supermask: zero channels, side or classes"));
        }
        if c > MAX_WIDTH || classes > MAX_WIDTH || side > MAX_WIDTH {
            return Err(ModelError::InvalidArch("supermask: channels, side or classes above MAX_WIDTH"));
        }
        let pools = self.layers().iter().filter(|l| l.pool_after).count();
        if (side >> pools) == 0 {
            return Err(ModelError::InvalidArch("supermask: input too small for the pooling"));
        }
        let total = self.num_edges();
        if total > MAX_PARAMETERS {
            return Err(ModelError::TooLarge(total));
        }
        Ok(())
    }
}

fn stream(run_seed: u64, purpose: Purpose, layer: usize) -> StreamId {
    // Layers are at most MAX_PARAMETERS (< 2^32) in number, so the index fits.
    StreamId { run_seed, purpose, round: 0, client: 0, step: layer as u32 }
}

/// The frozen weights of layer `layer` (its index in canonical order):
/// `W[i] = z_i · σ_l` with `z` the Rademacher sequence of stream
/// `(run_seed, FrlWeights, 0, 0, layer)`.
pub fn frozen_layer_weights(run_seed: u64, layer: usize, spec: &MaskedLayer) -> Vec<f32> {
    let n = spec.edges();
    let sigma = spec.weight_scale();
    let mut words = vec![0u32; n.div_ceil(32)];
    stream(run_seed, Purpose::FrlWeights, layer).words_from(0).fill(&mut words);
    let (plus, minus) = (sigma, -sigma);
    let mut out = Vec::with_capacity(n);
    for (i, &w) in words.iter().enumerate() {
        let take = (n - i * 32).min(32);
        out.extend((0..take).map(|j| if (w >> j) & 1 == 1 { plus } else { minus }));
    }
    out
}

/// The frozen weights of every layer of `arch`, in canonical order.
pub fn frozen_weights(arch: &FrlArch, run_seed: u64) -> Vec<Vec<f32>> {
    arch.layers().iter().enumerate().map(|(l, spec)| frozen_layer_weights(run_seed, l, spec)).collect()
}

/// The initial scores of layer `layer`: `S[i] = (2·u_i − 1)·b_l` with `u_i`
/// the 24-bit uniform of word `i` of stream `(run_seed, FrlScores, 0, 0, layer)`.
pub fn initial_layer_scores(run_seed: u64, layer: usize, spec: &MaskedLayer) -> Vec<f32> {
    let n = spec.edges();
    let b = spec.score_bound();
    let mut words = vec![0u32; n];
    stream(run_seed, Purpose::FrlScores, layer).words_from(0).fill(&mut words);
    words.iter().map(|&w| (2.0 * uniform24(w) - 1.0) * b).collect()
}

/// The initial scores `S⁰` of every layer of `arch`, concatenated in
/// canonical order (the initial parameter vector of a supermask model).
pub fn initial_scores(arch: &FrlArch, run_seed: u64) -> Vec<f32> {
    let mut out = Vec::with_capacity(arch.num_edges());
    for (l, spec) in arch.layers().iter().enumerate() {
        out.extend(initial_layer_scores(run_seed, l, spec));
    }
    out
}

/// One layer's mask from its scores: edge `i` is kept iff `(|s_i|, i)` is
/// among the `keep` largest pairs in lexicographic order (`|s|` compared by
/// [`crate::frl::magnitude_key`], i.e. by value with both zeros equal), so
/// among equal `|s|` lower indices are pruned first. This is the mask every
/// client's forward pass applies (`tally_kernels::supermask::mask`, an `O(n)`
/// radix selection kept bit-identical to this by a test there); here for
/// parties without burn, such as the server writing the dense export.
pub fn layer_mask(scores: &[f32], keep: usize) -> Vec<bool> {
    let n = scores.len();
    if keep >= n {
        return vec![true; n];
    }
    if keep == 0 {
        return vec![false; n];
    }
    // (key, index) packed so that u64 order is the lexicographic order:
    // indices are below MAX_PARAMETERS < 2^32.
    let pair = |i: usize, s: f32| (u64::from(crate::frl::magnitude_key(s)) << 32) | i as u64;
    let mut pairs: Vec<u64> = scores.iter().enumerate().map(|(i, &s)| pair(i, s)).collect();
    // The smallest kept pair is the (n - keep)-th smallest (0-based).
    let (_, &mut threshold, _) = pairs.select_nth_unstable(n - keep);
    scores.iter().enumerate().map(|(i, &s)| pair(i, s) >= threshold).collect()
}

/// The global mask of a supermask network from its scores (the parameter
/// vector of a [`crate::model::ModelArch::Supermask`] model, canonical flat
/// order): each layer keeps [`crate::frl::keep_count`]`(n_l, k_fraction)`
/// edges by [`layer_mask`].
pub fn network_mask(arch: &FrlArch, k_fraction: f64, scores: &[f32]) -> Result<Vec<bool>, ModelError> {
    arch.validate()?;
    let expected = arch.num_edges();
    if scores.len() != expected {
        return Err(ModelError::WrongLength { expected, actual: scores.len() });
    }
    let mut out = Vec::with_capacity(expected);
    let mut rest = scores;
    for n in arch.layer_sizes() {
        // The total was checked, so each layer's split is in bounds.
        let (layer, tail) =
            rest.split_at_checked(n).ok_or(ModelError::WrongLength { expected, actual: scores.len() })?;
        out.extend(layer_mask(layer, crate::frl::keep_count(n, k_fraction)));
        rest = tail;
    }
    Ok(out)
}

/// The effective (masked) weights `W ⊙ mask` of every layer, concatenated:
/// a dense, bias-free model anyone can run without knowing FRL.
/// `mask` is the global mask in canonical flat order
/// ([`crate::frl::FrlVote::mask`]).
pub fn masked_weights(arch: &FrlArch, run_seed: u64, mask: &[bool]) -> Vec<f32> {
    let mut out = Vec::with_capacity(arch.num_edges());
    for (l, spec) in arch.layers().iter().enumerate() {
        out.extend(frozen_layer_weights(run_seed, l, spec));
    }
    for (w, &keep) in out.iter_mut().zip(mask) {
        if !keep {
            *w = 0.0;
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lenet_sizes_match_the_spec() {
        assert_eq!(FrlArch::MNIST_LENET.layer_sizes(), crate::frl::LENET_MNIST_LAYER_SIZES.to_vec());
        assert_eq!(FrlArch::MNIST_LENET.num_edges(), 1_625_632);
        let conv8 = FrlArch::Conv8 { channels: 3, side: 32, classes: 10 };
        assert_eq!(conv8.num_edges(), 5_275_840);
        assert!(conv8.validate().is_ok());
    }

    #[test]
    fn hostile_archs_are_refused_without_overflow() {
        for a in [
            FrlArch::LeNet { classes: 0 },
            FrlArch::Conv2 { channels: usize::MAX, side: usize::MAX, classes: usize::MAX },
            FrlArch::Conv4 { channels: 1, side: 3, classes: 10 },
            FrlArch::Conv8 { channels: 3, side: 4096, classes: 10 },
        ] {
            assert!(a.validate().is_err(), "{a:?}");
        }
    }

    #[test]
    fn weights_and_scores_follow_their_definition() {
        let arch = FrlArch::MNIST_LENET;
        let spec = arch.layers()[0];
        let w = frozen_layer_weights(7, 0, &spec);
        let sigma = (2f64.sqrt() / 9f64.sqrt()) as f32;
        assert_eq!(w.len(), 288);
        assert!(w.iter().all(|&v| v == sigma || v == -sigma));
        let s = initial_layer_scores(7, 0, &spec);
        let b = (1.0 / 3.0f64) as f32;
        assert!(s.iter().all(|&v| (-b..b).contains(&v)));
        assert_ne!(s, initial_layer_scores(8, 0, &spec));
        let all = initial_scores(&arch, 7);
        assert_eq!(&all[..288], &s[..]);
        let mask: Vec<bool> = (0..all.len()).map(|i| i % 3 == 0).collect();
        let m = masked_weights(&arch, 7, &mask);
        assert_eq!(m[0], w[0]);
        assert_eq!(m[1], 0.0);
    }

    #[test]
    fn layer_mask_keeps_the_largest_magnitudes_ties_to_higher_indices() {
        // |s| = 3, 1, 1, 0, 2, 1 : keep 3 → indices 0 (3), 4 (2), then the
        // highest index among the 1s (5).
        let s = [-3.0, 1.0, -1.0, 0.0, 2.0, 1.0];
        assert_eq!(layer_mask(&s, 3), [true, false, false, false, true, true]);
        assert_eq!(layer_mask(&s, 0), [false; 6]);
        assert_eq!(layer_mask(&s, 9), [true; 6]);
        assert_eq!(layer_mask(&[0.0, -0.0], 1), [false, true]);
        let arch = FrlArch::MNIST_LENET;
        let scores = initial_scores(&arch, 3);
        let mask = network_mask(&arch, 0.5, &scores).unwrap();
        let mut start = 0;
        for n in arch.layer_sizes() {
            let kept = mask[start..start + n].iter().filter(|&&k| k).count();
            assert_eq!(kept, crate::frl::keep_count(n, 0.5));
            start += n;
        }
        assert!(network_mask(&arch, 0.5, &scores[1..]).is_err());
    }

    #[test]
    fn serde_form_is_flat() {
        let a: FrlArch = toml::from_str("net = \"lenet\"\nclasses = 10").unwrap();
        assert_eq!(a, FrlArch::MNIST_LENET);
        let b: FrlArch = toml::from_str("net = \"conv2\"\nchannels = 1\nside = 28\nclasses = 10").unwrap();
        assert_eq!(b, FrlArch::Conv2 { channels: 1, side: 28, classes: 10 });
    }
}
