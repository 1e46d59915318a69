//! FRL: clients send rankings of their edges, the server takes a vote.
//!
//! Paper: FRL — Federated Rank Learning (Mozaffari, Shejwalkar, Houmansadr,
//! USENIX Security 2023; arXiv 2110.04350), reference code `SPIN-UMass/FRL`
//! (`utils.py::Find_rank`, `utils.py::FRL_Vote`, `models/modules.py`). The
//! specification we follow is `docs/algorithms.md` §1.
//!
//! **Model.** Every maskable layer `l` has `n_l` frozen weights (regenerated
//! from the run seed, never sent) and one trainable *score* per weight
//! ("edge"). Every global score vector is a permutation of the sorted initial
//! scores `s̄_l` (ascending), so a layer's scores are fully described by a
//! ranking of its edges.
//!
//! **Ranking and position** (§1.3, the reference code's convention). A
//! layer's ranking `R_l` lists the edge indices `0..n_l` in *ascending* score
//! order: `R_l[0]` is the edge with the lowest (most negative) score and
//! `R_l[n_l − 1]` the edge with the highest. The *position* of edge `e` is the
//! `j` with `R_l[j] = e` (0 = lowest score); the position vector is the
//! inverse permutation. Ties between equal scores are broken by edge index
//! (lower index first), which makes the ranking of a score vector unique
//! ([`Ranking::from_scores`]). A [`Ranking`] can only hold valid permutations.
//!
//! **Vote** (§1.4, `FRL_Vote`). Per layer, over the round's accepted clients:
//! `V[e] = Σ_u position_u(e)` (a Borda count); the new global ranking `G` is
//! the *stable* ascending argsort of `V` (equal sums keep edge-index order);
//! and the new global scores are `S[G[j]] = s̄[j]`. [`FrlVote`] folds each
//! ranking into integer sums as it arrives (memory `O(edges)` whatever the
//! number of clients; integer addition is order-independent, so the result
//! does not depend on arrival order) and sorts once per round with an LSD
//! radix sort that is exactly the stable order ([`vote_order`]).
//!
//! **Mask** ([`MaskRule`]). A client's forward pass keeps
//! `n_l − ⌊(1 − k)·n_l⌋` edges per layer (k = [`FrlConfig::k_fraction`],
//! 0.5 by default). As published ([`MaskRule::TwoSided`], the default) the
//! ranking and vote use *signed* scores but the mask keeps the largest `|S|`,
//! so the edges the vote puts at *either* end are kept and the middle is
//! pruned. [`MaskRule::OneSidedTopK`] is the one-sided reading of the paper
//! (the spec's `rank_mode = "magnitude"`): clients rank by `|S|`, the sorted
//! initial values are `sort(|S⁰|)`, and the mask keeps the top positions.
//! The vote is the same under both rules; the rule decides how scores become
//! rankings ([`Ranking::from_scores`], [`FrlVote::new`]) and which positions
//! the mask keeps ([`FrlVote::kept_positions`]).
//!
//! # Wire payload
//!
//! The client's ranking, bit-packed, tagged [`ID`] ([`payload`]).
//! Nothing in the payload says how many layers or edges there are; the
//! receiver decodes with the run's layer sizes `n_0..n_{L−1}` ([`decode`]).
//!
//! * Layer `l` uses `b_l = ⌈log₂ n_l⌉` bits per entry ([`index_bits`]; 0 when
//!   `n_l = 1`).
//! * The payload is `L` blocks, one per layer in order, each starting on a
//!   byte boundary; block `l` is `⌈n_l·b_l / 8⌉` bytes ([`packed_len`]), and
//!   nothing follows the last block.
//! * Entry `i` of block `l` is `R_l[i]`, stored in bits `i·b_l ..
//!   (i + 1)·b_l − 1` of the block, least significant bit first, where bit
//!   `k` of a block is bit `k mod 8` (value `2^(k mod 8)`) of byte `⌊k/8⌋`.
//!   Equivalently, the block read as one little-endian integer is
//!   `Σ_i R_l[i] · 2^(i·b_l)`.
//! * Bits of the last byte beyond `n_l·b_l` are padding and must be zero, so
//!   every ranking has exactly one encoding.
//!
//! Example: layer sizes `[3, 5]`, rankings `[2, 0, 1]` and `[4, 1, 3, 0, 2]`:
//! `b = 2, 3`; block 0 is `2 + 0·2² + 1·2⁴ = 0x12` (one byte, two padding
//! bits), block 1 is `4 + 1·2³ + 3·2⁶ + 0·2⁹ + 2·2¹² = 0x20cc` (two bytes, LE),
//! so the payload is `12 cc 20`. A LeNet ranking (1,625,632 edges, 21 bits
//! for the big layer) is 4.25 MB.
//!
//! # Invariants checked
//!
//! [`decode`] (and so [`FrlVote::absorb`]) refuses, with a typed
//! [`FrlError`]: a payload whose length is not exactly [`packed_len`]
//! (truncated or trailing bytes), non-zero padding bits, an entry `≥ n_l`
//! (not a permutation), and a repeated entry. `n_l` entries below `n_l` with
//! no repeat are a permutation, so whatever passes is a valid [`Ranking`]: a
//! client can move its one vote around but can never add weight to an edge.
//! The reference code never validates (it simulates its clients).
//!
//! Invariants of the vote that the tests check: the new scores are a
//! permutation of `s̄`; `Σ_e V[e] = m·n(n−1)/2` for `m` votes; `m` identical
//! rankings `R` give back `G = R`; the streaming result equals a plain
//! materialise-then-`sort_by_key` reference on random inputs and any arrival
//! order.

use std::collections::BTreeMap;
use std::ops::Range;

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::aggregate::{AggregateError, AggregateStats, Aggregator, ClientIndex, StateError, check_common};
use crate::error::Misbehaviour;
use crate::model::MAX_PARAMETERS;
use crate::wire::{ClientUpdate, MAX_MESSAGE_BYTES, MESSAGE_OVERHEAD_BYTES, ModelSync};

mod kind;
pub use kind::{FrlKind, FrlSpec, ID, NAME, bad_payload, payload};

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

/// Below this many edges a layer is ordered with a comparison sort (the radix
/// sort's histograms would cost more than they save).
const RADIX_MIN_LEN: usize = 1 << 12;

/// Digit width of the radix sort: 2^11 counters (16 KiB) stay in L1, and a
/// LeNet round (sums below 2^26) takes three passes.
const RADIX_DIGIT_BITS: u32 = 11;

