//! The server's durable state on disk: the coordinator's last snapshot and
//! its write-ahead log (see `tally_protocol::durable`).
//!
//! Layout of the state directory:
//! - `lock`: held with an exclusive advisory lock (`flock`) while a server
//!   uses the directory, so a second server on the same run is refused
//!   instead of interleaving its writes; it holds the owner's pid. The
//!   kernel releases the lock when the process dies, even by `kill -9`.
//! - `snapshot.bin`: `b"TLYSNAP1"`, generation (u64 LE), payload length (u64
//!   LE), SHA-256 of the payload (32 bytes), payload (an encoded snapshot).
//!   Replaced atomically: written to `snapshot.tmp`, fsynced, renamed, and the
//!   directory fsynced.
//! - `wal.bin`: `b"TLYWAL01"`, generation (u64 LE), then frames of payload
//!   length (u32 LE), CRC-32 of the payload (u32 LE), payload (an encoded
//!   record). Every append is fsynced before the caller sends anything that
//!   depends on it. It is created with the first snapshot, never before.
//! - `run.json`: the run's configuration as it started (see
//!   `crate::config::RunRecord`), written before the first snapshot; a
//!   restart compares against it.
//! - `metrics-pending.json`: the newest metrics row, waiting for the
//!   evaluation of its model (see `crate::metrics`).
//!
//! A log whose generation differs from the snapshot's is stale (the server
//! died between writing a snapshot and starting the new log) and is ignored:
//! the snapshot already contains it. A torn last frame (the process died
//! mid-append, before the fsync returned and so before any acknowledgement)
//! is dropped with a warning and cut off the file before anything is
//! appended. It is told apart from corruption by what follows it: a torn
//! frame is the last thing in the file, so a damaged frame with a valid
//! frame anywhere after it is corruption. Any other damage — a bad checksum
//! followed by more bytes, a bad magic, a length no record can have, a
//! snapshot without its log or a log without its snapshot — is an error:
//! state is never used silently when it cannot be trusted, and a new run is
//! never started over what is left of an old one.

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
const FRAME_HEADER: usize = 4 + 4;

/// Bytes of payload a search for valid frames after a damaged one may
/// checksum before giving up (and refusing the log, the safe answer). A real
/// torn tail is a prefix of one record, in which few offsets even look like
/// a frame (see [`find_frame`]), so this is far above what one needs; it
/// bounds the start-up time on a hostile file (a quarter-second of CRC-32).
pub const MAX_SCAN_BYTES: usize = 256 * 1024 * 1024;

/// Variants of [`Record`]: its encoding starts with the index, one byte.
const RECORD_VARIANTS: u8 = 4;

/// File names in the state directory.
const SNAPSHOT_FILE: &str = "snapshot.bin";
const WAL_FILE: &str = "wal.bin";
const LOCK_FILE: &str = "lock";
const RUN_FILE: &str = "run.json";
const PENDING_METRICS_FILE: &str = "metrics-pending.json";
/// Written once a finished run's outputs are on disk and its clients were
/// told (or had their chance): a server started on the directory refuses
/// it instead of running nothing. Without it, a finished state is one whose
/// server stopped before that, and a restart writes the outputs again and
/// tells the clients still reconnecting.
const CLOSED_FILE: &str = "closed";

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
    /// Another process holds the directory's lock.
    #[error(
        "{dir} is in use by another tally-server ({holder}); two servers on one state directory would corrupt the run"
    )]
    Locked {
        /// The state directory.
        dir: PathBuf,
        /// Who holds it, as far as the lock file says.
        holder: String,
    },
    /// One of the snapshot and the log is there without the other.
    #[error(
        "{dir}: {present} is present but {missing} is missing, so the saved run cannot be resumed; \
         refusing to start a new run over it (restore {missing}, or move the directory away to start afresh)"
    )]
    Incomplete {
        /// The state directory.
        dir: PathBuf,
        /// The file found.
        present: &'static str,
        /// The file missing.
        missing: &'static str,
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

/// An open state directory, locked for this process until dropped.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    generation: u64,
    /// `None` until the first snapshot of a new run: a log is never created
    /// without the snapshot it follows.
    wal: Option<File>,
    /// Holds the directory's exclusive lock (released when closed).
    _lock: File,
}

