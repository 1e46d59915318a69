//! The server's state machine.
//!
//! [`Coordinator`] never touches a socket or a clock. The host feeds it
//! connection events and received bytes together with `now`, and drains
//! [`Coordinator::poll_transmit`], [`Coordinator::poll_event`] and
//! [`Coordinator::poll_timeout`]. Decoding and signature checks happen inside
//! [`Coordinator::handle_message`], so the QUIC server and the simulator run
//! exactly the code an attacker's bytes reach.
//!
//! A run: wait until [`CoordinatorConfig::min_clients`] enrolled clients have
//! joined ([`Phase::AwaitingJoins`]), then for each round sample clients, send
//! them the global model and wait for their signed reports
//! ([`Phase::AwaitingReports`]). A round closes when every sampled client has
//! answered or left and at least [`CoordinatorConfig::quorum`] updates were
//! accepted, or at the deadline if the quorum is met; a round short of its
//! quorum at the deadline is extended and topped up with fresh clients. After
//! the last round an optional evaluation-only round collects the clients'
//! verdict on the final model. Then [`Phase::Finished`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aggregate::{AggregateStats, Aggregator, ClientIndex, StateError};
use crate::codec;
use crate::durable::{DURABLE_VERSION, DurableError, Persist, Record, Snapshot};
use crate::error::{Error, Malformed, Misbehaviour, Misuse};
use crate::identity::{join_transcript, params_hash, report_transcript, verify};
use crate::kind::{KindSettings, RuleSpec, RunShape, UpdateKind};
use crate::model::ModelArch;
use crate::rng::LocalRng;
use crate::wire::{
    self, Ack, EvalReport, Finished, Hello, Join, LogBody, Message, PublicKeyBytes, RejectCode, Rejected, RoundLog,
    RoundStart, RunConfig, RunId, SignedReport, Sync, Task, TrainSpec, Welcome,
};

/// Most clients a run may enrol. Bounds the coordinator's per-client tables;
/// far above the 10,000-client load goal.
pub const MAX_ENROLLED: usize = 1 << 20;

/// Longest round deadline a run may configure: one week, far above any round
/// of edge training (minutes). Deadlines are `now + round_timeout`, and
/// `Instant + Duration` panics on overflow, so the bound also keeps a
/// configured value like `u64::MAX` seconds from crashing the server.
pub const MAX_ROUND_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Default bound on `|value|` in a dense update
/// ([`CoordinatorConfig::max_update_abs`]). The models Tally trains have
/// parameters of order 1 and a round of local SGD moves each by far less
/// than 1; a delta of 1,000 in any coordinate is no training step. Values
/// that large, averaged into the model, multiply through a few layers into
/// f32 overflow, and every honest client's next training diverges: the
/// bound refuses them at the door (finite values pass the NaN checks).
pub const DEFAULT_MAX_UPDATE_ABS: f32 = 1_000.0;

/// Share of a round's sample whose updates close it, unless configured
/// ([`default_quorum`]): the sample over-selects by a quarter, as production
/// systems do (Bonawitz et al., "Towards Federated Learning at Scale", 2019,
/// select 130% of the clients a round needs), so a round closes at its
/// deadline although a client or two left or straggled.
pub const DEFAULT_QUORUM_FRACTION: (usize, usize) = (4, 5);

/// The quorum a driver uses when none is configured: 4/5 of
/// `clients_per_round` rounded down, at least 1, raised to the smallest
/// size `rule` accepts (a trimmed mean or Krum needs more updates than it
/// discards); `clients_per_round` when even that is too small, which the
/// rule then refuses with its reason.
pub fn default_quorum(clients_per_round: usize, rule: &RuleSpec) -> usize {
    let (num, den) = DEFAULT_QUORUM_FRACTION;
    let base = (clients_per_round.saturating_mul(num) / den).max(1).min(clients_per_round.max(1));
    (base..=clients_per_round).find(|&q| rule.check_round_size(q).is_ok()).unwrap_or(clients_per_round)
}

/// Most training rounds a run may have: the evaluation round after the last
/// one is numbered `rounds + 1`, which must fit the wire's `u32`.
pub const MAX_ROUNDS: u32 = u32::MAX - 1;

/// A connection, as numbered by the host (one per QUIC connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionHandle(pub u64);

/// Bytes to send on a new stream of connection `to`.
#[derive(Clone, Debug)]
pub struct Transmit {
    /// Destination.
    pub to: ConnectionHandle,
    /// One encoded message. Shared: a round's model broadcast is encoded once.
    pub bytes: Arc<[u8]>,
}

/// Configuration of a run.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Identifies the run in every signature.
    pub run_id: RunId,
    /// Model shapes.
    pub arch: ModelArch,
    /// Training rounds.
    pub rounds: u32,
    /// Public keys admitted, in enrolment order (index = client id).
    pub enrolled: Vec<PublicKeyBytes>,
    /// Clients that must have joined before round 1 opens.
    pub min_clients: usize,
    /// Clients sampled per round.
    pub clients_per_round: usize,
    /// Accepted updates needed to close a training round.
    pub quorum: usize,
    /// Time a round waits for reports before closing or extending.
    pub round_timeout: Duration,
    /// Local training hyper-parameters.
    pub train: TrainSpec,
    /// The update kind and its settings ([`crate::kind`]).
    pub kind: KindSettings,
    /// How the kind combines a round's payloads (when it supports a choice).
    pub rule: RuleSpec,
    /// Protocol violations tolerated per client before its connection is closed.
    pub max_violations: u32,
    /// Largest `|value|` a dense update (FedAvg, FedAvgM) may carry; an
    /// update with a larger one is refused ([`Misbehaviour::OutOfBounds`],
    /// counted as a violation) and the round goes on without it. A liveness
    /// guard: one client's finite but huge values would otherwise ruin the
    /// model and make every honest client's training diverge. Robust rules
    /// ([`RuleSpec::Median`]) are the defence of accuracy; this bound only
    /// keeps the run alive. Default [`DEFAULT_MAX_UPDATE_ABS`].
    pub max_update_abs: f32,
    /// Optional fixed schedule: the client ids of each round (round `r` uses
    /// entry `r-1`; rounds beyond the list sample at random).
    pub schedule: Option<Vec<Vec<ClientIndex>>>,
    /// Run an evaluation-only round on the final model.
    pub final_evaluation: bool,
    /// The secret seed of differential-privacy noise ([`crate::dp::noise`]),
    /// drawn by the host from its own entropy (simulations and tests:
    /// [`crate::dp::NoiseSeed::insecure_from_u64`]). Kinds that add noise
    /// ([`crate::dpftrl`]) refuse to run without one; others ignore it. It
    /// never leaves the server: the aggregator keeps it in its durable state,
    /// which wins over this one after a restart. `None` where no kind needs it.
    pub noise_seed: Option<crate::dp::NoiseSeed>,
}

