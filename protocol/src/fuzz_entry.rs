//! Fuzzing entry points: one function per cargo-fuzz target (`fuzz/`).
//!
//! Each `pub fn <target>(data: &[u8])` feeds arbitrary bytes to one decoder or
//! state machine and must never panic: a panic here is a bug in the code
//! under test (or a broken invariant, which the functions check with
//! `assert!`). The bodies live in this crate, not in `fuzz/`, so that the
//! stable test suite can run every entry point over the checked-in corpus
//! (`fuzz/corpus/<target>/`, see `tests::every_corpus_file_runs_clean`)
//! without nightly or libFuzzer; `fuzz/fuzz_targets/<target>.rs` only calls
//! the function.
//!
//! Not part of the protocol's API: hidden from the docs, stable only as far
//! as the fuzz targets need.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::aggregate::{Aggregator, ClientIndex};
use crate::codec;
use crate::coordinator::{ConnectionHandle, Coordinator, CoordinatorConfig, Event, Phase};
use crate::durable::{self, Persist, Record, Snapshot};
use crate::fedavg::FedAvg;
use crate::frl::{self, FrlConfig, FrlRun, FrlVote, MaskRule, Ranking};
use crate::identity::{Identity, join_transcript, report_transcript};
use crate::kind::{KindSettings, RuleSpec};
use crate::model::ModelArch;
use crate::participant::{Participant, ParticipantEvent};
use crate::spsa::{Spsa, SpsaConfig};
use crate::supermask::FrlArch;
use crate::wire::{
    Ack, ClientUpdate, EvalReport, Finished, Hello, Join, LogEntry, MAX_HANDSHAKE_BYTES, MAX_MESSAGE_BYTES, Message,
    ModelSync, PROTOCOL_VERSION, RejectCode, Rejected, Report, RoundLog, RoundStart, RunConfig, RunId, SignedReport,
    Sync, Task, TrainSpec, UpdatePayload, Welcome,
};

/// A fuzz target: its name and entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by name: the cargo-fuzz target and its corpus directory are
/// called the same. The stable corpus test walks this list.
pub const TARGETS: &[Target] = &[
    ("envelope", envelope),
    ("report", report),
    ("dense_update", dense_update),
    ("spsa_update", spsa_update),
    ("ferret_update", ferret_update),
    ("ferret_config", ferret_config),
    ("frl_ranking", frl_ranking),
    ("frl_vote", frl_vote),
    ("frl_approvals", frl_approvals),
    ("durable_snapshot", durable_snapshot),
    ("durable_record", durable_record),
    ("model_load", model_load),
    ("coordinator_ops", coordinator_ops),
    ("participant_frames", participant_frames),
];

/// Reads fuzz input front to back; past the end every read yields zeros, so
/// a short input is just a sequence that stops early.
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub(crate) fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub(crate) fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub(crate) fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// Everything left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.as_chunks::<4>().0.iter().map(|c| f32::from_le_bytes(*c)).collect()
}

/// The message envelope: [`codec::decode`] at the largest limit and at the
/// handshake limit. Whatever decodes re-encodes to the same bytes (one
/// encoding per message, which signatures over report bodies rely on).
pub fn envelope(data: &[u8]) {
    for limit in [MAX_HANDSHAKE_BYTES, MAX_MESSAGE_BYTES] {
        if let Ok(msg) = codec::decode(data, limit) {
            assert!(data.len() <= limit, "decoded a frame over its limit");
            assert_eq!(codec::encode(&msg), data, "a decoded message has another encoding");
        }
    }
}

/// A signed report body ([`codec::decode_report`]): canonical like [`envelope`].
pub fn report(data: &[u8]) {
    if let Ok(r) = codec::decode_report(data) {
        assert_eq!(codec::encode_report(&r), data, "a decoded report has another encoding");
    }
}

/// Reads one client update of the given payload kind from the input: sample
/// count (small or raw u64), training loss (raw f32), then the payload.
fn fuzz_update(c: &mut Cursor<'_>, payload: impl FnOnce(&mut Cursor<'_>) -> UpdatePayload) -> ClientUpdate {
    let n = c.u8();
    // Mostly plausible counts, sometimes raw 64-bit ones (0, huge).
    let num_samples = if n < 0xf0 { u64::from(n) + 1 } else { c.u64() };
    let train_loss = if c.u8() < 0xf0 { 0.5 } else { f32::from_bits(c.u32()) };
    ClientUpdate { num_samples, train_loss, payload: payload(c) }
}

/// Closes a round of `agg` over `global` and checks the aggregation contract:
/// the new model is finite, and a refused round leaves the model untouched.
fn finish_round(agg: &mut dyn Aggregator, global: &mut [f32]) {
    let before: Vec<u32> = global.iter().map(|v| v.to_bits()).collect();
    match agg.finish(global) {
        Ok(stats) => {
            assert!(stats.updates > 0, "a round closed without updates");
            assert!(global.iter().all(|v| v.is_finite()), "aggregation made the model non-finite");
        }
        Err(_) => {
            let after: Vec<u32> = global.iter().map(|v| v.to_bits()).collect();
            assert_eq!(before, after, "a refused round changed the model");
        }
    }
}

/// Dense deltas through [`FedAvg`]: a model of 1–8 parameters, 1–4 clients per
/// round, up to 4 rounds, each update's floats and counts from the input.
pub fn dense_update(data: &[u8]) {
    let mut c = Cursor::new(data);
    let head = c.u8();
    let dim = usize::from(head % 8) + 1;
    let clients = u32::from(head >> 3) % 4 + 1;
    let mut global: Vec<f32> = (0..dim).map(|i| i as f32 * 0.5).collect();
    let mut agg = FedAvg::new();
    for round in 1..=4 {
        if c.is_empty() {
            break;
        }
        agg.begin_round(round, &global);
        for client in 0..clients {
            let update = fuzz_update(&mut c, |c| {
                let len = usize::from(c.u8() % 16);
                crate::fedavg::encode_delta(crate::fedavg::ID, &f32s(c.take(len * 4)))
            });
            let _ = agg.absorb(client, &update);
        }
        finish_round(&mut agg, &mut global);
    }
}

/// SPSA bytes through the [`Spsa`] aggregator on a 23-parameter MLP: 1–16
/// steps per client, each client's bytes (any length) from the input.
pub fn spsa_update(data: &[u8]) {
    let mut c = Cursor::new(data);
    let head = c.u8();
    let steps_per_client = u32::from(head % 16) + 1;
    let clients = u32::from(head >> 4) % 4 + 1;
    let cfg = SpsaConfig { stream_seed: 77, steps_per_client, eps: 1e-3, lr: 0.05, batch_size: 8 };
    let mut global = ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 }.init_params(1);
    let mut agg = Spsa::new(cfg);
    for round in 1..=3 {
        if c.is_empty() {
            break;
        }
        agg.begin_round(round, &global);
        for client in 0..clients {
            let update = fuzz_update(&mut c, |c| {
                let len = usize::from(c.u8() % 24);
                crate::spsa::payload(c.take(len).to_vec())
            });
            let _ = agg.absorb(client, &update);
        }
        finish_round(&mut agg, &mut global);
        // Every replica applies the same log; it must be the accepted bytes.
        if let Some(crate::wire::LogBody::PerClient(log)) = agg.take_log() {
            assert!(log.iter().all(|e| (1..=steps_per_client as usize).contains(&e.bytes.len())));
        }
    }
}

