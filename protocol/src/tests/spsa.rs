//! Replicated SPSA runs: every replica (server and clients) holds
//! bit-identical parameters after every round; a late joiner catches up from
//! the checkpoint and the logs; malformed SPSA reports are refused with typed
//! errors while the round completes.

use super::*;
use crate::identity::params_hash;
use crate::rng::LocalRng;
use crate::spsa::SpsaConfig;
use crate::wire::{LogBody, RoundLog};

fn spsa_cfg() -> SpsaConfig {
    SpsaConfig { stream_seed: 77, steps_per_client: 32, eps: 1e-3, lr: 0.05, batch_size: 8 }
}

fn spsa_net(enrolled: usize, connected: usize, rounds: u32) -> Net {
    let mut cfg = config(enrolled, rounds);
    cfg.arch = ModelArch::Mlp { input: 64, hidden: vec![32], classes: 10 };
    cfg.min_clients = connected;
    cfg.clients_per_round = connected;
    cfg.quorum = connected;
    cfg.final_evaluation = false;
    cfg.max_violations = 20;
    cfg.kind = crate::kind::KindSettings::Spsa(spsa_cfg());
    let ids = (0..connected as u8).map(ident).collect();
    Net::new(cfg, ids)
}

/// Valid SPSA bytes (never the refused 0x80), as a client's gradients would be.
fn bytes(rng: &mut LocalRng, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            loop {
                let b = rng.next_u64() as u8;
                if b != 0x80 {
                    break b;
                }
            }
        })
        .collect()
}

impl Net {
    /// Every participant with an unanswered training task sends SPSA bytes.
    fn answer_spsa(&mut self, rng: &mut LocalRng) -> usize {
        let mut steps = 0;
        for slot in 0..self.clients.len() {
            let Some(round) = self.seen[slot].iter().rev().find_map(|e| match e {
                ParticipantEvent::TaskRequested { round, task: Task::Train, .. } => Some(*round),
                _ => None,
            }) else {
                continue;
            };
            if self.seen[slot].iter().any(|e| matches!(e, ParticipantEvent::Accepted { round: r } if *r == round)) {
                continue;
            }
            let update =
                ClientUpdate { num_samples: 256, train_loss: 1.0, payload: crate::spsa::payload(bytes(rng, 32)) };
            if self.clients[slot].1.submit(self.now, None, Some(update)).is_ok() {
                steps += 32;
            }
        }
        self.pump();
        steps
    }

    /// Asserts every live participant's replica equals the coordinator's model, bit for bit.
    fn assert_replicas_match(&self) -> usize {
        let want: Vec<u32> = self.coord.model().iter().map(|v| v.to_bits()).collect();
        let mut checked = 0;
        for (conn, p) in &self.clients {
            if self.closed.contains(conn) {
                continue;
            }
            let (_, params) = p.replica().expect("replica after Sync");
            let got: Vec<u32> = params.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "replica of {conn:?} diverged");
            checked += 1;
        }
        checked
    }
}

#[test]
fn eight_clients_and_server_stay_bit_identical_over_1280_steps_and_a_late_joiner_catches_up() {
    let mut net = spsa_net(9, 8, 5);
    net.pump();
    let initial = net.coord.model().to_vec();
    assert_eq!(net.assert_replicas_match(), 8);
    let mut rng = LocalRng::new(5);
    let mut steps = 0;
    for round in 1..=5u32 {
        if round == 3 {
            // The ninth client joins late: checkpoint + logs of rounds 1-2.
            let conn = ConnectionHandle(100);
            net.clients.push((conn, Participant::new(ident(8), Some(RUN))));
            net.seen.push(Vec::new());
            net.coord.handle_connect(net.now, conn, [0x99; 32]);
            net.pump();
            assert!(net.seen[8].iter().any(|e| matches!(e, ParticipantEvent::Synced { round: 2 })));
            assert_eq!(net.assert_replicas_match(), 9);
        }
        steps += net.answer_spsa(&mut rng);
        assert_eq!(net.coord.completed_rounds(), round);
        let checked = net.assert_replicas_match();
        assert!(checked >= 8);
    }
    assert!(steps >= 1000, "{steps} steps");
    assert_eq!(net.coord.phase(), Phase::Finished);
    assert_ne!(net.coord.model(), initial.as_slice());
    // Everyone got a Finished whose hash their replica matched.
    for s in &net.seen {
        assert!(s.iter().any(|e| matches!(e, ParticipantEvent::Finished { rounds: 5, .. })));
    }
    assert!(net.rejections().is_empty());
}

