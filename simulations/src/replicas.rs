//! Replicas that are provably identical share the work of a round.
//!
//! In a replicated run (SPSA, Ferret) every simulated client holds the model
//! and applies each round's log to it, so a federation of 100 clients does
//! the same regeneration of shared directions 100 times: for Ferret on the
//! MNIST MLP that is ~10⁸ multiply-adds per replica per round, and it was
//! 99% of a round's time. [`SharedApplier`] remembers the last applications
//! (the input slice, the directions and the result) and answers a repeat
//! with a copy of the result. The input and the directions are compared bit
//! for bit, never by hash, so a replica gets the cached result only when it
//! would have computed exactly those bits: sharing cannot change a run.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tally_protocol::prng::{self, DirectionApplier, StreamId};

/// Applications remembered: a round's log touches one slice per Ferret
/// block (at most a dozen for our models) or one whole vector (SPSA); 32
/// covers a round of any of them with room to spare, at a memory cost of
/// two copies of each slice.
const REMEMBERED: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Rademacher,
    Uniform,
}

#[derive(Debug)]
struct Memo {
    op: Op,
    input: Vec<f32>,
    dirs: Vec<(StreamId, f32)>,
    output: Vec<f32>,
}

/// A [`DirectionApplier`] for every replica of one simulation (module docs).
#[derive(Debug, Default)]
pub struct SharedApplier {
    memo: Mutex<VecDeque<Memo>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn same_dirs(a: &[(StreamId, f32)], b: &[(StreamId, f32)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((i, s), (j, t))| i == j && s.to_bits() == t.to_bits())
}

impl SharedApplier {
    /// Applications answered from memory, and computed.
    pub fn counts(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    fn memoized(&self, op: Op, x: &mut [f32], dirs: &[(StreamId, f32)], apply: fn(&mut [f32], &[(StreamId, f32)])) {
        {
            // A poisoned lock only means another replica panicked mid-insert;
            // the entries themselves are whole, so keep using them.
            let memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(m) = memo.iter().find(|m| m.op == op && same_dirs(&m.dirs, dirs) && same_bits(&m.input, x)) {
                x.copy_from_slice(&m.output);
                self.hits.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let input = x.to_vec();
        apply(x, dirs);
        self.misses.fetch_add(1, Ordering::Relaxed);
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        memo.push_front(Memo { op, input, dirs: dirs.to_vec(), output: x.to_vec() });
        memo.truncate(REMEMBERED);
    }
}

impl DirectionApplier for SharedApplier {
    fn apply_rademacher(&self, x: &mut [f32], directions: &[(StreamId, f32)]) {
        self.memoized(Op::Rademacher, x, directions, prng::apply_rademacher);
    }

    fn apply_uniform(&self, x: &mut [f32], directions: &[(StreamId, f32)]) {
        self.memoized(Op::Uniform, x, directions, prng::apply_uniform);
    }

    fn name(&self) -> String {
        "cpu, shared by identical replicas".into()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tally_protocol::prng::Purpose;

    fn dir(step: u32, s: f32) -> (StreamId, f32) {
        (StreamId { run_seed: 1, purpose: Purpose::FerretBasis, round: 0, client: 2, step }, s)
    }

    #[test]
    fn a_repeat_is_served_from_memory_and_anything_different_is_computed() {
        let shared = SharedApplier::default();
        let x0: Vec<f32> = (0..1000).map(|i| i as f32 * 0.01).collect();
        let dirs = [dir(0, 0.5), dir(1, -0.25)];
        let mut want = x0.clone();
        prng::apply_uniform(&mut want, &dirs);
        for _ in 0..3 {
            let mut x = x0.clone();
            shared.apply_uniform(&mut x, &dirs);
            assert!(same_bits(&x, &want));
        }
        assert_eq!(shared.counts(), (2, 1));
        // One bit of input, one direction's scale, or the kind of direction
        // differs: computed, and right.
        let mut x = x0.clone();
        x[999] = f32::from_bits(x[999].to_bits() ^ 1);
        let mut w = x.clone();
        shared.apply_uniform(&mut x, &dirs);
        prng::apply_uniform(&mut w, &dirs);
        assert!(same_bits(&x, &w));
        let other = [dir(0, 0.5), dir(1, f32::from_bits((-0.25f32).to_bits() ^ 1))];
        let (mut x, mut w) = (x0.clone(), x0.clone());
        shared.apply_uniform(&mut x, &other);
        prng::apply_uniform(&mut w, &other);
        assert!(same_bits(&x, &w));
        let (mut x, mut w) = (x0.clone(), x0.clone());
        shared.apply_rademacher(&mut x, &dirs);
        prng::apply_rademacher(&mut w, &dirs);
        assert!(same_bits(&x, &w));
        assert_eq!(shared.counts(), (2, 4));
    }
}
