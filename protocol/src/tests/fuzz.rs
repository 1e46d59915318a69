//! Stable fuzzing of what an attacker reaches (design §7, "fuzz" layer).
//!
//! - Hostile frames: arbitrary bytes and mutations of valid frames (bit flips,
//!   truncations, appended or overwritten bytes, splices of two variants) go
//!   into `Coordinator::handle_message` and `Participant::handle_message` in
//!   every reachable state. Nothing may panic, and afterwards the honest
//!   clients must still finish the run.
//! - Operation sequences: random connects, disconnects, joins with valid and
//!   invalid keys, reports for random rounds and timeouts at random times
//!   against a `Coordinator`, with its invariants checked after every step.
//!
//! Case counts are modest so the protocol suite stays at a few seconds in
//! release; long runs belong to cargo-fuzz targets over the same entry points.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::sample::Index;

use super::*;
use crate::aggregate::ClientIndex;
use crate::codec::HEADER_BYTES;
use crate::identity::{join_transcript, report_transcript};
use crate::wire::{
    Ack, Finished, Hello, Join, MAX_HANDSHAKE_BYTES, MAX_MESSAGE_BYTES, ModelSync, Rejected, RoundStart, RunConfig,
    SignedReport, Welcome,
};

/// The raw connection an attacker holds next to the honest clients.
const ATTACKER: ConnectionHandle = ConnectionHandle(99);

/// One change to a valid frame.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        at: Index,
        bit: u8,
    },
    Truncate {
        at: Index,
    },
    Append(Vec<u8>),
    Overwrite {
        at: Index,
        bytes: Vec<u8>,
    },
    /// Keep the header, replace the body with arbitrary bytes.
    Body(Vec<u8>),
    /// Our prefix up to `at`, then another corpus frame from `from` on.
    Splice {
        other: Index,
        at: Index,
        from: Index,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        2 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
        2 => prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..9))
            .prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Mutation::Body),
        1 => (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(other, at, from)| Mutation::Splice { other, at, from }),
    ]
}

fn apply(frame: &mut Vec<u8>, m: &Mutation, corpus: &[Vec<u8>]) {
    match m {
        Mutation::FlipBit { at, bit } => {
            if !frame.is_empty() {
                let i = at.index(frame.len());
                frame[i] ^= 1 << bit;
            }
        }
        Mutation::Truncate { at } => frame.truncate(at.index(frame.len() + 1)),
        Mutation::Append(bytes) => frame.extend_from_slice(bytes),
        Mutation::Overwrite { at, bytes } => {
            if !frame.is_empty() {
                let i = at.index(frame.len());
                for (slot, b) in frame.iter_mut().skip(i).zip(bytes) {
                    *slot = *b;
                }
            }
        }
        Mutation::Body(bytes) => {
            frame.truncate(HEADER_BYTES);
            frame.extend_from_slice(bytes);
        }
        Mutation::Splice { other, at, from } => {
            let other = &corpus[other.index(corpus.len())];
            frame.truncate(at.index(frame.len() + 1));
            frame.extend_from_slice(&other[from.index(other.len() + 1)..]);
        }
    }
}

/// One hostile message.
#[derive(Debug, Clone)]
enum Input {
    /// A corpus frame (one per `Message` variant, plus hostile-but-well-formed
    /// extras) with mutations applied in order; no mutation sends it as is.
    Mutated { frame: Index, mutations: Vec<Mutation> },
    /// Arbitrary bytes.
    Raw(Vec<u8>),
    /// A valid header, then arbitrary bytes.
    Framed(Vec<u8>),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        6 => (any::<Index>(), prop::collection::vec(mutation(), 0..4))
            .prop_map(|(frame, mutations)| Input::Mutated { frame, mutations }),
        1 => prop::collection::vec(any::<u8>(), 0..96).prop_map(Input::Raw),
        1 => prop::collection::vec(any::<u8>(), 0..96).prop_map(Input::Framed),
    ]
}

