//! DP-FTRL for dense updates (Kairouz, McMahan, Song, Thakkar, Thakurta, Xu,
//! "Practical and Private (Deep) Learning without Sampling or Shuffling",
//! ICML 2021): differentially private federated training whose privacy does
//! not rest on random sampling of clients, by the binary-tree mechanism
//! ([`crate::dp::tree`]) over the stream of the rounds' summed updates.
//!
//! **Clients** train exactly as FedAvg clients do and send the dense delta
//! `local − global` (FedAvg's payload, tagged [`ID`]). They may clip it
//! themselves; the server clips regardless, so a hostile client can't skip
//! it.
//!
//! **Server, per round t** (the round's accepted deltas in ascending client
//! order):
//!
//! 1. *Clip:* `u ← u · min(1, C/‖u‖)` in f64 (`‖·‖` the L2 norm for
//!    Gaussian noise, L1 for Laplace noise).
//! 2. *Fixed point:* `x = round(u · B/C)` to the nearest integer, with `B`
//!    the clip norm in integer units ([`clip_units`]: `2¹⁶`, less when many
//!    clients per round would overflow the tree's bound). Rounding can make
//!    `‖x‖` exceed `B` (by up to `√d/2` in L2); the norm is then checked
//!    exactly in integers and, if above `B`, every coordinate is scaled by
//!    `B/⌈‖x‖⌉` with truncation toward zero, which cannot increase any
//!    coordinate's magnitude. So every contribution satisfies `‖x‖ ≤ B`
//!    *exactly*, and the sensitivity below holds with no rounding slack.
//! 3. *Sum* the round's integer contributions: the record `r_t ∈ ℤ^d`.
//! 4. *Release* the noisy prefix sum `s_t ≈ Σ_{k≤t} r_k` through the tree
//!    (domain [`RecordDomain::ClippedSum`]: at most `clients_per_round`
//!    contributions of norm ≤ B).
//! 5. *Update:* the round's noisy mean delta is the difference of
//!    consecutive releases, `Δ_t = (s_t − s_{t−1}) · C / (B · n)` with `n =
//!    clients_per_round` (a fixed normaliser, set before the run, so it
//!    reveals nothing about who took part); with server momentum β and
//!    learning rate η, `v_t = β·v_{t−1} + Δ_t` and `θ_t = θ_{t−1} + η·v_t`,
//!    in f64 per coordinate, `θ` rounded to f32 once. With β = 0 this is the
//!    FTRL form `θ_t = θ_0 + η·C/(B·n) · s_t` (up to the f32 rounding of
//!    each step): the noise of a release is not summed over rounds, only
//!    the tree's `popcount(t)` node noises are in the model at any time.
//!    Kairouz et al. use momentum 0.9 (their DP-FTRLM); it is the default.
//!
//! **Privacy.** Neighbouring runs differ in *one client's update in one
//! round* (replaced by any other update), the notion of the DP-FTRL paper
//! for a client that takes part once. The tree is then ρ-zCDP (Gaussian) or
//! ε-DP (Laplace) over the whole run, whatever the clients and rounds are,
//! with no sampling or shuffling assumption. **It is not user-level
//! privacy:** a client that takes part in `k` rounds changes `k` records,
//! and its guarantee is `k²·ρ` (zCDP group privacy over `k` records, each
//! in every level's node once) or `k·ε`. Runs where every client takes
//! part at most once are user-level private at the stated budget.
//!
//! **Horizon.** The tree is built for `horizon` releases. A release past it
//! is refused ([`AggregateError::Privacy`]), and [`Aggregator::exhausted`]
//! makes the coordinator end the run after `horizon` aggregated rounds even
//! if `rounds` is larger. Rounds that close without a release (too few
//! updates) spend nothing.
//!
//! **Noise seed.** The noise comes from the server's secret
//! [`NoiseSeed`] (never sent: the clients would subtract the noise), which
//! the host draws ([`RunShape::noise_seed`]) and which this aggregator
//! keeps in its durable state with the tree's state, the last release and
//! the velocity ([`Aggregator::state`], format [`STATE_VERSION`]). A server
//! restored from its snapshot regenerates every node's noise and continues
//! bit for bit. The ledger of privacy spent is a function of the releases
//! made; it is stored too and checked against the tree's on restore.
//!
//! **Publishes:** the full model, as FedAvg.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::aggregate::{
    AggregateError, AggregateStats, Aggregator, AggregatorState, ClientIndex, PrivacySpent, StateError, check_common,
};
use crate::dp::tree::{MAX_HORIZON, MAX_RECORD_L1, TreeRelease};
use crate::dp::{ClipNorm, NoiseSeed, Ratio, RecordDomain, TreeConfig, TreeCounter, TreeNoise, TreeState};
use crate::error::Misbehaviour;
use crate::fedavg::{commit_step, decode_delta, dense_model};
use crate::kind::{self, KindError, KindId, KindSettings, RuleSpec, RunShape, UpdateKind};
use crate::model::ModelArch;
use crate::wire::{ClientUpdate, ModelSync};

