//! FedAvg with server momentum, "FedAvgM" (Hsu, Qi and Brown, "Measuring the
//! effects of non-identical data distribution for federated visual
//! classification", 2019).
//!
//! Clients do exactly what FedAvg clients do and send a dense delta (same
//! payload as [`crate::fedavg`], tagged [`ID`]). The server keeps a velocity
//! `v` across rounds: with `Δ` the round's combined delta (the run's rule,
//! the weighted mean by default),
//!
//! ```text
//! v ← β·v + Δ        θ ← θ + η·v
//! ```
//!
//! computed in f64 per coordinate and rounded to f32 once each (`v` is kept
//! as f32). `β = 0` and `η = 1` is FedAvg. The velocity is cross-round state:
//! it goes into the server's durable snapshot ([`Aggregator::state`]) and is
//! restored after a crash, so a recovered run continues bit for bit.
//!
//! **Publishes:** the full model, as FedAvg.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use std::collections::BTreeSet;

use crate::aggregate::{AggregateError, AggregateStats, Aggregator, AggregatorState, ClientIndex, StateError};
use crate::error::Misbehaviour;
use crate::fedavg::{DENSE_RULES, DenseRound, commit_step, dense_model};
use crate::kind::{self, KindError, KindId, KindSettings, RuleSpec, RunShape, UpdateKind};
use crate::model::ModelArch;
use crate::wire::{ClientUpdate, ModelSync};

/// The kind's name in configuration files.
pub const NAME: &str = "fedavgm";
/// Tag of FedAvgM payloads.
pub const ID: KindId = KindId(3);
/// Format version of the velocity in snapshots.
pub const STATE_VERSION: u32 = 1;

/// Server momentum settings (clients receive them for transparency; they
/// train as FedAvg clients do).
#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct FedAvgMConfig {
    /// Momentum β, in `[0, 1)`.
    pub momentum: f32,
    /// Server learning rate η, finite and positive.
    pub server_lr: f32,
}

/// FedAvgM in a configuration file: `{ kind = "fedavgm", momentum = 0.9,
/// server_lr = 1.0 }` (both optional, defaults shown).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FedAvgMSpec {
    /// Momentum β (0.9).
    pub momentum: f32,
    /// Server learning rate η (1.0).
    pub server_lr: f32,
}

impl Default for FedAvgMSpec {
    fn default() -> Self {
        FedAvgMSpec { momentum: 0.9, server_lr: 1.0 }
    }
}

impl FedAvgMSpec {
    /// The settings this spec names.
    pub fn resolve(&self) -> FedAvgMConfig {
        FedAvgMConfig { momentum: self.momentum, server_lr: self.server_lr }
    }
}

/// The FedAvgM kind.
#[derive(Debug, Clone)]
pub struct FedAvgMKind {
    cfg: FedAvgMConfig,
}

impl FedAvgMKind {
    /// FedAvgM over `arch` (any dense model).
    pub fn new(cfg: FedAvgMConfig, arch: &ModelArch) -> Result<Self, KindError> {
        dense_model(NAME, arch)?;
        if !(cfg.momentum.is_finite() && (0.0..1.0).contains(&cfg.momentum)) {
            return Err(KindError::invalid(NAME, "momentum must be in [0, 1)"));
        }
        if !(cfg.server_lr.is_finite() && cfg.server_lr > 0.0) {
            return Err(KindError::invalid(NAME, "server_lr must be finite and positive"));
        }
        Ok(FedAvgMKind { cfg })
    }
}

impl UpdateKind for FedAvgMKind {
    fn name(&self) -> &'static str {
        NAME
    }
    fn id(&self) -> KindId {
        ID
    }
    fn settings(&self) -> KindSettings {
        KindSettings::FedAvgM(self.cfg.clone())
    }
    fn rules(&self) -> &'static [&'static str] {
        DENSE_RULES
    }
    fn aggregator(
        &self,
        run: &RunShape<'_>,
        rule: &RuleSpec,
        initial: &[f32],
    ) -> Result<Box<dyn Aggregator>, KindError> {
        kind::check_rule(self, rule)?;
        Ok(Box::new(FedAvgM {
            cfg: self.cfg.clone(),
            round: DenseRound::new(ID, NAME, rule, run.max_update_abs),
            velocity: vec![0.0; initial.len()],
        }))
    }
}

/// FedAvgM's aggregator (module docs).
#[derive(Debug)]
pub struct FedAvgM {
    cfg: FedAvgMConfig,
    round: DenseRound,
    velocity: Vec<f32>,
}

