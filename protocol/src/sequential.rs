//! Declarative sequential networks ([`crate::model::ModelArch::Sequential`]):
//! the layer vocabulary, and shape inference over a description (each
//! layer's output shape, its parameter tensors, the total count), pure and
//! without burn, so the server validates and initialises any such network
//! without linking an ML framework.
//!
//! A description arrives over the wire from a server that may be hostile,
//! so [`infer`] bounds everything before it multiplies or allocates: the
//! number of layers ([`MAX_LAYERS`]), every width ([`MAX_WIDTH`]), the
//! activation a sample may occupy ([`MAX_ACTIVATION`]), the sequence length
//! ([`MAX_SEQUENCE`]) and the parameter count
//! ([`crate::model::MAX_PARAMETERS`]). A description that can't hold is a
//! [`ModelError::Layer`] naming the layer's index and field.
//!
//! # Shapes
//!
//! Shapes are per sample (the batch axis is implicit): `[n]` features,
//! `[seq, dim]` a sequence of vectors, `[c, h, w]` an image. The input is
//! `[n]` or `[c, h, w]` pixels, or `[seq]` token ids when the first layer is
//! an [`LayerSpec::Embedding`]. The last layer's output must be `[classes]`.
//!
//! # Parameters
//!
//! Layer `i`'s tensors are named `layers.{i}.…` with PyTorch's names and
//! layouts (`nn.Linear`: `weight [out, in]`, `bias [out]`; `nn.Conv2d`:
//! `weight [out, in, k, k]`, `bias [out]`; `nn.Embedding`: `weight [vocab,
//! dim]`; `nn.GRU`: `weight_ih_l0 [3h, dim]`, `weight_hh_l0 [3h, h]`,
//! `bias_ih_l0`, `bias_hh_l0 [3h]`, gates r, z, n). A PyTorch
//! `nn.Sequential` of the same layers stored as `layers` has the same
//! `state_dict` names (index `i` counts every layer, parameterless ones
//! too), so the flat order is byte-compatible with it.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::model::{MAX_PARAMETERS, ModelError, TensorSpec};

/// Most layers a description may have: activations count, so LeNet-5 is 12.
/// Bounds the work of validating a hostile description and the depth of a
/// forward pass; 64 is far beyond the edge-device networks this is for.
pub const MAX_LAYERS: usize = 64;

/// Largest value of any single width, channel count, side, kernel, stride
/// or padding: keeps every product of two of them inside `u64` and refuses
/// nonsense before the parameter count is even computed.
pub const MAX_WIDTH: u32 = 1 << 20;

/// Most scalars one sample's activation may hold at any layer (4 Mi f32 =
/// 16 MiB per sample). A convolution with few parameters can still produce a
/// huge activation, so the parameter limit alone would let a hostile server
/// make a client allocate gigabytes per batch.
pub const MAX_ACTIVATION: u64 = 4 * 1024 * 1024;

/// Longest token sequence an embedding input may declare: a GRU runs one
/// step per token, so this bounds a forward pass's length (as
/// `MAX_CHAR_SEQ` does for the built-in character model).
pub const MAX_SEQUENCE: u32 = 1024;

/// Largest embedding vocabulary: token ids travel as the bytes of a
/// dataset's samples, so an id is below 256.
pub const MAX_VOCAB: u32 = 256;

/// A dropout probability: finite, in `[0, 1)`. Compared and hashed by its
/// bits (a description is a value every party must agree on exactly).
#[derive(Clone, Copy, Debug, Encode, Decode, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Probability(pub f32);

