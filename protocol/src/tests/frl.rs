//! FRL runs through the state machines: the server ships the packed global
//! ranking, participants rebuild the global scores from it and the seed,
//! rankings come back and are voted; malformed rankings are refused with
//! typed errors while the round completes; reruns give the same global
//! ranking every round; a restored coordinator carries on identically.

use super::*;
use crate::frl::{FrlRun, FrlVote, MaskRule, Ranking, encode};
use crate::identity::params_hash;
use crate::rng::LocalRng;
use crate::supermask::FrlArch;

/// A small network (conv 1→64, conv 64→64, pool, three linear layers on
/// 2×2 inputs): 119,872 edges in 5 layers, fast enough for unit tests.
const NET: FrlArch = FrlArch::Conv2 { channels: 1, side: 2, classes: 2 };

fn frl_net(n: usize, rounds: u32) -> Net {
    let mut cfg = config(n, rounds);
    cfg.arch = ModelArch::Supermask(NET);
    cfg.final_evaluation = false;
    cfg.max_violations = 20;
    cfg.kind = crate::kind::KindSettings::Frl(FrlRun::new(5, NET.layer_sizes()));
    let ids = (0..n as u8).map(ident).collect();
    // `Net` builds the initial model with `init_params(1)`: FRL's initial
    // scores must come from the run's seed instead.
    let mut net = Net::with_init(cfg, ids, |a| a.init_params(5));
    net.pump();
    net
}

impl Net {
    /// Every participant with an unanswered training task "trains" (adds
    /// client-specific noise to the global scores) and sends its ranking.
    fn answer_frl(&mut self, round: u32, skip: &[usize]) {
        for slot in 0..self.clients.len() {
            if skip.contains(&slot) {
                continue;
            }
            let model = self.seen[slot].iter().rev().find_map(|e| match e {
                ParticipantEvent::TaskRequested { round: r, task: Task::Train, model, .. } if *r == round => {
                    Some(model.clone())
                }
                _ => None,
            });
            let Some(mut scores) = model else { continue };
            let mut rng = LocalRng::new(crate::rng::mix(slot as u64, round, 0));
            for s in &mut scores {
                *s += (rng.next_u64() % 1000) as f32 * 1e-5;
            }
            let ranking = Ranking::from_scores(&scores, &NET.layer_sizes(), MaskRule::TwoSided).unwrap();
            let update = ClientUpdate {
                num_samples: 58,
                train_loss: 0.3,
                payload: UpdatePayload { kind: crate::frl::ID, data: encode(&ranking) },
            };
            self.clients[slot].1.submit(self.now, None, Some(update)).unwrap();
        }
        self.pump();
    }

    fn task_model(&self, slot: usize, round: u32) -> Option<Vec<f32>> {
        self.seen[slot].iter().find_map(|e| match e {
            ParticipantEvent::TaskRequested { round: r, model, .. } if *r == round => Some(model.clone()),
            _ => None,
        })
    }
}

fn is_permutation_of(a: &[f32], b: &[f32]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_by(f32::total_cmp);
    b.sort_by(f32::total_cmp);
    a == b
}

fn run_hashes(rounds: u32) -> Vec<[u8; 32]> {
    let mut net = frl_net(3, rounds);
    let mut hashes = Vec::new();
    for r in 1..=rounds {
        net.answer_frl(r, &[]);
        hashes.push(params_hash(net.coord.model()));
    }
    assert_eq!(net.coord.phase(), Phase::Finished);
    hashes
}

#[test]
fn rounds_ship_the_ranking_and_clients_rebuild_the_global_scores() {
    let mut net = frl_net(3, 3);
    let initial = net.coord.model().to_vec();
    assert_eq!(initial, NET_initial());
    let config = net.coord.run_config();
    let crate::kind::KindSettings::Frl(run) = &config.kind else { panic!("an FRL run") };
    assert_eq!(run.seed, 5);
    for r in 1..=3 {
        // Every client received exactly the coordinator's scores.
        let before = net.coord.model().to_vec();
        for slot in 0..3 {
            assert_eq!(net.task_model(slot, r).unwrap(), before, "round {r} slot {slot}");
        }
        net.answer_frl(r, &[]);
        assert!(net.rejections().is_empty());
        assert_ne!(net.coord.model(), &before[..], "round {r} changed nothing");
        assert!(is_permutation_of(net.coord.model(), &initial));
    }
    assert_eq!(net.coord.phase(), Phase::Finished);
    // The round message is the packed ranking, not the dense model.
    let packed = crate::frl::packed_len(&NET.layer_sizes()).unwrap();
    assert!(packed < NET.num_edges() * 4 * 2 / 3, "{packed}");
}

#[allow(non_snake_case)]
fn NET_initial() -> Vec<f32> {
    crate::supermask::initial_scores(&NET, 5)
}

#[test]
fn same_seed_same_global_ranking_every_round() {
    let a = run_hashes(3);
    assert_eq!(a, run_hashes(3));
    assert_eq!(a.iter().collect::<std::collections::BTreeSet<_>>().len(), 3);
}

