#!/usr/bin/env bash
# The same serving workload against llama.cpp's server and against tandem,
# on the same model and the same number of cores, measured by the same
# client (`tandem bench serve --url`), side by side.
#
#   bench/compare_llama_server.sh [--rate LIST | --concurrency LIST] [--requests N]
#                                 [--cores N] [--slots N] [--in TOKENS] [--out TOKENS]
#                                 [--setups disaggregated,colocated] [--tandem PATH]
#                                 [--out-dir DIR] [--json FILE]
#
# llama.cpp: llama-server -t CORES -np SLOTS (continuous batching, one
#            shared KV pool), built by bench/build_llama_cpp.sh.
# tandem:    tandem up --cores CORES; "disaggregated" is 1 prefill + 1 decode
#            worker (CORES/2 threads each), "colocated" is one plain worker
#            with CORES threads (tandem up --colocated).
# Workload:  synthetic prompts of IN token ids to /v1/completions, OUT tokens
#            wanted, greedy, Poisson arrivals at each rate (or a fixed
#            concurrency); the same seed, so the same prompts, on every server.
# Each server runs alone; run nothing else heavy meanwhile.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${TANDEM_CACHE:-$HOME/.cache/tandem}"
MODEL="${TANDEM_MODEL:-$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
LOAD=(--rate 1,2,4)
REQUESTS=40
CORES=2
SLOTS=16
IN=256
OUT=64
SETUPS="disaggregated,colocated"
TANDEM="${TANDEM_BIN:-}"
OUTDIR=""
SUMMARY_JSON=""

while [[ $# -gt 0 ]]; do
    case "$1" in
        --rate) LOAD=(--rate "$2"); shift 2 ;;
        --concurrency) LOAD=(--concurrency "$2"); shift 2 ;;
        --requests) REQUESTS="$2"; shift 2 ;;
        --cores) CORES="$2"; shift 2 ;;
        --slots) SLOTS="$2"; shift 2 ;;
        --in) IN="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --setups) SETUPS="$2"; shift 2 ;;
        --tandem) TANDEM="$2"; shift 2 ;;
        --out-dir) OUTDIR="$2"; shift 2 ;;
        --json) SUMMARY_JSON="$2"; shift 2 ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

[[ -f "$MODEL" ]] || { echo "model not found: $MODEL (run: tandem model fetch)" >&2; exit 1; }
if [[ -z "$TANDEM" ]]; then
    for c in "${CARGO_TARGET_DIR:-$CACHE/target}/release/tandem" "$REPO/target/release/tandem" "$(command -v tandem || true)"; do
        [[ -n "$c" && -x "$c" ]] && { TANDEM="$c"; break; }
    done
fi
[[ -x "$TANDEM" ]] || { echo "no tandem binary (cargo build --release -p tandem, or --tandem PATH)" >&2; exit 1; }
LLAMA_BIN="$("$HERE/build_llama_cpp.sh" | tail -n 1)"
OUTDIR="${OUTDIR:-$(mktemp -d "${TMPDIR:-/tmp}/tandem-vs-llama-server.XXXXXX")}"
mkdir -p "$OUTDIR"
echo "raw outputs: $OUTDIR; load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
trap stop_server EXIT

bench() { # $1 = name, $2 = url
    "$TANDEM" bench serve --url "$2" "${LOAD[@]}" --requests "$REQUESTS" \
        --dataset synthetic --input-tokens "$IN" --output-tokens "$OUT" \
        --json "$OUTDIR/$1.json" --plot-dir "$OUTDIR/$1-plots" | tee "$OUTDIR/$1.log"
}

# llama.cpp's server: every slot may hold a whole request.
PORT="$(free_port)"
CTX=$(( SLOTS * (IN + OUT + 64) ))
"$LLAMA_BIN/llama-server" -m "$MODEL" -t "$CORES" -np "$SLOTS" -c "$CTX" \
    --host 127.0.0.1 --port "$PORT" --no-webui > "$OUTDIR/server-llama.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { tail "$OUTDIR/server-llama.log" >&2; exit 1; }
    sleep 0.2
done
echo "== llama-server -t $CORES -np $SLOTS -c $CTX" >&2
bench llama-server "http://127.0.0.1:$PORT/v1"
stop_server

IFS=',' read -r -a setups <<<"$SETUPS"
for s in "${setups[@]}"; do
    PORT="$(free_port)"
    case "$s" in
        disaggregated) "$TANDEM" up --cores "$CORES" --port "$PORT" > "$OUTDIR/tandem-$s.up.log" 2>&1 & ;;
        colocated) "$TANDEM" up --cores "$CORES" --colocated --port "$PORT" > "$OUTDIR/tandem-$s.up.log" 2>&1 & ;;
        *) echo "unknown setup $s" >&2; exit 2 ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 1 600); do
        grep -q '^TANDEM_URL ' "$OUTDIR/tandem-$s.up.log" && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$OUTDIR/tandem-$s.up.log" >&2; exit 1; }
        sleep 0.2
    done
    echo "== $(grep '^tandem up:' "$OUTDIR/tandem-$s.up.log")" >&2
    bench "tandem-$s" "$(grep '^TANDEM_URL ' "$OUTDIR/tandem-$s.up.log" | awk '{print $2}')"
    stop_server
done

python3 - "$OUTDIR" "$SETUPS" "$SUMMARY_JSON" <<'PY'
import json, sys
out, setups, summary_path = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
names = ["llama-server"] + [f"tandem-{s}" for s in setups]
runs = {n: json.load(open(f"{out}/{n}.json"))["runs"] for n in names}
figs = [
    ("output tok/s", lambda s: s["output_token_throughput"]),
    ("requests/s", lambda s: s["request_throughput"]),
    ("TTFT p50 ms", lambda s: s["ttft_ms"]["p50"]),
    ("TTFT p99 ms", lambda s: s["ttft_ms"]["p99"]),
    ("ITL p50 ms", lambda s: s["itl_ms"]["p50"]),
    ("ITL p99 ms", lambda s: s["itl_ms"]["p99"]),
    ("TPOT p50 ms", lambda s: s["tpot_ms"]["p50"]),
    ("out tokens/req", lambda s: s["mean_output_tokens"]),
    ("errors", lambda s: s["errors"]),
]
table = []
for i, r in enumerate(runs["llama-server"]):
    load = r["load"]
    print(f"\n{load}")
    print("  " + f"{'figure':<16}" + "".join(f"{n:>24}" for n in names))
    row = {"load": load}
    for name, f in figs:
        vals = [f(runs[n][i]["summary"]) for n in names]
        row[name] = dict(zip(names, vals))
        print("  " + f"{name:<16}" + "".join(f"{v:>24.2f}" for v in vals))
    table.append(row)
if summary_path:
    json.dump(table, open(summary_path, "w"), indent=2)
PY
