//! The GPU benchmark behind `tally-client gpu-bench`: fused shared-randomness
//! applies against a device-to-device copy measured in the same run, local
//! training steps per second on the GPU and the CPU, and the first step's
//! time (cold or warm kernel cache, as the caller arranged). Wall-clock
//! timings of whole submissions (launch overhead included), each over enough
//! repetitions to move gigabytes.

use std::time::Instant;

use tally_protocol::model::ModelArch;
use tally_protocol::prng::{Purpose, StreamId};
use tally_protocol::supermask::FrlArch;

use super::{AdapterDescription, GpuError};
use crate::compute::{Compute, DeviceChoice};
use crate::{Device, KernelError};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Largest fused-apply size (1M and 16M are always measured).
    pub max_params: usize,
    /// Timed training steps per configuration.
    pub steps: u32,
    /// The device (`auto` or `gpu`).
    pub choice: DeviceChoice,
}

/// One fused-apply size.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ApplyFigure {
    /// Parameters.
    pub params: usize,
    /// Repetitions timed.
    pub reps: u32,
    /// The driver's device-to-device copy (`copy_buffer_to_buffer`) of the
    /// same buffer, bytes read + written per second / 1e9.
    pub copy_gbps: f64,
    /// A copy kernel with the fused kernels' access pattern, GB/s.
    pub copy_kernel_gbps: f64,
    /// One Rademacher direction applied in place (read + write), GB/s.
    pub apply_gbps: f64,
    /// `apply_gbps` over the faster of the two copies.
    pub apply_fraction_of_copy: f64,
    /// Batched (all repetitions in one submission, so no per-call
    /// submission cost): the driver's copy, GB/s.
    pub batched_copy_gbps: f64,
    /// Batched copy kernel, GB/s.
    pub batched_copy_kernel_gbps: f64,
    /// Batched Rademacher apply, GB/s.
    pub batched_apply_gbps: f64,
    /// `batched_apply_gbps` over the faster batched copy.
    pub batched_apply_fraction_of_copy: f64,
    /// The perturbed copy `dst = src + s·z` (read + write), GB/s.
    pub perturbed_into_gbps: f64,
    /// 64 directions applied in one pass (an SPSA round log), parameter-directions per second / 1e9.
    pub replay_64_dirs_gparams_per_s: f64,
    /// One uniform direction applied in place, GB/s.
    pub uniform_gbps: f64,
}

/// One training configuration on one device.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainFigure {
    /// `mlp-784-200-200-10` or `frl-lenet-supermask`.
    pub model: String,
    /// Samples per step.
    pub batch: usize,
    /// `gpu` or `cpu`.
    pub device: String,
    /// Seconds of the first step in this process (kernel compilation and
    /// autotuning included on the GPU).
    pub first_step_secs: f64,
    /// Steady steps per second (first step excluded).
    pub steps_per_sec: f64,
    /// Milliseconds per steady step.
    pub ms_per_step: f64,
}

/// The report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    /// The GPU.
    pub adapter: AdapterDescription,
    /// The host CPU (`/proc/cpuinfo` model name) and its logical cores.
    pub host_cpu: String,
    /// Logical cores.
    pub host_cores: usize,
    /// The GPU driver's shader cache directory (`__GL_SHADER_DISK_CACHE_PATH`
    /// for NVIDIA, `MESA_SHADER_CACHE_DIR` for Mesa) and whether it was empty
    /// when the process started (a cold first step) or not (warm); `None`
    /// when neither variable is set (the driver's default directory).
    pub shader_cache: Option<String>,
    /// Fused applies.
    pub fused_apply: Vec<ApplyFigure>,
    /// Training steps.
    pub training: Vec<TrainFigure>,
    /// Milliseconds to rank all FRL LeNet layers on the CPU (the ranking a
    /// client sends each round; see the crate docs for why it stays there).
    pub frl_lenet_ranking_cpu_ms: f64,
}

fn host_cpu() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn sid(step: u32) -> StreamId {
    StreamId { run_seed: 42, purpose: Purpose::SpsaPerturbation, round: 1, client: 0, step }
}

