//! A run's files: the per-round metrics as JSON lines and CSV (one schema
//! with `tally-server`'s, `docs/metrics.md`) and the run summary. Shared by
//! a single `tally-sim` run and each run of a sweep.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::{RoundRecord, Scenario, SimReport};

/// The files of a run whose metrics go to `out` (`metrics.jsonl`): the CSV
/// and the summary beside it.
#[derive(Debug, Clone)]
pub struct RunFiles {
    /// JSON lines.
    pub jsonl: PathBuf,
    /// CSV copy.
    pub csv: PathBuf,
    /// Summary, written last: a run with a summary is complete.
    pub summary: PathBuf,
}

impl RunFiles {
    /// The files beside `out`.
    pub fn new(out: &Path) -> RunFiles {
        RunFiles {
            jsonl: out.to_path_buf(),
            csv: out.with_extension("csv"),
            summary: out.with_extension("summary.json"),
        }
    }
}

/// One metrics line.
pub fn json_line(rec: &RoundRecord) -> Result<String, serde_json::Error> {
    serde_json::to_string(rec)
}

/// The records as CSV ([`tally_protocol::metrics::to_csv`]).
pub fn csv(records: &[RoundRecord]) -> String {
    let rows: Vec<serde_json::Map<String, serde_json::Value>> =
        records.iter().filter_map(|r| serde_json::to_value(r).ok().and_then(|v| v.as_object().cloned())).collect();
    tally_protocol::metrics::to_csv(&rows)
}

/// The run summary (`docs/metrics.md`, "Run summary").
pub fn summary(
    s: &Scenario,
    report: &SimReport,
    records: &[RoundRecord],
    files: &RunFiles,
    wall_secs: f64,
    device: &str,
) -> serde_json::Value {
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let best =
        records.iter().filter_map(|r| r.test_accuracy).fold(None, |b: Option<f64>, a| Some(b.map_or(a, |b| b.max(a))));
    serde_json::json!({
        "metrics_schema": tally_protocol::metrics::SCHEMA_VERSION,
        "tool": "tally-sim",
        "version": env!("CARGO_PKG_VERSION"),
        "rounds_completed": records.last().map_or(0, |r| r.round),
        "diverged_at": report.diverged_at,
        "final_model_hash": hex::encode(tally_protocol::identity::params_hash(&report.final_model)),
        "final_accuracy": records.last().and_then(|r| r.test_accuracy),
        "best_accuracy": best,
        "wall_secs": wall_secs,
        "device": device,
        "scenario": serde_json::to_value(s).unwrap_or_default(),
        "files": { "metrics": name(&files.jsonl), "metrics_csv": name(&files.csv) },
    })
}

/// Writes `text` to `path` through a temporary file and a rename, so that
/// `path` is either absent or complete.
pub fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
