//! Per-round metrics as JSON lines (`metrics.jsonl`).
//!
//! Line `r` describes the model *after* round `r`: its training statistics
//! come from round `r`, its test figures from the clients' evaluations of that
//! model, which arrive with round `r + 1` (or the final evaluation round). So
//! a line is written one round late; line 0 is the initial model.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{Map, Value, json};
use tally_protocol::RoundSummary;
use tally_protocol::wire::{EvalReport, Task};

/// Writes `metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsWriter {
    out: BufWriter<File>,
    pending: Option<Map<String, Value>>,
    last_accuracy: Option<f64>,
}

impl MetricsWriter {
    /// Creates (truncates) the file, or appends to it when resuming a run.
    pub fn create(path: &Path, append: bool) -> std::io::Result<Self> {
        let file = if append {
            std::fs::OpenOptions::new().create(true).append(true).open(path)?
        } else {
            File::create(path)?
        };
        Ok(MetricsWriter { out: BufWriter::new(file), pending: None, last_accuracy: None })
    }

    /// Accuracy of the newest evaluated model.
    pub fn last_accuracy(&self) -> Option<f64> {
        self.last_accuracy
    }

    /// Records a closed round.
    pub fn record(&mut self, s: &RoundSummary, elapsed_secs: f64) -> std::io::Result<()> {
        match self.pending.take() {
            Some(mut line) => {
                add_eval(&mut line, s.eval_of_incoming);
                self.note(s.eval_of_incoming);
                self.write(line)?;
            }
            None if s.round == 1 => {
                let mut line = Map::new();
                line.insert("round".into(), json!(0));
                add_eval(&mut line, s.eval_of_incoming);
                self.note(s.eval_of_incoming);
                self.write(line)?;
            }
            None => {}
        }
        if s.task == Task::Train {
            let mut line = Map::new();
            line.insert("round".into(), json!(s.round));
            line.insert("sampled".into(), json!(s.sampled));
            line.insert("accepted".into(), json!(s.accepted));
            line.insert("rejected".into(), json!(s.rejected));
            if let Some(st) = &s.stats {
                line.insert("samples".into(), json!(st.samples));
                line.insert("train_loss".into(), json!(st.train_loss));
            }
            line.insert("bytes_received".into(), json!(s.bytes_received));
            line.insert("model_hash".into(), json!(hex::encode(s.model_hash)));
            line.insert("elapsed_secs".into(), json!(elapsed_secs));
            self.pending = Some(line);
        }
        self.out.flush()
    }

    /// Writes the last line even though its evaluation never came.
    pub fn flush_pending(&mut self) -> std::io::Result<()> {
        if let Some(mut line) = self.pending.take() {
            add_eval(&mut line, None);
            self.write(line)?;
        }
        self.out.flush()
    }

    fn note(&mut self, e: Option<EvalReport>) {
        if let Some(e) = e.filter(|e| e.total > 0) {
            self.last_accuracy = Some(e.accuracy());
        }
    }

    fn write(&mut self, line: Map<String, Value>) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, &Value::Object(line))?;
        self.out.write_all(b"\n")
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
