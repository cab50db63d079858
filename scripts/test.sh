#!/usr/bin/env bash
# Sets everything up if needed, then runs every test (release profile: the
# tests run the real model and need optimised code).
source "$(dirname "$0")/common.sh"
setup
ensure_openai_client
log "running the tests"
cd "$ROOT"
cargo test --release --locked --workspace -- --test-threads="${TANDEM_TEST_THREADS:-2}"
"$ROOT/scripts/check_deploy.sh"
# The CUDA code (NCCL KV transport) must keep compiling on machines without
# CUDA: cudarc loads the libraries at run time, so a type check needs none.
log "type-checking the cuda feature"
cargo check --release --locked -p tandem-kv-transfer -p tandem-engine --features cuda --tests
cargo check --release --locked -p tandem --features cuda
# And its kernels must keep compiling: NVRTC compiles them for every
# supported architecture, no GPU needed; and computing what they should:
# they run under a CPU emulation of CUDA's blocks and warps against plain
# references (with the backend's other host-side unit tests).
ensure_nvrtc
log "compiling the CUDA kernels with NVRTC"
LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo test --release --locked -p tandem-engine --features cuda --lib cuda::
