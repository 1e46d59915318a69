//! The attacks FRL's paper runs against trimmed mean and Multi-Krum
//! (`docs/algorithms.md` §1.8; Shejwalkar and Houmansadr's AGR-tailored
//! attacks as FRL's code runs them). Every malicious client of a round
//! sends the same `m = μ − λ·σ`, where `μ` and `σ` are the coordinate-wise
//! mean and standard deviation (`n − 1`) of the attackers' benign updates
//! (up to `pool` attackers drawn from all malicious clients, each trained
//! from the global model on its own shard), and `λ` comes from a halving
//! search from `lambda_init` (FRL: 5) down to a step of 1e-5 that runs the
//! targeted rule on `f` copies of `m` plus the attackers' benign updates:
//!
//! - `tailored-trimmed-mean`: each try that moves the trimmed mean farther
//!   from `μ` than the previous try did is kept and the next try is larger,
//!   otherwise smaller (FRL's search, which climbs `‖TrMean − μ‖`);
//! - `tailored-multi-krum`: the largest `λ` for which Multi-Krum chooses
//!   all `f` malicious copies.
//!
//! `f` is the rule's own parameter (`trim`, `byzantine`) when the run uses
//! the targeted rule, otherwise the number of malicious clients in the
//! round (FRL's code, whose server is told that count). With the scenario's
//! `rule_knows_attackers` the run's rule is given that count each round,
//! and the attack sees the rule with it.
//!
//! Knowledge: the malicious clients collude, see their own benign updates
//! (never honest clients' ones) and know the aggregation rule and its
//! parameter. Applies to the dense kinds (fedavg, fedavgm), whose rules run
//! on the dense vectors they craft.

use tally_protocol::kind::{KindSettings, RuleSpec};
use tally_protocol::rule::{MultiKrum, TrimmedMean, VectorRule, Weighted};
use tally_protocol::wire::UpdatePayload;

use super::{Attack, AttackEnv, AttackError, RoundTask, dense, min_max};
use crate::SimError;

/// Name of the trimmed-mean attack in scenario files.
pub const TRIMMED_MEAN: &str = "tailored-trimmed-mean";
/// Name of the Multi-Krum attack in scenario files.
pub const MULTI_KRUM: &str = "tailored-multi-krum";

const NEEDS: &str = "a dense kind (fedavg or fedavgm)";

/// The rule an attack is tailored to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Coordinate-wise trimmed mean.
    TrimmedMean,
    /// Multi-Krum.
    MultiKrum,
}

/// The attack.
#[derive(Debug, Clone)]
pub struct Tailored {
    target: Target,
    fraction: f64,
    lambda_init: f64,
    pool: usize,
}

impl Tailored {
    /// `fraction` malicious clients; the search from `lambda_init`; `pool` attackers.
    pub fn new(target: Target, fraction: f64, lambda_init: f64, pool: usize) -> Result<Self, AttackError> {
        let attack = name(target);
        if !(lambda_init.is_finite() && lambda_init > min_max::TOLERANCE) {
            return Err(AttackError::Invalid { attack, reason: "lambda_init must be finite and above 1e-5" });
        }
        if pool == 0 {
            return Err(AttackError::Invalid { attack, reason: "pool must be at least 1" });
        }
        Ok(Tailored { target, fraction, lambda_init, pool })
    }

    /// `f` for the simulated rule: the run's own parameter if it runs the
    /// target, else the round's malicious count.
    fn f(&self, rule: &RuleSpec, malicious: usize) -> usize {
        match (self.target, rule) {
            (Target::TrimmedMean, RuleSpec::TrimmedMean { trim }) => *trim as usize,
            (Target::MultiKrum, RuleSpec::MultiKrum { byzantine }) => *byzantine as usize,
            _ => malicious,
        }
    }
}

fn name(target: Target) -> &'static str {
    match target {
        Target::TrimmedMean => TRIMMED_MEAN,
        Target::MultiKrum => MULTI_KRUM,
    }
}

/// `f` copies of `m` followed by `benign`, as a rule's input.
fn round_of<'a>(m: &'a [f32], f: usize, benign: &'a [Vec<f32>]) -> Vec<Weighted<'a>> {
    std::iter::repeat_n(m, f)
        .chain(benign.iter().map(Vec::as_slice))
        .enumerate()
        .map(|(i, values)| Weighted { client: i as u32, weight: 1, values })
        .collect()
}

/// FRL's trimmed-mean attack on `benign` with `f` malicious copies: `(m, λ)`.
pub fn against_trimmed_mean(benign: &[Vec<f32>], f: usize, trim: usize, lambda_init: f64) -> (Vec<f32>, f64) {
    let mu = dense::mean(benign);
    let sigma = dense::std(benign, &mu);
    let rule = TrimmedMean { trim };
    let mut out = vec![0f64; mu.len()];
    let mut distance = |lambda: f64| {
        let m = dense::shifted(&mu, lambda, &sigma);
        rule.combine(&round_of(&m, f, benign), &mut out);
        out.iter().zip(&mu).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt()
    };
    // FRL's climb: a try that increases the distance over the previous try
    // succeeds (the first always does).
    let mut previous = -1.0;
    let lambda = min_max::halving_search(lambda_init, |lambda| {
        let d = distance(lambda);
        let better = previous < d;
        previous = d;
        better
    });
    (dense::shifted(&mu, lambda, &sigma), lambda)
}