impl CoordinatorConfig {
    /// Checks the configuration is usable.
    pub fn validate(&self) -> Result<(), Misuse> {
        let bad = |s: &str| Err(Misuse::Config(s.to_string()));
        self.arch.validate().map_err(|e| Misuse::Config(e.to_string()))?;
        if self.enrolled.is_empty() {
            return bad("no enrolled clients");
        }
        if self.enrolled.len() > MAX_ENROLLED {
            return bad("too many enrolled clients");
        }
        if self.rounds == 0 || self.rounds > MAX_ROUNDS {
            return bad("rounds must be in 1..=MAX_ROUNDS");
        }
        if self.min_clients == 0 || self.clients_per_round == 0 || self.quorum == 0 {
            return bad("min_clients, clients_per_round and quorum must be at least 1");
        }
        if self.clients_per_round > self.enrolled.len() {
            // Named before the quorum, which defaults to it in the drivers:
            // the operator set this one.
            return Err(Misuse::Config(format!(
                "clients_per_round ({}) exceeds the number of enrolled clients ({})",
                self.clients_per_round,
                self.enrolled.len()
            )));
        }
        if self.quorum > self.clients_per_round {
            return bad("quorum exceeds clients_per_round");
        }
        if self.min_clients > self.enrolled.len() {
            return bad("min_clients exceeds the number of enrolled clients");
        }
        if self.quorum > self.enrolled.len() {
            // Rounds could never close: they would be extended forever.
            return bad("quorum exceeds the number of enrolled clients");
        }
        if self.round_timeout.is_zero() || self.round_timeout > MAX_ROUND_TIMEOUT {
            return bad("round_timeout must be positive and at most MAX_ROUND_TIMEOUT (one week)");
        }
        self.train.validate().map_err(|e| Misuse::Config(format!("train: {e}")))?;
        if !(self.max_update_abs.is_finite() && self.max_update_abs > 0.0) {
            return bad("max_update_abs must be finite and positive");
        }
        let unique: BTreeSet<_> = self.enrolled.iter().collect();
        if unique.len() != self.enrolled.len() {
            return bad("a public key is enrolled twice");
        }
        if let Some(s) = &self.schedule
            && s.iter().flatten().any(|&c| c as usize >= self.enrolled.len())
        {
            return bad("schedule names a client id that is not enrolled");
        }
        Ok(())
    }
}

/// What the coordinator is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Fewer than `min_clients` have joined.
    AwaitingJoins,
    /// A round is open.
    AwaitingReports {
        /// The open round.
        round: u32,
        /// Its task.
        task: Task,
    },
    /// The run is over.
    Finished,
}

/// Summary of a closed round.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundSummary {
    /// The round.
    pub round: u32,
    /// Its task.
    pub task: Task,
    /// Clients asked (including top-ups after extensions).
    pub sampled: usize,
    /// Reports accepted (in a training round: updates).
    pub accepted: usize,
    /// Training round: clients that answered that their local training
    /// failed (a report without an update), not counted as updates.
    pub failed: usize,
    /// Messages refused during the round.
    pub rejected: u32,
    /// Aggregation result: `None` for an evaluation round, for a training
    /// round whose aggregation was refused (it would have made the model
    /// non-finite), and for a round closed without its quorum of updates
    /// because its clients answered that they could not train (see
    /// [`Coordinator::handle_timeout`]); the model is then unchanged.
    pub stats: Option<AggregateStats>,
    /// Sum of the clients' evaluations of the model they received, i.e. the
    /// model *entering* this round (the result of round `round - 1`).
    pub eval_of_incoming: Option<EvalReport>,
    /// Hash of the global model after the round.
    pub model_hash: [u8; 32],
    /// Bytes of reports accepted this round (signed frames).
    pub bytes_received: u64,
    /// Bytes the host was handed to send since the previous round closed:
    /// this round's model broadcast, the previous round's replication log,
    /// acknowledgements and refusals (message bytes, without QUIC's
    /// framing).
    pub bytes_sent: u64,
}

/// Something the host may want to act on or log.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A client proved its key.
    ClientJoined {
        /// Its connection.
        conn: ConnectionHandle,
        /// Its id.
        client: ClientIndex,
    },
    /// A round opened.
    RoundOpened {
        /// The round.
        round: u32,
        /// Its task.
        task: Task,
        /// Sampled clients.
        sampled: Vec<ClientIndex>,
    },
    /// A report was accepted.
    ReportAccepted {
        /// The round.
        round: u32,
        /// The client.
        client: ClientIndex,
    },
    /// A sampled client answered that its local training failed (e.g. it
    /// diverged): the round no longer waits for it, and nothing is aggregated
    /// from it.
    TrainingFailed {
        /// The round.
        round: u32,
        /// The client.
        client: ClientIndex,
    },
    /// A message was refused.
    Rejected {
        /// Connection it came on.
        conn: ConnectionHandle,
        /// The client, if it had joined.
        client: Option<ClientIndex>,
        /// Why.
        error: Error,
    },
    /// A round short of its quorum took more clients: at its deadline
    /// (stragglers are replaced by clients not yet asked) or when a client
    /// joined (it replaces one that left). With nobody added and nobody
    /// `waiting`, the round waits for clients to join, and takes the first
    /// that do at once.
    RoundExtended {
        /// The round.
        round: u32,
        /// Accepted so far.
        accepted: usize,
        /// Updates the round needs.
        quorum: usize,
        /// Sampled clients still connected that have not answered (after
        /// the top-up).
        waiting: usize,
        /// Clients added.
        added: Vec<ClientIndex>,
    },
    /// A round closed.
    RoundCompleted(RoundSummary),
    /// The host should close this connection (after sending queued messages).
    CloseConnection {
        /// Which.
        conn: ConnectionHandle,
        /// Why.
        reason: RejectCode,
    },
    /// The run is over.
    Finished {
        /// Training rounds completed.
        rounds: u32,
        /// Hash of the final model.
        model_hash: [u8; 32],
    },
    /// A client was sent the end of the run (hosts that linger after the
    /// end, for clients that were reconnecting, can stop once all have been).
    FinishSent {
        /// The client.
        client: ClientIndex,
    },
}

#[derive(Debug)]
struct Conn {
    client: Option<ClientIndex>,
    challenge: [u8; 32],
    /// Violations before joining (after, they count against the identity).
    violations: u32,
}

#[derive(Debug)]
struct OpenRound {
    round: u32,
    task: Task,
    deadline: Instant,
    sampled: BTreeSet<ClientIndex>,
    reported: BTreeSet<ClientIndex>,
    eval: Option<EvalReport>,
    accepted: usize,
    /// Reports without an update in a training round (local training failed).
    failed: usize,
    rejected: u32,
    bytes_received: u64,
    start_msg: Arc<[u8]>,
    extensions: u32,
    /// Rebuilt from the log after a restart: its sampled clients get until
    /// the deadline to reconnect before the round may close without them.
    restored: bool,
}

