//! The server's durable state on disk: the coordinator's last snapshot and
//! its write-ahead log (see `tally_protocol::durable`).
//!
//! Layout of the state directory:
//! - `snapshot.bin`: `b"TLYSNAP1"`, generation (u64 LE), payload length (u64
//!   LE), SHA-256 of the payload (32 bytes), payload (an encoded snapshot).
//!   Replaced atomically: written to `snapshot.tmp`, fsynced, renamed, and the
//!   directory fsynced.
//! - `wal.bin`: `b"TLYWAL01"`, generation (u64 LE), then frames of payload
//!   length (u32 LE), CRC-32 of the payload (u32 LE), payload (an encoded
//!   record). Every append is fsynced before the caller sends anything that
//!   depends on it.
//!
//! A log whose generation differs from the snapshot's is stale (the server
//! died between writing a snapshot and starting the new log) and is ignored:
//! the snapshot already contains it. A torn last frame (the process died
//! mid-append, before the fsync returned and so before any acknowledgement)
//! is dropped with a warning. Any other damage — a bad checksum, a bad
//! magic, a frame cut in the middle of the log — is an error: state is never
//! used silently when it cannot be trusted.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tally_protocol::durable::{self, DurableError, MAX_RECORD_BYTES, MAX_SNAPSHOT_BYTES, Persist, Record, Snapshot};
use tracing::warn;

const SNAP_MAGIC: &[u8; 8] = b"TLYSNAP1";
const WAL_MAGIC: &[u8; 8] = b"TLYWAL01";
const SNAP_HEADER: usize = 8 + 8 + 8 + 32;
const WAL_HEADER: usize = 8 + 8;

/// Errors reading or writing state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// File system.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A state file that fails its checks.
    #[error("{path}: corrupted state: {reason}")]
    Corrupted {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Decodable bytes that the coordinator cannot use.
    #[error("{path}: {source}")]
    Durable {
        /// File.
        path: PathBuf,
        /// Why.
        source: DurableError,
    },
}

/// What a state directory held at start.
#[derive(Debug)]
pub struct Recovered {
    /// The last snapshot.
    pub snapshot: Snapshot,
    /// Records written after it.
    pub records: Vec<Record>,
}

/// An open state directory.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    generation: u64,
    wal: File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_path_buf(), source }
}

fn corrupted(path: &Path, reason: impl Into<String>) -> StateError {
    StateError::Corrupted { path: path.to_path_buf(), reason: reason.into() }
}

impl StateDir {
    /// Opens (creating) `dir` and reads what it holds.
    pub fn open(dir: &Path) -> Result<(StateDir, Option<Recovered>), StateError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let snap_path = dir.join("snapshot.bin");
        let wal_path = dir.join("wal.bin");
        let recovered = if snap_path.exists() {
            let (generation, snapshot) = read_snapshot(&snap_path)?;
            let records = read_wal(&wal_path, generation)?.unwrap_or_default();
            Some((generation, Recovered { snapshot, records }))
        } else {
            None
        };
        let generation = recovered.as_ref().map_or(0, |(g, _)| *g);
        // Keep appending to a log of the current generation; otherwise start one.
        let wal = match &recovered {
            Some(_) if wal_generation(&wal_path) == Some(generation) => {
                OpenOptions::new().append(true).open(&wal_path).map_err(io(&wal_path))?
            }
            _ => new_wal(&wal_path, generation)?,
        };
        Ok((StateDir { dir: dir.to_path_buf(), generation, wal }, recovered.map(|(_, r)| r)))
    }

    /// Makes `p` durable.
    pub fn persist(&mut self, p: &Persist) -> Result<(), StateError> {
        match p {
            Persist::Snapshot(s) => {
                let generation = self.generation.saturating_add(1);
                write_snapshot(&self.dir, generation, s)?;
                let wal_path = self.dir.join("wal.bin");
                self.wal = new_wal(&wal_path, generation)?;
                self.generation = generation;
            }
            Persist::Append(r) => {
                let frame = wal_frame(r).ok_or_else(|| corrupted(&self.dir, "record too large"))?;
                let wal_path = self.dir.join("wal.bin");
                self.wal.write_all(&frame).map_err(io(&wal_path))?;
                self.wal.sync_data().map_err(io(&wal_path))?;
            }
        }
        Ok(())
    }
}