/// Why a ranking, a payload or a configuration was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FrlError {
    /// A ranking with another number of layers than the run's.
    #[error("ranking has {got} layers, the run has {expected}")]
    WrongLayerCount {
        /// The run's layer count.
        expected: usize,
        /// The ranking's.
        got: usize,
    },
    /// A layer with another number of entries than the run's layer.
    #[error("layer {layer} has {got} entries, the run's layer has {expected} edges")]
    WrongLayerSize {
        /// The layer.
        layer: usize,
        /// The run's size.
        expected: usize,
        /// The ranking's.
        got: usize,
    },
    /// An entry that is not an edge of its layer (`≥ n_l`).
    #[error("layer {layer}: entry {index} is not an edge of the layer (not a permutation)")]
    NotAPermutation {
        /// The layer.
        layer: usize,
        /// Position of the entry in the layer's ranking.
        index: usize,
    },
    /// An entry that repeats an earlier one.
    #[error("layer {layer}: entry {index} repeats an earlier edge (not a permutation)")]
    DuplicateIndex {
        /// The layer.
        layer: usize,
        /// Position of the repeated entry in the layer's ranking.
        index: usize,
    },
    /// The payload is shorter than the run's layer sizes require.
    #[error("packed ranking of {got} bytes, the run's layers need {expected}")]
    Truncated {
        /// Bytes required ([`packed_len`]).
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// Bytes after the last layer's block.
    #[error("{extra} trailing bytes after the packed ranking")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// Padding bits after a layer's last entry that are not zero (a second
    /// encoding of the same ranking, or a covert channel).
    #[error("layer {layer}: non-zero padding bits")]
    NonZeroPadding {
        /// The layer.
        layer: usize,
    },
    /// A layer size of zero: nothing to rank.
    #[error("layer {layer} has no edges")]
    EmptyLayer {
        /// The layer.
        layer: usize,
    },
    /// More layers than [`MAX_RANKED_LAYERS`] (or none at all).
    #[error("{got} layers, the limit is 1..={limit}")]
    BadLayerCount {
        /// Layers asked for.
        got: usize,
        /// [`MAX_RANKED_LAYERS`].
        limit: usize,
    },
    /// More edges than [`MAX_RANKED_EDGES`].
    #[error("{got} edges, more than the limit {limit}")]
    TooManyEdges {
        /// Edges asked for (saturating sum).
        got: usize,
        /// [`MAX_RANKED_EDGES`].
        limit: usize,
    },
    /// A score vector or output of the wrong length.
    #[error("{what} has {got} values, the layers have {expected} edges")]
    WrongLength {
        /// What was measured.
        what: &'static str,
        /// Edges over all layers.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// NaN or infinity in a score vector.
    #[error("non-finite score at index {index}")]
    NonFiniteScore {
        /// Flat index.
        index: usize,
    },
    /// Sorted initial scores that are not ascending within a layer.
    #[error("sorted initial scores are not ascending at index {index}")]
    UnsortedScores {
        /// Flat index of the first value smaller than its predecessor.
        index: usize,
    },
    /// A configuration value out of range.
    #[error("invalid FRL configuration: {0}")]
    InvalidConfig(&'static str),
}

impl FrlError {
    /// Whether the content of a ranking is at fault (not a permutation,
    /// non-canonical padding) rather than its shape (lengths).
    pub fn is_permutation_error(&self) -> bool {
        matches!(
            self,
            FrlError::NotAPermutation { .. } | FrlError::DuplicateIndex { .. } | FrlError::NonZeroPadding { .. }
        )
    }
}

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

    /// Edges the mask keeps in a layer of `n`: `n − ⌊(1 − k)·n⌋`, computed in
    /// f64 as the reference code does (`int((1 - k) * n)`).
    pub fn keep_count(&self, n: usize) -> usize {
        let dropped = ((1.0 - self.k_fraction) * n as f64) as usize;
        n - dropped.min(n)
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

/// Bits per entry for a layer of `n` edges: `⌈log₂ n⌉`, 0 for `n ≤ 1`.
pub const fn index_bits(n: usize) -> u32 {
    if n <= 1 { 0 } else { usize::BITS - (n - 1).leading_zeros() }
}

/// Bytes of a layer's block: `⌈n·⌈log₂ n⌉ / 8⌉`.
fn block_len(n: usize) -> usize {
    (n * index_bits(n) as usize).div_ceil(8)
}

/// Exact length of a packed ranking over `layer_sizes` (checked first).
pub fn packed_len(layer_sizes: &[usize]) -> Result<usize, FrlError> {
    check_layer_sizes(layer_sizes)?;
    Ok(layer_sizes.iter().map(|&n| block_len(n)).sum())
}

/// `[0, n_0, n_0 + n_1, ...]`: where each layer starts in flat order.
fn offsets_of(layer_sizes: &[usize]) -> Vec<usize> {
    let mut offsets = Vec::with_capacity(layer_sizes.len() + 1);
    let mut at = 0;
    offsets.push(0);
    for &n in layer_sizes {
        at += n;
        offsets.push(at);
    }
    offsets
}

/// A valid ranking: for each layer, a permutation of its edges `0..n_l`
/// listed from the lowest score to the highest (module docs). Only the
/// checked constructors make one, so holding a `Ranking` means holding
/// permutations of the sizes it was checked against.
#[derive(Clone, PartialEq, Eq)]
pub struct Ranking {
    /// All layers' rankings, concatenated; entries are layer-local indices.
    order: Vec<u32>,
    /// `offsets[l]..offsets[l + 1]` is layer `l` in `order`.
    offsets: Vec<usize>,
}

impl std::fmt::Debug for Ranking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A LeNet ranking has 1.6 M entries: show the shape and a prefix.
        let mut d = f.debug_struct("Ranking");
        d.field("layer_sizes", &self.layer_sizes().collect::<Vec<_>>());
        for (l, layer) in self.layers().enumerate().take(4) {
            d.field(&format!("layer{l}_head"), &&layer[..layer.len().min(8)]);
        }
        d.finish_non_exhaustive()
    }
}

/// Checks that `layer` is a permutation of `0..layer.len()` with a bitset
/// (`seen` is scratch, resized and cleared here).
fn check_permutation(layer_index: usize, layer: &[u32], seen: &mut Vec<u64>) -> Result<(), FrlError> {
    let n = layer.len();
    seen.clear();
    seen.resize(n.div_ceil(64), 0);
    for (index, &v) in layer.iter().enumerate() {
        mark(seen, n, v).map_err(|dup| {
            if dup {
                FrlError::DuplicateIndex { layer: layer_index, index }
            } else {
                FrlError::NotAPermutation { layer: layer_index, index }
            }
        })?;
    }
    Ok(())
}

/// Marks `v` in `seen`; `Err(false)` if `v ≥ n`, `Err(true)` if already marked.
#[inline(always)]
fn mark(seen: &mut [u64], n: usize, v: u32) -> Result<(), bool> {
    let v = v as usize;
    if v >= n {
        return Err(false);
    }
    let (word, bit) = (&mut seen[v >> 6], 1u64 << (v & 63));
    if *word & bit != 0 {
        return Err(true);
    }
    *word |= bit;
    Ok(())
}

impl Ranking {
    /// A ranking from per-layer entry lists, checked against `expected`
    /// layer sizes: same layer count, same sizes, each layer a permutation.
    pub fn new(layers: Vec<Vec<u32>>, expected: &[usize]) -> Result<Ranking, FrlError> {
        check_layer_sizes(expected)?;
        if layers.len() != expected.len() {
            return Err(FrlError::WrongLayerCount { expected: expected.len(), got: layers.len() });
        }
        for (layer, (entries, &n)) in layers.iter().zip(expected).enumerate() {
            if entries.len() != n {
                return Err(FrlError::WrongLayerSize { layer, expected: n, got: entries.len() });
            }
        }
        let mut seen = Vec::new();
        for (l, entries) in layers.iter().enumerate() {
            check_permutation(l, entries, &mut seen)?;
        }
        Ok(Ranking { order: layers.concat(), offsets: offsets_of(expected) })
    }

    /// A ranking from all layers' entries concatenated (a GPU argsort's
    /// output), checked like [`Ranking::new`]; a wrong total length is
    /// [`FrlError::WrongLength`].
    pub fn from_flat(order: Vec<u32>, layer_sizes: &[usize]) -> Result<Ranking, FrlError> {
        check_layer_sizes(layer_sizes)?;
        let offsets = offsets_of(layer_sizes);
        let total = offsets[layer_sizes.len()];
        if order.len() != total {
            return Err(FrlError::WrongLength { what: "flat ranking", expected: total, got: order.len() });
        }
        let mut seen = Vec::new();
        for (l, w) in offsets.windows(2).enumerate() {
            check_permutation(l, &order[w[0]..w[1]], &mut seen)?;
        }
        Ok(Ranking { order, offsets })
    }

    /// The identity ranking (edge `e` at position `e`) over `layer_sizes`.
    pub fn identity(layer_sizes: &[usize]) -> Result<Ranking, FrlError> {
        check_layer_sizes(layer_sizes)?;
        let order = layer_sizes.iter().flat_map(|&n| 0..n as u32).collect();
        Ok(Ranking { order, offsets: offsets_of(layer_sizes) })
    }

    /// The ranking of a score vector (all layers concatenated, canonical
    /// order): per layer, the edges in ascending order of the signed score
    /// ([`MaskRule::TwoSided`], `Find_rank` of the reference code) or of
    /// `|score|` ([`MaskRule::OneSidedTopK`]), ties by edge index. Scores are
    /// compared as by `f32::total_cmp`, so `−0.0` ranks below `+0.0`
    /// ([`MaskRule::TwoSided`]); NaN and infinities are refused.
    pub fn from_scores(scores: &[f32], layer_sizes: &[usize], rule: MaskRule) -> Result<Ranking, FrlError> {
        check_layer_sizes(layer_sizes)?;
        let offsets = offsets_of(layer_sizes);
        let total = offsets[layer_sizes.len()];
        if scores.len() != total {
            return Err(FrlError::WrongLength { what: "score vector", expected: total, got: scores.len() });
        }
        if let Some(index) = scores.iter().position(|s| !s.is_finite()) {
            return Err(FrlError::NonFiniteScore { index });
        }
        let mut order = vec![0u32; total];
        let (mut keys, mut scratch) = (Vec::new(), SortScratch::default());
        for w in offsets.windows(2) {
            keys.clear();
            keys.extend(scores[w[0]..w[1]].iter().map(|&s| score_key(s, rule)));
            vote_order_into(&keys, &mut order[w[0]..w[1]], &mut scratch);
        }
        Ok(Ranking { order, offsets })
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Edges over all layers.
    pub fn num_edges(&self) -> usize {
        self.order.len()
    }

    /// Each layer's size.
    pub fn layer_sizes(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        self.offsets.windows(2).map(|w| w[1] - w[0])
    }

    /// Layer `l`'s ranking: its edges from the lowest score to the highest.
    ///
    /// # Panics
    /// If `l ≥ num_layers()`.
    pub fn layer(&self, l: usize) -> &[u32] {
        &self.order[self.offsets[l]..self.offsets[l + 1]]
    }

    /// Every layer's ranking, in order.
    pub fn layers(&self) -> impl ExactSizeIterator<Item = &[u32]> + '_ {
        self.offsets.windows(2).map(|w| &self.order[w[0]..w[1]])
    }

    /// All layers concatenated (entries are layer-local indices).
    pub fn as_flat(&self) -> &[u32] {
        &self.order
    }

    /// Layer `l`'s position vector (the inverse permutation): entry `e` is the
    /// position of edge `e`, 0 = lowest score.
    ///
    /// # Panics
    /// If `l ≥ num_layers()`.
    pub fn positions(&self, l: usize) -> Vec<u32> {
        let layer = self.layer(l);
        let mut p = vec![0u32; layer.len()];
        for (j, &e) in layer.iter().enumerate() {
            p[e as usize] = j as u32;
        }
        p
    }

    /// Scores from the ranking: `out[G[j]] = sorted[j]` per layer, where
    /// `sorted` holds each layer's sorted initial scores `s̄` (concatenated).
    /// This is how a client rebuilds the global scores from a global ranking.
    pub fn write_scores(&self, sorted: &[f32], out: &mut [f32]) -> Result<(), FrlError> {
        let total = self.num_edges();
        if sorted.len() != total {
            return Err(FrlError::WrongLength { what: "sorted scores", expected: total, got: sorted.len() });
        }
        if out.len() != total {
            return Err(FrlError::WrongLength { what: "score output", expected: total, got: out.len() });
        }
        for w in self.offsets.windows(2) {
            let dst = &mut out[w[0]..w[1]];
            for (&e, &s) in self.order[w[0]..w[1]].iter().zip(&sorted[w[0]..w[1]]) {
                dst[e as usize] = s;
            }
        }
        Ok(())
    }
}

/// The initial global ranking and `s̄` of a run: the ranking of the initial
/// scores `S⁰` (all layers concatenated) under `cfg.mask`, and the values in
/// that order (signed for [`MaskRule::TwoSided`], `|S⁰|` for
/// [`MaskRule::OneSidedTopK`]).
pub fn reference(cfg: &FrlConfig, initial_scores: &[f32]) -> Result<(Ranking, Vec<f32>), FrlError> {
    let global = Ranking::from_scores(initial_scores, &cfg.layer_sizes, cfg.mask)?;
    let key = |s: f32| match cfg.mask {
        MaskRule::TwoSided => s,
        MaskRule::OneSidedTopK => s.abs(),
    };
    let mut sorted = vec![0f32; initial_scores.len()];
    for w in global.offsets.windows(2) {
        let scores = &initial_scores[w[0]..w[1]];
        for (s, &e) in sorted[w[0]..w[1]].iter_mut().zip(&global.order[w[0]..w[1]]) {
            *s = key(scores[e as usize]);
        }
    }
    Ok((global, sorted))
}

/// `s̄` of FRL runs, computed once per network and shared: a simulation of a
/// thousand clients of one run must not hold a thousand copies (6.5 MB each
/// for LeNet), and a client that reconnects should not regenerate it.
#[derive(Debug, Default)]
pub struct ReferenceCache {
    entries: std::sync::Mutex<Vec<(ReferenceKey, std::sync::Arc<[f32]>)>>,
}

type ReferenceKey = (crate::supermask::FrlArch, u64, MaskRule);

/// Networks a [`ReferenceCache`] keeps: a process serves one run at a time,
/// a few are plenty, and the bound keeps a hostile sequence of runs from
/// growing it without limit.
const REFERENCE_CACHE_ENTRIES: usize = 4;

impl ReferenceCache {
    /// `s̄` of the run `run` over `net`, computed on first use.
    pub fn sorted_scores(
        &self,
        net: &crate::supermask::FrlArch,
        run: &FrlRun,
    ) -> Result<std::sync::Arc<[f32]>, FrlError> {
        let key = (*net, run.seed, run.vote.mask);
        // A poisoned lock only means another thread panicked mid-insert; the
        // entries are still whole `Arc`s, so keep using them.
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, v)) = entries.iter().find(|(k, _)| *k == key) {
            return Ok(v.clone());
        }
        let initial = crate::supermask::initial_scores(net, run.seed);
        let (_, sorted) = reference(&run.vote, &initial)?;
        let sorted: std::sync::Arc<[f32]> = sorted.into();
        if entries.len() >= REFERENCE_CACHE_ENTRIES {
            entries.remove(0);
        }
        entries.push((key, sorted.clone()));
        Ok(sorted)
    }
}

