//! Crash and recovery of the coordinator: whatever the host persisted (the
//! last snapshot and the log since) is enough to continue the run exactly,
//! without losing an acknowledged report.

use super::*;
use crate::durable::{Persist, Record, Snapshot, decode_record, decode_snapshot, encode_record, encode_snapshot};

/// The host's disk: the last snapshot and the records since, kept as bytes
/// (so the codec is exercised too).
#[derive(Default, Clone)]
pub(super) struct Disk {
    snapshot: Option<Vec<u8>>,
    log: Vec<Vec<u8>>,
    /// The host dies just before it writes the next snapshot: that and
    /// everything after it never reach the disk.
    die_at_snapshot: bool,
}

impl Disk {
    pub(super) fn absorb(&mut self, coord: &mut Coordinator) {
        while let Some(p) = coord.poll_persist() {
            if self.die_at_snapshot && matches!(p, Persist::Snapshot(_)) {
                while coord.poll_persist().is_some() {}
                return;
            }
            match p {
                Persist::Snapshot(s) => {
                    self.snapshot = Some(encode_snapshot(&s));
                    self.log.clear();
                }
                Persist::Append(r) => self.log.push(encode_record(&r)),
            }
        }
    }

    pub(super) fn load(&self) -> (Snapshot, Vec<Record>) {
        let snap = decode_snapshot(self.snapshot.as_ref().expect("a snapshot was written")).unwrap();
        (snap, self.log.iter().map(|b| decode_record(b).unwrap()).collect())
    }
}

/// A client's deterministic update for a round: depends on both, so order
/// and membership matter for the final model.
fn update_for(kind: crate::kind::KindId, client: usize, round: u32, dim: usize) -> ClientUpdate {
    if kind == crate::frl::dp::ID {
        return approvals_for(client, round);
    }
    let d: Vec<f32> = (0..dim).map(|i| ((i + 7 * client) as f32 * 0.01 + round as f32 * 0.1).sin()).collect();
    ClientUpdate { num_samples: 10 + client as u64, train_loss: 0.5, payload: crate::fedavg::encode_delta(kind, &d) }
}

/// A private FRL client's approvals for a round: in each layer of
/// [`FRL_DP_NET`] the half of the edges with the smallest hash of (client,
/// round, edge), except that every client approves the first eighth of
/// each layer in every round, so the cumulative counts have a clear top
/// part for the mechanism to find.
fn approvals_for(client: usize, round: u32) -> ClientUpdate {
    let masks: Vec<Vec<bool>> =
        FRL_DP_NET
            .layer_sizes()
            .iter()
            .map(|&n| {
                let w = crate::frl::keep_count(n, 0.5);
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by_key(|&e| {
                    if e < n / 8 { 0 } else { 1 + (crate::rng::mix(client as u64, round, e as u32) >> 1) }
                });
                let mut m = vec![false; n];
                for &e in &order[..w] {
                    m[e] = true;
                }
                m
            })
            .collect();
    let payload = crate::frl::dp::Approvals::from_masks(&masks).payload();
    ClientUpdate { num_samples: 10 + client as u64, train_loss: 0.5, payload }
}

impl Net {
    /// Answers pending training tasks of the given slots; persists as the
    /// server would (before delivering the answers' acks).
    fn answer_slots(&mut self, slots: &[usize], disk: &mut Disk) {
        for &slot in slots {
            let Some((round, task, dim)) = self.seen[slot].iter().rev().find_map(|e| match e {
                ParticipantEvent::TaskRequested { round, task, model, .. } => Some((*round, *task, model.len())),
                _ => None,
            }) else {
                continue;
            };
            if self.seen[slot].iter().any(|e| matches!(e, ParticipantEvent::Accepted { round: r } if *r == round)) {
                continue;
            }
            let kind = self.coord.kind().id();
            let update = (task == Task::Train).then(|| update_for(kind, slot, round, dim));
            let _ = self.clients[slot].1.submit(self.now, None, update);
            // Deliver just this client's report, then persist.
            let (conn, p) = &mut self.clients[slot];
            while let Some(bytes) = p.poll_transmit() {
                let _ = self.coord.handle_message(self.now, *conn, &bytes);
            }
            disk.absorb(&mut self.coord);
            self.pump();
            disk.absorb(&mut self.coord);
        }
    }
}

