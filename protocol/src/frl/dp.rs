//! Private FRL ("FRL-Cum-DP", kind [`NAME`]): FRL's supermask training with
//! the global mask released each round under differential privacy, by the
//! continual top-k mechanism of [`crate::dp::svt`] over the *cumulative*
//! approval counts of all rounds so far. This is **not** the published FRL
//! (Mozaffari et al. 2023), whose vote uses only the current round's
//! rankings: it is FRL with vote memory, a variant defined here so that the
//! mask is a continual-release statistic. `docs/dp.md` ("Private FRL") is
//! the full note.
//!
//! **Records.** Borda positions can't be made private at any useful noise
//! (one client's reversed ranking moves the position sums by about
//! `n^{1.5}/√3` in L2). Each client instead sends, per layer, the *approval
//! bitset* of its own kept set: bit `e` is 1 iff the client's mask, after
//! its local training, keeps edge `e` (the top `w_l = keep_count(n_l, k)`
//! edges by `|score|`, the mask rule of the run's forward pass). A payload
//! has **exactly** `w_l` ones in layer `l` ([`decode_approvals`] refuses any
//! other count). One client's payload in one round is one record of the
//! stream; the stream's length is `T = horizon × clients_per_round`.
//!
//! **Sensitivity.** Records are in `{0,1}^{n_l}`, so replacing one moves
//! every cumulative count by at most 1 (`Δ∞ = 1`): that is all the SVT
//! top-k mechanism needs (its query `C^{(k)} − min_Y C` moves by at most 2,
//! permute-and-flip's utilities by 1). The exact popcount bounds the rest
//! (`Δ₁ ≤ 2w`, `Δ₂ ≤ √(2w)` for a counting tree) and makes every client's
//! approval weigh the same, as in FRL every client's ranking does.
//!
//! **Server.** One [`SparseVector`] per layer (instance `l`, target top-`w_l`,
//! sampler [`Sampler::Buckets`]), stepped once per record in ascending
//! client order at the end of each round; the selection after the round's
//! last record is the round's released kept set `Y_l`.
//!
//! **From the released set to scores** (post-processing, so free): the new
//! global ranking of layer `l` is the previous one split stably into the
//! edges outside `Y_l` and those in `Y_l`; the members of `Y_l`, in their
//! previous order, take the mask's kept positions (the top `w_l` positions
//! for [`MaskRule::OneSidedTopK`]; both ends for [`MaskRule::TwoSided`],
//! [`FrlVote::kept_positions`]) and the others the remaining positions, in
//! their previous order. Scores are then `S[G[j]] = s̄[j]` as in FRL, so the
//! clients' mask is exactly `Y`, and the order inside each part is what the
//! initial scores and earlier releases made it (both public). Rounds
//! publish this ranking in FRL's encoding; clients decode it as FRL's.
//!
//! **Privacy.** Each layer's mechanism is `k_max·(ε_svt + ε_sel)`-DP and
//! `k_max·(ε_svt² + ε_sel²)/2`-zCDP with `k_max = ⌈2T/τ⌉ + 1`; the `L`
//! layers read the same records, so their costs add. With a ρ target (or
//! an (ε, δ) target, converted to the largest ρ whose report is at most ε),
//! `ε_svt = ε_sel = e` with `L·k_max·e² ≤ ρ` checked exactly; with a pure ε
//! target `2·L·k_max·e ≤ ε`. Spent is what the mechanisms were actually
//! charged (each AboveThreshold when it starts, each refresh), reported per
//! round in the metrics. Event level: neighbouring runs differ in one
//! client's approvals in one round. A client that takes part `m` times is
//! covered at `m²·ρ` (zCDP group privacy), or `m·ε` pure.
//!
//! **Horizon.** After `horizon` released rounds [`Aggregator::exhausted`]
//! ends the run; no round can overflow the mechanisms' `T` because a round
//! takes at most `clients_per_round` records.
//!
//! **Durable state** ([`STATE_VERSION`]): the secret noise seed, every
//! layer's [`SvtState`], the global ranking and the rounds released. A
//! restored server continues bit for bit.

use std::collections::BTreeMap;

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

#[cfg(doc)]
use super::MaskRule;
use super::{FrlKind, FrlRun, FrlSpec, FrlVote, MAX_RANKED_EDGES, MAX_RANKED_LAYERS, Ranking, encode};
use crate::aggregate::{
    AggregateError, AggregateStats, Aggregator, AggregatorState, ClientIndex, PrivacySpent, StateError, check_common,
};
use crate::dp::svt::Sampler;
use crate::dp::tree::MAX_HORIZON;
use crate::dp::{NoiseSeed, Ratio, SparseVector, Spent, SvtConfig, SvtState, Target};
use crate::dpftrl::{PRIVACY_DENOMINATOR, PrivacyTarget, rho_for_epsilon};
use crate::error::{Misbehaviour, PayloadFault};
use crate::kind::{self, KindError, KindId, KindSettings, RuleSpec, RunShape, UpdateKind};
use crate::model::ModelArch;
use crate::wire::{ClientUpdate, ModelSync, UpdatePayload};

