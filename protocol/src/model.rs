//! Model architectures as pure shape metadata, the canonical flat parameter
//! order, deterministic initialisation, and safetensors (de)serialisation.
//!
//! The server never links burn, yet it must validate update dimensions, build
//! the initial model and write the final one. So the *shape* of every model
//! lives here and `tally-kernels` builds burn modules that match it.
//!
//! # Flat parameter order (the one every party uses)
//!
//! Parameters travel and aggregate as one `Vec<f32>`: the tensors of
//! [`ModelArch::tensors`] concatenated in that order, each in row-major order
//! with PyTorch's layouts (`Linear.weight` is `[out, in]`, `Conv2d.weight` is
//! `[out, in, kh, kw]`). A PyTorch `state_dict` of the same architecture,
//! flattened tensor by tensor in declaration order, is byte-compatible.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

/// Largest model the wire format carries, in parameters.
///
/// 16 Mi f32 = 64 MiB dense: far above the MNIST-scale models of this project
/// (LeNet-5 has 61,706), and small enough that a hostile peer can't make a
/// replica allocate more than a few hundred MiB by naming a large model.
pub const MAX_PARAMETERS: usize = 16 * 1024 * 1024;

/// Most hidden layers an MLP may declare (a sanity bound on decoded configs).
pub const MAX_MLP_LAYERS: usize = 16;

/// Longest input window a [`ModelArch::CharGru`] may declare: the GRU runs
/// one step per character, so this bounds a forward pass's length.
pub const MAX_CHAR_SEQ: u32 = 1024;

/// A model architecture. Encoded in the round configuration so that every
/// party agrees on shapes before any parameter is exchanged.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ModelArch {
    /// Fully connected ReLU network: `input -> hidden[0] -> ... -> classes`.
    Mlp {
        /// Input features (784 for 28×28 images).
        input: u32,
        /// Widths of the hidden layers.
        hidden: Vec<u32>,
        /// Output classes.
        classes: u32,
    },
    /// LeNet-5 for 1×28×28 inputs: conv(1→6, 5×5, pad 2) → ReLU → maxpool 2 →
    /// conv(6→16, 5×5) → ReLU → maxpool 2 → fc 400→120 → ReLU → fc 120→84 →
    /// ReLU → fc 84→classes.
    #[serde(rename = "lenet5")]
    LeNet5 {
        /// Output classes.
        classes: u32,
    },
    /// An FRL supermask network ([`crate::supermask`]): frozen weights
    /// derived from the run's FRL seed, one trainable score per weight. The
    /// parameter vector is the scores, layer by layer in canonical edge
    /// order; there are no biases. Clients exchange rankings of it
    /// ([`crate::frl`]), never the floats.
    Supermask(crate::supermask::FrlArch),
    /// A character-level GRU language model (the Shakespeare federation):
    /// `seq` character ids → embedding (`vocab × embed`) → one GRU layer of
    /// `hidden` units (PyTorch's `nn.GRU` gate layout and equations) → the
    /// last hidden state → linear `hidden → vocab` logits over the next
    /// character. Inputs are ids, not pixels: see `tally_kernels::model`.
    CharGru {
        /// Vocabulary size: input ids and output classes (at most 256, ids are bytes).
        vocab: u32,
        /// Embedding width.
        embed: u32,
        /// GRU hidden units.
        hidden: u32,
        /// Characters per input window.
        seq: u32,
    },
    /// One of FRL's networks ([`crate::supermask::FrlArch`]) trained densely,
    /// as FRL's baselines (FedAvg, trimmed mean, Multi-Krum) train it: the
    /// same layers (3×3 convolutions with padding 1, pooling, linear layers,
    /// ReLU between), no biases, PyTorch's default init. Parameters are the
    /// weights, `layers.{l}.weight`, layer by layer.
    /// `model = { kind = "frl-dense", net = "lenet", classes = 10 }`.
    FrlDense(crate::supermask::FrlArch),
    /// A network described layer by layer ([`crate::sequential`]): any
    /// sequence of linear, convolution, pooling, activation, dropout,
    /// embedding and GRU layers whose shapes fit. The built-in networks
    /// above are named presets of it ([`crate::sequential::presets`]).
    /// `model = { kind = "sequential", input = [1, 28, 28], layers = [
    /// { type = "conv2d", out = 8, kernel = 3 }, { type = "relu" }, … ] }`.
    /// Appended last: the enum's bincode variant indices are wire format.
    Sequential {
        /// Per-sample input shape: `[features]`, `[channels, height,
        /// width]`, or `[sequence]` of token ids before an embedding.
        input: Vec<u32>,
        /// The layers, input side first.
        layers: Vec<crate::sequential::LayerSpec>,
    },
    /// A model defined in Rust by the program that embeds the client (see
    /// `tally_kernels::custom`): the protocol knows only its name and its
    /// parameter tensors, which is all the server needs (validate updates,
    /// initialise, write the model file). Every client must have an
    /// implementation registered under `name`.
    Custom(CustomArch),
}