/// A net around `coord` with clients 0..3 connected on handles
/// `first_conn..`, challenges `i ^ salt`, messages pumped.
fn connect_three(coord: Coordinator, now: Instant, first_conn: u64, salt: u8) -> Net {
    let mut net = Net {
        now,
        coord,
        clients: Vec::new(),
        seen: vec![Vec::new(); 3],
        coord_events: Vec::new(),
        closed: Vec::new(),
        stray: Vec::new(),
    };
    for i in 0..3u8 {
        let conn = ConnectionHandle(first_conn + u64::from(i));
        net.clients.push((conn, Participant::new(ident(i), Some(RUN))));
        net.coord.handle_connect(net.now, conn, [i ^ salt; 32]);
    }
    net.pump();
    net
}

/// Which kind the durable tests run: cross-round aggregator state or none.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stateful {
    /// FedAvg: the model is all the state.
    None,
    /// FedAvgM: server momentum.
    Momentum,
    /// DP-FTRL: the secret noise seed, the tree, the last release, the
    /// momentum and the privacy ledger.
    DpFtrl,
    /// Private FRL: the secret noise seed, every layer's SVT state (counts,
    /// selection, threshold, switches) and the global ranking.
    FrlDp,
}

/// The private FRL durable tests' network (119,872 edges in 5 layers).
const FRL_DP_NET: crate::supermask::FrlArch = crate::supermask::FrlArch::Conv2 { channels: 1, side: 2, classes: 2 };

/// Private FRL settings of the durable tests: run seed 5, ρ = 10⁴ (large,
/// so the mechanism follows the votes and a lost count would show),
/// `horizon` rounds.
fn frl_dp_settings(horizon: u32) -> crate::kind::KindSettings {
    let spec = crate::frl::dp::FrlDpSpec { rho: Some(1e4), horizon: Some(horizon), ..Default::default() };
    crate::kind::KindSettings::FrlDp(spec.resolve(5, &ModelArch::Supermask(FRL_DP_NET)).unwrap())
}

/// The initial model of a durable test's run: FRL's initial scores come
/// from the run seed.
fn initial_model(cfg: &CoordinatorConfig) -> Vec<f32> {
    match cfg.kind {
        crate::kind::KindSettings::FrlDp(_) => cfg.arch.init_params(5),
        _ => cfg.arch.init_params(1),
    }
}

/// The DP-FTRL durable tests' noise seed: bytes that can't occur by chance.
const DURABLE_SEED: &[u8; 32] = b"tally-durable-test-noise-seed-01";

/// DP-FTRL settings of the durable tests: T = `horizon` releases, ρ = 1/8.
pub(super) fn dpftrl_settings(horizon: u32) -> crate::kind::KindSettings {
    crate::kind::KindSettings::DpFtrl(crate::dpftrl::DpFtrlConfig {
        target: crate::dpftrl::PrivacyTarget::Zcdp { rho_units: 1 << 17 },
        delta: 1e-5,
        horizon,
        clip_norm: 1.0,
        server_lr: 1.0,
        momentum: 0.9,
    })
}

/// The run of the durable tests: FedAvg, FedAvgM (server momentum) or
/// DP-FTRL, whose cross-round state a restore must bring back.
fn durable_config(kind: Stateful) -> CoordinatorConfig {
    let mut cfg = config(3, 3);
    cfg.final_evaluation = false;
    match kind {
        Stateful::None => {}
        Stateful::Momentum => {
            cfg.kind =
                crate::kind::KindSettings::FedAvgM(crate::fedavgm::FedAvgMConfig { momentum: 0.9, server_lr: 1.0 });
        }
        Stateful::DpFtrl => {
            cfg.kind = dpftrl_settings(3);
            cfg.noise_seed = Some(crate::dp::NoiseSeed::from_bytes(*DURABLE_SEED));
        }
        Stateful::FrlDp => {
            cfg.arch = ModelArch::Supermask(FRL_DP_NET);
            cfg.kind = frl_dp_settings(3);
            cfg.noise_seed = Some(crate::dp::NoiseSeed::from_bytes(*DURABLE_SEED));
        }
    }
    cfg
}

/// The configuration a restarted server has: the same, except that a
/// DP-FTRL server draws a fresh noise seed at every start. The saved one
/// must win (or the noise of the rounds after the crash would differ).
fn restart_config(kind: Stateful) -> CoordinatorConfig {
    let mut cfg = durable_config(kind);
    if matches!(kind, Stateful::DpFtrl | Stateful::FrlDp) {
        cfg.noise_seed = Some(crate::dp::NoiseSeed::insecure_from_u64(777));
    }
    cfg
}