fn materialise(input: &Input, corpus: &[Vec<u8>]) -> Vec<u8> {
    match input {
        Input::Mutated { frame, mutations } => {
            let mut bytes = corpus[frame.index(corpus.len())].clone();
            for m in mutations {
                apply(&mut bytes, m, corpus);
            }
            bytes
        }
        Input::Raw(bytes) => bytes.clone(),
        Input::Framed(bytes) => {
            let mut out = b"TLY".to_vec();
            out.push(crate::wire::PROTOCOL_VERSION);
            out.extend_from_slice(bytes);
            out
        }
    }
}

fn run_config(run_id: RunId, arch: ModelArch, train: TrainSpec) -> RunConfig {
    RunConfig { run_id, arch, rounds: 2, train, kind: crate::kind::KindSettings::FedAvg }
}

fn train_spec() -> TrainSpec {
    TrainSpec::sgd(0.1, 2, 1)
}

fn report(round: u32, update: Option<Vec<f32>>) -> Report {
    Report {
        run_id: RUN,
        round,
        eval: Some(EvalReport { loss_sum: 1.0, correct: 1, total: 2 }),
        update: update.map(|d| ClientUpdate {
            num_samples: 3,
            train_loss: 0.5,
            payload: crate::fedavg::encode_delta(crate::fedavg::ID, &d),
        }),
    }
}

/// One valid frame of every `Message` variant, in variant order, then
/// well-formed frames a hostile server could send: a Welcome announcing a
/// giant model, one asking for a NaN learning rate or 2^32 - 1 epochs, one
/// switching runs, and RoundStarts with a wrong-sized or non-finite model.
fn corpus(challenge: [u8; 32], round: u32) -> Vec<Vec<u8>> {
    let me = ident(0);
    let dim = arch().num_params();
    let signed = Participant::new(me.clone(), None).sign_report(&report(round, Some(vec![0.25; dim])));
    let welcome = |config: RunConfig| codec::encode(&Message::Welcome(Welcome { client_id: 0, config }));
    let start = |model: Vec<f32>| {
        codec::encode(&Message::RoundStart(RoundStart {
            round,
            task: Task::Train,
            seed: 5,
            model: ModelSync::Full(model),
        }))
    };
    let mut nan_model = vec![0.0; dim];
    nan_model[1] = f32::NAN;
    vec![
        codec::encode(&Message::Hello(Hello { run_id: RUN, challenge })),
        codec::encode(&Message::Join(Join {
            public_key: me.public_key(),
            signature: me.sign(&join_transcript(&RUN, &challenge, &me.public_key())),
        })),
        welcome(run_config(RUN, arch(), train_spec())),
        start(vec![0.5; dim]),
        signed,
        codec::encode(&Message::Ack(Ack { round })),
        codec::encode(&Message::Rejected(Rejected {
            code: RejectCode::WrongRound,
            round: Some(round),
            detail: "stale".into(),
        })),
        codec::encode(&Message::Finished(Finished { rounds: 2, model_hash: [3; 32] })),
        welcome(run_config(RUN, ModelArch::Mlp { input: u32::MAX, hidden: vec![u32::MAX], classes: 10 }, train_spec())),
        welcome(run_config(RUN, arch(), TrainSpec::sgd(f32::NAN, 2, 1))),
        welcome(run_config(RUN, arch(), TrainSpec::sgd(0.1, 2, u32::MAX))),
        welcome(run_config(RunId([1; 16]), arch(), train_spec())),
        start(vec![0.5; dim + 1]),
        start(nan_model),
    ]
}

impl Net {
    /// Delivers the coordinator's queued messages to the participants (or to
    /// `stray`) without sending anything back: the participants' answers
    /// stay queued until the next `pump`.
    fn deliver_down(&mut self) {
        while let Some(t) = self.coord.poll_transmit() {
            match self.clients.iter().position(|(c, _)| *c == t.to) {
                Some(slot) => self.clients[slot].1.handle_message(self.now, &t.bytes).unwrap(),
                None => self.stray.push((t.to, t.bytes.to_vec())),
            }
        }
    }

    /// The challenge of the newest `Hello` sent to `conn` (zeros if none).
    fn challenge_of(&self, conn: ConnectionHandle) -> [u8; 32] {
        self.stray
            .iter()
            .rev()
            .filter(|(c, _)| *c == conn)
            .find_map(|(_, b)| match codec::decode(b, MAX_MESSAGE_BYTES) {
                Ok(Message::Hello(h)) => Some(h.challenge),
                _ => None,
            })
            .unwrap_or([0; 32])
    }

