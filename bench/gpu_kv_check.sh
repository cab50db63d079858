#!/usr/bin/env bash
# Runs the NCCL KV transport tests (kv-transfer/tests/nccl.rs) on a GPU
# machine from a prebuilt test binary, and writes the results as JSON.
#
# Build where the toolchain is (no GPU needed):
#   cargo test --release -p tandem-kv-transfer --features cuda --test nccl --no-run
# then, on the GPU machine:
#   bench/gpu_kv_check.sh OUT_DIR [TEST_BINARY]
# TEST_BINARY defaults to the newest target/release/deps/nccl-* (or
# $CARGO_TARGET_DIR's). Writes OUT_DIR/gpu_kv_check.json and the test log.
set -uo pipefail

out=${1:?usage: gpu_kv_check.sh OUT_DIR [TEST_BINARY]}
mkdir -p "$out"
target=${CARGO_TARGET_DIR:-target}
bin=${2:-$(ls -t "$target"/release/deps/nccl-* 2>/dev/null | grep -v '\.d$' | head -n1)}
if [[ -z "$bin" || ! -x "$bin" ]]; then
    echo "no NCCL test binary (build it first, see the header of $0)" >&2
    exit 2
fi

# cudarc loads NCCL as libnccl.so; pip's nvidia-nccl wheels ship only
# libnccl.so.2 (see gpu_libs.sh).
source "$(dirname "${BASH_SOURCE[0]}")/gpu_libs.sh"
link_gpu_libs nccl

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
start=$(date +%s.%N)
timeout 300 "$bin" --test-threads=1 --show-output >"$out/nccl_test.log" 2>&1
rc=$?
end=$(date +%s.%N)
cat "$out/nccl_test.log"

python3 - "$out/nccl_test.log" "$out/gpu_kv_check.json" "$rc" "$gpus" "$start" "$end" "$bin" <<'EOF'
import json, re, sys
log, dest, rc, gpus, start, end, binary = sys.argv[1:]
text = open(log, errors="replace").read()
tests = [{"name": m[1], "result": m[2]}
         for m in re.finditer(r"^test (\S+) \.\.\. (ok|FAILED|ignored)", text, re.M)]
notes = [l for l in text.splitlines()
         if l.startswith(("NCCL ", "one GPU:")) or re.match(r"\d+ GPUs:", l)]
json.dump({
    "check": "nccl_kv_transport",
    "binary": binary,
    "gpus": int(gpus or 0),
    "exit_code": int(rc),
    "passed": sum(t["result"] == "ok" for t in tests),
    "failed": sum(t["result"] == "FAILED" for t in tests),
    "tests": tests,
    "notes": notes,
    "seconds": round(float(end) - float(start), 3),
}, open(dest, "w"), indent=2)
EOF
exit "$rc"
