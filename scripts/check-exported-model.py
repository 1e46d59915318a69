#!/usr/bin/env python3
"""Evaluate a model file that Tally exported, in NumPy alone.

Reads a safetensors file written by Tally (the server's final_model*.safetensors,
`tally-client run --save-model`, `tally-client evaluate --export-dense`), rebuilds
the network from the architecture in its header (`tally.arch`), runs the forward
pass on the MNIST test images of an IDX directory (by default the embedded
subset, data/mnist-subset: the 2,000 test images `tally-client evaluate
--data embedded` uses) and prints `accuracy=... examples=...`.

With --expect-accuracy A it exits 1 unless the accuracy is within --tolerance
(default 0.001, a tenth of a point) of A: the test suite runs it on a FedAvg MLP
and on an FRL dense export and compares with `tally-client evaluate`.

Needs only NumPy (Debian: python3-numpy). The safetensors format is read here
directly (8-byte little-endian header length, a JSON header, raw little-endian
tensor data) rather than through the `safetensors` package, so nothing else is
needed. The layouts are documented in docs/model-files.md.

Supported: `mlp`, `lenet5` (content `parameters`), and FRL supermask networks
as their dense export (content `frl-dense`). An FRL model's scores need the
frozen network regenerated from the run's seed: export it first with
`tally-client evaluate --model F --export-dense OUT`.
"""

import argparse
import gzip
import json
import os
import struct
import sys

import numpy as np

# Largest safetensors header accepted: Tally's limit
# (tally_protocol::model_file::MAX_HEADER_BYTES); ours are under 2 KiB.
MAX_HEADER_BYTES = 1024 * 1024
# Images per forward batch: bounds the activations (FRL's LeNet holds
# 64 x 28 x 28 floats, 200 KB, per image after its second convolution).
BATCH = 100

DTYPES = {"F32": "<f4", "F64": "<f8", "F16": "<f2"}