/// A parsed log: its records and how many bytes of the file they (and the
/// header) take; anything after is a torn frame to cut off.
#[derive(Debug)]
pub struct Wal {
    /// The records, in order.
    pub records: Vec<Record>,
    /// Length of the valid prefix of the file.
    pub valid_len: usize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_path_buf(), source }
}

fn corrupted(path: &Path, reason: impl Into<String>) -> StateError {
    StateError::Corrupted { path: path.to_path_buf(), reason: reason.into() }
}

impl StateDir {
    /// Opens (creating) `dir`, takes its lock and reads what it holds: the
    /// saved run, or `None` for a directory that holds none.
    pub fn open(dir: &Path) -> Result<(StateDir, Option<Recovered>), StateError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        // First of all: nothing is read or written without the lock.
        let lock = lock_dir(dir)?;
        let snap_path = dir.join(SNAPSHOT_FILE);
        let wal_path = dir.join(WAL_FILE);
        let incomplete = |present, missing| StateError::Incomplete { dir: dir.to_path_buf(), present, missing };
        match (snap_path.exists(), wal_path.exists()) {
            (false, false) => {
                return Ok((StateDir { dir: dir.to_path_buf(), generation: 0, wal: None, _lock: lock }, None));
            }
            // Starting afresh here would overwrite the log: acknowledged
            // reports, and the only trace of the run.
            (false, true) => return Err(incomplete(WAL_FILE, SNAPSHOT_FILE)),
            // The log is created with the first snapshot and only ever
            // replaced, never removed: without it, acknowledged reports are gone.
            (true, false) => return Err(incomplete(SNAPSHOT_FILE, WAL_FILE)),
            (true, true) => {}
        }
        let (generation, snapshot) = read_snapshot(&snap_path)?;
        // Keep appending to a log of the current generation, without its torn
        // tail (appended after, it would read as corruption next time);
        // otherwise start one.
        let (wal, records) = match read_wal(&wal_path, generation)? {
            Some(parsed) => {
                let f = OpenOptions::new().append(true).open(&wal_path).map_err(io(&wal_path))?;
                let len = f.metadata().map_err(io(&wal_path))?.len();
                if len > parsed.valid_len as u64 {
                    f.set_len(parsed.valid_len as u64).map_err(io(&wal_path))?;
                    f.sync_all().map_err(io(&wal_path))?;
                }
                (f, parsed.records)
            }
            None => (new_wal(&wal_path, generation)?, Vec::new()),
        };
        let recovered = Recovered { snapshot, records };
        Ok((StateDir { dir: dir.to_path_buf(), generation, wal: Some(wal), _lock: lock }, Some(recovered)))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the metrics writer keeps the row awaiting its evaluation.
    pub fn pending_metrics_path(&self) -> PathBuf {
        self.dir.join(PENDING_METRICS_FILE)
    }

