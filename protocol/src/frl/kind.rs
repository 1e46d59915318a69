//! FRL as an update kind: its settings in configuration files, its run
//! settings on the wire, its payload faults, and the published global
//! ranking that every client turns back into scores.

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use super::{FrlError, FrlRun, FrlVote, MaskRule, ReferenceCache, decode};
use crate::aggregate::Aggregator;
use crate::error::{Misbehaviour, PayloadFault};
use crate::kind::{self, KindError, KindId, KindSettings, RuleSpec, RunShape, UpdateKind};
use crate::model::ModelArch;
use crate::supermask::FrlArch;

/// The kind's name in configuration files.
pub const NAME: &str = "frl";
/// Tag of FRL payloads.
pub const ID: KindId = KindId(2);

/// FRL's settings beyond `train` (lr, batch size, epochs) in a configuration
/// file. Defaults are the paper's MNIST settings (`docs/algorithms.md`
/// §1.10); the network seed is the run seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrlSpec {
    /// Per-round learning-rate decay (0.999).
    pub lr_decay: f64,
    /// SGD momentum on the scores (0.9).
    pub momentum: f32,
    /// Weight decay on the scores (1e-4).
    pub weight_decay: f32,
    /// Fraction of each layer's edges kept (0.5).
    pub k_fraction: f64,
    /// `two-sided` (as published) or `one-sided-top-k`.
    pub mask: MaskRule,
    /// Input normalisation mean (MNIST 0.1307; Fashion-MNIST 0.2860).
    pub input_mean: f32,
    /// Input normalisation std (MNIST 0.3081; Fashion-MNIST 0.3530).
    pub input_std: f32,
}

impl Default for FrlSpec {
    fn default() -> Self {
        let run = FrlRun::new(0, Vec::new());
        FrlSpec {
            lr_decay: run.lr_decay,
            momentum: run.momentum,
            weight_decay: run.weight_decay,
            k_fraction: run.vote.k_fraction,
            mask: run.vote.mask,
            input_mean: run.input_mean,
            input_std: run.input_std,
        }
    }
}

impl FrlSpec {
    /// The run settings for a run seeded `seed` over `arch` (a supermask).
    pub fn resolve(&self, seed: u64, arch: &ModelArch) -> Result<FrlRun, KindError> {
        let net = network(arch)?;
        let mut run = FrlRun::new(seed, net.layer_sizes());
        run.lr_decay = self.lr_decay;
        run.momentum = self.momentum;
        run.weight_decay = self.weight_decay;
        run.vote.k_fraction = self.k_fraction;
        run.vote.mask = self.mask;
        run.input_mean = self.input_mean;
        run.input_std = self.input_std;
        Ok(run)
    }
}

fn network(arch: &ModelArch) -> Result<&FrlArch, KindError> {
    match arch {
        ModelArch::Supermask(net) => Ok(net),
        _ => Err(KindError::invalid(NAME, "needs model = { kind = \"supermask\", net = ..., classes = ... }")),
    }
}

/// `s̄` of the runs this process has seen: every participant of a
/// simulation, and every connection of a client, shares one copy.
fn sorted_cache() -> &'static ReferenceCache {
    static CACHE: OnceLock<ReferenceCache> = OnceLock::new();
    CACHE.get_or_init(ReferenceCache::default)
}

/// The FRL kind of a run: the run settings and `s̄`, the sorted initial
/// scores every global score vector is a permutation of.
#[derive(Debug, Clone)]
pub struct FrlKind {
    run: FrlRun,
    arch: ModelArch,
    sorted: Arc<[f32]>,
}

impl FrlKind {
    /// FRL with `run` over `arch`, which must be the supermask network the
    /// run's layer sizes describe.
    pub fn new(run: FrlRun, arch: &ModelArch) -> Result<Self, KindError> {
        run.validate(arch).map_err(|e| KindError::invalid(NAME, e))?;
        let net = network(arch)?;
        let sorted = sorted_cache().sorted_scores(net, &run).map_err(|e| KindError::invalid(NAME, e))?;
        Ok(FrlKind { run, arch: arch.clone(), sorted })
    }

    /// The run settings.
    pub fn run(&self) -> &FrlRun {
        &self.run
    }
}

impl UpdateKind for FrlKind {
    fn name(&self) -> &'static str {
        NAME
    }
    fn id(&self) -> KindId {
        ID
    }
    fn settings(&self) -> KindSettings {
        KindSettings::Frl(self.run.clone())
    }
    fn publication(&self) -> kind::Publication {
        kind::Publication::Encoded
    }
    /// The vote is the mean position (a Borda count); no other rule applies
    /// to rankings.
    fn rules(&self) -> &'static [&'static str] {
        &["mean"]
    }
    fn aggregator(
        &self,
        _run: &RunShape<'_>,
        rule: &RuleSpec,
        initial: &[f32],
    ) -> Result<Box<dyn Aggregator>, KindError> {
        kind::check_rule(self, rule)?;
        if self.run.vote.num_edges() != initial.len() {
            return Err(KindError::invalid(NAME, "the model is not the network's score vector"));
        }
        let vote = FrlVote::for_run(self.run.clone(), &self.arch).map_err(|e| KindError::invalid(NAME, e))?;
        Ok(Box::new(vote))
    }
    /// The global ranking → the global scores `S[G[j]] = s̄[j]`.
    fn decode_published(&self, bytes: &[u8]) -> Result<Vec<f32>, Misbehaviour> {
        let ranking = decode(bytes, &self.run.vote.layer_sizes).map_err(bad_payload)?;
        let mut scores = vec![0f32; self.sorted.len()];
        ranking.write_scores(&self.sorted, &mut scores).map_err(bad_payload)?;
        Ok(scores)
    }
}

/// A ranking the run can't take, as the core's kind-neutral error.
pub fn bad_payload(e: FrlError) -> Misbehaviour {
    let fault = match e {
        FrlError::WrongLayerCount { expected, got } => PayloadFault::Length { part: None, expected, got },
        FrlError::WrongLayerSize { layer, expected, got } => PayloadFault::Length { part: Some(layer), expected, got },
        FrlError::NotAPermutation { layer, index } => PayloadFault::NotAPermutation { part: layer, index },
        FrlError::DuplicateIndex { layer, index } => PayloadFault::Repeated { part: layer, index },
        FrlError::Truncated { expected, got } => PayloadFault::Length { part: None, expected, got },
        FrlError::TrailingBytes { extra } => PayloadFault::Trailing { extra },
        FrlError::NonZeroPadding { layer } => PayloadFault::NonCanonical { part: layer },
        FrlError::WrongLength { expected, got, .. } => PayloadFault::Length { part: None, expected, got },
        // Configuration faults can't come from a payload decoded with a
        // validated run's layer sizes; reported as a shape fault if ever.
        FrlError::EmptyLayer { .. }
        | FrlError::BadLayerCount { .. }
        | FrlError::TooManyEdges { .. }
        | FrlError::NonFiniteScore { .. }
        | FrlError::UnsortedScores { .. }
        | FrlError::InvalidConfig(_) => PayloadFault::Length { part: None, expected: 0, got: 0 },
    };
    Misbehaviour::BadPayload { kind: NAME, fault }
}

/// A ranking as a payload.
pub fn payload(ranking: &super::Ranking) -> crate::wire::UpdatePayload {
    crate::wire::UpdatePayload { kind: ID, data: super::encode(ranking) }
}
