//! Per-round metrics as JSON lines (`metrics.jsonl`).
//!
//! Line `r` describes the model *after* round `r`: its training statistics
//! come from round `r`, its test figures from the clients' evaluations of that
//! model, which arrive with round `r + 1` (or the final evaluation round). So
//! a line is complete one round late; line 0 is the initial model.
//!
//! Every round's line is in the file exactly once, whatever the crashes:
//! - the row waiting for its evaluation is kept on disk
//!   (`metrics-pending.json` in the state directory), not only in memory;
//! - the driver hands a closed round to [`MetricsWriter::record`] *before*
//!   it persists the snapshot that closes the round, and every write is
//!   fsynced. So a snapshot saying round `r` closed implies row `r - 1` is in
//!   the file and row `r` is pending; a crash before that snapshot makes the
//!   resumed run close round `r` again, and then
//! - rows already in the file are not written again ([`MetricsWriter::resume`]
//!   reads which are there, and cuts a torn last line), and a pending row
//!   of a round being redone is replaced.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};
use tally_protocol::RoundSummary;
use tally_protocol::wire::{EvalReport, Task};
use tracing::{debug, warn};

/// Errors reading or writing the metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// File system.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line of an existing file that is not a metrics row.
    #[error("{path}:{line}: not a metrics row ({reason}); move the file away or fix the line to resume")]
    NotARow {
        /// File.
        path: PathBuf,
        /// Line number (1-based).
        line: usize,
        /// Why.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MetricsError + '_ {
    move |source| MetricsError::Io { path: path.to_path_buf(), source }
}

/// Writes `metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    out: File,
    /// Bytes of whole rows in the file (a failed write is cut back to it).
    len: u64,
    /// Rounds whose rows are in the file.
    written: BTreeSet<u64>,
    pending_path: PathBuf,
    pending: Option<Map<String, Value>>,
    last_accuracy: Option<f64>,
}

