//! `tally-sim report`: plots and a Markdown page from a directory of runs.
//!
//! A directory of runs is a sweep's (`index.json` and one directory per
//! run), or any directory holding `NAME/metrics.jsonl` or flat
//! `NAME.jsonl` files (with their `*.summary.json` beside them when they
//! have one; runs without a summary have no scenario, and are plotted by
//! name). The page has a summary table (final and best accuracy, attack
//! success) and, per dataset × attack, a plot of test accuracy against the
//! round with one line per update kind / aggregation rule / malicious
//! fraction, as SVG and PNG.
//!
//! Or, with `columns`, just a table of accuracy per evaluated round, one
//! column per named run (how `docs/results/frl-mnist.md`'s table is made).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The embedded font for text in PNG plots (DejaVu Sans, see
/// `assets/DejaVuSans.LICENSE`): no system font library is needed.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// A run read back from its files.
#[derive(Debug, Clone)]
pub struct RunData {
    /// Its name.
    pub name: String,
    /// The metrics rows.
    pub rows: Vec<serde_json::Map<String, serde_json::Value>>,
    /// The scenario from its summary, if it has one.
    pub scenario: Option<serde_json::Value>,
}

impl RunData {
    /// `round → test_accuracy` of the evaluated rows.
    pub fn accuracy(&self) -> BTreeMap<u32, f64> {
        self.rows
            .iter()
            .filter_map(|r| Some((r.get("round")?.as_u64()? as u32, r.get("test_accuracy")?.as_f64()?)))
            .collect()
    }

    fn field(&self, path: &[&str]) -> Option<&serde_json::Value> {
        let mut v = self.scenario.as_ref()?;
        for p in path {
            v = v.get(p)?;
        }
        Some(v)
    }

    /// Dataset (the scenario's `data`).
    pub fn data(&self) -> String {
        self.field(&["data"]).and_then(|v| v.as_str()).unwrap_or("?").to_string()
    }

    /// Attack kind, `none` without one.
    pub fn attack(&self) -> String {
        self.field(&["attack", "kind"]).and_then(|v| v.as_str()).unwrap_or("none").to_string()
    }

    /// Malicious fraction (0 without an attack).
    pub fn fraction(&self) -> f64 {
        self.field(&["attack", "fraction"]).and_then(|v| v.as_f64()).unwrap_or(0.0)
    }

    /// `kind / rule`, e.g. `fedavg / trimmed-mean(2)`.
    pub fn aggregator(&self) -> String {
        let kind = self.field(&["algorithm", "kind"]).and_then(|v| v.as_str()).unwrap_or("?");
        let rule = match self.field(&["rule"]) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Object(o)) => {
                let name = o.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
                let params: Vec<String> = o.iter().filter(|(k, _)| *k != "kind").map(|(_, v)| v.to_string()).collect();
                if params.is_empty() { name.to_string() } else { format!("{name}({})", params.join(", ")) }
            }
            _ => "?".into(),
        };
        format!("{kind} / {rule}")
    }

    fn seed(&self) -> Option<u64> {
        self.field(&["seed"]).and_then(|v| v.as_u64())
    }

    /// Attack success of the evaluated rows after round 0 that have one
    /// (round 0 is the shared initial model, whose drop is 0 by
    /// construction; counting it would pull every mean towards 0).
    pub fn attack_success(&self) -> Vec<f64> {
        self.rows
            .iter()
            .filter(|r| r.get("round").and_then(|x| x.as_u64()) != Some(0))
            .filter_map(|r| r.get("attack_success")?.as_f64())
            .collect()
    }
}

fn read_jsonl(path: &Path) -> anyhow::Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.as_object().cloned())
                .with_context(|| format!("{}: not a JSON object per line", path.display()))
        })
        .collect()
}

fn read_scenario(summary: &Path) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(summary).ok()?).ok()?;
    v.get("scenario").cloned()
}

/// The runs in `dir` (see the module docs), by name.
pub fn load_runs(dir: &Path) -> anyhow::Result<Vec<RunData>> {
    let mut runs = Vec::new();
    let index = dir.join("index.json");
    if index.exists() {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index)?).with_context(|| format!("parsing {}", index.display()))?;
        for r in v.get("runs").and_then(|r| r.as_array()).into_iter().flatten() {
            let Some(name) = r.get("name").and_then(|n| n.as_str()) else { continue };
            let files = crate::sweep::run_files(dir, r.get("dir").and_then(|d| d.as_str()).unwrap_or(name));
            if files.summary.exists() {
                runs.push(RunData {
                    name: name.into(),
                    rows: read_jsonl(&files.jsonl)?,
                    scenario: read_scenario(&files.summary),
                });
            }
        }
        return Ok(runs);
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        let Some(stem) = p.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
        if p.is_dir() && p.join("metrics.jsonl").exists() {
            let files = crate::output::RunFiles::new(&p.join("metrics.jsonl"));
            runs.push(RunData { name: stem, rows: read_jsonl(&files.jsonl)?, scenario: read_scenario(&files.summary) });
        } else if let Some(name) = stem.strip_suffix(".jsonl") {
            runs.push(RunData {
                name: name.into(),
                rows: read_jsonl(&p)?,
                scenario: read_scenario(&p.with_extension("summary.json")),
            });
        }
    }
    Ok(runs)
}