/// The server's sans-IO state machine. See the module docs.
#[derive(Debug)]
pub struct Coordinator {
    config: CoordinatorConfig,
    kind: std::sync::Arc<dyn UpdateKind>,
    aggregator: Box<dyn Aggregator>,
    /// Seed of sampling and round seeds: both are pure functions of it and
    /// the round, so a restored coordinator samples exactly as before.
    rng_seed: u64,
    /// Whether the host persists state ([`Coordinator::enable_persistence`]).
    durable: bool,
    persist: VecDeque<Persist>,
    /// Whether the final evaluation round has been held.
    evaluated: bool,
    model: Vec<f32>,
    phase: Phase,
    open: Option<OpenRound>,
    conns: BTreeMap<ConnectionHandle, Conn>,
    by_client: BTreeMap<ClientIndex, ConnectionHandle>,
    key_index: HashMap<PublicKeyBytes, ClientIndex>,
    violations: BTreeMap<ClientIndex, u32>,
    completed_rounds: u32,
    max_message: usize,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// Replicated kinds: the checkpoint new clients start from, and the
    /// logs of the rounds after it.
    checkpoint: Option<Checkpoint>,
    /// Bytes handed to the host ([`Coordinator::poll_transmit`]) since the
    /// last round closed; reported in its [`RoundSummary::bytes_sent`].
    sent_since_close: u64,
    /// Whether this instance has opened a round since it was created or
    /// restored: the first round waits for `min_clients` (after a restart
    /// the clients are still reconnecting), later ones only for the
    /// clients a round needs, so a client that is gone for good can't
    /// stall the run.
    opened_here: bool,
    /// Clients no round may sample as half or more of its draw
    /// ([`Coordinator::redraw_majority`]); `None`: plain sampling.
    minority: Option<BTreeSet<ClientIndex>>,
}

/// The most draws [`sample_minority`] makes before it gives up.
pub const MAX_REDRAWS: u32 = 100_000;

/// FRL's sampling rule (its `FL_train.py`): `k` of `joined` drawn from `rng`
/// as [`LocalRng::sample`] draws them, the draw repeated from the same
/// generator while clients `flagged` are half or more of it. The first draw
/// is the plain one, so when it already has a minority of flagged clients
/// the result is what plain sampling gives. If no draw can have a flagged
/// minority (too few unflagged clients), or none does in [`MAX_REDRAWS`]
/// draws, the last draw stands: the rule is a best effort, never a stall.
pub fn sample_minority(
    rng: &mut LocalRng,
    joined: &[ClientIndex],
    k: usize,
    flagged: &BTreeSet<ClientIndex>,
) -> Vec<ClientIndex> {
    let size = k.min(joined.len());
    let unflagged = joined.iter().filter(|c| !flagged.contains(c)).count();
    // Every draw has at least `size − unflagged` flagged clients.
    let possible = 2 * size.saturating_sub(unflagged) < size;
    let mut draw = rng.sample(joined, k);
    let mut tries = 1;
    while possible && tries < MAX_REDRAWS && 2 * draw.iter().filter(|c| flagged.contains(c)).count() >= size {
        draw = rng.sample(joined, k);
        tries += 1;
    }
    draw
}

#[derive(Debug)]
struct Checkpoint {
    round: u32,
    params: Vec<f32>,
    logs: Vec<RoundLog>,
    log_bytes: usize,
    /// The `Sync` frame of this checkpoint and logs, encoded once for every
    /// client that joins until they change: clients joining together (a
    /// run's start: thousands in a simulation) share one frame, not a
    /// model-sized copy each. `None` until a join needs it.
    frame: Option<Arc<[u8]>>,
}

impl Coordinator {
    /// A coordinator for `config` starting from `initial` parameters, with
    /// all its local randomness (sampling, challenges) drawn from `rng_seed`.
    /// The run's kind and aggregator come from the registry
    /// ([`KindSettings::build`]), checked against the model and the rule.
    pub fn new(config: CoordinatorConfig, initial: Vec<f32>, rng_seed: u64) -> Result<Self, Misuse> {
        config.validate()?;
        config.arch.check_params(&initial).map_err(|e| Misuse::Config(format!("initial model: {e}")))?;
        let kind = config.kind.build(&config.arch)?;
        // A round closes with at least `quorum` updates: the rule's
        // parameters must hold for that many.
        config.rule.check_round_size(config.quorum)?;
        let shape = RunShape {
            arch: &config.arch,
            clients_per_round: config.clients_per_round,
            rounds: config.rounds,
            max_update_abs: config.max_update_abs,
            noise_seed: config.noise_seed.as_ref(),
        };
        let mut aggregator = kind.aggregator(&shape, &config.rule, &initial)?;
        let checkpoint = kind.replicated().then(|| Checkpoint {
            round: 0,
            params: initial.clone(),
            logs: Vec::new(),
            log_bytes: 0,
            frame: None,
        });
        // A fresh run's initial model, or a restored one: the aggregator
        // derives its state (FRL's global ranking) from it.
        aggregator.restore_model(&initial).map_err(|e| Misuse::Config(format!("initial model: {e}")))?;
        let key_index = config.enrolled.iter().enumerate().map(|(i, k)| (*k, i as ClientIndex)).collect();
        let max_message = wire::max_message_bytes_for(&config.arch);
        Ok(Coordinator {
            config,
            kind,
            aggregator,
            rng_seed,
            durable: false,
            persist: VecDeque::new(),
            evaluated: false,
            model: initial,
            phase: Phase::AwaitingJoins,
            open: None,
            conns: BTreeMap::new(),
            by_client: BTreeMap::new(),
            key_index,
            violations: BTreeMap::new(),
            completed_rounds: 0,
            opened_here: false,
            minority: None,
            sent_since_close: 0,
            max_message,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            checkpoint,
        })
    }

    /// The run configuration clients receive.
    pub fn run_config(&self) -> RunConfig {
        RunConfig {
            run_id: self.config.run_id,
            arch: self.config.arch.clone(),
            rounds: self.config.rounds,
            train: self.config.train.clone(),
            kind: self.kind.settings(),
        }
    }

    /// The run's update kind.
    pub fn kind(&self) -> &dyn UpdateKind {
        self.kind.as_ref()
    }

    /// The largest message a client may send in this run: drivers read
    /// streams with this limit and report longer ones to
    /// [`Coordinator::handle_oversize`].
    pub fn max_message_bytes(&self) -> usize {
        self.max_message
    }

    /// The largest message `conn` may send now: handshake-sized
    /// ([`crate::wire::MAX_HANDSHAKE_BYTES`]) until it has joined, so an
    /// unauthenticated peer can't make the host buffer a model-sized
    /// stream; [`Coordinator::max_message_bytes`] after. Drivers read with
    /// this limit, and [`Coordinator::handle_oversize`] names it.
    pub fn max_message_bytes_of(&self, conn: ConnectionHandle) -> usize {
        match self.client_of(conn) {
            Some(_) => self.max_message,
            None => crate::wire::MAX_HANDSHAKE_BYTES,
        }
    }

    /// The current global parameters.
    pub fn model(&self) -> &[f32] {
        &self.model
    }

    /// What the coordinator waits for.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Training rounds completed.
    pub fn completed_rounds(&self) -> u32 {
        self.completed_rounds
    }

    /// Protocol violations per client id so far.
    pub fn violations(&self) -> &BTreeMap<ClientIndex, u32> {
        &self.violations
    }