    fn open_round(&self) -> u32 {
        match self.coord.phase() {
            Phase::AwaitingReports { round, .. } => round,
            _ => self.coord.completed_rounds().saturating_add(1),
        }
    }

    /// Lets the honest clients answer, advancing to deadlines when they
    /// can't close a round alone, until the run finishes (bounded).
    fn finish_honestly(&mut self) {
        for _ in 0..16 {
            self.pump();
            if self.coord.phase() == Phase::Finished {
                return;
            }
            self.answer_all(&[]);
            if self.coord.phase() == Phase::Finished {
                return;
            }
            if let Some(deadline) = self.coord.poll_timeout() {
                self.now = self.now.max(deadline);
                self.coord.handle_timeout(self.now);
            }
        }
    }
}

/// Three enrolled clients (two must join, quorum 2, two rounds and a final
/// evaluation) and an unjoined attacker connection, advanced to `stage`: 0
/// before anyone joined, 1 round 1 open, 2 round 1 with one report in, 3 the
/// evaluation round, 4 finished. Client 0 is the malicious one when the
/// fuzzer speaks on its connection (it may get itself disconnected); clients
/// 1 and 2 are honest and enough to finish the run.
fn net_at_stage(stage: usize) -> Net {
    let mut cfg = config(3, 2);
    cfg.min_clients = 2;
    cfg.quorum = 2;
    cfg.max_violations = 4;
    let mut net = Net::new(cfg, (0..3).map(ident).collect());
    net.coord.handle_connect(net.now, ATTACKER, [0x42; 32]);
    net.deliver_down();
    match stage {
        0 => {}
        1 => net.pump(),
        2 => {
            net.pump();
            net.answer_all(&[0, 2]);
        }
        3 => {
            net.pump();
            net.answer_all(&[]);
            net.answer_all(&[]);
        }
        _ => {
            net.pump();
            for _ in 0..3 {
                net.answer_all(&[]);
            }
        }
    }
    net
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    /// Hostile frames from an unjoined connection and from a joined client's
    /// connection, in every phase: no panic, every refusal is typed, and the
    /// honest clients still complete the run.
    #[test]
    fn coordinator_survives_hostile_frames(
        stage in 0usize..5,
        inputs in prop::collection::vec((any::<bool>(), input()), 1..10),
    ) {
        let mut net = net_at_stage(stage);
        let expected_phase_before = net.coord.phase();
        for (from_client, input) in &inputs {
            let conn = if *from_client { ConnectionHandle(0) } else { ATTACKER };
            let corpus = corpus(net.challenge_of(ATTACKER), net.open_round());
            let bytes = materialise(input, &corpus);
            // Any result is fine; a refusal carries a typed error.
            let _ = net.coord.handle_message(net.now, conn, &bytes);
            prop_assert!(net.coord.model().iter().all(|v| v.is_finite()));
        }
        if expected_phase_before == Phase::Finished {
            prop_assert_eq!(net.coord.phase(), Phase::Finished);
        }
        net.finish_honestly();
        prop_assert_eq!(net.coord.phase(), Phase::Finished);
        prop_assert_eq!(net.coord.completed_rounds(), 2);
        prop_assert!(net.coord.model().iter().all(|v| v.is_finite()));
    }

    /// Hostile frames from a server in every participant state: no panic, and
    /// whatever was accepted is consistent (a run of our choosing with a
    /// valid model and training spec, tasks with models of the right size).
    #[test]
    fn participant_survives_hostile_frames(
        stage in 0usize..5,
        inputs in prop::collection::vec(input(), 1..10),
    ) {
        let t = Instant::now();
        let mut p = Participant::new(ident(0), Some(RUN));
        let corpus = corpus([7; 32], 1);
        // Corpus frames 0, 2, 3 and 7 are a valid Hello, Welcome, RoundStart and Finished.
        for frame in [0usize, 2, 3, 7].into_iter().take(stage) {
            p.handle_message(t, &corpus[frame]).unwrap();
        }
        while p.poll_event().is_some() {}
        for input in &inputs {
            let bytes = materialise(input, &corpus);
            let _ = p.handle_message(t, &bytes);
            prop_assert!(p.max_message_bytes() <= MAX_MESSAGE_BYTES);
            match p.run_config() {
                None => prop_assert_eq!(p.max_message_bytes(), MAX_HANDSHAKE_BYTES),
                Some(cfg) => {
                    prop_assert_eq!(cfg.run_id, RUN);
                    prop_assert!(cfg.arch.validate().is_ok());
                    prop_assert!(cfg.train.validate().is_ok());
                }
            }
            while let Some(event) = p.poll_event() {
                if let ParticipantEvent::TaskRequested { model, .. } = event {
                    let dim = p.run_config().map(|c| c.arch.num_params());
                    prop_assert_eq!(Some(model.len()), dim);
                    prop_assert!(model.iter().all(|v| v.is_finite()));
                }
            }
        }
    }
}