/// A u32 whose unsigned order is `f32::total_cmp` order of the ranking key.
fn score_key(s: f32, rule: MaskRule) -> u32 {
    let s = match rule {
        MaskRule::TwoSided => s,
        MaskRule::OneSidedTopK => s.abs(),
    };
    let b = s.to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

// ---------------------------------------------------------------------------
// Packed encoding
// ---------------------------------------------------------------------------

/// Encodes a ranking in the packed wire format (module docs).
pub fn encode(ranking: &Ranking) -> Vec<u8> {
    let mut out = Vec::with_capacity(ranking.layer_sizes().map(block_len).sum());
    for layer in ranking.layers() {
        pack_layer(layer, index_bits(layer.len()), &mut out);
    }
    out
}

/// Appends one layer's block: a 64-bit accumulator flushed 32 bits at a time.
fn pack_layer(layer: &[u32], bits: u32, out: &mut Vec<u8>) {
    if bits == 0 {
        return;
    }
    let mut acc = 0u64;
    let mut held = 0u32; // bits in `acc`, < 32 between entries
    for &v in layer {
        acc |= u64::from(v) << held;
        held += bits; // < 32 + 24
        if held >= 32 {
            out.extend_from_slice(&(acc as u32).to_le_bytes());
            acc >>= 32;
            held -= 32;
        }
    }
    // The rest of the last word; bits above `held` are zero (padding).
    let tail = held.div_ceil(8) as usize;
    out.extend_from_slice(&(acc as u32).to_le_bytes()[..tail]);
}

/// Reads 8 bytes at `byte` as a little-endian u64, zero-extended past the end.
#[inline(always)]
fn load_le_u64(block: &[u8], byte: usize) -> u64 {
    match block.get(byte..).and_then(<[u8]>::first_chunk::<8>) {
        Some(chunk) => u64::from_le_bytes(*chunk),
        None => {
            let rest = block.get(byte..).unwrap_or(&[]);
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            u64::from_le_bytes(buf)
        }
    }
}

/// Calls `f(i, entry_i)` for the `n` entries of a `bits`-wide block in order
/// while it returns true; returns the index at which it returned false. Each
/// entry is one unaligned 64-bit load, a shift and a mask (no per-bit work).
#[inline(always)]
fn scan_block(block: &[u8], n: usize, bits: u32, mut f: impl FnMut(usize, u32) -> bool) -> Option<usize> {
    let mask = (1u64 << bits) - 1; // bits ≤ MAX_INDEX_BITS < 64
    let mut bit = 0usize;
    for i in 0..n {
        let v = ((load_le_u64(block, bit >> 3) >> (bit & 7)) & mask) as u32;
        if !f(i, v) {
            return Some(i);
        }
        bit += bits as usize;
    }
    None
}

/// Checks a payload's length and every layer's padding; returns each
/// layer's block (no entry is read).
fn split_blocks<'a>(bytes: &'a [u8], layer_sizes: &[usize]) -> Result<Vec<&'a [u8]>, FrlError> {
    let expected = packed_len(layer_sizes)?;
    if bytes.len() < expected {
        return Err(FrlError::Truncated { expected, got: bytes.len() });
    }
    if bytes.len() > expected {
        return Err(FrlError::TrailingBytes { extra: bytes.len() - expected });
    }
    let mut blocks = Vec::with_capacity(layer_sizes.len());
    let mut rest = bytes;
    for (layer, &n) in layer_sizes.iter().enumerate() {
        let (block, tail) = rest.split_at(block_len(n));
        let used = (n * index_bits(n) as usize) % 8;
        if used != 0 && block.last().is_some_and(|&last| last >> used != 0) {
            return Err(FrlError::NonZeroPadding { layer });
        }
        blocks.push(block);
        rest = tail;
    }
    Ok(blocks)
}

/// Decodes a packed ranking for a run with `layer_sizes` (module docs),
/// refusing wrong lengths, non-zero padding and non-permutations. Never
/// panics: the only sizes it allocates for come from `layer_sizes`, which are
/// checked against [`MAX_RANKED_EDGES`] and [`MAX_RANKED_LAYERS`].
pub fn decode(bytes: &[u8], layer_sizes: &[usize]) -> Result<Ranking, FrlError> {
    let blocks = split_blocks(bytes, layer_sizes)?;
    let offsets = offsets_of(layer_sizes);
    let mut order = vec![0u32; offsets[layer_sizes.len()]];
    let mut seen = Vec::new();
    for (layer, (block, w)) in blocks.iter().zip(offsets.windows(2)).enumerate() {
        let (n, out) = (w[1] - w[0], &mut order[w[0]..w[1]]);
        seen.clear();
        seen.resize(n.div_ceil(64), 0);
        let mut dup = false;
        let stop = scan_block(block, n, index_bits(n), |i, v| {
            out[i] = v;
            mark(&mut seen, n, v).map_err(|d| dup = d).is_ok()
        });
        if let Some(index) = stop {
            return Err(if dup {
                FrlError::DuplicateIndex { layer, index }
            } else {
                FrlError::NotAPermutation { layer, index }
            });
        }
    }
    Ok(Ranking { order, offsets })
}

// ---------------------------------------------------------------------------
// Stable vote order (radix)
// ---------------------------------------------------------------------------

/// The stable ascending argsort of `keys`: indices ordered by key, equal
/// keys in index order. This is the order [`FrlVote::finish`] uses (and a
/// DP top-k of vote sums can use). Identical to
/// `(0..n).collect::<Vec<u32>>().sort_by_key(|&i| keys[i])`, computed by an
/// LSD radix sort over `(key, index)` packed into one u64 when they fit (the
/// index in the low bits makes every value distinct, so the sorted packed
/// values are exactly the stable order).
///
/// # Panics
/// If `keys.len() > u32::MAX`.
pub fn vote_order<K: Copy + Into<u64>>(keys: &[K]) -> Vec<u32> {
    let mut out = vec![0u32; keys.len()];
    vote_order_into(keys, &mut out, &mut SortScratch::default());
    out
}

/// The radix sort's two buffers, kept between rounds: a fresh 13 MB buffer
/// costs more in page faults than the sort itself.
#[derive(Clone, Default)]
struct SortScratch {
    a: Vec<u64>,
    b: Vec<u64>,
}

fn vote_order_into<K: Copy + Into<u64>>(keys: &[K], out: &mut [u32], scratch: &mut SortScratch) {
    let n = keys.len();
    assert!(n <= u32::MAX as usize && out.len() == n, "invariant: at most 2^32 keys, one output per key");
    let idx_bits = index_bits(n);
    let max = keys.iter().fold(0u64, |m, &k| m.max(k.into()));
    let key_bits = u64::BITS - max.leading_zeros();
    if key_bits == 0 {
        for (i, o) in out.iter_mut().enumerate() {
            *o = i as u32;
        }
        return;
    }
    if key_bits + idx_bits > 64 {
        // Sums past 2^40 (a million votes on a big layer): the plain stable sort.
        let mut idx: Vec<u32> = (0..n as u32).collect();
        idx.sort_by_key(|&i| keys[i as usize].into());
        out.copy_from_slice(&idx);
        return;
    }
    let SortScratch { a, b } = scratch;
    a.clear();
    if n < RADIX_MIN_LEN {
        a.extend(keys.iter().enumerate().map(|(i, &k)| (k.into() << idx_bits) | i as u64));
        a.sort_unstable(); // values are distinct: unstable = stable here
    } else {
        radix_sort(keys, idx_bits, key_bits, a, b);
    }
    let idx_mask = (1u64 << idx_bits) - 1;
    for (o, x) in out.iter_mut().zip(a.iter()) {
        *o = (x & idx_mask) as u32;
    }
}

