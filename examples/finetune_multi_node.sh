#!/usr/bin/env bash
# Any model on NNODES nodes of 8 GPUs; run once per node (NODE_RANK 0..NNODES-1). Usage:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 DATASET=sharegpt CKPT=... DATA=... bash examples/finetune_multi_node.sh [extra flags]
set -euo pipefail
source "$(dirname "$0")/hparams.sh"
: "${CKPT:?}" "${DATA:?}" "${NNODES:?}" "${NODE_RANK:?}" "${MASTER_ADDR:?}"
OUT=${OUT:-runs/$DATASET-$NOISE_KIND}
torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node 8 \
  --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" -m symnoise_megatron.finetune \
  --load "$CKPT" --finetune --save "$OUT" --data-path "$DATA" --tensorboard-dir "$OUT/tensorboard" \
  --bf16 --use-distributed-optimizer "${TRAIN_ARGS[@]}" "$@"
