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
//! Each update kind ([`crate::kind`]) makes its own aggregator; the
//! aggregation rule over vectors is a separate choice ([`crate::rule`]).
//!
//! `absorb` validates the payload (kind, dimension, finiteness) and must leave
//! the aggregator unchanged when it returns an error; `finish` must leave the
//! global model unchanged when it returns an error.

use crate::error::Misbehaviour;
use crate::wire::{ClientUpdate, LogBody, MAX_SAMPLES_PER_UPDATE, ModelSync};

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
    /// Privacy spent by the run so far, for kinds that release under
    /// differential privacy ([`crate::dpftrl`]); `None` for the others.
    pub privacy: Option<PrivacySpent>,
}

/// What a differentially private run has spent after a round, for logs and
/// metrics (`dp_rho_spent`, `dp_epsilon_spent`, `dp_delta` in
/// `docs/metrics.md`). Floats for reports; the budget decisions themselves
/// are exact ([`crate::dp::Accountant`]).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct PrivacySpent {
    /// Noisy releases made (rounds aggregated under DP).
    pub releases: u64,
    /// ρ spent (zCDP).
    pub rho: f64,
    /// The (ε, δ)-DP guarantee at [`PrivacySpent::delta`]; for a pure-ε
    /// ledger the smaller of its ε and the zCDP conversion.
    pub epsilon: f64,
    /// The δ that `epsilon` is stated for.
    pub delta: f64,
}

/// Why a round could not be aggregated (a local condition, not a peer's fault).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AggregateError {
    /// `finish` without any absorbed update.
    #[error("no updates to aggregate")]
    Empty,
    /// A differentially private release was refused (past the horizon or
    /// the budget, or a record outside its domain): nothing was released and
    /// the model is unchanged. After [`Aggregator::exhausted`] the
    /// coordinator ends the run instead of opening more training rounds.
    #[error("private release refused: {0}")]
    Privacy(Box<crate::dp::DpError>),
    /// The combined update would make a parameter infinite (finite updates
    /// can still overflow f32 when added to large weights). The global model
    /// is left unchanged: a replica must never hold NaN or infinity.
    #[error("aggregation would make parameter {index} non-finite")]
    NonFinite {
        /// Flat index of the first parameter that would overflow.
        index: usize,
    },
}

/// An aggregator's state that lives across rounds (server momentum, DP
/// trees, running tallies), as kept in the server's durable snapshot. The
/// aggregator owns the bytes' format and versions it; the coordinator only
/// stores and hands them back.
#[derive(Clone, Debug, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct AggregatorState {
    /// The aggregator that wrote it ([`Aggregator::name`]).
    pub name: String,
    /// Its format version, chosen by the aggregator.
    pub version: u32,
    /// The state.
    pub bytes: Vec<u8>,
}

