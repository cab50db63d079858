#!/usr/bin/env bash
# Build llama.cpp's baseline tools (llama-bench, llama-batched-bench,
# llama-server) from the sources vendored in the llama-cpp-python sdist.
#
# Only PyPI is reachable from the build machines, so llama.cpp itself cannot be
# cloned; the llama-cpp-python sdist carries a pinned copy in vendor/llama.cpp.
#
#   bench/build_llama_cpp.sh            # builds into ${TANDEM_CACHE:-$HOME/.cache/tandem}/llama.cpp
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 JOBS=2 bench/build_llama_cpp.sh
#
# Idempotent: exits at once when all three binaries already exist.
# Prints the bin directory on its last line of stdout.
# Run it niced on shared machines: `nice -n 15 bench/build_llama_cpp.sh` (~10+ min on 2 cores).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${TANDEM_CACHE:-$HOME/.cache/tandem}"
ROOT="$CACHE/llama.cpp"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
TARGETS=(llama-bench llama-batched-bench llama-server)
BIN="$ROOT/bin"

have_all() {
    local t
    for t in "${TARGETS[@]}"; do
        [[ -x "$BIN/$t" ]] || return 1
    done
}

if have_all; then
    echo "llama.cpp tools already built in $BIN" >&2
    echo "$BIN"
    exit 0
fi

mkdir -p "$ROOT"
cd "$ROOT"

# 1. A private venv with the build helpers pip needs to fetch the sdist
#    (--no-build-isolation means scikit-build-core must already be present),
#    and a recent cmake.
if [[ ! -x venv/bin/python ]]; then
    "$PYTHON" -m venv venv
fi
venv/bin/python -m pip install --quiet --upgrade "scikit-build-core" "cmake"
export PATH="$ROOT/venv/bin:$PATH"

# 2. Fetch and unpack the sdist (no build of the Python package itself).
SRC="$ROOT/llama_cpp_python-$VERSION"
if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
    mkdir -p dl
    if ! ls dl/llama_cpp_python-"$VERSION".tar.gz >/dev/null 2>&1; then
        venv/bin/python -m pip download --no-deps --no-binary llama-cpp-python \
            --no-build-isolation -d dl "llama-cpp-python==$VERSION"
    fi
    tar -xzf dl/llama_cpp_python-"$VERSION".tar.gz -C "$ROOT"
fi

# 3. Configure and build the three tools. GGML_NATIVE turns on AMX where
#    the CPU lists it, but some virtual machines list AMX without letting a
#    process use its tiles (llama.cpp then dies of SIGILL in its first
#    matrix product): try a tile instruction first, and build without AMX
#    where it faults.
amx_usable() {
    grep -qw amx_tile /proc/cpuinfo || return 1
    local d
    d="$(mktemp -d)"
    cat > "$d/amx.c" <<'C'
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, as ggml asks. */
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return 1;
    unsigned char cfg[64];
    memset(cfg, 0, sizeof cfg);
    cfg[0] = 1;   /* palette 1 */
    cfg[16] = 64; /* tile 0: 64 bytes a row */
    cfg[48] = 16; /* tile 0: 16 rows */
    _tile_loadconfig(cfg);
    _tile_zero(0);
    _tile_release();
    return 0;
}
C
    local ok=1
    # (The subshell runs more than one command, so the notice of a killed
    # child goes to its silenced stderr, not to ours.)
    if gcc -O1 -mamx-tile "$d/amx.c" -o "$d/amx" 2>/dev/null && ("$d/amx"; exit $?) 2>/dev/null; then
        ok=0
    fi
    rm -rf "$d"
    return $ok
}
AMX_FLAGS=()
if grep -qw amx_tile /proc/cpuinfo && ! amx_usable; then
    echo "the CPU lists AMX but a process may not use it here: building llama.cpp without AMX" >&2
    # -march=native would turn the AMX kernels on again; explicit -mno-*
    # flags win over it whatever their order.
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    AMX_FLAGS=(-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
        "-DCMAKE_C_FLAGS=$no_amx" "-DCMAKE_CXX_FLAGS=$no_amx")
fi
cd "$SRC/vendor/llama.cpp"
cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON "${AMX_FLAGS[@]}"
cmake --build build --config Release -j"$JOBS" --target "${TARGETS[@]}"

# 4. Expose them (and their shared libraries) under one stable directory.
mkdir -p "$BIN"
for t in "${TARGETS[@]}"; do
    ln -sfn "$SRC/vendor/llama.cpp/build/bin/$t" "$BIN/$t"
done

have_all
echo "built llama.cpp tools from llama-cpp-python $VERSION into $BIN" >&2
echo "$BIN"
