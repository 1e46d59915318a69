//! Ferret: first-order local updates sent as a few coefficients on shared
//! random directions (Shu et al., "Ferret: Federated full-parameter tuning
//! at scale for large language models", ICML 2025).
//!
//! **Blocks.** The model's tensors, in flat order, are grouped greedily
//! ([`blocks`]): with `target = ⌊0.9 · median(tensor sizes)⌋`, a tensor
//! starts a new block when adding it would take the current block past
//! `target` and the block is not empty. Large matrices end up alone, small
//! tensors attach to a neighbour. `d_g` is block `g`'s size.
//!
//! **Bases.** The run has `K` seeds, fixed for the whole run as in the
//! reference code (or fresh each round with `fresh_bases`, our extension).
//! Basis `b(k, g)` has `d_g` elements `v_i / √d_g`, where `v_i ∈ [−1, 1)` is
//! element `i` of the uniform stream named `(seed, FerretBasis, 0 or round,
//! k, g)` ([`crate::prng`]): a uniform `U(−1/√d_g, 1/√d_g)` draw, which is
//! what the reference code's truncated normal amounts to, keyed by seed and
//! block so blocks are independent and any slice can be regenerated.
//!
//! **Client.** After local first-order training, `Δ = θ_before − θ_after`
//! (descent sign). With `ν = max_g ‖Δ_g‖` (floor 1e-8; non-finite blocks
//! skipped), block `g` gets `L_g = max(⌊K·‖Δ_g‖/ν⌋, 2)` seeds drawn without
//! replacement with the client's private round seed, and for each chosen `k`
//! the coefficient `c[k, g] = σ_g · ⟨Δ_g, b(k, g)⟩` ([`project`]), with
//! `σ_g = d_g / L_g` (the reference code's scaling: the reconstruction's
//! expectation is `Var(v)·Δ ≈ Δ/3`) or `σ_g = d_g / (L_g·Var(v))` when
//! `unbiased` (expectation `Δ`). The payload is the sparse list
//! `(k, g, c)`, `Σ_g L_g` entries.
//!
//! **Server.** The round's coefficient vectors (dense `K × G`, zero where a
//! client sent nothing) are combined by the run's rule (the sample-weighted
//! mean by default), then `A ← μ·A + combined` (server momentum; `A` lives
//! across rounds and in the durable snapshot). With the round's server
//! learning rate `η_r` (constant, or annealed linearly or by cosine from
//! `server_lr` to `server_lr_min` over the run, as `η(r − 1, R)` in the
//! reference code), each nonzero `A[k, g]` moves block `g` by
//! `−η_r · clip(A[k, g] · b(k, g))`, where `clip` rescales the vector to norm
//! `clip` (10) when it is longer.
//!
//! **Replicas.** The server folds all of that into one scale per (seed,
//! block), `s[k, g] = f32(−η_r · A[k, g] · f / √d_g)` with `f` the clip
//! factor, and broadcasts the list `(k, g, s)` as the round's combined log
//! ([`crate::wire::LogBody::Combined`]). Every replica, the server included,
//! applies it with [`apply_scaled`]: per block, directions in ascending `k`,
//! `x_i ← x_i + s·v_i` with the product and the sum each rounded to f32
//! ([`crate::prng::apply_uniform`]). No transcendental function and no norm
//! is computed by replicas, so they agree bit for bit with the server; a
//! late joiner needs the checkpoint and the logs, never `A`.
//!
//! **Wire format** (payloads and logs alike): entries of 8 bytes, `k` (u16
//! LE), `g` (u16 LE), value (f32 LE), strictly ascending by `(g, k)`; at most
//! [`MAX_COEFFICIENTS`]. A payload with a non-finite value, an index outside
//! the run, entries out of order or repeated, or trailing bytes is refused
//! with a typed error while the round goes on.

use std::ops::Range;

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::aggregate::{
    AggregateError, AggregateStats, Aggregator, AggregatorState, ClientIndex, StateError, check_common,
};
use crate::error::{Misbehaviour, PayloadFault};
use crate::fedavg::{DENSE_RULES, dense_model};
use crate::kind::{self, KindError, KindId, KindSettings, RuleSpec, RunShape, UpdateKind};
use crate::model::ModelArch;
use crate::prng::{DirectionApplier, Purpose, StreamId};
use crate::rule::{RoundRule, Weighted};
use crate::wire::{ClientUpdate, LogBody, ModelSync, RoundLog, UpdatePayload};

/// The kind's name in configuration files.
pub const NAME: &str = "ferret";
/// Tag of Ferret payloads.
pub const ID: KindId = KindId(4);
/// Format version of the momentum buffer in snapshots.
pub const STATE_VERSION: u32 = 1;

/// Bytes per coefficient on the wire: `k` u16, `g` u16, value f32.
pub const ENTRY_BYTES: usize = 8;

/// Most coefficients a payload or a round's log may hold, and so the most
/// `K × G` a run may have: 16,384 entries are 128 KiB, half of
/// [`crate::wire::SYNC_LOG_BUDGET_BYTES`], so a late joiner's catch-up
/// message always holds at least one round's log (the coordinator takes a
/// new checkpoint once the logs pass half the budget).
pub const MAX_COEFFICIENTS: usize = crate::wire::SYNC_LOG_BUDGET_BYTES / 2 / ENTRY_BYTES;