/// A column of a per-round table: a title and what it shows.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    /// A run's test accuracy (percent).
    Accuracy {
        /// Header.
        title: String,
        /// The run.
        run: String,
    },
    /// The first run's accuracy minus the second's (points).
    Drop {
        /// Header.
        title: String,
        /// Clean run.
        clean: String,
        /// Attacked run.
        attacked: String,
    },
    /// A run's `malicious` count, in the rounds where it was evaluated.
    Malicious {
        /// Header.
        title: String,
        /// The run.
        run: String,
    },
}

impl Column {
    fn title(&self) -> &str {
        match self {
            Column::Accuracy { title, .. } | Column::Drop { title, .. } | Column::Malicious { title, .. } => title,
        }
    }
}

/// `TITLE=RUN` (split at the last `=`, so titles may hold `=`... but runs may not).
pub fn parse_title_run(s: &str) -> Result<(String, String), String> {
    s.rsplit_once('=').map(|(t, r)| (t.to_string(), r.to_string())).ok_or_else(|| format!("{s:?}: want TITLE=RUN"))
}

/// The per-round table: one row per round where any accuracy column's run
/// was evaluated; accuracies in percent with two decimals, drops in
/// points, empty cells where a value is missing.
pub fn round_table(runs: &[RunData], columns: &[Column]) -> anyhow::Result<String> {
    let by_name: BTreeMap<&str, &RunData> = runs.iter().map(|r| (r.name.as_str(), r)).collect();
    let get = |n: &str| by_name.get(n).copied().with_context(|| format!("no run named {n}"));
    let mut acc: BTreeMap<String, BTreeMap<u32, f64>> = BTreeMap::new();
    let mut mal: BTreeMap<String, BTreeMap<u32, String>> = BTreeMap::new();
    for c in columns {
        let names: Vec<&String> = match c {
            Column::Accuracy { run, .. } => vec![run],
            Column::Drop { clean, attacked, .. } => vec![clean, attacked],
            Column::Malicious { run, .. } => {
                let r = get(run)?;
                let m = r
                    .rows
                    .iter()
                    // Of the evaluated rows only, as the table's rows are.
                    .filter(|row| row.get("test_accuracy").is_some_and(|a| !a.is_null()))
                    .filter_map(|row| Some((row.get("round")?.as_u64()? as u32, row.get("malicious")?.to_string())))
                    .filter(|(_, m)| m != "null")
                    .collect();
                mal.insert(run.clone(), m);
                vec![]
            }
        };
        for n in names {
            acc.insert(n.clone(), get(n)?.accuracy());
        }
    }
    let mut rounds: Vec<u32> = columns
        .iter()
        .filter_map(|c| match c {
            Column::Accuracy { run, .. } => acc.get(run),
            _ => None,
        })
        .flat_map(|m| m.keys().copied())
        .collect();
    rounds.sort_unstable();
    rounds.dedup();
    let pct = |run: &str, r: u32| acc.get(run).and_then(|m| m.get(&r)).map(|a| 100.0 * a);
    let fmt = |x: Option<f64>| x.map_or(String::new(), |x| format!("{x:.2}"));
    let mut out = String::new();
    let head: Vec<&str> = std::iter::once("round").chain(columns.iter().map(Column::title)).collect();
    out.push_str(&format!("| {} |\n|{}\n", head.join(" | "), "---|".repeat(head.len())));
    for r in rounds {
        let mut row = vec![r.to_string()];
        for c in columns {
            row.push(match c {
                Column::Accuracy { run, .. } => fmt(pct(run, r)),
                Column::Drop { clean, attacked, .. } => fmt(pct(clean, r).zip(pct(attacked, r)).map(|(a, b)| a - b)),
                Column::Malicious { run, .. } => mal.get(run).and_then(|m| m.get(&r)).cloned().unwrap_or_default(),
            });
        }
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    Ok(out)
}

/// The runs grouped into figures: `(data, attack) → runs`. Clean runs of a
/// dataset go into each of its attacked figures (as the 0% lines); runs
/// without a scenario share one figure.
pub fn figures(runs: &[RunData]) -> BTreeMap<(String, String), Vec<&RunData>> {
    let mut figs: BTreeMap<(String, String), Vec<&RunData>> = BTreeMap::new();
    let attacked: BTreeMap<String, Vec<String>> =
        runs.iter().filter(|r| r.scenario.is_some() && r.attack() != "none").fold(BTreeMap::new(), |mut m, r| {
            let v: &mut Vec<String> = m.entry(r.data()).or_default();
            if !v.contains(&r.attack()) {
                v.push(r.attack());
            }
            m
        });
    for r in runs {
        if r.scenario.is_none() {
            figs.entry(("runs".into(), "".into())).or_default().push(r);
            continue;
        }
        let clean = r.fraction() == 0.0;
        match attacked.get(&r.data()) {
            Some(kinds) if clean && r.attack() == "none" => {
                for k in kinds {
                    figs.entry((r.data(), k.clone())).or_default().push(r);
                }
            }
            _ => figs.entry((r.data(), r.attack())).or_default().push(r),
        }
    }
    figs
}

fn line_label(r: &RunData, seeds: bool) -> String {
    if r.scenario.is_none() {
        return r.name.clone();
    }
    let mut l = format!("{}, {:.0}%", r.aggregator(), 100.0 * r.fraction());
    if seeds {
        l.push_str(&format!(", seed {}", r.seed().unwrap_or(0)));
    }
    l
}

fn file_stem(data: &str, attack: &str) -> String {
    let s: String = format!("{data}-{attack}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' })
        .collect();
    s.trim_matches('-').to_string()
}

/// Draws one figure (test accuracy in percent against the round, one line
/// per run) to `svg` and `png`.
pub fn plot(title: &str, lines: &[(String, Vec<(u32, f64)>)], svg: &Path, png: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    // Registering twice is harmless (the second replaces the first).
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the embedded font did not load"))?;
    let max_round = lines.iter().flat_map(|(_, p)| p.iter().map(|(r, _)| *r)).max().unwrap_or(1).max(1);
    fn draw<DB: DrawingBackend>(
        root: DrawingArea<DB, plotters::coord::Shift>,
        title: &str,
        lines: &[(String, Vec<(u32, f64)>)],
        max_round: u32,
    ) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing: {e:?}");
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0u32..max_round, 0f64..100f64)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc("test accuracy (%)")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(e)?;
        for (i, (label, points)) in lines.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points.iter().map(|&(r, a)| (r, 100.0 * a)), colour.stroke_width(2)))
                .map_err(e)?
                .label(label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
        Ok(())
    }
    draw(SVGBackend::new(svg, (900, 560)).into_drawing_area(), title, lines, max_round)?;
    draw(BitMapBackend::new(png, (900, 560)).into_drawing_area(), title, lines, max_round)?;
    Ok(())
}

