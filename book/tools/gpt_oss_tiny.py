#!/usr/bin/env python3
"""Writes gpt-oss-tiny/model.safetensors: two MoE layers in gpt-oss's layout
as the hub ships it (a router with a bias, MXFP4 experts), tiny and random,
for the book's pages on loading checkpoints. numpy is the only dependency.

    python3 book/tools/gpt_oss_tiny.py [DIR]    # default: gpt-oss-tiny
"""
import json
import os
import sys

import numpy as np

HIDDEN, FFN, EXPERTS, LAYERS = 64, 64, 32, 2


def tensors():
    rng = np.random.default_rng(0)
    out = {}
    for n in range(LAYERS):
        p = f"model.layers.{n}.mlp."
        out[p + "router.weight"] = (rng.standard_normal((EXPERTS, HIDDEN)) * 0.1).astype(np.float32)
        bias = np.zeros(EXPERTS, np.float32)
        if n == 1:
            bias[3] = 0.25  # a logit bias: it changes which experts are chosen
        out[p + "router.bias"] = bias
        # MXFP4: 32 e2m1 values per block, two per byte, and an e8m0 scale
        # per block; gate and up interleaved in gate_up_proj's rows.
        for name, rows, cols in (("gate_up_proj", 2 * FFN, HIDDEN), ("down_proj", HIDDEN, FFN)):
            e = p + "experts." + name
            out[e + "_blocks"] = rng.integers(0, 256, (EXPERTS, rows, cols // 32, 16), dtype=np.uint8)
            out[e + "_scales"] = rng.integers(122, 127, (EXPERTS, rows, cols // 32), dtype=np.uint8)
            out[e + "_bias"] = (rng.standard_normal((EXPERTS, rows)) * 0.01).astype(np.float32)
    return out


def write_safetensors(path, named):
    """An 8-byte little-endian header size, the JSON header, then the data."""
    header, blobs, at = {}, [], 0
    for name in sorted(named):
        array = np.ascontiguousarray(named[name])
        dtype = {np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32"}[array.dtype]
        data = array.tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for data in blobs:
            f.write(data)


if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else "gpt-oss-tiny"
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors())
