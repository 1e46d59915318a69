//! Replicated Ferret runs: the server and every client replica hold
//! bit-identical parameters after every round, through a late joiner and a
//! server crash and restart; server momentum survives the crash; hostile
//! coefficient payloads are refused with typed errors while rounds complete.

use super::durable::Disk;
use super::*;
use crate::error::PayloadFault;
use crate::ferret::{self, Anneal, Coefficient, FerretConfig};
use crate::wire::UpdatePayload;

fn ferret_cfg() -> FerretConfig {
    FerretConfig {
        seed: 5,
        k: 16,
        server_lr: 2.0,
        server_lr_min: 0.1,
        anneal: Anneal::Cosine,
        momentum: 0.9,
        clip: 10.0,
        unbiased: false,
        fresh_bases: false,
    }
}

const ROUNDS: u32 = 60;

fn ferret_config(enrolled: usize) -> CoordinatorConfig {
    let mut cfg = config(enrolled, ROUNDS);
    cfg.arch = ModelArch::Mlp { input: 64, hidden: vec![32], classes: 10 };
    cfg.min_clients = 8;
    cfg.clients_per_round = 8;
    cfg.quorum = 6;
    cfg.final_evaluation = false;
    cfg.max_violations = 50;
    cfg.kind = crate::kind::KindSettings::Ferret(ferret_cfg());
    cfg
}

/// A client's "local training": a delta that depends on the model it got,
/// the client and the round, projected as a real client would.
fn payload_for(cfg: &FerretConfig, arch: &ModelArch, client: usize, round: u32, model: &[f32]) -> UpdatePayload {
    let delta: Vec<f32> = model
        .iter()
        .enumerate()
        .map(|(i, m)| 0.05 * m + 0.01 * ((i + 13 * client) as f32 * 0.37 + round as f32).sin())
        .collect();
    let entries = ferret::project(cfg, &ferret::blocks(arch), round, &delta, (client as u64) << 32 | u64::from(round));
    ferret::payload(&entries)
}

impl Net {
    /// Every slot with an unanswered training task sends its Ferret payload;
    /// the server persists as it would (before the acks go out).
    /// At most `limit` answer.
    fn answer_ferret(&mut self, disk: &mut Disk, limit: usize) -> usize {
        let arch = ferret_config(10).arch;
        let mut answered = 0;
        for slot in 0..self.clients.len() {
            if answered == limit {
                break;
            }
            let Some((round, model)) = self.seen[slot].iter().rev().find_map(|e| match e {
                ParticipantEvent::TaskRequested { round, task: Task::Train, model, .. } => {
                    Some((*round, model.clone()))
                }
                _ => None,
            }) else {
                continue;
            };
            if self.seen[slot].iter().any(|e| matches!(e, ParticipantEvent::Accepted { round: r } if *r == round)) {
                continue;
            }
            let client = self.clients[slot].1.client_id().expect("joined") as usize;
            let update = ClientUpdate {
                num_samples: 100 + client as u64,
                train_loss: 1.0,
                payload: payload_for(&ferret_cfg(), &arch, client, round, &model),
            };
            if self.clients[slot].1.submit(self.now, None, Some(update)).is_ok() {
                answered += 1;
            }
            let (conn, p) = &mut self.clients[slot];
            while let Some(bytes) = p.poll_transmit() {
                let _ = self.coord.handle_message(self.now, *conn, &bytes);
            }
            disk.absorb(&mut self.coord);
        }
        self.pump();
        disk.absorb(&mut self.coord);
        answered
    }

    /// Every live replica equals the coordinator's model, bit for bit.
    fn ferret_replicas_match(&self) -> usize {
        let want: Vec<u32> = self.coord.model().iter().map(|v| v.to_bits()).collect();
        let mut checked = 0;
        for (conn, p) in &self.clients {
            if self.closed.contains(conn) {
                continue;
            }
            let (_, params) = p.replica().expect("replica after Sync");
            assert_eq!(params.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "replica of {conn:?} diverged");
            checked += 1;
        }
        checked
    }

