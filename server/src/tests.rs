//! Start-up of the server on a state directory: what a restart accepts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use super::*;
use crate::config::{RawConfig, RawTls};

/// A validated configuration for a one-client run in `dir`, with `extra`
/// TOML lines.
fn config(dir: &Path, extra: &str) -> ServerConfig {
    let keys = dir.join("keys");
    std::fs::write(&keys, format!("{}\n", tally_protocol::Identity::from_secret([3; 32]).public_key())).unwrap();
    let text = format!(
        "enrolled_keys = {keys:?}\nlisten = \"127.0.0.1:0\"\nmin_clients = 1\nout_dir = {:?}\n\
         model = {{ kind = \"mlp\", input = 4, hidden = [3], classes = 2 }}\n{extra}\n",
        dir.join("out")
    );
    let mut raw = RawConfig::parse(Path::new("t.toml"), &text).unwrap();
    raw.tls = Some(RawTls { self_signed: Some(true), ..Default::default() });
    // Another OS seed each time: a run id or seed not configured is drawn.
    let mut os_seed = [0u8; 24];
    getrandom::fill(&mut os_seed).unwrap();
    raw.validate(os_seed).unwrap()
}

fn bind(cfg: ServerConfig) -> Result<Server, ServerError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    Server::bind(cfg)
}

/// Issue 10: a restart with another `--seed` silently ignored it, another
/// `--lr` was silently applied mid-run. Now a changed setting is refused
/// with what changed; an operator can accept it explicitly, except for the
/// seed and run id; settings not given take the saved ones.
#[test]
fn a_restart_with_a_changed_configuration_is_refused_with_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let base = "seed = 9\nrounds = 3\ntrain = { lr = 0.05, batch_size = 8, epochs = 1 }";
    let first = bind(config(dir.path(), base)).unwrap();
    let run_id = first.config.run_id;
    drop(first);
    // Same configuration: resumed, with the saved run id (not configured,
    // so drawn anew and replaced).
    let again = bind(config(dir.path(), base)).unwrap();
    assert!(again.resumed);
    assert_eq!(again.config.run_id, run_id);
    drop(again);
    // Seed not given: the saved one.
    let unseeded = bind(config(dir.path(), "rounds = 3\ntrain = { lr = 0.05, batch_size = 8, epochs = 1 }")).unwrap();
    assert_eq!(unseeded.config.seed, 9);
    drop(unseeded);

    let changed = "seed = 9\nrounds = 4\ntrain = { lr = 0.1, batch_size = 8, epochs = 1 }";
    let err = bind(config(dir.path(), changed)).unwrap_err();
    let ServerError::ConfigChanged { changes, .. } = &err else { panic!("{err}") };
    assert_eq!(changes, &["rounds: saved 3, now 4", "train.lr: saved 0.05, now 0.1"]);
    assert!(err.to_string().contains("--danger-accept-config-change"), "{err}");

    // The seed is refused even when changes are accepted.
    let mut reseeded = config(dir.path(), "seed = 10\nrounds = 3\ntrain = { lr = 0.05, batch_size = 8, epochs = 1 }");
    reseeded.danger_accept_config_change = true;
    let err = bind(reseeded).unwrap_err();
    assert!(
        matches!(&err, ServerError::ConfigChanged { changes, .. } if changes == &["seed: saved 9, now 10"]),
        "{err}"
    );

    // Accepted explicitly: applied and recorded, so the next restart
    // compares with it.
    let mut accepted = config(dir.path(), changed);
    accepted.danger_accept_config_change = true;
    let s = bind(accepted).unwrap();
    assert_eq!((s.config.rounds, s.config.train.lr), (4, 0.1));
    drop(s);
    drop(bind(config(dir.path(), changed)).unwrap());
    assert!(matches!(bind(config(dir.path(), base)), Err(ServerError::ConfigChanged { .. })));
}

/// Issue 10: two servers could run on one state directory at once.
#[test]
fn a_second_server_on_the_same_state_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = bind(config(dir.path(), "seed = 1")).unwrap();
    let err = bind(config(dir.path(), "seed = 1")).unwrap_err();
    assert!(matches!(err, ServerError::State(state::StateError::Locked { .. })), "{err}");
    assert!(err.to_string().contains("in use by another tally-server"), "{err}");
    drop(first);
    drop(bind(config(dir.path(), "seed = 1")).unwrap());
}

/// Issue 10: with the snapshot gone the server started a new run over the
/// log (1.59 MB → 16 bytes). Now it refuses, and the log is untouched.
#[test]
fn a_server_refuses_to_start_over_a_log_without_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    drop(bind(config(dir.path(), "seed = 1")).unwrap());
    let state = dir.path().join("out/state");
    std::fs::remove_file(state.join("snapshot.bin")).unwrap();
    let wal = std::fs::read(state.join("wal.bin")).unwrap();
    let err = bind(config(dir.path(), "seed = 1")).unwrap_err();
    assert!(err.to_string().contains("snapshot.bin is missing"), "{err}");
    assert_eq!(std::fs::read(state.join("wal.bin")).unwrap(), wal);
}
