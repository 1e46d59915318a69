//! Tally's machine-learning kernels: datasets and client partitions
//! ([`data`]: MNIST IDX, Shakespeare, and CSV, NumPy, safetensors and PNG
//! image folders through [`data::formats`]), burn models matching `tally_protocol::model::ModelArch`
//! ([`model`], including any sequential network described in a run's
//! configuration), models written in Rust by the embedding program
//! ([`custom`]: implement [`custom::BurnNet`] for a burn module, register
//! it, and every update kind trains it), local SGD training and evaluation
//! ([`train`]), FRL's
//! supermask networks ([`supermask`]), SPSA's zeroth-order steps ([`zo`]),
//! parameter files ([`params_file`]), each update kind's client side
//! behind one trait and registry ([`update`]), the run-time choice of CPU or
//! GPU ([`compute`]) and, with the `gpu` feature, the GPU through wgpu:
//! adapters, burn's wgpu device and the fused shared-randomness kernels
//! (`gpu`, see `docs/gpu.md`).
//!
//! This is the only crate of the workspace that names burn types. Everything
//! crosses its boundary as plain Rust: parameters as a flat `Vec<f32>` in the
//! canonical order of `ModelArch::tensors()`, data as [`data::Dataset`]. The
//! burn device is chosen by the caller and passed in as a value
//! ([`train::cpu_device`] gives the CPU one, [`Compute::open`] a GPU);
//! library code never hard-codes it.
//!
//! It never does networking, never reads the clock, and never seeds from the
//! OS: training is a pure function of (architecture, parameters, data,
//! config), bit-for-bit reproducible on a given machine (see [`train`]).

pub mod compute;
pub mod custom;
pub mod data;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod model;
pub mod params_file;
pub mod supermask;
pub mod train;
pub mod update;
pub mod zo;

pub use burn::tensor::Device;
pub use compute::{Compute, DeviceChoice};
pub use data::{DataError, Dataset, Split};
pub use train::{EvalReport, TrainConfig, TrainReport, cpu_device, evaluate, train_local};

use std::path::PathBuf;
use tally_protocol::model::ModelError;

/// Why a kernel refused its inputs or failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The architecture is invalid, or the parameters don't fit it (wrong
    /// length, NaN/infinity, bad safetensors).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The dataset violates its own invariants.
    #[error("dataset: {0}")]
    Data(#[from] DataError),
    /// Training or evaluation on no samples.
    #[error("the dataset is empty")]
    EmptyDataset,
    /// The images don't have the size the model takes.
    #[error("model expects {expected} ({arch_input}) pixels per image, dataset images are {rows}x{cols}")]
    ImageSize {
        /// What the model takes, e.g. `784` or `1x28x28`.
        arch_input: String,
        /// Pixels per image the model takes.
        expected: usize,
        /// Dataset image height.
        rows: usize,
        /// Dataset image width.
        cols: usize,
    },
    /// A label is not a class of the model.
    #[error("label {label} at index {index} is not below the model's {classes} classes")]
    LabelOutOfRange {
        /// Sample index.
        index: usize,
        /// The label.
        label: u8,
        /// Classes of the model.
        classes: usize,
    },
    /// A training or evaluation setting is unusable.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// The loss became NaN or infinite (learning rate too high, usually).
    #[error("training diverged: loss is {loss} at step {step}")]
    Diverged {
        /// Zero-based step at which the loss was not finite.
        step: u64,
        /// The loss value.
        loss: f32,
    },
    /// A ranking is not a permutation of its layer's edges, or doesn't fit
    /// the network (FRL, see [`supermask`]).
    #[error("bad ranking: {0}")]
    BadRanking(String),
    /// The run's model is a custom one this process has no implementation
    /// of ([`custom::register`]).
    #[error("custom model {0:?} is not registered in this client (see tally_kernels::custom)")]
    UnknownModel(String),
    /// A GPU was asked for and none can be used.
    #[error("{0}")]
    NoGpu(String),
    /// The GPU failed (device lost, out of memory).
    #[cfg(feature = "gpu")]
    #[error(transparent)]
    Gpu(#[from] gpu::GpuError),
    /// The burn backend failed to execute or read back a tensor.
    #[error("backend: {0}")]
    Backend(String),
    /// A parameter file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A model file's metadata or tensors were refused
    /// (`tally_protocol::model_file`). Displays the file only: the reason is
    /// the source, which `{:#}` and error reporters print after it.
    #[error("{}", path.display())]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: tally_protocol::model_file::ModelFileError,
    },
    /// A parameter file was read but doesn't fit the model.
    #[error("{}: {source}", path.display())]
    ParamsFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ModelError,
    },
}