/// FRL's Multi-Krum attack on `benign` with `f` malicious copies (and `f`
/// as the rule's parameter `byzantine`): `(m, λ)`.
pub fn against_multi_krum(benign: &[Vec<f32>], f: usize, byzantine: usize, lambda_init: f64) -> (Vec<f32>, f64) {
    let mu = dense::mean(benign);
    let sigma = dense::std(benign, &mu);
    let rule = MultiKrum { byzantine, multi: true };
    let lambda = min_max::halving_search(lambda_init, |lambda| {
        let m = dense::shifted(&mu, lambda, &sigma);
        let chosen = rule.choose(&round_of(&m, f, benign));
        chosen.iter().filter(|&&i| i < f).count() == f
    });
    (dense::shifted(&mu, lambda, &sigma), lambda)
}

impl Attack for Tailored {
    fn name(&self) -> &'static str {
        name(self.target)
    }

    fn fraction(&self) -> f64 {
        self.fraction
    }

    fn check(&self, kind: &KindSettings) -> Result<(), AttackError> {
        match kind {
            KindSettings::FedAvg | KindSettings::FedAvgM(_) => Ok(()),
            other => Err(AttackError::WrongKind { attack: self.name(), needs: NEEDS, kind: other.name() }),
        }
    }

    fn craft(
        &self,
        env: &AttackEnv<'_>,
        task: &RoundTask<'_>,
        clients: &[usize],
    ) -> Result<Vec<UpdatePayload>, SimError> {
        let attackers = dense::attacker_pool(env, task.round, self.pool);
        let benign = dense::benign_updates(env, task, &attackers)?;
        let copies = task.malicious.max(clients.len());
        let f = self.f(&env.rule, copies);
        let (update, _) = match self.target {
            Target::TrimmedMean => against_trimmed_mean(&benign, copies, f, self.lambda_init),
            Target::MultiKrum => against_multi_krum(&benign, copies, f, self.lambda_init),
        };
        dense::same_for_all(env, self.name(), task.round, clients, &update)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn trimmed_mean_attack_by_hand() {
        // Benign 1-D {0, 1, 2}: μ = 1, σ = 1. One malicious copy m = 1 − λ,
        // trim 1 over {m, 0, 1, 2}: the mean of the middle two. For λ ≥ 1
        // (m ≤ 0) that is 0.5 whatever λ, so the distance |0.5 − 1| stops
        // growing: the climb keeps the first λ = 5 (distance 0.5), then
        // 7.5 (not farther: fails), 6.25, ... down to within 1e-5 of 5.
        let benign = vec![vec![0.0], vec![1.0], vec![2.0]];
        let (m, l) = against_trimmed_mean(&benign, 1, 1, 5.0);
        assert_eq!(l, 5.0);
        assert_eq!(m, vec![-4.0]);
        // The trimmed mean it produces is as far from μ as any λ's.
        let tm = |m: f32| {
            let mut out = [0f64];
            TrimmedMean { trim: 1 }.combine(&round_of(&[m], 1, &benign), &mut out);
            (out[0] - 1.0).abs()
        };
        assert!(tm(m[0]) >= tm(0.5) && tm(m[0]) >= tm(1.0));
    }

    #[test]
    fn multi_krum_attack_keeps_the_copies_chosen() {
        // Five benign 1-D updates around 1, f = 1 copy, byzantine 1: a round
        // of 6 picks 6 − 2·1 − 2 = 2 updates. The copy is chosen while it
        // sits inside the benign cluster and refused once it is far out.
        let benign: Vec<Vec<f32>> = [0.8f32, 0.9, 1.0, 1.1, 1.2].iter().map(|&v| vec![v]).collect();
        let (m, l) = against_multi_krum(&benign, 1, 1, 5.0);
        let chosen = MultiKrum { byzantine: 1, multi: true }.choose(&round_of(&m, 1, &benign));
        assert!(chosen.contains(&0), "λ {l}: {chosen:?}");
        // Largest such λ: a bit larger and the copy is out.
        let sigma = dense::std(&benign, &dense::mean(&benign));
        let m2 = dense::shifted(&dense::mean(&benign), l + 1e-3, &sigma);
        let chosen = MultiKrum { byzantine: 1, multi: true }.choose(&round_of(&m2, 1, &benign));
        assert!(!chosen.contains(&0), "λ {l}: {chosen:?}");
        assert!(l > 0.0);
    }

    #[test]
    fn f_is_the_rules_own_parameter_when_it_is_the_target() {
        let t = Tailored::new(Target::TrimmedMean, 0.2, 5.0, 25).unwrap();
        assert_eq!(t.f(&RuleSpec::TrimmedMean { trim: 3 }, 1), 3);
        assert_eq!(t.f(&RuleSpec::Mean, 2), 2);
        let k = Tailored::new(Target::MultiKrum, 0.2, 5.0, 25).unwrap();
        assert_eq!(k.f(&RuleSpec::MultiKrum { byzantine: 4 }, 1), 4);
        assert_eq!(k.f(&RuleSpec::TrimmedMean { trim: 3 }, 1), 1);
        assert!(Tailored::new(Target::MultiKrum, 0.2, 0.0, 25).is_err());
    }
}
