//! Self-checks of a GPU against the CPU reference: the fused kernels against
//! [`tally_protocol::prng`] bit for bit, and local training against the CPU
//! within a stated tolerance. The unit tests run them (on lavapipe in CI),
//! and `tally-client gpu-check` runs them on a user's own GPU and driver
//! before it joins a run: a driver that flushes denormals or contracts a
//! multiply-add shows here, not as a desynchronised replica.

// `ensure!(x < tol, …)` fails on NaN because `!(NaN < tol)` is true: the
// negated comparison is the point, not an accident.
#![allow(clippy::neg_cmp_op_on_partial_ord, reason = "a NaN difference must fail the check")]

use tally_protocol::identity::params_hash;
use tally_protocol::model::ModelArch;
use tally_protocol::prng::{Purpose, StreamId, apply_rademacher, apply_uniform, perturbed_into};
use tally_protocol::supermask::FrlArch;

use super::{Gpu, GpuError};

/// The protocol's golden PRNG vectors.
const GOLDEN: &str = include_str!("../../../protocol/tests/golden/prng.txt");

fn id(step: u32) -> StreamId {
    StreamId { run_seed: 0x0123_4567_89ab_cdef, purpose: Purpose::SpsaPerturbation, round: 3, client: 7, step }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The first index where two vectors differ in bits, as a message.
fn first_diff(got: &[f32], want: &[f32]) -> String {
    match got.iter().zip(want).position(|(a, b)| a.to_bits() != b.to_bits()) {
        Some(i) => format!(
            "element {i}: gpu {:e} ({:08x}), cpu {:e} ({:08x})",
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        ),
        None => format!("lengths {} and {}", got.len(), want.len()),
    }
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}

fn e(err: GpuError) -> String {
    err.to_string()
}

/// A named check.
/// `Ok` carries a detail line (empty when there is nothing to add).
pub type Check = (&'static str, fn(&Gpu) -> Result<String, String>);

/// Every check, cheapest first.
pub const ALL: [Check; 7] = [
    ("prng golden vectors", golden_vectors),
    ("perturbed copy and uniform directions, bit-exact", perturbed_and_uniform),
    ("multi-row grids and chunked bindings", grids_and_chunks),
    ("1,000 SPSA applies on 1M parameters, hash equal", thousand_applies),
    ("100M-parameter apply, hash equal", hundred_million),
    ("local SGD (MLP, LeNet-5) tracks the CPU", training_tracks_cpu),
    ("FRL supermask training (1 and 8 steps) tracks the CPU", supermask_tracks_cpu),
];

/// The golden file of the protocol's PRNG reproduced by the kernels: raw
/// words (at 0 and at 1000), Rademacher signs, and the parameter hash after
/// 50 updates of 100,003 parameters.
pub fn golden_vectors(g: &Gpu) -> Result<String, String> {
    let lines: Vec<&str> = GOLDEN.lines().collect();
    let streams = [id(0), id(1), StreamId { run_seed: 0, purpose: Purpose::FrlWeights, round: 0, client: 0, step: 0 }];
    let hexs = |ws: &[u32]| ws.iter().map(|x| format!("{x:08x}")).collect::<Vec<_>>().join(" ");
    for (k, sid) in streams.iter().enumerate() {
        let block = lines.get(k * 5..k * 5 + 5).ok_or("golden file too short")?;
        ensure!(block[0].ends_with(&format!("key={}", hex_key(sid))), "golden stream {k} is not {sid:?}");
        let w = g.stream_words(sid, 0, 8).map_err(e)?;
        let want = format!("words[0..8]={}", hexs(&w));
        ensure!(block[1].trim() == want, "stream {k}: gpu {want}, golden {}", block[1].trim());
        let w = g.stream_words(sid, 1000, 2).map_err(e)?;
        let want = format!("words[1000..1002]={}", hexs(&w));
        ensure!(block[2].trim() == want, "stream {k}: gpu {want}, golden {}", block[2].trim());
        // Signs: +1 applied to zeros gives ±1.
        let mut z = vec![0f32; 64];
        g.apply_rademacher(&mut z, &[(*sid, 1.0)]).map_err(e)?;
        let signs: String = z.iter().map(|&v| if v > 0.0 { '+' } else { '-' }).collect();
        let want = format!("rademacher[0..64]={signs}");
        ensure!(block[3].trim() == want, "stream {k}: gpu {want}, golden {}", block[3].trim());
    }
    let mut x: Vec<f32> = (0..100_003).map(|i| (i % 1000) as f32 * 0.001).collect();
    let ups: Vec<(StreamId, f32)> = (0..50).map(|k| (id(k), (k as f32 - 25.0) * 1e-3)).collect();
    g.apply_rademacher(&mut x, &ups).map_err(e)?;
    let want = lines.iter().find(|l| l.starts_with("params(100003")).ok_or("golden file has no params line")?;
    let got = format!("sha256={}", hex_hash(&params_hash(&x)));
    ensure!(want.ends_with(&got), "gpu {got}, golden {want}");
    Ok(String::new())
}

fn hex_key(sid: &StreamId) -> String {
    sid.key().iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_hash(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// The perturbed copy `src + s·z` (signed zeros included) and uniform
/// directions, whose product and sum are rounded separately: a fused
/// multiply-add in the shader would show here.
pub fn perturbed_and_uniform(g: &Gpu) -> Result<String, String> {
    let n = 3 * 16_384 + 77;
    let src: Vec<f32> = (0..n).map(|i| (i as f32 * 0.013).sin()).collect();
    let s = g.upload(&src).map_err(e)?;
    let d = g.zeros(n).map_err(e)?;
    for scale in [1e-3f32, -1e-3, 0.0, -0.0] {
        g.perturbed_into_on(&d, &s, &id(4), scale).map_err(e)?;
        let mut want = vec![0f32; n];
        perturbed_into(&mut want, &src, &id(4), scale);
        let got = g.download(&d).map_err(e)?;
        ensure!(bits(&got) == bits(&want), "perturbed copy, scale {scale}: {}", first_diff(&got, &want));
    }
    let dirs: Vec<(StreamId, f32)> = (0..7).map(|k| (id(k), 0.1 / (k as f32 + 3.0))).collect();
    let mut cpu = src.clone();
    apply_uniform(&mut cpu, &dirs);
    let mut got = src;
    g.apply_uniform(&mut got, &dirs).map_err(e)?;
    ensure!(bits(&got) == bits(&cpu), "uniform directions: {}", first_diff(&got, &cpu));
    Ok(String::new())
}

/// The grid's second dimension and chunked bindings, forced small: the
/// results must not change.
pub fn grids_and_chunks(g: &Gpu) -> Result<String, String> {
    use super::prng::Op;
    let n = 40 * 16_384 + 5;
    let x0: Vec<f32> = (0..n).map(|i| i as f32 * 1e-4).collect();
    let dirs = [(id(1), 0.25f32), (id(2), -0.125)];
    let mut want = x0.clone();
    apply_rademacher(&mut want, &dirs);
    let mut wantu = x0.clone();
    apply_uniform(&mut wantu, &dirs);
    for (groups, chunk) in [(7u64, u64::MAX), (3, 5 * 16_384), (65_535, 16_384)] {
        for (op, name, want) in [(Op::Rademacher, "rademacher", &want), (Op::Uniform, "uniform", &wantu)] {
            let v = g.upload(&x0).map_err(e)?;
            g.run_with(op, &v, None, &dirs, groups, chunk).map_err(e)?;
            let got = g.download(&v).map_err(e)?;
            ensure!(
                bits(&got) == bits(want),
                "{name}, {groups} groups per row, chunks of {chunk}: {}",
                first_diff(&got, want)
            );
        }
    }
    Ok(String::new())
}

/// 1,000 SPSA applies on 1M + 4,321 parameters, round by round (100
/// directions per round) as a replica replays logs, stays on the GPU
/// throughout: the parameters hash equal to the CPU's.
pub fn thousand_applies(g: &Gpu) -> Result<String, String> {
    let n = (1 << 20) + 4_321;
    let x0: Vec<f32> = (0..n).map(|i| ((i % 997) as f32 - 498.0) * 1e-3).collect();
    let mut cpu = x0.clone();
    let on_gpu = g.upload(&x0).map_err(e)?;
    for round in 0..10u32 {
        let dirs: Vec<(StreamId, f32)> = (0..100u32)
            .map(|k| (StreamId { round, client: k % 7, step: k, ..id(0) }, ((k as f32) - 50.0) * 3.7e-4))
            .collect();
        apply_rademacher(&mut cpu, &dirs);
        g.apply_rademacher_on(&on_gpu, &dirs).map_err(e)?;
    }
    let got = g.download(&on_gpu).map_err(e)?;
    ensure!(params_hash(&got) == params_hash(&cpu), "after 1,000 applies: {}", first_diff(&got, &cpu));
    ensure!(params_hash(&got) != params_hash(&x0), "the applies changed nothing");
    Ok(String::new())
}

/// 100M parameters: 6,104 workgroups, bound in chunks where the device's
/// binding limit is below 400 MB.
pub fn hundred_million(g: &Gpu) -> Result<String, String> {
    let n = 100_000_000usize;
    let mut cpu: Vec<f32> = (0..n).map(|i| (i % 4096) as f32 * 2.5e-4).collect();
    let v = g.upload(&cpu).map_err(e)?;
    let dirs = [(id(11), 1e-3f32)];
    g.apply_rademacher_on(&v, &dirs).map_err(e)?;
    apply_rademacher(&mut cpu, &dirs);
    let got = g.download(&v).map_err(e)?;
    ensure!(params_hash(&got) == params_hash(&cpu), "100M apply: {}", first_diff(&got, &cpu));
    Ok(String::new())
}

/// Local SGD on the GPU tracks the CPU run: same data and order, mean
/// losses within 1e-4 relative, parameters within 1e-5 absolute (the
/// backends' kernels sum in different orders).
pub fn training_tracks_cpu(g: &Gpu) -> Result<String, String> {
    let split = crate::data::embedded_mnist();
    let data = split.train.subset(&(0..256).collect::<Vec<_>>()).map_err(|x| x.to_string())?;
    let mut detail = Vec::new();
    for arch in [ModelArch::Mlp { input: 784, hidden: vec![32], classes: 10 }, ModelArch::LeNet5 { classes: 10 }] {
        let p0 = arch.init_params(5);
        let cfg = crate::TrainConfig::sgd(0.05, 32, 1, 3);
        let (pc, rc) = crate::train_local(&arch, &p0, &data, &cfg, &crate::cpu_device()).map_err(|x| x.to_string())?;
        let (pg, rg) = crate::train_local(&arch, &p0, &data, &cfg, &g.burn_device()).map_err(|x| x.to_string())?;
        let rel = (rc.mean_loss - rg.mean_loss).abs() / rc.mean_loss.abs();
        ensure!(rel < 1e-4, "{arch:?}: cpu loss {} gpu loss {}", rc.mean_loss, rg.mean_loss);
        let max = pc.iter().zip(&pg).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        ensure!(max < 1e-5, "{arch:?}: max parameter difference {max}");
        detail.push(format!(
            "{}: loss rel. diff {rel:.1e}, max param diff {max:.1e}",
            if matches!(arch, ModelArch::Mlp { .. }) { "MLP" } else { "LeNet-5" }
        ));
    }
    Ok(detail.join("; "))
}

/// FRL's supermask training on the GPU (burn) tracks the native CPU kernels.
/// One step (batch 8) from the same scores: loss within 1e-5 relative,
/// scores within 1e-6. Eight steps: loss within 2% relative, because the
/// mask is a discrete top-k over 1.6M scores and a rounding-level difference
/// at the boundary flips edges, which later steps amplify.
pub fn supermask_tracks_cpu(g: &Gpu) -> Result<String, String> {
    use crate::supermask::{FrlTrainConfig, Supermask, SupermaskConfig};
    let split = crate::data::embedded_mnist();
    let net = Supermask::new(&SupermaskConfig::new(FrlArch::MNIST_LENET, 9)).map_err(|x| x.to_string())?;
    let cfg = FrlTrainConfig { epochs: 1, batch_size: 8, ..FrlTrainConfig::mnist(0, 4) };
    let mut detail = Vec::new();
    for (samples, loss_tol, score_tol) in [(8usize, 1e-5f32, Some(1e-6f32)), (64, 2e-2, None)] {
        let data = split.train.subset(&(0..samples).collect::<Vec<_>>()).map_err(|x| x.to_string())?;
        let s0 = net.initial_scores();
        let (sc, rc) = net.train(s0.clone(), &data, &cfg, &crate::cpu_device()).map_err(|x| x.to_string())?;
        let (sg, rg) = net.train(s0, &data, &cfg, &g.burn_device()).map_err(|x| x.to_string())?;
        let rel = (rc.mean_loss - rg.mean_loss).abs() / rc.mean_loss.abs();
        ensure!(rel < loss_tol, "{} steps: cpu loss {} gpu loss {}", rc.steps, rc.mean_loss, rg.mean_loss);
        if let Some(tol) = score_tol {
            let total = sc.iter().map(Vec::len).sum::<usize>();
            let off = sc.iter().flatten().zip(sg.iter().flatten()).filter(|(a, b)| (*a - *b).abs() > tol).count();
            let max = sc.iter().flatten().zip(sg.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            ensure!(
                off * 100 < total,
                "{} steps: {off} of {total} scores differ by more than {tol} (max {max})",
                rc.steps
            );
            detail.push(format!("{} step(s): {off} of {total} scores differ by > {tol:.0e} (max {max:.1e})", rc.steps));
        }
        detail.push(format!("{} step(s): loss rel. diff {rel:.1e}", rc.steps));
    }
    Ok(detail.join("; "))
}
