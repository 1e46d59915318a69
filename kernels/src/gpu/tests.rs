//! The GPU self-checks ([`super::check`]) and the SPSA client path on the
//! GPU. They need an adapter: `TALLY_REQUIRE_GPU=1` (set by `.ci/run`, where
//! lavapipe is installed) turns a missing adapter into a failure; elsewhere
//! the tests print why they skip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use tally_protocol::model::ModelArch;
use tally_protocol::prng::{Purpose, StreamId, perturbed_into};

use super::{Gpu, Preference, check, open};

fn gpu() -> Option<Arc<Gpu>> {
    match open(Preference::AnyAdapter) {
        Ok(g) => Some(g),
        Err(e) => {
            assert!(
                std::env::var_os("TALLY_REQUIRE_GPU").is_none(),
                "TALLY_REQUIRE_GPU is set and no GPU adapter can be used: {e}"
            );
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn run(f: fn(&Gpu) -> Result<String, String>) {
    if let Some(g) = gpu()
        && let Err(msg) = f(&g)
    {
        panic!("on {}: {msg}", g.adapter());
    }
}

#[test]
fn gpu_reproduces_the_prng_golden_vectors() {
    run(check::golden_vectors);
}

#[test]
fn perturbed_copy_and_uniform_directions_are_bit_exact() {
    run(check::perturbed_and_uniform);
}

#[test]
fn multi_row_grids_and_chunked_bindings_give_the_same_bits() {
    run(check::grids_and_chunks);
}

#[test]
fn thousand_spsa_applies_on_a_million_parameters_hash_equal() {
    run(check::thousand_applies);
}

#[test]
fn hundred_million_parameter_apply() {
    run(check::hundred_million);
}

#[test]
fn gpu_training_tracks_the_cpu() {
    run(check::training_tracks_cpu);
}

#[test]
fn gpu_supermask_training_tracks_the_cpu() {
    run(check::supermask_tracks_cpu);
}

/// A check must be able to fail: a kernel result with one bit changed is
/// caught by the same comparison the checks use.
#[test]
fn a_one_bit_difference_fails_the_comparison() {
    let Some(g) = gpu() else { return };
    let x0: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    let dirs = [(StreamId { run_seed: 1, purpose: Purpose::SpsaPerturbation, round: 0, client: 0, step: 0 }, 0.5f32)];
    let mut a = x0.clone();
    g.apply_rademacher(&mut a, &dirs).unwrap();
    let mut b = x0;
    tally_protocol::prng::apply_rademacher(&mut b, &dirs);
    assert_eq!(a, b);
    b[999] = f32::from_bits(b[999].to_bits() ^ 1);
    assert_ne!(tally_protocol::identity::params_hash(&a), tally_protocol::identity::params_hash(&b));
}

/// SPSA's client path with the perturbation formed on the GPU: the
/// perturbed copies are the CPU's bits, and the steps run end to end on the
/// GPU device (losses from the GPU's forward pass agree to f32 rounding).
#[test]
fn spsa_perturbation_on_the_gpu_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    let split = crate::data::embedded_mnist();
    let arch = ModelArch::Mlp { input: 784, hidden: vec![8], classes: 10 };
    let params = arch.init_params(1);
    let theta = g.upload(&params).unwrap();
    let eval = g.zeros(params.len()).unwrap();
    for step in 0..4 {
        let dir = StreamId { run_seed: 3, purpose: Purpose::SpsaPerturbation, round: 1, client: 2, step };
        g.perturbed_into_on(&eval, &theta, &dir, 1e-3).unwrap();
        let mut want = vec![0f32; params.len()];
        perturbed_into(&mut want, &params, &dir, 1e-3);
        assert_eq!(g.download(&eval).unwrap(), want);
    }
    let cfg =
        tally_protocol::spsa::SpsaConfig { stream_seed: 1, steps_per_client: 2, eps: 1e-3, lr: 0.1, batch_size: 16 };
    let on_gpu = crate::zo::spsa_steps(&arch, &params, &split.train, &cfg, 1, 2, 2, 9, &g.burn_device()).unwrap();
    let on_cpu = crate::zo::spsa_steps(&arch, &params, &split.train, &cfg, 1, 2, 2, 9, &crate::cpu_device()).unwrap();
    assert!(
        (on_gpu.mean_loss - on_cpu.mean_loss).abs() < 1e-4 * on_cpu.mean_loss,
        "{} vs {}",
        on_gpu.mean_loss,
        on_cpu.mean_loss
    );
}

/// A Ferret round's log applied by the GPU applier (the path a GPU client's
/// replica takes) gives the CPU replica's bits, with hundreds of bases per
/// block (more than one dispatch's worth).
#[test]
fn ferret_log_applied_on_the_gpu_matches_the_cpu() {
    use tally_protocol::ferret::{self, Coefficient, FerretSpec};
    use tally_protocol::prng::{CpuApplier, DirectionApplier};
    let Some(g) = gpu() else { return };
    let arch = ModelArch::Mlp { input: 64, hidden: vec![48], classes: 10 };
    let cfg = FerretSpec { k: 300, ..Default::default() }.resolve(3);
    let blocks = ferret::blocks(&arch);
    let entries: Vec<Coefficient> = (0..blocks.len() as u16)
        .flat_map(|g| {
            (0..300u16).map(move |k| Coefficient { k, g, value: ((k as f32) * 0.37 + g as f32).sin() * 1e-2 })
        })
        .collect();
    let init = arch.init_params(4);
    let (mut cpu, mut gpu_params) = (init.clone(), init.clone());
    ferret::apply_scaled(&cfg, &blocks, 1, &mut cpu, &entries, &CpuApplier);
    let applier = super::GpuApplier::new(g);
    ferret::apply_scaled(&cfg, &blocks, 1, &mut gpu_params, &entries, &applier);
    assert_eq!(applier.fallbacks(), 0, "the GPU served every block");
    assert_ne!(cpu, init);
    assert_eq!(
        cpu.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        gpu_params.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

/// A sequential description (convolution, pooling, dropout, GELU) trains
/// and evaluates on the GPU device like on the CPU: the same generic burn
/// module runs on both, and the results agree to f32 rounding.
#[test]
fn sequential_network_trains_on_the_gpu_like_on_the_cpu() {
    use tally_protocol::sequential::{LayerSpec, presets};
    let Some(g) = gpu() else { return };
    let split = crate::data::embedded_mnist();
    let data = split.train.subset(&(0..128).collect::<Vec<_>>()).unwrap();
    let arch = ModelArch::Sequential {
        input: vec![1, 28, 28],
        layers: vec![
            LayerSpec::Conv2d { out: 4, kernel: 3, stride: 2, padding: 1 },
            LayerSpec::Gelu,
            LayerSpec::MaxPool { kernel: 2, stride: None },
            LayerSpec::Flatten,
            presets::dropout(0.2),
            LayerSpec::Linear { out: 10 },
        ],
    };
    let p = arch.init_params(2);
    let cfg = crate::TrainConfig::sgd(0.05, 32, 1, 4);
    let (gpu_p, gpu_r) = crate::train_local(&arch, &p, &data, &cfg, &g.burn_device()).unwrap();
    let (cpu_p, cpu_r) = crate::train_local(&arch, &p, &data, &cfg, &crate::cpu_device()).unwrap();
    let worst = gpu_p.iter().zip(&cpu_p).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "largest parameter difference {worst}");
    assert!((gpu_r.mean_loss - cpu_r.mean_loss).abs() < 1e-4, "{gpu_r:?} vs {cpu_r:?}");
    let e = crate::evaluate(&arch, &gpu_p, &split.test, &g.burn_device(), 500).unwrap();
    assert_eq!(e.total, split.test.len() as u64);
}
