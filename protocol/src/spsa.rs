//! One-byte SPSA: zeroth-order updates on shared random directions.
//!
//! Papers: MeZO (Malladi et al., NeurIPS 2023) for the in-memory two-point
//! estimate, Just One Byte (Zelikman et al., 2023) for sending one byte per
//! estimate and replaying everyone's updates on every replica.
//!
//! **Client, per step `j` of round `r`:** with direction `z = z(run seed,
//! SPSA, r, client, j)` from [`crate::prng`] (Rademacher ±1), evaluate the
//! minibatch loss at `θ + εz` and `θ − εz`, form `g = (ℓ₊ − ℓ₋) / 2ε` and
//! send [`encode`]`(g)`: one byte. θ itself is never modified (the perturbed
//! parameters are written into an evaluation buffer), so nothing has to be
//! "restored" by floating-point arithmetic, which is not exact.
//!
//! **Wire payload:** the bytes, byte `j` for step `j`, tagged [`ID`],
//! `1 ≤ len ≤ steps_per_client`. The server checks the round (signature,
//! replay, duplicate as for every report), the step range and each byte's
//! validity, and broadcasts the round's ordered log.
//!
//! **Every replica (server and clients), per round:** with `N` the total
//! number of accepted steps, apply for each client in ascending id and each
//! of its steps in order: `θ ← θ + s·z` with `s = f32(−lr · decode(byte) / N)`
//! computed in f64 and rounded once, and the addition done as in
//! [`crate::prng::apply_rademacher`]. Same log ⇒ bit-identical parameters.
//!
//! # The byte ("strict8")
//!
//! Bit 7 is the sign (1 = negative), bits 0–6 a magnitude code `q`:
//! `q = 0` is exact zero (only `0x00`; `0x80` is refused as non-canonical),
//! and `q ∈ 1..=127` decodes to `±exp((q − 64) / 8)`, from `3.80e-4` to
//! `2.63e3`. Encoding rounds `8·ln|g|` to the nearest code, so the relative
//! error inside that range is at most `e^(1/16) − 1 ≈ 6.5%`; magnitudes above
//! are clamped to the top code, magnitudes below half the smallest code
//! (`|g| < e^(−7.9375)`) encode as zero, and NaN encodes as zero (the step
//! carries no information). Decoding uses a checked-in table of f32 bit
//! patterns, never `exp`, so all replicas decode identically whatever their
//! libm. The Just One Byte code computes its byte but sends the float, and
//! its "one byte" needs 9 bits; this codec is a true 8-bit code.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::aggregate::{AggregateError, AggregateStats, Aggregator, ClientIndex, check_common};
use crate::error::Misbehaviour;
use crate::kind::{self, KindError, KindId, KindSettings, RuleSpec, RunShape, UpdateKind};
use crate::model::ModelArch;
use crate::prng::{Purpose, StreamId};
pub use crate::wire::LogEntry;
use crate::wire::{ClientUpdate, LogBody, ModelSync, RoundLog, UpdatePayload};

/// The kind's name in configuration files.
pub const NAME: &str = "spsa";
/// Tag of SPSA payloads.
pub const ID: KindId = KindId(1);

/// Most SPSA steps one client may report per round: the byte vector's length
/// bound on the wire. 4,096 steps is minutes of forward passes on an edge CPU
/// and keeps a report under 4.2 KB.
pub const MAX_SPSA_STEPS: u32 = 4096;

/// The non-canonical "negative zero" byte, refused on the wire.
pub const NEGATIVE_ZERO: u8 = 0x80;

/// SPSA in a configuration file: `{ kind = "spsa", steps_per_client = 32,
/// eps = 1e-3, lr = 0.01, batch_size = 64 }` (defaults shown); the
/// directions' seed defaults to the run seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpsaSpec {
    /// Estimates (= bytes) per client per round (32).
    pub steps_per_client: u32,
    /// Perturbation size ε (1e-3).
    pub eps: f32,
    /// Learning rate η of the replayed update (0.01).
    pub lr: f32,
    /// Minibatch of each loss evaluation (64).
    pub batch_size: u32,
    /// Seed of the shared directions. Default: the run seed.
    pub stream_seed: Option<u64>,
}

impl Default for SpsaSpec {
    fn default() -> Self {
        SpsaSpec { steps_per_client: 32, eps: 1e-3, lr: 0.01, batch_size: 64, stream_seed: None }
    }
}

