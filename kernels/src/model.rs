//! burn modules for each `ModelArch`, and their conversion to and from the
//! canonical flat parameter vector.
//!
//! The flat order and layouts are PyTorch's (see `tally_protocol::model`).
//! burn's `Linear` stores its weight as `[in, out]` (it computes `x W + b`),
//! the transpose of PyTorch's `[out, in]`, so [`Model::from_flat`] and
//! [`Model::to_flat`] transpose every linear weight; convolution weights are
//! `[out, in, kh, kw]` in both and are copied as they are.
//!
//! Every model takes images flattened to `[batch, rows * cols]` with pixels
//! scaled to `[0, 1]` (`pixel / 255`) and returns logits `[batch, classes]`;
//! LeNet-5 reshapes to `[batch, 1, 28, 28]` itself.
//!
//! The character model ([`CharGru`]) takes the same tensor, but its "pixels"
//! are character ids (a text window stored as a one-row image, see
//! `data::shakespeare`): its forward turns `id / 255` back into the exact
//! integer id (`round(x · 255)`; the f32 error of `id / 255 · 255` is below
//! 1e-4, far from the 0.5 that would change the rounding). So the trainer,
//! the batcher and the evaluation stay the same code for images and text,
//! and MNIST runs are untouched.

use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{Embedding, Linear, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use tally_protocol::model::{ModelArch, ModelError};
use tally_protocol::sequential::LayerSpec;

use crate::KernelError;

pub mod sequential;
pub use sequential::{DropoutRng, GruLayer, Sequential};

/// LeNet-5's input side (it is defined for 28×28 images only).
pub const LENET_SIDE: usize = 28;

/// A `Linear → ReLU → … → Linear` network (no activation after the last layer).
#[derive(Module, Debug)]
pub struct Mlp {
    /// The layers, input side first.
    pub layers: Vec<Linear>,
}

impl Mlp {
    /// Logits for `x: [batch, input]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len().saturating_sub(1);
        let mut x = x;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                x = relu(x);
            }
        }
        x
    }
}

/// LeNet-5 as described on `ModelArch::LeNet5`.
#[derive(Module, Debug)]
pub struct LeNet5 {
    /// 1→6 channels, 5×5, padding 2 (keeps 28×28).
    pub conv1: Conv2d,
    /// 6→16 channels, 5×5, no padding (14×14 → 10×10).
    pub conv2: Conv2d,
    /// 2×2 max pooling, stride 2 (used after both convolutions).
    pub pool: MaxPool2d,
    /// 400 → 120.
    pub fc1: Linear,
    /// 120 → 84.
    pub fc2: Linear,
    /// 84 → classes.
    pub fc3: Linear,
}

impl LeNet5 {
    /// Logits for `x: [batch, 784]` (28×28 images, row-major).
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [batch, _] = x.dims();
        let x = x.reshape([batch, 1, LENET_SIDE, LENET_SIDE]);
        let x = self.pool.forward(relu(self.conv1.forward(x)));
        let x = self.pool.forward(relu(self.conv2.forward(x)));
        // [batch, 16, 5, 5] → [batch, 400] in (channel, row, col) order, as
        // PyTorch's `flatten(1)` does, so fc1's weights mean the same thing.
        let x = x.reshape([batch, 16 * 5 * 5]);
        let x = relu(self.fc1.forward(x));
        let x = relu(self.fc2.forward(x));
        self.fc3.forward(x)
    }
}

/// The character-level GRU of `ModelArch::CharGru`: embedding → one GRU
/// layer (PyTorch's equations and gate order r, z, n) → linear head on the
/// last hidden state.
///
/// Per step, with `x_t` the embedded character and `h` the state (zeros at
/// the start): `r = σ(W_ir x + b_ir + W_hr h + b_hr)`, `z = σ(W_iz x + b_iz +
/// W_hz h + b_hz)`, `n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`,
/// `h' = (1 − z) ⊙ n + z ⊙ h`.
#[derive(Module, Debug)]
pub struct CharGru {
    /// `[vocab, embed]`.
    pub embed: Embedding,
    /// Input weights, stored `[embed, 3·hidden]` (PyTorch's `weight_ih_l0` transposed).
    pub w_ih: Param<Tensor<2>>,
    /// Recurrent weights, stored `[hidden, 3·hidden]` (`weight_hh_l0` transposed).
    pub w_hh: Param<Tensor<2>>,
    /// `[3·hidden]`.
    pub b_ih: Param<Tensor<1>>,
    /// `[3·hidden]`.
    pub b_hh: Param<Tensor<1>>,
    /// `hidden → vocab`.
    pub out: Linear,
}

