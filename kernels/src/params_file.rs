//! Reading and writing model parameters on disk: safetensors (PyTorch names
//! and layouts, see `tally_protocol::model`; written with the metadata of
//! `tally_protocol::model_file`) or raw little-endian f32 in the canonical
//! flat order. Also the evaluation of a model file, whatever it holds
//! ([`evaluate_model_file`]: dense parameters, FRL scores or an FRL dense
//! export).

use std::io::Read;
use std::path::Path;

use tally_protocol::model::ModelArch;
use tally_protocol::model_file::{self, Content, ModelFile, ModelMeta};

use crate::data::Dataset;
use crate::{Device, EvalReport, KernelError};

/// Bytes a safetensors file may carry beyond its tensor data (the JSON
/// header and its length): the protocol's limit on what a reader parses.
pub const MAX_HEADER_BYTES: u64 = model_file::MAX_HEADER_BYTES as u64 + 8;

/// Loads parameters for `arch` from `path`: a `.safetensors` file (every
/// tensor of the model with its exact name, shape and dtype F32), or anything
/// else as raw little-endian f32 in the canonical order. Non-finite values and
/// wrong sizes are refused.
pub fn load_params(path: &Path, arch: &ModelArch) -> Result<Vec<f32>, KernelError> {
    arch.validate()?;
    let io = |source| KernelError::Io { path: path.to_path_buf(), source };
    let limit = (arch.num_params() as u64).saturating_mul(4).saturating_add(MAX_HEADER_BYTES);
    let mut bytes = Vec::new();
    std::fs::File::open(path).map_err(io)?.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(KernelError::ParamsFile {
            path: path.to_path_buf(),
            source: tally_protocol::model::ModelError::WrongFileSize {
                expected: arch.num_params().saturating_mul(4),
                actual: bytes.len(),
            },
        });
    }
    let is_safetensors = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    let parsed = if is_safetensors { arch.from_safetensors(&bytes) } else { arch.from_raw_f32(&bytes) };
    parsed.map_err(|source| KernelError::ParamsFile { path: path.to_path_buf(), source })
}

/// Writes `params` (the parameter vector of `meta.arch`) to `path` as
/// safetensors with its metadata ([`model_file::write_model_file`]).
pub fn save_model(path: &Path, meta: &ModelMeta, params: &[f32]) -> Result<(), KernelError> {
    let bytes = model_file::write_model_file(meta, params).map_err(file_err(path))?;
    std::fs::write(path, bytes).map_err(|source| KernelError::Io { path: path.to_path_buf(), source })
}

/// Writes the dense export of an FRL model (`scores`, the run's model) to
/// `path` ([`model_file::write_frl_dense_file`]).
pub fn save_frl_dense(path: &Path, meta: &ModelMeta, scores: &[f32]) -> Result<(), KernelError> {
    let bytes = model_file::write_frl_dense_file(meta, scores).map_err(file_err(path))?;
    std::fs::write(path, bytes).map_err(|source| KernelError::Io { path: path.to_path_buf(), source })
}

fn file_err(path: &Path) -> impl Fn(model_file::ModelFileError) -> KernelError + '_ {
    move |source| KernelError::ModelFile { path: path.to_path_buf(), source }
}

/// Reads a model file: a `.safetensors` file says its architecture in its
/// metadata (`given`, if any, must agree); one without metadata, or a raw
/// f32 file (any other extension), needs `given`. At most
/// [`model_file::MAX_FILE_BYTES`] are read when the architecture is not known
/// first, the model's size plus [`MAX_HEADER_BYTES`] when it is.
pub fn load_model_file(path: &Path, given: Option<&ModelArch>) -> Result<ModelFile, KernelError> {
    let is_safetensors = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if !is_safetensors {
        let arch = given.ok_or_else(|| KernelError::ModelFile {
            path: path.to_path_buf(),
            source: model_file::ModelFileError::RawWithoutArch,
        })?;
        let values = load_params(path, arch)?;
        return Ok(ModelFile { arch: arch.clone(), meta: None, content: Content::Parameters, values });
    }
    let limit = match given {
        Some(arch) => {
            arch.validate()?;
            (arch.num_params() as u64).saturating_mul(4).saturating_add(MAX_HEADER_BYTES)
        }
        None => model_file::MAX_FILE_BYTES,
    };
    let io = |source| KernelError::Io { path: path.to_path_buf(), source };
    let mut bytes = Vec::new();
    std::fs::File::open(path).map_err(io)?.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(KernelError::ModelFile {
            path: path.to_path_buf(),
            source: tally_protocol::model::ModelError::Safetensors(format!(
                "more than {limit} bytes, larger than {}",
                if given.is_some() { "the model" } else { "any model" }
            ))
            .into(),
        });
    }
    model_file::read_model_file(&bytes, given).map_err(file_err(path))
}

