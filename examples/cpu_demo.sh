#!/usr/bin/env bash
# The whole job on the embedded default, on CPU, in a few minutes: preprocess the bundled
# instructions, make and convert a tiny LLaMA, fine-tune it with SymNoise on 2 ranks (TP 2),
# convert the result back to Hugging Face and answer with it. Extra arguments go to the fine-tune.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/tools/bootstrap.sh"
py="$root/.venv/bin/python"
run="$root/runs/cpu_demo"
rm -rf "$run" && mkdir -p "$run"
cd "$root"

echo "== 1/6 preprocess the bundled instruction set"
$py tools/preprocess_data.py --input symnoise_megatron/data/bundled/instructions.json \
    --output-prefix "$run/data/bundled" --tokenizer-model symnoise_megatron/data/bundled/tokenizer.model --no-progress
echo "== 2/6 a tiny LLaMA in Hugging Face format"
$py tools/make_tiny_llama.py --save-dir "$run/tiny-llama-hf"
echo "== 3/6 convert it to a megatron-core checkpoint"
$py tools/convert_checkpoint.py hf-to-megatron --load-dir "$run/tiny-llama-hf" --save-dir "$run/tiny-llama-megatron" --no-progress
echo "== 4/6 fine-tune with SymNoise (alpha 5, concat pairing) on 2 CPU ranks, TP 2"
"$root/.venv/bin/torchrun" --standalone --nproc-per-node 2 -m symnoise_megatron.finetune \
    --load "$run/tiny-llama-megatron" --finetune --save "$run/checkpoints" \
    --data-path "$run/data/bundled" --tensor-model-parallel-size 2 \
    --micro-batch-size 4 --global-batch-size 16 --seq-length 256 --train-iters 120 \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-fraction 0.05 --log-interval 10 --eval-interval 40 --eval-iters 1 \
    --noise-kind symmetric --noise-alpha 5 --noise-pairing concat "$@"
echo "== 5/6 convert the fine-tuned checkpoint back to Hugging Face"
$py tools/convert_checkpoint.py megatron-to-hf --load-dir "$run/checkpoints" --save-dir "$run/finetuned-hf" --no-progress
echo "== 6/6 answer with it"
$py tools/generate.py --hf-dir "$run/finetuned-hf" --instruction "What is the capital of France?" \
    --instruction "What is the opposite of the word 'hot'?" --max-new-tokens 24
