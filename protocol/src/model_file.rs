//! Model files that leave the system: safetensors whose header says what
//! the model is and where it came from, so that a file alone can be
//! evaluated, rebuilt (FRL) or loaded by PyTorch/NumPy users.
//!
//! Every writer of a final model (the server's `final_model.safetensors`,
//! `tally-client run --save-model`, `tally-sim --save-model`) goes through
//! [`write_model_file`]; FRL runs also get a dense export
//! ([`write_frl_dense_file`]). Both live here because the server never links
//! burn. The format is documented for users in `docs/model-files.md`.
//!
//! # Header metadata (`__metadata__`, string → string)
//!
//! | key | value |
//! | --- | --- |
//! | `tally.format_version` | [`FORMAT_VERSION`] |
//! | `tally.content` | [`Content`]: `parameters` or `frl-dense` |
//! | `tally.arch` | the [`ModelArch`] as JSON (its serde form) |
//! | `tally.model_hash` | hex SHA-256 of the run's model ([`params_hash`]), as in `metrics.jsonl` |
//! | `tally.algorithm` | the update kind's name (`fedavg`, `fedavgm`, `spsa`, `frl`) |
//! | `tally.run_id` | hex run id |
//! | `tally.rounds` | rounds completed when the model was written |
//! | `tally.frl` | FRL runs: the [`FrlRun`] as JSON (seed, keep fraction, mask rule, input normalisation) |
//! | `tally.input_mean`, `tally.input_std` | the input transform `(pixel/255 − mean)/std` |
//!
//! Tensor data is exactly what [`ModelArch::to_safetensors`] writes; only the
//! header grows, so parameter values and model hashes are those of files
//! written before metadata existed, and such old files are still read
//! ([`read_model_file`] with the architecture given by the caller).

use std::collections::BTreeMap;

use crate::frl::FrlRun;
use crate::identity::params_hash;
use crate::kind::KindSettings;
use crate::model::{MAX_PARAMETERS, ModelArch, ModelError, TensorSpec, read_f32_tensors, write_f32_tensors};
use crate::supermask::{FrlArch, masked_weights, network_mask};
use crate::wire::{RunConfig, RunId};

/// The version of the metadata layout this code writes and reads. A reader
/// refuses other versions instead of misreading them.
pub const FORMAT_VERSION: &str = "1";

/// Largest safetensors header (JSON) a reader accepts. Ours are under 2 KiB
/// (a few tensors and the metadata); 1 MiB is generous and keeps a hostile
/// header from costing more than that to parse.
pub const MAX_HEADER_BYTES: usize = 1024 * 1024;

/// Largest model file a reader loads without knowing the architecture first:
/// the largest model ([`MAX_PARAMETERS`] f32) plus the largest header.
pub const MAX_FILE_BYTES: u64 = (MAX_PARAMETERS as u64) * 4 + MAX_HEADER_BYTES as u64 + 8;

/// The metadata keys.
pub mod keys {
    /// [`super::FORMAT_VERSION`].
    pub const FORMAT_VERSION: &str = "tally.format_version";
    /// [`super::Content`].
    pub const CONTENT: &str = "tally.content";
    /// The architecture, JSON.
    pub const ARCH: &str = "tally.arch";
    /// Hex SHA-256 of the run's model.
    pub const MODEL_HASH: &str = "tally.model_hash";
    /// The update kind's name.
    pub const ALGORITHM: &str = "tally.algorithm";
    /// Hex run id.
    pub const RUN_ID: &str = "tally.run_id";
    /// Completed rounds.
    pub const ROUNDS: &str = "tally.rounds";
    /// An FRL run's settings, JSON.
    pub const FRL: &str = "tally.frl";
    /// Input mean of `(pixel/255 − mean)/std`.
    pub const INPUT_MEAN: &str = "tally.input_mean";
    /// Input std of `(pixel/255 − mean)/std`.
    pub const INPUT_STD: &str = "tally.input_std";
}

