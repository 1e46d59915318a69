//! State-machine scenarios: a coordinator and participants wired together in
//! memory (quinn-proto's `Pair` harness, scaled to N clients). No tokio, no
//! clock: time is an `Instant` the test advances.

use std::time::{Duration, Instant};

use crate::codec;
use crate::coordinator::{ConnectionHandle, Coordinator, CoordinatorConfig, Event, Phase};
use crate::error::{Error, Malformed, Misbehaviour};
use crate::identity::Identity;
use crate::model::ModelArch;
use crate::participant::{Participant, ParticipantEvent};
use crate::wire::{
    ClientUpdate, EvalReport, Message, ModelSync, RejectCode, Report, RunId, Task, TrainSpec, UpdatePayload,
};

mod durable;
mod ferret;
mod frl;
mod fuzz;
mod spsa;

const RUN: RunId = RunId([9; 16]);

fn arch() -> ModelArch {
    ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 }
}

fn ident(i: u8) -> Identity {
    Identity::from_secret([i + 1; 32])
}

struct Net {
    now: Instant,
    coord: Coordinator,
    clients: Vec<(ConnectionHandle, Participant)>,
    /// Events the participants emitted, by client slot.
    seen: Vec<Vec<ParticipantEvent>>,
    coord_events: Vec<Event>,
    closed: Vec<ConnectionHandle>,
    /// Messages for connections that have no participant (raw attacker
    /// connections in the fuzz tests), in order.
    stray: Vec<(ConnectionHandle, Vec<u8>)>,
}

fn config(n: usize, rounds: u32) -> CoordinatorConfig {
    CoordinatorConfig {
        run_id: RUN,
        arch: arch(),
        rounds,
        enrolled: (0..n as u8).map(|i| ident(i).public_key()).collect(),
        min_clients: n,
        clients_per_round: n,
        quorum: n,
        round_timeout: Duration::from_secs(10),
        train: TrainSpec::sgd(0.1, 2, 1),
        kind: crate::kind::KindSettings::FedAvg,
        rule: crate::kind::RuleSpec::Mean,
        max_violations: 5,
        max_update_abs: crate::coordinator::DEFAULT_MAX_UPDATE_ABS,
        schedule: None,
        final_evaluation: true,
        noise_seed: None,
    }
}

impl Net {
    fn new(cfg: CoordinatorConfig, identities: Vec<Identity>) -> Net {
        Net::with_init(cfg, identities, |a| a.init_params(1))
    }

    fn with_init(cfg: CoordinatorConfig, identities: Vec<Identity>, init: impl FnOnce(&ModelArch) -> Vec<f32>) -> Net {
        let init = init(&cfg.arch);
        let coord = Coordinator::new(cfg, init, 42).unwrap();
        let n = identities.len();
        let mut net = Net {
            now: Instant::now(),
            coord,
            clients: Vec::new(),
            seen: vec![Vec::new(); n],
            coord_events: Vec::new(),
            closed: Vec::new(),
            stray: Vec::new(),
        };
        for (i, id) in identities.into_iter().enumerate() {
            let conn = ConnectionHandle(i as u64);
            net.clients.push((conn, Participant::new(id, Some(RUN))));
            net.coord.handle_connect(net.now, conn, [conn.0 as u8; 32]);
        }
        net
    }