impl PartialEq for Probability {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Probability {}

impl std::hash::Hash for Probability {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

fn one() -> u32 {
    1
}

/// One layer of a sequential network. In TOML: `{ type = "conv2d", out = 6,
/// kernel = 5, padding = 2 }`, `{ type = "relu" }`, …
#[derive(Clone, Debug, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum LayerSpec {
    /// Fully connected `[n] → [out]`, with bias.
    Linear {
        /// Output features.
        out: u32,
    },
    /// 2-D convolution `[c, h, w] → [out, h', w']` (square kernel, zero
    /// padding on all four sides, one group, no dilation), with bias.
    Conv2d {
        /// Output channels.
        out: u32,
        /// Kernel side.
        kernel: u32,
        /// Step between windows. Default 1.
        #[serde(default = "one")]
        stride: u32,
        /// Zeros added on each side; below `kernel`. Default 0.
        #[serde(default)]
        padding: u32,
    },
    /// Max pooling over `kernel × kernel` windows, no padding.
    MaxPool {
        /// Window side.
        kernel: u32,
        /// Step between windows. Default: `kernel` (non-overlapping).
        #[serde(default)]
        stride: Option<u32>,
    },
    /// Average pooling over `kernel × kernel` windows, no padding.
    AvgPool {
        /// Window side.
        kernel: u32,
        /// Step between windows. Default: `kernel` (non-overlapping).
        #[serde(default)]
        stride: Option<u32>,
    },
    /// Any shape → `[n]`, row-major (PyTorch's `flatten(1)`: channel, row,
    /// column).
    Flatten,
    /// `max(x, 0)`.
    Relu,
    /// `tanh(x)`.
    Tanh,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// GELU (the exact, erf form).
    Gelu,
    /// Inverted dropout while training (zeroes each value with probability
    /// `p`, scales the rest by `1/(1-p)`), the identity in evaluation and in
    /// zeroth-order (SPSA) loss evaluations. Its masks come from the
    /// client's seeded training stream, so training stays deterministic.
    Dropout {
        /// Drop probability, in `[0, 1)`.
        p: Probability,
    },
    /// Token ids `[seq] → [seq, dim]`; only as the first layer (the inputs
    /// are the ids: a sample's bytes).
    Embedding {
        /// Vocabulary size (ids are below it); at most [`MAX_VOCAB`].
        vocab: u32,
        /// Vector width.
        dim: u32,
    },
    /// One GRU layer (PyTorch's `nn.GRU` equations, gates r, z, n, zero
    /// initial state) over `[seq, dim]`, returning the last hidden state
    /// `[hidden]`.
    Gru {
        /// Hidden units.
        hidden: u32,
    },
}

impl LayerSpec {
    /// The name used in TOML (`type = "…"`) and in error messages.
    pub fn name(&self) -> &'static str {
        match self {
            LayerSpec::Linear { .. } => "linear",
            LayerSpec::Conv2d { .. } => "conv2d",
            LayerSpec::MaxPool { .. } => "max-pool",
            LayerSpec::AvgPool { .. } => "avg-pool",
            LayerSpec::Flatten => "flatten",
            LayerSpec::Relu => "relu",
            LayerSpec::Tanh => "tanh",
            LayerSpec::Sigmoid => "sigmoid",
            LayerSpec::Gelu => "gelu",
            LayerSpec::Dropout { .. } => "dropout",
            LayerSpec::Embedding { .. } => "embedding",
            LayerSpec::Gru { .. } => "gru",
        }
    }
}

/// What [`infer`] found: the shapes through the network and its tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inferred {
    /// Per-sample shape after each layer (`shapes[i]` is layer `i`'s output).
    pub shapes: Vec<Vec<usize>>,
    /// The parameter tensors in the canonical flat order.
    pub tensors: Vec<TensorSpec>,
    /// Total parameters.
    pub params: usize,
    /// Output classes (the last shape's only axis).
    pub classes: usize,
}

fn layer_err(index: usize, field: &'static str, reason: impl Into<String>) -> ModelError {
    // The layer's name is filled in by `infer`, which knows it.
    ModelError::Layer { index, layer: "", field, reason: reason.into() }
}

