//! What the update-crafting attacks share: the kinds they apply to, the
//! attackers' benign updates (trained on the malicious clients' own
//! shards, in parallel on `env.threads`), the statistics they are built
//! from, and the crafted vector as a well-formed payload of the run's kind.
//!
//! A crafted update is a dense delta `θ_after − θ_before`. For the dense
//! kinds (fedavg, fedavgm) it is sent as it is, tagged with the run's kind;
//! for Ferret, benign updates are trained as dense deltas (Ferret's clients
//! train densely before projecting) and the crafted delta is projected onto
//! the round's bases like an honest client's ([`tally_protocol::ferret::project`]
//! of the descent-sign delta `θ_before − θ_after`).

use tally_protocol::kind::{KindId, KindSettings};
use tally_protocol::wire::{RunConfig, UpdatePayload};

use super::{AttackEnv, AttackError, RoundTask};
use crate::{SimError, TAG_ATTACK, hash_seed, par_map};

/// The kinds the update-crafting attacks apply to, in words.
pub const NEEDS: &str = "a dense kind (fedavg or fedavgm) or ferret";

/// Refuses kinds whose updates are not dense deltas nor Ferret projections.
pub fn check_kind(attack: &'static str, kind: &KindSettings) -> Result<(), AttackError> {
    match kind {
        KindSettings::FedAvg | KindSettings::FedAvgM(_) | KindSettings::Ferret(_) => Ok(()),
        other => Err(AttackError::WrongKind { attack, needs: NEEDS, kind: other.name() }),
    }
}

/// Up to `pool` attackers drawn for `round` from all malicious clients (not
/// only the round's), as FRL's code draws them; the draw is FRL reverse's.
pub fn attacker_pool(env: &AttackEnv<'_>, round: u32, pool: usize) -> Vec<usize> {
    let ids: Vec<usize> = (0..env.malicious).collect();
    let mut rng = tally_protocol::rng::LocalRng::new(hash_seed(env.seed, TAG_ATTACK, u64::from(round)));
    rng.sample(&ids, pool.min(env.malicious))
}

/// The run as its clients train densely: Ferret's clients train the same
/// way as FedAvg's before they project.
fn dense_run(run: &RunConfig) -> RunConfig {
    match run.kind {
        KindSettings::Ferret(_) => RunConfig { kind: KindSettings::FedAvg, ..run.clone() },
        _ => run.clone(),
    }
}

/// The benign dense deltas `θ_after − θ_before` clients `ids` would send in
/// `task`'s round, trained on their own shards (in `ids` order).
pub fn benign_updates(env: &AttackEnv<'_>, task: &RoundTask<'_>, ids: &[usize]) -> Result<Vec<Vec<f32>>, SimError> {
    let run = dense_run(env.run);
    let dim = run.arch.num_params();
    let updates = par_map(env.threads, ids, |&a| {
        tally_kernels::update::local_update(
            &run,
            a as u32,
            task.round,
            task.seed,
            task.model,
            &env.shards[a],
            env.device,
        )
    })?;
    updates
        .into_iter()
        .map(|u| Ok(tally_protocol::fedavg::decode_delta(&u?.payload.data, dim).map_err(tally_protocol::Error::from)?))
        .collect()
}

/// `delta` (a dense `θ_after − θ_before`) as client `client`'s payload of the
/// run's kind in `round`.
pub fn payload(
    env: &AttackEnv<'_>,
    attack: &'static str,
    round: u32,
    client: usize,
    delta: &[f32],
) -> Result<UpdatePayload, SimError> {
    Ok(match &env.run.kind {
        KindSettings::FedAvg => tally_protocol::fedavg::encode_delta(tally_protocol::fedavg::ID, delta),
        KindSettings::FedAvgM(_) => tally_protocol::fedavg::encode_delta(tally_protocol::fedavgm::ID, delta),
        KindSettings::Ferret(cfg) => {
            use tally_protocol::ferret;
            let descent: Vec<f32> = delta.iter().map(|v| -v).collect();
            // The projection's seed choice is the client's own: any seed does.
            let private = hash_seed(env.seed, TAG_ATTACK ^ 0xFE55, u64::from(round) << 32 | client as u64);
            let entries = ferret::project(cfg, &ferret::blocks(&env.run.arch), round, &descent, private);
            ferret::payload(&entries)
        }
        other => return Err(AttackError::WrongKind { attack, needs: NEEDS, kind: other.name() }.into()),
    })
}

/// The coordinate-wise mean of `vs` (non-empty, equal lengths), in f64.
pub fn mean(vs: &[Vec<f32>]) -> Vec<f64> {
    let mut m = vec![0f64; vs.first().map_or(0, Vec::len)];
    for v in vs {
        for (a, x) in m.iter_mut().zip(v) {
            *a += f64::from(*x);
        }
    }
    let n = vs.len().max(1) as f64;
    m.iter_mut().for_each(|a| *a /= n);
    m
}

/// The coordinate-wise standard deviation of `vs` around `mean`, with
/// Bessel's correction (`n − 1`, as `torch.std`); zero for one vector.
pub fn std(vs: &[Vec<f32>], mean: &[f64]) -> Vec<f64> {
    let mut s = vec![0f64; mean.len()];
    if vs.len() < 2 {
        return s;
    }
    for v in vs {
        for ((a, x), m) in s.iter_mut().zip(v).zip(mean) {
            let d = f64::from(*x) - m;
            *a += d * d;
        }
    }
    let n = (vs.len() - 1) as f64;
    s.iter_mut().for_each(|a| *a = (*a / n).sqrt());
    s
}

/// `‖a − b‖²` in f64.
pub fn sq_dist(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - f64::from(*y)).powi(2)).sum()
}

/// `μ − λ·p`, rounded to f32.
pub fn shifted(mu: &[f64], lambda: f64, p: &[f64]) -> Vec<f32> {
    mu.iter().zip(p).map(|(m, d)| (m - lambda * d) as f32).collect()
}

/// `v` in f64.
pub fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|x| f64::from(*x)).collect()
}

/// The payloads of `clients`, all sending the same crafted `delta`.
pub fn same_for_all(
    env: &AttackEnv<'_>,
    attack: &'static str,
    round: u32,
    clients: &[usize],
    delta: &[f32],
) -> Result<Vec<UpdatePayload>, SimError> {
    clients.iter().map(|&c| payload(env, attack, round, c, delta)).collect()
}

/// The tag a dense kind's payloads carry (for tests and the scale attack).
pub fn dense_id(kind: &KindSettings) -> Option<KindId> {
    match kind {
        KindSettings::FedAvg => Some(tally_protocol::fedavg::ID),
        KindSettings::FedAvgM(_) => Some(tally_protocol::fedavgm::ID),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_std_by_hand() {
        let vs = vec![vec![1.0, 0.0], vec![2.0, 0.0], vec![3.0, 6.0]];
        let m = mean(&vs);
        assert_eq!(m, vec![2.0, 2.0]);
        // Sample std: sqrt(((1)² + 0 + 1²)/2) = 1; sqrt((4 + 4 + 16)/2) = sqrt(12).
        let s = std(&vs, &m);
        assert_eq!(s[0], 1.0);
        assert!((s[1] - 12f64.sqrt()).abs() < 1e-12);
        assert_eq!(std(&vs[..1], &mean(&vs[..1])), vec![0.0, 0.0]);
        assert_eq!(sq_dist(&[1.0, 2.0], &[4.0, 6.0]), 25.0);
        assert_eq!(shifted(&[1.0, 2.0], 2.0, &[0.5, -1.0]), vec![0.0, 4.0]);
    }
}
