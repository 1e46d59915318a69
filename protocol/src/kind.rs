//! Update kinds and aggregation rules as plug-ins.
//!
//! An **update kind** is what a run's clients send and how every party turns
//! a round into the next model: its settings (sent to clients in the run
//! configuration), its payload's decoding and validation, how the server
//! combines the accepted payloads, what a round publishes (the full model, a
//! replicated log every replica applies, or a kind-specific encoding such as
//! FRL's global ranking) and how a replica applies it. Each kind is one
//! module implementing [`UpdateKind`]: [`crate::fedavg`] (dense deltas),
//! [`crate::fedavgm`] (dense deltas with server momentum), [`crate::spsa`]
//! (one byte per zeroth-order step, replicated), [`crate::frl`] (rankings),
//! [`crate::ferret`] (seeded projections), [`crate::dpftrl`] (dense deltas
//! through the private tree) and [`crate::frl::dp`] (approval bitsets, the
//! mask through private continual top-k).
//!
//! An **aggregation rule** ([`RuleSpec`]) is a second, independent choice for
//! kinds whose payload is a vector: how the round's vectors are combined
//! ([`crate::rule`]). A kind says which rules it supports; asking for another
//! is a configuration error, not a silent fallback.
//!
//! The coordinator, the participant and the drivers see only these traits and
//! the registry ([`KindSettings::build`]); the one `match` over kinds is there.
//! Adding a kind is its module, one variant of [`KindSettings`] with its arm
//! in `build`, one arm in [`AlgorithmSpec::resolve`] for the configuration
//! files, and its client side in `tally-kernels`.

use std::sync::Arc;

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::aggregate::Aggregator;
use crate::error::Misbehaviour;
use crate::model::ModelArch;
use crate::wire::{ClientUpdate, ModelSync, RoundLog, UpdatePayload};

/// Which kind a payload is for: one byte in every update, so that a client
/// speaking another kind than the run's gets a clear `WrongKind` rather than
/// a confusing length or content error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode)]
pub struct KindId(pub u8);

/// A run's update kind and its settings, as clients receive them in the run
/// configuration: one kind's settings, never one `Option` per kind. Bincode
/// encodes the variant index, so new kinds are appended at the end.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub enum KindSettings {
    /// Federated averaging of dense deltas ([`crate::fedavg`]).
    FedAvg,
    /// One-byte SPSA ([`crate::spsa`]): a replicated run.
    Spsa(crate::spsa::SpsaConfig),
    /// FRL rank voting ([`crate::frl`]): rounds publish the global ranking.
    Frl(crate::frl::FrlRun),
    /// FedAvg with server momentum ([`crate::fedavgm`]).
    FedAvgM(crate::fedavgm::FedAvgMConfig),
    /// Ferret ([`crate::ferret`]): coefficients on shared random bases, a
    /// replicated run whose logs are the combined update.
    Ferret(crate::ferret::FerretConfig),
    /// DP-FTRL ([`crate::dpftrl`]): clipped dense deltas summed through the
    /// private binary tree.
    DpFtrl(crate::dpftrl::DpFtrlConfig),
    /// Private FRL ([`crate::frl::dp`]): approval bitsets, the global mask
    /// released through continual DP top-k.
    FrlDp(crate::frl::dp::FrlDpConfig),
}

impl KindSettings {
    /// The registry: the kind these settings configure, checked against the
    /// run's model. Servers call it on their configuration, participants on
    /// what a (possibly hostile) server sent.
    pub fn build(&self, arch: &ModelArch) -> Result<Arc<dyn UpdateKind>, KindError> {
        Ok(match self {
            KindSettings::FedAvg => Arc::new(crate::fedavg::FedAvgKind::new(arch)?),
            KindSettings::Spsa(cfg) => Arc::new(crate::spsa::SpsaKind::new(cfg.clone(), arch)?),
            KindSettings::Frl(run) => Arc::new(crate::frl::FrlKind::new(run.clone(), arch)?),
            KindSettings::FedAvgM(cfg) => Arc::new(crate::fedavgm::FedAvgMKind::new(cfg.clone(), arch)?),
            KindSettings::Ferret(cfg) => Arc::new(crate::ferret::FerretKind::new(cfg.clone(), arch)?),
            KindSettings::DpFtrl(cfg) => Arc::new(crate::dpftrl::DpFtrlKind::new(cfg.clone(), arch)?),
            KindSettings::FrlDp(cfg) => Arc::new(crate::frl::dp::FrlDpKind::new(cfg.clone(), arch)?),
        })
    }

