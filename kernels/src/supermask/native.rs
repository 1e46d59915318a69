//! Native CPU training and evaluation of FRL supermask networks: forward,
//! backward and SGD update written out for the layer types of
//! [`FrlArch`](super::FrlArch) (3×3 convolution with padding 1, ReLU, 2×2 max
//! pooling, linear, softmax cross-entropy), single-threaded.
//!
//! It computes the same function as the burn path ([`Supermask::train_burn`],
//! [`Supermask::evaluate_scores_burn`]): same sample order, learning rates,
//! mask rule ([`MaskThreshold`]), straight-through gradient and SGD formula
//! ([`straight_through`], `Trainer::update`). Only the order of the sums in
//! the convolutions and matrix products differs, so results agree up to f32
//! rounding. The tests below check this against burn.
//!
//! # Determinism
//!
//! Every sum runs in a fixed order that depends only on the layer shapes, not
//! on the batch composition or the CPU: each kernel vectorises across
//! independent outputs (lanes never get summed in a data-dependent order),
//! and the fused multiply-adds are written as [`f32::mul_add`], which is
//! exact-fused with or without the FMA instruction. [`pulp::Arch`] picks
//! AVX2+FMA code once per kernel call where the CPU has it; the scalar
//! fallback computes bit-identical results, only slower. No threads.
//!
//! # Layouts and why
//!
//! * Convolution inputs are channels-last with a zero border,
//!   `[b][side+2][side+2][c]`: the 9 taps are then fixed offsets, and a tap of
//!   one position reads a contiguous channel vector.
//! * Convolution outputs (pre-activation) are channels-last `[b][side][side][o]`.
//!   The forward pass is a register-tiled product (4 positions × 16 output
//!   channels per tile).
//! * After a max pool, only the arg-max of each 2×2 window gets a gradient,
//!   and ReLU zeroes about half of those: the gradient at such a layer's
//!   output is stored sparsely (per position and per output channel), and the
//!   weight and input gradients loop over the non-zeros only (≈1/8 of a dense
//!   backward pass).
//! * Linear layers never materialise `W_eff` in training. Each edge has a
//!   code byte ([`Codes`]: weight sign, mask bit), so the forward pass reads
//!   1 byte per edge; the backward pass of a linear layer is fused with the
//!   SGD update of its scores, with the search for the next step's mask
//!   threshold ([`Window`]) and with writing the next mask bits: one pass
//!   over the 1.6 M scores of LeNet's fc1 per step.
//! * Each layer's scores are updated as soon as its gradient is known; the
//!   lower layers only use the activations and the old (pre-update) effective
//!   weights of the layers above, which the fused passes read before they
//!   write, so the result is the same as updating all layers at the end.

use pulp::Arch;

use super::{FrlTrainConfig, FrlTrainReport, LayerKind, MaskThreshold, Supermask, mask_threshold, straight_through};
use crate::KernelError;
use crate::data::Dataset;
use crate::train::{EvalReport, train_rng};

/// f32 lanes of one AVX2 register: the accumulator width of the kernels.
const LANES: usize = 8;
/// Samples per group in the linear forward pass (one accumulator each).
const GROUP: usize = 8;
/// Output positions per convolution tile (eight AVX2 registers).
const CT: usize = 64;
/// Inputs per block of the linear kernels (a block of 8 input rows is 32 KB).
const LIN_BLOCK: usize = 512;
/// Elements per block of the fused linear backward/update pass.
const FUSED_BLOCK: usize = 64;
/// Samples per chunk in evaluation (bounds memory; results don't depend on it).
const EVAL_CHUNK: usize = 32;

/// One layer as the kernels see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// 3×3 convolution, padding 1, on `side`×`side` maps; `pool`: 2×2 max
    /// pooling (stride 2, floor) after it.
    Conv { cin: usize, cout: usize, side: usize, pool: bool },
    /// Fully connected.
    Linear { inputs: usize, outputs: usize },
}

impl Stage {
    /// Floats per sample of this layer's input buffer.
    fn input_len(&self) -> usize {
        match *self {
            Stage::Conv { cin, side, .. } => (side + 2) * (side + 2) * cin,
            Stage::Linear { inputs, .. } => inputs,
        }
    }

    /// Floats per sample of this layer's pre-activation output.
    fn output_len(&self) -> usize {
        match *self {
            Stage::Conv { cout, side, .. } => cout * conv_plane(side),
            Stage::Linear { outputs, .. } => outputs,
        }
    }

    /// Floats per sample of the gradient w.r.t. this layer's input (unpadded).
    fn input_grad_len(&self) -> usize {
        match *self {
            Stage::Conv { cin, side, .. } => side * side * cin,
            Stage::Linear { inputs, .. } => inputs,
        }
    }
}

/// The network as a list of [`Stage`]s, checked for consistency.
fn plan(net: &Supermask) -> Result<Vec<Stage>, KernelError> {
    let (mut channels, mut side) = net.config.arch.input_shape();
    let mut flat: Option<usize> = None;
    let mut stages = Vec::with_capacity(net.layers.len());
    let bad = |m: &str| Err(KernelError::InvalidConfig(format!("native supermask kernels: {m}")));
    for spec in &net.layers {
        match spec.kind {
            LayerKind::Conv3x3 => {
                if flat.is_some() || spec.inputs != channels {
                    return bad("a convolution after a linear layer, or channel mismatch");
                }
                stages.push(Stage::Conv { cin: spec.inputs, cout: spec.outputs, side, pool: spec.pool_after });
                channels = spec.outputs;
                if spec.pool_after {
                    side /= 2;
                }
            }
            LayerKind::Linear => {
                let width = flat.unwrap_or(channels * side * side);
                if spec.inputs != width {
                    return bad("linear input width does not match the previous layer");
                }
                stages.push(Stage::Linear { inputs: spec.inputs, outputs: spec.outputs });
                flat = Some(spec.outputs);
            }
        }
    }
    match stages.last() {
        Some(Stage::Linear { outputs, .. }) if *outputs == net.config.arch.classes() => Ok(stages),
        _ => bad("the last layer must be linear with one output per class"),
    }
}

/// The mask rule of [`MaskThreshold`] in a form that vectorises: 32-bit
/// compares only. Keys of finite scores are `≤ 0x7fff_ffff` and layer indices
/// `< u32::MAX` (checked by `FrlArch::validate`), so clamping `NONE`'s index
/// to `u32::MAX` keeps its meaning (nothing kept).
#[derive(Clone, Copy, Debug)]
struct Keep {
    key: u32,
    index: u32,
    threshold: MaskThreshold,
}

impl Keep {
    fn new(t: MaskThreshold) -> Self {
        Keep { key: t.key, index: u32::try_from(t.index).unwrap_or(u32::MAX), threshold: t }
    }

    #[inline(always)]
    fn keeps(self, score: f32, index: u32) -> bool {
        let k = score.to_bits() & 0x7fff_ffff;
        (k > self.key) | ((k == self.key) & (index >= self.index))
    }

    /// `w` if the edge is kept, else 0 (branch-free: half the edges are
    /// kept in no predictable pattern, and this must vectorise).
    #[inline(always)]
    fn apply(self, score: f32, index: u32, w: f32) -> f32 {
        let all = u32::from(self.keeps(score, index)).wrapping_neg();
        f32::from_bits(w.to_bits() & all)
    }
}

/// Settings of one SGD step (see `Trainer::update`).
#[derive(Clone, Copy, Debug)]
struct Sgd {
    lr: f32,
    wd: f32,
    mu: f32,
    first: bool,
}

/// PyTorch's SGD step on a block of scores, exactly `Trainer::update`.
#[inline(always)]
fn sgd_block(s: &mut [f32], buf: &mut [f32], w: &[f32], g: &[f32], p: Sgd) {
    if p.first {
        for (((s, b), &w), &g) in s.iter_mut().zip(buf.iter_mut()).zip(w).zip(g) {
            let d = straight_through(*s, w, g) + p.wd * *s;
            *b = d;
            *s -= p.lr * d;
        }
    } else {
        for (((s, b), &w), &g) in s.iter_mut().zip(buf.iter_mut()).zip(w).zip(g) {
            let d = straight_through(*s, w, g) + p.wd * *s;
            *b = p.mu * *b + d;
            *s -= p.lr * *b;
        }
    }
}

/// The next mask threshold of a large layer, found while its scores are
/// updated: the threshold moves little between steps, so the pass counts
/// the scores whose `|s|` key lies below a window around the previous
/// threshold and collects the `(key, index)` pairs inside it. If the
/// `prune`-th smallest pair falls in the window, a selection among the
/// collected pairs gives exactly [`mask_threshold`]'s answer (every pair
/// below the window is smaller, every pair above larger); otherwise the
/// caller falls back to [`mask_threshold`]. This replaces a histogram
/// (a scatter that serialises on repeated buckets) and a second pass over
/// the scores.
#[derive(Clone, Debug, Default)]
struct Window {
    /// Keys `lo..hi` are collected.
    lo: u32,
    hi: u32,
    below: usize,
    cand: Vec<(u32, u32)>,
}

impl Window {
    /// Keys within a relative distance `width` of threshold `t`'s value.
    fn reset(&mut self, t: MaskThreshold, width: f32) {
        let v = f32::from_bits(t.key.min(0x7f7f_ffff));
        self.lo = (v * (1.0 - width)).max(0.0).to_bits();
        self.hi = (v * (1.0 + width)).to_bits().saturating_add(1).min(0x7fff_ffff);
        self.below = 0;
        self.cand.clear();
    }

