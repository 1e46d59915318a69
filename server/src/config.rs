//! Server configuration: raw (TOML file + CLI overrides) → validated.
//!
//! Every knob documents its unit, default and why.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tally_protocol::coordinator::{DEFAULT_MAX_UPDATE_ABS, MAX_ROUND_TIMEOUT, default_quorum};
use tally_protocol::kind::{AlgorithmSpec, KindSettings, RuleSpec};
use tally_protocol::model::ModelArch;
use tally_protocol::wire::{PublicKeyBytes, RunId, TrainSpec};

/// Pending connections allowed beyond one per enrolled client by default
/// ([`RawConfig::max_pending_connections`]): reconnections overlapping,
/// and room for a few strangers without refusing anyone honest.
pub const DEFAULT_PENDING_HEADROOM: usize = 16;

/// Default of [`RawConfig::max_pending_per_source`].
pub const DEFAULT_PENDING_PER_SOURCE: usize = 8;

/// Default of [`RawConfig::handshake_timeout_secs`].
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 5;

/// Largest [`RawConfig::handshake_timeout_secs`]: longer only lets
/// half-open handshakes hold slots (the idle timeout is 30 s).
pub const MAX_HANDSHAKE_TIMEOUT_SECS: u64 = 60;

/// Errors reading or validating configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or unknown key.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A value out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The configuration file as written (every field optional; defaults below).
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// UDP address to listen on. Default `0.0.0.0:4433`; port 0 picks a free port.
    pub listen: Option<SocketAddr>,
    /// TCP address of the Prometheus endpoint (`GET /metrics`, `GET
    /// /healthz`; plain HTTP, no authentication: bind it to loopback or a
    /// management network). Default: none, no endpoint. Port 0 picks a free
    /// port (printed as `metrics on <addr>`).
    pub metrics_listen: Option<SocketAddr>,
    /// Training rounds. Default 5.
    pub rounds: Option<u32>,
    /// Clients that must join before round 1. Default 3.
    pub min_clients: Option<usize>,
    /// Clients sampled per round. Default: `min_clients`.
    pub clients_per_round: Option<usize>,
    /// Accepted updates that close a round. Default: 4/5 of
    /// `clients_per_round` rounded down (at least 1, and at least what the
    /// rule needs): the sample over-selects, so a client that leaves or
    /// straggles does not hold the round past its deadline. A round waits
    /// for every sampled client still connected until its deadline, then
    /// closes with what it has if that is the quorum; below it, stragglers
    /// are replaced by clients not yet asked, and a client that joins
    /// replaces one that left at once.
    pub quorum: Option<usize>,
    /// Seconds a round waits before closing at quorum or extending. Default
    /// 600: local training on an edge CPU takes minutes. At most one week
    /// ([`MAX_ROUND_TIMEOUT`]).
    pub round_timeout_secs: Option<u64>,
    /// Violations tolerated per client before disconnecting it. Default 10.
    pub max_violations: Option<u32>,
    /// Largest `|value|` a dense update may carry; larger ones are refused
    /// (`OutOfBounds`, a violation) and the round goes on without them.
    /// Default 1000 ([`DEFAULT_MAX_UPDATE_ABS`]); must be finite and positive.
    pub max_update_abs: Option<f32>,
    /// Concurrent QUIC connections, joined or not; more are refused at the
    /// handshake. Bounds the transport's memory (2 MiB receive window
    /// each). Default: the enrolled clients plus `max_pending_connections`,
    /// so that a full pending budget never takes a joined session's room.
    /// At least 1, and at least `min_clients` (or the run could never start).
    pub max_connections: Option<usize>,
    /// Connections still handshaking or connected but not yet joined, the
    /// only ones an unauthenticated peer can hold; joined sessions are
    /// counted apart and never closed to make room. Default: the enrolled
    /// clients plus 16 (every client reconnecting at once, and then some).
    pub max_pending_connections: Option<usize>,
    /// Pending connections from one source (an IPv4 address or an IPv6
    /// /64), so one address can't take the whole pending budget; a source
    /// is counted only after QUIC address validation (Retry), so it can't
    /// be spoofed. Default 8: an honest client holds a pending slot for one
    /// handshake and a join (milliseconds), so even many clients behind one
    /// NAT rarely need more at once, and those refused retry with backoff.
    pub max_pending_per_source: Option<usize>,
    /// Seconds a validated connection has to finish its QUIC/TLS handshake
    /// before it is closed. Default 5: two round trips and a signature, with
    /// room for a lost flight or two on a slow path (quinn retransmits
    /// after ~1 s, then 2 s); a half-open handshake held longer only blocks
    /// a slot. 1 to 60.
    pub handshake_timeout_secs: Option<u64>,
    /// Seconds a new connection has to join before it is closed. Default 10:
    /// a join is one round trip and a signature.
    pub join_timeout_secs: Option<u64>,
    /// Collect the clients' evaluation of the final model. Default true.
    pub final_evaluation: Option<bool>,
    /// Seed of the initial model and client sampling. Default: random.
    pub seed: Option<u64>,
    /// Run id as 32 hex digits. Default: random.
    pub run_id: Option<String>,
    /// File of enrolled client public keys: one hex key per line, `#`
    /// comments. Required.
    pub enrolled_keys: Option<PathBuf>,
    /// Directory for `metrics.jsonl` and `final_model.safetensors`. Default `runs/server`.
    pub out_dir: Option<PathBuf>,
    /// Directory of the durable state (snapshot + write-ahead log). A server
    /// started on a directory holding a run resumes it. Default `<out_dir>/state`.
    pub state_dir: Option<PathBuf>,
    /// Initial parameters (safetensors, or raw little-endian f32 in
    /// canonical order). Default: seeded PyTorch-style initialisation.
    pub initial_model: Option<PathBuf>,
    /// The model. Default: MLP 784-200-200-10.
    pub model: Option<ModelArch>,
    /// Local training. Default lr 0.05, batch 32, 1 epoch.
    pub train: Option<TrainSpec>,
    /// The update kind and its settings: `{ kind = "fedavg" }` (default),
    /// `{ kind = "fedavgm", momentum = 0.9, server_lr = 1.0 }`, `{ kind =
    /// "spsa", steps_per_client = 32, eps = 1e-3, lr = 0.01, batch_size = 64
    /// }` or `{ kind = "frl", ... }` (see `tally_protocol::kind::AlgorithmSpec`;
    /// every field has a default). A supermask model implies `frl`. Seeds
    /// derived from the run (FRL's network, SPSA's directions) follow the
    /// run's seed, also when a saved run is resumed.
    pub algorithm: Option<AlgorithmSpec>,
    /// How a round's updates are combined: `mean` (default) or `median`
    /// (dense kinds only; a kind that can't use the rule is refused).
    pub rule: Option<RuleSpec>,
    /// TLS certificate.
    pub tls: Option<RawTls>,
}