impl SpsaSpec {
    /// The settings of a run seeded `seed`.
    pub fn resolve(&self, seed: u64) -> SpsaConfig {
        SpsaConfig {
            stream_seed: self.stream_seed.unwrap_or(seed),
            steps_per_client: self.steps_per_client,
            eps: self.eps,
            lr: self.lr,
            batch_size: self.batch_size,
        }
    }
}

/// Configuration of an SPSA run, agreed in the run configuration.
#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct SpsaConfig {
    /// Seed of the shared direction streams (public; every replica needs it).
    pub stream_seed: u64,
    /// Steps (estimates) each client computes per round.
    pub steps_per_client: u32,
    /// Perturbation size ε.
    pub eps: f32,
    /// Learning rate η of the replayed update.
    pub lr: f32,
    /// Minibatch size of each loss evaluation.
    pub batch_size: u32,
}

impl SpsaConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), String> {
        if self.steps_per_client == 0 || self.steps_per_client > MAX_SPSA_STEPS {
            return Err(format!("steps_per_client must be in 1..={MAX_SPSA_STEPS}"));
        }
        if !(self.eps.is_finite() && self.eps > 0.0 && self.lr.is_finite() && self.lr > 0.0) {
            return Err("eps and lr must be positive and finite".into());
        }
        if self.batch_size == 0 {
            return Err("batch_size must be at least 1".into());
        }
        Ok(())
    }

    /// The direction of step `step` of `client` in `round`.
    pub fn direction(&self, round: u32, client: ClientIndex, step: u32) -> StreamId {
        StreamId { run_seed: self.stream_seed, purpose: Purpose::SpsaPerturbation, round, client, step }
    }
}

/// `exp((q − 64) / 8)` for `q = 0..128` as f32 bit patterns (index 0 unused:
/// code 0 is zero). Generated once in f64 and rounded to nearest f32; the
/// test `table_matches_exp` re-derives it.
const DECODE_BITS: [u32; 128] = [
    0x39afe108, 0x39c74c0c, 0x39e1d549, 0x39ffe709, 0x3a10fcdd, 0x3a244aeb, 0x3a3a2aff, 0x3a52f4b8, 0x3a6f0b5d,
    0x3a876fb7, 0x3a997833, 0x3aade75d, 0x3ac50f0c, 0x3adf4bff, 0x3afd074b, 0x3b0f5c03, 0x3b227290, 0x3b3813bf,
    0x3b509633, 0x3b6c5c17, 0x3b85ea53, 0x3b97bef6, 0x3babf360, 0x3bc2d87d, 0x3bdcc9ff, 0x3bfa2fd0, 0x3c0dbfd7,
    0x3c209f82, 0x3c360282, 0x3c4e3e7f, 0x3c69b489, 0x3c84694e, 0x3c960aae, 0x3caa0500, 0x3cc0a84a, 0x3cda4f35,
    0x3cf76081, 0x3d0c284c, 0x3d1ed1b4, 0x3d33f737, 0x3d4bed86, 0x3d67149c, 0x3d82ec9c, 0x3d945b4c, 0x3da81c2e,
    0x3dbe7e61, 0x3dd7db8c, 0x3df49946, 0x3e0a9555, 0x3e1d0916, 0x3e31f1cc, 0x3e49a337, 0x3e647c3c, 0x3e817431,
    0x3e92b0c2, 0x3ea638d9, 0x3ebc5ab2, 0x3ed56ef0, 0x3ef1da07, 0x3f0906e5, 0x3f1b4598, 0x3f2ff231, 0x3f475f7d,
    0x3f61eb51, 0x3f800000, 0x3f910b02, 0x3fa45af2, 0x3fba3d29, 0x3fd3094c, 0x3fef22af, 0x40077cee, 0x4019872c,
    0x402df854, 0x40452246, 0x405f61c7, 0x407d1ffa, 0x408f69ff, 0x40a28269, 0x40b825b5, 0x40d0aa8d, 0x40ec7326,
    0x4105f763, 0x4117cdc4, 0x412c0426, 0x4142eb7f, 0x415cdf89, 0x417a4838, 0x418dcdab, 0x41a0af2e, 0x41b61444,
    0x41ce529e, 0x41e9cb55, 0x42047639, 0x42161951, 0x422a1597, 0x4240bb15, 0x425a6481, 0x427778a3, 0x428c35f9,
    0x429ee133, 0x42b408c5, 0x42cc016b, 0x42e72b27, 0x4302f962, 0x431469c5, 0x43282c95, 0x433e90f7, 0x4357f09b,
    0x4374b122, 0x438aa2da, 0x439d1868, 0x43b20328, 0x43c9b6e3, 0x43e49286, 0x440180d2, 0x4412bf11, 0x44264911,
    0x443c6d12, 0x445583c3, 0x4471f1a0, 0x44891443, 0x449b54be, 0x44b0035b, 0x44c772f0, 0x44e2015b, 0x45000c7d,
    0x45111929, 0x45246afb,
];