/// Most seeds per run. `k` travels as a u16; beyond that, `K × G` would
/// break [`MAX_COEFFICIENTS`] for any model with more than one block.
pub const MAX_K: u32 = MAX_COEFFICIENTS as u32;

/// Fewest seeds: every block gets at least two (the reference code's floor).
pub const MIN_K: u32 = 2;

/// Most blocks: `g` travels as a u16, and `K ≥ 2` seeds per block must fit
/// [`MAX_COEFFICIENTS`].
pub const MAX_BLOCKS: usize = MAX_COEFFICIENTS / MIN_K as usize;

/// Variance of the basis stream's `v = j·2⁻²³ − 1`, `j` uniform in
/// `0..2²⁴`: `(2⁴⁸ − 1) / (3·2⁴⁸)`, a hair under 1/3. (Its mean is `−2⁻²⁴`,
/// which biases the reconstruction by `2⁻⁴⁸·Σ Δ` per coordinate: negligible.)
pub const BASIS_VARIANCE: f64 = (281_474_976_710_656.0 - 1.0) / (3.0 * 281_474_976_710_656.0);

/// Floor of `ν = max_g ‖Δ_g‖`, as in the reference code.
const MIN_NU: f64 = 1e-8;

/// How the server learning rate changes over the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Anneal {
    /// `server_lr` every round (the paper's script).
    #[default]
    None,
    /// Linearly from `server_lr` to `server_lr_min` (the code's default).
    Linear,
    /// By a half cosine from `server_lr` to `server_lr_min`.
    Cosine,
}

/// Ferret in a configuration file: `{ kind = "ferret", k = 256, server_lr =
/// 10.0, server_lr_min = 0.0, anneal = "none", momentum = 0.0, clip = 10.0,
/// unbiased = false, fresh_bases = false }` (defaults shown); the bases'
/// seed defaults to the run seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FerretSpec {
    /// Seeds `K` (256).
    pub k: u32,
    /// Server learning rate, or its start when annealed (10, the paper's script).
    pub server_lr: f32,
    /// Where an annealed server learning rate ends (0).
    pub server_lr_min: f32,
    /// Schedule of the server learning rate (none).
    pub anneal: Anneal,
    /// Server momentum μ on the aggregated coefficients (0, the paper's script).
    pub momentum: f32,
    /// Norm bound of each (seed, block) update vector (10).
    pub clip: f32,
    /// Scale coefficients by `1/(L_g·Var(b))` so the reconstruction is
    /// unbiased, instead of the reference code's `d_g/L_g` (false).
    pub unbiased: bool,
    /// Draw new bases every round instead of keeping the run's K seeds
    /// (false: the reference code keeps them, so the whole run lives in a
    /// fixed `K·G`-dimensional subspace). Momentum needs fixed bases.
    pub fresh_bases: bool,
    /// Seed of the bases. Default: the run seed.
    pub seed: Option<u64>,
}

impl Default for FerretSpec {
    fn default() -> Self {
        FerretSpec {
            k: 256,
            server_lr: 10.0,
            server_lr_min: 0.0,
            anneal: Anneal::None,
            momentum: 0.0,
            clip: 10.0,
            unbiased: false,
            fresh_bases: false,
            seed: None,
        }
    }
}

impl FerretSpec {
    /// The settings of a run seeded `seed`.
    pub fn resolve(&self, seed: u64) -> FerretConfig {
        FerretConfig {
            seed: self.seed.unwrap_or(seed),
            k: self.k,
            server_lr: self.server_lr,
            server_lr_min: self.server_lr_min,
            anneal: self.anneal,
            momentum: self.momentum,
            clip: self.clip,
            unbiased: self.unbiased,
            fresh_bases: self.fresh_bases,
        }
    }
}

/// A Ferret run's settings, as clients receive them (the server learning
/// rate and momentum are for transparency: replicas apply the scales the
/// server computed).
#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct FerretConfig {
    /// Seed of the bases (public: every replica regenerates them).
    pub seed: u64,
    /// Seeds per block `K`.
    pub k: u32,
    /// Server learning rate (start of the schedule).
    pub server_lr: f32,
    /// End of an annealed schedule.
    pub server_lr_min: f32,
    /// Schedule.
    pub anneal: Anneal,
    /// Server momentum μ.
    pub momentum: f32,
    /// Norm bound per (seed, block) update vector.
    pub clip: f32,
    /// Unbiased scaling instead of the reference code's.
    pub unbiased: bool,
    /// New bases every round.
    pub fresh_bases: bool,
}