/// Stable LSD radix sort of `(key << shift) | index` values, left in `a`.
/// Built in index order, so sorting by the key bits alone gives the stable
/// order. The histograms of all digits are taken while packing; a pass whose
/// digit is the same for every value is skipped.
fn radix_sort<K: Copy + Into<u64>>(keys: &[K], shift: u32, key_bits: u32, a: &mut Vec<u64>, b: &mut Vec<u64>) {
    let n = keys.len();
    let passes = key_bits.div_ceil(RADIX_DIGIT_BITS);
    let width = key_bits.div_ceil(passes);
    let buckets = 1usize << width;
    let mask = (buckets - 1) as u64;
    let mut hist = vec![0u32; passes as usize * buckets]; // n ≤ 2^32 (checked by the caller)
    a.reserve(n);
    a.extend(keys.iter().enumerate().map(|(i, &k)| {
        let k = k.into();
        for (p, h) in hist.chunks_exact_mut(buckets).enumerate() {
            h[((k >> (p as u32 * width)) & mask) as usize] += 1;
        }
        (k << shift) | i as u64
    }));
    b.clear();
    b.resize(n, 0);
    for (p, h) in hist.chunks_exact_mut(buckets).enumerate() {
        if h.contains(&(n as u32)) {
            continue; // one bucket holds everything: the pass is the identity
        }
        let mut at = 0u32;
        for c in h.iter_mut() {
            let count = *c;
            *c = at;
            at += count;
        }
        let s = shift + p as u32 * width;
        for &x in a.iter() {
            let d = ((x >> s) & mask) as usize;
            b[h[d] as usize] = x;
            h[d] += 1;
        }
        std::mem::swap(a, b);
    }
}

// ---------------------------------------------------------------------------
// The vote aggregator
// ---------------------------------------------------------------------------

/// Per-edge vote sums: u32 while the round's votes can't overflow it (half
/// the memory traffic of the scatter), u64 past that.
#[derive(Clone)]
enum Sums {
    Narrow(Vec<u32>),
    Wide(Vec<u64>),
}

trait SumWord: Copy + Into<u64> {
    fn add(&mut self, j: u32);
    fn sub(&mut self, j: u32);
}

impl SumWord for u32 {
    #[inline(always)]
    fn add(&mut self, j: u32) {
        *self = self.wrapping_add(j);
    }
    #[inline(always)]
    fn sub(&mut self, j: u32) {
        *self = self.wrapping_sub(j);
    }
}

impl SumWord for u64 {
    #[inline(always)]
    fn add(&mut self, j: u32) {
        *self = self.wrapping_add(u64::from(j));
    }
    #[inline(always)]
    fn sub(&mut self, j: u32) {
        *self = self.wrapping_sub(u64::from(j));
    }
}

/// FRL's vote (`FRL_Vote`) as a streaming [`Aggregator`].
///
/// State: the current global ranking ([`FrlVote::global_ranking`]) and the
/// sorted initial scores `s̄` ([`FrlVote::sorted_scores`]). Each
/// [`absorb`](Aggregator::absorb) decodes and checks a packed ranking and
/// adds its positions into per-edge integer sums in the same pass (a bad
/// payload found part-way is subtracted back out, so a refused update leaves
/// no trace); [`finish`](Aggregator::finish) orders each layer by its sums
/// ([`vote_order`]) into the new global ranking. Every accepted client is
/// one vote whatever its sample count (`num_samples` and `train_loss` only
/// feed the round's [`AggregateStats`]).
///
/// **The `global: &mut [f32]` of the trait.** FRL's global model is the
/// ranking, not floats. `finish` writes the new global *scores*
/// `S[G[j]] = s̄[j]` into `global` when `global.len()` equals the number of
/// ranked edges (a coordinator that keeps the score vector as its model), and
/// leaves `global` untouched for any other length (a coordinator that ships
/// [`FrlVote::global_ranking`] instead). `begin_round` ignores its `global`.
#[derive(Clone)]
pub struct FrlVote {
    cfg: FrlConfig,
    /// What clients are told ([`crate::wire::RunConfig::frl`]); `run.vote`
    /// equals `cfg`.
    run: FrlRun,
    offsets: Vec<usize>,
    /// `s̄`: each layer's initial scores, ascending, concatenated.
    sorted: Vec<f32>,
    global: Ranking,
    sums: Sums,
    /// Votes a u32 sum can take without overflow.
    narrow_votes: usize,
    /// The round's accepted clients: sample count and training loss.
    votes: BTreeMap<ClientIndex, (u64, f32)>,
    round: u32,
    /// Bitset scratch for the permutation check.
    seen: Vec<u64>,
    /// Radix sort buffers.
    scratch: SortScratch,
}

impl std::fmt::Debug for FrlVote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrlVote")
            .field("cfg", &self.cfg)
            .field("round", &self.round)
            .field("votes", &self.votes.len())
            .field("wide_sums", &matches!(self.sums, Sums::Wide(_)))
            .finish_non_exhaustive()
    }
}

impl FrlVote {
    /// A vote starting from the initial scores `S⁰` (all layers concatenated,
    /// as regenerated from the run seed): the initial global ranking is the
    /// ranking of `S⁰` and `s̄` its sorted values, both under `cfg.mask`
    /// (signed for [`MaskRule::TwoSided`], `|S⁰|` for
    /// [`MaskRule::OneSidedTopK`]).
    pub fn new(cfg: FrlConfig, initial_scores: &[f32]) -> Result<FrlVote, FrlError> {
        cfg.validate()?;
        let (global, sorted) = reference(&cfg, initial_scores)?;
        Ok(FrlVote::assemble(cfg, global, sorted))
    }

    /// A vote from a saved state: the global ranking and `s̄` (each layer's
    /// values ascending and finite), both over `cfg.layer_sizes`.
    pub fn from_parts(cfg: FrlConfig, global: Ranking, sorted_scores: Vec<f32>) -> Result<FrlVote, FrlError> {
        cfg.validate()?;
        if global.num_layers() != cfg.layer_sizes.len() {
            return Err(FrlError::WrongLayerCount { expected: cfg.layer_sizes.len(), got: global.num_layers() });
        }
        for (layer, (got, &expected)) in global.layer_sizes().zip(&cfg.layer_sizes).enumerate() {
            if got != expected {
                return Err(FrlError::WrongLayerSize { layer, expected, got });
            }
        }
        if sorted_scores.len() != global.num_edges() {
            return Err(FrlError::WrongLength {
                what: "sorted scores",
                expected: global.num_edges(),
                got: sorted_scores.len(),
            });
        }
        if let Some(index) = sorted_scores.iter().position(|s| !s.is_finite()) {
            return Err(FrlError::NonFiniteScore { index });
        }
        for w in global.offsets.windows(2) {
            if let Some(i) = sorted_scores[w[0]..w[1]].windows(2).position(|p| p[1] < p[0]) {
                return Err(FrlError::UnsortedScores { index: w[0] + i + 1 });
            }
        }
        Ok(FrlVote::assemble(cfg, global, sorted_scores))
    }

    fn assemble(cfg: FrlConfig, global: Ranking, sorted: Vec<f32>) -> FrlVote {
        let largest = cfg.layer_sizes.iter().copied().max().unwrap_or(1);
        let narrow_votes = if largest <= 1 { usize::MAX } else { u32::MAX as usize / (largest - 1) };
        let offsets = global.offsets.clone();
        let sums = Sums::Narrow(vec![0; global.num_edges()]);
        let run = FrlRun { vote: cfg.clone(), ..FrlRun::new(0, Vec::new()) };
        FrlVote {
            run,
            cfg,
            offsets,
            sorted,
            global,
            sums,
            narrow_votes,
            votes: BTreeMap::new(),
            round: 0,
            seen: Vec::new(),
            scratch: SortScratch::default(),
        }
    }

    /// The vote of an FRL run: the network of `arch` regenerated from
    /// `run.seed` gives the initial scores, hence the initial global ranking
    /// and `s̄`; clients are told `run`.
    pub fn for_run(run: FrlRun, arch: &crate::model::ModelArch) -> Result<FrlVote, FrlError> {
        run.validate(arch)?;
        let crate::model::ModelArch::Supermask(net) = arch else {
            return Err(FrlError::InvalidConfig("an FRL run needs a supermask model"));
        };
        let initial = crate::supermask::initial_scores(net, run.seed);
        let mut vote = FrlVote::new(run.vote.clone(), &initial)?;
        vote.run = run;
        Ok(vote)
    }

    /// The configuration.
    pub fn config(&self) -> &FrlConfig {
        &self.cfg
    }

    /// The run settings clients receive.
    pub fn run(&self) -> &FrlRun {
        &self.run
    }

    /// The current global ranking: what clients need to rebuild the global
    /// scores ([`Ranking::write_scores`] with `s̄`).
    pub fn global_ranking(&self) -> &Ranking {
        &self.global
    }

    /// `s̄`: each layer's sorted initial scores, concatenated.
    pub fn sorted_scores(&self) -> &[f32] {
        &self.sorted
    }