/// Ferret coefficient payloads through the [`crate::ferret::Ferret`]
/// aggregator on a 23-parameter MLP (4 blocks): K of 2–17, momentum on or
/// off, 1–4 clients, each payload's bytes (any length) from the input.
/// Whatever is accepted, a replica applying the round's log reaches the
/// server's model bit for bit.
pub fn ferret_update(data: &[u8]) {
    let mut c = Cursor::new(data);
    let head = c.u8();
    let k = u32::from(head % 16) + 2;
    let clients = u32::from(head >> 4) % 4 + 1;
    let momentum = if c.u8().is_multiple_of(2) { 0.0 } else { 0.5 };
    let cfg = crate::ferret::FerretConfig {
        momentum,
        ..crate::ferret::FerretSpec { k, server_lr: 0.5, ..Default::default() }.resolve(5)
    };
    let arch = ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 };
    let Ok(kind) = crate::kind::KindSettings::Ferret(cfg).build(&arch) else { return };
    let shape =
        crate::kind::RunShape { arch: &arch, clients_per_round: 4, rounds: 3, max_update_abs: 1e6, noise_seed: None };
    let mut global = arch.init_params(1);
    let Ok(mut agg) = kind.aggregator(&shape, &crate::kind::RuleSpec::Mean, &global) else { return };
    let mut replica = global.clone();
    for round in 1..=3 {
        if c.is_empty() {
            break;
        }
        agg.begin_round(round, &global);
        for client in 0..clients {
            let update = fuzz_update(&mut c, |c| {
                let len = usize::from(c.u8() % 48);
                UpdatePayload { kind: crate::ferret::ID, data: c.take(len).to_vec() }
            });
            let _ = agg.absorb(client, &update);
        }
        let before: Vec<u32> = global.iter().map(|v| v.to_bits()).collect();
        match agg.finish(&mut global) {
            Ok(_) => {
                assert!(global.iter().all(|v| v.is_finite()), "aggregation made the model non-finite");
                let body = agg.take_log();
                assert!(body.is_some(), "a replicated kind logs every round");
                let Some(body) = body else { return };
                let log = RoundLog { round, body, model_hash: crate::identity::params_hash(&global) };
                let applied = kind.apply_log(&mut replica, &log, &crate::prng::CpuApplier);
                assert!(applied.is_ok(), "the server's own log does not apply: {applied:?}");
                let (a, b): (Vec<u32>, Vec<u32>) =
                    (global.iter().map(|v| v.to_bits()).collect(), replica.iter().map(|v| v.to_bits()).collect());
                assert_eq!(a, b, "a replica applying the log left the server's model");
            }
            Err(_) => {
                let after: Vec<u32> = global.iter().map(|v| v.to_bits()).collect();
                assert_eq!(before, after, "a refused round changed the model");
            }
        }
    }
}

/// Ferret settings as a (possibly hostile) server sends them in a
/// `Welcome` (bincode), through the registry a participant uses: build
/// against two models, make an aggregator, project and apply a tiny update.
/// Bad settings are errors, never panics.
pub fn ferret_config(data: &[u8]) {
    let limit = bincode::config::standard().with_limit::<1024>();
    let Ok((cfg, _)) = bincode::decode_from_slice::<crate::ferret::FerretConfig, _>(data, limit) else { return };
    for arch in [ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 }, ModelArch::LeNet5 { classes: 10 }] {
        let Ok(kind) = KindSettings::Ferret(cfg.clone()).build(&arch) else { continue };
        let shape = crate::kind::RunShape {
            arch: &arch,
            clients_per_round: 4,
            rounds: 5,
            max_update_abs: 1e6,
            noise_seed: None,
        };
        let init = arch.init_params(1);
        let _ = kind.aggregator(&shape, &RuleSpec::Mean, &init);
        // Small models only: LeNet's projection is a million basis draws per seed.
        if init.len() < 100 {
            let blocks = crate::ferret::blocks(&arch);
            let delta: Vec<f32> = init.iter().map(|v| v * 0.01).collect();
            let entries = crate::ferret::project(&cfg, &blocks, 1, &delta, 3);
            let mut replica = init.clone();
            crate::ferret::apply_scaled(&cfg, &blocks, 1, &mut replica, &entries, &crate::prng::CpuApplier);
        }
    }
}

/// Up to 4 layers of 1–64 edges, from the input's first byte(s).
fn small_layers(c: &mut Cursor<'_>) -> Vec<usize> {
    let layers = usize::from(c.u8() % 4) + 1;
    (0..layers).map(|_| usize::from(c.u8() % 64) + 1).collect()
}

/// FRL rankings through [`frl::decode`] with small layer sizes. What decodes
/// is a permutation of every layer and re-encodes to the same bytes.
pub fn frl_ranking(data: &[u8]) {
    let mut c = Cursor::new(data);
    let sizes = small_layers(&mut c);
    let bytes = c.rest();
    if let Ok(r) = frl::decode(bytes, &sizes) {
        assert_eq!(r.layer_sizes().collect::<Vec<_>>(), sizes, "decoded ranking has other layer sizes");
        for layer in r.layers() {
            let distinct: BTreeSet<u32> = layer.iter().copied().collect();
            assert!(distinct.len() == layer.len() && layer.iter().all(|&i| (i as usize) < layer.len()));
        }
        assert_eq!(frl::encode(&r), bytes, "a decoded ranking has another encoding");
    }
}

/// Private FRL approval bitsets through [`frl::dp::decode_approvals`] with
/// small layer sizes and kept-set sizes from the input. What decodes has
/// exactly `keep[l]` approved edges below `n_l` per layer and re-encodes to
/// the same bytes.
pub fn frl_approvals(data: &[u8]) {
    let mut c = Cursor::new(data);
    let sizes = small_layers(&mut c);
    let keep: Vec<usize> = sizes.iter().map(|&n| usize::from(c.u8()) % (n + 1)).collect();
    let bytes = c.rest();
    if let Ok(a) = frl::dp::decode_approvals(bytes, &sizes, &keep) {
        let mut masks = Vec::with_capacity(sizes.len());
        for (l, (&n, &w)) in sizes.iter().zip(&keep).enumerate() {
            let on = a.approved(l);
            assert!(on.len() == w && on.iter().all(|&e| (e as usize) < n), "approvals break the layer's bound");
            let record = a.record(l);
            assert_eq!(record.iter().sum::<i64>() as usize, w);
            masks.push(record.iter().map(|&v| v == 1).collect::<Vec<bool>>());
        }
        assert_eq!(frl::dp::Approvals::from_masks(&masks).as_bytes(), bytes, "decoded approvals re-encode differently");
    }
}

