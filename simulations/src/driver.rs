//! The round loop's steps (see [`crate::run_on`]): one [`Sim`] holds the
//! federation — the coordinator, one participant per client, the virtual
//! network — and each method is one step of the loop.
//!
//! Determinism: every random choice is drawn from the scenario seed, and
//! the steps draw in a fixed order (deliveries by arrival time then send
//! order; local work in task-arrival order; attacks per round).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tally_kernels::data::Split;
use tally_kernels::{Dataset, Device};
use tally_protocol::kind::KindSettings;
use tally_protocol::wire::{ClientUpdate, RunConfig, RunId, Task};
use tally_protocol::{
    ConnectionHandle, Coordinator, CoordinatorConfig, Event, Identity, Participant, ParticipantEvent, RoundSummary,
};

use crate::attack::{Attack, AttackEnv, RoundTask};
use crate::net::{Delivery, VirtualNet};
use crate::{
    RoundRecord, Scenario, SimError, SimReport, TAG_CHALLENGE, TAG_DROPOUT, TAG_RUN, TAG_STRAGGLER, hash_seed, par_map,
    partition_with, scenario, sim_identity, unit,
};

/// Deadline extensions of one round after which the simulator reports a
/// stall (the quorum cannot be met by the clients it has).
const MAX_EXTENSIONS_PER_ROUND: u32 = 100;

/// Examples per evaluation batch.
const EVAL_BATCH: usize = 1000;

/// A training task a client received, waiting for the instant's messages
/// to be delivered before it runs.
pub(crate) struct Job {
    slot: usize,
    round: u32,
    seed: u64,
    model: Vec<f32>,
}

/// What the loop does after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Go on.
    Continue,
    /// Stop the run (honest training diverged).
    Stop,
}

/// The simulated federation (see the module docs).
pub(crate) struct Sim<'a> {
    /// Shared by every participant's replica (`crate::replicas`).
    replicas: std::sync::Arc<tally_protocol::replica::SharedReplicas>,
    s: &'a Scenario,
    split: &'a Split,
    device: &'a Device,
    // The run.
    coord: Coordinator,
    run_config: RunConfig,
    clients: Vec<Participant>,
    /// Clients whose lost handshake is retried when the partition ends.
    reconnecting: std::collections::BTreeSet<usize>,
    shards: Vec<Dataset>,
    attack: Option<Box<dyn Attack>>,
    /// Malicious clients: ids `0..malicious`.
    malicious: usize,
    stragglers: Vec<bool>,
    threads: usize,
    net: VirtualNet<'a>,
    /// Training tasks received at the current instant.
    jobs: Vec<Job>,
    // Progress and metrics.
    finished: bool,
    extensions: u32,
    diverged_at: Option<u32>,
    malicious_sampled: BTreeMap<u32, usize>,
    /// Whether a round is open (its refusals are counted by reason).
    round_open: bool,
    /// The open round's refusals by reason.
    rejected_by_reason: BTreeMap<String, u32>,
    /// How the attack's success is measured, if there is an attack.
    success: Option<crate::AttackSuccessKind>,
    /// The test set split by class, when the success measure needs
    /// per-class accuracy.
    test_by_class: Option<Vec<Dataset>>,
    bytes_up: u64,
    bytes_down: u64,
    records: Vec<RoundRecord>,
    wall_rounds: Vec<f64>,
    wall_eval: Vec<f64>,
    /// Wall-clock seconds in the clients' local work (training, crafting,
    /// signing, the server's stateless share: the parallel sections).
    wall_local: f64,
    round_wall: Instant,
}

