//! The one definition of seed → randomness shared by every replica.
//!
//! SPSA perturbations (and later Ferret bases and FRL's frozen weights) are
//! never sent: every party regenerates them from a *stream name*. Replicas
//! must agree on every bit, on any machine and on GPU kernels, so this module
//! is a specification first and code second. Golden vectors live in
//! `protocol/tests/golden/prng.txt`; any other implementation (a WGSL kernel,
//! another language) is checked against them.
//!
//! # Specification (version 1)
//!
//! **Stream name.** A stream is named by five values:
//! `(run_seed: u64, purpose: u32, round: u32, client: u32, step: u32)`.
//!
//! **Key.** The 32-byte ChaCha key of a stream is, in order:
//! `run_seed` (8 bytes, little endian), `purpose` (4, LE), `round` (4, LE),
//! `client` (4, LE), `step` (4, LE), then the 8 ASCII bytes `"tally.v1"`.
//! Every field lives in the key, so streams never overlap and no field is
//! narrowed to fit a nonce.
//!
//! **Generator.** ChaCha with 8 rounds (the `ChaCha8Rng` of `rand_chacha`,
//! RFC 7539 block function with 8 instead of 20 rounds), stream (nonce) 0,
//! block counter starting at 0. Eight rounds: this is a simulation-grade
//! PRNG, not key material, and ChaCha8 has no known distinguisher while
//! running 2.5× faster than ChaCha20 (the regeneration throughput bounds SPSA).
//!
//! **Words.** Word `w` of a stream is the `w`-th little-endian `u32` of the
//! keystream: word `w` is word `w mod 16` of block `w / 16`. Any word can be
//! computed independently (random access), so a GPU thread or a worker can
//! regenerate any slice.
//!
//! **Rademacher values.** Element `i` of a stream's ±1 sequence is bit
//! `i mod 32` (bit 0 = least significant) of word `i / 32`: bit 1 → `+1`,
//! bit 0 → `−1`.
//!
//! **24-bit uniforms.** Element `i` of a stream's uniform sequence is
//! `(word_i >> 8) · 2⁻²⁴`, a float in `[0, 1)` that f32 represents exactly.
//!
//! **Applying a scaled direction.** `x_i ← x_i + s·z_i` for `z_i = ±1` is
//! computed as one IEEE-754 binary32 addition `x_i + (±s)` (negation is exact),
//! rounding to nearest-even. Several directions are applied to an element in
//! the order given; the result is independent of how the vector is chunked.
//! No transcendental function touches anything replicas must agree on.
//!
//! **Applying a scaled uniform direction.** `x_i ← x_i + s·v_i` with
//! `v_i = (word_i >> 8) · 2⁻²³ − 1 ∈ [−1, 1)` (exact in f32: an integer
//! below 2²⁴ times a power of two), computed as two IEEE-754 binary32
//! operations, each rounded to nearest-even: the product `p = s·v_i`, then
//! `x_i + p`. A fused multiply-add gives other bits, so implementations must
//! not contract the two (Rust never does; GPU kernels must guard against
//! their shader compiler doing it).
//!
//! **Other engines.** [`DirectionApplier`] is the seam through which a host
//! applies directions somewhere else (a GPU kernel) with the same bits;
//! [`CpuApplier`] is this module's code.

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// Version of this specification, bound into every key (`"tally.v1"`).
pub const SPEC_VERSION: u32 = 1;

/// What a stream is used for; a distinct purpose gives distinct randomness
/// even for equal (round, client, step).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Purpose {
    /// SPSA / MeZO perturbation directions.
    SpsaPerturbation = 1,
    /// Ferret projection bases.
    FerretBasis = 2,
    /// FRL frozen weights.
    FrlWeights = 3,
    /// FRL initial scores.
    FrlScores = 4,
    /// Differential-privacy noise ([`crate::dp`]). Unlike every other
    /// purpose, its streams are never keyed by the public run seed through
    /// [`StreamId::key`]: anyone who can regenerate DP noise can subtract
    /// it. [`crate::dp::noise`] binds this value, with the stream's round,
    /// client and step, into a key derived from a server-secret seed.
    DpNoise = 5,
}

