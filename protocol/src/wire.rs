//! Wire messages of the Tally protocol, version [`PROTOCOL_VERSION`].
//!
//! One QUIC stream carries exactly one message (the driver reads the stream to
//! its end under [`MAX_MESSAGE_BYTES`]), so there is no framing inside a
//! message. The byte layout is defined by [`crate::codec`].
//!
//! Handshake: the server sends [`Hello`] with a fresh challenge; the client
//! answers [`Join`] signed over the challenge; the server answers [`Welcome`]
//! with the run configuration. Each round the server sends [`RoundStart`] to
//! the clients it sampled; each answers with a [`SignedReport`], which the
//! server acknowledges with [`Ack`] or refuses with [`Rejected`].

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::aggregate::ClientIndex;
use crate::kind::{KindId, KindSettings, UpdateKind};
use crate::model::{MAX_PARAMETERS, ModelArch};

/// Version of the wire format. A peer with another version is refused as
/// incompatible before its message body is decoded. Version 2 added FRL runs;
/// version 3 made update kinds plug-ins: `RunConfig::kind` holds one kind's
/// settings, payloads and round logs are kind-tagged bytes, and a kind's
/// published model is `ModelSync::Published`; version 4 gave round logs a
/// [`LogBody`] (per-client payloads or one combined update) for Ferret.
pub const PROTOCOL_VERSION: u8 = 4;

/// Slack on top of a dense model for the envelope, signature and report
/// fields: generous (64 KiB) because none of them is large, tight enough to
/// keep the bound meaningful.
pub const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;

/// Largest message either side accepts: a dense model of [`MAX_PARAMETERS`]
/// f32 plus [`MESSAGE_OVERHEAD_BYTES`]. Drivers should read with the tighter
/// per-run bound of [`max_message_bytes_for`].
pub const MAX_MESSAGE_BYTES: usize = MAX_PARAMETERS * 4 + MESSAGE_OVERHEAD_BYTES;

/// Longest human-readable text in a [`Rejected`] message: enough for one
/// line of context, short enough that error paths can't carry bulk data.
pub const MAX_DETAIL_BYTES: usize = 256;

/// Largest message a participant accepts before the server's [`Welcome`] has
/// told it the model: `Hello`, `Welcome` and `Rejected` are a few hundred
/// bytes at most, so a hostile server can't make a client that hasn't joined
/// yet buffer a model-sized stream.
pub const MAX_HANDSHAKE_BYTES: usize = MESSAGE_OVERHEAD_BYTES;

/// Most local epochs a run may ask of a client per round. A client does what
/// the server's [`TrainSpec`] says; past 1,000 passes over its shard a round
/// is a denial of service on the client, not federated training.
pub const MAX_LOCAL_EPOCHS: u32 = 1_000;

/// Largest minibatch a run may ask for. Memory per step is
/// `min(batch, shard) × pixels`, so the shard bounds it in practice; the cap
/// only refuses absurd values and is above a full MNIST training set (60,000).
pub const MAX_BATCH_SIZE: u32 = 1 << 16;

/// Largest sample count a client may claim for weighting. FedAvg weights by
/// this number, so an absurd claim is a poisoning lever; 2^32 is far above
/// any edge device's shard.
pub const MAX_SAMPLES_PER_UPDATE: u64 = 1 << 32;

/// Upper bound on a message for a run of `arch`: a dense model plus overhead.
pub fn max_message_bytes_for(arch: &ModelArch) -> usize {
    (arch.num_params().min(MAX_PARAMETERS) * 4 + MESSAGE_OVERHEAD_BYTES).min(MAX_MESSAGE_BYTES)
}

/// Identifies one run of federated training; bound into every signature so
/// messages of one run are worthless in another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode)]
pub struct RunId(pub [u8; 16]);

impl std::fmt::Display for RunId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// An ed25519 public key, as sent on the wire (32 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode)]
pub struct PublicKeyBytes(pub [u8; 32]);

impl std::fmt::Display for PublicKeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// An ed25519 signature (64 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct SignatureBytes(pub [u8; 64]);

/// Hyper-parameters of local training, chosen by the server for the run.
/// In configuration files: `train = { lr = 0.05, batch_size = 32, epochs =
/// 1, momentum = 0.9, weight_decay = 5e-4 }` (momentum and weight decay
/// default to 0: plain SGD).
#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct TrainSpec {
    /// SGD learning rate.
    pub lr: f32,
    /// Minibatch size.
    pub batch_size: u32,
    /// Local epochs per round.
    pub epochs: u32,
    /// SGD momentum (PyTorch's: no dampening, not Nesterov), in `[0, 1)`;
    /// the buffer starts at zero every round. 0: plain SGD.
    #[serde(default)]
    pub momentum: f32,
    /// L2 weight decay added to the gradient (PyTorch's `weight_decay`),
    /// finite and `≥ 0`.
    #[serde(default)]
    pub weight_decay: f32,
}