def read_safetensors(path):
    """(tensors: name -> ndarray, metadata: dict) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} is beyond the file or the limit")
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    meta = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: {name}: dtype {info['dtype']} not supported here")
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= len(data):
            raise ValueError(f"{path}: {name}: data offsets beyond the file")
        arr = np.frombuffer(data[start:end], dtype=dtype)
        shape = tuple(info["shape"])
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{path}: {name}: {arr.size} values for shape {shape}")
        tensors[name] = arr.reshape(shape).astype(np.float32)
    return tensors, meta


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic, count = struct.unpack(">II", raw[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", raw[8:16])
        return np.frombuffer(raw[16:], dtype=np.uint8).reshape(count, rows, cols)
    if magic == 2049:
        return np.frombuffer(raw[8:], dtype=np.uint8).reshape(count)
    raise ValueError(f"{path}: not an IDX image or label file (magic {magic})")


def find_idx(directory, stem):
    for name in (stem, stem + ".gz"):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{directory}: no {stem}[.gz]")


def load_test_set(directory):
    images = read_idx(find_idx(directory, "t10k-images-idx3-ubyte"))
    labels = read_idx(find_idx(directory, "t10k-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels")
    return images, labels


def pixel_table(mean, std):
    """(p/255 - mean)/std in float32, each operation rounded as Tally does."""
    p = np.arange(256, dtype=np.float32)
    return (p / np.float32(255.0) - np.float32(mean)) / np.float32(std)


def relu(x):
    return np.maximum(x, np.float32(0))


def conv2d(x, w, bias=None, pad=0):
    """x: [B, C, H, W], w: [O, C, k, k], stride 1. A sum over the k*k kernel
    offsets of one matrix product each: no k*k-times im2col buffer."""
    o, _, k, _ = w.shape
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    b, c, h, wd = x.shape
    ho, wo = h - k + 1, wd - k + 1
    out = np.zeros((b, o, ho * wo), dtype=np.float32)
    for dy in range(k):
        for dx in range(k):
            shifted = np.ascontiguousarray(x[:, :, dy : dy + ho, dx : dx + wo]).reshape(b, c, ho * wo)
            out += np.matmul(w[:, :, dy, dx], shifted)
    out = out.reshape(b, o, ho, wo)
    if bias is not None:
        out += bias.reshape(1, o, 1, 1)
    return out


def maxpool2(x):
    b, c, h, w = x.shape
    x = x[:, :, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def linear(x, w, bias=None):
    out = x @ w.T
    return out + bias if bias is not None else out


def frl_layers(arch):
    """FRL's layer list (tally_protocol::supermask::FrlArch::layers):
    (kind, inputs, outputs, pool_after), every conv 3x3 padding 1."""
    net, classes = arch["net"], arch["classes"]
    if net == "lenet":
        return [("conv", 1, 32, False), ("conv", 32, 64, True),
                ("linear", 64 * 14 * 14, 128, False), ("linear", 128, classes, False)]
    widths = {"conv2": [64], "conv4": [64, 128], "conv8": [64, 128, 256, 512]}.get(net)
    if widths is None:
        raise ValueError(f"unknown FRL network {net!r}")
    layers, prev = [], arch["channels"]
    for w in widths:
        layers += [("conv", prev, w, False), ("conv", w, w, True)]
        prev = w
    side = arch["side"] >> len(widths)
    return layers + [("linear", prev * side * side, 256, False), ("linear", 256, 256, False),
                     ("linear", 256, classes, False)]


def forward(arch, content, t, x):
    """Logits of a batch x: [B, H, W] float32 (already normalised)."""
    kind = arch["kind"]
    b = x.shape[0]
    if kind == "mlp" and content == "parameters":
        h = x.reshape(b, -1)
        n = len(arch["hidden"]) + 1
        for i in range(n):
            h = linear(h, t[f"layers.{i}.weight"], t[f"layers.{i}.bias"])
            if i < n - 1:
                h = relu(h)
        return h
    if kind == "lenet5" and content == "parameters":
        h = x.reshape(b, 1, 28, 28)
        h = maxpool2(relu(conv2d(h, t["conv1.weight"], t["conv1.bias"], pad=2)))
        h = maxpool2(relu(conv2d(h, t["conv2.weight"], t["conv2.bias"])))
        h = h.reshape(b, -1)
        h = relu(linear(h, t["fc1.weight"], t["fc1.bias"]))
        h = relu(linear(h, t["fc2.weight"], t["fc2.bias"]))
        return linear(h, t["fc3.weight"], t["fc3.bias"])
    if kind == "supermask" and content == "frl-dense":
        layers = frl_layers(arch)
        h = x.reshape(b, arch.get("channels", 1), x.shape[1], x.shape[2])
        for l, (lk, _, _, pool) in enumerate(layers):
            w = t[f"layers.{l}.weight"]
            if lk == "conv":
                h = conv2d(h, w, pad=1)
            else:
                # Flattened in (channel, row, col) order before the first linear layer.
                h = linear(h.reshape(b, -1), w)
            if l < len(layers) - 1:
                h = relu(h)
            if pool:
                h = maxpool2(h)
        return h
    if kind == "supermask":
        raise ValueError("an FRL model's scores need its frozen network: evaluate its dense export "
                         "(final_model_dense.safetensors, or tally-client evaluate --export-dense)")
    raise ValueError(f"unsupported model {kind!r} with content {content!r}")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a safetensors file written by Tally")
    ap.add_argument("--data", default=os.path.join(here, "..", "data", "mnist-subset"),
                    help="directory with t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]")
    ap.add_argument("--expect-accuracy", type=float, help="fail unless the accuracy is this, within --tolerance")
    ap.add_argument("--tolerance", type=float, default=0.001)
    args = ap.parse_args()

    tensors, meta = read_safetensors(args.model)
    if meta.get("tally.format_version") != "1":
        sys.exit(f"{args.model}: no Tally metadata of format 1 (tally.format_version = "
                 f"{meta.get('tally.format_version')!r})")
    arch = json.loads(meta["tally.arch"])
    content = meta["tally.content"]
    table = pixel_table(float(meta["tally.input_mean"]), float(meta["tally.input_std"]))
    images, labels = load_test_set(args.data)

    correct = 0
    for start in range(0, len(images), BATCH):
        x = table[images[start : start + BATCH]]
        logits = forward(arch, content, tensors, x)
        # argmax takes the first of equal maxima, as Tally's evaluation does.
        correct += int((logits.argmax(axis=1) == labels[start : start + BATCH]).sum())
    accuracy = correct / len(images)
    print(f"accuracy={accuracy:.4f} examples={len(images)} arch={json.dumps(arch)} content={content}")
    if args.expect_accuracy is not None and abs(accuracy - args.expect_accuracy) > args.tolerance:
        sys.exit(f"accuracy {accuracy:.4f} differs from the expected {args.expect_accuracy:.4f} "
                 f"by more than {args.tolerance}")


if __name__ == "__main__":
    main()