/// Longest [`CustomArch`] name, and longest tensor name, in bytes: names
/// are identifiers, and a hostile server must not make a client hold
/// megabytes of them.
pub const MAX_CUSTOM_NAME: usize = 128;

/// Most tensors a [`CustomArch`] may declare: bounds the work of validating
/// a hostile layout; far more than a hand-written edge model has.
pub const MAX_CUSTOM_TENSORS: usize = 1024;

/// Highest rank of a [`CustomTensor`] (a 2-D convolution's weight is rank 4).
pub const MAX_CUSTOM_RANK: usize = 4;

/// The layout of a [`ModelArch::Custom`] model.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomArch {
    /// The implementation's name (what clients look it up by).
    pub name: String,
    /// Values per input sample (`rows × cols` of the data).
    pub input: u32,
    /// Output classes.
    pub classes: u32,
    /// The parameter tensors, in the flat order.
    pub tensors: Vec<CustomTensor>,
}

/// One tensor of a [`CustomArch`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomTensor {
    /// Its name in model files.
    pub name: String,
    /// Its shape, in the implementation's own layout.
    pub shape: Vec<u32>,
    /// Fan-in for the default initialisation `U(±1/√fan_in)`.
    pub fan_in: u32,
}

impl CustomArch {
    /// Checks names, ranks, sizes and the parameter total.
    pub fn validate(&self) -> Result<(), ModelError> {
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= MAX_CUSTOM_NAME
                && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !name_ok(&self.name) {
            return Err(ModelError::Input(format!(
                "custom model name must be 1..={MAX_CUSTOM_NAME} bytes of [A-Za-z0-9-_.]"
            )));
        }
        let max = crate::sequential::MAX_WIDTH;
        if self.input == 0 || u64::from(self.input) > crate::sequential::MAX_ACTIVATION {
            return Err(ModelError::Input("custom model input must be in 1..=MAX_ACTIVATION".into()));
        }
        if self.classes == 0 || self.classes > max {
            return Err(ModelError::Input("custom model classes must be in 1..=MAX_WIDTH".into()));
        }
        if self.tensors.is_empty() || self.tensors.len() > MAX_CUSTOM_TENSORS {
            return Err(ModelError::Input(format!("custom model needs 1..={MAX_CUSTOM_TENSORS} tensors")));
        }
        let mut total: u64 = 0;
        let mut seen = std::collections::BTreeSet::new();
        for (i, t) in self.tensors.iter().enumerate() {
            let bad = |reason: String| ModelError::Input(format!("custom tensor {i}: {reason}"));
            if !name_ok(&t.name) || !seen.insert(t.name.as_str()) {
                return Err(bad("names must be unique, 1..=MAX_CUSTOM_NAME bytes of [A-Za-z0-9-_.]".into()));
            }
            if t.shape.is_empty() || t.shape.len() > MAX_CUSTOM_RANK {
                return Err(bad(format!("rank {} is not in 1..={MAX_CUSTOM_RANK}", t.shape.len())));
            }
            if t.shape.iter().any(|&d| d == 0 || d > max) || t.fan_in == 0 || t.fan_in > max {
                return Err(bad("dimensions and fan-in must be in 1..=MAX_WIDTH".into()));
            }
            // Rank ≤ 4 of values ≤ 2^20 fits u128; saturate into u64.
            let n: u128 = t.shape.iter().map(|&d| u128::from(d)).product();
            total = total.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
            if total > MAX_PARAMETERS as u64 {
                return Err(ModelError::TooLarge(usize::try_from(total).unwrap_or(usize::MAX)));
            }
        }
        Ok(())
    }
}

