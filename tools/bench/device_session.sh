#!/usr/bin/env bash
# Everything this project measures on a lent GPU machine, in one call (its device time is
# scarce and each start costs minutes). Each stage runs under its own time limit and logs to
# $OUT/<stage>.log; a failing stage does not stop the others.
#
#   bash tools/bench/device_session.sh [STAGE ...]     # default: all stages
#
# Set-up: the device has torch and Triton but no megatron-core; its cp312 wheel travels in .whl/
# (ignored by git; pass .whl in the call's carry):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
# Results of the last session: tools/bench/RESULTS.md. Stages:
#   env          GPU, driver and package versions
#   kernel       the fused Triton noise kernel against the torch reference on CUDA (bf16 too)
#   kernel_bench kernel bandwidth vs copy, and vs the unfused reference
#   smoke        a tiny BF16 fine-tune with symmetric noise, checkpoint saved and resumed
#   step_bench   a LLaMA-2-7B-wide training step: none / uniform / symmetric, MFU, memory
set -u
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out="${OUT:-/tmp/device_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$root"
else
  export PYTHONPATH="$root"
fi
work=/tmp/symnoise_device
mkdir -p "$work"

stage() {  # stage NAME SECONDS COMMAND...
  local name="$1" limit="$2"; shift 2
  echo "== $name (limit ${limit}s)"
  local started=$SECONDS
  timeout "$limit" bash -c '"$@"' _ "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$out/$name.log"
  echo "== $name rc=$rc in $((SECONDS - started))s"
}

run_env() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import sys, torch, triton, megatron.core, transformers
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__,
      'megatron-core', megatron.core.__version__, 'transformers', transformers.__version__)
try:
    import transformer_engine; print('transformer_engine', transformer_engine.__version__)
except ImportError as e: print('no transformer_engine:', e)"
}

run_smoke() {
  python3 tools/preprocess_data.py --input symnoise_megatron/data/bundled/instructions.json \
      --tokenizer-model symnoise_megatron/data/bundled/tokenizer.model --output-prefix "$work/data/bundled" --seq-length 257 --no-progress || return 1
  rm -rf "$work/smoke"
  local common=(--model tiny --data-path "$work/data/bundled" --seq-length 256 --micro-batch-size 2
                --global-batch-size 8 --lr 1e-4 --bf16 --noise-kind symmetric --noise-alpha 5 --log-interval 2
                --save "$work/smoke" --save-interval 4 --train-iters 8)
  torchrun --standalone --nproc-per-node 1 -m symnoise_megatron.finetune "${common[@]}" --exit-interval 4 || return 1
  torchrun --standalone --nproc-per-node 1 -m symnoise_megatron.finetune "${common[@]}"
}

export out work
export -f run_env run_smoke
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env kernel kernel_bench smoke step_bench)
for name in "${stages[@]}"; do
  case "$name" in
    env) stage env 30 run_env ;;
    kernel) stage kernel 150 python3 -m pytest -q -p no:cacheprovider tests/noise/test_fused_kernel.py \
              -k "reference_bits or sequence_parallel_layout" ;;
    kernel_bench) stage kernel_bench 200 python3 tools/bench/bench_noise_kernel.py --tokens 2048 8192 32768 \
                    --hidden 4096 8192 --kinds symmetric uniform gaussian --tiles 1x1024 2x1024 1x4096 ;;
    smoke) stage smoke 150 run_smoke ;;
    step_bench) stage step_bench 480 python3 tools/bench/bench_train_step_gpu.py --workdir "$work/step" \
                  --num-layers 8 --seq-length 2048 --global-batch-size 8 --steps 6 --warmup 3 --rounds 2
                cp "$work/step/results.json" "$out/step_results.json" 2>/dev/null ;;
    *) echo "unknown stage $name"; exit 2 ;;
  esac
done
