#!/usr/bin/env bash
# Install the external load generator used to cross-check `tandem bench serve`
# (guidellm from PyPI) into a private venv, and write a Hugging Face tokenizer
# directory for the default model, converted from its GGUF metadata, so that
# guidellm counts tokens exactly as the server does, without any download.
#
#   bench/setup_loadgen.sh [MODEL.gguf]
#
# Venv:      ${TANDEM_CACHE:-$HOME/.cache/tandem}/loadgen/venv
# Tokenizer: ${TANDEM_CACHE:-$HOME/.cache/tandem}/loadgen/tokenizer
# Idempotent. Prints the venv's bin directory on its last line of stdout.
set -euo pipefail

CACHE="${TANDEM_CACHE:-$HOME/.cache/tandem}"
ROOT="$CACHE/loadgen"
MODEL="${1:-${TANDEM_MODEL:-$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf}}"
PYTHON="${PYTHON:-python3}"
GUIDELLM_VERSION="${GUIDELLM_VERSION:-0.8.1}"

mkdir -p "$ROOT"
if [[ ! -x "$ROOT/venv/bin/python" ]]; then
    "$PYTHON" -m venv "$ROOT/venv"
fi
PY="$ROOT/venv/bin/python"
if ! "$PY" -c "import guidellm, gguf, transformers" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --upgrade pip
    # The CPU build of torch is not needed: guidellm only tokenises.
    "$PY" -m pip install --quiet "guidellm==$GUIDELLM_VERSION" "gguf" "transformers" "sentencepiece"
fi

if [[ ! -f "$ROOT/tokenizer/tokenizer.json" ]]; then
    [[ -f "$MODEL" ]] || { echo "model not found: $MODEL (run: tandem model fetch)" >&2; exit 1; }
    HF_HUB_OFFLINE=1 "$PY" - "$MODEL" "$ROOT/tokenizer" <<'PY'
import os, sys
from transformers import AutoTokenizer
model, out = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(model)),
                                    gguf_file=os.path.basename(model))
tok.save_pretrained(out)
print(f"tokenizer ({len(tok)} entries) written to {out}", file=sys.stderr)
PY
fi
echo "$ROOT/venv/bin"
