//! The one place that knows the byte encoding (bincode 2, standard config).
//!
//! A frame is `b"TLY"`, one version byte, then the bincode encoding of a
//! [`Message`]. The version is checked before the body is decoded, so a peer
//! speaking another version gets an *incompatible* error, not a decode error.
//! Decoding is bounded by an explicit byte limit (bincode refuses to allocate
//! for a claimed length beyond it) and trailing bytes are an error, so every
//! message has exactly one encoding.
//!
//! Swapping bincode for another format means rewriting this module only.

use bincode::config::{self, Config};

use crate::error::{Incompatibility, Malformed};
use crate::wire::{MAX_DETAIL_BYTES, MAX_MESSAGE_BYTES, Message, PROTOCOL_VERSION, Report};

/// Frame prefix: lets a server tell Tally traffic from noise at byte 0.
pub const MAGIC: [u8; 3] = *b"TLY";

/// Bytes before the bincode body: magic + version.
pub const HEADER_BYTES: usize = 4;

/// Smallest bincode decoding limit (see [`decode_limit_for`]): every message
/// but a model or an update fits, with room for bincode counting integers at
/// their in-memory size.
pub const DECODE_LIMIT_SMALL: usize = 64 * 1024;

/// Middle decoding limit: models up to a quarter of a million parameters.
pub const DECODE_LIMIT_MEDIUM: usize = 1024 * 1024;

/// Large decoding limit: models up to about four million parameters.
pub const DECODE_LIMIT_LARGE: usize = 16 * 1024 * 1024;

/// The bincode decoding limit for a body of `len` bytes.
///
/// bincode reserves memory for a claimed length (`Vec::with_capacity`, or a
/// zeroed `Vec<u8>`) as soon as it reads the length prefix, before it knows
/// whether the bytes follow; only its configured limit bounds the claim. With
/// one limit of [`MAX_MESSAGE_BYTES`] a 20-byte frame could make us reserve
/// 64 MiB. So the limit is the smallest tier that holds twice the body (the
/// slack covers integers that bincode counts at their in-memory size, larger
/// than their varint encoding): what a frame can make us reserve is at most
/// `max(64 KiB, 32 × its length)`, and never more than [`MAX_MESSAGE_BYTES`].
pub fn decode_limit_for(len: usize) -> usize {
    let want = len.saturating_mul(2);
    [DECODE_LIMIT_SMALL, DECODE_LIMIT_MEDIUM, DECODE_LIMIT_LARGE]
        .into_iter()
        .find(|&tier| want <= tier)
        .unwrap_or(MAX_MESSAGE_BYTES)
}

fn cfg<const LIMIT: usize>() -> impl Config {
    config::standard().with_limit::<LIMIT>()
}

/// Why bytes did not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a well-formed message.
    #[error(transparent)]
    Malformed(#[from] Malformed),
    /// A well-formed header of another protocol version.
    #[error(transparent)]
    Incompatible(#[from] Incompatibility),
}

/// Encodes a message into a frame.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.push(PROTOCOL_VERSION);
    // bincode's limit applies to decoding only, and writing into a Vec can't
    // fail, so encoding our own types has no error path: the panic is
    // unreachable.
    let body = bincode::encode_to_vec(msg, cfg::<MAX_MESSAGE_BYTES>())
        .unwrap_or_else(|e| panic!("invariant: encoding into a Vec is infallible: {e}"));
    out.extend_from_slice(&body);
    out
}

/// Decodes one frame, with `limit` as the largest acceptable size.
pub fn decode(bytes: &[u8], limit: usize) -> Result<Message, DecodeError> {
    let limit = limit.min(MAX_MESSAGE_BYTES);
    if bytes.len() > limit {
        return Err(Malformed::Oversize { len: bytes.len(), limit }.into());
    }
    let Some((header, body)) = bytes.split_first_chunk::<HEADER_BYTES>() else {
        return Err(Malformed::Truncated.into());
    };
    let [m0, m1, m2, version] = *header;
    if [m0, m1, m2] != MAGIC {
        return Err(Malformed::BadMagic.into());
    }
    if version != PROTOCOL_VERSION {
        return Err(Incompatibility::Version { ours: PROTOCOL_VERSION, theirs: version }.into());
    }
    let msg: Message = decode_exact(body)?;
    check_field_limits(&msg)?;
    Ok(msg)
}

