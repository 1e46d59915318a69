//! `tally-sim`: many federated clients in one process.
//!
//! The simulator drives the *same* state machines as the real system — one
//! [`Coordinator`](tally_protocol::Coordinator) and one
//! [`Participant`](tally_protocol::Participant) per client, exchanging the same
//! signed, encoded messages — over a simulated network with a virtual clock:
//! each message arrives after a latency plus its size over the link
//! bandwidth, local training takes a virtual compute time, and round
//! deadlines fire on virtual time. Real training happens (with
//! `tally-kernels`), and the global model is evaluated centrally on the test
//! set after each round.
//!
//! Same scenario and seed ⇒ byte-identical metrics file: nothing in it comes
//! from the wall clock, and every random choice is seeded (the seed is
//! recorded in every line).
//!
//! It never opens a socket and never reads the clock for anything it reports
//! in the metrics (wall-clock timings go to the summary only).

pub mod attack;
pub mod dpstream;
mod driver;
mod net;
pub mod output;
pub mod report;
pub mod scenario;
pub mod sweep;

use serde::Serialize;
use tally_kernels::data::{self, Split};
use tally_kernels::{Dataset, Device};
use tally_protocol::Identity;

pub use attack::{Attack, AttackError};
pub use scenario::{
    AttackSpec, DataSource, NetworkSpec, PartitionFault, PartitionSpec, Scenario, ScenarioError, ShakespeareSpec,
};

