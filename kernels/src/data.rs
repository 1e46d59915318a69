//! Image-classification datasets: an in-memory [`Dataset`] of 8-bit greyscale
//! images, a bounded reader for MNIST's IDX format (raw or gzip), the MNIST
//! subset compiled into the library, and client partitions ([`partition`]).
//! Also the Shakespeare next-character federation ([`shakespeare`]), whose
//! 80-character windows are stored as one-row images of character ids, and
//! datasets in general formats ([`formats`]: CSV, NumPy, safetensors, PNG
//! image folders), whose real-valued features a [`Dataset`] holds as `f32`.
//!
//! Nothing here touches burn: the trainer converts pixels to tensors itself.
//! Every input is treated as hostile (a file on disk may be truncated, padded
//! or a gzip bomb): parsing returns a [`DataError`] and never panics.

pub mod formats;
pub mod partition;
pub mod shakespeare;

use std::io::Read;
use std::path::{Path, PathBuf};

/// Most bytes a decompressed (or raw) IDX file may hold.
///
/// Full MNIST's largest file (60,000 training images) is 47,040,016 bytes, and
/// EMNIST-scale sets stay under 100 MiB. 256 MiB leaves room for those while a
/// gzip bomb (a few KiB that inflate to many GiB) stops here instead of
/// exhausting memory.
pub const MAX_IDX_BYTES: usize = 256 * 1024 * 1024;

/// Number of classes of MNIST and Fashion-MNIST.
pub const MNIST_CLASSES: usize = 10;