/// FRL votes: a [`FrlVote`] over small layers (mask rule and k from the
/// input), rounds of packed rankings from the input, some valid (the global
/// ranking with a few bit flips), the rest raw bytes.
pub fn frl_vote(data: &[u8]) {
    let mut c = Cursor::new(data);
    let sizes = small_layers(&mut c);
    let mode = c.u8();
    let mut cfg = FrlConfig::new(sizes);
    cfg.mask = if mode & 1 == 0 { MaskRule::TwoSided } else { MaskRule::OneSidedTopK };
    cfg.k_fraction = f64::from((mode >> 1) & 0x7f).max(1.0) / 127.0;
    let edges = cfg.num_edges();
    let initial: Vec<f32> = (0..edges).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
    let mut vote = match FrlVote::new(cfg, &initial) {
        Ok(v) => v,
        Err(e) => panic!("small valid FRL config refused: {e}"),
    };
    let mut global = initial.clone();
    for round in 1..=3 {
        if c.is_empty() {
            break;
        }
        vote.begin_round(round, &global);
        let clients = c.u8() % 4 + 1;
        for client in 0..u32::from(clients) {
            let update = fuzz_update(&mut c, |c| {
                let pick = c.u8();
                let mut bytes = if pick < 0x80 {
                    frl::encode(vote.global_ranking())
                } else {
                    let len = usize::from(c.u8());
                    c.take(len).to_vec()
                };
                for _ in 0..pick % 4 {
                    let at = usize::from(c.u16());
                    let len = bytes.len().max(1);
                    if let Some(b) = bytes.get_mut(at % len) {
                        *b ^= 1 << (at >> 13);
                    }
                }
                UpdatePayload { kind: crate::frl::ID, data: bytes }
            });
            let _ = vote.absorb(client, &update);
        }
        finish_round(&mut vote, &mut global);
        let ranking = vote.global_ranking().clone();
        let flat = ranking.as_flat().to_vec();
        let sizes: Vec<usize> = ranking.layer_sizes().collect();
        assert!(Ranking::from_flat(flat, &sizes).is_ok(), "the global ranking is no longer a permutation");
    }
}

/// Durable snapshot bytes ([`durable::decode_snapshot`]). What decodes is
/// canonical: it encodes back to the very bytes it came from (as on the
/// wire, one state has one encoding).
pub fn durable_snapshot(data: &[u8]) {
    if let Ok(s) = durable::decode_snapshot(data) {
        // Compared as bytes: a snapshot may hold NaN, which is not equal to itself.
        assert_eq!(durable::encode_snapshot(&s), data, "a decoded snapshot is not canonical");
    }
}

/// Durable WAL record bytes ([`durable::decode_record`]); canonical as above.
pub fn durable_record(data: &[u8]) {
    if let Ok(r) = durable::decode_record(data) {
        assert_eq!(durable::encode_record(&r), data, "a decoded record is not canonical");
    }
}

/// Model files: [`ModelArch::from_safetensors`] and [`ModelArch::from_raw_f32`]
/// for one of a few small architectures (first byte), and
/// [`crate::model_file::read_model_file`] with and without it. A model that loads has
/// the architecture's size, is finite, and survives a safetensors round trip.
pub fn model_load(data: &[u8]) {
    let Some((&pick, bytes)) = data.split_first() else { return };
    let arch = match pick % 3 {
        0 => ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 },
        1 => ModelArch::Mlp { input: 2, hidden: vec![], classes: 2 },
        _ => ModelArch::Mlp { input: 3, hidden: vec![2, 2], classes: 3 },
    };
    for loaded in [arch.from_safetensors(bytes), arch.from_raw_f32(bytes)] {
        let Ok(params) = loaded else { continue };
        assert_eq!(params.len(), arch.num_params());
        assert!(params.iter().all(|v| v.is_finite()));
        match arch.to_safetensors(&params).map(|st| arch.from_safetensors(&st)) {
            Ok(Ok(again)) => assert_eq!(again, params, "safetensors round trip changed the model"),
            Ok(Err(e)) | Err(e) => panic!("a loaded model does not round-trip: {e}"),
        }
    }
    // The same bytes as a model file with metadata (`crate::model_file`):
    // refused or read, never a panic; what is read is written back the same.
    for given in [None, Some(&arch)] {
        let Ok(file) = crate::model_file::read_model_file(bytes, given) else { continue };
        assert!(file.values.iter().all(|v| v.is_finite()));
        if let (Some(meta), crate::model_file::Content::Parameters) = (&file.meta, file.content) {
            let again = crate::model_file::write_model_file(meta, &file.values)
                .and_then(|b| crate::model_file::read_model_file(&b, None));
            match again {
                Ok(f) => assert_eq!(f, file, "a model file does not round-trip"),
                Err(e) => panic!("a read model file does not round-trip: {e}"),
            }
        }
    }
}

const RUN: RunId = RunId([9; 16]);

/// Enrolled clients 0–3, then an unenrolled key (index 4).
fn identities() -> &'static [Identity] {
    static IDS: OnceLock<Vec<Identity>> = OnceLock::new();
    IDS.get_or_init(|| (0..5u8).map(|i| Identity::from_secret([if i == 4 { 200 } else { i + 1 }; 32])).collect())
}

/// FRL's smallest supermask net (119,872 edges): the vote, its initial scores
/// and one valid packed ranking, built once per process (the vote is cloned
/// per input).
struct FrlFixture {
    arch: ModelArch,
    vote: FrlVote,
    initial: Vec<f32>,
    ranking: Vec<u8>,
}

fn frl_fixture() -> &'static FrlFixture {
    static FIXTURE: OnceLock<FrlFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let net = FrlArch::Conv2 { channels: 1, side: 2, classes: 2 };
        let arch = ModelArch::Supermask(net);
        let vote = match FrlVote::for_run(FrlRun::new(5, net.layer_sizes()), &arch) {
            Ok(v) => v,
            Err(e) => panic!("invariant: the fixed FRL fixture is valid: {e}"),
        };
        let initial = arch.init_params(5);
        let ranking = frl::encode(vote.global_ranking());
        FrlFixture { arch, vote, initial, ranking }
    })
}

