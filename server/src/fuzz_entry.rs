//! Fuzzing entry points of the server's file readers (see
//! `tally_protocol::fuzz_entry` for the setup: one function per cargo-fuzz
//! target in `fuzz/`, run over the checked-in corpus by the stable test
//! `fuzz_entry::tests::every_corpus_file_runs_clean`). Each must never panic.

use std::path::Path;

use tally_protocol::durable::{self, Record};
use tally_protocol::wire::PublicKeyBytes;

use crate::config::{self, RawConfig};
use crate::state;

/// Every server target, by name (= cargo-fuzz target = corpus directory).
pub const TARGETS: &[tally_protocol::fuzz_entry::Target] = &[
    ("state_snapshot", state_snapshot),
    ("state_wal", state_wal),
    ("server_config", server_config),
    ("enrolled_keys", enrolled_keys),
];

/// The generation the `state_wal` target reads logs for (its seeds use it).
pub const WAL_GENERATION: u64 = 1;

/// `snapshot.bin` bytes: header, SHA-256, snapshot. What is accepted, written
/// again, reads back the same (compared as encodings: a snapshot may hold
/// NaN, and durable payloads need not be canonical, see
/// `tally_protocol::fuzz_entry::durable_snapshot`).
pub fn state_snapshot(data: &[u8]) {
    let path = Path::new("snapshot.bin");
    if let Ok((generation, snapshot)) = state::parse_snapshot(path, data) {
        let once = durable::encode_snapshot(&snapshot);
        let again = state::parse_snapshot(path, &state::snapshot_file(generation, &snapshot));
        assert_eq!(again.map(|(g, s)| (g, durable::encode_snapshot(&s))).ok(), Some((generation, once)));
    }
}

/// `wal.bin` bytes of generation [`WAL_GENERATION`]: header, CRC-framed
/// records. The accepted records, framed again, are exactly the prefix of
/// the input said to be valid (records are canonical; a torn last frame may
/// have been dropped), and read back the same.
pub fn state_wal(data: &[u8]) {
    let path = Path::new("wal.bin");
    if let Ok(Some(wal)) = state::parse_wal(path, data, WAL_GENERATION) {
        let mut again = state::wal_header(WAL_GENERATION);
        for r in &wal.records {
            match state::wal_frame(r) {
                Some(frame) => again.extend_from_slice(&frame),
                None => panic!("a record read from a log does not fit a frame"),
            }
        }
        assert_eq!(Some(&again[..]), data.get(..wal.valid_len), "re-framed records differ from the valid prefix");
        let encode = |rs: &[Record]| rs.iter().map(durable::encode_record).collect::<Vec<_>>();
        match state::parse_wal(path, &again, WAL_GENERATION) {
            Ok(Some(back)) => {
                assert_eq!(encode(&back.records), encode(&wal.records), "re-framed records read back differently")
            }
            other => panic!("re-framed records do not read back: {other:?}"),
        }
    }
}

/// `server.toml` text: TOML parsing into [`RawConfig`] and validation, with
/// a fixed enrolment list standing in for the file it names.
pub fn server_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(raw) = RawConfig::parse(Path::new("server.toml"), text) else { return };
    let keys = || -> Result<Vec<PublicKeyBytes>, config::ConfigError> { Ok(vec![PublicKeyBytes([0x11; 32]); 3]) };
    if let Ok(cfg) = raw.validate_with([7; 24], |_| keys()) {
        assert!(cfg.arch.validate().is_ok(), "validated config with an invalid model");
        assert!(cfg.rounds >= 1 && !cfg.round_timeout.is_zero());
    }
}

