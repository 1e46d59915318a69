//! Zeroth-order local work: the client side of one-byte SPSA.
//!
//! For each step the client evaluates the minibatch loss at `θ + εz` and
//! `θ − εz`, where `z` is regenerated from the shared stream of
//! [`tally_protocol::prng`] straight into an evaluation buffer, and encodes
//! the projected gradient `(ℓ₊ − ℓ₋) / 2ε` as one byte. θ is never written,
//! so it needs no floating-point "restore" (which would not be exact); the
//! memory beyond inference is that one buffer. `z` is never materialised.

use rand::Rng;
use rand_chacha::ChaCha20Rng;
use tally_protocol::model::ModelArch;
use tally_protocol::prng::{StreamId, perturbed_into};
use tally_protocol::spsa::{SpsaConfig, encode};

use crate::data::Dataset;
use crate::{Device, KernelError};

/// What a client's SPSA steps produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SpsaSteps {
    /// One byte per step.
    pub bytes: Vec<u8>,
    /// The projected gradients before quantisation (for diagnostics).
    pub gradients: Vec<f32>,
    /// Mean of `(ℓ₊ + ℓ₋) / 2` over the steps: the loss near θ.
    pub mean_loss: f32,
}

/// The minibatch generator of a client's round: ChaCha20 keyed by `seed`
/// (little endian) and `"tallyzo"` ([`tally_protocol::rng::keyed_chacha20`]).
fn batch_rng(seed: u64) -> ChaCha20Rng {
    tally_protocol::rng::keyed_chacha20(seed, b"tallyzo")
}

/// Runs `steps` SPSA estimates for `client` in `round` at `params`.
/// `seed` picks the minibatches (the client's local seed for the round).
#[allow(clippy::too_many_arguments, reason = "mirrors the protocol's named inputs one to one")]
pub fn spsa_steps(
    arch: &ModelArch,
    params: &[f32],
    data: &Dataset,
    cfg: &SpsaConfig,
    round: u32,
    client: u32,
    steps: u32,
    seed: u64,
    device: &Device,
) -> Result<SpsaSteps, KernelError> {
    cfg.validate().map_err(KernelError::InvalidConfig)?;
    if data.is_empty() {
        return Err(KernelError::EmptyDataset);
    }
    let mut rng = batch_rng(seed);
    let mut buf = vec![0f32; params.len()];
    let mut perturb = Perturber::new(params, device)?;
    let mut idx = vec![0usize; (cfg.batch_size as usize).min(data.len())];
    let (mut bytes, mut grads, mut loss_sum) = (Vec::new(), Vec::new(), 0f64);
    for step in 0..steps {
        // Minibatch with replacement across steps, uniform indices.
        for i in idx.iter_mut() {
            *i = (rng.next_u64() % data.len() as u64) as usize;
        }
        let dir = cfg.direction(round, client, step);
        perturb.perturbed(&mut buf, params, &dir, cfg.eps)?;
        let plus = crate::train::batch_loss(arch, &buf, data, &idx, device)?;
        perturb.perturbed(&mut buf, params, &dir, -cfg.eps)?;
        let minus = crate::train::batch_loss(arch, &buf, data, &idx, device)?;
        let g = ((f64::from(plus) - f64::from(minus)) / (2.0 * f64::from(cfg.eps))) as f32;
        bytes.push(encode(g));
        grads.push(g);
        loss_sum += (f64::from(plus) + f64::from(minus)) / 2.0;
    }
    Ok(SpsaSteps { bytes, gradients: grads, mean_loss: (loss_sum / f64::from(steps.max(1))) as f32 })
}

/// Where θ ± εz is formed: the CPU code, or on a GPU the fused kernel (θ
/// uploaded once per round, z regenerated in the kernel). burn 0.22 does not
/// take an external wgpu buffer as a tensor, so the perturbed copy is read
/// back and handed to the forward pass as plain parameters.
enum Perturber {
    Cpu,
    #[cfg(feature = "gpu")]
    Gpu {
        gpu: std::sync::Arc<crate::gpu::Gpu>,
        theta: crate::gpu::GpuVec,
        eval: crate::gpu::GpuVec,
    },
}