/// The name of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamId {
    /// The run's shared seed.
    pub run_seed: u64,
    /// What the stream is for.
    pub purpose: Purpose,
    /// Round number.
    pub round: u32,
    /// Client id.
    pub client: u32,
    /// Step within the client's round.
    pub step: u32,
}

impl StreamId {
    /// The ChaCha key of the stream (see the module docs).
    pub fn key(&self) -> [u8; 32] {
        crate::rng::chacha_key(&[
            &self.run_seed.to_le_bytes(),
            &(self.purpose as u32).to_le_bytes(),
            &self.round.to_le_bytes(),
            &self.client.to_le_bytes(),
            &self.step.to_le_bytes(),
            b"tally.v1",
        ])
    }

    /// A generator positioned at word `word`.
    pub fn words_from(&self, word: u64) -> Words {
        let mut rng = ChaCha8Rng::from_seed(self.key());
        rng.set_word_pos(u128::from(word));
        Words(rng)
    }
}

/// Sequential access to a stream's words.
#[derive(Debug, Clone)]
pub struct Words(ChaCha8Rng);

impl Words {
    /// Fills `out` with the next words.
    pub fn fill(&mut self, out: &mut [u32]) {
        // Byte-wise fill then little-endian decode: fixes the word order by
        // the spec rather than by the host's endianness.
        let mut bytes = [0u8; 4 * 64];
        for chunk in out.chunks_mut(64) {
            let b = &mut bytes[..chunk.len() * 4];
            self.0.fill_bytes(b);
            for (w, c) in chunk.iter_mut().zip(b.chunks_exact(4)) {
                *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }

    /// The next word.
    #[allow(
        clippy::should_implement_trait,
        reason = "the stream never ends, so `Iterator::next`'s Option would only add an unwrap at every call"
    )]
    pub fn next(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.0.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
}

/// The 24-bit uniform of a word: `(w >> 8) · 2⁻²⁴ ∈ [0, 1)`, exact in f32.
pub fn uniform24(word: u32) -> f32 {
    (word >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Elements per chunk when regenerating directions: 32 Ki elements = 1 Ki
/// words = 4 KiB of keystream, which stays in L1 next to the parameters.
pub const CHUNK_ELEMS: usize = 32 * 1024;

/// `x[i] ← x[i] + scale · z[offset + i]` for the Rademacher stream `id`,
/// where `offset` must be a multiple of 32 (chunks start on word boundaries).
fn add_scaled_at(x: &mut [f32], id: &StreamId, offset: usize, scale: f32, words: &mut [u32]) {
    debug_assert_eq!(offset % 32, 0);
    let n_words = x.len().div_ceil(32);
    let words = &mut words[..n_words];
    id.words_from((offset / 32) as u64).fill(words);
    let bits = scale.to_bits();
    // Whole words as fixed-size arrays, so the compiler unrolls and
    // vectorises the 32 lanes (variable shifts + xor + add); same operations,
    // same order per element as the scalar tail.
    let (full, tail) = x.as_chunks_mut::<32>();
    for (xs, &w) in full.iter_mut().zip(words.iter()) {
        for (j, v) in xs.iter_mut().enumerate() {
            // bit 1 → z = +1 → +scale; bit 0 → z = −1 → −scale (sign flip is exact).
            let neg = (!(w >> j) & 1) << 31;
            *v += f32::from_bits(bits ^ neg);
        }
    }
    if let Some(&w) = words.get(full.len()) {
        for (j, v) in tail.iter_mut().enumerate() {
            let neg = (!(w >> j) & 1) << 31;
            *v += f32::from_bits(bits ^ neg);
        }
    }
}

/// `x ← x + Σₖ scaleₖ · z(idₖ)` element by element, directions applied in the
/// given order. Equivalent, bit for bit, to applying them one at a time over
/// the whole vector; done chunk by chunk so the parameters stay in cache
/// while every direction is regenerated for that chunk, and no direction is
/// ever materialised whole.
pub fn apply_rademacher(x: &mut [f32], directions: &[(StreamId, f32)]) {
    let mut words = vec![0u32; CHUNK_ELEMS / 32];
    for (c, chunk) in x.chunks_mut(CHUNK_ELEMS).enumerate() {
        for (id, scale) in directions {
            add_scaled_at(chunk, id, c * CHUNK_ELEMS, *scale, &mut words);
        }
    }
}

/// `dst ← src + scale · z(id)`: writes a perturbed copy (for evaluating a
/// loss at θ ± εz without touching θ, so θ is restored exactly).
pub fn perturbed_into(dst: &mut [f32], src: &[f32], id: &StreamId, scale: f32) {
    dst.copy_from_slice(&src[..dst.len()]);
    apply_rademacher(dst, &[(*id, scale)]);
}

/// `x ← x + Σₖ scaleₖ · v(idₖ)` for the uniform directions of the module
/// docs (`v ∈ [−1, 1)`, one word per element), directions applied in order,
/// product and sum rounded separately.
pub fn apply_uniform(x: &mut [f32], directions: &[(StreamId, f32)]) {
    let mut words = vec![0u32; CHUNK_ELEMS];
    for (c, chunk) in x.chunks_mut(CHUNK_ELEMS).enumerate() {
        for (id, scale) in directions {
            let words = &mut words[..chunk.len()];
            id.words_from((c * CHUNK_ELEMS) as u64).fill(words);
            for (v, &w) in chunk.iter_mut().zip(words.iter()) {
                *v += *scale * signed_uniform24(w);
            }
        }
    }
}

/// `(w >> 8) · 2⁻²³ − 1 ∈ [−1, 1)`, exact in f32.
pub fn signed_uniform24(word: u32) -> f32 {
    ((word >> 8) as i32 - (1 << 23)) as f32 * (1.0 / 8_388_608.0)
}

/// Applies shared directions to a parameter vector with exactly the bits of
/// [`apply_rademacher`] / [`apply_uniform`]: the CPU code of this module
/// ([`CpuApplier`]) or another engine (the GPU kernels of `tally-kernels`).
/// Replicas hash their parameters after every round, so an engine that
/// differs in one bit is caught at once.
pub trait DirectionApplier: Send + Sync + std::fmt::Debug {
    /// Same result as [`apply_rademacher`].
    fn apply_rademacher(&self, x: &mut [f32], directions: &[(StreamId, f32)]);
    /// Same result as [`apply_uniform`] (Ferret's bases). By default this
    /// module's CPU code.
    fn apply_uniform(&self, x: &mut [f32], directions: &[(StreamId, f32)]) {
        apply_uniform(x, directions);
    }
    /// Where the directions are applied, for logs (e.g. `"cpu"`).
    fn name(&self) -> String;
    /// Calls this engine could not serve and passed to [`apply_rademacher`]
    /// instead (same bits, slower): a GPU that failed, say.
    fn fallbacks(&self) -> u64 {
        0
    }
}

/// This module's CPU code as a [`DirectionApplier`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuApplier;

impl DirectionApplier for CpuApplier {
    fn apply_rademacher(&self, x: &mut [f32], directions: &[(StreamId, f32)]) {
        apply_rademacher(x, directions);
    }
    fn name(&self) -> String {
        "cpu".to_owned()
    }
}

/// The first `n` Rademacher values of a stream as ±1 (tests and golden files).
pub fn rademacher(id: &StreamId, n: usize) -> Vec<i8> {
    let mut w = id.words_from(0);
    let mut out = Vec::with_capacity(n);
    let mut word = 0;
    for i in 0..n {
        if i % 32 == 0 {
            word = w.next();
        }
        out.push(if (word >> (i % 32)) & 1 == 1 { 1 } else { -1 });
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::fmt::Write;

    fn id(step: u32) -> StreamId {
        StreamId { run_seed: 0x0123_4567_89ab_cdef, purpose: Purpose::SpsaPerturbation, round: 3, client: 7, step }
    }

    /// Renders the golden vectors: first words, Rademacher signs, uniforms of
    /// named streams, and a parameter hash after a sequence of updates.
    fn golden() -> String {
        let mut s = String::new();
        let streams = [
            ("spsa(seed=0x0123456789abcdef,round=3,client=7,step=0)", id(0)),
            ("spsa(seed=0x0123456789abcdef,round=3,client=7,step=1)", id(1)),
            (
                "frl-weights(seed=0,round=0,client=0,step=0)",
                StreamId { run_seed: 0, purpose: Purpose::FrlWeights, round: 0, client: 0, step: 0 },
            ),
        ];
        for (name, sid) in &streams {
            let mut w = [0u32; 8];
            sid.words_from(0).fill(&mut w);
            let _ = writeln!(s, "{name} key={}", hex::encode(sid.key()));
            let _ = writeln!(s, "  words[0..8]={}", w.iter().map(|x| format!("{x:08x}")).collect::<Vec<_>>().join(" "));
            let mut w1000 = [0u32; 2];
            sid.words_from(1000).fill(&mut w1000);
            let _ = writeln!(s, "  words[1000..1002]={:08x} {:08x}", w1000[0], w1000[1]);
            let signs: String = rademacher(sid, 64).iter().map(|&z| if z > 0 { '+' } else { '-' }).collect();
            let _ = writeln!(s, "  rademacher[0..64]={signs}");
            let _ = writeln!(
                s,
                "  uniform24[0..4]={}",
                w[..4].iter().map(|&x| format!("{:.9}", uniform24(x))).collect::<Vec<_>>().join(" ")
            );
        }
        // 100,003 parameters (not a multiple of the chunk) after 50 updates;
        // the start vector uses one exactly rounded multiply per element.
        let mut x: Vec<f32> = (0..100_003).map(|i| (i % 1000) as f32 * 0.001).collect();
        let ups: Vec<(StreamId, f32)> = (0..50).map(|k| (id(k), (k as f32 - 25.0) * 1e-3)).collect();
        apply_rademacher(&mut x, &ups);
        let _ = writeln!(
            s,
            "params(100003, (i mod 1000) * 0.001) after 50 updates: sha256={}",
            hex::encode(crate::identity::params_hash(&x))
        );
        s
    }

    #[test]
    fn golden_vectors_match_the_checked_in_file() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/prng.txt");
        let now = golden();
        if std::env::var_os("TALLY_BLESS").is_some() {
            std::fs::write(path, &now).unwrap();
        }
        let want = std::fs::read_to_string(path).expect("golden file (regenerate with TALLY_BLESS=1)");
        assert_eq!(now, want, "the stream definition changed; if on purpose, bump SPEC_VERSION and re-bless");
    }

    /// The ChaCha block function written out from RFC 7539 (with `rounds`
    /// rounds): the reference a GPU kernel implements. Returns the 16 words
    /// of block `counter` for `key`, nonce 0.
    fn chacha_block(key: &[u8; 32], counter: u64, rounds: usize) -> [u32; 16] {
        let mut s = [0u32; 16];
        s[..4].copy_from_slice(&[0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574]);
        for i in 0..8 {
            s[4 + i] = u32::from_le_bytes(key[4 * i..4 * i + 4].try_into().unwrap());
        }
        // rand_chacha: 64-bit block counter in words 12-13, 64-bit stream id in 14-15.
        s[12] = counter as u32;
        s[13] = (counter >> 32) as u32;
        let init = s;
        let qr = |s: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize| {
            s[a] = s[a].wrapping_add(s[b]);
            s[d] = (s[d] ^ s[a]).rotate_left(16);
            s[c] = s[c].wrapping_add(s[d]);
            s[b] = (s[b] ^ s[c]).rotate_left(12);
            s[a] = s[a].wrapping_add(s[b]);
            s[d] = (s[d] ^ s[a]).rotate_left(8);
            s[c] = s[c].wrapping_add(s[d]);
            s[b] = (s[b] ^ s[c]).rotate_left(7);
        };
        for _ in 0..rounds / 2 {
            qr(&mut s, 0, 4, 8, 12);
            qr(&mut s, 1, 5, 9, 13);
            qr(&mut s, 2, 6, 10, 14);
            qr(&mut s, 3, 7, 11, 15);
            qr(&mut s, 0, 5, 10, 15);
            qr(&mut s, 1, 6, 11, 12);
            qr(&mut s, 2, 7, 8, 13);
            qr(&mut s, 3, 4, 9, 14);
        }
        for (w, i) in s.iter_mut().zip(init) {
            *w = w.wrapping_add(i);
        }
        s
    }

    #[test]
    fn words_equal_the_written_out_block_function() {
        for sid in [id(0), id(1), StreamId { run_seed: u64::MAX, round: u32::MAX, ..id(2) }] {
            let mut w = vec![0u32; 16 * 70];
            sid.words_from(0).fill(&mut w);
            for block in [0usize, 1, 2, 63, 69] {
                assert_eq!(
                    &w[block * 16..block * 16 + 16],
                    &chacha_block(&sid.key(), block as u64, 8),
                    "block {block}"
                );
            }
        }
    }

    #[test]
    fn random_access_equals_sequential() {
        let sid = id(5);
        let mut all = vec![0u32; 3000];
        sid.words_from(0).fill(&mut all);
        for start in [0usize, 1, 15, 16, 17, 999, 2048] {
            let mut part = vec![0u32; 500];
            sid.words_from(start as u64).fill(&mut part);
            assert_eq!(&part[..], &all[start..start + 500]);
        }
    }

    #[test]
    fn streams_differ_by_every_field() {
        let base = id(0);
        let mut variants = vec![base];
        variants.push(StreamId { run_seed: 1, ..base });
        variants.push(StreamId { purpose: Purpose::FerretBasis, ..base });
        variants.push(StreamId { round: 4, ..base });
        variants.push(StreamId { client: 8, ..base });
        variants.push(StreamId { step: 1, ..base });
        let firsts: std::collections::HashSet<u32> = variants.iter().map(|v| v.words_from(0).next()).collect();
        assert_eq!(firsts.len(), variants.len());
    }

    #[test]
    fn chunked_application_equals_one_at_a_time_and_scalar_reference() {
        let n = CHUNK_ELEMS * 2 + 77;
        let x0: Vec<f32> = (0..n).map(|i| (i as f32).cos()).collect();
        let ups: Vec<(StreamId, f32)> = (0..5).map(|k| (id(k), 0.01 * (k as f32 + 1.0))).collect();
        let mut fused = x0.clone();
        apply_rademacher(&mut fused, &ups);
        let mut seq = x0.clone();
        for u in &ups {
            apply_rademacher(&mut seq, std::slice::from_ref(u));
        }
        // Plain reference: materialise z and add in order.
        let mut reference = x0.clone();
        for (sid, s) in &ups {
            let z = rademacher(sid, n);
            for (v, &zi) in reference.iter_mut().zip(&z) {
                *v += if zi > 0 { *s } else { -*s };
            }
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fused), bits(&seq));
        assert_eq!(bits(&fused), bits(&reference));
    }

    #[test]
    fn rademacher_is_balanced_and_uniform24_in_range() {
        let z = rademacher(&id(9), 100_000);
        let sum: i64 = z.iter().map(|&v| i64::from(v)).sum();
        assert!(sum.abs() < 1500, "sum {sum}");
        let mut w = vec![0u32; 10_000];
        id(9).words_from(0).fill(&mut w);
        let mean = w.iter().map(|&x| f64::from(uniform24(x))).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.01);
        assert!(w.iter().all(|&x| (0.0..1.0).contains(&uniform24(x))));
    }

    #[test]
    fn uniform_application_is_chunk_independent_and_unfused() {
        let n = CHUNK_ELEMS + 1234;
        let x0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let ups: Vec<(StreamId, f32)> = (0..3).map(|k| (id(k), 0.3 / (k as f32 + 1.0))).collect();
        let mut got = x0.clone();
        apply_uniform(&mut got, &ups);
        let mut reference = x0.clone();
        for (sid, s) in &ups {
            let mut w = vec![0u32; n];
            sid.words_from(0).fill(&mut w);
            for (v, &wi) in reference.iter_mut().zip(&w) {
                let u = (wi >> 8) as f64 / 16_777_216.0;
                let p = (f64::from(*s) * (2.0 * u - 1.0)) as f32; // exact product, rounded once
                *v += p;
            }
        }
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            reference.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(signed_uniform24(0), -1.0);
        assert_eq!(signed_uniform24(u32::MAX), 1.0 - 1.0 / 8_388_608.0);
    }

    #[test]
    fn perturb_leaves_source_untouched() {
        let src: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let mut plus = vec![0.0; 1000];
        let mut minus = vec![0.0; 1000];
        perturbed_into(&mut plus, &src, &id(1), 0.5);
        perturbed_into(&mut minus, &src, &id(1), -0.5);
        let z = rademacher(&id(1), 1000);
        for i in 0..1000 {
            assert_eq!(plus[i], src[i] + 0.5 * f32::from(z[i]));
            assert_eq!(minus[i], src[i] - 0.5 * f32::from(z[i]));
        }
    }
}