/// What the tensors of a file are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// The model's parameter vector under the names of [`ModelArch::tensors`]:
    /// dense weights and biases, or a supermask model's scores
    /// (`layers.{l}.scores`).
    Parameters,
    /// An FRL model as a plain dense network: `layers.{l}.weight` = frozen
    /// weight ⊙ mask, PyTorch layout, no biases ([`write_frl_dense_file`]).
    FrlDense,
}

impl Content {
    /// The value of [`keys::CONTENT`].
    pub fn as_str(self) -> &'static str {
        match self {
            Content::Parameters => "parameters",
            Content::FrlDense => "frl-dense",
        }
    }
}

/// What a model file says about its model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelMeta {
    /// The architecture.
    pub arch: ModelArch,
    /// The update kind's name, if known.
    pub algorithm: Option<String>,
    /// The run, if known.
    pub run_id: Option<RunId>,
    /// Rounds completed when the model was written, if known.
    pub rounds: Option<u32>,
    /// An FRL run's settings: what rebuilds the frozen network and its mask.
    pub frl: Option<FrlRun>,
}

impl ModelMeta {
    /// The metadata of run `run`'s model after `rounds` completed rounds.
    pub fn of_run(run: &RunConfig, rounds: u32) -> ModelMeta {
        ModelMeta {
            arch: run.arch.clone(),
            algorithm: Some(run.kind.name().to_owned()),
            run_id: Some(run.run_id),
            rounds: Some(rounds),
            frl: match &run.kind {
                KindSettings::Frl(frl) => Some(frl.clone()),
                KindSettings::FrlDp(cfg) => Some(cfg.run.clone()),
                _ => None,
            },
        }
    }

    /// The metadata of a model of `arch` trained by the kind `kind` for
    /// `rounds` rounds of an unnamed run (the simulator's).
    pub fn of_kind(arch: ModelArch, kind: &KindSettings, rounds: Option<u32>) -> ModelMeta {
        let frl = match kind {
            KindSettings::Frl(frl) => Some(frl.clone()),
            KindSettings::FrlDp(cfg) => Some(cfg.run.clone()),
            _ => None,
        };
        ModelMeta { arch, algorithm: Some(kind.name().to_owned()), run_id: None, rounds, frl }
    }

    /// Whether this is an FRL model with its settings, i.e. one that has a
    /// dense export ([`write_frl_dense_file`]).
    pub fn has_dense_export(&self) -> bool {
        matches!(self.arch, ModelArch::Supermask(_)) && self.frl.is_some()
    }

    /// A model known by its architecture only (e.g. `tally-sim` without a run id).
    pub fn of_arch(arch: ModelArch) -> ModelMeta {
        ModelMeta { arch, algorithm: None, run_id: None, rounds: None, frl: None }
    }

    /// The input transform `(pixel/255 − mean)/std`: FRL's normalisation, or
    /// `(0, 1)` (pixels scaled to `[0, 1]` only) for dense models.
    pub fn input_norm(&self) -> (f32, f32) {
        match &self.frl {
            Some(f) => (f.input_mean, f.input_std),
            None => (0.0, 1.0),
        }
    }

    /// The FRL network and settings, or why there are none.
    pub fn frl_network(&self) -> Result<(&FrlArch, &FrlRun), ModelFileError> {
        let ModelArch::Supermask(net) = &self.arch else {
            return Err(ModelFileError::NotFrl);
        };
        let frl = self.frl.as_ref().ok_or(ModelFileError::MissingKey(keys::FRL))?;
        Ok((net, frl))
    }

    fn check(&self) -> Result<(), ModelFileError> {
        self.arch.validate()?;
        if let Some(frl) = &self.frl {
            frl.validate(&self.arch).map_err(|e| ModelFileError::bad(keys::FRL, e))?;
        }
        Ok(())
    }
}

