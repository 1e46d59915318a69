//! Shared-randomness throughput: raw ChaCha8 keystream, Rademacher
//! regeneration, and regenerate-and-apply (one and 32 fused directions).
//!
//! `cargo bench -p tally-protocol --bench prng`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tally_protocol::prng::{Purpose, StreamId, apply_rademacher};

const N: usize = 1 << 22; // 4 Mi parameters (16 MiB of f32): beyond L2, like a real model

fn id(step: u32) -> StreamId {
    StreamId { run_seed: 1, purpose: Purpose::SpsaPerturbation, round: 1, client: 0, step }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("prng");
    g.sample_size(20);

    // One u32 per parameter: what a uniform or Gaussian direction would cost.
    g.throughput(Throughput::Elements(N as u64));
    let mut words = vec![0u32; N];
    g.bench_function("chacha8_u32_words", |b| b.iter(|| id(0).words_from(0).fill(black_box(&mut words))));

    // Rademacher values: 32 per word, so only N/32 words for N values.
    let mut bits = vec![0u32; N / 32];
    g.bench_function("rademacher_values_regenerate_only", |b| {
        b.iter(|| id(0).words_from(0).fill(black_box(&mut bits)))
    });

    // Regenerate and apply one direction to N parameters.
    let mut x = vec![0.5f32; N];
    g.bench_function("apply_1_direction", |b| b.iter(|| apply_rademacher(black_box(&mut x), &[(id(0), 1e-3)])));

    // 32 directions fused over N parameters (a client's round of SPSA steps).
    g.throughput(Throughput::Elements(32 * N as u64));
    let dirs: Vec<_> = (0..32).map(|k| (id(k), 1e-4 * k as f32)).collect();
    g.bench_function("apply_32_directions_fused", |b| b.iter(|| apply_rademacher(black_box(&mut x), &dirs)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