/// The kind's name in configuration files.
pub const NAME: &str = "dp-ftrl";
/// Tag of DP-FTRL payloads.
pub const ID: KindId = KindId(5);
/// Format version of the aggregator's durable state ([`Aggregator::state`]).
pub const STATE_VERSION: u32 = 1;
/// The clip norm in integer units when few clients take part: `2¹⁶`, so a
/// contribution's fixed-point rounding (at most half a unit per coordinate)
/// is far below both the clip norm and the noise (whose standard deviation
/// per coordinate is `B·√(2L/ρ)` units, many times `B`).
pub const MAX_CLIP_UNITS: u64 = 1 << 16;
/// The fewest integer units the clip norm may have: below `2⁸` the rounding
/// would distort the updates (a run with more than `2¹⁶` clients per round
/// is refused).
pub const MIN_CLIP_UNITS: u64 = 1 << 8;
/// Privacy parameters (ε, ρ) from a configuration file are rounded *down*
/// to a multiple of `2⁻²⁰`, so that the exact arithmetic of the noise
/// parameters stays within its limits (`dp::sampler::MAX_PARAM_PART`) and
/// the run never spends more than was asked.
pub const PRIVACY_DENOMINATOR: u64 = 1 << 20;
/// The tree's instance number among the run's DP mechanisms (the `round` of
/// its noise streams, [`crate::dp::noise`]).
pub const TREE_INSTANCE: u32 = 0;

/// `B`, the clip norm in integer units, for rounds of at most
/// `clients_per_round` contributions: `2¹⁶`, or `⌊2²⁴ / clients_per_round⌋`
/// when that is smaller (the tree needs `count·B ≤ 2²⁴`,
/// [`MAX_RECORD_L1`]).
pub fn clip_units(clients_per_round: usize) -> u64 {
    (MAX_RECORD_L1 / (clients_per_round.max(1) as u64)).min(MAX_CLIP_UNITS)
}

/// The privacy target of the run, over the whole horizon. Exact: `num /
/// PRIVACY_DENOMINATOR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum PrivacyTarget {
    /// ρ-zCDP with discrete Gaussian node noise; updates clipped in L2.
    Zcdp {
        /// ρ · 2²⁰.
        rho_units: u64,
    },
    /// Pure ε-DP with discrete Laplace node noise; updates clipped in L1.
    Pure {
        /// ε · 2²⁰.
        epsilon_units: u64,
    },
}

impl PrivacyTarget {
    fn ratio(units: u64) -> Ratio {
        // PRIVACY_DENOMINATOR is not zero.
        Ratio::new(u128::from(units), u128::from(PRIVACY_DENOMINATOR)).unwrap_or(Ratio::ZERO)
    }

    fn tree_noise(&self) -> TreeNoise {
        match *self {
            PrivacyTarget::Zcdp { rho_units } => TreeNoise::Gaussian { rho: Self::ratio(rho_units) },
            PrivacyTarget::Pure { epsilon_units } => TreeNoise::Laplace { epsilon: Self::ratio(epsilon_units) },
        }
    }

    fn norm(&self) -> ClipNorm {
        match self {
            PrivacyTarget::Zcdp { .. } => ClipNorm::L2,
            PrivacyTarget::Pure { .. } => ClipNorm::L1,
        }
    }
}

/// DP-FTRL's settings, as clients receive them (for transparency: clients
/// train as FedAvg clients do). The noise seed is not among them.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct DpFtrlConfig {
    /// The budget over the horizon and the noise it implies.
    pub target: PrivacyTarget,
    /// δ of the (ε, δ) reports (zCDP converted, [`crate::dp::Spent::epsilon_for_delta`]).
    pub delta: f64,
    /// T: most releases (aggregated rounds) of the run.
    pub horizon: u32,
    /// C: the norm each client's update is clipped to.
    pub clip_norm: f32,
    /// η: the server learning rate.
    pub server_lr: f32,
    /// β: server momentum, in `[0, 1)`.
    pub momentum: f32,
}