    fn join(&mut self, slot: u8, conn: u64) {
        let conn = ConnectionHandle(conn);
        self.clients.push((conn, Participant::new(ident(slot), Some(RUN))));
        self.seen.push(Vec::new());
        self.coord.handle_connect(self.now, conn, [slot ^ 0xa5; 32]);
        self.pump();
    }
}

/// Runs the federation: 8 clients from the start, a ninth joining before
/// round `late`, and (if `crash_at`) the server dying after the first two
/// acknowledged reports of that round and restarting from its disk, every
/// client reconnecting. Returns the final model's bits.
fn run(late: u32, crash_at: Option<u32>) -> Vec<u32> {
    let cfg = ferret_config(10);
    let init = cfg.arch.init_params(3);
    let mut coord = Coordinator::new(cfg.clone(), init.clone(), 42).unwrap();
    coord.enable_persistence();
    let mut disk = Disk::default();
    disk.absorb(&mut coord);
    let mut net = Net {
        now: Instant::now(),
        coord,
        clients: Vec::new(),
        seen: Vec::new(),
        coord_events: Vec::new(),
        closed: Vec::new(),
        stray: Vec::new(),
    };
    for i in 0..8u8 {
        net.join(i, u64::from(i));
    }
    disk.absorb(&mut net.coord);
    assert_eq!(net.ferret_replicas_match(), 8);
    let mut conn = 100;
    let mut checks = 0;
    for round in 1..=ROUNDS {
        if round == late {
            net.join(8, conn);
            conn += 1;
            disk.absorb(&mut net.coord);
            assert!(
                net.seen
                    .last()
                    .unwrap()
                    .iter()
                    .any(|e| matches!(e, ParticipantEvent::Synced { round: r } if *r == late - 1))
            );
            assert_eq!(net.ferret_replicas_match(), 9);
        }
        if crash_at == Some(round) {
            // Two reports are acknowledged, then the server dies: what is not
            // on its disk is gone and every connection drops.
            assert_eq!(net.answer_ferret(&mut disk, 2), 2);
            // Clients come back sampled ones first: one that was not sampled,
            // joining a round short of its quorum, would be added to it
            // (a run's liveness rule), and the comparison below wants the
            // uninterrupted run's round.
            let mut order: Vec<u8> = (0..net.clients.len() as u8).collect();
            order.sort_by_key(|&s| {
                !net.seen[usize::from(s)]
                    .iter()
                    .any(|e| matches!(e, ParticipantEvent::TaskRequested { round: r, .. } if *r == round))
            });
            let (snapshot, records) = disk.load();
            let later = net.now + Duration::from_secs(30);
            let mut coord = Coordinator::restore(cfg.clone(), snapshot, &records, later).unwrap();
            coord.enable_persistence();
            disk.absorb(&mut coord);
            let joined = net.clients.len();
            net = Net {
                now: later,
                coord,
                clients: Vec::new(),
                seen: Vec::new(),
                coord_events: Vec::new(),
                closed: Vec::new(),
                stray: Vec::new(),
            };
            assert_eq!(order.len(), joined);
            for i in order {
                net.join(i, conn);
                conn += 1;
            }
            disk.absorb(&mut net.coord);
            assert_eq!(net.ferret_replicas_match(), joined, "replicas after the restart");
        }
        let answered = net.answer_ferret(&mut disk, usize::MAX);
        assert!(answered >= 1, "round {round}: nobody trained");
        assert_eq!(net.coord.completed_rounds(), round);
        checks += net.ferret_replicas_match();
    }
    assert!(checks >= 8 * ROUNDS as usize);
    assert_eq!(net.coord.phase(), Phase::Finished);
    assert_ne!(net.coord.model(), init.as_slice());
    assert!(net.rejections().is_empty(), "{:?}", net.rejections());
    net.coord.model().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn nine_replicas_and_the_server_stay_bit_identical_over_60_rounds_through_a_late_join_and_a_crash() {
    let uninterrupted = run(20, None);
    let crashed = run(20, Some(35));
    // Momentum is state the crash must not lose: the crashed run ends on
    // exactly the uninterrupted run's model.
    assert_eq!(crashed, uninterrupted);
}

#[test]
fn hostile_coefficient_payloads_are_refused_with_typed_errors() {
    let cfg = ferret_cfg();
    let arch = ModelArch::Mlp { input: 64, hidden: vec![32], classes: 10 };
    let kind = crate::kind::KindSettings::Ferret(cfg.clone()).build(&arch).unwrap();
    let shape =
        crate::kind::RunShape { arch: &arch, clients_per_round: 4, rounds: 3, max_update_abs: 1e6, noise_seed: None };
    let mut agg = kind.aggregator(&shape, &crate::kind::RuleSpec::Mean, &arch.init_params(1)).unwrap();
    agg.begin_round(1, &arch.init_params(1));
    let g = ferret::blocks(&arch).len();
    let up =
        |entries: &[Coefficient]| ClientUpdate { num_samples: 5, train_loss: 0.1, payload: ferret::payload(entries) };
    let c = |k: u16, g: u16, value: f32| Coefficient { k, g, value };
    let bad = |fault| Misbehaviour::BadPayload { kind: ferret::NAME, fault };
    assert_eq!(agg.absorb(0, &up(&[c(16, 0, 1.0)])), Err(bad(PayloadFault::OutOfRange { index: 0 })));
    assert_eq!(agg.absorb(0, &up(&[c(0, g as u16, 1.0)])), Err(bad(PayloadFault::OutOfRange { index: 0 })));
    assert_eq!(agg.absorb(0, &up(&[c(1, 0, 1.0), c(1, 0, 2.0)])), Err(bad(PayloadFault::NotAscending { index: 1 })));
    assert_eq!(agg.absorb(0, &up(&[c(2, 1, 1.0), c(1, 0, 2.0)])), Err(bad(PayloadFault::NotAscending { index: 1 })));
    assert_eq!(agg.absorb(0, &up(&[c(1, 0, f32::NAN)])), Err(Misbehaviour::NonFinite(0)));
    assert_eq!(agg.absorb(0, &up(&[c(1, 0, f32::INFINITY)])), Err(Misbehaviour::NonFinite(0)));
    assert!(matches!(agg.absorb(0, &up(&[c(1, 0, 1e7)])), Err(Misbehaviour::OutOfBounds { index: 0, .. })));
    let mut trailing = ferret::payload(&[c(1, 0, 1.0)]);
    trailing.data.push(0);
    let t = ClientUpdate { num_samples: 5, train_loss: 0.1, payload: trailing };
    assert_eq!(agg.absorb(0, &t), Err(bad(PayloadFault::Trailing { extra: 1 })));
    // More entries than K × G can hold.
    let too_many: Vec<Coefficient> =
        (0..g as u16).flat_map(|g| (0..16u16).map(move |k| c(k, g, 0.5))).chain([c(0, 0, 0.0)]).collect();
    assert!(matches!(agg.absorb(0, &up(&too_many)), Err(Misbehaviour::BadPayload { .. })));
    let dense = ClientUpdate {
        num_samples: 5,
        train_loss: 0.1,
        payload: crate::fedavg::encode_delta(crate::fedavg::ID, &[0.0]),
    };
    assert!(matches!(agg.absorb(0, &dense), Err(Misbehaviour::KindMismatch { .. })));
    // None of that was kept; a good payload completes the round.
    agg.absorb(1, &up(&[c(3, 0, 0.5), c(0, 1, -0.25)])).unwrap();
    let mut model = arch.init_params(1);
    let stats = agg.finish(&mut model).unwrap();
    assert_eq!(stats.updates, 1);
    assert_ne!(model, arch.init_params(1));
}
