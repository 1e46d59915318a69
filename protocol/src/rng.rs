//! Seeded randomness for the protocol core: client sampling, challenges and
//! model initialisation. Nothing here reads the OS: every generator is built
//! from a seed the host injects.
//!
//! This is *local* randomness. The shared-randomness streams that replicas must
//! regenerate bit for bit (SPSA perturbations, Ferret bases, FRL weights) get
//! their own specified module (`prng`, issue 3).

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

/// Generator for initial model parameters: ChaCha20 keyed by the seed
/// (little-endian in the first 8 key bytes, `SeedableRng::seed_from_u64` is
/// *not* used so the key derivation is spelled out here), stream 0.
#[derive(Debug)]
pub struct InitRng(ChaCha20Rng);

impl InitRng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(b"tallyini");
        InitRng(ChaCha20Rng::from_seed(key))
    }

    /// Uniform in `[0, 1)` with 24 random bits (exact in f32).
    pub fn unit_f32(&mut self) -> f32 {
        (self.0.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0)
    }
}

/// The coordinator's own generator (sampling, challenges).
#[derive(Debug)]
pub struct LocalRng(ChaCha20Rng);

impl LocalRng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(b"tallylcl");
        LocalRng(ChaCha20Rng::from_seed(key))
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
    let mut z =
        seed ^ u64::from(round).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(k).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