    /// Delivers messages both ways until quiet.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(t) = self.coord.poll_transmit() {
                moved = true;
                if self.closed.contains(&t.to) {
                    continue;
                }
                if let Some(slot) = self.clients.iter().position(|(c, _)| *c == t.to) {
                    self.clients[slot].1.handle_message(self.now, &t.bytes).unwrap();
                } else {
                    self.stray.push((t.to, t.bytes.to_vec()));
                }
            }
            while let Some(e) = self.coord.poll_event() {
                if let Event::CloseConnection { conn, .. } = &e {
                    self.closed.push(*conn);
                }
                self.coord_events.push(e);
            }
            for slot in 0..self.clients.len() {
                let (conn, p) = &mut self.clients[slot];
                let conn = *conn;
                while let Some(e) = p.poll_event() {
                    self.seen[slot].push(e);
                }
                while let Some(bytes) = p.poll_transmit() {
                    moved = true;
                    if !self.closed.contains(&conn) {
                        let _ = self.coord.handle_message(self.now, conn, &bytes);
                    }
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// Every participant with a pending task answers it with `delta` = 1.0.
    fn answer_all(&mut self, skip: &[usize]) {
        for slot in 0..self.clients.len() {
            if skip.contains(&slot) {
                continue;
            }
            let task = self.seen[slot].iter().rev().find_map(|e| match e {
                ParticipantEvent::TaskRequested { round, task, model, .. } => Some((*round, *task, model.len())),
                _ => None,
            });
            let Some((round, task, dim)) = task else { continue };
            let answered =
                self.seen[slot].iter().any(|e| matches!(e, ParticipantEvent::Accepted { round: r } if *r == round));
            if answered {
                continue;
            }
            let eval = Some(EvalReport { loss_sum: 1.0, correct: 1, total: 2 });
            let update = (task == Task::Train).then(|| ClientUpdate {
                num_samples: 10,
                train_loss: 0.5,
                payload: crate::fedavg::encode_delta(crate::fedavg::ID, &vec![1.0; dim]),
            });
            let _ = self.clients[slot].1.submit(self.now, eval, update);
        }
        self.pump();
    }

    fn rejections(&self) -> Vec<(ConnectionHandle, Error)> {
        self.coord_events
            .iter()
            .filter_map(|e| match e {
                Event::Rejected { conn, error, .. } => Some((*conn, error.clone())),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn happy_path_runs_all_rounds_and_final_evaluation() {
    let mut net = Net::new(config(3, 2), (0..3).map(ident).collect());
    net.pump();
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 1, task: Task::Train });
    let init = net.coord.model().to_vec();
    net.answer_all(&[]);
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 2, task: Task::Train });
    net.answer_all(&[]);
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 3, task: Task::Evaluate });
    net.answer_all(&[]);
    assert_eq!(net.coord.phase(), Phase::Finished);
    // Two rounds of delta 1.0 averaged: +2.0 everywhere.
    for (a, b) in net.coord.model().iter().zip(&init) {
        assert_eq!(*a, ((*b as f64 + 1.0) as f32 as f64 + 1.0) as f32);
    }
    let completed: Vec<_> = net
        .coord_events
        .iter()
        .filter_map(|e| if let Event::RoundCompleted(s) = e { Some(s.clone()) } else { None })
        .collect();
    assert_eq!(completed.len(), 3);
    assert_eq!(completed[0].eval_of_incoming.unwrap().total, 6);
    assert!(net.seen.iter().all(|s| { s.iter().any(|e| matches!(e, ParticipantEvent::Finished { rounds: 2, .. })) }));
    assert!(net.rejections().is_empty());
}

#[test]
fn unenrolled_key_is_refused_and_closed_while_round_proceeds() {
    let mut ids: Vec<Identity> = (0..3).map(ident).collect();
    ids.push(Identity::from_secret([200; 32])); // not enrolled
    let mut net = Net::new(config(3, 1), ids);
    net.pump();
    let rej = net.rejections();
    assert_eq!(rej.len(), 1);
    assert_eq!(rej[0].0, ConnectionHandle(3));
    assert!(matches!(rej[0].1, Error::Misbehaving(Misbehaviour::NotEnrolled(_))));
    assert!(net.closed.contains(&ConnectionHandle(3)));
    assert!(
        net.seen[3].iter().any(|e| matches!(e, ParticipantEvent::Rejected { code: RejectCode::UnknownClient, .. }))
    );
    net.answer_all(&[3]);
    net.answer_all(&[3]);
    assert_eq!(net.coord.phase(), Phase::Finished);
}

/// Issue 10: the driver reads a connection that hasn't joined with the
/// handshake limit, but the Oversize error named the run's (larger) limit.
#[test]
fn oversize_names_the_limit_applied_before_and_after_the_join() {
    use crate::wire::MAX_HANDSHAKE_BYTES;
    let mut net = Net::new(config(3, 1), (0..3).map(ident).collect());
    net.pump();
    let run_limit = net.coord.max_message_bytes();
    let stranger = ConnectionHandle(99);
    net.coord.handle_connect(net.now, stranger, [7; 32]);
    assert_eq!(net.coord.max_message_bytes_of(stranger), MAX_HANDSHAKE_BYTES);
    let err = net.coord.handle_oversize(net.now, stranger, MAX_HANDSHAKE_BYTES + 1);
    assert_eq!(err, Error::Malformed(Malformed::Oversize { len: MAX_HANDSHAKE_BYTES + 1, limit: MAX_HANDSHAKE_BYTES }));
    let joined = ConnectionHandle(0);
    assert!(net.coord.client_of(joined).is_some());
    assert_eq!(net.coord.max_message_bytes_of(joined), run_limit);
    let err = net.coord.handle_oversize(net.now, joined, run_limit + 1);
    assert_eq!(err, Error::Malformed(Malformed::Oversize { len: run_limit + 1, limit: run_limit }));
}