/// Output side of a window of `kernel` moved by `stride` over `side + 2·pad`.
fn window_out(index: usize, side: usize, kernel: u32, stride: u32, pad: u32) -> Result<usize, ModelError> {
    if kernel == 0 {
        return Err(layer_err(index, "kernel", "must be at least 1"));
    }
    if stride == 0 {
        return Err(layer_err(index, "stride", "must be at least 1"));
    }
    if kernel > MAX_WIDTH || stride > MAX_WIDTH {
        return Err(layer_err(index, "kernel", format!("kernel or stride above MAX_WIDTH ({MAX_WIDTH})")));
    }
    if pad >= kernel {
        return Err(layer_err(index, "padding", format!("{pad} is not below the kernel {kernel}")));
    }
    let padded = side + 2 * pad as usize;
    if (kernel as usize) > padded {
        return Err(layer_err(
            index,
            "kernel",
            format!("{kernel} is larger than the input side {side} (plus padding {pad} on each side)"),
        ));
    }
    Ok((padded - kernel as usize) / stride as usize + 1)
}

fn width(index: usize, field: &'static str, v: u32) -> Result<usize, ModelError> {
    if v == 0 {
        return Err(layer_err(index, field, "must be at least 1"));
    }
    if v > MAX_WIDTH {
        return Err(layer_err(index, field, format!("{v} is above MAX_WIDTH ({MAX_WIDTH})")));
    }
    Ok(v as usize)
}

fn rank(index: usize, layer: &LayerSpec, shape: &[usize], want: usize, what: &str) -> Result<(), ModelError> {
    if shape.len() == want {
        Ok(())
    } else {
        Err(layer_err(index, "type", format!("{} takes {what}, its input has shape {shape:?}", layer.name())))
    }
}

/// Walks the description: validates every layer against the shape it
/// receives and collects its parameter tensors. The only entry point that
/// trusts nothing, so every other use goes through it.
pub fn infer(input: &[u32], layers: &[LayerSpec]) -> Result<Inferred, ModelError> {
    if layers.is_empty() {
        return Err(ModelError::Input("a sequential network needs at least one layer".into()));
    }
    if layers.len() > MAX_LAYERS {
        return Err(ModelError::Input(format!("{} layers, more than MAX_LAYERS ({MAX_LAYERS})", layers.len())));
    }
    let embeds = matches!(layers.first(), Some(LayerSpec::Embedding { .. }));
    match (input.len(), embeds) {
        (1, _) | (3, false) => {}
        _ => {
            return Err(ModelError::Input(format!(
                "input {input:?}: expected [features], [channels, height, width], or [sequence] before an embedding"
            )));
        }
    }
    if let Some(&d) = input.iter().find(|&&d| d == 0 || d > MAX_WIDTH) {
        return Err(ModelError::Input(format!("input dimension {d} is not in 1..={MAX_WIDTH}")));
    }
    if embeds && input.first().is_some_and(|&s| s > MAX_SEQUENCE) {
        return Err(ModelError::Input(format!("sequence length above MAX_SEQUENCE ({MAX_SEQUENCE})")));
    }
    let numel = |s: &[usize]| s.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64));
    let mut shape: Vec<usize> = input.iter().map(|&d| d as usize).collect();
    if numel(&shape) > MAX_ACTIVATION {
        return Err(ModelError::Input(format!("input of {} values, above MAX_ACTIVATION", numel(&shape))));
    }
    let mut shapes = Vec::with_capacity(layers.len());
    let mut tensors = Vec::new();
    let mut params: u64 = 0;
    for (i, layer) in layers.iter().enumerate() {
        let (next, new) = infer_layer(i, layer, shape).map_err(|e| match e {
            ModelError::Layer { index, field, reason, .. } => {
                ModelError::Layer { index, layer: layer.name(), field, reason }
            }
            other => other,
        })?;
        shape = next;
        let size = numel(&shape);
        if size > MAX_ACTIVATION {
            let reason = format!("output {shape:?} holds {size} values, above MAX_ACTIVATION");
            return Err(ModelError::Layer { index: i, layer: layer.name(), field: "type", reason });
        }
        for spec in &new {
            // Each factor is at most MAX_WIDTH (2^20) or an activation side,
            // so u64 saturation is never reached before the limit trips.
            params = params.saturating_add(numel(&spec.shape));
        }
        if params > MAX_PARAMETERS as u64 {
            return Err(ModelError::TooLarge(usize::try_from(params).unwrap_or(usize::MAX)));
        }
        tensors.extend(new);
        shapes.push(shape.clone());
    }
    let [classes] = shape[..] else {
        return Err(ModelError::Layer {
            index: layers.len() - 1,
            layer: layers.last().map_or("", LayerSpec::name),
            field: "type",
            reason: format!("the last layer must output [classes], it outputs {shape:?} (add a flatten and a linear)"),
        });
    };
    // Bounded by MAX_PARAMETERS above, so it fits.
    Ok(Inferred { shapes, tensors, params: params as usize, classes })
}

