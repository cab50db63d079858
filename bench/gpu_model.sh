# Sourced by the GPU check scripts: finds the default model on the GPU
# machine, which fetches nothing. The model (98 MB) is more than one carry
# allows, so it travels as parts (see the header of gpu_check.sh), joined
# here into models/ in the repository; TANDEM_MODELS_DIR, when set, wins,
# and an installed model (~/.cache/tandem/models) serves where there is one.
#
#   use_default_model   exports TANDEM_MODELS_DIR when the model is there
#                       and sets model_ok=true when its sha256 is right.

model_file=SmolLM2-135M-Instruct.Q4_1.gguf
model_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

use_default_model() {
    if [[ -z "${TANDEM_MODELS_DIR:-}" ]]; then
        if [[ ! -f "models/$model_file" ]] && ls models/parts/"$model_file".part-* >/dev/null 2>&1; then
            mkdir -p models
            cat models/parts/"$model_file".part-* >"models/$model_file.tmp" &&
                mv "models/$model_file.tmp" "models/$model_file"
        elif [[ ! -f "models/$model_file" ]] && ls models/parts/"$model_file".xz.part-* >/dev/null 2>&1; then
            # Parts of the xz-compressed model (8% smaller: what lets the
            # model and the binaries travel in two calls, see gpu_session.sh).
            mkdir -p models
            cat models/parts/"$model_file".xz.part-* |
                python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)' \
                    >"models/$model_file.tmp" &&
                mv "models/$model_file.tmp" "models/$model_file"
        fi
        if [[ -f "models/$model_file" ]]; then
            export TANDEM_MODELS_DIR=$PWD/models
        elif [[ -f "$HOME/.cache/tandem/models/$model_file" ]]; then
            # Installed by the setup step (a machine that has one).
            export TANDEM_MODELS_DIR=$HOME/.cache/tandem/models
        fi
    fi
    model_ok=false
    if [[ -n "${TANDEM_MODELS_DIR:-}" && -f "$TANDEM_MODELS_DIR/$model_file" ]]; then
        local got
        got=$(sha256sum "$TANDEM_MODELS_DIR/$model_file" | cut -d' ' -f1)
        if [[ "$got" == "$model_sha" ]]; then
            model_ok=true
        else
            echo "warning: $TANDEM_MODELS_DIR/$model_file has sha256 $got, expected $model_sha" >&2
        fi
    fi
}
