//! Rankings: [`Ranking`] (checked per-layer permutations), and the one
//! definition of how scores become a ranking ([`rank_layer`],
//! [`Ranking::from_scores`]), which every client's ranking uses.

use super::sort::{SortScratch, vote_order_into};
use super::{FrlError, MaskRule, check_layer_sizes};

/// `[0, n_0, n_0 + n_1, ...]`: where each layer starts in flat order.
pub(super) fn offsets_of(layer_sizes: &[usize]) -> Vec<usize> {
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
    pub(super) order: Vec<u32>,
    /// `offsets[l]..offsets[l + 1]` is layer `l` in `order`.
    pub(super) offsets: Vec<usize>,
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
pub(super) fn mark(seen: &mut [u64], n: usize, v: u32) -> Result<(), bool> {
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
    /// order): each layer ranked by [`rank_layer`] (ascending signed score
    /// for [`MaskRule::TwoSided`], `Find_rank` of the reference code, or
    /// ascending `|score|` for [`MaskRule::OneSidedTopK`]; ties by edge
    /// index; `−0.0` equal to `+0.0`). NaN and infinities are refused.
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
            rank_layer_into(&scores[w[0]..w[1]], rule, &mut keys, &mut order[w[0]..w[1]], &mut scratch);
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

// ---------------------------------------------------------------------------
// Scores to ranking: the one definition (server and clients)
// ---------------------------------------------------------------------------

/// The ranking key of a signed score: a u32 whose unsigned order is the
/// numeric order of `s`, with `−0.0` and `+0.0` equal (PyTorch's sort compares
/// them equal too). NaN maps above `+∞` (a ranking refuses NaN before).
#[inline]
pub fn signed_key(s: f32) -> u32 {
    let b = if s == 0.0 { 0 } else { s.to_bits() };
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

/// The ranking key of `|s|`: the bits of `|s|`, whose unsigned order is the
/// numeric order of `|s|` (both zeros are 0; NaN maps above `+∞`).
#[inline]
pub fn magnitude_key(s: f32) -> u32 {
    s.to_bits() & 0x7fff_ffff
}

/// The value a score is ranked by under `rule`: `s` for
/// [`MaskRule::TwoSided`], `|s|` for [`MaskRule::OneSidedTopK`]. Its sorted
/// initial values are a run's `s̄` ([`super::reference`]).
#[inline]
pub fn rank_value(s: f32, rule: MaskRule) -> f32 {
    match rule {
        MaskRule::TwoSided => s,
        MaskRule::OneSidedTopK => s.abs(),
    }
}

/// One layer's ranking (`Find_rank`): the stable ascending argsort of the
/// layer's scores under `rule`, i.e. edge indices in ascending order of
/// [`rank_value`], ties (including `−0.0` against `+0.0`) by ascending edge
/// index. `R[0]` is the lowest edge. Scores should be finite: this does not
/// check (NaN sorts above everything); [`Ranking::from_scores`] refuses them.
///
/// # Panics
/// If `scores.len() > u32::MAX`.
pub fn rank_layer(scores: &[f32], rule: MaskRule) -> Vec<u32> {
    let mut out = vec![0u32; scores.len()];
    rank_layer_into(scores, rule, &mut Vec::new(), &mut out, &mut SortScratch::default());
    out
}

/// [`rank_layer`] into `out`, with the key buffer and the sort's scratch
/// supplied by the caller (reused across layers).
fn rank_layer_into(scores: &[f32], rule: MaskRule, keys: &mut Vec<u32>, out: &mut [u32], scratch: &mut SortScratch) {
    keys.clear();
    match rule {
        MaskRule::TwoSided => keys.extend(scores.iter().map(|&s| signed_key(s))),
        MaskRule::OneSidedTopK => keys.extend(scores.iter().map(|&s| magnitude_key(s))),
    }
    vote_order_into(keys, out, scratch);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Signed zeros are one value and ties go by edge index, in both modes;
    /// the result is the stable sort under `partial_cmp` (which has
    /// `−0.0 == +0.0`), not under `total_cmp` (which has `−0.0 < +0.0`).
    #[test]
    fn signed_zeros_are_equal_and_ties_go_by_index() {
        //            0     1    2     3     4    5     6     7
        let s = [0.0f32, -0.0, 0.5, -0.0, -0.5, 0.0, -1.0, 0.5];
        // Signed: −1, −0.5, then the four zeros in index order, then 0.5, 0.5.
        assert_eq!(rank_layer(&s, MaskRule::TwoSided), [6, 4, 0, 1, 3, 5, 2, 7]);
        // Magnitude: the four zeros, then |±0.5| in index order, then 1.
        assert_eq!(rank_layer(&s, MaskRule::OneSidedTopK), [0, 1, 3, 5, 2, 4, 7, 6]);
        // A zero of either sign first: still index order.
        let z = [-0.0f32, 0.0, -0.0, 0.0];
        for rule in [MaskRule::TwoSided, MaskRule::OneSidedTopK] {
            assert_eq!(rank_layer(&z, rule), [0, 1, 2, 3], "{rule:?}");
            assert_eq!(rank_layer(&[0.0, -0.0], rule), [0, 1], "{rule:?}");
        }
        assert_eq!(signed_key(-0.0), signed_key(0.0));
        assert_eq!(magnitude_key(-0.0), magnitude_key(0.0));
        // The same through the checked constructor, across layers.
        let r = Ranking::from_scores(&[0.0, -0.0, -0.0, 0.0, 1.0], &[2, 3], MaskRule::TwoSided).unwrap();
        assert_eq!(r.layer(0), &[0, 1]);
        assert_eq!(r.layer(1), &[0, 1, 2]);
        // Big enough for the radix path (≥ 4096 keys), mostly zeros of both
        // signs: equals the stable sort by `partial_cmp`.
        let big: Vec<f32> = (0..10_000u32)
            .map(|i| match i.wrapping_mul(2_654_435_761) >> 29 {
                0 | 1 => 0.0,
                2 | 3 => -0.0,
                4 => 0.25,
                5 => -0.25,
                6 => f32::MIN_POSITIVE,
                _ => -f32::MIN_POSITIVE,
            })
            .collect();
        for rule in [MaskRule::TwoSided, MaskRule::OneSidedTopK] {
            let mut want: Vec<u32> = (0..big.len() as u32).collect();
            want.sort_by(|&a, &b| {
                let (a, b) = (rank_value(big[a as usize], rule), rank_value(big[b as usize], rule));
                a.partial_cmp(&b).unwrap()
            });
            assert_eq!(rank_layer(&big, rule), want, "{rule:?}");
            assert_eq!(Ranking::from_scores(&big, &[big.len()], rule).unwrap().layer(0), &want[..]);
        }
    }
}
