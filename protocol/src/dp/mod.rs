//! Differential privacy under continual release: exact noise samplers, the
//! binary-tree counter, a sparse-vector top-k / MaxSum mechanism and a
//! privacy accountant. `docs/dp.md` is the project's note on what is built
//! and why; this module is its code.
//!
//! * [`noise`]: where noise comes from. A server-secret [`NoiseSeed`] (never
//!   the public run seed: clients could regenerate and subtract the noise)
//!   and named streams ([`crate::prng::Purpose::DpNoise`]), so a restored
//!   server draws exactly the same noise again.
//! * [`sampler`]: exact integer samplers (Canonne–Kamath–Steinke 2020):
//!   Bernoulli(exp(−γ)), discrete Laplace, discrete Gaussian. No float
//!   touches a sample (Mironov 2012 shows why that matters).
//! * [`tree`]: the binary-tree mechanism for continual counting of a
//!   d-dimensional integer stream (Dwork–Naor–Pitassi–Rothblum 2010,
//!   Chan–Shi–Song 2011), with Laplace (ε-DP) or Gaussian (ρ-zCDP) node
//!   noise; its state is a snapshot that restores bit for bit.
//! * [`svt`]: continual top-k selection and MaxSum over running column sums
//!   by the sparse-vector technique, with a switch budget (the `T^{1/3}`
//!   mechanism of Jain, Raskhodnikova, Sivakumar, Smith, ICML 2023).
//! * [`accountant`]: what has been spent, in ε, ρ and (ε, δ), and refusal
//!   past a budget.
//!
//! Neighbouring streams differ in one record (event level, replacement).
//! Everything is deterministic given the seed and the inputs; nothing here
//! reads a clock or the OS.

pub mod accountant;
pub mod noise;
pub mod ratio;
pub mod sampler;
pub mod svt;
pub mod tree;

pub use accountant::{Accountant, Budget, Cost, Spent};
pub use noise::{NoiseSeed, NoiseSource};
pub use ratio::Ratio;
pub use sampler::{DiscreteGaussian, DiscreteLaplace};
pub use svt::{Sampler, SparseVector, SvtConfig, SvtState, Target};
pub use tree::{ClipNorm, RecordDomain, TreeConfig, TreeCounter, TreeNoise, TreeState};

/// Why a DP parameter, record or release was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DpError {
    /// A parameter that makes no sense (zero scale, zero dimension, …).
    #[error("invalid {what}: {reason}")]
    InvalidParameter {
        /// The parameter.
        what: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// A parameter outside the limits the exact arithmetic supports.
    #[error("{what} out of range: {limit}")]
    OutOfRange {
        /// The parameter.
        what: &'static str,
        /// The limit, with the constant that sets it.
        limit: &'static str,
    },
    /// Exact arithmetic that would overflow (parameters too large together).
    #[error("{what} overflows the exact arithmetic")]
    Overflow {
        /// The quantity.
        what: &'static str,
    },
    /// A release past the mechanism's horizon T.
    #[error("horizon of {horizon} releases exhausted")]
    HorizonExhausted {
        /// T.
        horizon: u64,
    },
    /// A charge the budget can't cover; nothing was spent.
    #[error("privacy budget exceeded: {spent} spent + {cost} requested > {budget} ({unit})")]
    BudgetExceeded {
        /// What the budget counts (`"epsilon"` or `"rho"`).
        unit: &'static str,
        /// Spent before the charge.
        spent: Ratio,
        /// The charge.
        cost: Ratio,
        /// The budget.
        budget: Ratio,
    },
    /// A zCDP-only charge against a pure ε budget.
    #[error("a zCDP charge can't be accounted against a pure epsilon budget")]
    NotPure,
    /// A record of the wrong length.
    #[error("record has {got} coordinates, the mechanism counts {expected}")]
    WrongDimension {
        /// The mechanism's d.
        expected: usize,
        /// The record's.
        got: usize,
    },
    /// A record outside the declared domain (sensitivity would not hold).
    #[error("record outside the declared domain: {reason}")]
    RecordOutOfDomain {
        /// Which bound it breaks.
        reason: &'static str,
    },
    /// A saved state that does not fit the configuration.
    #[error("saved DP state is invalid: {reason}")]
    InvalidState {
        /// Why.
        reason: &'static str,
    },
}