/// Why a model file was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelFileError {
    /// The tensors don't fit the model, or the file is not safetensors.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// No Tally metadata and no architecture from the caller.
    #[error(
        "the file has no Tally metadata (written before format {FORMAT_VERSION}, or by another tool), \
         so its architecture is unknown: give it (--arch)"
    )]
    NoMetadata,
    /// A raw f32 file (no header at all) and no architecture from the caller.
    #[error("a raw f32 file has no header to say its architecture: give it (--arch)")]
    RawWithoutArch,
    /// A Tally metadata key is missing.
    #[error("metadata key {0} is missing")]
    MissingKey(&'static str),
    /// A metadata value can't be parsed or is not valid.
    #[error("metadata key {key}: {message}")]
    BadMetadata {
        /// The key.
        key: &'static str,
        /// What is wrong with its value.
        message: String,
    },
    /// The header is not a JSON object of the safetensors layout, or its
    /// `__metadata__` is not a map of strings.
    #[error("header: {0}")]
    BadHeader(String),
    /// A format version this code does not know.
    #[error("metadata format version {found:?}; this build reads version {FORMAT_VERSION}")]
    UnsupportedVersion {
        /// The file's version.
        found: String,
    },
    /// The caller's architecture is not the file's.
    #[error("the file holds {file}, not the given {given}")]
    ArchMismatch {
        /// The file's architecture, JSON.
        file: String,
        /// The given architecture, JSON.
        given: String,
    },
    /// The tensors are not the model the metadata names.
    #[error("the tensors' hash {actual} is not tally.model_hash {expected}: the file was changed after it was written")]
    HashMismatch {
        /// `tally.model_hash`.
        expected: String,
        /// The hash of the tensors read.
        actual: String,
    },
    /// An FRL operation on a model that is not a supermask network.
    #[error("not an FRL (supermask) model")]
    NotFrl,
    /// A dense export that is not the masked network of its seed.
    #[error("not the masked network of its run: {0}")]
    NotMaskedNetwork(String),
}

impl ModelFileError {
    fn bad(key: &'static str, e: impl std::fmt::Display) -> Self {
        ModelFileError::BadMetadata { key, message: e.to_string() }
    }
}

/// A model file as read.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFile {
    /// The architecture: the file's, or the caller's for a file without
    /// metadata.
    pub arch: ModelArch,
    /// The file's metadata; `None` for a file written without it.
    pub meta: Option<ModelMeta>,
    /// What the tensors are.
    pub content: Content,
    /// The tensors, concatenated in canonical order: the parameter vector
    /// ([`Content::Parameters`]) or the masked weights ([`Content::FrlDense`]).
    pub values: Vec<f32>,
}

/// The safetensors file of `params` (the parameter vector of `meta.arch`)
/// with its metadata. The tensor data is that of [`ModelArch::to_safetensors`].
pub fn write_model_file(meta: &ModelMeta, params: &[f32]) -> Result<Vec<u8>, ModelFileError> {
    meta.check()?;
    let bytes = meta.arch.to_safetensors(params)?;
    with_metadata(bytes, metadata(meta, Content::Parameters, &params_hash(params)))
}

/// The dense export of an FRL model: `scores` (the run's model, a supermask
/// network's score vector) turned into the network a forward pass uses, as
/// tensors `layers.{l}.weight` = `W_l ⊙ mask_l` ([`masked_weights`],
/// [`network_mask`]) in PyTorch layout (`[out, in, 3, 3]`, `[out, in]`), no
/// biases. `tally.model_hash` is still the run's (the scores').
pub fn write_frl_dense_file(meta: &ModelMeta, scores: &[f32]) -> Result<Vec<u8>, ModelFileError> {
    meta.check()?;
    let (net, frl) = meta.frl_network()?;
    meta.arch.check_params(scores)?;
    let mask = network_mask(net, frl.vote.k_fraction, scores)?;
    let dense = masked_weights(net, frl.seed, &mask);
    let bytes = write_f32_tensors(&dense_specs(net), &dense)?;
    with_metadata(bytes, metadata(meta, Content::FrlDense, &params_hash(scores)))
}

/// Where the dense export of the model file `path` goes: `X.safetensors` →
/// `X_dense.safetensors` (the server's `final_model_dense.safetensors`).
pub fn dense_path(path: &std::path::Path) -> std::path::PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!("{stem}_dense.safetensors"))
}

