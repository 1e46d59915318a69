//! Aggregation: how accepted client updates become the next global model.
//!
//! The [`Aggregator`] trait is streaming: the coordinator calls
//! [`Aggregator::absorb`] once per accepted update (after signature, round and
//! duplicate checks) and [`Aggregator::finish`] when the round closes. An
//! implementation decides what it keeps: FedAvg buffers the round's updates so
//! it can sum them in ascending client order (float addition is not
//! associative; arrival order must not change the model), while a vote tally
//! can fold each update into integer counters as it arrives.
//!
//! `absorb` validates the payload (kind, dimension, finiteness) and must leave
//! the aggregator unchanged when it returns an error; `finish` must leave the
//! global model unchanged when it returns an error.

use crate::error::Misbehaviour;
use crate::wire::{ClientUpdate, MAX_SAMPLES_PER_UPDATE, UpdateKind, UpdatePayload};

/// Stable identity of a client: its index in the enrolment list.
pub type ClientIndex = u32;

/// What a round's aggregation produced, for metrics.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct AggregateStats {
    /// Updates combined.
    pub updates: usize,
    /// Sum of their sample counts.
    pub samples: u64,
    /// Sample-weighted mean of the clients' training losses.
    pub train_loss: f64,
}

/// Why a round could not be aggregated (a local condition, not a peer's fault).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AggregateError {
    /// `finish` without any absorbed update.
    #[error("no updates to aggregate")]
    Empty,
    /// The combined update would make a parameter infinite (finite updates
    /// can still overflow f32 when added to large weights). The global model
    /// is left unchanged: a replica must never hold NaN or infinity.
    #[error("aggregation would make parameter {index} non-finite")]
    NonFinite {
        /// Flat index of the first parameter that would overflow.
        index: usize,
    },
}

/// Combines a round's updates into the next global model.
pub trait Aggregator: Send + std::fmt::Debug {
    /// Name for logs and metrics.
    fn name(&self) -> &'static str;
    /// The update kind clients must send.
    fn update_kind(&self) -> UpdateKind;
    /// Starts a round over the current global parameters.
    fn begin_round(&mut self, round: u32, global: &[f32]);
    /// Validates and takes one update. On error nothing is kept.
    fn absorb(&mut self, client: ClientIndex, update: &ClientUpdate) -> Result<(), Misbehaviour>;
    /// Closes the round, writing the new model into `global` (untouched on error).
    fn finish(&mut self, global: &mut [f32]) -> Result<AggregateStats, AggregateError>;
    /// For replicated update kinds: the log of the round just finished, which
    /// every replica applies to reach the new model. `None` for kinds whose
    /// model is sent in full.
    fn take_log(&mut self) -> Option<Vec<crate::spsa::LogEntry>> {
        None
    }
    /// The SPSA settings clients need, for SPSA aggregators.
    fn spsa_config(&self) -> Option<&crate::spsa::SpsaConfig> {
        None
    }
    /// The FRL settings clients need, for FRL aggregators.
    fn frl_config(&self) -> Option<&crate::frl::FrlConfig> {
        None
    }
    /// The FRL run settings clients receive ([`crate::wire::RunConfig::frl`]).
    fn frl_run(&self) -> Option<&crate::frl::FrlRun> {
        None
    }
    /// For FRL aggregators: the current global ranking, which is FRL's global
    /// model (clients rebuild the scores from it and the sorted initial
    /// scores).
    fn frl_global_ranking(&self) -> Option<&crate::frl::Ranking> {
        None
    }
    /// After a restart: aligns whatever state the aggregator derives from the
    /// global model with the restored `global` (FRL's global ranking). An
    /// error means the restored model can't be this aggregator's.
    fn restore_model(&mut self, _global: &[f32]) -> Result<(), String> {
        Ok(())
    }
}

/// Checks a dense vector: length and finiteness.
pub fn check_dense(values: &[f32], expected: usize) -> Result<(), Misbehaviour> {
    if values.len() != expected {
        return Err(Misbehaviour::WrongDimension { expected, got: values.len() });
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Misbehaviour::NonFinite(i));
    }
    Ok(())
}

/// Checks the fields every update has, whatever its kind.
pub fn check_common(update: &ClientUpdate) -> Result<(), Misbehaviour> {
    if update.num_samples == 0 || update.num_samples > MAX_SAMPLES_PER_UPDATE {
        return Err(Misbehaviour::BadSampleCount(update.num_samples));
    }
    if !update.train_loss.is_finite() {
        return Err(Misbehaviour::NonFinite(0));
    }
    Ok(())
}

/// Federated averaging (McMahan et al., 2017): the new model is
/// `global + Σ nᵢ·δᵢ / Σ nᵢ` over the round's accepted deltas `δᵢ`, weighted by
/// the sample counts `nᵢ`. Sums are taken in f64 in ascending client order and
/// rounded to f32 once, so the result does not depend on arrival order.
#[derive(Debug, Default)]
pub struct FedAvg {
    dim: usize,
    pending: Vec<(ClientIndex, u64, f32, Vec<f32>)>,
}

impl FedAvg {
    /// A FedAvg aggregator.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Aggregator for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn update_kind(&self) -> UpdateKind {
        UpdateKind::DenseDelta
    }

    fn begin_round(&mut self, _round: u32, global: &[f32]) {
        self.dim = global.len();
        self.pending.clear();
    }

    fn absorb(&mut self, client: ClientIndex, update: &ClientUpdate) -> Result<(), Misbehaviour> {
        check_common(update)?;
        let UpdatePayload::DenseDelta(delta) = &update.payload else {
            return Err(Misbehaviour::WrongKind("this run takes dense deltas"));
        };
        check_dense(delta, self.dim)?;
        self.pending.push((client, update.num_samples, update.train_loss, delta.clone()));
        Ok(())
    }

    fn finish(&mut self, global: &mut [f32]) -> Result<AggregateStats, AggregateError> {
        if self.pending.is_empty() {
            return Err(AggregateError::Empty);
        }
        self.pending.sort_by_key(|(c, ..)| *c);
        // Each count is at most MAX_SAMPLES_PER_UPDATE (2^32) and a round has
        // at most MAX_ENROLLED (2^20) updates, so this can't saturate; it is
        // saturating so that no caller can make it wrap.
        let total: u64 = self.pending.iter().fold(0u64, |t, (_, n, ..)| t.saturating_add(*n));
        let mut acc = vec![0f64; global.len()];
        let mut loss = 0f64;
        for (_, n, l, delta) in &self.pending {
            let w = *n as f64;
            loss += w * *l as f64;
            for (a, d) in acc.iter_mut().zip(delta) {
                *a += w * *d as f64;
            }
        }
        let total_f = total as f64;
        // Compute the new model aside and commit it only if every value is
        // finite: deltas are checked finite, but `g + mean` can still round
        // to infinity in f32 (say a client sends f32::MAX twice in a row).
        let next: Vec<f32> = global.iter().zip(&acc).map(|(g, a)| (*g as f64 + a / total_f) as f32).collect();
        if let Some(index) = next.iter().position(|v| !v.is_finite()) {
            self.pending.clear();
            return Err(AggregateError::NonFinite { index });
        }
        global.copy_from_slice(&next);
        let stats = AggregateStats { updates: self.pending.len(), samples: total, train_loss: loss / total_f };
        self.pending.clear();
        Ok(stats)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn upd(n: u64, d: Vec<f32>) -> ClientUpdate {
        ClientUpdate { num_samples: n, train_loss: 1.0, payload: UpdatePayload::DenseDelta(d) }
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
}
