//! The per-round metrics schema that `tally-server` and `tally-sim` share
//! (`docs/metrics.md` describes every field): field names, their order in
//! the CSV files both write next to their JSON lines, and the CSV
//! rendering. Pure functions on already-decoded rows; the writers own the
//! files.

/// Version of the metrics schema, written in each run's `summary.json`.
/// Bumped when a field changes name or meaning, or the CSV columns change.
/// 1: shared names (`bytes_up`, `bytes_down`, `failed`, `test_examples`)
/// for server and simulator; before it the server wrote `bytes_received`.
/// 2: the simulator's `rejected_by_reason`, `attack_success` and
/// `test_class_accuracy`, as CSV columns *after* every version-1 column, so
/// a version-1 reader (by name or by position) reads a version-2 file.
/// 3: `dp_rho_spent`, `dp_epsilon_spent` and `dp_delta` (private kinds,
/// server and simulator), as CSV columns after every version-2 column.
pub const SCHEMA_VERSION: u32 = 3;

/// Every per-round field, in CSV column order. A row has a subset: the
/// server's have `elapsed_secs` (wall clock), the simulator's
/// `virtual_secs` (its simulated clock), `malicious` and the version-2
/// columns, which come last.
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
    // Version 2.
    "rejected_by_reason",
    "attack_success",
    "test_class_accuracy",
    // Version 3.
    "dp_rho_spent",
    "dp_epsilon_spent",
    "dp_delta",
];

/// Adds a private run's spent budget to a metrics row (`dp_rho_spent`,
/// `dp_epsilon_spent`, `dp_delta`): one writer for the server and the
/// simulator, so the names can't drift apart.
pub fn insert_privacy(row: &mut serde_json::Map<String, serde_json::Value>, p: &crate::aggregate::PrivacySpent) {
    row.insert("dp_rho_spent".into(), serde_json::json!(p.rho));
    row.insert("dp_epsilon_spent".into(), serde_json::json!(p.epsilon));
    row.insert("dp_delta".into(), serde_json::json!(p.delta));
}

/// Renders rows (JSON objects, as in `metrics.jsonl`) as CSV: a header of
/// the [`COLUMNS`] any row has, in schema order, then one line per row;
/// a field a row lacks, or `null`, is empty. Fields outside the schema are
/// left out (the JSON lines keep them). Values are numbers and hex
/// strings, which need no quoting; an object is written `key=value` pairs
/// joined by `;` (empty for `{}`), an array its values joined by `;`;
/// anything else with other characters is quoted.
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
                Some(serde_json::Value::Object(m)) => {
                    plain(m.iter().map(|(k, v)| format!("{k}={}", scalar(v))).collect::<Vec<_>>().join(";"))
                }
                Some(serde_json::Value::Array(a)) => plain(a.iter().map(scalar).collect::<Vec<_>>().join(";")),
                Some(other) => quote(&other.to_string()),
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// A value inside an object or array cell: strings bare, others as JSON.
fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A cell as it is when it needs no quoting (no comma, quote or line break).
fn plain(s: String) -> String {
    if s.contains([',', '"', '\n', '\r']) { quote(&s) } else { s }
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
    fn version_2_columns_come_after_every_version_1_column() {
        let v1 = COLUMNS.iter().position(|c| *c == "model_hash").unwrap_or(0);
        for c in ["rejected_by_reason", "attack_success", "test_class_accuracy"] {
            assert!(COLUMNS.iter().position(|x| *x == c).unwrap_or(0) > v1, "{c}");
        }
        let rows = [
            row(json!({"round": 1, "model_hash": "ab", "rejected_by_reason": {"bad_signature": 2, "late": 1},
                "attack_success": null, "test_class_accuracy": [0.5, 1.0]})),
            row(json!({"round": 2, "model_hash": "cd", "rejected_by_reason": {}, "attack_success": 0.25})),
        ];
        assert_eq!(
            to_csv(&rows),
            "round,model_hash,rejected_by_reason,attack_success,test_class_accuracy\n\
             1,ab,bad_signature=2;late=1,,0.5;1.0\n2,cd,,0.25,\n"
        );
    }

    #[test]
    fn odd_strings_are_quoted() {
        let rows = [row(json!({"round": 1, "model_hash": "a,\"b"}))];
        assert_eq!(to_csv(&rows), "round,model_hash\n1,\"a,\"\"b\"\n");
    }
}