/// Limits bincode can't express: text a peer sends us must fit the bound we
/// hold ourselves to when sending it.
fn check_field_limits(msg: &Message) -> Result<(), Malformed> {
    if let Message::Rejected(r) = msg
        && r.detail.len() > MAX_DETAIL_BYTES
    {
        return Err(Malformed::FieldTooLong { field: "Rejected.detail", len: r.detail.len(), limit: MAX_DETAIL_BYTES });
    }
    Ok(())
}

/// Encodes a report body (the bytes that are signed).
pub fn encode_report(report: &Report) -> Vec<u8> {
    // As in `encode`: no error path for our own types.
    bincode::encode_to_vec(report, cfg::<MAX_MESSAGE_BYTES>())
        .unwrap_or_else(|e| panic!("invariant: encoding into a Vec is infallible: {e}"))
}

/// Decodes a report body, rejecting trailing bytes.
pub fn decode_report(bytes: &[u8]) -> Result<Report, Malformed> {
    decode_exact(bytes)
}

fn decode_exact<T: bincode::Decode<()> + bincode::Encode>(bytes: &[u8]) -> Result<T, Malformed> {
    let limit = decode_limit_for(bytes.len());
    let decoded = match limit {
        DECODE_LIMIT_SMALL => bincode::decode_from_slice::<T, _>(bytes, cfg::<DECODE_LIMIT_SMALL>()),
        DECODE_LIMIT_MEDIUM => bincode::decode_from_slice::<T, _>(bytes, cfg::<DECODE_LIMIT_MEDIUM>()),
        DECODE_LIMIT_LARGE => bincode::decode_from_slice::<T, _>(bytes, cfg::<DECODE_LIMIT_LARGE>()),
        _ => bincode::decode_from_slice::<T, _>(bytes, cfg::<MAX_MESSAGE_BYTES>()),
    };
    let (value, used) = decoded.map_err(|e| match e {
        bincode::error::DecodeError::UnexpectedEnd { .. } => Malformed::Truncated,
        // The limit is at least twice the input, so a claim beyond it can't
        // be backed by the bytes we hold.
        bincode::error::DecodeError::LimitExceeded => Malformed::ClaimTooLarge { len: bytes.len() },
        other => Malformed::Decode(truncate(other.to_string())),
    })?;
    if used != bytes.len() {
        return Err(Malformed::TrailingBytes { extra: bytes.len().saturating_sub(used) });
    }
    // bincode also reads integers written in more bytes than needed (varint
    // prefix 251 before a value below 251, and so on), which would give one
    // message several encodings and one report several signed byte strings.
    // The canonical encoding is the only one of minimal length, so a value
    // whose encoding is shorter than what it was decoded from is refused.
    if encoded_len(&value) != bytes.len() {
        return Err(Malformed::NonCanonical);
    }
    Ok(value)
}