/// One named tensor of a model, in the flat order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// PyTorch-style name, e.g. `layers.0.weight`.
    pub name: String,
    /// Shape in PyTorch layout.
    pub shape: Vec<usize>,
    /// Fan-in used by the default initialisation.
    pub fan_in: usize,
}

impl TensorSpec {
    /// Number of scalars in this tensor (saturating: an unvalidated hostile
    /// shape gives `usize::MAX`, never a wrapped small count).
    pub fn numel(&self) -> usize {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).unwrap_or(usize::MAX)
    }
}

/// Why an architecture or a parameter file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// The architecture declares a zero-sized or absurd layer.
    #[error("invalid architecture: {0}")]
    InvalidArch(&'static str),
    /// More parameters than [`MAX_PARAMETERS`].
    #[error("model has {0} parameters, more than the limit {MAX_PARAMETERS}")]
    TooLarge(usize),
    /// A parameter vector of the wrong length.
    #[error("expected {expected} parameters, got {actual}")]
    WrongLength {
        /// What the architecture needs.
        expected: usize,
        /// What was supplied.
        actual: usize,
    },
    /// A raw f32 file whose size is not the model's: counted in bytes, since
    /// a file of the wrong size need not hold whole parameters at all.
    #[error("a raw f32 file of {actual} bytes; the model needs {expected} bytes ({} parameters)", expected / 4)]
    WrongFileSize {
        /// Bytes the model needs (4 per parameter).
        expected: usize,
        /// Bytes the file has.
        actual: usize,
    },
    /// A safetensors file that can't be parsed or doesn't match the model.
    #[error("safetensors: {0}")]
    Safetensors(String),
    /// A layer of a [`ModelArch::Sequential`] description that can't hold.
    #[error("layer {index} ({layer}), field {field}: {reason}")]
    Layer {
        /// The layer's position, from 0.
        index: usize,
        /// Its type, as written in TOML.
        layer: &'static str,
        /// The field at fault (`type` when the layer doesn't fit its input).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A [`ModelArch::Sequential`] description's input or layer list is unusable.
    #[error("sequential model: {0}")]
    Input(String),
    /// A NaN or infinity among the parameters.
    #[error("parameter {index} is not finite")]
    NonFinite {
        /// Flat index of the first bad value.
        index: usize,
    },
}

impl ModelArch {
    /// The MLP of the foundation benchmark: 784-200-200-10.
    pub fn mnist_mlp() -> Self {
        ModelArch::Mlp { input: 784, hidden: vec![200, 200], classes: 10 }
    }

    /// Checks the architecture is well formed and within [`MAX_PARAMETERS`].
    pub fn validate(&self) -> Result<(), ModelError> {
        match self {
            ModelArch::Mlp { input, hidden, classes } => {
                if *input == 0 || *classes == 0 || hidden.contains(&0) {
                    return Err(ModelError::InvalidArch("zero-width layer"));
                }
                if hidden.len() > MAX_MLP_LAYERS {
                    return Err(ModelError::InvalidArch("too many hidden layers"));
                }
            }
            ModelArch::LeNet5 { classes } => {
                if *classes == 0 {
                    return Err(ModelError::InvalidArch("zero classes"));
                }
            }
            // Its own check bounds every size before multiplying.
            ModelArch::Supermask(net) | ModelArch::FrlDense(net) => return net.validate(),
            // Shape inference checks everything, sizes included.
            ModelArch::Sequential { input, layers } => return crate::sequential::infer(input, layers).map(|_| ()),
            ModelArch::Custom(custom) => return custom.validate(),
            ModelArch::CharGru { vocab, embed, hidden, seq } => {
                if *vocab == 0 || *embed == 0 || *hidden == 0 || *seq == 0 {
                    return Err(ModelError::InvalidArch("zero-sized char-gru dimension"));
                }
                if *vocab > 256 {
                    return Err(ModelError::InvalidArch("char-gru vocab above 256 (ids are bytes)"));
                }
                if *seq > MAX_CHAR_SEQ {
                    return Err(ModelError::InvalidArch("char-gru seq above MAX_CHAR_SEQ"));
                }
            }
        }
        // Count in u128 so that hostile widths can't overflow before the check.
        // Every layer (linear or conv) has fan_in * out weights and out biases.
        let total: u128 =
            self.layer_dims().iter().map(|&(fan_in, out)| fan_in as u128 * out as u128 + out as u128).sum();
        let total = usize::try_from(total).unwrap_or(usize::MAX);
        if total > MAX_PARAMETERS {
            return Err(ModelError::TooLarge(total));
        }
        Ok(())
    }

    /// `(fan_in, out)` per layer; only used for the overflow-safe size check.
    fn layer_dims(&self) -> Vec<(u64, u64)> {
        match self {
            ModelArch::Mlp { input, hidden, classes } => {
                let mut dims = Vec::new();
                let mut prev = *input as u64;
                for &h in hidden.iter().chain(std::iter::once(classes)) {
                    dims.push((prev, h as u64));
                    prev = h as u64;
                }
                dims
            }
            ModelArch::LeNet5 { classes } => vec![(25, 6), (150, 16), (400, 120), (120, 84), (84, *classes as u64)],
            // Validated separately (no biases); never reached from `validate`.
            ModelArch::Supermask(_) | ModelArch::FrlDense(_) | ModelArch::Sequential { .. } | ModelArch::Custom(_) => {
                Vec::new()
            }
            // The embedding has no bias; counting one per column only
            // over-estimates, which is safe for a size check.
            ModelArch::CharGru { vocab, embed, hidden, .. } => {
                let (v, e, h) = (*vocab as u64, *embed as u64, *hidden as u64);
                vec![(v, e), (e, 3 * h), (h, 3 * h), (h, v)]
            }
        }
    }

    /// The tensors of the model in the canonical flat order.
    ///
    /// Call [`ModelArch::validate`] first on untrusted architectures.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let t = |name: String, shape: Vec<usize>, fan_in: usize| TensorSpec { name, shape, fan_in };
        match self {
            ModelArch::Mlp { input, hidden, classes } => {
                let mut out = Vec::new();
                let mut prev = *input as usize;
                for (i, &h) in hidden.iter().chain(std::iter::once(classes)).enumerate() {
                    let h = h as usize;
                    out.push(t(format!("layers.{i}.weight"), vec![h, prev], prev));
                    out.push(t(format!("layers.{i}.bias"), vec![h], prev));
                    prev = h;
                }
                out
            }
            ModelArch::LeNet5 { classes } => {
                let c = *classes as usize;
                vec![
                    t("conv1.weight".into(), vec![6, 1, 5, 5], 25),
                    t("conv1.bias".into(), vec![6], 25),
                    t("conv2.weight".into(), vec![16, 6, 5, 5], 150),
                    t("conv2.bias".into(), vec![16], 150),
                    t("fc1.weight".into(), vec![120, 400], 400),
                    t("fc1.bias".into(), vec![120], 400),
                    t("fc2.weight".into(), vec![84, 120], 120),
                    t("fc2.bias".into(), vec![84], 120),
                    t("fc3.weight".into(), vec![c, 84], 84),
                    t("fc3.bias".into(), vec![c], 84),
                ]
            }
            ModelArch::Supermask(net) => net
                .layers()
                .iter()
                .enumerate()
                .map(|(l, layer)| t(format!("layers.{l}.scores"), layer.shape(), layer.fan_in()))
                .collect(),
            ModelArch::FrlDense(net) => net
                .layers()
                .iter()
                .enumerate()
                .map(|(l, layer)| t(format!("layers.{l}.weight"), layer.shape(), layer.fan_in()))
                .collect(),
            // PyTorch names and layouts (`nn.Embedding`, `nn.GRU` with gates
            // stacked r, z, n along the first axis, `nn.Linear`). Fan-ins
            // give PyTorch's default init: U(±1/√hidden) for the GRU and the
            // output layer; the embedding gets fan-in 1, i.e. U(±1) (PyTorch
            // draws N(0, 1); a bounded draw keeps one scheme for every tensor).
            ModelArch::CharGru { vocab, embed, hidden, .. } => {
                let (v, e, h) = (*vocab as usize, *embed as usize, *hidden as usize);
                vec![
                    t("embed.weight".into(), vec![v, e], 1),
                    t("gru.weight_ih_l0".into(), vec![3 * h, e], h),
                    t("gru.weight_hh_l0".into(), vec![3 * h, h], h),
                    t("gru.bias_ih_l0".into(), vec![3 * h], h),
                    t("gru.bias_hh_l0".into(), vec![3 * h], h),
                    t("out.weight".into(), vec![v, h], h),
                    t("out.bias".into(), vec![v], h),
                ]
            }
            // An invalid description has no layout: empty, so its parameter
            // count is 0 and every parameter vector is refused by length.
            ModelArch::Sequential { input, layers } => {
                crate::sequential::infer(input, layers).map(|inf| inf.tensors).unwrap_or_default()
            }
            ModelArch::Custom(c) => c
                .tensors
                .iter()
                .map(|x| t(x.name.clone(), x.shape.iter().map(|&d| d as usize).collect(), x.fan_in as usize))
                .collect(),
        }
    }

    /// Total number of parameters (saturating, like [`TensorSpec::numel`], so
    /// that a size check on an unvalidated architecture can't be fooled by
    /// wrap-around).
    pub fn num_params(&self) -> usize {
        self.tensors().iter().fold(0usize, |n, t| n.saturating_add(t.numel()))
    }

    /// Number of output classes.
    pub fn classes(&self) -> usize {
        match self {
            ModelArch::Mlp { classes, .. } | ModelArch::LeNet5 { classes } => *classes as usize,
            ModelArch::Supermask(net) | ModelArch::FrlDense(net) => net.classes(),
            ModelArch::CharGru { vocab, .. } => *vocab as usize,
            ModelArch::Sequential { input, layers } => {
                crate::sequential::infer(input, layers).map_or(0, |inf| inf.classes)
            }
            ModelArch::Custom(c) => c.classes as usize,
        }
    }

    /// Deterministic initial parameters, PyTorch's default scheme: every
    /// weight and bias uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    ///
    /// Uniforms come from [`crate::rng::InitRng`] (ChaCha20 keyed by `seed`), so
    /// the server and the simulator build the same initial model without burn.
    /// A [`ModelArch::Supermask`] model's initial parameters are FRL's initial
    /// scores of the network seeded by `seed`
    /// ([`crate::supermask::initial_scores`]; the run's `FrlRun::seed` must be
    /// the same).
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        if let ModelArch::Supermask(net) = self {
            // FRL's initial scores, from the prng streams of `seed`.
            return crate::supermask::initial_scores(net, seed);
        }
        let mut rng = crate::rng::InitRng::new(seed);
        // Capped so an unvalidated architecture can't ask for an absurd
        // reservation up front (a capacity overflow is a panic).
        let mut out = Vec::with_capacity(self.num_params().min(MAX_PARAMETERS));
        for spec in self.tensors() {
            let bound = 1.0 / (spec.fan_in as f32).sqrt();
            for _ in 0..spec.numel() {
                out.push((rng.unit_f32() * 2.0 - 1.0) * bound);
            }
        }
        out
    }

    /// Checks a parameter vector's length and finiteness against this model.
    pub fn check_params(&self, params: &[f32]) -> Result<(), ModelError> {
        let expected = self.num_params();
        if params.len() != expected {
            return Err(ModelError::WrongLength { expected, actual: params.len() });
        }
        if let Some(index) = params.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite { index });
        }
        Ok(())
    }

    /// Serialises parameters as safetensors (F32, little endian, PyTorch names).
    ///
    /// No header metadata: files that leave the system are written by
    /// [`crate::model_file`], which adds the architecture and the run.
    pub fn to_safetensors(&self, params: &[f32]) -> Result<Vec<u8>, ModelError> {
        self.check_params(params)?;
        write_f32_tensors(&self.tensors(), params)
    }

    /// Reads parameters from safetensors bytes: every tensor of the model must
    /// be present with the exact shape and dtype F32; extra tensors are refused.
    /// Header metadata is ignored (see [`crate::model_file`] for reading it).
    pub fn from_safetensors(&self, bytes: &[u8]) -> Result<Vec<f32>, ModelError> {
        let out = read_f32_tensors(bytes, &self.tensors())?;
        self.check_params(&out)?;
        Ok(out)
    }

    /// Reads raw little-endian f32 in the canonical flat order (no header).
    ///
    /// The length is checked before anything is allocated, so a huge file
    /// costs no more than the bytes already read.
    pub fn from_raw_f32(&self, bytes: &[u8]) -> Result<Vec<f32>, ModelError> {
        let expected = self.num_params().saturating_mul(4);
        if bytes.len() != expected {
            return Err(ModelError::WrongFileSize { expected, actual: bytes.len() });
        }
        let (chunks, _) = bytes.as_chunks::<4>();
        let out: Vec<f32> = chunks.iter().map(|c| f32::from_le_bytes(*c)).collect();
        self.check_params(&out)?;
        Ok(out)
    }
}

