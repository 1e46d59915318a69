//! Datasets from common formats: CSV, NumPy `.npy` / `.npz`, safetensors and
//! folders of PNG images (one folder per class), described by one
//! [`DataSpec`] that the simulator's scenarios and `tally-client` share.
//!
//! - **CSV**: a header row, numeric feature columns and one label column
//!   ([`LabelColumn`], default `label`). Labels are integers `0..classes`,
//!   or, if any label is not a non-negative integer, names mapped to classes
//!   in sorted (byte-wise) order of the names in the training file.
//! - **NumPy**: `.npy` (one features file and one labels file per set) or an
//!   `.npz` archive holding both (default names `x` and `y`). Dtypes `<f4`,
//!   `<f8`, `|u1`, `<i4`, `<i8`, C order.
//! - **safetensors**: two tensors, default `features` and `labels`.
//! - **Image folders**: `root/<class>/*.png`, classes in sorted folder-name
//!   order, all images the same size and channels (grey or RGB; alpha is
//!   dropped); `root/train` and `root/test` if present.
//!
//! Scaling: byte data (`|u1` arrays, PNG images) is kept as bytes and the
//! model sees `byte / 255`, exactly as for MNIST. Real-valued data (every
//! other dtype, CSV) reaches the model as given, unless the description asks
//! for `standardize = true`: then each feature has the training set's mean
//! subtracted and is divided by its standard deviation (population; a
//! constant feature is only centred), the same numbers for the test set.
//!
//! A file is hostile input: every problem is a [`FormatError`] naming the
//! file and, where it applies, the row and column or the array, never a
//! panic; sizes are capped by the `MAX_*` constants below.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Dataset, Split};

/// Largest file read (or `.npz` member inflated): the same cap as for IDX
/// files, far above the sets a CPU federation trains on, low enough that a
/// wrong file or a zip bomb stops here rather than exhausting memory.
pub const MAX_FILE_BYTES: usize = super::MAX_IDX_BYTES;

/// Most values in one sample: a 1024×1024 RGB image is 3 Mi; wider rows are
/// a wrong file (or a transposed array), not a dataset.
pub const MAX_SAMPLE_VALUES: usize = 4 * 1024 * 1024;

/// Most classes: labels are stored as bytes.
pub const MAX_CLASSES: usize = 256;

/// Longest `.npy` header: NumPy writes 64–128 bytes (format 1.0 caps it at
/// 65,535); anything longer is not an array header.
pub const MAX_NPY_HEADER: usize = 65_535;

/// Most image files in one image folder set: a million 28×28 images is
/// 784 MB of pixels, above which the byte cap of a file-based set applies
/// in spirit.
pub const MAX_IMAGES: usize = 1_000_000;

/// Largest side of an image: PNG allows 2³¹; a bound keeps one bogus header
/// from asking the decoder for gigabytes.
pub const MAX_IMAGE_SIDE: u32 = 4096;

/// Why a dataset file was refused. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file could not be read.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("{}: larger than the {limit}-byte limit", file.display())]
    TooLarge {
        /// The file.
        file: PathBuf,
        /// The cap.
        limit: usize,
    },
    /// A CSV cell (or row) is malformed. Rows count from 1, the header
    /// being row 1, as an editor numbers lines.
    #[error("{}: row {row}, column {column}: {reason}", file.display())]
    Csv {
        /// The file.
        file: PathBuf,
        /// Line number (1 = header).
        row: usize,
        /// Column name (or number when the header has none).
        column: String,
        /// What is wrong.
        reason: String,
    },
    /// A label is not a class: an unknown name, a negative or fractional
    /// number, or one above the classes.
    #[error("{}: {at}: label {label:?} {reason}", file.display())]
    Label {
        /// The file.
        file: PathBuf,
        /// Where: `row 7` (CSV) or `sample 6` (arrays).
        at: String,
        /// The label as written.
        label: String,
        /// Why it is refused.
        reason: String,
    },
    /// An array (`.npy`, an `.npz` member, a safetensors tensor) is
    /// malformed or of an unsupported dtype or layout.
    #[error("{}: array {array:?}: {reason}", file.display())]
    Array {
        /// The file.
        file: PathBuf,
        /// The array's name (the member or tensor; `""` for a lone `.npy`).
        array: String,
        /// What is wrong.
        reason: String,
    },
    /// A named array is not in the file.
    #[error("{}: no array {name:?} (the file has: {found})", file.display())]
    MissingArray {
        /// The file.
        file: PathBuf,
        /// The name looked for.
        name: String,
        /// The names present, comma separated.
        found: String,
    },
    /// A PNG file cannot be decoded, or an image folder is malformed.
    #[error("{}: {reason}", file.display())]
    Image {
        /// The file or folder.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An image's size or channels differ from the set's first image.
    #[error("{}: image is {found}, but {} is {expected} (every image must have the same size and channels)", file.display(), first.display())]
    ImageShape {
        /// The odd image.
        file: PathBuf,
        /// Its `channels×height×width`.
        found: String,
        /// The first image of the set.
        first: PathBuf,
        /// That image's `channels×height×width`.
        expected: String,
    },
    /// The training and test files disagree on the sample shape.
    #[error("{}: samples are {found}, the training set's are {expected}", file.display())]
    ShapeMismatch {
        /// The test file.
        file: PathBuf,
        /// Its sample shape.
        found: String,
        /// The training set's.
        expected: String,
    },
    /// The description itself is inconsistent (e.g. `test_fraction` out of
    /// range, a `.npy` without its labels file).
    #[error("data description: {0}")]
    Spec(String),
    /// The model does not take the data's samples.
    #[error("data {data} has samples of {found} ({values} values), but the model takes {model}")]
    ModelInput {
        /// The data (the training file).
        data: String,
        /// The samples' shape, e.g. `4 features` or `3x32x32`.
        found: String,
        /// Values per sample.
        values: usize,
        /// What the model takes, e.g. `784` or `1x28x28`.
        model: String,
    },
    /// The assembled dataset breaks an invariant (a bug here, reported
    /// rather than a panic).
    #[error("{}: {source}", file.display())]
    Dataset {
        /// The file.
        file: PathBuf,
        /// The broken invariant.
        #[source]
        source: Box<super::DataError>,
    },
}

/// File formats [`FileData`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Comma-separated values with a header row.
    Csv,
    /// NumPy `.npy`: `train` holds the features, `train_labels` the labels.
    Npy,
    /// NumPy `.npz`: one archive holding features and labels.
    Npz,
    /// safetensors: one file holding features and labels.
    Safetensors,
    /// `root/<class>/*.png`.
    ImageFolder,
}

/// The label column of a CSV file: a header name or a 0-based index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LabelColumn {
    /// 0-based column index.
    Index(usize),
    /// Header name.
    Name(String),
}

/// A dataset in one of the general formats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileData {
    /// The format.
    pub format: Format,
    /// The training file (image folders: the root folder).
    pub train: PathBuf,
    /// The test file. Default: none, or `root/test` of an image folder
    /// that has `root/train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<PathBuf>,
    /// `.npy` only: the training labels file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_labels: Option<PathBuf>,
    /// `.npy` only: the test labels file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_labels: Option<PathBuf>,
    /// Without a test file: hold out this fraction (in `(0, 1)`) of the
    /// training samples as the test set, chosen by `seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_fraction: Option<f64>,
    /// Seed of the `test_fraction` split. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// CSV: the label column (name or 0-based index, default `label`).
    /// `.npz` / safetensors: the labels array (default `y` / `labels`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<LabelColumn>,
    /// `.npz` / safetensors: the features array (default `x` / `features`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<String>,
    /// Number of classes. Default: the largest integer label plus one, or
    /// the number of label names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<usize>,
    /// Standardise real-valued features with the training set's per-feature
    /// mean and standard deviation. Default false (values as given).
    #[serde(default)]
    pub standardize: bool,
}

