#!/usr/bin/env bash
# Cross-check `tandem bench serve` against guidellm (PyPI), an independent
# load generator, on the same running endpoint and the same workload:
# C requests in flight (default) or Poisson arrivals at R req/s, prompts of
# IN tokens, OUT tokens generated.
#
#   bench/compare_guidellm.sh [--url URL] [--concurrency C | --rate R] [--requests N] [--runs K]
#                             [--in TOKENS] [--out TOKENS] [--tandem PATH] [--json FILE]
#                             [--server-cores LIST --client-cores LIST] [--temperature T]
#
# Without --url it starts `tandem up` (1 prefill + 1 decode worker, one
# thread each) on a free port and stops it at the end. The two tools run
# alternately, K times each (the one that goes first swaps every round), so
# the spread of each tool over its own back-to-back runs is the noise
# against which their difference is judged.
#
# The load generators' own CPU use differs a lot (guidellm, in Python, used
# ~13 s of CPU for a 40-request run that cost tandem bench serve 0.04 s), so
# on a small machine give the server and the clients separate cores:
# --server-cores 1 --client-cores 0 runs `taskset -c 1 tandem up --cores 1`
# and both clients under `taskset -c 0`.
#
# guidellm sends chat requests (its synthetic text, ignore_eos, no
# temperature: the server's default, 1.0); tandem bench serve sends
# ignore_eos too (so both get exactly OUT tokens per request) and the same
# number of prompt tokens as token ids to /v1/completions, at TEMPERATURE
# (--temperature, default 1 to match; 0 is greedy, which skips the sampler).
# Both count the chat template's tokens the same way because IN here is the templated length:
# guidellm is asked for IN - 30 text tokens (the ChatML wrapper of a user
# message adds 30 with the default model's tokenizer).
#
# The default is a fixed concurrency: guidellm 0.8.1's Poisson profile did
# not hold the asked rate here (asked for 1 req/s, it sent 40 requests in
# 15 s, and in one run all 40 within 0.8 s), so rate runs compare two
# different loads.
#
# guidellm draws the same synthetic prompts on every run unless its seed
# changes; with one seed, runs after the first were served from the prefix
# cache (the server reported 144 of 158 prompt tokens cached), which made
# its TTFT look 1.5x lower than tandem bench serve's distinct prompts. Each
# run therefore gets its own seed, as tandem bench serve's runs do.
#
# Figures compared: completed requests per second and output tokens per
# second (both: completed over first send to last completion), median TTFT,
# and median time per output token after the first (guidellm calls it
# inter_token_latency; its time_per_output_token includes the first token).
# When the server is tandem, its router's own mean TTFT and inter-token
# latency over each run (from /metrics scraped before and after it) are
# printed too: the same server clock for both clients, which tells a
# difference in the load from a difference in the clients' measurements.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${TANDEM_CACHE:-$HOME/.cache/tandem}"
URL=""
MODE=concurrency
RATE=1
CONCURRENCY=4
TEMPERATURE=1
REQUESTS=40
RUNS=3
IN=158
OUT=32
TANDEM="${TANDEM_BIN:-}"
SUMMARY_JSON=""
SERVER_CORES=""
CLIENT_CORES=""

while [[ $# -gt 0 ]]; do
    case "$1" in
        --url) URL="$2"; shift 2 ;;
        --rate) RATE="$2"; MODE=rate; shift 2 ;;
        --concurrency) CONCURRENCY="$2"; MODE=concurrency; shift 2 ;;
        --requests) REQUESTS="$2"; shift 2 ;;
        --runs) RUNS="$2"; shift 2 ;;
        --in) IN="$2"; shift 2 ;;
        --temperature) TEMPERATURE="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --tandem) TANDEM="$2"; shift 2 ;;
        --json) SUMMARY_JSON="$2"; shift 2 ;;
        --server-cores) SERVER_CORES="$2"; shift 2 ;;
        --client-cores) CLIENT_CORES="$2"; shift 2 ;;
        -h|--help) sed -n '2,41p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

if [[ -z "$TANDEM" ]]; then
    for c in "${CARGO_TARGET_DIR:-$CACHE/target}/release/tandem" "$REPO/target/release/tandem" "$(command -v tandem || true)"; do
        [[ -n "$c" && -x "$c" ]] && { TANDEM="$c"; break; }
    done
