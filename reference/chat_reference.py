#!/usr/bin/env python
"""Regenerates fixtures/tokenizer/chat_smollm2.json: conversations rendered
by transformers' apply_chat_template(tokenize=False) with the default model's
own template (from its GGUF metadata) and with a few other common template
styles (Llama 3, Llama 3.1, one using Python string methods, namespace and
tojson). A case whose template raises records the error text instead.

Usage: python reference/chat_reference.py [path/to/model.gguf]
Needs: transformers, jinja2, gguf (see reference/requirements.txt).
"""
import json
import os
import sys

from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.expanduser("~/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf")

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA31_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- if tools is not none %}
    {{- raise_exception("tools are not expected here") }}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported after the system message') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Dict keys are written in sorted order: minijinja (without its
# `preserve_order` feature) keeps map literals sorted, Python keeps insertion order.
PYCOMPAT = """{% set ns = namespace(n=0, long=false) %}
{% for m in messages %}
    {% set ns.n = ns.n + 1 %}
    {% if m.content.split() | length > 3 %}{% set ns.long = true %}{% endif %}
[{{ m.role.upper() }}] {{ m.content.strip() }}
    {% if loop.last %}
meta: {{ {'count': ns.n, 'last': m.content, 'long': ns.long, 'ratio': 2.5, 'roles': messages | map(attribute='role') | list} | tojson }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}
"""

CONVERSATIONS = [
    ("user only", [{"role": "user", "content": "Hello!"}]),
    ("system + user", [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ]),
    ("multi-turn with system", [
        {"role": "system", "content": "  Answer in French.  "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?\nTell me."},
    ]),
    ("multi-turn without system", [
        {"role": "user", "content": "Write a haiku"},
        {"role": "assistant", "content": "Old pond—\na frog jumps in,\nsound of water."},
        {"role": "user", "content": "Another one, about \"code\" & <tags>."},
    ]),
    ("unicode and whitespace", [
        {"role": "user", "content": "\n  café 日本語 😀 \t"},
    ]),
    ("system in the middle", [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "b"},
    ]),
]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    templates = [
        ("smollm2", tok.chat_template),
        ("llama3", LLAMA3),
        ("llama31-style", LLAMA31_STYLE),
        ("pycompat", PYCOMPAT),
    ]
    cases = []
    for tname, tmpl in templates:
        for cname, msgs in CONVERSATIONS:
            for gen in (True, False):
                case = {
                    "name": f"{tname}: {cname} (add_generation_prompt={gen})",
                    "template": tmpl,
                    "bos_token": tok.bos_token,
                    "eos_token": tok.eos_token,
                    "messages": msgs,
                    "add_generation_prompt": gen,
                    "expected": None,
                    "error": None,
                }
                try:
                    case["expected"] = tok.apply_chat_template(
                        msgs, chat_template=tmpl, tokenize=False, add_generation_prompt=gen
                    )
                except Exception as e:  # the template called raise_exception
                    case["error"] = str(e)
                cases.append(case)
    out = {"generator": "reference/chat_reference.py", "model": os.path.basename(path), "cases": cases}
    dest = os.path.join(ROOT, "fixtures", "tokenizer", "chat_smollm2.json")
    with open(dest, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases ({sum(c['error'] is not None for c in cases)} errors) to {dest}")


if __name__ == "__main__":
    main()