fn durable_net() -> (Net, Disk) {
    durable_net_with(Stateful::None)
}

fn durable_net_with(kind: Stateful) -> (Net, Disk) {
    let cfg = durable_config(kind);
    let init = initial_model(&cfg);
    let mut coord = Coordinator::new(cfg, init, 42).unwrap();
    coord.enable_persistence();
    let mut disk = Disk::default();
    disk.absorb(&mut coord);
    let mut net = connect_three(coord, Instant::now(), 0, 0);
    disk.absorb(&mut net.coord);
    (net, disk)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The model of an uninterrupted run.
fn reference(kind: Stateful) -> Vec<u32> {
    let (mut net, mut disk) = durable_net_with(kind);
    for _ in 0..3 {
        net.answer_slots(&[0, 1, 2], &mut disk);
    }
    assert_eq!(net.coord.phase(), Phase::Finished);
    bits(net.coord.model())
}

#[test]
fn crash_at_any_point_of_a_round_then_restore_gives_the_same_model() {
    crash_and_restore_at_every_point(Stateful::None);
}

#[test]
fn cross_round_aggregator_state_survives_a_crash_bit_for_bit() {
    // Momentum changes the result: the test would not notice a lost
    // velocity if it didn't.
    assert_ne!(reference(Stateful::Momentum), reference(Stateful::None));
    crash_and_restore_at_every_point(Stateful::Momentum);
    // A snapshot without the velocity is refused rather than silently
    // restarting momentum from zero.
    let (mut net, mut disk) = durable_net_with(Stateful::Momentum);
    net.answer_slots(&[0, 1, 2], &mut disk);
    let (mut snapshot, records) = disk.load();
    assert!(snapshot.aggregator_state.is_some());
    snapshot.aggregator_state = None;
    assert!(matches!(
        Coordinator::restore(durable_config(Stateful::Momentum), snapshot, &records, Instant::now()),
        Err(crate::durable::DurableError::State(_))
    ));
}

#[test]
fn dpftrl_crashed_and_resumed_ends_with_the_uncrashed_model() {
    // The noise matters: a DP-FTRL run differs from FedAvg's, and from a
    // DP-FTRL run with another noise seed, so a restore that lost or
    // replaced the seed, the tree or the last release would be caught.
    let want = reference(Stateful::DpFtrl);
    assert_ne!(want, reference(Stateful::None));
    let other_seed = {
        let cfg = restart_config(Stateful::DpFtrl);
        let init = cfg.arch.init_params(1);
        let mut coord = Coordinator::new(cfg, init, 42).unwrap();
        coord.enable_persistence();
        let mut disk = Disk::default();
        let mut net = connect_three(coord, Instant::now(), 0, 0);
        for _ in 0..3 {
            net.answer_slots(&[0, 1, 2], &mut disk);
        }
        bits(net.coord.model())
    };
    assert_ne!(want, other_seed);
    crash_and_restore_at_every_point(Stateful::DpFtrl);
    // The seed lives only in the server's state: not in the settings
    // clients receive (the run configuration), which carry the kind's
    // public parameters.
    let (mut net, mut disk) = durable_net_with(Stateful::DpFtrl);
    net.answer_slots(&[0, 1, 2], &mut disk);
    let (snapshot, _) = disk.load();
    let state = snapshot.aggregator_state.as_ref().expect("DP-FTRL keeps state");
    assert!(state.bytes.windows(32).any(|w| w == DURABLE_SEED));
    let run_config = bincode::encode_to_vec(net.coord.run_config(), bincode::config::standard()).unwrap();
    assert!(!run_config.windows(32).any(|w| w == DURABLE_SEED));
}

#[test]
fn dpftrl_run_ends_cleanly_when_its_horizon_is_used_up() {
    // rounds = 3 but T = 2: the run finishes after two released rounds,
    // the final evaluation still held, and nothing panics.
    let mut cfg = durable_config(Stateful::DpFtrl);
    cfg.kind = dpftrl_settings(2);
    cfg.final_evaluation = true;
    let init = cfg.arch.init_params(1);
    let coord = Coordinator::new(cfg.clone(), init, 42).unwrap();
    let mut disk = Disk::default();
    let mut net = connect_three(coord, Instant::now(), 0, 0);
    for _ in 0..4 {
        net.answer_slots(&[0, 1, 2], &mut disk);
    }
    assert_eq!(net.coord.phase(), Phase::Finished);
    assert_eq!(net.coord.completed_rounds(), 2);
    let summaries: Vec<&crate::RoundSummary> = net
        .coord_events
        .iter()
        .filter_map(|e| match e {
            Event::RoundCompleted(s) => Some(s),
            _ => None,
        })
        .collect();
    let tasks: Vec<Task> = summaries.iter().map(|s| s.task).collect();
    assert_eq!(tasks, vec![Task::Train, Task::Train, Task::Evaluate]);
    // Privacy spent is reported per round, and reaches the budget (ρ = 1/8
    // over L = 2 levels, both used by t = 2).
    let spent: Vec<f64> = summaries[..2].iter().map(|s| s.stats.as_ref().unwrap().privacy.unwrap().rho).collect();
    assert_eq!(spent, vec![1.0 / 16.0, 1.0 / 8.0]);
}

#[test]
fn frl_dp_crashed_and_resumed_ends_with_the_uncrashed_model() {
    // The mechanism matters: another noise seed gives another final mask,
    // so a restore that lost or replaced the seed, the counts, the
    // selection or the ranking would be caught.
    let want = reference(Stateful::FrlDp);
    let other_seed = {
        let cfg = restart_config(Stateful::FrlDp);
        let init = initial_model(&cfg);
        let mut coord = Coordinator::new(cfg, init, 42).unwrap();
        coord.enable_persistence();
        let mut disk = Disk::default();
        let mut net = connect_three(coord, Instant::now(), 0, 0);
        for _ in 0..3 {
            net.answer_slots(&[0, 1, 2], &mut disk);
        }
        bits(net.coord.model())
    };
    assert_ne!(want, other_seed);
    // And the run moved the model at all (the released masks differ from
    // the initial scores' mask).
    assert_ne!(want, bits(&initial_model(&durable_config(Stateful::FrlDp))));
    crash_and_restore_at_every_point(Stateful::FrlDp);
    // The seed is in the server's state, not in what clients receive.
    let (mut net, mut disk) = durable_net_with(Stateful::FrlDp);
    net.answer_slots(&[0, 1, 2], &mut disk);
    let (snapshot, _) = disk.load();
    let state = snapshot.aggregator_state.as_ref().expect("private FRL keeps state");
    assert!(state.bytes.windows(32).any(|w| w == DURABLE_SEED));
    let run_config = bincode::encode_to_vec(net.coord.run_config(), bincode::config::standard()).unwrap();
    assert!(!run_config.windows(32).any(|w| w == DURABLE_SEED));
}

#[test]
fn frl_dp_run_ends_cleanly_when_its_horizon_is_used_up() {
    // rounds = 3 but horizon = 2: two released rounds, privacy reported.
    let mut cfg = durable_config(Stateful::FrlDp);
    cfg.kind = frl_dp_settings(2);
    let init = initial_model(&cfg);
    let coord = Coordinator::new(cfg, init, 42).unwrap();
    let mut disk = Disk::default();
    let mut net = connect_three(coord, Instant::now(), 0, 0);
    for _ in 0..4 {
        net.answer_slots(&[0, 1, 2], &mut disk);
    }
    assert_eq!(net.coord.phase(), Phase::Finished);
    assert_eq!(net.coord.completed_rounds(), 2);
    let spent: Vec<f64> = net
        .coord_events
        .iter()
        .filter_map(|e| match e {
            Event::RoundCompleted(s) => s.stats.as_ref().and_then(|st| st.privacy).map(|p| p.rho),
            _ => None,
        })
        .collect();
    assert_eq!(spent.len(), 2);
    assert!(spent[0] > 0.0 && spent[0] <= spent[1] && spent[1] <= 1e4, "{spent:?}");
}

fn crash_and_restore_at_every_point(kind: Stateful) {
    let want = reference(kind);
    // Crash in round 2 after 0, 1, 2 and 3 acknowledged reports (3 = the
    // round closed and round 3 opened), and once in round 1.
    for (round, acked) in [(2u32, 0usize), (2, 1), (2, 2), (2, 3), (1, 1)] {
        let (mut net, mut disk) = durable_net_with(kind);
        for _ in 1..round {
            net.answer_slots(&[0, 1, 2], &mut disk);
        }
        net.answer_slots(&(0..acked).collect::<Vec<_>>(), &mut disk);
        // Crash: everything not on the disk is gone, every connection drops.
        let (snapshot, records) = disk.load();
        let later = net.now + Duration::from_secs(5);
        let coord = Coordinator::restore(restart_config(kind), snapshot, &records, later).unwrap();
        // The same clients reconnect on new connections.
        let mut net2 = connect_three(coord, later, 10, 0x55);
        disk.absorb(&mut net2.coord);
        for _ in 0..4 {
            net2.answer_slots(&[0, 1, 2], &mut disk);
        }
        assert_eq!(net2.coord.phase(), Phase::Finished, "crash in round {round} after {acked} acks");
        assert_eq!(bits(net2.coord.model()), want, "crash in round {round} after {acked} acks");
        // An acknowledged report is never asked for again.
        for slot in 0..acked {
            let asked = net2.seen[slot]
                .iter()
                .any(|e| matches!(e, ParticipantEvent::TaskRequested { round: r, .. } if *r == round));
            assert!(!asked || acked == 3, "client {slot} was asked to redo an acknowledged round {round}");
        }
    }
}

/// A crash after the last report of a round is durable but before the
/// snapshot that closes the round: the restored round holds every report and
/// closes as soon as clients rejoin, not at its deadline. (Found by issue
/// 10's random kill test: a server killed there sat out the whole round
/// timeout, 600 s by default, after restarting.)
#[test]
fn a_restored_round_with_every_report_closes_when_clients_rejoin() {
    let want = reference(Stateful::None);
    let (mut net, mut disk) = durable_net();
    net.answer_slots(&[0, 1], &mut disk);
    disk.die_at_snapshot = true;
    net.answer_slots(&[2], &mut disk);
    let (snapshot, records) = disk.load();
    assert_eq!((snapshot.completed_rounds, records.len()), (0, 4), "round 1 opened, 3 reports, no snapshot");
    disk.die_at_snapshot = false;
    let later = net.now + Duration::from_secs(5);
    let coord = Coordinator::restore(durable_config(Stateful::None), snapshot, &records, later).unwrap();
    let mut net2 = connect_three(coord, later, 10, 0x55);
    disk.absorb(&mut net2.coord);
    // No timeout was handled: the rejoin closed round 1 and opened round 2.
    assert_eq!(net2.coord.completed_rounds(), 1);
    for _ in 0..3 {
        net2.answer_slots(&[0, 1, 2], &mut disk);
    }
    assert_eq!(net2.coord.phase(), Phase::Finished);
    assert_eq!(bits(net2.coord.model()), want);
}

#[test]
fn restore_refuses_another_run_or_enrolment_and_bad_logs() {
    let (net, disk) = durable_net();
    drop(net);
    let (snapshot, records) = disk.load();
    let mut other = config(3, 3);
    other.run_id = RunId([1; 16]);
    assert!(matches!(
        Coordinator::restore(other, snapshot.clone(), &records, Instant::now()),
        Err(crate::durable::DurableError::Mismatch("run id"))
    ));
    let mut fewer = config(3, 3);
    fewer.enrolled.pop();
    fewer.min_clients = 2;
    fewer.clients_per_round = 2;
    fewer.quorum = 2;
    assert!(matches!(
        Coordinator::restore(fewer, snapshot.clone(), &records, Instant::now()),
        Err(crate::durable::DurableError::Mismatch("enrolled keys"))
    ));
    // A log that opens round 5 after 0 completed rounds cannot be replayed.
    let bad = vec![Record::RoundOpened { round: 5, task: Task::Train, sampled: vec![0] }];
    assert!(matches!(
        Coordinator::restore(config(3, 3), snapshot, &bad, Instant::now()),
        Err(crate::durable::DurableError::Replay { index: 0, .. })
    ));
    // Another model after a restart is named as such, not as a log fault.
    let (snapshot, records) = disk.load();
    let mut wider = config(3, 3);
    wider.arch = ModelArch::Mlp { input: 4, hidden: vec![5], classes: 2 };
    assert!(matches!(
        Coordinator::restore(wider, snapshot, &records, Instant::now()),
        Err(crate::durable::DurableError::ModelMismatch(_))
    ));
    assert!(decode_snapshot(b"junk").is_err());
    assert!(decode_record(&[9, 9, 9]).is_err());
}
