//! Poisoning attacks: what the malicious clients of a scenario send.
//!
//! Malicious clients are ids `0..⌊fraction·clients⌋` (as in FRL's code);
//! they still sign and send well-formed reports, so the protocol accepts
//! them like any other. An attack is one [`Attack`] implementation in its
//! own module: it says which update kinds it applies to
//! ([`Attack::check`]) and crafts the payloads of a round's malicious
//! clients ([`Attack::craft`]). The scenario names it with an
//! [`AttackSpec`], which builds the trait object; the round loop sees only
//! the trait.
//!
//! - [`frl_reverse`]: FRL's attack, the reversed consensus ranking.
//! - [`scale`]: FRL's FedAvg attack, the scaled global model as a delta.

pub mod frl_reverse;
pub mod scale;

use serde::{Deserialize, Serialize};
use tally_kernels::{Dataset, Device};
use tally_protocol::kind::KindSettings;
use tally_protocol::wire::{RunConfig, UpdatePayload};

use crate::SimError;

/// Why an attack can't be part of a scenario.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AttackError {
    /// A setting out of range.
    #[error("attack {attack}: {reason}")]
    Invalid {
        /// The attack.
        attack: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// The attack does not apply to the run's update kind.
    #[error("attack {attack} needs {needs}, not {kind}")]
    WrongKind {
        /// The attack.
        attack: &'static str,
        /// The kinds it applies to, in words.
        needs: &'static str,
        /// The run's kind.
        kind: &'static str,
    },
}

/// What an attack may use besides the round: the run, every client's data
/// (malicious clients may train benignly on their own shards), the training
/// workers and device, and the scenario seed (to derive its own draws).
#[derive(Clone, Copy, Debug)]
pub struct AttackEnv<'a> {
    /// The run configuration clients received.
    pub run: &'a RunConfig,
    /// Every client's training data, by client id.
    pub shards: &'a [Dataset],
    /// Malicious clients: ids `0..malicious`.
    pub malicious: usize,
    /// Worker threads for any local training.
    pub threads: usize,
    /// The training device.
    pub device: &'a Device,
    /// The scenario seed.
    pub seed: u64,
}

/// The task a round's malicious clients received: the round, the task seed
/// and the global model they start from.
#[derive(Clone, Copy, Debug)]
pub struct RoundTask<'a> {
    /// The round.
    pub round: u32,
    /// The task's training seed.
    pub seed: u64,
    /// The global model (for FRL, the global scores).
    pub model: &'a [f32],
}

/// A poisoning attack (see the module docs).
pub trait Attack: Send + Sync + std::fmt::Debug {
    /// Name in scenario files.
    fn name(&self) -> &'static str;
    /// Fraction of malicious clients, in `[0, 1)`.
    fn fraction(&self) -> f64;
    /// Refuses a run whose update kind the attack does not apply to.
    fn check(&self, kind: &KindSettings) -> Result<(), AttackError>;
    /// Whether every round of a run with malicious clients is evaluated,
    /// not only every `eval_every`-th (so that a collapse shows in the
    /// round it happens).
    fn evaluate_every_round(&self) -> bool {
        false
    }
    /// The payloads `clients` (malicious clients sampled for `task`'s round,
    /// ascending in delivery order) send: one per client, in order.
    fn craft(
        &self,
        env: &AttackEnv<'_>,
        task: &RoundTask<'_>,
        clients: &[usize],
    ) -> Result<Vec<UpdatePayload>, SimError>;

    /// Number of malicious clients among `clients`: `⌊fraction·clients⌋`.
    fn malicious(&self, clients: usize) -> usize {
        malicious(self.fraction(), clients)
    }
}

fn malicious(fraction: f64, clients: usize) -> usize {
    ((fraction * clients as f64) as usize).min(clients)
}