    /// Counts and collects a block of updated scores starting at edge
    /// `base`, and sets their [`KEPT`] bits as far as the window decides
    /// them (keys at or above the window: kept; the pairs inside are fixed
    /// by [`Self::mark`] once the threshold is known).
    #[inline(always)]
    fn scan(&mut self, s: &[f32], base: usize, code: &mut [u8]) {
        let (lo, hi, span) = (self.lo, self.hi, self.hi.wrapping_sub(self.lo));
        let (mut below, mut inside) = (0u32, 0u32);
        for (&v, c) in s.iter().zip(code.iter_mut()) {
            let k = v.to_bits() & 0x7fff_ffff;
            below += u32::from(k < lo);
            inside += u32::from(k.wrapping_sub(lo) < span);
            *c = (*c & NEG) | (u8::from(k >= hi) << 1);
        }
        self.below += below as usize;
        if inside > 0 {
            for (j, &v) in s.iter().enumerate() {
                let k = v.to_bits() & 0x7fff_ffff;
                if k.wrapping_sub(lo) < span {
                    self.cand.push((k, (base + j) as u32));
                }
            }
        }
    }

    /// The threshold keeping `keep` of the `n` scanned scores, if the window
    /// holds it.
    fn finish(&mut self, n: usize, keep: usize) -> Option<MaskThreshold> {
        if keep >= n {
            return Some(MaskThreshold::ALL);
        }
        if keep == 0 {
            return Some(MaskThreshold::NONE);
        }
        let prune = n - keep;
        let rank = prune.checked_sub(self.below).filter(|&r| r < self.cand.len())?;
        let (_, &mut (key, index), _) = self.cand.select_nth_unstable(rank);
        Some(MaskThreshold { key, index: index as usize })
    }

    /// Sets the [`KEPT`] bits of the collected pairs for threshold `t`
    /// (after a successful [`Self::finish`]).
    fn mark(&self, t: MaskThreshold, code: &mut [u8]) {
        for &(k, i) in &self.cand {
            if (k, i as usize) >= (t.key, t.index) {
                code[i as usize] |= KEPT;
            }
        }
    }
}

/// Every edge's [`KEPT`] bit from scratch.
fn mark_all(s: &[f32], keep: Keep, code: &mut [u8]) {
    for (i, (&v, c)) in s.iter().zip(code.iter_mut()).enumerate() {
        *c = (*c & NEG) | (u8::from(keep.keeps(v, i as u32)) << 1);
    }
}

/// Next window width from how far (relatively) the threshold just moved:
/// a few times that, within `[2⁻¹¹, ½]`.
fn next_width(old: MaskThreshold, new: MaskThreshold) -> f32 {
    let (a, b) = (f32::from_bits(old.key.min(0x7f7f_ffff)), f32::from_bits(new.key.min(0x7f7f_ffff)));
    let moved = if a > 0.0 { (b - a).abs() / a } else { 1.0 };
    (8.0 * moved).clamp(1.0 / 2048.0, 0.5)
}

/// Rounds `n` up to a multiple of `m`.
fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// Floats per output channel of a convolution's output: rows of `side + 2`
/// (the last two columns are computed and ignored), rounded up to whole
/// tiles of [`CT`].
fn conv_plane(side: usize) -> usize {
    round_up(side * (side + 2), CT)
}

/// Floats read past the end of a channels-first input buffer by the last
/// tile (its positions beyond the map are computed and ignored).
fn conv_slack(side: usize) -> usize {
    CT + 2 * (side + 2) + 2
}

/// The kept weights of a convolution, per output channel: `(offset of the
/// tap's input in a channels-first padded sample, weight)` in `(tap, c)`
/// order. Skipping the pruned half of the weights halves the forward work.
#[derive(Clone, Debug, Default)]
struct ConvLists {
    start: Vec<usize>,
    entries: Vec<(u32, f32)>,
}

/// Masked conv weights: the kept-weight lists of the forward pass and the
/// `bwd[o][tap][c]` layout of the input gradient.
fn conv_weights(s: &[f32], w: &[f32], keep: Keep, sh: ConvShape, lists: &mut ConvLists, bwd: &mut Vec<f32>) {
    let (cin, cout, p) = (sh.cin, sh.cout, sh.side + 2);
    lists.start.clear();
    lists.entries.clear();
    bwd.clear();
    bwd.resize(cout * 9 * cin, 0.0);
    for o in 0..cout {
        lists.start.push(lists.entries.len());
        // Tap-major, channel inner: the order of burn's convolution, so the
        // two paths round alike (exactly tied pooling windows, frequent on
        // MNIST's flat backgrounds, then break the same way).
        for tap in 0..9 {
            for c in 0..cin {
                let i = (o * cin + c) * 9 + tap;
                let v = keep.apply(s[i], i as u32, w[i]);
                bwd[(o * 9 + tap) * cin + c] = v;
                if keep.keeps(s[i], i as u32) {
                    lists.entries.push(((c * p * p + (tap / 3) * p + tap % 3) as u32, v));
                }
            }
        }
    }
    lists.start.push(lists.entries.len());
}

// ---------------------------------------------------------------------------
// Kernels. Each is `#[inline(always)]` so that, called inside
// `Arch::dispatch`, it is compiled with the dispatched target features.
// ---------------------------------------------------------------------------

/// Calls kernel `$f` with the named local variables through
/// [`Arch::dispatch`]. A closure would not do: LLVM does not inline the
/// closure's body into pulp's `#[target_feature]` trampoline, so the kernel
/// would be compiled without AVX2/FMA (and `mul_add` would become a libm
/// call). `WithSimd::with_simd` is `#[inline(always)]`, so the kernel lands
/// inside the trampoline.
macro_rules! simd_call {
    ($arch:expr, $f:ident($($arg:ident: $ty:ty),* $(,)?)) => {{
        struct Call<'a> {
            $($arg: $ty,)*
            _life: std::marker::PhantomData<&'a ()>,
        }
        impl pulp::WithSimd for Call<'_> {
            type Output = ();
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, _: S) {
                let Call { $($arg,)* .. } = self;
                $f($($arg),*);
            }
        }
        $arch.dispatch(Call { $($arg,)* _life: std::marker::PhantomData })
    }};
}

/// Shape of a convolution call.
#[derive(Clone, Copy, Debug)]
struct ConvShape {
    cin: usize,
    cout: usize,
    side: usize,
}

/// Convolution forward, channels-first: for each sample, tile of [`CT`]
/// output positions (flat over rows of `side + 2`) and output channel `o`,
/// `out[b][o][q] = Σ_(tap,c) kept W[o][c][tap]·in[b][c][q + tap]`, summed in
/// `(tap, c)` order over the kept weights only.
#[inline(always)]
fn conv_forward(inp: &[f32], lists: &ConvLists, out: &mut [f32], nb: usize, sh: ConvShape) {
    let (cin, cout, p) = (sh.cin, sh.cout, sh.side + 2);
    let (plane, in_len) = (conv_plane(sh.side), cin * p * p);
    for b in 0..nb {
        let ib = b * in_len;
        for t in (0..plane).step_by(CT) {
            for o in 0..cout {
                let mut acc = [0f32; CT];
                for &(off, w) in &lists.entries[lists.start[o]..lists.start[o + 1]] {
                    let x = &inp[ib + off as usize + t..][..CT];
                    for j in 0..CT {
                        acc[j] = w.mul_add(x[j], acc[j]);
                    }
                }
                out[(b * cout + o) * plane + t..][..CT].copy_from_slice(&acc);
            }
        }
    }
}

/// Where a layer's activation goes: the next convolution's padded input, or
/// the next linear layer's flat `(c, h, w)` input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NextInput {
    Conv,
    Flat,
}

/// `relu(v)` with NaN kept (like burn's `relu`).
#[inline(always)]
fn relu(v: f32) -> f32 {
    if v <= 0.0 { 0.0 } else { v }
}

/// ReLU (after a 2×2 max pool if `pool`) of a convolution's output, written
/// into the next layer's input: the next convolution's padded input in both
/// layouts (`next` channels-last, `chw` channels-first), or the next linear
/// layer's flat `(c, h, w)` input (`next`). Records the arg-max of each
/// window (0..4 in row-major order; the first maximum wins).
#[inline(always)]
#[allow(clippy::too_many_arguments)] // the buffers of one layer boundary; a struct would only rename them
fn conv_activation(
    pre: &[f32],
    next: &mut [f32],
    chw: &mut [f32],
    arg: &mut [u8],
    nb: usize,
    sh: ConvShape,
    pool: bool,
    to: NextInput,
) {
    let (cout, side) = (sh.cout, sh.side);
    let (p, plane) = (side + 2, conv_plane(side));
    let os = if pool { side / 2 } else { side };
    let np = os + 2;
    let next_len = if to == NextInput::Conv { np * np * cout } else { cout * os * os };
    for b in 0..nb {
        for o in 0..cout {
            let src = &pre[(b * cout + o) * plane..][..plane];
            for pr in 0..os {
                for pc in 0..os {
                    let v = if pool {
                        let at = |dr: usize, dc: usize| src[(2 * pr + dr) * p + 2 * pc + dc];
                        let (mut m, mut k) = (at(0, 0), 0u8);
                        for (q, v) in [at(0, 1), at(1, 0), at(1, 1)].into_iter().enumerate() {
                            if v > m {
                                m = v;
                                k = q as u8 + 1;
                            }
                        }
                        arg[((b * os + pr) * os + pc) * cout + o] = k;
                        relu(m)
                    } else {
                        relu(src[pr * p + pc])
                    };
                    match to {
                        NextInput::Conv => {
                            next[b * next_len + ((pr + 1) * np + pc + 1) * cout + o] = v;
                            chw[b * next_len + o * np * np + (pr + 1) * np + pc + 1] = v;
                        }
                        NextInput::Flat => next[b * next_len + o * os * os + pr * os + pc] = v,
                    }
                }
            }
        }
    }
}

