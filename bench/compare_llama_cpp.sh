#!/usr/bin/env bash
# Compare tandem's engine with llama.cpp on the same model and thread count.
#
#   bench/compare_llama_cpp.sh [--mode single|batched|all] [--runs N] [--threads N]
#                              [--model PATH] [--tandem PATH] [--llama-only]
#                              [--out DIR] [--json FILE] [--wait-idle SECS]
#
# single : llama-bench -m MODEL -t T -p 512 -n 128  (pp512, tg128)
#          llama-bench -m MODEL -t T -p 0 -n 128    (tg128 alone)
#          tandem bench engine --model MODEL --threads T --json F
#                                                   (prefill_tok_s, decode_tok_s)
# batched: llama-batched-bench -m MODEL -t T -npp 128 -ntg 128 -npl 1,4,16,32,64
#          tandem bench engine --model MODEL --threads T --batch 1,4,16,32,64 --json F
#                                                   (batched: [{batch, decode_tok_s}])
#
# The two engines are run alternately (the one that goes first swaps every
# round) RUNS times each, and the medians are printed side by side with the
# tandem/llama.cpp ratio. Raw outputs stay in --out (a temp dir by default).
# Run nothing else heavy meanwhile: on a 2-core machine any other job skews both
# (llama.cpp's spinning thread pool collapses by 10x under contention).
# --wait-idle SECS waits, before every run, up to SECS for the CPUs to be >= 90%
# idle over 3 s, which helps on a shared machine.
#
# llama.cpp's tools come from bench/build_llama_cpp.sh (built on first use).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${TANDEM_CACHE:-$HOME/.cache/tandem}"

MODE=single
RUNS=5
THREADS=2
MODEL="${TANDEM_MODEL:-$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
TANDEM="${TANDEM_BIN:-}"
LLAMA_ONLY=0
OUT=""
SUMMARY_JSON=""
WAIT_IDLE=0
BATCHES="1,4,16,32,64"
NPP=128
NTG=128

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --mode) MODE="$2"; shift 2 ;;
        --runs) RUNS="$2"; shift 2 ;;
        --threads|-t) THREADS="$2"; shift 2 ;;
        --model|-m) MODEL="$2"; shift 2 ;;
        --tandem) TANDEM="$2"; shift 2 ;;
        --llama-only) LLAMA_ONLY=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --json) SUMMARY_JSON="$2"; shift 2 ;;
        --wait-idle) WAIT_IDLE="$2"; shift 2 ;;
        --batches) BATCHES="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

case "$MODE" in single|batched|all) ;; *) echo "--mode must be single, batched or all" >&2; exit 2 ;; esac
[[ -f "$MODEL" ]] || { echo "model not found: $MODEL (run: tandem model fetch)" >&2; exit 1; }

LLAMA_BIN="$("$HERE/build_llama_cpp.sh" | tail -n 1)"

if [[ $LLAMA_ONLY -eq 0 ]]; then
    if [[ -z "$TANDEM" ]]; then
        # The setup scripts build into $CARGO_TARGET_DIR (default
        # $CACHE/target); a target/ inside the checkout may be stale.
        built="${CARGO_TARGET_DIR:-$CACHE/target}/release/tandem"
        if [[ -x "$built" ]]; then
            TANDEM="$built"
        elif [[ -x "$REPO/target/release/tandem" ]]; then
            TANDEM="$REPO/target/release/tandem"
        elif command -v tandem >/dev/null 2>&1; then
            TANDEM="$(command -v tandem)"
        else
            echo "no tandem binary (build with: cargo build --release -p tandem, or pass --tandem PATH / --llama-only)" >&2
            exit 1
        fi
    fi
    [[ -x "$TANDEM" ]] || { echo "not executable: $TANDEM" >&2; exit 1; }
fi

OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/tandem-vs-llama.XXXXXX")}"
mkdir -p "$OUT"
echo "model:   $MODEL" >&2
echo "threads: $THREADS, runs: $RUNS, mode: $MODE" >&2
echo "llama:   $LLAMA_BIN" >&2
[[ $LLAMA_ONLY -eq 0 ]] && echo "tandem:  $TANDEM" >&2
echo "raw:     $OUT" >&2
if [[ "$(cut -d' ' -f1 /proc/loadavg | cut -d. -f1)" -ge 1 ]]; then
    echo "warning: load average is $(cut -d' ' -f1-3 /proc/loadavg); other jobs will skew both sides" >&2
fi

# --- one run of each side -------------------------------------------------

cpu_idle_pct() { # idle share of all CPUs over 3 seconds, in percent
    local a b
    read -r -a a < <(grep '^cpu ' /proc/stat)
    sleep 3
    read -r -a b < <(grep '^cpu ' /proc/stat)
    local total=0 i
    for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
    local idle=$(( b[4] - a[4] + b[5] - a[5] ))
    echo $(( total > 0 ? 100 * idle / total : 100 ))
}

wait_idle() {
    [[ "$WAIT_IDLE" -gt 0 ]] || return 0
    local start=$SECONDS idle
    while :; do
        idle="$(cpu_idle_pct)"
        (( idle >= 90 )) && return 0
        if (( SECONDS - start >= WAIT_IDLE )); then
            echo "  (CPUs only ${idle}% idle after ${WAIT_IDLE}s; running anyway)" >&2
            return 0
        fi
    done
}

llama_single() { # $1 = run index
    "$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 512 -n 128 -o jsonl \
        > "$OUT/llama_single_p512_$1.jsonl" 2> "$OUT/llama_single_p512_$1.log"
    "$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 0 -n 128 -o jsonl \
        > "$OUT/llama_single_p0_$1.jsonl" 2> "$OUT/llama_single_p0_$1.log"
}

tandem_single() {
    "$TANDEM" bench engine --model "$MODEL" --threads "$THREADS" --json "$OUT/tandem_single_$1.json" \
        > "$OUT/tandem_single_$1.log" 2>&1
}

llama_batched() {
    local max_pl ctx
    max_pl="$(tr ',' '\n' <<<"$BATCHES" | sort -n | tail -n 1)"
    ctx=$(( max_pl * (NPP + NTG) ))
    # -c large enough for the biggest batch, or llama-batched-bench skips it.
    "$LLAMA_BIN/llama-batched-bench" -m "$MODEL" -t "$THREADS" -c "$ctx" \
        -npp "$NPP" -ntg "$NTG" -npl "$BATCHES" --output-format jsonl \
        > "$OUT/llama_batched_$1.log" 2>&1
    grep '^{"n_kv_max"' "$OUT/llama_batched_$1.log" > "$OUT/llama_batched_$1.jsonl"
}

tandem_batched() {
    "$TANDEM" bench engine --model "$MODEL" --threads "$THREADS" --batch "$BATCHES" \
        --json "$OUT/tandem_batched_$1.json" > "$OUT/tandem_batched_$1.log" 2>&1
}

alternate() { # $1 = single|batched
    local i
    for ((i = 1; i <= RUNS; i++)); do
        echo "[$1] round $i/$RUNS (load average: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
        if [[ $LLAMA_ONLY -eq 1 ]]; then
            wait_idle; "llama_$1" "$i"
        elif (( i % 2 )); then
            wait_idle; "llama_$1" "$i"; wait_idle; "tandem_$1" "$i"
        else
            wait_idle; "tandem_$1" "$i"; wait_idle; "llama_$1" "$i"
        fi
    done
}

[[ "$MODE" == single || "$MODE" == all ]] && alternate single
[[ "$MODE" == batched || "$MODE" == all ]] && alternate batched

# --- medians ----------------------------------------------------------------

python3 - "$OUT" "$MODE" "$RUNS" "$LLAMA_ONLY" "$SUMMARY_JSON" <<'PY'
import glob, json, os, statistics, sys

out, mode, runs, llama_only, summary_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]

def jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip().startswith("{")]