impl FerretConfig {
    /// Checks ranges (not against a model: see [`FerretKind::new`]).
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_K..=MAX_K).contains(&self.k) {
            return Err(format!("k = {} must be in {MIN_K}..={MAX_K}", self.k));
        }
        if !(self.server_lr.is_finite() && self.server_lr > 0.0) {
            return Err("server_lr must be finite and positive".into());
        }
        if !(self.server_lr_min.is_finite() && (0.0..=self.server_lr).contains(&self.server_lr_min)) {
            return Err("server_lr_min must be in [0, server_lr]".into());
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err("momentum must be in [0, 1)".into());
        }
        if self.fresh_bases && self.momentum != 0.0 {
            return Err(
                "momentum needs fixed bases (fresh_bases = false): coefficients of different rounds' bases do not add"
                    .into(),
            );
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err("clip must be finite and positive".into());
        }
        Ok(())
    }

    /// The stream of basis `(k, g)` in `round`.
    pub fn basis(&self, round: u32, k: u32, g: u32) -> StreamId {
        StreamId {
            run_seed: self.seed,
            purpose: Purpose::FerretBasis,
            round: if self.fresh_bases { round } else { 0 },
            client: k,
            step: g,
        }
    }

    /// The coefficient scale `σ_g` of a block of `d` parameters with `l` seeds.
    pub fn coefficient_scale(&self, d: usize, l: usize) -> f64 {
        let s = d as f64 / l as f64;
        if self.unbiased { s / BASIS_VARIANCE } else { s }
    }

    /// The server learning rate of round `round` (from 1) of a run of `rounds`.
    pub fn server_lr_at(&self, round: u32, rounds: u32) -> f64 {
        let (max, min) = (f64::from(self.server_lr), f64::from(self.server_lr_min));
        let t = f64::from(round.saturating_sub(1)) / f64::from(rounds.max(1));
        match self.anneal {
            Anneal::None => max,
            Anneal::Linear => min + (max - min) * (1.0 - t),
            Anneal::Cosine => min + (max - min) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0,
        }
    }
}

/// The blocks of `arch` (module docs): ranges of the flat parameter vector.
pub fn blocks(arch: &ModelArch) -> Vec<Range<usize>> {
    let sizes: Vec<usize> = arch.tensors().iter().map(|t| t.numel()).collect();
    if sizes.is_empty() {
        return Vec::new();
    }
    let mut sorted = sizes.clone();
    sorted.sort_unstable();
    let n = sorted.len();
    let median = if n % 2 == 1 { sorted[n / 2] as f64 } else { (sorted[n / 2 - 1] + sorted[n / 2]) as f64 / 2.0 };
    let target = (0.9 * median).floor() as usize;
    let mut out = Vec::new();
    let (mut start, mut len) = (0usize, 0usize);
    for s in sizes {
        if len + s > target && len > 0 {
            out.push(start..start + len);
            start += len;
            len = 0;
        }
        len += s;
    }
    out.push(start..start + len);
    out
}

/// One coefficient (payload) or applied scale (log).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Coefficient {
    /// Seed index, `< K`.
    pub k: u16,
    /// Block index, `< G`.
    pub g: u16,
    /// The value.
    pub value: f32,
}

/// Encodes entries (already in ascending `(g, k)` order) in the wire format.
pub fn encode_entries(entries: &[Coefficient]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_BYTES);
    for e in entries {
        out.extend_from_slice(&e.k.to_le_bytes());
        out.extend_from_slice(&e.g.to_le_bytes());
        out.extend_from_slice(&e.value.to_le_bytes());
    }
    out
}

/// Decodes and checks entries for a run of `k` seeds and `g` blocks: at most
/// [`MAX_COEFFICIENTS`], whole entries, indices in range, strictly ascending
/// by `(g, k)`, finite values.
pub fn decode_entries(data: &[u8], k: u32, g: usize) -> Result<Vec<Coefficient>, Misbehaviour> {
    let bad = |fault| Misbehaviour::BadPayload { kind: NAME, fault };
    let extra = data.len() % ENTRY_BYTES;
    if extra != 0 {
        return Err(bad(PayloadFault::Trailing { extra }));
    }
    let n = data.len() / ENTRY_BYTES;
    let most = (k as usize).saturating_mul(g).min(MAX_COEFFICIENTS);
    if n > most {
        return Err(bad(PayloadFault::Length { part: None, expected: most, got: n }));
    }
    let mut out = Vec::with_capacity(n);
    let mut last: Option<(u16, u16)> = None;
    for (index, c) in data.chunks_exact(ENTRY_BYTES).enumerate() {
        let e = Coefficient {
            k: u16::from_le_bytes([c[0], c[1]]),
            g: u16::from_le_bytes([c[2], c[3]]),
            value: f32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        };
        if u32::from(e.k) >= k || usize::from(e.g) >= g {
            return Err(bad(PayloadFault::OutOfRange { index }));
        }
        if last.is_some_and(|l| l >= (e.g, e.k)) {
            return Err(bad(PayloadFault::NotAscending { index }));
        }
        if !e.value.is_finite() {
            return Err(Misbehaviour::NonFinite(index));
        }
        last = Some((e.g, e.k));
        out.push(e);
    }
    Ok(out)
}

/// Squared norm of `v(k, g)` over `d` elements, in f64 in element order.
fn basis_v_norm_sq(id: &StreamId, d: usize) -> f64 {
    let mut words = vec![0u32; crate::prng::CHUNK_ELEMS.min(d)];
    let mut stream = id.words_from(0);
    let mut acc = 0f64;
    let mut left = d;
    while left > 0 {
        let n = left.min(words.len());
        stream.fill(&mut words[..n]);
        for &w in &words[..n] {
            let v = f64::from(crate::prng::signed_uniform24(w));
            acc += v * v;
        }
        left -= n;
    }
    acc
}

/// `⟨x, v(id)⟩` over `x.len()` elements, in f64 in element order.
fn dot_v(x: &[f32], id: &StreamId, words: &mut [u32]) -> f64 {
    let mut stream = id.words_from(0);
    let mut acc = 0f64;
    for chunk in x.chunks(words.len()) {
        let w = &mut words[..chunk.len()];
        stream.fill(w);
        for (&a, &w) in chunk.iter().zip(w.iter()) {
            acc += f64::from(a) * f64::from(crate::prng::signed_uniform24(w));
        }
    }
    acc
}