/// IDX magic for a 3-D unsigned-byte array (images): `00 00 08 03`.
const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// IDX magic for a 1-D unsigned-byte array (labels): `00 00 08 01`.
const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// Why a dataset, an IDX file or a partition was refused.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its contents are invalid.
    #[error("{}: {source}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<DataError>,
    },
    /// None of the accepted names for an MNIST file exists in the directory.
    #[error("{}: no {wanted} file (tried {tried})", dir.display())]
    MissingFile {
        /// The directory searched.
        dir: PathBuf,
        /// Which file was looked for, e.g. `train-images-idx3-ubyte`.
        wanted: &'static str,
        /// The names tried, comma separated.
        tried: String,
    },
    /// The gzip stream is corrupt.
    #[error("corrupt gzip stream: {0}")]
    Gzip(#[source] std::io::Error),
    /// The (decompressed) data is larger than the cap.
    #[error("data exceeds the {limit}-byte limit (gzip bomb or wrong file?)")]
    TooLarge {
        /// The cap that was hit.
        limit: usize,
    },
    /// The file does not start with the expected IDX magic number.
    #[error("bad IDX magic {found:#010x}, expected {expected:#010x}")]
    BadMagic {
        /// What the format requires.
        expected: u32,
        /// What the file has.
        found: u32,
    },
    /// The file ends inside the IDX header.
    #[error("IDX header truncated: need {needed} bytes, have {actual}")]
    HeaderTruncated {
        /// Header length.
        needed: usize,
        /// Bytes available.
        actual: usize,
    },
    /// The header declares dimensions that are zero or overflow.
    #[error("invalid IDX dimensions {0:?}")]
    BadDims(Vec<u32>),
    /// The body is shorter (truncated) or longer (trailing bytes) than the
    /// header implies.
    #[error("IDX body is {actual} bytes, the header implies exactly {expected}")]
    BodyLength {
        /// Bytes the header implies.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// A label is not a valid class.
    #[error("label {label} at index {index} is not below the class count {classes}")]
    LabelOutOfRange {
        /// Sample index.
        index: usize,
        /// The label.
        label: u8,
        /// Number of classes.
        classes: usize,
    },
    /// Image and label files disagree on the number of samples.
    #[error("{images} images but {labels} labels")]
    CountMismatch {
        /// Images in the image file.
        images: usize,
        /// Labels in the label file.
        labels: usize,
    },
    /// `pixels.len()` is not `labels.len() * rows * cols`.
    #[error("dataset holds {actual} pixels, {expected} expected for its shape")]
    PixelCount {
        /// `labels.len() * rows * cols`.
        expected: usize,
        /// `pixels.len()`.
        actual: usize,
    },
    /// A class count of zero or above 256 (labels are bytes).
    #[error("class count {0} is outside 1..=256")]
    BadClassCount(usize),
    /// A sample index beyond the dataset.
    #[error("index {index} is out of range for a dataset of {len} samples")]
    IndexOutOfRange {
        /// The index.
        index: usize,
        /// Dataset length.
        len: usize,
    },
    /// A partition lists the same sample twice for one client.
    #[error("client {client} lists sample {index} twice")]
    DuplicateIndex {
        /// Client position in the partition.
        client: usize,
        /// The repeated sample index.
        index: usize,
    },
    /// A partition file is not a JSON list of lists of indices.
    #[error("partition JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A partition parameter is invalid (e.g. a Dirichlet alpha that is not positive).
    #[error("invalid partition parameter: {0}")]
    InvalidParameter(String),
    /// A text file (a Shakespeare play) holds bytes that are not text.
    #[error("not a text file: {reason} at byte {offset}")]
    NotText {
        /// Byte offset of the first offending byte.
        offset: usize,
        /// What is wrong there.
        reason: &'static str,
    },
    /// A real-valued sample is NaN or infinite.
    #[error("value {index} (sample {sample}) is not finite")]
    NonFinite {
        /// The sample.
        sample: usize,
        /// Position of the value in the flat feature array.
        index: usize,
    },
    /// A file in one of the general formats ([`formats`]) is malformed.
    #[error(transparent)]
    Format(#[from] formats::FormatError),
    /// A play file has no speech (no speaker line followed by spoken text).
    #[error("no speeches found (expected speaker lines such as `Ham.` after a blank line)")]
    NoSpeeches,
}

impl DataError {
    fn in_file(self, path: &Path) -> DataError {
        DataError::InFile { path: path.to_path_buf(), source: Box::new(self) }
    }
}

/// Labelled samples, stored contiguously: 8-bit images (the model sees
/// `pixel / 255`) or real-valued feature rows (the model sees them as they
/// are).
///
/// Images are kept as bytes because the simulator shares one dataset among
/// all its clients and a byte is a quarter of an `f32`; tabular features
/// (CSV, NumPy, safetensors) need real values, so they have their own
/// storage in [`Dataset::features`]. A multi-channel image of `c × h × w` is
/// stored channel after channel, as `c·h` rows of `w` (what a sequential
/// model with input `[c, h, w]` takes).
///
/// Invariants (checked by [`Dataset::new`] and by the trainer, since the fields
/// are public so hosts can, e.g., flip labels for an attack simulation):
/// with `features == None`, `pixels.len() == labels.len() * rows * cols`;
/// with `features == Some(f)`, `pixels` is empty and
/// `f.len() == labels.len() * rows * cols`, every value finite; every label
/// `< classes`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Image height (`1` for feature rows).
    pub rows: usize,
    /// Image width (the feature count for feature rows).
    pub cols: usize,
    /// `len() * rows * cols` bytes, image after image, row-major, 0 = background.
    /// Empty when the samples are real-valued ([`Dataset::features`]).
    pub pixels: Vec<u8>,
    /// Real-valued samples instead of `pixels`: `len() * rows * cols` values,
    /// sample after sample, given to the model unscaled. `None` for images.
    pub features: Option<Vec<f32>>,
    /// One label per image.
    pub labels: Vec<u8>,
    /// Number of classes; every label is below it.
    pub classes: usize,
}

impl Dataset {
    /// A dataset after checking its invariants.
    pub fn new(rows: usize, cols: usize, pixels: Vec<u8>, labels: Vec<u8>, classes: usize) -> Result<Self, DataError> {
        let d = Dataset { rows, cols, pixels, features: None, labels, classes };
        d.validate()?;
        Ok(d)
    }

    /// A dataset of real-valued feature rows (`rows = 1`, `cols = width`)
    /// after checking its invariants.
    pub fn from_features(width: usize, features: Vec<f32>, labels: Vec<u8>, classes: usize) -> Result<Self, DataError> {
        let d = Dataset { rows: 1, cols: width, pixels: Vec::new(), features: Some(features), labels, classes };
        d.validate()?;
        Ok(d)
    }

    /// Whether the samples are real-valued feature rows rather than bytes.
    pub fn is_real(&self) -> bool {
        self.features.is_some()
    }

    /// The values of sample `i` as the model sees them, appended to `out`
    /// (`table` maps a byte to its scaled value); false past the end.
    pub fn push_sample(&self, i: usize, table: &[f32; 256], out: &mut Vec<f32>) -> bool {
        match &self.features {
            Some(f) => {
                let size = self.image_size();
                let Some(row) = i
                    .checked_mul(size)
                    .and_then(|a| Some((a, i.checked_add(1)?.checked_mul(size)?)))
                    .and_then(|(a, b)| f.get(a..b))
                else {
                    return false;
                };
                out.extend_from_slice(row);
                true
            }
            None => match self.image(i) {
                Some(img) => {
                    out.extend(img.iter().map(|&p| table[usize::from(p)]));
                    true
                }
                None => false,
            },
        }
    }

    /// Checks the invariants documented on [`Dataset`].
    pub fn validate(&self) -> Result<(), DataError> {
        if self.classes == 0 || self.classes > 256 {
            return Err(DataError::BadClassCount(self.classes));
        }
        let expected = self
            .labels
            .len()
            .checked_mul(self.rows)
            .and_then(|v| v.checked_mul(self.cols))
            .ok_or(DataError::PixelCount { expected: usize::MAX, actual: self.pixels.len() })?;
        match &self.features {
            None if self.pixels.len() != expected => {
                return Err(DataError::PixelCount { expected, actual: self.pixels.len() });
            }
            None => {}
            Some(f) => {
                if f.len() != expected || !self.pixels.is_empty() {
                    return Err(DataError::PixelCount { expected, actual: f.len() + self.pixels.len() });
                }
                if let Some(index) = f.iter().position(|v| !v.is_finite()) {
                    return Err(DataError::NonFinite { sample: index / self.image_size().max(1), index });
                }
            }
        }
        if let Some((index, &label)) = self.labels.iter().enumerate().find(|&(_, &l)| usize::from(l) >= self.classes) {
            return Err(DataError::LabelOutOfRange { index, label, classes: self.classes });
        }
        Ok(())
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels per image (`rows * cols`; saturating, since the fields are
    /// public and an unvalidated dataset may hold any values).
    pub fn image_size(&self) -> usize {
        self.rows.saturating_mul(self.cols)
    }

    /// The pixels of image `i`, or `None` past the end.
    pub fn image(&self, i: usize) -> Option<&[u8]> {
        let size = self.image_size();
        self.pixels.get(i.checked_mul(size)?..i.checked_add(1)?.checked_mul(size)?)
    }

    /// A new dataset holding the samples at `indices`, in that order
    /// (repeats allowed). An index past the end is an error.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset, DataError> {
        let size = self.image_size();
        if let Some(f) = &self.features {
            let mut features = Vec::with_capacity(indices.len().saturating_mul(size));
            let mut labels = Vec::with_capacity(indices.len());
            for &index in indices {
                let row = index.checked_mul(size).and_then(|a| f.get(a..a.checked_add(size)?));
                let (Some(row), Some(&label)) = (row, self.labels.get(index)) else {
                    return Err(DataError::IndexOutOfRange { index, len: self.len() });
                };
                features.extend_from_slice(row);
                labels.push(label);
            }
            return Ok(Dataset {
                features: Some(features),
                labels,
                pixels: Vec::new(),
                rows: self.rows,
                cols: self.cols,
                classes: self.classes,
            });
        }
        let mut pixels = Vec::with_capacity(indices.len().saturating_mul(size));
        let mut labels = Vec::with_capacity(indices.len());
        for &index in indices {
            let (Some(img), Some(&label)) = (self.image(index), self.labels.get(index)) else {
                return Err(DataError::IndexOutOfRange { index, len: self.len() });
            };
            pixels.extend_from_slice(img);
            labels.push(label);
        }
        Ok(Dataset { rows: self.rows, cols: self.cols, pixels, features: None, labels, classes: self.classes })
    }

    /// Count of samples per class (length `classes`; labels `>= classes`, which
    /// a validated dataset doesn't have, are not counted).
    pub fn label_histogram(&self) -> Vec<usize> {
        let mut h = vec![0usize; self.classes];
        for &l in &self.labels {
            if let Some(c) = h.get_mut(usize::from(l)) {
                *c += 1;
            }
        }
        h
    }
}

/// A training set and a test set.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// Training samples (partitioned among clients).
    pub train: Dataset,
    /// Held-out samples for evaluation.
    pub test: Dataset,
}

/// Images parsed from an IDX3 file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// `count * rows * cols` bytes.
    pub pixels: Vec<u8>,
}