impl TrainSpec {
    /// Plain SGD (no momentum, no weight decay).
    pub fn sgd(lr: f32, batch_size: u32, epochs: u32) -> Self {
        TrainSpec { lr, batch_size, epochs, momentum: 0.0, weight_decay: 0.0 }
    }

    /// Checks the values are usable: a finite positive learning rate, and a
    /// batch size and epoch count in `1..=`[`MAX_BATCH_SIZE`] and
    /// `1..=`[`MAX_LOCAL_EPOCHS`]. The server checks its configuration with
    /// this and a client checks what a (possibly hostile) server sent.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err("learning rate must be finite and positive");
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err("momentum must be in [0, 1)");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err("weight_decay must be finite and non-negative");
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return Err("batch_size must be in 1..=MAX_BATCH_SIZE");
        }
        if self.epochs == 0 || self.epochs > MAX_LOCAL_EPOCHS {
            return Err("epochs must be in 1..=MAX_LOCAL_EPOCHS");
        }
        Ok(())
    }
}

/// Everything a client needs to know about the run, sent in [`Welcome`].
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct RunConfig {
    /// The run.
    pub run_id: RunId,
    /// Model shapes.
    pub arch: ModelArch,
    /// Rounds the server intends to run.
    pub rounds: u32,
    /// Local training hyper-parameters.
    pub train: TrainSpec,
    /// The update kind and its settings ([`crate::kind`]): what clients
    /// send, and how rounds convey the model.
    pub kind: KindSettings,
}

impl RunConfig {
    /// Largest message a client of this run accepts from the server: the
    /// dense model (sent in full by FedAvg rounds and in a replicated run's
    /// [`Sync`]) plus overhead, plus for replicated kinds the log budget
    /// that a [`Sync`] may carry.
    pub fn max_inbound_bytes(&self, kind: &dyn UpdateKind) -> usize {
        let log = if kind.replicated() { SYNC_LOG_BUDGET_BYTES } else { 0 };
        (max_message_bytes_for(&self.arch) + log).min(MAX_MESSAGE_BYTES)
    }
}

/// Bytes of round logs the coordinator keeps since its last checkpoint
/// before taking a new one. A client that (re)joins a replicated run gets
/// the checkpoint plus these logs, so this bounds the catch-up message
/// beyond the model itself; 256 KiB is thousands of SPSA rounds of a small
/// federation and still a fraction of the MNIST MLP (797 KB).
pub const SYNC_LOG_BUDGET_BYTES: usize = 256 * 1024;

/// How a [`RoundStart`] conveys the model.
///
/// Encoded by hand ([`f32s`]) in exactly the bytes bincode's derive would
/// write, so that a model moves in bulk rather than one float per call.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSync {
    /// The current global parameters, canonical flat order.
    Full(Vec<f32>),
    /// Replicated run: the client's replica must have this hash
    /// ([`crate::identity::params_hash`]).
    Replica {
        /// Hash of the global model at the start of the round.
        model_hash: [u8; 32],
    },
    /// The model in the run's kind's own encoding, decoded by
    /// [`crate::kind::UpdateKind::decode_published`] (FRL: the bit-packed
    /// global ranking, from which clients rebuild the global scores).
    Published(Vec<u8>),
}

/// One client's accepted payload in a replicated round's log.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct LogEntry {
    /// Client id.
    pub client: ClientIndex,
    /// The payload's bytes, in the run's kind's format (SPSA: byte `j` for
    /// step `j`).
    pub bytes: Vec<u8>,
}

/// What a replicated round's log carries: what every replica needs to move
/// its model exactly as the server moved the global one.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum LogBody {
    /// The round was skipped (closed short of its quorum, or its update
    /// would not have been finite): the model is unchanged. Replicas still
    /// count the round.
    Skipped,
    /// Every accepted payload, ascending client id (SPSA): each replica
    /// replays all of them, so it needs no state beyond its parameters.
    PerClient(Vec<LogEntry>),
    /// The round's combined update in the kind's own format (Ferret: the
    /// aggregated coefficients after server momentum, as applied). Kinds
    /// with cross-round server state send this, so that replicas never need
    /// that state: a late joiner's checkpoint plus logs is enough.
    Combined(Vec<u8>),
}