/// Where a dataset comes from: the built-in names (`embedded`,
/// `data/mnist`, `shakespeare`, … whose meaning the host defines) or a
/// file-based description.
///
/// In TOML, `data = "embedded"` or
/// `data = { format = "csv", train = "train.csv", test = "test.csv" }`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum DataSpec {
    /// A named source, as the host has always read it.
    Named(String),
    /// A file-based dataset.
    Files(FileData),
}

// By hand rather than `untagged`, so that a mistake inside the table is
// reported as the table's own error (an unknown field, a bad format name)
// instead of "matched no variant".
impl<'de> Deserialize<'de> for DataSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = DataSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a name (\"embedded\", a directory, \"shakespeare\") or a table with `format` and `train`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DataSpec, E> {
                Ok(DataSpec::Named(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<DataSpec, A::Error> {
                FileData::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(DataSpec::Files)
            }
        }
        d.deserialize_any(V)
    }
}

impl From<&str> for DataSpec {
    fn from(s: &str) -> Self {
        DataSpec::Named(s.to_string())
    }
}

impl From<String> for DataSpec {
    fn from(s: String) -> Self {
        DataSpec::Named(s)
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSpec::Named(s) => f.write_str(s),
            DataSpec::Files(d) => write!(f, "{}", d),
        }
    }
}

impl std::fmt::Display for FileData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = match self.format {
            Format::Csv => "csv",
            Format::Npy => "npy",
            Format::Npz => "npz",
            Format::Safetensors => "safetensors",
            Format::ImageFolder => "image-folder",
        };
        write!(f, "{format}:{}", self.train.display())
    }
}

impl DataSpec {
    /// Reads a command-line value: an inline TOML table (`{ format =
    /// "csv", train = "x.csv" }`) or a name.
    pub fn parse_arg(arg: &str) -> Result<DataSpec, FormatError> {
        let t = arg.trim();
        if !t.starts_with('{') {
            return Ok(DataSpec::Named(arg.to_string()));
        }
        #[derive(Deserialize)]
        struct One {
            data: FileData,
        }
        let one: One = toml::from_str(&format!("data = {t}")).map_err(|e| FormatError::Spec(format!("{arg}: {e}")))?;
        Ok(DataSpec::Files(one.data))
    }

    /// The name, for a named source.
    pub fn name(&self) -> Option<&str> {
        match self {
            DataSpec::Named(s) => Some(s),
            DataSpec::Files(_) => None,
        }
    }

    /// Every path in a file-based description, for a host that resolves
    /// them against a base directory.
    pub fn paths_mut(&mut self) -> Vec<&mut PathBuf> {
        match self {
            DataSpec::Named(_) => Vec::new(),
            DataSpec::Files(d) => {
                let mut v = vec![&mut d.train];
                v.extend([&mut d.test, &mut d.train_labels, &mut d.test_labels].into_iter().flat_map(|p| p.as_mut()));
                v
            }
        }
    }
}

/// A loaded dataset and what it is.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Training and test sets (the test set may be empty).
    pub split: Split,
    /// Shape of one sample: `[features]`, `[h, w]` or `[c, h, w]`.
    pub sample_shape: Vec<usize>,
    /// Class names in class order (label names, folder names, or the numbers).
    pub class_names: Vec<String>,
}

impl Loaded {
    /// The sample shape as people write it: `4 features`, `3x32x32`.
    pub fn describe_shape(&self) -> String {
        describe(&self.sample_shape)
    }

    /// Checks that `arch` takes these samples: a sequential network with a
    /// `[c, h, w]` (or `[h, w]`) input must match the shape exactly; every
    /// other model must take as many values as a sample holds.
    pub fn check_model(&self, data: &str, arch: &tally_protocol::model::ModelArch) -> Result<(), FormatError> {
        use tally_protocol::model::ModelArch;
        let values: usize = self.sample_shape.iter().product();
        let (expected, model) = crate::model::input_size(arch);
        let ok = match arch {
            ModelArch::Sequential { input, .. } if input.len() > 1 => {
                let mut want: Vec<usize> = input.iter().map(|&d| d as usize).collect();
                let mut have = self.sample_shape.clone();
                // A single channel may be written or left out on either side.
                if want.len() == 3 && want[0] == 1 {
                    want.remove(0);
                }
                if have.len() == 3 && have[0] == 1 {
                    have.remove(0);
                }
                want == have
            }
            _ => values == expected,
        };
        if ok {
            Ok(())
        } else {
            Err(FormatError::ModelInput { data: data.to_string(), found: self.describe_shape(), values, model })
        }
    }
}

fn describe(shape: &[usize]) -> String {
    match shape {
        [n] => format!("{n} features"),
        _ => shape.iter().map(usize::to_string).collect::<Vec<_>>().join("x"),
    }
}

/// Loads a file-based dataset.
pub fn load(spec: &FileData) -> Result<Loaded, FormatError> {
    if let Some(f) = spec.test_fraction
        && !(f > 0.0 && f < 1.0)
    {
        return Err(FormatError::Spec(format!("test_fraction {f} is not in (0, 1)")));
    }
    if spec.test_fraction.is_some() && spec.test.is_some() {
        return Err(FormatError::Spec("give a test file or a test_fraction, not both".into()));
    }
    if let Some(c) = spec.classes
        && !(1..=MAX_CLASSES).contains(&c)
    {
        return Err(FormatError::Spec(format!("classes {c} is not in 1..={MAX_CLASSES}")));
    }
    let (train, test) = match spec.format {
        Format::Csv => load_csv_pair(spec)?,
        Format::Npy => {
            let labels = spec.train_labels.as_ref().ok_or_else(|| {
                FormatError::Spec("format npy needs train_labels (the labels .npy beside the features)".into())
            })?;
            let train = raw_from_arrays(&spec.train, npy_file(&spec.train)?, labels, npy_file(labels)?)?;
            let test = match (&spec.test, &spec.test_labels) {
                (Some(x), Some(y)) => Some(raw_from_arrays(x, npy_file(x)?, y, npy_file(y)?)?),
                (None, None) => None,
                _ => return Err(FormatError::Spec("format npy: give test and test_labels together".into())),
            };
            (train, test)
        }
        Format::Npz | Format::Safetensors => {
            let npz = spec.format == Format::Npz;
            let (fx, fy) = if npz { ("x", "y") } else { ("features", "labels") };
            let fname = spec.features.clone().unwrap_or_else(|| fx.to_string());
            let lname = match &spec.label {
                None => fy.to_string(),
                Some(LabelColumn::Name(n)) => n.clone(),
                Some(LabelColumn::Index(i)) => i.to_string(),
            };
            let one = |path: &Path| -> Result<RawSet, FormatError> {
                let bytes = read_file(path)?;
                let (x, y) = if npz {
                    let mut arrays = npz_arrays(path, &bytes, &[fname.as_str(), lname.as_str()])?;
                    let y = arrays.pop().ok_or_else(|| missing(path, &lname, ""))?;
                    let x = arrays.pop().ok_or_else(|| missing(path, &fname, ""))?;
                    (x, y)
                } else {
                    (tensor(path, &bytes, &fname)?, tensor(path, &bytes, &lname)?)
                };
                raw_from_arrays(path, x, path, y)
            };
            let train = one(&spec.train)?;
            let test = spec.test.as_deref().map(&one).transpose()?;
            (train, test)
        }
        Format::ImageFolder => load_image_folders(spec)?,
    };
    assemble(spec, train, test)
}

