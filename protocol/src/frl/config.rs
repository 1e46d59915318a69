//! An FRL run's settings and limits: [`FrlConfig`] (layer sizes, keep
//! fraction, [`MaskRule`]), [`FrlRun`] (what clients are told), the bounds on
//! layers and edges, and [`keep_count`].

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use super::FrlError;
use super::packing::index_bits;
use crate::model::MAX_PARAMETERS;
use crate::wire::{MAX_MESSAGE_BYTES, MESSAGE_OVERHEAD_BYTES};

/// Most edges a ranking may cover, over all layers: every ranked edge is a
/// weight of the model, so the model bound [`MAX_PARAMETERS`] (2^24) applies.
/// It also bounds what a payload can cost the server: at most 24 bits per
/// entry (48 MiB of payload, which fits [`MAX_MESSAGE_BYTES`]) and 4 bytes of
/// vote sum per edge (8 in a round with enough votes to overflow u32: over
/// 2,642 for LeNet, over 256 for a layer of 2^24 edges).
pub const MAX_RANKED_EDGES: usize = MAX_PARAMETERS;

/// Most maskable layers in a run. FRL's Conv8 has 11 and a ResNet-18 about
/// 21; 256 leaves room for deep models while keeping per-layer loops and the
/// configuration small.
pub const MAX_RANKED_LAYERS: usize = 256;

/// Bits per entry for a layer of [`MAX_RANKED_EDGES`] edges: the widest entry
/// the codec ever reads (so a 64-bit window always holds one entry plus its
/// bit offset).
pub const MAX_INDEX_BITS: u32 = index_bits(MAX_RANKED_EDGES);

// The largest payload fits a message with room for the report around it.
const _: () = assert!(
    MAX_RANKED_EDGES * MAX_INDEX_BITS as usize / 8 + MAX_RANKED_LAYERS + MESSAGE_OVERHEAD_BYTES <= MAX_MESSAGE_BYTES
);
const _: () = assert!(MAX_INDEX_BITS + 7 <= 64);

/// Layer sizes of FRL's MNIST LeNet (§1.2, `models/small.py`): conv3×3 1→32,
/// conv3×3 32→64 (padding 1), then 1×1 "linear" layers 12 544→128 and
/// 128→10; no biases. 1,625,632 edges.
pub const LENET_MNIST_LAYER_SIZES: [usize; 4] = [288, 18_432, 1_605_632, 1_280];
/// Which edges a client's forward pass keeps, and so how scores become
/// rankings (module docs, and `docs/algorithms.md` §1.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskRule {
    /// As published (`rank_mode = "signed"`): rank and vote on signed scores,
    /// keep the largest `|S|`, i.e. both ends of the global ranking. Use for
    /// reproduction.
    #[default]
    TwoSided,
    /// The one-sided reading (`rank_mode = "magnitude"`): rank by `|S|`, the
    /// sorted initial values are `sort(|S⁰|)`, keep the top positions.
    OneSidedTopK,
}

/// Settings of an FRL run.
#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct FrlConfig {
    /// Edges of each maskable layer, in the model's canonical order.
    pub layer_sizes: Vec<usize>,
    /// Fraction of each layer's edges the mask keeps (the reference code's
    /// `sparsity`), in `(0, 1]`; FRL uses 0.5. A layer keeps
    /// `n − ⌊(1 − k)·n⌋` edges ([`FrlConfig::keep_count`]).
    pub k_fraction: f64,
    /// Which edges the mask keeps.
    pub mask: MaskRule,
}

impl FrlConfig {
    /// FRL's defaults over `layer_sizes`: k = 0.5, two-sided mask.
    pub fn new(layer_sizes: Vec<usize>) -> Self {
        FrlConfig { layer_sizes, k_fraction: 0.5, mask: MaskRule::TwoSided }
    }

    /// Checks the layer sizes ([`check_layer_sizes`]) and `k_fraction`.
    pub fn validate(&self) -> Result<(), FrlError> {
        check_layer_sizes(&self.layer_sizes)?;
        if !(self.k_fraction.is_finite() && self.k_fraction > 0.0 && self.k_fraction <= 1.0) {
            return Err(FrlError::InvalidConfig("k_fraction must be in (0, 1]"));
        }
        Ok(())
    }

    /// Edges over all layers.
    pub fn num_edges(&self) -> usize {
        self.layer_sizes.iter().fold(0usize, |t, &n| t.saturating_add(n))
    }