/// Server → every joined client of a replicated run when a round closes: the
/// round's update ([`LogBody`]) and the hash every replica must reach after
/// applying it.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct RoundLog {
    /// The round.
    pub round: u32,
    /// What to apply.
    pub body: LogBody,
    /// Hash of the global model after applying the log.
    pub model_hash: [u8; 32],
}

/// Server → a client joining a replicated run: a checkpoint of the model and
/// the logs of every round since, in order. Encoded by hand like
/// [`ModelSync`] (the checkpoint in bulk), in bincode's derived layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Sync {
    /// The round the checkpoint is the result of (0 = initial model).
    pub round: u32,
    /// The checkpoint's parameters.
    pub params: Vec<f32>,
    /// Logs of rounds `round + 1, round + 2, ...`.
    pub logs: Vec<RoundLog>,
}

/// `Vec<f32>` in bincode's layout (the length as `u64`, then each value's
/// four little-endian bytes), read and written in blocks. bincode's generic
/// `Vec<T>` moves one element per call; for a model download (797 kB for
/// the MNIST MLP) that was a visible serial share of a simulated round, paid
/// by every client and, once per broadcast, by the server. Same bytes, so
/// the wire format (and `PROTOCOL_VERSION`) is unchanged; the golden
/// encodings in `codec`'s tests pin it.
pub(crate) mod f32s {
    use bincode::de::read::Reader;
    use bincode::enc::write::Writer;
    use bincode::error::{DecodeError, EncodeError};
    use bincode::{Decode, Encode};

    /// Floats converted per block: 16 KiB of bytes on the stack.
    const BLOCK: usize = 4096;

    pub(crate) fn encode<E: bincode::enc::Encoder>(values: &[f32], encoder: &mut E) -> Result<(), EncodeError> {
        (values.len() as u64).encode(encoder)?;
        let mut buf = [0u8; BLOCK * 4];
        for block in values.chunks(BLOCK) {
            for (out, v) in buf.chunks_exact_mut(4).zip(block) {
                out.copy_from_slice(&v.to_le_bytes());
            }
            encoder.writer().write(&buf[..block.len() * 4])?;
        }
        Ok(())
    }

    pub(crate) fn decode<D: bincode::de::Decoder>(decoder: &mut D) -> Result<Vec<f32>, DecodeError> {
        let len = u64::decode(decoder)?;
        let len = usize::try_from(len).map_err(|_| DecodeError::OutsideUsizeRange(len))?;
        // The decoder's byte limit bounds `len` before anything is allocated,
        // as bincode's own `Vec<T>` does.
        decoder.claim_container_read::<f32>(len)?;
        let mut out = Vec::with_capacity(len);
        let mut buf = [0u8; BLOCK * 4];
        let mut left = len;
        while left > 0 {
            let n = left.min(BLOCK);
            let bytes = &mut buf[..n * 4];
            decoder.reader().read(bytes)?;
            out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            left -= n;
        }
        Ok(out)
    }
}

impl Encode for ModelSync {
    fn encode<E: bincode::enc::Encoder>(&self, encoder: &mut E) -> Result<(), bincode::error::EncodeError> {
        // Variant indices as bincode's derive numbers them.
        match self {
            ModelSync::Full(params) => {
                0u32.encode(encoder)?;
                f32s::encode(params, encoder)
            }
            ModelSync::Replica { model_hash } => {
                1u32.encode(encoder)?;
                model_hash.encode(encoder)
            }
            ModelSync::Published(bytes) => {
                2u32.encode(encoder)?;
                bytes.encode(encoder)
            }
        }
    }
}

impl<Context> Decode<Context> for ModelSync {
    fn decode<D: bincode::de::Decoder<Context = Context>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        match u32::decode(decoder)? {
            0 => Ok(ModelSync::Full(f32s::decode(decoder)?)),
            1 => Ok(ModelSync::Replica { model_hash: <[u8; 32]>::decode(decoder)? }),
            2 => Ok(ModelSync::Published(Vec::<u8>::decode(decoder)?)),
            found => Err(bincode::error::DecodeError::UnexpectedVariant {
                type_name: "ModelSync",
                allowed: &bincode::error::AllowedEnumVariants::Range { min: 0, max: 2 },
                found,
            }),
        }
    }
}
bincode::impl_borrow_decode!(ModelSync);

impl Encode for Sync {
    fn encode<E: bincode::enc::Encoder>(&self, encoder: &mut E) -> Result<(), bincode::error::EncodeError> {
        self.round.encode(encoder)?;
        f32s::encode(&self.params, encoder)?;
        self.logs.encode(encoder)
    }
}