/// The kind's name in configuration files.
pub const NAME: &str = "frl-dp";
/// Tag of approval payloads.
pub const ID: KindId = KindId(6);
/// Format version of the aggregator's durable state.
pub const STATE_VERSION: u32 = 1;
/// Largest approval payload: one bit per edge, each layer padded to a byte,
/// over at most [`MAX_RANKED_EDGES`] edges in [`MAX_RANKED_LAYERS`] layers
/// (2 MiB + 256 bytes, far inside a message). [`decode_approvals`] never
/// reads more than the run's exact length, which is at most this.
pub const MAX_APPROVAL_BYTES: usize = MAX_RANKED_EDGES / 8 + MAX_RANKED_LAYERS;
/// The default threshold τ is `⌈T / DEFAULT_THRESHOLD_DIVISOR⌉` records, so
/// the switch budget `k_max = ⌈2T/τ⌉ + 1` is 9: few enough refreshes that
/// each gets a useful share of the budget, enough that the mask can follow
/// the votes several times in a run.
pub const DEFAULT_THRESHOLD_DIVISOR: u64 = 4;

/// Why an approval payload was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ApprovalError {
    /// A payload of another kind.
    #[error("payload of kind {got}, the run's approvals are kind {expected}")]
    WrongKind {
        /// [`ID`].
        expected: u8,
        /// The payload's tag.
        got: u8,
    },
    /// Not exactly [`approvals_len`] bytes.
    #[error("approval payload of {got} bytes, the run's layers need {expected}")]
    WrongLength {
        /// The run's length.
        expected: usize,
        /// The payload's.
        got: usize,
    },
    /// A layer with another number of approvals than its kept-set size
    /// (the bound the sensitivity counts on).
    #[error("layer {layer} approves {got} edges, exactly {expected} are required")]
    WrongPopcount {
        /// The layer.
        layer: usize,
        /// `w_l`.
        expected: usize,
        /// Ones in the payload's layer.
        got: usize,
    },
    /// Bits set past a layer's last edge (a second encoding, or a covert
    /// channel).
    #[error("layer {layer}: padding bits set")]
    TrailingBits {
        /// The layer.
        layer: usize,
    },
}

/// Bytes of an approval payload over `layer_sizes`: `Σ ⌈n_l / 8⌉`.
pub fn approvals_len(layer_sizes: &[usize]) -> usize {
    layer_sizes.iter().map(|n| n.div_ceil(8)).sum()
}

/// A checked approval payload: per layer a bitset of `n_l` bits, edge `e` at
/// bit `e mod 8` (value `2^(e mod 8)`) of byte `⌊e/8⌋` of the layer's block;
/// blocks in layer order, each starting on a byte; padding bits zero. The
/// only constructors check or produce exactly that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approvals {
    bytes: Vec<u8>,
    sizes: Vec<usize>,
}

impl Approvals {
    /// A client's kept sets as a payload (one `Vec<bool>` per layer).
    pub fn from_masks(masks: &[Vec<bool>]) -> Approvals {
        let mut bytes = Vec::with_capacity(masks.iter().map(|m| m.len().div_ceil(8)).sum());
        for m in masks {
            for chunk in m.chunks(8) {
                bytes.push(chunk.iter().enumerate().fold(0u8, |b, (i, &on)| b | (u8::from(on) << i)));
            }
        }
        Approvals { bytes, sizes: masks.iter().map(Vec::len).collect() }
    }

    /// The encoded payload.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// As a kind-tagged payload.
    pub fn payload(&self) -> UpdatePayload {
        UpdatePayload { kind: ID, data: self.bytes.clone() }
    }

    fn block(&self, l: usize) -> &[u8] {
        let start: usize = self.sizes[..l].iter().map(|n| n.div_ceil(8)).sum();
        &self.bytes[start..start + self.sizes[l].div_ceil(8)]
    }

    /// Layer `l` as a 0/1 record of `n_l` entries.
    pub fn record(&self, l: usize) -> Vec<i64> {
        let block = self.block(l);
        (0..self.sizes[l]).map(|e| i64::from((block[e / 8] >> (e % 8)) & 1)).collect()
    }

    /// The approved edges of layer `l`, ascending.
    pub fn approved(&self, l: usize) -> Vec<u32> {
        let block = self.block(l);
        (0..self.sizes[l]).filter(|e| (block[e / 8] >> (e % 8)) & 1 == 1).map(|e| e as u32).collect()
    }
}

/// Decodes and checks an approval payload for layers `layer_sizes` with
/// exactly `keep[l]` approvals in layer `l`. Never panics.
pub fn decode_approvals(bytes: &[u8], layer_sizes: &[usize], keep: &[usize]) -> Result<Approvals, ApprovalError> {
    let expected = approvals_len(layer_sizes);
    if bytes.len() != expected {
        return Err(ApprovalError::WrongLength { expected, got: bytes.len() });
    }
    let mut at = 0;
    for (layer, &n) in layer_sizes.iter().enumerate() {
        let block = &bytes[at..at + n.div_ceil(8)];
        at += block.len();
        if n % 8 != 0
            && let Some(&last) = block.last()
            && last >> (n % 8) != 0
        {
            return Err(ApprovalError::TrailingBits { layer });
        }
        let got: usize = block.iter().map(|b| b.count_ones() as usize).sum();
        let want = keep.get(layer).copied().unwrap_or(0);
        if got != want {
            return Err(ApprovalError::WrongPopcount { layer, expected: want, got });
        }
    }
    Ok(Approvals { bytes: bytes.to_vec(), sizes: layer_sizes.to_vec() })
}