    /// The kind's name in configuration files and logs.
    pub fn name(&self) -> &'static str {
        match self {
            KindSettings::FedAvg => crate::fedavg::NAME,
            KindSettings::Spsa(_) => crate::spsa::NAME,
            KindSettings::Frl(_) => crate::frl::NAME,
            KindSettings::FedAvgM(_) => crate::fedavgm::NAME,
            KindSettings::Ferret(_) => crate::ferret::NAME,
            KindSettings::DpFtrl(_) => crate::dpftrl::NAME,
            KindSettings::FrlDp(_) => crate::frl::dp::NAME,
        }
    }
}

/// How a kind's rounds convey the model ([`ModelSync`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publication {
    /// The full model in every `RoundStart` ([`ModelSync::Full`]).
    Full,
    /// A replicated run: clients keep the model, apply each round's log and
    /// check its hash ([`ModelSync::Replica`]).
    Replica,
    /// The kind's own encoding ([`ModelSync::Published`]).
    Encoded,
}

/// What the coordinator tells an aggregator about the run it serves.
#[derive(Clone, Copy, Debug)]
pub struct RunShape<'a> {
    /// The model.
    pub arch: &'a ModelArch,
    /// Clients sampled per round (bounds a replicated round's log).
    pub clients_per_round: usize,
    /// Training rounds of the run (schedules over the run, such as
    /// Ferret's server learning rate).
    pub rounds: u32,
    /// Largest `|value|` a dense update may carry
    /// ([`crate::coordinator::CoordinatorConfig::max_update_abs`]). Kinds
    /// whose payloads are bounded by construction (SPSA's bytes, FRL's
    /// rankings) have nothing to check against it.
    pub max_update_abs: f32,
    /// The server's secret noise seed for differentially private kinds
    /// ([`crate::dp::noise`]), drawn by the host; `None` where the host drew
    /// none (kinds that need one refuse to run without it). Never part of
    /// the settings clients receive.
    pub noise_seed: Option<&'a crate::dp::NoiseSeed>,
}

/// One update kind (see the module docs). Implementations are immutable
/// descriptions of a run's kind; the mutable server side is the
/// [`Aggregator`] they make.
pub trait UpdateKind: Send + Sync + std::fmt::Debug {
    /// Name in configuration files and logs.
    fn name(&self) -> &'static str;
    /// Tag of this kind's payloads.
    fn id(&self) -> KindId;
    /// The settings clients receive.
    fn settings(&self) -> KindSettings;
    /// How rounds convey the model to clients.
    fn publication(&self) -> Publication {
        Publication::Full
    }
    /// Whether runs of this kind are replicated: clients keep the model and
    /// apply each round's [`RoundLog`] ([`UpdateKind::apply_log`]); joining
    /// clients get a checkpoint plus the logs since.
    fn replicated(&self) -> bool {
        self.publication() == Publication::Replica
    }
    /// The aggregation rules this kind can combine its payloads by, by
    /// name ([`RuleSpec::name`]).
    fn rules(&self) -> &'static [&'static str] {
        &["mean"]
    }
    /// The server side of a run starting from `initial`, combining by `rule`
    /// (refused with [`KindError::UnsupportedRule`] when not in
    /// [`UpdateKind::rules`]; implementations call [`check_rule`] first).
    fn aggregator(
        &self,
        run: &RunShape<'_>,
        rule: &RuleSpec,
        initial: &[f32],
    ) -> Result<Box<dyn Aggregator>, KindError>;
    /// A replica's model from a round's [`ModelSync::Published`] bytes.
    fn decode_published(&self, _bytes: &[u8]) -> Result<Vec<f32>, Misbehaviour> {
        Err(Misbehaviour::Unexpected("a published model in a run that sends the model in full"))
    }
    /// Applies a round's log to a replica's `params` (replicated kinds). The
    /// entries are checked (ascending clients, valid payloads) before any
    /// parameter changes.
    /// Shared directions are applied through `applier` (the CPU code, or a
    /// GPU kernel with the same bits).
    fn apply_log(
        &self,
        _params: &mut [f32],
        _log: &RoundLog,
        _applier: &dyn crate::prng::DirectionApplier,
    ) -> Result<(), Misbehaviour> {
        Err(Misbehaviour::Unexpected("RoundLog in a run that is not replicated"))
    }
}