impl FrlFixture {
    fn arch_sizes(&self) -> Vec<usize> {
        self.vote.config().layer_sizes.clone()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dense,
    /// Dense deltas with server momentum: cross-round aggregator state,
    /// which crash-and-restore must bring back.
    Momentum,
    Spsa,
    Frl,
    /// Ferret: replicated, combined logs, server momentum (state a restore
    /// must bring back).
    Ferret,
    /// DP-FTRL: dense deltas clipped and released through the private tree
    /// (noise seed, tree and ledger are state a restore must bring back);
    /// its horizon (2) is below the run's rounds (3), so the run ends early.
    DpFtrl,
}

fn ferret_config_fixture() -> crate::ferret::FerretConfig {
    crate::ferret::FerretSpec { k: 4, server_lr: 0.5, momentum: 0.5, ..Default::default() }.resolve(9)
}

fn spsa_config() -> SpsaConfig {
    SpsaConfig { stream_seed: 77, steps_per_client: 8, eps: 1e-3, lr: 0.05, batch_size: 8 }
}

fn kind_settings(kind: Kind) -> KindSettings {
    match kind {
        Kind::Dense => KindSettings::FedAvg,
        Kind::Momentum => KindSettings::FedAvgM(crate::fedavgm::FedAvgMConfig { momentum: 0.9, server_lr: 1.0 }),
        Kind::Spsa => KindSettings::Spsa(spsa_config()),
        Kind::Frl => KindSettings::Frl(FrlRun::new(5, frl_fixture().arch_sizes())),
        Kind::Ferret => KindSettings::Ferret(ferret_config_fixture()),
        Kind::DpFtrl => KindSettings::DpFtrl(crate::dpftrl::DpFtrlConfig {
            target: crate::dpftrl::PrivacyTarget::Zcdp { rho_units: 1 << 20 },
            delta: 1e-5,
            horizon: 2,
            clip_norm: 1.0,
            server_lr: 1.0,
            momentum: 0.9,
        }),
    }
}

/// What the checker has seen of a run, from the coordinator's events.
#[derive(Default)]
struct Seen {
    sampled: BTreeMap<u32, BTreeSet<ClientIndex>>,
    accepted: BTreeMap<u32, BTreeSet<ClientIndex>>,
    /// Clients that answered a training round with "training failed".
    failed: BTreeMap<u32, BTreeSet<ClientIndex>>,
    completed: BTreeSet<u32>,
    finished: bool,
}

impl Seen {
    /// Drains the coordinator's outputs, checking every event.
    fn drain(&mut self, coord: &mut Coordinator, persisted: &mut (Snapshot, Vec<Record>), rounds: u32) {
        while let Some(p) = coord.poll_persist() {
            match p {
                Persist::Snapshot(s) => {
                    assert_eq!(durable::decode_snapshot(&durable::encode_snapshot(&s)).ok(), Some(s.clone()));
                    *persisted = (s, Vec::new());
                }
                Persist::Append(r) => {
                    assert_eq!(durable::decode_record(&durable::encode_record(&r)).ok(), Some(r.clone()));
                    persisted.1.push(r);
                }
            }
        }
        while coord.poll_transmit().is_some() {}
        while let Some(event) = coord.poll_event() {
            match event {
                Event::RoundOpened { round, sampled, .. } => {
                    assert!((1..=rounds + 1).contains(&round), "round {round} opened");
                    assert!(self.sampled.insert(round, sampled.into_iter().collect()).is_none(), "reopened {round}");
                }
                Event::RoundExtended { round, added, .. } => {
                    let s = self.sampled.entry(round).or_default();
                    for c in added {
                        assert!(s.insert(c), "client {c} added twice to round {round}");
                    }
                }
                Event::ReportAccepted { round, client } => {
                    let sampled = self.sampled.get(&round).cloned().unwrap_or_default();
                    assert!(sampled.contains(&client), "unsampled client {client} accepted in round {round}");
                    let acc = self.accepted.entry(round).or_default();
                    assert!(acc.insert(client), "client {client} accepted twice in round {round}");
                    assert!(!self.completed.contains(&round), "report accepted after round {round} closed");
                }
                Event::TrainingFailed { round, client } => {
                    let sampled = self.sampled.get(&round).cloned().unwrap_or_default();
                    assert!(sampled.contains(&client), "unsampled client {client} failed in round {round}");
                    assert!(!self.accepted.get(&round).is_some_and(|a| a.contains(&client)), "answered twice");
                    assert!(self.failed.entry(round).or_default().insert(client), "client {client} failed twice");
                    assert!(!self.completed.contains(&round), "report accepted after round {round} closed");
                }
                Event::RoundCompleted(s) => {
                    assert_eq!(s.failed, self.failed.get(&s.round).map_or(0, BTreeSet::len));
                    assert_eq!(s.accepted, self.accepted.get(&s.round).map_or(0, BTreeSet::len));
                    assert_eq!(s.sampled, self.sampled.get(&s.round).map_or(0, BTreeSet::len));
                    assert!(self.completed.insert(s.round), "round {} completed twice", s.round);
                }
                Event::Finished { .. } => {
                    assert!(!self.finished, "finished twice");
                    self.finished = true;
                }
                Event::ClientJoined { .. }
                | Event::Rejected { .. }
                | Event::CloseConnection { .. }
                | Event::FinishSent { .. } => {}
            }
        }
    }
}

/// A valid payload of `kind` for the 23-parameter MLP or the FRL fixture.
fn good_payload(kind: Kind, dim: usize) -> UpdatePayload {
    match kind {
        Kind::Dense => crate::fedavg::encode_delta(crate::fedavg::ID, &vec![0.25; dim]),
        Kind::Momentum => crate::fedavg::encode_delta(crate::fedavgm::ID, &vec![0.25; dim]),
        Kind::DpFtrl => crate::fedavg::encode_delta(crate::dpftrl::ID, &vec![0.25; dim]),
        Kind::Spsa => crate::spsa::payload(vec![0x41; spsa_config().steps_per_client as usize]),
        Kind::Frl => UpdatePayload { kind: crate::frl::ID, data: frl_fixture().ranking.clone() },
        Kind::Ferret => crate::ferret::payload(&[
            crate::ferret::Coefficient { k: 0, g: 0, value: 0.25 },
            crate::ferret::Coefficient { k: 3, g: 1, value: -0.5 },
        ]),
    }
}

/// Operation sequences on a [`Coordinator`] with persistence on: the first
/// byte picks the update kind (dense, momentum, DP-FTRL, SPSA, Ferret or FRL), quorum, final evaluation
/// and whether four clients join up front; then each op is connect,
/// disconnect, join (own key, another's, unenrolled, bad challenge), a
/// validly signed report (round near the open one or arbitrary, payload good,
/// mismatched or from the input, sample count from the input), raw or framed
/// bytes, an oversize read, a clock advance, or a crash-and-restore from what
/// was persisted. After every op the invariants of
/// `tests::fuzz::coordinator_invariants_hold_under_random_operations` hold,
/// and a restore gives back the same model and completed rounds.
pub fn coordinator_ops(data: &[u8]) {
    let mut c = Cursor::new(data);
    let setup = c.u8();
    // FRL inputs are rare on purpose: every FRL report signs, verifies and
    // votes a 120k-edge ranking, some hundred times the cost of a dense one.
    let kind = match setup >> 5 {
        // Low bits 11 of a dense setup: DP-FTRL (bits 0–1 pick nothing else).
        0..=2 if setup & 3 == 3 => Kind::DpFtrl,
        0..=2 => Kind::Dense,
        3 => Kind::Momentum,
        4..=5 => Kind::Spsa,
        6 => Kind::Ferret,
        _ => Kind::Frl,
    };
    let ids = identities();
    let arch = match kind {
        Kind::Frl => frl_fixture().arch.clone(),
        _ => ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 },
    };
    let cfg = CoordinatorConfig {
        run_id: RUN,
        arch,
        rounds: 3,
        enrolled: ids[..4].iter().map(Identity::public_key).collect(),
        min_clients: 2,
        clients_per_round: 2,
        quorum: usize::from((setup >> 2) & 1) + 1,
        round_timeout: Duration::from_secs(10),
        train: TrainSpec::sgd(0.1, 2, 1),
        kind: kind_settings(kind),
        rule: RuleSpec::Mean,
        max_violations: 3,
        // Low enough that fuzzed dense values reach it.
        max_update_abs: 1e6,
        schedule: None,
        // Replicated and FRL runs are set up without the evaluation round in
        // the tests; dense runs try both.
        final_evaluation: kind == Kind::Dense && setup & 8 != 0,
        noise_seed: Some(crate::dp::NoiseSeed::insecure_from_u64(3)),
    };
    let rounds = cfg.rounds;
    let dim = cfg.arch.num_params();
    let initial = match kind {
        Kind::Frl => frl_fixture().initial.clone(),
        _ => cfg.arch.init_params(1),
    };
    let mut coord = match Coordinator::new(cfg.clone(), initial, 7) {
        Ok(coord) => coord,
        Err(e) => panic!("invariant: the fixed coordinator config is valid: {e}"),
    };
    coord.enable_persistence();
    let mut now = Instant::now();
    let mut seen = Seen::default();
    let mut persisted = (coord.snapshot(), Vec::new());
    let mut challenges: BTreeMap<u8, [u8; 32]> = BTreeMap::new();
    let mut completed = 0;
    seen.drain(&mut coord, &mut persisted, rounds);
    if setup & 16 != 0 {
        for conn in 0..4u8 {
            challenges.insert(conn, [conn; 32]);
            coord.handle_connect(now, ConnectionHandle(u64::from(conn)), [conn; 32]);
            let id = &ids[usize::from(conn)];
            let signature = id.sign(&join_transcript(&RUN, &[conn; 32], &id.public_key()));
            let join = codec::encode(&Message::Join(Join { public_key: id.public_key(), signature }));
            let _ = coord.handle_message(now, ConnectionHandle(u64::from(conn)), &join);
        }
        seen.drain(&mut coord, &mut persisted, rounds);
    }
    let mut ops = 0;
    while !c.is_empty() && ops < 256 {
        ops += 1;
        let op = c.u8();
        // Connections 0–3 carry clients 0–3, 4 the unenrolled key, 5 client 0 again.
        let conn_byte = c.u8() % 6;
        let conn = ConnectionHandle(u64::from(conn_byte));
        let own = usize::from(conn_byte % 5);
        let phase_before = coord.phase();
        match op % 10 {
            0 => {
                let challenge = [c.u8(); 32];
                challenges.insert(conn_byte, challenge);
                coord.handle_connect(now, conn, challenge);
            }
            1 => coord.handle_disconnect(now, conn),
            2 | 3 => {
                let how = c.u8();
                let id = &ids[if how & 1 == 0 { own } else { usize::from(how >> 1) % 5 }];
                let mut challenge = challenges.get(&conn_byte).copied().unwrap_or_default();
                if how & 0x80 != 0 {
                    challenge[0] ^= 1;
                }
                let signature = id.sign(&join_transcript(&RUN, &challenge, &id.public_key()));
                let join = codec::encode(&Message::Join(Join { public_key: id.public_key(), signature }));
                let _ = coord.handle_message(now, conn, &join);
            }
            4..=6 => {
                let frame = fuzz_report(&mut c, &coord, kind, dim, own);
                let _ = coord.handle_message(now, conn, &frame);
            }
            7 => {
                now += Duration::from_millis(u64::from(c.u16()));
                coord.handle_timeout(now);
            }
            8 => {
                let len = usize::from(c.u8());
                let bytes = c.take(len);
                let mut frame = Vec::with_capacity(len + codec::HEADER_BYTES);
                if op & 0x80 != 0 {
                    frame.extend_from_slice(&codec::MAGIC);
                    frame.push(PROTOCOL_VERSION);
                }
                frame.extend_from_slice(bytes);
                let _ = coord.handle_message(now, conn, &frame);
            }
            _ => {
                if op & 0x80 == 0 {
                    let _ = coord.handle_oversize(now, conn, c.u32() as usize);
                } else {
                    coord = crash_and_restore(&coord, &cfg, &persisted, now);
                    challenges.clear();
                }
            }
        }
        seen.drain(&mut coord, &mut persisted, rounds);
        assert!(coord.completed_rounds() >= completed, "completed_rounds went down");
        completed = coord.completed_rounds();
        assert!(completed <= rounds);
        assert!(coord.joined_clients() <= 4);
        assert!(coord.model().iter().all(|v| v.is_finite()), "non-finite model");
        match coord.phase() {
            Phase::AwaitingReports { round, .. } => {
                assert!((1..=rounds + 1).contains(&round));
                assert!(coord.poll_timeout().is_some(), "open round without a deadline");
            }
            Phase::AwaitingJoins | Phase::Finished => assert!(coord.poll_timeout().is_none()),
        }
        if phase_before == Phase::Finished {
            assert_eq!(coord.phase(), Phase::Finished, "left the finished phase");
        }
        assert_eq!(seen.finished, coord.phase() == Phase::Finished);
    }
}

