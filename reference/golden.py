#!/usr/bin/env python3
"""Regenerate the golden fixtures that tandem's fidelity tests read.

The reference is Hugging Face `transformers` loading the GGUF file itself
(weights dequantized to float32 by the `gguf` package), run on the CPU in
float32 with eager attention, 2 threads, deterministic algorithms.

For each prompt the fixture records the exact token ids, the top-5 logits and
the first 64 vocabulary logits at the last prompt position, and 32 steps of
plain greedy decoding (argmax, no sampling, no repetition penalty, no stop on
EOS) with the top1-top2 margin and top-5 logits at every step.

It also measures how far float32 arithmetic alone moves the logits: the same
dequantized weights are run in float64 (with RMSNorm, softmax and RoPE also in
float64, which stock transformers keeps in float32) teacher-forced on the
float32 greedy tokens. That difference is the noise floor of any float32
implementation and justifies the tolerance the Rust tests use.

Usage (from the repository root, with the pinned packages of
reference/requirements.txt installed):

    python reference/golden.py [MODEL.gguf] [--out fixtures/golden/NAME.json]

Takes a few minutes on 2 cores. Tests read the JSON and need none of this.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager

DEFAULT_MODEL = os.path.join(
    os.environ.get("TANDEM_CACHE", os.path.expanduser("~/.cache/tandem")),
    "models",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
)
DEFAULT_OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "fixtures",
    "golden",
    "smollm2-135m-instruct-q4_1.json",
)

GREEDY_STEPS = 32
TOPK = 5
HEAD = 64
THREADS = 2

LONG_TEXT = (
    "The history of computing is often told as a story of machines, but it is "
    "just as much a story of ideas. In the nineteenth century, Charles Babbage "
    "designed the Analytical Engine, a mechanical computer that was never "
    "completed in his lifetime. Ada Lovelace, who translated and annotated a "
    "description of the engine, realised that it could manipulate symbols as "
    "well as numbers, and she wrote what is often called the first computer "
    "program. A century later, Alan Turing described an abstract machine that "
    "could carry out any computation that can be written down as a sequence of "
    "precise steps. Electronic machines such as Colossus and ENIAC filled "
    "entire rooms and used thousands of vacuum tubes. The invention of "
    "the transistor in 1947 and of the integrated circuit a decade later made "
    "computers smaller, faster and far more reliable. By the 1970s, a complete "
    "processor could fit on a single chip, and personal computers began to "
    "appear in homes and offices. Today, a typical smartphone holds more computing power than all of the "
    "computers that guided the first astronauts to the Moon in 1969. Yet the "
    "central questions remain the ones that Babbage, Lovelace and Turing asked: "
    "what can be computed, how quickly, and at what cost? In the last few years "
    "a new kind of program has joined this long story. Large language models "
    "learn statistical patterns from enormous amounts of text, and they can "
    "answer questions, summarise documents and write code. To understand why "
    "they work, and where they fail, we have to look closely at"
)

# kind "text": the text is tokenized as is. kind "chat": the messages are
# rendered with the model's chat template (add_generation_prompt=True) and the
# rendered string is tokenized.
PROMPTS = [
    {"name": "text_short", "kind": "text", "text": "The capital of France is"},
    {
        "name": "text_medium",
        "kind": "text",
        "text": (
            "Once upon a time, in a small village at the edge of a great forest, "
            "there lived an old clockmaker named Elias. Every morning he opened "
            "his shop at exactly 7:30, and every evening he"
        ),
    },
    {"name": "text_long", "kind": "text", "text": LONG_TEXT},
    {
        "name": "chat_default_system",
        "kind": "chat",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    },
    {
        "name": "chat_with_system",
        "kind": "chat",
        "messages": [
            {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
    },
    {
        "name": "chat_multi_turn",
        "kind": "chat",
        "messages": [
            {"role": "user", "content": "I have 3 apples and buy 5 more. How many do I have?"},
            {"role": "assistant", "content": "You have 8 apples."},
            {"role": "user", "content": "Now I give 2 of them to a friend. How many are left?"},
        ],
    },
    {
        "name": "chat_code",
        "kind": "chat",
        "messages": [
            {
                "role": "user",
                "content": "Write a Python function `factorial(n)` that returns n! for n >= 0.",
            }
        ],
    },
    {
        "name": "text_non_ascii",
        "kind": "text",
        "text": (
            "Voilà une phrase en français : « Le café est très chaud ». "
            "Auf Deutsch: Grüße aus München! 日本語の文章も少し書きます。 "
            "Emoji 🚀✨ and maths ∑ x² ≤ π. Translation into English:"
        ),
    },
]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def top_k(logits, k):
    """[[id, logit], ...] sorted by logit (descending, ties by lower id)."""
    import torch

    vals, idx = torch.topk(logits.to(torch.float64), k + 8)
    pairs = sorted(zip(idx.tolist(), vals.tolist()), key=lambda p: (-p[1], p[0]))
    return [[int(i), float(v)] for i, v in pairs[:k]]


@contextmanager
def true_float64(modeling):
    """Make RMSNorm, eager softmax and RoPE compute in the input dtype.

    Stock transformers upcasts/downcasts these to float32 whatever the model
    dtype, which would hide part of the float32 error in a float64 run. For
    float32 inputs the patched functions are the same maths.
    """
    import torch
    from torch import nn

    orig_norm = modeling.LlamaRMSNorm.forward
    orig_rope = modeling.LlamaRotaryEmbedding.forward
    orig_attn = modeling.eager_attention_forward

    def norm_forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states

    @torch.no_grad()
    def rope_forward(self, x, position_ids):
        base = self.config.rope_parameters["rope_theta"]
        dim = self.inv_freq.shape[0] * 2
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (
            emb.sin() * self.attention_scaling
        ).to(x.dtype)

    def attn_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key_states = modeling.repeat_kv(key, module.num_key_value_groups)
        value_states = modeling.repeat_kv(value, module.num_key_value_groups)
        attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_output = torch.matmul(attn_weights, value_states)
        return attn_output.transpose(1, 2).contiguous(), attn_weights

    modeling.LlamaRMSNorm.forward = norm_forward
    modeling.LlamaRotaryEmbedding.forward = rope_forward
    modeling.eager_attention_forward = attn_forward
    try:
        yield
    finally:
        modeling.LlamaRMSNorm.forward = orig_norm
        modeling.LlamaRotaryEmbedding.forward = orig_rope
        modeling.eager_attention_forward = orig_attn


def digits_tokenizer(tok):
    """The GGUF-derived tokenizer plus SmolLM's individual-digit pre-split.

    transformers rebuilds the tokenizer from the GGUF vocabulary with a plain
    ByteLevel pre-tokenizer; the original SmolLM2 tokenizer.json (and
    llama.cpp's `smollm` pre-tokenizer) first split every digit. Used only to
    check that the two agree on every prompt.
    """
    from tokenizers import Tokenizer, pre_tokenizers

    t = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return t


def compact_json(obj, indent=0):
    """JSON with one item per line, but lists of scalars (or of short scalar
    lists, like [id, logit] pairs) kept on a single line."""
    pad = "  " * indent
    inner = "  " * (indent + 1)

    def flat(o):
        return json.dumps(o, ensure_ascii=False, separators=(",", ":"))

    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {compact_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        scalar = lambda o: not isinstance(o, (dict, list))
        if all(scalar(o) or (isinstance(o, list) and all(scalar(x) for x in o)) for o in obj):
            if all(scalar(o) for o in obj) or len(obj) <= 8:
                return flat(obj)
            return "[\n" + ",\n".join(inner + flat(o) for o in obj) + "\n" + pad + "]"
        return "[\n" + ",\n".join(inner + compact_json(o, indent + 1) for o in obj) + "\n" + pad + "]"
    return flat(obj)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="path to the .gguf file")
    ap.add_argument("--out", default=DEFAULT_OUT, help="fixture JSON to write")
    ap.add_argument("--steps", type=int, default=GREEDY_STEPS)
    ap.add_argument("--skip-f64", action="store_true", help="skip the float64 noise measurement")
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import numpy as np
    import torch
    import transformers
    import gguf
    import tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama import modeling_llama

    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    torch.use_deterministic_algorithms(True)

    model_path = os.path.abspath(args.model)
    model_dir, model_file = os.path.split(model_path)
    t0 = time.time()
    print(f"hashing {model_path}", file=sys.stderr)
    sha = sha256_file(model_path)

    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=model_file, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    cfg = model.config
    print(f"loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    dig = digits_tokenizer(tok)
    eos_ids = sorted({int(tok.eos_token_id), 2})

    results = []
    for p in PROMPTS:
        t1 = time.time()
        if p["kind"] == "chat":
            text = tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
        else:
            text = p["text"]
        ids = tok(text, add_special_tokens=False).input_ids
        ids_digits = dig.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text, f"{p['name']}: decode(encode(text)) != text"

        # float32 greedy decoding with the KV cache.
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].clone()
            last_logits = logits.clone()
            greedy, margins, top5s, step_logits = [], [], [], []
            for step in range(args.steps):
                step_logits.append(logits.clone())
                t5 = top_k(logits, TOPK)
                nxt = int(torch.argmax(logits))
                assert nxt == t5[0][0] or t5[0][1] == t5[1][1]
                greedy.append(nxt)
                margins.append(t5[0][1] - t5[1][1])
                top5s.append(t5)
                if step + 1 == args.steps:
                    break
                out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1].clone()
            cached = torch.stack(step_logits)  # [steps, vocab]

            # The same steps as one full forward pass (teacher forced, no cache).
            seq = torch.tensor([ids + greedy[:-1]])
            full = model(seq, use_cache=False).logits[0, len(ids) - 1 :].clone()
        cache_diff = float((full - cached).abs().max())

        first_eos = next((i for i, t in enumerate(greedy) if t in eos_ids), None)
        results.append(
            {
                "name": p["name"],
                "kind": p["kind"],
                **({"messages": p["messages"]} if p["kind"] == "chat" else {}),
                "text": text,
                "n_prompt_tokens": len(ids),
                "prompt_ids": ids,
                "last_logits_top5": top_k(last_logits, TOPK),
                "last_logits_head": [float(x) for x in last_logits[:HEAD].tolist()],
                "greedy_ids": greedy,
                "greedy_text": tok.decode(greedy),
                "greedy_first_eos_step": first_eos,
                "greedy_margins": margins,
                "greedy_top5": top5s,
                "checks": {
                    "digit_split_tokenizer_agrees": ids_digits == ids,
                    "cache_vs_full_forward_max_abs_logit_diff": cache_diff,
                },
            }
        )
        results[-1]["_seq"] = seq  # internal, removed before writing
        results[-1]["_f32_all"] = full
        print(
            f"{p['name']}: {len(ids)} prompt tokens, min margin {min(margins):.4g}, "
            f"cache diff {cache_diff:.3g}, digits agree {ids_digits == ids}, "
            f"{time.time() - t1:.1f}s, greedy {tok.decode(greedy)!r}",
            file=sys.stderr,
        )

    # float64 noise measurement on the same weights, teacher forced on the
    # float32 greedy tokens.
    f64_last_max = f64_all_max = None
    if not args.skip_f64:
        model.double()
        with true_float64(modeling_llama), torch.no_grad():
            f64_last_max, f64_all_max = 0.0, 0.0
            for r in results:
                t1 = time.time()
                ids_n = r["n_prompt_tokens"]
                l64 = model(r["_seq"], use_cache=False).logits[0, ids_n - 1 :]
                l32 = r["_f32_all"].to(torch.float64)
                d_all = (l64 - l32).abs()
                d_last = float(d_all[0].max())
                argmax64 = l64.argmax(-1).tolist()
                r["checks"]["f32_vs_f64_max_abs_logit_diff_last"] = d_last
                r["checks"]["f32_vs_f64_max_abs_logit_diff_all_steps"] = float(d_all.max())
                r["checks"]["f64_greedy_agrees_steps"] = sum(
                    int(a == b) for a, b in zip(argmax64, r["greedy_ids"])
                )
                r["checks"]["f64_min_margin"] = float(
                    min(float(x) for x in (lambda s: s[:, 0] - s[:, 1])(torch.topk(l64, 2).values))
                )
                f64_last_max = max(f64_last_max, d_last)
                f64_all_max = max(f64_all_max, float(d_all.max()))
                print(
                    f"{r['name']}: f32 vs f64 last {d_last:.3g}, all {float(d_all.max()):.3g}, "
                    f"argmax agrees {r['checks']['f64_greedy_agrees_steps']}/{len(argmax64)}, "
                    f"{time.time() - t1:.1f}s",
                    file=sys.stderr,
                )

    for r in results:
        del r["_seq"], r["_f32_all"]
    all_margins = [m for r in results for m in r["greedy_margins"]]
    fixture = {
        "format": "tandem-golden-v1",
        "generated_by": "reference/golden.py",
        "model_file": model_file,
        "model_sha256": sha,
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            "dtype": "float32",
            "attn_implementation": "eager",
            "torch_threads": THREADS,
            "deterministic_algorithms": True,
            "device": "cpu",
            "weights": "GGUF dequantized to float32 by transformers/gguf (no quantized matmuls)",
            "tokenization": (
                "tokenizer(text, add_special_tokens=False): no BOS is added "
                "(GGUF tokenizer.ggml.add_bos_token=false, and the converted tokenizer "
                "adds none either); chat prompts are the chat template rendered with "
                "add_generation_prompt=True, whose special tokens are parsed as added tokens"
            ),
            "greedy": (
                "argmax of the logits, no sampling, no repetition penalty, does not stop at "
                "EOS; computed with the KV cache and cross-checked against one full forward pass"
            ),
            "greedy_steps": args.steps,
            "greedy_top5_step_i": "top-5 of the logits that chose greedy_ids[i]; step 0 is the last prompt position",
            "greedy_margins": "top1 - top2 logit at each step",
            "last_logits_head": f"logits of token ids 0..{HEAD - 1} at the last prompt position",
            "f32_vs_f64": (
                "same dequantized weights in float64 (RMSNorm, softmax, RoPE in float64 too), "
                "teacher forced on the float32 greedy tokens; max abs logit difference"
            ),
        },
        "config": {
            "architecture": "llama",
            "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
            "bos_token_id": 1,
            "eos_token_ids": eos_ids,
            "add_bos_token": False,
        },
        "f32_vs_f64_max_abs_logit_diff": f64_last_max,
        "f32_vs_f64_max_abs_logit_diff_all_steps": f64_all_max,
        "min_greedy_margin": min(all_margins),
        "greedy_steps_with_margin_below_1e-3": sum(m < 1e-3 for m in all_margins),
        "greedy_steps_with_margin_below_1e-2": sum(m < 1e-2 for m in all_margins),
        "prompts": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(compact_json(fixture) + "\n")
    print(
        f"wrote {args.out} ({os.path.getsize(args.out)} bytes) in {time.time() - t0:.0f}s; "
        f"min margin {fixture['min_greedy_margin']:.4g}, "
        f"<1e-3: {fixture['greedy_steps_with_margin_below_1e-3']}, "
        f"<1e-2: {fixture['greedy_steps_with_margin_below_1e-2']}, "
        f"f32 vs f64 last {f64_last_max}, all steps {f64_all_max}",
        file=sys.stderr,
    )
    return 0


def _dist_version(name):
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