impl<Context> Decode<Context> for Sync {
    fn decode<D: bincode::de::Decoder<Context = Context>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        Ok(Sync {
            round: u32::decode(decoder)?,
            params: f32s::decode(decoder)?,
            logs: Vec::<RoundLog>::decode(decoder)?,
        })
    }
}
bincode::impl_borrow_decode!(Sync);

/// First message on a connection, server → client.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct Hello {
    /// The run.
    pub run_id: RunId,
    /// Fresh random bytes the client must sign to prove its key.
    pub challenge: [u8; 32],
}

/// Client → server answer to [`Hello`].
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct Join {
    /// The client's identity.
    pub public_key: PublicKeyBytes,
    /// Signature over [`crate::identity::join_transcript`].
    pub signature: SignatureBytes,
}

/// Server → client: the join was accepted.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct Welcome {
    /// Index of the client in the server's enrolment list (stable id).
    pub client_id: u32,
    /// The run's configuration.
    pub config: RunConfig,
}

/// What the server asks of a client this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Task {
    /// Evaluate the received model, then train on it and send an update.
    Train,
    /// Only evaluate the received (final) model.
    Evaluate,
}

/// Server → sampled client: round `round` is open.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct RoundStart {
    /// Round number, from 1 (rounds after the last are evaluation only).
    pub round: u32,
    /// What to do.
    pub task: Task,
    /// Seed for the client's local randomness this round (shuffling).
    pub seed: u64,
    /// The model: in full, or the hash the client's replica must match.
    pub model: ModelSync,
}

/// Loss and accuracy of a model on a client's evaluation data.
#[derive(Clone, Copy, Debug, PartialEq, Encode, Decode, Serialize, Deserialize, Default)]
pub struct EvalReport {
    /// Sum of per-example losses.
    pub loss_sum: f64,
    /// Correctly classified examples.
    pub correct: u64,
    /// Examples evaluated.
    pub total: u64,
}

impl EvalReport {
    /// Fraction correct (0 when empty).
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 { 0.0 } else { self.correct as f64 / self.total as f64 }
    }
    /// Mean loss (0 when empty).
    pub fn mean_loss(&self) -> f64 {
        if self.total == 0 { 0.0 } else { self.loss_sum / self.total as f64 }
    }
    /// Sum of two reports.
    pub fn merge(&self, other: &EvalReport) -> EvalReport {
        EvalReport {
            loss_sum: self.loss_sum + other.loss_sum,
            correct: self.correct.saturating_add(other.correct),
            total: self.total.saturating_add(other.total),
        }
    }
}

/// The model update proper: bytes in the format of the run's update kind,
/// tagged with the kind they are for. Each kind decodes and validates its
/// own payloads ([`crate::kind`]): dense deltas are little-endian f32, SPSA
/// one byte per step, FRL a bit-packed ranking.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct UpdatePayload {
    /// The kind the payload is for.
    pub kind: KindId,
    /// The kind's encoding of the update.
    pub data: Vec<u8>,
}

/// A client's training result for one round.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct ClientUpdate {
    /// Training examples used (the FedAvg weight).
    pub num_samples: u64,
    /// Mean training loss over the local steps.
    pub train_loss: f32,
    /// The update.
    pub payload: UpdatePayload,
}

/// The signed body of a client's answer to [`RoundStart`].
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct Report {
    /// Must equal the run's id.
    pub run_id: RunId,
    /// Must equal the open round.
    pub round: u32,
    /// Evaluation of the model received in [`RoundStart`], if the client has
    /// evaluation data.
    pub eval: Option<EvalReport>,
    /// Present exactly when the task was [`Task::Train`].
    pub update: Option<ClientUpdate>,
}

/// Client → server: an encoded [`Report`] and the client's signature over
/// [`crate::identity::report_transcript`] of exactly those bytes.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct SignedReport {
    /// `codec::encode_report(report)`; verified before it is decoded.
    pub body: Vec<u8>,
    /// Signature by the connection's enrolled key.
    pub signature: SignatureBytes,
}

/// Server → client: the report for `round` was accepted and will be counted.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct Ack {
    /// The round.
    pub round: u32,
}

