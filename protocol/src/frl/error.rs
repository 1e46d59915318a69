//! Why FRL refused a ranking, a payload or a configuration.

#[cfg(doc)]
use super::{MAX_RANKED_EDGES, MAX_RANKED_LAYERS, packed_len};

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