/// Samples as read, before labels become classes.
#[derive(Debug)]
struct RawSet {
    file: PathBuf,
    shape: Vec<usize>,
    values: Values,
    labels: Vec<RawLabel>,
    /// Class names fixed by the source (image folders): the labels are
    /// their indices.
    names: Option<Vec<String>>,
}

#[derive(Debug)]
enum Values {
    Bytes(Vec<u8>),
    Reals(Vec<f32>),
}

/// A label as read, with where it was read (for errors).
#[derive(Debug, Clone)]
struct RawLabel {
    text: String,
    at: String,
}

/// Labels to classes (see the module docs), then the datasets.
fn assemble(spec: &FileData, train: RawSet, test: Option<RawSet>) -> Result<Loaded, FormatError> {
    if let Some(t) = &test
        && t.shape != train.shape
    {
        return Err(FormatError::ShapeMismatch {
            file: t.file.clone(),
            found: describe(&t.shape),
            expected: describe(&train.shape),
        });
    }
    // Integer labels when every training label is a non-negative integer.
    let numeric = train.names.is_some() || train.labels.iter().all(|l| l.text.parse::<u64>().is_ok());
    let class_names: Vec<String> = if let Some(names) = &train.names {
        names.clone()
    } else if numeric {
        let max = train.labels.iter().filter_map(|l| l.text.parse::<u64>().ok()).max();
        let classes = match spec.classes {
            Some(c) => c,
            None => {
                let top = max.unwrap_or(0);
                if top >= MAX_CLASSES as u64 {
                    // Reported below, against the offending label.
                    MAX_CLASSES
                } else {
                    top as usize + 1
                }
            }
        };
        (0..classes).map(|c| c.to_string()).collect()
    } else {
        let mut names: Vec<String> = train.labels.iter().map(|l| l.text.clone()).collect();
        names.sort_unstable();
        names.dedup();
        if let Some(c) = spec.classes
            && c != names.len()
        {
            return Err(FormatError::Spec(format!(
                "classes = {c}, but {} has {} label names",
                train.file.display(),
                names.len()
            )));
        }
        if names.len() > MAX_CLASSES {
            return Err(FormatError::Spec(format!(
                "{} has {} label names, more than {MAX_CLASSES} classes",
                train.file.display(),
                names.len()
            )));
        }
        names
    };
    let classes = class_names.len();
    let to_classes = |set: &RawSet| -> Result<Vec<u8>, FormatError> {
        set.labels
            .iter()
            .map(|l| {
                let class = if numeric {
                    l.text.parse::<u64>().ok().filter(|&v| v < classes as u64).map(|v| v as usize)
                } else {
                    class_names.binary_search(&l.text).ok()
                };
                let reason = || {
                    if numeric {
                        format!("is not a class number below {classes}")
                    } else {
                        format!("is not one of the training set's label names ({})", class_names.join(", "))
                    }
                };
                // `classes <= 256`, so every class fits a byte.
                class.and_then(|c| u8::try_from(c).ok()).ok_or_else(|| FormatError::Label {
                    file: set.file.clone(),
                    at: l.at.clone(),
                    label: l.text.clone(),
                    reason: reason(),
                })
            })
            .collect()
    };
    let make = |set: RawSet| -> Result<Dataset, FormatError> {
        let labels = to_classes(&set)?;
        let (rows, cols) = rows_cols(&set.shape);
        let d = Dataset { rows, cols, pixels: Vec::new(), features: None, labels, classes: classes.max(1) };
        let d = match set.values {
            Values::Bytes(pixels) => Dataset { pixels, ..d },
            Values::Reals(f) => Dataset { features: Some(f), ..d },
        };
        d.validate().map_err(|e| FormatError::Dataset { file: set.file.clone(), source: Box::new(e) })?;
        Ok(d)
    };
    let shape = train.shape.clone();
    let file = train.file.clone();
    let train = make(train)?;
    let test = match test {
        Some(t) => make(t)?,
        None => match spec.test_fraction {
            Some(f) => {
                let (tr, te) = split_fraction(train.len(), f, spec.seed);
                let sub = |ix: &[usize]| {
                    train.subset(ix).map_err(|e| FormatError::Dataset { file: file.clone(), source: Box::new(e) })
                };
                let (a, b) = (sub(&tr)?, sub(&te)?);
                return finish(spec, a, b, shape, class_names);
            }
            None => train.subset(&[]).map_err(|e| FormatError::Dataset { file: file.clone(), source: Box::new(e) })?,
        },
    };
    finish(spec, train, test, shape, class_names)
}

fn finish(
    spec: &FileData,
    mut train: Dataset,
    mut test: Dataset,
    sample_shape: Vec<usize>,
    class_names: Vec<String>,
) -> Result<Loaded, FormatError> {
    if spec.standardize {
        if !train.is_real() {
            return Err(FormatError::Spec(
                "standardize applies to real-valued features, not to bytes (images are scaled by 1/255)".into(),
            ));
        }
        standardize(&mut train, &mut test);
    }
    Ok(Loaded { split: Split { train, test }, sample_shape, class_names })
}

/// `[n]` → 1×n; `[h, w]` → h×w; `[c, h, w]` → (c·h)×w, as [`Dataset`]
/// stores a multi-channel image.
fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape {
        [n] => (1, *n),
        [h, w] => (*h, *w),
        [c, h, w] => (c.saturating_mul(*h), *w),
        _ => (1, shape.iter().product()),
    }
}

/// Per-feature standardisation with the training set's statistics (see the
/// module docs), computed in f64 for a stable sum.
pub fn standardize(train: &mut Dataset, test: &mut Dataset) {
    let width = train.image_size().max(1);
    let Some(f) = train.features.as_mut() else { return };
    let n = (f.len() / width).max(1) as f64;
    let mut mean = vec![0f64; width];
    for row in f.chunks_exact(width) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += f64::from(v);
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0f64; width];
    for row in f.chunks_exact(width) {
        for ((s, &v), m) in var.iter_mut().zip(row).zip(&mean) {
            *s += (f64::from(v) - m).powi(2);
        }
    }
    let scale: Vec<f64> = var.iter().map(|s| (s / n).sqrt()).map(|sd| if sd > 0.0 { 1.0 / sd } else { 1.0 }).collect();
    let apply = |f: &mut Vec<f32>| {
        for row in f.chunks_exact_mut(width) {
            for ((v, m), s) in row.iter_mut().zip(&mean).zip(&scale) {
                *v = ((f64::from(*v) - m) * s) as f32;
            }
        }
    };
    apply(f);
    if let Some(t) = test.features.as_mut() {
        apply(t);
    }
}

/// Training and test indices for a held-out fraction: a seeded shuffle
/// (ChaCha20 keyed `seed || "tallytest"`, the partitions' Fisher–Yates),
/// the first `ceil(fraction · n)` to the test set; both sorted.
pub fn split_fraction(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = tally_protocol::rng::keyed_chacha20(seed, b"tallytest");
    let mut order: Vec<usize> = (0..n).collect();
    super::partition::shuffle(&mut rng, &mut order);
    let k = ((fraction * n as f64).ceil() as usize).min(n);
    let (test, train) = order.split_at(k);
    let (mut train, mut test) = (train.to_vec(), test.to_vec());
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}