impl CharGru {
    /// Logits `[batch, vocab]` for `x: [batch, seq]` holding `id / 255`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [vocab, _] = self.embed.weight.dims();
        // Back to exact ids; clamped so that a hostile byte can never index
        // past the table (training and evaluation refuse such data first,
        // with a typed error: `check_inputs`).
        let ids: Tensor<2, Int> = x.mul_scalar(255.0).round().int().clamp(0, vocab.saturating_sub(1) as i64);
        let emb = self.embed.forward(ids); // [batch, seq, embed]
        let h = sequential::gru_last(emb, self.w_ih.val(), self.w_hh.val(), self.b_ih.val(), self.b_hh.val());
        self.out.forward(h)
    }
}

/// One of FRL's networks with dense, trainable weights (FRL's baselines;
/// `ModelArch::FrlDense`): the supermask network's exact forward
/// ([`crate::supermask`]'s layer code) with the weights themselves as
/// parameters instead of `frozen weight × mask`.
#[derive(Module, Debug)]
pub struct FrlDense {
    /// Convolution weights `[out, in, 3, 3]`, in layer order.
    convs: Vec<Param<Tensor<4>>>,
    /// Linear weights `[out, in]` (PyTorch's layout, used as is), in layer order.
    linears: Vec<Param<Tensor<2>>>,
    /// The layers, for the forward's shapes and pooling.
    #[module(skip)]
    net: tally_protocol::supermask::FrlArch,
}

impl FrlDense {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let layers = self.net.layers();
        let (mut c, mut l) = (self.convs.iter(), self.linears.iter());
        let weights: Vec<crate::supermask::LayerTensor> = layers
            .iter()
            .filter_map(|layer| match layer.kind {
                tally_protocol::supermask::LayerKind::Conv3x3 => {
                    c.next().map(|w| crate::supermask::LayerTensor::Conv(w.val()))
                }
                tally_protocol::supermask::LayerKind::Linear => {
                    l.next().map(|w| crate::supermask::LayerTensor::Linear(w.val()))
                }
            })
            .collect();
        crate::supermask::forward(&layers, self.net.input_shape(), x, &weights)
    }
}

/// A model of any supported architecture.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant, reason = "one model per training call; boxing buys nothing")]
pub enum Model {
    /// See [`Mlp`].
    Mlp(Mlp),
    /// See [`LeNet5`].
    LeNet5(LeNet5),
    /// See [`CharGru`].
    CharGru(CharGru),
    /// See [`FrlDense`].
    FrlDense(FrlDense),
    /// See [`Sequential`].
    Sequential(Sequential),
}

/// Number of pixels per image `arch` takes, and a human description of it.
pub fn input_size(arch: &ModelArch) -> (usize, String) {
    match arch {
        ModelArch::Mlp { input, .. } => (*input as usize, input.to_string()),
        ModelArch::LeNet5 { .. } => (LENET_SIDE * LENET_SIDE, format!("1x{LENET_SIDE}x{LENET_SIDE}")),
        ModelArch::Supermask(net) => {
            let (c, side) = net.input_shape();
            (c.saturating_mul(side).saturating_mul(side), format!("{c}x{side}x{side}"))
        }
        ModelArch::CharGru { seq, .. } => (*seq as usize, format!("1x{seq} character ids")),
        ModelArch::FrlDense(net) => {
            let (c, side) = net.input_shape();
            (c.saturating_mul(side).saturating_mul(side), format!("{c}x{side}x{side}"))
        }
        ModelArch::Sequential { input, layers } => {
            let dims: Vec<String> = input.iter().map(u32::to_string).collect();
            let ids = if tally_protocol::sequential::takes_ids(layers).is_some() { " token ids" } else { "" };
            (tally_protocol::sequential::input_len(input), format!("{}{ids}", dims.join("x")))
        }
        ModelArch::Custom(c) => (c.input as usize, c.input.to_string()),
    }
}

/// Checks that `rows × cols` images fit `arch`.
pub fn check_image_size(arch: &ModelArch, rows: usize, cols: usize) -> Result<(), KernelError> {
    let (expected, arch_input) = input_size(arch);
    let ok = match arch {
        ModelArch::Mlp { .. } => rows.checked_mul(cols) == Some(expected),
        ModelArch::LeNet5 { .. } => rows == LENET_SIDE && cols == LENET_SIDE,
        ModelArch::Supermask(net) | ModelArch::FrlDense(net) => {
            let (c, side) = net.input_shape();
            c == 1 && rows == side && cols == side
        }
        ModelArch::CharGru { seq, .. } => rows == 1 && cols == *seq as usize,
        // Images: `[c, h, w]` takes `c·h` rows of `w` (one channel: the
        // image as it is); anything else takes any `rows × cols` of the
        // right count, read row-major.
        ModelArch::Sequential { input, .. } => match input[..] {
            [c, h, w] => rows == (c as usize).saturating_mul(h as usize) && cols == w as usize,
            _ => rows.checked_mul(cols) == Some(expected),
        },
        ModelArch::Custom(_) => rows.checked_mul(cols) == Some(expected),
    };
    if ok { Ok(()) } else { Err(KernelError::ImageSize { arch_input, expected, rows, cols }) }
}