/// Returns the bytes of `data`, inflated if they are gzip (magic `1f 8b`),
/// refusing more than `limit` bytes of output.
fn maybe_gunzip(data: &[u8], limit: usize) -> Result<std::borrow::Cow<'_, [u8]>, DataError> {
    if !data.starts_with(&[0x1f, 0x8b]) {
        if data.len() > limit {
            return Err(DataError::TooLarge { limit });
        }
        return Ok(std::borrow::Cow::Borrowed(data));
    }
    // MultiGzDecoder: `gzip a b > c` concatenations are valid gzip too.
    let decoder = flate2::read::MultiGzDecoder::new(data);
    let mut out = Vec::new();
    // Read one byte past the limit to tell "exactly at the limit" from "over".
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    decoder.take(cap).read_to_end(&mut out).map_err(DataError::Gzip)?;
    if out.len() > limit {
        return Err(DataError::TooLarge { limit });
    }
    Ok(std::borrow::Cow::Owned(out))
}

fn read_be_u32(data: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = data.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

/// Parses an IDX header with the given magic and `ndims` dimensions; returns
/// the dimensions and the body (everything after the header).
fn parse_idx_header(data: &[u8], magic: u32, ndims: usize) -> Result<(Vec<u32>, &[u8]), DataError> {
    let header = 4 + 4 * ndims;
    if data.len() < header {
        // A file too short to hold even the magic can't be checked for it.
        if let Some(found) = read_be_u32(data, 0).filter(|&m| m != magic) {
            return Err(DataError::BadMagic { expected: magic, found });
        }
        return Err(DataError::HeaderTruncated { needed: header, actual: data.len() });
    }
    let found = read_be_u32(data, 0).ok_or(DataError::HeaderTruncated { needed: header, actual: data.len() })?;
    if found != magic {
        return Err(DataError::BadMagic { expected: magic, found });
    }
    let dims: Vec<u32> = (0..ndims).filter_map(|i| read_be_u32(data, 4 + 4 * i)).collect();
    let body = data.get(header..).unwrap_or_default();
    Ok((dims, body))
}

fn parse_images_capped(data: &[u8], limit: usize) -> Result<IdxImages, DataError> {
    let data = maybe_gunzip(data, limit)?;
    let (dims, body) = parse_idx_header(&data, IDX_IMAGES_MAGIC, 3)?;
    let &[count, rows, cols] = dims.as_slice() else {
        return Err(DataError::BadDims(dims));
    };
    let (count, rows, cols) = (count as usize, rows as usize, cols as usize);
    if rows == 0 || cols == 0 {
        return Err(DataError::BadDims(dims));
    }
    let expected =
        count.checked_mul(rows).and_then(|v| v.checked_mul(cols)).ok_or_else(|| DataError::BadDims(dims.clone()))?;
    if body.len() != expected {
        return Err(DataError::BodyLength { expected, actual: body.len() });
    }
    Ok(IdxImages { count, rows, cols, pixels: body.to_vec() })
}

fn parse_labels_capped(data: &[u8], limit: usize) -> Result<Vec<u8>, DataError> {
    let data = maybe_gunzip(data, limit)?;
    let (dims, body) = parse_idx_header(&data, IDX_LABELS_MAGIC, 1)?;
    let &[count] = dims.as_slice() else {
        return Err(DataError::BadDims(dims));
    };
    let expected = count as usize;
    if body.len() != expected {
        return Err(DataError::BodyLength { expected, actual: body.len() });
    }
    Ok(body.to_vec())
}

/// Parses an IDX3 unsigned-byte image file (magic `0x00000803`), raw or
/// gzipped. The body must be exactly `count * rows * cols` bytes.
pub fn parse_idx_images(data: &[u8]) -> Result<IdxImages, DataError> {
    parse_images_capped(data, MAX_IDX_BYTES)
}

/// Parses an IDX1 unsigned-byte label file (magic `0x00000801`), raw or
/// gzipped. The body must be exactly `count` bytes. Class bounds are checked
/// when images and labels are joined ([`dataset_from_idx`]).
pub fn parse_idx_labels(data: &[u8]) -> Result<Vec<u8>, DataError> {
    parse_labels_capped(data, MAX_IDX_BYTES)
}

/// Joins parsed images and labels into a validated [`Dataset`].
pub fn dataset_from_idx(images: IdxImages, labels: Vec<u8>, classes: usize) -> Result<Dataset, DataError> {
    if images.count != labels.len() {
        return Err(DataError::CountMismatch { images: images.count, labels: labels.len() });
    }
    Dataset::new(images.rows, images.cols, images.pixels, labels, classes)
}

/// Reads a whole file, refusing files larger than [`MAX_IDX_BYTES`] (the
/// compressed size of a valid file is always below its decompressed size).
fn read_capped(path: &Path) -> Result<Vec<u8>, DataError> {
    read_capped_to(path, MAX_IDX_BYTES)
}

/// Reads a whole file, refusing files larger than `limit` bytes.
fn read_capped_to(path: &Path, limit: usize) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut out = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    file.take(cap).read_to_end(&mut out).map_err(io)?;
    if out.len() > limit {
        return Err(DataError::TooLarge { limit }.in_file(path));
    }
    Ok(out)
}

