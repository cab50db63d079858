#!/usr/bin/env python
"""Regenerates fixtures/tokenizer/smollm2.json: token ids (no special tokens
added) and decodes of diverse strings, as Hugging Face transformers tokenizes
them when it loads the tokenizer from the default model's GGUF metadata.

Usage: python reference/tokenizer_reference.py [path/to/model.gguf]
Needs: transformers, tokenizers, gguf (see reference/requirements.txt).
"""
import json
import os
import sys

from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.expanduser("~/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf")

STRINGS = [
    "Hello, world!",
    "hello world",
    " leading space",
    "trailing space ",
    "The quick brown fox jumps over the lazy dog.",
    "multiple   spaces    here",
    "line one\nline two\n\nline four",
    "\n\n\n",
    "tabs\tand\t\ttabs",
    "  indented\n    more indented",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() { println!(\"{}\", 42); }",
    "for (int i = 0; i < 10; ++i) { x[i] *= 2; }",
    "1234567890",
    "3.14159 2.71828 1e-10 -42",
    "Numbers: 1, 22, 333, 4444, 55555.",
    "I'm sure you'll see it's what they've done, we'd say.",
    "DON'T SHOUT, I'VE HEARD",
    "Café crème brûlée à la française",
    "naïve façade résumé über straße",
    "Ελληνικά και русский язык",
    "日本語のテキストです。",
    "中文文本测试，你好世界！",
    "한국어 텍스트",
    "emoji: 😀🎉👍🏽 ❤️",
    "family: 👨‍👩‍👧‍👦 flag: 🇫🇷",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more text",
    "<|endoftext|>",
    "a<|im_start|>b<|im_end|>c",
    "<|im_start|> spaced <|im_end|>",
    "<repo_name>tandem<file_sep>main.rs",
    "not special: <|im_star|> <im_end>",
    "https://example.com/path?query=1&b=2#frag",
    "user@example.org  {\"key\": [1, 2, null]}",
    "x" * 64,
    "   ",
    "a\r\nb\r\n",
    "Mixed 123abc ABC123 αβγ 🙂!",
    "¿Qué tal? ¡Muy bien!",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth",
    "$$\\frac{a}{b}$$ ~~strike~~ **bold** `code`",
]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    cases = []
    for s in STRINGS:
        ids = tok.encode(s, add_special_tokens=False)
        cases.append({
            "text": s,
            "ids": ids,
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    out = {
        "model": os.path.basename(path),
        "generator": "reference/tokenizer_reference.py",
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "vocab_size": len(tok),
        "cases": cases,
    }
    dest = os.path.join(ROOT, "fixtures", "tokenizer", "smollm2.json")
    with open(dest, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {dest}")


if __name__ == "__main__":
    main()
