//! The client's ed25519 key file: 64 hex digits of the secret seed, one line.

use std::path::{Path, PathBuf};

use tally_protocol::Identity;

/// Key file errors.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Unreadable or unwritable.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not 64 hex digits.
    #[error("{0}: not a key file (expected 64 hex digits)")]
    Format(PathBuf),
    /// Refusing to overwrite.
    #[error("{0} exists; not overwriting a key")]
    Exists(PathBuf),
}

/// Reads a key file.
pub fn load(path: &Path) -> Result<Identity, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io { path: path.into(), source })?;
    let bytes = hex::decode(text.trim()).map_err(|_| KeyError::Format(path.into()))?;
    let secret: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Format(path.into()))?;
    Ok(Identity::from_secret(secret))
}

/// Writes a new key from 32 random bytes, owner-readable only.
pub fn create(path: &Path, secret: [u8; 32]) -> Result<Identity, KeyError> {
    if path.exists() {
        return Err(KeyError::Exists(path.into()));
    }
    let io = |source| KeyError::Io { path: path.into(), source };
    std::fs::write(path, format!("{}\n", hex::encode(secret))).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(Identity::from_secret(secret))
}

/// Loads the key, creating it first if the file does not exist.
pub fn load_or_create(path: &Path) -> Result<(Identity, bool), KeyError> {
    if path.exists() {
        return Ok((load(path)?, false));
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)
        .map_err(|e| KeyError::Io { path: path.into(), source: std::io::Error::other(e.to_string()) })?;
    Ok((create(path, secret)?, true))
}