/// Which noise, as written in a configuration file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoiseSpec {
    /// Discrete Gaussian, ρ-zCDP, L2 clipping (default).
    #[default]
    Gaussian,
    /// Discrete Laplace, pure ε-DP, L1 clipping.
    Laplace,
}

/// DP-FTRL in a configuration file: `{ kind = "dp-ftrl", epsilon = 4.0,
/// delta = 1e-5, horizon = 50, clip_norm = 1.0 }`, or `rho = 0.1` in place
/// of `epsilon`. With Gaussian noise (the default) `epsilon` is the (ε, δ)
/// target, converted to the largest ρ whose report at `delta` is at most ε;
/// with `noise = "laplace"` it is a pure ε and `rho` is refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpFtrlSpec {
    /// ε over the horizon (exactly one of `epsilon` and `rho`).
    pub epsilon: Option<f64>,
    /// ρ (zCDP) over the horizon.
    pub rho: Option<f64>,
    /// δ for (ε, δ) (default 1e-5).
    pub delta: f64,
    /// T, the most aggregated rounds (required).
    pub horizon: Option<u32>,
    /// C (default 1.0).
    pub clip_norm: f32,
    /// Noise (default Gaussian).
    pub noise: NoiseSpec,
    /// η (default 1.0).
    pub server_lr: f32,
    /// β (default 0.9, as Kairouz et al.).
    pub momentum: f32,
}

impl Default for DpFtrlSpec {
    fn default() -> Self {
        DpFtrlSpec {
            epsilon: None,
            rho: None,
            delta: 1e-5,
            horizon: None,
            clip_norm: 1.0,
            noise: NoiseSpec::Gaussian,
            server_lr: 1.0,
            momentum: 0.9,
        }
    }
}

/// The largest ρ whose (ε, δ) report `ρ + 2√(ρ·ln(1/δ))` is at most ε:
/// `(√(ln(1/δ) + ε) − √ln(1/δ))²`.
pub fn rho_for_epsilon(epsilon: f64, delta: f64) -> f64 {
    let a = (1.0 / delta).ln();
    ((a + epsilon).sqrt() - a.sqrt()).powi(2)
}

/// `v` rounded down to a multiple of 2⁻²⁰, refusing what is not finite
/// and positive or rounds to zero.
fn to_units(what: &str, v: f64) -> Result<u64, KindError> {
    if !(v.is_finite() && v > 0.0) {
        return Err(KindError::invalid(NAME, format!("{what} must be finite and positive")));
    }
    let units = (v * PRIVACY_DENOMINATOR as f64).floor();
    if units < 1.0 {
        return Err(KindError::invalid(NAME, format!("{what} = {v} is below 2^-20 (PRIVACY_DENOMINATOR)")));
    }
    if units > 1e15 {
        return Err(KindError::invalid(NAME, format!("{what} = {v} is too large to mean anything")));
    }
    Ok(units as u64)
}

impl DpFtrlSpec {
    /// The settings this spec names.
    pub fn resolve(&self) -> Result<DpFtrlConfig, KindError> {
        if !(self.delta.is_finite() && self.delta > 0.0 && self.delta < 1.0) {
            return Err(KindError::invalid(NAME, "delta must be in (0, 1)"));
        }
        let target = match (self.noise, self.epsilon, self.rho) {
            (_, Some(_), Some(_)) => return Err(KindError::invalid(NAME, "give epsilon or rho, not both")),
            (_, None, None) => return Err(KindError::invalid(NAME, "a privacy budget is required: epsilon or rho")),
            (NoiseSpec::Gaussian, Some(e), None) => {
                if !(e.is_finite() && e > 0.0) {
                    return Err(KindError::invalid(NAME, "epsilon must be finite and positive"));
                }
                PrivacyTarget::Zcdp {
                    rho_units: to_units("rho (from epsilon and delta)", rho_for_epsilon(e, self.delta))?,
                }
            }
            (NoiseSpec::Gaussian, None, Some(r)) => PrivacyTarget::Zcdp { rho_units: to_units("rho", r)? },
            (NoiseSpec::Laplace, Some(e), None) => PrivacyTarget::Pure { epsilon_units: to_units("epsilon", e)? },
            (NoiseSpec::Laplace, None, Some(_)) => {
                return Err(KindError::invalid(NAME, "Laplace noise is pure epsilon-DP: give epsilon, not rho"));
            }
        };
        let horizon = self.horizon.ok_or_else(|| KindError::invalid(NAME, "horizon (T, in rounds) is required"))?;
        Ok(DpFtrlConfig {
            target,
            delta: self.delta,
            horizon,
            clip_norm: self.clip_norm,
            server_lr: self.server_lr,
            momentum: self.momentum,
        })
    }
}

