//! Sweeps: one file, many runs (`tally-sim sweep`).
//!
//! A sweep file is an ordinary scenario file (the *base*) plus a `[sweep]`
//! table. Every entry of `[sweep]` is a scenario field — a dotted path for a
//! field inside a table: `attack.fraction`, `network.dropout`, `train.lr` —
//! and a **list** of the values it takes; the runs are the cartesian product
//! of the lists, each the base with those values put in:
//!
//! ```toml
//! rounds = 10
//! attack = { kind = "scale", fraction = 0.0 }
//!
//! [sweep]
//! seed = [1, 2]
//! rule = ["mean", { kind = "trimmed-mean", trim = 2 }]
//! attack.fraction = [0.0, 0.1, 0.2]
//! ```
//!
//! is 2 × 2 × 3 = 12 runs. A value replaces the whole field (a table
//! replaces the whole table); shallower paths are put in first, so
//! `attack = [...]` with `"attack.fraction" = [...]` sets each fraction in
//! each attack (TOML wants the dotted key quoted beside a list of the same
//! name; a quoted dotted key is a path like any other). A field whose own values are lists (`train_range`) takes a
//! list of lists. Files without `[sweep]` are one run, and ordinary
//! scenario files never have one (the scenario refuses unknown fields), so
//! the two kinds of files cannot be confused.
//!
//! Each run is named by the values that vary across the sweep, paths in
//! alphabetical order: `attack.fraction=0.1,rule=trimmed-mean+trim=2,seed=1`
//! (a table is its `kind`, then `+key=value` for its other keys in
//! alphabetical order; characters other than letters, digits and `._+=-`
//! become `-`). Names depend only on the values, not on their order in the
//! lists, so a run keeps its name (and its directory) when a list grows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::Context;
use serde::Serialize;

use crate::output::{self, RunFiles};
use crate::{AttackSuccessKind, DataSource, RoundRecord, Scenario, ScenarioError, SimData};

/// One run of a sweep.
#[derive(Debug, Clone)]
pub struct SweepRun {
    /// Its name (see the module docs), also its directory's.
    pub name: String,
    /// The values of the sweep's fields in this run (path, value), paths
    /// in alphabetical order.
    pub values: Vec<(String, toml::Value)>,
    /// The scenario (its `out` not yet set).
    pub scenario: Scenario,
}

/// A sweep file, expanded.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// The swept fields and their values, paths in alphabetical order.
    pub axes: Vec<(String, Vec<toml::Value>)>,
    /// The runs, in product order (the first axis varies slowest).
    pub runs: Vec<SweepRun>,
}

fn invalid(msg: String) -> ScenarioError {
    ScenarioError::Invalid(msg)
}

/// Reads and expands a sweep file; every run is validated.
pub fn from_file(path: &Path) -> Result<Sweep, ScenarioError> {
    let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io { path: path.into(), source })?;
    expand(&text).map_err(|e| match e {
        ScenarioError::Parse { message, .. } => ScenarioError::Parse { path: path.into(), message },
        other => other,
    })
}