#[test]
fn malformed_rankings_are_refused_and_the_round_completes() {
    let mut net = frl_net(4, 1);
    net.coord_events.clear();
    let sizes = NET.layer_sizes();
    let good = Ranking::identity(&sizes).unwrap();
    let good_bytes = encode(&good);
    let mut dup = good.as_flat().to_vec();
    dup[1] = dup[0]; // a repeated index in layer 0
    let dup_bytes = {
        // Pack by hand: the encoder only takes valid rankings.
        let mut layers: Vec<Vec<u32>> = Vec::new();
        let mut off = 0;
        for &n in &sizes {
            layers.push(dup[off..off + n].to_vec());
            off += n;
        }
        crate::frl::tests_pack_raw(&layers)
    };
    let mut out_of_range = good_bytes.clone();
    out_of_range[0] |= 0xff; // layer 0 entry 0 becomes ≥ n (10 bits, 576 edges)
    out_of_range[1] |= 0x03;
    let truncated = good_bytes[..good_bytes.len() - 1].to_vec();
    let mut trailing = good_bytes.clone();
    trailing.push(0);
    let payloads = [
        (UpdatePayload { kind: crate::frl::ID, data: dup_bytes }, "duplicate"),
        (UpdatePayload { kind: crate::frl::ID, data: out_of_range }, "not a permutation"),
        (UpdatePayload { kind: crate::frl::ID, data: truncated }, "truncated"),
        (UpdatePayload { kind: crate::frl::ID, data: trailing }, "trailing"),
        (crate::fedavg::encode_delta(crate::fedavg::ID, &vec![0.0; NET.num_edges()]), "dense"),
    ];
    // Client 3 sends every bad payload in turn, each signed and for the open round.
    let conn = net.clients[3].0;
    for (payload, what) in &payloads {
        let report = Report {
            run_id: RUN,
            round: 1,
            eval: None,
            update: Some(ClientUpdate { num_samples: 5, train_loss: 0.1, payload: payload.clone() }),
        };
        let frame = net.clients[3].1.sign_report(&report);
        let err = net.coord.handle_message(net.now, conn, &frame).unwrap_err();
        use crate::error::PayloadFault;
        match (what, &err) {
            (
                &"duplicate",
                Error::Misbehaving(Misbehaviour::BadPayload {
                    kind: "frl",
                    fault: PayloadFault::Repeated { part: 0, .. },
                }),
            )
            | (
                &"not a permutation",
                Error::Misbehaving(Misbehaviour::BadPayload {
                    kind: "frl",
                    fault: PayloadFault::NotAPermutation { part: 0, .. },
                }),
            )
            | (
                &"truncated",
                Error::Misbehaving(Misbehaviour::BadPayload { kind: "frl", fault: PayloadFault::Length { .. } }),
            )
            | (
                &"trailing",
                Error::Misbehaving(Misbehaviour::BadPayload { kind: "frl", fault: PayloadFault::Trailing { .. } }),
            )
            | (&"dense", Error::Misbehaving(Misbehaviour::KindMismatch { run: "frl", .. })) => {}
            _ => panic!("{what}: unexpected {err:?}"),
        }
    }
    net.pump();
    // The three honest clients complete the round (quorum 4 → the round
    // waits for client 3, which now sends a valid ranking).
    net.answer_frl(1, &[3]);
    assert!(matches!(net.coord.phase(), Phase::AwaitingReports { round: 1, .. }));
    let report = Report {
        run_id: RUN,
        round: 1,
        eval: None,
        update: Some(ClientUpdate {
            num_samples: 5,
            train_loss: 0.1,
            payload: UpdatePayload { kind: crate::frl::ID, data: good_bytes },
        }),
    };
    let frame = net.clients[3].1.sign_report(&report);
    net.coord.handle_message(net.now, conn, &frame).unwrap();
    net.pump();
    assert_eq!(net.coord.phase(), Phase::Finished);
    assert_eq!(net.coord.violations().get(&3), Some(&5));
}

#[test]
fn restored_coordinator_ships_the_same_scores() {
    let mut net = frl_net(3, 3);
    net.answer_frl(1, &[]);
    let snap = net.coord.snapshot();
    let model = net.coord.model().to_vec();
    let mut cfg = config(3, 3);
    cfg.arch = ModelArch::Supermask(NET);
    cfg.final_evaluation = false;
    cfg.max_violations = 20;
    cfg.kind = crate::kind::KindSettings::Frl(FrlRun::new(5, NET.layer_sizes()));
    let mut restored = Coordinator::restore(cfg, snap, &[], net.now).unwrap();
    assert_eq!(restored.model(), &model[..]);
    // Round 2 opens once the clients are back; its ranking rebuilds the same scores.
    for (i, (conn, _)) in net.clients.iter().enumerate() {
        restored.handle_connect(net.now, *conn, [i as u8; 32]);
    }
    net.coord = restored;
    for slot in 0..3 {
        let id = ident(slot as u8);
        net.clients[slot].1 = Participant::new(id, Some(RUN));
    }
    net.seen.iter_mut().for_each(Vec::clear);
    net.pump();
    for slot in 0..3 {
        assert_eq!(net.task_model(slot, 2).unwrap(), model);
    }
}

#[test]
fn a_supermask_model_needs_the_frl_aggregator_and_its_seed() {
    let mut cfg = config(3, 1);
    cfg.arch = ModelArch::Supermask(NET);
    let init = cfg.arch.init_params(5);
    assert!(Coordinator::new(cfg.clone(), init.clone(), 1).is_err());
    // Initial scores of another seed are not a permutation of this run's s̄.
    cfg.kind = crate::kind::KindSettings::Frl(FrlRun::new(6, NET.layer_sizes()));
    assert!(Coordinator::new(cfg.clone(), init.clone(), 1).is_err());
    cfg.kind = crate::kind::KindSettings::Frl(FrlRun::new(5, NET.layer_sizes()));
    assert!(Coordinator::new(cfg.clone(), init.clone(), 1).is_ok());
    // Layer sizes that are not the model's are refused.
    let mut run = FrlRun::new(5, NET.layer_sizes());
    run.vote.layer_sizes[0] += 1;
    assert!(FrlVote::for_run(run, &cfg.arch).is_err());
}
