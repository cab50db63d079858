#!/usr/bin/env bash
# Every GPU check (gpu_kv_check.sh, gpu_check.sh, gpu_disagg_check.sh) in
# two calls of a device runner whose calls carry at most 64 MiB, working
# tree included: the model (98 MB) and the three binaries (34 MB stripped)
# only fit as xz parts split across the two calls, on one warm machine
# (carried files stay there between calls).
#
# Where the toolchain is (no GPU needed):
#   cargo test --release --locked -p tandem-engine --features cuda --test cuda_backend --no-run
#   cargo test --release --locked -p tandem-kv-transfer --features cuda --test nccl --no-run
#   cargo build --release --locked -p tandem --features cuda
#   bench/gpu_session.sh pack
# then on the GPU machine, from the repository root:
#   bench/gpu_session.sh first    carrying models/parts/*.xz.part-aa,
#                                 target/gpu/cuda_backend.xz, target/gpu/nccl.xz
#   bench/gpu_session.sh second   carrying models/parts/*.xz.part-ab,
#                                 target/gpu/tandem.xz
# The first runs the NCCL transport tests and the CUDA checks that need no
# model; the second joins the model and runs every CUDA check, the
# benchmark and the two-process disaggregated check. Results land in
# $OUT/kv, $OUT/model_free, $OUT/disagg and $OUT/check (JSON and logs).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
here=bench
model_file=SmolLM2-135M-Instruct.Q4_1.gguf
out=${OUT:-bench/out/gpu_session}

unpack() {
    local b
    for b in "$@"; do
        if [[ -f target/gpu/$b.xz && ! -x target/gpu/$b ]]; then
            python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
                "target/gpu/$b.xz" "target/gpu/$b" && chmod +x "target/gpu/$b"
        fi
    done
}

case "${1:-}" in
pack)
    target=${CARGO_TARGET_DIR:-$HOME/.cache/tandem/target}
    newest() { ls -t "$target"/release/deps/"$1"-* 2>/dev/null | grep -v '\.d$' | head -n1; }
    mkdir -p target/gpu models/parts
    strip -o target/gpu/tandem "$target/release/tandem" &&
        strip -o target/gpu/cuda_backend "$(newest cuda_backend)" &&
        strip -o target/gpu/nccl "$(newest nccl)" || exit
    for b in tandem cuda_backend nccl; do xz -T0 -6 -f -k "target/gpu/$b" || exit; done
    rm -f models/parts/"$model_file".xz.part-*
    xz -T0 -6 -c "$HOME/.cache/tandem/models/$model_file" >target/gpu/model.xz &&
        split -b 46M target/gpu/model.xz models/parts/"$model_file".xz.part- &&
        rm target/gpu/model.xz || exit
    ls -l target/gpu models/parts
    ;;
first)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    unpack cuda_backend nccl
    bash "$here/gpu_kv_check.sh" "$out/kv" target/gpu/nccl
    mkdir -p "$out/model_free"
    (
        source "$here/gpu_libs.sh"
        link_gpu_libs cublas cublasLt nvrtc
        TANDEM_FIXTURES_DIR=$PWD/fixtures timeout 240 target/gpu/cuda_backend --test-threads=1 --show-output \
            paged_attention synthetic_checkpoints batches_match bf16_gemv tracking_pool
    ) 2>&1 | tee "$out/model_free/cuda_model_free.log"
    ;;
second)
    unpack tandem cuda_backend
    source "$here/gpu_model.sh"
    use_default_model
    echo "default model present and intact: $model_ok"
    bash "$here/gpu_disagg_check.sh" "$out/disagg" target/gpu/tandem cuda:0
    bash "$here/gpu_check.sh" "$out/check" target/gpu/cuda_backend
    ;;
*)
    echo "usage: $0 pack|first|second" >&2
    exit 2
    ;;
esac
