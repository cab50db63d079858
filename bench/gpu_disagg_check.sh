#!/usr/bin/env bash
# Two processes on one GPU passing KV: a prefill and a decode worker on the
# same card (`tandem up` with TANDEM_DEVICE set for both workers), greedy
# requests through the router, and each completion compared with `tandem
# generate` on the CPU (the FP32 CUDA path is the one held to the CPU's
# tokens). NCCL refuses two ranks on one device, so the KV moves through
# the TCP transport's shared-memory ring; the prefill worker's debug log
# names the data plane of every transfer, and the check counts them.
#
# Build where the toolchain is (no GPU needed), strip (about 28 MB), and
# carry it with the model, as bench/gpu_session.sh does:
#   cargo build --release --locked -p tandem --features cuda
#   mkdir -p target/gpu && strip -o target/gpu/tandem <target>/release/tandem
#
# Usage, from the repository root:
#   bench/gpu_disagg_check.sh [OUT_DIR] [TANDEM_BINARY] [DEVICE]
# OUT_DIR defaults to $OUT, else bench/out/gpu_disagg; TANDEM_BINARY to
# target/gpu/tandem, else the build's (the scripts' target directory, or
# target/release/tandem); DEVICE to cuda:0
# (cuda-bf16:0 runs the BF16 path, whose tokens may leave the CPU's at a
# near tie: the JSON then shows where). DEVICE=cpu runs the same check on
# a machine without a GPU. Writes OUT_DIR/gpu_disagg_check.json and the
# cluster's log; exits non-zero unless every completion matches and every
# transfer went through shared memory.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out=${1:-${OUT:-bench/out/gpu_disagg}}
bin=${2:-}
device=${3:-cuda:0}
mkdir -p "$out"
if [[ -z "$bin" ]]; then
    for b in target/gpu/tandem "${CARGO_TARGET_DIR:-$HOME/.cache/tandem/target}/release/tandem" target/release/tandem; do
        if [[ -x "$b" ]]; then bin=$b; break; fi
    done
fi
if [[ -z "$bin" || ! -x "$bin" ]]; then
    echo "no tandem binary (build it first, see the header of $0)" >&2
    exit 2
fi

source "$here/gpu_model.sh"
use_default_model
if [[ "$model_ok" != true ]]; then
    echo "the default model is missing (carry its parts, see gpu_check.sh)" >&2
    exit 2
fi
model="$TANDEM_MODELS_DIR/$model_file"
if [[ "$device" == cuda* ]]; then
    source "$here/gpu_libs.sh"
    link_gpu_libs cublas cublasLt nvrtc
fi
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log="$out/cluster.log"
TANDEM_DEVICE="$device" TANDEM_LOG=warn,tandem_prefill=debug \
    "$bin" up --model "$model" --port "$port" --disagg-min-tokens 0 --kv-cache-memory 512MiB \
    >"$log" 2>&1 &
cluster=$!
trap 'kill "$cluster" 2>/dev/null; wait "$cluster" 2>/dev/null' EXIT

python3 - "$out" "$bin" "$model" "$device" "$gpu" "$port" "$log" "$cluster" <<'EOF'
import json, os, re, subprocess, sys, time, urllib.request
out, binary, model, device, gpu, port, log, cluster = sys.argv[1:]
base = f"http://127.0.0.1:{port}"

def alive():
    try:
        os.kill(int(cluster), 0)
        return True
    except OSError:
        return False

ready = False
deadline = time.time() + 300
while time.time() < deadline and alive():
    try:
        urllib.request.urlopen(base + "/health", timeout=2).read()
        ready = True
        break
    except Exception:
        time.sleep(1)

# Shorter than a block, several blocks, and a long one (many layers' worth
# of blocks in flight at once).
story = ("Here is a short story about a robot who learns to paint. Once upon a time, in a "
         "small workshop at the edge of a busy harbour town, there lived a robot named")
prompts = [
    "The capital of France is",
    story,
    " ".join([story] * 12) + " The robot's first painting showed",
]
max_tokens = 24
results = []
for p in prompts if ready else []:
    ref = subprocess.run(
        [binary, "generate", "--device", "cpu", "--json", "--model", model,
         "--max-tokens", str(max_tokens), "--prompt", p],
        capture_output=True, text=True, timeout=600)
    want = json.loads(ref.stdout) if ref.returncode == 0 else {"error": ref.stderr[-2000:]}
    body = json.dumps({"prompt": p, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"content-type": "application/json"})
    try:
        got = json.loads(urllib.request.urlopen(req, timeout=600).read())
        text = got["choices"][0]["text"]
        usage = got.get("usage", {})
    except Exception as e:
        text, usage = None, {"error": str(e)}
    results.append({
        "prompt_tokens": want.get("prompt_tokens"),
        "match": text is not None and text == want.get("text"),
        "cluster": text,
        "reference_cpu": want.get("text", want.get("error")),
        "usage": usage,
    })

time.sleep(1)
lines = re.sub(r"\x1b\[[0-9;]*m", "", open(log, errors="replace").read()).splitlines()
planes = [m[1] for l in lines if (m := re.search(r"plane\W+(\w+)", l))]
report = {
    "check": "two processes on one device, KV through shared memory",
    "device": device,
    "gpu": gpu,
    "binary": binary,
    "cluster_ready": ready,
    "completions": results,
    "matched": sum(r["match"] for r in results),
    "data_planes": planes,
    "passed": ready and len(results) == len(prompts) and all(r["match"] for r in results)
              and len(planes) >= len(prompts) and all(p == "SharedMemory" for p in planes),
}
if not ready:
    report["log_tail"] = "\n".join(lines[-40:])
json.dump(report, open(os.path.join(out, "gpu_disagg_check.json"), "w"), indent=2)
print(json.dumps({k: report[k] for k in ("device", "gpu", "cluster_ready", "matched", "data_planes", "passed")}))
sys.exit(0 if report["passed"] else 1)
EOF