/// Encodes a projected gradient as one byte (see the module docs).
pub fn encode(g: f32) -> u8 {
    if g.is_nan() {
        return 0; // no information
    }
    let mag = g.abs();
    // Below half a code under the smallest magnitude: zero.
    if mag == 0.0 || f64::from(mag).ln() * 8.0 < -63.5 {
        return 0;
    }
    let q = ((f64::from(mag).ln() * 8.0).round() + 64.0).clamp(1.0, 127.0) as u8;
    if g < 0.0 { q | 0x80 } else { q }
}

/// Decodes a byte; `None` for the non-canonical `0x80`.
pub fn decode(byte: u8) -> Option<f32> {
    let q = byte & 0x7f;
    if q == 0 {
        return (byte == 0).then_some(0.0);
    }
    let m = f32::from_bits(DECODE_BITS[q as usize]);
    Some(if byte & 0x80 != 0 { -m } else { m })
}

/// Applies a round's log to `params`: the replicated update rule (module
/// docs). `entries` must be in ascending client order (as logs are built).
pub fn apply_round(params: &mut [f32], cfg: &SpsaConfig, round: u32, entries: &[LogEntry]) {
    apply_round_with(params, cfg, round, entries, &crate::prng::CpuApplier);
}

/// [`apply_round`] with the directions applied by `applier`.
pub fn apply_round_with(
    params: &mut [f32],
    cfg: &SpsaConfig,
    round: u32,
    entries: &[LogEntry],
    applier: &dyn crate::prng::DirectionApplier,
) {
    let n: usize = entries.iter().map(|e| e.bytes.len()).sum();
    if n == 0 {
        return;
    }
    let mut dirs = Vec::with_capacity(n);
    for e in entries {
        for (j, &b) in e.bytes.iter().enumerate() {
            // Invalid bytes never reach a log (absorb refuses them); decode
            // them as zero rather than panic if a caller builds one by hand.
            let g = decode(b).unwrap_or(0.0);
            let s = (-f64::from(cfg.lr) * f64::from(g) / n as f64) as f32;
            dirs.push((cfg.direction(round, e.client, j as u32), s));
        }
    }
    applier.apply_rademacher(params, &dirs);
}

/// An SPSA payload: the step bytes.
pub fn payload(bytes: Vec<u8>) -> UpdatePayload {
    UpdatePayload { kind: ID, data: bytes }
}

/// Checks an SPSA payload; returns its bytes.
pub fn check_payload<'a>(update: &'a ClientUpdate, cfg: &SpsaConfig) -> Result<&'a [u8], Misbehaviour> {
    let bytes = kind::payload_of(update, ID, NAME)?;
    check_bytes(bytes, cfg)?;
    Ok(bytes)
}

/// Checks one client's step bytes: `1..=steps_per_client` of them, none the
/// non-canonical `0x80`.
pub fn check_bytes(bytes: &[u8], cfg: &SpsaConfig) -> Result<(), Misbehaviour> {
    if bytes.is_empty() || bytes.len() > cfg.steps_per_client as usize {
        return Err(Misbehaviour::WrongDimension { expected: cfg.steps_per_client as usize, got: bytes.len() });
    }
    if let Some(i) = bytes.iter().position(|&b| b == NEGATIVE_ZERO) {
        return Err(Misbehaviour::NonFinite(i));
    }
    Ok(())
}

/// The SPSA kind: a replicated run.
#[derive(Debug, Clone)]
pub struct SpsaKind {
    cfg: SpsaConfig,
}