/// The tensors of an FRL dense export.
pub fn dense_specs(net: &FrlArch) -> Vec<TensorSpec> {
    net.layers()
        .iter()
        .enumerate()
        .map(|(l, layer)| TensorSpec {
            name: format!("layers.{l}.weight"),
            shape: layer.shape(),
            fan_in: layer.fan_in(),
        })
        .collect()
}

/// Reads a model file. With Tally metadata, the file says its architecture:
/// `given`, if any, must be the same. Without (an older file, or another
/// tool's), `given` is required and the tensors must fit it.
///
/// A [`Content::Parameters`] file's tensors must hash to `tally.model_hash`;
/// a [`Content::FrlDense`] file is checked by [`frl_scores_of_dense`] when it
/// is evaluated.
pub fn read_model_file(bytes: &[u8], given: Option<&ModelArch>) -> Result<ModelFile, ModelFileError> {
    let Some(raw) = read_metadata(bytes)?.filter(|m| m.contains_key(keys::FORMAT_VERSION)) else {
        let arch = given.ok_or(ModelFileError::NoMetadata)?;
        arch.validate()?;
        let values = arch.from_safetensors(bytes)?;
        return Ok(ModelFile { arch: arch.clone(), meta: None, content: Content::Parameters, values });
    };
    let (meta, content, hash) = parse_metadata(&raw)?;
    if let Some(given) = given
        && *given != meta.arch
    {
        return Err(ModelFileError::ArchMismatch { file: arch_json(&meta.arch), given: arch_json(given) });
    }
    let values = match content {
        Content::Parameters => {
            let values = meta.arch.from_safetensors(bytes)?;
            let actual = params_hash(&values);
            if actual != hash {
                return Err(ModelFileError::HashMismatch { expected: hex::encode(hash), actual: hex::encode(actual) });
            }
            values
        }
        Content::FrlDense => {
            let ModelArch::Supermask(net) = &meta.arch else {
                return Err(ModelFileError::bad(keys::CONTENT, "frl-dense needs a supermask architecture"));
            };
            let values = read_f32_tensors(bytes, &dense_specs(net))?;
            if let Some(index) = values.iter().position(|v| !v.is_finite()) {
                return Err(ModelError::NonFinite { index }.into());
            }
            values
        }
    };
    Ok(ModelFile { arch: meta.arch.clone(), meta: Some(meta), content, values })
}

/// The scores that make a supermask network's forward pass use exactly the
/// weights of an FRL dense export: 1 for every kept edge, 0 for every pruned
/// one. Checks that `dense` is the masked network of the run (every weight
/// is the frozen weight or 0, and each layer keeps its keep count), so a
/// file that passes evaluates as the exported network.
pub fn frl_scores_of_dense(meta: &ModelMeta, dense: &[f32]) -> Result<Vec<f32>, ModelFileError> {
    let (net, frl) = meta.frl_network()?;
    let layers = net.layers();
    let expected = net.num_edges();
    if dense.len() != expected {
        return Err(ModelError::WrongLength { expected, actual: dense.len() }.into());
    }
    let mut scores = Vec::with_capacity(expected);
    let mut rest = dense;
    for (l, layer) in layers.iter().enumerate() {
        let (values, tail) =
            rest.split_at_checked(layer.edges()).ok_or(ModelError::WrongLength { expected, actual: dense.len() })?;
        rest = tail;
        let frozen = crate::supermask::frozen_layer_weights(frl.seed, l, layer);
        let mut kept = 0usize;
        for (i, (&v, &w)) in values.iter().zip(&frozen).enumerate() {
            // Frozen weights are ±σ, never 0, so a kept edge is told apart.
            if v.to_bits() == w.to_bits() {
                kept += 1;
                scores.push(1.0);
            } else if v == 0.0 {
                scores.push(0.0);
            } else {
                return Err(ModelFileError::NotMaskedNetwork(format!(
                    "layers.{l}.weight[{i}] is {v}, neither the frozen weight {w} nor 0"
                )));
            }
        }
        let keep = crate::frl::keep_count(layer.edges(), frl.vote.k_fraction);
        if kept != keep {
            return Err(ModelFileError::NotMaskedNetwork(format!(
                "layers.{l} keeps {kept} edges, the run's mask keeps {keep}"
            )));
        }
    }
    Ok(scores)
}

