//! The server's vote ([`FrlVote`]): per-edge position sums folded in as
//! rankings arrive, ordered once per round.

use std::collections::BTreeMap;
use std::ops::Range;

use super::packing::{index_bits, scan_block, split_blocks};
use super::ranking::mark;
use super::sort::SortScratch;
#[cfg(doc)]
use super::vote_order;
use super::{FrlConfig, FrlError, FrlRun, MaskRule, Ranking, reference};
use crate::aggregate::ClientIndex;
#[cfg(doc)]
use crate::aggregate::{AggregateStats, Aggregator};

/// Per-edge vote sums: u32 while the round's votes can't overflow it (half
/// the memory traffic of the scatter), u64 past that.
#[derive(Clone)]
pub(super) enum Sums {
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
    pub(super) cfg: FrlConfig,
    /// What clients are told ([`crate::wire::RunConfig::frl`]); `run.vote`
    /// equals `cfg`.
    pub(super) run: FrlRun,
    pub(super) offsets: Vec<usize>,
    /// `s̄`: each layer's initial scores, ascending, concatenated.
    pub(super) sorted: Vec<f32>,
    pub(super) global: Ranking,
    pub(super) sums: Sums,
    /// Votes a u32 sum can take without overflow.
    pub(super) narrow_votes: usize,
    /// The round's accepted clients: sample count and training loss.
    pub(super) votes: BTreeMap<ClientIndex, (u64, f32)>,
    pub(super) round: u32,
    /// Bitset scratch for the permutation check.
    pub(super) seen: Vec<u64>,
    /// Radix sort buffers.
    pub(super) scratch: SortScratch,
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

    pub(super) fn write_global_scores(&self, out: &mut [f32]) {
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

    pub(super) fn clear_sums(&mut self) {
        // Back to u32: a round's widening is for that round's vote count.
        let n = self.global.num_edges();
        match &mut self.sums {
            Sums::Narrow(s) => s.fill(0),
            Sums::Wide(_) => self.sums = Sums::Narrow(vec![0; n]),
        }
    }

    pub(super) fn widen(&mut self) {
        if let Sums::Narrow(s) = &self.sums {
            self.sums = Sums::Wide(s.iter().map(|&v| u64::from(v)).collect());
        }
    }

    /// Checks a packed ranking and adds its positions to the sums; on error
    /// the sums are as before.
    pub(super) fn add_packed(&mut self, bytes: &[u8]) -> Result<(), FrlError> {
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