#[test]
fn tampered_replayed_duplicate_oversize_and_bad_updates_are_refused() {
    let mut cfg = config(3, 2);
    cfg.max_violations = 9;
    let mut net = Net::new(cfg, (0..3).map(ident).collect());
    net.pump();
    let conn = ConnectionHandle(0);
    let me = ident(0);
    let dim = arch().num_params();
    let good = |round: u32, payload: Vec<f32>| Report {
        run_id: RUN,
        round,
        eval: None,
        update: Some(ClientUpdate {
            num_samples: 5,
            train_loss: 0.1,
            payload: crate::fedavg::encode_delta(crate::fedavg::ID, &payload),
        }),
    };
    let signer = Participant::new(me.clone(), None);

    // Tampered: flip a byte of the signed body after signing.
    let mut frame = signer.sign_report(&good(1, vec![0.5; dim]));
    let i = frame.len() - 80; // inside the body, before the signature
    frame[i] ^= 0x01;
    let err = net.coord.handle_message(net.now, conn, &frame).unwrap_err();
    assert_eq!(err, Error::Misbehaving(Misbehaviour::BadSignature));

    // Wrong dimension, non-finite, wrong run, not the open round.
    let err = net.coord.handle_message(net.now, conn, &signer.sign_report(&good(1, vec![0.5; dim - 1]))).unwrap_err();
    assert_eq!(err, Error::Misbehaving(Misbehaviour::WrongDimension { expected: dim, got: dim - 1 }));
    let mut nan = vec![0.5; dim];
    nan[3] = f32::NAN;
    let err = net.coord.handle_message(net.now, conn, &signer.sign_report(&good(1, nan))).unwrap_err();
    assert_eq!(err, Error::Misbehaving(Misbehaviour::NonFinite(3)));
    let err = net.coord.handle_message(net.now, conn, &signer.sign_report(&good(2, vec![0.5; dim]))).unwrap_err();
    assert_eq!(err, Error::Misbehaving(Misbehaviour::WrongRound { open: Some(1), got: 2 }));

    // A valid report, then the same bytes again: duplicate.
    let round1 = signer.sign_report(&good(1, vec![0.5; dim]));
    net.coord.handle_message(net.now, conn, &round1).unwrap();
    let err = net.coord.handle_message(net.now, conn, &round1).unwrap_err();
    assert_eq!(err, Error::Misbehaving(Misbehaviour::Duplicate(1)));

    // Oversize as reported by the driver, and garbage bytes.
    let err = net.coord.handle_oversize(net.now, conn, net.coord.max_message_bytes() + 1);
    assert!(matches!(err, Error::Malformed(Malformed::Oversize { .. })));
    assert!(matches!(net.coord.handle_message(net.now, conn, b"TLY\x04\xff\xff"), Err(Error::Malformed(_))));

    // Another client's report relayed on our connection fails its signature check.
    let other = Participant::new(ident(1), None).sign_report(&good(1, vec![0.5; dim]));
    assert_eq!(
        net.coord.handle_message(net.now, conn, &other).unwrap_err(),
        Error::Misbehaving(Misbehaviour::BadSignature)
    );

    // Honest clients finish round 1; then the round-1 report replayed in round 2 is stale.
    net.answer_all(&[0]);
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 2, task: Task::Train });
    let err = net.coord.handle_message(net.now, ConnectionHandle(1), &round1).unwrap_err();
    assert_eq!(err, Error::Misbehaving(Misbehaviour::BadSignature), "relayed on another connection");
    // Replayed (or late: the server can't tell, and neither harms) in round 2,
    // the round-1 report is refused as late and not counted.
    let err = net.coord.handle_message(net.now, conn, &round1).unwrap_err();
    assert_eq!(err, Error::Late { got: 1, open: Some(2) });
    assert_eq!(net.coord.violations()[&0], 8);
    // A report for a round not yet open is still a violation: the ninth closes it.
    let err = net.coord.handle_message(net.now, conn, &signer.sign_report(&good(3, vec![0.5; dim]))).unwrap_err();
    assert_eq!(err, Error::Misbehaving(Misbehaviour::WrongRound { open: Some(2), got: 3 }));
    assert_eq!(net.coord.violations()[&0], 9);
    net.pump();
    assert!(net.closed.contains(&conn));
}

/// A signed FedAvg report of `delta` for `round` from `id`.
fn dense_report(id: &Identity, round: u32, delta: &[f32]) -> Vec<u8> {
    Participant::new(id.clone(), None).sign_report(&Report {
        run_id: RUN,
        round,
        eval: None,
        update: Some(ClientUpdate {
            num_samples: 10,
            train_loss: 0.5,
            payload: crate::fedavg::encode_delta(crate::fedavg::ID, delta),
        }),
    })
}