    /// The client a connection has joined as, if it has.
    pub fn client_of(&self, conn: ConnectionHandle) -> Option<ClientIndex> {
        self.conns.get(&conn).and_then(|c| c.client)
    }

    /// Clients joined right now.
    pub fn joined_clients(&self) -> usize {
        self.by_client.len()
    }

    /// Next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.transmits.pop_front()?;
        self.sent_since_close = self.sent_since_close.saturating_add(t.bytes.len() as u64);
        Some(t)
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Coordinator::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.open.as_ref().map(|o| o.deadline)
    }

    /// A new connection: the coordinator greets it with `challenge`, which the
    /// host draws fresh for every connection (the server from the OS; the
    /// simulator from its seed). It must be unpredictable to peers: a join
    /// signature is only as fresh as its challenge.
    pub fn handle_connect(&mut self, _now: Instant, conn: ConnectionHandle, challenge: [u8; 32]) {
        self.conns.insert(conn, Conn { client: None, challenge, violations: 0 });
        self.send(conn, &Message::Hello(Hello { run_id: self.config.run_id, challenge }));
    }

    /// A connection is gone.
    pub fn handle_disconnect(&mut self, now: Instant, conn: ConnectionHandle) {
        let Some(c) = self.conns.remove(&conn) else { return };
        if let Some(client) = c.client
            && self.by_client.get(&client) == Some(&conn)
        {
            self.by_client.remove(&client);
        }
        self.maybe_close_round(now);
    }

    /// The host's read of a stream on `conn` stopped at the limit
    /// ([`Coordinator::max_message_bytes_of`]): count it as a malformed
    /// message. The error names that limit, the one the host applied.
    pub fn handle_oversize(&mut self, now: Instant, conn: ConnectionHandle, len_at_least: usize) -> Error {
        let limit = self.max_message_bytes_of(conn);
        let err = Error::Malformed(Malformed::Oversize { len: len_at_least, limit });
        self.reject(now, conn, None, err.clone());
        err
    }

    /// One complete message received on `conn`.
    ///
    /// Every refusal is also reported to the peer (a `Rejected` message), as
    /// an [`Event::Rejected`], and counted against the client; the returned
    /// error is for the host's logs.
    pub fn handle_message(&mut self, now: Instant, conn: ConnectionHandle, bytes: &[u8]) -> Result<(), Error> {
        let prepared = self.preparer().prepare(bytes);
        self.handle_prepared(now, conn, prepared)
    }

    /// What [`Coordinator::prepare`]s frames for this coordinator: a small
    /// `Copy + Send` value a host hands to other threads.
    pub fn preparer(&self) -> Preparer {
        Preparer { max_message: self.max_message }
    }

    /// [`Coordinator::handle_message`] for a frame whose stateless work a
    /// [`Preparer`] did ahead, possibly on another thread. The outcome is
    /// exactly `handle_message`'s on the same bytes.
    pub fn handle_prepared(&mut self, now: Instant, conn: ConnectionHandle, prepared: Prepared) -> Result<(), Error> {
        if !self.conns.contains_key(&conn) {
            return Err(Misuse::UnknownConnection.into());
        }
        let Prepared { len, message, transcript } = prepared;
        let result = match message {
            Err(e) => Err((Error::from(e), None)),
            Ok(Message::Join(join)) => self.on_join(now, conn, join),
            Ok(Message::Report(report)) => self.on_report(now, conn, report, transcript, len),
            Ok(other) => Err((Misbehaviour::Unexpected(other.name()).into(), None)),
        };
        match result {
            Ok(()) => Ok(()),
            Err((err, round)) => {
                self.reject(now, conn, round, err.clone());
                // The rejection may have closed a sampled client's connection.
                self.maybe_close_round(now);
                Err(err)
            }
        }
    }

    /// Time passed: close or extend an overdue round.
    ///
    /// A training round short of its quorum of updates is extended and
    /// topped up with fresh clients, except when waiting can't help: a
    /// quorum of clients has answered, some that they could not train, no
    /// sampled client is still pending and no joined client is left to ask.
    /// Then the round closes without aggregating (the model is kept), so
    /// that clients whose training diverges (a model ruined by a poisoned
    /// round, a learning rate too high for their data) can't stall the run.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(open) = &self.open else { return };
        if now < open.deadline {
            return;
        }
        let enough = match open.task {
            Task::Train => open.accepted >= self.config.quorum,
            // An evaluation round never blocks the end of the run.
            Task::Evaluate => true,
        };
        if enough || self.round_cannot_fill(open) {
            self.close_round(now);
        } else {
            self.extend_round(now);
        }
    }

    /// Whether an open training round short of its quorum can't get more
    /// updates by waiting: see [`Coordinator::handle_timeout`].
    fn round_cannot_fill(&self, open: &OpenRound) -> bool {
        let answered = open.accepted.saturating_add(open.failed);
        let pending = self.live_pending(open) > 0;
        let fresh = self.by_client.keys().any(|c| !open.sampled.contains(c));
        open.failed > 0 && answered >= self.config.quorum && !pending && !fresh
    }

    /// Whether an open training round can't reach its quorum with the
    /// updates it has and the sampled clients still connected and pending.
    fn short_of_quorum(&self, open: &OpenRound) -> bool {
        open.task == Task::Train && open.accepted.saturating_add(self.live_pending(open)) < self.config.quorum
    }

    /// Sampled clients of `open` that are connected and have not answered.
    fn live_pending(&self, open: &OpenRound) -> usize {
        open.sampled.iter().filter(|c| !open.reported.contains(c) && self.by_client.contains_key(c)).count()
    }

    fn on_join(&mut self, now: Instant, conn: ConnectionHandle, join: Join) -> Result<(), (Error, Option<u32>)> {
        let c = self.conns.get(&conn).ok_or((Misuse::UnknownConnection.into(), None))?;
        if c.client.is_some() {
            return Err((Misbehaviour::Unexpected("second Join").into(), None));
        }
        let Some(&client) = self.key_index.get(&join.public_key) else {
            return Err((Misbehaviour::NotEnrolled(join.public_key.to_string()).into(), None));
        };
        let transcript = join_transcript(&self.config.run_id, &c.challenge, &join.public_key);
        verify(&join.public_key, &transcript, &join.signature).map_err(|e| (e.into(), None))?;

        // One live connection per identity: the newest wins (a client that
        // reconnects from a new address must not be locked out by its ghost).
        if let Some(old) = self.by_client.insert(client, conn)
            && old != conn
        {
            if let Some(oc) = self.conns.get_mut(&old) {
                oc.client = None;
            }
            self.send(old, &rejected(RejectCode::Superseded, None, "another connection joined with this key"));
            self.events.push_back(Event::CloseConnection { conn: old, reason: RejectCode::Superseded });
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.client = Some(client);
        }
        self.send(conn, &Message::Welcome(Welcome { client_id: client, config: self.run_config() }));
        if let Some(cp) = &mut self.checkpoint {
            // A replicated run: the client rebuilds the model from the
            // checkpoint and the logs since, then checks the hashes.
            let frame = cp
                .frame
                .get_or_insert_with(|| {
                    let sync = Sync { round: cp.round, params: cp.params.clone(), logs: cp.logs.clone() };
                    codec::encode(&Message::Sync(sync)).into()
                })
                .clone();
            self.transmits.push_back(Transmit { to: conn, bytes: frame });
        }
        self.events.push_back(Event::ClientJoined { conn, client });

        match self.phase {
            Phase::AwaitingJoins => self.open_next(now),
            Phase::AwaitingReports { .. } => {
                // A sampled client that reconnects gets its task again.
                if let Some(open) = &self.open
                    && open.sampled.contains(&client)
                    && !open.reported.contains(&client)
                {
                    let msg = open.start_msg.clone();
                    self.transmits.push_back(Transmit { to: conn, bytes: msg });
                } else if self.open.as_ref().is_some_and(|o| self.short_of_quorum(o) && !o.sampled.contains(&client)) {
                    // The round can't reach its quorum with the clients it
                    // asked (some left): the newcomer replaces one at once
                    // rather than at the next deadline.
                    self.add_to_round(now, vec![client]);
                }
                // A round restored with every report (the host died before
                // the snapshot that closes it) has nothing left to wait for:
                // close it now rather than at its deadline. A live round is
                // never in that state here (its last report closed it).
                self.maybe_close_round(now);
            }
            Phase::Finished => {
                self.send(conn, &self.finished_message());
                self.events.push_back(Event::FinishSent { client });
            }
        }
        Ok(())
    }

    fn on_report(
        &mut self,
        now: Instant,
        conn: ConnectionHandle,
        signed: SignedReport,
        transcript: Option<Vec<u8>>,
        frame_len: usize,
    ) -> Result<(), (Error, Option<u32>)> {
        let client =
            self.conns.get(&conn).and_then(|c| c.client).ok_or((Misbehaviour::NotJoined("Report").into(), None))?;
        let record =
            self.durable.then(|| Record::Accepted { client, body: signed.body.clone(), signature: signed.signature });
        let (round, outcome) = self.accept_report(client, signed, transcript, frame_len)?;
        // Durable before acknowledged: the host persists this record before
        // it sends the Ack queued below.
        if let Some(r) = record {
            self.append(r);
        }
        self.send(conn, &Message::Ack(Ack { round }));
        self.events.push_back(match outcome {
            Taken::Report => Event::ReportAccepted { round, client },
            Taken::TrainingFailed => Event::TrainingFailed { round, client },
        });
        self.maybe_close_round(now);
        Ok(())
    }

    /// Verifies and takes a report from `client` into the open round
    /// (live and during recovery); returns its round and what it was.
    /// `transcript` is the body's [`report_transcript`] when a [`Preparer`]
    /// took it ahead (only `prepare` builds one, from these same bytes).
    fn accept_report(
        &mut self,
        client: ClientIndex,
        signed: SignedReport,
        transcript: Option<Vec<u8>>,
        frame_len: usize,
    ) -> Result<(u32, Taken), (Error, Option<u32>)> {
        // Invariant: `client` came from `key_index`, built from `enrolled`, so
        // the lookup can't miss; a miss is refused like an unjoined peer
        // rather than indexed.
        let key = *self.config.enrolled.get(client as usize).ok_or((Misbehaviour::NotJoined("Report").into(), None))?;
        let transcript = transcript.unwrap_or_else(|| report_transcript(&signed.body));
        verify(&key, &transcript, &signed.signature).map_err(|e| (e.into(), None))?;
        let report = codec::decode_report(&signed.body).map_err(|e| (e.into(), None))?;
        let round = Some(report.round);
        if report.run_id != self.config.run_id {
            return Err((Misbehaviour::WrongRun.into(), round));
        }
        let open_round = self.open.as_ref().map(|o| o.round);
        // Rounds closed so far: the training rounds, then the evaluation
        // round numbered `rounds + 1` once it was held.
        let last_closed = self.completed_rounds.saturating_add(u32::from(self.evaluated));
        if (1..=last_closed).contains(&report.round) {
            // Signed by this client for this run, for a round that closed
            // before it arrived: a slow client, not a hostile one (a replay
            // of an old report is equally harmless). Refused, not counted.
            return Err((Error::Late { got: report.round, open: open_round }, round));
        }
        let Some(open) = self.open.as_mut().filter(|o| o.round == report.round) else {
            return Err((Misbehaviour::WrongRound { open: open_round, got: report.round }.into(), round));
        };
        if !open.sampled.contains(&client) {
            return Err((Misbehaviour::NotSampled(report.round).into(), round));
        }
        if open.reported.contains(&client) {
            return Err((Misbehaviour::Duplicate(report.round).into(), round));
        }
        if let Some(e) = &report.eval
            && (e.correct > e.total || !e.loss_sum.is_finite() || e.loss_sum < 0.0)
        {
            return Err((Misbehaviour::Unexpected("inconsistent evaluation report").into(), round));
        }
        let taken = match (open.task, &report.update) {
            (Task::Train, Some(update)) => {
                self.aggregator.absorb(client, update).map_err(|e| (e.into(), round))?;
                Taken::Report
            }
            // A training round's report without an update: the client could
            // not train (its training diverged). It has answered, so the
            // round stops waiting for it, but nothing is aggregated.
            (Task::Train, None) => Taken::TrainingFailed,
            (Task::Evaluate, Some(_)) => {
                return Err((Misbehaviour::WrongKind("evaluation round takes no update").into(), round));
            }
            (Task::Evaluate, None) => Taken::Report,
        };
        open.reported.insert(client);
        match taken {
            Taken::Report => open.accepted += 1,
            Taken::TrainingFailed => open.failed += 1,
        }
        open.bytes_received += frame_len as u64;
        if let Some(e) = report.eval {
            open.eval = Some(open.eval.map_or(e, |acc| acc.merge(&e)));
        }
        Ok((open.round, taken))
    }

    fn reject(&mut self, _now: Instant, conn: ConnectionHandle, round: Option<u32>, err: Error) {
        let client = self.conns.get(&conn).and_then(|c| c.client);
        // Counters a peer drives are saturating: wrap-around would reset the
        // violation count that gets it disconnected.
        if let Some(open) = self.open.as_mut() {
            open.rejected = open.rejected.saturating_add(1);
        }
        self.events.push_back(Event::Rejected { conn, client, error: err.clone() });
        let Some(code) = err.reject_code() else { return };
        self.send(conn, &rejected(code, round, &err.to_string()));
        if !err.is_violation() {
            // A late report: the peer is told, nothing is held against it.
            return;
        }
        let count = match client {
            Some(id) => {
                let v = self.violations.entry(id).or_insert(0);
                *v = v.saturating_add(1);
                let count = *v;
                self.append(Record::Violation { client: id, count });
                count
            }
            None => match self.conns.get_mut(&conn) {
                Some(c) => {
                    c.violations = c.violations.saturating_add(1);
                    c.violations
                }
                None => return,
            },
        };
        // An unauthenticated connection that fails to join has nothing more to
        // say; a joined client is closed only after repeated violations.
        // Bytes that aren't a message, from a peer that hasn't authenticated,
        // are not worth a second chance either.
        let fatal_join = client.is_none()
            && matches!(
                err,
                Error::Misbehaving(Misbehaviour::NotEnrolled(_) | Misbehaviour::BadSignature)
                    | Error::Incompatible(_)
                    | Error::Malformed(_)
            );
        if fatal_join || count >= self.config.max_violations {
            let reason = if fatal_join { code } else { RejectCode::TooManyViolations };
            if !fatal_join {
                self.send(conn, &rejected(reason, None, "too many protocol violations"));
            }
            self.events.push_back(Event::CloseConnection { conn, reason });
            if let Some(id) = client {
                self.by_client.remove(&id);
            }
            self.conns.remove(&conn);
        }
    }

    fn sample(&mut self, round: u32, task: Task) -> BTreeSet<ClientIndex> {
        let joined: Vec<ClientIndex> = self.by_client.keys().copied().collect();
        if task == Task::Evaluate {
            return joined.into_iter().collect();
        }
        // Rounds count from 1; `checked_sub` keeps a round 0 from indexing at usize::MAX.
        let entry = (round as usize).checked_sub(1);
        if let Some(list) = self.config.schedule.as_ref().zip(entry).and_then(|(s, i)| s.get(i)) {
            let want: BTreeSet<ClientIndex> = list.iter().copied().collect();
            return joined.into_iter().filter(|c| want.contains(c)).collect();
        }
        let mut rng = self.round_rng(round, 0);
        match &self.minority {
            Some(flagged) => sample_minority(&mut rng, &joined, self.config.clients_per_round, flagged),
            None => rng.sample(&joined, self.config.clients_per_round),
        }
        .into_iter()
        .collect()
    }

    /// FRL's rule for experiments with known attackers: from now on, a
    /// round's random sample is redrawn while `flagged` clients are half or
    /// more of it ([`sample_minority`]). Fixed schedules, top-ups after a
    /// deadline and evaluation rounds are not redrawn. A simulation device
    /// (a real server does not know its attackers); not persisted, so a
    /// restored coordinator samples plainly until it is set again.
    pub fn redraw_majority(&mut self, flagged: BTreeSet<ClientIndex>) {
        self.minority = Some(flagged);
    }

    /// A simulation device for experiments with known attackers, as FRL's
    /// reference code runs its baselines: from now on, the rule's attacker
    /// parameter (trimmed mean's `trim`, Krum's `byzantine`) is the number of
    /// `flagged` clients among each round's updates
    /// ([`Aggregator::know_attackers`]). A real server does not know its
    /// attackers; not persisted, so a restored coordinator uses the
    /// configured parameter until it is set again.
    pub fn rule_knows_attackers(&mut self, flagged: BTreeSet<ClientIndex>) {
        self.aggregator.know_attackers(flagged);
    }

    /// The generator of round `round`'s `k`-th draw (0 = sampling, then one
    /// per extension, `u32::MAX` = the round seed).
    fn round_rng(&self, round: u32, k: u32) -> LocalRng {
        LocalRng::new(crate::rng::mix(self.rng_seed, round, k))
    }

    fn open_round(&mut self, now: Instant, round: u32, task: Task) {
        self.opened_here = true;
        let sampled = self.sample(round, task);
        self.open_round_quietly(now, round, task, sampled.clone(), false);
        self.append(Record::RoundOpened { round, task, sampled: sampled.iter().copied().collect() });
        if let Some(open) = &self.open {
            let msg = open.start_msg.clone();
            for c in &sampled {
                if let Some(&conn) = self.by_client.get(c) {
                    self.transmits.push_back(Transmit { to: conn, bytes: msg.clone() });
                }
            }
        }
        self.events.push_back(Event::RoundOpened { round, task, sampled: sampled.iter().copied().collect() });
        // A round with nobody to ask (everyone left) waits for its deadline.
        self.maybe_close_round(now);
    }

    /// Opens a round with a given sample without telling anyone (shared by
    /// live opening and recovery).
    fn open_round_quietly(
        &mut self,
        now: Instant,
        round: u32,
        task: Task,
        sampled: BTreeSet<ClientIndex>,
        restored: bool,
    ) {
        if task == Task::Train {
            self.aggregator.begin_round(round, &self.model);
        }
        let seed = self.round_rng(round, u32::MAX).next_u64();
        let model = self.aggregator.publish(&self.model);
        let start = Message::RoundStart(RoundStart { round, task, seed, model });
        let start_msg: Arc<[u8]> = codec::encode(&start).into();
        self.phase = Phase::AwaitingReports { round, task };
        self.open = Some(OpenRound {
            round,
            task,
            deadline: self.deadline(now),
            sampled,
            reported: BTreeSet::new(),
            eval: None,
            accepted: 0,
            failed: 0,
            rejected: 0,
            bytes_received: 0,
            start_msg,
            extensions: 0,
            restored,
        });
    }

    fn extend_round(&mut self, now: Instant) {
        let deadline = self.deadline(now);
        let joined: Vec<ClientIndex> = self.by_client.keys().copied().collect();
        let Some(open) = self.open.as_mut() else { return };
        open.deadline = deadline;
        // Clients that have not answered by the deadline are stragglers: they
        // may still report, but the top-up replaces them as if they never
        // will. Counting them as pending would let one silent client block
        // the round forever.
        let want = self.config.clients_per_round.saturating_sub(open.accepted);
        let fresh: Vec<ClientIndex> = joined.into_iter().filter(|c| !open.sampled.contains(c)).collect();
        open.extensions = open.extensions.saturating_add(1);
        open.restored = false;
        let mut rng = LocalRng::new(crate::rng::mix(self.rng_seed, open.round, open.extensions));
        let added = rng.sample(&fresh, want);
        self.record_added(added);
    }

    /// Adds joined clients to the open round outside a deadline (a
    /// replacement for clients that left) and gives the round a fresh
    /// deadline, so the newcomers have a whole round's time to train.
    fn add_to_round(&mut self, now: Instant, added: Vec<ClientIndex>) {
        let deadline = self.deadline(now);
        let Some(open) = self.open.as_mut() else { return };
        open.deadline = deadline;
        open.extensions = open.extensions.saturating_add(1);
        open.restored = false;
        self.record_added(added);
    }

    /// Sends the open round's task to `added`, counts them as sampled, and
    /// logs it (a WAL `Extended` record: replay adds the same clients).
    fn record_added(&mut self, added: Vec<ClientIndex>) {
        let Some(open) = self.open.as_mut() else { return };
        for c in &added {
            open.sampled.insert(*c);
            if let Some(&conn) = self.by_client.get(c) {
                self.transmits.push_back(Transmit { to: conn, bytes: open.start_msg.clone() });
            }
        }
        let (round, accepted) = (open.round, open.accepted);
        let waiting = self.open.as_ref().map_or(0, |o| self.live_pending(o));
        self.events.push_back(Event::RoundExtended {
            round,
            accepted,
            quorum: self.config.quorum,
            waiting,
            added: added.clone(),
        });
        self.append(Record::Extended { round, added });
    }

    /// `now + round_timeout`. The timeout is at most [`MAX_ROUND_TIMEOUT`]
    /// (validated), so the sum only overflows for an `Instant` within a week
    /// of the end of time; then the deadline is `now` and the round closes or
    /// extends at the next `handle_timeout` instead of panicking.
    fn deadline(&self, now: Instant) -> Instant {
        now.checked_add(self.config.round_timeout).unwrap_or(now)
    }

    fn maybe_close_round(&mut self, now: Instant) {
        let Some(open) = &self.open else { return };
        let waiting = open
            .sampled
            .iter()
            .any(|c| !open.reported.contains(c) && (open.restored || self.by_client.contains_key(c)));
        if waiting {
            return;
        }
        let ready = match open.task {
            Task::Train => open.accepted >= self.config.quorum,
            Task::Evaluate => open.accepted > 0,
        };
        if ready {
            self.close_round(now);
        }
    }

    fn close_round(&mut self, now: Instant) {
        let Some(open) = self.open.take() else { return };
        let stats = match open.task {
            // An error keeps the model unchanged: `Empty` is unreachable (the
            // quorum is at least 1), `NonFinite` means the round's updates
            // would have overflowed the model, and then the round is skipped.
            Task::Train if open.accepted >= self.config.quorum => self.aggregator.finish(&mut self.model).ok(),
            // Closed short of its quorum because its clients could not train
            // (`handle_timeout`): too few updates to move the model. The
            // aggregator's round is discarded by the next `begin_round`.
            Task::Train | Task::Evaluate => None,
        };
        if open.task == Task::Train {
            let body = match stats {
                Some(_) => self.aggregator.take_log(),
                // A replicated run's skipped round still gets a log, so that
                // replicas count it and stay in step.
                None => self.kind.replicated().then_some(LogBody::Skipped),
            };
            if let Some(body) = body {
                self.publish_log(open.round, body);
            }
        }
        match open.task {
            Task::Train => self.completed_rounds = open.round,
            Task::Evaluate => self.evaluated = true,
        }
        self.events.push_back(Event::RoundCompleted(RoundSummary {
            round: open.round,
            task: open.task,
            sampled: open.sampled.len(),
            accepted: open.accepted,
            failed: open.failed,
            rejected: open.rejected,
            stats,
            eval_of_incoming: open.eval,
            model_hash: params_hash(&self.model),
            bytes_received: open.bytes_received,
            bytes_sent: std::mem::take(&mut self.sent_since_close),
        }));
        self.save_snapshot();
        self.open_next(now);
    }

    /// Opens the round that follows the completed ones, or finishes.
    fn open_next(&mut self, now: Instant) {
        // `completed_rounds <= rounds <= MAX_ROUNDS < u32::MAX`, so `+ 1` can't wrap.
        let next = self.completed_rounds.saturating_add(1);
        let training = self.training_left();
        let more = training || (self.config.final_evaluation && !self.evaluated);
        // The first round of this instance waits for `min_clients` (at the
        // start of the run, and after a restart while the clients are still
        // reconnecting); later rounds for as many as can close one: the
        // quorum (or `min_clients`, if the operator set it lower). Waiting
        // for every client a round could sample would let one client that
        // is gone for good stall the run.
        let needed =
            if self.opened_here { self.config.quorum.min(self.config.min_clients) } else { self.config.min_clients };
        if more && self.by_client.len() < needed {
            self.phase = Phase::AwaitingJoins;
            return;
        }
        if training {
            self.open_round(now, next, Task::Train);
        } else if self.config.final_evaluation && !self.evaluated {
            self.open_round(now, next, Task::Evaluate);
        } else {
            self.finish();
        }
    }

    /// Whether training rounds remain: fewer than `rounds` completed, and
    /// the aggregator can take another (a private run ends when its horizon
    /// of releases is used up, [`Aggregator::exhausted`]).
    fn training_left(&self) -> bool {
        self.completed_rounds < self.config.rounds && !self.aggregator.exhausted()
    }

    /// The durable state between rounds.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: DURABLE_VERSION,
            run_id: self.config.run_id,
            rng_seed: self.rng_seed,
            enrolled_hash: enrolled_hash(&self.config.enrolled),
            completed_rounds: self.completed_rounds,
            evaluated: self.evaluated,
            model: self.model.clone(),
            violations: self.violations.clone(),
            replica_checkpoint: self.checkpoint.as_ref().map(|c| (c.round, c.params.clone(), c.logs.clone())),
            aggregator_state: self.aggregator.state(),
        }
    }

    /// From now on, emit what the host must persist ([`Coordinator::poll_persist`]),
    /// starting with a snapshot of the fresh state. Call before the first
    /// connection; a restored coordinator persists already.
    pub fn enable_persistence(&mut self) {
        if !self.durable {
            self.durable = true;
            self.save_snapshot();
        }
    }

    /// Next item to make durable. Drain this *before* sending the
    /// transmits queued by the same input: an `Ack` may only leave once the
    /// record of what it acknowledges is on disk.
    pub fn poll_persist(&mut self) -> Option<Persist> {
        self.persist.pop_front()
    }

    fn save_snapshot(&mut self) {
        if self.durable {
            let snap = self.snapshot();
            self.persist.push_back(Persist::Snapshot(snap));
        }
    }

    fn append(&mut self, record: Record) {
        if self.durable {
            self.persist.push_back(Persist::Append(record));
        }
    }

    /// Rebuilds a coordinator from its last snapshot and the log written
    /// since, replaying every record through the live checks. The restored
    /// coordinator persists (no new snapshot until the next round closes; the
    /// host keeps appending to the same log). An open round waits until its
    /// deadline (from `now`) for its sampled clients to reconnect.
    pub fn restore(
        config: CoordinatorConfig,
        snapshot: Snapshot,
        records: &[Record],
        now: Instant,
    ) -> Result<Self, DurableError> {
        if snapshot.run_id != config.run_id {
            return Err(DurableError::Mismatch("run id"));
        }
        if snapshot.enrolled_hash != enrolled_hash(&config.enrolled) {
            return Err(DurableError::Mismatch("enrolled keys"));
        }
        // Said as what it is: the saved run's model is not the configured one
        // (say another `model` after a restart), not a fault of the log.
        config.arch.check_params(&snapshot.model).map_err(|e| DurableError::ModelMismatch(e.to_string()))?;
        let mut c = Coordinator::new(config, snapshot.model, snapshot.rng_seed).map_err(DurableError::Config)?;
        match (snapshot.aggregator_state, c.aggregator.state()) {
            (Some(state), _) => c.aggregator.restore_state(&state)?,
            (None, Some(_)) => return Err(StateError::Presence("missing for an aggregator that keeps some").into()),
            (None, None) => {}
        }
        c.completed_rounds = snapshot.completed_rounds;
        c.evaluated = snapshot.evaluated;
        c.violations = snapshot.violations;
        if let (Some(cp), Some((round, params, logs))) = (c.checkpoint.as_mut(), snapshot.replica_checkpoint) {
            let log_bytes = logs.iter().map(|l| codec::encode(&Message::RoundLog(l.clone())).len()).sum();
            *cp = Checkpoint { round, params, logs, log_bytes, frame: None };
        }
        let finished = !c.training_left() && (c.evaluated || !c.config.final_evaluation);
        if finished {
            c.phase = Phase::Finished;
        }
        for (index, record) in records.iter().enumerate() {
            let fail = |reason: String| DurableError::Replay { index, reason };
            match record {
                Record::RoundOpened { round, task, sampled } => {
                    if c.open.is_some() || *round != c.completed_rounds.saturating_add(1) {
                        return Err(fail(format!("round {round} opened after {} completed", c.completed_rounds)));
                    }
                    c.open_round_quietly(now, *round, *task, sampled.iter().copied().collect(), true);
                }
                Record::Extended { round, added } => {
                    let open = c
                        .open
                        .as_mut()
                        .filter(|o| o.round == *round)
                        .ok_or_else(|| fail("no such open round".into()))?;
                    open.sampled.extend(added.iter().copied());
                    open.extensions = open.extensions.saturating_add(1);
                }
                Record::Accepted { client, body, signature } => {
                    let signed = SignedReport { body: body.clone(), signature: *signature };
                    let len = body.len().saturating_add(64);
                    c.accept_report(*client, signed, None, len).map_err(|(e, _)| fail(e.to_string()))?;
                }
                Record::Violation { client, count } => {
                    c.violations.insert(*client, *count);
                }
            }
        }
        // Replay emits nothing: the records are already on disk and no
        // client is connected to hear about them.
        c.transmits.clear();
        c.events.clear();
        c.durable = true;
        Ok(c)
    }

    /// Broadcasts a round's log to every joined client and files it behind
    /// the checkpoint, taking a new checkpoint when the logs outgrow their
    /// budget.
    fn publish_log(&mut self, round: u32, body: LogBody) {
        let log = RoundLog { round, body, model_hash: params_hash(&self.model) };
        let msg: Arc<[u8]> = codec::encode(&Message::RoundLog(log.clone())).into();
        for &conn in self.by_client.values() {
            self.transmits.push_back(Transmit { to: conn, bytes: msg.clone() });
        }
        let Some(cp) = self.checkpoint.as_mut() else { return };
        cp.log_bytes = cp.log_bytes.saturating_add(msg.len());
        cp.logs.push(log);
        cp.frame = None;
        if cp.log_bytes > wire::SYNC_LOG_BUDGET_BYTES / 2 {
            *cp = Checkpoint { round, params: self.model.clone(), logs: Vec::new(), log_bytes: 0, frame: None };
        }
    }

    fn finish(&mut self) {
        self.phase = Phase::Finished;
        let msg: Arc<[u8]> = codec::encode(&self.finished_message()).into();
        for (&client, &conn) in &self.by_client {
            self.transmits.push_back(Transmit { to: conn, bytes: msg.clone() });
            self.events.push_back(Event::FinishSent { client });
        }
        self.events.push_back(Event::Finished { rounds: self.completed_rounds, model_hash: params_hash(&self.model) });
    }

    fn finished_message(&self) -> Message {
        Message::Finished(Finished { rounds: self.completed_rounds, model_hash: params_hash(&self.model) })
    }

    fn send(&mut self, to: ConnectionHandle, msg: &Message) {
        self.transmits.push_back(Transmit { to, bytes: codec::encode(msg).into() });
    }
}

