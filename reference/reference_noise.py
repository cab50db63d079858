#!/usr/bin/env python3
"""How far do legitimate implementation choices move the logits?

Reads the golden fixture (for the prompt ids and the float32 greedy tokens),
re-runs the float32 reference teacher-forced on prompt + greedy tokens, and
compares it, at every greedy step, with:

  f64        the same dequantized weights in float64 (RMSNorm, softmax and
             RoPE in float64 too): the float32 rounding noise floor. golden.py
             stores this number in the fixture as f32_vs_f64_max_abs_logit_diff.
  q8act      every matmul input quantized per block of 32 to int8 with an fp16
             scale, as llama.cpp's CPU backend does (Q8_1 for Q4_1 weights,
             Q8_0 for the Q8_0 tied output head) before its integer dot products.
  q8act+f16kv  q8act, plus q, K and V rounded to fp16 (llama.cpp's default
             fp16 KV cache).

It prints, per variant, the max abs logit difference at the last prompt
position and over all steps, and how many teacher-forced greedy argmaxes
change. Use it to choose test tolerances for an engine that does (or does not)
quantize activations.

    python reference/reference_noise.py [MODEL.gguf] [--fixture FILE] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from golden import DEFAULT_MODEL, DEFAULT_OUT, THREADS, true_float64  # noqa: E402


def q8_blocks(x):
    """Quantize the last dim in blocks of 32 like ggml's quantize_row_q8_0/q8_1."""
    import torch

    shape = x.shape
    xb = x.reshape(*shape[:-1], shape[-1] // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    idv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * idv).clamp(-127, 127)  # roundf: half away from zero; ties are rare
    d16 = d.half().to(x.dtype)
    return (q * d16).reshape(shape)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("--fixture", default=DEFAULT_OUT)
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()

    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama as ml

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    with open(args.fixture, encoding="utf-8") as f:
        fx = json.load(f)
    model_dir, model_file = os.path.split(os.path.abspath(args.model))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=model_file, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    seqs = [(p["name"], p["prompt_ids"], p["greedy_ids"]) for p in fx["prompts"]]

    def run_all():
        outs = []
        with torch.no_grad():
            for _, ids, greedy in seqs:
                seq = torch.tensor([ids + greedy[:-1]])
                outs.append(model(seq, use_cache=False).logits[0, len(ids) - 1 :].to(torch.float64))
        return outs

    t0 = time.time()
    ref = run_all()
    # Sanity: the recomputed float32 reference still matches the fixture.
    for (name, _, greedy), r, p in zip(seqs, ref, fx["prompts"]):
        assert r.argmax(-1).tolist() == greedy, f"{name}: float32 rerun disagrees with the fixture"
        top = p["last_logits_top5"][0]
        assert abs(float(r[0, top[0]]) - top[1]) < 1e-3, name

    def compare(label, outs):
        last = max(float((o[0] - r[0]).abs().max()) for o, r in zip(outs, ref))
        alls = max(float((o - r).abs().max()) for o, r in zip(outs, ref))
        flips, steps = [], 0
        for (name, _, greedy), o, p in zip(seqs, outs, fx["prompts"]):
            am = o.argmax(-1).tolist()
            steps += len(am)
            for i, (a, g) in enumerate(zip(am, greedy)):
                if a != g:
                    flips.append({"prompt": name, "step": i, "ref_margin": p["greedy_margins"][i]})
        res = {
            "max_abs_logit_diff_last": last,
            "max_abs_logit_diff_all_steps": alls,
            "argmax_changes": len(flips),
            "steps": steps,
            "changes": flips,
        }
        print(
            f"{label:>12}: last {last:.3g}, all steps {alls:.3g}, argmax changes "
            f"{len(flips)}/{steps} {flips[:4]}  ({time.time() - t0:.0f}s)",
            file=sys.stderr,
        )
        return res

    report = {"model_file": model_file, "fixture": os.path.basename(args.fixture)}

    # Activation quantization before every Linear (all of them hold quantized weights).
    orig_linear = nn.Linear.forward

    def q8_linear(self, x):
        return nn.functional.linear(q8_blocks(x), self.weight, self.bias)

    orig_attn = ml.eager_attention_forward

    def f16_attn(module, query, key, value, *a, **k):
        r16 = lambda t: t.half().to(t.dtype)
        return orig_attn(module, r16(query), r16(key), r16(value), *a, **k)

    nn.Linear.forward = q8_linear
    try:
        report["q8act"] = compare("q8act", run_all())
        ml.eager_attention_forward = f16_attn
        try:
            report["q8act_f16kv"] = compare("q8act+f16kv", run_all())
        finally:
            ml.eager_attention_forward = orig_attn
    finally:
        nn.Linear.forward = orig_linear

    model.double()
    with true_float64(ml):
        report["f64"] = compare("f64", run_all())

    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