/// Expands a sweep file's text (see the module docs); every run is
/// validated, and errors name the field (`sweep.attack.fraction`, …) or the
/// run.
pub fn expand(text: &str) -> Result<Sweep, ScenarioError> {
    let mut base: toml::Table =
        toml::from_str(text).map_err(|e| ScenarioError::Parse { path: PathBuf::new(), message: e.to_string() })?;
    let mut axes = Vec::new();
    match base.remove("sweep") {
        None => {}
        Some(toml::Value::Table(t)) => flatten("", &t, &mut axes)?,
        Some(_) => return Err(invalid("sweep must be a table of lists, e.g. `[sweep]` then `seed = [1, 2]`".into())),
    }
    axes.sort_by(|a, b| a.0.cmp(&b.0));
    // Shallower paths first, so that a whole table is put in before the
    // fields inside it; otherwise in name order.
    let mut apply_order: Vec<usize> = (0..axes.len()).collect();
    apply_order.sort_by_key(|&i| (axes[i].0.matches('.').count(), i));
    let total = axes.iter().try_fold(1usize, |n, (_, v)| n.checked_mul(v.len()));
    let total = total.filter(|&n| n <= 1_000_000).ok_or_else(|| invalid("sweep: more than 10^6 runs".into()))?;
    let mut runs: Vec<SweepRun> = Vec::with_capacity(total);
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for k in 0..total {
        // Odometer: the last axis varies fastest.
        let mut pick = vec![0; axes.len()];
        let mut rest = k;
        for (i, (_, values)) in axes.iter().enumerate().rev() {
            pick[i] = rest % values.len();
            rest /= values.len();
        }
        let mut table = base.clone();
        for &i in &apply_order {
            set_path(&mut table, &axes[i].0, axes[i].1[pick[i]].clone())?;
        }
        let values: Vec<(String, toml::Value)> =
            axes.iter().zip(&pick).map(|((p, v), &j)| (p.clone(), v[j].clone())).collect();
        let name = run_name(&axes, &values);
        let scenario = match toml::Value::Table(table).try_into::<Scenario>() {
            Ok(s) => s,
            Err(e) => return Err(blame(&base, &axes, &name, &e.to_string())),
        };
        scenario.validate().map_err(|e| invalid(format!("sweep run {name}: {e}")))?;
        if let Some(&other) = names.get(&name) {
            return Err(invalid(format!(
                "sweep: runs {other} and {k} have the same name {name} (two list entries of a field that render alike?)"
            )));
        }
        names.insert(name.clone(), k);
        runs.push(SweepRun { name, values, scenario });
    }
    Ok(Sweep { axes, runs })
}

/// A run that does not make a scenario: names the sweep entry whose value
/// alone breaks the base, if one does, else the run.
fn blame(base: &toml::Table, axes: &[(String, Vec<toml::Value>)], name: &str, err: &str) -> ScenarioError {
    for (path, values) in axes {
        for (j, v) in values.iter().enumerate() {
            let mut t = base.clone();
            if set_path(&mut t, path, v.clone()).is_err() {
                continue;
            }
            if let Err(e) = toml::Value::Table(t).try_into::<Scenario>() {
                // Only if the base alone is fine: otherwise it is the base.
                if toml::Value::Table(base.clone()).try_into::<Scenario>().is_ok() {
                    return invalid(format!("sweep.{path}[{j}] = {v}: {}", e.to_string().trim()));
                }
            }
        }
    }
    invalid(format!("sweep run {name}: {}", err.trim()))
}

/// The `[sweep]` table's lists, by dotted path.
fn flatten(prefix: &str, t: &toml::Table, out: &mut Vec<(String, Vec<toml::Value>)>) -> Result<(), ScenarioError> {
    for (k, v) in t {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Array(a) if a.is_empty() => {
                return Err(invalid(format!("sweep.{path}: an empty list (no runs)")));
            }
            toml::Value::Array(a) => out.push((path, a.clone())),
            toml::Value::Table(inner) => flatten(&path, inner, out)?,
            other => {
                return Err(invalid(format!(
                    "sweep.{path}: must be a list of the values to sweep, e.g. [{other}], not {other}"
                )));
            }
        }
    }
    Ok(())
}

/// Puts `value` at `path` (dotted) in `t`, creating missing tables.
fn set_path(t: &mut toml::Table, path: &str, value: toml::Value) -> Result<(), ScenarioError> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let mut cur = t;
    let mut walked = String::new();
    for p in parts {
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(p);
        let entry = cur.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(inner) => inner,
            _ => return Err(invalid(format!("sweep.{path}: {walked} is not a table in the scenario"))),
        };
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

/// The name of a run: `path=label` of each field with more than one
/// value, joined by `,`; `base` when nothing varies.
fn run_name(axes: &[(String, Vec<toml::Value>)], values: &[(String, toml::Value)]) -> String {
    let parts: Vec<String> = axes
        .iter()
        .zip(values)
        .filter(|((_, vs), _)| vs.len() > 1)
        .map(|((p, _), (_, v))| format!("{p}={}", label(v)))
        .collect();
    if parts.is_empty() {
        return "base".into();
    }
    parts.join(",").chars().map(|c| if c.is_ascii_alphanumeric() || "._+=-,".contains(c) { c } else { '-' }).collect()
}