    /// The current global scores `S[G[j]] = s̄[j]`.
    pub fn global_scores(&self) -> Vec<f32> {
        let mut s = vec![0f32; self.sorted.len()];
        self.write_global_scores(&mut s);
        s
    }

    fn write_global_scores(&self, out: &mut [f32]) {
        for w in self.offsets.windows(2) {
            let dst = &mut out[w[0]..w[1]];
            for (&e, &s) in self.global.order[w[0]..w[1]].iter().zip(&self.sorted[w[0]..w[1]]) {
                dst[e as usize] = s;
            }
        }
    }

    /// Votes absorbed in the current round.
    pub fn votes(&self) -> usize {
        self.votes.len()
    }

    /// The positions of layer `l`'s global ranking whose edges the mask keeps,
    /// as a low range (most negative scores; empty for
    /// [`MaskRule::OneSidedTopK`]) and a high range, together
    /// [`FrlConfig::keep_count`] positions. For [`MaskRule::TwoSided`] these
    /// are the positions of the largest `|s̄[j]|` (the reference code's
    /// `TopFrac(|S|, k)`), taken from both ends of `s̄`; a tie in `|s̄|`
    /// between the two ends goes to the high (positive) end.
    ///
    /// # Panics
    /// If `l` is not a layer.
    pub fn kept_positions(&self, l: usize) -> [Range<usize>; 2] {
        let sorted = &self.sorted[self.offsets[l]..self.offsets[l + 1]];
        let n = sorted.len();
        let keep = self.cfg.keep_count(n);
        let low = match self.cfg.mask {
            MaskRule::OneSidedTopK => 0,
            MaskRule::TwoSided => {
                let (mut lo, mut hi) = (0usize, n);
                for _ in 0..keep {
                    if sorted[lo].abs() > sorted[hi - 1].abs() {
                        lo += 1;
                    } else {
                        hi -= 1;
                    }
                }
                lo
            }
        };
        [0..low, n - (keep - low)..n]
    }

    /// The global mask: for every edge (canonical flat order), whether the
    /// clients' forward pass keeps it under the current global ranking.
    pub fn mask(&self) -> Vec<bool> {
        let mut m = vec![false; self.global.num_edges()];
        for l in 0..self.global.num_layers() {
            let layer = self.global.layer(l);
            let dst = &mut m[self.offsets[l]..self.offsets[l + 1]];
            for r in self.kept_positions(l) {
                for &e in &layer[r] {
                    dst[e as usize] = true;
                }
            }
        }
        m
    }

    fn clear_sums(&mut self) {
        // Back to u32: a round's widening is for that round's vote count.
        let n = self.global.num_edges();
        match &mut self.sums {
            Sums::Narrow(s) => s.fill(0),
            Sums::Wide(_) => self.sums = Sums::Narrow(vec![0; n]),
        }
    }

    fn widen(&mut self) {
        if let Sums::Narrow(s) = &self.sums {
            self.sums = Sums::Wide(s.iter().map(|&v| u64::from(v)).collect());
        }
    }

    /// Checks a packed ranking and adds its positions to the sums; on error
    /// the sums are as before.
    fn add_packed(&mut self, bytes: &[u8]) -> Result<(), FrlError> {
        let blocks = split_blocks(bytes, &self.cfg.layer_sizes)?;
        match &mut self.sums {
            Sums::Narrow(s) => accumulate(&blocks, &self.offsets, s, &mut self.seen),
            Sums::Wide(s) => accumulate(&blocks, &self.offsets, s, &mut self.seen),
        }
    }
}

/// Adds every layer's positions (`sums[R[j]] += j`) while checking the
/// permutation; on a bad entry, subtracts what was added and fails.
fn accumulate<W: SumWord>(
    blocks: &[&[u8]],
    offsets: &[usize],
    sums: &mut [W],
    seen: &mut Vec<u64>,
) -> Result<(), FrlError> {
    for (layer, (block, w)) in blocks.iter().zip(offsets.windows(2)).enumerate() {
        let (n, dst) = (w[1] - w[0], &mut sums[w[0]..w[1]]);
        let bits = index_bits(n);
        seen.clear();
        seen.resize(n.div_ceil(64), 0);
        let mut dup = false;
        let stop = scan_block(block, n, bits, |j, v| match mark(seen, n, v) {
            Ok(()) => {
                dst[v as usize].add(j as u32);
                true
            }
            Err(d) => {
                dup = d;
                false
            }
        });
        if let Some(index) = stop {
            // Undo: the earlier layers in full, this one up to `index`. Their
            // entries were checked, so they index in range.
            for (l, (block, w)) in blocks.iter().zip(offsets.windows(2)).enumerate().take(layer + 1) {
                let (m, dst) = (w[1] - w[0], &mut sums[w[0]..w[1]]);
                let upto = if l == layer { index } else { m };
                scan_block(block, upto, index_bits(m), |j, v| {
                    dst[v as usize].sub(j as u32);
                    true
                });
            }
            return Err(if dup {
                FrlError::DuplicateIndex { layer, index }
            } else {
                FrlError::NotAPermutation { layer, index }
            });
        }
    }
    Ok(())
}

impl Aggregator for FrlVote {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Opens a round; `global` is not used (the state is the ranking).
    fn begin_round(&mut self, round: u32, _global: &[f32]) {
        self.round = round;
        if !self.votes.is_empty() {
            self.votes.clear();
            self.clear_sums();
        }
    }

    fn absorb(&mut self, client: ClientIndex, update: &ClientUpdate) -> Result<(), Misbehaviour> {
        check_common(update)?;
        let bytes = crate::kind::payload_of(update, ID, NAME)?;
        if self.votes.contains_key(&client) {
            // Sums can't take a vote back; the coordinator refuses duplicates
            // before this, so this only guards direct callers.
            return Err(Misbehaviour::Duplicate(self.round));
        }
        if self.votes.len() + 1 > self.narrow_votes {
            self.widen();
        }
        self.add_packed(bytes).map_err(bad_payload)?;
        self.votes.insert(client, (update.num_samples, update.train_loss));
        Ok(())
    }

    fn finish(&mut self, global: &mut [f32]) -> Result<AggregateStats, AggregateError> {
        if self.votes.is_empty() {
            return Err(AggregateError::Empty);
        }
        for w in self.offsets.windows(2) {
            let out = &mut self.global.order[w[0]..w[1]];
            match &self.sums {
                Sums::Narrow(s) => vote_order_into(&s[w[0]..w[1]], out, &mut self.scratch),
                Sums::Wide(s) => vote_order_into(&s[w[0]..w[1]], out, &mut self.scratch),
            }
        }
        if global.len() == self.sorted.len() {
            self.write_global_scores(global);
        }
        // Ascending client order: the float sums don't depend on arrival.
        let samples = self.votes.values().fold(0u64, |t, (n, _)| t.saturating_add(*n));
        let loss = self.votes.values().map(|(n, l)| *n as f64 * f64::from(*l)).sum::<f64>() / samples.max(1) as f64;
        let stats = AggregateStats { updates: self.votes.len(), samples, train_loss: loss };
        self.votes.clear();
        self.clear_sums();
        Ok(stats)
    }

    /// Rounds publish the global ranking, bit-packed.
    fn publish(&self, _global: &[f32]) -> ModelSync {
        ModelSync::Published(encode(&self.global))
    }

    /// The global ranking becomes the ranking of the restored scores. Edges
    /// with equal scores may come out in another order than before the
    /// restart; that changes neither the scores clients rebuild nor any
    /// later vote (which starts from the clients' rankings only).
    fn restore_model(&mut self, global: &[f32]) -> Result<(), StateError> {
        let model = |reason: String| StateError::Model { name: NAME, reason };
        let ranking =
            Ranking::from_scores(global, &self.cfg.layer_sizes, MaskRule::TwoSided).map_err(|e| model(e.to_string()))?;
        let mut scores = vec![0f32; global.len()];
        self.global = ranking;
        self.write_global_scores(&mut scores);
        if scores != global {
            return Err(model("not a permutation of the sorted initial scores".into()));
        }
        Ok(())
    }
}