/// The client's projection (module docs): `delta = θ_before − θ_after` over
/// the run's `blocks`, seeds chosen with `private_seed` (the client's round
/// seed; the server never needs it). Entries ascend by `(g, k)`.
pub fn project(
    cfg: &FerretConfig,
    blocks: &[Range<usize>],
    round: u32,
    delta: &[f32],
    private_seed: u64,
) -> Vec<Coefficient> {
    let norms: Vec<f64> = blocks
        .iter()
        .map(|b| delta[b.clone()].iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt())
        .collect();
    let nu = norms.iter().copied().filter(|n| n.is_finite()).fold(MIN_NU, f64::max);
    let mut rng = crate::rng::LocalRng::new(private_seed);
    let all: Vec<u32> = (0..cfg.k).collect();
    let mut words = vec![0u32; crate::prng::CHUNK_ELEMS];
    let mut out = Vec::new();
    for (g, (block, &norm)) in blocks.iter().zip(&norms).enumerate() {
        // A block whose delta is not finite says nothing (the reference code
        // sends its NaN and the server skips it); we send nothing for it.
        if !norm.is_finite() {
            continue;
        }
        let l = ((f64::from(cfg.k) * norm / nu).floor() as usize).clamp(2, cfg.k as usize);
        let mut chosen = rng.sample(&all, l);
        chosen.sort_unstable();
        let d = block.len();
        let scale = cfg.coefficient_scale(d, l) / (d as f64).sqrt();
        for k in chosen {
            let dot = dot_v(&delta[block.clone()], &cfg.basis(round, k, g as u32), &mut words);
            // Indices fit: K ≤ MAX_K and G ≤ MAX_BLOCKS are below 2¹⁶ (checked by FerretKind::new).
            out.push(Coefficient { k: k as u16, g: g as u16, value: (dot * scale) as f32 });
        }
    }
    out
}

/// The unclipped reconstruction `Σ c[k, g]·b(k, g)` of a client's entries,
/// in f64 (for tests and diagnostics: replicas use [`apply_scaled`]).
pub fn reconstruct(cfg: &FerretConfig, blocks: &[Range<usize>], round: u32, entries: &[Coefficient]) -> Vec<f64> {
    let dim = blocks.last().map_or(0, |b| b.end);
    let mut out = vec![0f64; dim];
    let mut words = vec![0u32; crate::prng::CHUNK_ELEMS];
    for e in entries {
        let block = &blocks[usize::from(e.g)];
        let d = block.len();
        let s = f64::from(e.value) / (d as f64).sqrt();
        let mut stream = cfg.basis(round, u32::from(e.k), u32::from(e.g)).words_from(0);
        for chunk in out[block.clone()].chunks_mut(words.len()) {
            let w = &mut words[..chunk.len()];
            stream.fill(w);
            for (o, &w) in chunk.iter_mut().zip(w.iter()) {
                *o += s * f64::from(crate::prng::signed_uniform24(w));
            }
        }
    }
    out
}

/// Applies a round's scales to `params`: per block, `x ← x + s·v(k, g)` for
/// its entries in ascending `k` (module docs), through `applier`.
pub fn apply_scaled(
    cfg: &FerretConfig,
    blocks: &[Range<usize>],
    round: u32,
    params: &mut [f32],
    entries: &[Coefficient],
    applier: &dyn DirectionApplier,
) {
    let mut i = 0;
    while i < entries.len() {
        let g = entries[i].g;
        let mut dirs = Vec::new();
        while i < entries.len() && entries[i].g == g {
            let e = entries[i];
            dirs.push((cfg.basis(round, u32::from(e.k), u32::from(g)), e.value));
            i += 1;
        }
        let block = blocks[usize::from(g)].clone();
        applier.apply_uniform(&mut params[block], &dirs);
    }
}

/// A Ferret payload from entries in ascending `(g, k)` order.
pub fn payload(entries: &[Coefficient]) -> UpdatePayload {
    UpdatePayload { kind: ID, data: encode_entries(entries) }
}

/// The Ferret kind: a replicated run whose logs are the combined update.
#[derive(Debug, Clone)]
pub struct FerretKind {
    cfg: FerretConfig,
    blocks: Vec<Range<usize>>,
}

impl FerretKind {
    /// Ferret with `cfg` over `arch` (any dense model), refusing a `K × G`
    /// beyond [`MAX_COEFFICIENTS`].
    pub fn new(cfg: FerretConfig, arch: &ModelArch) -> Result<Self, KindError> {
        cfg.validate().map_err(|e| KindError::invalid(NAME, e))?;
        dense_model(NAME, arch)?;
        let blocks = blocks(arch);
        if blocks.len() > MAX_BLOCKS || (cfg.k as usize).saturating_mul(blocks.len()) > MAX_COEFFICIENTS {
            return Err(KindError::invalid(
                NAME,
                format!(
                    "k = {} seeds × {} blocks = {} coefficients; at most {MAX_COEFFICIENTS} fit a round's log",
                    cfg.k,
                    blocks.len(),
                    cfg.k as usize * blocks.len()
                ),
            ));
        }
        Ok(FerretKind { cfg, blocks })
    }

    /// The settings.
    pub fn config(&self) -> &FerretConfig {
        &self.cfg
    }

    /// The model's blocks.
    pub fn blocks(&self) -> &[Range<usize>] {
        &self.blocks
    }
}

