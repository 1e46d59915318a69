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
use crate::wire::{Message, Report, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};

/// Frame prefix: lets a server tell Tally traffic from noise at byte 0.
pub const MAGIC: [u8; 3] = *b"TLY";

/// Bytes before the bincode body: magic + version.
pub const HEADER_BYTES: usize = 4;

fn cfg() -> impl Config {
    config::standard().with_limit::<MAX_MESSAGE_BYTES>()
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
    // Encoding into a Vec can only fail if a value exceeds the configured
    // limit; every constructor of large messages checks MAX_PARAMETERS first,
    // so treat it as an invariant.
    let body = bincode::encode_to_vec(msg, cfg())
        .unwrap_or_else(|e| panic!("invariant: messages we build fit MAX_MESSAGE_BYTES: {e}"));
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
    if header[..3] != MAGIC {
        return Err(Malformed::BadMagic.into());
    }
    if header[3] != PROTOCOL_VERSION {
        return Err(Incompatibility::Version { ours: PROTOCOL_VERSION, theirs: header[3] }.into());
    }
    decode_exact(body).map_err(DecodeError::Malformed)
}

/// Encodes a report body (the bytes that are signed).
pub fn encode_report(report: &Report) -> Vec<u8> {
    bincode::encode_to_vec(report, cfg())
        .unwrap_or_else(|e| panic!("invariant: reports we build fit MAX_MESSAGE_BYTES: {e}"))
}

/// Decodes a report body, rejecting trailing bytes.
pub fn decode_report(bytes: &[u8]) -> Result<Report, Malformed> {
    decode_exact(bytes)
}

fn decode_exact<T: bincode::Decode<()>>(bytes: &[u8]) -> Result<T, Malformed> {
    let (value, used) = bincode::decode_from_slice::<T, _>(bytes, cfg()).map_err(|e| match e {
        bincode::error::DecodeError::UnexpectedEnd { .. } => Malformed::Truncated,
        bincode::error::DecodeError::LimitExceeded => {
            Malformed::Oversize { len: bytes.len(), limit: MAX_MESSAGE_BYTES }
        }
        other => Malformed::Decode(truncate(other.to_string())),
    })?;
    if used != bytes.len() {
        return Err(Malformed::TrailingBytes { extra: bytes.len() - used });
    }
    Ok(value)
}

fn truncate(mut s: String) -> String {
    if s.len() > crate::wire::MAX_DETAIL_BYTES {
        let mut cut = crate::wire::MAX_DETAIL_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

pub(crate) fn truncate_detail(s: String) -> String {
    truncate(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::*;
    use proptest::prelude::*;

    fn sample_report() -> Message {
        Message::Report(SignedReport { body: vec![1, 2, 3], signature: SignatureBytes([7; 64]) })
    }

    #[test]
    fn golden_bytes() {
        // Checked-in encodings: a change of the wire format breaks these on purpose.
        let ack = encode(&Message::Ack(Ack { round: 300 }));
        assert_eq!(hex::encode(&ack), "544c5901" .to_string() + "05fb2c01");
        let hello = encode(&Message::Hello(Hello { run_id: RunId([0xab; 16]), challenge: [1; 32] }));
        assert_eq!(hello.len(), 4 + 1 + 16 + 32);
        assert_eq!(&hello[..5], &[b'T', b'L', b'Y', 1, 0]);
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
            decode(b"TLY\x02\x05\x00", MAX_MESSAGE_BYTES),
            Err(Incompatibility::Version { ours: 1, theirs: 2 }.into())
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

    proptest! {
        #[test]
        fn round_trip_round_start(round in any::<u32>(), seed in any::<u64>(), model in proptest::collection::vec(any::<f32>(), 0..64)) {
            let msg = Message::RoundStart(RoundStart { round, task: Task::Train, seed, model });
            let bytes = encode(&msg);
            let back = decode(&bytes, MAX_MESSAGE_BYTES).unwrap();
            // Compare bit patterns (NaN != NaN).
            prop_assert_eq!(encode(&back), bytes);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes, MAX_MESSAGE_BYTES);
            let mut framed = b"TLY\x01".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = decode(&framed, MAX_MESSAGE_BYTES);
            let _ = decode_report(&bytes);
        }
    }
}
