//! TLS 1.3 server configuration for QUIC (rustls on ring).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::config::TlsSource;

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("reading {path}: {message}")]
    Pem {
        /// File.
        path: String,
        /// Why.
        message: String,
    },
    /// Certificate generation failed.
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the configuration.
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

/// A certificate, its key and the fingerprint clients pin.
#[derive(Debug)]
pub struct ServerIdentity {
    /// Chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the leaf certificate (DER).
    pub fingerprint: [u8; 32],
}

/// Loads or generates the server's certificate.
pub fn load_identity(source: &TlsSource) -> Result<ServerIdentity, TlsError> {
    let (chain, key, fingerprint) = match source {
        TlsSource::SelfSigned => {
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            let fingerprint = Sha256::digest(ck.cert.der().as_ref()).into();
            (vec![ck.cert.der().clone()], key, fingerprint)
        }
        TlsSource::Files { cert, key } => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| pem_err(cert, e))?;
            let Some(leaf) = chain.first() else {
                return Err(TlsError::Pem { path: cert.display().to_string(), message: "no certificate".into() });
            };
            let fingerprint = Sha256::digest(leaf.as_ref()).into();
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
            (chain, key, fingerprint)
        }
    };
    Ok(ServerIdentity { chain, key, fingerprint })
}

fn pem_err(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::Pem { path: path.display().to_string(), message: e.to_string() }
}

/// A quinn server config: TLS 1.3 only, ALPN `tally/1`.
pub fn quic_server_config(id: ServerIdentity) -> Result<quinn::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(id.chain, id.key)?;
    tls.alpn_protocols = vec![tally_protocol::wire::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// Writes a new self-signed certificate and its key as PEM files (the key
/// owner-readable only); returns the certificate's SHA-256 fingerprint.
pub fn write_self_signed(cert: &Path, key: &Path, names: Vec<String>) -> Result<[u8; 32], TlsError> {
    let ck = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |e: std::io::Error| TlsError::Pem { path, message: e.to_string() }
    };
    std::fs::write(cert, ck.cert.pem()).map_err(io(cert))?;
    std::fs::write(key, ck.signing_key.serialize_pem()).map_err(io(key))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).map_err(io(key))?;
    }
    Ok(Sha256::digest(ck.cert.der().as_ref()).into())
}

/// The endpoint configuration of a server: the HMAC key of QUIC stateless
/// resets and the key of the connection-id validity check are both derived
/// from the certificate's private key, so a server restarted with the same
/// key files recognises the connection ids the crashed process issued and
/// answers them with resets that the clients accept. Clients of the crashed
/// process then notice at once (instead of after the idle timeout) and
/// reconnect. With `--self-signed` the key is new at every start anyway.
pub fn endpoint_config(id: &ServerIdentity) -> quinn::EndpointConfig {
    let derive = |label: &[u8]| -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(label);
        h.update(id.key.secret_der());
        h.finalize().into()
    };
    let reset = derive(b"tally/v1/stateless-reset\0");
    let cid = derive(b"tally/v1/connection-id\0");
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset)));
    let cid_key = u64::from_le_bytes([cid[0], cid[1], cid[2], cid[3], cid[4], cid[5], cid[6], cid[7]]);
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    config
}