/// [`decode_approvals`] of a tagged payload: refuses another kind first.
pub fn decode_payload(
    payload: &UpdatePayload,
    layer_sizes: &[usize],
    keep: &[usize],
) -> Result<Approvals, ApprovalError> {
    if payload.kind != ID {
        return Err(ApprovalError::WrongKind { expected: ID.0, got: payload.kind.0 });
    }
    decode_approvals(&payload.data, layer_sizes, keep)
}

/// An approval fault as the core's kind-neutral misbehaviour.
pub fn bad_approvals(e: ApprovalError) -> Misbehaviour {
    let fault = match e {
        ApprovalError::WrongKind { got, .. } => return Misbehaviour::KindMismatch { run: NAME, got: KindId(got) },
        ApprovalError::WrongLength { expected, got } => PayloadFault::Length { part: None, expected, got },
        ApprovalError::WrongPopcount { layer, expected, got } => {
            PayloadFault::Length { part: Some(layer), expected, got }
        }
        ApprovalError::TrailingBits { layer } => PayloadFault::NonCanonical { part: layer },
    };
    Misbehaviour::BadPayload { kind: NAME, fault }
}

/// Private FRL's settings, as clients receive them (they train as FRL
/// clients do; the noise seed is not among them).
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct FrlDpConfig {
    /// FRL's run settings (network, keep fraction, mask rule, training).
    pub run: FrlRun,
    /// The budget over the horizon.
    pub target: PrivacyTarget,
    /// δ of the (ε, δ) reports.
    pub delta: f64,
    /// Most released rounds.
    pub horizon: u32,
    /// τ in records; `None`: `⌈T / DEFAULT_THRESHOLD_DIVISOR⌉`.
    pub threshold: Option<u64>,
}

/// Private FRL in a configuration file: `{ kind = "frl-dp", epsilon = 4.0,
/// delta = 1e-5, horizon = 20 }` (or `rho = 0.5` for `epsilon`), with
/// optional `threshold` (τ, in records) and `frl = { ... }` (FRL's settings,
/// [`FrlSpec`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrlDpSpec {
    /// ε over the horizon at `delta` (exactly one of `epsilon` and `rho`).
    pub epsilon: Option<f64>,
    /// ρ (zCDP) over the horizon.
    pub rho: Option<f64>,
    /// δ (default 1e-5).
    pub delta: f64,
    /// Most released rounds (required).
    pub horizon: Option<u32>,
    /// τ in records (default `⌈T/4⌉`).
    pub threshold: Option<u64>,
    /// FRL's settings.
    pub frl: FrlSpec,
}

impl Default for FrlDpSpec {
    fn default() -> Self {
        FrlDpSpec { epsilon: None, rho: None, delta: 1e-5, horizon: None, threshold: None, frl: FrlSpec::default() }
    }
}

/// `v` rounded down to a multiple of 2⁻²⁰, refusing what is not finite and
/// positive or rounds to zero.
fn to_units(what: &str, v: f64) -> Result<u64, KindError> {
    if !(v.is_finite() && v > 0.0) {
        return Err(KindError::invalid(NAME, format!("{what} must be finite and positive")));
    }
    let units = (v * PRIVACY_DENOMINATOR as f64).floor();
    if !(1.0..=1e15).contains(&units) {
        return Err(KindError::invalid(NAME, format!("{what} = {v} is below 2^-20 or absurdly large")));
    }
    Ok(units as u64)
}

impl FrlDpSpec {
    /// The settings for a run seeded `seed` over `arch` (a supermask).
    pub fn resolve(&self, seed: u64, arch: &ModelArch) -> Result<FrlDpConfig, KindError> {
        if !(self.delta.is_finite() && self.delta > 0.0 && self.delta < 1.0) {
            return Err(KindError::invalid(NAME, "delta must be in (0, 1)"));
        }
        let rho = match (self.epsilon, self.rho) {
            (Some(_), Some(_)) => return Err(KindError::invalid(NAME, "give epsilon or rho, not both")),
            (None, None) => return Err(KindError::invalid(NAME, "a privacy budget is required: epsilon or rho")),
            (Some(e), None) => {
                if !(e.is_finite() && e > 0.0) {
                    return Err(KindError::invalid(NAME, "epsilon must be finite and positive"));
                }
                rho_for_epsilon(e, self.delta)
            }
            (None, Some(r)) => r,
        };
        let target = PrivacyTarget::Zcdp { rho_units: to_units("rho", rho)? };
        let horizon = self.horizon.ok_or_else(|| KindError::invalid(NAME, "horizon (in rounds) is required"))?;
        Ok(FrlDpConfig {
            run: self.frl.resolve(seed, arch)?,
            target,
            delta: self.delta,
            horizon,
            threshold: self.threshold,
        })
    }
}