/// A linear layer's edges as one byte each: bit 0 = the frozen weight is
/// `−σ` (else `+σ`), bit 1 = the edge is in the current mask. The passes over
/// LeNet's 1.6 M fc1 edges are bound by memory bandwidth: the forward pass
/// reads 1 byte per edge instead of a score and a weight (8 bytes), and the
/// fused backward pass writes the next step's mask bits as it goes (see
/// [`Window::scan`]).
#[derive(Clone, Copy, Debug)]
struct Codes<'a> {
    code: &'a [u8],
    sigma: u32,
}

/// Bit of [`Codes`]: weight is `−σ`.
const NEG: u8 = 1;
/// Bit of [`Codes`]: edge kept.
const KEPT: u8 = 2;

impl Codes<'_> {
    /// Frozen weights (`w`) and effective weights (`weff`) of edges
    /// `at..at + w.len()`, exactly `±σ` and `±σ` or 0.
    #[inline(always)]
    fn fill(self, at: usize, w: &mut [f32], weff: &mut [f32]) {
        let n = w.len();
        let (code, weff) = (&self.code[at..at + n], &mut weff[..n]);
        for j in 0..n {
            let c = u32::from(code[j]);
            let bits = self.sigma | (c << 31);
            w[j] = f32::from_bits(bits);
            weff[j] = f32::from_bits(bits & 0u32.wrapping_sub(c >> 1));
        }
    }

    /// Effective weights only.
    #[inline(always)]
    fn fill_eff(self, at: usize, weff: &mut [f32]) {
        let n = weff.len();
        let code = &self.code[at..at + n];
        for j in 0..n {
            let c = u32::from(code[j]);
            weff[j] = f32::from_bits((self.sigma | (c << 31)) & 0u32.wrapping_sub(c >> 1));
        }
    }
}

/// The effective weights of a linear layer: from the edge codes (training),
/// or materialised (evaluation, where they serve many batches).
#[derive(Clone, Copy, Debug)]
enum LinearWeights<'a> {
    Coded(Codes<'a>),
    Dense(&'a [f32]),
}

/// Shape of a linear call.
#[derive(Clone, Copy, Debug)]
struct LinShape {
    inputs: usize,
    outputs: usize,
}

/// Linear forward for `groups` groups of [`GROUP`] samples (rows of `x`
/// beyond the real batch are computed and ignored):
/// `y[b][o] = Σ_i x[b][i]·W_eff[o][i]`, each sum accumulated in [`LANES`]
/// lanes (`i mod 8`) in ascending `i`, then the lanes added pairwise.
#[inline(always)]
fn linear_forward(
    x: &[f32],
    weights: LinearWeights<'_>,
    y: &mut [f32],
    groups: usize,
    sh: LinShape,
    acc: &mut Vec<[[f32; LANES]; GROUP]>,
) {
    let (inputs, outputs) = (sh.inputs, sh.outputs);
    acc.clear();
    acc.resize(groups * outputs, [[0.0; LANES]; GROUP]);
    let mut seg = [0f32; LIN_BLOCK];
    for i0 in (0..inputs).step_by(LIN_BLOCK) {
        let n = (inputs - i0).min(LIN_BLOCK);
        for o in 0..outputs {
            let row = o * inputs + i0;
            let wseg: &[f32] = match weights {
                LinearWeights::Coded(c) => {
                    c.fill_eff(row, &mut seg[..n]);
                    &seg[..n]
                }
                LinearWeights::Dense(d) => &d[row..row + n],
            };
            let full = n / LANES * LANES;
            for g in 0..groups {
                // The 8 samples' accumulators stay in registers over the
                // block: 8 independent FMA chains share each weight load.
                let mut r = acc[g * outputs + o];
                let xs: [&[f32]; GROUP] = std::array::from_fn(|sb| &x[(g * GROUP + sb) * inputs + i0..][..n]);
                for (k, wv) in wseg[..full].chunks_exact(LANES).enumerate() {
                    for (lanes, xrow) in r.iter_mut().zip(&xs) {
                        let xv = &xrow[k * LANES..k * LANES + LANES];
                        for j in 0..LANES {
                            lanes[j] = xv[j].mul_add(wv[j], lanes[j]);
                        }
                    }
                }
                for (lanes, xrow) in r.iter_mut().zip(&xs) {
                    for k in full..n {
                        lanes[k - full] = xrow[k].mul_add(wseg[k], lanes[k - full]);
                    }
                }
                acc[g * outputs + o] = r;
            }
        }
    }
    for g in 0..groups {
        for o in 0..outputs {
            for (sb, l) in acc[g * outputs + o].iter().enumerate() {
                y[(g * GROUP + sb) * outputs + o] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
            }
        }
    }
}

/// Linear backward fused with the SGD update of the layer's scores: for
/// each row `o`, in blocks of [`FUSED_BLOCK`] inputs, the old effective
/// weights give `gx[b][i] += δ[b][o]·W_eff[o][i]` (if `gx`), the weight
/// gradient `g[o][i] = Σ_b δ[b][o]·x[b][i]` goes straight into
/// [`sgd_block`], and the updated scores into `window` (the next mask).
#[inline(always)]
#[allow(clippy::too_many_arguments)] // one fused pass needs all of them; a struct would only rename them
fn linear_backward_update(
    x: &[f32],
    delta: &[f32],
    nb: usize,
    sh: LinShape,
    s: &mut [f32],
    buf: &mut [f32],
    code: &mut [u8],
    sigma: u32,
    mut gx: Option<&mut [f32]>,
    p: Sgd,
    window: &mut Window,
) {
    let (inputs, outputs) = (sh.inputs, sh.outputs);
    let mut gy = [0f32; GROUP];
    for o in 0..outputs {
        let row = o * inputs;
        let mut i0 = 0;
        while i0 < inputs {
            let n = (inputs - i0).min(FUSED_BLOCK);
            let at = row + i0;
            let (mut wv, mut weff) = ([0f32; FUSED_BLOCK], [0f32; FUSED_BLOCK]);
            Codes { code, sigma }.fill(at, &mut wv[..n], &mut weff[..n]);
            let mut g = [0f32; FUSED_BLOCK];
            let mut b0 = 0;
            while b0 < nb {
                let m = (nb - b0).min(GROUP);
                for (k, v) in gy[..m].iter_mut().enumerate() {
                    *v = delta[(b0 + k) * outputs + o];
                }
                for (k, &gb) in gy[..m].iter().enumerate() {
                    let xb = &x[(b0 + k) * inputs + i0..][..n];
                    for (gj, &xj) in g[..n].iter_mut().zip(xb) {
                        *gj = gb.mul_add(xj, *gj);
                    }
                }
                if let Some(gx) = gx.as_deref_mut() {
                    for (k, &gb) in gy[..m].iter().enumerate() {
                        if gb != 0.0 {
                            let gxb = &mut gx[(b0 + k) * inputs + i0..][..n];
                            for (v, &wj) in gxb.iter_mut().zip(&weff[..n]) {
                                *v = gb.mul_add(wj, *v);
                            }
                        }
                    }
                }
                b0 += m;
            }
            sgd_block(&mut s[at..at + n], &mut buf[at..at + n], &wv[..n], &g[..n], p);
            window.scan(&s[at..at + n], at, &mut code[at..at + n]);
            i0 += n;
        }
    }
}

/// Sparse gradient at a convolution's output (pre-activation), by position:
/// `entries[start[b·side²+p] .. start[..]+len[..]]` are the `(o, δ)` with
/// `δ ≠ 0`; and by output channel: `by_o[o]` lists `(top-left padded input
/// position of (b, p), δ)`.
#[derive(Debug, Default)]
struct SparseDelta {
    start: Vec<u32>,
    len: Vec<u32>,
    entries: Vec<(u32, f32)>,
    by_o: Vec<Vec<(u32, f32)>>,
    quad: [Vec<(u32, f32)>; 4],
}

impl SparseDelta {
    fn reset(&mut self, positions: usize, cout: usize) {
        self.start.clear();
        self.start.resize(positions, 0);
        self.len.clear();
        self.len.resize(positions, 0);
        self.entries.clear();
        self.by_o.resize_with(cout, Vec::new);
        for v in &mut self.by_o {
            v.clear();
        }
    }
}

/// The gradient arriving at a layer's activation: from the next linear
/// layer (flat `(c, h, w)`) or the next convolution (channels-last), and the
/// activation itself (its ReLU passes the gradient where it is `> 0`).
#[derive(Clone, Copy, Debug)]
struct Upstream<'a> {
    grad: &'a [f32],
    act: &'a [f32],
    to: NextInput,
}

