//! `tally-sim` command line: run a scenario, write per-round metrics.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use tally_protocol::RuleSpec;
use tally_sim::{PartitionSpec, Scenario};

/// Simulate a federation of Tally clients in one process (virtual clock, real
/// training, the real protocol state machines).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Scenario file (TOML); flags below override it. Without one, the
    /// default scenario runs: FedAvg, 20 clients (10 per round, Dirichlet
    /// α = 1) on the embedded MNIST subset, MLP 784-200-200-10, 60 rounds.
    #[arg(long, short)]
    scenario: Option<PathBuf>,
    /// Seed of everything.
    #[arg(long)]
    seed: Option<u64>,
    /// `embedded` or a directory of MNIST-format IDX files (e.g. data/mnist).
    #[arg(long)]
    data: Option<String>,
    /// Clients in the federation.
    #[arg(long)]
    clients: Option<usize>,
    /// Clients sampled per round.
    #[arg(long)]
    clients_per_round: Option<usize>,
    /// Training rounds.
    #[arg(long)]
    rounds: Option<u32>,
    /// Dirichlet label-skew partition with this α.
    #[arg(long, conflicts_with_all = ["iid", "partition"])]
    dirichlet: Option<f64>,
    /// IID partition.
    #[arg(long, conflicts_with = "partition")]
    iid: bool,
    /// Partition from a JSON file: one list of training-set indices per client.
    #[arg(long)]
    partition: Option<PathBuf>,
    /// Per-round client schedule from a JSON file: one list of client ids per round.
    #[arg(long)]
    schedule: Option<PathBuf>,
    /// Initial parameters: safetensors, or raw little-endian f32 in PyTorch
    /// layer order (weight [out, in] then bias, layer by layer).
    #[arg(long)]
    initial_model: Option<PathBuf>,
    /// Learning rate.
    #[arg(long)]
    lr: Option<f32>,
    /// Local epochs.
    #[arg(long)]
    epochs: Option<u32>,
    /// Minibatch size.
    #[arg(long)]
    batch_size: Option<u32>,
    /// Aggregation rule: `mean` or `median` (median for dense kinds only).
    #[arg(long, value_parser = parse_rule)]
    rule: Option<RuleSpec>,
    /// Evaluate every N rounds (and after the last).
    #[arg(long)]
    eval_every: Option<u32>,
    /// Metrics file (JSON lines).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the final model here (safetensors).
    #[arg(long)]
    save_model: Option<PathBuf>,
    /// Don't draw a progress bar.
    #[arg(long)]
    quiet: bool,
    /// Where clients train: `cpu`, `gpu` or `auto` (overrides the scenario).
    #[arg(long)]
    device: Option<tally_kernels::DeviceChoice>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: log files and tests read plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let mut s = match &cli.scenario {
        Some(p) => Scenario::from_file(p)?,
        None => Scenario::default(),
    };
    macro_rules! over {
        ($($f:ident),*) => { $( if let Some(v) = cli.$f.clone() { s.$f = v; } )* };
    }
    over!(seed, data, clients, clients_per_round, rounds, rule, eval_every, out, device);
    if let Some(a) = cli.dirichlet {
        s.partition = PartitionSpec::Dirichlet { alpha: a };
    }
    if cli.iid {
        s.partition = PartitionSpec::Iid;
    }
    if let Some(p) = &cli.partition {
        s.partition = PartitionSpec::File { path: p.clone() };
    }
    if cli.schedule.is_some() {
        s.schedule = cli.schedule.clone();
    }
    if cli.initial_model.is_some() {
        s.initial_model = cli.initial_model.clone();
    }
    if let Some(v) = cli.lr {
        s.train.lr = v;
    }
    if let Some(v) = cli.epochs {
        s.train.epochs = v;
    }
    if let Some(v) = cli.batch_size {
        s.train.batch_size = v;
    }
    s.validate()?;

    if let Some(dir) = s.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&s.out).with_context(|| format!("creating {}", s.out.display()))?,
    );
    eprintln!(
        "tally-sim: seed {} · {} clients, {} per round · {} rounds · data {} · partition {:?} · model {:?} · {} ({} rule)",
        s.seed,
        s.clients,
        s.clients_per_round,
        s.rounds,
        s.data,
        s.partition,
        s.model,
        s.kind_settings()?.name(),
        s.rule
    );
    let bar = if cli.quiet { ProgressBar::hidden() } else { ProgressBar::new(u64::from(s.rounds)) };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} round {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let compute = tally_kernels::Compute::open(s.device)?;
    if let Some(note) = &compute.note {
        eprintln!("{note}");
    }
    eprintln!("tally-sim: clients train on {}", compute.description);
    let device = compute.device.clone();
    let started = std::time::Instant::now();
    let mut write_err = None;
    let report = tally_sim::run(&s, &device, &mut |rec| {
        let line = serde_json::to_string(rec).map_err(std::io::Error::from).and_then(|l| writeln!(out, "{l}"));
        if let Err(e) = line.and_then(|_| out.flush()) {
            write_err.get_or_insert(e);
        }
        if rec.round > 0 {
            bar.set_position(u64::from(rec.round));
        }
        if let Some(a) = rec.test_accuracy {
            bar.set_message(format!("test accuracy {:.2}%", a * 100.0));
        }
    })?;
    bar.finish_and_clear();
    if let Some(e) = write_err {
        return Err(e).with_context(|| format!("writing {}", s.out.display()));
    }
    if let Some(path) = &cli.save_model {
        // With its metadata (tally_protocol::model_file); an FRL model also
        // gets its dense export next to it.
        let rounds = report.records.last().map(|r| r.round);
        let meta = tally_protocol::model_file::ModelMeta::of_kind(s.model.clone(), &s.kind_settings()?, rounds);
        tally_kernels::params_file::save_model(path, &meta, &report.final_model)?;
        if meta.has_dense_export() {
            let dense = tally_protocol::model_file::dense_path(path);
            tally_kernels::params_file::save_frl_dense(&dense, &meta, &report.final_model)?;
        }
    }
    let rounds = report.wall_secs_per_round.len().max(1) as f64;
    let mean_round = report.wall_secs_per_round.iter().sum::<f64>() / rounds;
    let mean_eval = report.wall_secs_eval.iter().sum::<f64>() / report.wall_secs_eval.len().max(1) as f64;
    let last = report.records.last();
    let up: u64 = report.records.iter().map(|r| r.bytes_up).sum();
    if let Some(round) = report.diverged_at {
        println!("stopped: honest local training diverged in round {round} (the global model is ruined)");
    }
    println!(
        "final test accuracy: {}",
        report.final_accuracy().map_or("not evaluated".into(), |a| format!("{:.2}%", a * 100.0))
    );
    println!(
        "rounds: {} · wall time {:.1} s · mean round {:.3} s without evaluation · central evaluation {:.3} s each · upload {:.1} MB · metrics {}",
        last.map_or(0, |r| r.round),
        started.elapsed().as_secs_f64(),
        mean_round,
        mean_eval,
        up as f64 / 1e6,
        s.out.display()
    );
    Ok(())
}

/// A rule by its name in scenario files (`mean`, `median`).
fn parse_rule(name: &str) -> Result<RuleSpec, String> {
    RuleSpec::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rule_flag_takes_the_scenario_names() {
        let cli = Cli::try_parse_from(["tally-sim", "--rule", "median"]).unwrap();
        assert_eq!(cli.rule, Some(RuleSpec::Median));
        assert_eq!(parse_rule("mean"), Ok(RuleSpec::Mean));
        assert!(Cli::try_parse_from(["tally-sim", "--rule", "trimmed-mean"]).is_err());
    }
}
