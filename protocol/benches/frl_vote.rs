//! FRL's vote at the size of the paper's MNIST LeNet (1,625,632 edges in 4
//! layers, `docs/algorithms.md` §1.2): a round of 25 clients' packed
//! rankings absorbed (decode + permutation check + scatter-add of positions),
//! the round's finish (stable order of the vote sums, radix vs the
//! `sort_by_key` reference), and the packed codec alone.
//!
//! `cargo bench -p tally-protocol --bench frl_vote`

// A benchmark: a setup that fails should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use std::hint::black_box;
use tally_protocol::Aggregator;
use tally_protocol::frl::{self, FrlConfig, FrlVote, LENET_MNIST_LAYER_SIZES, Ranking};
use tally_protocol::wire::ClientUpdate;

const CLIENTS: usize = 25;

fn random_ranking(rng: &mut ChaCha8Rng) -> Ranking {
    let layers = LENET_MNIST_LAYER_SIZES
        .iter()
        .map(|&n| {
            let mut p: Vec<u32> = (0..n as u32).collect();
            for i in (1..n).rev() {
                p.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            p
        })
        .collect();
    Ranking::new(layers, &LENET_MNIST_LAYER_SIZES).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let sizes = LENET_MNIST_LAYER_SIZES;
    let edges: usize = sizes.iter().sum();
    let packed = frl::packed_len(&sizes).unwrap();
    let rankings: Vec<Ranking> = (0..CLIENTS).map(|_| random_ranking(&mut rng)).collect();
    let updates: Vec<ClientUpdate> =
        rankings.iter().map(|r| ClientUpdate { num_samples: 58, train_loss: 0.5, payload: frl::payload(r) }).collect();
    let initial: Vec<f32> = (0..edges).map(|_| (rng.next_u32() >> 8) as f32 / (1 << 23) as f32 - 1.0).collect();
    let base = FrlVote::new(FrlConfig::new(sizes.to_vec()), &initial).unwrap();

    let mut g = c.benchmark_group("frl_vote_lenet");
    g.sample_size(10);

    // A round's absorb: begin_round (clears the sums) + 25 packed rankings.
    let mut vote = base.clone();
    let absorb_all = |v: &mut FrlVote| {
        v.begin_round(1, &[]);
        for (i, u) in updates.iter().enumerate() {
            v.absorb(i as u32, u).unwrap();
        }
    };
    g.throughput(Throughput::Elements(CLIENTS as u64));
    g.bench_function("absorb_25_rankings/rankings", |b| b.iter(|| absorb_all(black_box(&mut vote))));
    g.throughput(Throughput::Bytes((CLIENTS * packed) as u64));
    g.bench_function("absorb_25_rankings/payload_bytes", |b| b.iter(|| absorb_all(black_box(&mut vote))));

    // finish: the stable order of 1.6 M sums, new ranking; with and without
    // writing the score vector. One round first, so the radix buffers are
    // warm as in every round of a run but the first.
    let mut full = base.clone();
    absorb_all(&mut full);
    full.finish(&mut []).unwrap();
    absorb_all(&mut full);
    g.throughput(Throughput::Elements(edges as u64));
    g.bench_function("finish/ranking_only", |b| {
        b.iter_batched_ref(|| full.clone(), |v| v.finish(&mut []).unwrap(), BatchSize::LargeInput)
    });
    let mut scores = vec![0f32; edges];
    g.bench_function("finish/with_scores", |b| {
        b.iter_batched_ref(|| full.clone(), |v| v.finish(black_box(&mut scores)).unwrap(), BatchSize::LargeInput)
    });

    // The sort alone on the big layer's sums (1,605,632 u32 in 0..25·n).
    let big = sizes[2];
    let mut sums = vec![0u32; big];
    for r in &rankings {
        for (j, &e) in r.layer(2).iter().enumerate() {
            sums[e as usize] += j as u32;
        }
    }
    g.throughput(Throughput::Elements(big as u64));
    // `vote_order` allocates its buffers on every call (page faults included).
    g.bench_function("order_big_layer/radix_fresh_buffers", |b| b.iter(|| frl::vote_order(black_box(&sums))));
    g.bench_function("order_big_layer/sort_by_key", |b| {
        b.iter(|| {
            let mut idx: Vec<u32> = (0..big as u32).collect();
            idx.sort_by_key(|&i| sums[i as usize]);
            idx
        })
    });

    // The packed codec alone, one LeNet ranking (4.25 MB).
    let bytes = frl::encode(&rankings[0]);
    g.throughput(Throughput::Bytes(packed as u64));
    g.bench_function("codec/encode", |b| b.iter(|| frl::encode(black_box(&rankings[0]))));
    g.bench_function("codec/decode", |b| b.iter(|| frl::decode(black_box(&bytes), &sizes).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
