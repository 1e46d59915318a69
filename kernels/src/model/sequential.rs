//! The burn module of a `ModelArch::Sequential` description: any network
//! `tally_protocol::sequential::infer` accepts, built from the flat
//! parameters and run layer by layer.
//!
//! Inputs are the trainer's `[batch, values]` tensor, reshaped to the
//! description's input (`[batch, c, h, w]` for images). A network whose first
//! layer is an embedding reads its values as token ids, `round(x · 255)` (the
//! dataset's bytes, as [`super::CharGru`] does), clamped below the
//! vocabulary.
//!
//! Dropout is applied only by [`Sequential::forward_train`], with masks drawn
//! from a [`DropoutRng`] the trainer seeds from the round's training seed:
//! training stays a pure function of its inputs, and every forward-only pass
//! (evaluation, SPSA's loss evaluations) is the identity for dropout, so
//! replicas of an SPSA client compute the same losses.

use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::nn::pool::{AvgPool2d, MaxPool2d};
use burn::nn::{Embedding, Linear, PaddingConfig2d};
use burn::tensor::activation::{gelu, relu, sigmoid};
use burn::tensor::{Int, Tensor, TensorData};
use rand::Rng;
use rand_chacha::ChaCha20Rng;
use tally_protocol::sequential::LayerSpec;

/// The generator of dropout masks: ChaCha20 keyed by the round's training
/// seed and `"tallydrop"` ([`tally_protocol::rng::keyed_chacha20`]),
/// consumed one `u32` per activation value, layer by layer, step by step.
#[derive(Debug)]
pub struct DropoutRng(ChaCha20Rng);

impl DropoutRng {
    /// The stream of training seed `seed`.
    pub fn new(seed: u64) -> Self {
        DropoutRng(tally_protocol::rng::keyed_chacha20(seed, b"tallydrop"))
    }

    /// `n` mask values: 0 with probability `p`, else `1 / (1 - p)`.
    fn mask(&mut self, n: usize, p: f32) -> Vec<f32> {
        let keep = 1.0 / (1.0 - p);
        // u / 2^32 is uniform in [0, 1) with 32 bits, exactly in f64.
        (0..n).map(|_| if f64::from(self.0.next_u32()) / 4_294_967_296.0 < f64::from(p) { 0.0 } else { keep }).collect()
    }
}

/// One GRU layer's parameters, stored transposed for `x W` products (see
/// [`super::CharGru`], whose equations it shares through [`gru_last`]).
#[derive(Module, Debug)]
pub struct GruLayer {
    /// `[dim, 3·hidden]` (PyTorch's `weight_ih_l0` transposed).
    pub w_ih: Param<Tensor<2>>,
    /// `[hidden, 3·hidden]` (`weight_hh_l0` transposed).
    pub w_hh: Param<Tensor<2>>,
    /// `[3·hidden]`.
    pub b_ih: Param<Tensor<1>>,
    /// `[3·hidden]`.
    pub b_hh: Param<Tensor<1>>,
}

/// The last hidden state `[batch, hidden]` of a GRU over `emb: [batch, seq,
/// dim]`, zero initial state, PyTorch's equations (gates r, z, n).
pub(crate) fn gru_last(
    emb: Tensor<3>,
    w_ih: Tensor<2>,
    w_hh: Tensor<2>,
    b_ih: Tensor<1>,
    b_hh: Tensor<1>,
) -> Tensor<2> {
    let [batch, seq, embed] = emb.dims();
    let [_, h3] = w_hh.dims();
    let hidden = h3 / 3;
    let device = emb.device();
    let b_ih = b_ih.unsqueeze_dim::<2>(0);
    let b_hh = b_hh.unsqueeze_dim::<2>(0);
    let mut h: Tensor<2> = Tensor::zeros([batch, hidden], &device);
    for t in 0..seq {
        let x_t = emb.clone().slice([0..batch, t..t + 1, 0..embed]).reshape([batch, embed]);
        let gi = x_t.matmul(w_ih.clone()) + b_ih.clone();
        let gh = h.clone().matmul(w_hh.clone()) + b_hh.clone();
        let part = |g: &Tensor<2>, k: usize| g.clone().slice([0..batch, k * hidden..(k + 1) * hidden]);
        let r = sigmoid(part(&gi, 0) + part(&gh, 0));
        let z = sigmoid(part(&gi, 1) + part(&gh, 1));
        let n = (part(&gi, 2) + r * part(&gh, 2)).tanh();
        // h' = (1 − z) n + z h = n + z (h − n)
        h = n.clone() + z * (h - n);
    }
    h
}

