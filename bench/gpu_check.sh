#!/usr/bin/env bash
# Checks and benchmarks the CUDA backend (engine/src/cuda) on a GPU machine
# from a prebuilt test binary, and writes the results as JSON. Builds
# nothing: the GPU machine has no toolchain and fetches nothing.
#
# Build where the toolchain is (no GPU or CUDA needed; cudarc loads the
# libraries at run time):
#   cargo test --release --locked -p tandem-engine --features cuda --test cuda_backend --no-run
# cargo prints the executable's path ("Executable tests/cuda_backend.rs
# (<target>/release/deps/cuda_backend-<hash>)"). Strip it (55 MB of line
# tables down to ~3 MB) into an ignored folder so that it can be carried:
#   mkdir -p target/gpu && strip -o target/gpu/cuda_backend <that path>
# The FP32/BF16 checks also need the default model (98 MB, more than one
# carry of 64 MiB allows, working tree included): it travels as xz parts
# over two calls on one warm machine (carried files stay there between
# calls), as bench/gpu_session.sh does with this script and the others.
# The script joins the parts into models/ and checks the sha256. Without
# the model, the tests that need it fail, saying so; the others still run.
#
# Usage, from the repository root on the GPU machine:
#   bench/gpu_check.sh [OUT_DIR] [TEST_BINARY]
# OUT_DIR defaults to $OUT (the device runner's output folder), else
# bench/out/gpu_check. TEST_BINARY defaults to target/gpu/cuda_backend,
# else the newest target/release/deps/cuda_backend-*. Writes
# OUT_DIR/gpu_check.json (tests, tolerances met, measured differences,
# benchmark figures), OUT_DIR/cuda_bench.json and the two logs.
set -uo pipefail

out=${1:-${OUT:-bench/out/gpu_check}}
mkdir -p "$out"
bin=${2:-}
if [[ -z "$bin" ]]; then
    if [[ -x target/gpu/cuda_backend ]]; then
        bin=target/gpu/cuda_backend
    else
        bin=$(ls -t target/release/deps/cuda_backend-* 2>/dev/null | grep -v '\.d$' | head -n1)
    fi
fi
if [[ -z "$bin" || ! -x "$bin" ]]; then
    echo "no cuda_backend test binary (build it first, see the header of $0)" >&2
    exit 2
fi

# The default model: models/ in the repository (joined from carried parts
# when needed), unless TANDEM_MODELS_DIR says otherwise.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_model.sh"
use_default_model

# The test binary finds the fixtures (golden prompts, synthetic checkpoints)
# here rather than in the source tree it was built from.
export TANDEM_FIXTURES_DIR=$PWD/fixtures

# cudarc (built with its CUDA 12.8 bindings) looks for libcublas.so,
# libcublas.so.12, ... and the same for NVRTC; CUDA 13 pip wheels ship only
# the .so.13 names (see gpu_libs.sh).
source "$(dirname "${BASH_SOURCE[0]}")/gpu_libs.sh"
link_gpu_libs cublas cublasLt nvrtc

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)

# 1. The checks (the benchmark is ignored here).
start=$(date +%s.%N)
timeout 600 "$bin" --test-threads=1 --show-output >"$out/cuda_test.log" 2>&1
test_rc=$?
mid=$(date +%s.%N)
cat "$out/cuda_test.log"

# 2. The benchmark (Llama-3-8B shape, random BF16 weights on the device).
TANDEM_BENCH_JSON="$out/cuda_bench.json" timeout 600 "$bin" --ignored --exact bench_llama3_8b_shape \
    --test-threads=1 --show-output >"$out/cuda_bench.log" 2>&1
bench_rc=$?
end=$(date +%s.%N)
cat "$out/cuda_bench.log"

python3 - "$out" "$test_rc" "$bench_rc" "$gpu" "$start" "$mid" "$end" "$bin" "$model_ok" <<'EOF'
import json, os, re, sys
out, test_rc, bench_rc, gpu, start, mid, end, binary, model_ok = sys.argv[1:]
text = open(os.path.join(out, "cuda_test.log"), errors="replace").read()
tests = [{"name": m[1], "result": m[2]}
         for m in re.finditer(r"^test (\S+) \.\.\. (ok|FAILED|ignored)", text, re.M)]
notes = [l for l in text.splitlines()
         if re.search(r"max abs|worst|greedy|near tie|top-1|no usable CUDA|panicked|CUDA:", l)]
bench = None
try:
    bench = json.load(open(os.path.join(out, "cuda_bench.json")))
except Exception as e:
    btext = open(os.path.join(out, "cuda_bench.log"), errors="replace").read()
    bench = {"error": str(e), "log_tail": btext[-3000:]}
json.dump({
    "check": "cuda_backend",
    "binary": binary,
    "gpu": gpu,
    "default_model_present": model_ok == "true",
    "test_exit_code": int(test_rc),
    "passed": sum(t["result"] == "ok" for t in tests),
    "failed": sum(t["result"] == "FAILED" for t in tests),
    "tests": tests,
    "notes": notes,
    "test_seconds": round(float(mid) - float(start), 3),
    "bench_exit_code": int(bench_rc),
    "bench_seconds": round(float(end) - float(mid), 3),
    "bench": bench,
}, open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
print("wrote", os.path.join(out, "gpu_check.json"))
# The figures at a glance: decode per mode, then where each profiled pass
# spends its time (the five costliest kernels).
if isinstance(bench, dict) and "decode" in bench:
    print(bench.get("weights", ""))
    runs = [(d, "") for d in bench["decode"]] + [(d, " f32 KV") for d in bench.get("decode_f32_kv", [])]
    for d, kv in runs:
        m = d["mode"]
        print("decode b%-3d graphs=%d greedy=%d gemv=%d split=%d%s: %.2f ms, %.1f tok/s, %.1f%% of copy bandwidth" % (
            d["batch"], m["graphs"], m["greedy_on_device"], m["gemv"], m.get("split_attention", 0), kv,
            d["step_ms"], d["tok_per_s"], 100 * d["roofline_fraction"]))
    for name in ("prefill", "prefill_cuda_cores"):
        p = bench.get(name)
        if isinstance(p, dict):
            print("%s of %d tokens: %.1f ms, %.1f TFLOP/s" % (name, p["tokens"], 1e3 * p["seconds_per_run"], p["tflops"]))
    for p in bench.get("profiles", []):
        top = ", ".join("%s %.2f" % (k["name"], k["ms"]) for k in p["kernels"][:5])
        print("profile %s b%d split=%d: %.2f ms, kernels %.2f ms: %s" % (
            p["pass"], p["sequences"], p["split_attention"], p["ms"], p["kernels_ms"], top))
EOF
if [[ $test_rc -ne 0 ]]; then exit "$test_rc"; fi
exit "$bench_rc"
