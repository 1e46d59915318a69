//! [`FrlVote`] as the coordinator's [`Aggregator`].

use super::sort::vote_order_into;
use super::vote::Sums;
use super::{FrlVote, ID, MaskRule, NAME, Ranking, bad_payload, encode};
use crate::aggregate::{AggregateError, AggregateStats, Aggregator, ClientIndex, StateError, check_common};
use crate::error::Misbehaviour;
use crate::wire::{ClientUpdate, ModelSync};

impl Aggregator for FrlVote {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Opens a round; `global` is not used (the state is the ranking).
    fn begin_round(&mut self, round: u32, _global: &[f32]) {
        self.round = round;
        if !self.votes.is_empty() {
            self.votes.clear();
            self.clear_sums();
        }
    }

    fn absorb(&mut self, client: ClientIndex, update: &ClientUpdate) -> Result<(), Misbehaviour> {
        check_common(update)?;
        let bytes = crate::kind::payload_of(update, ID, NAME)?;
        if self.votes.contains_key(&client) {
            // Sums can't take a vote back; the coordinator refuses duplicates
            // before this, so this only guards direct callers.
            return Err(Misbehaviour::Duplicate(self.round));
        }
        if self.votes.len() + 1 > self.narrow_votes {
            self.widen();
        }
        self.add_packed(bytes).map_err(bad_payload)?;
        self.votes.insert(client, (update.num_samples, update.train_loss));
        Ok(())
    }

    fn finish(&mut self, global: &mut [f32]) -> Result<AggregateStats, AggregateError> {
        if self.votes.is_empty() {
            return Err(AggregateError::Empty);
        }
        for w in self.offsets.windows(2) {
            let out = &mut self.global.order[w[0]..w[1]];
            match &self.sums {
                Sums::Narrow(s) => vote_order_into(&s[w[0]..w[1]], out, &mut self.scratch),
                Sums::Wide(s) => vote_order_into(&s[w[0]..w[1]], out, &mut self.scratch),
            }
        }
        if global.len() == self.sorted.len() {
            self.write_global_scores(global);
        }
        // Ascending client order: the float sums don't depend on arrival.
        let samples = self.votes.values().fold(0u64, |t, (n, _)| t.saturating_add(*n));
        let loss = self.votes.values().map(|(n, l)| *n as f64 * f64::from(*l)).sum::<f64>() / samples.max(1) as f64;
        let stats = AggregateStats { updates: self.votes.len(), samples, train_loss: loss, privacy: None };
        self.votes.clear();
        self.clear_sums();
        Ok(stats)
    }

    /// Rounds publish the global ranking, bit-packed.
    fn publish(&self, _global: &[f32]) -> ModelSync {
        ModelSync::Published(encode(&self.global))
    }

    /// The global ranking becomes the ranking of the restored scores. Edges
    /// with equal scores may come out in another order than before the
    /// restart; that changes neither the scores clients rebuild nor any
    /// later vote (which starts from the clients' rankings only).
    fn restore_model(&mut self, global: &[f32]) -> Result<(), StateError> {
        let model = |reason: String| StateError::Model { name: NAME, reason };
        let ranking = Ranking::from_scores(global, &self.cfg.layer_sizes, MaskRule::TwoSided)
            .map_err(|e| model(e.to_string()))?;
        let mut scores = vec![0f32; global.len()];
        self.global = ranking;
        self.write_global_scores(&mut scores);
        if scores != global {
            return Err(model("not a permutation of the sorted initial scores".into()));
        }
        Ok(())
    }
}