/// Finds `stem` in `dir` under one of its usual names: as-is, `.gz`, or with
/// the `-idx` dash written as a dot (Kaggle's copies).
fn find_file(dir: &Path, stem: &'static str) -> Result<PathBuf, DataError> {
    let dotted = stem.replacen("-idx", ".idx", 1);
    let candidates = [stem.to_string(), format!("{stem}.gz"), dotted.clone(), format!("{dotted}.gz")];
    for name in &candidates {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(DataError::MissingFile { dir: dir.to_path_buf(), wanted: stem, tried: candidates.join(", ") })
}

fn load_pair(dir: &Path, images: &'static str, labels: &'static str) -> Result<Dataset, DataError> {
    let ip = find_file(dir, images)?;
    let lp = find_file(dir, labels)?;
    let imgs = parse_idx_images(&read_capped(&ip)?).map_err(|e| e.in_file(&ip))?;
    let labs = parse_idx_labels(&read_capped(&lp)?).map_err(|e| e.in_file(&lp))?;
    // A count mismatch or a bad label concerns the pair; name the label file,
    // which is the one whose contents are checked against the classes.
    dataset_from_idx(imgs, labs, MNIST_CLASSES).map_err(|e| e.in_file(&lp))
}

/// Loads MNIST (or Fashion-MNIST, which uses the same names) from `dir`:
/// `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each raw or with `.gz`.
pub fn load_mnist_dir(dir: &Path) -> Result<Split, DataError> {
    Ok(Split {
        train: load_pair(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte")?,
        test: load_pair(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?,
    })
}

#[cfg(feature = "embedded-data")]
mod embedded {
    pub(super) const TRAIN_IMAGES: &[u8] = include_bytes!("../../data/mnist-subset/train-images-idx3-ubyte.gz");
    pub(super) const TRAIN_LABELS: &[u8] = include_bytes!("../../data/mnist-subset/train-labels-idx1-ubyte.gz");
    pub(super) const TEST_IMAGES: &[u8] = include_bytes!("../../data/mnist-subset/t10k-images-idx3-ubyte.gz");
    pub(super) const TEST_LABELS: &[u8] = include_bytes!("../../data/mnist-subset/t10k-labels-idx1-ubyte.gz");
}

/// Training samples in [`embedded_mnist`].
#[cfg(feature = "embedded-data")]
pub const EMBEDDED_TRAIN_LEN: usize = 10_000;
/// Test samples in [`embedded_mnist`].
#[cfg(feature = "embedded-data")]
pub const EMBEDDED_TEST_LEN: usize = 2_000;

/// The MNIST subset compiled into the library: the first 10,000 training and
/// first 2,000 test images of MNIST, unchanged (made by
/// `scripts/make-embedded-subset`). Each call inflates and parses the bytes
/// afresh (about 20 ms in release), so keep the result.
#[cfg(feature = "embedded-data")]
#[allow(clippy::expect_used, reason = "the embedded bytes are fixed at build time and checked by a test")]
pub fn embedded_mnist() -> Split {
    let pair = |images: &[u8], labels: &[u8]| {
        let images = parse_idx_images(images).expect("embedded MNIST images are valid gzipped IDX3 (tested)");
        let labels = parse_idx_labels(labels).expect("embedded MNIST labels are valid gzipped IDX1 (tested)");
        dataset_from_idx(images, labels, MNIST_CLASSES)
            .expect("embedded MNIST images and labels agree in count and labels are < 10 (tested)")
    };
    Split {
        train: pair(embedded::TRAIN_IMAGES, embedded::TRAIN_LABELS),
        test: pair(embedded::TEST_IMAGES, embedded::TEST_LABELS),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A well-formed IDX3 image file: `n` images of `rows × cols`, pixel = index mod 256.
    fn idx_images(n: u32, rows: u32, cols: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&IDX_IMAGES_MAGIC.to_be_bytes());
        for d in [n, rows, cols] {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend((0..(n * rows * cols) as usize).map(|i| (i % 256) as u8));
        v
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&IDX_LABELS_MAGIC.to_be_bytes());
        v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        v.extend_from_slice(labels);
        v
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn parses_raw_and_gzip_identically() {
        let raw = idx_images(3, 2, 4);
        let a = parse_idx_images(&raw).unwrap();
        assert_eq!((a.count, a.rows, a.cols), (3, 2, 4));
        assert_eq!(a.pixels.len(), 24);
        assert_eq!(a.pixels[5], 5);
        assert_eq!(parse_idx_images(&gzip(&raw)).unwrap(), a);
        let l = idx_labels(&[1, 2, 9]);
        assert_eq!(parse_idx_labels(&l).unwrap(), vec![1, 2, 9]);
        assert_eq!(parse_idx_labels(&gzip(&l)).unwrap(), vec![1, 2, 9]);
    }

    #[test]
    fn rejects_truncated_and_trailing_bodies() {
        let raw = idx_images(3, 2, 4);
        let short = &raw[..raw.len() - 1];
        assert!(matches!(parse_idx_images(short), Err(DataError::BodyLength { expected: 24, actual: 23 })));
        let mut long = raw.clone();
        long.push(0);
        assert!(matches!(parse_idx_images(&long), Err(DataError::BodyLength { expected: 24, actual: 25 })));
        // Same through gzip.
        assert!(matches!(parse_idx_images(&gzip(&long)), Err(DataError::BodyLength { .. })));
        let mut l = idx_labels(&[1, 2]);
        l.push(3);
        assert!(matches!(parse_idx_labels(&l), Err(DataError::BodyLength { expected: 2, actual: 3 })));
        assert!(matches!(parse_idx_labels(&l[..8]), Err(DataError::BodyLength { expected: 2, actual: 0 })));
        // Header cut short.
        assert!(matches!(parse_idx_images(&raw[..10]), Err(DataError::HeaderTruncated { needed: 16, actual: 10 })));
        assert!(matches!(parse_idx_labels(&[]), Err(DataError::HeaderTruncated { .. })));
        // A truncated gzip stream is a gzip error, not a panic.
        let gz = gzip(&raw);
        assert!(parse_idx_images(&gz[..gz.len() / 2]).is_err());
    }

    #[test]
    fn rejects_bad_magic_and_dims() {
        let mut raw = idx_images(1, 2, 2);
        raw[3] = 0x01;
        assert!(matches!(parse_idx_images(&raw), Err(DataError::BadMagic { expected: 0x803, found: 0x801 })));
        // Labels file handed to the image parser and vice versa.
        assert!(matches!(parse_idx_images(&idx_labels(&[1])), Err(DataError::BadMagic { .. })));
        assert!(matches!(parse_idx_labels(&idx_images(1, 1, 1)), Err(DataError::BadMagic { .. })));
        assert!(matches!(parse_idx_images(&idx_images(1, 0, 2)), Err(DataError::BadDims(_))));
        // Dimensions whose product overflows or is absurd: a length error, no allocation.
        let mut huge = Vec::new();
        huge.extend_from_slice(&IDX_IMAGES_MAGIC.to_be_bytes());
        for d in [u32::MAX, u32::MAX, u32::MAX] {
            huge.extend_from_slice(&d.to_be_bytes());
        }
        assert!(parse_idx_images(&huge).is_err());
    }

    #[test]
    fn rejects_labels_out_of_range_and_count_mismatch() {
        let imgs = parse_idx_images(&idx_images(3, 2, 2)).unwrap();
        let labels = parse_idx_labels(&idx_labels(&[0, 10, 1])).unwrap();
        match dataset_from_idx(imgs.clone(), labels, 10) {
            Err(DataError::LabelOutOfRange { index: 1, label: 10, classes: 10 }) => {}
            other => panic!("expected label out of range, got {other:?}"),
        }
        let labels = parse_idx_labels(&idx_labels(&[0, 1])).unwrap();
        assert!(matches!(dataset_from_idx(imgs, labels, 10), Err(DataError::CountMismatch { images: 3, labels: 2 })));
    }

    #[test]
    fn gzip_bomb_is_capped() {
        // 4 MiB of zeros compresses to a few KiB; with a 1 MiB cap it must be refused.
        let bomb = gzip(&vec![0u8; 4 << 20]);
        assert!(bomb.len() < 64 << 10);
        assert!(matches!(parse_images_capped(&bomb, 1 << 20), Err(DataError::TooLarge { limit }) if limit == 1 << 20));
        assert!(matches!(parse_labels_capped(&bomb, 1 << 20), Err(DataError::TooLarge { .. })));
        // Exactly at the cap is fine.
        let ok = idx_images(4, 2, 2);
        assert!(parse_images_capped(&gzip(&ok), ok.len()).is_ok());
        assert!(matches!(parse_images_capped(&gzip(&ok), ok.len() - 1), Err(DataError::TooLarge { .. })));
        // Raw input is capped too.
        assert!(matches!(parse_images_capped(&ok, ok.len() - 1), Err(DataError::TooLarge { .. })));
    }

    #[test]
    fn dataset_subset_histogram_and_validation() {
        let d = Dataset::new(1, 2, vec![0, 1, 2, 3, 4, 5], vec![2, 0, 2], 3).unwrap();
        assert_eq!(d.len(), 3);
        assert!(!d.is_empty());
        assert_eq!(d.label_histogram(), vec![1, 0, 2]);
        let s = d.subset(&[2, 0, 2]).unwrap();
        assert_eq!(s.pixels, vec![4, 5, 0, 1, 4, 5]);
        assert_eq!(s.labels, vec![2, 2, 2]);
        assert!(matches!(d.subset(&[0, 3]), Err(DataError::IndexOutOfRange { index: 3, len: 3 })));
        assert!(matches!(d.subset(&[usize::MAX]), Err(DataError::IndexOutOfRange { .. })));
        assert!(d.subset(&[]).unwrap().is_empty());
        assert!(matches!(Dataset::new(1, 2, vec![0; 5], vec![0; 3], 3), Err(DataError::PixelCount { .. })));
        assert!(matches!(Dataset::new(1, 1, vec![0], vec![0], 0), Err(DataError::BadClassCount(0))));
    }

    #[test]
    fn real_valued_features_subset_validate_and_reach_the_model_unscaled() {
        let d = Dataset::from_features(2, vec![0.5, -1.0, 2.0, 3.0, 4.0, 5.0], vec![1, 0, 1], 2).unwrap();
        assert!(d.is_real() && d.pixels.is_empty());
        assert_eq!((d.rows, d.cols, d.len()), (1, 2, 3));
        let s = d.subset(&[2, 0]).unwrap();
        assert_eq!(s.features.as_deref(), Some(&[4.0, 5.0, 0.5, -1.0][..]));
        assert_eq!(s.labels, vec![1, 1]);
        assert!(matches!(d.subset(&[3]), Err(DataError::IndexOutOfRange { index: 3, len: 3 })));
        let table = [0.0f32; 256];
        let mut out = Vec::new();
        assert!(d.push_sample(1, &table, &mut out) && !d.push_sample(3, &table, &mut out));
        assert_eq!(out, vec![2.0, 3.0]);
        // Images still go through the byte table.
        let img = Dataset::new(1, 2, vec![0, 255], vec![0], 1).unwrap();
        let mut out = Vec::new();
        let table: [f32; 256] = std::array::from_fn(|p| p as f32 / 255.0);
        assert!(img.push_sample(0, &table, &mut out));
        assert_eq!(out, vec![0.0, 1.0]);
        // Invariants: the count, no pixels beside features, finite values.
        assert!(matches!(Dataset::from_features(2, vec![0.0; 5], vec![0; 3], 2), Err(DataError::PixelCount { .. })));
        let e = Dataset::from_features(2, vec![0.0, 1.0, f32::NAN, 0.0], vec![0, 1], 2).unwrap_err();
        assert!(matches!(e, DataError::NonFinite { sample: 1, index: 2 }), "{e}");
        let mut both = d.clone();
        both.pixels = vec![0; 6];
        assert!(both.validate().is_err());
    }

    #[test]
    fn load_dir_reports_missing_and_bad_files_with_paths() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_mnist_dir(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::MissingFile { .. }), "{err}");
        // A valid gzipped train pair, a raw test pair with a truncated label file.
        let w = |name: &str, bytes: &[u8]| std::fs::write(dir.path().join(name), bytes).unwrap();
        w("train-images-idx3-ubyte.gz", &gzip(&idx_images(4, 28, 28)));
        w("train-labels-idx1-ubyte.gz", &gzip(&idx_labels(&[0, 1, 2, 3])));
        w("t10k-images-idx3-ubyte", &idx_images(2, 28, 28));
        w("t10k-labels-idx1-ubyte", &idx_labels(&[5, 6])[..9]);
        let err = load_mnist_dir(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("t10k-labels-idx1-ubyte") && msg.contains("body"), "{msg}");
        w("t10k-labels-idx1-ubyte", &idx_labels(&[5, 6]));
        let split = load_mnist_dir(dir.path()).unwrap();
        assert_eq!((split.train.len(), split.test.len()), (4, 2));
        assert_eq!(split.test.labels, vec![5, 6]);
    }

    #[cfg(feature = "embedded-data")]
    #[test]
    fn embedded_subset_is_valid() {
        let t = std::time::Instant::now();
        let s = embedded_mnist();
        println!("embedded_mnist() took {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        assert_eq!((s.train.len(), s.test.len()), (EMBEDDED_TRAIN_LEN, EMBEDDED_TEST_LEN));
        assert_eq!((s.train.rows, s.train.cols), (28, 28));
        // MNIST's first training labels are 5, 0, 4, 1, 9.
        assert_eq!(&s.train.labels[..5], &[5, 0, 4, 1, 9]);
        assert!(s.train.label_histogram().iter().all(|&c| c > 800));
    }

    /// The full MNIST files (scripts/fetch-data puts them in data/mnist).
    #[test]
    fn full_mnist_if_present() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
        if !dir.is_dir() {
            println!("skipped: {} not present (run scripts/fetch-data)", dir.display());
            return;
        }
        let s = load_mnist_dir(&dir).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (60_000, 10_000));
        assert_eq!(s.train.label_histogram().iter().sum::<usize>(), 60_000);
        // Known MNIST class counts: 5,923 zeros in train, 980 in test.
        assert_eq!(s.train.label_histogram()[0], 5_923);
        assert_eq!(s.test.label_histogram()[0], 980);
        #[cfg(feature = "embedded-data")]
        {
            // The embedded subset is a prefix of the full set.
            let e = embedded_mnist();
            assert_eq!(&s.train.labels[..EMBEDDED_TRAIN_LEN], e.train.labels.as_slice());
            assert_eq!(&s.test.pixels[..e.test.pixels.len()], e.test.pixels.as_slice());
        }
    }
}