impl<'a> Sim<'a> {
    /// The federation of scenario `s` (validated) at virtual time 0: the
    /// clients' shards, the coordinator with the scenario's kind and rule,
    /// one participant per client, the attack, and every client's
    /// connection queued.
    pub(crate) fn setup(
        s: &'a Scenario,
        split: &'a Split,
        roles: Option<&[Vec<usize>]>,
        device: &'a Device,
    ) -> Result<Self, SimError> {
        let train = match s.train_range {
            Some([a, b]) => {
                let n = split.train.len();
                if a >= n {
                    return Err(scenario::ScenarioError::Invalid(format!(
                        "train_range [{a}, {b}) starts past the end of the {n} training examples of {}",
                        s.data
                    ))
                    .into());
                }
                let b = b.min(n);
                split.train.subset(&(a..b).collect::<Vec<_>>())?
            }
            None => split.train.clone(),
        };
        let parts = partition_with(s, &train, roles)?;
        let shards: Vec<Dataset> = parts.iter().map(|p| train.subset(p)).collect::<Result<_, _>>()?;
        let schedule = s.schedule.as_ref().map(|p| scenario::read_schedule(p, s.clients)).transpose()?;
        let initial = match &s.initial_model {
            Some(p) => tally_kernels::params_file::load_params(p, &s.model)?,
            None => s.model.init_params(s.seed),
        };
        let identities: Vec<Identity> = (0..s.clients).map(|i| sim_identity(s.seed, i)).collect();
        let mut run_id = [0u8; 16];
        run_id[..8].copy_from_slice(&hash_seed(s.seed, TAG_RUN, 0).to_le_bytes());
        run_id[8..].copy_from_slice(&hash_seed(s.seed, TAG_RUN, 1).to_le_bytes());
        let config = CoordinatorConfig {
            run_id: RunId(run_id),
            arch: s.model.clone(),
            rounds: s.rounds,
            enrolled: identities.iter().map(Identity::public_key).collect(),
            min_clients: s.clients,
            clients_per_round: s.clients_per_round,
            quorum: s.quorum.unwrap_or(s.clients_per_round),
            round_timeout: Duration::from_secs(s.round_timeout_secs),
            train: s.train.clone(),
            kind: s.kind_settings()?,
            rule: s.rule,
            max_violations: 10,
            // The simulator studies attacks and their defences (robust
            // rules): the server's liveness bound would refuse the scaling
            // attack outright, so it is off here (any finite value passes).
            max_update_abs: f32::MAX,
            schedule,
            final_evaluation: false,
            // Private kinds' noise: from the scenario seed, so reruns are
            // identical. Insecure (64 bits can be searched), which a
            // simulation can afford; the server draws 32 bytes from the OS.
            noise_seed: Some(tally_protocol::dp::NoiseSeed::insecure_from_u64(s.seed)),
        };
        let mut coord = Coordinator::new(config, initial, s.seed)?;
        let run_config = coord.run_config();
        // Replicated runs: clients whose replicas are provably identical
        // share one copy, and each round's log is applied once for all of
        // them (`tally_protocol::replica`), not once per client.
        let replicas = std::sync::Arc::new(tally_protocol::replica::SharedReplicas::default());
        let clients: Vec<Participant> =
            identities.into_iter().map(|id| Participant::new(id, None).with_replica_store(replicas.clone())).collect();
        let attack = s.attack()?;
        let malicious = attack.as_ref().map_or(0, |a| a.malicious(s.clients));
        if s.redraw_majority && malicious > 0 {
            // FRL's rule: no round with malicious clients half or more of it.
            coord.redraw_majority((0..malicious as u32).collect());
        }
        if s.rule_knows_attackers {
            // FRL's baselines: the rule is told each round's attacker count.
            coord.rule_knows_attackers((0..malicious as u32).collect());
        }
        let threads = match s.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let stragglers: Vec<bool> =
            (0..s.clients).map(|i| unit(s.seed, TAG_STRAGGLER, i as u64) < s.network.straggler_fraction).collect();
        let success = crate::attack_success_kind(s.attack.as_ref());
        let test_by_class = match success {
            Some(crate::AttackSuccessKind::ClassError(c)) => {
                let test = &split.test;
                if c >= test.classes {
                    return Err(scenario::ScenarioError::Invalid(format!(
                        "attack: source class {c}, but the data has {} classes",
                        test.classes
                    ))
                    .into());
                }
                Some(split_by_class(test)?)
            }
            _ => None,
        };
        let mut net = VirtualNet::new(&s.network, s.clients);
        for i in 0..s.clients {
            net.push(Duration::ZERO, Delivery::Connect(i));
        }
        Ok(Sim {
            replicas,
            s,
            split,
            device,
            coord,
            run_config,
            clients,
            reconnecting: Default::default(),
            shards,
            attack,
            malicious,
            stragglers,
            threads,
            net,
            jobs: Vec::new(),
            finished: false,
            extensions: 0,
            diverged_at: None,
            malicious_sampled: BTreeMap::new(),
            round_open: false,
            rejected_by_reason: BTreeMap::new(),
            success,
            test_by_class,
            bytes_up: 0,
            bytes_down: 0,
            records: Vec::new(),
            wall_rounds: Vec::new(),
            wall_eval: Vec::new(),
            wall_local: 0.0,
            round_wall: Instant::now(),
        })
    }