fn arch_json(arch: &ModelArch) -> String {
    // Serialising a plain enum of numbers can't fail; say so if it ever does.
    serde_json::to_string(arch).unwrap_or_else(|e| format!("<unprintable architecture: {e}>"))
}

fn metadata(meta: &ModelMeta, content: Content, hash: &[u8; 32]) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| m.insert(k.to_owned(), v);
    put(keys::FORMAT_VERSION, FORMAT_VERSION.to_owned());
    put(keys::CONTENT, content.as_str().to_owned());
    put(keys::ARCH, arch_json(&meta.arch));
    put(keys::MODEL_HASH, hex::encode(hash));
    let (mean, std) = meta.input_norm();
    // `{}` prints the shortest decimal that reads back as the same f32.
    put(keys::INPUT_MEAN, format!("{mean}"));
    put(keys::INPUT_STD, format!("{std}"));
    if let Some(a) = &meta.algorithm {
        put(keys::ALGORITHM, a.clone());
    }
    if let Some(id) = &meta.run_id {
        put(keys::RUN_ID, id.to_string());
    }
    if let Some(r) = meta.rounds {
        put(keys::ROUNDS, r.to_string());
    }
    if let Some(frl) = &meta.frl {
        // FrlRun is numbers and enums: serialisation can't fail.
        put(keys::FRL, serde_json::to_string(frl).unwrap_or_default());
    }
    m
}

fn parse_metadata(raw: &BTreeMap<String, String>) -> Result<(ModelMeta, Content, [u8; 32]), ModelFileError> {
    let get = |k: &'static str| raw.get(k).map(String::as_str).ok_or(ModelFileError::MissingKey(k));
    let version = get(keys::FORMAT_VERSION)?;
    if version != FORMAT_VERSION {
        return Err(ModelFileError::UnsupportedVersion { found: version.chars().take(32).collect() });
    }
    let content = match get(keys::CONTENT)? {
        "parameters" => Content::Parameters,
        "frl-dense" => Content::FrlDense,
        other => return Err(ModelFileError::bad(keys::CONTENT, format!("unknown content {other:?}"))),
    };
    let arch: ModelArch = serde_json::from_str(get(keys::ARCH)?).map_err(|e| ModelFileError::bad(keys::ARCH, e))?;
    arch.validate().map_err(|e| ModelFileError::bad(keys::ARCH, e))?;
    let hash = hex_array::<32>(keys::MODEL_HASH, get(keys::MODEL_HASH)?)?;
    let run_id = raw.get(keys::RUN_ID).map(|v| hex_array::<16>(keys::RUN_ID, v).map(RunId)).transpose()?;
    let rounds = raw
        .get(keys::ROUNDS)
        .map(|v| v.parse::<u32>().map_err(|e| ModelFileError::bad(keys::ROUNDS, e)))
        .transpose()?;
    let frl = raw
        .get(keys::FRL)
        .map(|v| serde_json::from_str::<FrlRun>(v).map_err(|e| ModelFileError::bad(keys::FRL, e)))
        .transpose()?;
    let meta = ModelMeta { arch, algorithm: raw.get(keys::ALGORITHM).cloned(), run_id, rounds, frl };
    meta.check()?;
    Ok((meta, content, hash))
}

fn hex_array<const N: usize>(key: &'static str, v: &str) -> Result<[u8; N], ModelFileError> {
    let bytes = hex::decode(v).map_err(|e| ModelFileError::bad(key, e))?;
    bytes.try_into().map_err(|b: Vec<u8>| ModelFileError::bad(key, format!("{} bytes, expected {N}", b.len())))
}

