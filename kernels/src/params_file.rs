//! Reading and writing model parameters on disk: safetensors (PyTorch names
//! and layouts, see `tally_protocol::model`) or raw little-endian f32 in the
//! canonical flat order.

use std::io::Read;
use std::path::Path;

use tally_protocol::model::ModelArch;

use crate::KernelError;

/// Bytes a safetensors file may carry beyond its tensor data (the JSON
/// header). Ours are a few hundred bytes; 1 MiB is generous and keeps a wrong
/// or hostile file from being read whole into memory.
pub const MAX_HEADER_BYTES: u64 = 1024 * 1024;

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

/// Writes `params` for `arch` to `path` as safetensors.
pub fn save_safetensors(path: &Path, arch: &ModelArch, params: &[f32]) -> Result<(), KernelError> {
    let bytes = arch.to_safetensors(params)?;
    std::fs::write(path, bytes).map_err(|source| KernelError::Io { path: path.to_path_buf(), source })
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
        save_safetensors(&st, &arch, &p).unwrap();
        assert_eq!(load_params(&st, &arch).unwrap(), p);
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
        save_safetensors(&st, &other, &other.init_params(1)).unwrap();
        assert!(matches!(load_params(&st, &arch), Err(KernelError::ParamsFile { .. })));
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
        assert!(save_safetensors(&dir.path().join("bad.safetensors"), &arch, &bad).is_err());
    }
}
