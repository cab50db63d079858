#!/usr/bin/env bash
# Sets everything up if needed, then runs the main job: an interactive chat
# with the default model on this machine. Extra arguments go to `tandem generate`.
source "$(dirname "$0")/common.sh"
setup
log "starting tandem generate --chat (empty line or Ctrl-D quits)"
exec "$TANDEM_BIN" generate --chat "$@"
