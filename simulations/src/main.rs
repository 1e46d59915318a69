//! `tally-sim` command line: run a scenario, write per-round metrics; or
//! (`tally-sim dp-stream`) run the DP continual-release experiments.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use tally_protocol::RuleSpec;
use tally_protocol::dp::Ratio;
use tally_sim::dpstream::DpStreamConfig;
use tally_sim::{PartitionSpec, Scenario};

/// Simulate a federation of Tally clients in one process (virtual clock, real
/// training, the real protocol state machines).
#[derive(Parser, Debug)]
// Subcommands are optional so that `tally-sim [flags]` keeps running a
// scenario; scenario flags and a subcommand don't mix.
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Scenario file (TOML); flags below override it. Without one, the
    /// default scenario runs: FedAvg, 20 clients (10 per round, Dirichlet
    /// α = 1) on the embedded MNIST subset, MLP 784-200-200-10, 60 rounds.
    #[arg(long, short)]
    scenario: Option<PathBuf>,
    /// Seed of everything.
    #[arg(long)]
    seed: Option<u64>,
    /// `embedded`, a directory of MNIST-format IDX files (e.g. data/mnist),
    /// `shakespeare` (embedded sample) or `shakespeare:DIR` (e.g. shakespeare:data/shakespeare).
    /// Or a file-based dataset as an inline TOML table, e.g.
    /// `{ format = "csv", train = "train.csv", test = "test.csv" }` (docs/data.md).
    #[arg(long, value_parser = parse_data)]
    data: Option<tally_kernels::data::formats::DataSpec>,
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
    /// The update kind and its settings, as the scenario's `algorithm`
    /// table, e.g. `--algorithm '{ kind = "ferret", k = 512, server_lr = 3 }'`.
    #[arg(long, value_parser = parse_algorithm)]
    algorithm: Option<tally_protocol::AlgorithmSpec>,
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

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Measure the DP continual-release mechanisms (tree counter, sparse
    /// vector MaxSum / SumSelect) against the theory: errors against T and d
    /// over many seeds, fitted slopes, SVG plots and a Markdown report.
    DpStream(Box<DpStreamArgs>),
    /// Run every scenario of a sweep file (a scenario plus a `[sweep]` table
    /// of lists: their cartesian product), in parallel; runs already
    /// completed in the output directory are reused.
    Sweep(SweepArgs),
    /// Plots (SVG and PNG) and a Markdown page from a directory of runs: a
    /// sweep's, or one holding NAME/metrics.jsonl or NAME.jsonl files.
    Report(ReportArgs),
}

/// `tally-sim sweep` flags.
#[derive(clap::Args, Debug)]
struct SweepArgs {
    /// The sweep file (TOML).
    file: PathBuf,
    /// Runs at a time (default: the available threads). Each run gets
    /// threads/jobs training threads; results do not depend on either.
    #[arg(long, short)]
    jobs: Option<usize>,
    /// The sweep's directory (default: runs/sweep/<file stem>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only list the runs (name per line), run nothing.
    #[arg(long)]
    list: bool,
    /// Don't draw progress bars.
    #[arg(long)]
    quiet: bool,
}

/// `tally-sim report` flags.
#[derive(clap::Args, Debug)]
struct ReportArgs {
    /// The directory of runs.
    dir: PathBuf,
    /// The Markdown page (default: DIR/report.md; with --column, stdout).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the plots go (default: beside the page, in <page stem>-plots/).
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Instead of the page, a table of accuracy per evaluated round: a
    /// column of run RUN's test accuracy (%) titled TITLE. Repeat, in order.
    #[arg(long, value_name = "TITLE=RUN")]
    column: Vec<String>,
    /// With --column: a column of CLEAN's accuracy minus ATTACKED's (points).
    #[arg(long, value_name = "TITLE=CLEAN:ATTACKED")]
    drop: Vec<String>,
    /// With --column: a column of RUN's malicious clients per round.
    #[arg(long, value_name = "TITLE=RUN")]
    malicious: Vec<String>,
}