impl UpdateKind for FerretKind {
    fn name(&self) -> &'static str {
        NAME
    }
    fn id(&self) -> KindId {
        ID
    }
    fn settings(&self) -> KindSettings {
        KindSettings::Ferret(self.cfg.clone())
    }
    fn publication(&self) -> kind::Publication {
        kind::Publication::Replica
    }
    fn rules(&self) -> &'static [&'static str] {
        DENSE_RULES
    }
    fn aggregator(
        &self,
        run: &RunShape<'_>,
        rule: &RuleSpec,
        _initial: &[f32],
    ) -> Result<Box<dyn Aggregator>, KindError> {
        kind::check_rule(self, rule)?;
        let cells = self.cfg.k as usize * self.blocks.len();
        Ok(Box::new(Ferret {
            cfg: self.cfg.clone(),
            blocks: self.blocks.clone(),
            rule: RoundRule::new(rule),
            rounds: run.rounds,
            bound: run.max_update_abs,
            round: 0,
            pending: Vec::new(),
            momentum: vec![0.0; cells],
            v_norms: vec![f64::NAN; cells],
            last_log: Vec::new(),
        }))
    }
    fn apply_log(
        &self,
        params: &mut [f32],
        log: &RoundLog,
        applier: &dyn DirectionApplier,
    ) -> Result<(), Misbehaviour> {
        let data = match &log.body {
            LogBody::Skipped => return Ok(()),
            LogBody::Combined(data) => data,
            LogBody::PerClient(_) => return Err(Misbehaviour::Unexpected("a per-client RoundLog in a Ferret run")),
        };
        let entries = decode_entries(data, self.cfg.k, self.blocks.len())?;
        apply_scaled(&self.cfg, &self.blocks, log.round, params, &entries, applier);
        Ok(())
    }
}

/// Ferret's aggregator (module docs).
#[derive(Debug)]
pub struct Ferret {
    cfg: FerretConfig,
    blocks: Vec<Range<usize>>,
    rule: RoundRule,
    /// Rounds of the run (the learning-rate schedule's length).
    rounds: u32,
    /// Largest `|coefficient|` accepted (the run's liveness bound).
    bound: f32,
    round: u32,
    /// The round's clients: (client, samples, loss, dense `K × G` coefficients, index `g·K + k`).
    pending: Vec<(ClientIndex, u64, f32, Vec<f32>)>,
    /// Server momentum `A` (`g·K + k`), f32, across rounds.
    momentum: Vec<f32>,
    /// `‖v(k, g)‖` per cell for fixed bases, computed once when first
    /// needed (NaN: not yet).
    v_norms: Vec<f64>,
    last_log: Vec<u8>,
}

impl Ferret {
    fn cell(&self, k: u16, g: u16) -> usize {
        usize::from(g) * self.cfg.k as usize + usize::from(k)
    }

    fn v_norm(&mut self, k: u32, g: usize) -> f64 {
        let cell = g * self.cfg.k as usize + k as usize;
        let known = self.v_norms[cell];
        if !known.is_nan() && !self.cfg.fresh_bases {
            return known;
        }
        let n = basis_v_norm_sq(&self.cfg.basis(self.round, k, g as u32), self.blocks[g].len()).sqrt();
        self.v_norms[cell] = n;
        n
    }
}