/// What an accepted report was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Taken {
    /// An update (training round) or an evaluation (evaluation round).
    Report,
    /// A training round's report without an update: training failed.
    TrainingFailed,
}

fn rejected(code: RejectCode, round: Option<u32>, detail: &str) -> Message {
    Message::Rejected(Rejected { code, round, detail: codec::truncate_detail(detail.to_string()) })
}

/// SHA-256 over the enrolled keys in order (binds saved state to the list).
fn enrolled_hash(keys: &[PublicKeyBytes]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for k in keys {
        h.update(k.0);
    }
    h.finalize().into()
}

/// Does a received frame's stateless work ahead of the coordinator: decoding
/// it, and for a report, the SHA-256 digest its signature covers. Those are
/// the costly, state-free parts of taking a report (a digest of 797 kB for
/// the MNIST MLP), so a host runs them on any thread (the server on the
/// connection's task, the simulator beside the clients' training) and the
/// single-threaded coordinator only verifies and aggregates. Obtained from
/// [`Coordinator::preparer`].
#[derive(Clone, Copy, Debug)]
pub struct Preparer {
    max_message: usize,
}

impl Preparer {
    /// The frame's stateless work, for [`Coordinator::handle_prepared`].
    pub fn prepare(&self, bytes: &[u8]) -> Prepared {
        let message = codec::decode(bytes, self.max_message);
        let transcript = match &message {
            Ok(Message::Report(signed)) => Some(report_transcript(&signed.body)),
            _ => None,
        };
        Prepared { len: bytes.len(), message, transcript }
    }
}