/// Checks that `update` is tagged for `kind` and returns its payload bytes.
pub fn payload_of<'a>(update: &'a ClientUpdate, kind: KindId, name: &'static str) -> Result<&'a [u8], Misbehaviour> {
    let UpdatePayload { kind: got, data } = &update.payload;
    if *got != kind {
        return Err(Misbehaviour::KindMismatch { run: name, got: *got });
    }
    Ok(data)
}

/// How a round's vectors are combined (for kinds whose payload is a vector).
/// Chosen independently of the kind, in scenarios and in the server config:
/// `rule = "mean"`, `rule = "median"`, or a table for rules with parameters,
/// `rule = { kind = "trimmed-mean", trim = 2 }`, `{ kind = "krum",
/// byzantine = 2 }`, `{ kind = "multi-krum", byzantine = 2 }`,
/// `{ kind = "norm-clip", max_norm = 1.0 }` (see [`crate::rule`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RuleRepr", into = "RuleRepr")]
pub enum RuleSpec {
    /// Sample-weighted mean (FedAvg's rule; for FRL, the sum of positions).
    #[default]
    Mean,
    /// Coordinate-wise median, unweighted (Yin et al., ICML 2018).
    Median,
    /// Coordinate-wise trimmed mean: the `trim` largest and `trim` smallest
    /// values of each coordinate dropped, the rest averaged (Yin et al.).
    TrimmedMean {
        /// Values dropped at each end; a round needs more than `2·trim`.
        trim: u32,
    },
    /// Krum (Blanchard et al., NeurIPS 2017): the one update closest to its
    /// `n − f − 2` nearest neighbours.
    Krum {
        /// `f`, the Byzantine clients tolerated; a round needs more than
        /// `2f + 2` updates.
        byzantine: u32,
    },
    /// Multi-Krum as FRL's reference code runs it: updates chosen one at a
    /// time by Krum among those left while more than `2f + 2` are left
    /// (`n − 2f − 2` in all), averaged.
    MultiKrum {
        /// `f`, as for Krum.
        byzantine: u32,
    },
    /// Each update's L2 norm clipped to `max_norm`, then the weighted mean
    /// (Sun et al., "Can you really backdoor federated learning?", 2019).
    NormClip {
        /// The bound, finite and positive.
        max_norm: f32,
    },
}

/// [`RuleSpec`] as written in configuration files: a bare name for rules
/// without parameters, a table with `kind` for the others.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum RuleRepr {
    Name(String),
    Table(RuleTable),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
enum RuleTable {
    Mean {},
    Median {},
    TrimmedMean { trim: u32 },
    Krum { byzantine: u32 },
    MultiKrum { byzantine: u32 },
    NormClip { max_norm: f32 },
}

impl TryFrom<RuleRepr> for RuleSpec {
    type Error = String;
    fn try_from(r: RuleRepr) -> Result<Self, String> {
        Ok(match r {
            RuleRepr::Name(n) => match n.as_str() {
                "mean" => RuleSpec::Mean,
                "median" => RuleSpec::Median,
                "trimmed-mean" | "krum" | "multi-krum" | "norm-clip" => {
                    return Err(format!("rule {n} has parameters: write rule = {{ kind = \"{n}\", ... }}"));
                }
                _ => {
                    return Err(format!(
                        "unknown rule {n:?} (mean, median, trimmed-mean, krum, multi-krum, norm-clip)"
                    ));
                }
            },
            RuleRepr::Table(t) => match t {
                RuleTable::Mean {} => RuleSpec::Mean,
                RuleTable::Median {} => RuleSpec::Median,
                RuleTable::TrimmedMean { trim } => RuleSpec::TrimmedMean { trim },
                RuleTable::Krum { byzantine } => RuleSpec::Krum { byzantine },
                RuleTable::MultiKrum { byzantine } => RuleSpec::MultiKrum { byzantine },
                RuleTable::NormClip { max_norm } => RuleSpec::NormClip { max_norm },
            },
        })
    }
}