/// A value in a run name.
pub fn label(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(a) => a.iter().map(label).collect::<Vec<_>>().join("-"),
        toml::Value::Table(t) => {
            let mut parts: Vec<String> = t.get("kind").map(label).into_iter().collect();
            let mut keys: Vec<&String> = t.keys().filter(|k| *k != "kind").collect();
            keys.sort();
            parts.extend(keys.into_iter().map(|k| format!("{k}={}", label(&t[k]))));
            parts.join("+")
        }
    }
}

/// Whether a scenario is a clean run: no attack, or no malicious client.
pub fn is_clean(s: &Scenario) -> bool {
    s.attack.as_ref().is_none_or(|a| a.fraction() == 0.0)
}

/// What a run and its same-seed clean run share: the scenario without its
/// attack, output path and thread count.
fn clean_key(s: &Scenario) -> String {
    let s = Scenario { attack: None, out: PathBuf::new(), threads: 0, ..s.clone() };
    serde_json::to_string(&s).unwrap_or_default()
}

/// For each run, the index of its same-seed clean run in the sweep (for
/// attacked runs whose attack success is an accuracy drop), if any.
pub fn baselines(runs: &[SweepRun]) -> Vec<Option<usize>> {
    let clean: Vec<(usize, String)> = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| is_clean(&r.scenario))
        .map(|(i, r)| (i, clean_key(&r.scenario)))
        .collect();
    runs.iter()
        .map(|r| {
            let drop = crate::attack_success_kind(r.scenario.attack.as_ref()) == Some(AttackSuccessKind::AccuracyDrop);
            if !drop || is_clean(&r.scenario) {
                return None;
            }
            let key = clean_key(&r.scenario);
            clean.iter().find(|(_, k)| *k == key).map(|(i, _)| *i)
        })
        .collect()
}

/// How to run a sweep.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// Runs at a time.
    pub jobs: usize,
    /// Threads of the machine, shared among the runs.
    pub threads: usize,
    /// The sweep's directory: one directory per run, and `index.json`.
    pub out: PathBuf,
    /// No progress bars.
    pub quiet: bool,
}

impl SweepOptions {
    /// Each run's thread budget: the machine's threads over the jobs.
    pub fn run_threads(&self) -> usize {
        (self.threads / self.jobs.max(1)).max(1)
    }
}

/// How a run of the sweep ended.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// Completed now.
    Done,
    /// Completed by an earlier invocation (its summary matched the scenario).
    Reused,
    /// Failed, with the error.
    Failed(String),
}

/// One line of the sweep's index.
#[derive(Debug, Clone, Serialize)]
pub struct IndexEntry {
    /// The run's name.
    pub name: String,
    /// Its directory, relative to the sweep's.
    pub dir: String,
    /// The swept fields' values in this run.
    pub values: BTreeMap<String, serde_json::Value>,
    /// The same-seed clean run whose accuracy the attack success is
    /// measured against, if any.
    pub baseline: Option<String>,
    /// How it ended.
    pub status: RunStatus,
    /// Accuracy after the last round, if evaluated.
    pub final_accuracy: Option<f64>,
    /// Best evaluated accuracy.
    pub best_accuracy: Option<f64>,
}

/// How a run ended, its final and best accuracy.
type Outcome = (RunStatus, Option<f64>, Option<f64>);

/// What a finished run leaves for the runs that wait on it.
#[derive(Debug, Clone)]
enum Slot {
    Pending,
    /// Accuracy per evaluated round (for attacked runs' drops).
    Done(Arc<BTreeMap<u32, f64>>),
    Failed,
}

fn lock(m: &Mutex<Vec<Slot>>) -> std::sync::MutexGuard<'_, Vec<Slot>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The run's files in the sweep directory.
pub fn run_files(out: &Path, name: &str) -> RunFiles {
    RunFiles::new(&out.join(name).join("metrics.jsonl"))
}

/// The scenario as compared for reuse: without the thread count, which the
/// sweep sets and the results do not depend on.
fn reuse_key(s: &Scenario) -> serde_json::Value {
    normalise(serde_json::to_value(s).unwrap_or_default())
}

/// A scenario's JSON without its thread count and output path (the sweep
/// sets both, and neither changes the results).
fn normalise(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        o.insert("threads".into(), 0.into());
        o.insert("out".into(), "".into());
    }
    v
}