/// The DP-FTRL kind.
#[derive(Debug, Clone)]
pub struct DpFtrlKind {
    cfg: DpFtrlConfig,
}

impl DpFtrlKind {
    /// DP-FTRL over `arch` (any dense model).
    pub fn new(cfg: DpFtrlConfig, arch: &ModelArch) -> Result<Self, KindError> {
        dense_model(NAME, arch)?;
        let bad = |reason: &str| Err(KindError::invalid(NAME, reason));
        if cfg.horizon == 0 || u64::from(cfg.horizon) > MAX_HORIZON {
            return bad("horizon must be at least 1");
        }
        if !(cfg.clip_norm.is_finite() && cfg.clip_norm > 0.0) {
            return bad("clip_norm must be finite and positive");
        }
        if !(cfg.server_lr.is_finite() && cfg.server_lr > 0.0) {
            return bad("server_lr must be finite and positive");
        }
        if !(cfg.momentum.is_finite() && (0.0..1.0).contains(&cfg.momentum)) {
            return bad("momentum must be in [0, 1)");
        }
        if !(cfg.delta.is_finite() && cfg.delta > 0.0 && cfg.delta < 1.0) {
            return bad("delta must be in (0, 1)");
        }
        let (PrivacyTarget::Zcdp { rho_units: u } | PrivacyTarget::Pure { epsilon_units: u }) = cfg.target;
        if u == 0 {
            return bad("the privacy budget must be positive");
        }
        Ok(DpFtrlKind { cfg })
    }

    /// The settings.
    pub fn config(&self) -> &DpFtrlConfig {
        &self.cfg
    }
}

impl UpdateKind for DpFtrlKind {
    fn name(&self) -> &'static str {
        NAME
    }
    fn id(&self) -> KindId {
        ID
    }
    fn settings(&self) -> KindSettings {
        KindSettings::DpFtrl(self.cfg.clone())
    }
    // `rules`: the trait's default, the mean only. The tree releases a sum;
    // robust rules have no private counterpart here.
    fn aggregator(
        &self,
        run: &RunShape<'_>,
        rule: &RuleSpec,
        initial: &[f32],
    ) -> Result<Box<dyn Aggregator>, KindError> {
        kind::check_rule(self, rule)?;
        let seed = run.noise_seed.ok_or_else(|| {
            KindError::invalid(NAME, "the host must draw a secret noise seed for a DP-FTRL run (none was given)")
        })?;
        let units = clip_units(run.clients_per_round);
        if units < MIN_CLIP_UNITS {
            return Err(KindError::invalid(
                NAME,
                format!(
                    "clients_per_round = {} leaves the clip norm {units} integer units (MIN_CLIP_UNITS)",
                    run.clients_per_round
                ),
            ));
        }
        let dim = initial.len();
        let tree_cfg = TreeConfig {
            horizon: u64::from(self.cfg.horizon),
            dim,
            domain: RecordDomain::ClippedSum {
                norm: self.cfg.target.norm(),
                bound: units,
                count: run.clients_per_round as u64,
            },
            noise: self.cfg.target.tree_noise(),
            seed: seed.clone(),
            instance: TREE_INSTANCE,
        };
        let tree = TreeCounter::new(tree_cfg.clone()).map_err(|e| KindError::invalid(NAME, e))?;
        Ok(Box::new(DpFtrl {
            cfg: self.cfg.clone(),
            tree_cfg,
            tree,
            units,
            normaliser: run.clients_per_round,
            pending: Vec::new(),
            previous: vec![0; dim],
            velocity: vec![0.0; dim],
        }))
    }
}