/// A network of `ModelArch::Sequential`: the parameterised layers by kind,
/// in order, and the description that interleaves them.
#[derive(Module, Debug)]
pub struct Sequential {
    /// The linear layers, in order.
    pub linears: Vec<Linear>,
    /// The convolutions, in order.
    pub convs: Vec<Conv2d>,
    /// The embedding (at most one, the first layer).
    pub embeds: Vec<Embedding>,
    /// The GRU layers, in order.
    pub grus: Vec<GruLayer>,
    /// The per-sample input shape.
    #[module(skip)]
    pub input: Vec<u32>,
    /// The layers, validated by shape inference before the module is built.
    #[module(skip)]
    pub layers: Vec<LayerSpec>,
}

/// An activation with its batch axis: per-sample rank 1, 2 or 3.
enum Act {
    Flat(Tensor<2>),
    Seq(Tensor<3>),
    Image(Tensor<4>),
}

/// Applies an element-wise function at whatever rank the activation has.
macro_rules! elementwise {
    ($a:expr, $f:expr) => {
        match $a {
            Act::Flat(t) => Act::Flat($f(t)),
            Act::Seq(t) => Act::Seq($f(t)),
            Act::Image(t) => Act::Image($f(t)),
        }
    };
}

fn pool_stride(kernel: u32, stride: Option<u32>) -> [usize; 2] {
    let s = stride.unwrap_or(kernel) as usize;
    [s, s]
}