/// Checks the inputs' values fit `arch`: for [`ModelArch::CharGru`] and a
/// sequential network that starts with an embedding every byte is a token
/// id below the vocabulary (images take any byte).
pub fn check_inputs(arch: &ModelArch, data: &crate::data::Dataset) -> Result<(), KernelError> {
    let vocab = match arch {
        ModelArch::CharGru { vocab, .. } => Some(*vocab),
        ModelArch::Sequential { layers, .. } => tally_protocol::sequential::takes_ids(layers),
        _ => None,
    };
    // Token ids and the supermask models' native path read bytes: real
    // values (CSV, float arrays) have no meaning there.
    let bytes_only = vocab.is_some() || matches!(arch, ModelArch::Supermask(_) | ModelArch::FrlDense(_));
    if bytes_only && data.is_real() {
        return Err(KernelError::InvalidConfig(
            "this model takes 8-bit inputs (images or token ids); the dataset holds real-valued features".into(),
        ));
    }
    if let Some(vocab) = vocab
        && let Some(index) = data.pixels.iter().position(|&p| u32::from(p) >= vocab)
    {
        return Err(KernelError::InvalidConfig(format!(
            "character id {} at byte {index} of the inputs is not below the model's vocabulary of {vocab}",
            data.pixels.get(index).copied().unwrap_or_default()
        )));
    }
    Ok(())
}

fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// `[rows, cols]` row-major → `[cols, rows]` row-major.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; m.len()];
    for (r, row) in m.chunks_exact(cols.max(1)).enumerate().take(rows) {
        for (c, &v) in row.iter().enumerate() {
            if let Some(slot) = out.get_mut(c * rows + r) {
                *slot = v;
            }
        }
    }
    out
}

/// Hands out consecutive slices of the flat vector, one tensor at a time.
struct FlatReader<'a> {
    rest: &'a [f32],
}

impl<'a> FlatReader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [f32], KernelError> {
        if self.rest.len() < n {
            // Unreachable after `check_params`, kept so a mismatch between
            // `tensors()` and the modules below is an error, not a panic.
            return Err(ModelError::InvalidArch("parameter layout shorter than the module").into());
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// A burn `Linear` from PyTorch's `weight [out, in]` then `bias [out]`.
    fn linear(&mut self, input: usize, output: usize, device: &Device) -> Result<Linear, KernelError> {
        let w = self.take(output * input)?;
        let b = self.take(output)?;
        Ok(Linear {
            weight: Param::from_tensor(tensor(transpose(w, output, input), [input, output], device)),
            bias: Some(Param::from_tensor(tensor(b.to_vec(), [output], device))),
        })
    }

    /// A burn `Conv2d` (stride 1, no dilation, one group) from `weight
    /// [out, in, k, k]` then `bias [out]`.
    fn conv(
        &mut self,
        input: usize,
        output: usize,
        k: usize,
        pad: usize,
        device: &Device,
    ) -> Result<Conv2d, KernelError> {
        self.conv_strided(input, output, k, 1, pad, device)
    }

    /// [`FlatReader::conv`] with a stride.
    fn conv_strided(
        &mut self,
        input: usize,
        output: usize,
        k: usize,
        stride: usize,
        pad: usize,
        device: &Device,
    ) -> Result<Conv2d, KernelError> {
        let w = self.take(output * input * k * k)?;
        let b = self.take(output)?;
        Ok(Conv2d {
            weight: Param::from_tensor(tensor(w.to_vec(), [output, input, k, k], device)),
            bias: Some(Param::from_tensor(tensor(b.to_vec(), [output], device))),
            stride: [stride, stride],
            kernel_size: [k, k],
            dilation: [1, 1],
            groups: 1,
            padding: PaddingConfig2d::Explicit(pad, pad, pad, pad),
        })
    }
}

pub(crate) fn read_tensor<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, KernelError> {
    t.try_into_data()
        .map_err(|e| KernelError::Backend(e.to_string()))?
        .try_into_vec::<f32>()
        .map_err(|e| KernelError::Backend(format!("{e:?}")))
}