/// Errors that stop a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Scenario.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// Dataset.
    #[error(transparent)]
    Data(#[from] tally_kernels::DataError),
    /// Training or evaluation.
    #[error(transparent)]
    Kernel(#[from] tally_kernels::KernelError),
    /// The coordinator refused the run's configuration (the scenario's
    /// validation refuses kinds, rules and models that don't fit first, as
    /// [`ScenarioError::Kind`]).
    #[error("coordinator configuration: {0}")]
    Config(#[from] tally_protocol::error::Misuse),
    /// A simulated client's state machine refused a message from the
    /// coordinator, or a submission (the simulator and the coordinator
    /// follow the protocol, so this is a bug on one side).
    #[error("protocol: {0}")]
    Protocol(#[from] tally_protocol::Error),
    /// An FRL ranking the simulator built or decoded was refused.
    #[error("frl: {0}")]
    Frl(#[from] tally_protocol::frl::FrlError),
    /// The attack does not apply to the run (refused by validation first).
    #[error(transparent)]
    Attack(#[from] AttackError),
    /// The coordinator addressed a connection the simulator never opened.
    #[error("message for unknown connection {0}")]
    UnknownConnection(u64),
    /// A broken internal invariant of the simulator.
    #[error("simulator invariant broken: {0}")]
    Invariant(&'static str),
    /// The run could not progress (no events and no timers).
    #[error("simulation stalled at round {0}")]
    Stalled(u32),
    /// A virtual time did not fit a `Duration` or an `Instant` (only for runs
    /// far longer than any the scenario bounds are meant for).
    #[error("virtual time overflow: {0}")]
    VirtualTime(&'static str),
}

/// One line of the metrics file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundRecord {
    /// Round (0 = initial model).
    pub round: u32,
    /// Clients sampled.
    pub sampled: usize,
    /// Updates accepted.
    pub accepted: usize,
    /// Sampled clients that answered that their local training failed.
    pub failed: usize,
    /// Messages refused.
    pub rejected: u32,
    /// Training samples behind the accepted updates.
    pub samples: u64,
    /// Sample-weighted mean local training loss.
    pub train_loss: Option<f64>,
    /// Test accuracy of the model after this round (if evaluated).
    pub test_accuracy: Option<f64>,
    /// Test loss of the model after this round (if evaluated).
    pub test_loss: Option<f64>,
    /// Test examples behind `test_accuracy` (central evaluation: the test
    /// set once), if evaluated.
    pub test_examples: Option<u64>,
    /// Bytes clients sent this round (encoded frames).
    pub bytes_up: u64,
    /// Bytes the server sent this round.
    pub bytes_down: u64,
    /// Virtual time at the end of the round, seconds.
    pub virtual_secs: f64,
    /// SHA-256 of the global parameters after the round (for FRL, the
    /// global scores, a function of the global ranking).
    pub model_hash: String,
    /// Malicious clients among the sampled (attack scenarios only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub malicious: Option<usize>,
    /// The messages of `rejected`, by reason (the protocol's
    /// [`RejectCode`](tally_protocol::wire::RejectCode) in snake case;
    /// `misuse` for a refusal that is the host's own fault). Only reasons
    /// that occurred; empty when nothing was refused.
    pub rejected_by_reason: std::collections::BTreeMap<String, u32>,
    /// How well the attack works after this round (attack scenarios only,
    /// where evaluated; see [`attack_success_kind`]): for a label flip with
    /// a source class, the test error on that class; for other attacks, the
    /// accuracy drop against the same-seed clean run, which a sweep fills in
    /// when that run is part of it (`null` otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attack_success: Option<Option<f64>>,
    /// Test accuracy per class (label order), where evaluated: only in runs
    /// that need it (a label-flip attack with a source class).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_class_accuracy: Option<Vec<f64>>,
    /// ρ (zCDP) spent by the run after this round (private kinds only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dp_rho_spent: Option<f64>,
    /// The (ε, δ) guarantee after this round, at `dp_delta` (private kinds only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dp_epsilon_spent: Option<f64>,
    /// The δ of `dp_epsilon_spent` (private kinds only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dp_delta: Option<f64>,
    /// The scenario seed.
    pub seed: u64,
}

/// How a scenario's attack success is measured (see
/// [`RoundRecord::attack_success`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttackSuccessKind {
    /// A targeted label flip: the test error on this (source) class.
    ClassError(usize),
    /// An untargeted attack: the accuracy drop against the same-seed clean
    /// run (known to a sweep that has it).
    AccuracyDrop,
}

/// The attack-success measure of a scenario's attack, `None` without one.
/// Attacks are read through their serde form ([`AttackSpec`]), so new
/// variants need nothing here: a `kind` that names a label flip
/// (`label-flip`, `targeted-label-flip`, …) with a source class under
/// `source`, `source_class`, `from` or `class` is measured by the error on
/// that class; every other attack is untargeted.
pub fn attack_success_kind(attack: Option<&AttackSpec>) -> Option<AttackSuccessKind> {
    Some(attack_success_of(&serde_json::to_value(attack?).ok()?))
}

/// [`attack_success_kind`] of an attack's serde form.
fn attack_success_of(spec: &serde_json::Value) -> AttackSuccessKind {
    let kind = spec.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
    if kind.contains("label-flip") || kind.contains("label_flip") {
        let source = ["source", "source_class", "from", "class"]
            .iter()
            .find_map(|k| spec.get(*k).and_then(serde_json::Value::as_u64));
        if let Some(c) = source {
            return AttackSuccessKind::ClassError(c as usize);
        }
    }
    AttackSuccessKind::AccuracyDrop
}

/// Result of a simulation.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// One record per round, plus round 0.
    pub records: Vec<RoundRecord>,
    /// Final parameters.
    pub final_model: Vec<f32>,
    /// Wall-clock seconds per training round (not in the metrics file).
    pub wall_secs_per_round: Vec<f64>,
    /// Wall-clock seconds of central evaluation per evaluated round.
    pub wall_secs_eval: Vec<f64>,
    /// Wall-clock seconds, in all, of the clients' local work: training (or
    /// crafting), signing and the server's stateless share of each report,
    /// the parts that run on `threads` workers. The rest of a round (the
    /// deliveries, verification, aggregation) is serial.
    pub wall_secs_local_work: f64,
    /// Set when the run stopped early because honest local training
    /// diverged (the global model was ruined, e.g. by a scaling attack): the
    /// round whose training failed. FRL's reference code stops such runs too.
    pub diverged_at: Option<u32>,
    /// Messages lost to a network partition.
    pub dropped_messages: u64,
}

impl SimReport {
    /// Test accuracy after the last round.
    pub fn final_accuracy(&self) -> Option<f64> {
        self.records.last().and_then(|r| r.test_accuracy)
    }
}

/// SplitMix64 finaliser over `(seed, tag, index)`: derives independent
/// sub-seeds (identities, network draws, attackers) from the scenario seed,
/// without a hash dependency.
pub(crate) fn hash_seed(seed: u64, tag: u64, index: u64) -> u64 {
    tally_protocol::rng::splitmix64(
        seed ^ tag.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15),
    )
}

// Tags of the sub-seeds derived from the scenario seed.
const TAG_IDENTITY: u64 = 1;
pub(crate) const TAG_DROPOUT: u64 = 2;
pub(crate) const TAG_STRAGGLER: u64 = 3;
pub(crate) const TAG_RUN: u64 = 4;
pub(crate) const TAG_CHALLENGE: u64 = 5;
pub(crate) const TAG_ATTACK: u64 = 6;

/// The identity of simulated client `i`: a secret derived from the seed.
pub fn sim_identity(seed: u64, i: usize) -> Identity {
    let mut secret = [0u8; 32];
    for (k, chunk) in secret.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&hash_seed(seed, TAG_IDENTITY, (i as u64) << 2 | k as u64).to_le_bytes());
    }
    Identity::from_secret(secret)
}

/// A uniform draw in `[0, 1)` from `(seed, tag, index)`.
pub(crate) fn unit(seed: u64, tag: u64, index: u64) -> f64 {
    (hash_seed(seed, tag, index) >> 11) as f64 / (1u64 << 53) as f64
}

/// Loads an MNIST-format dataset: `embedded` or a directory of IDX files.
pub fn load_data(spec: &str) -> Result<Split, SimError> {
    if spec == "embedded" {
        return Ok(data::embedded_mnist());
    }
    Ok(data::load_mnist_dir(std::path::Path::new(spec))?)
}

/// A scenario's data: the split, and for Shakespeare the natural clients
/// (each chosen role's training indices, in client order).
#[derive(Debug, Clone)]
pub struct SimData {
    /// Training and test sets.
    pub split: Split,
    /// One list of training indices per natural client (Shakespeare roles).
    pub roles: Option<Vec<Vec<usize>>>,
}

/// Loads the scenario's data (`s.data`, see [`DataSource`]). For
/// Shakespeare: the roles of the scenario's group with enough text, in
/// [`shakespeare::role_order`]; with `partition = roles` only the first
/// `clients` of them (and at most `max_roles` in any case); the test set is those roles' test windows, thinned to
/// `max_test` if set.
pub fn load_scenario_data(s: &Scenario) -> Result<SimData, SimError> {
    use data::shakespeare::{self, RoleGroup};
    let dir = match DataSource::of(&s.data) {
        DataSource::Mnist(Some(dir)) => return Ok(SimData { split: load_data(&dir.to_string_lossy())?, roles: None }),
        DataSource::Mnist(None) => return Ok(SimData { split: load_data("embedded")?, roles: None }),
        DataSource::Files(files) => return load_file_data(s, &files),
        DataSource::Shakespeare(dir) => dir,
    };
    let t = &s.shakespeare;
    let roles = match &dir {
        Some(dir) => shakespeare::load_dir(dir)?,
        None => shakespeare::embedded_sample(),
    };
    let mut chosen: Vec<&shakespeare::Role> = shakespeare::clients(&roles, t.window)
        .into_iter()
        .filter(|r| {
            t.group == RoleGroup::All || shakespeare::role_group(&r.play, &r.name, t.pretrain_percent) == t.group
        })
        .collect();
    chosen.sort_by(|a, b| {
        (shakespeare::role_order(&a.play, &a.name), &a.play, &a.name).cmp(&(
            shakespeare::role_order(&b.play, &b.name),
            &b.play,
            &b.name,
        ))
    });
    if let Some(k) = t.max_roles {
        chosen.truncate(k);
    }
    if s.partition == PartitionSpec::Roles {
        if chosen.len() < s.clients {
            return Err(ScenarioError::Invalid(format!(
                "{} clients asked for, the {:?} group of {} has {} roles",
                s.clients,
                t.group,
                s.data,
                chosen.len()
            ))
            .into());
        }
        chosen.truncate(s.clients);
    }
    let fed = shakespeare::federation(&chosen, t.window)?;
    let roles = fed.partition();
    let test = match t.max_test {
        Some(k) if k < fed.test.len() => {
            let n = fed.test.len();
            fed.test.subset(&(0..k).map(|i| i * n / k).collect::<Vec<_>>())?
        }
        _ => fed.test,
    };
    Ok(SimData { split: Split { train: fed.train, test }, roles: Some(roles) })
}

/// A CSV, NumPy, safetensors or image-folder dataset, checked against the
/// scenario's model (sample shape) before any training, and required to
/// have a test set (the simulator evaluates centrally).
fn load_file_data(s: &Scenario, files: &data::formats::FileData) -> Result<SimData, SimError> {
    let loaded = data::formats::load(files).map_err(tally_kernels::DataError::from)?;
    loaded.check_model(&files.to_string(), &s.model).map_err(tally_kernels::DataError::from)?;
    if loaded.split.test.is_empty() {
        return Err(ScenarioError::Invalid(format!(
            "data {files} has no test set: give `test` (a file) or `test_fraction`"
        ))
        .into());
    }
    Ok(SimData { split: loaded.split, roles: None })
}

/// Splits the training set per the scenario.
pub fn partition(s: &Scenario, train: &Dataset) -> Result<Vec<Vec<usize>>, SimError> {
    partition_with(s, train, None)
}

/// Splits the training set per the scenario; `roles` are the data's
/// natural clients, which `partition = roles` takes as they are.
pub fn partition_with(
    s: &Scenario,
    train: &Dataset,
    roles: Option<&[Vec<usize>]>,
) -> Result<Vec<Vec<usize>>, SimError> {
    let parts = match &s.partition {
        PartitionSpec::Roles => match roles {
            Some(r) => r.to_vec(),
            None => {
                return Err(ScenarioError::Invalid("partition roles needs Shakespeare data".into()).into());
            }
        },
        PartitionSpec::Iid => data::partition::iid(train.len(), s.clients, s.seed),
        PartitionSpec::Dirichlet { alpha } => {
            data::partition::dirichlet(&train.labels, train.classes, s.clients, *alpha, s.seed)?
        }
        PartitionSpec::File { path } => {
            let bytes = std::fs::read(path).map_err(|source| ScenarioError::Io { path: path.clone(), source })?;
            data::partition::from_json(&bytes, train.len())?
        }
    };
    if parts.len() != s.clients {
        return Err(ScenarioError::Invalid(format!(
            "the partition has {} clients, the scenario {}",
            parts.len(),
            s.clients
        ))
        .into());
    }
    Ok(parts)
}

/// Runs a scenario. `on_record` sees each metrics line as it is produced
/// (the binary writes it out and advances its progress bar).
pub fn run(
    scenario: &Scenario,
    device: &Device,
    on_record: &mut dyn FnMut(&RoundRecord),
) -> Result<SimReport, SimError> {
    scenario.validate()?;
    let data = load_scenario_data(scenario)?;
    run_on_data(scenario, &data, device, on_record)
}

/// [`run_on`] with the natural clients of the data (Shakespeare roles).
pub fn run_on_data(
    s: &Scenario,
    data: &SimData,
    device: &Device,
    on_record: &mut dyn FnMut(&RoundRecord),
) -> Result<SimReport, SimError> {
    run_inner(s, &data.split, data.roles.as_deref(), device, on_record)
}

/// Runs a scenario on already loaded data: sets the federation up
/// (`Sim::setup`), records the initial model, then advances virtual time
/// until the coordinator finishes. Each step is one of:
///
/// - the local work of the clients whose tasks arrived at this instant,
///   once every message of the instant is delivered (`Sim::local_work`);
/// - the next delivery or round deadline, whichever comes first
///   (`Sim::advance`), followed by sending what the coordinator queued
///   (`Sim::forward_server_messages`) and acting on its events, recording
///   each completed round (`Sim::handle_events`).
pub fn run_on(
    s: &Scenario,
    split: &Split,
    device: &Device,
    on_record: &mut dyn FnMut(&RoundRecord),
) -> Result<SimReport, SimError> {
    run_inner(s, split, None, device, on_record)
}

fn run_inner(
    s: &Scenario,
    split: &Split,
    roles: Option<&[Vec<usize>]>,
    device: &Device,
    on_record: &mut dyn FnMut(&RoundRecord),
) -> Result<SimReport, SimError> {
    s.validate()?;
    let mut sim = driver::Sim::setup(s, split, roles, device)?;
    sim.record_initial(on_record)?;
    while !sim.finished() {
        if sim.local_work_due() {
            match sim.local_work()? {
                driver::Flow::Continue => continue,
                // Honest training diverged: the run stops here.
                driver::Flow::Stop => break,
            }
        }
        sim.advance()?;
        sim.forward_server_messages()?;
        sim.handle_events(on_record)?;
    }
    Ok(sim.into_report())
}

/// `f` over `items` on up to `threads` scoped workers, results in item order.
pub(crate) fn par_map<T: Sync, R: Send>(
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> R + Sync,
) -> Result<Vec<R>, SimError> {
    if threads <= 1 || items.len() <= 1 {
        return Ok(items.iter().map(f).collect());
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<R>>> = items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.min(items.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                }
            });
        }
    });
    // Every index below `items.len()` was claimed by exactly one worker, and
    // the scope joined them all (a worker's panic propagates out of `scope`).
    slots
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()).ok_or(SimError::Invariant("a worker lost an item")))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn tiny() -> (Scenario, Split) {
        let full = data::embedded_mnist();
        let split = Split {
            train: full.train.subset(&(0..600).collect::<Vec<_>>()).unwrap(),
            test: full.test.subset(&(0..200).collect::<Vec<_>>()).unwrap(),
        };
        let s = Scenario {
            clients: 6,
            clients_per_round: 3,
            rounds: 3,
            model: tally_protocol::model::ModelArch::Mlp { input: 784, hidden: vec![32], classes: 10 },
            ..Scenario::default()
        };
        (s, split)
    }

    /// Replicated runs: every simulated client's replica is one shared
    /// allocation (the store's), for SPSA and Ferret. Each replica is still
    /// checked against the server's model hash after every round, so a
    /// wrongly shared replica would refuse its client's reports.
    #[test]
    fn identical_replicas_share_one_allocation() {
        let (mut s, split) = tiny();
        s.clients = 8;
        s.clients_per_round = 4;
        for algorithm in [
            tally_protocol::AlgorithmSpec::Spsa(tally_protocol::spsa::SpsaSpec {
                steps_per_client: 4,
                batch_size: 16,
                ..Default::default()
            }),
            tally_protocol::AlgorithmSpec::Ferret(Default::default()),
        ] {
            s.algorithm = algorithm;
            let dev = tally_kernels::cpu_device();
            let mut sim = driver::Sim::setup(&s, &split, None, &dev).unwrap();
            sim.record_initial(&mut |_| {}).unwrap();
            while !sim.finished() {
                if sim.local_work_due() {
                    sim.local_work().unwrap();
                    continue;
                }
                sim.advance().unwrap();
                sim.forward_server_messages().unwrap();
                sim.handle_events(&mut |_| {}).unwrap();
            }
            assert_eq!(sim.replica_allocations(), (1, 8), "{:?}", s.algorithm);
            let report = sim.into_report();
            assert_eq!(report.records.len(), 4);
            assert!(report.records.iter().all(|r| r.accepted == r.sampled), "{:?}", report.records);
        }
    }

    /// The network of `scenarios/mnist-sequential-cnn.toml`, described
    /// only in TOML, trains under FedAvg on the embedded MNIST sample, and
    /// two runs give the same model hashes; SPSA and Ferret train it too,
    /// reproducibly.
    #[test]
    fn toml_described_network_trains_reproducibly_under_every_dense_kind() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/mnist-sequential-cnn.toml");
        let file = Scenario::from_file(&path).unwrap();
        assert!(matches!(file.model, tally_protocol::model::ModelArch::Sequential { .. }));
        assert_eq!(tally_protocol::sequential::presets::of(&file.model), None);
        assert_eq!(file.model.num_params(), 11_178);
        let (tiny, split) = tiny();
        // 100 examples a client: more local epochs than the file's one, so
        // that a few rounds move a small CNN clearly.
        let train = tally_protocol::wire::TrainSpec::sgd(0.15, 16, 5);
        let s = Scenario { model: file.model.clone(), train, rounds: 6, ..tiny };
        let dev = tally_kernels::cpu_device();
        let a = run_on(&s, &split, &dev, &mut |_| {}).unwrap();
        let b = run_on(&s, &split, &dev, &mut |_| {}).unwrap();
        assert_eq!(a.records, b.records);
        assert!(a.records[1..].iter().all(|r| r.accepted == 3 && r.rejected == 0), "{:?}", a.records);
        let (first, last) = (a.records[0].test_accuracy.unwrap(), a.final_accuracy().unwrap());
        eprintln!("FedAvg on the TOML-described CNN: test accuracy {first} → {last}");
        assert!(last > 0.5 && last > first + 0.3, "{first} → {last}");
        for algorithm in [
            "{ kind = \"spsa\", steps_per_client = 4, eps = 1e-3, lr = 0.02, batch_size = 16 }",
            "{ kind = \"ferret\", k = 16 }",
        ] {
            #[derive(serde::Deserialize)]
            struct One {
                algorithm: tally_protocol::kind::AlgorithmSpec,
            }
            let algorithm = toml::from_str::<One>(&format!("algorithm = {algorithm}")).unwrap().algorithm;
            let k = Scenario { algorithm, rounds: 2, ..s.clone() };
            let x = run_on(&k, &split, &dev, &mut |_| {}).unwrap();
            let y = run_on(&k, &split, &dev, &mut |_| {}).unwrap();
            assert_eq!(x.records, y.records, "{:?}", k.algorithm);
            assert!(x.records[1..].iter().all(|r| r.accepted == 3), "{:?}", x.records);
            assert_ne!(x.records[0].model_hash, x.records[2].model_hash, "{:?} didn't move", k.algorithm);
        }
    }

    /// A checked-in scenario with its data paths made absolute (they are
    /// written relative to the repository root, tests run in the package).
    fn repo_scenario(name: &str) -> Scenario {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut s = Scenario::from_file(&root.join("simulations/scenarios").join(name)).unwrap();
        for p in s.data.paths_mut() {
            *p = root.join(&*p);
        }
        s
    }

    /// Acceptance of issue 16 item 3: a network described only in TOML
    /// trains under FedAvg on the CSV sample and on the image-folder
    /// sample, accuracy is reported and well above chance (1/3), and two
    /// runs give identical records, model hashes included.
    #[test]
    fn toml_network_trains_on_csv_and_image_folder_data_reproducibly() {
        let dev = tally_kernels::cpu_device();
        for (name, floor) in [("csv-digits.toml", 0.8), ("png-digits.toml", 0.8)] {
            let s = repo_scenario(name);
            assert!(matches!(s.model, tally_protocol::model::ModelArch::Sequential { .. }));
            assert_eq!(tally_protocol::sequential::presets::of(&s.model), None, "{name}: not a preset");
            assert!(matches!(DataSource::of(&s.data), DataSource::Files(_)), "{name}");
            let data = load_scenario_data(&s).unwrap();
            assert_eq!((data.split.train.len(), data.split.test.len()), (150, 60), "{name}");
            let a = run_on_data(&s, &data, &dev, &mut |_| {}).unwrap();
            let b = run_on_data(&s, &data, &dev, &mut |_| {}).unwrap();
            assert_eq!(a.records, b.records, "{name}: two runs differ");
            let (first, last) = (a.records[0].test_accuracy.unwrap(), a.final_accuracy().unwrap());
            eprintln!(
                "{name}: test accuracy {first:.4} -> {last:.4}, final hash {}",
                a.records.last().unwrap().model_hash
            );
            assert_eq!(a.records.last().unwrap().test_examples, Some(60));
            assert!(last > floor && last > first, "{name}: {first} -> {last}");
        }
    }

    /// A partition file works with file-based data; a model whose input
    /// does not match the samples is refused before training, naming both.
    #[test]
    fn file_data_takes_partition_files_and_checks_the_model_input() {
        let mut s = repo_scenario("csv-digits.toml");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("parts.json");
        let parts: Vec<Vec<usize>> = (0..6).map(|c| (0..150).filter(|i| i % 6 == c).collect()).collect();
        std::fs::write(&p, serde_json::to_string(&parts).unwrap()).unwrap();
        s.partition = PartitionSpec::File { path: p };
        s.rounds = 2;
        let data = load_scenario_data(&s).unwrap();
        assert_eq!(partition(&s, &data.split.train).unwrap(), parts);
        let r = run_on_data(&s, &data, &tally_kernels::cpu_device(), &mut |_| {}).unwrap();
        assert!(r.records[1..].iter().all(|x| x.accepted == 3 && x.samples == 75), "{:?}", r.records);
        s.model = tally_protocol::model::ModelArch::Mlp { input: 784, hidden: vec![8], classes: 3 };
        let e = load_scenario_data(&s).unwrap_err().to_string();
        assert!(e.contains("digits-train.csv") && e.contains("16 features") && e.contains("784"), "{e}");
        // No test set: refused, since the simulator evaluates centrally.
        let mut t = repo_scenario("csv-digits.toml");
        if let tally_kernels::data::formats::DataSpec::Files(f) = &mut t.data {
            f.test = None;
        }
        let e = load_scenario_data(&t).unwrap_err().to_string();
        assert!(e.contains("no test set"), "{e}");
    }

    #[test]
    fn same_seed_gives_identical_records_and_accuracy_improves() {
        let (s, split) = tiny();
        let dev = tally_kernels::cpu_device();
        let a = run_on(&s, &split, &dev, &mut |_| {}).unwrap();
        let b = run_on(&s, &split, &dev, &mut |_| {}).unwrap();
        assert_eq!(a.records, b.records);
        assert_eq!(a.records.len(), 4);
        assert!(a.final_accuracy().unwrap() > a.records[0].test_accuracy.unwrap() + 0.2);
        let mut other = s.clone();
        other.seed = 2;
        let c = run_on(&other, &split, &dev, &mut |_| {}).unwrap();
        assert_ne!(a.records.last().unwrap().model_hash, c.records.last().unwrap().model_hash);
    }

    #[test]
    fn dropouts_and_stragglers_still_complete_at_quorum() {
        let (mut s, split) = tiny();
        s.quorum = Some(1);
        s.round_timeout_secs = 5;
        s.network.dropout = 0.5;
        s.network.straggler_fraction = 0.5;
        s.network.straggler_slowdown = 1000.0;
        let r = run_on(&s, &split, &tally_kernels::cpu_device(), &mut |_| {}).unwrap();
        assert_eq!(r.records.len(), 4);
        assert!(r.records[1..].iter().any(|x| x.accepted < 3), "some client should miss a deadline");
        // Every refusal is counted under its reason.
        for x in &r.records {
            assert_eq!(x.rejected_by_reason.values().sum::<u32>(), x.rejected, "{x:?}");
        }
    }

    #[test]
    fn refusals_are_named_by_their_reject_code() {
        use tally_protocol::error::Misbehaviour;
        assert_eq!(driver::reject_reason(&tally_protocol::Error::Late { got: 2, open: Some(3) }), "late");
        let bad = tally_protocol::Error::Misbehaving(Misbehaviour::BadSignature);
        assert_eq!(driver::reject_reason(&bad), "bad_signature");
        let rec = RoundRecord { rejected_by_reason: [("late".to_string(), 2)].into(), ..tiny_record() };
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(v["rejected_by_reason"]["late"], 2);
        // No attack: no attack_success or per-class fields at all.
        assert!(v.get("attack_success").is_none() && v.get("test_class_accuracy").is_none());
    }

    fn tiny_record() -> RoundRecord {
        RoundRecord {
            round: 1,
            sampled: 0,
            accepted: 0,
            failed: 0,
            rejected: 0,
            samples: 0,
            train_loss: None,
            test_accuracy: None,
            test_loss: None,
            test_examples: None,
            bytes_up: 0,
            bytes_down: 0,
            virtual_secs: 0.0,
            model_hash: String::new(),
            malicious: None,
            rejected_by_reason: Default::default(),
            attack_success: None,
            test_class_accuracy: None,
            dp_rho_spent: None,
            dp_epsilon_spent: None,
            dp_delta: None,
            seed: 1,
        }
    }

    #[test]
    fn attack_success_is_the_flipped_class_error_for_label_flips_else_a_drop() {
        use serde_json::json;
        assert_eq!(attack_success_kind(None), None);
        let scale = AttackSpec::Scale { fraction: 0.1, scale: 10.0 };
        assert_eq!(attack_success_kind(Some(&scale)), Some(AttackSuccessKind::AccuracyDrop));
        let flip = json!({"kind": "label-flip", "fraction": 0.1, "source": 7, "target": 1});
        assert_eq!(attack_success_of(&flip), AttackSuccessKind::ClassError(7));
        let flip = json!({"kind": "targeted-label-flip", "fraction": 0.1, "from": 3});
        assert_eq!(attack_success_of(&flip), AttackSuccessKind::ClassError(3));
        // A flip of every class has no single flipped class: a drop.
        let flip = json!({"kind": "label-flip", "fraction": 0.1});
        assert_eq!(attack_success_of(&flip), AttackSuccessKind::AccuracyDrop);
    }

    #[test]
    fn per_class_accuracies_add_up_to_the_overall_accuracy() {
        let (s, split) = tiny();
        let dev = tally_kernels::cpu_device();
        let run = tally_protocol::Coordinator::new(
            tally_protocol::CoordinatorConfig {
                run_id: tally_protocol::wire::RunId([0; 16]),
                arch: s.model.clone(),
                rounds: 1,
                enrolled: vec![sim_identity(1, 0).public_key()],
                min_clients: 1,
                clients_per_round: 1,
                quorum: 1,
                round_timeout: std::time::Duration::from_secs(1),
                train: s.train.clone(),
                kind: s.kind_settings().unwrap(),
                rule: s.rule,
                max_violations: 1,
                max_update_abs: f32::MAX,
                schedule: None,
                final_evaluation: false,
                noise_seed: None,
            },
            s.model.init_params(3),
            3,
        )
        .unwrap();
        let (config, model) = (run.run_config(), run.model().to_vec());
        let by_class = driver::split_by_class(&split.test).unwrap();
        assert_eq!(by_class.len(), 10);
        assert!(by_class.iter().enumerate().all(|(k, d)| d.labels.iter().all(|&l| usize::from(l) == k)));
        let per = driver::per_class_accuracy(&config, &model, &by_class, &dev).unwrap();
        let overall = tally_kernels::update::evaluate_run(&config, &model, &split.test, &dev, 1000).unwrap();
        let correct: f64 = per.iter().zip(&by_class).map(|(a, d)| a * d.len() as f64).sum();
        assert!((correct - overall.correct as f64).abs() < 0.5, "{per:?}: {correct} vs {}", overall.correct);
        // An untrained model is not equally good at every class.
        assert!(per.iter().any(|&a| a != per[0]), "{per:?}");
    }

    #[test]
    fn a_targeted_label_flip_reports_the_error_on_its_source_class() {
        let (mut s, split) = tiny();
        s.rounds = 2;
        s.attack = Some(AttackSpec::LabelFlip { fraction: 0.5, source: Some(7), target: Some(1) });
        let r = run_on(&s, &split, &tally_kernels::cpu_device(), &mut |_| {}).unwrap();
        for x in &r.records {
            let per = x.test_class_accuracy.as_ref().expect("per-class accuracy in every evaluated row");
            assert_eq!(per.len(), 10);
            assert_eq!(x.attack_success, Some(Some(1.0 - per[7])), "{x:?}");
        }
        // An untargeted flip (every class) is measured as a drop instead.
        s.attack = Some(AttackSpec::LabelFlip { fraction: 0.5, source: None, target: None });
        let r = run_on(&s, &split, &tally_kernels::cpu_device(), &mut |_| {}).unwrap();
        assert!(r.records.iter().all(|x| x.test_class_accuracy.is_none() && x.attack_success == Some(None)));
    }

    #[test]
    fn an_attacked_run_marks_attack_success_unknown_until_a_sweep_fills_it() {
        let (mut s, split) = tiny();
        s.rounds = 1;
        s.attack = Some(AttackSpec::Scale { fraction: 0.5, scale: 1e5 });
        let mut r = run_on(&s, &split, &tally_kernels::cpu_device(), &mut |_| {}).unwrap();
        assert!(r.records.iter().all(|x| x.attack_success == Some(None)), "{:?}", r.records);
        let clean: std::collections::BTreeMap<u32, f64> = [(0, 0.1), (1, 0.9)].into();
        sweep::fill_drop(&mut r.records, &clean);
        let drop = r.records[1].attack_success.unwrap().unwrap();
        assert!((drop - (0.9 - r.records[1].test_accuracy.unwrap())).abs() < 1e-12);
    }

    #[test]
    fn a_run_that_stopped_early_is_compared_with_the_clean_runs_final_accuracy() {
        let row = |round, acc| RoundRecord { round, test_accuracy: acc, attack_success: Some(None), ..tiny_record() };
        // Clean run: evaluated at rounds 0, 10 and 30 (final).
        let clean: std::collections::BTreeMap<u32, f64> = [(0, 0.1), (10, 0.8), (30, 0.95)].into();
        // Attacked run ruined in round 1 and stopped there.
        let mut stopped = vec![row(0, Some(0.1)), row(1, Some(0.1))];
        sweep::fill_drop(&mut stopped, &clean);
        assert_eq!(stopped[0].attack_success, Some(Some(0.0)));
        assert!((stopped[1].attack_success.unwrap().unwrap() - 0.85).abs() < 1e-12, "{stopped:?}");
        // A run that went the whole way: rounds the clean run did not
        // evaluate stay unknown, its last row is compared round for round.
        let mut full = vec![row(0, Some(0.1)), row(5, Some(0.5)), row(30, Some(0.9))];
        sweep::fill_drop(&mut full, &clean);
        assert_eq!(full[1].attack_success, Some(None));
        assert!((full[2].attack_success.unwrap().unwrap() - 0.05).abs() < 1e-12);
        // Rows of a run that was not evaluated stay unknown.
        let mut unevaluated = vec![row(0, Some(0.1)), row(1, None)];
        sweep::fill_drop(&mut unevaluated, &clean);
        assert_eq!(unevaluated[1].attack_success, Some(None));
    }

    fn tiny_frl() -> (Scenario, Split) {
        let (mut s, split) = tiny();
        s.model = tally_protocol::model::ModelArch::Supermask(tally_protocol::supermask::FrlArch::MNIST_LENET);
        s.algorithm = tally_protocol::AlgorithmSpec::Frl(tally_protocol::frl::FrlSpec::default());
        s.train = tally_protocol::wire::TrainSpec::sgd(0.4, 8, 1);
        s.rounds = 2;
        (s, split)
    }

    #[test]
    fn frl_rounds_vote_rankings_and_replay_identically() {
        let (s, split) = tiny_frl();
        let dev = tally_kernels::cpu_device();
        let a = run_on(&s, &split, &dev, &mut |_| {}).unwrap();
        let b = run_on(&Scenario { threads: 1, ..s.clone() }, &split, &dev, &mut |_| {}).unwrap();
        // Same seed ⇒ same global ranking (hash of the scores) every round,
        // whatever the number of training threads.
        assert_eq!(a.records, b.records);
        assert_eq!(a.records.len(), 3);
        assert!(a.records[1..].iter().all(|r| r.accepted == 3 && r.rejected == 0));
        // Uploads: three packed LeNet rankings (4.25 MB each) plus a small envelope.
        let packed = tally_protocol::frl::packed_len(&tally_protocol::frl::LENET_MNIST_LAYER_SIZES).unwrap() as u64;
        // (Round 2: round 1 also carries the joins.)
        let up = a.records[2].bytes_up;
        assert!(up > 3 * packed && up < 3 * (packed + 200), "{up}");
        assert!(a.final_accuracy().unwrap() > a.records[0].test_accuracy.unwrap() + 0.2, "{:?}", a.records);
    }

    #[test]
    fn frl_reverse_attack_is_sent_by_the_malicious_clients_only() {
        let (mut s, split) = tiny_frl();
        s.rounds = 1;
        s.attack = Some(AttackSpec::FrlReverse { fraction: 0.5, pool: 2 });
        let r = run_on(&s, &split, &tally_kernels::cpu_device(), &mut |_| {}).unwrap();
        let m = r.records[1].malicious.unwrap();
        assert!(m > 0, "seed 1 samples a malicious client: {:?}", r.records[1]);
        // Well-formed permutations: accepted like any other vote.
        assert_eq!((r.records[1].accepted, r.records[1].rejected), (3, 0));
    }

    #[test]
    fn scaling_attack_ruins_fedavg() {
        let (mut s, split) = tiny();
        s.rounds = 2;
        let dev = tally_kernels::cpu_device();
        let clean = run_on(&s, &split, &dev, &mut |_| {}).unwrap();
        s.attack = Some(AttackSpec::Scale { fraction: 0.5, scale: 1e5 });
        let attacked = run_on(&s, &split, &dev, &mut |_| {}).unwrap();
        assert!(attacked.records.iter().skip(1).any(|r| r.malicious.unwrap() > 0));
        let (clean, attacked) = (clean.final_accuracy().unwrap(), attacked.final_accuracy().unwrap());
        assert!(attacked < 0.25 && clean > attacked + 0.2, "clean {clean}, attacked {attacked}");
    }

    #[test]
    fn robust_rules_keep_learning_under_a_scaling_attack() {
        use tally_protocol::RuleSpec;
        let (mut s, split) = tiny();
        // 2 malicious of 14, up to 2 in a round of 7: f = 2 covers them
        // (Krum needs rounds of more than 2f + 2 = 6).
        s.clients = 14;
        s.clients_per_round = 7;
        s.rounds = 6;
        s.attack = Some(AttackSpec::Scale { fraction: 0.15, scale: 1e5 });
        let dev = tally_kernels::cpu_device();
        let run =
            |s: &Scenario, rule: RuleSpec| run_on(&Scenario { rule, ..s.clone() }, &split, &dev, &mut |_| {}).unwrap();
        let clean = run(&Scenario { attack: None, ..s.clone() }, RuleSpec::Mean).final_accuracy().unwrap();
        let mean = run(&s, RuleSpec::Mean);
        assert!(mean.records.iter().skip(1).any(|r| r.malicious.unwrap() > 0), "{:?}", mean.records);
        // Under the mean, the attacker's update takes over the model (its
        // hash differs from every robust run's).
        let ruined = mean.records.last().unwrap().model_hash.clone();
        for rule in [
            RuleSpec::Median,
            RuleSpec::TrimmedMean { trim: 2 },
            RuleSpec::Krum { byzantine: 2 },
            RuleSpec::MultiKrum { byzantine: 2 },
            RuleSpec::NormClip { max_norm: 2.0 },
        ] {
            let r = run(&s, rule);
            let acc = r.final_accuracy().unwrap();
            assert!(acc > clean - 0.2, "{rule}: {acc} under attack, {clean} clean");
            assert_ne!(r.records.last().unwrap().model_hash, ruined);
            // No attacked parameter blew up: every robust model stays small.
            assert!(r.records.iter().all(|x| x.test_loss.is_none_or(|l| l < 10.0)), "{rule}: {:?}", r.records);
        }
        // The mean's model, by contrast, carries the scaled update: its test
        // loss explodes even where its argmax survives.
        assert!(mean.records.iter().any(|x| x.test_loss.is_some_and(|l| l > 100.0)), "{:?}", mean.records);
    }

    #[test]
    fn the_median_rule_and_fedavgm_run_and_differ_from_the_mean() {
        let (s, split) = tiny();
        let dev = tally_kernels::cpu_device();
        let mean = run_on(&s, &split, &dev, &mut |_| {}).unwrap();
        let median =
            run_on(&Scenario { rule: tally_protocol::RuleSpec::Median, ..s.clone() }, &split, &dev, &mut |_| {})
                .unwrap();
        assert!(median.records[1..].iter().all(|r| r.accepted == 3 && r.rejected == 0), "{:?}", median.records);
        assert_ne!(mean.records.last().unwrap().model_hash, median.records.last().unwrap().model_hash);
        assert!(median.final_accuracy().unwrap() > median.records[0].test_accuracy.unwrap() + 0.2);
        let fedavgm = Scenario {
            algorithm: tally_protocol::AlgorithmSpec::Fedavgm(tally_protocol::fedavgm::FedAvgMSpec::default()),
            ..s.clone()
        };
        let m = run_on(&fedavgm, &split, &dev, &mut |_| {}).unwrap();
        assert!(m.records[1..].iter().all(|r| r.accepted == 3 && r.rejected == 0), "{:?}", m.records);
        assert_ne!(mean.records.last().unwrap().model_hash, m.records.last().unwrap().model_hash);
    }

    #[test]
    fn dpftrl_runs_to_its_horizon_reports_privacy_and_is_deterministic() {
        let (mut s, split) = tiny();
        let dev = tally_kernels::cpu_device();
        // rounds above the horizon: the run ends after T = 2 releases, and
        // that last round is evaluated.
        s.rounds = 4;
        s.algorithm = tally_protocol::AlgorithmSpec::DpFtrl(tally_protocol::dpftrl::DpFtrlSpec {
            epsilon: Some(8.0),
            horizon: Some(2),
            ..Default::default()
        });
        let a = run_on(&s, &split, &dev, &mut |_| {}).unwrap();
        assert_eq!(a.records.len(), 3, "{:?}", a.records);
        assert!(a.records[2].test_accuracy.is_some());
        let eps: Vec<Option<f64>> = a.records.iter().map(|r| r.dp_epsilon_spent).collect();
        assert!(eps[0].is_none() && eps[1].unwrap() < eps[2].unwrap() && eps[2].unwrap() <= 8.0, "{eps:?}");
        assert_eq!(a.records[2].dp_delta, Some(1e-5));
        let json = serde_json::to_value(&a.records[2]).unwrap();
        assert!(json.get("dp_rho_spent").is_some());
        // The noise comes from the scenario seed: a rerun is identical; another
        // seed (which changes everything, the noise included) differs.
        let b = run_on(&s, &split, &dev, &mut |_| {}).unwrap();
        assert_eq!(a.records, b.records);
        let c = run_on(&Scenario { seed: s.seed + 1, ..s.clone() }, &split, &dev, &mut |_| {}).unwrap();
        assert_ne!(a.records.last().unwrap().model_hash, c.records.last().unwrap().model_hash);
    }

    #[test]
    fn scaling_attack_payloads_are_tagged_with_the_runs_dense_kind() {
        let (mut s, split) = tiny();
        s.rounds = 1;
        s.algorithm = tally_protocol::AlgorithmSpec::Fedavgm(tally_protocol::fedavgm::FedAvgMSpec::default());
        s.attack = Some(AttackSpec::Scale { fraction: 0.5, scale: 1e5 });
        let r = run_on(&s, &split, &tally_kernels::cpu_device(), &mut |_| {}).unwrap();
        assert!(r.records[1].malicious.unwrap() > 0, "{:?}", r.records[1]);
        // Accepted like any other fedavgm delta (a fedavg tag would be refused).
        assert_eq!((r.records[1].accepted, r.records[1].rejected), (3, 0));
    }

    #[test]
    fn a_partition_mid_run_is_survived_by_deadlines_and_top_ups() {
        let (mut s, split) = tiny();
        s.rounds = 4;
        s.quorum = Some(3);
        s.round_timeout_secs = 5;
        // Half the clients unreachable from just after the start for 30
        // virtual seconds: rounds in that window must extend and fill their
        // quorum from the reachable half.
        s.network.partition = Some(PartitionFault { fraction: 0.5, from_secs: 0.1, to_secs: 30.0 });
        let dev = tally_kernels::cpu_device();
        let r = run_on(&s, &split, &dev, &mut |_| {}).unwrap();
        assert_eq!(r.records.len(), 5);
        assert!(r.dropped_messages > 0);
        assert!(r.records[1..].iter().all(|x| x.accepted >= 3), "{:?}", r.records);
        // Deterministic under the fault too.
        assert_eq!(run_on(&s, &split, &dev, &mut |_| {}).unwrap().records, r.records);
    }

    #[test]
    fn a_partition_from_the_start_delays_the_joins_instead_of_stalling() {
        let (mut s, split) = tiny();
        s.rounds = 2;
        // Half the clients cut off from time 0: their handshakes are lost
        // and retried when the link is back, so round 1 opens at ~5 s.
        s.network.partition = Some(PartitionFault { fraction: 0.5, from_secs: 0.0, to_secs: 5.0 });
        let dev = tally_kernels::cpu_device();
        let r = run_on(&s, &split, &dev, &mut |_| {}).unwrap();
        assert_eq!(r.records.len(), 3);
        assert!(r.dropped_messages > 0);
        assert!(r.records[1].virtual_secs > 5.0, "{:?}", r.records[1]);
        assert_eq!(run_on(&s, &split, &dev, &mut |_| {}).unwrap().records, r.records);
    }

    #[test]
    fn a_train_range_past_the_data_names_the_field() {
        let (mut s, split) = tiny();
        s.train_range = Some([split.train.len() + 5, split.train.len() + 10]);
        let err = run_on(&s, &split, &tally_kernels::cpu_device(), &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("train_range") && err.contains("training examples"), "{err}");
    }

    /// Shakespeare end to end on the embedded sample: central pre-training
    /// on the pre-training roles (one client), saved, then FedAvg over the
    /// other roles (one client per role) from it; accuracy rises.
    #[test]
    fn shakespeare_pretrain_then_federated_fine_tuning() {
        use tally_kernels::data::shakespeare::RoleGroup;
        let arch = tally_protocol::model::ModelArch::CharGru { vocab: 81, embed: 8, hidden: 16, seq: 80 };
        let text = ShakespeareSpec { group: RoleGroup::Pretrain, max_test: Some(300), ..ShakespeareSpec::default() };
        let pre = Scenario {
            data: "shakespeare".into(),
            shakespeare: text.clone(),
            clients: 1,
            clients_per_round: 1,
            rounds: 2,
            partition: PartitionSpec::Iid,
            model: arch.clone(),
            train: tally_protocol::wire::TrainSpec::sgd(1.0, 16, 1),
            ..Scenario::default()
        };
        let dev = tally_kernels::cpu_device();
        let data = load_scenario_data(&pre).unwrap();
        assert_eq!(data.split.test.len(), 300);
        assert_eq!((data.split.train.rows, data.split.train.cols), (1, 80));
        let p = run_on_data(&pre, &data, &dev, &mut |_| {}).unwrap();
        assert!(p.final_accuracy().unwrap() > p.records[0].test_accuracy.unwrap() + 0.1, "{:?}", p.records);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pre.safetensors");
        let meta = tally_protocol::model_file::ModelMeta::of_kind(arch.clone(), &pre.kind_settings().unwrap(), Some(2));
        tally_kernels::params_file::save_model(&file, &meta, &p.final_model).unwrap();
        let fine = Scenario {
            shakespeare: ShakespeareSpec { group: RoleGroup::Federated, ..text },
            clients: 4,
            clients_per_round: 2,
            rounds: 2,
            partition: PartitionSpec::Roles,
            initial_model: Some(file),
            train: tally_protocol::wire::TrainSpec::sgd(0.5, 16, 1),
            ..pre.clone()
        };
        let fdata = load_scenario_data(&fine).unwrap();
        let roles = fdata.roles.as_ref().unwrap();
        assert_eq!(roles.len(), 4);
        // The roles' windows, client after client.
        assert_eq!(roles.iter().map(Vec::len).sum::<usize>(), fdata.split.train.len());
        let f = run_on_data(&fine, &fdata, &dev, &mut |_| {}).unwrap();
        assert!(f.records[1..].iter().all(|r| r.accepted == 2 && r.rejected == 0), "{:?}", f.records);
        // Starts from the pre-trained model (well above chance), then improves.
        assert!(f.records[0].test_accuracy.unwrap() > 0.15, "{:?}", f.records[0]);
        assert!(f.final_accuracy().unwrap() > f.records[0].test_accuracy.unwrap(), "{:?}", f.records);
        assert_eq!(run_on_data(&fine, &fdata, &dev, &mut |_| {}).unwrap().records, f.records);
        // Too many clients for the group, and roles without Shakespeare data.
        assert!(load_scenario_data(&Scenario { clients: 1000, clients_per_round: 1, ..fine.clone() }).is_err());
        let mnist = Scenario { data: "embedded".into(), ..fine };
        assert!(mnist.validate().is_err());
    }

    #[test]
    fn schedule_file_drives_sampling() {
        let (mut s, split) = tiny();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sched.json");
        std::fs::write(&p, "[[0],[1,2],[5]]").unwrap();
        s.schedule = Some(p);
        s.quorum = Some(1);
        let r = run_on(&s, &split, &tally_kernels::cpu_device(), &mut |_| {}).unwrap();
        let sampled: Vec<usize> = r.records[1..].iter().map(|x| x.sampled).collect();
        assert_eq!(sampled, vec![1, 2, 1]);
    }
}
