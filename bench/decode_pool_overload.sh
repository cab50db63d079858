#!/usr/bin/env bash
# A decode worker whose KV pool holds only a few of the prompts in flight:
# the same closed-loop load with transfers refused as soon as the pool is
# full (--kv-reserve-timeout-secs 0) and kept waiting for blocks (60, the
# default), measured by `tandem bench serve --url`.
#
#   bench/decode_pool_overload.sh [--timeouts 0,60] [--kv 48MiB] [--concurrency 16]
#                                 [--requests 64] [--in 400] [--out 32] [--tandem PATH]
#
# Each setting runs `tandem up --disagg-min-tokens 0 --kv-cache-memory KV`
# (one prefill and one decode worker; every prompt is disaggregated) with
# TANDEM_KV_RESERVE_TIMEOUT_SECS set, which its workers inherit. Prints
# bench serve's summary per setting; run nothing else heavy meanwhile.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${TANDEM_CACHE:-$HOME/.cache/tandem}"
MODEL="${TANDEM_MODEL:-$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
TIMEOUTS="0,60"
KV=48MiB
CONCURRENCY=16
REQUESTS=64
IN=400
OUT=32
TANDEM="${TANDEM_BIN:-}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --timeouts) TIMEOUTS="$2"; shift 2 ;;
        --kv) KV="$2"; shift 2 ;;
        --concurrency) CONCURRENCY="$2"; shift 2 ;;
        --requests) REQUESTS="$2"; shift 2 ;;
        --in) IN="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --tandem) TANDEM="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

[[ -f "$MODEL" ]] || { echo "model not found: $MODEL (run: tandem model fetch)" >&2; exit 1; }
TANDEM="${TANDEM:-${CARGO_TARGET_DIR:-$CACHE/target}/release/tandem}"
[[ -x "$TANDEM" ]] || { echo "no tandem binary at $TANDEM (build it, or pass --tandem)" >&2; exit 1; }

WORK="$(mktemp -d)"
UP=""
stop() { [[ -n "$UP" ]] && kill "$UP" 2>/dev/null && wait "$UP" 2>/dev/null; UP=""; }
trap 'stop; rm -rf "$WORK"' EXIT

IFS=, read -ra settings <<<"$TIMEOUTS"
for t in "${settings[@]}"; do
    TANDEM_KV_RESERVE_TIMEOUT_SECS="$t" "$TANDEM" up --port 0 --model "$MODEL" \
        --disagg-min-tokens 0 --kv-cache-memory "$KV" >"$WORK/up.out" 2>"$WORK/up.err" &
    UP=$!
    url=""
    for _ in $(seq 600); do
        url="$(sed -n 's/^TANDEM_URL //p' "$WORK/up.out")"
        [[ -n "$url" ]] && break
        kill -0 "$UP" 2>/dev/null || { cat "$WORK/up.err" >&2; exit 1; }
        sleep 0.1
    done
    [[ -n "$url" ]] || { echo "tandem up did not start" >&2; exit 1; }
    echo "== --kv-reserve-timeout-secs $t (decode KV $KV, $IN-token prompts, concurrency $CONCURRENCY)"
    TANDEM_LOG=error "$TANDEM" bench serve --url "$url" --dataset synthetic --input-tokens "$IN" \
        --output-tokens "$OUT" --ignore-eos --concurrency "$CONCURRENCY" \
        --requests "$REQUESTS" --seed 1 2>&1 | grep -E "requests,|TTFT|E2E|first_errors" || true
    stop
done