impl From<RuleSpec> for RuleRepr {
    fn from(r: RuleSpec) -> Self {
        match r {
            RuleSpec::Mean => RuleRepr::Name("mean".into()),
            RuleSpec::Median => RuleRepr::Name("median".into()),
            RuleSpec::TrimmedMean { trim } => RuleRepr::Table(RuleTable::TrimmedMean { trim }),
            RuleSpec::Krum { byzantine } => RuleRepr::Table(RuleTable::Krum { byzantine }),
            RuleSpec::MultiKrum { byzantine } => RuleRepr::Table(RuleTable::MultiKrum { byzantine }),
            RuleSpec::NormClip { max_norm } => RuleRepr::Table(RuleTable::NormClip { max_norm }),
        }
    }
}

impl RuleSpec {
    /// Whether the rule's parameter is a number of attackers (trimmed mean,
    /// Krum, Multi-Krum), which [`RuleSpec::with_attackers`] sets.
    pub fn counts_attackers(&self) -> bool {
        matches!(self, RuleSpec::TrimmedMean { .. } | RuleSpec::Krum { .. } | RuleSpec::MultiKrum { .. })
    }

    /// This rule with its attacker parameter set to `attackers` for a round
    /// of `n` updates, capped at the most the round allows (`2·trim < n`;
    /// `2f + 2 < n`, or 0). Rules without such a parameter are returned as
    /// they are.
    pub fn with_attackers(&self, attackers: usize, n: usize) -> RuleSpec {
        if !self.counts_attackers() {
            return *self;
        }
        let cap = |most: usize| attackers.min(most).try_into().unwrap_or(u32::MAX);
        match *self {
            RuleSpec::TrimmedMean { .. } => RuleSpec::TrimmedMean { trim: cap(n.saturating_sub(1) / 2) },
            RuleSpec::Krum { .. } => RuleSpec::Krum { byzantine: cap(n.saturating_sub(3) / 2) },
            RuleSpec::MultiKrum { .. } => RuleSpec::MultiKrum { byzantine: cap(n.saturating_sub(3) / 2) },
            other => other,
        }
    }