impl Sequential {
    /// Logits `[batch, classes]` for `x: [batch, values]`, dropout off.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.run(x, None)
    }

    /// Logits with dropout on, masks from `drop`.
    pub fn forward_train(&self, x: Tensor<2>, drop: &mut DropoutRng) -> Tensor<2> {
        self.run(x, Some(drop))
    }

    fn run(&self, x: Tensor<2>, mut drop: Option<&mut DropoutRng>) -> Tensor<2> {
        let [batch, _] = x.dims();
        let (mut linears, mut convs, mut embeds, mut grus) =
            (self.linears.iter(), self.convs.iter(), self.embeds.iter(), self.grus.iter());
        let mut a = match self.input[..] {
            [c, h, w] => Act::Image(x.reshape([batch, c as usize, h as usize, w as usize])),
            _ => Act::Flat(x),
        };
        // Every combination below that doesn't match is one shape inference
        // refused before this module could be built; such a layer leaves the
        // activation as it is rather than panic.
        for layer in &self.layers {
            a = match (layer, a) {
                (LayerSpec::Linear { .. }, Act::Flat(t)) => match linears.next() {
                    Some(l) => Act::Flat(l.forward(t)),
                    None => Act::Flat(t),
                },
                (LayerSpec::Conv2d { .. }, Act::Image(t)) => match convs.next() {
                    Some(c) => Act::Image(c.forward(t)),
                    None => Act::Image(t),
                },
                (LayerSpec::MaxPool { kernel, stride }, Act::Image(t)) => {
                    let k = *kernel as usize;
                    let pool = MaxPool2d {
                        stride: pool_stride(*kernel, *stride),
                        kernel_size: [k, k],
                        padding: PaddingConfig2d::Valid,
                        dilation: [1, 1],
                        ceil_mode: false,
                    };
                    Act::Image(pool.forward(t))
                }
                (LayerSpec::AvgPool { kernel, stride }, Act::Image(t)) => {
                    let k = *kernel as usize;
                    let pool = AvgPool2d {
                        stride: pool_stride(*kernel, *stride),
                        kernel_size: [k, k],
                        padding: PaddingConfig2d::Valid,
                        count_include_pad: true,
                        ceil_mode: false,
                    };
                    Act::Image(pool.forward(t))
                }
                (LayerSpec::Flatten, Act::Flat(t)) => Act::Flat(t),
                (LayerSpec::Flatten, Act::Seq(t)) => Act::Flat(t.flatten(1, 2)),
                (LayerSpec::Flatten, Act::Image(t)) => Act::Flat(t.flatten(1, 3)),
                (LayerSpec::Relu, a) => elementwise!(a, relu),
                (LayerSpec::Tanh, a) => elementwise!(a, |t: Tensor<_>| t.tanh()),
                (LayerSpec::Sigmoid, a) => elementwise!(a, sigmoid),
                (LayerSpec::Gelu, a) => elementwise!(a, gelu),
                (LayerSpec::Dropout { p }, a) => match drop.as_deref_mut() {
                    Some(rng) if p.0 > 0.0 => {
                        macro_rules! dropped {
                            ($t:expr) => {{
                                let t = $t;
                                let dims = t.dims();
                                let n = dims.iter().product();
                                let mask = Tensor::from_data(TensorData::new(rng.mask(n, p.0), dims), &t.device());
                                t * mask
                            }};
                        }
                        match a {
                            Act::Flat(t) => Act::Flat(dropped!(t)),
                            Act::Seq(t) => Act::Seq(dropped!(t)),
                            Act::Image(t) => Act::Image(dropped!(t)),
                        }
                    }
                    _ => a,
                },
                (LayerSpec::Embedding { vocab, .. }, Act::Flat(t)) => match embeds.next() {
                    Some(e) => {
                        // Back to exact ids (see `CharGru`); clamped so a
                        // hostile byte can't index past the table (training
                        // and evaluation refuse such data first).
                        let top = i64::from(vocab.saturating_sub(1));
                        let ids: Tensor<2, Int> = t.mul_scalar(255.0).round().int().clamp(0, top);
                        Act::Seq(e.forward(ids))
                    }
                    None => Act::Flat(t),
                },
                (LayerSpec::Gru { .. }, Act::Seq(t)) => match grus.next() {
                    Some(g) => Act::Flat(gru_last(t, g.w_ih.val(), g.w_hh.val(), g.b_ih.val(), g.b_hh.val())),
                    None => Act::Seq(t),
                },
                (_, a) => a,
            };
        }
        match a {
            Act::Flat(t) => t,
            // Unreachable for a validated description (it ends on [classes]).
            Act::Seq(t) => t.flatten(1, 2),
            Act::Image(t) => t.flatten(1, 3),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::{Model, read_tensor};
    use super::*;
    use crate::data::Dataset;
    use crate::train::{TrainConfig, cpu_device, train_local};
    use tally_protocol::model::ModelArch;
    use tally_protocol::sequential::{Probability, presets};

    fn seq(input: &[u32], layers: Vec<LayerSpec>) -> ModelArch {
        ModelArch::Sequential { input: input.to_vec(), layers }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// A custom CNN that is none of the presets: strided, padded conv,
    /// average pooling, GELU, dropout.
    fn custom_cnn() -> ModelArch {
        use LayerSpec::*;
        seq(
            &[1, 28, 28],
            vec![
                Conv2d { out: 4, kernel: 3, stride: 2, padding: 1 },
                Gelu,
                AvgPool { kernel: 2, stride: None },
                Conv2d { out: 6, kernel: 3, stride: 1, padding: 0 },
                Tanh,
                MaxPool { kernel: 2, stride: Some(1) },
                Flatten,
                Dropout { p: Probability(0.2) },
                Linear { out: 16 },
                Sigmoid,
                Linear { out: 10 },
            ],
        )
    }

    #[test]
    fn flat_round_trip_is_bit_exact() {
        use LayerSpec::*;
        let device = cpu_device();
        for arch in [
            custom_cnn(),
            presets::lenet5(10),
            presets::mlp(784, &[32, 16], 10),
            presets::char_gru(11, 3, 5, 7),
            seq(&[6], vec![Embedding { vocab: 9, dim: 4 }, Gru { hidden: 3 }, Relu, Linear { out: 9 }]),
        ] {
            arch.validate().unwrap();
            let p = arch.init_params(11);
            let m = Model::from_flat(&arch, &p, &device).unwrap();
            assert_eq!(bits(&m.to_flat().unwrap()), bits(&p), "{arch:?}");
            assert_eq!(m.num_params(), arch.num_params(), "{arch:?}");
            let m = Model::from_flat(&arch, &p, &device.clone().autodiff()).unwrap();
            assert_eq!(bits(&m.to_flat().unwrap()), bits(&p), "{arch:?}");
        }
        // Wrong length and invalid descriptions are refused, not panicked on.
        let arch = custom_cnn();
        let p = arch.init_params(1);
        assert!(Model::from_flat(&arch, &p[1..], &device).is_err());
        let bad = seq(&[1, 4, 4], vec![Linear { out: 2 }]);
        assert!(Model::from_flat(&bad, &[], &device).is_err());
    }

    /// `[1, 4, 4]` → conv(2, k3, s1, p1) → ReLU → avg-pool 2 → flatten →
    /// linear 3 → tanh → linear 2 → sigmoid, computed by hand in f64.
    #[test]
    fn forward_matches_hand_computation() {
        use LayerSpec::*;
        let device = cpu_device();
        let arch = seq(
            &[1, 4, 4],
            vec![
                Conv2d { out: 2, kernel: 3, stride: 1, padding: 1 },
                Relu,
                AvgPool { kernel: 2, stride: None },
                Flatten,
                Linear { out: 3 },
                Tanh,
                Linear { out: 2 },
                Sigmoid,
            ],
        );
        let n = arch.num_params();
        assert_eq!(n, 2 * 9 + 2 + 3 * 8 + 3 + 2 * 3 + 2);
        // Asymmetric values so a transposed or mis-ordered tensor shows.
        let p: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) / 13.0).collect();
        let x: Vec<f32> = (0..16).map(|i| ((i * 7 % 16) as f32) / 15.0).collect();
        let model = Model::from_flat(&arch, &p, &device).unwrap();
        let got = read_tensor(model.forward(Tensor::from_data(TensorData::new(x.clone(), [1, 16]), &device))).unwrap();

        let p: Vec<f64> = p.iter().map(|&v| f64::from(v)).collect();
        let (cw, rest) = p.split_at(18);
        let (cb, rest) = rest.split_at(2);
        let (w1, rest) = rest.split_at(24);
        let (b1, rest) = rest.split_at(3);
        let (w2, b2) = rest.split_at(6);
        let px = |r: i64, c: i64| {
            if (0..4).contains(&r) && (0..4).contains(&c) { f64::from(x[(r * 4 + c) as usize]) } else { 0.0 }
        };
        let mut conv = vec![0f64; 2 * 16];
        for o in 0..2 {
            for r in 0..4i64 {
                for c in 0..4i64 {
                    let mut s = cb[o];
                    for kr in 0..3i64 {
                        for kc in 0..3i64 {
                            s += cw[o * 9 + (kr * 3 + kc) as usize] * px(r + kr - 1, c + kc - 1);
                        }
                    }
                    conv[o * 16 + (r * 4 + c) as usize] = s.max(0.0);
                }
            }
        }
        let mut pooled = [0f64; 8];
        for o in 0..2 {
            for r in 0..2 {
                for c in 0..2 {
                    let at = |dr: usize, dc: usize| conv[o * 16 + (2 * r + dr) * 4 + 2 * c + dc];
                    pooled[o * 4 + r * 2 + c] = (at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1)) / 4.0;
                }
            }
        }
        let h: Vec<f64> =
            (0..3).map(|o| (b1[o] + (0..8).map(|i| w1[o * 8 + i] * pooled[i]).sum::<f64>()).tanh()).collect();
        let want: Vec<f64> = (0..2)
            .map(|o| 1.0 / (1.0 + (-(b2[o] + (0..3).map(|i| w2[o * 3 + i] * h[i]).sum::<f64>())).exp()))
            .collect();
        assert_eq!(got.len(), 2);
        for (g, w) in got.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "burn {g} vs hand {w}");
        }
    }

    /// The presets are the built-in networks: same flat layout (so the same
    /// parameters load into both) and the same logits, bit for bit.
    #[test]
    fn presets_forward_like_the_builtin_models() {
        let device = cpu_device();
        for builtin in [
            ModelArch::Mlp { input: 784, hidden: vec![24, 16], classes: 10 },
            ModelArch::LeNet5 { classes: 10 },
            ModelArch::CharGru { vocab: 7, embed: 3, hidden: 5, seq: 784 },
        ] {
            let preset = presets::of(&builtin).unwrap();
            let p = builtin.init_params(5);
            assert_eq!(bits(&preset.init_params(5)), bits(&p));
            let x: Vec<f32> = (0..2 * 784).map(|i| ((i * 31 % 7) as f32) / 255.0).collect();
            let run = |arch: &ModelArch| {
                let m = Model::from_flat(arch, &p, &device).unwrap();
                read_tensor(m.forward(Tensor::from_data(TensorData::new(x.clone(), [2, 784]), &device))).unwrap()
            };
            assert_eq!(bits(&run(&preset)), bits(&run(&builtin)), "{builtin:?}");
        }
    }

    fn tiny_images(n: usize) -> Dataset {
        // Two classes by brightness, with a deterministic texture.
        let pixels = (0..n * 784).map(|i| ((i * 7919 % 97) + if (i / 784) % 2 == 1 { 120 } else { 0 }) as u8).collect();
        Dataset::new(28, 28, pixels, (0..n).map(|i| (i % 2) as u8).collect(), 10).unwrap()
    }

    #[test]
    fn training_with_dropout_is_deterministic_and_learns() {
        let device = cpu_device();
        let arch = custom_cnn();
        let data = tiny_images(64);
        let p0 = arch.init_params(3);
        let cfg = TrainConfig::sgd(0.1, 16, 3, 7);
        let (a, ra) = train_local(&arch, &p0, &data, &cfg, &device).unwrap();
        let (b, rb) = train_local(&arch, &p0, &data, &cfg, &device).unwrap();
        assert_eq!(bits(&a), bits(&b));
        assert_eq!(ra, rb);
        // The same network without dropout trains to other values: the masks
        // are really applied in training.
        let ModelArch::Sequential { input, mut layers } = arch.clone() else { unreachable!() };
        layers[7] = LayerSpec::Dropout { p: Probability(0.0) };
        let no_drop = ModelArch::Sequential { input, layers };
        let (c, _) = train_local(&no_drop, &p0, &data, &cfg, &device).unwrap();
        assert_ne!(bits(&a), bits(&c));
        // It learns the two classes.
        let before = crate::train::evaluate(&arch, &p0, &data, &device, 64).unwrap();
        let after = crate::train::evaluate(&arch, &a, &data, &device, 64).unwrap();
        assert!(after.loss_sum < before.loss_sum, "{before:?} → {after:?}");
    }

    #[test]
    fn dropout_masks_drop_p_and_scale_the_rest() {
        let m = DropoutRng::new(5).mask(10_000, 0.25);
        let zeros = m.iter().filter(|&&v| v == 0.0).count();
        // Binomial(10000, 0.25): mean 2500, sd 43.
        assert!((2300..2700).contains(&zeros), "{zeros} zeros");
        assert!(m.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
        assert_eq!(m, DropoutRng::new(5).mask(10_000, 0.25));
        assert_ne!(m, DropoutRng::new(6).mask(10_000, 0.25));
    }

    #[test]
    fn dropout_is_off_outside_training() {
        let device = cpu_device();
        let arch = seq(&[8], vec![presets::dropout(0.5), LayerSpec::Linear { out: 3 }]);
        let p = arch.init_params(2);
        let m = Model::from_flat(&arch, &p, &device).unwrap();
        let x = || Tensor::from_data(TensorData::new(vec![0.5f32; 16], [2, 8]), &device);
        let eval = read_tensor(m.forward(x())).unwrap();
        let no_drop = seq(&[8], vec![LayerSpec::Linear { out: 3 }]);
        let plain = read_tensor(Model::from_flat(&no_drop, &p, &device).unwrap().forward(x())).unwrap();
        assert_eq!(bits(&eval), bits(&plain));
        let mut rng = DropoutRng::new(1);
        let train = read_tensor(m.forward_train(x(), &mut rng)).unwrap();
        assert_ne!(bits(&train), bits(&eval));
        let again = read_tensor(m.forward_train(x(), &mut DropoutRng::new(1))).unwrap();
        assert_eq!(bits(&train), bits(&again));
    }

    #[test]
    fn image_size_and_token_checks() {
        use super::super::{check_image_size, check_inputs};
        assert!(check_image_size(&custom_cnn(), 28, 28).is_ok());
        assert!(check_image_size(&custom_cnn(), 14, 56).is_err());
        assert!(check_image_size(&presets::mlp(784, &[], 10), 14, 56).is_ok());
        let gru = presets::char_gru(7, 3, 5, 2);
        let bad = Dataset::new(1, 2, vec![0, 7], vec![1], 7).unwrap();
        assert!(check_inputs(&gru, &bad).is_err());
        assert!(check_inputs(&custom_cnn(), &bad).is_ok());
    }
}
