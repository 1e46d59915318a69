//! Client identities (ed25519), the signed transcripts, and parameter hashes.
//!
//! Signatures are domain separated: a join signature can never be replayed as
//! a report signature or the reverse. Reports are signed over the *exact*
//! bytes received, verified with `verify_strict` (which rejects small-order
//! keys and non-canonical signatures, so a signature has one valid encoding).

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::Misbehaviour;
use crate::wire::{PublicKeyBytes, RunId, SignatureBytes};

/// Domain tag of join signatures.
pub const JOIN_DOMAIN: &[u8] = b"tally/v1/join\0";
/// Domain tag of report signatures.
pub const REPORT_DOMAIN: &[u8] = b"tally/v2/report-sha256\0";

/// Bytes a client signs to join: domain, run id, the server's challenge and
/// its own key (so a signature can't be moved to another key).
pub fn join_transcript(run_id: &RunId, challenge: &[u8; 32], key: &PublicKeyBytes) -> Vec<u8> {
    let mut t = Vec::with_capacity(JOIN_DOMAIN.len() + 16 + 32 + 32);
    t.extend_from_slice(JOIN_DOMAIN);
    t.extend_from_slice(&run_id.0);
    t.extend_from_slice(challenge);
    t.extend_from_slice(&key.0);
    t
}

/// Bytes a client signs for a report: domain then the SHA-256 of the encoded
/// report. The run id and round are inside the report body and checked after
/// decoding. Signing the digest rather than the body: ed25519 hashes its
/// message twice to sign and once to verify with SHA-512, which for a 4.25 MB
/// FRL ranking was a tenth of a simulated round; one SHA-256 pass is enough
/// (a collision in SHA-256 is needed to reuse a signature).
pub fn report_transcript(body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(REPORT_DOMAIN.len() + 32);
    t.extend_from_slice(REPORT_DOMAIN);
    t.extend_from_slice(&Sha256::digest(body));
    t
}

/// A client's signing identity.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("Identity").field("public", &self.public_key().to_string()).finish()
    }
}

impl Identity {
    /// From a 32-byte secret seed.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Identity { key: SigningKey::from_bytes(&secret) }
    }

    /// The secret seed (for writing key files).
    pub fn secret(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKeyBytes {
        PublicKeyBytes(self.key.verifying_key().to_bytes())
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> SignatureBytes {
        SignatureBytes(self.key.sign(msg).to_bytes())
    }
}

/// Verifies `sig` on `msg` under `key` strictly.
pub fn verify(key: &PublicKeyBytes, msg: &[u8], sig: &SignatureBytes) -> Result<(), Misbehaviour> {
    let vk = VerifyingKey::from_bytes(&key.0).map_err(|_| Misbehaviour::BadSignature)?;
    let sig = Signature::from_bytes(&sig.0);
    vk.verify_strict(msg, &sig).map_err(|_| Misbehaviour::BadSignature)
}

/// Parses a hex public key (64 hex digits).
pub fn parse_public_key(hex_str: &str) -> Result<PublicKeyBytes, String> {
    let bytes = hex::decode(hex_str.trim()).map_err(|e| format!("not hex: {e}"))?;
    let arr: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| format!("expected 32 bytes, got {}", b.len()))?;
    let key = VerifyingKey::from_bytes(&arr).map_err(|_| "not a valid ed25519 point".to_string())?;
    // A small-order point (the all-zero key among them) can't be anyone's
    // key: `verify_strict` refuses every signature under it, so the client
    // could never join. Enrolling one is an operator error, said at once.
    if key.is_weak() {
        return Err("a weak (small-order) ed25519 key, such as all zeros, can never sign a join".into());
    }
    Ok(PublicKeyBytes(arr))
}

/// SHA-256 of parameters as little-endian f32 bytes: the model fingerprint
/// replicas compare.
pub fn params_hash(params: &[f32]) -> [u8; 32] {
    let mut h = Sha256::new();
    for chunk in params.chunks(4096) {
        let mut buf = Vec::with_capacity(chunk.len() * 4);
        for v in chunk {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        h.update(&buf);
    }
    h.finalize().into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_domain_separation() {
        let id = Identity::from_secret([7; 32]);
        let body = b"report bytes";
        let sig = id.sign(&report_transcript(body));
        assert!(verify(&id.public_key(), &report_transcript(body), &sig).is_ok());
        // Same signature is not valid over a tampered body or in the join domain.
        assert_eq!(
            verify(&id.public_key(), &report_transcript(b"report bytez"), &sig),
            Err(Misbehaviour::BadSignature)
        );
        let other = Identity::from_secret([8; 32]);
        assert_eq!(verify(&other.public_key(), &report_transcript(body), &sig), Err(Misbehaviour::BadSignature));
    }

    #[test]
    fn parse_key() {
        let id = Identity::from_secret([1; 32]);
        assert_eq!(parse_public_key(&id.public_key().to_string()).unwrap(), id.public_key());
        assert!(parse_public_key("zz").is_err());
        assert!(parse_public_key("00").is_err());
        // The all-zero key decodes as a point but is of small order.
        let zero = parse_public_key(&"0".repeat(64)).unwrap_err();
        assert!(zero.contains("weak"), "{zero}");
    }

    #[test]
    fn hash_changes_with_one_bit() {
        let a = vec![1.0f32; 10_000];
        let mut b = a.clone();
        b[9_999] = f32::from_bits(b[9_999].to_bits() ^ 1);
        assert_ne!(params_hash(&a), params_hash(&b));
    }
}
