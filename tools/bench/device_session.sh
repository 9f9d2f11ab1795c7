#!/usr/bin/env bash
# Everything this project measures on a lent GPU machine, in ONE call of the device tool: a session
# has 15 minutes of device time (starts, idle waits and closes included) and a call at most 10, so
# the default plan's stage limits add up to 540 s. Each stage runs under its own limit, logs to
# $OUT/<stage>.log and writes its JSON after every setting, so a stage cut off keeps its rows; a
# failing stage does not stop the others; the stages that need Transformer Engine skip (rc 0,
# "skipped") unless the `te` stage passed in this call.
#
#   bash tools/bench/device_session.sh [STAGE ...]   # default: env te te_step fp8_noise te_parity step_bench
#   DEVICE_DRY_RUN=1 bash tools/bench/device_session.sh   # every stage's Python on the CPU, smallest shapes (CI)
#
# Set-up, once, in the checkout the session calls from (both folders ignored by git, carried):
#   echo /.whl/ >> .git/info/exclude; echo /.te/ >> .git/info/exclude; mkdir -p .te
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl 'megatron-core>=0.19,<0.20'      # 0.19.2: 2.4 MB, cp312
#   cp ../shared/te/wheels/*.whl .te/         # Transformer Engine 2.11 cut to sm_90, ~22 MB (../shared/te/README.md)
# Fallback, if the package does not run on megatron-core 0.19 yet (issue 31): put megatron-core==0.16.1's
# cp312 wheel in .whl instead (same command, '==0.16.1'); env.log records which one ran.
# The device has torch 2.11 / Python 3.12 / Triton but no megatron-core and no TE: both wheel sets
# are installed into /tmp/site below (10-20 s, outside the stages' 540 s). The call:
#   run(carry=[".whl", ".te"], timeout_s=600, command="bash tools/bench/device_session.sh")
# Results come back under $OUT: <stage>.log, te_step.json, fp8_noise_te.json, te_parity.json,
# te_step_bench.json; copy the JSON to tools/bench/results/ and the figures to tools/bench/RESULTS.md.
#
# Stages (limit in seconds; the default plan, in this order, is 20+60+80+60+160+160 = 540):
#   env          GPU, driver and package versions
#   te           install check of Transformer Engine: te.Linear FP8 forward/backward, megatron-core HAVE_TE
#   te_step      a TE fine-tuning step: 2 layers at 7B width, seq 256, packed rows with an empty filler row,
#                symmetric noise: finite loss, non-zero gradient on the embedding and layer 0's QKV, first and
#                later step times (tools/bench/te_step.py)
#   fp8_noise    TE's real FP8 casts of the symmetric copies vs the CPU simulation (tools/bench/fp8_noise_te.py)
#   te_parity    TE spec vs purely local spec on the same weights, BF16: logits, noisy training steps (padded
#                and packed rows), packed vs padded per-sample losses, fused vs reference noise gradients
#   step_bench   LLaMA-2-7B width, as many layers as fit, seq 2048: none and symmetric (concat) at BF16 and FP8
#                tensorwise first, then the other settings while its budget lasts (tools/bench/bench_train_step_gpu.py;
#                $STEP_BENCH_PRECISIONS, $STEP_BENCH_LAYERS, default auto)
# Not in the default plan (name them): kernel (the fused kernel's bits on CUDA, bf16 too), kernel_bench
# (its bandwidth vs a copy), smoke (a tiny BF16 fine-tune that saves and resumes).
# Exit status 1 when a stage failed (skipped ones do not count). Without a GPU and without DEVICE_DRY_RUN
# every Python stage prints SKIPPED and the TE stages skip.
set -u
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out="${OUT:-/tmp/device_out}"
mkdir -p "$out"
export OUT="$out"  # the stages write their JSON here too (what comes back from the device)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$root"
dry_run="${DEVICE_DRY_RUN:-0}"
py="${PYTHON:-python3}"  # the device's python3; a dry run may name another (CI: the checkout's .venv)
smallest=()
work=/tmp/symnoise_device
if [ "$dry_run" = 1 ]; then
  smallest=(--smallest)
  work="$out/work"
