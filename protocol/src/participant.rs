//! The client's state machine.
//!
//! [`Participant`] speaks the protocol for one connection: it answers the
//! server's challenge, checks what the server sends, and turns a round's task
//! into [`ParticipantEvent::TaskRequested`]. Training happens outside: the host
//! runs it (with `tally-kernels`) and calls [`Participant::submit`], which
//! signs the report, or [`Participant::submit_failure`] when local training
//! failed (diverged): the server then stops waiting for us and aggregates
//! nothing from us, and we carry on with the next round instead of exiting. A host that reconnects builds a new `Participant` with
//! the same identity; the server re-sends an unfinished task.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::codec;
use crate::error::{Error, Misbehaviour, Misuse};
use crate::identity::{Identity, join_transcript, report_transcript};
use crate::kind::{Publication, UpdateKind};
use crate::wire::{
    self, ClientUpdate, EvalReport, Join, MAX_HANDSHAKE_BYTES, Message, RejectCode, Report, RunConfig, RunId,
    SignedReport, Task,
};

/// The seed of a client's local randomness (shuffling) in a round: the
/// round's seed from [`crate::wire::RoundStart`] mixed with the client id, so
/// clients of one round shuffle differently and reruns shuffle identically.
pub fn local_seed(round_seed: u64, client_id: u32) -> u64 {
    round_seed ^ u64::from(client_id).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Something the host must act on.
#[derive(Clone, Debug, PartialEq)]
pub enum ParticipantEvent {
    /// The server admitted us.
    Joined {
        /// Our id at the server.
        client_id: u32,
        /// The run.
        config: RunConfig,
    },
    /// Do `task` on `model` and call [`Participant::submit`].
    TaskRequested {
        /// The round.
        round: u32,
        /// Evaluate only, or evaluate and train.
        task: Task,
        /// Seed for local randomness: mix with the client id.
        seed: u64,
        /// Global parameters.
        model: Vec<f32>,
    },
    /// The server counted our report.
    Accepted {
        /// The round.
        round: u32,
    },
    /// The server refused a message of ours.
    Rejected {
        /// Why.
        code: RejectCode,
        /// The round concerned.
        round: Option<u32>,
        /// Server's explanation.
        detail: String,
    },
    /// The run is over.
    Finished {
        /// Rounds completed.
        rounds: u32,
        /// Hash of the final model.
        model_hash: [u8; 32],
    },
    /// Replicated runs: our replica now holds the model after `round`, and
    /// its hash matched the server's.
    Synced {
        /// The round.
        round: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingHello,
    AwaitingWelcome,
    Ready,
    Working { round: u32, task: Task },
    Finished,
}

/// The client's sans-IO state machine. See the module docs.
#[derive(Debug)]
pub struct Participant {
    identity: Identity,
    expected_run: Option<RunId>,
    /// The run the server's `Hello` named; its `Welcome` must name the same.
    hello_run: Option<RunId>,
    state: State,
    run: Option<RunConfig>,
    /// The run's update kind, built from the `Welcome`.
    kind: Option<Arc<dyn UpdateKind>>,
    client_id: Option<u32>,
    max_message: usize,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<ParticipantEvent>,
    /// Replicated runs: our copy of the global model (with its hash) and the
    /// round it is the result of.
    replica: Option<(u32, Arc<crate::replica::Replica>)>,
    /// Where shared directions are applied to the replica (CPU by default).
    applier: Arc<dyn crate::prng::DirectionApplier>,
    /// Where the replica is kept (a copy of our own by default).
    store: Arc<dyn crate::replica::ReplicaStore>,
}

impl Participant {
    /// A participant for `identity`. With `expected_run`, a server announcing
    /// another run is refused.
    pub fn new(identity: Identity, expected_run: Option<RunId>) -> Self {
        Participant {
            identity,
            expected_run,
            hello_run: None,
            state: State::AwaitingHello,
            run: None,
            kind: None,
            client_id: None,
            // Until the Welcome names the model, only small messages are due.
            max_message: MAX_HANDSHAKE_BYTES,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            replica: None,
            applier: Arc::new(crate::prng::CpuApplier),
            store: Arc::new(crate::replica::OwnReplica),
        }
    }

    /// Applies replicated rounds' shared directions with `applier` (a GPU
    /// kernel, say) instead of the CPU code. The replica is still checked
    /// against the server's hash after every round.
    pub fn with_applier(mut self, applier: Arc<dyn crate::prng::DirectionApplier>) -> Self {
        self.applier = applier;
        self
    }

    /// Keeps the replica in `store` (shared by the participants of one
    /// process whose replicas are provably identical, say) instead of a
    /// copy of its own: [`crate::replica`].
    pub fn with_replica_store(mut self, store: Arc<dyn crate::replica::ReplicaStore>) -> Self {
        self.store = store;
        self
    }

    /// The run's update kind, once joined.
    pub fn kind(&self) -> Option<&dyn UpdateKind> {
        self.kind.as_deref()
    }

    /// Replicated runs: the round our replica is at and its parameters.
    pub fn replica(&self) -> Option<(u32, &[f32])> {
        self.replica.as_ref().map(|(r, p)| (*r, p.params.as_slice()))
    }

    /// Applies `log` to the replica after checking it follows our round,
    /// then checks the server's hash.
    fn apply_log(&mut self, log: &wire::RoundLog) -> Result<(), Error> {
        let kind = self
            .kind
            .clone()
            .filter(|k| k.replicated())
            .ok_or(Misbehaviour::Unexpected("RoundLog in a run that is not replicated"))?;
        let (round, replica) = self.replica.take().ok_or(Misbehaviour::Unexpected("RoundLog before Sync"))?;
        if log.round != round.saturating_add(1) {
            self.replica = Some((round, replica));
            return Err(Misbehaviour::OutOfOrderLog { have: round, got: log.round }.into());
        }
        let applier = self.applier.clone();
        let mut apply = |params: &mut Vec<f32>| kind.apply_log(params, log, applier.as_ref()).map_err(Error::from);
        // A log that does not apply leaves the replica as it was: the store
        // applies to a copy while we hold the original.
        let replica = match self.store.advance(replica.clone(), log, &mut apply) {
            Ok(next) => next,
            Err(e) => {
                self.replica = Some((round, replica));
                return Err(e);
            }
        };
        let matches = replica.hash == log.model_hash;
        self.replica = Some((log.round, replica));
        if !matches {
            // Our replica can no longer be trusted; the host reconnects and
            // gets a fresh checkpoint.
            self.replica = None;
            return Err(Misbehaviour::ReplicaMismatch { round: log.round }.into());
        }
        self.events.push_back(ParticipantEvent::Synced { round: log.round });
        Ok(())
    }

    /// Largest message to accept from the server: [`MAX_HANDSHAKE_BYTES`]
    /// until the `Welcome`, then the bound for the run's model.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message
    }

    /// The run, once joined.
    pub fn run_config(&self) -> Option<&RunConfig> {
        self.run.as_ref()
    }

    /// Our id at the server, once joined.
    pub fn client_id(&self) -> Option<u32> {
        self.client_id
    }

    /// Whether the server said the run is over.
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// Next message to send (each on its own stream).
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<ParticipantEvent> {
        self.events.pop_front()
    }

    /// One complete message from the server.
    pub fn handle_message(&mut self, _now: Instant, bytes: &[u8]) -> Result<(), Error> {
        let msg = codec::decode(bytes, self.max_message)?;
        match (self.state, msg) {
            (State::AwaitingHello, Message::Hello(hello)) => {
                if self.expected_run.is_some_and(|r| r != hello.run_id) {
                    return Err(Misbehaviour::WrongRun.into());
                }
                let public_key = self.identity.public_key();
                let signature = self.identity.sign(&join_transcript(&hello.run_id, &hello.challenge, &public_key));
                self.transmits.push_back(codec::encode(&Message::Join(Join { public_key, signature })));
                self.hello_run = Some(hello.run_id);
                self.state = State::AwaitingWelcome;
                Ok(())
            }
            (State::AwaitingWelcome, Message::Welcome(w)) => {
                // A hostile server could otherwise switch runs under our
                // signature, announce a model too large to hold, or ask for
                // training we can't or shouldn't do.
                if self.hello_run != Some(w.config.run_id) {
                    return Err(Misbehaviour::WrongRun.into());
                }
                w.config.arch.validate().map_err(|_| Misbehaviour::Unexpected("Welcome with an invalid model"))?;
                w.config
                    .train
                    .validate()
                    .map_err(|_| Misbehaviour::Unexpected("Welcome with invalid training parameters"))?;
                let kind = w
                    .config
                    .kind
                    .build(&w.config.arch)
                    .map_err(|_| Misbehaviour::Unexpected("Welcome with invalid update-kind settings"))?;
                self.max_message = w.config.max_inbound_bytes(kind.as_ref());
                self.kind = Some(kind);
                self.client_id = Some(w.client_id);
                self.run = Some(w.config.clone());
                self.state = State::Ready;
                self.events.push_back(ParticipantEvent::Joined { client_id: w.client_id, config: w.config });
                Ok(())
            }
            (State::Ready | State::Working { .. }, Message::Sync(sync)) => {
                let run = self.run.as_ref().ok_or(Misbehaviour::Unexpected("Sync before Welcome"))?;
                if !self.kind.as_ref().is_some_and(|k| k.replicated()) {
                    return Err(Misbehaviour::Unexpected("Sync in a run that is not replicated").into());
                }
                crate::aggregate::check_dense(&sync.params, run.arch.num_params())?;
                self.replica = Some((sync.round, self.store.adopt(sync.params)));
                for log in &sync.logs {
                    self.apply_log(log)?;
                }
                let round = self.replica.as_ref().map_or(0, |(r, _)| *r);
                self.events.push_back(ParticipantEvent::Synced { round });
                Ok(())
            }
            (State::Ready | State::Working { .. }, Message::RoundLog(log)) => self.apply_log(&log),
            (State::Ready | State::Working { .. }, Message::RoundStart(start)) => {
                let run = self.run.as_ref().ok_or(Misbehaviour::Unexpected("RoundStart before Welcome"))?;
                let kind = self.kind.as_ref().ok_or(Misbehaviour::Unexpected("RoundStart before Welcome"))?;
                let arch = &run.arch;
                let model = match (kind.publication(), start.model) {
                    (Publication::Encoded, wire::ModelSync::Published(bytes)) => {
                        let model = kind.decode_published(&bytes)?;
                        crate::aggregate::check_dense(&model, arch.num_params())?;
                        model
                    }
                    (Publication::Full, wire::ModelSync::Full(model)) => {
                        crate::aggregate::check_dense(&model, arch.num_params())?;
                        model
                    }
                    (Publication::Replica, wire::ModelSync::Replica { model_hash }) => {
                        let (round, replica) =
                            self.replica.as_ref().ok_or(Misbehaviour::Unexpected("RoundStart before Sync"))?;
                        if replica.hash != model_hash {
                            let round = *round;
                            self.replica = None;
                            return Err(Misbehaviour::ReplicaMismatch { round }.into());
                        }
                        replica.params.clone()
                    }
                    _ => {
                        return Err(
                            Misbehaviour::Unexpected("a RoundStart model of another form than the run's").into()
                        );
                    }
                };
                // A new task replaces an unfinished one (the server moved on).
                self.state = State::Working { round: start.round, task: start.task };
                self.events.push_back(ParticipantEvent::TaskRequested {
                    round: start.round,
                    task: start.task,
                    seed: start.seed,
                    model,
                });
                Ok(())
            }
            (State::Ready | State::Working { .. }, Message::Ack(ack)) => {
                self.events.push_back(ParticipantEvent::Accepted { round: ack.round });
                Ok(())
            }
            (_, Message::Rejected(r)) => {
                self.events.push_back(ParticipantEvent::Rejected { code: r.code, round: r.round, detail: r.detail });
                Ok(())
            }
            (State::Ready | State::Working { .. }, Message::Finished(f)) => {
                if let Some((round, replica)) = &self.replica
                    && replica.hash != f.model_hash
                {
                    return Err(Misbehaviour::ReplicaMismatch { round: *round }.into());
                }
                self.state = State::Finished;
                self.events.push_back(ParticipantEvent::Finished { rounds: f.rounds, model_hash: f.model_hash });
                Ok(())
            }
            (_, other) => Err(Misbehaviour::Unexpected(other.name()).into()),
        }
    }

    /// Submits the result of the pending task: signs and queues the report.
    pub fn submit(
        &mut self,
        _now: Instant,
        eval: Option<EvalReport>,
        update: Option<ClientUpdate>,
    ) -> Result<(), Error> {
        let State::Working { round, task } = self.state else {
            return Err(Misuse::NoPendingTask.into());
        };
        match (task, &update) {
            (Task::Train, None) => return Err(Misuse::WrongSubmission("training task needs an update").into()),
            (Task::Evaluate, Some(_)) => return Err(Misuse::WrongSubmission("evaluation task takes no update").into()),
            _ => {}
        }
        self.queue_report(round, eval, update)
    }

    /// Answers the pending training task with "local training failed" (e.g.
    /// the loss diverged on the model we were sent): a signed report without
    /// an update, with our evaluation of the model if we have one. The server
    /// counts it as an answer, not as an update, and never as a violation, so
    /// a model that makes every client's training diverge can't stall the
    /// run, and a client is never made to exit by the model it is sent.
    pub fn submit_failure(&mut self, _now: Instant, eval: Option<EvalReport>) -> Result<(), Error> {
        match self.state {
            State::Working { round, task: Task::Train } => self.queue_report(round, eval, None),
            State::Working { task: Task::Evaluate, .. } => {
                Err(Misuse::WrongSubmission("an evaluation task has no training to fail").into())
            }
            _ => Err(Misuse::NoPendingTask.into()),
        }
    }

    /// Signs and queues the report for `round`, leaving out an evaluation
    /// the server would refuse ([`usable_eval`]).
    fn queue_report(
        &mut self,
        round: u32,
        eval: Option<EvalReport>,
        update: Option<ClientUpdate>,
    ) -> Result<(), Error> {
        let run_id = self.run.as_ref().map(|r| r.run_id).ok_or(Misuse::NoPendingTask)?;
        let report = Report { run_id, round, eval: eval.filter(usable_eval), update };
        let body = codec::encode_report(&report);
        let signature = self.identity.sign(&report_transcript(&body));
        self.transmits.push_back(codec::encode(&Message::Report(SignedReport { body, signature })));
        self.state = State::Ready;
        Ok(())
    }

    /// Builds a signed report frame without touching the state machine: for
    /// tests and attack simulations that need to craft (mis)behaviour.
    pub fn sign_report(&self, report: &Report) -> Vec<u8> {
        let body = codec::encode_report(report);
        let signature = self.identity.sign(&report_transcript(&body));
        codec::encode(&Message::Report(SignedReport { body, signature }))
    }
}

/// Whether an evaluation is one the server accepts: a model that makes
/// training diverge also evaluates to an infinite or NaN loss, and the server
/// refuses such a report as inconsistent (a violation). We leave it out
/// rather than be counted against for the model we were sent.
fn usable_eval(e: &EvalReport) -> bool {
    e.correct <= e.total && e.loss_sum.is_finite() && e.loss_sum >= 0.0
}