impl MetricsWriter {
    /// Starts a new run's metrics: truncates the file and forgets any
    /// pending row (kept at `pending_path`).
    pub fn create(path: &Path, pending_path: &Path) -> Result<Self, MetricsError> {
        let out = File::create(path).map_err(io(path))?;
        match std::fs::remove_file(pending_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(pending_path)(e)),
            _ => {}
        }
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            out,
            len: 0,
            written: BTreeSet::new(),
            pending_path: pending_path.to_path_buf(),
            pending: None,
            last_accuracy: None,
        })
    }

    /// Continues a resumed run's metrics: reads which rows the file holds
    /// (cutting a torn last line, a crash mid-write) and the pending row.
    pub fn resume(path: &Path, pending_path: &Path) -> Result<Self, MetricsError> {
        let out = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(io(path))?;
        let bytes = std::fs::read(path).map_err(io(path))?;
        // Whole lines end with '\n'; what follows the last one is torn.
        let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if whole < bytes.len() {
            warn!(path = %path.display(), bytes = bytes.len() - whole, "cutting a torn last metrics line");
            out.set_len(whole as u64).map_err(io(path))?;
            out.sync_all().map_err(io(path))?;
        }
        let mut written = BTreeSet::new();
        let mut last_accuracy = None;
        for (i, line) in bytes[..whole].split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let not_a_row = |reason: String| MetricsError::NotARow { path: path.to_path_buf(), line: i + 1, reason };
            let row: Map<String, Value> = serde_json::from_slice(line).map_err(|e| not_a_row(e.to_string()))?;
            let round = row_round(&row).ok_or_else(|| not_a_row("no \"round\"".into()))?;
            written.insert(round);
            if let Some(a) = row.get("test_accuracy").and_then(Value::as_f64) {
                last_accuracy = Some(a);
            }
        }
        let pending = match std::fs::read(pending_path) {
            Ok(b) => {
                let row: Map<String, Value> = serde_json::from_slice(&b).map_err(|e| MetricsError::NotARow {
                    path: pending_path.to_path_buf(),
                    line: 1,
                    reason: e.to_string(),
                })?;
                Some(row)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(pending_path)(e)),
        };
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            out,
            len: whole as u64,
            written,
            pending_path: pending_path.to_path_buf(),
            pending,
            last_accuracy,
        })
    }

    /// Accuracy of the newest evaluated model.
    pub fn last_accuracy(&self) -> Option<f64> {
        self.last_accuracy
    }

    /// Rounds whose rows are in the file.
    pub fn rounds_written(&self) -> &BTreeSet<u64> {
        &self.written
    }

    /// Records a closed round: completes and writes the row of the model
    /// its clients evaluated, and keeps the round's own row pending (on
    /// disk) until its model's evaluation comes. Call before the snapshot
    /// that closes the round is persisted.
    pub fn record(&mut self, s: &RoundSummary, elapsed_secs: f64) -> Result<(), MetricsError> {
        // This round's reports evaluated the model after the round before.
        let evaluated = u64::from(s.round.saturating_sub(1));
        match self.pending.take() {
            Some(mut line) if row_round(&line) == Some(evaluated) => {
                add_eval(&mut line, s.eval_of_incoming);
                self.note(s.eval_of_incoming);
                self.write(line)?;
            }
            stale => {
                if let Some(line) = stale {
                    // A round closed before a crash whose snapshot never made
                    // it: it is being redone, and its row with it.
                    debug!(round = ?row_round(&line), "dropping the pending metrics row of a redone round");
                }
                if evaluated == 0 {
                    let mut line = Map::new();
                    line.insert("round".into(), json!(0));
                    add_eval(&mut line, s.eval_of_incoming);
                    self.note(s.eval_of_incoming);
                    self.write(line)?;
                } else if !self.written.contains(&evaluated) {
                    warn!(round = evaluated, "the metrics row of this round was lost and cannot be rebuilt");
                }
            }
        }
        if s.task == Task::Train {
            let mut line = Map::new();
            line.insert("round".into(), json!(s.round));
            line.insert("sampled".into(), json!(s.sampled));
            line.insert("accepted".into(), json!(s.accepted));
            line.insert("rejected".into(), json!(s.rejected));
            // Clients that answered that their local training failed.
            line.insert("failed".into(), json!(s.failed));
            if let Some(st) = &s.stats {
                line.insert("samples".into(), json!(st.samples));
                line.insert("train_loss".into(), json!(st.train_loss));
                if let Some(p) = st.privacy {
                    tally_protocol::metrics::insert_privacy(&mut line, &p);
                }
            }
            // The shared schema's names (tally_protocol::metrics).
            line.insert("bytes_up".into(), json!(s.bytes_received));
            line.insert("bytes_down".into(), json!(s.bytes_sent));
            line.insert("model_hash".into(), json!(hex::encode(s.model_hash)));
            line.insert("elapsed_secs".into(), json!(elapsed_secs));
            write_durably(&self.pending_path, &Value::Object(line.clone()).to_string().into_bytes())
                .map_err(io(&self.pending_path))?;
            self.pending = Some(line);
        }
        Ok(())
    }

    /// The run finished: writes the pending row (if any) though its
    /// evaluation never came (a run without a final evaluation), then the
    /// CSV copy of the rows.
    pub fn finish(&mut self) -> Result<(), MetricsError> {
        if let Some(mut line) = self.pending.take() {
            add_eval(&mut line, None);
            self.write(line)?;
        }
        self.write_csv()
    }

    /// `metrics.csv` beside `metrics.jsonl`: the same rows in the shared
    /// schema's columns ([`tally_protocol::metrics::to_csv`]), rebuilt
    /// from the JSON lines (the durable record) whenever it is written, so
    /// it never holds a row the JSON lines lack.
    pub fn write_csv(&self) -> Result<(), MetricsError> {
        let text = std::fs::read_to_string(&self.path).map_err(io(&self.path))?;
        let rows: Vec<Map<String, Value>> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let csv_path = self.path.with_extension("csv");
        write_durably(&csv_path, tally_protocol::metrics::to_csv(&rows).as_bytes()).map_err(io(&csv_path))
    }

    fn note(&mut self, e: Option<EvalReport>) {
        if let Some(e) = e.filter(|e| e.total > 0) {
            self.last_accuracy = Some(e.accuracy());
        }
    }

    /// Appends a row unless its round is in the file already; durable when
    /// it returns.
    fn write(&mut self, line: Map<String, Value>) -> Result<(), MetricsError> {
        let Some(round) = row_round(&line) else { return Ok(()) };
        if self.written.contains(&round) {
            debug!(round, "metrics row already written");
            return Ok(());
        }
        let mut bytes = Value::Object(line).to_string().into_bytes();
        bytes.push(b'\n');
        if let Err(e) = self.out.write_all(&bytes).and_then(|()| self.out.sync_data()) {
            // Leave whole rows only: a later row appended after a partial
            // one would make both unreadable.
            let _ = self.out.set_len(self.len);
            return Err(io(&self.path)(e));
        }
        self.len += bytes.len() as u64;
        self.written.insert(round);
        Ok(())
    }
}

fn row_round(line: &Map<String, Value>) -> Option<u64> {
    line.get("round").and_then(Value::as_u64)
}

/// Replaces `path` atomically and durably: temp file, fsync, rename, fsync
/// of the directory.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