/// TLS settings.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// Generate a self-signed certificate at start and print its SHA-256
    /// fingerprint for clients to pin. Default false.
    pub self_signed: Option<bool>,
}

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// PEM files.
    Files {
        /// Chain.
        cert: PathBuf,
        /// Key.
        key: PathBuf,
    },
    /// Generated at start.
    SelfSigned,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// See [`RawConfig::metrics_listen`].
    pub metrics_listen: Option<SocketAddr>,
    /// Rounds.
    pub rounds: u32,
    /// See [`RawConfig::min_clients`].
    pub min_clients: usize,
    /// See [`RawConfig::clients_per_round`].
    pub clients_per_round: usize,
    /// See [`RawConfig::quorum`].
    pub quorum: usize,
    /// See [`RawConfig::round_timeout_secs`].
    pub round_timeout: Duration,
    /// See [`RawConfig::max_violations`].
    pub max_violations: u32,
    /// See [`RawConfig::max_update_abs`].
    pub max_update_abs: f32,
    /// See [`RawConfig::max_connections`].
    pub max_connections: usize,
    /// See [`RawConfig::max_pending_connections`].
    pub max_pending_connections: usize,
    /// See [`RawConfig::max_pending_per_source`].
    pub max_pending_per_source: usize,
    /// See [`RawConfig::handshake_timeout_secs`].
    pub handshake_timeout: Duration,
    /// See [`RawConfig::join_timeout_secs`].
    pub join_timeout: Duration,
    /// See [`RawConfig::final_evaluation`].
    pub final_evaluation: bool,
    /// Seed (drawn from the OS when not configured).
    pub seed: u64,
    /// Whether the seed was configured (rather than drawn): a resumed run
    /// takes its saved seed, and refuses a configured one that differs.
    pub seed_configured: bool,
    /// Run id.
    pub run_id: RunId,
    /// Whether the run id was configured (as for the seed).
    pub run_id_configured: bool,
    /// Enrolled keys in file order.
    pub enrolled: Vec<PublicKeyBytes>,
    /// Output directory.
    pub out_dir: PathBuf,
    /// Durable state (snapshot + write-ahead log): a restart with the same
    /// directory resumes the run.
    pub state_dir: PathBuf,
    /// Fault injection for crash tests (`TALLY_FAULT`); never set in production.
    pub danger_fault: Option<FaultPoint>,
    /// Crash tests only (`TALLY_INSECURE_NOISE_SEED`): a DP noise seed from
    /// a u64 instead of the OS, so that a crashed run and an uncrashed one
    /// can be compared bit for bit. Never set in production: 64 bits can be
    /// searched, and the noise then protects nothing.
    pub danger_insecure_noise_seed: Option<u64>,
    /// Resume a saved run although its configuration changed (the
    /// `--danger-accept-config-change` flag; never in the config file, so
    /// that it applies to one restart and is not left on by accident).
    /// Changes to the run's identity (seed, run id) are refused even so.
    pub danger_accept_config_change: bool,
    /// Initial model file.
    pub initial_model: Option<PathBuf>,
    /// Model.
    pub arch: ModelArch,
    /// Local training.
    pub train: TrainSpec,
    /// The update kind, resolved against the run's seed when the run starts
    /// ([`ServerConfig::kind_settings`]), so that a resumed run's saved seed
    /// wins.
    pub algorithm: AlgorithmSpec,
    /// The aggregation rule.
    pub rule: RuleSpec,
    /// Certificate source.
    pub tls: TlsSource,
}