/// A completed run's per-round accuracies, if `files` hold a completed
/// run of `s` (its summary is written last and names the same scenario)
/// whose attack success was measured against the same clean run
/// (`baseline`: a run made when the sweep had no clean run is redone once
/// it has one).
fn completed(files: &RunFiles, s: &Scenario, baseline: Option<&str>) -> Option<BTreeMap<u32, f64>> {
    let mut summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&files.summary).ok()?).ok()?;
    let stored = normalise(summary.get("scenario")?.clone());
    let schema = summary.get("metrics_schema")?.as_u64()?;
    let current = u64::from(tally_protocol::metrics::SCHEMA_VERSION);
    if stored != reuse_key(s)
        || (schema != current && !UPGRADABLE_SCHEMAS.contains(&schema))
        || summary.get("attack_baseline").and_then(|b| b.as_str()) != baseline
    {
        return None;
    }
    let jsonl = std::fs::read_to_string(&files.jsonl).ok()?;
    let acc = accuracies(&jsonl)?;
    if schema != current {
        // Its rows are current rows; its CSV gains the new (empty) columns,
        // so that it is byte for byte what a fresh run writes, and its
        // summary (written last, as by a run) says the current version.
        let rows: Vec<serde_json::Map<String, serde_json::Value>> = jsonl
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).ok())
            .collect::<Option<_>>()?;
        output::write_atomically(&files.csv, &tally_protocol::metrics::to_csv(&rows)).ok()?;
        summary.as_object_mut()?.insert("metrics_schema".into(), current.into());
        output::write_atomically(&files.summary, &format!("{summary:#}\n")).ok()?;
    }
    Some(acc)
}

/// Older metrics schemas whose completed runs a sweep still reuses:
/// version 3 only added the columns of private kinds, which a version-2 run
/// (never private) leaves empty, so its rows are valid version-3 rows.
/// Reusing one rewrites its CSV with the current columns and relabels its
/// summary.
const UPGRADABLE_SCHEMAS: &[u64] = &[2];

/// `round → test_accuracy` of the evaluated rows of a JSON-lines file.
fn accuracies(jsonl: &str) -> Option<BTreeMap<u32, f64>> {
    let mut out = BTreeMap::new();
    for line in jsonl.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        if let (Some(r), Some(a)) =
            (v.get("round").and_then(|r| r.as_u64()), v.get("test_accuracy").and_then(|a| a.as_f64()))
        {
            out.insert(r as u32, a);
        }
    }
    Some(out)
}

