//! `tally-sim dp-stream`: measures the dp module's continual-release
//! mechanisms against the theory of Jain, Raskhodnikova, Sivakumar and
//! Smith, "The Price of Differential Privacy under Continual Observation"
//! (ICML 2023): continual counting costs a polylog(T) factor over a batch
//! release, continual MaxSum / SumSelect about `T^{1/3}`.
//!
//! Four experiments, each over many seeds:
//! * `count_T`: the binary-tree counter (Laplace, ε; Gaussian, ρ) on a
//!   d-dimensional vote stream, error against T, and the batch release;
//! * `count_d`: the same against d at a fixed T;
//! * `select_T`: continual MaxSum and SumSelect by the sparse-vector
//!   mechanism (at several thresholds), the tree-then-max mechanism and the
//!   batch baselines, error against T on the pull-ahead / catch-up stream;
//! * `select_d`: the same against d at a fixed T.
//!
//! [`run`] writes the per-seed rows (`runs.csv`), per-cell statistics
//! (`summary.csv`), fitted slopes (`fits.csv`), SVG plots and a Markdown
//! report. Everything but the report's runtime line is a function of the
//! configuration alone (see [`experiments`] for where randomness comes
//! from): the same configuration gives byte-identical CSV files whatever the
//! thread count.

mod experiments;
pub mod fit;
mod report;
pub mod svg;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tally_protocol::dp::{DpError, Ratio};

pub use experiments::svt_tau0;
pub use report::Outputs;

/// Why an experiment run failed.
#[derive(Debug, thiserror::Error)]
pub enum DpStreamError {
    /// A mechanism refused its configuration or a record (a bug here, or
    /// parameters past the dp module's limits).
    #[error("dp mechanism: {0}")]
    Dp(Box<DpError>),
    /// A configuration that can't run.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A derived budget that would exceed the configured one (checked
    /// exactly before any mechanism runs).
    #[error("privacy check failed: {0}")]
    Privacy(String),
    /// Writing an output.
    #[error("writing {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<DpError> for DpStreamError {
    fn from(e: DpError) -> Self {
        // Boxed: DpError carries three ratios, and every experiment function
        // returns this error type.
        DpStreamError::Dp(Box::new(e))
    }
}

/// What to run. [`Default`] is the documented run behind
/// `docs/results/dp-continual.md`.
#[derive(Clone, Debug, PartialEq)]
pub struct DpStreamConfig {
    /// Seeds `seed_base .. seed_base + seeds`.
    pub seeds: u64,
    /// First seed.
    pub seed_base: u64,
    /// ε of the Laplace counters (and their batch baseline).
    pub epsilon: Ratio,
    /// ρ (zCDP) of the Gaussian counters, the SVT, the tree-then-max
    /// mechanism and the selection baselines.
    pub rho: Ratio,
    /// Horizons of `count_T`.
    pub count_horizons: Vec<u64>,
    /// Dimension of `count_T`.
    pub count_dim: usize,
    /// Dimensions of `count_d`.
    pub count_dims: Vec<usize>,
    /// Horizon of `count_d`.
    pub count_dim_horizon: u64,
    /// Horizons of `select_T`.
    pub select_horizons: Vec<u64>,
    /// Dimension of `select_T`.
    pub select_dim: usize,
    /// Dimensions of `select_d`.
    pub select_dims: Vec<usize>,
    /// Horizon of `select_d`.
    pub select_dim_horizon: u64,
    /// SVT threshold multipliers of `select_T` (τ = m·τ₀); `select_d` uses 1.
    pub tau_multipliers: Vec<f64>,
    /// In `select_T`, the tree-then-max mechanism runs only where `T·d` is at
    /// most this (it draws `d` noise values per step; the SVT draws one).
    pub tree_max_limit: u64,
    /// The same limit for `select_d` (higher by default, so that the
    /// crossover with the SVT near `d ≈ T^{2/3}` shows).
    pub tree_max_limit_d: u64,
    /// Worker threads (results do not depend on it).
    pub threads: usize,
}