/// Length of the canonical encoding of `value`, without writing it (also
/// used by [`crate::durable`] to refuse non-canonical state).
pub(crate) fn encoded_len<T: bincode::Encode>(value: &T) -> usize {
    let mut encoder =
        bincode::enc::EncoderImpl::new(bincode::enc::write::SizeWriter::default(), cfg::<MAX_MESSAGE_BYTES>());
    // Counting bytes can't fail, and the limit applies to decoding only.
    match value.encode(&mut encoder) {
        Ok(()) => encoder.into_writer().bytes_written,
        Err(e) => panic!("invariant: sizing an encoding is infallible: {e}"),
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_DETAIL_BYTES {
        // Index 0 is always a char boundary, so the search ends there at worst.
        let cut = (0..=MAX_DETAIL_BYTES).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
    }
    s
}

pub(crate) fn truncate_detail(s: String) -> String {
    truncate(s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::identity::{Identity, join_transcript, report_transcript};
    use crate::model::ModelArch;
    use crate::wire::*;
    use proptest::prelude::*;

    fn sample_report() -> Message {
        Message::Report(SignedReport { body: vec![1, 2, 3], signature: SignatureBytes([7; 64]) })
    }

    /// Found by the `envelope` and `report` fuzz targets: bincode accepts a
    /// varint written in more bytes than needed, so an Ack of round 0 (or any
    /// report) had several encodings.
    #[test]
    fn non_minimal_varints_are_refused() {
        let canonical = encode(&Message::Ack(Ack { round: 0 }));
        assert_eq!(canonical, [b'T', b'L', b'Y', PROTOCOL_VERSION, 5, 0]);
        // Round 0 as a u16 varint (prefix 251) and as a u32 varint (252).
        for body in [&[5u8, 251, 0, 0][..], &[5, 252, 0, 0, 0, 0]] {
            let frame = [&canonical[..HEADER_BYTES], body].concat();
            assert_eq!(decode(&frame, MAX_MESSAGE_BYTES), Err(Malformed::NonCanonical.into()));
        }
        let report = encode_report(&Report { run_id: RunId([1; 16]), round: 3, eval: None, update: None });
        let mut padded = report.clone();
        // The round (after the 16-byte run id) as a u16 varint.
        padded.splice(16..17, [251, 3, 0]);
        assert_eq!(decode_report(&padded), Err(Malformed::NonCanonical));
        assert!(decode_report(&report).is_ok());
    }

    /// `ModelSync` and `Sync` are encoded by hand (bulk floats); a type of
    /// the same shape with bincode's derive must give the same bytes, for
    /// vectors across several of the hand codec's blocks, and decode back.
    #[test]
    fn hand_encoded_models_match_bincodes_derived_layout() {
        #[derive(bincode::Encode)]
        enum DerivedSync {
            Full(Vec<f32>),
            #[allow(dead_code)]
            Replica {
                model_hash: [u8; 32],
            },
            Published(Vec<u8>),
        }
        #[derive(bincode::Encode)]
        struct DerivedCheckpoint {
            round: u32,
            params: Vec<f32>,
            logs: Vec<crate::wire::RoundLog>,
        }
        let c = config::standard();
        for len in [0usize, 1, 4095, 4096, 4097, 10_000] {
            let params: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 1e3 - 7.0).collect();
            let ours = bincode::encode_to_vec(ModelSync::Full(params.clone()), c).unwrap();
            assert_eq!(ours, bincode::encode_to_vec(DerivedSync::Full(params.clone()), c).unwrap(), "{len}");
            let (back, used): (ModelSync, usize) = bincode::decode_from_slice(&ours, c).unwrap();
            assert_eq!((back, used), (ModelSync::Full(params.clone()), ours.len()));
            let sync = Sync { round: 7, params: params.clone(), logs: vec![] };
            let ours = bincode::encode_to_vec(&sync, c).unwrap();
            let derived = DerivedCheckpoint { round: 7, params, logs: vec![] };
            assert_eq!(ours, bincode::encode_to_vec(derived, c).unwrap(), "{len}");
            let (back, _): (Sync, usize) = bincode::decode_from_slice(&ours, c).unwrap();
            assert_eq!(back, sync);
        }
        let published = bincode::encode_to_vec(ModelSync::Published(vec![1, 2, 3]), c).unwrap();
        assert_eq!(published, bincode::encode_to_vec(DerivedSync::Published(vec![1, 2, 3]), c).unwrap());
        // Truncated floats, an unknown variant, and a length past the decode
        // limit are errors (the last before anything is allocated).
        let full = bincode::encode_to_vec(ModelSync::Full(vec![1.0; 100]), c).unwrap();
        assert!(bincode::decode_from_slice::<ModelSync, _>(&full[..full.len() - 1], c).is_err());
        assert!(bincode::decode_from_slice::<ModelSync, _>(&[3], c).is_err());
        let huge = [0u8, 253, 0, 0, 0, 0, 0, 0, 0, 1];
        let limited = config::standard().with_limit::<1024>();
        assert!(matches!(
            bincode::decode_from_slice::<ModelSync, _>(&huge, limited),
            Err(bincode::error::DecodeError::LimitExceeded)
        ));
    }

    #[test]
    fn golden_bytes() {
        // Checked-in encodings: a change of the wire format breaks these on purpose.
        let ack = encode(&Message::Ack(Ack { round: 300 }));
        assert_eq!(hex::encode(&ack), "544c5904".to_string() + "05fb2c01");
        let hello = encode(&Message::Hello(Hello { run_id: RunId([0xab; 16]), challenge: [1; 32] }));
        assert_eq!(hello.len(), 4 + 1 + 16 + 32);
        assert_eq!(&hello[..5], &[b'T', b'L', b'Y', PROTOCOL_VERSION, 0]);
    }

    /// One golden value: a whole frame, or a report body (the signed bytes).
    enum Golden {
        Frame(Message),
        ReportBody(Report),
    }

    impl Golden {
        fn encode(&self) -> Vec<u8> {
            match self {
                Golden::Frame(m) => encode(m),
                Golden::ReportBody(r) => encode_report(r),
            }
        }
    }

    /// Fixed values covering every `Message` variant, every `RejectCode`,
    /// both tasks and both model kinds. Signatures are ed25519 (deterministic)
    /// under a fixed key, so the transcripts are pinned too.
    fn golden_cases() -> Vec<(String, Golden)> {
        let run_id = RunId(*b"tally-golden-run");
        let challenge: [u8; 32] = std::array::from_fn(|i| i as u8 + 1);
        let id = Identity::from_secret([0x11; 32]);
        let public_key = id.public_key();
        let report = Report {
            run_id,
            round: 3,
            eval: Some(EvalReport { loss_sum: 12.5, correct: 9, total: 10 }),
            update: Some(ClientUpdate {
                num_samples: 10,
                train_loss: 0.25,
                payload: crate::fedavg::encode_delta(crate::fedavg::ID, &[0.5, -0.25, 0.0]),
            }),
        };
        let body = encode_report(&report);
        let signature = id.sign(&report_transcript(&body));
        let run_config = |arch: ModelArch| RunConfig {
            run_id,
            arch,
            rounds: 5,
            train: TrainSpec::sgd(0.05, 32, 2),
            kind: crate::kind::KindSettings::FedAvg,
        };
        let spsa =
            crate::spsa::SpsaConfig { stream_seed: 3, steps_per_client: 32, eps: 1e-3, lr: 0.01, batch_size: 64 };
        let log = |round: u32| RoundLog {
            round,
            body: crate::wire::LogBody::PerClient(vec![
                crate::wire::LogEntry { client: 0, bytes: vec![0x00, 0x40, 0xc1] },
                crate::wire::LogEntry { client: 9, bytes: vec![0x7f] },
            ]),
            model_hash: [round as u8; 32],
        };
        let frame = |name: &str, m: Message| (name.to_string(), Golden::Frame(m));
        let mut cases = vec![
            frame("Hello", Message::Hello(Hello { run_id, challenge })),
            frame(
                "Join",
                Message::Join(Join {
                    public_key,
                    signature: id.sign(&join_transcript(&run_id, &challenge, &public_key)),
                }),
            ),
            frame(
                "Welcome/mlp",
                Message::Welcome(Welcome {
                    client_id: 7,
                    config: run_config(ModelArch::Mlp { input: 4, hidden: vec![3, 2], classes: 2 }),
                }),
            ),
            frame(
                "Welcome/lenet5",
                Message::Welcome(Welcome { client_id: 70_000, config: run_config(ModelArch::LeNet5 { classes: 10 }) }),
            ),
            frame(
                "RoundStart/train",
                Message::RoundStart(RoundStart {
                    round: 3,
                    task: Task::Train,
                    seed: 0x0123_4567_89ab_cdef,
                    model: ModelSync::Full(vec![0.0, -1.5, 1e-3, f32::MAX]),
                }),
            ),
            frame(
                "RoundStart/evaluate",
                Message::RoundStart(RoundStart {
                    round: 6,
                    task: Task::Evaluate,
                    seed: 1,
                    model: ModelSync::Full(vec![]),
                }),
            ),
            frame(
                "Welcome/spsa",
                Message::Welcome(Welcome {
                    client_id: 1,
                    config: RunConfig {
                        kind: crate::kind::KindSettings::Spsa(spsa),
                        ..run_config(ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 })
                    },
                }),
            ),
            frame(
                "RoundStart/replica",
                Message::RoundStart(RoundStart {
                    round: 4,
                    task: Task::Train,
                    seed: 2,
                    model: ModelSync::Replica { model_hash: [0xa5; 32] },
                }),
            ),
            frame(
                "Welcome/frl",
                Message::Welcome(Welcome {
                    client_id: 2,
                    config: RunConfig {
                        kind: crate::kind::KindSettings::Frl(crate::frl::FrlRun::new(
                            9,
                            crate::frl::LENET_MNIST_LAYER_SIZES.to_vec(),
                        )),
                        ..run_config(ModelArch::Supermask(crate::supermask::FrlArch::MNIST_LENET))
                    },
                }),
            ),
            frame(
                "RoundStart/published",
                Message::RoundStart(RoundStart {
                    round: 5,
                    task: Task::Train,
                    seed: 3,
                    model: ModelSync::Published(crate::frl::encode(
                        &crate::frl::Ranking::new(vec![vec![2, 0, 1], vec![4, 1, 3, 0, 2]], &[3, 5]).unwrap(),
                    )),
                }),
            ),
            frame(
                "Welcome/fedavgm",
                Message::Welcome(Welcome {
                    client_id: 3,
                    config: RunConfig {
                        kind: crate::kind::KindSettings::FedAvgM(crate::fedavgm::FedAvgMConfig {
                            momentum: 0.9,
                            server_lr: 1.0,
                        }),
                        ..run_config(ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 })
                    },
                }),
            ),
            frame("RoundLog", Message::RoundLog(log(4))),
            frame(
                "RoundLog/skipped",
                Message::RoundLog(RoundLog { round: 5, body: crate::wire::LogBody::Skipped, model_hash: [5; 32] }),
            ),
            frame(
                "RoundLog/combined",
                Message::RoundLog(RoundLog {
                    round: 6,
                    body: crate::wire::LogBody::Combined(crate::ferret::encode_entries(&[
                        crate::ferret::Coefficient { k: 3, g: 0, value: -0.5 },
                        crate::ferret::Coefficient { k: 1, g: 2, value: 2.0 },
                    ])),
                    model_hash: [6; 32],
                }),
            ),
            frame(
                "Welcome/ferret",
                Message::Welcome(Welcome {
                    client_id: 4,
                    config: RunConfig {
                        kind: crate::kind::KindSettings::Ferret(crate::ferret::FerretSpec::default().resolve(17)),
                        ..run_config(ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 })
                    },
                }),
            ),
            frame("Sync", Message::Sync(Sync { round: 2, params: vec![0.25, -2.0], logs: vec![log(3), log(4)] })),
            (
                "ReportBody/spsa".to_string(),
                Golden::ReportBody(Report {
                    run_id,
                    round: 4,
                    eval: None,
                    update: Some(ClientUpdate {
                        num_samples: 2048,
                        train_loss: 0.5,
                        payload: crate::spsa::payload(vec![0x41, 0xbf, 0x00, 0x7f]),
                    }),
                }),
            ),
            (
                "ReportBody/ranking".to_string(),
                Golden::ReportBody(Report {
                    run_id,
                    round: 5,
                    eval: None,
                    update: Some(ClientUpdate {
                        num_samples: 58,
                        train_loss: 0.75,
                        // The example of crate::frl's docs: packs to 12 cc 20.
                        payload: crate::frl::payload(
                            &crate::frl::Ranking::new(vec![vec![2, 0, 1], vec![4, 1, 3, 0, 2]], &[3, 5]).unwrap(),
                        ),
                    }),
                }),
            ),
            (
                "ReportBody/ferret".to_string(),
                Golden::ReportBody(Report {
                    run_id,
                    round: 6,
                    eval: None,
                    update: Some(ClientUpdate {
                        num_samples: 600,
                        train_loss: 1.25,
                        payload: crate::ferret::payload(&[
                            crate::ferret::Coefficient { k: 0, g: 0, value: 0.125 },
                            crate::ferret::Coefficient { k: 7, g: 0, value: -3.0 },
                            crate::ferret::Coefficient { k: 2, g: 1, value: 1e-3 },
                        ]),
                    }),
                }),
            ),
            ("ReportBody".to_string(), Golden::ReportBody(report)),
            frame("Report", Message::Report(SignedReport { body, signature })),
            frame("Ack", Message::Ack(Ack { round: 300 })),
            frame("Finished", Message::Finished(Finished { rounds: 5, model_hash: [0x5a; 32] })),
        ];
        let codes = [
            RejectCode::Malformed,
            RejectCode::Oversize,
            RejectCode::IncompatibleVersion,
            RejectCode::UnknownClient,
            RejectCode::BadSignature,
            RejectCode::WrongRun,
            RejectCode::WrongRound,
            RejectCode::Duplicate,
            RejectCode::NotSampled,
            RejectCode::WrongShape,
            RejectCode::NonFinite,
            RejectCode::Unexpected,
            RejectCode::Superseded,
            RejectCode::TooManyViolations,
            RejectCode::NotAPermutation,
            RejectCode::Late,
            RejectCode::OutOfBounds,
        ];
        for (i, code) in codes.into_iter().enumerate() {
            let round = (i % 2 == 0).then_some(i as u32);
            let detail = if i == 0 { "bad frame: é".to_string() } else { String::new() };
            cases.push(frame(&format!("Rejected/{code:?}"), Message::Rejected(Rejected { code, round, detail })));
        }
        cases
    }

    const GOLDEN_HEADER: &str = "\
# Golden encodings of the Tally wire format, version 4: one `name hex` per line.
# Checked by codec::tests::golden_messages_match_checked_in_file. A change here
# is a wire change: bump PROTOCOL_VERSION or justify it. To regenerate after an
# intentional change:
#   TALLY_BLESS=1 cargo test --release -p tally-protocol golden_messages
";

    #[test]
    fn golden_messages_match_checked_in_file() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/messages.hex");
        let cases = golden_cases();
        if std::env::var_os("TALLY_BLESS").is_some() {
            let mut text = GOLDEN_HEADER.to_string();
            for (name, g) in &cases {
                text.push_str(&format!("{name} {}\n", hex::encode(g.encode())));
            }
            std::fs::write(&path, text).unwrap();
            return;
        }
        let text = std::fs::read_to_string(&path).expect("golden file present (TALLY_BLESS=1 writes it)");
        let lines: Vec<(&str, &str)> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| l.split_once(' ').expect("`name hex` lines"))
            .collect();
        let names: Vec<&str> = cases.iter().map(|(n, _)| n.as_str()).collect();
        let file_names: Vec<&str> = lines.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, file_names, "golden cases and file disagree; see the file header to regenerate");
        for ((name, golden), (_, want)) in cases.iter().zip(&lines) {
            let got = hex::encode(golden.encode());
            assert_eq!(&got, want, "{name}: the encoding changed (a wire change; see the file header)");
            let bytes = hex::decode(want).unwrap();
            match golden {
                Golden::Frame(m) => assert_eq!(&decode(&bytes, MAX_MESSAGE_BYTES).unwrap(), m, "{name}"),
                Golden::ReportBody(r) => assert_eq!(&decode_report(&bytes).unwrap(), r, "{name}"),
            }
        }
    }

    #[test]
    fn rejects_trailing_truncated_magic_version_and_oversize() {
        let mut bytes = encode(&sample_report());
        assert_eq!(decode(&bytes, MAX_MESSAGE_BYTES).unwrap(), sample_report());
        bytes.push(0);
        assert_eq!(decode(&bytes, MAX_MESSAGE_BYTES), Err(Malformed::TrailingBytes { extra: 1 }.into()));
        bytes.truncate(bytes.len() - 3);
        assert_eq!(decode(&bytes, MAX_MESSAGE_BYTES), Err(Malformed::Truncated.into()));
        assert_eq!(decode(b"TL", MAX_MESSAGE_BYTES), Err(Malformed::Truncated.into()));
        assert_eq!(decode(b"XLY\x01\x05\x00", MAX_MESSAGE_BYTES), Err(Malformed::BadMagic.into()));
        assert_eq!(
            decode(b"TLY\x01\x05\x00", MAX_MESSAGE_BYTES),
            Err(Incompatibility::Version { ours: PROTOCOL_VERSION, theirs: 1 }.into())
        );
        assert!(matches!(decode(&[0u8; 100], 50), Err(DecodeError::Malformed(Malformed::Oversize { .. }))));
    }

    #[test]
    fn huge_claimed_length_does_not_allocate() {
        // RoundStart with a model length claiming 2^60 floats.
        let mut bytes = vec![b'T', b'L', b'Y', 1, 3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        bytes.extend_from_slice(&[0xff, 0, 0, 0, 0, 0, 0, 0x10]);
        assert!(decode(&bytes, MAX_MESSAGE_BYTES).is_err());
    }

    #[test]
    fn short_frame_cannot_claim_a_large_vector() {
        // A 21-byte RoundStart claiming a model of 2^20 floats (4 MiB): under a
        // single 64 MiB limit bincode would reserve the 4 MiB before noticing
        // the bytes are missing. The tiered limit refuses the claim first.
        let mut bytes = encode(&Message::RoundStart(RoundStart {
            round: 1,
            task: Task::Train,
            seed: 0,
            model: ModelSync::Full(vec![]),
        }));
        assert_eq!(bytes.pop(), Some(0)); // the empty model's length prefix
        bytes.extend_from_slice(&[0xfc, 0, 0, 0x10, 0]); // varint u32 marker, then 2^20 little endian
        assert_eq!(
            decode(&bytes, MAX_MESSAGE_BYTES),
            Err(Malformed::ClaimTooLarge { len: bytes.len() - HEADER_BYTES }.into())
        );
        // The same for a report body (Vec<u8>, which bincode zero-fills up front).
        let mut report = encode(&sample_report());
        report.truncate(HEADER_BYTES + 1); // variant index of Report
        report.extend_from_slice(&[0xfc, 0, 0, 0x10, 0]);
        assert!(matches!(
            decode(&report, MAX_MESSAGE_BYTES),
            Err(DecodeError::Malformed(Malformed::ClaimTooLarge { .. }))
        ));
    }

    #[test]
    fn decode_limit_tiers_hold_twice_the_input() {
        assert_eq!(decode_limit_for(0), DECODE_LIMIT_SMALL);
        assert_eq!(decode_limit_for(DECODE_LIMIT_SMALL / 2), DECODE_LIMIT_SMALL);
        assert_eq!(decode_limit_for(DECODE_LIMIT_SMALL / 2 + 1), DECODE_LIMIT_MEDIUM);
        assert_eq!(decode_limit_for(DECODE_LIMIT_LARGE / 2 + 1), MAX_MESSAGE_BYTES);
        assert_eq!(decode_limit_for(usize::MAX), MAX_MESSAGE_BYTES);
        // The largest legal model still decodes under the top tier.
        let model = vec![0.5f32; crate::model::MAX_PARAMETERS];
        let msg =
            Message::RoundStart(RoundStart { round: 1, task: Task::Train, seed: 9, model: ModelSync::Full(model) });
        let bytes = encode(&msg);
        assert!(bytes.len() <= MAX_MESSAGE_BYTES);
        assert_eq!(decode(&bytes, MAX_MESSAGE_BYTES).unwrap(), msg);
    }

    #[test]
    fn overlong_reject_detail_is_refused() {
        let msg =
            |detail: String| encode(&Message::Rejected(Rejected { code: RejectCode::Malformed, round: None, detail }));
        assert!(decode(&msg("x".repeat(MAX_DETAIL_BYTES)), MAX_MESSAGE_BYTES).is_ok());
        assert_eq!(
            decode(&msg("x".repeat(MAX_DETAIL_BYTES + 1)), MAX_MESSAGE_BYTES),
            Err(Malformed::FieldTooLong {
                field: "Rejected.detail",
                len: MAX_DETAIL_BYTES + 1,
                limit: MAX_DETAIL_BYTES
            }
            .into())
        );
        // What we send is cut to the limit on a character boundary.
        let cut = truncate_detail("é".repeat(MAX_DETAIL_BYTES));
        assert!(cut.len() <= MAX_DETAIL_BYTES && cut.len() >= MAX_DETAIL_BYTES - 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn round_trip_round_start(round in any::<u32>(), seed in any::<u64>(), model in proptest::collection::vec(any::<f32>(), 0..64)) {
            let msg = Message::RoundStart(RoundStart { round, task: Task::Train, seed, model: ModelSync::Full(model) });
            let bytes = encode(&msg);
            let back = decode(&bytes, MAX_MESSAGE_BYTES).unwrap();
            // Compare bit patterns (NaN != NaN).
            prop_assert_eq!(encode(&back), bytes);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes, MAX_MESSAGE_BYTES);
            let mut framed = b"TLY".to_vec();
            framed.push(PROTOCOL_VERSION);
            framed.extend_from_slice(&bytes);
            let _ = decode(&framed, MAX_MESSAGE_BYTES);
            let _ = decode_report(&bytes);
        }
    }
}