/// `tally-sim dp-stream` flags. Ranges of horizons and dimensions are given
/// as base-2 exponents `A..B` (inclusive): `--count-t 6..14` is T = 2^6 … 2^14.
#[derive(clap::Args, Debug)]
struct DpStreamArgs {
    /// Directory for the CSV files and plots.
    #[arg(long, default_value = "docs/results/dp-continual")]
    out: PathBuf,
    /// The Markdown report (default: the output directory's path with `.md`).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Start from the tiny test configuration (seconds) instead of the
    /// documented one; other flags still override it.
    #[arg(long)]
    tiny: bool,
    /// Number of seeds.
    #[arg(long)]
    seeds: Option<u64>,
    /// First seed.
    #[arg(long)]
    seed_base: Option<u64>,
    /// ε of the Laplace counters, e.g. `1` or `1/2` or `0.5` (exact).
    #[arg(long, value_parser = parse_ratio)]
    epsilon: Option<Ratio>,
    /// ρ (zCDP) of the Gaussian counters and of the selection mechanisms.
    #[arg(long, value_parser = parse_ratio)]
    rho: Option<Ratio>,
    /// Counting against T: horizons 2^A..2^B.
    #[arg(long, value_parser = parse_pow2_range)]
    count_t: Option<Pow2s>,
    /// Counting against T: dimension.
    #[arg(long)]
    count_dim: Option<usize>,
    /// Counting against d: dimensions 2^A..2^B.
    #[arg(long, value_parser = parse_pow2_range)]
    count_d: Option<Pow2s>,
    /// Counting against d: horizon exponent (T = 2^E).
    #[arg(long)]
    count_d_t: Option<u32>,
    /// Selection against T: horizons 2^A..2^B.
    #[arg(long, value_parser = parse_pow2_range)]
    select_t: Option<Pow2s>,
    /// Selection against T: dimension.
    #[arg(long)]
    select_dim: Option<usize>,
    /// Selection against d: dimensions 2^A..2^B.
    #[arg(long, value_parser = parse_pow2_range)]
    select_d: Option<Pow2s>,
    /// Selection against d: horizon exponent (T = 2^E).
    #[arg(long)]
    select_d_t: Option<u32>,
    /// SVT threshold multipliers τ/τ₀ for selection against T, comma separated.
    #[arg(long, value_delimiter = ',')]
    tau_mult: Option<Vec<f64>>,
    /// Selection against T: run the tree-then-max mechanism only where T·d
    /// is at most this.
    #[arg(long)]
    tree_max_limit: Option<u64>,
    /// Selection against d: the same limit.
    #[arg(long)]
    tree_max_limit_d: Option<u64>,
    /// Worker threads (results do not depend on it).
    #[arg(long)]
    threads: Option<usize>,
    /// Don't draw a progress bar.
    #[arg(long)]
    quiet: bool,
}

/// `n`, `n/d` or a decimal `a.b`, as an exact ratio.
fn parse_ratio(s: &str) -> Result<Ratio, String> {
    let s = s.trim();
    let int = |t: &str| t.parse::<u128>().map_err(|e| format!("{t:?}: {e}"));
    let r = if let Some((n, d)) = s.split_once('/') {
        Ratio::new(int(n)?, int(d)?)
    } else if let Some((a, b)) = s.split_once('.') {
        if b.len() > 18 {
            return Err("at most 18 decimals".into());
        }
        let den = 10u128.pow(b.len() as u32);
        let whole = if a.is_empty() { 0 } else { int(a)? };
        let frac = if b.is_empty() { 0 } else { int(b)? };
        Ratio::new(whole * den + frac, den)
    } else {
        Ok(Ratio::integer(int(s)?))
    };
    let r = r.map_err(|e| e.to_string())?;
    if r.is_zero() { Err("must be positive".into()) } else { Ok(r) }
}