fn add_eval(line: &mut Map<String, Value>, e: Option<EvalReport>) {
    match e.filter(|e| e.total > 0) {
        Some(e) => {
            line.insert("test_accuracy".into(), json!(e.accuracy()));
            line.insert("test_loss".into(), json!(e.mean_loss()));
            line.insert("test_examples".into(), json!(e.total));
        }
        None => {
            line.insert("test_accuracy".into(), Value::Null);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn summary(round: u32, task: Task) -> RoundSummary {
        RoundSummary {
            round,
            task,
            sampled: 3,
            accepted: 3,
            rejected: 0,
            failed: 0,
            stats: None,
            // Correct answers encode the model evaluated: round - 1.
            eval_of_incoming: Some(EvalReport { correct: u64::from(round - 1), total: 100, loss_sum: 1.0 }),
            model_hash: [round as u8; 32],
            bytes_received: 10,
            bytes_sent: 20,
        }
    }

    fn rows(path: &Path) -> Vec<Map<String, Value>> {
        std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Drives a run of `rounds` training rounds and a final evaluation as
    /// the server does (the metrics of a closed round, then its snapshot),
    /// crashing at `crashes` (step indices: the writer is dropped, and a
    /// crash before the snapshot of step `i` redoes step `i`) and checks
    /// that every row is in the file exactly once, with its own evaluation.
    fn run_with_crashes(rounds: u32, crashes: &[(usize, bool)]) {
        let dir = tempfile::tempdir().unwrap();
        let (path, pending) = (dir.path().join("metrics.jsonl"), dir.path().join("metrics-pending.json"));
        let mut w = MetricsWriter::create(&path, &pending).unwrap();
        let steps: Vec<RoundSummary> =
            (1..=rounds).map(|r| summary(r, Task::Train)).chain([summary(rounds + 1, Task::Evaluate)]).collect();
        // The snapshot: how many steps are durable.
        let mut closed = 0;
        let mut crashes = crashes.iter().copied().peekable();
        while closed < steps.len() {
            w.record(&steps[closed], 0.0).unwrap();
            if closed + 1 == steps.len() {
                w.finish().unwrap();
            }
            match crashes.peek() {
                Some(&(at, before_snapshot)) if at == closed => {
                    crashes.next();
                    if !before_snapshot {
                        closed += 1;
                    }
                    drop(w);
                    // A torn half line from a crash mid-write, sometimes.
                    if at % 2 == 0 {
                        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
                        f.write_all(b"{\"round\": 9").unwrap();
                    }
                    w = MetricsWriter::resume(&path, &pending).unwrap();
                }
                _ => closed += 1,
            }
        }
        let got = rows(&path);
        let rounds_got: Vec<u64> = got.iter().map(|r| r["round"].as_u64().unwrap()).collect();
        assert_eq!(rounds_got, (0..=u64::from(rounds)).collect::<Vec<_>>(), "crashes {crashes:?}");
        for (r, row) in got.iter().enumerate() {
            assert_eq!(row["test_accuracy"].as_f64().unwrap(), r as f64 / 100.0, "row {r}");
        }
        assert_eq!(w.last_accuracy(), Some(f64::from(rounds) / 100.0));
    }

    /// Issue 10: rows waited in memory for the next round, so a kill lost
    /// them (rounds 1-3 of 10 missing). Crashes before and after every
    /// snapshot, one at a time and several in a row.
    #[test]
    fn every_row_is_written_exactly_once_whatever_the_crashes() {
        run_with_crashes(4, &[]);
        for at in 0..5 {
            for before in [false, true] {
                run_with_crashes(4, &[(at, before)]);
            }
        }
        run_with_crashes(6, &[(0, true), (1, false), (2, true), (3, true), (5, false), (6, true)]);
    }

    /// A run without a final evaluation writes its last row at the finish.
    #[test]
    fn the_last_row_is_written_at_the_finish_without_an_evaluation() {
        let dir = tempfile::tempdir().unwrap();
        let (path, pending) = (dir.path().join("metrics.jsonl"), dir.path().join("metrics-pending.json"));
        let mut w = MetricsWriter::create(&path, &pending).unwrap();
        w.record(&summary(1, Task::Train), 0.0).unwrap();
        w.record(&summary(2, Task::Train), 0.0).unwrap();
        drop(w);
        let mut w = MetricsWriter::resume(&path, &pending).unwrap();
        w.finish().unwrap();
        let got = rows(&path);
        assert_eq!(got.len(), 3);
        assert_eq!(got[2]["round"], 2);
        assert_eq!(got[2]["test_accuracy"], Value::Null);
        // A new run starts afresh.
        let w = MetricsWriter::create(&path, &pending).unwrap();
        assert!(w.rounds_written().is_empty() && !pending.exists());
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }

    #[test]
    fn a_line_that_is_not_a_row_is_refused_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let (path, pending) = (dir.path().join("metrics.jsonl"), dir.path().join("metrics-pending.json"));
        std::fs::write(&path, "{\"round\":0}\nnot json\n{\"round\":1}\n").unwrap();
        let err = MetricsWriter::resume(&path, &pending).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl:2: not a metrics row"), "{err}");
    }
}