/// One layer's output shape and parameter tensors, given its input shape.
fn infer_layer(i: usize, layer: &LayerSpec, shape: Vec<usize>) -> Result<(Vec<usize>, Vec<TensorSpec>), ModelError> {
    let t =
        |name: &str, shape: Vec<usize>, fan_in: usize| TensorSpec { name: format!("layers.{i}.{name}"), shape, fan_in };
    let mut new: Vec<TensorSpec> = Vec::new();
    let out = match *layer {
        LayerSpec::Linear { out } => {
            rank(i, layer, &shape, 1, "[features] (add a flatten before it)")?;
            let out = width(i, "out", out)?;
            let inp = shape[0];
            new.push(t("weight", vec![out, inp], inp));
            new.push(t("bias", vec![out], inp));
            vec![out]
        }
        LayerSpec::Conv2d { out, kernel, stride, padding } => {
            rank(i, layer, &shape, 3, "[channels, height, width]")?;
            let out = width(i, "out", out)?;
            let (c, h, w) = (shape[0], shape[1], shape[2]);
            let oh = window_out(i, h, kernel, stride, padding)?;
            let ow = window_out(i, w, kernel, stride, padding)?;
            let k = kernel as usize;
            new.push(t("weight", vec![out, c, k, k], c * k * k));
            new.push(t("bias", vec![out], c * k * k));
            vec![out, oh, ow]
        }
        LayerSpec::MaxPool { kernel, stride } | LayerSpec::AvgPool { kernel, stride } => {
            rank(i, layer, &shape, 3, "[channels, height, width]")?;
            let s = stride.unwrap_or(kernel);
            let (c, h, w) = (shape[0], shape[1], shape[2]);
            vec![c, window_out(i, h, kernel, s, 0)?, window_out(i, w, kernel, s, 0)?]
        }
        LayerSpec::Flatten => vec![shape.iter().product()],
        LayerSpec::Relu | LayerSpec::Tanh | LayerSpec::Sigmoid | LayerSpec::Gelu => shape,
        LayerSpec::Dropout { p } => {
            if !(p.0.is_finite() && (0.0..1.0).contains(&p.0)) {
                return Err(layer_err(i, "p", format!("{} is not in [0, 1)", p.0)));
            }
            shape
        }
        LayerSpec::Embedding { vocab, dim } => {
            if i != 0 {
                return Err(layer_err(i, "type", "an embedding takes token ids: only as the first layer"));
            }
            let vocab = width(i, "vocab", vocab)?;
            if vocab > MAX_VOCAB as usize {
                return Err(layer_err(i, "vocab", format!("{vocab} is above MAX_VOCAB ({MAX_VOCAB}): ids are bytes")));
            }
            let dim = width(i, "dim", dim)?;
            // PyTorch draws N(0, 1); fan-in 1 gives U(±1), one bounded
            // scheme for every tensor (as the built-in char-gru does).
            new.push(t("weight", vec![vocab, dim], 1));
            vec![shape[0], dim]
        }
        LayerSpec::Gru { hidden } => {
            rank(i, layer, &shape, 2, "[sequence, features] (after an embedding)")?;
            let h = width(i, "hidden", hidden)?;
            if shape[0] > MAX_SEQUENCE as usize {
                return Err(layer_err(i, "type", format!("sequence above MAX_SEQUENCE ({MAX_SEQUENCE})")));
            }
            let (g, d) = (3 * h, shape[1]);
            // PyTorch's init: U(±1/√hidden) for every GRU tensor.
            new.push(t("weight_ih_l0", vec![g, d], h));
            new.push(t("weight_hh_l0", vec![g, h], h));
            new.push(t("bias_ih_l0", vec![g], h));
            new.push(t("bias_hh_l0", vec![g], h));
            vec![h]
        }
    };
    Ok((out, new))
}