impl RawConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        RawConfig::parse(path, &text)
    }

    /// Parses TOML text (`path` only names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    /// Validates, filling defaults. `os_seed` supplies randomness for the
    /// seed and run id when they are not configured.
    pub fn validate(self, os_seed: [u8; 24]) -> Result<ServerConfig, ConfigError> {
        self.validate_with(os_seed, read_enrolled)
    }

    /// [`RawConfig::validate`] with the enrolment file read by `read_keys`
    /// (the fuzz target validates without touching the file system).
    pub fn validate_with(
        self,
        os_seed: [u8; 24],
        read_keys: impl FnOnce(&Path) -> Result<Vec<PublicKeyBytes>, ConfigError>,
    ) -> Result<ServerConfig, ConfigError> {
        let invalid = |s: String| ConfigError::Invalid(s);
        let rounds = self.rounds.unwrap_or(5);
        if rounds == 0 {
            return Err(invalid("rounds must be at least 1".into()));
        }
        let min_clients = self.min_clients.unwrap_or(3);
        let clients_per_round = self.clients_per_round.unwrap_or(min_clients);
        let round_timeout = Duration::from_secs(self.round_timeout_secs.unwrap_or(600));
        // Checked here as well as by the coordinator so the message names the
        // knob; an unbounded value would make `now + timeout` panic.
        if round_timeout.is_zero() || round_timeout > MAX_ROUND_TIMEOUT {
            return Err(invalid(format!("round_timeout_secs must be in 1..={}", MAX_ROUND_TIMEOUT.as_secs())));
        }
        let max_update_abs = self.max_update_abs.unwrap_or(DEFAULT_MAX_UPDATE_ABS);
        if !(max_update_abs.is_finite() && max_update_abs > 0.0) {
            return Err(invalid("max_update_abs must be finite and positive".into()));
        }
        let seed = self.seed.unwrap_or_else(|| u64::from_le_bytes(os_seed[..8].try_into().unwrap_or([0; 8])));
        let run_id = match &self.run_id {
            Some(h) => {
                let b = hex::decode(h).map_err(|e| invalid(format!("run_id: {e}")))?;
                RunId(b.try_into().map_err(|_| invalid("run_id must be 32 hex digits".into()))?)
            }
            None => RunId(os_seed[8..24].try_into().unwrap_or([0; 16])),
        };
        let keys_path = self.enrolled_keys.ok_or_else(|| invalid("enrolled_keys is required".into()))?;
        let enrolled = read_keys(&keys_path)?;
        let arch = self.model.unwrap_or_else(ModelArch::mnist_mlp);
        arch.validate().map_err(|e| invalid(e.to_string()))?;
        let train = self.train.unwrap_or(TrainSpec::sgd(0.05, 32, 1));
        // A supermask model is only ever trained by FRL: implied, as before.
        let algorithm = match (self.algorithm, &arch) {
            (Some(a), _) => a,
            (None, ModelArch::Supermask(_)) => AlgorithmSpec::Frl(Default::default()),
            (None, _) => AlgorithmSpec::Fedavg {},
        };
        let rule = self.rule.unwrap_or_default();
        let quorum = self.quorum.unwrap_or_else(|| default_quorum(clients_per_round, &rule));
        // Checked now with the configured seed, so a bad combination fails
        // at start-up; resolved again with the run's seed when it starts.
        checked_kind(&algorithm, &rule, quorum, seed, &arch)?;
        let max_pending_connections =
            self.max_pending_connections.unwrap_or(enrolled.len().saturating_add(DEFAULT_PENDING_HEADROOM));
        let max_connections = self.max_connections.unwrap_or(enrolled.len().saturating_add(max_pending_connections));
        if max_connections == 0 || max_connections < min_clients.min(enrolled.len()) {
            return Err(invalid(format!(
                "max_connections ({max_connections}) must be at least 1 and at least min_clients ({min_clients}): \
                 with fewer, enrolled clients are refused and the run can never start"
            )));
        }
        if max_pending_connections == 0 {
            return Err(invalid("max_pending_connections must be at least 1: no client could ever connect".into()));
        }
        let max_pending_per_source = self.max_pending_per_source.unwrap_or(DEFAULT_PENDING_PER_SOURCE);
        if max_pending_per_source == 0 {
            return Err(invalid("max_pending_per_source must be at least 1: no client could ever connect".into()));
        }
        let handshake_secs = self.handshake_timeout_secs.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_SECS);
        if !(1..=MAX_HANDSHAKE_TIMEOUT_SECS).contains(&handshake_secs) {
            return Err(invalid(format!("handshake_timeout_secs must be in 1..={MAX_HANDSHAKE_TIMEOUT_SECS}")));
        }
        let tls = match self.tls.unwrap_or_default() {
            RawTls { self_signed: Some(true), cert: None, key: None } => TlsSource::SelfSigned,
            RawTls { self_signed: Some(true), .. } => {
                return Err(invalid("tls: self_signed excludes cert and key".into()));
            }
            RawTls { cert: Some(cert), key: Some(key), .. } => TlsSource::Files { cert, key },
            _ => {
                return Err(invalid("tls: give cert and key files, or self_signed = true (dev mode)".into()));
            }
        };
        Ok(ServerConfig {
            listen: self.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 4433))),
            metrics_listen: self.metrics_listen,
            rounds,
            min_clients,
            clients_per_round,
            quorum,
            round_timeout,
            max_violations: self.max_violations.unwrap_or(10),
            max_update_abs,
            max_connections,
            max_pending_connections,
            max_pending_per_source,
            handshake_timeout: Duration::from_secs(handshake_secs),
            join_timeout: Duration::from_secs(self.join_timeout_secs.unwrap_or(10).clamp(1, 3600)),
            final_evaluation: self.final_evaluation.unwrap_or(true),
            seed,
            seed_configured: self.seed.is_some(),
            run_id,
            run_id_configured: self.run_id.is_some(),
            enrolled,
            state_dir: self
                .state_dir
                .unwrap_or_else(|| self.out_dir.clone().unwrap_or_else(|| PathBuf::from("runs/server")).join("state")),
            danger_fault: None,
            danger_insecure_noise_seed: None,
            danger_accept_config_change: false,
            out_dir: self.out_dir.unwrap_or_else(|| PathBuf::from("runs/server")),
            initial_model: self.initial_model,
            arch,
            train,
            algorithm,
            rule,
            tls,
        })
    }
}

