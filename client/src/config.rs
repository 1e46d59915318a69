//! The client's configuration file (`tally-client run --config FILE`).
//!
//! An edge device runs the client as a service with one file of settings
//! instead of a long command line. Every setting of `tally-client run` has a
//! key here; the precedence is command-line flag, then environment variable
//! (`TALLY_SERVER`, `TALLY_KEY`, …, named in the flag's help), then this
//! file, then the built-in default. So one file can be baked into an image
//! and each device or pod overrides what differs (its key, its shard) from
//! the environment.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tally_kernels::DeviceChoice;
use tally_kernels::data::formats::DataSpec;

/// Largest configuration file read: a few dozen short keys fit in far less;
/// a bigger file is a mistake (a data file passed as `--config`), refused
/// before it is parsed.
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// Why a configuration file can't be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading the file.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Larger than [`MAX_CONFIG_BYTES`].
    #[error("{path}: {len} bytes, more than a configuration file may have ({MAX_CONFIG_BYTES})")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// TOML syntax, an unknown key, or a value of the wrong type (the
    /// message names the line and the key).
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why, from the TOML parser.
        message: String,
    },
}

/// The file as written: every key optional. Relative paths in it are taken
/// relative to the file's directory, so a file and the key beside it can be
/// moved together.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// `HOST:PORT` of the server.
    pub server: Option<String>,
    /// SHA-256 fingerprint of the server certificate (64 hex digits).
    pub fingerprint: Option<String>,
    /// CA file (PEM) instead of a fingerprint.
    pub ca: Option<PathBuf>,
    /// Name to check in the server certificate (CA mode).
    pub server_name: Option<String>,
    /// The client's key file.
    pub key: Option<PathBuf>,
    /// `embedded`, a directory of MNIST-format IDX files, or a table
    /// describing a CSV, NumPy, safetensors or image-folder dataset
    /// (`docs/data.md`).
    pub data: Option<DataSpec>,
    /// This client's IID shard, `INDEX/COUNT`.
    pub shard: Option<String>,
    /// Seed of the IID sharding.
    pub shard_seed: Option<u64>,
    /// JSON partition file (one list of training indices per client).
    pub partition: Option<PathBuf>,
    /// Which list of `partition` is ours.
    pub partition_index: Option<usize>,
    /// Evaluate received models on the test set (default true).
    pub eval: Option<bool>,
    /// Consecutive failed connection attempts before giving up.
    pub max_retries: Option<u32>,
    /// Where to write the final model.
    pub save_model: Option<PathBuf>,
    /// Seconds one connection attempt may take.
    pub connect_timeout_secs: Option<u64>,
    /// `auto`, `cpu` or `gpu`.
    pub device: Option<DeviceChoice>,
}

impl ClientConfig {
    /// Reads and parses `path`; relative paths inside resolve against its
    /// directory.
    pub fn from_file(path: &Path) -> Result<ClientConfig, ConfigError> {
        let io = |source| ConfigError::Io { path: path.to_path_buf(), source };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge { path: path.to_path_buf(), len });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let mut config =
            ClientConfig::parse(&text).map_err(|message| ConfigError::Parse { path: path.to_path_buf(), message })?;
        let base = path.parent().unwrap_or(Path::new(""));
        for p in [&mut config.ca, &mut config.key, &mut config.partition, &mut config.save_model].into_iter().flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        match &mut config.data {
            Some(DataSpec::Named(d)) if d != "embedded" && Path::new(d.as_str()).is_relative() => {
                *d = base.join(d.as_str()).to_string_lossy().into_owned();
            }
            Some(spec @ DataSpec::Files(_)) => {
                for p in spec.paths_mut() {
                    if p.is_relative() {
                        *p = base.join(&*p);
                    }
                }
            }
            _ => {}
        }
        Ok(config)
    }

    /// Parses TOML text (paths as written).
    pub fn parse(text: &str) -> Result<ClientConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_and_relative_paths_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("client.toml");
        std::fs::write(
            &file,
            r#"
server = "fl.example.org:4433"
fingerprint = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
key = "keys/device.key"
data = "data/mnist"
shard = "2/5"
shard_seed = 7
eval = false
max_retries = 100
save_model = "/var/lib/tally/final.safetensors"
connect_timeout_secs = 20
device = "cpu"
"#,
        )
        .unwrap();
        let c = ClientConfig::from_file(&file).unwrap();
        assert_eq!(c.server.as_deref(), Some("fl.example.org:4433"));
        assert_eq!(c.key, Some(dir.path().join("keys/device.key")));
        assert_eq!(c.data, Some(DataSpec::Named(dir.path().join("data/mnist").to_string_lossy().into_owned())));
        assert_eq!(c.save_model, Some(PathBuf::from("/var/lib/tally/final.safetensors")));
        assert_eq!((c.shard.as_deref(), c.shard_seed, c.eval), (Some("2/5"), Some(7), Some(false)));
        assert_eq!((c.max_retries, c.connect_timeout_secs, c.device), (Some(100), Some(20), Some(DeviceChoice::Cpu)));
    }

    #[test]
    fn a_data_table_resolves_its_paths_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("client.toml");
        std::fs::write(
            &file,
            "data = { format = \"npy\", train = \"x.npy\", train_labels = \"/abs/y.npy\", test_fraction = 0.2 }\n",
        )
        .unwrap();
        let c = ClientConfig::from_file(&file).unwrap();
        let Some(DataSpec::Files(f)) = c.data else { panic!("{:?}", c.data) };
        assert_eq!(f.train, dir.path().join("x.npy"));
        assert_eq!(f.train_labels, Some(PathBuf::from("/abs/y.npy")));
        assert_eq!(f.test_fraction, Some(0.2));
        // A mistake inside the table names the field.
        let e = ClientConfig::parse("data = { format = \"csv\", trian = \"x.csv\" }").unwrap_err();
        assert!(e.contains("trian"), "{e}");
        let e = ClientConfig::parse("data = { format = \"xlsx\", train = \"x\" }").unwrap_err();
        assert!(e.contains("xlsx"), "{e}");
    }

    #[test]
    fn the_example_file_parses() {
        let c = ClientConfig::parse(include_str!("../../deploy/client.example.toml")).unwrap();
        assert_eq!(c.server.as_deref(), Some("fl.example.org:4433"));
        assert_eq!((c.eval, c.device), (Some(true), Some(DeviceChoice::Auto)));
    }

    #[test]
    fn mistakes_are_named() {
        let unknown = ClientConfig::parse("servr = \"x:1\"").unwrap_err();
        assert!(unknown.contains("servr"), "{unknown}");
        let wrong_type = ClientConfig::parse("max_retries = \"many\"").unwrap_err();
        assert!(wrong_type.contains("max_retries"), "{wrong_type}");
        let device = ClientConfig::parse("device = \"tpu\"").unwrap_err();
        assert!(device.contains("tpu") || device.contains("device"), "{device}");
        assert_eq!(ClientConfig::parse("data = \"embedded\"").unwrap().data, Some(DataSpec::from("embedded")));

        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        assert!(matches!(ClientConfig::from_file(&big), Err(ConfigError::TooLarge { .. })));
        let missing = ClientConfig::from_file(&dir.path().join("none.toml")).unwrap_err();
        assert!(missing.to_string().contains("none.toml"), "{missing}");
    }
}
