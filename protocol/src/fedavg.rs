//! Federated averaging of dense deltas (McMahan et al., AISTATS 2017).
//!
//! **Wire payload:** the delta `local − global` as little-endian f32 in the
//! model's canonical flat order ([`encode_delta`]), tagged [`ID`]. The
//! server checks the length (the model's parameter count), that every
//! value is finite and that none exceeds the run's bound on `|value|`
//! ([`crate::coordinator::CoordinatorConfig::max_update_abs`]; a liveness
//! guard: finite values of 1e30 would ruin the model for every client).
//!
//! **Combine:** the round's deltas, in ascending client order, go through the
//! run's aggregation rule ([`crate::rule`]; the mean weighted by sample
//! counts by default) in f64, and the new model is `global + combined`
//! rounded to f32 once, so arrival order never changes the model. A round
//! whose result would not be finite is refused and the model kept.
//!
//! **Publishes:** the full model in every `RoundStart`.

use std::collections::BTreeSet;

use crate::aggregate::{AggregateError, AggregateStats, Aggregator, ClientIndex, check_common, check_dense};
use crate::error::Misbehaviour;
use crate::kind::{self, KindError, KindId, KindSettings, RuleSpec, RunShape, UpdateKind};
use crate::model::ModelArch;
use crate::rule::{RoundRule, Weighted};
use crate::wire::{ClientUpdate, ModelSync, UpdatePayload};

/// The kind's name in configuration files.
pub const NAME: &str = "fedavg";
/// Tag of FedAvg payloads.
pub const ID: KindId = KindId(0);

/// Rules a dense-delta kind can combine by: every vector rule.
pub const DENSE_RULES: &[&str] = &["mean", "median", "trimmed-mean", "krum", "multi-krum", "norm-clip"];

/// The FedAvg kind.
#[derive(Debug, Clone)]
pub struct FedAvgKind;

impl FedAvgKind {
    /// FedAvg over `arch` (any dense model).
    pub fn new(arch: &ModelArch) -> Result<Self, KindError> {
        dense_model(NAME, arch)?;
        Ok(FedAvgKind)
    }
}

/// Refuses models whose parameters are not a dense vector to average.
pub(crate) fn dense_model(kind: &'static str, arch: &ModelArch) -> Result<(), KindError> {
    if matches!(arch, ModelArch::Supermask(_)) {
        return Err(KindError::invalid(kind, "a supermask model needs the frl kind"));
    }
    Ok(())
}

impl UpdateKind for FedAvgKind {
    fn name(&self) -> &'static str {
        NAME
    }
    fn id(&self) -> KindId {
        ID
    }
    fn settings(&self) -> KindSettings {
        KindSettings::FedAvg
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
        Ok(Box::new(FedAvg::with_rule(rule).with_bound(run.max_update_abs)))
    }
}

/// A dense delta as a payload of kind `kind` (little-endian f32).
pub fn encode_delta(kind: KindId, delta: &[f32]) -> UpdatePayload {
    let mut data = Vec::with_capacity(delta.len() * 4);
    for v in delta {
        data.extend_from_slice(&v.to_le_bytes());
    }
    UpdatePayload { kind, data }
}

/// Decodes a dense payload of `dim` values, all finite.
pub fn decode_delta(data: &[u8], dim: usize) -> Result<Vec<f32>, Misbehaviour> {
    if !data.len().is_multiple_of(4) || data.len() / 4 != dim {
        return Err(Misbehaviour::WrongDimension { expected: dim, got: data.len() / 4 });
    }
    let values: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    check_dense(&values, dim)?;
    Ok(values)
}

/// The part every dense-delta aggregator shares (FedAvg, FedAvgM): a
/// round's deltas, kept until the round closes so they are combined in
/// ascending client order whatever the arrival order, by the run's rule.
#[derive(Debug)]
pub(crate) struct DenseRound {
    /// The kind whose payloads this round takes.
    kind: KindId,
    name: &'static str,
    rule: RoundRule,
    dim: usize,
    /// Largest `|value|` accepted in a delta.
    bound: f32,
    pending: Vec<(ClientIndex, u64, f32, Vec<f32>)>,
    /// The last combination (length `dim`).
    combined: Vec<f64>,
}

impl DenseRound {
    /// Rounds of `name`'s payloads (tag `kind`) combined by `rule`, refusing
    /// deltas with a value beyond `bound` in magnitude.
    pub(crate) fn new(kind: KindId, name: &'static str, rule: &RuleSpec, bound: f32) -> Self {
        DenseRound { kind, name, rule: RoundRule::new(rule), dim: 0, bound, pending: Vec::new(), combined: Vec::new() }
    }

    /// See [`Aggregator::know_attackers`].
    pub(crate) fn know_attackers(&mut self, flagged: BTreeSet<ClientIndex>) {
        self.rule.know_attackers(flagged);
    }

