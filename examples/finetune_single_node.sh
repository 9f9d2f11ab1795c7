#!/usr/bin/env bash
# LLaMA-2-7B on one node of 8 GPUs. Usage:
#   DATASET=alpaca NOISE_KIND=symmetric CKPT=ckpt/llama2-7b DATA=data/alpaca bash examples/finetune_single_node.sh
# CKPT: tools/convert_checkpoint.py hf-to-megatron output; DATA: tools/preprocess_data.py prefix.
set -euo pipefail
source "$(dirname "$0")/hparams.sh"
: "${CKPT:?converted checkpoint}" "${DATA:?preprocessed data prefix}"
OUT=${OUT:-runs/llama2-7b-$DATASET-$NOISE_KIND}
torchrun --nproc-per-node "${GPUS:-8}" -m symnoise_megatron.finetune \
  --load "$CKPT" --finetune --save "$OUT" --data-path "$DATA" --tensorboard-dir "$OUT/tensorboard" \
  --tensor-model-parallel-size 2 --micro-batch-size 4 --bf16 --use-distributed-optimizer \
  --noise-pairing concat "${TRAIN_ARGS[@]}" "$@"