/// Runs a sweep: `jobs` runs at a time, clean runs first (attacked runs
/// measure their drop against them), each with its share of the threads;
/// completed runs are reused. Writes each run's files and `index.json`.
/// A run's files depend only on its scenario (and its clean run's, which
/// depends only on its own), never on the scheduling.
pub fn run(sweep: &Sweep, opts: &SweepOptions) -> anyhow::Result<Vec<IndexEntry>> {
    use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let runs = &sweep.runs;
    let base_of = baselines(runs);
    // Clean runs first, then the others, each in sweep order.
    let mut order: Vec<usize> = (0..runs.len()).filter(|&i| is_clean(&runs[i].scenario)).collect();
    order.extend((0..runs.len()).filter(|&i| !is_clean(&runs[i].scenario)));
    let slots = Mutex::new(vec![Slot::Pending; runs.len()]);
    let changed = Condvar::new();
    let statuses: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; runs.len()]);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let multi = MultiProgress::with_draw_target(if opts.quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let total_bar = multi.add(ProgressBar::new(runs.len() as u64));
    total_bar.set_style(
        ProgressStyle::with_template("sweep {bar:30} {pos}/{len} runs {msg} [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let data_cache: Mutex<BTreeMap<String, Arc<SimData>>> = Mutex::new(BTreeMap::new());
    let run_threads = opts.run_threads();

    let work = |i: usize| -> anyhow::Result<Outcome> {
        let r = &runs[i];
        let files = run_files(&opts.out, &r.name);
        let mut s = r.scenario.clone();
        s.out = files.jsonl.clone();
        s.threads = if s.threads == 0 { run_threads } else { s.threads.min(run_threads) };
        let baseline = base_of[i].map(|b| runs[b].name.as_str());
        if let Some(acc) = completed(&files, &s, baseline) {
            let (last, best) = (acc.values().last().copied(), acc.values().copied().reduce(f64::max));
            lock(&slots)[i] = Slot::Done(Arc::new(acc));
            changed.notify_all();
            return Ok((RunStatus::Reused, last, best));
        }
        let dir = opts.out.join(&r.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // A half-written run is redone from scratch: its summary goes first.
        for p in [&files.summary, &files.jsonl, &files.csv] {
            if p.exists() {
                std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
        if let Ok(text) = toml::to_string(&s) {
            std::fs::write(dir.join("scenario.toml"), text)?;
        }
        let data = match DataSource::of(&s.data) {
            DataSource::Mnist(_) | DataSource::Files(_) => {
                let mut cache = data_cache.lock().unwrap_or_else(|p| p.into_inner());
                match cache.get(&s.data.to_string()) {
                    Some(d) => d.clone(),
                    None => {
                        let d = Arc::new(crate::load_scenario_data(&s)?);
                        cache.insert(s.data.to_string(), d.clone());
                        d
                    }
                }
            }
            DataSource::Shakespeare(_) => Arc::new(crate::load_scenario_data(&s)?),
        };
        let compute = tally_kernels::Compute::open(s.device)?;
        let bar = multi.add(ProgressBar::new(u64::from(s.rounds)));
        bar.set_style(
            ProgressStyle::with_template("  {prefix} {bar:20} round {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(r.name.clone());
        let started = std::time::Instant::now();
        let report = crate::run_on_data(&s, &data, &compute.device, &mut |rec| {
            bar.set_position(u64::from(rec.round));
            if let Some(a) = rec.test_accuracy {
                bar.set_message(format!("{:.2}%", a * 100.0));
            }
        });
        bar.finish_and_clear();
        multi.remove(&bar);
        let report = report?;
        let mut records = report.records.clone();
        // The drop against the clean run, once it has finished.
        if let Some(b) = base_of[i] {
            let mut guard = lock(&slots);
            while matches!(guard[b], Slot::Pending) {
                guard = changed.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
            if let Slot::Done(clean) = &guard[b] {
                fill_drop(&mut records, clean);
            }
        }
        let mut jsonl = String::new();
        for rec in &records {
            jsonl.push_str(&output::json_line(rec)?);
            jsonl.push('\n');
        }
        std::fs::write(&files.jsonl, jsonl).with_context(|| format!("writing {}", files.jsonl.display()))?;
        std::fs::write(&files.csv, output::csv(&records))
            .with_context(|| format!("writing {}", files.csv.display()))?;
        let mut summary =
            output::summary(&s, &report, &records, &files, started.elapsed().as_secs_f64(), &compute.description);
        if let Some(o) = summary.as_object_mut() {
            o.insert("attack_baseline".into(), baseline.into());
        }
        output::write_atomically(&files.summary, &format!("{summary:#}\n"))?;
        let acc: BTreeMap<u32, f64> = records.iter().filter_map(|r| r.test_accuracy.map(|a| (r.round, a))).collect();
        let (last, best) = (records.last().and_then(|r| r.test_accuracy), acc.values().copied().reduce(f64::max));
        lock(&slots)[i] = Slot::Done(Arc::new(acc));
        changed.notify_all();
        Ok((RunStatus::Done, last, best))
    };

    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.max(1).min(runs.len()) {
            scope.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&i) = order.get(k) else { break };
                    let result = work(i);
                    let status = match result {
                        Ok(s) => s,
                        Err(e) => {
                            lock(&slots)[i] = Slot::Failed;
                            changed.notify_all();
                            (RunStatus::Failed(format!("{e:#}")), None, None)
                        }
                    };
                    statuses.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(status);
                    total_bar.inc(1);
                }
            });
        }
    });
    total_bar.finish_and_clear();
    let statuses = statuses.into_inner().unwrap_or_else(|p| p.into_inner());
    let entries: Vec<IndexEntry> = runs
        .iter()
        .zip(statuses)
        .zip(&base_of)
        .map(|((r, st), b)| {
            let (status, final_accuracy, best_accuracy) =
                st.unwrap_or((RunStatus::Failed("not run".into()), None, None));
            IndexEntry {
                name: r.name.clone(),
                dir: r.name.clone(),
                values: r
                    .values
                    .iter()
                    .map(|(p, v)| (p.clone(), serde_json::to_value(v).unwrap_or_default()))
                    .collect(),
                baseline: b.map(|b| runs[b].name.clone()),
                status,
                final_accuracy,
                best_accuracy,
            }
        })
        .collect();
    let index = serde_json::json!({
        "metrics_schema": tally_protocol::metrics::SCHEMA_VERSION,
        "axes": sweep.axes.iter().map(|(p, v)| serde_json::json!({"field": p, "values": serde_json::to_value(v).unwrap_or_default()})).collect::<Vec<_>>(),
        "runs": entries,
    });
    output::write_atomically(&opts.out.join("index.json"), &format!("{index:#}\n"))?;
    Ok(entries)
}

/// Each evaluated row's attack success: the clean run's accuracy in the
/// same round minus this run's (`null` where either was not evaluated).
///
/// One exception: the last row of a run that stopped before the clean run
/// ended (a model the attack ruined ends the run, as FRL's code does) is
/// compared with the clean run's **final** accuracy when the clean run did
/// not evaluate that round. The attacked run's last model is its result, so
/// what the attack cost is the clean run's result minus it; comparing with
/// nothing (`null`) would hide the attacks that work best.
pub fn fill_drop(records: &mut [RoundRecord], clean: &BTreeMap<u32, f64>) {
    let clean_last = clean.last_key_value();
    let last_round = records.last().map(|r| r.round);
    for rec in records {
        if rec.attack_success.is_some() {
            let same_round = clean.get(&rec.round).copied();
            let stopped_early = match (clean_last, last_round) {
                (Some((&c, _)), Some(l)) => rec.round == l && l < c,
                _ => false,
            };
            let reference = same_round.or_else(|| stopped_early.then(|| clean_last.map(|(_, &a)| a)).flatten());
            rec.attack_success = Some(rec.test_accuracy.and_then(|a| reference.map(|c| c - a)));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// A completed run written under metrics schema 2 is reused, and
    /// upgraded: its CSV is rewritten with the current columns (what a
    /// fresh run writes from the same rows) and its summary relabelled. A
    /// run of an unknown older schema is redone.
    #[test]
    fn runs_of_schema_2_are_reused_and_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let files = run_files(dir.path(), "a");
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        let s = Scenario::default();
        let rows = [
            r#"{"round":0,"sampled":0,"accepted":0,"test_accuracy":0.1,"model_hash":"ab","seed":1}"#,
            r#"{"round":1,"sampled":3,"accepted":3,"test_accuracy":0.6,"model_hash":"cd","seed":1}"#,
        ];
        std::fs::write(&files.jsonl, rows.join("\n") + "\n").unwrap();
        std::fs::write(&files.csv, "round,old\n").unwrap();
        let summary = |schema: u64| {
            serde_json::json!({ "scenario": serde_json::to_value(&s).unwrap(), "metrics_schema": schema }).to_string()
        };
        std::fs::write(&files.summary, summary(1)).unwrap();
        assert_eq!(completed(&files, &s, None), None, "schema 1 is redone");
        std::fs::write(&files.summary, summary(2)).unwrap();
        let acc = completed(&files, &s, None).unwrap();
        assert_eq!(acc, [(0, 0.1), (1, 0.6)].into());
        let parsed: Vec<serde_json::Map<String, serde_json::Value>> =
            rows.iter().map(|r| serde_json::from_str(r).unwrap()).collect();
        assert_eq!(std::fs::read_to_string(&files.csv).unwrap(), tally_protocol::metrics::to_csv(&parsed));
        let relabelled: serde_json::Value = serde_json::from_slice(&std::fs::read(&files.summary).unwrap()).unwrap();
        assert_eq!(relabelled["metrics_schema"], tally_protocol::metrics::SCHEMA_VERSION);
        assert_eq!(completed(&files, &s, None).unwrap(), acc);
    }

    #[test]
    fn lists_in_the_sweep_table_expand_into_named_runs() {
        let text = r#"
            clients = 6
            clients_per_round = 3
            attack = { kind = "scale", fraction = 0.0 }
            [sweep]
            seed = [1, 2]
            rule = ["mean", { kind = "trimmed-mean", trim = 1 }]
            attack.fraction = [0.0, 0.2]
        "#;
        let sw = expand(text).unwrap();
        assert_eq!(sw.runs.len(), 8);
        let names: Vec<&str> = sw.runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names[0], "attack.fraction=0,rule=mean,seed=1");
        assert_eq!(names[7], "attack.fraction=0.2,rule=trimmed-mean+trim=1,seed=2");
        let last = &sw.runs[7].scenario;
        assert_eq!((last.seed, last.rule), (2, tally_protocol::RuleSpec::TrimmedMean { trim: 1 }));
        assert_eq!(last.attack.as_ref().unwrap().fraction(), 0.2);
        assert_eq!(last.clients, 6);
        // Clean runs are the baselines of their same-seed, same-rule attacked runs.
        let b = baselines(&sw.runs);
        assert_eq!(b[4], Some(0));
        assert_eq!(b[7], Some(3));
        assert_eq!(b[0], None);
        // Names don't depend on the order of the lists.
        let swapped = text.replace("seed = [1, 2]", "seed = [2, 1]");
        let mut other: Vec<String> = expand(&swapped).unwrap().runs.into_iter().map(|r| r.name).collect();
        other.sort();
        let mut mine: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        mine.sort();
        assert_eq!(mine, other);
    }

    #[test]
    fn whole_tables_go_in_before_the_fields_inside_them() {
        let text = r#"
            [sweep]
            attack = [{ kind = "scale", fraction = 0.0, scale = 10.0 }]
            "attack.fraction" = [0.1, 0.3]
            algorithm = [{ kind = "fedavg" }, { kind = "fedavgm", momentum = 0.9 }]
        "#;
        let sw = expand(text).unwrap();
        assert_eq!(sw.runs.len(), 4);
        assert!(sw.runs.iter().all(|r| r.scenario.attack.is_some()));
        assert_eq!(sw.runs[1].scenario.attack.as_ref().unwrap().fraction(), 0.3);
        assert_eq!(sw.runs[3].name, "algorithm=fedavgm+momentum=0.9,attack.fraction=0.3");
    }

    #[test]
    fn checked_in_sweeps_expand_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sweeps");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let sw = from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(sw.runs.len() > 1, "{}", path.display());
                n += 1;
            }
        }
        assert!(n >= 1);
    }

    #[test]
    fn a_file_without_a_sweep_table_is_one_run() {
        let sw = expand("rounds = 3").unwrap();
        assert_eq!(sw.runs.len(), 1);
        assert_eq!(sw.runs[0].name, "base");
        assert_eq!(sw.runs[0].scenario.rounds, 3);
    }

    #[test]
    fn errors_name_the_field() {
        let err = |t: &str| expand(t).unwrap_err().to_string();
        assert!(err("[sweep]\nseed = 3").contains("sweep.seed: must be a list"), "{}", err("[sweep]\nseed = 3"));
        assert!(err("[sweep]\nseed = []").contains("sweep.seed: an empty list"));
        let e = err("[sweep]\nseed = [1, \"two\"]");
        assert!(e.contains("sweep.seed[1]"), "{e}");
        let e = err("[sweep]\nrounds.x = [1]");
        assert!(e.contains("sweep.rounds.x[0]") && e.contains("rounds"), "{e}");
        let e = err("rounds = 3\n[sweep]\nrounds.x = [1]");
        assert!(e.contains("sweep.rounds.x: rounds is not a table"), "{e}");
        let e = err("[sweep]\nattack.fraction = [0.1]");
        assert!(e.contains("sweep.attack.fraction[0]") && e.contains("kind"), "{e}");
        let e = err("attack = { kind = \"scale\", fraction = 0.0 }\n[sweep]\nattack.fraction = [0.1, 1.5]");
        assert!(e.contains("attack.fraction=1.5") && e.contains("fraction must be in [0, 1)"), "{e}");
        let e = err("[sweep]\ncolour = [1, 2]");
        assert!(e.contains("sweep.colour[0]") && e.contains("colour"), "{e}");
    }
}