impl Upstream<'_> {
    /// Gradient at pre-ReLU value of channel `o`, sample `b`, activation
    /// position `(r, c)` of an `os`×`os` map with `cout` channels.
    #[inline(always)]
    fn at(&self, b: usize, o: usize, r: usize, c: usize, os: usize, cout: usize) -> f32 {
        let (g, a) = match self.to {
            NextInput::Flat => {
                let i = b * cout * os * os + o * os * os + r * os + c;
                (self.grad[i], self.act[i])
            }
            NextInput::Conv => {
                let p = os + 2;
                let gi = ((b * os + r) * os + c) * cout + o;
                let ai = b * p * p * cout + ((r + 1) * p + c + 1) * cout + o;
                (self.grad[gi], self.act[ai])
            }
        };
        if a > 0.0 { g } else { 0.0 }
    }
}

/// The sparse output gradient of a pooled convolution: each window's
/// gradient goes to its arg-max position.
fn pooled_delta(sd: &mut SparseDelta, up: Upstream<'_>, arg: &[u8], nb: usize, sh: ConvShape) {
    let (cout, side) = (sh.cout, sh.side);
    let (os, p) = (side / 2, side + 2);
    sd.reset(nb * side * side, cout);
    for b in 0..nb {
        for pr in 0..os {
            for pc in 0..os {
                for q in &mut sd.quad {
                    q.clear();
                }
                let abase = ((b * os + pr) * os + pc) * cout;
                for o in 0..cout {
                    let g = up.at(b, o, pr, pc, os, cout);
                    if g != 0.0 {
                        sd.quad[usize::from(arg[abase + o] & 3)].push((o as u32, g));
                    }
                }
                for q in 0..4 {
                    let (r, x) = (2 * pr + q / 2, 2 * pc + q % 2);
                    let pos = (b * side + r) * side + x;
                    let pad = ((b * p + r) * p + x) as u32;
                    sd.start[pos] = sd.entries.len() as u32;
                    sd.len[pos] = sd.quad[q].len() as u32;
                    for &(o, g) in &sd.quad[q] {
                        sd.by_o[o as usize].push((pad, g));
                    }
                    sd.entries.extend_from_slice(&sd.quad[q]);
                }
            }
        }
    }
}

/// The dense output gradient of a convolution without pooling,
/// `dense[b][p][o]`, and (if `sparse`) the same by position.
fn plain_delta(dense: &mut Vec<f32>, sd: Option<&mut SparseDelta>, up: Upstream<'_>, nb: usize, sh: ConvShape) {
    let (cout, side) = (sh.cout, sh.side);
    dense.clear();
    dense.resize(nb * side * side * cout, 0.0);
    // The ReLU passes the gradient where the stored activation is > 0.
    match up.to {
        NextInput::Conv => {
            // Both the gradient and the activation are channels-last: one
            // contiguous, vectorisable run of channels per position.
            let np = side + 2;
            for b in 0..nb {
                for r in 0..side {
                    for c in 0..side {
                        let gi = ((b * side + r) * side + c) * cout;
                        let ai = (b * np * np + (r + 1) * np + c + 1) * cout;
                        let (g, a) = (&up.grad[gi..gi + cout], &up.act[ai..ai + cout]);
                        for ((d, &g), &a) in dense[gi..gi + cout].iter_mut().zip(g).zip(a) {
                            *d = if a > 0.0 { g } else { 0.0 };
                        }
                    }
                }
            }
        }
        NextInput::Flat => {
            for b in 0..nb {
                for r in 0..side {
                    for c in 0..side {
                        let base = ((b * side + r) * side + c) * cout;
                        for o in 0..cout {
                            dense[base + o] = up.at(b, o, r, c, side, cout);
                        }
                    }
                }
            }
        }
    }
    if let Some(sd) = sd {
        let p = side + 2;
        sd.reset(nb * side * side, cout);
        for b in 0..nb {
            for r in 0..side {
                for c in 0..side {
                    let pos = (b * side + r) * side + c;
                    sd.start[pos] = sd.entries.len() as u32;
                    let pad = ((b * p + r) * p + c) as u32;
                    for o in 0..cout {
                        let g = dense[pos * cout + o];
                        if g != 0.0 {
                            sd.entries.push((o as u32, g));
                            sd.by_o[o].push((pad, g));
                        }
                    }
                    sd.len[pos] = sd.entries.len() as u32 - sd.start[pos];
                }
            }
        }
    }
}

/// `W` channels of the weight gradient of output channel `o` and one tap,
/// from the sparse list: `Σ_(pos,δ) δ·in[pos + tap][c0..c0+W]`.
#[inline(always)]
fn conv_wgrad_sparse_chunk<const W: usize>(
    inp: &[f32],
    list: &[(u32, f32)],
    off: usize,
    cin: usize,
    c0: usize,
) -> [f32; W] {
    let mut acc = [0f32; W];
    for &(pos, g) in list {
        let base = (pos as usize + off) * cin + c0;
        let v = &inp[base..base + W];
        for j in 0..W {
            acc[j] = g.mul_add(v[j], acc[j]);
        }
    }
    acc
}

/// Weight gradient of a convolution from the per-channel lists of
/// [`SparseDelta`], written in canonical `[o][c][tap]` order.
#[inline(always)]
fn conv_wgrad_sparse(inp: &[f32], sd: &SparseDelta, grad: &mut [f32], sh: ConvShape) {
    let (cin, p) = (sh.cin, sh.side + 2);
    for (o, list) in sd.by_o.iter().enumerate().take(sh.cout) {
        for tap in 0..9 {
            let off = (tap / 3) * p + tap % 3;
            let mut c0 = 0;
            while c0 < cin {
                let put = |grad: &mut [f32], vals: &[f32]| {
                    for (j, &v) in vals.iter().enumerate() {
                        grad[(o * cin + c0 + j) * 9 + tap] = v;
                    }
                };
                if cin - c0 >= 32 {
                    put(grad, &conv_wgrad_sparse_chunk::<32>(inp, list, off, cin, c0));
                    c0 += 32;
                } else if cin - c0 >= LANES {
                    put(grad, &conv_wgrad_sparse_chunk::<LANES>(inp, list, off, cin, c0));
                    c0 += LANES;
                } else {
                    put(grad, &conv_wgrad_sparse_chunk::<1>(inp, list, off, cin, c0));
                    c0 += 1;
                }
            }
        }
    }
}

/// Weight gradient of a convolution from the dense output gradient
/// `dense[b][p][o]`, vectorised over `o` (used where the input has few
/// channels or the gradient is not sparse), in canonical order.
#[inline(always)]
fn conv_wgrad_dense(inp: &[f32], dense: &[f32], grad: &mut [f32], nb: usize, sh: ConvShape) {
    let (cin, cout, side) = (sh.cin, sh.cout, sh.side);
    let p = side + 2;
    let mut acc = vec![0f32; cout];
    for tap in 0..9 {
        let (kr, kc) = (tap / 3, tap % 3);
        for c in 0..cin {
            acc.iter_mut().for_each(|v| *v = 0.0);
            for b in 0..nb {
                for r in 0..side {
                    for x in 0..side {
                        let a = inp[((b * p + r + kr) * p + x + kc) * cin + c];
                        if a == 0.0 {
                            continue;
                        }
                        let d = &dense[((b * side + r) * side + x) * cout..][..cout];
                        for (v, &dj) in acc.iter_mut().zip(d) {
                            *v = a.mul_add(dj, *v);
                        }
                    }
                }
            }
            for (o, &v) in acc.iter().enumerate() {
                grad[(o * cin + c) * 9 + tap] = v;
            }
        }
    }
}

/// `W` channels of the input gradient at one input position.
#[inline(always)]
fn conv_igrad_chunk<const W: usize>(
    sd: &SparseDelta,
    wo: &[f32],
    rows: &[(usize, usize)],
    cin: usize,
    c0: usize,
) -> [f32; W] {
    let mut acc = [0f32; W];
    for &(pos, tap) in rows {
        let (st, n) = (sd.start[pos] as usize, sd.len[pos] as usize);
        for &(o, g) in &sd.entries[st..st + n] {
            let wb = (o as usize * 9 + tap) * cin + c0;
            let wv = &wo[wb..wb + W];
            for j in 0..W {
                acc[j] = g.mul_add(wv[j], acc[j]);
            }
        }
    }
    acc
}