/// Powers of two from a `A..B` flag (a newtype: clap would take a bare
/// `Vec` for a flag given many times).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pow2s(Vec<u64>);

/// `A..B` (exponents, inclusive) as the powers of two `2^A..=2^B`.
fn parse_pow2_range(s: &str) -> Result<Pow2s, String> {
    let (a, b) = s.split_once("..").unwrap_or((s, s));
    let e = |t: &str| t.trim().parse::<u32>().map_err(|e| format!("{t:?}: {e}"));
    let (a, b) = (e(a)?, e(b)?);
    if a > b || b > 30 {
        return Err("want A..B with A <= B <= 30".into());
    }
    Ok(Pow2s((a..=b).map(|k| 1u64 << k).collect()))
}

fn dp_stream(args: &DpStreamArgs) -> anyhow::Result<()> {
    let mut cfg = if args.tiny { DpStreamConfig::tiny() } else { DpStreamConfig::default() };
    macro_rules! over {
        ($($f:ident => $g:ident),*) => { $( if let Some(v) = args.$f.clone() { cfg.$g = v; } )* };
    }
    over!(seeds => seeds, seed_base => seed_base, epsilon => epsilon, rho => rho, count_dim => count_dim,
        select_dim => select_dim, tau_mult => tau_multipliers, tree_max_limit => tree_max_limit,
        tree_max_limit_d => tree_max_limit_d, threads => threads);
    if let Some(v) = &args.count_t {
        cfg.count_horizons.clone_from(&v.0);
    }
    if let Some(v) = &args.select_t {
        cfg.select_horizons.clone_from(&v.0);
    }
    if let Some(v) = &args.count_d {
        cfg.count_dims = v.0.iter().map(|&d| d as usize).collect();
    }
    if let Some(v) = &args.select_d {
        cfg.select_dims = v.0.iter().map(|&d| d as usize).collect();
    }
    if let Some(e) = args.count_d_t {
        cfg.count_dim_horizon = 1u64.checked_shl(e).filter(|_| e <= 30).context("--count-d-t at most 30")?;
    }
    if let Some(e) = args.select_d_t {
        cfg.select_dim_horizon = 1u64.checked_shl(e).filter(|_| e <= 30).context("--select-d-t at most 30")?;
    }
    cfg.validate()?;
    let report = args.report.clone().unwrap_or_else(|| args.out.with_extension("md"));
    // The command as typed, minus the binary's path, for the report.
    let command =
        std::iter::once("tally-sim".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ");
    let bar = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} cells×seeds [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let outputs = tally_sim::dpstream::run(&cfg, &args.out, &report, &command, &|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    for f in &outputs.fits {
        if f.statistic != "mean" && f.against != "L" {
            println!(
                "{:9} {:10} {:22} {:5} vs {}: slope {:6.3} (theory curve {:6.3})",
                f.experiment, f.problem, f.mechanism, f.statistic, f.against, f.slope, f.theory_slope
            );
        }
    }
    println!(
        "wrote {} files (report {}) in {:.1} s",
        outputs.files.len(),
        report.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: log files and tests read plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::DpStream(args)) => return dp_stream(args),
        Some(Command::Sweep(args)) => return sweep(args),
        Some(Command::Report(args)) => return report(args),
        None => {}
    }
    let mut s = match &cli.scenario {
        Some(p) => Scenario::from_file(p)?,
        None => Scenario::default(),
    };
    macro_rules! over {
        ($($f:ident),*) => { $( if let Some(v) = cli.$f.clone() { s.$f = v; } )* };
    }
    over!(seed, data, clients, clients_per_round, rounds, rule, algorithm, eval_every, out, device);
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
    // The same rows as CSV, and what the run was, beside the JSON lines
    // (one schema with tally-server's: docs/metrics.md).
    let files = tally_sim::output::RunFiles::new(&s.out);
    std::fs::write(&files.csv, tally_sim::output::csv(&report.records))
        .with_context(|| format!("writing {}", files.csv.display()))?;
    let summary = tally_sim::output::summary(
        &s,
        &report,
        &report.records,
        &files,
        started.elapsed().as_secs_f64(),
        &compute.description,
    );
    tally_sim::output::write_atomically(&files.summary, &format!("{summary:#}\n"))?;
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
    let local = report.wall_secs_local_work / rounds;
    // `threads = 0` means one per core, as the driver resolves it.
    let threads = match s.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    println!(
        "rounds: {} · wall time {:.1} s · mean round {:.3} s without evaluation ({:.3} s local work on {} threads, {:.3} s serial) · central evaluation {:.3} s each · upload {:.1} MB · metrics {}",
        last.map_or(0, |r| r.round),
        started.elapsed().as_secs_f64(),
        mean_round,
        local,
        threads,
        (mean_round - local).max(0.0),
        mean_eval,
        up as f64 / 1e6,
        s.out.display()
    );
    Ok(())
}

fn sweep(args: &SweepArgs) -> anyhow::Result<()> {
    let sw = tally_sim::sweep::from_file(&args.file)?;
    if args.list {
        for r in &sw.runs {
            println!("{}", r.name);
        }
        return Ok(());
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = args.jobs.unwrap_or(threads).max(1);
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs/sweep").join(args.file.file_stem().map_or_else(|| "sweep".into(), |s| s.to_owned()))
    });
    let opts = tally_sim::sweep::SweepOptions { jobs, threads, out: out.clone(), quiet: args.quiet };
    eprintln!(
        "tally-sim sweep: {} runs, {} at a time, {} training threads each, in {}",
        sw.runs.len(),
        jobs.min(sw.runs.len()),
        opts.run_threads(),
        out.display()
    );
    let started = std::time::Instant::now();
    let entries = tally_sim::sweep::run(&sw, &opts)?;
    let mut failed = 0;
    for e in &entries {
        let acc = e.final_accuracy.map_or("not evaluated".into(), |a| format!("{:.2}%", a * 100.0));
        match &e.status {
            tally_sim::sweep::RunStatus::Failed(why) => {
                failed += 1;
                println!("{}: FAILED: {why}", e.name);
            }
            tally_sim::sweep::RunStatus::Reused => println!("{}: {acc} (reused)", e.name),
            tally_sim::sweep::RunStatus::Done => println!("{}: {acc}", e.name),
        }
    }
    println!(
        "{} runs ({} failed) in {:.1} s · index {}",
        entries.len(),
        failed,
        started.elapsed().as_secs_f64(),
        out.join("index.json").display()
    );
    anyhow::ensure!(failed == 0, "{failed} of {} runs failed", entries.len());
    Ok(())
}