else
  wheels=()
  ls .whl/*.whl >/dev/null 2>&1 && wheels+=(.whl/*.whl)
  ls .te/*.whl >/dev/null 2>&1 && wheels+=(.te/*.whl)
  # Only where there is a GPU: on a CPU machine (CI, the tests) nothing is installed anywhere.
  if [ ${#wheels[@]} -gt 0 ] && command -v nvidia-smi >/dev/null 2>&1; then
    # One pip call for both sets: a second --target install into the same folder would replace it.
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
      || { echo "installing ${wheels[*]} failed"; exit 1; }
    export PYTHONPATH="/tmp/site:$root"
  fi
  # What TE needs there (../shared/te/README.md): the pip CUDA headers for its run-time compilation
  # (its own lookup expects the cu12 layout) and the pip CUDA libraries before torch loads them.
  sp=$("$py" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' 2>/dev/null || echo /nonexistent)
  export NVTE_CUDA_INCLUDE_DIR="$sp/nvidia/cu13/include"
  export LD_LIBRARY_PATH="$sp/nvidia/cu13/lib:$sp/nvidia/cudnn/lib:$sp/nvidia/nccl/lib:${LD_LIBRARY_PATH:-}"
fi
mkdir -p "$work"

failed=()
te_ok="$work/te_ok"
rm -f "$te_ok"
session_started=$SECONDS

needs_te() {  # needs_te NAME: true when the te stage passed in this call, else says why not
  [ -f "$te_ok" ] && return 0
  echo "== $1 skipped: the te stage did not pass in this call (run: device_session.sh te $1)"
  return 1
}

stage() {  # stage NAME SECONDS COMMAND...
  local name="$1" limit="$2"; shift 2
  # A dry run checks that the scripts run, not how fast: a shared CPU machine gets 5x the time.
  [ "$dry_run" = 1 ] && limit=$((limit * 5))
  echo "== $name (limit ${limit}s)"
  local started=$SECONDS
  timeout "$limit" bash -c '"$@"' _ "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$out/$name.log"
  [ $rc -eq 124 ] && echo "== $name stopped at its ${limit}s limit (its JSON holds what it finished)"
  echo "== $name rc=$rc in $((SECONDS - started))s (session $((SECONDS - session_started))s)"
  [ $rc -eq 0 ] || failed+=("$name")
  return $rc
}

run_env() {
  command -v nvidia-smi >/dev/null 2>&1 \
    && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  "$py" -c "import sys, torch, triton, megatron.core, transformers
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__,
      'megatron-core', megatron.core.__version__, 'transformers', transformers.__version__)
try:
    import transformer_engine; print('transformer_engine', transformer_engine.__version__)
except ImportError as e: print('no transformer_engine:', e)"
}

run_te() {  # passes where te_smoke passes (it skips without CUDA); opens the TE stages only where they can run
  "$py" tools/bench/te_smoke.py "$@" || return 1
  if [ "$dry_run" = 1 ] || "$py" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    touch "$te_ok"
  fi
}

run_smoke() {
  "$py" tools/preprocess_data.py --input symnoise_megatron/data/bundled/instructions.json \
      --tokenizer-model symnoise_megatron/data/bundled/tokenizer.model --output-prefix "$work/data/bundled" --seq-length 257 --no-progress || return 1
  rm -rf "$work/smoke"
  local common=(--model tiny --data-path "$work/data/bundled" --seq-length 256 --micro-batch-size 2
                --global-batch-size 8 --lr 1e-4 --bf16 --noise-kind symmetric --noise-alpha 5 --log-interval 2
                --save "$work/smoke" --save-interval 4 --train-iters 8)
  torchrun --standalone --nproc-per-node 1 -m symnoise_megatron.finetune "${common[@]}" --exit-interval 4 || return 1
  torchrun --standalone --nproc-per-node 1 -m symnoise_megatron.finetune "${common[@]}"
}

export out work dry_run te_ok py
export -f run_env run_te run_smoke
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env te te_step fp8_noise te_parity step_bench)
[ "$dry_run" = 1 ] && echo "== DEVICE_DRY_RUN=1: every stage's Python on the CPU at its smallest shapes (no measurement)"
for name in "${stages[@]}"; do
  case "$name" in
    env) stage env 20 run_env ;;
    te) stage te 60 run_te "${smallest[@]}" ;;
    te_step) needs_te te_step && stage te_step 80 "$py" tools/bench/te_step.py --workdir "$work/te_step" "${smallest[@]}" ;;
    fp8_noise) needs_te fp8_noise && stage fp8_noise 60 "$py" tools/bench/fp8_noise_te.py "${smallest[@]}" ;;
    te_parity) needs_te te_parity && stage te_parity 160 "$py" tools/bench/te_parity.py --workdir "$work/te_parity" \
                 --steps 10 "${smallest[@]}" ;;
    step_bench) needs_te step_bench && stage step_bench 160 "$py" tools/bench/bench_train_step_gpu.py --workdir "$work/step" \
                  --num-layers "${STEP_BENCH_LAYERS:-auto}" --seq-length 2048 --global-batch-size 8 --steps 4 --warmup 2 \
                  --rounds 1 --budget-s 150 --precisions ${STEP_BENCH_PRECISIONS:-bf16 fp8-tensorwise fp8-delayed fp8-blockwise} \
                  "${smallest[@]}" ;;
    kernel) stage kernel 150 "$py" -m pytest -q -p no:cacheprovider tests/noise/test_fused_kernel.py \
              -k "reference_bits or sequence_parallel_layout" ;;
    kernel_bench) stage kernel_bench 200 "$py" tools/bench/bench_noise_kernel.py --tokens 2048 8192 32768 \
                    --hidden 4096 8192 --kinds symmetric uniform gaussian --tiles 1x1024 2x1024 1x4096 "${smallest[@]}" ;;
    smoke) stage smoke 150 run_smoke ;;
    *) echo "unknown stage $name"; exit 2 ;;
  esac
done
echo "== session: $((SECONDS - session_started))s of stages"
# Skipped stages are not failures; a failed one makes the call's status 1 (its log says why).
[ ${#failed[@]} -eq 0 ] || { echo "failed stages: ${failed[*]}"; exit 1; }