/// The per-layer mechanisms' shared parameters for a run of
/// `clients_per_round`: `(T, τ, k_max, e)` with `e = ε_svt = ε_sel`.
pub fn mechanism_parameters(cfg: &FrlDpConfig, clients_per_round: usize) -> Result<(u64, u64, u64, Ratio), KindError> {
    let bad = |m: String| KindError::invalid(NAME, m);
    let horizon = u64::from(cfg.horizon)
        .checked_mul(clients_per_round.max(1) as u64)
        .filter(|t| (1..=MAX_HORIZON).contains(t))
        .ok_or_else(|| bad("horizon × clients_per_round must be in 1..=2^32 records".into()))?;
    let tau = cfg.threshold.unwrap_or(horizon.div_ceil(DEFAULT_THRESHOLD_DIVISOR)).max(1);
    let k_max = (2 * horizon).div_ceil(tau) + 1;
    let layers = cfg.run.vote.layer_sizes.len() as u128;
    let copies = layers * u128::from(k_max);
    let den = u128::from(PRIVACY_DENOMINATOR);
    // e = u / 2²⁰: the largest u whose total fits the target, exactly.
    let (fits, guess): (Box<dyn Fn(u128) -> bool>, f64) = match cfg.target {
        PrivacyTarget::Zcdp { rho_units } => {
            // L·k_max·u²/2⁴⁰ ≤ ρ_units/2²⁰  ⇔  L·k_max·u² ≤ ρ_units·2²⁰.
            let rho = u128::from(rho_units);
            (Box::new(move |u| copies * u * u <= rho * den), (rho_units as f64 * den as f64 / copies as f64).sqrt())
        }
        PrivacyTarget::Pure { epsilon_units } => {
            let eps = u128::from(epsilon_units);
            (Box::new(move |u| 2 * copies * u <= eps), epsilon_units as f64 / (2 * copies) as f64)
        }
    };
    let mut u = guess.floor().max(0.0) as u128 + 1;
    while u > 0 && !fits(u) {
        u -= 1;
    }
    if u == 0 {
        return Err(bad(format!(
            "the budget is too small for {layers} layers × {k_max} switches at 2^-20 resolution (raise threshold)"
        )));
    }
    let e = Ratio::new(u, den).map_err(|e| bad(e.to_string()))?;
    Ok((horizon, tau, k_max, e))
}

/// The private FRL kind.
#[derive(Debug, Clone)]
pub struct FrlDpKind {
    cfg: FrlDpConfig,
    frl: FrlKind,
    arch: ModelArch,
}

impl FrlDpKind {
    /// Private FRL over `arch` (the run's supermask network).
    pub fn new(cfg: FrlDpConfig, arch: &ModelArch) -> Result<Self, KindError> {
        let frl = FrlKind::new(cfg.run.clone(), arch)?;
        let bad = |reason: &str| Err(KindError::invalid(NAME, reason));
        if cfg.horizon == 0 {
            return bad("horizon must be at least 1");
        }
        if !(cfg.delta.is_finite() && cfg.delta > 0.0 && cfg.delta < 1.0) {
            return bad("delta must be in (0, 1)");
        }
        if cfg.threshold == Some(0) {
            return bad("threshold must be at least 1");
        }
        if cfg.run.vote.layer_sizes.iter().any(|&n| cfg.run.vote.keep_count(n) == 0) {
            return bad("k_fraction keeps no edge of some layer");
        }
        let (PrivacyTarget::Zcdp { rho_units: u } | PrivacyTarget::Pure { epsilon_units: u }) = cfg.target;
        if u == 0 {
            return bad("the privacy budget must be positive");
        }
        Ok(FrlDpKind { cfg, frl, arch: arch.clone() })
    }

    /// The settings.
    pub fn config(&self) -> &FrlDpConfig {
        &self.cfg
    }
}

impl UpdateKind for FrlDpKind {
    fn name(&self) -> &'static str {
        NAME
    }
    fn id(&self) -> KindId {
        ID
    }
    fn settings(&self) -> KindSettings {
        KindSettings::FrlDp(self.cfg.clone())
    }
    fn publication(&self) -> kind::Publication {
        kind::Publication::Encoded
    }
    fn aggregator(
        &self,
        run: &RunShape<'_>,
        rule: &RuleSpec,
        initial: &[f32],
    ) -> Result<Box<dyn Aggregator>, KindError> {
        kind::check_rule(self, rule)?;
        let seed = run.noise_seed.ok_or_else(|| {
            KindError::invalid(NAME, "the host must draw a secret noise seed for a private FRL run (none was given)")
        })?;
        if self.cfg.run.vote.num_edges() != initial.len() {
            return Err(KindError::invalid(NAME, "the model is not the network's score vector"));
        }
        let vote = FrlVote::for_run(self.cfg.run.clone(), &self.arch).map_err(|e| KindError::invalid(NAME, e))?;
        let (horizon, threshold, _, e) = mechanism_parameters(&self.cfg, run.clients_per_round)?;
        let sizes = self.cfg.run.vote.layer_sizes.clone();
        let keep: Vec<usize> = sizes.iter().map(|&n| self.cfg.run.vote.keep_count(n)).collect();
        let svt_cfgs: Vec<SvtConfig> = sizes
            .iter()
            .zip(&keep)
            .enumerate()
            .map(|(l, (&dim, &k))| SvtConfig {
                horizon,
                dim,
                target: Target::TopK { k },
                threshold,
                eps_svt: e,
                eps_sel: e,
                seed: seed.clone(),
                // At most MAX_RANKED_LAYERS (256) layers.
                instance: l as u32,
                sampler: Sampler::Buckets,
            })
            .collect();
        let svts = svt_cfgs
            .iter()
            .map(|c| SparseVector::new(c.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| KindError::invalid(NAME, e))?;
        Ok(Box::new(FrlDp {
            cfg: self.cfg.clone(),
            vote,
            svt_cfgs,
            svts,
            keep,
            per_round: run.clients_per_round,
            pending: BTreeMap::new(),
            released: 0,
            round: 0,
        }))
    }
    /// The global ranking → the global scores, as FRL.
    fn decode_published(&self, bytes: &[u8]) -> Result<Vec<f32>, Misbehaviour> {
        self.frl.decode_published(bytes)
    }
}