#[test]
fn late_reports_are_refused_as_late_and_never_count_as_violations() {
    // One violation would disconnect a client: a late report must not be one.
    let mut cfg = config(3, 2);
    cfg.quorum = 2;
    cfg.max_violations = 1;
    let mut net = Net::new(cfg, (0..3).map(ident).collect());
    net.pump();
    let dim = arch().num_params();
    // Client 0 trains slower than the round's deadline: round 1 closes at
    // quorum without it and round 2 opens.
    net.answer_all(&[0]);
    net.now = net.coord.poll_timeout().unwrap();
    net.coord.handle_timeout(net.now);
    net.pump();
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 2, task: Task::Train });
    // Its round-1 report arrives now: refused as late, not counted, not closed.
    let late = dense_report(&ident(0), 1, &vec![1.0; dim]);
    assert_eq!(
        net.coord.handle_message(net.now, ConnectionHandle(0), &late),
        Err(Error::Late { got: 1, open: Some(2) })
    );
    net.pump();
    assert!(net.coord.violations().is_empty(), "{:?}", net.coord.violations());
    assert!(!net.closed.contains(&ConnectionHandle(0)));
    let told = net.seen[0].iter().find_map(|e| match e {
        ParticipantEvent::Rejected { code, round, .. } => Some((*code, *round)),
        _ => None,
    });
    assert_eq!(told, Some((RejectCode::Late, Some(1))));
    assert!(!RejectCode::Late.is_fatal(), "the client carries on with the next round");
    // It carries on: its round-2 report counts like everyone's.
    net.answer_all(&[]);
    let round2 = net.coord_events.iter().find_map(|e| match e {
        Event::RoundCompleted(s) if s.round == 2 => Some(s.accepted),
        _ => None,
    });
    assert_eq!(round2, Some(3));
    // After the run (evaluation round included), any earlier round is late too.
    net.answer_all(&[]);
    assert_eq!(net.coord.phase(), Phase::Finished);
    for round in [1, 2, 3] {
        let late = dense_report(&ident(1), round, &vec![1.0; dim]);
        let err = net.coord.handle_message(net.now, ConnectionHandle(1), &late).unwrap_err();
        assert_eq!(err, Error::Late { got: round, open: None });
    }
    // A round that never existed is not "late": still a violation.
    let err = net.coord.handle_message(net.now, ConnectionHandle(1), &dense_report(&ident(1), 0, &vec![1.0; dim]));
    assert!(matches!(err, Err(Error::Misbehaving(Misbehaviour::WrongRound { got: 0, .. }))));
    assert_eq!(net.coord.violations().len(), 1);
}

#[test]
fn huge_updates_are_refused_and_failed_training_cannot_stall_the_run() {
    let mut cfg = config(3, 2);
    cfg.quorum = 2;
    let mut net = Net::new(cfg, (0..3).map(ident).collect());
    net.pump();
    let dim = arch().num_params();
    let init = net.coord.model().to_vec();

    // Round 1: client 0 sends finite values of 1e30 (they pass every NaN
    // check). Refused as out of bounds; the round completes from the others.
    let huge = dense_report(&ident(0), 1, &vec![1e30; dim]);
    let err = net.coord.handle_message(net.now, ConnectionHandle(0), &huge).unwrap_err();
    assert!(matches!(err, Error::Misbehaving(Misbehaviour::OutOfBounds { index: 0, .. })), "{err:?}");
    assert_eq!(err.reject_code(), Some(RejectCode::OutOfBounds));
    net.answer_all(&[0]);
    net.now = net.coord.poll_timeout().unwrap();
    net.coord.handle_timeout(net.now);
    net.pump();
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 2, task: Task::Train });
    let after1: Vec<f32> = init.iter().map(|v| (*v as f64 + 1.0) as f32).collect();
    assert_eq!(net.coord.model(), &after1[..], "the honest mean, untouched by the huge update");
    assert_eq!(net.coord.violations()[&0], 1);

    // Round 2: two clients' training diverges. They say so (with an
    // evaluation whose loss is NaN, which the participant leaves out rather
    // than have it refused), client 0 sends one update: below the quorum of
    // 2 updates. Everyone has answered and nobody is left to ask, so at the
    // deadline the round closes without aggregating; the model is kept.
    for slot in [1, 2] {
        let nan = Some(EvalReport { loss_sum: f64::NAN, correct: 0, total: 5 });
        net.clients[slot].1.submit_failure(net.now, nan).unwrap();
    }
    net.pump();
    net.coord.handle_message(net.now, ConnectionHandle(0), &dense_report(&ident(0), 2, &vec![5.0; dim])).unwrap();
    net.pump();
    for slot in [1, 2] {
        assert!(net.seen[slot].contains(&ParticipantEvent::Accepted { round: 2 }), "acknowledged");
    }
    let failed: Vec<_> = net
        .coord_events
        .iter()
        .filter_map(|e| match e {
            Event::TrainingFailed { round, client } => Some((*round, *client)),
            _ => None,
        })
        .collect();
    assert_eq!(failed, [(2, 1), (2, 2)]);
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 2, task: Task::Train }, "not before the deadline");
    net.now = net.coord.poll_timeout().unwrap();
    net.coord.handle_timeout(net.now);
    net.pump();
    let summary = net
        .coord_events
        .iter()
        .find_map(|e| match e {
            Event::RoundCompleted(s) if s.round == 2 => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!((summary.accepted, summary.failed, summary.stats), (1, 2, None));
    assert_eq!(net.coord.model(), &after1[..], "one update is below the quorum: the model is kept");
    assert_eq!(net.coord.violations()[&0], 1, "failure reports and NaN evaluations are not violations");
    assert!(!net.coord.violations().contains_key(&1));

    // The run goes on to its end.
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 3, task: Task::Evaluate });
    net.answer_all(&[]);
    assert_eq!(net.coord.phase(), Phase::Finished);
}