/// A poisoning attack in a scenario file. Malicious clients are ids
/// `0..⌊fraction·clients⌋` (as in FRL's code); they still sign and send
/// well-formed reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AttackSpec {
    /// FRL's attack (`docs/algorithms.md` §1.7): up to `pool` attackers
    /// drawn from all malicious clients train benignly from the global
    /// model; every malicious client in the round submits the ranking that
    /// reverses the sum of their positions.
    FrlReverse {
        /// Fraction of malicious clients, in `[0, 1)`.
        fraction: f64,
        /// Attackers whose benign rankings form the consensus (FRL: 25).
        #[serde(default = "default_pool")]
        pool: usize,
    },
    /// The FedAvg attack of FRL's code (§1.8): every malicious client
    /// sends `scale · θ` (the current global parameters, scaled) as its update.
    Scale {
        /// Fraction of malicious clients, in `[0, 1)`.
        fraction: f64,
        /// The factor (FRL: 1e5).
        #[serde(default = "default_scale")]
        scale: f32,
    },
}

fn default_pool() -> usize {
    25
}

fn default_scale() -> f32 {
    1e5
}

impl AttackSpec {
    /// The malicious fraction.
    pub fn fraction(&self) -> f64 {
        match self {
            AttackSpec::FrlReverse { fraction, .. } | AttackSpec::Scale { fraction, .. } => *fraction,
        }
    }

    /// Number of malicious clients among `clients`: `⌊fraction·clients⌋`.
    pub fn malicious(&self, clients: usize) -> usize {
        malicious(self.fraction(), clients)
    }

    /// The attack, its settings checked (not yet against a kind:
    /// [`Attack::check`]).
    pub fn build(&self) -> Result<Box<dyn Attack>, AttackError> {
        let fraction = self.fraction();
        let name = match self {
            AttackSpec::FrlReverse { .. } => frl_reverse::NAME,
            AttackSpec::Scale { .. } => scale::NAME,
        };
        if !(fraction.is_finite() && (0.0..1.0).contains(&fraction)) {
            return Err(AttackError::Invalid { attack: name, reason: "fraction must be in [0, 1)" });
        }
        Ok(match *self {
            AttackSpec::FrlReverse { pool, .. } => Box::new(frl_reverse::FrlReverse::new(fraction, pool)?),
            AttackSpec::Scale { scale, .. } => Box::new(scale::Scale::new(fraction, scale)?),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use tally_protocol::fedavgm::FedAvgMConfig;
    use tally_protocol::frl::FrlRun;
    use tally_protocol::spsa::SpsaSpec;

    use super::*;

    fn kinds() -> [KindSettings; 4] {
        [
            KindSettings::FedAvg,
            KindSettings::FedAvgM(FedAvgMConfig { momentum: 0.9, server_lr: 1.0 }),
            KindSettings::Spsa(SpsaSpec::default().resolve(1)),
            KindSettings::Frl(FrlRun::new(1, vec![4, 4])),
        ]
    }

    #[test]
    fn each_attack_applies_to_its_kinds_only() {
        let reverse = AttackSpec::FrlReverse { fraction: 0.1, pool: 3 }.build().unwrap();
        let scale = AttackSpec::Scale { fraction: 0.1, scale: 10.0 }.build().unwrap();
        let applies = |a: &dyn Attack| kinds().iter().map(|k| a.check(k).is_ok()).collect::<Vec<_>>();
        assert_eq!(applies(reverse.as_ref()), [false, false, false, true]);
        assert_eq!(applies(scale.as_ref()), [true, true, false, false]);
        let err = reverse.check(&KindSettings::FedAvg).unwrap_err();
        assert_eq!(err.to_string(), "attack frl-reverse needs the frl kind, not fedavg");
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        let refused = |a: AttackSpec| matches!(a.build(), Err(AttackError::Invalid { .. }));
        assert!(refused(AttackSpec::Scale { fraction: 1.0, scale: 1.0 }));
        assert!(refused(AttackSpec::Scale { fraction: f64::NAN, scale: 1.0 }));
        assert!(refused(AttackSpec::Scale { fraction: 0.1, scale: f32::INFINITY }));
        assert!(refused(AttackSpec::FrlReverse { fraction: -0.1, pool: 1 }));
        assert!(refused(AttackSpec::FrlReverse { fraction: 0.1, pool: 0 }));
        let a = AttackSpec::FrlReverse { fraction: 0.25, pool: 1 };
        assert_eq!((a.malicious(10), a.build().unwrap().malicious(10)), (2, 2));
    }
}
