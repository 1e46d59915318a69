//! Ferret's costs on one CPU thread, against the raw basis generation rate
//! measured in the same run: projection (client), reconstruction (one
//! round's apply at a replica), and a whole server round (combine, clip
//! norms, apply) on the MNIST MLP with K = 512.
//!
//! `cargo bench -p tally-protocol --bench ferret`

#![allow(clippy::expect_used, reason = "a benchmark's fixed inputs are valid; a failure should stop it loudly")]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tally_protocol::ferret::{self, FerretSpec};
use tally_protocol::kind::{KindSettings, RuleSpec, RunShape};
use tally_protocol::model::ModelArch;
use tally_protocol::prng::{CpuApplier, Purpose, StreamId};
use tally_protocol::wire::{ClientUpdate, LogBody};

fn bench(c: &mut Criterion) {
    let arch = ModelArch::mnist_mlp();
    let d = arch.num_params();
    let cfg = FerretSpec { k: 512, server_lr: 3.0, ..Default::default() }.resolve(1);
    let blocks = ferret::blocks(&arch);
    // A delta shaped like a real one: every block moves, the first most.
    let delta: Vec<f32> = (0..d).map(|i| ((i as f32) * 0.37).sin() * if i < 156_800 { 1e-3 } else { 5e-4 }).collect();
    let entries = ferret::project(&cfg, &blocks, 1, &delta, 7);
    let touched: u64 = entries.iter().map(|e| blocks[usize::from(e.g)].len() as u64).sum();
    eprintln!(
        "ferret bench: d = {d}, {} blocks, {} coefficients per upload ({:.2}% of d, {} B), {touched} parameter×seed products",
        blocks.len(),
        entries.len(),
        100.0 * entries.len() as f64 / d as f64,
        entries.len() * ferret::ENTRY_BYTES
    );

    let mut g = c.benchmark_group("ferret");
    g.sample_size(10);

    // The raw rate: one u32 keystream word per parameter per seed.
    g.throughput(Throughput::Elements(touched));
    let mut words = vec![0u32; touched as usize];
    let id = StreamId { run_seed: 1, purpose: Purpose::FerretBasis, round: 0, client: 0, step: 0 };
    g.bench_function("basis_words_raw", |b| b.iter(|| id.words_from(0).fill(black_box(&mut words))));
    drop(words);

    g.bench_function("project_client", |b| b.iter(|| ferret::project(&cfg, &blocks, 1, black_box(&delta), 7)));

    // One round's log applied at a replica: every (k, g) of the upload.
    let scaled: Vec<_> = entries.iter().map(|e| ferret::Coefficient { value: e.value * 1e-3, ..*e }).collect();
    let mut params = arch.init_params(1);
    g.bench_function("reconstruct_apply_replica", |b| {
        b.iter(|| ferret::apply_scaled(&cfg, &blocks, 1, black_box(&mut params), &scaled, &CpuApplier))
    });

    // The server's round: 10 clients' uploads combined, clipped and applied.
    let kind = KindSettings::Ferret(cfg.clone()).build(&arch).expect("valid settings");
    let shape = RunShape { arch: &arch, clients_per_round: 10, rounds: 30, max_update_abs: f32::MAX, noise_seed: None };
    let init = arch.init_params(1);
    let uploads: Vec<ClientUpdate> = (0..10u64)
        .map(|s| ClientUpdate {
            num_samples: 600,
            train_loss: 1.0,
            payload: ferret::payload(&ferret::project(&cfg, &blocks, 1, &delta, s)),
        })
        .collect();
    let mut agg = kind.aggregator(&shape, &RuleSpec::Mean, &init).expect("mean is supported");
    // The first round also computes the bases' norms, which fixed bases keep.
    let mut global = init.clone();
    agg.begin_round(1, &global);
    for (i, u) in uploads.iter().enumerate() {
        agg.absorb(i as u32, u).expect("valid upload");
    }
    agg.finish(&mut global).expect("finite");
    g.throughput(Throughput::Elements(1));
    g.bench_function("server_round_10_clients", |b| {
        b.iter(|| {
            let mut global = init.clone();
            agg.begin_round(2, &global);
            for (i, u) in uploads.iter().enumerate() {
                agg.absorb(i as u32, u).expect("valid upload");
            }
            agg.finish(&mut global).expect("finite");
            let Some(LogBody::Combined(log)) = agg.take_log() else { unreachable!("ferret logs combined") };
            black_box(log)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