/// A validly signed report frame built from the input (see [`coordinator_ops`]).
fn fuzz_report(c: &mut Cursor<'_>, coord: &Coordinator, kind: Kind, dim: usize, own: usize) -> Vec<u8> {
    let how = c.u8();
    let (open, task) = match coord.phase() {
        Phase::AwaitingReports { round, task } => (round, task),
        _ => (coord.completed_rounds().saturating_add(1), Task::Train),
    };
    let round = match how & 3 {
        0 | 1 => open,
        2 => open.saturating_add_signed(i32::from(c.u8() & 1) * 2 - 1),
        _ => c.u32(),
    };
    let signer = if how & 4 == 0 { own } else { usize::from(c.u8()) % 5 };
    let eval = (how & 8 != 0).then_some(EvalReport { loss_sum: 3.0, correct: 2, total: 4 });
    let payload = match (how >> 4) % 8 {
        0..=3 => (task == Task::Train).then(|| good_payload(kind, dim)),
        // The opposite of what the task asks for.
        4 => (task == Task::Evaluate).then(|| good_payload(kind, dim)),
        5 => {
            let len = usize::from(c.u8() % 32);
            Some(crate::fedavg::encode_delta(crate::fedavg::ID, &f32s(c.take(len * 4))))
        }
        6 => {
            let len = usize::from(c.u8() % 32);
            Some(crate::spsa::payload(c.take(len).to_vec()))
        }
        _ => {
            // A valid payload with a few bits flipped.
            let UpdatePayload { kind: tag, data: mut bytes } = good_payload(kind, dim);
            for _ in 0..c.u8() % 4 {
                let at = c.u32() as usize;
                let len = bytes.len().max(1);
                if let Some(b) = bytes.get_mut(at % len) {
                    *b ^= 1 << (at >> 29);
                }
            }
            // Sometimes under another kind's tag.
            let tag = if c.u8() < 0x20 { crate::kind::KindId(c.u8() % 5) } else { tag };
            Some(UpdatePayload { kind: tag, data: bytes })
        }
    };
    let update = payload.map(|payload| {
        let n = c.u8();
        let num_samples = if n < 0xf0 { u64::from(n) + 1 } else { c.u64() };
        ClientUpdate { num_samples, train_loss: 0.5, payload }
    });
    let body = codec::encode_report(&Report { run_id: RUN, round, eval, update });
    let signature = identities()[signer].sign(&report_transcript(&body));
    codec::encode(&Message::Report(SignedReport { body, signature }))
}

