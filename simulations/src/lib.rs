//! `tally-sim`: many federated clients in one process.
//!
//! The simulator drives the *same* state machines as the real system — one
//! [`Coordinator`] and one [`Participant`] per client, exchanging the same
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

pub mod scenario;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2_free::hash_seed;
use tally_kernels::data::{self, Split};
use tally_kernels::{Dataset, Device};
use tally_protocol::frl::{FrlVote, Ranking};
use tally_protocol::wire::{ClientUpdate, RunConfig, RunId, Task, UpdatePayload};
use tally_protocol::{
    ConnectionHandle, Coordinator, CoordinatorConfig, Event, FedAvg, Identity, Participant, ParticipantEvent,
};

pub use scenario::{
    Algorithm, AttackSpec, FrlSpec, NetworkSpec, PartitionFault, PartitionSpec, Scenario, ScenarioError,
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
    /// The protocol refused the setup or a message it should have accepted.
    #[error("protocol: {0}")]
    Protocol(String),
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
    /// The scenario seed.
    pub seed: u64,
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

/// Tiny deterministic seed derivation without a hash dependency.
mod sha2_free {
    /// SplitMix64 finaliser over `(seed, tag, index)`: derives independent
    /// sub-seeds (identities, network draws) from the scenario seed.
    pub fn hash_seed(seed: u64, tag: u64, index: u64) -> u64 {
        tally_protocol::rng::splitmix64(
            seed ^ tag.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )
    }
}

/// Deadline extensions of one round after which the simulator reports a
/// stall (the quorum cannot be met by the clients it has).
const MAX_EXTENSIONS_PER_ROUND: u32 = 100;

const TAG_IDENTITY: u64 = 1;
const TAG_DROPOUT: u64 = 2;
const TAG_STRAGGLER: u64 = 3;
const TAG_RUN: u64 = 4;
const TAG_CHALLENGE: u64 = 5;
const TAG_ATTACK: u64 = 6;

/// The identity of simulated client `i`: a secret derived from the seed.
pub fn sim_identity(seed: u64, i: usize) -> Identity {
    let mut secret = [0u8; 32];
    for (k, chunk) in secret.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&hash_seed(seed, TAG_IDENTITY, (i as u64) << 2 | k as u64).to_le_bytes());
    }
    Identity::from_secret(secret)
}

fn unit(seed: u64, tag: u64, index: u64) -> f64 {
    (hash_seed(seed, tag, index) >> 11) as f64 / (1u64 << 53) as f64
}

/// Loads the scenario's dataset.
pub fn load_data(spec: &str) -> Result<Split, SimError> {
    if spec == "embedded" {
        return Ok(data::embedded_mnist());
    }
    Ok(data::load_mnist_dir(std::path::Path::new(spec))?)
}