fn read_file(path: &Path) -> Result<Vec<u8>, FormatError> {
    let io = |source| FormatError::Io { file: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut out = Vec::new();
    let cap = u64::try_from(MAX_FILE_BYTES).unwrap_or(u64::MAX).saturating_add(1);
    file.take(cap).read_to_end(&mut out).map_err(io)?;
    if out.len() > MAX_FILE_BYTES {
        return Err(FormatError::TooLarge { file: path.to_path_buf(), limit: MAX_FILE_BYTES });
    }
    Ok(out)
}

// ---------------------------------------------------------------- CSV

fn load_csv_pair(spec: &FileData) -> Result<(RawSet, Option<RawSet>), FormatError> {
    let label = spec.label.clone().unwrap_or(LabelColumn::Name("label".into()));
    let train = parse_csv(&spec.train, &read_file(&spec.train)?, &label)?;
    let test = match &spec.test {
        Some(t) => Some(parse_csv(t, &read_file(t)?, &label)?),
        None => None,
    };
    Ok((train, test))
}

/// Splits one CSV line into fields: commas separate, a field in double
/// quotes may hold commas and `""` for a quote; spaces around a field are
/// dropped.
fn csv_fields(line: &str) -> Result<Vec<String>, (usize, &'static str)> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
            chars.next();
        }
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err((fields.len(), "unterminated quoted field")),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
                chars.next();
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(',') => fields.push(field),
                Some(_) => return Err((fields.len(), "text after a closing quote")),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field.trim_end().to_string());
                        return Ok(fields);
                    }
                    Some(',') => break,
                    Some(c) => field.push(c),
                }
            }
            fields.push(field.trim_end().to_string());
        }
    }
}

fn parse_csv(file: &Path, bytes: &[u8], label: &LabelColumn) -> Result<RawSet, FormatError> {
    let csv_err =
        |row: usize, column: String, reason: String| FormatError::Csv { file: file.to_path_buf(), row, column, reason };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let row = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        csv_err(row, "-".into(), format!("not UTF-8 text (byte {})", e.valid_up_to()))
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let (_, head) = lines.next().ok_or_else(|| csv_err(1, "-".into(), "empty file: no header row".into()))?;
    let header = csv_fields(head).map_err(|(c, r)| csv_err(1, format!("#{}", c + 1), r.into()))?;
    let label_at = match label {
        LabelColumn::Name(n) => header
            .iter()
            .position(|h| h == n)
            .ok_or_else(|| csv_err(1, n.clone(), format!("no such column in the header ({})", header.join(", "))))?,
        LabelColumn::Index(i) if *i < header.len() => *i,
        LabelColumn::Index(i) => {
            return Err(csv_err(1, format!("#{i}"), format!("the header has only {} columns", header.len())));
        }
    };
    let width = header.len() - 1;
    if width == 0 {
        return Err(csv_err(1, "-".into(), "no feature columns besides the label".into()));
    }
    if width > MAX_SAMPLE_VALUES {
        return Err(csv_err(1, "-".into(), format!("{width} features, more than {MAX_SAMPLE_VALUES}")));
    }
    let name = |c: usize| header.get(c).filter(|h| !h.is_empty()).cloned().unwrap_or_else(|| format!("#{}", c + 1));
    let mut values = Vec::new();
    let mut labels = Vec::new();
    for (row, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let fields = csv_fields(line).map_err(|(c, r)| csv_err(row, name(c), r.into()))?;
        if fields.len() != header.len() {
            return Err(csv_err(
                row,
                name(fields.len().min(header.len())),
                format!("{} fields, the header has {}", fields.len(), header.len()),
            ));
        }
        for (c, field) in fields.iter().enumerate() {
            if c == label_at {
                labels.push(RawLabel { text: field.clone(), at: format!("row {row}") });
                continue;
            }
            let v: f32 = field
                .parse()
                .map_err(|_| csv_err(row, name(c), format!("{field:?} is not a number (features must be numeric)")))?;
            if !v.is_finite() {
                return Err(csv_err(row, name(c), format!("{field:?} is not a finite number")));
            }
            values.push(v);
        }
    }
    if labels.is_empty() {
        return Err(csv_err(2, "-".into(), "no data rows after the header".into()));
    }
    Ok(RawSet { file: file.to_path_buf(), shape: vec![width], values: Values::Reals(values), labels, names: None })
}

// ---------------------------------------------------------------- arrays

/// Element types read from `.npy` and safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    F64,
    U8,
    I32,
    I64,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
        }
    }
}

/// One array: dtype, shape and its little-endian bytes.
#[derive(Debug)]
struct Array {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Array {
    fn err(&self, file: &Path, reason: String) -> FormatError {
        FormatError::Array { file: file.to_path_buf(), array: self.name.clone(), reason }
    }

    /// The values as f64, in order (every supported dtype fits exactly
    /// except i64 beyond 2^53, which no feature or label needs).
    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        let size = self.dtype.size();
        self.data.chunks_exact(size).map(move |b| match self.dtype {
            Dtype::U8 => f64::from(b[0]),
            Dtype::F32 => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Dtype::I32 => f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Dtype::F64 => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            Dtype::I64 => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64,
        })
    }
}

fn missing(file: &Path, name: &str, found: &str) -> FormatError {
    FormatError::MissingArray { file: file.to_path_buf(), name: name.to_string(), found: found.to_string() }
}

/// Features `x` (first dimension = samples) and labels `y` (`[n]` or
/// `[n, 1]`, integers) into a raw set.
fn raw_from_arrays(xf: &Path, x: Array, yf: &Path, y: Array) -> Result<RawSet, FormatError> {
    let Some((&n, sample)) = x.shape.split_first() else {
        return Err(x.err(xf, "a scalar; features need a first dimension of samples".into()));
    };
    let sample: Vec<usize> = if sample.is_empty() { vec![1] } else { sample.to_vec() };
    if sample.len() > 3 {
        return Err(x.err(xf, format!("shape {:?}: at most 3 dimensions per sample ([c, h, w])", x.shape)));
    }
    let per: usize = sample.iter().product();
    if per == 0 || per > MAX_SAMPLE_VALUES {
        return Err(x.err(xf, format!("{per} values per sample, must be in 1..={MAX_SAMPLE_VALUES}")));
    }
    let ny = match y.shape[..] {
        [m] | [m, 1] => m,
        _ => return Err(y.err(yf, format!("labels must have shape [n] or [n, 1], not {:?}", y.shape))),
    };
    if ny != n {
        return Err(y.err(yf, format!("{ny} labels, but {} has {n} samples", xf.display())));
    }
    let mut labels = Vec::with_capacity(n);
    for (i, v) in y.values().enumerate() {
        if y.dtype == Dtype::F32 || y.dtype == Dtype::F64 {
            if !(v.is_finite() && v >= 0.0 && v.fract() == 0.0) {
                return Err(FormatError::Label {
                    file: yf.to_path_buf(),
                    at: format!("sample {i}"),
                    label: v.to_string(),
                    reason: "is not a non-negative integer".into(),
                });
            }
        } else if v < 0.0 {
            return Err(FormatError::Label {
                file: yf.to_path_buf(),
                at: format!("sample {i}"),
                label: v.to_string(),
                reason: "is negative".into(),
            });
        }
        labels.push(RawLabel { text: (v as u64).to_string(), at: format!("sample {i}") });
    }
    if x.data.len() != n.saturating_mul(per).saturating_mul(x.dtype.size()) {
        return Err(x.err(xf, "data length does not match the shape".into()));
    }
    let values = if x.dtype == Dtype::U8 {
        Values::Bytes(x.data)
    } else {
        let mut out = Vec::with_capacity(n.saturating_mul(per));
        for (i, v) in x.values().enumerate() {
            let f = v as f32;
            if !f.is_finite() {
                return Err(x.err(xf, format!("value {i} (sample {}) is not a finite f32: {v}", i / per)));
            }
            out.push(f);
        }
        Values::Reals(out)
    };
    Ok(RawSet { file: xf.to_path_buf(), shape: sample, values, labels, names: None })
}