fn report(args: &ReportArgs) -> anyhow::Result<()> {
    use tally_sim::report::{Column, parse_title_run};
    if !args.column.is_empty() || !args.drop.is_empty() || !args.malicious.is_empty() {
        let err = |e: String| anyhow::anyhow!(e);
        let mut columns = Vec::new();
        for c in &args.column {
            let (title, run) = parse_title_run(c).map_err(err)?;
            columns.push(Column::Accuracy { title, run });
        }
        for c in &args.drop {
            let (title, pair) = parse_title_run(c).map_err(err)?;
            let (clean, attacked) =
                pair.split_once(':').with_context(|| format!("--drop {c:?}: want TITLE=CLEAN:ATTACKED"))?;
            columns.push(Column::Drop { title, clean: clean.into(), attacked: attacked.into() });
        }
        for c in &args.malicious {
            let (title, run) = parse_title_run(c).map_err(err)?;
            columns.push(Column::Malicious { title, run });
        }
        let runs = tally_sim::report::load_runs(&args.dir)?;
        let table = tally_sim::report::round_table(&runs, &columns)?;
        match &args.out {
            Some(p) => std::fs::write(p, table).with_context(|| format!("writing {}", p.display()))?,
            None => print!("{table}"),
        }
        return Ok(());
    }
    let page = args.out.clone().unwrap_or_else(|| args.dir.join("report.md"));
    let plots = args.plots.clone().unwrap_or_else(|| {
        let stem = page.file_stem().map_or_else(|| "report".into(), |s| s.to_string_lossy().into_owned());
        page.parent().unwrap_or(std::path::Path::new("")).join(format!("{stem}-plots"))
    });
    let files = tally_sim::report::report(&args.dir, &page, &plots)?;
    println!("wrote {} files (page {})", files.len(), page.display());
    Ok(())
}