/// Serialises `values` as the F32 tensors `specs` (their sizes must add up
/// to `values.len()`), with no metadata.
pub(crate) fn write_f32_tensors(specs: &[TensorSpec], values: &[f32]) -> Result<Vec<u8>, ModelError> {
    let total = specs.iter().fold(0usize, |n, t| n.saturating_add(t.numel()));
    let wrong = || ModelError::WrongLength { expected: total, actual: values.len() };
    if total != values.len() {
        return Err(wrong());
    }
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut views = Vec::with_capacity(specs.len());
    // The sizes add up to the length (checked above), so the split can't run
    // short; it is checked anyway instead of sliced.
    let mut rest = bytes.as_slice();
    for spec in specs {
        let len = spec.numel().saturating_mul(4);
        let (data, tail) = rest.split_at_checked(len).ok_or_else(wrong)?;
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, spec.shape.clone(), data)
            .map_err(|e| ModelError::Safetensors(e.to_string()))?;
        views.push((spec.name.clone(), view));
        rest = tail;
    }
    safetensors::tensor::serialize(views, None).map_err(|e| ModelError::Safetensors(e.to_string()))
}

/// Reads exactly the F32 tensors `specs` (names, shapes) from safetensors
/// bytes, concatenated in the order of `specs`; extra tensors are refused.
/// Finiteness is the caller's check.
pub(crate) fn read_f32_tensors(bytes: &[u8], specs: &[TensorSpec]) -> Result<Vec<f32>, ModelError> {
    check_safetensors_offsets(bytes)?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors(e.to_string()))?;
    if st.len() != specs.len() {
        return Err(ModelError::Safetensors(format!("file has {} tensors, the model has {}", st.len(), specs.len())));
    }
    let total = specs.iter().fold(0usize, |n, t| n.saturating_add(t.numel()));
    // Capped like `init_params`: the shapes are the caller's, validated.
    let mut out = Vec::with_capacity(total.min(MAX_PARAMETERS));
    for spec in specs {
        let view = st.tensor(&spec.name).map_err(|e| ModelError::Safetensors(format!("{}: {e}", spec.name)))?;
        if view.dtype() != safetensors::Dtype::F32 || view.shape() != spec.shape.as_slice() {
            return Err(ModelError::Safetensors(format!(
                "{}: expected F32 {:?}, found {:?} {:?}",
                spec.name,
                spec.shape,
                view.dtype(),
                view.shape()
            )));
        }
        // safetensors checked the data is exactly numel × 4 bytes for the
        // F32 shape, so there is no remainder.
        let (chunks, _) = view.data().as_chunks::<4>();
        out.extend(chunks.iter().map(|c| f32::from_le_bytes(*c)));
    }
    Ok(out)
}

