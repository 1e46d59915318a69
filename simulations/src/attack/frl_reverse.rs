//! FRL's attack (`docs/algorithms.md` §1.7): up to `pool` attackers drawn
//! from all malicious clients (not only the round's) train benignly from
//! the global model on their own data; every malicious client of the round
//! submits the ranking that reverses the sum of their positions.

use std::cmp::Reverse;

use tally_protocol::frl::{self, Ranking};
use tally_protocol::kind::{KindSettings, payload_of};
use tally_protocol::wire::UpdatePayload;

use super::{Attack, AttackEnv, AttackError, RoundTask};
use crate::{SimError, TAG_ATTACK, hash_seed, par_map};

/// Name in scenario files.
pub const NAME: &str = "frl-reverse";

/// The attack.
#[derive(Debug, Clone)]
pub struct FrlReverse {
    fraction: f64,
    pool: usize,
}

impl FrlReverse {
    /// `fraction` malicious clients, a consensus of up to `pool` attackers.
    pub fn new(fraction: f64, pool: usize) -> Result<Self, AttackError> {
        if pool == 0 {
            return Err(AttackError::Invalid { attack: NAME, reason: "pool must be at least 1" });
        }
        Ok(FrlReverse { fraction, pool })
    }
}

impl Attack for FrlReverse {
    fn name(&self) -> &'static str {
        NAME
    }

    fn fraction(&self) -> f64 {
        self.fraction
    }

    fn check(&self, kind: &KindSettings) -> Result<(), AttackError> {
        match kind {
            KindSettings::Frl(_) => Ok(()),
            other => Err(AttackError::WrongKind { attack: NAME, needs: "the frl kind", kind: other.name() }),
        }
    }

    fn craft(
        &self,
        env: &AttackEnv<'_>,
        task: &RoundTask<'_>,
        clients: &[usize],
    ) -> Result<Vec<UpdatePayload>, SimError> {
        let KindSettings::Frl(run) = &env.run.kind else {
            return Err(
                AttackError::WrongKind { attack: NAME, needs: "the frl kind", kind: env.run.kind.name() }.into()
            );
        };
        // The attackers: drawn per round from all malicious clients.
        let ids: Vec<usize> = (0..env.malicious).collect();
        let mut rng = tally_protocol::rng::LocalRng::new(hash_seed(env.seed, TAG_ATTACK, u64::from(task.round)));
        let attackers = rng.sample(&ids, self.pool.min(env.malicious));
        let updates = par_map(env.threads, &attackers, |&a| {
            tally_kernels::update::local_update(
                env.run,
                a as u32,
                task.round,
                task.seed,
                task.model,
                &env.shards[a],
                env.device,
            )
        })?;
        // A = the sum of each edge's positions in the attackers' rankings.
        let sizes = &run.vote.layer_sizes;
        let mut sums = vec![0u64; run.vote.num_edges()];
        for update in updates {
            let update = update?;
            let bytes = payload_of(&update, frl::ID, frl::NAME).map_err(tally_protocol::Error::from)?;
            let ranking = frl::decode(bytes, sizes)?;
            let mut offset = 0;
            for (layer, &n) in ranking.layers().zip(sizes) {
                for (position, &edge) in layer.iter().enumerate() {
                    sums[offset + edge as usize] += position as u64;
                }
                offset += n;
            }
        }
        // R_mal = argsort_desc(A): the attackers' consensus, reversed.
        let mut layers = Vec::with_capacity(sizes.len());
        let mut offset = 0;
        for &n in sizes {
            let a = &sums[offset..offset + n];
            let mut order: Vec<u32> = (0..n as u32).collect();
            order.sort_unstable_by_key(|&e| (Reverse(a[e as usize]), e));
            layers.push(order);
            offset += n;
        }
        let payload = frl::payload(&Ranking::new(layers, sizes)?);
        Ok(vec![payload; clients.len()])
    }
}
