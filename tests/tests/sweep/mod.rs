//! Sweeps end to end on the embedded MNIST subset: the same sweep run
//! twice, with different job and thread counts, writes byte-identical
//! metrics; completed runs are reused and half-written ones redone; the
//! report renders from the sweep's directory.

use std::collections::BTreeMap;
use std::path::Path;

use tally_sim::sweep::{self, RunStatus, SweepOptions};

const SWEEP: &str = r#"
clients = 6
clients_per_round = 3
rounds = 3
model = { kind = "mlp", input = 784, hidden = [16], classes = 10 }
attack = { kind = "scale", fraction = 0.0 }

[sweep]
seed = [1, 2]
rule = ["mean", "median"]
attack.fraction = [0.0, 0.4]
"#;

/// Every run's CSV and JSON lines, by run name.
fn outputs(dir: &Path, sw: &sweep::Sweep) -> BTreeMap<String, (Vec<u8>, Vec<u8>)> {
    sw.runs
        .iter()
        .map(|r| {
            let f = sweep::run_files(dir, &r.name);
            (r.name.clone(), (std::fs::read(&f.csv).unwrap(), std::fs::read(&f.jsonl).unwrap()))
        })
        .collect()
}

fn opts(out: &Path, jobs: usize, threads: usize) -> SweepOptions {
    SweepOptions { jobs, threads, out: out.to_path_buf(), quiet: true }
}

#[test]
fn a_sweep_run_twice_gives_byte_identical_csv_whatever_the_jobs_and_threads() {
    let sw = sweep::expand(SWEEP).unwrap();
    assert_eq!(sw.runs.len(), 8);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    // One run at a time on one thread, then four at a time with two
    // threads each (and runs finishing in whatever order).
    let ea = sweep::run(&sw, &opts(&a, 1, 1)).unwrap();
    let eb = sweep::run(&sw, &opts(&b, 4, 8)).unwrap();
    assert!(ea.iter().chain(&eb).all(|e| matches!(e.status, RunStatus::Done)), "{ea:?} {eb:?}");
    let (oa, ob) = (outputs(&a, &sw), outputs(&b, &sw));
    assert_eq!(oa.len(), 8);
    for (name, (csv, jsonl)) in &oa {
        assert!(csv == &ob[name].0, "{name}: CSVs differ");
        assert!(jsonl == &ob[name].1, "{name}: JSON lines differ");
    }
    // The comparison means something: seeds and rules change the metrics.
    let csvs: std::collections::BTreeSet<&Vec<u8>> = oa.values().map(|(c, _)| c).collect();
    assert_eq!(csvs.len(), 8, "every run's metrics should differ");
    // Attacked runs carry their drop against the same-seed clean run,
    // which the scaling attack makes large under the mean.
    let attacked = String::from_utf8(oa["attack.fraction=0.4,rule=mean,seed=1"].0.clone()).unwrap();
    let header: Vec<&str> = attacked.lines().next().unwrap().split(',').collect();
    let col = header.iter().position(|c| *c == "attack_success").expect("attack_success column");
    let last: Vec<&str> = attacked.lines().last().unwrap().split(',').collect();
    let drop: f64 = last[col].parse().unwrap();
    assert!(drop > 0.3, "attack success under the mean: {drop}");
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(a.join("index.json")).unwrap()).unwrap();
    let runs = index["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 8);
    let entry = runs.iter().find(|r| r["name"] == "attack.fraction=0.4,rule=median,seed=2").unwrap();
    assert_eq!(entry["baseline"], "attack.fraction=0,rule=median,seed=2");
    assert_eq!(entry["values"]["rule"], "median");
}