#[test]
fn a_tampered_log_is_detected_by_the_replica() {
    let mut net = spsa_net(3, 3, 2);
    net.pump();
    let mut rng = LocalRng::new(1);
    net.answer_spsa(&mut rng);
    // Forge the next round's log: the right round, one byte changed.
    let (round, params) = net.clients[0].1.replica().map(|(r, p)| (r, p.to_vec())).unwrap();
    let mut entries = vec![crate::spsa::LogEntry { client: 0, bytes: vec![70, 3] }];
    let mut honest = params.clone();
    crate::spsa::apply_round(&mut honest, &spsa_cfg(), round + 1, &entries);
    entries[0].bytes[1] = 4;
    let forged = RoundLog { round: round + 1, body: LogBody::PerClient(entries), model_hash: params_hash(&honest) };
    let err = net.clients[0].1.handle_message(net.now, &codec::encode(&Message::RoundLog(forged.clone()))).unwrap_err();
    assert_eq!(err, Error::Misbehaving(Misbehaviour::ReplicaMismatch { round: round + 1 }));
    // A log that skips a round is refused before it is applied.
    let mut p = Participant::new(ident(1), Some(RUN));
    let _ = p.handle_message(net.now, &codec::encode(&Message::RoundLog(forged)));
    let gap = RoundLog { round: round + 2, body: LogBody::Skipped, model_hash: params_hash(&params) };
    let err = net.clients[1].1.handle_message(net.now, &codec::encode(&Message::RoundLog(gap))).unwrap_err();
    assert_eq!(err, Error::Misbehaving(Misbehaviour::OutOfOrderLog { have: round, got: round + 2 }));
}

#[test]
fn malformed_spsa_reports_are_refused_and_the_round_completes() {
    let mut net = spsa_net(3, 3, 2);
    net.pump();
    let conn = ConnectionHandle(0);
    let signer = Participant::new(ident(0), None);
    let report = |round: u32, payload: UpdatePayload| Report {
        run_id: RUN,
        round,
        eval: None,
        update: Some(ClientUpdate { num_samples: 1, train_loss: 0.0, payload }),
    };
    let send = |net: &mut Net, r: Report| net.coord.handle_message(net.now, conn, &signer.sign_report(&r));
    // Step out of range: 33 bytes for 32 steps; no bytes at all.
    assert_eq!(
        send(&mut net, report(1, crate::spsa::payload(vec![1; 33]))),
        Err(Error::Misbehaving(Misbehaviour::WrongDimension { expected: 32, got: 33 }))
    );
    assert!(matches!(
        send(&mut net, report(1, crate::spsa::payload(vec![]))),
        Err(Error::Misbehaving(Misbehaviour::WrongDimension { .. }))
    ));
    // The non-canonical byte, and a dense update in an SPSA run.
    assert_eq!(
        send(&mut net, report(1, crate::spsa::payload(vec![1, 0x80]))),
        Err(Error::Misbehaving(Misbehaviour::NonFinite(1)))
    );
    assert!(matches!(
        send(&mut net, report(1, crate::fedavg::encode_delta(crate::fedavg::ID, &[0.0; 3]))),
        Err(Error::Misbehaving(Misbehaviour::KindMismatch { run: "spsa", .. }))
    ));
    // Wrong round; then a valid report and its duplicate.
    assert!(matches!(
        send(&mut net, report(2, crate::spsa::payload(vec![1]))),
        Err(Error::Misbehaving(Misbehaviour::WrongRound { .. }))
    ));
    send(&mut net, report(1, crate::spsa::payload(vec![65, 190]))).unwrap();
    assert_eq!(
        send(&mut net, report(1, crate::spsa::payload(vec![65, 190]))),
        Err(Error::Misbehaving(Misbehaviour::Duplicate(1)))
    );
    // Bad signature: another key signs for our connection.
    let other = Participant::new(ident(2), None).sign_report(&report(1, crate::spsa::payload(vec![1])));
    assert_eq!(net.coord.handle_message(net.now, conn, &other), Err(Error::Misbehaving(Misbehaviour::BadSignature)));
    // The honest clients finish the round and every replica agrees.
    net.pump();
    let mut rng = LocalRng::new(9);
    net.answer_spsa(&mut rng);
    assert_eq!(net.coord.completed_rounds(), 1);
    assert_eq!(net.assert_replicas_match(), 3);
}

/// Clients that join a replicated run together get one shared `Sync` frame
/// (the checkpoint is encoded once, not a model-sized copy per client). That
/// a later joiner's frame includes the logs since is the late-join tests'.
#[test]
fn clients_joining_together_share_one_sync_frame() {
    let mut net = spsa_net(3, 3, 2);
    let mut syncs: Vec<std::sync::Arc<[u8]>> = Vec::new();
    for _ in 0..3 {
        while let Some(t) = net.coord.poll_transmit() {
            if matches!(crate::codec::decode(&t.bytes, crate::wire::MAX_MESSAGE_BYTES), Ok(Message::Sync(_))) {
                syncs.push(t.bytes.clone());
            }
            let slot = t.to.0 as usize;
            net.clients[slot].1.handle_message(net.now, &t.bytes).unwrap();
        }
        for slot in 0..3 {
            let conn = net.clients[slot].0;
            while let Some(b) = net.clients[slot].1.poll_transmit() {
                net.coord.handle_message(net.now, conn, &b).unwrap();
            }
        }
    }
    assert_eq!(syncs.len(), 3);
    assert!(syncs.iter().all(|s| std::sync::Arc::ptr_eq(s, &syncs[0])));
}