/// One step of a random session against a coordinator.
#[derive(Debug, Clone)]
enum Op {
    Connect(u8),
    Disconnect(u8),
    /// Signed by the connection's own identity (see [`identity_of`]) or by
    /// `impostor` (4 is not enrolled); `good_sig` false signs over a wrong
    /// challenge.
    Join {
        conn: u8,
        impostor: Option<u8>,
        good_sig: bool,
    },
    Report {
        conn: u8,
        impostor: Option<u8>,
        round: RoundPick,
        payload: Payload,
        eval: bool,
    },
    /// Advance the clock and call `handle_timeout`.
    Timeout {
        millis: u32,
    },
    Garbage {
        conn: u8,
        bytes: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy)]
enum RoundPick {
    /// The open round plus -1, 0 or +1.
    Near(i8),
    Any(u32),
}

#[derive(Debug, Clone, Copy)]
enum Payload {
    /// What the open round's task asks for: a valid update, or none.
    Good,
    /// The opposite: no update in a training round, one in an evaluation round.
    Mismatched,
    WrongDim,
    NonFinite,
    ZeroSamples,
    Huge,
}

/// The identity an honest host would use on connection `conn`: connections
/// 0-3 are clients 0-3, 4 is an unenrolled key, 5 is client 0 again (a
/// reconnect, or a second device with the same key).
fn identity_of(conn: u8) -> usize {
    usize::from(conn % 5)
}

fn op() -> impl Strategy<Value = Op> {
    let conn = 0u8..6;
    let impostor = prop::option::weighted(0.15, 0u8..5);
    let round = prop_oneof![
        8 => Just(RoundPick::Near(0)),
        2 => prop_oneof![Just(RoundPick::Near(-1)), Just(RoundPick::Near(1))],
        1 => any::<u32>().prop_map(RoundPick::Any),
    ];
    let payload = prop_oneof![
        10 => Just(Payload::Good),
        1 => Just(Payload::Mismatched),
        1 => Just(Payload::WrongDim),
        1 => Just(Payload::NonFinite),
        1 => Just(Payload::ZeroSamples),
        1 => Just(Payload::Huge),
    ];
    prop_oneof![
        2 => conn.clone().prop_map(Op::Connect),
        1 => conn.clone().prop_map(Op::Disconnect),
        3 => (conn.clone(), impostor.clone(), prop::bool::weighted(0.85))
            .prop_map(|(conn, impostor, good_sig)| Op::Join { conn, impostor, good_sig }),
        10 => (conn.clone(), impostor, round, payload, any::<bool>())
            .prop_map(|(conn, impostor, round, payload, eval)| Op::Report { conn, impostor, round, payload, eval }),
        2 => (0u32..25_000).prop_map(|millis| Op::Timeout { millis }),
        1 => (conn, prop::collection::vec(any::<u8>(), 0..48)).prop_map(|(conn, bytes)| Op::Garbage { conn, bytes }),
    ]
}

/// What the checker has seen of the run, from transmits and events.
#[derive(Default)]
struct Seen {
    challenges: BTreeMap<ConnectionHandle, [u8; 32]>,
    sampled: BTreeMap<u32, BTreeSet<ClientIndex>>,
    accepted: BTreeMap<u32, BTreeSet<ClientIndex>>,
    /// Clients that answered a training round with "training failed".
    failed: BTreeMap<u32, BTreeSet<ClientIndex>>,
    completed: BTreeSet<u32>,
    finished: bool,
}