/// Checks every tensor's data offsets against the file before safetensors
/// parses it.
///
/// safetensors 0.8 adds the last data offset to the header length without a
/// check (`buffer_end + N_LEN + n` in `read_metadata`): a hostile header whose
/// offsets sum to nearly `usize::MAX` (shapes of 2^61 bytes each pass its
/// per-tensor checks) overflows there, which panics in any build with overflow
/// checks. With every offset at most the file size, that sum can't overflow.
pub(crate) fn check_safetensors_offsets(bytes: &[u8]) -> Result<(), ModelError> {
    let err = |m: String| ModelError::Safetensors(m);
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(err("shorter than the 8-byte header length".into()));
    };
    let header = usize::try_from(u64::from_le_bytes(*len_bytes))
        .ok()
        .and_then(|n| rest.get(..n))
        .ok_or_else(|| err("header length beyond the end of the file".into()))?;
    let entries: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| err(format!("header: {e}")))?;
    let file_len = bytes.len() as u64;
    for (name, entry) in &entries {
        let Some(offsets) = entry.get("data_offsets").and_then(|v| v.as_array()) else {
            continue; // `__metadata__`, or a tensor safetensors will refuse itself
        };
        if offsets.iter().any(|o| o.as_u64().is_none_or(|o| o > file_len)) {
            return Err(err(format!("{name}: data offsets beyond the end of the file")));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn param_counts() {
        assert_eq!(ModelArch::mnist_mlp().num_params(), 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10);
        assert_eq!(ModelArch::LeNet5 { classes: 10 }.num_params(), 61_706);
        // PyTorch: Embedding(81, 8) + GRU(8, 128) + Linear(128, 81).
        let gru = ModelArch::CharGru { vocab: 81, embed: 8, hidden: 128, seq: 80 };
        assert_eq!(gru.num_params(), 81 * 8 + (384 * 8 + 384 * 128 + 2 * 384) + (81 * 128 + 81));
        assert_eq!(gru.classes(), 81);
    }

    #[test]
    fn char_gru_validation_and_config_names() {
        let ok = ModelArch::CharGru { vocab: 81, embed: 8, hidden: 128, seq: 80 };
        ok.validate().unwrap();
        let json = serde_json::to_string(&ok).unwrap();
        assert_eq!(json, r#"{"kind":"char-gru","vocab":81,"embed":8,"hidden":128,"seq":80}"#);
        assert_eq!(serde_json::from_str::<ModelArch>(&json).unwrap(), ok);
        for bad in [
            ModelArch::CharGru { vocab: 0, embed: 8, hidden: 128, seq: 80 },
            ModelArch::CharGru { vocab: 81, embed: 8, hidden: 0, seq: 80 },
            ModelArch::CharGru { vocab: 257, embed: 8, hidden: 128, seq: 80 },
            ModelArch::CharGru { vocab: 81, embed: 8, hidden: 128, seq: MAX_CHAR_SEQ + 1 },
        ] {
            assert!(matches!(bad.validate(), Err(ModelError::InvalidArch(_))), "{bad:?}");
        }
        let huge = ModelArch::CharGru { vocab: 256, embed: u32::MAX, hidden: u32::MAX, seq: 80 };
        assert!(matches!(huge.validate(), Err(ModelError::TooLarge(_))));
        // Safetensors round trip with the PyTorch names.
        let small = ModelArch::CharGru { vocab: 5, embed: 2, hidden: 3, seq: 4 };
        let p = small.init_params(3);
        assert_eq!(p.len(), small.num_params());
        assert!(p[10..].iter().all(|v| v.abs() <= 1.0 / 3f32.sqrt()));
        let bytes = small.to_safetensors(&p).unwrap();
        assert_eq!(small.from_safetensors(&bytes).unwrap(), p);
        let names: Vec<String> = small.tensors().into_iter().map(|t| t.name).collect();
        assert_eq!(names[1], "gru.weight_ih_l0");
    }

    #[test]
    fn oversized_arch_rejected() {
        let a = ModelArch::Mlp { input: u32::MAX, hidden: vec![u32::MAX], classes: 10 };
        assert!(matches!(a.validate(), Err(ModelError::TooLarge(_))));
    }

    #[test]
    fn safetensors_round_trip_and_rejects() {
        let arch = ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 };
        let p = arch.init_params(7);
        let bytes = arch.to_safetensors(&p).unwrap();
        assert_eq!(arch.from_safetensors(&bytes).unwrap(), p);
        let other = ModelArch::Mlp { input: 4, hidden: vec![5], classes: 2 };
        assert!(other.from_safetensors(&bytes).is_err());
        assert!(arch.from_safetensors(&bytes[..bytes.len() - 1]).is_err());
        assert!(arch.from_safetensors(b"garbage").is_err());
    }

    #[test]
    fn init_is_deterministic_and_bounded() {
        let arch = ModelArch::mnist_mlp();
        let a = arch.init_params(1);
        assert_eq!(a, arch.init_params(1));
        assert_ne!(a, arch.init_params(2));
        let bound = 1.0 / 784f32.sqrt();
        assert!(a[..784 * 200].iter().all(|v| v.abs() <= bound));
    }

    #[test]
    fn unvalidated_huge_arch_saturates_instead_of_wrapping() {
        // Three layers of u32::MAX × u32::MAX: each ≈ 2^64, the sum wraps in usize.
        let a = ModelArch::Mlp { input: u32::MAX, hidden: vec![u32::MAX, u32::MAX], classes: u32::MAX };
        assert_eq!(a.num_params(), usize::MAX);
        assert!(crate::wire::max_message_bytes_for(&a) <= crate::wire::MAX_MESSAGE_BYTES);
        assert!(matches!(a.from_raw_f32(&[0u8; 16]), Err(ModelError::WrongFileSize { .. })));
    }

    #[test]
    fn raw_f32_length_is_checked_before_parsing() {
        let arch = ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 };
        let p = arch.init_params(3);
        let bytes: Vec<u8> = p.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(arch.from_raw_f32(&bytes).unwrap(), p);
        let expected = p.len() * 4;
        assert_eq!(arch.from_raw_f32(&bytes[4..]), Err(ModelError::WrongFileSize { expected, actual: expected - 4 }));
        let odd = arch.from_raw_f32(&bytes[1..]).unwrap_err();
        assert_eq!(odd, ModelError::WrongFileSize { expected, actual: expected - 1 });
        // Said in bytes, with the parameter count for reference.
        assert_eq!(
            odd.to_string(),
            format!("a raw f32 file of {} bytes; the model needs {expected} bytes (23 parameters)", expected - 1)
        );
        let mut long = bytes.clone();
        long.extend_from_slice(&[0; 4]);
        assert!(matches!(arch.from_raw_f32(&long), Err(ModelError::WrongFileSize { .. })));
    }

    /// A safetensors file whose header describes `tensors` U8 tensors of
    /// `size` bytes each, back to back, with no data at all.
    fn hostile_safetensors(tensors: u64, size: u64) -> Vec<u8> {
        let entries: Vec<String> = (0..tensors)
            .map(|i| {
                format!(r#""t{i}":{{"dtype":"U8","shape":[{size}],"data_offsets":[{},{}]}}"#, i * size, (i + 1) * size)
            })
            .collect();
        let header = format!("{{{}}}", entries.join(","));
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes
    }

    #[test]
    fn safetensors_offsets_near_usize_max_are_refused() {
        let arch = ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 };
        // Eight tensors of 2^61 - 1 bytes: offsets end at 2^64 - 8, and
        // safetensors' `end + 8 + header_len` overflows (a panic with
        // overflow checks on, e.g. in a debug build).
        let bytes = hostile_safetensors(8, (1 << 61) - 1);
        let e = arch.from_safetensors(&bytes).unwrap_err();
        assert!(e.to_string().contains("beyond the end of the file"), "{e}");
        // A plain lie about one tensor's size is refused the same way.
        assert!(arch.from_safetensors(&hostile_safetensors(1, 1 << 20)).is_err());
        // Header length pointing past the end, and a header that is not JSON.
        let mut short = 1000u64.to_le_bytes().to_vec();
        short.extend_from_slice(b"{}");
        assert!(arch.from_safetensors(&short).is_err());
        let mut junk = 2u64.to_le_bytes().to_vec();
        junk.extend_from_slice(b"{[");
        assert!(arch.from_safetensors(&junk).is_err());
        assert!(arch.from_safetensors(&[1, 2, 3]).is_err());
    }
}