    /// Whether the coordinator has finished the run.
    /// Distinct replica allocations among the clients that hold one, and
    /// how many hold one.
    #[cfg(test)]
    pub(crate) fn replica_allocations(&self) -> (usize, usize) {
        let ptrs: Vec<*const f32> = self.clients.iter().filter_map(|p| p.replica().map(|(_, r)| r.as_ptr())).collect();
        (ptrs.iter().collect::<std::collections::BTreeSet<_>>().len(), ptrs.len())
    }

    pub(crate) fn finished(&self) -> bool {
        self.finished
    }

    /// The report of the run so far.
    pub(crate) fn into_report(self) -> SimReport {
        SimReport {
            final_model: self.coord.model().to_vec(),
            records: self.records,
            wall_secs_per_round: self.wall_rounds,
            wall_secs_eval: self.wall_eval,
            wall_secs_local_work: self.wall_local,
            diverged_at: self.diverged_at,
            dropped_messages: self.net.dropped,
        }
    }

    // ---- Recording ------------------------------------------------------

    /// Test accuracy and mean loss of the global model.
    ///
    /// The test set is cut into fixed chunks of [`EVAL_BATCH`] examples,
    /// evaluated on the run's worker threads, and the chunks' reports are
    /// added in chunk order: the result does not depend on the thread count
    /// (a dense LeNet's evaluation of 10,000 images took 9 s on one thread).
    fn evaluate(&self) -> Result<(f64, f64), SimError> {
        let (test, run, model, device) = (&self.split.test, &self.run_config, self.coord.model(), self.device);
        let starts: Vec<usize> = (0..test.len()).step_by(EVAL_BATCH).collect();
        let reports = crate::par_map(self.threads, &starts, |&start| {
            let idx: Vec<usize> = (start..(start + EVAL_BATCH).min(test.len())).collect();
            let chunk = test.subset(&idx)?;
            Ok::<_, SimError>(tally_kernels::update::evaluate_run(run, model, &chunk, device, EVAL_BATCH)?)
        })?;
        let mut e = tally_protocol::wire::EvalReport::default();
        for r in reports {
            let r = r?;
            e.loss_sum += r.loss_sum;
            e.correct += r.correct;
            e.total += r.total;
        }
        Ok((e.accuracy(), e.mean_loss()))
    }

    /// Test accuracy per class (empty classes count as 0), when the run
    /// needs it.
    fn class_accuracy(&self) -> Result<Option<Vec<f64>>, SimError> {
        let Some(by_class) = &self.test_by_class else { return Ok(None) };
        Ok(Some(per_class_accuracy(&self.run_config, self.coord.model(), by_class, self.device)?))
    }