    pub(crate) fn begin(&mut self, dim: usize) {
        self.dim = dim;
        self.pending.clear();
    }

    pub(crate) fn absorb(&mut self, client: ClientIndex, update: &ClientUpdate) -> Result<(), Misbehaviour> {
        check_common(update)?;
        let data = kind::payload_of(update, self.kind, self.name)?;
        let delta = decode_delta(data, self.dim)?;
        if let Some(index) = delta.iter().position(|v| v.abs() > self.bound) {
            return Err(Misbehaviour::OutOfBounds { index, limit: self.bound.to_string() });
        }
        self.pending.push((client, update.num_samples, update.train_loss, delta));
        Ok(())
    }

    /// Combines the round by the rule into [`DenseRound::combined`] and
    /// clears it.
    pub(crate) fn combine(&mut self) -> Result<AggregateStats, AggregateError> {
        if self.pending.is_empty() {
            return Err(AggregateError::Empty);
        }
        self.pending.sort_by_key(|(c, ..)| *c);
        let total: u64 = self.pending.iter().fold(0u64, |t, (_, n, ..)| t.saturating_add(*n));
        let loss: f64 = self.pending.iter().map(|(_, n, l, _)| *n as f64 * *l as f64).sum();
        let updates: Vec<Weighted<'_>> =
            self.pending.iter().map(|(c, n, _, d)| Weighted { client: *c, weight: *n, values: d }).collect();
        self.combined.clear();
        self.combined.resize(self.dim, 0.0);
        self.rule.combine(&updates, &mut self.combined);
        let stats = AggregateStats {
            updates: self.pending.len(),
            samples: total,
            train_loss: loss / total as f64,
            privacy: None,
        };
        self.pending.clear();
        Ok(stats)
    }

    /// The combination of the last round closed.
    pub(crate) fn combined(&self) -> &[f64] {
        &self.combined
    }
}

/// Adds `step` to `global` rounding once to f32, and commits only if every
/// value is finite: deltas are checked finite, but `g + step` can still round
/// to infinity in f32 (a client sending f32::MAX twice in a row).
pub(crate) fn commit_step(global: &mut [f32], step: &[f64]) -> Result<(), AggregateError> {
    let next: Vec<f32> = global.iter().zip(step).map(|(g, a)| (*g as f64 + a) as f32).collect();
    if let Some(index) = next.iter().position(|v| !v.is_finite()) {
        return Err(AggregateError::NonFinite { index });
    }
    global.copy_from_slice(&next);
    Ok(())
}

/// FedAvg's aggregator: `global + rule(δ₁ … δₙ)`; with the default mean rule
/// `global + Σ nᵢ·δᵢ / Σ nᵢ`.
#[derive(Debug)]
pub struct FedAvg {
    round: DenseRound,
}

impl Default for FedAvg {
    fn default() -> Self {
        FedAvg::new()
    }
}

impl FedAvg {
    /// FedAvg with the sample-weighted mean.
    pub fn new() -> Self {
        FedAvg::with_rule(&RuleSpec::Mean)
    }

    /// FedAvg combining deltas by `rule`.
    pub fn with_rule(rule: &RuleSpec) -> Self {
        // No bound beyond finiteness unless `with_bound` sets one.
        FedAvg { round: DenseRound::new(ID, NAME, rule, f32::MAX) }
    }

    /// The same, refusing deltas with a value beyond `max_abs` in magnitude
    /// ([`Misbehaviour::OutOfBounds`]).
    pub fn with_bound(mut self, max_abs: f32) -> Self {
        self.round.bound = max_abs;
        self
    }
}