def med(xs):
    return statistics.median(xs) if xs else None

def fmt(x):
    return f"{x:10.1f}" if x is not None else f"{'-':>10}"

def ratio(t, l):
    return f"{t / l:7.2f}x" if t is not None and l else f"{'-':>8}"

summary = {"runs": runs}
if mode in ("single", "all"):
    pp, tg, tg0, tpp, ttg = [], [], [], [], []
    for i in range(1, runs + 1):
        for r in jsonl(f"{out}/llama_single_p512_{i}.jsonl"):
            if r["n_prompt"] == 512 and r["n_gen"] == 0:
                pp.append(r["avg_ts"])
            elif r["n_prompt"] == 0 and r["n_gen"] == 128:
                tg.append(r["avg_ts"])
        for r in jsonl(f"{out}/llama_single_p0_{i}.jsonl"):
            if r["n_gen"] == 128:
                tg0.append(r["avg_ts"])
        if not llama_only:
            with open(f"{out}/tandem_single_{i}.json") as f:
                t = json.load(f)
            tpp.append(t["prefill_tok_s"])
            ttg.append(t["decode_tok_s"])
    summary["single"] = {
        "llama_pp512_tok_s": pp, "llama_tg128_tok_s": tg, "llama_tg128_p0_tok_s": tg0,
        "tandem_prefill_tok_s": tpp, "tandem_decode_tok_s": ttg,
        "median": {"llama_pp512": med(pp), "llama_tg128": med(tg), "llama_tg128_p0": med(tg0),
                   "tandem_prefill": med(tpp), "tandem_decode": med(ttg)},
    }
    print(f"\nmedians of {runs} runs (tok/s)        llama.cpp     tandem   tandem/llama")
    print(f"  prefill (pp512)                 {fmt(med(pp))} {fmt(med(tpp))}  {ratio(med(tpp), med(pp))}")
    print(f"  decode  (tg128, with -p 512)    {fmt(med(tg))} {fmt(med(ttg))}  {ratio(med(ttg), med(tg))}")
    print(f"  decode  (tg128, -p 0)           {fmt(med(tg0))} {fmt(med(ttg))}  {ratio(med(ttg), med(tg0))}")
    print(f"  llama.cpp raw pp512: {[round(x, 1) for x in pp]}")
    print(f"  llama.cpp raw tg128: {[round(x, 1) for x in tg]} / -p 0: {[round(x, 1) for x in tg0]}")
    if tpp:
        print(f"  tandem raw prefill:  {[round(x, 1) for x in tpp]}  decode: {[round(x, 1) for x in ttg]}")

if mode in ("batched", "all"):
    lb, tb = {}, {}
    for i in range(1, runs + 1):
        for r in jsonl(f"{out}/llama_batched_{i}.jsonl"):
            lb.setdefault(r["pl"], []).append(r["speed_tg"])
        if not llama_only:
            with open(f"{out}/tandem_batched_{i}.json") as f:
                t = json.load(f)
            for e in t["batched"]:
                tb.setdefault(int(e["batch"]), []).append(e["decode_tok_s"])
    batches = sorted(set(lb) | set(tb))
    summary["batched"] = [
        {"batch": b, "llama_decode_tok_s": lb.get(b, []), "tandem_decode_tok_s": tb.get(b, []),
         "llama_median": med(lb.get(b, [])), "tandem_median": med(tb.get(b, []))}
        for b in batches
    ]
    print(f"\nbatched decode, medians of {runs} runs (aggregate tok/s, -npp 128 -ntg 128)")
    print(f"  {'batch':>5}   llama.cpp     tandem   tandem/llama")
    for b in batches:
        l, t = med(lb.get(b, [])), med(tb.get(b, []))
        print(f"  {b:>5}  {fmt(l)} {fmt(t)}  {ratio(t, l)}")
    for b in batches:
        print(f"  llama.cpp raw batch {b}: {[round(x, 1) for x in lb.get(b, [])]}")

if summary_path:
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nsummary written to {summary_path}")
PY