fn time_reps(gpu: &super::Gpu, reps: u32, mut f: impl FnMut() -> Result<(), GpuError>) -> Result<f64, GpuError> {
    // Warm-up: pipeline creation, first allocation.
    f()?;
    gpu.wait()?;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    gpu.wait()?;
    Ok(t.elapsed().as_secs_f64())
}

fn apply_figure(gpu: &super::Gpu, n: usize) -> Result<ApplyFigure, GpuError> {
    let x0: Vec<f32> = (0..n).map(|i| (i % 1024) as f32 * 1e-3).collect();
    let a = gpu.upload(&x0)?;
    let b = gpu.upload(&x0)?;
    drop(x0);
    let bytes = 8.0 * n as f64;
    // About 8 GB moved per measurement, at least 10 repetitions.
    let reps = ((8e9 / bytes) as u32).clamp(10, 2000);
    let copy = time_reps(gpu, reps, || gpu.copy(&b, &a))?;
    let copy_k = time_reps(gpu, reps, || gpu.copy_kernel(&b, &a))?;
    let dir = [(sid(0), 1e-3f32)];
    let apply = time_reps(gpu, reps, || gpu.apply_rademacher_on(&a, &dir))?;
    let pert = time_reps(gpu, reps, || gpu.perturbed_into_on(&b, &a, &sid(1), 1e-3))?;
    let uni = time_reps(gpu, reps, || gpu.apply_uniform_on(&a, &dir))?;
    let dirs: Vec<(StreamId, f32)> = (0..64).map(|k| (sid(k), 1e-4)).collect();
    let replay_reps = (reps / 8).max(3);
    let replay = time_reps(gpu, replay_reps, || gpu.apply_rademacher_on(&a, &dirs))?;
    let gbps = |secs: f64, r: u32| bytes * f64::from(r) / secs / 1e9;
    use super::prng::Batched;
    let b_copy = gbps(gpu.time_batched(Batched::DriverCopy { src: &a }, &b, reps)?, reps);
    let b_copy_k = gbps(gpu.time_batched(Batched::CopyKernel { src: &a }, &b, reps)?, reps);
    let b_apply = gbps(gpu.time_batched(Batched::Apply { dirs: &dir }, &a, reps)?, reps);
    let copy_gbps = gbps(copy, reps);
    let copy_kernel_gbps = gbps(copy_k, reps);
    let apply_gbps = gbps(apply, reps);
    Ok(ApplyFigure {
        params: n,
        reps,
        copy_gbps,
        copy_kernel_gbps,
        apply_gbps,
        apply_fraction_of_copy: apply_gbps / copy_gbps.max(copy_kernel_gbps),
        batched_copy_gbps: b_copy,
        batched_copy_kernel_gbps: b_copy_k,
        batched_apply_gbps: b_apply,
        batched_apply_fraction_of_copy: b_apply / b_copy.max(b_copy_k),
        perturbed_into_gbps: gbps(pert, reps),
        replay_64_dirs_gparams_per_s: n as f64 * 64.0 * f64::from(replay_reps) / replay / 1e9,
        uniform_gbps: gbps(uni, reps),
    })
}

/// The training set cycled to `len` samples.
fn cycled(data: &crate::Dataset, len: usize) -> Result<crate::Dataset, KernelError> {
    let idx: Vec<usize> = (0..len).map(|i| i % data.len()).collect();
    Ok(data.subset(&idx)?)
}

fn mlp_figure(device: &Device, name: &str, batch: usize, steps: u32) -> Result<TrainFigure, KernelError> {
    let split = crate::data::embedded_mnist();
    let arch = ModelArch::mnist_mlp();
    let p = arch.init_params(1);
    let one = cycled(&split.train, batch)?;
    let many = cycled(&split.train, batch * steps as usize)?;
    let cfg = crate::TrainConfig::sgd(0.01, batch, 1, 1);
    let t = Instant::now();
    let (p, _) = crate::train_local(&arch, &p, &one, &cfg, device)?;
    let first = t.elapsed().as_secs_f64();
    let t = Instant::now();
    crate::train_local(&arch, &p, &many, &cfg, device)?;
    Ok(TrainFigure::new("mlp-784-200-200-10", batch, name, first, t.elapsed().as_secs_f64(), steps))
}

