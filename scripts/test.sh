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