    /// The attack-success value of a row (see
    /// [`RoundRecord::attack_success`]): the error on the flipped class
    /// where evaluated; the drop against the clean run is filled in by a
    /// sweep, so `null` here.
    fn attack_success(&self, class_accuracy: Option<&[f64]>) -> Option<Option<f64>> {
        match self.success? {
            crate::AttackSuccessKind::ClassError(c) => Some(class_accuracy.and_then(|a| a.get(c)).map(|a| 1.0 - a)),
            crate::AttackSuccessKind::AccuracyDrop => Some(None),
        }
    }

    /// Examples one central evaluation counts.
    fn test_examples(&self) -> u64 {
        self.split.test.len() as u64
    }

    fn record(&mut self, rec: RoundRecord, on_record: &mut dyn FnMut(&RoundRecord)) {
        on_record(&rec);
        self.records.push(rec);
    }

    /// Round 0: the initial model, evaluated.
    pub(crate) fn record_initial(&mut self, on_record: &mut dyn FnMut(&RoundRecord)) -> Result<(), SimError> {
        let (accuracy, loss) = self.evaluate()?;
        let class_accuracy = self.class_accuracy()?;
        let rec = RoundRecord {
            round: 0,
            sampled: 0,
            accepted: 0,
            failed: 0,
            rejected: 0,
            samples: 0,
            train_loss: None,
            test_accuracy: Some(accuracy),
            test_loss: Some(loss),
            test_examples: Some(self.test_examples()),
            bytes_up: 0,
            bytes_down: 0,
            virtual_secs: 0.0,
            model_hash: hex::encode(tally_protocol::identity::params_hash(self.coord.model())),
            malicious: self.s.attack.as_ref().map(|_| 0),
            rejected_by_reason: BTreeMap::new(),
            attack_success: self.attack_success(class_accuracy.as_deref()),
            test_class_accuracy: class_accuracy,
            dp_rho_spent: None,
            dp_epsilon_spent: None,
            dp_delta: None,
            seed: self.s.seed,
        };
        self.record(rec, on_record);
        Ok(())
    }

    /// A completed round: evaluated if due, recorded with the traffic since
    /// the previous record.
    fn record_round(
        &mut self,
        summary: &RoundSummary,
        on_record: &mut dyn FnMut(&RoundRecord),
    ) -> Result<(), SimError> {
        self.wall_rounds.push(self.round_wall.elapsed().as_secs_f64());
        // Some attacks have every round evaluated: a collapse shows in the
        // round it happens.
        let evaluate = summary.round.is_multiple_of(self.s.eval_every)
            || summary.round == self.s.rounds
            // A private run ends early when its horizon is used up.
            || self.coord.phase() == tally_protocol::Phase::Finished
            || (self.malicious > 0 && self.attack.as_ref().is_some_and(|a| a.evaluate_every_round()));
        let (accuracy, loss, class_accuracy) = if evaluate {
            let t = Instant::now();
            let (accuracy, loss) = self.evaluate()?;
            let class_accuracy = self.class_accuracy()?;
            self.wall_eval.push(t.elapsed().as_secs_f64());
            (Some(accuracy), Some(loss), class_accuracy)
        } else {
            (None, None, None)
        };
        let privacy = summary.stats.as_ref().and_then(|s| s.privacy);
        let rec = RoundRecord {
            round: summary.round,
            sampled: summary.sampled,
            accepted: summary.accepted,
            failed: summary.failed,
            rejected: summary.rejected,
            samples: summary.stats.as_ref().map_or(0, |s| s.samples),
            train_loss: summary.stats.as_ref().map(|s| s.train_loss),
            test_accuracy: accuracy,
            test_loss: loss,
            test_examples: accuracy.map(|_| self.test_examples()),
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            virtual_secs: self.net.now.as_secs_f64(),
            model_hash: hex::encode(summary.model_hash),
            malicious: self.s.attack.as_ref().map(|_| self.malicious_sampled.remove(&summary.round).unwrap_or(0)),
            rejected_by_reason: std::mem::take(&mut self.rejected_by_reason),
            attack_success: self.attack_success(class_accuracy.as_deref()),
            test_class_accuracy: class_accuracy,
            dp_rho_spent: privacy.map(|p| p.rho),
            dp_epsilon_spent: privacy.map(|p| p.epsilon),
            dp_delta: privacy.map(|p| p.delta),
            seed: self.s.seed,
        };
        self.bytes_up = 0;
        self.bytes_down = 0;
        self.record(rec, on_record);
        self.round_wall = Instant::now();
        Ok(())
    }

