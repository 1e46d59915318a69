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
//! - [`sign_flip`]: each malicious client sends `−s ×` its own benign update.
//! - [`gaussian`]: each malicious client sends `N(0, σ²)` noise.
//! - [`label_flip`]: malicious clients train honestly on flipped labels.
//! - [`lie`]: "A little is enough" (Baruch et al., NeurIPS 2019), `μ − zσ`.
//! - [`min_max`]: min-max and min-sum (Shejwalkar & Houmansadr, NDSS 2021),
//!   the aggregator-agnostic versions.
//! - [`tailored`]: the attacks tailored to trimmed mean and Multi-Krum that
//!   FRL's paper runs against those rules (§1.8 of the algorithms note).
//!
//! What each attack knows is stated in its module: whether its clients
//! collude, whether it sees benign updates (here never those of honest
//! clients: at most the benign updates its own clients would have sent, as
//! FRL's code does), and whether it knows the aggregation rule.

pub mod dense;
#[cfg(test)]
mod effect_tests;
pub mod frl_reverse;
pub mod gaussian;
pub mod label_flip;
pub mod lie;
pub mod min_max;
pub mod scale;
pub mod sign_flip;
pub mod tailored;

use serde::{Deserialize, Serialize};
use tally_kernels::{Dataset, Device};
use tally_protocol::kind::{KindSettings, RuleSpec};
use tally_protocol::model::ModelArch;
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
    /// Clients sampled per round (`n` in LIE's formula).
    pub per_round: usize,
    /// The run's aggregation rule (known to the rule-tailored attacks only).
    pub rule: RuleSpec,
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
    /// Malicious clients sampled for the round (at least those crafting).
    pub malicious: usize,
}

