#!/usr/bin/env bash
# Sets everything up if needed, then runs the main job: a local cluster
# (router + prefill and decode workers) serving the default model's OpenAI
# API at http://127.0.0.1:8000/v1. Extra arguments go to `tandem up`.
source "$(dirname "$0")/common.sh"
setup
log "starting tandem up (Ctrl-C stops the cluster)"
exec "$TANDEM_BIN" up "$@"