impl ServerConfig {
    /// The run's kind settings for the run seed `seed` (the configured one,
    /// or a resumed run's saved one), with the rule checked.
    pub fn kind_settings(&self, seed: u64) -> Result<KindSettings, ConfigError> {
        checked_kind(&self.algorithm, &self.rule, self.quorum, seed, &self.arch)
    }
}

/// What defines a run and must not change when it is resumed: saved in the
/// state directory (`run.json`) when the run starts and compared on every
/// restart. A resumed run used to ignore another `--seed` silently and apply
/// another `--lr` mid-run. Operational settings are not in it and may change
/// across a restart: listen addresses, TLS, connection limits, join and round
/// timeouts, the violation limit, output directory, and the initial model
/// (only read when a run starts). The enrolment list is checked by the
/// snapshot itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRecord {
    /// The run id, 32 hex digits.
    pub run_id: String,
    /// The run's seed.
    pub seed: u64,
    /// See [`RawConfig::rounds`].
    pub rounds: u32,
    /// See [`RawConfig::min_clients`].
    pub min_clients: usize,
    /// See [`RawConfig::clients_per_round`].
    pub clients_per_round: usize,
    /// See [`RawConfig::quorum`].
    pub quorum: usize,
    /// See [`RawConfig::final_evaluation`].
    pub final_evaluation: bool,
    /// The model.
    pub model: ModelArch,
    /// Local training.
    pub train: TrainSpec,
    /// The update kind and its settings.
    pub algorithm: AlgorithmSpec,
    /// The aggregation rule.
    pub rule: RuleSpec,
}

/// Settings that make a run what it is: a change is refused even with
/// `--danger-accept-config-change` (the coordinator restores them from the
/// snapshot; a "changed" seed would be silently ignored).
pub const IDENTITY_SETTINGS: &[&str] = &["run_id", "seed"];