fn write_linear(out: &mut Vec<f32>, l: &Linear) -> Result<(), KernelError> {
    let [input, output] = l.weight.dims();
    out.extend(transpose(&read_tensor(l.weight.val())?, input, output));
    match &l.bias {
        Some(b) => out.extend(read_tensor(b.val())?),
        None => out.extend(std::iter::repeat_n(0.0, output)),
    }
    Ok(())
}

fn write_conv(out: &mut Vec<f32>, c: &Conv2d) -> Result<(), KernelError> {
    out.extend(read_tensor(c.weight.val())?);
    match &c.bias {
        Some(b) => out.extend(read_tensor(b.val())?),
        None => out.extend(std::iter::repeat_n(0.0, c.weight.dims()[0])),
    }
    Ok(())
}

impl Model {
    /// Builds the model for `arch` on `device` from the flat parameters
    /// (canonical order, PyTorch layouts). Refuses an invalid architecture and
    /// parameters of the wrong length or with NaN/infinity.
    ///
    /// On an autodiff device every parameter is trainable.
    pub fn from_flat(arch: &ModelArch, params: &[f32], device: &Device) -> Result<Model, KernelError> {
        arch.validate()?;
        arch.check_params(params)?;
        let mut r = FlatReader { rest: params };
        let model = match arch {
            ModelArch::Mlp { input, hidden, classes } => {
                let mut layers = Vec::with_capacity(hidden.len() + 1);
                let mut prev = *input as usize;
                for &h in hidden.iter().chain(std::iter::once(classes)) {
                    layers.push(r.linear(prev, h as usize, device)?);
                    prev = h as usize;
                }
                Model::Mlp(Mlp { layers })
            }
            ModelArch::Supermask(_) => {
                return Err(ModelError::InvalidArch("a supermask network is trained by crate::supermask").into());
            }
            ModelArch::Custom(_) => {
                return Err(ModelError::InvalidArch("a custom model is run by its registered implementation").into());
            }
            ModelArch::FrlDense(net) => {
                let (mut convs, mut linears) = (Vec::new(), Vec::new());
                for layer in net.layers() {
                    let shape = layer.shape();
                    let w = r.take(layer.edges())?.to_vec();
                    match layer.kind {
                        tally_protocol::supermask::LayerKind::Conv3x3 => {
                            convs.push(Param::from_tensor(tensor(w, [shape[0], shape[1], shape[2], shape[3]], device)));
                        }
                        tally_protocol::supermask::LayerKind::Linear => {
                            linears.push(Param::from_tensor(tensor(w, [shape[0], shape[1]], device)));
                        }
                    }
                }
                Model::FrlDense(FrlDense { convs, linears, net: *net })
            }
            ModelArch::CharGru { vocab, embed, hidden, .. } => {
                let (v, e, h) = (*vocab as usize, *embed as usize, *hidden as usize);
                let emb = r.take(v * e)?;
                let w_ih = r.take(3 * h * e)?;
                let w_hh = r.take(3 * h * h)?;
                let b_ih = r.take(3 * h)?;
                let b_hh = r.take(3 * h)?;
                Model::CharGru(CharGru {
                    embed: Embedding { weight: Param::from_tensor(tensor(emb.to_vec(), [v, e], device)) },
                    w_ih: Param::from_tensor(tensor(transpose(w_ih, 3 * h, e), [e, 3 * h], device)),
                    w_hh: Param::from_tensor(tensor(transpose(w_hh, 3 * h, h), [h, 3 * h], device)),
                    b_ih: Param::from_tensor(tensor(b_ih.to_vec(), [3 * h], device)),
                    b_hh: Param::from_tensor(tensor(b_hh.to_vec(), [3 * h], device)),
                    out: r.linear(h, v, device)?,
                })
            }
            ModelArch::Sequential { input, layers } => {
                let shapes = tally_protocol::sequential::infer(input, layers)?.shapes;
                let mut m = Sequential {
                    linears: Vec::new(),
                    convs: Vec::new(),
                    embeds: Vec::new(),
                    grus: Vec::new(),
                    input: input.clone(),
                    layers: layers.clone(),
                };
                let input_shape: Vec<usize> = input.iter().map(|&d| d as usize).collect();
                for (i, layer) in layers.iter().enumerate() {
                    // The shape this layer receives (validated above).
                    let inp = if i == 0 { &input_shape } else { &shapes[i - 1] };
                    let fan = inp.first().copied().unwrap_or(0);
                    match *layer {
                        LayerSpec::Linear { out } => m.linears.push(r.linear(fan, out as usize, device)?),
                        LayerSpec::Conv2d { out, kernel, stride, padding } => m.convs.push(r.conv_strided(
                            fan,
                            out as usize,
                            kernel as usize,
                            stride as usize,
                            padding as usize,
                            device,
                        )?),
                        LayerSpec::Embedding { vocab, dim } => {
                            let (v, e) = (vocab as usize, dim as usize);
                            let w = r.take(v * e)?;
                            m.embeds.push(Embedding { weight: Param::from_tensor(tensor(w.to_vec(), [v, e], device)) });
                        }
                        LayerSpec::Gru { hidden } => {
                            let (h, e) = (hidden as usize, inp.get(1).copied().unwrap_or(0));
                            let w_ih = r.take(3 * h * e)?;
                            let w_hh = r.take(3 * h * h)?;
                            let b_ih = r.take(3 * h)?;
                            let b_hh = r.take(3 * h)?;
                            m.grus.push(GruLayer {
                                w_ih: Param::from_tensor(tensor(transpose(w_ih, 3 * h, e), [e, 3 * h], device)),
                                w_hh: Param::from_tensor(tensor(transpose(w_hh, 3 * h, h), [h, 3 * h], device)),
                                b_ih: Param::from_tensor(tensor(b_ih.to_vec(), [3 * h], device)),
                                b_hh: Param::from_tensor(tensor(b_hh.to_vec(), [3 * h], device)),
                            });
                        }
                        LayerSpec::MaxPool { .. }
                        | LayerSpec::AvgPool { .. }
                        | LayerSpec::Flatten
                        | LayerSpec::Relu
                        | LayerSpec::Tanh
                        | LayerSpec::Sigmoid
                        | LayerSpec::Gelu
                        | LayerSpec::Dropout { .. } => {}
                    }
                }
                Model::Sequential(m)
            }
            ModelArch::LeNet5 { classes } => Model::LeNet5(LeNet5 {
                conv1: r.conv(1, 6, 5, 2, device)?,
                conv2: r.conv(6, 16, 5, 0, device)?,
                pool: MaxPool2d {
                    stride: [2, 2],
                    kernel_size: [2, 2],
                    padding: PaddingConfig2d::Valid,
                    dilation: [1, 1],
                    ceil_mode: false,
                },
                fc1: r.linear(400, 120, device)?,
                fc2: r.linear(120, 84, device)?,
                fc3: r.linear(84, *classes as usize, device)?,
            }),
        };
        if !r.rest.is_empty() {
            return Err(ModelError::InvalidArch("parameter layout longer than the module").into());
        }
        Ok(model)
    }

