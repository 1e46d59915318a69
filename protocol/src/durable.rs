//! What the server must keep on disk to survive a crash, as pure bytes.
//!
//! The coordinator describes its durable state as a [`Snapshot`] (taken when
//! a round closes: model, completed rounds, misbehaviour counts, a replicated
//! run's checkpoint and logs) and a write-ahead log of [`Record`]s for what
//! happens until the next snapshot: the round opened (with its sampled
//! clients), reports accepted (the signed bytes as received), extensions.
//! The host writes them — the server to files with checksums, fsync and
//! atomic renames — and must make every record durable *before* it sends
//! the messages queued with it: a report is acknowledged only once its
//! record is on disk, so no acknowledged update is ever lost.
//!
//! Recovery ([`crate::Coordinator::restore`]) loads the snapshot and replays
//! the records through the same checks as live traffic; reports are
//! re-verified and re-absorbed in their original order. Sampling and round
//! seeds are pure functions of the run seed and the round, so a recovered
//! run continues exactly as the uninterrupted one would have.
//!
//! This module never touches a file.

use std::collections::BTreeMap;

use bincode::{Decode, Encode};

use crate::aggregate::{AggregatorState, ClientIndex, StateError};
use crate::wire::{MAX_MESSAGE_BYTES, RoundLog, RunId, SignatureBytes, Task};

/// Format version of snapshots and records; bumped on any change. Version 2
/// added [`Snapshot::aggregator_state`] and kind-tagged payloads inside the
/// recorded reports (wire v3); version 3 stores round logs with a
/// [`crate::wire::LogBody`] (wire v4).
pub const DURABLE_VERSION: u32 = 3;

/// Largest snapshot accepted when decoding: a full model, a replicated run's
/// checkpoint (another model) and its logs, and the per-client counters.
pub const MAX_SNAPSHOT_BYTES: usize = 2 * MAX_MESSAGE_BYTES + 64 * 1024 * 1024;

/// Largest WAL record: a signed report frame plus a little.
pub const MAX_RECORD_BYTES: usize = MAX_MESSAGE_BYTES + 1024;

/// The coordinator's state between rounds.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct Snapshot {
    /// [`DURABLE_VERSION`].
    pub version: u32,
    /// The run this state belongs to.
    pub run_id: RunId,
    /// Seed of sampling and round seeds.
    pub rng_seed: u64,
    /// SHA-256 of the enrolled keys, in order: a restart with another
    /// enrolment list is refused.
    pub enrolled_hash: [u8; 32],
    /// Training rounds completed.
    pub completed_rounds: u32,
    /// Whether the final evaluation round has been held.
    pub evaluated: bool,
    /// The global model.
    pub model: Vec<f32>,
    /// Protocol violations per client.
    pub violations: BTreeMap<ClientIndex, u32>,
    /// Replicated runs: checkpoint round, parameters and the logs since.
    pub replica_checkpoint: Option<(u32, Vec<f32>, Vec<RoundLog>)>,
    /// The aggregator's cross-round state (server momentum, …), in its own
    /// versioned format ([`crate::aggregate::Aggregator::state`]).
    pub aggregator_state: Option<AggregatorState>,
}

/// One write-ahead-log entry.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub enum Record {
    /// A round opened with these clients.
    RoundOpened {
        /// The round.
        round: u32,
        /// Its task.
        task: Task,
        /// Sampled clients, ascending.
        sampled: Vec<ClientIndex>,
    },
    /// The open round was extended with these clients.
    Extended {
        /// The round.
        round: u32,
        /// Clients added.
        added: Vec<ClientIndex>,
    },
    /// A report was accepted (about to be acknowledged).
    Accepted {
        /// The client.
        client: ClientIndex,
        /// The signed report body as received.
        body: Vec<u8>,
        /// Its signature.
        signature: SignatureBytes,
    },
    /// A client's violation count changed.
    Violation {
        /// The client.
        client: ClientIndex,
        /// The new count.
        count: u32,
    },
}