/// The durable state (module docs).
#[derive(Encode, Decode)]
struct Saved {
    /// The secret noise seed (the host's durable storage is secret).
    seed: [u8; 32],
    /// Each layer's mechanism.
    svts: Vec<SvtState>,
    /// The global ranking, flat.
    ranking: Vec<u32>,
    /// Rounds released.
    released: u64,
}

/// Private FRL's aggregator (module docs).
#[derive(Debug)]
pub struct FrlDp {
    cfg: FrlDpConfig,
    /// The global ranking, `s̄` and the kept positions.
    vote: FrlVote,
    svt_cfgs: Vec<SvtConfig>,
    svts: Vec<SparseVector>,
    /// `w_l`.
    keep: Vec<usize>,
    per_round: usize,
    /// The round's checked approvals, by client.
    pending: BTreeMap<ClientIndex, (u64, f32, Approvals)>,
    /// Rounds released.
    released: u64,
    round: u32,
}

impl FrlDp {
    /// Privacy spent so far (all layers' mechanisms together).
    pub fn privacy(&self) -> PrivacySpent {
        let spent = self.spent();
        PrivacySpent {
            releases: self.released,
            rho: spent.rho.to_f64(),
            epsilon: spent.epsilon_for_delta(self.cfg.delta),
            delta: self.cfg.delta,
        }
    }

    /// Σ over layers of what each mechanism was charged (basic composition:
    /// they read the same records).
    pub fn spent(&self) -> Spent {
        let mut total = Spent { epsilon: Some(Ratio::ZERO), rho: Ratio::ZERO };
        for m in &self.svts {
            let s = m.spent();
            // The sums are at most the checked budget, far inside u128.
            total.rho = total.rho.checked_add(s.rho).unwrap_or(total.rho);
            total.epsilon = match (total.epsilon, s.epsilon) {
                (Some(a), Some(b)) => a.checked_add(b).ok(),
                _ => None,
            };
        }
        total
    }

    /// The released kept set of layer `l`, ascending.
    pub fn released_set(&self, l: usize) -> &[u32] {
        &self.svts[l].state().selected
    }

    /// The global ranking.
    pub fn global_ranking(&self) -> &Ranking {
        &self.vote.global
    }

    /// The new global ranking from the released sets (module docs).
    fn rebuild_ranking(&mut self) {
        for l in 0..self.keep.len() {
            let (start, end) = (self.vote.offsets[l], self.vote.offsets[l + 1]);
            let mut member = vec![false; end - start];
            for &j in &self.svts[l].state().selected {
                member[j as usize] = true;
            }
            let prev = &self.vote.global.order[start..end];
            let chosen: Vec<u32> = prev.iter().copied().filter(|&e| member[e as usize]).collect();
            let others: Vec<u32> = prev.iter().copied().filter(|&e| !member[e as usize]).collect();
            let [low, high] = self.vote.kept_positions(l);
            // |chosen| = w_l = |low| + |high|: the selection has k = w_l
            // distinct edges (SvtState invariant).
            let mut next = Vec::with_capacity(end - start);
            next.extend_from_slice(&chosen[..low.len()]);
            next.extend_from_slice(&others);
            next.extend_from_slice(&chosen[low.len()..]);
            debug_assert_eq!(next.len(), high.end);
            self.vote.global.order[start..end].copy_from_slice(&next);
        }
    }
}