impl RunRecord {
    /// The record of `config`.
    pub fn of(config: &ServerConfig) -> RunRecord {
        RunRecord {
            run_id: hex::encode(config.run_id.0),
            seed: config.seed,
            rounds: config.rounds,
            min_clients: config.min_clients,
            clients_per_round: config.clients_per_round,
            quorum: config.quorum,
            final_evaluation: config.final_evaluation,
            model: config.arch.clone(),
            train: config.train.clone(),
            algorithm: config.algorithm.clone(),
            rule: config.rule,
        }
    }

    /// As saved (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.json().to_string().into_bytes();
        out.push(b'\n');
        out
    }

    /// Reads a saved record.
    pub fn from_bytes(bytes: &[u8]) -> Result<RunRecord, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    /// The run id as saved.
    pub fn run_id(&self) -> Result<RunId, String> {
        let b = hex::decode(&self.run_id).map_err(|e| format!("run_id: {e}"))?;
        Ok(RunId(b.try_into().map_err(|_| "run_id must be 32 hex digits".to_string())?))
    }

    // Through text, so that an f32 compares and prints as written (0.05,
    // not the f64 widening 0.05000000074505806).
    fn json(&self) -> serde_json::Value {
        serde_json::to_string(self).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
    }

    /// What differs from the `saved` record, one `setting: saved X, now Y`
    /// per changed leaf (nested settings by dotted path), in alphabetical order.
    pub fn changes_from(&self, saved: &RunRecord) -> Vec<Change> {
        let mut out = Vec::new();
        diff("", &saved.json(), &self.json(), &mut out);
        out
    }
}

/// One setting that differs between a saved run and the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its dotted path (`train.lr`).
    pub setting: String,
    /// As saved (`(none)` if absent).
    pub saved: String,
    /// As configured now.
    pub now: String,
}

impl Change {
    /// Whether it changes the run's identity ([`IDENTITY_SETTINGS`]).
    pub fn is_identity(&self) -> bool {
        IDENTITY_SETTINGS.contains(&self.setting.as_str())
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: saved {}, now {}", self.setting, self.saved, self.now)
    }
}

fn diff(path: &str, saved: &serde_json::Value, now: &serde_json::Value, out: &mut Vec<Change>) {
    use serde_json::Value;
    let show = |v: Option<&Value>| v.map_or_else(|| "(none)".to_string(), Value::to_string);
    match (saved, now) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: Vec<&String> = a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))).collect();
            for k in keys {
                let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff(&sub, x, y, out),
                    (x, y) => out.push(Change { setting: sub, saved: show(x), now: show(y) }),
                }
            }
        }
        (a, b) if a != b => out.push(Change { setting: path.to_string(), saved: show(Some(a)), now: show(Some(b)) }),
        _ => {}
    }
}

/// Resolves `algorithm` for a run seeded `seed` and checks it takes `rule`.
fn checked_kind(
    algorithm: &AlgorithmSpec,
    rule: &RuleSpec,
    quorum: usize,
    seed: u64,
    arch: &ModelArch,
) -> Result<KindSettings, ConfigError> {
    rule.check_round_size(quorum).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let settings = algorithm.resolve(seed, arch).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let kind = settings.build(arch).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    tally_protocol::kind::check_rule(kind.as_ref(), rule).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    Ok(settings)
}

/// Reads an enrolment file: one hex public key per line; text after `#` and
/// blank lines are ignored.
pub fn read_enrolled(path: &Path) -> Result<Vec<PublicKeyBytes>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
    parse_enrolled(path, &text)
}

