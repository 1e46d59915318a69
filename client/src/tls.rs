//! How the client trusts the server: a pinned certificate fingerprint, or a
//! CA file. TLS 1.3 only, rustls on ring.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Errors building the TLS client configuration.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Fingerprint not 64 hex digits.
    #[error("server fingerprint must be 64 hex digits (SHA-256): {0}")]
    BadFingerprint(String),
    /// CA file unreadable or empty.
    #[error("CA file {path}: {message}")]
    Ca {
        /// File.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the configuration.
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

/// What the client trusts.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// Exactly the certificate with this SHA-256 (as printed by
    /// `tally-server --self-signed`). The name in the certificate is not
    /// checked: the pin is stronger than a name.
    Fingerprint([u8; 32]),
    /// Certificates chaining to the CAs in this PEM file, for the server name.
    CaFile(PathBuf),
}

impl ServerTrust {
    /// Parses a hex fingerprint (colons allowed, as `openssl` prints them).
    pub fn fingerprint(hex_str: &str) -> Result<ServerTrust, TrustError> {
        let clean: String = hex_str.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&clean).map_err(|_| TrustError::BadFingerprint(hex_str.into()))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| TrustError::BadFingerprint(hex_str.into()))?;
        Ok(ServerTrust::Fingerprint(arr))
    }
}

#[derive(Debug)]
struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
    seen: PinnedMismatch,
}

/// The fingerprint a server presented when it failed the pin, shared with
/// the connection loop: a wrong pin never becomes right by retrying, so the
/// client stops at once and says what it expected and what it got.
#[derive(Debug, Clone, Default)]
pub struct PinnedMismatch(Arc<std::sync::Mutex<Option<[u8; 32]>>>);

impl PinnedMismatch {
    /// The fingerprint presented by the last server that failed the pin.
    pub fn presented(&self) -> Option<[u8; 32]> {
        // A poisoned lock only means a panic elsewhere mid-write of a Copy value.
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, fp: [u8; 32]) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp);
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if seen == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            self.seen.record(seen);
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The handshake signature proves the server holds the pinned cert's key.
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TrustError> {
    let ca_err = |m: String| TrustError::Ca { path: path.into(), message: m };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_err(e.to_string()))? {
        roots.add(cert.map_err(|e| ca_err(e.to_string()))?).map_err(|e| ca_err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ca_err("no certificates".into()));
    }
    Ok(roots)
}

/// A quinn client configuration for `trust`.
pub fn quic_client_config(trust: &ServerTrust) -> Result<quinn::ClientConfig, TrustError> {
    quic_client_config_observed(trust, &PinnedMismatch::default())
}

/// [`quic_client_config`] that records in `seen` the fingerprint of a server
/// that fails the pin.
pub fn quic_client_config_observed(
    trust: &ServerTrust,
    seen: &PinnedMismatch,
) -> Result<quinn::ClientConfig, TrustError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut tls = match trust {
        ServerTrust::Fingerprint(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert { fingerprint: *fp, provider, seen: seen.clone() }))
            .with_no_client_auth(),
        ServerTrust::CaFile(path) => builder.with_root_certificates(load_roots(path)?).with_no_client_auth(),
    };
    tls.alpn_protocols = vec![tally_protocol::wire::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TrustError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(crate::KEEP_ALIVE))
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(crate::MAX_CONCURRENT_UNI_STREAMS.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}
