//! The per-round metrics schema that `tally-server` and `tally-sim` share
//! (`docs/metrics.md` describes every field): field names, their order in
//! the CSV files both write next to their JSON lines, and the CSV
//! rendering. Pure functions on already-decoded rows; the writers own the
//! files.

/// Version of the metrics schema, written in each run's `summary.json`.
/// Bumped when a field changes name or meaning (added fields don't bump it).
/// 1: shared names (`bytes_up`, `bytes_down`, `failed`, `test_examples`)
/// for server and simulator; before it the server wrote `bytes_received`.
pub const SCHEMA_VERSION: u32 = 1;

/// Every per-round field, in CSV column order. A row has a subset: the
/// server's have `elapsed_secs` (wall clock), the simulator's
/// `virtual_secs` (its simulated clock) and `malicious`.
pub const COLUMNS: &[&str] = &[
    "round",
    "sampled",
    "accepted",
    "failed",
    "rejected",
    "samples",
    "train_loss",
    "test_accuracy",
    "test_loss",
    "test_examples",
    "bytes_up",
    "bytes_down",
    "elapsed_secs",
    "virtual_secs",
    "malicious",
    "model_hash",
];

/// Renders rows (JSON objects, as in `metrics.jsonl`) as CSV: a header of
/// the [`COLUMNS`] any row has, in schema order, then one line per row;
/// a field a row lacks, or `null`, is empty. Fields outside the schema are
/// left out (the JSON lines keep them). Values are numbers and hex
/// strings, which need no quoting; anything else is quoted.
pub fn to_csv(rows: &[serde_json::Map<String, serde_json::Value>]) -> String {
    let present: Vec<&str> = COLUMNS.iter().copied().filter(|c| rows.iter().any(|r| r.contains_key(*c))).collect();
    let mut out = present.join(",");
    out.push('\n');
    for row in rows {
        let cells: Vec<String> = present
            .iter()
            .map(|c| match row.get(*c) {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                Some(serde_json::Value::String(s)) if s.bytes().all(|b| b.is_ascii_alphanumeric()) => s.clone(),
                Some(serde_json::Value::String(s)) => quote(s),
                Some(other) => quote(&other.to_string()),
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// A CSV field in double quotes, its quotes doubled (RFC 4180).
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn csv_has_the_schema_columns_rows_have_in_order() {
        let rows = [
            row(json!({"round": 0, "test_accuracy": 0.1, "test_examples": 2000})),
            row(
                json!({"model_hash": "ab12", "round": 1, "accepted": 3, "train_loss": 1.5, "test_accuracy": null, "extra": [1]}),
            ),
        ];
        assert_eq!(
            to_csv(&rows),
            "round,accepted,train_loss,test_accuracy,test_examples,model_hash\n0,,,0.1,2000,\n1,3,1.5,,,ab12\n"
        );
    }

    #[test]
    fn odd_strings_are_quoted() {
        let rows = [row(json!({"round": 1, "model_hash": "a,\"b"}))];
        assert_eq!(to_csv(&rows), "round,model_hash\n1,\"a,\"\"b\"\n");
    }
}