/// Loss and accuracy of the model in `file` on `data`: dense parameters as
/// they are; an FRL model (its scores, or its dense export, checked to be the
/// masked network of its run) through the supermask network its metadata
/// rebuilds. `path` names the file in errors.
pub fn evaluate_model_file(
    path: &Path,
    file: &ModelFile,
    data: &Dataset,
    device: &Device,
    batch_size: usize,
) -> Result<EvalReport, KernelError> {
    let ModelArch::Supermask(_) = &file.arch else {
        return crate::train::evaluate(&file.arch, &file.values, data, device, batch_size);
    };
    // An FRL model needs its run's seed and mask settings: only in the metadata.
    let meta = file.meta.as_ref().ok_or_else(|| KernelError::ModelFile {
        path: path.to_path_buf(),
        source: model_file::ModelFileError::MissingKey(model_file::keys::FRL),
    })?;
    let (_, frl) = meta.frl_network().map_err(file_err(path))?;
    let scores = match file.content {
        Content::Parameters => std::borrow::Cow::Borrowed(&file.values),
        Content::FrlDense => {
            std::borrow::Cow::Owned(model_file::frl_scores_of_dense(meta, &file.values).map_err(file_err(path))?)
        }
    };
    let net = crate::update::frl_network(&file.arch, frl)?;
    let mut layers = Vec::with_capacity(net.layers().len());
    let mut rest = scores.as_slice();
    for n in net.layer_sizes() {
        let (layer, tail) = rest.split_at_checked(n).ok_or_else(|| {
            KernelError::InvalidConfig(format!(
                "{} scores for a network of {} edges",
                scores.len(),
                net.layer_sizes().iter().sum::<usize>()
            ))
        })?;
        layers.push(layer.to_vec());
        rest = tail;
    }
    net.evaluate_scores(&layers, data, device, batch_size)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_and_raw_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let arch = ModelArch::LeNet5 { classes: 10 };
        let p = arch.init_params(2);
        let st = dir.path().join("m.safetensors");
        save_model(&st, &ModelMeta::of_arch(arch.clone()), &p).unwrap();
        assert_eq!(load_params(&st, &arch).unwrap(), p);
        let f = load_model_file(&st, None).unwrap();
        assert_eq!((f.arch, f.values), (arch.clone(), p.clone()));
        let raw = dir.path().join("m.f32");
        std::fs::write(&raw, p.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        assert_eq!(load_params(&raw, &arch).unwrap(), p);
    }

    #[test]
    fn rejects_wrong_files_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let arch = ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 };
        let p = arch.init_params(1);
        // Raw file one value short.
        let raw = dir.path().join("short.bin");
        std::fs::write(&raw, p[1..].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        let e = load_params(&raw, &arch).unwrap_err();
        assert!(matches!(e, KernelError::ParamsFile { .. }) && e.to_string().contains("short.bin"), "{e}");
        // A safetensors file of another architecture.
        let st = dir.path().join("other.safetensors");
        let other = ModelArch::Mlp { input: 4, hidden: vec![5], classes: 2 };
        save_model(&st, &ModelMeta::of_arch(other.clone()), &other.init_params(1)).unwrap();
        assert!(matches!(load_params(&st, &arch), Err(KernelError::ParamsFile { .. })));
        let e = load_model_file(&st, Some(&arch)).unwrap_err();
        let KernelError::ModelFile { path, source } = &e else { panic!("{e}") };
        assert!(path.ends_with("other.safetensors"), "{e}");
        assert!(matches!(source, model_file::ModelFileError::ArchMismatch { .. }), "{source}");
        assert_eq!(e.to_string(), path.display().to_string());
        // A file without metadata needs the architecture, and says which file.
        let old = dir.path().join("old.safetensors");
        std::fs::write(&old, arch.to_safetensors(&p).unwrap()).unwrap();
        let e = load_model_file(&old, None).unwrap_err();
        let KernelError::ModelFile { path, source } = &e else { panic!("{e}") };
        assert!(path.ends_with("old.safetensors") && source.to_string().contains("--arch"), "{source}");
        let e = load_model_file(&raw, None).unwrap_err();
        assert!(matches!(e, KernelError::ModelFile { source: model_file::ModelFileError::RawWithoutArch, .. }));
        assert_eq!(load_model_file(&old, Some(&arch)).unwrap().values, p);
        // Raw bytes named .safetensors.
        let fake = dir.path().join("fake.safetensors");
        std::fs::write(&fake, vec![0u8; p.len() * 4]).unwrap();
        assert!(matches!(load_params(&fake, &arch), Err(KernelError::ParamsFile { .. })));
        // Far too large: refused without parsing.
        let big = dir.path().join("big.bin");
        std::fs::write(&big, vec![0u8; (MAX_HEADER_BYTES as usize) + 1024]).unwrap();
        assert!(matches!(load_params(&big, &arch), Err(KernelError::ParamsFile { .. })));
        // Missing file.
        let e = load_params(&dir.path().join("nope"), &arch).unwrap_err();
        assert!(matches!(e, KernelError::Io { .. }) && e.to_string().contains("nope"));
        // Saving non-finite parameters is refused.
        let mut bad = p.clone();
        bad[0] = f32::INFINITY;
        assert!(save_model(&dir.path().join("bad.safetensors"), &ModelMeta::of_arch(arch.clone()), &bad).is_err());
    }

    /// An FRL model evaluates the same from its scores and from its dense
    /// export, and the same as the kernels' own evaluation of the scores.
    #[test]
    fn frl_scores_and_dense_export_evaluate_alike() {
        use tally_protocol::frl::FrlRun;
        use tally_protocol::supermask::FrlArch;
        let dir = tempfile::tempdir().unwrap();
        let net = FrlArch::MNIST_LENET;
        let arch = ModelArch::Supermask(net);
        let frl = FrlRun::new(4, net.layer_sizes());
        let meta = ModelMeta { frl: Some(frl.clone()), ..ModelMeta::of_arch(arch.clone()) };
        let scores = arch.init_params(4);
        let (st, dense) = (dir.path().join("m.safetensors"), dir.path().join("d.safetensors"));
        save_model(&st, &meta, &scores).unwrap();
        save_frl_dense(&dense, &meta, &scores).unwrap();
        let data = crate::data::embedded_mnist().test.subset(&(0..64).collect::<Vec<_>>()).unwrap();
        let device = crate::cpu_device();
        let a = evaluate_model_file(&st, &load_model_file(&st, None).unwrap(), &data, &device, 32).unwrap();
        let d = load_model_file(&dense, None).unwrap();
        assert_eq!(d.content, Content::FrlDense);
        let b = evaluate_model_file(&dense, &d, &data, &device, 32).unwrap();
        let run = tally_protocol::wire::RunConfig {
            run_id: tally_protocol::wire::RunId([0; 16]),
            arch: arch.clone(),
            rounds: 1,
            train: tally_protocol::wire::TrainSpec::sgd(0.1, 8, 1),
            kind: tally_protocol::kind::KindSettings::Frl(frl),
        };
        let c = crate::update::evaluate_run(&run, &scores, &data, &device, 32).unwrap();
        assert_eq!((a.correct, a.total), (c.correct, c.total));
        assert_eq!((b.correct, b.total), (c.correct, c.total));
        // Without its metadata an FRL model can't be evaluated.
        let bare = ModelFile { meta: None, ..load_model_file(&st, None).unwrap() };
        let e = evaluate_model_file(&st, &bare, &data, &device, 32).unwrap_err();
        let KernelError::ModelFile { source, .. } = &e else { panic!("{e}") };
        assert!(source.to_string().contains("tally.frl"), "{source}");
    }

    /// The protocol's mask (used by the server's dense export) is the one
    /// the kernels' forward pass applies, ties included.
    #[test]
    fn protocol_mask_is_the_kernels_mask() {
        let mut rng = crate::train::train_rng(3);
        for n in [1usize, 7, 100, 5000] {
            // Few distinct magnitudes of both signs, so ties are common.
            let scores: Vec<f32> = (0..n)
                .map(|_| {
                    let r = rand::Rng::next_u32(&mut rng);
                    ((r % 9) as f32 - 4.0) * 0.25
                })
                .collect();
            for keep in [0, 1, n / 3, n / 2, n] {
                assert_eq!(
                    tally_protocol::supermask::layer_mask(&scores, keep),
                    crate::supermask::mask(&scores, keep),
                    "n={n} keep={keep}"
                );
            }
        }
    }
}