/// What the host must make durable, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Persist {
    /// Replace the snapshot (atomically) and start an empty log.
    Snapshot(Snapshot),
    /// Append to the log (durably, before sending queued messages).
    Append(Record),
}

/// Why durable state could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurableError {
    /// Undecodable bytes (after the host's checksum passed: a format change).
    #[error("undecodable {what}: {message}")]
    Decode {
        /// Snapshot or record.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// Bytes that decode but are not the encoding this build writes (an
    /// integer in more bytes than needed): our own writer never produces
    /// them, so they are damage or tampering, and accepting them would give
    /// one state several byte strings.
    #[error("non-canonical {what} encoding ({len} bytes, canonical is {canonical})")]
    NonCanonical {
        /// Snapshot or record.
        what: &'static str,
        /// Bytes read.
        len: usize,
        /// Bytes of the canonical encoding of what they decode to.
        canonical: usize,
    },
    /// A snapshot of another format version.
    #[error("state format version {found}, this build reads {DURABLE_VERSION}")]
    Version {
        /// Found.
        found: u32,
    },
    /// The state belongs to another run or enrolment list.
    #[error("saved state does not match this run: {0}")]
    Mismatch(&'static str),
    /// The saved model does not fit the configured model architecture.
    #[error("the saved model does not fit the configured model: {0}")]
    ModelMismatch(String),
    /// The run's configuration can't be used (its kind, rule or model).
    #[error("the run's configuration is invalid: {0}")]
    Config(crate::error::Misuse),
    /// The aggregator's saved state can't be restored.
    #[error("{0}")]
    State(#[from] StateError),
    /// A record that cannot follow the state before it.
    #[error("write-ahead log record {index} cannot be replayed: {reason}")]
    Replay {
        /// Record index.
        index: usize,
        /// Why.
        reason: String,
    },
}

fn cfg<const N: usize>() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<N>()
}

/// Encodes a snapshot.
pub fn encode_snapshot(s: &Snapshot) -> Vec<u8> {
    bincode::encode_to_vec(s, cfg::<MAX_SNAPSHOT_BYTES>())
        .unwrap_or_else(|e| panic!("invariant: snapshots we build fit MAX_SNAPSHOT_BYTES: {e}"))
}

/// Decodes a snapshot (trailing bytes and non-canonical encodings refused).
pub fn decode_snapshot(bytes: &[u8]) -> Result<Snapshot, DurableError> {
    let (s, used): (Snapshot, usize) = bincode::decode_from_slice(bytes, cfg::<MAX_SNAPSHOT_BYTES>())
        .map_err(|e| DurableError::Decode { what: "snapshot", message: e.to_string() })?;
    if used != bytes.len() {
        return Err(DurableError::Decode { what: "snapshot", message: "trailing bytes".into() });
    }
    if s.version != DURABLE_VERSION {
        return Err(DurableError::Version { found: s.version });
    }
    // Compared in full, not only by length: a snapshot holds a map
    // (`violations`), and bincode reads a map's entries in any order, so
    // keys out of order decode to the same state at the same length.
    // (Found by the `durable_snapshot` fuzz target.)
    let again = encode_snapshot(&s);
    if again != bytes {
        return Err(DurableError::NonCanonical { what: "snapshot", len: bytes.len(), canonical: again.len() });
    }
    Ok(s)
}

/// As on the wire (`codec`): bincode also reads integers written in more
/// bytes than needed, and the canonical encoding is the only one of minimal
/// length, so a value whose encoding is shorter than its input is refused.
fn canonical<T: Encode>(what: &'static str, value: &T, len: usize) -> Result<(), DurableError> {
    let canonical = crate::codec::encoded_len(value);
    if canonical != len {
        return Err(DurableError::NonCanonical { what, len, canonical });
    }
    Ok(())
}

/// Encodes a record.
pub fn encode_record(r: &Record) -> Vec<u8> {
    bincode::encode_to_vec(r, cfg::<MAX_RECORD_BYTES>())
        .unwrap_or_else(|e| panic!("invariant: records we build fit MAX_RECORD_BYTES: {e}"))
}

/// Decodes a record (trailing bytes and non-canonical encodings refused).
pub fn decode_record(bytes: &[u8]) -> Result<Record, DurableError> {
    let (r, used): (Record, usize) = bincode::decode_from_slice(bytes, cfg::<MAX_RECORD_BYTES>())
        .map_err(|e| DurableError::Decode { what: "record", message: e.to_string() })?;
    if used != bytes.len() {
        return Err(DurableError::Decode { what: "record", message: "trailing bytes".into() });
    }
    canonical("record", &r, bytes.len())?;
    Ok(r)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::wire::SignatureBytes;

    /// Found by the issue-10 review: the durable decoders still took a
    /// varint written in more bytes than needed (251 then a u16 for a value
    /// below 251), so one snapshot or record had several encodings.
    #[test]
    fn non_canonical_snapshots_and_records_are_refused() {
        let r = Record::Violation { client: 7, count: 3 };
        let bytes = encode_record(&r);
        assert_eq!(decode_record(&bytes), Ok(r.clone()));
        // Variant index 3, then `client` = 7 as 251 + u16 LE: same value, longer.
        assert_eq!(bytes, [3, 7, 3]);
        let padded = [3, 251, 7, 0, 3];
        assert_eq!(decode_record(&padded), Err(DurableError::NonCanonical { what: "record", len: 5, canonical: 3 }));
        let a = Record::Accepted { client: 1, body: vec![9; 4], signature: SignatureBytes([0; 64]) };
        let bytes = encode_record(&a);
        assert_eq!(decode_record(&bytes), Ok(a));
        // The body length (4) as 251 + u16.
        let mut padded = vec![bytes[0], bytes[1], 251, 4, 0];
        padded.extend_from_slice(&bytes[3..]);
        assert!(matches!(decode_record(&padded), Err(DurableError::NonCanonical { what: "record", .. })));

        let s = Snapshot {
            version: DURABLE_VERSION,
            run_id: crate::wire::RunId([1; 16]),
            rng_seed: 5,
            enrolled_hash: [2; 32],
            completed_rounds: 4,
            evaluated: false,
            model: vec![0.25; 3],
            violations: BTreeMap::new(),
            replica_checkpoint: None,
            aggregator_state: None,
        };
        let bytes = encode_snapshot(&s);
        assert_eq!(decode_snapshot(&bytes), Ok(s));
        // `version` (2) is the first field: write it as 251 + u16.
        assert_eq!(bytes[0], DURABLE_VERSION as u8);
        let padded = [&[251, DURABLE_VERSION as u8, 0][..], &bytes[1..]].concat();
        assert!(matches!(decode_snapshot(&padded), Err(DurableError::NonCanonical { what: "snapshot", .. })));
    }

    #[test]
    fn a_snapshot_with_its_violation_map_out_of_order_is_refused() {
        let s = Snapshot {
            version: DURABLE_VERSION,
            run_id: RunId([1; 16]),
            rng_seed: 2,
            enrolled_hash: [1; 32],
            completed_rounds: 0,
            evaluated: false,
            model: vec![],
            violations: [(1, 1), (2, 1)].into_iter().collect(),
            replica_checkpoint: None,
            aggregator_state: None,
        };
        let bytes = encode_snapshot(&s);
        assert_eq!(decode_snapshot(&bytes), Ok(s));
        // The map is the last thing before the two `None`s: `len, (1, 1), (2, 1)`.
        let tail = bytes.len() - 2;
        assert_eq!(&bytes[tail - 5..tail], &[2, 1, 1, 2, 1]);
        let mut swapped = bytes.clone();
        swapped[tail - 4..tail].copy_from_slice(&[2, 1, 1, 1]);
        assert!(matches!(decode_snapshot(&swapped), Err(DurableError::NonCanonical { what: "snapshot", .. })));
        // The fuzzer's input, kept as a regression.
        let found = include_bytes!("../../fuzz/corpus/durable_snapshot/regress-unsorted-violations");
        assert!(matches!(decode_snapshot(found), Err(DurableError::NonCanonical { what: "snapshot", .. })));
    }
}