/// Why the server refused something; mirrors [`crate::error::Error`] so a
/// client can tell what it did wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum RejectCode {
    /// Undecodable bytes.
    Malformed,
    /// Message larger than the limit.
    Oversize,
    /// Other protocol version.
    IncompatibleVersion,
    /// Public key not enrolled.
    UnknownClient,
    /// Signature did not verify.
    BadSignature,
    /// Another run's message.
    WrongRun,
    /// Not the open round (stale, replayed or early).
    WrongRound,
    /// Second report for the same round.
    Duplicate,
    /// The client was not sampled this round.
    NotSampled,
    /// Update has the wrong dimension or kind.
    WrongShape,
    /// NaN or infinity in the update.
    NonFinite,
    /// A message that is not valid in this state.
    Unexpected,
    /// Another connection took over this identity.
    Superseded,
    /// Too many protocol violations; the connection is closed.
    TooManyViolations,
    /// A payload whose content, not its shape, is invalid: an FRL ranking
    /// that is not a permutation of the layer's edges, or whose padding bits
    /// are not zero.
    NotAPermutation,
    /// A report for a round that has already closed: the client was too
    /// slow, not hostile. Never counted as a violation; the client carries
    /// on with the next round. (Appended after the older codes so that they
    /// keep their encoding.)
    Late,
    /// A dense update with a value beyond the run's bound on `|value|`
    /// (`CoordinatorConfig::max_update_abs`): finite, but no training step.
    OutOfBounds,
}

impl RejectCode {
    /// The code's snake_case name, as metrics (the server's Prometheus
    /// labels, the `rejected_by_reason` column) name refusals.
    pub fn name(self) -> &'static str {
        match self {
            RejectCode::Malformed => "malformed",
            RejectCode::Oversize => "oversize",
            RejectCode::IncompatibleVersion => "incompatible_version",
            RejectCode::UnknownClient => "unknown_client",
            RejectCode::BadSignature => "bad_signature",
            RejectCode::WrongRun => "wrong_run",
            RejectCode::WrongRound => "wrong_round",
            RejectCode::Duplicate => "duplicate",
            RejectCode::NotSampled => "not_sampled",
            RejectCode::WrongShape => "wrong_shape",
            RejectCode::NonFinite => "non_finite",
            RejectCode::Unexpected => "unexpected",
            RejectCode::Superseded => "superseded",
            RejectCode::TooManyViolations => "too_many_violations",
            RejectCode::NotAPermutation => "not_a_permutation",
            RejectCode::Late => "late",
            RejectCode::OutOfBounds => "out_of_bounds",
        }
    }

    /// Whether a client told this should give up rather than retry: it is
    /// not enrolled, speaks another version, signs wrongly, was
    /// disconnected for violations or replaced by a newer connection. The
    /// protocol decides this, not each client. [`RejectCode::Late`] in
    /// particular is not fatal: a slow client's report missed its round, and
    /// the client simply takes the next one.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            RejectCode::UnknownClient
                | RejectCode::IncompatibleVersion
                | RejectCode::TooManyViolations
                | RejectCode::Superseded
                | RejectCode::BadSignature
        )
    }
}

/// Server → client: a message was refused.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct Rejected {
    /// Machine-readable reason.
    pub code: RejectCode,
    /// Round of the refused report, if it had one.
    pub round: Option<u32>,
    /// At most [`MAX_DETAIL_BYTES`] bytes of explanation.
    pub detail: String,
}

/// Server → client: the run is over.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct Finished {
    /// Rounds completed.
    pub rounds: u32,
    /// SHA-256 of the final parameters ([`crate::identity::params_hash`]).
    pub model_hash: [u8; 32],
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub enum Message {
    /// Server → client.
    Hello(Hello),
    /// Client → server.
    Join(Join),
    /// Server → client.
    Welcome(Welcome),
    /// Server → client.
    RoundStart(RoundStart),
    /// Client → server.
    Report(SignedReport),
    /// Server → client.
    Ack(Ack),
    /// Server → client.
    Rejected(Rejected),
    /// Server → client.
    Finished(Finished),
    /// Server → client (replicated runs).
    RoundLog(RoundLog),
    /// Server → client (replicated runs).
    Sync(Sync),
}

impl Message {
    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Join(_) => "Join",
            Message::Welcome(_) => "Welcome",
            Message::RoundStart(_) => "RoundStart",
            Message::Report(_) => "Report",
            Message::Ack(_) => "Ack",
            Message::Rejected(_) => "Rejected",
            Message::Finished(_) => "Finished",
            Message::RoundLog(_) => "RoundLog",
            Message::Sync(_) => "Sync",
        }
    }
}

/// ALPN protocol id on the QUIC/TLS handshake: a peer that doesn't speak
/// Tally fails the handshake instead of sending us garbage. (Versions within
/// Tally are told apart by the envelope's version byte.)
pub const ALPN: &[u8] = b"tally/1";
