#!/usr/bin/env bash
# The fine-tune on one node, or on each of NNODES nodes (run it once per node with NODE_RANK
# 0..NNODES-1 and the first node's address), with the run configs of examples/configs/: the
# data set's recipe (DATASET: alpaca, evol_instruct, sharegpt, open_platypus) and the layout
# of PRESET (llama2-7b, llama2-70b-fp8 on 8 or 16 nodes, cpu), in that order (later files win).
#   PRESET=llama2-7b DATASET=alpaca NOISE_KIND=symmetric CKPT=ckpt/llama2-7b DATA=data/alpaca bash examples/finetune.sh
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 DATASET=sharegpt CKPT=... DATA=... bash examples/finetune.sh [flags]
# CKPT: symnoise-convert hf-to-megatron output; DATA: symnoise-preprocess prefix.
# Flags after the script go to the fine-tune and win over the files.
# Under SLURM, examples/slurm_finetune.sbatch runs this on every node of the allocation.
#
# Variables: OUT (--save, default runs/PRESET-DATASET-NOISE_KIND), NOISE_KIND and NOISE_ALPHA
# (override the recipe's), NPROC_PER_NODE (processes per node: 8 on the GPU presets, 1 on cpu),
# CONFIGS (more run-config files after the preset's, e.g. one with `bf16: false` for FP32),
# ITERS and SAVE_INTERVAL (cpu preset: --train-iters and --save-interval), MASTER_PORT,
# SHUTDOWN_TIMEOUT (seconds torchrun's agent lets its workers save after SIGTERM before it
# kills them; torchrun's own default is 30, and torch before 2.12 ignores the setting: checked
# below), STOP_FILE (--stop-file: the SLURM script's way to stop it), FINETUNE_MODULE, TORCHRUN,
# PYTHON (torchrun's Python, for that check).
# With tensor parallelism (from the files or the flags) it sets CUDA_DEVICE_MAX_CONNECTIONS=1,
# as Megatron-LM requires: one CUDA work queue, so that the tensor-parallel communication is
# scheduled before the computation that waits for it.
set -euo pipefail
configs_dir="$(dirname "$0")/configs"
: "${DATASET:=alpaca}" "${PRESET:=llama2-7b}" "${NNODES:=1}"
if [ -n "${PRECISION+set}" ]; then  # the variable of the shell presets this script had before the run configs
  echo "PRECISION is no longer read: the layout file sets the precision; for another, add a run-config file with" \
       "CONFIGS (e.g. one holding 'bf16: false' for FP32, or fp8_format/fp8_recipe)" >&2; exit 2
fi
[ -f "$configs_dir/$DATASET.yaml" ] || {
  echo "unknown DATASET $DATASET (alpaca, evol_instruct, sharegpt, open_platypus: $configs_dir/*.yaml)" >&2; exit 2; }
case "${NOISE_KIND:-}" in
  ''|none|uniform|gaussian|bernoulli|symmetric) ;;
  *) echo "unknown NOISE_KIND $NOISE_KIND" >&2; exit 2 ;;
esac
launch=()  # flags that depend on the launch, not on the preset
case "$PRESET" in
  llama2-7b) layout=llama2-7b NPROC_PER_NODE=${NPROC_PER_NODE:-8} ;;
  llama2-70b-fp8)
    case "$NNODES" in
      8)  layout=llama2-70b-fp8-64gpu ;;
      16) layout=llama2-70b-fp8-128gpu ;;
      *) echo "PRESET=llama2-70b-fp8 runs on 8 or 16 nodes of 8 GPUs; plan a layout for $NNODES nodes with" \
              "tools/plan_layout.py (symnoise-plan), write it to $configs_dir/layouts/ and add it here" >&2; exit 2 ;;
    esac
    NPROC_PER_NODE=${NPROC_PER_NODE:-8} ;;
  cpu)
    layout=cpu NPROC_PER_NODE=${NPROC_PER_NODE:-1}
    launch=(--pipeline-model-parallel-size "$((NNODES * NPROC_PER_NODE))"
            ${ITERS:+--train-iters "$ITERS"} ${SAVE_INTERVAL:+--save-interval "$SAVE_INTERVAL"}) ;;
  *) echo "unknown PRESET $PRESET (llama2-7b, llama2-70b-fp8, cpu)" >&2; exit 2 ;;
esac
: "${CKPT:?converted checkpoint (symnoise-convert hf-to-megatron)}"
: "${DATA:?preprocessed data prefix (symnoise-preprocess)}"
OUT=${OUT:-runs/$PRESET-$DATASET-${NOISE_KIND:-symmetric}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
# torchrun reads this from torch 2.12 on (its --shutdown-timeout); older ones kill after 30 s.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-900}  # the sbatch lead time
torch_dir=$("${PYTHON:-python}" -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])' \
            2>/dev/null || true)
if [ "$NODE_RANK" = 0 ] && ! grep -qs TORCH_ELASTIC_SHUTDOWN_TIMEOUT "$torch_dir/distributed/launcher/api.py"; then
  echo "WARNING: this torch's torchrun (${torch_dir:-torch not found by ${PYTHON:-python}}; before torch 2.12) ignores" \
       "TORCH_ELASTIC_SHUTDOWN_TIMEOUT: it kills its workers 30 s after a SIGTERM, so a save on scancel --signal=TERM" \
       "or preemption has 30 s, not $TORCH_ELASTIC_SHUTDOWN_TIMEOUT (the SLURM script's time-limit stop uses --stop-file" \
       "and keeps its whole lead)" >&2
fi
if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?address of the first node (NNODES > 1)}"
  rendezvous=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
else
  rendezvous=(--standalone)  # a free port: several one-node jobs can share a machine
fi
[ "$PRESET" = cpu ] || launch+=(--tensorboard-dir "$OUT/tensorboard")
[ -z "${STOP_FILE:-}" ] || launch+=(--stop-file "$STOP_FILE")
read -ra extra_configs <<< "${CONFIGS:-}"
tensor_parallel=1  # the last file's value, then the last flag's
for file in "$configs_dir/$DATASET.yaml" "$configs_dir/layouts/$layout.yaml" "${extra_configs[@]}"; do
  value=$(sed -n 's/^tensor[-_]model[-_]parallel[-_]size:[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$file" | tail -n 1)
  tensor_parallel=${value:-$tensor_parallel}
done
previous=
for argument in "${launch[@]}" "$@"; do
  case "$previous" in --tensor-model-parallel-size) tensor_parallel=$argument ;; esac
  case "$argument" in --tensor-model-parallel-size=*) tensor_parallel=${argument#*=} ;; esac
  previous=$argument
done
if [ "$tensor_parallel" -gt 1 ]; then
  export CUDA_DEVICE_MAX_CONNECTIONS=1
fi
# exec: the signals SLURM sends to this task reach torchrun itself, which passes them on.
exec "${TORCHRUN:-torchrun}" "${rendezvous[@]}" --nproc-per-node "$NPROC_PER_NODE" \
  -m "${FINETUNE_MODULE:-symnoise_megatron.finetune}" \
  --config "$configs_dir/$DATASET.yaml" "$configs_dir/layouts/$layout.yaml" "${extra_configs[@]}" \
  --load "$CKPT" --finetune --save "$OUT" --data-path "$DATA" "${launch[@]}" \
  ${NOISE_KIND:+--noise-kind "$NOISE_KIND"} ${NOISE_ALPHA:+--noise-alpha "$NOISE_ALPHA"} "$@"
