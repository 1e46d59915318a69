//! Error taxonomy (after rustls): what went wrong, and whose fault it is.
//!
//! - [`Malformed`]: the bytes are not a message.
//! - [`Misbehaviour`]: a well-formed message a correct peer would not send
//!   (bad signature, wrong round, duplicate, wrong dimension, non-finite
//!   value, a ranking that is not a permutation). Counted per client.
//! - [`Incompatibility`]: a correct peer of another version.
//! - [`Misuse`]: the local host called the state machine wrongly.
//! - [`Error::Late`]: a report for a round that already closed. Refused, but
//!   not misbehaviour (a correct, slow client sends it), so never counted.
//!
//! Every peer-caused error maps to a [`RejectCode`] sent back to the peer.

use crate::wire::RejectCode;

/// The bytes are not a valid message.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Malformed {
    /// The message ended early.
    #[error("truncated message")]
    Truncated,
    /// Larger than the limit the receiver reads.
    #[error("message of {len} bytes exceeds the limit of {limit}")]
    Oversize {
        /// Size seen (a lower bound when the reader stopped at the limit).
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Does not start with the Tally magic.
    #[error("not a Tally frame (bad magic)")]
    BadMagic,
    /// bincode refused the body.
    #[error("undecodable body: {0}")]
    Decode(String),
    /// Bytes after the end of the message.
    #[error("{extra} trailing bytes after the message")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// A length prefix claims more content than the frame can hold (refused
    /// before anything is reserved for it).
    #[error("a length prefix claims more than the {len}-byte frame holds")]
    ClaimTooLarge {
        /// Size of the frame (or report body) being decoded.
        len: usize,
    },
    /// A valid value in a non-canonical encoding (an integer written in more
    /// bytes than needed): every message has exactly one encoding.
    #[error("non-canonical encoding (an integer in more bytes than needed)")]
    NonCanonical,
    /// A field longer than its wire limit (e.g. [`crate::wire::MAX_DETAIL_BYTES`]).
    #[error("{field} is {len} bytes, the limit is {limit}")]
    FieldTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
}

/// A peer of another protocol version.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Incompatibility {
    /// Different wire version.
    #[error("protocol version {theirs} is not ours ({ours})")]
    Version {
        /// Ours.
        ours: u8,
        /// Theirs.
        theirs: u8,
    },
}

