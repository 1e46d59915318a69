//! Seeded randomness for the protocol core: client sampling, challenges and
//! model initialisation. Nothing here reads the OS: every generator is built
//! from a seed the host injects.
//!
//! This is *local* randomness. The shared-randomness streams that replicas must
//! regenerate bit for bit (SPSA perturbations, Ferret bases, FRL weights) get
//! their own specified module (`prng`, issue 3).

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

/// Generator for initial model parameters: [`keyed_chacha20`] with tag
/// `"tallyini"`.
#[derive(Debug)]
pub struct InitRng(ChaCha20Rng);

impl InitRng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        InitRng(keyed_chacha20(seed, b"tallyini"))
    }

    /// Uniform in `[0, 1)` with 24 random bits (exact in f32).
    pub fn unit_f32(&mut self) -> f32 {
        (self.0.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0)
    }
}

/// The coordinator's own generator (sampling, challenges): [`keyed_chacha20`]
/// with tag `"tallylcl"`.
#[derive(Debug)]
pub struct LocalRng(ChaCha20Rng);

impl LocalRng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        LocalRng(keyed_chacha20(seed, b"tallylcl"))
    }

    /// A uniform `u64`.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Fills `dest` with random bytes.
    pub fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }

    /// Uniform in `0..n` (`n > 0`), unbiased by rejection.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let n = n.max(1);
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let v = self.0.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// Picks `k` distinct items of `items` (partial Fisher–Yates), in the
    /// order drawn. `items` should be in a canonical order for determinism.
    pub fn sample<T: Clone>(&mut self, items: &[T], k: usize) -> Vec<T> {
        let mut pool: Vec<T> = items.to_vec();
        let k = k.min(pool.len());
        for i in 0..k {
            let j = i + self.below((pool.len() - i) as u64) as usize;
            pool.swap(i, j);
        }
        pool.truncate(k);
        pool
    }
}

/// Derives the seed of a (round, draw) from a run seed: SplitMix64's
/// finaliser over the three values, so every draw of every round has its
/// own independent generator and none depends on how many others ran.
pub fn mix(seed: u64, round: u32, k: u32) -> u64 {
    splitmix64(
        seed ^ u64::from(round).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(k).wrapping_mul(0xD1B5_4A32_D192_ED03),
    )
}

/// SplitMix64's output function (its finaliser, without the state increment
/// by `0x9E37_79B9_7F4A_7C15`): a bijection of `u64` that mixes every input
/// bit into every output bit. The one copy behind every seed derivation
/// ([`mix`], the simulator's sub-seeds).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A ChaCha key from `parts`: their bytes concatenated, then zeros up to 32
/// bytes. Every keyed ChaCha stream of Tally builds its key this way
/// ([`keyed_chacha20`], and the shared streams' [`crate::prng::StreamId::key`]).
///
/// # Panics
/// If the parts hold more than 32 bytes.
pub fn chacha_key(parts: &[&[u8]]) -> [u8; 32] {
    let mut key = [0u8; 32];
    let mut at = 0;
    for part in parts {
        key[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    key
}

/// ChaCha20 with key `seed (8 bytes LE) || tag || zeros`, stream 0, at word
/// 0 (`SeedableRng::seed_from_u64` is *not* used, so the key derivation is
/// spelled out here). Each use has its own tag: `"tallyini"` ([`InitRng`]),
/// `"tallylcl"` ([`LocalRng`]), and in the kernels `"tallytrain"` (sample
/// order), `"tallyzo"` (SPSA minibatches) and `"tallypart"` (data
/// partitions).
///
/// # Panics
/// If `tag` is longer than 24 bytes.
pub fn keyed_chacha20(seed: u64, tag: &[u8]) -> ChaCha20Rng {
    ChaCha20Rng::from_seed(chacha_key(&[&seed.to_le_bytes(), tag]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_is_the_reference_finaliser() {
        // SplitMix64 from state 0: the first output is the finaliser of the
        // golden gamma (Vigna's reference implementation).
        assert_eq!(splitmix64(0x9E37_79B9_7F4A_7C15), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(0), 0);
    }

    #[test]
    fn keyed_chacha20_keys_are_seed_then_tag_then_zeros() {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
        key[8..18].copy_from_slice(b"tallytrain");
        assert_eq!(chacha_key(&[&0x0123_4567_89ab_cdefu64.to_le_bytes(), b"tallytrain"]), key);
        let (mut a, mut b) = (keyed_chacha20(0x0123_4567_89ab_cdef, b"tallytrain"), ChaCha20Rng::from_seed(key));
        for _ in 0..8 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert_eq!(chacha_key(&[]), [0u8; 32]);
    }
}