impl AggregatorState {
    /// A vector of f32 (server momentum and the like), little endian.
    pub fn from_f32s(name: &str, version: u32, values: &[f32]) -> Self {
        AggregatorState { name: name.into(), version, bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    /// Reads back [`AggregatorState::from_f32s`]: checks the writer and
    /// version, that it holds exactly `len` values and that all are finite.
    pub fn to_f32s(&self, name: &'static str, version: u32, len: usize) -> Result<Vec<f32>, StateError> {
        self.expect(name, version)?;
        if self.bytes.len() != len.saturating_mul(4) {
            return Err(StateError::Invalid { name, reason: "state vector of another length than the run's" });
        }
        let values: Vec<f32> =
            self.bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(StateError::Invalid { name, reason: "non-finite value in the state vector" });
        }
        Ok(values)
    }

    /// Checks the state was written by `name` in format `version`.
    pub fn expect(&self, name: &'static str, version: u32) -> Result<(), StateError> {
        if self.name != name {
            return Err(StateError::WrongAggregator { expected: name, found: self.name.clone() });
        }
        if self.version != version {
            return Err(StateError::Version { name, expected: version, found: self.version });
        }
        Ok(())
    }
}

/// Why saved state can't be restored into an aggregator.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StateError {
    /// State written by another aggregator.
    #[error("saved aggregator state belongs to {found}, this run aggregates with {expected}")]
    WrongAggregator {
        /// This run's aggregator.
        expected: &'static str,
        /// The state's.
        found: String,
    },
    /// State in another format version.
    #[error("saved {name} state is format {found}, this build reads {expected}")]
    Version {
        /// The aggregator.
        name: &'static str,
        /// The version it reads.
        expected: u32,
        /// The state's.
        found: u32,
    },
    /// A stateful aggregator restored without its state, or the reverse.
    #[error("saved state {0}")]
    Presence(&'static str),
    /// State that fails the aggregator's checks.
    #[error("saved {name} state is invalid: {reason}")]
    Invalid {
        /// The aggregator.
        name: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// A restored model that can't be this aggregator's.
    #[error("the restored model does not fit {name}: {reason}")]
    Model {
        /// The aggregator.
        name: &'static str,
        /// Why.
        reason: String,
    },
}

/// Combines a round's updates into the next global model: the server side of
/// an update kind ([`crate::kind::UpdateKind::aggregator`]). Nothing here
/// names a particular kind.
pub trait Aggregator: Send + std::fmt::Debug {
    /// Name for logs, metrics and saved state.
    fn name(&self) -> &'static str;
    /// Starts a round over the current global parameters.
    fn begin_round(&mut self, round: u32, global: &[f32]);
    /// Validates and takes one update. On error nothing is kept.
    fn absorb(&mut self, client: ClientIndex, update: &ClientUpdate) -> Result<(), Misbehaviour>;
    /// A simulation device for experiments with known attackers: from now
    /// on, a rule whose parameter is a number of attackers (trimmed mean,
    /// Krum, Multi-Krum) uses the number of `flagged` clients among each
    /// round's updates, as FRL's reference code does
    /// ([`crate::rule::RoundRule::know_attackers`]). A real server cannot know
    /// its attackers. Default: ignored (no such rule).
    fn know_attackers(&mut self, _flagged: std::collections::BTreeSet<ClientIndex>) {}
    /// Closes the round, writing the new model into `global` (untouched on error).
    fn finish(&mut self, global: &mut [f32]) -> Result<AggregateStats, AggregateError>;
    /// What a `RoundStart` carries for the model `global`: the model in
    /// full, the hash a replica must hold, or a kind-specific encoding.
    fn publish(&self, global: &[f32]) -> ModelSync;
    /// For replicated kinds: the log of the round just finished, which every
    /// replica applies to reach the new model. `None` for kinds whose model
    /// is published otherwise.
    fn take_log(&mut self) -> Option<LogBody> {
        None
    }
    /// State that lives across rounds, for the durable snapshot (taken when
    /// a round closes). `None`: the aggregator derives everything from the
    /// global model.
    fn state(&self) -> Option<AggregatorState> {
        None
    }
    /// After a restart: takes back what [`Aggregator::state`] saved. The
    /// default refuses any state, since a stateless aggregator never writes one.
    fn restore_state(&mut self, _state: &AggregatorState) -> Result<(), StateError> {
        Err(StateError::Presence("found for an aggregator that keeps none"))
    }
    /// After a restart: aligns whatever state the aggregator derives from the
    /// global model with the restored `global` (FRL's global ranking). An
    /// error means the restored model can't be this aggregator's.
    fn restore_model(&mut self, _global: &[f32]) -> Result<(), StateError> {
        Ok(())
    }
    /// Whether the aggregator can't take another round (a private run whose
    /// horizon of releases is used up): the coordinator then opens no more
    /// training rounds and ends the run (after the final evaluation, if
    /// any), whatever `rounds` says.
    fn exhausted(&self) -> bool {
        false
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