#[test]
fn completed_runs_are_reused_and_half_written_ones_redone() {
    let sw = sweep::expand(&SWEEP.replace("seed = [1, 2]", "seed = [1]")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    sweep::run(&sw, &opts(&out, 2, 2)).unwrap();
    let before = outputs(&out, &sw);
    // A run killed mid-way: no summary, a truncated metrics file.
    let victim = &sw.runs[1].name;
    let files = sweep::run_files(&out, victim);
    std::fs::remove_file(&files.summary).unwrap();
    std::fs::write(&files.jsonl, "{\"round\": 0").unwrap();
    let entries = sweep::run(&sw, &opts(&out, 2, 2)).unwrap();
    for e in &entries {
        let redone = &e.name == victim;
        assert_eq!(matches!(e.status, RunStatus::Done), redone, "{}: {:?}", e.name, e.status);
        assert_eq!(matches!(e.status, RunStatus::Reused), !redone, "{}: {:?}", e.name, e.status);
    }
    assert_eq!(outputs(&out, &sw), before);
    // An attacked run made without its clean run is redone once the sweep
    // has one (its attack success was unknown).
    let attacked_only = sweep::expand(
        &SWEEP
            .replace("seed = [1, 2]", "seed = [1]")
            .replace("attack.fraction = [0.0, 0.4]", "attack.fraction = [0.4]"),
    )
    .unwrap();
    let other = dir.path().join("t");
    sweep::run(&attacked_only, &opts(&other, 2, 2)).unwrap();
    let f = sweep::run_files(&other, &attacked_only.runs[0].name);
    let csv = std::fs::read_to_string(&f.csv).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = header.iter().position(|c| *c == "attack_success").unwrap();
    assert!(csv.lines().skip(1).all(|l| l.split(',').nth(col) == Some("")), "{csv}");
    // (The same runs, now named with the fraction since it varies.)
    for r in &attacked_only.runs {
        let to = other.join(format!("attack.fraction=0.4,{}", r.name));
        std::fs::rename(other.join(&r.name), &to).unwrap();
    }
    let entries = sweep::run(&sw, &opts(&other, 2, 2)).unwrap();
    assert!(entries.iter().all(|e| matches!(e.status, RunStatus::Done)), "{entries:?}");
    assert_eq!(outputs(&other, &sw), before);
    // A changed scenario is not reused.
    let longer =
        sweep::expand(&SWEEP.replace("seed = [1, 2]", "seed = [1]").replace("rounds = 3", "rounds = 4")).unwrap();
    let entries = sweep::run(&longer, &opts(&out, 2, 2)).unwrap();
    assert!(entries.iter().all(|e| matches!(e.status, RunStatus::Done)), "{entries:?}");
}

#[test]
fn the_cli_sweeps_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.toml");
    std::fs::write(&file, SWEEP.replace("seed = [1, 2]", "seed = [3]")).unwrap();
    let out = dir.path().join("out");
    let bin = crate::support::bin("tally-sim");
    let status = std::process::Command::new(&bin)
        .args(["sweep", "--quiet", "--jobs", "2", "--out"])
        .arg(&out)
        .arg(&file)
        .status()
        .unwrap();
    assert!(status.success());
    let page = dir.path().join("page.md");
    let status = std::process::Command::new(&bin).args(["report"]).arg(&out).arg("--out").arg(&page).status().unwrap();
    assert!(status.success());
    let md = std::fs::read_to_string(&page).unwrap();
    assert!(md.contains("| attack.fraction=0.4,rule=median |"), "{md}");
    assert!(md.contains("page-plots/embedded-scale.svg"), "{md}");
    let svg = std::fs::read_to_string(dir.path().join("page-plots/embedded-scale.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("fedavg / median, 40%"), "{}", &svg[..svg.len().min(300)]);
    let png = std::fs::read(dir.path().join("page-plots/embedded-scale.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    // A bad sweep fails before running, naming the field.
    std::fs::write(&file, "[sweep]\nrounds = 3\n").unwrap();
    let o = std::process::Command::new(&bin).args(["sweep", "--quiet"]).arg(&file).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("sweep.rounds: must be a list"));
}