/// A poisoning attack (see the module docs).
pub trait Attack: Send + Sync + std::fmt::Debug {
    /// Name in scenario files.
    fn name(&self) -> &'static str;
    /// Fraction of malicious clients, in `[0, 1)`.
    fn fraction(&self) -> f64;
    /// Refuses a run whose update kind the attack does not apply to.
    fn check(&self, kind: &KindSettings) -> Result<(), AttackError>;
    /// Refuses a model the attack's settings do not fit (e.g. a label
    /// outside its classes). Default: any model.
    fn check_model(&self, _arch: &ModelArch) -> Result<(), AttackError> {
        Ok(())
    }
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
    /// Every malicious client sends `−scale ×` its own benign update (no
    /// collusion, no rule knowledge). Dense kinds and Ferret.
    SignFlip {
        /// Fraction of malicious clients, in `[0, 1)`.
        fraction: f64,
        /// The factor `s > 0` (default 1).
        #[serde(default = "default_one")]
        scale: f32,
    },
    /// Every malicious client sends independent `N(0, std²)` noise per
    /// coordinate (no knowledge at all). Dense kinds and Ferret.
    Gaussian {
        /// Fraction of malicious clients, in `[0, 1)`.
        fraction: f64,
        /// The noise's standard deviation, positive (default 1).
        #[serde(default = "default_one")]
        std: f32,
    },
    /// Malicious clients train honestly on their shard with flipped labels:
    /// `l → C−1−l` by default, or only `source → target` when both are
    /// given. Every kind that trains.
    LabelFlip {
        /// Fraction of malicious clients, in `[0, 1)`.
        fraction: f64,
        /// Only this class is relabelled (with `target`). Default: all.
        #[serde(default)]
        source: Option<u8>,
        /// The label `source` becomes.
        #[serde(default)]
        target: Option<u8>,
    },
    /// "A little is enough" (Baruch et al., 2019): every malicious client
    /// sends `μ − z·σ` of the attackers' benign updates.
    Lie {
        /// Fraction of malicious clients, in `[0, 1)`.
        fraction: f64,
        /// `z`, non-negative; default: the paper's `Φ⁻¹((n − s)/n)` with
        /// `s = ⌊n/2 + 1⌋ − f` for `n` clients per round and `f` malicious.
        #[serde(default)]
        z: Option<f64>,
        /// Attackers whose benign updates give `μ` and `σ` (default 25).
        #[serde(default = "default_pool")]
        pool: usize,
    },
    /// Min-max (Shejwalkar & Houmansadr, NDSS 2021, AGR-agnostic): `μ − γ·p`
    /// with the largest `γ` whose largest squared distance to the
    /// attackers' benign updates stays within theirs to each other.
    MinMax {
        /// Fraction of malicious clients, in `[0, 1)`.
        fraction: f64,
        /// The perturbation `p`: `std` (default), `unit-vec` or `sign`.
        #[serde(default)]
        deviation: min_max::Deviation,
        /// Where the halving search for `γ` starts (default 50, the authors' code).
        #[serde(default = "default_gamma")]
        gamma_init: f64,
        /// Attackers whose benign updates are used (default 25).
        #[serde(default = "default_pool")]
        pool: usize,
    },
    /// Min-sum (same paper): as min-max with the sum of squared distances.
    MinSum {
        /// Fraction of malicious clients, in `[0, 1)`.
        fraction: f64,
        /// The perturbation `p`: `std` (default), `unit-vec` or `sign`.
        #[serde(default)]
        deviation: min_max::Deviation,
        /// Where the halving search for `γ` starts (default 50).
        #[serde(default = "default_gamma")]
        gamma_init: f64,
        /// Attackers whose benign updates are used (default 25).
        #[serde(default = "default_pool")]
        pool: usize,
    },
    /// FRL's attack on trimmed mean (§1.8): `μ − λσ` with `λ` (halving
    /// search from `lambda_init`) maximising the trimmed mean's distance to `μ`.
    TailoredTrimmedMean {
        /// Fraction of malicious clients, in `[0, 1)`.
        fraction: f64,
        /// Where the search for `λ` starts (default 5, FRL's code).
        #[serde(default = "default_lambda")]
        lambda_init: f64,
        /// Attackers whose benign updates are used (default 25).
        #[serde(default = "default_pool")]
        pool: usize,
    },
    /// FRL's attack on Multi-Krum (§1.8): `μ − λσ` with the largest `λ`
    /// (halving search from `lambda_init`) for which Multi-Krum selects
    /// every malicious copy.
    TailoredMultiKrum {
        /// Fraction of malicious clients, in `[0, 1)`.
        fraction: f64,
        /// Where the search for `λ` starts (default 5, FRL's code).
        #[serde(default = "default_lambda")]
        lambda_init: f64,
        /// Attackers whose benign updates are used (default 25).
        #[serde(default = "default_pool")]
        pool: usize,
    },
}

fn default_one() -> f32 {
    1.0
}

fn default_gamma() -> f64 {
    50.0
}