#[test]
fn a_round_short_of_updates_still_extends_while_waiting_can_help() {
    // One client failed, one is silent: the silent one may still send an
    // update, and a fresh client can be asked, so the round is extended
    // rather than closed.
    let mut cfg = config(4, 1);
    cfg.quorum = 2;
    cfg.clients_per_round = 2;
    cfg.min_clients = 4;
    let mut net = Net::new(cfg, (0..4).map(ident).collect());
    net.pump();
    let sampled: Vec<usize> =
        (0..4).filter(|&s| net.seen[s].iter().any(|e| matches!(e, ParticipantEvent::TaskRequested { .. }))).collect();
    assert_eq!(sampled.len(), 2);
    net.clients[sampled[0]].1.submit_failure(net.now, None).unwrap();
    net.pump();
    net.now = net.coord.poll_timeout().unwrap();
    net.coord.handle_timeout(net.now);
    net.pump();
    assert!(net.coord_events.iter().any(|e| matches!(e, Event::RoundExtended { round: 1, .. })));
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 1, task: Task::Train });
    // The others answer: the round closes at its quorum.
    net.answer_all(&[sampled[0]]);
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 2, task: Task::Evaluate });
}

#[test]
fn deadline_closes_at_quorum_and_extends_below_it() {
    let mut cfg = config(3, 1);
    cfg.quorum = 2;
    let mut net = Net::new(cfg, (0..3).map(ident).collect());
    net.pump();
    net.answer_all(&[1, 2]);
    // One of three answered: the deadline extends the round.
    let deadline = net.coord.poll_timeout().unwrap();
    net.now = deadline;
    net.coord.handle_timeout(net.now);
    net.pump();
    assert!(net.coord_events.iter().any(|e| matches!(e, Event::RoundExtended { round: 1, accepted: 1, .. })));
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 1, task: Task::Train });
    net.answer_all(&[2]);
    // Two answered, one straggler: the next deadline closes the round.
    let deadline = net.coord.poll_timeout().unwrap();
    net.now = deadline;
    net.coord.handle_timeout(net.now);
    net.pump();
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 2, task: Task::Evaluate });
}

#[test]
fn reconnecting_client_gets_its_task_again_and_old_connection_is_superseded() {
    let mut net = Net::new(config(2, 1), (0..2).map(ident).collect());
    net.pump();
    // Client 0 reconnects on a new connection before answering.
    let new_conn = ConnectionHandle(10);
    net.clients.push((new_conn, Participant::new(ident(0), Some(RUN))));
    net.seen.push(Vec::new());
    net.coord.handle_connect(net.now, new_conn, [0xee; 32]);
    net.pump();
    assert!(net.closed.contains(&ConnectionHandle(0)));
    assert!(net.seen[2].iter().any(|e| matches!(e, ParticipantEvent::TaskRequested { round: 1, .. })));
    net.answer_all(&[0]);
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 2, task: Task::Evaluate });
}

#[test]
fn disconnect_of_sampled_client_lets_round_close_at_quorum() {
    let mut cfg = config(3, 1);
    cfg.quorum = 2;
    let mut net = Net::new(cfg, (0..3).map(ident).collect());
    net.pump();
    net.answer_all(&[2]);
    net.coord.handle_disconnect(net.now, ConnectionHandle(2));
    net.closed.push(ConnectionHandle(2));
    net.pump();
    assert_eq!(net.coord.completed_rounds(), 1);
    // Only the first round waits for `min_clients` (3): the next one opens
    // with the two clients left, enough for its quorum.
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 2, task: Task::Evaluate });
}