    // ---- Local work -----------------------------------------------------

    /// Whether tasks are waiting and every message of this instant has been
    /// delivered (tasks of one instant train together).
    pub(crate) fn local_work_due(&self) -> bool {
        !self.jobs.is_empty() && self.net.next_at().is_none_or(|at| at > self.net.now)
    }

    /// The waiting tasks' local work: dropped clients leave the round,
    /// honest ones train, malicious ones send what the attack crafts; each
    /// report leaves after its virtual compute time. Stops the run when
    /// honest training diverges.
    pub(crate) fn local_work(&mut self) -> Result<Flow, SimError> {
        let (seed, dropout) = (self.s.seed, self.s.network.dropout);
        let batch: Vec<Job> = self
            .jobs
            .drain(..)
            // Dropped clients silently leave this round.
            .filter(|job| unit(seed, TAG_DROPOUT, u64::from(job.round) << 32 | job.slot as u64) >= dropout)
            .collect();
        let started = Instant::now();
        let updates = match self.updates(&batch) {
            Err(SimError::Kernel(tally_kernels::KernelError::Diverged { .. })) => {
                self.diverged_at = batch.first().map(|j| j.round);
                return Ok(Flow::Stop);
            }
            other => other?,
        };
        self.submit_all(&batch, updates)?;
        self.wall_local += started.elapsed().as_secs_f64();
        Ok(Flow::Continue)
    }