/// Splits the training set per the scenario.
pub fn partition(s: &Scenario, train: &Dataset) -> Result<Vec<Vec<usize>>, SimError> {
    let parts = match &s.partition {
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

enum Delivery {
    Connect(usize),
    ToServer(usize, Vec<u8>),
    ToClient(usize, Arc<[u8]>),
}

struct Queued {
    at: Duration,
    seq: u64,
    what: Delivery,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

struct Job {
    slot: usize,
    round: u32,
    seed: u64,
    model: Vec<f32>,
}

/// Runs a scenario. `on_record` sees each metrics line as it is produced
/// (the binary writes it out and advances its progress bar).
pub fn run(
    scenario: &Scenario,
    device: &Device,
    on_record: &mut dyn FnMut(&RoundRecord),
) -> Result<SimReport, SimError> {
    scenario.validate()?;
    let split = load_data(&scenario.data)?;
    run_on(scenario, &split, device, on_record)
}

/// Runs a scenario on already loaded data.
pub fn run_on(
    s: &Scenario,
    split: &Split,
    device: &Device,
    on_record: &mut dyn FnMut(&RoundRecord),
) -> Result<SimReport, SimError> {
    s.validate()?;
    let arch = s.model.clone();
    let train = match s.train_range {
        Some([a, b]) => {
            let b = b.min(split.train.len());
            split.train.subset(&(a.min(b)..b).collect::<Vec<_>>())?
        }
        None => split.train.clone(),
    };
    let parts = partition(s, &train)?;
    let shards: Vec<Dataset> = parts.iter().map(|p| train.subset(p)).collect::<Result<_, _>>()?;
    let schedule = s.schedule.as_ref().map(|p| scenario::read_schedule(p, s.clients)).transpose()?;
    let initial = match &s.initial_model {
        Some(p) => tally_kernels::params_file::load_params(p, &arch)?,
        None => arch.init_params(s.seed),
    };
    let identities: Vec<Identity> = (0..s.clients).map(|i| sim_identity(s.seed, i)).collect();
    let mut run_id = [0u8; 16];
    run_id[..8].copy_from_slice(&hash_seed(s.seed, TAG_RUN, 0).to_le_bytes());
    run_id[8..].copy_from_slice(&hash_seed(s.seed, TAG_RUN, 1).to_le_bytes());
    let config = CoordinatorConfig {
        run_id: RunId(run_id),
        arch: arch.clone(),
        rounds: s.rounds,
        enrolled: identities.iter().map(Identity::public_key).collect(),
        min_clients: s.clients,
        clients_per_round: s.clients_per_round,
        quorum: s.quorum.unwrap_or(s.clients_per_round),
        round_timeout: Duration::from_secs(s.round_timeout_secs),
        train: s.train.clone(),
        max_violations: 10,
        schedule,
        final_evaluation: false,
    };
    let aggregator: Box<dyn tally_protocol::Aggregator> = match (s.spsa_config(), s.frl_run()) {
        (Some(z), _) => Box::new(tally_protocol::spsa::Spsa::new(z)),
        (None, Some(run)) => {
            Box::new(FrlVote::for_run(run, &arch).map_err(|e| SimError::Protocol(format!("frl: {e}")))?)
        }
        (None, None) => Box::new(FedAvg::new()),
    };
    let mut coord =
        Coordinator::new(config, aggregator, initial, s.seed).map_err(|e| SimError::Protocol(e.to_string()))?;
    let run_config = coord.run_config();
    // One copy of FRL's sorted initial scores for every simulated client.
    let frl_cache = Arc::new(tally_protocol::frl::ReferenceCache::default());
    let mut clients: Vec<Participant> =
        identities.into_iter().map(|id| Participant::new(id, None).with_frl_cache(frl_cache.clone())).collect();
    let malicious = s.attack.as_ref().map_or(0, |a| a.malicious(s.clients));
    let threads = match s.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut malicious_sampled = std::collections::BTreeMap::new();
    let stragglers: Vec<bool> =
        (0..s.clients).map(|i| unit(s.seed, TAG_STRAGGLER, i as u64) < s.network.straggler_fraction).collect();

    let t0 = Instant::now();
    let mut now = Duration::ZERO;
    let mut queue: BinaryHeap<Reverse<Queued>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |queue: &mut BinaryHeap<Reverse<Queued>>, at: Duration, what: Delivery| {
        seq += 1;
        queue.push(Reverse(Queued { at, seq, what }));
    };
    let net = &s.network;
    // Virtual-time arithmetic is checked: `Duration::from_secs_f64`,
    // `Duration + Duration` and `Instant + Duration` panic on overflow. The
    // scenario's bounds keep each step small; these keep an arbitrarily long
    // run from panicking.
    let clock = |now: Duration| t0.checked_add(now).ok_or(SimError::VirtualTime("past the end of Instant"));
    let secs = |x: f64| Duration::try_from_secs_f64(x).map_err(|_| SimError::VirtualTime("duration out of range"));
    let after = |now: Duration, d: Duration| now.checked_add(d).ok_or(SimError::VirtualTime("event time overflow"));
    // Each client has a link each way that carries one message at a time, so
    // messages on a connection arrive in order (as on a QUIC connection whose
    // streams the receiver reads in order): a message starts when it is ready
    // and the link is free, takes size / bandwidth, then the latency.
    let latency = Duration::from_millis(net.latency_ms);
    // A partition loses every message that would arrive at or from a cut-off
    // client while it lasts (the sender doesn't know; QUIC would retransmit
    // into the void and the protocol's deadlines take over).
    let cut = |slot: usize, at: Duration| {
        net.partition.as_ref().is_some_and(|p| {
            let cut_off = ((p.fraction * s.clients as f64) as usize).min(s.clients);
            slot < cut_off && (p.from_secs..p.to_secs).contains(&at.as_secs_f64())
        })
    };
    let mut up_free = vec![Duration::ZERO; s.clients];
    let mut down_free = vec![Duration::ZERO; s.clients];
    let send = |free: &mut Duration, ready: Duration, bytes: usize| -> Result<Duration, SimError> {
        let start = ready.max(*free);
        *free = after(start, secs(bytes as f64 * 8.0 / (net.bandwidth_mbps * 1e6))?)?;
        after(*free, latency)
    };
    for i in 0..s.clients {
        push(&mut queue, Duration::ZERO, Delivery::Connect(i));
    }

    let mut records = Vec::new();
    let mut wall_rounds = Vec::new();
    let mut wall_eval = Vec::new();
    let (mut bytes_up, mut bytes_down) = (0u64, 0u64);
    let mut jobs: Vec<Job> = Vec::new();
    let mut round_wall = std::time::Instant::now();
    let mut finished = false;
    let mut extensions = 0u32;
    let mut diverged_at = None;
    let mut dropped = 0u64;

    // Round 0: the initial model.
    let e = tally_kernels::update::evaluate_run(&run_config, coord.model(), &split.test, device, 1000)?;
    let r0 = RoundRecord {
        round: 0,
        sampled: 0,
        accepted: 0,
        rejected: 0,
        samples: 0,
        train_loss: None,
        test_accuracy: Some(e.accuracy()),
        test_loss: Some(e.mean_loss()),
        bytes_up: 0,
        bytes_down: 0,
        virtual_secs: 0.0,
        model_hash: hex::encode(tally_protocol::identity::params_hash(coord.model())),
        malicious: s.attack.as_ref().map(|_| 0),
        seed: s.seed,
    };
    on_record(&r0);
    records.push(r0);

    while !finished {
        // Run local training for tasks that arrived at `now` once every
        // message of this instant is delivered.
        if !jobs.is_empty() && queue.peek().is_none_or(|q| q.0.at > now) {
            let batch: Vec<Job> = jobs
                .drain(..)
                // Dropped clients silently leave this round.
                .filter(|job| unit(s.seed, TAG_DROPOUT, u64::from(job.round) << 32 | job.slot as u64) >= net.dropout)
                .collect();
            let updates = match round_updates(s, &run_config, &batch, &shards, malicious, threads, device) {
                Err(SimError::Kernel(tally_kernels::KernelError::Diverged { .. })) => {
                    diverged_at = batch.first().map(|j| j.round);
                    break;
                }
                other => other?,
            };
            for (job, update) in batch.iter().zip(updates) {
                let slow = if stragglers[job.slot] { net.straggler_slowdown } else { 1.0 };
                // Virtual compute: examples processed (an SPSA step is two
                // forward passes, counted as one training example each).
                let work = match &run_config.spsa {
                    Some(z) => f64::from(z.steps_per_client) * f64::from(z.batch_size),
                    None => shards[job.slot].len() as f64 * f64::from(s.train.epochs),
                };
                let compute = secs(work * net.compute_us_per_sample * 1e-6 * slow)?;
                clients[job.slot]
                    .submit(clock(now)?, None, Some(update))
                    .map_err(|e| SimError::Protocol(e.to_string()))?;
                while let Some(frame) = clients[job.slot].poll_transmit() {
                    let at = send(&mut up_free[job.slot], after(now, compute)?, frame.len())?;
                    push(&mut queue, at, Delivery::ToServer(job.slot, frame));
                }
            }
            continue;
        }
        let timeout = coord.poll_timeout().map(|t| t.saturating_duration_since(t0));
        let next = queue.peek().map(|q| q.0.at);
        match (next, timeout) {
            (None, None) => return Err(SimError::Stalled(coord.completed_rounds().saturating_add(1))),
            (Some(n), Some(t)) if t < n => {
                now = t;
                coord.handle_timeout(clock(now)?);
            }
            (None, Some(t)) => {
                now = t;
                coord.handle_timeout(clock(now)?);
            }
            (Some(_), _) => {
                let Some(Reverse(q)) = queue.pop() else { continue };
                now = q.at;
                match q.what {
                    Delivery::Connect(i) => {
                        let mut challenge = [0u8; 32];
                        for (k, chunk) in challenge.chunks_mut(8).enumerate() {
                            chunk.copy_from_slice(
                                &hash_seed(s.seed, TAG_CHALLENGE, (i as u64) << 2 | k as u64).to_le_bytes(),
                            );
                        }
                        coord.handle_connect(clock(now)?, ConnectionHandle(i as u64), challenge)
                    }
                    Delivery::ToServer(i, _) | Delivery::ToClient(i, _) if cut(i, now) => {
                        dropped = dropped.saturating_add(1);
                    }
                    Delivery::ToServer(i, bytes) => {
                        bytes_up += bytes.len() as u64;
                        // Refusals are counted in the round summary.
                        let _ = coord.handle_message(clock(now)?, ConnectionHandle(i as u64), &bytes);
                    }
                    Delivery::ToClient(i, bytes) => {
                        bytes_down += bytes.len() as u64;
                        // `i` is a connection handle the coordinator got from us
                        // (one per client); a stray one is a protocol bug.
                        let p = clients
                            .get_mut(i)
                            .ok_or_else(|| SimError::Protocol(format!("message for unknown connection {i}")))?;
                        p.handle_message(clock(now)?, &bytes).map_err(|e| SimError::Protocol(e.to_string()))?;
                        while let Some(ev) = p.poll_event() {
                            if let ParticipantEvent::TaskRequested { round, task: Task::Train, seed, model } = ev {
                                jobs.push(Job { slot: i, round, seed, model });
                            }
                        }
                        while let Some(frame) = p.poll_transmit() {
                            let at = send(&mut up_free[i], now, frame.len())?;
                            push(&mut queue, at, Delivery::ToServer(i, frame));
                        }
                    }
                }
            }
        }
        while let Some(t) = coord.poll_transmit() {
            let link = down_free
                .get_mut(t.to.0 as usize)
                .ok_or_else(|| SimError::Protocol(format!("message for unknown connection {}", t.to.0)))?;
            let at = send(link, now, t.bytes.len())?;
            push(&mut queue, at, Delivery::ToClient(t.to.0 as usize, t.bytes));
        }
        while let Some(event) = coord.poll_event() {
            match event {
                Event::RoundCompleted(summary) => {
                    extensions = 0;
                    wall_rounds.push(round_wall.elapsed().as_secs_f64());
                    // Attacked runs are evaluated every round: a collapse shows
                    // in the round it happens.
                    let evaluate = summary.round % s.eval_every == 0
                        || summary.round == s.rounds
                        || (malicious > 0 && s.attack.as_ref().is_some_and(|a| matches!(a, AttackSpec::Scale { .. })));
                    let (acc, loss) = if evaluate {
                        let t = std::time::Instant::now();
                        let e =
                            tally_kernels::update::evaluate_run(&run_config, coord.model(), &split.test, device, 1000)?;
                        wall_eval.push(t.elapsed().as_secs_f64());
                        (Some(e.accuracy()), Some(e.mean_loss()))
                    } else {
                        (None, None)
                    };
                    let rec = RoundRecord {
                        round: summary.round,
                        sampled: summary.sampled,
                        accepted: summary.accepted,
                        rejected: summary.rejected,
                        samples: summary.stats.as_ref().map_or(0, |s| s.samples),
                        train_loss: summary.stats.as_ref().map(|s| s.train_loss),
                        test_accuracy: acc,
                        test_loss: loss,
                        bytes_up,
                        bytes_down,
                        virtual_secs: now.as_secs_f64(),
                        model_hash: hex::encode(summary.model_hash),
                        malicious: s.attack.as_ref().map(|_| malicious_sampled.remove(&summary.round).unwrap_or(0)),
                        seed: s.seed,
                    };
                    bytes_up = 0;
                    bytes_down = 0;
                    on_record(&rec);
                    records.push(rec);
                    round_wall = std::time::Instant::now();
                }
                Event::RoundExtended { round, .. } => {
                    extensions += 1;
                    // Every joined client was asked and the quorum is still out
                    // of reach: virtual time would advance forever.
                    if extensions > MAX_EXTENSIONS_PER_ROUND {
                        return Err(SimError::Stalled(round));
                    }
                }
                Event::RoundOpened { round, sampled, .. } => {
                    malicious_sampled.insert(round, sampled.iter().filter(|&&c| (c as usize) < malicious).count());
                }
                Event::Finished { .. } => finished = true,
                _ => {}
            }
        }
    }
    Ok(SimReport {
        records,
        final_model: coord.model().to_vec(),
        wall_secs_per_round: wall_rounds,
        wall_secs_eval: wall_eval,
        diverged_at,
        dropped_messages: dropped,
    })
}

/// The updates of a batch of jobs (tasks that arrived at the same virtual
/// instant), in job order: honest clients train locally (on `threads`
/// workers), malicious ones send what the scenario's attack crafts.
fn round_updates(
    s: &Scenario,
    run: &RunConfig,
    batch: &[Job],
    shards: &[Dataset],
    malicious: usize,
    threads: usize,
    device: &Device,
) -> Result<Vec<ClientUpdate>, SimError> {
    let train = |slot: usize, job: &Job| {
        tally_kernels::update::local_update(run, slot as u32, job.round, job.seed, &job.model, &shards[slot], device)
    };
    let honest: Vec<&Job> = batch.iter().filter(|j| j.slot >= malicious).collect();
    let mut trained = par_map(threads, &honest, |job| train(job.slot, job))?.into_iter();
    // One crafted payload per round, shared by that round's malicious clients.
    let mut crafted: std::collections::BTreeMap<u32, UpdatePayload> = std::collections::BTreeMap::new();
    let mut out = Vec::with_capacity(batch.len());
    for job in batch {
        if job.slot >= malicious {
            // `honest` holds exactly the jobs of this branch, in order.
            out.push(trained.next().ok_or(SimError::Protocol("missing honest update".into()))??);
            continue;
        }
        let payload = match crafted.get(&job.round) {
            Some(p) => p.clone(),
            None => {
                let p = craft_attack(s, run, job, shards, malicious, threads, device)?;
                crafted.insert(job.round, p.clone());
                p
            }
        };
        out.push(ClientUpdate { num_samples: shards[job.slot].len().max(1) as u64, train_loss: 0.0, payload });
    }
    Ok(out)
}

/// The malicious payload of `job`'s round.
fn craft_attack(
    s: &Scenario,
    run: &RunConfig,
    job: &Job,
    shards: &[Dataset],
    malicious: usize,
    threads: usize,
    device: &Device,
) -> Result<UpdatePayload, SimError> {
    match &s.attack {
        Some(AttackSpec::Scale { scale, .. }) => {
            Ok(UpdatePayload::DenseDelta(job.model.iter().map(|v| v * scale).collect()))
        }
        Some(AttackSpec::FrlReverse { pool, .. }) => {
            let frl = run.frl.as_ref().ok_or(SimError::Protocol("frl-reverse attack in a run without FRL".into()))?;
            // Up to `pool` attackers drawn from all malicious clients (not
            // only this round's), each training benignly on its own data.
            let ids: Vec<usize> = (0..malicious).collect();
            let mut rng = tally_protocol::rng::LocalRng::new(hash_seed(s.seed, TAG_ATTACK, u64::from(job.round)));
            let attackers = rng.sample(&ids, (*pool).min(malicious));
            let rankings = par_map(threads, &attackers, |&a| {
                tally_kernels::update::local_update(run, a as u32, job.round, job.seed, &job.model, &shards[a], device)
            })?;
            let sizes = &frl.vote.layer_sizes;
            let mut sums = vec![0u64; frl.vote.num_edges()];
            for update in rankings {
                let UpdatePayload::Ranking(bytes) = update?.payload else {
                    return Err(SimError::Protocol("an FRL client produced no ranking".into()));
                };
                let ranking =
                    tally_protocol::frl::decode(&bytes, sizes).map_err(|e| SimError::Protocol(e.to_string()))?;
                let mut offset = 0;
                for (layer, &n) in ranking.layers().zip(sizes) {
                    for (position, &edge) in layer.iter().enumerate() {
                        sums[offset + edge as usize] += position as u64;
                    }
                    offset += n;
                }
            }
            // R_mal = argsort_desc(A): the attackers' consensus, reversed.
            let mut layers = Vec::with_capacity(sizes.len());
            let mut offset = 0;
            for &n in sizes {
                let a = &sums[offset..offset + n];
                let mut order: Vec<u32> = (0..n as u32).collect();
                order.sort_unstable_by_key(|&e| (Reverse(a[e as usize]), e));
                layers.push(order);
                offset += n;
            }
            let ranking = Ranking::new(layers, sizes).map_err(|e| SimError::Protocol(e.to_string()))?;
            Ok(UpdatePayload::Ranking(tally_protocol::frl::encode(&ranking)))
        }
        None => Err(SimError::Protocol("a malicious client without an attack".into())),
    }
}

/// `f` over `items` on up to `threads` scoped workers, results in item order.
fn par_map<T: Sync, R: Send>(threads: usize, items: &[T], f: impl Fn(&T) -> R + Sync) -> Result<Vec<R>, SimError> {
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
        .map(|m| {
            m.into_inner().unwrap_or_else(|p| p.into_inner()).ok_or(SimError::Protocol("a worker lost an item".into()))
        })
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
    }

    fn tiny_frl() -> (Scenario, Split) {
        let (mut s, split) = tiny();
        s.model = tally_protocol::model::ModelArch::Supermask(tally_protocol::supermask::FrlArch::MNIST_LENET);
        s.algorithm = Algorithm::Frl(FrlSpec::default());
        s.train = tally_protocol::wire::TrainSpec { lr: 0.4, batch_size: 8, epochs: 1 };
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