#[test]
fn rounds_after_the_first_open_with_a_quorum_of_clients_and_wait_below_it() {
    // Four enrolled, three connected and sampled.
    let mut cfg = config(4, 3);
    (cfg.min_clients, cfg.clients_per_round, cfg.quorum) = (3, 3, 2);
    cfg.final_evaluation = false;
    let mut net = Net::new(cfg, (0..3).map(ident).collect());
    net.pump();
    // Two clients gone for good during round 1: it can't reach its quorum.
    net.answer_all(&[1, 2]);
    for c in [1, 2] {
        net.coord.handle_disconnect(net.now, ConnectionHandle(c));
        net.closed.push(ConnectionHandle(c));
    }
    net.pump();
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 1, task: Task::Train });
    // At the deadline there is nobody to ask: the round waits, says so,
    // and does not close below its quorum.
    net.now = net.coord.poll_timeout().unwrap();
    net.coord.handle_timeout(net.now);
    net.pump();
    assert!(net.coord_events.iter().any(|e| matches!(
        e,
        Event::RoundExtended { round: 1, accepted: 1, quorum: 2, waiting: 0, added } if added.is_empty()
    )));
    assert_eq!(net.coord.completed_rounds(), 0);
    // A client joining then replaces one that left at once, with no
    // deadline in between, and its report closes the round.
    let conn = ConnectionHandle(40);
    net.clients.push((conn, Participant::new(ident(3), Some(RUN))));
    net.seen.push(Vec::new());
    net.coord.handle_connect(net.now, conn, [40; 32]);
    net.pump();
    assert!(net.coord_events.iter().any(|e| matches!(
        e,
        Event::RoundExtended { round: 1, added, .. } if added == &vec![3]
    )));
    assert!(net.seen[3].iter().any(|e| matches!(e, ParticipantEvent::TaskRequested { round: 1, .. })));
    net.answer_all(&[1, 2]);
    assert_eq!(net.coord.completed_rounds(), 1);
    // Round 2 opens with the two clients joined (< min_clients = 3).
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 2, task: Task::Train });
}

#[test]
fn default_quorum_over_selects_and_respects_the_rule() {
    use crate::coordinator::default_quorum;
    use crate::kind::RuleSpec;
    let mean = RuleSpec::Mean;
    let got: Vec<usize> = [1, 2, 3, 4, 5, 10, 20, 100].iter().map(|&n| default_quorum(n, &mean)).collect();
    assert_eq!(got, [1, 1, 2, 3, 4, 8, 16, 80]);
    // A trimmed mean dropping 2 from each end needs 5 updates.
    assert_eq!(default_quorum(5, &RuleSpec::TrimmedMean { trim: 2 }), 5);
    assert_eq!(default_quorum(10, &RuleSpec::TrimmedMean { trim: 4 }), 9);
    // Unsatisfiable: the sample size, which validation then refuses.
    assert_eq!(default_quorum(3, &RuleSpec::TrimmedMean { trim: 2 }), 3);
}

#[test]
fn schedule_picks_the_listed_clients() {
    let mut cfg = config(4, 2);
    cfg.clients_per_round = 2;
    cfg.quorum = 1;
    cfg.schedule = Some(vec![vec![3, 1], vec![0]]);
    let mut net = Net::new(cfg, (0..4).map(ident).collect());
    net.pump();
    net.answer_all(&[]);
    let opened: Vec<Vec<u32>> = net
        .coord_events
        .iter()
        .filter_map(|e| if let Event::RoundOpened { sampled, .. } = e { Some(sampled.clone()) } else { None })
        .collect();
    assert_eq!(opened[0], vec![1, 3]);
    assert_eq!(opened[1], vec![0]);
}

#[test]
fn same_seed_same_run() {
    let run = || {
        let mut cfg = config(5, 3);
        cfg.clients_per_round = 2;
        cfg.quorum = 2;
        let mut net = Net::new(cfg, (0..5).map(ident).collect());
        net.pump();
        for _ in 0..4 {
            net.answer_all(&[]);
        }
        (net.coord.model().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), format!("{:?}", net.coord_events))
    };
    assert_eq!(run(), run());
}

#[test]
fn participant_rejects_wrong_run_and_garbage() {
    let mut p = Participant::new(ident(0), Some(RUN));
    let hello = codec::encode(&Message::Hello(crate::wire::Hello { run_id: RunId([1; 16]), challenge: [0; 32] }));
    assert_eq!(p.handle_message(Instant::now(), &hello), Err(Error::Misbehaving(Misbehaviour::WrongRun)));
    assert!(matches!(p.handle_message(Instant::now(), b"nonsense"), Err(Error::Malformed(_))));
    assert!(p.submit(Instant::now(), None, None).is_err());
}