impl Prepared {
    /// The frame's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the frame was empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A frame [`Preparer::prepare`]d: only that function builds one, so its
/// digest is always of its own report's body.
#[derive(Debug)]
pub struct Prepared {
    len: usize,
    message: Result<Message, codec::DecodeError>,
    transcript: Option<Vec<u8>>,
}

#[cfg(test)]
mod minority_tests {
    use super::*;

    #[test]
    fn redraws_until_flagged_clients_are_a_minority() {
        let joined: Vec<ClientIndex> = (0..10).collect();
        let flagged: BTreeSet<ClientIndex> = (0..5).collect();
        let mut redrawn = 0;
        for seed in 0..200u64 {
            let plain = LocalRng::new(seed).sample(&joined, 5);
            let got = sample_minority(&mut LocalRng::new(seed), &joined, 5, &flagged);
            // Deterministic in the generator.
            assert_eq!(got, sample_minority(&mut LocalRng::new(seed), &joined, 5, &flagged));
            assert_eq!(got.len(), 5);
            assert!(2 * got.iter().filter(|c| flagged.contains(c)).count() < 5, "{seed}: {got:?}");
            if 2 * plain.iter().filter(|c| flagged.contains(c)).count() < 5 {
                // A draw that already qualifies is the plain one.
                assert_eq!(got, plain);
            } else {
                redrawn += 1;
            }
        }
        // Half the draws of 5 from 5 + 5 have 3 or more flagged: some were redrawn.
        assert!(redrawn > 50, "{redrawn}");
    }

    #[test]
    fn nothing_flagged_or_impossible_gives_the_plain_draw() {
        let joined: Vec<ClientIndex> = (0..6).collect();
        let plain = LocalRng::new(3).sample(&joined, 4);
        assert_eq!(sample_minority(&mut LocalRng::new(3), &joined, 4, &BTreeSet::new()), plain);
        // 4 of 6 with 4 flagged: every draw has at least 2 of 4 flagged.
        let flagged: BTreeSet<ClientIndex> = (0..4).collect();
        assert_eq!(sample_minority(&mut LocalRng::new(3), &joined, 4, &flagged), plain);
    }
}