/// Input gradient of a convolution (unpadded channels-last
/// `gin[b][q][c]`): `Σ_tap Σ_o δ[b][q − tap + 1][o]·W[o][c][tap]`, taps in
/// row-major order, each position's channels in ascending order.
#[inline(always)]
fn conv_igrad(sd: &SparseDelta, wo: &[f32], gin: &mut [f32], nb: usize, sh: ConvShape) {
    let (cin, side) = (sh.cin, sh.side);
    let mut rows: Vec<(usize, usize)> = Vec::with_capacity(9);
    for b in 0..nb {
        for qr in 0..side {
            for qc in 0..side {
                rows.clear();
                for kr in 0..3 {
                    for kc in 0..3 {
                        // Output position (qr + 1 − kr, qc + 1 − kc), if inside.
                        let (pr, pc) = ((qr + 1).wrapping_sub(kr), (qc + 1).wrapping_sub(kc));
                        if pr < side && pc < side {
                            let pos = (b * side + pr) * side + pc;
                            if sd.len[pos] > 0 {
                                rows.push((pos, kr * 3 + kc));
                            }
                        }
                    }
                }
                let out = ((b * side + qr) * side + qc) * cin;
                let dst = &mut gin[out..out + cin];
                if rows.is_empty() {
                    dst.iter_mut().for_each(|v| *v = 0.0);
                    continue;
                }
                let mut c0 = 0;
                while c0 < cin {
                    if cin - c0 >= 32 {
                        dst[c0..c0 + 32].copy_from_slice(&conv_igrad_chunk::<32>(sd, wo, &rows, cin, c0));
                        c0 += 32;
                    } else if cin - c0 >= LANES {
                        dst[c0..c0 + LANES].copy_from_slice(&conv_igrad_chunk::<LANES>(sd, wo, &rows, cin, c0));
                        c0 += LANES;
                    } else {
                        dst[c0..c0 + 1].copy_from_slice(&conv_igrad_chunk::<1>(sd, wo, &rows, cin, c0));
                        c0 += 1;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The network runner.
// ---------------------------------------------------------------------------

/// Buffers and state of the native kernels for one network and batch
/// capacity.
#[derive(Debug)]
pub(super) struct Runner<'n> {
    net: &'n Supermask,
    arch: Arch,
    stages: Vec<Stage>,
    /// Samples the buffers hold (a multiple of [`GROUP`]).
    cap: usize,
    /// Per layer: its input (conv: padded channels-last; linear: flat).
    input: Vec<Vec<f32>>,
    /// Per conv: its input again, channels-first `[b][c][side+2][side+2]`
    /// (read by the forward pass; the backward pass reads `input`).
    chw: Vec<Vec<f32>>,
    /// Per layer: pre-activation output.
    pre: Vec<Vec<f32>>,
    /// Per pooled conv: arg-max of each window.
    arg: Vec<Vec<u8>>,
    /// Per layer ≥ 1: gradient w.r.t. its input (unpadded).
    gin: Vec<Vec<f32>>,
    /// Per conv: kept weights per output channel, and `[o][tap][c]`.
    lists: Vec<ConvLists>,
    wt_bwd: Vec<Vec<f32>>,
    /// Per linear layer, evaluation only: the materialised `W_eff`.
    dense: Vec<Vec<f32>>,
    /// Per linear layer: the edge codes ([`Codes`]) and `σ`'s bits.
    codes: Vec<(Vec<u8>, u32)>,
    /// Per layer: the current mask.
    keep: Vec<Keep>,
    labels: Vec<u8>,
    nb: usize,
    acc: Vec<[[f32; LANES]; GROUP]>,
    delta: Vec<f32>,
    sparse: SparseDelta,
    wgrad: Vec<f32>,
    /// Per layer: the threshold window of the next update, and its width.
    window: Window,
    width: Vec<f32>,
}

impl<'n> Runner<'n> {
    /// Buffers for batches of up to `batch` samples, masks of `scores`.
    pub(super) fn new(net: &'n Supermask, scores: &[Vec<f32>], batch: usize) -> Result<Self, KernelError> {
        let stages = plan(net)?;
        let cap = round_up(batch.max(1), GROUP);
        let n_layers = stages.len();
        let input = stages.iter().map(|s| vec![0.0; cap * s.input_len()]).collect();
        let chw = stages
            .iter()
            .map(|s| match *s {
                Stage::Conv { side, .. } => vec![0.0; cap * s.input_len() + conv_slack(side)],
                Stage::Linear { .. } => Vec::new(),
            })
            .collect();
        let pre = stages.iter().map(|s| vec![0.0; cap * s.output_len()]).collect();
        let arg = stages
            .iter()
            .map(|s| match *s {
                Stage::Conv { cout, side, pool: true, .. } => vec![0u8; cap * (side / 2) * (side / 2) * cout],
                _ => Vec::new(),
            })
            .collect();
        let gin = stages
            .iter()
            .enumerate()
            .map(|(l, s)| if l == 0 { Vec::new() } else { vec![0.0; cap * s.input_grad_len()] })
            .collect();
        let mut r = Runner {
            net,
            arch: Arch::new(),
            cap,
            input,
            chw,
            pre,
            arg,
            gin,
            lists: vec![ConvLists::default(); stages.len()],
            wt_bwd: vec![Vec::new(); stages.len()],
            dense: vec![Vec::new(); stages.len()],
            codes: Vec::new(),
            keep: Vec::new(),
            stages,
            labels: Vec::with_capacity(cap),
            nb: 0,
            acc: Vec::new(),
            delta: Vec::new(),
            sparse: SparseDelta::default(),
            wgrad: Vec::new(),
            window: Window::default(),
            width: vec![1.0 / 256.0; n_layers],
        };
        r.keep = scores.iter().zip(&net.keep).map(|(s, &k)| Keep::new(mask_threshold(s, k))).collect();
        for (l, w) in net.weights.iter().enumerate() {
            let sigma = net.layers[l].weight_scale();
            if !w.iter().all(|v| v.abs().to_bits() == sigma.to_bits()) {
                return Err(KernelError::InvalidConfig(format!("layer {l}: frozen weights are not ±σ")));
            }
            let mut code = match r.stages[l] {
                Stage::Linear { .. } => w.iter().map(|v| u8::from(v.is_sign_negative())).collect(),
                Stage::Conv { .. } => Vec::new(),
            };
            if !code.is_empty() {
                mark_all(&scores[l], r.keep[l], &mut code);
            }
            r.codes.push((code, sigma.to_bits()));
        }
        Ok(r)
    }

    /// Loads samples `idx` of `data` (normalised by `table`) as the batch.
    pub(super) fn load(&mut self, data: &Dataset, idx: &[usize], table: &[f32; 256]) {
        let stage = self.stages[0];
        let per = stage.input_len();
        let x = &mut self.input[0];
        self.labels.clear();
        let mut b = 0;
        for &i in idx.iter().take(self.cap) {
            let (Some(img), Some(&label)) = (data.image(i), data.labels.get(i)) else { continue };
            let dst = &mut x[b * per..(b + 1) * per];
            match stage {
                Stage::Conv { cin: 1, side, .. } => {
                    // One channel: both layouts are the same.
                    let p = side + 2;
                    let chw = &mut self.chw[0][b * per..(b + 1) * per];
                    for (r, row) in img.chunks_exact(side).enumerate() {
                        for (c, &px) in row.iter().enumerate() {
                            dst[(r + 1) * p + c + 1] = table[usize::from(px)];
                            chw[(r + 1) * p + c + 1] = table[usize::from(px)];
                        }
                    }
                }
                _ => {
                    for (v, &px) in dst.iter_mut().zip(img) {
                        *v = table[usize::from(px)];
                    }
                }
            }
            self.labels.push(label);
            b += 1;
        }
        self.nb = b;
        // Rows of the padded group beyond the batch: zero (they are
        // computed by the linear kernels and then ignored).
        let end = round_up(b, GROUP) * per;
        x[b * per..end].iter_mut().for_each(|v| *v = 0.0);
    }

    /// Rebuilds the convolution weight layouts for the current masks (and,
    /// if `materialise`, the linear `W_eff`).
    fn prepare(&mut self, scores: &[Vec<f32>], materialise: bool) {
        for (l, stage) in self.stages.iter().enumerate() {
            let (s, w, keep) = (&scores[l], &self.net.weights[l], self.keep[l]);
            match *stage {
                Stage::Conv { cin, cout, side, .. } => {
                    let sh = ConvShape { cin, cout, side };
                    conv_weights(s, w, keep, sh, &mut self.lists[l], &mut self.wt_bwd[l])
                }
                Stage::Linear { .. } if materialise => {
                    let d = &mut self.dense[l];
                    d.clear();
                    d.extend(s.iter().zip(w).enumerate().map(|(i, (&s, &w))| keep.apply(s, i as u32, w)));
                }
                Stage::Linear { .. } => {}
            }
        }
    }

    /// Forward pass of the loaded batch; logits end up in `pre[last]`.
    /// `dense`: read the materialised linear weights (see [`Self::prepare`]).
    fn forward(&mut self, dense: bool) {
        for l in 0..self.stages.len() {
            self.forward_layer(l, dense);
        }
    }

    /// Layer `l` of [`Self::forward`], with its activation.
    fn forward_layer(&mut self, l: usize, dense: bool) {
        let nb = self.nb;
        let groups = nb.div_ceil(GROUP);
        let arch = self.arch;
        {
            match self.stages[l] {
                Stage::Conv { cin, cout, side, pool } => {
                    let sh = ConvShape { cin, cout, side };
                    let (inp, lists, pre) = (&self.chw[l], &self.lists[l], &mut self.pre[l]);
                    simd_call!(arch, conv_forward(inp: &'a [f32], lists: &'a ConvLists, pre: &'a mut [f32], nb: usize, sh: ConvShape));
                    let to = match self.stages.get(l + 1) {
                        Some(Stage::Conv { .. }) => NextInput::Conv,
                        _ => NextInput::Flat,
                    };
                    let (next, chw) = (&mut self.input[l + 1], &mut self.chw[l + 1]);
                    let (pre, arg) = (&self.pre[l], &mut self.arg[l]);
                    simd_call!(
                        arch,
                        conv_activation(pre: &'a [f32], next: &'a mut [f32], chw: &'a mut [f32], arg: &'a mut [u8], nb: usize, sh: ConvShape, pool: bool, to: NextInput)
                    );
                }
                Stage::Linear { inputs, outputs } => {
                    let sh = LinShape { inputs, outputs };
                    let weights = if dense {
                        LinearWeights::Dense(&self.dense[l])
                    } else {
                        LinearWeights::Coded(Codes { code: &self.codes[l].0, sigma: self.codes[l].1 })
                    };
                    let (x, y, acc) = (&self.input[l], &mut self.pre[l], &mut self.acc);
                    simd_call!(
                        arch,
                        linear_forward(x: &'a [f32], weights: LinearWeights<'a>, y: &'a mut [f32], groups: usize, sh: LinShape, acc: &'a mut Vec<[[f32; LANES]; GROUP]>)
                    );
                    if let Some(next) = self.input.get_mut(l + 1) {
                        let n = groups * GROUP * outputs;
                        for (v, &y) in next[..n].iter_mut().zip(&self.pre[l][..n]) {
                            *v = relu(y);
                        }
                    }
                }
            }
        }
    }

    /// Logits of sample `b` of the batch.
    fn logits(&self, b: usize) -> &[f32] {
        let classes = self.net.config.arch.classes();
        let last = self.pre.len() - 1;
        &self.pre[last][b * classes..(b + 1) * classes]
    }

    /// Mean cross-entropy of the batch (in f64, rounded once), and its
    /// gradient w.r.t. the logits into `delta`.
    fn loss(&mut self) -> f32 {
        let classes = self.net.config.arch.classes();
        let nb = self.nb;
        let mut delta = std::mem::take(&mut self.delta);
        delta.clear();
        delta.resize(nb * classes, 0.0);
        let mut sum = 0f64;
        for b in 0..nb {
            let row = self.logits(b);
            let label = usize::from(self.labels[b]);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f64> = row.iter().map(|&v| (f64::from(v) - f64::from(max)).exp()).collect();
            let total: f64 = exps.iter().sum();
            sum += f64::from(max) + total.ln() - f64::from(row[label]);
            for (j, &e) in exps.iter().enumerate() {
                let p = e / total - if j == label { 1.0 } else { 0.0 };
                delta[b * classes + j] = (p / nb as f64) as f32;
            }
        }
        self.delta = delta;
        (sum / nb as f64) as f32
    }

    /// Backward pass and SGD update of every layer, from the gradient of the
    /// logits in `delta` (see [`Self::loss`]); refreshes the masks.
    fn backward_update(&mut self, scores: &mut [Vec<f32>], momentum: &mut [Vec<f32>], p: Sgd) {
        for l in (0..self.stages.len()).rev() {
            self.backward_layer(l, scores, momentum, p);
        }
    }

    fn backward_layer(&mut self, l: usize, scores: &mut [Vec<f32>], momentum: &mut [Vec<f32>], p: Sgd) {
        let nb = self.nb;
        let arch = self.arch;
        let last = self.stages.len() - 1;
        let (s, buf, w) = (&mut scores[l], &mut momentum[l], &self.net.weights[l]);
        let old = self.keep[l];
        match self.stages[l] {
            Stage::Linear { inputs, outputs } => {
                // δ at this layer's output: the logits' gradient, or the next
                // layer's input gradient through this layer's ReLU.
                if l != last {
                    let (act, g) = (&self.input[l + 1], &self.gin[l + 1]);
                    self.delta.clear();
                    self.delta.extend((0..nb * outputs).map(|i| if act[i] > 0.0 { g[i] } else { 0.0 }));
                }
                let mut gx = std::mem::take(&mut self.gin[l]);
                let gx_slice = if l > 0 {
                    gx[..nb * inputs].iter_mut().for_each(|v| *v = 0.0);
                    Some(&mut gx[..nb * inputs])
                } else {
                    None
                };
                let (x, delta) = (&self.input[l], &self.delta);
                let sigma = self.codes[l].1;
                let code = &mut self.codes[l].0;
                self.window.reset(old.threshold, self.width[l]);
                let window = &mut self.window;
                let sh = LinShape { inputs, outputs };
                simd_call!(
                    arch,
                    linear_backward_update(x: &'a [f32], delta: &'a [f32], nb: usize, sh: LinShape, s: &'a mut [f32], buf: &'a mut [f32], code: &'a mut [u8], sigma: u32, gx_slice: Option<&'a mut [f32]>, p: Sgd, window: &'a mut Window)
                );
                self.gin[l] = gx;
            }
            Stage::Conv { cin, cout, side, pool } => {
                let sh = ConvShape { cin, cout, side };
                let to = match self.stages.get(l + 1) {
                    Some(Stage::Conv { .. }) => NextInput::Conv,
                    _ => NextInput::Flat,
                };
                let up = Upstream { grad: &self.gin[l + 1], act: &self.input[l + 1], to };
                let inp = &self.input[l];
                let mut grad = std::mem::take(&mut self.wgrad);
                grad.clear();
                grad.resize(s.len(), 0.0);
                if pool {
                    pooled_delta(&mut self.sparse, up, &self.arg[l], nb, sh);
                    let sd = &self.sparse;
                    let g = &mut grad[..];
                    simd_call!(arch, conv_wgrad_sparse(inp: &'a [f32], sd: &'a SparseDelta, g: &'a mut [f32], sh: ConvShape));
                } else {
                    let sd = if l > 0 { Some(&mut self.sparse) } else { None };
                    plain_delta(&mut self.delta, sd, up, nb, sh);
                    let dense = &self.delta;
                    let g = &mut grad[..];
                    simd_call!(arch, conv_wgrad_dense(inp: &'a [f32], dense: &'a [f32], g: &'a mut [f32], nb: usize, sh: ConvShape));
                }
                if l > 0 {
                    let (sd, wo, gin) = (&self.sparse, &self.wt_bwd[l], &mut self.gin[l]);
                    simd_call!(arch, conv_igrad(sd: &'a SparseDelta, wo: &'a [f32], gin: &'a mut [f32], nb: usize, sh: ConvShape));
                }
                let g = &grad[..];
                simd_call!(arch, sgd_block(s: &'a mut [f32], buf: &'a mut [f32], w: &'a [f32], g: &'a [f32], p: Sgd));
                self.wgrad = grad;
            }
        }
        let keep = self.net.keep[l];
        let new = match self.stages[l] {
            Stage::Linear { .. } => {
                let code = &mut self.codes[l].0;
                match self.window.finish(s.len(), keep) {
                    Some(t) if t != MaskThreshold::ALL && t != MaskThreshold::NONE => {
                        self.window.mark(t, code);
                        t
                    }
                    found => {
                        let t = found.unwrap_or_else(|| mask_threshold(s, keep));
                        mark_all(s, Keep::new(t), code);
                        t
                    }
                }
            }
            Stage::Conv { .. } => mask_threshold(s, keep),
        };
        self.width[l] = next_width(old.threshold, new);
        self.keep[l] = Keep::new(new);
    }
}

/// [`Supermask::train`] on the native kernels (inputs already checked).
pub(super) fn train(
    net: &Supermask,
    scores: Vec<Vec<f32>>,
    data: &Dataset,
    cfg: &FrlTrainConfig,
) -> Result<(Vec<Vec<f32>>, FrlTrainReport), KernelError> {
    let mut scores = scores;
    let mut runner = Runner::new(net, &scores, cfg.batch_size.min(data.len()))?;
    let mut momentum: Vec<Vec<f32>> = scores.iter().map(|s| vec![0.0; s.len()]).collect();
    let table = net.config.input_norm.table();
    let mut rng = train_rng(cfg.seed);
    let mut order: Vec<usize> = Vec::with_capacity(data.len());
    let (mut steps, mut samples, mut loss_sum) = (0u64, 0u64, 0f64);
    for epoch in 0..cfg.epochs {
        let lr = cfg.epoch_lr(epoch) as f32;
        order.clear();
        order.extend(0..data.len());
        crate::data::partition::shuffle(&mut rng, &mut order);
        for idx in order.chunks(cfg.batch_size) {
            runner.load(data, idx, &table);
            runner.prepare(&scores, false);
            runner.forward(false);
            let value = runner.loss();
            if !value.is_finite() {
                return Err(KernelError::Diverged { step: steps, loss: value });
            }
            let p = Sgd { lr, wd: cfg.weight_decay, mu: cfg.momentum, first: steps == 0 };
            runner.backward_update(&mut scores, &mut momentum, p);
            steps += 1;
            samples += idx.len() as u64;
            loss_sum += f64::from(value) * idx.len() as f64;
        }
    }
    super::finish_training(scores, steps, samples, loss_sum)
}

/// [`Supermask::evaluate_scores`] on the native kernels (inputs checked).
pub(super) fn evaluate(
    net: &Supermask,
    scores: &[Vec<f32>],
    data: &Dataset,
    batch_size: usize,
) -> Result<EvalReport, KernelError> {
    let chunk = batch_size.clamp(1, EVAL_CHUNK);
    let mut runner = Runner::new(net, scores, chunk)?;
    runner.prepare(scores, true);
    let table = net.config.input_norm.table();
    let classes = net.config.arch.classes();
    let all: Vec<usize> = (0..data.len()).collect();
    let mut report = EvalReport::default();
    let mut logits = Vec::with_capacity(chunk * classes);
    for idx in all.chunks(chunk) {
        runner.load(data, idx, &table);
        runner.forward(true);
        logits.clear();
        for b in 0..runner.nb {
            logits.extend_from_slice(runner.logits(b));
        }
        crate::train::score_logits(&mut report, &logits, classes, idx, data);
    }
    Ok(report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::{FrlArch, SupermaskConfig, mask, positions};
    use super::*;
    use crate::train::cpu_device;

    /// Random 0..255 images of `side`×`side` with labels 0..10 (a fixed LCG).
    fn synthetic(n: usize, side: usize, seed: u64) -> Dataset {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u32
        };
        let pixels = (0..n * side * side).map(|_| (next() % 256) as u8).collect();
        let labels = (0..n).map(|_| (next() % 10) as u8).collect();
        Dataset::new(side, side, pixels, labels, 10).unwrap()
    }

    fn lenet_data(n: usize) -> Dataset {
        crate::data::embedded_mnist().train.subset(&(0..n).collect::<Vec<_>>()).unwrap()
    }

    /// Per layer: the largest `|a − b|` relative to the largest `|a − s0|`
    /// (the size of the update), the same in the L2 norm, and the number of
    /// mask differences.
    fn compare(net: &Supermask, s0: &[Vec<f32>], a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<(f64, f64, usize)> {
        let (ma, mb) = (net.masks(a), net.masks(b));
        (0..s0.len())
            .map(|l| {
                let d = |x: &[f32], y: &[f32]| -> (f64, f64) {
                    let v = x.iter().zip(y).map(|(p, q)| f64::from(p - q));
                    (v.clone().map(f64::abs).fold(0.0, f64::max), v.map(|e| e * e).sum::<f64>().sqrt())
                };
                let (step_max, step_l2) = d(&a[l], &s0[l]);
                let (diff_max, diff_l2) = d(&a[l], &b[l]);
                let masks = ma[l].iter().zip(&mb[l]).filter(|(x, y)| x != y).count();
                (diff_max / step_max.max(f64::MIN_POSITIVE), diff_l2 / step_l2.max(f64::MIN_POSITIVE), masks)
            })
            .collect()
    }

    /// One SGD step (one batch of 8) of the native kernels against burn:
    /// loss within 1e-5; per layer, updated scores within `max_rel` of the
    /// largest update (and `l2_rel` in the L2 norm); identical masks.
    fn one_step_parity(arch: FrlArch, data: &Dataset, seed: u64, max_rel: f64, l2_rel: f64) {
        let net = Supermask::new(&SupermaskConfig::new(arch, seed)).unwrap();
        let device = cpu_device();
        let s0 = net.initial_scores();
        let cfg = FrlTrainConfig { epochs: 1, ..FrlTrainConfig::mnist(0, seed) };
        assert_eq!(data.len(), cfg.batch_size);
        let (a, ra) = net.train(s0.clone(), data, &cfg, &device).unwrap();
        let (b, rb) = net.train_burn(s0.clone(), data, &cfg, &device).unwrap();
        assert_eq!((ra.steps, ra.samples), (1, 8));
        assert_eq!((ra.steps, ra.samples), (rb.steps, rb.samples));
        let rel = (ra.mean_loss - rb.mean_loss).abs() / rb.mean_loss.abs();
        assert!(rel < 1e-5, "{arch:?}: loss native {} burn {}", ra.mean_loss, rb.mean_loss);
        for (l, (dmax, dl2, masks)) in compare(&net, &s0, &a, &b).into_iter().enumerate() {
            println!(
                "{arch:?} layer {l}: |Δ native − Δ burn| / |Δ|: max {dmax:.2e}, L2 {dl2:.2e}; mask differences {masks}"
            );
            assert!(dmax < max_rel && dl2 < l2_rel, "{arch:?} layer {l}: scores differ by {dmax:e} (L2 {dl2:e})");
            assert_eq!(masks, 0, "{arch:?} layer {l}");
        }
    }

    /// LeNet on MNIST. Its flat backgrounds make many 2×2 pooling windows
    /// tie exactly; both paths then route the gradient to the first maximum
    /// (as PyTorch does), and because the native convolution sums in burn's
    /// order, they see the same ties.
    #[cfg(feature = "embedded-data")]
    #[test]
    fn one_step_matches_burn_lenet() {
        one_step_parity(FrlArch::MNIST_LENET, &lenet_data(8), 3, 1e-4, 1e-5);
    }

    /// LeNet on noise images (no ties at all).
    #[test]
    fn one_step_matches_burn_lenet_noise() {
        one_step_parity(FrlArch::MNIST_LENET, &synthetic(8, 28, 9), 3, 1e-4, 1e-5);
    }

    /// Conv2 / Conv4 shapes on small images: non-pooled convolutions after
    /// the first (input gradient through a plain ReLU), odd sides (floor
    /// pooling), three linear layers.
    #[test]
    fn one_step_matches_burn_small_convs() {
        one_step_parity(FrlArch::Conv2 { channels: 1, side: 7, classes: 10 }, &synthetic(8, 7, 1), 4, 1e-4, 1e-5);
        one_step_parity(FrlArch::Conv4 { channels: 1, side: 8, classes: 10 }, &synthetic(8, 8, 2), 5, 1e-4, 1e-5);
    }

    /// A short local training (2 epochs on 64 samples, 16 steps, momentum
    /// on) gives nearly the same scores and rankings on both paths.
    #[cfg(feature = "embedded-data")]
    #[test]
    fn short_training_matches_burn_lenet() {
        let net = Supermask::new(&SupermaskConfig::new(FrlArch::MNIST_LENET, 7)).unwrap();
        let device = cpu_device();
        let data = lenet_data(64);
        let s0 = net.initial_scores();
        let cfg = FrlTrainConfig::mnist(0, 11);
        let (a, ra) = net.train(s0.clone(), &data, &cfg, &device).unwrap();
        let (b, rb) = net.train_burn(s0.clone(), &data, &cfg, &device).unwrap();
        assert_eq!(ra.steps, 16);
        assert!(
            (ra.mean_loss - rb.mean_loss).abs() < 1e-4 * rb.mean_loss.abs(),
            "{} vs {}",
            ra.mean_loss,
            rb.mean_loss
        );
        let (pa, pb) = (net.rankings(&a), net.rankings(&b));
        for (l, (dmax, dl2, masks)) in compare(&net, &s0, &a, &b).into_iter().enumerate() {
            let n = a[l].len();
            // Near-ties (gaps below the f32 noise of the two sum orders) may
            // swap: count the edges whose rank differs, and how far at most.
            let (qa, qb) = (positions(&pa[l]).unwrap(), positions(&pb[l]).unwrap());
            let moved = qa.iter().zip(&qb).filter(|(x, y)| x != y).count();
            let far = qa.iter().zip(&qb).map(|(&x, &y)| x.abs_diff(y)).max().unwrap_or(0);
            println!(
                "layer {l}: |S native − S burn| / |S − S⁰|: max {dmax:.2e}, L2 {dl2:.2e}; {masks} mask differences; \
                 {moved} of {n} ranks differ (by at most {far})"
            );
            assert!(dmax < 1e-4 && dl2 < 1e-5, "layer {l}: {dmax:e} {dl2:e}");
            assert!(masks * 10_000 <= n, "layer {l}: {masks} mask differences");
            assert!(moved * 20 <= n, "layer {l}: {moved} ranking differences");
            assert!(far <= 8, "layer {l}: a rank moved by {far}");
        }
    }

    #[cfg(feature = "embedded-data")]
    #[test]
    fn evaluation_matches_burn_and_ignores_batch_size() {
        let net = Supermask::new(&SupermaskConfig::new(FrlArch::MNIST_LENET, 2)).unwrap();
        let device = cpu_device();
        let split = crate::data::embedded_mnist();
        let test = split.test.subset(&(0..300).collect::<Vec<_>>()).unwrap();
        let (trained, _) =
            net.train(net.initial_scores(), &lenet_data(160), &FrlTrainConfig::mnist(0, 1), &device).unwrap();
        for scores in [net.initial_scores(), trained] {
            let a = net.evaluate_scores(&scores, &test, &device, 100).unwrap();
            let b = net.evaluate_scores_burn(&scores, &test, &device, 100).unwrap();
            println!("native {a:?}\nburn   {b:?}");
            assert_eq!((a.correct, a.total), (b.correct, b.total));
            assert!((a.mean_loss() - b.mean_loss()).abs() < 1e-5 * b.mean_loss().abs());
            let c = net.evaluate_scores(&scores, &test, &device, 7).unwrap();
            assert_eq!(a, c, "the batch size must not change the result");
        }
    }

    #[cfg(feature = "embedded-data")]
    #[test]
    fn native_training_is_bit_deterministic() {
        let net = Supermask::new(&SupermaskConfig::new(FrlArch::MNIST_LENET, 9)).unwrap();
        let device = cpu_device();
        let data = lenet_data(44); // the last batch of each epoch has 4 samples
        let cfg = FrlTrainConfig::mnist(3, 5);
        let (a, ra) = net.train(net.initial_scores(), &data, &cfg, &device).unwrap();
        let (b, rb) = net.train(net.initial_scores(), &data, &cfg, &device).unwrap();
        assert_eq!(ra, rb);
        assert_eq!(ra.steps, 12);
        assert!(a.iter().flatten().zip(b.iter().flatten()).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert_ne!(a, net.initial_scores());
    }

    /// Runs `steps` native steps with the given dispatch; returns the scores.
    fn run_steps(net: &Supermask, data: &Dataset, arch: Arch, steps: usize) -> Vec<Vec<f32>> {
        let mut scores = net.initial_scores();
        let mut momentum: Vec<Vec<f32>> = scores.iter().map(|s| vec![0.0; s.len()]).collect();
        let mut r = Runner::new(net, &scores, 8).unwrap();
        r.arch = arch;
        let table = net.config.input_norm.table();
        for step in 0..steps {
            let idx: Vec<usize> = (0..8).map(|k| (step * 8 + k) % data.len()).collect();
            r.load(data, &idx, &table);
            r.prepare(&scores, false);
            r.forward(false);
            assert!(r.loss().is_finite());
            r.backward_update(&mut scores, &mut momentum, Sgd { lr: 0.4, wd: 1e-4, mu: 0.9, first: step == 0 });
        }
        scores
    }

    /// The AVX2+FMA code and the portable fallback give the same bits (the
    /// kernels never depend on the vector width).
    #[test]
    fn simd_and_scalar_dispatch_agree_bitwise() {
        let arch = FrlArch::Conv4 { channels: 1, side: 8, classes: 10 };
        let net = Supermask::new(&SupermaskConfig::new(arch, 1)).unwrap();
        let data = synthetic(24, 8, 3);
        let fast = run_steps(&net, &data, Arch::new(), 3);
        let slow = run_steps(&net, &data, Arch::Scalar, 3);
        assert!(fast.iter().flatten().zip(slow.iter().flatten()).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    /// The threshold the trainer derives from its window (or fallback) is
    /// the one [`mask_threshold`] computes from scratch, step after step.
    #[test]
    fn trainer_thresholds_are_the_mask_thresholds() {
        let arch = FrlArch::Conv2 { channels: 1, side: 7, classes: 10 };
        let net = Supermask::new(&SupermaskConfig::new(arch, 6)).unwrap();
        let data = synthetic(32, 7, 4);
        let mut scores = net.initial_scores();
        let mut momentum: Vec<Vec<f32>> = scores.iter().map(|s| vec![0.0; s.len()]).collect();
        let mut r = Runner::new(&net, &scores, 8).unwrap();
        let table = net.config.input_norm.table();
        for step in 0..4 {
            let idx: Vec<usize> = (step * 8..step * 8 + 8).collect();
            r.load(&data, &idx, &table);
            r.prepare(&scores, false);
            r.forward(false);
            r.loss();
            r.backward_update(&mut scores, &mut momentum, Sgd { lr: 0.4, wd: 1e-4, mu: 0.9, first: step == 0 });
            for (l, s) in scores.iter().enumerate() {
                assert_eq!(r.keep[l].threshold, mask_threshold(s, net.keep[l]), "step {step} layer {l}");
                let m = mask(s, net.keep[l]);
                assert!(m.iter().enumerate().all(|(i, &k)| k == r.keep[l].keeps(s[i], i as u32)));
            }
        }
    }

    /// [`Window`] agrees with [`mask_threshold`] whenever it answers, and
    /// answers when the threshold is inside it; ties at the boundary too.
    #[test]
    fn window_threshold_is_exact_or_declines() {
        let s = crate::supermask::initial_layer_scores(3, 2, &net_layer());
        let tied: Vec<f32> = (0..5000).map(|i| [0.5f32, -0.5, 0.25, 0.0, 1.0][i % 5] * ((i % 7) as f32)).collect();
        for scores in [&s, &tied] {
            let n = scores.len();
            for keep in [0, 1, n / 3, n / 2, n / 2 + 1, n - 1, n] {
                let want = mask_threshold(scores, keep);
                for (center, width) in [(want, 1.0 / 2048.0), (want, 0.0), (MaskThreshold::ALL, 0.5), (want, 0.5)] {
                    let mut w = Window::default();
                    w.reset(center, width);
                    let mut code = vec![NEG; n];
                    for (k, chunk) in scores.chunks(64).enumerate() {
                        w.scan(chunk, k * 64, &mut code[k * 64..k * 64 + chunk.len()]);
                    }
                    match w.finish(n, keep) {
                        Some(t) => {
                            assert_eq!(t, want, "keep {keep}");
                            if keep > 0 && keep < n {
                                w.mark(t, &mut code);
                                let m = mask(scores, keep);
                                assert!(code.iter().zip(&m).all(|(&c, &k)| c == NEG | (u8::from(k) << 1)));
                            }
                        }
                        None => assert!(center != want || keep == 0 || keep >= n, "window at the answer declined"),
                    }
                }
            }
        }
    }

    fn net_layer() -> crate::supermask::MaskedLayer {
        FrlArch::Conv2 { channels: 1, side: 8, classes: 10 }.layers()[2]
    }

    /// Timing of the native path for FRL's LeNet at batch 8; run with
    /// `cargo test --release -p tally-kernels -- --ignored --nocapture speed_frl`.
    #[cfg(feature = "embedded-data")]
    #[test]
    #[ignore = "timing only"]
    fn speed_frl_lenet_native() {
        use std::time::Instant;
        let net = Supermask::new(&SupermaskConfig::new(FrlArch::MNIST_LENET, 1)).unwrap();
        let split = crate::data::embedded_mnist();
        let data = &split.train;
        let mut scores = net.initial_scores();
        let mut momentum: Vec<Vec<f32>> = scores.iter().map(|s| vec![0.0; s.len()]).collect();
        let mut r = Runner::new(&net, &scores, 8).unwrap();
        let table = net.config.input_norm.table();
        let layers = net.layers().len();
        let (reps, warm) = (200usize, 20usize);
        // Per step and phase: load, forward per layer, loss, backward per
        // layer, whole step. Medians and minima over the steps (the other
        // core may be busy: the minimum is the uncontended cost).
        let phases = 2 * layers + 3;
        let mut t: Vec<Vec<f64>> = vec![Vec::with_capacity(reps); phases];
        for step in 0..reps + warm {
            let idx: Vec<usize> = (0..8).map(|k| (step * 8 + k) % data.len()).collect();
            let p = Sgd { lr: 0.4, wd: 1e-4, mu: 0.9, first: step == 0 };
            let mut row = vec![0.0; phases];
            let t0 = Instant::now();
            r.load(data, &idx, &table);
            r.prepare(&scores, false);
            row[0] = t0.elapsed().as_secs_f64();
            for l in 0..layers {
                let c = Instant::now();
                r.forward_layer(l, false);
                row[1 + l] = c.elapsed().as_secs_f64();
            }
            let c = Instant::now();
            assert!(r.loss().is_finite());
            row[1 + layers] = c.elapsed().as_secs_f64();
            for l in (0..layers).rev() {
                let c = Instant::now();
                r.backward_layer(l, &mut scores, &mut momentum, p);
                row[2 + layers + l] = c.elapsed().as_secs_f64();
            }
            row[phases - 1] = t0.elapsed().as_secs_f64();
            if step >= warm {
                t.iter_mut().zip(&row).for_each(|(v, &x)| v.push(x));
            }
        }
        let stat = |v: &Vec<f64>| {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2] * 1e3, v[0] * 1e3)
        };
        let fmt = |i: usize| {
            let (med, min) = stat(&t[i]);
            let mean = t[i].iter().sum::<f64>() * 1e3 / t[i].len() as f64;
            format!("{med:.2}/{mean:.2} ({min:.2})")
        };
        let fwd: Vec<String> = (0..layers).map(|l| format!("L{l} {}", fmt(1 + l))).collect();
        let bwd: Vec<String> = (0..layers).map(|l| format!("L{l} {}", fmt(2 + layers + l))).collect();
        let (step_med, step_min) = stat(&t[phases - 1]);
        println!(
            "native LeNet step (bs 8), median/mean (min) ms: step {}; load+conv weights {}; forward [{}]; loss {}; \
             backward+update [{}]",
            fmt(phases - 1),
            fmt(0),
            fwd.join(", "),
            fmt(1 + layers),
            bwd.join(", ")
        );
        println!(
            "FRL round = 375 steps: {:.2} CPU-s at the median step, {:.2} at the fastest (step loop only)",
            step_med * 375.0 / 1e3,
            step_min * 375.0 / 1e3
        );

        // A whole client as the simulator runs it (rebuild + train + ranking).
        let device = cpu_device();
        let global = net.initial_ranking();
        let client = data.subset(&(0..60).collect::<Vec<_>>()).unwrap();
        let cfg = FrlTrainConfig::mnist(0, 0);
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let (_, rep) = net.train_round(&global, &client, &cfg, &device).unwrap();
            assert_eq!(rep.steps, 16);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let t = Instant::now();
        let (s, _) = net.train(net.scores_from_rankings(&global).unwrap(), &client, &cfg, &device).unwrap();
        let train_only = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        println!(
            "one FRL MNIST client (60 samples, 2 epochs = 16 steps): train_round {:.1} ms (train alone {:.1} ms) \
             -> 25 clients: {:.2} CPU-s per round",
            best * 1e3,
            train_only * 1e3,
            best * 25.0
        );

        // Evaluation of 10,000 images (the embedded test set, repeated).
        let test = split.test.subset(&(0..10_000).map(|i| i % split.test.len()).collect::<Vec<_>>()).unwrap();
        let t = Instant::now();
        let e = net.evaluate_scores(&scores, &test, &device, 500).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(e.total, 10_000);
        println!("evaluate_scores 10,000 images: {secs:.2} s ({:.3} ms/image)", secs * 1e3 / 10_000.0);
    }
}