/// Packs arbitrary (possibly invalid) layers as the encoder would: for
/// tests that need malformed payloads.
#[cfg(test)]
pub(crate) fn tests_pack_raw(layers: &[Vec<u32>]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in layers {
        pack_layer(l, index_bits(l.len()), &mut out);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::{Rng, SeedableRng};

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    fn shuffled(n: usize, rng: &mut ChaCha8Rng) -> Vec<u32> {
        let mut p: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            p.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        p
    }

    fn random_ranking(sizes: &[usize], rng: &mut ChaCha8Rng) -> Ranking {
        Ranking::new(sizes.iter().map(|&n| shuffled(n, rng)).collect(), sizes).unwrap()
    }

    /// Uniform in (−1, 1) from 24 random bits.
    fn uniform(rng: &mut ChaCha8Rng) -> f32 {
        (rng.next_u32() >> 8) as f32 / (1 << 23) as f32 - 1.0
    }

    /// Packs arbitrary (possibly invalid) layers as the encoder would.
    fn pack_raw(layers: &[Vec<u32>]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in layers {
            pack_layer(l, index_bits(l.len()), &mut out);
        }
        out
    }

    fn upd(bytes: Vec<u8>) -> ClientUpdate {
        ClientUpdate { num_samples: 10, train_loss: 0.5, payload: crate::wire::UpdatePayload { kind: ID, data: bytes } }
    }

    fn sums_of(v: &FrlVote) -> Vec<u64> {
        match &v.sums {
            Sums::Narrow(s) => s.iter().map(|&x| u64::from(x)).collect(),
            Sums::Wide(s) => s.clone(),
        }
    }

    /// Sorted scores `s̄` for `sizes`: random uniform values, sorted per layer.
    fn sorted_scores(sizes: &[usize], rng: &mut ChaCha8Rng) -> Vec<f32> {
        let mut out = Vec::new();
        for &n in sizes {
            let mut layer: Vec<f32> = (0..n).map(|_| uniform(rng)).collect();
            layer.sort_by(f32::total_cmp);
            out.extend(layer);
        }
        out
    }

    fn vote_with(cfg: FrlConfig, rng: &mut ChaCha8Rng) -> FrlVote {
        let sorted = sorted_scores(&cfg.layer_sizes, rng);
        let g = random_ranking(&cfg.layer_sizes, rng);
        FrlVote::from_parts(cfg, g, sorted).unwrap()
    }

    /// The reference vote: materialise every client's positions, sum them,
    /// `sort_by_key` (stable), assign `s̄`.
    fn reference_vote(sizes: &[usize], rankings: &[Ranking], sorted: &[f32]) -> (Vec<u32>, Vec<f32>) {
        let (mut order, mut scores, mut off) = (Vec::new(), Vec::new(), 0);
        for (l, &n) in sizes.iter().enumerate() {
            let mut v = vec![0u64; n];
            for r in rankings {
                for (e, p) in r.positions(l).into_iter().enumerate() {
                    v[e] += u64::from(p);
                }
            }
            assert_eq!(v.iter().sum::<u64>(), rankings.len() as u64 * (n as u64 * (n as u64 - 1) / 2));
            let mut g: Vec<u32> = (0..n as u32).collect();
            g.sort_by_key(|&e| v[e as usize]);
            let mut s = vec![0f32; n];
            for (j, &e) in g.iter().enumerate() {
                s[e as usize] = sorted[off + j];
            }
            order.extend(g);
            scores.extend(s);
            off += n;
        }
        (order, scores)
    }

    #[test]
    fn doc_example_packs_to_the_documented_bytes() {
        let r = Ranking::new(vec![vec![2, 0, 1], vec![4, 1, 3, 0, 2]], &[3, 5]).unwrap();
        let bytes = encode(&r);
        assert_eq!(bytes, vec![0x12, 0xcc, 0x20]);
        assert_eq!(decode(&bytes, &[3, 5]).unwrap(), r);
        assert_eq!(r.positions(1), vec![3, 1, 4, 2, 0]);
    }

    #[test]
    fn widths_and_lengths() {
        assert_eq!([1, 2, 3, 4, 5, 1024, 1025].map(index_bits), [0, 1, 2, 2, 3, 10, 11]);
        assert_eq!(MAX_INDEX_BITS, 24);
        // §1.12: a LeNet ranking is 4.25 MB (20.9 bits per edge).
        let len = packed_len(&LENET_MNIST_LAYER_SIZES).unwrap();
        assert_eq!(len, 324 + 34_560 + 4_214_784 + 1_760);
        assert_eq!(LENET_MNIST_LAYER_SIZES.iter().sum::<usize>(), 1_625_632);
        // A layer of one edge takes no bytes and decodes to [0].
        let r = decode(&[], &[1]).unwrap();
        assert_eq!(r.layer(0), &[0]);
        assert_eq!(encode(&r), Vec::<u8>::new());
        assert_eq!(packed_len(&[]), Err(FrlError::BadLayerCount { got: 0, limit: MAX_RANKED_LAYERS }));
        assert_eq!(packed_len(&[3, 0]), Err(FrlError::EmptyLayer { layer: 1 }));
        assert_eq!(
            packed_len(&[MAX_RANKED_EDGES, 1]),
            Err(FrlError::TooManyEdges { got: MAX_RANKED_EDGES + 1, limit: MAX_RANKED_EDGES })
        );
        assert!(packed_len(&[usize::MAX, usize::MAX]).is_err());
        assert!(packed_len(&vec![1; MAX_RANKED_LAYERS + 1]).is_err());
    }

    #[test]
    fn checked_constructor_refuses_each_invalid_shape() {
        let sizes = [3, 4];
        let ok = vec![vec![0, 1, 2], vec![3, 2, 1, 0]];
        assert!(Ranking::new(ok.clone(), &sizes).is_ok());
        assert_eq!(Ranking::new(vec![vec![0, 1, 2]], &sizes), Err(FrlError::WrongLayerCount { expected: 2, got: 1 }));
        assert_eq!(
            Ranking::new(vec![vec![0, 1, 2], vec![0, 1, 2]], &sizes),
            Err(FrlError::WrongLayerSize { layer: 1, expected: 4, got: 3 })
        );
        assert_eq!(
            Ranking::new(vec![vec![0, 1, 2], vec![3, 4, 1, 0]], &sizes),
            Err(FrlError::NotAPermutation { layer: 1, index: 1 })
        );
        assert_eq!(
            Ranking::new(vec![vec![0, 2, 2], vec![3, 2, 1, 0]], &sizes),
            Err(FrlError::DuplicateIndex { layer: 0, index: 2 })
        );
        assert_eq!(Ranking::from_flat(vec![0, 1, 2, 3, 2, 1, 0], &sizes).unwrap(), Ranking::new(ok, &sizes).unwrap());
        assert!(matches!(Ranking::from_flat(vec![0, 1, 2], &sizes), Err(FrlError::WrongLength { .. })));
        assert_eq!(
            Ranking::from_flat(vec![0, 1, 2, 3, 2, 1, 1], &sizes),
            Err(FrlError::DuplicateIndex { layer: 1, index: 3 })
        );
    }

    #[test]
    fn ranking_of_scores_is_ascending_with_index_ties() {
        let s = [0.5, -1.0, 0.5, 0.0, -0.0, 2.0, -3.0];
        let signed = Ranking::from_scores(&s, &[5, 2], MaskRule::TwoSided).unwrap();
        assert_eq!(signed.layer(0), &[1, 4, 3, 0, 2]); // -1, -0, +0, 0.5 (index 0 first), 0.5
        assert_eq!(signed.layer(1), &[1, 0]);
        let magnitude = Ranking::from_scores(&s, &[5, 2], MaskRule::OneSidedTopK).unwrap();
        assert_eq!(magnitude.layer(0), &[3, 4, 0, 2, 1]);
        assert_eq!(magnitude.layer(1), &[0, 1]);
        assert_eq!(
            Ranking::from_scores(&[0.0, f32::NAN], &[2], MaskRule::TwoSided),
            Err(FrlError::NonFiniteScore { index: 1 })
        );
        // Big enough for the radix path, with many ties: matches a stable sort.
        let mut r = rng(4);
        let s: Vec<f32> = (0..20_000).map(|_| (uniform(&mut r) * 50.0).round() / 7.0).collect();
        let got = Ranking::from_scores(&s, &[20_000], MaskRule::TwoSided).unwrap();
        let mut want: Vec<u32> = (0..20_000).collect();
        want.sort_by(|&a, &b| s[a as usize].total_cmp(&s[b as usize]));
        assert_eq!(got.layer(0), &want[..]);
        // write_scores inverts from_scores on s̄ = sorted(s).
        let mut sorted = s.clone();
        sorted.sort_by(f32::total_cmp);
        let mut back = vec![0f32; s.len()];
        got.write_scores(&sorted, &mut back).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn vote_order_is_the_stable_argsort() {
        let mut r = rng(7);
        for (n, range) in [(10, 3), (5_000, 1), (5_000, 40), (70_000, 1 << 26), (70_000, u64::MAX >> 1), (70_000, 0)] {
            let keys: Vec<u64> = (0..n).map(|_| if range == 0 { 0 } else { r.next_u64() % range }).collect();
            // The same keys far from zero: the high digits are constant and
            // their passes are skipped.
            let offset: Vec<u64> = keys.iter().map(|k| k + (5 << 40)).collect();
            assert_eq!(vote_order(&offset), vote_order(&keys));
            let mut want: Vec<u32> = (0..n as u32).collect();
            want.sort_by_key(|&i| keys[i as usize]);
            assert_eq!(vote_order(&keys), want, "n={n} range={range}");
            if range <= u64::from(u32::MAX) {
                let narrow: Vec<u32> = keys.iter().map(|&k| k as u32).collect();
                assert_eq!(vote_order(&narrow), want);
            }
        }
    }

    #[test]
    fn streaming_vote_matches_the_reference() {
        let mut r = rng(11);
        for (case, sizes) in [vec![7], vec![1, 2, 300], vec![5_000, 33, 9_000]].into_iter().enumerate() {
            for m in [1usize, 2, 5, 25] {
                let cfg = FrlConfig::new(sizes.clone());
                let mut vote = vote_with(cfg, &mut r);
                let rankings: Vec<Ranking> = (0..m).map(|_| random_ranking(&sizes, &mut r)).collect();
                vote.begin_round(1, &[]);
                for (c, rk) in rankings.iter().enumerate() {
                    vote.absorb(c as u32, &upd(encode(rk))).unwrap();
                }
                let mut scores = vec![0f32; vote.sorted_scores().len()];
                let stats = vote.finish(&mut scores).unwrap();
                assert_eq!(stats.updates, m);
                let (order, want_scores) = reference_vote(&sizes, &rankings, vote.sorted_scores());
                assert_eq!(vote.global_ranking().as_flat(), &order[..], "case {case}, m={m}");
                assert_eq!(scores, want_scores);
                assert_eq!(vote.global_scores(), want_scores);
                // New scores are a permutation of s̄, layer by layer.
                for w in vote.offsets.windows(2) {
                    let mut s = scores[w[0]..w[1]].to_vec();
                    s.sort_by(f32::total_cmp);
                    assert_eq!(s, vote.sorted_scores()[w[0]..w[1]]);
                }
                // The sums were cleared for the next round.
                assert!(sums_of(&vote).iter().all(|&v| v == 0));
            }
        }
    }

    #[test]
    fn identical_rankings_come_back_unchanged() {
        let mut r = rng(12);
        let sizes = [300, 5_000];
        let mut vote = vote_with(FrlConfig::new(sizes.to_vec()), &mut r);
        let rk = random_ranking(&sizes, &mut r);
        vote.begin_round(1, &[]);
        for c in 0..9 {
            vote.absorb(c, &upd(encode(&rk))).unwrap();
        }
        vote.finish(&mut []).unwrap();
        assert_eq!(vote.global_ranking(), &rk);
    }

    #[test]
    fn widened_sums_give_the_same_vote() {
        let mut r = rng(13);
        let sizes = [4_500, 17];
        let rankings: Vec<Ranking> = (0..6).map(|_| random_ranking(&sizes, &mut r)).collect();
        let base = vote_with(FrlConfig::new(sizes.to_vec()), &mut r);
        let run = |narrow_votes: usize| {
            let mut v = base.clone();
            v.narrow_votes = narrow_votes;
            v.begin_round(1, &[]);
            for (c, rk) in rankings.iter().enumerate() {
                v.absorb(c as u32, &upd(encode(rk))).unwrap();
            }
            let wide = matches!(v.sums, Sums::Wide(_));
            v.finish(&mut []).unwrap();
            assert!(matches!(v.sums, Sums::Narrow(_)), "back to u32 after the round");
            (wide, v.global.clone())
        };
        let (wide_a, a) = run(usize::MAX);
        let (wide_b, b) = run(3);
        assert!(!wide_a && wide_b);
        assert_eq!(a, b);
        assert_eq!(a.as_flat(), &reference_vote(&sizes, &rankings, base.sorted_scores()).0[..]);
    }

    #[test]
    fn arrival_order_does_not_matter() {
        let mut r = rng(14);
        let sizes = [600, 4_200];
        let base = vote_with(FrlConfig::new(sizes.to_vec()), &mut r);
        let updates: Vec<(u32, ClientUpdate)> = (0..12)
            .map(|c| {
                let mut u = upd(encode(&random_ranking(&sizes, &mut r)));
                u.num_samples = 1 + c as u64 * 7;
                u.train_loss = 0.1 + c as f32 / 3.0;
                (c * 5 + 1, u)
            })
            .collect();
        let run = |perm: &[u32]| {
            let mut v = base.clone();
            v.begin_round(2, &[]);
            for &i in perm {
                let (c, u) = &updates[i as usize];
                v.absorb(*c, u).unwrap();
            }
            let mut s = vec![0f32; v.sorted_scores().len()];
            let stats = v.finish(&mut s).unwrap();
            (v.global.clone(), s.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), stats.train_loss.to_bits())
        };
        let first = run(&(0..12).collect::<Vec<_>>());
        for seed in 0..5 {
            assert_eq!(run(&shuffled(12, &mut rng(100 + seed))), first);
        }
    }

    #[test]
    fn malformed_rankings_are_refused_and_leave_no_trace() {
        let mut r = rng(15);
        let sizes = [5, 300, 6_000]; // 3, 9 and 13 bits: every layer has padding
        let base = vote_with(FrlConfig::new(sizes.to_vec()), &mut r);
        let good_a = random_ranking(&sizes, &mut r);
        let good_b = random_ranking(&sizes, &mut r);
        let raw: Vec<Vec<u32>> = good_b.layers().map(<[u32]>::to_vec).collect();
        let full = packed_len(&sizes).unwrap();
        let with = |f: &dyn Fn(&mut Vec<Vec<u32>>)| {
            let mut l = raw.clone();
            f(&mut l);
            pack_raw(&l)
        };
        let mut padded = encode(&good_b);
        // The last byte of layer 1's block: 300 × 9 bits = 337.5 bytes.
        padded[packed_len(&sizes[..2]).unwrap() - 1] |= 0x80;
        let cases: Vec<(Vec<u8>, FrlError)> = vec![
            (encode(&good_b)[..full - 1].to_vec(), FrlError::Truncated { expected: full, got: full - 1 }),
            (vec![], FrlError::Truncated { expected: full, got: 0 }),
            ([encode(&good_b), vec![0]].concat(), FrlError::TrailingBytes { extra: 1 }),
            (padded, FrlError::NonZeroPadding { layer: 1 }),
            // Out of range in the last layer, late: layers 0 and 1 and most of
            // layer 2 were already added and must be taken back out.
            (with(&|l| l[2][5_990] = 6_000), FrlError::NotAPermutation { layer: 2, index: 5_990 }),
            (with(&|l| l[0][0] = 7), FrlError::NotAPermutation { layer: 0, index: 0 }),
            (
                with(&|l| {
                    let v = l[1][3];
                    l[1][200] = v;
                }),
                FrlError::DuplicateIndex { layer: 1, index: 200 },
            ),
            // A ranking for other layer sizes: the length no longer matches.
            (
                encode(&random_ranking(&[5, 300, 5_999], &mut r)),
                FrlError::Truncated { expected: full, got: packed_len(&[5, 300, 5_999]).unwrap() },
            ),
        ];
        let mut control = base.clone();
        control.begin_round(1, &[]);
        control.absorb(0, &upd(encode(&good_a))).unwrap();
        control.absorb(2, &upd(encode(&good_b))).unwrap();

        let mut v = base.clone();
        v.begin_round(1, &[]);
        v.absorb(0, &upd(encode(&good_a))).unwrap();
        let before = sums_of(&v);
        for (bytes, want) in cases {
            assert_eq!(decode(&bytes, &sizes), Err(want.clone()));
            assert_eq!(v.absorb(1, &upd(bytes)), Err(bad_payload(want.clone())), "{want}");
            assert_eq!(sums_of(&v), before, "{want}: sums changed");
            assert_eq!(v.votes(), 1);
        }
        // Wrong kind, bad sample count and a duplicate client are refused too.
        let dense = ClientUpdate {
            num_samples: 1,
            train_loss: 0.0,
            payload: crate::fedavg::encode_delta(crate::fedavg::ID, &[0.0]),
        };
        assert!(matches!(v.absorb(1, &dense), Err(Misbehaviour::KindMismatch { .. })));
        let mut zero = upd(encode(&good_b));
        zero.num_samples = 0;
        assert_eq!(v.absorb(1, &zero), Err(Misbehaviour::BadSampleCount(0)));
        assert_eq!(v.absorb(0, &upd(encode(&good_b))), Err(Misbehaviour::Duplicate(1)));
        assert_eq!(sums_of(&v), before);
        v.absorb(2, &upd(encode(&good_b))).unwrap();
        assert_eq!(v.finish(&mut []).unwrap(), control.finish(&mut []).unwrap());
        assert_eq!(v.global_ranking(), control.global_ranking());
    }

    #[test]
    fn finish_without_votes_keeps_everything() {
        let mut r = rng(16);
        let mut v = vote_with(FrlConfig::new(vec![10, 20]), &mut r);
        let before = v.global_ranking().clone();
        let mut g = vec![7.0f32; 30];
        v.begin_round(1, &g);
        assert_eq!(v.finish(&mut g), Err(AggregateError::Empty));
        assert_eq!(g, vec![7.0f32; 30]);
        assert_eq!(v.global_ranking(), &before);
        // A `global` of another length is left alone on success too.
        let rk = random_ranking(&[10, 20], &mut r);
        v.absorb(3, &upd(encode(&rk))).unwrap();
        let mut other = vec![7.0f32; 4];
        v.finish(&mut other).unwrap();
        assert_eq!(other, vec![7.0f32; 4]);
        assert_eq!(v.global_ranking(), &rk);
    }

    #[test]
    fn reject_codes() {
        let code = |e: FrlError| crate::Error::from(bad_payload(e)).reject_code();
        use crate::wire::RejectCode;
        assert_eq!(code(FrlError::DuplicateIndex { layer: 0, index: 1 }), Some(RejectCode::NotAPermutation));
        assert_eq!(code(FrlError::NotAPermutation { layer: 0, index: 1 }), Some(RejectCode::NotAPermutation));
        assert_eq!(code(FrlError::NonZeroPadding { layer: 0 }), Some(RejectCode::NotAPermutation));
        assert_eq!(code(FrlError::TrailingBytes { extra: 1 }), Some(RejectCode::WrongShape));
        assert_eq!(code(FrlError::Truncated { expected: 2, got: 1 }), Some(RejectCode::WrongShape));
    }

    #[test]
    fn masks_keep_the_configured_count() {
        // s̄ symmetric around 0: the two-sided mask keeps both ends equally.
        let n = 1_001;
        let sorted: Vec<f32> = (0..n).map(|j| j as f32 - 500.0).collect();
        let cfg = FrlConfig::new(vec![n]);
        let v = FrlVote::from_parts(cfg.clone(), Ranking::identity(&[n]).unwrap(), sorted.clone()).unwrap();
        let keep = n - (0.5 * n as f64) as usize;
        assert_eq!(keep, 501);
        let [low, high] = v.kept_positions(0);
        assert_eq!(low.len() + high.len(), keep);
        assert_eq!((low, high), (0..250, 750..n)); // ties |−250| = |250| go high
        let mask = v.mask();
        assert_eq!(mask.iter().filter(|&&k| k).count(), keep);
        assert!(mask[0] && mask[n - 1] && !mask[500]);
        // The mask is exactly TopFrac(|S|): the kept |S| all exceed the dropped.
        let s = v.global_scores();
        let kept_min = s.iter().zip(&mask).filter(|p| *p.1).map(|p| p.0.abs()).fold(f32::MAX, f32::min);
        let dropped_max = s.iter().zip(&mask).filter(|p| !*p.1).map(|p| p.0.abs()).fold(0.0, f32::max);
        assert!(kept_min >= dropped_max);
        // One-sided: the top positions.
        let one = FrlConfig { mask: MaskRule::OneSidedTopK, k_fraction: 0.3, ..cfg };
        let v = FrlVote::from_parts(one, Ranking::identity(&[n]).unwrap(), sorted).unwrap();
        assert_eq!(v.kept_positions(0), [0..0, n - (n - (0.7 * n as f64) as usize)..n]);
        // Config checks.
        let bad = |k: f64| FrlConfig { k_fraction: k, ..FrlConfig::new(vec![3]) }.validate().is_err();
        assert!(bad(0.0) && bad(1.5) && bad(f64::NAN) && !bad(1.0));
    }

    #[test]
    fn new_derives_ranking_and_sorted_scores_from_initial_scores() {
        let s0 = [0.3, -0.7, 0.1, -0.2, 0.9];
        let v = FrlVote::new(FrlConfig::new(vec![3, 2]), &s0).unwrap();
        assert_eq!(v.global_ranking().as_flat(), &[1, 2, 0, 0, 1]);
        assert_eq!(v.sorted_scores(), &[-0.7, 0.1, 0.3, -0.2, 0.9]);
        assert_eq!(v.global_scores(), s0);
        let one = FrlConfig { mask: MaskRule::OneSidedTopK, ..FrlConfig::new(vec![3, 2]) };
        let v = FrlVote::new(one, &s0).unwrap();
        assert_eq!(v.global_ranking().as_flat(), &[2, 0, 1, 0, 1]);
        assert_eq!(v.sorted_scores(), &[0.1, 0.3, 0.7, 0.2, 0.9]);
        assert!(matches!(FrlVote::new(FrlConfig::new(vec![3, 3]), &s0), Err(FrlError::WrongLength { .. })));
        let unsorted =
            FrlVote::from_parts(FrlConfig::new(vec![3]), Ranking::identity(&[3]).unwrap(), vec![0.0, 2.0, 1.0]);
        assert_eq!(unsorted.err(), Some(FrlError::UnsortedScores { index: 2 }));
    }

    /// §1.7: every malicious client submits the reversed consensus of the
    /// attackers' own benign rankings. With 20% malicious (5 of 25) the
    /// honest consensus mask survives; a malicious majority would flip the
    /// one-sided mask (which is why FRL resamples rounds with ≥ m/2).
    #[test]
    fn reversal_attack_with_20_percent_malicious_preserves_the_consensus() {
        let mut r = rng(17);
        let sizes = [1_000, 4_000];
        let total: usize = sizes.iter().sum();
        let truth: Vec<f32> = (0..total).map(|_| uniform(&mut r)).collect();
        // Client scores are truth + U(−0.5, 0.5): clients that mostly agree.
        // (Measured with this seed, overlap with 20% malicious vs the floor of
        // swapping 5 honest clients: ±0.25 → 0.989/0.988 two-sided,
        // 0.989/0.990 one-sided; ±1.5 → 0.835/0.926 and 0.683/0.866: the
        // more the honest clients disagree, the more the reversal bites.)
        let noise = 0.5f32;
        let benign = |r: &mut ChaCha8Rng| {
            let s: Vec<f32> = truth.iter().map(|t| t + noise * uniform(r)).collect();
            s
        };
        let honest: Vec<Vec<f32>> = (0..25).map(|_| benign(&mut r)).collect();
        let pool: Vec<Vec<f32>> = (0..25).map(|_| benign(&mut r)).collect();
        let s0: Vec<f32> = (0..total).map(|_| uniform(&mut r)).collect();
        for rule in [MaskRule::TwoSided, MaskRule::OneSidedTopK] {
            let cfg = FrlConfig { mask: rule, ..FrlConfig::new(sizes.to_vec()) };
            let rank = |s: &[f32]| Ranking::from_scores(s, &sizes, rule).unwrap();
            // The attackers' reversed consensus: order edges by Σ positions,
            // descending.
            let mut a = vec![0u64; total];
            for s in &pool {
                let rk = rank(s);
                for l in 0..sizes.len() {
                    let off: usize = sizes[..l].iter().sum();
                    for (e, p) in rk.positions(l).into_iter().enumerate() {
                        a[off + e] += u64::from(p);
                    }
                }
            }
            let mut mal = Vec::new();
            let mut off = 0;
            for &n in &sizes {
                let mut order = vote_order(&a[off..off + n]);
                order.reverse();
                mal.extend(order);
                off += n;
            }
            let mal = encode(&Ranking::from_flat(mal, &sizes).unwrap());
            let run = |honest_n: usize, malicious: usize| {
                let mut v = FrlVote::new(cfg.clone(), &s0).unwrap();
                v.begin_round(1, &[]);
                for (c, s) in honest.iter().take(honest_n).enumerate() {
                    v.absorb(c as u32, &upd(encode(&rank(s)))).unwrap();
                }
                for c in 0..malicious {
                    v.absorb(100 + c as u32, &upd(mal.clone())).unwrap();
                }
                v.finish(&mut []).unwrap();
                v.mask()
            };
            let overlap = |a: &[bool], b: &[bool]| {
                let both = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
                both as f64 / a.iter().filter(|x| **x).count() as f64
            };
            let consensus = run(20, 0);
            // The noise floor: the same round with 5 more honest clients.
            let floor = overlap(&consensus, &run(25, 0));
            let kept = overlap(&consensus, &run(20, 5));
            let lost = overlap(&consensus, &run(5, 20));
            eprintln!(
                "{rule:?}: mask overlap with the honest consensus: 5 more honest {floor:.3}, 5 malicious {kept:.3}, 20 malicious {lost:.3}"
            );
            assert!(kept >= 0.95 && kept >= floor - 0.03, "{rule:?}: overlap {kept}, floor {floor}");
            match rule {
                // Reversal maps the ends onto the ends: the two-sided mask
                // hardly notices even a malicious majority.
                MaskRule::TwoSided => assert!(lost > 0.85, "{lost}"),
                MaskRule::OneSidedTopK => assert!(lost < 0.2, "a malicious majority flips the one-sided mask: {lost}"),
            }
        }
    }

    fn sizes_and_seed() -> impl Strategy<Value = (Vec<usize>, u64)> {
        (proptest::collection::vec(1usize..300, 1..5), any::<u64>())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn round_trip((sizes, seed) in sizes_and_seed()) {
            let rk = random_ranking(&sizes, &mut rng(seed));
            let bytes = encode(&rk);
            prop_assert_eq!(bytes.len(), packed_len(&sizes).unwrap());
            prop_assert_eq!(decode(&bytes, &sizes).unwrap(), rk);
        }

        /// Every single-bit flip is refused: a bit is either padding or part of
        /// an entry, and changing one entry of a permutation breaks it.
        #[test]
        fn every_bit_flip_is_refused((sizes, seed) in sizes_and_seed(), pick in any::<usize>()) {
            let mut bytes = encode(&random_ranking(&sizes, &mut rng(seed)));
            prop_assume!(!bytes.is_empty());
            let bit = pick % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let err = decode(&bytes, &sizes).unwrap_err();
            prop_assert!(err.is_permutation_error(), "{:?}", err);
        }

        #[test]
        fn truncated_and_trailing_are_refused((sizes, seed) in sizes_and_seed(), cut in any::<usize>(), extra in proptest::collection::vec(any::<u8>(), 1..9)) {
            let bytes = encode(&random_ranking(&sizes, &mut rng(seed)));
            let len = bytes.len();
            if len > 0 {
                let k = cut % len;
                prop_assert_eq!(decode(&bytes[..k], &sizes), Err(FrlError::Truncated { expected: len, got: k }));
            }
            let longer = [bytes, extra.clone()].concat();
            prop_assert_eq!(decode(&longer, &sizes), Err(FrlError::TrailingBytes { extra: extra.len() }));
        }

        #[test]
        fn bad_entries_are_refused_with_their_position((sizes, seed) in sizes_and_seed(), l in any::<usize>(), i in any::<usize>(), h in any::<usize>()) {
            let rk = random_ranking(&sizes, &mut rng(seed));
            let layers: Vec<Vec<u32>> = rk.layers().map(<[u32]>::to_vec).collect();
            let l = l % sizes.len();
            let n = sizes[l];
            prop_assume!(n >= 2);
            let (i, h) = (1 + i % (n - 1), h % (n - 1));
            let h = h.min(i - 1);
            // A repeat of an earlier entry.
            let mut dup = layers.clone();
            dup[l][i] = dup[l][h];
            prop_assert_eq!(decode(&pack_raw(&dup), &sizes), Err(FrlError::DuplicateIndex { layer: l, index: i }));
            prop_assert_eq!(Ranking::new(dup, &sizes), Err(FrlError::DuplicateIndex { layer: l, index: i }));
            // An entry past the layer, when the width can hold one.
            let width_max = (1u64 << index_bits(n)) - 1;
            if width_max >= n as u64 {
                let mut out = layers.clone();
                out[l][i] = n as u32 + (seed % (width_max - n as u64 + 1)) as u32;
                prop_assert_eq!(decode(&pack_raw(&out), &sizes), Err(FrlError::NotAPermutation { layer: l, index: i }));
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), sizes in proptest::collection::vec(0usize..400, 0..4)) {
            let _ = decode(&bytes, &sizes);
            // And with the exact length, so the permutation checks run.
            if let Ok(len) = packed_len(&sizes) {
                let mut exact = bytes.clone();
                exact.resize(len, 0xa5);
                let _ = decode(&exact, &sizes);
            }
        }
    }
}