impl SpsaKind {
    /// SPSA with `cfg` over `arch`.
    pub fn new(cfg: SpsaConfig, arch: &ModelArch) -> Result<Self, KindError> {
        cfg.validate().map_err(|e| KindError::invalid(NAME, e))?;
        crate::fedavg::dense_model(NAME, arch)?;
        Ok(SpsaKind { cfg })
    }

    /// The settings.
    pub fn config(&self) -> &SpsaConfig {
        &self.cfg
    }
}

impl UpdateKind for SpsaKind {
    fn name(&self) -> &'static str {
        NAME
    }
    fn id(&self) -> KindId {
        ID
    }
    fn settings(&self) -> KindSettings {
        KindSettings::Spsa(self.cfg.clone())
    }
    fn publication(&self) -> kind::Publication {
        kind::Publication::Replica
    }
    fn aggregator(
        &self,
        run: &RunShape<'_>,
        rule: &RuleSpec,
        _initial: &[f32],
    ) -> Result<Box<dyn Aggregator>, KindError> {
        kind::check_rule(self, rule)?;
        // One round's log must leave room in the catch-up budget.
        let per_round = run.clients_per_round.saturating_mul(self.cfg.steps_per_client as usize + 16);
        if per_round > crate::wire::SYNC_LOG_BUDGET_BYTES / 2 {
            return Err(KindError::invalid(
                NAME,
                "clients_per_round × steps_per_client exceeds half the sync log budget",
            ));
        }
        Ok(Box::new(Spsa::new(self.cfg.clone())))
    }
    fn apply_log(
        &self,
        params: &mut [f32],
        log: &RoundLog,
        applier: &dyn crate::prng::DirectionApplier,
    ) -> Result<(), Misbehaviour> {
        let entries = match &log.body {
            LogBody::Skipped => return Ok(()),
            LogBody::PerClient(entries) => entries,
            LogBody::Combined(_) => return Err(Misbehaviour::Unexpected("a combined RoundLog in an SPSA run")),
        };
        if entries.windows(2).any(|w| w[0].client >= w[1].client) {
            return Err(Misbehaviour::Unexpected("RoundLog entries not in ascending client order"));
        }
        for e in entries {
            check_bytes(&e.bytes, &self.cfg)?;
        }
        apply_round_with(params, &self.cfg, log.round, entries, applier);
        Ok(())
    }
}

/// The SPSA aggregator: collects each client's bytes, and at the end of the
/// round applies the ordered log to the global model and hands the log to
/// the coordinator for broadcast.
#[derive(Debug)]
pub struct Spsa {
    cfg: SpsaConfig,
    round: u32,
    entries: std::collections::BTreeMap<ClientIndex, (u64, f32, Vec<u8>)>,
    last_log: Vec<LogEntry>,
}

impl Spsa {
    /// An SPSA aggregator.
    pub fn new(cfg: SpsaConfig) -> Self {
        Spsa { cfg, round: 0, entries: Default::default(), last_log: Vec::new() }
    }

    /// The configuration.
    pub fn config(&self) -> &SpsaConfig {
        &self.cfg
    }
}

