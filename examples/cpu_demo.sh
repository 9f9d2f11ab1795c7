#!/usr/bin/env bash
# The whole job on the embedded default, on CPU, in a few minutes: preprocess the bundled
# instructions, make and convert a tiny LLaMA, fine-tune it with SymNoise on 2 ranks (TP 2),
# convert the result back to Hugging Face and answer with it. Extra arguments go to the fine-tune.
set -euo pipefail
source "$(dirname "$0")/cpu_common.sh"
run="$root/runs/cpu_demo"
rm -rf "$run" && mkdir -p "$run"
prepare_cpu_run "$run"
echo "== fine-tune with SymNoise (alpha 5, concat pairing) on 2 CPU ranks, TP 2"
$torchrun --standalone --nproc-per-node 2 -m symnoise_megatron.finetune $(cpu_finetune_args "$run" 120) \
    --save "$run/checkpoints" --noise-kind symmetric --noise-alpha 5 --noise-pairing concat "$@"
echo "== convert the fine-tuned checkpoint back to Hugging Face"
$py tools/convert_checkpoint.py megatron-to-hf --load-dir "$run/checkpoints" --save-dir "$run/finetuned-hf" --no-progress
echo "== answer with it"
$py tools/generate.py --hf-dir "$run/finetuned-hf" --instruction "What is the capital of France?" \
    --instruction "What is the opposite of the word 'hot'?" --max-new-tokens 24