fn npy_file(path: &Path) -> Result<Array, FormatError> {
    parse_npy(path, "", &read_file(path)?)
}

/// Parses a `.npy` file (format versions 1, 2 and 3).
fn parse_npy(file: &Path, name: &str, bytes: &[u8]) -> Result<Array, FormatError> {
    let err = |reason: String| FormatError::Array { file: file.to_path_buf(), array: name.to_string(), reason };
    if !bytes.starts_with(b"\x93NUMPY") {
        return Err(err("not a .npy file (no \\x93NUMPY magic)".into()));
    }
    let major = *bytes.get(6).ok_or_else(|| err("truncated header".into()))?;
    let (len, start) = match major {
        1 => (bytes.get(8..10).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]]))), 10),
        2 | 3 => (bytes.get(8..12).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize), 12),
        v => return Err(err(format!("unsupported .npy format version {v}"))),
    };
    let len = len.ok_or_else(|| err("truncated header".into()))?;
    if len > MAX_NPY_HEADER {
        return Err(err(format!("header of {len} bytes, more than {MAX_NPY_HEADER}")));
    }
    let header = bytes.get(start..start + len).ok_or_else(|| err("truncated header".into()))?;
    let header = std::str::from_utf8(header).map_err(|_| err("header is not text".into()))?;
    let descr = dict_value(header, "descr").ok_or_else(|| err("header has no 'descr'".into()))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let dtype = match descr {
        "<f4" => Dtype::F32,
        "<f8" => Dtype::F64,
        "|u1" | "<u1" | "u1" => Dtype::U8,
        "<i4" => Dtype::I32,
        "<i8" => Dtype::I64,
        other => {
            return Err(err(format!("dtype {other:?} is not supported (use <f4, <f8, |u1, <i4 or <i8)")));
        }
    };
    match dict_value(header, "fortran_order") {
        Some("False") => {}
        Some("True") => return Err(err("Fortran order is not supported (save with C order)".into())),
        _ => return Err(err("header has no 'fortran_order' False/True".into())),
    }
    let shape_text = dict_value(header, "shape").ok_or_else(|| err("header has no 'shape'".into()))?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| err(format!("shape {shape_text:?} is not a tuple")))?;
    let mut shape = Vec::new();
    for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        shape.push(part.parse::<usize>().map_err(|_| err(format!("shape {shape_text:?}: {part:?} is not a size")))?);
    }
    let body = bytes.get(start + len..).unwrap_or_default();
    let expected = shape
        .iter()
        .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
        .filter(|&e| e <= MAX_FILE_BYTES)
        .ok_or_else(|| err(format!("shape {shape:?} is larger than the {MAX_FILE_BYTES}-byte limit")))?;
    if body.len() != expected {
        return Err(err(format!(
            "data is {} bytes, shape {shape:?} of {descr} needs exactly {expected} (truncated or padded file)",
            body.len()
        )));
    }
    Ok(Array { name: name.to_string(), dtype, shape, data: body.to_vec() })
}

/// The value of `'key':` in a Python dict literal as NumPy writes it: a
/// quoted string, a tuple, or a bare word.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'")).or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = header.get(at + key.len() + 2..)?.trim_start().strip_prefix(':')?.trim_start();
    let end = match rest.chars().next()? {
        '(' => rest.find(')')? + 1,
        q @ ('\'' | '"') => rest.get(1..)?.find(q)? + 2,
        _ => rest.find([',', '}']).unwrap_or(rest.len()),
    };
    Some(rest.get(..end)?.trim())
}

/// The named `.npy` members of an `.npz` archive, in the order asked.
fn npz_arrays(file: &Path, bytes: &[u8], names: &[&str]) -> Result<Vec<Array>, FormatError> {
    let zerr = |reason: String| FormatError::Array { file: file.to_path_buf(), array: String::new(), reason };
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| zerr(format!("not a readable .npz (zip) archive: {e}")))?;
    let found: Vec<String> = zip.file_names().map(|n| n.trim_end_matches(".npy").to_string()).collect();
    let mut out = Vec::new();
    for &name in names {
        let member = format!("{name}.npy");
        let mut entry = match zip.by_name(&member) {
            Ok(e) => e,
            Err(zip::result::ZipError::FileNotFound) => {
                let mut f = found.clone();
                f.sort();
                return Err(missing(file, name, &f.join(", ")));
            }
            Err(e) => {
                return Err(FormatError::Array {
                    file: file.to_path_buf(),
                    array: name.into(),
                    reason: format!("unreadable member: {e}"),
                });
            }
        };
        let mut data = Vec::new();
        let cap = u64::try_from(MAX_FILE_BYTES).unwrap_or(u64::MAX).saturating_add(1);
        (&mut entry).take(cap).read_to_end(&mut data).map_err(|e| FormatError::Array {
            file: file.to_path_buf(),
            array: name.into(),
            reason: format!("corrupt member: {e}"),
        })?;
        if data.len() > MAX_FILE_BYTES {
            return Err(FormatError::TooLarge { file: file.to_path_buf(), limit: MAX_FILE_BYTES });
        }
        out.push(parse_npy(file, name, &data)?);
    }
    Ok(out)
}

/// A named tensor of a safetensors file.
fn tensor(file: &Path, bytes: &[u8], name: &str) -> Result<Array, FormatError> {
    let aerr = |reason: String| FormatError::Array { file: file.to_path_buf(), array: name.into(), reason };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| FormatError::Array {
        file: file.to_path_buf(),
        array: String::new(),
        reason: format!("not a readable safetensors file: {e}"),
    })?;
    let view = match st.tensor(name) {
        Ok(v) => v,
        Err(_) => {
            let mut names: Vec<&str> = st.names();
            names.sort_unstable();
            return Err(missing(file, name, &names.join(", ")));
        }
    };
    use safetensors::Dtype as S;
    let dtype = match view.dtype() {
        S::F32 => Dtype::F32,
        S::F64 => Dtype::F64,
        S::U8 => Dtype::U8,
        S::I32 => Dtype::I32,
        S::I64 => Dtype::I64,
        other => return Err(aerr(format!("dtype {other:?} is not supported (use F32, F64, U8, I32 or I64)"))),
    };
    Ok(Array { name: name.into(), dtype, shape: view.shape().to_vec(), data: view.data().to_vec() })
}

// ---------------------------------------------------------------- images