impl TrainFigure {
    fn new(model: &str, batch: usize, device: &str, first: f64, secs: f64, steps: u32) -> Self {
        TrainFigure {
            model: model.into(),
            batch,
            device: device.into(),
            first_step_secs: first,
            steps_per_sec: f64::from(steps) / secs,
            ms_per_step: secs * 1e3 / f64::from(steps),
        }
    }
}

fn frl_figure(device: &Device, name: &str, batch: usize, steps: u32) -> Result<TrainFigure, KernelError> {
    use crate::supermask::{FrlTrainConfig, Supermask, SupermaskConfig};
    let split = crate::data::embedded_mnist();
    let net = Supermask::new(&SupermaskConfig::new(FrlArch::MNIST_LENET, 1))?;
    let cfg = FrlTrainConfig { epochs: 1, batch_size: batch, ..FrlTrainConfig::mnist(0, 1) };
    let one = cycled(&split.train, batch)?;
    let many = cycled(&split.train, batch * steps as usize)?;
    let t = Instant::now();
    let (scores, _) = net.train(net.initial_scores(), &one, &cfg, device)?;
    let first = t.elapsed().as_secs_f64();
    let t = Instant::now();
    net.train(scores, &many, &cfg, device)?;
    Ok(TrainFigure::new("frl-lenet-supermask", batch, name, first, t.elapsed().as_secs_f64(), steps))
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, KernelError> {
    let shader_cache = ["__GL_SHADER_DISK_CACHE_PATH", "MESA_SHADER_CACHE_DIR"]
        .iter()
        .find_map(|v| std::env::var_os(v).map(|d| (v, std::path::PathBuf::from(d))))
        .map(|(v, d)| {
            let empty = std::fs::read_dir(&d).map(|mut r| r.next().is_none()).unwrap_or(true);
            format!("{v}={} ({})", d.display(), if empty { "empty: cold" } else { "filled: warm" })
        });
    let compute = Compute::open(if opts.choice == DeviceChoice::Cpu { DeviceChoice::Gpu } else { opts.choice })?;
    let gpu = compute.gpu().cloned().ok_or_else(|| KernelError::NoGpu(compute.note.clone().unwrap_or_default()))?;
    let steps = opts.steps.max(2);
    // Training first: its first step is the cold/warm figure, before the
    // fused kernels' pipelines exist.
    let cpu = crate::cpu_device();
    let gdev = gpu.burn_device();
    let mut training = Vec::new();
    for batch in [32, 256] {
        training.push(mlp_figure(&gdev, "gpu", batch, steps)?);
        training.push(mlp_figure(&cpu, "cpu", batch, steps)?);
    }
    training.push(frl_figure(&gdev, "gpu", 8, steps)?);
    training.push(frl_figure(&cpu, "cpu", 8, steps)?);
    let mut fused_apply = Vec::new();
    let mut sizes = vec![1_000_000usize, 16_000_000];
    if opts.max_params > 16_000_000 {
        sizes.push(opts.max_params);
    }
    for n in sizes.into_iter().filter(|&n| n <= opts.max_params.max(1_000_000)) {
        fused_apply.push(apply_figure(&gpu, n)?);
    }
    let net = crate::supermask::Supermask::new(&crate::supermask::SupermaskConfig::new(FrlArch::MNIST_LENET, 1))?;
    let scores = net.initial_scores();
    let t = Instant::now();
    let reps = 5;
    for _ in 0..reps {
        std::hint::black_box(net.rankings(&scores));
    }
    let frl_lenet_ranking_cpu_ms = t.elapsed().as_secs_f64() * 1e3 / f64::from(reps);
    Ok(BenchReport {
        adapter: gpu.adapter().clone(),
        host_cpu: host_cpu(),
        host_cores: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        shader_cache,
        fused_apply,
        training,
        frl_lenet_ranking_cpu_ms,
    })
}