/// Parses the text of an enrolment file (`path` only names it in errors).
pub fn parse_enrolled(path: &Path, text: &str) -> Result<Vec<PublicKeyBytes>, ConfigError> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let key = tally_protocol::identity::parse_public_key(line)
            .map_err(|e| ConfigError::Invalid(format!("{}:{}: {e}", path.display(), i + 1)))?;
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(ConfigError::Invalid(format!("{}: no keys", path.display())));
    }
    Ok(keys)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let id = tally_protocol::Identity::from_secret([3; 32]);
        std::fs::write(&keys, format!("# clients\n{}  # alice\n\n", id.public_key())).unwrap();
        let raw: RawConfig = toml::from_str(&format!(
            "enrolled_keys = {:?}\nrounds = 2\n[tls]\nself_signed = true\n[model]\nkind = \"lenet5\"\nclasses = 10\n",
            keys
        ))
        .unwrap();
        let cfg = raw.validate([1; 24]).unwrap();
        assert_eq!(cfg.enrolled, vec![id.public_key()]);
        // Three sampled (min_clients), two close a round: over-selection.
        assert_eq!((cfg.clients_per_round, cfg.quorum), (3, 2));
        assert_eq!(cfg.arch, ModelArch::LeNet5 { classes: 10 });
        assert!(toml::from_str::<RawConfig>("bogus = 1").is_err());
        std::fs::write(&keys, "nothex\n").unwrap();
        let raw = RawConfig { enrolled_keys: Some(keys), ..Default::default() };
        assert!(matches!(raw.validate([0; 24]), Err(ConfigError::Invalid(_))));
    }

    /// The configuration files shipped in deploy/ stay valid.
    #[test]
    fn the_deployment_configs_parse() {
        for text in [
            include_str!("../../deploy/k8s/base/server.toml"),
            include_str!("../../deploy/k8s/overlays/edge/server.toml"),
        ] {
            let raw: RawConfig = toml::from_str(text).unwrap();
            assert!(raw.enrolled_keys.is_some() && raw.tls.is_some() && raw.state_dir.is_some());
        }
    }

    #[test]
    fn round_timeout_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, format!("{}\n", tally_protocol::Identity::from_secret([3; 32]).public_key())).unwrap();
        let raw = |secs: u64| RawConfig {
            enrolled_keys: Some(keys.clone()),
            round_timeout_secs: Some(secs),
            min_clients: Some(1),
            tls: Some(RawTls { self_signed: Some(true), ..Default::default() }),
            ..Default::default()
        };
        // u64::MAX seconds used to pass validation and panic at the first
        // round's deadline (`Instant + Duration` overflow).
        for secs in [0, MAX_ROUND_TIMEOUT.as_secs() + 1, u64::MAX] {
            assert!(
                matches!(raw(secs).validate([0; 24]), Err(ConfigError::Invalid(m)) if m.contains("round_timeout_secs"))
            );
        }
        assert_eq!(raw(MAX_ROUND_TIMEOUT.as_secs()).validate([0; 24]).unwrap().round_timeout, MAX_ROUND_TIMEOUT);
    }

    /// Issue 10: a restart with another `--seed` was silently ignored and
    /// another `--lr` silently applied mid-run. The saved record names every
    /// changed setting, with both values as written.
    #[test]
    fn a_changed_run_configuration_is_named_setting_by_setting() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, format!("{}\n", tally_protocol::Identity::from_secret([3; 32]).public_key())).unwrap();
        let parse = |extra: &str| {
            let text = format!("enrolled_keys = {keys:?}\nmin_clients = 1\n{extra}\n[tls]\nself_signed = true\n");
            RawConfig::parse(Path::new("t.toml"), &text).unwrap().validate([4; 24]).unwrap()
        };
        let base = parse("seed = 9\nrounds = 10\ntrain = { lr = 0.05, batch_size = 32, epochs = 1 }");
        let saved = RunRecord::from_bytes(&RunRecord::of(&base).to_bytes()).unwrap();
        assert_eq!(saved, RunRecord::of(&base));
        assert_eq!(saved.run_id().unwrap(), base.run_id);
        assert!(base.seed_configured && !base.run_id_configured);
        // The same settings, and operational ones changed: no change.
        let same = parse(
            "seed = 9\nrounds = 10\nround_timeout_secs = 5\nmax_connections = 3\ntrain = { lr = 0.05, batch_size = 32, epochs = 1 }",
        );
        assert_eq!(RunRecord::of(&same).changes_from(&saved), vec![]);
        let changed = parse(
            "seed = 10\nrounds = 12\nquorum = 1\nrule = \"median\"\ntrain = { lr = 0.1, batch_size = 32, epochs = 1 }\n\
             algorithm = { kind = \"fedavgm\", momentum = 0.5 }",
        );
        let changes: Vec<String> =
            RunRecord::of(&changed).changes_from(&saved).iter().map(ToString::to_string).collect();
        assert_eq!(
            changes,
            [
                "algorithm.kind: saved \"fedavg\", now \"fedavgm\"",
                "algorithm.momentum: saved (none), now 0.5",
                "algorithm.server_lr: saved (none), now 1.0",
                "rounds: saved 10, now 12",
                "rule: saved \"mean\", now \"median\"",
                "seed: saved 9, now 10",
                "train.lr: saved 0.05, now 0.1",
            ],
            "{changes:#?}"
        );
        let identity: Vec<bool> =
            RunRecord::of(&changed).changes_from(&saved).iter().map(Change::is_identity).collect();
        assert_eq!(identity, [false, false, false, false, false, true, false]);
        // A record that is not one is refused, not guessed at.
        assert!(RunRecord::from_bytes(b"{\"seed\": 1}").is_err());
    }

    #[test]
    fn admission_knobs_are_validated_and_default_from_the_enrolment() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let ids: String =
            (1..=3u8).map(|i| format!("{}\n", tally_protocol::Identity::from_secret([i; 32]).public_key())).collect();
        std::fs::write(&keys, ids).unwrap();
        let parse = |extra: &str| {
            let text = format!("enrolled_keys = {keys:?}\n{extra}\n[tls]\nself_signed = true\n");
            RawConfig::parse(Path::new("t.toml"), &text).unwrap().validate([0; 24])
        };
        let cfg = parse("").unwrap();
        // 3 enrolled: pending 3 + 16, total 3 + 19 (the old 2 × 3 + 16).
        assert_eq!((cfg.max_pending_connections, cfg.max_connections), (19, 22));
        assert_eq!(cfg.max_pending_per_source, DEFAULT_PENDING_PER_SOURCE);
        assert_eq!(cfg.handshake_timeout, Duration::from_secs(DEFAULT_HANDSHAKE_TIMEOUT_SECS));
        let cfg = parse("max_pending_connections = 5").unwrap();
        assert_eq!((cfg.max_pending_connections, cfg.max_connections), (5, 8));
        // Issue 10: `--max-connections 0` was accepted, and every client refused.
        for bad in [
            "max_connections = 0",
            "max_connections = 2", // below min_clients (3): the run could never start
            "max_pending_connections = 0",
            "max_pending_per_source = 0",
            "handshake_timeout_secs = 0",
            "handshake_timeout_secs = 61",
        ] {
            let knob = bad.split(' ').next().unwrap();
            assert!(
                matches!(parse(bad), Err(ConfigError::Invalid(m)) if m.contains(knob)),
                "{bad} should be refused naming {knob}"
            );
        }
        assert_eq!(parse("max_connections = 3").unwrap().max_connections, 3);
    }

    #[test]
    fn kind_and_rule_are_chosen_independently() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, format!("{}\n", tally_protocol::Identity::from_secret([3; 32]).public_key())).unwrap();
        let parse = |extra: &str| {
            let text =
                format!("enrolled_keys = {keys:?}\nmin_clients = 1\nseed = 9\n{extra}\n[tls]\nself_signed = true\n");
            RawConfig::parse(Path::new("t.toml"), &text).unwrap().validate([0; 24])
        };
        // FedAvg deltas combined by a median: the two axes are independent.
        let cfg = parse("rule = \"median\"").unwrap();
        assert_eq!((cfg.kind_settings(9).unwrap(), cfg.rule), (KindSettings::FedAvg, RuleSpec::Median));
        let cfg = parse("rule = \"median\"\n[algorithm]\nkind = \"fedavgm\"\nmomentum = 0.5").unwrap();
        assert!(matches!(cfg.kind_settings(9).unwrap(), KindSettings::FedAvgM(m) if m.momentum == 0.5));
        // SPSA's directions follow the run seed it is resolved with (a
        // resumed run's saved seed), unless the config names one.
        let cfg = parse("algorithm = { kind = \"spsa\" }").unwrap();
        assert!(matches!(cfg.kind_settings(11).unwrap(), KindSettings::Spsa(z) if z.stream_seed == 11));
        // A kind that can't use the rule is refused with a message naming both.
        let err = parse("rule = \"median\"\nalgorithm = { kind = \"spsa\" }").unwrap_err().to_string();
        assert!(err.contains("spsa") && err.contains("median") && err.contains("supports: mean"), "{err}");
        // A supermask model implies FRL; FRL needs one.
        let cfg =
            parse("model = { kind = \"supermask\", net = \"conv2\", channels = 1, side = 2, classes = 2 }").unwrap();
        assert!(matches!(cfg.kind_settings(9).unwrap(), KindSettings::Frl(r) if r.seed == 9));
        assert!(parse("algorithm = { kind = \"frl\" }").unwrap_err().to_string().contains("supermask"));
        // DP-FTRL: the budget and horizon from the file; median refused; no
        // horizon refused with the setting named.
        let cfg = parse("[algorithm]\nkind = \"dp-ftrl\"\nepsilon = 2.0\nhorizon = 20\nclip_norm = 0.5").unwrap();
        assert!(
            matches!(cfg.kind_settings(9).unwrap(), KindSettings::DpFtrl(d) if d.horizon == 20 && d.clip_norm == 0.5)
        );
        let err = parse("algorithm = { kind = \"dp-ftrl\", epsilon = 2.0 }").unwrap_err().to_string();
        assert!(err.contains("horizon"), "{err}");
        assert!(parse("rule = \"median\"\nalgorithm = { kind = \"dp-ftrl\", rho = 0.1, horizon = 5 }").is_err());
        // Private FRL: a supermask model, the budget, horizon, threshold and
        // FRL's settings from the file; a dense model or no horizon refused.
        let sm = "model = { kind = \"supermask\", net = \"conv2\", channels = 1, side = 2, classes = 2 }\n";
        let cfg = parse(&format!(
            "{sm}algorithm = {{ kind = \"frl-dp\", epsilon = 4.0, horizon = 7, threshold = 5, frl = {{ mask = \"one-sided-top-k\" }} }}"
        ))
        .unwrap();
        assert!(matches!(cfg.kind_settings(9).unwrap(), KindSettings::FrlDp(d)
            if d.horizon == 7 && d.threshold == Some(5) && d.run.seed == 9
                && d.run.vote.mask == tally_protocol::frl::MaskRule::OneSidedTopK));
        assert!(parse("algorithm = { kind = \"frl-dp\", epsilon = 4.0, horizon = 7 }").is_err());
        let err = parse(&format!("{sm}algorithm = {{ kind = \"frl-dp\", epsilon = 4.0 }}")).unwrap_err().to_string();
        assert!(err.contains("horizon"), "{err}");
        let unknown = RawConfig::parse(Path::new("t.toml"), "algorithm = { kind = \"nope\" }").unwrap_err();
        assert!(unknown.to_string().contains("expected one of `fedavg`, `fedavgm`, `spsa`, `frl`"), "{unknown}");
    }

    /// A sequential description is checked at start-up, without burn: a
    /// good one gives its parameter count, a bad one a message naming the
    /// layer and the field; FRL can't train one.
    #[test]
    fn sequential_models_are_checked_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, format!("{}\n", tally_protocol::Identity::from_secret([3; 32]).public_key())).unwrap();
        let parse = |extra: &str| {
            let text =
                format!("enrolled_keys = {keys:?}\nmin_clients = 1\nseed = 9\n{extra}\n[tls]\nself_signed = true\n");
            RawConfig::parse(Path::new("t.toml"), &text).unwrap().validate([0; 24])
        };
        let ok = "[model]\nkind = \"sequential\"\ninput = [1, 28, 28]\nlayers = [\n\
                  { type = \"conv2d\", out = 4, kernel = 5 }, { type = \"relu\" },\n\
                  { type = \"flatten\" }, { type = \"linear\", out = 10 } ]\n";
        let cfg = parse(ok).unwrap();
        assert_eq!(cfg.arch.num_params(), 4 * 25 + 4 + 10 * 4 * 24 * 24 + 10);
        let err = parse(&ok.replace("kernel = 5", "kernel = 29")).unwrap_err().to_string();
        assert!(err.contains("layer 0 (conv2d), field kernel"), "{err}");
        let err = parse(&ok.replace("{ type = \"flatten\" }, ", "")).unwrap_err().to_string();
        assert!(err.contains("layer 2 (linear)"), "{err}");
        assert!(parse(&format!("algorithm = {{ kind = \"frl\" }}\n{ok}")).is_err());
    }
}