    /// The run's configuration as saved when it started (`run.json`), if any.
    pub fn saved_config(&self) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.dir.join(RUN_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Saves the run's configuration (atomically, durably).
    pub fn save_config(&self, bytes: &[u8]) -> Result<(), StateError> {
        let path = self.dir.join(RUN_FILE);
        write_durably(&self.dir, &path, bytes)
    }

    /// Whether the finished run in this directory was closed
    /// ([`StateDir::mark_closed`]).
    pub fn is_closed(&self) -> bool {
        self.dir.join(CLOSED_FILE).exists()
    }

    /// Records that the finished run's outputs are written and its clients
    /// told (durably, like the rest of the state).
    pub fn mark_closed(&self, summary: &[u8]) -> Result<(), StateError> {
        write_durably(&self.dir, &self.dir.join(CLOSED_FILE), summary)
    }

    /// Makes `p` durable.
    pub fn persist(&mut self, p: &Persist) -> Result<(), StateError> {
        let wal_path = self.dir.join(WAL_FILE);
        match p {
            Persist::Snapshot(s) => {
                let generation = self.generation.saturating_add(1);
                write_snapshot(&self.dir, generation, s)?;
                self.wal = Some(new_wal(&wal_path, generation)?);
                self.generation = generation;
            }
            Persist::Append(r) => {
                // The coordinator snapshots before it logs anything; a record
                // without a log to follow would be lost on restart, so refuse.
                let wal =
                    self.wal.as_mut().ok_or_else(|| corrupted(&wal_path, "a record before the first snapshot"))?;
                let frame = wal_frame(r).ok_or_else(|| corrupted(&wal_path, "record too large"))?;
                wal.write_all(&frame).map_err(io(&wal_path))?;
                wal.sync_data().map_err(io(&wal_path))?;
            }
        }
        Ok(())
    }
}

/// Takes the exclusive lock of `dir` (its `lock` file) and writes our pid
/// into it; refuses if another process holds it.
fn lock_dir(dir: &Path) -> Result<File, StateError> {
    let path = dir.join(LOCK_FILE);
    let mut f =
        OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            // The pid is a courtesy for the message; the lock is the guard.
            let _ = f.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "lock held".to_string(),
                pid => format!("pid {}", pid.chars().take(20).collect::<String>()),
            };
            return Err(StateError::Locked { dir: dir.to_path_buf(), holder });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
    }
    f.set_len(0).map_err(io(&path))?;
    f.write_all(std::process::id().to_string().as_bytes()).map_err(io(&path))?;
    Ok(f)
}

/// Writes `path` in `dir` atomically: temp file, fsync, rename, fsync of
/// the directory.
fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    // The rename itself must survive a crash.
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn write_snapshot(dir: &Path, generation: u64, s: &Snapshot) -> Result<(), StateError> {
    write_durably(dir, &dir.join(SNAPSHOT_FILE), &snapshot_file(generation, s))
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

fn new_wal(path: &Path, generation: u64) -> Result<File, StateError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(&wal_header(generation)).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    }
    Ok(f)
}