/// The header of a safetensors file: its length prefix checked against the
/// file and [`MAX_HEADER_BYTES`], parsed as a JSON object.
fn header(bytes: &[u8]) -> Result<(BTreeMap<String, serde_json::Value>, &[u8]), ModelFileError> {
    let bad = |m: String| ModelFileError::Model(ModelError::Safetensors(m));
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(bad("shorter than the 8-byte header length".into()));
    };
    let len = usize::try_from(u64::from_le_bytes(*len_bytes)).unwrap_or(usize::MAX);
    if len > MAX_HEADER_BYTES {
        return Err(bad(format!("header of {len} bytes, more than the limit {MAX_HEADER_BYTES}")));
    }
    let (head, data) =
        rest.split_at_checked(len).ok_or_else(|| bad("header length beyond the end of the file".into()))?;
    let map = serde_json::from_slice(head).map_err(|e| bad(format!("header: {e}")))?;
    Ok((map, data))
}

/// The `__metadata__` map of a safetensors file, if it has one.
pub fn read_metadata(bytes: &[u8]) -> Result<Option<BTreeMap<String, String>>, ModelFileError> {
    let (mut head, _) = header(bytes)?;
    match head.remove("__metadata__") {
        None => Ok(None),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| ModelFileError::BadHeader(format!("__metadata__ is not a map of strings: {e}"))),
    }
}