/// Where a crash test makes the server abort (`TALLY_FAULT=<point>:<n>`),
/// as `kill -9` would: no destructors, no flushing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Right after round `n` opened and was logged, before any client hears of it.
    Opened(u32),
    /// Right after the `n`-th accepted report is durable, before its Ack is sent.
    Accepted(u32),
    /// Right after the `nth` report of round `round` accepted by this
    /// process is durable, before its Ack is sent (`report:<round>/<nth>`):
    /// a point in a given round, for crash tests that draw several.
    Report {
        /// The round.
        round: u32,
        /// Which of its reports (1-based), counting this process's only.
        nth: u32,
    },
    /// Right after round `n` closed (snapshot written), before the next round's messages go out.
    Closed(u32),
}

impl std::str::FromStr for FaultPoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, n) = s.split_once(':').ok_or("expected <opened|accepted|closed>:<n> or report:<round>/<n>")?;
        let num = |t: &str| t.parse::<u32>().map_err(|e| format!("{s}: {e}"));
        match kind {
            "opened" => Ok(FaultPoint::Opened(num(n)?)),
            "accepted" => Ok(FaultPoint::Accepted(num(n)?)),
            "closed" => Ok(FaultPoint::Closed(num(n)?)),
            "report" => {
                let (round, nth) = n.split_once('/').ok_or_else(|| format!("{s}: expected report:<round>/<n>"))?;
                Ok(FaultPoint::Report { round: num(round)?, nth: num(nth)? })
            }
            _ => Err(format!("unknown fault point {kind:?}")),
        }
    }
}