/// Reads the records of a log of `generation`; `None` if the log belongs to
/// another generation (stale) or never got its header.
fn read_wal(path: &Path, generation: u64) -> Result<Option<Wal>, StateError> {
    let mut bytes = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io(path))?;
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
pub fn parse_wal(path: &Path, bytes: &[u8], generation: u64) -> Result<Option<Wal>, StateError> {
    let Some(head) = bytes.get(..WAL_HEADER) else {
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
    let mut pos = WAL_HEADER;
    while let Some(rest) = bytes.get(pos..).filter(|r| !r.is_empty()) {
        let damage = match rest.split_at_checked(FRAME_HEADER) {
            None => "short header",
            Some((frame_head, body)) => {
                let len = u32::from_le_bytes(frame_head[..4].try_into().unwrap_or([0; 4])) as usize;
                let crc = u32::from_le_bytes(frame_head[4..8].try_into().unwrap_or([0; 4]));
                // We never write such a frame, torn or not: the length is
                // written whole with the rest of the header.
                if len > MAX_RECORD_BYTES {
                    return Err(corrupted(path, format!("frame {} at byte {pos} claims {len} bytes", records.len())));
                }
                match body.split_at_checked(len) {
                    None => "short payload",
                    Some((payload, _)) if crc32fast::hash(payload) != crc => {
                        if body.len() > len {
                            return Err(corrupted(
                                path,
                                format!(
                                    "checksum mismatch in frame {} at byte {pos}, with bytes after it",
                                    records.len()
                                ),
                            ));
                        }
                        "checksum"
                    }
                    Some((payload, _)) => {
                        let record = durable::decode_record(payload)
                            .map_err(|source| StateError::Durable { path: path.into(), source })?;
                        records.push(record);
                        pos += FRAME_HEADER + len;
                        continue;
                    }
                }
            }
        };
        // A damaged frame that runs to the end of the file: a torn append,
        // unless a valid frame follows it (then its length field is what is
        // damaged, and dropping it would drop acknowledged reports).
        let after = pos + 1;
        match find_frame(bytes.get(after..).unwrap_or_default()) {
            Scan::Found(at) => {
                return Err(corrupted(
                    path,
                    format!(
                        "frame {} at byte {pos} is damaged ({damage}) but a valid frame follows at byte {}: \
                         the log is corrupted, not torn",
                        records.len(),
                        after + at
                    ),
                ));
            }
            Scan::GaveUp => {
                return Err(corrupted(
                    path,
                    format!(
                        "frame {} at byte {pos} is damaged ({damage}) and the {} bytes after it could not be \
                         checked for valid frames within {MAX_SCAN_BYTES} bytes of checksums",
                        records.len(),
                        bytes.len() - after
                    ),
                ));
            }
            Scan::Nothing => {
                warn!(
                    path = %path.display(),
                    records = records.len(),
                    dropped_bytes = bytes.len() - pos,
                    "dropping a torn last log frame ({damage})"
                );
                break;
            }
        }
    }
    Ok(Some(Wal { records, valid_len: pos }))
}

/// What a search for a valid frame found.
enum Scan {
    /// One starts at this offset.
    Found(usize),
    /// None anywhere.
    Nothing,
    /// [`MAX_SCAN_BYTES`] spent before the end.
    GaveUp,
}

/// Looks for a valid frame (length in range and within `bytes`, a record
/// variant, matching CRC, decodable) at every offset of `bytes`.
fn find_frame(bytes: &[u8]) -> Scan {
    let mut budget = MAX_SCAN_BYTES;
    for start in 0..bytes.len() {
        let Some(head) = bytes.get(start..start + FRAME_HEADER) else { break };
        let len = u32::from_le_bytes(head[..4].try_into().unwrap_or([0; 4])) as usize;
        // No record encodes to zero bytes, and none is longer than the limit.
        if len == 0 || len > MAX_RECORD_BYTES {
            continue;
        }
        let Some(payload) = bytes.get(start + FRAME_HEADER..start + FRAME_HEADER + len) else { continue };
        // A record starts with its variant index (a cheap filter before the
        // checksum: a float's bytes rarely pass it).
        if payload.first().is_none_or(|v| *v >= RECORD_VARIANTS) {
            continue;
        }
        let Some(left) = budget.checked_sub(len) else { return Scan::GaveUp };
        budget = left;
        let crc = u32::from_le_bytes(head[4..8].try_into().unwrap_or([0; 4]));
        if crc32fast::hash(payload) == crc && durable::decode_record(payload).is_ok() {
            return Scan::Found(start);
        }
    }
    Scan::Nothing
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

    /// A directory with a snapshot and `n` records appended; the log's bytes.
    fn with_records(dir: &Path, n: u32) -> Vec<u8> {
        let (mut st, _) = StateDir::open(dir).unwrap();
        st.persist(&Persist::Snapshot(snap(0))).unwrap();
        for i in 0..n {
            st.persist(&Persist::Append(rec(i))).unwrap();
        }
        std::fs::read(dir.join(WAL_FILE)).unwrap()
    }

    /// Issue 10: a corrupted length field in the first frame, valid frames
    /// after it, was read as a torn tail and every acknowledged report
    /// dropped with a warning. Whatever the damaged length claims (past the
    /// end of the file, exactly to it, or short of it), it is corruption.
    #[test]
    fn a_damaged_frame_followed_by_valid_frames_is_corruption_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let full = with_records(dir.path(), 3);
        let wal = dir.path().join(WAL_FILE);
        let rest = (full.len() - WAL_HEADER - FRAME_HEADER) as u32;
        for claimed in [rest + 1000, rest, 10, 0x0100_0000] {
            let mut bad = full.clone();
            bad[WAL_HEADER..WAL_HEADER + 4].copy_from_slice(&claimed.to_le_bytes());
            std::fs::write(&wal, &bad).unwrap();
            let err = StateDir::open(dir.path()).unwrap_err();
            assert!(matches!(err, StateError::Corrupted { .. }), "length {claimed}: {err}");
            // Refused, and nothing was cut off the file.
            assert_eq!(std::fs::read(&wal).unwrap(), bad);
        }
        // Damage in the middle frame's length, too.
        let frame = wal_frame(&rec(0)).unwrap().len();
        let mut bad = full.clone();
        let at = WAL_HEADER + frame;
        bad[at..at + 4].copy_from_slice(&(rest * 2).to_le_bytes());
        std::fs::write(&wal, &bad).unwrap();
        let err = StateDir::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("frame 1") && err.contains("corrupted, not torn"), "{err}");
    }

    /// A torn tail is cut off the file before appending: appended after it,
    /// it would read as damage in the middle on the next start.
    #[test]
    fn a_torn_tail_is_cut_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let full = with_records(dir.path(), 3);
        let wal = dir.path().join(WAL_FILE);
        for cut in [3, 20, 60] {
            std::fs::write(&wal, &full[..full.len() - cut]).unwrap();
            let (mut st, got) = StateDir::open(dir.path()).unwrap();
            assert_eq!(got.unwrap().records.len(), 2, "cut {cut}");
            st.persist(&Persist::Append(rec(9))).unwrap();
            drop(st);
            let (_, got) = StateDir::open(dir.path()).unwrap();
            assert_eq!(got.unwrap().records, vec![rec(0), rec(1), rec(9)], "cut {cut}");
        }
    }

    /// Issue 10: with `snapshot.bin` deleted, the server started a new run
    /// and overwrote the log. Now either file alone is refused, and left as
    /// it was; a new directory starts with neither (the log comes with the
    /// first snapshot, so a crash before it leaves nothing to trip on).
    #[test]
    fn a_log_without_its_snapshot_or_a_snapshot_without_its_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (st, got) = StateDir::open(dir.path()).unwrap();
        assert!(got.is_none());
        drop(st);
        assert!(!dir.path().join(WAL_FILE).exists());
        assert!(StateDir::open(dir.path()).unwrap().1.is_none());

        let full = with_records(dir.path(), 2);
        let wal = dir.path().join(WAL_FILE);
        let snapshot = std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap();
        std::fs::remove_file(dir.path().join(SNAPSHOT_FILE)).unwrap();
        let err = StateDir::open(dir.path()).unwrap_err();
        assert!(matches!(err, StateError::Incomplete { missing: "snapshot.bin", .. }), "{err}");
        assert!(err.to_string().contains("refusing to start a new run"), "{err}");
        assert_eq!(std::fs::read(&wal).unwrap(), full, "the log was touched");

        std::fs::write(dir.path().join(SNAPSHOT_FILE), &snapshot).unwrap();
        std::fs::remove_file(&wal).unwrap();
        let err = StateDir::open(dir.path()).unwrap_err();
        assert!(matches!(err, StateError::Incomplete { missing: "wal.bin", .. }), "{err}");
    }

    /// Issue 10: two servers could run on one state directory at once.
    #[test]
    fn a_second_opener_of_a_locked_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = StateDir::open(dir.path()).unwrap();
        let err = StateDir::open(dir.path()).unwrap_err();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        let (_again, _) = StateDir::open(dir.path()).unwrap();
    }

    #[test]
    fn the_run_config_is_saved_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (st, _) = StateDir::open(dir.path()).unwrap();
        assert_eq!(st.saved_config().unwrap(), None);
        st.save_config(b"{}").unwrap();
        assert_eq!(st.saved_config().unwrap().as_deref(), Some(&b"{}"[..]));
    }
}