/// A client's delta clipped to norm `clip` and scaled to integers with the
/// clip norm worth `units` (module docs, steps 1–2): the result's norm is
/// at most `units`, exactly.
pub fn clip_to_fixed_point(delta: &[f32], clip: f32, units: u64, norm: ClipNorm) -> Vec<i64> {
    let measure = |v: &mut dyn Iterator<Item = f64>| -> f64 {
        match norm {
            ClipNorm::L1 => v.map(f64::abs).sum(),
            ClipNorm::L2 => v.map(|x| x * x).sum::<f64>().sqrt(),
        }
    };
    let n = measure(&mut delta.iter().map(|v| f64::from(*v)));
    let clip = f64::from(clip);
    let factor = if n > clip { clip / n } else { 1.0 };
    let scale = factor * units as f64 / clip;
    // |u_j·scale| ≤ units ≤ 2¹⁶ (a coordinate is at most the norm), so the
    // cast neither saturates nor loses the integer part.
    let mut x: Vec<i64> = delta.iter().map(|v| (f64::from(*v) * scale).round() as i64).collect();
    // The exact check: integers, no float. Rounding to nearest can push the
    // norm above `units`; then scale by units/⌈norm⌉ truncating toward zero.
    let b = u128::from(units);
    let (total, limit) = match norm {
        ClipNorm::L1 => (x.iter().map(|v| u128::from(v.unsigned_abs())).sum::<u128>(), b),
        ClipNorm::L2 => (x.iter().map(|v| u128::from(v.unsigned_abs()).pow(2)).sum::<u128>(), b * b),
    };
    if total > limit {
        let r = match norm {
            ClipNorm::L1 => total,
            ClipNorm::L2 => {
                let s = total.isqrt();
                if s * s == total { s } else { s + 1 }
            }
        };
        // r > units ≥ 1, and |v|·units < 2⁶⁴·2¹⁶ fits in i128.
        for v in &mut x {
            *v = (i128::from(*v) * i128::from(units) / r as i128) as i64;
        }
    }
    x
}

/// The durable state (module docs), bincode-encoded in
/// [`AggregatorState::bytes`].
#[derive(Encode, Decode)]
struct Saved {
    /// The secret noise seed (the host's durable storage is secret).
    seed: [u8; 32],
    /// The tree's releases made and kept node sums.
    tree: TreeState,
    /// The last release `s_{t−1}`.
    previous: Vec<i64>,
    /// The server momentum `v`.
    velocity: Vec<f64>,
    /// The ledger: ρ spent, as an exact ratio (numerator, denominator).
    rho_spent: (u128, u128),
}

/// DP-FTRL's aggregator (module docs).
#[derive(Debug)]
pub struct DpFtrl {
    cfg: DpFtrlConfig,
    tree_cfg: TreeConfig,
    tree: TreeCounter,
    /// B, the clip norm in integer units.
    units: u64,
    /// n, the fixed batch normaliser (clients per round).
    normaliser: usize,
    /// The round's clipped integer contributions, by client.
    pending: Vec<(ClientIndex, u64, f32, Vec<i64>)>,
    /// The last release s_{t−1} (zeros before the first).
    previous: Vec<i64>,
    /// Server momentum v.
    velocity: Vec<f64>,
}

impl DpFtrl {
    /// Privacy spent so far, as reported in metrics.
    pub fn privacy(&self) -> PrivacySpent {
        let spent = self.tree.spent();
        PrivacySpent {
            releases: self.tree.releases(),
            rho: spent.rho.to_f64(),
            epsilon: spent.epsilon_for_delta(self.cfg.delta),
            delta: self.cfg.delta,
        }
    }

    /// B, the clip norm in integer units.
    pub fn clip_units(&self) -> u64 {
        self.units
    }
}