fi
[[ -x "$TANDEM" ]] || { echo "no tandem binary (cargo build --release -p tandem, or --tandem PATH)" >&2; exit 1; }

BIN="$("$HERE/setup_loadgen.sh" | tail -n 1)"
TOKENIZER="$CACHE/loadgen/tokenizer"
OUTDIR="$(mktemp -d "${TMPDIR:-/tmp}/tandem-vs-guidellm.XXXXXX")"
echo "raw outputs: $OUTDIR" >&2

SERVER_PIN=()
CLIENT_PIN=()
UP_CORES=()
if [[ -n "$SERVER_CORES" ]]; then
    SERVER_PIN=(taskset -c "$SERVER_CORES")
    UP_CORES=(--cores "$(awk -F, '{print NF}' <<<"$SERVER_CORES")")
fi
[[ -n "$CLIENT_CORES" ]] && CLIENT_PIN=(taskset -c "$CLIENT_CORES")
UP_PID=""
cleanup() { [[ -n "$UP_PID" ]] && kill "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null; true; }
trap cleanup EXIT
if [[ -z "$URL" ]]; then
    PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    "${SERVER_PIN[@]}" "$TANDEM" up "${UP_CORES[@]}" --port "$PORT" > "$OUTDIR/up.log" 2>&1 &
    UP_PID=$!
    for _ in $(seq 1 300); do
        grep -q '^TANDEM_URL ' "$OUTDIR/up.log" && break
        kill -0 "$UP_PID" 2>/dev/null || { cat "$OUTDIR/up.log" >&2; exit 1; }
        sleep 0.2
    done
    URL="$(grep '^TANDEM_URL ' "$OUTDIR/up.log" | awk '{print $2}')"
    [[ -n "$URL" ]] || { echo "tandem up did not come up" >&2; exit 1; }
    grep '^tandem up:' "$OUTDIR/up.log" >&2 || true
fi
ROOT_URL="${URL%/v1}"
if [[ $MODE == rate ]]; then
    GPROFILE="kind=poisson,rate=$RATE"; TLOAD=(--rate "$RATE"); LOADDESC="Poisson $RATE req/s"
else
    GPROFILE="kind=concurrent,streams=$CONCURRENCY"; TLOAD=(--concurrency "$CONCURRENCY"); LOADDESC="concurrency $CONCURRENCY"
fi
echo "server cores: ${SERVER_CORES:-all}, client cores: ${CLIENT_CORES:-all}" >&2
echo "endpoint: $URL; $RUNS runs each, $LOADDESC, $REQUESTS requests, $IN prompt tokens, $OUT output tokens" >&2

run_guidellm() {
    HF_HUB_OFFLINE=1 "${CLIENT_PIN[@]}" "$BIN/guidellm" run \
        --backend "kind=openai_http,target=$ROOT_URL" \
        --profile "$GPROFILE" \
        --constraint "kind=max_requests,count=$REQUESTS" \
        --data "kind=synthetic_text,prompt_tokens=$((IN - 30)),output_tokens=$OUT" \
        --seed "kind=static,value=$((1000 + $1))" \
        --tokenizer "kind=huggingface_auto,model=$TOKENIZER" \
        --output "kind=json,path=$OUTDIR/guidellm_$1.json" \
        --disable-console-interactive > "$OUTDIR/guidellm_$1.log" 2>&1
}

run_tandem() {
    "${CLIENT_PIN[@]}" "$TANDEM" bench serve --url "$URL" "${TLOAD[@]}" --requests "$REQUESTS" \
        --dataset synthetic --input-tokens "$IN" --output-tokens "$OUT" --seed "$1" \
        --temperature "$TEMPERATURE" --ignore-eos \
        --json "$OUTDIR/tandem_$1.json" > "$OUTDIR/tandem_$1.log" 2>&1
}

# The server's own view of each run, when it is tandem: its router's
# /metrics before and after (empty files otherwise). Its TTFT and
# inter-token histograms' sums and counts give the server-side means over
# exactly that run's requests, a referee between the two clients' clocks.
scrape() { curl -s -m 5 "$ROOT_URL/metrics" > "$OUTDIR/metrics_$1.txt" 2>/dev/null || true; }
measured() { scrape "$1_$2_before"; "run_$1" "$2"; scrape "$1_$2_after"; }

for ((i = 1; i <= RUNS; i++)); do
    echo "round $i/$RUNS (load average: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    if (( i % 2 )); then measured guidellm "$i"; measured tandem "$i"; else measured tandem "$i"; measured guidellm "$i"; fi
done

"$BIN/python" - "$OUTDIR" "$RUNS" "$SUMMARY_JSON" <<'PY'
import json, statistics, sys
out, runs, summary_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
g = {"req/s": [], "output tok/s": [], "TTFT p50 ms": [], "TPOT p50 ms": [], "output tokens/req": [], "errors": [],
     "server: TTFT mean ms": [], "server: inter-token mean ms": []}
t = {k: [] for k in g}

def sums(path):
    """(sum, count) of the router's TTFT and inter-token histograms, over all label sets."""
    acc = {}
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return acc
    for line in lines:
        for name in ("tandem_time_to_first_token_seconds", "tandem_inter_token_latency_seconds"):
            for part in ("_sum", "_count"):
                if line.startswith(name + part) and 'role="router"' in line:
                    acc[name + part] = acc.get(name + part, 0.0) + float(line.rsplit(" ", 1)[1])
    return acc

def server_means(tool, i):
    a, b = sums(f"{out}/metrics_{tool}_{i}_before.txt"), sums(f"{out}/metrics_{tool}_{i}_after.txt")
    d = lambda k: b.get(k, 0.0) - a.get(k, 0.0)
    res = []
    for name in ("tandem_time_to_first_token_seconds", "tandem_inter_token_latency_seconds"):
        n = d(name + "_count")
        res.append(1000 * d(name + "_sum") / n if n > 0 else float("nan"))
    return res

for i in range(1, runs + 1):
    for tool, dest in (("guidellm", g), ("tandem", t)):
        ttft, itl = server_means(tool, i)
        dest["server: TTFT mean ms"].append(ttft)
        dest["server: inter-token mean ms"].append(itl)
    b = json.load(open(f"{out}/guidellm_{i}.json"))["benchmarks"][0]
    m = b["metrics"]
    reqs = b["requests"]["successful"]
    first = min(r["info"]["timings"]["request_start"] for r in reqs)
    last = max(r["info"]["timings"]["request_end"] for r in reqs)
    n = len(reqs)
    toks = sum(r["output_tokens"] or 0 for r in reqs)
    g["req/s"].append(n / (last - first))
    g["output tok/s"].append(toks / (last - first))
    g["TTFT p50 ms"].append(m["time_to_first_token_ms"]["successful"]["median"])
    g["TPOT p50 ms"].append(m["inter_token_latency_ms"]["successful"]["median"])
    g["output tokens/req"].append(toks / n)
    g["errors"].append(m["request_totals"]["errored"] + m["request_totals"]["incomplete"])
    s = json.load(open(f"{out}/tandem_{i}.json"))["runs"][0]["summary"]
    t["req/s"].append(s["request_throughput"])
    t["output tok/s"].append(s["output_token_throughput"])
    t["TTFT p50 ms"].append(s["ttft_ms"]["p50"])
    t["TPOT p50 ms"].append(s["tpot_ms"]["p50"])
    t["output tokens/req"].append(s["mean_output_tokens"])
    t["errors"].append(s["errors"])
print(f"\nmedians of {runs} runs each; [min, max] over the runs of each tool")
print("(server: the router's own histograms over each tool's runs, when it is tandem)")
print(f"  {'figure':<28} {'guidellm':>26} {'tandem bench serve':>26} {'ratio':>7}")
rows = {}
for k in g:
    if all(x != x for x in g[k] + t[k]):
        continue  # not a tandem server: no histograms
    gm, tm = statistics.median(g[k]), statistics.median(t[k])
    fmt = lambda xs: f"[{min(xs):.1f}, {max(xs):.1f}]"
    ratio = tm / gm if gm else float("nan")
    print(f"  {k:<28} {gm:>9.2f} {fmt(g[k]):>16} {tm:>9.2f} {fmt(t[k]):>16} {ratio:>6.2f}x")
    rows[k] = {"guidellm": g[k], "tandem": t[k], "guidellm_median": gm, "tandem_median": tm}
if summary_path:
    json.dump(rows, open(summary_path, "w"), indent=2)
PY
