#!/usr/bin/env bash
# What scoring a prompt costs (`prompt_logprobs`, OpenAI's `echo` with
# `logprobs`): `tandem generate` on one long prompt, plain (the prompt
# prefilled, one token sampled) against scored (every position's logits,
# log-softmax and top-k, no token), alternating, in one process each.
# Prints each run and the medians; the difference is what scoring adds.
#
# Usage: bench/prompt_scores.sh [--runs N] [--threads T] [--tokens N] [--top K]
set -euo pipefail

CACHE="${TANDEM_CACHE:-$HOME/.cache/tandem}"
TANDEM="${TANDEM_BIN:-${CARGO_TARGET_DIR:-$CACHE/target}/release/tandem}"
RUNS=5
THREADS=2
TOKENS=1000
TOP=1

while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --tokens) TOKENS="$2"; shift 2 ;;
        --top) TOP="$2"; shift 2 ;;
        -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
[[ -x "$TANDEM" ]] || { echo "no tandem binary at $TANDEM (run scripts/test.sh or set TANDEM_BIN)" >&2; exit 1; }

# ~15 tokens per sentence with the default model's tokenizer.
PROMPT="$(python3 -c "print(' '.join(['the quick brown fox jumps over the lazy dog and then some more words follow'] * ($TOKENS // 15)))")"

run() {
    local start end
    start=$(date +%s.%N)
    "$TANDEM" generate --threads "$THREADS" --json --prompt "$PROMPT" "$@" > /tmp/tandem-prompt-scores.json
    end=$(date +%s.%N)
    python3 -c "print(round($end - $start, 3))"
}

plain=(); scored=()
for ((i = 0; i < RUNS; i++)); do
    plain+=("$(run --max-tokens 1)")
    scored+=("$(run --max-tokens 0 --prompt-logprobs "$TOP")")
    echo "run $i: plain ${plain[-1]} s, scored ${scored[-1]} s"
done
tokens=$(python3 -c "import json; print(json.load(open('/tmp/tandem-prompt-scores.json'))['prompt_tokens'])")
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
mp=$(median "${plain[@]}"); ms=$(median "${scored[@]}")
echo "prompt tokens: $tokens, top $TOP, $THREADS threads, $RUNS runs (each includes loading the model)"
echo "median plain: $mp s, median scored: $ms s, scoring adds $(python3 -c "print(round($ms - $mp, 3))") s"
