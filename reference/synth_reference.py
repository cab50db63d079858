#!/usr/bin/env python3
"""Reference outputs for a synthetic checkpoint made by `tandem model synth`.

Loads a synthetic GGUF file or Hugging Face directory with `transformers`
(float32, eager attention, CPU, 2 threads, deterministic algorithms; a GGUF
is dequantized by the `gguf` package, and llama Q/K rows are un-permuted by
transformers' GGUF loader) and writes, for three fixed prompts given as token
ids (no tokenizer involved, so the reference does not depend on text
handling):

- the top-5 logits at the last prompt position;
- 16 steps of plain greedy decoding (argmax, no sampling, no penalties, no
  stop on EOS), with the top-1/top-2 margin at each step so a test can tell
  a genuine mismatch from a near-tie.

Usage (from the repository root, with reference/requirements.txt installed):

    python reference/synth_reference.py fixtures/synth/tiny-llama-q4_k.gguf \
        --out fixtures/synth/tiny-llama-q4_k.json
    python reference/synth_reference.py fixtures/synth/tiny-llama-bf16-2shards \
        --out fixtures/synth/tiny-llama-bf16-2shards.json

Meant for the small synthetic shapes (`tiny`, `tiny-mqa`); it refuses
checkpoints over --max-params parameters rather than try to run an 8B model
on a laptop.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys

GREEDY_STEPS = 16
TOPK = 5
THREADS = 2

# Fixed prompts as token ids. They avoid nothing in particular: any id below
# the vocabulary size is valid input. With the synthetic GPT-2 vocabulary,
# id 1 is <|im_start|> (BOS); with the SentencePiece one it is <s>.
PROMPTS = [
    [1, 72, 101, 108, 108, 111],
    [1, 300, 301, 17, 256, 42, 99, 7, 260, 383],
    [263],
]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(path: str) -> list[str]:
    """The files whose bytes decide the model (for the fixture's provenance)."""
    if os.path.isfile(path):
        return [path]
    names = sorted(
        n for n in os.listdir(path) if n.endswith(".safetensors") or n == "config.json"
    )
    return [os.path.join(path, n) for n in names]


def load(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    if os.path.isfile(path):
        # transformers' GGUF loader ignores the head dimension for some
        # architectures (qwen3: it keeps the config default of 128), so the
        # file's own value is passed on where it has one.
        head_dim = gguf_head_dim(path)
        if head_dim is not None:
            kwargs["head_dim"] = head_dim
        # Nor does it read the experts' intermediate sizes (Qwen-MoE).
        expert_ffn = gguf_field(path, "expert_feed_forward_length")
        if expert_ffn is not None:
            kwargs["moe_intermediate_size"] = expert_ffn
        shared_ffn = gguf_field(path, "expert_shared_feed_forward_length")
        if shared_ffn is not None:
            kwargs["shared_expert_intermediate_size"] = shared_ffn
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), **kwargs
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    return model


def gguf_head_dim(path: str) -> int | None:
    """`{arch}.attention.key_length` of a GGUF file, where it is written."""
    return gguf_field(path, "attention.key_length")


def gguf_field(path: str, key: str) -> int | None:
    """The integer `{arch}.{key}` of a GGUF file, where it is written."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    arch = r.fields["general.architecture"]
    arch = bytes(arch.parts[arch.data[0]]).decode()
    f = r.fields.get(f"{arch}.{key}")
    return None if f is None else int(f.parts[f.data[0]][0])


def top(logits, k: int):
    import torch

    vals, ids = torch.topk(logits, k)
    return [{"id": int(i), "logit": float(v)} for v, i in zip(vals.tolist(), ids.tolist())]


def run(model, prompt: list[int]) -> dict:
    import torch

    ids = list(prompt)
    out = {"prompt_ids": list(prompt)}
    greedy, margins = [], []
    with torch.no_grad():
        for step in range(GREEDY_STEPS):
            logits = model(torch.tensor([ids])).logits[0, -1].to(torch.float32)
            t = top(logits, TOPK)
            if step == 0:
                out["top5"] = t
            greedy.append(t[0]["id"])
            margins.append(t[0]["logit"] - t[1]["logit"])
            ids.append(t[0]["id"])
    out["greedy"] = greedy
    out["greedy_margins"] = margins
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="synthetic .gguf file or Hugging Face directory")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--max-params", type=float, default=50e6)
    ap.add_argument(
        "--lora",
        help="a LoRA adapter directory (PEFT's format) to run the model with, through peft",
    )
    args = ap.parse_args()

    import torch
    import transformers

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    model = load(args.model)
    if args.lora:
        import peft
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.lora)
        model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > args.max_params:
        print(f"{args.model}: {n_params} parameters, over --max-params; refusing", file=sys.stderr)
        return 2
    vocab = model.config.vocab_size
    for p in PROMPTS:
        if max(p) >= vocab:
            print(f"prompt id {max(p)} is outside the vocabulary ({vocab})", file=sys.stderr)
            return 2

    results = [run(model, p) for p in PROMPTS]
    distinct = len({t for r in results for t in r["greedy"]})
    doc = {
        "model": os.path.basename(os.path.normpath(args.model)),
        "files": {os.path.basename(f): sha256(f) for f in checkpoint_files(args.model)},
        "reference": {
            "library": f"transformers {transformers.__version__}, torch {torch.__version__}",
            "dtype": "float32",
            "attention": "eager",
            "threads": THREADS,
            "python": platform.python_version(),
        },
        "config": {
            "model_type": model.config.model_type,
            "num_hidden_layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "vocab_size": vocab,
            "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        },
        "greedy_steps": GREEDY_STEPS,
        **(
            {
                "lora": {
                    "library": f"peft {peft.__version__}",
                    "files": {
                        n: sha256(os.path.join(args.lora, n))
                        for n in sorted(os.listdir(args.lora))
                        if n.startswith("adapter_")
                    },
                }
            }
            if args.lora
            else {}
        ),
        "stops_at_eos": False,
        "prompts": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: {len(results)} prompts, {distinct} distinct greedy tokens")
    for r in results:
        print(f"  {r['prompt_ids']} -> {r['greedy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