    /// Edges the mask keeps in a layer of `n`: [`keep_count`] with
    /// [`FrlConfig::k_fraction`].
    pub fn keep_count(&self, n: usize) -> usize {
        keep_count(n, self.k_fraction)
    }
}

/// What a client of an FRL run needs besides [`crate::wire::TrainSpec`]
/// (learning rate, batch size, local epochs): sent in
/// [`crate::wire::RunConfig::frl`]. Defaults are FRL's MNIST settings
/// (`docs/algorithms.md` §1.10).
#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct FrlRun {
    /// Names the [`crate::prng`] streams of the frozen weights and initial
    /// scores ([`crate::supermask`]): every party regenerates the network.
    pub seed: u64,
    /// Layer sizes, keep fraction and mask rule.
    pub vote: FrlConfig,
    /// Per-round decay of the learning rate: round `r` trains at
    /// `lr · lr_decay^(r−1)` (FRL: 0.999).
    pub lr_decay: f64,
    /// SGD momentum on the scores (FRL: 0.9); the buffer is fresh each round.
    pub momentum: f32,
    /// L2 weight decay on the scores (FRL: 1e-4).
    pub weight_decay: f32,
    /// Input normalisation `(pixel/255 − mean)/std` (MNIST: 0.1307, 0.3081).
    pub input_mean: f32,
    /// See `input_mean`.
    pub input_std: f32,
}

impl FrlRun {
    /// FRL's MNIST settings for a network of `layer_sizes` and `seed`.
    pub fn new(seed: u64, layer_sizes: Vec<usize>) -> Self {
        FrlRun {
            seed,
            vote: FrlConfig::new(layer_sizes),
            lr_decay: 0.999,
            momentum: 0.9,
            weight_decay: 1e-4,
            input_mean: 0.1307,
            input_std: 0.3081,
        }
    }

    /// Checks the settings, and that the layer sizes are those of `arch` (a
    /// client checks what a possibly hostile server sent).
    pub fn validate(&self, arch: &crate::model::ModelArch) -> Result<(), FrlError> {
        self.vote.validate()?;
        let crate::model::ModelArch::Supermask(net) = arch else {
            return Err(FrlError::InvalidConfig("an FRL run needs a supermask model"));
        };
        if net.layer_sizes() != self.vote.layer_sizes {
            return Err(FrlError::InvalidConfig("layer sizes differ from the model's"));
        }
        if !(self.lr_decay.is_finite() && self.lr_decay > 0.0 && self.lr_decay <= 1.0) {
            return Err(FrlError::InvalidConfig("lr_decay must be in (0, 1]"));
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err(FrlError::InvalidConfig("momentum must be in [0, 1)"));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(FrlError::InvalidConfig("weight_decay must be finite and non-negative"));
        }
        if !(self.input_mean.is_finite() && self.input_std.is_finite() && self.input_std > 0.0) {
            return Err(FrlError::InvalidConfig("input normalisation must be finite with std > 0"));
        }
        Ok(())
    }
}

/// Edges the mask keeps in a layer of `n` edges: `n − ⌊(1 − k)·n⌋`, computed
/// in f64 as the reference code does (`int((1 - k) * numel)`), with `k =
/// k_fraction` clamped to `[0, 1]` (NaN counts as 0). The one definition for
/// the server ([`FrlConfig::keep_count`]) and the clients' mask.
pub fn keep_count(n: usize, k_fraction: f64) -> usize {
    let k = if k_fraction.is_nan() { 0.0 } else { k_fraction.clamp(0.0, 1.0) };
    let dropped = ((1.0 - k) * n as f64) as usize;
    n - dropped.min(n)
}

/// Checks layer sizes: `1..=`[`MAX_RANKED_LAYERS`] layers, none empty, at
/// most [`MAX_RANKED_EDGES`] edges in all.
pub fn check_layer_sizes(layer_sizes: &[usize]) -> Result<(), FrlError> {
    if layer_sizes.is_empty() || layer_sizes.len() > MAX_RANKED_LAYERS {
        return Err(FrlError::BadLayerCount { got: layer_sizes.len(), limit: MAX_RANKED_LAYERS });
    }
    if let Some(layer) = layer_sizes.iter().position(|&n| n == 0) {
        return Err(FrlError::EmptyLayer { layer });
    }
    let total = layer_sizes.iter().fold(0usize, |t, &n| t.saturating_add(n));
    if total > MAX_RANKED_EDGES {
        return Err(FrlError::TooManyEdges { got: total, limit: MAX_RANKED_EDGES });
    }
    Ok(())
}
