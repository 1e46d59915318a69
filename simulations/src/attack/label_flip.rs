//! Label flipping, a data transform: every malicious client trains honestly
//! (the run's own local training, whatever the kind) on its own shard with
//! its labels flipped: `l → C−1−l` for `C` classes, or only `source →
//! target` when both are given.
//!
//! Knowledge: its own data only. The malicious clients do not collude, see
//! no update and do not know the aggregation rule. Applies to every kind
//! that trains (fedavg, fedavgm, spsa, frl, ferret): the payload is the
//! kind's own, built by the kind's own client code.

use tally_kernels::Dataset;
use tally_protocol::kind::KindSettings;
use tally_protocol::model::ModelArch;
use tally_protocol::wire::UpdatePayload;

use super::{Attack, AttackEnv, AttackError, RoundTask};
use crate::{SimError, par_map};

/// Name in scenario files.
pub const NAME: &str = "label-flip";

/// The attack.
#[derive(Debug, Clone)]
pub struct LabelFlip {
    fraction: f64,
    pair: Option<(u8, u8)>,
}

impl LabelFlip {
    /// `fraction` malicious clients; all labels flipped, or `source → target`.
    pub fn new(fraction: f64, source: Option<u8>, target: Option<u8>) -> Result<Self, AttackError> {
        let pair = match (source, target) {
            (None, None) => None,
            (Some(s), Some(t)) if s != t => Some((s, t)),
            (Some(_), Some(_)) => {
                return Err(AttackError::Invalid { attack: NAME, reason: "source and target must differ" });
            }
            _ => {
                return Err(AttackError::Invalid { attack: NAME, reason: "source and target go together" });
            }
        };
        Ok(LabelFlip { fraction, pair })
    }

    /// The label `l` becomes, with `classes` classes.
    pub fn flip(&self, l: u8, classes: usize) -> u8 {
        match self.pair {
            Some((s, t)) if l == s => t,
            Some(_) => l,
            // `l < classes ≤ 256`, so this is in range.
            None => (classes - 1 - usize::from(l)) as u8,
        }
    }

    /// `data` with its labels flipped.
    pub fn flipped(&self, data: &Dataset) -> Dataset {
        let mut d = data.clone();
        for l in &mut d.labels {
            *l = self.flip(*l, data.classes);
        }
        d
    }
}

impl Attack for LabelFlip {
    fn name(&self) -> &'static str {
        NAME
    }

    fn fraction(&self) -> f64 {
        self.fraction
    }

    /// Every kind trains on labelled data.
    fn check(&self, _kind: &KindSettings) -> Result<(), AttackError> {
        Ok(())
    }

    fn check_model(&self, arch: &ModelArch) -> Result<(), AttackError> {
        match self.pair {
            Some((s, t)) if usize::from(s.max(t)) >= arch.classes() => Err(AttackError::Invalid {
                attack: NAME,
                reason: "source and target must be below the model's classes",
            }),
            _ => Ok(()),
        }
    }

    fn craft(
        &self,
        env: &AttackEnv<'_>,
        task: &RoundTask<'_>,
        clients: &[usize],
    ) -> Result<Vec<UpdatePayload>, SimError> {
        let updates = par_map(env.threads, clients, |&c| {
            let data = self.flipped(&env.shards[c]);
            tally_kernels::update::local_update(env.run, c as u32, task.round, task.seed, task.model, &data, env.device)
        })?;
        updates.into_iter().map(|u| Ok(u?.payload)).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn flips_all_labels_or_one_pair() {
        let all = LabelFlip::new(0.1, None, None).unwrap();
        assert_eq!((0..10).map(|l| all.flip(l, 10)).collect::<Vec<_>>(), [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]);
        let pair = LabelFlip::new(0.1, Some(7), Some(1)).unwrap();
        assert_eq!((0..10).map(|l| pair.flip(l, 10)).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5, 6, 1, 8, 9]);
        assert!(LabelFlip::new(0.1, Some(1), None).is_err());
        assert!(LabelFlip::new(0.1, Some(1), Some(1)).is_err());
        let mnist = ModelArch::mnist_mlp();
        assert!(pair.check_model(&mnist).is_ok());
        let err = LabelFlip::new(0.1, Some(10), Some(1)).unwrap().check_model(&mnist).unwrap_err();
        assert!(err.to_string().contains("source and target"), "{err}");
    }
}
