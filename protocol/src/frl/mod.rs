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
//!
//! # Where things are
//!
//! * `config.rs`: [`FrlConfig`], [`FrlRun`], [`MaskRule`], [`keep_count`],
//!   [`check_layer_sizes`] and the limits ([`MAX_RANKED_EDGES`], ...).
//! * `ranking.rs`: [`Ranking`], and how scores become a ranking
//!   ([`rank_layer`], [`Ranking::from_scores`], [`signed_key`],
//!   [`magnitude_key`]); the kernels' clients rank through these.
//! * `packing.rs`: the wire format ([`encode`], [`decode`], [`packed_len`]).
//! * `sort.rs`: the stable radix argsort ([`vote_order`]).
//! * `cache.rs`: the reference values `s̄` ([`reference()`], [`ReferenceCache`]).
//! * `vote.rs`: the vote ([`FrlVote`]); `aggregator.rs`: its
//!   [`Aggregator`] implementation.
//! * `error.rs`: [`FrlError`].
//! * `dp.rs`: private FRL ([`dp`], kind `frl-dp`): approval bitsets and
//!   the mask released through continual DP top-k.
//! * `kind.rs`: FRL as an update kind ([`FrlKind`], [`FrlSpec`]): settings,
//!   payload faults, the published global ranking.

#[cfg(doc)]
use crate::aggregate::Aggregator;

mod aggregator;
mod cache;
mod config;
pub mod dp;
mod error;
mod kind;
mod packing;
mod ranking;
mod sort;
mod vote;

pub use cache::{ReferenceCache, reference};
pub use config::{
    FrlConfig, FrlRun, LENET_MNIST_LAYER_SIZES, MAX_INDEX_BITS, MAX_RANKED_EDGES, MAX_RANKED_LAYERS, MaskRule,
    check_layer_sizes, keep_count,
};
pub use error::FrlError;
pub use kind::{FrlKind, FrlSpec, ID, NAME, bad_payload, payload};
#[cfg(test)]
pub(crate) use packing::tests_pack_raw;
pub use packing::{decode, encode, index_bits, packed_len};
pub use ranking::{Ranking, magnitude_key, rank_layer, rank_value, signed_key};
pub use sort::vote_order;
pub use vote::FrlVote;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