fn default_lambda() -> f64 {
    5.0
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
            AttackSpec::FrlReverse { fraction, .. }
            | AttackSpec::Scale { fraction, .. }
            | AttackSpec::SignFlip { fraction, .. }
            | AttackSpec::Gaussian { fraction, .. }
            | AttackSpec::LabelFlip { fraction, .. }
            | AttackSpec::Lie { fraction, .. }
            | AttackSpec::MinMax { fraction, .. }
            | AttackSpec::MinSum { fraction, .. }
            | AttackSpec::TailoredTrimmedMean { fraction, .. }
            | AttackSpec::TailoredMultiKrum { fraction, .. } => *fraction,
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
        let name = self.name();
        if !(fraction.is_finite() && (0.0..1.0).contains(&fraction)) {
            return Err(AttackError::Invalid { attack: name, reason: "fraction must be in [0, 1)" });
        }
        Ok(match *self {
            AttackSpec::FrlReverse { pool, .. } => Box::new(frl_reverse::FrlReverse::new(fraction, pool)?),
            AttackSpec::Scale { scale, .. } => Box::new(scale::Scale::new(fraction, scale)?),
            AttackSpec::SignFlip { scale, .. } => Box::new(sign_flip::SignFlip::new(fraction, scale)?),
            AttackSpec::Gaussian { std, .. } => Box::new(gaussian::Gaussian::new(fraction, std)?),
            AttackSpec::LabelFlip { source, target, .. } => {
                Box::new(label_flip::LabelFlip::new(fraction, source, target)?)
            }
            AttackSpec::Lie { z, pool, .. } => Box::new(lie::Lie::new(fraction, z, pool)?),
            AttackSpec::MinMax { deviation, gamma_init, pool, .. } => {
                Box::new(min_max::MinMax::new(min_max::Objective::Max, fraction, deviation, gamma_init, pool)?)
            }
            AttackSpec::MinSum { deviation, gamma_init, pool, .. } => {
                Box::new(min_max::MinMax::new(min_max::Objective::Sum, fraction, deviation, gamma_init, pool)?)
            }
            AttackSpec::TailoredTrimmedMean { lambda_init, pool, .. } => {
                Box::new(tailored::Tailored::new(tailored::Target::TrimmedMean, fraction, lambda_init, pool)?)
            }
            AttackSpec::TailoredMultiKrum { lambda_init, pool, .. } => {
                Box::new(tailored::Tailored::new(tailored::Target::MultiKrum, fraction, lambda_init, pool)?)
            }
        })
    }

    /// The attack's name in scenario files.
    pub fn name(&self) -> &'static str {
        match self {
            AttackSpec::FrlReverse { .. } => frl_reverse::NAME,
            AttackSpec::Scale { .. } => scale::NAME,
            AttackSpec::SignFlip { .. } => sign_flip::NAME,
            AttackSpec::Gaussian { .. } => gaussian::NAME,
            AttackSpec::LabelFlip { .. } => label_flip::NAME,
            AttackSpec::Lie { .. } => lie::NAME,
            AttackSpec::MinMax { .. } => min_max::MIN_MAX,
            AttackSpec::MinSum { .. } => min_max::MIN_SUM,
            AttackSpec::TailoredTrimmedMean { .. } => tailored::TRIMMED_MEAN,
            AttackSpec::TailoredMultiKrum { .. } => tailored::MULTI_KRUM,
        }
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
    fn the_catalogue_applies_to_its_kinds_only() {
        let ferret = KindSettings::Ferret(tally_protocol::ferret::FerretSpec::default().resolve(1));
        let all: Vec<KindSettings> = kinds().into_iter().chain([ferret]).collect();
        // fedavg, fedavgm, spsa, frl, ferret
        let dense_and_ferret = [true, true, false, false, true];
        for (spec, expected) in [
            (AttackSpec::SignFlip { fraction: 0.1, scale: 1.0 }, dense_and_ferret),
            (AttackSpec::Gaussian { fraction: 0.1, std: 1.0 }, dense_and_ferret),
            (AttackSpec::LabelFlip { fraction: 0.1, source: None, target: None }, [true; 5]),
            (AttackSpec::Lie { fraction: 0.1, z: None, pool: 25 }, dense_and_ferret),
            (
                AttackSpec::MinMax { fraction: 0.1, deviation: min_max::Deviation::Std, gamma_init: 50.0, pool: 25 },
                dense_and_ferret,
            ),
            (
                AttackSpec::MinSum { fraction: 0.1, deviation: min_max::Deviation::Sign, gamma_init: 50.0, pool: 25 },
                dense_and_ferret,
            ),
            (
                AttackSpec::TailoredTrimmedMean { fraction: 0.1, lambda_init: 5.0, pool: 25 },
                [true, true, false, false, false],
            ),
            (
                AttackSpec::TailoredMultiKrum { fraction: 0.1, lambda_init: 5.0, pool: 25 },
                [true, true, false, false, false],
            ),
        ] {
            let a = spec.build().unwrap();
            assert_eq!(a.name(), spec.name());
            let applies: Vec<bool> = all.iter().map(|k| a.check(k).is_ok()).collect();
            assert_eq!(applies, expected, "{}", a.name());
            for k in all.iter().filter(|k| a.check(k).is_err()) {
                assert!(matches!(a.check(k), Err(AttackError::WrongKind { .. })));
            }
        }
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