impl Aggregator for FrlDp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn begin_round(&mut self, round: u32, _global: &[f32]) {
        self.round = round;
        self.pending.clear();
    }

    fn absorb(&mut self, client: ClientIndex, update: &ClientUpdate) -> Result<(), Misbehaviour> {
        check_common(update)?;
        if self.pending.contains_key(&client) {
            return Err(Misbehaviour::Duplicate(self.round));
        }
        if self.pending.len() >= self.per_round {
            // T counts clients_per_round records per round; more would
            // overrun the mechanisms' horizon.
            return Err(Misbehaviour::Unexpected("more private FRL votes in a round than clients_per_round"));
        }
        let a = decode_payload(&update.payload, &self.cfg.run.vote.layer_sizes, &self.keep).map_err(bad_approvals)?;
        self.pending.insert(client, (update.num_samples, update.train_loss, a));
        Ok(())
    }

    fn finish(&mut self, global: &mut [f32]) -> Result<AggregateStats, AggregateError> {
        if self.pending.is_empty() {
            return Err(AggregateError::Empty);
        }
        let pending = std::mem::take(&mut self.pending);
        // Ascending client order: the mechanisms' state after the round
        // does not depend on arrival order.
        for (_, _, a) in pending.values() {
            for (l, m) in self.svts.iter_mut().enumerate() {
                m.step(&a.record(l)).map_err(|e| AggregateError::Privacy(Box::new(e)))?;
            }
        }
        self.released += 1;
        self.rebuild_ranking();
        if global.len() == self.vote.sorted.len() {
            self.vote.write_global_scores(global);
        }
        let samples = pending.values().fold(0u64, |t, (n, ..)| t.saturating_add(*n));
        let loss = pending.values().map(|(n, l, _)| *n as f64 * f64::from(*l)).sum::<f64>() / samples.max(1) as f64;
        Ok(AggregateStats { updates: pending.len(), samples, train_loss: loss, privacy: Some(self.privacy()) })
    }

    fn publish(&self, _global: &[f32]) -> ModelSync {
        ModelSync::Published(encode(&self.vote.global))
    }

    fn state(&self) -> Option<AggregatorState> {
        let saved = Saved {
            // A run has at least one layer (FrlConfig::validate), and every
            // layer's mechanism shares the run's seed.
            seed: *self.svt_cfgs[0].seed.as_bytes(),
            svts: self.svts.iter().map(|m| m.state().clone()).collect(),
            ranking: self.vote.global.order.clone(),
            released: self.released,
        };
        // Encoding plain vectors and integers into a Vec can't fail.
        let bytes = bincode::encode_to_vec(&saved, bincode::config::standard()).unwrap_or_default();
        Some(AggregatorState { name: NAME.into(), version: STATE_VERSION, bytes })
    }

    fn restore_state(&mut self, state: &AggregatorState) -> Result<(), StateError> {
        state.expect(NAME, STATE_VERSION)?;
        let invalid = |reason| StateError::Invalid { name: NAME, reason };
        let (saved, used): (Saved, usize) = bincode::decode_from_slice(&state.bytes, bincode::config::standard())
            .map_err(|_| invalid("undecodable"))?;
        if used != state.bytes.len() {
            return Err(invalid("trailing bytes"));
        }
        if saved.svts.len() != self.svts.len() || saved.released > u64::from(self.cfg.horizon) {
            return Err(invalid("layer count or rounds released out of range"));
        }
        let records = saved.svts.first().map(|s| s.t).unwrap_or(0);
        if saved.svts.iter().any(|s| s.t != records) || records > saved.released * self.per_round as u64 {
            return Err(invalid("the layers' mechanisms disagree on the records taken"));
        }
        let ranking = Ranking::from_flat(saved.ranking, &self.cfg.run.vote.layer_sizes)
            .map_err(|_| invalid("the global ranking is not a permutation of every layer"))?;
        let seed = NoiseSeed::from_bytes(saved.seed);
        let mut cfgs = self.svt_cfgs.clone();
        let mut svts = Vec::with_capacity(cfgs.len());
        for (c, s) in cfgs.iter_mut().zip(&saved.svts) {
            c.seed = seed.clone();
            svts.push(SparseVector::restore(c.clone(), s).map_err(|_| invalid("mechanism state"))?);
        }
        self.svt_cfgs = cfgs;
        self.svts = svts;
        self.vote.global = ranking;
        self.released = saved.released;
        Ok(())
    }

    /// Keeps the saved ranking when `global` is its scores (ties in `s̄` make
    /// the ranking of scores ambiguous, and the next release's order depends
    /// on it); otherwise takes the ranking of `global` (FRL's rule).
    fn restore_model(&mut self, global: &[f32]) -> Result<(), StateError> {
        let mut scores = vec![0f32; global.len()];
        if global.len() == self.vote.sorted.len() {
            self.vote.write_global_scores(&mut scores);
            if scores == global {
                return Ok(());
            }
        }
        self.vote.restore_model(global)
    }

    fn exhausted(&self) -> bool {
        self.released >= u64::from(self.cfg.horizon)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::frl::MaskRule;
    use crate::supermask::FrlArch;

    const NET: FrlArch = FrlArch::Conv2 { channels: 1, side: 2, classes: 2 };

    fn arch() -> ModelArch {
        ModelArch::Supermask(NET)
    }

    fn config(rho: f64, horizon: u32, mask: MaskRule) -> FrlDpConfig {
        let spec = FrlDpSpec {
            rho: Some(rho),
            horizon: Some(horizon),
            frl: FrlSpec { mask, ..FrlSpec::default() },
            ..FrlDpSpec::default()
        };
        spec.resolve(5, &arch()).unwrap()
    }

    fn aggregator(cfg: &FrlDpConfig, per_round: usize, seed: u64) -> Box<dyn Aggregator> {
        let a = arch();
        let seed = NoiseSeed::insecure_from_u64(seed);
        let shape = RunShape {
            arch: &a,
            clients_per_round: per_round,
            rounds: 10,
            max_update_abs: f32::MAX,
            noise_seed: Some(&seed),
        };
        let kind = FrlDpKind::new(cfg.clone(), &a).unwrap();
        kind.aggregator(&shape, &RuleSpec::Mean, &vec![0.0; cfg.run.vote.num_edges()]).unwrap()
    }

    /// Approvals keeping the first `w_l` edges of `order` in each layer.
    fn approvals_of(cfg: &FrlDpConfig, pick: impl Fn(usize, usize) -> Vec<usize>) -> Approvals {
        let masks: Vec<Vec<bool>> = cfg
            .run
            .vote
            .layer_sizes
            .iter()
            .enumerate()
            .map(|(l, &n)| {
                let mut m = vec![false; n];
                for e in pick(l, cfg.run.vote.keep_count(n)) {
                    m[e] = true;
                }
                m
            })
            .collect();
        Approvals::from_masks(&masks)
    }

    fn update(a: &Approvals) -> ClientUpdate {
        ClientUpdate { num_samples: 2, train_loss: 0.5, payload: a.payload() }
    }

    #[test]
    fn frl_dp_approvals_round_trip_and_every_fault_is_typed() {
        let sizes = [3usize, 8, 10];
        let keep = [2usize, 4, 5];
        let masks: Vec<Vec<bool>> =
            sizes.iter().zip(&keep).map(|(&n, &w)| (0..n).map(|e| (e * 7 + 1) % n < w).collect()).collect();
        let a = Approvals::from_masks(&masks);
        assert_eq!(a.as_bytes().len(), approvals_len(&sizes));
        assert_eq!(approvals_len(&sizes), 1 + 1 + 2);
        let back = decode_approvals(a.as_bytes(), &sizes, &keep).unwrap();
        assert_eq!(back, a);
        for (l, m) in masks.iter().enumerate() {
            let ones: Vec<u32> = (0..m.len()).filter(|&e| m[e]).map(|e| e as u32).collect();
            assert_eq!(back.approved(l), ones);
            assert_eq!(back.record(l), m.iter().map(|&b| i64::from(b)).collect::<Vec<_>>());
        }
        // The documented layout: layer 0 = edges {0, 2}? (e·7+1) mod 3 < 2
        // holds for e = 0 (1) and e = 2 (0): bits 0 and 2 = 0x05.
        assert_eq!(a.as_bytes()[0], 0x05);
        let bytes = a.as_bytes().to_vec();
        assert_eq!(
            decode_approvals(&bytes[1..], &sizes, &keep),
            Err(ApprovalError::WrongLength { expected: 4, got: 3 })
        );
        assert_eq!(
            decode_approvals(&[bytes.clone(), vec![0]].concat(), &sizes, &keep),
            Err(ApprovalError::WrongLength { expected: 4, got: 5 })
        );
        let mut extra = bytes.clone();
        extra[0] |= 0x08; // bit 3 of a 3-edge layer
        assert_eq!(decode_approvals(&extra, &sizes, &keep), Err(ApprovalError::TrailingBits { layer: 0 }));
        let mut more = bytes.clone();
        more[1] = 0xff; // all 8 edges of layer 1
        assert_eq!(
            decode_approvals(&more, &sizes, &keep),
            Err(ApprovalError::WrongPopcount { layer: 1, expected: 4, got: 8 })
        );
        let mut fewer = bytes.clone();
        fewer[3] = 0;
        assert!(matches!(
            decode_approvals(&fewer, &sizes, &keep),
            Err(ApprovalError::WrongPopcount { layer: 2, expected: 5, .. })
        ));
        let wrong = UpdatePayload { kind: crate::frl::ID, data: bytes.clone() };
        assert_eq!(decode_payload(&wrong, &sizes, &keep), Err(ApprovalError::WrongKind { expected: 6, got: 2 }));
        assert!(matches!(
            bad_approvals(ApprovalError::WrongKind { expected: 6, got: 2 }),
            Misbehaviour::KindMismatch { .. }
        ));
        assert!(approvals_len(&[MAX_RANKED_EDGES]) <= MAX_APPROVAL_BYTES);
    }

    #[test]
    fn frl_dp_budget_is_split_exactly_and_spent_is_reported() {
        let cfg = config(0.5, 6, MaskRule::TwoSided);
        let (t, tau, k_max, e) = mechanism_parameters(&cfg, 4).unwrap();
        assert_eq!((t, tau, k_max), (24, 6, 9));
        let layers = cfg.run.vote.layer_sizes.len() as u128;
        let rho = Ratio::new(1 << 19, 1 << 20).unwrap();
        let total = Ratio::integer(layers * 9).checked_mul(e.checked_mul(e).unwrap()).unwrap();
        assert!(total <= rho, "{total} > {rho}");
        // The next multiple of 2⁻²⁰ would not fit: e is the largest.
        let up = e.checked_add(Ratio::new(1, 1 << 20).unwrap()).unwrap();
        assert!(Ratio::integer(layers * 9).checked_mul(up.checked_mul(up).unwrap()).unwrap() > rho);
        // Pure: 2·L·k_max·e ≤ ε.
        let pure = FrlDpConfig { target: PrivacyTarget::Pure { epsilon_units: 3 << 20 }, ..cfg.clone() };
        let (.., e) = mechanism_parameters(&pure, 4).unwrap();
        assert!(Ratio::integer(2 * layers * 9).checked_mul(e).unwrap() <= Ratio::integer(3));
        // Too small a budget is refused, not rounded to zero.
        let tiny = FrlDpConfig { target: PrivacyTarget::Pure { epsilon_units: 1 }, ..cfg.clone() };
        assert!(mechanism_parameters(&tiny, 4).is_err());

        // Spent after a run: the initial instances, then the charges of the
        // switches; never above ρ; reported per round and growing.
        let mut agg = aggregator(&cfg, 4, 1);
        let mut last = 0.0;
        let mut global = vec![0.0; cfg.run.vote.num_edges()];
        for round in 1..=6u32 {
            agg.begin_round(round, &global);
            for c in 0..4u32 {
                let a = approvals_of(&cfg, |_, w| (0..w).collect());
                agg.absorb(c as ClientIndex, &update(&a)).unwrap();
            }
            let stats = agg.finish(&mut global).unwrap();
            let p = stats.privacy.unwrap();
            assert_eq!(p.releases, u64::from(round));
            assert!(p.rho >= last && p.rho <= 0.5 + 1e-12, "round {round}: rho {}", p.rho);
            assert!(p.rho > 0.0);
            last = p.rho;
        }
        assert!(agg.exhausted());
    }

    #[test]
    fn frl_dp_unanimous_votes_become_the_mask_and_state_restores_bit_identically() {
        for mask in [MaskRule::OneSidedTopK, MaskRule::TwoSided] {
            // A huge budget (ρ = 10⁸): the released set is the approved one.
            let cfg = config(1e8, 8, mask);
            let n_edges = cfg.run.vote.num_edges();
            // Everyone approves the last w_l edges of each layer.
            let pick = |l: usize, w: usize| {
                let n = cfg.run.vote.layer_sizes[l];
                (n - w..n).collect::<Vec<_>>()
            };
            let run = |crash_after: Option<u32>| {
                let mut agg = aggregator(&cfg, 3, 7);
                let mut global = vec![0.0f32; n_edges];
                let mut published = Vec::new();
                for round in 1..=8u32 {
                    agg.begin_round(round, &global);
                    for c in [2u32, 0, 1] {
                        agg.absorb(c as ClientIndex, &update(&approvals_of(&cfg, pick))).unwrap();
                    }
                    agg.finish(&mut global).unwrap();
                    published.push(agg.publish(&global));
                    if crash_after == Some(round) {
                        let state = agg.state().unwrap();
                        let mut fresh = aggregator(&cfg, 3, 99);
                        fresh.restore_model(&global).unwrap();
                        fresh.restore_state(&state).unwrap();
                        agg = fresh;
                    }
                }
                (global, published, agg.exhausted())
            };
            let (global, published, exhausted) = run(None);
            assert!(exhausted);
            for cut in [1, 4, 7] {
                assert_eq!(run(Some(cut)), (global.clone(), published.clone(), true), "{mask:?}, cut {cut}");
            }
            // The clients' mask (the kept positions of the published ranking)
            // is the released set; for the small layers (where ε_sel/(2w)
            // per pick times the gap, ρ = 10⁸ and 24 records, is large) that
            // is the unanimous approval set. In the 36,864-edge layer each
            // pick gets too little of the budget: PF-top-k's price for a
            // large k, the reason full-size private FRL is hopeless.
            let ModelSync::Published(bytes) = published.last().unwrap() else { panic!() };
            let kind = FrlDpKind::new(cfg.clone(), &arch()).unwrap();
            let scores = kind.decode_published(bytes).unwrap();
            assert_eq!(scores, global);
            let vote = FrlVote::for_run(cfg.run.clone(), &arch()).unwrap();
            let ranking = crate::frl::decode(bytes, &cfg.run.vote.layer_sizes).unwrap();
            let state = run_state(&cfg);
            let sizes = &cfg.run.vote.layer_sizes;
            for (l, &n) in sizes.iter().enumerate() {
                let [low, high] = vote.kept_positions(l);
                let mut kept: Vec<u32> = low.chain(high).map(|p| ranking.layer(l)[p]).collect();
                kept.sort_unstable();
                assert_eq!(kept, state.svts[l].selected, "{mask:?}, layer {l}: mask is not the released set");
                if n <= 576 {
                    let want: Vec<u32> = pick(l, cfg.run.vote.keep_count(n)).into_iter().map(|e| e as u32).collect();
                    assert_eq!(kept, want, "{mask:?}, layer {l}");
                }
            }
        }
    }

    /// The durable state of an 8-round unanimous run of `cfg`, decoded.
    fn run_state(cfg: &FrlDpConfig) -> Saved {
        let mut agg = aggregator(cfg, 3, 7);
        let mut global = vec![0.0f32; cfg.run.vote.num_edges()];
        for round in 1..=8u32 {
            agg.begin_round(round, &global);
            for c in 0..3u32 {
                let a = approvals_of(cfg, |l, w| {
                    let n = cfg.run.vote.layer_sizes[l];
                    (n - w..n).collect()
                });
                agg.absorb(c as ClientIndex, &update(&a)).unwrap();
            }
            agg.finish(&mut global).unwrap();
        }
        let bytes = agg.state().unwrap().bytes;
        bincode::decode_from_slice(&bytes, bincode::config::standard()).unwrap().0
    }

    #[test]
    fn frl_dp_refuses_bad_votes_and_a_seedless_run() {
        let cfg = config(1.0, 4, MaskRule::TwoSided);
        let mut agg = aggregator(&cfg, 2, 1);
        agg.begin_round(1, &[]);
        let good = approvals_of(&cfg, |_, w| (0..w).collect());
        agg.absorb(0 as ClientIndex, &update(&good)).unwrap();
        assert!(matches!(agg.absorb(0 as ClientIndex, &update(&good)), Err(Misbehaviour::Duplicate(1))));
        let frl = ClientUpdate {
            payload: UpdatePayload { kind: crate::frl::ID, data: good.as_bytes().to_vec() },
            ..update(&good)
        };
        assert!(matches!(agg.absorb(1 as ClientIndex, &frl), Err(Misbehaviour::KindMismatch { .. })));
        let heavy = approvals_of(&cfg, |l, w| (0..(w + 1).min(cfg.run.vote.layer_sizes[l])).collect());
        assert!(matches!(agg.absorb(1 as ClientIndex, &update(&heavy)), Err(Misbehaviour::BadPayload { .. })));
        agg.absorb(1 as ClientIndex, &update(&good)).unwrap();
        assert!(matches!(agg.absorb(2 as ClientIndex, &update(&good)), Err(Misbehaviour::Unexpected(_))));
        let a = arch();
        let shape = RunShape { arch: &a, clients_per_round: 2, rounds: 4, max_update_abs: 1.0, noise_seed: None };
        let kind = FrlDpKind::new(cfg.clone(), &a).unwrap();
        assert!(kind.aggregator(&shape, &RuleSpec::Mean, &vec![0.0; cfg.run.vote.num_edges()]).is_err());
        assert!(kind.aggregator(&shape, &RuleSpec::Median, &vec![0.0; cfg.run.vote.num_edges()]).is_err());
    }
}