/// Per-sample input values the network takes (the product of `input`).
pub fn input_len(input: &[u32]) -> usize {
    input.iter().fold(1usize, |n, &d| n.saturating_mul(d as usize))
}

/// Whether `layers` begins with an embedding, i.e. takes token ids.
pub fn takes_ids(layers: &[LayerSpec]) -> Option<u32> {
    match layers.first() {
        Some(LayerSpec::Embedding { vocab, .. }) => Some(*vocab),
        _ => None,
    }
}

/// Named presets: the built-in networks written as descriptions. Each has
/// the same flat parameter layout (tensor shapes, order, fan-ins, so the
/// same initial parameters for a seed) and the same forward pass as its
/// built-in variant; only the tensor *names* differ (`layers.{i}` counts
/// every layer here). The built-in variants stay as they are so that runs
/// and model files made with them keep their bytes.
pub mod presets {
    use super::{LayerSpec, Probability};
    use crate::model::ModelArch;

    /// `ModelArch::Mlp { input, hidden, classes }` as a description.
    pub fn mlp(input: u32, hidden: &[u32], classes: u32) -> ModelArch {
        let mut layers = Vec::new();
        for &h in hidden {
            layers.push(LayerSpec::Linear { out: h });
            layers.push(LayerSpec::Relu);
        }
        layers.push(LayerSpec::Linear { out: classes });
        ModelArch::Sequential { input: vec![input], layers }
    }

    /// `ModelArch::LeNet5 { classes }` as a description (1×28×28 input).
    pub fn lenet5(classes: u32) -> ModelArch {
        use LayerSpec::*;
        let layers = vec![
            Conv2d { out: 6, kernel: 5, stride: 1, padding: 2 },
            Relu,
            MaxPool { kernel: 2, stride: None },
            Conv2d { out: 16, kernel: 5, stride: 1, padding: 0 },
            Relu,
            MaxPool { kernel: 2, stride: None },
            Flatten,
            Linear { out: 120 },
            Relu,
            Linear { out: 84 },
            Relu,
            Linear { out: classes },
        ];
        ModelArch::Sequential { input: vec![1, 28, 28], layers }
    }

    /// `ModelArch::CharGru { vocab, embed, hidden, seq }` as a description.
    pub fn char_gru(vocab: u32, embed: u32, hidden: u32, seq: u32) -> ModelArch {
        let layers = vec![
            LayerSpec::Embedding { vocab, dim: embed },
            LayerSpec::Gru { hidden },
            LayerSpec::Linear { out: vocab },
        ];
        ModelArch::Sequential { input: vec![seq], layers }
    }

    /// The preset of a built-in variant, if the layers can express it
    /// (FRL's networks have no biases, so they have none).
    pub fn of(arch: &ModelArch) -> Option<ModelArch> {
        match arch {
            ModelArch::Mlp { input, hidden, classes } => Some(mlp(*input, hidden, *classes)),
            ModelArch::LeNet5 { classes } => Some(lenet5(*classes)),
            ModelArch::CharGru { vocab, embed, hidden, seq } => Some(char_gru(*vocab, *embed, *hidden, *seq)),
            ModelArch::Supermask(_) | ModelArch::FrlDense(_) | ModelArch::Sequential { .. } | ModelArch::Custom(_) => {
                None
            }
        }
    }

