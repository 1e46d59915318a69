//! Where DP noise comes from: a server-secret seed, named streams, and
//! exact uniform integers.
//!
//! **Why not the shared streams of [`crate::prng`].** Those are keyed by the
//! run seed, which every client knows (SPSA directions and FRL weights are
//! regenerated from it). Noise that a client can regenerate, it can also
//! subtract, and the release is then not private at all. DP noise is keyed
//! by a [`NoiseSeed`]: 32 bytes the host draws from its own entropy when the
//! run starts, keeps with the server's durable state and never sends. A
//! restored server (or a standby replica of the *server* given the same
//! secret) regenerates every noise value bit for bit; no client can.
//!
//! **Stream names.** A noise stream is named like a shared stream, by
//! [`Purpose::DpNoise`] and three `u32` fields `(round, client, step)`; the
//! mechanisms document what they put there (a tree node is
//! `(instance, level, index)`, see [`super::tree`]). Each stream is used for
//! one purpose once, from its first word, so the noise of a node does not
//! depend on when, or whether, other nodes were drawn.
//!
//! **Key derivation (version 1).** The 32-byte ChaCha20 key of stream
//! `(round, client, step)` is
//! `SHA-256("tally.dp-noise.v1" ‖ seed ‖ purpose ‖ round ‖ client ‖ step)`,
//! integers as 4 little-endian bytes, `purpose` = 5 ([`Purpose::DpNoise`]).
//! The generator is ChaCha20 (20 rounds, unlike the 8 of the public
//! streams: this one guards a secret), nonce 0, from word 0; words are
//! little-endian `u32`s of the keystream as in [`crate::prng`].
//!
//! **Uniform integers.** [`NoiseSource::below`] draws `u64`s (two words, low
//! word first) for moduli up to 2⁶⁴ and `u128`s (four words) above, and
//! rejects values in the last incomplete multiple of the modulus, so every
//! residue is exactly equally likely; a modulus of 1 draws nothing. A fair
//! bit is bit 0 of one word. No float is involved.

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use crate::prng::Purpose;

/// Version tag bound into every noise key; bump it (and the tests' golden
/// values) on any change to the derivation.
pub const NOISE_KEY_DOMAIN: &[u8] = b"tally.dp-noise.v1";

/// The server's secret noise seed (module docs). Its `Debug` does not print
/// the bytes, so a logged configuration does not leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct NoiseSeed([u8; 32]);

impl NoiseSeed {
    /// A seed from 32 secret bytes the host drew from its own entropy.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        NoiseSeed(bytes)
    }

    /// The bytes, for the host's durable (secret) storage.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A seed for tests and simulations: the 8 bytes of `v` (LE) then zeros.
    /// Never use it for a real release: 64 bits can be searched.
    pub fn insecure_from_u64(v: u64) -> Self {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&v.to_le_bytes());
        NoiseSeed(b)
    }

    /// The ChaCha20 key of noise stream `(round, client, step)`.
    pub fn stream_key(&self, round: u32, client: u32, step: u32) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(NOISE_KEY_DOMAIN);
        h.update(self.0);
        h.update((Purpose::DpNoise as u32).to_le_bytes());
        h.update(round.to_le_bytes());
        h.update(client.to_le_bytes());
        h.update(step.to_le_bytes());
        h.finalize().into()
    }

    /// The noise stream `(round, client, step)`, from its first word.
    pub fn stream(&self, round: u32, client: u32, step: u32) -> NoiseSource {
        NoiseSource { rng: ChaCha20Rng::from_seed(self.stream_key(round, client, step)) }
    }
}

impl std::fmt::Debug for NoiseSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoiseSeed(<secret>)")
    }
}

/// One noise stream: uniform integers, and through [`super::sampler`] the
/// exact samplers.
#[derive(Debug)]
pub struct NoiseSource {
    rng: ChaCha20Rng,
}

impl NoiseSource {
    /// The next keystream word (little endian, as in [`crate::prng`]).
    pub fn word(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.rng.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn u64(&mut self) -> u64 {
        let lo = u64::from(self.word());
        let hi = u64::from(self.word());
        lo | (hi << 32)
    }

    fn u128(&mut self) -> u128 {
        let lo = u128::from(self.u64());
        let hi = u128::from(self.u64());
        lo | (hi << 64)
    }

    /// A uniform integer in `0..m`, exactly (rejection sampling). `m = 0` is
    /// treated as 1 (returns 0): callers pass positive moduli by
    /// construction, and a panic in a server would be worse.
    pub fn below(&mut self, m: u128) -> u128 {
        if m <= 1 {
            // One possible value: nothing to draw (the samplers ask for
            // uniforms on 0..1 constantly, e.g. in Bernoulli(exp(−1))).
            return 0;
        }
        if m <= 1 << 64 {
            // 2⁶⁴ values; accept the largest multiple of m below 2⁶⁴.
            let span = 1u128 << 64;
            let zone = span - span % m;
            loop {
                let v = u128::from(self.u64());
                if v < zone {
                    return v % m;
                }
            }
        } else {
            // 2¹²⁸ mod m, without computing 2¹²⁸.
            let rem = (u128::MAX % m + 1) % m;
            loop {
                let v = self.u128();
                // Accept v < 2¹²⁸ − rem, a multiple of m.
                if rem == 0 || v <= u128::MAX - rem {
                    return v % m;
                }
            }
        }
    }

    /// A fair coin.
    pub fn bit(&mut self) -> bool {
        self.word() & 1 == 1
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn dp_streams_differ_by_field_and_seed_and_are_reproducible() {
        let s = NoiseSeed::insecure_from_u64(1);
        let first = |seed: &NoiseSeed, r, c, st| seed.stream(r, c, st).word();
        let mut all = std::collections::HashSet::new();
        for (r, c, st) in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)] {
            assert!(all.insert(first(&s, r, c, st)));
        }
        assert!(all.insert(first(&NoiseSeed::insecure_from_u64(2), 0, 0, 0)));
        assert_eq!(first(&s, 3, 4, 5), first(&s.clone(), 3, 4, 5));
        assert_eq!(format!("{s:?}"), "NoiseSeed(<secret>)");
    }

    #[test]
    fn dp_noise_is_not_the_public_stream_of_the_same_name() {
        // The public stream with the same numbers must not give the same words.
        let id = crate::prng::StreamId { run_seed: 1, purpose: Purpose::DpNoise, round: 0, client: 0, step: 0 };
        assert_ne!(id.words_from(0).next(), NoiseSeed::insecure_from_u64(1).stream(0, 0, 0).word());
    }

    #[test]
    fn dp_below_is_in_range_and_uniform() {
        let mut src = NoiseSeed::insecure_from_u64(7).stream(0, 0, 0);
        // Small modulus: chi-square over 6 cells, 60k draws; 5-sigma-ish
        // critical value for 5 degrees of freedom is ~ 40.
        let mut counts = [0u64; 6];
        for _ in 0..60_000 {
            counts[src.below(6) as usize] += 1;
        }
        let chi: f64 = counts.iter().map(|&c| (c as f64 - 10_000.0).powi(2) / 10_000.0).sum();
        assert!(chi < 40.0, "chi2 {chi}");
        // Large moduli stay in range (the u128 path).
        for m in [(1u128 << 64) + 1, u128::MAX, (1u128 << 100) + 12345] {
            for _ in 0..100 {
                assert!(src.below(m) < m);
            }
        }
        assert_eq!(src.below(0), 0);
        assert_eq!(src.below(1), 0);
    }
}