/// The host crashed: a new coordinator from what was persisted, which must
/// restore and hold the same model and completed rounds.
fn crash_and_restore(
    coord: &Coordinator,
    cfg: &CoordinatorConfig,
    (snapshot, records): &(Snapshot, Vec<Record>),
    now: Instant,
) -> Coordinator {
    let restored = match Coordinator::restore(cfg.clone(), snapshot.clone(), records, now) {
        Ok(c) => c,
        Err(e) => panic!("the coordinator's own state does not restore: {e}"),
    };
    let bits = |m: &[f32]| m.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(restored.model()), bits(coord.model()), "restore changed the model");
    assert_eq!(restored.completed_rounds(), coord.completed_rounds(), "restore changed the completed rounds");
    assert_eq!(
        restored.snapshot().aggregator_state,
        coord.snapshot().aggregator_state,
        "restore changed the aggregator's cross-round state"
    );
    assert_eq!(restored.phase() == Phase::Finished, coord.phase() == Phase::Finished);
    restored
}

/// Frames a hostile (or honest) server sends to a [`Participant`]: the first
/// byte advances it through valid Hello / Welcome / RoundStart / Finished
/// frames (0–4 of them), then each op sends raw bytes, framed bytes, a valid
/// frame with bit flips, or submits the pending task. Whatever the
/// participant accepted stays consistent: our run, a valid model and
/// training spec, tasks with finite models of the right size.
pub fn participant_frames(data: &[u8]) {
    let mut c = Cursor::new(data);
    let now = Instant::now();
    // The first byte picks how many corpus frames to deliver first (its
    // value mod 5) and the run's kind (its top bits): FedAvg (the model in
    // full), SPSA and Ferret (replicated: Sync, RoundLog, replica hashes) or FRL (the
    // published global ranking), so that every message a client decodes is
    // fuzzed in the run where it is valid.
    let setup = c.u8();
    let kind = match (setup >> 5) % 4 {
        0 => Kind::Dense,
        1 => Kind::Spsa,
        2 => Kind::Frl,
        _ => Kind::Ferret,
    };
    let arch = match kind {
        Kind::Frl => frl_fixture().arch.clone(),
        _ => ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 },
    };
    let dim = arch.num_params();
    let config = RunConfig {
        run_id: RUN,
        arch: arch.clone(),
        rounds: 2,
        train: TrainSpec::sgd(0.1, 2, 1),
        kind: kind_settings(kind),
    };
    let (round1, round2) = match kind {
        Kind::Frl => {
            let ranking = frl_fixture().ranking.clone();
            (ModelSync::Published(ranking.clone()), ModelSync::Published(ranking))
        }
        Kind::Spsa | Kind::Ferret => {
            let hash = crate::identity::params_hash(&arch.init_params(1));
            (ModelSync::Replica { model_hash: hash }, ModelSync::Replica { model_hash: hash })
        }
        _ => (ModelSync::Full(vec![0.5; dim]), ModelSync::Full(vec![1.0; dim])),
    };
    let mut corpus = vec![
        Message::Hello(Hello { run_id: RUN, challenge: [7; 32] }),
        Message::Welcome(Welcome { client_id: 0, config }),
    ];
    if kind == Kind::Spsa {
        // A checkpoint, then a round's log that follows it.
        let initial = arch.init_params(1);
        let cfg = spsa_config();
        let entries = vec![LogEntry { client: 1, bytes: vec![3; cfg.steps_per_client as usize] }];
        let mut after = initial.clone();
        crate::spsa::apply_round(&mut after, &cfg, 1, &entries);
        let log = RoundLog {
            round: 1,
            body: crate::wire::LogBody::PerClient(entries),
            model_hash: crate::identity::params_hash(&after),
        };
        corpus.push(Message::Sync(Sync { round: 0, params: initial, logs: Vec::new() }));
        corpus.push(Message::RoundLog(log));
    }
    if kind == Kind::Ferret {
        // A checkpoint, then a round's combined log that follows it.
        let initial = arch.init_params(1);
        let cfg = ferret_config_fixture();
        let blocks = crate::ferret::blocks(&arch);
        let entries = [crate::ferret::Coefficient { k: 1, g: 0, value: -0.01 }];
        let mut after = initial.clone();
        crate::ferret::apply_scaled(&cfg, &blocks, 1, &mut after, &entries, &crate::prng::CpuApplier);
        let log = RoundLog {
            round: 1,
            body: crate::wire::LogBody::Combined(crate::ferret::encode_entries(&entries)),
            model_hash: crate::identity::params_hash(&after),
        };
        corpus.push(Message::Sync(Sync { round: 0, params: initial, logs: Vec::new() }));
        corpus.push(Message::RoundLog(log));
    }
    corpus.extend([
        Message::RoundStart(RoundStart { round: 1, task: Task::Train, seed: 5, model: round1 }),
        Message::Finished(Finished { rounds: 2, model_hash: [3; 32] }),
        Message::Ack(Ack { round: 1 }),
        Message::Rejected(Rejected { code: RejectCode::Late, round: Some(1), detail: "late".into() }),
        Message::RoundStart(RoundStart { round: 2, task: Task::Evaluate, seed: 6, model: round2 }),
    ]);
    let corpus: Vec<Vec<u8>> = corpus.iter().map(codec::encode).collect();
    let mut p = Participant::new(identities()[0].clone(), Some(RUN));
    for frame in corpus.iter().take(usize::from(setup % 5)) {
        let _ = p.handle_message(now, frame);
    }
    let mut ops = 0;
    while !c.is_empty() && ops < 64 {
        ops += 1;
        let op = c.u8();
        match op % 4 {
            0 | 1 => {
                let len = usize::from(c.u8());
                let mut frame = Vec::with_capacity(len + codec::HEADER_BYTES);
                if op % 4 == 1 {
                    frame.extend_from_slice(&codec::MAGIC);
                    frame.push(PROTOCOL_VERSION);
                }
                frame.extend_from_slice(c.take(len));
                let _ = p.handle_message(now, &frame);
            }
            2 => {
                let mut frame = corpus[usize::from(op >> 2) % corpus.len()].clone();
                for _ in 0..c.u8() % 4 {
                    let at = usize::from(c.u16());
                    let len = frame.len();
                    frame[at % len] ^= 1 << (at >> 13);
                }
                let _ = p.handle_message(now, &frame);
            }
            _ => {
                let update = ClientUpdate {
                    num_samples: 4,
                    train_loss: 0.5,
                    payload: crate::fedavg::encode_delta(crate::fedavg::ID, &vec![0.25; dim]),
                };
                let eval = Some(EvalReport { loss_sum: 1.0, correct: 1, total: 2 });
                match op & 12 {
                    // Local training failed (diverged), with a NaN evaluation.
                    8 => {
                        let nan = Some(EvalReport { loss_sum: f64::NAN, correct: 0, total: 2 });
                        let _ = p.submit_failure(now, nan);
                    }
                    4 => {
                        let _ = p.submit(now, eval, Some(update));
                    }
                    _ => {
                        let _ = p.submit(now, eval, None);
                    }
                }
            }
        }
        assert!(p.max_message_bytes() <= MAX_MESSAGE_BYTES);
        match p.run_config() {
            None => assert_eq!(p.max_message_bytes(), MAX_HANDSHAKE_BYTES),
            Some(cfg) => {
                assert_eq!(cfg.run_id, RUN, "accepted another run");
                assert!(cfg.arch.validate().is_ok(), "accepted an invalid model");
                assert!(cfg.train.validate().is_ok(), "accepted an invalid training spec");
            }
        }
        while let Some(frame) = p.poll_transmit() {
            // A participant never sends what a server counts against it: an
            // evaluation with a non-finite loss is left out.
            if let Ok(Message::Report(signed)) = codec::decode(&frame, MAX_MESSAGE_BYTES) {
                let report = codec::decode_report(&signed.body).unwrap_or_else(|e| panic!("own report: {e}"));
                assert!(report.eval.is_none_or(|e| e.loss_sum.is_finite()), "sent a non-finite evaluation");
            }
        }
        while let Some(event) = p.poll_event() {
            if let ParticipantEvent::TaskRequested { model, .. } = event {
                assert_eq!(Some(model.len()), p.run_config().map(|c| c.arch.num_params()));
                assert!(model.iter().all(|v| v.is_finite()), "accepted a non-finite model");
            }
        }
    }
}