fn write_snapshot(dir: &Path, generation: u64, s: &Snapshot) -> Result<(), StateError> {
    let bytes = snapshot_file(generation, s);
    let tmp = dir.join("snapshot.tmp");
    let path = dir.join("snapshot.bin");
    {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    // The rename itself must survive a crash.
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(())
}

/// The bytes of `snapshot.bin` for snapshot `s` of `generation`.
pub fn snapshot_file(generation: u64, s: &Snapshot) -> Vec<u8> {
    let payload = durable::encode_snapshot(s);
    let mut out = Vec::with_capacity(SNAP_HEADER + payload.len());
    out.extend_from_slice(SNAP_MAGIC);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    out
}

fn read_snapshot(path: &Path) -> Result<(u64, Snapshot), StateError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_SNAPSHOT_BYTES as u64 + SNAP_HEADER as u64 + 1).read_to_end(&mut bytes))
        .map_err(io(path))?;
    parse_snapshot(path, &bytes)
}

/// Checks and decodes the bytes of a snapshot file (`path` only names it in
/// errors): the generation and the snapshot.
pub fn parse_snapshot(path: &Path, bytes: &[u8]) -> Result<(u64, Snapshot), StateError> {
    let (head, payload) = bytes.split_at_checked(SNAP_HEADER).ok_or_else(|| corrupted(path, "truncated header"))?;
    if &head[..8] != SNAP_MAGIC {
        return Err(corrupted(path, "not a Tally snapshot (bad magic)"));
    }
    let generation = u64::from_le_bytes(head[8..16].try_into().unwrap_or([0; 8]));
    let len = u64::from_le_bytes(head[16..24].try_into().unwrap_or([0; 8]));
    if len != payload.len() as u64 {
        return Err(corrupted(path, format!("payload is {} bytes, header says {len}", payload.len())));
    }
    if Sha256::digest(payload).as_slice() != &head[24..56] {
        return Err(corrupted(path, "checksum mismatch"));
    }
    let snapshot =
        durable::decode_snapshot(payload).map_err(|source| StateError::Durable { path: path.into(), source })?;
    Ok((generation, snapshot))
}

fn wal_generation(path: &Path) -> Option<u64> {
    let mut head = [0u8; WAL_HEADER];
    File::open(path).and_then(|mut f| f.read_exact(&mut head)).ok()?;
    (&head[..8] == WAL_MAGIC).then(|| u64::from_le_bytes(head[8..16].try_into().unwrap_or([0; 8])))
}

fn new_wal(path: &Path, generation: u64) -> Result<File, StateError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(&wal_header(generation)).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    }
    Ok(f)
}

/// Reads the records of a log of `generation`; `None` if the log is missing
/// or belongs to another generation (stale).
fn read_wal(path: &Path, generation: u64) -> Result<Option<Vec<Record>>, StateError> {
    let Ok(mut f) = File::open(path) else { return Ok(None) };
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(io(path))?;
    parse_wal(path, &bytes, generation)
}

/// The header of a log of `generation` (the bytes before its first frame).
pub fn wal_header(generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(WAL_HEADER);
    out.extend_from_slice(WAL_MAGIC);
    out.extend_from_slice(&generation.to_le_bytes());
    out
}

/// One log frame: payload length, CRC-32, the encoded record; `None` for a
/// record whose length does not fit the u32 length field.
pub fn wal_frame(r: &Record) -> Option<Vec<u8>> {
    let payload = durable::encode_record(r);
    let len = u32::try_from(payload.len()).ok()?;
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    Some(frame)
}

