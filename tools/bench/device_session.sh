#!/usr/bin/env bash
# Everything this project measures on a lent GPU machine, in one call (its device time is
# scarce and each start costs minutes). Each stage runs under its own time limit and logs to
# $OUT/<stage>.log; a failing stage does not stop the others, and the stages that need
# Transformer Engine skip (rc 0, "skipped") unless the `te` stage passed in this call.
#
#   bash tools/bench/device_session.sh [STAGE ...]     # default: env te te_parity fp8_noise step_bench
#
# Set-up, once, in the checkout the session calls from (both folders ignored by git, carried):
#   echo /.whl/ >> .git/info/exclude; echo /.te/ >> .git/info/exclude; mkdir -p .te
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
#   cp ../shared/te/wheels/*.whl .te/         # Transformer Engine 2.11 cut to sm_90, ~22 MB (../shared/te/README.md)
# The device has torch 2.11 / Python 3.12 / Triton but no megatron-core and no TE: both wheel
# sets are installed into /tmp/site below. Budget: 15 device minutes a session, 10 a call, so two calls:
#   run(carry=[".whl", ".te"], timeout_s=600, command="bash tools/bench/device_session.sh env te te_parity fp8_noise")
#   run(carry=[".whl", ".te"], timeout_s=600, command="STEP_BENCH_PRECISIONS='bf16 fp8-tensorwise' bash tools/bench/device_session.sh te step_bench")
# (the second with the other precisions, 'fp8-delayed fp8-blockwise', when time is left).
# Results come back under $OUT: <stage>.log, te_parity.json, fp8_noise_te.json, te_step_bench.json;
# copy the JSON to tools/bench/results/ and the figures to tools/bench/RESULTS.md. Stages:
#   env          GPU, driver and package versions
#   te           install check of Transformer Engine: te.Linear FP8 forward/backward, megatron-core HAVE_TE
#   te_parity    TE spec vs local spec on the same weights, BF16: logits, 20 noisy steps (padded and
#                packed rows), packed vs padded per-sample losses on TE (tools/bench/te_parity.py)
#   fp8_noise    TE's real FP8 casts of the symmetric copies vs the CPU simulation (tools/bench/fp8_noise_te.py)
#   step_bench   LLaMA-2-7B width, as many layers as fit, seq 2048: BF16 / FP8 recipes x none / uniform /
#                symmetric (both pairings); $STEP_BENCH_PRECISIONS, $STEP_BENCH_LAYERS (default auto)
#   kernel       the fused Triton noise kernel against the torch reference on CUDA (bf16 too)
#   kernel_bench kernel bandwidth vs copy, and vs the unfused reference
#   smoke        a tiny BF16 fine-tune with symmetric noise, checkpoint saved and resumed
# Exit status 1 when a stage failed (skipped ones do not count). Without a GPU (here, CI) every
# Python stage prints SKIPPED and the TE stages skip: tests/bench/test_te_stages.py runs that.
set -u
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out="${OUT:-/tmp/device_out}"
mkdir -p "$out"
export OUT="$out"  # the stages write their JSON here too (what comes back from the device)
export PYTHONUNBUFFERED=1
wheels=()
ls .whl/*.whl >/dev/null 2>&1 && wheels+=(.whl/*.whl)
ls .te/*.whl >/dev/null 2>&1 && wheels+=(.te/*.whl)
export PYTHONPATH="$root"
# Only where there is a GPU: on a CPU machine (CI, the tests) nothing is installed anywhere.
if [ ${#wheels[@]} -gt 0 ] && command -v nvidia-smi >/dev/null 2>&1; then
  # One pip call for both sets: a second --target install into the same folder would replace it.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    || { echo "installing ${wheels[*]} failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$root"
fi
# What TE needs there (../shared/te/README.md): the pip CUDA headers for its run-time compilation
# (its own lookup expects the cu12 layout) and the pip CUDA libraries before torch loads them.
sp=$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))' 2>/dev/null || echo /nonexistent)
export NVTE_CUDA_INCLUDE_DIR="$sp/nvidia/cu13/include"
export LD_LIBRARY_PATH="$sp/nvidia/cu13/lib:$sp/nvidia/cudnn/lib:$sp/nvidia/nccl/lib:${LD_LIBRARY_PATH:-}"
work=/tmp/symnoise_device
mkdir -p "$work"

failed=()
te_ok="$work/te_ok"
rm -f "$te_ok"

needs_te() {  # needs_te NAME: true when the te stage passed in this call, else says why not
  [ -f "$te_ok" ] && return 0
  echo "== $1 skipped: the te stage did not pass in this call (run: device_session.sh te $1)"
  return 1
}

stage() {  # stage NAME SECONDS COMMAND...
  local name="$1" limit="$2"; shift 2
  echo "== $name (limit ${limit}s)"
  local started=$SECONDS
  timeout "$limit" bash -c '"$@"' _ "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$out/$name.log"
  echo "== $name rc=$rc in $((SECONDS - started))s"
  [ $rc -eq 0 ] || failed+=("$name")
  return $rc
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
[ ${#stages[@]} -eq 0 ] && stages=(env te te_parity fp8_noise step_bench)
for name in "${stages[@]}"; do
  case "$name" in
    env) stage env 30 run_env ;;
    kernel) stage kernel 150 python3 -m pytest -q -p no:cacheprovider tests/noise/test_fused_kernel.py \
              -k "reference_bits or sequence_parallel_layout" ;;
    kernel_bench) stage kernel_bench 200 python3 tools/bench/bench_noise_kernel.py --tokens 2048 8192 32768 \
                    --hidden 4096 8192 --kinds symmetric uniform gaussian --tiles 1x1024 2x1024 1x4096 ;;
    smoke) stage smoke 150 run_smoke ;;
    te) stage te 120 python3 tools/bench/te_smoke.py && python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' \
          && touch "$te_ok" ;;
    te_parity) needs_te te_parity && stage te_parity 330 python3 tools/bench/te_parity.py --workdir "$work/te_parity" ;;
    fp8_noise) needs_te fp8_noise && stage fp8_noise 90 python3 tools/bench/fp8_noise_te.py ;;
    step_bench) needs_te step_bench && stage step_bench 480 python3 tools/bench/bench_train_step_gpu.py --workdir "$work/step" \
                  --num-layers "${STEP_BENCH_LAYERS:-auto}" --seq-length 2048 --global-batch-size 8 --steps 4 --warmup 2 \
                  --rounds 1 --precisions ${STEP_BENCH_PRECISIONS:-bf16 fp8-delayed fp8-tensorwise fp8-blockwise} ;;
    *) echo "unknown stage $name"; exit 2 ;;
  esac
done
# Skipped stages are not failures; a failed one makes the call's status 1 (its log says why).
[ ${#failed[@]} -eq 0 ] || { echo "failed stages: ${failed[*]}"; exit 1; }