#[test]
fn config_validation_refuses_values_that_would_panic_or_stall() {
    use crate::coordinator::{MAX_ROUND_TIMEOUT, MAX_ROUNDS};
    use crate::wire::{MAX_BATCH_SIZE, MAX_LOCAL_EPOCHS};
    config(3, 2).validate().unwrap();
    let refused = |change: &dyn Fn(&mut CoordinatorConfig)| {
        let mut c = config(3, 2);
        change(&mut c);
        c.validate().is_err()
    };
    // `now + round_timeout` panics on overflow: the timeout is bounded.
    assert!(refused(&|c| c.round_timeout = Duration::from_secs(u64::MAX)));
    assert!(refused(&|c| c.round_timeout = MAX_ROUND_TIMEOUT + Duration::from_nanos(1)));
    assert!(!refused(&|c| c.round_timeout = MAX_ROUND_TIMEOUT));
    // The evaluation round `rounds + 1` must fit a u32; zero rounds is a typo.
    assert!(refused(&|c| c.rounds = 0));
    assert!(refused(&|c| c.rounds = u32::MAX));
    assert!(!refused(&|c| c.rounds = MAX_ROUNDS));
    // A quorum above the enrolment could never be met: every round would extend forever.
    assert!(refused(&|c| {
        c.clients_per_round = 5;
        c.quorum = 4;
    }));
    // More clients per round than enrolled is named as such (it used to be
    // reported as the quorum, which defaults to it).
    let mut c = config(3, 2);
    c.clients_per_round = 4;
    c.quorum = 4;
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("clients_per_round (4) exceeds the number of enrolled clients (3)"), "{err}");
    // Training parameters a client would refuse.
    assert!(refused(&|c| c.train.lr = f32::INFINITY));
    assert!(refused(&|c| c.train.epochs = MAX_LOCAL_EPOCHS + 1));
    assert!(refused(&|c| c.train.batch_size = MAX_BATCH_SIZE + 1));
    assert!(refused(&|c| c.train.batch_size = 0));
}

#[test]
fn longest_round_timeout_runs_through_deadlines() {
    let mut cfg = config(3, 1);
    cfg.quorum = 1;
    cfg.round_timeout = crate::coordinator::MAX_ROUND_TIMEOUT;
    let mut net = Net::new(cfg, (0..3).map(ident).collect());
    net.pump();
    net.answer_all(&[1, 2]);
    let deadline = net.coord.poll_timeout().unwrap();
    assert_eq!(deadline - net.now, crate::coordinator::MAX_ROUND_TIMEOUT);
    net.now = deadline;
    net.coord.handle_timeout(net.now);
    net.pump();
    assert_eq!(net.coord.phase(), Phase::AwaitingReports { round: 2, task: Task::Evaluate });
}

#[test]
fn participant_refuses_a_hostile_welcome() {
    use crate::wire::{Hello, MAX_HANDSHAKE_BYTES, RunConfig, Welcome, max_message_bytes_for};
    let t = Instant::now();
    let hello = codec::encode(&Message::Hello(Hello { run_id: RUN, challenge: [0; 32] }));
    let welcome = |config: RunConfig| codec::encode(&Message::Welcome(Welcome { client_id: 0, config }));
    let train = TrainSpec::sgd(0.1, 2, 1);
    let good = RunConfig {
        run_id: RUN,
        arch: arch(),
        rounds: 2,
        train: train.clone(),
        kind: crate::kind::KindSettings::FedAvg,
    };
    let bad_model = Misbehaviour::Unexpected("Welcome with an invalid model");
    let bad_train = Misbehaviour::Unexpected("Welcome with invalid training parameters");
    let cases = [
        // A model of 2^64 parameters: refused before any size is computed from it.
        (
            RunConfig { arch: ModelArch::Mlp { input: u32::MAX, hidden: vec![u32::MAX], classes: 10 }, ..good.clone() },
            bad_model,
        ),
        (RunConfig { train: TrainSpec { epochs: u32::MAX, ..train.clone() }, ..good.clone() }, bad_train.clone()),
        (RunConfig { train: TrainSpec { lr: f32::NAN, ..train.clone() }, ..good.clone() }, bad_train.clone()),
        (RunConfig { train: TrainSpec { batch_size: 0, ..train.clone() }, ..good.clone() }, bad_train.clone()),
        (RunConfig { train: TrainSpec { momentum: 1.0, ..train.clone() }, ..good.clone() }, bad_train.clone()),
        (RunConfig { train: TrainSpec { weight_decay: f32::INFINITY, ..train.clone() }, ..good.clone() }, bad_train),
        // Another run than the Hello named: our reports would be signed for it.
        (RunConfig { run_id: RunId([1; 16]), ..good.clone() }, Misbehaviour::WrongRun),
    ];
    for (config, want) in cases {
        let mut p = Participant::new(ident(0), None);
        p.handle_message(t, &hello).unwrap();
        assert_eq!(p.handle_message(t, &welcome(config)), Err(want.into()));
        assert!(p.run_config().is_none());
        assert_eq!(p.max_message_bytes(), MAX_HANDSHAKE_BYTES);
    }
    let mut p = Participant::new(ident(0), None);
    p.handle_message(t, &hello).unwrap();
    p.handle_message(t, &welcome(good)).unwrap();
    assert_eq!(p.max_message_bytes(), max_message_bytes_for(&arch()));
}