/// Runs every target over every file of `dir/<target>/` (the checked-in
/// corpus); an error names a missing or empty directory. Shared with the
/// server's corpus test.
pub fn run_corpus(dir: &std::path::Path, targets: &[Target]) -> Result<usize, String> {
    let mut inputs = 0;
    for (name, target) in targets {
        let sub = dir.join(name);
        let entries = std::fs::read_dir(&sub).map_err(|e| format!("{}: {e}", sub.display()))?;
        let mut files: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect();
        if files.is_empty() {
            return Err(format!("{}: empty corpus", sub.display()));
        }
        files.sort();
        for file in files {
            let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            target(&bytes);
            inputs += 1;
        }
    }
    Ok(inputs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The stable half of the fuzzing setup: every protocol target over its
    /// checked-in corpus (`fuzz/corpus/<target>/`), so CI runs the entry
    /// points without nightly. A panic is a crash the fuzzer would report.
    #[test]
    fn every_corpus_file_runs_clean() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let inputs = run_corpus(&dir, TARGETS).unwrap();
        assert!(inputs >= TARGETS.len());
    }

    /// Short and empty inputs reach every target's early exits.
    #[test]
    fn empty_and_tiny_inputs_are_fine() {
        for (_, target) in TARGETS {
            for input in [&[][..], &[0], &[0xff], &[1, 2, 3], &[0xff; 40]] {
                target(input);
            }
        }
    }
}