impl Seen {
    /// Drains the coordinator and checks every event against the invariants.
    fn drain(&mut self, coord: &mut Coordinator, rounds: u32) -> Result<(), TestCaseError> {
        while let Some(t) = coord.poll_transmit() {
            if let Ok(Message::Hello(h)) = codec::decode(&t.bytes, MAX_MESSAGE_BYTES) {
                self.challenges.insert(t.to, h.challenge);
            }
        }
        while let Some(event) = coord.poll_event() {
            match event {
                Event::RoundOpened { round, sampled, .. } => {
                    prop_assert!((1..=rounds + 1).contains(&round), "round {} opened", round);
                    prop_assert!(self.sampled.insert(round, sampled.into_iter().collect()).is_none());
                }
                Event::RoundExtended { round, added, .. } => {
                    let s = self.sampled.entry(round).or_default();
                    for c in added {
                        prop_assert!(s.insert(c), "client {} added twice to round {}", c, round);
                    }
                }
                Event::ReportAccepted { round, client } => {
                    let sampled = self.sampled.get(&round).cloned().unwrap_or_default();
                    prop_assert!(sampled.contains(&client), "unsampled client {} accepted in round {}", client, round);
                    let acc = self.accepted.entry(round).or_default();
                    prop_assert!(acc.insert(client), "client {} accepted twice in round {}", client, round);
                    prop_assert!(acc.len() <= sampled.len());
                    prop_assert!(!self.completed.contains(&round), "report accepted after round {} closed", round);
                }
                Event::TrainingFailed { round, client } => {
                    let sampled = self.sampled.get(&round).cloned().unwrap_or_default();
                    prop_assert!(sampled.contains(&client), "unsampled client {} failed in round {}", client, round);
                    prop_assert!(!self.accepted.get(&round).is_some_and(|a| a.contains(&client)));
                    prop_assert!(self.failed.entry(round).or_default().insert(client), "failed twice");
                    prop_assert!(!self.completed.contains(&round), "report accepted after round {} closed", round);
                }
                Event::RoundCompleted(s) => {
                    prop_assert_eq!(s.failed, self.failed.get(&s.round).map_or(0, BTreeSet::len));
                    let accepted = self.accepted.get(&s.round).map_or(0, BTreeSet::len);
                    let sampled = self.sampled.get(&s.round).map_or(0, BTreeSet::len);
                    prop_assert_eq!(s.accepted, accepted);
                    prop_assert_eq!(s.sampled, sampled);
                    prop_assert!(s.accepted <= s.sampled);
                    prop_assert!(self.completed.insert(s.round), "round {} completed twice", s.round);
                }
                Event::Finished { .. } => {
                    prop_assert!(!self.finished, "finished twice");
                    self.finished = true;
                }
                Event::ClientJoined { .. }
                | Event::Rejected { .. }
                | Event::CloseConnection { .. }
                | Event::FinishSent { .. } => {}
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random sessions: the coordinator never panics, never accepts more
    /// reports in a round than it sampled (nor twice from one client, nor
    /// from an unsampled one), and its completed-round count only grows.
    #[test]
    fn coordinator_invariants_hold_under_random_operations(
        quorum in 1usize..=2,
        final_evaluation in any::<bool>(),
        prologue in any::<bool>(),
        ops in prop::collection::vec(op(), 1..96),
    ) {
        let mut cfg = config(4, 3);
        cfg.min_clients = 2;
        cfg.clients_per_round = 2;
        cfg.quorum = quorum;
        cfg.max_violations = 3;
        cfg.final_evaluation = final_evaluation;
        let rounds = cfg.rounds;
        let dim = cfg.arch.num_params();
        let mut coord = Coordinator::new(cfg, arch().init_params(1), 7).unwrap();
        let ids: Vec<Identity> = (0..4).map(ident).chain([Identity::from_secret([200; 32])]).collect();
        let mut now = Instant::now();
        let mut seen = Seen::default();
        let mut completed = 0;
        // Half the cases start with clients 0-3 connected and joined, so the
        // random part spends its steps inside rounds rather than before them.
        let start: Vec<Op> = (0..4u8)
            .flat_map(|conn| [Op::Connect(conn), Op::Join { conn, impostor: None, good_sig: true }])
            .filter(|_| prologue)
            .collect();
        for op in start.iter().chain(&ops) {
            let phase_before = coord.phase();
            match op {
                Op::Connect(c) => coord.handle_connect(now, ConnectionHandle(u64::from(*c)), [*c; 32]),
                Op::Disconnect(c) => coord.handle_disconnect(now, ConnectionHandle(u64::from(*c))),
                Op::Join { conn, impostor, good_sig } => {
                    let id = &ids[impostor.map_or(identity_of(*conn), usize::from)];
                    let conn = ConnectionHandle(u64::from(*conn));
                    let mut challenge = seen.challenges.get(&conn).copied().unwrap_or_default();
                    if !good_sig {
                        challenge[0] ^= 1;
                    }
                    let signature = id.sign(&join_transcript(&RUN, &challenge, &id.public_key()));
                    let join = Message::Join(Join { public_key: id.public_key(), signature });
                    let _ = coord.handle_message(now, conn, &codec::encode(&join));
                }
                Op::Report { conn, impostor, round, payload, eval } => {
                    let (open, task) = match coord.phase() {
                        Phase::AwaitingReports { round, task } => (round, task),
                        _ => (coord.completed_rounds().saturating_add(1), Task::Train),
                    };
                    let round = match round {
                        RoundPick::Near(d) => open.saturating_add_signed(i32::from(*d)),
                        RoundPick::Any(r) => *r,
                    };
                    let update = |delta: Vec<f32>, n: u64| {
                        Some(ClientUpdate { num_samples: n, train_loss: 0.5, payload: crate::fedavg::encode_delta(crate::fedavg::ID, &delta) })
                    };
                    let update = match payload {
                        Payload::Good if task == Task::Train => update(vec![0.25; dim], 4),
                        Payload::Good => None,
                        Payload::Mismatched if task == Task::Train => None,
                        Payload::Mismatched => update(vec![0.25; dim], 4),
                        Payload::WrongDim => update(vec![0.25; dim + 1], 4),
                        Payload::NonFinite => update(vec![f32::INFINITY; dim], 4),
                        Payload::ZeroSamples => update(vec![0.25; dim], 0),
                        Payload::Huge => update(vec![f32::MAX; dim], u64::from(u32::MAX)),
                    };
                    let eval = eval.then_some(EvalReport { loss_sum: 3.0, correct: 2, total: 4 });
                    let body = codec::encode_report(&Report { run_id: RUN, round, eval, update });
                    let signature = ids[impostor.map_or(identity_of(*conn), usize::from)].sign(&report_transcript(&body));
                    let frame = codec::encode(&Message::Report(SignedReport { body, signature }));
                    let _ = coord.handle_message(now, ConnectionHandle(u64::from(*conn)), &frame);
                }
                Op::Timeout { millis } => {
                    now += Duration::from_millis(u64::from(*millis));
                    coord.handle_timeout(now);
                }
                Op::Garbage { conn, bytes } => {
                    let _ = coord.handle_message(now, ConnectionHandle(u64::from(*conn)), bytes);
                }
            }
            seen.drain(&mut coord, rounds)?;
            prop_assert!(coord.completed_rounds() >= completed, "completed_rounds went down");
            completed = coord.completed_rounds();
            prop_assert!(completed <= rounds);
            prop_assert!(coord.joined_clients() <= 4);
            prop_assert!(coord.model().iter().all(|v| v.is_finite()));
            match coord.phase() {
                Phase::AwaitingReports { round, .. } => {
                    prop_assert!((1..=rounds + 1).contains(&round));
                    prop_assert!(coord.poll_timeout().is_some());
                }
                Phase::AwaitingJoins | Phase::Finished => prop_assert!(coord.poll_timeout().is_none()),
            }
            if phase_before == Phase::Finished {
                prop_assert_eq!(coord.phase(), Phase::Finished);
            }
            prop_assert_eq!(seen.finished, coord.phase() == Phase::Finished);
        }
    }
}