/// Checks and decodes the bytes of a log file (`path` only names it in
/// errors and warnings): its records, or `None` if it holds nothing of
/// `generation` (see [`read_wal`]).
pub fn parse_wal(path: &Path, bytes: &[u8], generation: u64) -> Result<Option<Vec<Record>>, StateError> {
    let Some((head, mut rest)) = bytes.split_at_checked(WAL_HEADER) else {
        // The header is written and fsynced before any record: a short file
        // is a log that never got its header, holding nothing.
        return Ok(None);
    };
    if &head[..8] != WAL_MAGIC {
        return Err(corrupted(path, "not a Tally log (bad magic)"));
    }
    if u64::from_le_bytes(head[8..16].try_into().unwrap_or([0; 8])) != generation {
        warn!(path = %path.display(), "write-ahead log is older than the snapshot; ignoring it");
        return Ok(None);
    }
    let mut records = Vec::new();
    while !rest.is_empty() {
        let torn = |what: &str| {
            warn!(path = %path.display(), records = records.len(), "dropping a torn last log frame ({what})");
        };
        let Some((frame_head, body)) = rest.split_at_checked(8) else {
            torn("short header");
            break;
        };
        let len = u32::from_le_bytes(frame_head[..4].try_into().unwrap_or([0; 4])) as usize;
        let crc = u32::from_le_bytes(frame_head[4..8].try_into().unwrap_or([0; 4]));
        if len > MAX_RECORD_BYTES {
            return Err(corrupted(path, format!("frame {} claims {len} bytes", records.len())));
        }
        let Some((payload, after)) = body.split_at_checked(len) else {
            torn("short payload");
            break;
        };
        if crc32fast::hash(payload) != crc {
            if after.is_empty() {
                torn("checksum");
                break;
            }
            return Err(corrupted(path, format!("checksum mismatch in frame {} with frames after it", records.len())));
        }
        let record =
            durable::decode_record(payload).map_err(|source| StateError::Durable { path: path.into(), source })?;
        records.push(record);
        rest = after;
    }
    Ok(Some(records))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tally_protocol::wire::{RunId, SignatureBytes, Task};

    fn snap(rounds: u32) -> Snapshot {
        Snapshot {
            version: durable::DURABLE_VERSION,
            run_id: RunId([3; 16]),
            rng_seed: 9,
            enrolled_hash: [1; 32],
            completed_rounds: rounds,
            evaluated: false,
            model: vec![0.5; 100],
            violations: Default::default(),
            replica_checkpoint: None,
            aggregator_state: None,
        }
    }

    fn rec(i: u32) -> Record {
        Record::Accepted { client: i, body: vec![i as u8; 50], signature: SignatureBytes([7; 64]) }
    }

    #[test]
    fn round_trip_generations_and_stale_logs() {
        let dir = tempfile::tempdir().unwrap();
        let (mut st, rec0) = StateDir::open(dir.path()).unwrap();
        assert!(rec0.is_none());
        st.persist(&Persist::Snapshot(snap(0))).unwrap();
        st.persist(&Persist::Append(Record::RoundOpened { round: 1, task: Task::Train, sampled: vec![0, 1] })).unwrap();
        st.persist(&Persist::Append(rec(0))).unwrap();
        drop(st);
        let (mut st, got) = StateDir::open(dir.path()).unwrap();
        let got = got.unwrap();
        assert_eq!(got.snapshot, snap(0));
        assert_eq!(got.records.len(), 2);
        // Appending continues the same log.
        st.persist(&Persist::Append(rec(1))).unwrap();
        drop(st);
        let (_, got) = StateDir::open(dir.path()).unwrap();
        assert_eq!(got.unwrap().records.len(), 3);
        // A snapshot written but the log not yet replaced: the stale log is ignored.
        write_snapshot(dir.path(), 2, &snap(1)).unwrap();
        let (_, got) = StateDir::open(dir.path()).unwrap();
        let got = got.unwrap();
        assert_eq!(got.snapshot.completed_rounds, 1);
        assert!(got.records.is_empty());
    }

    #[test]
    fn torn_tail_is_dropped_but_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut st, _) = StateDir::open(dir.path()).unwrap();
        st.persist(&Persist::Snapshot(snap(0))).unwrap();
        for i in 0..3 {
            st.persist(&Persist::Append(rec(i))).unwrap();
        }
        drop(st);
        let wal = dir.path().join("wal.bin");
        let full = std::fs::read(&wal).unwrap();
        // Cut the last frame in half: a crash mid-append.
        std::fs::write(&wal, &full[..full.len() - 20]).unwrap();
        let (_, got) = StateDir::open(dir.path()).unwrap();
        assert_eq!(got.unwrap().records.len(), 2);
        // Flip a byte in the first frame: corruption, refused.
        let mut bad = full.clone();
        bad[WAL_HEADER + 8 + 3] ^= 1;
        std::fs::write(&wal, &bad).unwrap();
        assert!(matches!(StateDir::open(dir.path()), Err(StateError::Corrupted { .. })));
        // A damaged snapshot is refused too.
        std::fs::write(&wal, &full).unwrap();
        let sp = dir.path().join("snapshot.bin");
        let mut s = std::fs::read(&sp).unwrap();
        let last = s.len() - 1;
        s[last] ^= 0xff;
        std::fs::write(&sp, &s).unwrap();
        let err = StateDir::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        std::fs::write(&sp, &s[..10]).unwrap();
        assert!(matches!(StateDir::open(dir.path()), Err(StateError::Corrupted { .. })));
    }
}