/// Seed inputs of the checked-in corpus, from real encodings. Regenerate
/// with `cargo test --release -p tally-protocol write_seed_corpus -- --ignored`
/// (overwrites the `seed-*` files only; fuzzer-found inputs stay).
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod seeds {
    use super::*;
    use crate::spsa::LogEntry;
    use crate::wire::{RoundLog, SignatureBytes};

    fn write(target: &str, name: &str, bytes: &[u8]) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }

    fn golden() -> Vec<(String, Vec<u8>)> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/messages.hex");
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (name, hex) = l.split_once(' ').unwrap();
                (name.replace('/', "-"), hex::decode(hex.trim()).unwrap())
            })
            .collect()
    }

    fn update_bytes(n: u8, payload: &[u8]) -> Vec<u8> {
        [&[n, 0][..], payload].concat()
    }

    #[test]
    #[ignore = "writes the seed corpus into fuzz/corpus"]
    fn write_seed_corpus() {
        for (name, frame) in golden() {
            write("envelope", &name, &frame);
            if let Ok(Message::Report(r)) = codec::decode(&frame, MAX_MESSAGE_BYTES) {
                write("report", &name, &r.body);
            }
        }
        let eval = Some(EvalReport { loss_sum: 1.0, correct: 1, total: 2 });
        let reports = [
            ("dense", Some(crate::fedavg::encode_delta(crate::fedavg::ID, &[0.25, -1.0, 3.5]))),
            ("spsa", Some(crate::spsa::payload(vec![1, 0x7f, 0x81, 0xff]))),
            ("ranking", Some(UpdatePayload { kind: crate::frl::ID, data: vec![0x12, 0xcc, 0x20] })),
            ("eval-only", None),
        ];
        for (name, payload) in reports {
            let update = payload.map(|payload| ClientUpdate { num_samples: 3, train_loss: 0.5, payload });
            let report = Report { run_id: RUN, round: 2, eval, update };
            write("report", name, &codec::encode_report(&report));
        }

        // dense_update: head (dim 4, 2 clients), then per client count, loss flag, length, floats.
        let floats = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        let client = |n: u8, v: &[f32]| update_bytes(n, &[&[v.len() as u8][..], &floats(v)].concat());
        let mut dense = vec![3 | (1 << 3)];
        dense.extend(client(9, &[0.5, -0.25, 1.0, 2.0]));
        dense.extend(client(3, &[1.0, 1.0, -1.0, 0.0]));
        write("dense_update", "two-clients", &dense);
        let mut big = vec![0];
        big.extend(client(0xf0, &[f32::MAX]));
        big.extend_from_slice(&u64::MAX.to_le_bytes());
        write("dense_update", "huge", &big);

        // spsa_update: 8 steps, 2 clients.
        let mut spsa = vec![7 | (1 << 4)];
        for bytes in [[1u8, 2, 3, 0x7f, 0x81, 0xfe, 0, 64], [64; 8]] {
            spsa.extend(update_bytes(4, &[&[8u8][..], &bytes].concat()));
        }
        write("spsa_update", "two-clients", &spsa);

        // ferret_update: K = 4, momentum, 2 clients; entries (k u16, g u16, f32).
        let entry = |k: u16, g: u16, v: f32| [&k.to_le_bytes()[..], &g.to_le_bytes(), &v.to_le_bytes()].concat();
        let mut ferret = vec![2 | (1 << 4), 1];
        for entries in [vec![entry(0, 0, 0.5), entry(3, 0, -1.0), entry(1, 2, 2.0)], vec![entry(2, 1, 0.25)]] {
            let bytes = entries.concat();
            ferret.extend(update_bytes(4, &[&[bytes.len() as u8][..], &bytes].concat()));
        }
        write("ferret_update", "two-clients", &ferret);
        let mut hostile = vec![2, 0];
        let bad = [entry(1, 0, 1.0), entry(1, 0, f32::NAN)].concat();
        hostile.extend(update_bytes(4, &[&[bad.len() as u8][..], &bad].concat()));
        write("ferret_update", "hostile", &hostile);
        // ferret_config: the settings as a Welcome carries them.
        let cfg_bytes =
            |c: &crate::ferret::FerretConfig| bincode::encode_to_vec(c, bincode::config::standard()).unwrap();
        write("ferret_config", "defaults", &cfg_bytes(&crate::ferret::FerretSpec::default().resolve(3)));
        let all = crate::ferret::FerretSpec {
            k: 8,
            anneal: crate::ferret::Anneal::Cosine,
            momentum: 0.9,
            unbiased: true,
            ..Default::default()
        };
        write("ferret_config", "all", &cfg_bytes(&all.resolve(4)));
        let too_many = crate::ferret::FerretSpec { k: 16384, ..Default::default() };
        write("ferret_config", "too-many", &cfg_bytes(&too_many.resolve(4)));

        // frl_approvals: layer sizes, kept-set sizes, then the bitsets.
        for (sizes, keep) in [(vec![3usize, 5], vec![2usize, 3]), (vec![64], vec![32]), (vec![1, 9, 17], vec![1, 4, 9])]
        {
            let masks: Vec<Vec<bool>> =
                sizes.iter().zip(&keep).map(|(&n, &w)| (0..n).map(|e| (e * 5 + 3) % n < w).collect()).collect();
            let mut bytes = vec![(sizes.len() - 1) as u8];
            bytes.extend(sizes.iter().map(|&s| (s - 1) as u8));
            bytes.extend(keep.iter().map(|&w| w as u8));
            bytes.extend(frl::dp::Approvals::from_masks(&masks).as_bytes());
            let name = sizes.iter().map(ToString::to_string).collect::<Vec<_>>().join("-");
            write("frl_approvals", &name, &bytes);
            // The same with one approval too many in the last layer.
            let last = bytes.len() - 1;
            bytes[last] |= 1;
            write("frl_approvals", &format!("{name}-extra"), &bytes);
        }

        // frl_ranking: layer sizes, then a packed ranking.
        for sizes in [vec![3usize, 5], vec![64], vec![1, 2, 17, 40]] {
            let scores: Vec<f32> = (0..sizes.iter().sum::<usize>()).map(|i| ((i * 37) % 11) as f32).collect();
            let r = Ranking::from_scores(&scores, &sizes, MaskRule::TwoSided).unwrap();
            let mut bytes = vec![(sizes.len() - 1) as u8];
            bytes.extend(sizes.iter().map(|&s| (s - 1) as u8));
            bytes.extend(frl::encode(&r));
            let name = sizes.iter().map(ToString::to_string).collect::<Vec<_>>().join("-");
            write("frl_ranking", &name, &bytes);
        }

        // frl_vote: sizes [3, 5], two-sided k = 0.5, rounds of valid votes.
        // Per round: 3 clients (byte 2), each count 6, loss 0.5, the global ranking (pick 0).
        let round = [2, 5, 0, 0, 5, 0, 0, 5, 0, 0];
        let vote = [&[1, 2, 4, 63 << 1][..], &round, &round, &round].concat();
        write("frl_vote", "three-rounds", &vote);
        let mut flips = vec![0, 40, 1, 1, 7];
        flips.extend([5, 0, 3, 0x01, 0x20, 0x02, 0x40, 0x03, 0x00]);
        write("frl_vote", "flips", &flips);

        // durable: a dense and a replicated snapshot, every record kind.
        let snap = Snapshot {
            version: durable::DURABLE_VERSION,
            run_id: RUN,
            rng_seed: 7,
            enrolled_hash: [1; 32],
            completed_rounds: 2,
            evaluated: false,
            model: vec![0.5; 23],
            violations: [(1, 2)].into_iter().collect(),
            replica_checkpoint: None,
            aggregator_state: Some(crate::aggregate::AggregatorState {
                name: crate::fedavgm::NAME.into(),
                version: crate::fedavgm::STATE_VERSION,
                bytes: vec![0; 8],
            }),
        };
        write("durable_snapshot", "dense", &durable::encode_snapshot(&snap));
        let log = RoundLog {
            round: 1,
            body: crate::wire::LogBody::PerClient(vec![LogEntry { client: 0, bytes: vec![1, 2, 3] }]),
            model_hash: [4; 32],
        };
        let replicated = Snapshot { replica_checkpoint: Some((0, vec![0.25; 23], vec![log])), ..snap };
        write("durable_snapshot", "replicated", &durable::encode_snapshot(&replicated));
        let records = [
            ("opened", Record::RoundOpened { round: 1, task: Task::Train, sampled: vec![0, 2] }),
            ("extended", Record::Extended { round: 1, added: vec![3] }),
            ("accepted", Record::Accepted { client: 2, body: vec![9; 40], signature: SignatureBytes([7; 64]) }),
            ("violation", Record::Violation { client: 1, count: 3 }),
        ];
        for (name, r) in records {
            write("durable_record", name, &durable::encode_record(&r));
        }

        // model_load: each architecture as safetensors and as raw f32.
        for pick in 0u8..3 {
            let arch = match pick {
                0 => ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 },
                1 => ModelArch::Mlp { input: 2, hidden: vec![], classes: 2 },
                _ => ModelArch::Mlp { input: 3, hidden: vec![2, 2], classes: 3 },
            };
            let params = arch.init_params(u64::from(pick));
            write("model_load", &format!("st-{pick}"), &[&[pick][..], &arch.to_safetensors(&params).unwrap()].concat());
            write("model_load", &format!("raw-{pick}"), &[&[pick][..], &floats(&params)].concat());
            let meta = crate::model_file::ModelMeta {
                algorithm: Some("fedavg".into()),
                run_id: Some(RUN),
                rounds: Some(3),
                ..crate::model_file::ModelMeta::of_arch(arch)
            };
            let file = crate::model_file::write_model_file(&meta, &params).unwrap();
            write("model_load", &format!("meta-{pick}"), &[&[pick][..], &file].concat());
        }

        // coordinator_ops: clients 0-3 join up front, then good reports from
        // every connection each round, a clock advance, a crash-and-restore,
        // garbage and an oversize read; one sequence per update kind.
        for (kind, setup) in [("dense", 16u8 | 8), ("dp-ftrl", 16 | 3), ("spsa", 4 << 5 | 16), ("frl", 7 << 5 | 16)] {
            let mut ops = vec![setup];
            for round in 0..3 {
                for conn in 0..4u8 {
                    ops.extend([4, conn, 0, 3]);
                }
                if round == 1 {
                    ops.extend([9 | 0x80, 0]);
                    for conn in 0..4u8 {
                        ops.extend([0, conn, conn, 2, conn, 0]);
                    }
                }
                ops.extend([7, 0, 0x10, 0x27]);
            }
            ops.extend([8 | 0x80, 4, 3, 1, 2, 3]);
            ops.extend([9, 1, 0, 0, 0, 0x10]);
            write("coordinator_ops", kind, &ops);
        }
        // Joins by hand (no prologue), a stale report, a flipped FRL ranking.
        let mut ops = vec![7 << 5];
        for conn in 0..3u8 {
            ops.extend([0, conn, conn, 2, conn, 0]);
        }
        ops.extend([4, 0, 0x70, 2, 1, 0, 0, 0, 3]);
        ops.extend([4, 1, 0x02, 0, 3]);
        write("coordinator_ops", "frl-hand-joins", &ops);

        // participant_frames: up to RoundStart, submit; bit-flipped Welcome; raw bytes.
        write("participant_frames", "submit", &[3, 7, 3]);
        write("participant_frames", "flip-welcome", &[2, 2 | (1 << 2), 1, 0x23, 0x01]);
        write("participant_frames", "framed", &[4, 1, 3, 5, 0, 0]);
    }
}