impl Perturber {
    #[cfg_attr(not(feature = "gpu"), allow(clippy::unnecessary_wraps, reason = "fallible with the GPU"))]
    fn new(params: &[f32], device: &Device) -> Result<Self, KernelError> {
        #[cfg(feature = "gpu")]
        if let Some(gpu) = crate::gpu::for_device(device) {
            let theta = gpu.upload(params)?;
            let eval = gpu.zeros(params.len())?;
            return Ok(Perturber::Gpu { gpu, theta, eval });
        }
        let _ = (params, device);
        Ok(Perturber::Cpu)
    }

    fn perturbed(&mut self, buf: &mut [f32], params: &[f32], dir: &StreamId, scale: f32) -> Result<(), KernelError> {
        match self {
            Perturber::Cpu => perturbed_into(buf, params, dir, scale),
            #[cfg(feature = "gpu")]
            Perturber::Gpu { gpu, theta, eval } => {
                gpu.perturbed_into_on(eval, theta, dir, scale)?;
                gpu.read_into(eval, buf)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tally_protocol::spsa::{LogEntry, apply_round};

    #[test]
    fn spsa_lowers_the_loss_of_a_small_model() {
        let split = crate::data::embedded_mnist();
        let train = split.train.subset(&(0..512).collect::<Vec<_>>()).unwrap();
        let arch = ModelArch::Mlp { input: 784, hidden: vec![16], classes: 10 };
        let dev = crate::cpu_device();
        let mut params = arch.init_params(3);
        let cfg = SpsaConfig { stream_seed: 5, steps_per_client: 64, eps: 1e-3, lr: 0.5, batch_size: 64 };
        let all: Vec<usize> = (0..512).collect();
        let before = crate::train::batch_loss(&arch, &params, &train, &all, &dev).unwrap();
        for round in 1..=20 {
            let s = spsa_steps(&arch, &params, &train, &cfg, round, 0, 64, round as u64, &dev).unwrap();
            assert_eq!(s.bytes.len(), 64);
            apply_round(&mut params, &cfg, round, &[LogEntry { client: 0, bytes: s.bytes }]);
        }
        let after = crate::train::batch_loss(&arch, &params, &train, &all, &dev).unwrap();
        assert!(after < before - 0.05, "loss {before} -> {after}");
    }

    #[test]
    fn steps_are_deterministic_and_leave_params_untouched() {
        let split = crate::data::embedded_mnist();
        let arch = ModelArch::Mlp { input: 784, hidden: vec![8], classes: 10 };
        let params = arch.init_params(1);
        let copy = params.clone();
        let cfg = SpsaConfig { stream_seed: 1, steps_per_client: 8, eps: 1e-3, lr: 0.1, batch_size: 16 };
        let dev = crate::cpu_device();
        let a = spsa_steps(&arch, &params, &split.train, &cfg, 1, 2, 8, 9, &dev).unwrap();
        let b = spsa_steps(&arch, &params, &split.train, &cfg, 1, 2, 8, 9, &dev).unwrap();
        assert_eq!(a, b);
        assert_eq!(params, copy);
        let c = spsa_steps(&arch, &params, &split.train, &cfg, 1, 3, 8, 9, &dev).unwrap();
        assert_ne!(a.bytes, c.bytes, "another client, other directions");
    }

    /// `cargo test --release -p tally-kernels spsa_step_speed -- --ignored --nocapture`
    #[test]
    #[ignore = "timing report, not a behaviour test"]
    fn spsa_step_speed() {
        let split = crate::data::embedded_mnist();
        let arch = ModelArch::mnist_mlp();
        let params = arch.init_params(1);
        let dev = crate::cpu_device();
        for batch in [32u32, 64, 128] {
            let cfg = SpsaConfig { stream_seed: 1, steps_per_client: 64, eps: 1e-3, lr: 0.01, batch_size: batch };
            let _ = spsa_steps(&arch, &params, &split.train, &cfg, 1, 0, 4, 1, &dev).unwrap();
            let t = std::time::Instant::now();
            let _ = spsa_steps(&arch, &params, &split.train, &cfg, 1, 0, 64, 2, &dev).unwrap();
            let per = t.elapsed().as_secs_f64() / 64.0;
            println!(
                "MLP 784-200-200-10, batch {batch}: {:.3} ms per SPSA step (2 forward passes + 2 perturbations)",
                per * 1e3
            );
        }
    }
}