impl Aggregator for FedAvg {
    fn name(&self) -> &'static str {
        NAME
    }

    fn begin_round(&mut self, _round: u32, global: &[f32]) {
        self.round.begin(global.len());
    }

    fn absorb(&mut self, client: ClientIndex, update: &ClientUpdate) -> Result<(), Misbehaviour> {
        self.round.absorb(client, update)
    }

    fn know_attackers(&mut self, flagged: BTreeSet<ClientIndex>) {
        self.round.know_attackers(flagged);
    }

    fn finish(&mut self, global: &mut [f32]) -> Result<AggregateStats, AggregateError> {
        let stats = self.round.combine()?;
        commit_step(global, self.round.combined())?;
        Ok(stats)
    }

    fn publish(&self, global: &[f32]) -> ModelSync {
        kind::full_model(global)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn upd(n: u64, d: Vec<f32>) -> ClientUpdate {
        ClientUpdate { num_samples: n, train_loss: 1.0, payload: encode_delta(ID, &d) }
    }

    #[test]
    fn weighted_mean() {
        let mut agg = FedAvg::new();
        let mut g = vec![1.0, 1.0];
        agg.begin_round(1, &g);
        agg.absorb(0, &upd(1, vec![1.0, 0.0])).unwrap();
        agg.absorb(1, &upd(3, vec![-1.0, 4.0])).unwrap();
        let s = agg.finish(&mut g).unwrap();
        assert_eq!(g, vec![1.0 + (1.0 - 3.0) / 4.0, 1.0 + 12.0 / 4.0]);
        assert_eq!(s.samples, 4);
    }

    #[test]
    fn order_independent() {
        let a = upd(3, vec![0.1, 1e-8, 3.3]);
        let b = upd(5, vec![1e7, -0.7, 2.2]);
        let c = upd(7, vec![-1e7, 0.3, 1e-3]);
        let run = |order: &[(u32, &ClientUpdate)]| {
            let mut agg = FedAvg::new();
            let mut g = vec![0.5, 0.25, 0.125];
            agg.begin_round(1, &g);
            for (i, u) in order {
                agg.absorb(*i, u).unwrap();
            }
            agg.finish(&mut g).unwrap();
            g.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(run(&[(0, &a), (1, &b), (2, &c)]), run(&[(2, &c), (0, &a), (1, &b)]));
    }

    #[test]
    fn rejects_bad_updates_without_state_change() {
        let mut agg = FedAvg::new();
        let mut g = vec![0.0; 3];
        agg.begin_round(1, &g);
        assert_eq!(agg.absorb(0, &upd(1, vec![0.0; 2])), Err(Misbehaviour::WrongDimension { expected: 3, got: 2 }));
        assert_eq!(agg.absorb(0, &upd(1, vec![0.0, f32::NAN, 0.0])), Err(Misbehaviour::NonFinite(1)));
        assert_eq!(agg.absorb(0, &upd(0, vec![0.0; 3])), Err(Misbehaviour::BadSampleCount(0)));
        let spsa = ClientUpdate {
            num_samples: 1,
            train_loss: 0.0,
            payload: UpdatePayload { kind: KindId(1), data: vec![0; 12] },
        };
        assert!(matches!(agg.absorb(0, &spsa), Err(Misbehaviour::KindMismatch { .. })));
        let ragged =
            ClientUpdate { num_samples: 1, train_loss: 0.0, payload: UpdatePayload { kind: ID, data: vec![0; 13] } };
        assert!(matches!(agg.absorb(0, &ragged), Err(Misbehaviour::WrongDimension { .. })));
        assert_eq!(agg.finish(&mut g), Err(AggregateError::Empty));
    }

    #[test]
    fn overflowing_round_is_refused_and_model_kept() {
        // Finite deltas whose mean pushes a large weight past f32::MAX.
        let mut agg = FedAvg::new();
        let mut g = vec![f32::MAX, 1.0];
        agg.begin_round(1, &g);
        agg.absorb(0, &upd(1, vec![f32::MAX, 0.0])).unwrap();
        assert_eq!(agg.finish(&mut g), Err(AggregateError::NonFinite { index: 0 }));
        assert_eq!(g, vec![f32::MAX, 1.0]);
        // The aggregator is usable again afterwards.
        agg.begin_round(2, &g);
        agg.absorb(0, &upd(1, vec![-1.0, 1.0])).unwrap();
        agg.finish(&mut g).unwrap();
        assert_eq!(g[1], 2.0);
    }

    #[test]
    fn values_beyond_the_bound_are_refused_without_state_change() {
        let mut agg = FedAvg::new().with_bound(100.0);
        let mut g = vec![0.0, 0.0];
        agg.begin_round(1, &g);
        let err = agg.absorb(0, &upd(1, vec![1.0, -1e30])).unwrap_err();
        assert!(matches!(err, Misbehaviour::OutOfBounds { index: 1, .. }), "{err:?}");
        assert!(matches!(agg.absorb(0, &upd(1, vec![100.5, 0.0])), Err(Misbehaviour::OutOfBounds { index: 0, .. })));
        // At the bound is fine; the refused updates left no trace.
        agg.absorb(1, &upd(1, vec![100.0, -100.0])).unwrap();
        agg.finish(&mut g).unwrap();
        assert_eq!(g, vec![100.0, -100.0]);
    }

    #[test]
    fn median_rule_resists_a_scaled_update() {
        let mut agg = FedAvg::with_rule(&RuleSpec::Median);
        let mut g = vec![0.0, 0.0];
        agg.begin_round(1, &g);
        agg.absorb(0, &upd(1, vec![1.0, 1.0])).unwrap();
        agg.absorb(1, &upd(1, vec![1.0, 2.0])).unwrap();
        agg.absorb(2, &upd(1000, vec![1e30, -1e30])).unwrap();
        agg.finish(&mut g).unwrap();
        assert_eq!(g, vec![1.0, 1.0]);
    }
}