/// An `algorithm` table as written in scenario files, inline.
fn parse_algorithm(text: &str) -> Result<tally_protocol::AlgorithmSpec, String> {
    #[derive(serde::Deserialize)]
    struct One {
        algorithm: tally_protocol::AlgorithmSpec,
    }
    toml::from_str::<One>(&format!("algorithm = {text}")).map(|o| o.algorithm).map_err(|e| e.to_string())
}

/// A rule by its name in scenario files (`mean`, `median`).
fn parse_rule(name: &str) -> Result<RuleSpec, String> {
    RuleSpec::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name))
        .map_err(|e| e.to_string())
}

/// `--data`: a name or an inline TOML table ([`DataSpec::parse_arg`](tally_kernels::data::formats::DataSpec::parse_arg)).
fn parse_data(arg: &str) -> Result<tally_kernels::data::formats::DataSpec, String> {
    tally_kernels::data::formats::DataSpec::parse_arg(arg).map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_flag_takes_an_inline_table() {
        let cli = Cli::try_parse_from(["tally-sim", "--algorithm", "{ kind = \"ferret\", k = 64 }"]).unwrap();
        assert!(matches!(cli.algorithm, Some(tally_protocol::AlgorithmSpec::Ferret(f)) if f.k == 64));
        assert!(Cli::try_parse_from(["tally-sim", "--algorithm", "{ kind = \"ferret\", K = 64 }"]).is_err());
        assert!(Cli::try_parse_from(["tally-sim", "--algorithm", "ferret"]).is_err());
    }

    #[test]
    fn rule_flag_takes_the_scenario_names() {
        let cli = Cli::try_parse_from(["tally-sim", "--rule", "median"]).unwrap();
        assert_eq!(cli.rule, Some(RuleSpec::Median));
        assert_eq!(parse_rule("mean"), Ok(RuleSpec::Mean));
        assert!(Cli::try_parse_from(["tally-sim", "--rule", "trimmed-mean"]).is_err());
    }

    #[test]
    fn dp_stream_subcommand_parses_without_changing_the_default_invocation() {
        let cli = Cli::try_parse_from(["tally-sim", "--rounds", "3", "--quiet"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.rounds, Some(3));
        let cli = Cli::try_parse_from([
            "tally-sim",
            "dp-stream",
            "--out",
            "x",
            "--rho",
            "1/2",
            "--epsilon",
            "0.25",
            "--count-t",
            "6..8",
            "--tau-mult",
            "0.5,1",
        ])
        .unwrap();
        let Some(Command::DpStream(a)) = cli.command else { panic!("no subcommand") };
        let a = *a;
        assert_eq!(a.rho, Some(Ratio::new(1, 2).unwrap()));
        assert_eq!(a.epsilon, Some(Ratio::new(1, 4).unwrap()));
        assert_eq!(a.count_t, Some(Pow2s(vec![64, 128, 256])));
        assert_eq!(a.tau_mult, Some(vec![0.5, 1.0]));
        // Scenario flags and the subcommand don't mix.
        assert!(Cli::try_parse_from(["tally-sim", "--rounds", "3", "dp-stream"]).is_err());
        assert!(parse_ratio("0").is_err() && parse_ratio("1/0").is_err());
        assert!(parse_pow2_range("9..3").is_err());
    }
}