    /// The parameters as a flat vector in the canonical order.
    pub fn to_flat(&self) -> Result<Vec<f32>, KernelError> {
        let mut out = Vec::with_capacity(self.num_params());
        match self {
            Model::Mlp(m) => {
                for l in &m.layers {
                    write_linear(&mut out, l)?;
                }
            }
            Model::LeNet5(m) => {
                write_conv(&mut out, &m.conv1)?;
                write_conv(&mut out, &m.conv2)?;
                for l in [&m.fc1, &m.fc2, &m.fc3] {
                    write_linear(&mut out, l)?;
                }
            }
            Model::CharGru(m) => {
                out.extend(read_tensor(m.embed.weight.val())?);
                let [e, h3] = m.w_ih.dims();
                out.extend(transpose(&read_tensor(m.w_ih.val())?, e, h3));
                let [h, _] = m.w_hh.dims();
                out.extend(transpose(&read_tensor(m.w_hh.val())?, h, h3));
                out.extend(read_tensor(m.b_ih.val())?);
                out.extend(read_tensor(m.b_hh.val())?);
                write_linear(&mut out, &m.out)?;
            }
            Model::FrlDense(m) => {
                // Layer order interleaves convolutions and linears: walk the spec.
                let (mut c, mut l) = (m.convs.iter(), m.linears.iter());
                for layer in m.net.layers() {
                    match layer.kind {
                        tally_protocol::supermask::LayerKind::Conv3x3 => {
                            if let Some(w) = c.next() {
                                out.extend(read_tensor(w.val())?);
                            }
                        }
                        tally_protocol::supermask::LayerKind::Linear => {
                            if let Some(w) = l.next() {
                                out.extend(read_tensor(w.val())?);
                            }
                        }
                    }
                }
            }
            Model::Sequential(m) => {
                let (mut linears, mut convs, mut embeds, mut grus) =
                    (m.linears.iter(), m.convs.iter(), m.embeds.iter(), m.grus.iter());
                for layer in &m.layers {
                    match layer {
                        LayerSpec::Linear { .. } => {
                            if let Some(l) = linears.next() {
                                write_linear(&mut out, l)?;
                            }
                        }
                        LayerSpec::Conv2d { .. } => {
                            if let Some(c) = convs.next() {
                                write_conv(&mut out, c)?;
                            }
                        }
                        LayerSpec::Embedding { .. } => {
                            if let Some(e) = embeds.next() {
                                out.extend(read_tensor(e.weight.val())?);
                            }
                        }
                        LayerSpec::Gru { .. } => {
                            if let Some(g) = grus.next() {
                                let [e, h3] = g.w_ih.dims();
                                out.extend(transpose(&read_tensor(g.w_ih.val())?, e, h3));
                                let [h, _] = g.w_hh.dims();
                                out.extend(transpose(&read_tensor(g.w_hh.val())?, h, h3));
                                out.extend(read_tensor(g.b_ih.val())?);
                                out.extend(read_tensor(g.b_hh.val())?);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(out)
    }

    /// Logits `[batch, classes]` for images `[batch, pixels]` scaled to `[0, 1]`.
    /// Dropout layers are the identity here (evaluation, SPSA's losses).
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Model::Mlp(m) => m.forward(x),
            Model::LeNet5(m) => m.forward(x),
            Model::CharGru(m) => m.forward(x),
            Model::FrlDense(m) => m.forward(x),
            Model::Sequential(m) => m.forward(x),
        }
    }

    /// The training forward: [`Model::forward`] with dropout on (only a
    /// sequential network has dropout layers; for every other model this is
    /// exactly `forward`, and `drop` is not touched).
    pub fn forward_train(&self, x: Tensor<2>, drop: &mut DropoutRng) -> Tensor<2> {
        match self {
            Model::Sequential(m) => m.forward_train(x, drop),
            other => other.forward(x),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::train::cpu_device;

    #[test]
    fn flat_round_trip_is_bit_exact() {
        let device = cpu_device();
        for arch in [
            ModelArch::Mlp { input: 784, hidden: vec![100], classes: 10 },
            ModelArch::Mlp { input: 5, hidden: vec![4, 3, 7], classes: 2 },
            ModelArch::LeNet5 { classes: 10 },
            ModelArch::FrlDense(tally_protocol::supermask::FrlArch::MNIST_LENET),
            ModelArch::FrlDense(tally_protocol::supermask::FrlArch::Conv4 { channels: 1, side: 8, classes: 3 }),
        ] {
            let p = arch.init_params(11);
            let m = Model::from_flat(&arch, &p, &device).unwrap();
            let back = m.to_flat().unwrap();
            assert_eq!(back.len(), p.len());
            assert!(back.iter().zip(&p).all(|(a, b)| a.to_bits() == b.to_bits()), "{arch:?}");
            assert_eq!(m.num_params(), arch.num_params(), "{arch:?}");
            // Also on an autodiff device.
            let m = Model::from_flat(&arch, &p, &device.clone().autodiff()).unwrap();
            assert_eq!(m.to_flat().unwrap(), p);
        }
    }

    #[test]
    fn from_flat_rejects_bad_params() {
        let device = cpu_device();
        let arch = ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 };
        let mut p = arch.init_params(1);
        assert!(matches!(
            Model::from_flat(&arch, &p[1..], &device),
            Err(KernelError::Model(ModelError::WrongLength { .. }))
        ));
        p[3] = f32::NAN;
        assert!(matches!(
            Model::from_flat(&arch, &p, &device),
            Err(KernelError::Model(ModelError::NonFinite { index: 3 }))
        ));
        let bad = ModelArch::Mlp { input: 4, hidden: vec![0], classes: 2 };
        assert!(Model::from_flat(&bad, &[], &device).is_err());
    }

    /// Plain-Rust forward pass of an MLP from PyTorch-layout flat parameters:
    /// `y = W x + b` with `W [out, in]`, ReLU between layers.
    fn reference_mlp(arch: &ModelArch, p: &[f32], x: &[f32]) -> Vec<f32> {
        let specs = arch.tensors();
        let mut off = 0;
        let mut act = x.to_vec();
        let layers = specs.len() / 2;
        for l in 0..layers {
            let (out, inp) = (specs[2 * l].shape[0], specs[2 * l].shape[1]);
            let w = &p[off..off + out * inp];
            off += out * inp;
            let b = &p[off..off + out];
            off += out;
            let mut y = vec![0f64; out];
            for o in 0..out {
                let mut s = b[o] as f64;
                for i in 0..inp {
                    s += w[o * inp + i] as f64 * act[i] as f64;
                }
                y[o] = if l + 1 < layers { s.max(0.0) } else { s };
            }
            act = y.into_iter().map(|v| v as f32).collect();
        }
        act
    }

    #[test]
    fn mlp_forward_matches_hand_computation() {
        let device = cpu_device();
        let arch = ModelArch::Mlp { input: 6, hidden: vec![5, 4], classes: 3 };
        // Non-symmetric weights so a missing or extra transpose shows.
        let p: Vec<f32> = (0..arch.num_params()).map(|i| ((i * 37 % 23) as f32 - 11.0) / 13.0).collect();
        let model = Model::from_flat(&arch, &p, &device).unwrap();
        let batch = 2;
        let x: Vec<f32> = (0..batch * 6).map(|i| (i as f32 * 0.37).sin()).collect();
        let out = model.forward(Tensor::from_data(TensorData::new(x.clone(), [batch, 6]), &device));
        assert_eq!(out.dims(), [batch, 3]);
        let got = read_tensor(out).unwrap();
        for b in 0..batch {
            let want = reference_mlp(&arch, &p, &x[b * 6..(b + 1) * 6]);
            for (g, w) in got[b * 3..(b + 1) * 3].iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "sample {b}: burn {g} vs reference {w}");
            }
        }
    }

    /// One LeNet output computed by hand for a single image and compared with
    /// burn: proves the conv weight layout, the padding and the flatten order.
    #[test]
    fn lenet_forward_matches_hand_computation() {
        let device = cpu_device();
        let arch = ModelArch::LeNet5 { classes: 10 };
        let p = arch.init_params(5);
        let model = Model::from_flat(&arch, &p, &device).unwrap();
        let x: Vec<f32> = (0..784).map(|i| ((i * 31 % 255) as f32) / 255.0).collect();
        let got = read_tensor(model.forward(Tensor::from_data(TensorData::new(x.clone(), [1, 784]), &device))).unwrap();

        let mut off = 0;
        let mut take = |n: usize| {
            let s = &p[off..off + n];
            off += n;
            s
        };
        let (c1w, c1b) = (take(150), take(6));
        let (c2w, c2b) = (take(2400), take(16));
        let (f1w, f1b) = (take(48000), take(120));
        let (f2w, f2b) = (take(10080), take(84));
        let (f3w, f3b) = (take(840), take(10));
        // conv(x: [cin, h, w]) with [cout, cin, k, k] weights, given padding.
        let conv = |x: &[f64], cin: usize, h: usize, w: &[f32], b: &[f32], cout: usize, pad: usize| {
            let oh = h + 2 * pad - 4;
            let mut y = vec![0f64; cout * oh * oh];
            for co in 0..cout {
                for r in 0..oh {
                    for c in 0..oh {
                        let mut s = b[co] as f64;
                        for ci in 0..cin {
                            for kr in 0..5 {
                                for kc in 0..5 {
                                    let (ir, ic) = (r + kr, c + kc);
                                    if ir < pad || ic < pad || ir - pad >= h || ic - pad >= h {
                                        continue;
                                    }
                                    s += w[((co * cin + ci) * 5 + kr) * 5 + kc] as f64
                                        * x[(ci * h + ir - pad) * h + ic - pad];
                                }
                            }
                        }
                        y[(co * oh + r) * oh + c] = s.max(0.0);
                    }
                }
            }
            (y, oh)
        };
        let pool = |x: &[f64], ch: usize, h: usize| {
            let oh = h / 2;
            let mut y = vec![0f64; ch * oh * oh];
            for c in 0..ch {
                for r in 0..oh {
                    for q in 0..oh {
                        let at = |dr: usize, dq: usize| x[(c * h + 2 * r + dr) * h + 2 * q + dq];
                        y[(c * oh + r) * oh + q] = at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
                    }
                }
            }
            y
        };
        let fc = |x: &[f64], w: &[f32], b: &[f32], relu: bool| {
            let (out, inp) = (b.len(), x.len());
            (0..out)
                .map(|o| {
                    let s = b[o] as f64 + (0..inp).map(|i| w[o * inp + i] as f64 * x[i]).sum::<f64>();
                    if relu { s.max(0.0) } else { s }
                })
                .collect::<Vec<f64>>()
        };
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let (a, h) = conv(&x64, 1, 28, c1w, c1b, 6, 2);
        assert_eq!(h, 28);
        let a = pool(&a, 6, 28);
        let (a, h) = conv(&a, 6, 14, c2w, c2b, 16, 0);
        assert_eq!(h, 10);
        let a = pool(&a, 16, 10);
        let a = fc(&a, f1w, f1b, true);
        let a = fc(&a, f2w, f2b, true);
        let want = fc(&a, f3w, f3b, false);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-4, "burn {g} vs reference {w}");
        }
    }

    /// PyTorch's GRU equations in plain f64 over the flat (PyTorch-layout)
    /// parameters: proves the gate order, the transposes and the head.
    fn reference_char_gru(arch: &ModelArch, p: &[f32], ids: &[u8]) -> Vec<f64> {
        let ModelArch::CharGru { vocab, embed, hidden, .. } = *arch else { unreachable!() };
        let (v, e, h) = (vocab as usize, embed as usize, hidden as usize);
        let p: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let (emb, rest) = p.split_at(v * e);
        let (w_ih, rest) = rest.split_at(3 * h * e);
        let (w_hh, rest) = rest.split_at(3 * h * h);
        let (b_ih, rest) = rest.split_at(3 * h);
        let (b_hh, rest) = rest.split_at(3 * h);
        let (w_out, b_out) = rest.split_at(v * h);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let mut state = vec![0f64; h];
        for &id in ids {
            let x = &emb[id as usize * e..(id as usize + 1) * e];
            let gi: Vec<f64> =
                (0..3 * h).map(|j| b_ih[j] + (0..e).map(|k| w_ih[j * e + k] * x[k]).sum::<f64>()).collect();
            let gh: Vec<f64> =
                (0..3 * h).map(|j| b_hh[j] + (0..h).map(|k| w_hh[j * h + k] * state[k]).sum::<f64>()).collect();
            state = (0..h)
                .map(|j| {
                    let r = sig(gi[j] + gh[j]);
                    let z = sig(gi[h + j] + gh[h + j]);
                    let n = (gi[2 * h + j] + r * gh[2 * h + j]).tanh();
                    (1.0 - z) * n + z * state[j]
                })
                .collect();
        }
        (0..v).map(|o| b_out[o] + (0..h).map(|k| w_out[o * h + k] * state[k]).sum::<f64>()).collect()
    }

    #[test]
    fn char_gru_forward_matches_hand_computation() {
        let device = cpu_device();
        let arch = ModelArch::CharGru { vocab: 7, embed: 3, hidden: 5, seq: 6 };
        let p = arch.init_params(9);
        let model = Model::from_flat(&arch, &p, &device).unwrap();
        assert_eq!(model.to_flat().unwrap(), p);
        assert_eq!(model.num_params(), arch.num_params());
        let windows: [[u8; 6]; 2] = [[0, 1, 2, 3, 4, 5], [6, 6, 0, 3, 1, 2]];
        // The trainer's encoding: id / 255.
        let x: Vec<f32> = windows.iter().flatten().map(|&b| b as f32 / 255.0).collect();
        let out = model.forward(Tensor::from_data(TensorData::new(x, [2, 6]), &device));
        assert_eq!(out.dims(), [2, 7]);
        let got = read_tensor(out).unwrap();
        for (b, w) in windows.iter().enumerate() {
            let want = reference_char_gru(&arch, &p, w);
            for (g, r) in got[b * 7..(b + 1) * 7].iter().zip(&want) {
                assert!((*g as f64 - r).abs() < 1e-5, "window {b}: burn {g} vs reference {r}");
            }
        }
        // Shape checks: one row of `seq` ids.
        assert!(check_image_size(&arch, 1, 6).is_ok());
        assert!(check_image_size(&arch, 1, 7).is_err());
        assert!(check_image_size(&arch, 2, 3).is_err());
    }

    #[test]
    fn char_gru_refuses_ids_beyond_its_vocabulary() {
        let arch = ModelArch::CharGru { vocab: 7, embed: 3, hidden: 5, seq: 2 };
        let ok = crate::data::Dataset::new(1, 2, vec![0, 6], vec![1], 7).unwrap();
        assert!(check_inputs(&arch, &ok).is_ok());
        let bad = crate::data::Dataset::new(1, 2, vec![0, 7], vec![1], 7).unwrap();
        assert!(matches!(check_inputs(&arch, &bad), Err(KernelError::InvalidConfig(_))));
        // Images take any byte.
        assert!(check_inputs(&ModelArch::mnist_mlp(), &bad).is_ok());
        // The forward itself never indexes past the table.
        let device = cpu_device();
        let model = Model::from_flat(&arch, &arch.init_params(1), &device).unwrap();
        let x = Tensor::from_data(TensorData::new(vec![1.0f32, 0.9], [1, 2]), &device);
        assert_eq!(model.forward(x).dims(), [1, 7]);
    }

    #[test]
    fn image_size_checks() {
        assert!(check_image_size(&ModelArch::mnist_mlp(), 28, 28).is_ok());
        assert!(check_image_size(&ModelArch::mnist_mlp(), 28, 27).is_err());
        assert!(check_image_size(&ModelArch::LeNet5 { classes: 10 }, 28, 28).is_ok());
        assert!(matches!(
            check_image_size(&ModelArch::LeNet5 { classes: 10 }, 14, 56),
            Err(KernelError::ImageSize { .. })
        ));
    }
}
