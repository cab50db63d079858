#!/usr/bin/env python3
"""Generates fixtures/quant/<TYPE>.json: random valid blocks of each GGML type
tandem supports, with gguf-py's dequantisation of them.

The Rust tests (model/src/quant.rs) compare `dequantize_row` against these
bit for bit, so values are stored as f32 bit patterns (u32), not decimals.

Usage: python reference/quant_reference.py   (needs numpy and gguf==0.19.0)
"""
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize

SEED = 20240613
OUT_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "quant"))

# type name -> (ggml type, number of blocks, byte offsets of f16 scale fields in a block)
TYPES = {
    "F32": (T.F32, 64, None),
    "F16": (T.F16, 64, None),
    "BF16": (T.BF16, 64, None),
    "Q4_0": (T.Q4_0, 8, [0]),
    "Q4_1": (T.Q4_1, 8, [0, 2]),
    "Q8_0": (T.Q8_0, 8, [0]),
    "Q4_K": (T.Q4_K, 4, [0, 2]),
    "Q5_K": (T.Q5_K, 4, [0, 2]),
    "Q6_K": (T.Q6_K, 4, [208]),
}


def sane_f16(rng, n):
    """Finite f16 values of both signs over a wide range of magnitudes,
    including f16 subnormals and exact zeros, so sign-of-zero and exactness
    corner cases are exercised."""
    mag = rng.uniform(0.5, 2.0, n) * np.exp2(rng.integers(-22, 6, n).astype(np.float64))
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    v = (sign * mag).astype(np.float16)
    v[rng.random(n) < 0.05] = np.float16(0.0)
    assert np.all(np.isfinite(v))
    return v


def make_blocks(rng, qtype, n_blocks, f16_fields):
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    if qtype == T.F16:
        raw = sane_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    elif f16_fields:
        for off in f16_fields:
            raw[:, off:off + 2] = sane_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def main():
    rng = np.random.default_rng(SEED)
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, (qtype, n_blocks, f16_fields) in TYPES.items():
        data = make_blocks(rng, qtype, n_blocks, f16_fields)
        values = np.asarray(dequantize(data, qtype), dtype=np.float32).reshape(-1)
        block_elems, _ = GGML_QUANT_SIZES[qtype]
        assert values.size == n_blocks * block_elems
        doc = {
            "type": name,
            "ggml_type": int(qtype),
            "n_elements": int(values.size),
            "generator": "reference/quant_reference.py (gguf-py gguf.quants.dequantize)",
            "seed": SEED,
            "bytes_hex": data.tobytes().hex(),
            "f32_bits": [int(x) for x in values.view(np.uint32)],
        }
        path = os.path.join(OUT_DIR, f"{name}.json")
        with open(path, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
            f.write("\n")
        print(f"{path}: {values.size} values, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