/// A well-formed message that a correct peer would not send.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Misbehaviour {
    /// A replica's hash after replaying the server's log differs from the
    /// hash the server announced (either side may be at fault; the client
    /// resynchronises from a checkpoint).
    #[error("replica of round {round} does not match the server's model hash")]
    ReplicaMismatch {
        /// The round.
        round: u32,
    },
    /// A round log that does not follow the replica's round.
    #[error("round log {got} does not follow round {have}")]
    OutOfOrderLog {
        /// The replica's round.
        have: u32,
        /// The log's round.
        got: u32,
    },
    /// The key in `Join` is not enrolled.
    #[error("public key {0} is not enrolled")]
    NotEnrolled(String),
    /// A message other than `Join` before joining.
    #[error("{0} before a successful Join")]
    NotJoined(&'static str),
    /// The signature does not verify under the client's key.
    #[error("bad signature")]
    BadSignature,
    /// Signed for another run.
    #[error("report for another run")]
    WrongRun,
    /// Not the open round (a replay, a stale or a premature report).
    #[error("report for round {got}, open round is {open:?}")]
    WrongRound {
        /// The round open now, if any.
        open: Option<u32>,
        /// The round in the report.
        got: u32,
    },
    /// A second report for the round.
    #[error("duplicate report for round {0}")]
    Duplicate(u32),
    /// The client was not asked this round.
    #[error("client was not sampled for round {0}")]
    NotSampled(u32),
    /// Update vector of the wrong length.
    #[error("update has {got} values, the model has {expected}")]
    WrongDimension {
        /// Model size.
        expected: usize,
        /// Update size.
        got: usize,
    },
    /// A missing update in a training round, or one in an evaluation round.
    #[error("wrong update kind: {0}")]
    WrongKind(&'static str),
    /// A payload tagged for another update kind than the run's.
    #[error("payload of kind {} in a {run} run", got.0)]
    KindMismatch {
        /// The run's kind.
        run: &'static str,
        /// The payload's tag.
        got: crate::kind::KindId,
    },
    /// NaN or infinity.
    #[error("non-finite value at index {0}")]
    NonFinite(usize),
    /// A finite value whose magnitude exceeds the run's bound on dense
    /// updates (`CoordinatorConfig::max_update_abs`): finite values of 1e30
    /// pass every NaN check and still ruin the model for everyone.
    #[error("value at index {index} exceeds the run's bound on |update value| ({limit})")]
    OutOfBounds {
        /// Flat index of the first value out of bounds.
        index: usize,
        /// The bound, as text (an `f32`, which is not `Eq`).
        limit: String,
    },
    /// A payload (or published model) the run's update kind refused.
    #[error("bad {kind} payload: {fault}")]
    BadPayload {
        /// The kind that refused it.
        kind: &'static str,
        /// Why.
        fault: PayloadFault,
    },
    /// Sample count of zero or above the limit.
    #[error("sample count {0} out of range")]
    BadSampleCount(u64),
    /// A message kind that is not valid in the receiver's state.
    #[error("unexpected {0}")]
    Unexpected(&'static str),
}

/// Why an update kind refused a payload, in terms every kind can use: the
/// core's error type names no particular kind.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PayloadFault {
    /// The payload (or one of its parts, e.g. a layer) has the wrong size.
    #[error("{} has {got} entries, expected {expected}", part.map_or("payload".to_string(), |p| format!("part {p}")))]
    Length {
        /// The part, if the payload has parts.
        part: Option<usize>,
        /// The size the run expects.
        expected: usize,
        /// The size received.
        got: usize,
    },
    /// Bytes after the end of the payload.
    #[error("{extra} trailing bytes")]
    Trailing {
        /// How many.
        extra: usize,
    },
    /// An entry outside its part's range: not a permutation.
    #[error("part {part}: entry {index} is out of range (not a permutation)")]
    NotAPermutation {
        /// The part.
        part: usize,
        /// Position of the entry.
        index: usize,
    },
    /// An entry repeating an earlier one: not a permutation.
    #[error("part {part}: entry {index} repeats an earlier one (not a permutation)")]
    Repeated {
        /// The part.
        part: usize,
        /// Position of the entry.
        index: usize,
    },
    /// An entry naming an index outside the run (Ferret: a seed or block
    /// that does not exist).
    #[error("entry {index} is out of range")]
    OutOfRange {
        /// Position of the entry.
        index: usize,
    },
    /// An entry that repeats or precedes the one before it, in a payload
    /// whose entries must be strictly ascending (one encoding per content).
    #[error("entry {index} is not after the one before it (entries must be strictly ascending)")]
    NotAscending {
        /// Position of the entry.
        index: usize,
    },
    /// A non-canonical encoding (non-zero padding bits): a second encoding
    /// of the same value, or a covert channel.
    #[error("part {part}: non-canonical encoding")]
    NonCanonical {
        /// The part.
        part: usize,
    },
}

impl PayloadFault {
    /// Whether the content, not the shape, is at fault.
    pub fn is_content_fault(&self) -> bool {
        matches!(
            self,
            PayloadFault::NotAPermutation { .. } | PayloadFault::Repeated { .. } | PayloadFault::NonCanonical { .. }
        )
    }
}

/// The host called the state machine in a way the protocol forbids.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Misuse {
    /// No such connection.
    #[error("unknown connection")]
    UnknownConnection,
    /// `submit_*` while no task is pending.
    #[error("no task is pending")]
    NoPendingTask,
    /// The submission does not fit the pending task.
    #[error("submission does not match the task: {0}")]
    WrongSubmission(&'static str),
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The update kind's settings don't fit the model, or it can't apply
    /// the rule.
    #[error("invalid configuration: {0}")]
    Kind(#[from] crate::kind::KindError),
}

/// Any error of the protocol core.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// See [`Malformed`].
    #[error("malformed: {0}")]
    Malformed(#[from] Malformed),
    /// See [`Misbehaviour`].
    #[error("misbehaving peer: {0}")]
    Misbehaving(#[from] Misbehaviour),
    /// See [`Incompatibility`].
    #[error("incompatible peer: {0}")]
    Incompatible(#[from] Incompatibility),
    /// See [`Misuse`].
    #[error("misuse: {0}")]
    Misuse(#[from] Misuse),
    /// A report for a round that already closed. Not misbehaviour: a correct
    /// client slower than the round's deadline sends exactly this. It is
    /// refused ([`RejectCode::Late`]) but never counted as a violation.
    #[error("late report for round {got}, which has closed (open round: {open:?})")]
    Late {
        /// The round in the report.
        got: u32,
        /// The round open now, if any.
        open: Option<u32>,
    },
}

impl From<crate::codec::DecodeError> for Error {
    fn from(e: crate::codec::DecodeError) -> Self {
        match e {
            crate::codec::DecodeError::Malformed(m) => Error::Malformed(m),
            crate::codec::DecodeError::Incompatible(i) => Error::Incompatible(i),
        }
    }
}

impl Error {
    /// The code a peer is told; `None` for local misuse.
    pub fn reject_code(&self) -> Option<RejectCode> {
        Some(match self {
            Error::Malformed(Malformed::Oversize { .. }) => RejectCode::Oversize,
            Error::Malformed(_) => RejectCode::Malformed,
            Error::Incompatible(_) => RejectCode::IncompatibleVersion,
            Error::Misbehaving(m) => match m {
                Misbehaviour::NotEnrolled(_) => RejectCode::UnknownClient,
                Misbehaviour::NotJoined(_)
                | Misbehaviour::Unexpected(_)
                | Misbehaviour::ReplicaMismatch { .. }
                | Misbehaviour::OutOfOrderLog { .. } => RejectCode::Unexpected,
                Misbehaviour::BadSignature => RejectCode::BadSignature,
                Misbehaviour::WrongRun => RejectCode::WrongRun,
                Misbehaviour::WrongRound { .. } => RejectCode::WrongRound,
                Misbehaviour::Duplicate(_) => RejectCode::Duplicate,
                Misbehaviour::NotSampled(_) => RejectCode::NotSampled,
                Misbehaviour::WrongDimension { .. }
                | Misbehaviour::WrongKind(_)
                | Misbehaviour::KindMismatch { .. }
                | Misbehaviour::BadSampleCount(_) => RejectCode::WrongShape,
                Misbehaviour::NonFinite(_) => RejectCode::NonFinite,
                Misbehaviour::OutOfBounds { .. } => RejectCode::OutOfBounds,
                Misbehaviour::BadPayload { fault, .. } if fault.is_content_fault() => RejectCode::NotAPermutation,
                Misbehaviour::BadPayload { .. } => RejectCode::WrongShape,
            },
            Error::Late { .. } => RejectCode::Late,
            Error::Misuse(_) => return None,
        })
    }

    /// Whether the refusal counts as a protocol violation against the peer
    /// (towards `max_violations`): every peer fault except a late report,
    /// which honest slow clients send.
    pub fn is_violation(&self) -> bool {
        self.is_peer_fault() && !matches!(self, Error::Late { .. })
    }

    /// Whether the peer, not the local host, is at fault.
    pub fn is_peer_fault(&self) -> bool {
        !matches!(self, Error::Misuse(_))
    }
}
