# Sourced by the GPU check scripts: puts the CUDA libraries of the Python
# environment's nvidia pip packages on the library path.
#
#   link_gpu_libs NAME...   e.g. link_gpu_libs cublas cublasLt nvrtc
#
# cudarc opens each library by its plain or CUDA-12 name (libcublas.so,
# libnvrtc.so, libnccl.so, ...), but the pip wheels ship only versioned
# names (libcublas.so.13, libnccl.so.2). For each NAME this links the first
# versioned file found under the plain name in a folder of our own (removed
# on exit), then puts that folder and every lib folder of the packages on
# LD_LIBRARY_PATH (cuBLAS also needs its cublasLt, NVRTC its builtins).

link_gpu_libs() {
    gpu_links=$(mktemp -d)
    trap 'rm -rf "$gpu_links"' EXIT
    local libdirs
    libdirs=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = []
for r in roots:
    for pat in ("nvidia/*/lib", "nvidia/*/*/lib", "nvidia/lib"):
        dirs += [d for d in glob.glob(os.path.join(r, pat)) if os.path.isdir(d)]
print(":".join(dict.fromkeys(dirs)))
PY
)
    local d lib v
    for d in ${libdirs//:/ }; do
        for lib in "$@"; do
            for v in 13 12 2; do
                if [[ -e "$d/lib$lib.so.$v" && ! -e "$gpu_links/lib$lib.so" ]]; then
                    ln -sf "$d/lib$lib.so.$v" "$gpu_links/lib$lib.so"
                fi
            done
        done
    done
    export LD_LIBRARY_PATH="$gpu_links${libdirs:+:$libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "library links: $(ls "$gpu_links" | tr '\n' ' ')"
    echo "library path: $LD_LIBRARY_PATH"
}