    /// The updates of a batch of jobs (tasks that arrived at the same
    /// virtual instant), in job order: honest clients train locally (on
    /// `threads` workers), malicious ones send what the attack crafts (once
    /// per round, for that round's malicious clients in the batch).
    fn updates(&self, batch: &[Job]) -> Result<Vec<ClientUpdate>, SimError> {
        let (run, shards, device) = (&self.run_config, &self.shards, self.device);
        let honest: Vec<&Job> = batch.iter().filter(|j| j.slot >= self.malicious).collect();
        // Largest shards first (longest-processing-time order): the round
        // waits for its slowest worker, and a large shard started last
        // would leave the other threads idle. Put back in job order below,
        // so the order changes nothing but the wall-clock time.
        let mut order: Vec<usize> = (0..honest.len()).collect();
        order.sort_by_key(|&k| std::cmp::Reverse(shards[honest[k].slot].len()));
        let by_size: Vec<&Job> = order.iter().map(|&k| honest[k]).collect();
        let trained_by_size = par_map(self.threads, &by_size, |job| {
            tally_kernels::update::local_update(
                run,
                job.slot as u32,
                job.round,
                job.seed,
                &job.model,
                &shards[job.slot],
                device,
            )
        })?;
        let mut slots: Vec<Option<_>> = (0..order.len()).map(|_| None).collect();
        for (&k, r) in order.iter().zip(trained_by_size) {
            slots[k] = Some(r);
        }
        let mut trained = slots.into_iter().flatten();
        let mut crafted: BTreeMap<u32, std::vec::IntoIter<tally_protocol::wire::UpdatePayload>> = BTreeMap::new();
        let mut out = Vec::with_capacity(batch.len());
        for job in batch {
            if job.slot >= self.malicious {
                // `honest` holds exactly the jobs of this branch, in order.
                out.push(trained.next().ok_or(SimError::Invariant("missing honest update"))??);
                continue;
            }
            let payloads = match crafted.entry(job.round) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(self.craft(batch, job)?.into_iter()),
            };
            let payload = payloads.next().ok_or(SimError::Invariant("the attack crafted too few payloads"))?;
            out.push(ClientUpdate { num_samples: shards[job.slot].len().max(1) as u64, train_loss: 0.0, payload });
        }
        Ok(out)
    }

    /// The payloads of the malicious clients of `first`'s round in `batch`,
    /// crafted from the task `first` (the first of them) received.
    fn craft(&self, batch: &[Job], first: &Job) -> Result<Vec<tally_protocol::wire::UpdatePayload>, SimError> {
        let attack = self.attack.as_ref().ok_or(SimError::Invariant("a malicious client without an attack"))?;
        let clients: Vec<usize> =
            batch.iter().filter(|j| j.slot < self.malicious && j.round == first.round).map(|j| j.slot).collect();
        let malicious = self.malicious_sampled.get(&first.round).copied().unwrap_or(0).max(clients.len());
        // With `rule_knows_attackers` the server's rule this round has the
        // round's count as its parameter, and the tailored attacks know it.
        let rule = match self.s.rule_knows_attackers {
            true => self.s.rule.with_attackers(malicious, self.s.clients_per_round),
            false => self.s.rule,
        };
        let env = AttackEnv {
            run: &self.run_config,
            shards: &self.shards,
            malicious: self.malicious,
            threads: self.threads,
            device: self.device,
            seed: self.s.seed,
            per_round: self.s.clients_per_round,
            rule,
        };
        let task = RoundTask { round: first.round, seed: first.seed, model: &first.model, malicious };
        attack.craft(&env, &task, &clients)
    }

    /// Submits each job's update: the report leaves once the client's
    /// virtual compute time has passed.
    ///
    /// Signing a report and the server's stateless work on it (decoding, the
    /// digest its signature covers: [`tally_protocol::Preparer`]) run on the
    /// training threads, one client per job, instead of in the serial
    /// delivery loop. Each participant touches only its own state, and the
    /// frames go out in job order afterwards, so the results don't depend on
    /// the thread count.
    fn submit_all(&mut self, batch: &[Job], updates: Vec<ClientUpdate>) -> Result<(), SimError> {
        let clock = self.net.clock()?;
        let preparer = self.coord.preparer();
        let distinct = batch.iter().map(|j| j.slot).collect::<std::collections::BTreeSet<_>>().len() == batch.len();
        let frames: Vec<Vec<Outgoing>> = if distinct {
            let mut participants: Vec<Option<&mut Participant>> = self.clients.iter_mut().map(Some).collect();
            let mut cells = Vec::with_capacity(batch.len());
            for (job, update) in batch.iter().zip(updates) {
                // `distinct`: each slot is taken once.
                let p = participants
                    .get_mut(job.slot)
                    .and_then(Option::take)
                    .ok_or(SimError::UnknownConnection(job.slot as u64))?;
                cells.push(std::sync::Mutex::new((p, Some(update))));
            }
            crate::par_map(self.threads, &cells, |cell| {
                let mut guard = cell.lock().unwrap_or_else(|p| p.into_inner());
                let (p, update) = &mut *guard;
                p.submit(clock, None, update.take())?;
                let mut out = Vec::new();
                while let Some(frame) = p.poll_transmit() {
                    let prepared = Box::new(preparer.prepare(&frame));
                    out.push((frame, Some(prepared)));
                }
                Ok::<_, SimError>(out)
            })?
            .into_iter()
            .collect::<Result<_, _>>()?
        } else {
            // A client with two tasks in one batch: in order, on this thread.
            let mut all = Vec::with_capacity(batch.len());
            for (job, update) in batch.iter().zip(updates) {
                let p = self.clients.get_mut(job.slot).ok_or(SimError::UnknownConnection(job.slot as u64))?;
                p.submit(clock, None, Some(update))?;
                all.push(std::iter::from_fn(|| p.poll_transmit()).map(|f| (f, None)).collect());
            }
            all
        };
        for (job, frames) in batch.iter().zip(frames) {
            let net = &self.s.network;
            let slow = if self.stragglers[job.slot] { net.straggler_slowdown } else { 1.0 };
            let work = work_units(&self.run_config.kind, self.shards[job.slot].len(), self.s.train.epochs);
            let compute = VirtualNet::secs(work * net.compute_us_per_sample * 1e-6 * slow)?;
            for (frame, prepared) in frames {
                let ready = VirtualNet::after(self.net.now, compute)?;
                self.net.send_up(job.slot, ready, frame, prepared)?;
            }
        }
        Ok(())
    }

    // ---- Delivery -------------------------------------------------------

    /// Advances virtual time to the next delivery or round deadline,
    /// whichever comes first, and handles it.
    pub(crate) fn advance(&mut self) -> Result<(), SimError> {
        let deadline = self.coord.poll_timeout().map(|t| self.net.since_start(t));
        match (self.net.next_at(), deadline) {
            (None, None) => Err(SimError::Stalled(self.coord.completed_rounds().saturating_add(1))),
            (Some(next), Some(t)) if t < next => self.fire_deadline(t),
            (None, Some(t)) => self.fire_deadline(t),
            (Some(_), _) => self.deliver_next(),
        }
    }

    /// The coordinator's round deadline at virtual time `t`.
    fn fire_deadline(&mut self, t: Duration) -> Result<(), SimError> {
        self.net.now = t;
        self.coord.handle_timeout(self.net.clock()?);
        Ok(())
    }

    /// The next queued delivery: a connection, a client's frame to the
    /// server, or the server's frame to a client (which may hand the client
    /// a task, queued as a [`Job`]).
    fn deliver_next(&mut self) -> Result<(), SimError> {
        let Some(what) = self.net.pop() else { return Ok(()) };
        let now = self.net.now;
        match what {
            Delivery::Connect(i) => {
                self.reconnecting.remove(&i);
                let mut challenge = [0u8; 32];
                for (k, chunk) in challenge.chunks_mut(8).enumerate() {
                    chunk.copy_from_slice(
                        &hash_seed(self.s.seed, TAG_CHALLENGE, (i as u64) << 2 | k as u64).to_le_bytes(),
                    );
                }
                self.coord.handle_connect(self.net.clock()?, ConnectionHandle(i as u64), challenge);
            }
            Delivery::ToServer(i, ..) | Delivery::ToClient(i, _) if self.net.cut(i, now) => {
                self.net.dropped = self.net.dropped.saturating_add(1);
                // A handshake lost to the partition is not given up: a real
                // client retries its connection and gets through once the
                // link is back. Without this, clients cut off from the start
                // never join and the run stalls before round 1.
                let joined = self.clients.get(i).is_some_and(|p| p.client_id().is_some());
                if !joined && let Some(end) = self.net.partition_end() {
                    let p = self.clients.get_mut(i).ok_or(SimError::UnknownConnection(i as u64))?;
                    if p.run_config().is_none() && !self.reconnecting.contains(&i) {
                        self.reconnecting.insert(i);
                        *p = Participant::new(sim_identity(self.s.seed, i), None)
                            .with_replica_store(self.replicas.clone());
                        self.net.push(end.max(now), Delivery::Connect(i));
                    }
                }
            }
            Delivery::ToServer(i, bytes, prepared) => {
                self.bytes_up += bytes.len() as u64;
                let (clock, conn) = (self.net.clock()?, ConnectionHandle(i as u64));
                // Refusals are counted in the round summary.
                let _ = match prepared {
                    Some(p) => self.coord.handle_prepared(clock, conn, *p),
                    None => self.coord.handle_message(clock, conn, &bytes),
                };
            }
            Delivery::ToClient(i, bytes) => {
                self.bytes_down += bytes.len() as u64;
                let clock = self.net.clock()?;
                let p = self.clients.get_mut(i).ok_or(SimError::UnknownConnection(i as u64))?;
                p.handle_message(clock, &bytes)?;
                while let Some(ev) = p.poll_event() {
                    if let ParticipantEvent::TaskRequested { round, task: Task::Train, seed, model } = ev {
                        self.jobs.push(Job { slot: i, round, seed, model });
                    }
                }
                while let Some(frame) = p.poll_transmit() {
                    self.net.send_up(i, now, frame, None)?;
                }
            }
        }
        Ok(())
    }

    /// Puts what the coordinator queued on the clients' down links.
    pub(crate) fn forward_server_messages(&mut self) -> Result<(), SimError> {
        while let Some(t) = self.coord.poll_transmit() {
            self.net.send_down(t.to.0 as usize, t.bytes)?;
        }
        Ok(())
    }

    /// Acts on the coordinator's events: records completed rounds, counts
    /// deadline extensions (a stall past [`MAX_EXTENSIONS_PER_ROUND`]),
    /// notes the malicious clients each round samples, and the end.
    pub(crate) fn handle_events(&mut self, on_record: &mut dyn FnMut(&RoundRecord)) -> Result<(), SimError> {
        while let Some(event) = self.coord.poll_event() {
            match event {
                Event::RoundCompleted(summary) => {
                    self.extensions = 0;
                    self.round_open = false;
                    self.record_round(&summary, on_record)?;
                }
                Event::RoundExtended { round, .. } => {
                    self.extensions += 1;
                    // Every joined client was asked and the quorum is still out
                    // of reach: virtual time would advance forever.
                    if self.extensions > MAX_EXTENSIONS_PER_ROUND {
                        return Err(SimError::Stalled(round));
                    }
                }
                Event::Rejected { error, .. } if self.round_open => {
                    let n = self.rejected_by_reason.entry(reject_reason(&error)).or_insert(0);
                    *n = n.saturating_add(1);
                }
                Event::RoundOpened { round, sampled, .. } => {
                    self.round_open = true;
                    self.rejected_by_reason.clear();
                    let malicious = sampled.iter().filter(|&&c| (c as usize) < self.malicious).count();
                    self.malicious_sampled.insert(round, malicious);
                }
                Event::Finished { .. } => self.finished = true,
                _ => {}
            }
        }
        Ok(())
    }
}

