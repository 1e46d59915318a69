//! How compressible is a client's FRL ranking relative to the global ranking
//! it started from? Trains a few clients of FRL's MNIST federation from the
//! global ranking after `ROUNDS` voted rounds and reports, per encoding, the
//! bytes a client would send. `cargo run --release -p tally-sim --example
//! ranking_entropy -- [rounds] [clients]` (needs `data/mnist`).

use tally_protocol::frl::{FrlRun, FrlVote, Ranking};
use tally_protocol::kind::{KindSettings, payload_of};
use tally_protocol::model::ModelArch;
use tally_protocol::supermask::FrlArch;
use tally_protocol::wire::{RunConfig, RunId, TrainSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: u32 = args.get(1).map_or(Ok(0), |s| s.parse())?;
    let clients: usize = args.get(2).map_or(Ok(5), |s| s.parse())?;
    let split = tally_kernels::data::load_mnist_dir(std::path::Path::new("data/mnist"))?;
    let parts = tally_kernels::data::partition::from_json(
        &std::fs::read("data/frl-mnist-split/partition.json")?,
        split.train.len(),
    )?;
    let arch = ModelArch::Supermask(FrlArch::MNIST_LENET);
    let sizes = FrlArch::MNIST_LENET.layer_sizes();
    let frl = FrlRun::new(0, sizes.clone());
    let run = RunConfig {
        run_id: RunId([0; 16]),
        arch: arch.clone(),
        rounds: 1000,
        train: TrainSpec::sgd(0.4, 8, 2),
        kind: KindSettings::Frl(frl.clone()),
    };
    let mut vote = FrlVote::for_run(frl, &arch)?;
    let device = tally_kernels::cpu_device();
    let mut scores = vote.global_scores();
    let train = |r: u32, c: usize, scores: &[f32]| -> Result<Ranking, Box<dyn std::error::Error>> {
        let shard = split.train.subset(&parts[c])?;
        let u = tally_kernels::update::local_update(&run, c as u32, r, 7, scores, &shard, &device)?;
        let bytes = payload_of(&u, tally_protocol::frl::ID, tally_protocol::frl::NAME)?;
        Ok(tally_protocol::frl::decode(bytes, &sizes)?)
    };
    use tally_protocol::Aggregator;
    for r in 1..=rounds {
        vote.begin_round(r, &[]);
        for k in 0..25 {
            let ranking = train(r, (r as usize * 37 + k * 40) % 1000, &scores)?;
            let update = tally_protocol::wire::ClientUpdate {
                num_samples: 1,
                train_loss: 0.0,
                payload: tally_protocol::frl::payload(&ranking),
            };
            vote.absorb(k as u32, &update).map_err(|e| format!("{e:?}"))?;
        }
        vote.finish(&mut scores)?;
        eprintln!("voted round {r}");
    }
    let global = vote.global_ranking().clone();
    let packed = tally_protocol::frl::packed_len(&sizes)?;
    println!("after {rounds} voted rounds; packed ranking {packed} B");
    for c in 0..clients {
        let ranking = train(rounds + 1, 500 + c, &scores)?;
        let (mut disp, mut step) = (0usize, 0usize);
        let (mut h_disp, mut h_step) = (0f64, 0f64);
        let mut same = 0usize;
        for l in 0..ranking.num_layers() {
            let g = global.positions(l);
            let q: Vec<i64> = ranking.layer(l).iter().map(|&e| i64::from(g[e as usize])).collect();
            let d: Vec<i64> = q.iter().enumerate().map(|(i, &v)| v - i as i64).collect();
            let s: Vec<i64> = q
                .iter()
                .scan(-1i64, |prev, &v| {
                    let x = v - *prev;
                    *prev = v;
                    Some(x)
                })
                .collect();
            same += d.iter().filter(|&&x| x == 0).count();
            disp += d.iter().map(|&x| varint_len(zigzag(x))).sum::<usize>();
            step += s.iter().map(|&x| varint_len(zigzag(x))).sum::<usize>();
            h_disp += entropy_bits(&d) / 8.0;
            h_step += entropy_bits(&s) / 8.0;
        }
        println!(
            "client {c}: unchanged positions {:.1}%; varint(displacement) {disp} B, varint(step) {step} B; \
             order-0 entropy: displacement {:.0} B, step {:.0} B",
            100.0 * same as f64 / global.num_edges() as f64,
            h_disp,
            h_step
        );
    }
    Ok(())
}

fn zigzag(x: i64) -> u64 {
    ((x << 1) ^ (x >> 63)) as u64
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn entropy_bits(xs: &[i64]) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for &x in xs {
        *counts.entry(x).or_insert(0u64) += 1;
    }
    let n = xs.len() as f64;
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / n;
            -(c as f64) * p.log2()
        })
        .sum()
}