#[test]
fn participant_reads_only_handshake_sized_messages_before_welcome() {
    use crate::wire::{MAX_HANDSHAKE_BYTES, RoundStart};
    // A model-sized message before the Welcome is refused on its length alone.
    let big =
        RoundStart { round: 1, task: Task::Train, seed: 0, model: ModelSync::Full(vec![0.0; MAX_HANDSHAKE_BYTES / 4]) };
    let mut p = Participant::new(ident(0), None);
    assert!(matches!(
        p.handle_message(Instant::now(), &codec::encode(&Message::RoundStart(big))),
        Err(Error::Malformed(Malformed::Oversize { .. }))
    ));
}

#[test]
fn reports_for_another_run_or_from_unsampled_clients_are_refused() {
    let mut cfg = config(2, 1);
    cfg.clients_per_round = 1;
    cfg.quorum = 1;
    let mut net = Net::new(cfg, (0..2).map(ident).collect());
    net.pump();
    let Event::RoundOpened { sampled, .. } =
        net.coord_events.iter().find(|e| matches!(e, Event::RoundOpened { .. })).unwrap().clone()
    else {
        unreachable!()
    };
    let (inside, outside) = if sampled == vec![0] { (0u8, 1u8) } else { (1, 0) };
    let dim = arch().num_params();
    let report = |run_id: RunId| Report {
        run_id,
        round: 1,
        eval: None,
        update: Some(ClientUpdate {
            num_samples: 1,
            train_loss: 0.0,
            payload: crate::fedavg::encode_delta(crate::fedavg::ID, &vec![0.0; dim]),
        }),
    };
    let frame = |who: u8, run_id: RunId| Participant::new(ident(who), None).sign_report(&report(run_id));
    let err =
        net.coord.handle_message(net.now, ConnectionHandle(u64::from(outside)), &frame(outside, RUN)).unwrap_err();
    assert_eq!(err, Error::Misbehaving(Misbehaviour::NotSampled(1)));
    let err = net
        .coord
        .handle_message(net.now, ConnectionHandle(u64::from(inside)), &frame(inside, RunId([7; 16])))
        .unwrap_err();
    assert_eq!(err, Error::Misbehaving(Misbehaviour::WrongRun));
    // The sampled client's honest report still closes the round.
    net.coord.handle_message(net.now, ConnectionHandle(u64::from(inside)), &frame(inside, RUN)).unwrap();
    assert_eq!(net.coord.completed_rounds(), 1);
}

/// A frame prepared on another thread ([`crate::Preparer`], as the server's
/// connection tasks and the simulator's training threads do) is handled
/// exactly as `handle_message` handles its bytes: same refusals for a
/// tampered, a wrong-shaped and a garbage frame, and the same model after
/// the valid ones.
#[test]
fn prepared_frames_are_handled_exactly_like_raw_ones() {
    let mut raw = Net::new(config(2, 1), (0..2).map(ident).collect());
    let mut prepared = Net::new(config(2, 1), (0..2).map(ident).collect());
    raw.pump();
    prepared.pump();
    let dim = arch().num_params();
    let mut tampered = dense_report(&ident(0), 1, &vec![0.5; dim]);
    let i = tampered.len() - 80;
    tampered[i] ^= 0x01;
    let frames = [
        (0u64, tampered),
        (0, dense_report(&ident(0), 1, &vec![0.5; dim - 1])),
        (0, b"TLY\x04\xff\xff".to_vec()),
        (0, dense_report(&ident(0), 1, &vec![0.25; dim])),
        (1, dense_report(&ident(1), 1, &vec![-0.75; dim])),
    ];
    let preparer = prepared.coord.preparer();
    let bytes: Vec<Vec<u8>> = frames.iter().map(|(_, f)| f.clone()).collect();
    let ahead: Vec<crate::Prepared> =
        std::thread::spawn(move || bytes.iter().map(|f| preparer.prepare(f)).collect()).join().unwrap();
    for ((conn, frame), p) in frames.iter().zip(ahead) {
        assert_eq!(p.len(), frame.len());
        let a = raw.coord.handle_message(raw.now, ConnectionHandle(*conn), frame);
        let b = prepared.coord.handle_prepared(prepared.now, ConnectionHandle(*conn), p);
        assert_eq!(a, b);
    }
    raw.pump();
    prepared.pump();
    let refusals = |n: &Net| n.rejections().into_iter().map(|(_, e)| e).collect::<Vec<_>>();
    assert_eq!(refusals(&raw).len(), 3);
    assert_eq!(refusals(&raw), refusals(&prepared));
    assert_eq!(raw.coord.model(), prepared.coord.model());
    assert_eq!(raw.coord.completed_rounds(), 1);
}