    /// Name in configuration files and logs.
    pub fn name(&self) -> &'static str {
        match self {
            RuleSpec::Mean => "mean",
            RuleSpec::Median => "median",
            RuleSpec::TrimmedMean { .. } => "trimmed-mean",
            RuleSpec::Krum { .. } => "krum",
            RuleSpec::MultiKrum { .. } => "multi-krum",
            RuleSpec::NormClip { .. } => "norm-clip",
        }
    }

    /// Checks the rule's parameters against the fewest updates a round may
    /// close with (the quorum): a trimmed mean needs more than `2·trim`
    /// values, Krum and Multi-Krum more than `2f + 2` updates; refused before
    /// the run, naming the parameter.
    pub fn check_round_size(&self, min_updates: usize) -> Result<(), KindError> {
        let n = min_updates as u64;
        let bad = |reason: String| Err(KindError::Rule { rule: self.name(), reason });
        match *self {
            RuleSpec::Mean | RuleSpec::Median => Ok(()),
            RuleSpec::TrimmedMean { trim } if 2 * u64::from(trim) >= n => bad(format!(
                "trim = {trim} drops every value of a round of {n} updates (the quorum); need 2·trim < quorum"
            )),
            RuleSpec::Krum { byzantine: f } | RuleSpec::MultiKrum { byzantine: f, .. } if 2 * u64::from(f) + 2 >= n => {
                bad(format!("byzantine = {f} needs rounds of more than 2·{f} + 2 updates; the quorum is {n}"))
            }
            RuleSpec::NormClip { max_norm } if !(max_norm.is_finite() && max_norm > 0.0) => {
                bad(format!("max_norm = {max_norm} must be finite and positive"))
            }
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for RuleSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a kind's settings, model or rule can't make a run.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KindError {
    /// A setting out of range, or settings that don't fit the model.
    #[error("{kind}: {reason}")]
    Invalid {
        /// The kind.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The kind can't combine its payloads by this rule.
    #[error("update kind {kind} does not support the aggregation rule {rule} (it supports: {supported})")]
    UnsupportedRule {
        /// The kind.
        kind: &'static str,
        /// The rule asked for ([`RuleSpec::name`]).
        rule: &'static str,
        /// The rules it does support, comma-separated.
        supported: String,
    },
    /// A rule parameter that can't hold for the run (say a trimmed mean that
    /// would drop every value of a round of quorum size).
    #[error("rule {rule}: {reason}")]
    Rule {
        /// The rule.
        rule: &'static str,
        /// What is wrong, naming the parameter.
        reason: String,
    },
}

impl KindError {
    /// An [`KindError::Invalid`] for `kind`.
    pub fn invalid(kind: &'static str, reason: impl std::fmt::Display) -> Self {
        KindError::Invalid { kind, reason: reason.to_string() }
    }
}

/// The algorithm part of a configuration file (server TOML, simulator
/// scenario): the kind by name and its settings, each with a default. One
/// factory for the server, the simulator and the fuzz entry points:
/// [`AlgorithmSpec::resolve`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AlgorithmSpec {
    /// Federated averaging of dense deltas. (A struct variant with no
    /// fields, so that a misspelt setting such as `{ kind = "fedavg",
    /// momentum = 0.9 }` is refused instead of silently ignored.)
    Fedavg {},
    /// FedAvg with server momentum.
    Fedavgm(crate::fedavgm::FedAvgMSpec),
    /// One-byte SPSA.
    Spsa(crate::spsa::SpsaSpec),
    /// FRL rank voting (needs a supermask model).
    Frl(crate::frl::FrlSpec),
    /// Ferret: coefficients on shared random bases.
    Ferret(crate::ferret::FerretSpec),
    /// DP-FTRL: dense deltas clipped, summed and released through the
    /// private binary tree.
    DpFtrl(crate::dpftrl::DpFtrlSpec),
    /// Private FRL: approval votes, the mask released each round through
    /// continual DP top-k over the cumulative counts (needs a supermask
    /// model).
    FrlDp(crate::frl::dp::FrlDpSpec),
}

impl Default for AlgorithmSpec {
    fn default() -> Self {
        AlgorithmSpec::Fedavg {}
    }
}

impl AlgorithmSpec {
    /// The run's kind settings: `seed` is the run seed (FRL's network and
    /// SPSA's directions derive from it unless the spec names another).
    pub fn resolve(&self, seed: u64, arch: &ModelArch) -> Result<KindSettings, KindError> {
        let settings = match self {
            AlgorithmSpec::Fedavg {} => KindSettings::FedAvg,
            AlgorithmSpec::Fedavgm(s) => KindSettings::FedAvgM(s.resolve()),
            AlgorithmSpec::Spsa(s) => KindSettings::Spsa(s.resolve(seed)),
            AlgorithmSpec::Frl(s) => KindSettings::Frl(s.resolve(seed, arch)?),
            AlgorithmSpec::Ferret(s) => KindSettings::Ferret(s.resolve(seed)),
            AlgorithmSpec::DpFtrl(s) => KindSettings::DpFtrl(s.resolve()?),
            AlgorithmSpec::FrlDp(s) => KindSettings::FrlDp(s.resolve(seed, arch)?),
        };
        // Validates the settings against the model.
        settings.build(arch)?;
        Ok(settings)
    }
}

/// Refuses a rule the kind does not support, naming the ones it does: a
/// kind with a rule it can't apply is a configuration error before any
/// round runs, never a silent fallback.
pub fn check_rule(kind: &dyn UpdateKind, rule: &RuleSpec) -> Result<(), KindError> {
    if kind.rules().contains(&rule.name()) {
        return Ok(());
    }
    Err(KindError::UnsupportedRule { kind: kind.name(), rule: rule.name(), supported: kind.rules().join(", ") })
}

/// The [`ModelSync`] of runs that send the model in full.
pub fn full_model(global: &[f32]) -> ModelSync {
    ModelSync::Full(global.to_vec())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::supermask::FrlArch;

    const ALL_RULES: [RuleSpec; 6] = [
        RuleSpec::Mean,
        RuleSpec::Median,
        RuleSpec::TrimmedMean { trim: 1 },
        RuleSpec::Krum { byzantine: 1 },
        RuleSpec::MultiKrum { byzantine: 1 },
        RuleSpec::NormClip { max_norm: 1.0 },
    ];

    #[test]
    fn rules_read_from_names_and_tables_and_check_their_parameters() {
        #[derive(Deserialize)]
        struct File {
            rule: RuleSpec,
        }
        let parse = |s: &str| toml::from_str::<File>(s).map(|f| f.rule).map_err(|e| e.to_string());
        assert_eq!(parse("rule = \"median\""), Ok(RuleSpec::Median));
        assert_eq!(parse("rule = { kind = \"trimmed-mean\", trim = 2 }"), Ok(RuleSpec::TrimmedMean { trim: 2 }));
        assert_eq!(parse("[rule]\nkind = \"multi-krum\"\nbyzantine = 1"), Ok(RuleSpec::MultiKrum { byzantine: 1 }));
        assert!(parse("rule = \"krum\"").unwrap_err().contains("has parameters"));
        assert!(parse("rule = \"mode\"").is_err());
        assert!(parse("rule = { kind = \"krum\", f = 1 }").is_err());
        // Round trips through the configuration form.
        for r in ALL_RULES {
            let text = toml::to_string(&File2 { rule: r }).unwrap();
            assert_eq!(parse(&text), Ok(r), "{text}");
        }
        // Parameters that can't hold for a round of quorum size.
        assert!(RuleSpec::TrimmedMean { trim: 2 }.check_round_size(5).is_ok());
        let e = RuleSpec::TrimmedMean { trim: 2 }.check_round_size(4).unwrap_err().to_string();
        assert!(e.contains("trim = 2"), "{e}");
        assert!(RuleSpec::Krum { byzantine: 1 }.check_round_size(5).is_ok());
        assert!(RuleSpec::Krum { byzantine: 1 }.check_round_size(4).is_err());
        assert!(RuleSpec::MultiKrum { byzantine: 2 }.check_round_size(6).is_err());
        assert!(RuleSpec::NormClip { max_norm: f32::NAN }.check_round_size(5).is_err());
    }

    #[derive(Serialize)]
    struct File2 {
        rule: RuleSpec,
    }

    static SEED: std::sync::LazyLock<crate::dp::NoiseSeed> =
        std::sync::LazyLock::new(|| crate::dp::NoiseSeed::insecure_from_u64(1));

    fn shape(arch: &ModelArch) -> RunShape<'_> {
        RunShape { arch, clients_per_round: 10, rounds: 10, max_update_abs: f32::MAX, noise_seed: Some(&*SEED) }
    }

    #[test]
    fn the_registry_builds_every_kind_and_refuses_rules_it_cannot_apply() {
        let mlp = ModelArch::mnist_mlp();
        let net = ModelArch::Supermask(FrlArch::Conv2 { channels: 1, side: 2, classes: 2 });
        let init = mlp.init_params(1);
        let cases = [
            (AlgorithmSpec::Fedavg {}, &mlp, "fedavg", crate::fedavg::DENSE_RULES),
            (AlgorithmSpec::Fedavgm(Default::default()), &mlp, "fedavgm", crate::fedavg::DENSE_RULES),
            (AlgorithmSpec::Spsa(Default::default()), &mlp, "spsa", &["mean"]),
            (AlgorithmSpec::Frl(Default::default()), &net, "frl", &["mean"]),
            (AlgorithmSpec::Ferret(Default::default()), &mlp, "ferret", crate::fedavg::DENSE_RULES),
            (
                AlgorithmSpec::DpFtrl(crate::dpftrl::DpFtrlSpec {
                    epsilon: Some(4.0),
                    horizon: Some(10),
                    ..Default::default()
                }),
                &mlp,
                "dp-ftrl",
                &["mean"],
            ),
        ];
        for (spec, arch, name, rules) in cases {
            let settings = spec.resolve(3, arch).unwrap();
            let kind = settings.build(arch).unwrap();
            assert_eq!((kind.name(), settings.name()), (name, name));
            assert_eq!(kind.settings(), settings);
            assert_eq!(kind.rules(), rules);
            let init = if *arch == net { arch.init_params(3) } else { init.clone() };
            for rule in ALL_RULES {
                let made = kind.aggregator(&shape(arch), &rule, &init);
                match made {
                    Ok(agg) => assert!(rules.contains(&rule.name()), "{name} made a {rule} aggregator {agg:?}"),
                    Err(KindError::UnsupportedRule { kind, rule: r, supported }) => {
                        assert!(!rules.contains(&rule.name()));
                        assert_eq!((kind, r), (name, rule.name()));
                        assert_eq!(supported, "mean");
                    }
                    Err(e) => panic!("{name} with {rule}: {e}"),
                }
            }
        }
        // Kinds check the model: FRL needs a supermask, the others refuse one.
        assert!(AlgorithmSpec::Frl(Default::default()).resolve(3, &mlp).is_err());
        for spec in [AlgorithmSpec::Fedavg {}, AlgorithmSpec::Spsa(Default::default())] {
            assert!(spec.resolve(3, &net).is_err());
        }
    }

    #[test]
    fn configuration_files_name_the_kind_and_misspelt_settings_are_refused() {
        #[derive(Deserialize)]
        struct File {
            algorithm: AlgorithmSpec,
        }
        let parse = |s: &str| toml::from_str::<File>(s).map(|f| f.algorithm);
        assert_eq!(parse("algorithm = { kind = \"fedavg\" }").unwrap(), AlgorithmSpec::default());
        assert!(matches!(
            parse("[algorithm]\nkind = \"spsa\"\nlr = 0.5").unwrap(),
            AlgorithmSpec::Spsa(s) if s.lr == 0.5 && s.steps_per_client == 32
        ));
        for bad in [
            "algorithm = { kind = \"fedavg\", momentum = 0.9 }",
            "algorithm = { kind = \"spsa\", step_per_client = 3 }",
            "algorithm = { kind = \"frl\", kfraction = 0.3 }",
            "algorithm = { kind = \"ferret\", K = 8 }",
            "algorithm = { kind = \"dp-ftrl\", epsilon = 1.0, horizon = 5, clip = 1.0 }",
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn the_coordinator_refuses_an_unsupported_rule_with_a_clear_error() {
        let arch = ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 };
        let cfg = crate::CoordinatorConfig {
            run_id: crate::wire::RunId([1; 16]),
            arch: arch.clone(),
            rounds: 1,
            enrolled: vec![crate::Identity::from_secret([1; 32]).public_key()],
            min_clients: 1,
            clients_per_round: 1,
            quorum: 1,
            round_timeout: std::time::Duration::from_secs(1),
            train: crate::wire::TrainSpec::sgd(0.1, 1, 1),
            kind: KindSettings::Spsa(crate::spsa::SpsaSpec::default().resolve(1)),
            rule: RuleSpec::Median,
            max_violations: 1,
            max_update_abs: crate::coordinator::DEFAULT_MAX_UPDATE_ABS,
            schedule: None,
            final_evaluation: false,
            noise_seed: None,
        };
        let err = crate::Coordinator::new(cfg.clone(), arch.init_params(1), 1).unwrap_err().to_string();
        assert!(err.contains("spsa does not support the aggregation rule median"), "{err}");
        let ok = crate::CoordinatorConfig { kind: KindSettings::FedAvg, ..cfg };
        assert!(crate::Coordinator::new(ok, arch.init_params(1), 1).is_ok());
    }
}