fn powers(lo: u32, hi: u32) -> Vec<u64> {
    (lo..=hi).map(|e| 1u64 << e).collect()
}

impl Default for DpStreamConfig {
    fn default() -> Self {
        DpStreamConfig {
            seeds: 20,
            seed_base: 1,
            epsilon: Ratio::integer(1),
            // ρ = 1/2: the batch selections then run at ε = √(2ρ) = 1.
            rho: Ratio::new(1, 2).unwrap_or(Ratio::integer(1)),
            count_horizons: powers(6, 14),
            count_dim: 8,
            count_dims: powers(1, 10).into_iter().map(|d| d as usize).collect(),
            count_dim_horizon: 1 << 10,
            select_horizons: powers(10, 18),
            select_dim: 64,
            select_dims: powers(1, 10).into_iter().map(|d| d as usize).collect(),
            select_dim_horizon: 1 << 14,
            tau_multipliers: vec![0.25, 0.5, 1.0, 2.0, 4.0],
            tree_max_limit: 1 << 20,
            tree_max_limit_d: 1 << 22,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

impl DpStreamConfig {
    /// A tiny configuration for tests (a second or so in release).
    pub fn tiny() -> Self {
        DpStreamConfig {
            seeds: 3,
            count_horizons: powers(4, 7),
            count_dim: 4,
            count_dims: vec![2, 4, 16],
            count_dim_horizon: 64,
            select_horizons: powers(8, 10),
            select_dim: 8,
            select_dims: vec![2, 8, 32],
            select_dim_horizon: 256,
            tau_multipliers: vec![0.5, 1.0, 2.0],
            tree_max_limit: 1 << 13,
            tree_max_limit_d: 1 << 13,
            threads: 2,
            ..DpStreamConfig::default()
        }
    }

    /// Refuses sizes the mechanisms or the report can't handle.
    pub fn validate(&self) -> Result<(), DpStreamError> {
        let bad = |m: &str| Err(DpStreamError::Config(m.into()));
        if self.seeds == 0 {
            return bad("at least one seed");
        }
        if self.epsilon.is_zero() || self.rho.is_zero() {
            return bad("epsilon and rho must be positive");
        }
        let all_t = self
            .count_horizons
            .iter()
            .chain(&self.select_horizons)
            .chain([&self.count_dim_horizon, &self.select_dim_horizon]);
        if all_t.clone().any(|&t| !(2..=1 << 30).contains(&t)) {
            return bad("horizons must be in 2..=2^30");
        }
        let all_d = self.count_dims.iter().chain(&self.select_dims).chain([&self.count_dim, &self.select_dim]);
        if all_d.clone().any(|&d| d == 0 || d > 1 << 20) {
            return bad("dimensions must be in 1..=2^20");
        }
        if self.select_dims.contains(&1) || self.select_dim < 2 {
            return bad("selection needs at least 2 columns");
        }
        if self.tau_multipliers.is_empty() || self.tau_multipliers.iter().any(|&m| !(m > 0.0 && m.is_finite())) {
            return bad("threshold multipliers must be positive");
        }
        Ok(())
    }
}

/// The error of one mechanism on one stream (one seed of one cell).
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// `count_T`, `count_d`, `select_T` or `select_d`.
    pub experiment: &'static str,
    /// `count`, `maxsum` or `sumselect`.
    pub problem: &'static str,
    /// `tree-laplace`, `tree-gaussian`, `batch-laplace`, `batch-gaussian`,
    /// `svt`, `tree-max` or `batch`.
    pub mechanism: &'static str,
    /// T.
    pub horizon: u64,
    /// d.
    pub dim: usize,
    /// The seed.
    pub seed: u64,
    /// SVT: τ/τ₀ (0 for other mechanisms).
    pub tau_mult: f64,
    /// SVT: τ.
    pub tau: u64,
    /// SVT: k_max.
    pub max_switches: u64,
    /// SVT: refreshes made.
    pub switches: u64,
    /// Max over t of the error (ℓ∞ over coordinates for counting). A batch
    /// mechanism releases once: its error at T.
    pub max_error: u64,
    /// Mean over t of the same error (batch: the error at T).
    pub mean_error: f64,
}

/// Where a worker leaves a job's rows (or its error).
type Slot = Mutex<Option<Result<Vec<Row>, DpStreamError>>>;

/// One unit of work: a cell and a seed.
#[derive(Clone, Copy, Debug)]
struct Job {
    experiment: &'static str,
    horizon: u64,
    dim: usize,
    seed: u64,
}

impl Job {
    /// The cell's number, which keys its randomness together with the seed.
    fn cell(&self) -> u64 {
        let e = match self.experiment {
            "count_T" => 1,
            "count_d" => 2,
            "select_T" => 3,
            _ => 4,
        };
        crate::hash_seed(e, self.horizon, self.dim as u64)
    }
}

/// Runs every experiment of `cfg` and returns the rows in a fixed order
/// (experiment, cell, seed, mechanism), whatever the thread count.
pub fn run_rows(cfg: &DpStreamConfig, progress: &(dyn Fn(usize, usize) + Sync)) -> Result<Vec<Row>, DpStreamError> {
    cfg.validate()?;
    let mut jobs = Vec::new();
    let seeds = cfg.seed_base..cfg.seed_base + cfg.seeds;
    let mut push = |experiment, horizon, dim| {
        jobs.extend(seeds.clone().map(|seed| Job { experiment, horizon, dim, seed }));
    };
    for &t in &cfg.count_horizons {
        push("count_T", t, cfg.count_dim);
    }
    for &d in &cfg.count_dims {
        push("count_d", cfg.count_dim_horizon, d);
    }
    for &t in &cfg.select_horizons {
        push("select_T", t, cfg.select_dim);
    }
    for &d in &cfg.select_dims {
        push("select_d", cfg.select_dim_horizon, d);
    }
    // Largest jobs first, so the last thread to finish is not holding one.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(jobs[i].horizon.saturating_mul(jobs[i].dim as u64 + 16)));
    let results: Vec<Slot> = jobs.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let unit = [1.0];
    std::thread::scope(|s| {
        for _ in 0..cfg.threads.max(1) {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = order.get(k) else { break };
                    let j = jobs[i];
                    let r = match j.experiment {
                        "count_T" | "count_d" => experiments::counting(
                            j.experiment,
                            j.horizon,
                            j.dim,
                            cfg.epsilon,
                            cfg.rho,
                            j.seed,
                            j.cell(),
                        ),
                        _ => {
                            let mults: &[f64] = if j.experiment == "select_T" { &cfg.tau_multipliers } else { &unit };
                            let limit =
                                if j.experiment == "select_T" { cfg.tree_max_limit } else { cfg.tree_max_limit_d };
                            let tree = j.horizon.saturating_mul(j.dim as u64) <= limit;
                            experiments::selection(
                                j.experiment,
                                j.horizon,
                                j.dim,
                                cfg.rho,
                                mults,
                                tree,
                                j.seed,
                                j.cell(),
                            )
                        }
                    };
                    // A poisoned slot only means another worker panicked;
                    // the scope re-raises that panic anyway.
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(r);
                    }
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1, jobs.len());
                }
            });
        }
    });
    let mut rows = Vec::new();
    for slot in results {
        match slot.into_inner().ok().flatten() {
            Some(r) => rows.extend(r?),
            None => return Err(DpStreamError::Config("a worker stopped before finishing its job".into())),
        }
    }
    Ok(rows)
}

/// Runs everything and writes the outputs: CSV files and plots under
/// `out`, and the Markdown report at `report` (its links to the plots are
/// relative to it). `command` and `elapsed` go into the report only.
pub fn run(
    cfg: &DpStreamConfig,
    out: &Path,
    report: &Path,
    command: &str,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Outputs, DpStreamError> {
    let started = std::time::Instant::now();
    let rows = run_rows(cfg, progress)?;
    report::write_all(cfg, &rows, out, report, command, started)
}

#[cfg(test)]
mod tests;