impl Aggregator for DpFtrl {
    fn name(&self) -> &'static str {
        NAME
    }

    fn begin_round(&mut self, _round: u32, _global: &[f32]) {
        self.pending.clear();
    }

    fn absorb(&mut self, client: ClientIndex, update: &ClientUpdate) -> Result<(), Misbehaviour> {
        check_common(update)?;
        let data = kind::payload_of(update, ID, NAME)?;
        let delta = decode_delta(data, self.previous.len())?;
        if self.pending.len() >= self.normaliser {
            // The coordinator closes a round at its quorum (≤ clients per
            // round); the sensitivity bound counts on no more.
            return Err(Misbehaviour::Unexpected("more DP-FTRL updates in a round than clients_per_round"));
        }
        let x = clip_to_fixed_point(&delta, self.cfg.clip_norm, self.units, self.cfg.target.norm());
        self.pending.push((client, update.num_samples, update.train_loss, x));
        Ok(())
    }

    fn finish(&mut self, global: &mut [f32]) -> Result<AggregateStats, AggregateError> {
        if self.pending.is_empty() {
            return Err(AggregateError::Empty);
        }
        self.pending.sort_by_key(|(c, ..)| *c);
        let mut record = vec![0i64; self.previous.len()];
        for (.., x) in &self.pending {
            for (r, v) in record.iter_mut().zip(x) {
                // Each |v| ≤ B and at most count contributions with
                // count·B ≤ 2²⁴: no overflow.
                *r += *v;
            }
        }
        let total: u64 = self.pending.iter().fold(0u64, |t, (_, n, ..)| t.saturating_add(*n));
        let loss: f64 = self.pending.iter().map(|(_, n, l, _)| *n as f64 * f64::from(*l)).sum();
        let updates = self.pending.len();
        self.pending.clear();
        let TreeRelease { values, .. } = self.tree.step(&record).map_err(|e| AggregateError::Privacy(Box::new(e)))?;
        // The release is made: whatever follows, the tree and the last
        // release move on (a release is never redone with other data).
        let k = f64::from(self.cfg.clip_norm) / (self.units as f64 * self.normaliser as f64);
        let beta = f64::from(self.cfg.momentum);
        let eta = f64::from(self.cfg.server_lr);
        let velocity: Vec<f64> = self
            .velocity
            .iter()
            .zip(values.iter().zip(&self.previous))
            .map(|(v, (s, p))| beta * v + (i128::from(*s) - i128::from(*p)) as f64 * k)
            .collect();
        self.previous = values;
        let step: Vec<f64> = velocity.iter().map(|v| eta * v).collect();
        // A step that would overflow the model is refused (model and
        // velocity kept); the release above is spent all the same.
        commit_step(global, &step)?;
        self.velocity = velocity;
        let privacy = Some(self.privacy());
        Ok(AggregateStats { updates, samples: total, train_loss: loss / total.max(1) as f64, privacy })
    }

    fn publish(&self, global: &[f32]) -> ModelSync {
        kind::full_model(global)
    }

    fn state(&self) -> Option<AggregatorState> {
        let rho = self.tree.spent().rho;
        let saved = Saved {
            seed: *self.tree_cfg.seed.as_bytes(),
            tree: self.tree.state(),
            previous: self.previous.clone(),
            velocity: self.velocity.clone(),
            rho_spent: (rho.num(), rho.den()),
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
        let dim = self.previous.len();
        if saved.previous.len() != dim || saved.velocity.len() != dim {
            return Err(invalid("vectors of another length than the model's"));
        }
        if saved.velocity.iter().any(|v| !v.is_finite()) {
            return Err(invalid("non-finite velocity"));
        }
        let mut tree_cfg = self.tree_cfg.clone();
        tree_cfg.seed = NoiseSeed::from_bytes(saved.seed);
        let tree = TreeCounter::restore(tree_cfg.clone(), &saved.tree).map_err(|_| invalid("tree state"))?;
        let rho = Ratio::new(saved.rho_spent.0, saved.rho_spent.1).map_err(|_| invalid("ledger"))?;
        if tree.spent().rho != rho {
            return Err(invalid("the ledger does not match the releases made"));
        }
        self.tree_cfg = tree_cfg;
        self.tree = tree;
        self.previous = saved.previous;
        self.velocity = saved.velocity;
        Ok(())
    }

    fn exhausted(&self) -> bool {
        self.tree.releases() >= u64::from(self.cfg.horizon)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::fedavg::encode_delta;

    fn upd(d: &[f32]) -> ClientUpdate {
        ClientUpdate { num_samples: 1, train_loss: 1.0, payload: encode_delta(ID, d) }
    }

    fn config(target: PrivacyTarget, horizon: u32, momentum: f32) -> DpFtrlConfig {
        DpFtrlConfig { target, delta: 1e-5, horizon, clip_norm: 1.0, server_lr: 1.0, momentum }
    }

    fn agg(cfg: DpFtrlConfig, dim: usize, per_round: usize, seed: u64) -> Box<dyn Aggregator> {
        let arch = ModelArch::Mlp { input: 1, hidden: vec![], classes: 2 };
        let seed = NoiseSeed::insecure_from_u64(seed);
        let kind = DpFtrlKind::new(cfg, &arch).unwrap();
        let shape = RunShape {
            arch: &arch,
            clients_per_round: per_round,
            rounds: 10,
            max_update_abs: f32::MAX,
            noise_seed: Some(&seed),
        };
        kind.aggregator(&shape, &RuleSpec::Mean, &vec![0.0; dim]).unwrap()
    }

    /// ρ = 2⁴² so large that the Gaussian's σ (in units) is below 0.1:
    /// releases are all but exact prefix sums.
    const NO_NOISE: PrivacyTarget = PrivacyTarget::Zcdp { rho_units: 1 << 62 };

    #[test]
    fn dpftrl_clipping_is_exact_in_integers_for_both_norms() {
        for (norm, units) in [(ClipNorm::L2, 1 << 16), (ClipNorm::L1, 1 << 16), (ClipNorm::L2, 300)] {
            for seed in 0..50u32 {
                // Values whose rounding pushes the norm up: many halves.
                let d: Vec<f32> = (0..97).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 999.0 - 0.5).collect();
                let x = clip_to_fixed_point(&d, 0.37, units, norm);
                let b = u128::from(units);
                match norm {
                    ClipNorm::L2 => assert!(x.iter().map(|v| (*v as i128).pow(2) as u128).sum::<u128>() <= b * b),
                    ClipNorm::L1 => assert!(x.iter().map(|v| v.unsigned_abs() as u128).sum::<u128>() <= b),
                }
            }
        }
        // An update within the bound is scaled, not clipped: 0.3 of a
        // 1.0 clip in 2¹⁶ units.
        let x = clip_to_fixed_point(&[0.3, 0.0, -0.1], 1.0, 1 << 16, ClipNorm::L2);
        assert_eq!(x, vec![19661, 0, -6554]);
        // A long one is clipped to the bound (rounding can't exceed it).
        let x = clip_to_fixed_point(&[30.0, 40.0], 1.0, 1 << 16, ClipNorm::L2);
        assert!(x[0] * x[0] + x[1] * x[1] <= 1 << 32);
        assert!((x[0] - 39322).abs() <= 1 && (x[1] - 52429).abs() <= 1, "{x:?}");
    }

    #[test]
    fn dpftrl_without_noise_is_clipped_unweighted_fedavg_with_momentum() {
        // β = 0: θ = θ₀ + mean of clipped deltas each round, exactly up to
        // the fixed point (2⁻¹⁶ of the clip norm).
        let mut a = agg(config(NO_NOISE, 4, 0.0), 2, 2, 1);
        let mut g = vec![0f32; 2];
        a.begin_round(1, &g);
        a.absorb(1, &upd(&[0.5, 0.0])).unwrap();
        a.absorb(0, &upd(&[3.0, 4.0])).unwrap(); // clipped to (0.6, 0.8)
        let s = a.finish(&mut g).unwrap();
        assert!((g[0] - 0.55).abs() < 1e-4 && (g[1] - 0.4).abs() < 1e-4, "{g:?}");
        let p = s.privacy.unwrap();
        assert_eq!(p.releases, 1);
        assert!(p.rho > 0.0 && p.epsilon > p.rho);
        // Momentum 0.5: second round's step is 0.5·v₁ + Δ₂.
        let mut m = agg(config(NO_NOISE, 4, 0.5), 1, 1, 1);
        let mut g = vec![0f32];
        for _ in 0..2 {
            m.begin_round(1, &g);
            m.absorb(0, &upd(&[0.25])).unwrap();
            m.finish(&mut g).unwrap();
        }
        assert!((g[0] - (0.25 + 0.375)).abs() < 1e-4, "{g:?}");
    }

    #[test]
    fn dpftrl_noise_is_calibrated_and_keyed_to_the_seed() {
        // ρ = 1/2 over T = 2 (L = 2): σ² = L·(2B)²/(2ρ) = 8B², per node.
        // One release = one node (t = 1): the model's noise has standard
        // deviation √8·B·C/(B·n) = √8 per coordinate (n = 1, C = 1).
        let target = PrivacyTarget::Zcdp { rho_units: 1 << 19 };
        let dim = 4000;
        let run = |seed| {
            let mut a = agg(config(target, 2, 0.0), dim, 1, seed);
            let mut g = vec![0f32; dim];
            a.begin_round(1, &g);
            a.absorb(0, &upd(&vec![0.0; dim])).unwrap();
            a.finish(&mut g).unwrap();
            g
        };
        let g = run(7);
        let var = g.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / dim as f64;
        // Standard error of the sample variance: σ²·√(2/n) ≈ 8·0.022.
        assert!((var - 8.0).abs() < 6.0 * 8.0 * (2.0 / dim as f64).sqrt(), "variance {var}");
        // A σ off by 2 would fail the same check.
        assert!((var / 4.0 - 8.0).abs() > 6.0 * 8.0 * (2.0 / dim as f64).sqrt());
        assert_eq!(run(7), g);
        assert_ne!(run(8), g);
    }

    #[test]
    fn dpftrl_state_restores_bit_for_bit_and_refuses_the_horizon() {
        let target = PrivacyTarget::Zcdp { rho_units: 1 << 18 };
        let dim = 64;
        let delta = |r: u32, c: u32| -> Vec<f32> {
            (0..dim).map(|j| ((j as u32 * 31 + r * 7 + c) % 13) as f32 / 20.0 - 0.3).collect()
        };
        let round = |a: &mut Box<dyn Aggregator>, g: &mut Vec<f32>, r: u32| {
            a.begin_round(r, g);
            for c in 0..3 {
                a.absorb(c, &upd(&delta(r, c))).unwrap();
            }
            a.finish(g)
        };
        let mut live = agg(config(target, 5, 0.9), dim, 3, 11);
        let mut g = vec![0f32; dim];
        for r in 1..=3 {
            round(&mut live, &mut g, r).unwrap();
        }
        let state = live.state().unwrap();
        // Restored into an aggregator built with another (fresh) seed: the
        // saved seed wins.
        let mut back = agg(config(target, 5, 0.9), dim, 3, 999);
        back.restore_state(&state).unwrap();
        assert_eq!(back.state(), Some(state.clone()));
        let mut g2 = g.clone();
        for r in 4..=5 {
            let a = round(&mut live, &mut g, r).unwrap();
            let b = round(&mut back, &mut g2, r).unwrap();
            assert_eq!(a, b);
            assert_eq!(
                g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                g2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        // T = 5 releases made: the next is refused, the model kept.
        assert!(live.exhausted());
        let before = g.clone();
        let err = round(&mut live, &mut g, 6).unwrap_err();
        assert!(
            matches!(&err, AggregateError::Privacy(e) if **e == crate::dp::DpError::HorizonExhausted { horizon: 5 }),
            "{err}"
        );
        assert_eq!(g, before);
        // Damaged states are refused with typed errors.
        let mut bad = state.clone();
        bad.bytes.pop();
        assert!(matches!(back.restore_state(&bad), Err(StateError::Invalid { .. })));
        let bad = AggregatorState { version: 2, ..state.clone() };
        assert!(matches!(back.restore_state(&bad), Err(StateError::Version { .. })));
        let mut other = agg(config(target, 5, 0.9), dim + 1, 3, 11);
        assert!(matches!(other.restore_state(&state), Err(StateError::Invalid { .. })));
    }

    #[test]
    fn dpftrl_settings_resolve_and_are_checked() {
        let spec = DpFtrlSpec { epsilon: Some(4.0), horizon: Some(50), ..Default::default() };
        let cfg = spec.resolve().unwrap();
        let PrivacyTarget::Zcdp { rho_units } = cfg.target else { panic!() };
        let rho = rho_units as f64 / PRIVACY_DENOMINATOR as f64;
        // Rounded down: the report at δ is at most ε, and close to it.
        let eps = rho + 2.0 * (rho * (1e5f64).ln()).sqrt();
        assert!(eps <= 4.0 && eps > 3.999, "{eps}");
        assert!(DpFtrlSpec { horizon: Some(5), ..Default::default() }.resolve().is_err());
        assert!(DpFtrlSpec { epsilon: Some(1.0), ..Default::default() }.resolve().is_err());
        assert!(
            DpFtrlSpec { epsilon: Some(1.0), rho: Some(0.1), horizon: Some(5), ..Default::default() }
                .resolve()
                .is_err()
        );
        let lap = DpFtrlSpec { epsilon: Some(2.0), horizon: Some(5), noise: NoiseSpec::Laplace, ..Default::default() };
        assert_eq!(lap.resolve().unwrap().target, PrivacyTarget::Pure { epsilon_units: 2 << 20 });
        let arch = ModelArch::mnist_mlp();
        let ok = spec.resolve().unwrap();
        assert!(DpFtrlKind::new(DpFtrlConfig { momentum: 1.0, ..ok.clone() }, &arch).is_err());
        assert!(DpFtrlKind::new(DpFtrlConfig { clip_norm: 0.0, ..ok.clone() }, &arch).is_err());
        // No noise seed from the host: refused, not a run with a guessable one.
        let k = DpFtrlKind::new(ok, &arch).unwrap();
        let shape =
            RunShape { arch: &arch, clients_per_round: 10, rounds: 10, max_update_abs: f32::MAX, noise_seed: None };
        assert!(k.aggregator(&shape, &RuleSpec::Mean, &arch.init_params(1)).is_err());
        assert_eq!(clip_units(10), 1 << 16);
        assert_eq!(clip_units(1000), (1 << 24) / 1000);
    }
}