    /// A dropout layer of probability `p` (for building descriptions in Rust).
    pub fn dropout(p: f32) -> LayerSpec {
        LayerSpec::Dropout { p: Probability(p) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::model::ModelArch;

    fn err(input: &[u32], layers: &[LayerSpec]) -> ModelError {
        infer(input, layers).unwrap_err()
    }

    #[test]
    fn lenet_shapes_and_params() {
        let ModelArch::Sequential { input, layers } = presets::lenet5(10) else { unreachable!() };
        let inf = infer(&input, &layers).unwrap();
        assert_eq!(inf.shapes[0], vec![6, 28, 28]);
        assert_eq!(inf.shapes[2], vec![6, 14, 14]);
        assert_eq!(inf.shapes[3], vec![16, 10, 10]);
        assert_eq!(inf.shapes[6], vec![400]);
        assert_eq!(inf.params, 61_706);
        assert_eq!(inf.classes, 10);
        assert_eq!(inf.tensors[0].name, "layers.0.weight");
        assert_eq!(inf.tensors[2].name, "layers.3.weight");
    }

    #[test]
    fn strides_padding_and_avg_pool() {
        use LayerSpec::*;
        let layers = [
            Conv2d { out: 4, kernel: 3, stride: 2, padding: 1 },
            AvgPool { kernel: 3, stride: Some(1) },
            Flatten,
            Linear { out: 2 },
        ];
        let inf = infer(&[3, 9, 7], &layers).unwrap();
        // (9 + 2 - 3) / 2 + 1 = 5, (7 + 2 - 3) / 2 + 1 = 4; then 3, 2.
        assert_eq!(inf.shapes[0], vec![4, 5, 4]);
        assert_eq!(inf.shapes[1], vec![4, 3, 2]);
        assert_eq!(inf.params, 4 * 3 * 9 + 4 + 2 * 24 + 2);
        assert_eq!(inf.tensors[0].fan_in, 27);
    }

    #[test]
    fn errors_name_the_layer_and_field() {
        use LayerSpec::*;
        let at = |e: ModelError| match e {
            ModelError::Layer { index, field, .. } => (index, field),
            other => panic!("{other}"),
        };
        // Linear on an image: wrong rank.
        assert_eq!(at(err(&[1, 28, 28], &[Linear { out: 10 }])), (0, "type"));
        // Kernel larger than the input.
        assert_eq!(at(err(&[1, 4, 4], &[Conv2d { out: 2, kernel: 5, stride: 1, padding: 0 }])), (0, "kernel"));
        // Pooling too large after a convolution.
        assert_eq!(
            at(err(
                &[1, 6, 6],
                &[Conv2d { out: 2, kernel: 3, stride: 1, padding: 0 }, MaxPool { kernel: 5, stride: None }]
            )),
            (1, "kernel")
        );
        assert_eq!(at(err(&[4], &[Linear { out: 0 }])), (0, "out"));
        assert_eq!(at(err(&[1, 8, 8], &[Conv2d { out: 2, kernel: 3, stride: 0, padding: 0 }])), (0, "stride"));
        assert_eq!(at(err(&[1, 8, 8], &[Conv2d { out: 2, kernel: 3, stride: 1, padding: 3 }])), (0, "padding"));
        assert_eq!(at(err(&[4], &[presets::dropout(1.0), Linear { out: 2 }])), (0, "p"));
        assert_eq!(at(err(&[4], &[presets::dropout(f32::NAN), Linear { out: 2 }])), (0, "p"));
        assert_eq!(at(err(&[4], &[Linear { out: 3 }, Embedding { vocab: 4, dim: 2 }])), (1, "type"));
        assert_eq!(at(err(&[4], &[Embedding { vocab: 300, dim: 2 }])), (0, "vocab"));
        assert_eq!(at(err(&[4], &[Gru { hidden: 3 }])), (0, "type"));
        // Ends on an image, not classes.
        assert_eq!(at(err(&[1, 8, 8], &[Relu])), (0, "type"));
        assert!(matches!(err(&[4], &[]), ModelError::Input(_)));
        assert!(matches!(err(&[1, 28], &[Linear { out: 2 }]), ModelError::Input(_)));
        assert!(matches!(err(&[0], &[Linear { out: 2 }]), ModelError::Input(_)));
        assert!(matches!(err(&[4], &vec![Relu; MAX_LAYERS + 1]), ModelError::Input(_)));
        assert!(matches!(err(&[4, 2, 2], &[Embedding { vocab: 4, dim: 2 }]), ModelError::Input(_)));
        // Too many parameters, and a small-parameter huge activation.
        assert!(matches!(err(&[1 << 20], &[Linear { out: 1 << 20 }]), ModelError::TooLarge(_)));
        assert_eq!(at(err(&[1, 1024, 1024], &[Conv2d { out: 64, kernel: 1, stride: 1, padding: 0 }])), (0, "type"));
        // The message says where and why.
        let e = err(&[1, 4, 4], &[Relu, Conv2d { out: 2, kernel: 5, stride: 1, padding: 0 }]);
        assert!(e.to_string().starts_with("layer 1 (conv2d), field kernel:"), "{e}");
    }

    #[test]
    fn toml_form_is_the_documented_one() {
        #[derive(Deserialize)]
        struct Cfg {
            model: ModelArch,
        }
        let text = r#"
model = { kind = "sequential", input = [1, 28, 28], layers = [
  { type = "conv2d", out = 8, kernel = 3, padding = 1 },
  { type = "relu" },
  { type = "max-pool", kernel = 2 },
  { type = "dropout", p = 0.25 },
  { type = "flatten" },
  { type = "linear", out = 10 },
] }
"#;
        let cfg: Cfg = toml::from_str(text).unwrap();
        let ModelArch::Sequential { input, layers } = &cfg.model else { panic!("{:?}", cfg.model) };
        assert_eq!(input, &vec![1, 28, 28]);
        assert_eq!(layers[0], LayerSpec::Conv2d { out: 8, kernel: 3, stride: 1, padding: 1 });
        assert_eq!(layers[2], LayerSpec::MaxPool { kernel: 2, stride: None });
        assert_eq!(layers[3], presets::dropout(0.25));
        cfg.model.validate().unwrap();
        assert_eq!(cfg.model.num_params(), 8 * 9 + 8 + 10 * 8 * 14 * 14 + 10);
        // A misspelt field is refused, not ignored.
        let bad = text.replace("kernel = 3", "kernal = 3");
        assert!(toml::from_str::<Cfg>(&bad).is_err());
        // Round trip through bincode (the run config's wire form).
        let bytes = bincode::encode_to_vec(&cfg.model, bincode::config::standard()).unwrap();
        let (back, _): (ModelArch, _) = bincode::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, cfg.model);
    }

    #[test]
    fn custom_layouts_parse_and_are_bounded() {
        use crate::model::{CustomArch, CustomTensor, MAX_CUSTOM_TENSORS};
        #[derive(Deserialize)]
        struct Cfg {
            model: ModelArch,
        }
        let text = r#"model = { kind = "custom", name = "my-net", input = 4, classes = 2, tensors = [
            { name = "w", shape = [4, 2], fan_in = 4 }, { name = "b", shape = [2], fan_in = 4 } ] }"#;
        let cfg: Cfg = toml::from_str(text).unwrap();
        cfg.model.validate().unwrap();
        assert_eq!(cfg.model.num_params(), 10);
        assert_eq!(cfg.model.classes(), 2);
        let t = |name: &str, shape: Vec<u32>| CustomTensor { name: name.into(), shape, fan_in: 1 };
        let arch = |name: &str, tensors: Vec<CustomTensor>| {
            ModelArch::Custom(CustomArch { name: name.into(), input: 4, classes: 2, tensors })
        };
        for bad in [
            arch("", vec![t("w", vec![2])]),
            arch("bad name", vec![t("w", vec![2])]),
            arch("n", vec![]),
            arch("n", vec![t("w", vec![2]), t("w", vec![2])]),
            arch("n", vec![t("w", vec![2, 2, 2, 2, 2])]),
            arch("n", vec![t("w", vec![0])]),
            arch("n", (0..=MAX_CUSTOM_TENSORS).map(|i| t(&format!("t{i}"), vec![1])).collect()),
        ] {
            assert!(matches!(bad.validate(), Err(ModelError::Input(_))), "{bad:?}");
        }
        let huge = arch("n", vec![t("w", vec![MAX_WIDTH, MAX_WIDTH])]);
        assert!(matches!(huge.validate(), Err(ModelError::TooLarge(_))));
    }

    fn any_u32() -> impl proptest::strategy::Strategy<Value = u32> {
        use proptest::prelude::*;
        prop_oneof![0u32..6, 0u32..40, Just(MAX_WIDTH), Just(MAX_WIDTH + 1), Just(u32::MAX)]
    }

    fn any_layer() -> impl proptest::strategy::Strategy<Value = LayerSpec> {
        use proptest::prelude::*;
        prop_oneof![
            any_u32().prop_map(|out| LayerSpec::Linear { out }),
            (any_u32(), any_u32(), any_u32(), any_u32()).prop_map(|(out, kernel, stride, padding)| LayerSpec::Conv2d {
                out,
                kernel,
                stride,
                padding
            }),
            (any_u32(), proptest::option::of(any_u32()))
                .prop_map(|(kernel, stride)| LayerSpec::MaxPool { kernel, stride }),
            (any_u32(), proptest::option::of(any_u32()))
                .prop_map(|(kernel, stride)| LayerSpec::AvgPool { kernel, stride }),
            Just(LayerSpec::Flatten),
            Just(LayerSpec::Relu),
            Just(LayerSpec::Gelu),
            prop_oneof![Just(0.5f32), Just(-1.0), Just(f32::NAN), Just(1.0)].prop_map(presets::dropout),
            (any_u32(), any_u32()).prop_map(|(vocab, dim)| LayerSpec::Embedding { vocab, dim }),
            any_u32().prop_map(|hidden| LayerSpec::Gru { hidden }),
        ]
    }

    proptest::proptest! {
        /// Any description, however hostile, is accepted or refused with a
        /// typed error, never a panic or an overflow; an accepted one is
        /// within every limit and its tensors add up to its count.
        #[test]
        fn arbitrary_descriptions_never_panic(
            input in proptest::collection::vec(any_u32(), 0..5),
            layers in proptest::collection::vec(any_layer(), 0..8),
        ) {
            if let Ok(inf) = infer(&input, &layers) {
                proptest::prop_assert!(inf.params <= MAX_PARAMETERS);
                let sum: usize = inf.tensors.iter().map(TensorSpec::numel).sum();
                proptest::prop_assert_eq!(sum, inf.params);
                proptest::prop_assert!(inf.shapes.iter().all(|s| s.iter().product::<usize>() as u64 <= MAX_ACTIVATION));
                let arch = ModelArch::Sequential { input: input.clone(), layers: layers.clone() };
                proptest::prop_assert_eq!(arch.num_params(), inf.params);
            }
        }
    }

    #[test]
    fn presets_have_the_builtin_layout_and_init() {
        for builtin in [
            ModelArch::mnist_mlp(),
            ModelArch::Mlp { input: 5, hidden: vec![], classes: 3 },
            ModelArch::LeNet5 { classes: 10 },
            ModelArch::CharGru { vocab: 81, embed: 8, hidden: 16, seq: 80 },
        ] {
            let preset = presets::of(&builtin).unwrap();
            preset.validate().unwrap();
            let shapes = |a: &ModelArch| a.tensors().into_iter().map(|t| (t.shape, t.fan_in)).collect::<Vec<_>>();
            assert_eq!(shapes(&preset), shapes(&builtin), "{builtin:?}");
            assert_eq!(preset.classes(), builtin.classes());
            assert_eq!(preset.init_params(42), builtin.init_params(42), "{builtin:?}");
        }
    }
}