impl Aggregator for Ferret {
    fn name(&self) -> &'static str {
        NAME
    }

    fn begin_round(&mut self, round: u32, _global: &[f32]) {
        self.round = round;
        self.pending.clear();
    }

    fn know_attackers(&mut self, flagged: std::collections::BTreeSet<ClientIndex>) {
        self.rule.know_attackers(flagged);
    }

    fn absorb(&mut self, client: ClientIndex, update: &ClientUpdate) -> Result<(), Misbehaviour> {
        check_common(update)?;
        let data = kind::payload_of(update, ID, NAME)?;
        let entries = decode_entries(data, self.cfg.k, self.blocks.len())?;
        if let Some(index) = entries.iter().position(|e| e.value.abs() > self.bound) {
            return Err(Misbehaviour::OutOfBounds { index, limit: self.bound.to_string() });
        }
        let mut dense = vec![0f32; self.momentum.len()];
        for e in &entries {
            dense[self.cell(e.k, e.g)] = e.value;
        }
        self.pending.push((client, update.num_samples, update.train_loss, dense));
        Ok(())
    }

    fn finish(&mut self, global: &mut [f32]) -> Result<AggregateStats, AggregateError> {
        if self.pending.is_empty() {
            return Err(AggregateError::Empty);
        }
        self.pending.sort_by_key(|(c, ..)| *c);
        let total: u64 = self.pending.iter().fold(0u64, |t, (_, n, ..)| t.saturating_add(*n));
        let loss: f64 = self.pending.iter().map(|(_, n, l, _)| *n as f64 * f64::from(*l)).sum();
        let stats = AggregateStats {
            updates: self.pending.len(),
            samples: total,
            train_loss: loss / total as f64,
            privacy: None,
        };
        let mut combined = vec![0f64; self.momentum.len()];
        {
            let updates: Vec<Weighted<'_>> =
                self.pending.iter().map(|(c, n, _, d)| Weighted { client: *c, weight: *n, values: d }).collect();
            self.rule.combine(&updates, &mut combined);
        }
        self.pending.clear();
        let mu = f64::from(self.cfg.momentum);
        let next_a: Vec<f32> =
            self.momentum.iter().zip(&combined).map(|(&a, &c)| (mu * f64::from(a) + c) as f32).collect();
        if let Some(index) = next_a.iter().position(|a| !a.is_finite()) {
            return Err(AggregateError::NonFinite { index });
        }
        let eta = self.cfg.server_lr_at(self.round, self.rounds);
        let clip = f64::from(self.cfg.clip);
        let k_count = self.cfg.k as usize;
        let mut entries = Vec::new();
        for g in 0..self.blocks.len() {
            let sqrt_d = (self.blocks[g].len() as f64).sqrt();
            for k in 0..k_count {
                let a = f64::from(next_a[g * k_count + k]);
                if a == 0.0 {
                    continue;
                }
                // ‖A·b‖ = |A|·‖v‖/√d; rescaled to `clip` when longer.
                let norm = a.abs() * self.v_norm(k as u32, g) / sqrt_d;
                let factor = if norm > clip { clip / norm } else { 1.0 };
                let s = (-eta * a * factor / sqrt_d) as f32;
                if s != 0.0 {
                    // k < K ≤ MAX_K and g < G ≤ MAX_BLOCKS fit u16 (FerretKind::new).
                    entries.push(Coefficient { k: k as u16, g: g as u16, value: s });
                }
            }
        }
        let mut next = global.to_vec();
        apply_scaled(&self.cfg, &self.blocks, self.round, &mut next, &entries, &crate::prng::CpuApplier);
        if let Some(index) = next.iter().position(|v| !v.is_finite()) {
            return Err(AggregateError::NonFinite { index });
        }
        global.copy_from_slice(&next);
        self.momentum = next_a;
        self.last_log = encode_entries(&entries);
        Ok(stats)
    }

    fn take_log(&mut self) -> Option<LogBody> {
        Some(LogBody::Combined(std::mem::take(&mut self.last_log)))
    }

    fn publish(&self, global: &[f32]) -> ModelSync {
        ModelSync::Replica { model_hash: crate::identity::params_hash(global) }
    }

    fn state(&self) -> Option<AggregatorState> {
        // Only momentum lives across rounds; without it A is rebuilt each round.
        (self.cfg.momentum != 0.0).then(|| AggregatorState::from_f32s(NAME, STATE_VERSION, &self.momentum))
    }

    fn restore_state(&mut self, state: &AggregatorState) -> Result<(), StateError> {
        state.expect(NAME, STATE_VERSION)?;
        if self.cfg.momentum == 0.0 {
            return Err(StateError::Presence("found for a Ferret run without momentum"));
        }
        if state.bytes.len() != self.momentum.len() * 4 {
            return Err(StateError::Invalid { name: NAME, reason: "momentum buffer of the wrong size" });
        }
        let a: Vec<f32> = state.bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if a.iter().any(|v| !v.is_finite()) {
            return Err(StateError::Invalid { name: NAME, reason: "non-finite momentum" });
        }
        self.momentum = a;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn cfg(k: u32, unbiased: bool) -> FerretConfig {
        FerretConfig { unbiased, ..FerretSpec { k, ..FerretSpec::default() }.resolve(9) }
    }

    #[test]
    fn blocks_follow_the_greedy_rule() {
        // MNIST MLP: sizes 156800, 200, 40000, 200, 2000, 10; median
        // (200 + 2000)/2 = 1100, target 990: every tensor alone.
        let mlp = ModelArch::mnist_mlp();
        let b = blocks(&mlp);
        let sizes: Vec<usize> = b.iter().map(|r| r.len()).collect();
        assert_eq!(sizes, vec![156_800, 200, 40_000, 200, 2_000, 10]);
        assert_eq!(b.last().unwrap().end, mlp.num_params());
        // Small tensors attach to a neighbour when they fit under the target:
        // sizes 16, 4, 8, 2 → median 6, target 5: 16 | 4 | 8 | 2 (4 + 8 > 5).
        let tiny = ModelArch::Mlp { input: 4, hidden: vec![4], classes: 2 };
        assert_eq!(blocks(&tiny).iter().map(|r| r.len()).collect::<Vec<_>>(), vec![16, 4, 8, 2]);
        // Sizes 100, 3, 300, 3 (median 51.5, target 46): the bias joins the
        // next... no: 3 + 300 > 46, so again alone; while 30, 3, 3, 30
        // (median 16.5, target 14) gives 30 | 3+3 | 30.
        let m = ModelArch::Mlp { input: 10, hidden: vec![3], classes: 10 };
        assert_eq!(blocks(&m).iter().map(|r| r.len()).collect::<Vec<_>>(), vec![30, 3, 30, 10]);
        let contiguous = blocks(&ModelArch::LeNet5 { classes: 10 });
        assert!(contiguous.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(contiguous[0].start, 0);
    }

    #[test]
    fn seed_budget_gives_the_largest_block_k_and_every_block_at_least_two() {
        let arch = ModelArch::Mlp { input: 16, hidden: vec![8], classes: 4 };
        let b = blocks(&arch);
        let mut delta = vec![0f32; arch.num_params()];
        // Block 0 has the largest norm; block 2 a tenth of it; the others zero.
        for (i, v) in delta[b[0].clone()].iter_mut().enumerate() {
            *v = if i % 2 == 0 { 1.0 } else { -1.0 };
        }
        let n0 = (b[0].len() as f32).sqrt();
        let w = n0 / 10.0 / (b[2].len() as f32).sqrt();
        delta[b[2].clone()].fill(w);
        let c = cfg(20, false);
        let entries = project(&c, &b, 1, &delta, 7);
        let per_block = |g: u16| entries.iter().filter(|e| e.g == g).count();
        assert_eq!(per_block(0), 20, "the max-norm block gets every seed");
        assert_eq!(per_block(1), 2);
        assert_eq!(per_block(2), 2, "⌊20·0.1⌋ = 2");
        assert_eq!(per_block(3), 2);
        assert!(entries.windows(2).all(|w| (w[0].g, w[0].k) < (w[1].g, w[1].k)), "ascending (g, k)");
        // A non-finite block sends nothing; the rest are unaffected.
        delta[b[1].start] = f32::NAN;
        let e2 = project(&c, &b, 1, &delta, 7);
        assert!(e2.iter().all(|e| e.g != 1));
        assert!(e2.iter().all(|e| e.value.is_finite()));
        // A zero update sends two zero coefficients per block.
        let zero = project(&c, &b, 1, &vec![0.0; arch.num_params()], 7);
        assert_eq!(zero.len(), 2 * b.len());
        assert!(zero.iter().all(|e| e.value == 0.0));
    }

    /// `Σ_j z_j²` with `z_j` the deviation of the mean reconstruction from
    /// `target_j` in standard errors: χ² with `d` degrees of freedom when the
    /// mean is right.
    fn chi_square(samples: usize, target: &[f64], mut recon: impl FnMut(u64) -> Vec<f64>) -> f64 {
        let d = target.len();
        let (mut sum, mut sq) = (vec![0f64; d], vec![0f64; d]);
        for s in 0..samples as u64 {
            for (j, x) in recon(s).into_iter().enumerate() {
                sum[j] += x;
                sq[j] += x * x;
            }
        }
        let n = samples as f64;
        (0..d)
            .map(|j| {
                let mean = sum[j] / n;
                let var = (sq[j] / n - mean * mean) * n / (n - 1.0);
                (mean - target[j]).powi(2) / (var / n)
            })
            .sum()
    }

    #[test]
    fn unbiased_reconstruction_averages_to_the_update_and_the_code_scaling_to_a_third() {
        let arch = ModelArch::Mlp { input: 4, hidden: vec![4], classes: 2 };
        let b = blocks(&arch);
        let d = arch.num_params();
        let delta: Vec<f32> = (0..d).map(|i| ((i as f32) * 0.7).sin() * (1.0 + (i % 3) as f32)).collect();
        let delta64: Vec<f64> = delta.iter().map(|&v| f64::from(v)).collect();
        // Over many runs (each its own bases and seed choice), χ² with d
        // degrees of freedom: mean d, sd √(2d); 6 sd is a false-alarm rate
        // far below 1e-6 and a fixed seed makes the test deterministic.
        let limit = d as f64 + 6.0 * (2.0 * d as f64).sqrt();
        let samples = 6000;
        let run = |unbiased: bool, factor: f64, target_scale: f64| {
            let target: Vec<f64> = delta64.iter().map(|v| v * target_scale).collect();
            chi_square(samples, &target, |s| {
                let c = FerretConfig { seed: s, ..cfg(6, unbiased) };
                let e = project(&c, &b, 1, &delta, s ^ 0xabc);
                reconstruct(&c, &b, 1, &e).into_iter().map(|x| x * factor).collect()
            })
        };
        let ok = run(true, 1.0, 1.0);
        assert!(ok < limit, "unbiased: χ² = {ok:.1} over {d} coordinates (limit {limit:.1})");
        // The test has power: a reconstruction scaled by 3 or by ½ fails it.
        let triple = run(true, 3.0, 1.0);
        let half = run(true, 0.5, 1.0);
        assert!(triple > 10.0 * limit && half > 10.0 * limit, "χ² ×3 = {triple:.0}, ×½ = {half:.0}");
        // The reference code's scaling averages to Var(v)·Δ ≈ Δ/3.
        let code = run(false, 1.0, BASIS_VARIANCE);
        assert!(code < limit, "code scaling vs Δ/3: χ² = {code:.1}");
        assert!(run(false, 1.0, 1.0) > 10.0 * limit, "code scaling is not unbiased");
    }

    #[test]
    fn server_clips_each_seed_block_vector_and_replicas_apply_the_same_bits() {
        let arch = ModelArch::Mlp { input: 8, hidden: vec![4], classes: 2 };
        let c = FerretConfig { clip: 0.05, server_lr: 1.0, ..cfg(4, false) };
        let kind = FerretKind::new(c.clone(), &arch).unwrap();
        let shape =
            RunShape { arch: &arch, clients_per_round: 2, rounds: 1, max_update_abs: f32::MAX, noise_seed: None };
        let init = arch.init_params(2);
        let mut agg = kind.aggregator(&shape, &RuleSpec::Mean, &init).unwrap();
        agg.begin_round(1, &init);
        // One huge coefficient and one small one, in block 0.
        let entries = [Coefficient { k: 0, g: 0, value: 50.0 }, Coefficient { k: 1, g: 0, value: 1e-3 }];
        let up = ClientUpdate { num_samples: 3, train_loss: 0.5, payload: payload(&entries) };
        agg.absorb(0, &up).unwrap();
        let mut global = init.clone();
        agg.finish(&mut global).unwrap();
        let Some(LogBody::Combined(bytes)) = agg.take_log() else { panic!("ferret logs the combined update") };
        let applied = decode_entries(&bytes, 4, kind.blocks().len()).unwrap();
        let d = kind.blocks()[0].len() as f64;
        let v_norm = basis_v_norm_sq(&c.basis(1, 0, 0), d as usize).sqrt();
        // The clipped vector has norm exactly `clip` (up to f32 rounding of s).
        let moved = (f64::from(applied[0].value).abs()) * v_norm;
        assert!((moved - 0.05).abs() < 1e-6, "clipped update norm {moved}");
        // The small one is not clipped: s = −η·A/√d.
        let want = (-f64::from(1e-3f32) / d.sqrt()) as f32;
        assert_eq!(applied[1].value, want);
        // A replica applying the log reaches the server's bits.
        let mut replica = init.clone();
        let log = RoundLog { round: 1, body: LogBody::Combined(bytes), model_hash: [0; 32] };
        kind.apply_log(&mut replica, &log, &crate::prng::CpuApplier).unwrap();
        assert_eq!(
            replica.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            global.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        // A replica refuses a log it can't apply, before touching anything.
        let bad = RoundLog { round: 1, body: LogBody::Combined(vec![0; 7]), model_hash: [0; 32] };
        let mut r2 = init.clone();
        assert!(kind.apply_log(&mut r2, &bad, &crate::prng::CpuApplier).is_err());
        assert_eq!(r2, init);
        let per_client = RoundLog { round: 1, body: LogBody::PerClient(vec![]), model_hash: [0; 32] };
        assert!(kind.apply_log(&mut r2, &per_client, &crate::prng::CpuApplier).is_err());
    }

    #[test]
    fn momentum_state_round_trips_and_bad_state_is_refused() {
        let arch = ModelArch::Mlp { input: 8, hidden: vec![4], classes: 2 };
        let c = FerretConfig { momentum: 0.5, ..cfg(4, false) };
        let kind = FerretKind::new(c.clone(), &arch).unwrap();
        let shape =
            RunShape { arch: &arch, clients_per_round: 2, rounds: 4, max_update_abs: f32::MAX, noise_seed: None };
        let init = arch.init_params(2);
        let mut agg = kind.aggregator(&shape, &RuleSpec::Mean, &init).unwrap();
        agg.begin_round(1, &init);
        let up = ClientUpdate {
            num_samples: 3,
            train_loss: 0.5,
            payload: payload(&[Coefficient { k: 2, g: 1, value: 0.3 }]),
        };
        agg.absorb(0, &up).unwrap();
        agg.finish(&mut init.clone()).unwrap();
        let state = agg.state().expect("momentum is state");
        let mut fresh = kind.aggregator(&shape, &RuleSpec::Mean, &init).unwrap();
        fresh.restore_state(&state).unwrap();
        assert_eq!(fresh.state(), Some(state.clone()));
        let mut short = state.clone();
        short.bytes.pop();
        assert!(fresh.restore_state(&short).is_err());
        let mut nan = state.clone();
        nan.bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(fresh.restore_state(&nan).is_err());
        // Without momentum nothing is kept, and a state is refused.
        let plain = FerretKind::new(cfg(4, false), &arch).unwrap();
        let mut p = plain.aggregator(&shape, &RuleSpec::Mean, &init).unwrap();
        assert!(p.state().is_none());
        assert!(p.restore_state(&state).is_err());
    }

    #[test]
    fn settings_are_checked_against_limits_and_the_model() {
        let mlp = ModelArch::mnist_mlp();
        for bad in [
            FerretSpec { k: 1, ..Default::default() },
            FerretSpec { k: MAX_K + 1, ..Default::default() },
            FerretSpec { server_lr: 0.0, ..Default::default() },
            FerretSpec { server_lr_min: 20.0, ..Default::default() },
            FerretSpec { momentum: 1.0, ..Default::default() },
            FerretSpec { clip: f32::NAN, ..Default::default() },
            FerretSpec { fresh_bases: true, momentum: 0.9, ..Default::default() },
            // 6 blocks × 4096 seeds is more than a round's log may carry.
            FerretSpec { k: 4096, ..Default::default() },
        ] {
            assert!(FerretKind::new(bad.resolve(1), &mlp).is_err(), "{bad:?} accepted");
        }
        assert!(FerretKind::new(FerretSpec::default().resolve(1), &mlp).is_ok());
        let net = ModelArch::Supermask(crate::supermask::FrlArch::Conv2 { channels: 1, side: 2, classes: 2 });
        assert!(FerretKind::new(FerretSpec::default().resolve(1), &net).is_err());
        // Schedules: constant, linear and cosine from max to min.
        let lin = FerretConfig { anneal: Anneal::Linear, server_lr: 10.0, server_lr_min: 0.0, ..cfg(4, false) };
        assert_eq!(lin.server_lr_at(1, 10), 10.0);
        assert_eq!(lin.server_lr_at(6, 10), 5.0);
        let cos = FerretConfig { anneal: Anneal::Cosine, ..lin.clone() };
        assert!((cos.server_lr_at(6, 10) - 5.0).abs() < 1e-12);
        assert!(cos.server_lr_at(2, 10) > lin.server_lr_at(2, 10));
        let flat = FerretConfig { anneal: Anneal::None, ..lin };
        assert_eq!(flat.server_lr_at(9, 10), 10.0);
    }
}