/// `bytes` (a safetensors file without metadata, as the safetensors crate
/// writes it) with `meta` as its `__metadata__`. Done here rather than
/// through the crate's writer, which takes a `HashMap` and so writes the keys
/// in a different order on every run: this header is sorted, so the same
/// model gives the same bytes. The data section is unchanged.
fn with_metadata(bytes: Vec<u8>, meta: BTreeMap<String, String>) -> Result<Vec<u8>, ModelFileError> {
    let (mut head, data) = header(&bytes)?;
    if head.contains_key("__metadata__") {
        return Err(ModelFileError::BadHeader("already has metadata".into()));
    }
    let meta = serde_json::to_value(meta).map_err(|e| ModelFileError::BadHeader(e.to_string()))?;
    head.insert("__metadata__".to_owned(), meta);
    let mut json = serde_json::to_vec(&head).map_err(|e| ModelFileError::BadHeader(e.to_string()))?;
    // safetensors pads the header with spaces so that the data starts
    // 8-byte aligned (what zero-copy readers expect).
    json.resize(json.len().next_multiple_of(8), b' ');
    if json.len() > MAX_HEADER_BYTES {
        return Err(ModelFileError::BadHeader(format!("{} bytes, more than {MAX_HEADER_BYTES}", json.len())));
    }
    let mut out = Vec::with_capacity(8 + json.len() + data.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::supermask::initial_scores;

    fn mlp_meta() -> ModelMeta {
        ModelMeta {
            arch: ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 },
            algorithm: Some("fedavg".into()),
            run_id: Some(RunId([7; 16])),
            rounds: Some(3),
            frl: None,
        }
    }

    fn frl_meta() -> ModelMeta {
        let net = FrlArch::MNIST_LENET;
        let arch = ModelArch::Supermask(net);
        ModelMeta {
            frl: Some(FrlRun::new(5, net.layer_sizes())),
            arch,
            algorithm: Some("frl".into()),
            run_id: None,
            rounds: Some(1),
        }
    }

    #[test]
    fn round_trip_keeps_tensors_and_adds_only_metadata() {
        let meta = mlp_meta();
        let p = meta.arch.init_params(9);
        let bytes = write_model_file(&meta, &p).unwrap();
        // Deterministic, and the data section is the metadata-free file's.
        assert_eq!(bytes, write_model_file(&meta, &p).unwrap());
        let plain = meta.arch.to_safetensors(&p).unwrap();
        let data_of = |b: &[u8]| b[8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize..].to_vec();
        assert_eq!(data_of(&bytes), data_of(&plain));
        assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()) % 8, 0, "data stays 8-byte aligned");
        // Read without and with the architecture; the old reader still works.
        let f = read_model_file(&bytes, None).unwrap();
        assert_eq!(
            (f.arch.clone(), f.content, f.meta.clone().unwrap()),
            (meta.arch.clone(), Content::Parameters, meta.clone())
        );
        assert_eq!(f.values, p);
        assert_eq!(read_model_file(&bytes, Some(&meta.arch)).unwrap(), f);
        assert_eq!(meta.arch.from_safetensors(&bytes).unwrap(), p);
        // The safetensors crate reads it, metadata included.
        let (_, st) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let m = st.metadata().as_ref().unwrap();
        assert_eq!(m[keys::MODEL_HASH], hex::encode(params_hash(&p)));
        assert_eq!(m[keys::ARCH], r#"{"kind":"mlp","input":4,"hidden":[3],"classes":2}"#);
        assert_eq!((m[keys::RUN_ID].as_str(), m[keys::ROUNDS].as_str()), ("07".repeat(16).as_str(), "3"));
        assert_eq!((m[keys::INPUT_MEAN].as_str(), m[keys::INPUT_STD].as_str()), ("0", "1"));
    }

    #[test]
    fn old_files_need_the_architecture_and_it_must_agree() {
        let meta = mlp_meta();
        let p = meta.arch.init_params(1);
        let old = meta.arch.to_safetensors(&p).unwrap();
        assert_eq!(read_model_file(&old, None).unwrap_err(), ModelFileError::NoMetadata);
        let f = read_model_file(&old, Some(&meta.arch)).unwrap();
        assert_eq!((f.meta, f.values), (None, p.clone()));
        let other = ModelArch::Mlp { input: 4, hidden: vec![5], classes: 2 };
        assert!(matches!(read_model_file(&old, Some(&other)), Err(ModelFileError::Model(_))));
        let new = write_model_file(&meta, &p).unwrap();
        let e = read_model_file(&new, Some(&other)).unwrap_err();
        assert!(matches!(e, ModelFileError::ArchMismatch { .. }), "{e}");
        assert!(e.to_string().contains("\"hidden\":[5]"), "{e}");
    }

    /// `bytes` with its `__metadata__` replaced by `edit` of it.
    fn edit_metadata(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let (mut head, data) = header(bytes).unwrap();
        edit(head.get_mut("__metadata__").unwrap());
        let json = serde_json::to_vec(&head).unwrap();
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn garbled_metadata_is_a_typed_error() {
        let meta = mlp_meta();
        let p = meta.arch.init_params(1);
        let good = write_model_file(&meta, &p).unwrap();
        let set = |k: &str, v: &str| {
            let (k, v) = (k.to_owned(), v.to_owned());
            edit_metadata(&good, move |m| m[k] = serde_json::Value::String(v))
        };
        let err = |b: &[u8]| read_model_file(b, None).unwrap_err();
        assert!(matches!(err(&set(keys::ARCH, "{")), ModelFileError::BadMetadata { key: keys::ARCH, .. }));
        let huge = r#"{"kind":"mlp","input":4294967295,"hidden":[4294967295],"classes":2}"#;
        assert!(matches!(err(&set(keys::ARCH, huge)), ModelFileError::BadMetadata { key: keys::ARCH, .. }));
        assert!(matches!(err(&set(keys::FORMAT_VERSION, "2")), ModelFileError::UnsupportedVersion { .. }));
        assert!(matches!(err(&set(keys::CONTENT, "x")), ModelFileError::BadMetadata { key: keys::CONTENT, .. }));
        assert!(matches!(err(&set(keys::MODEL_HASH, "zz")), ModelFileError::BadMetadata { .. }));
        assert!(matches!(err(&set(keys::MODEL_HASH, &"00".repeat(32))), ModelFileError::HashMismatch { .. }));
        assert!(matches!(err(&set(keys::ROUNDS, "-1")), ModelFileError::BadMetadata { key: keys::ROUNDS, .. }));
        assert!(matches!(err(&set(keys::RUN_ID, "00")), ModelFileError::BadMetadata { key: keys::RUN_ID, .. }));
        assert!(matches!(err(&set(keys::FRL, "{}")), ModelFileError::BadMetadata { key: keys::FRL, .. }));
        let no_hash = edit_metadata(&good, |m| {
            m.as_object_mut().unwrap().remove(keys::MODEL_HASH);
        });
        assert_eq!(err(&no_hash), ModelFileError::MissingKey(keys::MODEL_HASH));
        let not_strings = edit_metadata(&good, |m| m[keys::ROUNDS] = serde_json::json!(3));
        assert!(matches!(err(&not_strings), ModelFileError::BadHeader(_)));
        // Not safetensors at all, and a header length past the limit.
        assert!(matches!(err(b"garbage"), ModelFileError::Model(_)));
        let mut big = ((MAX_HEADER_BYTES + 1) as u64).to_le_bytes().to_vec();
        big.resize(MAX_HEADER_BYTES + 64, b' ');
        assert!(err(&big).to_string().contains("more than the limit"));
        // Another tool's metadata only: treated as a file without ours.
        let foreign = edit_metadata(&good, |m| *m = serde_json::json!({"format": "pt"}));
        assert_eq!(err(&foreign), ModelFileError::NoMetadata);
        assert_eq!(read_model_file(&foreign, Some(&meta.arch)).unwrap().values, p);
    }

    #[test]
    fn frl_dense_export_is_the_masked_network() {
        let meta = frl_meta();
        let (net, frl) = meta.frl_network().unwrap();
        let scores = initial_scores(net, frl.seed);
        let params = write_model_file(&meta, &scores).unwrap();
        let f = read_model_file(&params, None).unwrap();
        assert_eq!(f.meta.as_ref().unwrap().frl, meta.frl);
        let dense = write_frl_dense_file(&meta, &scores).unwrap();
        let d = read_model_file(&dense, None).unwrap();
        assert_eq!(d.content, Content::FrlDense);
        let mask = network_mask(net, frl.vote.k_fraction, &scores).unwrap();
        assert_eq!(d.values, masked_weights(net, frl.seed, &mask));
        let (_, st) = safetensors::SafeTensors::read_metadata(&dense).unwrap();
        assert_eq!(st.metadata().as_ref().unwrap()[keys::MODEL_HASH], hex::encode(params_hash(&scores)));
        assert_eq!(st.metadata().as_ref().unwrap()[keys::INPUT_MEAN], "0.1307");
        let st = safetensors::SafeTensors::deserialize(&dense).unwrap();
        assert_eq!(st.tensor("layers.0.weight").unwrap().shape(), [32, 1, 3, 3]);
        assert_eq!(st.tensor("layers.3.weight").unwrap().shape(), [10, 128]);
        // Its scores give back the same mask.
        let rebuilt = frl_scores_of_dense(d.meta.as_ref().unwrap(), &d.values).unwrap();
        assert_eq!(network_mask(net, frl.vote.k_fraction, &rebuilt).unwrap(), mask);
        // A changed weight, or one edge too many, is refused.
        let mut bad = d.values.clone();
        bad[0] *= 2.0;
        assert!(matches!(frl_scores_of_dense(&meta, &bad), Err(ModelFileError::NotMaskedNetwork(_))));
        let frozen = crate::supermask::frozen_weights(net, frl.seed);
        let pruned = mask.iter().position(|k| !k).unwrap();
        let mut extra = d.values.clone();
        extra[pruned] = frozen.concat()[pruned];
        assert!(matches!(frl_scores_of_dense(&meta, &extra), Err(ModelFileError::NotMaskedNetwork(_))));
        assert!(meta.has_dense_export() && !mlp_meta().has_dense_export());
        let p = std::path::Path::new("out/final_model.safetensors");
        assert_eq!(dense_path(p), std::path::Path::new("out/final_model_dense.safetensors"));
        // Dense exports need an FRL model with its settings.
        assert_eq!(write_frl_dense_file(&mlp_meta(), &[0.0; 23]).unwrap_err(), ModelFileError::NotFrl);
        let no_frl = ModelMeta { frl: None, ..meta.clone() };
        assert_eq!(write_frl_dense_file(&no_frl, &scores).unwrap_err(), ModelFileError::MissingKey(keys::FRL));
    }
}