fn pct(x: Option<f64>) -> String {
    x.map_or("—".into(), |a| format!("{:.2}%", 100.0 * a))
}

/// Writes the page (`page`) and its plots (in `plots`, linked relative to
/// the page) for the runs in `dir`; returns the files written.
pub fn report(dir: &Path, page: &Path, plots: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let runs = load_runs(dir)?;
    anyhow::ensure!(!runs.is_empty(), "no runs in {}", dir.display());
    std::fs::create_dir_all(plots).with_context(|| format!("creating {}", plots.display()))?;
    let page_dir = page.parent().map(Path::to_path_buf).unwrap_or_default();
    let rel = plots.strip_prefix(&page_dir).unwrap_or(plots).to_path_buf();
    let mut written = Vec::new();
    let mut md = format!("# Runs in `{}`\n\nGenerated by `tally-sim report`.\n\n", dir.display());
    md.push_str("| run | data | kind / rule | attack | fraction | rounds | final accuracy | best accuracy | attack success, final | attack success, mean |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for r in &runs {
        let acc = r.accuracy();
        let last_round = r.rows.last().and_then(|x| x.get("round")).and_then(|x| x.as_u64()).unwrap_or(0);
        let final_acc = r.rows.last().and_then(|x| x.get("test_accuracy")).and_then(|x| x.as_f64());
        let best = acc.iter().fold(None, |b: Option<(u32, f64)>, (&k, &a)| match b {
            Some((_, bb)) if bb >= a => b,
            _ => Some((k, a)),
        });
        let success = r.attack_success();
        let has_success = r.rows.iter().any(|x| x.contains_key("attack_success"));
        let clean = r.scenario.is_some() && r.fraction() == 0.0;
        let (sfinal, smean) = if !has_success || clean {
            ("".to_string(), "".to_string())
        } else if success.is_empty() {
            ("n/a".to_string(), "n/a".to_string())
        } else {
            let last = r.rows.iter().rev().find_map(|x| x.get("attack_success")?.as_f64());
            (
                last.map_or("n/a".into(), |v| format!("{:.2}", 100.0 * v)),
                format!("{:.2}", 100.0 * success.iter().sum::<f64>() / success.len() as f64),
            )
        };
        let (data, agg, attack, fraction) = if r.scenario.is_some() {
            (r.data(), r.aggregator(), r.attack(), format!("{:.0}%", 100.0 * r.fraction()))
        } else {
            ("".into(), "".into(), "".into(), "".into())
        };
        md.push_str(&format!(
            "| {} | {data} | {agg} | {attack} | {fraction} | {last_round} | {} | {} | {sfinal} | {smean} |\n",
            r.name,
            pct(final_acc),
            best.map_or("—".into(), |(k, a)| format!("{:.2}% (round {k})", 100.0 * a)),
        ));
    }
    md.push_str(
        "\nAttack success, in points: for a label flip with a source class, the test error on that class; \
         for other attacks, the accuracy drop against the same-seed clean run (n/a: no clean run in the sweep).\n",
    );
    for ((data, attack), members) in figures(&runs) {
        let seeds = members.iter().filter_map(|r| r.seed()).collect::<std::collections::BTreeSet<_>>().len() > 1;
        let mut lines: Vec<(String, Vec<(u32, f64)>)> = members
            .iter()
            .map(|r| (line_label(r, seeds), r.accuracy().into_iter().collect::<Vec<_>>()))
            .filter(|(_, p)| !p.is_empty())
            .collect();
        lines.sort_by(|a, b| a.0.cmp(&b.0));
        let title = if attack.is_empty() { "test accuracy".to_string() } else { format!("{data}, attack {attack}") };
        let stem = file_stem(&data, &attack);
        let (svg, png) = (plots.join(format!("{stem}.svg")), plots.join(format!("{stem}.png")));
        plot(&title, &lines, &svg, &png)?;
        md.push_str(&format!(
            "\n## {title}\n\n![{title}]({}) ([PNG]({}))\n",
            rel.join(format!("{stem}.svg")).display(),
            rel.join(format!("{stem}.png")).display()
        ));
        written.push(svg);
        written.push(png);
    }
    if let Some(d) = page.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(page, md).with_context(|| format!("writing {}", page.display()))?;
    written.push(page.to_path_buf());
    Ok(written)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// `docs/results/frl-mnist.md`'s per-round table is what `tally-sim
    /// report docs/results/data --column … --drop … --malicious …` prints
    /// (the command on that page).
    #[test]
    fn the_frl_mnist_page_table_is_reproduced_from_its_data() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let page = std::fs::read_to_string(root.join("docs/results/frl-mnist.md")).unwrap();
        let start = page.find("| round | FRL, no attack | FRL, 20% reverse |").expect("the table");
        let expected: String =
            page[start..].lines().take_while(|l| l.starts_with('|')).map(|l| format!("{l}\n")).collect();
        let runs = load_runs(&root.join("docs/results/data")).unwrap();
        let acc = |t: &str, r: &str| Column::Accuracy { title: t.into(), run: r.into() };
        let drop = |t: &str, c: &str, a: &str| Column::Drop { title: t.into(), clean: c.into(), attacked: a.into() };
        let columns = [
            acc("FRL, no attack", "frl-mnist"),
            acc("FRL, 20% reverse", "frl-mnist-attack20"),
            acc("FedAvg, no attack", "fedavg-mnist-frl"),
            acc("FedAvg, 20% scaling", "fedavg-mnist-frl-scale20"),
            drop("FRL drop", "frl-mnist", "frl-mnist-attack20"),
            drop("FedAvg drop", "fedavg-mnist-frl", "fedavg-mnist-frl-scale20"),
            Column::Malicious { title: "malicious in FRL round".into(), run: "frl-mnist-attack20".into() },
        ];
        assert_eq!(round_table(&runs, &columns).unwrap(), expected);
        assert!(round_table(&runs, &[acc("x", "no-such-run")]).is_err());
    }

    #[test]
    fn clean_runs_join_every_attacked_figure_of_their_dataset() {
        let run = |name: &str, attack: serde_json::Value| RunData {
            name: name.into(),
            rows: vec![],
            scenario: Some(
                serde_json::json!({"data": "embedded", "attack": attack, "rule": "mean", "algorithm": {"kind": "fedavg"}}),
            ),
        };
        let runs = [
            run("clean", serde_json::Value::Null),
            run("scale", serde_json::json!({"kind": "scale", "fraction": 0.2})),
            run("flip", serde_json::json!({"kind": "sign-flip", "fraction": 0.1})),
        ];
        let figs = figures(&runs);
        let names =
            |k: &str| figs[&("embedded".to_string(), k.to_string())].iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(figs.len(), 2);
        assert_eq!(names("scale"), ["clean", "scale"]);
        assert_eq!(names("sign-flip"), ["clean", "flip"]);
        assert_eq!(runs[1].aggregator(), "fedavg / mean");
    }
}