/// An enrolment file: hex keys, `#` comments. Every key accepted is a valid
/// ed25519 point, and there is at least one.
pub fn enrolled_keys(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(keys) = config::parse_enrolled(Path::new("enrolled.txt"), text) {
        assert!(!keys.is_empty());
        for k in keys {
            assert!(tally_protocol::identity::parse_public_key(&hex::encode(k.0)).is_ok(), "accepted a bad key");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The stable half of the fuzzing setup for the server's readers: every
    /// target over its checked-in corpus (`fuzz/corpus/<target>/`).
    #[test]
    fn every_corpus_file_runs_clean() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let inputs = tally_protocol::fuzz_entry::run_corpus(&dir, TARGETS).unwrap();
        assert!(inputs >= TARGETS.len());
    }

    #[test]
    fn empty_and_tiny_inputs_are_fine() {
        for (_, target) in TARGETS {
            for input in [&[][..], &[0], &[0xff], b"x = 1", &[0xff; 80]] {
                target(input);
            }
        }
    }
}

/// Seed inputs of the server targets' corpus. Regenerate with
/// `cargo test --release -p tally-server write_seed_corpus -- --ignored`.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod seeds {
    use super::*;
    use tally_protocol::durable::{DURABLE_VERSION, Snapshot};
    use tally_protocol::wire::{RunId, SignatureBytes, Task};

    fn write(target: &str, name: &str, bytes: &[u8]) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }

    #[test]
    #[ignore = "writes the seed corpus into fuzz/corpus"]
    fn write_seed_corpus() {
        let snap = Snapshot {
            version: DURABLE_VERSION,
            run_id: RunId([3; 16]),
            rng_seed: 9,
            enrolled_hash: [1; 32],
            completed_rounds: 1,
            evaluated: false,
            model: vec![0.5; 23],
            violations: [(0, 1)].into_iter().collect(),
            replica_checkpoint: None,
            aggregator_state: None,
        };
        write("state_snapshot", "gen1", &state::snapshot_file(1, &snap));
        write("state_snapshot", "gen7", &state::snapshot_file(7, &Snapshot { evaluated: true, ..snap }));

        let records = [
            Record::RoundOpened { round: 2, task: Task::Train, sampled: vec![0, 1] },
            Record::Accepted { client: 0, body: vec![5; 30], signature: SignatureBytes([7; 64]) },
            Record::Extended { round: 2, added: vec![2] },
            Record::Violation { client: 1, count: 2 },
        ];
        let mut wal = state::wal_header(WAL_GENERATION);
        for r in &records {
            wal.extend(state::wal_frame(r).unwrap());
        }
        write("state_wal", "four-records", &wal);
        write("state_wal", "torn-tail", &wal[..wal.len() - 5]);
        write("state_wal", "header-only", &state::wal_header(WAL_GENERATION));
        write("state_wal", "stale", &state::wal_header(WAL_GENERATION + 1));

        let configs = [
            ("minimal", "enrolled_keys = \"enrolled.txt\"\n[tls]\nself_signed = true\n"),
            (
                "readme",
                "listen = \"0.0.0.0:4433\"\nenrolled_keys = \"enrolled.txt\"\nrounds = 20\nmin_clients = 10\n\
                 clients_per_round = 5\nquorum = 4\nround_timeout_secs = 300\n\
                 model = { kind = \"lenet5\", classes = 10 }\ntrain = { lr = 0.05, batch_size = 32, epochs = 1 }\n\
                 [tls]\ncert = \"server-cert.pem\"\nkey = \"server-key.pem\"\n",
            ),
            (
                "spsa",
                "enrolled_keys = \"k\"\nseed = 5\nrun_id = \"000102030405060708090a0b0c0d0e0f\"\n\
                 model = { kind = \"mlp\", input = 784, hidden = [200, 200], classes = 10 }\n\
                 algorithm = { kind = \"spsa\", steps_per_client = 32, eps = 1e-3, lr = 0.01, batch_size = 64, \
                 stream_seed = 7 }\n\
                 [tls]\nself_signed = true\n",
            ),
            (
                "frl",
                "enrolled_keys = \"k\"\nmodel = { kind = \"supermask\", net = \"lenet\", classes = 10 }\n\
                 train = { lr = 0.4, batch_size = 8, epochs = 1 }\n\
                 algorithm = { kind = \"frl\", k_fraction = 0.5, mask = \"two-sided\", momentum = 0.9 }\n\
                 [tls]\nself_signed = true\n",
            ),
            (
                "frl-conv2",
                "enrolled_keys = \"k\"\nmodel = { kind = \"supermask\", net = \"conv2\", channels = 1, side = 2, \
                 classes = 2 }\nmax_violations = 3\nmax_connections = 9\njoin_timeout_secs = 5\n\
                 final_evaluation = false\nstate_dir = \"s\"\nout_dir = \"o\"\ninitial_model = \"m.safetensors\"\n\
                 [tls]\nself_signed = true\n",
            ),
            (
                "dp-ftrl",
                "enrolled_keys = \"k\"\nmodel = { kind = \"mlp\", input = 784, hidden = [], classes = 10 }\n\
                 algorithm = { kind = \"dp-ftrl\", epsilon = 4.0, delta = 1e-5, horizon = 50, clip_norm = 0.5 }\n\
                 [tls]\nself_signed = true\n",
            ),
            (
                "fedavgm-median",
                "enrolled_keys = \"k\"\nalgorithm = { kind = \"fedavgm\", momentum = 0.5 }\nrule = \"median\"\n\
                 [tls]\nself_signed = true\n",
            ),
        ];
        for (name, text) in configs {
            write("server_config", name, text.as_bytes());
        }

        let keys: Vec<String> =
            (1..4u8).map(|i| tally_protocol::Identity::from_secret([i; 32]).public_key().to_string()).collect();
        let file = format!("# clients\n{}  # alice\n\n{}\n   {}   \n", keys[0], keys[1], keys[2]);
        write("enrolled_keys", "three", file.as_bytes());
        write(
            "enrolled_keys",
            "bad-point",
            b"# not a point\nffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff\n",
        );
    }
}
