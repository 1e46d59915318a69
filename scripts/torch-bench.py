#!/usr/bin/env python3
"""PyTorch reference for `tally-client gpu-bench`: the same models and batch
sizes on the same GPU, so burn-wgpu's step time can be compared with
PyTorch's (CUDA). Writes JSON to stdout (and --out).

  python3 scripts/torch-bench.py --out torch-bench.json [--steps 200]

Models, as Tally's benchmark runs them:
- MLP 784-200-200-10 (ReLU), cross-entropy, plain SGD lr 0.01, batch 32 and 256;
- FRL's LeNet supermask (conv3x3 1->32, conv3x3 32->64, 2x2 max-pool,
  fc 12544->128, fc 128->10, no biases, frozen weights), scores trained by
  SGD (momentum 0.9, weight decay 1e-4) through a straight-through top-k mask
  that keeps the highest-scoring half of each layer's edges, batch 8.
Also a device-to-device copy and a naive Rademacher perturb-apply at 16M
parameters (torch.randint signs, not Tally's ChaCha stream), for scale.
Inputs are random tensors of MNIST shape: the step time does not depend on
pixel values. Timings use CUDA events after warm-up.
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def timed(fn, steps, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps  # ms per call


def step_bench(name, model, params, opt_kwargs, x, y, batch, steps):
    """First step (wall clock, CUDA init and kernels included) and the
    steady step time of SGD on (x, y)."""
    opt = torch.optim.SGD(params, **opt_kwargs)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    step().item()
    first = time.perf_counter() - t0
    ms = timed(step, steps)
    return {"model": name, "batch": batch, "device": "torch-cuda", "first_step_secs": first,
            "ms_per_step": ms, "steps_per_sec": 1e3 / ms}


def mlp_bench(batch, steps, dev):
    model = nn.Sequential(nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10)).to(dev)
    x = torch.rand(batch, 784, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    return step_bench("mlp-784-200-200-10", model, model.parameters(), {"lr": 0.01}, x, y, batch, steps)


class TopHalf(torch.autograd.Function):
    """Keep the top half of the scores (sorted every step, as FRL's code
    does); the gradient passes straight through to the scores."""

    @staticmethod
    def forward(ctx, scores):
        flat = scores.flatten()
        k = flat.numel() // 2
        idx = flat.argsort(descending=True)[:k]
        mask = torch.zeros_like(flat)
        mask[idx] = 1.0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx, g):
        return g


class SupermaskLeNet(nn.Module):
    def __init__(self):
        super().__init__()
        shapes = [(32, 1, 3, 3), (64, 32, 3, 3), (128, 12544), (10, 128)]
        self.w = [torch.randn(s) * 0.1 for s in shapes]
        self.scores = nn.ParameterList([nn.Parameter(torch.randn(s) * 0.01) for s in shapes])

    def to(self, dev):
        super().to(dev)
        self.w = [w.to(dev) for w in self.w]
        return self

    def forward(self, x):
        m = [w * TopHalf.apply(s) for w, s in zip(self.w, self.scores)]
        x = F.relu(F.conv2d(x, m[0], padding=1))
        x = F.max_pool2d(F.relu(F.conv2d(x, m[1], padding=1)), 2)
        x = F.relu(F.linear(x.flatten(1), m[2]))
        return F.linear(x, m[3])


def frl_bench(batch, steps, dev):
    model = SupermaskLeNet().to(dev)
    x = torch.rand(batch, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    opt = {"lr": 0.4, "momentum": 0.9, "weight_decay": 1e-4}
    return step_bench("frl-lenet-supermask", model, model.scores.parameters(), opt, x, y, batch, steps)


def bandwidth(n, dev, reps=200):
    a = torch.rand(n, device=dev)
    b = torch.empty_like(a)
    copy_ms = timed(lambda: b.copy_(a), reps)
    sign = torch.empty(n, device=dev)

    def perturb():
        # Naive: materialise z, then a += c*z (what the fused kernel avoids).
        sign.random_(0, 2).mul_(2).sub_(1)
        a.add_(sign, alpha=1e-3)

    pert_ms = timed(perturb, reps)
    gb = 8 * n / 1e9
    return {"params": n, "copy_gbps": gb / (copy_ms / 1e3), "naive_perturb_apply_gbps": gb / (pert_ms / 1e3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    dev = torch.device("cuda")
    report = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "training": [mlp_bench(32, args.steps, dev), mlp_bench(256, args.steps, dev), frl_bench(8, args.steps, dev)],
        "bandwidth": [bandwidth(16_000_000, dev)],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