impl FedAvgM {
    /// The velocity after the last completed round.
    pub fn velocity(&self) -> &[f32] {
        &self.velocity
    }
}

impl Aggregator for FedAvgM {
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
        let beta = f64::from(self.cfg.momentum);
        let eta = f64::from(self.cfg.server_lr);
        let velocity: Vec<f32> =
            self.velocity.iter().zip(self.round.combined()).map(|(v, d)| (beta * f64::from(*v) + d) as f32).collect();
        if let Some(index) = velocity.iter().position(|v| !v.is_finite()) {
            return Err(AggregateError::NonFinite { index });
        }
        let step: Vec<f64> = velocity.iter().map(|v| eta * f64::from(*v)).collect();
        // The velocity is committed only with the model: a refused round
        // leaves both as they were.
        commit_step(global, &step)?;
        self.velocity = velocity;
        Ok(stats)
    }

    fn publish(&self, global: &[f32]) -> ModelSync {
        kind::full_model(global)
    }

    fn state(&self) -> Option<AggregatorState> {
        Some(AggregatorState::from_f32s(NAME, STATE_VERSION, &self.velocity))
    }

    fn restore_state(&mut self, state: &AggregatorState) -> Result<(), StateError> {
        self.velocity = state.to_f32s(NAME, STATE_VERSION, self.velocity.len())?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::fedavg::encode_delta;

    fn upd(d: Vec<f32>) -> ClientUpdate {
        ClientUpdate { num_samples: 1, train_loss: 1.0, payload: encode_delta(ID, &d) }
    }

    fn agg(momentum: f32) -> Box<dyn Aggregator> {
        let arch = ModelArch::Mlp { input: 1, hidden: vec![], classes: 2 };
        let kind = FedAvgMKind::new(FedAvgMConfig { momentum, server_lr: 1.0 }, &arch).unwrap();
        kind.aggregator(
            &RunShape { arch: &arch, clients_per_round: 1, rounds: 1, max_update_abs: f32::MAX, noise_seed: None },
            &RuleSpec::Mean,
            &[0.0; 4],
        )
        .unwrap()
    }

    #[test]
    fn momentum_accumulates_across_rounds_and_survives_a_restore() {
        let mut a = agg(0.5);
        let mut g = vec![0f32; 4];
        for round in 1..=2 {
            a.begin_round(round, &g);
            a.absorb(0, &upd(vec![1.0; 4])).unwrap();
            a.finish(&mut g).unwrap();
        }
        // v1 = 1, θ1 = 1; v2 = 0.5 + 1 = 1.5, θ2 = 2.5.
        assert_eq!(g, vec![2.5; 4]);
        // A fresh aggregator restored from the state continues identically.
        let state = a.state().unwrap();
        let mut b = agg(0.5);
        b.restore_state(&state).unwrap();
        let (mut ga, mut gb) = (g.clone(), g.clone());
        for (x, gx) in [(&mut a, &mut ga), (&mut b, &mut gb)] {
            x.begin_round(3, gx);
            x.absorb(0, &upd(vec![1.0; 4])).unwrap();
            x.finish(gx).unwrap();
        }
        assert_eq!(ga, gb);
        assert_eq!(ga, vec![2.5 + 1.75; 4]);
        // A state of another shape or kind is refused.
        let mut bad = state.clone();
        bad.bytes.pop();
        assert!(b.restore_state(&bad).is_err());
        bad = AggregatorState { name: "spsa".into(), ..state };
        assert!(matches!(b.restore_state(&bad), Err(StateError::WrongAggregator { .. })));
    }

    #[test]
    fn settings_are_checked_and_rules_offered() {
        let arch = ModelArch::mnist_mlp();
        assert!(FedAvgMKind::new(FedAvgMConfig { momentum: 1.0, server_lr: 1.0 }, &arch).is_err());
        assert!(FedAvgMKind::new(FedAvgMConfig { momentum: 0.9, server_lr: 0.0 }, &arch).is_err());
        let k = FedAvgMKind::new(FedAvgMConfig { momentum: 0.9, server_lr: 1.0 }, &arch).unwrap();
        assert!(
            k.aggregator(
                &RunShape { arch: &arch, clients_per_round: 1, rounds: 1, max_update_abs: f32::MAX, noise_seed: None },
                &RuleSpec::Median,
                &[]
            )
            .is_ok()
        );
    }
}