impl Aggregator for Spsa {
    fn name(&self) -> &'static str {
        "spsa"
    }

    fn begin_round(&mut self, round: u32, _global: &[f32]) {
        self.round = round;
        self.entries.clear();
    }

    fn absorb(&mut self, client: ClientIndex, update: &ClientUpdate) -> Result<(), Misbehaviour> {
        check_common(update)?;
        let bytes = check_payload(update, &self.cfg)?;
        self.entries.insert(client, (update.num_samples, update.train_loss, bytes.to_vec()));
        Ok(())
    }

    fn finish(&mut self, global: &mut [f32]) -> Result<AggregateStats, AggregateError> {
        if self.entries.is_empty() {
            return Err(AggregateError::Empty);
        }
        let log: Vec<LogEntry> =
            self.entries.iter().map(|(&client, (_, _, bytes))| LogEntry { client, bytes: bytes.clone() }).collect();
        apply_round(global, &self.cfg, self.round, &log);
        let samples: u64 = self.entries.values().map(|(n, ..)| *n).sum();
        let loss =
            self.entries.values().map(|(n, l, _)| *n as f64 * f64::from(*l)).sum::<f64>() / samples.max(1) as f64;
        let stats = AggregateStats { updates: self.entries.len(), samples, train_loss: loss, privacy: None };
        self.last_log = log;
        self.entries.clear();
        Ok(stats)
    }

    fn take_log(&mut self) -> Option<LogBody> {
        Some(LogBody::PerClient(std::mem::take(&mut self.last_log)))
    }

    fn publish(&self, global: &[f32]) -> ModelSync {
        ModelSync::Replica { model_hash: crate::identity::params_hash(global) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_exp() {
        for (q, &bits) in DECODE_BITS.iter().enumerate().skip(1) {
            let want = ((q as f64 - 64.0) / 8.0).exp() as f32;
            let got = f32::from_bits(bits);
            assert!((got.to_bits() as i64 - want.to_bits() as i64).abs() <= 1, "q={q}: {got} vs {want}");
        }
        assert_eq!(decode(64), Some(1.0));
    }

    #[test]
    fn round_trip_error_is_bounded_in_range() {
        let bound = (1.0f64 / 16.0).exp() - 1.0; // 6.46%
        let mut worst = 0.0f64;
        let mut g = 4.0e-4f32;
        while g < 2.6e3 {
            for s in [g, -g] {
                let d = decode(encode(s)).unwrap();
                assert_eq!(d.signum(), s.signum());
                let rel = (f64::from(d) - f64::from(s)).abs() / f64::from(s).abs();
                worst = worst.max(rel);
            }
            g *= 1.013;
        }
        assert!(worst <= bound + 1e-6, "worst relative error {worst}");
        assert!(worst > 0.05, "the bound should be nearly reached: {worst}");
    }

    #[test]
    fn edges_zero_nan_clamp_and_noncanonical() {
        assert_eq!(encode(0.0), 0);
        assert_eq!(encode(-0.0), 0);
        assert_eq!(encode(f32::NAN), 0);
        assert_eq!(encode(1e-9), 0);
        assert_eq!(decode(encode(1e9)), Some(f32::from_bits(DECODE_BITS[127])));
        assert_eq!(decode(encode(f32::INFINITY)), Some(f32::from_bits(DECODE_BITS[127])));
        assert_eq!(decode(encode(-1e9)), Some(-f32::from_bits(DECODE_BITS[127])));
        assert_eq!(decode(0x80), None);
        // Every other byte decodes, and encode∘decode is the identity on codes.
        for b in 0u8..=255 {
            if b == 0x80 {
                continue;
            }
            assert_eq!(encode(decode(b).unwrap()), b, "byte {b:#04x}");
        }
    }

    fn cfg() -> SpsaConfig {
        SpsaConfig { stream_seed: 11, steps_per_client: 4, eps: 1e-3, lr: 0.01, batch_size: 8 }
    }

    fn upd(bytes: Vec<u8>) -> ClientUpdate {
        ClientUpdate { num_samples: 8, train_loss: 1.0, payload: payload(bytes) }
    }

    #[test]
    fn aggregator_checks_steps_and_bytes_and_is_order_independent() {
        let mut a = Spsa::new(cfg());
        let mut g = vec![0.5f32; 1000];
        a.begin_round(1, &g);
        assert!(matches!(a.absorb(0, &upd(vec![])), Err(Misbehaviour::WrongDimension { .. })));
        assert!(matches!(a.absorb(0, &upd(vec![1; 5])), Err(Misbehaviour::WrongDimension { .. })));
        assert!(matches!(a.absorb(0, &upd(vec![1, 0x80])), Err(Misbehaviour::NonFinite(1))));
        let dense = ClientUpdate {
            num_samples: 1,
            train_loss: 0.0,
            payload: crate::fedavg::encode_delta(crate::fedavg::ID, &[0.0]),
        };
        assert!(matches!(a.absorb(0, &dense), Err(Misbehaviour::KindMismatch { .. })));
        a.absorb(2, &upd(vec![70, 200])).unwrap();
        a.absorb(1, &upd(vec![64, 65, 0, 190])).unwrap();
        a.finish(&mut g).unwrap();
        let Some(LogBody::PerClient(log)) = a.take_log() else { panic!("SPSA logs per client") };
        assert_eq!(log.iter().map(|e| e.client).collect::<Vec<_>>(), vec![1, 2]);
        // A replica applying the log gets the same bits.
        let mut r = vec![0.5f32; 1000];
        apply_round(&mut r, &cfg(), 1, &log);
        assert_eq!(
            r.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            g.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_ne!(r, vec![0.5f32; 1000]);
    }
}
