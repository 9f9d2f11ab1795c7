#!/usr/bin/env bash
# The fine-tune on one node, or on each of NNODES nodes (run it once per node with NODE_RANK
# 0..NNODES-1 and the first node's address). Settings per PRESET and DATASET: examples/hparams.sh.
#   PRESET=llama2-7b DATASET=alpaca NOISE_KIND=symmetric CKPT=ckpt/llama2-7b DATA=data/alpaca bash examples/finetune.sh
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 DATASET=sharegpt CKPT=... DATA=... bash examples/finetune.sh [flags]
# CKPT: tools/convert_checkpoint.py hf-to-megatron output; DATA: tools/preprocess_data.py prefix.
# Flags after the script go to the fine-tune, after the preset's (the last one wins).
# Under SLURM, examples/slurm_finetune.sbatch runs this on every node of the allocation.
#
# Variables: OUT (--save, default runs/...), NPROC_PER_NODE (GPUs per node), PRECISION ("" for
# FP32), MASTER_PORT, SHUTDOWN_TIMEOUT (seconds torchrun's agent lets its workers save after
# SIGTERM before it kills them; torchrun's own default is 30), FINETUNE_MODULE.
set -euo pipefail
source "$(dirname "$0")/hparams.sh"
: "${CKPT:?converted checkpoint (tools/convert_checkpoint.py hf-to-megatron)}"
: "${DATA:?preprocessed data prefix (tools/preprocess_data.py)}"
OUT=${OUT:-runs/$PRESET-$DATASET-$NOISE_KIND}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
# torch's torchrun reads this where it has --shutdown-timeout; older ones kill after 30 s.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-900}  # the sbatch lead time
if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?address of the first node (NNODES > 1)}"
  rendezvous=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
else
  rendezvous=(--standalone)  # a free port: several one-node jobs can share a machine
fi
logging=()
[ "$PRESET" = cpu ] || logging=(--tensorboard-dir "$OUT/tensorboard")
# exec: the signals SLURM sends to this task reach torchrun itself, which passes them on.
# shellcheck disable=SC2086  # PRECISION is a list of flags
exec "${TORCHRUN:-torchrun}" "${rendezvous[@]}" --nproc-per-node "$NPROC_PER_NODE" \
  -m "${FINETUNE_MODULE:-symnoise_megatron.finetune}" \
  --load "$CKPT" --finetune --save "$OUT" --data-path "$DATA" "${logging[@]}" \
  $PRECISION "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "$@"