fn load_image_folders(spec: &FileData) -> Result<(RawSet, Option<RawSet>), FormatError> {
    let root = &spec.train;
    let (train_dir, test_dir) = if root.join("train").is_dir() {
        let t = root.join("test");
        (root.join("train"), spec.test.clone().or_else(|| t.is_dir().then_some(t)))
    } else {
        (root.clone(), spec.test.clone())
    };
    let classes = class_folders(&train_dir)?;
    let train = image_set(&train_dir, &classes)?;
    let test = match test_dir {
        Some(dir) => {
            // Every test class must be a training class.
            for c in class_folders(&dir)? {
                if !classes.contains(&c) {
                    return Err(FormatError::Image {
                        file: dir.join(&c),
                        reason: format!(
                            "class folder {c:?} is not among the training classes ({})",
                            classes.join(", ")
                        ),
                    });
                }
            }
            Some(image_set(&dir, &classes)?)
        }
        None => None,
    };
    if let Some(t) = &test
        && t.shape != train.shape
    {
        return Err(FormatError::ShapeMismatch {
            file: t.file.clone(),
            found: describe(&t.shape),
            expected: describe(&train.shape),
        });
    }
    Ok((train, test))
}

fn sorted_entries(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>, FormatError> {
    let io = |source| FormatError::Io { file: dir.to_path_buf(), source };
    let mut v = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        v.push((name, path.clone(), path.is_dir()));
        if v.len() > MAX_IMAGES {
            return Err(FormatError::Image {
                file: dir.to_path_buf(),
                reason: format!("more than {MAX_IMAGES} entries"),
            });
        }
    }
    v.sort();
    Ok(v)
}

fn class_folders(dir: &Path) -> Result<Vec<String>, FormatError> {
    let classes: Vec<String> =
        sorted_entries(dir)?.into_iter().filter(|(_, _, is_dir)| *is_dir).map(|(n, _, _)| n).collect();
    if classes.is_empty() {
        return Err(FormatError::Image { file: dir.to_path_buf(), reason: "no class folders".into() });
    }
    if classes.len() > MAX_CLASSES {
        return Err(FormatError::Image {
            file: dir.to_path_buf(),
            reason: format!("{} class folders, more than {MAX_CLASSES}", classes.len()),
        });
    }
    Ok(classes)
}

/// Every `*.png` under `dir/<class>/` (other files are ignored), class by
/// class in `classes` order, files in name order.
fn image_set(dir: &Path, classes: &[String]) -> Result<RawSet, FormatError> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let mut first: Option<(PathBuf, [usize; 3])> = None;
    for class in classes {
        let cdir = dir.join(class);
        if !cdir.is_dir() {
            continue;
        }
        for (name, path, is_dir) in sorted_entries(&cdir)? {
            if is_dir || !name.to_ascii_lowercase().ends_with(".png") {
                continue;
            }
            if labels.len() >= MAX_IMAGES {
                return Err(FormatError::Image {
                    file: dir.to_path_buf(),
                    reason: format!("more than {MAX_IMAGES} images"),
                });
            }
            let (shape, planar) = decode_png(&path)?;
            if let Some((f, s)) = first.as_ref().filter(|(_, s)| *s != shape) {
                return Err(FormatError::ImageShape {
                    file: path,
                    found: describe(&shape),
                    first: f.clone(),
                    expected: describe(s),
                });
            }
            if first.is_none() {
                first = Some((path.clone(), shape));
            }
            if pixels.len().saturating_add(planar.len()) > MAX_FILE_BYTES {
                return Err(FormatError::TooLarge { file: dir.to_path_buf(), limit: MAX_FILE_BYTES });
            }
            pixels.extend_from_slice(&planar);
            labels.push(RawLabel { text: class.clone(), at: format!("image {}", path.display()) });
        }
    }
    let Some((_, [c, h, w])) = first else {
        return Err(FormatError::Image {
            file: dir.to_path_buf(),
            reason: "no .png images in the class folders".into(),
        });
    };
    // One channel is stored as `[h, w]`, as MNIST is.
    let shape = if c == 1 { vec![h, w] } else { vec![c, h, w] };
    Ok(RawSet {
        file: dir.to_path_buf(),
        shape,
        values: Values::Bytes(pixels),
        labels: class_labels(labels, classes),
        names: Some(classes.to_vec()),
    })
}

/// Image labels are class names; as numbers of the sorted folder list they
/// go through the same integer path as other formats.
fn class_labels(labels: Vec<RawLabel>, classes: &[String]) -> Vec<RawLabel> {
    labels
        .into_iter()
        .map(|l| {
            let i = classes.iter().position(|c| *c == l.text).unwrap_or(0);
            RawLabel { text: i.to_string(), at: l.at }
        })
        .collect()
}