/// A frame a client sends, with the server's stateless work on it done
/// ahead where it was ([`tally_protocol::Preparer`]).
type Outgoing = (Vec<u8>, Option<Box<tally_protocol::Prepared>>);

/// Virtual compute of one client's task, in examples processed: an SPSA
/// step is two forward passes, counted as one training example each.
fn work_units(kind: &KindSettings, examples: usize, epochs: u32) -> f64 {
    match kind {
        KindSettings::Spsa(z) => f64::from(z.steps_per_client) * f64::from(z.batch_size),
        _ => examples as f64 * f64::from(epochs),
    }
}

/// A refusal's reason as the metrics name it: the protocol's
/// [`RejectCode`](tally_protocol::wire::RejectCode) in snake case
/// (`bad_signature`, `late`, …), `misuse` for the host's own mistakes.
pub(crate) fn reject_reason(error: &tally_protocol::Error) -> String {
    error.reject_code().map_or("misuse", tally_protocol::wire::RejectCode::name).to_string()
}

/// The test set's examples of each class, class by class.
pub(crate) fn split_by_class(test: &Dataset) -> Result<Vec<Dataset>, SimError> {
    (0..test.classes)
        .map(|k| {
            let idx: Vec<usize> = (0..test.len()).filter(|&i| usize::from(test.labels[i]) == k).collect();
            Ok(test.subset(&idx)?)
        })
        .collect()
}

/// Accuracy of `model` on each class's examples (0 for a class without any).
pub(crate) fn per_class_accuracy(
    run: &RunConfig,
    model: &[f32],
    by_class: &[Dataset],
    device: &Device,
) -> Result<Vec<f64>, SimError> {
    let mut out = Vec::with_capacity(by_class.len());
    for d in by_class {
        if d.is_empty() {
            out.push(0.0);
            continue;
        }
        out.push(tally_kernels::update::evaluate_run(run, model, d, device, EVAL_BATCH)?.accuracy());
    }
    Ok(out)
}