/// Decodes a PNG to 8-bit channel-planar pixels: grey (1 channel) or RGB
/// (3); alpha is dropped, 16-bit samples are cut to 8, palettes expanded.
fn decode_png(path: &Path) -> Result<([usize; 3], Vec<u8>), FormatError> {
    let ierr = |reason: String| FormatError::Image { file: path.to_path_buf(), reason };
    let bytes = read_file(path)?;
    // The decoder's own allocation cap: an RGBA image of the largest side.
    let limits = png::Limits { bytes: 4 * (MAX_IMAGE_SIDE as usize) * (MAX_IMAGE_SIDE as usize) };
    let mut decoder = png::Decoder::new_with_limits(std::io::Cursor::new(bytes), limits);
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(|e| ierr(format!("not a readable PNG: {e}")))?;
    let (w, h) = (reader.info().width, reader.info().height);
    if w == 0 || h == 0 || w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
        return Err(ierr(format!("{w}x{h} pixels; sides must be in 1..={MAX_IMAGE_SIDE}")));
    }
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(|e| ierr(format!("corrupt PNG data: {e}")))?;
    let (stride, keep) = match info.color_type {
        png::ColorType::Grayscale => (1, 1),
        png::ColorType::GrayscaleAlpha => (2, 1),
        png::ColorType::Rgb => (3, 3),
        png::ColorType::Rgba => (4, 3),
        other => return Err(ierr(format!("colour type {other:?} after expansion is not supported"))),
    };
    let (w, h) = (info.width as usize, info.height as usize);
    let mut planar = vec![0u8; keep * h * w];
    for y in 0..h {
        let row = buf.get(y * info.line_size..).ok_or_else(|| ierr("short image data".into()))?;
        for x in 0..w {
            for c in 0..keep {
                let v = *row.get(x * stride + c).ok_or_else(|| ierr("short image data".into()))?;
                planar[(c * h + y) * w + x] = v;
            }
        }
    }
    Ok(([keep, h, w], planar))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The checked-in samples (`scripts/make-format-samples`).
    fn samples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/samples")
    }

    fn spec(format: Format, train: PathBuf) -> FileData {
        FileData {
            format,
            train,
            test: None,
            train_labels: None,
            test_labels: None,
            test_fraction: None,
            seed: 0,
            label: None,
            features: None,
            classes: None,
            standardize: false,
        }
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn npy(descr: &str, shape: &str, payload: &[u8]) -> Vec<u8> {
        let header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}\n");
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend_from_slice(&(header.len() as u16).to_le_bytes());
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn err_text(r: Result<Loaded, FormatError>) -> String {
        r.map(|l| l.split.train.len()).unwrap_err().to_string()
    }

    #[test]
    fn csv_sample_loads_with_names_in_sorted_order() {
        let mut s = spec(Format::Csv, samples().join("digits-train.csv"));
        s.test = Some(samples().join("digits-test.csv"));
        let l = load(&s).unwrap();
        assert_eq!(l.class_names, ["one", "two", "zero"]);
        assert_eq!(l.sample_shape, [16]);
        assert_eq!((l.split.train.len(), l.split.test.len()), (150, 60));
        assert_eq!((l.split.train.rows, l.split.train.cols), (1, 16));
        assert!(l.split.train.is_real() && l.split.train.pixels.is_empty());
        // The first row is a zero: class 2 of (one, two, zero).
        assert_eq!(l.split.train.labels[0], 2);
        assert_eq!(&l.split.train.features.as_ref().unwrap()[..3], &[0.0, 1.0, 71.0]);
        assert_eq!(l.split.train.label_histogram(), [50, 50, 50]);
    }

    #[test]
    fn csv_label_by_index_integer_labels_and_standardisation() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "t.csv", b"y,a,b\n1,1.5,10\n0,2.5,10\n\n2,\"3.5\",10\n");
        let mut s = spec(Format::Csv, p);
        s.label = Some(LabelColumn::Index(0));
        let l = load(&s).unwrap();
        assert_eq!(l.split.train.labels, [1, 0, 2]);
        assert_eq!(l.split.train.features.as_ref().unwrap(), &[1.5, 10.0, 2.5, 10.0, 3.5, 10.0]);
        assert_eq!(l.class_names.len(), 3);
        s.standardize = true;
        let l = load(&s).unwrap();
        let f = l.split.train.features.unwrap();
        // Column a: mean 2.5, population sd sqrt(2/3); b is constant: centred only.
        let sd = (2.0f64 / 3.0).sqrt();
        assert!((f64::from(f[0]) + 1.0 / sd).abs() < 1e-6 && f[1] == 0.0 && f[2] == 0.0, "{f:?}");
        // Standardising images is refused.
        let mut png = spec(Format::ImageFolder, samples().join("digits-png"));
        png.standardize = true;
        assert!(err_text(load(&png)).contains("standardize"));
    }

    #[test]
    fn csv_errors_name_file_row_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let case =
            |name: &str, text: &str| err_text(load(&spec(Format::Csv, write(dir.path(), name, text.as_bytes()))));
        let e = case("ragged.csv", "a,b,label\n1,2,x\n3,4\n");
        assert!(e.contains("ragged.csv") && e.contains("row 3") && e.contains("2 fields"), "{e}");
        let e = case("text.csv", "a,b,label\n1,2,x\n3,four,y\n");
        assert!(e.contains("text.csv") && e.contains("row 3") && e.contains("column b") && e.contains("four"), "{e}");
        let e = case("nolabel.csv", "a,b,c\n1,2,3\n");
        assert!(e.contains("nolabel.csv") && e.contains("row 1") && e.contains("column label"), "{e}");
        let e = case("inf.csv", "a,label\ninf,1\n");
        assert!(e.contains("row 2") && e.contains("finite"), "{e}");
        let e = case("quote.csv", "a,label\n\"1,1\n");
        assert!(e.contains("row 2") && e.contains("unterminated"), "{e}");
        assert!(case("empty.csv", "").contains("no header"));
        assert!(case("header.csv", "a,label\n").contains("no data rows"));
        let e = err_text(load(&spec(Format::Csv, write(dir.path(), "bin.csv", b"a,label\n1,2\n\xff\xfe,3\n"))));
        assert!(e.contains("bin.csv") && e.contains("row 3") && e.contains("UTF-8"), "{e}");
        let e = err_text(load(&spec(Format::Csv, dir.path().join("absent.csv"))));
        assert!(e.contains("absent.csv"), "{e}");
        // A test label that the training file does not have.
        let mut s = spec(Format::Csv, write(dir.path(), "tr.csv", b"a,label\n1,cat\n2,dog\n"));
        s.test = Some(write(dir.path(), "te.csv", b"a,label\n1,cat\n2,cow\n"));
        let e = err_text(load(&s));
        assert!(e.contains("te.csv") && e.contains("row 3") && e.contains("\"cow\"") && e.contains("cat, dog"), "{e}");
        // An integer label past `classes`.
        let mut s = spec(Format::Csv, write(dir.path(), "int.csv", b"a,label\n1,0\n2,5\n"));
        s.classes = Some(3);
        let e = err_text(load(&s));
        assert!(e.contains("int.csv") && e.contains("row 3") && e.contains("\"5\""), "{e}");
    }

    #[test]
    fn npy_npz_and_safetensors_samples_agree() {
        let mut s = spec(Format::Npy, samples().join("digits-x.npy"));
        s.train_labels = Some(samples().join("digits-y.npy"));
        let npy = load(&s).unwrap();
        let npz = load(&spec(Format::Npz, samples().join("digits.npz"))).unwrap();
        let st = load(&spec(Format::Safetensors, samples().join("digits.safetensors"))).unwrap();
        assert_eq!(npy.split.train.len(), 60);
        assert_eq!(npy.sample_shape, [16]);
        assert_eq!(npy.split.train.labels, npz.split.train.labels);
        assert_eq!(npy.split.train, st.split.train);
        // The .npz holds f64 of the same values: equal after rounding to f32.
        assert_eq!(npy.split.train.features, npz.split.train.features);
        assert_eq!(npy.class_names, ["0", "1", "2"]);
        // The same digits as the CSV's first 20 of each class, / 255.
        let mut c = spec(Format::Csv, samples().join("digits-train.csv"));
        c.label = Some(LabelColumn::Name("label".into()));
        let csv = load(&c).unwrap();
        let first = csv.split.train.features.as_ref().unwrap()[2] / 255.0;
        assert_eq!(npy.split.train.features.as_ref().unwrap()[2], first);
    }

    #[test]
    fn malformed_arrays_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let y = write(dir.path(), "y.npy", &npy("<i8", "(2,)", &[0u8; 16]));
        let case = |bytes: Vec<u8>| {
            let mut s = spec(Format::Npy, write(dir.path(), "x.npy", &bytes));
            s.train_labels = Some(y.clone());
            err_text(load(&s))
        };
        let good = npy("<f4", "(2, 3)", &[0u8; 24]);
        let e = case(good[..good.len() - 5].to_vec());
        assert!(e.contains("x.npy") && e.contains("19 bytes") && e.contains("24"), "{e}");
        let e = case(good[..9].to_vec());
        assert!(e.contains("x.npy") && e.contains("truncated"), "{e}");
        let e = case(npy("<c8", "(2, 3)", &[0u8; 48]));
        assert!(e.contains("x.npy") && e.contains("\"<c8\""), "{e}");
        let e = case(npy(">f4", "(2, 3)", &[0u8; 24]));
        assert!(e.contains("\">f4\""), "{e}");
        let e = case(b"PK\x03\x04 not npy".to_vec());
        assert!(e.contains("magic"), "{e}");
        let e = case(npy("<f4", "(18446744073709551615, 3)", &[]));
        assert!(e.contains("x.npy") && e.contains("limit"), "{e}");
        let e = case(npy("<f4", "(3, 2)", &[0u8; 24]));
        assert!(e.contains("y.npy") && e.contains("2 labels"), "{e}");
        let nan = [f32::NAN.to_le_bytes(), [0; 4], [0; 4], [0; 4], [0; 4], [0; 4]].concat();
        assert!(case(npy("<f4", "(2, 3)", &nan)).contains("not a finite"));
        let mut fortran = npy("<f4", "(2, 3)", &[0u8; 24]);
        let at = fortran.windows(5).position(|w| w == b"False").unwrap();
        fortran.splice(at..at + 5, b"True ".iter().copied());
        assert!(case(fortran).contains("Fortran"));
        // Negative labels.
        let mut s = spec(Format::Npy, write(dir.path(), "x2.npy", &good));
        s.train_labels = Some(write(dir.path(), "neg.npy", &npy("<i4", "(2,)", &[0, 0, 0, 0, 255, 255, 255, 255])));
        let e = err_text(load(&s));
        assert!(e.contains("neg.npy") && e.contains("sample 1") && e.contains("negative"), "{e}");
        // npz: a missing member and a corrupt archive; safetensors: a missing tensor.
        let e = err_text(load(&spec(Format::Npz, write(dir.path(), "bad.npz", b"PK\x05\x06 broken"))));
        assert!(e.contains("bad.npz"), "{e}");
        let mut s = spec(Format::Npz, samples().join("digits.npz"));
        s.features = Some("images".into());
        let e = err_text(load(&s));
        assert!(e.contains("digits.npz") && e.contains("\"images\"") && e.contains("x, y"), "{e}");
        let mut s = spec(Format::Safetensors, samples().join("digits.safetensors"));
        s.label = Some(LabelColumn::Name("targets".into()));
        let e = err_text(load(&s));
        assert!(e.contains("digits.safetensors") && e.contains("\"targets\"") && e.contains("features, labels"), "{e}");
        let e = err_text(load(&spec(Format::Safetensors, write(dir.path(), "junk.safetensors", &[1, 2, 3]))));
        assert!(e.contains("junk.safetensors"), "{e}");
        // npy without its labels file.
        assert!(err_text(load(&spec(Format::Npy, y.clone()))).contains("train_labels"));
    }

    #[test]
    fn image_folder_sample_and_test_fraction() {
        let l = load(&spec(Format::ImageFolder, samples().join("digits-png"))).unwrap();
        assert_eq!(l.class_names, ["one", "two", "zero"]);
        assert_eq!(l.sample_shape, [14, 14]);
        assert_eq!((l.split.train.len(), l.split.test.len()), (150, 60));
        assert!(!l.split.train.is_real());
        assert_eq!((l.split.train.rows, l.split.train.cols), (14, 14));
        // Folders in sorted order: one, two, zero.
        assert_eq!(l.split.train.label_histogram(), [50, 50, 50]);
        assert_eq!(l.split.train.labels[0], 0);
        // Train folder alone, split 25% off by seed: deterministic, disjoint.
        let mut s = spec(Format::ImageFolder, samples().join("digits-png/train"));
        s.test_fraction = Some(0.25);
        let a = load(&s).unwrap();
        assert_eq!((a.split.train.len(), a.split.test.len()), (112, 38));
        assert_eq!(load(&s).unwrap().split, a.split);
        s.seed = 1;
        assert_ne!(load(&s).unwrap().split, a.split);
        let (tr, te) = split_fraction(10, 0.3, 4);
        assert_eq!((tr.len(), te.len()), (7, 3));
        assert!(te.iter().all(|i| !tr.contains(i)));
        s.test_fraction = Some(1.0);
        assert!(err_text(load(&s)).contains("test_fraction"));
    }

    fn png(w: u32, h: u32, colour: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = png::Encoder::new(&mut out, w, h);
        e.set_color(colour);
        e.set_depth(png::BitDepth::Eight);
        e.write_header().unwrap().write_image_data(data).unwrap();
        out
    }

    #[test]
    fn rgb_images_are_planar_and_odd_images_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for c in ["cat", "dog"] {
            std::fs::create_dir(dir.path().join(c)).unwrap();
        }
        // 2x1 RGBA: alpha dropped, channels planar.
        write(&dir.path().join("cat"), "a.png", &png(2, 1, png::ColorType::Rgba, &[1, 2, 3, 9, 4, 5, 6, 9]));
        write(&dir.path().join("dog"), "b.png", &png(2, 1, png::ColorType::Rgb, &[7, 8, 9, 10, 11, 12]));
        write(&dir.path().join("dog"), "notes.txt", b"ignored");
        let l = load(&spec(Format::ImageFolder, dir.path().to_path_buf())).unwrap();
        assert_eq!(l.sample_shape, [3, 1, 2]);
        assert_eq!((l.split.train.rows, l.split.train.cols), (3, 2));
        assert_eq!(l.split.train.pixels, [1, 4, 2, 5, 3, 6, 7, 10, 8, 11, 9, 12]);
        assert_eq!(l.split.train.labels, [0, 1]);
        assert!(l.split.test.is_empty());
        // A greyscale image among RGB ones, then one of another size.
        let odd = write(&dir.path().join("dog"), "c.png", &png(2, 1, png::ColorType::Grayscale, &[1, 2]));
        let e = err_text(load(&spec(Format::ImageFolder, dir.path().to_path_buf())));
        assert!(e.contains("c.png") && e.contains("1x2") && e.contains("a.png") && e.contains("3x1x2"), "{e}");
        std::fs::remove_file(&odd).unwrap();
        write(&dir.path().join("dog"), "c.png", &png(1, 2, png::ColorType::Rgb, &[0; 6]));
        let e = err_text(load(&spec(Format::ImageFolder, dir.path().to_path_buf())));
        assert!(e.contains("c.png") && e.contains("3x2x1"), "{e}");
        // A file that is not a PNG.
        write(&dir.path().join("dog"), "c.png", b"\x89PNG broken");
        let e = err_text(load(&spec(Format::ImageFolder, dir.path().to_path_buf())));
        assert!(e.contains("c.png") && e.contains("PNG"), "{e}");
        // A test folder with a class the training set lacks.
        let test = dir.path().join("t");
        std::fs::create_dir_all(test.join("cow")).unwrap();
        std::fs::remove_file(dir.path().join("dog/c.png")).unwrap();
        let mut s = spec(Format::ImageFolder, dir.path().to_path_buf());
        s.test = Some(test);
        let e = err_text(load(&s));
        assert!(e.contains("cow") && e.contains("not among the training classes"), "{e}");
    }

    #[test]
    fn model_input_is_checked_against_the_samples() {
        use tally_protocol::model::ModelArch;
        let l = load(&spec(Format::ImageFolder, samples().join("digits-png"))).unwrap();
        let mlp = ModelArch::Mlp { input: 196, hidden: vec![], classes: 3 };
        assert!(l.check_model("png", &mlp).is_ok());
        let wrong = ModelArch::Mlp { input: 16, hidden: vec![], classes: 3 };
        let e = l.check_model("digits-png", &wrong).unwrap_err().to_string();
        assert!(e.contains("digits-png") && e.contains("14x14") && e.contains("196") && e.contains("16"), "{e}");
    }

    #[test]
    fn specs_parse_from_toml_and_arguments() {
        #[derive(Deserialize)]
        struct S {
            data: DataSpec,
        }
        let named: S = toml::from_str("data = \"data/mnist\"").unwrap();
        assert_eq!(named.data, DataSpec::from("data/mnist"));
        let t: S =
            toml::from_str("data = { format = \"csv\", train = \"a.csv\", label = 3, standardize = true }").unwrap();
        let DataSpec::Files(f) = &t.data else { panic!("{:?}", t.data) };
        assert_eq!((f.format, f.label.clone(), f.standardize), (Format::Csv, Some(LabelColumn::Index(3)), true));
        assert_eq!(t.data.to_string(), "csv:a.csv");
        let a = DataSpec::parse_arg("{ format = \"image-folder\", train = \"d\", test_fraction = 0.2 }").unwrap();
        assert!(matches!(a, DataSpec::Files(FileData { format: Format::ImageFolder, test_fraction: Some(_), .. })));
        assert_eq!(DataSpec::parse_arg("embedded").unwrap(), DataSpec::from("embedded"));
        assert!(DataSpec::parse_arg("{ format = \"xls\", train = \"a\" }").is_err());
    }
}
